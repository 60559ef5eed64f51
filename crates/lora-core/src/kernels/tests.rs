use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
use burn::backend::{Autodiff, Flex};
use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::PaddingConfig2d;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, ElementConversion, Tensor};
use std::sync::Mutex;

use super::*;

/// The switch is process-global; tests that flip it take turns.
pub(super) static SWITCH: Mutex<()> = Mutex::new(());

fn layer<B: Backend>(c_in: usize, c_out: usize, kernel: usize, stride: usize, pad: usize, bias: bool, device: &B::Device) -> Conv2d<B> {
    Conv2dConfig::new([c_in, c_out], [kernel, kernel])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(pad, pad, pad, pad))
        .with_bias(bias)
        .init(device)
}

/// A non-uniform upstream gradient for `loss = Σ y·g`, in y's dtype. It depends on the
/// element's position only, not on `y`: a `g` made from `y` itself (e.g. `sin(y)`) differs
/// between two half-precision runs by their outputs' rounding, which then shows up in every
/// gradient (it failed the bf16 CUDA comparisons on 2026-12-04 by more than their tolerance).
fn upstream<B: Backend, const D: usize>(y: &Tensor<B, D>) -> Tensor<B, D> {
    let dims = y.dims();
    let n = dims.iter().product::<usize>() as i64;
    let g = Tensor::<B, 1, burn::tensor::Int>::arange(0..n, &y.device()).float().mul_scalar(0.37).sin().add_scalar(0.5);
    crate::precision::cast_to(g.reshape(dims), y.dtype())
}

fn max_rel<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f32 {
    let scale: f32 = b.clone().abs().max().into_scalar().elem::<f32>().max(1e-12);
    let diff: f32 = (a - b).abs().max().into_scalar().elem();
    diff / scale
}

/// `(y, dx, dw, db)`.
type Results<B> = (Tensor<B, 4>, Tensor<B, 4>, Option<Tensor<B, 4>>, Option<Tensor<B, 1>>);

/// Output, input gradient and (when tracked) weight and bias gradients of `loss = Σ y·g`,
/// through [`conv2d`] (`ours`) or burn's `Conv2d::forward`.
fn run<B: Backend>(conv: &Conv2d<Autodiff<B>>, x: Tensor<Autodiff<B>, 4>, ours: bool) -> Results<B> {
    let x = x.require_grad();
    let y = if ours { conv2d(conv, x.clone()) } else { conv.forward(x.clone()) };
    let grads = (y.clone() * upstream(&y)).sum().backward();
    let dx = x.grad(&grads).expect("input gradient");
    let dw = conv.weight.grad(&grads);
    let db = conv.bias.as_ref().and_then(|b| b.grad(&grads));
    (y.inner(), dx, dw, db)
}

/// The custom op (with burn's kernels, as on the CPU) gives burn's own output and
/// gradients, for the conv shapes SD uses: 3x3 same-size, 3x3 stride-2 with odd input
/// (the dropped-row case), 1x1, with and without bias, trainable and frozen weights.
#[test]
fn custom_conv_matches_burn() {
    let _guard = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    type B = Flex;
    let device = Default::default();
    let cases = [(3, 1, 1, true, [2, 4, 9, 9]), (3, 2, 1, true, [1, 4, 9, 7]), (1, 1, 0, false, [2, 4, 5, 6]), (3, 2, 1, false, [1, 4, 8, 8])];
    for (kernel, stride, pad, bias, shape) in cases {
        for frozen in [false, true] {
            let mut conv = layer::<Autodiff<B>>(shape[1], 6, kernel, stride, pad, bias, &device);
            if frozen {
                conv = conv.no_grad();
            }
            let x = Tensor::<Autodiff<B>, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let reference = run::<B>(&conv, x.clone(), false);
            let ours = run::<B>(&conv, x, true);
            let case = format!("kernel {kernel} stride {stride} bias {bias} frozen {frozen} {shape:?}");
            assert!(max_rel(ours.0, reference.0) < 1e-5, "{case}: output");
            assert!(max_rel(ours.1, reference.1) < 1e-5, "{case}: dx");
            match (ours.2, reference.2) {
                (Some(a), Some(b)) => assert!(max_rel(a, b) < 1e-5, "{case}: dw"),
                (None, None) => assert!(frozen, "{case}: no weight gradient"),
                (a, b) => panic!("{case}: weight gradient presence differs ({} vs {})", a.is_some(), b.is_some()),
            }
            match (ours.3, reference.3) {
                (Some(a), Some(b)) => assert!(max_rel(a, b) < 1e-5, "{case}: db"),
                (a, b) => assert_eq!(a.is_some(), b.is_some(), "{case}: bias gradient presence"),
            }
        }
    }
}

/// `(y, dx, dw, d_addend)`.
type AddResults<B> = (Tensor<B, 4>, Tensor<B, 4>, Option<Tensor<B, 4>>, Tensor<B, 4>);

/// How [`run_add`] hands the addend to the op.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Form {
    /// Made inside the graph (`addend · 1`), so that the op is the last to hold it, as a
    /// ResNet block's shortcut output is (on CUDA the in-place path).
    Made,
    /// The tracked leaf itself, which the caller still holds.
    Held,
    /// A `[N, K, 1, 1]` addend as `[N, K]` ([`conv2d_add_channels`]), made in the graph.
    Channels,
}

/// Output and gradients of `loss = Σ y·g` for `y = conv(x) + addend`, through
/// [`conv2d_add`] / [`conv2d_add_channels`] (`ours`) or burn's `Conv2d::forward` and
/// addition; the addend's gradient comes back in the addend's shape.
fn run_add<B: Backend>(conv: &Conv2d<Autodiff<B>>, x: Tensor<Autodiff<B>, 4>, addend: Tensor<Autodiff<B>, 4>, form: Form, ours: bool) -> AddResults<B> {
    let x = x.require_grad();
    let [n, k, ah, aw] = addend.dims();
    let loss = |y: &Tensor<Autodiff<B>, 4>| (y.clone() * upstream(y)).sum().backward();
    let (y, grads, da) = if form == Form::Channels {
        assert_eq!([ah, aw], [1, 1], "a per-channel addend is [N, K, 1, 1]");
        let leaf = addend.detach().reshape([n, k]).require_grad();
        let a = leaf.clone().mul_scalar(1.0);
        let y = if ours { conv2d_add_channels(conv, x.clone(), a) } else { conv.forward(x.clone()) + a.reshape([n, k, 1, 1]) };
        let grads = loss(&y);
        let da = leaf.grad(&grads).expect("addend gradient").reshape([n, k, 1, 1]);
        (y, grads, da)
    } else {
        let leaf = addend.require_grad();
        let a = if form == Form::Held { leaf.clone() } else { leaf.clone().mul_scalar(1.0) };
        let y = if ours { conv2d_add(conv, x.clone(), a) } else { conv.forward(x.clone()) + a };
        let grads = loss(&y);
        let da = leaf.grad(&grads).expect("addend gradient");
        (y, grads, da)
    };
    let dx = x.grad(&grads).expect("input gradient");
    (y.inner(), dx, conv.weight.grad(&grads), da)
}

/// [`conv2d_add`] gives burn's convolution plus the addition, output and every gradient,
/// with a residual-shaped addend and a per-sample-and-channel one (`[N, K, 1, 1]`), a
/// strided convolution, with and without bias, trainable and frozen weights; an addend of
/// another shape takes burn's broadcasting addition.
#[test]
fn custom_conv_add_matches_burn() {
    let _guard = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    type B = Flex;
    let device = Default::default();
    // (kernel, stride, pad, bias, x shape, addend shape)
    let cases = [
        (3, 1, 1, true, [2, 4, 9, 9], [2, 6, 9, 9]),
        (3, 1, 1, true, [2, 4, 9, 9], [2, 6, 1, 1]),
        (3, 2, 1, false, [1, 4, 9, 7], [1, 6, 5, 4]),
        (1, 1, 0, false, [2, 4, 5, 6], [2, 6, 1, 1]),
        (1, 1, 0, true, [2, 4, 5, 6], [1, 6, 5, 6]),
    ];
    for ((kernel, stride, pad, bias, shape, addend_shape), frozen) in cases.into_iter().flat_map(|c| [(c, false), (c, true)]) {
        // A `[N, K, 1, 1]` addend also goes in as `[N, K]`.
        for form in [Form::Made, Form::Held, Form::Channels].into_iter().filter(|&f| f != Form::Channels || addend_shape[2..] == [1, 1]) {
            let mut conv = layer::<Autodiff<B>>(shape[1], 6, kernel, stride, pad, bias, &device);
            if frozen {
                conv = conv.no_grad();
            }
            let x = Tensor::<Autodiff<B>, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let addend = Tensor::<Autodiff<B>, 4>::random(addend_shape, Distribution::Normal(0.0, 1.0), &device);
            let reference = run_add::<B>(&conv, x.clone(), addend.clone(), form, false);
            let ours = run_add::<B>(&conv, x, addend, form, true);
            let case = format!("kernel {kernel} stride {stride} bias {bias} frozen {frozen} {form:?} {shape:?} + {addend_shape:?}");
            assert!(max_rel(ours.0, reference.0) < 1e-5, "{case}: output");
            assert!(max_rel(ours.1, reference.1) < 1e-5, "{case}: dx");
            assert!(max_rel(ours.3, reference.3) < 1e-5, "{case}: d addend");
            match (ours.2, reference.2) {
                (Some(a), Some(b)) => assert!(max_rel(a, b) < 1e-5, "{case}: dw"),
                (a, b) => assert!(frozen && a.is_none() && b.is_none(), "{case}: weight gradient presence"),
            }
        }
    }
}

