use burn::tensor::{backend::Backend, Tensor};

use super::euler::reject_sigma_spacings;
use super::{check_index, check_steps, reject_common, unsupported, Sampler};
use crate::config::{
    AlgorithmType, BetaSchedule, FinalSigmasType, PredictionType, SchedulerConfig, SolverType,
    TimestepSpacing,
};
use crate::error::{Result, SchedError};
use crate::noise::NoiseSource;
use crate::numerics::{
    checked_karras_sigmas, np_interp_index, np_linspace, round_half_even, sigma_to_t,
    sigmas_from_alphas_cumprod,
};
use crate::schedule::NoiseSchedule;

const NAME: &str = "DPMSolverMultistepScheduler";

/// DPM-Solver++ multistep (`DPMSolverMultistepScheduler`, Lu et al. 2022): "DPM++ 2M"
/// with `solver_order` 2, "3M" with 3, "2M SDE" with `algorithm_type` `sde-dpmsolver++`
/// (which draws fresh noise on every step), each optionally with Karras sigmas; with
/// `algorithm_type` `dpmsolver`, the original DPM-Solver (noise prediction, kohya's
/// `dpmsolver`), which as in diffusers needs `final_sigmas_type` `sigma_min`.
///
/// Honours `solver_order`, `algorithm_type` (`dpmsolver++`, `sde-dpmsolver++`, `dpmsolver`),
/// `solver_type`, `lower_order_final`, `euler_at_final`, `final_sigmas_type`,
/// `use_karras_sigmas`, `sigma_min`, `sigma_max`, `lambda_min_clipped`,
/// `timestep_spacing` (default `linspace`), `steps_offset`, `prediction_type` and the
/// schedule keys. Must be stepped in order.
#[derive(Debug, Clone)]
pub struct DpmSolverMultistepSampler<B: Backend> {
    config: SchedulerConfig,
    train_sigmas: Vec<f32>,
    lambdas: Vec<f32>,
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
    /// The last `solver_order` converted outputs (data predictions; noise predictions for
    /// `dpmsolver`), oldest first.
    model_outputs: Vec<Tensor<B, 4>>,
    lower_order_nums: usize,
    next_step: usize,
}

