//! GEGLU with its projection's bias, as one operation of burn's fusion stream each way.
//!
//! The feed-forward input of a transformer block is `h = x·W + b` (`[rows, 2n]`) followed by
//! `(h₁ + b₁) · gelu(h₂ + b₂)` over the halves. In burn's ops that is, per block and training
//! step, some thirty operations of the fusion stream: the halves' slices, the bias halves'
//! slices, reshapes and additions, the f32 casts, GELU's erf and scalings, and in the
//! backward pass the same again with the derivative's exponential and the concatenation of
//! the halves' gradients. Here it is one kernel each way, in f32:
//!
//! - [`geglu_forward`]: `out = (h₁ + b₁) · gelu(h₂ + b₂)`, `gelu(g) = g · Φ(g)` (exact, erf);
//! - [`geglu_backward`]: `dh₁ = dy · gelu(g)`, `dh₂ = dy · a · (Φ(g) + g · φ(g))`.
//!
//! Both read `h` as it comes from the projection's product (no bias added, no halves
//! copied) and write in its dtype.

use std::marker::PhantomData;

use burn::tensor::{DType, Shape};
use burn_cubecl::cubecl;
use burn_cubecl::fusion::FusionCubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};
use cubecl::prelude::*;

use super::contiguous;
use super::lora_linear::{arg, cubes, row_vector, THREADS};

type Inner<R, BT> = CubeBackend<R, f32, i32, BT>;
type Fused<R> = FusionTensor<FusionCubeRuntime<R>>;

/// `1/√2`: `Φ(g) = ½ (1 + erf(g/√2))`.
const FRAC_1_SQRT_2: f32 = std::f32::consts::FRAC_1_SQRT_2;

/// `1/√(2π)`: `φ(g) = e^{−g²/2} / √(2π)`.
const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// `h + b` in f32.
#[cube]
fn biased<T: Float, P: Float, N: Size>(h: Vector<T, N>, b: Vector<P, N>) -> Vector<f32, N> {
    Vector::<f32, N>::cast_from(h) + Vector::<f32, N>::cast_from(b)
}

/// `Φ(g) = ½ (1 + erf(g/√2))`.
#[cube]
fn normal_cdf<N: Size>(g: Vector<f32, N>) -> Vector<f32, N> {
    Vector::<f32, N>::new(0.5) * (Vector::<f32, N>::new(1.0) + (g * Vector::<f32, N>::new(FRAC_1_SQRT_2)).erf())
}

/// `out[r, j] = (h[r, j] + b[j]) · gelu(h[r, n + j] + b[n + j])` over `[rows, n]` outputs
/// (`n` = `half` counts vectors of `N`), in f32.
#[cube(launch)]
fn geglu_forward<T: Float, P: Float, N: Size>(h: &Array<Vector<T, N>>, bias: &Array<Vector<P, N>>, out: &mut Array<Vector<T, N>>, half: u32, #[define(T, P)] _dtypes: [StorageType; 2]) {
    let len = out.len();
    let n = half as usize;
    let stride = (CUBE_COUNT_X * CUBE_DIM_X) as usize;
    let mut i = (CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X) as usize;
    while i < len {
        let (row, col) = (i / n, i % n);
        let base = row * 2 * n;
        let a = biased::<T, P, N>(h[base + col], bias[col]);
        let g = biased::<T, P, N>(h[base + n + col], bias[n + col]);
        let cdf = normal_cdf::<N>(g);
        out[i] = Vector::<T, N>::cast_from(a * g * cdf);
        i += stride;
    }
}

