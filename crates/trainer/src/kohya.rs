//! kohya sd-scripts training configs (the `--config_file` TOML of `train_network.py` and
//! `sdxl_train_network.py`, which the kohya_ss GUI also writes) read into a
//! [`TrainConfig`], for `trainer import-kohya`.
//!
//! Each sd-scripts option maps to the setting that trains the same way here, starting from
//! sd-scripts' defaults (not this trainer's: `learning_rate` 2e-6, 1600 steps, no min-SNR
//! weighting, a `constant` schedule, buckets off, rank 4 with alpha 1, text-encoder adapters
//! unless `network_train_unet_only`, ...). Options that change only speed, memory or logging
//! are listed in one note; options that would train differently and have no counterpart
//! here (another network module, an optimizer or scheduler this trainer lacks, custom
//! dataset classes, ...) are errors naming the option; unknown options are errors with the
//! nearest known name.
//!
//! ```
//! use std::path::Path;
//! use trainer::kohya::import_kohya_config;
//! let text = r#"
//! [model_arguments]
//! pretrained_model_name_or_path = "models/v1-5.safetensors"
//! [dataset_arguments]
//! train_data_dir = "train"
//! resolution = "512,512"
//! [training_arguments]
//! output_dir = "out"
//! network_dim = 16
//! network_alpha = 8
//! network_args = ["conv_dim=4", "conv_alpha=1"]
//! optimizer_type = "AdamW8bit"
//! unet_lr = 1e-4
//! text_encoder_lr = 5e-5
//! max_train_epochs = 10
//! "#;
//! let import = import_kohya_config(text, Path::new("config.toml")).unwrap();
//! let c = &import.config;
//! assert_eq!((c.lora.rank, c.lora.alpha, c.lora.conv_rank), (16, 8.0, 4));
//! assert_eq!((c.train.learning_rate, c.train.text_encoder_lr), (1e-4, 5e-5));
//! assert_eq!(c.train.min_snr_gamma, 0.0); // sd-scripts' default: off
//! assert!(import.notes.iter().any(|n| n.contains("AdamW8bit")));
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use sd_model::targets::{TextEncoderTargets, UnetTargets};

use crate::config::{nearest, HuberScheduleKind, LossKind, LrScheduler, MixedPrecision, Optimizer, Prediction, TrainConfig};
use crate::TrainError;

/// A kohya config read into this trainer's settings.
#[derive(Debug, Clone, PartialEq)]
pub struct KohyaImport {
    /// The settings: the file's, and sd-scripts' defaults where it sets nothing.
    pub config: TrainConfig,
    /// What the conversion left out or approximated, one sentence each.
    pub notes: Vec<String>,
}

impl KohyaImport {
    /// The settings as this trainer's TOML, headed by comments naming `source` and the
    /// notes.
    pub fn to_toml(&self, source: &Path) -> String {
        let mut out = format!("# Converted by `trainer import-kohya` from {}\n", source.display());
        if !self.notes.is_empty() {
            out.push_str("#\n# Notes:\n");
            for note in &self.notes {
                out.push_str(&format!("# - {}\n", note.replace('\n', "\n#   ")));
            }
        }
        out.push('\n');
        out.push_str(&self.config.to_toml());
        out
    }
}

/// Options that change how fast kohya runs, how much memory it takes, or where it logs,
/// not what it trains.
const NO_EFFECT: &[&str] = &[
    "xformers",
    "sdpa",
    "mem_eff_attn",
    "torch_compile",
    "dynamo_backend",
    "max_data_loader_n_workers",
    "persistent_data_loader_workers",
    "cache_latents",
    "cache_latents_to_disk",
    "vae_batch_size",
    "skip_cache_check",
    "cache_text_encoder_outputs",
    "cache_text_encoder_outputs_to_disk",
    "text_encoder_batch_size",
    "lowram",
    "highvram",
    "disable_mmap_load_safetensors",
    "ddp_timeout",
    "ddp_gradient_as_bucket_view",
    "ddp_static_graph",
    "huggingface_repo_id",
    "huggingface_repo_type",
    "huggingface_path_in_repo",
    "huggingface_token",
    "huggingface_repo_visibility",
    "save_state_to_huggingface",
    "resume_from_huggingface",
    "async_upload",
    "log_with",
    "logging_dir",
    "log_prefix",
    "log_tracker_name",
    "log_tracker_config",
    "wandb_run_name",
    "wandb_api_key",
    "log_config",
    "tokenizer_cache_dir",
    "config_file",
    "output_config",
    "use_safetensors",
    "no_half_vae",
    "fused_backward_pass",
    "blocks_to_swap",
    "cpu_offload_checkpointing",
    "deepspeed",
    "zero_stage",
    "offload_optimizer_device",
    "offload_optimizer_nvme_path",
    "offload_param_device",
    "offload_param_nvme_path",
    "zero3_init_flag",
    "zero3_save_16bit_model",
    "fp16_master_weights_and_gradients",
    "console_log_level",
    "console_log_file",
    "console_log_simple",
    "save_last_n_epochs_state",
    "save_last_n_steps_state",
    "cache_info",
    // The kohya_ss GUI's own keys, which sd-scripts ignores (the GUI turns `epoch` into
    // max_train_steps itself).
    "epoch",
    "noise_offset_type",
    "stop_text_encoder_training",
    // SD3 / FLUX only.
    "weighting_scheme",
    "logit_mean",
    "logit_std",
    "mode_scale",
];

/// Options with no counterpart here, and why; they are errors unless left at sd-scripts'
/// default (an empty or zero value, or `false`).
const UNSUPPORTED: &[(&str, &str)] = &[
    ("dataset_class", "custom dataset classes are not supported"),
    ("debug_dataset", "there is no dataset debugging mode"),
    ("train_inpainting", "inpainting models are not supported"),
];

/// Options that change only what is saved or measured, which this trainer does its own
/// way, and what it does instead.
const NOTED: &[(&str, &str)] = &[
];

/// `face_crop_aug_range` as sd-scripts reads it, `"lo,hi"` (a list of two numbers too):
/// two numbers with `lo <= hi`.
fn face_crop_range(o: &mut Options) -> Result<Option<[f64; 2]>, TrainError> {
    let key = "face_crop_aug_range";
    let numbers: Vec<f64> = match o.take(key) {
        None => return Ok(None),
        Some(toml::Value::String(s)) if s.trim().is_empty() => return Ok(None),
        Some(toml::Value::String(s)) => s.split(',').map(|p| p.trim().parse::<f64>()).collect::<Result<_, _>>().map_err(|_| o.err(key, format!("= \"{s}\": expected two numbers \"lo,hi\"")))?,
        Some(toml::Value::Array(items)) => items.iter().map(|v| v.as_float().or_else(|| v.as_integer().map(|i| i as f64))).collect::<Option<_>>().ok_or_else(|| o.err(key, "must be two numbers \"lo,hi\""))?,
        Some(other) => return Err(o.err(key, format!("= {other}: expected two numbers \"lo,hi\""))),
    };
    match numbers.as_slice() {
        &[lo, hi] if lo.is_finite() && hi.is_finite() && lo > 0.0 && lo <= hi => Ok(Some([lo, hi])),
        _ => Err(o.err(key, format!("= {numbers:?}: expected two positive numbers \"lo,hi\" with lo <= hi"))),
    }
}

/// sd-scripts' sampler names as this trainer names them.
fn sampler_name(kohya: &str, notes: &mut Vec<String>) -> String {
    let name = kohya.trim().to_ascii_lowercase();
    // sd-scripts knows five `k_` names; any other (`k_heun`) samples with DDIM there.
    let base = match name.as_str() {
        "k_lms" | "k_euler" | "k_euler_a" | "k_dpm_2" | "k_dpm_2_a" => &name[2..],
        other => other,
    };
    let ours = match base {
        "ddim" | "pndm" | "euler" | "euler_a" | "dpmsingle" | "lms" | "heun" | "dpm_2" | "dpm_2_a" => base,
        "dpmsolver++" => "dpmpp_2m",
        "dpmsolver" => {
            notes.push(format!("sample sampler `{kohya}`: sd-scripts' diffusers refuses DPM-Solver ending at sigma 0 (what it asks for); samples use `dpmsolver`, which ends at sigma_min as older diffusers did"));
            "dpmsolver"
        }
        // This trainer's own names pass through; sd-scripts samples unknown names with DDIM.
        _ if kohya.trim().parse::<sd_sched::SamplerSpec>().is_ok() => return kohya.trim().to_string(),
        _ => {
            notes.push(format!("sample sampler `{kohya}` is unknown: sd-scripts then samples with DDIM, and so do these samples"));
            return "ddim".into();
        }
    };
    ours.to_string()
}

/// A value of an `optimizer_args` / `network_args` entry, read as Python's
/// `ast.literal_eval` would (what sd-scripts does).
#[derive(Debug, Clone, PartialEq)]
enum PyValue {
    Bool(bool),
    Number(f64),
    Tuple(Vec<f64>),
    Text(String),
}

impl PyValue {
    fn parse(raw: &str) -> Self {
        let raw = raw.trim();
        match raw {
            "True" | "true" => return Self::Bool(true),
            "False" | "false" => return Self::Bool(false),
            _ => {}
        }
        if let Ok(v) = raw.parse::<f64>() {
            return Self::Number(v);
        }
        let inner = raw.trim_start_matches(['(', '[']).trim_end_matches([')', ']']);
        let parts: Vec<&str> = inner.split(',').map(str::trim).filter(|p| !p.is_empty()).collect();
        if parts.len() > 1 && let Ok(numbers) = parts.iter().map(|p| p.parse::<f64>()).collect::<Result<Vec<_>, _>>() {
            return Self::Tuple(numbers);
        }
        Self::Text(raw.trim_matches(['"', '\'']).to_string())
    }
}

/// `key=value` entries of a list option (`optimizer_args`, `network_args`).
fn key_values(entries: &[String], option: &str, origin: &str) -> Result<Vec<(String, String)>, TrainError> {
    entries
        .iter()
        .map(|e| {
            e.split_once('=').map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).ok_or_else(|| TrainError::Config {
                origin: origin.into(),
                reason: format!("`{option}`: `{e}` is not KEY=VALUE"),
            })
        })
        .collect()
}

/// `v` as a count when it is a whole number from 0 to below 10^15 (far beyond any count,
/// step or rank a run has): NaN, infinities and larger numbers, which `as usize` would
/// turn silently into 0 or `usize::MAX`, are `None`.
fn whole_number(v: f64) -> Option<usize> {
    (v >= 0.0 && v.fract() == 0.0 && v < 1e15).then_some(v as usize)
}

/// The file's options, flattened as sd-scripts flattens them (the tables' keys, one level
/// down, and top-level keys), taken one by one.
struct Options {
    origin: String,
    values: BTreeMap<String, toml::Value>,
    /// Every option name asked for, for "did you mean".
    known: Vec<&'static str>,
}

impl Options {
    fn parse(text: &str, origin: &str) -> Result<Self, TrainError> {
        let bad = |reason: String| TrainError::Config { origin: origin.into(), reason };
        let table: toml::Table = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        let mut values = BTreeMap::new();
        let mut place: BTreeMap<String, String> = BTreeMap::new();
        for (name, value) in table {
            let entries = match value {
                toml::Value::Table(t) => t.into_iter().map(|(k, v)| (k, v, format!("[{name}]"))).collect(),
                v => vec![(name, v, "the top level".to_string())],
            };
            for (key, value, at) in entries {
                if let Some(first) = place.insert(key.clone(), at.clone()) {
                    return Err(bad(format!("`{key}` is set twice, in {first} and in {at}")));
                }
                values.insert(key, value);
            }
        }
        Ok(Self {
            origin: origin.into(),
            values,
            known: Vec::new(),
        })
    }

    fn err(&self, key: &str, reason: impl std::fmt::Display) -> TrainError {
        TrainError::Config {
            origin: self.origin.clone(),
            reason: format!("`{key}` {reason}"),
        }
    }

    fn take(&mut self, key: &'static str) -> Option<toml::Value> {
        self.known.push(key);
        self.values.remove(key)
    }

    /// A string option; empty strings read as unset (the kohya_ss GUI writes them so).
    fn string(&mut self, key: &'static str) -> Result<Option<String>, TrainError> {
        match self.take(key) {
            None => Ok(None),
            Some(toml::Value::String(s)) => Ok((!s.is_empty()).then_some(s)),
            Some(other) => Err(self.err(key, format!("must be a string, not `{other}`"))),
        }
    }

    /// A number (a numeric string too, as the GUI sometimes writes them).
    fn float(&mut self, key: &'static str) -> Result<Option<f64>, TrainError> {
        match self.take(key) {
            None => Ok(None),
            Some(toml::Value::Float(v)) => Ok(Some(v)),
            Some(toml::Value::Integer(v)) => Ok(Some(v as f64)),
            Some(toml::Value::String(s)) if s.trim().is_empty() => Ok(None),
            Some(toml::Value::String(s)) => s.trim().parse().map(Some).map_err(|_| self.err(key, format!("must be a number, not \"{s}\""))),
            Some(other) => Err(self.err(key, format!("must be a number, not `{other}`"))),
        }
    }

    /// A whole number that is not negative.
    fn count(&mut self, key: &'static str) -> Result<Option<usize>, TrainError> {
        match self.float(key)? {
            None => Ok(None),
            Some(v) => whole_number(v).map(Some).ok_or_else(|| self.err(key, format!("must be a whole number of at least 0, not {v}"))),
        }
    }

    /// A whole number from 0 to `u32::MAX` (a side in pixels, a repeat count): a larger one
    /// is an error naming `key`, not a value cut to its low 32 bits.
    fn count_u32(&mut self, key: &'static str) -> Result<Option<u32>, TrainError> {
        match self.count(key)? {
            None => Ok(None),
            Some(n) => u32::try_from(n).map(Some).map_err(|_| self.err(key, format!("= {n}: expected a whole number of at most {}", u32::MAX))),
        }
    }

    /// A step count as sd-scripts reads `lr_warmup_steps` / `lr_decay_steps`: a TOML
    /// integer is steps, a float below 1 a share of all steps; `(steps, share)`.
    fn steps_or_share(&mut self, key: &'static str) -> Result<Option<(usize, f64)>, TrainError> {
        match self.take(key) {
            None => Ok(None),
            Some(toml::Value::Integer(n)) if n >= 0 => Ok(Some((n as usize, 0.0))),
            Some(toml::Value::Float(share)) if (0.0..1.0).contains(&share) => Ok(Some((0, share))),
            Some(other) => Err(self.err(key, format!("= {other}: expected a whole number of steps or a share of the steps below 1 (a float)"))),
        }
    }

    /// A number or a list of numbers (sd-scripts' `nargs="*"` float options); empty when
    /// unset.
    fn numbers(&mut self, key: &'static str) -> Result<Vec<f64>, TrainError> {
        match self.take(key) {
            Some(toml::Value::Array(items)) => items
                .iter()
                .map(|v| v.as_float().or_else(|| v.as_integer().map(|i| i as f64)))
                .collect::<Option<_>>()
                .ok_or_else(|| self.err(key, "must be a number or a list of numbers")),
            Some(value) => {
                self.values.insert(key.to_string(), value);
                Ok(self.float(key)?.into_iter().collect())
            }
            None => Ok(Vec::new()),
        }
    }

    fn flag(&mut self, key: &'static str) -> Result<bool, TrainError> {
        match self.take(key) {
            None => Ok(false),
            Some(toml::Value::Boolean(b)) => Ok(b),
            Some(other) => Err(self.err(key, format!("must be true or false, not `{other}`"))),
        }
    }

    /// A list of strings (sd-scripts' `nargs="*"` options), or one string of entries
    /// separated by spaces (as the GUI writes them).
    fn list(&mut self, key: &'static str) -> Result<Vec<String>, TrainError> {
        match self.take(key) {
            None => Ok(Vec::new()),
            Some(toml::Value::String(s)) => Ok(s.split_whitespace().map(str::to_string).collect()),
            Some(toml::Value::Array(items)) => items
                .into_iter()
                .map(|v| match v {
                    toml::Value::String(s) => Ok(s),
                    other => Err(self.err(key, format!("must be a list of strings; `{other}` is not one"))),
                })
                .collect(),
            Some(other) => Err(self.err(key, format!("must be a list of strings, not `{other}`"))),
        }
    }

    /// Whether a present option holds its "unset" value.
    fn is_default(value: &toml::Value) -> bool {
        match value {
            toml::Value::Boolean(b) => !b,
            toml::Value::String(s) => s.is_empty(),
            toml::Value::Integer(v) => *v == 0,
            toml::Value::Float(v) => *v == 0.0,
            toml::Value::Array(a) => a.is_empty(),
            _ => false,
        }
    }
}

/// Reads the kohya config file at `path` ([`import_kohya_config`]).
pub fn import_kohya_config_file(path: &Path) -> Result<KohyaImport, TrainError> {
    let text = std::fs::read_to_string(path).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    import_kohya_config(&text, path)
}

/// Reads a kohya sd-scripts training config (`text`, from the file `origin`, named in
/// errors) into this trainer's settings; see the [module docs](self). A `sample_prompts`
/// file it names is read too (relative paths from the working directory, as sd-scripts
/// reads them): `.txt` (one prompt per line, `#` comments), `.toml` or `.json`.
pub fn import_kohya_config(text: &str, origin: &Path) -> Result<KohyaImport, TrainError> {
    let mut o = Options::parse(text, &origin.display().to_string())?;
    let mut notes = Vec::new();
    let mut c = TrainConfig::default();

    read_model(&mut o, &mut c, &mut notes)?;
    read_data(&mut o, &mut c, &mut notes)?;
    // train_textual_inversion.py's configs name no network: the embedding trains alone.
    let network_given = o.values.keys().any(|k| k.starts_with("network_"));
    let network = read_network(&mut o, &mut c, &mut notes)?;
    read_embedding(&mut o, &mut c, network_given, &mut notes)?;
    let (network_dtype, scheduler) = read_training(&mut o, &mut c, &mut notes)?;
    read_resume(&mut o, &mut c, &mut notes)?;
    // networks.dylora, networks.lora_fa and networks.oft have no max-norm: sd-scripts warns
    // and trains without it.
    let no_max_norm = match network {
        Network::Lora { .. } if c.lora.dylora_unit > 0 => Some("networks.dylora"),
        Network::Lora { .. } if c.lora.lora_fa => Some("networks.lora_fa"),
        Network::Oft { .. } => Some("networks.oft"),
        _ => None,
    };
    if let Some(module) = no_max_norm.filter(|_| c.train.scale_weight_norms > 0.0) {
        notes.push(format!("scale_weight_norms {}: {module} has no max-norm, so sd-scripts turns it off (with a warning) and trains without it; train.scale_weight_norms is off", c.train.scale_weight_norms));
        c.train.scale_weight_norms = 0.0;
    }
    match network {
        Network::Lora { conv_dim } => conv_targets(&mut c.lora, conv_dim, &mut notes),
        Network::Oft { all_linear, conv } => oft_targets(&mut c.lora, all_linear, conv),
        Network::Lycoris { preset, conv_dim } => {
            let sdxl = sd_pipeline::is_sdxl(&c.model.pretrained).ok();
            lycoris_targets(&mut c.lora, preset, conv_dim, sdxl, &mut notes);
            if c.lora.unet_targets == UnetTargets::None && c.lora.text_encoder_targets == TextEncoderTargets::None {
                return Err(o.err("network_args", "the LyCORIS preset leaves nothing to train with these learning rates (network_train_unet_only / network_train_text_encoder_only, or a learning rate of 0)"));
            }
            norm_targets(&mut c.lora, &mut notes);
            // LyCORIS scales no GLoRA, (IA)³ or full module (their `apply_max_norm` does nothing).
            if matches!(c.lora.algo, lora_core::Algo::Glora | lora_core::Algo::Ia3 | lora_core::Algo::Full) && c.train.scale_weight_norms > 0.0 {
                notes.push(format!("scale_weight_norms {}: LyCORIS' {} modules have no max-norm, so nothing is scaled; train.scale_weight_norms is off", c.train.scale_weight_norms, c.lora.algo.name()));
                c.train.scale_weight_norms = 0.0;
            }
            // Diag-OFT's and BOFT's blocks are scaled as LyCORIS scales them.
            if c.lora.algo.is_lycoris() && !c.lora.algo.is_lycoris_oft() && c.train.scale_weight_norms > 0.0 {
                notes.push(format!("scale_weight_norms with {}: LyCORIS keeps the scaling in a separate scalar; here the factors themselves are scaled (the same norms, slightly different later steps)", c.lora.algo.name()));
            }
        }
    }
    read_optimizer(&mut o, &mut c, &scheduler, &mut notes)?;
    read_output(&mut o, &mut c, network_dtype, &mut notes)?;

    let mut ignored = Vec::new();
    for key in NO_EFFECT {
        if let Some(value) = o.take(key) {
            let augmented = c.data.color_aug || c.data.random_crop;
            if *key == "cache_latents" && value == toml::Value::Boolean(true) && augmented {
                notes.push("cache_latents with color_aug or random_crop: sd-scripts refuses the pair; here the changed samples are encoded each time they are drawn".into());
            }
            ignored.push(*key);
        }
    }
    if !ignored.is_empty() {
        notes.push(format!(
            "ignored (speed, memory, caching or logging options, which change nothing trained here; TensorBoard logs go to OUTPUT_DIR/logs): {}",
            ignored.join(", ")
        ));
    }
    for (key, instead) in NOTED {
        if let Some(value) = o.take(key).filter(|v| !Options::is_default(v)) {
            notes.push(format!("{key} = {value} is not used: {instead}"));
        }
    }
    for (key, why) in UNSUPPORTED {
        if let Some(value) = o.take(key) && !Options::is_default(&value) {
            return Err(o.err(key, format!("= {value}: {why}")));
        }
    }
    if let Some(key) = o.values.keys().next().cloned() {
        let hint = nearest(&key, o.known.iter().copied()).map(|n| format!("; did you mean `{n}`?")).unwrap_or_default();
        return Err(o.err(&key, format!("is not an sd-scripts training option this importer knows{hint}")));
    }
    c.validate().map_err(|e| TrainError::Config {
        origin: o.origin.clone(),
        reason: format!("the converted settings are not valid: {e}"),
    })?;
    Ok(KohyaImport { config: c, notes })
}

fn read_model(o: &mut Options, c: &mut TrainConfig, notes: &mut Vec<String>) -> Result<(), TrainError> {
    c.model.pretrained = o.string("pretrained_model_name_or_path")?.ok_or_else(|| o.err("pretrained_model_name_or_path", "is missing: it names the base model"))?;
    let local = matches!(c.model.pretrained.as_str(), "tiny" | "tiny-sdxl") || Path::new(&c.model.pretrained).exists();
    if !local {
        notes.push(format!(
            "pretrained_model_name_or_path = \"{}\" is not a file or folder here (Hugging Face repo ids are not downloaded): set model.pretrained to a local diffusers folder or .safetensors checkpoint",
            c.model.pretrained
        ));
    }
    if o.flag("v2")? {
        notes.push("v2: the model family (SD1.x, SD2.x or SDXL) is read from the checkpoint".into());
    }
    c.train.prediction = if o.flag("v_parameterization")? { Prediction::VPrediction } else { Prediction::Epsilon };
    if let Some(vae) = o.string("vae")?.filter(|v| !v.trim().is_empty()) {
        if !Path::new(&vae).exists() {
            return Err(o.err("vae", format!("= \"{vae}\" is not a file or folder here (Hugging Face repo ids are not downloaded): set model.vae to a local VAE folder or .safetensors file")));
        }
        c.model.vae = vae;
    }
    c.model.clip_skip = o.count("clip_skip")?.unwrap_or(1);
    if c.model.clip_skip > 1 && sd_pipeline::is_sdxl(&c.model.pretrained).unwrap_or(false) {
        notes.push(format!("clip_skip = {} is not used: SDXL reads both text encoders' penultimate layers (sd-scripts only warns)", c.model.clip_skip));
        c.model.clip_skip = 1;
    }
    c.model.max_token_length = o.count("max_token_length")?.unwrap_or(75);
    // Each base LoRA at its multiplier (1 where the list is shorter), as `FILE:STRENGTH`.
    let bases = match o.take("base_weights") {
        Some(toml::Value::String(file)) => vec![file],
        Some(v) => {
            o.values.insert("base_weights".into(), v);
            o.list("base_weights")?
        }
        None => Vec::new(),
    };
    let multipliers = o.numbers("base_weights_multiplier")?;
    let bases: Vec<String> = bases.into_iter().filter(|f| !f.trim().is_empty()).collect();
    if let Some(missing) = bases.iter().find(|f| !Path::new(f).is_file()) {
        return Err(o.err("base_weights", format!("names \"{missing}\", which is not a file here")));
    }
    c.model.base_weights = bases.iter().enumerate().map(|(i, f)| format!("{f}:{}", multipliers.get(i).copied().unwrap_or(1.0))).collect();
    Ok(())
}

/// `resolution` as sd-scripts writes it: `512`, `"512"` or `"768,512"` (width, height).
fn read_resolution(o: &mut Options) -> Result<Option<sd_data::Resolution>, TrainError> {
    let key = "resolution";
    let text = match o.take(key) {
        None => return Ok(None),
        Some(toml::Value::Integer(v)) => v.to_string(),
        Some(toml::Value::String(s)) if s.trim().is_empty() => return Ok(None),
        Some(toml::Value::String(s)) => s,
        Some(toml::Value::Array(a)) => a.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
        Some(other) => return Err(o.err(key, format!("must be a size like \"512\" or \"768,512\", not `{other}`"))),
    };
    match text.parse::<sd_data::Resolution>() {
        Ok(r) => Ok(Some(r)),
        Err(sd_data::DataError::Config { message, .. }) => Err(o.err(key, message)),
        Err(e) => Err(o.err(key, e.to_string())),
    }
}

fn read_data(o: &mut Options, c: &mut TrainConfig, notes: &mut Vec<String>) -> Result<(), TrainError> {
    let d = &mut c.data;
    let folder = o.string("train_data_dir")?;
    d.dataset_config = o.string("dataset_config")?.unwrap_or_default();
    // Fine-tuning metadata (sd-scripts' "training with captions"), which a dataset config
    // replaces; `dataset_repeats` is every subset's default `num_repeats` (kohya's
    // `N_name` folders set their own).
    let in_json = o.string("in_json")?;
    d.num_repeats = match o.count_u32("dataset_repeats")? {
        Some(0) => return Err(o.err("dataset_repeats", "= 0 trains nothing (sd-scripts skips such data): use at least 1")),
        Some(n) => n,
        None => 1,
    };
    match (in_json, d.dataset_config.is_empty()) {
        (Some(_), false) => notes.push("in_json is ignored with dataset_config, as in sd-scripts (its subsets take `metadata_file`)".into()),
        (Some(file), true) => {
            if !Path::new(&file).is_file() {
                return Err(o.err("in_json", format!("= \"{file}\" is not a file here")));
            }
            d.in_json = file;
        }
        (None, _) => {}
    }
    match (&folder, d.dataset_config.is_empty()) {
        (Some(f), _) => d.train_data_dir = f.clone(),
        (None, false) => {}
        // Absolute keys of the metadata need no folder.
        (None, true) if !d.in_json.is_empty() => d.train_data_dir = String::new(),
        (None, true) => return Err(o.err("train_data_dir", "is missing (and so is dataset_config): one of them names the images")),
    }
    d.resolution = match read_resolution(o)? {
        Some(side) => side,
        None if d.dataset_config.is_empty() => return Err(o.err("resolution", "is missing: it sets the training size, e.g. \"512,512\"")),
        None => {
            notes.push("resolution is not set: 512 is used for the dataset_config's datasets that set none".into());
            sd_data::Resolution::square(512)
        }
    };
    d.reg_data_dir = o.string("reg_data_dir")?.unwrap_or_default();
    if !d.in_json.is_empty() && !d.reg_data_dir.is_empty() {
        notes.push("reg_data_dir is ignored with in_json, as in sd-scripts (its fine-tuning data has no regularization images)".into());
        d.reg_data_dir.clear();
    }
    d.prior_loss_weight = o.float("prior_loss_weight")?.unwrap_or(1.0) as f32;
    // sd-scripts reads only each folder's own images.
    d.recursive = false;
    let extension = o.string("caption_extension")?;
    // sd-scripts lets its old misspelling win.
    let misspelt = o.string("caption_extention")?;
    d.caption_extension = match misspelt.or(extension) {
        Some(e) => e,
        // in_json's captions are in the file.
        None if !d.in_json.is_empty() => ".caption".into(),
        // The dataset config sets its own (the default applies where it sets none).
        None if std::fs::read_to_string(&d.dataset_config).is_ok_and(|t| t.contains("caption_extension")) => ".caption".into(),
        None => {
            notes.push("caption_extension is not set: sd-scripts then reads only .caption files (an image without one trains on its folder's class tokens); this trainer also reads a .txt caption when there is no .caption file".into());
            ".caption".into()
        }
    };
    d.caption_separator = o.string("caption_separator")?.unwrap_or_else(|| ",".into());
    d.shuffle_caption = o.flag("shuffle_caption")?;
    d.keep_tokens = o.count("keep_tokens")?.unwrap_or(0);
    d.keep_tokens_separator = o.string("keep_tokens_separator")?.unwrap_or_default();
    d.secondary_separator = o.string("secondary_separator")?.unwrap_or_default();
    d.enable_wildcard = o.flag("enable_wildcard")?;
    d.caption_prefix = o.string("caption_prefix")?.unwrap_or_default();
    d.caption_suffix = o.string("caption_suffix")?.unwrap_or_default();
    d.weighted_captions = o.flag("weighted_captions")?;
    d.caption_dropout_rate = o.float("caption_dropout_rate")?.unwrap_or(0.0) as f32;
    d.caption_dropout_every_n_epochs = o.count("caption_dropout_every_n_epochs")?.unwrap_or(0);
    d.caption_tag_dropout_rate = o.float("caption_tag_dropout_rate")?.unwrap_or(0.0) as f32;
    d.token_warmup_min = o.count("token_warmup_min")?.unwrap_or(1);
    d.token_warmup_step = o.float("token_warmup_step")?.unwrap_or(0.0);
    d.flip_aug = o.flag("flip_aug")?;
    d.random_crop = o.flag("random_crop")?;
    d.color_aug = o.flag("color_aug")?;
    d.enable_bucket = o.flag("enable_bucket")?;
    if let Some(range) = face_crop_range(o)? {
        // sd-scripts crops around faces only without buckets (a dataset config's subsets
        // take the option as their default, with the file's own enable_bucket).
        match d.enable_bucket && d.dataset_config.is_empty() {
            true => notes.push("face_crop_aug_range with enable_bucket: sd-scripts crops around faces only without buckets and ignores it, and so does this config".into()),
            false => d.face_crop_aug_range = Some(range),
        }
    }
    d.min_bucket_reso = o.count_u32("min_bucket_reso")?.unwrap_or(256);
    d.max_bucket_reso = o.count_u32("max_bucket_reso")?.unwrap_or(1024);
    d.bucket_reso_steps = o.count_u32("bucket_reso_steps")?.unwrap_or(64);
    d.bucket_no_upscale = o.flag("bucket_no_upscale")?;
    if let Some(how) = o.string("resize_interpolation")? {
        let name = serde_json::Value::String(how.to_ascii_lowercase());
        d.resize_interpolation = Some(serde_json::from_value(name).map_err(|_| o.err("resize_interpolation", format!("= \"{how}\": expected lanczos, nearest, bilinear, linear, bicubic, cubic, area or box")))?);
    }
    d.alpha_mask = o.flag("alpha_mask")?;
    // sd-scripts reads mask folders from a dataset config's subsets (`conditioning_data_dir`,
    // which the dataset config here reads too), never from the command line.
    let masked = o.flag("masked_loss")?;
    let masks = o.string("conditioning_data_dir")?;
    match (masked, masks) {
        (true, None) if !d.alpha_mask && d.dataset_config.is_empty() => notes.push("masked_loss without alpha_mask or a dataset config with mask folders: no masks, so it trains unmasked, as sd-scripts does".into()),
        (_, None) => {}
        (true, Some(dir)) if !d.alpha_mask && d.dataset_config.is_empty() => {
            notes.push(format!("masked_loss with conditioning_data_dir = \"{dir}\" outside a dataset config: sd-scripts reads no masks from it (it trains unmasked); this trainer trains with them (data.mask_dir)"));
            d.mask_dir = dir;
        }
        (_, Some(dir)) => notes.push(format!("conditioning_data_dir = \"{dir}\" is not read (masks come from alpha_mask or the dataset config's subsets)")),
    }
    // sd-scripts refuses mask folders in a dataset config without masked_loss; sd-data
    // trains with them.
    let config_masks = std::fs::read_to_string(&d.dataset_config).is_ok_and(|t| t.contains("conditioning_data_dir"));
    if config_masks && !masked {
        notes.push("the dataset config names conditioning_data_dir (mask folders) and masked_loss is not set: sd-scripts refuses that; this trainer trains with the masks".into());
    }
    d.validation_split = o.float("validation_split")?.unwrap_or(0.0);
    if let Some(seed) = o.count("validation_seed")? {
        d.validation_seed = seed as u64;
        notes.push(format!("validation_seed = {seed}: it picks the held-out images here too, by another draw than sd-scripts', so they may differ from sd-scripts' (the same in every run with this seed)"));
    }
    Ok(())
}

