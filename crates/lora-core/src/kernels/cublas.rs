//! Batched matmuls in cuBLAS on burn's CUDA tensors (`cublasGemmStridedBatchedEx`, f32
//! accumulation; TF32 tensor cores for f32 inputs). Ordering and buffers: see [`super::device`].

use std::ffi::c_void;

use burn::tensor::{DType, Shape};
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use cudarc::cublas::{result, sys};
use cudarc::driver::sys::CUstream;

use super::device;

/// One device's cuBLAS handle, bound to our stream.
struct DeviceState {
    handle: sys::cublasHandle_t,
}

// SAFETY: the handle is only used while holding `STATE`'s lock, one thread at a time.
unsafe impl Send for DeviceState {}

static STATE: device::PerDevice<DeviceState> = device::PerDevice::new("cuBLAS");

/// `Ok` once cuBLAS loads and a handle can be created on device 0.
pub(super) fn status() -> Result<(), String> {
    with_handle(0, |_, _| Ok(()))
}

fn with_handle<T>(index: usize, f: impl FnOnce(sys::cublasHandle_t, CUstream) -> Result<T, String>) -> Result<T, String> {
    STATE.with(index, init_device, |state, stream| f(state.handle, stream))
}

fn init_device(stream: CUstream) -> Result<DeviceState, String> {
    // SAFETY: probing only tries to open the shared library.
    if !unsafe { sys::is_culib_present() } {
        return Err("libcublas not found; add the CUDA toolkit's lib64 to LD_LIBRARY_PATH".to_string());
    }
    let handle = result::create_handle().map_err(|e| format!("cublasCreate: {e:?}"))?;
    // SAFETY: the handle was just created; the stream lives as long as the process.
    unsafe { result::set_stream(handle, stream as sys::cudaStream_t) }.map_err(|e| format!("cublasSetStream: {e:?}"))?;
    Ok(DeviceState { handle })
}

/// How cuBLAS reads one operand: its last two dimensions stored row-major (`trans` false) or
/// column-major (`trans` true, a transposed view such as `swap_dims`), with leading dimension
/// `ld`, and `batch_stride` elements between consecutive matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Operand {
    trans: bool,
    ld: usize,
    batch_stride: usize,
}

/// `tensor`'s layout as an [`Operand`], or `None` when cuBLAS cannot read it as it is.
fn operand(shape: &[usize], strides: &[usize]) -> Option<Operand> {
    let d = shape.len();
    let (rows, cols) = (shape[d - 2], shape[d - 1]);
    let (rs, cs) = (strides[d - 2], strides[d - 1]);
    let (trans, ld) = if cs == 1 && (rs >= cols || rows == 1) {
        (false, rs.max(cols))
    } else if rs == 1 && (cs >= rows || cols == 1) {
        (true, cs.max(rows))
    } else {
        return None;
    };
    // The batch dimensions must flatten to one evenly strided dimension.
    let mut batch_stride = 0;
    let mut expected = None;
    for i in (0..d - 2).rev() {
        if shape[i] == 1 {
            continue;
        }
        match expected {
            None => batch_stride = strides[i],
            Some(e) if e != strides[i] => return None,
            Some(_) => {}
        }
        expected = Some(strides[i] * shape[i]);
    }
    if batch_stride == 0 && shape[..d - 2].iter().product::<usize>() > 1 {
        return None;
    }
    Some(Operand { trans, ld, batch_stride })
}

fn data_type(dtype: DType) -> Result<sys::cudaDataType, String> {
    match dtype {
        DType::F32 => Ok(sys::cudaDataType::CUDA_R_32F),
        DType::F16 => Ok(sys::cudaDataType::CUDA_R_16F),
        DType::BF16 => Ok(sys::cudaDataType::CUDA_R_16BF),
        other => Err(format!("dtype {other:?} is not routed to cuBLAS")),
    }
}

fn int(v: usize) -> Result<i32, String> {
    i32::try_from(v).map_err(|_| format!("matmul dimension {v} too large for cuBLAS"))
}

