//! DoRA (weight-decomposed LoRA): parity with PEFT's DoRA layers (fixtures from
//! `xtask/fixtures/lora_core_dora.py`), the algebra of merging at any strength, the file
//! layouts of both formats, and training through the optimizer with half-precision working
//! copies.

use crate::common;

use std::collections::HashMap;
use std::path::Path;

use burn::backend::{Autodiff, Flex};
use burn::module::Param;
use burn::nn::conv::Conv2dConfig;
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::optim::GradientsParams;
use burn::tensor::{DType, FloatDType, Tensor, TensorData};
use common::Rng;
use lora_core::optim::{AdamWSettings, FlatAdamW};
use lora_core::{AdapterFormat, AdapterKey, AdapterSet, Component, HostTensor, LoraConfig, LoraConv2d, LoraLinear, LoraWeights, ModuleIndex, ReadOptions, SaveDtype};

type A = Autodiff<Flex>;

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

/// The reference tensors, by key.
fn reference() -> HashMap<String, HostTensor> {
    let path = fixture("dora.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let (st, _) = lora_core::tensor_io::parse(&bytes, &path).unwrap();
    st.iter().map(|(k, v)| (k.to_string(), lora_core::tensor_io::decode(&v, k, &path).unwrap())).collect()
}

fn tensor<const D: usize>(t: &HostTensor) -> Tensor<A, D> {
    Tensor::from_data(TensorData::new(t.data.clone(), t.shape.clone()), &Default::default())
}

/// Max |a − b| over max |b|.
fn rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let peak = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / peak
}

fn values<const D: usize>(t: Tensor<Flex, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec().unwrap()
}

/// PEFT's adapters as our reader returns them, with PEFT's `lora_alpha` (kept in
/// `adapter_config.json`, not in the file) restored.
fn peft_adapters() -> AdapterSet {
    let mut index = ModuleIndex::new();
    index.add(Component::Unet, ["lin", "conv"]).unwrap();
    let (set, report) = AdapterSet::load(fixture("dora_adapter.safetensors"), &index, ReadOptions::default()).unwrap();
    assert_eq!(report.format, AdapterFormat::Peft);
    let mut out = AdapterSet::new();
    for (key, w) in set.iter() {
        assert!(w.is_dora(), "{key}: the magnitude was read");
        assert_eq!(w.magnitude.as_ref().unwrap().shape, [w.out_features()], "{key}: magnitudes are [out]");
        out.insert(key.clone(), LoraWeights { alpha: 6.0, ..w.clone() }).unwrap();
    }
    out
}

fn key(path: &str) -> AdapterKey {
    AdapterKey::new(Component::Unet, path)
}

fn base_linear(r: &HashMap<String, HostTensor>) -> LoraLinear<A> {
    let device = Default::default();
    let mut lin = LinearConfig::new(12, 10).init::<A>(&device);
    lin.weight = Param::from_tensor(tensor::<2>(&r["lin.weight"]).transpose());
    lin.bias = Some(Param::from_tensor(tensor::<1>(&r["lin.bias"])));
    LoraLinear::new(lin)
}

fn base_conv(r: &HashMap<String, HostTensor>) -> LoraConv2d<A> {
    let device = Default::default();
    let mut conv = Conv2dConfig::new([4, 6], [3, 3]).with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1)).init::<A>(&device);
    conv.weight = Param::from_tensor(tensor::<4>(&r["conv.weight"]));
    conv.bias = Some(Param::from_tensor(tensor::<1>(&r["conv.bias"])));
    LoraConv2d::new(conv)
}

