//! Where the frozen base convolutions run.
//!
//! [`LoraConv2d`](crate::LoraConv2d) sends its base convolution through [`conv2d`], which
//! registers its own backward pass on burn's autodiff backend over Flex or CUDA (any
//! checkpointing strategy):
//!
//! - **Frozen weights cost no activation memory.** burn's conv backward keeps the input
//!   alive for the weight gradient even when the weight never receives one. Ours keeps the
//!   input only when the weight is tracked; the input gradient needs just the weight. In the
//!   UNet most conv inputs are GroupNorm + SiLU outputs that nothing else keeps.
//! - **cuDNN on CUDA** ([`set_cudnn`], `cuda` feature). burn 0.21's convolution kernels
//!   reach about a tenth of cuDNN's throughput on an H100/H200, and convolutions are about
//!   half of the UNet's FLOPs. With cuDNN on, the forward, input-gradient and
//!   weight-gradient convolutions of the CUDA backend run through `libcudnn` (version 9,
//!   loaded at run time; see [`cudnn_status`]). A shape or dtype cuDNN rejects, or a
//!   missing library, falls back to burn's kernel for that call and is counted in
//!   [`vendor_stats`].
//!
//! Any other backend, or an asymmetric padding, takes burn's own `Conv2d::forward`.
//! [`set_custom_conv_backward`]`(false)` turns the custom op off everywhere.

use std::any::{Any, TypeId};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::nn::conv::Conv2d;
use burn::nn::PaddingConfig2d;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{ConvOptions, ConvTransposeOptions, FloatTensor};
use burn::tensor::{Tensor, TensorMetadata, TensorPrimitive};

use crate::precision::cast_to;

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
mod cudnn;

static CUSTOM_CONV_BACKWARD: AtomicBool = AtomicBool::new(true);
static CUDNN: AtomicBool = AtomicBool::new(false);
static CUDNN_CALLS: AtomicU64 = AtomicU64::new(0);
static FALLBACKS: AtomicU64 = AtomicU64::new(0);
static LAST_ERROR: Mutex<Option<String>> = Mutex::new(None);

/// Turns the base convolutions' own backward pass (see the [module docs](self)) on or off
/// for the whole process (default on). Off, burn differentiates `Conv2d::forward` itself;
/// the gradients are the same, the memory is not. For benchmarks and A/B checks.
pub fn set_custom_conv_backward(enabled: bool) {
    CUSTOM_CONV_BACKWARD.store(enabled, Ordering::Relaxed);
}

/// Whether the base convolutions use their own backward pass ([`set_custom_conv_backward`]).
pub fn custom_conv_backward() -> bool {
    CUSTOM_CONV_BACKWARD.load(Ordering::Relaxed)
}

/// Routes the CUDA backend's base convolutions (forward and both gradients) to cuDNN, for
/// the whole process (default off). Has no effect without the `cuda` feature or on other
/// backends; a missing or failing cuDNN falls back to burn's kernels per call.
pub fn set_cudnn(enabled: bool) {
    CUDNN.store(enabled, Ordering::Relaxed);
}

/// Whether [`set_cudnn`] is on.
pub fn cudnn_enabled() -> bool {
    CUDNN.load(Ordering::Relaxed)
}

/// Counters of the vendor-library routing since the process started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VendorStats {
    /// Convolutions (forward or gradient) that ran in cuDNN.
    pub cudnn_calls: u64,
    /// Convolutions that were meant for cuDNN but ran in burn's kernel instead.
    pub fallbacks: u64,
    /// Why the most recent fallback happened.
    pub last_error: Option<String>,
}

/// What the vendor-library routing has done so far (see [`VendorStats`]).
pub fn vendor_stats() -> VendorStats {
    VendorStats {
        cudnn_calls: CUDNN_CALLS.load(Ordering::Relaxed),
        fallbacks: FALLBACKS.load(Ordering::Relaxed),
        last_error: LAST_ERROR.lock().map(|e| e.clone()).unwrap_or(None),
    }
}

