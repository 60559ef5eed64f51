//! `scheduler_config.json`: the diffusers scheduler configuration.

use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{Result, SchedError};

/// How the betas of the forward process are laid out over the training timesteps
/// (diffusers `beta_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum BetaSchedule {
    /// `linear`: betas evenly spaced from `beta_start` to `beta_end`.
    #[serde(rename = "linear")]
    #[default]
    Linear,
    /// `scaled_linear`: square roots of the betas evenly spaced (Stable Diffusion 1.x/2.x).
    #[serde(rename = "scaled_linear")]
    ScaledLinear,
    /// `squaredcos_cap_v2`: the cosine schedule of Nichol & Dhariwal, betas capped at 0.999.
    #[serde(rename = "squaredcos_cap_v2")]
    SquaredCosCapV2,
}

/// What the denoising model predicts (diffusers `prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum PredictionType {
    /// `epsilon`: the added noise (SD 1.x, SD 2.x base).
    #[serde(rename = "epsilon")]
    #[default]
    Epsilon,
    /// `v_prediction`: the velocity `sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x₀` (SD 2.x 768).
    #[serde(rename = "v_prediction")]
    VPrediction,
    /// `sample`: the clean sample `x₀`.
    #[serde(rename = "sample")]
    Sample,
}

/// How inference timesteps are picked from the training timesteps (diffusers
/// `timestep_spacing`, see table 2 of "Common Diffusion Noise Schedules and Sample Steps
/// are Flawed").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TimestepSpacing {
    /// `leading`: `0, r, 2r, …` (plus `steps_offset`), with `r = T / n` rounded down.
    #[serde(rename = "leading")]
    Leading,
    /// `trailing`: `T−1, T−1−r, …`, always starting at the last training timestep.
    #[serde(rename = "trailing")]
    Trailing,
    /// `linspace`: `n` points evenly spaced over `[0, T−1]`.
    #[serde(rename = "linspace")]
    Linspace,
}

/// DDPM's posterior variance (diffusers `variance_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VarianceType {
    /// `fixed_small`: the posterior variance β̃ₜ.
    #[serde(rename = "fixed_small")]
    FixedSmall,
    /// `fixed_small_log`: β̃ₜ computed through its logarithm.
    #[serde(rename = "fixed_small_log")]
    FixedSmallLog,
    /// `fixed_large`: βₜ.
    #[serde(rename = "fixed_large")]
    FixedLarge,
    /// `fixed_large_log` (not supported).
    #[serde(rename = "fixed_large_log")]
    FixedLargeLog,
    /// `learned`: the model predicts the variance (not supported).
    #[serde(rename = "learned")]
    Learned,
    /// `learned_range`: the model interpolates the variance (not supported).
    #[serde(rename = "learned_range")]
    LearnedRange,
}

/// The sigma the sampling loop ends on (diffusers `final_sigmas_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum FinalSigmasType {
    /// `zero`: the last step lands on a clean sample.
    #[serde(rename = "zero")]
    #[default]
    Zero,
    /// `sigma_min`: the last step lands on the smallest training sigma.
    #[serde(rename = "sigma_min")]
    SigmaMin,
}

/// DPM-Solver variant (diffusers `algorithm_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum AlgorithmType {
    /// `dpmsolver++`: the data-prediction solver (DPM++ 2M / 3M). A DEIS config's `deis`
    /// reads as this, as diffusers' DPM-Solvers read it (a model folder saved with
    /// `DEISMultistepScheduler` loads with any sampler).
    #[serde(rename = "dpmsolver++", alias = "deis")]
    #[default]
    DpmSolverPlusPlus,
    /// `sde-dpmsolver++`: its stochastic variant (DPM++ 2M SDE).
    #[serde(rename = "sde-dpmsolver++")]
    SdeDpmSolverPlusPlus,
    /// `dpmsolver`: the original noise-prediction solver (deprecated in diffusers, kohya's
    /// `dpmsolver` sample sampler); needs `final_sigmas_type` `sigma_min`.
    #[serde(rename = "dpmsolver")]
    DpmSolver,
    /// `sde-dpmsolver` (deprecated in diffusers; not supported).
    #[serde(rename = "sde-dpmsolver")]
    SdeDpmSolver,
}

