//! Converting a checkpoint between the single-file layout (LDM / SGM, as model hubs share
//! them) and a diffusers folder, both ways, tensor by tensor without building the models:
//! kohya's `tools/convert_diffusers20_original_sd.py`, diffusers' `from_single_file` +
//! `save_pretrained`, for SD1.x, SD2.x and SDXL.
//!
//! **Single file → folder** ([`single_file_to_diffusers`]): `unet/`, `text_encoder/`
//! (SDXL: `text_encoder_2/`), `vae/` with their `config.json` (inferred from the tensor
//! shapes as the loaders do, or embedded in the header), `tokenizer/` (and `tokenizer_2/`,
//! CLIP's, padding with `!` for OpenCLIP encoders), `scheduler/scheduler_config.json` (the
//! official repos': PNDM for SD1.x/2.x ε-prediction, DDIM for v-prediction, Euler for SDXL)
//! and `model_index.json`. What is left behind, as diffusers does: EMA weights (unless
//! [`ConvertOptions::ema`] takes the UNet's from them), SD2's unused 24th OpenCLIP layer,
//! its `text_projection` and `logit_scale`, position-id buffers and the schedule buffers.
//!
//! **Folder → single file** ([`diffusers_to_single_file`]): every component under its
//! original prefix (`model.diffusion_model.`, `cond_stage_model.transformer.` /
//! `cond_stage_model.model.` (SD2, q/k/v fused again), `conditioner.embedders.{0,1}.` (SDXL),
//! `first_stage_model.`, the VAE attention's linear weights as 1x1 convs again). As kohya
//! does for SD2, the OpenCLIP layer diffusers drops is written as a copy of the last one,
//! with an identity `text_projection` and `logit_scale` ln 100: placeholders that SD2 never
//! reads (it conditions on the penultimate layer) but that make the tower complete for tools
//! that load it strictly ([`ConvertReport::placeholders`]). A v-prediction model gets the
//! empty `v_pred` marker (and a zero-terminal-SNR one `ztsnr`) that ComfyUI reads. The
//! components' configs are embedded in the header (`sd_model:*_config`) so that any
//! architecture converts back exactly.
//!
//! Tensors keep their dtype unless [`ConvertOptions::dtype`] says otherwise; non-float
//! tensors are never converted. Output is written atomically (a `.partial-PID` sibling
//! renamed at the end) and never over an existing path. Source keys that have no place in the other
//! layout are reported ([`ConvertReport::left_out`]), not silently dropped.
//!
//! ```no_run
//! use sd_model::convert::{convert_checkpoint, ConvertOptions};
//! use std::path::Path;
//!
//! let report = convert_checkpoint(Path::new("v1-5-pruned-emaonly.safetensors"), Path::new("sd15-diffusers"), &ConvertOptions::default())?;
//! println!("{} tensors, {} left out", report.written.iter().map(|(_, n)| n).sum::<usize>(), report.left_out.len());
//! # Ok::<(), sd_model::SdModelError>(())
//! ```

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use lora_core::tensor_io::{decode_bytes, write_streamed, SaveDtype, StreamedTensor};
use safetensors::tensor::Dtype;
use serde_json::{json, Value};

use crate::config::{ClipTextConfig, VaeConfig, CLIP_WITH_PROJECTION};
use crate::keymap::{self, OpenClipName, TensorSource, UnetLayout, LDM_UNET_PREFIX, SD2_TEXT_PREFIX, SDXL_TEXT_2_PREFIX, SDXL_TEXT_PREFIX};
use crate::load::{self, LoadOptions, Mapping, ModelFamily, ModelSource, WeightFile, TEXT_ENCODER_2_CONFIG_KEY, TEXT_ENCODER_CONFIG_KEY, UNET_CONFIG_KEY, VAE_CONFIG_KEY};
use crate::tokenizer::ClipTokenizer;
use crate::{Result, SdModelError};

/// The diffusers version written into configs (the oldest whose loaders read every key we write).
const DIFFUSERS_VERSION: &str = "0.30.0";
/// OpenCLIP's trained logit scale, ln 100 (a placeholder where diffusers has none).
const LOGIT_SCALE: f32 = 4.605_17;

/// What a model predicts, as far as a conversion records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    /// The noise (ε): SD1.x, SD2.x base (512 px), SDXL.
    Epsilon,
    /// The velocity (v): SD2.x at 768 px, v-prediction fine-tunes.
    VPrediction,
}

impl Prediction {
    /// diffusers' `prediction_type` value.
    pub fn name(self) -> &'static str {
        match self {
            Self::Epsilon => "epsilon",
            Self::VPrediction => "v_prediction",
        }
    }
}

impl std::str::FromStr for Prediction {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "epsilon" | "eps" => Ok(Self::Epsilon),
            "v_prediction" | "v" => Ok(Self::VPrediction),
            other => Err(format!("unknown prediction type `{other}`: expected epsilon or v_prediction")),
        }
    }
}

/// Choices for [`convert_checkpoint`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ConvertOptions {
    /// Float type of the written tensors; `None` keeps each tensor's own.
    pub dtype: Option<SaveDtype>,
    /// Single file → folder: the UNet's weights from the file's EMA copy (`model_ema.*`, as
    /// diffusers' `extract_ema`); an error when the file has none.
    pub ema: bool,
    /// What the model predicts; `None` reads it from the source (a folder's scheduler
    /// config; a single file's `v_pred` key or `modelspec.prediction_type`), else ε.
    pub prediction: Option<Prediction>,
    /// A VAE to write instead of the source's (any layout [`load::load_vae_from`] reads:
    /// A1111 users bake `vae-ft-mse-840000-ema-pruned.safetensors` in so).
    pub vae: Option<PathBuf>,
}

