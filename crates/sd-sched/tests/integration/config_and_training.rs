//! Config loading errors, schedule laws and training-helper laws.

use crate::common;

use burn::tensor::{Int, Tensor, TensorData};
use common::*;
use proptest::prelude::*;
use sd_sched::training::{adaptive_offset_noise, min_snr_weights, offset_noise, TimestepSampler, TrainingSchedule};
use sd_sched::{
    BetaSchedule, NoiseSchedule, NoiseSource, PredictionType, SchedError, SchedulerConfig,
    SeededNoise, TensorQueue,
};

#[test]
fn reads_a_diffusers_model_folder() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("scheduler")).unwrap();
    // SD 2.1's file, plus keys of other classes and a future key.
    std::fs::write(
        dir.path().join("scheduler/scheduler_config.json"),
        r#"{"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0",
            "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
            "clip_sample": false, "num_train_timesteps": 1000, "prediction_type": "v_prediction",
            "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1,
            "trained_betas": null, "variance_type": null, "lambda_min_clipped": -Infinity,
            "brand_new_option": [1, 2]}"#,
    )
    .unwrap();
    let c = SchedulerConfig::from_model_dir(dir.path()).unwrap();
    assert_eq!(
        c,
        SchedulerConfig {
            timestep_spacing: None,
            ..SchedulerConfig::sd21_v()
        }
    );
}

