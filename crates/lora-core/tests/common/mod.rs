//! Helpers shared by the lora-core integration tests.
#![allow(dead_code)]

use std::collections::HashMap;

use burn::backend::Flex;
use burn::tensor::{Tensor, TensorData};
use lora_core::{HostTensor, LoraWeights};

pub type B = Flex;

/// A small deterministic generator (SplitMix64) so test data depends only on the seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.uniform()).collect()
    }

    pub fn host(&mut self, shape: &[usize]) -> HostTensor {
        let n = shape.iter().product();
        HostTensor::new(shape.to_vec(), self.vec(n)).unwrap()
    }

    pub fn tensor<const D: usize>(&mut self, shape: [usize; D]) -> Tensor<B, D> {
        let n = shape.iter().product();
        Tensor::from_data(TensorData::new(self.vec(n), shape), &Default::default())
    }
}

/// Random adapter weights: linear (`kernel = None`) or conv with the given kernel.
pub fn random_weights(rng: &mut Rng, d_in: usize, d_out: usize, rank: usize, kernel: Option<[usize; 2]>, alpha: f32) -> LoraWeights {
    let (down, up) = match kernel {
        None => (rng.host(&[rank, d_in]), rng.host(&[d_out, rank])),
        Some([kh, kw]) => (rng.host(&[rank, d_in, kh, kw]), rng.host(&[d_out, rank, 1, 1])),
    };
    LoraWeights::new(down, up, alpha, "test").unwrap()
}

/// `||a - b|| / max(||b||, tiny)`.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let norm: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (diff / norm.max(1e-30)).sqrt()
}

pub fn values<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

/// Numerical rank of a row-major `rows x cols` matrix by Gaussian elimination with full
/// pivoting, counting pivots above `tol` relative to the largest entry.
pub fn numerical_rank(data: &[f32], rows: usize, cols: usize, tol: f64) -> usize {
    let mut m: Vec<f64> = data.iter().map(|v| *v as f64).collect();
    let max = m.iter().fold(0f64, |a, v| a.max(v.abs()));
    if max == 0.0 {
        return 0;
    }
    let mut rank = 0;
    let mut row_used = vec![false; rows];
    let mut col_used = vec![false; cols];
    loop {
        let mut best = (0.0, 0, 0);
        for r in (0..rows).filter(|r| !row_used[*r]) {
            for c in (0..cols).filter(|c| !col_used[*c]) {
                let v = m[r * cols + c].abs();
                if v > best.0 {
                    best = (v, r, c);
                }
            }
        }
        if best.0 <= tol * max {
            return rank;
        }
        let (_, pr, pc) = best;
        row_used[pr] = true;
        col_used[pc] = true;
        rank += 1;
        let pivot = m[pr * cols + pc];
        for r in (0..rows).filter(|r| !row_used[*r]) {
            let f = m[r * cols + pc] / pivot;
            for c in 0..cols {
                m[r * cols + c] -= f * m[pr * cols + c];
            }
        }
    }
}

/// The f32 tensors of `tests/fixtures/<name>` by key: (shape, values).
pub fn f32_fixture(name: &str) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = view.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
            (name, (view.shape().to_vec(), values))
        })
        .collect()
}

/// A fixture file's tensors and metadata (`tests/fixtures/<name>`), as the Python scripts
/// in `xtask/fixtures` write them: per case, its settings as JSON in the metadata.
pub struct Fixture {
    /// The tensors by key.
    pub tensors: HashMap<String, HostTensor>,
    /// The metadata: each case's settings.
    pub meta: HashMap<String, String>,
}

impl Fixture {
    /// Reads `tests/fixtures/<name>`.
    pub fn open(name: &str) -> Self {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
        let bytes = std::fs::read(&path).unwrap();
        let (st, meta) = lora_core::tensor_io::parse(&bytes, &path).unwrap();
        let tensors = st.iter().map(|(k, v)| (k.to_string(), lora_core::tensor_io::decode(&v, k, &path).unwrap())).collect();
        Self { tensors, meta }
    }

    /// Case `name`'s settings.
    pub fn case<T: serde::de::DeserializeOwned>(&self, name: &str) -> T {
        serde_json::from_str(&self.meta[name]).unwrap()
    }

