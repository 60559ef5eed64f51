//! `FlatAdamW::with_dadapt_adam` against the `dadaptation` package's `DAdaptAdam`: the
//! trajectories of `xtask/fixtures/lora_core_dadapt.py` (values and the estimate `d` after
//! every step; coupled and decoupled weight decay, bias correction, a tensor without a
//! gradient), replayed with the recorded gradients, a guarded step that does not happen,
//! and a save / restore of the state in the middle of a run.

use std::collections::HashMap;

use burn::backend::{Autodiff, Flex};
use burn::module::{Module, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Bool, Tensor, TensorData};
use lora_core::optim::{AdamWSettings, DAdaptSettings, FlatAdamW};

use crate::common;

type AD = Autodiff<Flex>;

#[derive(Module, Debug)]
struct Pair<B: burn::tensor::backend::Backend> {
    a: Param<Tensor<B, 2>>,
    b: Param<Tensor<B, 2>>,
}

/// The fixture's tensors by name.
fn fixture() -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    common::f32_fixture("dadapt.safetensors")
}

struct Case {
    name: &'static str,
    adam: AdamWSettings,
    dadapt: DAdaptSettings,
}

/// The settings of the fixture script's `CASES`.
fn cases() -> Vec<Case> {
    let adam = |beta_1, beta_2, epsilon, weight_decay| AdamWSettings { beta_1, beta_2, epsilon, weight_decay };
    vec![
        Case { name: "defaults", adam: adam(0.9, 0.999, 1e-8, 0.0), dadapt: DAdaptSettings::default() },
        Case { name: "kohya", adam: adam(0.9, 0.99, 1e-8, 0.2), dadapt: DAdaptSettings { decouple: true, growth_rate: 1.02, ..Default::default() } },
        Case { name: "coupled", adam: adam(0.8, 0.95, 1e-6, 0.1), dadapt: DAdaptSettings { use_bias_correction: true, d0: 1e-5, ..Default::default() } },
        Case { name: "scaled", adam: adam(0.9, 0.999, 1e-8, 0.0), dadapt: DAdaptSettings::default() },
    ]
}

fn tensor(data: &(Vec<usize>, Vec<f32>)) -> Tensor<Flex, 2> {
    Tensor::from_data(TensorData::new(data.1.clone(), [data.0[0], data.0[1]]), &Default::default())
}

fn values(t: Tensor<Flex, 2>) -> Vec<f32> {
    t.into_data().to_vec().unwrap()
}

/// `|x − y| ≤ tol · max(|y|) + floor` over a tensor, with the worst offender in the message.
fn assert_close(x: &[f32], y: &[f32], tol: f32, floor: f32, what: &str) {
    let scale = y.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    let worst = x.iter().zip(y).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst <= tol * scale + floor, "{what}: max |diff| {worst:e} against max |ref| {scale:e}");
}

/// One step of `case` at `step`: the recorded gradients (missing ones left out).
fn step_grads(f: &HashMap<String, (Vec<usize>, Vec<f32>)>, case: &str, step: usize, pair: &Pair<AD>) -> GradientsParams {
    let mut grads = GradientsParams::new();
    for (name, id) in [("a", pair.a.id), ("b", pair.b.id)] {
        if let Some(g) = f.get(&format!("{case}.grad.{step}.{name}")) {
            grads.register(id, tensor(g));
        }
    }
    grads
}

fn start(f: &HashMap<String, (Vec<usize>, Vec<f32>)>, case: &Case) -> (Pair<AD>, FlatAdamW<AD>) {
    let pair = Pair::<AD> {
        a: Param::from_tensor(Tensor::from_inner(tensor(&f[&format!("{}.init.a", case.name)])).require_grad()),
        b: Param::from_tensor(Tensor::from_inner(tensor(&f[&format!("{}.init.b", case.name)])).require_grad()),
    };
    let mut optim = FlatAdamW::new(case.adam, &pair, &Default::default()).with_dadapt_adam(case.dadapt).unwrap();
    if case.name == "scaled" {
        // The fixture's `layer_scale` of 4 on `b`.
        let b = pair.b.id;
        optim = optim.with_lr_scales(|id| if id == b { 4.0 } else { 1.0 });
    }
    (pair, optim)
}