/// Runs `forward` on the fixture's input `<layer>.x` and checks, against PEFT's, the output,
/// the input gradient and the gradients `adapter_grads` reads (`A`, `B`, the magnitude, in
/// PEFT's layouts) of the loss `sum(y * <layer>.w)`.
fn assert_matches_peft<const D: usize>(
    r: &HashMap<String, HostTensor>,
    layer: &str,
    forward: impl Fn(Tensor<A, D>) -> Tensor<A, D>,
    adapter_grads: impl Fn(&<A as burn::tensor::backend::AutodiffBackend>::Gradients) -> [Vec<f32>; 3],
) {
    let x = tensor::<D>(&r[&format!("{layer}.x")]).require_grad();
    let y = forward(x.clone());
    let grads = (y.clone() * tensor::<D>(&r[&format!("{layer}.w")])).sum().backward();
    let [da, db, dm] = adapter_grads(&grads);
    let checks = [("y", values(y.inner())), ("grad.x", values(x.grad(&grads).unwrap())), ("grad.A", da), ("grad.B", db), ("grad.m", dm)];
    for (what, got) in checks {
        let err = rel(&got, &r[&format!("{layer}.{what}")].data);
        assert!(err < 1e-5, "{layer} {what}: relative error {err}");
    }
}

/// Our DoRA linear layer with PEFT's adapter computes PEFT's output, the input gradient
/// and the gradients of `A`, `B` and the magnitude (the norm detached, as PEFT), and merges
/// to PEFT's merged weight.
#[test]
fn linear_matches_peft() {
    let r = reference();
    let set = peft_adapters();
    let device = Default::default();
    let mut layer = base_linear(&r);
    layer.attach_weights(set.get(&key("lin")).unwrap(), "lin", &device).unwrap();
    let adapter = layer.adapter.clone().unwrap();
    assert_matches_peft::<3>(&r, "lin", |x| layer.forward(x), |grads| {
        // burn's layout is PyTorch's transposed.
        [
            values(adapter.down.weight.grad(grads).unwrap().transpose()),
            values(adapter.up.weight.grad(grads).unwrap().transpose()),
            values(adapter.magnitude.as_ref().unwrap().grad(grads).unwrap()),
        ]
    });
    layer.merge_in_place();
    let err = rel(&values(layer.base.weight.val().inner().transpose()), &r["lin.merged"].data);
    assert!(err < 1e-5, "merged weight: relative error {err}");
}

/// The same for the 3x3 convolution (PEFT's `[1, out, 1, 1]` magnitude read as `[out]`).
#[test]
fn conv_matches_peft() {
    let r = reference();
    let set = peft_adapters();
    let device = Default::default();
    let mut layer = base_conv(&r);
    layer.attach_weights(set.get(&key("conv")).unwrap(), "conv", &device).unwrap();
    let adapter = layer.adapter.clone().unwrap();
    assert_matches_peft::<4>(&r, "conv", |x| layer.forward(x), |grads| {
        [
            values(adapter.down.weight.grad(grads).unwrap()),
            values(adapter.up.weight.grad(grads).unwrap()),
            values(adapter.magnitude.as_ref().unwrap().grad(grads).unwrap()),
        ]
    });
    // The residual and per-channel additions of the UNet's ResNet blocks see the same layer.
    let x = tensor::<4>(&r["conv.x"]);
    let skip = tensor::<4>(&r["conv.w"]);
    let err = rel(&values(layer.forward_add(x.clone(), skip.clone()).inner()), &values((layer.forward(x.clone()) + skip).inner()));
    assert!(err < 1e-6, "forward_add: relative error {err}");
    let temb = Tensor::<A, 2>::from_data(TensorData::new((0..12).map(|i| i as f32 * 0.1).collect::<Vec<_>>(), [2, 6]), &device);
    let want = layer.forward(x.clone()) + temb.clone().reshape([2, 6, 1, 1]);
    let err = rel(&values(layer.forward_add_channels(x, temb).inner()), &values(want.inner()));
    assert!(err < 1e-6, "forward_add_channels: relative error {err}");
    layer.merge_in_place();
    let err = rel(&values(layer.base.weight.val().inner()), &r["conv.merged"].data);
    assert!(err < 1e-5, "merged kernel: relative error {err}");
}

