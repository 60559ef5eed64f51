//! The CUDA backend's convolutions through cuDNN, as custom operations of burn's fusion
//! stream: they run in order with the fused kernels around them, and fall back to burn's
//! own kernel (on the same tensors) when cuDNN is unavailable or rejects a problem.

use burn::backend::Cuda;
use burn::tensor::ops::{ConvOptions, FloatTensor};
use burn::tensor::Shape;
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::fusion::FusionCubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::CubeBackend;
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};

use super::fixed_matmul::Transpose;
use super::{burn_backward_data, burn_backward_filter, burn_forward, cublas, cudnn, cudnn_enabled, record_cublas_call, record_cudnn_call, record_fallback, ConvKernels};

/// The backend the fusion stream executes on.
type Inner = CubeBackend<CudaRuntime, f32, i32, u8>;
type Runtime = FusionCubeRuntime<CudaRuntime>;

/// Which of a conv layer's three convolutions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Kind {
    /// `y = conv(x, w)`; inputs `(x, w)`.
    Forward,
    /// `dx`; inputs `(w, dy)`.
    BackwardData,
    /// `dw`; inputs `(x, w, dy)`.
    BackwardFilter,
}

impl ConvKernels for Cuda {
    fn forward(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: Option<FloatTensor<Self>>, options: &ConvOptions<2>) -> FloatTensor<Self> {
        if !cudnn_enabled() {
            return burn_forward::<Self>(x, weight, bias, options);
        }
        let x_shape = dims(&x.shape);
        let [n, _, h, w] = x_shape;
        let [k, _, kh, kw] = dims(&weight.shape);
        let out = |size: usize, kernel: usize, axis: usize| {
            (size + 2 * options.padding[axis] - options.dilation[axis] * (kernel - 1) - 1) / options.stride[axis] + 1
        };
        let out_shape = [n, k, out(h, kh, 0), out(w, kw, 1)];
        let inputs = match bias {
            Some(bias) => vec![x, weight, bias],
            None => vec![x, weight],
        };
        register(Kind::Forward, inputs, x_shape, out_shape, options)
    }

    fn backward_data(weight: FloatTensor<Self>, grad_out: FloatTensor<Self>, x_shape: [usize; 4], options: &ConvOptions<2>) -> FloatTensor<Self> {
        if !cudnn_enabled() {
            return burn_backward_data::<Self>(weight, grad_out, x_shape, options);
        }
        register(Kind::BackwardData, vec![weight, grad_out], x_shape, x_shape, options)
    }

    fn backward_filter(x: FloatTensor<Self>, weight: FloatTensor<Self>, grad_out: FloatTensor<Self>, options: &ConvOptions<2>) -> FloatTensor<Self> {
        if !cudnn_enabled() {
            return burn_backward_filter::<Self>(x, weight, grad_out, options);
        }
        let (x_shape, w_shape) = (dims(&x.shape), dims(&weight.shape));
        register(Kind::BackwardFilter, vec![x, weight, grad_out], x_shape, w_shape, options)
    }
}

/// `y + bias` over `y`'s channels (burn-cubecl's addition, in place: `y` is cuDNN's fresh
/// output), in `y`'s dtype as burn's convolution adds its bias.
fn add_bias(y: CubeTensor<CudaRuntime>, bias: CubeTensor<CudaRuntime>) -> CubeTensor<CudaRuntime> {
    use burn::tensor::ops::FloatTensorOps;
    let channels = bias.meta.shape().num_elements();
    let bias = Inner::float_reshape(bias, Shape::new([1, channels, 1, 1]));
    Inner::float_add(y, bias)
}

fn dims(shape: &Shape) -> [usize; 4] {
    shape.dims::<4>()
}

/// Queues one convolution on the fusion stream and returns its (lazy) output.
fn register(kind: Kind, inputs: Vec<FusionTensor<Runtime>>, x_shape: [usize; 4], out_shape: [usize; 4], options: &ConvOptions<2>) -> FusionTensor<Runtime> {
    let client = inputs[0].client.clone();
    let dtype = inputs[0].dtype;
    let streams = OperationStreams::with_inputs(inputs.iter());
    let out = TensorIr::uninit(client.create_empty_handle(), Shape::from(out_shape.to_vec()), dtype);
    let inputs: Vec<TensorIr> = inputs.into_iter().map(FusionTensor::into_ir).collect();
    let desc = CustomOpIr::new("sd_lora_cudnn_conv2d", &inputs, &[out]);
    let op = CudnnConv {
        desc: desc.clone(),
        kind,
        x_shape,
        options: options.clone(),
    };
    client.register(streams, OperationIr::Custom(desc), op).output()
}

