//! Parity with diffusers: schedules, full sampling loops and training targets replayed
//! from the fixtures written by `xtask/fixtures/sd_sched.py`.

use crate::common;

use common::*;
use sd_sched::training::TrainingSchedule;
use sd_sched::{
    DdimSampler, NoiseSchedule, PredictionType, Sampler, SamplerKind, SchedulerConfig, TensorQueue,
};
use serde_json::Value;

/// Tolerance on every intermediate latent, relative to the reference latent's scale.
const LATENT_TOL: f64 = 1e-5;

fn config_of(item: &Value) -> SchedulerConfig {
    SchedulerConfig::from_json_str(&item["config"].to_string()).expect("fixture config parses")
}

fn items(file: &str) -> Vec<Value> {
    read_json(file)["items"].as_array().expect("items").clone()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_f64().expect("number") as f32)
        .collect()
}

#[test]
fn schedules_match_diffusers() {
    let fx = Fixture::open("schedules.safetensors");
    let items = items("schedules.json");
    assert!(items.len() >= 6);
    for item in items {
        let name = item["name"].as_str().unwrap();
        let schedule = NoiseSchedule::new(&config_of(&item)).unwrap();
        let (betas, _) = fx.f32(&format!("{name}.betas"));
        let (ac, _) = fx.f32(&format!("{name}.alphas_cumprod"));
        if config_of(&item).rescale_betas_zero_snr {
            // torch's vectorised f32 sqrt (MKL) is not correctly rounded; the rescale's
            // shift-and-scale and βₜ = 1 − ᾱₜ/ᾱₜ₋₁ amplify its 1-ulp differences. ᾱ, which
            // is what sampling uses, is still checked to 1e-5 below.
            for (i, (a, b)) in schedule.betas().iter().zip(&betas).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-6 + 1e-4 * b.abs(),
                    "{name} betas[{i}]: {a} vs {b}"
                );
            }
        } else {
            // Bit for bit: torch's f32 linspace is emulated exactly.
            let mismatches = schedule
                .betas()
                .iter()
                .zip(&betas)
                .filter(|(a, b)| a != b)
                .count();
            assert_eq!(
                mismatches, 0,
                "{name}: betas differ from diffusers bit for bit"
            );
        }
        // ᾱ of a zero-SNR schedule ends at exactly 0: compare all but that elementwise.
        let n = ac.len();
        let exact_zero = ac[n - 1] == 0.0;
        let m = if exact_zero { n - 1 } else { n };
        let tol = if config_of(&item).rescale_betas_zero_snr {
            1e-5
        } else {
            1e-6
        };
        assert_close_each(
            &schedule.alphas_cumprod()[..m],
            &ac[..m],
            tol,
            &format!("{name} ᾱ"),
        );
        if exact_zero {
            assert_eq!(schedule.alphas_cumprod()[n - 1], 0.0, "{name}: terminal ᾱ");
        }
    }
}

fn build(item: &Value) -> Box<dyn Sampler<B>> {
    let config = config_of(item);
    match item["sampler"].as_str().unwrap() {
        "ddim" => Box::new(DdimSampler::new(&config, item["eta"].as_f64().unwrap()).unwrap()),
        family => {
            let kind = match family {
                "ddpm" => SamplerKind::Ddpm,
                "pndm" => SamplerKind::Pndm,
                "euler" => SamplerKind::Euler,
                "euler_a" => SamplerKind::EulerAncestral,
                "dpmpp" => SamplerKind::DpmSolverMultistep,
                "dpmsingle" => SamplerKind::DpmSolverSinglestep,
                "heun" => SamplerKind::Heun,
                "kdpm2" => SamplerKind::KDpm2,
                "kdpm2_a" => SamplerKind::KDpm2Ancestral,
                "lms" => SamplerKind::Lms,
                other => panic!("unknown family {other}"),
            };
            kind.build::<B>(&config).unwrap()
        }
    }
}

/// The tensors of fixture file `stem` and its run `name`'s description.
fn fixture_run(stem: &str, name: &str) -> (Fixture, Value) {
    let item = items(&format!("{stem}.json"))
        .into_iter()
        .find(|i| i["name"] == name)
        .unwrap_or_else(|| panic!("no run {name} in {stem}.json"));
    (Fixture::open(&format!("{stem}.safetensors")), item)
}

