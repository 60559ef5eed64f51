//! The LoRA training loop.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::nn::loss::MseLoss;
use burn::module::Module;
use burn::optim::{GradientsAccumulator, GradientsParams};
use lora_core::guard::{read_records, DynamicLossScale, GuardSettings, StepGuard, StepOutcome, StepRecord};
use lora_core::optim::FlatAdamW;
use sd_model::checkpoint::CheckpointOptions;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::Tensor;
use lora_core::sites::LoraSites;
use lora_core::{sites, AdapterSet};
use sd_data::{demo, Dataset, DatasetConfig, SubsetConfig};
use sd_model::targets::{attach_new_adapters_with, Selection};
use sd_model::DiagonalGaussian;
use sd_sched::training::{adaptive_offset_noise, elementwise_loss, offset_noise, pyramid_noise, pyramid_ratios, HuberSchedule, LossType, TimestepSampler, TrainingSchedule};
use sd_sched::{NoiseSchedule, NoiseSource, PredictionType, SeededNoise};

use crate::config::{LrScheduler, MixedPrecision, Prediction, TrainConfig};
use crate::embedding::TrainedEmbedding;
use sd_pipeline::{grid, merge_adapters, save_png, to_precision, TextConditioning, TextEncoders};
use sd_pipeline::{load_components, Components};
use lora_core::Component;
use crate::state::{
    adapter_params, export_moments, export_optimizer_state, host_params, import_moments, import_optimizer_state, restore_adapter_params,
    StateInfo, TrainingState,
};
use crate::tensorboard::EventWriter;
use crate::{plot, TrainError};

/// Progress of one optimizer step, for progress bars and logs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepInfo {
    /// Steps done (1-based).
    pub step: usize,
    /// Total steps.
    pub total: usize,
    /// Loss of the step (mean over its micro-batches).
    pub loss: f32,
    /// Learning rate used.
    pub lr: f64,
    /// Seconds since training started, when the step's numbers were read back (steps
    /// read together share it; see [`train`]).
    pub elapsed_s: f64,
}

/// Where training left its outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainReport {
    /// The LoRA file (with an `[embedding]` and no adapters, the embedding file).
    pub lora: PathBuf,
    /// Whether `lora` is an embedding file: an `[embedding]` trained without adapters
    /// (textual inversion), called by the file's name in A1111 and `generate --embedding`.
    pub embedding_file: bool,
    /// Sample grid from the trained LoRA (not written when training was interrupted or
    /// `output.sample_prompts` is empty).
    pub sample_grid: Option<PathBuf>,
    /// Per-step metrics, one JSON object per line.
    pub metrics: PathBuf,
    /// The TensorBoard event file of this run (`output.tensorboard`), in `<output_dir>/logs`.
    pub tensorboard: Option<PathBuf>,
    /// `(step, validation loss)` of every validation (`data.validation_split`; a resumed
    /// run's list starts with the earlier run's), also in `<output_dir>/validation.jsonl`.
    pub validation: Vec<(usize, f32)>,
    /// Loss-curve image.
    pub loss_curve: PathBuf,
    /// The resolved configuration.
    pub config: PathBuf,
    /// Loss per step.
    pub losses: Vec<f32>,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Whether `on_step` asked to stop before the last step.
    pub interrupted: bool,
}

/// Learning rate at optimizer step `step` (0-based): linear warmup, then the schedule;
/// with Adafactor's `relative_step`, its own step size for the step (which replaces them).
pub fn learning_rate(cfg: &crate::config::TrainSection, step: usize) -> f64 {
    group_learning_rate(cfg, step, cfg.learning_rate)
}

/// [`learning_rate`] of a parameter group whose peak rate is `peak` (the text encoders'
/// `text_encoder_lr`). This trainer's own schedules scale with the peak; PyTorch's
/// schedulers keep `eta_min` an absolute rate for every group, as PyTorch does. (A
/// schedule that `TrainConfig::validate` refuses gives `peak`.)
///
/// ```
/// use trainer::{config::LrScheduler, train::group_learning_rate};
/// let mut train = trainer::TrainConfig::default().train;
/// (train.lr_scheduler, train.lr_warmup_steps, train.max_train_steps) = (LrScheduler::CosineAnnealingLr, 0, 100);
/// (train.lr_scheduler_args.t_max, train.lr_scheduler_args.eta_min) = (Some(100), Some(1e-5));
/// assert!((group_learning_rate(&train, 100, 5e-4) - 1e-5).abs() < 1e-15);
/// ```
pub fn group_learning_rate(cfg: &crate::config::TrainSection, step: usize, peak: f64) -> f64 {
    if let Some(adafactor) = cfg.adafactor_settings().filter(|a| a.relative_step) {
        return adafactor.step_size(cfg.learning_rate, step + 1);
    }
    match cfg.torch_schedule() {
        Ok(Some(schedule)) => schedule.lr(peak, step),
        Ok(None) if peak == cfg.learning_rate => own_schedule(cfg, step),
        Ok(None) => own_schedule(cfg, step) * peak / cfg.learning_rate,
        Err(_) => peak,
    }
}

/// The rate of this trainer's own schedules (warmup included) at `learning_rate`.
fn own_schedule(cfg: &crate::config::TrainSection, step: usize) -> f64 {
    let base = cfg.learning_rate;
    let warmup = cfg.warmup_steps();
    // Share of the rate that `cosine_with_min_lr` and `warmup_stable_decay` keep.
    let floor = cfg.lr_scheduler_min_lr_ratio;
    let keep_floor = |factor: f64| (factor * (1.0 - floor) + floor).max(0.0);
    if step < warmup {
        let factor = (step + 1) as f64 / warmup as f64;
        // transformers' warmup_stable_decay warms up from the floor.
        return base * if cfg.lr_scheduler == LrScheduler::WarmupStableDecay { keep_floor(factor) } else { factor };
    }
    let decay_steps = cfg.max_train_steps.saturating_sub(warmup).max(1);
    let progress = ((step - warmup) as f64 / decay_steps as f64).min(1.0);
    // sd-scripts passes `lr_scheduler_num_cycles / 2` waves: a half-wave per cycle (0
    // cycles: no decay, as transformers computes it).
    let half_waves = |p: f64| 0.5 * (1.0 + (std::f64::consts::PI * cfg.lr_cycles as f64 * p).cos());
    match cfg.lr_scheduler {
        LrScheduler::CosineWithMinLr => base * keep_floor(half_waves(progress)),
        LrScheduler::InverseSqrt => {
            let timescale = match (cfg.lr_scheduler_timescale, warmup) {
                (0, 0) => 10_000,
                (0, w) => w,
                (t, _) => t,
            } as f64;
            base / (((step - warmup) as f64 + timescale) / timescale).sqrt()
        }
        LrScheduler::WarmupStableDecay => {
            // The decay takes the last `decay` steps, as in transformers, also when it
            // begins before the warmup ends (it then starts part-way through).
            let decay = cfg.decay_steps();
            let start = cfg.max_train_steps as f64 - decay as f64;
            let step = step as f64;
            if step < start {
                base
            } else if step < start + decay as f64 {
                base * keep_floor(half_waves((step - start) / decay.max(1) as f64))
            } else {
                base * floor
            }
        }
        // PyTorch's schedulers and piecewise_constant are `TorchLrSchedule`s.
        LrScheduler::Constant
        | LrScheduler::PiecewiseConstant
        | LrScheduler::CosineAnnealingLr
        | LrScheduler::CosineAnnealingWarmRestarts
        | LrScheduler::StepLr
        | LrScheduler::MultiStepLr
        | LrScheduler::ExponentialLr
        | LrScheduler::LinearLr
        | LrScheduler::ConstantLr
        | LrScheduler::PolynomialLr => base,
        LrScheduler::Linear => base * (1.0 - progress),
        LrScheduler::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        LrScheduler::CosineWithRestarts => {
            // 0 cycles: the full rate until the end, as transformers' `cos(π · (0 % 1))`.
            let cycles = cfg.lr_cycles as f64;
            if progress >= 1.0 {
                return 0.0;
            }
            base * 0.5 * (1.0 + (std::f64::consts::PI * ((cycles * progress) % 1.0)).cos())
        }
        LrScheduler::Polynomial => {
            // diffusers' `get_polynomial_decay_schedule_with_warmup` (lr_end 1e-7).
            let end = POLYNOMIAL_LR_END.min(base);
            (base - end) * (1.0 - progress).powf(cfg.lr_scheduler_power) + end
        }
    }
}

/// The learning rate the `polynomial` schedule ends at (diffusers' default `lr_end`).
const POLYNOMIAL_LR_END: f64 = 1e-7;

/// Maps an I/O error to [`TrainError::Io`] naming `path`.
pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Whether `dir` holds kohya `N_name` folders (or is one), whose names set the repeats.
fn has_kohya_folders(dir: &Path) -> bool {
    let kohya = |name: &str| name.split_once('_').is_some_and(|(n, rest)| !rest.is_empty() && n.parse::<u32>().is_ok());
    let own = dir.file_name().and_then(|n| n.to_str()).is_some_and(kohya);
    own || std::fs::read_dir(dir)
        .map(|entries| entries.flatten().any(|e| e.path().is_dir() && e.file_name().to_str().is_some_and(kohya)))
        .unwrap_or(false)
}

/// Builds the dataset the configuration asks for. An `output.output_dir` at or inside one
/// of its image folders is an error: the run's own images (sample grids, `loss.png`) would
/// be trained on by the next run there.
pub fn open_dataset(config: &TrainConfig) -> Result<Dataset, TrainError> {
    let dataset = open_dataset_unchecked(config)?;
    check_output_outside_data(config, &dataset)?;
    Ok(dataset)
}

/// See [`open_dataset`].
fn check_output_outside_data(config: &TrainConfig, dataset: &Dataset) -> Result<(), TrainError> {
    // Symbolic links resolved where the folder exists (the output's may not yet).
    let resolved = |p: &Path| std::path::absolute(p).ok().map(|a| a.canonicalize().unwrap_or(a));
    let Some(out) = resolved(&config.output.output_dir) else { return Ok(()) };
    for dir in dataset.config().subsets.iter().map(|s| &s.image_dir).filter(|d| d.is_dir()) {
        if let Some(data) = resolved(dir).filter(|data| out.starts_with(data)) {
            return Err(TrainError::Config {
                origin: "output.output_dir".into(),
                reason: format!(
                    "{} is inside the image folder {}: the run's sample grids and loss.png would be trained on by the next run; choose a folder outside the data",
                    out.display(),
                    data.display()
                ),
            });
        }
    }
    Ok(())
}

fn open_dataset_unchecked(config: &TrainConfig) -> Result<Dataset, TrainError> {
    let d = &config.data;
    let subset = |dir: &str, is_reg: bool| SubsetConfig {
        // A plain folder (and fine-tuning metadata) gets `num_repeats`; kohya `N_name`
        // folders keep their own.
        num_repeats: (!is_reg && (!d.in_json.is_empty() || !has_kohya_folders(Path::new(dir)))).then_some(d.num_repeats),
        is_reg,
        caption_extension: d.caption_extension.clone(),
        shuffle_caption: d.shuffle_caption,
        keep_tokens: d.keep_tokens,
        keep_tokens_separator: Some(d.keep_tokens_separator.clone()).filter(|v| !v.is_empty()),
        caption_prefix: Some(d.caption_prefix.clone()).filter(|v| !v.is_empty()),
        caption_suffix: Some(d.caption_suffix.clone()).filter(|v| !v.is_empty()),
        secondary_separator: Some(d.secondary_separator.clone()).filter(|v| !v.is_empty()),
        caption_separator: d.caption_separator.clone(),
        enable_wildcard: d.enable_wildcard,
        caption_dropout_rate: d.caption_dropout_rate,
        caption_dropout_every_n_epochs: d.caption_dropout_every_n_epochs,
        caption_tag_dropout_rate: d.caption_tag_dropout_rate,
        token_warmup_min: d.token_warmup_min,
        token_warmup_step: d.token_warmup_step,
        flip_aug: d.flip_aug,
        random_crop: d.random_crop,
        face_crop_aug_range: d.face_crop_aug_range,
        resize_interpolation: d.resize_interpolation,
        color_aug: d.color_aug,
        alpha_mask: d.alpha_mask,
        recursive: d.recursive,
        // Masks are for the training images; regularization images train whole.
        mask_dir: (!is_reg && !d.mask_dir.is_empty()).then(|| d.mask_dir.clone().into()),
        metadata_file: (!is_reg && !d.in_json.is_empty()).then(|| d.in_json.clone().into()),
        ..SubsetConfig::new(dir)
    };
    // A dataset config replaces the folders (the default `train_data_dir` is the demo).
    if d.train_data_dir == "demo" && d.dataset_config.is_empty() {
        // The demo's images and buckets follow `data.resolution` (their own bucket range,
        // scaled to it: [data]'s defaults are made for SD-sized images).
        let mut ds = DatasetConfig::demo_at("demo", d.resolution);
        (ds.batch_size, ds.seed) = (config.train.train_batch_size, config.train.seed);
        (ds.enable_bucket, ds.bucket_no_upscale) = (d.enable_bucket, d.bucket_no_upscale);
        let samples = demo::generate(&demo::DemoConfig {
            count: d.demo_images,
            base_size: d.resolution.width.min(d.resolution.height),
            ..Default::default()
        });
        // The demo images take [data]'s caption and augmentation settings as a folder
        // would (no files: no masks or metadata).
        let subset = SubsetConfig {
            num_repeats: Some(d.num_repeats),
            mask_dir: None,
            metadata_file: None,
            // Names the folder in LoRA metadata (in-memory images have no folder).
            image_dir: "demo".into(),
            ..subset("demo", false)
        };
        return Ok(Dataset::from_memory(&ds, subset, demo::into_memory_images(samples))?);
    }
    let mut ds = DatasetConfig::single(&d.train_data_dir);
    ds.min_image_size = d.min_image_size;
    ds.resolution = d.resolution;
    ds.batch_size = config.train.train_batch_size;
    ds.seed = config.train.seed;
    ds.skip_bad_images = d.skip_bad_images;
    ds.enable_bucket = d.enable_bucket;
    ds.min_bucket_reso = d.min_bucket_reso;
    ds.bucket_reso_steps = d.bucket_reso_steps;
    ds.max_bucket_reso = if d.max_bucket_reso > 0 { d.max_bucket_reso } else { default_max_bucket_reso(d.resolution.max_side(), d.bucket_reso_steps) };
    ds.bucket_no_upscale = d.bucket_no_upscale;
    // The built-in tiny models train at the demo's small sizes: bucket keys left at their
    // (SD-sized) defaults scale to `data.resolution` as the demo's do, so that a folder of
    // one's own trains on them without three overrides.
    let defaults = crate::config::DataSection::default_buckets();
    if sd_pipeline::TINY_MODELS.contains(&config.model.pretrained.as_str()) && (d.min_bucket_reso, d.max_bucket_reso, d.bucket_reso_steps) == defaults {
        let small = DatasetConfig::demo_at("", d.resolution);
        (ds.min_bucket_reso, ds.max_bucket_reso, ds.bucket_reso_steps) = (small.min_bucket_reso, small.max_bucket_reso, small.bucket_reso_steps);
    }
    ds.prior_loss_weight = d.prior_loss_weight;
    if !d.dataset_config.is_empty() {
        let path = Path::new(&d.dataset_config);
        if path.extension().is_some_and(|e| e.eq_ignore_ascii_case("toml")) {
            // kohya's dataset config: what it leaves out comes from [data] (sd-scripts fills
            // it from its command line, `num_repeats` from `--dataset_repeats`).
            // (An explicit 1 would override `N_name` folders read with `folder_names = true`.)
            ds.subsets = vec![SubsetConfig { num_repeats: Some(d.num_repeats).filter(|n| *n != 1), ..subset("", false) }];
            let kohya = DatasetConfig::from_kohya_toml_file(path, &ds)?;
            if kohya.batch_size != config.train.train_batch_size {
                return Err(TrainError::Config {
                    origin: format!("data.dataset_config = {}", path.display()),
                    reason: format!(
                        "sets batch_size = {} but train.train_batch_size is {}: set train.train_batch_size = {0} (the trainer takes one batch size, from [train])",
                        kohya.batch_size, config.train.train_batch_size
                    ),
                });
            }
            return Ok(Dataset::open(&kohya)?);
        }
        // The file describes the data completely; batch size and seed follow [train].
        let mut ds = DatasetConfig::from_json_file(path)?;
        ds.batch_size = config.train.train_batch_size;
        ds.seed = config.train.seed;
        return Ok(Dataset::open(&ds)?);
    }
    ds.subsets = vec![subset(&d.train_data_dir, false)];
    if !d.reg_data_dir.is_empty() {
        ds.subsets.push(subset(&d.reg_data_dir, true));
    }
    Dataset::open(&ds).map_err(data_key_error)
}

/// A setting sd-data refuses, named as the `[data]` (or `[train]`) key that set it: a
/// plain folder has no dataset config to blame.
fn data_key_error(e: sd_data::DataError) -> TrainError {
    match e {
        sd_data::DataError::Config { key, message } => {
            // A folder's subset takes its settings from [data]'s keys of the same name.
            let key = match key.split_once("].") {
                Some((subset, rest)) if subset.starts_with("subsets[") => rest.to_string(),
                _ => key,
            };
            let origin = match key.as_str() {
                "batch_size" => "train.train_batch_size".to_string(),
                "seed" => "train.seed".to_string(),
                _ => format!("data.{key}"),
            };
            TrainError::Config { origin, reason: message }
        }
        other => other.into(),
    }
}

/// The data of a run: the training dataset and, with `data.validation_split`, the
/// validation dataset held out of it ([`training_datasets`]).
pub type TrainingData = (Dataset, Option<Dataset>);

/// The training dataset and, with `data.validation_split`, the validation dataset held out
/// of it (seeded by `train.seed`). Opening scans every image (sizes, content hashes): open
/// once and hand the result to [`data_summary`] and [`train_on`] / [`resume_on`].
pub fn training_datasets(config: &TrainConfig) -> Result<TrainingData, TrainError> {
    let dataset = open_dataset(config)?;
    let (train, validation) = if config.data.validation_split == 0.0 {
        (dataset, None)
    } else {
        let (train, validation) = dataset.split_validation(config.data.validation_split, config.data.validation_seed_or(config.train.seed))?;
        (train, Some(validation))
    };
    let plans = train.plan_epoch(0);
    let mut samples = plans.iter().flat_map(|b| &b.samples).peekable();
    if samples.peek().is_some() && samples.all(|s| s.diff_output_preservation) {
        return Err(TrainError::Config {
            origin: "data".into(),
            reason: "every training sample keeps the model's output (diff_output_preservation / custom_attributes): the adapters would learn nothing; leave it off for the images to learn from".into(),
        });
    }
    // The token warmup counts optimizer steps (the validation images have none).
    let t = &steps_for(config, &train)?.train;
    Ok((train.with_steps(t.gradient_accumulation_steps, t.max_train_steps), validation))
}

