//! `FlatAdamW::with_schedule_free` against the `schedulefree` package's
//! `AdamWScheduleFree` / `RAdamScheduleFree` / `SGDScheduleFree`: the trajectories of
//! `xtask/fixtures/lora_core_schedule_free.py` (the training values `y` and the evaluation
//! values `x` after every step; warmup, decay, polynomial weights, RAdam's silent and SGD
//! first steps, per-tensor learning rates, a tensor without a gradient), replayed with
//! the recorded gradients; a guarded step that does not happen, a save / restore of the
//! state in the middle of a run, and bf16 working copies.

use std::collections::HashMap;

use burn::backend::{Autodiff, Flex};
use burn::module::{Module, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Bool, DType, FloatDType, Tensor, TensorData};
use lora_core::optim::{AdamWSettings, FlatAdamW, ScheduleFreeSettings};

use crate::common;

type AD = Autodiff<Flex>;
type Fixture = HashMap<String, (Vec<usize>, Vec<f32>)>;

const LR: f64 = 1e-2;
const STEPS: usize = 12;

#[derive(Module, Debug)]
struct Pair<B: burn::tensor::backend::Backend> {
    a: Param<Tensor<B, 2>>,
    b: Param<Tensor<B, 2>>,
}

struct Case {
    name: &'static str,
    adam: AdamWSettings,
    sf: ScheduleFreeSettings,
    /// The package's `warmup_steps`, which the caller's learning rate carries here.
    warmup: usize,
    /// The learning-rate factor of `b`.
    b_factor: f32,
}

/// The settings of the fixture script's `CASES`.
fn cases() -> Vec<Case> {
    let adam = |beta_1, beta_2, epsilon, weight_decay| AdamWSettings { beta_1, beta_2, epsilon, weight_decay };
    let radam = ScheduleFreeSettings { radam: true, ..Default::default() };
    let sgd = ScheduleFreeSettings { sgd: true, ..Default::default() };
    vec![
        Case { name: "adamw", adam: adam(0.9, 0.999, 1e-8, 0.0), sf: ScheduleFreeSettings::default(), warmup: 0, b_factor: 1.0 },
        Case { name: "warmup", adam: adam(0.95, 0.99, 1e-6, 0.1), sf: ScheduleFreeSettings { r: 0.5, weight_lr_power: 1.5, ..Default::default() }, warmup: 4, b_factor: 1.0 },
        Case { name: "radam", adam: adam(0.9, 0.99, 1e-8, 0.0), sf: radam, warmup: 0, b_factor: 1.0 },
        Case { name: "radam_sgd", adam: adam(0.9, 0.999, 1e-8, 0.05), sf: ScheduleFreeSettings { silent_sgd_phase: false, ..radam }, warmup: 0, b_factor: 1.0 },
        Case { name: "scaled", adam: adam(0.9, 0.999, 1e-8, 0.0), sf: ScheduleFreeSettings::default(), warmup: 0, b_factor: 4.0 },
        Case { name: "radam_late", adam: adam(0.9, 0.99, 1e-8, 0.01), sf: radam, warmup: 0, b_factor: 4.0 },
        // SGD: β₁ is the momentum; β₂ and ε are unused (odd values prove it).
        Case { name: "sgd", adam: adam(0.9, 0.5, 7.0, 0.0), sf: sgd, warmup: 0, b_factor: 1.0 },
        Case { name: "sgd_warmup", adam: adam(0.8, 0.0, 0.0, 0.05), sf: ScheduleFreeSettings { r: 0.5, weight_lr_power: 1.0, ..sgd }, warmup: 3, b_factor: 2.0 },
    ]
}

/// The package's warmup: `lr·(k + 1)/warmup_steps` for the first steps.
fn lr_at(case: &Case, step: usize) -> f64 {
    match step < case.warmup {
        true => LR * (step + 1) as f64 / case.warmup as f64,
        false => LR,
    }
}

fn tensor(data: &(Vec<usize>, Vec<f32>)) -> Tensor<Flex, 2> {
    Tensor::from_data(TensorData::new(data.1.clone(), [data.0[0], data.0[1]]), &Default::default())
}

fn values(t: Tensor<Flex, 2>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

/// `|x − y| ≤ tol · max(|y|) + floor` over a tensor, with the worst offender in the message.
fn assert_close(x: &[f32], y: &[f32], tol: f32, floor: f32, what: &str) {
    let scale = y.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    let worst = x.iter().zip(y).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst <= tol * scale + floor, "{what}: max |diff| {worst:e} against max |ref| {scale:e}");
}

/// The recorded gradients of `case` at `step` (missing ones left out).
fn step_grads(f: &Fixture, case: &str, step: usize, pair: &Pair<AD>) -> GradientsParams {
    let mut grads = GradientsParams::new();
    for (name, id) in [("a", pair.a.id), ("b", pair.b.id)] {
        if let Some(g) = f.get(&format!("{case}.grad.{step}.{name}")) {
            grads.register(id, tensor(g));
        }
    }
    grads
}

