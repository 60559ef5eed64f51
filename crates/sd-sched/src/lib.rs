//! # sd-sched
//!
//! Noise schedules, training targets and samplers for Stable Diffusion on
//! [burn](https://burn.dev), reproducing diffusers step for step.
//!
//! - [`SchedulerConfig`]: a diffusers `scheduler/scheduler_config.json` (serde; unknown
//!   keys ignored, bad values rejected with a typed [`SchedError`]), with presets
//!   [`SchedulerConfig::sd15`], [`SchedulerConfig::sd21_v`] and
//!   [`SchedulerConfig::zero_terminal_snr_v`].
//! - [`NoiseSchedule`]: betas and ᾱ for `linear`, `scaled_linear` and
//!   `squaredcos_cap_v2`, optionally rescaled to zero terminal SNR, computed with
//!   diffusers' own dtype choices.
//! - [`training`]: `add_noise`, velocity and ε / v / x₀ targets, SNR, min-SNR-γ weights,
//!   noise offset and seeded timestep sampling, batched on device tensors.
//! - [`Sampler`]: DDPM, DDIM (η), PNDM/PLMS, Euler, Euler ancestral, Heun, DPM2 (and
//!   ancestral), LMS, DPM-Solver++ (2M, 3M, 2M SDE, Karras sigmas) and DPM-Solver
//!   (multistep and singlestep), built by name through [`SamplerSpec`] or
//!   [`SamplerKind`]. Stochastic samplers draw from an explicit [`NoiseSource`]. A run
//!   can start part-way from a noised image (img2img: [`img2img_start`],
//!   [`Sampler::set_begin_index`], [`Sampler::add_noise`]).
//!
//! Parity: the tests replay full diffusers sampling loops (SD 1.5, SD 2.1 v-prediction
//! with trailing spacing, zero terminal SNR, ...) recorded by
//! `xtask/fixtures/sd_sched.py` and match every intermediate latent to 1e-5.
//!
//! ```
//! use burn::backend::Flex;
//! use burn::tensor::Tensor;
//! use sd_sched::{NoiseSource, SamplerSpec, SchedulerConfig, SeededNoise};
//!
//! type B = Flex;
//! let device = Default::default();
//! let mut sampler = "euler_a".parse::<SamplerSpec>().unwrap()
//!     .build::<B>(&SchedulerConfig::sd15()).unwrap();
//! sampler.set_timesteps(10).unwrap();
//!
//! let mut noise = SeededNoise::new(0);
//! let mut x = noise.sample([1, 4, 8, 8], &device).unwrap().mul_scalar(sampler.init_noise_sigma());
//! for i in 0..sampler.timesteps().len() {
//!     let input = sampler.scale_model_input(x.clone(), i).unwrap();
//!     let eps = input.mul_scalar(0.1); // a real UNet goes here
//!     x = sampler.step(eps, i, x, &mut noise).unwrap();
//! }
//! assert_eq!(x.dims(), [1, 4, 8, 8]);
//! ```
//!
//! ## Depending on this crate
//!
//! Its API takes and returns [burn](https://burn.dev) 0.21 types (`Tensor<B, D>`,
//! `Module<B>`, backends). Use the same burn, re-exported as [`sd_sched::burn`](crate::burn),
//! or depend on `burn = "=0.21.0"` yourself: a second burn version's types would not fit.
#![deny(missing_docs)]

/// The burn this crate is built on (0.21), for its API's types without a burn dependency of
/// one's own.
pub use burn;

mod config;
mod error;
mod noise;
mod numerics;
mod sampler;
mod schedule;
pub mod training;

pub use config::{
    AlgorithmType, BetaSchedule, FinalSigmasType, InterpolationType, PredictionType,
    SchedulerConfig, SolverType, TimestepSpacing, TimestepType, VarianceType,
};
pub use error::{Result, SchedError};
pub use noise::{NoNoise, NoiseSource, RngState, SeededNoise, TensorQueue};
pub use sampler::{
    DdimSampler, DdpmSampler, DpmSolverMultistepSampler, DpmSolverSinglestepSampler, EulerAncestralSampler, EulerSampler,
    PndmSampler, Sampler, SamplerKind, SamplerSpec, img2img_start,
};
pub use schedule::NoiseSchedule;
