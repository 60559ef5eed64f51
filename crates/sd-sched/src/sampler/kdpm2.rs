use burn::tensor::{backend::Backend, Tensor};

use super::euler::SigmaSteps;
use super::heun::interleave_tail;
use super::{check_index, check_order, check_step_start, unsupported, Sampler};
use crate::config::{PredictionType, SchedulerConfig};
use crate::error::Result;
use crate::noise::NoiseSource;
use crate::numerics::{round_half_even, sigma_to_t};

const KDPM2: &str = "KDPM2DiscreteScheduler";
const KDPM2_A: &str = "KDPM2AncestralDiscreteScheduler";

/// What both DPM-2 samplers check and build.
fn kdpm2_steps(config: &SchedulerConfig, name: &'static str) -> Result<SigmaSteps> {
    let steps = SigmaSteps::without_zero_snr(config, name)?;
    if config.prediction_type == PredictionType::Sample {
        // diffusers raises NotImplementedError for it.
        return Err(unsupported(name, "prediction_type", "sample"));
    }
    Ok(steps)
}

/// The spaced (or Karras) timesteps and sigmas with the final σ = 0, in f32; Karras'
/// timesteps rounded as diffusers rounds them for these samplers.
fn base_steps(steps: &SigmaSteps, n: usize, karras: bool, bounds: (Option<f64>, Option<f64>)) -> Result<(Vec<f32>, Vec<f32>)> {
    let (timesteps, sigmas) = steps.spaced_or_karras(n, karras, bounds)?;
    let timesteps = timesteps.into_iter().map(|t| if karras { round_half_even(t) } else { t } as f32).collect();
    Ok((timesteps, sigmas.into_iter().map(|s| s as f32).chain([0.0]).collect()))
}

/// `exp(lerp(ln a, ln b, ½))` in f32 as torch computes it (`b − (b − a)·½` for a weight
/// of ½): the geometric mean, 0 when either is 0.
fn log_midpoint(a: f32, b: f32) -> f32 {
    let (la, lb) = (a.ln(), b.ln());
    (lb - (lb - la) * 0.5).exp()
}

/// DPM-Solver-2 in σ-space (`KDPM2DiscreteScheduler`, k-diffusion's `sample_dpm_2`): a
/// half step to the geometric midpoint of σ, the model there, and the full step with its
/// slope. Two model evaluations per step except the last (an Euler step to σ = 0), so `n`
/// steps give `2n − 1` entries in [`Sampler::timesteps`] (the midpoints' fractional
/// timesteps between the others). Deterministic; must be stepped in order.
///
/// Honours `timestep_spacing` (default `linspace`), `steps_offset`, `use_karras_sigmas`
/// (with `sigma_min` / `sigma_max`), `prediction_type` (`epsilon`, `v_prediction`) and
/// the schedule keys; no
/// zero-terminal-SNR schedule (diffusers' class ignores `rescale_betas_zero_snr`).
#[derive(Debug, Clone)]
pub struct KDpm2Sampler<B: Backend> {
    steps: SigmaSteps,
    use_karras_sigmas: bool,
    /// `sigma_min` / `sigma_max`, which diffusers' Karras ramp honours when a config has them.
    karras_bounds: (Option<f64>, Option<f64>),
    /// The midpoints, interleaved as the sigmas are.
    sigmas_interpol: Vec<f32>,
    /// The sample the half step started from, while the full step is due.
    first: Option<Tensor<B, 4>>,
    next_step: usize,
}

impl<B: Backend> KDpm2Sampler<B> {
    /// Builds the sampler; fails on the options this crate (or diffusers' class) lacks.
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        Ok(Self {
            steps: kdpm2_steps(config, KDPM2)?,
            use_karras_sigmas: config.use_karras_sigmas,
            karras_bounds: (config.sigma_min, config.sigma_max),
            sigmas_interpol: Vec::new(),
            first: None,
            next_step: 0,
        })
    }
}

