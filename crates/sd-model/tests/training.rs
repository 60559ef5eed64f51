//! A LoRA training step on the UNet: gradients reach the adapters only, and gradient
//! checkpointing gives the same gradients as plain autodiff.

use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Distribution, Tensor};
use lora_core::LoraConfig;
use sd_model::targets::{attach_new_adapters, Selection, UnetTargets};
use sd_model::{CheckpointedAutodiff, UNet2DConditionModel, UnetConfig};

/// burn's backend RNG is global to the process: tests that seed it take this lock.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Loss gradient of the first `to_q` adapter's `up` and `down`, and whether the base
/// `to_q` weight got a gradient.
fn step<B: AutodiffBackend>() -> (Vec<f32>, Vec<f32>, bool) {
    let device = Default::default();
    B::seed(&device, 7);
    let mut unet = UNet2DConditionModel::<B>::new(&UnetConfig::tiny(), &device).unwrap();
    attach_new_adapters(&mut unet, &Selection::new(UnetTargets::AttnMlp), &LoraConfig::new(2), &device).unwrap();
    // Non-zero `up` so that `down` receives gradients too.
    let attn = &mut unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1;
    let adapter = attn.to_q.adapter.as_mut().unwrap();
    adapter.up.weight = burn::module::Param::from_tensor(Tensor::random([2, 64], Distribution::Normal(0.0, 0.1), &device));
    let x = Tensor::<B, 4>::random([2, 4, 8, 8], Distribution::Normal(0.0, 1.0), &device);
    let t = Tensor::<B, 1>::from_floats([10.0, 900.0], &device);
    let ctx = Tensor::<B, 3>::random([2, 77, 32], Distribution::Normal(0.0, 1.0), &device);
    let loss = unet.forward(x.clone(), t, ctx).unwrap().sub(x).powf_scalar(2.0).mean();
    let grads = loss.backward();
    let q = &unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q;
    let a = q.adapter.as_ref().unwrap();
    let up = a.up.weight.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap();
    let down = a.down.weight.grad(&grads).unwrap().into_data().to_vec::<f32>().unwrap();
    (up, down, q.base.weight.grad(&grads).is_some())
}

#[test]
fn adapter_gradients_with_and_without_checkpointing() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let (up, down, base_grad) = step::<Autodiff<Flex>>();
    assert!(!base_grad, "frozen base weights must not get gradients");
    assert!(up.iter().any(|v| *v != 0.0) && down.iter().any(|v| *v != 0.0));
    let (up_c, down_c, base_grad_c) = step::<CheckpointedAutodiff<Flex>>();
    assert!(!base_grad_c);
    for (a, b) in up.iter().chain(&down).zip(up_c.iter().chain(&down_c)) {
        assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "{a} vs {b}");
    }
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
