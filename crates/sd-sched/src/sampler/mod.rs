//! Samplers (diffusers "schedulers") behind one trait.

use std::fmt;
use std::str::FromStr;

use burn::tensor::{backend::Backend, Tensor};

use crate::config::{AlgorithmType, FinalSigmasType, PredictionType, SchedulerConfig};
use crate::error::{Result, SchedError};
use crate::noise::NoiseSource;

mod ddim;
mod ddpm;
mod dpm;
mod dpm_single;
mod euler;
mod heun;
mod kdpm2;
mod lms;
mod pndm;
mod spacing;

pub use ddim::DdimSampler;
pub use ddpm::DdpmSampler;
pub use dpm::DpmSolverMultistepSampler;
pub use dpm_single::DpmSolverSinglestepSampler;
pub use euler::{EulerAncestralSampler, EulerSampler};
pub use heun::HeunSampler;
pub use kdpm2::{KDpm2AncestralSampler, KDpm2Sampler};
pub use lms::LmsSampler;
pub use pndm::PndmSampler;

/// A reverse-process sampler, stepped like a diffusers scheduler:
///
/// ```text
/// sampler.set_timesteps(n)?;
/// let mut x = initial_noise * sampler.init_noise_sigma();
/// for i in 0..sampler.timesteps().len() {
///     let input = sampler.scale_model_input(x.clone(), i)?;
///     let out = model(input, sampler.timesteps()[i]);
///     x = sampler.step(out, i, x, &mut noise)?;
/// }
/// ```
///
/// Steps are addressed by their index into [`Sampler::timesteps`] rather than by timestep
/// value (PNDM repeats a timestep). Multistep samplers keep history and must be stepped
/// in order from 0; [`Sampler::set_timesteps`] resets them. All tensor work stays on the
/// latents' device; per-step coefficients are host scalars computed from the schedule.
pub trait Sampler<B: Backend>: Send {
    /// The diffusers class this sampler reproduces, e.g. `"EulerDiscreteScheduler"`.
    fn class_name(&self) -> &'static str;

    /// Prepares `num_inference_steps` steps and resets any multistep history.
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()>;

    /// The timesteps to condition the model on, one per step, in order (empty before
    /// [`Sampler::set_timesteps`]). Training-timestep units; fractional for some
    /// Euler configurations.
    fn timesteps(&self) -> &[f32];

    /// The noise levels σ of the sigma-based samplers, laid out as diffusers' `sigmas`:
    /// one per step and the final one (one more than the timesteps) for the one-call
    /// samplers and Heun (whose σs are interleaved with its timesteps), and for DPM2 (both)
    /// the steps' σs interleaved, two more than for Heun, with their midpoints kept apart.
    /// `None` for the ᾱ-based ones.
    fn sigmas(&self) -> Option<&[f32]> {
        None
    }

    /// Standard deviation of the initial latents: multiply N(0, 1) noise by this (1 for the
    /// ᾱ-based samplers, the default).
    fn init_noise_sigma(&self) -> f32 {
        1.0
    }

    /// Scales the latents before they are fed to the model at step `step_index`
    /// (divides by `sqrt(σ² + 1)` for the Euler samplers; the default is the identity,
    /// after checking `step_index` against [`Sampler::timesteps`]).
    fn scale_model_input(&self, sample: Tensor<B, 4>, step_index: usize) -> Result<Tensor<B, 4>> {
        check_index(self.timesteps().len(), step_index)?;
        Ok(sample)
    }

    /// Advances `sample` from step `step_index` to the next, given the model's output
    /// on `scale_model_input(sample)`. Stochastic samplers draw from `noise`.
    fn step(
        &mut self,
        model_output: Tensor<B, 4>,
        step_index: usize,
        sample: Tensor<B, 4>,
        noise: &mut dyn NoiseSource<B>,
    ) -> Result<Tensor<B, 4>>;

    /// Model evaluations per step of the method (diffusers' `order`): 2 for Heun and the
    /// DPM-2 samplers, whose [`Sampler::timesteps`] hold both evaluations of each step, 1
    /// for the others. [`img2img_start`] counts in steps of this many entries.
    fn order(&self) -> usize {
        1
    }