/// A fresh DoRA adapter leaves the layer's output unchanged, and its magnitude is the base
/// weight's norm per output.
#[test]
fn fresh_adapter_is_the_identity() {
    let device = Default::default();
    let mut rng = Rng::new(3);
    let mut lin = LoraLinear::new(LinearConfig::new(9, 7).init::<A>(&device));
    let x = Tensor::<A, 2>::from_data(TensorData::new(rng.vec(4 * 9), [4, 9]), &device);
    let before = values(lin.forward(x.clone()).inner());
    lin.attach_new(&LoraConfig::new(2).with_dora(true), &device).unwrap();
    let err = rel(&values(lin.forward(x).inner()), &before);
    assert!(err < 1e-6, "linear: relative error {err}");
    let w = values(lin.base.weight.val().inner()); // [in, out]
    let norms: Vec<f32> = (0..7).map(|o| (0..9).map(|i| w[i * 7 + o].powi(2)).sum::<f32>().sqrt()).collect();
    let m = values(lin.adapter.as_ref().unwrap().magnitude.as_ref().unwrap().val().inner());
    assert!(rel(&m, &norms) < 1e-6, "m = ‖W‖ per output: {m:?} vs {norms:?}");

    let mut conv = LoraConv2d::new(Conv2dConfig::new([3, 5], [3, 3]).init::<A>(&device));
    let x = Tensor::<A, 4>::from_data(TensorData::new(rng.vec(2 * 3 * 6 * 6), [2, 3, 6, 6]), &device);
    let before = values(conv.forward(x.clone()).inner());
    conv.attach_new(&LoraConfig::new(2).with_dora(true), &device).unwrap();
    let err = rel(&values(conv.forward(x).inner()), &before);
    assert!(err < 1e-6, "conv: relative error {err}");
}

/// A linear layer with PEFT's adapter at strength `k` computes what its merged weight does,
/// `W + k · (g ⊙ (W + ΔW) − W)`; unmerging restores the base weight; strength 0 is the base
/// layer and the layer is linear in `k` (ComfyUI's and Forge's strength).
#[test]
fn strength_interpolates_and_merging_round_trips() {
    let r = reference();
    let set = peft_adapters();
    let device = Default::default();
    let x = tensor::<3>(&r["lin.x"]);
    let mut layer = base_linear(&r);
    let plain = values(layer.forward(x.clone()).inner());
    layer.attach_weights(set.get(&key("lin")).unwrap(), "lin", &device).unwrap();
    let full = values(layer.forward(x.clone()).inner());
    let w0 = values(layer.base.weight.val().inner());
    for k in [0.0f32, 0.4, 1.0, 1.5] {
        layer.set_multiplier(k);
        let y = values(layer.forward(x.clone()).inner());
        let lerp: Vec<f32> = plain.iter().zip(&full).map(|(p, f)| p + k * (f - p)).collect();
        assert!(rel(&y, &lerp) < 1e-5, "k = {k}: not between the base and the full DoRA layer");
        layer.merge_in_place();
        let merged = values(layer.forward(x.clone()).inner());
        assert!(rel(&merged, &y) < 1e-5, "k = {k}: merged output differs");
        layer.set_multiplier(k * 0.5);
        layer.set_multiplier(k);
        assert!(layer.is_merged());
        layer.unmerge_in_place();
        let err = rel(&values(layer.base.weight.val().inner()), &w0);
        assert!(err < 1e-5, "k = {k}: unmerged weight off by {err}");
    }
    // At strength 0.6 the merged weight is the fixture's `W + 0.6 · (W' − W)`.
    layer.set_multiplier(0.6);
    layer.merge_in_place();
    let err = rel(&values(layer.base.weight.val().inner().transpose()), &r["lin.merged_0.6"].data);
    assert!(err < 1e-5, "merged at 0.6: relative error {err}");
    let adapter = layer.detach().unwrap();
    assert!(LoraLinear::unmerge(layer.base.clone(), adapter, 1.0).is_err(), "a plain merged layer cannot be unmerged");
}