impl<B: Backend> DpmSolverMultistepSampler<B> {
    /// Builds the sampler; fails on the `sde-dpmsolver` algorithm, on `dpmsolver` with a
    /// final σ of zero (diffusers refuses it too: its update would be 0 · ∞) and on sigma
    /// spacings this crate does not implement.
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        reject_common(config, NAME)?;
        reject_sigma_spacings(config, NAME)?;
        check_algorithm(config, NAME)?;
        let ac = NoiseSchedule::new(config)?.alphas_cumprod_sigma_safe();
        Ok(Self {
            config: config.clone(),
            train_sigmas: sigmas_from_alphas_cumprod(&ac),
            lambdas: train_lambdas(&ac),
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            model_outputs: Vec::new(),
            lower_order_nums: 0,
            next_step: 0,
        })
    }

    /// Spaced timesteps before any Karras re-spacing (f64, descending).
    fn spaced_timesteps(&self, n: usize) -> Vec<f64> {
        let c = &self.config;
        let t = c.num_train_timesteps;
        let last = unclipped_timesteps(c, &self.lambdas);
        match c.timestep_spacing.unwrap_or(TimestepSpacing::Linspace) {
            TimestepSpacing::Linspace => linspace_timesteps(last, n),
            TimestepSpacing::Leading => {
                let ratio = last / (n + 1);
                (1..=n)
                    .rev()
                    .map(|i| (i * ratio + c.steps_offset) as f64)
                    .collect()
            }
            TimestepSpacing::Trailing => super::spacing::trailing_from(last, t, n),
        }
    }

    /// Log-SNR λ = ln α − ln σ and α, σ at step index `i`.
    fn lambda_at(&self, i: usize) -> (f32, f32, f32) {
        lambda_alpha_sigma(self.sigmas[i])
    }

    fn first_order(
        &self,
        i: usize,
        m0: Tensor<B, 4>,
        sample: Tensor<B, 4>,
        noise: Option<Tensor<B, 4>>,
    ) -> Tensor<B, 4> {
        first_order_update(self.config.algorithm_type, self.sigmas[i], self.sigmas[i + 1], m0, sample, noise)
    }

    fn second_order(
        &self,
        i: usize,
        sample: Tensor<B, 4>,
        noise: Option<Tensor<B, 4>>,
    ) -> Tensor<B, 4> {
        let k = self.model_outputs.len();
        let (m0, m1) = (
            self.model_outputs[k - 1].clone(),
            self.model_outputs[k - 2].clone(),
        );
        let (lambda_t, alpha_t, sigma_t) = self.lambda_at(i + 1);
        let (lambda_s0, _, sigma_s0) = self.lambda_at(i);
        let (lambda_s1, _, _) = self.lambda_at(i - 1);
        let (h, h_0) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1);
        let r0 = h_0 / h;
        let d1 = (m0.clone() - m1).mul_scalar(1.0 / r0);
        let d0 = m0;
        let heun = self.config.solver_type == SolverType::Heun;
        match noise {
            None => {
                let em1 = (-h).exp() - 1.0;
                let x = sample.mul_scalar(sigma_t / sigma_s0) - d0.mul_scalar(alpha_t * em1);
                if heun {
                    x + d1.mul_scalar(alpha_t * (em1 / h + 1.0))
                } else {
                    x - d1.mul_scalar(0.5 * (alpha_t * em1))
                }
            }
            Some(z) => {
                let e2h = (-2.0 * h).exp();
                let x = sample.mul_scalar(sigma_t / sigma_s0 * (-h).exp())
                    + d0.mul_scalar(alpha_t * (1.0 - e2h));
                let x = if heun {
                    x + d1.mul_scalar(alpha_t * ((1.0 - e2h) / (-2.0 * h) + 1.0))
                } else {
                    x + d1.mul_scalar(0.5 * (alpha_t * (1.0 - e2h)))
                };
                x + z.mul_scalar(sigma_t * (1.0 - e2h).sqrt())
            }
        }
    }

    fn third_order(
        &self,
        i: usize,
        sample: Tensor<B, 4>,
        noise: Option<Tensor<B, 4>>,
    ) -> Tensor<B, 4> {
        let k = self.model_outputs.len();
        let m0 = self.model_outputs[k - 1].clone();
        let m1 = self.model_outputs[k - 2].clone();
        let m2 = self.model_outputs[k - 3].clone();
        let (lambda_t, alpha_t, sigma_t) = self.lambda_at(i + 1);
        let (lambda_s0, _, sigma_s0) = self.lambda_at(i);
        let (lambda_s1, _, _) = self.lambda_at(i - 1);
        let (lambda_s2, _, _) = self.lambda_at(i - 2);
        let (h, h_0, h_1) = (
            lambda_t - lambda_s0,
            lambda_s0 - lambda_s1,
            lambda_s1 - lambda_s2,
        );
        let (r0, r1) = (h_0 / h, h_1 / h);
        let d1_0 = (m0.clone() - m1.clone()).mul_scalar(1.0 / r0);
        let d1_1 = (m1 - m2).mul_scalar(1.0 / r1);
        let diff = d1_0.clone() - d1_1;
        let d1 = d1_0 + diff.clone().mul_scalar(r0 / (r0 + r1));
        let d2 = diff.mul_scalar(1.0 / (r0 + r1));
        let d0 = m0;
        match noise {
            None => {
                let em1 = (-h).exp() - 1.0;
                sample.mul_scalar(sigma_t / sigma_s0) - d0.mul_scalar(alpha_t * em1)
                    + d1.mul_scalar(alpha_t * (em1 / h + 1.0))
                    - d2.mul_scalar(alpha_t * (((-h).exp() - 1.0 + h) / (h * h) - 0.5))
            }
            Some(z) => {
                let e2h = (-2.0 * h).exp();
                let two_h = 2.0 * h;
                sample.mul_scalar(sigma_t / sigma_s0 * (-h).exp())
                    + d0.mul_scalar(alpha_t * (1.0 - e2h))
                    + d1.mul_scalar(alpha_t * ((1.0 - e2h) / (-2.0 * h) + 1.0))
                    + d2.mul_scalar(alpha_t * ((1.0 - e2h - 2.0 * h) / (two_h * two_h) - 0.5))
                    + z.mul_scalar(sigma_t * (1.0 - e2h).sqrt())
            }
        }
    }

    /// DPM-Solver's (noise-prediction) multistep updates of order 2 and 3.
    fn noise_prediction_update(&self, i: usize, order: usize, sample: Tensor<B, 4>) -> Tensor<B, 4> {
        let k = self.model_outputs.len();
        let m = |back: usize| self.model_outputs[k - 1 - back].clone();
        let (lambda_t, alpha_t, sigma_t) = self.lambda_at(i + 1);
        let (lambda_s0, alpha_s0, _) = self.lambda_at(i);
        let (lambda_s1, _, _) = self.lambda_at(i - 1);
        let (h, h_0) = (lambda_t - lambda_s0, lambda_s0 - lambda_s1);
        let r0 = h_0 / h;
        let em1 = h.exp() - 1.0;
        let x = sample.mul_scalar(alpha_t / alpha_s0) - m(0).mul_scalar(sigma_t * em1);
        if order == 2 {
            let d1 = (m(0) - m(1)).mul_scalar(1.0 / r0);
            return match self.config.solver_type {
                SolverType::Midpoint => x - d1.mul_scalar(0.5 * (sigma_t * em1)),
                SolverType::Heun => x - d1.mul_scalar(sigma_t * (em1 / h - 1.0)),
            };
        }
        // Third order (the same for both solver types, as in diffusers).
        let (lambda_s2, _, _) = self.lambda_at(i - 2);
        let r1 = (lambda_s1 - lambda_s2) / h;
        let d1_0 = (m(0) - m(1)).mul_scalar(1.0 / r0);
        let d1_1 = (m(1) - m(2)).mul_scalar(1.0 / r1);
        let diff = d1_0.clone() - d1_1;
        let d1 = d1_0 + diff.clone().mul_scalar(r0 / (r0 + r1));
        let d2 = diff.mul_scalar(1.0 / (r0 + r1));
        x - d1.mul_scalar(sigma_t * (em1 / h - 1.0)) - d2.mul_scalar(sigma_t * ((em1 - h) / (h * h) - 0.5))
    }
}

