//! LoCon with LyCORIS' Tucker core (`use_tucker`: `lora_down` 1x1, `lora_mid` with the
//! kernel, `lora_up` 1x1) against the `lycoris-lora` package's LoConModule (fixtures from
//! `xtask/fixtures/lora_core_locon_tucker.py`): the tensors a config creates, the layer's
//! output, the update and every factor's gradient; a write and read in LyCORIS' layout;
//! merging; max-norm; and the errors for weights of the other form.

use crate::common;

use std::path::Path;

use burn::backend::{Autodiff, Flex};
use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::PaddingConfig2d;
use burn::tensor::Tensor;
use lora_core::optim::{norm_pairs, AdamWSettings, FlatAdamW};
use lora_core::sites::{attach_adapters, collect_adapters, load_adapter_weights, LoraSites};
use lora_core::{AdapterFormat, AdapterSet, Component, HostTensor, LoraConfig, LoraConv2d, LoraSiteMut, ModuleIndex, ReadOptions, SaveDtype};

use common::Fixture;

type B = Autodiff<Flex>;

/// One case's settings, as the script wrote them.
#[derive(serde::Deserialize)]
struct Case {
    /// `[in, out, kernel, stride]`.
    layer: [usize; 4],
    rank: usize,
    alpha: f32,
    names: Vec<String>,
}

const CASES: [&str; 3] = ["conv3", "conv3_stride2", "conv1"];

fn fixture() -> Fixture {
    Fixture::open("locon_tucker.safetensors")
}

/// The cases' layers, from the fixture.
trait Layers {
    fn layer(&self, name: &str) -> LoraConv2d<B>;
    fn trained(&self, name: &str) -> LoraConv2d<B>;
    fn x(&self, name: &str) -> Tensor<B, 4>;
}

impl Layers for Fixture {
    /// The case's base convolution with the fixture's weights, wrapped.
    fn layer(&self, name: &str) -> LoraConv2d<B> {
        let [d_in, d_out, k, stride] = self.case::<Case>(name).layer;
        let p = k / 2;
        let conv = Conv2dConfig::new([d_in, d_out], [k, k]).with_stride([stride, stride]).with_padding(PaddingConfig2d::Explicit(p, p, p, p)).init::<B>(&Default::default());
        let bias = Some(Param::from_tensor(self.tensor::<B, 1>(&format!("{name}.bias"))));
        LoraConv2d::new(Conv2d { weight: Param::from_tensor(self.tensor::<B, 4>(&format!("{name}.weight"))), bias, ..conv })
    }

    /// The layer with a fresh Tucker adapter whose tensors are then the fixture's.
    fn trained(&self, name: &str) -> LoraConv2d<B> {
        let mut layer = self.layer(name);
        layer.attach_new(&config(&self.case::<Case>(name)), &Default::default()).unwrap();
        let a = layer.adapter.as_mut().unwrap();
        a.down.weight = Param::from_tensor(self.tensor::<B, 4>(&format!("{name}.lora_down.weight")));
        a.up.weight = Param::from_tensor(self.tensor::<B, 4>(&format!("{name}.lora_up.weight")));
        if let Some(mid) = a.mid.as_mut() {
            mid.weight = Param::from_tensor(self.tensor::<B, 4>(&format!("{name}.lora_mid.weight")));
        }
        layer
    }

    fn x(&self, name: &str) -> Tensor<B, 4> {
        self.tensor::<B, 4>(&format!("{name}.x"))
    }
}

fn config(case: &Case) -> LoraConfig {
    LoraConfig::new(case.rank).with_alpha(case.alpha).with_use_tucker(true)
}

/// Max |a − b| over max |b|.
fn rel<const D: usize>(a: Tensor<Flex, D>, b: Tensor<Flex, D>) -> f32 {
    let peak: f32 = b.clone().abs().max().into_scalar();
    let err: f32 = (a - b).abs().max().into_scalar();
    err / peak.max(1e-12)
}

/// A model of one layer, named `layer`.
#[derive(burn::module::Module, Debug)]
struct Net<B: burn::tensor::backend::Backend> {
    layer: LoraConv2d<B>,
}

impl<Bk: burn::tensor::backend::Backend> LoraSites<Bk> for Net<Bk> {
    fn component(&self) -> Component {
        Component::Unet
    }