/// What a run of `config` trains on `data` ([`training_datasets`]), in a few lines for
/// people: images, samples and batches per epoch, the buckets, the held-out validation
/// images, files skipped as bad, captions longer than `model.max_token_length` (tokenized
/// with the model's tokenizer) and the steps as epochs.
pub fn data_summary(config: &TrainConfig, data: &TrainingData) -> Result<String, TrainError> {
    let (dataset, validation) = data;
    let stepped = steps_for(config, dataset)?;
    let t = &stepped.train;
    let plans = dataset.plan_epoch(0);
    let batches = plans.len();
    let buckets: Vec<String> = dataset.bucket_table().iter().map(|((w, h), n)| format!("{w}x{h}: {n}")).collect();
    let mut out = format!(
        "data: {} images, {} samples per epoch in {batches} batches of up to {}; buckets (WxH: samples) {}",
        dataset.images().len(),
        dataset.samples_per_epoch(),
        t.train_batch_size,
        buckets.join(", ")
    );
    let preserving = plans.iter().flat_map(|b| &b.samples).filter(|s| s.diff_output_preservation).count();
    if preserving > 0 {
        out.push_str(&format!("\n{preserving} samples per epoch keep the model's output (diff_output_preservation): their targets are its prediction without the adapters"));
    }
    if let Some(v) = validation {
        out.push_str(&format!("\nvalidation: {} held-out images", v.images().len()));
    }
    // sd-scripts says so too: a regularization folder that gives nothing is no silent no-op.
    let d = &config.data;
    if !d.reg_data_dir.is_empty() && d.dataset_config.is_empty() {
        let reg_images: usize = dataset.folders().iter().filter(|f| f.is_reg).map(|f| f.images).sum();
        if d.train_data_dir == "demo" {
            out.push_str("\nnote: data.reg_data_dir is not used with the built-in demo images");
        } else if reg_images == 0 {
            out.push_str(&format!("\nnote: data.reg_data_dir = {} holds no usable images: training without regularization images", d.reg_data_dir));
        }
    }
    if let Some(skipped) = dataset.skipped_summary() {
        out.push_str(&format!("\n{skipped}"));
    }
    if let Some(note) = sub_folder_note(config, dataset) {
        out.push_str(&format!("\n{note}"));
    }
    let tokens = config.model.max_token_length;
    let tokenizer = sd_pipeline::load_tokenizer(&config.model.pretrained)?;
    // With wildcards a caption holds several lines, of which a sample sees one.
    let captions: Vec<String> = (0..dataset.images().len()).flat_map(|i| dataset.fixed_caption(i).split('\n').map(String::from).collect::<Vec<_>>()).collect();
    // A trained embedding's word takes its vectors' tokens: counted as as many one-token words.
    let e = &config.embedding;
    let captions: Vec<String> = match e.enabled() {
        true => {
            let stand_in = vec![(e.token.clone(), vec!["a".to_string(); e.vectors])];
            captions.iter().map(|c| sd_model::textual_inversion::expand_prompt(c, &stand_in)).collect()
        }
        false => captions,
    };
    if let (over @ 1.., longest) = sd_pipeline::overlong_prompts(&tokenizer, captions.iter().map(String::as_str), tokens)? {
        let hint = if tokens < 225 { "; model.max_token_length = 150 or 225 keeps more" } else { "" };
        out.push_str(&format!(
            "\nnote: {over} of {} captions have more than {tokens} tokens (the longest {longest}): the text encoder does not see the rest{hint}",
            captions.len()
        ));
    }
    let e = &config.embedding;
    if e.enabled() {
        let what = match config.trains_adapters() {
            true => "pivotal tuning: bundled in the LoRA files",
            false => "textual inversion: saved as an embedding file",
        };
        let source = match e.template.prompts() {
            Some(p) => format!("captions from {} templates", p.len()),
            None => {
                let captions = (0..dataset.images().len()).map(|i| dataset.fixed_caption(i)).collect::<Vec<_>>();
                format!("the word is in {} of {} captions", sd_pipeline::texts_with_word(&e.token, captions.iter().map(String::as_str)), captions.len())
            }
        };
        let mut vectors = if e.vectors == 1 { "1 vector".to_string() } else { format!("{} vectors", e.vectors) };
        if e.train_fraction < 1.0 {
            vectors.push_str(&format!(", trained for the first {} steps", e.train_steps(t.max_train_steps)));
        }
        out.push_str(&format!("\nembedding `{}` ({vectors}; {what}): {source}", e.token));
    }
    let epochs = t.max_train_steps as f64 / steps_per_epoch(t, batches) as f64;
    let each = match t.gradient_accumulation_steps {
        1 => String::new(),
        n => format!(" of {n} batches each"),
    };
    out.push_str(&format!("\n{} optimizer steps{each}: {epochs:.1} epochs", t.max_train_steps));
    // A start past the first step (its errors are the run's to report; a resumed run
    // starts at its state instead).
    if let Ok(start @ Progress { step: 1.., .. }) = initial_progress(&stepped, dataset) {
        let key = if t.initial_step > 0 { "initial_step" } else { "initial_epoch" };
        out.push_str(&format!(
            "; without --resume the run starts at step {} (epoch {}, batch {} of it; train.{key}), the learning-rate schedule there",
            start.step,
            start.epoch + 1,
            start.batch_in_epoch + 1
        ));
    }
    Ok(out)
}