/// What `network_module` and its `network_args` leave for the targets, which apply once
/// the learning rates say which models train.
enum Network {
    /// kohya's `networks.lora`, with `conv_dim` if given ([`conv_targets`]).
    Lora { conv_dim: Option<usize> },
    /// LyCORIS' `lycoris.kohya` with its preset and the rank of the 3x3 convolutions (0:
    /// none) ([`lycoris_targets`]).
    Lycoris { preset: LycorisPreset, conv_dim: usize },
    /// kohya's `networks.oft` with its `enable_all_linear` and `enable_conv` ([`oft_targets`]).
    Oft { all_linear: bool, conv: bool },
}

/// LyCORIS' built-in presets (`preset=...` in `network_args`) for SD / SDXL UNets, whose
/// blocks kohya's UNet names as diffusers does.
#[derive(Clone, Copy, Debug, PartialEq)]
enum LycorisPreset {
    /// `full` (LyCORIS' default): the transformer, ResNet and sampler blocks, `conv_in`,
    /// `conv_out`, the time embedding, and the text encoders' attention and MLP.
    Full,
    /// `full-lin`: `full` without 3x3 convolutions.
    FullLin,
    /// `attn-mlp`: the transformer blocks and the text encoders' attention and MLP.
    AttnMlp,
    /// `attn-only`: the attention layers (UNet and text encoders).
    AttnOnly,
    /// `unet-only`: `full` without the text encoders.
    UnetOnly,
    /// `unet-transformer-only`: the UNet's transformer blocks.
    UnetTransformerOnly,
    /// `unet-convblock-only`: the UNet's ResNet and sampler blocks, `conv_in` and `conv_out`.
    UnetConvblockOnly,
    /// `ia3`: the attention's keys and values and the feed-forward outputs (the UNet's
    /// `to_k`, `to_v`, `ff.net.2`, the text encoders' `k_proj`, `v_proj`, `mlp.fc2`), an
    /// (IA)³'s scale on the inputs of the latter.
    Ia3,
}

impl LycorisPreset {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "full" => Self::Full,
            "full-lin" => Self::FullLin,
            "attn-mlp" => Self::AttnMlp,
            "attn-only" => Self::AttnOnly,
            "unet-only" => Self::UnetOnly,
            "unet-transformer-only" => Self::UnetTransformerOnly,
            "unet-convblock-only" => Self::UnetConvblockOnly,
            "ia3" => Self::Ia3,
            _ => return None,
        })
    }

    /// Whether the preset trains 3x3 convolutions (LyCORIS' `enable_conv`).
    fn enables_conv(self) -> bool {
        matches!(self, Self::Full | Self::UnetOnly | Self::UnetConvblockOnly)
    }
}

/// `train_textual_inversion.py`'s options (`token_string`, `init_word`,
/// `num_vectors_per_token`, `weights`, `use_object_template`, `use_style_template`) as the
/// `[embedding]` section; without a network (no `network_*` option) nothing else trains,
/// as in that script; with one, the embedding trains with the LoRA (pivotal tuning).
fn read_embedding(o: &mut Options, c: &mut TrainConfig, network_given: bool, notes: &mut Vec<String>) -> Result<(), TrainError> {
    let e = &mut c.embedding;
    e.token = o.string("token_string")?.unwrap_or_default();
    e.init_word = o.string("init_word")?.unwrap_or_default();
    e.vectors = o.count("num_vectors_per_token")?.unwrap_or(1);
    e.weights = o.string("weights")?.unwrap_or_default();
    let (object, style) = (o.flag("use_object_template")?, o.flag("use_style_template")?);
    e.template = match (object, style) {
        (true, true) => return Err(o.err("use_style_template", "and use_object_template are both set: choose one")),
        (true, false) => crate::config::CaptionTemplate::Object,
        (false, true) => crate::config::CaptionTemplate::Style,
        (false, false) => crate::config::CaptionTemplate::None,
    };
    if e.enabled() && !network_given {
        c.lora.unet_targets = UnetTargets::None;
        c.lora.text_encoder_targets = TextEncoderTargets::None;
        notes.push(format!("token_string = \"{}\": a textual-inversion embedding trains alone and is saved as an embedding file (A1111 calls it by the file's name, output.output_name)", e.token));
    }
    Ok(())
}

/// LyCORIS' reading of a boolean argument (`str_bool`): anything but "false" is true.
fn lycoris_bool(value: &str) -> bool {
    !value.eq_ignore_ascii_case("false")
}

/// The `network_args` of kohya's `networks.lora`, or of LyCORIS' `lycoris.kohya`.
fn read_network(o: &mut Options, c: &mut TrainConfig, notes: &mut Vec<String>) -> Result<Network, TrainError> {
    let module = o.string("network_module")?.unwrap_or_else(|| "networks.lora".into());
    let (lycoris, fa) = match module.as_str() {
        "networks.lora" | "networks.dylora" => (false, false),
        "networks.lora_fa" => (false, true),
        "lycoris.kohya" => (true, false),
        "networks.oft" => (false, false),
        other => {
            return Err(o.err(
                "network_module",
                format!("= \"{other}\" is not supported: this trainer trains kohya's networks.lora (LoRA, and LoCon with conv_dim), networks.lora_fa (LoRA-FA), networks.dylora (DyLoRA) and networks.oft (OFT), and LyCORIS' lycoris.kohya with algo lora / locon, loha, lokr, diag-oft, boft, glora, ia3 or full"),
            ))
        }
    };
    let l = &mut c.lora;
    l.lora_fa = fa;
    l.rank = o.count("network_dim")?.unwrap_or(4);
    l.alpha = o.float("network_alpha")?.unwrap_or(1.0) as f32;
    l.dropout = 0.0;
    l.network_dropout = o.float("network_dropout")?.unwrap_or(0.0);
    l.network_weights = o.string("network_weights")?.unwrap_or_default();
    if !l.network_weights.is_empty() && !Path::new(&l.network_weights).is_file() {
        return Err(o.err("network_weights", format!("= \"{}\" is not a file here", l.network_weights)));
    }
    l.dim_from_weights = o.flag("dim_from_weights")?;
    let unet_only = o.flag("network_train_unet_only")?;
    let te_only = o.flag("network_train_text_encoder_only")?;
    l.text_encoder_targets = if unet_only { TextEncoderTargets::None } else { TextEncoderTargets::AttnMlp };
    l.unet_targets = if te_only { UnetTargets::None } else { UnetTargets::AttnMlp };

    let args = o.list("network_args")?;
    if lycoris {
        return read_lycoris_args(o, l, &args, notes);
    }
    if module == "networks.dylora" {
        return read_dylora_args(o, l, &args, notes);
    }
    if module == "networks.oft" {
        return read_oft_args(o, l, &args, notes);
    }
    let mut ignored = Vec::new();
    let mut conv_dim = None;
    for (key, value) in key_values(&args, "network_args", &o.origin)? {
        let bad = |what: &str| o.err("network_args", format!("`{key}={value}`: {what}"));
        let number = || value.parse::<f64>().map_err(|_| bad("expected a number"));
        match key.as_str() {
            "conv_dim" => {
                conv_dim = Some(whole_number(number()?).ok_or_else(|| bad("expected a rank"))?);
            }
            "conv_alpha" => l.conv_alpha = number()? as f32,
            "rank_dropout" => l.rank_dropout = number()?,
            "module_dropout" => l.module_dropout = number()?,
            "down_lr_weight" => l.down_lr_weight = value.clone(),
            "mid_lr_weight" => l.mid_lr_weight = value.clone(),
            "up_lr_weight" => l.up_lr_weight = value.clone(),
            "block_lr_zero_threshold" => l.block_lr_zero_threshold = number()?,
            "block_dims" => l.block_dims = value.clone(),
            "block_alphas" => l.block_alphas = value.clone(),
            "conv_block_dims" => l.conv_block_dims = value.clone(),
            "conv_block_alphas" => l.conv_block_alphas = value.clone(),
            // networks.lora_fa, an older copy of networks.lora, has no LoRA+.
            "loraplus_lr_ratio" if !fa => l.loraplus_lr_ratio = number()?,
            "loraplus_unet_lr_ratio" if !fa => l.loraplus_unet_lr_ratio = number()?,
            "loraplus_text_encoder_lr_ratio" if !fa => l.loraplus_text_encoder_lr_ratio = number()?,
            // networks.lora reads only the options above and ignores the rest.
            _ => ignored.push(format!("{key}={value}")),
        }
    }
    if !ignored.is_empty() {
        notes.push(format!("network_args that {module} ignores are ignored here too: {}", ignored.join(", ")));
    }
    let loraplus = [l.loraplus_lr_ratio, l.loraplus_unet_lr_ratio, l.loraplus_text_encoder_lr_ratio];
    if l.dim_from_weights && loraplus.iter().any(|r| *r > 0.0) {
        // networks.lora's create_network_from_weights sets no LoRA+ ratio.
        notes.push(format!("dim_from_weights: {module} builds the network from the file and sets no LoRA+ ratio, so the loraplus_* network_args are not used"));
        [l.loraplus_lr_ratio, l.loraplus_unet_lr_ratio, l.loraplus_text_encoder_lr_ratio] = [0.0; 3];
    }
    Ok(Network::Lora { conv_dim })
}

/// The `network_args` of kohya's `networks.dylora`, as its `create_network` reads them:
/// `unit` (1 by default), `conv_dim` (which must equal `network_dim`: the 3x3 convolutions
/// then train at `network_dim` and `network_alpha`, as its network ignores `conv_alpha`)
/// and LoRA+. It reads nothing else (no dropouts, no block-wise settings): the rest is
/// ignored with a note.
fn read_dylora_args(o: &Options, l: &mut crate::config::LoraSection, args: &[String], notes: &mut Vec<String>) -> Result<Network, TrainError> {
    let mut ignored = Vec::new();
    let (mut unit, mut conv_dim) = (1, None);
    for (key, value) in key_values(args, "network_args", &o.origin)? {
        let bad = |what: &str| o.err("network_args", format!("`{key}={value}`: {what}"));
        let number = || value.parse::<f64>().map_err(|_| bad("expected a number"));
        let whole = || number().and_then(|n| whole_number(n).ok_or_else(|| bad("expected a whole number")));
        match key.as_str() {
            "unit" => unit = whole()?,
            "conv_dim" => conv_dim = Some(whole()?),
            "conv_alpha" => ignored.push(format!("{key}={value} (networks.dylora trains the convolutions at network_alpha)")),
            "loraplus_lr_ratio" => l.loraplus_lr_ratio = number()?,
            "loraplus_unet_lr_ratio" => l.loraplus_unet_lr_ratio = number()?,
            "loraplus_text_encoder_lr_ratio" => l.loraplus_text_encoder_lr_ratio = number()?,
            _ => ignored.push(format!("{key}={value}")),
        }
    }
    if unit == 0 || !l.rank.is_multiple_of(unit) {
        return Err(o.err("network_args", format!("`unit={unit}` must divide network_dim ({}), as networks.dylora asserts", l.rank)));
    }
    if conv_dim.is_some_and(|d| d != l.rank) {
        return Err(o.err("network_args", format!("`conv_dim={}` must equal network_dim ({}), as networks.dylora asserts", conv_dim.unwrap_or(0), l.rank)));
    }
    l.dylora_unit = unit;
    l.conv_alpha = l.alpha;
    if l.network_dropout > 0.0 {
        ignored.push(format!("network_dropout = {} (an option, not an argument)", l.network_dropout));
        l.network_dropout = 0.0;
    }
    if !ignored.is_empty() {
        notes.push(format!("what networks.dylora ignores is ignored here too: {}", ignored.join(", ")));
    }
    Ok(Network::Lora { conv_dim })
}

/// The `network_args` of kohya's `networks.oft`, as its `create_network` reads them:
/// `enable_all_linear` and `enable_conv`, each Python's `bool` of the string (so any
/// non-empty value, `False` too, turns it on). Its `network_dim` is the number of blocks
/// and `network_alpha` the constraint per output. It trains the UNet alone, reads no
/// dropout and nothing else: the rest is ignored with a note.
fn read_oft_args(o: &Options, l: &mut crate::config::LoraSection, args: &[String], notes: &mut Vec<String>) -> Result<Network, TrainError> {
    l.algo = lora_core::Algo::Oft;
    let (mut all_linear, mut conv) = (false, false);
    let mut ignored = Vec::new();
    for (key, value) in key_values(args, "network_args", &o.origin)? {
        let flag = match key.as_str() {
            "enable_all_linear" => &mut all_linear,
            "enable_conv" => &mut conv,
            _ => {
                ignored.push(format!("{key}={value}"));
                continue;
            }
        };
        *flag = python_truthy(&value);
        if value.eq_ignore_ascii_case("false") {
            notes.push(format!("network_args `{key}={value}`: networks.oft reads any non-empty value as true (Python's bool of the string), and so does this import; leave the argument out to turn it off"));
        }
    }
    if l.unet_targets == UnetTargets::None {
        return Err(o.err("network_train_text_encoder_only", "networks.oft trains the UNet alone"));
    }
    if l.text_encoder_targets != TextEncoderTargets::None {
        notes.push("networks.oft trains the UNet alone: the text encoder is not trained (as with network_train_unet_only)".into());
        l.text_encoder_targets = TextEncoderTargets::None;
    }
    if l.network_dropout > 0.0 {
        ignored.push(format!("network_dropout = {} (an option, not an argument)", l.network_dropout));
        l.network_dropout = 0.0;
    }
    if !ignored.is_empty() {
        notes.push(format!("what networks.oft ignores is ignored here too: {}", ignored.join(", ")));
    }
    if l.alpha >= 1.0 {
        notes.push(format!("network_alpha = {}: OFT's alpha is its constraint per output, which sd-scripts warns is too large at 1 or more (1e-3 to 1e-2 is usual); kept", l.alpha));
    }
    Ok(Network::Oft { all_linear, conv })
}

/// kohya's OFT targets: the attention projections (its `CrossAttention` modules), every
/// linear layer and 1x1 convolution of the transformers with `enable_all_linear`, and with
/// `enable_conv` every convolution and linear layer of the ResNets and the down / up
/// samplers, at `network_dim` blocks and `network_alpha` like the rest.
fn oft_targets(l: &mut crate::config::LoraSection, all_linear: bool, conv: bool) {
    if l.unet_targets == UnetTargets::None {
        return;
    }
    l.unet_targets = match (all_linear, conv) {
        (true, true) => UnetTargets::Conv,
        (true, false) => UnetTargets::AttnMlp,
        (false, _) => UnetTargets::Attn,
    };
    if conv && !all_linear {
        l.include.extend(["*.resnets.*", "*samplers.*"].map(String::from));
    }
    l.conv_rank = 0;
}

/// Python's truthiness of a `network_args` value (a string): true unless empty.
fn python_truthy(value: &str) -> bool {
    !value.is_empty()
}

/// Whether LyCORIS trains Tucker-decomposed convolutions for these `network_args`, read as
/// its `create_network` reads them: the deprecated `disable_conv_cp`, `use_cp` and
/// `use_conv_cp` first overwrite `use_tucker` with their (string) value, then
/// `str_bool(not disable_conv_cp or use_conv_cp or use_cp or use_tucker)`, Python's `or`
/// taking the first truthy string.
fn lycoris_tucker(args: &[(String, String)]) -> bool {
    let get = |key: &str| args.iter().rev().find(|(k, _)| k == key).map(|(_, v)| v.as_str());
    // The last deprecated key in the arguments' order wins (a dict keeps that order).
    let mapped = args.iter().rfind(|(k, _)| matches!(k.as_str(), "disable_conv_cp" | "use_cp" | "use_conv_cp")).map(|(_, v)| v.as_str());
    let use_tucker = mapped.or(get("use_tucker"));
    // `not disable_conv_cp` is a bool: true only for an empty string.
    if get("disable_conv_cp").is_some_and(|v| !python_truthy(v)) {
        return true;
    }
    let first_truthy = [get("use_conv_cp"), get("use_cp"), use_tucker].into_iter().flatten().find(|v| python_truthy(v));
    first_truthy.is_some_and(lycoris_bool)
}

/// The `network_args` of LyCORIS' `lycoris.kohya` (LyCORIS 3.x), as its `create_network`
/// reads them: `algo` (lora / locon, loha, lokr, diag-oft, boft, glora, ia3 or full), `preset`, `conv_dim` / `conv_alpha`
/// (network_dim / network_alpha when absent), LoKr's `factor` and `decompose_both`,
/// `module_dropout`, `rs_lora`, DoRA (`dora_wd`), and Tucker convolutions
/// (`use_tucker`), LoHa's and LoKr's `rank_dropout` and `use_scalar`. What LyCORIS trains
/// differently here (a LoCon's rank dropout or scalar, ...) is an error naming
/// it.
fn read_lycoris_args(o: &Options, l: &mut crate::config::LoraSection, args: &[String], notes: &mut Vec<String>) -> Result<Network, TrainError> {
    let args = key_values(args, "network_args", &o.origin)?;
    let mut algo = "lora".to_string();
    let mut preset = LycorisPreset::Full;
    let (mut conv_dim, mut conv_alpha, mut dropout) = (None, None, None);
    let (mut factor, mut decompose_both, mut bypass) = (-1, false, false);
    let (mut full_matrix, mut unbalanced) = (false, false);
    let (mut loraplus, mut wd_on_output) = ([0.0; 3], true);
    let mut rank_dropout = (0.0, String::new());
    let (mut constraint, mut rescaled) = (0.0, false);
    let mut ignored = Vec::new();
    for (key, value) in &args {
        let bad = |what: &str| o.err("network_args", format!("`{key}={value}`: {what}"));
        let number = || value.parse::<f64>().map_err(|_| bad("expected a number"));
        let on = lycoris_bool(value);
        match key.as_str() {
            "algo" => algo = value.to_ascii_lowercase(),
            "preset" => preset = LycorisPreset::parse(value).ok_or_else(|| bad("expected one of LyCORIS' presets full, full-lin, attn-mlp, attn-only, unet-only, unet-transformer-only, unet-convblock-only or ia3 (preset files are not read)"))?,
            "conv_dim" => {
                conv_dim = Some(whole_number(number()?).ok_or_else(|| bad("expected a rank"))?);
            }
            "conv_alpha" => conv_alpha = Some(number()? as f32),
            "dropout" => dropout = Some(number()?),
            "module_dropout" => l.module_dropout = number()?,
            "rank_dropout" => rank_dropout = (number()?, value.clone()),
            // LyCORIS' kohya `create_network` does not pass it on: its modules keep their
            // default, no rescaling of the kept ranks.
            "rank_dropout_scale" => ignored.push(format!("{key}={value} (LyCORIS' create_network does not pass it to its modules, which then never rescale)")),
            "factor" => {
                let f = number()?;
                if f.fract() != 0.0 {
                    return Err(bad("expected a whole number"));
                }
                // LyCORIS' `factorization`: 0 splits as 1 does, any negative value as -1.
                factor = if f < 0.0 { -1 } else { (f as i64).max(1) };
            }
            // LyCORIS passes this one on as the string it is given, which Python reads as
            // true unless empty ("False" too): LoKr then decomposes `w1` where the rank is
            // small enough. The import trains what LyCORIS trains.
            "decompose_both" => decompose_both = python_truthy(value),
            "use_scalar" => l.use_scalar = on,
            "train_norm" => l.train_norm = on,
            "full_matrix" => full_matrix = on,
            "unbalanced_factorization" => unbalanced = on,
            "wd_on_output" => wd_on_output = on,
            "bypass_mode" => bypass = on,
            "dora_wd" => l.dora = on,
            "rs_lora" => l.rslora = on,
            "loraplus_lr_ratio" => loraplus[0] = number()?,
            "loraplus_unet_lr_ratio" => loraplus[1] = number()?,
            "loraplus_text_encoder_lr_ratio" => loraplus[2] = number()?,
            // Diag-OFT's (LyCORIS: `float(constraint or 0)`, `constrain` its old name).
            "constraint" | "constrain" => constraint = if value.is_empty() { 0.0 } else { number()? as f32 },
            "rescaled" => rescaled = on,
            // Read below (Tucker), off, or of other algorithms (BOFT's block size).
            "use_tucker" | "use_cp" | "use_conv_cp" | "disable_conv_cp" | "block_size" | "train_t5xxl" => {}
            _ => ignored.push(format!("{key}={value}")),
        }
    }
    if !ignored.is_empty() {
        notes.push(format!("network_args that LyCORIS does not read are ignored: {}", ignored.join(", ")));
    }
    l.algo = match algo.as_str() {
        "lora" | "locon" => lora_core::Algo::Lora,
        "loha" => lora_core::Algo::Loha,
        "lokr" => lora_core::Algo::Lokr,
        "diag-oft" => lora_core::Algo::DiagOft,
        "boft" => lora_core::Algo::Boft,
        "glora" => lora_core::Algo::Glora,
        "ia3" => lora_core::Algo::Ia3,
        "full" => lora_core::Algo::Full,
        other => return Err(o.err("network_args", format!("`algo={other}`: this trainer trains LyCORIS' lora / locon, loha, lokr, diag-oft, boft, glora, ia3 and full"))),
    };
    if l.algo == lora_core::Algo::Full && bypass {
        return Err(o.err("network_args", "`bypass_mode=True` with algo=full: LyCORIS refuses it (a full module has no bypass mode); set it off"));
    }
    if l.algo == lora_core::Algo::Ia3 {
        ia3_drops(l, &mut rank_dropout.0, preset, notes);
    }
    if l.algo == lora_core::Algo::Glora && rank_dropout.0 > 0.0 {
        // LyCORIS' GLoRA drops rank components in bypass mode only.
        if bypass {
            return Err(o.err("network_args", format!("`rank_dropout={}` with algo=glora and bypass_mode: LyCORIS' bypass-mode rank dropout of a GLoRA (rank components, one mask per pass) has no counterpart here; set one of them off", rank_dropout.1)));
        }
        notes.push(format!("network_args `rank_dropout={}` is ignored, as LyCORIS' GLoRA ignores it outside its bypass mode", rank_dropout.1));
        rank_dropout.0 = 0.0;
    }
    if l.algo.is_lycoris_oft() {
        // Diag-OFT's rank dropout is `nn.Dropout` on its rotation (always rescaled); BOFT's
        // module takes the option and applies none.
        if l.algo == lora_core::Algo::Boft && rank_dropout.0 > 0.0 {
            notes.push(format!("network_args `rank_dropout={}` is ignored, as LyCORIS' BOFT ignores it", rank_dropout.1));
            rank_dropout.0 = 0.0;
        }
        if constraint < 0.0 {
            notes.push(format!("network_args `constraint={constraint}`: LyCORIS constrains only with a positive value, so this is none (lora.constraint = 0)"));
        }
        (l.constraint, l.rescaled) = (constraint.max(0.0), rescaled);
    } else if constraint != 0.0 || rescaled {
        notes.push(format!("network_args constraint / rescaled are Diag-OFT's and BOFT's; LyCORIS ignores them with algo={algo}, and so does this trainer"));
    }
    // LyCORIS' rank dropout drops rows of ΔW, for a LoCon too (`lora.lycoris_rank_dropout`,
    // not kohya's rank components); in bypass mode a LoCon's drops rank components, one
    // mask per pass, which has no counterpart here.
    if rank_dropout.0 > 0.0 {
        if !l.algo.is_lycoris() {
            let what = format!("`rank_dropout={}` with algo={algo}", rank_dropout.1);
            if bypass {
                return Err(o.err("network_args", format!("{what} and bypass_mode: LyCORIS' bypass-mode rank dropout (rank components, one mask per pass) has no counterpart here; set one of them off")));
            }
            if l.dora {
                return Err(o.err("network_args", format!("{what} and dora_wd: LyCORIS' rank dropout of a DoRA LoCon is not trained here; set one of them off")));
            }
            l.lycoris_rank_dropout = true;
        }
        l.rank_dropout = rank_dropout.0;
    }
    if !l.algo.is_lycoris() {
        // Nothing to scale without LyCORIS' rank dropout.
        l.rank_dropout_scale &= l.lycoris_rank_dropout;
        if l.use_scalar {
            return Err(o.err("network_args", format!("`use_scalar=True` with algo={algo}: LyCORIS' trained scalar is trained here for loha and lokr; set it to False")));
        }
    }
    if lycoris_tucker(&args) {
        l.use_tucker = true;
        if args.iter().any(|(k, v)| k == "disable_conv_cp" && python_truthy(v)) {
            notes.push("network_args `disable_conv_cp`: LyCORIS takes its value as `use_tucker` (a deprecated name), so a true value turns Tucker convolutions on; lora.use_tucker = true trains the same".into());
        }
    }
    if l.algo == lora_core::Algo::Lokr {
        (l.lokr_factor, l.lokr_decompose_both) = (factor, decompose_both);
        (l.lokr_full_matrix, l.lokr_unbalanced_factorization) = (full_matrix, unbalanced);
        if full_matrix && l.rslora {
            notes.push("rs_lora with full_matrix: LyCORIS trains a LoKr whose halves are both full at scale sqrt(rank), which its files cannot record (readers apply 1); this trainer trains at 1, what the file then gives".into());
        }
        if decompose_both && args.iter().any(|(k, v)| k == "decompose_both" && !lycoris_bool(v)) {
            notes.push("network_args `decompose_both=False`: LyCORIS receives the string \"False\", which Python reads as true, so LoKr decomposes w1 where the rank is below half its size; lora.lokr_decompose_both = true trains the same".into());
        }
    }
    if l.algo != lora_core::Algo::Lokr && (full_matrix || unbalanced) {
        notes.push(format!("network_args full_matrix / unbalanced_factorization are LoKr's; LyCORIS ignores them with algo={algo}, and so does this trainer"));
    }
    if l.dora {
        if !wd_on_output {
            return Err(o.err("network_args", "`wd_on_output=False`: DoRA per input feature is not trained here"));
        }
        // LoHa's and LoKr's DoRA here is LyCORIS' own (the norm in the graph).
        if !l.algo.is_lycoris() {
            notes.push("dora_wd: LyCORIS' DoRA passes gradients through the norm of W + ΔW; lora.dora here treats that norm as a constant for a LoRA, as the DoRA paper and PEFT do (the same forward pass, slightly different gradients)".into());
        }
    }
    if loraplus.iter().any(|r| *r > 0.0) {
        if l.algo.is_lycoris() {
            notes.push(format!("loraplus_*: LyCORIS speeds up only parameters named lora_up, which a {algo} does not have; LoRA+ is off"));
        } else {
            [l.loraplus_lr_ratio, l.loraplus_unet_lr_ratio, l.loraplus_text_encoder_lr_ratio] = loraplus;
        }
    }
    // kohya passes network_dropout as LyCORIS' `dropout` unless network_args has one; only
    // LyCORIS' bypass mode applies it (to LoRA).
    let dropout = dropout.unwrap_or(l.network_dropout);
    l.network_dropout = 0.0;
    if dropout > 0.0 {
        if bypass && !l.algo.is_lycoris() {
            return Err(o.err("network_args", format!("dropout {dropout} (network_dropout or network_args' dropout) with bypass_mode: LyCORIS' LoRA dropout in bypass mode has no counterpart here; set it to 0")));
        }
        notes.push(format!("dropout {dropout} (network_dropout or network_args' dropout) is ignored, as LyCORIS ignores it outside its bypass mode"));
    }
    if l.dim_from_weights {
        // kohya then builds the network with LyCORIS' create_network_from_weights, which
        // reads no network_args: the file's modules, ranks and alphas, and no dropout.
        notes.push("dim_from_weights: LyCORIS builds the network from the file and reads no network_args (module_dropout, rank_dropout, rs_lora, LoRA+ and the preset are not used)".into());
        (l.module_dropout, l.rank_dropout, l.rslora) = (0.0, 0.0, false);
        [l.loraplus_lr_ratio, l.loraplus_unet_lr_ratio, l.loraplus_text_encoder_lr_ratio] = [0.0; 3];
    }
    // LyCORIS: 3x3 convolutions at conv_dim, which defaults to network_dim, if the preset
    // has any; conv_alpha defaults to network_alpha.
    let conv_dim = if preset.enables_conv() { conv_dim.unwrap_or(l.rank) } else { 0 };
    l.conv_alpha = conv_alpha.unwrap_or(l.alpha);
    if l.algo.is_lycoris_oft() {
        diag_oft_drops(l, &algo, notes);
    }
    if l.algo == lora_core::Algo::Ia3 && std::mem::take(&mut l.use_tucker) {
        notes.push("network_args use_tucker: LyCORIS' (IA)³ does not use it, and neither does this trainer".into());
    }
    if l.algo == lora_core::Algo::Full {
        let dropped = turn_off([(&mut l.dora, "dora_wd"), (&mut l.use_tucker, "use_tucker"), (&mut l.use_scalar, "use_scalar"), (&mut l.rslora, "rs_lora")]);
        if !dropped.is_empty() {
            notes.push(format!("network_args {}: LyCORIS' full module does not use them (it trains the whole weight and bias, with no rank or scale), and neither does this trainer", dropped.join(", ")));
        }
        notes.push("algo=full: network_dim and network_alpha are not used (each targeted layer's whole weight and bias train); weight decay pulls the trained difference toward 0 here, the whole weight in LyCORIS (see docs/lora-formats.md)".into());
    }
    if l.algo == lora_core::Algo::Glora {
        let dropped = turn_off([(&mut l.dora, "dora_wd"), (&mut l.use_tucker, "use_tucker")]);
        if !dropped.is_empty() {
            notes.push(format!("network_args {}: LyCORIS' GLoRA does not use them (it has no DoRA and never decomposes its convolutions), and neither does this trainer", dropped.join(", ")));
        }
    }
    if l.use_tucker && conv_dim == 0 {
        notes.push("use_tucker changes nothing here: the preset (or conv_dim = 0) leaves out the convolutions with a kernel larger than 1x1, which alone it decomposes, as in LyCORIS".into());
    }
    Ok(Network::Lycoris { preset, conv_dim })
}

