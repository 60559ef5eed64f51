//! A fused, scaled row softmax as one CubeCL kernel: `softmax(scale · row)` for each row of
//! a contiguous `[rows, n]` buffer, computed in f32 whatever the input and output dtypes.
//!
//! Attention's score blocks are the largest tensors of a UNet step (SD1.5 at 512 px, batch
//! 8: about a billion scores per 4096-token layer). burn's `softmax` is composed of a max
//! reduction, an exp/sum reduction and a division, each a pass over the scores (plus the
//! casts and the scaling around it); this kernel reads a row, keeps a running maximum and
//! sum per thread (the "online softmax"), combines them across the cube in shared memory,
//! then reads the row again (from cache; a 4096-key f32 row is 16 KiB) and writes the
//! probabilities once, in the dtype the next matmul wants.
//!
//! It also writes each row's log-sum-exp `m + ln Σ exp(scale · x − m)` (f32), which lets a
//! backward pass recompute the probabilities elementwise, `exp(scale · x − lse)`, without
//! another reduction (sd-model's blockwise attention).
//!
//! One cube (256 threads) per row; the grid is two-dimensional so that more than 65535 rows
//! fit every runtime's limits.

use std::marker::PhantomData;

use burn::tensor::ops::FloatTensorOps;
use burn::tensor::{DType, Shape};
use burn_cubecl::cubecl;
use burn_cubecl::fusion::FusionCubeRuntime;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};
use cubecl::prelude::*;

/// Threads per cube (one row each); a power of two for the tree reduction.
const THREADS: u32 = 256;

/// Largest grid extent along one axis on every runtime (wgpu's limit).
const MAX_GRID: usize = 65_535;

/// A start value below any score (WGSL has no infinity literal).
const LOWEST: f32 = -3.0e38;