/// The convolution op with [`set_cudnn`] on (on wgpu burn's kernels inside one operation;
/// CUDA's cuDNN has its own test, `cudnn_conv_add_matches_burn_kernels_on_cuda`) against
/// burn's ops with it off, on autodiff backend `B`: outputs and every gradient, with and
/// without an addend, f32 and f16.
#[cfg(feature = "wgpu-test")]
pub(super) fn check_conv_op<B: Backend>() {
    use burn::tensor::FloatDType;
    let device = Default::default();
    let cases = [(3, 1, 1, true, [2, 4, 9, 9], [2, 6, 9, 9]), (3, 2, 1, false, [1, 4, 9, 7], [1, 6, 1, 1]), (1, 1, 0, true, [2, 4, 5, 6], [2, 6, 1, 1])];
    for (dtype, tolerance) in [(FloatDType::F32, 1e-4), (FloatDType::F16, 1e-2)] {
        for (kernel, stride, pad, bias, shape, addend_shape) in cases {
            for frozen in [false, true] {
                let mut conv = crate::precision::cast_all(layer::<Autodiff<B>>(shape[1], 6, kernel, stride, pad, bias, &device), dtype);
                if frozen {
                    conv = conv.no_grad();
                }
                let x = Tensor::<Autodiff<B>, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device).cast(dtype);
                let addend = Tensor::<Autodiff<B>, 4>::random(addend_shape, Distribution::Normal(0.0, 1.0), &device).cast(dtype);
                set_cudnn(false);
                // A `[N, K, 1, 1]` addend goes in as `[N, K]`; a residual as the caller's.
                let form = if addend_shape[2..] == [1, 1] { Form::Channels } else { Form::Held };
                let reference = (run::<B>(&conv, x.clone(), true), run_add::<B>(&conv, x.clone(), addend.clone(), form, true));
                set_cudnn(true);
                let ours = (run::<B>(&conv, x.clone(), true), run_add::<B>(&conv, x, addend, form, true));
                set_cudnn(false);
                let case = format!("{dtype:?} kernel {kernel} stride {stride} bias {bias} frozen {frozen} {shape:?} + {addend_shape:?}");
                let f32 = |t: Tensor<B, 4>| t.cast(FloatDType::F32);
                assert!(max_rel(f32(ours.0 .0), f32(reference.0 .0)) < tolerance, "{case}: output");
                assert!(max_rel(f32(ours.0 .1), f32(reference.0 .1)) < tolerance, "{case}: dx");
                assert!(max_rel(f32(ours.1 .0), f32(reference.1 .0)) < tolerance, "{case}: output with addend");
                assert!(max_rel(f32(ours.1 .1), f32(reference.1 .1)) < tolerance, "{case}: dx with addend");
                assert!(max_rel(f32(ours.1 .3), f32(reference.1 .3)) < tolerance, "{case}: d addend");
                for (a, b) in [(ours.0 .2, reference.0 .2), (ours.1 .2, reference.1 .2)] {
                    match (a, b) {
                        (Some(a), Some(b)) => assert!(max_rel(f32(a), f32(b)) < tolerance, "{case}: dw"),
                        (a, b) => assert!(frozen && a.is_none() && b.is_none(), "{case}: weight gradient presence"),
                    }
                }
            }
        }
    }
}

/// With an addend under gradient checkpointing, as without one.
#[test]
fn custom_conv_add_under_checkpointing() {
    let _guard = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    type C = Autodiff<Flex, BalancedCheckpointing>;
    let device = Default::default();
    let conv: Conv2d<C> = layer(3, 4, 3, 1, 1, true, &device);
    let x = Tensor::<C, 4>::random([2, 3, 6, 6], Distribution::Normal(0.0, 1.0), &device).require_grad();
    let t = Tensor::<C, 4>::random([2, 4, 1, 1], Distribution::Normal(0.0, 1.0), &device).require_grad();
    let grads = conv2d_add(&conv, x.clone(), t.clone()).exp().sum().backward();
    let ours = (x.grad(&grads).unwrap(), conv.weight.grad(&grads).unwrap(), t.grad(&grads).unwrap());
    let grads = (conv.forward(x.clone()) + t.clone()).exp().sum().backward();
    let reference = (x.grad(&grads).unwrap(), conv.weight.grad(&grads).unwrap(), t.grad(&grads).unwrap());
    assert!(max_rel(ours.0, reference.0) < 1e-5);
    assert!(max_rel(ours.1, reference.1) < 1e-5);
    assert!(max_rel(ours.2, reference.2) < 1e-5);
}

/// Under gradient checkpointing the op is recomputed, not kept; gradients stay the same.
#[test]
fn custom_conv_under_checkpointing() {
    let _guard = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    type C = Autodiff<Flex, BalancedCheckpointing>;
    let device = Default::default();
    let conv: Conv2d<C> = layer(3, 4, 3, 1, 1, true, &device);
    let x = Tensor::<C, 4>::random([1, 3, 6, 6], Distribution::Normal(0.0, 1.0), &device).require_grad();
    let grads = conv2d(&conv, x.clone()).exp().sum().backward();
    let ours = (x.grad(&grads).unwrap(), conv.weight.grad(&grads).unwrap());
    let grads = conv.forward(x.clone()).exp().sum().backward();
    let reference = (x.grad(&grads).unwrap(), conv.weight.grad(&grads).unwrap());
    assert!(max_rel(ours.0, reference.0) < 1e-5);
    assert!(max_rel(ours.1, reference.1) < 1e-5);
}

/// `Same` and asymmetric padding take burn's path (and still give burn's result).
#[test]
fn other_paddings_take_burn_path() {
    let device = Default::default();
    let mut conv: Conv2d<Flex> = Conv2dConfig::new([2, 3], [3, 3]).with_padding(PaddingConfig2d::Explicit(1, 0, 0, 1)).init(&device);
    assert!(symmetric_options(&conv).is_none());
    conv.padding = PaddingConfig2d::Same;
    assert!(symmetric_options(&conv).is_none());
    conv.padding = PaddingConfig2d::Explicit(2, 1, 2, 1);
    assert_eq!(symmetric_options(&conv).unwrap().padding, [2, 1]);
    let x = Tensor::<Flex, 4>::random([1, 2, 5, 5], Distribution::Default, &device);
    assert!(max_rel(conv2d(&conv, x.clone()), conv.forward(x)) < 1e-6);
}

/// The frozen-weight case keeps no input: after the forward pass, the op holds the only
/// other reference to the weight but none to `x` (checked through a param that is not
/// tracked: backward must still produce `dx`).
#[test]
fn frozen_weight_gives_input_gradient_only() {
    let _guard = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    type A = Autodiff<Flex>;
    let device = Default::default();
    let mut conv: Conv2d<A> = layer(2, 2, 3, 1, 1, false, &device);
    conv.weight = Param::from_tensor(conv.weight.val().detach()).set_require_grad(false);
    let x = Tensor::<A, 4>::random([1, 2, 4, 4], Distribution::Default, &device).require_grad();
    let grads = conv2d(&conv, x.clone()).sum().backward();
    assert!(x.grad(&grads).is_some());
    assert!(conv.weight.grad(&grads).is_none());
}

/// Without the `cuda` feature, or without a GPU driver, the status queries are errors, not
/// panics (cudarc panics when libcuda is missing; `PerDevice` catches it).
#[test]
fn vendor_status_without_a_gpu_is_an_error() {
    let no_gpu = cfg!(not(feature = "cuda")) || !std::path::Path::new("/dev/nvidiactl").exists();
    if no_gpu {
        assert!(cudnn_status().is_err());
        assert!(cublas_status().is_err());
        assert_eq!(vendor_stats().cudnn_calls, 0);
    }
}

#[test]
fn flash_tuning_switches_clamp_and_restore() {
    let _guard = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    assert_eq!(flash_shared_kib(), 48, "the default keeps four cubes per H100/H200 SM");
    set_flash_shared_kib(1000);
    assert_eq!(flash_shared_kib(), 227, "an H100/H200 SM's largest per-block shared memory");
    set_flash_shared_kib(0);
    assert_eq!(flash_shared_kib(), 16);
    set_flash_shared_kib(96);
    assert_eq!(flash_shared_kib(), 96);
    set_flash_shared_kib(48);
    assert!(!flash_prefetch_enabled());
    set_flash_prefetch(true);
    assert!(flash_prefetch_enabled());
    set_flash_prefetch(false);
    // Without a GPU the profiler range is an error, never a panic.
    if cfg!(not(feature = "cuda")) || !std::path::Path::new("/dev/nvidiactl").exists() {
        assert!(cuda_profiler(0, true).is_err());
    }
}

/// Asserts that `ours` is within `tolerance` of `reference` ([`max_rel`], in f32), and
/// prints the error either way (the device script's log keeps it).
#[cfg(feature = "cuda")]
fn check_close<B: Backend>(case: &str, what: &str, ours: Tensor<B, 4>, reference: Tensor<B, 4>, tolerance: f32) {
    let f32 = |t: Tensor<B, 4>| crate::precision::cast_to(t, DType::F32);
    let err = max_rel(f32(ours), f32(reference));
    eprintln!("{case}: {what} error {err:.2e}");
    assert!(err < tolerance, "{case}: {what}, relative error {err} (tolerance {tolerance})");
}

/// cuDNN against burn's own CUDA kernels, forward and both gradients, f32 and bf16, for
/// the conv shapes SD uses. Run on the GPU machine (scripts/device/run.sh runs it when
/// `device-bin/lora-core-tests` exists): `lora-core-tests --ignored --exact
/// kernels::tests::cudnn_matches_burn_kernels_on_cuda`.
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs an NVIDIA GPU and libcudnn 9"]
fn cudnn_matches_burn_kernels_on_cuda() {
    use burn::tensor::FloatDType;
    let _guard = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    type B = burn::backend::Cuda;
    let version = cudnn_status().unwrap_or_else(|reason| panic!("cuDNN unavailable: {reason}"));
    eprintln!("cuDNN {version}");
    let device = Default::default();
    let cases = [(3, 1, 1, true, [2, 64, 32, 32]), (3, 2, 1, true, [1, 32, 33, 31]), (1, 1, 0, false, [2, 64, 16, 16])];
    let before = vendor_stats();
    for dtype in [FloatDType::F32, FloatDType::BF16] {
        // TF32 (f32) and bf16 rounding: both sides accumulate in f32 but in different orders.
        let tolerance = if dtype == FloatDType::F32 { 1e-2 } else { 5e-2 };
        // A trainable layer (its bias added after the op) and a frozen one (the bias added
        // inside the op, after cuDNN's convolution).
        for ((kernel, stride, pad, bias, shape), frozen) in cases.into_iter().flat_map(|case| [(case, false), (case, true)]) {
            let mut conv = crate::precision::cast_all(layer::<Autodiff<B>>(shape[1], 48, kernel, stride, pad, bias, &device), dtype);
            if frozen {
                conv = conv.no_grad();
            }
            let x = Tensor::<Autodiff<B>, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device).cast(dtype);
            set_cudnn(false);
            // Half precision: burn's f32 kernels on the same rounded values are the reference
            // (burn's own bf16 convolution is further from it than cuDNN's; its error is
            // printed beside ours).
            let half = dtype != FloatDType::F32;
            let reference = if half {
                run::<B>(&crate::precision::cast_all(conv.clone(), FloatDType::F32), x.clone().cast(FloatDType::F32), true)
            } else {
                run::<B>(&conv, x.clone(), true)
            };
            let burn_half = half.then(|| run::<B>(&conv, x.clone(), true));
            set_cudnn(true);
            let ours = run::<B>(&conv, x, true);
            set_cudnn(false);
            let case = format!("{dtype:?} kernel {kernel} stride {stride} bias {bias} frozen {frozen} {shape:?}");
            let f32 = |t: Tensor<B, 4>| t.cast(FloatDType::F32);
            if let Some(burn) = burn_half {
                eprintln!("{case}: burn's own kernels' error: output {:.2e}, dx {:.2e}", max_rel(f32(burn.0), f32(reference.0.clone())), max_rel(f32(burn.1), f32(reference.1.clone())));
            }
            let check = |what: &str, a, b| check_close(&case, what, a, b, tolerance);
            check("output", ours.0, reference.0);
            check("dx", ours.1, reference.1);
            match (ours.2, reference.2) {
                (Some(a), Some(b)) => check("dw", a, b),
                (a, b) => assert!(frozen && a.is_none() && b.is_none(), "{case}: weight gradient presence"),
            }
        }
    }
    let after = vendor_stats();
    assert_eq!(after.fallbacks, before.fallbacks, "fallbacks: {:?}", after.last_error);
    // Forward, dx and dw for each trainable case, forward and dx for each frozen one, per dtype.
    assert_eq!(after.cudnn_calls - before.cudnn_calls, 2 * 3 * (3 + 2));
}