/// What LyCORIS' (IA)³ module takes no notice of (rank dropout, DoRA, a scalar, Tucker,
/// rsLoRA; its rank and alpha), turned off with a note; its scale is on the feed-forward
/// outputs' inputs with LyCORIS' `ia3` preset only (which LyCORIS recommends: a note).
fn ia3_drops(l: &mut crate::config::LoraSection, rank_dropout: &mut f64, preset: LycorisPreset, notes: &mut Vec<String>) {
    let mut dropped = Vec::new();
    if std::mem::take(rank_dropout) > 0.0 {
        dropped.push("rank_dropout");
    }
    dropped.extend(turn_off([(&mut l.dora, "dora_wd"), (&mut l.use_scalar, "use_scalar"), (&mut l.rslora, "rs_lora")]));
    if !dropped.is_empty() {
        notes.push(format!("network_args {}: LyCORIS' (IA)³ does not use them, and neither does this trainer", dropped.join(", ")));
    }
    notes.push("algo=ia3: network_dim, network_alpha and conv_dim / conv_alpha are not used (one trained scale per channel)".into());
    if preset != LycorisPreset::Ia3 {
        // LyCORIS' `train_on_input` comes from the `ia3` preset alone.
        l.ia3_on_input.clear();
        notes.push("algo=ia3 without preset=ia3 (LyCORIS warns that the ia3 preset is recommended): every layer's scale is per output channel".into());
    }
}

