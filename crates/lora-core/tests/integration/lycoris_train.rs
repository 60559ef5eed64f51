//! Trainable LyCORIS LoHa and LoKr adapters against the `lycoris-lora` package's modules
//! (fixtures from `xtask/fixtures/lora_core_lycoris_train.py`): the factors a config
//! creates (names, shapes, scale), the layer's output and the factors' gradients, merging,
//! and a write and read in the kohya / LyCORIS layout; with DoRA (LyCORIS'
//! `weight_decompose`) and `use_scalar` against `xtask/fixtures/lora_core_lycoris_options.py`.

use crate::common;

use std::path::Path;

use burn::backend::{Autodiff, Flex};
use burn::module::Param;
use burn::nn::conv::Conv2dConfig;
use burn::nn::LinearConfig;
use burn::tensor::{Tensor, TensorData};
use lora_core::sites::{attach_adapters, collect_adapters};
use lora_core::{Algo, AdapterSet, LoraConfig, LoraConv2d, LoraLinear, LoraSiteMut, ModuleIndex, ReadOptions};

use common::layer::{Layer, One};
use common::Fixture;

type B = Autodiff<Flex>;

fn fixture() -> Fixture {
    Fixture::open("lycoris_train.safetensors")
}

/// One case's settings, as the script wrote them.
#[derive(serde::Deserialize)]
struct Case {
    algo: String,
    layer: Vec<serde_json::Value>,
    rank: usize,
    alpha: f32,
    factor: i64,
    decompose_both: bool,
    full_matrix: bool,
    unbalanced_factorization: bool,
    #[serde(default)]
    use_tucker: bool,
    #[serde(default)]
    use_scalar: bool,
    names: Vec<String>,
}

const CASES: [&str; 14] = [
    "lin_loha",
    "conv_loha",
    "lin_lokr",
    "lin_lokr_both",
    "conv_lokr",
    "conv_lokr_full",
    "lin_lokr_full",
    "lin_lokr_full_matrix",
    "conv_lokr_unbalanced",
    "lin_lokr_unbalanced_full",
    "conv_loha_tucker",
    "conv_lokr_tucker",
    "conv_lokr_tucker_both",
    "conv1_loha_tucker",
];

/// The fixture's cases and factors.
trait Cases {
    fn case_of(&self, name: &str) -> Case;
    fn matrix(&self, key: &str) -> Tensor<B, 2>;
    fn flat(&self, key: &str) -> Tensor<B, 1>;
}

impl Cases for Fixture {
    fn case_of(&self, name: &str) -> Case {
        self.case(name)
    }

    /// A tensor flattened to `[rows, rest]`, as the adapters store factors.
    fn matrix(&self, key: &str) -> Tensor<B, 2> {
        let t = self.host(key);
        let rows = t.shape[0];
        Tensor::from_data(TensorData::new(t.data.clone(), [rows, t.data.len() / rows]), &Default::default())
    }

    /// A tensor flattened to one dimension (a `dora_scale` `[out, 1, ..]` as a magnitude).
    fn flat(&self, key: &str) -> Tensor<B, 1> {
        let t = self.host(key);
        Tensor::from_data(TensorData::new(t.data.clone(), [t.data.len()]), &Default::default())
    }
}

impl Case {
    fn config(&self) -> LoraConfig {
        let algo = if self.algo == "loha" { Algo::Loha } else { Algo::Lokr };
        LoraConfig::new(self.rank).with_alpha(self.alpha).with_algo(algo).with_lokr_factor(self.factor)
            .with_lokr_decompose_both(self.decompose_both)
            .with_lokr_full_matrix(self.full_matrix)
            .with_lokr_unbalanced_factorization(self.unbalanced_factorization)
            .with_use_tucker(self.use_tucker)
            .with_use_scalar(self.use_scalar)
    }

    fn is_conv(&self) -> bool {
        self.layer[0] == "conv"
    }

    fn dims(&self) -> Vec<usize> {
        self.layer[1..].iter().map(|v| v.as_u64().unwrap() as usize).collect()
    }
}

/// Max |a − b| over max |b|.
fn rel<const D: usize>(a: Tensor<Flex, D>, b: Tensor<Flex, D>) -> f32 {
    let peak: f32 = b.clone().abs().max().into_scalar();
    let err: f32 = (a - b).abs().max().into_scalar();
    err / peak.max(1e-12)
}

/// The case's base layer with the fixture's weights.
fn base_layer(f: &Fixture, name: &str) -> Layer {
    let case = f.case_of(name);
    Layer::from_fixture(f, name, &case.dims(), case.is_conv())
}

/// The fixture's factor values put into the case's freshly attached adapter.
fn trained_layer(f: &Fixture, name: &str) -> Layer {
    let case = f.case_of(name);
    let mut layer = base_layer(f, name);
    layer.site().attach_new(&case.config(), &Default::default()).unwrap();
    let adapter = layer.lycoris();
    for (i, n) in case.names.iter().enumerate() {
        adapter.factors[i] = Param::from_tensor(f.matrix(&format!("{name}.{n}")));
    }
    layer
}