/// A conv layer merged at a strength computes what the unmerged one does, and unmerges.
#[test]
fn conv_merges_at_a_strength() {
    let r = reference();
    let set = peft_adapters();
    let device = Default::default();
    let x = tensor::<4>(&r["conv.x"]);
    let mut layer = base_conv(&r);
    layer.attach_weights(set.get(&key("conv")).unwrap(), "conv", &device).unwrap();
    let w0 = values(layer.base.weight.val().inner());
    layer.set_multiplier(0.6);
    let y = values(layer.forward(x.clone()).inner());
    layer.merge_in_place();
    assert!(rel(&values(layer.forward(x).inner()), &y) < 1e-5);
    assert!(rel(&values(layer.base.weight.val().inner()), &r["conv.merged_0.6"].data) < 1e-5);
    layer.unmerge_in_place();
    assert_eq!(values(layer.base.weight.val().inner()), w0, "the kept base kernel, exactly");
}

/// The PEFT layout also reads diffusers' conversions of kohya files
/// (`.lora_magnitude_vector.weight`, `[out, 1]`), and refuses a per-input `[1, in]` magnitude
/// even on a square layer (where its size would fit).
#[test]
fn peft_reader_takes_diffusers_conversions_and_refuses_per_input_magnitudes() {
    let mut rng = Rng::new(4);
    let mut index = ModuleIndex::new();
    index.add(Component::Unet, ["sq"]).unwrap();
    let mut file = |magnitude: HostTensor, suffix: &str| {
        let (down, up) = (rng.host(&[2, 6]), rng.host(&[6, 2]));
        let tensors = [("unet.sq.lora_A.weight".to_string(), down), ("unet.sq.lora_B.weight".to_string(), up), (format!("unet.sq.{suffix}"), magnitude)];
        let refs: Vec<(String, &HostTensor)> = tensors.iter().map(|(k, t)| (k.clone(), t)).collect();
        lora_core::tensor_io::serialize(&refs, SaveDtype::F32, HashMap::new()).unwrap()
    };
    let ones = |shape: Vec<usize>| HostTensor::new(shape, vec![1.5; 6]).unwrap();
    let bytes = file(ones(vec![6, 1]), "lora_magnitude_vector.weight");
    let (set, _) = AdapterSet::from_bytes(&bytes, Path::new("d.safetensors"), &index, ReadOptions::default()).unwrap();
    assert_eq!(set.get(&key("sq")).unwrap().magnitude, Some(HostTensor::new(vec![6], vec![1.5; 6]).unwrap()));
    let bytes = file(ones(vec![1, 6]), "lora_magnitude_vector");
    let err = AdapterSet::from_bytes(&bytes, Path::new("d.safetensors"), &index, ReadOptions::default()).unwrap_err().to_string();
    assert!(err.contains("per input feature"), "{err}");
}

/// Both layouts write the magnitude and read it back: kohya as LyCORIS' `dora_scale`
/// (`[out, 1]`, `[out, 1, 1, 1]`), PEFT as `lora_magnitude_vector` (`[out]`, `[1, out, 1, 1]`).
#[test]
fn files_round_trip_the_magnitude() {
    let set = peft_adapters();
    let mut index = ModuleIndex::new();
    index.add(Component::Unet, ["lin", "conv"]).unwrap();
    for format in [AdapterFormat::Kohya, AdapterFormat::Peft] {
        let bytes = set.to_bytes(format, SaveDtype::F32).unwrap();
        let (st, meta) = lora_core::tensor_io::parse(&bytes, Path::new("x")).unwrap();
        let shapes: HashMap<String, Vec<usize>> = st.iter().map(|(k, v)| (k.to_string(), v.shape().to_vec())).collect();
        let (lin, conv) = match format {
            AdapterFormat::Kohya => ("lora_unet_lin.dora_scale", "lora_unet_conv.dora_scale"),
            AdapterFormat::Peft => ("unet.lin.lora_magnitude_vector", "unet.conv.lora_magnitude_vector"),
        };
        let want = match format {
            AdapterFormat::Kohya => (vec![10, 1], vec![6, 1, 1, 1]),
            AdapterFormat::Peft => (vec![10], vec![1, 6, 1, 1]),
        };
        assert_eq!((shapes[lin].clone(), shapes[conv].clone()), want, "{format:?}: {shapes:?}");
        if format == AdapterFormat::Kohya {
            assert_eq!(meta.get("ss_network_module").map(String::as_str), Some("lycoris.kohya"));
            assert!(meta["ss_network_args"].contains("\"dora_wd\":\"True\""), "{}", meta["ss_network_args"]);
        }
        let (back, _) = AdapterSet::from_bytes(&bytes, Path::new("x"), &index, ReadOptions::default()).unwrap();
        for (k, w) in set.iter() {
            let b = back.get(k).unwrap();
            assert_eq!(b.magnitude, w.magnitude, "{format:?} {k}");
            // PEFT folds the scale into `up`: the update is the same.
            assert!(rel(&b.delta().data, &w.delta().data) < 1e-6, "{format:?} {k}");
        }
    }
}

