//! LyCORIS' norm modules against its own `NormModule` (`xtask/fixtures/lora_core_lycoris_norm.py`):
//! a GroupNorm's and a LayerNorm's output and the gradients of `w_norm` and `b_norm`, at
//! strengths 1 and 0.7; merging; the file LyCORIS writes (`w_norm`, `b_norm`, no `alpha`),
//! read back; module dropout; a bf16 base; bad files and layers that do not take them.

use crate::common;

use std::path::Path;

use burn::backend::{Autodiff, Flex};
use burn::module::Param;
use burn::nn::{GroupNormConfig, LayerNormConfig};
use burn::tensor::{Tensor, TensorData};
use lora_core::inspect::ModuleKind;
use lora_core::kernels::{group_norm_output, GroupNormSpec};
use lora_core::norm::{LoraGroupNorm, LoraLayerNorm};
use lora_core::sites::{attach_adapters, collect_adapters, LoraSites};
use lora_core::{Algo, AdapterFormat, AdapterSet, Component, HostTensor, LoraConfig, LoraSiteMut, ModuleIndex, ReadOptions, SaveDtype};

use common::Fixture;

type AB = Autodiff<Flex>;

const FILE: &str = "norm.safetensors";
const CASES: [&str; 4] = ["group", "group_strength", "layer", "layer_strength"];

#[derive(serde::Deserialize)]
struct Case {
    norm: Vec<serde_json::Value>,
    multiplier: f32,
}

impl Case {
    fn num(&self, i: usize) -> f64 {
        self.norm[i].as_f64().unwrap()
    }
}

/// One norm of either kind, as a model with the site `layer`.
enum Norm {
    Group(LoraGroupNorm<AB>),
    Layer(LoraLayerNorm<AB>),
}

impl LoraSites<AB> for Norm {
    fn component(&self) -> Component {
        Component::Unet
    }

    fn visit_lora_sites(&mut self, f: &mut dyn FnMut(&str, LoraSiteMut<'_, AB>)) {
        match self {
            Norm::Group(n) => f("layer", LoraSiteMut::Norm(n)),
            Norm::Layer(n) => f("layer", LoraSiteMut::Norm(n)),
        }
    }
}

impl Norm {
    fn site(&mut self) -> LoraSiteMut<'_, AB> {
        match self {
            Norm::Group(n) => LoraSiteMut::Norm(n),
            Norm::Layer(n) => LoraSiteMut::Norm(n),
        }
    }

    fn adapter(&mut self) -> &mut lora_core::LycorisAdapter<AB> {
        match self {
            Norm::Group(n) => n.lycoris.as_mut(),
            Norm::Layer(n) => n.lycoris.as_mut(),
        }
        .expect("a norm module is attached")
    }

    fn params(&self) -> (Tensor<AB, 1>, Tensor<AB, 1>) {
        let (g, b) = match self {
            Norm::Group(n) => n.params(),
            Norm::Layer(n) => n.params(),
        };
        (g.unwrap(), b.unwrap())
    }

    /// `γ` and `β` of the base norm.
    fn base(&self) -> (Tensor<Flex, 1>, Tensor<Flex, 1>) {
        let (g, b) = match self {
            Norm::Group(n) => (n.base.gamma.as_ref().unwrap().val(), n.base.beta.as_ref().unwrap().val()),
            Norm::Layer(n) => (n.base.gamma.val(), n.base.beta.as_ref().unwrap().val()),
        };
        (g.inner(), b.inner())
    }

    fn unmerge(&mut self) {
        match self {
            Norm::Group(n) => n.unmerge_in_place(),
            Norm::Layer(n) => n.unmerge_in_place(),
        }
    }

