use burn::tensor::{backend::Backend, Tensor};

use super::{check_index, check_steps, ddim_x0_eps, reject_common, spacing, Sampler};
use crate::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use crate::error::{Result, SchedError};
use crate::noise::NoiseSource;
use crate::schedule::NoiseSchedule;

const NAME: &str = "DDIMScheduler";

/// DDIM (`DDIMScheduler`): deterministic for η = 0, adding `η·σₜ` of fresh noise per
/// step otherwise.
///
/// Honours `timestep_spacing` (default `leading`), `steps_offset`, `clip_sample`
/// (default `true`), `clip_sample_range`, `set_alpha_to_one` (default `true`),
/// `prediction_type` and the schedule keys. Like diffusers, the previous timestep is
/// always `t − T // n`, whatever the spacing.
#[derive(Debug, Clone)]
pub struct DdimSampler {
    schedule: NoiseSchedule,
    prediction: PredictionType,
    spacing: TimestepSpacing,
    steps_offset: usize,
    clip: Option<f32>,
    final_alpha_cumprod: f32,
    eta: f32,
    num_inference_steps: usize,
    timesteps: Vec<f32>,
}

impl DdimSampler {
    /// A DDIM sampler with stochasticity `eta` (0 for plain DDIM).
    pub fn new(config: &SchedulerConfig, eta: f64) -> Result<Self> {
        reject_common(config, NAME)?;
        if !(eta.is_finite() && eta >= 0.0) {
            return Err(SchedError::InvalidArgument {
                name: "eta",
                reason: format!("must be a finite number >= 0, got {eta}"),
            });
        }
        let schedule = NoiseSchedule::new(config)?;
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            schedule.alphas_cumprod()[0]
        };
        Ok(Self {
            prediction: config.prediction_type,
            spacing: config.timestep_spacing.unwrap_or(TimestepSpacing::Leading),
            steps_offset: config.steps_offset,
            clip: config
                .clip_sample
                .unwrap_or(true)
                .then_some(config.clip_sample_range as f32),
            final_alpha_cumprod,
            eta: eta as f32,
            num_inference_steps: 0,
            timesteps: Vec::new(),
            schedule,
        })
    }

    /// The η this sampler was built with.
    pub fn eta(&self) -> f64 {
        self.eta as f64
    }
}

impl<B: Backend> Sampler<B> for DdimSampler {
    fn class_name(&self) -> &'static str {
        NAME
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let t = self.schedule.num_train_timesteps();
        check_steps(n, t)?;
        let timesteps = spacing::standard(self.spacing, t, n, self.steps_offset, true);
        super::check_fit(timesteps.iter().copied(), n, t, self.steps_offset)?;
        self.num_inference_steps = n;
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
        let prev =
            t as i64 - (self.schedule.num_train_timesteps() / self.num_inference_steps) as i64;
        let alpha_prod_t = ac[t];
        let alpha_prod_t_prev = if prev >= 0 {
            ac[prev as usize]
        } else {
            self.final_alpha_cumprod
        };
        let beta_prod_t = 1.0 - alpha_prod_t;

        let (mut x0, eps) = ddim_x0_eps(self.prediction, alpha_prod_t, model_output, &sample);
        if let Some(r) = self.clip {
            x0 = x0.clamp(-r, r);
        }
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let variance = beta_prod_t_prev / beta_prod_t * (1.0 - alpha_prod_t / alpha_prod_t_prev);
        let std_dev_t = self.eta * variance.sqrt();
        let direction = (1.0 - alpha_prod_t_prev - std_dev_t * std_dev_t).sqrt();
        let prev_sample = x0.mul_scalar(alpha_prod_t_prev.sqrt()) + eps.mul_scalar(direction);
        if self.eta > 0.0 {
            let z = noise.sample(sample.dims(), &sample.device())?;
            return Ok(prev_sample + z.mul_scalar(std_dev_t));
        }
        Ok(prev_sample)
    }
}