    fn visit_lora_sites(&mut self, f: &mut dyn FnMut(&str, LoraSiteMut<'_, Bk>)) {
        f("layer", LoraSiteMut::Conv(&mut self.layer));
    }
}

/// `layer` as the model's one site.
fn net(layer: LoraConv2d<B>) -> Net<B> {
    Net { layer }
}

/// The adapter's tensors by LyCORIS name, in its order.
fn tensors(layer: &LoraConv2d<B>) -> Vec<(&'static str, Tensor<B, 4>)> {
    let a = layer.adapter.as_ref().unwrap();
    let mut out = vec![("lora_down.weight", a.down.weight.val())];
    out.extend(a.mid.as_ref().map(|m| ("lora_mid.weight", m.weight.val())));
    out.push(("lora_up.weight", a.up.weight.val()));
    out
}

/// `use_tucker` makes LyCORIS' tensors (a core only on a kernel larger than 1x1), and the
/// layer computes LyCORIS' output, update and gradients, with the core striding.
#[test]
fn output_update_and_gradients_match_lycoris() {
    let f = fixture();
    for name in CASES {
        let case = f.case::<Case>(name);
        let mut fresh = f.layer(name);
        fresh.attach_new(&config(&case), &Default::default()).unwrap();
        let made: Vec<(&str, Vec<usize>)> = tensors(&fresh).into_iter().map(|(n, t)| (n, t.dims().to_vec())).collect();
        let want: Vec<(&str, Vec<usize>)> = case.names.iter().map(|n| (n.as_str(), f.host(&format!("{name}.{n}")).shape.clone())).collect();
        assert_eq!(made, want, "{name}: LyCORIS' tensors");

        let layer = f.trained(name);
        let y = layer.forward(f.x(name));
        let err = rel(y.clone().inner(), f.tensor::<B, 4>(&format!("{name}.y")).inner());
        assert!(err < 1e-5, "{name}: output, relative error {err}");
        let delta = layer.adapter.as_ref().unwrap().delta_weight(1.0);
        let err = rel(delta.inner(), f.tensor::<B, 4>(&format!("{name}.delta")).inner());
        assert!(err < 1e-5, "{name}: update, relative error {err}");
        let grads = (y * f.tensor::<B, 4>(&format!("{name}.g"))).sum().backward();
        for (n, t) in tensors(&layer) {
            let got = t.grad(&grads).unwrap_or_else(|| panic!("{name}: a gradient for {n}"));
            let err = rel(got, f.tensor::<B, 4>(&format!("{name}.grad.{n}")).inner());
            assert!(err < 1e-4, "{name}: gradient of {n}, relative error {err}");
        }
        assert!(layer.base.weight.grad(&grads).is_none(), "{name}: the base is frozen");
    }
}

/// A fresh core starts Kaiming-uniform (fan-in `r·kh·kw`, as LyCORIS') with `up` at zero,
/// so the layer is unchanged.
#[test]
fn a_fresh_core_starts_as_lycoris() {
    let device = Default::default();
    let base = Conv2dConfig::new([16, 32], [3, 3]).with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1)).init::<B>(&device);
    let mut layer = LoraConv2d::new(base.clone());
    layer.attach_new(&LoraConfig::new(8).with_use_tucker(true), &device).unwrap();
    let a = layer.adapter.as_ref().unwrap();
    assert!(a.is_tucker());
    let core = a.mid.as_ref().unwrap().weight.val().into_data().to_vec::<f32>().unwrap();
    let bound = 1.0 / (8.0f32 * 9.0).sqrt();
    assert!(core.iter().all(|v| v.abs() <= bound) && core.iter().any(|v| v.abs() > bound / 2.0), "Kaiming-uniform with fan-in r·kh·kw");
    let x = Tensor::<B, 4>::ones([1, 16, 6, 6], &device);
    let attached = layer.forward(x.clone());
    layer.detach();
    assert_eq!(attached.into_data(), layer.forward(x).into_data(), "up starts at zero");
    // Without use_tucker, no core.
    let mut plain = LoraConv2d::new(base);
    plain.attach_new(&LoraConfig::new(8), &device).unwrap();
    assert!(!plain.adapter.as_ref().unwrap().is_tucker());
}

