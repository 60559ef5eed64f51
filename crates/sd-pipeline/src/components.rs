//! The components of a Stable Diffusion model (SD1.x, SD2.x or SDXL), loaded or built for
//! the demo.

use burn::tensor::backend::Backend;
use sd_model::load::{LoadOptions, ModelSource};
use sd_model::tokenizer::ClipTokenizer;
use sd_model::{AutoencoderKl, ClipTextConfig, ClipTextModel, UNet2DConditionModel, UnetConfig, VaeConfig};
use sd_sched::SchedulerConfig;

use crate::PipelineError;

/// Text encoder(s), VAE, UNet, tokenizer(s) and scheduler config of one model. Cloning
/// shares the weights' tensors (burn tensors are values).
#[derive(Clone)]
pub struct Components<B: Backend> {
    /// Tokenizer.
    pub tokenizer: ClipTokenizer,
    /// Text encoder (SDXL's first, OpenAI CLIP ViT-L).
    pub text_encoder: ClipTextModel<B>,
    /// SDXL's second tokenizer (it pads with id 0).
    pub tokenizer_2: Option<ClipTokenizer>,
    /// SDXL's second text encoder (OpenCLIP ViT-bigG, with the pooled projection).
    pub text_encoder_2: Option<ClipTextModel<B>>,
    /// VAE.
    pub vae: AutoencoderKl<B>,
    /// UNet.
    pub unet: UNet2DConditionModel<B>,
    /// Noise schedule and prediction type.
    pub scheduler: SchedulerConfig,
    /// `sd_v1`, `sd_v2`, `sdxl_base_v1-0`, `tiny` or `tiny_sdxl` (kohya's
    /// `ss_base_model_version`).
    pub base_version: String,
}

/// kohya's `ss_base_model_version` of SDXL models.
pub const SDXL_BASE_VERSION: &str = "sdxl_base_v1-0";

impl<B: Backend> Components<B> {
    /// Whether this is an SDXL model (two text encoders, the UNet's added conditioning).
    pub fn is_sdxl(&self) -> bool {
        self.text_encoder_2.is_some()
    }

    /// The side in pixels images of this model are made at by default, as diffusers'
    /// pipelines choose it: 1024 for SDXL, 768 for SD2.x v-prediction models (SD2.1), 512
    /// for SD1.x and SD2.x base; the tiny models' 64, the size the demo trains at.
    pub fn default_size(&self) -> usize {
        match self.base_version.as_str() {
            "tiny" | "tiny_sdxl" => 64,
            _ if self.is_sdxl() => 1024,
            "sd_v2" if self.scheduler.prediction_type == sd_sched::PredictionType::VPrediction => 768,
            _ => 512,
        }
    }
}

/// The built-in tiny models: `tiny` (SD1-like, the demo's) and `tiny-sdxl`.
pub const TINY_MODELS: [&str; 2] = ["tiny", "tiny-sdxl"];

/// Whether `pretrained` is an SDXL model (`tiny-sdxl`, or a second text encoder in the
/// folder or file), read from configs and file headers without loading weights.
pub fn is_sdxl(pretrained: &str) -> Result<bool, PipelineError> {
    match pretrained {
        "tiny-sdxl" => Ok(true),
        "tiny" => Ok(false),
        path => Ok(model_source(path)?.text_encoder_2_config()?.is_some()),
    }
}

/// The model at `path`; a path that is not there names what a model may be.
fn model_source(path: &str) -> Result<ModelSource, PipelineError> {
    if !std::path::Path::new(path).exists() {
        return Err(PipelineError::Invalid {
            origin: path.into(),
            reason: "no such file or folder: a model is `tiny` or `tiny-sdxl` (built in), a diffusers folder or a single-file checkpoint (.safetensors, .ckpt)".into(),
        });
    }
    Ok(ModelSource::detect(path)?)
}

/// The schedule of a single-file checkpoint of `family`: its official repo's config (SDXL's
/// `leading` spacing with `steps_offset` 1 included), with what the file records about its
/// prediction type and terminal SNR, exactly as `trainer convert-model` writes it
/// ([`sd_model::convert::single_file_scheduler_json`]).
fn single_file_scheduler(path: &std::path::Path, family: sd_model::load::ModelFamily) -> Result<SchedulerConfig, PipelineError> {
    let json = sd_model::convert::single_file_scheduler_json(&sd_model::load::WeightFile::open(path)?, family);
    Ok(SchedulerConfig::from_json_str(&json)?)
}

/// The tokenizer of `pretrained` (`tiny`, a diffusers folder or a single-file checkpoint),
/// without loading any weights: a folder's own `tokenizer/`, CLIP's otherwise.
pub fn load_tokenizer(pretrained: &str) -> Result<ClipTokenizer, PipelineError> {
    if TINY_MODELS.contains(&pretrained) {
        return Ok(ClipTokenizer::bundled()?);
    }
    let source = model_source(pretrained)?;
    // `family` first refuses an unsupported SDXL relative (a refiner) by what it is.
    let sd2 = source.family()? == sd_model::load::ModelFamily::Sd2;
    tokenizer_of(&source, sd2)
}

fn tokenizer_of(source: &ModelSource, sd2: bool) -> Result<ClipTokenizer, PipelineError> {
    Ok(match source {
        ModelSource::Diffusers(dir) => ClipTokenizer::from_model_dir(dir)?,
        // Single files carry no tokenizer: SD2.x pads with id 0.
        ModelSource::SingleFile(_) if sd2 => ClipTokenizer::bundled()?.with_pad_token_id(0)?,
        ModelSource::SingleFile(_) => ClipTokenizer::bundled()?,
    })
}