/// `dh[r, j] = dy[r, j] · gelu(g)`, `dh[r, n + j] = dy[r, j] · a · (Φ(g) + g · φ(g))` with
/// `a = h[r, j] + b[j]`, `g = h[r, n + j] + b[n + j]` (`n` = `half` counts vectors of `N`),
/// in f32.
#[cube(launch)]
fn geglu_backward<T: Float, P: Float, N: Size>(
    h: &Array<Vector<T, N>>,
    bias: &Array<Vector<P, N>>,
    dy: &Array<Vector<T, N>>,
    dh: &mut Array<Vector<T, N>>,
    half: u32,
    #[define(T, P)] _dtypes: [StorageType; 2],
) {
    let len = dy.len();
    let n = half as usize;
    let stride = (CUBE_COUNT_X * CUBE_DIM_X) as usize;
    let mut i = (CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X) as usize;
    while i < len {
        let (row, col) = (i / n, i % n);
        let base = row * 2 * n;
        let a = biased::<T, P, N>(h[base + col], bias[col]);
        let g = biased::<T, P, N>(h[base + n + col], bias[n + col]);
        let d = Vector::<f32, N>::cast_from(dy[i]);
        let cdf = normal_cdf::<N>(g);
        let pdf = (g * g * Vector::<f32, N>::new(-0.5)).exp() * Vector::<f32, N>::new(FRAC_1_SQRT_2PI);
        dh[base + col] = Vector::<T, N>::cast_from(d * g * cdf);
        dh[base + n + col] = Vector::<T, N>::cast_from(d * a * (cdf + g * pdf));
        i += stride;
    }
}

/// Which pass an op runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pass {
    /// Inputs `(h, b)`, output `out`.
    Forward,
    /// Inputs `(h, b, dy)`, output `dh`.
    Backward,
}

/// Queues `(h₁ + b₁) · gelu(h₂ + b₂)` for `h` `[rows, 2n]` and `bias` `[2n]`: `[rows, n]`.
pub(super) fn register_forward<R: CubeRuntime, BT: BoolElement>(h: Fused<R>, bias: Fused<R>) -> Fused<R> {
    let client = h.client.clone();
    let streams = OperationStreams::with_inputs([&h, &bias]);
    let dims = h.shape.to_vec();
    let out = TensorIr::uninit(client.create_empty_handle(), Shape::new([dims[0], dims[1] / 2]), h.dtype);
    let desc = CustomOpIr::new("sd_lora_geglu", &[h.into_ir(), bias.into_ir()], &[out]);
    let op = GegluOp::<R, BT> { desc: desc.clone(), pass: Pass::Forward, _backend: PhantomData };
    client.register(streams, OperationIr::Custom(desc), op).output()
}

/// Queues the gradient `dh` (`[rows, 2n]`) of [`register_forward`]'s output for `dy`.
pub(super) fn register_backward<R: CubeRuntime, BT: BoolElement>(h: Fused<R>, bias: Fused<R>, dy: Fused<R>) -> Fused<R> {
    let client = h.client.clone();
    let streams = OperationStreams::with_inputs([&h, &bias, &dy]);
    let dh = TensorIr::uninit(client.create_empty_handle(), h.shape.clone(), h.dtype);
    let desc = CustomOpIr::new("sd_lora_geglu_backward", &[h.into_ir(), bias.into_ir(), dy.into_ir()], &[dh]);
    let op = GegluOp::<R, BT> { desc: desc.clone(), pass: Pass::Backward, _backend: PhantomData };
    client.register(streams, OperationIr::Custom(desc), op).output()
}

/// One queued pass.
struct GegluOp<R, BT> {
    desc: CustomOpIr,
    pass: Pass,
    _backend: PhantomData<fn() -> (R, BT)>,
}

impl<R, BT> std::fmt::Debug for GegluOp<R, BT> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GegluOp").field("pass", &self.pass).field("desc", &self.desc).finish()
    }
}

