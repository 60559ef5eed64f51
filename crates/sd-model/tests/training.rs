//! A LoRA training step on the UNet: gradients reach the adapters only, and gradient
//! checkpointing (`forward_backward_checkpointed`) gives the same gradients as plain autodiff.

use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::AutodiffBackend;
use burn::module::{ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Distribution, Tensor};
use lora_core::{LoraConfig, LoraSites};
use sd_model::targets::{attach_new_adapters, Selection, UnetTargets};
use sd_model::checkpoint::CheckpointOptions;
use sd_model::{UNet2DConditionModel, UnetConfig};

/// burn's backend RNG is global to the process: tests that seed it take this lock.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A tiny UNet with LoRA adapters (`up` random, so that `down` gets gradients too), frozen
/// base unless `full`, and inputs for it.
#[allow(clippy::type_complexity)]
fn setup<B: AutodiffBackend>(full: bool, seed: u64) -> (UNet2DConditionModel<B>, Tensor<B, 4>, Tensor<B, 1>, Tensor<B, 3>, usize) {
    use burn::module::Module;
    let device = Default::default();
    B::seed(&device, seed);
    let unet = UNet2DConditionModel::<B>::new(&UnetConfig::tiny(), &device).unwrap();
    let mut unet = if full { unet } else { unet.no_grad() };
    // `full` also trains the GroupNorm / LayerNorm parameters and puts adapters on every
    // other block kind: ResNets, samplers, the input and output convolutions and the time
    // embedding (whose gradient gathers a contribution from every ResNet).
    let mut selection = Selection::new(UnetTargets::AttnMlp);
    if full {
        selection = selection.include(["time_embedding.*", "*.resnets.*", "*samplers.*", "conv_in", "conv_out"]);
    }
    let sites = attach_new_adapters(&mut unet, &selection, &LoraConfig::new(2), &device).unwrap().len();
    unet.visit_lora_sites(&mut |_, site| match site {
        lora_core::LoraSiteMut::Linear(l) => {
            if let Some(a) = l.adapter.as_mut() {
                a.up.weight = random(a.up.weight.dims(), &device);
            }
        }
        lora_core::LoraSiteMut::Conv(c) => {
            if let Some(a) = c.adapter.as_mut() {
                a.up.weight = random(a.up.weight.dims(), &device);
            }
        }
        lora_core::LoraSiteMut::Norm(_) => {}
    });
    let x = Tensor::<B, 4>::random([2, 4, 8, 8], Distribution::Normal(0.0, 1.0), &device);
    let t = Tensor::<B, 1>::from_floats([10.0, 900.0], &device);
    let ctx = Tensor::<B, 3>::random([2, 77, 32], Distribution::Normal(0.0, 1.0), &device);
    (unet, x, t, ctx, sites)
}

fn random<B: AutodiffBackend, const D: usize>(dims: [usize; D], device: &B::Device) -> Param<Tensor<B, D>> {
    Param::from_tensor(Tensor::random(dims, Distribution::Normal(0.0, 0.1), device))
}

/// The MSE of the prediction against `target`, weighted per sample as the trainer does.
fn loss_fn<B: AutodiffBackend>(target: Tensor<B, 4>) -> impl FnOnce(Tensor<B, 4>) -> Tensor<B, 1> {
    move |pred| {
        let w = Tensor::<B, 1>::from_floats([1.0, 0.25], &target.device());
        (pred - target).powf_scalar(2.0).mean_dim(3).mean_dim(2).mean_dim(1).reshape([2]).mul(w).mean()
    }
}

/// Compares two sets of parameter gradients over every parameter of a module.
struct Compare<'a> {
    plain: &'a GradientsParams,
    checkpointed: &'a GradientsParams,
    tolerance: f32,
    compared: usize,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Compare<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let a = self.plain.get::<B::InnerBackend, D>(param.id);
        let b = self.checkpointed.get::<B::InnerBackend, D>(param.id);
        match (a, b) {
            (None, None) => {}
            (Some(a), Some(b)) => {
                let (a, b) = (a.into_data().convert::<f32>().to_vec::<f32>().unwrap(), b.into_data().convert::<f32>().to_vec::<f32>().unwrap());
                assert!(rel_err(&b, &a) <= self.tolerance, "parameter {:?}: relative error {}", param.dims(), rel_err(&b, &a));
                self.compared += 1;
            }
            (a, b) => panic!("parameter {:?}: gradient only on one side ({} vs {})", param.dims(), a.is_some(), b.is_some()),
        }
    }
}

