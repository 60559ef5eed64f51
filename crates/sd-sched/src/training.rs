//! Training-side diffusion maths on device tensors: forward noising, regression targets,
//! SNR, min-SNR-γ and debiased-estimation loss weights, noise offset, multi-resolution
//! (pyramid) noise and timestep sampling.
//!
//! Everything is batched over the first dimension and stays on the device of its inputs
//! (timesteps are an `Int` tensor; ᾱ is gathered on device), so a training step needs
//! no host synchronisation.
//!
//! ```
//! use burn::backend::Flex;
//! use burn::tensor::Tensor;
//! use sd_sched::training::{TimestepSampler, TrainingSchedule};
//! use sd_sched::{NoiseSchedule, NoiseSource, SchedulerConfig, SeededNoise};
//!
//! type B = Flex;
//! let device = Default::default();
//! let schedule = NoiseSchedule::new(&SchedulerConfig::sd15()).unwrap();
//! let train = TrainingSchedule::<B>::new(&schedule, &device);
//! let mut rng = SeededNoise::new(0);
//! let mut timesteps = TimestepSampler::new(0, 1000, 1000, 42).unwrap();
//!
//! let latents = Tensor::<B, 4>::zeros([2, 4, 8, 8], &device);
//! let noise = rng.sample([2, 4, 8, 8], &device).unwrap();
//! let t = timesteps.sample::<B>(2, &device);
//! let noisy = train.add_noise(latents.clone(), noise.clone(), t.clone());
//! let target = train.target(latents, noise, t.clone()); // ε for SD 1.5
//! let weights = train.min_snr_weights(t, 5.0).unwrap(); // per-sample loss weights
//! assert_eq!(noisy.dims(), target.dims());
//! assert_eq!(weights.dims(), [2]);
//! ```