/// Turns off each set flag of `flags` (a setting and its `network_args` name) and returns
/// the names of those that were on, for a note that the algorithm does not use them.
fn turn_off<const N: usize>(flags: [(&mut bool, &'static str); N]) -> Vec<&'static str> {
    flags.into_iter().filter_map(|(on, what)| std::mem::take(on).then_some(what)).collect()
}

/// LyCORIS' `train_norm` as it applies: norm modules in the UNet's targeted blocks (the
/// text encoders' presets reach no norm layer). A preset that reaches none (`attn-only`,
/// `ia3`, or no UNet training) trains none, as in LyCORIS, with a note; a rank dropout,
/// which LyCORIS applies to norm modules inverted, is not theirs here (a note).
fn norm_targets(l: &mut crate::config::LoraSection, notes: &mut Vec<String>) {
    if !l.train_norm {
        return;
    }
    let probe = ["down_blocks.1.attentions.0.norm", "down_blocks.1.resnets.0.norm1"];
    let selection = sd_model::targets::Selection::new(l.unet_targets).include(l.include.clone()).exclude(l.exclude.clone()).with_norms(true);
    if !probe.iter().any(|p| selection.selects_norm(p)) {
        notes.push("train_norm=True: the preset (with these learning rates) reaches no norm layer, so none trains, as in LyCORIS (lora.train_norm is off)".into());
        l.train_norm = false;
        return;
    }
    if l.rank_dropout > 0.0 {
        notes.push(format!("train_norm=True with rank_dropout={}: LyCORIS' norm modules keep a channel's update where a draw falls below the rate (dropping most of them); here norm modules take module dropout only", l.rank_dropout));
    }
}

/// What LyCORIS' Diag-OFT and BOFT modules (`algo`) take no notice of (they have no DoRA,
/// scalar, Tucker form or rsLoRA scale), turned off with a note; their constraint stands
/// for `network_alpha`.
fn diag_oft_drops(l: &mut crate::config::LoraSection, algo: &str, notes: &mut Vec<String>) {
    let dropped = turn_off([(&mut l.dora, "dora_wd"), (&mut l.use_scalar, "use_scalar"), (&mut l.use_tucker, "use_tucker"), (&mut l.rslora, "rs_lora")]);
    if !dropped.is_empty() {
        notes.push(format!("network_args {}: LyCORIS' {algo} does not use them, and neither does this trainer", dropped.join(", ")));
    }
    notes.push(format!("algo={algo}: network_dim {} is the block size (conv_dim that of 3x3 convolutions), network_alpha is not used, the constraint per output is {}", l.rank, if l.constraint > 0.0 { l.constraint.to_string() } else { "none (constraint=0)".into() }));
}

/// A LyCORIS preset's targets, for the models that train (UNet and text encoders whose
/// targets are not `none`), with 3x3 convolutions at `conv_dim` (0: none).
///
/// LyCORIS names `conv_in`, `conv_out` and the time embedding's layers by kohya's UNet's
/// module names, which are diffusers' for SD 1.x / 2.x only: on SDXL (`sdxl`) its presets
/// reach none of them. Where the model's family is not known (`None`: no model at the
/// path), they are included, with a note.
fn lycoris_targets(l: &mut crate::config::LoraSection, preset: LycorisPreset, conv_dim: usize, sdxl: Option<bool>, notes: &mut Vec<String>) {
    use LycorisPreset as P;
    if l.text_encoder_targets != TextEncoderTargets::None {
        l.text_encoder_targets = match preset {
            P::Full | P::FullLin | P::AttnMlp => TextEncoderTargets::AttnMlp,
            P::AttnOnly => TextEncoderTargets::Attn,
            P::UnetOnly | P::UnetTransformerOnly | P::UnetConvblockOnly => TextEncoderTargets::None,
            P::Ia3 => TextEncoderTargets::Ia3,
        };
    }
    if l.unet_targets == UnetTargets::None {
        return;
    }
    let no_3x3 = ["*.resnets.*.conv1", "*.resnets.*.conv2", "*samplers.*.conv"].map(String::from);
    let time = ["time_embedding.linear_1", "time_embedding.linear_2"].map(String::from);
    let outer = ["conv_in", "conv_out"].map(String::from);
    l.unet_targets = match preset {
        P::AttnMlp | P::UnetTransformerOnly => UnetTargets::AttnMlp,
        P::AttnOnly => UnetTargets::Attn,
        P::Full | P::FullLin | P::UnetOnly | P::UnetConvblockOnly => UnetTargets::Conv,
        P::Ia3 => UnetTargets::Ia3,
    };
    let named = sdxl != Some(true);
    let before = l.include.len();
    if named && matches!(preset, P::Full | P::FullLin | P::UnetOnly) {
        l.include.extend(time);
    }
    if preset == P::UnetConvblockOnly {
        l.exclude.push("*.attentions.*".into());
    }
    if l.unet_targets == UnetTargets::Conv {
        if conv_dim > 0 {
            l.conv_rank = conv_dim;
            if named && preset != P::FullLin {
                l.include.extend(outer);
            }
        } else {
            l.exclude.extend(no_3x3);
        }
    }
    if sdxl.is_none() && l.include.len() > before {
        notes.push(format!(
            "the model's family is not known here: LyCORIS' preset adds {} on SD 1.x / 2.x only (kohya's SDXL UNet names them otherwise); remove them from lora.include for an SDXL model",
            l.include[before..].join(", ")
        ));
    }
}

/// networks.lora's targets beyond the transformer blocks: the ResNet blocks and samplers
/// join when `conv_dim` is set (at 0 their linear and 1x1 layers train, at network_dim, and
/// their 3x3 convolutions do not) or when block-wise settings give `conv_block_dims`, which
/// networks.lora reads only with `block_dims` or a block learning-rate weight.
fn conv_targets(l: &mut crate::config::LoraSection, conv_dim: Option<usize>, notes: &mut Vec<String>) {
    let block_wise = [&l.block_dims, &l.down_lr_weight, &l.mid_lr_weight, &l.up_lr_weight].iter().any(|v| !v.trim().is_empty());
    let conv_blocks = !l.conv_block_dims.is_empty() || !l.conv_block_alphas.is_empty();
    if conv_blocks && !block_wise {
        notes.push("conv_block_dims / conv_block_alphas without block_dims or a block learning-rate weight are ignored, as networks.lora ignores them".into());
        (l.conv_block_dims, l.conv_block_alphas) = (String::new(), String::new());
    }
    if !l.block_alphas.trim().is_empty() && !block_wise {
        notes.push("block_alphas without block_dims or a block learning-rate weight is ignored, as networks.lora ignores it (every layer trains at network_alpha)".into());
        l.block_alphas = String::new();
    }
    if l.unet_targets == UnetTargets::None {
        // No UNet adapters (a learning rate of 0, or text-encoder-only training).
        (l.conv_block_dims, l.conv_block_alphas) = (String::new(), String::new());
        return;
    }
    if conv_dim.is_none() && l.conv_block_dims.trim().is_empty() {
        return;
    }
    l.unet_targets = UnetTargets::Conv;
    l.conv_rank = conv_dim.unwrap_or(0);
    if conv_dim == Some(0) && l.conv_block_dims.trim().is_empty() {
        l.exclude.extend(["*.resnets.*.conv1", "*.resnets.*.conv2", "*samplers.*.conv"].map(String::from));
    }
}

/// `initial_step` / `initial_epoch` (a run that starts part-way, e.g. from an earlier
/// run's LoRA in `network_weights`) and `skip_until_initial_step`, which sd-scripts needs
/// to place the data where the step is; here the place in the data always follows the
/// step, and the learning-rate schedule does too.
fn read_initial_step(o: &mut Options, t: &mut crate::config::TrainSection, notes: &mut Vec<String>) -> Result<(), TrainError> {
    t.initial_step = o.count("initial_step")?.unwrap_or(0);
    // sd-scripts counts epochs from 1 and reads 0 as "not set", as here.
    t.initial_epoch = o.count("initial_epoch")?.unwrap_or(0);
    let skip = o.flag("skip_until_initial_step")?;
    let key = match (t.initial_step, t.initial_epoch) {
        (0, 0 | 1) => return Ok(()),
        (0, _) => "initial_epoch",
        _ => "initial_step",
    };
    notes.push(match skip {
        true => format!("{key}: the run starts at that step and place in the data, as sd-scripts' with skip_until_initial_step, but its learning-rate schedule starts there too (sd-scripts restarts its scheduler from step 0 unless it resumes a state)"),
        false => format!("{key}: the run starts at that step: the step count, the place in the data and the learning-rate schedule go on from there (sd-scripts, without skip_until_initial_step, starts at the first batch of that step's epoch, counts steps from 0 and restarts its scheduler)"),
    });
    Ok(())
}

/// sd-scripts' `resume`: a training state folder its `save_state` wrote (accelerate's
/// `save_state` with sd-scripts' hooks): the network's weights in `model.safetensors` and
/// the optimizer steps done in `train_state.json`'s `current_step`. The run continues
/// from that LoRA (`lora.network_weights`) at that step (`train.initial_step`, unless
/// `initial_step` / `initial_epoch` are set, which sd-scripts also prefers); the
/// optimizer's moments (`optimizer.bin`), the random states and the data order are
/// sd-scripts' own and start afresh.
fn read_resume(o: &mut Options, c: &mut TrainConfig, notes: &mut Vec<String>) -> Result<(), TrainError> {
    let Some(dir) = o.string("resume")? else { return Ok(()) };
    let dir = Path::new(&dir);
    if !dir.is_dir() {
        return Err(o.err("resume", format!("= \"{}\" is not a folder here (sd-scripts' save_state folder, `...-state`)", dir.display())));
    }
    let weights = dir.join("model.safetensors");
    if !weights.is_file() {
        let found = ["pytorch_model.bin", "model.bin"].iter().find(|f| dir.join(f).is_file());
        let why = match found {
            Some(f) => format!("has the network's weights as a PyTorch pickle, {f} (an older accelerate); load it in Python and save it with safetensors as model.safetensors"),
            None => "has no model.safetensors (the network's weights in an sd-scripts state)".into(),
        };
        return Err(o.err("resume", format!("= \"{}\" {why}", dir.display())));
    }
    if !c.lora.network_weights.is_empty() {
        notes.push(format!("resume: the state's weights replace network_weights = \"{}\", as sd-scripts loads the state over them", c.lora.network_weights));
    }
    c.lora.network_weights = weights.display().to_string();
    let state_file = dir.join("train_state.json");
    let step = match std::fs::read_to_string(&state_file) {
        Ok(text) => {
            let state: serde_json::Value = serde_json::from_str(&text).map_err(|e| o.err("resume", format!("{}: not JSON: {e}", state_file.display())))?;
            let step = state.get("current_step").and_then(serde_json::Value::as_u64);
            Some(step.ok_or_else(|| o.err("resume", format!("{}: expected a whole number `current_step`, found {text}", state_file.display())))? as usize)
        }
        Err(_) => None,
    };
    let t = &mut c.train;
    let at = match step {
        _ if t.initial_step > 0 || t.initial_epoch > 1 => "at initial_step / initial_epoch, which sd-scripts also puts before the state's step".to_string(),
        Some(step) => {
            t.initial_step = step;
            format!("at its step {step} (train.initial_step), with the learning-rate schedule there")
        }
        None => "at step 0: it has no train_state.json (sd-scripts before it recorded its step); set train.initial_step to the step it was saved at".into(),
    };
    notes.push(format!(
        "resume: continues from the state's LoRA ({}) {at}; its optimizer moments (optimizer.bin), random states and data order are not read: the optimizer's moments start at zero",
        weights.display()
    ));
    Ok(())
}

/// The training options; returns the dtype of sd-scripts' `full_fp16` / `full_bf16`
/// networks, which their files keep when `save_precision` is unset, and the
/// `lr_scheduler` as written (`adafactor` is checked with the optimizer).
fn read_training(o: &mut Options, c: &mut TrainConfig, notes: &mut Vec<String>) -> Result<(Option<lora_core::SaveDtype>, String), TrainError> {
    let t = &mut c.train;
    t.max_train_steps = o.count("max_train_steps")?.unwrap_or(1600);
    t.max_train_epochs = o.count("max_train_epochs")?.unwrap_or(0);
    read_initial_step(o, t, notes)?;
    t.train_batch_size = o.count("train_batch_size")?.unwrap_or(1);
    t.gradient_accumulation_steps = o.count("gradient_accumulation_steps")?.unwrap_or(1);

    // Learning rates: `unet_lr` / `text_encoder_lr` fall back on `learning_rate`, and an lr of
    // 0 leaves that model untrained (kohya drops its parameter groups).
    let default_lr = o.float("learning_rate")?.unwrap_or(2e-6);
    let unet_lr = o.float("unet_lr")?.unwrap_or(default_lr);
    let te_lr = read_text_encoder_lr(o, notes)?.unwrap_or(default_lr);
    if unet_lr == 0.0 {
        c.lora.unet_targets = UnetTargets::None;
    }
    if te_lr == 0.0 {
        c.lora.text_encoder_targets = TextEncoderTargets::None;
    }
    if c.lora.unet_targets == UnetTargets::None && c.lora.text_encoder_targets == TextEncoderTargets::None && !c.embedding.enabled() {
        return Err(o.err("learning_rate", "/ unet_lr / text_encoder_lr (with network_train_unet_only / network_train_text_encoder_only) leave nothing to train"));
    }
    t.learning_rate = if unet_lr > 0.0 { unet_lr } else { te_lr };
    t.text_encoder_lr = if te_lr > 0.0 { te_lr } else { 0.0 };

    let scheduler = read_schedule(o, t, notes)?;
    t.max_grad_norm = o.float("max_grad_norm")?.unwrap_or(1.0) as f32;
    t.scale_weight_norms = o.float("scale_weight_norms")?.unwrap_or(0.0);
    t.mixed_precision = match o.string("mixed_precision")?.as_deref() {
        None | Some("no") => MixedPrecision::No,
        Some("fp16") => MixedPrecision::Fp16,
        Some("bf16") => MixedPrecision::Bf16,
        Some(other) => return Err(o.err("mixed_precision", format!("= \"{other}\": expected \"no\", \"fp16\" or \"bf16\""))),
    };
    let mut full = None;
    for (key, dtype, save) in [("full_fp16", "fp16", lora_core::SaveDtype::F16), ("full_bf16", "bf16", lora_core::SaveDtype::Bf16)] {
        if o.flag(key)? {
            notes.push(format!("{key}: the adapters keep f32 master weights here (the frozen model runs in {dtype} with mixed_precision = \"{dtype}\")"));
            full = Some(save);
        }
    }
    for key in ["fp8_base", "fp8_base_unet"] {
        if o.flag(key)? {
            notes.push(format!("{key}: there are no fp8 weights here; the frozen model runs in mixed_precision's dtype"));
        }
    }
    t.gradient_checkpointing = o.flag("gradient_checkpointing")?;
    t.min_snr_gamma = o.float("min_snr_gamma")?.unwrap_or(0.0);
    t.noise_offset = o.float("noise_offset")?.unwrap_or(0.0);
    t.noise_offset_random_strength = o.flag("noise_offset_random_strength")?;
    t.adaptive_noise_scale = o.float("adaptive_noise_scale")?.unwrap_or(0.0);
    t.multires_noise_iterations = o.count("multires_noise_iterations")?.unwrap_or(0);
    t.multires_noise_discount = o.float("multires_noise_discount")?.unwrap_or(0.3);
    t.ip_noise_gamma = o.float("ip_noise_gamma")?.unwrap_or(0.0);
    t.ip_noise_gamma_random_strength = o.flag("ip_noise_gamma_random_strength")?;
    t.debiased_estimation_loss = o.flag("debiased_estimation_loss")?;
    t.scale_v_pred_loss_like_noise_pred = o.flag("scale_v_pred_loss_like_noise_pred")?;
    t.v_pred_like_loss = o.float("v_pred_like_loss")?.unwrap_or(0.0);
    // sd-scripts trains on its own schedule, rescaled only with this flag, whatever the
    // model: set it either way so a zero-terminal-SNR model's own setting does not apply.
    t.zero_terminal_snr = Some(o.flag("zero_terminal_snr")?);
    t.loss_type = match o.string("loss_type")?.as_deref() {
        None | Some("l2") => LossKind::L2,
        Some("l1") => LossKind::L1,
        Some("huber") => LossKind::Huber,
        Some("smooth_l1") => LossKind::SmoothL1,
        Some(other) => return Err(o.err("loss_type", format!("= \"{other}\": expected l2, l1, huber or smooth_l1"))),
    };
    t.huber_schedule = match o.string("huber_schedule")?.as_deref() {
        None | Some("snr") => HuberScheduleKind::Snr,
        Some("exponential") => HuberScheduleKind::Exponential,
        Some("constant") => HuberScheduleKind::Constant,
        Some(other) => return Err(o.err("huber_schedule", format!("= \"{other}\": expected snr, exponential or constant"))),
    };
    t.huber_c = o.float("huber_c")?.unwrap_or(0.1);
    t.huber_scale = o.float("huber_scale")?.unwrap_or(1.0);
    t.min_timestep = o.count("min_timestep")?.unwrap_or(0);
    t.max_timestep = o.count("max_timestep")?.unwrap_or(1000);
    match o.count("seed")? {
        Some(seed) => t.seed = seed as u64,
        None => notes.push(format!("seed is not set (sd-scripts then draws one): {} is used", t.seed)),
    }
    Ok((full, scheduler))
}

/// The learning-rate schedule: `lr_scheduler` and its options, or `lr_scheduler_type`'s
/// PyTorch scheduler with `lr_scheduler_args`; returns the schedule's name as written.
fn read_schedule(o: &mut Options, t: &mut crate::config::TrainSection, notes: &mut Vec<String>) -> Result<String, TrainError> {
    let scheduler = o.string("lr_scheduler")?.unwrap_or_else(|| "constant".into());
    // sd-scripts gives a schedule-free optimizer a constant rate before it looks at the
    // schedule's options (`get_scheduler_fix`): none of them is an error then.
    let schedule_free = o.values.get("optimizer_type").and_then(|v| v.as_str()).is_some_and(|name| name.to_ascii_lowercase().ends_with("schedulefree"));
    if schedule_free {
        for key in ["lr_scheduler_type", "lr_scheduler_args"] {
            if o.take(key).is_some() {
                notes.push(format!("{key}: sd-scripts ignores it with a schedule-free optimizer, and so does this trainer"));
            }
        }
    }
    // The newer schedules' options (`lr_scheduler_min_lr_ratio` is read with the optimizer:
    // Adafactor's relative step replaces the schedule first); PyTorch's schedulers ignore them.
    t.lr_scheduler_timescale = o.count("lr_scheduler_timescale")?.unwrap_or(0);
    (t.lr_decay_steps, t.lr_decay_ratio) = o.steps_or_share("lr_decay_steps")?.unwrap_or((0, 0.0));
    t.lr_cycles = o.count("lr_scheduler_num_cycles")?.unwrap_or(1);
    t.lr_scheduler_power = o.float("lr_scheduler_power")?.unwrap_or(1.0);
    // `lr_scheduler_type` (a PyTorch class) replaces `lr_scheduler`, as in sd-scripts.
    let torch_type = if schedule_free { None } else { o.string("lr_scheduler_type")? };
    let scheduler_args = if schedule_free { Vec::new() } else { o.list("lr_scheduler_args")? };
    if let Some(class) = torch_type {
        t.lr_scheduler = torch_scheduler(o, &class)?;
        let name = crate::config::scheduler_name(t.lr_scheduler);
        if scheduler != "constant" {
            notes.push(format!("lr_scheduler = \"{scheduler}\" is replaced by lr_scheduler_type = \"{class}\", as in sd-scripts"));
        }
        t.lr_scheduler_args = scheduler_arguments(o, &scheduler_args, &name, notes)?;
        (t.lr_warmup_steps, t.lr_warmup_ratio) = o.steps_or_share("lr_warmup_steps")?.unwrap_or((0, 0.0));
        if t.lr_warmup_steps > 0 || t.lr_warmup_ratio > 0.0 {
            return Err(o.err("lr_warmup_steps", format!("must be 0 with lr_scheduler_type = \"{class}\" (sd-scripts refuses a warmup there)")));
        }
        t.torch_schedule().map_err(|e| o.err("lr_scheduler_args", scheduler_error(e)))?;
        return Ok(name);
    }
    if scheduler == "piecewise_constant" && !schedule_free {
        t.lr_scheduler = LrScheduler::PiecewiseConstant;
        t.lr_scheduler_args = scheduler_arguments(o, &scheduler_args, &scheduler, notes)?;
        (t.lr_warmup_steps, t.lr_warmup_ratio) = (0, 0.0);
        if o.steps_or_share("lr_warmup_steps")?.is_some_and(|w| w != (0, 0.0)) {
            notes.push("lr_warmup_steps with lr_scheduler = \"piecewise_constant\": sd-scripts ignores the warmup there, and so does this trainer".into());
        }
        t.torch_schedule().map_err(|e| o.err("lr_scheduler_args", scheduler_error(e)))?;
        return Ok(scheduler);
    }
    if !scheduler_args.is_empty() {
        return Err(o.err("lr_scheduler_args", format!("= {scheduler_args:?}: arguments are taken by lr_scheduler = \"piecewise_constant\" and lr_scheduler_type's PyTorch schedulers here, not by lr_scheduler = \"{scheduler}\" (whose settings are the lr_scheduler_* options)")));
    }
    t.lr_scheduler = match scheduler.as_str() {
        _ if schedule_free => LrScheduler::Constant,
        // `adafactor` (Adafactor's relative step) is checked with the optimizer.
        "constant" | "constant_with_warmup" | "adafactor" => LrScheduler::Constant,
        "linear" => LrScheduler::Linear,
        "cosine" => LrScheduler::Cosine,
        "cosine_with_restarts" => LrScheduler::CosineWithRestarts,
        "polynomial" => LrScheduler::Polynomial,
        "cosine_with_min_lr" => LrScheduler::CosineWithMinLr,
        "inverse_sqrt" => LrScheduler::InverseSqrt,
        "warmup_stable_decay" => LrScheduler::WarmupStableDecay,
        other => {
            return Err(o.err(
                "lr_scheduler",
                format!("= \"{other}\" is not supported (constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial, cosine_with_min_lr, inverse_sqrt, warmup_stable_decay, piecewise_constant and, with Adafactor, adafactor are; PyTorch's schedulers through lr_scheduler_type)"),
            ))
        }
    };
    (t.lr_warmup_steps, t.lr_warmup_ratio) = o.steps_or_share("lr_warmup_steps")?.unwrap_or((0, 0.0));
    if scheduler == "constant" && !schedule_free && (t.lr_warmup_steps > 0 || t.lr_warmup_ratio > 0.0) {
        notes.push("lr_scheduler = \"constant\" with warmup (sd-scripts refuses warmup there): trained as constant_with_warmup".into());
    }
    Ok(scheduler)
}

/// `lr_scheduler_type`'s class: one of PyTorch's step-wise schedulers, by its name or
/// its `torch.optim.lr_scheduler.` path.
fn torch_scheduler(o: &Options, class: &str) -> Result<LrScheduler, TrainError> {
    let name = class.trim().strip_prefix("torch.optim.lr_scheduler.").unwrap_or(class.trim());
    let why = match name {
        "CosineAnnealingLR" => return Ok(LrScheduler::CosineAnnealingLr),
        "CosineAnnealingWarmRestarts" => return Ok(LrScheduler::CosineAnnealingWarmRestarts),
        "StepLR" => return Ok(LrScheduler::StepLr),
        "MultiStepLR" => return Ok(LrScheduler::MultiStepLr),
        "ExponentialLR" => return Ok(LrScheduler::ExponentialLr),
        "LinearLR" => return Ok(LrScheduler::LinearLr),
        "ConstantLR" => return Ok(LrScheduler::ConstantLr),
        "PolynomialLR" => return Ok(LrScheduler::PolynomialLr),
        "LambdaLR" | "MultiplicativeLR" | "SequentialLR" | "ChainedScheduler" => "it takes Python functions or other schedulers, which a config file cannot give",
        "ReduceLROnPlateau" => "it needs a metric each step, which sd-scripts does not give it",
        "CyclicLR" | "OneCycleLR" => "it also cycles the optimizer's momentum (β₁), which this trainer keeps fixed",
        _ if name.contains('.') => "only PyTorch's own schedulers are (a Python module cannot run here)",
        _ => "it is not one of PyTorch's schedulers",
    };
    Err(o.err(
        "lr_scheduler_type",
        format!("= \"{class}\" is not supported: {why}; CosineAnnealingLR, CosineAnnealingWarmRestarts, StepLR, MultiStepLR, ExponentialLR, LinearLR, ConstantLR and PolynomialLR are"),
    ))
}

/// `lr_scheduler_args` (`KEY=VALUE`, values as Python literals) by PyTorch's names; the
/// scheduler checks which ones it takes.
fn scheduler_arguments(o: &Options, entries: &[String], scheduler: &str, notes: &mut Vec<String>) -> Result<crate::config::LrSchedulerArgs, TrainError> {
    let mut args = crate::config::LrSchedulerArgs::default();
    for (key, value) in key_values(entries, "lr_scheduler_args", &o.origin)? {
        let bad = |what: &str| o.err("lr_scheduler_args", format!("`{key}={value}`: {what}"));
        let number = || match PyValue::parse(&value) {
            PyValue::Number(v) => Ok(v),
            _ => Err(bad("expected a number")),
        };
        let whole = || number().and_then(|v| whole_number(v).ok_or_else(|| bad("expected a whole number of at least 0")));
        match key.as_str() {
            "T_max" => args.t_max = Some(whole()?),
            "T_0" => args.t_0 = Some(whole()?),
            "T_mult" => args.t_mult = Some(whole()?),
            "step_size" => args.step_size = Some(whole()?),
            "total_iters" => args.total_iters = Some(whole()?),
            "eta_min" => args.eta_min = Some(number()?),
            "gamma" => args.gamma = Some(number()?),
            "start_factor" => args.start_factor = Some(number()?),
            "end_factor" => args.end_factor = Some(number()?),
            "factor" => args.factor = Some(number()?),
            "power" => args.power = Some(number()?),
            "milestones" => {
                let inner = value.trim().trim_start_matches(['[', '(']).trim_end_matches([']', ')']);
                let steps = inner.split(',').map(str::trim).filter(|p| !p.is_empty()).map(|p| p.parse::<usize>()).collect::<Result<Vec<_>, _>>();
                args.milestones = Some(steps.map_err(|_| bad("expected a list of steps, e.g. [500,800]"))?);
            }
            "step_rules" => match PyValue::parse(&value) {
                PyValue::Text(rules) => args.step_rules = Some(rules),
                _ => return Err(bad("expected rules such as '1:100,0.5:200,0.1'")),
            },
            "last_epoch" if number().is_ok_and(|v| v == -1.0) => {}
            "last_epoch" => return Err(bad("starting a schedule part-way is not supported (leave it at -1)")),
            "verbose" => notes.push(format!("lr_scheduler_args `{key}` only prints the rates in PyTorch; ignored")),
            _ => return Err(bad(&format!("not an argument of {scheduler} this trainer knows"))),
        }
    }
    Ok(args)
}

/// A schedule's error as the import reports it (its own text, not the config key).
fn scheduler_error(e: TrainError) -> String {
    match e {
        TrainError::Config { reason, .. } => format!("{reason} (sd-scripts' lr_scheduler_args = [\"KEY=VALUE\", ...])"),
        other => other.to_string(),
    }
}

/// `text_encoder_lr`: one number, or a list of one per text encoder (SDXL), of which
/// networks.lora uses the first.
fn read_text_encoder_lr(o: &mut Options, notes: &mut Vec<String>) -> Result<Option<f64>, TrainError> {
    let lrs = o.numbers("text_encoder_lr")?;
    // networks.lora takes the first for every text encoder.
    if lrs.iter().any(|lr| *lr != lrs[0]) {
        notes.push(format!("text_encoder_lr = {lrs:?}: networks.lora trains every text encoder at the first, {}, and so does this trainer", lrs[0]));
    }
    Ok(lrs.first().copied())
}

fn read_optimizer(o: &mut Options, c: &mut TrainConfig, scheduler: &str, notes: &mut Vec<String>) -> Result<(), TrainError> {
    let named = o.string("optimizer_type")?;
    let use_8bit_adam = o.flag("use_8bit_adam")?;
    let use_lion = o.flag("use_lion_optimizer")?;
    let name = named.unwrap_or_else(|| {
        if use_lion {
            "Lion".into()
        } else if use_8bit_adam {
            "AdamW8bit".into()
        } else {
            "AdamW".into()
        }
    });
    // sd-scripts also takes a class path, e.g. `bitsandbytes.optim.AdamW8bit`.
    let short = name.rsplit('.').next().unwrap_or(&name).to_ascii_lowercase();
    let bitsandbytes = name.to_ascii_lowercase().starts_with("bitsandbytes.");
    let t = &mut c.train;
    let (optimizer, quantized) = match short.as_str() {
        "adamw" => (Optimizer::Adamw, false),
        "adamw8bit" | "pagedadamw8bit" | "pagedadamw" | "pagedadamw32bit" => (Optimizer::Adamw, true),
        "lion" => (Optimizer::Lion, false),
        "lion8bit" | "pagedlion8bit" => (Optimizer::Lion, true),
        "prodigy" => (Optimizer::Prodigy, false),
        "adafactor" => (Optimizer::Adafactor, false),
        "dadaptadam" => (Optimizer::DadaptAdam, false),
        // sd-scripts' `DAdaptation` is the package's experimental DAdaptAdamPreprint.
        "dadaptation" | "dadaptadampreprint" => (Optimizer::DadaptAdamPreprint, false),
        "dadaptlion" => (Optimizer::DadaptLion, false),
        "dadaptsgd" => (Optimizer::DadaptSgd, false),
        "dadaptadagrad" => (Optimizer::DadaptAdagrad, false),
        "dadaptadan" => (Optimizer::DadaptAdan, false),
        "adamwschedulefree" => (Optimizer::AdamwScheduleFree, false),
        "radamschedulefree" => (Optimizer::RadamScheduleFree, false),
        "sgdschedulefree" => (Optimizer::SgdScheduleFree, false),
        "prodigyplusschedulefree" => (Optimizer::ProdigyPlusScheduleFree, false),
        // The came-pytorch package's; other packages' CAMEs (pytorch_optimizer's, the
        // LoRA_Easy_Training_Scripts' one) differ in their options.
        "came" if matches!(name.trim().to_ascii_lowercase().as_str(), "came_pytorch.came" | "came_pytorch.came.came") => (Optimizer::Came, false),
        "sgdnesterov" => (Optimizer::Sgd, false),
        "sgdnesterov8bit" => (Optimizer::Sgd, true),
        // sd-scripts looks a bare class name up in torch.optim: `SGD` is PyTorch's.
        "sgd" if !name.contains('.') || name.to_ascii_lowercase().starts_with("torch.optim.") => (Optimizer::Sgd, false),
        "sgd" | "sgd8bit" | "sgd32bit" if bitsandbytes => (Optimizer::Sgd, true),
        "ademamix" | "ademamix8bit" | "ademamix32bit" | "pagedademamix" | "pagedademamix8bit" | "pagedademamix32bit" if bitsandbytes => (Optimizer::Ademamix, short != "ademamix" && short != "ademamix32bit"),
        "ademamix" | "ademamix8bit" | "ademamix32bit" | "pagedademamix" | "pagedademamix8bit" | "pagedademamix32bit" => {
            return Err(o.err("optimizer_type", format!("= \"{name}\": sd-scripts looks a name without a module up in torch.optim, which has no AdEMAMix; write \"bitsandbytes.optim.{}\"", name.rsplit('.').next().unwrap_or(&name))));
        }
        _ => {
            return Err(o.err(
                "optimizer_type",
                format!("= \"{name}\" is not supported: AdamW (also AdamW8bit and the paged variants), Lion (and Lion8bit), Prodigy, Adafactor, DAdaptAdam, DAdaptation (DAdaptAdamPreprint), DAdaptLion, DAdaptSGD, DAdaptAdaGrad, DAdaptAdan, AdamWScheduleFree, RAdamScheduleFree, SGDScheduleFree, prodigyplus.ProdigyPlusScheduleFree, came_pytorch.CAME, bitsandbytes.optim.AdEMAMix (and its 8-bit and paged variants), SGDNesterov (and SGDNesterov8bit) and torch.optim.SGD are"),
            ))
        }
    };
    if quantized {
        notes.push(format!("optimizer_type = \"{name}\": the same update with f32 moments (a LoRA's optimizer state is small; no 8-bit or paged state here)"));
    }
    t.optimizer = optimizer;
    // Each package's defaults: torch / bitsandbytes AdamW and AdEMAMix decay 0.01,
    // transformers' AdamW, Lion, Prodigy, Adafactor, DAdaptAdam and SGD none.
    t.adam_weight_decay = match optimizer {
        Optimizer::Adamw if !name.starts_with("transformers.") => 0.01,
        Optimizer::Ademamix => 0.01,
        _ => 0.0,
    };
    if optimizer == Optimizer::Ademamix {
        (t.adam_beta1, t.adam_beta2, t.adam_epsilon, t.ademamix_beta3, t.ademamix_alpha) = (0.9, 0.999, 1e-8, 0.9999, 5.0);
    }
    if optimizer == Optimizer::Sgd {
        // sd-scripts' SGDNesterov sets momentum 0.9 and Nesterov (its 8-bit one too, but
        // bitsandbytes' momentum kernel ignores `nesterov`); PyTorch's SGD has neither.
        let nesterov_named = short.starts_with("sgdnesterov");
        (t.sgd_momentum, t.sgd_dampening, t.sgd_nesterov) = (if nesterov_named { 0.9 } else { 0.0 }, 0.0, short == "sgdnesterov");
        if quantized && nesterov_named {
            notes.push(format!("optimizer_type = \"{name}\": sd-scripts passes nesterov=True to bitsandbytes' SGD8bit, whose kernel ignores it and takes plain momentum; so does this import (train.sgd_nesterov = false)"));
        }
    }
    if optimizer == Optimizer::SgdScheduleFree {
        // SGDScheduleFree's default momentum.
        t.sgd_momentum = 0.9;
    }
    if optimizer.dadapt_kind().is_some() {
        // dadaptation's defaults: weight decay added to the gradient (DAdaptAdam,
        // DAdaptAdamPreprint; DAdaptLion's is always decoupled), DAdaptLion's betas, no
        // momentum.
        (t.dadapt_decouple, t.dadapt_momentum, t.lion_beta1, t.lion_beta2) = (false, 0.0, 0.9, 0.99);
        match optimizer {
            Optimizer::DadaptAdagrad => t.adam_epsilon = 1e-6,
            Optimizer::DadaptAdan => {
                (t.adam_beta1, t.adam_beta2, t.dadapt_beta3, t.dadapt_no_prox) = (0.98, 0.92, 0.99, false);
                t.adam_weight_decay = 0.02;
            }
            _ => {}
        }
    }
    if optimizer == Optimizer::Adafactor {
        // transformers' Adafactor defaults, with sd-scripts' explicit `relative_step = True`.
        (t.adafactor_relative_step, t.adafactor_scale_parameter, t.adafactor_warmup_init) = (true, true, false);
    }
    // sd-scripts replaces the schedule of a schedule-free optimizer with a constant rate
    // (its dummy scheduler): `lr_scheduler` and `lr_warmup_steps` do nothing, and
    // AdamWScheduleFree's own `warmup_steps` argument warms up.
    let kohya_warmup = (t.lr_warmup_steps, t.lr_warmup_ratio);
    if optimizer.is_schedule_free() {
        (t.lr_scheduler, t.lr_warmup_steps, t.lr_warmup_ratio) = (LrScheduler::Constant, 0, 0.0);
    }
    let args = o.list("optimizer_args")?;
    for (key, value) in key_values(&args, "optimizer_args", &o.origin)? {
        let bad = |what: &str| o.err("optimizer_args", format!("`{key}={value}`: {what}"));
        let py = PyValue::parse(&value);
        let number = || match py {
            PyValue::Number(v) => Ok(v),
            _ => Err(bad("expected a number")),
        };
        let flag = || match py {
            PyValue::Bool(b) => Ok(b),
            _ => Err(bad("expected True or False")),
        };
        if optimizer == Optimizer::ProdigyPlusScheduleFree {
            let mut settings = t.prodigy_plus_settings();
            prodigy_plus_arg(&mut settings, &key, &py).map_err(|what| bad(&what))?;
            t.set_prodigy_plus_settings(settings);
            continue;
        }
        // transformers' Adafactor and dadaptation's DAdaptAdam take no other keyword
        // (sd-scripts fails on one).
        const ADAFACTOR: &[&str] = &["relative_step", "scale_parameter", "warmup_init", "clip_threshold", "decay_rate", "beta1", "eps", "weight_decay"];
        const DADAPT: &[&str] = &["betas", "eps", "weight_decay", "log_every", "decouple", "use_bias_correction", "d0", "growth_rate", "fsdp_in_use"];
        const DADAPT_PREPRINT: &[&str] = &["betas", "eps", "weight_decay", "log_every", "decouple", "d0", "growth_rate", "fsdp_in_use"];
        const DADAPT_LION: &[&str] = &["betas", "weight_decay", "log_every", "d0", "fsdp_in_use"];
        const DADAPT_SGD: &[&str] = &["momentum", "weight_decay", "log_every", "d0", "growth_rate", "fsdp_in_use"];
        const DADAPT_ADAGRAD: &[&str] = &["momentum", "log_every", "weight_decay", "eps", "d0", "growth_rate"];
        const DADAPT_ADAN: &[&str] = &["betas", "eps", "weight_decay", "no_prox", "log_every", "d0", "growth_rate"];
        const SCHEDULE_FREE: &[&str] = &["betas", "eps", "weight_decay", "r", "weight_lr_power", "foreach"];
        const CAME: &[&str] = &["betas", "eps", "weight_decay", "clip_threshold"];
        const ADEMAMIX: &[&str] = &["betas", "alpha", "t_alpha", "t_beta3", "eps", "weight_decay", "min_8bit_size", "is_paged", "optim_bits"];
        match optimizer {
            Optimizer::Adafactor if !ADAFACTOR.contains(&key.as_str()) => return Err(bad("not an argument of transformers' Adafactor")),
            Optimizer::DadaptAdam if !DADAPT.contains(&key.as_str()) => return Err(bad("not an argument of dadaptation's DAdaptAdam")),
            Optimizer::DadaptAdamPreprint if !DADAPT_PREPRINT.contains(&key.as_str()) => return Err(bad("not an argument of dadaptation's DAdaptAdamPreprint")),
            Optimizer::DadaptLion if !DADAPT_LION.contains(&key.as_str()) => return Err(bad("not an argument of dadaptation's DAdaptLion")),
            Optimizer::DadaptSgd if !DADAPT_SGD.contains(&key.as_str()) => return Err(bad("not an argument of dadaptation's DAdaptSGD")),
            Optimizer::DadaptAdagrad if !DADAPT_ADAGRAD.contains(&key.as_str()) => return Err(bad("not an argument of dadaptation's DAdaptAdaGrad")),
            Optimizer::DadaptAdan if !DADAPT_ADAN.contains(&key.as_str()) => return Err(bad("not an argument of dadaptation's DAdaptAdan")),
            Optimizer::Came if !CAME.contains(&key.as_str()) => return Err(bad("not an argument of came_pytorch's CAME")),
            Optimizer::Ademamix if !ADEMAMIX.contains(&key.as_str()) => return Err(bad("not an argument of bitsandbytes' AdEMAMix")),
            Optimizer::AdamwScheduleFree if !SCHEDULE_FREE.contains(&key.as_str()) && key != "warmup_steps" => return Err(bad("not an argument of schedulefree's AdamWScheduleFree")),
            Optimizer::RadamScheduleFree if !SCHEDULE_FREE.contains(&key.as_str()) && key != "silent_sgd_phase" => return Err(bad("not an argument of schedulefree's RAdamScheduleFree")),
            Optimizer::SgdScheduleFree if !["momentum", "weight_decay", "warmup_steps", "r", "weight_lr_power", "foreach"].contains(&key.as_str()) => return Err(bad("not an argument of schedulefree's SGDScheduleFree")),
            _ => {}
        }
        match (key.as_str(), optimizer) {
            ("weight_decay", _) => t.adam_weight_decay = number()? as f32,
            ("betas", Optimizer::Came) => {
                let PyValue::Tuple(b) = &py else { return Err(bad("expected three numbers, e.g. 0.9,0.999,0.9999")) };
                let [b1, b2, b3] = b[..] else { return Err(bad("expected three numbers, e.g. 0.9,0.999,0.9999")) };
                (t.came_beta1, t.came_beta2, t.came_beta3) = (b1, b2, b3);
            }
            ("eps", Optimizer::Came) => {
                let PyValue::Tuple(e) = &py else { return Err(bad("expected two numbers, e.g. 1e-30,1e-16")) };
                let [e1, e2] = e[..] else { return Err(bad("expected two numbers, e.g. 1e-30,1e-16")) };
                (t.came_eps1, t.came_eps2) = (e1, e2);
            }
            ("clip_threshold", Optimizer::Came) => t.came_clip_threshold = number()? as f32,
            ("betas", Optimizer::DadaptAdan) => {
                let PyValue::Tuple(b) = &py else { return Err(bad("expected three numbers, e.g. 0.98,0.92,0.99")) };
                let [b1, b2, b3] = b[..] else { return Err(bad("expected three numbers, e.g. 0.98,0.92,0.99")) };
                (t.adam_beta1, t.adam_beta2, t.dadapt_beta3) = (b1 as f32, b2 as f32, b3 as f32);
            }
            ("no_prox", Optimizer::DadaptAdan) => t.dadapt_no_prox = flag()?,
            ("eps", Optimizer::DadaptAdagrad | Optimizer::DadaptAdan) => t.adam_epsilon = number()? as f32,
            ("betas", Optimizer::Ademamix) => {
                let PyValue::Tuple(b) = &py else { return Err(bad("expected three numbers, e.g. 0.9,0.999,0.9999")) };
                let [b1, b2, b3] = b[..] else { return Err(bad("expected three numbers, e.g. 0.9,0.999,0.9999")) };
                (t.adam_beta1, t.adam_beta2, t.ademamix_beta3) = (b1 as f32, b2 as f32, b3 as f32);
            }
            ("alpha", Optimizer::Ademamix) => t.ademamix_alpha = number()? as f32,
            ("t_alpha" | "t_beta3", Optimizer::Ademamix) => {
                let steps = match py {
                    PyValue::Text(ref none) if none == "None" => 0,
                    PyValue::Number(n) if n >= 1.0 && whole_number(n).is_some() => n as usize,
                    _ => return Err(bad("expected a whole number of steps (at least 1) or None")),
                };
                match key.as_str() {
                    "t_alpha" => t.ademamix_t_alpha = steps,
                    _ => t.ademamix_t_beta3 = steps,
                }
            }
            ("eps", Optimizer::Ademamix) => t.adam_epsilon = number()? as f32,
            ("momentum", Optimizer::Sgd) => t.sgd_momentum = number()? as f32,
            ("nesterov", Optimizer::Sgd) if short.starts_with("sgdnesterov") => {
                return Err(bad("sd-scripts passes nesterov=True itself for SGDNesterov (Python refuses a second value)"));
            }
            ("nesterov", Optimizer::Sgd) if quantized => {
                flag()?;
                notes.push(format!("optimizer_args `{key}={value}`: bitsandbytes' SGD kernel ignores it (plain momentum), and so does this import"));
            }
            ("nesterov", Optimizer::Sgd) => t.sgd_nesterov = flag()?,
            // bitsandbytes' momentum kernel ignores the dampening it is given.
            ("dampening", Optimizer::Sgd) if quantized => {
                if number()? != 0.0 {
                    notes.push(format!("optimizer_args `{key}={value}`: bitsandbytes' SGD kernel ignores the dampening, and so does this import"));
                }
            }
            ("dampening", Optimizer::Sgd) => t.sgd_dampening = number()? as f32,
            ("betas", _) => {
                let PyValue::Tuple(b) = &py else { return Err(bad("expected two numbers, e.g. 0.9,0.999")) };
                let [b1, b2] = b[..] else { return Err(bad("expected two numbers, e.g. 0.9,0.999")) };
                match optimizer {
                    Optimizer::Lion | Optimizer::DadaptLion => (t.lion_beta1, t.lion_beta2) = (b1 as f32, b2 as f32),
                    _ => (t.adam_beta1, t.adam_beta2) = (b1 as f32, b2 as f32),
                }
            }
            ("eps", Optimizer::Adamw | Optimizer::Prodigy | Optimizer::DadaptAdam | Optimizer::DadaptAdamPreprint | Optimizer::AdamwScheduleFree | Optimizer::RadamScheduleFree) => t.adam_epsilon = number()? as f32,
            ("r", _) if optimizer.is_schedule_free() => t.schedule_free_r = number()? as f32,
            ("weight_lr_power", _) if optimizer.is_schedule_free() => t.schedule_free_weight_lr_power = number()? as f32,
            ("silent_sgd_phase", Optimizer::RadamScheduleFree) => t.schedule_free_silent_sgd_phase = flag()?,
            ("momentum", Optimizer::SgdScheduleFree) => t.sgd_momentum = number()? as f32,
            ("warmup_steps", Optimizer::AdamwScheduleFree | Optimizer::SgdScheduleFree) => {
                t.lr_warmup_steps = whole_number(number()?).ok_or_else(|| bad("expected a whole number of steps"))?;
            }
            ("decouple", Optimizer::DadaptAdam | Optimizer::DadaptAdamPreprint) => t.dadapt_decouple = flag()?,
            ("d0", _) if optimizer.dadapt_kind().is_some() => t.dadapt_d0 = number()? as f32,
            ("growth_rate", _) if optimizer.dadapt_kind().is_some() => t.dadapt_growth_rate = number()? as f32,
            ("use_bias_correction", Optimizer::DadaptAdam) => t.dadapt_use_bias_correction = flag()?,
            ("momentum", Optimizer::DadaptSgd | Optimizer::DadaptAdagrad) => t.dadapt_momentum = number()? as f32,
            ("log_every", _) if optimizer.dadapt_kind().is_some() => {}
            ("d_coef", Optimizer::Prodigy) => t.prodigy_d_coef = number()? as f32,
            ("d0", Optimizer::Prodigy) => t.prodigy_d0 = number()? as f32,
            ("growth_rate", Optimizer::Prodigy) => t.prodigy_growth_rate = number()? as f32,
            ("beta3", Optimizer::Prodigy) => t.prodigy_beta3 = number()? as f32,
            ("use_bias_correction", Optimizer::Prodigy) => t.prodigy_use_bias_correction = flag()?,
            ("safeguard_warmup", Optimizer::Prodigy) => t.prodigy_safeguard_warmup = flag()?,
            ("decouple", Optimizer::Prodigy) => {
                if !flag()? {
                    return Err(bad("Prodigy's weight decay is always decoupled (AdamW-style) here"));
                }
            }
            // bitsandbytes' 8-bit and paged AdamWs take `amsgrad` and ignore it.
            ("amsgrad", Optimizer::Adamw) if quantized => {
                if flag()? {
                    notes.push(format!("optimizer_args amsgrad=True with {name}: bitsandbytes takes the argument and ignores it (its kernel has no AMSGrad); so does this import"));
                }
            }
            ("amsgrad", Optimizer::Adamw) if !name.starts_with("transformers.") => t.amsgrad = flag()?,
            // Options that change nothing in the update (bitsandbytes' and torch's
            // implementation switches) at their neutral values.
            ("amsgrad" | "maximize", _) if py == PyValue::Bool(false) => {}
            ("foreach" | "fused" | "capturable" | "differentiable" | "use_triton" | "fsdp_in_use", _) => {}
            ("percentile_clipping", _) if py == PyValue::Number(100.0) => {}
            ("block_wise" | "min_8bit_size" | "optim_bits" | "is_paged", _) if quantized => {}
            ("slice_p", Optimizer::Prodigy) if py == PyValue::Number(1.0) => {}
            ("relative_step", Optimizer::Adafactor) => t.adafactor_relative_step = flag()?,
            ("scale_parameter", Optimizer::Adafactor) => t.adafactor_scale_parameter = flag()?,
            ("warmup_init", Optimizer::Adafactor) => t.adafactor_warmup_init = flag()?,
            ("clip_threshold", Optimizer::Adafactor) => t.adafactor_clip_threshold = number()? as f32,
            ("decay_rate", Optimizer::Adafactor) => t.adafactor_decay_rate = number()? as f32,
            ("beta1", Optimizer::Adafactor) => {
                t.adafactor_beta1 = match py {
                    PyValue::Text(ref none) if none == "None" => 0.0,
                    _ => number()? as f32,
                }
            }
            ("eps", Optimizer::Adafactor) => {
                let PyValue::Tuple(e) = &py else { return Err(bad("expected two numbers, e.g. 1e-30,1e-3")) };
                let [e1, e2] = e[..] else { return Err(bad("expected two numbers, e.g. 1e-30,1e-3")) };
                (t.adafactor_eps1, t.adafactor_eps2) = (e1, e2);
            }
            _ => return Err(bad("not supported for this optimizer here")),
        }
    }
    if optimizer.is_schedule_free() {
        if scheduler != "constant" {
            notes.push(format!("lr_scheduler = \"{scheduler}\" with {name}: sd-scripts trains a schedule-free optimizer at a constant rate, and so does this trainer"));
        }
        if kohya_warmup != (0, 0.0) {
            notes.push(format!("lr_warmup_steps with {name}: sd-scripts ignores it with a schedule-free optimizer (AdamWScheduleFree's optimizer_args warmup_steps=N warms up); so does this trainer"));
        }
    }
    estimate_groups(c, notes);
    adafactor_schedule(o, c, scheduler, notes)?;
    // transformers refuses `cosine_with_min_lr` without its ratio.
    let t = &mut c.train;
    let ratio = o.float("lr_scheduler_min_lr_ratio")?;
    if ratio.is_none() && t.lr_scheduler == LrScheduler::CosineWithMinLr && !t.relative_step() {
        return Err(o.err("lr_scheduler_min_lr_ratio", "is missing: lr_scheduler = \"cosine_with_min_lr\" needs it (transformers refuses the schedule without it)"));
    }
    t.lr_scheduler_min_lr_ratio = ratio.unwrap_or(0.0);
    Ok(())
}

/// One of `ProdigyPlusScheduleFree`'s keyword arguments (the package's 1.9.2 names) into
/// `p`; what is wrong with it otherwise.
fn prodigy_plus_arg(p: &mut lora_core::optim::ProdigyPlusSettings, key: &str, py: &PyValue) -> Result<(), String> {
    let number = || match py {
        PyValue::Number(v) => Ok(*v),
        _ => Err("expected a number".to_string()),
    };
    let flag = || match py {
        PyValue::Bool(b) => Ok(*b),
        _ => Err("expected True or False".to_string()),
    };
    let none = matches!(py, PyValue::Text(t) if t == "None");
    match key {
        "betas" => match py {
            PyValue::Tuple(b) if b.len() == 2 => p.betas = (b[0] as f32, b[1] as f32),
            _ => return Err("expected two numbers, e.g. 0.9,0.99".into()),
        },
        "beta3" => p.beta3 = if none { None } else { Some(number()? as f32) },
        // `eps=None` is Adam-atan2, which is `eps = 0` here.
        "eps" => p.eps = if none { 0.0 } else { number()? as f32 },
        "weight_decay" => p.weight_decay = number()? as f32,
        "weight_decay_by_lr" => p.weight_decay_by_lr = flag()?,
        "use_bias_correction" => p.use_bias_correction = flag()?,
        "d0" => p.d0 = number()? as f32,
        "d_coef" => p.d_coef = number()? as f32,
        "prodigy_steps" => {
            let steps = number()?;
            if steps.fract() != 0.0 {
                return Err("expected a whole number of steps".into());
            }
            // The package freezes nothing at 0 or below.
            p.prodigy_steps = whole_number(steps.max(0.0)).ok_or("expected a whole number of steps")?;
        }
        "use_speed" => p.use_speed = flag()?,
        "split_groups" => p.split_groups = flag()?,
        "split_groups_mean" => p.split_groups_mean = flag()?,
        "factored" => p.factored = flag()?,
        "use_stableadamw" => p.use_stableadamw = flag()?,
        "use_cautious" => p.use_cautious = flag()?,
        "use_grams" => p.use_grams = flag()?,
        "use_adopt" => p.use_adopt = flag()?,
        "use_orthograd" => p.use_orthograd = flag()?,
        // Precision switches that change nothing with f32 values (this trainer's adapters
        // keep f32 master values), and the fused backward pass (a schedule of the same update).
        "factored_fp32" | "stochastic_rounding" | "fused_back_pass" => {
            flag()?;
        }
        "use_muon_pp" | "use_focus" => {
            if flag()? {
                return Err("this experimental option of the package is not implemented here; set it to False".into());
            }
        }
        _ => return Err("not an argument of prodigyplus' ProdigyPlusScheduleFree (1.9.2)".into()),
    }
    Ok(())
}

/// Prodigy and DAdaptAdam in sd-scripts: one optimizer, one estimate for every model, which
/// fails on parameter groups of different learning rates; here each model has its own.
fn estimate_groups(c: &TrainConfig, notes: &mut Vec<String>) {
    let (t, l) = (&c.train, &c.lora);
    let name = match t.optimizer {
        Optimizer::Prodigy => "Prodigy",
        Optimizer::DadaptAdam => "DAdaptAdam",
        Optimizer::DadaptAdamPreprint => "DAdaptAdamPreprint",
        Optimizer::DadaptLion => "DAdaptLion",
        Optimizer::DadaptSgd => "DAdaptSGD",
        Optimizer::DadaptAdagrad => "DAdaptAdaGrad",
        Optimizer::DadaptAdan => "DAdaptAdan",
        // Its groups step as sd-scripts' one optimizer's (`share_prodigy_plus`).
        Optimizer::ProdigyPlusScheduleFree => return,
        _ => return,
    };
    let te = l.text_encoder_targets != TextEncoderTargets::None && l.unet_targets != UnetTargets::None && t.text_encoder_lr != t.learning_rate;
    if te || l.has_lr_factors() {
        notes.push(format!(
            "{name} with different learning rates (text_encoder_lr, LoRA+ or block weights): sd-scripts' {name} refuses parameter groups of other rates; here the UNet and each text encoder keep their own estimate, which the rates and factors multiply"
        ));
    }
}

/// sd-scripts' handling of Adafactor's relative step: it turns `warmup_init` into
/// `relative_step`, replaces the schedule with its `adafactor` one, refuses a warmup and
/// drops the learning rates; and it refuses `lr_scheduler = "adafactor"` otherwise.
fn adafactor_schedule(o: &Options, c: &mut TrainConfig, scheduler: &str, notes: &mut Vec<String>) -> Result<(), TrainError> {
    let t = &mut c.train;
    if t.optimizer != Optimizer::Adafactor {
        if scheduler == "adafactor" && !t.optimizer.is_schedule_free() {
            return Err(o.err("lr_scheduler", "= \"adafactor\" needs optimizer_type = \"Adafactor\" (sd-scripts refuses it otherwise)"));
        }
        return Ok(());
    }
    if t.adafactor_warmup_init && !t.adafactor_relative_step {
        notes.push("optimizer_args warmup_init=True turns relative_step on, as in sd-scripts".into());
        t.adafactor_relative_step = true;
    }
    if !t.adafactor_relative_step {
        if scheduler == "adafactor" {
            return Err(o.err("lr_scheduler", "= \"adafactor\" needs Adafactor's relative_step=True (sd-scripts fails otherwise); use constant_with_warmup"));
        }
        return Ok(());
    }
    if t.lr_warmup_steps > 0 || t.lr_warmup_ratio > 0.0 {
        return Err(o.err("lr_warmup_steps", "must be 0 with Adafactor's relative_step=True (sd-scripts' adafactor schedule refuses a warmup)"));
    }
    if scheduler != "adafactor" {
        notes.push(format!("lr_scheduler = \"{scheduler}\": sd-scripts replaces it with Adafactor's relative step (relative_step=True), and so does this trainer"));
    }
    notes.push("Adafactor with relative_step=True: the learning rates are not used (min(1e-2, 1/sqrt(step)) instead), as in sd-scripts".into());
    let l = &c.lora;
    if l.has_lr_factors() {
        notes.push("Adafactor with relative_step=True: sd-scripts drops the parameter groups' learning rates, so LoRA+ and block learning-rate weights do nothing there; here they scale Adafactor's step".into());
    }
    Ok(())
}

fn read_output(o: &mut Options, c: &mut TrainConfig, network_dtype: Option<lora_core::SaveDtype>, notes: &mut Vec<String>) -> Result<(), TrainError> {
    let out = &mut c.output;
    out.output_name = o.string("output_name")?.unwrap_or_else(|| "last".into());
    out.output_dir = o.string("output_dir")?.ok_or_else(|| o.err("output_dir", "is missing: it names the folder the LoRA is written to"))?.into();
    if let Some(kind) = o.string("save_model_as")?.filter(|k| k != "safetensors") {
        notes.push(format!("save_model_as = \"{kind}\": LoRAs are written as .safetensors here"));
    }
    out.save_format = lora_core::AdapterFormat::Kohya;
    out.save_precision = match o.string("save_precision")?.as_deref() {
        None => network_dtype.unwrap_or(lora_core::SaveDtype::F32),
        Some("float") => lora_core::SaveDtype::F32,
        Some("fp16") => lora_core::SaveDtype::F16,
        Some("bf16") => lora_core::SaveDtype::Bf16,
        Some(other) => return Err(o.err("save_precision", format!("= \"{other}\": expected float, fp16 or bf16"))),
    };
    out.save_every_n_steps = o.count("save_every_n_steps")?.unwrap_or(0);
    out.save_every_n_epochs = o.count("save_every_n_epochs")?.unwrap_or(0);
    out.save_last_n_steps = o.count("save_last_n_steps")?.unwrap_or(0);
    out.save_last_n_epochs = o.count("save_last_n_epochs")?.unwrap_or(0);
    out.save_state = o.flag("save_state")? | o.flag("save_state_on_train_end")?;
    out.sample_every_n_steps = o.count("sample_every_n_steps")?.unwrap_or(0);
    out.sample_every_n_epochs = o.count("sample_every_n_epochs")?.unwrap_or(0);
    out.sample_at_first = o.flag("sample_at_first")?;
    out.sample_sampler = sampler_name(&o.string("sample_sampler")?.unwrap_or_else(|| "ddim".into()), notes);
    // sd-scripts' sampling defaults (per prompt: 30 steps, scale 7.5).
    out.sample_steps = 30;
    out.sample_cfg = 7.5;
    out.sample_prompts = match o.string("sample_prompts")? {
        Some(file) => read_prompt_file(Path::new(&file), Some(512), notes).map_err(|reason| o.err("sample_prompts", format!("= \"{file}\": {reason}")))?,
        None => Vec::new(),
    };
    out.validate_every_n_steps = o.count("validate_every_n_steps")?.unwrap_or(0);
    // sd-scripts measures the validation loss after every epoch unless told otherwise.
    out.validate_every_n_epochs = o.count("validate_every_n_epochs")?.unwrap_or(1);
    out.save_n_epoch_ratio = o.count("save_n_epoch_ratio")?.unwrap_or(0);
    out.max_validation_steps = o.count("max_validation_steps")?.unwrap_or(0);
    out.no_metadata = o.flag("no_metadata")?;
    out.training_comment = o.string("training_comment")?.unwrap_or_default();
    out.metadata_title = o.string("metadata_title")?.unwrap_or_default();
    out.metadata_author = o.string("metadata_author")?.unwrap_or_default();
    out.metadata_description = o.string("metadata_description")?.unwrap_or_default();
    out.metadata_license = o.string("metadata_license")?.unwrap_or_default();
    out.metadata_tags = o.string("metadata_tags")?.unwrap_or_default();
    out.metadata_usage_hint = o.string("metadata_usage_hint")?.unwrap_or_default();
    out.metadata_trigger_phrase = o.string("metadata_trigger_phrase")?.unwrap_or_default();
    out.metadata_thumbnail = o.string("metadata_thumbnail")?.unwrap_or_default();
    out.metadata_merged_from = o.string("metadata_merged_from")?.unwrap_or_default();
    out.metadata_preprocessor = o.string("metadata_preprocessor")?.unwrap_or_default();
    out.metadata_is_negative_embedding = o.string("metadata_is_negative_embedding")?.unwrap_or_default();
    Ok(())
}

/// The prompts of an sd-scripts prompt file (`.txt`: one prompt per line with its ` --n`,
/// ` --w`, ... options, `#` comments; `.toml`: `[[prompt.subset]]` tables; `.json`: a list
/// of prompt lines or tables) as this trainer's prompt lines
/// ([`sd_pipeline::parse_sample_prompt`]). A prompt without a width or height gets
/// `default_size` there (sd-scripts samples at 512 px), or none (`None`: the caller's
/// default). Options this trainer lacks are left out with a note in `notes`.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// let file = dir.path().join("prompts.txt");
/// std::fs::write(&file, "# a comment\na lighthouse, mystyle --n blurry --d 7\n\na harbour --w 768\n").unwrap();
/// let mut notes = Vec::new();
/// let lines = trainer::kohya::read_prompt_file(&file, None, &mut notes).unwrap();
/// assert_eq!(lines, ["a lighthouse, mystyle --n blurry --d 7", "a harbour --w 768"]);
/// ```
pub fn read_prompt_file(path: &Path, default_size: Option<usize>, notes: &mut Vec<String>) -> Result<Vec<String>, String> {
    // A device or pipe (`/dev/zero`) would be read without end.
    if std::fs::metadata(path).is_ok_and(|m| !m.is_file()) {
        return Err("not a file (a folder, device or pipe): name a .txt, .toml or .json prompt file".into());
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read the prompt file: {e}"))?;
    // Windows editors start UTF-8 files with a byte-order mark, which JSON does not allow.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let extension = path.extension().and_then(|e| e.to_str()).unwrap_or_default().to_ascii_lowercase();
    let entries: Vec<serde_json::Value> = match extension.as_str() {
        "txt" => text
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .map(|l| serde_json::Value::String(l.trim().to_string()))
            .collect(),
        "toml" => {
            let table: toml::Table = toml::from_str(&text).map_err(|e| format!("not valid TOML: {e}"))?;
            let prompt = table.get("prompt").and_then(toml::Value::as_table).ok_or("expected a [prompt] table with [[prompt.subset]] entries")?;
            let subsets = prompt.get("subset").and_then(toml::Value::as_array).ok_or("expected [[prompt.subset]] entries")?;
            let common: serde_json::Map<String, serde_json::Value> = prompt
                .iter()
                .filter(|(k, _)| *k != "subset")
                .map(|(k, v)| Ok((k.clone(), serde_json::to_value(v).map_err(|e| e.to_string())?)))
                .collect::<Result<_, String>>()?;
            subsets
                .iter()
                .map(|s| {
                    let mut entry = common.clone();
                    let own = serde_json::to_value(s).map_err(|e| e.to_string())?;
                    entry.extend(own.as_object().cloned().ok_or("each [[prompt.subset]] must be a table")?);
                    Ok(serde_json::Value::Object(entry))
                })
                .collect::<Result<_, String>>()?
        }
        "json" => match serde_json::from_str(&text).map_err(|e| format!("not valid JSON: {e}"))? {
            serde_json::Value::Array(items) => items,
            _ => return Err("expected a JSON list of prompts".into()),
        },
        _ => return Err("expected a .txt, .toml or .json prompt file".into()),
    };
    entries.iter().enumerate().map(|(i, e)| prompt_line(e, default_size, notes).map_err(|r| format!("prompt {}: {r}", i + 1))).collect()
}

/// One prompt (a prompt-file line or a prompt table) as a line with this trainer's options.
fn prompt_line(entry: &serde_json::Value, default_size: Option<usize>, notes: &mut Vec<String>) -> Result<String, String> {
    let mut fields: Vec<(String, String)> = Vec::new();
    let prompt = match entry {
        serde_json::Value::String(line) => {
            let mut parts = line.split(" --");
            let prompt = parts.next().unwrap_or_default().trim().to_string();
            for part in parts {
                let (key, value) = part.split_once(char::is_whitespace).unwrap_or((part, ""));
                fields.push((key.to_ascii_lowercase(), value.trim().to_string()));
            }
            prompt
        }
        serde_json::Value::Object(map) => {
            let text = |v: &serde_json::Value| v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string());
            let mut prompt = String::new();
            for (key, value) in map {
                let short = match key.as_str() {
                    "prompt" => {
                        prompt = text(value);
                        continue;
                    }
                    "negative_prompt" => "n",
                    "width" => "w",
                    "height" => "h",
                    "seed" => "d",
                    "scale" => "l",
                    "sample_steps" => "s",
                    "sample_sampler" => "ss",
                    "enum" => continue,
                    other => other,
                };
                fields.push((short.to_string(), text(value)));
            }
            prompt
        }
        _ => return Err("expected a prompt line or a table of prompt settings".into()),
    };
    // sd-scripts samples at 512 x 512 unless a prompt says otherwise.
    for side in ["w", "h"] {
        if let (Some(size), false) = (default_size, fields.iter().any(|(k, _)| k == side)) {
            fields.push((side.to_string(), size.to_string()));
        }
    }
    if entry.is_object() {
        // The order prompt lines usually have, not the table's (alphabetical) one.
        let order = ["n", "w", "h", "d", "l", "s", "ss"];
        fields.sort_by_key(|(k, _)| order.iter().position(|o| o == k).unwrap_or(order.len()));
    }
    let mut line = prompt;
    for (key, value) in fields {
        match key.as_str() {
            "n" | "w" | "h" | "d" | "l" | "s" => line.push_str(&format!(" --{key} {value}")),
            "ss" => line.push_str(&format!(" --ss {}", sampler_name(&value, notes))),
            other => notes.push(format!("sample prompt option `{other}` ({value}) is not supported and was left out")),
        }
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
pretrained_model_name_or_path = "base.safetensors"
train_data_dir = "images"
resolution = 512
output_dir = "out"
"#;

    /// kohya options and values that tend to break a converter: edge numbers, odd
    /// strings, and `network_args` / `optimizer_args` entries in and out of range.
    fn kohya_line() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        const INTS: &[&str] = &["network_dim", "max_train_steps", "max_train_epochs", "train_batch_size", "gradient_accumulation_steps", "seed", "clip_skip", "keep_tokens", "save_every_n_epochs", "save_every_n_steps", "lr_warmup_steps", "lr_scheduler_num_cycles", "max_token_length", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "dataset_repeats", "caption_dropout_every_n_epochs", "sample_every_n_steps", "min_timestep", "max_timestep", "multires_noise_iterations", "token_warmup_step", "save_last_n_epochs", "lr_decay_steps", "validate_every_n_steps"];
        const FLOATS: &[&str] = &["learning_rate", "unet_lr", "text_encoder_lr", "network_alpha", "conv_alpha", "noise_offset", "min_snr_gamma", "max_grad_norm", "scale_weight_norms", "network_dropout", "caption_dropout_rate", "caption_tag_dropout_rate", "prior_loss_weight", "multires_noise_discount", "adaptive_noise_scale", "ip_noise_gamma", "huber_c", "lr_scheduler_power", "loraplus_lr_ratio", "validation_split", "v_pred_like_loss", "lr_warmup_steps", "conv_dim"];
        const STRINGS: &[(&str, &[&str])] = &[
            ("optimizer_type", &["AdamW8bit", "Lion", "Prodigy", "Adafactor", "DAdaptAdam", "AdamWScheduleFree", "SGDNesterov", "", "bitsandbytes.optim.AdEMAMix8bit", "SGDNesterov8bit", "SGD", "AdEMAMix8bit", "DAdaptation", "DAdaptLion", "DAdaptSGD", "SGDScheduleFree", "DAdaptAdaGrad", "DAdaptAdan"]),
            ("lr_scheduler", &["cosine_with_restarts", "constant", "polynomial", "rex", "", "adafactor"]),
            ("mixed_precision", &["fp16", "bf16", "no", "fp8"]),
            ("save_precision", &["fp16", "bf16", "float", "int8"]),
            ("network_module", &["networks.lora", "lycoris.kohya", "networks.dylora", "networks.oft", "networks.lora_fa"]),
            ("save_model_as", &["safetensors", "ckpt", "diffusers"]),
            ("loss_type", &["l2", "huber", "smooth_l1", "l1"]),
            ("huber_schedule", &["snr", "exponential", "constant", "x"]),
            ("resolution", &["512,768", "0", "64", "x,y", "1e9"]),
            ("face_crop_aug_range", &["2.0,4.0", "4,2", "a"]),
            ("caption_extension", &[".txt", "", "txt"]),
            ("timestep_sampling", &["uniform", "sigmoid"]),
        ];
        const BOOLS: &[&str] = &["enable_bucket", "shuffle_caption", "flip_aug", "color_aug", "gradient_checkpointing", "cache_latents", "v2", "v_parameterization", "network_train_unet_only", "network_train_text_encoder_only", "xformers", "sdpa", "full_fp16", "full_bf16", "random_crop", "bucket_no_upscale", "zero_terminal_snr", "debiased_estimation_loss", "masked_loss", "alpha_mask", "sample_at_first", "scale_v_pred_loss_like_noise_pred"];
        const ARGS: &[&str] = &["algo=loha", "algo=lokr", "algo=locon", "algo=ia3", "conv_dim=0", "conv_dim=4", "conv_alpha=nan", "dropout=2", "rank_dropout=-1", "rank_dropout=0.1", "module_dropout=1", "use_tucker=True", "use_scalar=True", "dora_wd=maybe", "dora_wd=True", "factor=-1", "factor=4", "preset=attn-only", "block_dims=1,2", "down_lr_weight=x", "loraplus_lr_ratio=1e40", "train_norm=True", "=", "novalue", "weight_decay=0.1", "betas=0.9,0.99", "d_coef=2", "decouple=True", "use_bias_correction=True", "safeguard_warmup=True", "relative_step=True", "scale_parameter=False", "warmup_init=True", "alpha=8", "t_alpha=100", "t_beta3=-1", "momentum=0.95", "nesterov=False", "dampening=0.5", "growth_rate=1.02", "d0=1e-5", "no_prox=True", "betas=0.98,0.92,0.99", "unit=2", "unit=3", "enable_conv=True", "enable_all_linear=False"];
        let ints = (prop::sample::select(INTS), prop::sample::select(vec!["0", "1", "2", "-1", "77", "1000000", "4294967296"])).prop_map(|(k, v)| format!("{k} = {v}"));
        let floats = (prop::sample::select(FLOATS), prop::sample::select(vec!["0.0", "-1.0", "1e-12", "0.5", "1.0", "2.0", "1e30", "nan", "inf", "-inf"])).prop_map(|(k, v)| format!("{k} = {v}"));
        let strings = prop::sample::select(STRINGS).prop_flat_map(|(k, vs)| prop::sample::select(vs).prop_map(move |v| format!("{k} = {v:?}")));
        let bools = (prop::sample::select(BOOLS), any::<bool>()).prop_map(|(k, v)| format!("{k} = {v}"));
        let args = (prop::sample::select(vec!["network_args", "optimizer_args"]), prop::collection::vec(prop::sample::select(ARGS), 0..4)).prop_map(|(k, v)| format!("{k} = {v:?}"));
        prop_oneof![ints, floats, strings, bools, args]
    }

    proptest::proptest! {
        #![proptest_config(proptest::test_runner::Config::with_cases(512))]

        /// Any kohya config of common options at edge values converts to settings that
        /// validate and write a TOML that loads back the same, or is an error naming an
        /// option — never a panic.
        #[test]
        fn any_kohya_config_converts_or_names_the_option(lines in proptest::collection::vec(kohya_line(), 0..6)) {
            // A key given twice is a TOML error; the first stays.
            let mut seen = std::collections::HashSet::new();
            let lines: Vec<String> = lines.into_iter().filter(|l| seen.insert(l.split(" = ").next().unwrap_or_default().to_string())).collect();
            let text = format!("{MINIMAL}{}", lines.join("\n"));
            let text = text.replace("resolution = 512\n", if lines.iter().any(|l| l.starts_with("resolution =")) { "" } else { "resolution = 512\n" });
            match import(&text) {
                Err(e) => {
                    let message = e.to_string();
                    let named = message.contains("kohya.toml") && (message.contains('`') || message.contains("converted settings"));
                    proptest::prop_assert!(named, "{}\n-> {}", text, message);
                }
                Ok(i) => {
                    if i.config.validate().is_ok() {
                        let dir = tempfile::tempdir().unwrap();
                        let path = dir.path().join("converted.toml");
                        std::fs::write(&path, i.to_toml(Path::new("kohya.toml"))).unwrap();
                        let back = TrainConfig::load(Some(&path), &[]);
                        proptest::prop_assert!(back.is_ok(), "{}\n-> {:?}", text, back.err().map(|e| e.to_string()));
                        proptest::prop_assert_eq!(back.unwrap().to_toml(), i.config.to_toml());
                    }
                }
            }
        }
    }

    fn import(text: &str) -> Result<KohyaImport, TrainError> {
        import_kohya_config(text, Path::new("kohya.toml"))
    }

    fn error(text: &str) -> String {
        import(text).unwrap_err().to_string()
    }

    /// `initial_step` / `initial_epoch` carry over, with a note on what differs from
    /// sd-scripts (the schedule; without `skip_until_initial_step` also the data's place).
    #[test]
    fn initial_step_and_epoch_carry_over() {
        let i = import(&format!("{MINIMAL}initial_epoch = 3\n")).unwrap();
        assert_eq!((i.config.train.initial_epoch, i.config.train.initial_step), (3, 0));
        assert!(i.notes.iter().any(|n| n.starts_with("initial_epoch") && n.contains("counts steps from 0")), "{:?}", i.notes);
        let i = import(&format!("{MINIMAL}initial_step = 120\nskip_until_initial_step = true\n")).unwrap();
        assert_eq!(i.config.train.initial_step, 120);
        assert!(i.notes.iter().any(|n| n.starts_with("initial_step") && n.contains("restarts its scheduler") && !n.contains("counts steps from 0")), "{:?}", i.notes);
        let i = import(&format!("{MINIMAL}initial_epoch = 1\nskip_until_initial_step = false\n")).unwrap();
        assert!(!i.notes.iter().any(|n| n.contains("initial_")), "{:?}", i.notes);
        assert!(error(&format!("{MINIMAL}initial_step = -2\n")).contains("initial_step"));
    }

    /// sd-scripts' `resume`: its state's LoRA and step; its missing pieces are named.
    #[test]
    fn resume_continues_from_an_sd_scripts_state() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("my_lora-000004-state");
        std::fs::create_dir(&state).unwrap();
        let resume = |extra: &str| import(&format!("{MINIMAL}resume = {:?}\n{extra}", state.display().to_string()));
        let e = resume("").unwrap_err().to_string();
        assert!(e.contains("`resume`") && e.contains("no model.safetensors"), "{e}");
        std::fs::write(state.join("pytorch_model.bin"), b"pickle").unwrap();
        assert!(resume("").unwrap_err().to_string().contains("pytorch_model.bin"));
        std::fs::write(state.join("model.safetensors"), b"weights").unwrap();
        // No train_state.json: step 0, with a note saying how to set it.
        let i = resume("").unwrap();
        assert_eq!(i.config.lora.network_weights, state.join("model.safetensors").display().to_string());
        assert_eq!(i.config.train.initial_step, 0);
        assert!(i.notes.iter().any(|n| n.starts_with("resume") && n.contains("no train_state.json")), "{:?}", i.notes);
        std::fs::write(state.join("train_state.json"), r#"{"current_epoch": 4, "current_step": 120}"#).unwrap();
        let i = resume("").unwrap();
        assert_eq!(i.config.train.initial_step, 120);
        assert!(i.notes.iter().any(|n| n.contains("at its step 120") && n.contains("moments start at zero")), "{:?}", i.notes);
        // initial_step wins over the state's step, as in sd-scripts.
        assert_eq!(resume("initial_step = 80\n").unwrap().config.train.initial_step, 80);
        // network_weights is replaced by the state's weights, with a note.
        let other = dir.path().join("other.safetensors");
        std::fs::write(&other, b"weights").unwrap();
        let i = resume(&format!("network_weights = {:?}\n", other.display().to_string())).unwrap();
        assert_eq!(i.config.lora.network_weights, state.join("model.safetensors").display().to_string());
        assert!(i.notes.iter().any(|n| n.contains("replace network_weights")), "{:?}", i.notes);
        std::fs::write(state.join("train_state.json"), "{\"current_epoch\": 4}").unwrap();
        assert!(resume("").unwrap_err().to_string().contains("current_step"));
        let e = import(&format!("{MINIMAL}resume = \"/no/such/state\"\n")).unwrap_err().to_string();
        assert!(e.contains("is not a folder here"), "{e}");
    }

    /// `train_textual_inversion.py`'s options: the embedding alone without a network, with
    /// the LoRA when one is named (pivotal tuning); both templates at once are refused.
    #[test]
    fn textual_inversion_options_become_the_embedding_section() {
        let ti = format!("{MINIMAL}token_string = \"mychar\"\ninit_word = \"girl\"\nnum_vectors_per_token = 4\nuse_object_template = true\n");
        let i = import(&ti).unwrap();
        let e = &i.config.embedding;
        assert_eq!((e.token.as_str(), e.init_word.as_str(), e.vectors, e.template), ("mychar", "girl", 4, crate::config::CaptionTemplate::Object));
        assert_eq!((i.config.lora.unet_targets, i.config.lora.text_encoder_targets), (UnetTargets::None, TextEncoderTargets::None));
        assert!(i.notes.iter().any(|n| n.contains("trains alone")), "{:?}", i.notes);
        let pivotal = import(&format!("{ti}network_module = \"networks.lora\"\nnetwork_dim = 8\n")).unwrap();
        assert_eq!((pivotal.config.lora.unet_targets, pivotal.config.embedding.vectors), (UnetTargets::AttnMlp, 4));
        assert!(error(&format!("{ti}use_style_template = true\n")).contains("use_style_template"));
        assert!(!import(MINIMAL).unwrap().config.embedding.enabled());
    }

    /// kohya's `networks.lora_fa` is LoRA-FA over networks.lora's arguments, without LoRA+
    /// (an older copy of networks.lora, which ignores its ratios).
    #[test]
    fn lora_fa_reads_networks_lora_arguments_without_lora_plus() {
        let i = import(&format!("{MINIMAL}network_module = \"networks.lora_fa\"\nnetwork_dim = 8\nnetwork_args = [\"conv_dim=4\", \"rank_dropout=0.1\", \"loraplus_lr_ratio=16\"]\n")).unwrap();
        let l = &i.config.lora;
        assert!(l.lora_fa && l.algo == lora_core::Algo::Lora);
        assert_eq!((l.rank, l.conv_rank, l.rank_dropout, l.loraplus_lr_ratio), (8, 4, 0.1, 0.0));
        assert!(i.notes.iter().any(|n| n.contains("networks.lora_fa ignores") && n.contains("loraplus_lr_ratio=16")), "{:?}", i.notes);
        assert!(!import(&format!("{MINIMAL}network_args = [\"loraplus_lr_ratio=16\"]\n")).unwrap().config.lora.lora_fa);
        // networks.lora_fa, networks.dylora and networks.oft have no max-norm: sd-scripts
        // warns and trains without it, and so does the import.
        for (module, extra) in [("networks.lora_fa", ""), ("networks.dylora", ""), ("networks.oft", "network_alpha = 0.001\n")] {
            let i = import(&format!("{MINIMAL}network_module = \"{module}\"\n{extra}scale_weight_norms = 1.0\n")).unwrap();
            assert_eq!(i.config.train.scale_weight_norms, 0.0, "{module}");
            assert!(i.notes.iter().any(|n| n.contains(&format!("{module} has no max-norm"))), "{module}: {:?}", i.notes);
            i.config.validate().unwrap();
        }
    }

    /// kohya's `networks.oft`: its blocks and constraint, its targets from
    /// `enable_all_linear` / `enable_conv` (read as Python reads them), the UNet alone, and
    /// what it lacks an error.
    #[test]
    fn oft_reads_its_arguments() {
        let i = import(&format!("{MINIMAL}network_module = \"networks.oft\"\nnetwork_dim = 8\nnetwork_alpha = 0.001\nnetwork_dropout = 0.1\n")).unwrap();
        let l = &i.config.lora;
        assert_eq!((l.algo, l.rank, l.alpha, l.network_dropout), (lora_core::Algo::Oft, 8, 0.001, 0.0));
        assert_eq!((l.unet_targets, l.text_encoder_targets), (UnetTargets::Attn, TextEncoderTargets::None), "kohya's OFT: the attention projections of the UNet");
        assert!(i.notes.iter().any(|n| n.contains("network_dropout = 0.1")), "{:?}", i.notes);
        i.config.validate().unwrap();
        let all = import(&format!("{MINIMAL}network_module = \"networks.oft\"\nnetwork_args = [\"enable_all_linear=True\", \"enable_conv=True\"]\n")).unwrap();
        assert_eq!((all.config.lora.unet_targets, all.config.lora.rank, all.config.lora.alpha), (UnetTargets::Conv, 4, 1.0));
        assert!(all.notes.iter().any(|n| n.contains("too large")), "kohya warns about alpha 1: {:?}", all.notes);
        // `enable_conv` alone: the attention projections and the ResNets' and samplers' layers.
        let conv = import(&format!("{MINIMAL}network_module = \"networks.oft\"\nnetwork_alpha = 0.01\nnetwork_args = [\"enable_conv=1\"]\n")).unwrap();
        let l = &conv.config.lora;
        assert_eq!((l.unet_targets, l.include.as_slice()), (UnetTargets::Attn, &["*.resnets.*".to_string(), "*samplers.*".to_string()][..]));
        // Python's bool("False") is True, in sd-scripts and here, with a note.
        let odd = import(&format!("{MINIMAL}network_module = \"networks.oft\"\nnetwork_args = [\"enable_all_linear=False\"]\n")).unwrap();
        assert_eq!(odd.config.lora.unet_targets, UnetTargets::AttnMlp);
        assert!(odd.notes.iter().any(|n| n.contains("any non-empty value as true")), "{:?}", odd.notes);
        let e = error(&format!("{MINIMAL}network_module = \"networks.oft\"\nnetwork_train_text_encoder_only = true\n"));
        assert!(e.contains("trains the UNet alone"), "{e}");
    }

    /// LyCORIS' `algo=diag-oft`: `constraint` (its old name `constrain`; negative is none)
    /// and `rescaled`, `network_dim` / `conv_dim` as block sizes, what Diag-OFT ignores
    /// turned off with a note, and the same arguments ignored with other algorithms.
    #[test]
    fn diag_oft_reads_its_arguments() {
        let diag = |args: &str| import(&format!("{MINIMAL}network_module = \"lycoris.kohya\"\nnetwork_dim = 8\nnetwork_alpha = 4\nnetwork_args = [\"algo=diag-oft\", {args}]\n")).unwrap();
        let i = diag("\"constraint=0.001\", \"rescaled=True\", \"conv_dim=4\", \"dora_wd=True\", \"use_tucker=True\", \"module_dropout=0.1\"");
        let l = &i.config.lora;
        assert_eq!((l.algo, l.rank, l.conv_rank, l.constraint, l.rescaled), (lora_core::Algo::DiagOft, 8, 4, 0.001, true));
        assert_eq!((l.dora, l.use_tucker, l.module_dropout, l.unet_targets), (false, false, 0.1, UnetTargets::Conv));
        assert!(i.notes.iter().any(|n| n.contains("dora_wd, use_tucker") && n.contains("does not use")), "{:?}", i.notes);
        assert!(i.notes.iter().any(|n| n.contains("block size") && n.contains("0.001")), "{:?}", i.notes);
        i.config.validate().unwrap();
        assert_eq!(i.config.lora.linear_config().alpha, 0.001, "the constraint is lora-core's alpha");
        let old = diag("\"constrain=-1\"");
        assert_eq!((old.config.lora.constraint, old.config.lora.rescaled), (0.0, false));
        assert!(old.notes.iter().any(|n| n.contains("constrains only with a positive value")), "{:?}", old.notes);
        let other = import(&format!("{MINIMAL}network_module = \"lycoris.kohya\"\nnetwork_args = [\"algo=loha\", \"constraint=0.1\"]\n")).unwrap();
        assert_eq!(other.config.lora.constraint, 0.0);
        assert!(other.notes.iter().any(|n| n.contains("are Diag-OFT's")), "{:?}", other.notes);
        other.config.validate().unwrap();
        // BOFT reads the same arguments.
        let boft = import(&format!("{MINIMAL}network_module = \"lycoris.kohya\"\nnetwork_dim = 10\nnetwork_args = [\"algo=boft\", \"rescaled=1\", \"rs_lora=True\"]\n")).unwrap();
        let l = &boft.config.lora;
        assert_eq!((l.algo, l.rank, l.constraint, l.rescaled, l.rslora), (lora_core::Algo::Boft, 10, 0.0, true, false));
        assert!(boft.notes.iter().any(|n| n.contains("LyCORIS' boft does not use")), "{:?}", boft.notes);
        boft.config.validate().unwrap();
        // Rank dropout: Diag-OFT's is trained (LyCORIS' nn.Dropout on the rotation, which
        // always rescales), BOFT's ignored as LyCORIS ignores it; rank_dropout_scale never
        // reaches LyCORIS' modules.
        let dropped = diag("\"rank_dropout=0.1\", \"rank_dropout_scale=True\"");
        assert_eq!((dropped.config.lora.rank_dropout, dropped.config.lora.rank_dropout_scale), (0.1, false));
        assert!(dropped.notes.iter().any(|n| n.contains("rank_dropout_scale=True (LyCORIS' create_network does not pass it")), "{:?}", dropped.notes);
        dropped.config.validate().unwrap();
        let boft = import(&format!("{MINIMAL}network_module = \"lycoris.kohya\"\nnetwork_dim = 10\nnetwork_args = [\"algo=boft\", \"rank_dropout=0.2\"]\n")).unwrap();
        assert_eq!(boft.config.lora.rank_dropout, 0.0);
        assert!(boft.notes.iter().any(|n| n.contains("`rank_dropout=0.2` is ignored, as LyCORIS' BOFT ignores it")), "{:?}", boft.notes);
        boft.config.validate().unwrap();
    }

    /// LyCORIS' `algo=glora`: LoRA's rank, alpha, `conv_dim`, `use_scalar`, `rs_lora` and
    /// `module_dropout`; its rank dropout and max-norm, which LyCORIS' GLoRA ignores outside
    /// bypass mode (and always), off with a note, as are DoRA and Tucker; rank dropout in
    /// bypass mode is an error.
    #[test]
    fn glora_reads_its_arguments() {
        let glora = |args: &str, extra: &str| import(&format!("{MINIMAL}{extra}network_module = \"lycoris.kohya\"\nnetwork_dim = 8\nnetwork_alpha = 4\nnetwork_args = [\"algo=glora\", {args}]\n"));
        let i = glora("\"conv_dim=4\", \"conv_alpha=2\", \"use_scalar=True\", \"rs_lora=True\", \"module_dropout=0.1\", \"rank_dropout=0.2\", \"dora_wd=True\", \"use_tucker=True\"", "scale_weight_norms = 1.0\n").unwrap();
        let l = &i.config.lora;
        assert_eq!((l.algo, l.rank, l.alpha, l.conv_rank, l.conv_alpha), (lora_core::Algo::Glora, 8, 4.0, 4, 2.0));
        assert_eq!((l.use_scalar, l.rslora, l.module_dropout, l.rank_dropout, l.dora, l.use_tucker), (true, true, 0.1, 0.0, false, false));
        assert_eq!(i.config.train.scale_weight_norms, 0.0);
        for says in ["rank_dropout=0.2` is ignored", "dora_wd, use_tucker", "no max-norm"] {
            assert!(i.notes.iter().any(|n| n.contains(says)), "{says}: {:?}", i.notes);
        }
        i.config.validate().unwrap();
        let e = glora("\"rank_dropout=0.2\", \"bypass_mode=True\"", "").unwrap_err().to_string();
        assert!(e.contains("bypass_mode") && e.contains("glora"), "{e}");
    }

    /// LyCORIS' `algo=full`: module and rank dropout read (`rank_dropout_scale`, which
    /// LyCORIS' `create_network` does not pass on, ignored with a note), what
    /// its module ignores (DoRA, Tucker, scalar, rsLoRA, max-norm) off with a note, the
    /// unused rank noted; `bypass_mode` is an error, as LyCORIS raises one.
    #[test]
    fn full_reads_its_arguments() {
        let full = |args: &str, extra: &str| import(&format!("{MINIMAL}{extra}network_module = \"lycoris.kohya\"\nnetwork_dim = 8\nnetwork_alpha = 4\nnetwork_args = [\"algo=full\", {args}]\n"));
        let i = full("\"module_dropout=0.1\", \"rank_dropout=0.2\", \"rank_dropout_scale=True\", \"dora_wd=True\", \"use_tucker=True\", \"use_scalar=True\", \"rs_lora=True\"", "scale_weight_norms = 1.0\n").unwrap();
        let l = &i.config.lora;
        assert_eq!((l.algo, l.module_dropout, l.rank_dropout, l.rank_dropout_scale), (lora_core::Algo::Full, 0.1, 0.2, false));
        assert_eq!((l.dora, l.use_tucker, l.use_scalar, l.rslora, i.config.train.scale_weight_norms), (false, false, false, false, 0.0));
        for says in ["dora_wd, use_tucker, use_scalar, rs_lora", "no max-norm", "network_dim and network_alpha are not used"] {
            assert!(i.notes.iter().any(|n| n.contains(says)), "{says}: {:?}", i.notes);
        }
        i.config.validate().unwrap();
        let e = full("\"bypass_mode=True\"", "").unwrap_err().to_string();
        assert!(e.contains("bypass_mode") && e.contains("full"), "{e}");
    }

    /// LyCORIS' `train_norm=True`: `lora.train_norm` with the presets that reach norm layers
    /// (a rank dropout noted: norm modules take none here); off with a note where the
    /// preset reaches none (`attn-only`), as LyCORIS then trains none.
    #[test]
    fn train_norm_reads_as_lycoris_applies_it() {
        let norm = |args: &str| import(&format!("{MINIMAL}network_module = \"lycoris.kohya\"\nnetwork_dim = 8\nnetwork_alpha = 4\nnetwork_args = [\"train_norm=True\", {args}]\n")).unwrap();
        for (args, targets) in [("\"algo=loha\", \"preset=attn-mlp\"", UnetTargets::AttnMlp), ("\"algo=lora\", \"preset=full\", \"rank_dropout=0.1\"", UnetTargets::Conv), ("\"algo=lokr\", \"preset=unet-convblock-only\"", UnetTargets::Conv)] {
            let i = norm(args);
            assert!(i.config.lora.train_norm && i.config.lora.unet_targets == targets, "{args}");
            i.config.validate().unwrap();
        }
        let dropped = norm("\"algo=lora\", \"preset=full\", \"rank_dropout=0.1\"");
        assert!(dropped.notes.iter().any(|n| n.contains("train_norm") && n.contains("module dropout only")), "{:?}", dropped.notes);
        let none = norm("\"algo=loha\", \"preset=attn-only\"");
        assert!(!none.config.lora.train_norm && none.notes.iter().any(|n| n.contains("reaches no norm layer")), "{:?}", none.notes);
        let off = norm("\"algo=loha\", \"train_norm=False\"");
        assert!(!off.config.lora.train_norm);
    }

    /// LyCORIS' `algo=ia3` with its `ia3` preset: the keys, values and feed-forward outputs
    /// (the latter scaled on their inputs), what (IA)³ ignores off with a note; with another
    /// preset every scale is per output (a note, as LyCORIS warns).
    #[test]
    fn ia3_reads_its_arguments() {
        let ia3 = |args: &str| import(&format!("{MINIMAL}network_module = \"lycoris.kohya\"\nnetwork_dim = 8\nnetwork_train_unet_only = false\nscale_weight_norms = 1.0\nnetwork_args = [\"algo=ia3\", {args}]\n")).unwrap();
        let i = ia3("\"preset=ia3\", \"rank_dropout=0.1\", \"use_scalar=True\", \"use_tucker=True\", \"module_dropout=0.1\"");
        let l = &i.config.lora;
        assert_eq!((l.algo, l.unet_targets, l.text_encoder_targets), (lora_core::Algo::Ia3, UnetTargets::Ia3, TextEncoderTargets::Ia3));
        assert_eq!((l.rank_dropout, l.use_scalar, l.use_tucker, l.module_dropout, i.config.train.scale_weight_norms), (0.0, false, false, 0.1, 0.0));
        assert_eq!(l.ia3_on_input, crate::config::default_ia3_on_input());
        for says in ["rank_dropout, use_scalar", "use_tucker", "no max-norm", "not used"] {
            assert!(i.notes.iter().any(|n| n.contains(says)), "{says}: {:?}", i.notes);
        }
        i.config.validate().unwrap();
        let full = ia3("\"preset=attn-only\"");
        assert!(full.config.lora.ia3_on_input.is_empty() && full.notes.iter().any(|n| n.contains("preset=ia3")), "{:?}", full.notes);
        full.config.validate().unwrap();
    }

    /// kohya's `networks.dylora`: its `unit` (1 by default), `conv_dim` equal to
    /// `network_dim` with the convolutions at `network_alpha`, LoRA+, and nothing else
    /// (dropouts and block-wise settings ignored with a note); what it asserts is an error.
    #[test]
    fn dylora_reads_its_arguments() {
        let i = import(&format!("{MINIMAL}network_module = \"networks.dylora\"\nnetwork_dim = 8\nnetwork_alpha = 2\nnetwork_dropout = 0.1\nnetwork_args = [\"unit=2\", \"conv_dim=8\", \"conv_alpha=1\", \"rank_dropout=0.1\", \"block_dims=1,2\", \"loraplus_lr_ratio=4\"]\n")).unwrap();
        let l = &i.config.lora;
        assert_eq!((l.dylora_unit, l.rank, l.conv_rank, l.alpha, l.conv_alpha), (2, 8, 8, 2.0, 2.0));
        assert_eq!((l.rank_dropout, l.network_dropout, l.block_dims.as_str(), l.loraplus_lr_ratio), (0.0, 0.0, "", 4.0));
        assert_eq!(l.unet_targets, UnetTargets::Conv);
        let note = i.notes.iter().find(|n| n.contains("networks.dylora ignores")).unwrap_or_else(|| panic!("{:?}", i.notes));
        for ignored in ["conv_alpha=1", "rank_dropout=0.1", "block_dims=1,2", "network_dropout = 0.1"] {
            assert!(note.contains(ignored), "{note}");
        }
        let plain = import(&format!("{MINIMAL}network_module = \"networks.dylora\"\nnetwork_dim = 4\n")).unwrap();
        assert_eq!((plain.config.lora.dylora_unit, plain.config.lora.conv_rank), (1, 0));
        for (args, expected) in [
            ("\"unit=3\"", "must divide network_dim (4)"),
            ("\"conv_dim=2\"", "must equal network_dim (4)"),
            ("\"unit=0\"", "must divide"),
        ] {
            let e = error(&format!("{MINIMAL}network_module = \"networks.dylora\"\nnetwork_dim = 4\nnetwork_args = [{args}]\n"));
            assert!(e.contains(expected), "{args}: {e}");
        }
        // A factored optimizer keeps per-tensor statistics that DyLoRA's chunks do not fit.
        let e = error(&format!("{MINIMAL}network_module = \"networks.dylora\"\noptimizer_type = \"Adafactor\"\n"));
        assert!(e.contains("dylora_unit") && e.contains("adafactor"), "{e}");
    }

    /// `lr_scheduler_type`'s PyTorch schedulers and `piecewise_constant`, with their
    /// `lr_scheduler_args` as sd-scripts passes them (Python literals by PyTorch's names).
    #[test]
    fn pytorch_schedulers_and_piecewise_constant() {
        use crate::config::LrSchedulerArgs;
        let i = import(&format!("{MINIMAL}lr_scheduler = \"cosine\"\nlr_scheduler_type = \"CosineAnnealingWarmRestarts\"\nlr_scheduler_args = [\"T_0=200\", \"T_mult=2\", \"eta_min=1e-6\", \"last_epoch=-1\"]")).unwrap();
        let t = &i.config.train;
        assert_eq!(t.lr_scheduler, LrScheduler::CosineAnnealingWarmRestarts);
        assert_eq!(t.lr_scheduler_args, LrSchedulerArgs { t_0: Some(200), t_mult: Some(2), eta_min: Some(1e-6), ..Default::default() });
        assert_eq!(t.lr_warmup_steps, 0);
        assert!(i.notes.iter().any(|n| n.contains("replaced by lr_scheduler_type")), "{:?}", i.notes);
        // The module path, a list of milestones (one, too), and the GUI's one string of entries.
        let i = import(&format!("{MINIMAL}lr_scheduler_type = \"torch.optim.lr_scheduler.MultiStepLR\"\nlr_scheduler_args = \"milestones=[300] gamma=0.5\"")).unwrap();
        assert_eq!((i.config.train.lr_scheduler, i.config.train.lr_scheduler_args.milestones.clone()), (LrScheduler::MultiStepLr, Some(vec![300])));
        let i = import(&format!("{MINIMAL}lr_scheduler_type = \"MultiStepLR\"\nlr_scheduler_args = [\"milestones=[300, 600]\"]")).unwrap();
        assert_eq!(i.config.train.lr_scheduler_args.milestones, Some(vec![300, 600]));
        // piecewise_constant: its rules quoted (as ast.literal_eval needs) or not; sd-scripts
        // ignores a warmup there.
        let i = import(&format!("{MINIMAL}lr_scheduler = \"piecewise_constant\"\nlr_warmup_steps = 50\nlr_scheduler_args = [\"step_rules='1:100,0.1:200,0.01'\"]")).unwrap();
        let t = &i.config.train;
        assert_eq!((t.lr_scheduler, t.lr_scheduler_args.step_rules.as_deref(), t.warmup_steps()), (LrScheduler::PiecewiseConstant, Some("1:100,0.1:200,0.01"), 0));
        assert!(i.notes.iter().any(|n| n.contains("piecewise_constant") && n.contains("lr_warmup_steps")), "{:?}", i.notes);
        for (extra, expected) in [
            ("lr_scheduler_type = \"CosineAnnealingLR\"", "needs `T_max`"),
            ("lr_scheduler_type = \"CosineAnnealingLR\"\nlr_scheduler_args = [\"T_max=100\"]\nlr_warmup_steps = 10", "sd-scripts refuses a warmup"),
            ("lr_scheduler_type = \"StepLR\"\nlr_scheduler_args = [\"step_size=10\", \"T_max=4\"]", "`T_max` is not an argument of StepLR"),
            ("lr_scheduler_type = \"StepLR\"\nlr_scheduler_args = [\"step_size=2.5\"]", "whole number"),
            ("lr_scheduler_type = \"StepLR\"\nlr_scheduler_args = [\"step_size=10\", \"last_epoch=5\"]", "part-way"),
            ("lr_scheduler_type = \"StepLR\"\nlr_scheduler_args = [\"stepsize=10\"]", "`stepsize=10`"),
            ("lr_scheduler_type = \"OneCycleLR\"", "momentum"),
            ("lr_scheduler_type = \"LoraEasyCustomOptimizer.CustomOptimizers.CosineAnnealingWarmupRestarts\"", "only PyTorch's own"),
            ("lr_scheduler = \"cosine\"\nlr_scheduler_args = [\"num_cycles=0.3\"]", "not by lr_scheduler = \"cosine\""),
            ("lr_scheduler = \"piecewise_constant\"", "needs `step_rules`"),
            ("lr_scheduler = \"piecewise_constant\"\nlr_scheduler_args = [\"step_rules='1:10,a'\"]", "`a`"),
        ] {
            let e = error(&format!("{MINIMAL}{extra}"));
            assert!(e.contains(expected) && e.contains("kohya.toml"), "{extra}: {e}");
        }
    }

    /// Left unset, every option takes sd-scripts' default, not this trainer's.
    #[test]
    fn unset_options_take_sd_scripts_defaults() {
        let i = import(MINIMAL).unwrap();
        let (c, ours) = (&i.config, TrainConfig::default());
        assert_eq!((c.train.learning_rate, c.train.text_encoder_lr), (2e-6, 2e-6));
        assert_eq!((c.train.max_train_steps, c.train.train_batch_size, c.train.lr_warmup_steps), (1600, 1, 0));
        assert_eq!((c.train.lr_scheduler, c.train.min_snr_gamma, c.train.prediction), (LrScheduler::Constant, 0.0, Prediction::Epsilon));
        assert_eq!((c.lora.rank, c.lora.alpha, c.lora.unet_targets, c.lora.text_encoder_targets), (4, 1.0, UnetTargets::AttnMlp, TextEncoderTargets::AttnMlp));
        assert_eq!((c.data.enable_bucket, c.data.max_bucket_reso, c.data.caption_extension.as_str()), (false, 1024, ".caption"));
        assert_eq!((c.output.output_name.as_str(), c.output.save_precision, c.output.save_state), ("last", lora_core::SaveDtype::F32, false));
        assert!(c.output.sample_prompts.is_empty());
        assert_eq!((c.output.sample_steps, c.output.sample_cfg), (30, 7.5));
        // Those that agree stay as they are.
        assert_eq!((c.train.max_grad_norm, c.train.adam_weight_decay, c.data.min_bucket_reso), (1.0, ours.train.adam_weight_decay, 256));
        assert!(i.notes.iter().any(|n| n.contains("seed is not set")), "{:?}", i.notes);
    }

    /// A GUI-style config with tables, LoCon, an 8-bit optimizer with arguments, a warmup
    /// fraction and a prompt file; the written TOML loads back as the same settings.
    #[test]
    fn a_gui_config_converts_and_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let prompts = dir.path().join("prompts.txt");
        std::fs::write(&prompts, "# mine\nmystyle, a castle --n blurry --w 512 --h 768 --d 5\n\nmystyle, a cat --ss k_euler_a --g 3\n").unwrap();
        let text = format!(
            r#"
[model_arguments]
pretrained_model_name_or_path = "base.safetensors"
v_parameterization = true
[additional_network_arguments]
network_module = "networks.lora"
network_dim = 32
network_alpha = 16
network_args = ["conv_dim=8", "conv_alpha=4", "down_lr_weight=sine+0.5", "loraplus_lr_ratio=16"]
unet_lr = 1e-4
[optimizer_arguments]
optimizer_type = "AdamW8bit"
optimizer_args = ["weight_decay=0.1", "betas=0.9,0.99"]
learning_rate = 3e-4
lr_scheduler = "cosine_with_restarts"
lr_scheduler_num_cycles = 3
lr_warmup_steps = 0.05
epoch = 10
noise_offset_type = "Original"
[dataset_arguments]
train_data_dir = "img"
resolution = "768,768"
enable_bucket = true
cache_latents = true
xformers = true
color_aug = true
token_warmup_min = 1
[training_arguments]
output_dir = "out"
output_name = "mystyle"
save_precision = "bf16"
max_train_steps = 2000
mixed_precision = "bf16"
seed = 7
min_snr_gamma = 5
sample_prompts = "{}"
sample_sampler = "euler_a"
"#,
            prompts.display()
        );
        let i = import(&text).unwrap();
        let c = &i.config;
        assert_eq!((c.lora.rank, c.lora.alpha, c.lora.unet_targets, c.lora.conv_rank, c.lora.conv_alpha), (32, 16.0, UnetTargets::Conv, 8, 4.0));
        assert_eq!((c.lora.down_lr_weight.as_str(), c.lora.loraplus_lr_ratio), ("sine+0.5", 16.0));
        // unet_lr wins for the UNet; the text encoder falls back on learning_rate.
        assert_eq!((c.train.learning_rate, c.train.text_encoder_lr), (1e-4, 3e-4));
        assert_eq!((c.train.optimizer, c.train.adam_weight_decay, c.train.adam_beta2), (Optimizer::Adamw, 0.1, 0.99));
        assert_eq!((c.train.lr_scheduler, c.train.lr_cycles, c.train.lr_warmup_ratio, c.train.warmup_steps()), (LrScheduler::CosineWithRestarts, 3, 0.05, 100));
        assert_eq!((c.train.prediction, c.train.mixed_precision, c.train.seed), (Prediction::VPrediction, MixedPrecision::Bf16, 7));
        assert_eq!((c.data.resolution, c.data.enable_bucket, c.output.save_precision), (sd_data::Resolution::square(768), true, lora_core::SaveDtype::Bf16));
        assert!(c.data.color_aug);
        assert_eq!(c.output.sample_prompts, ["mystyle, a castle --n blurry --w 512 --h 768 --d 5", "mystyle, a cat --ss euler_a --w 512 --h 512"]);
        for expected in ["AdamW8bit", "option `g`", "xformers, cache_latents", "sd-scripts refuses the pair"] {
            assert!(i.notes.iter().any(|n| n.contains(expected)), "no note on {expected}: {:?}", i.notes);
        }
        let path = dir.path().join("ours.toml");
        std::fs::write(&path, i.to_toml(Path::new("kohya.toml"))).unwrap();
        assert_eq!(&TrainConfig::load(Some(&path), &[]).unwrap(), c);
    }

    /// A config as the kohya_ss GUI writes it for sd-scripts (sorted keys, its own `epoch`
    /// and `noise_offset_type`, lists written even when empty, no zeros).
    #[test]
    fn a_kohya_ss_gui_config_converts() {
        let text = r#"
bucket_no_upscale = true
bucket_reso_steps = 64
cache_latents = true
cache_latents_to_disk = true
caption_extension = ".txt"
clip_skip = 1
dynamo_backend = "no"
enable_bucket = true
epoch = 10
gradient_accumulation_steps = 1
huber_c = 0.1
huber_scale = 1
huber_schedule = "snr"
learning_rate = 0.0001
loss_type = "l2"
lr_scheduler = "cosine"
lr_scheduler_args = []
lr_scheduler_num_cycles = 10
lr_scheduler_power = 1
lr_warmup_steps = 0.1
max_bucket_reso = 2048
max_data_loader_n_workers = 0
max_grad_norm = 1
max_timestep = 1000
max_token_length = 75
max_train_steps = 1500
min_bucket_reso = 256
mixed_precision = "fp16"
network_alpha = 16
network_args = []
network_dim = 32
network_module = "networks.lora"
noise_offset_type = "Original"
optimizer_type = "AdamW8bit"
output_dir = "out/model"
output_name = "my_style"
persistent_data_loader_workers = 1
pretrained_model_name_or_path = "runwayml/stable-diffusion-v1-5"
prior_loss_weight = 1
resolution = "512,512"
sample_sampler = "euler_a"
save_every_n_epochs = 1
save_model_as = "safetensors"
save_precision = "fp16"
sdpa = true
text_encoder_lr = [ 5e-5,]
train_batch_size = 2
train_data_dir = "data/img"
unet_lr = 0.0001
wandb_run_name = "my_style"
"#;
        let i = import(text).unwrap();
        let (c, t) = (&i.config, &i.config.train);
        assert_eq!((c.lora.rank, c.lora.alpha, c.lora.text_encoder_targets), (32, 16.0, TextEncoderTargets::AttnMlp));
        assert_eq!((t.learning_rate, t.text_encoder_lr, t.lr_warmup_ratio, t.warmup_steps()), (1e-4, 5e-5, 0.1, 150));
        assert_eq!((t.max_train_steps, t.train_batch_size, t.mixed_precision, t.lr_scheduler), (1500, 2, MixedPrecision::Fp16, LrScheduler::Cosine));
        assert_eq!((c.data.resolution, c.data.max_bucket_reso, c.data.bucket_no_upscale), (sd_data::Resolution::square(512), 2048, true));
        assert!(i.notes.iter().any(|n| n.contains("epoch, noise_offset_type")), "{:?}", i.notes);
    }

    #[test]
    fn learning_rates_of_zero_leave_a_model_untrained() {
        let c = import(&format!("{MINIMAL}text_encoder_lr = 0.0\nunet_lr = 1e-4")).unwrap().config;
        assert_eq!((c.lora.text_encoder_targets, c.train.learning_rate), (TextEncoderTargets::None, 1e-4));
        let c = import(&format!("{MINIMAL}unet_lr = 0\ntext_encoder_lr = [5e-5, 5e-5]")).unwrap().config;
        assert_eq!((c.lora.unet_targets, c.lora.text_encoder_targets, c.train.learning_rate), (UnetTargets::None, TextEncoderTargets::AttnMlp, 5e-5));
        let c = import(&format!("{MINIMAL}network_train_unet_only = true")).unwrap().config;
        assert_eq!(c.lora.text_encoder_targets, TextEncoderTargets::None);
        let e = error(&format!("{MINIMAL}network_train_unet_only = true\nunet_lr = 0"));
        assert!(e.contains("nothing to train"), "{e}");
        // LoCon settings go with the UNet's adapters.
        let c = import(&format!("{MINIMAL}unet_lr = 0\nnetwork_args = [\"conv_dim=4\", \"block_dims=2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2\", \"conv_block_dims=1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1\"]")).unwrap().config;
        assert_eq!((c.lora.unet_targets, c.lora.conv_rank, c.lora.conv_block_dims.as_str()), (UnetTargets::None, 0, ""));
    }

    #[test]
    fn prodigy_lion_and_lycoris_options_map() {
        let p = import(&format!(
            "{MINIMAL}optimizer_type = \"prodigyopt.Prodigy\"\nlearning_rate = 1.0\noptimizer_args = [\"decouple=True\", \"d_coef=0.8\", \"use_bias_correction=True\", \"safeguard_warmup=True\", \"betas=(0.9,0.99)\"]"
        ))
        .unwrap()
        .config;
        let t = &p.train;
        assert_eq!((t.optimizer, t.prodigy_d_coef, t.adam_beta2, t.adam_weight_decay), (Optimizer::Prodigy, 0.8, 0.99, 0.0));
        assert!(t.prodigy_use_bias_correction && t.prodigy_safeguard_warmup);
        let l = import(&format!("{MINIMAL}use_lion_optimizer = true\noptimizer_args = \"betas=0.95,0.98 weight_decay=0.5\"")).unwrap().config;
        assert_eq!((l.train.optimizer, l.train.lion_beta1, l.train.lion_beta2, l.train.adam_weight_decay), (Optimizer::Lion, 0.95, 0.98, 0.5));
        // conv_dim = 0 trains the ResNet blocks' linear and 1x1 layers, not their 3x3 convolutions.
        let z = import(&format!("{MINIMAL}network_args = [\"conv_dim=0\"]")).unwrap().config;
        let selection = sd_model::targets::Selection::new(z.lora.unet_targets).exclude(z.lora.exclude.clone());
        assert!(selection.selects("down_blocks.0.resnets.0.time_emb_proj", false) && selection.selects("down_blocks.1.resnets.0.conv_shortcut", true));
        assert!(!selection.selects("down_blocks.0.resnets.0.conv1", true) && !selection.selects("down_blocks.0.downsamplers.0.conv", true));
        // conv_block_dims alone switches on the 3x3 convolutions with block-wise settings,
        // and is ignored without them, as in networks.lora.
        let dims = "conv_block_dims=1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1";
        let c = import(&format!("{MINIMAL}network_args = [\"{dims}\", \"up_lr_weight=sine\"]")).unwrap().config;
        assert_eq!((c.lora.unet_targets, c.lora.conv_rank), (UnetTargets::Conv, 0));
        let i = import(&format!("{MINIMAL}network_args = [\"{dims}\"]")).unwrap();
        assert_eq!((i.config.lora.unet_targets, i.config.lora.conv_block_dims.as_str()), (UnetTargets::AttnMlp, ""));
        assert!(i.notes.iter().any(|n| n.contains("conv_block_dims")), "{:?}", i.notes);
        // block_alphas is read only with block_dims or a block learning-rate weight.
        let alphas = "block_alphas=2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2,2";
        let i = import(&format!("{MINIMAL}network_args = [\"{alphas}\"]")).unwrap();
        assert_eq!(i.config.lora.block_alphas, "");
        assert!(i.notes.iter().any(|n| n.contains("block_alphas without block_dims")), "{:?}", i.notes);
        let c = import(&format!("{MINIMAL}network_args = [\"{alphas}\", \"down_lr_weight=sine\"]")).unwrap().config;
        assert_eq!(c.lora.block_alphas, &alphas["block_alphas=".len()..]);
        // With dim_from_weights, networks.lora sets no LoRA+ ratio.
        let file = tempfile::NamedTempFile::new().unwrap();
        let path = file.path().display().to_string().replace('\\', "/");
        let i = import(&format!("{MINIMAL}network_weights = \"{path}\"\ndim_from_weights = true\nnetwork_args = [\"loraplus_lr_ratio=16\"]")).unwrap();
        assert_eq!(i.config.lora.loraplus_lr_ratio, 0.0);
        assert!(i.notes.iter().any(|n| n.contains("sets no LoRA+ ratio")), "{:?}", i.notes);
        // A warmup as whole steps, and sd-scripts' list of text-encoder rates (the first wins).
        let w = import(&format!("{MINIMAL}lr_warmup_steps = 50\nmax_train_epochs = 3\ntext_encoder_lr = [1e-5, 2e-5]")).unwrap();
        assert_eq!((w.config.train.lr_warmup_steps, w.config.train.lr_warmup_ratio, w.config.train.text_encoder_lr), (50, 0.0, 1e-5));
        assert!(w.notes.iter().any(|n| n.contains("text_encoder_lr")), "{:?}", w.notes);
    }

    /// Adafactor as kohya's presets use it: with a learning rate (relative_step off), or
    /// with its relative step and the `adafactor` schedule, which sd-scripts gives it
    /// anyway and which refuses a warmup.
    #[test]
    fn adafactor_options_map() {
        // The kohya_ss GUI's SDXL preset: a learning rate, no relative step or scaling.
        let gui = "optimizer_type = \"Adafactor\"\noptimizer_args = [\"scale_parameter=False\", \"relative_step=False\", \"warmup_init=False\"]\nlearning_rate = 4e-7\nlr_scheduler = \"constant_with_warmup\"\nlr_warmup_steps = 8";
        let i = import(&format!("{MINIMAL}{gui}")).unwrap();
        let t = &i.config.train;
        assert_eq!((t.optimizer, t.adafactor_relative_step, t.adafactor_scale_parameter, t.adafactor_warmup_init), (Optimizer::Adafactor, false, false, false));
        assert_eq!((t.learning_rate, t.lr_warmup_steps, t.adam_weight_decay, t.adafactor_beta1), (4e-7, 8, 0.0, 0.0));
        // The written TOML loads back as the same settings.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("adafactor.toml");
        std::fs::write(&path, i.to_toml(Path::new("kohya.toml"))).unwrap();
        assert_eq!(TrainConfig::load(Some(&path), &[]).unwrap().train, i.config.train);
        // sd-scripts' default is the relative step: the schedule and learning rates go.
        let i = import(&format!("{MINIMAL}optimizer_type = \"adafactor\"\nlr_scheduler = \"cosine\"\noptimizer_args = [\"beta1=0.9\", \"eps=1e-30,1e-2\", \"clip_threshold=0.5\", \"decay_rate=-0.5\", \"weight_decay=0.1\"]")).unwrap();
        let t = &i.config.train;
        assert!(t.adafactor_relative_step && t.adafactor_scale_parameter && !t.adafactor_warmup_init);
        assert_eq!((t.adafactor_beta1, t.adafactor_eps1, t.adafactor_eps2, t.adafactor_clip_threshold, t.adafactor_decay_rate, t.adam_weight_decay), (0.9, 1e-30, 1e-2, 0.5, -0.5, 0.1));
        assert!(i.notes.iter().any(|n| n.contains("lr_scheduler = \"cosine\"")), "{:?}", i.notes);
        assert!(i.notes.iter().any(|n| n.contains("learning rates are not used")), "{:?}", i.notes);
        // warmup_init turns the relative step on, as sd-scripts does.
        let i = import(&format!("{MINIMAL}optimizer_type = \"Adafactor\"\nlr_scheduler = \"adafactor\"\noptimizer_args = [\"relative_step=False\", \"warmup_init=True\", \"beta1=None\"]")).unwrap();
        assert!(i.config.train.adafactor_relative_step && i.config.train.adafactor_warmup_init);
        assert!(i.notes.iter().any(|n| n.contains("warmup_init")), "{:?}", i.notes);
        // What sd-scripts refuses.
        let e = error(&format!("{MINIMAL}optimizer_type = \"Adafactor\"\nlr_warmup_steps = 10"));
        assert!(e.contains("lr_warmup_steps") && e.contains("relative_step"), "{e}");
        let e = error(&format!("{MINIMAL}optimizer_type = \"Adafactor\"\nlr_scheduler = \"adafactor\"\noptimizer_args = [\"relative_step=False\"]"));
        assert!(e.contains("lr_scheduler"), "{e}");
        let e = error(&format!("{MINIMAL}lr_scheduler = \"adafactor\""));
        assert!(e.contains("optimizer_type = \"Adafactor\""), "{e}");
        let e = error(&format!("{MINIMAL}optimizer_type = \"Adafactor\"\noptimizer_args = [\"eps=1e-30\"]"));
        assert!(e.contains("eps=1e-30"), "{e}");
        let e = error(&format!("{MINIMAL}optimizer_type = \"Adafactor\"\noptimizer_args = [\"betas=0.9,0.99\"]"));
        assert!(e.contains("not an argument of transformers' Adafactor"), "{e}");
    }

    /// prodigyplus' ProdigyPlusScheduleFree: its arguments under the package's names
    /// (`eps=None` is Adam-atan2), precision switches accepted, experimental options and
    /// unknown ones refused; a constant rate, as sd-scripts trains a schedule-free
    /// optimizer; the result validates.
    #[test]
    fn prodigy_plus_options_map() {
        let args = "optimizer_args = [\"d_coef=0.5\", \"betas=0.9,0.999\", \"eps=None\", \"use_bias_correction=True\", \"split_groups=False\", \"stochastic_rounding=True\", \"prodigy_steps=100\", \"beta3=None\", \"use_focus=False\", \"use_orthograd=True\", \"use_cautious=True\"]";
        let i = import(&format!("{MINIMAL}optimizer_type = \"prodigyplus.ProdigyPlusScheduleFree\"\nlearning_rate = 1.0\nlr_scheduler = \"cosine\"\nlr_warmup_steps = 100\n{args}")).unwrap();
        let t = &i.config.train;
        assert_eq!((t.optimizer, t.lr_scheduler, t.lr_warmup_steps), (Optimizer::ProdigyPlusScheduleFree, LrScheduler::Constant, 0));
        let p = t.prodigy_plus_settings();
        assert_eq!((p.d_coef, p.betas, p.eps, p.use_bias_correction, p.split_groups, p.prodigy_steps, p.beta3), (0.5, (0.9, 0.999), 0.0, true, false, 100, None));
        assert!(p.use_orthograd && p.use_cautious && !p.use_grams && !p.use_adopt);
        assert!(i.notes.iter().any(|n| n.contains("lr_scheduler = \"cosine\"")) && i.notes.iter().any(|n| n.contains("lr_warmup_steps")), "{:?}", i.notes);
        i.config.validate().unwrap();
        let i = import(&format!("{MINIMAL}optimizer_type = \"prodigyplus.ProdigyPlusScheduleFree\"")).unwrap();
        assert_eq!(i.config.train.prodigy_plus_settings(), lora_core::optim::ProdigyPlusSettings::default());
        for (extra, expected) in [
            ("optimizer_args = [\"use_muon_pp=True\"]", "experimental option"),
            ("optimizer_args = [\"growth_rate=1.02\"]", "not an argument of prodigyplus"),
            ("optimizer_args = [\"betas=0.9\"]", "expected two numbers"),
            ("optimizer_args = [\"prodigy_steps=1.5\"]", "whole number"),
        ] {
            let err = import(&format!("{MINIMAL}optimizer_type = \"prodigyplus.ProdigyPlusScheduleFree\"\n{extra}")).unwrap_err().to_string();
            assert!(err.contains(expected), "{extra}: {err}");
        }
    }

    /// AdamWScheduleFree and RAdamScheduleFree: their arguments, and sd-scripts' constant
    /// rate in place of `lr_scheduler` and `lr_warmup_steps` (the optimizer's own
    /// `warmup_steps` warms up), each replacement with a note; the result validates.
    #[test]
    fn schedule_free_options_map() {
        let args = "optimizer_args = [\"warmup_steps=50\", \"weight_decay=0.01\", \"betas=0.95,0.99\", \"r=0.5\", \"weight_lr_power=1.0\", \"foreach=False\"]";
        let i = import(&format!("{MINIMAL}optimizer_type = \"AdamWScheduleFree\"\nlearning_rate = 1e-3\nlr_scheduler = \"cosine\"\nlr_warmup_steps = 100\n{args}")).unwrap();
        let t = &i.config.train;
        assert_eq!((t.optimizer, t.lr_scheduler, t.lr_warmup_steps, t.lr_warmup_ratio), (Optimizer::AdamwScheduleFree, LrScheduler::Constant, 50, 0.0));
        assert_eq!((t.adam_weight_decay, t.adam_beta1, t.adam_beta2, t.schedule_free_r, t.schedule_free_weight_lr_power), (0.01, 0.95, 0.99, 0.5, 1.0));
        assert!(i.notes.iter().any(|n| n.contains("lr_scheduler = \"cosine\"")) && i.notes.iter().any(|n| n.contains("lr_warmup_steps")), "{:?}", i.notes);
        i.config.validate().unwrap();
        // The package's defaults: no decay, no warmup; the class path works too.
        let i = import(&format!("{MINIMAL}optimizer_type = \"schedulefree.RAdamScheduleFree\"\noptimizer_args = [\"silent_sgd_phase=False\"]")).unwrap();
        let t = &i.config.train;
        assert_eq!((t.optimizer, t.adam_weight_decay, t.lr_warmup_steps, t.schedule_free_silent_sgd_phase), (Optimizer::RadamScheduleFree, 0.0, 0, false));
        assert!(!i.notes.iter().any(|n| n.contains("lr_scheduler")), "{:?}", i.notes);
        i.config.validate().unwrap();
        // sd-scripts never reads the schedule's options then: a scheduler it would refuse, a
        // custom one and a warmup under "constant" are notes, not errors.
        let i = import(&format!("{MINIMAL}optimizer_type = \"AdamWScheduleFree\"\nlr_scheduler = \"adafactor\"\nlr_scheduler_type = \"my.Scheduler\"\nlr_scheduler_args = [\"a=1\"]")).unwrap();
        assert!(i.notes.iter().any(|n| n.contains("lr_scheduler_type")) && i.notes.iter().any(|n| n.contains("lr_scheduler = \"adafactor\"")), "{:?}", i.notes);
        let i = import(&format!("{MINIMAL}optimizer_type = \"AdamWScheduleFree\"\nlr_scheduler = \"constant\"\nlr_warmup_steps = 10")).unwrap();
        assert!(!i.notes.iter().any(|n| n.contains("constant_with_warmup")) && i.notes.iter().any(|n| n.contains("lr_warmup_steps")), "{:?}", i.notes);
        assert_eq!(i.config.train.lr_warmup_steps, 0);
        for (extra, expected) in [
            ("optimizer_type = \"RAdamScheduleFree\"\noptimizer_args = [\"warmup_steps=10\"]", "not an argument of schedulefree's RAdamScheduleFree"),
            ("optimizer_type = \"AdamWScheduleFree\"\noptimizer_args = [\"silent_sgd_phase=True\"]", "not an argument of schedulefree's AdamWScheduleFree"),
            ("optimizer_type = \"AdamWScheduleFree\"\noptimizer_args = [\"warmup_steps=2.5\"]", "whole number"),
            ("optimizer_type = \"SGDScheduleFree\"\noptimizer_args = [\"eps=1e-8\"]", "not an argument of schedulefree's SGDScheduleFree"),
        ] {
            let e = error(&format!("{MINIMAL}{extra}"));
            assert!(e.contains(expected), "{extra}: {e}");
        }
    }

    /// Numbers past what their setting holds are errors naming the option, never values
    /// cut to their low bits (`max_bucket_reso = 4294968320` was 1024) or saturated.
    #[test]
    fn numbers_too_large_for_their_setting_name_the_option() {
        for key in ["min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "dataset_repeats"] {
            let e = error(&format!("{MINIMAL}{key} = 4294968320\n"));
            assert!(e.contains(&format!("`{key}`")) && e.contains("4294967295"), "{key}: {e}");
        }
        let i = import(&format!("{MINIMAL}max_bucket_reso = 4294967295\n")).unwrap();
        assert_eq!(i.config.data.max_bucket_reso, u32::MAX);
        for args in ["network_args = [\"conv_dim=1e300\"]", "network_module = \"lycoris.kohya\"\nnetwork_args = [\"conv_dim=1e300\"]", "network_module = \"networks.dylora\"\nnetwork_args = [\"unit=1e300\"]"] {
            let e = error(&format!("{MINIMAL}{args}\n"));
            assert!(e.contains("network_args") && e.contains("1e300"), "{args}: {e}");
        }
        let e = error(&format!("{MINIMAL}optimizer_type = \"AdamWScheduleFree\"\noptimizer_args = [\"warmup_steps=1e300\"]\n"));
        assert!(e.contains("warmup_steps=1e300"), "{e}");
    }

    /// sd-scripts' fine-tuning data: `in_json` with `train_data_dir` (which absolute keys
    /// do without) and `dataset_repeats`; a dataset config replaces them.
    #[test]
    fn in_json_and_dataset_repeats() {
        let dir = tempfile::tempdir().unwrap();
        let meta = dir.path().join("meta.json");
        std::fs::write(&meta, "{}").unwrap();
        let base = "pretrained_model_name_or_path = \"base.safetensors\"\nresolution = 512\noutput_dir = \"out\"\n";
        let i = import(&format!("{base}train_data_dir = \"images\"\nin_json = {:?}\ndataset_repeats = 4", meta.display().to_string())).unwrap();
        let d = &i.config.data;
        assert_eq!((d.train_data_dir.as_str(), d.in_json.as_str(), d.num_repeats), ("images", meta.to_str().unwrap(), 4));
        let i = import(&format!("{base}in_json = {:?}\nreg_data_dir = \"reg\"", meta.display().to_string())).unwrap();
        assert_eq!((i.config.data.train_data_dir.as_str(), i.config.data.num_repeats, i.config.data.reg_data_dir.as_str()), ("", 1, ""));
        assert!(i.notes.iter().any(|n| n.contains("reg_data_dir is ignored")) && !i.notes.iter().any(|n| n.contains("caption_extension")), "{:?}", i.notes);
        let i = import(&format!("{base}dataset_config = \"d.toml\"\nin_json = {:?}\ndataset_repeats = 2", meta.display().to_string())).unwrap();
        assert!(i.config.data.in_json.is_empty() && i.notes.iter().any(|n| n.contains("in_json is ignored")), "{:?}", i.notes);
        assert_eq!(i.config.data.num_repeats, 2, "the dataset config's subsets default to it");
        let e = error(&format!("{base}in_json = \"missing.json\""));
        assert!(e.contains("`in_json`") && e.contains("missing.json"), "{e}");
        let e = error(&format!("{MINIMAL}dataset_repeats = 0"));
        assert!(e.contains("`dataset_repeats`"), "{e}");
    }

    /// came-pytorch's CAME with its arguments, its defaults without them; other
    /// packages' CAMEs and arguments it does not take are errors.
    #[test]
    fn came_options_map() {
        let args = "optimizer_args = [\"weight_decay=0.04\", \"betas=(0.8,0.99,0.999)\", \"eps=(1e-30,1e-8)\", \"clip_threshold=0.5\"]";
        let i = import(&format!("{MINIMAL}optimizer_type = \"came_pytorch.CAME\"\nlearning_rate = 1e-4\n{args}")).unwrap();
        let t = &i.config.train;
        assert_eq!(t.optimizer, Optimizer::Came);
        let c = t.came_settings().unwrap();
        assert_eq!((c.weight_decay, c.beta_1, c.beta_2, c.beta_3, c.eps_2, c.clip_threshold), (0.04, 0.8, 0.99, 0.999, 1e-8, 0.5));
        let t = import(&format!("{MINIMAL}optimizer_type = \"came_pytorch.CAME\"")).unwrap().config.train;
        assert_eq!(t.came_settings(), Some(lora_core::optim::CameSettings::default()));
        for (extra, expected) in [
            ("optimizer_type = \"pytorch_optimizer.CAME\"", "is not supported"),
            ("optimizer_type = \"came_pytorch.CAME\"\noptimizer_args = [\"amsgrad=False\"]", "not an argument of came_pytorch's CAME"),
            ("optimizer_type = \"came_pytorch.CAME\"\noptimizer_args = [\"betas=(0.9,0.999)\"]", "three numbers"),
            ("optimizer_type = \"came_pytorch.CAME\"\noptimizer_args = [\"betas=(0.9,0.999,1.5)\"]", "betas must be in [0, 1]"),
        ] {
            let e = error(&format!("{MINIMAL}{extra}"));
            assert!(e.contains(expected), "{extra}: {e}");
        }
    }

    /// bitsandbytes' AdEMAMix by its module path (with its defaults, its arguments, the
    /// 8-bit and paged variants noted), and a bare name refused as sd-scripts fails on it.
    #[test]
    fn ademamix_options_map() {
        let t = import(&format!("{MINIMAL}optimizer_type = \"bitsandbytes.optim.AdEMAMix\"")).unwrap().config.train;
        assert_eq!((t.optimizer, t.adam_weight_decay, t.adam_beta1, t.adam_beta2, t.adam_epsilon), (Optimizer::Ademamix, 0.01, 0.9, 0.999, 1e-8));
        assert_eq!((t.ademamix_beta3, t.ademamix_alpha, t.ademamix_t_alpha, t.ademamix_t_beta3), (0.9999, 5.0, 0, 0));
        let args = "optimizer_args = [\"betas=0.9,0.99,0.999\", \"alpha=8\", \"t_alpha=5000\", \"t_beta3=None\", \"weight_decay=0.1\", \"min_8bit_size=16384\"]";
        let i = import(&format!("{MINIMAL}optimizer_type = \"bitsandbytes.optim.AdEMAMix8bit\"\n{args}")).unwrap();
        let t = &i.config.train;
        assert_eq!((t.adam_beta2, t.ademamix_beta3, t.ademamix_alpha, t.ademamix_t_alpha, t.ademamix_t_beta3, t.adam_weight_decay), (0.99, 0.999, 8.0, 5000, 0, 0.1));
        assert!(i.notes.iter().any(|n| n.contains("f32 moments")), "{:?}", i.notes);
        let settings = t.ademamix_settings().unwrap();
        assert_eq!((settings.t_alpha, settings.t_beta3), (Some(5000), None));
        let paged = import(&format!("{MINIMAL}optimizer_type = \"bitsandbytes.optim.PagedAdEMAMix8bit\"")).unwrap();
        assert_eq!(paged.config.train.optimizer, Optimizer::Ademamix);
        for (extra, expected) in [
            ("optimizer_type = \"AdEMAMix8bit\"", "write \"bitsandbytes.optim.AdEMAMix8bit\""),
            ("optimizer_type = \"bitsandbytes.optim.AdEMAMix\"\noptimizer_args = [\"betas=0.9,0.999\"]", "expected three numbers"),
            ("optimizer_type = \"bitsandbytes.optim.AdEMAMix\"\noptimizer_args = [\"t_alpha=0.5\"]", "whole number of steps"),
            ("optimizer_type = \"bitsandbytes.optim.AdEMAMix\"\noptimizer_args = [\"amsgrad=False\"]", "not an argument of bitsandbytes' AdEMAMix"),
            ("optimizer_type = \"bitsandbytes.optim.AdEMAMix\"\noptimizer_args = [\"betas=0.9,0.999,1.0\"]", "the betas must be in [0, 1)"),
        ] {
            let e = error(&format!("{MINIMAL}{extra}"));
            assert!(e.contains(expected), "{extra}: {e}");
        }
    }

    /// sd-scripts' SGDNesterov (momentum 0.9 unless given, Nesterov), its SGDNesterov8bit
    /// (bitsandbytes' kernel: plain momentum, with a note) and PyTorch's SGD by name.
    #[test]
    fn sgd_options_map() {
        let t = import(&format!("{MINIMAL}optimizer_type = \"SGDNesterov\"")).unwrap().config.train;
        assert_eq!((t.optimizer, t.sgd_momentum, t.sgd_nesterov, t.sgd_dampening, t.adam_weight_decay), (Optimizer::Sgd, 0.9, true, 0.0, 0.0));
        let t = import(&format!("{MINIMAL}optimizer_type = \"SGDNesterov\"\noptimizer_args = [\"momentum=0.95\", \"weight_decay=1e-4\"]")).unwrap().config.train;
        assert_eq!((t.sgd_momentum, t.adam_weight_decay), (0.95, 1e-4));
        let i = import(&format!("{MINIMAL}optimizer_type = \"SGDNesterov8bit\"")).unwrap();
        assert_eq!((i.config.train.sgd_momentum, i.config.train.sgd_nesterov), (0.9, false));
        assert!(i.notes.iter().any(|n| n.contains("ignores it and takes plain momentum")), "{:?}", i.notes);
        let t = import(&format!("{MINIMAL}optimizer_type = \"torch.optim.SGD\"\noptimizer_args = [\"momentum=0.8\", \"dampening=0.1\"]")).unwrap().config.train;
        assert_eq!((t.sgd_momentum, t.sgd_dampening, t.sgd_nesterov), (0.8, 0.1, false));
        let t = import(&format!("{MINIMAL}optimizer_type = \"SGD\"")).unwrap().config.train;
        assert_eq!((t.optimizer, t.sgd_momentum), (Optimizer::Sgd, 0.0));
        for (extra, expected) in [
            ("optimizer_type = \"SGDNesterov\"\noptimizer_args = [\"nesterov=False\"]", "passes nesterov=True itself"),
            ("optimizer_type = \"SGDNesterov\"\noptimizer_args = [\"momentum=0\"]", "Nesterov momentum requires a momentum"),
            ("optimizer_type = \"SGD\"\noptimizer_args = [\"nesterov=True\"]", "Nesterov momentum requires a momentum"),
            ("optimizer_type = \"SGD8bit\"", "is not supported"),
        ] {
            let e = error(&format!("{MINIMAL}{extra}"));
            assert!(e.contains(expected), "{extra}: {e}");
        }
    }

    /// `amsgrad=True`: PyTorch's AdamW's AMSGrad; bitsandbytes' 8-bit AdamW takes the
    /// argument and ignores it (a note); transformers' AdamW and the other optimizers
    /// have no such argument.
    #[test]
    fn amsgrad_maps_for_torch_adamw() {
        let t = import(&format!("{MINIMAL}optimizer_type = \"AdamW\"\noptimizer_args = [\"amsgrad=True\"]")).unwrap().config.train;
        assert!(t.amsgrad);
        let t = import(&format!("{MINIMAL}optimizer_type = \"torch.optim.AdamW\"\noptimizer_args = [\"amsgrad=False\"]")).unwrap().config.train;
        assert!(!t.amsgrad);
        let i = import(&format!("{MINIMAL}optimizer_type = \"AdamW8bit\"\noptimizer_args = [\"amsgrad=True\"]")).unwrap();
        assert!(!i.config.train.amsgrad);
        assert!(i.notes.iter().any(|n| n.contains("amsgrad=True") && n.contains("ignores it")), "{:?}", i.notes);
        for extra in ["optimizer_type = \"transformers.optimization.AdamW\"", "optimizer_type = \"Lion\""] {
            let e = error(&format!("{MINIMAL}{extra}\noptimizer_args = [\"amsgrad=True\"]"));
            assert!(e.contains("amsgrad=True"), "{extra}: {e}");
        }
    }

    /// sd-scripts validates after every epoch unless `validate_every_n_epochs` says
    /// otherwise; `save_n_epoch_ratio` carries over.
    #[test]
    fn epoch_validation_and_save_ratio_map() {
        let o = import(MINIMAL).unwrap().config.output;
        assert_eq!((o.validate_every_n_epochs, o.save_n_epoch_ratio), (1, 0));
        let i = import(&format!("{MINIMAL}validate_every_n_epochs = 3\nsave_n_epoch_ratio = 5\nmax_validation_steps = 4\nvalidation_seed = 9")).unwrap();
        let o = &i.config.output;
        assert_eq!((o.validate_every_n_epochs, o.save_n_epoch_ratio, o.max_validation_steps, i.config.data.validation_seed), (3, 5, 4, 9));
        assert!(i.notes.iter().any(|n| n.contains("validation_seed = 9")), "{:?}", i.notes);
    }

    /// sd-scripts' model-spec options become the `[output]` keys of the same names.
    #[test]
    fn model_spec_options_map() {
        let lines = "metadata_title = \"My style\"\nmetadata_tags = \"style, paint\"\nmetadata_trigger_phrase = \"mystyle\"\nmetadata_usage_hint = \"add mystyle\"\nmetadata_thumbnail = \"data:image/png;base64,AAAA\"\nmetadata_merged_from = \"a, b\"\nmetadata_preprocessor = \"none\"\nmetadata_is_negative_embedding = \"false\"";
        let i = import(&format!("{MINIMAL}{lines}")).unwrap();
        let o = &i.config.output;
        assert_eq!((o.metadata_title.as_str(), o.metadata_tags.as_str(), o.metadata_trigger_phrase.as_str(), o.metadata_usage_hint.as_str()), ("My style", "style, paint", "mystyle", "add mystyle"));
        assert_eq!((o.metadata_thumbnail.as_str(), o.metadata_merged_from.as_str(), o.metadata_preprocessor.as_str(), o.metadata_is_negative_embedding.as_str()), ("data:image/png;base64,AAAA", "a, b", "none", "false"));
        assert!(!i.notes.iter().any(|n| n.contains("metadata_")), "{:?}", i.notes);
    }

    /// sd-scripts' SGDScheduleFree: momentum 0.9 unless given, its warmup steps, a
    /// constant schedule; RAdam's and AdamW's arguments are not its own.
    #[test]
    fn sgd_schedule_free_maps() {
        let args = "optimizer_args = [\"momentum=0.95\", \"warmup_steps=50\", \"weight_decay=1e-3\", \"r=0.5\"]";
        let i = import(&format!("{MINIMAL}optimizer_type = \"SGDScheduleFree\"\nlearning_rate = 0.5\nlr_scheduler = \"cosine\"\n{args}")).unwrap();
        let t = &i.config.train;
        assert_eq!((t.optimizer, t.sgd_momentum, t.lr_warmup_steps, t.adam_weight_decay, t.schedule_free_r), (Optimizer::SgdScheduleFree, 0.95, 50, 1e-3, 0.5));
        assert_eq!(t.lr_scheduler, LrScheduler::Constant);
        assert!(t.schedule_free_settings().unwrap().sgd);
        let t = import(&format!("{MINIMAL}optimizer_type = \"schedulefree.SGDScheduleFree\"")).unwrap().config.train;
        assert_eq!((t.sgd_momentum, t.adam_weight_decay), (0.9, 0.0));
        for (extra, expected) in [
            ("optimizer_args = [\"betas=0.9,0.999\"]", "not an argument of schedulefree's SGDScheduleFree"),
            ("optimizer_args = [\"silent_sgd_phase=False\"]", "not an argument of schedulefree's SGDScheduleFree"),
            ("optimizer_args = [\"momentum=0\"]", "momentum must be in (0, 1)"),
        ] {
            let e = error(&format!("{MINIMAL}optimizer_type = \"SGDScheduleFree\"\n{extra}"));
            assert!(e.contains(expected), "{extra}: {e}");
        }
    }

    /// sd-scripts' `DAdaptation` (the package's experimental DAdaptAdamPreprint),
    /// DAdaptLion and DAdaptSGD with their defaults and arguments; each one's foreign
    /// arguments are refused, as its constructor refuses them.
    #[test]
    fn dadapt_variants_map() {
        use lora_core::optim::DAdaptKind;
        let t = import(&format!("{MINIMAL}optimizer_type = \"DAdaptation\"\nlearning_rate = 1.0\noptimizer_args = [\"decouple=True\", \"weight_decay=0.1\", \"growth_rate=1.02\"]")).unwrap().config.train;
        let d = t.dadapt_settings().unwrap();
        assert_eq!((t.optimizer, d.kind, d.decouple, d.growth_rate, t.adam_weight_decay), (Optimizer::DadaptAdamPreprint, DAdaptKind::AdamPreprint, true, 1.02, 0.1));
        let t = import(&format!("{MINIMAL}optimizer_type = \"dadaptation.experimental.DAdaptAdamPreprint\"\nlearning_rate = 1.0")).unwrap().config.train;
        assert_eq!((t.optimizer, t.dadapt_decouple, t.adam_weight_decay), (Optimizer::DadaptAdamPreprint, false, 0.0));
        let t = import(&format!("{MINIMAL}optimizer_type = \"DAdaptLion\"\nlearning_rate = 1.0\noptimizer_args = [\"betas=0.95,0.98\", \"weight_decay=0.5\"]")).unwrap().config.train;
        assert_eq!((t.optimizer, t.lion_beta1, t.lion_beta2, t.adam_weight_decay), (Optimizer::DadaptLion, 0.95, 0.98, 0.5));
        assert_eq!(t.dadapt_settings().unwrap().kind, DAdaptKind::Lion);
        let t = import(&format!("{MINIMAL}optimizer_type = \"DAdaptSGD\"\nlearning_rate = 1.0\noptimizer_args = [\"momentum=0.9\", \"d0=1e-5\"]")).unwrap().config.train;
        assert_eq!((t.optimizer, t.dadapt_momentum, t.dadapt_d0), (Optimizer::DadaptSgd, 0.9, 1e-5));
        let t = import(&format!("{MINIMAL}optimizer_type = \"DAdaptAdaGrad\"\nlearning_rate = 1.0\noptimizer_args = [\"momentum=0.5\"]")).unwrap().config.train;
        assert_eq!((t.optimizer, t.dadapt_momentum, t.adam_epsilon, t.adam_weight_decay), (Optimizer::DadaptAdagrad, 0.5, 1e-6, 0.0));
        let t = import(&format!("{MINIMAL}optimizer_type = \"DAdaptAdan\"\nlearning_rate = 1.0")).unwrap().config.train;
        assert_eq!((t.optimizer, t.adam_beta1, t.adam_beta2, t.dadapt_beta3, t.adam_weight_decay, t.dadapt_no_prox), (Optimizer::DadaptAdan, 0.98, 0.92, 0.99, 0.02, false));
        let t = import(&format!("{MINIMAL}optimizer_type = \"DAdaptAdan\"\noptimizer_args = [\"betas=0.9,0.8,0.95\", \"no_prox=True\", \"weight_decay=0\"]")).unwrap().config.train;
        assert_eq!((t.adam_beta1, t.adam_beta2, t.dadapt_beta3, t.adam_weight_decay, t.dadapt_no_prox), (0.9, 0.8, 0.95, 0.0, true));
        assert_eq!(t.dadapt_settings().unwrap().kind, DAdaptKind::Adan);
        for (extra, expected) in [
            ("optimizer_type = \"DAdaptLion\"\noptimizer_args = [\"growth_rate=1.02\"]", "not an argument of dadaptation's DAdaptLion"),
            ("optimizer_type = \"DAdaptLion\"\noptimizer_args = [\"decouple=True\"]", "not an argument of dadaptation's DAdaptLion"),
            ("optimizer_type = \"DAdaptSGD\"\noptimizer_args = [\"betas=0.9,0.99\"]", "not an argument of dadaptation's DAdaptSGD"),
            ("optimizer_type = \"DAdaptation\"\noptimizer_args = [\"use_bias_correction=True\"]", "not an argument of dadaptation's DAdaptAdamPreprint"),
            ("optimizer_type = \"DAdaptSGD\"\noptimizer_args = [\"momentum=1.5\"]", "momentum must be in [0, 1)"),
            ("optimizer_type = \"DAdaptAdan\"\noptimizer_args = [\"betas=0.9,0.8\"]", "expected three numbers"),
            ("optimizer_type = \"DAdaptAdaGrad\"\noptimizer_args = [\"betas=0.9,0.8\"]", "not an argument of dadaptation's DAdaptAdaGrad"),
        ] {
            let e = error(&format!("{MINIMAL}{extra}"));
            assert!(e.contains(expected), "{extra}: {e}");
        }
    }

    /// The kohya_ss GUI's DAdaptAdam preset, and the package's defaults without arguments.
    #[test]
    fn dadapt_adam_options_map() {
        let args = "optimizer_args = [\"decouple=True\", \"weight_decay=0.2\", \"betas=0.9,0.99\", \"growth_rate=1.02\"]";
        let i = import(&format!("{MINIMAL}optimizer_type = \"DAdaptAdam\"\nlearning_rate = 1.0\nlr_scheduler = \"cosine\"\n{args}")).unwrap();
        let t = &i.config.train;
        assert_eq!((t.optimizer, t.dadapt_decouple, t.adam_weight_decay, t.adam_beta2, t.dadapt_growth_rate), (Optimizer::DadaptAdam, true, 0.2, 0.99, 1.02));
        let t = import(&format!("{MINIMAL}optimizer_type = \"dadaptation.DAdaptAdam\"\nlearning_rate = 1.0")).unwrap().config.train;
        assert_eq!((t.dadapt_decouple, t.adam_weight_decay, t.dadapt_d0, t.dadapt_use_bias_correction), (false, 0.0, 1e-6, false));
        let e = error(&format!("{MINIMAL}optimizer_type = \"DAdaptAdanIP\""));
        assert!(e.contains("is not supported"), "{e}");
        let e = error(&format!("{MINIMAL}optimizer_type = \"DAdaptAdam\"\noptimizer_args = [\"amsgrad=False\"]"));
        assert!(e.contains("not an argument of dadaptation's DAdaptAdam"), "{e}");
        // sd-scripts' DAdaptAdam fails on a text-encoder rate of its own: a note says so.
        let i = import(&format!("{MINIMAL}optimizer_type = \"DAdaptAdam\"\nunet_lr = 1.0\ntext_encoder_lr = 0.5")).unwrap();
        assert!(i.notes.iter().any(|n| n.contains("own estimate")), "{:?}", i.notes);
        // Other optimizers keep DAdaptAdam's and Adafactor's keys at this trainer's defaults.
        let t = import(MINIMAL).unwrap().config.train;
        assert!(t.dadapt_decouple && !t.adafactor_relative_step && !t.adafactor_scale_parameter);
        // Adafactor's relative step replaces a cosine_with_min_lr without its ratio, as in
        // sd-scripts; without Adafactor that is an error.
        let i = import(&format!("{MINIMAL}optimizer_type = \"Adafactor\"\nlr_scheduler = \"cosine_with_min_lr\"")).unwrap();
        assert_eq!(i.config.train.lr_scheduler_min_lr_ratio, 0.0);
    }

    /// `caption_separator` reaches the data settings; this trainer refuses an empty one.
    #[test]
    fn caption_separator_maps() {
        let c = import(&format!("{MINIMAL}caption_separator = \"|\"\nshuffle_caption = true")).unwrap().config;
        assert_eq!((c.data.caption_separator.as_str(), c.data.shuffle_caption), ("|", true));
        assert_eq!(import(MINIMAL).unwrap().config.data.caption_separator, ",");
        let e = TrainConfig::load(None, &["data.caption_separator=\"\"".into()]).unwrap_err().to_string();
        assert!(e.contains("data.caption_separator"), "{e}");
    }

    /// kohya's `vae` becomes `model.vae` when it is there; a Hugging Face id is an error
    /// naming the key.
    #[test]
    fn vae_maps_when_it_is_a_local_path() {
        let dir = tempfile::tempdir().unwrap();
        let vae = dir.path().join("vae.safetensors");
        std::fs::write(&vae, b"").unwrap();
        let c = import(&format!("{MINIMAL}vae = {:?}", vae.display().to_string())).unwrap().config;
        assert_eq!(c.model.vae, vae.display().to_string());
        assert_eq!(import(MINIMAL).unwrap().config.model.vae, "");
        let e = error(&format!("{MINIMAL}vae = \"stabilityai/sd-vae-ft-mse\""));
        assert!(e.contains("`vae`") && e.contains("not a file or folder"), "{e}");
    }

    /// The token warmup reaches the data settings (a step count or a fraction of the
    /// run); a negative one is an error naming the key.
    #[test]
    fn token_warmup_maps() {
        let c = import(&format!("{MINIMAL}token_warmup_min = 3\ntoken_warmup_step = 0.25")).unwrap().config;
        assert_eq!((c.data.token_warmup_min, c.data.token_warmup_step), (3, 0.25));
        let c = import(&format!("{MINIMAL}token_warmup_step = 100")).unwrap().config;
        assert_eq!((c.data.token_warmup_min, c.data.token_warmup_step), (1, 100.0));
        let e = TrainConfig::load(None, &["data.token_warmup_step=-1.0".into()]).unwrap_err().to_string();
        assert!(e.contains("data.token_warmup_step"), "{e}");
    }

    /// `resize_interpolation` by sd-scripts' names (unset: sd-scripts' default per image).
    #[test]
    fn resize_interpolation_maps() {
        let c = import(&format!("{MINIMAL}resize_interpolation = \"cubic\"")).unwrap().config;
        assert_eq!(c.data.resize_interpolation, Some(sd_data::ResizeInterpolation::Bicubic));
        assert_eq!(import(MINIMAL).unwrap().config.data.resize_interpolation, None);
        let e = error(&format!("{MINIMAL}resize_interpolation = \"hamming\""));
        assert!(e.contains("`resize_interpolation`") && e.contains("area"), "{e}");
    }

    /// `face_crop_aug_range` ("lo,hi") without buckets; ignored with buckets (a note), as
    /// sd-scripts ignores it; a bad range is an error naming the option.
    #[test]
    fn face_crop_aug_range_maps() {
        let c = import(&format!("{MINIMAL}face_crop_aug_range = \"2.0,4.0\"")).unwrap().config;
        assert_eq!(c.data.face_crop_aug_range, Some([2.0, 4.0]));
        let i = import(&format!("{MINIMAL}face_crop_aug_range = \"2,4\"\nenable_bucket = true")).unwrap();
        assert!(i.config.data.face_crop_aug_range.is_none() && i.notes.iter().any(|n| n.contains("face_crop_aug_range")), "{:?}", i.notes);
        for bad in ["\"4.0,2.0\"", "\"2.0\"", "\"a,b\"", "true"] {
            let e = error(&format!("{MINIMAL}face_crop_aug_range = {bad}"));
            assert!(e.contains("`face_crop_aug_range`"), "{bad}: {e}");
        }
    }

    /// transformers' newer schedules with the options sd-scripts passes them, and the
    /// options they need.
    #[test]
    fn newer_schedules_map_with_their_options() {
        let c = import(&format!("{MINIMAL}lr_scheduler = \"cosine_with_min_lr\"\nlr_scheduler_min_lr_ratio = 0.1\nlr_scheduler_num_cycles = 2")).unwrap().config;
        assert_eq!((c.train.lr_scheduler, c.train.lr_scheduler_min_lr_ratio, c.train.lr_cycles), (LrScheduler::CosineWithMinLr, 0.1, 2));
        let c = import(&format!("{MINIMAL}lr_scheduler = \"warmup_stable_decay\"\nlr_decay_steps = 0.2\nlr_warmup_steps = 10")).unwrap().config;
        assert_eq!((c.train.lr_scheduler, c.train.lr_decay_ratio, c.train.decay_steps()), (LrScheduler::WarmupStableDecay, 0.2, 320));
        let c = import(&format!("{MINIMAL}lr_scheduler = \"inverse_sqrt\"\nlr_scheduler_timescale = 100")).unwrap().config;
        assert_eq!((c.train.lr_scheduler, c.train.lr_scheduler_timescale), (LrScheduler::InverseSqrt, 100));
        let e = error(&format!("{MINIMAL}lr_scheduler = \"cosine_with_min_lr\""));
        assert!(e.contains("`lr_scheduler_min_lr_ratio` is missing"), "{e}");
        let e = error(&format!("{MINIMAL}lr_scheduler = \"warmup_stable_decay\"\nlr_decay_steps = 1.5"));
        assert!(e.contains("`lr_decay_steps` = 1.5"), "{e}");
    }

    #[test]
    fn base_weights_take_their_multipliers() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.safetensors"), dir.path().join("b.safetensors"));
        std::fs::write(&a, b"").unwrap();
        std::fs::write(&b, b"").unwrap();
        let text = format!("{MINIMAL}base_weights = [\"{}\", \"{}\"]\nbase_weights_multiplier = [0.5]", a.display(), b.display());
        let c = import(&text).unwrap().config;
        assert_eq!(c.model.base_weights, [format!("{}:0.5", a.display()), format!("{}:1", b.display())]);
        let e = error(&format!("{MINIMAL}base_weights = \"{}\"", dir.path().join("none.safetensors").display()));
        assert!(e.contains("`base_weights` names") && e.contains("none.safetensors"), "{e}");
        assert!(import(&format!("{MINIMAL}base_weights = \"\"")).unwrap().config.model.base_weights.is_empty());
        // Masks: sd-scripts ignores a top-level mask folder next to alpha_mask.
        let i = import(&format!("{MINIMAL}alpha_mask = true\nmasked_loss = true\nconditioning_data_dir = \"m\"")).unwrap();
        assert!(i.config.data.alpha_mask && i.config.data.mask_dir.is_empty());
        assert!(i.notes.iter().any(|n| n.contains("is not read")), "{:?}", i.notes);
    }

    #[test]
    fn prompt_tables_become_prompt_lines() {
        let dir = tempfile::tempdir().unwrap();
        let toml_file = dir.path().join("p.toml");
        std::fs::write(&toml_file, "[prompt]\nwidth = 640\nscale = 6\n[[prompt.subset]]\nprompt = \"a\"\nseed = 3\n[[prompt.subset]]\nprompt = \"b\"\nnegative_prompt = \"ugly\"\nwidth = 512\n").unwrap();
        let c = import(&format!("{MINIMAL}sample_prompts = \"{}\"", toml_file.display())).unwrap().config;
        assert_eq!(c.output.sample_prompts, ["a --w 640 --h 512 --d 3 --l 6", "b --n ugly --w 512 --h 512 --l 6"]);
        let json_file = dir.path().join("p.json");
        std::fs::write(&json_file, r#"[{"prompt": "c", "sample_steps": 12, "sample_sampler": "dpmsolver++"}, "d --h 256"]"#).unwrap();
        let c = import(&format!("{MINIMAL}sample_prompts = \"{}\"", json_file.display())).unwrap().config;
        assert_eq!(c.output.sample_prompts, ["c --w 512 --h 512 --s 12 --ss dpmpp_2m", "d --h 256 --w 512"]);
        let e = error(&format!("{MINIMAL}sample_prompts = \"{}\"", dir.path().join("none.txt").display()));
        assert!(e.contains("`sample_prompts`") && e.contains("none.txt"), "{e}");
    }

    /// The kohya_ss GUI's LyCORIS/LoHa and LyCORIS/LoKr configs (its `network_args`, every
    /// flag written out): LyCORIS' algorithm, preset targets, conv_dim / conv_alpha
    /// defaults, LoKr's factor and its string-typed `decompose_both`.
    #[test]
    fn lycoris_configs_map() {
        let gui = |algo: &str, extra: &str| {
            format!(
                "{MINIMAL}network_module = \"lycoris.kohya\"\nnetwork_dim = 8\nnetwork_alpha = 4\nnetwork_args = [\"preset=full\", \"conv_dim=4\", \"conv_alpha=1\", \"use_tucker=False\", \"rank_dropout=0\", \"bypass_mode=False\", \"dora_wd=False\", \"module_dropout=0.1\", \"use_scalar=False\", \"rank_dropout_scale=False\", \"algo={algo}\", \"train_norm=False\"{extra}]"
            )
        };
        let loha = import(&gui("loha", "")).unwrap();
        let l = &loha.config.lora;
        assert_eq!((l.algo, l.rank, l.alpha, l.conv_rank, l.conv_alpha, l.module_dropout), (lora_core::Algo::Loha, 8, 4.0, 4, 1.0, 0.1));
        assert_eq!((l.unet_targets, l.text_encoder_targets), (UnetTargets::Conv, TextEncoderTargets::AttnMlp));
        let selection = sd_model::targets::Selection::new(l.unet_targets).include(l.include.clone()).exclude(l.exclude.clone());
        for (path, conv) in [("conv_in", true), ("conv_out", true), ("time_embedding.linear_1", false), ("down_blocks.0.resnets.0.conv1", true), ("down_blocks.0.attentions.0.proj_in", false)] {
            assert!(selection.selects(path, conv), "full preset: {path}");
        }
        loha.config.validate().unwrap();

        // DoRA on LoHa / LoKr (LyCORIS' weight_decompose), without the LoRA note.
        let doha = import(&gui("loha", "").replace("dora_wd=False", "dora_wd=True")).unwrap();
        assert!(doha.config.lora.dora && !doha.notes.iter().any(|n| n.contains("dora_wd")), "{:?}", doha.notes);
        doha.config.validate().unwrap();
        // LyCORIS' rank dropout on LoHa / LoKr, with its scaling.
        let dropped = import(&gui("lokr", "").replace("rank_dropout=0", "rank_dropout=0.25").replace("rank_dropout_scale=False", "rank_dropout_scale=True")).unwrap();
        // rank_dropout_scale never reaches LyCORIS' modules: they do not rescale.
        assert_eq!((dropped.config.lora.rank_dropout, dropped.config.lora.rank_dropout_scale), (0.25, false));
        dropped.config.validate().unwrap();
        // LyCORIS' trained scalar on LoHa / LoKr; not on a LoCon.
        let scaled = import(&gui("loha", "").replace("use_scalar=False", "use_scalar=True")).unwrap();
        assert!(scaled.config.lora.use_scalar);
        scaled.config.validate().unwrap();
        let e = error(&gui("locon", "").replace("use_scalar=False", "use_scalar=True"));
        assert!(e.contains("use_scalar=True"), "{e}");
        // A LoCon's rank dropout is LyCORIS' too (rows of ΔW), unscaled as LyCORIS'.
        let locon = import(&gui("locon", "").replace("rank_dropout=0", "rank_dropout=0.25").replace("rank_dropout_scale=False", "rank_dropout_scale=True")).unwrap();
        let l = &locon.config.lora;
        assert_eq!((l.algo, l.rank_dropout, l.lycoris_rank_dropout, l.rank_dropout_scale), (lora_core::Algo::Lora, 0.25, true, false));
        locon.config.validate().unwrap();
        assert!(!import(&gui("locon", "").replace("rank_dropout_scale=False", "rank_dropout_scale=True")).unwrap().config.lora.rank_dropout_scale, "nothing to scale");

        let lokr = import(&gui("lokr", ", \"factor=8\", \"use_cp=False\", \"decompose_both=False\"")).unwrap();
        let l = &lokr.config.lora;
        assert_eq!((l.algo, l.lokr_factor, l.lokr_decompose_both), (lora_core::Algo::Lokr, 8, true));
        assert!(lokr.notes.iter().any(|n| n.contains("decompose_both=False") && n.contains("as true")), "{:?}", lokr.notes);
        assert!(!l.lokr_full_matrix && !l.lokr_unbalanced_factorization);
        // LoKr's full-matrix and unbalanced modes (read as LyCORIS' str_bool reads them);
        // ignored with a note under another algorithm, as LyCORIS ignores them.
        let full = import(&gui("lokr", ", \"factor=4\", \"full_matrix=True\", \"unbalanced_factorization=true\"")).unwrap();
        let l = &full.config.lora;
        assert_eq!((l.lokr_factor, l.lokr_full_matrix, l.lokr_unbalanced_factorization), (4, true, true));
        full.config.validate().unwrap();
        let loha = import(&gui("loha", ", \"full_matrix=True\"")).unwrap();
        assert!(!loha.config.lora.lokr_full_matrix && loha.notes.iter().any(|n| n.contains("full_matrix")), "{:?}", loha.notes);
        loha.config.validate().unwrap();

        // LyCORIS' defaults: conv_dim and conv_alpha are network_dim and network_alpha; the
        // preset decides the targets.
        let base = format!("{MINIMAL}network_module = \"lycoris.kohya\"\nnetwork_dim = 8\nnetwork_alpha = 4\n");
        let c = import(&format!("{base}network_args = [\"algo=locon\"]")).unwrap().config;
        assert_eq!((c.lora.algo, c.lora.unet_targets, c.lora.conv_rank, c.lora.conv_alpha), (lora_core::Algo::Lora, UnetTargets::Conv, 8, 4.0));
        let c = import(&format!("{base}network_args = [\"algo=loha\", \"preset=attn-only\"]")).unwrap().config;
        assert_eq!((c.lora.unet_targets, c.lora.text_encoder_targets, c.lora.conv_rank), (UnetTargets::Attn, TextEncoderTargets::Attn, 0));
        let c = import(&format!("{base}network_args = [\"algo=loha\", \"preset=unet-transformer-only\"]")).unwrap().config;
        assert_eq!((c.lora.unet_targets, c.lora.text_encoder_targets), (UnetTargets::AttnMlp, TextEncoderTargets::None));
        for (preset, conv) in [("full-lin", "conv_dim=4"), ("full", "conv_dim=0")] {
            let c = import(&format!("{base}network_args = [\"algo=loha\", \"preset={preset}\", \"{conv}\"]")).unwrap().config;
            let selection = sd_model::targets::Selection::new(c.lora.unet_targets).include(c.lora.include.clone()).exclude(c.lora.exclude.clone());
            assert!(selection.selects("time_embedding.linear_1", false) && selection.selects("down_blocks.0.resnets.0.time_emb_proj", false), "{preset}");
            assert!(!selection.selects("down_blocks.0.resnets.0.conv1", true) && !selection.selects("conv_in", true), "{preset}: no 3x3 convolutions");
        }
        let c = import(&format!("{base}network_args = [\"algo=lokr\", \"preset=unet-convblock-only\"]")).unwrap().config;
        let selection = sd_model::targets::Selection::new(c.lora.unet_targets).include(c.lora.include.clone()).exclude(c.lora.exclude.clone());
        assert!(selection.selects("conv_out", true) && selection.selects("up_blocks.1.upsamplers.0.conv", true));
        assert!(!selection.selects("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", false));
        // The GUI's LoKr line writes use_tucker before use_cp: LyCORIS overwrites use_tucker
        // with use_cp's "False", and trains no Tucker convolutions.
        let c = import(&format!("{base}network_args = [\"algo=lokr\", \"use_tucker=True\", \"use_cp=False\", \"factor=0\", \"decompose_both=\"]")).unwrap().config;
        assert_eq!((c.lora.lokr_factor, c.lora.lokr_decompose_both, c.lora.use_tucker), (1, false, false), "factor 0 splits as 1; an empty string is false");
        // Tucker convolutions for LoHa, LoKr and LoCon, also by LyCORIS' older names (an empty
        // `disable_conv_cp` is false, `not` it true).
        for args in ["\"algo=loha\", \"use_tucker=True\"", "\"algo=lokr\", \"use_cp=True\"", "\"algo=loha\", \"disable_conv_cp=\"", "\"algo=loha\", \"disable_conv_cp=True\"", "\"algo=locon\", \"use_tucker=True\"", "\"use_conv_cp=True\""] {
            let i = import(&format!("{base}network_args = [{args}]")).unwrap();
            assert!(i.config.lora.use_tucker, "{args}");
            assert_eq!(i.notes.iter().any(|n| n.contains("disable_conv_cp")), args.contains("disable_conv_cp=True"), "{args}: {:?}", i.notes);
            assert!(!i.notes.iter().any(|n| n.contains("changes nothing")), "{args}: {:?}", i.notes);
            i.config.validate().unwrap();
        }
        // Without 3x3 convolutions Tucker does nothing: a note.
        let i = import(&format!("{base}network_args = [\"algo=loha\", \"use_tucker=True\", \"preset=attn-only\"]")).unwrap();
        assert!(i.config.lora.use_tucker && i.notes.iter().any(|n| n.contains("use_tucker changes nothing")), "{:?}", i.notes);
        // LoKr's settings do nothing for LoHa; LoRA+ does nothing for LoHa / LoKr.
        let c = import(&format!("{base}network_args = [\"algo=loha\", \"factor=4\", \"loraplus_lr_ratio=16\"]")).unwrap();
        assert_eq!((c.config.lora.lokr_factor, c.config.lora.loraplus_lr_ratio), (-1, 0.0));
        c.config.validate().unwrap();
        // SDXL: LyCORIS' full preset does not reach conv_in, conv_out or the time embedding.
        let sdxl = base.replace("base.safetensors", "tiny-sdxl");
        let c = import(&format!("{sdxl}network_args = [\"algo=loha\"]")).unwrap();
        assert!(c.config.lora.include.is_empty(), "{:?}", c.config.lora.include);
        assert!(!c.notes.iter().any(|n| n.contains("family is not known")), "{:?}", c.notes);
        let c = import(&format!("{base}network_args = [\"algo=loha\"]")).unwrap();
        assert!(c.notes.iter().any(|n| n.contains("family is not known") && n.contains("conv_in")), "{:?}", c.notes);
        // network_dropout reaches LyCORIS as `dropout`, which LoHa ignores.
        let c = import(&format!("{base}network_dropout = 0.1\nnetwork_args = [\"algo=loha\"]")).unwrap();
        assert_eq!(c.config.lora.network_dropout, 0.0);
        assert!(c.notes.iter().any(|n| n.contains("is ignored, as LyCORIS ignores it")), "{:?}", c.notes);
        let c = import(&format!("{base}network_dropout = 0.1\nnetwork_args = [\"algo=locon\"]")).unwrap();
        assert_eq!(c.config.lora.network_dropout, 0.0, "LoCon ignores it too, outside bypass mode");
        assert!(error(&format!("{base}network_dropout = 0.1\nnetwork_args = [\"algo=locon\", \"bypass_mode=True\"]")).contains("bypass_mode"));
    }

    /// sd-scripts' sample sampler names become this trainer's: its twins without a note,
    /// `dpmsolver` (which sd-scripts' diffusers refuses) and unknown names with one; each
    /// result is a name `sd_sched` builds.
    #[test]
    fn sample_sampler_names_map() {
        let cases = [
            ("dpmsingle", "dpmsingle", false),
            ("dpmsolver++", "dpmpp_2m", false),
            ("k_lms", "lms", false),
            ("k_dpm_2_a", "dpm_2_a", false),
            ("dpmsolver", "dpmsolver", true),
            ("k_heun", "ddim", true),
            ("dpmpp_3m_karras", "dpmpp_3m_karras", false),
        ];
        for (kohya, ours, noted) in cases {
            let mut notes = vec![];
            assert_eq!(sampler_name(kohya, &mut notes), ours, "{kohya}");
            assert_eq!(!notes.is_empty(), noted, "{kohya}: {notes:?}");
            let spec: sd_sched::SamplerSpec = ours.parse().unwrap();
            assert!(spec.build::<burn::backend::Flex>(&sd_sched::SchedulerConfig::sd15()).is_ok(), "{ours}");
        }
    }

    /// Each bad input is an error naming the option and what was expected.
    #[test]
    fn bad_options_are_errors_naming_them() {
        let cases = [
            ("network_dims = 8", "`network_dims` is not an sd-scripts training option this importer knows; did you mean `network_dim`?"),
            ("train_inpainting = true", "`train_inpainting` = true: inpainting models"),
            ("optimizer_type = \"dadaptation.experimental.DAdaptAdanIP\"", "`optimizer_type` = \"dadaptation.experimental.DAdaptAdanIP\" is not supported"),
            ("network_module = \"networks.lora_flux\"", "`network_module` = \"networks.lora_flux\" is not supported"),
            ("network_dim = \"abc\"", "`network_dim` must be a number"),
            ("network_dim = 4.5", "`network_dim` must be a whole number"),
            ("optimizer_args = [\"weight_decay\"]", "`optimizer_args`: `weight_decay` is not KEY=VALUE"),
            ("optimizer_args = [\"maximize=True\"]", "`maximize=True`: not supported"),
            ("lr_scheduler = \"rex\"", "`lr_scheduler` = \"rex\" is not supported"),
            ("lr_scheduler = \"adafactor\"", "`lr_scheduler` = \"adafactor\" needs optimizer_type = \"Adafactor\""),
            ("lr_warmup_steps = 1.5", "`lr_warmup_steps` = 1.5: expected a whole number of steps or a share"),
            ("network_module = \"lycoris.kohya\"\nnetwork_args = [\"algo=dylora\"]", "`algo=dylora`: this trainer trains LyCORIS' lora / locon, loha, lokr, diag-oft, boft, glora, ia3 and full"),
            ("network_module = \"lycoris.kohya\"\nnetwork_args = [\"algo=diag-oft\", \"constraint=x\"]", "`constraint=x`: expected a number"),
            ("network_module = \"lycoris.kohya\"\nnetwork_args = [\"algo=locon\", \"rank_dropout=0.1\", \"bypass_mode=True\"]", "`rank_dropout=0.1` with algo=locon and bypass_mode"),
            ("network_module = \"lycoris.kohya\"\nnetwork_args = [\"algo=lora\", \"rank_dropout=0.1\", \"dora_wd=True\"]", "`rank_dropout=0.1` with algo=lora and dora_wd"),
            ("network_module = \"lycoris.kohya\"\nnetwork_args = [\"preset=my.toml\"]", "`preset=my.toml`: expected one of LyCORIS' presets"),
            ("network_module = \"lycoris.kohya\"\nnetwork_args = [\"algo=lokr\", \"factor=1.5\"]", "`factor=1.5`: expected a whole number"),
            ("network_module = \"lycoris.kohya\"\nnetwork_args = [\"algo=lora\", \"dora_wd=True\", \"wd_on_output=False\"]", "`wd_on_output=False`"),
            ("network_module = \"lycoris.kohya\"\nnetwork_train_text_encoder_only = true\nnetwork_args = [\"preset=unet-only\"]", "leaves nothing to train"),
            ("train_inpainting = true", "`train_inpainting` = true: inpainting"),
            ("mixed_precision = \"fp8\"", "`mixed_precision` = \"fp8\""),
        ];
        for (extra, expected) in cases {
            let e = error(&format!("{MINIMAL}{extra}"));
            assert!(e.starts_with("kohya.toml: ") && e.contains(expected), "{extra}: {e}");
        }
        let e = error("[a]\nseed = 1\n[b]\nseed = 2\n");
        assert!(e.contains("`seed` is set twice, in [a] and in [b]"), "{e}");
        for bad in ["\"512,0\"", "\"512x768\"", "\"512,768,1024\"", "-512"] {
            let e = error(&MINIMAL.replace("resolution = 512", &format!("resolution = {bad}")));
            assert!(e.contains("`resolution`"), "{bad}: {e}");
        }
        let e = error(&MINIMAL.replace("pretrained_model_name_or_path", "#"));
        assert!(e.contains("`pretrained_model_name_or_path` is missing"), "{e}");
    }

    /// A non-square `resolution` is width then height: sd-scripts' `"512,768"`, and the
    /// bracketed forms this import also reads.
    #[test]
    fn non_square_resolutions_read_width_first() {
        for text in ["\"512,768\"", "\"(512, 768)\"", "[512, 768]"] {
            let c = import(&MINIMAL.replace("resolution = 512", &format!("resolution = {text}"))).unwrap().config;
            assert_eq!((c.data.resolution.width, c.data.resolution.height), (512, 768), "{text}");
        }
    }

    /// `trainer train --config` on a kohya config says how to convert it.
    #[test]
    fn our_loader_points_kohya_configs_here() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kohya.toml");
        std::fs::write(&path, format!("[model_arguments]\n{MINIMAL}")).unwrap();
        let e = TrainConfig::load(Some(&path), &[]).unwrap_err().to_string();
        assert!(e.contains("trainer import-kohya"), "{e}");
    }
}