/// A config makes LyCORIS' factors (names and shapes, the kernel flattened) and scale,
/// and the layer computes LyCORIS' output and factor gradients.
#[test]
fn output_and_gradients_match_lycoris() {
    let f = fixture();
    let device = Default::default();
    for name in CASES {
        let case = f.case_of(name);
        let mut layer = base_layer(&f, name);
        layer.site().attach_new(&case.config(), &device).unwrap();
        let adapter = layer.lycoris();
        let names: Vec<&str> = adapter.names().to_vec();
        assert_eq!(names, case.names, "{name}: factor names");
        for (i, n) in case.names.iter().enumerate() {
            let want = f.matrix(&format!("{name}.{n}")).dims();
            assert_eq!(adapter.factors[i].dims(), want, "{name}: shape of {n}");
        }
        let scale = f.host(&format!("{name}.scale")).data[0];
        assert!((adapter.scale - scale).abs() < 1e-6, "{name}: scale {} vs LyCORIS' {scale}", adapter.scale);

        let layer = trained_layer(&f, name);
        let y = layer.forward(&f, name);
        let want_y = f.matrix(&format!("{name}.y"));
        let err = rel(y.clone().inner(), want_y.inner());
        assert!(err < 1e-5, "{name}: output relative error {err}");
        let g = f.matrix(&format!("{name}.g"));
        let grads = (y * g).sum().backward();
        let adapter = layer.lycoris_ref();
        for (i, n) in case.names.iter().enumerate() {
            let got = adapter.factors[i].grad(&grads).unwrap_or_else(|| panic!("{name}: a gradient for {n}"));
            let err = rel(got, f.matrix(&format!("{name}.grad.{n}")).inner());
            assert!(err < 1e-4, "{name}: gradient of {n}, relative error {err}");
        }
        let base_grad = match &layer {
            Layer::Linear(l) => l.base.weight.grad(&grads).is_some(),
            Layer::Conv(c) => c.base.weight.grad(&grads).is_some(),
        };
        assert!(!base_grad, "{name}: the base weight is frozen");
    }
}

/// Merged into the weight, an adapter gives the output it gives attached; unmerging
/// restores the base weight; a multiplier scales the update.
#[test]
fn merge_unmerge_and_multiplier() {
    let f = fixture();
    for name in CASES {
        let mut layer = trained_layer(&f, name);
        let base = layer_weight(&layer);
        let attached = layer.forward(&f, name).inner();
        set_merged(&mut layer, true);
        let err = rel(layer.forward(&f, name).inner(), attached.clone());
        assert!(err < 1e-5, "{name}: merged vs attached, relative error {err}");
        set_merged(&mut layer, false);
        assert!(rel(layer_weight(&layer), base.clone()) < 1e-6, "{name}: unmerged");
        // At multiplier 0.5 the update is half: y(0.5) = (y(1) + y(0)) / 2 (linear in ΔW).
        let plain = {
            let mut l = base_layer(&f, name);
            l.site().detach();
            l.forward(&f, name).inner()
        };
        layer.site().set_multiplier(0.5);
        let half = layer.forward(&f, name).inner();
        let err = rel(half, (attached + plain).div_scalar(2.0));
        assert!(err < 1e-5, "{name}: multiplier 0.5, relative error {err}");
    }
}

fn layer_weight(layer: &Layer) -> Tensor<Flex, 2> {
    match layer {
        Layer::Linear(l) => l.base.weight.val().inner(),
        Layer::Conv(c) => c.base.weight.val().inner().flatten(1, 3),
    }
}

fn set_merged(layer: &mut Layer, merged: bool) {
    match (layer, merged) {
        (Layer::Linear(l), true) => l.merge_in_place(),
        (Layer::Linear(l), false) => l.unmerge_in_place(),
        (Layer::Conv(c), true) => c.merge_in_place(),
        (Layer::Conv(c), false) => c.unmerge_in_place(),
    }
}

