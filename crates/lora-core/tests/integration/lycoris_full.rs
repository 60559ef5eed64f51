//! LyCORIS' full fine-tuning against its own module (`xtask/fixtures/lora_core_lycoris_full.py`
//! runs `lycoris.modules.full.FullModule`): the layer's output and the gradients of the
//! weight's and the bias's differences, on linear layers with and without a bias, a 3x3
//! and a 1x1 convolution, at strengths 1 and 0.7; merging, bias included; the file LyCORIS
//! writes (`diff`, `diff_b`, no `alpha`), read back; rank dropout dropping a bias's value
//! with its output's row; and damaged files.

use crate::common;

use std::path::Path;

use burn::module::Param;
use burn::tensor::Tensor;
use lora_core::inspect::ModuleKind;
use lora_core::sites::attach_adapters;
use lora_core::{Algo, AdapterFormat, AdapterSet, Component, HostTensor, LoraConfig, ModuleIndex, ReadOptions, SaveDtype};
use proptest::prelude::*;

use common::layer::{flat, rel, Layer, One, AB};
use common::Fixture;

const FILE: &str = "full.safetensors";
const CASES: [&str; 5] = ["lin", "lin_nobias", "lin_strength", "conv", "conv1x1"];

#[derive(serde::Deserialize)]
struct Case {
    layer: Vec<serde_json::Value>,
    multiplier: f32,
}

impl Case {
    fn is_conv(&self) -> bool {
        self.layer[0] == "conv"
    }

    /// `[in, out]`, or `[in, out, k]` for a convolution (the layer's numbers before its
    /// padding and bias flag).
    fn dims(&self) -> Vec<usize> {
        let n = if self.is_conv() { 3 } else { 2 };
        self.layer[1..=n].iter().map(|v| v.as_u64().unwrap() as usize).collect()
    }
}

fn config() -> LoraConfig {
    LoraConfig::new(4).with_algo(Algo::Full)
}

fn base_layer(f: &Fixture, name: &str) -> Layer {
    let case: Case = f.case(name);
    Layer::from_fixture(f, name, &case.dims(), case.is_conv())
}

fn has_bias(f: &Fixture, name: &str) -> bool {
    f.tensors.contains_key(&format!("{name}.bias"))
}

/// The case's layer with a fresh full adapter from `config`, its differences set to the
/// fixture's, at the case's strength.
fn trained_with(f: &Fixture, name: &str, config: &LoraConfig) -> Layer {
    let case: Case = f.case(name);
    let mut layer = base_layer(f, name);
    layer.site().attach_new(config, &Default::default()).unwrap();
    layer.site().set_multiplier(case.multiplier);
    let bias = has_bias(f, name);
    let full = layer.lycoris();
    let want: &[&str] = if bias { &["diff", "diff_b"] } else { &["diff"] };
    assert_eq!(full.names(), want, "{name}: a bias's difference where the layer has a bias");
    assert_eq!(full.torch_shapes()[0], f.host(&format!("{name}.diff")).shape, "{name}: diff's shape");
    for (i, key) in want.iter().enumerate() {
        let dims = full.factors[i].dims();
        full.factors[i] = Param::from_tensor(flat(f, &format!("{name}.{key}"), dims));
    }
    layer
}

fn trained_layer(f: &Fixture, name: &str) -> Layer {
    trained_with(f, name, &config())
}

/// The base layer's bias (or none).
fn bias_of(layer: &Layer) -> Option<Tensor<burn::backend::Flex, 1>> {
    match layer {
        Layer::Linear(l) => l.base.bias.as_ref().map(|b| b.val().inner()),
        Layer::Conv(c) => c.base.bias.as_ref().map(|b| b.val().inner()),
    }
}