/// Replays one recorded diffusers sampling loop and returns the worst per-step error.
fn replay(name: &str) -> f64 {
    let (fx, item) = fixture_run("sampler_runs", name);
    let mut sampler = build(&item);
    sampler
        .set_timesteps(item["steps"].as_u64().unwrap() as usize)
        .unwrap();

    let expected_t = floats(&item["timesteps"]);
    assert_eq!(
        sampler.timesteps().len(),
        expected_t.len(),
        "{name}: timestep count"
    );
    // DPM-Solver-2's midpoint timesteps (the odd entries) come from `_sigma_to_t` in
    // torch's f32 (here in f64): some land on whole numbers there, and near t = 0 they
    // differ by ~1e-7.
    let midpoints = matches!(item["sampler"].as_str(), Some("kdpm2" | "kdpm2_a"));
    for (i, (a, b)) in sampler.timesteps().iter().zip(&expected_t).enumerate() {
        if midpoints && i % 2 == 1 {
            assert!(
                (a - b).abs() <= 1e-6 * b.abs() + 1e-6,
                "{name}: timestep {i}: {a} vs {b}"
            );
        } else if b.fract() == 0.0 {
            assert_eq!(a, b, "{name}: timestep {i}");
        } else {
            // Fractional (Karras) timesteps go through numpy's SIMD log/pow.
            assert!(
                (a - b).abs() <= 1e-6 * b.abs(),
                "{name}: timestep {i}: {a} vs {b}"
            );
        }
    }
    if !item["sigmas"].is_null() {
        let sigmas = sampler.sigmas().expect("sigma-based sampler");
        let expected = floats(&item["sigmas"]);
        assert_eq!(sigmas.len(), expected.len(), "{name}: sigma count");
        // Zero-SNR sigmas inherit the ~1e-7 noise of the rescaled betas, amplified by
        // 1 − ᾱ near t = 0.
        let tol = if config_of(&item).rescale_betas_zero_snr {
            1e-5
        } else {
            1e-6
        };
        for (i, (a, b)) in sigmas.iter().zip(&expected).enumerate() {
            assert!(
                (a - b).abs() <= tol * b.abs(),
                "{name}: sigma[{i}] {a} vs {b}"
            );
        }
    }
    let init_sigma = item["init_noise_sigma"].as_f64().unwrap() as f32;
    assert!(
        (sampler.init_noise_sigma() - init_sigma).abs() <= 1e-6 * init_sigma,
        "{name}: init σ"
    );

    let latents = fx.stack4(&format!("{name}.latents"));
    let noise_key = format!("{name}.noise");
    let draws = if fx.has(&noise_key) {
        fx.stack4(&noise_key)
    } else {
        vec![]
    };
    assert_eq!(draws.len() as u64, item["noise_draws"].as_u64().unwrap());
    let mut noise = TensorQueue::new(draws);

    let mut x = fx
        .tensor::<4>("init")
        .mul_scalar(sampler.init_noise_sigma());
    let mut worst = rel_err(&to_vec(x.clone()), &to_vec(latents[0].clone()));
    assert_eq!(
        latents.len(),
        sampler.timesteps().len() + 1,
        "{name}: step count"
    );
    for i in 0..sampler.timesteps().len() {
        let t = sampler.timesteps()[i];
        let input = sampler.scale_model_input(x.clone(), i).unwrap();
        let out = stand_in_model(input, t);
        x = sampler.step(out, i, x, &mut noise).unwrap();
        let err = rel_err(&to_vec(x.clone()), &to_vec(latents[i + 1].clone()));
        assert!(
            err <= LATENT_TOL,
            "{name}: step {i} (t = {t}) relative error {err:e}"
        );
        worst = worst.max(err);
    }
    assert_eq!(
        noise.remaining(),
        0,
        "{name}: the sampler drew fewer noise tensors than diffusers"
    );
    worst
}