/// Replaces the VAE's weights with those of a VAE distributed apart from the model
/// (`model.vae`, kohya's `--vae`, A1111's SD VAE): a diffusers VAE folder or model folder,
/// or a `.safetensors` file in diffusers', the original or a checkpoint's layout
/// ([`sd_model::load::load_vae_from`]). The architecture and the latent scale stay the
/// base model's; errors name the file and the keys that do not fit.
pub fn load_separate_vae<B: Backend>(c: &mut Components<B>, path: &std::path::Path) -> Result<(), PipelineError> {
    sd_model::load::load_vae_from(&mut c.vae, path, &LoadOptions::default())?;
    // Stored dense, as the model's own (`lora_core::precision::pack_all`).
    c.vae = lora_core::precision::pack_all(c.vae.clone());
    Ok(())
}

/// Loads `pretrained` (`tiny`, `tiny-sdxl`, a diffusers folder or a single-file checkpoint).
///
/// `tiny` is the built-in demo model: tiny configs with random weights drawn from
/// `tiny_seed`, so the same seed always gives the same model and no download is needed;
/// `tiny-sdxl` is its SDXL-shaped sibling (two text encoders, the added conditioning).
/// The weights come from burn's backend RNG, which is global to the process: build models
/// from one thread at a time for reproducible results.
pub fn load_components<B: Backend>(pretrained: &str, tiny_seed: u64, device: &B::Device) -> Result<Components<B>, PipelineError> {
    use lora_core::precision::pack_all;
    if TINY_MODELS.contains(&pretrained) {
        let sdxl = pretrained == "tiny-sdxl";
        B::seed(device, tiny_seed);
        let text_encoder = pack_all(ClipTextModel::new(&ClipTextConfig::tiny(), device)?);
        let unet_config = if sdxl { UnetConfig::tiny_sdxl() } else { UnetConfig::tiny() };
        let vae_config = VaeConfig {
            scaling_factor: if sdxl { sd_model::load::SDXL_VAE_SCALING_FACTOR } else { VaeConfig::tiny().scaling_factor },
            ..VaeConfig::tiny()
        };
        let vae = pack_all(AutoencoderKl::new(&vae_config, device)?);
        let unet = pack_all(UNet2DConditionModel::new(&unet_config, device)?);
        let text_encoder_2 = match sdxl {
            true => Some(pack_all(
                ClipTextModel::new(&ClipTextConfig::tiny_sdxl_text_encoder_2(), device)?.with_component(lora_core::Component::TextEncoder2),
            )),
            false => None,
        };
        return Ok(Components {
            tokenizer: ClipTokenizer::bundled()?,
            text_encoder,
            tokenizer_2: if sdxl { Some(ClipTokenizer::bundled()?.with_pad_token_id(0)?) } else { None },
            text_encoder_2,
            vae,
            unet,
            scheduler: SchedulerConfig::sd15(),
            base_version: if sdxl { "tiny_sdxl" } else { "tiny" }.into(),
        });
    }
    let source = model_source(pretrained)?;
    let options = LoadOptions::default();
    // `family` first refuses an unsupported SDXL relative (a refiner) by what it is.
    let family = source.family()?;
    let sd2 = family == sd_model::load::ModelFamily::Sd2;
    source.check_components()?;
    let tokenizer = tokenizer_of(&source, sd2)?;
    let text_encoder_2 = source.load_text_encoder_2(device, &options)?.map(pack_all);
    let tokenizer_2 = match (&text_encoder_2, &source) {
        (None, _) => None,
        (Some(_), ModelSource::Diffusers(dir)) if dir.join("tokenizer_2").is_dir() => Some(ClipTokenizer::from_dir(dir.join("tokenizer_2"))?),
        // SDXL's second tokenizer is CLIP's, padding with id 0 (`!`).
        (Some(_), _) => Some(ClipTokenizer::bundled()?.with_pad_token_id(0)?),
    };
    if let Some(second) = &tokenizer_2 {
        // Both encoders' states are joined token by token.
        if second.max_length() != tokenizer.max_length() {
            return Err(PipelineError::Invalid {
                origin: pretrained.into(),
                reason: format!("tokenizer_2 reads {} tokens a row but tokenizer {}: they must agree", second.max_length(), tokenizer.max_length()),
            });
        }
    }
    let scheduler = match &source {
        ModelSource::Diffusers(dir) if dir.join("scheduler/scheduler_config.json").is_file() => SchedulerConfig::from_model_dir(dir)?,
        // Single files carry no scheduler config: their family's official one (SDXL's
        // spacing differs from SD1.x's), with the prediction type and zero terminal SNR
        // where the file marks them (`v_pred`, `ztsnr`).
        ModelSource::SingleFile(path) => single_file_scheduler(path, family)?,
        ModelSource::Diffusers(_) => SchedulerConfig::sd15(),
    };
    // Stored dense: on CUDA, uploaded weights have padded rows (`lora_core::precision::pack_all`).
    let base_version = match (&text_encoder_2, sd2) {
        (Some(_), _) => SDXL_BASE_VERSION,
        (None, true) => "sd_v2",
        (None, false) => "sd_v1",
    };
    let unet = pack_all(source.load_unet(device, &options)?);
    if unet.has_added_conditions() != text_encoder_2.is_some() {
        return Err(PipelineError::Invalid {
            origin: pretrained.into(),
            reason: "an SDXL-style model needs both a second text encoder and a UNet with added conditioning (SDXL refiners, with one encoder, are not supported)".into(),
        });
    }
    Ok(Components {
        tokenizer,
        text_encoder: pack_all(source.load_text_encoder(device, &options)?),
        tokenizer_2,
        text_encoder_2,
        vae: pack_all(source.load_vae(device, &options)?),
        unet,
        scheduler,
        base_version: base_version.into(),
    })
}
