//! Loading weights from real checkpoints through burn-store.
//!
//! Two layouts are supported:
//! - a **diffusers folder** (`model_index.json`, `text_encoder/model.safetensors`,
//!   SDXL's `text_encoder_2/model.safetensors`, `vae/diffusion_pytorch_model.safetensors`,
//!   `unet/...`, with `*.fp16.safetensors` variants), whose keys are our module paths;
//! - a **single-file checkpoint** as people download them (`model.diffusion_model.*`,
//!   `first_stage_model.*`, `cond_stage_model.*`, SDXL's `conditioner.embedders.{0,1}.*`),
//!   mapped by [`crate::keymap`].
//!
//! SDXL refiners (one OpenCLIP encoder, aesthetic-score conditioning) and class-conditioned
//! UNets (SD2.1 unCLIP) are refused with an error saying so.
//!
//! Files are memory-mapped and each tensor is read when it is applied, converted to the
//! precision asked for (f32, f16 or bf16, whatever the file holds). Missing, unexpected and
//! mis-shaped keys are reported together in one [`SdModelError::KeyMismatch`].

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

use burn::module::{Module, ModuleVisitor, Param, ParamId};
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, DType, Int, Tensor, TensorData};
use lora_core::frozen::build_for_loading;
use burn_store::{ModuleAdapter, ModuleSnapshot, PyTorchToBurnAdapter, TensorSnapshot, TensorSnapshotError};
use safetensors::tensor::{Dtype, TensorInfo};

use crate::config::{read_clip_config, read_unet_config, read_vae_config, ClipTextConfig, HiddenAct, PerBlock, UnetConfig, VaeConfig};
use crate::keymap::{self, TensorSource};
use crate::error::KeyMismatch;
use crate::{AutoencoderKl, ClipTextModel, Result, SdModelError, UNet2DConditionModel};

/// How many keys an error lists per category.
const SHOW: usize = 8;

/// Reads one tensor's data when burn-store applies it.
type TensorReader = Rc<dyn Fn() -> Result<TensorData, TensorSnapshotError>>;

/// A memory-mapped safetensors file.
pub struct WeightFile {
    path: PathBuf,
    mmap: Arc<memmap2::Mmap>,
    data_start: usize,
    infos: HashMap<String, TensorInfo>,
    metadata: HashMap<String, String>,
}

impl std::fmt::Debug for WeightFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightFile")
            .field("path", &self.path)
            .field("tensors", &self.infos.len())
            .finish()
    }
}

impl WeightFile {
    /// Opens and validates a safetensors file (header, offsets, sizes).
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let file = std::fs::File::open(&path).map_err(|source| SdModelError::Io {
            path: path.clone(),
            source,
        })?;
        // SAFETY: the map is read-only; as with every mmap-based loader, the file must not be
        // truncated by another process while it is being read.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| SdModelError::Io {
            path: path.clone(),
            source,
        })?;
        let pickle = lora_core::tensor_io::looks_like_pickle(&mmap);
        let corrupt = |e: safetensors::SafeTensorError| SdModelError::CorruptWeights {
            path: path.clone(),
            reason: if pickle {
                lora_core::tensor_io::PICKLE_HINT.into()
            } else {
                e.to_string()
            },
        };
        safetensors::SafeTensors::deserialize(&mmap).map_err(corrupt)?;
        let (header_len, metadata) = safetensors::SafeTensors::read_metadata(&mmap).map_err(corrupt)?;
        let infos = metadata
            .tensors()
            .into_iter()
            .map(|(k, info)| (k, info.clone()))
            .collect();
        let metadata = metadata.metadata().clone().unwrap_or_default();
        Ok(Self {
            path,
            mmap: Arc::new(mmap),
            data_start: 8 + header_len,
            infos,
            metadata,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// All tensor names.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.infos.keys().map(String::as_str)
    }

    /// The header's string metadata.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// A component config embedded in the header under `key`, if any.
    fn embedded_config<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<Option<T>> {
        self.metadata
            .get(key)
            .map(|json| {
                serde_json::from_str(json).map_err(|e| SdModelError::InvalidConfig {
                    origin: format!("{} (header `{key}`)", self.path.display()),
                    reason: e.to_string(),
                })
            })
            .transpose()
    }

    /// Whether the file holds `key`.
    pub fn contains(&self, key: &str) -> bool {
        self.infos.contains_key(key)
    }

    /// Shape of `key`.
    pub fn shape(&self, key: &str) -> Option<&[usize]> {
        self.infos.get(key).map(|i| i.shape.as_slice())
    }

    /// The dtype and raw little-endian bytes of `key`.
    pub fn raw(&self, key: &str) -> Option<(Dtype, &[u8])> {
        let info = self.infos.get(key)?;
        let (a, b) = (self.data_start + info.data_offsets.0, self.data_start + info.data_offsets.1);
        Some((info.dtype, &self.mmap[a..b]))
    }

    /// Shape of a source after slicing / squeezing, or `None` if the key is absent or the
    /// slice does not fit.
    pub(crate) fn source_shape(&self, src: &TensorSource) -> Option<Vec<usize>> {
        let mut shape = self.shape(&src.key)?.to_vec();
        if let Some((start, end)) = src.rows {
            if shape.is_empty() || end > shape[0] || start >= end {
                return None;
            }
            shape[0] = end - start;
        }
        if src.squeeze_1x1 && shape.len() == 4 && shape[2] == 1 && shape[3] == 1 {
            shape.truncate(2);
        }
        if src.transpose {
            if shape.len() != 2 {
                return None;
            }
            shape.reverse();
        }
        Some(shape)
    }

    /// The bytes of `src` (its rows taken, transposed) with their dtype and shape, or `None`
    /// if the key is absent or the slice does not fit.
    pub(crate) fn source_bytes(&self, src: &TensorSource) -> Option<(Dtype, std::borrow::Cow<'_, [u8]>, Vec<usize>)> {
        let shape = self.source_shape(src)?;
        let (dtype, mut bytes) = self.raw(&src.key)?;
        if let Some((r0, r1)) = src.rows {
            let row_bytes = bytes.len() / self.shape(&src.key)?.first().copied()?.max(1);
            bytes = &bytes[r0 * row_bytes..r1 * row_bytes];
        }
        let bytes = if src.transpose {
            std::borrow::Cow::Owned(transpose_bytes(bytes, shape[1], shape[0], dtype.bitsize() / 8))
        } else {
            std::borrow::Cow::Borrowed(bytes)
        };
        Some((dtype, bytes, shape))
    }

    /// A lazy reader for `src` (bytes are copied out of the map only when applied).
    fn reader(&self, src: &TensorSource, shape: Vec<usize>) -> Result<(DType, TensorReader)> {
        let info = self.infos.get(&src.key).ok_or_else(|| SdModelError::Layout {
            path: self.path.clone(),
            reason: format!("tensor `{}` is missing", src.key),
        })?;
        let dtype = match info.dtype {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::F64 => DType::F64,
            other => {
                return Err(SdModelError::UnsupportedDtype {
                    path: self.path.clone(),
                    key: src.key.clone(),
                    dtype: format!("{other:?}"),
                })
            }
        };
        let elem = info.dtype.bitsize() / 8;
        let (mut start, end) = (self.data_start + info.data_offsets.0, self.data_start + info.data_offsets.1);
        let mut len = end - start;
        if let Some((r0, r1)) = src.rows {
            let row_bytes = len / info.shape[0];
            start += r0 * row_bytes;
            len = (r1 - r0) * row_bytes;
        }
        debug_assert_eq!(len, shape.iter().product::<usize>() * elem);
        let mmap = Arc::clone(&self.mmap);
        let transpose = src.transpose;
        let read = move || {
            let bytes = &mmap[start..start + len];
            let bytes = if transpose { transpose_bytes(bytes, shape[1], shape[0], elem) } else { bytes.to_vec() };
            Ok(TensorData::from_bytes_vec(bytes, shape.clone(), dtype))
        };
        Ok((dtype, Rc::new(read)))
    }
}