#[cube(launch)]
fn scaled_softmax_rows<I: Float, O: Float>(
    input: &Array<I>,
    output: &mut Array<O>,
    lse: &mut Array<f32>,
    rows: u32,
    n: u32,
    scale: f32,
    #[define(I, O)] _dtypes: [StorageType; 2],
) {
    let row = (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize;
    if row >= rows as usize {
        terminate!();
    }
    let n = n as usize;
    let base = row * n;
    let tid = UNIT_POS_X as usize;
    let threads = CUBE_DIM_X as usize;

    // Each thread's running maximum and sum of exp(x - maximum) over its strided elements.
    let mut max = f32::new(LOWEST);
    let mut sum = 0.0f32;
    let mut i = tid;
    while i < n {
        let x = f32::cast_from(input[base + i]) * scale;
        let mut next = max;
        if x > max {
            next = x;
        }
        sum = sum * (max - next).exp() + (x - next).exp();
        max = next;
        i += threads;
    }

    // Combine the threads' (maximum, sum) pairs: a tree over shared memory.
    let mut maxes = SharedMemory::<f32>::new(THREADS as usize);
    let mut sums = SharedMemory::<f32>::new(THREADS as usize);
    maxes[tid] = max;
    sums[tid] = sum;
    sync_cube();
    let mut stride = threads / 2;
    while stride > 0 {
        if tid < stride {
            let m1 = maxes[tid];
            let m2 = maxes[tid + stride];
            let mut m = m1;
            if m2 > m1 {
                m = m2;
            }
            sums[tid] = sums[tid] * (m1 - m).exp() + sums[tid + stride] * (m2 - m).exp();
            maxes[tid] = m;
        }
        sync_cube();
        stride /= 2;
    }
    let row_max = maxes[0];
    let inv_sum = 1.0f32 / sums[0];
    if tid == 0 {
        lse[row] = row_max + sums[0].ln();
    }

    let mut i = tid;
    while i < n {
        let x = f32::cast_from(input[base + i]) * scale;
        output[base + i] = O::cast_from((x - row_max).exp() * inv_sum);
        i += threads;
    }
}

/// Queues the kernel: `output[r, :] = softmax(scale · input[r, :])` and
/// `lse[r] = logsumexp(scale · input[r, :])` for `rows` rows of `n` elements; `input` and
/// `output` are contiguous buffers of `rows · n` elements of `input_dtype` and
/// `output_dtype`, `lse` holds `rows` f32.
#[allow(clippy::too_many_arguments)]
pub(super) fn launch<R: Runtime>(
    client: &ComputeClient<R>,
    input: &cubecl::server::Handle,
    output: &cubecl::server::Handle,
    lse: &cubecl::server::Handle,
    rows: usize,
    n: usize,
    scale: f32,
    dtypes: [StorageType; 2],
) -> Result<(), String> {
    if rows == 0 || n == 0 {
        return Ok(());
    }
    let too_large = |what: &str| format!("fused softmax: {what} over u32");
    let rows_u32 = u32::try_from(rows).map_err(|_| too_large("rows"))?;
    let n_u32 = u32::try_from(n).map_err(|_| too_large("row length"))?;
    let len = rows.checked_mul(n).filter(|&l| u32::try_from(l).is_ok()).ok_or_else(|| too_large("element count"))?;
    let (x, y) = (rows.min(MAX_GRID), rows.div_ceil(MAX_GRID));
    let count = CubeCount::Static(x as u32, y as u32, 1);
    // SAFETY: both buffers hold `len` elements of their dtypes (the caller's contract).
    let (input, output) = unsafe { (ArrayArg::from_raw_parts(input.clone(), len), ArrayArg::from_raw_parts(output.clone(), len)) };
    // SAFETY: `lse` holds `rows` f32 (the caller's contract).
    let lse = unsafe { ArrayArg::from_raw_parts(lse.clone(), rows) };
    scaled_softmax_rows::launch::<R>(client, count, CubeDim::new_1d(THREADS), input, output, lse, rows_u32, n_u32, scale, dtypes);
    Ok(())
}

/// Queues [`super::scaled_softmax_lse`] on the fusion stream of a CubeCL backend
/// (`Fusion<CubeBackend<R, f32, i32, BT>>`: CUDA, or wgpu for the `wgpu` feature):
/// the probabilities in `dtype` and the rows' log-sum-exp (f32, the last dimension 1).
pub(super) fn register<R: CubeRuntime, BT: BoolElement>(
    x: FusionTensor<FusionCubeRuntime<R>>,
    scale: f32,
    dtype: DType,
) -> [FusionTensor<FusionCubeRuntime<R>>; 2] {
    let client = x.client.clone();
    let streams = OperationStreams::with_inputs([&x]);
    let out = TensorIr::uninit(client.create_empty_handle(), x.shape.clone(), dtype);
    let mut lse_shape = x.shape.to_vec();
    if let Some(last) = lse_shape.last_mut() {
        *last = 1;
    }
    let lse = TensorIr::uninit(client.create_empty_handle(), Shape::from(lse_shape), DType::F32);
    let desc = CustomOpIr::new("sd_lora_scaled_softmax", &[x.into_ir()], &[out, lse]);
    let op = FusedSoftmax::<R, BT> {
        desc: desc.clone(),
        scale,
        _backend: PhantomData,
    };
    client.register(streams, OperationIr::Custom(desc), op).outputs()
}

/// One queued fused softmax.
struct FusedSoftmax<R, BT> {
    desc: CustomOpIr,
    scale: f32,
    _backend: PhantomData<fn() -> (R, BT)>,
}

impl<R, BT> std::fmt::Debug for FusedSoftmax<R, BT> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FusedSoftmax").field("desc", &self.desc).field("scale", &self.scale).finish()
    }
}

impl<R: CubeRuntime, BT: BoolElement> Operation<FusionCubeRuntime<R>> for FusedSoftmax<R, BT> {
    fn execute(&self, handles: &mut HandleContainer<<FusionCubeRuntime<R> as FusionRuntime>::FusionHandle>) {
        let ([x], [out, lse]) = self.desc.as_fixed();
        let x = handles.get_float_tensor::<CubeBackend<R, f32, i32, BT>>(x);
        let (y, stats) = match kernel(x.clone(), self.scale, out.dtype) {
            Ok(y) => {
                super::record_fused_softmax();
                y
            }
            Err(reason) => {
                super::record_fallback(reason);
                burn_ops::<R, BT>(x, self.scale, out.dtype)
            }
        };
        handles.register_float_tensor::<CubeBackend<R, f32, i32, BT>>(&out.id, y);
        handles.register_float_tensor::<CubeBackend<R, f32, i32, BT>>(&lse.id, stats);
    }
}

