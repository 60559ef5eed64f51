//! What a checkpoint holds, from its configs and headers alone (`trainer info MODEL`): its
//! family (SD1.x, SD2.x, SDXL), layout, each component's parameter count and dtypes, EMA
//! weights, the prediction type where the checkpoint says, and its metadata.
//!
//! ```no_run
//! let info = sd_model::inspect::inspect_checkpoint("models/sd15.safetensors".as_ref()).unwrap();
//! println!("{} ({}), UNet {:.0}M parameters", info.family, info.layout, info.components[0].parameters as f64 / 1e6);
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use crate::load::{ModelSource, WeightFile};
use crate::{Result, SdModelError};

/// One component's weights.
#[derive(Debug, Clone, PartialEq)]
pub struct ComponentInfo {
    /// `UNet`, `text encoder`, `text encoder 2`, `VAE` or `EMA`.
    pub name: &'static str,
    /// Values held (all tensors, float or not).
    pub parameters: u64,
    /// Tensors per dtype (`F16`, `F32`, ...).
    pub dtypes: BTreeMap<String, usize>,
}

/// What [`inspect_checkpoint`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointInfo {
    /// `SD1.x`, `SD2.x` or `SDXL`.
    pub family: &'static str,
    /// `single file` or `diffusers folder`.
    pub layout: &'static str,
    /// The components found, UNet first.
    pub components: Vec<ComponentInfo>,
    /// `epsilon`, `v_prediction` or `sample` where a scheduler config or the model spec
    /// says, or a single file's `v_pred` marker key, or an unmarked SD2.x single file's
    /// weights ([`crate::convert::sd2_v_prediction`]); `None` where nothing does.
    pub prediction: Option<String>,
    /// Header metadata (a single file's, or a diffusers folder's UNet file's).
    pub metadata: BTreeMap<String, String>,
}

fn add(component: &mut ComponentInfo, file: &WeightFile, key: &str) {
    if let Some((dtype, _)) = file.raw(key) {
        *component.dtypes.entry(format!("{dtype:?}")).or_insert(0) += 1;
    }
    component.parameters += file.shape(key).map_or(0, |s| s.iter().product::<usize>() as u64);
}

fn component(name: &'static str) -> ComponentInfo {
    ComponentInfo { name, parameters: 0, dtypes: BTreeMap::new() }
}

/// Describes the checkpoint at `path` (a diffusers folder or a single `.safetensors`
/// file). A file that is not a checkpoint (no UNet weights) is an error saying so.
pub fn inspect_checkpoint(path: &Path) -> Result<CheckpointInfo> {
    let source = ModelSource::detect(path)?;
    let family = source.family()?.name();
    let mut components = Vec::new();
    let mut metadata = BTreeMap::new();
    let mut prediction = None;
    match &source {
        ModelSource::SingleFile(file_path) => {
            let file = WeightFile::open(file_path)?;
            let parts: [(&'static str, &[&str]); 5] = [
                ("UNet", &[crate::keymap::LDM_UNET_PREFIX]),
                ("text encoder", &["cond_stage_model.", "conditioner.embedders.0."]),
                ("text encoder 2", &["conditioner.embedders.1."]),
                ("VAE", &["first_stage_model."]),
                ("EMA", &["model_ema."]),
            ];
            let mut found: Vec<ComponentInfo> = parts.iter().map(|(name, _)| component(name)).collect();
            for key in file.keys() {
                if let Some(i) = parts.iter().position(|(_, prefixes)| prefixes.iter().any(|p| key.starts_with(p))) {
                    add(&mut found[i], &file, key);
                }
            }
            if found[0].parameters == 0 {
                return Err(SdModelError::Layout { path: path.to_path_buf(), reason: "no UNet weights (`model.diffusion_model.*`): not a Stable Diffusion checkpoint".into() });
            }
            // Some v-prediction checkpoints mark themselves with an empty `v_pred` key.
            prediction = crate::convert::single_file_prediction(&file).0.map(|p| p.name().to_string());
            components = found.into_iter().filter(|c| c.parameters > 0).collect();
            metadata = file.metadata().clone().into_iter().collect();
        }
        ModelSource::Diffusers(dir) => {
            for (name, folder) in [("UNet", "unet"), ("text encoder", "text_encoder"), ("text encoder 2", "text_encoder_2"), ("VAE", "vae")] {
                // The file the loaders read; a folder without the component is skipped.
                let Ok(file) = ModelSource::weights_file(dir, folder) else {
                    continue;
                };
                let file = WeightFile::open(&file)?;
                let mut c = component(name);
                for key in file.keys() {
                    add(&mut c, &file, key);
                }
                if name == "UNet" {
                    metadata = file.metadata().clone().into_iter().collect();
                }
                components.push(c);
            }
            let scheduler = dir.join("scheduler/scheduler_config.json");
            if scheduler.is_file() {
                let text = std::fs::read_to_string(&scheduler).map_err(|source| SdModelError::Io { path: scheduler.clone(), source })?;
                let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| SdModelError::InvalidConfig { origin: scheduler.display().to_string(), reason: e.to_string() })?;
                prediction = Some(value.get("prediction_type").and_then(|p| p.as_str()).unwrap_or("epsilon").to_string());
            }
        }
    }
    if prediction.is_none() {
        prediction = metadata.get("modelspec.prediction_type").map(|p| if p == "v" { "v_prediction".to_string() } else { p.clone() });
    }
    let layout = match source {
        ModelSource::SingleFile(_) => "single file",
        ModelSource::Diffusers(_) => "diffusers folder",
    };
    Ok(CheckpointInfo { family, layout, components, prediction, metadata })
}
