//! Every kernel switch at once on a bucket-shaped input (lavapipe, `vulkan-test`).
//!
//! Aspect-ratio buckets give latents that are neither square nor powers of two, and the
//! other kernel tests use square 8x8 inputs one switch at a time. Here the whole
//! [`KernelSettings::fast`] set (what acts on wgpu: the convolution op, the fused norms and
//! softmax, the fixed matmul, the one-op LoRA linear layers, the fused concatenation) runs a
//! tiny UNet with adapters on every linear and conv layer against burn's own ops: the output,
//! every adapter gradient, and the no-grad forward pass that inference takes.

use burn::backend::{Autodiff, Wgpu};
use burn::module::{AutodiffModule, Module, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Distribution, FloatDType, Tensor};
use lora_core::kernels::{vendor_stats, KernelSettings};
use lora_core::{LoraConfig, LoraSiteMut, LoraSites};

use crate::checkpoint::CheckpointOptions;
use crate::targets::{attach_new_adapters, Selection, UnetTargets};
use crate::{UNet2DConditionModel, UnetConfig};

type W = Autodiff<Wgpu>;

/// Gives every adapter a non-zero `up` projection (fresh ones start at zero, which leaves
/// the `down` gradients zero and the adapters' forward products untested). Drawn on the
/// device: nothing is read back (a read of a padded-row buffer is CUDA-only, see the module
/// docs).
fn randomise_up_projections(unet: &mut UNet2DConditionModel<W>) {
    let device = Default::default();
    fn random<const D: usize>(like: &Param<Tensor<W, D>>, device: &burn::tensor::Device<W>) -> Param<Tensor<W, D>> {
        Param::from_tensor(Tensor::random(like.dims(), Distribution::Uniform(-0.1, 0.1), device))
    }
    unet.visit_lora_sites(&mut |_, site| match site {
        LoraSiteMut::Linear(l) => {
            if let Some(a) = l.adapter.as_mut() {
                a.up.weight = random(&a.up.weight, &device);
            }
        }
        LoraSiteMut::Conv(c) => {
            if let Some(a) = c.adapter.as_mut() {
                a.up.weight = random(&a.up.weight, &device);
            }
        }
        LoraSiteMut::Norm(_) => {}
    });
}

/// Where the gradients come from: one backward pass, or the checkpointed step's map.
enum Grads<'a> {
    Graph(&'a <W as AutodiffBackend>::Gradients),
    Params(&'a GradientsParams),
}

impl Grads<'_> {
    fn of<const D: usize>(&self, param: &Param<Tensor<W, D>>) -> Option<Tensor<Wgpu, 1>> {
        let grad = match self {
            Self::Graph(grads) => param.grad(grads),
            Self::Params(grads) => grads.get::<Wgpu, D>(param.id),
        };
        grad.map(|g| g.cast(FloatDType::F32).flatten(0, D - 1))
    }
}

/// Every adapter gradient (f32, flattened) in site order, with the site's path and projection.
fn adapter_grads(unet: &mut UNet2DConditionModel<W>, grads: Grads<'_>) -> Named {
    let mut out = Vec::new();
    unet.visit_lora_sites(&mut |path, site| {
        let mut push = |what: &str, grad: Option<Tensor<Wgpu, 1>>| {
            out.push((format!("{path} {what}"), grad.unwrap_or_else(|| panic!("{path} {what}: no gradient"))));
        };
        match site {
            LoraSiteMut::Linear(l) => {
                if let Some(a) = &l.adapter {
                    push("up", grads.of(&a.up.weight));
                    push("down", grads.of(&a.down.weight));
                }
            }
            LoraSiteMut::Conv(c) => {
                if let Some(a) = &c.adapter {
                    push("up", grads.of(&a.up.weight));
                    push("down", grads.of(&a.down.weight));
                }
            }
            LoraSiteMut::Norm(_) => {}
        }
    });
    out
}

