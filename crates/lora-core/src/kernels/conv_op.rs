//! A convolution (forward pass with its frozen bias and an optional addend, or one of the
//! two backward convolutions) as one custom operation of burn's fusion stream, on CubeCL's
//! runtimes.
//!
//! On CUDA the operation runs cuDNN (see [`super::set_cudnn`]) and falls back to burn's own
//! kernels on the same tensors when cuDNN is unavailable or rejects a problem. On other
//! runtimes (wgpu, for the `wgpu` feature) it runs burn's kernels inside the one
//! operation, so that the fusion stream sees the graph CUDA's does: its operation count
//! can be studied without a GPU, and the op's bookkeeping is tested on lavapipe.

use std::marker::PhantomData;

use burn::tensor::ops::{ConvOptions, FloatTensor, FloatTensorOps};
use burn::tensor::Shape;
use burn_cubecl::fusion::FusionCubeRuntime;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{Fusion, FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};

use super::{add_addend, burn_backward_data, burn_backward_filter, burn_forward, cudnn_enabled, record_fallback, ConvKernels};

/// The backend the fusion stream executes on.
type Inner<R> = CubeBackend<R, f32, i32, u8>;

/// Which of a conv layer's three convolutions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Kind {
    /// `y = conv(x, w)`; inputs `(x, w)`, then the [`Extras`].
    Forward,
    /// `dx`; inputs `(w, dy)`.
    BackwardData,
    /// `dw`; inputs `(x, w, dy)`.
    BackwardFilter,
}

/// Which optional inputs follow a forward convolution's `(x, w)`, in this order.
#[derive(Debug, Clone, Copy)]
pub(super) struct Extras {
    /// A frozen bias `[K]`.
    pub bias: bool,
    /// A tensor added to the output: `[N, K, OH, OW]` or `[N, K, 1, 1]`.
    pub addend: bool,
}

impl Extras {
    /// Neither (the backward passes).
    pub const NONE: Self = Self { bias: false, addend: false };
}

fn dims(shape: &Shape) -> [usize; 4] {
    shape.dims::<4>()
}

/// burn's fusion backends over CubeCL (CUDA; wgpu for the `wgpu` feature): with
/// [`super::set_cudnn`] on, the three convolutions are this module's operation (cuDNN
/// inside on CUDA, burn's kernels elsewhere, so wgpu's fusion stream sees CUDA's graph);
/// off, burn's ops.
impl<R: CubeRuntime, BT: BoolElement> ConvKernels for Fusion<CubeBackend<R, f32, i32, BT>> {
    fn forward(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: Option<FloatTensor<Self>>, addend: Option<FloatTensor<Self>>, options: &ConvOptions<2>) -> FloatTensor<Self> {
        if !cudnn_enabled() {
            return add_addend::<Self>(burn_forward::<Self>(x, weight, bias, options), addend);
        }
        forward::<R>(x, weight, bias, addend, options)
    }

    fn backward_data(weight: FloatTensor<Self>, grad_out: FloatTensor<Self>, x_shape: [usize; 4], options: &ConvOptions<2>) -> FloatTensor<Self> {
        if !cudnn_enabled() {
            return burn_backward_data::<Self>(weight, grad_out, x_shape, options);
        }
        backward_data::<R>(weight, grad_out, x_shape, options)
    }

    fn backward_filter(x: FloatTensor<Self>, weight: FloatTensor<Self>, grad_out: FloatTensor<Self>, options: &ConvOptions<2>) -> FloatTensor<Self> {
        if !cudnn_enabled() {
            return burn_backward_filter::<Self>(x, weight, grad_out, options);
        }
        backward_filter::<R>(x, weight, grad_out, options)
    }
}

/// Queues `conv(x, w) + bias + addend` (see [`super::conv2d_add`]) and returns its (lazy)
/// output.
fn forward<R: CubeRuntime>(
    x: FusionTensor<FusionCubeRuntime<R>>,
    weight: FusionTensor<FusionCubeRuntime<R>>,
    bias: Option<FusionTensor<FusionCubeRuntime<R>>>,
    addend: Option<FusionTensor<FusionCubeRuntime<R>>>,
    options: &ConvOptions<2>,
) -> FusionTensor<FusionCubeRuntime<R>> {
    let x_shape = dims(&x.shape);
    let [n, _, h, w] = x_shape;
    let [k, _, kh, kw] = dims(&weight.shape);
    let out = |size: usize, kernel: usize, axis: usize| (size + 2 * options.padding[axis] - options.dilation[axis] * (kernel - 1) - 1) / options.stride[axis] + 1;
    let out_shape = [n, k, out(h, kh, 0), out(w, kw, 1)];
    let extras = Extras { bias: bias.is_some(), addend: addend.is_some() };
    let inputs = [x, weight].into_iter().chain(bias).chain(addend).collect();
    register::<R>(Kind::Forward, inputs, extras, x_shape, out_shape, options)
}

