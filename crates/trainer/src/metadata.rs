//! Training metadata written into LoRA files: kohya's `ss_*` keys and the SAI model spec's
//! `modelspec.*` keys.
//!
//! UIs read them: A1111's LoRA cards show the training tags (`ss_tag_frequency`), the
//! output name as the alias (`ss_output_name`) and the base model version, and put the
//! LoRA hash (`sshs_model_hash`, added by `lora_core` when the file is written) in image
//! infotext; Civitai fills in an upload's resources from them. The values are strings,
//! written as sd-scripts writes them (Python's `True`/`False`, JSON for the tables), so
//! tools that parse kohya files read ours. `output.no_metadata` keeps only what loading
//! needs (kohya's minimum set) and the model spec.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::Serialize;
use serde_json::json;
use sd_data::Dataset;

use crate::config::{Optimizer, TrainConfig};

/// The metadata of a training run, fixed when it starts; [`RunMetadata::at_save`] adds the
/// keys of one save.
#[derive(Debug, Clone, PartialEq)]
pub struct RunMetadata {
    keys: BTreeMap<String, String>,
}

/// What the metadata needs to know about the model being trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BaseModel<'a> {
    /// `sd_v1`, `sd_v2`, `sdxl_base_v1-0`, `tiny` or `tiny_sdxl`
    /// ([`sd_pipeline::Components::base_version`]).
    pub version: &'a str,
    /// Whether the model predicts v (after `train.prediction`).
    pub v_prediction: bool,
}

impl RunMetadata {
    /// The metadata of a run of `config` on `dataset` (the training images, without the
    /// validation split) that starts at `started`.
    ///
    /// ```
    /// use trainer::metadata::{BaseModel, RunMetadata};
    /// use trainer::TrainConfig;
    ///
    /// let config = TrainConfig::default();
    /// let dataset = trainer::train::open_dataset(&config).unwrap();
    /// let base = BaseModel { version: "sd_v1", v_prediction: false };
    /// let run = RunMetadata::new(&config, &dataset, base, std::time::SystemTime::now());
    /// let keys = run.at_save(100, 4, std::time::SystemTime::now());
    /// assert_eq!(keys["ss_output_name"], "demo_lora");
    /// assert_eq!(keys["modelspec.architecture"], "stable-diffusion-v1/lora");
    /// assert_eq!((keys["ss_steps"].as_str(), keys["ss_epoch"].as_str()), ("100", "4"));
    /// ```
    pub fn new(config: &TrainConfig, dataset: &Dataset, base: BaseModel<'_>, started: SystemTime) -> Self {
        let mut keys = BTreeMap::new();
        let mut put = |k: &str, v: String| {
            keys.insert(k.to_owned(), v);
        };
        for (k, v) in base_keys(base) {
            put(k, v);
        }
        if !config.output.no_metadata {
            for (k, v) in training_keys(config, dataset, started) {
                put(&k, v);
            }
        }
        for (k, v) in model_spec(config, dataset.config().resolution, base, started) {
            put(&k, v);
        }
        Self { keys }
    }

    /// The keys to write with a LoRA saved after `step` optimizer steps and `epoch`
    /// completed epochs, at `now`.
    pub fn at_save(&self, step: usize, epoch: u64, now: SystemTime) -> BTreeMap<String, String> {
        let mut keys = self.keys.clone();
        // The model spec's date is the file's (sd-scripts stamps it at each save).
        keys.insert("modelspec.date".into(), iso_date(now));
        if keys.contains_key("ss_training_started_at") {
            keys.insert("ss_training_finished_at".into(), unix_seconds(now));
            keys.insert("ss_steps".into(), step.to_string());
            keys.insert("ss_epoch".into(), epoch.to_string());
        }
        keys
    }
}

/// Python's `str(bool)`, as sd-scripts writes flags.
fn py_bool(b: bool) -> String {
    if b { "True" } else { "False" }.to_owned()
}

/// A config enum's name as the configuration spells it (`cosine`, `l2`, ...).
fn name_of<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