/// The layer computes LyCORIS' output (`W + m·diff`, `b + m·diff_b`) and the gradients of
/// both differences; the frozen weight and bias take none; a fresh adapter changes nothing.
#[test]
fn output_and_gradients_match_lycoris() {
    let f = Fixture::open(FILE);
    for name in CASES {
        let layer = trained_layer(&f, name);
        let y = layer.forward(&f, name);
        let err = rel(y.clone().inner(), flat(&f, &format!("{name}.y"), y.dims()));
        assert!(err < 2e-5, "{name}: output, relative error {err}");
        let g: Tensor<AB, 2> = flat(&f, &format!("{name}.g"), y.dims());
        let grads = (y * g).sum().backward();
        let full = layer.lycoris_ref();
        for (i, key) in full.names().iter().enumerate() {
            let grad = full.factors[i].grad(&grads).unwrap_or_else(|| panic!("{name}: {key} takes a gradient"));
            let err = rel(grad, flat(&f, &format!("{name}.{key}_grad"), full.factors[i].dims()));
            assert!(err < 1e-4, "{name}: gradient of {key}, relative error {err}");
        }
        assert!(layer.base_is_frozen(&grads), "{name}: the base weight is frozen");
        let bias_grad = match &layer {
            Layer::Linear(l) => l.base.bias.as_ref().and_then(|b| b.grad(&grads)),
            Layer::Conv(c) => c.base.bias.as_ref().and_then(|b| b.grad(&grads)),
        };
        assert!(bias_grad.is_none(), "{name}: the base bias is frozen");

        let mut fresh = base_layer(&f, name);
        let before = fresh.forward(&f, name).inner();
        fresh.site().attach_new(&config(), &Default::default()).unwrap();
        let err = rel(fresh.forward(&f, name).inner(), before);
        assert!(err < 1e-6, "{name}: a fresh full adapter moved the output by {err}");
    }
}

/// Merging writes LyCORIS' merged weight and bias into the layer (at the strength), the
/// output stays, and unmerging restores both (up to the rounding of `W + d − d`).
#[test]
fn merge_writes_lycoris_weight_and_bias() {
    let f = Fixture::open(FILE);
    for name in CASES {
        let mut layer = trained_layer(&f, name);
        let before = layer.forward(&f, name).inner();
        let (weight, bias) = (layer.base_weight(), bias_of(&layer));
        layer.site().merge_in_place();
        let err = rel(layer.base_weight(), flat(&f, &format!("{name}.merged"), weight.dims()));
        assert!(err < 2e-6, "{name}: merged weight, relative error {err}");
        if let Some(b) = bias_of(&layer) {
            let err = rel(b, f.tensor(&format!("{name}.merged_b")));
            assert!(err < 2e-6, "{name}: merged bias, relative error {err}");
        }
        let err = rel(layer.forward(&f, name).inner(), before.clone());
        assert!(err < 2e-5, "{name}: merged output, relative error {err}");
        match &mut layer {
            Layer::Linear(l) => l.unmerge_in_place(),
            Layer::Conv(c) => c.unmerge_in_place(),
        }
        assert!(rel(layer.base_weight(), weight) < 1e-6, "{name}: weight unmerged");
        if let (Some(b), Some(want)) = (bias_of(&layer), bias) {
            assert!(rel(b, want) < 1e-6, "{name}: bias unmerged");
        }
        // Baked: a plain layer with the merged weight and bias, no adapter.
        layer.site().bake();
        assert!(!layer.site().has_adapter(), "{name}");
        let err = rel(layer.forward(&f, name).inner(), before);
        assert!(err < 2e-5, "{name}: baked output, relative error {err}");
    }
}

/// Written as LyCORIS writes it: `lora_unet_<module>.diff` (the weight's shape) and, for a
/// layer with a bias, `.diff_b`, no `alpha`, what the fixture's module saved; `lycoris.kohya`
/// with `algo=full`; `info` says full; read back, the same layer output.
#[test]
fn written_as_lycoris_and_read_back() {
    let f = Fixture::open(FILE);
    for name in CASES {
        let mut trained = One(trained_layer(&f, name));
        trained.0.site().set_multiplier(1.0);
        let state: &[&str] = if has_bias(&f, name) { &["diff", "diff_b"] } else { &["diff"] };
        // LyCORIS saves `(W + d) − W`: `d` up to the rounding of the sum.
        let (bytes, _) = common::layer::written_as_lycoris(&mut trained, name, state, |k| f.host(&format!("{name}.state.{k}")).clone(), "full", 1e-6);

        let info = lora_core::inspect::inspect(&bytes, Path::new("x")).unwrap();
        let m = &info.modules[0];
        let kernel = f.host(&format!("{name}.diff")).shape.get(2..4).map(|k| [k[0], k[1]]);
        assert_eq!((m.kind, m.rank, m.alpha, m.kernel), (ModuleKind::Full, None, None, kernel), "{name}");
        assert_eq!(info.summary(Component::Unet).len(), 1, "{name}");

        let read = common::layer::read_back(&f, name, &mut trained, &bytes, base_layer(&f, name), 1e-6);
        let (_, w) = read.iter().next().unwrap();
        assert!(w.stands_alone() && !w.depends_on_base() && w.lycoris.as_ref().unwrap().algo == Algo::Full, "{name}");
    }
}