/// Checkpointed against plain autodiff on the same model and inputs: the loss, every
/// parameter's gradient and the text embeddings' gradient; returns how many parameters
/// have gradients.
fn compare_checkpointing<B: AutodiffBackend>(unet: &UNet2DConditionModel<B>, x: Tensor<B, 4>, t: Tensor<B, 1>, ctx: Tensor<B, 3>, tolerance: f32, context_tolerance: f32) -> usize {
    use burn::module::Module;
    let ctx_leaf = ctx.clone().require_grad();
    let loss = loss_fn(x.clone())(unet.forward(x.clone(), t.clone(), ctx_leaf.clone()).unwrap());
    let mut grads = loss.backward();
    let ctx_grad = ctx_leaf.grad_remove(&mut grads).unwrap();
    let plain = GradientsParams::from_grads(grads, unet);
    let loss = loss.inner().into_data().to_vec::<f32>().unwrap();

    let options = CheckpointOptions { context_grad: true, ..Default::default() };
    let step = unet.forward_backward_checkpointed(x.clone(), t, ctx, options, loss_fn(x)).unwrap();
    assert_eq!(step.grads.len(), plain.len(), "the same parameters get gradients");
    let loss_c = step.loss.into_data().to_vec::<f32>().unwrap();
    assert!(rel_err(&loss_c, &loss) <= tolerance, "loss {loss_c:?} vs {loss:?}");
    let mut compare = Compare { plain: &plain, checkpointed: &step.grads, tolerance, compared: 0 };
    unet.visit(&mut compare);
    assert_eq!(compare.compared, plain.len());
    let ctx_c = step.context_grad.expect("asked for").into_data().to_vec::<f32>().unwrap();
    let ctx_grad = ctx_grad.into_data().to_vec::<f32>().unwrap();
    assert!(rel_err(&ctx_c, &ctx_grad) <= context_tolerance, "context grad {}", rel_err(&ctx_c, &ctx_grad));
    plain.len()
}

#[test]
fn adapter_gradients_with_and_without_checkpointing() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let (unet, x, t, ctx, sites) = setup::<Autodiff<Flex>>(false, 7);
    let n = compare_checkpointing(&unet, x, t, ctx, 2e-6, 2e-6);
    assert_eq!(n, 2 * sites, "up and down of each adapter, nothing else");
}

#[test]
fn every_parameter_gradient_with_and_without_checkpointing() {
    // A full fine-tune: every block, the skips and the time embedding carry gradients.
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let (unet, x, t, ctx, sites) = setup::<Autodiff<Flex>>(true, 8);
    let n = compare_checkpointing(&unet, x, t, ctx, 2e-6, 2e-6);
    let time = &unet.time_embedding.linear_1.adapter;
    assert!(time.is_some(), "the time embedding has an adapter");
    assert!(n > 2 * sites, "{n} parameters, {sites} adapters");
}

#[test]
fn half_precision_base_with_and_without_checkpointing() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let (unet, x, t, ctx, _) = setup::<Autodiff<Flex>>(false, 9);
    let unet = lora_core::precision::cast_frozen(unet, burn::tensor::FloatDType::BF16);
    // The same bf16 operations on both sides, but a gradient with several contributions
    // sums them in the order of its graph's backward steps, which differs in the first
    // trained block (measured: up to 1.3% there, bit-identical after it). The text embeddings'
    // gradient sums one contribution per transformer: plain autodiff in bf16,
    // checkpointing in f32.
    compare_checkpointing(&unet, x, t, ctx, 3e-2, 5e-2);
}

#[test]
fn checkpointing_rejects_bad_inputs() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let (unet, x, t, ctx, _) = setup::<Autodiff<Flex>>(false, 10);
    let odd = Tensor::<Autodiff<Flex>, 4>::zeros([2, 4, 7, 8], &Default::default());
    let err = unet.forward_backward_checkpointed(odd, t, ctx, CheckpointOptions::default(), loss_fn(x));
    assert!(err.is_err());
}

/// Relative error `max|a - b| / max|b|`.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    let diff = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    diff / b.iter().map(|v| v.abs()).fold(1e-12, f32::max)
}