/// Magnitudes of the wrong size, or per input (LyCORIS' `wd_on_out = False`), are errors
/// naming the adapter; a DoRA adapter does not combine with others.
#[test]
fn bad_magnitudes_are_errors() {
    let set = peft_adapters();
    let lin = set.get(&key("lin")).unwrap().clone();
    let mut index = ModuleIndex::new();
    index.add(Component::Unet, ["lin"]).unwrap();
    let write = |magnitude: HostTensor| {
        let mut w = lin.clone();
        w.magnitude = None;
        let mut one = AdapterSet::new();
        one.insert(key("lin"), w).unwrap();
        let bytes = one.to_bytes(AdapterFormat::Kohya, SaveDtype::F32).unwrap();
        // Add a `dora_scale` tensor by hand.
        let (st, _) = lora_core::tensor_io::parse(&bytes, Path::new("x")).unwrap();
        let mut tensors: Vec<(String, HostTensor)> = st.iter().map(|(k, v)| (k.to_string(), lora_core::tensor_io::decode(&v, k, Path::new("x")).unwrap())).collect();
        tensors.push(("lora_unet_lin.dora_scale".into(), magnitude));
        let refs: Vec<(String, &HostTensor)> = tensors.iter().map(|(k, t)| (k.clone(), t)).collect();
        lora_core::tensor_io::serialize(&refs, SaveDtype::F32, HashMap::new()).unwrap()
    };
    for (shape, expect) in [(vec![1, 12], "per input feature"), (vec![9, 1], "one value per output")] {
        let n = shape.iter().product();
        let bytes = write(HostTensor::new(shape.clone(), vec![1.0; n]).unwrap());
        let err = AdapterSet::from_bytes(&bytes, Path::new("bad.safetensors"), &index, ReadOptions::default()).unwrap_err().to_string();
        assert!(err.contains(expect) && err.contains("bad.safetensors") && err.contains("lora_unet_lin"), "{shape:?}: {err}");
    }
    let ok = write(HostTensor::new(vec![10, 1], vec![1.0; 10]).unwrap());
    assert!(AdapterSet::from_bytes(&ok, Path::new("ok"), &index, ReadOptions::default()).is_ok());

    let plain = LoraWeights { magnitude: None, ..lin.clone() };
    assert_eq!(LoraWeights::combine(&[(&lin, 1.0)], "k").unwrap(), lin, "alone at strength 1: itself");
    for parts in [vec![(&lin, 0.5)], vec![(&lin, 1.0), (&plain, 1.0)]] {
        let err = LoraWeights::combine(&parts, "lin").unwrap_err().to_string();
        assert!(err.contains("DoRA") && err.contains("lin"), "{err}");
    }
}

