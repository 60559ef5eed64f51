use burn::tensor::{backend::Backend, Tensor};

use super::{check_index, check_steps, predict_x0, reject_common, spacing, unsupported, Sampler};
use crate::config::{PredictionType, SchedulerConfig, TimestepSpacing, VarianceType};
use crate::error::Result;
use crate::noise::NoiseSource;
use crate::schedule::NoiseSchedule;

const NAME: &str = "DDPMScheduler";

/// Ancestral DDPM sampling (`DDPMScheduler`): the posterior mean of `q(xₜ₋₁ | xₜ, x̂₀)`
/// plus fresh noise on every step except the one from timestep 0.
///
/// Honours `timestep_spacing` (default `leading`), `steps_offset`, `clip_sample`
/// (default `true`), `clip_sample_range`, `variance_type` (`fixed_small` — the
/// default —, `fixed_small_log`, `fixed_large`), `prediction_type` and the schedule keys.
#[derive(Debug, Clone)]
pub struct DdpmSampler {
    schedule: NoiseSchedule,
    prediction: PredictionType,
    spacing: TimestepSpacing,
    steps_offset: usize,
    clip: Option<f32>,
    variance: VarianceType,
    timesteps: Vec<f32>,
}

impl DdpmSampler {
    /// Builds the sampler; fails on the learned variance types.
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        reject_common(config, NAME)?;
        let variance = config.variance_type.unwrap_or(VarianceType::FixedSmall);
        if !matches!(
            variance,
            VarianceType::FixedSmall | VarianceType::FixedSmallLog | VarianceType::FixedLarge
        ) {
            return Err(unsupported(NAME, "variance_type", variance));
        }
        Ok(Self {
            schedule: NoiseSchedule::new(config)?,
            prediction: config.prediction_type,
            spacing: config.timestep_spacing.unwrap_or(TimestepSpacing::Leading),
            steps_offset: config.steps_offset,
            clip: config
                .clip_sample
                .unwrap_or(true)
                .then_some(config.clip_sample_range as f32),
            variance,
            timesteps: Vec::new(),
        })
    }

    /// Standard deviation of the noise added on the step from `t` to `prev_t`.
    fn noise_std(&self, alpha_prod_t: f32, alpha_prod_t_prev: f32) -> f32 {
        let current_beta_t = 1.0 - alpha_prod_t / alpha_prod_t_prev;
        let variance =
            ((1.0 - alpha_prod_t_prev) / (1.0 - alpha_prod_t) * current_beta_t).max(1e-20);
        match self.variance {
            VarianceType::FixedSmallLog => (0.5 * variance.ln()).exp(),
            VarianceType::FixedLarge => current_beta_t.sqrt(),
            _ => variance.sqrt(),
        }
    }
}

impl<B: Backend> Sampler<B> for DdpmSampler {
    fn class_name(&self) -> &'static str {
        NAME
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let t = self.schedule.num_train_timesteps();
        check_steps(n, t)?;
        let timesteps = spacing::standard(self.spacing, t, n, self.steps_offset, true);
        super::check_fit(timesteps.iter().copied(), n, t, self.steps_offset)?;
        self.timesteps = timesteps.into_iter().map(|v| v as f32).collect();
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn add_noise(&self, original: Tensor<B, 4>, noise: Tensor<B, 4>, step_index: usize) -> Result<Tensor<B, 4>> {
        check_index(self.timesteps.len(), step_index)?;
        super::add_noise_alpha(original, noise, self.schedule.alphas_cumprod(), self.timesteps[step_index])
    }

    fn step(
        &mut self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
        noise: &mut dyn NoiseSource<B>,
    ) -> Result<Tensor<B, 4>> {
        check_index(self.timesteps.len(), step_index)?;
        let ac = self.schedule.alphas_cumprod();
        let t = self.timesteps[step_index] as usize;
        let alpha_prod_t = ac[t];
        let alpha_prod_t_prev = match self.timesteps.get(step_index + 1) {
            Some(&prev) => ac[prev as usize],
            None => 1.0,
        };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let current_alpha_t = alpha_prod_t / alpha_prod_t_prev;
        let current_beta_t = 1.0 - current_alpha_t;

        let mut x0 = predict_x0(self.prediction, alpha_prod_t, model_output, &sample);
        if let Some(r) = self.clip {
            x0 = x0.clamp(-r, r);
        }
        let x0_coeff = alpha_prod_t_prev.sqrt() * current_beta_t / beta_prod_t;
        let sample_coeff = current_alpha_t.sqrt() * beta_prod_t_prev / beta_prod_t;
        let prev = x0.mul_scalar(x0_coeff) + sample.clone().mul_scalar(sample_coeff);
        if t == 0 {
            return Ok(prev);
        }
        let z = noise.sample(sample.dims(), &sample.device())?;
        Ok(prev + z.mul_scalar(self.noise_std(alpha_prod_t, alpha_prod_t_prev)))
    }
}