    /// The tensor `key`.
    pub fn host(&self, key: &str) -> &HostTensor {
        self.tensors.get(key).unwrap_or_else(|| panic!("{key} in the fixture"))
    }

    /// The tensor `key` on a backend, in its shape.
    pub fn tensor<Bk: burn::tensor::backend::Backend, const D: usize>(&self, key: &str) -> Tensor<Bk, D> {
        let t = self.host(key);
        Tensor::from_data(TensorData::new(t.data.clone(), t.shape.clone()), &Default::default())
    }
}

/// The file of one UNet module `layer` holding `tensors` (`(name, tensor)`, e.g. LyCORIS'
/// `diff`), read back as a reader would: the adapters, or the reader's error.
pub fn read_module(tensors: &[(&str, &HostTensor)]) -> lora_core::Result<lora_core::AdapterSet> {
    let mut index = lora_core::ModuleIndex::new();
    index.add(lora_core::Component::Unet, ["layer"]).unwrap();
    let refs: Vec<(String, &HostTensor)> = tensors.iter().map(|(k, t)| (format!("lora_unet_layer.{k}"), *t)).collect();
    let bytes = lora_core::tensor_io::serialize(&refs, lora_core::SaveDtype::F32, Default::default()).unwrap();
    lora_core::AdapterSet::from_bytes(&bytes, std::path::Path::new("module.safetensors"), &index, Default::default()).map(|(set, _)| set)
}

/// The adapters of `model` (one site, `layer`) written in the kohya layout, checked to be
/// the tensors `lora_unet_layer.<n>` of `names` in the shapes the fixture's case has
/// (`<case>.<n>`), and an alpha: the bytes and the metadata.
pub fn written_as_in_fixture<Bk: burn::tensor::backend::Backend>(model: &mut impl lora_core::sites::LoraSites<Bk>, f: &Fixture, case: &str, names: &[String]) -> (Vec<u8>, HashMap<String, String>) {
    let mut set = lora_core::AdapterSet::new();
    lora_core::sites::collect_adapters(model, &mut set).unwrap();
    let bytes = set.to_bytes(lora_core::AdapterFormat::Kohya, lora_core::SaveDtype::F32).unwrap();
    let (st, meta) = lora_core::tensor_io::parse(&bytes, std::path::Path::new("x")).unwrap();
    let mut keys: Vec<String> = st.names().into_iter().map(String::from).collect();
    keys.sort();
    let mut want: Vec<String> = names.iter().map(|n| format!("lora_unet_layer.{n}")).chain(["lora_unet_layer.alpha".to_string()]).collect();
    want.sort();
    assert_eq!(keys, want, "{case}");
    for n in names {
        let shape = st.tensor(&format!("lora_unet_layer.{n}")).unwrap().shape().to_vec();
        assert_eq!(shape, f.host(&format!("{case}.{n}")).shape, "{case}: {n} as LyCORIS stores it");
    }
    (bytes, meta)
}

