//! LyCORIS' (IA)³ against its own module (`xtask/fixtures/lora_core_lycoris_glora_ia3.py`
//! runs `lycoris.modules.ia3.IA3Module`): the layer's output and the gradient of its scale,
//! per output and per input channel, on a linear layer and a 3x3 convolution, at strengths
//! 1 and 0.7; merging; the file LyCORIS writes (`weight`, `on_input`, no `alpha`), read
//! back, with its int64 flag too; and damaged files.

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

const FILE: &str = "ia3.safetensors";
const CASES: [&str; 4] = ["lin", "lin_input", "conv", "conv_input"];

#[derive(serde::Deserialize)]
struct Case {
    layer: Vec<serde_json::Value>,
    multiplier: f32,
    on_input: bool,
}

impl Case {
    fn is_conv(&self) -> bool {
        self.layer[0] == "conv"
    }

    fn dims(&self) -> Vec<usize> {
        self.layer[1..].iter().map(|v| v.as_u64().unwrap() as usize).collect()
    }

    fn config(&self) -> LoraConfig {
        LoraConfig::new(1).with_algo(Algo::Ia3).with_ia3_on_input(self.on_input)
    }
}

fn base_layer(f: &Fixture, name: &str) -> Layer {
    let case: Case = f.case(name);
    Layer::from_fixture(f, name, &case.dims(), case.is_conv())
}

/// The case's layer with a fresh (IA)³, its scale set to the fixture's, at the case's
/// strength.
fn trained_layer(f: &Fixture, name: &str) -> Layer {
    let case: Case = f.case(name);
    let mut layer = base_layer(f, name);
    layer.site().attach_new(&case.config(), &Default::default()).unwrap();
    layer.site().set_multiplier(case.multiplier);
    let ia3 = layer.lycoris();
    assert_eq!((ia3.names(), ia3.ia3_on_input()), (&[lora_core::ia3::WEIGHT][..], case.on_input), "{name}");
    assert_eq!(ia3.torch_shapes()[0], f.host(&format!("{name}.ia3")).shape, "{name}: the scale's shape");
    let dims = ia3.factors[0].dims();
    ia3.factors[0] = Param::from_tensor(flat(f, &format!("{name}.ia3"), dims));
    layer
}