    /// The norm of the case's input with the current `γ'`, `β'` (GroupNorm on the map,
    /// LayerNorm on the rows: one group), flattened to `[n, 1]`.
    fn forward(&self, f: &Fixture, name: &str) -> Tensor<AB, 2> {
        let case: Case = f.case(name);
        let (gamma, beta) = self.params();
        let x = f.host(&format!("{name}.x"));
        let n = x.data.len();
        
        match self {
            Norm::Group(_) => {
                let x: Tensor<AB, 4> = f.tensor(&format!("{name}.x"));
                let spec = GroupNormSpec { groups: case.num(1) as usize, epsilon: case.num(3), silu: false };
                group_norm_output(x, gamma, beta, spec).reshape([n, 1])
            }
            Norm::Layer(_) => {
                let c = case.num(1) as usize;
                let x: Tensor<AB, 2> = Tensor::from_data(TensorData::new(x.data.clone(), [n / c, c]), &Default::default());
                let spec = GroupNormSpec { groups: 1, epsilon: case.num(2), silu: false };
                group_norm_output(x, gamma, beta, spec).reshape([n, 1])
            }
        }
    }
}

fn vector(f: &Fixture, key: &str) -> Tensor<AB, 1> {
    f.tensor(key)
}

fn column(f: &Fixture, key: &str) -> Tensor<AB, 2> {
    let t = f.host(key);
    Tensor::from_data(TensorData::new(t.data.clone(), [t.data.len(), 1]), &Default::default())
}

fn rel<const D: usize>(a: Tensor<Flex, D>, b: Tensor<Flex, D>) -> f32 {
    common::layer::rel(a, b)
}

/// The case's base norm (γ and β from the fixture), without a module.
fn base_norm(f: &Fixture, name: &str) -> Norm {
    let case: Case = f.case(name);
    let device = Default::default();
    let (gamma, beta) = (vector(f, &format!("{name}.weight")), vector(f, &format!("{name}.bias")));
    if case.norm[0] == "group" {
        let mut n = GroupNormConfig::new(case.num(1) as usize, case.num(2) as usize).with_epsilon(case.num(3)).init::<AB>(&device);
        (n.gamma, n.beta) = (Some(Param::from_tensor(gamma)), Some(Param::from_tensor(beta)));
        Norm::Group(LoraGroupNorm::new(n))
    } else {
        let mut n = LayerNormConfig::new(case.num(1) as usize).with_epsilon(case.num(2)).init::<AB>(&device);
        (n.gamma, n.beta) = (Param::from_tensor(gamma), Some(Param::from_tensor(beta)));
        Norm::Layer(LoraLayerNorm::new(n))
    }
}

/// The case's norm with a fresh module (`config`'s module dropout), its tensors set to the
/// fixture's, at the case's strength.
fn trained_with(f: &Fixture, name: &str, config: &LoraConfig) -> Norm {
    let case: Case = f.case(name);
    let mut norm = base_norm(f, name);
    norm.site().attach_new(config, &Default::default()).unwrap();
    norm.site().set_multiplier(case.multiplier);
    let module = norm.adapter();
    assert_eq!(module.names(), ["w_norm", "b_norm"], "{name}");
    assert_eq!(module.algo(), Algo::Norm, "{name}: whatever the configured algorithm");
    module.factors[0] = Param::from_tensor(column(f, &format!("{name}.w_norm")));
    module.factors[1] = Param::from_tensor(column(f, &format!("{name}.b_norm")));
    norm
}

fn trained(f: &Fixture, name: &str) -> Norm {
    // The configured algorithm is the other layers' (a LoHa here): a norm takes its module.
    trained_with(f, name, &LoraConfig::new(4).with_algo(Algo::Loha))
}

