//! The three components of a Stable Diffusion model, loaded or built for the demo.

use burn::tensor::backend::Backend;
use sd_model::load::{LoadOptions, ModelSource};
use sd_model::tokenizer::ClipTokenizer;
use sd_model::{AutoencoderKl, ClipTextConfig, ClipTextModel, UNet2DConditionModel, UnetConfig, VaeConfig};
use sd_sched::SchedulerConfig;

use crate::TrainError;

/// Text encoder, VAE, UNet, tokenizer and scheduler config of one model. Cloning shares the
/// weights' tensors (burn tensors are values).
#[derive(Clone)]
pub struct Components<B: Backend> {
    /// Tokenizer.
    pub tokenizer: ClipTokenizer,
    /// Text encoder.
    pub text_encoder: ClipTextModel<B>,
    /// VAE.
    pub vae: AutoencoderKl<B>,
    /// UNet.
    pub unet: UNet2DConditionModel<B>,
    /// Noise schedule and prediction type.
    pub scheduler: SchedulerConfig,
    /// `sd_v1`, `sd_v2` or `tiny` (kohya's `ss_base_model_version`).
    pub base_version: String,
}

/// The tokenizer of `pretrained` (`tiny`, a diffusers folder or a single-file checkpoint),
/// without loading any weights: a folder's own `tokenizer/`, CLIP's otherwise.
pub fn load_tokenizer(pretrained: &str) -> Result<ClipTokenizer, TrainError> {
    if pretrained == "tiny" {
        return Ok(ClipTokenizer::bundled()?);
    }
    let source = ModelSource::detect(pretrained)?;
    let sd2 = source.text_encoder_config()?.hidden_size == 1024;
    tokenizer_of(&source, sd2)
}

fn tokenizer_of(source: &ModelSource, sd2: bool) -> Result<ClipTokenizer, TrainError> {
    Ok(match source {
        ModelSource::Diffusers(dir) => ClipTokenizer::from_model_dir(dir)?,
        // Single files carry no tokenizer: SD2.x pads with id 0.
        ModelSource::SingleFile(_) if sd2 => ClipTokenizer::bundled()?.with_pad_token_id(0)?,
        ModelSource::SingleFile(_) => ClipTokenizer::bundled()?,
    })
}

/// Loads `pretrained` (`tiny`, a diffusers folder or a single-file checkpoint).
///
/// `tiny` is the built-in demo model: tiny configs with random weights drawn from
/// `tiny_seed`, so the same seed always gives the same model and no download is needed.
/// The weights come from burn's backend RNG, which is global to the process: build models
/// from one thread at a time for reproducible results.
pub fn load_components<B: Backend>(pretrained: &str, tiny_seed: u64, device: &B::Device) -> Result<Components<B>, TrainError> {
    if pretrained == "tiny" {
        B::seed(device, tiny_seed);
        return Ok(Components {
            tokenizer: ClipTokenizer::bundled()?,
            text_encoder: lora_core::precision::pack_all(ClipTextModel::new(&ClipTextConfig::tiny(), device)?),
            vae: lora_core::precision::pack_all(AutoencoderKl::new(&VaeConfig::tiny(), device)?),
            unet: lora_core::precision::pack_all(UNet2DConditionModel::new(&UnetConfig::tiny(), device)?),
            scheduler: SchedulerConfig::sd15(),
            base_version: "tiny".into(),
        });
    }
    let source = ModelSource::detect(pretrained)?;
    let options = LoadOptions::default();
    let sd2 = source.text_encoder_config()?.hidden_size == 1024;
    let tokenizer = tokenizer_of(&source, sd2)?;
    let scheduler = match &source {
        ModelSource::Diffusers(dir) if dir.join("scheduler/scheduler_config.json").is_file() => SchedulerConfig::from_model_dir(dir)?,
        // Single files carry no scheduler config: SD1.x/2.x share the schedule.
        _ => SchedulerConfig::sd15(),
    };
    // Stored dense: on CUDA, uploaded weights have padded rows (`lora_core::precision::pack_all`).
    use lora_core::precision::pack_all;
    Ok(Components {
        tokenizer,
        text_encoder: pack_all(source.load_text_encoder(device, &options)?),
        vae: pack_all(source.load_vae(device, &options)?),
        unet: pack_all(source.load_unet(device, &options)?),
        scheduler,
        base_version: if sd2 { "sd_v2" } else { "sd_v1" }.into(),
    })
}