/// Queues `dL/dx` from the weight and `dL/dy`.
fn backward_data<R: CubeRuntime>(
    weight: FusionTensor<FusionCubeRuntime<R>>,
    grad_out: FusionTensor<FusionCubeRuntime<R>>,
    x_shape: [usize; 4],
    options: &ConvOptions<2>,
) -> FusionTensor<FusionCubeRuntime<R>> {
    register::<R>(Kind::BackwardData, vec![weight, grad_out], Extras::NONE, x_shape, x_shape, options)
}

/// Queues `dL/dW` from the input and `dL/dy` (the weight gives the shape).
fn backward_filter<R: CubeRuntime>(
    x: FusionTensor<FusionCubeRuntime<R>>,
    weight: FusionTensor<FusionCubeRuntime<R>>,
    grad_out: FusionTensor<FusionCubeRuntime<R>>,
    options: &ConvOptions<2>,
) -> FusionTensor<FusionCubeRuntime<R>> {
    let (x_shape, w_shape) = (dims(&x.shape), dims(&weight.shape));
    register::<R>(Kind::BackwardFilter, vec![x, weight, grad_out], Extras::NONE, x_shape, w_shape, options)
}

/// Queues one convolution on the fusion stream and returns its (lazy) output.
fn register<R: CubeRuntime>(
    kind: Kind,
    inputs: Vec<FusionTensor<FusionCubeRuntime<R>>>,
    extras: Extras,
    x_shape: [usize; 4],
    out_shape: [usize; 4],
    options: &ConvOptions<2>,
) -> FusionTensor<FusionCubeRuntime<R>> {
    let client = inputs[0].client.clone();
    let dtype = inputs[0].dtype;
    let streams = OperationStreams::with_inputs(inputs.iter());
    let out = TensorIr::uninit(client.create_empty_handle(), Shape::from(out_shape.to_vec()), dtype);
    let inputs: Vec<TensorIr> = inputs.into_iter().map(FusionTensor::into_ir).collect();
    let desc = CustomOpIr::new("sd_lora_conv2d", &inputs, &[out]);
    let op = ConvOp::<R> {
        desc: desc.clone(),
        kind,
        extras,
        // Read now: burn-fusion may execute the op after the caller changed the switch.
        blend: extras.addend && super::cudnn_blend_enabled(),
        x_shape,
        options: options.clone(),
        runtime: PhantomData,
    };
    client.register(streams, OperationIr::Custom(desc), op).output()
}

/// One queued convolution.
#[derive(Debug)]
struct ConvOp<R> {
    desc: CustomOpIr,
    kind: Kind,
    extras: Extras,
    /// Whether cuDNN writes the convolution onto the addend ([`super::set_cudnn_blend`]
    /// when the op was queued).
    blend: bool,
    x_shape: [usize; 4],
    options: ConvOptions<2>,
    runtime: PhantomData<R>,
}

impl<R: CubeRuntime> Operation<FusionCubeRuntime<R>> for ConvOp<R> {
    fn execute(&self, handles: &mut HandleContainer<<FusionCubeRuntime<R> as FusionRuntime>::FusionHandle>) {
        let inputs: Vec<CubeTensor<R>> = self.desc.inputs.iter().map(|ir| handles.get_float_tensor::<Inner<R>>(ir)).collect();
        let out = &self.desc.outputs[0];
        let out_shape = dims(&out.shape);
        let y = match self.kind {
            Kind::Forward => self.forward(inputs, out_shape),
            _ => match vendor::<R>(self.kind, &inputs, self.x_shape, out_shape, &self.options, None) {
                Some(Ok(y)) => y,
                failed => {
                    if let Some(Err(reason)) = failed {
                        record_fallback(reason);
                    }
                    self.burn_backward(inputs)
                }
            },
        };
        handles.register_float_tensor::<Inner<R>>(&out.id, y);
    }
}