/// Saved in the kohya layout, an adapter is written as LyCORIS writes it (its factors, a
/// full conv `lokr_w2` 4-d, `alpha`, and `lycoris.kohya` with the algorithm in the
/// metadata); read back and attached to a fresh layer, it is the same trainable adapter.
#[test]
fn written_as_lycoris_and_read_back() {
    let f = fixture();
    let device = Default::default();
    for name in CASES {
        let case = f.case_of(name);
        let mut trained = One(trained_layer(&f, name));
        let (bytes, meta) = common::written_as_in_fixture(&mut trained, &f, name, &case.names);
        assert_eq!(meta["ss_network_module"], "lycoris.kohya", "{name}");
        assert!(meta["ss_network_args"].contains(&format!("\"algo\":\"{}\"", case.algo)), "{name}: {}", meta["ss_network_args"]);
        let tucker = case.names.iter().any(|n| n.contains("_t"));
        assert_eq!(meta["ss_network_args"].contains("\"use_tucker\":\"True\""), tucker, "{name}: {}", meta["ss_network_args"]);

        let mut index = ModuleIndex::new();
        lora_core::sites::add_to_index(&mut index, &mut trained).unwrap();
        let (read, _) = AdapterSet::from_bytes(&bytes, Path::new("x"), &index, ReadOptions::default()).unwrap();
        let mut fresh = One(base_layer(&f, name));
        attach_adapters(&mut fresh, &read, 1.0, &device).unwrap();
        let names: Vec<&str> = fresh.0.lycoris().names().to_vec();
        assert_eq!(names, case.names, "{name}: read back as its factors");
        let err = rel(fresh.0.forward(&f, name).inner(), trained.0.forward(&f, name).inner());
        assert!(err < 1e-6, "{name}: read back, relative error {err}");
        // Its LoRA form (for merging and the PEFT layout) has the same update.
        let w = read.iter().next().unwrap().1;
        let mut lora = w.clone();
        lora.lycoris = None;
        let mut as_lora = One(base_layer(&f, name));
        let mut only = AdapterSet::new();
        only.insert(read.iter().next().unwrap().0.clone(), lora).unwrap();
        attach_adapters(&mut as_lora, &only, 1.0, &device).unwrap();
        let err = rel(as_lora.0.forward(&f, name).inner(), trained.0.forward(&f, name).inner());
        assert!(err < 1e-5, "{name}: as a LoRA, relative error {err}");
    }
}

