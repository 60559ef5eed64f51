//! `FlatAdamW::with_amsgrad` against PyTorch's `AdamW(amsgrad=True)`: the trajectories of
//! `xtask/fixtures/lora_core_amsgrad.py` replayed with the recorded gradients (a tensor
//! without gradients in some steps, weight decay, a learning-rate schedule), also across
//! a save and restore of the optimizer's state halfway.

use lora_core::optim::{AdamWSettings, FlatAdamW};

use crate::common;
use common::trajectory::{replay, start, step_grads, values, Fixture};

fn fixture() -> Fixture {
    common::f32_fixture("amsgrad.safetensors")
}

/// The settings of the fixture script's `CASES`.
fn cases() -> [(&'static str, AdamWSettings); 2] {
    let settings = |beta_2, weight_decay| AdamWSettings { beta_1: 0.9, beta_2, epsilon: 1e-8, weight_decay };
    [("decayed", settings(0.5, 0.1)), ("defaults", settings(0.999, 0.0))]
}

/// Each step's values match PyTorch's to rounding (burn's AdamW divides `v` by its bias
/// correction before the square root, PyTorch after).
#[test]
fn amsgrad_follows_torch() {
    let f = fixture();
    for (case, settings) in cases() {
        let (pair, optim) = start(&f, case, settings);
        let mut optim = optim.with_amsgrad().unwrap();
        let pair = replay(&f, case, pair, &mut optim, |step, t, worst| {
            assert!(worst <= 2e-6, "{case} step {step} {t}: max |diff| {worst:e}");
        });
        let b = values(pair.b.val().inner());
        assert!(b.iter().filter(|v| v.abs() > 1e-3).count() > b.len() / 2, "{case}: b barely moved: {b:?}");
    }
}

/// Without AMSGrad the same gradients give other values: the fixture tells them apart.
#[test]
fn plain_adamw_does_not_follow_the_fixture() {
    let f = fixture();
    let (case, settings) = cases()[0];
    let (pair, mut optim) = start(&f, case, settings);
    let mut worst = 0f32;
    replay(&f, case, pair, &mut optim, |_, _, w| worst = worst.max(w));
    assert!(worst > 1e-4, "{worst:e}");
}

/// Stopped after six steps, its moments, step counts and largest second moments moved to
/// a new optimizer, the run goes on as PyTorch's; without the largest moments it does not.
#[test]
fn amsgrad_resumes_from_its_saved_state() {
    let f = fixture();
    let (case, settings) = cases()[0];
    let run = |restore_max: bool| -> f32 {
        let (mut pair, optim) = start(&f, case, settings);
        let mut optim = optim.with_amsgrad().unwrap();
        let lrs = f[&format!("{case}.lr")].1.clone();
        let mut worst = 0f32;
        for (step, &lr) in lrs.iter().enumerate() {
            if step == 6 {
                let mut fresh = FlatAdamW::new(settings, &pair, &Default::default()).with_amsgrad().unwrap();
                for id in [pair.a.id, pair.b.id] {
                    let (t, m1, m2) = optim.moments::<2>(id).unwrap();
                    fresh.set_moments(id, t, m1, m2).unwrap();
                }
                if restore_max {
                    fresh.set_amsgrad_state(optim.amsgrad_state().unwrap()).unwrap();
                }
                optim = fresh;
            }
            let grads = optim.gather_grads(&pair, step_grads(&f, case, step, &pair));
            pair = optim.step(f64::from(lr), pair, grads);
            for (t, now) in [("a", pair.a.val().inner()), ("b", pair.b.val().inner())] {
                let want = &f[&format!("{case}.param.{step}.{t}")].1;
                worst = worst.max(values(now).iter().zip(want).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max));
            }
        }
        worst
    };
    assert!(run(true) <= 2e-6, "{:e}", run(true));
    assert!(run(false) > 1e-5, "the largest second moments matter after a restore");
}

/// AMSGrad is Adam's: refused on top of another update rule, dropped by a later one; its
/// state takes only a vector of the optimizer's length.
#[test]
fn amsgrad_belongs_to_adams_update() {
    let f = fixture();
    let (case, settings) = cases()[0];
    let (_, optim) = start(&f, case, settings);
    assert!(optim.clone().with_lion().with_amsgrad().is_err());
    assert!(optim.clone().with_amsgrad().unwrap().with_lion().amsgrad_state().is_none());
    let mut plain = optim.clone();
    let state = optim.clone().with_amsgrad().unwrap().amsgrad_state().unwrap();
    assert!(plain.set_amsgrad_state(state.clone()).is_err(), "no AMSGrad, no state");
    let mut ams = optim.with_amsgrad().unwrap();
    assert!(ams.set_amsgrad_state(state.clone().slice(0..3)).is_err());
    assert!(ams.set_amsgrad_state(state).is_ok());
}