/// The norm computes LyCORIS' output (`γ + m·w_norm`, `β + m·b_norm`) and the gradients of
/// both tensors; the frozen `γ` and `β` take none; a fresh module changes nothing.
#[test]
fn output_and_gradients_match_lycoris() {
    let f = Fixture::open(FILE);
    for name in CASES {
        let mut norm = trained(&f, name);
        let y = norm.forward(&f, name);
        let err = rel(y.clone().inner(), column(&f, &format!("{name}.y")).inner());
        assert!(err < 2e-5, "{name}: output, relative error {err}");
        let g = column(&f, &format!("{name}.g"));
        let grads = (y * g).sum().backward();
        let module = norm.adapter();
        for (i, key) in ["w_norm", "b_norm"].iter().enumerate() {
            let grad = module.factors[i].grad(&grads).unwrap_or_else(|| panic!("{name}: {key} takes a gradient"));
            let err = rel(grad, column(&f, &format!("{name}.{key}_grad")).inner());
            assert!(err < 1e-4, "{name}: gradient of {key}, relative error {err}");
        }
        let frozen = match &norm {
            Norm::Group(n) => n.base.gamma.as_ref().unwrap().grad(&grads).is_none() && n.base.beta.as_ref().unwrap().grad(&grads).is_none(),
            Norm::Layer(n) => n.base.gamma.grad(&grads).is_none() && n.base.beta.as_ref().unwrap().grad(&grads).is_none(),
        };
        assert!(frozen, "{name}: the base norm is frozen");

        let mut fresh = base_norm(&f, name);
        let before = fresh.forward(&f, name).inner();
        fresh.site().attach_new(&LoraConfig::new(4), &Default::default()).unwrap();
        let err = rel(fresh.forward(&f, name).inner(), before);
        assert!(err < 1e-6, "{name}: a fresh norm module moved the output by {err}");
    }
}

/// Merging writes LyCORIS' merged `γ` and `β` (at the strength), the output stays;
/// unmerging restores them; baking leaves a plain norm with the merged values.
#[test]
fn merge_writes_lycoris_scale_and_shift() {
    let f = Fixture::open(FILE);
    for name in CASES {
        let mut norm = trained(&f, name);
        let before = norm.forward(&f, name).inner();
        let (gamma, beta) = norm.base();
        norm.site().merge_in_place();
        let (merged, merged_b) = norm.base();
        assert!(rel(merged, f.tensor(&format!("{name}.merged"))) < 2e-6, "{name}: merged γ");
        assert!(rel(merged_b, f.tensor(&format!("{name}.merged_b"))) < 2e-6, "{name}: merged β");
        let err = rel(norm.forward(&f, name).inner(), before.clone());
        assert!(err < 2e-5, "{name}: merged output, relative error {err}");
        norm.unmerge();
        let (g, b) = norm.base();
        assert!(rel(g, gamma) < 1e-6 && rel(b, beta) < 1e-6, "{name}: unmerged");
        norm.site().bake();
        assert!(!norm.site().has_adapter(), "{name}");
        let err = rel(norm.forward(&f, name).inner(), before);
        assert!(err < 2e-5, "{name}: baked output, relative error {err}");
    }
}