/// A file whose module leaves out `diff_b` (LyCORIS reads it so: the bias's difference at
/// zero) on a layer with a bias: attached with a zero `diff_b` that trains, the output
/// `W + diff` with the bias as it was; it continues training into an attached adapter too.
#[test]
fn a_file_without_diff_b_reads_with_a_zero_bias_difference() {
    let f = Fixture::open(FILE);
    let name = "lin";
    let mut index = ModuleIndex::new();
    index.add(Component::Unet, ["layer"]).unwrap();
    let diff = f.host(&format!("{name}.diff")).clone();
    let bytes = lora_core::tensor_io::serialize(&[("lora_unet_layer.diff".to_string(), &diff)], SaveDtype::F32, Default::default()).unwrap();
    let (read, _) = AdapterSet::from_bytes(&bytes, Path::new("f.safetensors"), &index, ReadOptions::default()).unwrap();
    let mut want = trained_layer(&f, name);
    want.site().set_multiplier(1.0);
    let dims = want.lycoris().factors[1].dims();
    want.lycoris().factors[1] = Param::from_tensor(Tensor::zeros(dims, &Default::default()));
    let mut layer = One(base_layer(&f, name));
    attach_adapters(&mut layer, &read, 1.0, &Default::default()).unwrap();
    assert_eq!(layer.0.lycoris_ref().names(), ["diff", "diff_b"]);
    let err = rel(layer.0.forward(&f, name).inner(), want.forward(&f, name).inner());
    assert!(err < 1e-6, "relative error {err}");

    let (key, w) = read.iter().next().unwrap();
    let mut attached = base_layer(&f, name);
    attached.site().attach_new(&config(), &Default::default()).unwrap();
    attached.site().load_weights(w, &key.to_string(), &Default::default()).unwrap();
    let y = attached.forward(&f, name);
    let grads = y.sum().backward();
    let full = attached.lycoris_ref();
    assert!(full.factors[1].grad(&grads).is_some(), "the bias's difference trains");
}

/// With LyCORIS' rank dropout, an output whose row is dropped loses its bias's difference
/// too: each output is either the trained layer's or the base layer's, and over a few
/// passes both occur.
#[test]
fn rank_dropout_drops_the_bias_with_its_row() {
    let f = Fixture::open(FILE);
    let name = "lin";
    let layer = trained_with(&f, name, &config().with_rank_dropout(0.5));
    let trained = flat::<burn::backend::Flex>(&f, &format!("{name}.y"), [3, 8]);
    let base = base_layer(&f, name).forward(&f, name).inner();
    let column = |t: &Tensor<burn::backend::Flex, 2>, j: usize| t.clone().slice([0..3, j..j + 1]);
    let (mut kept, mut dropped) = (0, 0);
    for _ in 0..6 {
        let y = layer.forward(&f, name).inner();
        for j in 0..8 {
            if rel(column(&y, j), column(&trained, j)) < 1e-5 {
                kept += 1;
            } else {
                assert!(rel(column(&y, j), column(&base, j)) < 1e-5, "output {j} is neither the trained one nor the base one");
                dropped += 1;
            }
        }
    }
    assert!(kept > 0 && dropped > 0, "kept {kept}, dropped {dropped}");
}

