use burn::tensor::{backend::Backend, Tensor};

use super::dpm::{
    check_algorithm, convert_output, first_order_update, lambda_alpha_sigma, linspace_timesteps,
    train_lambdas, unclipped_timesteps,
};
use super::euler::reject_sigma_spacings;
use super::{check_index, check_order, check_steps, reject_common, unsupported, Sampler};
use crate::config::{AlgorithmType, FinalSigmasType, SchedulerConfig, SolverType};
use crate::error::{Result, SchedError};
use crate::noise::NoiseSource;
use crate::numerics::{checked_karras_sigmas, np_interp_index, round_half_even, sigma_to_t, sigmas_from_alphas_cumprod};
use crate::schedule::NoiseSchedule;

const NAME: &str = "DPMSolverSinglestepScheduler";

/// DPM-Solver singlestep (`DPMSolverSinglestepScheduler`, kohya's `dpmsingle`): the steps
/// go in blocks of orders `1, 2` (or `1, 2, 3` with `solver_order` 3); each block
/// starts again from the latents at its first step, and its last step goes from there
/// to the block's end with the model outputs of all its steps. One model call per step.
///
/// Honours `solver_order` (1–3), `algorithm_type` (`dpmsolver++`; `dpmsolver`, which
/// needs `final_sigmas_type` `sigma_min`), `solver_type`, `lower_order_final`,
/// `final_sigmas_type`, `use_karras_sigmas`, `sigma_min`, `sigma_max`,
/// `lambda_min_clipped`, `prediction_type` and the schedule keys. As in diffusers, its
/// timesteps are always `linspace`-spaced (`timestep_spacing` and `steps_offset` are not
/// read), `lower_order_final` is taken as on when the step count is not a multiple of
/// the order or the final σ is zero, and its Karras timesteps are always rounded. A
/// zero-terminal-SNR schedule, which diffusers' class ignores, is an error here. Must be
/// stepped in order.
///
/// ```
/// use burn::backend::Flex;
/// use sd_sched::{DpmSolverSinglestepSampler, Sampler, SchedulerConfig};
///
/// let mut sampler = DpmSolverSinglestepSampler::<Flex>::new(&SchedulerConfig::sd15()).unwrap();
/// sampler.set_timesteps(5).unwrap();
/// assert_eq!(sampler.timesteps(), [999.0, 799.0, 599.0, 400.0, 200.0]);
/// // Blocks 1-2, 1-2, and a first-order step onto σ = 0.
/// assert_eq!(sampler.order_list(), [1, 2, 1, 2, 1]);
/// ```
#[derive(Debug, Clone)]
pub struct DpmSolverSinglestepSampler<B: Backend> {
    config: SchedulerConfig,
    train_sigmas: Vec<f32>,
    lambdas: Vec<f32>,
    timesteps: Vec<f32>,
    sigmas: Vec<f32>,
    order_list: Vec<usize>,
    /// The last `solver_order` converted outputs, oldest first.
    model_outputs: Vec<Tensor<B, 4>>,
    /// The latents at the first step of the current block.
    block_sample: Option<Tensor<B, 4>>,
    next_step: usize,
}