/// Written as LyCORIS writes it: `lora_unet_layer.w_norm` and `.b_norm` (`[channels]`, what
/// the fixture's module saved), no `alpha`, `lycoris.kohya` with `train_norm`; `info` says
/// norm; read back, written again byte for byte and the same output.
#[test]
fn written_as_lycoris_and_read_back() {
    let f = Fixture::open(FILE);
    for name in CASES {
        let mut norm = trained(&f, name);
        norm.site().set_multiplier(1.0);
        let mut set = AdapterSet::new();
        collect_adapters(&mut norm, &mut set).unwrap();
        let bytes = set.to_bytes(AdapterFormat::Kohya, SaveDtype::F32).unwrap();
        let (st, meta) = lora_core::tensor_io::parse(&bytes, Path::new("x")).unwrap();
        let mut keys: Vec<&str> = st.names().into_iter().collect();
        keys.sort();
        assert_eq!(keys, ["lora_unet_layer.b_norm", "lora_unet_layer.w_norm"], "{name}");
        for k in ["w_norm", "b_norm"] {
            let written = lora_core::tensor_io::decode(&st.tensor(&format!("lora_unet_layer.{k}")).unwrap(), k, Path::new("x")).unwrap();
            let want = f.host(&format!("{name}.state.{k}"));
            assert_eq!((&written.shape, &written.data), (&want.shape, &want.data), "{name}: {k}");
        }
        assert_eq!(meta["ss_network_module"], "lycoris.kohya", "{name}");
        let args: serde_json::Value = serde_json::from_str(&meta["ss_network_args"]).unwrap();
        assert_eq!((args["algo"].as_str(), args["train_norm"].as_str()), (Some("lora"), Some("True")), "{name}");

        let info = lora_core::inspect::inspect(&bytes, Path::new("x")).unwrap();
        let m = &info.modules[0];
        assert_eq!((m.kind, m.rank, m.alpha, m.kernel), (ModuleKind::Norm, None, None, None), "{name}");

        let mut index = ModuleIndex::new();
        lora_core::sites::add_to_index(&mut index, &mut norm).unwrap();
        let (read, _) = AdapterSet::from_bytes(&bytes, Path::new("x"), &index, ReadOptions::default()).unwrap();
        assert_eq!(read.to_bytes(AdapterFormat::Kohya, SaveDtype::F32).unwrap(), bytes, "{name}: written again as read");
        let (_, w) = read.iter().next().unwrap();
        assert!(w.stands_alone() && w.lycoris.as_ref().unwrap().algo == Algo::Norm, "{name}");
        let mut fresh = base_norm(&f, name);
        attach_adapters(&mut fresh, &read, 1.0, &Default::default()).unwrap();
        let err = rel(fresh.forward(&f, name).inner(), norm.forward(&f, name).inner());
        assert!(err < 1e-6, "{name}: read back, relative error {err}");
        // Continued: the file's values into an attached module, which trains.
        let (key, w) = read.iter().next().unwrap();
        let mut attached = base_norm(&f, name);
        attached.site().attach_new(&LoraConfig::new(4), &Default::default()).unwrap();
        attached.site().load_weights(w, &key.to_string(), &Default::default()).unwrap();
        let err = rel(attached.forward(&f, name).inner(), norm.forward(&f, name).inner());
        assert!(err < 1e-6, "{name}: continued, relative error {err}");
    }
}

/// A file with `w_norm` alone reads with the shift's difference at zero (as LyCORIS reads
/// it), which trains when continued.
#[test]
fn a_file_without_b_norm_reads_with_a_zero_shift_difference() {
    let f = Fixture::open(FILE);
    let name = "group";
    let mut index = ModuleIndex::new();
    index.add(Component::Unet, ["layer"]).unwrap();
    let w_norm = f.host(&format!("{name}.w_norm")).clone();
    let bytes = lora_core::tensor_io::serialize(&[("lora_unet_layer.w_norm".to_string(), &w_norm)], SaveDtype::F32, Default::default()).unwrap();
    let (read, _) = AdapterSet::from_bytes(&bytes, Path::new("f.safetensors"), &index, ReadOptions::default()).unwrap();
    let mut want = trained(&f, name);
    want.site().set_multiplier(1.0);
    want.adapter().factors[1] = Param::from_tensor(Tensor::zeros([6, 1], &Default::default()));
    let mut norm = base_norm(&f, name);
    attach_adapters(&mut norm, &read, 1.0, &Default::default()).unwrap();
    assert_eq!(norm.adapter().names(), ["w_norm", "b_norm"]);
    let err = rel(norm.forward(&f, name).inner(), want.forward(&f, name).inner());
    assert!(err < 1e-6, "relative error {err}");
    let (key, w) = read.iter().next().unwrap();
    let mut attached = base_norm(&f, name);
    attached.site().attach_new(&LoraConfig::new(4), &Default::default()).unwrap();
    attached.site().load_weights(w, &key.to_string(), &Default::default()).unwrap();
    let grads = attached.forward(&f, name).sum().backward();
    assert!(attached.adapter().factors[1].grad(&grads).is_some(), "the shift's difference trains");
}