/// Seconds since the Unix epoch, as Python's `str(time.time())`.
fn unix_seconds(t: SystemTime) -> String {
    let s = t.duration_since(SystemTime::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    format!("{s:.6}")
}

/// An ISO-8601 UTC time to the second, as the model spec's `modelspec.date`.
fn iso_date(t: SystemTime) -> String {
    let d = time::OffsetDateTime::from(t);
    format!("{:04}-{:02}-{:02}T{:02}:{:02}:{:02}Z", d.year(), u8::from(d.month()), d.day(), d.hour(), d.minute(), d.second())
}

/// The `ss_*` keys of sd-scripts' `train_network.py` that apply to our runs.
/// The epochs a run of `t` trains, with `batches` batches per epoch, the last perhaps in
/// part: sd-scripts' `num_train_epochs` (`ss_num_epochs`, and a finished run's `ss_epoch`).
pub(crate) fn run_epochs(t: &crate::config::TrainSection, batches: usize) -> usize {
    t.max_train_steps.div_ceil(crate::train::steps_per_epoch(t, batches))
}

fn training_keys(config: &TrainConfig, dataset: &Dataset, started: SystemTime) -> Vec<(String, String)> {
    let (d, l, t, o) = (&config.data, &config.lora, &config.train, &config.output);
    let ds = dataset.config();
    let folders = dataset.folders();
    let dirs = |reg: bool| -> serde_json::Value {
        let map: serde_json::Map<String, serde_json::Value> = folders
            .iter()
            .filter(|f| f.is_reg == reg)
            .map(|f| (f.name.clone(), json!({ "n_repeats": f.num_repeats, "img_count": f.images })))
            .collect();
        serde_json::Value::Object(map)
    };
    let images = |reg: bool| -> usize { folders.iter().filter(|f| f.is_reg == reg).map(|f| f.images * f.num_repeats as usize).sum() };
    let batches = dataset.batches_per_epoch().max(1);
    let buckets: serde_json::Map<String, serde_json::Value> = dataset
        .bucket_table()
        .into_iter()
        .enumerate()
        .map(|(i, ((w, h), n))| (i.to_string(), json!({ "resolution": [w, h], "count": n })))
        .collect();
    let train_te = l.text_encoder_targets != sd_model::targets::TextEncoderTargets::None;
    let te_lr = if t.text_encoder_lr > 0.0 { t.text_encoder_lr } else { t.learning_rate };
    let optimizer = match t.optimizer {
        Optimizer::Adamw => {
            let amsgrad = if t.amsgrad { ",amsgrad=True" } else { "" };
            format!("AdamW(weight_decay={},betas=({}, {}),eps={}{amsgrad})", t.adam_weight_decay, t.adam_beta1, t.adam_beta2, t.adam_epsilon)
        }
        Optimizer::Prodigy => format!("Prodigy(d_coef={},use_bias_correction={},weight_decay={})", t.prodigy_d_coef, py_bool(t.prodigy_use_bias_correction), t.adam_weight_decay),
        Optimizer::Lion => format!("Lion(weight_decay={},betas=({}, {}))", t.adam_weight_decay, t.lion_beta1, t.lion_beta2),
        Optimizer::DadaptAdam => format!(
            "DAdaptAdam(decouple={},weight_decay={},betas=({}, {}),growth_rate={})",
            py_bool(t.dadapt_decouple),
            t.adam_weight_decay,
            t.adam_beta1,
            t.adam_beta2,
            t.dadapt_growth_rate
        ),
        Optimizer::DadaptAdamPreprint => format!(
            "DAdaptAdamPreprint(decouple={},weight_decay={},betas=({}, {}),growth_rate={})",
            py_bool(t.dadapt_decouple),
            t.adam_weight_decay,
            t.adam_beta1,
            t.adam_beta2,
            t.dadapt_growth_rate
        ),
        Optimizer::DadaptLion => format!("DAdaptLion(weight_decay={},betas=({}, {}))", t.adam_weight_decay, t.lion_beta1, t.lion_beta2),
        Optimizer::DadaptSgd => format!("DAdaptSGD(momentum={},weight_decay={},growth_rate={})", t.dadapt_momentum, t.adam_weight_decay, t.dadapt_growth_rate),
        Optimizer::DadaptAdagrad => format!("DAdaptAdaGrad(momentum={},weight_decay={},eps={},growth_rate={})", t.dadapt_momentum, t.adam_weight_decay, t.adam_epsilon, t.dadapt_growth_rate),
        Optimizer::DadaptAdan => format!(
            "DAdaptAdan(betas=({}, {}, {}),weight_decay={},no_prox={},growth_rate={})",
            t.adam_beta1,
            t.adam_beta2,
            t.dadapt_beta3,
            t.adam_weight_decay,
            py_bool(t.dadapt_no_prox),
            t.dadapt_growth_rate
        ),
        Optimizer::SgdScheduleFree => format!(
            "SGDScheduleFree(momentum={},weight_decay={},r={},weight_lr_power={},warmup_steps={})",
            t.sgd_momentum,
            t.adam_weight_decay,
            t.schedule_free_r,
            t.schedule_free_weight_lr_power,
            t.warmup_steps()
        ),
        Optimizer::AdamwScheduleFree | Optimizer::RadamScheduleFree => {
            let (name, warmup) = match t.optimizer {
                Optimizer::AdamwScheduleFree => ("AdamWScheduleFree", format!(",warmup_steps={}", t.warmup_steps())),
                _ => ("RAdamScheduleFree", format!(",silent_sgd_phase={}", py_bool(t.schedule_free_silent_sgd_phase))),
            };
            format!(
                "{name}(weight_decay={},betas=({}, {}),eps={},r={},weight_lr_power={}{warmup})",
                t.adam_weight_decay, t.adam_beta1, t.adam_beta2, t.adam_epsilon, t.schedule_free_r, t.schedule_free_weight_lr_power
            )
        }
        Optimizer::ProdigyPlusScheduleFree => {
            let p = t.prodigy_plus_settings();
            format!(
                "ProdigyPlusScheduleFree(betas=({}, {}),d0={},d_coef={},weight_decay={},use_bias_correction={},split_groups={},factored={})",
                p.betas.0,
                p.betas.1,
                p.d0,
                p.d_coef,
                p.weight_decay,
                py_bool(p.use_bias_correction),
                py_bool(p.split_groups),
                py_bool(p.factored)
            )
        }
        Optimizer::Came => format!(
            "CAME(weight_decay={},betas=({}, {}, {}),eps=({:e}, {:e}),clip_threshold={})",
            t.adam_weight_decay, t.came_beta1, t.came_beta2, t.came_beta3, t.came_eps1, t.came_eps2, t.came_clip_threshold
        ),
        Optimizer::Ademamix => format!(
            "AdEMAMix(weight_decay={},betas=({}, {}, {}),alpha={},eps={}{}{})",
            t.adam_weight_decay,
            t.adam_beta1,
            t.adam_beta2,
            t.ademamix_beta3,
            t.ademamix_alpha,
            t.adam_epsilon,
            if t.ademamix_t_alpha > 0 { format!(",t_alpha={}", t.ademamix_t_alpha) } else { String::new() },
            if t.ademamix_t_beta3 > 0 { format!(",t_beta3={}", t.ademamix_t_beta3) } else { String::new() }
        ),
        Optimizer::Sgd => format!(
            "SGD(momentum={},dampening={},nesterov={},weight_decay={})",
            t.sgd_momentum,
            t.sgd_dampening,
            py_bool(t.sgd_nesterov),
            t.adam_weight_decay
        ),
        Optimizer::Adafactor => format!(
            "Adafactor(scale_parameter={},relative_step={},warmup_init={},weight_decay={})",
            py_bool(t.adafactor_scale_parameter),
            py_bool(t.adafactor_relative_step),
            py_bool(t.adafactor_warmup_init),
            t.adam_weight_decay
        ),
    };
    let model_name = std::path::Path::new(&config.model.pretrained).file_name().map_or_else(|| config.model.pretrained.clone(), |n| n.to_string_lossy().into_owned());
    let session = started.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos() ^ d.as_secs() as u32) ^ std::process::id();
    let mut keys = vec![
        ("ss_session_id", session.to_string()),
        ("ss_training_started_at", unix_seconds(started)),
        ("ss_output_name", o.output_name.clone()),
        ("ss_sd_model_name", model_name),
        ("ss_learning_rate", t.learning_rate.to_string()),
        ("ss_unet_lr", t.learning_rate.to_string()),
        ("ss_text_encoder_lr", if train_te { te_lr.to_string() } else { "None".into() }),
        ("ss_num_train_images", images(false).to_string()),
        ("ss_num_reg_images", images(true).to_string()),
        ("ss_num_batches_per_epoch", batches.to_string()),
        ("ss_num_epochs", run_epochs(t, batches).to_string()),
        ("ss_batch_size_per_device", t.train_batch_size.to_string()),
        ("ss_total_batch_size", (t.train_batch_size * t.gradient_accumulation_steps).to_string()),
        ("ss_gradient_checkpointing", py_bool(t.gradient_checkpointing)),
        ("ss_gradient_accumulation_steps", t.gradient_accumulation_steps.to_string()),
        ("ss_max_train_steps", t.max_train_steps.to_string()),
        ("ss_lr_warmup_steps", t.warmup_steps().to_string()),
        // sd-scripts names Adafactor's relative step as its schedule.
        ("ss_lr_scheduler", if t.relative_step() { "adafactor".into() } else { name_of(&t.lr_scheduler) }),
        // kohya's `network_dropout` (on `down(x)`); `lora.dropout`, on the input, is PEFT's.
        ("ss_network_dropout", if l.network_dropout > 0.0 { l.network_dropout.to_string() } else { "None".into() }),
        ("ss_mixed_precision", name_of(&t.mixed_precision)),
        ("ss_full_fp16", py_bool(false)),
        ("ss_clip_skip", config.model.clip_skip.to_string()),
        ("ss_max_token_length", match config.model.max_token_length {
            75 => "None".into(),
            n => n.to_string(),
        }),
        ("ss_cache_latents", py_bool(true)),
        ("ss_seed", t.seed.to_string()),
        ("ss_optimizer", optimizer),
        ("ss_max_grad_norm", t.max_grad_norm.to_string()),
        ("ss_scale_weight_norms", if t.scale_weight_norms > 0.0 { t.scale_weight_norms.to_string() } else { "None".into() }),
        ("ss_noise_offset", t.noise_offset.to_string()),
        ("ss_adaptive_noise_scale", if t.adaptive_noise_scale != 0.0 { t.adaptive_noise_scale.to_string() } else { "None".into() }),
        ("ss_noise_offset_random_strength", py_bool(t.noise_offset_random_strength)),
        ("ss_multires_noise_iterations", t.multires_noise_iterations.to_string()),
        ("ss_multires_noise_discount", t.multires_noise_discount.to_string()),
        ("ss_ip_noise_gamma", t.ip_noise_gamma.to_string()),
        ("ss_ip_noise_gamma_random_strength", py_bool(t.ip_noise_gamma_random_strength)),
        ("ss_min_snr_gamma", t.min_snr_gamma.to_string()),
        ("ss_debiased_estimation", py_bool(t.debiased_estimation_loss)),
        ("ss_zero_terminal_snr", py_bool(t.zero_terminal_snr.unwrap_or(false))),
        ("ss_loss_type", name_of(&t.loss_type)),
        ("ss_huber_schedule", name_of(&t.huber_schedule)),
        ("ss_huber_c", t.huber_c.to_string()),
        ("ss_prior_loss_weight", d.prior_loss_weight.to_string()),
        // sd-scripts' validation options (its `None`: unset).
        ("ss_validation_split", d.validation_split.to_string()),
        ("ss_validation_seed", if d.validation_seed > 0 { d.validation_seed.to_string() } else { "None".into() }),
        ("ss_validate_every_n_steps", if o.validate_every_n_steps > 0 { o.validate_every_n_steps.to_string() } else { "None".into() }),
        ("ss_validate_every_n_epochs", if o.validate_every_n_epochs > 0 { o.validate_every_n_epochs.to_string() } else { "None".into() }),
        ("ss_max_validation_steps", if o.max_validation_steps > 0 { o.max_validation_steps.to_string() } else { "None".into() }),
        ("ss_caption_dropout_rate", d.caption_dropout_rate.to_string()),
        ("ss_caption_dropout_every_n_epochs", d.caption_dropout_every_n_epochs.to_string()),
        ("ss_caption_tag_dropout_rate", d.caption_tag_dropout_rate.to_string()),
        // The data set's own values: `max_bucket_reso = 0` resolved, or a dataset_config file's.
        ("ss_resolution", format!("({}, {})", ds.resolution.width, ds.resolution.height)),
        ("ss_enable_bucket", py_bool(ds.enable_bucket)),
        ("ss_min_bucket_reso", ds.min_bucket_reso.to_string()),
        ("ss_max_bucket_reso", ds.max_bucket_reso.to_string()),
        ("ss_bucket_no_upscale", py_bool(ds.bucket_no_upscale)),
        // The data set's own: a dataset_config file's subsets set them too.
        ("ss_flip_aug", py_bool((0..dataset.images().len()).any(|i| dataset.flip_aug(i)))),
        ("ss_random_crop", py_bool(dataset.has_random_crop())),
        // sd-scripts writes the option as Python prints its tuple.
        ("ss_face_crop_aug_range", d.face_crop_aug_range.map_or("None".into(), |[lo, hi]| format!("({lo:?}, {hi:?})"))),
        ("ss_color_aug", py_bool(dataset.has_color_aug())),
        ("ss_shuffle_caption", py_bool(d.shuffle_caption)),
        ("ss_keep_tokens", d.keep_tokens.to_string()),
        ("ss_dataset_dirs", dirs(false).to_string()),
        ("ss_reg_dataset_dirs", dirs(true).to_string()),
        ("ss_tag_frequency", json!(dataset.tag_frequency()).to_string()),
        ("ss_bucket_info", json!({ "buckets": buckets }).to_string()),
    ];
    if !o.training_comment.is_empty() {
        keys.push(("ss_training_comment", o.training_comment.clone()));
    }
    if !config.model.vae.is_empty() {
        // sd-scripts' `ss_vae_name`: the file's (or folder's) name.
        let vae = std::path::Path::new(&config.model.vae);
        keys.push(("ss_vae_name", vae.file_name().map_or_else(|| config.model.vae.clone(), |n| n.to_string_lossy().into_owned())));
    }
    // The configured rank and alpha, as sd-scripts always records them; the writer
    // replaces them with the adapters' own where it can read them (a LoKr whose halves
    // are all full has none).
    if l.lora_fa {
        // As sd-scripts records its network module (the writer keeps this one for a LoRA).
        keys.push(("ss_network_module", "networks.lora_fa".into()));
    }
    if l.dylora_unit > 0 {
        keys.push(("ss_network_module", "networks.dylora".into()));
    }
    keys.push(("ss_network_dim", l.rank.to_string()));
    keys.push(("ss_network_alpha", if l.alpha.fract() == 0.0 { format!("{:.1}", l.alpha) } else { l.alpha.to_string() }));
    if let Some(args) = network_args(l) {
        keys.push(("ss_network_args", args));
    }
    keys.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

/// The SAI model spec (1.0.1) keys sd-scripts writes for an SD 1.x / 2.x / SDXL LoRA.
fn model_spec(config: &TrainConfig, resolution: sd_data::Resolution, base: BaseModel<'_>, started: SystemTime) -> Vec<(String, String)> {
    let o = &config.output;
    let title = if o.metadata_title.is_empty() { &o.output_name } else { &o.metadata_title };
    let mut keys = spec_keys(base, title, (resolution.width, resolution.height), started);
    keys.push(("modelspec.encoder_layer", config.model.clip_skip.to_string()));
    let t = &config.train;
    if t.min_timestep != 0 || t.max_timestep != 1000 {
        keys.push(("modelspec.timestep_range", format!("{},{}", t.min_timestep, t.max_timestep)));
    }
    for (k, v) in [
        ("modelspec.author", &o.metadata_author),
        ("modelspec.description", &o.metadata_description),
        ("modelspec.license", &o.metadata_license),
        ("modelspec.tags", &o.metadata_tags),
        ("modelspec.usage_hint", &o.metadata_usage_hint),
        ("modelspec.trigger_phrase", &o.metadata_trigger_phrase),
        ("modelspec.merged_from", &o.metadata_merged_from),
        ("modelspec.preprocessor", &o.metadata_preprocessor),
        ("modelspec.is_negative_embedding", &o.metadata_is_negative_embedding),
    ] {
        if !v.is_empty() {
            keys.push((k, v.clone()));
        }
    }
    // Checked at the start; a file gone since is left out, as sd-scripts leaves it out.
    if let Ok(Some(url)) = thumbnail_url(&o.metadata_thumbnail) {
        keys.push(("modelspec.thumbnail", url));
    }
    keys.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

/// `output.metadata_thumbnail` as the model spec's `data:` URL (`None` when unset): a
/// `data:` URL as it is, a file's bytes in base64 with the MIME type of its extension
/// (`application/octet-stream` for an unknown one), as sd-scripts writes it.
///
/// ```
/// let url = trainer::metadata::thumbnail_url("data:image/png;base64,AAAA").unwrap();
/// assert_eq!(url.as_deref(), Some("data:image/png;base64,AAAA"));
/// assert!(trainer::metadata::thumbnail_url("").unwrap().is_none());
/// assert!(trainer::metadata::thumbnail_url("no/such/thumb.png").is_err());
/// ```
pub fn thumbnail_url(thumbnail: &str) -> std::io::Result<Option<String>> {
    use base64::Engine;
    if thumbnail.is_empty() || thumbnail.starts_with("data:") {
        return Ok((!thumbnail.is_empty()).then(|| thumbnail.to_owned()));
    }
    let path = std::path::Path::new(thumbnail);
    let bytes = std::fs::read(path)?;
    // The file's own format, not its name: readers show the thumbnail as that image type.
    let not_image = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let format = image::guess_format(&bytes).map_err(|_| not_image("not an image file (PNG, JPEG, WebP, GIF or BMP)".into()))?;
    let mime = match format {
        image::ImageFormat::Png => "image/png",
        image::ImageFormat::Jpeg => "image/jpeg",
        image::ImageFormat::WebP => "image/webp",
        image::ImageFormat::Gif => "image/gif",
        image::ImageFormat::Bmp => "image/bmp",
        other => return Err(not_image(format!("a {other:?} image; use PNG, JPEG, WebP, GIF or BMP"))),
    };
    Ok(Some(format!("data:{mime};base64,{}", base64::engine::general_purpose::STANDARD.encode(bytes))))
}

/// The model spec's keys every LoRA of `base` gets: its architecture, implementation,
/// title, resolution, date and prediction type.
fn spec_keys(base: BaseModel<'_>, title: &str, (width, height): (u32, u32), date: SystemTime) -> Vec<(&'static str, String)> {
    let architecture = match (base.version, base.v_prediction) {
        ("sd_v1", _) => "stable-diffusion-v1/lora",
        ("sd_v2", false) => "stable-diffusion-v2-512/lora",
        ("sd_v2", true) => "stable-diffusion-v2-768-v/lora",
        (sd_pipeline::SDXL_BASE_VERSION, _) => "stable-diffusion-xl-v1-base/lora",
        // The built-in demo model fits no real architecture: no UI should offer it for one.
        _ => "sd-lora-rs-tiny/lora",
    };
    let implementation = match base.version {
        sd_pipeline::SDXL_BASE_VERSION => "https://github.com/Stability-AI/generative-models",
        _ => "diffusers",
    };
    vec![
        ("modelspec.sai_model_spec", "1.0.1".to_owned()),
        ("modelspec.architecture", architecture.to_owned()),
        // kohya's rule: SDXL LoRAs (named by SGM paths) are Stability AI's implementation.
        ("modelspec.implementation", implementation.to_owned()),
        ("modelspec.implementation_version", format!("sd-lora-rs/{}", env!("CARGO_PKG_VERSION"))),
        ("modelspec.title", title.to_owned()),
        ("modelspec.resolution", format!("{width}x{height}")),
        ("modelspec.date", iso_date(date)),
        ("modelspec.prediction_type", if base.v_prediction { "v" } else { "epsilon" }.to_owned()),
    ]
}

/// kohya's `ss_v2` and `ss_base_model_version` of a LoRA for `base`.
fn base_keys(base: BaseModel<'_>) -> [(&'static str, String); 2] {
    // sd-scripts marks v-prediction SD1.x / SD2.x models: `sd_v2_v`, `sd_v1_v`.
    let suffix = if base.v_prediction && matches!(base.version, "sd_v1" | "sd_v2") { "_v" } else { "" };
    [("ss_v2", py_bool(base.version == "sd_v2")), ("ss_base_model_version", format!("{}{suffix}", base.version))]
}

/// The metadata of a LoRA extracted from two models of `base`'s kind (`trainer extract`),
/// as kohya's `extract_lora_from_models.py` writes it: the base model's version, the LoRA
/// module (the kohya writer adds the ranks) and, unless `no_model_spec`, the SAI model
/// spec with `title` and the model's default resolution, dated `now`; `comment` goes to
/// `ss_training_comment`.
///
/// ```
/// use trainer::metadata::{extraction_metadata, BaseModel};
///
/// let base = BaseModel { version: "sd_v2", v_prediction: true };
/// let keys = extraction_metadata(base, "my-lora", "extracted", false, std::time::SystemTime::now());
/// assert_eq!(keys["ss_base_model_version"], "sd_v2_v");
/// assert_eq!(keys["modelspec.architecture"], "stable-diffusion-v2-768-v/lora");
/// assert_eq!(keys["modelspec.resolution"], "768x768");
/// ```
pub fn extraction_metadata(base: BaseModel<'_>, title: &str, comment: &str, no_model_spec: bool, now: SystemTime) -> BTreeMap<String, String> {
    let mut keys: Vec<(&str, String)> = base_keys(base).into();
    keys.push(("ss_network_module", "networks.lora".into()));
    keys.push(("ss_training_comment", comment.into()));
    if !no_model_spec {
        // sai_model_spec's default resolution: 1024 for SDXL, 768 for v-prediction SD2.x.
        let side = match (base.version, base.v_prediction) {
            (sd_pipeline::SDXL_BASE_VERSION, _) => 1024,
            ("sd_v2", true) => 768,
            ("tiny" | "tiny_sdxl", _) => 64,
            _ => 512,
        };
        keys.extend(spec_keys(base, title, (side, side), now));
    }
    keys.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

/// kohya's `ss_network_args`: the `network_args` a kohya run would have been given for
/// these settings, as strings (the kohya writer adds `conv_dim` / `conv_alpha` from the
/// adapters themselves).
fn network_args(l: &crate::config::LoraSection) -> Option<String> {
    let mut args = serde_json::Map::new();
    let ratios = [("loraplus_lr_ratio", l.loraplus_lr_ratio), ("loraplus_unet_lr_ratio", l.loraplus_unet_lr_ratio), ("loraplus_text_encoder_lr_ratio", l.loraplus_text_encoder_lr_ratio)];
    for (key, p) in [("rank_dropout", l.rank_dropout), ("module_dropout", l.module_dropout)].into_iter().chain(ratios) {
        if p > 0.0 {
            args.insert(key.into(), p.to_string().into());
        }
    }
    // The block-wise settings as they were given, in kohya's syntax.
    let blocks = [
        ("down_lr_weight", &l.down_lr_weight),
        ("mid_lr_weight", &l.mid_lr_weight),
        ("up_lr_weight", &l.up_lr_weight),
        ("block_dims", &l.block_dims),
        ("block_alphas", &l.block_alphas),
        ("conv_block_dims", &l.conv_block_dims),
        ("conv_block_alphas", &l.conv_block_alphas),
    ];
    for (key, text) in blocks {
        if !text.trim().is_empty() {
            args.insert(key.into(), text.trim().into());
        }
    }
    // LyCORIS' arguments (`algo` itself the kohya writer adds from the adapters).
    if l.use_scalar {
        args.insert("use_scalar".into(), "True".into());
    }
    if l.rank_dropout_scale {
        args.insert("rank_dropout_scale".into(), "True".into());
    }
    if l.use_tucker {
        args.insert("use_tucker".into(), "True".into());
    }
    if l.algo == lora_core::Algo::Lokr {
        args.insert("factor".into(), l.lokr_factor.to_string().into());
        for (key, on) in [("decompose_both", l.lokr_decompose_both), ("full_matrix", l.lokr_full_matrix), ("unbalanced_factorization", l.lokr_unbalanced_factorization)] {
            if on {
                args.insert(key.into(), "True".into());
            }
        }
    }
    if l.dylora_unit > 0 {
        args.insert("unit".into(), l.dylora_unit.to_string().into());
    }
    if l.block_lr_zero_threshold > 0.0 {
        args.insert("block_lr_zero_threshold".into(), l.block_lr_zero_threshold.to_string().into());
    }
    (!args.is_empty()).then(|| serde_json::Value::Object(args).to_string())
}