/// The row-major `[rows, cols]` matrix of `elem`-byte values in `bytes`, transposed.
///
/// Every linear weight of a checkpoint passes through here (PyTorch stores `[out, in]`,
/// burn `[in, out]`), so the common widths get a copy of a known size per value (a call
/// to `memcpy` per 2-byte value made this most of a load's time) in square tiles, so that
/// both the rows read and the rows written stay in cache.
fn transpose_bytes(bytes: &[u8], rows: usize, cols: usize, elem: usize) -> Vec<u8> {
    match elem {
        2 => transpose_tiled::<2>(bytes, rows, cols),
        4 => transpose_tiled::<4>(bytes, rows, cols),
        8 => transpose_tiled::<8>(bytes, rows, cols),
        _ => {
            let mut out = vec![0u8; bytes.len()];
            for r in 0..rows {
                for c in 0..cols {
                    let from = (r * cols + c) * elem;
                    let to = (c * rows + r) * elem;
                    out[to..to + elem].copy_from_slice(&bytes[from..from + elem]);
                }
            }
            out
        }
    }
}

/// [`transpose_bytes`] for `N`-byte values.
fn transpose_tiled<const N: usize>(bytes: &[u8], rows: usize, cols: usize) -> Vec<u8> {
    const TILE: usize = 32;
    let mut out = vec![0u8; bytes.len()];
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for r in r0..(r0 + TILE).min(rows) {
                let row = &bytes[r * cols * N..(r + 1) * cols * N];
                for c in c0..(c0 + TILE).min(cols) {
                    let to = (c * rows + r) * N;
                    out[to..to + N].copy_from_slice(&row[c * N..c * N + N]);
                }
            }
        }
    }
    out
}

/// Converts PyTorch-layout tensors to burn's (transposed linear weights) and casts them to
/// the requested float type.
#[derive(Clone)]
struct LoadAdapter {
    dtype: DType,
}

impl ModuleAdapter for LoadAdapter {
    fn adapt(&self, snapshot: &TensorSnapshot) -> TensorSnapshot {
        let adapted = if is_linear_weight(snapshot) { transposed(snapshot) } else { PyTorchToBurnAdapter.adapt(snapshot) };
        if adapted.dtype == self.dtype {
            return adapted;
        }
        let data_fn = adapted.clone_data_fn();
        let target = self.dtype;
        TensorSnapshot::from_closure(
            Rc::new(move || data_fn().map(|d| d.convert_dtype(target))),
            target,
            adapted.shape.clone(),
            adapted.path_stack.clone().unwrap_or_default(),
            adapted.container_stack.clone().unwrap_or_default(),
            adapted.tensor_id.unwrap_or_default(),
        )
    }

    fn clone_box(&self) -> Box<dyn ModuleAdapter> {
        Box::new(self.clone())
    }
}

/// Whether `snapshot` is a linear layer's weight, which PyTorch stores `[out, in]` and burn
/// `[in, out]` (the one transposition `PyTorchToBurnAdapter` makes).
fn is_linear_weight(snapshot: &TensorSnapshot) -> bool {
    snapshot.shape.len() == 2
        && snapshot.module_type().as_deref() == Some("Struct:Linear")
        && snapshot.path_stack.as_ref().and_then(|p| p.last()).map(String::as_str) == Some("weight")
}

/// `snapshot` transposed when read, with [`transpose_bytes`]: burn-store's own
/// transposition copies one value at a time through `memcpy`, most of a load's time.
fn transposed(snapshot: &TensorSnapshot) -> TensorSnapshot {
    let read = snapshot.clone_data_fn();
    let (rows, cols) = (snapshot.shape[0], snapshot.shape[1]);
    TensorSnapshot::from_closure(
        Rc::new(move || {
            let data = read()?;
            let elem = data.dtype.size();
            let bytes = transpose_bytes(data.as_bytes(), rows, cols, elem);
            Ok(TensorData::from_bytes_vec(bytes, vec![cols, rows], data.dtype))
        }),
        snapshot.dtype,
        vec![cols, rows].into(),
        snapshot.path_stack.clone().unwrap_or_default(),
        snapshot.container_stack.clone().unwrap_or_default(),
        snapshot.tensor_id.unwrap_or_default(),
    )
}

/// Every parameter's path (burn-store's, enum variants left out), the type of the module
/// that holds it and its shape, read without initializing it.
///
/// burn-store's `collect` would take each value (`Param::val`), and a model built to be
/// loaded still holds lazily drawn random weights: collecting would draw all of them
/// (a second or more per 100 M parameters on a CPU, device memory on a GPU) only for the
/// file's values to replace them.
#[derive(Default)]
struct ParamLayout {
    path: Vec<String>,
    containers: Vec<String>,
    params: Vec<(String, Option<String>, Vec<usize>)>,
}

impl ParamLayout {
    fn push(&mut self, shape: burn::tensor::Shape) {
        // As burn-store's `TensorSnapshot::module_type`: the innermost struct or enum.
        let module_type = self.containers.iter().rev().find(|c| c.starts_with("Struct:") || c.starts_with("Enum:")).cloned();
        self.params.push((self.path.join("."), module_type, shape.to_vec()));
    }
}

impl<B: Backend> ModuleVisitor<B> for ParamLayout {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.containers.push(container_type.to_string());
        if !container_type.starts_with("Enum:") {
            self.path.push(name.to_string());
        }
    }

    fn exit_module(&mut self, _name: &str, container_type: &str) {
        self.containers.pop();
        if !container_type.starts_with("Enum:") {
            self.path.pop();
        }
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.push(param.lazy_shape());
    }

    fn visit_int<const D: usize>(&mut self, param: &Param<Tensor<B, D, Int>>) {
        self.push(param.lazy_shape());
    }

    fn visit_bool<const D: usize>(&mut self, param: &Param<Tensor<B, D, Bool>>) {
        self.push(param.lazy_shape());
    }
}

/// One parameter of the model: its burn path and its shape in PyTorch layout.
pub(crate) struct Expected {
    pub(crate) burn_path: String,
    pub(crate) file_shape: Vec<usize>,
}

/// The model's parameters keyed by their checkpoint (PyTorch) name.
///
/// Adapter-site wrappers hold their layer in a field named `base`, which checkpoints do not
/// have; norms call their parameters `gamma`/`beta` where PyTorch says `weight`/`bias`;
/// linear weights are stored transposed. Attached adapters are not checkpoint weights.
pub(crate) fn expected_params<B: Backend, M: Module<B>>(module: &M) -> BTreeMap<String, Expected> {
    let mut layout = ParamLayout::default();
    module.visit(&mut layout);
    layout
        .params
        .into_iter()
        .filter_map(|(burn_path, module_type, shape)| {
            let segments: Vec<&str> = burn_path.split('.').collect();
            if segments.contains(&"adapter") {
                return None;
            }
            let module_type = module_type.unwrap_or_default();
            let is_norm = matches!(module_type.as_str(), "Struct:LayerNorm" | "Struct:GroupNorm");
            let last = segments.len() - 1;
            let file_key: Vec<&str> = segments
                .iter()
                .enumerate()
                .filter(|(_, seg)| **seg != "base")
                .map(|(i, seg)| match (i == last && is_norm, *seg) {
                    (true, "gamma") => "weight",
                    (true, "beta") => "bias",
                    _ => seg,
                })
                .collect();
            let mut file_shape = shape;
            if module_type == "Struct:Linear" && segments[last] == "weight" && file_shape.len() == 2 {
                file_shape.reverse();
            }
            Some((file_key.join("."), Expected { burn_path, file_shape }))
        })
        .collect()
}

fn first_few(mut v: Vec<String>) -> (Vec<String>, usize) {
    v.sort();
    let n = v.len();
    v.truncate(SHOW);
    (v, n)
}