/// A fresh Tucker LoHa / LoKr starts as LyCORIS' does (no update; LoHa's cores and
/// `hada_w1_a` from N(0, 0.1²), `hada_w1_b` / `hada_w2_b` from N(0, 1); LoKr's core
/// Kaiming-uniform); its weights do not load into an adapter without Tucker halves, and a
/// core that does not fit its layer (another kernel, not square) is an error naming it.
#[test]
fn tucker_adapters_start_as_lycoris_and_refuse_what_does_not_fit() {
    use lora_core::LycorisAdapter;
    let device = Default::default();
    let host = |t: Tensor<B, 2>| t.into_data().to_vec::<f32>().unwrap();
    let std = |v: &[f32]| (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
    let config = |algo: Algo| LoraConfig::new(if algo == Algo::Loha { 4 } else { 2 }).with_algo(algo).with_use_tucker(true);
    let shape = [32, 16, 3, 3];
    let loha = LycorisAdapter::<B>::new(&config(Algo::Loha), shape, true, &device).unwrap();
    assert!(host(loha.delta(1.0)).iter().all(|v| *v == 0.0), "a fresh LoHa changes nothing");
    for (name, want) in [("hada_t1", 0.1), ("hada_t2", 0.1), ("hada_w1_a", 0.1), ("hada_w1_b", 1.0), ("hada_w2_b", 1.0)] {
        let i = loha.names().iter().position(|n| *n == name).unwrap();
        let s = std(&host(loha.factors[i].val()));
        assert!((s - want).abs() < 0.35 * want, "{name}: std {s}, LyCORIS' {want}");
    }
    let lokr = LycorisAdapter::<B>::new(&config(Algo::Lokr), shape, true, &device).unwrap();
    assert_eq!(lokr.names(), ["lokr_w1", "lokr_t2", "lokr_w2_a", "lokr_w2_b"]);
    assert!(host(lokr.delta(1.0)).iter().all(|v| *v == 0.0), "a fresh LoKr changes nothing");
    let core = host(lokr.factors[1].val());
    let bound = 1.0 / (2.0f32 * 9.0).sqrt();
    assert!(core.iter().all(|v| v.abs() <= bound) && core.iter().any(|v| v.abs() > bound / 2.0), "Kaiming-uniform with fan-in r·kh·kw");

    // Tucker weights into an adapter without Tucker halves: the hint names use_tucker.
    let mut plain = One(Layer::Conv(LoraConv2d::new(Conv2dConfig::new([16, 32], [3, 3]).init::<B>(&device))));
    plain.0.site().attach_new(&LoraConfig::new(4).with_algo(Algo::Loha), &device).unwrap();
    let mut tucker = One(Layer::Conv(LoraConv2d::new(Conv2dConfig::new([16, 32], [3, 3]).init::<B>(&device))));
    tucker.0.site().attach_new(&config(Algo::Loha), &device).unwrap();
    let mut set = AdapterSet::new();
    collect_adapters(&mut tucker, &mut set).unwrap();
    let err = lora_core::sites::load_adapter_weights(&mut plain, &set, &device).map(|_| ()).unwrap_err().to_string();
    assert!(err.contains("use_tucker") && err.contains("layer"), "{err}");

    let weights = loha.to_lycoris_weights().unwrap();
    let with_core = |t: lora_core::HostTensor| {
        let mut w = weights.clone();
        w.tensors.iter_mut().filter(|(n, _)| n == "hada_t1").for_each(|(_, v)| *v = t.clone());
        LycorisAdapter::<B>::from_weights(&w, shape, true, "layer", &device).map(|_| ()).unwrap_err().to_string()
    };
    let err = with_core(lora_core::HostTensor::new(vec![4, 4, 1, 9], vec![0.1; 144]).unwrap());
    assert!(err.contains("hada_t1") && err.contains("3x3") && err.contains("layer"), "{err}");
    let err = with_core(lora_core::HostTensor::new(vec![4, 2, 3, 3], vec![0.1; 72]).unwrap());
    assert!(err.contains("hada_t1") && err.contains("layer"), "{err}");
    assert!(LycorisAdapter::<B>::from_weights(&weights, shape, true, "layer", &device).is_ok());
}

/// LyCORIS' `factorization` for dimensions of Stable Diffusion's layers and others.
#[test]
fn factorization_matches_lycoris() {
    let f = fixture();
    let table = f.host("factorization");
    for row in table.data.chunks(4) {
        let [dim, factor, m, n] = [row[0], row[1], row[2], row[3]].map(|v| v as i64);
        assert_eq!(lora_core::lycoris::factorization(dim as usize, factor), (m as usize, n as usize), "factorization({dim}, {factor})");
    }
}

/// Settings LoHa and LoKr do not train are config errors, and loading LoRA weights into a
/// LyCORIS adapter (or another algorithm's) is an error naming the adapter.
#[test]
fn unsupported_settings_and_mismatched_weights_are_errors() {
    let device = Default::default();
    let base = || LoraLinear::new(LinearConfig::new(12, 10).init::<B>(&device));
    for (config, expect) in [
        (LoraConfig::new(2).with_algo(Algo::Loha).with_dropout(0.1), "dropout"),
        (LoraConfig::new(2).with_algo(Algo::Lokr).with_network_dropout(0.1), "network_dropout"),
        (LoraConfig::new(2).with_algo(Algo::Lokr).with_lokr_factor(0), "lokr_factor"),
    ] {
        let err = base().attach_new(&config, &device).unwrap_err().to_string();
        assert!(err.contains(expect), "{expect}: {err}");
    }
    // A rank above min(in, out) is fine for LoHa (its update's rank is up to r²); above
    // max(in, out) it is refused, as for LoRA, but LoKr reads it as "full halves".
    base().attach_new(&LoraConfig::new(12).with_algo(Algo::Loha), &device).unwrap();
    let err = base().attach_new(&LoraConfig::new(13).with_algo(Algo::Loha), &device).unwrap_err().to_string();
    assert!(err.contains("rank 13"), "{err}");
    base().attach_new(&LoraConfig::new(1 << 40).with_algo(Algo::Lokr), &device).unwrap();

    let mut loha = One(Layer::Linear(base()));
    loha.0.site().attach_new(&LoraConfig::new(2).with_algo(Algo::Loha), &device).unwrap();
    let mut lora = One(Layer::Linear(base()));
    lora.0.site().attach_new(&LoraConfig::new(2), &device).unwrap();
    let mut lokr = One(Layer::Linear(base()));
    lokr.0.site().attach_new(&LoraConfig::new(2).with_algo(Algo::Lokr), &device).unwrap();
    let sets: Vec<AdapterSet> = [&mut loha, &mut lora, &mut lokr]
        .into_iter()
        .map(|m| {
            let mut set = AdapterSet::new();
            collect_adapters(m, &mut set).unwrap();
            set
        })
        .collect();
    let load = |model: &mut One, set: &AdapterSet| lora_core::sites::load_adapter_weights(model, set, &device).map(|_| ()).map_err(|e| e.to_string());
    assert!(load(&mut loha, &sets[0]).is_ok());
    for (model, set, expect) in [(&mut loha, &sets[1], "the weights are a LoRA, the attached adapter is a loha"), (&mut lora, &sets[0], "the weights are a loha")] {
        let err = load(model, set).unwrap_err();
        assert!(err.contains(expect) && err.contains("layer"), "{expect}: {err}");
    }
    let err = load(&mut loha, &sets[2]).unwrap_err();
    assert!(err.contains("lokr") && err.contains("layer"), "{err}");
    // Another rank: the factors' shapes differ.
    let mut loha4 = One(Layer::Linear(base()));
    loha4.0.site().attach_new(&LoraConfig::new(4).with_algo(Algo::Loha), &device).unwrap();
    let err = load(&mut loha4, &sets[0]).unwrap_err();
    assert!(err.contains("factors"), "{err}");
}

/// With a bf16 base, a small update keeps its own precision (as LyCORIS computes it, the
/// base's product plus the update's): an update below bf16's step at the weights' size,
/// summed over a large fan-in, changes the output as it does in f32. (`W + ΔW` in bf16
/// would leave `W` unchanged.)
#[test]
fn a_small_update_survives_a_bf16_base() {
    use burn::tensor::FloatDType;
    let device = Default::default();
    // A LoHa of rank 1 with every factor 1 but `hada_w2_b = c`: ΔW = scale · c everywhere.
    let set_update = |adapter: &mut lora_core::LycorisAdapter<B>, c: f32| {
        for (name, p) in adapter.names().to_vec().iter().zip(adapter.factors.iter_mut()) {
            let value = if *name == "hada_w2_b" { c } else { 1.0 };
            *p = p.clone().map(|t| t.ones_like().mul_scalar(value).require_grad());
        }
    };
    let config = LoraConfig::new(1).with_algo(Algo::Loha);
    let c = 2e-5;
    // Fixed weights of a trained layer's size (about 1/sqrt(fan-in)) and a bias that puts
    // the outputs near 0.25: the bf16 sum's rounding, relative to the update's change, is
    // the same in every run (random weights made it vary with the outputs' size).
    let weights = |n: usize| Tensor::<B, 1>::from_data(TensorData::new((0..n).map(|i| 0.02 * (0.7 * i as f32).sin()).collect::<Vec<f32>>(), [n]), &device);
    let bias = || Some(Param::from_tensor(Tensor::<B, 1>::full([4], 0.25, &device)));
    let mut base_linear = LinearConfig::new(2048, 4).init::<B>(&device);
    base_linear.weight = Param::from_tensor(weights(2048 * 4).reshape([2048, 4]));
    base_linear.bias = bias();
    let mut base_conv = Conv2dConfig::new([256, 4], [3, 3]).init::<B>(&device);
    (base_conv.weight, base_conv.bias) = (Param::from_tensor(weights(4 * 256 * 9).reshape([4, 256, 3, 3])), bias());
    let linear = |bf16: bool, with: bool| {
        let mut l = LoraLinear::new(base_linear.clone());
        l.attach_new(&config, &device).unwrap();
        set_update(l.lycoris.as_mut().unwrap(), if with { c } else { 0.0 });
        let x = Tensor::<B, 2>::ones([1, 2048], &device);
        match bf16 {
            true => lora_core::precision::cast_frozen(l, FloatDType::BF16).forward(x.cast(FloatDType::BF16)).cast(FloatDType::F32),
            false => l.forward(x),
        }
        .inner()
    };
    let conv = |bf16: bool, with: bool| {
        let mut l = LoraConv2d::new(base_conv.clone());
        l.attach_new(&config, &device).unwrap();
        set_update(l.lycoris.as_mut().unwrap(), if with { c } else { 0.0 });
        let x = Tensor::<B, 4>::ones([1, 256, 3, 3], &device);
        match bf16 {
            true => lora_core::precision::cast_frozen(l, FloatDType::BF16).forward(x.cast(FloatDType::BF16)).cast(FloatDType::F32),
            false => l.forward(x),
        }
        .inner()
        .flatten(1, 3)
    };
    for (what, run) in [("linear", &linear as &dyn Fn(bool, bool) -> Tensor<Flex, 2>), ("conv", &conv)] {
        let want = run(false, true) - run(false, false);
        let got = run(true, true) - run(true, false);
        let err = rel(got, want.clone());
        assert!(err < 0.05, "{what}: the update's change to the output, bf16 vs f32: relative error {err} ({want})");
    }
}

/// The layers' other entry points with a LoHa / LoKr attached: a residual or an addend is
/// added once, multiplier 0 is the base layer, and a bf16 base gives f32's output (the
/// bias once, in the two-product path).
#[test]
fn residuals_addends_multiplier_zero_and_bf16_outputs() {
    use burn::tensor::{Distribution, FloatDType};
    let f = fixture();
    let device = Default::default();
    let close = |a: Tensor<B, 2>, b: Tensor<B, 2>, tol: f32, what: &str| {
        let err = rel(a.cast(FloatDType::F32).inner(), b.cast(FloatDType::F32).inner());
        assert!(err < tol, "{what}: relative error {err}");
    };
    for name in CASES {
        let layer = trained_layer(&f, name);
        let plain = {
            let mut l = base_layer(&f, name);
            l.site().detach();
            l
        };
        match (&layer, &plain) {
            (Layer::Linear(l), Layer::Linear(p)) => {
                let x = f.tensor::<B, 2>(&format!("{name}.x"));
                let r = Tensor::<B, 2>::random(l.forward(x.clone()).dims(), Distribution::Normal(0.0, 1.0), &device);
                close(l.forward_residual(x.clone(), r.clone()), l.forward(x.clone()) + r, 1e-6, &format!("{name}: residual"));
                let mut zero = l.clone();
                zero.set_multiplier(0.0);
                close(zero.forward(x.clone()), p.forward(x.clone()), 1e-6, &format!("{name}: multiplier 0"));
                let half = lora_core::precision::cast_frozen(l.clone(), FloatDType::BF16);
                close(half.forward(x.clone().cast(FloatDType::BF16)), l.forward(x), 2e-2, &format!("{name}: bf16 base"));
            }
            (Layer::Conv(c), Layer::Conv(p)) => {
                let x = f.tensor::<B, 4>(&format!("{name}.x"));
                let y = c.forward(x.clone());
                let [n, ch, h, w] = y.dims();
                let a = Tensor::<B, 4>::random([n, ch, h, w], Distribution::Normal(0.0, 1.0), &device);
                let flat = |t: Tensor<B, 4>| t.flatten::<2>(1, 3);
                close(flat(c.forward_add(x.clone(), a.clone())), flat(y.clone() + a), 1e-6, &format!("{name}: addend"));
                let per = Tensor::<B, 2>::random([n, ch], Distribution::Normal(0.0, 1.0), &device);
                close(flat(c.forward_add_channels(x.clone(), per.clone())), flat(y.clone() + per.clone().reshape([n, ch, 1, 1])), 1e-6, &format!("{name}: channels"));
                let mut zero = c.clone();
                zero.set_multiplier(0.0);
                close(flat(zero.forward(x.clone())), flat(p.forward(x.clone())), 1e-6, &format!("{name}: multiplier 0"));
                let half = lora_core::precision::cast_frozen(c.clone(), FloatDType::BF16);
                let want = flat(y + per.clone().reshape([n, ch, 1, 1]));
                close(flat(half.forward_add_channels(x.cast(FloatDType::BF16), per.cast(FloatDType::BF16))), want, 2e-2, &format!("{name}: bf16 base"));
            }
            _ => unreachable!(),
        }
    }
}

const DORA_CASES: [&str; 5] = ["lin_loha", "conv_loha", "lin_lokr", "conv_lokr", "conv_loha_tucker"];

/// A DoRA case's layer with a fresh DoRA adapter whose factors and magnitude are then the
/// fixture's.
fn dora_layer(f: &Fixture, name: &str) -> Layer {
    let case = f.case_of(name);
    let mut layer = base_layer(f, name);
    layer.site().attach_new(&case.config().with_dora(true), &Default::default()).unwrap();
    let adapter = layer.lycoris();
    for (i, n) in case.names.iter().filter(|n| *n != "dora_scale").enumerate() {
        adapter.factors[i] = Param::from_tensor(f.matrix(&format!("{name}.{n}")));
    }
    adapter.magnitude = Some(Param::from_tensor(f.flat(&format!("{name}.dora_scale"))));
    layer
}

/// LyCORIS' LoHa and LoKr with `weight_decompose` (kohya's `dora_wd`), against its modules
/// (`xtask/fixtures/lora_core_lycoris_options.py`): the magnitude starts at the base weight's
/// norms; the layer computes LyCORIS' output and the gradients of every factor and of the
/// magnitude (through the norm of `W + ΔW`); merged, it gives that output and unmerges to
/// the base weight exactly; written, it carries `dora_scale` in LyCORIS' layout with
/// `dora_wd` in the metadata and reads back as the same adapter, which does not load into
/// one without DoRA.
#[test]
fn dora_matches_lycoris() {
    let f = Fixture::open("lycoris_options.safetensors");
    let device = Default::default();
    for name in DORA_CASES {
        let case = f.case_of(name);
        let mut fresh = base_layer(&f, name);
        fresh.site().attach_new(&case.config().with_dora(true), &device).unwrap();
        let m = fresh.lycoris().magnitude.as_ref().expect("a magnitude").val().inner();
        let err = rel(m, f.flat(&format!("{name}.init.dora_scale")).inner());
        assert!(err < 1e-5, "{name}: initial magnitude, relative error {err}");

        let layer = dora_layer(&f, name);
        let y = layer.forward(&f, name);
        let err = rel(y.clone().inner(), f.matrix(&format!("{name}.y")).inner());
        assert!(err < 1e-5, "{name}: output relative error {err}");
        let grads = (y * f.matrix(&format!("{name}.g"))).sum().backward();
        let adapter = layer.lycoris_ref();
        for (i, n) in case.names.iter().filter(|n| *n != "dora_scale").enumerate() {
            let got = adapter.factors[i].grad(&grads).unwrap_or_else(|| panic!("{name}: a gradient for {n}"));
            let err = rel(got, f.matrix(&format!("{name}.grad.{n}")).inner());
            assert!(err < 1e-4, "{name}: gradient of {n}, relative error {err}");
        }
        let got = adapter.magnitude.as_ref().unwrap().grad(&grads).expect("a gradient for the magnitude");
        let err = rel(got, f.flat(&format!("{name}.grad.dora_scale")).inner());
        assert!(err < 1e-4, "{name}: gradient of dora_scale, relative error {err}");

        let mut merged = dora_layer(&f, name);
        let base = layer_weight(&merged);
        let attached = merged.forward(&f, name).inner();
        set_merged(&mut merged, true);
        let err = rel(merged.forward(&f, name).inner(), attached.clone());
        assert!(err < 1e-5, "{name}: merged vs attached, relative error {err}");
        set_merged(&mut merged, false);
        assert_eq!(layer_weight(&merged).into_data(), base.into_data(), "{name}: unmerged exactly");

        let mut trained = One(dora_layer(&f, name));
        let mut set = AdapterSet::new();
        collect_adapters(&mut trained, &mut set).unwrap();
        let bytes = set.to_bytes(lora_core::AdapterFormat::Kohya, lora_core::SaveDtype::F32).unwrap();
        let (st, meta) = lora_core::tensor_io::parse(&bytes, Path::new("x")).unwrap();
        let shape = st.tensor("lora_unet_layer.dora_scale").unwrap().shape().to_vec();
        assert_eq!(shape, f.host(&format!("{name}.dora_scale")).shape, "{name}: dora_scale as LyCORIS stores it");
        let args = &meta["ss_network_args"];
        assert!(args.contains("\"dora_wd\":\"True\"") && args.contains(&format!("\"algo\":\"{}\"", case.algo)), "{name}: {args}");
        let mut index = ModuleIndex::new();
        lora_core::sites::add_to_index(&mut index, &mut trained).unwrap();
        let (read, _) = AdapterSet::from_bytes(&bytes, Path::new("x"), &index, ReadOptions::default()).unwrap();
        let mut back = One(base_layer(&f, name));
        attach_adapters(&mut back, &read, 1.0, &device).unwrap();
        assert!(back.0.lycoris().is_dora(), "{name}: read back with its magnitude");
        let err = rel(back.0.forward(&f, name).inner(), attached);
        assert!(err < 1e-6, "{name}: read back, relative error {err}");
        let mut plain = One(base_layer(&f, name));
        plain.0.site().attach_new(&case.config(), &device).unwrap();
        let err = lora_core::sites::load_adapter_weights(&mut plain, &read, &device).map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("lora.dora") && err.contains("layer"), "{name}: {err}");
    }
}