fn generate_grid<B: burn::tensor::backend::Backend>(
    c: &Components<B>,
    config: &TrainConfig,
    embedding: Option<&TrainedEmbedding>,
    size: (usize, usize),
    device: &B::Device,
) -> Result<Option<image::RgbImage>, TrainError> {
    let opts = config.sample_defaults(size);
    // The trained embedding's word in the prompts stands for its tokens.
    let prompts: Vec<String> = config.output.sample_prompts.iter().map(|p| embedding.map_or_else(|| p.clone(), |e| e.expand(p))).collect();
    match sd_pipeline::sample_images(c, &prompts, &opts, device) {
        Ok(images) => Ok(Some(grid(&images, images.len().min(4)))),
        // Adapters gone non-finite (a run that skips non-finite steps) sample NaN: no
        // grid, rather than a black one or a stopped run.
        Err(sd_pipeline::PipelineError::NonFinite) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Trains a LoRA as `config` says, calling `on_step` for every optimizer step; when it
/// returns `false` (e.g. on Ctrl-C) training stops, the LoRA trained so far (and, with
/// `output.save_state`, the training state) is saved and the report says `interrupted`.
///
/// The loop does not wait for each step's loss before queuing the next (gradient clipping,
/// non-finite skips and the f16 loss scale are decided on the device): it reads the steps'
/// numbers back every `output.log_interval_s` (1 s by default; 0: every step), and before
/// each sample, save and the end, and then calls `on_step` for each of them. A stop asked
/// for takes effect at that read, after the steps already queued.
///
/// With `train.gradient_checkpointing` the UNet's step runs through
/// [`sd_model::UNet2DConditionModel::forward_backward_checkpointed`] (block-wise
/// recomputation, as diffusers'), on any autodiff backend.
pub fn train<B: AutodiffBackend>(
    config: &TrainConfig,
    device: &B::Device,
    on_step: &mut dyn FnMut(&StepInfo) -> bool,
) -> Result<TrainReport, TrainError> {
    config.validate()?;
    train_on::<B>(config, training_datasets(config)?, device, on_step)
}

/// [`train`] on data already opened with [`training_datasets`] (for `config`).
pub fn train_on<B: AutodiffBackend>(
    config: &TrainConfig,
    data: TrainingData,
    device: &B::Device,
    on_step: &mut dyn FnMut(&StepInfo) -> bool,
) -> Result<TrainReport, TrainError> {
    run::<B>(&steps_for(config, &data.0)?, data, None, device, on_step)
}

/// Optimizer steps in an epoch of `batches` batches: `⌈batches / gradient_accumulation_steps⌉`
/// (sd-scripts' count with accelerate: a step never spans two epochs, an epoch's last step
/// takes the batches that are left), at least 1.
pub(crate) fn steps_per_epoch(t: &crate::config::TrainSection, batches: usize) -> usize {
    batches.max(1).div_ceil(t.gradient_accumulation_steps.max(1))
}

/// `config` with `train.max_train_steps` set from `train.max_train_epochs` when that is
/// not 0: enough optimizer steps for that many passes over the data set,
/// `epochs · ⌈batches per epoch / gradient_accumulation_steps⌉` (sd-scripts' rule: with
/// gradient accumulation an epoch's last step takes the batches that are left). Opens the
/// data set to count its batches.
pub fn with_epoch_steps(config: &TrainConfig) -> Result<TrainConfig, TrainError> {
    config.validate()?;
    match config.train.max_train_epochs {
        0 => Ok(config.clone()),
        _ => steps_for(config, &training_datasets(config)?.0),
    }
}

/// `data.max_bucket_reso = 0`: twice the resolution's longer side, at least kohya's 1024,
/// at most the largest side a bucket may have (in whole steps).
fn default_max_bucket_reso(long_side: u32, steps: u32) -> u32 {
    sd_data::capped_bucket_side((long_side * 2).max(1024), steps)
}

/// What an earlier run left in `config.output.output_dir` that a new run there would
/// replace or, with `output.save_last_n_*`, remove: its `config.toml`, `metrics.jsonl`,
/// `validation.jsonl`, `loss.png`, `state/`, sample grids and the LoRA files of `output.output_name`
/// (`NAME.safetensors` and the intermediate saves [`save_number`] recognises). Empty for a new or empty folder.
/// `trainer train` refuses to start over such a run without `--overwrite`.
pub fn earlier_outputs(config: &TrainConfig) -> Vec<PathBuf> {
    let dir = &config.output.output_dir;
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let name = &config.output.output_name;
    let ours = |file: &str| {
        let saved = file == format!("{name}.safetensors") || save_number(name, file).is_some();
        let grid = file.starts_with("samples") && file.ends_with(".png");
        saved || grid || ["config.toml", "metrics.jsonl", "validation.jsonl", "loss.png", "state"].contains(&file)
    };
    let mut found: Vec<PathBuf> = entries.flatten().filter(|e| ours(&e.file_name().to_string_lossy())).map(|e| e.path()).collect();
    found.sort();
    found
}

/// A note on the images read from sub-folders of a `[data]` folder (`data.recursive`), which
/// sd-scripts would not train on: how many, and one of them.
fn sub_folder_note(config: &TrainConfig, dataset: &Dataset) -> Option<String> {
    if !config.data.recursive || !config.data.dataset_config.is_empty() {
        return None;
    }
    let nested: Vec<&Path> = dataset
        .images()
        .iter()
        .filter_map(|image| match &image.source {
            sd_data::ImageSource::File(path) if path.parent() != Some(dataset.subsets()[image.subset].config.image_dir.as_path()) => Some(path.as_path()),
            _ => None,
        })
        .collect();
    let first = nested.first()?;
    Some(format!(
        "note: {} image(s) come from sub-folders of their image folder (e.g. {}); sd-scripts reads only a folder's own images: set data.recursive = false to do the same",
        nested.len(),
        first.display()
    ))
}

/// Asks the running training to stop (from a Ctrl-C handler, say): sample images being
/// drawn are abandoned at their next sampler step (they can take minutes on a CPU), and
/// the run stops, saving its LoRA and state, as when `on_step` returns `false`. A run
/// clears the request when it starts. The request is [`sd_pipeline::request_stop`]'s, so
/// it ends an [`sd_pipeline::denoise`] run outside training too.
///
/// ```no_run
/// // In a Ctrl-C handler (the doc-tests share one process, so this one does not run).
/// trainer::train::request_stop();
/// assert!(trainer::train::stop_requested());
/// ```
pub fn request_stop() {
    sd_pipeline::request_stop();
}

/// Whether [`request_stop`] was called since the current run started.
pub fn stop_requested() -> bool {
    sd_pipeline::stop_requested()
}

/// [`with_epoch_steps`] with the training dataset at hand.
fn steps_for(config: &TrainConfig, dataset: &Dataset) -> Result<TrainConfig, TrainError> {
    config.validate()?;
    let mut config = config.clone();
    let t = &config.train;
    if t.max_train_epochs > 0 {
        let batches = dataset.batches_per_epoch();
        if batches == 0 {
            return Err(TrainError::Config { origin: "data".into(), reason: "the dataset plans no batches".into() });
        }
        config.train.max_train_steps = t.max_train_epochs.checked_mul(steps_per_epoch(t, batches)).ok_or_else(|| TrainError::Config {
            origin: "train.max_train_epochs".into(),
            reason: format!("= {} epochs of {batches} batches is more steps than can be counted", t.max_train_epochs),
        })?;
        if config.train.max_train_steps > crate::config::MAX_TRAIN_STEPS {
            return Err(TrainError::Config {
                origin: "train.max_train_epochs".into(),
                reason: format!("= {} epochs of {batches} batches is {} steps, more than the {} a run may have", config.train.max_train_epochs, config.train.max_train_steps, crate::config::MAX_TRAIN_STEPS),
            });
        }
    }
    Ok(config)
}

/// Continues the run whose training state is in `state_dir` (a `state` folder inside an
/// earlier run's `output_dir`): adapters, optimizer moments, step, data position and random
/// streams are restored, so the result is the same, bit for bit on one machine, as a run
/// that was never interrupted. `config` may raise `train.max_train_steps` or change the
/// outputs, but the `[lora]` section and the base model must be the ones the state was
/// trained with.
pub fn resume<B: AutodiffBackend>(
    config: &TrainConfig,
    state_dir: &Path,
    device: &B::Device,
    on_step: &mut dyn FnMut(&StepInfo) -> bool,
) -> Result<TrainReport, TrainError> {
    config.validate()?;
    resume_on::<B>(config, state_dir, training_datasets(config)?, device, on_step)
}

/// What a run of `config` trains on, as `key = value` lines: the batch size, the
/// accumulation, the images, samples and batches per epoch, and a hash of the images'
/// contents with their repeats. A state records it; [`resume_data_changes`] compares.
pub fn data_fingerprint(config: &TrainConfig, dataset: &Dataset) -> String {
    // FNV-1a over each image's content hash and repeats, in the dataset's order.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for (i, image) in dataset.images().iter().enumerate() {
        for b in image.content_hash.bytes().chain(dataset.repeats(i).to_le_bytes()) {
            hash = (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    let t = &config.train;
    format!(
        "train.train_batch_size = {}\ntrain.gradient_accumulation_steps = {}\nimages = {}\nsamples per epoch = {}\nbatches per epoch = {}\nimage contents and repeats = {hash:016x}",
        t.train_batch_size,
        t.gradient_accumulation_steps,
        dataset.images().len(),
        dataset.samples_per_epoch(),
        dataset.batches_per_epoch()
    )
}

/// What differs between the data the state in `state_dir` was trained on and `data`
/// (one `was → now` line per item of [`data_fingerprint`]); empty when nothing did or the
/// state did not record it. A resumed run may change its data: it then goes on from the
/// state's step and epoch position with the new data (from the next epoch's start where
/// that position is past the end of an epoch of the new data), which an uninterrupted run
/// would not have seen in that order, so the trainer prints these as a note.
pub fn resume_data_changes(state_dir: &Path, config: &TrainConfig, data: &TrainingData) -> Result<Vec<String>, TrainError> {
    let path = state_dir.join("state.json");
    let Ok(text) = std::fs::read_to_string(&path) else { return Ok(Vec::new()) };
    let Ok(info) = serde_json::from_str::<StateInfo>(&text) else { return Ok(Vec::new()) };
    let Some(saved) = info.data else { return Ok(Vec::new()) };
    let now = data_fingerprint(&steps_for(config, &data.0)?, &data.0);
    Ok(saved
        .lines()
        .zip(now.lines())
        .filter(|(a, b)| a != b)
        .map(|(a, b)| {
            let (key, was) = a.split_once(" = ").unwrap_or((a, ""));
            let is = b.split_once(" = ").map_or(b, |(_, v)| v);
            format!("{key}: {was} -> {is}")
        })
        .collect())
}

/// [`resume`] on data already opened with [`training_datasets`] (for `config`).
pub fn resume_on<B: AutodiffBackend>(
    config: &TrainConfig,
    state_dir: &Path,
    data: TrainingData,
    device: &B::Device,
    on_step: &mut dyn FnMut(&StepInfo) -> bool,
) -> Result<TrainReport, TrainError> {
    let config = &steps_for(config, &data.0)?;
    let mut state = TrainingState::load(state_dir)?;
    let fingerprint = fingerprint(config);
    if state.info.fingerprint != fingerprint {
        // The first line that differs; a line only one side has (a setting at its
        // default leaves none) is compared with nothing.
        let (saved, now): (Vec<&str>, Vec<&str>) = (state.info.fingerprint.lines().collect(), fingerprint.lines().collect());
        // A line one side lacks is a setting at its default there.
        let shown = |l: Option<&&str>, other: Option<&&str>| match (l, other) {
            (Some(l), _) => format!("`{l}`"),
            (None, Some(o)) => format!("the default {}", o.split(" = ").next().map_or(String::new(), |k| format!("of `{k}`"))),
            (None, None) => "nothing".into(),
        };
        let differs = (0..saved.len().max(now.len()))
            .find(|&i| saved.get(i) != now.get(i))
            .map(|i| format!("the state has {}, the configuration {}", shown(saved.get(i), now.get(i)), shown(now.get(i), saved.get(i))))
            .unwrap_or_else(|| "the settings differ".into());
        return Err(TrainError::Config {
            origin: state_dir.display().to_string(),
            reason: format!("cannot resume with a different model, [lora] section, optimizer or [embedding]: {differs}"),
        });
    }
    let batches = data.0.batches_per_epoch();
    // Fewer batches per epoch now (fewer images or repeats, a larger batch) than the
    // state's place in its epoch: that epoch is over, the next one starts.
    if state.info.batch_in_epoch > batches {
        state.info.epoch += 1;
        state.info.batch_in_epoch = 0;
    }
    if state.info.step >= config.train.max_train_steps {
        return Err(TrainError::Config {
            origin: state_dir.display().to_string(),
            reason: match config.train.max_train_epochs {
                0 => format!(
                    "the state is at step {}, which is not below train.max_train_steps = {}; raise it to train further",
                    state.info.step, config.train.max_train_steps
                ),
                epochs => format!(
                    "the state is at step {}, which is not below the {} steps of train.max_train_epochs = {epochs}; raise it to train further",
                    state.info.step, config.train.max_train_steps
                ),
            },
        });
    }
    // Resuming into another output_dir: carry the earlier run's per-step metrics along.
    let metrics = config.output.output_dir.join("metrics.jsonl");
    if let Some(earlier) = state_dir.parent().map(|d| d.join("metrics.jsonl")) && earlier.is_file() && !metrics.exists() {
        std::fs::create_dir_all(&config.output.output_dir).map_err(io_err(&config.output.output_dir))?;
        std::fs::copy(&earlier, &metrics).map_err(io_err(&metrics))?;
    }
    let validation = config.output.output_dir.join("validation.jsonl");
    if let Some(earlier) = state_dir.parent().map(|d| d.join("validation.jsonl")) && earlier.is_file() && !validation.exists() {
        std::fs::copy(&earlier, &validation).map_err(io_err(&validation))?;
    }
    // ... and its TensorBoard event files.
    let logs = config.output.output_dir.join(LOGS_DIR);
    if let Some(earlier) = state_dir.parent().map(|d| d.join(LOGS_DIR)) && config.output.tensorboard && earlier.is_dir() && !logs.exists() {
        copy_event_files(&earlier, &logs)?;
    }
    run::<B>(config, data, Some(state), device, on_step)
}

/// Fresh adapters on the targets of the `[lora]` section (`with.0`: an embedding trains
/// too), each drawn from a host stream seeded with the run's seed `with.1` and its module
/// path ([`lora_core::adapter_seed`] of `unet.PATH`, `text_encoder.PATH`,
/// `text_encoder_2.PATH`): the same initial LoRA on every backend, whatever else is
/// targeted. Returns whether the text encoders have any.
fn attach_configured_adapters<B: AutodiffBackend>(
    l: &crate::config::LoraSection,
    (with_embedding, seed): (bool, u64),
    unet: &mut sd_model::UNet2DConditionModel<B>,
    encoders: &mut [sd_model::ClipTextModel<B>],
    device: &B::Device,
) -> Result<bool, TrainError> {
    let (lora, spatial) = (l.linear_config(), l.spatial_config());
    // Seeded by the adapter's PEFT name (`unet.PATH`, `text_encoder.PATH`, ...).
    let at = |config: lora_core::LoraConfig, component: Component, path: &str| {
        l.config_at(config, path).with_init_seed(Some(lora_core::adapter_seed(seed, &lora_core::AdapterKey::new(component, path).peft_name())))
    };
    let selection = Selection::new(l.unet_targets).include(l.include.clone()).exclude(l.exclude.clone()).with_norms(l.train_norm);
    let attached = match l.block_plan(sd_model::blocks::BlockLayout::of(unet))? {
        // kohya's block-wise ranks: per block, or none where its learning rate is 0.
        Some(plan) => attach_new_adapters_with(unet, &selection, &mut |path, kernel| plan.config(path, kernel).map(|c| at(c, Component::Unet, path)), device)?,
        None => {
            let mut by_kernel = |path: &str, kernel: [usize; 2]| Some(at(if kernel != [1, 1] { spatial.clone() } else { lora.clone() }, Component::Unet, path));
            attach_new_adapters_with(unet, &selection, &mut by_kernel, device)?
        }
    };
    if l.train_norm && attached.norms == 0 {
        return Err(TrainError::Config {
            origin: "lora.train_norm".into(),
            reason: format!("the targets reach no norm layer: lora.unet_targets = \"{}\" (with include / exclude) holds none; use \"attn-mlp\" (the transformers' norms), \"conv\" or \"all-linear\" (theirs and the ResNet blocks'), or include patterns such as \"*.resnets.*.norm1\"", l.unet_targets.name()),
        });
    }
    if l.has_conv_settings() && attached.spatial == 0 {
        // kohya's `conv_dim` adds the ResNet convolutions itself; here the targets say it.
        return Err(TrainError::Config {
            origin: "lora.conv_rank / lora.conv_block_dims".into(),
            reason: format!("set for 3x3 convolutions, but lora.unet_targets = \"{}\" (with include / exclude) selects none; use unet_targets = \"conv\" (kohya's LoCon set)", l.unet_targets.name()),
        });
    }
    let mut te_targets = 0;
    for (te, component) in encoders.iter_mut().zip([Component::TextEncoder, Component::TextEncoder2]) {
        // SDXL: both encoders, as kohya's sd-scripts target them.
        te_targets += attach_new_adapters_with(te, &Selection::new(l.text_encoder_targets), &mut |path, _| Some(at(lora.clone(), component, path)), device)?.paths.len();
    }
    // An embedding may train alone (kohya's textual inversion).
    if attached.paths.is_empty() && te_targets == 0 && !with_embedding {
        return Err(TrainError::Config {
            origin: "lora".into(),
            reason: "the targets select no layer: lora.unet_targets (with include / exclude) matches no UNet layer and lora.text_encoder_targets is \"none\"".into(),
        });
    }
    Ok(te_targets > 0)
}

/// LoRA-FA (`lora.lora_fa`): every adapter's `down` frozen, once the adapters are attached,
/// started from `lora.network_weights` or restored from a state (each sets trainable
/// tensors). An adapter without a single `down` (a LyCORIS one or a Tucker LoCon, from a
/// file with `lora.dim_from_weights`) is an error.
fn freeze_downs<B: AutodiffBackend>(unet: &mut sd_model::UNet2DConditionModel<B>, encoders: &mut [sd_model::ClipTextModel<B>]) -> Result<(), TrainError> {
    let mut unfrozen = None;
    let mut visit = |path: &str, mut site: lora_core::LoraSiteMut<'_, B>| {
        // A norm module has no `down`: it trains as it is.
        if site.has_adapter() && !site.is_norm() && !site.freeze_down() && unfrozen.is_none() {
            unfrozen = Some(path.to_string());
        }
    };
    unet.visit_lora_sites(&mut visit);
    for te in encoders.iter_mut() {
        te.visit_lora_sites(&mut visit);
    }
    match unfrozen {
        Some(path) => Err(TrainError::Config {
            origin: "lora.lora_fa".into(),
            reason: format!("the adapter of `{path}` has no single `down` to freeze (a LyCORIS adapter, or a LoCon with a Tucker core, from lora.network_weights)"),
        }),
        None => Ok(()),
    }
}

/// The learning-rate factor of each adapter tensor of `model`: `block(path)` for both of
/// an adapter's weights, times `up_ratio` (LoRA+) for its `up` weights.
fn lr_factors<B: AutodiffBackend>(model: &mut impl sites::LoraSites<B>, block: impl Fn(&str) -> f64, up_ratio: f64) -> HashMap<burn::module::ParamId, f32> {
    let mut factors = HashMap::new();
    model.visit_lora_sites(&mut |path, site| {
        // A LyCORIS adapter's factors take the block's rate (LoRA+ is LoRA's).
        for id in site.lycoris_param_ids() {
            factors.insert(id, block(path) as f32);
        }
        if let Some((down, up)) = site.adapter_param_ids() {
            let factor = block(path);
            factors.insert(down, factor as f32);
            factors.insert(up, (factor * up_ratio) as f32);
            if let Some(magnitude) = site.magnitude_param_id() {
                factors.insert(magnitude, factor as f32);
            }
            // A Tucker core is a part of `down` (LoRA+ speeds up `up` alone).
            if let Some(mid) = site.tucker_param_id() {
                factors.insert(mid, factor as f32);
            }
        }
    });
    factors
}

/// The parameter groups sd-scripts gives a model's adapter tensors (for
/// `prodigy_plus_schedule_free`, whose groups each estimate their step size), numbered in
/// order of appearance: one per UNet block with block learning rates (`block` gives a
/// path's block, `None` for none), and LoRA+'s `up` weights (`plus`) apart.
fn param_groups<B: AutodiffBackend>(model: &mut impl sites::LoraSites<B>, block: impl Fn(&str) -> Option<Option<usize>>, plus: bool) -> HashMap<burn::module::ParamId, usize> {
    let (mut keys, mut groups) = (Vec::new(), HashMap::new());
    let mut number = |key: (Option<Option<usize>>, bool)| match keys.iter().position(|k| *k == key) {
        Some(i) => i,
        None => (keys.push(key), keys.len() - 1).1,
    };
    model.visit_lora_sites(&mut |path, site| {
        let at = block(path);
        for id in site.lycoris_param_ids() {
            groups.insert(id, number((at, false)));
        }
        if let Some((down, up)) = site.adapter_param_ids() {
            groups.insert(down, number((at, false)));
            if let Some(magnitude) = site.magnitude_param_id() {
                groups.insert(magnitude, number((at, false)));
            }
            if let Some(mid) = site.tucker_param_id() {
                groups.insert(mid, number((at, false)));
            }
            groups.insert(up, number((at, plus)));
        }
    });
    groups
}

/// One model's adapter optimizer, built alike for every model: `factors` (kohya's block
/// weights and LoRA+, per tensor), Prodigy's or DAdaptAdam's own step-size estimate (one
/// per model), Lion or Adafactor, and with mixed precision f32 master values whose copies in the model are bf16/f16,
/// so that the LoRA layers cast nothing per pass (DoRA's magnitudes stay f32 in the model:
/// `FlatAdamW::with_master_copies`).
pub(crate) fn model_optimizer<B: AutodiffBackend, M: AutodiffModule<B> + sites::LoraSites<B>>(
    model: &mut M,
    factors: &HashMap<burn::module::ParamId, f32>,
    groups: &HashMap<burn::module::ParamId, usize>,
    config: &TrainConfig,
    device: &B::Device,
) -> Result<FlatAdamW<B>, TrainError> {
    let (adamw, prodigy) = config.optimizer_settings();
    let mut optim = FlatAdamW::new(adamw, &*model, device).with_lr_scales(|id| factors.get(&id).copied().unwrap_or(1.0));
    if let Some(prodigy) = prodigy {
        optim = optim.with_prodigy(prodigy);
    }
    if config.train.optimizer == crate::config::Optimizer::Lion {
        optim = optim.with_lion();
    }
    if let Some(dadapt) = config.train.dadapt_settings() {
        optim = optim.with_dadapt_adam(dadapt).map_err(|e| TrainError::Config { origin: "train.dadapt_*".into(), reason: e.to_string() })?;
    }
    // The tensors as PyTorch holds them (linear LoRAs transposed, LyCORIS' 4-d tensors),
    // which Adafactor's and Prodigy+'s factored moments follow.
    // DyLoRA's tensors are cut into rank chunks: a step updates only those it trained.
    let (mut layouts, mut chunks) = (HashMap::new(), HashMap::new());
    model.visit_lora_sites(&mut |_, site| {
        layouts.extend(site.torch_layouts());
        chunks.extend(site.dylora_rank_chunks());
    });
    optim = optim.with_torch_layouts(|id| layouts.get(&id).cloned()).map_err(|e| TrainError::Config { origin: "train.optimizer".into(), reason: e.to_string() })?;
    if !chunks.is_empty() {
        optim = optim
            .with_rank_chunks(|id| chunks.get(&id).copied())
            .map_err(|e| TrainError::Config { origin: "lora.dylora_unit".into(), reason: e.to_string() })?;
    }
    if let Some(adafactor) = config.train.adafactor_settings() {
        optim = optim.with_adafactor(adafactor).map_err(|e| TrainError::Config { origin: "train.adafactor_*".into(), reason: e.to_string() })?;
    }
    if let Some(came) = config.train.came_settings() {
        optim = optim.with_came(came).map_err(|e| TrainError::Config { origin: "train.came_*".into(), reason: e.to_string() })?;
    }
    if let Some(ademamix) = config.train.ademamix_settings() {
        optim = optim.with_ademamix(ademamix).map_err(|e| TrainError::Config { origin: "train.ademamix_*".into(), reason: e.to_string() })?;
    }
    if let Some(sgd) = config.train.sgd_settings() {
        optim = optim.with_sgd(sgd).map_err(|e| TrainError::Config { origin: "train.sgd_*".into(), reason: e.to_string() })?;
    }
    if let Some(schedule_free) = config.train.schedule_free_settings() {
        optim = optim.with_schedule_free(schedule_free).map_err(|e| TrainError::Config { origin: "train.schedule_free_*".into(), reason: e.to_string() })?;
    }
    if config.train.optimizer == crate::config::Optimizer::ProdigyPlusScheduleFree {
        let settings = config.train.prodigy_plus_settings();
        optim = optim.with_prodigy_plus(settings, |id| groups.get(&id).copied().unwrap_or(0)).map_err(|e| TrainError::Config { origin: "train.prodigy_plus_*".into(), reason: e.to_string() })?;
    }
    if config.train.amsgrad {
        optim = optim.with_amsgrad().map_err(|e| TrainError::Config { origin: "train.amsgrad".into(), reason: e.to_string() })?;
    }
    if let Some(dtype) = config.train.mixed_precision.base_dtype() {
        let magnitudes = magnitude_ids(model);
        optim = optim.with_working_dtype(dtype).with_master_copies(|id| magnitudes.contains(&id));
    }
    Ok(optim)
}

/// The parameter ids of `model`'s DoRA magnitudes.
fn magnitude_ids<B: AutodiffBackend>(model: &mut impl sites::LoraSites<B>) -> std::collections::HashSet<burn::module::ParamId> {
    let mut ids = std::collections::HashSet::new();
    model.visit_lora_sites(&mut |_, site| ids.extend(site.magnitude_param_id()));
    ids
}

/// `lora.dim_from_weights`: the adapters of `lora.network_weights`, with their modules,
/// ranks, alphas and values (kohya's `dim_from_weights`), and the `[lora]` dropouts;
/// returns whether the text encoders have any.
fn adapters_from_weights<B: AutodiffBackend>(
    l: &crate::config::LoraSection,
    unet: &mut sd_model::UNet2DConditionModel<B>,
    encoders: &mut [sd_model::ClipTextModel<B>],
    device: &B::Device,
) -> Result<bool, TrainError> {
    let path = Path::new(&l.network_weights);
    let set = read_network_weights(path, unet, encoders)?;
    let in_file = |e: lora_core::LoraError| TrainError::Config {
        origin: format!("lora.network_weights = {} (with lora.dim_from_weights)", path.display()),
        reason: e.to_string(),
    };
    // The file's adapters train as what they are, under that algorithm's settings
    // (`TrainConfig::validate` checks them for `lora.algo`).
    for (key, w) in set.iter() {
        let algo = w.lycoris.as_ref().map_or(lora_core::Algo::Lora, |ly| ly.algo);
        // Norm modules train beside the other layers' algorithm, with lora.train_norm.
        if algo == lora_core::Algo::Norm {
            if !l.train_norm {
                return Err(in_file(lora_core::LoraError::Unsupported(format!("`{key}` is a norm module (LyCORIS' train_norm); set lora.train_norm = true to train it on"))));
            }
            continue;
        }
        if algo != l.algo {
            return Err(in_file(lora_core::LoraError::Unsupported(format!("`{key}` is a {} adapter; set lora.algo = \"{}\" to train it on", algo.name(), algo.name()))));
        }
    }
    let on_unet = sites::attach_adapters(unet, &set, 1.0, device).map_err(in_file)?;
    let mut on_te = 0;
    for te in encoders.iter_mut() {
        on_te += sites::attach_adapters(te, &set, 1.0, device).map_err(in_file)?;
    }
    if on_unet + on_te == 0 {
        return Err(in_file(lora_core::LoraError::Unsupported("the file holds no adapter".into())));
    }
    let dropout = l.linear_config();
    unet.visit_lora_sites(&mut |_, mut site| site.set_dropout(&dropout));
    for te in encoders.iter_mut() {
        te.visit_lora_sites(&mut |_, mut site| site.set_dropout(&dropout));
    }
    // DyLoRA trains the file's adapters in chunks too (each rank a multiple of the unit).
    let unit = (l.dylora_unit > 0).then_some(l.dylora_unit);
    let mut error = None;
    let mut set_unit = |path: &str, mut site: lora_core::LoraSiteMut<'_, B>| {
        if let Err(e) = site.set_dylora_unit(unit, path) {
            error.get_or_insert(e);
        }
    };
    unet.visit_lora_sites(&mut set_unit);
    for te in encoders.iter_mut() {
        te.visit_lora_sites(&mut set_unit);
    }
    if let Some(e) = error {
        return Err(TrainError::Config {
            origin: format!(
                "lora.dylora_unit (with lora.network_weights = {})",
                path.display()
            ),
            reason: e.to_string(),
        });
    }
    Ok(on_te > 0)
}

/// The LoRA file `path` (`lora.network_weights`), its keys resolved against the models.
fn read_network_weights<B: AutodiffBackend>(path: &Path, unet: &mut sd_model::UNet2DConditionModel<B>, encoders: &mut [sd_model::ClipTextModel<B>]) -> Result<AdapterSet, TrainError> {
    let mut encoders: Vec<&mut sd_model::ClipTextModel<B>> = encoders.iter_mut().collect();
    let index = sd_model::lora::module_index_of(unet, &mut encoders)?;
    Ok(AdapterSet::load(path, &index, lora_core::ReadOptions { lenient: false })?.0)
}

/// The settings SDXL cannot train with here yet.
fn check_sdxl_settings(config: &TrainConfig) -> Result<(), TrainError> {
    if config.model.clip_skip != 1 {
        // As in kohya's sd-scripts, where it is ignored with a warning.
        return Err(TrainError::Config {
            origin: "model.clip_skip".into(),
            reason: "SDXL always conditions on both encoders' penultimate layers; leave clip_skip at 1".into(),
        });
    }
    Ok(())
}

/// The adapters' names for state files: `<model>.<path>.down|up...`, and the trained tokens
/// of text encoder `i` as `<model>.trained_tokens`.
fn encoder_params<B: burn::tensor::backend::Backend>(te: &mut sd_model::ClipTextModel<B>, i: usize) -> Vec<(String, crate::state::AdapterParam<B>)> {
    let key = encoder_key(i);
    let mut params = adapter_params(te, key);
    if let Some(rows) = &te.trained_tokens {
        params.push((format!("{key}.trained_tokens"), crate::state::AdapterParam::Matrix(rows.id, rows.val())));
    }
    params
}

/// Restores text encoder `i`'s trained tokens from a state's tensors.
fn restore_trained_tokens<B: AutodiffBackend>(te: &mut sd_model::ClipTextModel<B>, i: usize, saved: &HashMap<String, lora_core::HostTensor>, device: &B::Device) -> Result<(), TrainError> {
    let Some(rows) = te.trained_tokens.as_mut() else { return Ok(()) };
    let key = format!("{}.trained_tokens", encoder_key(i));
    let bad = |reason: String| TrainError::Config { origin: format!("resume: `{key}`"), reason };
    let host = saved.get(&key).ok_or_else(|| bad("missing from the saved state (was [embedding] added?)".into()))?;
    if host.shape != rows.dims() {
        return Err(bad(format!("saved shape {:?}, the embedding is {:?} (was embedding.vectors changed?)", host.shape, rows.dims())));
    }
    *rows = burn::module::Param::from_tensor(host.to_tensor::<B, 2>(device)?).set_require_grad(true);
    Ok(())
}

/// Starts the attached adapters from the LoRA file `path` (`lora.network_weights`).
fn load_network_weights<B: AutodiffBackend>(
    path: &Path,
    unet: &mut sd_model::UNet2DConditionModel<B>,
    encoders: &mut [sd_model::ClipTextModel<B>],
    device: &B::Device,
) -> Result<(), TrainError> {
    let set = read_network_weights(path, unet, encoders)?;
    let in_file = |e: lora_core::LoraError| TrainError::Config {
        origin: format!("lora.network_weights = {}", path.display()),
        reason: format!("{e}; the file's adapters must be among lora.unet_targets / include / text_encoder_targets, at the configured ranks (lora.rank, lora.conv_rank for 3x3 convolutions, or the block_dims)"),
    };
    sites::load_adapter_weights(unet, &set, device).map_err(in_file)?;
    for te in encoders.iter_mut() {
        sites::load_adapter_weights(te, &set, device).map_err(in_file)?;
    }
    Ok(())
}

/// Every sampler the sample prompts use must take the model's scheduler config (Heun, for
/// one, has no zero-terminal-SNR schedule): found here, before the first step, not at the
/// first sample.
fn check_sample_samplers<B: burn::tensor::backend::Backend>(config: &TrainConfig, scheduler: &sd_sched::SchedulerConfig) -> Result<(), TrainError> {
    let defaults = config.sample_defaults((0, 0));
    for prompt in &config.output.sample_prompts {
        let sampler = sd_pipeline::parse_sample_prompt(prompt, &defaults)?.sampler;
        let built = sampler.parse::<sd_sched::SamplerSpec>().and_then(|spec| spec.build::<B>(scheduler).map(|_| ()));
        if let Err(e) = built {
            let origin = if sampler == config.output.sample_sampler { "output.sample_sampler".to_string() } else { format!("output.sample_prompts (\"{prompt}\")") };
            return Err(TrainError::Config { origin, reason: format!("sampler `{sampler}` cannot sample this model: {e}") });
        }
    }
    Ok(())
}

/// The size of samples made during training: `data.resolution`, each side rounded down to
/// a multiple of the model's `step` (at least one step), as a prompt's own `--w`/`--h` are.
fn sample_size(config: &TrainConfig, step: usize) -> (usize, usize) {
    let round = |side: u32| (side as usize / step).max(1) * step;
    (round(config.data.resolution.width), round(config.data.resolution.height))
}

/// The model takes sides that are multiples of `step` pixels (64 for SD): a bucket that is
/// not is a config error here, before the first step, naming the setting that made it.
fn check_bucket_sides(dataset: &Dataset, config: &TrainConfig, step: usize) -> Result<(), TrainError> {
    let fits = |side: u32| (side as usize).is_multiple_of(step);
    let Some(&(w, h)) = dataset.bucket_table().keys().find(|&&(w, h)| !(fits(w) && fits(h))) else {
        return Ok(());
    };
    let d = &config.data;
    let (origin, fix) = if !d.dataset_config.is_empty() {
        (format!("data.dataset_config = {}", d.dataset_config), "its `resolution` and `bucket_reso_steps`".to_string())
    } else if d.enable_bucket {
        ("data.bucket_reso_steps".to_string(), format!("data.bucket_reso_steps (now {})", d.bucket_reso_steps))
    } else {
        ("data.resolution".to_string(), format!("data.resolution (now {}; without buckets every image is resized and cropped to it)", d.resolution))
    };
    Err(TrainError::Config {
        origin,
        reason: format!("gives a {w}x{h} bucket, but this model takes only sides that are multiples of {step} pixels: set {fix} to multiples of {step}"),
    })
}

/// The file name (without `.safetensors`) of the intermediate save after `step`, as
/// sd-scripts names it: `NAME-step00000020`.
pub fn step_save_name(output_name: &str, step: usize) -> String {
    format!("{output_name}-step{step:08}")
}

/// The file name (without `.safetensors`) of the save after epoch `epoch` (1-based), as
/// sd-scripts names it: `NAME-000004`.
pub fn epoch_save_name(output_name: &str, epoch: usize) -> String {
    format!("{output_name}-{epoch:06}")
}

/// Which intermediate save a file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveNumber {
    /// The save after this step ([`step_save_name`]).
    Step(usize),
    /// The save after this epoch ([`epoch_save_name`]).
    Epoch(usize),
}

/// The step or epoch of an intermediate save of `output_name` from its file name:
/// sd-scripts' names ([`step_save_name`], [`epoch_save_name`]) and those earlier versions
/// of this trainer wrote (`NAME-step000020`, `NAME-epoch0004`), so that
/// `output.save_last_n_*` prunes a resumed run's older saves too. `None` for any other file.
///
/// ```
/// use trainer::train::{save_number, SaveNumber};
/// assert_eq!(save_number("style", "style-000004.safetensors"), Some(SaveNumber::Epoch(4)));
/// assert_eq!(save_number("style", "style-step00000020.safetensors"), Some(SaveNumber::Step(20)));
/// assert_eq!(save_number("style", "style.safetensors"), None);
/// ```
pub fn save_number(output_name: &str, file: &str) -> Option<SaveNumber> {
    let rest = file.strip_prefix(output_name)?.strip_prefix('-')?.strip_suffix(".safetensors")?;
    // Zero-padded numbers: the padding is the least count of digits (more past it).
    let number = |digits: &str, least: usize| (digits.len() >= least && digits.bytes().all(|b| b.is_ascii_digit())).then(|| digits.parse().ok()).flatten();
    if let Some(digits) = rest.strip_prefix("step") {
        return number(digits, 6).map(SaveNumber::Step);
    }
    if let Some(digits) = rest.strip_prefix("epoch") {
        return number(digits, 4).map(SaveNumber::Epoch);
    }
    number(rest, 6).map(SaveNumber::Epoch)
}

/// Removes intermediate saves beyond `output.save_last_n_steps` (step saves of steps
/// before `step − N`, as kohya) and `output.save_last_n_epochs` (all but the last N epoch saves). Only files
/// named as this run names its saves are touched.
fn prune_saves(o: &crate::config::OutputSection, step: usize) -> Result<(), TrainError> {
    if o.save_last_n_steps == 0 && o.save_last_n_epochs == 0 {
        return Ok(());
    }
    let mut steps = Vec::new();
    let mut epochs = Vec::new();
    for entry in std::fs::read_dir(&o.output_dir).map_err(io_err(&o.output_dir))? {
        let path = entry.map_err(io_err(&o.output_dir))?.path();
        let file = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
        match save_number(&o.output_name, &file) {
            Some(SaveNumber::Step(n)) => steps.push((n, path)),
            Some(SaveNumber::Epoch(n)) => epochs.push((n, path)),
            None => {}
        }
    }
    let mut remove: Vec<PathBuf> = Vec::new();
    if o.save_last_n_steps > 0 {
        // kohya keeps the saves of steps `step − N` and later.
        remove.extend(steps.into_iter().filter(|(n, _)| n + o.save_last_n_steps < step).map(|(_, p)| p));
    }
    if o.save_last_n_epochs > 0 && epochs.len() > o.save_last_n_epochs {
        epochs.sort();
        let excess = epochs.len() - o.save_last_n_epochs;
        remove.extend(epochs.into_iter().take(excess).map(|(_, p)| p));
    }
    for path in remove {
        std::fs::remove_file(&path).map_err(io_err(&path))?;
    }
    Ok(())
}

/// sd-sched's loss for the configured one.
fn loss_kind(kind: crate::config::LossKind) -> LossType {
    match kind {
        crate::config::LossKind::L2 => LossType::L2,
        crate::config::LossKind::L1 => LossType::L1,
        crate::config::LossKind::Huber => LossType::Huber,
        crate::config::LossKind::SmoothL1 => LossType::SmoothL1,
    }
}

/// The pseudo-Huber thresholds of a batch's timesteps (`None` for the other losses).
/// The batch's samples that keep the model's output (kohya's differential output
/// preservation, [`sd_data::SamplePlan::diff_output_preservation`]), by place.
fn preserved_rows(plan: &sd_data::BatchPlan) -> Vec<usize> {
    plan.samples.iter().enumerate().filter(|(_, s)| s.diff_output_preservation).map(|(i, _)| i).collect()
}

/// `unet` with its adapters off (at multiplier 0, which skips them), the model whose
/// prediction differential output preservation trains towards.
fn without_adapters<B: burn::tensor::backend::Backend>(mut unet: sd_model::UNet2DConditionModel<B>) -> sd_model::UNet2DConditionModel<B> {
    unet.visit_lora_sites(&mut |_, mut site| site.set_multiplier(0.0));
    unet
}

/// kohya's differential output preservation: the `rows` of `target` become what `base`
/// ([`without_adapters`]) predicts for the same noisy latents, timesteps and text (the text
/// as encoded for this step, with trained text encoders' adapters on, as sd-scripts does).
/// Only those rows run the UNet again; nothing of it joins a graph (`base` is an inner,
/// valid model).
fn preserved_targets<B: burn::tensor::backend::Backend>(
    base: &sd_model::UNet2DConditionModel<B>,
    rows: &[usize],
    target: Tensor<B, 4>,
    noisy: Tensor<B, 4>,
    timesteps: Tensor<B, 1>,
    context: Tensor<B, 3>,
    added: Option<&sd_model::AddedConditions<B>>,
) -> Result<Tensor<B, 4>, TrainError> {
    if rows.is_empty() {
        return Ok(target);
    }
    let rows_i64: Vec<i64> = rows.iter().map(|&i| i as i64).collect();
    let pick = Tensor::<B, 1, burn::tensor::Int>::from_ints(rows_i64.as_slice(), &target.device());
    let added = added.map(|a| sd_model::AddedConditions {
        text_embeds: a.text_embeds.clone().select(0, pick.clone()),
        time_ids: a.time_ids.clone().select(0, pick.clone()),
    });
    let prior = base
        .forward_added(noisy.select(0, pick.clone()), timesteps.select(0, pick.clone()), context.select(0, pick), added)?
        .cast(target.dtype());
    let mut target = target;
    for (j, &i) in rows.iter().enumerate() {
        target = target.slice_assign(i..i + 1, prior.clone().slice(j..j + 1));
    }
    Ok(target)
}

fn huber_thresholds<B: burn::tensor::backend::Backend>(
    schedule: &TrainingSchedule<B>,
    timesteps: Tensor<B, 1, burn::tensor::Int>,
    t: &crate::config::TrainSection,
) -> Option<Tensor<B, 1>> {
    use crate::config::HuberScheduleKind;
    let kind = match t.huber_schedule {
        HuberScheduleKind::Snr => HuberSchedule::Snr,
        HuberScheduleKind::Exponential => HuberSchedule::Exponential,
        HuberScheduleKind::Constant => HuberSchedule::Constant,
    };
    matches!(loss_kind(t.loss_type), LossType::Huber | LossType::SmoothL1).then(|| schedule.huber_thresholds(timesteps, kind, t.huber_c, t.huber_scale))
}

/// Runs `write` on the event file, an I/O error naming the file.
fn tensorboard(events: &mut EventWriter, write: impl FnOnce(&mut EventWriter) -> std::io::Result<()>) -> Result<(), TrainError> {
    write(events).map_err(|source| TrainError::Io { path: events.path().to_path_buf(), source })
}

/// Folder of the TensorBoard event files in `output_dir`.
const LOGS_DIR: &str = "logs";

/// Copies the TensorBoard event files of `from` into a new folder `to`.
fn copy_event_files(from: &Path, to: &Path) -> Result<(), TrainError> {
    std::fs::create_dir_all(to).map_err(io_err(to))?;
    for entry in std::fs::read_dir(from).map_err(io_err(from))? {
        let path = entry.map_err(io_err(from))?.path();
        let name = path.file_name().unwrap_or_default();
        if path.is_file() && name.to_string_lossy().starts_with("events.out.tfevents.") {
            let target = to.join(name);
            std::fs::copy(&path, &target).map_err(io_err(&target))?;
        }
    }
    Ok(())
}

/// The settings a resumed run must share with the state it resumes (as TOML lines).
fn fingerprint(config: &TrainConfig) -> String {
    // The starting file does not matter once the state holds the adapters, and keys added
    // later leave no line at their default, so that states written before they existed
    // still match.
    let later = [
        "network_weights = ",
        "conv_rank = 0",
        "conv_alpha = 1.0",
        "dim_from_weights = false",
        "rank_dropout = 0.0",
        "rank_dropout_scale = false",
        "lycoris_rank_dropout = false",
        "use_scalar = false",
        "module_dropout = 0.0",
        "network_dropout = 0.0",
        "dora = false",
        "algo = \"lora\"",
        "lokr_factor = -1",
        "lokr_decompose_both = false",
        "lokr_full_matrix = false",
        "lokr_unbalanced_factorization = false",
        "use_tucker = false",
        "lora_fa = false",
        "dylora_unit = 0",
        "constraint = 0.0",
        "rescaled = false",
        "train_norm = false",
        "down_lr_weight = \"\"",
        "mid_lr_weight = \"\"",
        "up_lr_weight = \"\"",
        "block_lr_zero_threshold = 0.0",
        "block_dims = \"\"",
        "block_alphas = \"\"",
        "conv_block_dims = \"\"",
        "conv_block_alphas = \"\"",
        // Learning-rate settings, which a resume may change as it may train.learning_rate.
        "loraplus_lr_ratio = ",
        "loraplus_unet_lr_ratio = ",
        "loraplus_text_encoder_lr_ratio = ",
    ];
    let lora = toml::to_string(&config.lora).unwrap_or_default();
    // (IA)³'s input layers matter to it alone (and states from before it never have it).
    let unused = |l: &str| config.lora.algo != lora_core::Algo::Ia3 && l.starts_with("ia3_on_input = ");
    let lora: String = lora.lines().filter(|l| !unused(l) && !later.iter().any(|p| l.starts_with(p) && (p.ends_with(' ') || l == p))).map(|l| format!("{l}\n")).collect();
    // With `dim_from_weights` the file gives the adapters' alphas on a resume too: it must
    // be the file the state was trained from (its tensors' hash, as A1111's LoRA hash).
    let file = if config.lora.dim_from_weights {
        format!("network_weights tensors = {}\n", tensors_hash(Path::new(&config.lora.network_weights)))
    } else {
        String::new()
    };
    // Lion's, Adafactor's and DAdaptAdam's moments are not AdamW's: a state resumes with
    // the optimizer it was trained with (Prodigy's own state says so; AdamW states,
    // written before Lion existed, have no line).
    let optimizer = match config.train.optimizer {
        crate::config::Optimizer::Lion => "train.optimizer = \"lion\"\n",
        crate::config::Optimizer::Adafactor => "train.optimizer = \"adafactor\"\n",
        crate::config::Optimizer::Came => "train.optimizer = \"came\"\n",
        crate::config::Optimizer::DadaptAdam => "train.optimizer = \"dadapt_adam\"\n",
        crate::config::Optimizer::DadaptAdamPreprint => "train.optimizer = \"dadapt_adam_preprint\"\n",
        crate::config::Optimizer::DadaptLion => "train.optimizer = \"dadapt_lion\"\n",
        crate::config::Optimizer::DadaptSgd => "train.optimizer = \"dadapt_sgd\"\n",
        crate::config::Optimizer::DadaptAdagrad => "train.optimizer = \"dadapt_adagrad\"\n",
        crate::config::Optimizer::DadaptAdan => "train.optimizer = \"dadapt_adan\"\n",
        crate::config::Optimizer::AdamwScheduleFree => "train.optimizer = \"adamw_schedule_free\"\n",
        crate::config::Optimizer::RadamScheduleFree => "train.optimizer = \"radam_schedule_free\"\n",
        crate::config::Optimizer::SgdScheduleFree => "train.optimizer = \"sgd_schedule_free\"\n",
        crate::config::Optimizer::ProdigyPlusScheduleFree => "train.optimizer = \"prodigy_plus_schedule_free\"\n",
        crate::config::Optimizer::Ademamix => "train.optimizer = \"ademamix\"\n",
        crate::config::Optimizer::Sgd => "train.optimizer = \"sgd\"\n",
        // AdamW states predate the line (AMSGrad's has one of its own); Prodigy's own
        // state names it.
        crate::config::Optimizer::Adamw if config.train.amsgrad => "train.amsgrad = true\n",
        crate::config::Optimizer::Adamw | crate::config::Optimizer::Prodigy => "",
    };
    // The merged base is part of the model: each file's strength and tensors (states from
    // before the key have no line).
    let base: String = config
        .model
        .base_weights
        .iter()
        .map(|entry| {
            let file = entry.parse::<sd_model::lora::LoraFile>().unwrap_or_else(|_| sd_model::lora::LoraFile::new(entry, 1.0));
            // A text-encoder strength of its own adds to the line (states from before it have none).
            let te = file.text_encoder.map_or_else(String::new, |te| format!(" text_encoder_strength = {te}"));
            format!("model.base_weights tensors = {} strength = {}{te}\n", tensors_hash(&file.path), file.strength)
        })
        .collect();
    // The trained embedding's tokens are in the state (runs without one have no line).
    let e = &config.embedding;
    let embedding = match e.enabled() {
        true => format!("embedding.token = {:?} vectors = {}\n", e.token, e.vectors),
        false => String::new(),
    };
    format!("model.pretrained = {:?}\nmodel.tiny_seed = {}\n{base}{lora}{file}{optimizer}{embedding}", config.model.pretrained, config.model.tiny_seed)
}

/// The SHA-256 of a LoRA file's tensors (A1111's LoRA hash), or `unreadable`, for
/// [`fingerprint`].
fn tensors_hash(path: &Path) -> String {
    let hash = std::fs::read(path).ok().and_then(|bytes| lora_core::tensor_io::addnet_hashes(&bytes).ok());
    hash.map_or_else(|| "unreadable".into(), |(model, _)| model)
}

/// Merges `model.base_weights` (`FILE[:STRENGTH]` each) into the frozen model, as kohya's
/// `base_weights` does: their updates are added to the weights, and no adapter of theirs
/// remains.
fn merge_base_weights<B: burn::tensor::backend::Backend>(c: &mut Components<B>, entries: &[String], device: &B::Device) -> Result<(), TrainError> {
    if entries.is_empty() {
        return Ok(());
    }
    let files = entries
        .iter()
        .map(|e| e.parse::<sd_model::lora::LoraFile>().map_err(|reason| TrainError::Config { origin: "model.base_weights".into(), reason }))
        .collect::<Result<Vec<_>, _>>()?;
    sd_pipeline::attach_lora_files(c, &files, device)?;
    sd_pipeline::merge_adapters(c);
    Ok(())
}

/// Mixed into the run's seed for DyLoRA's draws, apart from the other per-step streams.
const DYLORA_SEED: u64 = 0xd1_1a_0f_5e_ed;

/// Seed of burn's backend RNG (adapter dropout) at optimizer step `step`: reseeding every
/// step makes a resumed run draw what an uninterrupted one would.
fn step_seed(seed: u64, step: usize) -> u64 {
    seed ^ (step as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// f16 dynamic loss scaling (as PyTorch's `GradScaler`): start at 2^16, halve on overflow
/// (the step is skipped), double after this many finite steps in a row.
const LOSS_SCALE_GROWTH_INTERVAL: usize = 2000;


/// Losses of steps `1..=step` from an earlier run's `metrics.jsonl`, which is rewritten to
/// hold exactly those lines, and the last kept line's `elapsed_s` (0 without one).
fn resume_metrics(path: &Path, step: usize) -> Result<(Vec<f32>, f64), TrainError> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut kept = String::new();
    let mut losses = Vec::new();
    let mut elapsed_s = 0.0;
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let s = v["step"].as_u64().unwrap_or(0) as usize;
        if s >= 1 && s <= step && s == losses.len() + 1 {
            losses.push(v["loss"].as_f64().unwrap_or(f64::NAN) as f32);
            elapsed_s = v["elapsed_s"].as_f64().filter(|t| t.is_finite() && *t >= 0.0).unwrap_or(elapsed_s);
            kept.push_str(line);
            kept.push('\n');
        }
    }
    losses.resize(step, f32::NAN);
    std::fs::write(path, kept).map_err(io_err(path))?;
    Ok((losses, elapsed_s))
}

/// Drops the first `earlier` bytes of `metrics.jsonl` at `path` (an earlier run's lines,
/// kept until this run's first save) through `file`, which appends.
fn drop_earlier_metrics(file: &mut std::fs::File, path: &Path, earlier: &mut u64) -> Result<(), TrainError> {
    if *earlier == 0 {
        return Ok(());
    }
    let text = std::fs::read(path).map_err(io_err(path))?;
    let own = text.get(*earlier as usize..).unwrap_or_default();
    file.set_len(0).map_err(io_err(path))?;
    std::io::Write::write_all(file, own).map_err(io_err(path))?;
    *earlier = 0;
    Ok(())
}

/// Fails with a config error naming `origin` and the settings to use instead
/// (`alternatives`) when `device` cannot compute in `dtype` (bf16 on burn's wgpu backend,
/// say), instead of a panic inside the first step.
///
/// ```
/// use burn::backend::Flex;
/// use burn::tensor::FloatDType;
/// // The CPU backend computes in every float type.
/// trainer::train::check_dtype_support::<Flex>(&Default::default(), FloatDType::BF16, "--precision", "f16 or f32").unwrap();
/// ```
pub fn check_dtype_support<B: burn::tensor::backend::Backend>(device: &B::Device, dtype: burn::tensor::FloatDType, origin: &str, alternatives: &str) -> Result<(), TrainError> {
    if B::supports_dtype(device, dtype.into()) {
        return Ok(());
    }
    let name = match dtype {
        burn::tensor::FloatDType::BF16 => "bf16",
        burn::tensor::FloatDType::F16 => "f16",
        burn::tensor::FloatDType::F32 => "f32",
        _ => "this precision",
    };
    Err(TrainError::Config {
        origin: origin.into(),
        reason: format!("this device has no {name} arithmetic ({}); use {alternatives}", B::name(device)),
    })
}

/// The model's scheduler config `model` with what `t` sets: the prediction type
/// (`train.prediction`) and zero terminal SNR (`train.zero_terminal_snr`; unset, the
/// model's own `rescale_betas_zero_snr` stays).
fn training_scheduler_config(model: &sd_sched::SchedulerConfig, t: &crate::config::TrainSection) -> sd_sched::SchedulerConfig {
    let mut config = model.clone();
    match t.prediction {
        Prediction::Auto => {}
        Prediction::Epsilon => config.prediction_type = PredictionType::Epsilon,
        Prediction::VPrediction => config.prediction_type = PredictionType::VPrediction,
    }
    if let Some(on) = t.zero_terminal_snr {
        config.rescale_betas_zero_snr = on;
    }
    config
}

/// The training schedule of `config` on `device`. With zero terminal SNR its SNR-based
/// loss weights (min-SNR-γ, debiased estimation, the v-prediction scalings) read the
/// schedule without the rescale, as sd-scripts' do: its SNR table is taken before
/// `--zero_terminal_snr` rescales the betas, so its last timestep weighs about 0.005 under
/// min-SNR-γ 5 for v-prediction, not 0. Noising and targets use the rescaled schedule.
fn training_schedule<B: burn::tensor::backend::Backend>(config: &sd_sched::SchedulerConfig, device: &B::Device) -> Result<TrainingSchedule<B>, TrainError> {
    let schedule = TrainingSchedule::new(&NoiseSchedule::new(config)?, device);
    if !config.rescale_betas_zero_snr {
        return Ok(schedule);
    }
    let plain = sd_sched::SchedulerConfig { rescale_betas_zero_snr: false, ..config.clone() };
    Ok(schedule.with_snr_from(&NoiseSchedule::new(&plain)?)?)
}

fn run<B: AutodiffBackend>(
    config: &TrainConfig,
    (dataset, validation): TrainingData,
    state: Option<TrainingState>,
    device: &B::Device,
    on_step: &mut dyn FnMut(&StepInfo) -> bool,
) -> Result<TrainReport, TrainError> {
    sd_pipeline::clear_stop();
    config.validate()?;
    if let Some(dtype) = config.train.mixed_precision.base_dtype() {
        check_dtype_support::<B>(device, dtype, "train.mixed_precision", "\"fp16\" (f16) or \"no\" (f32)")?;
    }
    // Before anything loads or is written: what SDXL cannot train here yet, and where a
    // run without a state starts (a resumed one starts where its state is).
    let sdxl = sd_pipeline::is_sdxl(&config.model.pretrained)?;
    if sdxl {
        check_sdxl_settings(config)?;
    }
    let resumed = state.is_some();
    let starting_point = match resumed {
        true => Progress { step: 0, epoch: 0, batch_in_epoch: 0 },
        false => initial_progress(config, &dataset)?,
    };
    let start = Instant::now();
    let out = &config.output.output_dir;
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let t = &config.train;
    let base_dtype = t.mixed_precision.base_dtype();

    // Frozen parts run on the inner (non-autodiff) backend; only the UNet (and the text
    // encoder when it has adapters) is differentiated. The VAE stays in f32.
    let mut frozen: Components<B::InnerBackend> = load_components(&config.model.pretrained, config.model.tiny_seed, device)?;
    if !config.model.vae.is_empty() {
        sd_pipeline::load_separate_vae(&mut frozen, Path::new(&config.model.vae))?;
    }
    check_sample_samplers::<B::InnerBackend>(config, &frozen.scheduler)?;
    let size_step = frozen.vae.downsample_factor() * frozen.unet.size_multiple();
    std::iter::once(&dataset).chain(validation.as_ref()).try_for_each(|d| check_bucket_sides(d, config, size_step))?;
    // Merged in f32, before the weights are rounded to the training precision.
    merge_base_weights(&mut frozen, &config.model.base_weights, device)?;
    if let Some(dtype) = base_dtype {
        frozen = to_precision(frozen, dtype);
    }
    // Everything not an adapter is frozen: no gradients, no optimizer updates.
    let mut unet = <sd_model::UNet2DConditionModel<B> as AutodiffModule<B>>::from_inner(frozen.unet.clone()).no_grad();
    B::seed(device, t.seed);
    let l = &config.lora;
    // Text-encoder adapters, if any: the encoders (SDXL's two) then run on the autodiff
    // backend too.
    let mut encoders: Vec<sd_model::ClipTextModel<B>> = std::iter::once(&frozen.text_encoder)
        .chain(frozen.text_encoder_2.as_ref())
        .map(|te| <sd_model::ClipTextModel<B> as AutodiffModule<B>>::from_inner(te.clone()).no_grad())
        .collect();
    let train_te = if l.dim_from_weights {
        // The file gives the structure, on a resume too (the state then gives the values).
        adapters_from_weights(l, &mut unet, &mut encoders, device)?
    } else {
        let train_te = attach_configured_adapters(l, (config.embedding.enabled(), t.seed), &mut unet, &mut encoders, device)?;
        if !l.network_weights.is_empty() && state.is_none() {
            // A resumed run's state holds the adapters: the file only starts a new run.
            load_network_weights(Path::new(&l.network_weights), &mut unet, &mut encoders, device)?;
        }
        train_te
    };
    // The embedding's rows train in the text encoders: they then run with their graph.
    let embedding = match config.embedding.enabled() {
        // A resumed run's state holds the vectors: no file starts them.
        true => {
            let continued = if state.is_none() { config.lora.network_weights.as_str() } else { "" };
            Some(TrainedEmbedding::attach(&config.embedding, (continued, t.seed), &mut frozen, &mut encoders, device)?)
        }
        false => None,
    };
    if let Some(e) = embedding.as_ref().filter(|e| !e.uses_templates()) {
        let captions: Vec<String> = (0..dataset.images().len()).map(|i| dataset.fixed_caption(i)).collect();
        if sd_pipeline::texts_with_word(&e.word, captions.iter().map(String::as_str)) == 0 {
            return Err(TrainError::Config {
                origin: "embedding.token".into(),
                reason: format!("no caption holds the word `{}`: write it into the captions where the subject or style is, or set embedding.template = \"object\" or \"style\"", e.word),
            });
        }
    }
    let te_adapters = train_te;
    let train_te = train_te || embedding.is_some();

    let schedule_cfg = training_scheduler_config(&frozen.scheduler, t);
    if t.v_pred_like_loss > 0.0 && schedule_cfg.prediction_type == PredictionType::VPrediction {
        // As kohya refuses it: the added term is what a v-prediction loss already is.
        return Err(TrainError::Config {
            origin: "train.v_pred_like_loss".into(),
            reason: "is for ε-prediction models, and this one predicts v".into(),
        });
    }
    if t.scale_v_pred_loss_like_noise_pred && schedule_cfg.prediction_type != PredictionType::VPrediction {
        // As kohya refuses it: the weights turn a v-prediction loss into an ε one.
        return Err(TrainError::Config {
            origin: "train.scale_v_pred_loss_like_noise_pred".into(),
            reason: format!("is for v-prediction models, and this one predicts {:?} (set train.prediction = \"v_prediction\" if it is a v-prediction model)", schedule_cfg.prediction_type),
        });
    }
    let schedule = training_schedule::<B>(&schedule_cfg, device)?;
    let mut validator = match validation {
        Some(dataset) => Some(Validator {
            schedule: training_schedule(&schedule_cfg, device)?,
            cache: EncodeCache::for_dataset(&dataset),
            dataset,
            log: ValidationLog::open(&out.join("validation.jsonl"), state.as_ref().map(|s| s.info.step))?,
        }),
        None => None,
    };
    let mut timesteps = TimestepSampler::new(t.min_timestep, t.max_timestep, schedule.num_train_timesteps(), t.seed)?;
    let mut noise = SeededNoise::new(t.seed ^ 0x5eed);
    let te_base_lr = if t.text_encoder_lr > 0.0 { t.text_encoder_lr } else { t.learning_rate };
    // The embedding's own learning rate, as a factor on the text encoders'.
    let embedding_lr_factor = match config.embedding.learning_rate {
        0.0 => 1.0,
        own => own / te_base_lr,
    };

    let metrics_path = out.join("metrics.jsonl");
    let mut progress = starting_point;
    let guard_settings = GuardSettings {
        max_grad_norm: t.max_grad_norm,
        loss_scale: (t.mixed_precision == MixedPrecision::Fp16).then_some(DynamicLossScale {
            initial: 65536.0,
            growth_interval: LOSS_SCALE_GROWTH_INTERVAL,
        }),
    };
    let mut guard = StepGuard::<B::InnerBackend>::new(guard_settings, device);
    // Grown as steps run: reserving `max_train_steps` up front aborts on a huge count.
    let mut losses = Vec::new();
    let mut elapsed_before = 0.0;
    if let Some(state) = &state {
        let file = state.dir.join("adapters.safetensors");
        let in_file = in_state_file(&file);
        restore_adapter_params(&mut unet, "unet", &state.adapters, device).map_err(&in_file)?;
        for (i, te) in encoders.iter_mut().enumerate() {
            restore_adapter_params(te, encoder_key(i), &state.adapters, device).map_err(&in_file)?;
            restore_trained_tokens(te, i, &state.adapters, device).map_err(&in_file)?;
        }
    }
    if config.lora.lora_fa {
        freeze_downs(&mut unet, &mut encoders)?;
    }
    // All adapter tensors of a model in one AdamW update (lora_core::optim), starting from
    // the adapters' current (restored) values.
    // kohya's block-wise learning rates and LoRA+: a factor per adapter tensor.
    let (unet_plus, te_plus) = config.lora.loraplus_ratios();
    let plan = config.lora.block_plan(sd_model::blocks::BlockLayout::of(&unet))?;
    let unet_factors = lr_factors(&mut unet, |path| plan.as_ref().map_or(1.0, |p| p.lr_factor(path)), unet_plus);
    // sd-scripts' parameter groups: per block with block learning rates, LoRA+'s apart.
    let l = &config.lora;
    let plus_on = |own: f64| own > 0.0 || l.loraplus_lr_ratio > 0.0;
    let block_lr = [&l.down_lr_weight, &l.mid_lr_weight, &l.up_lr_weight].iter().any(|w| !w.is_empty());
    let layout = sd_model::blocks::BlockLayout::of(&unet);
    let unet_groups = param_groups(&mut unet, |path| block_lr.then(|| layout.block(path)), plus_on(l.loraplus_unet_lr_ratio));
    let mut optim = model_optimizer(&mut unet, &unet_factors, &unet_groups, config, device)?;
    let mut te_optims: Vec<FlatAdamW<B>> = encoders
        .iter_mut()
        .map(|te| {
            let mut factors = lr_factors(te, |_| 1.0, te_plus);
            if let Some(rows) = &te.trained_tokens {
                factors.insert(rows.id, embedding_lr_factor as f32);
            }
            let groups = param_groups(te, |_| None, plus_on(l.loraplus_text_encoder_lr_ratio));
            model_optimizer(te, &factors, &groups, config, device)
        })
        .collect::<Result<_, _>>()?;
    // sd-scripts puts all text encoders' adapters in one group (and LoRA+'s `up` weights in
    // another): SDXL's two encoders pool their groups of the same number.
    let te_groups: Vec<usize> = te_optims.iter().map(|o| if o.is_empty() { 0 } else { o.prodigy_plus_d().map_or(0, |d| d.dims()[0]) }).collect();
    let te_pools: Vec<Vec<(usize, usize)>> = (0..te_groups.iter().copied().max().unwrap_or(0))
        .map(|g| te_groups.iter().enumerate().filter(|(_, n)| **n > g).map(|(i, _)| (i, g)).collect::<Vec<_>>())
        .filter(|pool| pool.len() > 1)
        .collect();
    if let Some(state) = state {
        let times = &state.info.optimizer_time;
        let file = state.dir.join("optimizer.safetensors");
        let in_file = in_state_file(&file);
        import_moments(&mut optim, &adapter_params(&mut unet, "unet"), &state.moments, times, device).map_err(&in_file)?;
        let state_dir = &state.dir;
        import_optimizer_state(&mut optim, "unet", &state.moments, state_dir, device)?;
        for (i, (o, te)) in te_optims.iter_mut().zip(encoders.iter_mut()).enumerate() {
            import_moments(o, &encoder_params(te, i), &state.moments, times, device).map_err(&in_file)?;
            import_optimizer_state(o, encoder_key(i), &state.moments, state_dir, device)?;
        }
        let origin = state.dir.join("state.json");
        timesteps.set_rng_state(&state.info.timestep_rng.to_state(&origin)?);
        noise = SeededNoise::from_state(&state.info.noise_rng.to_state(&origin)?);
        progress = Progress {
            step: state.info.step,
            epoch: state.info.epoch,
            batch_in_epoch: state.info.batch_in_epoch,
        };
        guard.set_state(state.info.loss_scale, state.info.good_steps);
        (losses, elapsed_before) = resume_metrics(&metrics_path, progress.step)?;
    }
    unet = optim.to_working(unet);
    encoders = encoders.into_iter().zip(&te_optims).map(|(te, o)| o.to_working(te)).collect();
    // Written once every start-up check has passed: a run that failed to start leaves no
    // `config.toml` behind, which would count as an earlier run for the corrected retry.
    // An earlier `config.toml` (a resumed run's, or the run `--overwrite` replaces)
    // describes the LoRA and state beside it: it is replaced with this run's first save,
    // so that a run that fails before one (a diverged resume) leaves the settings that
    // belong to the files there.
    let config_path = out.join("config.toml");
    let config_pending = config_path.exists().then(|| config_path.clone());
    if config_pending.is_none() {
        std::fs::write(&config_path, config.to_toml()).map_err(io_err(&config_path))?;
    }
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .truncate(false)
        .open(&metrics_path)
        .map_err(io_err(&metrics_path))?;
    // A new run over an earlier one's (`--overwrite`) appends after the earlier run's lines
    // and drops them with its first save, as `config.toml` is replaced then: a run that
    // fails before that leaves the earlier run's metrics beside its LoRA and state.
    let mut earlier_metrics = match losses.is_empty() {
        true => metrics.metadata().map_err(io_err(&metrics_path))?.len(),
        false => 0,
    };
    let start_wall = crate::tensorboard::wall_time_now();
    let mut events = match config.output.tensorboard {
        true => {
            let logs = out.join(LOGS_DIR);
            let mut events = EventWriter::create(&logs, "sd-lora").map_err(io_err(&logs))?;
            // TensorBoard drops what earlier files in the folder logged from this run's
            // first step on: an earlier run's curves (a new run), or the steps an
            // interrupted run logged after the state it saved last (a resumed one).
            tensorboard(&mut events, |e| e.restart(progress.step as u64 + 1, start_wall))?;
            Some(events)
        }
        false => None,
    };
    let unet_params = adapter_params(&mut unet, "unet");
    let te_param_counts: Vec<usize> = encoders.iter_mut().enumerate().map(|(i, te)| encoder_params(te, i).len()).collect();
    let unet_norm_pairs = lora_core::optim::norm_pairs(&mut unet);
    // Without text-encoder training, max-norm leaves the (untrained) encoders alone.
    let te_norm_pairs: Vec<Vec<lora_core::optim::NormPair>> = encoders.iter_mut().map(|te| if train_te { lora_core::optim::norm_pairs(te) } else { Vec::new() }).collect();

    let mut cache = EncodeCache::for_dataset(&dataset);
    let mut plans = dataset.plan_epoch(progress.epoch);
    // Samples at the training resolution (kohya samples at the prompt's --w/--h, else its
    // own default), on the model's grid of sides.
    let sample_size = sample_size(config, size_step);
    let mut interrupted = false;
    let base = crate::metadata::BaseModel {
        version: &frozen.base_version,
        v_prediction: schedule_cfg.prediction_type == PredictionType::VPrediction,
    };
    // The metadata records the schedule that trained (the model's own setting where the
    // config leaves zero terminal SNR unset).
    let mut recorded = config.clone();
    recorded.train.zero_terminal_snr = Some(schedule_cfg.rescale_betas_zero_snr);
    let mut saver = Saver {
        config,
        metadata: crate::metadata::RunMetadata::new(&recorded, &dataset, base, std::time::SystemTime::now()),
        batches_in_epoch: plans.len(),
        embedding: embedding.clone(),
        embedding_file: false,
        data: data_fingerprint(config, &dataset),
        config_pending,
    };
    // Steps queued but not yet read back.
    let mut pending: Vec<PendingStep<B::InnerBackend>> = Vec::new();
    // Clipping, skipping and the loss scale are decided on the device (`StepGuard`), so
    // the host queues step after step; each read of their numbers drains the device's
    // queue, so it happens every `log_interval_s` (and before samples, saves and the end).
    // An interval past what a Duration holds (validated finite and >= 0) reads only when
    // it must (samples, saves, the end).
    let read_interval = std::time::Duration::try_from_secs_f64(config.output.log_interval_s).unwrap_or(std::time::Duration::MAX);
    let mut last_read = Instant::now();
    let first_step = progress.step;
    let mut epochs_completed = completed_epochs(&progress, plans.len());
    // sd-scripts' count of the run's epochs: optimizer steps over steps per epoch.
    let every_epochs = config.output.epoch_save_interval(t.max_train_steps.div_ceil(steps_per_epoch(t, plans.len())));
    if config.output.sample_at_first && !resumed && !config.output.sample_prompts.is_empty() {
        // kohya's `sample_at_first`: what the prompts give before any training (the base
        // model, or the starting `network_weights`), to compare the later grids with.
        match sample_grid_now(&unet, &encoders, &frozen, (config, embedding.as_ref()), sample_size, &out.join(format!("samples-step{first_step:06}.png")), device) {
            Err(TrainError::Interrupted) => interrupted = true,
            other => other?,
        }
    }
    // The embedding trains for its share of the steps; then its rows take no gradients, so
    // its optimizer leaves them as they are (set again each step: an update of the other
    // tensors hands every trained tensor back with gradients on).
    let embedding_steps = config.embedding.train_steps(t.max_train_steps);
    let dylora = config.lora.dylora_unit > 0;
    for step in first_step..t.max_train_steps {
        if interrupted {
            break;
        }
        B::seed(device, step_seed(t.seed, step));
        let embedding_trains = embedding.is_some() && step < embedding_steps;
        // Whether the text encoders take gradients this step (they run with their graph
        // either way, as they hold the embedding's rows).
        let te_grads = te_adapters || embedding_trains;
        if embedding.is_some() && !embedding_trains {
            for te in encoders.iter_mut() {
                te.trained_tokens = te.trained_tokens.take().map(|rows| rows.set_require_grad(false));
            }
        }
        let lr = learning_rate(t, step);
        let mut accumulator = GradientsAccumulator::<sd_model::UNet2DConditionModel<B>>::new();
        let mut te_accumulators: Vec<_> = encoders.iter().map(|_| GradientsAccumulator::<sd_model::ClipTextModel<B>>::new()).collect();
        let mut step_loss = Tensor::<B::InnerBackend, 1>::zeros([1], device);
        // DyLoRA: the rank chunks this step trains, drawn per pass (micro-batch).
        let mut trained_chunks = lora_core::dylora::TrainedChunks::default();
        // Micro-batches this step takes: `gradient_accumulation_steps`, fewer where the epoch
        // ends first (sd-scripts' accelerate steps at an epoch's end with what it has,
        // the gradients still divided by the full count).
        let mut used = 0usize;
        for micro in 0..t.gradient_accumulation_steps {
            if progress.batch_in_epoch >= plans.len() && micro > 0 {
                break;
            }
            used += 1;
            if dylora {
                let seed = step_seed(t.seed ^ DYLORA_SEED, step)
                    ^ (micro as u64).wrapping_mul(0x2545_f491_4f6c_dd1d);
                sites::draw_dylora_chunks(&mut unet, seed, &mut trained_chunks);
                if te_adapters {
                    for (i, te) in encoders.iter_mut().enumerate() {
                        sites::draw_dylora_chunks(te, seed ^ (i as u64 + 1), &mut trained_chunks);
                    }
                }
            }
            if progress.batch_in_epoch >= plans.len() {
                progress.epoch += 1;
                progress.batch_in_epoch = 0;
                plans = dataset.plan_epoch(progress.epoch);
                if plans.is_empty() {
                    return Err(TrainError::Config {
                        origin: "data".into(),
                        reason: "the dataset plans no batches".into(),
                    });
                }
            }
            let plan = &plans[progress.batch_in_epoch];
            progress.batch_in_epoch += 1;
            let EncodedBatch { posterior, context, loss_weights, masks } = cache.batch(&dataset, &frozen, plan, config, !train_te, device)?;
            let masks = masks.map(Tensor::<B, 4>::from_inner);
            let eps = noise.sample(posterior.mean.dims(), device)?;
            let latents = Tensor::<B, 4>::from_inner(frozen.vae.scale_latents(posterior.sample(eps)?));
            let (context, added) = match context {
                Some(c) => {
                    let added = c.pooled.map(|p| sd_model::AddedConditions {
                        text_embeds: Tensor::<B, 2>::from_inner(p),
                        time_ids: time_ids(&dataset, plan, device),
                    });
                    (Tensor::<B, 3>::from_inner(c.context), added)
                }
                None => {
                    // Text encoders in training: encoded with their graph.
                    let captions = training_captions(plan, embedding.as_ref(), step_seed(t.seed, step) ^ progress.batch_in_epoch as u64);
                    let c = encode_captions(text_encoders_of(&encoders, &frozen), &captions, config, device)?;
                    let added = c.pooled.map(|p| sd_model::AddedConditions { text_embeds: p, time_ids: time_ids(&dataset, plan, device) });
                    (c.context, added)
                }
            };

            let n = latents.dims()[0];
            let ts = timesteps.sample::<B>(n, device);
            let eps: Tensor<B, 4> = noise.sample(latents.dims(), device)?;
            // kohya's `*_random_strength`: a strength drawn uniformly in [0, max) per micro-batch,
            // from the run's noise stream (drawn only when asked for: other runs' streams stay).
            let mut strength = |max: f64, random: bool| if random && max != 0.0 { max * noise.uniform() } else { max };
            let offset = strength(t.noise_offset, t.noise_offset_random_strength);
            let ip_gamma = strength(t.ip_noise_gamma, t.ip_noise_gamma_random_strength);
            let eps = match t.adaptive_noise_scale {
                0.0 => offset_noise(eps, offset, &mut noise)?,
                scale => adaptive_offset_noise(eps, latents.clone(), offset, scale, &mut noise)?,
            };
            let eps = match t.multires_noise_iterations {
                0 => eps,
                levels => {
                    let ratios = pyramid_ratios(noise.rng(), levels);
                    pyramid_noise(eps, t.multires_noise_discount, &ratios, &mut noise)?
                }
            };
            // Input perturbation: the model sees more noise than its target holds.
            let input_noise = match ip_gamma {
                0.0 => eps.clone(),
                gamma => eps.clone() + NoiseSource::<B>::sample(&mut noise, latents.dims(), device)?.mul_scalar(gamma as f32),
            };
            let noisy = schedule.add_noise(latents.clone(), input_noise, ts.clone());
            let target = schedule.target(latents, eps, ts.clone());
            let target = match preserved_rows(plan) {
                rows if rows.is_empty() => target,
                rows => Tensor::from_inner(preserved_targets(
                    &without_adapters(unet.valid()),
                    &rows,
                    target.inner(),
                    noisy.clone().inner(),
                    ts.clone().float().inner(),
                    context.clone().inner(),
                    added.as_ref().map(|a| sd_model::AddedConditions { text_embeds: a.text_embeds.clone().inner(), time_ids: a.time_ids.clone().inner() }).as_ref(),
                )?),
            };
            let mut weights = Tensor::<B, 1>::from_floats(loss_weights.as_slice(), device);
            if t.min_snr_gamma > 0.0 {
                weights = weights * schedule.min_snr_weights(ts.clone(), t.min_snr_gamma)?;
            }
            if t.debiased_estimation_loss {
                weights = weights * schedule.debiased_weights(ts.clone());
            }
            if t.scale_v_pred_loss_like_noise_pred {
                weights = weights * schedule.v_pred_noise_like_weights(ts.clone());
            }
            if t.v_pred_like_loss > 0.0 {
                weights = weights * schedule.v_pred_like_weights(ts.clone(), t.v_pred_like_loss);
            }
            // The loss to backpropagate: f16 scales it so that small gradients do not
            // underflow (unscaled below).
            let thresholds = huber_thresholds(&schedule, ts.clone(), t);
            let loss_of = |pred: Tensor<B, 4>| {
                let elementwise = match loss_kind(t.loss_type) {
                    LossType::L2 => MseLoss::new().forward_no_reduction(pred, target),
                    kind => elementwise_loss(pred, target, kind, thresholds)
                        .unwrap_or_else(|e| unreachable!("the thresholds are made for this batch: {e}")),
                };
                // kohya's masked loss: each latent element weighed by its mask, still
                // averaged over all of them (a half-masked image trains half as much).
                let elementwise = match masks {
                    Some(m) => {
                        let dtype = elementwise.dtype();
                        elementwise * m.cast(dtype)
                    }
                    None => elementwise,
                };
                let per_sample = elementwise
                    .reshape([n as i32, -1])
                    .mean_dim(1)
                    .reshape([n]);
                guard.scale_loss((per_sample * weights).mean() / t.gradient_accumulation_steps as f32)
            };
            if config.lora.rank_dropout > 0.0 {
                // The UNet's transformer layers see `[n · tokens, channels]` rows: rank
                // dropout's masks are per sample.
                unet.visit_lora_sites(&mut |_, mut site| site.set_samples(n));
            }
            if t.gradient_checkpointing {
                let pooled = added.as_ref().map(|a| a.text_embeds.clone());
                let options = CheckpointOptions { context_grad: te_grads, added, added_grad: te_grads && pooled.is_some(), ..Default::default() };
                let step = unet.forward_backward_checkpointed(noisy, ts.float(), context.clone(), options, loss_of)?;
                step_loss = step_loss + guard.unscale(step.loss);
                if te_grads {
                    // The text encoders' backward pass, from the gradients their outputs
                    // got: the states and (SDXL) the pooled embedding.
                    let mut surrogate = step.context_grad.map(|grad| (context * Tensor::from_inner(grad)).sum());
                    if let (Some(p), Some(grad)) = (pooled, step.text_embeds_grad) {
                        let term = (p * Tensor::from_inner(grad)).sum();
                        surrogate = Some(match surrogate {
                            Some(s) => s + term,
                            None => term,
                        });
                    }
                    if let Some(surrogate) = surrogate {
                        let mut grads = surrogate.backward();
                        for (acc, te) in te_accumulators.iter_mut().zip(&encoders) {
                            acc.accumulate(te, GradientsParams::from_module(&mut grads, te));
                        }
                    }
                }
                accumulator.accumulate(&unet, step.grads);
            } else {
                let loss = loss_of(unet.forward_added(noisy, ts.float(), context, added)?);
                step_loss = step_loss + guard.unscale(loss.clone().inner());
                let mut grads = loss.backward();
                if te_grads {
                    for (acc, te) in te_accumulators.iter_mut().zip(&encoders) {
                        acc.accumulate(te, GradientsParams::from_module(&mut grads, te));
                    }
                }
                accumulator.accumulate(&unet, GradientsParams::from_module(&mut grads, &unet));
            }
        }
        let (grads, te_grads) = (accumulator.grads(), te_accumulators.iter_mut().map(GradientsAccumulator::grads).collect::<Vec<_>>());
        // Only adapters may train; anything else with a gradient would be updated by AdamW
        // but never saved.
        let te_overflow = te_grads.iter().zip(&te_param_counts).any(|(g, n)| g.len() > *n);
        if grads.len() > unet_params.len() || te_overflow {
            return Err(TrainError::Config {
                origin: "model".into(),
                reason: format!(
                    "{} UNet and {:?} text-encoder tensors have gradients but only {} and {:?} are adapter weights",
                    grads.len(),
                    te_grads.iter().map(GradientsParams::len).collect::<Vec<_>>(),
                    unet_params.len(),
                    te_param_counts
                ),
            });
        }
        let grads = optim.restrict_to_chunks(optim.gather_grads(&unet, grads), &trained_chunks);
        let te_grads: Vec<_> = te_grads
            .into_iter()
            .zip(te_optims.iter().zip(&encoders))
            .map(|(g, (o, te))| o.restrict_to_chunks(o.gather_grads(te, g), &trained_chunks))
            .collect();
        // Clipping, the non-finite skip and the loss scale, decided on the device: the
        // next step is queued without waiting for this one.
        let sq_norm = te_grads.iter().fold(grads.sq_norm(), |sum, g| sum + g.sq_norm());
        // The loss recorded is the mean over the micro-batches used (each term is divided
        // by the full count, as the gradients are).
        if used < t.gradient_accumulation_steps {
            step_loss = step_loss.mul_scalar(t.gradient_accumulation_steps as f32 / used as f32);
        }
        let check = guard.check(step_loss, sq_norm);
        unet = optim.step_if(lr, unet, check.scale(grads), check.apply.clone());
        // Adafactor's relative step replaces every learning rate (as in sd-scripts).
        let te_lr = train_te.then(|| group_learning_rate(t, step, te_base_lr));
        if let Some(te_lr) = te_lr {
            let steps = encoders.into_iter().zip(te_optims.iter_mut()).zip(te_grads);
            encoders = steps.map(|((te, o), g)| o.step_if(te_lr, te, check.scale(g), check.apply.clone())).collect();
        }
        if t.optimizer == crate::config::Optimizer::ProdigyPlusScheduleFree && te_lr.is_some() {
            // The text encoders' and the UNet's groups step as sd-scripts' one optimizer
            // (its order: the text encoders' groups first).
            let mut all: Vec<&mut FlatAdamW<B>> = te_optims.iter_mut().chain(std::iter::once(&mut optim)).collect();
            lora_core::optim::share_prodigy_plus(&mut all, &te_pools).map_err(|e| TrainError::Config { origin: "train.optimizer".into(), reason: e.to_string() })?;
        }
        if dylora {
            // Between steps (validation, samples, saving) the adapters are the LoRAs they
            // save as.
            sites::clear_dylora_chunks(&mut unet);
            encoders.iter_mut().for_each(|te| sites::clear_dylora_chunks(te));
        }
        progress.step = step + 1;
        // Prodigy's, DAdaptAdam's or Prodigy + schedule-free's step sizes after the step
        // (its estimate times the learning rate).
        let estimate = |o: &FlatAdamW<B>| o.prodigy_d().or_else(|| o.dadapt_d()).or_else(|| o.prodigy_plus_step_d());
        let d_lr = estimate(&optim).map(|d| d.mul_scalar(lr));
        let te_d_lr: Vec<_> = te_lr.map_or(Vec::new(), |te_lr| te_optims.iter().filter_map(|o| estimate(o).map(|d| d.mul_scalar(te_lr))).collect());
        let mut max_norm = None;
        if t.scale_weight_norms > 0.0 {
            let (u, tes, stats) = apply_max_norm(t.scale_weight_norms as f32, (unet, &mut optim, &unet_norm_pairs), encoders, &mut te_optims, &te_norm_pairs)?;
            (unet, encoders, max_norm) = (u, tes, Some(stats));
        }
        let emb_lr = te_lr.filter(|_| embedding_trains).map(|lr| lr * embedding_lr_factor);
        pending.push(PendingStep { step: step + 1, epoch: progress.epoch, lr, te_lr, emb_lr, d_lr, te_d_lr, max_norm, record: check.record });

        let last = progress.step == t.max_train_steps;
        // An epoch is complete once its last batch is used.
        let completed = completed_epochs(&progress, plans.len());
        let epoch_ended = completed > epochs_completed;
        epochs_completed = completed;
        // As kohya: sampling by epochs, when set, replaces sampling by steps.
        let sample = match (config.output.sample_every_n_epochs, config.output.sample_every_n_steps) {
            (0, 0) => None,
            (0, every) => progress.step.is_multiple_of(every).then(|| format!("samples-step{:06}.png", progress.step)),
            (every, _) => (epoch_ended && (completed as usize).is_multiple_of(every)).then(|| format!("samples-epoch{completed:04}.png")),
        }
        .filter(|_| !last && !config.output.sample_prompts.is_empty());
        let mut name = None;
        if config.output.save_every_n_steps > 0 && progress.step.is_multiple_of(config.output.save_every_n_steps) {
            name = Some(step_save_name(&config.output.output_name, progress.step));
        }
        if every_epochs > 0 && epoch_ended && (completed as usize).is_multiple_of(every_epochs) {
            name = Some(epoch_save_name(&config.output.output_name, completed as usize));
        }
        let name = name.filter(|_| !last);
        // Read before anything is written (a non-finite step may have to stop the run).
        if last || sample.is_some() || name.is_some() || last_read.elapsed() >= read_interval {
            let read = ReadBack {
                t,
                start,
                start_wall,
                elapsed_before,
                metrics: &mut metrics,
                metrics_path: &metrics_path,
                events: events.as_mut(),
                fp16: t.mixed_precision == MixedPrecision::Fp16,
                losses: &mut losses,
                unet_trains: !optim.is_empty(),
            };
            let go_on = read.steps(std::mem::take(&mut pending), on_step)?;
            last_read = Instant::now();
            // A GPU-side ordering wait that gave up may have let a library call read
            // unfinished inputs: stop before anything is written from such a state.
            let timeouts = lora_core::kernels::vendor_stats().ordering_timeouts;
            if timeouts > 0 {
                return Err(TrainError::OrderingTimeout { step: progress.step, timeouts });
            }
            if !go_on && !last {
                interrupted = true;
                break;
            }
        }
        if let Some(file) = &sample {
            let (unet, encoders) = eval_models(&unet, &encoders, &optim, &te_optims);
            // A stop asked for while the samples are drawn ends the run without them.
            match sample_grid_now(&unet, &encoders, &frozen, (config, embedding.as_ref()), sample_size, &out.join(file), device) {
                Err(TrainError::Interrupted) => {
                    interrupted = true;
                    break;
                }
                other => other?,
            }
        }
        let (every, every_epochs_v) = (config.output.validate_every_n_steps, config.output.validate_every_n_epochs);
        let by_steps = every > 0 && progress.step.is_multiple_of(every);
        let by_epochs = every_epochs_v > 0 && epoch_ended && (completed as usize).is_multiple_of(every_epochs_v);
        if let Some(v) = validator.as_mut().filter(|_| last || by_steps || by_epochs) {
            let (unet, encoders) = eval_models(&unet, &encoders, &optim, &te_optims);
            let loss = v.loss(&unet, train_te.then_some(&encoders[..]), &frozen, (config, embedding.as_ref()), device)?;
            v.log.record(progress.step, loss)?;
            if let Some(events) = events.as_mut() {
                let wall_time = start_wall + start.elapsed().as_secs_f64();
                tensorboard(events, |e| e.scalars(progress.step as u64, wall_time, &[("loss/validation", loss)]).and_then(|()| e.flush()))?;
            }
        }
        if let Some(name) = name {
            saver.save_all(&unet, &encoders, (&optim, &te_optims), &progress, &out.join(format!("{name}.safetensors")), (&guard, &timesteps, &noise))?;
            drop_earlier_metrics(&mut metrics, &metrics_path, &mut earlier_metrics)?;
            prune_saves(&config.output, progress.step)?;
        }
    }

    let lora_path = out.join(format!("{}.safetensors", config.output.output_name));
    saver.save_all(&unet, &encoders, (&optim, &te_optims), &progress, &lora_path, (&guard, &timesteps, &noise))?;
    drop_earlier_metrics(&mut metrics, &metrics_path, &mut earlier_metrics)?;

    let grid_path = if interrupted || config.output.sample_prompts.is_empty() {
        None
    } else {
        let (unet, encoders) = eval_models(&unet, &encoders, &optim, &te_optims);
        let mut with_lora = with_trained(&unet, &encoders, frozen);
        merge_adapters(&mut with_lora);
        let path = out.join("samples.png");
        match generate_grid(&with_lora, config, embedding.as_ref(), sample_size, device)? {
            Some(grid) => save_png(&grid, &path).map(|()| Some(path))?,
            None => None,
        }
    };

    let curve_path = out.join("loss.png");
    save_png(&plot::loss_curve(&losses, 640, 360), &curve_path)?;
    Ok(TrainReport {
        lora: lora_path,
        embedding_file: saver.embedding_file,
        sample_grid: grid_path,
        metrics: metrics_path,
        tensorboard: events.map(|e| e.path().to_path_buf()),
        validation: validator.map(|v| v.log.entries).unwrap_or_default(),
        loss_curve: curve_path,
        config: config_path,
        losses,
        seconds: start.elapsed().as_secs_f64(),
        interrupted,
    })
}

/// A finite `f32` as JSON, `null` otherwise (JSON has no NaN).
fn json_f32(v: f32) -> String {
    if v.is_finite() {
        v.to_string()
    } else {
        "null".into()
    }
}

/// Epochs whose every batch has been used.
fn completed_epochs(progress: &Progress, batches_in_epoch: usize) -> u64 {
    progress.epoch + u64::from(progress.batch_in_epoch >= batches_in_epoch)
}

/// Counters of a run that the training state records (with the [`StepGuard`]'s loss
/// scale), and where a run starts ([`initial_progress`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Optimizer steps done.
    pub step: usize,
    /// The epoch the next micro-batch comes from (from 0): its batches are
    /// [`Dataset::plan_epoch`]`(epoch)`.
    pub epoch: u64,
    /// Batches of that epoch already used (its length once all are).
    pub batch_in_epoch: usize,
}

