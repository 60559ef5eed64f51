//! LyCORIS LoHa and LoKr files read as LoRAs: their updates against the `lycoris-lora`
//! package's (fixtures from `xtask/fixtures/lora_core_lycoris.py`), Tucker-decomposed
//! convolutions too, attached to linear and conv layers, written back, and the errors for
//! what is not supported.

use crate::common;

use proptest::prelude::*;

use std::collections::HashMap;
use std::path::Path;

use burn::backend::Flex;
use burn::nn::conv::Conv2dConfig;
use burn::nn::{LinearConfig, PaddingConfig2d};
use burn::tensor::Tensor;
use lora_core::{AdapterFormat, AdapterKey, AdapterSet, Component, HostTensor, LoraConv2d, LoraLinear, ModuleIndex, ReadOptions, SaveDtype};

const MODULES: [&str; 7] = ["lin_loha", "conv_loha", "lin_lokr", "conv_lokr", "lin_lokr2", "conv_lokr2", "lin_loha_big"];

fn fixture(name: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

fn tensors(name: &str) -> HashMap<String, HostTensor> {
    let path = fixture(name);
    let bytes = std::fs::read(&path).unwrap();
    let (st, _) = lora_core::tensor_io::parse(&bytes, &path).unwrap();
    st.iter().map(|(k, v)| (k.to_string(), lora_core::tensor_io::decode(&v, k, &path).unwrap())).collect()
}

fn index() -> ModuleIndex {
    let mut index = ModuleIndex::new();
    index.add(Component::Unet, MODULES).unwrap();
    index
}

/// [`index`] knowing the convolutions' kernels, as a model's index does.
fn index_with_kernels() -> ModuleIndex {
    let mut index = index();
    for m in MODULES.iter().filter(|m| m.starts_with("conv")) {
        index.set_kernel(key(m), [3, 3]);
    }
    index
}

/// Max |a − b| over max |b|.
fn rel(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    let peak = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / peak
}

fn key(path: &str) -> AdapterKey {
    AdapterKey::new(Component::Unet, path)
}

/// Each module's update as a LoRA equals LyCORIS' (the rank is the product of the halves'
/// ranks, or `ΔW` itself where that would exceed the layer; the scale alpha / rank), and
/// survives a write and a read. With the kernels known, convolutions come in the conv
/// layout, which A1111 and kohya read back.
#[test]
fn loha_and_lokr_read_as_their_updates() {
    let want = tensors("lycoris_delta.safetensors");
    for (index, conv_layout) in [(index(), false), (index_with_kernels(), true)] {
        let (set, report) = AdapterSet::load(fixture("lycoris.safetensors"), &index, ReadOptions::default()).unwrap();
        assert_eq!(report.format, AdapterFormat::Kohya);
        assert_eq!(set.len(), MODULES.len());
        let ranks: Vec<usize> = MODULES.iter().map(|m| set.get(&key(m)).unwrap().rank()).collect();
        // LoHa 3·3 and 2·2; LoKr: identity 2 (the full w1's smaller side) times w2's 3; the
        // full/full conv LoKr's rank 2·3 is not below min(6, 36): ΔW beside I₆; 1·1; 2·2;
        // the rank-4 LoHa's 16 exceeds min(10, 12): ΔW beside I₁₀.
        assert_eq!(ranks, [9, 4, 6, 6, 1, 4, 10]);
        for m in MODULES {
            let w = set.get(&key(m)).unwrap();
            let conv = m.starts_with("conv");
            assert_eq!(w.is_conv(), conv && conv_layout, "{m}: {:?}", w.down.shape);
            if conv && conv_layout {
                assert_eq!((&w.down.shape[1..], &w.up.shape[1..]), (&[4, 3, 3][..], &[w.rank(), 1, 1][..]), "{m}");
            }
            let err = rel(&w.delta().data, &want[m].data);
            assert!(err < 1e-5, "{m}: relative error {err}");
        }
        let bytes = set.to_bytes(AdapterFormat::Kohya, SaveDtype::F32).unwrap();
        let (back, _) = AdapterSet::from_bytes(&bytes, Path::new("x"), &index, ReadOptions::default()).unwrap();
        for m in MODULES {
            let err = rel(&back.get(&key(m)).unwrap().delta().data, &want[m].data);
            assert!(err < 1e-5, "{m} written as a LoRA and read back: relative error {err}");
        }
    }
}

/// Attached to layers, the updates merge into the weights as LyCORIS' do: the conv layer
/// unflattens the kernel of LyCORIS' `[rank, in·kh·kw]` layout.
#[test]
fn attached_to_layers_they_merge_to_the_update() {
    let want = tensors("lycoris_delta.safetensors");
    let (set, _) = AdapterSet::load(fixture("lycoris.safetensors"), &index(), ReadOptions::default()).unwrap();
    let device = Default::default();
    for m in ["lin_loha", "lin_lokr", "lin_lokr2", "lin_loha_big"] {
        let mut layer = LoraLinear::new(LinearConfig::new(12, 10).init::<Flex>(&device));
        let base: Vec<f32> = layer.base.weight.val().transpose().into_data().to_vec().unwrap();
        layer.attach_weights(set.get(&key(m)).unwrap(), m, &device).unwrap();
        let merged: Vec<f32> = layer.merged().weight.val().transpose().into_data().to_vec().unwrap();
        let delta: Vec<f32> = merged.iter().zip(&base).map(|(a, b)| a - b).collect();
        assert!(rel(&delta, &want[m].data) < 1e-5, "{m}");
    }
    for m in ["conv_loha", "conv_lokr", "conv_lokr2"] {
        let conv = Conv2dConfig::new([4, 6], [3, 3]).with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1)).init::<Flex>(&device);
        let mut layer = LoraConv2d::new(conv);
        let base: Vec<f32> = layer.base.weight.val().into_data().to_vec().unwrap();
        layer.attach_weights(set.get(&key(m)).unwrap(), m, &device).unwrap();
        let merged: Vec<f32> = layer.merged().weight.val().into_data().to_vec().unwrap();
        let delta: Vec<f32> = merged.iter().zip(&base).map(|(a, b)| a - b).collect();
        assert!(rel(&delta, &want[m].data) < 1e-5, "{m}");
        // The attached adapter computes the same output as the merged kernel.
        let x = Tensor::<Flex, 4>::ones([1, 4, 5, 5], &device);
        let (a, b): (Vec<f32>, Vec<f32>) = (layer.forward(x.clone()).into_data().to_vec().unwrap(), layer.merged().forward(x).into_data().to_vec().unwrap());
        assert!(rel(&a, &b) < 1e-5, "{m}: attached vs merged");
    }
    // A flattened kernel that does not fit the layer is an error naming the adapter.
    let conv = Conv2dConfig::new([4, 6], [1, 1]).init::<Flex>(&device);
    let mut layer = LoraConv2d::new(conv);
    let err = layer.attach_weights(set.get(&key("conv_loha")).unwrap(), "conv_loha", &device).unwrap_err().to_string();
    assert!(err.contains("conv_loha"), "{err}");
}