/// Applies `mapping` (checkpoint name → source tensor) to `module`, casting to `dtype`.
/// `unexpected` holds file keys already known to belong to this component but unmapped.
pub(crate) fn apply_mapping<B: Backend, M: ModuleSnapshot<B>>(
    module: &mut M,
    file: &WeightFile,
    mapping: Vec<(String, TensorSource)>,
    mut unexpected: Vec<String>,
    component: &str,
    dtype: DType,
) -> Result<()> {
    let expected = expected_params(module);
    // Parameter → the file key that gave it.
    let mut provided: HashMap<String, String> = HashMap::new();
    let mut mismatched = Vec::new();
    let mut snapshots = Vec::with_capacity(mapping.len());
    for (name, src) in mapping {
        let Some(exp) = expected.get(&name) else {
            unexpected.push(src.key.clone());
            continue;
        };
        let shape = file.source_shape(&src);
        if shape.as_deref() != Some(exp.file_shape.as_slice()) {
            mismatched.push(format!(
                "{}: file {:?} vs model {:?}",
                src.key,
                file.shape(&src.key).unwrap_or_default(),
                exp.file_shape
            ));
            continue;
        }
        // Two keys of one parameter (`…transformer.text_model.X` beside `…transformer.X`):
        // which one loaded would depend on the header's order, so the second is refused.
        if let Some(first) = provided.get(&name) {
            unexpected.push(format!("{} (a second key for `{name}`, beside {first})", src.key));
            continue;
        }
        let shape = shape.unwrap_or_default();
        let (file_dtype, read) = file.reader(&src, shape.clone())?;
        provided.insert(name, src.key.clone());
        let path_stack = exp.burn_path.split('.').map(String::from).collect();
        snapshots.push(TensorSnapshot::from_closure(
            read,
            file_dtype,
            shape.into(),
            path_stack,
            vec![],
            ParamId::new(),
        ));
    }
    let missing: Vec<String> = expected.keys().filter(|k| !provided.contains_key(*k)).cloned().collect();
    if !missing.is_empty() || !unexpected.is_empty() || !mismatched.is_empty() {
        return Err(SdModelError::KeyMismatch(Box::new(KeyMismatch {
            path: file.path.clone(),
            component: component.into(),
            missing: first_few(missing),
            unexpected: first_few(unexpected),
            mismatched: first_few(mismatched),
        })));
    }
    // Enum variants (`Projection::Conv` / `Linear`) are not part of checkpoint paths.
    let result = module.apply(snapshots, None, Some(Box::new(LoadAdapter { dtype })), true);
    if !result.errors.is_empty() {
        return Err(SdModelError::KeyMismatch(Box::new(KeyMismatch {
            path: file.path.clone(),
            component: component.into(),
            missing: (vec![], 0),
            unexpected: (vec![], 0),
            mismatched: first_few(result.errors.iter().map(|e| e.to_string()).collect()),
        })));
    }
    Ok(())
}

/// A Stable Diffusion model family ([`ModelSource::family`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelFamily {
    /// SD 1.x (OpenAI CLIP ViT-L).
    Sd1,
    /// SD 2.x (OpenCLIP ViT-H).
    Sd2,
    /// SDXL (both encoders, the added conditioning).
    Sdxl,
}

impl ModelFamily {
    /// `SD1.x`, `SD2.x` or `SDXL`.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sd1 => "SD1.x",
            Self::Sd2 => "SD2.x",
            Self::Sdxl => "SDXL",
        }
    }
}

/// Where a Stable Diffusion model comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A diffusers folder (`model_index.json` and one folder per component).
    Diffusers(PathBuf),
    /// One `.safetensors` file in the original (LDM) layout.
    SingleFile(PathBuf),
}

/// Precision and variant choices for loading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadOptions {
    /// Float type of the loaded parameters (converted from whatever the file holds).
    pub dtype: DType,
    /// Prefer `*.fp16.safetensors` files in a diffusers folder when both exist.
    pub prefer_fp16_files: bool,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            dtype: DType::F32,
            prefer_fp16_files: false,
        }
    }
}

impl ModelSource {
    /// A folder is a diffusers model, a file a single-file checkpoint.
    pub fn detect(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|source| SdModelError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if meta.is_dir() {
            let has_component = ["text_encoder", "vae", "unet"].iter().any(|c| path.join(c).is_dir());
            if !path.join("model_index.json").is_file() && !has_component {
                return Err(SdModelError::Layout {
                    path: path.to_path_buf(),
                    reason: "not a diffusers model folder: no model_index.json and no text_encoder/, vae/ or unet/ folder".into(),
                });
            }
            Ok(Self::Diffusers(path.to_path_buf()))
        } else {
            Ok(Self::SingleFile(path.to_path_buf()))
        }
    }

    /// The weights file the loaders read for a diffusers folder's `component` (`unet`,
    /// `text_encoder`, `text_encoder_2`, `vae`): `{stem}.safetensors`, else its
    /// `.fp16.safetensors` variant.
    pub fn weights_file(dir: &Path, component: &str) -> Result<PathBuf> {
        let stem = if component.starts_with("text_encoder") { "model" } else { "diffusion_pytorch_model" };
        Self::component_file(dir, component, stem, &LoadOptions::default())
    }

    /// Checks that the components' configs fit together (from configs and headers alone,
    /// before any weight loads): RGB images in and out of the VAE, a UNet that takes and
    /// predicts the VAE's latent channels, cross-attention as wide as the text encoders'
    /// states (SDXL: both joined) and text encoders that read a 77-token row. A component
    /// that cannot be read is left to its loader's error. An error names the component's
    /// config file (a folder) or the checkpoint (a single file).
    ///
    /// ```no_run
    /// use sd_model::load::ModelSource;
    /// ModelSource::detect("models/sd15")?.check_components()?;
    /// # Ok::<(), sd_model::SdModelError>(())
    /// ```
    pub fn check_components(&self) -> Result<()> {
        let (Ok(unet), Ok(vae), Ok(te)) = (self.unet_config(), self.vae_config(), self.text_encoder_config()) else {
            return Ok(());
        };
        let te2 = self.text_encoder_2_config().ok().flatten();
        let at = |component: &str| match self {
            Self::Diffusers(dir) => dir.join(component).join("config.json").display().to_string(),
            Self::SingleFile(path) => path.display().to_string(),
        };
        let bad = |component: &str, reason: String| Err(SdModelError::BadInput { what: at(component), reason });
        if vae.in_channels != 3 || vae.out_channels != 3 {
            return bad("vae", format!("in_channels = {} and out_channels = {}: the VAE encodes and decodes RGB images (3 channels)", vae.in_channels, vae.out_channels));
        }
        let latent = vae.latent_channels;
        if unet.out_channels != latent {
            return bad("unet", format!("out_channels = {} but the VAE's latent_channels = {latent}: the UNet must predict the latents' channels", unet.out_channels));
        }
        if unet.in_channels != latent {
            return bad("unet", format!("in_channels = {} but the VAE's latent_channels = {latent} (inpainting UNets, which also take the mask and masked image, are not supported)", unet.in_channels));
        }
        let context = te.hidden_size + te2.as_ref().map_or(0, |c| c.hidden_size);
        if unet.cross_attention_dim != context {
            let encoders = match &te2 {
                Some(c) => format!("the text encoders' hidden sizes {} + {} = {context}", te.hidden_size, c.hidden_size),
                None => format!("the text encoder's hidden_size = {context}"),
            };
            return bad("unet", format!("cross_attention_dim = {} but {encoders}: the UNet attends to their states", unet.cross_attention_dim));
        }
        for (component, config) in [("text_encoder", Some(&te)), ("text_encoder_2", te2.as_ref())] {
            if let Some(c) = config.filter(|c| c.max_position_embeddings < crate::tokenizer::DEFAULT_MAX_LENGTH) {
                return bad(component, format!("max_position_embeddings = {}: the prompts' rows are {} tokens", c.max_position_embeddings, crate::tokenizer::DEFAULT_MAX_LENGTH));
            }
        }
        Ok(())
    }

