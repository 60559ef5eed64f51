//! The LoRA training loop.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::AutodiffModule;
use burn::nn::loss::MseLoss;
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, Optimizer};
use burn::optim::grad_clipping::GradientClippingConfig;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};
use lora_core::{sites, AdapterSet, LoraConfig};
use sd_data::{demo, Dataset, DatasetConfig, Resolution, SubsetConfig};
use sd_model::targets::{attach_new_adapters, Selection};
use sd_model::DiagonalGaussian;
use sd_sched::training::{offset_noise, TimestepSampler, TrainingSchedule};
use sd_sched::{NoiseSchedule, NoiseSource, PredictionType, SeededNoise};

use crate::config::{LrScheduler, Prediction, TrainConfig};
use crate::generate::{decode, denoise, grid, initial_latents, save_png, GenerateOptions};
use crate::models::{load_components, Components};
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
    /// Seconds since training started.
    pub elapsed_s: f64,
}

/// Where training left its outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainReport {
    /// The LoRA file.
    pub lora: PathBuf,
    /// Sample grid from the trained LoRA (not written when training was interrupted).
    pub sample_grid: Option<PathBuf>,
    /// Per-step metrics, one JSON object per line.
    pub metrics: PathBuf,
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

/// Learning rate at optimizer step `step` (0-based): linear warmup, then the schedule.
pub fn learning_rate(cfg: &crate::config::TrainSection, step: usize) -> f64 {
    let base = cfg.learning_rate;
    if step < cfg.lr_warmup_steps {
        return base * (step + 1) as f64 / cfg.lr_warmup_steps as f64;
    }
    let decay_steps = cfg.max_train_steps.saturating_sub(cfg.lr_warmup_steps).max(1);
    let progress = ((step - cfg.lr_warmup_steps) as f64 / decay_steps as f64).min(1.0);
    match cfg.lr_scheduler {
        LrScheduler::Constant => base,
        LrScheduler::Linear => base * (1.0 - progress),
        LrScheduler::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        LrScheduler::CosineWithRestarts => {
            let cycles = cfg.lr_cycles.max(1) as f64;
            if progress >= 1.0 {
                return 0.0;
            }
            base * 0.5 * (1.0 + (std::f64::consts::PI * ((cycles * progress) % 1.0)).cos())
        }
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Builds the dataset the configuration asks for.
pub fn open_dataset(config: &TrainConfig) -> Result<Dataset, TrainError> {
    let d = &config.data;
    if d.train_data_dir == "demo" {
        let mut ds = DatasetConfig::demo("demo");
        ds.batch_size = config.train.train_batch_size;
        ds.seed = config.train.seed;
        let samples = demo::generate(&demo::DemoConfig {
            count: d.demo_images,
            ..Default::default()
        });
        let subset = SubsetConfig {
            flip_aug: d.flip_aug,
            ..SubsetConfig::default()
        };
        return Ok(Dataset::from_memory(&ds, subset, demo::into_memory_images(samples))?);
    }
    let mut ds = DatasetConfig::single(&d.train_data_dir);
    ds.resolution = Resolution::square(d.resolution);
    ds.batch_size = config.train.train_batch_size;
    ds.seed = config.train.seed;
    ds.skip_bad_images = d.skip_bad_images;
    ds.max_bucket_reso = ds.max_bucket_reso.max(d.resolution * 2);
    if let Some(subset) = ds.subsets.first_mut() {
        subset.num_repeats = Some(d.num_repeats);
        subset.flip_aug = d.flip_aug;
    }
    Ok(Dataset::open(&ds)?)
}

fn generate_grid<B: burn::tensor::backend::Backend>(
    c: &Components<B>,
    config: &TrainConfig,
    size: (usize, usize),
    device: &B::Device,
) -> Result<image::RgbImage, TrainError> {
    let o = &config.output;
    let opts = GenerateOptions {
        prompts: o.sample_prompts.clone(),
        negative_prompt: String::new(),
        sampler: o.sample_sampler.clone(),
        steps: o.sample_steps,
        cfg_scale: o.sample_cfg,
        seed: o.sample_seed,
        width: size.0,
        height: size.1,
        clip_skip: config.model.clip_skip,
    };
    let z = initial_latents(c, &opts, device)?;
    let images = decode(c, denoise(c, &opts, z, device)?)?;
    Ok(grid(&images, images.len().min(4)))
}

/// Trains a LoRA as `config` says, calling `on_step` after every optimizer step; when it
/// returns `false` (e.g. on Ctrl-C) training stops, the LoRA trained so far is saved and the
/// report says `interrupted`.
pub fn train<B: AutodiffBackend>(
    config: &TrainConfig,
    device: &B::Device,
    on_step: &mut dyn FnMut(&StepInfo) -> bool,
) -> Result<TrainReport, TrainError> {
    config.validate()?;
    let start = Instant::now();
    let out = &config.output.output_dir;
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let config_path = out.join("config.toml");
    std::fs::write(&config_path, config.to_toml()).map_err(io_err(&config_path))?;

    // Frozen parts run on the inner (non-autodiff) backend; only the UNet is differentiated.
    let frozen: Components<B::InnerBackend> = load_components(&config.model.pretrained, config.model.tiny_seed, device)?;
    let mut unet = <sd_model::UNet2DConditionModel<B> as AutodiffModule<B>>::from_inner(frozen.unet.clone());
    B::seed(device, config.train.seed);
    let l = &config.lora;
    let lora = LoraConfig::new(l.rank).with_alpha(l.alpha).with_dropout(l.dropout).with_rslora(l.rslora);
    let selection = Selection::new(l.unet_targets).include(l.include.clone()).exclude(l.exclude.clone());
    let targets = attach_new_adapters(&mut unet, &selection, &lora, device)?;
    if targets.is_empty() {
        return Err(TrainError::Config {
            origin: "lora".into(),
            reason: "the target selection matches no UNet layer".into(),
        });
    }

    // Text-encoder adapters, if any: the encoder then runs on the autodiff backend too.
    let mut text_encoder = <sd_model::ClipTextModel<B> as AutodiffModule<B>>::from_inner(frozen.text_encoder.clone());
    let te_selection = Selection::new(l.text_encoder_targets);
    let te_targets = attach_new_adapters(&mut text_encoder, &te_selection, &lora, device)?;
    let train_te = !te_targets.is_empty();

    let dataset = open_dataset(config)?;
    let mut schedule_cfg = frozen.scheduler.clone();
    match config.train.prediction {
        Prediction::Auto => {}
        Prediction::Epsilon => schedule_cfg.prediction_type = PredictionType::Epsilon,
        Prediction::VPrediction => schedule_cfg.prediction_type = PredictionType::VPrediction,
    }
    let schedule = TrainingSchedule::<B>::new(&NoiseSchedule::new(&schedule_cfg)?, device);
    let t = &config.train;
    let mut timesteps = TimestepSampler::new(t.min_timestep, t.max_timestep, schedule.num_train_timesteps(), t.seed)?;
    let mut noise = SeededNoise::new(t.seed ^ 0x5eed);
    let clip = (t.max_grad_norm > 0.0).then_some(GradientClippingConfig::Norm(t.max_grad_norm));
    let mut optim = AdamWConfig::new()
        .with_beta_1(t.adam_beta1)
        .with_beta_2(t.adam_beta2)
        .with_epsilon(t.adam_epsilon)
        .with_weight_decay(t.adam_weight_decay)
        .with_grad_clipping(clip.clone())
        .init::<B, sd_model::UNet2DConditionModel<B>>();
    let mut te_optim = AdamWConfig::new()
        .with_beta_1(t.adam_beta1)
        .with_beta_2(t.adam_beta2)
        .with_epsilon(t.adam_epsilon)
        .with_weight_decay(t.adam_weight_decay)
        .with_grad_clipping(clip)
        .init::<B, sd_model::ClipTextModel<B>>();
    let te_base_lr = if t.text_encoder_lr > 0.0 { t.text_encoder_lr } else { t.learning_rate };

    let mut cache = EncodeCache::default();
    let metrics_path = out.join("metrics.jsonl");
    let mut metrics = std::fs::File::create(&metrics_path).map_err(io_err(&metrics_path))?;
    let mut losses = Vec::with_capacity(t.max_train_steps);
    let mut epoch = 0u64;
    let mut plans = dataset.plan_epoch(epoch).into_iter();
    let mut sample_size = None;
    let mut interrupted = false;
    for step in 0..t.max_train_steps {
        let lr = learning_rate(t, step);
        let mut accumulator = GradientsAccumulator::<sd_model::UNet2DConditionModel<B>>::new();
        let mut te_accumulator = GradientsAccumulator::<sd_model::ClipTextModel<B>>::new();
        let mut step_loss = 0f32;
        for _ in 0..t.gradient_accumulation_steps {
            let plan = match plans.next() {
                Some(p) => p,
                None => {
                    epoch += 1;
                    plans = dataset.plan_epoch(epoch).into_iter();
                    plans.next().ok_or_else(|| TrainError::Config {
                        origin: "data".into(),
                        reason: "the dataset plans no batches".into(),
                    })?
                }
            };
            let (posterior, context, loss_weights) = cache.batch(&dataset, &frozen, &plan, config.model.clip_skip, !train_te, device)?;
            sample_size.get_or_insert((plan.bucket.0 as usize, plan.bucket.1 as usize));
            let eps = noise.sample(posterior.mean.dims(), device)?;
            let latents = Tensor::<B, 4>::from_inner(frozen.vae.scale_latents(posterior.sample(eps)?));
            let context = match context {
                Some(c) => Tensor::<B, 3>::from_inner(c),
                None => {
                    let captions: Vec<String> = plan.samples.iter().map(|s| s.caption.clone()).collect();
                    let ids = crate::generate::prompt_ids::<B>(&frozen.tokenizer, text_encoder.vocab_size(), &captions, device)?;
                    text_encoder.forward(ids, config.model.clip_skip)?
                }
            };

            let n = latents.dims()[0];
            let ts = timesteps.sample::<B>(n, device);
            let eps: Tensor<B, 4> = noise.sample(latents.dims(), device)?;
            let eps = offset_noise(eps, t.noise_offset, &mut noise)?;
            let noisy = schedule.add_noise(latents.clone(), eps.clone(), ts.clone());
            let target = schedule.target(latents, eps, ts.clone());
            let pred = unet.forward(noisy, ts.clone().float(), context)?;
            let per_sample = MseLoss::new()
                .forward_no_reduction(pred, target)
                .reshape([n as i32, -1])
                .mean_dim(1)
                .reshape([n]);
            let mut weights = Tensor::<B, 1>::from_floats(loss_weights.as_slice(), device);
            if t.min_snr_gamma > 0.0 {
                weights = weights * schedule.min_snr_weights(ts, t.min_snr_gamma)?;
            }
            let loss = (per_sample * weights).mean() / t.gradient_accumulation_steps as f32;
            step_loss += loss.clone().into_scalar().elem::<f32>();
            let mut grads = loss.backward();
            if train_te {
                te_accumulator.accumulate(&text_encoder, GradientsParams::from_module(&mut grads, &text_encoder));
            }
            accumulator.accumulate(&unet, GradientsParams::from_module(&mut grads, &unet));
        }
        if step_loss.is_finite() {
            unet = optim.step(lr, unet, accumulator.grads());
            if train_te {
                text_encoder = te_optim.step(lr * te_base_lr / t.learning_rate, text_encoder, te_accumulator.grads());
            }
        } else if t.on_non_finite == crate::config::OnNonFinite::Stop {
            return Err(TrainError::NonFinite { step: step + 1, loss: step_loss });
        }
        losses.push(step_loss);
        let info = StepInfo {
            step: step + 1,
            total: t.max_train_steps,
            loss: step_loss,
            lr,
            elapsed_s: start.elapsed().as_secs_f64(),
        };
        writeln!(metrics, "{{\"step\":{},\"loss\":{},\"lr\":{},\"elapsed_s\":{:.3}}}", info.step, info.loss, info.lr, info.elapsed_s)
            .map_err(io_err(&metrics_path))?;
        if !on_step(&info) {
            interrupted = info.step < t.max_train_steps;
            if interrupted {
                break;
            }
        }
        let sample_every = config.output.sample_every_n_steps;
        if sample_every > 0 && info.step.is_multiple_of(sample_every) && info.step < t.max_train_steps {
            let current = Components {
                unet: unet.valid(),
                tokenizer: frozen.tokenizer.clone(),
                text_encoder: text_encoder.valid(),
                vae: frozen.vae.clone(),
                scheduler: frozen.scheduler.clone(),
                base_version: frozen.base_version.clone(),
            };
            let size = sample_size.unwrap_or((config.data.resolution as usize, config.data.resolution as usize));
            let path = out.join(format!("samples-step{:06}.png", info.step));
            save_png(&generate_grid(&current, config, size, device)?, &path)?;
        }
        let save_every = config.output.save_every_n_steps;
        if save_every > 0 && info.step.is_multiple_of(save_every) && info.step < t.max_train_steps {
            save_lora(&mut unet, &mut text_encoder, &frozen, config, &out.join(format!("{}-step{:06}.safetensors", config.output.output_name, info.step)))?;
        }
    }

    let lora_path = out.join(format!("{}.safetensors", config.output.output_name));
    save_lora(&mut unet, &mut text_encoder, &frozen, config, &lora_path)?;

    let grid_path = if interrupted {
        None
    } else {
        let with_lora = Components { unet: unet.valid(), text_encoder: text_encoder.valid(), ..frozen };
        let size = sample_size.unwrap_or((config.data.resolution as usize, config.data.resolution as usize));
        let path = out.join("samples.png");
        save_png(&generate_grid(&with_lora, config, size, device)?, &path)?;
        Some(path)
    };

    let curve_path = out.join("loss.png");
    save_png(&plot::loss_curve(&losses, 640, 360), &curve_path)?;
    Ok(TrainReport {
        lora: lora_path,
        sample_grid: grid_path,
        metrics: metrics_path,
        loss_curve: curve_path,
        config: config_path,
        losses,
        seconds: start.elapsed().as_secs_f64(),
        interrupted,
    })
}

/// In-memory cache of the frozen encoders' outputs: the VAE posterior per (image, bucket,
/// crop, flip) and the text embedding per caption. Both encoders are frozen, so each is
/// computed once per distinct input and training steps only run the UNet.
#[derive(Default)]
struct EncodeCache<B: burn::tensor::backend::Backend> {
    posteriors: HashMap<SampleKey, (Tensor<B, 4>, Tensor<B, 4>)>,
    embeddings: HashMap<String, Tensor<B, 3>>,
}

/// Image index, bucket, crop and flip: what fixes a sample's pixels.
type SampleKey = (usize, (u32, u32), (u32, u32), bool);

/// The posterior, text embeddings and loss weights of a batch.
type EncodedBatch<B> = (DiagonalGaussian<B>, Option<Tensor<B, 3>>, Vec<f32>);

impl<B: burn::tensor::backend::Backend> EncodeCache<B> {
    fn batch(
        &mut self,
        dataset: &Dataset,
        c: &Components<B>,
        plan: &sd_data::BatchPlan,
        clip_skip: usize,
        with_embeddings: bool,
        device: &B::Device,
    ) -> Result<EncodedBatch<B>, TrainError> {
        let key = |s: &sd_data::SamplePlan| (s.image, s.bucket, s.crop, s.flip);
        if plan.samples.iter().any(|s| !self.posteriors.contains_key(&key(s))) {
            let pixels = dataset.load_pixels(plan)?.to_tensor::<B>(device)?;
            let posterior = c.vae.encode(pixels)?;
            for (i, s) in plan.samples.iter().enumerate() {
                let row = |t: &Tensor<B, 4>| t.clone().slice(i..i + 1);
                self.posteriors.insert(key(s), (row(&posterior.mean), row(&posterior.logvar)));
            }
        }
        let missing: Vec<String> = plan
            .samples
            .iter()
            .map(|s| s.caption.clone())
            .filter(|cap| with_embeddings && !self.embeddings.contains_key(cap))
            .collect();
        if !missing.is_empty() {
            let embeds = crate::generate::encode_prompts(c, &missing, clip_skip, device)?;
            for (i, cap) in missing.into_iter().enumerate() {
                self.embeddings.insert(cap, embeds.clone().slice(i..i + 1));
            }
        }
        let (mut means, mut logvars, mut contexts) = (vec![], vec![], vec![]);
        for s in &plan.samples {
            let (m, l) = &self.posteriors[&key(s)];
            means.push(m.clone());
            logvars.push(l.clone());
            if with_embeddings {
                contexts.push(self.embeddings[&s.caption].clone());
            }
        }
        let posterior = DiagonalGaussian {
            mean: Tensor::cat(means, 0),
            logvar: Tensor::cat(logvars, 0),
        };
        let weights = plan.samples.iter().map(|s| s.loss_weight).collect();
        let context = with_embeddings.then(|| Tensor::cat(contexts, 0));
        Ok((posterior, context, weights))
    }
}

/// Writes the UNet's adapters to `path` in the configured format and precision.
fn save_lora<B: AutodiffBackend>(
    unet: &mut sd_model::UNet2DConditionModel<B>,
    text_encoder: &mut sd_model::ClipTextModel<B>,
    frozen: &Components<B::InnerBackend>,
    config: &TrainConfig,
    path: &Path,
) -> Result<(), TrainError> {
    let mut set = AdapterSet::new();
    sites::collect_adapters(unet, &mut set)?;
    sites::collect_adapters(text_encoder, &mut set)?;
    let meta = &mut set.metadata;
    meta.insert("ss_base_model_version".into(), frozen.base_version.clone());
    meta.insert("ss_sd_model_name".into(), config.model.pretrained.clone());
    meta.insert("ss_learning_rate".into(), config.train.learning_rate.to_string());
    meta.insert("ss_max_train_steps".into(), config.train.max_train_steps.to_string());
    meta.insert("ss_seed".into(), config.train.seed.to_string());
    meta.insert("ss_training_comment".into(), "trained with sd-lora-rs".into());
    set.save(path, config.output.save_format, config.output.save_precision)?;
    Ok(())
}