/// LyCORIS' rank dropout on LoHa / LoKr while training: each pass drops whole rows of `ΔW`
/// (one per output), about `p` of them, and with `rank_dropout_scale` divides the kept ones
/// by the share kept; a backend that does not differentiate drops nothing.
#[test]
fn lycoris_rank_dropout_drops_rows_of_the_update() {
    use burn::module::AutodiffModule;
    let f = fixture();
    let device = Default::default();
    // The share of dropped rows is a sample: seeded, as the tests run one at a time.
    <B as burn::tensor::backend::Backend>::seed(&device, 17);
    for name in ["lin_loha", "lin_lokr"] {
        for scale in [false, true] {
            let Layer::Linear(mut layer) = trained_layer(&f, name) else { panic!("a linear case") };
            let (d_in, d_out) = (layer.base.weight.dims()[0], layer.base.weight.dims()[1]);
            LoraSiteMut::Linear(&mut layer).set_dropout(&LoraConfig::new(1).with_rank_dropout(0.5).with_rank_dropout_scale(scale));
            // On the identity, the output less the base's is `ΔW` itself, `[in, out]`.
            let eye = Tensor::<B, 2>::from_data(TensorData::new((0..d_in * d_in).map(|i| f32::from(i % (d_in + 1) == 0)).collect::<Vec<_>>(), [d_in, d_in]), &device);
            let delta: Vec<f32> = layer.lycoris.as_ref().unwrap().delta_weight::<2>(1.0).into_data().to_vec().unwrap();
            let base: Vec<f32> = lora_core::LoraLinear::new(layer.base.clone()).forward(eye.clone()).into_data().to_vec().unwrap();
            let columns = |y: Vec<f32>| -> Vec<Option<f32>> {
                // Per output: `None` if dropped, else the factor on ΔW's column.
                (0..d_out)
                    .map(|j| {
                        let (got, want): (Vec<f32>, Vec<f32>) = (0..d_in).map(|i| (y[i * d_out + j] - base[i * d_out + j], delta[i * d_out + j])).unzip();
                        let peak = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                        if got.iter().all(|v| v.abs() < 1e-5 * peak.max(1.0)) {
                            return None;
                        }
                        let k = got.iter().zip(&want).map(|(g, w)| g * w).sum::<f32>() / want.iter().map(|w| w * w).sum::<f32>();
                        assert!(got.iter().zip(&want).all(|(g, w)| (g - k * w).abs() < 1e-4 * peak), "{name}: a kept row is ΔW's, scaled");
                        Some(k)
                    })
                    .collect()
            };
            let mut dropped = 0;
            for _ in 0..20 {
                let kept = columns(layer.forward(eye.clone()).into_data().to_vec().unwrap());
                let n = kept.iter().flatten().count();
                dropped += d_out - n;
                let want = if scale { d_out as f32 / n.max(1) as f32 } else { 1.0 };
                assert!(kept.iter().flatten().all(|k| (k - want).abs() < 1e-3 * want), "{name}, scale {scale}: {kept:?}");
            }
            let share = dropped as f64 / (20 * d_out) as f64;
            assert!((0.3..0.7).contains(&share), "{name}: {share} of the rows dropped at p = 0.5");
            let valid = layer.valid();
            let eye = eye.inner();
            let y: Vec<f32> = valid.forward(eye).into_data().to_vec().unwrap();
            let all: Vec<Option<f32>> = (0..d_out).map(|j| Some((0..d_in).map(|i| y[i * d_out + j] - base[i * d_out + j]).sum::<f32>())).collect();
            let want: Vec<Option<f32>> = (0..d_out).map(|j| Some((0..d_in).map(|i| delta[i * d_out + j]).sum::<f32>())).collect();
            for (a, b) in all.iter().flatten().zip(want.iter().flatten()) {
                assert!((a - b).abs() < 1e-4 * b.abs().max(1.0), "{name}: inference drops nothing");
            }
        }
    }
}