/// A difference that fits neither the layer nor LyCORIS' shapes, `diff_b` without `diff`,
/// mixed with another algorithm's tensors, a bias's difference for a layer without a bias:
/// errors naming the module. Nor is a full adapter combined or written as PEFT (resizing
/// makes a LoRA of it, below); the options it does not take are refused.
#[test]
fn bad_tensors_and_options() {
    let f = Fixture::open(FILE);
    let read = common::read_module;
    let (diff, diff_b) = (f.host("lin.state.diff").clone(), f.host("lin.state.diff_b").clone());
    let flat_diff = HostTensor::new(vec![48], diff.data.clone()).unwrap();
    let short_b = HostTensor::new(vec![6], vec![0.1; 6]).unwrap();
    let hada = HostTensor::new(vec![8, 2], vec![0.1; 16]).unwrap();
    for (tensors, says) in [
        (vec![("diff_b", &diff_b)], "without its `diff`"),
        (vec![("diff", &flat_diff)], "weight shape"),
        (vec![("diff", &diff), ("diff_b", &short_b)], "one value per output"),
        (vec![("diff", &diff), ("hada_w1_a", &hada)], "mixes"),
    ] {
        let e = read(&tensors).unwrap_err().to_string();
        assert!(e.contains("layer") && e.contains(says), "{says}: {e}");
    }
    // A 6→8 difference on the 5→4 layer, and a bias's difference on a layer without one.
    let set = read(&[("diff", &diff), ("diff_b", &diff_b)]).unwrap();
    let mut layer = One(base_layer(&f, "lin_nobias"));
    let e = attach_adapters(&mut layer, &set, 1.0, &Default::default()).unwrap_err().to_string();
    assert!(e.contains("6→8") && e.contains("5→4"), "{e}");
    let nobias_diff = f.host("lin_nobias.state.diff").clone();
    let b4 = HostTensor::new(vec![4], vec![0.1; 4]).unwrap();
    let with_bias = read(&[("diff", &nobias_diff), ("diff_b", &b4)]).unwrap();
    let e = attach_adapters(&mut layer, &with_bias, 1.0, &Default::default()).unwrap_err().to_string();
    assert!(e.contains("diff_b") && e.contains("has none"), "{e}");
    let (key, w) = set.iter().next().unwrap();
    assert!(set.to_bytes(AdapterFormat::Peft, SaveDtype::F32).unwrap_err().to_string().contains("full"));
    assert!(lora_core::LoraWeights::combine(&[(w, 0.5)], &key.to_string()).unwrap_err().to_string().contains("full"));

    let config = config();
    for good in [config.clone().with_module_dropout(0.1), config.clone().with_rank_dropout(0.1)] {
        assert!(good.validate().is_ok(), "{good:?}");
    }
    for bad in [config.clone().with_dora(true), config.clone().with_use_tucker(true), config.clone().with_use_scalar(true), config.clone().with_rslora(true), config.clone().with_dropout(0.1)] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
}

