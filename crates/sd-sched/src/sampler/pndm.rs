use burn::tensor::{backend::Backend, Tensor};

use super::{check_index, check_steps, reject_common, unsupported, Sampler};
use crate::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use crate::error::{Result, SchedError};
use crate::noise::NoiseSource;
use crate::numerics::{np_linspace, round_half_even};
use crate::schedule::NoiseSchedule;

const NAME: &str = "PNDMScheduler";

/// Pseudo numerical methods for diffusion models (`PNDMScheduler`, Liu et al. 2022):
/// a Runge-Kutta warm-up (PRK, 12 model calls) followed by linear multistep steps (PLMS),
/// or PLMS alone with `skip_prk_steps` — Stable Diffusion 1.x's shipped scheduler.
///
/// Honours `skip_prk_steps`, `timestep_spacing` (default `leading`), `steps_offset`,
/// `set_alpha_to_one` (default `false`), `prediction_type` (`epsilon`, `v_prediction`)
/// and the schedule keys. Deterministic; must be stepped in order.
#[derive(Debug, Clone)]
pub struct PndmSampler<B: Backend> {
    schedule: NoiseSchedule,
    prediction: PredictionType,
    spacing: TimestepSpacing,
    steps_offset: usize,
    skip_prk_steps: bool,
    final_alpha_cumprod: f32,
    num_inference_steps: usize,
    prk_len: usize,
    timesteps_i: Vec<i64>,
    timesteps: Vec<f32>,
    state: History<B>,
    /// The step the run began at ([`Sampler::set_begin_index`]).
    begin: usize,
}

/// Multistep history, reset by `set_timesteps`.
#[derive(Debug, Clone)]
struct History<B: Backend> {
    counter: usize,
    ets: Vec<Tensor<B, 4>>,
    cur_model_output: Option<Tensor<B, 4>>,
    cur_sample: Option<Tensor<B, 4>>,
}

impl<B: Backend> Default for History<B> {
    fn default() -> Self {
        Self {
            counter: 0,
            ets: Vec::new(),
            cur_model_output: None,
            cur_sample: None,
        }
    }
}