use burn::tensor::{backend::Backend, Int, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::PredictionType;
use crate::error::{Result, SchedError};
use crate::noise::NoiseSource;
use crate::schedule::NoiseSchedule;

/// A [`NoiseSchedule`] uploaded to a device for batched training maths.
#[derive(Debug, Clone)]
pub struct TrainingSchedule<B: Backend> {
    alphas_cumprod: Tensor<B, 1>,
    /// ᾱ the SNR-based loss weights read: `alphas_cumprod` unless
    /// [`TrainingSchedule::with_snr_from`] set another schedule's.
    snr_alphas_cumprod: Tensor<B, 1>,
    prediction_type: PredictionType,
    num_train_timesteps: usize,
}

impl<B: Backend> TrainingSchedule<B> {
    /// Uploads ᾱ of `schedule` to `device`.
    pub fn new(schedule: &NoiseSchedule, device: &B::Device) -> Self {
        let alphas_cumprod = schedule.alphas_cumprod_tensor(device);
        Self {
            snr_alphas_cumprod: alphas_cumprod.clone(),
            alphas_cumprod,
            prediction_type: schedule.prediction_type(),
            num_train_timesteps: schedule.num_train_timesteps(),
        }
    }

    /// The same schedule with [`TrainingSchedule::snr`] (and so every SNR-based loss
    /// weight: min-SNR-γ, debiased estimation, the v-prediction scalings) read from
    /// `weighting`'s ᾱ, while noising and targets keep this schedule's. sd-scripts takes
    /// its SNR table before `--zero_terminal_snr` rescales the betas, so with zero terminal
    /// SNR its weights are those of the schedule without the rescale (min-SNR-γ 5 for
    /// v-prediction weighs timestep 999 by about 0.005, not 0); pass that schedule here to
    /// weigh as it does. Fails if the two have different lengths.
    ///
    /// ```
    /// use burn::backend::Flex;
    /// use sd_sched::training::TrainingSchedule;
    /// use sd_sched::{NoiseSchedule, SchedulerConfig};
    ///
    /// let ztsnr = NoiseSchedule::new(&SchedulerConfig::zero_terminal_snr_v()).unwrap();
    /// let plain = NoiseSchedule::new(&SchedulerConfig { rescale_betas_zero_snr: false, ..SchedulerConfig::zero_terminal_snr_v() }).unwrap();
    /// let device = Default::default();
    /// let t = burn::tensor::Tensor::<Flex, 1, burn::tensor::Int>::from_ints([999], &device);
    /// let ours = TrainingSchedule::<Flex>::new(&ztsnr, &device);
    /// assert_eq!(ours.snr(t.clone()).into_scalar(), 0.0);
    /// let kohya = ours.with_snr_from(&plain).unwrap();
    /// assert!(kohya.snr(t).into_scalar() > 0.004);
    /// ```
    pub fn with_snr_from(mut self, weighting: &NoiseSchedule) -> Result<Self> {
        if weighting.num_train_timesteps() != self.num_train_timesteps {
            return Err(SchedError::InvalidArgument {
                name: "weighting",
                reason: format!(
                    "a schedule of {} timesteps (this one's count), not {}",
                    self.num_train_timesteps,
                    weighting.num_train_timesteps()
                ),
            });
        }
        self.snr_alphas_cumprod = weighting.alphas_cumprod_tensor(&self.alphas_cumprod.device());
        Ok(self)
    }

    /// Number of training timesteps `T`; valid timesteps are `0..T`.
    pub fn num_train_timesteps(&self) -> usize {
        self.num_train_timesteps
    }

    /// What the model is trained to predict.
    pub fn prediction_type(&self) -> PredictionType {
        self.prediction_type
    }

    /// ᾱₜ per batch element, shape `[B]`.
    pub fn alphas_cumprod(&self, timesteps: Tensor<B, 1, Int>) -> Tensor<B, 1> {
        self.alphas_cumprod.clone().select(0, timesteps)
    }

    /// `(sqrt(ᾱₜ), sqrt(1 − ᾱₜ))` broadcast to `dims`.
    fn coefficients(
        &self,
        timesteps: Tensor<B, 1, Int>,
        dims: [usize; 4],
    ) -> (Tensor<B, 4>, Tensor<B, 4>) {
        let a = self.alphas_cumprod(timesteps);
        let sqrt_a = a.clone().sqrt().reshape([dims[0], 1, 1, 1]).expand(dims);
        let sqrt_1ma = a
            .neg()
            .add_scalar(1.0)
            .sqrt()
            .reshape([dims[0], 1, 1, 1])
            .expand(dims);
        (sqrt_a, sqrt_1ma)
    }

    /// Forward process `xₜ = sqrt(ᾱₜ)·x₀ + sqrt(1 − ᾱₜ)·ε` (diffusers `add_noise`).
    pub fn add_noise(
        &self,
        x0: Tensor<B, 4>,
        noise: Tensor<B, 4>,
        timesteps: Tensor<B, 1, Int>,
    ) -> Tensor<B, 4> {
        let (sqrt_a, sqrt_1ma) = self.coefficients(timesteps, x0.dims());
        sqrt_a * x0 + sqrt_1ma * noise
    }

    /// Velocity `v = sqrt(ᾱₜ)·ε − sqrt(1 − ᾱₜ)·x₀` (diffusers `get_velocity`).
    pub fn velocity(
        &self,
        x0: Tensor<B, 4>,
        noise: Tensor<B, 4>,
        timesteps: Tensor<B, 1, Int>,
    ) -> Tensor<B, 4> {
        let (sqrt_a, sqrt_1ma) = self.coefficients(timesteps, x0.dims());
        sqrt_a * noise - sqrt_1ma * x0
    }

    /// The regression target for this schedule's prediction type: ε, v or x₀.
    pub fn target(
        &self,
        x0: Tensor<B, 4>,
        noise: Tensor<B, 4>,
        timesteps: Tensor<B, 1, Int>,
    ) -> Tensor<B, 4> {
        match self.prediction_type {
            PredictionType::Epsilon => noise,
            PredictionType::VPrediction => self.velocity(x0, noise, timesteps),
            PredictionType::Sample => x0,
        }
    }

    /// SNR(t) = ᾱₜ / (1 − ᾱₜ) per batch element (diffusers `compute_snr`), of the
    /// weighting schedule ([`TrainingSchedule::with_snr_from`]; this one by default).
    pub fn snr(&self, timesteps: Tensor<B, 1, Int>) -> Tensor<B, 1> {
        // (sqrt(ᾱ) / sqrt(1 − ᾱ))², in diffusers' order, for f32 parity.
        let a = self.snr_alphas_cumprod.clone().select(0, timesteps);
        let alpha = a.clone().sqrt();
        let sigma = a.neg().add_scalar(1.0).sqrt();
        let ratio = alpha / sigma;
        ratio.clone() * ratio
    }

    /// Min-SNR-γ loss weights (Hang et al. 2023) for this schedule's prediction type;
    /// see [`min_snr_weights`].
    pub fn min_snr_weights(
        &self,
        timesteps: Tensor<B, 1, Int>,
        gamma: f64,
    ) -> Result<Tensor<B, 1>> {
        min_snr_weights(self.snr(timesteps), gamma, self.prediction_type)
    }

    /// Per-sample thresholds `c` of the pseudo-Huber losses ([`HuberSchedule`], kohya's
    /// `get_huber_threshold_if_needed`): `exp(−α·t)·scale` with `α = −ln(c)/T`
    /// (exponential), `(1 − c)/(1 + σₜ)² + c` with `σₜ = sqrt((1 − ᾱₜ)/ᾱₜ)` (snr; no scale, as
    /// kohya's), or `c·scale` (constant).
    pub fn huber_thresholds(&self, timesteps: Tensor<B, 1, Int>, schedule: HuberSchedule, c: f64, scale: f64) -> Tensor<B, 1> {
        match schedule {
            HuberSchedule::Exponential => {
                let alpha = -c.ln() / self.num_train_timesteps as f64;
                timesteps.float().mul_scalar(-alpha as f32).exp().mul_scalar(scale as f32)
            }
            HuberSchedule::Snr => {
                let a = self.alphas_cumprod(timesteps);
                let sigma = a.clone().neg().add_scalar(1.0).div(a).sqrt();
                sigma.add_scalar(1.0).powi_scalar(2).recip().mul_scalar((1.0 - c) as f32).add_scalar(c as f32)
            }
            HuberSchedule::Constant => {
                let n = timesteps.dims()[0];
                Tensor::full([n], (c * scale) as f32, &timesteps.device())
            }
        }
    }

    /// Per-sample debiased-estimation loss weights for `timesteps`
    /// ([`debiased_weights`] of their SNR).
    pub fn debiased_weights(&self, timesteps: Tensor<B, 1, Int>) -> Tensor<B, 1> {
        debiased_weights(self.snr(timesteps), self.prediction_type)
    }

    /// Per-sample [`v_pred_noise_like_weights`] for `timesteps`.
    pub fn v_pred_noise_like_weights(&self, timesteps: Tensor<B, 1, Int>) -> Tensor<B, 1> {
        v_pred_noise_like_weights(self.snr(timesteps))
    }

    /// Per-sample [`v_pred_like_weights`] for `timesteps`.
    pub fn v_pred_like_weights(&self, timesteps: Tensor<B, 1, Int>, lambda: f64) -> Tensor<B, 1> {
        v_pred_like_weights(self.snr(timesteps), lambda)
    }
}

/// kohya's `scale_v_pred_loss_like_noise_pred` for v-prediction: `SNR / (SNR + 1)`, which
/// turns the v-prediction loss into the ε-prediction loss's scale over the timesteps
/// (`‖v − v̂‖² · SNR/(SNR+1) = ‖ε − ε̂‖²`). The SNR is capped at 1000, as kohya's.
///
/// ```
/// use burn::backend::Flex;
/// use burn::tensor::Tensor;
/// let snr = Tensor::<Flex, 1>::from_floats([1.0, 3.0, 1e9], &Default::default());
/// let w: Vec<f32> = sd_sched::training::v_pred_noise_like_weights(snr).into_data().to_vec().unwrap();
/// assert_eq!(w[..2], [0.5, 0.75]);
/// assert!((w[2] - 1000.0 / 1001.0).abs() < 1e-6);
/// ```
pub fn v_pred_noise_like_weights<B: Backend>(snr: Tensor<B, 1>) -> Tensor<B, 1> {
    let snr = snr.clamp_max(1000.0);
    snr.clone().div(snr.add_scalar(1.0))
}

/// kohya's `v_pred_like_loss` for ε-prediction: the loss plus `λ` times a v-prediction-like
/// loss, `loss · (1 + λ · (SNR + 1) / SNR)`, which weighs the low-SNR (noisy) timesteps
/// more. The SNR is capped at 1000, as kohya's, and floored at 1e-3: the last timestep of
/// a zero-terminal-SNR schedule has SNR 0 (sd-scripts never meets it, as it weighs by the
/// schedule before the rescale: [`TrainingSchedule::with_snr_from`]).
///
/// ```
/// use burn::backend::Flex;
/// use burn::tensor::Tensor;
/// let snr = Tensor::<Flex, 1>::from_floats([1.0, 0.0], &Default::default());
/// let w: Vec<f32> = sd_sched::training::v_pred_like_weights(snr, 0.5).into_data().to_vec().unwrap();
/// assert_eq!(w[0], 2.0); // 1 + 0.5 · 2 / 1
/// assert!(w[1].is_finite());
/// ```
pub fn v_pred_like_weights<B: Backend>(snr: Tensor<B, 1>, lambda: f64) -> Tensor<B, 1> {
    let snr = snr.clamp(1e-3, 1000.0);
    snr.clone().add_scalar(1.0).div(snr).mul_scalar(lambda as f32).add_scalar(1.0)
}

/// Debiased-estimation loss weights (Yu et al. 2024, "Debias the Training of Diffusion
/// Models"; kohya's `--debiased_estimation_loss`): `1 / sqrt(SNR)` for ε- and
/// x₀-prediction, `1 / (SNR + 1)` for v-prediction, with the SNR capped at 1000 (it is
/// infinite at timestep 0 of some schedules) and floored at 1e-3: the last timestep of a
/// zero-terminal-SNR schedule has SNR 0, where `1 / sqrt(SNR)` is infinite and the loss
/// would be NaN (ordinary schedules never go below about 5e-3; sd-scripts weighs by the
/// schedule before the rescale, [`TrainingSchedule::with_snr_from`]).
pub fn debiased_weights<B: Backend>(snr: Tensor<B, 1>, prediction: PredictionType) -> Tensor<B, 1> {
    let snr = snr.clamp(1e-3, 1000.0);
    match prediction {
        PredictionType::VPrediction => snr.add_scalar(1.0).recip(),
        PredictionType::Epsilon | PredictionType::Sample => snr.sqrt().recip(),
    }
}

/// Min-SNR-γ weights from per-sample SNRs, as diffusers' training examples compute them:
/// `min(SNR, γ) / SNR` for ε-prediction, `min(SNR, γ) / (SNR + 1)` for v-prediction and
/// `min(SNR, γ)` for x₀-prediction.
///
/// For ε-prediction the weight is evaluated as `min(γ / SNR, 1)`, equal elsewhere but
/// finite (1) at SNR = 0, the last timestep of a zero-terminal-SNR schedule, where the
/// diffusers expression gives NaN.
pub fn min_snr_weights<B: Backend>(
    snr: Tensor<B, 1>,
    gamma: f64,
    prediction: PredictionType,
) -> Result<Tensor<B, 1>> {
    if !(gamma.is_finite() && gamma > 0.0) {
        return Err(SchedError::InvalidArgument {
            name: "gamma",
            reason: format!("must be a positive finite number, got {gamma}"),
        });
    }
    let gamma = gamma as f32;
    Ok(match prediction {
        PredictionType::Epsilon => snr.recip().mul_scalar(gamma).clamp_max(1.0),
        PredictionType::VPrediction => snr.clone().clamp_max(gamma) / snr.add_scalar(1.0),
        PredictionType::Sample => snr.clamp_max(gamma),
    })
}

/// Noise offset (Guttenberg 2023): `ε + offset · n` with `n ~ N(0, 1)` of shape
/// `[B, C, 1, 1]`, so the model also learns to shift the mean brightness per channel.
pub fn offset_noise<B: Backend>(
    noise: Tensor<B, 4>,
    offset: f64,
    source: &mut dyn NoiseSource<B>,
) -> Result<Tensor<B, 4>> {
    if !offset.is_finite() {
        return Err(SchedError::InvalidArgument {
            name: "offset",
            reason: format!("must be finite, got {offset}"),
        });
    }
    if offset == 0.0 {
        return Ok(noise);
    }
    let dims = noise.dims();
    let shift = source.sample([dims[0], dims[1], 1, 1], &noise.device())?;
    Ok(noise + shift.mul_scalar(offset as f32).expand(dims))
}

/// kohya's adaptive noise offset (`adaptive_noise_scale`): [`offset_noise`] with a
/// strength per sample and channel, `max(0, offset + scale · |mean(latents)|)` (the mean over
/// the latent's pixels), so channels whose mean is far from zero get a larger shift. It
/// draws what [`offset_noise`] draws; `offset = 0` returns the noise unchanged, as kohya
/// applies nothing without a noise offset. `latents` are the scaled latents, `[B, C, H, W]`
/// as `noise`.
///
/// ```
/// use burn::backend::Flex;
/// use burn::tensor::{Tensor, TensorData};
/// use sd_sched::training::adaptive_offset_noise;
/// use sd_sched::TensorQueue;
///
/// let device = Default::default();
/// let noise = Tensor::<Flex, 4>::zeros([1, 2, 2, 2], &device);
/// // Channel means -1 and 0.5.
/// let latents = Tensor::<Flex, 4>::from_data(TensorData::new(vec![-1.0f32, -1.0, -1.0, -1.0, 0.0, 1.0, 0.0, 1.0], [1, 2, 2, 2]), &device);
/// let mut unit = TensorQueue::new([Tensor::<Flex, 4>::ones([1, 2, 1, 1], &device)]);
/// let out = adaptive_offset_noise(noise, latents, 0.1, 0.2, &mut unit)?;
/// let v: Vec<f32> = out.into_data().to_vec().unwrap();
/// assert!((v[0] - 0.3).abs() < 1e-6 && (v[4] - 0.2).abs() < 1e-6);
/// # Ok::<(), sd_sched::SchedError>(())
/// ```
pub fn adaptive_offset_noise<B: Backend>(
    noise: Tensor<B, 4>,
    latents: Tensor<B, 4>,
    offset: f64,
    scale: f64,
    source: &mut dyn NoiseSource<B>,
) -> Result<Tensor<B, 4>> {
    for (name, v) in [("offset", offset), ("scale", scale)] {
        if !v.is_finite() {
            return Err(SchedError::InvalidArgument {
                name,
                reason: format!("must be finite, got {v}"),
            });
        }
    }
    if offset == 0.0 {
        return Ok(noise);
    }
    if latents.dims() != noise.dims() {
        return Err(SchedError::InvalidArgument {
            name: "latents",
            reason: format!("shape {:?} differs from the noise's {:?}", latents.dims(), noise.dims()),
        });
    }
    let dims = noise.dims();
    let strength = latents.mean_dim(3).mean_dim(2).abs().mul_scalar(scale as f32).add_scalar(offset as f32).clamp_min(0.0);
    let shift = source.sample([dims[0], dims[1], 1, 1], &noise.device())?;
    Ok(noise + (shift * strength).expand(dims))
}

/// How the pseudo-Huber threshold `c` follows the timestep
/// ([`TrainingSchedule::huber_thresholds`]; kohya's `huber_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HuberSchedule {
    /// `c` at the last timestep, growing exponentially to `scale` at timestep 0.
    Exponential,
    /// From 1 at high SNR to `c` at low SNR.
    Snr,
    /// `c · scale` everywhere.
    Constant,
}