    /// Makes step `step_index` the first of the run (diffusers' `set_begin_index`), for
    /// sampling that starts from a partly noised image ([`img2img_start`]); call it after
    /// [`Sampler::set_timesteps`]. Multistep history starts empty there, as in diffusers:
    /// the first steps then run at the lower orders a run from step 0 starts with.
    fn set_begin_index(&mut self, step_index: usize) -> Result<()> {
        check_index(self.timesteps().len(), step_index)
    }

    /// `original` (clean latents) noised with standard-normal `noise` to the noise level
    /// at step `step_index`, the latents a run beginning there starts from (diffusers'
    /// `add_noise` at its begin index): `sqrt(ᾱₜ)·x₀ + sqrt(1 − ᾱₜ)·ε` for the ᾱ-based
    /// samplers (DDPM, DDIM, PNDM), `x₀ + σ·ε` for the σ-space ones, `α·x₀ + σ_t·ε` with
    /// `α = 1 / sqrt(σ² + 1)`, `σ_t = σ·α` for the DPM-Solvers.
    ///
    /// ```
    /// use burn::backend::Flex;
    /// use burn::tensor::Tensor;
    /// use sd_sched::{Sampler, SamplerSpec, SchedulerConfig};
    ///
    /// let device = Default::default();
    /// let mut sampler = "euler".parse::<SamplerSpec>().unwrap().build::<Flex>(&SchedulerConfig::sd15()).unwrap();
    /// sampler.set_timesteps(10).unwrap();
    /// let x0 = Tensor::<Flex, 4>::zeros([1, 4, 8, 8], &device);
    /// let noise = Tensor::<Flex, 4>::ones([1, 4, 8, 8], &device);
    /// let x = sampler.add_noise(x0, noise, 3).unwrap();
    /// let sigma = sampler.sigmas().unwrap()[3];
    /// assert!((x.max().into_scalar() - sigma).abs() < 1e-5);
    /// ```
    fn add_noise(&self, original: Tensor<B, 4>, noise: Tensor<B, 4>, step_index: usize) -> Result<Tensor<B, 4>> {
        check_index(self.timesteps().len(), step_index)?;
        check_noise_shape(&original, &noise)?;
        // The ᾱ-based samplers of this crate implement it themselves; another sampler
        // without σs must too.
        let Some(&sigma) = self.sigmas().and_then(|sigmas| sigmas.get(step_index)) else {
            return Err(SchedError::Unsupported { sampler: self.class_name(), key: "add_noise", value: "a sampler without sigmas".into() });
        };
        Ok(original + noise.mul_scalar(sigma))
    }
}

/// The first step of a run that denoises a noised image at `strength` (0 < strength ≤ 1:
/// the share of the `steps` steps that run, 1 starting from pure noise), for a sampler of
/// [`Sampler::order`] `order`: diffusers' img2img `get_timesteps`
/// (`t_start = steps − min(int(steps·strength), steps)`, times the order). An error where
/// no step would run (strength ≤ 0, or too small for `steps`) or strength is above 1.
///
/// ```
/// use sd_sched::img2img_start;
/// assert_eq!(img2img_start(25, 0.8, 1).unwrap(), 5); // 20 of 25 steps run
/// assert_eq!(img2img_start(10, 1.0, 2).unwrap(), 0);
/// assert_eq!(img2img_start(10, 0.35, 2).unwrap(), 14); // Heun: 3 steps from index 2 · 7
/// assert!(img2img_start(10, 0.05, 1).is_err());
/// ```
pub fn img2img_start(steps: usize, strength: f64, order: usize) -> Result<usize> {
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(SchedError::InvalidArgument {
            name: "strength",
            reason: format!("must be in (0, 1] (the share of the steps that denoise the image), got {strength}"),
        });
    }
    // Python's `int()` of the product: truncation.
    let run = ((steps as f64 * strength) as usize).min(steps);
    if run == 0 {
        return Err(SchedError::InvalidArgument {
            name: "strength",
            reason: format!("{strength} of {steps} steps leaves no step to run; raise the strength or the step count"),
        });
    }
    Ok((steps - run) * order.max(1))
}