/// A way to damage a valid adapter file ([`damaged`]); places and lengths are taken
/// modulo what the file has.
#[derive(Clone, Debug)]
pub enum Damage {
    /// Cut the file to this many thousandths of its length.
    Truncate(usize),
    /// Overwrite the byte at this many thousandths of the length.
    Byte(usize, u8),
    /// Leave out a tensor.
    Drop(usize),
    /// Give a tensor another shape (any rank, sizes from 0), with new values.
    Reshape(usize, Vec<usize>),
    /// Set every value of a tensor to one (NaN, infinities, 0, negative).
    Fill(usize, f32),
    /// Give a tensor another of the suffixes adapter files use (after the module's name).
    Rename(usize, &'static str),
}

/// The suffixes kohya, PEFT and LyCORIS files use.
const SUFFIXES: &[&str] = &[
    "lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale", "scalar",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "lora_A.weight", "lora_B.weight", "diff", "weight", "oft_blocks", "rescale",
];

/// Every [`Damage`], with values that tend to break readers.
pub fn damage() -> impl proptest::strategy::Strategy<Value = Damage> {
    use proptest::prelude::*;
    prop_oneof![
        (0usize..1000).prop_map(Damage::Truncate),
        (0usize..1000, any::<u8>()).prop_map(|(p, b)| Damage::Byte(p, b)),
        any::<usize>().prop_map(Damage::Drop),
        (any::<usize>(), prop::collection::vec(0usize..6, 0..5)).prop_map(|(i, s)| Damage::Reshape(i, s)),
        (any::<usize>(), prop::sample::select(vec![f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -1.0, 1e30])).prop_map(|(i, v)| Damage::Fill(i, v)),
        (any::<usize>(), prop::sample::select(SUFFIXES)).prop_map(|(i, s)| Damage::Rename(i, s)),
    ]
}

/// `bytes` (a valid safetensors file) with `damage` done to it.
pub fn damaged(bytes: &[u8], damage: &Damage) -> Vec<u8> {
    let at = |thousandths: usize| bytes.len() * thousandths / 1000;
    match damage {
        Damage::Truncate(t) => return bytes[..at(*t)].to_vec(),
        Damage::Byte(p, b) => {
            let mut out = bytes.to_vec();
            if let Some(x) = out.get_mut(at(*p)) {
                *x = *b;
            }
            return out;
        }
        _ => {}
    }
    let path = std::path::Path::new("valid.safetensors");
    let (st, metadata) = lora_core::tensor_io::parse(bytes, path).unwrap();
    let mut tensors: Vec<(String, HostTensor)> = st.iter().map(|(k, v)| (k.to_string(), lora_core::tensor_io::decode(&v, k, path).unwrap())).collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let n = tensors.len();
    let mut rng = Rng::new(n as u64);
    match damage {
        Damage::Drop(i) => drop(tensors.remove(i % n)),
        Damage::Reshape(i, shape) => tensors[i % n].1 = rng.host(shape),
        Damage::Fill(i, v) => tensors[i % n].1.data.iter_mut().for_each(|x| *x = *v),
        Damage::Rename(i, suffix) => {
            let name = &mut tensors[i % n].0;
            let module = name.split_once('.').map_or(name.as_str(), |(m, _)| m).to_string();
            *name = format!("{module}.{suffix}");
        }
        Damage::Truncate(_) | Damage::Byte(..) => unreachable!(),
    }
    // A rename may collide with a tensor already there: the later one stays.
    let mut unique: HashMap<String, HostTensor> = HashMap::new();
    for (k, v) in tensors {
        unique.insert(k, v);
    }
    let refs: Vec<(String, &HostTensor)> = unique.iter().map(|(k, v)| (k.clone(), v)).collect();
    lora_core::tensor_io::serialize(&refs, lora_core::SaveDtype::F32, metadata).unwrap()
}

/// Replays the optimizer trajectories that `xtask/fixtures/lora_core_{lion,sgd,ademamix}.py`
/// record: two tensors `a` and `b`, per step a learning rate, gradients (a missing key: no
/// gradient that step) and the values after the step.
/// A linear or conv layer with an adapter site, its base weights from a fixture case
/// (`<case>.weight`, `<case>.bias` in PyTorch's layout), for the LyCORIS and OFT tests.
pub mod layer {
    use burn::module::Param;
    use burn::nn::conv::{Conv2d, Conv2dConfig};
    use burn::nn::{Linear, PaddingConfig2d};
    use burn::tensor::Tensor;
    use lora_core::sites::LoraSites;
    use lora_core::{Component, LoraConv2d, LoraLinear, LoraSiteMut, LycorisAdapter};

    use super::Fixture;

    /// The autodiff backend the layers train on.
    pub type AB = burn::backend::Autodiff<burn::backend::Flex>;

    /// A layer of either kind, as a site.
    #[allow(clippy::large_enum_variant)] // a handful per test
    pub enum Layer {
        Linear(LoraLinear<AB>),
        Conv(LoraConv2d<AB>),
    }

    impl Layer {
        /// Case `name`'s base layer: linear `dims = [in, out]`, or a conv `dims = [in, out,
        /// k]` (`conv`) with "same" padding; with a bias where the fixture has one.
        pub fn from_fixture(f: &Fixture, name: &str, dims: &[usize], conv: bool) -> Self {
            let device = Default::default();
            let bias_key = format!("{name}.bias");
            let bias = f.tensors.contains_key(&bias_key).then(|| Param::from_tensor(f.tensor::<AB, 1>(&bias_key)).set_require_grad(false));
            if conv {
                let k = dims[2];
                let config = Conv2dConfig::new([dims[0], dims[1]], [k, k]).with_padding(PaddingConfig2d::Explicit(k / 2, k / 2, k / 2, k / 2));
                let conv = Conv2d { weight: Param::from_tensor(f.tensor::<AB, 4>(&format!("{name}.weight"))), bias, ..config.init::<AB>(&device) };
                Layer::Conv(LoraConv2d::new(conv))
            } else {
                let weight = Param::from_tensor(f.tensor::<AB, 2>(&format!("{name}.weight")).transpose());
                Layer::Linear(LoraLinear::new(Linear { weight, bias }))
            }
        }