impl<B: Backend> Sampler<B> for KDpm2Sampler<B> {
    fn class_name(&self) -> &'static str {
        KDPM2
    }

    fn order(&self) -> usize {
        2
    }

    fn set_begin_index(&mut self, step_index: usize) -> Result<()> {
        check_step_start(KDPM2, self.steps.timesteps.len(), step_index, 2)?;
        (self.first, self.next_step) = (None, step_index);
        Ok(())
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let (timesteps, sigmas) = base_steps(&self.steps, n, self.use_karras_sigmas, self.karras_bounds)?;
        // Midpoint j lies between σⱼ₋₁ and σⱼ (diffusers' `roll(1)`; the first is unused).
        let interpol: Vec<f32> = (0..=n).map(|j| if j == 0 { f32::NAN } else { log_midpoint(sigmas[j], sigmas[j - 1]) }).collect();
        let log_sigmas = self.steps.log_sigmas();
        let mut all = vec![timesteps[0]];
        for j in 1..n {
            all.extend([sigma_to_t(interpol[j] as f64, &log_sigmas) as f32, timesteps[j]]);
        }
        self.steps.sigmas = interleave_tail(&sigmas).into_iter().chain([0.0]).collect();
        self.sigmas_interpol = interleave_tail(&interpol).into_iter().chain([interpol[n]]).collect();
        self.steps.timesteps = all;
        (self.first, self.next_step) = (None, 0);
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
        check_index(self.steps.timesteps.len(), step_index)?;
        // Even entries start a step, odd ones are its midpoint call.
        let sigma = match step_index % 2 {
            0 => self.steps.sigmas[step_index],
            _ => self.sigmas_interpol[step_index],
        };
        Ok(SigmaSteps::scale_at(sample, sigma))
    }

    fn step(
        &mut self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
        _noise: &mut dyn NoiseSource<B>,
    ) -> Result<Tensor<B, 4>> {
        check_index(self.steps.timesteps.len(), step_index)?;
        check_order(KDPM2, self.next_step, step_index)?;
        self.next_step += 1;
        let (sigmas, interpol) = (&self.steps.sigmas, &self.sigmas_interpol);
        match self.first.take() {
            None => {
                let (sigma, sigma_interpol) = (sigmas[step_index], interpol[step_index + 1]);
                let x0 = self.steps.x0(model_output, &sample, sigma);
                let derivative = (sample.clone() - x0).div_scalar(sigma);
                let next = sample.clone() + derivative.mul_scalar(sigma_interpol - sigma);
                self.first = Some(sample);
                Ok(next)
            }
            Some(first_sample) => {
                let (sigma, sigma_interpol, sigma_next) = (sigmas[step_index - 1], interpol[step_index], sigmas[step_index]);
                let x0 = self.steps.x0(model_output, &sample, sigma_interpol);
                let derivative = (sample - x0).div_scalar(sigma_interpol);
                Ok(first_sample + derivative.mul_scalar(sigma_next - sigma))
            }
        }
    }
}

/// Ancestral DPM-Solver-2 (`KDPM2AncestralDiscreteScheduler`, k-diffusion's
/// `sample_dpm_2_ancestral`, "DPM2 a"): as [`KDpm2Sampler`], with the full step going down
/// to σ_down and fresh noise of scale σ_up added after it (one draw per full step).
///
/// Honours `timestep_spacing` (default `linspace`), `steps_offset`, `use_karras_sigmas`
/// (with `sigma_min` / `sigma_max`), `prediction_type` (`epsilon`, `v_prediction`) and
/// the schedule keys; no
/// zero-terminal-SNR schedule.
#[derive(Debug, Clone)]
pub struct KDpm2AncestralSampler<B: Backend> {
    steps: SigmaSteps,
    use_karras_sigmas: bool,
    /// `sigma_min` / `sigma_max`, which diffusers' Karras ramp honours when a config has them.
    karras_bounds: (Option<f64>, Option<f64>),
    sigmas_interpol: Vec<f32>,
    sigmas_up: Vec<f32>,
    sigmas_down: Vec<f32>,
    first: Option<Tensor<B, 4>>,
    next_step: usize,
}