/// The layer computes LyCORIS' output (the bias left alone) and the gradient of the scale;
/// the frozen weight takes none; a fresh (IA)³ changes nothing.
#[test]
fn output_and_gradients_match_lycoris() {
    let f = Fixture::open(FILE);
    for name in CASES {
        let layer = trained_layer(&f, name);
        let y = layer.forward(&f, name);
        let err = rel(y.clone().inner(), flat(&f, &format!("{name}.y"), y.dims()));
        assert!(err < 2e-5, "{name}: output, relative error {err}");
        let g: Tensor<B, 2> = flat(&f, &format!("{name}.g"), y.dims());
        let grads = (y * g).sum().backward();
        let ia3 = layer.lycoris_ref();
        let grad = ia3.factors[0].grad(&grads).expect("the scale takes a gradient");
        let err = rel(grad, flat(&f, &format!("{name}.grad"), ia3.factors[0].dims()));
        assert!(err < 1e-4, "{name}: gradient of the scale, relative error {err}");
        assert!(layer.base_is_frozen(&grads), "{name}: the base weight is frozen");

        let case: Case = f.case(name);
        let mut fresh = base_layer(&f, name);
        let before = fresh.forward(&f, name).inner();
        fresh.site().attach_new(&case.config(), &Default::default()).unwrap();
        let err = rel(fresh.forward(&f, name).inner(), before);
        assert!(err < 1e-6, "{name}: a fresh (IA)³ moved the output by {err}");
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

/// Written as LyCORIS writes it: `lora_unet_<module>.weight` and `.on_input`, no `alpha`,
/// tensor for tensor what the fixture's module saved; `lycoris.kohya` with `algo=ia3`;
/// `info` says (IA)³; read back, the same layer output.
#[test]
fn written_as_lycoris_and_read_back() {
    let f = Fixture::open(FILE);
    for name in CASES {
        let mut trained = One(trained_layer(&f, name));
        trained.0.site().set_multiplier(1.0);
        let state = ["on_input", "weight"];
        let (bytes, _) = common::layer::written_as_lycoris(&mut trained, name, &state, |k| f.host(&format!("{name}.state.{k}")).clone(), "ia3", 0.0);

        let info = lora_core::inspect::inspect(&bytes, Path::new("x")).unwrap();
        let m = &info.modules[0];
        assert_eq!((m.kind, m.rank, m.alpha), (ModuleKind::Ia3, None, None), "{name}");
        assert_eq!(info.summary(Component::Unet).len(), 1, "{name}");

        let read = common::layer::read_back(&f, name, &mut trained, &bytes, base_layer(&f, name), 1e-6);
        let (_, w) = read.iter().next().unwrap();
        assert!(w.depends_on_base() && w.lycoris.as_ref().unwrap().algo == Algo::Ia3, "{name}");
    }
}

/// LyCORIS' file as it writes it without a save precision: `on_input` an int64 scalar;
/// it reads with the scale on the inputs, and gives LyCORIS' output.
#[test]
fn lycoris_file_with_an_int64_flag_reads() {
    let f = Fixture::open(FILE);
    let mut index = ModuleIndex::new();
    index.add(Component::Unet, ["layer"]).unwrap();
    let name = "lin_input";
    let case: Case = f.case(name);
    let weight = f.host(&format!("{name}.state.weight"));
    let weight_bytes: Vec<u8> = weight.data.iter().flat_map(|v| v.to_le_bytes()).collect();
    let flag = 1i64.to_le_bytes();
    let views = vec![
        ("lora_unet_layer.weight".to_string(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, weight.shape.clone(), &weight_bytes).unwrap()),
        ("lora_unet_layer.on_input".to_string(), safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![], &flag).unwrap()),
    ];
    let bytes = safetensors::serialize(views, None).unwrap();
    let (read, _) = AdapterSet::from_bytes(&bytes, Path::new("ia3.safetensors"), &index, ReadOptions::default()).unwrap();
    let mut layer = One(base_layer(&f, name));
    attach_adapters(&mut layer, &read, case.multiplier, &Default::default()).unwrap();
    let y = layer.0.forward(&f, name).inner();
    let err = rel(y.clone(), flat(&f, &format!("{name}.y"), y.dims()));
    assert!(err < 2e-5, "output, relative error {err}");
}

/// A scale that fits neither the layer nor LyCORIS' shapes, a flag that is not 0 or 1, a
/// tensor without the other, mixed with another algorithm's: errors naming the module. Nor
/// is an (IA)³ combined, resized or written as PEFT; the options it does not take are
/// refused.
#[test]
fn bad_tensors_and_options() {
    let f = Fixture::open(FILE);
    let mut index = ModuleIndex::new();
    index.add(Component::Unet, ["layer"]).unwrap();
    let weight = f.host("lin.state.weight").clone();
    let read = |tensors: &[(&str, &HostTensor)]| {
        let refs: Vec<(String, &HostTensor)> = tensors.iter().map(|(k, t)| (format!("lora_unet_layer.{k}"), *t)).collect();
        let bytes = lora_core::tensor_io::serialize(&refs, SaveDtype::F32, Default::default()).unwrap();
        AdapterSet::from_bytes(&bytes, Path::new("i.safetensors"), &index, ReadOptions::default()).map(|(set, _)| set)
    };
    let (zero, two) = (HostTensor::new(vec![], vec![0.0]).unwrap(), HostTensor::new(vec![], vec![2.0]).unwrap());
    let square = HostTensor::new(vec![8, 8], vec![0.1; 64]).unwrap();
    let hada = HostTensor::new(vec![8, 2], vec![0.1; 16]).unwrap();
    for (tensors, says) in [
        (vec![("weight", &weight)], "without its `on_input`"),
        (vec![("on_input", &zero)], "without its `weight`"),
        (vec![("weight", &weight), ("on_input", &two)], "0 or 1"),
        (vec![("weight", &square), ("on_input", &zero)], "one value per channel"),
        (vec![("weight", &weight), ("on_input", &zero), ("hada_w1_a", &hada)], "mixes"),
    ] {
        let e = read(&tensors).unwrap_err().to_string();
        assert!(e.contains("layer") && e.contains(says), "{says}: {e}");
    }
    // On the inputs of a layer with 6 of them, 8 values do not fit.
    let one = HostTensor::new(vec![], vec![1.0]).unwrap();
    let set = read(&[("weight", &weight), ("on_input", &one)]).unwrap();
    let mut layer = One(base_layer(&f, "lin"));
    let e = attach_adapters(&mut layer, &set, 1.0, &Default::default()).unwrap_err().to_string();
    assert!(e.contains("8 channels") && e.contains("6 inputs"), "{e}");
    let (key, w) = set.iter().next().unwrap();
    assert!(lora_core::resize::resize_adapter(w, 1, lora_core::resize::RankRule::Fixed, "k").unwrap_err().to_string().contains("(IA)³"));
    assert!(set.to_bytes(AdapterFormat::Peft, SaveDtype::F32).unwrap_err().to_string().contains("(IA)³"));
    assert!(lora_core::LoraWeights::combine(&[(w, 0.5)], &key.to_string()).unwrap_err().to_string().contains("(IA)³"));

    let config = LoraConfig::new(1).with_algo(Algo::Ia3);
    assert!(config.clone().with_module_dropout(0.1).validate().is_ok());
    for bad in [config.clone().with_rank_dropout(0.1), config.clone().with_dora(true), config.clone().with_use_scalar(true), config.clone().with_rslora(true), config.clone().with_dropout(0.1)] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// A damaged (IA)³ file reads as a typed error or as an adapter that attaches to its
    /// layer (or refuses to, with an error) and runs: never a panic.
    #[test]
    fn damaged_files_are_errors_not_panics(case in 0..CASES.len(), damage in common::damage()) {
        let f = Fixture::open(FILE);
        let name = CASES[case];
        common::layer::survives_damage(&f, name, trained_layer(&f, name), base_layer(&f, name), &damage);
    }
}
