//! The CUDA backend's convolutions through cuDNN ([`super::conv_op`]'s custom operations of
//! burn's fusion stream) and its large matmuls through cuBLAS.

use burn::backend::Cuda;
use burn::tensor::ops::{ConvOptions, FloatTensor};
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::fusion::FusionCubeRuntime;
use burn_cubecl::CubeBackend;
use burn_fusion::stream::Operation;
use burn_fusion::{FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer};

use super::fixed_matmul::Transpose;
use super::conv_op;
use super::{add_addend, burn_backward_data, burn_backward_filter, burn_forward, cublas, cudnn_enabled, record_cublas_call, record_fallback, ConvKernels};

/// The backend the fusion stream executes on.
type Inner = CubeBackend<CudaRuntime, f32, i32, u8>;
type Runtime = FusionCubeRuntime<CudaRuntime>;

impl ConvKernels for Cuda {
    fn forward(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: Option<FloatTensor<Self>>, addend: Option<FloatTensor<Self>>, options: &ConvOptions<2>) -> FloatTensor<Self> {
        if !cudnn_enabled() {
            return add_addend::<Self>(burn_forward::<Self>(x, weight, bias, options), addend);
        }
        conv_op::forward::<CudaRuntime>(x, weight, bias, addend, options)
    }

    fn backward_data(weight: FloatTensor<Self>, grad_out: FloatTensor<Self>, x_shape: [usize; 4], options: &ConvOptions<2>) -> FloatTensor<Self> {
        if !cudnn_enabled() {
            return burn_backward_data::<Self>(weight, grad_out, x_shape, options);
        }
        conv_op::backward_data::<CudaRuntime>(weight, grad_out, x_shape, options)
    }

    fn backward_filter(x: FloatTensor<Self>, weight: FloatTensor<Self>, grad_out: FloatTensor<Self>, options: &ConvOptions<2>) -> FloatTensor<Self> {
        if !cudnn_enabled() {
            return burn_backward_filter::<Self>(x, weight, grad_out, options);
        }
        conv_op::backward_filter::<CudaRuntime>(x, weight, grad_out, options)
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
