//! LyCORIS' Diag-OFT and BOFT against its own modules (`xtask/fixtures/lora_core_lycoris_oft.py`
//! runs `lycoris.modules.diag_oft.DiagOFTModule` and `lycoris.modules.boft.ButterflyOFTModule`):
//! the block shapes LyCORIS picks, the layer's
//! output and the gradients of the blocks and of the scale per output, without a
//! constraint, clamped, rescaled, on linear and conv layers, at strengths 1 and 0.7;
//! merging; the file LyCORIS writes, read back; and damaged files.

mod common;

use std::path::Path;

use burn::backend::{Autodiff, Flex};
use burn::module::Param;
use burn::tensor::Tensor;
use lora_core::inspect::ModuleKind;
use lora_core::sites::collect_adapters;
use lora_core::{Algo, AdapterFormat, AdapterSet, Component, HostTensor, LoraConfig, ModuleIndex, ReadOptions, SaveDtype};
use proptest::prelude::*;

use common::layer::{flat, rel, Layer, One};
use common::Fixture;

type B = Autodiff<Flex>;

const CASES: [&str; 4] = ["lin", "lin_clamped_rescaled", "conv_rescaled", "lin_large"];

/// The two algorithms and their fixtures (the same case names in each).
const KINDS: [(Algo, &str); 2] = [(Algo::DiagOft, "diag_oft.safetensors"), (Algo::Boft, "boft.safetensors")];

#[derive(serde::Deserialize)]
struct Case {
    layer: Vec<serde_json::Value>,
    dim: usize,
    constraint: f32,
    multiplier: f32,
    rescaled: bool,
    /// `[k, n]`, BOFT's `[stages, k, n]`.
    blocks: Vec<usize>,
    clamped: bool,
    /// Diag-OFT's rank dropout (the dropout fixture's cases only).
    #[serde(default)]
    p: f64,
}

impl Case {
    fn is_conv(&self) -> bool {
        self.layer[0] == "conv"
    }

    fn dims(&self) -> Vec<usize> {
        self.layer[1..].iter().map(|v| v.as_u64().unwrap() as usize).collect()
    }

    fn config(&self, algo: Algo) -> LoraConfig {
        LoraConfig::new(self.dim).with_alpha(self.constraint).with_algo(algo).with_oft_rescaled(self.rescaled).with_rank_dropout(self.p)
    }

    /// The block size `n` (LyCORIS' `dim` as the file shows it).
    fn n(&self) -> usize {
        *self.blocks.last().unwrap()
    }

    /// `oft_blocks` as LyCORIS holds it: `[k, n, n]` or `[stages, k, n, n]`.
    fn torch_shape(&self) -> Vec<usize> {
        let mut shape = self.blocks.clone();
        shape.push(self.n());
        shape
    }
}

/// The case's base layer with the fixture's weights.
fn base_layer(f: &Fixture, name: &str) -> Layer {
    let case: Case = f.case(name);
    Layer::from_fixture(f, name, &case.dims(), case.is_conv())
}

/// The case's layer with a fresh adapter of `algo` at the case's settings, its tensors set
/// to the fixture's, at the case's strength.
fn trained_layer(f: &Fixture, name: &str, algo: Algo) -> Layer {
    let case: Case = f.case(name);
    let mut layer = base_layer(f, name);
    layer.site().attach_new(&case.config(algo), &Default::default()).unwrap();
    layer.site().set_multiplier(case.multiplier);
    let n = case.n();
    let out = case.blocks[case.blocks.len() - 2] * n;
    let oft = layer.lycoris();
    assert_eq!(oft.torch_shapes()[0], case.torch_shape(), "{name}: LyCORIS' block shape for dim {}", case.dim);
    oft.factors[0] = Param::from_tensor(flat(f, &format!("{name}.oft_blocks"), [case.blocks.iter().product(), n]));
    if case.rescaled {
        assert_eq!(oft.names(), ["oft_blocks", "rescale"], "{name}");
        oft.factors[1] = Param::from_tensor(flat(f, &format!("{name}.rescale"), [out, 1]));
    }
    layer
}

