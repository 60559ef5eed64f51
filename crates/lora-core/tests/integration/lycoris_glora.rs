//! LyCORIS' GLoRA against its own module (`xtask/fixtures/lora_core_lycoris_glora_ia3.py`
//! runs `lycoris.modules.glora.GLoRAModule`): the layer's output and the gradients of its
//! four factors and of its trained scalar, on linear layers, a 3x3 and a 1x1 convolution,
//! with rsLoRA, at strengths 1 and 0.7; merging; the file LyCORIS writes (its scalar folded
//! into `a2` and `b2`), read back; an integer `alpha` as LyCORIS writes an alpha of 0; and
//! damaged files.

use crate::common;

use std::path::Path;

use burn::backend::{Autodiff, Flex};
use burn::module::Param;
use burn::tensor::Tensor;
use lora_core::inspect::ModuleKind;
use lora_core::sites::attach_adapters;
use lora_core::{Algo, AdapterFormat, AdapterSet, Component, HostTensor, LoraConfig, ModuleIndex, ReadOptions, SaveDtype};
use proptest::prelude::*;

use common::layer::{flat, rel, Layer, One};
use common::Fixture;

type B = Autodiff<Flex>;

const FILE: &str = "glora.safetensors";
const CASES: [&str; 4] = ["lin", "lin_rs_scalar", "conv", "conv1x1"];
const FACTORS: [&str; 4] = ["a1", "a2", "b1", "b2"];

#[derive(serde::Deserialize)]
struct Case {
    layer: Vec<serde_json::Value>,
    dim: usize,
    alpha: f32,
    multiplier: f32,
    rs_lora: bool,
    use_scalar: bool,
    scale: f32,
}

impl Case {
    fn is_conv(&self) -> bool {
        self.layer[0] == "conv"
    }

    fn dims(&self) -> Vec<usize> {
        self.layer[1..].iter().map(|v| v.as_u64().unwrap() as usize).collect()
    }

    /// LyCORIS reads an alpha of 0 as the rank (scale 1).
    fn config(&self) -> LoraConfig {
        let alpha = if self.alpha == 0.0 { self.dim as f32 } else { self.alpha };
        LoraConfig::new(self.dim).with_alpha(alpha).with_algo(Algo::Glora).with_rslora(self.rs_lora).with_use_scalar(self.use_scalar)
    }
}

/// The case's base layer with the fixture's weights.
fn base_layer(f: &Fixture, name: &str) -> Layer {
    let case: Case = f.case(name);
    Layer::from_fixture(f, name, &case.dims(), case.is_conv())
}

/// The case's layer with a fresh GLoRA at the case's settings, its factors (and scalar)
/// set to the fixture's, at the case's strength.
fn trained_layer(f: &Fixture, name: &str) -> Layer {
    let case: Case = f.case(name);
    let mut layer = base_layer(f, name);
    layer.site().attach_new(&case.config(), &Default::default()).unwrap();
    layer.site().set_multiplier(case.multiplier);
    let glora = layer.lycoris();
    assert_eq!(glora.names(), lora_core::glora::NAMES, "{name}");
    assert!((glora.scale - case.scale).abs() < 1e-6, "{name}: scale {} against LyCORIS' {}", glora.scale, case.scale);
    for (i, factor) in FACTORS.iter().enumerate() {
        let dims = glora.factors[i].dims();
        assert_eq!(glora.torch_shapes()[i], f.host(&format!("{name}.{factor}")).shape, "{name}: {factor}'s shape");
        glora.factors[i] = Param::from_tensor(flat(f, &format!("{name}.{factor}"), dims));
    }
    if case.use_scalar {
        glora.scalar = Some(Param::from_tensor(f.tensor(&format!("{name}.scalar"))));
    }
    layer
}

