//! A LoRA from a fine-tuned model and its base (`trainer extract`; kohya's
//! `networks/extract_lora_from_models.py`).
//!
//! Both models are loaded (a diffusers folder or a single-file checkpoint each, in either
//! layout), their adapter sites paired ([`sd_model::extract::SitePairs`]) and each
//! difference approximated at a low rank ([`lora_core::extract`]). The sites are kohya's
//! networks.lora set: the UNet's transformer blocks (attention, feed-forward, `proj_in`,
//! `proj_out`) and, with a convolution rank, its ResNet blocks and samplers too (kohya's
//! `--conv_dim`); the text encoders' attention and MLP layers, unless their largest
//! difference is at most `min_diff`, as kohya's script decides that a text encoder was not
//! trained.

use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::DType;
use lora_core::extract::{extract_set, ExtractSettings, Extracted};
use sd_model::extract::SitePairs;
use sd_model::load::{LoadOptions, ModelFamily, ModelSource};
use sd_model::targets::{Selection, TextEncoderTargets, UnetTargets};
use sd_sched::{PredictionType, SchedulerConfig};

use crate::metadata::BaseModel;
use crate::TrainError;

/// What [`extract_lora`] extracts and how.
#[derive(Debug, Clone, PartialEq)]
pub struct ExtractOptions {
    /// Ranks, rank rule, clamp and SVD iterations.
    pub settings: ExtractSettings,
    /// Whether the UNet's ResNet blocks and samplers are extracted too (their 3x3
    /// convolutions at `settings.conv_rank`; kohya's `--conv_dim`).
    pub conv: bool,
    /// The text encoders are extracted only where some weight differs by more than this
    /// (kohya's `--min_diff`, 0.01).
    pub min_diff: f32,
    /// The precision both models are loaded in: f32 is exact for any checkpoint; f16 halves
    /// the memory and is exact for f16 checkpoints. `None`: f16 where both models store
    /// their UNet and text encoders in f16 only, else f32 ([`load_dtype_for`]).
    pub load_dtype: Option<DType>,
    /// Worker threads of the SVDs (at least one).
    pub threads: usize,
}

