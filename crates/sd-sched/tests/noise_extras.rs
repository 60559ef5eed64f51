//! Multi-resolution noise against kohya's `pyramid_noise_like` (with its random draws fixed by
//! `xtask/fixtures/sd_sched_multires.py`), and the debiased-estimation weights.

mod common;

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