/// The layer computes LyCORIS' output and the gradients of `a1`, `a2`, `b1`, `b2` and the
/// scalar; the frozen weight takes none.
#[test]
fn output_and_gradients_match_lycoris() {
    let f = Fixture::open(FILE);
    for name in CASES {
        let case: Case = f.case(name);
        let layer = trained_layer(&f, name);
        let y = layer.forward(&f, name);
        let err = rel(y.clone().inner(), flat(&f, &format!("{name}.y"), y.dims()));
        assert!(err < 2e-5, "{name}: output, relative error {err}");
        let g: Tensor<B, 2> = flat(&f, &format!("{name}.g"), y.dims());
        let grads = (y * g).sum().backward();
        let glora = layer.lycoris_ref();
        for (i, factor) in FACTORS.iter().enumerate() {
            let grad = glora.factors[i].grad(&grads).expect("the factors take gradients");
            let err = rel(grad, flat(&f, &format!("{name}.{factor}_grad"), glora.factors[i].dims()));
            assert!(err < 1e-4, "{name}: gradient of {factor}, relative error {err}");
        }
        if case.use_scalar {
            let grad = glora.scalar.as_ref().unwrap().grad(&grads).expect("the scalar takes a gradient");
            let err = rel(grad, f.tensor::<Flex, 1>(&format!("{name}.scalar_grad")));
            assert!(err < 1e-4, "{name}: gradient of the scalar, relative error {err}");
        }
        assert!(layer.base_is_frozen(&grads), "{name}: the base weight is frozen");
    }
}

/// Merging writes LyCORIS' merged weight into the layer (at the strength), the output
/// stays, and unmerging restores the base weight exactly.
#[test]
fn merge_writes_lycoris_weight() {
    let f = Fixture::open(FILE);
    for name in CASES {
        trained_layer(&f, name).check_merge_round_trip(&f, name, 2e-5);
    }
}

/// A fresh GLoRA changes nothing (`a2` and `b2` at zero, or the scalar at zero: up to the
/// rounding of `W + ΔW` in one product on an f32 base), and
/// without the scalar `a1` and `b1` start Kaiming-uniform: nonzero, within `1 / sqrt(r)`.
#[test]
fn a_fresh_glora_changes_nothing() {
    let f = Fixture::open(FILE);
    for name in CASES {
        let case: Case = f.case(name);
        let mut layer = base_layer(&f, name);
        let before = layer.forward(&f, name).inner();
        layer.site().attach_new(&case.config(), &Default::default()).unwrap();
        let err = rel(layer.forward(&f, name).inner(), before);
        assert!(err < 1e-6, "{name}: a fresh adapter moved the output by {err}");
        let glora = layer.lycoris_ref();
        let bound = 1.0 / (case.dim as f32).sqrt();
        for i in [0, 2] {
            let v: Vec<f32> = glora.factors[i].val().inner().into_data().to_vec().unwrap();
            assert!(v.iter().any(|x| *x != 0.0) && v.iter().all(|x| x.abs() <= bound), "{name}: {}", FACTORS[i]);
        }
    }
}

/// Written as LyCORIS writes it: `lora_unet_<module>.` and the module's state dict
/// (`a1.weight` … `b2.weight` in LyCORIS' shapes, the scalar folded into `a2` and `b2`,
/// `alpha`), tensor for tensor what the fixture's module saved, but for rsLoRA's alpha,
/// written as `scale · rank` so that readers, which all take `alpha / rank` (LyCORIS' own
/// too: it rebuilds a module from a file without rsLoRA), apply the trained scale; `lycoris.kohya` with
/// `algo=glora`; `info` says GLoRA with its rank; read back, the same layer output.
#[test]
fn written_as_lycoris_and_read_back() {
    let f = Fixture::open(FILE);
    for name in CASES {
        let case: Case = f.case(name);
        let mut trained = One(trained_layer(&f, name));
        trained.0.site().set_multiplier(1.0);
        let state = ["a1.weight", "a2.weight", "alpha", "b1.weight", "b2.weight"];
        let want = |k: &str| {
            let mut want = f.host(&format!("{name}.state.{k}")).clone();
            if k == "alpha" && case.rs_lora {
                want.data = vec![case.scale * case.dim as f32];
            }
            want
        };
        let (bytes, meta) = common::layer::written_as_lycoris(&mut trained, name, &state, want, "glora", 1e-6);
        let args: serde_json::Value = serde_json::from_str(&meta["ss_network_args"]).unwrap();
        let dim = if case.is_conv() && case.dims()[2] == 3 { args["conv_dim"].as_str().unwrap().to_string() } else { meta["ss_network_dim"].clone() };
        assert_eq!(dim, case.dim.to_string(), "{name}: the rank");

        let info = lora_core::inspect::inspect(&bytes, Path::new("x")).unwrap();
        let m = &info.modules[0];
        let kernel = case.is_conv().then(|| [case.dims()[2]; 2]);
        assert_eq!((m.kind, m.rank, m.kernel, info.summary(Component::Unet).len()), (ModuleKind::Glora, Some(case.dim), kernel, 1), "{name}");

        let read = common::layer::read_back(&f, name, &mut trained, &bytes, base_layer(&f, name), 1e-5);
        let (_, w) = read.iter().next().unwrap();
        assert!(w.depends_on_base() && !w.is_oft() && w.lycoris.as_ref().unwrap().algo == Algo::Glora, "{name}");
    }
}

