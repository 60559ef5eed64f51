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
//! One cube (256 threads) per row; the grid is two-dimensional so that more than 65535 rows
//! fit every runtime's limits.

use burn_cubecl::cubecl;
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

    let mut i = tid;
    while i < n {
        let x = f32::cast_from(input[base + i]) * scale;
        output[base + i] = O::cast_from((x - row_max).exp() * inv_sum);
        i += threads;
    }
}

/// Queues the kernel: `output[r, :] = softmax(scale · input[r, :])` for `rows` rows of `n`
/// elements; `input` and `output` are contiguous buffers of `rows · n` elements of
/// `input_dtype` and `output_dtype`.
pub(super) fn launch<R: Runtime>(
    client: &ComputeClient<R>,
    input: &cubecl::server::Handle,
    output: &cubecl::server::Handle,
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
    scaled_softmax_rows::launch::<R>(client, count, CubeDim::new_1d(THREADS), input, output, rows_u32, n_u32, scale, dtypes);
    Ok(())
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
        let f32_type = StorageType::Scalar(cubecl::ir::ElemType::Float(cubecl::ir::FloatKind::F32));
        launch::<WgpuRuntime>(&client, &input, &output, rows, n, scale, [f32_type, f32_type]).expect("launch");
        let got: Vec<f32> = client.read_one(output).expect("read").chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
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

    #[test]
    fn wgpu_softmax_covers_more_rows_than_one_grid_axis() {
        // 65535 rows fill the first grid axis; the rest go to the second.
        run(MAX_GRID + 3, 4, 1.0, 7);
    }
}