    /// The model family, from configs and headers alone: SDXL where there is a second
    /// text encoder, SD2.x where the text encoder is OpenCLIP's (1024 wide, or exact GELU
    /// where OpenAI's CLIP has quick GELU), else SD1.x.
    pub fn family(&self) -> Result<ModelFamily> {
        // Both configs are read, so an unsupported relative (an SDXL refiner) is refused.
        let second = self.text_encoder_2_config()?;
        let te = self.text_encoder_config()?;
        Ok(if second.is_some() {
            ModelFamily::Sdxl
        } else if te.hidden_size == 1024 || te.hidden_act == HiddenAct::Gelu {
            ModelFamily::Sd2
        } else {
            ModelFamily::Sd1
        })
    }

    /// The weights file of a diffusers component folder (`text_encoder`, `vae`, `unet`).
    fn component_file(dir: &Path, component: &str, stem: &str, options: &LoadOptions) -> Result<PathBuf> {
        let folder = dir.join(component);
        let full = folder.join(format!("{stem}.safetensors"));
        let half = folder.join(format!("{stem}.fp16.safetensors"));
        let order = if options.prefer_fp16_files { [half, full] } else { [full, half] };
        order
            .into_iter()
            .find(|p| p.is_file())
            .ok_or_else(|| SdModelError::Layout {
                path: folder.clone(),
                reason: format!("expected {stem}.safetensors or {stem}.fp16.safetensors"),
            })
    }

    /// The text encoder config: the folder's `text_encoder/config.json`, or inferred from a
    /// single file's tensor shapes (SD1 OpenAI CLIP or SD2 OpenCLIP).
    pub fn text_encoder_config(&self) -> Result<ClipTextConfig> {
        match self {
            Self::Diffusers(dir) if !dir.join("text_encoder").is_dir() && dir.join("text_encoder_2").is_dir() => Err(SdModelError::Layout {
                path: dir.clone(),
                reason: "text_encoder_2/ without text_encoder/: an SDXL refiner (aesthetic-score conditioning, one OpenCLIP encoder) is not supported".into(),
            }),
            Self::Diffusers(dir) => read_clip_config(&dir.join("text_encoder/config.json")),
            Self::SingleFile(path) => infer_clip_config(&WeightFile::open(path)?),
        }
    }

    /// The second text encoder's config (SDXL), or `None` for a model with one encoder: the
    /// folder's `text_encoder_2/config.json`, or embedded in / inferred from a single file
    /// (`conditioner.embedders.1.model.*`, OpenCLIP).
    pub fn text_encoder_2_config(&self) -> Result<Option<ClipTextConfig>> {
        match self {
            Self::Diffusers(dir) => {
                let path = dir.join("text_encoder_2/config.json");
                if path.is_file() {
                    Ok(Some(read_clip_config(&path)?))
                } else {
                    Ok(None)
                }
            }
            Self::SingleFile(path) => infer_clip_2_config(&WeightFile::open(path)?),
        }
    }

    /// The VAE config: the folder's `vae/config.json`, or inferred from a single file.
    pub fn vae_config(&self) -> Result<VaeConfig> {
        match self {
            Self::Diffusers(dir) => read_vae_config(&dir.join("vae/config.json")),
            Self::SingleFile(path) => infer_vae_config(&WeightFile::open(path)?),
        }
    }

    /// The UNet config: the folder's `unet/config.json`, or inferred from a single file.
    pub fn unet_config(&self) -> Result<UnetConfig> {
        match self {
            Self::Diffusers(dir) => read_unet_config(&dir.join("unet/config.json")),
            Self::SingleFile(path) => infer_unet_config(&WeightFile::open(path)?),
        }
    }

    /// The stored dtypes of the UNet's and the text encoders' float weights, in the files
    /// `options` would load them from (a single file's VAE keys left out), read from the
    /// headers alone: e.g. all `F16` means loading in f16 loses nothing.
    pub fn unet_and_text_encoder_dtypes(&self, options: &LoadOptions) -> Result<Vec<DType>> {
        let mut dtypes = Vec::new();
        let mut add = |file: &WeightFile, keep: &dyn Fn(&str) -> bool| {
            for key in file.keys().filter(|k| keep(k)) {
                let dtype = match file.infos.get(key).map(|i| i.dtype) {
                    Some(Dtype::F64) => DType::F64,
                    Some(Dtype::F32) => DType::F32,
                    Some(Dtype::F16) => DType::F16,
                    Some(Dtype::BF16) => DType::BF16,
                    _ => continue,
                };
                if !dtypes.contains(&dtype) {
                    dtypes.push(dtype);
                }
            }
        };
        match self {
            Self::Diffusers(dir) => {
                for (component, stem) in [("unet", "diffusion_pytorch_model"), ("text_encoder", "model"), ("text_encoder_2", "model")] {
                    if component == "text_encoder_2" && !dir.join(component).is_dir() {
                        continue;
                    }
                    add(&WeightFile::open(Self::component_file(dir, component, stem, options)?)?, &|_| true);
                }
            }
            Self::SingleFile(path) => {
                let prefixes = [keymap::LDM_UNET_PREFIX, "cond_stage_model.", "conditioner.embedders."];
                add(&WeightFile::open(path)?, &|k| prefixes.iter().any(|p| k.starts_with(p)));
            }
        }
        Ok(dtypes)
    }

    /// Builds the UNet from its config and loads its weights.
    pub fn load_unet<B: Backend>(&self, device: &B::Device, options: &LoadOptions) -> Result<UNet2DConditionModel<B>> {
        let config = self.unet_config()?;
        let mut model = build_for_loading(|| UNet2DConditionModel::new(&config, device))?;
        match self {
            Self::Diffusers(dir) => {
                let file = WeightFile::open(Self::component_file(dir, "unet", "diffusion_pytorch_model", options)?)?;
                load_unet_diffusers(&mut model, &file, options.dtype)?;
            }
            Self::SingleFile(path) => load_unet_single_file(&mut model, &WeightFile::open(path)?, options.dtype)?,
        }
        Ok(model)
    }

    /// Builds the text encoder from its config and loads its weights.
    pub fn load_text_encoder<B: Backend>(&self, device: &B::Device, options: &LoadOptions) -> Result<ClipTextModel<B>> {
        let config = self.text_encoder_config()?;
        let mut model = build_for_loading(|| ClipTextModel::new(&config, device))?.with_component(lora_core::Component::TextEncoder);
        match self {
            Self::Diffusers(dir) => {
                let file = WeightFile::open(Self::component_file(dir, "text_encoder", "model", options)?)?;
                load_text_encoder_diffusers(&mut model, &file, options.dtype)?;
            }
            Self::SingleFile(path) => {
                load_text_encoder_single_file(&mut model, &WeightFile::open(path)?, options.dtype)?;
            }
        }
        Ok(model)
    }

    /// Builds the second text encoder (SDXL's) from its config and loads its weights, or
    /// `None` for a model with one encoder.
    pub fn load_text_encoder_2<B: Backend>(&self, device: &B::Device, options: &LoadOptions) -> Result<Option<ClipTextModel<B>>> {
        let Some(config) = self.text_encoder_2_config()? else {
            return Ok(None);
        };
        let mut model = build_for_loading(|| ClipTextModel::new(&config, device))?.with_component(lora_core::Component::TextEncoder2);
        match self {
            Self::Diffusers(dir) => {
                let file = WeightFile::open(Self::component_file(dir, "text_encoder_2", "model", options)?)?;
                apply_mapping(&mut model, &file, identity_mapping(&file), vec![], "text_encoder_2", options.dtype)?;
            }
            Self::SingleFile(path) => load_text_encoder_2_single_file(&mut model, &WeightFile::open(path)?, options.dtype)?,
        }
        Ok(Some(model))
    }

    /// Builds the VAE from its config and loads its weights.
    pub fn load_vae<B: Backend>(&self, device: &B::Device, options: &LoadOptions) -> Result<AutoencoderKl<B>> {
        let config = self.vae_config()?;
        let mut model = build_for_loading(|| AutoencoderKl::new(&config, device))?;
        match self {
            Self::Diffusers(dir) => {
                let file = WeightFile::open(Self::component_file(dir, "vae", "diffusion_pytorch_model", options)?)?;
                load_vae_diffusers(&mut model, &file, options.dtype)?;
            }
            Self::SingleFile(path) => load_vae_single_file(&mut model, &WeightFile::open(path)?, options.dtype)?,
        }
        Ok(model)
    }
}