/// Saved in the kohya layout, the adapter is written as LyCORIS writes it (`lora_down`,
/// `lora_mid`, `lora_up`, `alpha`; `lycoris.kohya` with `use_tucker`); read back it is the
/// same trainable adapter, and its LoRA form has the same update.
#[test]
fn written_as_lycoris_and_read_back() {
    let f = fixture();
    let device = Default::default();
    for name in ["conv3", "conv3_stride2"] {
        let case = f.case::<Case>(name);
        let mut trained = net(f.trained(name));
        let (bytes, meta) = common::written_as_in_fixture(&mut trained, &f, name, &case.names);
        let (st, _) = lora_core::tensor_io::parse(&bytes, Path::new("x")).unwrap();
        let alpha = lora_core::tensor_io::decode(&st.tensor("lora_unet_layer.alpha").unwrap(), "alpha", Path::new("x")).unwrap();
        assert_eq!(alpha.data, [case.alpha], "{name}");
        assert_eq!(meta["ss_network_module"], "lycoris.kohya", "{name}");
        let args = &meta["ss_network_args"];
        assert!(args.contains("\"algo\":\"lora\"") && args.contains("\"use_tucker\":\"True\""), "{name}: {args}");
        assert!(args.contains("\"conv_dim\":\"%d\"".replace("%d", &case.rank.to_string()).as_str()), "{name}: {args}");

        let mut index = ModuleIndex::new();
        lora_core::sites::add_to_index(&mut index, &mut trained).unwrap();
        let (read, _) = AdapterSet::from_bytes(&bytes, Path::new("x"), &index, ReadOptions::default()).unwrap();
        let mut fresh = net(f.layer(name));
        attach_adapters(&mut fresh, &read, 1.0, &device).unwrap();
        assert!(fresh.layer.adapter.as_ref().is_some_and(|a| a.is_tucker()), "{name}: read back with its core");
        let err = rel(fresh.layer.forward(f.x(name)).inner(), trained.layer.forward(f.x(name)).inner());
        assert!(err < 1e-6, "{name}: read back, relative error {err}");
        // Continued training: into an attached Tucker adapter of the same rank.
        let mut resumed = net(f.layer(name));
        resumed.layer.attach_new(&config(&case), &device).unwrap();
        load_adapter_weights(&mut resumed, &read, &device).unwrap();
        let err = rel(resumed.layer.forward(f.x(name)).inner(), trained.layer.forward(f.x(name)).inner());
        assert!(err < 1e-6, "{name}: loaded into an attached adapter, relative error {err}");

        // Its LoRA form (the core folded into `down`) has the same update, and is what a
        // plain-LoRA copy of the set writes.
        let plain = read.clone().into_plain_lora();
        let w = plain.iter().next().unwrap().1;
        assert_eq!(w.down.shape, vec![case.rank, case.layer[0], case.layer[2], case.layer[2]], "{name}");
        let mut as_lora = net(f.layer(name));
        attach_adapters(&mut as_lora, &plain, 1.0, &device).unwrap();
        assert!(!as_lora.layer.adapter.as_ref().unwrap().is_tucker());
        let err = rel(as_lora.layer.forward(f.x(name)).inner(), trained.layer.forward(f.x(name)).inner());
        assert!(err < 1e-5, "{name}: as a LoRA, relative error {err}");
        let bytes = plain.to_bytes(AdapterFormat::Kohya, SaveDtype::F32).unwrap();
        let (st, _) = lora_core::tensor_io::parse(&bytes, Path::new("x")).unwrap();
        assert!(st.names().iter().all(|k| !k.contains("lora_mid")), "{name}");

        // Weights of one form do not load into an adapter of the other.
        let mut other = net(f.layer(name));
        other.layer.attach_new(&LoraConfig::new(case.rank), &device).unwrap();
        let err = load_adapter_weights(&mut other, &read, &device).map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("use_tucker") && err.contains("layer"), "{name}: {err}");
        let err = load_adapter_weights(&mut resumed, &plain, &device).map(|_| ()).unwrap_err().to_string();
        assert!(err.contains("use_tucker") && err.contains("layer"), "{name}: {err}");
    }
}