/// Rejects the algorithms not implemented (`sde-dpmsolver`) and, as diffusers does,
/// `dpmsolver` with a final σ of zero.
pub(super) fn check_algorithm(config: &SchedulerConfig, sampler: &'static str) -> Result<()> {
    match config.algorithm_type {
        AlgorithmType::SdeDpmSolver => Err(unsupported(sampler, "algorithm_type", config.algorithm_type)),
        AlgorithmType::DpmSolver if config.final_sigmas_type == FinalSigmasType::Zero => Err(SchedError::invalid_value(
            "final_sigmas_type",
            "\"sigma_min\" with algorithm_type \"dpmsolver\" (its last step cannot end at sigma 0; diffusers refuses it too)",
            "\"zero\"",
        )),
        _ => Ok(()),
    }
}

/// The log-SNR λ = ln √ᾱ − ln √(1 − ᾱ) of each training timestep (f32, as diffusers).
pub(super) fn train_lambdas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod.iter().map(|&a| a.sqrt().ln() - (1.0 - a).sqrt().ln()).collect()
}

/// How many training timesteps lie at or above `lambda_min_clipped`:
/// `T − torch.searchsorted(flip(λ), lambda_min_clipped)`.
pub(super) fn unclipped_timesteps(config: &SchedulerConfig, lambdas: &[f32]) -> usize {
    let clip = config.lambda_min_clipped as f32;
    config.num_train_timesteps - lambdas.iter().filter(|&&l| l < clip).count()
}

/// diffusers' `linspace` timesteps over the first `last` training timesteps (f64,
/// descending): `np.linspace(0, last − 1, n + 1).round()[::-1][:-1]`.
pub(super) fn linspace_timesteps(last: usize, n: usize) -> Vec<f64> {
    let mut v: Vec<f64> = np_linspace(0.0, last as f64 - 1.0, n + 1).into_iter().map(round_half_even).collect();
    v.reverse();
    v.pop();
    v
}

/// `(αₜ, σₜ)` of the VP process at k-diffusion noise level `sigma`.
fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// Log-SNR λ = ln α − ln σ, α and σ at k-diffusion noise level `sigma`.
pub(super) fn lambda_alpha_sigma(sigma: f32) -> (f32, f32, f32) {
    let (a, s) = alpha_sigma(sigma);
    (a.ln() - s.ln(), a, s)
}