/// A Tucker core that does not fit its halves, incomplete LoHa / LoKr halves, and a
/// module with both LoRA and LyCORIS tensors are errors naming the file and the module.
#[test]
fn unsupported_or_broken_lycoris_modules_are_errors() {
    let file = tensors("lycoris.safetensors");
    type Edit<'a> = &'a dyn Fn(&mut Vec<(String, HostTensor)>);
    let write = |edit: Edit| {
        let mut t: Vec<(String, HostTensor)> = file.iter().filter(|(k, _)| k.starts_with("lora_unet_lin_loha.")).map(|(k, v)| (k.clone(), v.clone())).collect();
        edit(&mut t);
        let refs: Vec<(String, &HostTensor)> = t.iter().map(|(k, v)| (k.clone(), v)).collect();
        lora_core::tensor_io::serialize(&refs, SaveDtype::F32, HashMap::new()).unwrap()
    };
    let read = |bytes: Vec<u8>| AdapterSet::from_bytes(&bytes, Path::new("ly.safetensors"), &index(), ReadOptions::default()).map(|_| ()).unwrap_err().to_string();
    let cases: [(&str, Edit); 5] = [
        ("Tucker", &|t| t.push(("lora_unet_lin_loha.hada_t1".into(), HostTensor::new(vec![3, 3, 1, 1], vec![0.0; 9]).unwrap()))),
        ("hada_w2_b", &|t| t.retain(|(k, _)| !k.ends_with("hada_w2_b"))),
        ("both LoRA", &|t| t.push(("lora_unet_lin_loha.lora_down.weight".into(), HostTensor::new(vec![1, 12], vec![0.0; 12]).unwrap()))),
        ("mixes LoHa", &|t| t.push(("lora_unet_lin_loha.lokr_w1".into(), HostTensor::new(vec![2, 2], vec![0.0; 4]).unwrap()))),
        // Halves whose Kronecker product would be absurdly large fail before allocating it.
        ("larger than any layer", &|t| {
            t.retain(|(k, _)| k.ends_with("alpha"));
            t.push(("lora_unet_lin_loha.lokr_w1".into(), HostTensor::new(vec![1, 20000], vec![0.0; 20000]).unwrap()));
            t.push(("lora_unet_lin_loha.lokr_w2".into(), HostTensor::new(vec![20000, 1], vec![0.0; 20000]).unwrap()));
        }),
    ];
    for (expect, edit) in cases {
        let err = read(write(edit));
        assert!(err.contains(expect) && err.contains("ly.safetensors") && err.contains("lin_loha"), "{expect}: {err}");
    }
}

