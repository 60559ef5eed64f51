use burn::tensor::{backend::Backend, Tensor};

use super::{check_index, check_steps, reject_common, spacing, unsupported, Sampler};
use crate::config::{
    FinalSigmasType, InterpolationType, PredictionType, SchedulerConfig, TimestepSpacing,
    TimestepType,
};
use crate::error::Result;
use crate::noise::NoiseSource;
use crate::numerics::{checked_karras_sigmas, np_interp_index, sigma_to_t, sigmas_from_alphas_cumprod};
use crate::schedule::NoiseSchedule;

const EULER: &str = "EulerDiscreteScheduler";
const EULER_A: &str = "EulerAncestralDiscreteScheduler";

/// What the σ-space samplers share (Euler, Heun, KDPM2): timesteps and sigmas built from
/// the schedule.
#[derive(Debug, Clone)]
pub(super) struct SigmaSteps {
    pub(super) train_sigmas: Vec<f32>,
    spacing: TimestepSpacing,
    steps_offset: usize,
    pub(super) prediction: PredictionType,
    pub(super) timesteps: Vec<f32>,
    pub(super) sigmas: Vec<f32>,
}

impl SigmaSteps {
    pub(super) fn new(config: &SchedulerConfig) -> Result<Self> {
        let schedule = NoiseSchedule::new(config)?;
        Ok(Self {
            train_sigmas: sigmas_from_alphas_cumprod(&schedule.alphas_cumprod_sigma_safe()),
            spacing: config.timestep_spacing.unwrap_or(TimestepSpacing::Linspace),
            steps_offset: config.steps_offset,
            prediction: config.prediction_type,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
        })
    }

    /// Timesteps of the spacing and the training sigmas interpolated at them (f64).
    pub(super) fn spaced(&self, n: usize) -> Result<(Vec<f64>, Vec<f64>)> {
        let t = self.train_sigmas.len();
        check_steps(n, t)?;
        let timesteps: Vec<f64> = spacing::standard(self.spacing, t, n, self.steps_offset, false)
            .into_iter()
            .map(|v| v as f32 as f64)
            .collect();
        let sigmas = timesteps
            .iter()
            .map(|&ts| np_interp_index(ts, &self.train_sigmas))
            .collect();
        Ok((timesteps, sigmas))
    }

    pub(super) fn init_noise_sigma(&self) -> f32 {
        let max = self.sigmas.iter().copied().fold(0f32, f32::max);
        match self.spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
            TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
        }
    }

    pub(super) fn scale<B: Backend>(&self, sample: Tensor<B, 4>, i: usize) -> Result<Tensor<B, 4>> {
        check_index(self.timesteps.len(), i)?;
        Ok(Self::scale_at(sample, self.sigmas[i]))
    }

    /// The model's input at noise level `sigma`: `sample / sqrt(σ² + 1)`.
    pub(super) fn scale_at<B: Backend>(sample: Tensor<B, 4>, sigma: f32) -> Tensor<B, 4> {
        sample.div_scalar((sigma * sigma + 1.0).sqrt())
    }

    /// The spaced timesteps and sigmas, or Karras' sigmas between `(σ_min, σ_max)` (the
    /// spaced ones' ends where `None`) with their fractional timesteps (diffusers'
    /// `_convert_to_karras` and `_sigma_to_t`).
    pub(super) fn spaced_or_karras(&self, n: usize, karras: bool, (lo, hi): (Option<f64>, Option<f64>)) -> Result<(Vec<f64>, Vec<f64>)> {
        let (timesteps, sigmas) = self.spaced(n)?;
        if !karras {
            return Ok((timesteps, sigmas));
        }
        let sigmas = checked_karras_sigmas((lo, hi), (sigmas[n - 1], sigmas[0]), n)?;
        let log_sigmas = self.log_sigmas();
        let timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &log_sigmas)).collect();
        Ok((timesteps, sigmas))
    }

    /// `ln σ` of the training sigmas, in f32 as numpy takes the log of an f32 array.
    pub(super) fn log_sigmas(&self) -> Vec<f32> {
        self.train_sigmas.iter().map(|s| s.ln()).collect()
    }

    /// x̂₀ from the model output at noise level `sigma`.
    pub(super) fn x0<B: Backend>(
        &self,
        model_output: Tensor<B, 4>,
        sample: &Tensor<B, 4>,
        sigma: f32,
    ) -> Tensor<B, 4> {
        match self.prediction {
            PredictionType::Epsilon => sample.clone() - model_output.mul_scalar(sigma),
            PredictionType::Sample => model_output,
            PredictionType::VPrediction => {
                let s2 = sigma * sigma + 1.0;
                model_output.mul_scalar(-sigma / s2.sqrt()) + sample.clone().div_scalar(s2)
            }
        }
    }
}

/// Euler's method in σ-space (`EulerDiscreteScheduler`; Karras et al. 2022, algorithm 2
/// without churn). Deterministic.
///
/// Honours `timestep_spacing` (default `linspace`), `steps_offset`, `use_karras_sigmas`,
/// `sigma_min`, `sigma_max`, `final_sigmas_type`, `prediction_type` and the schedule keys
/// (with ᾱ of a zero-terminal-SNR schedule floored at 2⁻²⁴ as in diffusers).
#[derive(Debug, Clone)]
pub struct EulerSampler {
    steps: SigmaSteps,
    use_karras_sigmas: bool,
    sigma_min: Option<f64>,
    sigma_max: Option<f64>,
    final_sigmas_type: FinalSigmasType,
}