/// With module dropout, a pass runs either the trained norm or the base one, and over a
/// few passes both occur. Rank dropout is not a norm module's (its probability is dropped).
#[test]
fn module_dropout_skips_the_whole_module() {
    let f = Fixture::open(FILE);
    let name = "layer";
    // Seeded (the tests run one at a time), and 40 passes: one run in 2^39 draws one kind only.
    <Autodiff<Flex> as burn::tensor::backend::Backend>::seed(&Default::default(), 21);
    let mut norm = trained_with(&f, name, &LoraConfig::new(4).with_module_dropout(0.5).with_rank_dropout(0.5));
    assert_eq!((norm.adapter().module_dropout, norm.adapter().rank_dropout), (0.5, 0.0));
    let (trained_y, base_y) = (column(&f, &format!("{name}.y")).inner(), base_norm(&f, name).forward(&f, name).inner());
    let (mut kept, mut dropped) = (0, 0);
    for _ in 0..40 {
        let y = norm.forward(&f, name).inner();
        if rel(y.clone(), trained_y.clone()) < 2e-5 {
            kept += 1;
        } else {
            assert!(rel(y, base_y.clone()) < 1e-6, "a pass is either the trained norm or the base one");
            dropped += 1;
        }
    }
    assert!(kept > 0 && dropped > 0, "kept {kept}, dropped {dropped}");
}

/// On a bf16 base the module's `γ'` and `β'` are f32 (the base's values widened): LyCORIS'
/// output within bf16's rounding of the base.
#[test]
fn bf16_base_matches() {
    use burn::tensor::FloatDType;
    let f = Fixture::open(FILE);
    for name in ["group", "layer_strength"] {
        let norm = match trained(&f, name) {
            Norm::Group(n) => Norm::Group(lora_core::precision::cast_frozen(n, FloatDType::BF16)),
            Norm::Layer(n) => Norm::Layer(lora_core::precision::cast_frozen(n, FloatDType::BF16)),
        };
        let (gamma, _) = norm.params();
        assert_eq!(gamma.dtype(), burn::tensor::DType::F32, "{name}");
        let err = rel(norm.forward(&f, name).inner(), column(&f, &format!("{name}.y")).inner());
        assert!(err < 2e-2, "{name}: bf16 base, relative error {err}");
    }
}