#[test]
fn mixed_precision_base_keeps_f32_adapters_and_tracks_f32() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    use burn::module::Module;
    use burn::tensor::backend::Backend;
    use burn::tensor::{DType, FloatDType};
    type B = Autodiff<Flex>;
    let device = Default::default();
    B::seed(&device, 11);
    let mut unet = UNet2DConditionModel::<B>::new(&UnetConfig::tiny(), &device).unwrap().no_grad();
    attach_new_adapters(&mut unet, &Selection::new(UnetTargets::AttnMlp), &LoraConfig::new(2), &device).unwrap();
    let attn = &mut unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1;
    let adapter = attn.to_q.adapter.as_mut().unwrap();
    adapter.up.weight = burn::module::Param::from_tensor(Tensor::random([2, 64], Distribution::Normal(0.0, 0.1), &device));
    let x = Tensor::<B, 4>::random([2, 4, 8, 8], Distribution::Normal(0.0, 1.0), &device);
    let t = Tensor::<B, 1>::from_floats([10.0, 900.0], &device);
    let ctx = Tensor::<B, 3>::random([2, 77, 32], Distribution::Normal(0.0, 1.0), &device);

    let run = |unet: &UNet2DConditionModel<B>| {
        let out = unet.forward(x.clone(), t.clone(), ctx.clone()).unwrap();
        assert_eq!(out.dtype(), DType::F32, "output keeps the input dtype");
        let loss = out.clone().sub(x.clone()).powf_scalar(2.0).mean();
        let grads = loss.backward();
        let a = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.adapter.as_ref().unwrap();
        let up = a.up.weight.grad(&grads).unwrap();
        let down = a.down.weight.grad(&grads).unwrap();
        assert_eq!((up.dtype(), down.dtype()), (DType::F32, DType::F32));
        let v = |t: Tensor<Flex, 2>| t.into_data().to_vec::<f32>().unwrap();
        (out.into_data().to_vec::<f32>().unwrap(), v(up), v(down))
    };
    let (out32, up32, down32) = run(&unet);
    let half = lora_core::precision::cast_frozen(unet.clone(), FloatDType::BF16);
    let q = &half.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q;
    assert_eq!(q.base.weight.val().dtype(), DType::BF16);
    assert_eq!(q.adapter.as_ref().unwrap().up.weight.val().dtype(), DType::F32);
    let (out16, up16, down16) = run(&half);
    // bf16 keeps 8 bits of mantissa: a few percent after a whole UNet is expected.
    assert!(rel_err(&out16, &out32) < 0.05, "output {}", rel_err(&out16, &out32));
    assert!(rel_err(&up16, &up32) < 0.1, "up grad {}", rel_err(&up16, &up32));
    assert!(rel_err(&down16, &down32) < 0.1, "down grad {}", rel_err(&down16, &down32));
}

#[test]
fn a_frozen_model_gets_gradients_for_its_adapters_only() {
    use burn::module::{AutodiffModule, Module};
    use burn::optim::GradientsParams;
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    type B = Autodiff<Flex>;
    let device = Default::default();
    let inner = UNet2DConditionModel::<Flex>::new(&UnetConfig::tiny(), &device).unwrap();
    // Parameters such as GroupNorm's require gradients until the model is frozen.
    let unfrozen = <UNet2DConditionModel<B> as AutodiffModule<B>>::from_inner(inner.clone());
    assert!(unfrozen.conv_norm_out.gamma.as_ref().unwrap().is_require_grad());
    let mut unet = <UNet2DConditionModel<B> as AutodiffModule<B>>::from_inner(inner).no_grad();
    let n = attach_new_adapters(&mut unet, &Selection::new(UnetTargets::Attn), &LoraConfig::new(2), &device).unwrap().len();
    let x = Tensor::<B, 4>::random([1, 4, 8, 8], Distribution::Normal(0.0, 1.0), &device);
    let t = Tensor::<B, 1>::from_floats([10.0], &device);
    let ctx = Tensor::<B, 3>::random([1, 77, 32], Distribution::Normal(0.0, 1.0), &device);
    let loss = unet.forward(x.clone(), t, ctx).unwrap().sub(x).powf_scalar(2.0).mean();
    let grads = GradientsParams::from_grads(loss.backward(), &unet);
    assert_eq!(grads.len(), 2 * n, "down and up of each adapter, nothing else");
}