/// Second-order update rule of DPM-Solver (diffusers `solver_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum SolverType {
    /// `midpoint`. DEIS' `logrho` and UniPC's `bh1` / `bh2` read as this, as diffusers'
    /// DPM-Solvers read them (a model folder saved with `UniPCMultistepScheduler` loads
    /// with any sampler).
    #[serde(rename = "midpoint", alias = "logrho", alias = "bh1", alias = "bh2")]
    #[default]
    Midpoint,
    /// `heun`.
    #[serde(rename = "heun")]
    Heun,
}

/// Sigma interpolation of the Euler sampler (diffusers `interpolation_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum InterpolationType {
    /// `linear`: sigmas linearly interpolated between training timesteps.
    #[serde(rename = "linear")]
    #[default]
    Linear,
    /// `log_linear` (not supported).
    #[serde(rename = "log_linear")]
    LogLinear,
}

/// How the Euler sampler feeds timesteps to the model (diffusers `timestep_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum TimestepType {
    /// `discrete`: training-timestep indices.
    #[serde(rename = "discrete")]
    #[default]
    Discrete,
    /// `continuous`: `0.25·ln σ` (EDM-style models; not supported).
    #[serde(rename = "continuous")]
    Continuous,
}

/// A diffusers scheduler configuration (`scheduler/scheduler_config.json`).
///
/// Field names are the diffusers keys. Keys this crate does not know are ignored, like
/// diffusers does when a config is loaded into another scheduler class. Keys whose
/// diffusers default depends on the scheduler class (`timestep_spacing`, `clip_sample`,
/// `set_alpha_to_one`, `variance_type`) are `Option`s resolved by each sampler.
///
/// ```
/// use sd_sched::{PredictionType, SchedulerConfig, TimestepSpacing};
///
/// let config = SchedulerConfig::from_json_str(
///     r#"{"_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear",
///         "beta_start": 0.00085, "beta_end": 0.012, "prediction_type": "v_prediction",
///         "timestep_spacing": "trailing", "some_future_key": 1}"#,
/// )
/// .unwrap();
/// assert_eq!(config.prediction_type, PredictionType::VPrediction);
/// assert_eq!(config.timestep_spacing, Some(TimestepSpacing::Trailing));
/// assert!(SchedulerConfig::from_json_str(r#"{"beta_schedule": "quadratic"}"#).is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    /// The diffusers scheduler class the file was saved from (`_class_name`).
    #[serde(rename = "_class_name", skip_serializing_if = "Option::is_none")]
    pub class_name: Option<String>,
    /// Number of training timesteps `T`.
    pub num_train_timesteps: usize,
    /// First beta (for `linear` and `scaled_linear`).
    pub beta_start: f64,
    /// Last beta (for `linear` and `scaled_linear`).
    pub beta_end: f64,
    /// Beta schedule.
    pub beta_schedule: BetaSchedule,
    /// Explicit betas, overriding `beta_schedule` when present.
    pub trained_betas: Option<Vec<f64>>,
    /// Rescale the betas to zero terminal SNR (Lin et al. 2023).
    pub rescale_betas_zero_snr: bool,
    /// What the model predicts.
    pub prediction_type: PredictionType,
    /// Inference timestep spacing; `None` means the sampler's diffusers default
    /// (`leading` for DDPM/DDIM/PNDM, `linspace` for Euler and DPM-Solver).
    pub timestep_spacing: Option<TimestepSpacing>,
    /// Offset added to `leading` timesteps (SD uses 1).
    pub steps_offset: usize,
    /// Clip the predicted `x₀` to `±clip_sample_range` (DDPM, DDIM); `None` means the
    /// diffusers default, `true`.
    pub clip_sample: Option<bool>,
    /// Clipping range for `clip_sample`.
    pub clip_sample_range: f64,
    /// Use ᾱ = 1 for the step past timestep 0 (DDIM, PNDM) instead of ᾱ₀; `None` means
    /// the diffusers default (`true` for DDIM, `false` for PNDM).
    pub set_alpha_to_one: Option<bool>,
    /// Dynamic thresholding (Imagen); not supported, must be `false`.
    pub thresholding: bool,
    /// DDPM variance; `None` means `fixed_small`.
    pub variance_type: Option<VarianceType>,
    /// PNDM: skip the Runge-Kutta warm-up and run PLMS only (SD 1.x ships `true`).
    pub skip_prk_steps: bool,
    /// Euler, DPM-Solver: use the Karras et al. (2022) sigma spacing.
    pub use_karras_sigmas: bool,
    /// Exponential sigma spacing; not supported, must be `false`.
    pub use_exponential_sigmas: bool,
    /// Beta-distribution sigma spacing; not supported, must be `false`.
    pub use_beta_sigmas: bool,
    /// Lu et al. lambda spacing; not supported, must be `false`.
    pub use_lu_lambdas: bool,
    /// Flow-matching sigmas; not supported, must be `false`.
    pub use_flow_sigmas: bool,
    /// Smallest sigma of the Karras spacing; `None` means the schedule's.
    pub sigma_min: Option<f64>,
    /// Largest sigma of the Karras spacing; `None` means the schedule's.
    pub sigma_max: Option<f64>,
    /// Euler, DPM-Solver: the sigma the loop ends on.
    pub final_sigmas_type: FinalSigmasType,
    /// Euler: sigma interpolation.
    pub interpolation_type: InterpolationType,
    /// Euler: timestep type passed to the model.
    pub timestep_type: TimestepType,
    /// DPM-Solver order (1, 2 or 3).
    pub solver_order: usize,
    /// DPM-Solver algorithm.
    pub algorithm_type: AlgorithmType,
    /// DPM-Solver second-order rule.
    pub solver_type: SolverType,
    /// DPM-Solver: drop to lower orders on the last steps of short (< 15 step) runs.
    pub lower_order_final: bool,
    /// DPM-Solver: use a first-order step at the very end.
    pub euler_at_final: bool,
    /// DPM-Solver: skip timesteps whose log-SNR λ is below this (diffusers writes
    /// `-Infinity`, accepted here).
    #[serde(
        deserialize_with = "de_lenient_f64",
        serialize_with = "ser_lenient_f64"
    )]
    pub lambda_min_clipped: f64,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            class_name: None,
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            rescale_betas_zero_snr: false,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: None,
            steps_offset: 0,
            clip_sample: None,
            clip_sample_range: 1.0,
            set_alpha_to_one: None,
            thresholding: false,
            variance_type: None,
            skip_prk_steps: false,
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            use_lu_lambdas: false,
            use_flow_sigmas: false,
            sigma_min: None,
            sigma_max: None,
            final_sigmas_type: FinalSigmasType::Zero,
            interpolation_type: InterpolationType::Linear,
            timestep_type: TimestepType::Discrete,
            solver_order: 2,
            algorithm_type: AlgorithmType::DpmSolverPlusPlus,
            solver_type: SolverType::Midpoint,
            lower_order_final: true,
            euler_at_final: false,
            lambda_min_clipped: f64::NEG_INFINITY,
        }
    }
}

