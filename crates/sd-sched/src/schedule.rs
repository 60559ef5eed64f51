//! The forward-process noise schedule: betas and cumulative alphas.

use burn::tensor::{backend::Backend, Tensor, TensorData};

use crate::config::{BetaSchedule, PredictionType, SchedulerConfig};
use crate::error::Result;

/// The discrete forward process `q(xₜ | x₀) = N(sqrt(ᾱₜ)·x₀, (1 − ᾱₜ)·I)` over the
/// training timesteps, built exactly as diffusers builds it: betas in f32 (torch's
/// `linspace` for `linear` / `scaled_linear`, f64 maths rounded to f32 for the cosine
/// schedule), the optional zero-terminal-SNR rescale in f32, and `ᾱ` as torch's CPU
/// `cumprod` (f64 accumulator, each value rounded to f32).
///
/// ```
/// use sd_sched::{NoiseSchedule, SchedulerConfig};
///
/// let schedule = NoiseSchedule::new(&SchedulerConfig::sd15()).unwrap();
/// assert_eq!(schedule.num_train_timesteps(), 1000);
/// assert!((schedule.betas()[0] - 0.00085).abs() < 1e-9);
/// assert!(schedule.snr(0) > schedule.snr(999));
///
/// let zsnr = NoiseSchedule::new(&SchedulerConfig::zero_terminal_snr_v()).unwrap();
/// assert_eq!(zsnr.alphas_cumprod()[999], 0.0); // pure noise at the last timestep
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct NoiseSchedule {
    betas: Vec<f32>,
    alphas_cumprod: Vec<f32>,
    prediction_type: PredictionType,
}

impl NoiseSchedule {
    /// Builds the schedule of `config` (which is validated first).
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        config.validate()?;
        let (betas, alphas_cumprod) = betas_and_alphas_cumprod(config);
        Ok(Self {
            betas,
            alphas_cumprod,
            prediction_type: config.prediction_type,
        })
    }

    /// ᾱ of `config` as [`NoiseSchedule::new`] builds it, without validating the values
    /// (for [`SchedulerConfig::validate`]'s own checks; expects the counts checked).
    pub(crate) fn alphas_cumprod_of(config: &SchedulerConfig) -> Vec<f32> {
        betas_and_alphas_cumprod(config).1
    }

    /// Number of training timesteps `T`.
    pub fn num_train_timesteps(&self) -> usize {
        self.betas.len()
    }

    /// βₜ for `t` in `0..T`.
    pub fn betas(&self) -> &[f32] {
        &self.betas
    }

    /// ᾱₜ = ∏ₛ≤ₜ (1 − βₛ) for `t` in `0..T`.
    pub fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }

    /// What the model trained on this schedule predicts.
    pub fn prediction_type(&self) -> PredictionType {
        self.prediction_type
    }

    /// Signal-to-noise ratio ᾱₜ / (1 − ᾱₜ) at training timestep `t`, in f64.
    ///
    /// # Panics
    /// If `t >= T`.
    pub fn snr(&self, t: usize) -> f64 {
        let a = self.alphas_cumprod[t] as f64;
        a / (1.0 - a)
    }

    /// ᾱ as a device tensor of shape `[T]`, for the batched training helpers.
    pub fn alphas_cumprod_tensor<B: Backend>(&self, device: &B::Device) -> Tensor<B, 1> {
        let n = self.alphas_cumprod.len();
        Tensor::from_data(TensorData::new(self.alphas_cumprod.clone(), [n]), device)
    }

    /// ᾱ with the last value raised to 2⁻²⁴ when it is 0 (zero terminal SNR), as the
    /// sigma-based diffusers samplers do so their first sigma stays finite.
    pub(crate) fn alphas_cumprod_sigma_safe(&self) -> Vec<f32> {
        let mut a = self.alphas_cumprod.clone();
        if let Some(last) = a.last_mut() && *last == 0.0 {
            *last = 2f32.powi(-24);
        }
        a
    }
}