/// Where a run without a training state starts: kohya's `initial_step` /
/// `initial_epoch` (`train.initial_step`, else `train.initial_epoch`; step 0 without
/// either). The run then goes on as if that many steps had run: the step count (and so
/// saves', samples' and `metrics.jsonl`'s step and epoch numbers), the learning-rate
/// schedule and the place in the data (the batches the skipped steps would have used, in
/// the order [`Dataset::plan_epoch`] gives; no image is read for them) continue from
/// there. The adapters are fresh or `lora.network_weights`', the optimizer's moments zero.
///
/// `initial_epoch = E` starts at epoch `E`'s first batch, after `E − 1` epochs of
/// `⌈batches / gradient_accumulation_steps⌉` steps each (kohya's count: an epoch's last
/// step takes the batches that are left); `initial_step = N` at the batch after those the
/// steps before it use (whole epochs of that many steps, then
/// `gradient_accumulation_steps` batches a step). Unlike sd-scripts, which restarts its
/// learning-rate scheduler (and without `skip_until_initial_step` counts steps from 0 and
/// starts at the epoch's first batch), the schedule and the step count go on, as they
/// would in the run continued.
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let mut config = trainer::config::TrainConfig::default();
/// config.train.gradient_accumulation_steps = 2;
/// let dataset = trainer::train::open_dataset(&config)?; // the built-in demo images
/// let batches = dataset.batches_per_epoch();
/// config.train.initial_epoch = 3;
/// let start = trainer::train::initial_progress(&config, &dataset)?;
/// assert_eq!((start.step, start.epoch, start.batch_in_epoch), (2 * batches.div_ceil(2), 2, 0));
/// # Ok(())
/// # }
/// ```
///
/// # Errors
/// [`TrainError::Config`] naming the key when the start is not below
/// `train.max_train_steps` (with `max_train_epochs`, the steps it gives), or when the data
/// set plans no batches.
pub fn initial_progress(config: &TrainConfig, dataset: &Dataset) -> Result<Progress, TrainError> {
    let t = &config.train;
    let accumulation = t.gradient_accumulation_steps.max(1);
    // Every epoch has this many batches, so a far start is arithmetic, not a walk.
    let batches = match dataset.batches_per_epoch() {
        0 => return Err(TrainError::Config { origin: "data".into(), reason: "the dataset plans no batches".into() }),
        n => n,
    };
    // u128: a first step past usize's range is still a number to name.
    let past_end = |key: &str, value: usize, step: u128| {
        let of = match t.max_train_epochs {
            0 => format!("train.max_train_steps = {}", t.max_train_steps),
            e => format!("the {} steps of train.max_train_epochs = {e}", t.max_train_steps),
        };
        let at = if key == "initial_epoch" { format!(" (its first step is {step})") } else { String::new() };
        TrainError::Config {
            origin: format!("train.{key}"),
            reason: format!("= {value}{at} leaves nothing to train: the run would start at or after its end, {of}; raise that to train further"),
        }
    };
    let start = if t.initial_step > 0 {
        if t.initial_step >= t.max_train_steps {
            return Err(past_end("initial_step", t.initial_step, t.initial_step as u128));
        }
        // The steps before it: whole epochs, then whole steps of one.
        let per_epoch = steps_per_epoch(t, batches);
        let epoch = (t.initial_step / per_epoch) as u64;
        Progress { step: t.initial_step, epoch, batch_in_epoch: (t.initial_step % per_epoch) * accumulation }
    } else if t.initial_epoch > 1 {
        let epoch = t.initial_epoch - 1;
        let step = epoch as u128 * steps_per_epoch(t, batches) as u128;
        match usize::try_from(step) {
            Ok(step) if step < t.max_train_steps => Progress { step, epoch: epoch as u64, batch_in_epoch: 0 },
            _ => return Err(past_end("initial_epoch", t.initial_epoch, step)),
        }
    } else {
        Progress { step: 0, epoch: 0, batch_in_epoch: 0 }
    };
    Ok(start)
}

