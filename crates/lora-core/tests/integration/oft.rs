//! kohya's OFT (`networks.oft`) against its computation written out in
//! `xtask/fixtures/lora_core_oft.py`: the layer's output and the blocks' gradient at a
//! strength, with the norm constraint inactive and active, on linear and conv layers;
//! merging; a write and read in kohya's layout; and the operations an OFT refuses.

use crate::common;

use std::path::Path;

use burn::backend::{Autodiff, Flex};
use burn::module::Param;
use burn::tensor::{Tensor, TensorData};
use lora_core::sites::{attach_adapters, collect_adapters};
use lora_core::{Algo, AdapterFormat, AdapterSet, Component, LoraConfig, LoraError, LoraWeights, ModuleIndex, ReadOptions, SaveDtype};

use common::layer::{flat, rel, Layer, One};
use common::Fixture;

type B = Autodiff<Flex>;

const CASES: [&str; 4] = ["lin", "lin_clamped", "conv", "lin_large"];

#[derive(serde::Deserialize)]
struct Case {
    layer: Vec<serde_json::Value>,
    blocks: usize,
    alpha: f32,
    multiplier: f32,
}

impl Case {
    fn is_conv(&self) -> bool {
        self.layer[0] == "conv"
    }

    fn dims(&self) -> Vec<usize> {
        self.layer[1..].iter().map(|v| v.as_u64().unwrap() as usize).collect()
    }

    fn config(&self) -> LoraConfig {
        LoraConfig::new(self.blocks).with_alpha(self.alpha).with_algo(Algo::Oft)
    }
}

/// The case's base layer with the fixture's weights.
fn base_layer(f: &Fixture, name: &str) -> Layer {
    let case: Case = f.case(name);
    Layer::from_fixture(f, name, &case.dims(), case.is_conv())
}

/// The case's layer with an OFT at the fixture's blocks and strength.
fn trained_layer(f: &Fixture, name: &str) -> Layer {
    let case: Case = f.case(name);
    let mut layer = base_layer(f, name);
    layer.site().attach_new(&case.config(), &Default::default()).unwrap();
    layer.site().set_multiplier(case.multiplier);
    let t = f.host(&format!("{name}.oft_blocks"));
    let [k, n] = [t.shape[0], t.shape[1]];
    let blocks = Tensor::from_data(TensorData::new(t.data.clone(), [k * n, n]), &Default::default());
    match &mut layer {
        Layer::Linear(l) => l.lycoris.as_mut().unwrap().factors[0] = Param::from_tensor(blocks),
        Layer::Conv(c) => c.lycoris.as_mut().unwrap().factors[0] = Param::from_tensor(blocks),
    }
    layer
}

fn fixture() -> Fixture {
    Fixture::open("oft.safetensors")
}

/// The layer computes kohya's output and the gradient of the blocks, with the norm
/// constraint inactive (`lin`, `conv`, `lin_large`) and clamping (`lin_clamped`); the
/// frozen weight takes none.
#[test]
fn output_and_gradient_match_kohya() {
    let f = fixture();
    for name in CASES {
        let layer = trained_layer(&f, name);
        let y = layer.forward(&f, name);
        let want: Tensor<Flex, 2> = flat(&f, &format!("{name}.y"), y.dims());
        let err = rel(y.clone().inner(), want);
        assert!(err < 1e-5, "{name}: output, relative error {err}");
        let g: Tensor<B, 2> = flat(&f, &format!("{name}.g"), y.dims());
        let grads = (y * g).sum().backward();
        let oft = layer.lycoris_ref();
        let grad = oft.factors[0].grad(&grads).expect("the blocks take a gradient");
        let err = rel(grad, flat(&f, &format!("{name}.grad"), oft.factors[0].dims()));
        assert!(err < 1e-4, "{name}: gradient, relative error {err}");
        assert!(layer.base_is_frozen(&grads), "{name}: the base weight is frozen");
    }
}

/// Merging writes kohya's `Rᵀ · W` into the layer (at the strength), the output stays,
/// and unmerging restores the base weight exactly.
#[test]
fn merge_writes_the_rotated_weight() {
    let f = fixture();
    for name in CASES {
        trained_layer(&f, name).check_merge_round_trip(&f, name, 1e-5);
    }
}