/// [`conv2d_add`] with cuDNN (its output blend on and off, see [`set_cudnn_blend`])
/// against burn's own CUDA kernels, output and every gradient, f32 and bf16: residual and
/// `[N, K, 1, 1]` addends, one made inside the graph (the in-place path) and one the caller
/// still holds. Run on the GPU machine like `cudnn_matches_burn_kernels_on_cuda` (the
/// device script's `conv` job runs both).
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs an NVIDIA GPU and libcudnn 9"]
fn cudnn_conv_add_matches_burn_kernels_on_cuda() {
    use burn::tensor::FloatDType;
    let _guard = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    type B = burn::backend::Cuda;
    cudnn_status().unwrap_or_else(|reason| panic!("cuDNN unavailable: {reason}"));
    let device = Default::default();
    let cases = [(3, 1, 1, true, [2, 64, 32, 32], [2, 48, 32, 32]), (3, 1, 1, true, [2, 64, 16, 16], [2, 48, 1, 1]), (1, 1, 0, false, [2, 64, 16, 16], [2, 48, 16, 16])];
    let before = vendor_stats();
    let (mut forwards, mut trainable, mut blended) = (0, 0, 0);
    for dtype in [FloatDType::F32, FloatDType::BF16] {
        let tolerance = if dtype == FloatDType::F32 { 1e-2 } else { 5e-2 };
        for (kernel, stride, pad, bias, shape, addend_shape) in cases {
            // `[N, K, 1, 1]` addends also as `[N, K]`; each form with the blend, the made
            // one also without it, and a trainable layer once per case.
            let per_channel = addend_shape[2..] == [1, 1];
            let runs = [(false, true, Form::Made), (true, true, Form::Made), (true, true, Form::Held), (true, false, Form::Made), (true, true, Form::Channels)];
            for (frozen, blend, form) in runs.into_iter().filter(|r| r.2 != Form::Channels || per_channel) {
                let mut conv = crate::precision::cast_all(layer::<Autodiff<B>>(shape[1], 48, kernel, stride, pad, bias, &device), dtype);
                if frozen {
                    conv = conv.no_grad();
                }
                let x = Tensor::<Autodiff<B>, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device).cast(dtype);
                let addend = Tensor::<Autodiff<B>, 4>::random(addend_shape, Distribution::Normal(0.0, 1.0), &device).cast(dtype);
                set_cudnn(false);
                // Half precision: burn's f32 kernels on the same rounded values (see
                // `cudnn_matches_burn_kernels_on_cuda`).
                let reference = if dtype == FloatDType::F32 {
                    run_add::<B>(&conv, x.clone(), addend.clone(), form, false)
                } else {
                    let conv = crate::precision::cast_all(conv.clone(), FloatDType::F32);
                    run_add::<B>(&conv, x.clone().cast(FloatDType::F32), addend.clone().cast(FloatDType::F32), form, false)
                };
                set_cudnn(true);
                set_cudnn_blend(blend);
                // The blend must not write into an addend the caller still holds.
                let kept = addend.clone().inner();
                let kept_values = kept.clone().cast(FloatDType::F32).into_data();
                let ours = run_add::<B>(&conv, x, addend, form, true);
                set_cudnn_blend(true);
                set_cudnn(false);
                forwards += 1;
                trainable += usize::from(!frozen);
                blended += usize::from(blend);
                let case = format!("{dtype:?} kernel {kernel} bias {bias} frozen {frozen} blend {blend} {form:?} {shape:?} + {addend_shape:?}");
                assert_eq!(kept.cast(FloatDType::F32).into_data(), kept_values, "{case}: the caller's addend changed");
                let check = |what: &str, a, b| check_close(&case, what, a, b, tolerance);
                check("output", ours.0, reference.0);
                check("dx", ours.1, reference.1);
                check("d addend", ours.3, reference.3);
                match (ours.2, reference.2) {
                    (Some(a), Some(b)) => check("dw", a, b),
                    (a, b) => assert!(frozen && a.is_none() && b.is_none(), "{case}: weight gradient presence"),
                }
            }
        }
    }
    let after = vendor_stats();
    assert_eq!(after.fallbacks, before.fallbacks, "fallbacks: {:?}", after.last_error);
    // Forward and dx per run, dw for the trainable ones; the forward written onto the
    // addend exactly in the runs with the blend on (the switch is read when the op is
    // queued, and burn-fusion may run it later, after the test switched it back).
    assert_eq!(after.cudnn_calls - before.cudnn_calls, (2 * forwards + trainable) as u64);
    assert_eq!(after.cudnn_blended_calls - before.cudnn_blended_calls, blended as u64);
}

/// The linear op (with burn's matmul, as on the CPU) gives burn's output and gradients:
/// 3-d input, with and without bias, trainable and frozen weight, and under checkpointing.
#[test]
fn linear_op_matches_burn() {
    use burn::nn::{Linear, LinearConfig};
    fn grads<A: burn::tensor::backend::AutodiffBackend>(layer: &Linear<A>, x: Tensor<A, 3>, ours: bool) -> Vec<Tensor<A::InnerBackend, 2>> {
        let x = x.require_grad();
        let y = if ours { linear_op(layer, x.clone()) } else { layer.forward(x.clone()) };
        let g = upstream(&y.clone().detach());
        let grads = (y.clone() * g).sum().backward();
        let mut out = vec![y.inner().flatten(0, 1), x.grad(&grads).unwrap().flatten(0, 1)];
        out.extend(layer.weight.grad(&grads));
        out.extend(layer.bias.as_ref().and_then(|b| b.grad(&grads)).map(|b| b.unsqueeze::<2>()));
        out
    }
    fn check<A: burn::tensor::backend::AutodiffBackend>() {
        let device = Default::default();
        for (bias, frozen) in [(true, false), (false, false), (true, true)] {
            let mut layer: Linear<A> = LinearConfig::new(6, 5).with_bias(bias).init(&device);
            if frozen {
                layer = layer.no_grad();
            }
            let x = Tensor::<A, 3>::random([2, 3, 6], Distribution::Normal(0.0, 1.0), &device);
            let (ours, reference) = (grads(&layer, x.clone(), true), grads(&layer, x, false));
            assert_eq!(ours.len(), reference.len(), "bias {bias} frozen {frozen}: gradient count");
            assert_eq!(ours.len(), if frozen { 2 } else { 3 + bias as usize });
            for (i, (a, b)) in ours.into_iter().zip(reference).enumerate() {
                assert!(max_rel(a, b) < 1e-5, "bias {bias} frozen {frozen}: tensor {i}");
            }
        }
    }
    check::<Autodiff<Flex>>();
    check::<Autodiff<Flex, BalancedCheckpointing>>();
}

/// With the fixed-matmul switch on, a LoRA linear layer (bias, rank-2 adapter, 3-d input)
/// goes through [`linear`] and [`linear_weight`]'s routed op (on the CPU its matmuls are
/// burn's): same output, input gradient and adapter gradients as with the switch off, and
/// the frozen base weight still gets no gradient.
#[test]
fn routed_lora_linear_matches_burn_on_flex() {
    let _guard = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    check_routed_lora_linear::<Autodiff<Flex>>(1e-5);
}

/// [`routed_lora_linear_matches_burn_on_flex`] on autodiff backend `A`, with relative
/// tolerance `tolerance`; the caller holds [`SWITCH`].
pub(super) fn check_routed_lora_linear<A: burn::tensor::backend::AutodiffBackend>(tolerance: f32) {
    use burn::nn::LinearConfig;
    let device = Default::default();
    let mut layer = crate::LoraLinear::new(LinearConfig::new(48, 40).init::<A>(&device).no_grad());
    layer.attach_new(&crate::LoraConfig::new(4), &device).unwrap();
    // A non-zero up projection, so that the adapter's path carries a gradient to `x`.
    let adapter = layer.adapter.as_mut().unwrap();
    adapter.up.weight = Param::from_tensor(Tensor::random([4, 40], Distribution::Normal(0.0, 1.0), &device));
    // Rows off every tile, then enough rows that the weight gradients are split in chunks.
    for shape in [[2, 37, 48], [2, 512, 48]] {
        check_lora_linear_rows(&layer, Tensor::<A, 3>::random(shape, Distribution::Normal(0.0, 1.0), &device), tolerance);
    }
}

/// One input of [`check_routed_lora_linear`].
fn check_lora_linear_rows<A: burn::tensor::backend::AutodiffBackend>(layer: &crate::LoraLinear<A>, x: Tensor<A, 3>, tolerance: f32) {
    let run = |routed: bool| {
        set_fixed_matmul(routed);
        let x = x.clone().require_grad();
        let y = layer.forward(x.clone());
        // The switch stays on through the backward pass, whose products it routes too.
        let grads = (y.clone() * upstream(&y.clone().detach())).sum().backward();
        set_fixed_matmul(false);
        let adapter = layer.adapter.as_ref().unwrap();
        assert!(layer.base.weight.grad(&grads).is_none(), "the frozen base got a gradient");
        (y.inner(), x.grad(&grads).unwrap(), adapter.down.weight.grad(&grads).unwrap(), adapter.up.weight.grad(&grads).unwrap())
    };
    let (ours, reference) = (run(true), run(false));
    assert!(max_rel(ours.0, reference.0) < tolerance, "output");
    assert!(max_rel(ours.1, reference.1) < tolerance, "dx");
    assert!(max_rel(ours.2, reference.2) < tolerance, "d down");
    assert!(max_rel(ours.3, reference.3) < tolerance, "d up");
}