macro_rules! parity {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                let worst = replay(stringify!($name));
                eprintln!("{}: worst relative error {worst:e}", stringify!($name));
            }
        )*
        const COVERED: &[&str] = &[$(stringify!($name)),*];
    };
}

parity!(
    pndm_sd15,
    pndm_prk_sd15,
    ddim_sd15,
    ddim_eta_sd15,
    ddpm_sd15,
    euler_sd15,
    euler_karras_sd15,
    euler_a_sd15,
    dpmpp_2m_sd15,
    dpmpp_2m_karras_sd15,
    dpmpp_2m_sde_karras_sd15,
    dpmpp_3m_sd15,
    dpmpp_2m_heun_sigma_min,
    dpmpp_2m_euler_final_linspace,
    ddim_sd21v,
    ddpm_sd21v,
    pndm_sd21v,
    euler_sd21v,
    euler_a_sd21v,
    dpmpp_2m_sd21v,
    dpmpp_2m_karras_sd21v,
    ddim_zsnr,
    ddpm_zsnr,
    euler_zsnr,
    euler_a_zsnr,
    dpmpp_2m_zsnr,
    ddim_linear_clip,
    ddpm_cosine_sample_clip,
    ddpm_linear_small_log,
    euler_cosine_sample_leading,
    dpmpp_2m_sample_cosine,
    dpmpp_2m_cosine_lambda_clip,
    euler_karras_sigma_min_final,
    heun_sd15,
    heun_karras_sd21v,
    heun_sample_clip_leading,
    dpm_2_sd15,
    dpm_2_karras_sd15,
    dpm_2_sd21v,
    dpm_2_a_sd15,
    dpm_2_a_karras_sd21v,
    lms_sd15,
    lms_karras_sd21v,
    heun_karras_sigma_bounds,
    dpm_2_a_karras_sigma_bounds,
    lms_karras_sigma_bounds,
    dpmsolver_2m_sd15,
    dpmsolver_2m_karras_sd21v,
    dpmsolver_3m_heun_sd15,
    dpmsolver_2m_sample_leading_sd15,
    dpmsingle_sd15,
    dpmsingle_sd15_odd,
    dpmsingle_karras_sd21v,
    dpmsingle_3_sd15,
    dpmsingle_dpmsolver_sd15,
    dpmsingle_sd21v,
    dpmsingle_heun_sigma_min,
    dpmsingle_3_heun_dpmsolver_sd21v,
    dpmsingle_3_heun_sigma_min,
    dpmsingle_3_dpmsolver_sd15,
);

/// The singlestep sampler's blocks of orders are diffusers' (recorded per run).
#[test]
fn dpmsingle_order_lists_match_diffusers() {
    let runs: Vec<_> = items("sampler_runs.json").into_iter().filter(|i| i["sampler"] == "dpmsingle").collect();
    assert_eq!(runs.len(), 10);
    for item in runs {
        let mut sampler = sd_sched::DpmSolverSinglestepSampler::<B>::new(&config_of(&item)).unwrap();
        sampler.set_timesteps(item["steps"].as_u64().unwrap() as usize).unwrap();
        let want: Vec<usize> = item["order_list"].as_array().unwrap().iter().map(|o| o.as_u64().unwrap() as usize).collect();
        assert_eq!(sampler.order_list(), want, "{}", item["name"]);
    }
}

