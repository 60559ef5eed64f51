//! Only adapter parameters receive gradients; base weights stay frozen.

use burn::backend::{Autodiff, Flex};
use burn::module::Param;
use burn::nn::conv::Conv2dConfig;
use burn::nn::{LinearConfig, PaddingConfig2d};
use burn::tensor::{Distribution, Tensor};
use lora_core::{LoraConfig, LoraConv2d, LoraLinear};

type B = Autodiff<Flex>;

#[test]
fn linear_gradients_reach_adapter_only() {
    let device = Default::default();
    let mut layer = LoraLinear::new(LinearConfig::new(6, 5).init::<B>(&device));
    layer.attach_new(&LoraConfig::new(2).with_alpha(4.0), &device).unwrap();
    // With up = 0, d(loss)/d(down) is zero but d(loss)/d(up) is not; make up non-zero so both flow.
    let adapter = layer.adapter.as_mut().unwrap();
    adapter.up.weight = Param::from_tensor(Tensor::random([2, 5], Distribution::Default, &device));
    let x = Tensor::<B, 2>::random([3, 6], Distribution::Default, &device);
    let grads = layer.forward(x).powf_scalar(2.0).sum().backward();
    let adapter = layer.adapter.as_ref().unwrap();
    let g_down = adapter.down.weight.grad(&grads).expect("down has a gradient");
    let g_up = adapter.up.weight.grad(&grads).expect("up has a gradient");
    assert!(g_down.abs().sum().into_scalar() > 0.0);
    assert!(g_up.abs().sum().into_scalar() > 0.0);
    assert!(layer.base.weight.grad(&grads).is_none(), "base weight must be frozen");
    assert!(layer.base.bias.as_ref().unwrap().grad(&grads).is_none(), "base bias must be frozen");
    assert!(!layer.base.weight.is_require_grad());
}

#[test]
fn conv_gradients_reach_adapter_only() {
    let device = Default::default();
    let base = Conv2dConfig::new([3, 4], [3, 3])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init::<B>(&device);
    let mut layer = LoraConv2d::new(base);
    layer.attach_new(&LoraConfig::new(2), &device).unwrap();
    let x = Tensor::<B, 4>::random([2, 3, 5, 5], Distribution::Default, &device);
    let grads = layer.forward(x).sum().backward();
    let adapter = layer.adapter.as_ref().unwrap();
    // Fresh adapter: up is zero, so only up gets a non-zero gradient (as in kohya/PEFT).
    assert!(adapter.up.weight.grad(&grads).unwrap().abs().sum().into_scalar() > 0.0);
    assert!(adapter.down.weight.grad(&grads).is_some());
    assert!(layer.base.weight.grad(&grads).is_none());
    assert!(layer.base.bias.as_ref().unwrap().grad(&grads).is_none());
}

#[test]
fn merging_does_not_make_base_trainable() {
    let device = Default::default();
    let mut layer = LoraLinear::new(LinearConfig::new(4, 4).init::<B>(&device));
    layer.attach_new(&LoraConfig::new(2), &device).unwrap();
    layer.merge_in_place();
    assert!(!layer.base.weight.is_require_grad());
    let x = Tensor::<B, 2>::ones([1, 4], &device).require_grad();
    let grads = layer.forward(x.clone()).sum().backward();
    assert!(layer.base.weight.grad(&grads).is_none());
    assert!(x.grad(&grads).is_some());
}