/// The kernel on a CubeCL tensor (made contiguous first): the probabilities and the rows'
/// log-sum-exp (the input's shape with the last dimension 1).
fn kernel<R: CubeRuntime>(x: CubeTensor<R>, scale: f32, dtype: DType) -> Result<(CubeTensor<R>, CubeTensor<R>), String> {
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) || !matches!(x.dtype, DType::F32 | DType::BF16 | DType::F16) {
        return Err(format!("fused softmax: {:?} to {dtype:?} is not a float conversion", x.dtype));
    }
    let x = if x.is_contiguous() { x } else { into_contiguous(x) };
    let shape = x.meta.shape().clone();
    let n = shape.to_vec().last().copied().unwrap_or(1);
    let rows = shape.num_elements() / n.max(1);
    let client = x.client.clone();
    let out_handle = client.empty(shape.num_elements() * dtype.size());
    let lse_handle = client.empty(rows.max(1) * DType::F32.size());
    launch(&client, &x.handle, &out_handle, &lse_handle, rows, n, scale, [x.dtype.into(), dtype.into()])?;
    let mut lse_shape = shape.to_vec();
    if let Some(last) = lse_shape.last_mut() {
        *last = 1;
    }
    let lse = CubeTensor::new_contiguous(client.clone(), x.device.clone(), Shape::from(lse_shape), lse_handle, DType::F32);
    Ok((CubeTensor::new_contiguous(client, x.device.clone(), shape, out_handle, dtype), lse))
}

/// The same softmax and log-sum-exp in burn's ops ([`super::scaled_softmax_lse`]'s own path
/// on the unfused backend), over the input viewed as `[rows, n]`.
fn burn_ops<R: CubeRuntime, BT: BoolElement>(x: CubeTensor<R>, scale: f32, dtype: DType) -> (CubeTensor<R>, CubeTensor<R>) {
    type Inner<R, BT> = CubeBackend<R, f32, i32, BT>;
    let shape = x.meta.shape().clone();
    let n = shape.to_vec().last().copied().unwrap_or(1).max(1);
    let rows = shape.num_elements() / n;
    let x = super::tensor::<Inner<R, BT>, 2>(Inner::<R, BT>::float_reshape(x, Shape::new([rows, n])));
    let (y, lse) = super::scaled_softmax_lse(x, scale, dtype);
    let mut lse_shape = shape.to_vec();
    if let Some(last) = lse_shape.last_mut() {
        *last = 1;
    }
    (Inner::<R, BT>::float_reshape(y.into_primitive().tensor(), shape), Inner::<R, BT>::float_reshape(lse.into_primitive().tensor(), Shape::from(lse_shape)))
}

#[cfg(all(test, feature = "wgpu-test"))]
mod tests {
    //! The kernel on CubeCL's wgpu runtime (lavapipe on a machine without a GPU), f32,
    //! against a softmax computed here in f64.

    use super::*;
    use cubecl::wgpu::{WgpuDevice, WgpuRuntime};

    fn reference(x: &[f32], n: usize, scale: f32) -> Vec<f32> {
        x.chunks(n)
            .flat_map(|row| {
                let max = row.iter().map(|&v| f64::from(v * scale)).fold(f64::MIN, f64::max);
                let e: Vec<f64> = row.iter().map(|&v| (f64::from(v * scale) - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                e.into_iter().map(move |v| (v / sum) as f32)
            })
            .collect()
    }

    fn run(rows: usize, n: usize, scale: f32, seed: u32) {
        let client = WgpuRuntime::client(&WgpuDevice::default());
        // Deterministic pseudo-random scores with a wide range (large negative and positive).
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        let x: Vec<f32> = (0..rows * n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state % 20_000) as f32 / 1000.0 - 10.0
            })
            .collect();
        let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        let input = client.create_from_slice(&bytes);
        let output = client.empty(4 * rows * n);
        let lse = client.empty(4 * rows);
        let f32_type = StorageType::Scalar(cubecl::ir::ElemType::Float(cubecl::ir::FloatKind::F32));
        launch::<WgpuRuntime>(&client, &input, &output, &lse, rows, n, scale, [f32_type, f32_type]).expect("launch");
        let floats = |h| -> Vec<f32> { client.read_one(h).expect("read").chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect() };
        let (got, got_lse) = (floats(output), floats(lse));
        for (r, row) in x.chunks(n).enumerate() {
            let max = row.iter().map(|&v| f64::from(v * scale)).fold(f64::MIN, f64::max);
            let want = max + row.iter().map(|&v| (f64::from(v * scale) - max).exp()).sum::<f64>().ln();
            assert!((f64::from(got_lse[r]) - want).abs() <= 1e-4 * want.abs().max(1.0), "rows {rows} n {n}: lse of row {r}: {} vs {want}", got_lse[r]);
        }
        let want = reference(&x, n, scale);
        for (r, (g, w)) in got.chunks(n).zip(want.chunks(n)).enumerate() {
            let sum: f32 = g.iter().sum();
            assert!((sum - 1.0).abs() < 1e-4, "rows {rows} n {n}: row {r} sums to {sum}");
            for (j, (a, b)) in g.iter().zip(w).enumerate() {
                assert!((a - b).abs() <= 1e-5 + 1e-4 * b.abs(), "rows {rows} n {n} scale {scale}: [{r}, {j}] {a} vs {b}");
            }
        }
    }