#[test]
fn every_fixture_run_has_a_test() {
    let mut names: Vec<String> = items("sampler_runs.json")
        .iter()
        .map(|i| i["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    let mut covered: Vec<String> = COVERED.iter().map(|s| s.to_string()).collect();
    covered.sort();
    assert_eq!(names, covered);
}

#[test]
fn training_targets_match_diffusers() {
    let fx = Fixture::open("training.safetensors");
    let device = Default::default();
    let x0 = fx.tensor::<4>("x0");
    let noise = fx.tensor::<4>("noise");
    for item in items("training.json") {
        let name = item["name"].as_str().unwrap();
        let gamma = item["gamma"].as_f64().unwrap();
        let config = config_of(&item);
        let train = TrainingSchedule::<B>::new(&NoiseSchedule::new(&config).unwrap(), &device);
        let t = || fx.int_tensor("timesteps");

        let noisy = to_vec(train.add_noise(x0.clone(), noise.clone(), t()));
        let (want, _) = fx.f32(&format!("{name}.noisy"));
        assert!(rel_err(&noisy, &want) <= 1e-6, "{name}: add_noise");

        let v = to_vec(train.velocity(x0.clone(), noise.clone(), t()));
        let (want, _) = fx.f32(&format!("{name}.velocity"));
        assert!(rel_err(&v, &want) <= 1e-6, "{name}: velocity");
        if config.prediction_type == PredictionType::VPrediction {
            assert_eq!(
                to_vec(train.target(x0.clone(), noise.clone(), t())),
                v,
                "{name}: v target"
            );
        }

        let snr = to_vec(train.snr(t()));
        let (want, _) = fx.f32(&format!("{name}.snr"));
        assert_close_each_or_zero(&snr, &want, 1e-5, &format!("{name} snr"));

        for (key, pred) in [
            ("weights_epsilon", PredictionType::Epsilon),
            ("weights_v", PredictionType::VPrediction),
        ] {
            let w =
                to_vec(sd_sched::training::min_snr_weights(train.snr(t()), gamma, pred).unwrap());
            let (want, _) = fx.f32(&format!("{name}.{key}"));
            for (i, (a, b)) in w.iter().zip(&want).enumerate() {
                if b.is_finite() {
                    assert!(
                        (a - b).abs() <= 1e-5 * b.abs().max(1e-6),
                        "{name} {key}[{i}]: {a} vs {b}"
                    );
                } else {
                    // diffusers divides 0 by 0 at zero terminal SNR; we return the limit.
                    assert_eq!(*a, 1.0, "{name} {key}[{i}]: finite limit expected, got {a}");
                }
            }
        }
    }
}

fn assert_close_each_or_zero(actual: &[f32], expected: &[f32], tol: f64, what: &str) {
    for (i, (a, b)) in actual.iter().zip(expected).enumerate() {
        if *b == 0.0 {
            assert_eq!(*a, 0.0, "{what}[{i}]");
        } else {
            assert!(
                ((a - b) as f64).abs() <= tol * (*b as f64).abs(),
                "{what}[{i}]: {a} vs {b}"
            );
        }
    }
}

/// Replays one recorded diffusers img2img loop (`xtask/fixtures/sd_sched_img2img.py`):
/// the first step from [`sd_sched::img2img_start`], `add_noise` on the clean latents there,
/// then the remaining steps from that index; returns the worst per-step error.
fn replay_img2img(name: &str) -> f64 {
    let (fx, item) = fixture_run("img2img_runs", name);
    let mut sampler = build(&item);
    let steps = item["steps"].as_u64().unwrap() as usize;
    sampler.set_timesteps(steps).unwrap();
    assert_eq!(sampler.order() as u64, item["order"].as_u64().unwrap(), "{name}: order");
    let begin = sd_sched::img2img_start(steps, item["strength"].as_f64().unwrap(), sampler.order()).unwrap();
    assert_eq!(begin as u64, item["begin"].as_u64().unwrap(), "{name}: first step");
    sampler.set_begin_index(begin).unwrap();
    let expected_t = floats(&item["timesteps"]);
    assert_eq!(sampler.timesteps().len() - begin, expected_t.len(), "{name}: remaining timesteps");
    // Fractional (Karras, DPM-2 midpoint) timesteps differ from torch's in the last bits,
    // as in `replay`.
    for (i, (a, b)) in sampler.timesteps()[begin..].iter().zip(&expected_t).enumerate() {
        assert!((a - b).abs() <= 1e-6 * b.abs() + 1e-6, "{name}: remaining timestep {i}: {a} vs {b}");
    }

    let latents = fx.stack4(&format!("{name}.latents"));
    assert_eq!(latents.len(), expected_t.len() + 1, "{name}: step count");
    let noise_key = format!("{name}.noise");
    let draws = if fx.has(&noise_key) { fx.stack4(&noise_key) } else { vec![] };
    assert_eq!(draws.len() as u64, item["noise_draws"].as_u64().unwrap());
    let mut noise = TensorQueue::new(draws);

    let start_noise = fx.tensor::<4>(&format!("{name}.start_noise"));
    let mut x = sampler.add_noise(fx.tensor::<4>("clean"), start_noise, begin).unwrap();
    let mut worst = rel_err(&to_vec(x.clone()), &to_vec(latents[0].clone()));
    assert!(worst <= LATENT_TOL, "{name}: add_noise relative error {worst:e}");
    for (k, i) in (begin..sampler.timesteps().len()).enumerate() {
        let t = sampler.timesteps()[i];
        let input = sampler.scale_model_input(x.clone(), i).unwrap();
        let out = stand_in_model(input, t);
        x = sampler.step(out, i, x, &mut noise).unwrap();
        let err = rel_err(&to_vec(x.clone()), &to_vec(latents[k + 1].clone()));
        assert!(err <= LATENT_TOL, "{name}: step {i} (t = {t}) relative error {err:e}");
        worst = worst.max(err);
    }
    assert_eq!(noise.remaining(), 0, "{name}: the sampler drew fewer noise tensors than diffusers");
    worst
}

macro_rules! img2img_parity {
    ($($name:ident),* $(,)?) => {
        mod img2img {
            $(
                #[test]
                fn $name() {
                    let worst = super::replay_img2img(stringify!($name));
                    eprintln!("img2img {}: worst relative error {worst:e}", stringify!($name));
                }
            )*
            pub(super) const COVERED: &[&str] = &[$(stringify!($name)),*];
        }
    };
}

img2img_parity!(
    pndm_sd15,
    pndm_prk_sd15,
    ddim_sd15,
    ddim_eta_sd21v,
    ddpm_sd15,
    euler_sd15,
    euler_karras_sd21v,
    euler_a_sd15,
    euler_zsnr,
    dpmpp_2m_sd15,
    dpmpp_2m_karras_sd15,
    dpmpp_2m_sde_karras_sd15,
    dpmpp_3m_sd21v,
    dpmsingle_sd15,
    dpmsingle_3_sd15,
    heun_sd15,
    heun_karras_sd21v,
    dpm_2_sd15,
    dpm_2_a_karras_sd15,
    lms_sd15,
    lms_karras_sd21v,
    euler_full_sd15,
);

#[test]
fn every_img2img_fixture_run_has_a_test() {
    let mut names: Vec<String> = items("img2img_runs.json").iter().map(|i| i["name"].as_str().unwrap().to_string()).collect();
    names.sort();
    let mut covered: Vec<String> = img2img::COVERED.iter().map(|s| s.to_string()).collect();
    covered.sort();
    assert_eq!(names, covered);
}

/// A run begins only where a step begins (Heun and DPM-2 take two entries per step), and
/// the first step of a stepped sampler is then the begin index, not 0.
#[test]
fn begin_index_is_checked() {
    for (spec, order) in [("heun", 2), ("dpm_2", 2), ("dpm_2_a", 2), ("euler", 1), ("dpmpp_2m", 1), ("pndm", 1), ("lms", 1)] {
        let mut sampler = spec.parse::<sd_sched::SamplerSpec>().unwrap().build::<B>(&SchedulerConfig::sd15()).unwrap();
        assert!(sampler.set_begin_index(0).is_err(), "{spec}: before set_timesteps");
        sampler.set_timesteps(10).unwrap();
        assert_eq!(sampler.order(), order, "{spec}");
        let len = sampler.timesteps().len();
        assert!(sampler.set_begin_index(len).is_err(), "{spec}: past the end");
        if order == 2 {
            assert!(sampler.set_begin_index(3).is_err(), "{spec}: inside a step");
        }
        sampler.set_begin_index(4).unwrap();
        let zeros = burn::tensor::Tensor::<B, 4>::zeros([1, 4, 2, 2], &Default::default());
        let mut none = sd_sched::NoNoise;
        let stateful = !matches!(spec, "euler");
        if stateful {
            assert!(sampler.step(zeros.clone(), 0, zeros.clone(), &mut none).is_err(), "{spec}: step 0 after beginning at 4");
        }
        sampler.step(zeros.clone(), 4, zeros, &mut none).unwrap();
    }
}
