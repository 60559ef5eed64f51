//! `FlatAdamW::with_lion` against the `lion-pytorch` package: the trajectories of
//! `xtask/fixtures/lora_core_lion.py` replayed with the recorded gradients (a tensor
//! without a gradient in a step, zero gradients, weight decay, a learning-rate schedule),
//! and with per-tensor learning rates.

use std::collections::HashMap;

use burn::backend::{Autodiff, Flex};
use burn::module::{Module, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Tensor, TensorData};
use lora_core::optim::{AdamWSettings, FlatAdamW};

use crate::common;

type AD = Autodiff<Flex>;

#[derive(Module, Debug)]
struct Pair<B: burn::tensor::backend::Backend> {
    a: Param<Tensor<B, 2>>,
    b: Param<Tensor<B, 2>>,
}

type Fixture = HashMap<String, (Vec<usize>, Vec<f32>)>;

fn fixture() -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    common::f32_fixture("lion.safetensors")
}

/// The settings of the fixture script's `CASES` (ε is unused by Lion).
fn cases() -> [(&'static str, AdamWSettings); 2] {
    let settings = |beta_1, beta_2, weight_decay| AdamWSettings { beta_1, beta_2, epsilon: 1e-8, weight_decay };
    [("defaults", settings(0.9, 0.99, 0.0)), ("decay", settings(0.95, 0.98, 2.0))]
}

fn tensor(data: &(Vec<usize>, Vec<f32>)) -> Tensor<Flex, 2> {
    Tensor::from_data(TensorData::new(data.1.clone(), [data.0[0], data.0[1]]), &Default::default())
}

fn values(t: Tensor<Flex, 2>) -> Vec<f32> {
    t.into_data().to_vec().unwrap()
}

fn step_grads(f: &Fixture, case: &str, step: usize, pair: &Pair<AD>) -> GradientsParams {
    let mut grads = GradientsParams::new();
    for (name, id) in [("a", pair.a.id), ("b", pair.b.id)] {
        if let Some(g) = f.get(&format!("{case}.grad.{step}.{name}")) {
            grads.register(id, tensor(g));
        }
    }
    grads
}

fn start(f: &Fixture, case: &str, settings: AdamWSettings) -> (Pair<AD>, FlatAdamW<AD>) {
    let pair = Pair::<AD> {
        a: Param::from_tensor(Tensor::from_inner(tensor(&f[&format!("{case}.init.a")])).require_grad()),
        b: Param::from_tensor(Tensor::from_inner(tensor(&f[&format!("{case}.init.b")])).require_grad()),
    };
    let optim = FlatAdamW::new(settings, &pair, &Default::default()).with_lion();
    (pair, optim)
}

/// Each step's values match lion-pytorch's to a few ulps (the same f32 operations; the
/// decay factor `1 − lr·wd` is a host scalar in both).
#[test]
fn lion_follows_lion_pytorch() {
    let f = fixture();
    for (case, settings) in cases() {
        let (mut pair, mut optim) = start(&f, case, settings);
        assert!(optim.is_lion());
        let lrs = f[&format!("{case}.lr")].1.clone();
        for (step, &lr) in lrs.iter().enumerate() {
            let grads = optim.gather_grads(&pair, step_grads(&f, case, step, &pair));
            pair = optim.step(f64::from(lr), pair, grads);
            for (t, now) in [("a", pair.a.val().inner()), ("b", pair.b.val().inner())] {
                let want = &f[&format!("{case}.param.{step}.{t}")].1;
                let got = values(now);
                let worst = got.iter().zip(want).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
                assert!(worst <= 1e-7, "{case} step {step} {t}: max |diff| {worst:e}");
            }
        }
        // The test means something: `b` (zero at the start) moved by about lr per step.
        let b = values(pair.b.val().inner());
        assert!(b.iter().filter(|v| v.abs() > 1e-4).count() > b.len() / 2, "{case}: b barely moved");
    }
}

/// Per-tensor learning rates scale Lion's steps (and its weight decay) as they scale the
/// learning rate.
#[test]
fn lr_scales_multiply_lions_step() {
    let f = fixture();
    let (case, settings) = cases()[1];
    let (pair, optim) = start(&f, case, settings);
    let b = pair.b.id;
    let mut scaled = optim.with_lr_scales(|id| if id == b { 2.0 } else { 1.0 });
    let (twice, mut plain) = start(&f, case, settings);
    let lr = f64::from(f[&format!("{case}.lr")].1[0]);
    let grads = scaled.gather_grads(&pair, step_grads(&f, case, 0, &pair));
    let pair = scaled.step(lr, pair, grads);
    let grads = plain.gather_grads(&twice, step_grads(&f, case, 0, &twice));
    let twice = plain.step(2.0 * lr, twice, grads);
    assert_eq!(values(pair.b.val().inner()), values(twice.b.val().inner()), "b at twice the rate");
    let (a, want) = (values(pair.a.val().inner()), &f[&format!("{case}.param.0.a")].1);
    let worst = a.iter().zip(want).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(worst <= 1e-7, "a at the rate: max |diff| {worst:e}");
}

/// A guarded step the device refuses moves nothing, decays nothing and leaves the
/// moment; the next step is the fixture's first.
#[test]
fn a_refused_step_changes_nothing() {
    let f = fixture();
    let (case, settings) = cases()[1];
    let (pair, mut optim) = start(&f, case, settings);
    let no = Tensor::<Flex, 1, burn::tensor::Bool>::from_bool([false].into(), &Default::default());
    let before = values(pair.a.val().inner());
    let grads = optim.gather_grads(&pair, step_grads(&f, case, 3, &pair));
    let pair = optim.step_if(1e-2, pair, grads, no);
    assert_eq!(values(pair.a.val().inner()), before);
    let grads = optim.gather_grads(&pair, step_grads(&f, case, 0, &pair));
    let pair = optim.step(f64::from(f[&format!("{case}.lr")].1[0]), pair, grads);
    let (a, want) = (values(pair.a.val().inner()), &f[&format!("{case}.param.0.a")].1);
    let worst = a.iter().zip(want).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(worst <= 1e-7, "max |diff| {worst:e}");
}
