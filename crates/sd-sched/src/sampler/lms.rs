use burn::tensor::{backend::Backend, Tensor};

use super::euler::SigmaSteps;
use super::{check_index, check_order, Sampler};
use crate::config::SchedulerConfig;
use crate::error::Result;
use crate::noise::NoiseSource;

const LMS: &str = "LMSDiscreteScheduler";

/// The order diffusers' pipelines step LMS with (`step`'s default).
const ORDER: usize = 4;

/// Linear multistep in σ-space (`LMSDiscreteScheduler`, k-diffusion's `sample_lms`):
/// each step integrates the Lagrange polynomial through the last four slopes (fewer at
/// the start) from σᵢ to σᵢ₊₁. diffusers integrates it numerically (scipy's `quad`);
/// the integrand is a polynomial of degree at most 3, which three-point Gauss–Legendre
/// integrates exactly. Deterministic; must be stepped in order.
///
/// Honours `timestep_spacing` (default `linspace`), `steps_offset`, `use_karras_sigmas`
/// (between the spaced sigmas' ends, whatever `sigma_min` / `sigma_max` say, as
/// diffusers' class), `prediction_type` and the schedule keys; no zero-terminal-SNR
/// schedule (diffusers' class ignores `rescale_betas_zero_snr`).
#[derive(Debug, Clone)]
pub struct LmsSampler<B: Backend> {
    steps: SigmaSteps,
    use_karras_sigmas: bool,
    /// The last slopes, oldest first.
    derivatives: Vec<Tensor<B, 4>>,
    next_step: usize,
}

impl<B: Backend> LmsSampler<B> {
    /// Builds the sampler; fails on the options this crate (or diffusers' class) lacks.
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        Ok(Self {
            steps: SigmaSteps::without_zero_snr(config, LMS)?,
            use_karras_sigmas: config.use_karras_sigmas,
            derivatives: Vec::new(),
            next_step: 0,
        })
    }

    /// ∫ from σᵢ to σᵢ₊₁ of the Lagrange basis polynomial of slope `k` (0: the newest)
    /// through the `order` newest σs (diffusers' `get_lms_coefficient`).
    fn coefficient(&self, order: usize, i: usize, k: usize) -> f64 {
        let sigma = |j: usize| f64::from(self.steps.sigmas[j]);
        let basis = |tau: f64| {
            (0..order)
                .filter(|&m| m != k)
                .map(|m| (tau - sigma(i - m)) / (sigma(i - k) - sigma(i - m)))
                .product::<f64>()
        };
        // Three-point Gauss–Legendre on [σᵢ, σᵢ₊₁]: exact up to degree 5.
        let (a, b) = (sigma(i), sigma(i + 1));
        let (mid, half) = ((a + b) / 2.0, (b - a) / 2.0);
        let x = (3.0f64 / 5.0).sqrt();
        half * (5.0 / 9.0 * basis(mid - half * x) + 8.0 / 9.0 * basis(mid) + 5.0 / 9.0 * basis(mid + half * x))
    }
}

impl<B: Backend> Sampler<B> for LmsSampler<B> {
    fn class_name(&self) -> &'static str {
        LMS
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let (timesteps, sigmas) = self.steps.spaced_or_karras(n, self.use_karras_sigmas, (None, None))?;
        self.steps.sigmas = sigmas.into_iter().map(|s| s as f32).chain([0.0]).collect();
        self.steps.timesteps = timesteps.into_iter().map(|t| t as f32).collect();
        (self.derivatives, self.next_step) = (Vec::new(), 0);
        Ok(())
    }

    /// From `step_index` the order still grows with the index, not with the slopes kept
    /// (diffusers' `min(step_index + 1, 4)`): the first steps weigh their one slope with a
    /// higher-order coefficient, as there.
    fn set_begin_index(&mut self, step_index: usize) -> Result<()> {
        check_index(self.steps.timesteps.len(), step_index)?;
        (self.derivatives, self.next_step) = (Vec::new(), step_index);
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        &self.steps.timesteps
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.steps.sigmas)
    }

    fn init_noise_sigma(&self) -> f32 {
        self.steps.init_noise_sigma()
    }

    fn scale_model_input(&self, sample: Tensor<B, 4>, step_index: usize) -> Result<Tensor<B, 4>> {
        self.steps.scale(sample, step_index)
    }

    fn step(
        &mut self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
        _noise: &mut dyn NoiseSource<B>,
    ) -> Result<Tensor<B, 4>> {
        check_index(self.steps.timesteps.len(), step_index)?;
        check_order(LMS, self.next_step, step_index)?;
        self.next_step += 1;
        let sigma = self.steps.sigmas[step_index];
        let x0 = self.steps.x0(model_output, &sample, sigma);
        self.derivatives.push((sample.clone() - x0).div_scalar(sigma));
        if self.derivatives.len() > ORDER {
            self.derivatives.remove(0);
        }
        let order = (step_index + 1).min(ORDER);
        let mut update: Option<Tensor<B, 4>> = None;
        for (k, derivative) in self.derivatives.iter().rev().take(order).enumerate() {
            let term = derivative.clone().mul_scalar(self.coefficient(order, step_index, k) as f32);
            update = Some(match update {
                None => term,
                Some(sum) => sum + term,
            });
        }
        Ok(match update {
            Some(update) => sample + update,
            None => sample,
        })
    }
}