fn start(f: &Fixture, case: &Case) -> (Pair<AD>, FlatAdamW<AD>) {
    let pair = Pair::<AD> {
        a: Param::from_tensor(Tensor::from_inner(tensor(&f[&format!("{}.init.a", case.name)])).require_grad()),
        b: Param::from_tensor(Tensor::from_inner(tensor(&f[&format!("{}.init.b", case.name)])).require_grad()),
    };
    let b = pair.b.id;
    let factor = case.b_factor;
    let optim = FlatAdamW::new(case.adam, &pair, &Default::default())
        .with_schedule_free(case.sf)
        .unwrap()
        .with_lr_scales(|id| if id == b { factor } else { 1.0 });
    (pair, optim)
}

/// The values' movement from the start against the package's: f32 scalars on the device
/// here, f64 ones on the host there, so a few ulps per step, plus the values' own ulps.
fn assert_moved_like(f: &Fixture, case: &str, key: &str, step: usize, now: &Pair<AD>) {
    for (t, val) in [("a", now.a.val().inner()), ("b", now.b.val().inner())] {
        let init = &f[&format!("{case}.init.{t}")].1;
        let moved = |v: &[f32]| v.iter().zip(init).map(|(x, i)| x - i).collect::<Vec<_>>();
        let ulps = 4.0 * f32::EPSILON * init.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert_close(&moved(&values(val)), &moved(&f[&format!("{case}.{key}.{step}.{t}")].1), 2e-5, ulps, &format!("{case} step {step} {key}.{t}"));
    }
}

#[test]
fn schedule_free_follows_the_schedulefree_package() {
    let f = common::f32_fixture("schedule_free.safetensors");
    for case in cases() {
        let (mut pair, mut optim) = start(&f, &case);
        let mut moved_x = false;
        for step in 0..STEPS {
            let grads = optim.gather_grads(&pair, step_grads(&f, case.name, step, &pair));
            pair = optim.step(lr_at(&case, step), pair, grads);
            assert_moved_like(&f, case.name, "y", step, &pair);
            let x = optim.to_eval(pair.clone());
            assert_moved_like(&f, case.name, "x", step, &x);
            assert_moved_like(&f, case.name, "x", step, &optim.to_master_eval(pair.clone()));
            moved_x |= values(x.b.val().inner()) != values(pair.b.val().inner());
        }
        assert!(moved_x, "{}: x and y must part for the test to mean anything", case.name);
    }
}

#[test]
fn a_step_that_does_not_happen_and_a_restored_state_change_nothing() {
    let f = common::f32_fixture("schedule_free.safetensors");
    let case = &cases()[1];
    let (mut pair, mut optim) = start(&f, case);
    let half = STEPS / 2;
    for step in 0..half {
        let grads = optim.gather_grads(&pair, step_grads(&f, case.name, step, &pair));
        pair = optim.step(lr_at(case, step), pair, grads);
    }
    // A guarded step the device refuses (say, non-finite gradients): nothing moves, not
    // even the step count (the next step is the fixture's).
    let before = (values(pair.a.val().inner()), values(optim.to_eval(pair.clone()).a.val().inner()));
    let no = Tensor::<Flex, 1, Bool>::from_bool([false].into(), &Default::default());
    let grads = optim.gather_grads(&pair, step_grads(&f, case.name, half, &pair));
    pair = optim.step_if(1.0, pair, grads, no);
    assert_eq!((values(pair.a.val().inner()), values(optim.to_eval(pair.clone()).a.val().inner())), before);

    // The state carried into a new optimizer (a resumed run, which starts from y) gives
    // the same steps, bit for bit.
    let mut resumed = FlatAdamW::new(case.adam, &pair, &Default::default()).with_schedule_free(case.sf).unwrap();
    for id in [pair.a.id, pair.b.id] {
        let (time, m1, m2) = optim.moments::<2>(id).unwrap();
        resumed.set_moments(id, time, m1, m2).unwrap();
    }
    resumed.set_schedule_free_state(optim.schedule_free_state().unwrap()).unwrap();
    let mut other = pair.clone();
    for step in half..STEPS {
        let grads = optim.gather_grads(&pair, step_grads(&f, case.name, step, &pair));
        pair = optim.step(lr_at(case, step), pair, grads);
        assert_moved_like(&f, case.name, "y", step, &pair);
        let grads = resumed.gather_grads(&other, step_grads(&f, case.name, step, &other));
        other = resumed.step(lr_at(case, step), other, grads);
        assert_eq!(values(pair.a.val().inner()), values(other.a.val().inner()), "step {step}");
        assert_eq!(values(optim.to_eval(pair.clone()).b.val().inner()), values(resumed.to_eval(other.clone()).b.val().inner()), "step {step}");
    }
    // The state must fit: a wrong length is an error naming it; another optimizer has none.
    let mut wrong = optim.schedule_free_state().unwrap();
    wrong.z = wrong.z.slice(0..3);
    let err = resumed.set_schedule_free_state(wrong).unwrap_err().to_string();
    assert!(err.contains("schedule-free state z"), "{err}");
    let mut plain = FlatAdamW::new(case.adam, &pair, &Default::default());
    assert!(!plain.is_schedule_free() && plain.set_schedule_free_state(optim.schedule_free_state().unwrap()).is_err());
    // Other updates evaluate at their own values.
    assert_eq!(values(plain.to_eval(pair.clone()).a.val().inner()), values(pair.a.val().inner()));
    assert!(!plain.with_lion().with_schedule_free(case.sf).unwrap().with_lion().is_schedule_free());
}