/// LyCORIS' own saved state dict reads: with its alpha as an int64 (what LyCORIS writes
/// for an alpha of 0, the rank) or without one (scale 1, as ComfyUI reads it); the output
/// is LyCORIS'.
#[test]
fn lycoris_files_read_with_an_integer_alpha() {
    let f = Fixture::open(FILE);
    let mut index = ModuleIndex::new();
    index.add(Component::Unet, ["layer"]).unwrap();
    for (name, alpha) in [("conv1x1", Some(2i64)), ("lin", None)] {
        let case: Case = f.case(name);
        let mut tensors: Vec<(String, Vec<u8>, Vec<usize>, safetensors::Dtype)> = Vec::new();
        for k in ["a1.weight", "a2.weight", "b1.weight", "b2.weight"] {
            let t = f.host(&format!("{name}.state.{k}"));
            tensors.push((format!("lora_unet_layer.{k}"), t.data.iter().flat_map(|v| v.to_le_bytes()).collect(), t.shape.clone(), safetensors::Dtype::F32));
        }
        if let Some(a) = alpha {
            tensors.push(("lora_unet_layer.alpha".into(), a.to_le_bytes().to_vec(), vec![], safetensors::Dtype::I64));
        }
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors.iter().map(|(k, b, s, d)| (k.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap())).collect();
        let bytes = safetensors::serialize(views, None).unwrap();
        let (read, _) = AdapterSet::from_bytes(&bytes, Path::new("lycoris.safetensors"), &index, ReadOptions::default()).unwrap();
        let (_, w) = read.iter().next().unwrap();
        assert_eq!(w.lycoris.as_ref().unwrap().scale(), 1.0, "{name}");
        let mut layer = One(base_layer(&f, name));
        attach_adapters(&mut layer, &read, case.multiplier, &Default::default()).unwrap();
        let y = layer.0.forward(&f, name).inner();
        let want = if alpha.is_some() { rel(y.clone(), flat(&f, &format!("{name}.y"), y.dims())) } else { 0.0 };
        assert!(want < 2e-5, "{name}: output, relative error {want}");
    }
}

/// A file in LyCORIS' layout before 2.0 (`a1 [r, in]`, `a2 [in, r]`, `b1 [r, in·k]`,
/// `b2 [out, r]`, the update `W · a2 · a1 + b2 · b1`, as ComfyUI and A1111 read it) reads as
/// the same update: LyCORIS' output. On a square layer, where the shapes fit both layouts,
/// the one with the smaller rank is taken; on a 3x3 convolution the old layout is an error.
#[test]
fn files_in_the_layout_before_2_0_read_as_the_same_update() {
    let f = Fixture::open(FILE);
    let read = common::read_module;
    for name in ["lin", "conv1x1", "conv"] {
        let case: Case = f.case(name);
        let t = |k: &str| f.host(&format!("{name}.state.{k}")).clone();
        let (a1, a2, b1, b2, alpha) = (t("a1.weight"), t("a2.weight"), t("b1.weight"), t("b2.weight"), t("alpha"));
        // The old names for the same tensors: a1 ↔ a2, b1 ↔ b2.
        let old = [("a1.weight", &a2), ("a2.weight", &a1), ("b1.weight", &b2), ("b2.weight", &b1), ("alpha", &alpha)];
        if name == "conv" {
            let e = read(&old).unwrap_err().to_string();
            assert!(e.contains("before 2.0") && e.contains("3x3") && e.contains("layer"), "{e}");
            continue;
        }
        let set = read(&old).unwrap();
        let (_, w) = set.iter().next().unwrap();
        let l = w.lycoris.as_ref().unwrap();
        assert_eq!(l.get("a1.weight").unwrap().shape, a1.shape, "{name}: held in the current layout");
        let mut layer = One(base_layer(&f, name));
        attach_adapters(&mut layer, &set, case.multiplier, &Default::default()).unwrap();
        let y = layer.0.forward(&f, name).inner();
        let err = rel(y.clone(), flat(&f, &format!("{name}.y"), y.dims()));
        assert!(err < 2e-5, "{name}: output, relative error {err}");
    }
    // A square layer (width 4, rank 2) fits both layouts: the smaller rank decides.
    let m = |shape: [usize; 2]| HostTensor::new(shape.to_vec(), vec![0.1; shape[0] * shape[1]]).unwrap();
    let (wide, tall) = (m([2, 4]), m([4, 2]));
    let old = read(&[("a1.weight", &wide), ("a2.weight", &tall), ("b1.weight", &wide), ("b2.weight", &tall)]).unwrap();
    let current = read(&[("a1.weight", &tall), ("a2.weight", &wide), ("b1.weight", &tall), ("b2.weight", &wide)]).unwrap();
    for set in [old, current] {
        let (_, w) = set.iter().next().unwrap();
        assert_eq!(w.lycoris.as_ref().unwrap().get("a1.weight").unwrap().shape, [4, 2], "rank 2 of width 4");
    }
}