#[test]
fn dadapt_adam_follows_dadaptation() {
    let f = fixture();
    for case in cases() {
        let (mut pair, mut optim) = start(&f, &case);
        let lrs = &f[&format!("{}.lr", case.name)].1;
        let ds = &f[&format!("{}.d", case.name)].1;
        for (step, &lr) in lrs.iter().enumerate() {
            let grads = optim.gather_grads(&pair, step_grads(&f, case.name, step, &pair));
            pair = optim.step(f64::from(lr), pair, grads);
            let what = |t: &str| format!("{} step {step} {t}", case.name);
            // The distance travelled from the start, against dadaptation's: f32 scalars here,
            // f64 ones there, so a few ulps per step, plus the values' own ulps (the distance is a difference of two of them).
            for (t, now) in [("a", pair.a.val().inner()), ("b", pair.b.val().inner())] {
                let init = &f[&format!("{}.init.{t}", case.name)].1;
                let moved = |v: &[f32]| v.iter().zip(init).map(|(x, i)| x - i).collect::<Vec<_>>();
                let ulps = 4.0 * f32::EPSILON * init.iter().fold(0f32, |m, v| m.max(v.abs()));
                assert_close(&moved(&values(now)), &moved(&f[&format!("{}.param.{step}.{t}", case.name)].1), 5e-6, ulps, &what(t));
            }
            let d: f32 = optim.dadapt_d().unwrap().into_scalar();
            assert!((d - ds[step]).abs() <= 5e-6 * ds[step], "{}: d {d:e}, dadaptation {:e}", what("d"), ds[step]);
        }
        assert!(ds.last().unwrap() > &(1.2 * ds[0]), "{}: the estimate must move for the test to mean anything", case.name);
    }
}

#[test]
fn a_step_that_does_not_happen_and_a_restored_state_change_nothing() {
    let f = fixture();
    // Coupled weight decay and bias correction.
    let case = &cases()[2];
    let lrs = &f[&format!("{}.lr", case.name)].1;
    let (mut pair, mut optim) = start(&f, case);
    let half = lrs.len() / 2;
    for (step, &lr) in lrs.iter().enumerate().take(half) {
        let grads = optim.gather_grads(&pair, step_grads(&f, case.name, step, &pair));
        pair = optim.step(f64::from(lr), pair, grads);
    }
    // A guarded step the device refuses (say, non-finite gradients): nothing moves.
    let before = (values(pair.a.val().inner()), optim.dadapt_d().unwrap().into_scalar());
    let no = Tensor::<Flex, 1, Bool>::from_bool([false].into(), &Default::default());
    let grads = optim.gather_grads(&pair, step_grads(&f, case.name, half, &pair));
    pair = optim.step_if(1.0, pair, grads, no);
    assert_eq!((values(pair.a.val().inner()), optim.dadapt_d().unwrap().into_scalar()), before);

    // The state carried into a new optimizer (a resumed run) gives the same steps.
    let state = optim.dadapt_state().unwrap();
    let mut resumed = FlatAdamW::new(case.adam, &pair, &Default::default()).with_dadapt_adam(case.dadapt).unwrap();
    for id in [pair.a.id, pair.b.id] {
        let (time, m1, m2) = optim.moments::<2>(id).unwrap();
        resumed.set_moments(id, time, m1, m2).unwrap();
    }
    resumed.set_dadapt_state(state).unwrap();
    let mut other = pair.clone();
    for (step, &lr) in lrs.iter().enumerate().skip(half) {
        let grads = optim.gather_grads(&pair, step_grads(&f, case.name, step, &pair));
        pair = optim.step(f64::from(lr), pair, grads);
        let grads = resumed.gather_grads(&other, step_grads(&f, case.name, step, &other));
        other = resumed.step(f64::from(lr), other, grads);
        assert_eq!(values(pair.a.val().inner()), values(other.a.val().inner()), "step {step}");
        assert_eq!(values(pair.b.val().inner()), values(other.b.val().inner()), "step {step}");
    }
    // The state must fit: a wrong length is an error naming it.
    let mut wrong = optim.dadapt_state().unwrap();
    wrong.s = wrong.s.slice(0..3);
    let err = resumed.set_dadapt_state(wrong).unwrap_err().to_string();
    assert!(err.contains("DAdaptAdam state s"), "{err}");
    let mut plain = FlatAdamW::new(case.adam, &pair, &Default::default());
    assert!(plain.dadapt_d().is_none() && plain.set_dadapt_state(optim.dadapt_state().unwrap()).is_err());
}