        pub fn site(&mut self) -> LoraSiteMut<'_, AB> {
            match self {
                Layer::Linear(l) => LoraSiteMut::Linear(l),
                Layer::Conv(c) => LoraSiteMut::Conv(c),
            }
        }

        /// The attached LyCORIS adapter (LoHa, LoKr or OFT).
        pub fn lycoris_ref(&self) -> &LycorisAdapter<AB> {
            match self {
                Layer::Linear(l) => l.lycoris.as_ref(),
                Layer::Conv(c) => c.lycoris.as_ref(),
            }
            .expect("a LyCORIS adapter")
        }

        /// The attached LyCORIS adapter, to change.
        pub fn lycoris(&mut self) -> &mut LycorisAdapter<AB> {
            match self {
                Layer::Linear(l) => l.lycoris.as_mut(),
                Layer::Conv(c) => c.lycoris.as_mut(),
            }
            .expect("a LyCORIS adapter")
        }

        /// The layer's base weight in PyTorch's layout, flattened to `[out, cols]`.
        pub fn base_weight(&self) -> Tensor<burn::backend::Flex, 2> {
            match self {
                Layer::Linear(l) => l.base.weight.val().inner().transpose(),
                Layer::Conv(c) => c.base.weight.val().inner().flatten(1, 3),
            }
        }

        /// Merges the adapter in place and checks the weight against the fixture's
        /// `<name>.merged` and the output against the unmerged one (relative error below
        /// `tol`), then unmerges and checks that the base weight is restored bit for bit.
        pub fn check_merge_round_trip(mut self, f: &Fixture, name: &str, tol: f32) {
            let before = self.forward(f, name).inner();
            let base = self.base_weight();
            self.site().merge_in_place();
            let err = rel(self.base_weight(), flat(f, &format!("{name}.merged"), base.dims()));
            assert!(err < tol, "{name}: merged weight, relative error {err}");
            let err = rel(self.forward(f, name).inner(), before);
            assert!(err < tol, "{name}: merged output, relative error {err}");
            match &mut self {
                Layer::Linear(l) => l.unmerge_in_place(),
                Layer::Conv(c) => c.unmerge_in_place(),
            }
            let restored: Vec<f32> = self.base_weight().into_data().to_vec().unwrap();
            assert_eq!(restored, base.into_data().to_vec::<f32>().unwrap(), "{name}: unmerged exactly");
        }

        /// Whether the frozen base weight took no gradient in `grads`.
        pub fn base_is_frozen(&self, grads: &<AB as burn::tensor::backend::AutodiffBackend>::Gradients) -> bool {
            match self {
                Layer::Linear(l) => l.base.weight.grad(grads).is_none(),
                Layer::Conv(c) => c.base.weight.grad(grads).is_none(),
            }
        }

        /// The layer's output on the case's `x`, flattened to `[rows, cols]`.
        pub fn forward(&self, f: &Fixture, name: &str) -> Tensor<AB, 2> {
            match self {
                Layer::Linear(l) => l.forward(f.tensor::<AB, 2>(&format!("{name}.x"))),
                Layer::Conv(c) => c.forward(f.tensor::<AB, 4>(&format!("{name}.x"))).flatten(1, 3),
            }
        }
    }

    /// Max |a − b| over max |b|.
    pub fn rel<const D: usize>(a: Tensor<burn::backend::Flex, D>, b: Tensor<burn::backend::Flex, D>) -> f32 {
        let peak: f32 = b.clone().abs().max().into_scalar();
        let err: f32 = (a - b).abs().max().into_scalar();
        err / peak.max(1e-12)
    }