/// The tiny UNet with adapters on every linear and conv layer (f32, non-zero `up`
/// projections) and its inputs, the same in every run.
fn bucket_case() -> (UNet2DConditionModel<W>, Inputs) {
    let device = Default::default();
    // Fixed weights and inputs: the f16 test's bounds are statistical.
    <W as burn::tensor::backend::Backend>::seed(&device, 7);
    let mut unet = UNet2DConditionModel::<W>::new(&UnetConfig::tiny(), &device).unwrap().no_grad();
    attach_new_adapters(&mut unet, &Selection::new(UnetTargets::Conv), &LoraConfig::new(2), &device).unwrap();
    randomise_up_projections(&mut unet);
    (unet, bucket_inputs())
}

/// Results by name, flattened to f32.
type Named = Vec<(String, Tensor<Wgpu, 1>)>;

/// Latents, timesteps and text context.
type Inputs = (Tensor<W, 4>, Tensor<W, 1>, Tensor<W, 3>);

/// Latents of a 48x80 px bucket (6x10, then 3x5 = 15 tokens on the attention level),
/// timesteps and a text context.
fn bucket_inputs() -> Inputs {
    let device = Default::default();
    let x = Tensor::<W, 4>::random([2, 4, 6, 10], Distribution::Normal(0.0, 1.0), &device);
    let t = Tensor::<W, 1>::from_floats([10.0, 900.0], &device);
    let ctx = Tensor::<W, 3>::random([2, 77, 32], Distribution::Normal(0.0, 1.0), &device);
    (x, t, ctx)
}

/// The loss scale of every run (see [`results`]).
const LOSS_SCALE: f32 = 4096.0;

/// Every switch off (the fused concatenation too).
fn off() -> KernelSettings {
    KernelSettings { fused_concat: false, ..KernelSettings::default() }
}

/// What `settings` give on `unet`, each result named and flattened to f32: the output and
/// every adapter gradient of a training step, the same gradients with gradient
/// checkpointing, and the no-grad forward pass of inference (adapters unmerged).
fn results(unet: &mut UNet2DConditionModel<W>, inputs: &Inputs, settings: KernelSettings) -> Named {
    let (x, t, ctx) = inputs.clone();
    // Scaled as the trainer scales an f16 loss: unscaled, the f16 gradients of this tiny
    // model would sit among f16's subnormals. Every run uses the same scale.
    let loss = |pred: Tensor<W, 4>| (pred.cast(FloatDType::F32) - x.clone()).powf_scalar(2.0).mean() * LOSS_SCALE;
    let flat = |t: Tensor<Wgpu, 4>| t.cast(FloatDType::F32).flatten::<1>(0, 3);
    settings.apply();
    let out = unet.forward(x.clone(), t.clone(), ctx.clone()).unwrap();
    let graph = loss(out.clone()).backward();
    let mut all = vec![("output".to_string(), flat(out.inner()))];
    all.extend(adapter_grads(unet, Grads::Graph(&graph)));
    let step = unet.forward_backward_checkpointed(x.clone(), t.clone(), ctx.clone(), CheckpointOptions::default(), loss).unwrap();
    all.extend(adapter_grads(unet, Grads::Params(&step.grads)).into_iter().map(|(what, g)| (format!("checkpointed: {what}"), g)));
    let out = unet.valid().forward(x.inner(), t.inner(), ctx.inner()).unwrap();
    all.push(("inference output".to_string(), flat(out)));
    // Read while the switches are still set: burn-fusion may run queued ops late.
    for (_, r) in &all {
        let _: f32 = r.clone().sum().into_scalar();
    }
    off().apply();
    all
}

/// `‖a − r‖ / ‖r‖`.
fn relative_l2(a: Tensor<Wgpu, 1>, r: Tensor<Wgpu, 1>) -> f32 {
    let norm = |t: Tensor<Wgpu, 1>| -> f32 { t.powf_scalar(2.0).sum().sqrt().into_scalar() };
    let n = norm(r.clone());
    assert!(n > 0.0, "an all-zero result");
    norm(a - r) / n
}

