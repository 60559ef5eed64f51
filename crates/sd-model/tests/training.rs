//! A LoRA training step on the UNet: gradients reach the adapters only, and gradient
//! checkpointing gives the same gradients as plain autodiff.

use burn::backend::{Autodiff, Flex};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Distribution, Tensor};
use lora_core::LoraConfig;
use sd_model::targets::{attach_new_adapters, Selection, UnetTargets};
use sd_model::{CheckpointedAutodiff, UNet2DConditionModel, UnetConfig};

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
    let (up, down, base_grad) = step::<Autodiff<Flex>>();
    assert!(!base_grad, "frozen base weights must not get gradients");
    assert!(up.iter().any(|v| *v != 0.0) && down.iter().any(|v| *v != 0.0));
    let (up_c, down_c, base_grad_c) = step::<CheckpointedAutodiff<Flex>>();
    assert!(!base_grad_c);
    for (a, b) in up.iter().chain(&down).zip(up_c.iter().chain(&down_c)) {
        assert!((a - b).abs() <= 1e-5 * (1.0 + a.abs()), "{a} vs {b}");
    }
}
