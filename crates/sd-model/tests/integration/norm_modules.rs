//! LyCORIS' norm modules (`train_norm`) on the UNet: which norms the presets reach, their
//! kohya names, training through the UNet, files written and read back, merging, and a
//! checkpoint saved after baking them in.

use burn::backend::{Autodiff, Flex};
use burn::module::{Module, Param};
use burn::tensor::{Distribution, Tensor};
use lora_core::sites::{self, LoraSites};
use lora_core::{AdapterFormat, AdapterKey, AdapterSet, Component, LoraConfig, LoraSiteMut, ModuleIndex, ReadOptions, SaveDtype};
use sd_model::targets::{attach_new_adapters_by_kernel, KernelConfigs, Selection, UnetTargets};
use sd_model::{UNet2DConditionModel, UnetConfig};

type B = Autodiff<Flex>;

/// The tiny UNet's norms: 8 ResNet blocks (one per down level, two in the middle, two per
/// up level) with `norm1` and `norm2`, and 4 transformers (one down, one mid, two up) with
/// `norm` and one block's `norm1`–`norm3`.
const RESNET_NORMS: usize = 8 * 2;
const TRANSFORMER_NORMS: usize = 4 * 4;

fn unet() -> UNet2DConditionModel<B> {
    UNet2DConditionModel::<B>::new(&UnetConfig::tiny(), &Default::default()).unwrap().no_grad()
}

fn attach(unet: &mut UNet2DConditionModel<B>, selection: &Selection<UnetTargets>) -> sd_model::targets::Attached {
    let (linear, spatial) = (LoraConfig::new(2).with_algo(lora_core::Algo::Loha), LoraConfig::new(2).with_algo(lora_core::Algo::Loha));
    attach_new_adapters_by_kernel(unet, selection, KernelConfigs { linear: &linear, spatial: &spatial }, &Default::default()).unwrap()
}

/// Random values for every norm module (fresh ones are zero: no effect).
fn randomize_norms(unet: &mut UNet2DConditionModel<B>) {
    unet.visit_lora_sites(&mut |_, mut site| {
        if site.is_norm() && let Some(a) = site.lycoris_adapter_mut() {
            for p in a.factors.iter_mut() {
                *p = Param::from_tensor(p.val().random_like(Distribution::Normal(0.0, 0.3)));
            }
        }
    });
}

fn inputs() -> (Tensor<B, 4>, Tensor<B, 1>, Tensor<B, 3>) {
    let device = Default::default();
    (
        Tensor::random([1, 4, 8, 8], Distribution::Normal(0.0, 1.0), &device),
        Tensor::from_floats([500.0], &device),
        Tensor::random([1, 77, 32], Distribution::Normal(0.0, 1.0), &device),
    )
}

fn max_diff(a: Tensor<B, 4>, b: Tensor<B, 4>) -> f32 {
    (a - b).abs().max().into_scalar()
}

/// Norms are sites only with `train_norm`: the transformers' for `attn-mlp`, theirs and the
/// ResNet blocks' for `conv`, none for `attn`; exclude patterns apply; each has its kohya
/// name (`lora_unet_down_blocks_1_resnets_0_norm1`).
#[test]
fn presets_reach_the_norms_lycoris_trains() {
    let mut u = unet();
    assert_eq!(attach(&mut u, &Selection::new(UnetTargets::Conv)).norms, 0, "no norms without train_norm");
    for (targets, want) in [(UnetTargets::Conv, RESNET_NORMS + TRANSFORMER_NORMS), (UnetTargets::AllLinear, RESNET_NORMS + TRANSFORMER_NORMS), (UnetTargets::AttnMlp, TRANSFORMER_NORMS), (UnetTargets::Attn, 0)] {
        let mut u = unet();
        assert_eq!(attach(&mut u, &Selection::new(targets).with_norms(true)).norms, want, "{targets:?}");
    }
    let mut u = unet();
    let attached = attach(&mut u, &Selection::new(UnetTargets::Conv).with_norms(true).exclude(["*.attentions.*"]));
    assert_eq!(attached.norms, RESNET_NORMS, "LyCORIS' unet-convblock-only");
    assert!(attached.paths.contains(&"down_blocks.1.resnets.0.norm1".to_string()));

    let mut index = ModuleIndex::new();
    sites::add_to_index(&mut index, &mut u).unwrap();
    for path in ["down_blocks.1.resnets.0.norm1", "mid_block.attentions.0.norm", "up_blocks.0.attentions.1.transformer_blocks.0.norm3"] {
        let key = AdapterKey::new(Component::Unet, path);
        assert_eq!(index.resolve_kohya(&key.kohya_name()), Some(&key), "{path}");
    }
}