/// One queued cuDNN convolution.
#[derive(Debug)]
struct CudnnConv {
    desc: CustomOpIr,
    kind: Kind,
    x_shape: [usize; 4],
    options: ConvOptions<2>,
}

impl Operation<Runtime> for CudnnConv {
    fn execute(&self, handles: &mut HandleContainer<<Runtime as FusionRuntime>::FusionHandle>) {
        let inputs: Vec<CubeTensor<CudaRuntime>> = self.desc.inputs.iter().map(|ir| handles.get_float_tensor::<Inner>(ir)).collect();
        let out = &self.desc.outputs[0];
        let out_shape = dims(&out.shape);
        // A forward pass's third input is its bias, which cuDNN's convolution does not take.
        let convolved = if self.kind == Kind::Forward { &inputs[..2] } else { &inputs[..] };
        let y = match cudnn::run(self.kind, convolved, self.x_shape, out_shape, &self.options) {
            Ok(y) => {
                record_cudnn_call();
                match inputs.get(2) {
                    Some(bias) if self.kind == Kind::Forward => add_bias(y, bias.clone()),
                    _ => y,
                }
            }
            Err(reason) => {
                record_fallback(reason);
                self.burn_kernel(inputs)
            }
        };
        handles.register_float_tensor::<Inner>(&out.id, y);
    }
}

impl CudnnConv {
    /// The same convolution in burn's kernels.
    fn burn_kernel(&self, inputs: Vec<CubeTensor<CudaRuntime>>) -> CubeTensor<CudaRuntime> {
        let mut inputs = inputs.into_iter();
        let mut next = || inputs.next().expect("input count fixed by `register`");
        match self.kind {
            Kind::Forward => {
                let (x, w) = (next(), next());
                burn_forward::<Inner>(x, w, inputs.next(), &self.options)
            }
            Kind::BackwardData => {
                let (w, dy) = (next(), next());
                burn_backward_data::<Inner>(w, dy, self.x_shape, &self.options)
            }
            Kind::BackwardFilter => {
                let (x, w, dy) = (next(), next(), next());
                burn_backward_filter::<Inner>(x, w, dy, &self.options)
            }
        }
    }
}

/// Queues `op(a) · op(b)` (equal batch dimensions; `op` transposes where `transpose` says)
/// on the fusion stream for cuBLAS.
pub(super) fn matmul(a: FusionTensor<Runtime>, b: FusionTensor<Runtime>, transpose: Transpose) -> FusionTensor<Runtime> {
    const NAMES: [&str; 4] = ["sd_lora_cublas_matmul", "sd_lora_cublas_matmul_tn", "sd_lora_cublas_matmul_nt", "sd_lora_cublas_matmul_tt"];
    super::fixed_matmul::register_product(&NAMES, a, b, transpose, |desc| CublasMatmul { desc, transpose })
}

/// One queued cuBLAS matmul.
#[derive(Debug)]
struct CublasMatmul {
    desc: CustomOpIr,
    transpose: Transpose,
}

impl Operation<Runtime> for CublasMatmul {
    fn execute(&self, handles: &mut HandleContainer<<Runtime as FusionRuntime>::FusionHandle>) {
        let ([a, b], [out]) = self.desc.as_fixed();
        let a = Transpose::apply::<CudaRuntime, u8>(self.transpose.a, handles.get_float_tensor::<Inner>(a));
        let b = Transpose::apply::<CudaRuntime, u8>(self.transpose.b, handles.get_float_tensor::<Inner>(b));
        let y = match cublas::run(a.clone(), b.clone()) {
            Ok(y) => {
                record_cublas_call();
                y
            }
            Err(reason) => {
                record_fallback(reason);
                <Inner as burn::tensor::ops::FloatTensorOps<Inner>>::float_matmul(a, b)
            }
        };
        handles.register_float_tensor::<Inner>(&out.id, y);
    }
}