/// A step queued on the device whose numbers the host has not read yet.
struct PendingStep<B: burn::tensor::backend::Backend> {
    step: usize,
    epoch: u64,
    lr: f64,
    /// The text encoder's learning rate, when it has adapters.
    te_lr: Option<f64>,
    /// The trained embedding's learning rate.
    emb_lr: Option<f64>,
    /// With Prodigy or DAdaptAdam: the UNet's and the text encoders' step sizes (estimate
    /// times learning rate), on the device.
    d_lr: Option<Tensor<B, 1>>,
    te_d_lr: Vec<Tensor<B, 1>>,
    /// With `train.scale_weight_norms`: `[adapters scaled, mean norm, largest norm]`.
    max_norm: Option<Tensor<B, 1>>,
    record: Tensor<B, 1>,
}

/// Reads queued steps' numbers back (one read for all) and reports them: the loss list,
/// `metrics.jsonl`, the TensorBoard events and `on_step`.
struct ReadBack<'a> {
    t: &'a crate::config::TrainSection,
    start: Instant,
    /// `start` as a wall time (seconds since the Unix epoch), for the event files.
    start_wall: f64,
    /// The training time an earlier part of a resumed run logged (its last kept
    /// `elapsed_s`), so that `metrics.jsonl`'s times go on from it.
    elapsed_before: f64,
    metrics: &'a mut std::fs::File,
    metrics_path: &'a Path,
    events: Option<&'a mut EventWriter>,
    /// Whether the run scales its loss (f16), so that the scale is worth a curve.
    fp16: bool,
    losses: &'a mut Vec<f32>,
    /// Whether the UNet has adapters: the learning rate reported is the UNet's, else the
    /// embedding's or the text encoders'.
    unet_trains: bool,
}