/// Rejects noise of another shape than the latents it is added to.
pub(crate) fn check_noise_shape<B: Backend>(original: &Tensor<B, 4>, noise: &Tensor<B, 4>) -> Result<()> {
    if original.dims() != noise.dims() {
        return Err(SchedError::InvalidArgument {
            name: "noise",
            reason: format!("shape {:?} differs from the latents' {:?}", noise.dims(), original.dims()),
        });
    }
    Ok(())
}

/// `sqrt(ᾱ)·x₀ + sqrt(1 − ᾱ)·ε` for the ᾱ of `timestep` (a whole training timestep), as
/// diffusers' DDPM-family `add_noise` computes it (square roots in f32).
pub(crate) fn add_noise_alpha<B: Backend>(original: Tensor<B, 4>, noise: Tensor<B, 4>, alphas_cumprod: &[f32], timestep: f32) -> Result<Tensor<B, 4>> {
    check_noise_shape(&original, &noise)?;
    let a = alphas_cumprod[timestep as usize];
    Ok(original.mul_scalar(a.sqrt()) + noise.mul_scalar((1.0 - a).sqrt()))
}

/// The sampler families, named after their diffusers classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SamplerKind {
    /// `DDPMScheduler`: ancestral sampling of Ho et al. (2020).
    Ddpm,
    /// `DDIMScheduler`: Song et al. (2021), with η.
    Ddim,
    /// `PNDMScheduler`: pseudo numerical methods (PRK warm-up + PLMS); SD 1.x's default.
    Pndm,
    /// `EulerDiscreteScheduler`: Euler method of Karras et al. (2022).
    Euler,
    /// `EulerAncestralDiscreteScheduler`: Euler with ancestral noise ("Euler a").
    EulerAncestral,
    /// `DPMSolverMultistepScheduler`: DPM-Solver++ (2M, 3M, SDE) and DPM-Solver.
    DpmSolverMultistep,
    /// `DPMSolverSinglestepScheduler`: DPM-Solver(++) in single-step blocks (kohya's
    /// `dpmsingle`).
    DpmSolverSinglestep,
    /// `HeunDiscreteScheduler`: Heun's method of Karras et al. (2022).
    Heun,
    /// `KDPM2DiscreteScheduler`: DPM-Solver-2 ("DPM2").
    KDpm2,
    /// `KDPM2AncestralDiscreteScheduler`: DPM-Solver-2 with ancestral noise ("DPM2 a").
    KDpm2Ancestral,
    /// `LMSDiscreteScheduler`: linear multistep ("LMS").
    Lms,
}

impl SamplerKind {
    /// Every kind.
    pub const ALL: [SamplerKind; 11] = [
        SamplerKind::Ddpm,
        SamplerKind::Ddim,
        SamplerKind::Pndm,
        SamplerKind::Euler,
        SamplerKind::EulerAncestral,
        SamplerKind::DpmSolverMultistep,
        SamplerKind::DpmSolverSinglestep,
        SamplerKind::Heun,
        SamplerKind::KDpm2,
        SamplerKind::KDpm2Ancestral,
        SamplerKind::Lms,
    ];