impl<B: Backend> PndmSampler<B> {
    /// Builds the sampler; fails on `sample` prediction and zero-terminal-SNR schedules
    /// (PNDM divides by ᾱₜ, which is 0 there; diffusers' PNDM ignores the rescale).
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        reject_common(config, NAME)?;
        if config.prediction_type == PredictionType::Sample {
            return Err(unsupported(NAME, "prediction_type", "sample"));
        }
        if config.rescale_betas_zero_snr {
            return Err(unsupported(NAME, "rescale_betas_zero_snr", true));
        }
        let schedule = NoiseSchedule::new(config)?;
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(false) {
            1.0
        } else {
            schedule.alphas_cumprod()[0]
        };
        Ok(Self {
            schedule,
            prediction: config.prediction_type,
            spacing: config.timestep_spacing.unwrap_or(TimestepSpacing::Leading),
            steps_offset: config.steps_offset,
            skip_prk_steps: config.skip_prk_steps,
            final_alpha_cumprod,
            num_inference_steps: 0,
            prk_len: 0,
            timesteps_i: Vec::new(),
            timesteps: Vec::new(),
            state: History::default(),
            begin: 0,
        })
    }

    /// The `n` base timesteps in ascending order.
    fn base_timesteps(&self, n: usize) -> Vec<i64> {
        let t = self.schedule.num_train_timesteps();
        match self.spacing {
            TimestepSpacing::Linspace => np_linspace(0.0, (t - 1) as f64, n)
                .into_iter()
                .map(|v| round_half_even(v) as i64)
                .collect(),
            TimestepSpacing::Leading => (0..n)
                .map(|i| (i * (t / n) + self.steps_offset) as i64)
                .collect(),
            TimestepSpacing::Trailing => super::spacing::trailing(t, n)
                .into_iter()
                .rev()
                .map(|v| v as i64)
                .collect(),
        }
    }

    /// diffusers' `_get_prev_sample`: formula (9) of the PNDM paper.
    fn prev_sample(
        &self,
        sample: Tensor<B, 4>,
        timestep: i64,
        prev_timestep: i64,
        model_output: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        let ac = self.schedule.alphas_cumprod();
        let alpha_prod_t = ac[timestep as usize];
        let alpha_prod_t_prev = if prev_timestep >= 0 {
            ac[prev_timestep as usize]
        } else {
            self.final_alpha_cumprod
        };
        let beta_prod_t = 1.0 - alpha_prod_t;
        let beta_prod_t_prev = 1.0 - alpha_prod_t_prev;
        let model_output = match self.prediction {
            PredictionType::VPrediction => {
                model_output.mul_scalar(alpha_prod_t.sqrt())
                    + sample.clone().mul_scalar(beta_prod_t.sqrt())
            }
            _ => model_output,
        };
        let sample_coeff = (alpha_prod_t_prev / alpha_prod_t).sqrt();
        let denom = alpha_prod_t * beta_prod_t_prev.sqrt()
            + (alpha_prod_t * beta_prod_t * alpha_prod_t_prev).sqrt();
        sample.mul_scalar(sample_coeff)
            - model_output
                .mul_scalar(alpha_prod_t_prev - alpha_prod_t)
                .div_scalar(denom)
    }

    fn step_prk(
        &mut self,
        model_output: Tensor<B, 4>,
        timestep: i64,
        sample: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        let h = &mut self.state;
        let counter = h.counter;
        let half = (self.schedule.num_train_timesteps() / self.num_inference_steps / 2) as i64;
        let prev_timestep = timestep - if counter % 2 == 1 { 0 } else { half };
        let timestep = self.timesteps_i[counter / 4 * 4];
        let sixth = (1.0f64 / 6.0) as f32;
        let third = (1.0f64 / 3.0) as f32;
        let model_output = match counter % 4 {
            0 => {
                h.cur_model_output = Some(model_output.clone().mul_scalar(sixth));
                h.ets.push(model_output.clone());
                h.cur_sample = Some(sample.clone());
                model_output
            }
            1 | 2 => {
                let part = model_output.clone().mul_scalar(third);
                h.cur_model_output = Some(match h.cur_model_output.take() {
                    Some(acc) => acc + part,
                    None => part,
                });
                model_output
            }
            _ => {
                let part = model_output.mul_scalar(sixth);
                match h.cur_model_output.take() {
                    Some(acc) => acc + part,
                    None => part,
                }
            }
        };
        let cur_sample = h.cur_sample.clone().unwrap_or(sample);
        self.prev_sample(cur_sample, timestep, prev_timestep, model_output)
    }

    fn step_plms(
        &mut self,
        model_output: Tensor<B, 4>,
        timestep: i64,
        sample: Tensor<B, 4>,
    ) -> Tensor<B, 4> {
        let h = &mut self.state;
        let counter = h.counter;
        let ratio = (self.schedule.num_train_timesteps() / self.num_inference_steps) as i64;
        let (mut timestep, mut prev_timestep) = (timestep, timestep - ratio);
        if counter != 1 {
            let keep = h.ets.len().saturating_sub(3);
            h.ets.drain(..keep);
            h.ets.push(model_output.clone());
        } else {
            prev_timestep = timestep;
            timestep += ratio;
        }
        let mut sample = sample;
        let e = &h.ets;
        let n = e.len();
        let model_output = if n == 1 && counter == 0 {
            h.cur_sample = Some(sample.clone());
            model_output
        } else if n == 1 && counter == 1 {
            if let Some(s) = h.cur_sample.take() {
                sample = s;
            }
            (model_output + e[0].clone()).div_scalar(2.0)
        } else if n == 2 {
            (e[1].clone().mul_scalar(3.0) - e[0].clone()).div_scalar(2.0)
        } else if n == 3 {
            (e[2].clone().mul_scalar(23.0) - e[1].clone().mul_scalar(16.0)
                + e[0].clone().mul_scalar(5.0))
            .div_scalar(12.0)
        } else {
            (e[n - 1].clone().mul_scalar(55.0) - e[n - 2].clone().mul_scalar(59.0)
                + e[n - 3].clone().mul_scalar(37.0)
                - e[n - 4].clone().mul_scalar(9.0))
            .mul_scalar((1.0f64 / 24.0) as f32)
        };
        self.prev_sample(sample, timestep, prev_timestep, model_output)
    }
}