/// `resize` turns a full difference into a LoRA: at a rank that holds the whole
/// difference, the LoRA's update is `diff`; at lower ranks the leading part, with what it
/// keeps reported (the share of the singular values' sum unknown: NaN); the bias's
/// difference is left out and reported; `sv_cumulative` is refused; written, the file is a
/// plain LoRA (`networks.lora`, none of LyCORIS' arguments).
#[test]
fn resized_into_a_lora() {
    use lora_core::resize::{resize_set, RankRule, ResizeSettings};
    let f = Fixture::open(FILE);
    let mut index = ModuleIndex::new();
    index.add(Component::Unet, ["layer"]).unwrap();
    let from_bytes = |bytes: &[u8]| AdapterSet::from_bytes(bytes, Path::new("f.safetensors"), &index, ReadOptions::default()).unwrap().0;
    for name in CASES {
        let diff = f.host(&format!("{name}.state.diff")).clone();
        let diff_b = f.tensors.get(&format!("{name}.state.diff_b")).map(|_| f.host(&format!("{name}.state.diff_b")).clone());
        let mut tensors = vec![("diff", &diff)];
        tensors.extend(diff_b.iter().map(|b| ("diff_b", b)));
        let refs: Vec<(String, &HostTensor)> = tensors.iter().map(|(k, t)| (format!("lora_unet_layer.{k}"), *t)).collect();
        let mut set = from_bytes(&lora_core::tensor_io::serialize(&refs, SaveDtype::F32, Default::default()).unwrap());
        set.metadata.insert("ss_network_module".into(), "lycoris.kohya".into());
        set.metadata.insert("ss_network_args".into(), r#"{"algo": "full", "preset": "full"}"#.into());
        let (out, cols) = (diff.shape[0], diff.data.len() / diff.shape[0]);
        let whole = out.min(cols);
        let settings = |rank, rule| ResizeSettings { rank, conv_rank: rank, rule };

        let exact = resize_set(&set, &settings(whole, RankRule::Fixed)).unwrap();
        let (key, lora) = exact.set.iter().next().unwrap();
        assert!(!lora.stands_alone() && lora.rank() == whole, "{name}: a LoRA of rank {}", lora.rank());
        let delta = lora.delta();
        assert_eq!(delta.shape, diff.shape, "{name}");
        let peak = diff.data.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = delta.data.iter().zip(&diff.data).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / peak;
        assert!(err < 1e-5, "{name}: the LoRA's update against diff, relative error {err}");
        let kept = exact.modules[key];
        assert_eq!((kept.old_rank, kept.new_rank), (whole, whole), "{name}");
        assert!(kept.fro_retained > 1.0 - 1e-9 && kept.sum_retained.is_nan(), "{name}: {kept:?}");
        let bias = diff_b.as_ref().map(|b| b.data.iter().fold(0f32, |m, v| m.max(v.abs()))).filter(|m| *m != 0.0);
        assert_eq!(exact.dropped_biases.get(key).copied(), bias, "{name}: the bias's difference is reported where it is not zero");

        let one = resize_set(&set, &settings(1, RankRule::Fixed)).unwrap();
        let kept = one.modules[key];
        assert_eq!((kept.old_rank, kept.new_rank, one.set.get(key).unwrap().rank()), (whole, 1, 1), "{name}");
        assert!(kept.fro_retained > 0.0 && kept.fro_retained < 1.0 && kept.max_ratio == 1.0, "{name}: {kept:?}");
        let fro = resize_set(&set, &settings(whole, RankRule::SvFro(0.9))).unwrap();
        assert!(fro.modules[key].fro_retained >= 0.9 - 1e-9 && fro.modules[key].new_rank <= whole, "{name}");
        let e = resize_set(&set, &settings(2, RankRule::SvCumulative(0.9))).unwrap_err().to_string();
        assert!(e.contains("sv_cumulative") && e.contains("full fine-tuning"), "{name}: {e}");

        let written = from_bytes(&exact.set.to_bytes(AdapterFormat::Kohya, SaveDtype::F32).unwrap());
        assert_eq!(written.metadata.get("ss_network_module").map(String::as_str), Some("networks.lora"), "{name}");
        let args = written.metadata.get("ss_network_args").cloned().unwrap_or_default();
        assert!(!args.contains("algo") && !args.contains("preset"), "{name}: {args}");
        assert!(written.iter().all(|(_, w)| w.lycoris.is_none() && w.rank() == whole), "{name}");
    }
}

/// On a bf16 base the layer runs as LyCORIS does on a half-precision one (the base pass
/// plus one with the differences, bias's included): LyCORIS' output, within bf16's rounding.
#[test]
fn bf16_base_matches() {
    use burn::tensor::FloatDType;
    let f = Fixture::open(FILE);
    for name in ["lin", "conv"] {
        let y: Tensor<burn::backend::Flex, 2> = match trained_layer(&f, name) {
            Layer::Linear(l) => {
                let x = f.tensor::<AB, 2>(&format!("{name}.x")).cast(FloatDType::BF16);
                lora_core::precision::cast_frozen(l, FloatDType::BF16).forward(x).cast(FloatDType::F32).inner()
            }
            Layer::Conv(c) => {
                let x = f.tensor::<AB, 4>(&format!("{name}.x")).cast(FloatDType::BF16);
                lora_core::precision::cast_frozen(c, FloatDType::BF16).forward(x).cast(FloatDType::F32).inner().flatten(1, 3)
            }
        };
        let err = rel(y.clone(), flat(&f, &format!("{name}.y"), y.dims()));
        assert!(err < 2e-2, "{name}: bf16 base, relative error {err}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// A damaged full file reads as a typed error or as an adapter that attaches to its
    /// layer (or refuses to, with an error) and runs: never a panic.
    #[test]
    fn damaged_files_are_errors_not_panics(case in 0..CASES.len(), damage in common::damage()) {
        let f = Fixture::open(FILE);
        let name = CASES[case];
        common::layer::survives_damage(&f, name, trained_layer(&f, name), base_layer(&f, name), &damage);
    }
}