impl<R: CubeRuntime> ConvOp<R> {
    /// The forward pass: `conv(x, w)` plus the bias and the addend. In cuDNN with its
    /// output blend on ([`super::set_cudnn_blend`]), the convolution is written onto the
    /// addend plus the bias; otherwise one kernel adds them after the convolution.
    fn forward(&self, inputs: Vec<CubeTensor<R>>, out_shape: [usize; 4]) -> CubeTensor<R> {
        let (convolved, bias, addend) = self.split(inputs);
        let on_cuda = is_cuda::<R>();
        let (addend, blend) = match addend {
            Some(a) if on_cuda && self.blend => (None, Some(a)),
            a => (a, None),
        };
        // The addend with the bias in it (the addend's buffer itself where nothing else
        // holds it: then it must not be read again as the addend).
        let prior = blend.map(|a| prior(a, bias.clone(), out_shape));
        let y = match vendor::<R>(Kind::Forward, &convolved, self.x_shape, out_shape, &self.options, prior.as_ref()) {
            Some(Ok(y)) => match (&prior, bias) {
                (None, Some(bias)) => add_bias(y, bias),
                _ => y,
            },
            failed => {
                if let Some(Err(reason)) = failed {
                    record_fallback(reason);
                }
                let [x, w] = convolved;
                match prior {
                    Some(prior) => add_addend::<Inner<R>>(burn_forward::<Inner<R>>(x, w, None, &self.options), Some(prior)),
                    None => burn_forward::<Inner<R>>(x, w, bias, &self.options),
                }
            }
        };
        // Without the blend (no addend left where there was one).
        add_addend::<Inner<R>>(y, addend)
    }

    /// A forward pass's inputs: `(x, w)`, the bias, the addend.
    #[allow(clippy::type_complexity)]
    fn split(&self, inputs: Vec<CubeTensor<R>>) -> ([CubeTensor<R>; 2], Option<CubeTensor<R>>, Option<CubeTensor<R>>) {
        let mut inputs = inputs.into_iter();
        let mut next = || inputs.next().expect("input count fixed by `register`");
        let convolved = [next(), next()];
        let bias = self.extras.bias.then(&mut next);
        let addend = self.extras.addend.then(&mut next);
        (convolved, bias, addend)
    }

    /// A backward convolution in burn's kernels (`BackwardData`: inputs `(w, dy)`;
    /// `BackwardFilter`: `(x, w, dy)`).
    fn burn_backward(&self, inputs: Vec<CubeTensor<R>>) -> CubeTensor<R> {
        let mut inputs = inputs.into_iter();
        let mut next = || inputs.next().expect("input count fixed by `register`");
        if self.kind == Kind::BackwardData {
            let (w, dy) = (next(), next());
            burn_backward_data::<Inner<R>>(w, dy, self.x_shape, &self.options)
        } else {
            let (x, w, dy) = (next(), next(), next());
            burn_backward_filter::<Inner<R>>(x, w, dy, &self.options)
        }
    }
}

