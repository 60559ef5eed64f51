//! PyTorch's learning-rate schedulers (`torch.optim.lr_scheduler`) and diffusers'
//! `piecewise_constant`, as closed forms of the optimizer step.
//!
//! sd-scripts trains with any of them through `lr_scheduler_type` / `lr_scheduler_args`
//! and steps the scheduler once per optimizer step, so the rate of step `t` (0-based) is
//! the scheduler's after `t` calls of `step()`. PyTorch computes most of them
//! recursively from the previous rate; the closed forms here are the same functions (the
//! recursion only adds rounding), which is what lets a resumed run pick the rate up at
//! any step.

use crate::LoraError;

/// One of PyTorch's step-wise learning-rate schedulers, or diffusers' `piecewise_constant`.
///
/// Each gives the rate of a parameter group from that group's own starting rate (its
/// `base`); `eta_min` is an absolute rate, the same for every group, as in PyTorch.
///
/// ```
/// use lora_core::optim::TorchLrSchedule;
/// let cosine = TorchLrSchedule::CosineAnnealing { t_max: 100, eta_min: 1e-6 };
/// assert_eq!(cosine.lr(1e-4, 0), 1e-4);
/// assert!((cosine.lr(1e-4, 100) - 1e-6).abs() < 1e-18);
/// let steps = TorchLrSchedule::piecewise_constant("1:10,0.1:20,0.01").unwrap();
/// assert_eq!((steps.lr(2.0, 9), steps.lr(2.0, 10), steps.lr(2.0, 25)), (2.0, 0.2, 0.02));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub enum TorchLrSchedule {
    /// `CosineAnnealingLR(T_max, eta_min)`: a cosine from the base rate down to `eta_min`
    /// over `t_max` steps, which then rises again (a period of `2 · t_max`).
    CosineAnnealing {
        /// Steps from the base rate to `eta_min` (`T_max`).
        t_max: usize,
        /// The lowest rate (absolute).
        eta_min: f64,
    },
    /// `CosineAnnealingWarmRestarts(T_0, T_mult, eta_min)`: cosines from the base rate to
    /// `eta_min`, restarting at the base rate; the first lasts `t_0` steps, each next one
    /// `t_mult` times longer.
    CosineAnnealingWarmRestarts {
        /// Steps of the first cycle (`T_0`).
        t_0: usize,
        /// Growth of the cycles' length (`T_mult`, at least 1).
        t_mult: usize,
        /// The lowest rate (absolute).
        eta_min: f64,
    },
    /// `StepLR(step_size, gamma)`: the rate times `gamma` every `step_size` steps.
    Step {
        /// Steps between decays.
        step_size: usize,
        /// Factor of each decay.
        gamma: f64,
    },
    /// `MultiStepLR(milestones, gamma)`: the rate times `gamma` at each milestone (a step
    /// listed twice decays twice).
    MultiStep {
        /// The steps at which the rate decays.
        milestones: Vec<usize>,
        /// Factor of each decay.
        gamma: f64,
    },
    /// `ExponentialLR(gamma)`: the rate times `gamma` every step.
    Exponential {
        /// Factor per step.
        gamma: f64,
    },
    /// `LinearLR(start_factor, end_factor, total_iters)`: the factor moves linearly from
    /// `start_factor` to `end_factor` over `total_iters` steps, then stays.
    Linear {
        /// Factor of the first step.
        start_factor: f64,
        /// Factor from `total_iters` on.
        end_factor: f64,
        /// Steps of the ramp.
        total_iters: usize,
    },
    /// `ConstantLR(factor, total_iters)`: `factor` of the rate for `total_iters` steps,
    /// then the full rate.
    Constant {
        /// Factor of the first steps.
        factor: f64,
        /// Steps at that factor.
        total_iters: usize,
    },
    /// `PolynomialLR(total_iters, power)`: `(1 − t / total_iters)^power` of the rate,
    /// 0 from `total_iters` on.
    Polynomial {
        /// Steps to 0.
        total_iters: usize,
        /// The exponent.
        power: f64,
    },
    /// diffusers' `piecewise_constant` (`step_rules = "1:10,0.1:20,0.01"`): a factor of
    /// the rate for the steps before each rule's step, the last factor after them.
    PiecewiseConstant {
        /// `(step, factor)`: `factor` applies to the steps before `step` (and from the
        /// previous rule's step on), sorted by step.
        rules: Vec<(usize, f64)>,
        /// The factor after the last rule's step.
        last: f64,
    },
}