/// The model output converted at noise level `sigma`: the data prediction x̂₀ for the
/// DPM-Solver++ algorithms, the noise prediction ε̂ for `dpmsolver`.
pub(super) fn convert_output<B: Backend>(config: &SchedulerConfig, model_output: Tensor<B, 4>, sample: &Tensor<B, 4>, sigma: f32) -> Tensor<B, 4> {
    let (alpha_t, sigma_t) = alpha_sigma(sigma);
    let noise_prediction = config.algorithm_type == AlgorithmType::DpmSolver;
    match (config.prediction_type, noise_prediction) {
        (PredictionType::Epsilon, false) => (sample.clone() - model_output.mul_scalar(sigma_t)).div_scalar(alpha_t),
        (PredictionType::Sample, false) => model_output,
        (PredictionType::VPrediction, false) => sample.clone().mul_scalar(alpha_t) - model_output.mul_scalar(sigma_t),
        (PredictionType::Epsilon, true) => model_output,
        (PredictionType::Sample, true) => (sample.clone() - model_output.mul_scalar(alpha_t)).div_scalar(sigma_t),
        (PredictionType::VPrediction, true) => model_output.mul_scalar(alpha_t) + sample.clone().mul_scalar(sigma_t),
    }
}

/// DPM-Solver's first-order (DDIM-like) update from σ `s` to σ `t` with the converted
/// output `m0`; `noise` for `sde-dpmsolver++`.
pub(super) fn first_order_update<B: Backend>(
    algorithm: AlgorithmType,
    s: f32,
    t: f32,
    m0: Tensor<B, 4>,
    sample: Tensor<B, 4>,
    noise: Option<Tensor<B, 4>>,
) -> Tensor<B, 4> {
    let (lambda_t, alpha_t, sigma_t) = lambda_alpha_sigma(t);
    let (lambda_s, alpha_s, sigma_s) = lambda_alpha_sigma(s);
    let h = lambda_t - lambda_s;
    if algorithm == AlgorithmType::DpmSolver {
        return sample.mul_scalar(alpha_t / alpha_s) - m0.mul_scalar(sigma_t * (h.exp() - 1.0));
    }
    match noise {
        None => sample.mul_scalar(sigma_t / sigma_s) - m0.mul_scalar(alpha_t * ((-h).exp() - 1.0)),
        Some(z) => {
            let e2h = (-2.0 * h).exp();
            sample.mul_scalar(sigma_t / sigma_s * (-h).exp())
                + m0.mul_scalar(alpha_t * (1.0 - e2h))
                + z.mul_scalar(sigma_t * (1.0 - e2h).sqrt())
        }
    }
}

