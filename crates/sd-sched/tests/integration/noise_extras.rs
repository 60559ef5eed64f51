//! Multi-resolution noise against kohya's `pyramid_noise_like` (with its random draws fixed by
//! `xtask/fixtures/sd_sched_multires.py`), and the debiased-estimation weights.

use crate::common;

use burn::tensor::{Tensor, TensorData};
use common::{Fixture, B};
use sd_sched::training::{debiased_weights, pyramid_noise, pyramid_ratios};
use sd_sched::{PredictionType, SeededNoise, TensorQueue};

/// An f64 tensor of the fixture file.
fn f64s(name: &str) -> Vec<f64> {
    let bytes = std::fs::read(common::fixture_path("multires.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensor(name).unwrap().data().chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().unwrap())).collect()
}

#[test]
fn pyramid_noise_matches_kohya() {
    let f = Fixture::open("multires.safetensors");
    for case in ["bucket", "square"] {
        let levels: Vec<Tensor<B, 4>> = (0..).map(|i| format!("{case}.level.{i}")).take_while(|n| f.has(n)).map(|n| f.tensor::<4>(&n)).collect();
        let used = levels.len();
        let mut source = TensorQueue::new(levels);
        let ratios = f64s(&format!("{case}.ratios"));
        let discount = f64s(&format!("{case}.discount"))[0];
        let out = pyramid_noise(f.tensor::<4>(&format!("{case}.noise")), discount, &ratios, &mut source).unwrap();
        assert_eq!(source.remaining(), 0, "{case}: {used} levels drawn");
        let (expected, shape) = f.f32(&format!("{case}.out"));
        assert_eq!(out.dims().to_vec(), shape);
        let ours: Vec<f32> = out.into_data().to_vec().unwrap();
        let worst = ours.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(worst < 2e-5, "{case}: max |diff| {worst}");
    }
}

#[test]
fn pyramid_noise_has_unit_std_more_low_frequency_energy_and_checks_its_arguments() {
    let device = Default::default();
    let mut source = SeededNoise::new(3);
    let ratios = pyramid_ratios(source.rng(), 6);
    assert!(ratios.iter().all(|r| (2.0..4.0).contains(r)));
    let white = sd_sched::NoiseSource::<B>::sample(&mut source, [4, 4, 64, 64], &device).unwrap();
    let multires = pyramid_noise(white.clone(), 0.8, &ratios, &mut source).unwrap();
    let std = |t: Tensor<B, 4>| -> f32 { t.reshape([4 * 4 * 64 * 64]).var(0).sqrt().into_scalar() };
    assert!((std(multires.clone()) - 1.0).abs() < 1e-4);
    // The variance of each plane's mean: 1/4096 for white noise, far more with the coarse levels.
    let plane_means = |t: Tensor<B, 4>| -> f32 { t.mean_dim(3).mean_dim(2).reshape([16]).var(0).into_scalar() };
    assert!(plane_means(multires) > 20.0 * plane_means(white.clone()));
    let mut queue = TensorQueue::<B>::new([]);
    assert!(pyramid_noise(white.clone(), 0.0, &ratios, &mut queue).is_err());
    assert!(pyramid_noise(white, 0.3, &[0.5], &mut queue).is_err());
}

#[test]
fn debiased_weights_are_kohyas() {
    let snr = [0.0f32, 0.01, 0.5, 1.0, 4.0, 250.0, 5000.0];
    let t = Tensor::<B, 1>::from_data(TensorData::new(snr.to_vec(), [snr.len()]), &Default::default());
    for (prediction, weight) in [
        // kohya's, with SNR 0 (zero terminal SNR) floored to 1e-3 instead of an infinite weight.
        (PredictionType::Epsilon, (|s: f64| 1.0 / s.clamp(1e-3, 1000.0).sqrt()) as fn(f64) -> f64),
        (PredictionType::VPrediction, |s: f64| 1.0 / (s.clamp(1e-3, 1000.0) + 1.0)),
    ] {
        let ours: Vec<f32> = debiased_weights(t.clone(), prediction).into_data().to_vec().unwrap();
        for (s, w) in snr.iter().zip(ours) {
            let expected = weight(f64::from(*s)) as f32;
            assert!((w - expected).abs() <= 1e-6 * expected, "{prediction:?} snr {s}: {w} vs {expected}");
        }
    }
}

#[test]
fn losses_and_huber_thresholds_are_kohyas() {
    use sd_sched::training::{elementwise_loss, HuberSchedule, LossType, TrainingSchedule};
    use sd_sched::{NoiseSchedule, SchedulerConfig};
    let device = Default::default();
    let (pred, target) = ([0.5f32, -2.0, 0.01, 3.0], [0.0f32, 1.0, 0.0, -1.0]);
    let t4 = |v: [f32; 4]| Tensor::<B, 4>::from_data(TensorData::new(v.to_vec(), [2, 1, 1, 2]), &device);
    let c = [0.1f32, 0.5];
    let c_t = Tensor::<B, 1>::from_data(TensorData::new(c.to_vec(), [2]), &device);
    type Reference = fn(f64, f64) -> f64;
    let cases: [(LossType, Reference); 4] = [
        (LossType::L2, |d, _| d * d),
        (LossType::L1, |d, _| d.abs()),
        (LossType::Huber, |d, c| 2.0 * c * ((d * d + c * c).sqrt() - c)),
        (LossType::SmoothL1, |d, c| 2.0 * ((d * d + c * c).sqrt() - c)),
    ];
    for (loss, reference) in cases {
        let ours: Vec<f32> = elementwise_loss(t4(pred), t4(target), loss, Some(c_t.clone())).unwrap().into_data().to_vec().unwrap();
        for (i, v) in ours.iter().enumerate() {
            let expected = reference(f64::from(pred[i] - target[i]), f64::from(c[i / 2])) as f32;
            assert!((v - expected).abs() <= 1e-6 * expected.abs().max(1e-3), "{loss:?} {i}: {v} vs {expected}");
        }
    }
    assert!(elementwise_loss(t4(pred), t4(target), LossType::Huber, None).is_err());

    let schedule = NoiseSchedule::new(&SchedulerConfig::sd15()).unwrap();
    let train = TrainingSchedule::<B>::new(&schedule, &device);
    let steps = [0i64, 250, 999];
    let ts = Tensor::<B, 1, burn::tensor::Int>::from_ints(steps.as_slice(), &device);
    let (c, scale) = (0.1f64, 2.0f64);
    let check = |kind: HuberSchedule, reference: &dyn Fn(usize) -> f64| {
        let ours: Vec<f32> = train.huber_thresholds(ts.clone(), kind, c, scale).into_data().to_vec().unwrap();
        for (v, &t) in ours.iter().zip(&steps) {
            let expected = reference(t as usize) as f32;
            assert!((v - expected).abs() <= 2e-6 * expected.abs(), "{kind:?} t={t}: {v} vs {expected}");
        }
    };
    check(HuberSchedule::Exponential, &|t| (c.ln() / 1000.0 * t as f64).exp() * scale);
    check(HuberSchedule::Snr, &|t| {
        let a = f64::from(schedule.alphas_cumprod()[t]);
        let sigma = ((1.0 - a) / a).sqrt();
        (1.0 - c) / (1.0 + sigma).powi(2) + c
    });
    check(HuberSchedule::Constant, &|_| c * scale);
}