impl ExtractOptions {
    /// kohya's defaults at `rank` (no convolutions, `min_diff` 0.01, f32), on every core.
    pub fn new(rank: usize) -> Self {
        Self {
            settings: ExtractSettings::new(rank),
            conv: false,
            min_diff: lora_core::extract::DEFAULT_MIN_DIFF,
            load_dtype: None,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

/// The result of [`extract_lora`].
#[derive(Debug, Clone)]
pub struct ExtractedLora {
    /// The adapters and what each kept (SDXL adapters carry kohya's SDXL names).
    pub extracted: Extracted,
    /// `sd_v1`, `sd_v2` or `sdxl_base_v1-0` (kohya's `ss_base_model_version`).
    pub version: &'static str,
    /// Whether the tuned model predicts v (from its diffusers scheduler config).
    pub v_prediction: bool,
    /// The text encoders' largest weight difference.
    pub text_encoder_difference: f32,
    /// Whether the text encoders were extracted (their difference exceeds `min_diff`).
    pub text_encoders: bool,
    /// The precision the models were loaded in.
    pub load_dtype: DType,
}

impl ExtractedLora {
    /// What the LoRA's metadata needs to know about the model.
    pub fn base_model(&self) -> BaseModel<'static> {
        BaseModel { version: self.version, v_prediction: self.v_prediction }
    }
}

/// kohya's `ss_base_model_version` of `source`'s family, without loading weights.
fn version_of(source: &ModelSource) -> Result<&'static str, TrainError> {
    Ok(match source.family()? {
        ModelFamily::Sdxl => sd_pipeline::SDXL_BASE_VERSION,
        ModelFamily::Sd2 => "sd_v2",
        ModelFamily::Sd1 => "sd_v1",
    })
}

fn v_prediction_of(source: &ModelSource) -> Result<bool, TrainError> {
    Ok(match source {
        ModelSource::Diffusers(dir) if dir.join("scheduler/scheduler_config.json").is_file() => {
            SchedulerConfig::from_model_dir(dir)?.prediction_type == PredictionType::VPrediction
        }
        ModelSource::SingleFile(path) => {
            sd_model::convert::single_file_prediction(&sd_model::load::WeightFile::open(path)?).0 == Some(sd_model::convert::Prediction::VPrediction)
        }
        ModelSource::Diffusers(_) => false,
    })
}

/// The precision that loads every source's UNet and text encoders exactly and in the least
/// memory: f16 where all of them are stored in f16 (most downloaded checkpoints), else f32.
pub fn load_dtype_for(sources: &[&ModelSource]) -> Result<DType, TrainError> {
    for source in sources {
        let dtypes = source.unet_and_text_encoder_dtypes(&LoadOptions::default())?;
        if dtypes.iter().any(|d| *d != DType::F16) {
            return Ok(DType::F32);
        }
    }
    Ok(DType::F16)
}

/// Extracts the LoRA of `tuned`'s difference from `base` (see the [module docs](self)).
/// `progress(done, total)` is called after each adapter. Models of different families
/// (SD1.x, SD2.x, SDXL) are an error before any weight is loaded; two models whose UNets
/// and text encoders are identical are an error too.
pub fn extract_lora<B: Backend>(
    base: &Path,
    tuned: &Path,
    options: &ExtractOptions,
    device: &B::Device,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<ExtractedLora, TrainError> {
    let (base_source, tuned_source) = (ModelSource::detect(base)?, ModelSource::detect(tuned)?);
    let version = version_of(&base_source)?;
    let tuned_version = version_of(&tuned_source)?;
    if version != tuned_version {
        return Err(TrainError::Config {
            origin: tuned.display().to_string(),
            reason: format!("a {tuned_version} model, but the base model {} is {version}: both must be of one family", base.display()),
        });
    }
    let v_prediction = v_prediction_of(&tuned_source)?;
    let dtype = match options.load_dtype {
        Some(dtype) => dtype,
        None => load_dtype_for(&[&base_source, &tuned_source])?,
    };
    let load = LoadOptions { dtype, prefer_fp16_files: dtype == DType::F16 };
    let unet_selection = Selection::new(if options.conv { UnetTargets::Conv } else { UnetTargets::AttnMlp });
    let te_selection = Selection::new(TextEncoderTargets::AttnMlp);

    let mut base_unet = base_source.load_unet::<B>(device, &load)?;
    let mut tuned_unet = tuned_source.load_unet::<B>(device, &load)?;
    let layout = sd_model::keymap::UnetLayout::of(&base_unet);
    let unet_pairs = SitePairs::collect(&mut base_unet, &mut tuned_unet, &|p, c| unet_selection.selects(p, c))?;
    // The pairs keep the selected weights alive; the rest of each UNet goes now.
    drop((base_unet, tuned_unet));

    let mut te_pairs = SitePairs::default();
    let mut base_te = base_source.load_text_encoder::<B>(device, &load)?;
    let mut tuned_te = tuned_source.load_text_encoder::<B>(device, &load)?;
    te_pairs.extend(SitePairs::collect(&mut base_te, &mut tuned_te, &|p, c| te_selection.selects(p, c))?);
    drop((base_te, tuned_te));
    if let (Some(mut b), Some(mut t)) = (base_source.load_text_encoder_2::<B>(device, &load)?, tuned_source.load_text_encoder_2::<B>(device, &load)?) {
        te_pairs.extend(SitePairs::collect(&mut b, &mut t, &|p, c| te_selection.selects(p, c))?);
    }

    let text_encoder_difference = te_pairs.max_abs_difference()?;
    let text_encoders = text_encoder_difference > options.min_diff;
    if !text_encoders && unet_pairs.max_abs_difference()? == 0.0 {
        return Err(TrainError::Config {
            origin: tuned.display().to_string(),
            reason: format!(
                "its UNet equals that of the base model {} and its text encoders differ by at most {text_encoder_difference}: there is nothing to extract",
                base.display()
            ),
        });
    }
    let mut pairs = unet_pairs;
    if text_encoders {
        pairs.extend(te_pairs);
    }
    let total = pairs.len();
    let mut extracted = extract_set(pairs.differences(), &options.settings, options.threads, &mut |done| progress(done, total))?;
    if version == sd_pipeline::SDXL_BASE_VERSION {
        sd_model::lora::use_sdxl_kohya_names_by(&mut extracted.set, &layout);
    }
    Ok(ExtractedLora { extracted, version, v_prediction, text_encoder_difference, text_encoders, load_dtype: dtype })
}