impl<B: Backend> Sampler<B> for DpmSolverMultistepSampler<B> {
    fn class_name(&self) -> &'static str {
        NAME
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let t = self.config.num_train_timesteps;
        check_steps(n, t)?;
        // A lambda_min_clipped above every timestep's log-SNR leaves nothing to space: the
        // spacing over zero timesteps would run from 0 down to −1, a timestep the model was
        // never trained on (diffusers does exactly that, silently).
        let unclipped = unclipped_timesteps(&self.config, &self.lambdas);
        if unclipped == 0 {
            return Err(SchedError::invalid_value(
                "lambda_min_clipped",
                format!(
                    "a value that leaves some training timesteps (the largest log-SNR of this schedule is {})",
                    self.lambdas[0]
                ),
                self.config.lambda_min_clipped,
            ));
        }
        let mut timesteps = self.spaced_timesteps(n);
        // Near the training timesteps' count, rounding the spacing (or leading spacing's
        // ⌊last / (n + 1)⌋ step) repeats a timestep: a zero log-SNR step divides by zero
        // (NaN latents, in diffusers too). Karras sigmas do not use this spacing.
        let repeats = |t: &[f64]| t.windows(2).any(|w| w[0] <= w[1]);
        if !self.config.use_karras_sigmas && repeats(&timesteps) {
            let most = (1..n).rev().find(|&m| !repeats(&self.spaced_timesteps(m))).unwrap_or(1);
            // Name lambda_min_clipped where it is what left too few timesteps to space.
            let clipped = if unclipped < t {
                format!(", as lambda_min_clipped ({}) leaves {unclipped} of {t} training timesteps", self.config.lambda_min_clipped)
            } else {
                String::new()
            };
            return Err(SchedError::InvalidArgument {
                name: "num_inference_steps",
                reason: format!("{n} steps repeat a timestep of this schedule's spacing{clipped}: at most {most} (or Karras sigmas)"),
            });
        }
        let sigmas: Vec<f64> = if self.config.use_karras_sigmas {
            let schedule_ends = (self.train_sigmas[0] as f64, self.train_sigmas[t - 1] as f64);
            let sigmas = checked_karras_sigmas((self.config.sigma_min, self.config.sigma_max), schedule_ends, n)?;
            let log_sigmas: Vec<f32> = self.train_sigmas.iter().map(|s| s.ln()).collect();
            let cosine = self.config.beta_schedule == BetaSchedule::SquaredCosCapV2;
            timesteps = sigmas
                .iter()
                .map(|&s| {
                    let ts = sigma_to_t(s, &log_sigmas);
                    if cosine {
                        ts
                    } else {
                        round_half_even(ts)
                    }
                })
                .collect();
            sigmas
        } else {
            timesteps
                .iter()
                .map(|&ts| np_interp_index(ts, &self.train_sigmas))
                .collect()
        };
        if timesteps.is_empty() {
            return Err(SchedError::InvalidSteps {
                steps: n,
                expected: "a count leaving at least one timestep above lambda_min_clipped".into(),
            });
        }
        let last = match self.config.final_sigmas_type {
            FinalSigmasType::Zero => 0.0,
            FinalSigmasType::SigmaMin => self.train_sigmas[0] as f64,
        };
        self.sigmas = sigmas.into_iter().chain([last]).map(|s| s as f32).collect();
        // diffusers stores these as int64: truncate.
        self.timesteps = timesteps.into_iter().map(|ts| ts.trunc() as f32).collect();
        self.model_outputs.clear();
        self.lower_order_nums = 0;
        self.next_step = 0;
        Ok(())
    }

    fn set_begin_index(&mut self, step_index: usize) -> Result<()> {
        check_index(self.timesteps.len(), step_index)?;
        self.model_outputs.clear();
        self.lower_order_nums = 0;
        self.next_step = step_index;
        Ok(())
    }

    fn add_noise(&self, original: Tensor<B, 4>, noise: Tensor<B, 4>, step_index: usize) -> Result<Tensor<B, 4>> {
        check_index(self.timesteps.len(), step_index)?;
        super::dpm::add_noise_vp(original, noise, self.sigmas[step_index])
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.sigmas)
    }

    fn step(
        &mut self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
        noise: &mut dyn NoiseSource<B>,
    ) -> Result<Tensor<B, 4>> {
        let n = self.timesteps.len();
        check_index(n, step_index)?;
        if step_index != self.next_step {
            return Err(SchedError::StepOutOfOrder {
                sampler: NAME,
                expected: self.next_step,
                got: step_index,
            });
        }
        let c = &self.config;
        let short_run = c.lower_order_final && n < 15;
        let lower_order_final = step_index == n - 1
            && (c.euler_at_final || short_run || c.final_sigmas_type == FinalSigmasType::Zero);
        let lower_order_second = step_index + 2 == n && short_run;
        let order = c.solver_order;

        let x0 = convert_output(c, model_output, &sample, self.sigmas[step_index]);
        self.model_outputs.push(x0.clone());
        if self.model_outputs.len() > order {
            self.model_outputs.remove(0);
        }
        let z = match c.algorithm_type {
            AlgorithmType::SdeDpmSolverPlusPlus => {
                Some(noise.sample(sample.dims(), &sample.device())?)
            }
            _ => None,
        };
        let noise_prediction = c.algorithm_type == AlgorithmType::DpmSolver;
        // A step that ends at the σ it starts from changes nothing (the limit of every
        // update as h → 0). Karras sigmas end at the schedule's smallest σ, which
        // `final_sigmas_type = "sigma_min"` appends once more: from 15 steps that last step
        // runs at second order, whose Heun coefficients would be 0 / 0 (NaN latents).
        let prev = if self.sigmas[step_index] == self.sigmas[step_index + 1] {
            sample
        } else if order == 1 || self.lower_order_nums < 1 || lower_order_final {
            self.first_order(step_index, x0, sample, z)
        } else if order == 2 || self.lower_order_nums < 2 || lower_order_second {
            match noise_prediction {
                true => self.noise_prediction_update(step_index, 2, sample),
                false => self.second_order(step_index, sample, z),
            }
        } else {
            match noise_prediction {
                true => self.noise_prediction_update(step_index, 3, sample),
                false => self.third_order(step_index, sample, z),
            }
        };
        self.lower_order_nums = (self.lower_order_nums + 1).min(order);
        self.next_step += 1;
        Ok(prev)
    }
}

/// `α·x₀ + σ_t·ε` at the k-diffusion noise level `sigma`, with `α = 1 / sqrt(σ² + 1)` and
/// `σ_t = σ·α` (diffusers' DPM-Solvers' `add_noise`, in f32).
pub(super) fn add_noise_vp<B: Backend>(original: Tensor<B, 4>, noise: Tensor<B, 4>, sigma: f32) -> Result<Tensor<B, 4>> {
    super::check_noise_shape(&original, &noise)?;
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    Ok(original.mul_scalar(alpha) + noise.mul_scalar(sigma * alpha))
}