    #[test]
    fn wgpu_softmax_rows_match_the_reference() {
        // Rows shorter than, equal to, and longer than a cube; odd lengths; a scale that
        // makes the exponent range wide.
        for (rows, n, scale) in [(3, 7, 1.0), (5, 256, 0.158), (4, 1000, 2.0), (2, 4099, 0.5), (1, 1, 1.0)] {
            run(rows, n, scale, (rows * n) as u32);
        }
    }

    /// The op as a custom operation of burn's fusion stream (`burn::backend::Wgpu`), between
    /// fused elementwise ops on both sides, for a contiguous and a transposed input.
    #[test]
    fn wgpu_fusion_op_matches_burn_ops() {
        use burn::tensor::{Distribution, Tensor};
        type W = burn::backend::Wgpu;
        let device = Default::default();
        let _guard = crate::kernels::tests::SWITCH.lock().unwrap_or_else(|e| e.into_inner());
        let x = Tensor::<W, 4>::random([2, 3, 5, 300], Distribution::Normal(0.0, 3.0), &device);
        let chain = |fused: bool, transposed: bool| {
            super::super::set_fused_softmax(fused);
            let input = x.clone() * 1.5 - 0.25;
            let input = if transposed { input.swap_dims(2, 3) } else { input };
            let p = super::super::scaled_softmax(input, 0.7, DType::F32);
            super::super::set_fused_softmax(false);
            (p.clone() * 3.0 + 1.0).log().into_data().to_vec::<f32>().expect("f32 data")
        };
        let before = super::super::vendor_stats();
        for transposed in [false, true] {
            let (ours, reference) = (chain(true, transposed), chain(false, transposed));
            assert_eq!(ours.len(), reference.len());
            for (i, (a, b)) in ours.iter().zip(&reference).enumerate() {
                assert!((a - b).abs() < 1e-5, "transposed {transposed}: element {i}: {a} vs {b}");
            }
        }
        let after = super::super::vendor_stats();
        assert_eq!(after.fallbacks, before.fallbacks, "fallbacks: {:?}", after.last_error);
        assert_eq!(after.fused_softmax_calls - before.fused_softmax_calls, 2);
    }

    /// The op's log-sum-exp output through burn's fusion stream against burn's ops.
    #[test]
    fn wgpu_fusion_op_log_sum_exp_matches_burn_ops() {
        use burn::tensor::{Distribution, Tensor};
        type W = burn::backend::Wgpu;
        let device = Default::default();
        let _guard = crate::kernels::tests::SWITCH.lock().unwrap_or_else(|e| e.into_inner());
        let x = Tensor::<W, 4>::random([2, 3, 5, 300], Distribution::Normal(0.0, 3.0), &device);
        let run = |fused: bool| {
            super::super::set_fused_softmax(fused);
            let (p, lse) = super::super::scaled_softmax_lse(x.clone() * 1.5, 0.7, DType::F32);
            super::super::set_fused_softmax(false);
            let data = |t: Tensor<W, 4>| t.into_data().to_vec::<f32>().expect("f32 data");
            (data(p), data(lse))
        };
        let before = super::super::vendor_stats();
        let ((p, lse), (p_ref, lse_ref)) = (run(true), run(false));
        assert_eq!(lse.len(), 2 * 3 * 5);
        for (a, b) in p.iter().zip(&p_ref).chain(lse.iter().zip(&lse_ref)) {
            assert!((a - b).abs() < 1e-4 * b.abs().max(1.0), "{a} vs {b}");
        }
        let after = super::super::vendor_stats();
        assert_eq!(after.fused_softmax_calls - before.fused_softmax_calls, 1);
    }

    #[test]
    fn wgpu_softmax_covers_more_rows_than_one_grid_axis() {
        // 65535 rows fill the first grid axis; the rest go to the second.
        run(MAX_GRID + 3, 4, 1.0, 7);
    }
}