/// The layer computes LyCORIS' output and the gradients of the blocks and of the scale
/// per output; the frozen weight takes none.
#[test]
fn output_and_gradients_match_lycoris() {
    for (algo, file) in KINDS {
    let f = Fixture::open(file);
    let mut clamped = 0;
    for name in CASES {
        let case: Case = f.case(name);
        clamped += usize::from(case.clamped);
        let layer = trained_layer(&f, name, algo);
        let y = layer.forward(&f, name);
        let err = rel(y.clone().inner(), flat(&f, &format!("{name}.y"), y.dims()));
        assert!(err < 2e-5, "{name}: output, relative error {err}");
        let g: Tensor<B, 2> = flat(&f, &format!("{name}.g"), y.dims());
        let grads = (y * g).sum().backward();
        let oft = layer.lycoris_ref();
        for (i, (part, key)) in [("blocks", "grad"), ("rescale", "rescale_grad")].into_iter().enumerate().take(oft.factors.len()) {
            let grad = oft.factors[i].grad(&grads).expect("the adapter's tensors take gradients");
            let err = rel(grad, flat(&f, &format!("{name}.{key}"), oft.factors[i].dims()));
            assert!(err < 1e-4, "{name}: gradient of the {part}, relative error {err}");
        }
        assert!(layer.base_is_frozen(&grads), "{name}: the base weight is frozen");
    }
    assert_eq!(clamped, 1, "{file}: one case clamps to its constraint");
    }
}

/// Diag-OFT's rank dropout in training, LyCORIS' `nn.Dropout` on the scaled rotation: with
/// the fixture's draw, `oft::update_dropped` gives LyCORIS' output and the gradients of
/// the blocks and the scale; the layer draws its own factors from the backend's seeded
/// RNG and gives what `update_dropped` gives with them; without autodiff (inference) it
/// drops nothing.
#[test]
fn diag_oft_rank_dropout_matches_lycoris() {
    use burn::module::AutodiffModule;
    use burn::tensor::backend::Backend;
    use burn::tensor::Distribution;
    let f = Fixture::open("diag_oft_dropout.safetensors");
    let device = Default::default();
    for name in ["lin", "lin_clamped_rescaled"] {
        let case: Case = f.case(name);
        let (k, n, p) = (case.blocks[0], case.n(), case.p);
        let [cin, out] = [case.dims()[0], case.dims()[1]];
        let w: Tensor<B, 2> = f.tensor(&format!("{name}.weight"));
        let bias: Tensor<B, 1> = f.tensor(&format!("{name}.bias"));
        let x: Tensor<B, 2> = f.tensor(&format!("{name}.x"));
        assert_eq!(w.dims(), [out, cin]);
        let c = lora_core::oft::constraint(case.constraint, out);
        let output = |blocks: Tensor<B, 3>, rescale: Option<Tensor<B, 2>>, drop: Tensor<B, 3>| {
            let delta = lora_core::oft::update_dropped(blocks, c, case.multiplier, w.clone(), rescale, drop);
            x.clone().matmul((w.clone() + delta).transpose()) + bias.clone().unsqueeze()
        };
        let blocks = f.tensor::<B, 3>(&format!("{name}.oft_blocks")).require_grad();
        let rescale = case.rescaled.then(|| f.tensor::<B, 2>(&format!("{name}.rescale")).require_grad());

        // LyCORIS' draw: its output and gradients.
        let y = output(blocks.clone(), rescale.clone(), f.tensor(&format!("{name}.drop")));
        let err = rel(y.clone().inner(), f.tensor(&format!("{name}.y")));
        assert!(err < 2e-5, "{name}: output, relative error {err}");
        let grads = (y * f.tensor::<B, 2>(&format!("{name}.g"))).sum().backward();
        let err = rel(blocks.grad(&grads).unwrap().reshape([k * n, n]), flat(&f, &format!("{name}.grad"), [k * n, n]));
        assert!(err < 1e-4, "{name}: gradient of the blocks, relative error {err}");
        if let Some(s) = &rescale {
            let err = rel(s.grad(&grads).unwrap(), flat(&f, &format!("{name}.rescale_grad"), [out, 1]));
            assert!(err < 1e-4, "{name}: gradient of the scale, relative error {err}");
        }

        // The layer's own draw, reproduced from the same seed.
        let layer = trained_layer(&f, name, Algo::DiagOft);
        B::seed(&device, 11);
        let drawn = Tensor::<B, 3>::random([k, n, n], Distribution::Bernoulli(1.0 - p), &device).mul_scalar(1.0 / (1.0 - p));
        let kept = drawn.clone().greater_elem(0.0).int().sum().into_scalar() as usize;
        assert!(kept > 0 && kept < k * n * n, "{name}: the draw keeps some entries and drops others ({kept})");
        B::seed(&device, 11);
        let y = layer.forward(&f, name);
        let want = output(blocks.clone().detach(), rescale.clone().map(|s| s.detach()), drawn);
        let err = rel(y.inner(), want.inner());
        assert!(err < 1e-5, "{name}: the layer's training pass against update_dropped, relative error {err}");

        // Inference drops nothing.
        let Layer::Linear(linear) = &layer else { panic!("{name} is a linear layer") };
        let y = linear.valid().forward(x.clone().inner());
        let want = output(blocks.detach(), rescale.map(|s| s.detach()), Tensor::ones([k, n, n], &device));
        let err = rel(y, want.inner());
        assert!(err < 1e-5, "{name}: inference, relative error {err}");
    }
}