    /// The diffusers class name.
    pub fn class_name(self) -> &'static str {
        match self {
            SamplerKind::Ddpm => "DDPMScheduler",
            SamplerKind::Ddim => "DDIMScheduler",
            SamplerKind::Pndm => "PNDMScheduler",
            SamplerKind::Euler => "EulerDiscreteScheduler",
            SamplerKind::EulerAncestral => "EulerAncestralDiscreteScheduler",
            SamplerKind::DpmSolverMultistep => "DPMSolverMultistepScheduler",
            SamplerKind::DpmSolverSinglestep => "DPMSolverSinglestepScheduler",
            SamplerKind::Heun => "HeunDiscreteScheduler",
            SamplerKind::KDpm2 => "KDPM2DiscreteScheduler",
            SamplerKind::KDpm2Ancestral => "KDPM2AncestralDiscreteScheduler",
            SamplerKind::Lms => "LMSDiscreteScheduler",
        }
    }

    /// The kind a config's `_class_name` names, if it is one of ours.
    pub fn from_config(config: &SchedulerConfig) -> Option<Self> {
        let name = config.class_name.as_deref()?;
        Self::ALL.into_iter().find(|k| k.class_name() == name)
    }

    /// Builds this sampler from `config`; fails on options the sampler does not support.
    pub fn build<B: Backend>(self, config: &SchedulerConfig) -> Result<Box<dyn Sampler<B>>> {
        Ok(match self {
            SamplerKind::Ddpm => Box::new(DdpmSampler::new(config)?),
            SamplerKind::Ddim => Box::new(DdimSampler::new(config, 0.0)?),
            SamplerKind::Pndm => Box::new(PndmSampler::<B>::new(config)?),
            SamplerKind::Euler => Box::new(EulerSampler::new(config)?),
            SamplerKind::EulerAncestral => Box::new(EulerAncestralSampler::new(config)?),
            SamplerKind::DpmSolverMultistep => {
                Box::new(DpmSolverMultistepSampler::<B>::new(config)?)
            }
            SamplerKind::DpmSolverSinglestep => {
                Box::new(DpmSolverSinglestepSampler::<B>::new(config)?)
            }
            SamplerKind::Heun => Box::new(HeunSampler::<B>::new(config)?),
            SamplerKind::KDpm2 => Box::new(KDpm2Sampler::<B>::new(config)?),
            SamplerKind::KDpm2Ancestral => Box::new(KDpm2AncestralSampler::<B>::new(config)?),
            SamplerKind::Lms => Box::new(LmsSampler::<B>::new(config)?),
        })
    }
}

impl fmt::Display for SamplerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.class_name())
    }
}

pub(crate) const KNOWN_NAMES: &str = "ddpm, ddim, pndm, plms, euler, euler_karras, euler_a, \
     dpmpp_2m, dpmpp_2m_karras, dpmpp_2m_sde, dpmpp_2m_sde_karras, dpmpp_3m, dpmpp_3m_karras, \
     dpmsolver, dpmsolver_karras, dpmsingle, dpmsingle_karras, heun, heun_karras, dpm_2, dpm_2_karras, dpm_2_a, dpm_2_a_karras, lms, lms_karras \
     (or A1111's names of these, such as `DPM++ 2M Karras` and `Euler a`)";

/// A sampler by name plus the config overrides the name implies, parsed from a diffusers
/// class name (`"EulerAncestralDiscreteScheduler"`) or a short name (`"euler_a"`,
/// `"dpmpp_2m_karras"`, ...; see [`SamplerSpec::from_str`]).
///
/// ```
/// use burn::backend::Flex;
/// use sd_sched::{SamplerKind, SamplerSpec, SchedulerConfig};
///
/// let spec: SamplerSpec = "dpmpp_2m_karras".parse().unwrap();
/// assert_eq!(spec.kind, SamplerKind::DpmSolverMultistep);
/// let mut sampler = spec.build::<Flex>(&SchedulerConfig::sd15()).unwrap();
/// sampler.set_timesteps(20).unwrap();
/// assert_eq!(sampler.timesteps().len(), 20);
/// assert_eq!(sampler.timesteps()[0], 999.0);
/// assert_eq!("k_lms".parse::<SamplerSpec>().unwrap().kind, SamplerKind::Lms);
/// // A1111's menu names, as copied into prompt files.
/// assert_eq!("DPM++ 2M Karras".parse::<SamplerSpec>().unwrap(), spec);
/// assert_eq!("Euler a".parse::<SamplerSpec>().unwrap().kind, SamplerKind::EulerAncestral);
/// assert_eq!("DPM2 a Karras".parse::<SamplerSpec>().unwrap(), "dpm_2_a_karras".parse().unwrap());
/// assert!("k_dpm_fast".parse::<SamplerSpec>().is_err());
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct SamplerSpec {
    /// The sampler family.
    pub kind: SamplerKind,
    /// Override of `use_karras_sigmas`.
    pub use_karras_sigmas: Option<bool>,
    /// Override of `algorithm_type`.
    pub algorithm_type: Option<AlgorithmType>,
    /// Override of `solver_order`.
    pub solver_order: Option<usize>,
    /// Override of `final_sigmas_type`.
    pub final_sigmas_type: Option<FinalSigmasType>,
    /// Override of `lower_order_final`.
    pub lower_order_final: Option<bool>,
    /// DDIM's η (0 = deterministic DDIM, 1 = DDPM-like noise).
    pub eta: f64,
}

