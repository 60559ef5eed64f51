//! `FlatAdamW::with_adafactor` against the `transformers` package's `Adafactor`: the
//! trajectories of `xtask/fixtures/lora_core_adafactor.py` replayed with the recorded
//! gradients (factored 2-d and 4-d tensors, unfactored 1-d ones, tensors of one shape
//! of which one lacks a gradient in a step, a learning-rate schedule, the relative step
//! with and without its warmup, a first moment, weight decay and clipping), with
//! per-tensor learning rates, a refused step and a state carried to a new optimizer.

use std::collections::HashMap;

use burn::backend::{Autodiff, Flex};
use burn::module::{Module, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Tensor, TensorData};
use lora_core::optim::{AdafactorSettings, AdamWSettings, FlatAdamW};

use crate::common;

type AD = Autodiff<Flex>;

/// Tensors shaped as a LoRA's (see the fixture script).
#[derive(Module, Debug)]
struct Net<B: burn::tensor::backend::Backend> {
    a: Param<Tensor<B, 2>>,
    b: Param<Tensor<B, 2>>,
    c: Param<Tensor<B, 1>>,
    k: Param<Tensor<B, 4>>,
    a2: Param<Tensor<B, 2>>,
    c2: Param<Tensor<B, 1>>,
}

type Fixture = HashMap<String, (Vec<usize>, Vec<f32>)>;

const NAMES: [&str; 6] = ["a", "b", "c", "k", "a2", "c2"];

fn fixture() -> Fixture {
    common::f32_fixture("adafactor.safetensors")
}