/// Tucker-decomposed convolutions (LyCORIS' `use_tucker`: LoHa's `hada_t1` / `hada_t2`,
/// LoKr's `lokr_t2`, LoCon's `lora_mid`) read as their updates, LyCORIS' own tensors kept
/// as the file has them (Tucker cores included); attached to a layer, they merge to it
/// (trainable in their Tucker form); an incomplete Tucker half is an error naming the
/// module.
#[test]
fn tucker_decomposed_convolutions_read_as_their_updates() {
    let want = tensors("lycoris_tucker_delta.safetensors");
    let modules = ["conv_loha_t", "conv_lokr_t", "conv_locon_t"];
    let mut index = ModuleIndex::new();
    index.add(Component::Unet, modules).unwrap();
    for m in modules {
        index.set_kernel(key(m), [3, 3]);
    }
    let (set, _) = AdapterSet::load(fixture("lycoris_tucker.safetensors"), &index, ReadOptions::default()).unwrap();
    assert_eq!(set.len(), 3);
    let device = Default::default();
    for m in modules {
        let w = set.get(&key(m)).unwrap();
        let err = rel(&w.delta().data, &want[m].data);
        assert!(err < 1e-5, "{m}: relative error {err}");
        assert_eq!((&w.down.shape[1..], &w.up.shape[1..]), (&[4, 3, 3][..], &[w.rank(), 1, 1][..]), "{m}");
        let want_names: &[&str] = match m {
            "conv_loha_t" => &["hada_t1", "hada_t2", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"],
            "conv_lokr_t" => &["lokr_t2", "lokr_w1", "lokr_w2_a", "lokr_w2_b"],
            _ => &["lora_down.weight", "lora_mid.weight", "lora_up.weight"],
        };
        let mut names: Vec<&str> = w.lycoris.iter().flat_map(|l| l.tensors.iter().map(|(n, _)| n.as_str())).collect();
        names.sort();
        assert_eq!(names, want_names, "{m}");
        // LoCon's Tucker form is the convolution LoRA of rank 2 (down 3x3, up 1x1) beside
        // its own tensors.
        if m == "conv_locon_t" {
            assert!(w.lycoris.as_ref().is_some_and(|l| l.is_tucker_locon()) && w.rank() == 2, "{m}");
        }
        let conv = Conv2dConfig::new([4, 6], [3, 3]).with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1)).init::<Flex>(&device);
        let mut layer = LoraConv2d::new(conv);
        let base: Vec<f32> = layer.base.weight.val().into_data().to_vec().unwrap();
        layer.attach_weights(w, m, &device).unwrap();
        let attached: Vec<&str> = layer.lycoris.iter().flat_map(|a| a.names().iter().copied()).collect();
        let core = attached.iter().any(|n| n.contains("_t")) || layer.adapter.as_ref().is_some_and(|a| a.is_tucker());
        assert!(core, "{m}: attached in its Tucker form: {attached:?}");
        let merged: Vec<f32> = layer.merged().weight.val().into_data().to_vec().unwrap();
        let delta: Vec<f32> = merged.iter().zip(&base).map(|(a, b)| a - b).collect();
        assert!(rel(&delta, &want[m].data) < 1e-5, "{m} attached");
    }
    let bytes = set.to_bytes(AdapterFormat::Kohya, SaveDtype::F32).unwrap();
    let (back, _) = AdapterSet::from_bytes(&bytes, Path::new("x"), &index, ReadOptions::default()).unwrap();
    for m in modules {
        let err = rel(&back.get(&key(m)).unwrap().delta().data, &want[m].data);
        assert!(err < 1e-5, "{m} written and read back: relative error {err}");
    }

    let file = tensors("lycoris_tucker.safetensors");
    let without = |module: &str, drop: &str| {
        let t: Vec<(String, &HostTensor)> = file.iter().filter(|(k, _)| k.contains(module) && !k.ends_with(drop)).map(|(k, v)| (k.clone(), v)).collect();
        let bytes = lora_core::tensor_io::serialize(&t, SaveDtype::F32, HashMap::new()).unwrap();
        AdapterSet::from_bytes(&bytes, Path::new("t.safetensors"), &index, ReadOptions::default()).map(|_| ()).unwrap_err().to_string()
    };
    for (module, drop, expect) in [("conv_loha_t", "hada_t2", "hada_t2"), ("conv_lokr_t", "lokr_w2_b", "lokr_t2"), ("conv_loha_t", "hada_w1_b", "hada_w1_b")] {
        let err = without(module, drop);
        assert!(err.contains(expect) && err.contains(module) && err.contains("t.safetensors"), "{module} without {drop}: {err}");
    }
    // A `lora_mid` that does not fit its `lora_down` is an error naming it.
    let mut t: Vec<(String, HostTensor)> = file.iter().filter(|(k, _)| k.contains("conv_locon_t")).map(|(k, v)| (k.clone(), v.clone())).collect();
    t.iter_mut().filter(|(k, _)| k.ends_with("lora_mid.weight")).for_each(|(_, v)| *v = HostTensor::new(vec![2, 3, 3, 3], vec![0.0; 54]).unwrap());
    let refs: Vec<(String, &HostTensor)> = t.iter().map(|(k, v)| (k.clone(), v)).collect();
    let bytes = lora_core::tensor_io::serialize(&refs, SaveDtype::F32, HashMap::new()).unwrap();
    let err = AdapterSet::from_bytes(&bytes, Path::new("t.safetensors"), &index, ReadOptions::default()).map(|_| ()).unwrap_err().to_string();
    assert!(err.contains("lora_mid") && err.contains("conv_locon_t"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// A damaged LyCORIS file (LoHa, LoKr, Tucker LoCon: cut short, a byte overwritten, a
    /// tensor left out, reshaped, filled with NaN, renamed to another algorithm's suffix)
    /// reads as a typed error or as adapters that attach to their layers (or refuse to, with
    /// an error) and run: never a panic.
    #[test]
    fn damaged_lycoris_files_are_errors_not_panics(tucker in any::<bool>(), damage in common::damage()) {
        let name = if tucker { "lycoris_tucker.safetensors" } else { "lycoris.safetensors" };
        let bytes = common::damaged(&std::fs::read(fixture(name)).unwrap(), &damage);
        let modules = ["conv_loha_t", "conv_lokr_t", "conv_locon_t"];
        let mut index = ModuleIndex::new();
        index.add(Component::Unet, modules).unwrap();
        index.add(Component::Unet, MODULES).unwrap();
        for m in modules.iter().chain(MODULES.iter().filter(|m| m.starts_with("conv"))) {
            index.set_kernel(key(m), [3, 3]);
        }
        let Ok((set, _)) = AdapterSet::from_bytes(&bytes, Path::new("bad.safetensors"), &index, ReadOptions { lenient: true }) else {
            return Ok(());
        };
        let device = Default::default();
        for (k, w) in set.iter() {
            let delta = w.delta();
            prop_assert_eq!(delta.data.len(), delta.shape.iter().product::<usize>());
            // Attached to a layer of the update's size, the adapter runs; a layer of
            // another size refuses it with an error.
            let (out, inp) = (delta.shape[0], delta.shape.get(1).copied().unwrap_or(1));
            if w.is_conv() || k.path.starts_with("conv") {
                let kernel = index.kernel(k).unwrap_or([1, 1]);
                for (o, i) in [(out, inp), (out + 1, inp)] {
                    let conv = Conv2dConfig::new([i.max(1), o.max(1)], kernel).with_padding(PaddingConfig2d::Same).init::<Flex>(&device);
                    let mut layer = LoraConv2d::new(conv);
                    if layer.attach_weights(w, &k.path, &device).is_ok() {
                        let x = Tensor::<Flex, 4>::ones([1, i.max(1), 5, 5], &device);
                        let _ = layer.forward(x);
                    }
                }
            } else {
                for (o, i) in [(out, inp), (out, inp + 1)] {
                    let mut layer = LoraLinear::new(LinearConfig::new(i.max(1), o.max(1)).init::<Flex>(&device));
                    if layer.attach_weights(w, &k.path, &device).is_ok() {
                        let _ = layer.forward(Tensor::<Flex, 2>::ones([2, i.max(1)], &device));
                    }
                }
            }
        }
    }
}