/// The one-op linear layer ([`set_fused_lora_linear`]) against the same layer in composed
/// ops (the routed matmuls on for both), on autodiff backend `A` (a CubeCL fusion backend)
/// with activations and base in `half` or f32 and f32 adapter weights: output, input,
/// adapter and residual gradients, with and without an adapter, bias and residual, a
/// tracked and an untracked input, rows in one weight-gradient chunk and split in several,
/// and the forward pass without autodiff. Counts the op's runs. The caller holds
/// [`SWITCH`]. `f32_tolerance`: on CUDA the composed side's f32 products run on tensor
/// cores in TF32 (the fixed kernel's `cmma` strategy, ~1e-3 relative), the op's rank-wide
/// products in f32.
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu-test")), allow(dead_code))]
pub(super) fn check_fused_lora_linear<A: burn::tensor::backend::AutodiffBackend>(f32_tolerance: f32, half: burn::tensor::DType, half_tolerance: f32) {
    use burn::module::AutodiffModule;
    use burn::nn::LinearConfig;
    use burn::tensor::{DType, FloatDType};
    let device = Default::default();
    let f32 = |t: Tensor<A::InnerBackend, 2>| crate::precision::cast_to(t, DType::F32);
    let before = vendor_stats();
    let mut runs = 0;
    for (dtype, tolerance) in [(DType::F32, f32_tolerance), (half, half_tolerance)] {
        // Rank 4 (one tile of 4 in the weight-gradient kernel), 3 (tiles of 1), 24 (three
        // tiles of 8), 40 (above `LOW_RANK_MAX`: the routed products); 0 = no adapter.
        for (bias, rank) in [(true, 4), (false, 4), (false, 3), (true, 24), (false, 40), (true, 0), (false, 0)] {
            let adapted = rank > 0;
            let base = LinearConfig::new(48, 40).with_bias(bias).init::<A>(&device).no_grad();
            let mut layer = crate::LoraLinear::new(crate::precision::cast_frozen(base, FloatDType::from(dtype)));
            if adapted {
                layer.attach_new(&crate::LoraConfig::new(rank).with_alpha(8.0), &device).unwrap();
                layer.set_multiplier(0.7);
                // A non-zero up projection, so that every gradient is non-zero.
                let adapter = layer.adapter.as_mut().unwrap();
                adapter.up.weight = Param::from_tensor(Tensor::random([rank, 40], Distribution::Normal(0.0, 1.0), &device));
            }
            // Rows off every tile, then enough rows that the weight gradients are split.
            for (rows, residual, track_x) in [(37, false, true), (37, true, false), (1024, true, true), (1024, false, false)] {
                let x = crate::precision::cast_to(Tensor::<A, 3>::random([2, rows, 48], Distribution::Normal(0.0, 1.0), &device), dtype);
                let r = crate::precision::cast_to(Tensor::<A, 3>::random([2, rows, 40], Distribution::Normal(0.0, 1.0), &device), dtype);
                let run = |fused: bool| {
                    set_fused_lora_linear(fused);
                    set_fixed_matmul(true);
                    let x = if track_x { x.clone().require_grad() } else { x.clone() };
                    let r = r.clone().require_grad();
                    let y = if residual { layer.forward_residual(x.clone(), r.clone()) } else { layer.forward(x.clone()) };
                    // Weights independent of y: a bf16 y's rounding differs between the
                    // two paths, and cos(y) carried it into every gradient (failed on the
                    // H200 by more than the tolerance, 2026-12-04).
                    let weights = upstream(&crate::precision::cast_to(y.clone().detach(), DType::F32));
                    let grads = (crate::precision::cast_to(y.clone(), DType::F32) * weights).sum().backward();
                    // Without autodiff: the forward pass alone.
                    let plain = if residual { layer.valid().forward_residual(x.clone().inner(), r.clone().inner()) } else { layer.valid().forward(x.clone().inner()) };
                    set_fused_lora_linear(false);
                    set_fixed_matmul(false);
                    assert!(layer.base.weight.grad(&grads).is_none(), "the frozen base got a gradient");
                    let rows2 = |t: Tensor<A::InnerBackend, 3>| {
                        let d = t.dims()[2];
                        f32(t.reshape([2 * rows, d]))
                    };
                    let dx = x.grad(&grads).map(rows2);
                    assert_eq!(dx.is_some(), track_x, "input gradient");
                    let dr = r.grad(&grads).map(rows2);
                    assert_eq!(dr.is_some(), residual, "residual gradient");
                    let params = layer.adapter.as_ref().map(|adapter| {
                        let da = adapter.down.weight.grad(&grads).unwrap();
                        let db = adapter.up.weight.grad(&grads).unwrap();
                        assert_eq!((da.dtype(), db.dtype()), (DType::F32, DType::F32), "adapter gradients in the adapters' dtype");
                        (da, db)
                    });
                    (rows2(y.inner()), rows2(plain), dx, dr, params)
                };
                let before_case = vendor_stats();
                let (ours, reference) = (run(true), run(false));
                let case = format!("{dtype:?}, adapter rank {rank}, bias {bias}, {rows} rows, residual {residual}, tracked x {track_x}");
                let check = |what: &str, err: f32| {
                    eprintln!("{case}: {what} error {err:.2e}");
                    assert!(err < tolerance, "{case}: {what}, relative error {err} (tolerance {tolerance})");
                };
                check("output", max_rel(ours.0.clone(), reference.0.clone()));
                check("output without autodiff", max_rel(ours.1, reference.0));
                if let (Some(a), Some(b)) = (ours.2, reference.2) {
                    check("dx", max_rel(a, b));
                }
                if let (Some(a), Some(b)) = (ours.3, reference.3) {
                    check("d residual", max_rel(a, b));
                }
                if let (Some((da, db)), Some((da_ref, db_ref))) = (ours.4, reference.4) {
                    check("d down", max_rel(da, da_ref));
                    check("d up", max_rel(db, db_ref));
                }
                // Forward and backward under autodiff, and the plain forward (counted when
                // they run: the comparisons above read their results); without an adapter
                // the backward pass is one routed product, not the op.
                let after_case = vendor_stats();
                let expected = if adapted { 3 } else { 2 };
                assert_eq!(after_case.fused_lora_linear_calls - before_case.fused_lora_linear_calls, expected, "{case}: the op's runs");
                runs += expected;
            }
        }
    }
    let after = vendor_stats();
    assert_eq!(after.fallbacks, before.fallbacks, "fallbacks: {:?}", after.last_error);
    assert_eq!(after.fused_lora_linear_calls - before.fused_lora_linear_calls, runs);
}

/// On the CPU the switch changes nothing: the op needs a CubeCL backend.
#[test]
fn fused_lora_linear_switch_leaves_flex_alone() {
    let _guard = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    let before = vendor_stats().fused_lora_linear_calls;
    set_fused_lora_linear(true);
    check_routed_lora_linear::<Autodiff<Flex>>(1e-5);
    set_fused_lora_linear(false);
    assert_eq!(vendor_stats().fused_lora_linear_calls, before);
}

/// [`check_fused_lora_linear`] on the GPU machine.
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn fused_lora_linear_matches_composed_ops_on_cuda() {
    let _guard = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    check_fused_lora_linear::<Autodiff<burn::backend::Cuda>>(1e-2, burn::tensor::DType::BF16, 2e-2);
    // The GEGLU op the switch turns on with the linear layers.
    use burn::tensor::FloatDType;
    check_geglu::<burn::backend::Cuda>(&[(FloatDType::F32, 1e-5), (FloatDType::BF16, 2e-2)]);
}

/// `(out, dh)` of `(h₁ + b₁) · gelu(h₂ + b₂)` for the output gradient `dy`, composed of
/// burn's ops (in the inputs' dtype: f32 for the reference).
#[cfg(any(feature = "cuda", feature = "wgpu-test"))]
fn geglu_reference<B: Backend>(h: Tensor<B, 2>, b: Tensor<B, 1>, dy: Tensor<B, 2>) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let n = h.dims()[1] / 2;
    let x = h + b.unsqueeze::<2>();
    let (a, g) = (x.clone().narrow(1, 0, n), x.narrow(1, n, n));
    let cdf = (g.clone() * std::f32::consts::FRAC_1_SQRT_2).erf().add_scalar(1.0) * 0.5;
    let pdf = (g.clone() * g.clone() * -0.5).exp() * 0.398_942_3;
    let out = a.clone() * g.clone() * cdf.clone();
    let dh = Tensor::cat(vec![dy.clone() * g.clone() * cdf.clone(), dy * a * (cdf + g * pdf)], 1);
    (out, dh)
}

/// [`geglu_bias`] and [`geglu_bias_backward`] on `B` against [`geglu_reference`] in f32, per
/// `(dtype, relative tolerance)`, for widths that take vectors of 4 and of 1; counts the
/// op's runs and checks the refusals (switch off, odd width). The caller holds [`SWITCH`].
#[cfg(any(feature = "cuda", feature = "wgpu-test"))]
pub(super) fn check_geglu<B: Backend>(dtypes: &[(burn::tensor::FloatDType, f32)]) {
    use burn::tensor::FloatDType;
    let device = Default::default();
    for (rows, n) in [(37, 16), (5, 7)] {
        for &(dtype, tolerance) in dtypes {
            let h = Tensor::<B, 2>::random([rows, 2 * n], Distribution::Normal(0.0, 2.0), &device).cast(dtype);
            let b = Tensor::<B, 1>::random([2 * n], Distribution::Normal(0.0, 1.0), &device).cast(dtype);
            let dy = Tensor::<B, 2>::random([rows, n], Distribution::Normal(0.0, 1.0), &device).cast(dtype);
            let f32 = |t: Tensor<B, 2>| t.cast(FloatDType::F32);
            let (out_ref, dh_ref) = geglu_reference(f32(h.clone()), b.clone().cast(FloatDType::F32), f32(dy.clone()));
            let before = vendor_stats().fused_geglu_calls;
            set_fused_lora_linear(true);
            let out = geglu_bias(h.clone(), b.clone()).expect("the GEGLU op");
            let dh = geglu_bias_backward(h, b, dy).expect("the GEGLU op");
            set_fused_lora_linear(false);
            let case = format!("{rows}x{n} {dtype:?}");
            assert_eq!((out.dtype(), dh.dtype()), (dtype.into(), dtype.into()), "{case}");
            for (what, a, b) in [("out", out, out_ref), ("dh", dh, dh_ref)] {
                let peak: f32 = b.clone().abs().max().into_scalar().elem();
                let err: f32 = (f32(a) - b).abs().max().into_scalar().elem();
                assert!(err <= tolerance * peak, "{case} {what}: error {err} of the peak {peak}");
            }
            // Counted when the stream runs the ops: after the reads above.
            assert_eq!(vendor_stats().fused_geglu_calls - before, 2, "{case}");
        }
    }
    let h = Tensor::<B, 2>::zeros([2, 6], &device);
    assert!(geglu_bias(h, Tensor::zeros([6], &device)).is_err(), "switch off");
    set_fused_lora_linear(true);
    let odd = geglu_bias(Tensor::<B, 2>::zeros([2, 5], &device), Tensor::zeros([5], &device)).is_err();
    set_fused_lora_linear(false);
    assert!(odd, "odd width");
}

/// `matmul_transposed` against burn's matmul of the swapped operands, for every pair of
/// flags, in two and four dimensions (the CPU path; the routed ops are checked on wgpu and
/// CUDA).
#[test]
fn matmul_transposed_matches_swapped_operands() {
    type B = burn::backend::Flex;
    let device = Default::default();
    let rand = |shape: [usize; 4]| Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let a = rand(if ta { [2, 3, 7, 5] } else { [2, 3, 5, 7] });
        let b = rand(if tb { [2, 3, 4, 7] } else { [2, 3, 7, 4] });
        let swap = |t: Tensor<B, 4>, flag: bool| if flag { t.swap_dims(2, 3) } else { t };
        let reference = swap(a.clone(), ta).matmul(swap(b.clone(), tb));
        let ours = matmul_transposed(a.clone(), b.clone(), ta, tb);
        assert_eq!(ours.dims(), [2, 3, 5, 4], "{ta} {tb}");
        assert!(max_rel(ours, reference) < 1e-6, "4-d, transposed {ta} {tb}");
        let rand2 = |shape: [usize; 2]| Tensor::<B, 2>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let a2 = rand2(if ta { [7, 5] } else { [5, 7] });
        let b2 = rand2(if tb { [4, 7] } else { [7, 4] });
        let swap2 = |t: Tensor<B, 2>, flag: bool| if flag { t.swap_dims(0, 1) } else { t };
        let reference = swap2(a2.clone(), ta).matmul(swap2(b2.clone(), tb));
        assert!(max_rel(matmul_transposed(a2, b2, ta, tb), reference) < 1e-6, "2-d, transposed {ta} {tb}");
    }
}