impl<B: Backend> Sampler<B> for PndmSampler<B> {
    fn class_name(&self) -> &'static str {
        NAME
    }

    fn set_timesteps(&mut self, n: usize) -> Result<()> {
        let t = self.schedule.num_train_timesteps();
        check_steps(n, t)?;
        if !self.skip_prk_steps && n < 4 {
            return Err(SchedError::InvalidSteps {
                steps: n,
                expected: "at least 4 for PNDM's Runge-Kutta warm-up (or skip_prk_steps)".into(),
            });
        }
        let base = self.base_timesteps(n);
        // PRK's half steps reach `T / n / 2` past the base timesteps.
        let half = if self.skip_prk_steps { 0 } else { t / n / 2 };
        super::check_fit(base.iter().map(|b| (b + half as i64) as f64), n, t, self.steps_offset)?;
        self.num_inference_steps = n;
        let (prk, plms): (Vec<i64>, Vec<i64>) = if self.skip_prk_steps {
            // The second timestep is repeated: PLMS's first step is a two-evaluation
            // (Heun-like) step.
            let mut plms: Vec<i64> = base[..n - 1].to_vec();
            if n >= 2 {
                plms.push(base[n - 2]);
            }
            plms.push(base[n - 1]);
            plms.reverse();
            (Vec::new(), plms)
        } else {
            let half = (t / n / 2) as i64;
            let mut prk_t = Vec::with_capacity(8);
            for &b in &base[n - 4..] {
                prk_t.push(b);
                prk_t.push(b + half);
            }
            // prk_t[:-1].repeat(2)[1:-1][::-1]
            let mut rep: Vec<i64> = prk_t[..7].iter().flat_map(|&v| [v, v]).collect();
            rep = rep[1..rep.len() - 1].to_vec();
            rep.reverse();
            let plms = base[..n - 3].iter().rev().copied().collect();
            (rep, plms)
        };
        self.prk_len = prk.len();
        self.timesteps_i = prk.into_iter().chain(plms).collect();
        self.timesteps = self.timesteps_i.iter().map(|&v| v as f32).collect();
        self.state = History::default();
        self.begin = 0;
        Ok(())
    }

    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }

    /// diffusers' PNDM has no begin index: its img2img steps through the later timesteps
    /// with its step counter from 0, so the warm-up (PLMS's two-evaluation first step, or
    /// the Runge-Kutta steps at the schedule's first timesteps, as its `step_prk` indexes
    /// them by that counter) starts over there. So here.
    fn set_begin_index(&mut self, step_index: usize) -> Result<()> {
        check_index(self.timesteps.len(), step_index)?;
        self.state = History::default();
        self.begin = step_index;
        Ok(())
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
        _noise: &mut dyn NoiseSource<B>,
    ) -> Result<Tensor<B, 4>> {
        check_index(self.timesteps.len(), step_index)?;
        if step_index != self.begin + self.state.counter {
            return Err(SchedError::StepOutOfOrder {
                sampler: NAME,
                expected: self.begin + self.state.counter,
                got: step_index,
            });
        }
        let timestep = self.timesteps_i[step_index];
        let prev = if self.state.counter < self.prk_len {
            self.step_prk(model_output, timestep, sample)
        } else {
            self.step_plms(model_output, timestep, sample)
        };
        self.state.counter += 1;
        Ok(prev)
    }
}