    /// The fixture's tensor `key` with its values in the shape `dims`.
    pub fn flat<Bk: burn::tensor::backend::Backend>(f: &Fixture, key: &str, dims: [usize; 2]) -> Tensor<Bk, 2> {
        Tensor::from_data(burn::tensor::TensorData::new(f.host(key).data.clone(), dims), &Default::default())
    }

    /// One layer as a model: the site `layer` of the UNet.
    pub struct One(pub Layer);

    impl LoraSites<AB> for One {
        fn component(&self) -> Component {
            Component::Unet
        }

        fn visit_lora_sites(&mut self, f: &mut dyn FnMut(&str, LoraSiteMut<'_, AB>)) {
            f("layer", self.0.site());
        }
    }

    /// Reads `bytes` (the file written from `trained`'s adapter, case `name`) back: it is
    /// written again byte for byte, and attached to `fresh` it gives `trained`'s output
    /// (relative error below `tol`). Returns what was read.
    pub fn read_back(f: &Fixture, name: &str, trained: &mut One, bytes: &[u8], fresh: Layer, tol: f32) -> lora_core::AdapterSet {
        use lora_core::{AdapterFormat, AdapterSet, ModuleIndex, ReadOptions, SaveDtype};
        let mut index = ModuleIndex::new();
        lora_core::sites::add_to_index(&mut index, trained).unwrap();
        let (read, _) = AdapterSet::from_bytes(bytes, std::path::Path::new("x"), &index, ReadOptions::default()).unwrap();
        assert_eq!(read.to_bytes(AdapterFormat::Kohya, SaveDtype::F32).unwrap(), bytes, "{name}: written again as read");
        let mut fresh = One(fresh);
        lora_core::sites::attach_adapters(&mut fresh, &read, 1.0, &Default::default()).unwrap();
        let err = rel(fresh.0.forward(f, name).inner(), trained.0.forward(f, name).inner());
        assert!(err < tol, "{name}: read back, relative error {err}");
        read
    }

    /// Writes `trained`'s adapter (case `name`) in the kohya layout and checks it against
    /// what LyCORIS' module saved: exactly the keys `lora_unet_layer.<k>` for `state`, each
    /// tensor in `want(k)`'s shape with its values (off by at most `tol` times the larger of
    /// 1 and the largest value), `lycoris.kohya` with `algo`. Returns the bytes and metadata.
    pub fn written_as_lycoris(trained: &mut One, name: &str, state: &[&str], want: impl Fn(&str) -> lora_core::HostTensor, algo: &str, tol: f32) -> (Vec<u8>, std::collections::HashMap<String, String>) {
        use lora_core::{AdapterFormat, AdapterSet, SaveDtype};
        let mut set = AdapterSet::new();
        lora_core::sites::collect_adapters(trained, &mut set).unwrap();
        let bytes = set.to_bytes(AdapterFormat::Kohya, SaveDtype::F32).unwrap();
        let (st, meta) = lora_core::tensor_io::parse(&bytes, std::path::Path::new("x")).unwrap();
        let mut keys: Vec<String> = st.names().into_iter().map(String::from).collect();
        keys.sort();
        let mut expected: Vec<String> = state.iter().map(|k| format!("lora_unet_layer.{k}")).collect();
        expected.sort();
        assert_eq!(keys, expected, "{name}");
        for k in state {
            let written = st.tensor(&format!("lora_unet_layer.{k}")).unwrap();
            let want = want(k);
            assert_eq!(written.shape(), want.shape.as_slice(), "{name}: {k}'s shape");
            let values: Vec<f32> = written.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
            let err = values.iter().zip(&want.data).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err <= tol * want.data.iter().fold(1f32, |m, v| m.max(v.abs())), "{name}: {k}'s values, off by {err}");
        }
        assert_eq!(meta["ss_network_module"], "lycoris.kohya", "{name}");
        let args: serde_json::Value = serde_json::from_str(&meta["ss_network_args"]).unwrap();
        assert_eq!(args["algo"], algo, "{name}");
        (bytes, meta)
    }