impl ReadBack<'_> {
    /// Whether every `on_step` call asked to go on. A non-finite step is an error when
    /// the run stops on one; its update was not applied either way.
    fn steps<B: burn::tensor::backend::Backend>(mut self, pending: Vec<PendingStep<B>>, on_step: &mut dyn FnMut(&StepInfo) -> bool) -> Result<bool, TrainError> {
        let records = read_records(pending.iter().map(|p| p.record.clone()).collect())?;
        let mut step_sizes = read_step_sizes(&pending)?.into_iter();
        let max_norms = read_max_norms(&pending)?;
        let elapsed_s = self.start.elapsed().as_secs_f64();
        let mut go_on = true;
        for ((p, r), max_norm) in pending.iter().zip(records).zip(max_norms) {
            let StepRecord { loss, grad_norm, loss_scale, outcome } = r;
            if outcome == StepOutcome::NonFinite && self.t.on_non_finite == crate::config::OnNonFinite::Stop {
                return Err(TrainError::NonFinite { step: p.step, loss, grad_norm });
            }
            self.losses.push(loss);
            let d_lr = p.d_lr.as_ref().and_then(|_| step_sizes.next());
            let te_d_lr: Vec<f32> = p.te_d_lr.iter().filter_map(|_| step_sizes.next()).collect();
            let lr = if self.unet_trains { p.lr } else { p.emb_lr.or(p.te_lr).unwrap_or(p.lr) };
            let info = StepInfo { step: p.step, total: self.t.max_train_steps, loss, lr, elapsed_s };
            writeln!(
                self.metrics,
                "{{\"step\":{},\"epoch\":{},\"loss\":{},\"grad_norm\":{},\"lr\":{},{}{}\"loss_scale\":{},\"skipped\":{},\"elapsed_s\":{:.3}}}",
                info.step,
                // Counted from 1, as the epoch saves' numbers and `train.initial_epoch`.
                p.epoch + 1,
                json_f32(loss),
                json_f32(grad_norm),
                info.lr,
                d_lr.map_or(String::new(), |v| format!("\"d_lr\":{},", json_f32(v))),
                max_norm.map_or(String::new(), |[n, mean, max]| format!(
                    "\"keys_scaled\":{n},\"average_key_norm\":{},\"max_key_norm\":{},",
                    json_f32(mean),
                    json_f32(max)
                )),
                loss_scale,
                outcome != StepOutcome::Applied,
                self.elapsed_before + info.elapsed_s
            )
            .map_err(io_err(self.metrics_path))?;
            if let Some(events) = self.events.as_deref_mut() {
                let mut values = vec![("loss", loss)];
                values.extend(self.unet_trains.then_some(("lr/unet", p.lr as f32)));
                values.extend(p.te_lr.map(|lr| ("lr/text_encoder", lr as f32)));
                values.extend(p.emb_lr.map(|lr| ("lr/embedding", lr as f32)));
                values.extend(d_lr.map(|v| ("d*lr/unet", v)));
                values.extend(te_d_lr.into_iter().enumerate().map(|(i, v)| (["d*lr/text_encoder", "d*lr/text_encoder_2"][i.min(1)], v)));
                values.extend(grad_norm.is_finite().then_some(("grad_norm", grad_norm)));
                values.extend(self.fp16.then_some(("loss_scale", loss_scale)));
                if let Some([n, mean, max]) = max_norm {
                    // sd-scripts' tags.
                    values.extend([("max_norm/keys_scaled", n), ("norm/avg_key_norm", mean), ("max_norm/max_key_norm", max)]);
                }
                tensorboard(events, |e| e.scalars(p.step as u64, self.start_wall + elapsed_s, &values))?;
            }
            go_on &= on_step(&info);
        }
        if let Some(events) = self.events {
            tensorboard(events, EventWriter::flush)?;
        }
        Ok(go_on)
    }
}

/// Each pending step's max-norm statistics (`train.scale_weight_norms`), in one read.
fn read_max_norms<B: burn::tensor::backend::Backend>(pending: &[PendingStep<B>]) -> Result<Vec<Option<[f32; 3]>>, TrainError> {
    let stats: Vec<Tensor<B, 1>> = pending.iter().filter_map(|p| p.max_norm.clone()).collect();
    if stats.is_empty() {
        return Ok(vec![None; pending.len()]);
    }
    let data = Tensor::cat(stats, 0).into_data().convert::<f32>();
    let values = data.to_vec::<f32>().map_err(|e| lora_core::LoraError::Unsupported(format!("reading the max-norm statistics: {e:?}")))?;
    let mut chunks = values.chunks_exact(3).map(|c| [c[0], c[1], c[2]]);
    Ok(pending.iter().map(|p| p.max_norm.as_ref().and_then(|_| chunks.next())).collect())
}