impl<B: Backend> KDpm2AncestralSampler<B> {
    /// Builds the sampler; fails on the options this crate (or diffusers' class) lacks.
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        Ok(Self {
            steps: kdpm2_steps(config, KDPM2_A)?,
            use_karras_sigmas: config.use_karras_sigmas,
            karras_bounds: (config.sigma_min, config.sigma_max),
            sigmas_interpol: Vec::new(),
            sigmas_up: Vec::new(),
            sigmas_down: Vec::new(),
            first: None,
            next_step: 0,
        })
    }
}

impl<B: Backend> Sampler<B> for KDpm2AncestralSampler<B> {
    fn class_name(&self) -> &'static str {
        KDPM2_A
    }

    fn order(&self) -> usize {
        2
    }

    fn set_begin_index(&mut self, step_index: usize) -> Result<()> {
        check_step_start(KDPM2_A, self.steps.timesteps.len(), step_index, 2)?;
        (self.first, self.next_step) = (None, step_index);
        Ok(())
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let (timesteps, sigmas) = base_steps(&self.steps, n, self.use_karras_sigmas, self.karras_bounds)?;
        // σ_up and σ_down of the step from σⱼ to σⱼ₊₁ (f32, as diffusers' tensors).
        let next = |j: usize| if j < n { sigmas[j + 1] } else { 0.0 };
        let up: Vec<f32> = (0..=n).map(|j| (next(j).powi(2) * (sigmas[j].powi(2) - next(j).powi(2)) / sigmas[j].powi(2)).sqrt()).collect();
        let down: Vec<f32> = (0..=n).map(|j| if j == n { 0.0 } else { (next(j).powi(2) - up[j].powi(2)).sqrt() }).collect();
        let interpol: Vec<f32> = (0..=n).map(|j| if j + 2 > n { 0.0 } else { log_midpoint(sigmas[j], down[j]) }).collect();
        let log_sigmas = self.steps.log_sigmas();
        let mut all = vec![timesteps[0]];
        for j in 1..n {
            all.extend([sigma_to_t(interpol[j - 1] as f64, &log_sigmas) as f32, timesteps[j]]);
        }
        let spread = |v: &[f32]| interleave_tail(v).into_iter().chain([v[n]]).collect::<Vec<f32>>();
        (self.steps.sigmas, self.sigmas_interpol) = (spread(&sigmas), spread(&interpol));
        (self.sigmas_up, self.sigmas_down) = (spread(&up), spread(&down));
        self.steps.timesteps = all;
        (self.first, self.next_step) = (None, 0);
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
        check_index(self.steps.timesteps.len(), step_index)?;
        let sigma = match step_index % 2 {
            0 => self.steps.sigmas[step_index],
            _ => self.sigmas_interpol[step_index - 1],
        };
        Ok(SigmaSteps::scale_at(sample, sigma))
    }

    fn step(
        &mut self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
        noise: &mut dyn NoiseSource<B>,
    ) -> Result<Tensor<B, 4>> {
        check_index(self.steps.timesteps.len(), step_index)?;
        check_order(KDPM2_A, self.next_step, step_index)?;
        self.next_step += 1;
        let sigmas = &self.steps.sigmas;
        match self.first.take() {
            None => {
                let (sigma, sigma_interpol) = (sigmas[step_index], self.sigmas_interpol[step_index]);
                let x0 = self.steps.x0(model_output, &sample, sigma);
                let derivative = (sample.clone() - x0).div_scalar(sigma);
                let next = sample.clone() + derivative.mul_scalar(sigma_interpol - sigma);
                self.first = Some(sample);
                Ok(next)
            }
            Some(first_sample) => {
                let i = step_index - 1;
                let (sigma, sigma_interpol) = (sigmas[i], self.sigmas_interpol[i]);
                let (sigma_up, sigma_down) = (self.sigmas_up[i], self.sigmas_down[i]);
                let x0 = self.steps.x0(model_output, &sample, sigma_interpol);
                let derivative = (sample - x0).div_scalar(sigma_interpol);
                let next = first_sample + derivative.mul_scalar(sigma_down - sigma);
                let z = noise.sample(next.dims(), &next.device())?;
                Ok(next + z.mul_scalar(sigma_up))
            }
        }
    }
}