/// What a conversion wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvertReport {
    /// The model family.
    pub family: ModelFamily,
    /// Tensors written per output file (path relative to the output).
    pub written: Vec<(String, usize)>,
    /// Source keys that have no place in the other layout (not written).
    pub left_out: Vec<String>,
    /// Keys written with placeholder values (SD2's OpenCLIP extras in a single file).
    pub placeholders: Vec<String>,
    /// The prediction type recorded.
    pub prediction: Prediction,
    /// Whether the schedule is rescaled to zero terminal SNR (recorded as read).
    pub zero_terminal_snr: bool,
    /// Whether the UNet's weights are the source's EMA copy.
    pub ema: bool,
}

/// Converts `src` (a single `.safetensors` checkpoint or a diffusers folder) into the other
/// layout at `out` (see the [module docs](self)). A PyTorch pickle checkpoint (`.ckpt`,
/// `.pt`, `.pth`, `.bin`; [`crate::torch_file`]) becomes a single `.safetensors` file of the
/// same keys when `out` ends in `.safetensors`, else a diffusers folder.
pub fn convert_checkpoint(src: &Path, out: &Path, options: &ConvertOptions) -> Result<ConvertReport> {
    if crate::torch_file::is_pytorch_file(src) && src.is_file() {
        return convert_pytorch(src, out, options);
    }
    match ModelSource::detect(src)? {
        ModelSource::SingleFile(path) => {
            // The layout comes from the source, so an output named as a file would be a
            // folder of that name (asked for a single file with another VAE, say).
            if has_checkpoint_extension(out) {
                return Err(bad(out, format!("{} is a single file, which converts to a diffusers folder: name a folder (no .safetensors); to bake --vae into a single file, convert to a folder, then that folder to a .safetensors file", path.display())));
            }
            single_file_to_diffusers(&path, out, options)
        }
        ModelSource::Diffusers(dir) => {
            if !out.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors")) {
                return Err(bad(out, format!("{} is a diffusers folder, which converts to a single file: name it *.safetensors, as A1111 and ComfyUI look for", dir.display())));
            }
            diffusers_to_single_file(&dir, out, options)
        }
    }
}

/// Whether `path` is named as a checkpoint file (`.safetensors`, or a pickle's extension).
fn has_checkpoint_extension(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors")) || crate::torch_file::is_pytorch_file(path)
}

/// A pickle checkpoint to a safetensors file of its keys, or through one to a folder.
fn convert_pytorch(src: &Path, out: &Path, options: &ConvertOptions) -> Result<ConvertReport> {
    refuse_existing(out)?;
    let to_file = out.extension().is_some_and(|e| e == "safetensors");
    if to_file && (options.ema || options.prediction.is_some() || options.vae.is_some()) {
        return Err(bad(out, "a pickle becomes a .safetensors file of the same keys as it is: --ema, --prediction-type and --vae apply when converting to a folder"));
    }
    // The intermediate file is this run's own (the process id): a file of the user's of
    // that name is never overwritten or deleted.
    let mut name = out.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".from-pickle-{}.safetensors", std::process::id()));
    let single = if to_file { out.to_path_buf() } else { out.with_file_name(name) };
    let tensors = crate::torch_file::pytorch_to_safetensors(src, &single, options.dtype)?;
    if !to_file {
        let converted = single_file_to_diffusers(&single, out, options);
        let _ = std::fs::remove_file(&single);
        // The intermediate file is gone: errors name the pickle.
        return converted.map_err(|e| bad(src, format!("read as a single-file checkpoint: {e}")));
    }
    let source = ModelSource::SingleFile(single.clone());
    let file = WeightFile::open(&single)?;
    let (recorded, zero_terminal_snr) = single_file_prediction(&file);
    let name = out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(ConvertReport {
        family: source.family().unwrap_or(ModelFamily::Sd1),
        written: vec![(name, tensors)],
        left_out: vec![],
        placeholders: vec![],
        prediction: recorded.unwrap_or(Prediction::Epsilon),
        zero_terminal_snr,
        ema: false,
    })
}

fn bad(what: &Path, reason: impl Into<String>) -> SdModelError {
    SdModelError::BadInput { what: what.display().to_string(), reason: reason.into() }
}

fn refuse_existing(out: &Path) -> Result<()> {
    if out.exists() {
        return Err(bad(out, "already exists: choose a new path (nothing is overwritten)"));
    }
    Ok(())
}

/// One piece of an output tensor: a source tensor (or some of its rows) in one of the files.
#[derive(Debug, Clone)]
struct Piece {
    file: usize,
    src: TensorSource,
}

/// One output tensor: pieces stacked along dimension 0, or literal values.
#[derive(Debug)]
struct Planned {
    key: String,
    pieces: Vec<Piece>,
    values: Option<Vec<f32>>,
    dtype: Dtype,
    shape: Vec<usize>,
}

/// The output files' tensors, checked against the sources when planned.
#[derive(Default)]
struct Plan {
    files: Vec<WeightFile>,
    outputs: BTreeMap<String, Vec<Planned>>,
    left_out: Vec<String>,
    placeholders: Vec<String>,
}

impl Plan {
    fn open(&mut self, path: &Path) -> Result<usize> {
        self.files.push(WeightFile::open(path)?);
        Ok(self.files.len() - 1)
    }

    fn push_file(&mut self, file: WeightFile) -> usize {
        self.files.push(file);
        self.files.len() - 1
    }