#[test]
fn bad_values_name_the_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scheduler_config.json");
    std::fs::write(&path, r#"{"prediction_type": "x0"}"#).unwrap();
    let err = SchedulerConfig::from_file(&path).unwrap_err();
    assert!(matches!(err, SchedError::Parse { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("scheduler_config.json") && msg.contains("x0"),
        "{msg}"
    );

    let missing = SchedulerConfig::from_file(dir.path().join("nope.json")).unwrap_err();
    assert!(matches!(missing, SchedError::Io { .. }), "{missing}");

    let cases = [
        (r#"{"num_train_timesteps": 1}"#, "num_train_timesteps"),
        (r#"{"num_train_timesteps": 1000000000000}"#, "num_train_timesteps"),
        (r#"{"beta_start": 0.5, "beta_end": 0.1}"#, "beta_end"),
        (r#"{"beta_start": -0.1}"#, "beta_start"),
        (
            r#"{"trained_betas": [0.1, 0.2], "num_train_timesteps": 3}"#,
            "trained_betas",
        ),
        (r#"{"solver_order": 4}"#, "solver_order"),
        (r#"{"steps_offset": 1000}"#, "steps_offset"),
        (r#"{"sigma_min": 0}"#, "sigma_min"),
        (r#"{"clip_sample_range": 0}"#, "clip_sample_range"),
        (r#"{"sigma_min": 5, "sigma_max": 1}"#, "sigma_min"),
        (r#"{"sigma_min": 2, "sigma_max": 2}"#, "sigma_min"),
        // ᾱ₀ = 1 − β₀ rounds to 1 in f32: σ₀ = 0, which the samplers divide by.
        (r#"{"beta_start": 1e-9}"#, "beta_start"),
        (
            r#"{"beta_schedule": "scaled_linear", "beta_start": 1e-9, "beta_end": 0.012}"#,
            "beta_start",
        ),
        (
            r#"{"trained_betas": [1e-9, 0.5], "num_train_timesteps": 2}"#,
            "trained_betas",
        ),
    ];
    for (json, key) in cases {
        match SchedulerConfig::from_json_str(json) {
            Err(SchedError::InvalidValue { key: k, .. }) => assert_eq!(k, key, "{json}"),
            other => panic!("{json}: expected InvalidValue for {key}, got {other:?}"),
        }
    }
    assert!(matches!(
        SchedulerConfig::from_json_str(r#"{"num_train_timesteps": "many"}"#),
        Err(SchedError::Parse { .. })
    ));
}

/// Configs saved by UniPC and DEIS (`solver_type` `bh2` / `bh1` / `logrho`,
/// `algorithm_type` `deis`) load, with the values diffusers' DPM-Solvers read them as.
#[test]
fn unipc_and_deis_configs_load() {
    let unipc = SchedulerConfig::from_json_str(r#"{"_class_name": "UniPCMultistepScheduler", "solver_type": "bh2", "predict_x0": true, "solver_p": null, "disable_corrector": []}"#).unwrap();
    assert_eq!(unipc.solver_type, sd_sched::SolverType::Midpoint);
    for value in ["bh1", "logrho"] {
        let c = SchedulerConfig::from_json_str(&format!(r#"{{"solver_type": "{value}"}}"#)).unwrap();
        assert_eq!(c.solver_type, sd_sched::SolverType::Midpoint, "{value}");
    }
    let deis = SchedulerConfig::from_json_str(r#"{"_class_name": "DEISMultistepScheduler", "algorithm_type": "deis", "solver_type": "logrho"}"#).unwrap();
    assert_eq!(deis.algorithm_type, sd_sched::AlgorithmType::DpmSolverPlusPlus);
    assert!(matches!(SchedulerConfig::from_json_str(r#"{"solver_type": "bogus"}"#), Err(SchedError::Parse { .. })));
}

/// A value out of range in a file names the file as well as the key (a user with several
/// model folders must know which scheduler_config.json to fix); memory configs say
/// `<string>`.
#[test]
fn range_errors_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("scheduler")).unwrap();
    let path = dir.path().join("scheduler").join("scheduler_config.json");
    for (json, key) in [
        (r#"{"solver_order": 7}"#, "solver_order"),
        (r#"{"sigma_min": 3, "sigma_max": 1}"#, "sigma_min"),
        (r#"{"beta_start": 1e-10}"#, "beta_start"),
    ] {
        std::fs::write(&path, json).unwrap();
        for err in [
            SchedulerConfig::from_file(&path).unwrap_err(),
            SchedulerConfig::from_model_dir(dir.path()).unwrap_err(),
        ] {
            let msg = err.to_string();
            assert!(msg.contains(&path.display().to_string()) && msg.contains(key), "{msg}");
            match err {
                SchedError::InvalidValue { origin: Some(o), key: k, .. } => {
                    assert_eq!((o, k), (path.display().to_string(), key));
                }
                other => panic!("{json}: expected InvalidValue with an origin, got {other:?}"),
            }
        }
    }
    let msg = SchedulerConfig::from_json_str(r#"{"solver_order": 7}"#).unwrap_err().to_string();
    assert!(msg.contains("<string>") && msg.contains("solver_order"), "{msg}");
    // A config built in code has no file to name.
    let bad = SchedulerConfig { solver_order: 7, ..SchedulerConfig::sd15() };
    assert!(matches!(bad.validate(), Err(SchedError::InvalidValue { origin: None, key: "solver_order", .. })));
}

/// The smallest β₀ whose ᾱ₀ stays below 1 in f32 is accepted; a smaller one is refused
/// by `NoiseSchedule::new` as well as by the file loaders.
#[test]
fn tiny_first_betas_are_refused_only_when_sigma0_is_zero() {
    let ok = SchedulerConfig { beta_start: 1e-7, ..SchedulerConfig::default() };
    let s = NoiseSchedule::new(&ok).unwrap();
    assert!(s.alphas_cumprod()[0] < 1.0 && s.snr(0).is_finite());
    let bad = SchedulerConfig { beta_start: 1e-9, ..SchedulerConfig::default() };
    assert!(matches!(NoiseSchedule::new(&bad), Err(SchedError::InvalidValue { key: "beta_start", .. })));
}

/// ᾱ may reach 0 only at the last timestep (zero terminal SNR): a trained beta that
/// rounds to 1 in f32 mid-schedule, or betas large enough that the f32 product underflows,
/// make σ infinite from there on and are refused by the key that causes it.
#[test]
fn schedules_whose_alphas_reach_zero_early_are_refused() {
    let mut betas = vec![0.01; 10];
    betas[4] = 1.0 - 1e-9; // rounds to 1 in f32
    let json = format!(r#"{{"trained_betas": {betas:?}, "num_train_timesteps": 10}}"#);
    match SchedulerConfig::from_json_str(&json) {
        Err(e @ SchedError::InvalidValue { key: "trained_betas", .. }) => {
            assert!(e.to_string().contains("from timestep 4 of 10"), "{e}");
        }
        other => panic!("expected InvalidValue for trained_betas, got {other:?}"),
    }
    // A beta of 1 at the last timestep only is zero terminal SNR: accepted.
    let mut last = vec![0.01; 10];
    last[9] = 1.0 - 1e-9;
    let json = format!(r#"{{"trained_betas": {last:?}, "num_train_timesteps": 10}}"#);
    assert_eq!(NoiseSchedule::new(&SchedulerConfig::from_json_str(&json).unwrap()).unwrap().alphas_cumprod()[9], 0.0);
    // (1 - 0.999)^1000 underflows f32 long before the end.
    let underflow = r#"{"beta_schedule": "linear", "beta_start": 0.5, "beta_end": 0.999}"#;
    match SchedulerConfig::from_json_str(underflow) {
        Err(SchedError::InvalidValue { key: "beta_end", .. }) => {}
        other => panic!("expected InvalidValue for beta_end, got {other:?}"),
    }
    let bad = SchedulerConfig { beta_start: 0.5, beta_end: 0.999, ..SchedulerConfig::default() };
    assert!(matches!(NoiseSchedule::new(&bad), Err(SchedError::InvalidValue { key: "beta_end", .. })));
    // The presets, zero terminal SNR included, pass.
    for c in [SchedulerConfig::sd15(), SchedulerConfig::zero_terminal_snr_v()] {
        c.validate().unwrap();
    }
}

#[test]
fn trained_betas_override_the_schedule() {
    let betas: Vec<f64> = (0..10).map(|i| 0.01 + 0.01 * i as f64).collect();
    let c = SchedulerConfig {
        num_train_timesteps: 10,
        trained_betas: Some(betas.clone()),
        ..Default::default()
    };
    let s = NoiseSchedule::new(&c).unwrap();
    let want: Vec<f32> = betas.iter().map(|b| *b as f32).collect();
    assert_eq!(s.betas(), want.as_slice());
    let expected_last: f64 = betas.iter().map(|b| 1.0 - b).product();
    assert!((s.alphas_cumprod()[9] as f64 - expected_last).abs() < 1e-6);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// ᾱ decreases, SNR decreases, and the zero-SNR rescale keeps ᾱ₀ and zeroes ᾱ_T.
    #[test]
    fn schedules_are_monotone(
        t in 10usize..1200,
        schedule in prop_oneof![
            Just(BetaSchedule::Linear),
            Just(BetaSchedule::ScaledLinear),
            Just(BetaSchedule::SquaredCosCapV2)
        ],
        start in 1e-5f64..1e-3,
        span in 1e-4f64..0.05,
    ) {
        let base = SchedulerConfig {
            num_train_timesteps: t,
            beta_schedule: schedule,
            beta_start: start,
            beta_end: start + span,
            ..Default::default()
        };
        let s = NoiseSchedule::new(&base).unwrap();
        let ac = s.alphas_cumprod();
        prop_assert!(ac.windows(2).all(|w| w[1] <= w[0]));
        prop_assert!(ac.iter().all(|a| *a > 0.0 && *a < 1.0));
        prop_assert!((1..t).all(|i| s.snr(i) <= s.snr(i - 1)));

        let z = NoiseSchedule::new(&SchedulerConfig { rescale_betas_zero_snr: true, ..base }).unwrap();
        prop_assert_eq!(z.alphas_cumprod()[t - 1], 0.0);
        prop_assert_eq!(z.snr(t - 1), 0.0);
        prop_assert!((z.alphas_cumprod()[0] - ac[0]).abs() <= 1e-6);
        prop_assert!(z.alphas_cumprod().windows(2).all(|w| w[1] <= w[0]));
    }

    /// add_noise and velocity form a rotation: x₀ and ε are recovered from (xₜ, v).
    #[test]
    fn noise_and_velocity_invert(seed in any::<u64>(), ts in proptest::collection::vec(0i64..1000, 3)) {
        let device = Default::default();
        let schedule = NoiseSchedule::new(&SchedulerConfig::sd21_v()).unwrap();
        let train = TrainingSchedule::<B>::new(&schedule, &device);
        let mut rng = SeededNoise::new(seed);
        let x0 = rng.sample([3, 2, 2, 2], &device).unwrap();
        let eps = rng.sample([3, 2, 2, 2], &device).unwrap();
        let t = || Tensor::<B, 1, Int>::from_data(TensorData::new(ts.clone(), [3]), &device);
        let xt = train.add_noise(x0.clone(), eps.clone(), t());
        let v = train.velocity(x0.clone(), eps.clone(), t());
        prop_assert_eq!(to_vec(train.target(x0.clone(), eps.clone(), t())), to_vec(v.clone()));
        let a = train.alphas_cumprod(t());
        let sa = a.clone().sqrt().reshape([3, 1, 1, 1]).expand([3, 2, 2, 2]);
        let sb = a.neg().add_scalar(1.0).sqrt().reshape([3, 1, 1, 1]).expand([3, 2, 2, 2]);
        let x0_back = sa.clone() * xt.clone() - sb.clone() * v.clone();
        let eps_back = sb * xt + sa * v;
        prop_assert!(rel_err(&to_vec(x0_back), &to_vec(x0)) < 1e-5);
        prop_assert!(rel_err(&to_vec(eps_back), &to_vec(eps)) < 1e-5);
    }

    /// Min-SNR-γ: ε weights are min(SNR, γ)/SNR ≤ 1, v weights min(SNR, γ)/(SNR + 1) < 1,
    /// x₀ weights min(SNR, γ).
    #[test]
    fn min_snr_weights_clip_at_gamma(gamma in 0.5f64..20.0, snrs in proptest::collection::vec(1e-4f32..1e4, 1..8)) {
        let n = snrs.len();
        let snr = || Tensor::<B, 1>::from_data(TensorData::new(snrs.clone(), [n]), &Default::default());
        let eps = to_vec(min_snr_weights(snr(), gamma, PredictionType::Epsilon).unwrap());
        let v = to_vec(min_snr_weights(snr(), gamma, PredictionType::VPrediction).unwrap());
        let x0 = to_vec(min_snr_weights(snr(), gamma, PredictionType::Sample).unwrap());
        for i in 0..n {
            let (s, g) = (snrs[i] as f64, gamma);
            let clipped = s.min(g);
            prop_assert!((eps[i] as f64 - clipped / s).abs() <= 1e-5 * (clipped / s));
            prop_assert!((v[i] as f64 - clipped / (s + 1.0)).abs() <= 1e-5 * (clipped / (s + 1.0)));
            prop_assert!((x0[i] as f64 - clipped).abs() <= 1e-5 * clipped);
        }
    }

    /// Sampled timesteps stay in the configured range and depend only on the seed.
    #[test]
    fn timestep_sampling_respects_the_range(min in 0usize..900, width in 1usize..100, seed in any::<u64>()) {
        let max = min + width;
        let mut a = TimestepSampler::new(min, max, 1000, seed).unwrap();
        let mut b = TimestepSampler::new(min, max, 1000, seed).unwrap();
        let xs = a.sample_host(64);
        prop_assert!(xs.iter().all(|t| (min as i64..max as i64).contains(t)));
        prop_assert_eq!(xs, b.sample_host(64));
    }
}

#[test]
fn timestep_ranges_are_validated() {
    assert!(TimestepSampler::new(10, 10, 1000, 0).is_err());
    assert!(TimestepSampler::new(0, 1001, 1000, 0).is_err());
    let t = TimestepSampler::new(0, 1000, 1000, 0)
        .unwrap()
        .sample::<B>(4, &Default::default());
    assert_eq!(t.dims(), [4]);
}

#[test]
fn min_snr_gamma_must_be_positive() {
    let snr = Tensor::<B, 1>::ones([2], &Default::default());
    for gamma in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        assert!(matches!(
            min_snr_weights(snr.clone(), gamma, PredictionType::Epsilon),
            Err(SchedError::InvalidArgument { name: "gamma", .. })
        ));
    }
}

#[test]
fn offset_noise_shifts_each_channel_by_a_constant() {
    let device = Default::default();
    let noise = Tensor::<B, 4>::zeros([2, 3, 4, 4], &device);
    let shift: Vec<f32> = (0..6).map(|i| i as f32).collect();
    let mut queue = TensorQueue::new([Tensor::<B, 4>::from_data(
        TensorData::new(shift.clone(), [2, 3, 1, 1]),
        &device,
    )]);
    let out = to_vec(offset_noise(noise.clone(), 0.1, &mut queue).unwrap());
    for (bc, chunk) in out.chunks(16).enumerate() {
        let want = (0.1f32 * shift[bc]).to_bits();
        assert!(
            chunk.iter().all(|v| v.to_bits() == want),
            "channel {bc}: {chunk:?}"
        );
    }
    assert_eq!(queue.remaining(), 0);
    // A zero offset draws nothing and returns the noise unchanged.
    let mut none = sd_sched::NoNoise;
    assert_eq!(
        to_vec(offset_noise(noise.clone(), 0.0, &mut none).unwrap()),
        to_vec(noise)
    );
}

/// kohya's adaptive noise offset: each sample's channel is shifted by its draw times
/// `max(0, offset + scale · |mean|)`; with `scale = 0` it is the plain offset, bit for bit.
#[test]
fn adaptive_offset_noise_scales_each_channel_by_its_mean() {
    let device = Default::default();
    let (n, c, h, w) = (2, 3, 4, 5);
    let noise = Tensor::<B, 4>::from_data(TensorData::new((0..n * c * h * w).map(|i| (i as f32 * 0.37).sin()).collect::<Vec<_>>(), [n, c, h, w]), &device);
    // Channel means near −2.5, −1.5, …, 2.5: some clamp to a strength of 0 below.
    let latents_data: Vec<f32> = (0..n * c * h * w).map(|i| (i as f32 * 0.11).cos() * 0.5 + (i / (h * w)) as f32 - 2.5).collect();
    let latents = Tensor::<B, 4>::from_data(TensorData::new(latents_data.clone(), [n, c, h, w]), &device);
    let shift: Vec<f32> = (0..n * c).map(|i| i as f32 * 0.5 - 1.2).collect();
    let draws = || TensorQueue::new([Tensor::<B, 4>::from_data(TensorData::new(shift.clone(), [n, c, 1, 1]), &device)]);
    let (offset, scale) = (0.1, -0.15);
    let out = to_vec(adaptive_offset_noise(noise.clone(), latents.clone(), offset, scale, &mut draws()).unwrap());
    let base = to_vec(noise.clone());
    let mut clamped = 0;
    for (bc, (got, was)) in out.chunks(h * w).zip(base.chunks(h * w)).enumerate() {
        let mean = latents_data[bc * h * w..(bc + 1) * h * w].iter().map(|v| *v as f64).sum::<f64>() / (h * w) as f64;
        let strength = (offset + scale * mean.abs()).max(0.0);
        clamped += usize::from(strength == 0.0);
        for (g, v) in got.iter().zip(was) {
            let want = *v as f64 + strength * shift[bc] as f64;
            assert!((*g as f64 - want).abs() < 1e-5, "channel {bc}: {g} vs {want}");
        }
    }
    assert!(clamped > 0 && clamped < n * c, "{clamped} of {} channels clamped", n * c);
    let plain = to_vec(offset_noise(noise.clone(), offset, &mut draws()).unwrap());
    let zero_scale = to_vec(adaptive_offset_noise(noise.clone(), latents.clone(), offset, 0.0, &mut draws()).unwrap());
    assert_eq!(plain.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), zero_scale.iter().map(|v| v.to_bits()).collect::<Vec<_>>());
    let mut none = sd_sched::NoNoise;
    assert_eq!(to_vec(adaptive_offset_noise(noise.clone(), latents, 0.0, 0.5, &mut none).unwrap()), base, "no offset: no change, no draw");
}

#[test]
fn seeded_noise_is_standard_normal() {
    let v = SeededNoise::new(11).normal_vec(200_000);
    let n = v.len() as f64;
    let mean = v.iter().map(|x| *x as f64).sum::<f64>() / n;
    let var = v.iter().map(|x| (*x as f64 - mean).powi(2)).sum::<f64>() / n;
    assert!(mean.abs() < 0.01, "mean {mean}");
    assert!((var - 1.0).abs() < 0.01, "variance {var}");
    let tail = v.iter().filter(|x| x.abs() > 1.96).count() as f64 / n;
    assert!((tail - 0.05).abs() < 0.003, "two-sided 5% tail {tail}");
}

#[test]
fn restored_rng_states_continue_the_streams() {
    use sd_sched::SeededNoise;
    let mut sampler = TimestepSampler::new(0, 1000, 1000, 9).unwrap();
    sampler.sample_host(13);
    let mut resumed = TimestepSampler::new(0, 1000, 1000, 1).unwrap();
    resumed.set_rng_state(&sampler.rng_state());
    assert_eq!(sampler.sample_host(50), resumed.sample_host(50));

    let mut noise = SeededNoise::new(4);
    noise.normal_vec(3);
    let state = noise.state();
    let mut again = SeededNoise::from_state(&state);
    assert_eq!(noise.normal_vec(11), again.normal_vec(11));
    assert_ne!(state, noise.state(), "drawing moves the stream");
}