impl SamplerSpec {
    /// A spec for `kind` with no overrides.
    pub fn new(kind: SamplerKind) -> Self {
        Self {
            kind,
            use_karras_sigmas: None,
            algorithm_type: None,
            solver_order: None,
            final_sigmas_type: None,
            lower_order_final: None,
            eta: 0.0,
        }
    }

    /// `config` with this spec's overrides applied.
    pub fn apply(&self, config: &SchedulerConfig) -> SchedulerConfig {
        let mut c = config.clone();
        if let Some(k) = self.use_karras_sigmas {
            c.use_karras_sigmas = k;
        }
        if let Some(a) = self.algorithm_type {
            c.algorithm_type = a;
        }
        if let Some(o) = self.solver_order {
            c.solver_order = o;
        }
        if let Some(f) = self.final_sigmas_type {
            c.final_sigmas_type = f;
        }
        if let Some(l) = self.lower_order_final {
            c.lower_order_final = l;
        }
        c
    }

    /// Builds the sampler from `config` with this spec's overrides.
    pub fn build<B: Backend>(&self, config: &SchedulerConfig) -> Result<Box<dyn Sampler<B>>> {
        let config = self.apply(config);
        match self.kind {
            SamplerKind::Ddim => Ok(Box::new(DdimSampler::new(&config, self.eta)?)),
            kind => kind.build(&config),
        }
    }
}

impl FromStr for SamplerSpec {
    type Err = SchedError;