    /// Adds `key` to output `out` from `pieces` (stacked along dim 0), optionally with
    /// trailing 1x1 dims added to a matrix; the dtype is the first piece's unless `dtype`
    /// converts a float tensor.
    fn add(&mut self, out: &str, key: String, pieces: Vec<Piece>, unsqueeze: bool, dtype: Option<SaveDtype>) -> Result<()> {
        let mut shape: Vec<usize> = Vec::new();
        let mut first_dtype = None;
        for piece in &pieces {
            let file = &self.files[piece.file];
            let part = file.source_shape(&piece.src).ok_or_else(|| bad(file.path(), format!("`{}` is missing or has no rows {:?}", piece.src.key, piece.src.rows)))?;
            let (d, _) = file.raw(&piece.src.key).ok_or_else(|| bad(file.path(), format!("`{}` is missing", piece.src.key)))?;
            match first_dtype {
                None => {
                    first_dtype = Some(d);
                    shape = part;
                }
                Some(first) => {
                    let float = |d: Dtype| SaveDtype::of(d).is_some();
                    // Stacking takes float tensors of one rank (at least 1) and trailing shape.
                    if part.is_empty() || part.len() != shape.len() || part.get(1..) != shape.get(1..) || float(d) != float(first) || !float(d) {
                        return Err(bad(file.path(), format!("`{}` {d:?} {part:?} cannot be stacked into `{key}` {first:?} {shape:?}", piece.src.key)));
                    }
                    shape[0] += part[0];
                }
            }
        }
        let Some(source_dtype) = first_dtype else {
            return Err(bad(Path::new(out), format!("`{key}` has no source")));
        };
        if unsqueeze && shape.len() == 2 {
            shape.extend([1, 1]);
        }
        let dtype = match (dtype, SaveDtype::of(source_dtype)) {
            (Some(asked), Some(_)) => asked.st_dtype(),
            _ => source_dtype,
        };
        self.outputs.entry(out.to_string()).or_default().push(Planned { key, pieces, values: None, dtype, shape });
        Ok(())
    }

    /// Adds `key` with literal values (a placeholder).
    fn add_values(&mut self, out: &str, key: String, shape: Vec<usize>, values: Vec<f32>, dtype: Dtype) {
        self.placeholders.push(key.clone());
        let dtype = if SaveDtype::of(dtype).is_some() { dtype } else { Dtype::F32 };
        self.outputs.entry(out.to_string()).or_default().push(Planned { key, pieces: vec![], values: Some(values), dtype, shape });
    }

    /// Adds one output tensor per mapping entry (our path → key `name(path)`).
    fn add_mapping(&mut self, out: &str, file: usize, mapping: Mapping, name: impl Fn(&str) -> String, dtype: Option<SaveDtype>) -> Result<()> {
        for (path, src) in mapping {
            self.add(out, name(&path), vec![Piece { file, src }], false, dtype)?;
        }
        Ok(())
    }

    /// Writes every output file under `root` (created beforehand), with `metadata` in each.
    fn write(&self, root: &Path, metadata: &HashMap<String, String>) -> Result<Vec<(String, usize)>> {
        let mut written = Vec::new();
        for (name, tensors) in &self.outputs {
            let path = root.join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|source| SdModelError::Io { path: parent.to_path_buf(), source })?;
            }
            write_streamed(&path, self.streamed(tensors), metadata.clone())?;
            written.push((name.clone(), tensors.len()));
        }
        Ok(written)
    }
}

impl Plan {
    /// The planned tensors, each made when the writer reaches it.
    fn streamed<'a>(&'a self, tensors: &'a [Planned]) -> Vec<(String, StreamedTensor<'a>)> {
        tensors
            .iter()
            .map(|t| {
                let w = Writing { files: &self.files, tensor: t };
                (t.key.clone(), StreamedTensor::new(t.dtype, t.shape.clone(), move || w.bytes()))
            })
            .collect()
    }
}

/// A planned tensor's bytes, produced when the writer asks for them.
struct Writing<'a> {
    files: &'a [WeightFile],
    tensor: &'a Planned,
}

impl<'a> Writing<'a> {
    fn bytes(&self) -> Cow<'a, [u8]> {
        let (t, files) = (self.tensor, self.files);
        let encode = |values: &[f32]| SaveDtype::of(t.dtype).unwrap_or(SaveDtype::F32).encode(values);
        if let Some(values) = &t.values {
            return Cow::Owned(encode(values));
        }
        // Checked when planned: every piece is present and fits.
        let mut parts: Vec<(Dtype, Cow<'a, [u8]>)> = t
            .pieces
            .iter()
            .filter_map(|p| files[p.file].source_bytes(&p.src).map(|(d, b, _)| (d, b)))
            .collect();
        if parts.iter().all(|(d, _)| *d == t.dtype) {
            if parts.len() == 1 {
                return parts.pop().map(|(_, b)| b).unwrap_or_default();
            }
            return Cow::Owned(parts.iter().flat_map(|(_, b)| b.iter().copied()).collect());
        }
        let values: Vec<f32> = parts.iter().flat_map(|(d, b)| decode_bytes(*d, b).unwrap_or_default()).collect();
        Cow::Owned(encode(&values))
    }
}

