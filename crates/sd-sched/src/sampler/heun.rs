use burn::tensor::{backend::Backend, Tensor};

use super::euler::SigmaSteps;
use super::{check_index, check_order, check_step_start, Sampler};
use crate::config::SchedulerConfig;
use crate::error::Result;
use crate::noise::NoiseSource;

const HEUN: &str = "HeunDiscreteScheduler";

/// Heun's method in σ-space (`HeunDiscreteScheduler`; Karras et al. 2022, algorithm 1
/// without churn): an Euler step, then the model again at its end and the mean of the
/// two slopes. Two model evaluations per step except the last (an Euler step to σ = 0),
/// so `n` steps give `2n − 1` entries in [`Sampler::timesteps`], each but the first
/// timestep twice. Deterministic; must be stepped in order.
///
/// Honours `timestep_spacing` (default `linspace`), `steps_offset`, `use_karras_sigmas`
/// (with `sigma_min` / `sigma_max`), `prediction_type`, `clip_sample` /
/// `clip_sample_range` and the schedule keys.
/// diffusers' class has no zero-terminal-SNR schedule (it ignores
/// `rescale_betas_zero_snr`); it is an error here.
#[derive(Debug, Clone)]
pub struct HeunSampler<B: Backend> {
    steps: SigmaSteps,
    use_karras_sigmas: bool,
    /// `sigma_min` / `sigma_max`, which diffusers' Karras ramp honours when a config has them.
    karras_bounds: (Option<f64>, Option<f64>),
    clip: Option<f32>,
    /// The first half's slope, step size and sample, while the second half is due.
    first: Option<(Tensor<B, 4>, f32, Tensor<B, 4>)>,
    next_step: usize,
}

impl<B: Backend> HeunSampler<B> {
    /// Builds the sampler; fails on the options this crate (or diffusers' class) lacks.
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        Ok(Self {
            steps: SigmaSteps::without_zero_snr(config, HEUN)?,
            use_karras_sigmas: config.use_karras_sigmas,
            karras_bounds: (config.sigma_min, config.sigma_max),
            clip: config.clip_sample.unwrap_or(false).then_some(config.clip_sample_range as f32),
            first: None,
            next_step: 0,
        })
    }
}

impl<B: Backend> Sampler<B> for HeunSampler<B> {
    fn class_name(&self) -> &'static str {
        HEUN
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let (timesteps, sigmas) = self.steps.spaced_or_karras(n, self.use_karras_sigmas, self.karras_bounds)?;
        let sigmas: Vec<f32> = sigmas.into_iter().map(|s| s as f32).chain([0.0]).collect();
        let timesteps: Vec<f32> = timesteps.into_iter().map(|t| t as f32).collect();
        // Every σ but the first and the final 0 twice, every timestep but the first twice.
        self.steps.sigmas = interleave_tail(&sigmas[..n]).into_iter().chain([0.0]).collect();
        self.steps.timesteps = interleave_tail(&timesteps);
        (self.first, self.next_step) = (None, 0);
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        &self.steps.timesteps
    }

    fn order(&self) -> usize {
        2
    }

    fn set_begin_index(&mut self, step_index: usize) -> Result<()> {
        check_step_start(HEUN, self.steps.timesteps.len(), step_index, 2)?;
        (self.first, self.next_step) = (None, step_index);
        Ok(())
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
        check_order(HEUN, self.next_step, step_index)?;
        self.next_step += 1;
        let sigmas = &self.steps.sigmas;
        let clip = |x0: Tensor<B, 4>| match self.clip {
            Some(range) => x0.clamp(-range, range),
            None => x0,
        };
        match self.first.take() {
            None => {
                let (sigma, sigma_next) = (sigmas[step_index], sigmas[step_index + 1]);
                let x0 = clip(self.steps.x0(model_output, &sample, sigma));
                let derivative = (sample.clone() - x0).div_scalar(sigma);
                let dt = sigma_next - sigma;
                let next = sample.clone() + derivative.clone().mul_scalar(dt);
                self.first = Some((derivative, dt, sample));
                Ok(next)
            }
            Some((first_derivative, dt, first_sample)) => {
                let sigma_next = sigmas[step_index];
                let x0 = clip(self.steps.x0(model_output, &sample, sigma_next));
                let derivative = (sample - x0).div_scalar(sigma_next);
                let derivative = (first_derivative + derivative).div_scalar(2.0);
                Ok(first_sample + derivative.mul_scalar(dt))
            }
        }
    }
}

/// `[v₀, v₁, v₁, v₂, v₂, …]`: diffusers' `cat([v[:1], v[1:].repeat_interleave(2)])`.
pub(super) fn interleave_tail(values: &[f32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(2 * values.len());
    out.extend(values.first());
    for &v in values.iter().skip(1) {
        out.extend([v, v]);
    }
    out
}
