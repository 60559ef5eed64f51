//! `FlatAdamW::with_ademamix` against the `bitsandbytes` package's AdEMAMix: the
//! trajectories of `xtask/fixtures/lora_core_ademamix.py` replayed with the recorded
//! gradients (a tensor without gradients in some steps, so that its step count and its
//! α / β₃ schedules lag the other's; weight decay; a learning-rate schedule), per-tensor
//! learning rates, and a resumed state.

use burn::tensor::Tensor;
use lora_core::optim::{AdEMAMixSettings, AdamWSettings, FlatAdamW};

use crate::common;
use common::trajectory::{replay, start, step_grads, values, Fixture};

fn fixture() -> Fixture {
    common::f32_fixture("ademamix.safetensors")
}

/// The settings of the fixture script's `CASES`.
fn cases() -> [(&'static str, AdamWSettings, AdEMAMixSettings); 2] {
    [
        ("defaults", AdamWSettings { beta_1: 0.9, beta_2: 0.999, epsilon: 1e-8, weight_decay: 0.0 }, AdEMAMixSettings::default()),
        (
            "schedules",
            AdamWSettings { beta_1: 0.8, beta_2: 0.99, epsilon: 1e-6, weight_decay: 0.1 },
            AdEMAMixSettings { beta_3: 0.999, alpha: 8.0, t_alpha: Some(6), t_beta3: Some(8) },
        ),
    ]
}

/// Each step's values match bitsandbytes' to rounding. Its CPU kernel (the fixture's)
/// decays the values before the update and its CUDA kernel (followed here) after it: a
/// difference of `lr² · weight_decay · |update|` per step, which the tolerance adds up
/// (the updates' size stays under 2 here; with the CPU kernel's order the differences
/// stay under 1e-8 in the `schedules` case).
#[test]
fn ademamix_follows_bitsandbytes() {
    let f = fixture();
    for (case, adam, settings) in cases() {
        let (pair, optim) = start(&f, case, adam);
        let mut optim = optim.with_ademamix(settings).unwrap();
        assert_eq!(optim.ademamix_settings(), Some(settings));
        let lrs = f[&format!("{case}.lr")].1.clone();
        let pair = replay(&f, case, pair, &mut optim, |step, t, worst| {
            let order: f32 = lrs[..=step].iter().map(|lr| 2.0 * lr * lr * adam.weight_decay).sum();
            let tolerance = 1e-7 + order;
            assert!(worst <= tolerance, "{case} step {step} {t}: max |diff| {worst:e} > {tolerance:e}");
        });
        // The test means something: `b` (zero at the start) moved by about lr per step.
        let b = values(pair.b.val().inner());
        assert!(b.iter().filter(|v| v.abs() > 1e-3).count() > b.len() / 2, "{case}: b barely moved: {b:?}");
    }
}

/// Without the slow moment (α = 0) and with β₃ = 0, AdEMAMix is bitsandbytes' Adam with
/// decoupled decay: the same values as `FlatAdamW`'s own Adam update up to rounding, for
/// zero weight decay (burn's AdamW puts ε elsewhere, so ε is tiny here).
#[test]
fn without_the_slow_moment_it_is_adam() {
    let f = fixture();
    let adam = AdamWSettings { beta_1: 0.9, beta_2: 0.999, epsilon: 1e-12, weight_decay: 0.0 };
    let (pair, optim) = start(&f, "defaults", adam);
    let mut mix = optim.with_ademamix(AdEMAMixSettings { alpha: 0.0, beta_3: 0.0, ..Default::default() }).unwrap();
    let (other, mut plain) = start(&f, "defaults", adam);
    let (mut pair, mut other) = (pair, other);
    for step in 0..6 {
        let grads = mix.gather_grads(&pair, step_grads(&f, "defaults", step, &pair));
        pair = mix.step(1e-3, pair, grads);
        let grads = plain.gather_grads(&other, step_grads(&f, "defaults", step, &other));
        other = plain.step(1e-3, other, grads);
    }
    let (x, y) = (values(pair.a.val().inner()), values(other.a.val().inner()));
    let worst = x.iter().zip(&y).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(worst <= 1e-6, "max |diff| {worst:e}");
    let start = &f["defaults.init.a"].1;
    let moved = x.iter().zip(start).map(|(a, b)| (a - b).abs()).sum::<f32>() / x.len() as f32;
    assert!(moved > 1e-3, "the values moved: {moved:e}");
}

/// Per-tensor learning rates scale the step and the decay as the learning rate does.
#[test]
fn lr_scales_multiply_the_step() {
    let f = fixture();
    let (case, adam, settings) = cases()[1];
    let (pair, optim) = start(&f, case, adam);
    let b = pair.b.id;
    let mut scaled = optim.with_ademamix(settings).unwrap().with_lr_scales(|id| if id == b { 2.0 } else { 1.0 });
    let (twice, plain) = start(&f, case, adam);
    let mut plain = plain.with_ademamix(settings).unwrap();
    let grads = scaled.gather_grads(&pair, step_grads(&f, case, 0, &pair));
    let pair = scaled.step(1e-3, pair, grads);
    let grads = plain.gather_grads(&twice, step_grads(&f, case, 0, &twice));
    let twice = plain.step(2e-3, twice, grads);
    let (x, y) = (values(pair.b.val().inner()), values(twice.b.val().inner()));
    let worst = x.iter().zip(&y).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(worst <= 1e-9, "b at twice the rate: {worst:e}");
}

/// A state carried to a new optimizer (moments, step counts and the slow moment) goes on
/// exactly as an uninterrupted run; a state of the wrong length is an error.
#[test]
fn a_resumed_state_continues_the_trajectory() {
    let f = fixture();
    let (case, adam, settings) = cases()[1];
    let (pair, optim) = start(&f, case, adam);
    let mut whole = optim.with_ademamix(settings).unwrap();
    let whole = replay(&f, case, pair, &mut whole, |_, _, _| {});
    let (pair, optim) = start(&f, case, adam);
    let mut first = optim.with_ademamix(settings).unwrap();
    let mut pair = pair;
    let lr = |step: usize| f64::from(f[&format!("{case}.lr")].1[step]);
    for step in 0..5 {
        let grads = first.gather_grads(&pair, step_grads(&f, case, step, &pair));
        pair = first.step(lr(step), pair, grads);
    }
    // As a resumed run builds it: on the module's current values.
    let mut second = FlatAdamW::new(adam, &pair, &Default::default()).with_ademamix(settings).unwrap();
    let short = lora_core::optim::AdEMAMixState::<common::trajectory::AD> { slow: Tensor::zeros([3], &Default::default()) };
    assert!(second.set_ademamix_state(short).is_err());
    second.set_ademamix_state(first.ademamix_state().unwrap()).unwrap();
    for id in [pair.a.id, pair.b.id] {
        let (time, m1, m2) = first.moments::<2>(id).unwrap();
        second.set_moments(id, time, m1, m2).unwrap();
    }
    for step in 5..12 {
        let grads = second.gather_grads(&pair, step_grads(&f, case, step, &pair));
        pair = second.step(lr(step), pair, grads);
    }
    assert_eq!(values(pair.a.val().inner()), values(whole.a.val().inner()));
    assert_eq!(values(pair.b.val().inner()), values(whole.b.val().inner()));
}