/// A guarded step refused during RAdam's silent first steps leaves everything where it
/// was, its step count too: the package's trajectory follows as if it had not been asked.
#[test]
fn a_refused_first_step_does_not_count() {
    let f = common::f32_fixture("schedule_free.safetensors");
    let case = &cases()[2];
    let (mut pair, mut optim) = start(&f, case);
    let no = Tensor::<Flex, 1, Bool>::from_bool([false].into(), &Default::default());
    let grads = optim.gather_grads(&pair, step_grads(&f, case.name, 0, &pair));
    pair = optim.step_if(LR, pair, grads, no);
    for step in 0..STEPS {
        let grads = optim.gather_grads(&pair, step_grads(&f, case.name, step, &pair));
        pair = optim.step(LR, pair, grads);
        assert_moved_like(&f, case.name, "y", step, &pair);
        assert_moved_like(&f, case.name, "x", step, &optim.to_eval(pair.clone()));
    }
}

/// With bf16 working copies the module trains with y and evaluates with x in bf16; the
/// values saved (`to_master_eval`) are the f32 x.
#[test]
fn working_copies_take_y_and_x_in_their_dtype() {
    let f = common::f32_fixture("schedule_free.safetensors");
    let case = &cases()[0];
    let (mut pair, optim) = start(&f, case);
    let mut optim = optim.with_working_dtype(FloatDType::BF16);
    pair = optim.to_working(pair);
    for step in 0..4 {
        let grads = optim.gather_grads(&pair, step_grads(&f, case.name, step, &pair));
        pair = optim.step(LR, pair, grads);
    }
    let (eval, saved) = (optim.to_eval(pair.clone()), optim.to_master_eval(pair.clone()));
    assert_eq!((pair.b.val().dtype(), eval.b.val().dtype(), saved.b.val().dtype()), (DType::BF16, DType::BF16, DType::F32));
    assert_close(&values(eval.b.val().inner()), &values(saved.b.val().inner()), 1e-2, 0.0, "bf16 x");
    assert_close(&values(saved.b.val().inner()), &f[&format!("{}.x.3.b", case.name)].1, 2e-5, 1e-9, "f32 x");
}

#[test]
fn bad_settings_are_errors() {
    let pair = Pair::<AD> {
        a: Param::from_tensor(Tensor::zeros([2, 2], &Default::default()).require_grad()),
        b: Param::from_tensor(Tensor::zeros([2, 2], &Default::default()).require_grad()),
    };
    let bad = [
        (AdamWSettings { beta_1: 0.0, ..Default::default() }, ScheduleFreeSettings::default()),
        (AdamWSettings { beta_2: 1.0, ..Default::default() }, ScheduleFreeSettings::default()),
        (AdamWSettings::default(), ScheduleFreeSettings { r: -1.0, ..Default::default() }),
        (AdamWSettings::default(), ScheduleFreeSettings { weight_lr_power: f32::NAN, ..Default::default() }),
    ];
    for (adam, sf) in bad {
        let err = FlatAdamW::new(adam, &pair, &Default::default()).with_schedule_free(sf).expect_err("an error").to_string();
        assert!(err.contains("schedule-free"), "{err}");
    }
}

/// SGDScheduleFree's checks: its momentum (β₁) in (0, 1), and not RAdam's steps at once.
#[test]
fn sgd_settings_are_checked() {
    let f = common::f32_fixture("schedule_free.safetensors");
    let case = &cases()[6];
    for (beta_1, sf) in [
        (0.0, case.sf),
        (1.0, case.sf),
        (0.9, ScheduleFreeSettings { radam: true, ..case.sf }),
    ] {
        let (_, plain) = {
            let (pair, _) = start(&f, case);
            let optim = FlatAdamW::new(AdamWSettings { beta_1, ..case.adam }, &pair, &Default::default());
            (pair, optim)
        };
        assert!(plain.with_schedule_free(sf).is_err(), "beta_1 {beta_1}, {sf:?}");
    }
}
