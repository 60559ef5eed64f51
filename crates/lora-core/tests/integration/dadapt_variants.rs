//! `FlatAdamW::with_dadapt_adam` with `DAdaptKind::{AdamPreprint, Lion, Sgd, AdaGrad, Adan}`
//! against the `dadaptation` package's `DAdaptAdamPreprint`, `DAdaptLion`, `DAdaptSGD`,
//! `DAdaptAdaGrad` and `DAdaptAdan`: the
//! trajectories of `xtask/fixtures/lora_core_dadapt_variants.py` (values and the estimate
//! `d` after every step; weight decay coupled and decoupled, momentum, growth limits,
//! schedules, tensors without a gradient, a step without progress), a resumed state, and
//! the options each one refuses.

use lora_core::optim::{AdamWSettings, DAdaptKind, DAdaptSettings, FlatAdamW};

use crate::common;
use common::trajectory::{start, step_grads, values, Fixture, Pair, AD};

fn fixture() -> Fixture {
    common::f32_fixture("dadapt_variants.safetensors")
}

/// The settings of the fixture script's `CASES`.
fn cases() -> Vec<(&'static str, AdamWSettings, DAdaptSettings)> {
    let adam = |beta_1, beta_2, epsilon, weight_decay| AdamWSettings { beta_1, beta_2, epsilon, weight_decay };
    let kind = |kind| DAdaptSettings { kind, ..Default::default() };
    use DAdaptKind::*;
    vec![
        ("preprint", adam(0.9, 0.999, 1e-8, 0.0), kind(AdamPreprint)),
        ("preprint_decay", adam(0.8, 0.95, 1e-6, 0.1), DAdaptSettings { decouple: true, growth_rate: 1.5, d0: 1e-5, ..kind(AdamPreprint) }),
        ("preprint_coupled", adam(0.9, 0.999, 1e-8, 0.05), kind(AdamPreprint)),
        ("lion", adam(0.9, 0.99, 1e-8, 0.0), kind(Lion)),
        ("lion_decay", adam(0.95, 0.98, 1e-8, 0.5), DAdaptSettings { d0: 1e-5, ..kind(Lion) }),
        ("sgd", adam(0.9, 0.999, 1e-8, 0.0), kind(Sgd)),
        ("sgd_momentum", adam(0.9, 0.999, 1e-8, 0.01), DAdaptSettings { momentum: 0.9, growth_rate: 1.3, d0: 1e-5, ..kind(Sgd) }),
        ("adagrad", adam(0.9, 0.999, 1e-6, 0.0), kind(AdaGrad)),
        ("adagrad_momentum", adam(0.9, 0.999, 1e-5, 0.01), DAdaptSettings { momentum: 0.5, growth_rate: 2.0, ..kind(AdaGrad) }),
        ("adan", adam(0.98, 0.92, 1e-8, 0.02), kind(Adan)),
        ("adan_no_prox", adam(0.9, 0.8, 1e-8, 0.1), DAdaptSettings { beta_3: 0.95, no_prox: true, growth_rate: 1.5, d0: 1e-5, ..kind(Adan) }),
    ]
}

/// `|x − y| ≤ tol · max(|y|) + floor` over a tensor, with the worst offender in the message.
fn assert_close(x: &[f32], y: &[f32], tol: f32, floor: f32, what: &str) {
    let scale = y.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    let worst = x.iter().zip(y).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst <= tol * scale + floor, "{what}: max |diff| {worst:e} against max |ref| {scale:e}");
}

fn optimizer(f: &Fixture, case: &str, adam: AdamWSettings, settings: DAdaptSettings) -> (Pair<AD>, FlatAdamW<AD>) {
    let (pair, optim) = start(f, case, adam);
    (pair, optim.with_dadapt_adam(settings).unwrap())
}