    /// Writes the adapter of `trained` (case `name`), damages the file (`damage`) and reads
    /// it back leniently: a typed error, or an adapter that attaches to `fresh` (or refuses
    /// to, with an error) and runs. A panic fails the calling proptest.
    pub fn survives_damage(f: &Fixture, name: &str, trained: Layer, fresh: Layer, damage: &super::Damage) {
        use lora_core::{AdapterFormat, AdapterSet, ModuleIndex, ReadOptions, SaveDtype};
        let mut trained = One(trained);
        let mut set = AdapterSet::new();
        lora_core::sites::collect_adapters(&mut trained, &mut set).unwrap();
        let bytes = super::damaged(&set.to_bytes(AdapterFormat::Kohya, SaveDtype::F32).unwrap(), damage);
        let mut index = ModuleIndex::new();
        lora_core::sites::add_to_index(&mut index, &mut trained).unwrap();
        let Ok((read, _)) = AdapterSet::from_bytes(&bytes, std::path::Path::new("bad.safetensors"), &index, ReadOptions { lenient: true }) else {
            return;
        };
        let mut fresh = One(fresh);
        if lora_core::sites::attach_adapters(&mut fresh, &read, 1.0, &Default::default()).is_ok() {
            let y: Vec<f32> = fresh.0.forward(f, name).inner().into_data().to_vec().unwrap();
            assert!(!y.is_empty());
        }
    }
}

pub mod trajectory {
    use std::collections::HashMap;

    use burn::backend::{Autodiff, Flex};
    use burn::module::{Module, Param};
    use burn::optim::GradientsParams;
    use burn::tensor::{Tensor, TensorData};
    use lora_core::optim::{AdamWSettings, FlatAdamW};

    /// The autodiff backend the trajectories train on.
    pub type AD = Autodiff<Flex>;
    /// A fixture's tensors by key.
    pub type Fixture = HashMap<String, (Vec<usize>, Vec<f32>)>;

    /// The two trained tensors.
    #[derive(Module, Debug)]
    pub struct Pair<B: burn::tensor::backend::Backend> {
        /// A random `[4, 8]` tensor.
        pub a: Param<Tensor<B, 2>>,
        /// A `[8, 4]` tensor that starts at zero.
        pub b: Param<Tensor<B, 2>>,
    }

    fn tensor(data: &(Vec<usize>, Vec<f32>)) -> Tensor<Flex, 2> {
        Tensor::from_data(TensorData::new(data.1.clone(), [data.0[0], data.0[1]]), &Default::default())
    }

    /// The values of a tensor of the pair.
    pub fn values(t: Tensor<Flex, 2>) -> Vec<f32> {
        t.into_data().to_vec().unwrap()
    }

    /// The gradients of `step` of `case`.
    pub fn step_grads(f: &Fixture, case: &str, step: usize, pair: &Pair<AD>) -> GradientsParams {
        let mut grads = GradientsParams::new();
        for (name, id) in [("a", pair.a.id), ("b", pair.b.id)] {
            if let Some(g) = f.get(&format!("{case}.grad.{step}.{name}")) {
                grads.register(id, tensor(g));
            }
        }
        grads
    }

    /// The pair at `case`'s start and an AdamW over it with `settings`.
    pub fn start(f: &Fixture, case: &str, settings: AdamWSettings) -> (Pair<AD>, FlatAdamW<AD>) {
        let pair = Pair::<AD> {
            a: Param::from_tensor(Tensor::from_inner(tensor(&f[&format!("{case}.init.a")])).require_grad()),
            b: Param::from_tensor(Tensor::from_inner(tensor(&f[&format!("{case}.init.b")])).require_grad()),
        };
        let optim = FlatAdamW::new(settings, &pair, &Default::default());
        (pair, optim)
    }

    /// Trains `pair` with `optim` through `case`'s steps; per step, the largest absolute
    /// difference of the values from the fixture's. Returns the pair at the end.
    pub fn replay(f: &Fixture, case: &str, mut pair: Pair<AD>, optim: &mut FlatAdamW<AD>, mut check: impl FnMut(usize, &str, f32)) -> Pair<AD> {
        let lrs = f[&format!("{case}.lr")].1.clone();
        for (step, &lr) in lrs.iter().enumerate() {
            let grads = optim.gather_grads(&pair, step_grads(f, case, step, &pair));
            pair = optim.step(f64::from(lr), pair, grads);
            for (t, now) in [("a", pair.a.val().inner()), ("b", pair.b.val().inner())] {
                let want = &f[&format!("{case}.param.{step}.{t}")].1;
                let worst = values(now).iter().zip(want).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
                check(step, t, worst);
            }
        }
        pair
    }
}