/// Whether `R` is CubeCL's CUDA runtime (with the `cuda` feature).
#[cfg_attr(not(feature = "cuda"), allow(clippy::extra_unused_type_parameters))]
fn is_cuda<R: CubeRuntime>() -> bool {
    #[cfg(feature = "cuda")]
    {
        std::any::TypeId::of::<R>() == std::any::TypeId::of::<burn_cubecl::cubecl::cuda::CudaRuntime>()
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

/// The convolution in cuDNN when `R` is CUDA: `None` on other runtimes, else cuDNN's
/// output or why it failed.
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
fn vendor<R: CubeRuntime>(
    kind: Kind,
    inputs: &[CubeTensor<R>],
    x_shape: [usize; 4],
    out_shape: [usize; 4],
    options: &ConvOptions<2>,
    prior: Option<&CubeTensor<R>>,
) -> Option<Result<CubeTensor<R>, String>> {
    #[cfg(feature = "cuda")]
    {
        use burn_cubecl::cubecl::cuda::CudaRuntime;
        use std::any::Any;
        let as_cuda = |t: &CubeTensor<R>| (t as &dyn Any).downcast_ref::<CubeTensor<CudaRuntime>>().cloned();
        let inputs: Vec<CubeTensor<CudaRuntime>> = inputs.iter().map(as_cuda).collect::<Option<_>>()?;
        // The prior is passed by reference: cloning it would make its buffer look shared.
        let prior = match prior {
            Some(p) => Some((p as &dyn Any).downcast_ref::<CubeTensor<CudaRuntime>>()?),
            None => None,
        };
        let y = super::cudnn::run(kind, &inputs, x_shape, out_shape, options, prior);
        if y.is_ok() {
            super::record_cudnn_call(prior.is_some());
        }
        Some(y.map(|y| *(Box::new(y) as Box<dyn Any>).downcast::<CubeTensor<R>>().expect("R is CUDA")))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (inputs, prior);
        None
    }
}

/// `y + bias` over `y`'s channels (burn-cubecl's addition, in place where `y` is a fresh
/// output), in `y`'s dtype as burn's convolution adds its bias.
fn add_bias<R: CubeRuntime>(y: CubeTensor<R>, bias: CubeTensor<R>) -> CubeTensor<R> {
    let channels = bias.meta.shape().num_elements();
    let bias = Inner::<R>::float_reshape(bias, Shape::new([1, channels, 1, 1]));
    Inner::<R>::float_add(y, bias)
}

/// The output cuDNN adds the convolution to: `addend` (`[N, K, OH, OW]`, `[N, K, 1, 1]` or
/// `[N, K]`)
/// plus the bias over the channels, as a contiguous tensor of `out_shape` that nothing
/// else holds. One element-wise kernel where there is a bias or the addend is broadcast,
/// shared, or strided (the bias kernel the plain forward pass runs after the convolution);
/// none where the addend is an exclusive contiguous tensor of the output's shape without a
/// bias (a shortcut convolution's fresh output, say).
pub(super) fn prior<R: CubeRuntime>(addend: CubeTensor<R>, bias: Option<CubeTensor<R>>, out_shape: [usize; 4]) -> CubeTensor<R> {
    // A `[N, K]` addend is viewed as `[N, K, 1, 1]` (metadata only).
    let addend = if addend.meta.shape().num_dims() == 2 {
        let [n, k] = addend.meta.shape().dims::<2>();
        Inner::<R>::float_reshape(addend, Shape::new([n, k, 1, 1]))
    } else {
        addend
    };
    let full = if dims(addend.meta.shape()) == out_shape { addend } else { Inner::<R>::float_expand(addend, Shape::from(out_shape.to_vec())) };
    // An expanded (overlapping) or shared left operand makes burn-cubecl's addition write a
    // fresh contiguous output; an exclusive one it updates in place.
    let summed = match bias {
        Some(bias) => add_bias(full, bias),
        None => full,
    };
    if summed.is_contiguous() && summed.handle.can_mut() {
        summed
    } else if summed.is_contiguous() {
        summed.copy()
    } else {
        into_contiguous(summed)
    }
}

#[cfg(all(test, feature = "wgpu-test"))]
mod tests {
    //! The op on burn's fusion backend over CubeCL's wgpu runtime (lavapipe without a GPU):
    //! burn's kernels inside it, against burn's ops outside it; and the cuDNN blend's prior.

    use burn::tensor::ops::FloatTensorOps;
    use burn::tensor::{Distribution, Tensor, TensorData};
    use burn_cubecl::cubecl::wgpu::{WgpuDevice, WgpuRuntime};

    use super::*;
    use crate::kernels::tests::SWITCH;

    type W = burn::backend::Wgpu;
    type Plain = Inner<WgpuRuntime>;

    /// The op's forward pass (with a residual or a per-channel addend, a bias or none) and
    /// both backward convolutions give burn's values.
    #[test]
    fn wgpu_conv_op_matches_burn_ops() {
        let _switch = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
        crate::kernels::tests::check_conv_op::<W>();
    }

    fn tensor(values: Vec<f32>, shape: [usize; 4]) -> CubeTensor<WgpuRuntime> {
        Plain::float_from_data(TensorData::new(values, shape), &WgpuDevice::default())
    }

    fn values(t: CubeTensor<WgpuRuntime>) -> Vec<f32> {
        let data = burn_cubecl::cubecl::future::block_on(Plain::float_into_data(t)).expect("read back");
        data.to_vec::<f32>().expect("f32")
    }

    /// The prior is the addend plus the bias, contiguous and exclusive, for every kind of
    /// addend; a shared addend keeps its values.
    #[test]
    fn wgpu_prior_is_addend_plus_bias_in_a_buffer_of_its_own() {
        let out = [2, 3, 2, 2];
        let n: usize = out.iter().product();
        let full: Vec<f32> = (0..n).map(|i| i as f32).collect();
        let bias = vec![100.0, 200.0, 300.0];
        let expected = |addend: &dyn Fn(usize, usize, usize) -> f32, with_bias: bool| -> Vec<f32> {
            let mut e = Vec::with_capacity(n);
            for b in 0..2 {
                for (c, bias_c) in bias.iter().enumerate() {
                    for p in 0..4 {
                        e.push(addend(b, c, p) + if with_bias { *bias_c } else { 0.0 });
                    }
                }
            }
            e
        };
        let full_at = |b: usize, c: usize, p: usize| (b * 12 + c * 4 + p) as f32;
        let bias_t = || Some(Plain::float_from_data(TensorData::new(bias.clone(), [3]), &WgpuDevice::default()));
        let check = |t: CubeTensor<WgpuRuntime>, want: Vec<f32>, what: &str| {
            assert!(t.is_contiguous() && t.handle.can_mut(), "{what}: not an exclusive contiguous buffer");
            assert_eq!(t.meta.shape().dims::<4>(), out, "{what}: shape");
            assert_eq!(values(t), want, "{what}: values");
        };
        // Exclusive, full shape, no bias: the addend's own buffer.
        check(prior(tensor(full.clone(), out), None, out), expected(&full_at, false), "exclusive");
        // Exclusive with a bias (in place).
        check(prior(tensor(full.clone(), out), bias_t(), out), expected(&full_at, true), "exclusive + bias");
        // Shared: a copy, and the caller's addend unchanged.
        let shared = tensor(full.clone(), out);
        check(prior(shared.clone(), bias_t(), out), expected(&full_at, true), "shared + bias");
        check(prior(shared.clone(), None, out), expected(&full_at, false), "shared");
        assert_eq!(values(shared), full, "the shared addend changed");
        // Per sample and channel, broadcast over the plane.
        let per_channel: Vec<f32> = (0..6).map(|i| 10.0 * i as f32).collect();
        let channel_at = |b: usize, c: usize, _p: usize| 10.0 * (b * 3 + c) as f32;
        check(prior(tensor(per_channel.clone(), [2, 3, 1, 1]), bias_t(), out), expected(&channel_at, true), "per channel + bias");
        check(prior(tensor(per_channel.clone(), [2, 3, 1, 1]), None, out), expected(&channel_at, false), "per channel");
        let rows = Plain::float_from_data(TensorData::new(per_channel, [2, 3]), &WgpuDevice::default());
        check(prior(rows, bias_t(), out), expected(&channel_at, true), "[N, K] + bias");
        // Strided: a [2, 2, 2, 3] tensor permuted to [2, 3, 2, 2].
        let hwc = tensor(full.clone(), [2, 2, 2, 3]);
        let permuted = Plain::float_permute(hwc, &[0, 3, 1, 2]);
        let strided_at = |b: usize, c: usize, p: usize| (b * 12 + p * 3 + c) as f32;
        check(prior(permuted, bias_t(), out), expected(&strided_at, true), "permuted + bias");
        let hwc = tensor(full, [2, 2, 2, 3]);
        check(prior(Plain::float_permute(hwc, &[0, 3, 1, 2]), None, out), expected(&strided_at, false), "permuted");
    }

    /// [`forward`] itself (the check above goes through the switch): a per-channel addend.
    #[test]
    fn wgpu_forward_op_adds_a_per_channel_addend() {
        let device = Default::default();
        let x = Tensor::<W, 4>::random([1, 2, 4, 4], Distribution::Default, &device);
        let w = Tensor::<W, 4>::random([3, 2, 3, 3], Distribution::Default, &device);
        let a = Tensor::<W, 4>::random([1, 3, 1, 1], Distribution::Default, &device);
        let options = ConvOptions::new([1, 1], [1, 1], [1, 1], 1);
        let p = |t: Tensor<W, 4>| t.into_primitive().tensor();
        let y = forward::<WgpuRuntime>(p(x.clone()), p(w.clone()), None, Some(p(a.clone())), &options);
        let y = Tensor::<W, 4>::from_primitive(burn::tensor::TensorPrimitive::Float(y));
        let reference = burn::tensor::module::conv2d(x, w, None, options) + a;
        let err: f32 = (y - reference).abs().max().into_scalar();
        assert!(err < 1e-5, "{err}");
    }
}