impl<B: Backend> DpmSolverSinglestepSampler<B> {
    /// Builds the sampler; fails on `sde-dpmsolver` and `sde-dpmsolver++`, on `dpmsolver`
    /// with a final σ of zero, on a zero-terminal-SNR schedule and on sigma spacings this
    /// crate does not implement.
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        reject_common(config, NAME)?;
        reject_sigma_spacings(config, NAME)?;
        check_algorithm(config, NAME)?;
        if config.algorithm_type == AlgorithmType::SdeDpmSolverPlusPlus {
            return Err(unsupported(NAME, "algorithm_type", config.algorithm_type));
        }
        if config.rescale_betas_zero_snr {
            return Err(unsupported(NAME, "rescale_betas_zero_snr", true));
        }
        let ac = NoiseSchedule::new(config)?.alphas_cumprod().to_vec();
        Ok(Self {
            config: config.clone(),
            train_sigmas: sigmas_from_alphas_cumprod(&ac),
            lambdas: train_lambdas(&ac),
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            order_list: Vec::new(),
            model_outputs: Vec::new(),
            block_sample: None,
            next_step: 0,
        })
    }

    /// The solver order of each step (empty before [`Sampler::set_timesteps`]).
    pub fn order_list(&self) -> &[usize] {
        &self.order_list
    }

    /// Second-order update over the block `[i − 1, i + 1]` from its first latents `x`.
    fn second_order(&self, i: usize, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let k = self.model_outputs.len();
        let (m0, m1) = (self.model_outputs[k - 1].clone(), self.model_outputs[k - 2].clone());
        let (lambda_t, alpha_t, sigma_t) = lambda_alpha_sigma(self.sigmas[i + 1]);
        let (lambda_s0, _, _) = lambda_alpha_sigma(self.sigmas[i]);
        let (lambda_s1, alpha_s1, sigma_s1) = lambda_alpha_sigma(self.sigmas[i - 1]);
        let h = lambda_t - lambda_s1;
        let r0 = (lambda_s0 - lambda_s1) / h;
        let d1 = (m0 - m1.clone()).mul_scalar(1.0 / r0);
        let d0 = m1;
        let heun = self.config.solver_type == SolverType::Heun;
        if self.config.algorithm_type == AlgorithmType::DpmSolver {
            let em1 = h.exp() - 1.0;
            let x = x.mul_scalar(alpha_t / alpha_s1) - d0.mul_scalar(sigma_t * em1);
            return match heun {
                false => x - d1.mul_scalar(0.5 * (sigma_t * em1)),
                true => x - d1.mul_scalar(sigma_t * (em1 / h - 1.0)),
            };
        }
        let em1 = (-h).exp() - 1.0;
        let x = x.mul_scalar(sigma_t / sigma_s1) - d0.mul_scalar(alpha_t * em1);
        match heun {
            false => x - d1.mul_scalar(0.5 * (alpha_t * em1)),
            true => x + d1.mul_scalar(alpha_t * (em1 / h + 1.0)),
        }
    }

    /// Third-order update over the block `[i − 2, i + 1]` from its first latents `x`.
    fn third_order(&self, i: usize, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let k = self.model_outputs.len();
        let m0 = self.model_outputs[k - 1].clone();
        let m1 = self.model_outputs[k - 2].clone();
        let m2 = self.model_outputs[k - 3].clone();
        let (lambda_t, alpha_t, sigma_t) = lambda_alpha_sigma(self.sigmas[i + 1]);
        let (lambda_s0, _, _) = lambda_alpha_sigma(self.sigmas[i]);
        let (lambda_s1, _, _) = lambda_alpha_sigma(self.sigmas[i - 1]);
        let (lambda_s2, alpha_s2, sigma_s2) = lambda_alpha_sigma(self.sigmas[i - 2]);
        let h = lambda_t - lambda_s2;
        let (r0, r1) = ((lambda_s0 - lambda_s2) / h, (lambda_s1 - lambda_s2) / h);
        let d1_0 = (m1 - m2.clone()).mul_scalar(1.0 / r1);
        let d1_1 = (m0 - m2.clone()).mul_scalar(1.0 / r0);
        let d0 = m2;
        let heun = self.config.solver_type == SolverType::Heun;
        // diffusers divides (not multiplies by the reciprocal) by r0 − r1 here.
        let d1 = || (d1_0.clone().mul_scalar(r0) - d1_1.clone().mul_scalar(r1)).div_scalar(r0 - r1);
        let d2 = || (d1_1.clone() - d1_0.clone()).mul_scalar(2.0).div_scalar(r0 - r1);
        if self.config.algorithm_type == AlgorithmType::DpmSolver {
            let em1 = h.exp() - 1.0;
            let x = x.mul_scalar(alpha_t / alpha_s2) - d0.mul_scalar(sigma_t * em1);
            return match heun {
                false => x - d1_1.clone().mul_scalar(sigma_t * (em1 / h - 1.0)),
                true => {
                    x - d1().mul_scalar(sigma_t * (em1 / h - 1.0)) - d2().mul_scalar(sigma_t * ((em1 - h) / (h * h) - 0.5))
                }
            };
        }
        let em1 = (-h).exp() - 1.0;
        let x = x.mul_scalar(sigma_t / sigma_s2) - d0.mul_scalar(alpha_t * em1);
        match heun {
            false => x + d1_1.clone().mul_scalar(alpha_t * (em1 / h + 1.0)),
            true => x + d1().mul_scalar(alpha_t * (em1 / h + 1.0)) - d2().mul_scalar(alpha_t * ((em1 + h) / (h * h) - 0.5)),
        }
    }
}

/// diffusers' `get_order_list`: blocks `1, 2(, 3)` covering `steps`, ending early with
/// `lower_order_final`, the last step first order when the final σ is zero.
fn order_list(steps: usize, order: usize, lower_order_final: bool, final_zero: bool) -> Vec<usize> {
    let blocks = |block: &[usize], count: usize| block.repeat(count);
    let mut orders = match (order, lower_order_final) {
        (3, true) => match steps % 3 {
            0 => [blocks(&[1, 2, 3], steps / 3 - 1), vec![1, 2, 1]].concat(),
            1 => [blocks(&[1, 2, 3], steps / 3), vec![1]].concat(),
            _ => [blocks(&[1, 2, 3], steps / 3), vec![1, 2]].concat(),
        },
        (2, true) => match steps % 2 {
            0 => [blocks(&[1, 2], steps / 2 - 1), vec![1, 1]].concat(),
            _ => [blocks(&[1, 2], steps / 2), vec![1]].concat(),
        },
        (3, false) => blocks(&[1, 2, 3], steps / 3),
        (2, false) => blocks(&[1, 2], steps / 2),
        _ => vec![1; steps],
    };
    if final_zero && let Some(last) = orders.last_mut() {
        *last = 1;
    }
    orders
}