impl TorchLrSchedule {
    /// The PyTorch class (or diffusers schedule) this is, as sd-scripts'
    /// `lr_scheduler_type` / `lr_scheduler` names it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::CosineAnnealing { .. } => "CosineAnnealingLR",
            Self::CosineAnnealingWarmRestarts { .. } => "CosineAnnealingWarmRestarts",
            Self::Step { .. } => "StepLR",
            Self::MultiStep { .. } => "MultiStepLR",
            Self::Exponential { .. } => "ExponentialLR",
            Self::Linear { .. } => "LinearLR",
            Self::Constant { .. } => "ConstantLR",
            Self::Polynomial { .. } => "PolynomialLR",
            Self::PiecewiseConstant { .. } => "piecewise_constant",
        }
    }

    /// Parses diffusers' `step_rules`: `FACTOR:STEP` entries separated by commas, then the
    /// factor of the steps after the last one (`"1:10,0.1:20,0.01"`: the full rate for
    /// steps 0–9, a tenth for 10–19, a hundredth from 20 on).
    pub fn piecewise_constant(step_rules: &str) -> Result<Self, LoraError> {
        let bad = |what: String| LoraError::InvalidConfig(format!("step_rules \"{step_rules}\": {what}"));
        let entries: Vec<&str> = step_rules.split(',').map(str::trim).collect();
        let (last, rules) = entries.split_last().ok_or_else(|| bad("is empty".into()))?;
        let factor = |s: &str| s.trim().parse::<f64>().ok().filter(|f| f.is_finite() && *f >= 0.0);
        let mut parsed = rules
            .iter()
            .map(|rule| {
                let (f, step) = rule.split_once(':').ok_or_else(|| bad(format!("`{rule}` is not FACTOR:STEP")))?;
                let f = factor(f).ok_or_else(|| bad(format!("`{rule}`: the factor must be a number of at least 0")))?;
                let step = step.trim().parse::<usize>().map_err(|_| bad(format!("`{rule}`: the step must be a whole number")))?;
                Ok((step, f))
            })
            .collect::<Result<Vec<_>, LoraError>>()?;
        let last = factor(last).ok_or_else(|| bad(format!("the last entry, `{last}`, must be the factor after the rules' steps")))?;
        // diffusers keeps one factor per step (a later rule for the same step wins), then
        // looks the steps up in order.
        parsed.reverse();
        parsed.sort_by_key(|(step, _)| *step);
        parsed.dedup_by_key(|(step, _)| *step);
        Ok(Self::PiecewiseConstant { rules: parsed, last })
    }

    /// Checks the values PyTorch refuses (and those that would make no schedule).
    pub fn validate(&self) -> Result<(), LoraError> {
        let bad = |what: &str| Err(LoraError::InvalidConfig(format!("{}: {what}", self.name())));
        let rate = |v: f64| v.is_finite() && v >= 0.0;
        match self {
            Self::CosineAnnealing { t_max, eta_min } if *t_max == 0 || !rate(*eta_min) => bad("T_max must be at least 1 and eta_min at least 0"),
            Self::CosineAnnealingWarmRestarts { t_0, t_mult, eta_min } if *t_0 == 0 || *t_mult == 0 || !rate(*eta_min) => {
                bad("T_0 and T_mult must be at least 1 and eta_min at least 0")
            }
            Self::Step { step_size, gamma } if *step_size == 0 || !rate(*gamma) => bad("step_size must be at least 1 and gamma at least 0"),
            Self::MultiStep { gamma, .. } | Self::Exponential { gamma } if !rate(*gamma) => bad("gamma must be at least 0"),
            Self::Linear { start_factor, end_factor, total_iters } => {
                let starts_ok = *start_factor > 0.0 && *start_factor <= 1.0;
                if !(starts_ok && (0.0..=1.0).contains(end_factor)) || *total_iters == 0 {
                    return bad("start_factor must be in (0, 1], end_factor in [0, 1] and total_iters at least 1");
                }
                Ok(())
            }
            Self::Constant { factor, .. } if !(0.0..=1.0).contains(factor) => bad("factor must be in [0, 1]"),
            Self::Polynomial { total_iters, power } if *total_iters == 0 || !(power.is_finite() && *power >= 0.0) => {
                bad("total_iters must be at least 1 and power at least 0")
            }
            _ => Ok(()),
        }
    }

    /// The rate of optimizer step `step` (0-based) for a parameter group starting at `base`.
    /// Meant for schedules [`validate`](Self::validate) accepts (others give finite or
    /// NaN rates, never a panic).
    pub fn lr(&self, base: f64, step: usize) -> f64 {
        let t = step as f64;
        let cosine = |eta_min: f64, at: f64, period: f64| eta_min + (base - eta_min) * 0.5 * (1.0 + (std::f64::consts::PI * at / period).cos());
        match self {
            Self::CosineAnnealing { t_max, eta_min } => cosine(*eta_min, t, *t_max as f64),
            Self::CosineAnnealingWarmRestarts { t_0, t_mult, eta_min } => {
                let (at, period) = restart_position(step, *t_0, *t_mult);
                cosine(*eta_min, at as f64, period as f64)
            }
            Self::Step { step_size, gamma } => base * gamma.powi(exponent(step / step_size.max(&1))),
            Self::MultiStep { milestones, gamma } => base * gamma.powi(exponent(milestones.iter().filter(|m| **m <= step).count())),
            Self::Exponential { gamma } => base * gamma.powi(exponent(step)),
            Self::Linear { start_factor, end_factor, total_iters } => {
                base * (start_factor + (end_factor - start_factor) * step.min(*total_iters) as f64 / *total_iters as f64)
            }
            Self::Constant { factor, total_iters } => base * if step < *total_iters { *factor } else { 1.0 },
            Self::Polynomial { total_iters, power } => base * (1.0 - step.min(*total_iters) as f64 / *total_iters as f64).powf(*power),
            Self::PiecewiseConstant { rules, last } => base * rules.iter().find(|(s, _)| step < *s).map_or(*last, |(_, f)| *f),
        }
    }
}