/// The most training timesteps a schedule may have ([`SchedulerConfig::validate`]).
pub const MAX_TRAIN_TIMESTEPS: usize = 100_000;

impl SchedulerConfig {
    /// The `scheduler_config.json` of Stable Diffusion 1.5 (PNDM, `scaled_linear`
    /// 0.00085..0.012, `steps_offset` 1, ε-prediction).
    pub fn sd15() -> Self {
        Self {
            class_name: Some("PNDMScheduler".into()),
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            steps_offset: 1,
            clip_sample: Some(false),
            set_alpha_to_one: Some(false),
            skip_prk_steps: true,
            ..Self::default()
        }
    }

    /// Stable Diffusion 2.1 (768, v-prediction) with `trailing` spacing, as recommended
    /// for v-prediction models.
    pub fn sd21_v() -> Self {
        Self {
            class_name: Some("DDIMScheduler".into()),
            prediction_type: PredictionType::VPrediction,
            timestep_spacing: Some(TimestepSpacing::Trailing),
            ..Self::sd15()
        }
    }

    /// [`SchedulerConfig::sd21_v`] with the betas rescaled to zero terminal SNR.
    pub fn zero_terminal_snr_v() -> Self {
        Self {
            rescale_betas_zero_snr: true,
            ..Self::sd21_v()
        }
    }

    /// Parses and validates a config from JSON text.
    pub fn from_json_str(json: &str) -> Result<Self> {
        Self::parse(json, "<string>")
    }

    /// Reads and validates a `scheduler_config.json` file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|source| SchedError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Reads `scheduler/scheduler_config.json` from a diffusers model folder.
    pub fn from_model_dir(dir: impl AsRef<Path>) -> Result<Self> {
        Self::from_file(dir.as_ref().join("scheduler").join("scheduler_config.json"))
    }