/// Each step's distance travelled from the start and estimate match the package's: f32
/// scalars here, f64 ones there, so a few ulps per step, plus the values' own ulps.
#[test]
fn variants_follow_dadaptation() {
    let f = fixture();
    for (case, adam, settings) in cases() {
        let (mut pair, mut optim) = optimizer(&f, case, adam, settings);
        assert_eq!(optim.dadapt_settings(), Some(settings));
        let lrs = &f[&format!("{case}.lr")].1;
        let ds = &f[&format!("{case}.d")].1;
        for (step, &lr) in lrs.iter().enumerate() {
            let grads = optim.gather_grads(&pair, step_grads(&f, case, step, &pair));
            pair = optim.step(f64::from(lr), pair, grads);
            for (t, now) in [("a", pair.a.val().inner()), ("b", pair.b.val().inner())] {
                let init = &f[&format!("{case}.init.{t}")].1;
                let moved = |v: &[f32]| v.iter().zip(init).map(|(x, i)| x - i).collect::<Vec<_>>();
                let ulps = 4.0 * f32::EPSILON * init.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert_close(&moved(&values(now)), &moved(&f[&format!("{case}.param.{step}.{t}")].1), 5e-6, ulps, &format!("{case} step {step} {t}"));
            }
            let d: f32 = optim.dadapt_d().unwrap().into_scalar();
            assert!((d - ds[step]).abs() <= 5e-6 * ds[step], "{case} step {step}: d {d:e}, dadaptation {:e}", ds[step]);
        }
        assert!(ds.last().unwrap() > &(1.5 * ds[0]), "{case}: the estimate must move for the test to mean anything");
    }
}

/// A state carried to a new optimizer (DAdaptSGD's starting values too) goes on exactly as
/// an uninterrupted run; a state of another kind's shape is an error.
#[test]
fn a_resumed_state_continues_the_trajectory() {
    let f = fixture();
    for (case, adam, settings) in cases().into_iter().filter(|c| ["preprint_decay", "lion_decay", "sgd_momentum", "adagrad_momentum", "adan_no_prox"].contains(&c.0)) {
        let lrs = &f[&format!("{case}.lr")].1;
        let (mut pair, mut optim) = optimizer(&f, case, adam, settings);
        let half = lrs.len() / 2;
        for (step, &lr) in lrs.iter().enumerate().take(half) {
            let grads = optim.gather_grads(&pair, step_grads(&f, case, step, &pair));
            pair = optim.step(f64::from(lr), pair, grads);
        }
        let mut resumed = FlatAdamW::new(adam, &pair, &Default::default()).with_dadapt_adam(settings).unwrap();
        for id in [pair.a.id, pair.b.id] {
            let (time, m1, m2) = optim.moments::<2>(id).unwrap();
            resumed.set_moments(id, time, m1, m2).unwrap();
        }
        let mut wrong = optim.dadapt_state().unwrap();
        wrong.x0 = match wrong.x0 {
            Some(_) => None,
            None => Some(wrong.s.clone()),
        };
        let err = resumed.set_dadapt_state(wrong).unwrap_err().to_string();
        assert!(err.contains("state x0"), "{case}: {err}");
        resumed.set_dadapt_state(optim.dadapt_state().unwrap()).unwrap();
        let mut other = pair.clone();
        for (step, &lr) in lrs.iter().enumerate().skip(half) {
            let grads = optim.gather_grads(&pair, step_grads(&f, case, step, &pair));
            pair = optim.step(f64::from(lr), pair, grads);
            let grads = resumed.gather_grads(&other, step_grads(&f, case, step, &other));
            other = resumed.step(f64::from(lr), other, grads);
        }
        assert_eq!(values(pair.a.val().inner()), values(other.a.val().inner()), "{case}");
        assert_eq!(values(pair.b.val().inner()), values(other.b.val().inner()), "{case}");
    }
}

/// Each optimizer takes only its own options, as the package's constructors do.
#[test]
fn foreign_options_are_errors() {
    let f = fixture();
    let adam = AdamWSettings { epsilon: 1e-8, weight_decay: 0.0, ..Default::default() };
    for (settings, expected) in [
        (DAdaptSettings { kind: DAdaptKind::Lion, growth_rate: 1.02, ..Default::default() }, "no growth_rate"),
        (DAdaptSettings { kind: DAdaptKind::Sgd, use_bias_correction: true, ..Default::default() }, "use_bias_correction is DAdaptAdam's"),
        (DAdaptSettings { kind: DAdaptKind::AdamPreprint, momentum: 0.9, ..Default::default() }, "momentum is DAdaptSGD's"),
        (DAdaptSettings { kind: DAdaptKind::Sgd, no_prox: true, ..Default::default() }, "no_prox is DAdaptAdan's"),
        (DAdaptSettings { kind: DAdaptKind::Adan, beta_3: 1.0, ..Default::default() }, "beta3 must be in [0, 1)"),
        (DAdaptSettings { kind: DAdaptKind::Sgd, momentum: 1.0, ..Default::default() }, "momentum must be in [0, 1)"),
    ] {
        let (_, optim) = start(&f, "lion", adam);
        let err = optim.with_dadapt_adam(settings).unwrap_err().to_string();
        assert!(err.contains(expected) && err.contains(settings.kind.name()), "{settings:?}: {err}");
    }
}