impl<R: CubeRuntime, BT: BoolElement> Operation<FusionCubeRuntime<R>> for GegluOp<R, BT> {
    fn execute(&self, handles: &mut HandleContainer<<FusionCubeRuntime<R> as FusionRuntime>::FusionHandle>) {
        let inputs: Vec<CubeTensor<R>> = self.desc.inputs.iter().map(|ir| contiguous(handles.get_float_tensor::<Inner<R, BT>>(ir))).collect();
        let out_ir = &self.desc.outputs[0];
        let (h, bias) = (&inputs[0], &inputs[1]);
        let [rows, width] = [h.meta.shape()[0], h.meta.shape()[1]];
        let n = width / 2;
        let out_shape = out_ir.shape.clone();
        let handle = h.client.empty(out_shape.num_elements() * h.dtype.size());
        let out = CubeTensor::new_contiguous(h.client.clone(), h.device.clone(), out_shape, handle, h.dtype);
        let dy = (self.pass == Pass::Backward).then(|| &inputs[2].handle);
        let launched = launch_kernel(&h.client, self.pass, &h.handle, &bias.handle, dy, &out.handle, [rows, n], [h.dtype.into(), bias.dtype.into()]);
        // The op was registered only for shapes `takes` accepts, so the launch cannot be
        // refused; a failure is cubecl's and surfaces as the runtime's error.
        launched.expect("the GEGLU kernel launches");
        super::record_fused_geglu();
        handles.register_float_tensor::<Inner<R, BT>>(&out_ir.id, out);
    }
}

/// Launches the pass's kernel on contiguous buffers: `h` (and, backward, the output `dh`)
/// `[rows, 2n]`, `bias` `[2n]`, the forward output (and `dy`) `[rows, n]`; `dtypes` are
/// `h`'s and the bias's.
#[allow(clippy::too_many_arguments)]
pub(super) fn launch_kernel<R: Runtime>(
    client: &ComputeClient<R>,
    pass: Pass,
    h: &cubecl::server::Handle,
    bias: &cubecl::server::Handle,
    dy: Option<&cubecl::server::Handle>,
    out: &cubecl::server::Handle,
    [rows, n]: [usize; 2],
    dtypes: [StorageType; 2],
) -> Result<(), String> {
    let (len, width) = (rows * n, 2 * n);
    if u32::try_from(rows * width).is_err() || n == 0 {
        return Err(format!("GEGLU: {rows} x {width} does not fit the kernel"));
    }
    let vector = row_vector(client, dtypes[0].size(), n);
    // SAFETY: the caller's contract on the buffers; the vector divides `n`, so every row and
    // both halves are whole vectors. Array arguments count elements.
    unsafe {
        match (pass, dy) {
            (Pass::Forward, _) => geglu_forward::launch::<R>(
                client,
                cubes(len / vector),
                CubeDim::new_1d(THREADS),
                vector,
                arg(h, rows * width),
                arg(bias, width),
                arg(out, len),
                (n / vector) as u32,
                dtypes,
            ),
            (Pass::Backward, Some(dy)) => geglu_backward::launch::<R>(
                client,
                cubes(len / vector),
                CubeDim::new_1d(THREADS),
                vector,
                arg(h, rows * width),
                arg(bias, width),
                arg(dy, len),
                arg(out, rows * width),
                (n / vector) as u32,
                dtypes,
            ),
            (Pass::Backward, None) => return Err("GEGLU backward: no output gradient".to_string()),
        }
    }
    Ok(())
}

/// Whether the op takes `h` `[rows, 2n]` and `bias` `[2n]` of these dtypes: a float `h`,
/// a float bias, an even width, and element counts the kernels index with `u32`.
pub(super) fn takes(h_dims: [usize; 2], bias_len: usize, h_dtype: DType, bias_dtype: DType) -> bool {
    let float = |d: DType| matches!(d, DType::F32 | DType::F16 | DType::BF16);
    let [rows, width] = h_dims;
    float(h_dtype) && float(bias_dtype) && width % 2 == 0 && width > 0 && bias_len == width && u32::try_from(rows * width).is_ok()
}

#[cfg(all(test, feature = "wgpu-test"))]
mod tests {
    //! The ops on burn's fusion backend over CubeCL's wgpu runtime (lavapipe without a GPU);
    //! the check is shared with the CUDA test (`kernels::tests::check_geglu`).

    use burn::tensor::FloatDType;

    #[test]
    fn wgpu_geglu_ops_match_burn_ops() {
        let _switch = crate::kernels::tests::SWITCH.lock().unwrap_or_else(|e| e.into_inner());
        crate::kernels::tests::check_geglu::<burn::backend::Wgpu>(&[(FloatDType::F32, 1e-5), (FloatDType::F16, 4e-3)]);
    }
}