/// The betas of `config` (after the optional zero-terminal-SNR rescale) and their ᾱ.
fn betas_and_alphas_cumprod(config: &SchedulerConfig) -> (Vec<f32>, Vec<f32>) {
    let mut betas = betas(config);
    if config.rescale_betas_zero_snr {
        betas = rescale_zero_terminal_snr(&betas);
    }
    let alphas_cumprod = cumprod(betas.iter().map(|b| 1.0 - b));
    (betas, alphas_cumprod)
}

/// The betas of `config` before any zero-terminal-SNR rescale, in f32 as diffusers
/// builds them.
fn betas(config: &SchedulerConfig) -> Vec<f32> {
    let t = config.num_train_timesteps;
    match &config.trained_betas {
        Some(b) => b.iter().map(|&b| b as f32).collect(),
        None => match config.beta_schedule {
            BetaSchedule::Linear => {
                crate::numerics::torch_linspace_f32(config.beta_start, config.beta_end, t)
            }
            BetaSchedule::ScaledLinear => crate::numerics::torch_linspace_f32(
                config.beta_start.sqrt(),
                config.beta_end.sqrt(),
                t,
            )
            .into_iter()
            .map(|b| b * b)
            .collect(),
            BetaSchedule::SquaredCosCapV2 => cosine_betas(t),
        },
    }
}

/// β₀ of `config` exactly as [`NoiseSchedule::new`] computes it (the zero-SNR rescale
/// keeps ᾱ₀, so it does not change β₀), for [`SchedulerConfig::validate`]. Expects the
/// counts and ranges already validated.
pub(crate) fn first_beta(config: &SchedulerConfig) -> f32 {
    // The linspace's first point is its start, so only the cosine schedule needs maths.
    match (&config.trained_betas, config.beta_schedule) {
        (Some(b), _) => b[0] as f32,
        (None, BetaSchedule::Linear) => config.beta_start as f32,
        (None, BetaSchedule::ScaledLinear) => {
            let b = config.beta_start.sqrt() as f32;
            b * b
        }
        (None, BetaSchedule::SquaredCosCapV2) => cosine_beta(0, config.num_train_timesteps),
    }
}

/// torch's CPU cumprod: the running product is kept in f64, each output rounded to f32.
fn cumprod(values: impl Iterator<Item = f32>) -> Vec<f32> {
    let mut acc = 1f64;
    values
        .map(|v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

/// diffusers' `betas_for_alpha_bar` with the cosine transform, in f64, capped at 0.999.
fn cosine_betas(t: usize) -> Vec<f32> {
    (0..t).map(|i| cosine_beta(i, t)).collect()
}

/// The `i`-th of [`cosine_betas`].
fn cosine_beta(i: usize, t: usize) -> f32 {
    let alpha_bar = |x: f64| {
        ((x + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
            .cos()
            .powi(2)
    };
    let t1 = i as f64 / t as f64;
    let t2 = (i + 1) as f64 / t as f64;
    (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
}

/// Lin et al. (2023), algorithm 1: shift and scale sqrt(ᾱ) so the last timestep has zero
/// SNR while the first keeps its value. Mirrors diffusers' f32 torch ops.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas_cumprod = cumprod(betas.iter().map(|b| 1.0 - b));
    let mut sqrt_ab: Vec<f32> = alphas_cumprod.iter().map(|a| a.sqrt()).collect();
    let first = sqrt_ab[0];
    let last = sqrt_ab[sqrt_ab.len() - 1];
    let scale = first / (first - last);
    for v in &mut sqrt_ab {
        *v -= last;
        *v *= scale;
    }
    let ab: Vec<f32> = sqrt_ab.iter().map(|v| v * v).collect();
    let mut out = Vec::with_capacity(ab.len());
    out.push(1.0 - ab[0]);
    out.extend(ab.windows(2).map(|w| 1.0 - w[1] / w[0]));
    out
}