/// The split weight gradient against one product: chunked (2048 rows), not chunked (too few
/// rows, or a prime row count), and the chunk choice itself.
/// GroupNorm over any number of spatial dimensions gives the values of the 4-D layout,
/// and one group over `[rows, channels]` is LayerNorm (output and all three gradients).
#[test]
fn group_norm_takes_rows_and_any_spatial_rank() {
    use burn::nn::LayerNormConfig;
    let device = Default::default();
    let spec = GroupNormSpec { groups: 3, epsilon: 1e-5, silu: true };
    let x = Tensor::<Flex, 4>::random([2, 6, 4, 5], Distribution::Normal(0.5, 2.0), &device);
    let dy = Tensor::<Flex, 4>::random([2, 6, 4, 5], Distribution::Normal(0.0, 1.0), &device);
    let gamma = Tensor::<Flex, 1>::random([6], Distribution::Normal(1.0, 0.5), &device);
    let beta = Tensor::<Flex, 1>::random([6], Distribution::Normal(0.0, 0.5), &device);
    let (y4, mean4, rstd4) = group_norm(x.clone(), gamma.clone(), beta.clone(), spec);
    let (dx4, dg4, db4) = group_norm_backward(x.clone(), gamma.clone(), beta.clone(), mean4, rstd4, dy.clone(), spec);
    let flat = |t: Tensor<Flex, 4>| t.reshape([2, 6, 20]);
    let (y3, mean3, rstd3) = group_norm(flat(x.clone()), gamma.clone(), beta.clone(), spec);
    let (dx3, dg3, db3) = group_norm_backward(flat(x), gamma.clone(), beta.clone(), mean3, rstd3, flat(dy), spec);
    assert!(max_rel(y3, flat(y4)) < 1e-6 && max_rel(dx3, flat(dx4)) < 1e-6);
    assert!(max_rel(dg3, dg4) < 1e-6 && max_rel(db3, db4) < 1e-6);

    // Rows: against burn's LayerNorm, differentiated by autodiff.
    type A = Autodiff<Flex>;
    let norm = LayerNormConfig::new(8).with_epsilon(1e-5).init::<A>(&device);
    let rows = Tensor::<Flex, 2>::random([5, 8], Distribution::Normal(0.5, 2.0), &device);
    let dy = Tensor::<Flex, 2>::random([5, 8], Distribution::Normal(0.0, 1.0), &device);
    let spec = GroupNormSpec { groups: 1, epsilon: 1e-5, silu: false };
    let (gamma, beta) = (norm.gamma.val().inner(), norm.beta.as_ref().expect("β").val().inner());
    let (y, mean, rstd) = group_norm(rows.clone(), gamma.clone(), beta.clone(), spec);
    let (dx, dg, db) = group_norm_backward(rows.clone(), gamma, beta, mean, rstd, dy.clone(), spec);
    let input = Tensor::<A, 2>::from_inner(rows).require_grad();
    let reference = norm.forward(input.clone());
    let grads = (reference.clone() * Tensor::from_inner(dy)).sum().backward();
    assert!(max_rel(y, reference.inner()) < 1e-5);
    assert!(max_rel(dx, input.grad(&grads).expect("dx")) < 1e-4);
    assert!(max_rel(dg, norm.gamma.grad(&grads).expect("dγ")) < 1e-4);
    assert!(max_rel(db, norm.beta.as_ref().expect("β").grad(&grads).expect("dβ")) < 1e-4);
}

#[test]
fn weight_grad_splits_rows_exactly() {
    type B = burn::backend::Flex;
    let device = Default::default();
    assert_eq!(split_rows(32768, 320 * 4), Some(256));
    assert_eq!(split_rows(2048, 24 * 4), Some(256));
    assert_eq!(split_rows(616, 768 * 4), None);
    assert_eq!(split_rows(4099, 8), None);
    // Partials capped: 32768 rows of a 1280² gradient would be 2^22 elements per 2.6 chunks.
    let chunk = split_rows(32768, 1280 * 1280);
    assert!(chunk.is_none_or(|c| (32768 / c) * 1280 * 1280 <= SPLIT_MAX_PARTIALS), "{chunk:?}");
    for (rows, d_in, d_out) in [(2048, 24, 4), (300, 24, 4), (2053, 4, 24)] {
        let x = Tensor::<B, 2>::random([rows, d_in], Distribution::Normal(0.0, 1.0), &device);
        let dy = Tensor::<B, 2>::random([rows, d_out], Distribution::Normal(0.0, 1.0), &device);
        let ours = weight_grad(x.clone(), dy.clone());
        let reference = x.swap_dims(0, 1).matmul(dy);
        assert_eq!(ours.dims(), [d_in, d_out]);
        assert!(max_rel(ours, reference) < 1e-5, "{rows} × {d_in} × {d_out}");
    }
}

/// cuBLAS against burn's CUDA matmul: plain, transposed views (as the attention backward
/// passes them), 4-d batches and a narrowed (offset) operand, f32 (TF32) and bf16; then a
/// linear layer's output and gradients. Run on the GPU machine like the cuDNN test.
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn cublas_matches_burn_kernels_on_cuda() {
    use burn::nn::LinearConfig;
    use burn::tensor::FloatDType;
    let _guard = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    type B = burn::backend::Cuda;
    cublas_status().unwrap_or_else(|reason| panic!("cuBLAS unavailable: {reason}"));
    set_cublas_min_gflop(0.0);
    let device = Default::default();
    let before = vendor_stats();
    let rand = |shape: [usize; 4], dtype| Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device).cast(dtype);
    let mut routed = 0;
    for dtype in [FloatDType::F32, FloatDType::BF16] {
        let tolerance = if dtype == FloatDType::F32 { 1e-2 } else { 5e-2 };
        let cases: Vec<(&str, Tensor<B, 4>, Tensor<B, 4>)> = vec![
            ("plain", rand([2, 3, 64, 40], dtype), rand([2, 3, 40, 96], dtype)),
            ("b transposed", rand([2, 3, 64, 40], dtype), rand([2, 3, 96, 40], dtype).swap_dims(2, 3)),
            ("a transposed", rand([2, 3, 40, 64], dtype).swap_dims(2, 3), rand([2, 3, 40, 96], dtype)),
            ("a narrowed", rand([2, 3, 80, 40], dtype).narrow(2, 16, 64), rand([2, 3, 40, 96], dtype)),
        ];
        for (name, a, b) in cases {
            set_cublas(false);
            let reference = matmul(a.clone(), b.clone());
            set_cublas(true);
            let ours = matmul(a, b);
            set_cublas(false);
            routed += 1;
            let f32 = |t: Tensor<B, 4>| t.cast(FloatDType::F32);
            assert!(max_rel(f32(ours), f32(reference)) < tolerance, "{dtype:?} {name}");
        }
        // The op's own transpositions (`matmul_transposed`) of stored operands.
        let (a, b) = (rand([2, 3, 40, 64], dtype), rand([2, 3, 96, 40], dtype));
        let reference = matmul(a.clone().swap_dims(2, 3), b.clone().swap_dims(2, 3));
        set_cublas(true);
        let ours = matmul_transposed(a, b, true, true);
        set_cublas(false);
        routed += 1;
        assert!(max_rel(ours.cast(FloatDType::F32), reference.cast(FloatDType::F32)) < tolerance, "{dtype:?} both transposed in the op");
    }
    // A linear layer through the op, f32: output, input and weight gradients.
    let layer = LinearConfig::new(320, 640).init::<Autodiff<B>>(&device);
    let x = Tensor::<Autodiff<B>, 3>::random([2, 64, 320], Distribution::Normal(0.0, 1.0), &device);
    let run_linear = |ours: bool| {
        set_cublas(ours);
        let x = x.clone().require_grad();
        let y = linear(&layer, x.clone());
        // On through the backward pass, whose two products it routes too.
        let grads = (y.clone() * upstream(&y.clone().detach())).sum().backward();
        set_cublas(false);
        (y.inner(), x.grad(&grads).unwrap(), layer.weight.grad(&grads).unwrap())
    };
    let (ours, reference) = (run_linear(true), run_linear(false));
    assert!(max_rel(ours.0, reference.0) < 1e-2, "linear output");
    assert!(max_rel(ours.1, reference.1) < 1e-2, "linear dx");
    assert!(max_rel(ours.2, reference.2) < 1e-2, "linear dw");
    routed += 3;
    set_cublas_min_gflop(4.0);
    let after = vendor_stats();
    assert_eq!(after.fallbacks, before.fallbacks, "fallbacks: {:?}", after.last_error);
    assert_eq!(after.cublas_calls - before.cublas_calls, routed);
}