impl<B: Backend> Sampler<B> for DpmSolverSinglestepSampler<B> {
    fn class_name(&self) -> &'static str {
        NAME
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let c = &self.config;
        let t = c.num_train_timesteps;
        check_steps(n, t)?;
        let unclipped = unclipped_timesteps(c, &self.lambdas);
        if unclipped == 0 {
            return Err(SchedError::invalid_value(
                "lambda_min_clipped",
                "a value that leaves some training timesteps",
                c.lambda_min_clipped,
            ));
        }
        let mut timesteps = linspace_timesteps(unclipped, n);
        let sigmas: Vec<f64> = if c.use_karras_sigmas {
            let schedule_ends = (self.train_sigmas[0] as f64, self.train_sigmas[t - 1] as f64);
            let sigmas = checked_karras_sigmas((c.sigma_min, c.sigma_max), schedule_ends, n)?;
            let log_sigmas: Vec<f32> = self.train_sigmas.iter().map(|s| s.ln()).collect();
            timesteps = sigmas.iter().map(|&s| round_half_even(sigma_to_t(s, &log_sigmas))).collect();
            sigmas
        } else {
            timesteps.iter().map(|&ts| np_interp_index(ts, &self.train_sigmas)).collect()
        };
        let final_zero = c.final_sigmas_type == FinalSigmasType::Zero;
        let last = if final_zero { 0.0 } else { self.train_sigmas[0] as f64 };
        // diffusers turns lower_order_final on (with a warning) where blocks cannot fit.
        let lower_order_final = c.lower_order_final || !n.is_multiple_of(c.solver_order) || final_zero;
        self.order_list = order_list(n, c.solver_order, lower_order_final, final_zero);
        self.sigmas = sigmas.into_iter().chain([last]).map(|s| s as f32).collect();
        // diffusers stores these as int64: truncate.
        self.timesteps = timesteps.into_iter().map(|ts| ts.trunc() as f32).collect();
        self.model_outputs.clear();
        self.block_sample = None;
        self.next_step = 0;
        Ok(())
    }

    /// A block entered part-way runs at the orders its outputs allow (its first step at
    /// order 1), as diffusers lowers the order where an output is missing.
    fn set_begin_index(&mut self, step_index: usize) -> Result<()> {
        check_index(self.timesteps.len(), step_index)?;
        self.model_outputs.clear();
        self.block_sample = None;
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
        _noise: &mut dyn NoiseSource<B>,
    ) -> Result<Tensor<B, 4>> {
        check_index(self.timesteps.len(), step_index)?;
        check_order(NAME, self.next_step, step_index)?;
        let converted = convert_output(&self.config, model_output, &sample, self.sigmas[step_index]);
        self.model_outputs.push(converted);
        if self.model_outputs.len() > self.config.solver_order {
            self.model_outputs.remove(0);
        }
        // A block's first step (order 1) starts it from the current latents.
        let order = self.order_list[step_index].min(self.model_outputs.len());
        if order == 1 {
            self.block_sample = Some(sample);
        }
        let x = self.block_sample.clone().expect("every block starts with a first-order step");
        let prev = match order {
            1 => {
                let m0 = self.model_outputs[self.model_outputs.len() - 1].clone();
                let (s, t) = (self.sigmas[step_index], self.sigmas[step_index + 1]);
                first_order_update(self.config.algorithm_type, s, t, m0, x, None)
            }
            2 => self.second_order(step_index, x),
            _ => self.third_order(step_index, x),
        };
        self.next_step += 1;
        Ok(prev)
    }
}

#[cfg(test)]
mod tests {
    use super::order_list;

    /// diffusers' order lists for 1 to 7 steps (recorded from diffusers 0.39).
    #[test]
    fn order_lists_match_diffusers() {
        let digits = |v: Vec<usize>| v.iter().map(|o| o.to_string()).collect::<String>();
        let table = |order: usize, lower: bool, zero: bool| {
            (1..=7).map(|n| {
                let lower = lower || n % order != 0 || zero;
                digits(order_list(n, order, lower, zero))
            }).collect::<Vec<_>>()
        };
        assert_eq!(table(1, false, true), ["1", "11", "111", "1111", "11111", "111111", "1111111"]);
        assert_eq!(table(2, false, true), ["1", "11", "121", "1211", "12121", "121211", "1212121"]);
        assert_eq!(table(2, false, false), ["1", "12", "121", "1212", "12121", "121212", "1212121"]);
        assert_eq!(table(2, true, false), ["1", "11", "121", "1211", "12121", "121211", "1212121"]);
        assert_eq!(table(3, false, true), ["1", "11", "121", "1231", "12311", "123121", "1231231"]);
        assert_eq!(table(3, false, false), ["1", "12", "123", "1231", "12312", "123123", "1231231"]);
        assert_eq!(table(3, true, false), ["1", "12", "121", "1231", "12312", "123121", "1231231"]);
    }
}