/// Every key of a diffusers-layout file as our path (its buffers left out).
pub(crate) fn identity_mapping(file: &WeightFile) -> Vec<(String, TensorSource)> {
    file.keys()
        .filter(|k| !keymap::is_ignored_diffusers_key(k))
        .map(|k| (k.to_string(), TensorSource::plain(k)))
        .collect()
}

/// Loads a diffusers-layout text encoder file (`text_encoder/model.safetensors`).
pub fn load_text_encoder_diffusers<B: Backend>(model: &mut ClipTextModel<B>, file: &WeightFile, dtype: DType) -> Result<()> {
    apply_mapping(model, file, identity_mapping(file), vec![], "text_encoder", dtype)
}

/// Loads a diffusers-layout VAE file (`vae/diffusion_pytorch_model.safetensors`), its
/// attention under diffusers' current names or the older ones ([`vae_diffusers_mapping`]).
pub fn load_vae_diffusers<B: Backend>(model: &mut AutoencoderKl<B>, file: &WeightFile, dtype: DType) -> Result<()> {
    apply_mapping(model, file, vae_diffusers_mapping(file), vec![], "vae", dtype)
}

/// A diffusers-layout VAE file's keys as our paths (the same names), with the
/// attention's names from before diffusers 0.14 (`query`, `key`, `value`, `proj_attn`,
/// which many VAEs on the Hub still hold, e.g. separately published fine-tuned VAEs)
/// renamed `to_q`, `to_k`, `to_v`, `to_out.0`, as diffusers renames them on load.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("vae.safetensors");
/// let bytes = vec![0u8; 4];
/// let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &bytes)?;
/// safetensors::serialize_to_file([("decoder.mid_block.attentions.0.proj_attn.bias", view)], None, &path)?;
/// let file = sd_model::load::WeightFile::open(&path)?;
/// let mapping = sd_model::load::vae_diffusers_mapping(&file);
/// assert_eq!(mapping[0].0, "decoder.mid_block.attentions.0.to_out.0.bias");
/// # Ok(())
/// # }
/// ```
pub fn vae_diffusers_mapping(file: &WeightFile) -> Vec<(String, TensorSource)> {
    identity_mapping(file).into_iter().map(|(path, source)| (legacy_vae_attention(&path).unwrap_or(path), source)).collect()
}

/// The current name of a VAE attention tensor under its pre-0.14 diffusers name.
fn legacy_vae_attention(path: &str) -> Option<String> {
    let (module, param) = path.rsplit_once('.')?;
    let (block, name) = module.rsplit_once('.')?;
    if !block.contains(".attentions.") {
        return None;
    }
    let renamed = match name {
        "query" => "to_q",
        "key" => "to_k",
        "value" => "to_v",
        "proj_attn" => "to_out.0",
        _ => return None,
    };
    Some(format!("{block}.{renamed}.{param}"))
}

/// Loads a diffusers-layout UNet file (`unet/diffusion_pytorch_model.safetensors`).
pub fn load_unet_diffusers<B: Backend>(model: &mut UNet2DConditionModel<B>, file: &WeightFile, dtype: DType) -> Result<()> {
    apply_mapping(model, file, identity_mapping(file), vec![], "unet", dtype)
}

/// Loads the UNet from a single-file checkpoint (`model.diffusion_model.*`).
pub fn load_unet_single_file<B: Backend>(model: &mut UNet2DConditionModel<B>, file: &WeightFile, dtype: DType) -> Result<()> {
    let (mapping, unexpected) = unet_single_file_mapping(model, file);
    apply_mapping(model, file, mapping, unexpected, "unet", dtype)
}

/// A checkpoint path of ours and where its tensor lives in a file.
pub type Mapping = Vec<(String, TensorSource)>;

/// The UNet keys of a single file mapped to our paths, and the UNet keys that map nowhere.
pub fn unet_single_file_mapping<B: Backend>(model: &UNet2DConditionModel<B>, file: &WeightFile) -> (Mapping, Vec<String>) {
    unet_single_file_keys(&keymap::UnetLayout::of(model), file)
}

/// [`unet_single_file_mapping`] for a UNet of `layout`, without the model.
pub fn unet_single_file_keys(layout: &keymap::UnetLayout, file: &WeightFile) -> (Mapping, Vec<String>) {
    let mut mapping = Vec::new();
    let mut unexpected = Vec::new();
    for key in file.keys().filter(|k| k.starts_with(keymap::LDM_UNET_PREFIX)) {
        match layout.ldm_key(key) {
            Some(path) => mapping.push((path, TensorSource::plain(key))),
            None => unexpected.push(key.to_string()),
        }
    }
    (mapping, unexpected)
}

/// Loads the text encoder from a single-file checkpoint (SD1 or SD2 key layout).
pub fn load_text_encoder_single_file<B: Backend>(model: &mut ClipTextModel<B>, file: &WeightFile, dtype: DType) -> Result<()> {
    let (mapping, unexpected) = text_encoder_single_file_mapping(model, file);
    apply_mapping(model, file, mapping, unexpected, "text_encoder", dtype)
}

/// The text-encoder keys of a single file (SD1, SD2 or SDXL's first encoder) mapped to our
/// paths, and the text-encoder keys that map nowhere.
pub fn text_encoder_single_file_mapping<B: Backend>(model: &ClipTextModel<B>, file: &WeightFile) -> (Mapping, Vec<String>) {
    text_encoder_single_file_keys(file, model.text_model.embeddings.token_embedding.weight.dims()[1], model.num_layers())
}

/// [`text_encoder_single_file_mapping`] for an encoder `width` wide with `layers` layers
/// (an SD2 file's OpenCLIP layers past them are left out), without the model.
pub fn text_encoder_single_file_keys(file: &WeightFile, width: usize, layers: usize) -> (Mapping, Vec<String>) {
    let mut mapping = Vec::new();
    let mut unexpected = Vec::new();
    for key in file.keys().filter(|k| k.starts_with("conditioner.embedders.0.")) {
        match keymap::sdxl_text_key(key) {
            Some(path) if !keymap::is_ignored_single_file_key(key) => mapping.push((path, TensorSource::plain(key))),
            Some(_) => {}
            None => unexpected.push(key.to_string()),
        }
    }
    for key in file.keys().filter(|k| k.starts_with("cond_stage_model.")) {
        if keymap::is_ignored_single_file_key(key) {
            continue;
        }
        if key.starts_with("cond_stage_model.model.") {
            match keymap::open_clip_key(key, width, layers) {
                Some(pairs) => mapping.extend(pairs),
                None => unexpected.push(key.to_string()),
            }
        } else if let Some(path) = keymap::sd1_text_key(key) {
            mapping.push((path, TensorSource::plain(key)));
        } else {
            unexpected.push(key.to_string());
        }
    }
    (mapping, unexpected)
}

/// Loads SDXL's second text encoder from a single-file checkpoint
/// (`conditioner.embedders.1.model.*`, OpenCLIP layout).
pub fn load_text_encoder_2_single_file<B: Backend>(model: &mut ClipTextModel<B>, file: &WeightFile, dtype: DType) -> Result<()> {
    let (mapping, unexpected) = text_encoder_2_single_file_mapping(model, file);
    apply_mapping(model, file, mapping, unexpected, "text_encoder_2", dtype)
}

/// The keys of SDXL's second text encoder in a single file mapped to our paths, and its
/// keys that map nowhere. Every layer is kept (SDXL reads the penultimate one itself).
pub fn text_encoder_2_single_file_mapping<B: Backend>(model: &ClipTextModel<B>, file: &WeightFile) -> (Mapping, Vec<String>) {
    text_encoder_2_single_file_keys(file, model.text_model.embeddings.token_embedding.weight.dims()[1], model.num_layers())
}