/// Written in kohya's layout: `oft_unet_<module>.oft_blocks` `[k, n, n]` and `.alpha` (the
/// constraint per output), `networks.oft` with the blocks and alpha in the metadata; read
/// back and attached to a fresh layer, the same adapter.
#[test]
fn written_as_kohya_and_read_back() {
    let f = fixture();
    let device = Default::default();
    for name in CASES {
        let case: Case = f.case(name);
        let mut trained = One(trained_layer(&f, name));
        trained.0.site().set_multiplier(1.0);
        let mut set = AdapterSet::new();
        collect_adapters(&mut trained, &mut set).unwrap();
        let bytes = set.to_bytes(AdapterFormat::Kohya, SaveDtype::F32).unwrap();
        let (st, meta) = lora_core::tensor_io::parse(&bytes, Path::new("x")).unwrap();
        let mut keys: Vec<(String, Vec<usize>)> = st.iter().map(|(k, v)| (k.to_string(), v.shape().to_vec())).collect();
        keys.sort();
        let n = f.host(&format!("{name}.oft_blocks")).shape[1];
        let want = vec![("oft_unet_layer.alpha".to_string(), vec![]), ("oft_unet_layer.oft_blocks".to_string(), vec![case.blocks, n, n])];
        assert_eq!(keys, want, "{name}");
        assert_eq!(meta["ss_network_module"], "networks.oft", "{name}");
        assert_eq!(meta["ss_network_dim"], case.blocks.to_string(), "{name}");
        assert_eq!(meta["ss_network_alpha"].parse::<f32>().unwrap(), case.alpha, "{name}");
        let info = lora_core::inspect::inspect(&bytes, Path::new("x")).unwrap();
        let m = &info.modules[0];
        assert_eq!((m.kind, m.rank, m.alpha, info.summary(Component::Unet).len()), (lora_core::inspect::ModuleKind::Oft, Some(case.blocks), Some(case.alpha), 1), "{name}");

        let mut index = ModuleIndex::new();
        lora_core::sites::add_to_index(&mut index, &mut trained).unwrap();
        let (read, _) = AdapterSet::from_bytes(&bytes, Path::new("x"), &index, ReadOptions::default()).unwrap();
        assert!(read.iter().all(|(_, w)| w.is_oft()), "{name}");
        let mut fresh = One(base_layer(&f, name));
        attach_adapters(&mut fresh, &read, 1.0, &device).unwrap();
        let err = rel(fresh.0.forward(&f, name).inner(), trained.0.forward(&f, name).inner());
        assert!(err < 1e-6, "{name}: read back, relative error {err}");
    }
}

/// An OFT has no plain-LoRA form: combining it with another adapter, writing it in the
/// PEFT layout and resizing it are errors naming it; blocks that do not divide the
/// layer's outputs, or a file's blocks for another layer, are errors too.
#[test]
fn operations_without_a_plain_form_are_refused() {
    let f = fixture();
    let mut trained = One(trained_layer(&f, "lin"));
    let mut set = AdapterSet::new();
    collect_adapters(&mut trained, &mut set).unwrap();
    let (key, w) = set.iter().next().unwrap();
    let oft_error = |e: LoraError| assert!(e.to_string().contains("is an OFT"), "{e}");
    oft_error(LoraWeights::combine(&[(w, 1.0), (w, 1.0)], "k").unwrap_err());
    oft_error(LoraWeights::combine(&[(w, 0.5)], "k").unwrap_err());
    assert_eq!(&LoraWeights::combine(&[(w, 1.0)], "k").unwrap(), w, "alone at strength 1 it is itself");
    oft_error(set.to_bytes(AdapterFormat::Peft, SaveDtype::F32).unwrap_err());
    oft_error(lora_core::resize::resize_adapter(w, 2, lora_core::resize::RankRule::Fixed, &key.to_string()).unwrap_err());

    // 8 outputs do not split into 3 blocks.
    let mut layer = base_layer(&f, "lin");
    let e = layer.site().attach_new(&LoraConfig::new(3).with_alpha(1e-3).with_algo(Algo::Oft), &Default::default()).unwrap_err();
    assert!(e.to_string().contains("must divide the layer's 8 outputs"), "{e}");
    // A file's blocks for a 12-output layer on this 8-output one.
    let mut other = One(trained_layer(&f, "lin_clamped"));
    let mut wrong = AdapterSet::new();
    collect_adapters(&mut other, &mut wrong).unwrap();
    let e = attach_adapters(&mut One(base_layer(&f, "lin")), &wrong, 1.0, &Default::default()).unwrap_err();
    assert!(e.to_string().contains("12 outputs, the layer has 8"), "{e}");
    // Options kohya's OFT does not have.
    for config in [LoraConfig::new(4).with_algo(Algo::Oft).with_alpha(0.0), LoraConfig::new(4).with_algo(Algo::Oft).with_alpha(1e-3).with_dora(true), LoraConfig::new(4).with_algo(Algo::Oft).with_alpha(1e-3).with_module_dropout(0.1)] {
        assert!(config.validate().is_err(), "{config:?}");
    }
}