/// kohya's max-norm regularization of every adapter after a step, on the device: the
/// UNet's and (when trained) the text encoder's, with statistics over both
/// (`[adapters scaled, mean norm, largest norm]`).
#[allow(clippy::type_complexity)]
fn apply_max_norm<B: AutodiffBackend>(
    max_norm: f32,
    (unet, optim, unet_pairs): (sd_model::UNet2DConditionModel<B>, &mut FlatAdamW<B>, &[lora_core::optim::NormPair]),
    encoders: Vec<sd_model::ClipTextModel<B>>,
    te_optims: &mut [FlatAdamW<B>],
    te_pairs: &[Vec<lora_core::optim::NormPair>],
) -> Result<(sd_model::UNet2DConditionModel<B>, Vec<sd_model::ClipTextModel<B>>, Tensor<B::InnerBackend, 1>), TrainError> {
    let (unet, mut stats) = optim.apply_max_norm(unet, unet_pairs, max_norm)?;
    let mut scaled = Vec::with_capacity(encoders.len());
    for ((te, o), pairs) in encoders.into_iter().zip(te_optims.iter_mut()).zip(te_pairs) {
        let (te, s) = o.apply_max_norm(te, pairs, max_norm)?;
        scaled.push(te);
        let sums = stats.values.clone().slice(0..2) + s.values.clone().slice(0..2);
        let largest = stats.values.slice(2..3).max_pair(s.values.slice(2..3));
        stats = lora_core::optim::MaxNormStats { values: Tensor::cat(vec![sums, largest], 0), count: stats.count + s.count };
    }
    let count = stats.count.max(1) as f32;
    let v = stats.values;
    let mean = v.clone().slice(1..2).div_scalar(count);
    Ok((unet, scaled, Tensor::cat(vec![v.clone().slice(0..1), mean, v.slice(2..3)], 0)))
}

/// The estimated step sizes (Prodigy, DAdaptAdam) of `pending` steps, in order (UNet, then
/// text encoder, per step), in one read; nothing to read without an estimate.
fn read_step_sizes<B: burn::tensor::backend::Backend>(pending: &[PendingStep<B>]) -> Result<Vec<f32>, TrainError> {
    let sizes: Vec<Tensor<B, 1>> = pending.iter().flat_map(|p| p.d_lr.iter().chain(&p.te_d_lr).cloned()).collect();
    if sizes.is_empty() {
        return Ok(Vec::new());
    }
    let data = Tensor::cat(sizes, 0).into_data();
    let values = data.convert::<f32>().to_vec::<f32>();
    Ok(values.map_err(|e| lora_core::LoraError::Unsupported(format!("reading the optimizer's estimated step sizes: {e:?}")))?)
}

/// Timesteps of a validation: `VALIDATION_TIMESTEPS` evenly spaced over the trained range.
const VALIDATION_TIMESTEPS: usize = 5;

/// The validation loss of a run (`data.validation_split`).
struct Validator<B: burn::tensor::backend::Backend> {
    schedule: TrainingSchedule<B>,
    dataset: Dataset,
    cache: EncodeCache<B>,
    log: ValidationLog,
}

impl<B: burn::tensor::backend::Backend> Validator<B> {
    /// The mean over the validation images and [`VALIDATION_TIMESTEPS`] timesteps of the
    /// unweighted MSE between prediction and target (weighed by the loss masks when the
    /// data has them). Everything random is fixed (the VAE
    /// posterior's mean, seeded noise per batch and timestep, no dropout) and nothing is
    /// drawn from the training streams, so evaluations compare with each other and leave
    /// the training run as it would be without them. Samples that keep the model's output
    /// (`diff_output_preservation`) are measured against it, as in training.
    fn loss<A: AutodiffBackend<InnerBackend = B>>(
        &mut self,
        unet: &sd_model::UNet2DConditionModel<A>,
        text_encoders: Option<&[sd_model::ClipTextModel<A>]>,
        frozen: &Components<B>,
        (config, embedding): (&TrainConfig, Option<&TrainedEmbedding>),
        device: &B::Device,
    ) -> Result<f32, TrainError> {
        let t = &config.train;
        let unet = unet.valid();
        let text_encoders: Option<Vec<sd_model::ClipTextModel<B>>> = text_encoders.map(|tes| tes.iter().map(|te| te.valid()).collect());
        let span = t.max_timestep - t.min_timestep;
        let timesteps: Vec<i64> = (0..VALIDATION_TIMESTEPS).map(|k| (t.min_timestep + (2 * k + 1) * span / (2 * VALIDATION_TIMESTEPS)) as i64).collect();
        let mut total = Tensor::<B, 1>::zeros([1], device);
        let mut count = 0usize;
        let mut plans = self.dataset.plan_epoch(0);
        // kohya's `max_validation_steps`: the first batches only (0: all).
        if config.output.max_validation_steps > 0 {
            plans.truncate(config.output.max_validation_steps);
        }
        // The model without adapters, made once, when some sample keeps its output.
        let base = plans.iter().flat_map(|p| &p.samples).any(|s| s.diff_output_preservation).then(|| without_adapters(unet.clone()));
        for (b, plan) in plans.iter().enumerate() {
            let EncodedBatch { posterior, context, masks, .. } = self.cache.batch(&self.dataset, frozen, plan, config, text_encoders.is_none(), device)?;
            let rows = preserved_rows(plan);
            let latents = frozen.vae.scale_latents(posterior.mean.clone());
            let cond = match (context, &text_encoders) {
                (Some(c), _) => c,
                (None, Some(tes)) => {
                    let captions = training_captions(plan, embedding, b as u64);
                    encode_captions(text_encoders_of(tes, frozen), &captions, config, device)?
                }
                (None, None) => unreachable!("the cache encodes captions when the text encoder is frozen"),
            };
            let added = cond.pooled.map(|p| sd_model::AddedConditions { text_embeds: p, time_ids: time_ids(&self.dataset, plan, device) });
            let context = cond.context;
            let n = latents.dims()[0];
            for (k, &step) in timesteps.iter().enumerate() {
                let seed = config.data.validation_seed_or(t.seed);
                let mut noise = SeededNoise::new(seed ^ 0x7a11_da7e ^ (((b as u64) << 8) | k as u64));
                let eps: Tensor<B, 4> = noise.sample(latents.dims(), device)?;
                let ts = Tensor::<B, 1, burn::tensor::Int>::from_ints(vec![step; n].as_slice(), device);
                let noisy = self.schedule.add_noise(latents.clone(), eps.clone(), ts.clone());
                let target = self.schedule.target(latents.clone(), eps, ts.clone());
                let target = match &base {
                    Some(base) => preserved_targets(base, &rows, target, noisy.clone(), ts.clone().float(), context.clone(), added.as_ref())?,
                    None => target,
                };
                let pred = unet.forward_added(noisy, ts.float(), context.clone(), added.clone())?;
                let error = (pred.cast(burn::tensor::FloatDType::F32) - target.cast(burn::tensor::FloatDType::F32)).powf_scalar(2.0);
                // Masked data: the error where the masks let training in.
                let error = match &masks {
                    Some(m) => error * m.clone().cast(burn::tensor::FloatDType::F32),
                    None => error,
                }
                .mean();
                total = total + error.mul_scalar(n as f32);
                count += n;
            }
        }
        Ok(burn::tensor::ElementConversion::elem::<f32>(total.into_scalar()) / count.max(1) as f32)
    }
}

/// `validation.jsonl`: one `{"step", "val_loss"}` line per validation.
struct ValidationLog {
    path: PathBuf,
    entries: Vec<(usize, f32)>,
}

impl ValidationLog {
    /// Opens the log, keeping (when resuming from step `resumed`) the earlier entries up
    /// to that step, else starting it empty.
    fn open(path: &Path, resumed: Option<usize>) -> Result<Self, TrainError> {
        let text = resumed.map(|_| std::fs::read_to_string(path).unwrap_or_default()).unwrap_or_default();
        let entries: Vec<(usize, f32)> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| Some((v["step"].as_u64()? as usize, v["val_loss"].as_f64().unwrap_or(f64::NAN) as f32)))
            .filter(|(step, _)| resumed.is_some_and(|r| *step <= r))
            .collect();
        let log = Self { path: path.to_path_buf(), entries };
        log.write()?;
        Ok(log)
    }

    fn record(&mut self, step: usize, loss: f32) -> Result<(), TrainError> {
        self.entries.push((step, loss));
        self.write()
    }

    fn write(&self) -> Result<(), TrainError> {
        let text: String = self.entries.iter().map(|(step, loss)| format!("{{\"step\":{step},\"val_loss\":{}}}\n", json_f32(*loss))).collect();
        std::fs::write(&self.path, text).map_err(io_err(&self.path))
    }
}

/// The models to sample and validate with: a schedule-free optimizer's average `x` (what
/// the package's `optimizer.eval()` switches to), not the point it trains at; the models
/// themselves with the other optimizers.
fn eval_models<B: AutodiffBackend>(
    unet: &sd_model::UNet2DConditionModel<B>,
    encoders: &[sd_model::ClipTextModel<B>],
    optim: &FlatAdamW<B>,
    te_optims: &[FlatAdamW<B>],
) -> (sd_model::UNet2DConditionModel<B>, Vec<sd_model::ClipTextModel<B>>) {
    if !optim.is_schedule_free() {
        return (unet.clone(), encoders.to_vec());
    }
    let encoders = encoders.iter().enumerate().map(|(i, te)| te_optims.get(i).map_or_else(|| te.clone(), |o| o.to_eval(te.clone()))).collect();
    (optim.to_eval(unet.clone()), encoders)
}

/// Writes the sample grid of the adapters as they are now, merged into inference copies.
fn sample_grid_now<B: AutodiffBackend>(
    unet: &sd_model::UNet2DConditionModel<B>,
    encoders: &[sd_model::ClipTextModel<B>],
    frozen: &Components<B::InnerBackend>,
    (config, embedding): (&TrainConfig, Option<&TrainedEmbedding>),
    size: (usize, usize),
    path: &Path,
    device: &B::Device,
) -> Result<(), TrainError> {
    let mut current = with_trained(unet, encoders, frozen.clone());
    merge_adapters(&mut current);
    if let Some(grid) = generate_grid(&current, config, embedding, size, device)? {
        save_png(&grid, path)?;
    }
    Ok(())
}

/// Writes LoRA files and training states.
struct Saver<'a> {
    config: &'a TrainConfig,
    metadata: crate::metadata::RunMetadata,
    /// Batches per epoch, to count completed epochs.
    batches_in_epoch: usize,
    /// The embedding trained with the adapters (bundled in their files) or alone (saved
    /// as an embedding file).
    embedding: Option<TrainedEmbedding>,
    /// Whether the last save wrote an embedding file (no adapters).
    embedding_file: bool,
    /// What the run trains on, recorded in the state ([`data_fingerprint`]).
    data: String,
    /// The `config.toml` to write with the first save (one was there already).
    config_pending: Option<PathBuf>,
}

impl Saver<'_> {
    /// Saves the LoRA at `path` and, with `output.save_state`, the training state. The
    /// LoRA takes the optimizers' f32 values to evaluate (a schedule-free optimizer's
    /// average), not the models' working copies; the state the values they train on.
    #[allow(clippy::too_many_arguments)]
    fn save_all<B: AutodiffBackend>(
        &mut self,
        unet: &sd_model::UNet2DConditionModel<B>,
        encoders: &[sd_model::ClipTextModel<B>],
        (optim, te_optims): (&FlatAdamW<B>, &[FlatAdamW<B>]),
        progress: &Progress,
        path: &Path,
        (guard, timesteps, noise): (&StepGuard<B::InnerBackend>, &TimestepSampler, &SeededNoise),
    ) -> Result<(), TrainError> {
        let masters_eval = |encoders: &[sd_model::ClipTextModel<B>]| -> Vec<_> { encoders.iter().enumerate().map(|(i, te)| te_optims.get(i).map_or_else(|| te.clone(), |o| o.to_master_eval(te.clone()))).collect() };
        let (mut saved_unet, mut saved_tes) = (optim.to_master_eval(unet.clone()), masters_eval(encoders));
        // The state first (in f32): a LoRA that cannot be written in `save_precision`
        // leaves a state to resume from with another.
        let state = self.config.output.save_state;
        if state {
            let (mut unet, mut tes) = match optim.is_schedule_free() {
                true => (optim.to_master(unet.clone()), masters(encoders, te_optims)),
                false => (saved_unet.clone(), saved_tes.clone()),
            };
            self.save_state(&mut unet, &mut tes, optim, te_optims, progress, guard, timesteps, noise)?;
            self.write_pending_config()?;
        }
        self.save(&mut saved_unet, &mut saved_tes, progress, path).map_err(|e| match e {
            TrainError::Lora(e @ lora_core::LoraError::OutOfRange { .. }) => TrainError::Config {
                origin: "output.save_precision".into(),
                reason: format!("{}: {e}{}", path.display(), if state { "; the training state is saved: resume it with another output.save_precision" } else { "" }),
            },
            other => other,
        })?;
        self.write_pending_config()
    }

    /// Writes `config.toml` if it waits for the first save.
    fn write_pending_config(&mut self) -> Result<(), TrainError> {
        match self.config_pending.take() {
            Some(path) => std::fs::write(&path, self.config.to_toml()).map_err(io_err(&path)),
            None => Ok(()),
        }
    }

    fn save<B: AutodiffBackend>(&mut self, unet: &mut sd_model::UNet2DConditionModel<B>, encoders: &mut [sd_model::ClipTextModel<B>], progress: &Progress, path: &Path) -> Result<(), TrainError> {
        // A finished run's file says it trained its epochs (`ss_num_epochs`, the last one
        // perhaps in part), as sd-scripts' final save does; other saves count those done.
        let t = &self.config.train;
        let epochs = match progress.step >= t.max_train_steps && self.batches_in_epoch > 0 {
            true => crate::metadata::run_epochs(t, self.batches_in_epoch) as u64,
            false => completed_epochs(progress, self.batches_in_epoch),
        };
        let metadata = self.metadata.at_save(progress.step, epochs, std::time::SystemTime::now());
        self.embedding_file = save_lora(unet, encoders, self.embedding.as_ref(), metadata, self.config, path)?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn save_state<B: AutodiffBackend>(
        &mut self,
        unet: &mut sd_model::UNet2DConditionModel<B>,
        encoders: &mut [sd_model::ClipTextModel<B>],
        unet_optim: &FlatAdamW<B>,
        te_optims: &[FlatAdamW<B>],
        progress: &Progress,
        guard: &StepGuard<B::InnerBackend>,
        timesteps: &TimestepSampler,
        noise: &SeededNoise,
    ) -> Result<(), TrainError> {
        let unet_params = adapter_params(unet, "unet");
        let te_params: Vec<_> = encoders.iter_mut().enumerate().map(|(i, te)| encoder_params(te, i)).collect();
        let mut moments = HashMap::new();
        let mut times = std::collections::BTreeMap::new();
        export_moments(unet_optim, &unet_params, &mut moments, &mut times)?;
        export_optimizer_state(unet_optim, "unet", &mut moments)?;
        for (i, (o, params)) in te_optims.iter().zip(&te_params).enumerate() {
            export_moments(o, params, &mut moments, &mut times)?;
            export_optimizer_state(o, encoder_key(i), &mut moments)?;
        }
        let mut adapters = HashMap::new();
        host_params(unet_params, &mut adapters)?;
        for params in te_params {
            host_params(params, &mut adapters)?;
        }
        let (loss_scale, good_steps) = guard.state()?;
        let state = TrainingState {
            info: StateInfo {
                version: crate::state::STATE_VERSION,
                step: progress.step,
                epoch: progress.epoch,
                batch_in_epoch: progress.batch_in_epoch,
                timestep_rng: (&timesteps.rng_state()).into(),
                noise_rng: (&noise.state()).into(),
                loss_scale,
                good_steps,
                optimizer_time: times,
                fingerprint: fingerprint(self.config),
                data: Some(self.data.clone()),
            },
            adapters,
            moments,
            dir: self.config.output.output_dir.join("state"),
        };
        state.save(&state.dir)
    }
}

/// An error about a resumed state's contents, naming the state's `file`.
fn in_state_file(file: &Path) -> impl Fn(TrainError) -> TrainError + '_ {
    move |e| match e {
        TrainError::Config { origin, reason } => TrainError::Config { origin: format!("{} ({origin})", file.display()), reason },
        other => other,
    }
}

/// The state-file prefix of text encoder `i` (SDXL's second is `text_encoder_2`).
fn encoder_key(i: usize) -> &'static str {
    match i {
        0 => "text_encoder",
        _ => "text_encoder_2",
    }
}

/// Encoders in training (first, and SDXL's second) with the tokenizers of `frozen`.
fn text_encoders_of<'a, B: burn::tensor::backend::Backend, F: burn::tensor::backend::Backend>(
    encoders: &'a [sd_model::ClipTextModel<B>],
    frozen: &'a Components<F>,
) -> TextEncoders<'a, B> {
    TextEncoders {
        first: (&encoders[0], &frozen.tokenizer),
        second: encoders.get(1).zip(frozen.tokenizer_2.as_ref()),
    }
}

/// The encoders' f32 master values from their optimizers (what is saved).
fn masters<B: AutodiffBackend>(encoders: &[sd_model::ClipTextModel<B>], optims: &[FlatAdamW<B>]) -> Vec<sd_model::ClipTextModel<B>> {
    encoders.iter().zip(optims).map(|(te, o)| o.to_master(te.clone())).collect()
}

/// `frozen` with the UNet and the text encoders as they train (adapters attached), on the
/// inner backend.
fn with_trained<B: AutodiffBackend>(unet: &sd_model::UNet2DConditionModel<B>, encoders: &[sd_model::ClipTextModel<B>], frozen: Components<B::InnerBackend>) -> Components<B::InnerBackend> {
    Components {
        unet: unet.valid(),
        text_encoder: encoders[0].valid(),
        text_encoder_2: encoders.get(1).map(|te| te.valid()),
        ..frozen
    }
}

/// In-memory cache of the frozen encoders' outputs: the VAE posterior per (image, bucket,
/// crop, flip) of samples without a colour change, face crop or moving random crop (those
/// are encoded each time) and the text embedding per caption. Both encoders are frozen, so each is
/// computed once per distinct input and training steps only run the UNet.
struct EncodeCache<B: burn::tensor::backend::Backend> {
    /// How many captions' conditioning to keep: fixed captions (one per image) all are;
    /// shuffled or dropped tags make new captions every step, and past the limit those are
    /// encoded per step (the same numbers, no memory).
    embedding_limit: usize,
    posteriors: HashMap<SampleKey, (Tensor<B, 4>, Tensor<B, 4>)>,
    embeddings: HashMap<String, TextConditioning<B>>,
    /// Loss masks `[1, 1, h, w]` at the latents' size, when the dataset has masks.
    masks: HashMap<SampleKey, Tensor<B, 4>>,
}

/// Captions whose text conditioning [`EncodeCache`] keeps at least (beyond one per image).
const EMBEDDING_CACHE_LIMIT: usize = 1024;

/// Image index, bucket, resized size, crop and flip: what fixes a sample's pixels.
type SampleKey = (usize, (u32, u32), (u32, u32), (u32, u32), bool);

/// What the loss of a batch needs besides the model: the posterior, the text conditioning
/// (when cached), the loss weights and the loss masks `[n, 1, h, w]` (when the data has
/// masks).
struct EncodedBatch<B: burn::tensor::backend::Backend> {
    posterior: DiagonalGaussian<B>,
    context: Option<TextConditioning<B>>,
    loss_weights: Vec<f32>,
    masks: Option<Tensor<B, 4>>,
}

impl<B: burn::tensor::backend::Backend> EncodeCache<B> {
    /// An empty cache for the captions of `dataset`.
    fn for_dataset(dataset: &Dataset) -> Self {
        Self {
            embedding_limit: dataset.images().len().max(EMBEDDING_CACHE_LIMIT),
            posteriors: HashMap::new(),
            embeddings: HashMap::new(),
            masks: HashMap::new(),
        }
    }