/// Writes into `out`'s [`partial_sibling`](lora_core::tensor_io::partial_sibling) with
/// `fill`, then renames it to `out`; the partial output is removed on failure. An existing `out`, or a missing folder for it, is refused first
/// (naming `out`). Any error type that takes an [`SdModelError`] works (`anyhow`'s too).
///
/// ```
/// use sd_model::{convert::write_atomically, SdModelError};
/// let dir = tempfile::tempdir().unwrap();
/// let out = dir.path().join("model");
/// write_atomically::<SdModelError>(&out, |tmp| {
///     std::fs::create_dir(tmp).map_err(|source| SdModelError::Io { path: tmp.to_path_buf(), source })
/// })
/// .unwrap();
/// assert!(out.is_dir() && std::fs::read_dir(dir.path()).unwrap().count() == 1);
/// assert!(write_atomically::<SdModelError>(&out, |_| Ok(())).unwrap_err().to_string().contains("already exists"));
/// ```
pub fn write_atomically<E: From<SdModelError>>(out: &Path, fill: impl FnOnce(&Path) -> std::result::Result<(), E>) -> std::result::Result<(), E> {
    refuse_existing(out)?;
    // A missing folder is named for `out`, not for the `.partial` it is written through.
    lora_core::tensor_io::output_folder(out).map_err(SdModelError::from)?;
    let partial = lora_core::tensor_io::partial_sibling(out);
    let remove = |p: &Path| {
        let _ = if p.is_dir() { std::fs::remove_dir_all(p) } else { std::fs::remove_file(p) };
    };
    let done = fill(&partial).and_then(|()| std::fs::rename(&partial, out).map_err(|source| SdModelError::Io { path: out.to_path_buf(), source }.into()));
    if done.is_err() {
        remove(&partial);
    }
    done
}

/// The single-file key of an EMA copy: `model.diffusion_model.a.b.c` is
/// `model_ema.diffusion_modelabc` (LDM's EMA module names have no dots).
fn ema_key(key: &str) -> String {
    let rest = key.strip_prefix("model.").unwrap_or(key);
    format!("model_ema.{}", rest.replace('.', ""))
}

/// The VAE plan of a separate VAE file, for a VAE of `levels` levels: our paths and sources.
fn separate_vae(plan: &mut Plan, path: &Path, levels: usize) -> Result<(usize, Mapping)> {
    let file = load::open_vae_file(path, &LoadOptions::default())?;
    let (mapping, unexpected) = load::vae_file_mapping(&file, levels)?;
    if !unexpected.is_empty() {
        return Err(bad(file.path(), format!("{} keys are not VAE weights of {levels} levels (first: `{}`)", unexpected.len(), unexpected[0])));
    }
    Ok((plan.push_file(file), mapping))
}

/// A JSON object of `config` with `extra` keys set.
fn config_json<T: serde::Serialize>(config: &T, extra: Value) -> Value {
    let mut value = serde_json::to_value(config).unwrap_or_else(|_| json!({}));
    if let (Some(obj), Value::Object(extra)) = (value.as_object_mut(), extra) {
        obj.extend(extra);
    }
    value
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|source| SdModelError::Io { path: parent.to_path_buf(), source })?;
    }
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    std::fs::write(path, text + "\n").map_err(|source| SdModelError::Io { path: path.to_path_buf(), source })
}

fn torch_dtype(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::F16 => "float16",
        Dtype::BF16 => "bfloat16",
        _ => "float32",
    }
}

/// transformers' `config.json` of a CLIP text encoder.
fn text_encoder_json(config: &ClipTextConfig, with_projection: bool, dtype: Dtype) -> Value {
    let class = if with_projection { CLIP_WITH_PROJECTION } else { "CLIPTextModel" };
    config_json(
        config,
        json!({
            "architectures": [class],
            "model_type": "clip_text_model",
            // transformers' legacy ids: `eos_token_id == 2` pools at the highest id, as SD expects.
            "bos_token_id": 0,
            "eos_token_id": 2,
            "pad_token_id": 1,
            "projection_dim": config.projection_dim.unwrap_or(config.hidden_size),
            "torch_dtype": torch_dtype(dtype),
        }),
    )
}

/// The `scheduler/scheduler_config.json` text that [`single_file_to_diffusers`] writes for
/// a single-file checkpoint `file` of `family` (without a prediction type given): the
/// official repo's config for the family (SDXL's `EulerDiscreteScheduler` with `leading`
/// spacing and `steps_offset` 1, SD1.x's `PNDMScheduler`, `DDIMScheduler` for
/// v-prediction), with the prediction type and zero terminal SNR the file records
/// ([`single_file_prediction`]; ε where it records none) and `trailing` spacing with zero
/// terminal SNR. Sampling a single file reads the same config, as diffusers'
/// `from_single_file` takes the family's repo config, so a file and its converted folder
/// sample alike.
pub fn single_file_scheduler_json(file: &WeightFile, family: ModelFamily) -> String {
    let (prediction, zero_terminal_snr) = single_file_prediction(file);
    scheduler_json(family, prediction.unwrap_or(Prediction::Epsilon), zero_terminal_snr).to_string()
}

/// The official repos' scheduler config for a family and prediction type.
fn scheduler_json(family: ModelFamily, prediction: Prediction, zero_terminal_snr: bool) -> Value {
    let class = match (family, prediction) {
        (ModelFamily::Sdxl, _) => "EulerDiscreteScheduler",
        (_, Prediction::VPrediction) => "DDIMScheduler",
        _ => "PNDMScheduler",
    };
    let mut value = json!({
        "_class_name": class,
        "_diffusers_version": DIFFUSERS_VERSION,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": false,
        "num_train_timesteps": 1000,
        "prediction_type": prediction.name(),
        "set_alpha_to_one": false,
        "skip_prk_steps": true,
        "steps_offset": 1,
        "trained_betas": null,
    });
    if family == ModelFamily::Sdxl {
        value["interpolation_type"] = json!("linear");
        value["timestep_spacing"] = json!("leading");
        value["use_karras_sigmas"] = json!(false);
    }
    if zero_terminal_snr {
        value["rescale_betas_zero_snr"] = json!(true);
        // A zero-terminal-SNR schedule must sample from its last timestep.
        value["timestep_spacing"] = json!("trailing");
    }
    value
}