    fn parse(json: &str, origin: &str) -> Result<Self> {
        let config: Self =
            serde_json::from_str(&quote_non_finite(json)).map_err(|source| SchedError::Parse {
                origin: origin.to_string(),
                source,
            })?;
        // A range error must name the file as well as the key: a user with several model
        // folders cannot tell from the key alone which scheduler_config.json is wrong.
        config.validate().map_err(|e| match e {
            SchedError::InvalidValue { origin: None, key, expected, found } => SchedError::InvalidValue {
                origin: Some(origin.to_string()),
                key,
                expected,
                found,
            },
            other => other,
        })?;
        Ok(config)
    }

    /// Checks value ranges that the types cannot express.
    pub fn validate(&self) -> Result<()> {
        let t = self.num_train_timesteps;
        // The schedule holds a few values per timestep: a file's absurd count would be a
        // huge allocation (every released model has 1000).
        if !(2..=MAX_TRAIN_TIMESTEPS).contains(&t) {
            return Err(invalid("num_train_timesteps", format!("2 to {MAX_TRAIN_TIMESTEPS}"), t));
        }
        if let Some(betas) = &self.trained_betas {
            if betas.len() != t {
                return Err(invalid(
                    "trained_betas",
                    format!("{t} values (num_train_timesteps)"),
                    format!("{} values", betas.len()),
                ));
            }
            if let Some(b) = betas.iter().find(|b| !(**b > 0.0 && **b < 1.0)) {
                return Err(invalid("trained_betas", "values in (0, 1)", b));
            }
        } else if self.beta_schedule != BetaSchedule::SquaredCosCapV2 {
            if !(self.beta_start > 0.0 && self.beta_start < 1.0) {
                return Err(invalid("beta_start", "a value in (0, 1)", self.beta_start));
            }
            if !(self.beta_end >= self.beta_start && self.beta_end < 1.0) {
                return Err(invalid(
                    "beta_end",
                    "a value in [beta_start, 1)",
                    self.beta_end,
                ));
            }
        }
        if self.steps_offset >= t {
            return Err(invalid(
                "steps_offset",
                "less than num_train_timesteps",
                self.steps_offset,
            ));
        }
        if !(self.clip_sample_range.is_finite() && self.clip_sample_range > 0.0) {
            return Err(invalid(
                "clip_sample_range",
                "a positive number",
                self.clip_sample_range,
            ));
        }
        if !(1..=3).contains(&self.solver_order) {
            return Err(invalid("solver_order", "1, 2 or 3", self.solver_order));
        }
        for (key, v) in [("sigma_min", self.sigma_min), ("sigma_max", self.sigma_max)] {
            if let Some(v) = v && !(v > 0.0 && v.is_finite()) {
                return Err(invalid(key, "a positive finite number", v));
            }
        }
        // Karras sigmas ramp from sigma_max down to sigma_min: the other way round they
        // rise (every step adds noise), and equal they make DPM-Solver's step h = 0 (NaN).
        // Where one bound comes from the schedule, the samplers check it when they build
        // the ramp.
        if let (Some(lo), Some(hi)) = (self.sigma_min, self.sigma_max) && lo >= hi {
            return Err(invalid(
                "sigma_min",
                format!("a value below sigma_max ({hi})"),
                lo,
            ));
        }
        if self.lambda_min_clipped.is_nan() {
            return Err(invalid(
                "lambda_min_clipped",
                "a number or -Infinity",
                "NaN",
            ));
        }
        self.check_first_alpha()?;
        self.check_alphas_cumprod()
    }

    /// Refuses a schedule whose ᾱ reaches 0 in f32 before its last timestep (a trained
    /// beta that rounds to 1, or a product of large betas that underflows): from there on
    /// σ = sqrt((1 − ᾱ) / ᾱ) is infinite and every sampler's latents turn NaN. Only the
    /// last timestep may have ᾱ = 0 (zero terminal SNR), which the samplers raise to 2⁻²⁴
    /// as diffusers does.
    fn check_alphas_cumprod(&self) -> Result<()> {
        let ac = crate::schedule::NoiseSchedule::alphas_cumprod_of(self);
        let t = ac.len();
        let Some(first_zero) = ac[..t - 1].iter().position(|a| !(*a > 0.0)) else {
            return Ok(());
        };
        let expected = format!(
            "a schedule whose cumulative alpha stays above 0 in f32 until the last timestep \
             (it is 0 from timestep {first_zero} of {t}, where sigma is infinite)"
        );
        Err(match (&self.trained_betas, self.beta_schedule) {
            (Some(b), _) => {
                let worst = b[..=first_zero].iter().cloned().fold(0.0, f64::max);
                invalid("trained_betas", expected, format!("betas up to {worst}"))
            }
            (None, BetaSchedule::SquaredCosCapV2) => invalid("num_train_timesteps", expected, t),
            (None, _) => invalid("beta_end", expected, self.beta_end),
        })
    }