/// The element-wise training loss between `pred` and `target` (kohya's `loss_type`,
/// `conditional_loss` without reduction): [`LossType::L2`] `(p − t)²`, [`LossType::L1`]
/// `|p − t|`, and the pseudo-Huber losses with one threshold `c` per sample (`[B]`):
/// [`LossType::Huber`] `2c·(sqrt((p − t)² + c²) − c)` and [`LossType::SmoothL1`]
/// `2·(sqrt((p − t)² + c²) − c)`, quadratic for small errors and linear for large ones
/// (less pull from outliers in the data). The pseudo-Huber forms are evaluated without
/// kohya's cancellation for small errors (to the same values in exact arithmetic).
pub fn elementwise_loss<B: Backend>(pred: Tensor<B, 4>, target: Tensor<B, 4>, loss: LossType, c: Option<Tensor<B, 1>>) -> Result<Tensor<B, 4>> {
    let diff = pred - target;
    let dims = diff.dims();
    let pseudo_huber = |c: Option<Tensor<B, 1>>| -> Result<(Tensor<B, 4>, Tensor<B, 4>)> {
        let c = c.ok_or(SchedError::InvalidArgument { name: "c", reason: "the pseudo-Huber losses need a threshold per sample".into() })?;
        if c.dims()[0] != dims[0] {
            return Err(SchedError::InvalidArgument { name: "c", reason: format!("{} thresholds for a batch of {}", c.dims()[0], dims[0]) });
        }
        let c = c.reshape([dims[0], 1, 1, 1]).expand(dims);
        // sqrt(d² + c²) − c as d² / (sqrt(d² + c²) + c): the same value without the
        // cancellation that loses most digits of small errors in f32.
        let square = diff.clone().powi_scalar(2);
        let root = square.clone().add(c.clone().powi_scalar(2)).sqrt();
        Ok((square.div(root.add(c.clone())), c))
    };
    Ok(match loss {
        LossType::L2 => diff.powi_scalar(2),
        LossType::L1 => diff.abs(),
        LossType::Huber => {
            let (excess, c) = pseudo_huber(c)?;
            excess.mul(c).mul_scalar(2.0)
        }
        LossType::SmoothL1 => pseudo_huber(c)?.0.mul_scalar(2.0),
    })
}