/// `a · b` for `a: [..., m, k]`, `b: [..., k, n]` with equal batch dimensions; the output is
/// contiguous `[..., m, n]`.
pub(super) fn run(a: CubeTensor<CudaRuntime>, b: CubeTensor<CudaRuntime>) -> Result<CubeTensor<CudaRuntime>, String> {
    let dtype = a.dtype;
    if b.dtype != dtype {
        return Err("mixed input dtypes".to_string());
    }
    let data = data_type(dtype)?;
    let (sa, sb) = (a.meta.shape().to_vec(), b.meta.shape().to_vec());
    let d = sa.len();
    if d < 2 || sb.len() != d || sa[..d - 2] != sb[..d - 2] || sa[d - 1] != sb[d - 2] {
        return Err(format!("matmul shapes {sa:?} and {sb:?} need broadcasting"));
    }
    let (m, k, n) = (sa[d - 2], sa[d - 1], sb[d - 1]);
    let batch: usize = sa[..d - 2].iter().product();
    let layout = |t: CubeTensor<CudaRuntime>| match operand(t.meta.shape(), t.meta.strides()) {
        Some(op) => (t, op),
        None => {
            let t = into_contiguous(t);
            let op = operand(t.meta.shape(), t.meta.strides()).expect("a contiguous tensor is a row-major operand");
            (t, op)
        }
    };
    let ((a, oa), (b, ob)) = (layout(a), layout(b));
    let client = a.client.clone();
    let device = a.device.clone();
    let out_handle = client.empty(batch * m * n * dtype.size());
    let mut out_shape = sa[..d - 2].to_vec();
    out_shape.extend([m, n]);
    let op = |trans: bool| if trans { sys::cublasOperation_t::CUBLAS_OP_T } else { sys::cublasOperation_t::CUBLAS_OP_N };
    let (mi, ni, ki) = (int(m)?, int(n)?, int(k)?);
    let (lda, ldb) = (int(oa.ld)?, int(ob.ld)?);
    // f32 inputs use TF32 tensor cores, as burn's own f32 matmul does on this hardware;
    // half inputs accumulate in f32.
    let compute = match dtype {
        DType::F32 => sys::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
        _ => sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
    };
    with_handle(device.index, |handle, stream| {
        let problem = device::problem_hash("cublas", &(oa, ob, m, n, k, batch, dtype));
        device::run_on_buffers(&client, device.index, stream, problem, &[&a.handle, &b.handle, &out_handle], |p| {
            let (alpha, beta) = (1.0f32, 0.0f32);
            // Row-major C = A·B is column-major Cᵀ = Bᵀ·Aᵀ: B is cuBLAS's first operand.
            // SAFETY: the pointers address live cubecl buffers laid out as `oa`/`ob` describe
            // and an output of batch·m·n elements; the handle is bound to `stream`.
            unsafe {
                result::gemm_strided_batched_ex(
                    handle,
                    op(ob.trans),
                    op(oa.trans),
                    ni,
                    mi,
                    ki,
                    &alpha as *const f32 as *const c_void,
                    p[1] as *const c_void,
                    data,
                    ldb,
                    ob.batch_stride as i64,
                    p[0] as *const c_void,
                    data,
                    lda,
                    oa.batch_stride as i64,
                    &beta as *const f32 as *const c_void,
                    p[2],
                    data,
                    ni,
                    (m * n) as i64,
                    int(batch)?,
                    compute,
                    sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| format!("cublasGemmStridedBatchedEx: {e:?}"))
        })
    })?;
    Ok(CubeTensor::new_contiguous(client, device, Shape::from(out_shape), out_handle, dtype))
}

#[cfg(test)]
mod tests {
    use super::{operand, Operand};

    #[test]
    fn operand_layouts() {
        // Contiguous [2, 3, 4].
        assert_eq!(operand(&[2, 3, 4], &[12, 4, 1]), Some(Operand { trans: false, ld: 4, batch_stride: 12 }));
        // Its last two dimensions swapped: [2, 4, 3] with strides [12, 1, 4].
        assert_eq!(operand(&[2, 4, 3], &[12, 1, 4]), Some(Operand { trans: true, ld: 4, batch_stride: 12 }));
        // Two batch dimensions that flatten, and ones that do not (a permuted view).
        assert_eq!(operand(&[2, 5, 3, 4], &[60, 12, 4, 1]).map(|o| o.batch_stride), Some(12));
        assert_eq!(operand(&[5, 2, 3, 4], &[12, 60, 4, 1]), None);
        // A 2-d matrix has no batch stride; a broadcast (stride-0) batch is not read as is.
        assert_eq!(operand(&[3, 4], &[4, 1]), Some(Operand { trans: false, ld: 4, batch_stride: 0 }));
        assert_eq!(operand(&[2, 3, 4], &[0, 4, 1]), None);
        // Neither row- nor column-major.
        assert_eq!(operand(&[3, 4], &[8, 2]), None);
    }
}