/// Whether cuDNN can be used in this process: `Ok(version)` (e.g. `90800` for 9.8.0) when
/// the library loads and a handle can be created, otherwise why not. Always an error
/// without the `cuda` feature.
pub fn cudnn_status() -> Result<usize, String> {
    #[cfg(feature = "cuda")]
    {
        cudnn::status()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err("built without the `cuda` feature".to_string())
    }
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn record_cudnn_call() {
    CUDNN_CALLS.fetch_add(1, Ordering::Relaxed);
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn record_fallback(reason: String) {
    FALLBACKS.fetch_add(1, Ordering::Relaxed);
    if let Ok(mut last) = LAST_ERROR.lock() {
        *last = Some(reason);
    }
}

/// `conv.forward(x)`, through the custom op where it applies (see the [module docs](self)).
///
/// ```
/// use burn::backend::{Autodiff, Flex};
/// use burn::nn::conv::Conv2dConfig;
/// use burn::nn::PaddingConfig2d;
/// use burn::tensor::{Distribution, Tensor};
///
/// type B = Autodiff<Flex>;
/// let device = Default::default();
/// let conv = Conv2dConfig::new([3, 4], [3, 3])
///     .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
///     .init::<B>(&device);
/// let x = Tensor::<B, 4>::random([2, 3, 8, 8], Distribution::Default, &device);
/// let ours = lora_core::kernels::conv2d(&conv, x.clone());
/// let err: f32 = (ours - conv.forward(x)).abs().max().into_scalar();
/// assert!(err < 1e-5);
/// ```
pub fn conv2d<B: Backend>(conv: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    let weight = conv.weight.val();
    let options = match symmetric_options(conv) {
        Some(options) if custom_conv_backward() && weight.dtype() == x.dtype() => options,
        _ => return conv.forward(x),
    };
    let dtype = x.dtype();
    let args = (x, weight);
    let Some(y) = dispatch(&args, &options) else {
        return conv.forward(args.0);
    };
    match &conv.bias {
        Some(bias) => {
            let c = bias.dims()[0];
            y + cast_to(bias.val(), dtype).reshape([1, c, 1, 1])
        }
        None => y,
    }
}

/// burn's `ConvOptions` for `conv`, when its padding is explicit (or none) and the same on
/// both sides of each axis: what cuDNN and burn's conv op take, and what every SD
/// convolution uses. `Same` padding takes burn's own path, which resolves it per input size.
fn symmetric_options<B: Backend>(conv: &Conv2d<B>) -> Option<ConvOptions<2>> {
    let padding = match conv.padding {
        PaddingConfig2d::Valid => [0, 0],
        PaddingConfig2d::Explicit(top, left, bottom, right) if top == bottom && left == right => [top, left],
        _ => return None,
    };
    Some(ConvOptions::new(conv.stride, padding, conv.dilation, conv.groups))
}

/// The custom op for the backends it is registered on; `None` elsewhere.
fn dispatch<B: Backend>(args: &(Tensor<B, 4>, Tensor<B, 4>), options: &ConvOptions<2>) -> Option<Tensor<B, 4>> {
    use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, NoCheckpointing};
    let found = for_autodiff::<B, burn::backend::Flex, NoCheckpointing>(args, options)
        .or_else(|| for_autodiff::<B, burn::backend::Flex, BalancedCheckpointing>(args, options));
    #[cfg(feature = "cuda")]
    let found = found
        .or_else(|| for_autodiff::<B, burn::backend::Cuda, NoCheckpointing>(args, options))
        .or_else(|| for_autodiff::<B, burn::backend::Cuda, BalancedCheckpointing>(args, options))
        .or_else(|| for_inference::<B, burn::backend::Cuda>(args, options));
    found
}

/// `value` as a `U` when it is one: moves a tensor into the concrete backend type `B` was
/// just checked to be (a `TypeId` check and an `Any` downcast, no unsafe code).
#[doc(hidden)]
pub fn downcast<T: 'static, U: 'static>(value: T) -> Option<U> {
    (Box::new(value) as Box<dyn Any>).downcast::<U>().ok().map(|b| *b)
}

/// A backend primitive (as backward passes receive them) as a tensor of rank `D`.
#[doc(hidden)]
pub fn tensor<X: Backend, const D: usize>(primitive: FloatTensor<X>) -> Tensor<X, D> {
    Tensor::from_primitive(TensorPrimitive::Float(primitive))
}

fn for_autodiff<B: Backend, X: ConvKernels, C: CheckpointStrategy>(
    args: &(Tensor<B, 4>, Tensor<B, 4>),
    options: &ConvOptions<2>,
) -> Option<Tensor<B, 4>> {
    if TypeId::of::<B>() != TypeId::of::<Autodiff<X, C>>() {
        return None;
    }
    let (x, weight) = args.clone();
    let out = autodiff_op::<X, C>(downcast(x)?, downcast(weight)?, options.clone());
    downcast(out)
}

#[cfg(feature = "cuda")]
fn for_inference<B: Backend, X: ConvKernels>(args: &(Tensor<B, 4>, Tensor<B, 4>), options: &ConvOptions<2>) -> Option<Tensor<B, 4>> {
    if TypeId::of::<B>() != TypeId::of::<X>() || !cudnn_enabled() {
        return None;
    }
    let (x, weight) = args.clone();
    let (x, weight): (Tensor<X, 4>, Tensor<X, 4>) = (downcast(x)?, downcast(weight)?);
    let y = X::forward(x.into_primitive().tensor(), weight.into_primitive().tensor(), options);
    downcast(tensor::<X, 4>(y))
}

/// The three convolutions of a conv layer's forward and backward pass, per backend.
/// The defaults are burn's own ops; CUDA overrides them with cuDNN.
trait ConvKernels: Backend {
    /// `y = conv(x, w)`, no bias.
    fn forward(x: FloatTensor<Self>, weight: FloatTensor<Self>, options: &ConvOptions<2>) -> FloatTensor<Self> {
        burn_forward::<Self>(x, weight, options)
    }

    /// `dL/dx` from `dL/dy` and the weight alone.
    fn backward_data(weight: FloatTensor<Self>, grad_out: FloatTensor<Self>, x_shape: [usize; 4], options: &ConvOptions<2>) -> FloatTensor<Self> {
        burn_backward_data::<Self>(weight, grad_out, x_shape, options)
    }

    /// `dL/dW` from the input and `dL/dy` (the weight gives the shape).
    fn backward_filter(x: FloatTensor<Self>, weight: FloatTensor<Self>, grad_out: FloatTensor<Self>, options: &ConvOptions<2>) -> FloatTensor<Self> {
        burn_backward_filter::<Self>(x, weight, grad_out, options)
    }
}

fn burn_forward<X: Backend>(x: FloatTensor<X>, weight: FloatTensor<X>, options: &ConvOptions<2>) -> FloatTensor<X> {
    X::conv2d(x, weight, None, options.clone())
}

/// A transposed convolution whose output padding restores the rows a strided forward pass
/// dropped, so `dL/dx` has `x`'s exact size.
fn burn_backward_data<X: Backend>(weight: FloatTensor<X>, grad_out: FloatTensor<X>, x_shape: [usize; 4], options: &ConvOptions<2>) -> FloatTensor<X> {
    let [_, _, kh, kw] = weight.shape().dims();
    let [_, _, oh, ow] = grad_out.shape().dims();
    let padding_out = [
        padding_out(kh, options.stride[0], options.padding[0], options.dilation[0], x_shape[2], oh),
        padding_out(kw, options.stride[1], options.padding[1], options.dilation[1], x_shape[3], ow),
    ];
    let transpose = ConvTransposeOptions::new(options.stride, options.padding, padding_out, options.dilation, options.groups);
    X::conv_transpose2d(grad_out, weight, None, transpose)
}

fn burn_backward_filter<X: Backend>(x: FloatTensor<X>, weight: FloatTensor<X>, grad_out: FloatTensor<X>, options: &ConvOptions<2>) -> FloatTensor<X> {
    X::conv2d_weight_backward(x, weight, grad_out, options.clone())
}

impl ConvKernels for burn::backend::Flex {}

/// Input rows (or columns) past the last window of a strided convolution.
fn padding_out(kernel: usize, stride: usize, padding: usize, dilation: usize, size_in: usize, size_out: usize) -> usize {
    if stride <= 1 {
        return 0;
    }
    let covered = (size_out - 1) * stride + dilation * (kernel - 1) + 1;
    (size_in + 2 * padding).saturating_sub(covered)
}

fn autodiff_op<X: ConvKernels, C: CheckpointStrategy>(
    x: Tensor<Autodiff<X, C>, 4>,
    weight: Tensor<Autodiff<X, C>, 4>,
    options: ConvOptions<2>,
) -> Tensor<Autodiff<X, C>, 4> {
    let (x, weight) = (x.into_primitive().tensor(), weight.into_primitive().tensor());
    let weight_tracked = !weight.node.requirement.is_none();
    let x_shape: [usize; 4] = x.primitive.shape().dims();
    let op = ConvBackward { options: options.clone(), x_shape };
    let out = match op.prepare::<C>([x.node.clone(), weight.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let y = X::forward(x.primitive.clone(), weight.primitive.clone(), &options);
            // The input is kept only for the weight gradient: a frozen weight frees it.
            let kept_x = weight_tracked.then_some(x.primitive);
            prep.finish((kept_x, weight.primitive), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(X::forward(x.primitive, weight.primitive, &options)),
    };
    tensor(out)
}

/// Backward of a bias-free convolution.
#[derive(Debug)]
struct ConvBackward {
    options: ConvOptions<2>,
    x_shape: [usize; 4],
}

impl<X: ConvKernels> Backward<X, 2> for ConvBackward {
    /// The input (only when the weight is tracked) and the weight.
    type State = (Option<FloatTensor<X>>, FloatTensor<X>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad_out = grads.consume::<X>(&ops.node);
        let (x, weight) = ops.state;
        let [px, pw] = ops.parents;
        if let (Some(node), Some(x)) = (pw, x) {
            let dw = X::backward_filter(x, weight.clone(), grad_out.clone(), &self.options);
            grads.register::<X>(node.id, dw);
        }
        if let Some(node) = px {
            let dx = X::backward_data(weight, grad_out, self.x_shape, &self.options);
            grads.register::<X>(node.id, dx);
        }
    }
}

#[cfg(test)]
mod tests;