/// The training loss's element-wise form ([`elementwise_loss`]; kohya's `loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossType {
    /// Squared error (the usual MSE).
    L2,
    /// Absolute error.
    L1,
    /// Pseudo-Huber, scaled by the threshold `c`.
    Huber,
    /// Pseudo-Huber without the `c` factor.
    SmoothL1,
}

/// Multi-resolution ("pyramid") noise (Whitaker 2023; kohya's `--multires_noise_iterations`
/// and `--multires_noise_discount`): `noise` plus, for each level `i`, `discountⁱ` times N(0, 1)
/// noise drawn at `⌊H / rᵢⁱ⌋ × ⌊W / rᵢⁱ⌋` (at least 1×1) and upsampled bilinearly
/// (half-pixel centres, as PyTorch's `Upsample`), stopping after the first level of one
/// row or column; the sum is divided by its standard deviation over the whole batch
/// (unbiased, as `torch.std`). Level 0 is full resolution. `ratios[i]` is level `i`'s
/// `rᵢ`: kohya draws each uniformly in `[2, 4)` ([`pyramid_ratios`]). Low frequencies get
/// far more energy than in white noise, which teaches the model large-scale changes of
/// brightness and colour.
///
/// ```
/// use burn::backend::Flex;
/// use sd_sched::training::{pyramid_noise, pyramid_ratios};
/// use sd_sched::{NoiseSource, SeededNoise};
///
/// let device = Default::default();
/// let mut source = SeededNoise::new(1);
/// let ratios = pyramid_ratios(source.rng(), 6);
/// let noise = NoiseSource::<Flex>::sample(&mut source, [2, 4, 32, 48], &device)?;
/// let noise = pyramid_noise(noise, 0.3, &ratios, &mut source)?;
/// let std: f32 = noise.flatten::<1>(0, 3).var(0).sqrt().into_scalar();
/// assert!((std - 1.0).abs() < 1e-4);
/// # Ok::<(), sd_sched::SchedError>(())
/// ```
pub fn pyramid_noise<B: Backend>(noise: Tensor<B, 4>, discount: f64, ratios: &[f64], source: &mut dyn NoiseSource<B>) -> Result<Tensor<B, 4>> {
    if !(discount.is_finite() && discount > 0.0) {
        return Err(SchedError::InvalidArgument {
            name: "discount",
            reason: format!("must be a positive finite number, got {discount}"),
        });
    }
    if let Some(r) = ratios.iter().find(|r| !(r.is_finite() && **r >= 1.0)) {
        return Err(SchedError::InvalidArgument {
            name: "ratios",
            reason: format!("each must be a finite number of at least 1, got {r}"),
        });
    }
    let [b, c, h, w] = noise.dims();
    let device = noise.device();
    let mut sum = noise;
    for (i, r) in ratios.iter().enumerate() {
        let scale = r.powi(i as i32);
        let (hn, wn) = (((h as f64 / scale) as usize).max(1), ((w as f64 / scale) as usize).max(1));
        let level = source.sample([b, c, hn, wn], &device)?;
        let options = burn::tensor::ops::InterpolateOptions { mode: burn::tensor::ops::InterpolateMode::Bilinear, align_corners: false };
        let up = burn::tensor::module::interpolate(level, [h, w], options);
        sum = sum + up.mul_scalar(discount.powi(i as i32) as f32);
        if hn == 1 || wn == 1 {
            break;
        }
    }
    let n = b * c * h * w;
    let std = sum.clone().reshape([n]).var(0).sqrt();
    Ok(sum.div(std.reshape([1, 1, 1, 1]).expand([b, c, h, w])))
}