/// The blocks LyCORIS' modules make for layer widths from 2 to 5120 and dims from 1 to 128
/// (`lycoris_oft_shapes.json`, from LyCORIS' own `factorization` / `power2factorization`):
/// Diag-OFT's `[k, n]`, BOFT's `[stages, k, n]` or, where LyCORIS raises, an error.
#[test]
fn block_shapes_match_lycoris() {
    #[derive(serde::Deserialize)]
    struct Shape {
        out: usize,
        dim: usize,
        diag_oft: [usize; 2],
        boft: Option<[usize; 3]>,
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lycoris_oft_shapes.json");
    let shapes: Vec<Shape> = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert!(shapes.len() > 400 && shapes.iter().any(|s| s.boft.is_none()));
    for s in shapes {
        assert_eq!(lora_core::oft::diag_block_shape(s.out, s.dim), (s.diag_oft[0], s.diag_oft[1]), "Diag-OFT, {} outputs, dim {}", s.out, s.dim);
        let boft = lora_core::oft::butterfly_shape(s.out, s.dim).ok().map(|(m, k, n)| [m, k, n]);
        assert_eq!(boft, s.boft, "BOFT, {} outputs, dim {}", s.out, s.dim);
    }
}

/// Merging writes LyCORIS' merged weight into the layer (at the strength), the output
/// stays, and unmerging restores the base weight exactly.
#[test]
fn merge_writes_lycoris_weight() {
    for (algo, file) in KINDS {
    let f = Fixture::open(file);
    for name in CASES {
        trained_layer(&f, name, algo).check_merge_round_trip(&f, name, 2e-5);
    }
    }
}

/// Written as LyCORIS writes it: `lora_unet_<module>.` and the module's state dict
/// (`oft_blocks`, `rescale`, `alpha` = the constraint), tensor for tensor what the fixture's
/// module holds; `lycoris.kohya` with `algo=diag-oft` in the metadata; `info` tells it from
/// kohya's OFT; read back, the same adapter.
#[test]
fn written_as_lycoris_and_read_back() {
    for (algo, file) in KINDS {
    let f = Fixture::open(file);
    for name in CASES {
        let case: Case = f.case(name);
        let mut trained = One(trained_layer(&f, name, algo));
        trained.0.site().set_multiplier(1.0);
        let mut set = AdapterSet::new();
        collect_adapters(&mut trained, &mut set).unwrap();
        let bytes = set.to_bytes(AdapterFormat::Kohya, SaveDtype::F32).unwrap();
        let (st, meta) = lora_core::tensor_io::parse(&bytes, Path::new("x")).unwrap();
        let mut keys: Vec<String> = st.names().into_iter().map(String::from).collect();
        keys.sort();
        let state = if case.rescaled { vec!["alpha", "oft_blocks", "rescale"] } else { vec!["alpha", "oft_blocks"] };
        assert_eq!(keys, state.iter().map(|k| format!("lora_unet_layer.{k}")).collect::<Vec<_>>(), "{name}");
        for k in &state {
            let written = st.tensor(&format!("lora_unet_layer.{k}")).unwrap();
            let want = f.host(&format!("{name}.state.{k}"));
            assert_eq!(written.shape(), want.shape.as_slice(), "{name}: {k}'s shape");
            let values: Vec<f32> = written.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
            assert_eq!(values, want.data, "{name}: {k}'s values");
        }
        assert_eq!(meta["ss_network_module"], "lycoris.kohya", "{name}");
        let args: serde_json::Value = serde_json::from_str(&meta["ss_network_args"]).unwrap();
        assert_eq!(args["algo"], algo.name(), "{name}");
        assert_eq!(args["constraint"].as_str().unwrap().parse::<f32>().unwrap(), case.constraint, "{name}");
        assert_eq!(args.get("rescaled").is_some(), case.rescaled, "{name}");
        // The block size is LyCORIS' dim: a 3x3 convolution's is its conv_dim.
        let dim = if case.is_conv() { args["conv_dim"].as_str().unwrap().to_string() } else { meta["ss_network_dim"].clone() };
        assert_eq!(dim, case.n().to_string(), "{name}: the block size");

        let info = lora_core::inspect::inspect(&bytes, Path::new("x")).unwrap();
        let m = &info.modules[0];
        let kind = if algo == Algo::Boft { ModuleKind::Boft } else { ModuleKind::DiagOft };
        assert_eq!((m.kind, m.rank, m.alpha, info.summary(Component::Unet).len()), (kind, Some(case.n()), Some(case.constraint), 1), "{name}");

        let read = common::layer::read_back(&f, name, &mut trained, &bytes, base_layer(&f, name), 1e-6);
        let (_, w) = read.iter().next().unwrap();
        assert!(w.is_oft() && w.lycoris.as_ref().unwrap().algo == algo, "{name}");
    }
    }
}

/// A file's `oft_blocks` under kohya's OFT names (`oft_unet_…`) read as kohya's OFT, under
/// LyCORIS' (`lora_unet_…`) as Diag-OFT, which may lack its alpha (no constraint, as
/// ComfyUI reads it); a `rescale` that is not one value per output, or without blocks, or
/// under kohya's names, is an error naming the module, as are the options Diag-OFT does not
/// take.
#[test]
fn names_and_bad_tensors() {
    let f = Fixture::open("diag_oft.safetensors");
    let mut index = ModuleIndex::new();
    index.add(Component::Unet, ["layer"]).unwrap();
    let blocks = f.host("lin_clamped_rescaled.oft_blocks").clone();
    let rescale = f.host("lin_clamped_rescaled.rescale").clone();
    let alpha = HostTensor::new(vec![], vec![0.01]).unwrap();
    let read = |tensors: &[(&str, &HostTensor)]| {
        let refs: Vec<(String, &HostTensor)> = tensors.iter().map(|(k, t)| (k.to_string(), *t)).collect();
        let bytes = lora_core::tensor_io::serialize(&refs, SaveDtype::F32, Default::default()).unwrap();
        AdapterSet::from_bytes(&bytes, Path::new("d.safetensors"), &index, ReadOptions::default()).map(|(set, _)| set)
    };
    let algo = |set: AdapterSet| set.iter().next().unwrap().1.lycoris.as_ref().map(|l| (l.algo, l.alpha));
    assert_eq!(algo(read(&[("oft_unet_layer.oft_blocks", &blocks), ("oft_unet_layer.alpha", &alpha)]).unwrap()), Some((Algo::Oft, 0.01)));
    assert_eq!(algo(read(&[("lora_unet_layer.oft_blocks", &blocks), ("lora_unet_layer.alpha", &alpha)]).unwrap()), Some((Algo::DiagOft, 0.01)));
    assert_eq!(algo(read(&[("lora_unet_layer.oft_blocks", &blocks)]).unwrap()), Some((Algo::DiagOft, 0.0)));
    let e = read(&[("oft_unet_layer.oft_blocks", &blocks)]).unwrap_err().to_string();
    assert!(e.contains("oft_unet_layer") && e.contains("alpha"), "{e}");

    let wrong = HostTensor::new(vec![6, 2], vec![1.0; 12]).unwrap();
    for (tensors, says) in [
        (vec![("lora_unet_layer.oft_blocks", &blocks), ("lora_unet_layer.rescale", &wrong)], "one value per output"),
        (vec![("lora_unet_layer.rescale", &rescale)], "without its `oft_blocks`"),
        (vec![("oft_unet_layer.oft_blocks", &blocks), ("oft_unet_layer.rescale", &rescale), ("oft_unet_layer.alpha", &alpha)], "has no `rescale`"),
    ] {
        let e = read(&tensors).unwrap_err().to_string();
        assert!(e.contains("layer") && e.contains(says), "{says}: {e}");
    }

    // BOFT: 12 outputs have no even block size of at most 4 with a power-of-two count, and
    // a file's 3 blocks of 4 cannot make two butterfly stages.
    let mut layer = base_layer(&f, "lin_clamped_rescaled");
    let e = layer.site().attach_new(&LoraConfig::new(4).with_algo(Algo::Boft), &Default::default()).unwrap_err().to_string();
    assert!(e.contains("12 outputs") && e.contains("at most 4"), "{e}");
    let odd = HostTensor::new(vec![2, 3, 4, 4], vec![0.0; 96]).unwrap();
    let e = read(&[("lora_unet_layer.oft_blocks", &odd)]).unwrap_err().to_string();
    assert!(e.contains("layer") && e.contains("stages"), "{e}");

    // A constraint may be 0 (none), not negative; rescaled is Diag-OFT's; module dropout
    // is LyCORIS' (kept), DoRA not.
    let config = LoraConfig::new(4).with_algo(Algo::DiagOft);
    assert!(config.clone().with_alpha(0.0).with_module_dropout(0.1).validate().is_ok());
    for bad in [config.clone().with_alpha(-1.0), config.clone().with_dora(true), LoraConfig::new(4).with_algo(Algo::Oft).with_alpha(1e-3).with_oft_rescaled(true)] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// A damaged Diag-OFT file (cut short, a byte overwritten, a tensor left out, reshaped,
    /// filled with NaN, renamed) reads as a typed error or as an adapter that attaches to
    /// its layer (or refuses to, with an error) and runs: never a panic.
    #[test]
    fn damaged_files_are_errors_not_panics(case in 0..CASES.len(), kind in 0..KINDS.len(), damage in common::damage()) {
        let (algo, file) = KINDS[kind];
        let f = Fixture::open(file);
        let name = CASES[case];
        common::layer::survives_damage(&f, name, trained_layer(&f, name, algo), base_layer(&f, name), &damage);
    }
}