/// SDXL's added conditioning under checkpointing: a full fine-tune of the tiny SDXL UNet
/// (adapters on the added-conditioning MLP too) gives plain autodiff's loss, parameter
/// gradients and gradients of both text inputs (the states and the pooled embedding).
#[test]
fn sdxl_added_conditioning_with_and_without_checkpointing() {
    use burn::module::Module;
    use sd_model::AddedConditions;
    type B = Autodiff<Flex>;
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let device = Default::default();
    <B as burn::tensor::backend::Backend>::seed(&device, 11);
    let mut unet = UNet2DConditionModel::<B>::new(&UnetConfig::tiny_sdxl(), &device).unwrap();
    let selection = Selection::new(UnetTargets::AttnMlp).include(["add_embedding.*", "time_embedding.*", "*.resnets.*"]);
    attach_new_adapters(&mut unet, &selection, &LoraConfig::new(2), &device).unwrap();
    unet.visit_lora_sites(&mut |_, site| {
        if let lora_core::LoraSiteMut::Linear(l) = site && let Some(a) = l.adapter.as_mut() {
            a.up.weight = random(a.up.weight.dims(), &device);
        }
    });
    assert!(unet.add_embedding.as_ref().unwrap().linear_1.adapter.is_some());
    let x = Tensor::<B, 4>::random([2, 4, 8, 8], Distribution::Normal(0.0, 1.0), &device);
    let t = Tensor::<B, 1>::from_floats([10.0, 900.0], &device);
    let ctx = Tensor::<B, 3>::random([2, 77, 64], Distribution::Normal(0.0, 1.0), &device);
    let pooled = Tensor::<B, 2>::random([2, 32], Distribution::Normal(0.0, 1.0), &device);
    let time_ids = AddedConditions::<B>::sdxl_time_ids(&[((512, 512), (0, 0), (512, 512)), ((768, 1024), (16, 32), (1024, 1024))], &device);

    let (ctx_leaf, pooled_leaf) = (ctx.clone().require_grad(), pooled.clone().require_grad());
    let added = AddedConditions { text_embeds: pooled_leaf.clone(), time_ids: time_ids.clone() };
    let loss = loss_fn(x.clone())(unet.forward_added(x.clone(), t.clone(), ctx_leaf.clone(), Some(added)).unwrap());
    let mut grads = loss.backward();
    let ctx_grad = ctx_leaf.grad_remove(&mut grads).unwrap().into_data().to_vec::<f32>().unwrap();
    let pooled_grad = pooled_leaf.grad_remove(&mut grads).unwrap().into_data().to_vec::<f32>().unwrap();
    let plain = GradientsParams::from_grads(grads, &unet);
    let loss = loss.inner().into_data().to_vec::<f32>().unwrap();

    let options = CheckpointOptions {
        context_grad: true,
        added: Some(AddedConditions { text_embeds: pooled, time_ids }),
        added_grad: true,
        ..Default::default()
    };
    let step = unet.forward_backward_checkpointed(x.clone(), t, ctx, options, loss_fn(x)).unwrap();
    assert_eq!(step.grads.len(), plain.len(), "the same parameters get gradients");
    let loss_c = step.loss.into_data().to_vec::<f32>().unwrap();
    assert!(rel_err(&loss_c, &loss) <= 2e-6, "loss {loss_c:?} vs {loss:?}");
    let mut compare = Compare { plain: &plain, checkpointed: &step.grads, tolerance: 2e-6, compared: 0 };
    unet.visit(&mut compare);
    assert_eq!(compare.compared, plain.len());
    let add = unet.add_embedding.as_ref().unwrap().linear_1.adapter.as_ref().unwrap();
    assert!(step.grads.get::<Flex, 2>(add.down.weight.id).is_some(), "the added MLP's adapter is trained");
    let ctx_c = step.context_grad.unwrap().into_data().to_vec::<f32>().unwrap();
    assert!(rel_err(&ctx_c, &ctx_grad) <= 2e-6, "context grad {}", rel_err(&ctx_c, &ctx_grad));
    let pooled_c = step.text_embeds_grad.unwrap().into_data().to_vec::<f32>().unwrap();
    assert!(pooled_grad.iter().any(|g| *g != 0.0));
    assert!(rel_err(&pooled_c, &pooled_grad) <= 2e-6, "pooled grad {}", rel_err(&pooled_c, &pooled_grad));
}