/// Largest absolute difference and the reference's largest magnitude.
fn error(ours: Tensor<Wgpu, 1>, reference: Tensor<Wgpu, 1>) -> (f32, f32) {
    let peak: f32 = reference.clone().abs().max().into_scalar();
    (((ours - reference).abs().max().into_scalar()), peak)
}

/// Runs the fast set and the all-off set and checks that every result was computed by the
/// kernels (call counters) without a fallback.
fn fast_and_off(unet: &mut UNet2DConditionModel<W>, inputs: &Inputs, half: bool) -> (Named, Named) {
    let before = vendor_stats();
    let fast = results(unet, inputs, KernelSettings::fast());
    let after = vendor_stats();
    let plain = results(unet, inputs, off());
    assert_eq!(fast.len(), plain.len());
    assert!(fast.len() >= 80, "only {} results", fast.len());
    assert_eq!(after.fallbacks, before.fallbacks, "fallbacks: {:?}", after.last_error);
    let ran = |name: &str, n: u64| assert!(n > 0, "{name}: no calls");
    ran("fused group norm", after.fused_group_norm_calls - before.fused_group_norm_calls);
    ran("fixed matmul", after.fixed_matmul_calls - before.fixed_matmul_calls);
    ran("one-op linear layers", after.fused_lora_linear_calls - before.fused_lora_linear_calls);
    if half {
        ran("flash attention", after.flash_attention_calls - before.flash_attention_calls);
    } else {
        ran("fused softmax", after.fused_softmax_calls - before.fused_softmax_calls);
    }
    (fast, plain)
}

/// f32: every kernel of the fast set against burn's ops, to 1e-4 of each result's peak.
#[test]
fn vulkan_every_switch_on_a_non_square_bucket() {
    let _guard = crate::KERNEL_SWITCHES.lock().unwrap_or_else(|e| e.into_inner());
    let (mut unet, inputs) = bucket_case();
    let (fast, plain) = fast_and_off(&mut unet, &inputs, false);
    for ((what, a), (_, b)) in fast.into_iter().zip(plain) {
        let (err, peak) = error(a, b);
        assert!(peak > 0.0, "{what}: all zero");
        assert!(err <= 1e-4 * peak, "{what}: error {err} of the peak {peak}");
    }
}

/// f16 base weights (the flash kernels on), each result's relative L2 error against the
/// f32 result beside that of burn's own f16 ops. f16 rounding makes both several percent
/// on some adapter gradients (those of the `down` projections sum products of many channels
/// with cancellations), and which results are worst changes with the weights: each result
/// may be up to four times as far off as burn's (a wrong kernel is off by its whole size),
/// and the median ratio must stay near one.
#[test]
fn vulkan_every_switch_on_a_non_square_bucket_in_f16() {
    let _guard = crate::KERNEL_SWITCHES.lock().unwrap_or_else(|e| e.into_inner());
    let (mut unet, inputs) = bucket_case();
    let reference = results(&mut unet, &inputs, off());
    let mut half = lora_core::precision::cast_frozen(unet, FloatDType::F16);
    let (fast, plain) = fast_and_off(&mut half, &inputs, true);
    let mut ratios = Vec::new();
    for (((what, a), (_, b)), (_, r)) in fast.into_iter().zip(plain).zip(reference) {
        let (ours, burn) = (relative_l2(a, r.clone()), relative_l2(b, r));
        assert!(ours <= 4.0 * burn + 5e-3, "{what}: relative error {ours} against burn's f16 error {burn}");
        ratios.push(ours / burn.max(1e-6));
    }
    ratios.sort_by(f32::total_cmp);
    let median = ratios[ratios.len() / 2];
    assert!(median <= 1.3, "median error ratio against burn's f16 ops: {median}");
}