/// GPU-side ordering ([`VendorSync::Device`]): chains in which every cuDNN / cuBLAS call
/// reads what burn's kernels have just written and burn's kernels at once read its output,
/// so a missing wait on either side shows as a wrong result. Each GPU-ordered chain is
/// compared with the same chain host-ordered (same library kernels); the first also with
/// burn's kernels alone. GPU-ordered runs:
///
/// 1. as training runs it;
/// 2. late inputs: burn's stream spins a few milliseconds before each step's first kernel,
///    so a wait of our stream that returns early lets a call read its inputs too soon;
/// 3. late outputs: our stream spins before each library call, so a wait of burn's stream
///    that returns early lets a kernel read the call's output too soon;
/// 4. negative controls: run 2 without our stream's wait, and run 3 without burn's; each
///    must come out wrong, or the chains could not tell that wait's failure from success.
///
/// Each run has its own numbers (a shift per run), so stale buffers of an earlier run
/// never hold the right values by chance. The test build has few ordering slots
/// (`ordering::SLOTS`), so slots are reused many times over. Run on the GPU machine.
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs an NVIDIA GPU and libcudnn 9"]
fn device_ordering_matches_host_ordering_on_cuda() {
    use burn_cubecl::cubecl::cuda::CudaRuntime;
    use burn_cubecl::cubecl::Runtime;
    use device::test_hooks::{set as set_hooks, Hooks};
    let _guard = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    type B = burn::backend::Cuda;
    type A = Autodiff<B>;
    cudnn_status().unwrap_or_else(|reason| panic!("cuDNN unavailable: {reason}"));
    cublas_status().unwrap_or_else(|reason| panic!("cuBLAS unavailable: {reason}"));
    let device = Default::default();
    let client = CudaRuntime::client(&device);
    let conv = layer::<A>(64, 64, 3, 1, 1, true, &device).no_grad();
    let w = Tensor::<B, 3>::random([1, 1024, 1024], Distribution::Normal(0.0, 1.0 / 32.0), &device);
    let x0 = Tensor::<B, 3>::random([8, 1024, 1024], Distribution::Normal(0.0, 1.0), &device);
    let c0 = Tensor::<A, 4>::random([4, 64, 64, 64], Distribution::Normal(0.0, 1.0), &device);
    let steps = 20;
    // Polls of a delay: a few milliseconds, far longer than any kernel of a step.
    let delay = 16_000;
    let no_hooks = Hooks { library_delay: 0, skip_ready: false, skip_done: false };
    // `late`: before each step, both streams drain (with a wait skipped nothing else keeps
    // ours from falling steps behind, writing into memory cubecl may have released), then
    // burn's stream spins this many polls, so the step's kernels queue behind the spin.
    let chain = |vendor: bool, mode: VendorSync, base: f32, late: Option<u32>| {
        set_vendor_sync(mode);
        set_cudnn(vendor);
        set_cublas(vendor);
        set_cublas_min_gflop(0.0);
        let (mut x, mut c) = (x0.clone(), c0.clone());
        for i in 0..steps {
            if let Some(spins) = late {
                B::sync(&device).expect("device sync");
                device::sync_library_stream(0).expect("our stream");
                if spins > 0 {
                    device::delay_cubecl_stream(&client, spins);
                }
            }
            let shift = base + i as f32 * 0.01;
            let h = (x.clone() * 0.9 + shift).tanh();
            let y = matmul(h.clone(), w.clone().expand([8, 1024, 1024]));
            x = y + h;
            let h = (c.clone() * 0.9 + shift).tanh();
            c = crate::kernels::conv2d(&conv, h.clone()) * 0.5 + h;
        }
        let out = (x, c.inner());
        // burn-fusion may still hold the chain's operations, and the ordering mode is read
        // when they run: run them before switching back. Then let our stream finish too (a
        // control's last calls may still run there), before the next chain reuses memory.
        B::sync(&device).expect("device sync");
        device::sync_library_stream(0).expect("our stream");
        set_cudnn(false);
        set_cublas(false);
        set_cublas_min_gflop(4.0);
        set_vendor_sync(VendorSync::Host);
        out
    };
    // A GPU-ordered chain with `hooks` and its host-ordered reference, on the numbers of `base`.
    let pair = |hooks: Hooks, base: f32, late: Option<u32>| {
        set_hooks(hooks);
        let ordered = chain(true, VendorSync::Device, base, late);
        set_hooks(no_hooks);
        (ordered, chain(true, VendorSync::Host, base, None))
    };
    // A chain's result: the matmul chain's and the conv chain's last values.
    type Chain = (Tensor<B, 3>, Tensor<B, 4>);
    let close = |(a, b): &(Chain, Chain), tolerance: f32| {
        // `<=` so that a NaN counts as far.
        [max_rel(a.0.clone(), b.0.clone()) <= tolerance, max_rel(a.1.clone(), b.1.clone()) <= tolerance]
    };
    let before = vendor_stats();
    // GPU-ordered first, then the references on the same numbers.
    let plain = pair(no_hooks, 0.1, None);
    let burn = chain(false, VendorSync::Host, 0.1, None);
    let late_inputs = pair(no_hooks, 0.2, Some(delay));
    let late_outputs = pair(Hooks { library_delay: delay, ..no_hooks }, 0.3, Some(0));
    let after = vendor_stats();
    let no_ready_wait = pair(Hooks { skip_ready: true, ..no_hooks }, 0.4, Some(delay));
    let no_done_wait = pair(Hooks { library_delay: delay, skip_done: true, ..no_hooks }, 0.5, Some(0));
    assert_eq!(after.ordering_error, None);
    assert_eq!(after.ordering_timeouts, 0, "a GPU-side wait gave up");
    assert_eq!(after.fallbacks, before.fallbacks, "fallbacks: {:?}", after.last_error);
    // Three GPU-ordered runs of two calls per step; each problem's first call is
    // host-ordered (the matmul and the conv, per pointer alignment class).
    let ordered = after.device_ordered - before.device_ordered;
    eprintln!("GPU-ordered calls: {ordered} of {}", 6 * steps);
    assert!(ordered + 8 >= 6 * steps as u64, "only {ordered} of {} calls were GPU-ordered", 6 * steps);
    assert_eq!(close(&plain, 1e-3), [true, true], "[matmul, conv] chains: GPU- vs host-ordered");
    assert_eq!(close(&(plain.0.clone(), burn), 5e-2), [true, true], "[matmul, conv] chains: GPU-ordered vs burn's kernels");
    assert_eq!(close(&late_inputs, 1e-3), [true, true], "[matmul, conv] chains with late inputs: GPU- vs host-ordered");
    assert_eq!(close(&late_outputs, 1e-3), [true, true], "[matmul, conv] chains with late outputs: GPU- vs host-ordered");
    for (name, control) in [("our stream's wait for the inputs", &no_ready_wait), ("burn's wait for the outputs", &no_done_wait)] {
        let got = close(control, 1e-2);
        eprintln!("negative control ({name} skipped) close to the host-ordered chain: [matmul, conv] = {got:?}");
        assert_eq!(got, [false, false], "with {name} skipped the chains still matched: they cannot catch its failure");
    }
}

/// The fused softmax kernel against burn's ops on CUDA: attention-shaped score blocks (rows
/// longer than a cube, an odd length), a short row, and every input/output dtype pairing of
/// f32 and bf16. Run on the GPU machine like the cuDNN test.
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn fused_softmax_matches_burn_on_cuda() {
    use burn::tensor::DType;
    let _guard = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    type B = burn::backend::Cuda;
    let device = Default::default();
    let before = vendor_stats();
    let mut runs = 0;
    for shape in [[2, 8, 64, 4096], [1, 3, 5, 4099], [4, 2, 3, 77]] {
        let x = Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 4.0), &device);
        for (input, output) in [(DType::F32, DType::F32), (DType::BF16, DType::BF16), (DType::F32, DType::BF16), (DType::BF16, DType::F32)] {
            let x = crate::precision::cast_to(x.clone(), input);
            set_fused_softmax(false);
            let reference = scaled_softmax(x.clone(), 0.158, output);
            set_fused_softmax(true);
            let ours = scaled_softmax(x, 0.158, output);
            set_fused_softmax(false);
            runs += 1;
            let f32 = |t: Tensor<B, 4>| crate::precision::cast_to(t, DType::F32);
            let tolerance = if output == DType::F32 { 1e-5 } else { 1e-2 };
            assert!(max_rel(f32(ours), f32(reference)) < tolerance, "{shape:?} {input:?} -> {output:?}");
        }
    }
    let after = vendor_stats();
    assert_eq!(after.fallbacks, before.fallbacks, "fallbacks: {:?}", after.last_error);
    assert_eq!(after.fused_softmax_calls - before.fused_softmax_calls, runs);
}

#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn concat_flat_matches_cat_on_cuda() {
    concat::check_matches_cat::<burn::backend::Cuda>(burn::tensor::DType::BF16);
}

/// `scaled_softmax` on the CPU: the last dimension sums to one in the requested dtype, and a
/// bf16 input gives the f32 result up to bf16 rounding of the input.
#[test]
fn scaled_softmax_on_flex_matches_plain_softmax() {
    use burn::tensor::activation::softmax;
    use burn::tensor::DType;
    let device = Default::default();
    let x = Tensor::<Flex, 3>::random([2, 5, 33], Distribution::Normal(0.0, 3.0), &device);
    let reference = softmax(x.clone() * 0.3, 2);
    let ours = scaled_softmax(x.clone(), 0.3, DType::F32);
    assert_eq!(ours.dtype(), DType::F32);
    let diff: f32 = (ours.clone() - reference.clone()).abs().max().into_scalar();
    assert!(diff < 1e-6, "f32: {diff}");
    let sums: Vec<f32> = ours.sum_dim(2).into_data().to_vec().unwrap();
    assert!(sums.iter().all(|s| (s - 1.0).abs() < 1e-5), "row sums {sums:?}");
    let half = scaled_softmax(crate::precision::cast_to(x, DType::BF16), 0.3, DType::BF16);
    assert_eq!(half.dtype(), DType::BF16);
    let diff: f32 = (crate::precision::cast_to(half, DType::F32) - reference).abs().max().into_scalar();
    assert!(diff < 3e-2, "bf16: {diff}");
}

/// The flash-attention kernels against the same math in burn's ops (f32 scores) on CUDA:
/// SD1.5-like self-attention (4096 tokens at head dimension 40 is the 512 px case; 1024 here
/// keeps the reference's score matrix small), cross-attention with 77 keys, the larger head
/// dimensions (80, 160; SD2's 64), sequences off the block sizes; bf16 and f16. Output,
/// log-sum-exp and the three input gradients. Run on the GPU machine like the cuDNN test.
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn flash_attention_matches_math_on_cuda() {
    use burn::tensor::DType;
    let _guard = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    type B = burn::backend::Cuda;
    let device = Default::default();
    let before = vendor_stats();
    let mut runs = 0;
    let f32 = |t: Tensor<B, 4>| crate::precision::cast_to(t, DType::F32);
    for (b, h, sq, sk, d) in [(2, 8, 1024, 1024, 40), (2, 8, 256, 77, 80), (1, 8, 64, 64, 160), (1, 5, 300, 333, 64), (1, 1, 1, 5, 40)] {
        for dtype in [DType::BF16, DType::F16] {
            // Heads split as attention splits them: a `[b, s, h, d]` tensor viewed as
            // `[b, h, s, d]`, which the kernels read through its strides.
            let input = |s: usize, mean: f64| crate::precision::cast_to(Tensor::<B, 4>::random([b, s, h, d], Distribution::Normal(mean, 1.0), &device), dtype).swap_dims(1, 2);
            let (q, k, v, g) = (input(sq, 0.1), input(sk, -0.1), input(sk, 0.0), input(sq, 0.0));
            let scale = (d as f32).powf(-0.5);
            set_flash_attention(true);
            let (out, lse) = flash_attention(q.clone(), k.clone(), v.clone(), scale).expect("flash forward on CUDA");
            let (dq, dk, dv) = flash_attention_backward(q.clone(), k.clone(), v.clone(), out.clone(), g.clone(), lse.clone(), scale).expect("flash backward on CUDA");
            set_flash_attention(false);
            runs += 2;
            let (out_ref, lse_ref) = flash::forward_math(f32(q.clone()), f32(k.clone()), f32(v.clone()), scale);
            let delta = (f32(g.clone()) * out_ref.clone()).sum_dim(3).squeeze_dim(3);
            let (dq_ref, dk_ref, dv_ref) = flash::backward_math(f32(q), f32(k), f32(v), f32(g), lse_ref.clone(), delta, scale);
            let tolerance = if dtype == DType::BF16 { 3e-2 } else { 5e-3 };
            let shape = (b, h, sq, sk, d, dtype);
            for (what, ours, reference) in [("out", out, out_ref), ("dq", dq, dq_ref), ("dk", dk, dk_ref), ("dv", dv, dv_ref)] {
                let err = max_rel(f32(ours), reference);
                eprintln!("{shape:?} {what}: {err:.2e}");
                assert!(err < tolerance, "{shape:?} {what}: relative error {err}");
            }
            let lse_err: f32 = (lse - lse_ref).abs().max().into_scalar();
            assert!(lse_err < 1e-2, "{shape:?} lse: {lse_err}");
        }
    }
    let after = vendor_stats();
    assert_eq!(after.fallbacks, before.fallbacks, "fallbacks: {:?}", after.last_error);
    assert_eq!(after.flash_attention_calls - before.flash_attention_calls, runs);
}