/// Trained through the UNet (the fused norm ops' backward gives every module a gradient;
/// the base norms take none); written as LyCORIS writes them and read into a fresh UNet,
/// the same output; merged, the same output; baked and saved, a checkpoint in diffusers'
/// names with the merged norms.
#[test]
fn norm_modules_train_save_load_and_merge() {
    let mut u = unet();
    let attached = attach(&mut u, &Selection::new(UnetTargets::Conv).with_norms(true));
    let (x, t, ctx) = inputs();
    let before = u.forward(x.clone(), t.clone(), ctx.clone()).unwrap();
    randomize_norms(&mut u);
    let y = u.forward(x.clone(), t.clone(), ctx.clone()).unwrap();
    assert!(max_diff(y.clone(), before) > 1e-3, "the norm modules change the output");

    let grads = (y.clone() - x.clone()).powf_scalar(2.0).mean().backward();
    let mut modules = 0;
    u.visit_lora_sites(&mut |path, site| {
        if let (true, Some(a)) = (site.is_norm(), site.lycoris_adapter()) {
            modules += 1;
            for (name, p) in a.names().iter().zip(&a.factors) {
                assert!(p.grad(&grads).is_some(), "{path}.{name} takes a gradient");
            }
        }
    });
    assert_eq!(modules, attached.norms);
    let norm1 = &u.down_blocks[1].resnets[0].norm1.base;
    assert!(norm1.gamma.as_ref().unwrap().grad(&grads).is_none(), "the base norm is frozen");

    let mut set = AdapterSet::new();
    sites::collect_adapters(&mut u, &mut set).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lycoris.safetensors");
    set.save(&path, AdapterFormat::Kohya, SaveDtype::F32).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let (st, meta) = lora_core::tensor_io::parse(&bytes, &path).unwrap();
    let names = st.names();
    assert!(names.contains(&"lora_unet_down_blocks_1_resnets_0_norm1.w_norm") && names.contains(&"lora_unet_mid_block_attentions_0_transformer_blocks_0_norm2.b_norm"));
    assert!(!names.iter().any(|n| n.contains("norm1.alpha") || n.contains("norm2.alpha")), "norm modules have no alpha");
    let args: serde_json::Value = serde_json::from_str(&meta["ss_network_args"]).unwrap();
    assert_eq!((args["algo"].as_str(), args["train_norm"].as_str()), (Some("loha"), Some("True")));

    let mut fresh = u.clone();
    fresh.visit_lora_sites(&mut |_, mut site| site.detach());
    let mut index = ModuleIndex::new();
    sites::add_to_index(&mut index, &mut fresh).unwrap();
    let (read, _) = AdapterSet::load(&path, &index, ReadOptions::default()).unwrap();
    assert_eq!(sites::attach_adapters(&mut fresh, &read, 1.0, &Default::default()).unwrap(), attached.paths.len());
    let read_y = fresh.forward(x.clone(), t.clone(), ctx.clone()).unwrap();
    assert!(max_diff(read_y, y.clone()) < 1e-5, "read back");

    fresh.visit_lora_sites(&mut |_, mut site| site.merge_in_place());
    let merged_y = fresh.forward(x.clone(), t.clone(), ctx.clone()).unwrap();
    assert!(max_diff(merged_y, y.clone()) < 1e-4, "merged");

    fresh.visit_lora_sites(&mut |_, mut site| site.bake());
    let tensors = sd_model::save::checkpoint_tensors(&fresh).unwrap();
    let gamma = &tensors["down_blocks.1.resnets.0.norm1.weight"];
    let want = fresh.down_blocks[1].resnets[0].norm1.base.gamma.as_ref().unwrap().val().inner().into_data().to_vec::<f32>().unwrap();
    assert_eq!(gamma.data, want, "the baked norm saves under diffusers' name");
    assert!(!tensors.keys().any(|k| k.contains(".base.") || k.contains("gamma")), "no wrapper names in the checkpoint");
}

/// A norm module needs a norm site: on a linear layer's key it is an error naming it, and a
/// LoRA on a norm's key likewise.
#[test]
fn norm_modules_fit_norms_only() {
    let mut u = unet();
    let mut index = ModuleIndex::new();
    sites::add_to_index(&mut index, &mut u).unwrap();
    let w = lora_core::norm::weights(lora_core::HostTensor::new(vec![64], vec![0.1; 64]).unwrap(), None, "k").unwrap();
    let mut set = AdapterSet::new();
    set.insert(AdapterKey::new(Component::Unet, "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"), w).unwrap();
    let e = sites::attach_adapters(&mut u, &set, 1.0, &Default::default()).unwrap_err().to_string();
    assert!(e.contains("to_q") && e.contains("GroupNorm or LayerNorm"), "{e}");
    let mut visited = 0;
    u.visit_lora_sites(&mut |_, site| visited += usize::from(matches!(site, LoraSiteMut::Norm(_))));
    assert_eq!(visited, RESNET_NORMS + TRANSFORMER_NORMS);
}