fn model_index_json(family: ModelFamily, scheduler: &Value) -> Value {
    let scheduler = json!(["diffusers", scheduler["_class_name"]]);
    let mut value = json!({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [null, null],
        "image_encoder": [null, null],
        "requires_safety_checker": false,
        "safety_checker": [null, null],
        "scheduler": scheduler,
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    });
    if let (ModelFamily::Sdxl, Some(obj)) = (family, value.as_object_mut()) {
        obj.remove("requires_safety_checker");
        obj.remove("safety_checker");
        obj.insert("_class_name".into(), json!("StableDiffusionXLPipeline"));
        obj.insert("force_zeros_for_empty_prompt".into(), json!(true));
        obj.insert("text_encoder_2".into(), json!(["transformers", CLIP_WITH_PROJECTION]));
        obj.insert("tokenizer_2".into(), json!(["transformers", "CLIPTokenizer"]));
    }
    value
}

/// The output pixel size a family's VAE config records (`sample_size`).
fn image_size(family: ModelFamily) -> usize {
    match family {
        ModelFamily::Sd1 => 512,
        ModelFamily::Sd2 => 768,
        ModelFamily::Sdxl => 1024,
    }
}

/// The dtype most of an output file's tensors have (its config's `torch_dtype`).
fn main_dtype(tensors: Option<&Vec<Planned>>) -> Dtype {
    let mut counts: BTreeMap<&'static str, (usize, Dtype)> = BTreeMap::new();
    for t in tensors.into_iter().flatten() {
        counts.entry(torch_dtype(t.dtype)).or_insert((0, t.dtype)).0 += 1;
    }
    counts.into_values().max_by_key(|(n, _)| *n).map_or(Dtype::F32, |(_, d)| d)
}

const UNET_FILE: &str = "unet/diffusion_pytorch_model.safetensors";
const TEXT_FILE: &str = "text_encoder/model.safetensors";
const TEXT_2_FILE: &str = "text_encoder_2/model.safetensors";
const VAE_FILE: &str = "vae/diffusion_pytorch_model.safetensors";

/// What a single file says about its schedule: the prediction type (an empty `v_pred`
/// key, ComfyUI's mark, else the SAI model spec's `modelspec.prediction_type`, else, for
/// an SD2.x text-to-image UNet, ComfyUI's test of its weights: [`sd2_v_prediction`]) and
/// whether it is rescaled to zero terminal SNR (an empty `ztsnr` key).
pub fn single_file_prediction(file: &WeightFile) -> (Option<Prediction>, bool) {
    let prediction = if file.contains("v_pred") {
        Some(Prediction::VPrediction)
    } else {
        file.metadata().get("modelspec.prediction_type").and_then(|p| p.parse().ok()).or_else(|| sd2_v_prediction(file))
    };
    (prediction, file.contains("ztsnr"))
}

/// The UNet bias ComfyUI measures to tell SD2.x's 768-v models from its 512 ε ones.
const SD2_V_TEST_KEY: &str = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias";