/// Training a DoRA layer with bf16 working copies: the magnitude stays f32 in the layer
/// ([`FlatAdamW::with_master_copies`]), every part of the adapter moves, and the layer
/// runs in bf16.
#[test]
fn trains_with_bf16_working_copies() {
    let device = Default::default();
    let mut rng = Rng::new(9);
    let base = LinearConfig::new(16, 8).init::<A>(&device);
    let base = Linear { weight: Param::from_tensor(base.weight.val().cast(FloatDType::BF16).detach()), bias: base.bias.map(|b| Param::from_tensor(b.val().cast(FloatDType::BF16).detach())) };
    let mut layer = LoraLinear::new(base);
    layer.attach_new(&LoraConfig::new(4).with_dora(true), &device).unwrap();
    let magnitude = layer.adapter.as_ref().unwrap().magnitude.as_ref().unwrap().id;
    let start = layer.adapter.as_ref().unwrap().to_weights().unwrap();
    let mut optim = FlatAdamW::new(AdamWSettings::default(), &layer, &device).with_working_dtype(FloatDType::BF16).with_master_copies(|id| id == magnitude);
    layer = optim.to_working(layer);
    let x = Tensor::<A, 2>::from_data(TensorData::new(rng.vec(6 * 16), [6, 16]), &device).cast(FloatDType::BF16);
    let target = Tensor::<A, 2>::from_data(TensorData::new(rng.vec(6 * 8), [6, 8]), &device);
    let loss = |layer: &LoraLinear<A>| (layer.forward(x.clone()).cast(FloatDType::F32) - target.clone()).powi_scalar(2).mean();
    let first: f32 = loss(&layer).into_scalar();
    for _ in 0..20 {
        let adapter = layer.adapter.as_ref().unwrap();
        assert_eq!(adapter.magnitude.as_ref().unwrap().val().dtype(), DType::F32);
        assert_eq!(adapter.up.weight.val().dtype(), DType::BF16);
        let grads = GradientsParams::from_grads(loss(&layer).backward(), &layer);
        let grads = optim.gather_grads(&layer, grads);
        layer = optim.step(1e-2, layer, grads);
    }
    let last: f32 = loss(&layer).into_scalar();
    assert!(last < first * 0.9, "loss {first} -> {last}");
    let end = optim.to_master(layer).adapter.unwrap().to_weights().unwrap();
    for (what, a, b) in [("down", &start.down, &end.down), ("up", &start.up, &end.up), ("m", start.magnitude.as_ref().unwrap(), end.magnitude.as_ref().unwrap())] {
        assert!(a.data != b.data, "{what} did not move");
    }
}

/// kohya's module dropout skips a DoRA layer's whole update (the gain on the base output
/// too): each training pass gives the base layer's output or the full DoRA layer's.
#[test]
fn module_dropout_skips_the_whole_update() {
    let r = reference();
    let set = peft_adapters();
    let device = Default::default();
    let x = tensor::<3>(&r["lin.x"]);
    let mut layer = base_linear(&r);
    let plain = values(layer.forward(x.clone()).inner());
    layer.attach_weights(set.get(&key("lin")).unwrap(), "lin", &device).unwrap();
    let full = values(layer.forward(x.clone()).inner());
    layer.adapter.as_mut().unwrap().module_dropout = 0.5;
    let (mut skipped, mut kept) = (0, 0);
    for _ in 0..40 {
        let y = values(layer.forward(x.clone()).inner());
        if rel(&y, &plain) < 1e-6 {
            skipped += 1;
        } else {
            assert!(rel(&y, &full) < 1e-6, "neither the base nor the DoRA output");
            kept += 1;
        }
    }
    assert!(skipped > 5 && kept > 5, "skipped {skipped}, kept {kept} of 40");
}

/// Resizing a DoRA adapter keeps its magnitude and lowers the rank of its update.
#[test]
fn resize_keeps_the_magnitude() {
    let set = peft_adapters();
    let lin = set.get(&key("lin")).unwrap();
    let (small, _) = lora_core::resize::resize_adapter(lin, 2, lora_core::resize::RankRule::Fixed, "lin").unwrap();
    assert_eq!(small.rank(), 2);
    assert_eq!(small.magnitude, lin.magnitude);
}