/// A core that does not fit its layer is an error naming the adapter.
#[test]
fn a_core_that_does_not_fit_is_an_error() {
    let f = fixture();
    let device = Default::default();
    let mut trained = net(f.trained("conv3"));
    let mut set = AdapterSet::new();
    collect_adapters(&mut trained, &mut set).unwrap();
    let (key, w) = set.iter().next().map(|(k, w)| (k.clone(), w.clone())).unwrap();
    let mut bad = w.clone();
    let tucker = bad.lycoris.as_mut().unwrap();
    tucker.tensors.iter_mut().filter(|(n, _)| n == "lora_mid.weight").for_each(|(_, t)| *t = HostTensor::new(vec![2, 2, 1, 1], vec![0.1; 4]).unwrap());
    let mut broken = AdapterSet::new();
    broken.insert(key, bad).unwrap();
    let mut fresh = net(f.layer("conv3"));
    let err = attach_adapters(&mut fresh, &broken, 1.0, &device).map(|_| ()).unwrap_err().to_string();
    assert!(err.contains("lora_mid") && err.contains("layer"), "{err}");
}

/// Merged into the kernel, the adapter gives the output it gives attached; unmerging
/// restores the kernel; with DoRA the core trains too.
#[test]
fn merges_and_trains_with_dora() {
    let f = fixture();
    let device = Default::default();
    for name in ["conv3", "conv3_stride2"] {
        let mut layer = f.trained(name);
        let base = layer.base.weight.val().inner();
        let attached = layer.forward(f.x(name)).inner();
        layer.merge_in_place();
        let err = rel(layer.forward(f.x(name)).inner(), attached.clone());
        assert!(err < 1e-5, "{name}: merged vs attached, relative error {err}");
        layer.unmerge_in_place();
        assert!(rel(layer.base.weight.val().inner(), base) < 1e-6, "{name}: unmerged");

        let case = f.case::<Case>(name);
        let mut dora = f.layer(name);
        dora.attach_new(&config(&case).with_dora(true), &device).unwrap();
        let a = dora.adapter.as_mut().unwrap();
        a.up.weight = Param::from_tensor(f.tensor::<B, 4>(&format!("{name}.lora_up.weight")));
        let y = dora.forward(f.x(name));
        let grads = y.sum().backward();
        let a = dora.adapter.as_ref().unwrap();
        assert!(a.mid.as_ref().unwrap().weight.grad(&grads).is_some() && a.magnitude.as_ref().unwrap().grad(&grads).is_some(), "{name}");
        let attached = dora.forward(f.x(name)).inner();
        dora.merge_in_place();
        let err = rel(dora.forward(f.x(name)).inner(), attached);
        assert!(err < 1e-5, "{name}: DoRA merged vs attached, relative error {err}");
    }
}

/// Max-norm regularization scales a Tucker LoCon whose update is too large down to the
/// limit, through its three tensors.
#[test]
fn max_norm_scales_the_update_through_the_core() {
    let f = fixture();
    let device = Default::default();
    let mut net = net(f.trained("conv3"));
    let norm = |net: &Net<B>| -> f32 { net.layer.adapter.as_ref().unwrap().delta_weight(1.0).powf_scalar(2.0).sum().sqrt().into_scalar() };
    let before = norm(&net);
    let mut optim = FlatAdamW::new(AdamWSettings::default(), &net, &device);
    let pairs = norm_pairs(&mut net);
    assert_eq!(pairs.len(), 1);
    let (scaled, stats) = optim.apply_max_norm(net, &pairs, before / 2.0).unwrap();
    let after = norm(&scaled);
    assert!((after - before / 2.0).abs() < 1e-4 * before, "{after} vs {}", before / 2.0);
    let values = stats.values.into_data().to_vec::<f32>().unwrap();
    assert_eq!(values[0], 1.0, "one adapter scaled");
    assert!((values[2] - before / 2.0).abs() < 1e-4 * before);
    let a = scaled.layer.adapter.as_ref().unwrap();
    let before_mid = f.tensor::<B, 4>("conv3.lora_mid.weight").inner();
    let ratio: f32 = (a.mid.as_ref().unwrap().weight.val().inner() / before_mid).mean().into_scalar();
    assert!((ratio - 0.5f32.powf(1.0 / 3.0)).abs() < 1e-4, "each tensor takes the cube root: {ratio}");
}