const SCALAR_CASES: [&str; 3] = ["lin_loha_scalar", "lin_lokr_scalar", "conv_lokr_full_scalar"];

/// LyCORIS' `use_scalar` on LoHa and LoKr: a fresh adapter has the scalar at 0 (no update)
/// and its usually-zero half random; with the fixture's values the layer computes LyCORIS'
/// output and every gradient, the scalar's too; saved, the scalar is folded into the first
/// factor as LyCORIS saves it; loaded into an adapter with a scalar, training continues at
/// a scalar of 1 with the same update.
#[test]
fn use_scalar_matches_lycoris() {
    let f = Fixture::open("lycoris_options.safetensors");
    let device = Default::default();
    for name in SCALAR_CASES {
        let case = f.case_of(name);
        assert!(case.use_scalar);
        let factor_names: Vec<&String> = case.names.iter().filter(|n| *n != "scalar").collect();
        let mut fresh = base_layer(&f, name);
        fresh.site().attach_new(&case.config(), &device).unwrap();
        let adapter = fresh.lycoris();
        assert_eq!(adapter.names().to_vec(), factor_names.iter().map(|n| n.as_str()).collect::<Vec<_>>(), "{name}");
        assert_eq!(adapter.scalar.as_ref().unwrap().val().into_data().to_vec::<f32>().unwrap(), [0.0], "{name}: the scalar starts at 0");
        assert!(adapter.delta(1.0).abs().max().into_scalar() == 0.0, "{name}: no update at first");
        for (i, n) in factor_names.iter().enumerate() {
            let init = f.host(&format!("{name}.init.{n}"));
            let ours: Vec<f32> = adapter.factors[i].val().into_data().to_vec().unwrap();
            assert_eq!(init.data.iter().all(|v| *v == 0.0), ours.iter().all(|v| *v == 0.0), "{name}: {n} starts as LyCORIS' (zero or random)");
        }

        let mut layer = base_layer(&f, name);
        layer.site().attach_new(&case.config(), &device).unwrap();
        let adapter = layer.lycoris();
        for (i, n) in factor_names.iter().enumerate() {
            adapter.factors[i] = Param::from_tensor(f.matrix(&format!("{name}.{n}")));
        }
        adapter.scalar = Some(Param::from_tensor(f.flat(&format!("{name}.scalar")).reshape([1])));
        let y = layer.forward(&f, name);
        let err = rel(y.clone().inner(), f.matrix(&format!("{name}.y")).inner());
        assert!(err < 1e-5, "{name}: output relative error {err}");
        let grads = (y * f.matrix(&format!("{name}.g"))).sum().backward();
        let adapter = layer.lycoris_ref();
        for (i, n) in factor_names.iter().enumerate() {
            let err = rel(adapter.factors[i].grad(&grads).unwrap(), f.matrix(&format!("{name}.grad.{n}")).inner());
            assert!(err < 1e-4, "{name}: gradient of {n}, relative error {err}");
        }
        let got: f32 = adapter.scalar.as_ref().unwrap().grad(&grads).unwrap().into_scalar();
        let want = f.host(&format!("{name}.grad.scalar")).data[0];
        assert!((got - want).abs() < 1e-4 * want.abs().max(1.0), "{name}: the scalar's gradient {got} vs {want}");

        // Saved as LyCORIS saves it.
        let mut trained = One(layer);
        let mut set = AdapterSet::new();
        collect_adapters(&mut trained, &mut set).unwrap();
        let bytes = set.to_bytes(lora_core::AdapterFormat::Kohya, lora_core::SaveDtype::F32).unwrap();
        let (st, _) = lora_core::tensor_io::parse(&bytes, Path::new("x")).unwrap();
        for n in &factor_names {
            let saved = lora_core::tensor_io::decode(&st.tensor(&format!("lora_unet_layer.{n}")).unwrap(), n, Path::new("x")).unwrap();
            let want = f.host(&format!("{name}.saved.{n}"));
            let err = saved.data.iter().zip(&want.data).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(saved.shape == want.shape && err < 1e-5, "{name}: saved {n}, error {err}");
        }
        // Loaded into an adapter with a scalar: the scalar restarts at 1, the update is the same.
        let mut index = ModuleIndex::new();
        lora_core::sites::add_to_index(&mut index, &mut trained).unwrap();
        let (read, _) = AdapterSet::from_bytes(&bytes, Path::new("x"), &index, ReadOptions::default()).unwrap();
        let mut more = One(base_layer(&f, name));
        more.0.site().attach_new(&case.config(), &device).unwrap();
        lora_core::sites::load_adapter_weights(&mut more, &read, &device).unwrap();
        assert_eq!(more.0.lycoris().scalar.as_ref().unwrap().val().into_data().to_vec::<f32>().unwrap(), [1.0], "{name}");
        let err = rel(more.0.forward(&f, name).inner(), trained.0.forward(&f, name).inner());
        assert!(err < 1e-5, "{name}: continued, relative error {err}");
    }
}