    /// Accepts the diffusers class names and, case-insensitively: `ddpm`, `ddim`,
    /// `pndm` / `plms`, `euler`, `euler_karras`, `euler_a` / `euler_ancestral`,
    /// `dpmpp_2m`, `dpmpp_2m_karras`, `dpmpp_2m_sde`, `dpmpp_2m_sde_karras`, `dpmpp_3m`,
    /// `dpmpp_3m_karras`, `dpmsolver`, `dpmsolver_karras` (DPM-Solver multistep of order
    /// 2, ending at `sigma_min` as it must), `dpmsingle`, `dpmsingle_karras` (DPM-Solver++
    /// singlestep of order 2 with diffusers' defaults for that class, kohya's
    /// `dpmsingle`), `heun`, `heun_karras`, `dpm_2` / `kdpm2`, `dpm_2_karras`,
    /// `dpm_2_a` / `kdpm2_a` / `dpm_2_ancestral`, `dpm_2_a_karras`, `lms`, `lms_karras` (a
    /// leading `k_`, as in kohya's names, is accepted), and the names A1111's sampler menu
    /// shows for these (`Euler a`, `DPM2 a Karras`, `DPM++ 2M SDE Karras`, `LMS`, ...: `++`
    /// read as `pp`, spaces as `_`), as users copy them into prompt files.
    fn from_str(name: &str) -> Result<Self> {
        if let Some(kind) = SamplerKind::ALL
            .into_iter()
            .find(|k| k.class_name() == name)
        {
            // The singlestep class's own default, which differs from the multistep one's.
            let lower_order_final = (kind == SamplerKind::DpmSolverSinglestep).then_some(false);
            return Ok(Self { lower_order_final, ..Self::new(kind) });
        }
        let dpm = |karras: bool, algorithm: AlgorithmType, order: usize| SamplerSpec {
            use_karras_sigmas: Some(karras),
            algorithm_type: Some(algorithm),
            solver_order: Some(order),
            ..Self::new(SamplerKind::DpmSolverMultistep)
        };
        let (pp, sde) = (
            AlgorithmType::DpmSolverPlusPlus,
            AlgorithmType::SdeDpmSolverPlusPlus,
        );
        let sigma = |kind: SamplerKind, karras: bool| SamplerSpec {
            use_karras_sigmas: Some(karras),
            ..Self::new(kind)
        };
        // A1111's menu names ("DPM++ 2M Karras", "Euler a", "DPM2 a"): `++` → `pp`,
        // spaces → `_`, `dpm2` → `dpm_2`.
        let lower = name.trim().to_ascii_lowercase().replace('-', "_").replace("++", "pp").replace(' ', "_");
        let lower = match lower.strip_prefix("dpm2") {
            Some(rest) => format!("dpm_2{rest}"),
            None => lower,
        };
        let short = match lower.strip_prefix("k_") {
            // kohya's five `k_*` names (sd-scripts has no `k_heun`).
            Some(rest) if matches!(rest, "dpm_2" | "dpm_2_a" | "euler" | "euler_a" | "lms") => rest,
            _ => lower.as_str(),
        };
        Ok(match short {
            "ddpm" => Self::new(SamplerKind::Ddpm),
            "ddim" => Self::new(SamplerKind::Ddim),
            "pndm" | "plms" => Self::new(SamplerKind::Pndm),
            "euler" => Self {
                use_karras_sigmas: Some(false),
                ..Self::new(SamplerKind::Euler)
            },
            "euler_karras" => Self {
                use_karras_sigmas: Some(true),
                ..Self::new(SamplerKind::Euler)
            },
            "euler_a" | "euler_ancestral" => Self::new(SamplerKind::EulerAncestral),
            "dpmpp_2m" => dpm(false, pp, 2),
            "dpmpp_2m_karras" => dpm(true, pp, 2),
            "dpmpp_2m_sde" => dpm(false, sde, 2),
            "dpmpp_2m_sde_karras" => dpm(true, sde, 2),
            "dpmpp_3m" => dpm(false, pp, 3),
            "dpmpp_3m_karras" => dpm(true, pp, 3),
            "dpmsolver" | "dpmsolver_karras" => SamplerSpec {
                final_sigmas_type: Some(FinalSigmasType::SigmaMin),
                ..dpm(short.ends_with("_karras"), AlgorithmType::DpmSolver, 2)
            },
            "dpmsingle" | "dpmsingle_karras" => SamplerSpec {
                kind: SamplerKind::DpmSolverSinglestep,
                lower_order_final: Some(false),
                ..dpm(short.ends_with("_karras"), pp, 2)
            },
            "heun" => sigma(SamplerKind::Heun, false),
            "heun_karras" => sigma(SamplerKind::Heun, true),
            "dpm_2" | "kdpm2" => sigma(SamplerKind::KDpm2, false),
            "dpm_2_karras" | "kdpm2_karras" => sigma(SamplerKind::KDpm2, true),
            "dpm_2_a" | "kdpm2_a" | "dpm_2_ancestral" => sigma(SamplerKind::KDpm2Ancestral, false),
            "dpm_2_a_karras" | "kdpm2_a_karras" => sigma(SamplerKind::KDpm2Ancestral, true),
            "lms" => sigma(SamplerKind::Lms, false),
            "lms_karras" => sigma(SamplerKind::Lms, true),
            _ => return Err(SchedError::UnknownSampler(name.to_string())),
        })
    }
}

/// Rejects a step index past the end, or any step before `set_timesteps`.
pub(crate) fn check_index(len: usize, index: usize) -> Result<()> {
    if len == 0 {
        return Err(SchedError::TimestepsNotSet);
    }
    if index >= len {
        return Err(SchedError::StepOutOfRange { index, len });
    }
    Ok(())
}

/// Rejects a step other than `expected` (samplers with history must be stepped in order).
pub(crate) fn check_order(sampler: &'static str, expected: usize, got: usize) -> Result<()> {
    if got != expected {
        return Err(SchedError::StepOutOfOrder { sampler, expected, got });
    }
    Ok(())
}

