//! The CUDA backend's large matmuls through cuBLAS, as custom operations of burn's fusion
//! stream (its convolutions through cuDNN are [`super::conv_op`]'s).

use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::fusion::FusionCubeRuntime;
use burn_cubecl::CubeBackend;
use burn_fusion::stream::Operation;
use burn_fusion::{FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer};

use super::fixed_matmul::Transpose;
use super::{cublas, record_cublas_call, record_fallback};

/// The backend the fusion stream executes on.
type Inner = CubeBackend<CudaRuntime, f32, i32, u8>;
type Runtime = FusionCubeRuntime<CudaRuntime>;

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