/// One attention problem `[b, h, s_q, s_kv, d]` in `dtype` (head-split `[b, s, h, d]`
/// views, as attention passes them) through [`flash_attention`] and
/// [`flash_attention_backward`] with cuDNN's attention on (and the flash kernels with
/// `flash`): `[out, dq, dk, dv]`, the log-sum-exp, and the same from f32 math.
#[cfg(feature = "cuda")]
#[allow(clippy::type_complexity)]
fn attention_pass<B: Backend>(
    [b, h, sq, sk, d]: [usize; 5],
    dtype: burn::tensor::DType,
    flash: bool,
    device: &B::Device,
) -> ([Tensor<B, 4>; 4], Tensor<B, 3>, ([Tensor<B, 4>; 4], Tensor<B, 3>)) {
    let f32 = |t: Tensor<B, 4>| crate::precision::cast_to(t, burn::tensor::DType::F32);
    let input = |s: usize, mean: f64| crate::precision::cast_to(Tensor::<B, 4>::random([b, s, h, d], Distribution::Normal(mean, 1.0), device), dtype).swap_dims(1, 2);
    let (q, k, v, g) = (input(sq, 0.1), input(sk, -0.1), input(sk, 0.0), input(sq, 0.0));
    let scale = (d as f32).powf(-0.5);
    // The route is fixed when a pass is queued, so the switches may go off right after.
    set_cudnn_attention(true);
    set_flash_attention(flash);
    let (out, lse) = flash_attention(q.clone(), k.clone(), v.clone(), scale).expect("attention forward on CUDA");
    let (dq, dk, dv) = flash_attention_backward(q.clone(), k.clone(), v.clone(), out.clone(), g.clone(), lse.clone(), scale).expect("attention backward on CUDA");
    set_cudnn_attention(false);
    set_flash_attention(false);
    let (out_ref, lse_ref) = flash::forward_math(f32(q.clone()), f32(k.clone()), f32(v.clone()), scale);
    let delta = (f32(g.clone()) * out_ref.clone()).sum_dim(3).squeeze_dim(3);
    let (dq_ref, dk_ref, dv_ref) = flash::backward_math(f32(q), f32(k), f32(v), f32(g), lse_ref.clone(), delta, scale);
    ([out, dq, dk, dv], lse, ([out_ref, dq_ref, dk_ref, dv_ref], lse_ref))
}

/// Asserts [`attention_pass`]'s results within `tolerance` of the reference (relative to
/// each tensor's peak; the log-sum-exp within 1e-2 absolute).
#[cfg(feature = "cuda")]
fn check_attention<B: Backend>(what: &str, ours: [Tensor<B, 4>; 4], lse: Tensor<B, 3>, (reference, lse_ref): ([Tensor<B, 4>; 4], Tensor<B, 3>), tolerance: f32) {
    for ((name, ours), reference) in ["out", "dq", "dk", "dv"].into_iter().zip(ours).zip(reference) {
        let err = max_rel(crate::precision::cast_to(ours, burn::tensor::DType::F32), reference);
        eprintln!("{what} {name}: {err:.2e}");
        assert!(err < tolerance, "{what} {name}: relative error {err}");
    }
    let lse_err: f32 = (lse - lse_ref).abs().max().into_scalar().elem();
    assert!(lse_err < 1e-2, "{what} lse: {lse_err}");
}

/// [`attention_pass`] (cuDNN only) and [`check_attention`] for each shape in bf16 and f16;
/// the number of passes run (two per problem).
#[cfg(feature = "cuda")]
fn cudnn_passes_match<B: Backend>(what: &str, shapes: &[[usize; 5]], device: &B::Device) -> u64 {
    use burn::tensor::DType;
    let mut runs = 0;
    for &shape in shapes {
        for dtype in [DType::BF16, DType::F16] {
            let (ours, lse, reference) = attention_pass::<B>(shape, dtype, false, device);
            runs += 2;
            let tolerance = if dtype == DType::BF16 { 3e-2 } else { 5e-3 };
            check_attention(&format!("{what} {shape:?} {dtype:?}"), ours, lse, reference, tolerance);
        }
    }
    runs
}

/// cuDNN's fused attention ([`set_cudnn_attention`]) against the same math in f32 on CUDA:
/// SD1.5's self-attention shapes (d = 40, 80, 160 at 1024, 256 and 128 tokens; SD2's 64),
/// head-split `[b, s, h, d]` views as attention passes them, bf16 and f16; output,
/// log-sum-exp and the three input gradients; the cross-attention's 77 keys and the middle
/// block's 64 tokens with the padded backward off (forward in cuDNN, backward in the flash
/// kernels); then a problem through the flash kernels' forward and cuDNN's backward, whose
/// log-sum-exp must agree. Every pass cuDNN takes must run there (no fallback). With
/// `CUDNN_LOGERR_DBG=1 CUDNN_LOGDEST_DBG=stderr` cuDNN says why it refuses a graph.
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn cudnn_attention_matches_math_on_cuda() {
    use burn::tensor::DType;
    let _guard = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    type B = burn::backend::Cuda;
    cudnn_attention_status().unwrap_or_else(|reason| panic!("cuDNN attention unavailable: {reason}"));
    let device = Default::default();
    let before = vendor_stats();
    let mut runs = cudnn_passes_match::<B>("cuDNN", &[[2, 8, 1024, 1024, 40], [2, 8, 256, 256, 80], [1, 8, 128, 128, 160], [1, 5, 300, 384, 64]], &device);
    // Forward only in cuDNN: the 77-token cross-attention and the 64-token middle block
    // with the padded backward off (their backward passes then run in the flash kernels,
    // from cuDNN's log-sum-exp, as in training when the padded graph fails its test).
    let flash_before = vendor_stats().flash_attention_calls;
    set_cudnn_padded_backward(false);
    for shape in [[2, 8, 1024, 77, 40], [2, 8, 64, 64, 160]] {
        let (ours, lse, reference) = attention_pass::<B>(shape, DType::BF16, true, &device);
        runs += 1;
        check_attention(&format!("cuDNN forward {shape:?}"), ours, lse, reference, 3e-2);
    }
    set_cudnn_padded_backward(true);
    let after = vendor_stats();
    assert_eq!(after.fallbacks, before.fallbacks, "fallbacks: {:?}", after.last_error);
    assert_eq!(after.cudnn_attention_calls - before.cudnn_attention_calls, runs);
    assert_eq!(after.flash_attention_calls - flash_before, 2, "the two backward passes cuDNN does not take");
    // The flash kernels' forward, then cuDNN's backward from its log-sum-exp.
    let f32 = |t: Tensor<B, 4>| crate::precision::cast_to(t, DType::F32);
    let input = |s: usize| crate::precision::cast_to(Tensor::<B, 4>::random([1, s, 4, 40], Distribution::Normal(0.0, 1.0), &device), DType::BF16).swap_dims(1, 2);
    let (q, k, v, g) = (input(256), input(256), input(256), input(256));
    set_flash_attention(true);
    let (out, lse) = flash_attention(q.clone(), k.clone(), v.clone(), 0.158).expect("flash forward");
    set_flash_attention(false);
    set_cudnn_attention(true);
    let (dq, dk, dv) = flash_attention_backward(q.clone(), k.clone(), v.clone(), out.clone(), g.clone(), lse.clone(), 0.158).expect("cuDNN backward");
    set_cudnn_attention(false);
    let (_, lse_ref) = flash::forward_math(f32(q.clone()), f32(k.clone()), f32(v.clone()), 0.158);
    let delta = (f32(g.clone()) * f32(out)).sum_dim(3).squeeze_dim(3);
    let (dq_ref, dk_ref, dv_ref) = flash::backward_math(f32(q), f32(k), f32(v), f32(g), lse_ref, delta, 0.158);
    for (name, ours, reference) in [("dq", dq, dq_ref), ("dk", dk, dk_ref), ("dv", dv, dv_ref)] {
        assert!(max_rel(f32(ours), reference) < 3e-2, "cuDNN backward from the flash kernels' log-sum-exp: {name}");
    }
    assert_eq!(vendor_stats().fallbacks, before.fallbacks, "fallbacks: {:?}", vendor_stats().last_error);
    cudnn_attention_on_rows_matches_math::<B>(&device);
}