/// `(steps into the current cycle, the cycle's length)` of `CosineAnnealingWarmRestarts`.
fn restart_position(step: usize, t_0: usize, t_mult: usize) -> (usize, usize) {
    // (`validate` refuses a `T_0` of 0; here it counts as 1 rather than divide by it.)
    let t_0 = t_0.max(1);
    if t_mult <= 1 {
        return (step % t_0, t_0);
    }
    // Cycles grow geometrically: few iterations even for millions of steps.
    let (mut at, mut period) = (step, t_0);
    while at >= period {
        at -= period;
        period = period.saturating_mul(t_mult);
    }
    (at, period)
}

/// A count as an `i32` exponent (a rate to that power is 0 or 1 long before it overflows).
fn exponent(n: usize) -> i32 {
    n.min(i32::MAX as usize) as i32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cycle position computed at once is PyTorch's step-by-step update
    /// (`T_cur += 1; if T_cur >= T_i: T_cur -= T_i; T_i *= T_mult`).
    #[test]
    fn restart_positions_follow_pytorchs_steps() {
        for (t_0, t_mult) in [(1, 1), (3, 1), (1, 2), (4, 3), (7, 2)] {
            let (mut at, mut period) = (0usize, t_0);
            for step in 0..500 {
                assert_eq!(restart_position(step, t_0, t_mult), (at, period), "T_0 {t_0}, T_mult {t_mult}, step {step}");
                at += 1;
                if at >= period {
                    at -= period;
                    period *= t_mult;
                }
            }
        }
    }

    #[test]
    fn step_rules_are_checked() {
        for (rules, expected) in [("", "the last entry"), ("1:10", "the last entry"), ("1-10,0.1", "not FACTOR:STEP"), ("1:1.5,0.1", "whole number"), ("-1:10,0.1", "at least 0")] {
            let e = TorchLrSchedule::piecewise_constant(rules).unwrap_err().to_string();
            assert!(e.contains(expected), "{rules}: {e}");
        }
        // A single factor is a constant schedule.
        assert_eq!(TorchLrSchedule::piecewise_constant("0.5").unwrap().lr(2.0, 1000), 1.0);
    }
}