/// The settings of the fixture script's `CASES`.
fn cases() -> [(&'static str, AdafactorSettings); 4] {
    let plain = AdafactorSettings::default();
    [
        ("lora", AdafactorSettings { scale_parameter: false, relative_step: false, ..plain }),
        ("defaults", plain),
        (
            "moment",
            AdafactorSettings { beta_1: Some(0.9), weight_decay: 0.5, clip_threshold: 0.5, decay_rate: -0.5, eps_2: 1e-2, relative_step: false, ..plain },
        ),
        ("warmup", AdafactorSettings { warmup_init: true, beta_1: Some(0.5), ..plain }),
    ]
}

fn tensor<const D: usize>(data: &(Vec<usize>, Vec<f32>)) -> Tensor<Flex, D> {
    Tensor::from_data(TensorData::new(data.1.clone(), data.0.clone()), &Default::default())
}

fn param<const D: usize>(data: &(Vec<usize>, Vec<f32>)) -> Param<Tensor<AD, D>> {
    Param::from_tensor(Tensor::from_inner(tensor(data)).require_grad())
}

fn values(net: &Net<AD>, name: &str) -> Vec<f32> {
    let data = match name {
        "a" => net.a.val().inner().into_data(),
        "b" => net.b.val().inner().into_data(),
        "c" => net.c.val().inner().into_data(),
        "a2" => net.a2.val().inner().into_data(),
        "c2" => net.c2.val().inner().into_data(),
        _ => net.k.val().inner().into_data(),
    };
    data.to_vec().unwrap()
}

fn step_grads(f: &Fixture, case: &str, step: usize, net: &Net<AD>) -> GradientsParams {
    let mut grads = GradientsParams::new();
    let get = |t: &str| f.get(&format!("{case}.grad.{step}.{t}"));
    if let Some(g) = get("a") {
        grads.register(net.a.id, tensor::<2>(g));
    }
    if let Some(g) = get("b") {
        grads.register(net.b.id, tensor::<2>(g));
    }
    if let Some(g) = get("c") {
        grads.register(net.c.id, tensor::<1>(g));
    }
    if let Some(g) = get("k") {
        grads.register(net.k.id, tensor::<4>(g));
    }
    if let Some(g) = get("a2") {
        grads.register(net.a2.id, tensor::<2>(g));
    }
    if let Some(g) = get("c2") {
        grads.register(net.c2.id, tensor::<1>(g));
    }
    grads
}

fn start(f: &Fixture, case: &str, settings: AdafactorSettings) -> (Net<AD>, FlatAdamW<AD>) {
    let init = |t: &str| &f[&format!("{case}.init.{t}")];
    let net = Net::<AD> { a: param(init("a")), b: param(init("b")), c: param(init("c")), k: param(init("k")), a2: param(init("a2")), c2: param(init("c2")) };
    let optim = FlatAdamW::new(AdamWSettings::default(), &net, &Default::default()).with_adafactor(settings).unwrap();
    (net, optim)
}

/// The largest difference from the fixture's values after `step`, relative to the
/// largest of them.
fn worst(f: &Fixture, case: &str, step: usize, net: &Net<AD>) -> f32 {
    NAMES
        .iter()
        .map(|t| {
            let want = &f[&format!("{case}.param.{step}.{t}")].1;
            let got = values(net, t);
            let scale = want.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            got.iter().zip(want).map(|(x, y)| (x - y).abs() / scale).fold(0f32, f32::max)
        })
        .fold(0f32, f32::max)
}

fn lr(f: &Fixture, case: &str, step: usize) -> f64 {
    f64::from(f[&format!("{case}.lr")].1[step])
}

/// Each step's values match transformers' to f32 rounding (the same operations, with the
/// per-tensor means batched per shape group).
#[test]
fn adafactor_follows_transformers() {
    let f = fixture();
    for (case, settings) in cases() {
        let (mut net, mut optim) = start(&f, case, settings);
        assert_eq!(optim.adafactor_settings(), Some(settings));
        for step in 0..f[&format!("{case}.lr")].1.len() {
            let grads = optim.gather_grads(&net, step_grads(&f, case, step, &net));
            net = optim.step(lr(&f, case, step), net, grads);
            let worst = worst(&f, case, step, &net);
            assert!(worst <= 2e-5, "{case} step {step}: max relative |diff| {worst:e}");
        }
        // The test means something: `b` (zero at the start) moved (by about 1e-9 per step
        // in the warmup: 1e-6·t times the values' RMS floor 1e-3).
        let b = values(&net, "b");
        assert!(b.iter().filter(|v| v.abs() > 1e-10).count() > b.len() / 2, "{case}: b barely moved");
    }
}

/// Per-tensor learning rates scale Adafactor's step (and its weight decay) as they
/// scale the learning rate.
#[test]
fn lr_scales_multiply_the_step() {
    let f = fixture();
    let (case, settings) = cases()[2];
    let (net, optim) = start(&f, case, settings);
    let b = net.b.id;
    let mut scaled = optim.with_lr_scales(|id| if id == b { 2.0 } else { 1.0 });
    let (twice, mut plain) = start(&f, case, settings);
    let grads = scaled.gather_grads(&net, step_grads(&f, case, 0, &net));
    let net = scaled.step(lr(&f, case, 0), net, grads);
    let grads = plain.gather_grads(&twice, step_grads(&f, case, 0, &twice));
    let twice = plain.step(2.0 * lr(&f, case, 0), twice, grads);
    assert_eq!(values(&net, "b"), values(&twice, "b"), "b at twice the rate");
    let (a, want) = (values(&net, "a"), &f[&format!("{case}.param.0.a")].1);
    let worst = a.iter().zip(want).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(worst <= 1e-7, "a at the rate: max |diff| {worst:e}");
}

/// A guarded step the device refuses changes nothing: the next step is the fixture's
/// first.
#[test]
fn a_refused_step_changes_nothing() {
    let f = fixture();
    let (case, settings) = cases()[2];
    let (net, mut optim) = start(&f, case, settings);
    let no = Tensor::<Flex, 1, burn::tensor::Bool>::from_bool([false].into(), &Default::default());
    let before = values(&net, "k");
    let grads = optim.gather_grads(&net, step_grads(&f, case, 3, &net));
    let net = optim.step_if(1e-2, net, grads, no);
    assert_eq!(values(&net, "k"), before);
    let grads = optim.gather_grads(&net, step_grads(&f, case, 0, &net));
    let net = optim.step(lr(&f, case, 0), net, grads);
    assert!(worst(&f, case, 0, &net) <= 2e-5);
}

/// The state (step counts, moments, row and column means) carried into a new optimizer
/// continues the trajectory, as a resumed run does.
#[test]
fn state_carries_over() {
    let f = fixture();
    for (case, settings) in cases() {
        let (mut net, mut optim) = start(&f, case, settings);
        for step in 0..4 {
            let grads = optim.gather_grads(&net, step_grads(&f, case, step, &net));
            net = optim.step(lr(&f, case, step), net, grads);
        }
        let mut resumed = FlatAdamW::new(AdamWSettings::default(), &net, &Default::default()).with_adafactor(settings).unwrap();
        let ids = [net.a.id, net.b.id, net.c.id, net.k.id, net.a2.id, net.c2.id];
        for (i, id) in ids.into_iter().enumerate() {
            match i {
                2 | 5 => {
                    let (t, m, v) = optim.moments::<1>(id).unwrap();
                    resumed.set_moments(id, t, m, v).unwrap();
                }
                3 => {
                    let (t, m, v) = optim.moments::<4>(id).unwrap();
                    resumed.set_moments(id, t, m, v).unwrap();
                }
                _ => {
                    let (t, m, v) = optim.moments::<2>(id).unwrap();
                    resumed.set_moments(id, t, m, v).unwrap();
                }
            }
        }
        resumed.set_adafactor_state(optim.adafactor_state().unwrap()).unwrap();
        for step in 4..f[&format!("{case}.lr")].1.len() {
            let grads = resumed.gather_grads(&net, step_grads(&f, case, step, &net));
            net = resumed.step(lr(&f, case, step), net, grads);
            let worst = worst(&f, case, step, &net);
            assert!(worst <= 2e-5, "{case} step {step} after the carry: max relative |diff| {worst:e}");
        }
    }
}

/// Settings transformers refuses are refused, naming the setting.
#[test]
fn bad_settings_are_errors() {
    let net = Net::<AD> {
        a: param(&(vec![2, 2], vec![0.0; 4])),
        b: param(&(vec![2, 2], vec![0.0; 4])),
        c: param(&(vec![2], vec![0.0; 2])),
        k: param(&(vec![1, 1, 2, 2], vec![0.0; 4])),
        a2: param(&(vec![2, 2], vec![0.0; 4])),
        c2: param(&(vec![2], vec![0.0; 2])),
    };
    let plain = AdafactorSettings::default();
    for (settings, word) in [
        (AdafactorSettings { warmup_init: true, relative_step: false, ..plain }, "warmup_init"),
        (AdafactorSettings { decay_rate: 0.5, ..plain }, "decay_rate"),
        (AdafactorSettings { beta_1: Some(1.0), ..plain }, "beta_1"),
        (AdafactorSettings { clip_threshold: 0.0, ..plain }, "clip_threshold"),
    ] {
        let err = FlatAdamW::new(AdamWSettings::default(), &net, &Default::default()).with_adafactor(settings).expect_err("refused");
        assert!(err.to_string().contains(word), "{err}");
    }
}