/// The path the model takes (`flash_attention_rows`, `flash_attention_backward_rows`):
/// `[batch·seq, heads·d]` token rows at SD1.5's first width (8 heads of 40), self-attention
/// in cuDNN both ways and the 77-key cross-attention forward in cuDNN, backward in the
/// flash kernels (the padded backward off, as in the head-split part above); against f32
/// math on the head-split views.
#[cfg(feature = "cuda")]
fn cudnn_attention_on_rows_matches_math<B: Backend>(device: &B::Device) {
    use burn::tensor::DType;
    let (batch, heads, d, queries) = (2, 8, 40, 1024);
    let f32 = |t: Tensor<B, 4>| crate::precision::cast_to(t, DType::F32);
    let rows = |s: usize, mean: f64| crate::precision::cast_to(Tensor::<B, 2>::random([batch * s, heads * d], Distribution::Normal(mean, 1.0), device), DType::BF16);
    let split = |t: Tensor<B, 2>| {
        let s = t.dims()[0] / batch;
        t.reshape([batch, s, heads, d]).swap_dims(1, 2)
    };
    let merge = |t: Tensor<B, 4>| {
        let [b, h, s, d] = t.dims();
        t.swap_dims(1, 2).reshape([b * s, h * d])
    };
    let scale = (d as f32).powf(-0.5);
    set_cudnn_padded_backward(false);
    for keys in [queries, 77] {
        let (q, k, v, g) = (rows(queries, 0.1), rows(keys, -0.1), rows(keys, 0.0), rows(queries, 0.0));
        let before = vendor_stats();
        // The routes are fixed when the passes are queued.
        set_cudnn_attention(true);
        set_flash_attention(true);
        let (out, lse) = flash_attention_rows(q.clone(), k.clone(), v.clone(), batch, heads, scale).expect("attention forward on rows");
        let inputs = AttentionRowsBackward { q: q.clone(), k: k.clone(), v: v.clone(), out: out.clone(), grad_out: g.clone(), lse: lse.clone() };
        let [dq, dk, dv] = flash_attention_backward_rows(inputs, batch, heads, scale).expect("attention backward on rows");
        set_cudnn_attention(false);
        set_flash_attention(false);
        let (out_ref, lse_ref) = flash::forward_math(f32(split(q.clone())), f32(split(k.clone())), f32(split(v.clone())), scale);
        let delta = (f32(split(g.clone())) * out_ref.clone()).sum_dim(3).squeeze_dim(3);
        let (dq_ref, dk_ref, dv_ref) = flash::backward_math(f32(split(q)), f32(split(k)), f32(split(v)), f32(split(g)), lse_ref.clone(), delta, scale);
        let what = format!("rows, {queries} queries, {keys} keys");
        for (name, ours, reference) in [("out", out, out_ref), ("dq", dq, dq_ref), ("dk", dk, dk_ref), ("dv", dv, dv_ref)] {
            let err = max_rel(crate::precision::cast_to(ours, DType::F32), merge(reference));
            eprintln!("{what} {name}: {err:.2e}");
            assert!(err < 3e-2, "{what} {name}: relative error {err}");
        }
        let lse_err: f32 = (lse - lse_ref.reshape([batch, heads, queries])).abs().max().into_scalar().elem();
        assert!(lse_err < 1e-2, "{what} lse: {lse_err}");
        // Counted when the passes ran (the reads above).
        let after = vendor_stats();
        assert_eq!(after.fallbacks, before.fallbacks, "{what}: fallbacks: {:?}", after.last_error);
        let cudnn = if keys == 77 { 1 } else { 2 };
        assert_eq!(after.cudnn_attention_calls - before.cudnn_attention_calls, cudnn, "{what}: passes in cuDNN");
        assert_eq!(after.flash_attention_calls - before.flash_attention_calls, 2 - cudnn, "{what}: passes in the flash kernels");
    }
    set_cudnn_padded_backward(true);
}

/// cuDNN's attention over key counts that are not multiples of 128, both passes
/// ([`set_cudnn_padded_backward`]: the backward graph with cudnn-frontend's padding-mask
/// workaround): SD's 77-token cross-attention (d = 40 and 160) and the 64-token middle
/// block, bf16 and f16, against f32 math; no fallback. A test of its own, so that the
/// device script can keep cuDNN's attention for the rest when only this fails.
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn cudnn_attention_padded_backward_matches_math_on_cuda() {
    let _guard = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    type B = burn::backend::Cuda;
    cudnn_attention_status().unwrap_or_else(|reason| panic!("cuDNN attention unavailable: {reason}"));
    set_cudnn_padded_backward(true);
    let device = Default::default();
    let before = vendor_stats();
    let runs = cudnn_passes_match::<B>("cuDNN padded", &[[2, 8, 1024, 77, 40], [1, 8, 256, 77, 160], [2, 8, 64, 64, 160], [1, 3, 200, 100, 64]], &device);
    let after = vendor_stats();
    assert_eq!(after.fallbacks, before.fallbacks, "fallbacks: {:?}", after.last_error);
    assert_eq!(after.cudnn_attention_calls - before.cudnn_attention_calls, runs);
}

/// The fused GroupNorm kernels against burn's ops on CUDA: SD1.5's GroupNorm + SiLU shapes
/// at 512 px (320 channels at 64×64, 1280 at 8×8; 32 groups), a plain GroupNorm, odd
/// planes (scalar loads), f32 and bf16 activations with f32 or bf16 γ, β; output, group
/// statistics and the three gradients; then LayerNorm rows of the transformers' widths
/// (output and input gradient). Run on the GPU machine like the cuDNN test.
#[cfg(feature = "cuda")]
#[test]
#[ignore = "needs an NVIDIA GPU"]
fn fused_group_norm_matches_burn_on_cuda() {
    use burn::tensor::DType;
    let _guard = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
    type B = burn::backend::Cuda;
    let device = Default::default();
    let before = vendor_stats();
    let mut runs = 0;
    let f32 = |t: Tensor<B, 4>| crate::precision::cast_to(t, DType::F32);
    let f32_1 = |t: Tensor<B, 1>| crate::precision::cast_to(t, DType::F32);
    for (shape, groups, silu) in [([2, 320, 64, 64], 32, true), ([2, 1280, 8, 8], 32, true), ([1, 64, 33, 17], 8, false), ([3, 4, 5, 5], 2, true)] {
        for (act, param) in [(DType::F32, DType::F32), (DType::BF16, DType::BF16), (DType::BF16, DType::F32)] {
            let spec = GroupNormSpec { groups, epsilon: 1e-5, silu };
            let x = crate::precision::cast_to(Tensor::<B, 4>::random(shape, Distribution::Normal(0.5, 2.0), &device), act);
            let dy = crate::precision::cast_to(Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device), act);
            let gamma = crate::precision::cast_to(Tensor::<B, 1>::random([shape[1]], Distribution::Normal(1.0, 0.5), &device), param);
            let beta = crate::precision::cast_to(Tensor::<B, 1>::random([shape[1]], Distribution::Normal(0.0, 0.5), &device), param);
            let pass = |fused: bool| {
                set_fused_group_norm(fused);
                let (y, mean, rstd) = group_norm(x.clone(), gamma.clone(), beta.clone(), spec);
                let (dx, dg, db) = group_norm_backward(x.clone(), gamma.clone(), beta.clone(), mean.clone(), rstd.clone(), dy.clone(), spec);
                set_fused_group_norm(false);
                (f32(y), mean, rstd, f32(dx), f32_1(dg), f32_1(db))
            };
            let ours = pass(true);
            let reference = pass(false);
            runs += 2;
            let tolerance = if act == DType::F32 && param == DType::F32 { 1e-4 } else { 2e-2 };
            let case = (shape, groups, silu, act, param);
            let checks = [
                ("y", max_rel(ours.0, reference.0)),
                ("mean", max_rel(ours.1, reference.1)),
                ("rstd", max_rel(ours.2, reference.2)),
                ("dx", max_rel(ours.3, reference.3)),
                ("dγ", max_rel(ours.4, reference.4)),
                ("dβ", max_rel(ours.5, reference.5)),
            ];
            for (what, err) in checks {
                eprintln!("{case:?} {what}: {err:.2e}");
                assert!(err < tolerance, "{case:?} {what}: relative error {err}");
            }
        }
    }
    // LayerNorms as GroupNorms of one group over `[rows, d]` (the row kernels): the
    // forward pass and the input gradient of a frozen norm.
    let f32 = |t: Tensor<B, 2>| crate::precision::cast_to(t, DType::F32);
    for (rows, d) in [(8192, 320), (154, 768), (300, 1280), (5, 33)] {
        for (act, param) in [(DType::F32, DType::F32), (DType::BF16, DType::BF16)] {
            let spec = GroupNormSpec { groups: 1, epsilon: 1e-5, silu: false };
            let x = crate::precision::cast_to(Tensor::<B, 2>::random([rows, d], Distribution::Normal(0.5, 2.0), &device), act);
            let dy = crate::precision::cast_to(Tensor::<B, 2>::random([rows, d], Distribution::Normal(0.0, 1.0), &device), act);
            let gamma = crate::precision::cast_to(Tensor::<B, 1>::random([d], Distribution::Normal(1.0, 0.5), &device), param);
            let beta = crate::precision::cast_to(Tensor::<B, 1>::random([d], Distribution::Normal(0.0, 0.5), &device), param);
            let pass = |fused: bool| {
                set_fused_group_norm(fused);
                let (y, mean, rstd) = group_norm(x.clone(), gamma.clone(), beta.clone(), spec);
                let dx = group_norm_input_grad(x.clone(), gamma.clone(), beta.clone(), mean, rstd, dy.clone(), spec);
                set_fused_group_norm(false);
                (f32(y), f32(dx))
            };
            let ours = pass(true);
            let reference = pass(false);
            runs += 2;
            let tolerance = if act == DType::F32 { 1e-4 } else { 2e-2 };
            let case = (rows, d, act);
            for (what, err) in [("y", max_rel(ours.0, reference.0)), ("dx", max_rel(ours.1, reference.1))] {
                eprintln!("layer norm {case:?} {what}: {err:.2e}");
                assert!(err < tolerance, "layer norm {case:?} {what}: relative error {err}");
            }
        }
    }
    let after = vendor_stats();
    assert_eq!(after.fallbacks, before.fallbacks, "fallbacks: {:?}", after.last_error);
    assert_eq!(after.fused_group_norm_calls - before.fused_group_norm_calls, runs);
}

/// The cuBLAS routing rule at the default thresholds, on SD1.5's linear layers at 512 px
/// (the shapes behind the H200 measurements of 2026-12-04): batch 1's attention
/// projections (0.84 GFLOP) go to cuBLAS where they have 1024 rows or more, batch 8's
/// cross-attention keys / values (616 rows) and middle-block projections (512 rows) stay
/// in the fixed kernel as they did at the 4-GFLOP threshold, and everything from 4 GFLOP
/// goes to cuBLAS.
#[test]
fn cublas_routing_takes_tall_matmuls_from_a_quarter_gflop() {
    let at = CublasThresholds { min_flops: 4e9, tall_min_flops: 0.25e9, tall_rows: CUBLAS_TALL_ROWS };
    let routed = |rows: usize, k: usize, n: usize| worth_routing_at(&[rows, k], &[k, n], at);
    // Batch 1: q/k/v/out at the 4096- and 1024-token levels, not the 256-token one.
    assert!(routed(4096, 320, 320) && routed(1024, 640, 640));
    assert!(!routed(256, 1280, 1280));
    // Batch 8: the cross-attention's keys and values over 8 x 77 rows, the middle block.
    assert!(!routed(616, 768, 1280) && !routed(512, 1280, 1280));
    // From 4 GFLOP, any rows: the feed-forward projections, batch 8's attention.
    assert!(routed(512, 1280, 10240) && routed(32768, 320, 320));
    // Small tall ones stay: the LoRA products of rank 4.
    assert!(!routed(32768, 320, 4));
    // Batched operands count their batch in the rows; unequal batches never route.
    assert!(worth_routing_at(&[8, 512, 320], &[8, 320, 320], at));
    assert!(!worth_routing_at(&[8, 512, 320], &[1, 320, 320], at));
    // The tall rule off (its threshold at the size threshold's): size alone.
    let size_only = CublasThresholds { min_flops: 4e9, tall_min_flops: 4e9, ..at };
    assert!(!worth_routing_at(&[4096, 320], &[320, 320], size_only));
    // Tall from 512 rows: a CFG batch's 256-token level goes too, batch 8's 616-row
    // keys / values with it.
    let from_512 = CublasThresholds { tall_rows: 512, ..at };
    let routed_512 = |rows: usize, k: usize, n: usize| worth_routing_at(&[rows, k], &[k, n], from_512);
    assert!(routed_512(512, 1280, 1280) && routed_512(616, 768, 1280));
    assert!(!routed_512(256, 1280, 1280));
}