/// Rejects a first step that is out of range or not the first evaluation of a step of a
/// sampler of order `order` (its timesteps hold `order` evaluations per step).
pub(crate) fn check_step_start(sampler: &'static str, len: usize, index: usize, order: usize) -> Result<()> {
    check_index(len, index)?;
    if !index.is_multiple_of(order) {
        return Err(SchedError::InvalidArgument {
            name: "step_index",
            reason: format!("{sampler} takes {order} entries of its timesteps per step: a run must begin at a multiple of {order}, got {index}"),
        });
    }
    Ok(())
}

/// Rejects timesteps past the schedule's last (`T - 1`), which the samplers that index ᾱ
/// by timestep cannot take: `"leading"` spacing adds `steps_offset` to steps up to `T - 1`
/// (diffusers fails there with an index error).
pub(crate) fn check_fit(timesteps: impl IntoIterator<Item = f64>, n: usize, num_train_timesteps: usize, steps_offset: usize) -> Result<()> {
    let last = (num_train_timesteps - 1) as f64;
    match timesteps.into_iter().find(|t| *t > last) {
        Some(t) => Err(SchedError::InvalidSteps {
            steps: n,
            expected: format!(
                "fewer steps or a smaller steps_offset ({steps_offset}): a timestep would be {t}, past the schedule's last, {last} (num_train_timesteps - 1)"
            ),
        }),
        None => Ok(()),
    }
}

/// Rejects `n` outside `1..=T`.
pub(crate) fn check_steps(n: usize, num_train_timesteps: usize) -> Result<()> {
    if n == 0 || n > num_train_timesteps {
        return Err(SchedError::InvalidSteps {
            steps: n,
            expected: format!("1..={num_train_timesteps} (num_train_timesteps)"),
        });
    }
    Ok(())
}

pub(crate) fn unsupported(
    sampler: &'static str,
    key: &'static str,
    value: impl fmt::Debug,
) -> SchedError {
    SchedError::Unsupported {
        sampler,
        key,
        value: format!("{value:?}"),
    }
}

/// Config options no sampler here implements.
pub(crate) fn reject_common(config: &SchedulerConfig, sampler: &'static str) -> Result<()> {
    config.validate()?;
    if config.thresholding {
        return Err(unsupported(sampler, "thresholding", true));
    }
    Ok(())
}

/// Predicted x₀ from the model output at ᾱₜ, as DDPM writes it (f32 scalars).
pub(crate) fn predict_x0<B: Backend>(
    prediction: PredictionType,
    alpha_prod_t: f32,
    model_output: Tensor<B, 4>,
    sample: &Tensor<B, 4>,
) -> Tensor<B, 4> {
    let (sa, sb) = (alpha_prod_t.sqrt(), (1.0 - alpha_prod_t).sqrt());
    match prediction {
        PredictionType::Epsilon => (sample.clone() - model_output.mul_scalar(sb)).div_scalar(sa),
        PredictionType::Sample => model_output,
        PredictionType::VPrediction => sample.clone().mul_scalar(sa) - model_output.mul_scalar(sb),
    }
}

/// Predicted x₀ and ε from the model output at ᾱₜ, as DDIM writes it (f32 scalars).
pub(crate) fn ddim_x0_eps<B: Backend>(
    prediction: PredictionType,
    alpha_prod_t: f32,
    model_output: Tensor<B, 4>,
    sample: &Tensor<B, 4>,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let beta_prod_t = 1.0 - alpha_prod_t;
    let (sa, sb) = (alpha_prod_t.sqrt(), beta_prod_t.sqrt());
    match prediction {
        PredictionType::Epsilon => {
            let x0 = (sample.clone() - model_output.clone().mul_scalar(sb)).div_scalar(sa);
            (x0, model_output)
        }
        PredictionType::Sample => {
            let eps = (sample.clone() - model_output.clone().mul_scalar(sa)).div_scalar(sb);
            (model_output, eps)
        }
        PredictionType::VPrediction => {
            let x0 = sample.clone().mul_scalar(sa) - model_output.clone().mul_scalar(sb);
            let eps = model_output.mul_scalar(sa) + sample.clone().mul_scalar(sb);
            (x0, eps)
        }
    }
}