    /// Refuses a schedule whose ᾱ₀ = 1 − β₀ rounds to 1 in f32 (β₀ below about 3e-8):
    /// its σ₀ and 1 − ᾱ₀ are 0, which Euler, DDIM and the SNR helpers divide by
    /// (infinite or NaN latents and weights).
    fn check_first_alpha(&self) -> Result<()> {
        let beta0 = crate::schedule::first_beta(self);
        if 1.0 - beta0 < 1.0 {
            return Ok(());
        }
        let expected = "a first beta whose 1 - beta rounds below 1 in f32 (about 3e-8 or more; \
                        otherwise sigma at timestep 0 is 0 and the samplers divide by it)";
        Err(match (&self.trained_betas, self.beta_schedule) {
            (Some(b), _) => invalid("trained_betas", expected, b[0]),
            (None, BetaSchedule::SquaredCosCapV2) => invalid(
                "num_train_timesteps",
                format!("fewer timesteps: the squaredcos_cap_v2 schedule's first beta ({beta0}) is too small, {expected}"),
                self.num_train_timesteps,
            ),
            (None, _) => invalid("beta_start", expected, self.beta_start),
        })
    }
}

fn invalid(key: &'static str, expected: impl Into<String>, found: impl ToString) -> SchedError {
    SchedError::invalid_value(key, expected, found)
}

/// Python's `json` writes `-Infinity`, `Infinity` and `NaN` bare, which is not JSON;
/// diffusers saves `lambda_min_clipped: -Infinity` that way. Quote those tokens (outside
/// strings) so serde can read them as strings.
fn quote_non_finite(json: &str) -> std::borrow::Cow<'_, str> {
    if !(json.contains("Infinity") || json.contains("NaN")) {
        return json.into();
    }
    let mut out = String::with_capacity(json.len() + 8);
    let mut in_string = false;
    let mut escaped = false;
    let mut rest = json;
    while let Some(c) = rest.chars().next() {
        if in_string {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                in_string = false;
            }
        } else if c == '"' {
            in_string = true;
        } else if let Some(tok) = ["-Infinity", "Infinity", "NaN"]
            .into_iter()
            .find(|tok| rest.starts_with(tok))
        {
            out.push('"');
            out.push_str(tok);
            out.push('"');
            rest = &rest[tok.len()..];
            continue;
        }
        out.push(c);
        rest = &rest[c.len_utf8()..];
    }
    out.into()
}

#[derive(Deserialize)]
#[serde(untagged)]
enum LenientF64 {
    Num(f64),
    Text(String),
}

fn de_lenient_f64<'de, D: Deserializer<'de>>(de: D) -> std::result::Result<f64, D::Error> {
    match Option::<LenientF64>::deserialize(de)? {
        None => Ok(f64::NEG_INFINITY),
        Some(LenientF64::Num(v)) => Ok(v),
        Some(LenientF64::Text(s)) => match s.as_str() {
            "-Infinity" | "-inf" => Ok(f64::NEG_INFINITY),
            "Infinity" | "inf" => Ok(f64::INFINITY),
            _ => Err(serde::de::Error::custom(format!(
                "expected a number or \"-Infinity\", found \"{s}\""
            ))),
        },
    }
}

fn ser_lenient_f64<S: serde::Serializer>(v: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    if v.is_finite() {
        s.serialize_f64(*v)
    } else if *v > 0.0 {
        s.serialize_str("Infinity")
    } else {
        s.serialize_str("-Infinity")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_diffusers_non_finite_floats() {
        let c = SchedulerConfig::from_json_str(
            r#"{"lambda_min_clipped": -Infinity, "_class_name": "NaN -Infinity in a string"}"#,
        )
        .unwrap();
        assert_eq!(c.lambda_min_clipped, f64::NEG_INFINITY);
        assert_eq!(c.class_name.as_deref(), Some("NaN -Infinity in a string"));
        let c = SchedulerConfig::from_json_str(r#"{"lambda_min_clipped": -5.1}"#).unwrap();
        assert_eq!(c.lambda_min_clipped, -5.1);
        assert!(SchedulerConfig::from_json_str(r#"{"lambda_min_clipped": NaN}"#).is_err());
    }

    #[test]
    fn round_trips_through_json() {
        let c = SchedulerConfig::zero_terminal_snr_v();
        let back = SchedulerConfig::from_json_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }
}
