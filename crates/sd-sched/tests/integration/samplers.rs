//! Sampler laws: timestep layouts, exact denoising of a point mass, noise discipline and
//! step-order errors.

use crate::common;

use burn::tensor::{Tensor, TensorData};
use common::*;
use proptest::prelude::*;
use sd_sched::{
    NoNoise, NoiseSchedule, NoiseSource, PredictionType, Sampler, SamplerKind, SamplerSpec,
    SchedError, SchedulerConfig, SeededNoise, TimestepSpacing,
};

const DETERMINISTIC: [&str; 7] = [
    "ddim",
    "pndm",
    "euler",
    "euler_karras",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "dpmpp_3m",
];
const STOCHASTIC: [&str; 4] = ["ddpm", "euler_a", "dpmpp_2m_sde", "dpmpp_2m_sde_karras"];

fn sampler(name: &str, config: &SchedulerConfig) -> Box<dyn Sampler<B>> {
    name.parse::<SamplerSpec>()
        .unwrap()
        .build::<B>(config)
        .unwrap()
}

fn spacing_strategy() -> impl Strategy<Value = TimestepSpacing> {
    prop_oneof![
        Just(TimestepSpacing::Leading),
        Just(TimestepSpacing::Trailing),
        Just(TimestepSpacing::Linspace)
    ]
}