/// [`text_encoder_2_single_file_mapping`] for an encoder `width` wide with `layers` layers,
/// without the model.
pub fn text_encoder_2_single_file_keys(file: &WeightFile, width: usize, layers: usize) -> (Mapping, Vec<String>) {
    let mut mapping = Vec::new();
    let mut unexpected = Vec::new();
    for key in file.keys().filter(|k| k.starts_with("conditioner.embedders.1.")) {
        if keymap::is_ignored_single_file_key(key) {
            continue;
        }
        match keymap::open_clip_key_at(keymap::SDXL_TEXT_2_PREFIX, key, width, layers) {
            Some(pairs) if !pairs.is_empty() => mapping.extend(pairs),
            _ => unexpected.push(key.to_string()),
        }
    }
    (mapping, unexpected)
}

/// Loads the VAE from a single-file checkpoint (`first_stage_model.*`).
pub fn load_vae_single_file<B: Backend>(model: &mut AutoencoderKl<B>, file: &WeightFile, dtype: DType) -> Result<()> {
    let (mapping, unexpected) = vae_ldm_keys(file, "first_stage_model.", model.encoder.down_blocks.len());
    apply_mapping(model, file, mapping, unexpected, "vae", dtype)
}

/// Loads the VAE from a file of its own in the original (LDM) layout, keys without the
/// checkpoint's `first_stage_model.` prefix (`encoder.down.0.block.0.conv1.weight`, as
/// `vae-ft-mse-840000-ema-pruned.safetensors` has them).
pub fn load_vae_ldm_file<B: Backend>(model: &mut AutoencoderKl<B>, file: &WeightFile, dtype: DType) -> Result<()> {
    let (mapping, unexpected) = vae_ldm_keys(file, "", model.encoder.down_blocks.len());
    apply_mapping(model, file, mapping, unexpected, "vae", dtype)
}

/// The original-layout VAE keys under `prefix` (`first_stage_model.` in a checkpoint, none
/// in a VAE file of its own) mapped to our paths for a VAE of `levels` resolution levels,
/// and the keys under `prefix` that map nowhere.
pub fn vae_ldm_keys(file: &WeightFile, prefix: &str, levels: usize) -> (Mapping, Vec<String>) {
    let mut mapping = Vec::new();
    let mut unexpected = Vec::new();
    for key in file.keys() {
        let Some(rest) = key.strip_prefix(prefix) else { continue };
        match keymap::ldm_vae_path(rest, levels) {
            Some((path, squeeze_1x1)) => mapping.push((path, TensorSource { key: key.to_string(), rows: None, squeeze_1x1, transpose: false })),
            None => unexpected.push(key.to_string()),
        }
    }
    (mapping, unexpected)
}

/// Opens a VAE distributed apart from its model: a `.safetensors` file, a diffusers VAE
/// folder (`diffusion_pytorch_model.safetensors`, or its `.fp16` sibling) or a diffusers
/// model folder (its `vae/`).
pub fn open_vae_file(path: &Path, options: &LoadOptions) -> Result<WeightFile> {
    let meta = std::fs::metadata(path).map_err(|source| SdModelError::Io { path: path.to_path_buf(), source })?;
    if !meta.is_dir() {
        return WeightFile::open(path);
    }
    let folder = if path.join("vae").is_dir() { path.join("vae") } else { path.to_path_buf() };
    let (full, half) = (folder.join("diffusion_pytorch_model.safetensors"), folder.join("diffusion_pytorch_model.fp16.safetensors"));
    let order = if options.prefer_fp16_files { [half, full] } else { [full, half] };
    let Some(found) = order.into_iter().find(|p| p.is_file()) else {
        return Err(SdModelError::Layout {
            path: folder,
            reason: "not a VAE folder: expected diffusion_pytorch_model.safetensors or diffusion_pytorch_model.fp16.safetensors (or a model folder with vae/)".into(),
        });
    };
    WeightFile::open(found)
}

/// A VAE file's keys mapped to our (diffusers) paths for a VAE of `levels` resolution
/// levels, whichever layout it has: diffusers' names (`encoder.down_blocks.…`), the original
/// (`encoder.down.…`) or a whole checkpoint's (`first_stage_model.…`); with the keys that map
/// nowhere. A file with none of them is an error naming it.
pub fn vae_file_mapping(file: &WeightFile, levels: usize) -> Result<(Mapping, Vec<String>)> {
    if file.keys().any(|k| k.starts_with("first_stage_model.")) {
        Ok(vae_ldm_keys(file, "first_stage_model.", levels))
    } else if file.keys().any(|k| k.starts_with("encoder.down_blocks.") || k.starts_with("decoder.up_blocks.")) {
        Ok((vae_diffusers_mapping(file), vec![]))
    } else if file.keys().any(|k| k.starts_with("encoder.down.") || k.starts_with("decoder.up.")) {
        Ok(vae_ldm_keys(file, "", levels))
    } else {
        Err(layout_error(file, "no VAE found (expected diffusers' `encoder.down_blocks.*`, the original `encoder.down.*`, or a checkpoint's `first_stage_model.*`)"))
    }
}

/// Loads a VAE distributed apart from its model (kohya's `--vae`) into `model`, which the
/// base model's VAE config built (the latent scale stays the base model's): a diffusers
/// VAE folder (`diffusion_pytorch_model.safetensors`, or its `.fp16` sibling), a diffusers
/// model folder (its `vae/`), or one `.safetensors` file holding the VAE under diffusers'
/// names (`encoder.down_blocks.…`), in the original layout (`encoder.down.…`), or as a
/// whole checkpoint's (`first_stage_model.…`). Errors name the path and what is missing,
/// unexpected or of another shape.
pub fn load_vae_from<B: Backend>(model: &mut AutoencoderKl<B>, path: &Path, options: &LoadOptions) -> Result<()> {
    let file = open_vae_file(path, options)?;
    let (mapping, unexpected) = vae_file_mapping(&file, model.encoder.down_blocks.len())?;
    apply_mapping(model, &file, mapping, unexpected, "vae", options.dtype)
}

/// Refuses the SDXL-shaped checkpoints that need an EDM schedule, which the samplers and
/// the trainer here do not run: Playground v2.5 (`edm_mean` / `edm_std`, with its own latent
/// statistics) and CosXL-style EDM v-prediction (`edm_vpred.sigma_max`), marked as ComfyUI
/// detects them. Read as SDXL they load without a word and give noise.
fn refuse_edm(file: &WeightFile) -> Result<()> {
    if file.contains("edm_mean") && file.contains("edm_std") {
        return Err(layout_error(file, "a Playground v2.5 checkpoint (`edm_mean` / `edm_std`: an EDM schedule with its own latent scale) is not supported"));
    }
    if file.contains("edm_vpred.sigma_max") {
        return Err(layout_error(file, "an EDM v-prediction checkpoint (`edm_vpred.sigma_max`, e.g. CosXL) is not supported"));
    }
    Ok(())
}

fn layout_error(file: &WeightFile, reason: &str) -> SdModelError {
    SdModelError::Layout {
        path: file.path.clone(),
        reason: reason.into(),
    }
}

/// Dimension `i` of a shape, 0 when it has none (the config checks then refuse it).
fn dim_at(shape: &[usize], i: usize) -> usize {
    shape.get(i).copied().unwrap_or(0)
}

/// The shape of `key`, which must be present with `D` dimensions.
fn dims<const D: usize>(file: &WeightFile, key: &str) -> Result<[usize; D]> {
    match file.shape(key) {
        Some(s) => s.try_into().map_err(|_| layout_error(file, &format!("`{key}` has shape {s:?}, expected {D} dimensions"))),
        None => Err(layout_error(file, &format!("`{key}` is missing"))),
    }
}

/// Largest block index a checkpoint's keys may hold (`input_blocks.N`, `layers.N`, ...):
/// far above any Stable Diffusion model's (SDXL's text encoder 2 has 32 layers), so a
/// broken or hostile key fails here instead of driving the config inference's loops.
const MAX_BLOCK_INDEX: usize = 4096;