/// The most levels [`pyramid_noise`] is worth asking for: each level is at most half its
/// predecessor's size (ratios of at least 2), so past about 17 levels every latent size
/// has reached one row and the rest are never drawn. kohya users set 6 to 10.
pub const MAX_PYRAMID_LEVELS: usize = 64;

/// Per-level ratios for [`pyramid_noise`] as kohya draws them: `iterations` values
/// uniform in `[2, 4)`.
pub fn pyramid_ratios(rng: &mut impl Rng, iterations: usize) -> Vec<f64> {
    (0..iterations).map(|_| 2.0 + 2.0 * rng.random::<f64>()).collect()
}

/// Seeded uniform timestep sampling over `[min, max)` (diffusers samples `[0, T)`).
/// Restricting the range trains a model on part of the noise levels only.
#[derive(Debug, Clone)]
pub struct TimestepSampler {
    min: usize,
    max: usize,
    rng: ChaCha8Rng,
}

impl TimestepSampler {
    /// Samples `min..max`, which must lie within `0..num_train_timesteps` and be non-empty.
    pub fn new(min: usize, max: usize, num_train_timesteps: usize, seed: u64) -> Result<Self> {
        if min >= max || max > num_train_timesteps {
            return Err(SchedError::InvalidArgument {
                name: "timestep range",
                reason: format!(
                    "expected min < max <= num_train_timesteps ({num_train_timesteps}), got {min}..{max}"
                ),
            });
        }
        Ok(Self {
            min,
            max,
            rng: ChaCha8Rng::seed_from_u64(seed),
        })
    }