/// The prediction type of an SD2.x text-to-image checkpoint that records none, as ComfyUI
/// decides it (`supported_models.SD20.model_type`): v-prediction when the standard
/// deviation of the last transformer's first LayerNorm bias
/// (`output_blocks.11.1.transformer_blocks.0.norm1.bias`) is above
/// 0.09, ε otherwise. Stability's `v2-1_768-ema-pruned` and `v2-1_512-ema-pruned` carry no
/// mark, and the wrong objective samples noise. `None` for other files (not SD2's OpenCLIP
/// encoder, a UNet without 4 input channels, or no such bias in a float dtype).
pub fn sd2_v_prediction(file: &WeightFile) -> Option<Prediction> {
    let sd2 = file.contains("cond_stage_model.model.token_embedding.weight");
    let text_to_image = file.shape("model.diffusion_model.input_blocks.0.0.weight").is_some_and(|s| s.get(1) == Some(&4));
    if !(sd2 && text_to_image) {
        return None;
    }
    let (dtype, bytes) = file.raw(SD2_V_TEST_KEY)?;
    let values: Vec<f64> = decode_bytes(dtype, bytes)?.into_iter().map(f64::from).collect();
    if values.is_empty() {
        return None;
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    // torch.std(unbiased=False): the population deviation.
    let std = (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n).sqrt();
    Some(if std > 0.09 { Prediction::VPrediction } else { Prediction::Epsilon })
}

/// Converts a single-file checkpoint into a diffusers folder at `out` (see the
/// [module docs](self)).
pub fn single_file_to_diffusers(src: &Path, out: &Path, options: &ConvertOptions) -> Result<ConvertReport> {
    refuse_existing(out)?;
    let source = ModelSource::SingleFile(src.to_path_buf());
    let mut plan = Plan::default();
    let f = plan.open(src)?;
    let file = &plan.files[f];
    if !file.keys().any(|k| k.starts_with(LDM_UNET_PREFIX)) {
        return Err(bad(src, "no UNet weights (`model.diffusion_model.*`): not a Stable Diffusion checkpoint"));
    }
    let family = source.family()?;
    let unet_config = source.unet_config()?;
    let te_config = source.text_encoder_config()?;
    let te2_config = source.text_encoder_2_config()?;
    let has_vae = file.keys().any(|k| k.starts_with("first_stage_model."));
    let vae_config = match (has_vae, &options.vae) {
        (true, _) => source.vae_config()?,
        (false, Some(_)) if family == ModelFamily::Sdxl => VaeConfig { scaling_factor: load::SDXL_VAE_SCALING_FACTOR, ..VaeConfig::sd15() },
        (false, Some(_)) => VaeConfig::sd15(),
        (false, None) => return Err(bad(src, "holds no VAE (`first_stage_model.*`): give one to write (--vae)")),
    };
    let (recorded, zero_terminal_snr) = single_file_prediction(file);
    let prediction = options.prediction.or(recorded).unwrap_or(Prediction::Epsilon);
    let has_ema = file.keys().any(|k| k.starts_with("model_ema."));
    if options.ema && !has_ema {
        return Err(bad(src, "has no EMA weights (`model_ema.*`) to take the UNet's from"));
    }

    // UNet (from the EMA copy where asked).
    let (mut unet, mut left_out) = load::unet_single_file_keys(&UnetLayout::from_config(&unet_config), file);
    if options.ema {
        for (_, src_key) in &mut unet {
            let ema = ema_key(&src_key.key);
            if !file.contains(&ema) {
                return Err(bad(src, format!("has no EMA copy of `{}` (expected `{ema}`)", src_key.key)));
            }
            src_key.key = ema;
        }
    }
    // Text encoders: the loaders' own key maps.
    // A folder without them would not load (its model_index.json names them), so a
    // UNet-only file is refused as one without a VAE is.
    let (te, te_left) = load::text_encoder_single_file_keys(file, te_config.hidden_size, te_config.num_hidden_layers);
    if te.is_empty() {
        let prefix = if family == ModelFamily::Sdxl { "conditioner.embedders.0.*" } else { "cond_stage_model.*" };
        return Err(bad(src, format!("holds no text encoder (`{prefix}`): a diffusers folder needs one; convert the full checkpoint")));
    }
    left_out.extend(te_left);
    let te2 = match &te2_config {
        Some(c) => {
            let (m, l) = load::text_encoder_2_single_file_keys(file, c.hidden_size, c.num_hidden_layers);
            if m.is_empty() {
                return Err(bad(src, "holds no second text encoder (`conditioner.embedders.1.*`): a diffusers folder of SDXL needs one; convert the full checkpoint"));
            }
            left_out.extend(l);
            Some(m)
        }
        None => None,
    };
    let levels = vae_config.block_out_channels.len();
    let (vae, vae_left) = load::vae_ldm_keys(file, "first_stage_model.", levels);
    // Keys outside every component.
    let known = ["model.diffusion_model.", "cond_stage_model.", "conditioner.embedders.", "first_stage_model.", "model_ema."];
    left_out.extend(file.keys().filter(|k| !known.iter().any(|p| k.starts_with(p)) && !keymap::is_ignored_single_file_key(k)).map(str::to_string));

    let dtype = options.dtype;
    plan.add_mapping(UNET_FILE, f, unet, str::to_string, dtype)?;
    plan.add_mapping(TEXT_FILE, f, te, str::to_string, dtype)?;
    if let Some(te2) = te2 {
        plan.add_mapping(TEXT_2_FILE, f, te2, str::to_string, dtype)?;
    }
    match &options.vae {
        Some(path) => {
            let (v, mapping) = separate_vae(&mut plan, path, levels)?;
            plan.add_mapping(VAE_FILE, v, mapping, str::to_string, dtype)?;
        }
        None => {
            left_out.extend(vae_left);
            plan.add_mapping(VAE_FILE, f, vae, str::to_string, dtype)?;
        }
    }
    left_out.sort();
    plan.left_out = left_out;

    let scheduler = scheduler_json(family, prediction, zero_terminal_snr);
    let vae_json = config_json(
        &vae_config,
        json!({"_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION, "sample_size": image_size(family), "force_upcast": family == ModelFamily::Sdxl}),
    );
    let unet_json = config_json(&unet_config, json!({"_class_name": "UNet2DConditionModel", "_diffusers_version": DIFFUSERS_VERSION}));
    let te_json = text_encoder_json(&te_config, false, main_dtype(plan.outputs.get(TEXT_FILE)));
    let te2_json = te2_config.as_ref().map(|c| text_encoder_json(c, true, main_dtype(plan.outputs.get(TEXT_2_FILE))));
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let mut written = Vec::new();
    write_atomically(out, |dir| {
        written = plan.write(dir, &metadata)?;
        write_json(&dir.join("unet/config.json"), &unet_json)?;
        write_json(&dir.join("vae/config.json"), &vae_json)?;
        write_json(&dir.join("text_encoder/config.json"), &te_json)?;
        let clip = ClipTokenizer::bundled()?;
        // OpenCLIP encoders (SD2's, SDXL's second) pad with `!` (id 0).
        let first = if family == ModelFamily::Sd2 { clip.clone().with_pad_token_id(0)? } else { clip.clone() };
        first.save_to_dir(dir.join("tokenizer"))?;
        if let Some(te2_json) = &te2_json {
            write_json(&dir.join("text_encoder_2/config.json"), te2_json)?;
            clip.with_pad_token_id(0)?.save_to_dir(dir.join("tokenizer_2"))?;
        }
        write_json(&dir.join("scheduler/scheduler_config.json"), &scheduler)?;
        write_json(&dir.join("model_index.json"), &model_index_json(family, &scheduler))
    })?;
    Ok(ConvertReport { family, written, left_out: plan.left_out, placeholders: plan.placeholders, prediction, zero_terminal_snr, ema: options.ema })
}

/// The prediction type and zero-terminal-SNR flag of a folder's scheduler config (ε and
/// `false` without one); a `prediction_type` a single file cannot record is an error.
fn folder_prediction(dir: &Path) -> Result<(Option<Prediction>, bool)> {
    let path = dir.join("scheduler/scheduler_config.json");
    if !path.is_file() {
        return Ok((None, false));
    }
    let value: Value = crate::config::read_json(&path)?;
    let prediction = match value.get("prediction_type").and_then(Value::as_str) {
        None => None,
        Some(p) => Some(p.parse::<Prediction>().map_err(|e| bad(&path, format!("{e} (a single file records only these)")))?),
    };
    Ok((prediction, value.get("rescale_betas_zero_snr").and_then(Value::as_bool).unwrap_or(false)))
}

/// The OpenCLIP tower of a transformers text encoder under `prefix`: q/k/v fused into
/// `in_proj`, `text_projection` transposed. Keys with no OpenCLIP name are returned.
fn plan_open_clip(plan: &mut Plan, file: usize, prefix: &str, dtype: Option<SaveDtype>) -> Result<Vec<String>> {
    let mut fused: BTreeMap<String, [Option<String>; 3]> = BTreeMap::new();
    let mut left_out = Vec::new();
    let keys: Vec<String> = plan.files[file].keys().map(str::to_string).collect();
    for key in keys {
        if keymap::is_ignored_diffusers_key(&key) {
            continue;
        }
        match keymap::open_clip_name(&key) {
            Some(OpenClipName::Plain(name)) => plan.add(out_file(), format!("{prefix}{name}"), vec![Piece { file, src: TensorSource::plain(key) }], false, dtype)?,
            Some(OpenClipName::Transposed(name)) => {
                let src = TensorSource { transpose: true, ..TensorSource::plain(key) };
                plan.add(out_file(), format!("{prefix}{name}"), vec![Piece { file, src }], false, dtype)?;
            }
            Some(OpenClipName::Fused(name, part)) => fused.entry(name).or_default()[part] = Some(key),
            None => left_out.push(key),
        }
    }
    for (name, parts) in fused {
        let [Some(q), Some(k), Some(v)] = parts else {
            return Err(bad(plan.files[file].path(), format!("`{name}` needs all of q_proj, k_proj and v_proj")));
        };
        let pieces = [q, k, v].into_iter().map(|key| Piece { file, src: TensorSource::plain(key) }).collect();
        plan.add(out_file(), format!("{prefix}{name}"), pieces, false, dtype)?;
    }
    Ok(left_out)
}

/// The one output file of a folder → single-file conversion (the plan's key).
fn out_file() -> &'static str {
    "checkpoint"
}

/// SD2's placeholders for what diffusers drops from OpenCLIP: layer `layers` (a copy of the
/// last), an identity `text_projection` and `logit_scale`.
fn plan_sd2_extras(plan: &mut Plan, layers: usize, width: usize, dtype: Dtype) {
    let last = format!("{SD2_TEXT_PREFIX}transformer.resblocks.{}.", layers - 1);
    let copies: Vec<Planned> = plan.outputs.get(out_file()).into_iter().flatten().filter(|t| t.key.starts_with(&last)).map(|t| Planned {
        key: t.key.replacen(&last, &format!("{SD2_TEXT_PREFIX}transformer.resblocks.{layers}."), 1),
        pieces: t.pieces.clone(),
        values: None,
        dtype: t.dtype,
        shape: t.shape.clone(),
    }).collect();
    plan.placeholders.extend(copies.iter().map(|t| t.key.clone()));
    plan.outputs.entry(out_file().to_string()).or_default().extend(copies);
    let identity: Vec<f32> = (0..width * width).map(|i| if i % (width + 1) == 0 { 1.0 } else { 0.0 }).collect();
    plan.add_values(out_file(), format!("{SD2_TEXT_PREFIX}text_projection"), vec![width, width], identity, dtype);
    plan.add_values(out_file(), format!("{SD2_TEXT_PREFIX}logit_scale"), vec![], vec![LOGIT_SCALE], dtype);
}

/// Converts a diffusers folder into a single-file checkpoint `out` (see the
/// [module docs](self)).
pub fn diffusers_to_single_file(dir: &Path, out: &Path, options: &ConvertOptions) -> Result<ConvertReport> {
    refuse_existing(out)?;
    if options.ema {
        return Err(bad(dir, "a diffusers folder has no EMA copy: --ema applies to single files"));
    }
    let source = ModelSource::Diffusers(dir.to_path_buf());
    let family = source.family()?;
    let unet_config = source.unet_config()?;
    let te_config = source.text_encoder_config()?;
    let te2_config = source.text_encoder_2_config()?;
    let (read_prediction, zero_terminal_snr) = folder_prediction(dir)?;
    let prediction = options.prediction.or(read_prediction).unwrap_or(Prediction::Epsilon);
    let dtype = options.dtype;
    let mut plan = Plan::default();
    let mut left_out = Vec::new();

    let unet = plan.open(&ModelSource::weights_file(dir, "unet")?)?;
    let layout = UnetLayout::from_config(&unet_config);
    let keys: Vec<String> = plan.files[unet].keys().map(str::to_string).collect();
    for key in keys {
        match layout.diffusers_to_ldm_key(&key) {
            Some(ldm) => plan.add(out_file(), ldm, vec![Piece { file: unet, src: TensorSource::plain(key) }], false, dtype)?,
            None => left_out.push(format!("unet: {key}")),
        }
    }

    let te = plan.open(&ModelSource::weights_file(dir, "text_encoder")?)?;
    match family {
        ModelFamily::Sd2 => {
            left_out.extend(plan_open_clip(&mut plan, te, SD2_TEXT_PREFIX, dtype)?.into_iter().map(|k| format!("text_encoder: {k}")));
            let placeholder_dtype = dtype.map_or_else(|| main_dtype(plan.outputs.get(out_file())), SaveDtype::st_dtype);
            plan_sd2_extras(&mut plan, te_config.num_hidden_layers, te_config.hidden_size, placeholder_dtype);
        }
        ModelFamily::Sd1 | ModelFamily::Sdxl => {
            let prefix = if family == ModelFamily::Sdxl { SDXL_TEXT_PREFIX } else { "cond_stage_model.transformer." };
            let mapping = load::identity_mapping(&plan.files[te]);
            plan.add_mapping(out_file(), te, mapping, |k| format!("{prefix}{k}"), dtype)?;
        }
    }
    if te2_config.is_some() {
        let te2 = plan.open(&ModelSource::weights_file(dir, "text_encoder_2")?)?;
        left_out.extend(plan_open_clip(&mut plan, te2, SDXL_TEXT_2_PREFIX, dtype)?.into_iter().map(|k| format!("text_encoder_2: {k}")));
    }

    let vae_config = if dir.join("vae/config.json").is_file() { Some(source.vae_config()?) } else { None };
    let levels = vae_config.as_ref().map_or(VaeConfig::sd15().block_out_channels.len(), |c| c.block_out_channels.len());
    let (vae, mapping) = match &options.vae {
        Some(path) => separate_vae(&mut plan, path, levels)?,
        None if vae_config.is_some() => {
            let v = plan.open(&ModelSource::weights_file(dir, "vae")?)?;
            (v, load::identity_mapping(&plan.files[v]))
        }
        None => return Err(bad(dir, "has no vae/: give a VAE to write (--vae)")),
    };
    for (path, src) in mapping {
        match keymap::diffusers_vae_to_ldm(&path, levels) {
            Some((ldm, conv)) => plan.add(out_file(), format!("first_stage_model.{ldm}"), vec![Piece { file: vae, src }], conv, dtype)?,
            None => left_out.push(format!("vae: {path}")),
        }
    }

    // ComfyUI's markers: empty tensors.
    let markers = [(prediction == Prediction::VPrediction, "v_pred"), (zero_terminal_snr, "ztsnr")];
    for (on, key) in markers {
        if on {
            plan.outputs.entry(out_file().to_string()).or_default().push(Planned { key: key.into(), pieces: vec![], values: Some(vec![]), dtype: Dtype::F32, shape: vec![0] });
        }
    }
    left_out.sort();
    plan.left_out = left_out;

    let mut metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let mut embed = |key: &str, value: Value| metadata.insert(key.to_string(), value.to_string());
    embed(UNET_CONFIG_KEY, serde_json::to_value(&unet_config).unwrap_or_default());
    embed(TEXT_ENCODER_CONFIG_KEY, serde_json::to_value(&te_config).unwrap_or_default());
    if let Some(c) = &te2_config {
        embed(TEXT_ENCODER_2_CONFIG_KEY, serde_json::to_value(c).unwrap_or_default());
    }
    if let Some(c) = &vae_config {
        embed(VAE_CONFIG_KEY, serde_json::to_value(c).unwrap_or_default());
    }
    let tensors = plan.outputs.get(out_file()).map(Vec::as_slice).unwrap_or_default();
    write_streamed(out, plan.streamed(tensors), metadata)?;
    let written = vec![(out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(), tensors.len())];
    Ok(ConvertReport { family, written, left_out: plan.left_out, placeholders: plan.placeholders, prediction, zero_terminal_snr, ema: false })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ema_keys_drop_the_dots() {
        assert_eq!(ema_key("model.diffusion_model.input_blocks.0.0.weight"), "model_ema.diffusion_modelinput_blocks00weight");
    }

    #[test]
    fn schedulers_follow_the_official_repos() {
        assert_eq!(scheduler_json(ModelFamily::Sd1, Prediction::Epsilon, false)["_class_name"], "PNDMScheduler");
        let v = scheduler_json(ModelFamily::Sd2, Prediction::VPrediction, false);
        assert_eq!((v["_class_name"].as_str(), v["prediction_type"].as_str()), (Some("DDIMScheduler"), Some("v_prediction")));
        let xl = scheduler_json(ModelFamily::Sdxl, Prediction::VPrediction, true);
        assert_eq!((xl["_class_name"].as_str(), xl["timestep_spacing"].as_str(), xl["rescale_betas_zero_snr"].as_bool()), (Some("EulerDiscreteScheduler"), Some("trailing"), Some(true)));
        assert_eq!(model_index_json(ModelFamily::Sdxl, &xl)["text_encoder_2"][1], CLIP_WITH_PROJECTION);
    }

    #[test]
    fn scalars_are_not_stacked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.safetensors");
        let t = lora_core::HostTensor::new(vec![], vec![1.0]).unwrap();
        let refs = vec![("a".to_string(), &t), ("b".to_string(), &t)];
        std::fs::write(&path, lora_core::tensor_io::serialize(&refs, SaveDtype::F32, Default::default()).unwrap()).unwrap();
        let mut plan = Plan::default();
        let f = plan.open(&path).unwrap();
        let pieces = ["a", "b"].map(|k| Piece { file: f, src: TensorSource::plain(k) }).to_vec();
        let err = plan.add("out", "ab".into(), pieces, false, None).unwrap_err();
        assert!(err.to_string().contains("cannot be stacked"), "{err}");
    }

    #[test]
    fn prediction_names_parse() {
        assert_eq!("v".parse::<Prediction>(), Ok(Prediction::VPrediction));
        assert_eq!("epsilon".parse::<Prediction>(), Ok(Prediction::Epsilon));
        assert!("sample".parse::<Prediction>().is_err());
    }
}