/// Counts `prefix{N}.` indices present in the file; an index past [`MAX_BLOCK_INDEX`] is
/// an error naming its key.
fn count_indexed(file: &WeightFile, prefix: &str) -> Result<usize> {
    let mut count = 0;
    for key in file.keys() {
        let Some(n) = key.strip_prefix(prefix).and_then(|r| r.split('.').next()).and_then(|n| n.parse::<usize>().ok()) else { continue };
        if n > MAX_BLOCK_INDEX {
            return Err(layout_error(file, &format!("`{key}` has block index {n}, expected at most {MAX_BLOCK_INDEX}")));
        }
        count = count.max(n + 1);
    }
    Ok(count)
}

/// Header key under which a single file may embed its text encoder config (JSON, the
/// transformers `config.json` fields). Files written by this project do; downloaded
/// checkpoints do not, and their config is inferred from tensor shapes.
pub const TEXT_ENCODER_CONFIG_KEY: &str = "sd_model:text_encoder_config";
/// SDXL's latent scale (`scaling_factor` of its VAE config; SD1.x / SD2.x use 0.18215).
pub const SDXL_VAE_SCALING_FACTOR: f64 = 0.13025;

/// Header key for an embedded VAE config (diffusers `config.json` fields).
pub const VAE_CONFIG_KEY: &str = "sd_model:vae_config";

/// The text encoder config of a single file: embedded in its header, else SD1 (OpenAI CLIP
/// ViT-L) or SD2 (OpenCLIP ViT-H) inferred from tensor shapes (64-wide heads).
pub fn infer_clip_config(file: &WeightFile) -> Result<ClipTextConfig> {
    if let Some(config) = file.embedded_config::<ClipTextConfig>(TEXT_ENCODER_CONFIG_KEY)? {
        config.validate(&file.path.display().to_string())?;
        return Ok(config);
    }
    if let Some(shape) = file.shape("cond_stage_model.model.token_embedding.weight") {
        let hidden = dim_at(shape, 1);
        let total = count_indexed(file, "cond_stage_model.model.transformer.resblocks.")?;
        let inter = file
            .shape("cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.weight")
            .map_or(hidden * 4, |s| dim_at(s, 0));
        let config = ClipTextConfig {
            vocab_size: dim_at(shape, 0),
            hidden_size: hidden,
            intermediate_size: inter,
            // SD2 conditions on the penultimate OpenCLIP layer: diffusers keeps 23 of 24.
            // A complete tower (with its `text_projection`, as Stability ships it and our
            // writer pads it) holds that unused last block; diffusers' own export script
            // writes the 23 used ones and no projection.
            num_hidden_layers: match file.contains("cond_stage_model.model.text_projection") || total >= 24 {
                true => total.saturating_sub(1).max(1),
                false => total,
            },
            num_attention_heads: hidden / 64,
            max_position_embeddings: file.shape("cond_stage_model.model.positional_embedding").map_or(77, |s| dim_at(s, 0)),
            hidden_act: HiddenAct::Gelu,
            layer_norm_eps: 1e-5,
            architectures: vec![],
            projection_dim: None,
        };
        // Shapes a damaged or unusual file gives may not make a model: the error names the file.
        config.validate(&file.path.display().to_string())?;
        return Ok(config);
    }
    let prefix = [
        "cond_stage_model.transformer.text_model.",
        "cond_stage_model.transformer.",
        "conditioner.embedders.0.transformer.text_model.",
        "conditioner.embedders.0.transformer.",
    ]
    .into_iter()
    .find(|p| file.contains(&format!("{p}embeddings.token_embedding.weight")))
    .ok_or_else(|| {
        layout_error(
            file,
            "no text encoder found (expected cond_stage_model.transformer.*, cond_stage_model.model.* or conditioner.embedders.0.transformer.*)",
        )
    })?;
    let emb = file.shape(&format!("{prefix}embeddings.token_embedding.weight")).unwrap_or(&[49408, 768]);
    let hidden = dim_at(emb, 1);
    let config = ClipTextConfig {
        vocab_size: dim_at(emb, 0),
        hidden_size: hidden,
        intermediate_size: file
            .shape(&format!("{prefix}encoder.layers.0.mlp.fc1.weight"))
            .map_or(hidden * 4, |s| dim_at(s, 0)),
        num_hidden_layers: count_indexed(file, &format!("{prefix}encoder.layers."))?,
        num_attention_heads: hidden / 64,
        max_position_embeddings: file
            .shape(&format!("{prefix}embeddings.position_embedding.weight"))
            .map_or(77, |s| dim_at(s, 0)),
        hidden_act: HiddenAct::QuickGelu,
        layer_norm_eps: 1e-5,
        architectures: vec![],
        projection_dim: None,
    };
    config.validate(&file.path.display().to_string())?;
    Ok(config)
}

/// Header key for an embedded config of SDXL's second text encoder.
pub const TEXT_ENCODER_2_CONFIG_KEY: &str = "sd_model:text_encoder_2_config";

/// The config of SDXL's second text encoder in a single file: embedded in its header, else
/// OpenCLIP (bigG for SDXL) inferred from tensor shapes under `conditioner.embedders.1.model.`
/// with all its layers and the projection; `None` when the file has no second encoder.
pub fn infer_clip_2_config(file: &WeightFile) -> Result<Option<ClipTextConfig>> {
    if let Some(config) = file.embedded_config::<ClipTextConfig>(TEXT_ENCODER_2_CONFIG_KEY)? {
        config.validate(&file.path.display().to_string())?;
        return Ok(Some(config));
    }
    if file.keys().any(|k| k.starts_with("conditioner.embedders.0.model.")) {
        return Err(layout_error(file, "an SDXL refiner (aesthetic-score conditioning, one OpenCLIP encoder) is not supported"));
    }
    let p = keymap::SDXL_TEXT_2_PREFIX;
    let token_embedding = format!("{p}token_embedding.weight");
    if !file.contains(&token_embedding) {
        return Ok(None);
    }
    let [vocab_size, hidden] = dims(file, &token_embedding)?;
    let config = ClipTextConfig {
        vocab_size,
        hidden_size: hidden,
        intermediate_size: dims::<2>(file, &format!("{p}transformer.resblocks.0.mlp.c_fc.weight"))?[0],
        num_hidden_layers: count_indexed(file, &format!("{p}transformer.resblocks."))?,
        num_attention_heads: hidden / 64,
        max_position_embeddings: dims::<2>(file, &format!("{p}positional_embedding"))?[0],
        hidden_act: HiddenAct::Gelu,
        layer_norm_eps: 1e-5,
        architectures: vec![crate::config::CLIP_WITH_PROJECTION.into()],
        projection_dim: Some(dims::<2>(file, &format!("{p}text_projection"))?[1]),
    };
    config.validate(&file.path.display().to_string())?;
    Ok(Some(config))
}

/// The VAE config of a single file: embedded in its header, else inferred from tensor
/// shapes (levels, channels, blocks per level; SD's 32 GroupNorm groups), with SDXL's latent
/// scale ([`SDXL_VAE_SCALING_FACTOR`]) in an SDXL checkpoint.
pub fn infer_vae_config(file: &WeightFile) -> Result<VaeConfig> {
    if let Some(config) = file.embedded_config::<VaeConfig>(VAE_CONFIG_KEY)? {
        config.validate(&file.path.display().to_string())?;
        return Ok(config);
    }
    let levels = count_indexed(file, "first_stage_model.encoder.down.")?;
    if levels == 0 {
        return Err(layout_error(file, "no VAE found (expected first_stage_model.encoder.down.*)"));
    }
    let block_out_channels = (0..levels)
        .map(|i| {
            file.shape(&format!("first_stage_model.encoder.down.{i}.block.0.conv1.weight"))
                .map(|s| dim_at(s, 0))
                .ok_or_else(|| layout_error(file, &format!("first_stage_model.encoder.down.{i}.block.0.conv1.weight is missing")))
        })
        .collect::<Result<Vec<_>>>()?;
    let latent2 = file
        .shape("first_stage_model.encoder.conv_out.weight")
        .map_or(8, |s| dim_at(s, 0));
    // SDXL's VAE has the same shapes as SD's but another latent scale.
    let context = file.shape(&format!("{}middle_block.1.transformer_blocks.0.attn2.to_k.weight", keymap::LDM_UNET_PREFIX));
    let sdxl = file.keys().any(|k| k.starts_with("conditioner.embedders."))
        || (file.contains(&format!("{}label_emb.0.0.weight", keymap::LDM_UNET_PREFIX)) && context.is_some_and(|s| dim_at(s, 1) == 2048));
    let config = VaeConfig {
        scaling_factor: if sdxl { SDXL_VAE_SCALING_FACTOR } else { VaeConfig::sd15().scaling_factor },
        block_out_channels,
        layers_per_block: count_indexed(file, "first_stage_model.encoder.down.0.block.")?,
        latent_channels: latent2 / 2,
        down_block_types: vec!["DownEncoderBlock2D".into(); levels],
        up_block_types: vec!["UpDecoderBlock2D".into(); levels],
        ..VaeConfig::sd15()
    };
    config.validate(&file.path.display().to_string())?;
    Ok(config)
}