    fn batch(
        &mut self,
        dataset: &Dataset,
        c: &Components<B>,
        plan: &sd_data::BatchPlan,
        config: &TrainConfig,
        with_embeddings: bool,
        device: &B::Device,
    ) -> Result<EncodedBatch<B>, TrainError> {
        let key = |s: &sd_data::SamplePlan| (s.image, s.bucket, s.resized, s.crop, s.flip);
        // A colour-changed sample (`color_aug`), one cropped around its face (a new scale
        // and crop each epoch) or one with a random crop that can move is new each time:
        // encoded, never kept. (Kept random crops would add an entry per crop seen, up to
        // the crop's room in pixels times the dataset, epoch after epoch.)
        let once = |s: &sd_data::SamplePlan| s.color.is_some() || dataset.face_crop(s.image) || dataset.random_crop(s.image);
        let cached = |cache: &Self, s: &sd_data::SamplePlan| !once(s) && cache.posteriors.contains_key(&key(s));
        let mut fresh_masks = vec![None; plan.samples.len()];
        let mut fresh = vec![None; plan.samples.len()];
        // Each sample is encoded on its own: results then do not depend on which batch a
        // sample first appeared in, which keeps resumed runs bit-identical.
        if plan.samples.iter().any(|s| !cached(self, s)) {
            let batch = dataset.load_pixels(plan)?;
            let pixels = batch.to_tensor::<B>(device)?;
            for (i, s) in plan.samples.iter().enumerate() {
                if cached(self, s) {
                    continue;
                }
                let posterior = c.vae.encode(pixels.clone().slice(i..i + 1))?;
                let [_, _, h, w] = posterior.mean.dims();
                if let Some(mask) = batch.mask_at(i, (h, w)) {
                    let mask = mask?.to_tensor(device)?;
                    match once(s) {
                        true => fresh_masks[i] = Some(mask),
                        false => drop(self.masks.insert(key(s), mask)),
                    }
                }
                match once(s) {
                    true => fresh[i] = Some((posterior.mean, posterior.logvar)),
                    false => drop(self.posteriors.insert(key(s), (posterior.mean, posterior.logvar))),
                }
            }
        }
        let (mut means, mut logvars, mut contexts) = (vec![], vec![], vec![]);
        for (s, fresh) in plan.samples.iter().zip(fresh) {
            let (m, l) = fresh.unwrap_or_else(|| self.posteriors[&key(s)].clone());
            means.push(m);
            logvars.push(l);
            if with_embeddings {
                let embeds = match self.embeddings.get(&s.caption) {
                    Some(e) => e.clone(),
                    None => {
                        let e = encode_captions(TextEncoders::of(c), std::slice::from_ref(&s.caption), config, device)?;
                        if self.embeddings.len() < self.embedding_limit {
                            self.embeddings.insert(s.caption.clone(), e.clone());
                        }
                        e
                    }
                };
                contexts.push(embeds);
            }
        }
        let posterior = DiagonalGaussian {
            mean: Tensor::cat(means, 0),
            logvar: Tensor::cat(logvars, 0),
        };
        let loss_weights = plan.samples.iter().map(|s| s.loss_weight).collect();
        let context = with_embeddings.then(|| TextConditioning::cat(contexts));
        let mask = |(s, fresh): (&sd_data::SamplePlan, Option<Tensor<B, 4>>)| fresh.unwrap_or_else(|| self.masks[&key(s)].clone());
        let masks = dataset.has_masks().then(|| Tensor::cat(plan.samples.iter().zip(fresh_masks).map(mask).collect(), 0));
        Ok(EncodedBatch { posterior, context, loss_weights, masks })
    }
}

/// The captions of a batch to encode: with a trained embedding, each sample's own (or a
/// template, drawn from `pick` and its place in the batch) with the word expanded.
fn training_captions(plan: &sd_data::BatchPlan, embedding: Option<&TrainedEmbedding>, pick: u64) -> Vec<String> {
    let mix = |i: usize| {
        // splitmix64's finaliser: neighbouring picks give unrelated templates.
        let mut z = pick.wrapping_add((i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    plan.samples
        .iter()
        .enumerate()
        .map(|(i, s)| embedding.map_or_else(|| s.caption.clone(), |e| e.caption(&s.caption, mix(i))))
        .collect()
}

/// The text conditioning of training captions: literal, or with A1111's emphasis when
/// `data.weighted_captions` is on.
fn encode_captions<B: burn::tensor::backend::Backend>(
    encoders: TextEncoders<'_, B>,
    captions: &[String],
    config: &TrainConfig,
    device: &B::Device,
) -> Result<TextConditioning<B>, TrainError> {
    let m = &config.model;
    let syntax = if config.data.weighted_captions { sd_pipeline::CaptionSyntax::Weighted } else { sd_pipeline::CaptionSyntax::Literal };
    Ok(sd_pipeline::condition_captions(encoders, captions, syntax, m.clip_skip, m.max_token_length, device)?)
}

/// SDXL's time ids of a batch `[n, 6]` ([`sdxl_sizes`] of each sample).
fn time_ids<B: burn::tensor::backend::Backend>(dataset: &Dataset, plan: &sd_data::BatchPlan, device: &B::Device) -> Tensor<B, 2> {
    let rows: Vec<_> = plan
        .samples
        .iter()
        .map(|s| {
            let image = &dataset.images()[s.image];
            sdxl_sizes((image.height, image.width), s)
        })
        .collect();
    sd_model::AddedConditions::sdxl_time_ids(&rows, device)
}

/// A sample's SDXL size conditioning: the image's original size `(h, w)`, the top-left
/// corner `(top, left)` of its crop in the resized frame (mirrored when flipped), and the
/// bucket `(h, w)`. The crop is the one actually taken, as in the SDXL paper and diffusers'
/// SDXL training scripts (kohya's sd-scripts instead give where the whole image would sit
/// fitted inside the bucket).
fn sdxl_sizes(original_hw: (u32, u32), s: &sd_data::SamplePlan) -> sd_model::SdxlSizes {
    (original_hw, s.crop_top_left(), (s.bucket.1, s.bucket.0))
}

/// Writes the adapters of the UNet and the text encoders to `path` in the configured
/// format and precision, with the run's metadata ([`crate::metadata`]), and the trained
/// embedding bundled; with an embedding and no adapters, the embedding file alone (returns
/// whether it wrote that).
fn save_lora<B: AutodiffBackend>(
    unet: &mut sd_model::UNet2DConditionModel<B>,
    encoders: &mut [sd_model::ClipTextModel<B>],
    embedding: Option<&TrainedEmbedding>,
    metadata: std::collections::BTreeMap<String, String>,
    config: &TrainConfig,
    path: &Path,
) -> Result<bool, TrainError> {
    let mut set = AdapterSet::new();
    sites::collect_adapters(unet, &mut set)?;
    for te in encoders.iter_mut() {
        sites::collect_adapters(te, &mut set)?;
    }
    if let Some(e) = embedding {
        let vectors = e.vectors(encoders)?;
        if set.is_empty() {
            // Textual inversion alone: an embedding file, as kohya's writes.
            // Without metadata, as kohya writes them (the LoRA's keys would describe no
            // network).
            drop(metadata);
            vectors.write(path, config.output.save_precision, HashMap::new())?;
            return Ok(true);
        }
        // Pivotal tuning: the vectors travel in the LoRA file, as A1111 loads them.
        for (part, tensor) in vectors.named_vectors() {
            set.bundled_embeddings.insert(format!("{}.{part}", e.word), tensor.clone());
        }
    }
    if unet.has_added_conditions() {
        // kohya's SDXL files name the UNet's modules by their SGM paths.
        sd_model::lora::use_sdxl_kohya_names(&mut set, unet);
    }
    set.metadata.extend(metadata);
    set.save(path, config.output.save_format, config.output.save_precision)?;
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tall image resized to the bucket's height, cropped 40 px from the left, and
    /// flipped: heights come first, the crop mirrors, the bucket is the target.
    /// `max_bucket_reso = 0` follows the resolution up to the largest bucket side, in
    /// whole steps: an 8192 px resolution (the largest side) no longer asks for 16384.
    #[test]
    fn the_default_largest_bucket_stays_within_the_largest_side() {
        assert_eq!(default_max_bucket_reso(512, 64), 1024);
        assert_eq!(default_max_bucket_reso(768, 64), 1536);
        assert_eq!(default_max_bucket_reso(8192, 64), 8192);
        assert_eq!(default_max_bucket_reso(4160, 96), 8160);
    }

    /// Saves are named as sd-scripts names them; the names of earlier versions are still
    /// recognised (for pruning a resumed run) and nothing else is: other runs' files, the
    /// final LoRA, numbers without their zero padding.
    #[test]
    fn save_names_round_trip_and_nothing_else_counts() {
        for n in [1, 20, 999_999, 123_456_789] {
            assert_eq!(save_number("s", &format!("{}.safetensors", step_save_name("s", n))), Some(SaveNumber::Step(n)));
            assert_eq!(save_number("s", &format!("{}.safetensors", epoch_save_name("s", n))), Some(SaveNumber::Epoch(n)));
        }
        assert_eq!(step_save_name("s", 20), "s-step00000020");
        assert_eq!(epoch_save_name("s", 4), "s-000004");
        assert_eq!(save_number("s", "s-step000020.safetensors"), Some(SaveNumber::Step(20)));
        assert_eq!(save_number("s", "s-epoch0004.safetensors"), Some(SaveNumber::Epoch(4)));
        for other in ["s.safetensors", "s-4.safetensors", "s-0004.safetensors", "s-step20.safetensors", "s-000004.ckpt", "t-000004.safetensors", "s-v2-000004.safetensors", "s-step0000002x.safetensors", "s-epoch.safetensors"] {
            assert_eq!(save_number("s", other), None, "{other}");
        }
        // Another output name that extends this one is not this run's.
        assert_eq!(save_number("s", "s-v2-step00000020.safetensors"), None);
    }

    #[test]
    fn sdxl_sizes_are_height_first_with_the_mirrored_crop() {
        let mut s = sd_data::SamplePlan {
            image: 0,
            caption: String::new(),
            bucket: (832, 1216),
            resized: (1000, 1216),
            crop: (40, 0),
            flip: false,
            color: None,
            loss_weight: 1.0,
            diff_output_preservation: false,
        };
        assert_eq!(sdxl_sizes((1459, 1200), &s), ((1459, 1200), (0, 40), (1216, 832)));
        s.flip = true;
        assert_eq!(sdxl_sizes((1459, 1200), &s), ((1459, 1200), (0, 1000 - 40 - 832), (1216, 832)));
    }

    /// Differential output preservation: the marked rows of the target become the UNet's
    /// prediction with its adapters off (here ones that change the output), the other
    /// rows stay, and the trained model keeps its adapters at full strength.
    #[test]
    fn preserved_rows_target_the_prediction_without_adapters() {
        use burn::tensor::Distribution;
        type B = burn::backend::Flex;
        let device = Default::default();
        let config = sd_model::UnetConfig::tiny();
        let base = sd_model::UNet2DConditionModel::<B>::new(&config, &device).unwrap();
        let mut unet = base.clone();
        let lora = lora_core::LoraConfig::new(4);
        sd_model::targets::attach_new_adapters(&mut unet, &Selection::new(sd_model::targets::UnetTargets::AttnMlp), &lora, &device).unwrap();
        // Fresh adapters add nothing; these do.
        unet.visit_lora_sites(&mut |_, site| {
            if let lora_core::sites::LoraSiteMut::Linear(lora_core::LoraLinear { adapter: Some(a), .. }) = site {
                let up = &mut a.up;
                up.weight = burn::module::Param::from_tensor(Tensor::random(up.weight.dims(), Distribution::Normal(0.0, 0.5), &device));
            }
        });
        let n = 3;
        let noisy = Tensor::<B, 4>::random([n, 4, 8, 8], Distribution::Normal(0.0, 1.0), &device);
        let ts = Tensor::<B, 1>::from_floats([10.0, 500.0, 900.0], &device);
        let context = Tensor::<B, 3>::random([n, 5, 32], Distribution::Normal(0.0, 1.0), &device);
        let target = Tensor::<B, 4>::random([n, 4, 8, 8], Distribution::Normal(0.0, 1.0), &device);
        let out = preserved_targets(&without_adapters(unet.clone()), &[1], target.clone(), noisy.clone(), ts.clone(), context.clone(), None).unwrap();

        let prior = base.forward_added(noisy.clone(), ts.clone(), context.clone(), None).unwrap();
        let adapted = unet.forward_added(noisy, ts, context, None).unwrap();
        let row = |t: &Tensor<B, 4>, i: usize| t.clone().slice(i..i + 1).into_data().to_vec::<f32>().unwrap();
        let max_diff = |a: Vec<f32>, b: Vec<f32>| a.iter().zip(&b).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
        assert!(max_diff(row(&adapted, 1), row(&prior, 1)) > 1e-3, "the adapters must change the output for the test to mean anything");
        assert!(max_diff(row(&out, 1), row(&prior, 1)) < 1e-5);
        for i in [0, 2] {
            assert_eq!(row(&out, i), row(&target, i));
        }
        // The model itself keeps its adapters on.
        let mut strengths = Vec::new();
        unet.visit_lora_sites(&mut |_, site| {
            if let lora_core::sites::LoraSiteMut::Linear(l) = site {
                strengths.push((l.multiplier, l.adapter.is_some()));
            }
        });
        assert!(strengths.iter().any(|&(_, on)| on) && strengths.iter().all(|&(m, _)| m == 1.0));
    }

    /// A colour-changed sample (`color_aug`) is encoded from its changed pixels each time,
    /// never served from nor kept in the posterior cache; its plain twin still is.
    #[test]
    fn colour_changed_samples_are_encoded_anew_and_not_kept() {
        type B = burn::backend::Flex;
        let device = Default::default();
        let components = sd_pipeline::load_components::<B>("tiny", 0, &device).unwrap();
        let mut config = TrainConfig::default();
        (config.data.demo_images, config.train.train_batch_size) = (2, 2);
        let dataset = open_dataset(&config).unwrap();
        let plan = dataset.plan_epoch(0).remove(0);
        let mut cache = EncodeCache::<B>::for_dataset(&dataset);
        let mean = |cache: &mut EncodeCache<B>, plan: &sd_data::BatchPlan| {
            let batch = cache.batch(&dataset, &components, plan, &config, false, &device).unwrap();
            batch.posterior.mean.into_data().to_vec::<f32>().unwrap()
        };
        // The first sample twice: plain, then colour-changed.
        let plan = sd_data::BatchPlan { samples: vec![plan.samples[0].clone(); 2], ..plan };
        let plain = mean(&mut cache, &plan);
        assert_eq!(cache.posteriors.len(), 1);
        let mut coloured = plan.clone();
        coloured.samples[1].color = Some(sd_data::image_io::ColorAug::Gamma(1.05));
        let changed = mean(&mut cache, &coloured);
        let half = plain.len() / 2;
        assert_eq!(changed[..half], plain[..half], "the plain one comes from the cache");
        assert_ne!(changed[half..], plain[half..], "the coloured sample is encoded from its changed pixels");
        assert_eq!(cache.posteriors.len(), 1, "the coloured posterior is not kept");
        assert_eq!(mean(&mut cache, &plan), plain);
    }

    /// `data.validation_seed` fixes the held-out images whatever the training seed; without
    /// it they follow `train.seed`.
    #[test]
    fn the_validation_seed_fixes_the_held_out_images() {
        let held_out = |train_seed: u64, validation_seed: u64| {
            let mut config = TrainConfig::default();
            (config.data.demo_images, config.data.validation_split) = (12, 0.25);
            (config.train.seed, config.data.validation_seed) = (train_seed, validation_seed);
            let (_, validation) = training_datasets(&config).unwrap();
            let mut hashes: Vec<String> = validation.unwrap().images().iter().map(|i| i.content_hash.clone()).collect();
            hashes.sort();
            hashes
        };
        assert_eq!(held_out(1, 5), held_out(2, 5));
        assert_eq!(held_out(5, 0), held_out(1, 5));
        let by_train_seed: Vec<_> = (1..6).map(|seed| held_out(seed, 0)).collect();
        assert!(by_train_seed.iter().any(|h| *h != by_train_seed[0]), "the training seed picks them otherwise");
    }

    /// The demo images follow `data.resolution` and the bucket switches: at 128 px, 128 px
    /// squares and 96x160 / 160x96 buckets; without buckets, every image at 128x128.
    #[test]
    fn the_demo_follows_the_resolution() {
        let reso = |w: u32, h: u32| -> sd_data::Reso { (w, h) };
        let mut config = TrainConfig::default();
        config.data.resolution = sd_data::Resolution::square(128);
        let table = open_dataset(&config).unwrap().bucket_table();
        assert_eq!(table.keys().copied().collect::<Vec<_>>(), vec![reso(96, 160), reso(128, 128), reso(160, 96)], "{table:?}");
        config.data.enable_bucket = false;
        let table = open_dataset(&config).unwrap().bucket_table();
        assert_eq!(table.keys().copied().collect::<Vec<_>>(), vec![reso(128, 128)], "{table:?}");
        let default = open_dataset(&TrainConfig::default()).unwrap().bucket_table();
        assert_eq!(default.keys().copied().collect::<Vec<_>>(), vec![reso(48, 80), reso(64, 64), reso(80, 48)], "{default:?}");
    }

    /// Random crops that can move are encoded each time and never kept (a cache of every
    /// crop seen would grow epoch after epoch); images whose crop cannot move are kept.
    #[test]
    fn moving_random_crops_are_not_kept() {
        type B = burn::backend::Flex;
        let device = Default::default();
        let components = sd_pipeline::load_components::<B>("tiny", 0, &device).unwrap();
        let mut config = TrainConfig::default();
        (config.data.demo_images, config.data.random_crop) = (3, true);
        let dataset = open_dataset(&config).unwrap();
        let moving: Vec<bool> = (0..3).map(|i| dataset.random_crop(i)).collect();
        assert_eq!(moving.iter().filter(|m| **m).count(), 2, "portrait and landscape images move, {moving:?}");
        let mut cache = EncodeCache::<B>::for_dataset(&dataset);
        for epoch in 0..3 {
            for plan in dataset.plan_epoch(epoch) {
                cache.batch(&dataset, &components, &plan, &config, false, &device).unwrap();
            }
        }
        let kept: std::collections::BTreeSet<usize> = cache.posteriors.keys().map(|k| k.0).collect();
        let fixed: std::collections::BTreeSet<usize> = (0..3).filter(|&i| !moving[i]).collect();
        assert_eq!(kept, fixed);
    }

    /// A state's fingerprint of the `[lora]` section as written before `network_weights`,
    /// `conv_rank` and `conv_alpha` existed still matches a configuration that leaves them
    /// at their defaults; set, they count.
    #[test]
    fn fingerprints_ignore_later_keys_at_their_defaults() {
        let mut config = TrainConfig::default();
        let before = "model.pretrained = \"tiny\"\nmodel.tiny_seed = 0\nrank = 8\nalpha = 8.0\ndropout = 0.0\nrslora = false\nunet_targets = \"attn-mlp\"\ninclude = []\nexclude = []\ntext_encoder_targets = \"none\"\n";
        assert_eq!(fingerprint(&config), before);
        config.lora.network_weights = "start.safetensors".into();
        assert_eq!(fingerprint(&config), before);
        config.lora.conv_rank = 4;
        assert!(fingerprint(&config).contains("\nconv_rank = 4\n"));
        config.lora.conv_alpha = 2.0;
        assert!(fingerprint(&config).contains("\nconv_alpha = 2.0\n"));
        (config.lora.constraint, config.lora.rescaled) = (1e-3, true);
        assert!(fingerprint(&config).contains("\nconstraint = 0.001\n") && fingerprint(&config).contains("\nrescaled = true\n"));
    }

    /// `train.zero_terminal_snr` unset keeps the model's own setting; set, it wins either
    /// way (a zero-terminal-SNR model trains on the plain schedule with `false`, as
    /// sd-scripts would without its flag).
    #[test]
    fn zero_terminal_snr_follows_the_model_unless_set() {
        let mut t = TrainConfig::default().train;
        let ztsnr_model = sd_sched::SchedulerConfig::zero_terminal_snr_v();
        let plain_model = sd_sched::SchedulerConfig::sd15();
        assert!(training_scheduler_config(&ztsnr_model, &t).rescale_betas_zero_snr);
        assert!(!training_scheduler_config(&plain_model, &t).rescale_betas_zero_snr);
        t.zero_terminal_snr = Some(false);
        assert!(!training_scheduler_config(&ztsnr_model, &t).rescale_betas_zero_snr);
        t.zero_terminal_snr = Some(true);
        assert!(training_scheduler_config(&plain_model, &t).rescale_betas_zero_snr);
        // The SNR-based weights read the schedule before the rescale (sd-scripts' table).
        let device = Default::default();
        let schedule = training_schedule::<burn::backend::Flex>(&ztsnr_model, &device).unwrap();
        let last = burn::tensor::Tensor::<burn::backend::Flex, 1, burn::tensor::Int>::from_ints([999], &device);
        let snr: f32 = schedule.snr(last).into_scalar();
        assert!(snr > 0.004 && snr < 0.006, "{snr}");
    }

    /// `data.caption_separator` reaches the folders' tag handling: with every droppable
    /// tag dropped, `|` leaves the kept first tag, `,` the caption whole (one tag).
    #[test]
    fn the_caption_separator_splits_the_folders_tags() {
        let dir = tempfile::tempdir().unwrap();
        image::RgbImage::from_pixel(64, 64, image::Rgb([120, 30, 200])).save(dir.path().join("a.png")).unwrap();
        std::fs::write(dir.path().join("a.txt"), "mystyle|red|circle").unwrap();
        let mut config = TrainConfig::default();
        config.data.train_data_dir = dir.path().display().to_string();
        config.data.min_bucket_reso = 64;
        (config.data.keep_tokens, config.data.caption_tag_dropout_rate) = (1, 1.0);
        let caption = |config: &TrainConfig| open_dataset(config).unwrap().plan_epoch(0)[0].samples[0].caption.clone();
        assert_eq!(caption(&config), "mystyle|red|circle");
        config.data.caption_separator = "|".into();
        assert_eq!(caption(&config), "mystyle");
    }
}