/// Tensors that are not a GLoRA's, or do not fit each other or the layer, are errors
/// naming the module; so are the options LyCORIS' GLoRA does not take.
#[test]
fn bad_tensors_and_options() {
    let f = Fixture::open(FILE);
    let t = |k: &str| f.host(&format!("lin.state.{k}")).clone();
    let (a1, a2, b1, b2) = (t("a1.weight"), t("a2.weight"), t("b1.weight"), t("b2.weight"));
    let read = common::read_module;
    assert!(read(&[("a1.weight", &a1), ("a2.weight", &a2), ("b1.weight", &b1), ("b2.weight", &b2)]).is_ok());
    let wide = HostTensor::new(vec![3, 6], vec![0.1; 18]).unwrap();
    let conv = HostTensor::new(vec![2, 6, 3, 3], vec![0.1; 108]).unwrap();
    let down = HostTensor::new(vec![2, 6], vec![0.1; 12]).unwrap();
    for (tensors, says) in [
        (vec![("a1.weight", &a1), ("a2.weight", &a2), ("b1.weight", &b1)], "exactly"),
        (vec![("a1.weight", &a1), ("a2.weight", &wide), ("b1.weight", &b1), ("b2.weight", &b2)], "expected"),
        (vec![("a1.weight", &a1), ("a2.weight", &a2), ("b1.weight", &b1), ("b2.weight", &conv)], "all linear"),
        (vec![("a1.weight", &a1), ("a2.weight", &a2), ("b1.weight", &b1), ("b2.weight", &b2), ("lora_down.weight", &down)], "both LoRA"),
        (vec![("a1.weight", &a1), ("a2.weight", &a2), ("b1.weight", &b1), ("b2.weight", &b2), ("hada_w1_a", &down)], "exactly"),
    ] {
        let e = read(&tensors).unwrap_err().to_string();
        assert!(e.contains("layer") && e.contains(says), "{says}: {e}");
    }
    // Read for a layer of another size: an error naming it, not a panic.
    let set = read(&[("a1.weight", &a1), ("a2.weight", &a2), ("b1.weight", &b1), ("b2.weight", &b2)]).unwrap();
    let mut other = One(base_layer(&f, "lin_rs_scalar"));
    let e = attach_adapters(&mut other, &set, 1.0, &Default::default()).unwrap_err().to_string();
    assert!(e.contains("6→8") && e.contains("10→12"), "{e}");
    // Nor is it combined, resized or written as PEFT.
    let (key, w) = set.iter().next().unwrap();
    assert!(lora_core::resize::resize_adapter(w, 1, lora_core::resize::RankRule::Fixed, "k").unwrap_err().to_string().contains("GLoRA"));
    assert!(set.to_bytes(AdapterFormat::Peft, SaveDtype::F32).unwrap_err().to_string().contains("GLoRA"));
    assert!(lora_core::LoraWeights::combine(&[(w, 0.5)], &key.to_string()).unwrap_err().to_string().contains("GLoRA"));

    let config = LoraConfig::new(4).with_algo(Algo::Glora);
    assert!(config.clone().with_module_dropout(0.1).with_use_scalar(true).with_rslora(true).validate().is_ok());
    for bad in [config.clone().with_rank_dropout(0.1), config.clone().with_dora(true), config.clone().with_use_tucker(true), config.clone().with_dropout(0.1)] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// A damaged GLoRA file (cut short, a byte overwritten, a tensor left out, reshaped,
    /// filled with NaN, renamed) reads as a typed error or as an adapter that attaches to
    /// its layer (or refuses to, with an error) and runs: never a panic.
    #[test]
    fn damaged_files_are_errors_not_panics(case in 0..CASES.len(), damage in common::damage()) {
        let f = Fixture::open(FILE);
        let name = CASES[case];
        common::layer::survives_damage(&f, name, trained_layer(&f, name), base_layer(&f, name), &damage);
    }
}