/// Tensors that fit no norm or LyCORIS' shapes, `b_norm` without `w_norm`, mixed with
/// another algorithm's tensors, a shift's difference for a norm without a shift, a norm
/// module on a linear layer or a LoRA on a norm: errors naming the module. Nor is a norm
/// module combined, resized or written as PEFT.
#[test]
fn bad_tensors_and_layers() {
    let f = Fixture::open(FILE);
    let mut index = ModuleIndex::new();
    index.add(Component::Unet, ["layer"]).unwrap();
    let read = common::read_module;
    let (w, b) = (f.host("group.w_norm").clone(), f.host("group.b_norm").clone());
    let square = HostTensor::new(vec![2, 3], w.data.clone()).unwrap();
    let short = HostTensor::new(vec![4], vec![0.1; 4]).unwrap();
    let hada = HostTensor::new(vec![6, 2], vec![0.1; 12]).unwrap();
    for (tensors, says) in [
        (vec![("b_norm", &b)], "without its `w_norm`"),
        (vec![("w_norm", &square)], "one value per channel"),
        (vec![("w_norm", &w), ("b_norm", &short)], "one per channel"),
        (vec![("w_norm", &w), ("hada_w1_a", &hada)], "mixes"),
    ] {
        let e = read(&tensors).unwrap_err().to_string();
        assert!(e.contains("layer") && e.contains(says), "{says}: {e}");
    }
    // Six channels on the eight of a LayerNorm; a shift's difference on a norm without one.
    let set = read(&[("w_norm", &w), ("b_norm", &b)]).unwrap();
    let mut layer = base_norm(&f, "layer");
    let e = attach_adapters(&mut layer, &set, 1.0, &Default::default()).unwrap_err().to_string();
    assert!(e.contains("6 channels") && e.contains('8'), "{e}");
    let no_shift = LayerNormConfig::new(6).with_bias(false).init::<AB>(&Default::default());
    let mut no_shift = Norm::Layer(LoraLayerNorm::new(no_shift));
    let e = attach_adapters(&mut no_shift, &set, 1.0, &Default::default()).unwrap_err().to_string();
    assert!(e.contains("b_norm") && e.contains("has none"), "{e}");
    let only_w = read(&[("w_norm", &w)]).unwrap();
    attach_adapters(&mut no_shift, &only_w, 1.0, &Default::default()).unwrap();
    // On a linear layer (six outputs, as many as the module's channels): refused.
    let mut linear = common::layer::One(common::layer::Layer::Linear(lora_core::LoraLinear::new(burn::nn::LinearConfig::new(6, 6).init(&Default::default()))));
    let e = attach_adapters(&mut linear, &set, 1.0, &Default::default()).unwrap_err().to_string();
    assert!(e.contains("GroupNorm or LayerNorm"), "{e}");
    let e = linear.0.site().attach_new(&LoraConfig::new(1).with_algo(Algo::Norm), &Default::default()).unwrap_err().to_string();
    assert!(e.contains("GroupNorm or LayerNorm"), "{e}");
    // A LoRA on a norm.
    let mut lora_index = ModuleIndex::new();
    lora_index.add(Component::Unet, ["layer"]).unwrap();
    let lora = common::random_weights(&mut common::Rng::new(1), 6, 6, 2, None, 2.0);
    let mut lora_set = AdapterSet::new();
    lora_set.insert(lora_core::AdapterKey::new(Component::Unet, "layer"), lora).unwrap();
    let mut group = base_norm(&f, "group");
    let e = attach_adapters(&mut group, &lora_set, 1.0, &Default::default()).unwrap_err().to_string();
    assert!(e.contains("norm") && e.contains("LoRA"), "{e}");

    let (key, w) = set.iter().next().unwrap();
    assert!(lora_core::resize::resize_adapter(w, 1, lora_core::resize::RankRule::Fixed, "k").unwrap_err().to_string().contains("norm"));
    assert!(set.to_bytes(AdapterFormat::Peft, SaveDtype::F32).unwrap_err().to_string().contains("norm"));
    assert!(lora_core::LoraWeights::combine(&[(w, 0.5)], &key.to_string()).unwrap_err().to_string().contains("norm"));
    assert!("norm".parse::<Algo>().unwrap_err().contains("train_norm"));
}

/// A LoRA file with norm modules (`train_norm` beside a LoRA) resizes: the LoRAs to the new
/// rank, the norm modules (which have no rank) as they were; merged into a LoRA, refused.
#[test]
fn resizing_keeps_norm_modules() {
    let f = Fixture::open(FILE);
    let mut set = AdapterSet::new();
    let norm = lora_core::norm::weights(f.host("group.w_norm").clone(), Some(f.host("group.b_norm").clone()), "n").unwrap();
    let (norm_key, lora_key) = (lora_core::AdapterKey::new(Component::Unet, "norm"), lora_core::AdapterKey::new(Component::Unet, "linear"));
    set.insert(norm_key.clone(), norm.clone()).unwrap();
    set.insert(lora_key.clone(), common::random_weights(&mut common::Rng::new(2), 6, 6, 4, None, 4.0)).unwrap();
    let settings = lora_core::resize::ResizeSettings { rank: 2, conv_rank: 2, rule: lora_core::resize::RankRule::Fixed };
    let resized = lora_core::resize::resize_set(&set, &settings).unwrap();
    assert_eq!(resized.set.get(&norm_key), Some(&norm), "the norm module as it was");
    assert_eq!(resized.set.get(&lora_key).unwrap().rank(), 2);
    assert_eq!(resized.modules.len(), 1, "only the LoRA was resized");
    let cut = lora_core::resize::truncate_set(&set, 2, 2).unwrap();
    assert_eq!(cut.get(&norm_key), Some(&norm));
    let e = lora_core::resize::merge_sets(&[(&set, 1.0)], None).unwrap_err().to_string();
    assert!(e.contains("norm"), "{e}");
}