/// Header key for an embedded UNet config (diffusers `config.json` fields).
pub const UNET_CONFIG_KEY: &str = "sd_model:unet_config";

/// The UNet config of a single file: embedded in its header, else inferred from tensor
/// shapes (channels, levels, blocks per level, attention levels, projection kind, text
/// width; SD1.x uses 8 heads, SD2.x 64-wide heads).
pub fn infer_unet_config(file: &WeightFile) -> Result<UnetConfig> {
    refuse_edm(file)?;
    if let Some(config) = file.embedded_config::<UnetConfig>(UNET_CONFIG_KEY)? {
        config.validate(&file.path.display().to_string())?;
        return Ok(config);
    }
    let p = keymap::LDM_UNET_PREFIX;
    let shape = |k: &str| file.shape(&format!("{p}{k}")).map(<[usize]>::to_vec);
    let conv_in = shape("input_blocks.0.0.weight").ok_or_else(|| layout_error(file, "no UNet found (expected model.diffusion_model.input_blocks.0.0.weight)"))?;
    let n_input = count_indexed(file, &format!("{p}input_blocks."))?;
    let n_output = count_indexed(file, &format!("{p}output_blocks."))?;
    // Level 0 has `layers` ResNets, then (if there is a second level) its downsampler,
    // `input_blocks.{layers+1}.0.op`; there are `levels · (layers + 1)` output blocks.
    let layers = (1..n_input)
        .find(|n| file.contains(&format!("{p}input_blocks.{n}.0.op.weight")))
        .map_or(n_input.saturating_sub(1), |n| n - 1);
    if layers == 0 || !n_output.is_multiple_of(layers + 1) || n_input != n_output {
        return Err(layout_error(file, &format!("cannot infer UNet levels from {n_input} input and {n_output} output blocks")));
    }
    let levels = n_output / (layers + 1);
    let mut channels = Vec::new();
    let mut down = Vec::new();
    let mut up = Vec::new();
    let mut context_dim = 768;
    let mut linear = false;
    let mut depths = Vec::with_capacity(levels);
    for i in 0..levels {
        let n = 1 + i * (layers + 1);
        let c = dims::<4>(file, &format!("{p}input_blocks.{n}.0.out_layers.3.weight"))?[0];
        channels.push(c);
        let attn = format!("input_blocks.{n}.1.transformer_blocks.0.attn2.to_k.weight");
        depths.push(count_indexed(file, &format!("{p}input_blocks.{n}.1.transformer_blocks."))?.max(1));
        if let Some(s) = shape(&attn) {
            context_dim = dim_at(&s, 1);
            linear = shape(&format!("input_blocks.{n}.1.proj_in.weight")).is_some_and(|s| s.len() == 2);
            down.push("CrossAttnDownBlock2D".to_string());
        } else {
            down.push("DownBlock2D".to_string());
        }
    }
    for i in 0..levels {
        let n = i * (layers + 1);
        let cross = shape(&format!("output_blocks.{n}.1.transformer_blocks.0.attn2.to_k.weight")).is_some();
        up.push(if cross { "CrossAttnUpBlock2D" } else { "UpBlock2D" }.to_string());
    }
    // SDXL: the added-conditioning MLP, 64-wide heads, several transformer blocks per level
    // (the middle block has as many as the last level).
    let label_emb = match shape("label_emb.0.0.weight") {
        // diffusers' rule: `label_emb` is SDXL's `text_time` conditioning with SDXL's text
        // widths; otherwise it is a class / ADM embedding (SD2.1 unCLIP).
        Some(s) if context_dim == 2048 && s.len() == 2 => Some(s[1]),
        Some(_) if context_dim == 1280 => {
            return Err(layout_error(file, "an SDXL refiner (aesthetic-score conditioning, one OpenCLIP encoder) is not supported"));
        }
        Some(_) => return Err(layout_error(file, "class / ADM conditioning (`label_emb`, e.g. SD2.1 unCLIP) is not supported")),
        None => None,
    };
    let sd2 = context_dim == 1024;
    let heads = if sd2 || label_emb.is_some() {
        PerBlock::Each(channels.iter().map(|c| c / 64).collect())
    } else {
        PerBlock::All(8)
    };
    let mid_depth = count_indexed(file, &format!("{p}middle_block.1.transformer_blocks."))?.max(1);
    // The middle block takes the last level's depth: a last level without attention (SD1.x)
    // holds it for the middle block.
    let last = depths.len() - 1;
    if down[last] == "DownBlock2D" {
        depths[last] = mid_depth;
    } else if depths[last] != mid_depth {
        return Err(layout_error(file, &format!("the middle block has {mid_depth} transformer blocks but the last level {}", depths[last])));
    }
    let (addition_embed_type, addition_time_embed_dim, projection_class_embeddings_input_dim) = match label_emb {
        // SDXL embeds each time id 256 wide.
        Some(input) => (Some("text_time".to_string()), Some(256), Some(input)),
        None => (None, None, None),
    };
    let config = UnetConfig {
        in_channels: dim_at(&conv_in, 1),
        out_channels: shape("out.2.weight").map_or(4, |s| dim_at(&s, 0)),
        sample_size: if label_emb.is_some() {
            128
        } else if sd2 {
            96
        } else {
            64
        },
        transformer_layers_per_block: if depths.iter().all(|d| *d == 1) { PerBlock::All(1) } else { PerBlock::Each(depths) },
        addition_embed_type,
        addition_time_embed_dim,
        projection_class_embeddings_input_dim,
        down_block_types: down,
        up_block_types: up,
        block_out_channels: channels,
        layers_per_block: layers,
        cross_attention_dim: context_dim,
        attention_head_dim: heads,
        use_linear_projection: linear,
        upcast_attention: sd2,
        ..UnetConfig::sd15()
    };
    config.validate(&file.path.display().to_string())?;
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::transpose_bytes;

    /// Every value width and shapes that are and are not multiples of the tile size give
    /// the plain element-by-element transposition.
    #[test]
    fn transpose_bytes_matches_the_plain_transposition() {
        for elem in [1, 2, 3, 4, 8] {
            for (rows, cols) in [(1, 1), (1, 7), (5, 1), (33, 70), (64, 32), (3, 100)] {
                let bytes: Vec<u8> = (0..rows * cols * elem).map(|i| (i * 31 % 251) as u8).collect();
                let got = transpose_bytes(&bytes, rows, cols, elem);
                let mut want = vec![0u8; bytes.len()];
                for r in 0..rows {
                    for c in 0..cols {
                        for b in 0..elem {
                            want[(c * rows + r) * elem + b] = bytes[(r * cols + c) * elem + b];
                        }
                    }
                }
                assert_eq!(got, want, "{elem}-byte values, {rows} x {cols}");
                assert_eq!(transpose_bytes(&got, cols, rows, elem), bytes, "transposing back");
            }
        }
    }
}