impl EulerSampler {
    /// Builds the sampler; fails on the sigma spacings this crate does not implement.
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        reject_common(config, EULER)?;
        reject_sigma_spacings(config, EULER)?;
        if config.interpolation_type != InterpolationType::Linear {
            return Err(unsupported(
                EULER,
                "interpolation_type",
                config.interpolation_type,
            ));
        }
        if config.timestep_type != TimestepType::Discrete {
            return Err(unsupported(EULER, "timestep_type", config.timestep_type));
        }
        Ok(Self {
            steps: SigmaSteps::new(config)?,
            use_karras_sigmas: config.use_karras_sigmas,
            sigma_min: config.sigma_min,
            sigma_max: config.sigma_max,
            final_sigmas_type: config.final_sigmas_type,
        })
    }
}

impl<B: Backend> Sampler<B> for EulerSampler {
    fn class_name(&self) -> &'static str {
        EULER
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let (mut timesteps, mut sigmas) = self.steps.spaced(n)?;
        if self.use_karras_sigmas {
            // diffusers ramps between the ends of the *interpolated* sigmas here.
            sigmas = checked_karras_sigmas((self.sigma_min, self.sigma_max), (sigmas[n - 1], sigmas[0]), n)?;
            let log_sigmas: Vec<f32> = self.steps.train_sigmas.iter().map(|s| s.ln()).collect();
            timesteps = sigmas.iter().map(|&s| sigma_to_t(s, &log_sigmas)).collect();
        }
        let last = match self.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => self.steps.train_sigmas[0] as f64,
        };
        sigmas.push(last);
        self.steps.sigmas = sigmas.into_iter().map(|s| s as f32).collect();
        self.steps.timesteps = timesteps.into_iter().map(|t| t as f32).collect();
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
        let sigma = self.steps.sigmas[step_index];
        let x0 = self.steps.x0(model_output, &sample, sigma);
        let derivative = (sample.clone() - x0).div_scalar(sigma);
        let dt = self.steps.sigmas[step_index + 1] - sigma;
        Ok(sample + derivative.mul_scalar(dt))
    }
}

/// Euler ancestral (`EulerAncestralDiscreteScheduler`, "Euler a"): an Euler step down to
/// σ_down followed by fresh noise of scale σ_up, drawn on every step.
///
/// Honours `timestep_spacing` (default `linspace`), `steps_offset`, `prediction_type`
/// (`epsilon`, `v_prediction`) and the schedule keys.
#[derive(Debug, Clone)]
pub struct EulerAncestralSampler {
    steps: SigmaSteps,
}

impl EulerAncestralSampler {
    /// Builds the sampler; fails on `sample` prediction, which diffusers does not
    /// implement for it either.
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        reject_common(config, EULER_A)?;
        if config.prediction_type == PredictionType::Sample {
            return Err(unsupported(EULER_A, "prediction_type", "sample"));
        }
        Ok(Self {
            steps: SigmaSteps::new(config)?,
        })
    }
}

impl<B: Backend> Sampler<B> for EulerAncestralSampler {
    fn class_name(&self) -> &'static str {
        EULER_A
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let (timesteps, sigmas) = self.steps.spaced(n)?;
        self.steps.sigmas = sigmas.into_iter().map(|s| s as f32).chain([0.0]).collect();
        self.steps.timesteps = timesteps.into_iter().map(|t| t as f32).collect();
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
        noise: &mut dyn NoiseSource<B>,
    ) -> Result<Tensor<B, 4>> {
        check_index(self.steps.timesteps.len(), step_index)?;
        let sigma_from = self.steps.sigmas[step_index];
        let sigma_to = self.steps.sigmas[step_index + 1];
        let x0 = self.steps.x0(model_output, &sample, sigma_from);
        let (from2, to2) = (sigma_from * sigma_from, sigma_to * sigma_to);
        let sigma_up = (to2 * (from2 - to2) / from2).sqrt();
        let sigma_down = (to2 - sigma_up * sigma_up).sqrt();
        let derivative = (sample.clone() - x0).div_scalar(sigma_from);
        let prev = sample.clone() + derivative.mul_scalar(sigma_down - sigma_from);
        let z = noise.sample(sample.dims(), &sample.device())?;
        Ok(prev + z.mul_scalar(sigma_up))
    }
}

impl SigmaSteps {
    /// The steps of a σ-space sampler whose diffusers class has no zero-terminal-SNR
    /// schedule (Heun, DPM2, LMS ignore `rescale_betas_zero_snr`), after the checks every
    /// sampler makes: an error on that key instead of a silently different schedule.
    pub(super) fn without_zero_snr(config: &SchedulerConfig, sampler: &'static str) -> Result<Self> {
        reject_common(config, sampler)?;
        reject_sigma_spacings(config, sampler)?;
        if config.rescale_betas_zero_snr {
            return Err(unsupported(sampler, "rescale_betas_zero_snr", true));
        }
        Self::new(config)
    }
}

/// Sigma spacings diffusers offers that this crate does not implement.
pub(crate) fn reject_sigma_spacings(config: &SchedulerConfig, sampler: &'static str) -> Result<()> {
    for (key, on) in [
        ("use_exponential_sigmas", config.use_exponential_sigmas),
        ("use_beta_sigmas", config.use_beta_sigmas),
        ("use_lu_lambdas", config.use_lu_lambdas),
        ("use_flow_sigmas", config.use_flow_sigmas),
    ] {
        if on {
            return Err(unsupported(sampler, key, true));
        }
    }
    Ok(())
}