    /// Where the sampler's stream stands, to save with a training checkpoint.
    pub fn rng_state(&self) -> crate::RngState {
        crate::RngState::of(&self.rng)
    }

    /// Continues the stream from `state` (taken with [`TimestepSampler::rng_state`]).
    pub fn set_rng_state(&mut self, state: &crate::RngState) {
        self.rng = state.restore();
    }

    /// The next `batch` timesteps on the host.
    pub fn sample_host(&mut self, batch: usize) -> Vec<i64> {
        (0..batch)
            .map(|_| self.rng.random_range(self.min..self.max) as i64)
            .collect()
    }

    /// The next `batch` timesteps as a device tensor (drawn on the host and uploaded, so
    /// the stream does not depend on the backend).
    pub fn sample<B: Backend>(&mut self, batch: usize, device: &B::Device) -> Tensor<B, 1, Int> {
        let values = self.sample_host(batch);
        Tensor::from_data(TensorData::new(values, [batch]), device)
    }
}

/// Convenience: the next batch of timesteps from `sampler` (see [`TimestepSampler`]).
pub fn sample_timesteps<B: Backend>(
    sampler: &mut TimestepSampler,
    batch: usize,
    device: &B::Device,
) -> Tensor<B, 1, Int> {
    sampler.sample(batch, device)
}