fn constant(value: f32) -> Tensor<B, 4> {
    Tensor::from_data(
        TensorData::new(vec![value; 16], [1, 1, 4, 4]),
        &Default::default(),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Timesteps descend within [0, T) and there is one per step. Only PNDM (its
    /// two-evaluation first step) and rounded Karras timesteps (dense near t = 0) repeat.
    #[test]
    fn timesteps_descend_within_range(n in 1usize..=100, spacing in spacing_strategy(), offset in 0usize..2) {
        let config = SchedulerConfig {
            timestep_spacing: Some(spacing),
            steps_offset: offset,
            ..SchedulerConfig::sd15()
        };
        for name in DETERMINISTIC.iter().chain(&STOCHASTIC) {
            let mut s = sampler(name, &config);
            s.set_timesteps(n).unwrap();
            let ts = s.timesteps();
            // PNDM evaluates its second timestep twice.
            let steps = if *name == "pndm" && n > 1 { n + 1 } else { n };
            prop_assert_eq!(ts.len(), steps, "{}: {:?}", name, ts);
            prop_assert!(ts.iter().all(|t| (0.0..1000.0).contains(t)), "{name}: {ts:?}");
            let repeats = ts.windows(2).filter(|w| w[1] == w[0]).count();
            prop_assert!(ts.windows(2).all(|w| w[1] <= w[0]), "{name}: {ts:?}");
            if *name == "pndm" {
                prop_assert_eq!(repeats, usize::from(n > 1), "{}: {:?}", name, ts);
            } else if !name.contains("karras") {
                prop_assert_eq!(repeats, 0, "{}: {:?}", name, ts);
            }
            if let Some(sig) = s.sigmas() {
                prop_assert_eq!(sig.len(), ts.len() + 1);
                prop_assert!(sig.windows(2).all(|w| w[1] <= w[0]), "{name}: sigmas {sig:?}");
            }
        }
    }

    /// With an oracle model that knows x₀, every deterministic sampler follows the exact
    /// probability-flow trajectory of a point mass and lands on x₀.
    #[test]
    fn deterministic_samplers_denoise_a_point_mass(
        x0 in -1.0f32..1.0,
        n in 4usize..40,
        v_pred in any::<bool>(),
        spacing in spacing_strategy(),
    ) {
        let config = SchedulerConfig {
            prediction_type: if v_pred { PredictionType::VPrediction } else { PredictionType::Epsilon },
            timestep_spacing: Some(spacing),
            // End DDIM/PNDM on ᾱ = 1 (a clean sample), as the sigma samplers end on σ = 0.
            set_alpha_to_one: Some(true),
            ..SchedulerConfig::sd15()
        };
        let schedule = NoiseSchedule::new(&config).unwrap();
        for name in DETERMINISTIC {
            // DDIM and PNDM step from t to t − T/n whatever the spacing (as in diffusers),
            // which matches the next timestep only for `leading`.
            if matches!(name, "ddim" | "pndm") && spacing != TimestepSpacing::Leading {
                continue;
            }
            // PLMS extrapolates raw model outputs across timesteps: exact for ε (constant
            // along a point mass's trajectory), not for v (diffusers does the same).
            if name == "pndm" && v_pred {
                continue;
            }
            let mut s = sampler(name, &config);
            s.set_timesteps(n).unwrap();
            let mut x = SeededNoise::new(3).sample([1, 1, 4, 4], &Default::default()).unwrap()
                .mul_scalar(s.init_noise_sigma());
            for i in 0..s.timesteps().len() {
                let input = s.scale_model_input(x.clone(), i).unwrap();
                let out = oracle(&schedule, &config, s.as_ref(), i, input, x0);
                x = s.step(out, i, x, &mut NoNoise).unwrap();
            }
            let got = to_vec(x);
            let err = got.iter().map(|v| (v - x0).abs()).fold(0f32, f32::max);
            prop_assert!(err < 2e-3, "{name} ({n} steps, {spacing:?}, v={v_pred}): |x - x0| = {err}");
        }
    }
}

/// The exact ε or v of a point mass at `x0`, given the model input at step `i`.
fn oracle(
    schedule: &NoiseSchedule,
    config: &SchedulerConfig,
    s: &dyn Sampler<B>,
    i: usize,
    input: Tensor<B, 4>,
    x0: f32,
) -> Tensor<B, 4> {
    // The (VP-scaled) model input is sqrt(ᾱ)·x₀ + sqrt(1 − ᾱ)·ε at the sampler's noise
    // level; recover ᾱ from σ for sigma-based samplers and from t otherwise.
    let alpha_bar = match s.sigmas() {
        Some(sig) => 1.0 / (sig[i] as f64 * sig[i] as f64 + 1.0),
        None => schedule.alphas_cumprod()[s.timesteps()[i] as usize] as f64,
    };
    let (a, b) = (alpha_bar.sqrt() as f32, (1.0 - alpha_bar).sqrt() as f32);
    let eps = input.clone().sub_scalar(a * x0).div_scalar(b);
    match config.prediction_type {
        PredictionType::Epsilon => eps,
        PredictionType::VPrediction => eps.mul_scalar(a).sub_scalar(b * x0),
        PredictionType::Sample => constant(x0),
    }
}

/// Heun, DPM2 (two model calls per step but the last, `2n − 1` timesteps) and LMS: the
/// timesteps descend within range; with an oracle that knows x₀ at the noise level the
/// sampler scales each input to (σ from `scale_model_input`, which for DPM2's second calls
/// is the midpoint), the deterministic ones land on x₀; only DPM2 ancestral draws noise,
/// one tensor per full step.
#[test]
fn two_call_and_multistep_samplers_denoise_a_point_mass() {
    let (deterministic, ancestral) = (["heun", "heun_karras", "dpm_2", "dpm_2_karras", "lms", "lms_karras"], "dpm_2_a");
    for spacing in [TimestepSpacing::Leading, TimestepSpacing::Trailing, TimestepSpacing::Linspace] {
        for v_pred in [false, true] {
            let config = SchedulerConfig {
                prediction_type: if v_pred { PredictionType::VPrediction } else { PredictionType::Epsilon },
                timestep_spacing: Some(spacing),
                ..SchedulerConfig::sd15()
            };
            for n in [4, 9, 25] {
                for name in deterministic.into_iter().chain([ancestral]) {
                    let mut s = sampler(name, &config);
                    s.set_timesteps(n).unwrap();
                    let ts = s.timesteps().to_vec();
                    let calls = if name.starts_with("lms") { n } else { 2 * n - 1 };
                    assert_eq!(ts.len(), calls, "{name}");
                    // DPM2 ancestral's midpoint lies towards σ_down, below the next σ, so its
                    // timestep can fall below the next one (as in diffusers).
                    let descending = name == ancestral || ts.windows(2).all(|w| w[1] <= w[0]);
                    assert!(ts.iter().all(|t| (0.0..1000.0).contains(t)) && descending, "{name}: {ts:?}");
                    if name == ancestral {
                        let mut noise = SeededNoise::new(1);
                        let mut x = constant(0.5);
                        for i in 0..calls {
                            x = s.step(x.clone(), i, x, &mut noise).unwrap();
                        }
                        let mut s = sampler(name, &config);
                        s.set_timesteps(n).unwrap();
                        let first = s.step(constant(0.5), 0, constant(0.5), &mut NoNoise).unwrap();
                        assert!(matches!(s.step(first.clone(), 1, first, &mut NoNoise), Err(SchedError::NoiseExhausted(_))), "{name}");
                        continue;
                    }
                    let x0 = 0.3f32;
                    let mut x = SeededNoise::new(3).sample([1, 1, 4, 4], &Default::default()).unwrap().mul_scalar(s.init_noise_sigma());
                    for i in 0..calls {
                        let input = s.scale_model_input(x.clone(), i).unwrap();
                        let scale: f32 = s.scale_model_input(constant(1.0), i).unwrap().into_data().to_vec::<f32>().unwrap()[0];
                        let alpha_bar = f64::from(scale).powi(2);
                        let (a, b) = (alpha_bar.sqrt() as f32, (1.0 - alpha_bar).sqrt() as f32);
                        let eps = input.sub_scalar(a * x0).div_scalar(b);
                        let out = if v_pred { eps.mul_scalar(a).sub_scalar(b * x0) } else { eps };
                        x = s.step(out, i, x, &mut NoNoise).unwrap();
                    }
                    let err = to_vec(x).iter().map(|v| (v - x0).abs()).fold(0f32, f32::max);
                    assert!(err < 2e-3, "{name} ({n} steps, {spacing:?}, v={v_pred}): |x - x0| = {err}");
                }
            }
        }
    }
}

#[test]
fn deterministic_samplers_never_draw_noise_and_stochastic_ones_do() {
    let config = SchedulerConfig::sd15();
    for (names, stochastic) in [(&DETERMINISTIC[..], false), (&STOCHASTIC[..], true)] {
        for name in names {
            let mut s = sampler(name, &config);
            s.set_timesteps(5).unwrap();
            let x = constant(0.5);
            let result = s.step(x.clone(), 0, x, &mut NoNoise);
            assert_eq!(result.is_err(), stochastic, "{name}");
            if stochastic {
                assert!(
                    matches!(result, Err(SchedError::NoiseExhausted(_))),
                    "{name}"
                );
            }
        }
    }
    // DDIM draws noise only with η > 0.
    let spec = SamplerSpec {
        eta: 0.5,
        ..SamplerSpec::new(SamplerKind::Ddim)
    };
    let mut s = spec.build::<B>(&config).unwrap();
    s.set_timesteps(5).unwrap();
    assert!(s
        .step(constant(0.1), 0, constant(0.1), &mut NoNoise)
        .is_err());
}

#[test]
fn seeded_noise_makes_stochastic_runs_reproducible() {
    let run = |seed| {
        let mut s = sampler("euler_a", &SchedulerConfig::sd15());
        s.set_timesteps(8).unwrap();
        let mut noise = SeededNoise::new(seed);
        let mut x = noise.sample([1, 4, 4, 4], &Default::default()).unwrap();
        for i in 0..8 {
            let out = stand_in_model(x.clone(), s.timesteps()[i]);
            x = s.step(out, i, x, &mut noise).unwrap();
        }
        to_vec(x)
    };
    assert_eq!(run(1), run(1));
    assert_ne!(run(1), run(2));
}

#[test]
fn closures_are_noise_sources() {
    let mut s = sampler("ddpm", &SchedulerConfig::sd15());
    s.set_timesteps(3).unwrap();
    let mut calls = 0;
    let mut zeros = |shape: [usize; 4], device: &burn::tensor::Device<B>| {
        calls += 1;
        Tensor::<B, 4>::zeros(shape, device)
    };
    let x = constant(0.2);
    s.step(x.clone(), 0, x, &mut zeros).unwrap();
    assert_eq!(calls, 1);
}

#[test]
fn misuse_is_a_typed_error() {
    let config = SchedulerConfig::sd15();
    let x = constant(0.0);
    for name in DETERMINISTIC {
        let mut s = sampler(name, &config);
        assert!(
            matches!(
                s.step(x.clone(), 0, x.clone(), &mut NoNoise),
                Err(SchedError::TimestepsNotSet)
            ),
            "{name}"
        );
        assert!(
            matches!(s.set_timesteps(0), Err(SchedError::InvalidSteps { .. })),
            "{name}"
        );
        assert!(
            matches!(s.set_timesteps(1001), Err(SchedError::InvalidSteps { .. })),
            "{name}"
        );
        s.set_timesteps(10).unwrap();
        let len = s.timesteps().len();
        assert!(
            matches!(
                s.scale_model_input(x.clone(), len),
                Err(SchedError::StepOutOfRange { .. })
            ),
            "{name}"
        );
    }
    for name in ["pndm", "dpmpp_2m", "heun", "dpm_2", "dpm_2_a", "lms"] {
        let mut s = sampler(name, &config);
        s.set_timesteps(10).unwrap();
        let err = s.step(x.clone(), 3, x.clone(), &mut NoNoise).unwrap_err();
        assert!(
            matches!(
                err,
                SchedError::StepOutOfOrder {
                    expected: 0,
                    got: 3,
                    ..
                }
            ),
            "{name}: {err}"
        );
        // A step repeated is out of order too (no panic on the two-call samplers' state).
        let mut s = sampler(name, &config);
        s.set_timesteps(10).unwrap();
        s.step(x.clone(), 0, x.clone(), &mut SeededNoise::new(1)).unwrap();
        assert!(matches!(s.step(x.clone(), 0, x.clone(), &mut SeededNoise::new(1)), Err(SchedError::StepOutOfOrder { expected: 1, got: 0, .. })), "{name}");
    }
    // SD1.5's `steps_offset` 1 with "leading" spacing puts 1000 steps' first timestep at
    // 1000, past ᾱ's end: an error (it indexed out of bounds), 999 steps sample.
    for name in ["ddim", "ddpm", "pndm"] {
        let mut s = sampler(name, &config);
        match s.set_timesteps(1000) {
            Err(SchedError::InvalidSteps { expected, .. }) => assert!(expected.contains("steps_offset (1)"), "{name}: {expected}"),
            other => panic!("{name}: {other:?}"),
        }
        s.set_timesteps(999).unwrap();
        s.step(x.clone(), 0, x.clone(), &mut SeededNoise::new(1)).unwrap();
        let mut far = sampler(name, &SchedulerConfig { steps_offset: 999, ..config.clone() });
        assert!(matches!(far.set_timesteps(2), Err(SchedError::InvalidSteps { .. })), "{name}");
    }
}

#[test]
fn unsupported_options_are_rejected_by_name() {
    let cases: Vec<(SamplerKind, SchedulerConfig, &str)> = vec![
        (
            SamplerKind::Ddim,
            SchedulerConfig {
                thresholding: true,
                ..SchedulerConfig::sd15()
            },
            "thresholding",
        ),
        (
            SamplerKind::Ddpm,
            SchedulerConfig {
                variance_type: Some(sd_sched::VarianceType::Learned),
                ..SchedulerConfig::sd15()
            },
            "variance_type",
        ),
        (
            SamplerKind::Pndm,
            SchedulerConfig::zero_terminal_snr_v(),
            "rescale_betas_zero_snr",
        ),
        (
            SamplerKind::Heun,
            SchedulerConfig::zero_terminal_snr_v(),
            "rescale_betas_zero_snr",
        ),
        (
            SamplerKind::KDpm2Ancestral,
            SchedulerConfig {
                prediction_type: PredictionType::Sample,
                ..SchedulerConfig::sd15()
            },
            "prediction_type",
        ),
        (
            SamplerKind::Lms,
            SchedulerConfig {
                use_beta_sigmas: true,
                ..SchedulerConfig::sd15()
            },
            "use_beta_sigmas",
        ),
        (
            SamplerKind::EulerAncestral,
            SchedulerConfig {
                prediction_type: PredictionType::Sample,
                ..SchedulerConfig::sd15()
            },
            "prediction_type",
        ),
        (
            SamplerKind::DpmSolverMultistep,
            SchedulerConfig {
                use_exponential_sigmas: true,
                ..SchedulerConfig::sd15()
            },
            "use_exponential_sigmas",
        ),
        (
            SamplerKind::DpmSolverMultistep,
            SchedulerConfig {
                algorithm_type: sd_sched::AlgorithmType::SdeDpmSolver,
                ..SchedulerConfig::sd15()
            },
            "algorithm_type",
        ),
        (
            SamplerKind::DpmSolverSinglestep,
            SchedulerConfig {
                algorithm_type: sd_sched::AlgorithmType::SdeDpmSolverPlusPlus,
                ..SchedulerConfig::sd15()
            },
            "algorithm_type",
        ),
        (
            SamplerKind::DpmSolverSinglestep,
            SchedulerConfig {
                rescale_betas_zero_snr: true,
                prediction_type: PredictionType::VPrediction,
                ..SchedulerConfig::sd15()
            },
            "rescale_betas_zero_snr",
        ),
        (
            SamplerKind::DpmSolverSinglestep,
            SchedulerConfig {
                use_exponential_sigmas: true,
                ..SchedulerConfig::sd15()
            },
            "use_exponential_sigmas",
        ),
    ];
    for (kind, config, key) in cases {
        match kind.build::<B>(&config) {
            Err(SchedError::Unsupported { key: k, .. }) => assert_eq!(k, key, "{kind}"),
            Err(e) => panic!("{kind}: unexpected error {e}"),
            Ok(_) => panic!("{kind}: {key} should be rejected"),
        }
    }
}

/// DPM-Solver (noise prediction) cannot end at σ = 0, in either class: as diffusers, a
/// config error naming `final_sigmas_type`; with `sigma_min` it builds.
#[test]
fn dpmsolver_needs_a_final_sigma_min() {
    for kind in [SamplerKind::DpmSolverMultistep, SamplerKind::DpmSolverSinglestep] {
        let mut config = SchedulerConfig {
            algorithm_type: sd_sched::AlgorithmType::DpmSolver,
            ..SchedulerConfig::sd15()
        };
        match kind.build::<B>(&config) {
            Err(e @ SchedError::InvalidValue { key: "final_sigmas_type", .. }) => assert!(e.to_string().contains("sigma_min"), "{e}"),
            Err(e) => panic!("{kind}: unexpected error {e}"),
            Ok(_) => panic!("{kind}: dpmsolver ending at zero should be rejected"),
        }
        config.final_sigmas_type = sd_sched::FinalSigmasType::SigmaMin;
        assert!(kind.build::<B>(&config).is_ok(), "{kind}");
    }
}

#[test]
fn names_resolve_to_kinds_and_overrides() {
    for kind in SamplerKind::ALL {
        let spec: SamplerSpec = kind.class_name().parse().unwrap();
        let lower_order_final = (kind == SamplerKind::DpmSolverSinglestep).then_some(false);
        assert_eq!(spec, SamplerSpec { lower_order_final, ..SamplerSpec::new(kind) });
    }
    let spec: SamplerSpec = "DPMPP_2M_SDE_Karras".parse().unwrap();
    let config = spec.apply(&SchedulerConfig::sd15());
    assert!(config.use_karras_sigmas);
    assert_eq!(
        config.algorithm_type,
        sd_sched::AlgorithmType::SdeDpmSolverPlusPlus
    );
    assert_eq!(
        "euler_a".parse::<SamplerSpec>().unwrap().kind,
        SamplerKind::EulerAncestral
    );
    assert_eq!(
        "plms".parse::<SamplerSpec>().unwrap().kind,
        SamplerKind::Pndm
    );
    // kohya's dpmsolver and dpmsingle; both build on a plain SD1.5 config.
    let dpmsolver = "dpmsolver".parse::<SamplerSpec>().unwrap();
    let config = dpmsolver.apply(&SchedulerConfig::sd15());
    assert_eq!((dpmsolver.kind, config.algorithm_type, config.final_sigmas_type), (SamplerKind::DpmSolverMultistep, sd_sched::AlgorithmType::DpmSolver, sd_sched::FinalSigmasType::SigmaMin));
    let single = "dpmsingle_karras".parse::<SamplerSpec>().unwrap();
    let config = single.apply(&SchedulerConfig::sd15());
    assert_eq!((single.kind, config.algorithm_type, config.solver_order), (SamplerKind::DpmSolverSinglestep, sd_sched::AlgorithmType::DpmSolverPlusPlus, 2));
    assert!(config.use_karras_sigmas && !config.lower_order_final);
    for spec in [dpmsolver, single] {
        let mut sampler = spec.build::<B>(&SchedulerConfig::sd15()).unwrap();
        sampler.set_timesteps(10).unwrap();
        assert_eq!(sampler.timesteps().len(), 10);
    }
    assert_eq!(
        SamplerKind::from_config(&SchedulerConfig::sd15()),
        Some(SamplerKind::Pndm)
    );
    for (name, kind, karras) in [
        ("heun", SamplerKind::Heun, false),
        ("K_DPM_2_A", SamplerKind::KDpm2Ancestral, false),
        ("dpm_2_karras", SamplerKind::KDpm2, true),
        ("k_lms", SamplerKind::Lms, false),
        ("lms_karras", SamplerKind::Lms, true),
    ] {
        let spec = name.parse::<SamplerSpec>().unwrap();
        assert_eq!((spec.kind, spec.use_karras_sigmas), (kind, Some(karras)), "{name}");
    }
    let err = "k_dpm_fast".parse::<SamplerSpec>().unwrap_err();
    assert!(err.to_string().contains("dpmpp_2m_karras") && err.to_string().contains("lms"), "{err}");
}

#[test]
fn sd15_default_timesteps_match_the_shipped_pipeline() {
    // SD 1.5's PNDM with skip_prk_steps and steps_offset 1 at 50 steps: 981, 961, 961, 941, ...
    let mut s = sampler("pndm", &SchedulerConfig::sd15());
    s.set_timesteps(50).unwrap();
    let ts = s.timesteps();
    assert_eq!(ts.len(), 51);
    assert_eq!(&ts[..4], &[981.0, 961.0, 961.0, 941.0]);
    assert_eq!(ts[50], 1.0);
}

#[test]
fn trailing_spacing_never_runs_past_timestep_zero() {
    // numpy's arange(1000, 0, -1000/61) has 62 elements; diffusers then steps at t = −1.
    // We keep diffusers' first 61 timesteps (…, 32, 15) and stop there.
    let config = SchedulerConfig {
        timestep_spacing: Some(TimestepSpacing::Trailing),
        ..SchedulerConfig::sd15()
    };
    for name in ["ddim", "euler", "dpmpp_2m", "ddpm"] {
        let mut s = sampler(name, &config);
        s.set_timesteps(61).unwrap();
        let ts = s.timesteps();
        assert_eq!(ts.len(), 61, "{name}");
        assert_eq!((ts[0], ts[59], ts[60]), (999.0, 32.0, 15.0), "{name}");
    }
}

/// DPM-Solver's spacing rounds 1000 steps over 1000 timesteps to a repeated timestep (a
/// zero log-SNR step: NaN latents, in diffusers too); a typed error names the most steps
/// instead, and Karras sigmas, which do not use that spacing, take 1000.
#[test]
fn dpm_solver_refuses_steps_that_repeat_a_timestep() {
    let config = SchedulerConfig::sd15();
    for name in ["dpmpp_2m", "dpmpp_2m_sde", "dpmpp_3m", "dpmsolver"] {
        let mut s = name.parse::<SamplerSpec>().unwrap().build::<B>(&config).unwrap();
        let e = s.set_timesteps(1000).unwrap_err().to_string();
        assert!(e.contains("1000 steps repeat a timestep") && e.contains("at most 999"), "{name}: {e}");
        s.set_timesteps(999).unwrap();
        let t = s.timesteps();
        assert!(t.windows(2).all(|w| w[0] > w[1]), "{name}: timesteps repeat");
    }
    let mut karras = "dpmpp_2m_karras".parse::<SamplerSpec>().unwrap().build::<B>(&config).unwrap();
    karras.set_timesteps(1000).unwrap();
}

/// The Karras samplers that honour `sigma_min` / `sigma_max` (LMS ignores them, as in
/// diffusers).
const KARRAS_WITH_BOUNDS: [&str; 8] = [
    "euler_karras",
    "dpmpp_2m_karras",
    "dpmpp_3m_karras",
    "dpmsolver_karras",
    "dpmsingle_karras",
    "heun_karras",
    "dpm_2_karras",
    "dpm_2_a_karras",
];

/// Karras sigmas end at the schedule's smallest σ, and `final_sigmas_type = "sigma_min"`
/// appends that σ again: the last step has h = 0. From 15 steps it runs at second (or
/// third) order, whose Heun coefficients are 0 / 0; it must leave the latents as they are
/// (the limit h → 0) instead of turning them NaN.
#[test]
fn dpm_multistep_zero_length_last_step_is_the_identity() {
    for (solver_type, order) in [(sd_sched::SolverType::Heun, 2), (sd_sched::SolverType::Midpoint, 2), (sd_sched::SolverType::Heun, 3)] {
        let config = SchedulerConfig {
            use_karras_sigmas: true,
            final_sigmas_type: sd_sched::FinalSigmasType::SigmaMin,
            solver_type,
            solver_order: order,
            ..SchedulerConfig::sd15()
        };
        let mut s = SamplerKind::DpmSolverMultistep.build::<B>(&config).unwrap();
        s.set_timesteps(20).unwrap();
        let sigmas = s.sigmas().unwrap().to_vec();
        assert_eq!(sigmas[19], sigmas[20], "{solver_type:?}: the last step should have zero length");
        let mut x = constant(1.0);
        for i in 0..20 {
            let before = x.clone();
            let output = constant(0.3 + 0.01 * i as f32);
            x = s.step(output, i, x, &mut NoNoise).unwrap();
            if i == 19 {
                assert_eq!(x.to_data(), before.to_data(), "{solver_type:?} order {order}: the zero-length step changed the latents");
            }
        }
        let values = x.into_data().to_vec::<f32>().unwrap();
        assert!(values.iter().all(|v| v.is_finite()), "{solver_type:?} order {order}: {values:?}");
    }
}

fn key_of(result: Result<(), SchedError>) -> Option<&'static str> {
    match result {
        Err(SchedError::InvalidValue { key, .. }) => Some(key),
        _ => None,
    }
}

/// A `lambda_min_clipped` above every timestep's log-SNR (`Infinity`, a sign typo of
/// diffusers' -5.1, a huge value) leaves nothing to space; diffusers would run the model
/// at timestep -1. Both DPM-Solver classes refuse it by name, for any step count and with
/// Karras sigmas too.
#[test]
fn dpm_solver_refuses_a_lambda_min_clipped_that_clips_every_timestep() {
    for value in ["Infinity", "5.1", "1e9"] {
        let json = format!(r#"{{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "lambda_min_clipped": {value}}}"#);
        let config = SchedulerConfig::from_json_str(&json).unwrap();
        for name in ["dpmpp_2m", "dpmpp_2m_karras", "dpmpp_2m_sde", "dpmsolver", "dpmsingle", "dpmsingle_karras"] {
            let mut s = sampler(name, &config);
            for n in [1, 2, 20] {
                let err = s.set_timesteps(n).unwrap_err();
                assert!(
                    matches!(err, SchedError::InvalidValue { key: "lambda_min_clipped", .. }),
                    "{name}, {value}, {n} steps: {err}"
                );
            }
            assert!(s.timesteps().is_empty(), "{name}: timesteps set despite the error");
        }
    }
}

/// A `lambda_min_clipped` that leaves one timestep allows one step (at timestep 0), and
/// the error for more steps says that `lambda_min_clipped` is the cause.
#[test]
fn dpm_solver_blames_lambda_min_clipped_for_too_few_timesteps() {
    let base = SchedulerConfig::sd15();
    let ac = NoiseSchedule::new(&base).unwrap().alphas_cumprod().to_vec();
    let lambda = |a: f32| a.sqrt().ln() - (1.0 - a).sqrt().ln();
    let clip = (lambda(ac[0]) + lambda(ac[1])) / 2.0;
    let config = SchedulerConfig { lambda_min_clipped: clip as f64, ..base };
    let mut s = sampler("dpmpp_2m", &config);
    s.set_timesteps(1).unwrap();
    assert_eq!(s.timesteps(), [0.0]);
    let err = s.set_timesteps(2).unwrap_err().to_string();
    assert!(err.contains("lambda_min_clipped") && err.contains("leaves 1 of 1000"), "{err}");
}

/// Karras sigmas must fall from `sigma_max` to `sigma_min`: bounds the wrong way round (or
/// equal) are a config error, and a bound on the wrong side of the schedule's other end
/// is refused by name when the sigmas are built (they would rise: every step adding noise;
/// or, equal, DPM-Solver's step h = 0 gives NaN).
#[test]
fn karras_sigma_bounds_must_fall() {
    for (lo, hi) in [(5.0, 1.0), (2.0, 2.0)] {
        let json = format!(r#"{{"use_karras_sigmas": true, "sigma_min": {lo}, "sigma_max": {hi}}}"#);
        assert_eq!(key_of(SchedulerConfig::from_json_str(&json).map(drop)), Some("sigma_min"), "{json}");
    }
    let sd15 = SchedulerConfig::sd15();
    let cases = [
        // Above SD's largest sigma (about 14.6), no sigma_max.
        (Some(20.0), None, "sigma_min"),
        // Below SD's smallest sigma (about 0.029), no sigma_min.
        (None, Some(0.01), "sigma_max"),
        // Apart in f64 but merged by f32 rounding: equal neighbours (DPM's h = 0).
        (Some(1.0), Some(1.000_000_1), "sigma_min"),
    ];
    for name in KARRAS_WITH_BOUNDS {
        for (sigma_min, sigma_max, key) in cases {
            let config = SchedulerConfig { sigma_min, sigma_max, ..sd15.clone() };
            let mut s = sampler(name, &config);
            let result = s.set_timesteps(10);
            assert_eq!(key_of(result), Some(key), "{name}: {sigma_min:?}..{sigma_max:?}");
        }
        // Sound bounds give falling sigmas.
        let config = SchedulerConfig { sigma_min: Some(0.1), sigma_max: Some(10.0), ..sd15.clone() };
        let mut s = sampler(name, &config);
        s.set_timesteps(10).unwrap();
        let sigmas = s.sigmas().unwrap();
        assert!(sigmas.windows(2).all(|w| w[0] >= w[1]), "{name}: {sigmas:?}");
        assert!((sigmas[0] - 10.0).abs() < 1e-4, "{name}: {sigmas:?}");
    }
}
