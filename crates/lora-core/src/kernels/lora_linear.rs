//! A linear layer with a frozen base, and its LoRA adapter, as one operation of burn's
//! fusion stream each way.
//!
//! `y = x·W + bias + s·(x·A)·B (+ residual)` written with burn's tensor ops is, per adapted
//! layer and training step, about twenty operations of the fusion stream: the products,
//! the rank scale, the sums, the chunked weight gradients' reshapes and reductions, the
//! gradient sum of the input, and a release for every intermediate. The host registers,
//! plan-matches and executes each of them, though most launch nothing or a tiny kernel;
//! with 128 adapted layers that was a third of an SD1.5 step's ~6700 operations
//! (docs/benchmarks.md). Here the forward pass is one custom
//! operation and the backward pass another. Inside them the products go straight to the
//! kernels [`super::matmul`] would route them to (cuBLAS for large products on CUDA, else
//! the fixed CubeCL matmul), and the rest runs in small kernels of this file:
//!
//! - [`lora_rows`]: for ranks up to [`LOW_RANK_MAX`], the adapter's side of a few rows
//!   per cube: `h = x·A` (forward) or `g = dy·Bᵀ` (backward) into shared memory, then the
//!   epilogue of those rows, `x·W + s·(h·B) + bias + residual` or `dy·Wᵀ + s·(g·Aᵀ)`, in
//!   f32 (`rank` multiply-adds per output element), the adapter weights read in their own
//!   dtype; `h` (`g`) is written out for the weight gradients. Where a rank-wide product
//!   kernel wrote `h` and another a `[rows, columns]` tensor for the epilogue to read back;
//! - [`lora_epilogue`]: the same epilogue elementwise, `out = a + s·b (+ bias) (+ c)`, for
//!   a layer without an adapter and where [`lora_rows`] does not apply (ranks above
//!   [`LOW_RANK_MAX`]: `h`, `g` and `b` are routed products);
//! - [`lora_weight_grads`] and [`sum_weight_grads`]: both weight gradients of a layer,
//!   summed over row chunks straight from the rows (one unit per column of `x` and `dy`),
//!   then the chunks' f32 partial sums scaled into the adapter weights' dtypes;
//! - [`sum_partials`]: `s · Σ_k partials[k]` in f32, for a weight gradient split in row
//!   chunks by the routed product ([`super::split_rows`]; ranks above [`LOW_RANK_MAX`]).
//!
//! The backward pass is `g = dy·Bᵀ`, `dA = s·xᵀ·g`, `dB = s·hᵀ·dy`, `dx = dy·Wᵀ + s·g·Aᵀ`,
//! with `h = x·A` kept from the forward pass (`rows × r`, small): per adapted layer and
//! step, 2 kernels forward (`x·W`, [`lora_rows`]) and 4 backward (`dy·Wᵀ`, [`lora_rows`],
//! the two weight-gradient kernels), where separate products took 4 and 8. Same
//! arithmetic as the composed ops up to where the scale is applied (in f32 after the
//! rounded products), except that `h` and `g` enter the epilogues unrounded and the
//! adapter's term is no longer rounded to half precision before it is added. A layer
//! without an adapter (not targeted, or merged) is `x·W + bias (+ residual)` in one
//! operation, its backward pass the routed product `dy·Wᵀ`.

use std::any::TypeId;
use std::marker::PhantomData;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, CheckpointStrategy, NoCheckpointing};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, FloatTensorOps};
use burn::tensor::{DType, FloatDType, Shape, Tensor};
use burn_cubecl::cubecl;
use burn_cubecl::fusion::FusionCubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};
use cubecl::prelude::*;

use super::fixed_matmul::Transpose;
use super::{contiguous, downcast, tensor, FusedCube};

type Inner<R, BT> = CubeBackend<R, f32, i32, BT>;
type Fused<R> = FusionTensor<FusionCubeRuntime<R>>;

/// Threads per cube of both kernels.
pub(super) const THREADS: u32 = 256;

/// Cubes per launch at most; each thread strides over the rest.
const MAX_CUBES: usize = 65_535;

/// `out = a (+ scale·b) (+ bias[column]) (+ c)`, elementwise over `[rows, columns]` tensors
/// (vectors of `N` along a row; `columns` counts vectors), summed in f32.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn lora_epilogue<T: Float, P: Float, N: Size>(
    a: &Array<Vector<T, N>>,
    b: &Array<Vector<T, N>>,
    bias: &Array<Vector<P, N>>,
    c: &Array<Vector<T, N>>,
    out: &mut Array<Vector<T, N>>,
    scale: f32,
    columns: u32,
    #[comptime] has_b: bool,
    #[comptime] has_bias: bool,
    #[comptime] has_c: bool,
    #[define(T, P)] _dtypes: [StorageType; 2],
) {
    let n = out.len();
    let stride = (CUBE_COUNT_X * CUBE_DIM_X) as usize;
    let mut i = (CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X) as usize;
    while i < n {
        let mut v = Vector::<f32, N>::cast_from(a[i]);
        if has_b {
            v += Vector::<f32, N>::cast_from(b[i]) * Vector::<f32, N>::new(scale);
        }
        if has_bias {
            v += Vector::<f32, N>::cast_from(bias[i % columns as usize]);
        }
        if has_c {
            v += Vector::<f32, N>::cast_from(c[i]);
        }
        out[i] = Vector::<T, N>::cast_from(v);
        i += stride;
    }
}

/// Units per cube of [`lora_rows`], rows per cube, and units summing one of its products.
const ROWS_THREADS: u32 = 128;
const ROWS_PER_CUBE: usize = 4;
const ROWS_LANES: usize = 8;

/// The adapter's side of a layer for [`ROWS_PER_CUBE`] rows per cube, in two phases:
/// `low[row, k] = Σ_j src[row, j]·m1(k, j)` (`h = x·A` forward, `g = dy·Bᵀ` backward; kept
/// in f32 in shared memory, written out in `T` for the weight gradients), then the
/// epilogue of these rows, `out = a + scale·Σ_k low[row, k]·m2(k, column) (+ bias) (+ c)`
/// as [`lora_epilogue`] computes it. One launch where the rank-wide product and the
/// epilogue took two; `m1(k, j)` is `m1[k·m1_k + j·m1_c]`, `m2` likewise.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn lora_rows<T: Float, P: Float, Q: Float, N: Size>(
    src: &Array<T>,
    m1: &Array<Q>,
    a: &Array<Vector<T, N>>,
    m2: &Array<Q>,
    bias: &Array<Vector<P, N>>,
    c: &Array<Vector<T, N>>,
    low: &mut Array<T>,
    out: &mut Array<Vector<T, N>>,
    rows: u32,
    width: u32,
    columns: u32,
    rank: u32,
    m1_k: u32,
    m1_c: u32,
    m2_k: u32,
    m2_c: u32,
    scale: f32,
    #[comptime] has_bias: bool,
    #[comptime] has_c: bool,
    #[define(T, P, Q)] _dtypes: [StorageType; 3],
) {
    // `columns` counts vectors of `N`.
    let (rows, width, columns, rank) = (rows as usize, width as usize, columns as usize, rank as usize);
    let (m1_k, m1_c, m2_k, m2_c) = (m1_k as usize, m1_c as usize, m2_k as usize, m2_c as usize);
    let tid = UNIT_POS_X as usize;
    let first = CUBE_POS_X as usize * ROWS_PER_CUBE;
    let mut partial = SharedMemory::<f32>::new(ROWS_THREADS as usize);
    let mut lows = SharedMemory::<f32>::new(ROWS_PER_CUBE * LOW_RANK_MAX);
    let lane = tid % ROWS_LANES;
    let pairs = ROWS_PER_CUBE * rank;
    let mut p0 = 0usize;
    // Phase 1: ROWS_LANES units per (row, k), each over every ROWS_LANES-th element.
    while p0 < pairs {
        let pair = p0 + tid / ROWS_LANES;
        let row = first + pair / rank;
        let k = pair % rank;
        let mut acc = 0.0f32;
        if pair < pairs && row < rows {
            let mut j = lane;
            while j < width {
                acc += f32::cast_from(src[row * width + j]) * f32::cast_from(m1[k * m1_k + j * m1_c]);
                j += ROWS_LANES;
            }
        }
        partial[tid] = acc;
        sync_cube();
        if lane == 0 && pair < pairs {
            let mut sum = 0.0f32;
            #[unroll]
            for l in 0..ROWS_LANES {
                sum += partial[tid + l];
            }
            lows[pair] = sum;
            if row < rows {
                low[row * rank + k] = T::cast_from(sum);
            }
        }
        sync_cube();
        p0 += ROWS_THREADS as usize / ROWS_LANES;
    }
    // Phase 2: the epilogue of the cube's rows.
    let mut i = tid;
    while i < ROWS_PER_CUBE * columns {
        let r = i / columns;
        if first + r < rows {
            let at = (first + r) * columns + i % columns;
            let column0 = (i % columns) * N::value();
            let mut term = Vector::<f32, N>::new(0.0);
            let mut k = 0usize;
            while k < rank {
                let mut column = Vector::<f32, N>::new(0.0);
                #[unroll]
                for e in 0..N::value() {
                    column[e] = f32::cast_from(m2[k * m2_k + (column0 + e) * m2_c]);
                }
                term += Vector::<f32, N>::new(lows[r * rank + k]) * column;
                k += 1;
            }
            let mut v = Vector::<f32, N>::cast_from(a[at]) + term * Vector::<f32, N>::new(scale);
            if has_bias {
                v += Vector::<f32, N>::cast_from(bias[i % columns]);
            }
            if has_c {
                v += Vector::<f32, N>::cast_from(c[at]);
            }
            out[at] = Vector::<T, N>::cast_from(v);
        }
        i += ROWS_THREADS as usize;
    }
}

/// Partial LoRA weight gradients over chunk `CUBE_POS_Y` of `chunk` rows, one column per
/// unit: columns below `d_in` give `Σ_rows x[row, c]·g[row, k]` (`dA`, laid out
/// `[d_in, rank]`), the others `Σ_rows h[row, k]·dy[row, j]` (`dB`, `[rank, d_out]`, after
/// `dA`), into `partials[chunk · (d_in + d_out) · rank + …]` in f32. Both gradients of a
/// layer in one launch, read straight from the rows (no transposition, no product kernel
/// whose tiles the rank-wide outputs would leave mostly empty).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn lora_weight_grads<T: Float>(
    x: &Array<T>,
    g: &Array<T>,
    h: &Array<T>,
    dy: &Array<T>,
    partials: &mut Array<f32>,
    rows: u32,
    d_in: u32,
    d_out: u32,
    rank: u32,
    chunk: u32,
    #[comptime] tile: usize,
    #[define(T)] _dtype: StorageType,
) {
    let column = (CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X) as usize;
    let (rows, d_in, d_out, rank) = (rows as usize, d_in as usize, d_out as usize, rank as usize);
    let first = CUBE_POS_Y as usize * chunk as usize;
    let mut last = first + chunk as usize;
    if last > rows {
        last = rows;
    }
    let base = CUBE_POS_Y as usize * (d_in + d_out) * rank;
    if column < d_in {
        chunk_products::<T>(x, g, partials, column, d_in, first, last, rank, base, 1, rank, tile);
    } else if column < d_in + d_out {
        chunk_products::<T>(dy, h, partials, column - d_in, d_out, first, last, rank, base + d_in * rank, d_out, 1, tile);
    }
}

/// `Σ_{rows first..last} src[row, column] · low[row, k]` for every `k < rank`, `tile` at a
/// time (`tile` divides `rank`), stored at `partials[at + k·at_k + column·at_c]`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn chunk_products<T: Float>(
    src: &Array<T>,
    low: &Array<T>,
    partials: &mut Array<f32>,
    column: usize,
    width: usize,
    first: usize,
    last: usize,
    rank: usize,
    at: usize,
    at_k: usize,
    at_c: usize,
    #[comptime] tile: usize,
) {
    let mut k0 = 0usize;
    while k0 < rank {
        let mut acc = Array::<f32>::new(tile);
        #[unroll]
        for t in 0..tile {
            acc[t] = 0.0;
        }
        let mut row = first;
        while row < last {
            let v = f32::cast_from(src[row * width + column]);
            let l = row * rank + k0;
            #[unroll]
            for t in 0..tile {
                acc[t] += v * f32::cast_from(low[l + t]);
            }
            row += 1;
        }
        #[unroll]
        for t in 0..tile {
            partials[at + (k0 + t) * at_k + column * at_c] = acc[t];
        }
        k0 += tile;
    }
}

/// `da[j] = scale · Σ_k partials[k·n + j]` and `db[j] = scale · Σ_k partials[k·n +
/// len(da) + j]` for `chunks` partial rows of `n = len(da) + len(db)` f32 sums (from
/// [`lora_weight_grads`]), written in the adapter weights' dtypes.
#[cube(launch)]
fn sum_weight_grads<O: Float, Q: Float>(partials: &Array<f32>, da: &mut Array<O>, db: &mut Array<Q>, chunks: u32, scale: f32, #[define(O, Q)] _dtypes: [StorageType; 2]) {
    let (na, nb) = (da.len(), db.len());
    let n = na + nb;
    let stride = (CUBE_COUNT_X * CUBE_DIM_X) as usize;
    let mut j = (CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X) as usize;
    while j < n {
        let mut acc = 0.0f32;
        let mut k = 0usize;
        while k < chunks as usize {
            acc += partials[k * n + j];
            k += 1;
        }
        if j < na {
            da[j] = O::cast_from(acc * scale);
        } else {
            db[j - na] = Q::cast_from(acc * scale);
        }
        j += stride;
    }
}

/// `out[j] = scale · Σ_k partials[k · len(out) + j]` for `chunks` partial products, summed
/// in f32 and written in `out`'s dtype.
#[cube(launch)]
fn sum_partials<T: Float, O: Float>(partials: &Array<T>, out: &mut Array<O>, chunks: u32, scale: f32, #[define(T, O)] _dtypes: [StorageType; 2]) {
    let n = out.len();
    let stride = (CUBE_COUNT_X * CUBE_DIM_X) as usize;
    let mut j = (CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X) as usize;
    while j < n {
        let mut acc = 0.0f32;
        let mut k = 0usize;
        while k < chunks as usize {
            acc += f32::cast_from(partials[k * n + j]);
            k += 1;
        }
        out[j] = O::cast_from(acc * scale);
        j += stride;
    }
}

/// Cubes for `len` elements (or vectors), one per thread up to [`MAX_CUBES`].
pub(super) fn cubes(len: usize) -> CubeCount {
    CubeCount::Static(len.div_ceil(THREADS as usize).clamp(1, MAX_CUBES) as u32, 1, 1)
}

/// An array argument of `len` elements over `handle`.
///
/// # Safety
///
/// `handle` must hold `len` elements of the kernel's element type for that argument.
pub(super) unsafe fn arg<R: Runtime>(handle: &cubecl::server::Handle, len: usize) -> ArrayArg<R> {
    // SAFETY: the caller's contract.
    unsafe { ArrayArg::from_raw_parts(handle.clone(), len) }
}

fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// The widest vector the runtime offers that divides a row of `columns` elements of
/// `element` bytes, within 16 bytes (rows start on multiples of it, so every vector is
/// aligned).
pub(super) fn row_vector<R: Runtime>(client: &ComputeClient<R>, element: usize, columns: usize) -> usize {
    client
        .io_optimized_vector_sizes(element)
        .filter(|&v| v >= 1 && columns.is_multiple_of(v) && v * element <= 16)
        .max()
        .unwrap_or(1)
}

/// `t` in `dtype` (a copy only when it differs).
fn cast<R: CubeRuntime, BT: BoolElement>(t: CubeTensor<R>, dtype: DType) -> CubeTensor<R> {
    if t.dtype == dtype {
        t
    } else {
        Inner::<R, BT>::float_cast(t, FloatDType::from(dtype))
    }
}

/// Largest adapter rank whose products [`lora_rows`] and [`lora_weight_grads`] sum
/// themselves (`rank` multiply-adds per element, in f32 without tensor cores); larger
/// ranks go through the routed products.
pub(super) const LOW_RANK_MAX: usize = 32;

/// `a (+ scale·b) (+ bias) (+ c)` for `[rows, columns]` tensors `a`, `b`, `c` of one dtype
/// and a `[columns]` bias, in [`lora_epilogue`] (burn's ops where it refuses); `a` itself
/// when there is nothing to add.
fn epilogue<R: CubeRuntime, BT: BoolElement>(a: CubeTensor<R>, b: Option<CubeTensor<R>>, scale: f32, bias: Option<CubeTensor<R>>, c: Option<CubeTensor<R>>) -> CubeTensor<R> {
    if b.is_none() && bias.is_none() && c.is_none() {
        return a;
    }
    match launch_epilogue(&a, b.as_ref(), scale, bias.as_ref(), c.as_ref()) {
        Ok(out) => out,
        Err(reason) => {
            super::record_fallback(reason);
            let mut y = a;
            if let Some(b) = b {
                y = Inner::<R, BT>::float_add(y, Inner::<R, BT>::float_mul_scalar(b, scale.into()));
            }
            if let Some(bias) = bias {
                let columns = bias.meta.shape().num_elements();
                let bias = Inner::<R, BT>::float_reshape(cast::<R, BT>(bias, y.dtype), Shape::new([1, columns]));
                y = Inner::<R, BT>::float_add(y, bias);
            }
            if let Some(c) = c {
                y = Inner::<R, BT>::float_add(y, c);
            }
            y
        }
    }
}

fn launch_epilogue<R: CubeRuntime>(a: &CubeTensor<R>, b: Option<&CubeTensor<R>>, scale: f32, bias: Option<&CubeTensor<R>>, c: Option<&CubeTensor<R>>) -> Result<CubeTensor<R>, String> {
    let shape = a.meta.shape().clone();
    let dims = shape.to_vec();
    let [rows, columns] = dims[..] else {
        return Err(format!("LoRA epilogue: expected [rows, columns], got {dims:?}"));
    };
    let same = |t: &CubeTensor<R>| t.meta.shape().to_vec() == dims && t.dtype == a.dtype;
    if b.is_some_and(|b| !same(b)) || c.is_some_and(|c| !same(c)) || bias.is_some_and(|bias| bias.meta.shape().num_elements() != columns) {
        return Err(format!("LoRA epilogue: operands differ from {dims:?} {:?}", a.dtype));
    }
    if !is_float(a.dtype) || bias.is_some_and(|bias| !is_float(bias.dtype)) {
        return Err(format!("LoRA epilogue: {:?} operands", a.dtype));
    }
    let client = a.client.clone();
    let a = contiguous(a.clone());
    let (b, c) = (b.map(|b| contiguous(b.clone())), c.map(|c| contiguous(c.clone())));
    let bias = bias.map(|bias| contiguous(bias.clone()));
    let out = client.empty(rows * columns * a.dtype.size());
    let bias_dtype = bias.as_ref().map_or(a.dtype, |bias| bias.dtype);
    launch_epilogue_kernel(
        &client,
        &a.handle,
        b.as_ref().map(|b| &b.handle),
        bias.as_ref().map(|bias| &bias.handle),
        c.as_ref().map(|c| &c.handle),
        &out,
        [rows, columns],
        scale,
        [a.dtype.into(), bias_dtype.into()],
    )?;
    Ok(CubeTensor::new_contiguous(client, a.device.clone(), shape, out, a.dtype))
}

/// The adapter's side of a layer for [`lora_rows`]: `low = src·M1` and the epilogue
/// `a + scale·low·M2 (+ bias) (+ c)`. `m1` is `[rank, width]` or, `m1_transposed`,
/// `[width, rank]`; `m2` is `[rank, columns]` or, `m2_transposed`, `[columns, rank]`.
struct Rows<R: CubeRuntime> {
    src: CubeTensor<R>,
    m1: CubeTensor<R>,
    m1_transposed: bool,
    m2: CubeTensor<R>,
    m2_transposed: bool,
}

/// `(a + scale·(src·M1)·M2 (+ bias) (+ c), src·M1)` in one [`lora_rows`] launch, both in
/// `a`'s dtype; an error where it does not apply (ranks above [`LOW_RANK_MAX`], dtypes,
/// shapes), for the caller to run the products and [`epilogue`] instead.
fn launch_rows<R: CubeRuntime>(rows_term: &Rows<R>, a: &CubeTensor<R>, scale: f32, bias: Option<&CubeTensor<R>>, c: Option<&CubeTensor<R>>) -> Result<(CubeTensor<R>, CubeTensor<R>), String> {
    let Rows { src, m1, m1_transposed, m2, m2_transposed } = rows_term;
    let dims = |t: &CubeTensor<R>| t.meta.shape().to_vec();
    let (Ok([rows, width]), Ok([a_rows, columns])) = (<[usize; 2]>::try_from(dims(src)), <[usize; 2]>::try_from(dims(a))) else {
        return Err(format!("LoRA rows: src {:?}, a {:?}", dims(src), dims(a)));
    };
    let rank = if *m1_transposed { dims(m1).get(1).copied() } else { dims(m1).first().copied() }.unwrap_or(0);
    let m1_dims = if *m1_transposed { vec![width, rank] } else { vec![rank, width] };
    let m2_dims = if *m2_transposed { vec![columns, rank] } else { vec![rank, columns] };
    let dtype = a.dtype;
    let shapes_fit = a_rows == rows && dims(m1) == m1_dims && dims(m2) == m2_dims && c.is_none_or(|c| dims(c) == [rows, columns]) && bias.is_none_or(|b| b.meta.shape().num_elements() == columns);
    let dtypes_fit = is_float(dtype) && src.dtype == dtype && c.is_none_or(|c| c.dtype == dtype) && is_float(m1.dtype) && m2.dtype == m1.dtype && bias.is_none_or(|b| is_float(b.dtype));
    let cubes = rows.div_ceil(ROWS_PER_CUBE);
    let too_large = [rows * width, rows * columns, rows * rank].iter().any(|&n| u32::try_from(n).is_err()) || cubes > 65_535;
    if !shapes_fit || !dtypes_fit || rank == 0 || rank > LOW_RANK_MAX || too_large {
        return Err(format!("LoRA rows: src {:?} {:?}, m1 {:?}, a {:?} {dtype:?}, m2 {:?} {:?}", dims(src), src.dtype, dims(m1), dims(a), dims(m2), m2.dtype));
    }
    let client = a.client.clone();
    let [src, m1, a, m2] = [src, m1, a, m2].map(|t| contiguous(t.clone()));
    let (bias, c) = (bias.map(|b| contiguous(b.clone())), c.map(|c| contiguous(c.clone())));
    let (low, out) = (client.empty(rows * rank * dtype.size()), client.empty(rows * columns * dtype.size()));
    let m1_strides = if *m1_transposed { [1, rank] } else { [width, 1] };
    let m2_strides = if *m2_transposed { [1, rank] } else { [columns, 1] };
    let bias_dtype = bias.as_ref().map_or(dtype, |b| b.dtype);
    launch_rows_kernel(
        &client,
        RowsBuffers { src: &src.handle, m1: &m1.handle, a: &a.handle, m2: &m2.handle, bias: bias.as_ref().map(|b| &b.handle), c: c.as_ref().map(|c| &c.handle), low: &low, out: &out },
        [rows, width, columns, rank],
        [m1_strides, m2_strides],
        scale,
        [dtype.into(), bias_dtype.into(), m1.dtype.into()],
    );
    let device = a.device.clone();
    Ok((
        CubeTensor::new_contiguous(client.clone(), device.clone(), Shape::new([rows, columns]), out, dtype),
        CubeTensor::new_contiguous(client, device, Shape::new([rows, rank]), low, dtype),
    ))
}

/// `(a + scale·(src·M1)·M2 (+ bias) (+ c), src·M1)`: [`lora_rows`] for ranks up to
/// [`LOW_RANK_MAX`], else (or where it refuses) the routed products and [`epilogue`].
fn rows_or_products<R: CubeRuntime, BT: BoolElement>(rows: Rows<R>, a: CubeTensor<R>, scale: f32, bias: Option<CubeTensor<R>>, c: Option<CubeTensor<R>>, routing: Routing) -> (CubeTensor<R>, CubeTensor<R>) {
    let rank = rows.m1.meta.shape()[usize::from(rows.m1_transposed)];
    if rank <= LOW_RANK_MAX {
        match launch_rows(&rows, &a, scale, bias.as_ref(), c.as_ref()) {
            Ok(pair) => return pair,
            Err(reason) => super::record_fallback(reason),
        }
    }
    // `m1` / `m2` as stored: `[rank, ·]` is read transposed, `[·, rank]` as it is.
    let Rows { src, m1, m1_transposed, m2, m2_transposed } = rows;
    let dtype = a.dtype;
    let low = product::<R, BT>(src, cast::<R, BT>(m1, dtype), Transpose { a: false, b: !m1_transposed }, routing);
    let term = product::<R, BT>(low.clone(), cast::<R, BT>(m2, dtype), Transpose { a: false, b: m2_transposed }, routing);
    (epilogue::<R, BT>(a, Some(term), scale, bias, c), low)
}

/// The buffers of [`lora_rows`]: `src: [rows, width]`, `a`, `c`, `out: [rows, columns]`
/// and `low: [rows, rank]` in the activations' dtype, the bias (`columns`) in its own,
/// `m1` (`rank · width`) and `m2` (`rank · columns`) in the adapter's.
pub(super) struct RowsBuffers<'a> {
    pub src: &'a cubecl::server::Handle,
    pub m1: &'a cubecl::server::Handle,
    pub a: &'a cubecl::server::Handle,
    pub m2: &'a cubecl::server::Handle,
    pub bias: Option<&'a cubecl::server::Handle>,
    pub c: Option<&'a cubecl::server::Handle>,
    pub low: &'a cubecl::server::Handle,
    pub out: &'a cubecl::server::Handle,
}

/// Launches [`lora_rows`] on contiguous buffers (see [`RowsBuffers`]) for `[rows, width,
/// columns, rank]`, `m1(k, j)` at `k·strides[0][0] + j·strides[0][1]` and `m2(k, column)`
/// at `k·strides[1][0] + column·strides[1][1]`; `dtypes` are the activations', the bias's
/// and the adapter's. The caller checks sizes (u32 indices, at most 65 535 cubes of
/// [`ROWS_PER_CUBE`] rows, `rank` ≤ [`LOW_RANK_MAX`]).
pub(super) fn launch_rows_kernel<R: Runtime>(client: &ComputeClient<R>, buffers: RowsBuffers<'_>, [rows, width, columns, rank]: [usize; 4], strides: [[usize; 2]; 2], scale: f32, dtypes: [StorageType; 3]) {
    let RowsBuffers { src, m1, a, m2, bias, c, low, out } = buffers;
    let vector = row_vector(client, dtypes[0].size(), columns);
    let len = rows * columns;
    // Absent operands are bound to `a` and never read.
    let (bias_handle, bias_len) = bias.map_or((a, len), |b| (b, columns));
    // SAFETY: the caller's contract on the buffers; the vector divides a row, so the bias
    // is whole vectors.
    unsafe {
        lora_rows::launch::<R>(
            client,
            CubeCount::Static(rows.div_ceil(ROWS_PER_CUBE) as u32, 1, 1),
            CubeDim::new_1d(ROWS_THREADS),
            vector,
            arg(src, rows * width),
            arg(m1, rank * width),
            arg(a, len),
            arg(m2, rank * columns),
            arg(bias_handle, bias_len),
            arg(c.unwrap_or(a), len),
            arg(low, rows * rank),
            arg(out, len),
            rows as u32,
            width as u32,
            (columns / vector) as u32,
            rank as u32,
            strides[0][0] as u32,
            strides[0][1] as u32,
            strides[1][0] as u32,
            strides[1][1] as u32,
            scale,
            bias.is_some(),
            c.is_some(),
            dtypes,
        );
    }
}

/// Launches [`lora_epilogue`] on contiguous buffers: `a`, `b`, `c` and `out` hold
/// `rows · columns` elements of `dtypes[0]`, the bias `columns` of `dtypes[1]`.
#[allow(clippy::too_many_arguments)]
pub(super) fn launch_epilogue_kernel<R: Runtime>(
    client: &ComputeClient<R>,
    a: &cubecl::server::Handle,
    b: Option<&cubecl::server::Handle>,
    bias: Option<&cubecl::server::Handle>,
    c: Option<&cubecl::server::Handle>,
    out: &cubecl::server::Handle,
    [rows, columns]: [usize; 2],
    scale: f32,
    dtypes: [StorageType; 2],
) -> Result<(), String> {
    let len = rows * columns;
    if u32::try_from(len).is_err() {
        return Err(format!("LoRA epilogue: {len} elements are over u32"));
    }
    let vector = row_vector(client, dtypes[0].size(), columns);
    // Absent operands are bound to `a` and never read.
    let (bias_handle, bias_len) = bias.map_or((a, len), |bias| (bias, columns));
    // SAFETY: the caller's contract on the buffers; the vector divides a row, so the bias
    // is whole vectors. Array arguments count elements; the kernel sees `len / vector`.
    unsafe {
        lora_epilogue::launch::<R>(
            client,
            cubes(len / vector),
            CubeDim::new_1d(THREADS),
            vector,
            arg(a, len),
            arg(b.unwrap_or(a), len),
            arg(bias_handle, bias_len),
            arg(c.unwrap_or(a), len),
            arg(out, len),
            scale,
            (columns / vector) as u32,
            b.is_some(),
            bias.is_some(),
            c.is_some(),
            dtypes,
        );
    }
    Ok(())
}

/// Where an op's products run ([`super::set_cublas`], [`super::set_cublas_min_gflop`], [`super::set_cublas_tall_min_gflop`],
/// [`super::set_fixed_matmul`]), read when the op is queued: burn-fusion may execute it
/// after the switches changed.
#[derive(Debug, Clone, Copy)]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
struct Routing {
    cublas: bool,
    cublas_thresholds: super::CublasThresholds,
    fixed: bool,
}

impl Routing {
    fn now() -> Self {
        Self { cublas: super::cublas_enabled(), cublas_thresholds: super::cublas_thresholds(), fixed: super::fixed_matmul_enabled() }
    }
}

/// `op(a) · op(b)` where [`super::matmul_transposed`] would run it under `routing`: cuBLAS
/// on CUDA (switch on, large enough), else the fixed CubeCL kernel, else burn's matmul;
/// counted the same.
fn product<R: CubeRuntime, BT: BoolElement>(a: CubeTensor<R>, b: CubeTensor<R>, transpose: Transpose, routing: Routing) -> CubeTensor<R> {
    let a = Transpose::apply::<R, BT>(transpose.a, a);
    let b = Transpose::apply::<R, BT>(transpose.b, b);
    #[cfg(feature = "cuda")]
    if routing.cublas && super::worth_routing_at(&a.meta.shape().to_vec(), &b.meta.shape().to_vec(), routing.cublas_thresholds) && let Some(result) = cublas_product(&a, &b) {
        match result {
            Ok(y) => {
                super::record_cublas_call();
                return y;
            }
            Err(reason) => super::record_fallback(reason),
        }
    }
    if routing.fixed {
        match super::fixed_matmul::run(a.clone(), b.clone()) {
            Ok(y) => {
                super::record_fixed_matmul();
                return y;
            }
            Err(reason) => super::record_fallback(reason),
        }
    }
    Inner::<R, BT>::float_matmul(a, b)
}

/// cuBLAS's product when `R` is the CUDA runtime, else `None`.
#[cfg(feature = "cuda")]
fn cublas_product<R: CubeRuntime>(a: &CubeTensor<R>, b: &CubeTensor<R>) -> Option<Result<CubeTensor<R>, String>> {
    use burn_cubecl::cubecl::cuda::CudaRuntime;
    if TypeId::of::<R>() != TypeId::of::<CudaRuntime>() {
        return None;
    }
    let (a, b): (CubeTensor<CudaRuntime>, CubeTensor<CudaRuntime>) = (downcast(a.clone())?, downcast(b.clone())?);
    Some(super::cublas::run(a, b).map(|y| downcast(y).expect("R is the CUDA runtime")))
}

/// `scale · xᵀ · dy` for `x: [rows, m]`, `dy: [rows, n]`, in `dtype`: the product in row
/// chunks where [`super::split_rows`] splits it (as [`super::weight_grad`] does), the
/// partial products summed and scaled in f32 by [`sum_partials`].
fn weight_grad<R: CubeRuntime, BT: BoolElement>(x: CubeTensor<R>, dy: CubeTensor<R>, scale: f32, dtype: DType, routing: Routing) -> CubeTensor<R> {
    let (rows, m, n) = (x.meta.shape()[0], x.meta.shape()[1], dy.meta.shape()[1]);
    let transposed = Transpose { a: true, b: false };
    let (partials, chunks) = match super::split_rows(rows, m * n) {
        Some(chunk) => {
            let chunks = rows / chunk;
            let x = Inner::<R, BT>::float_reshape(x, Shape::new([chunks, chunk, m]));
            let dy = Inner::<R, BT>::float_reshape(dy, Shape::new([chunks, chunk, n]));
            (product::<R, BT>(x, dy, transposed, routing), chunks)
        }
        None => (product::<R, BT>(x, dy, transposed, routing), 1),
    };
    match launch_sum_partials(&partials, chunks, m * n, scale, dtype) {
        Ok(out) => Inner::<R, BT>::float_reshape(out, Shape::new([m, n])),
        Err(reason) => {
            super::record_fallback(reason);
            let partials = Inner::<R, BT>::float_reshape(cast::<R, BT>(partials, DType::F32), Shape::new([chunks, m * n]));
            let sum = Inner::<R, BT>::float_mul_scalar(Inner::<R, BT>::float_sum_dim(partials, 0), scale.into());
            Inner::<R, BT>::float_reshape(cast::<R, BT>(sum, dtype), Shape::new([m, n]))
        }
    }
}

fn launch_sum_partials<R: CubeRuntime>(partials: &CubeTensor<R>, chunks: usize, len: usize, scale: f32, dtype: DType) -> Result<CubeTensor<R>, String> {
    if !is_float(partials.dtype) || !is_float(dtype) {
        return Err(format!("LoRA weight gradient: {:?} partials into {dtype:?}", partials.dtype));
    }
    if partials.meta.shape().num_elements() != chunks * len {
        return Err(format!("LoRA weight gradient: partials {:?} for {chunks} chunks of {len}", partials.meta.shape()));
    }
    let partials = contiguous(partials.clone());
    let client = partials.client.clone();
    let out = client.empty(len * dtype.size());
    launch_sum_partials_kernel(&client, &partials.handle, &out, chunks, len, scale, [partials.dtype.into(), dtype.into()])?;
    Ok(CubeTensor::new_contiguous(client, partials.device.clone(), Shape::new([len]), out, dtype))
}

/// Launches [`sum_partials`]: `partials` holds `chunks · len` elements of `dtypes[0]`,
/// `out` `len` of `dtypes[1]`.
pub(super) fn launch_sum_partials_kernel<R: Runtime>(
    client: &ComputeClient<R>,
    partials: &cubecl::server::Handle,
    out: &cubecl::server::Handle,
    chunks: usize,
    len: usize,
    scale: f32,
    dtypes: [StorageType; 2],
) -> Result<(), String> {
    let chunks_u32 = u32::try_from(chunks).map_err(|_| format!("LoRA weight gradient: {chunks} chunks"))?;
    if u32::try_from(chunks * len).is_err() {
        return Err(format!("LoRA weight gradient: {chunks} × {len} partial elements are over u32"));
    }
    // SAFETY: the caller's contract on the buffers.
    unsafe {
        sum_partials::launch::<R>(client, cubes(len), CubeDim::new_1d(THREADS), arg(partials, chunks * len), arg(out, len), chunks_u32, scale, dtypes);
    }
    Ok(())
}

/// `(scale · xᵀ·g, scale · hᵀ·dy)`, the adapter's two weight gradients, in `dtypes`
/// (`A`'s and `B`'s): one [`lora_weight_grads`] launch over row chunks and one
/// [`sum_weight_grads`] for ranks up to [`LOW_RANK_MAX`], else (or where the kernels
/// refuse) two routed products as [`weight_grad`] runs them.
fn weight_grads<R: CubeRuntime, BT: BoolElement>([x, g, h, dy]: [CubeTensor<R>; 4], scale: f32, dtypes: [DType; 2], routing: Routing) -> (CubeTensor<R>, CubeTensor<R>) {
    if g.meta.shape()[1] <= LOW_RANK_MAX {
        match launch_weight_grads(&x, &g, &h, &dy, scale, dtypes) {
            Ok(pair) => return pair,
            Err(reason) => super::record_fallback(reason),
        }
    }
    (weight_grad::<R, BT>(x, g, scale, dtypes[0], routing), weight_grad::<R, BT>(h, dy, scale, dtypes[1], routing))
}

fn launch_weight_grads<R: CubeRuntime>(x: &CubeTensor<R>, g: &CubeTensor<R>, h: &CubeTensor<R>, dy: &CubeTensor<R>, scale: f32, dtypes: [DType; 2]) -> Result<(CubeTensor<R>, CubeTensor<R>), String> {
    let dims = |t: &CubeTensor<R>| t.meta.shape().to_vec();
    let (Ok([rows, d_in]), Ok([_, rank]), Ok([_, d_out])) = (<[usize; 2]>::try_from(dims(x)), <[usize; 2]>::try_from(dims(g)), <[usize; 2]>::try_from(dims(dy))) else {
        return Err(format!("LoRA weight gradients: x {:?}, g {:?}, dy {:?}", dims(x), dims(g), dims(dy)));
    };
    let dtype = x.dtype;
    let fits = dims(g) == [rows, rank] && dims(h) == [rows, rank] && dims(dy)[0] == rows && [g.dtype, h.dtype, dy.dtype].iter().all(|&d| d == dtype);
    if !fits || !is_float(dtype) || !dtypes.iter().all(|&d| is_float(d)) {
        return Err(format!("LoRA weight gradients: x {:?} {dtype:?}, g {:?} {:?}, h {:?} {:?}, dy {:?} {:?} into {dtypes:?}", dims(x), dims(g), g.dtype, dims(h), h.dtype, dims(dy), dy.dtype));
    }
    let client = x.client.clone();
    let [x, g, h, dy] = [x, g, h, dy].map(|t| contiguous(t.clone()));
    let (da, db) = (client.empty(d_in * rank * dtypes[0].size()), client.empty(rank * d_out * dtypes[1].size()));
    launch_weight_grads_kernels(&client, [&x.handle, &g.handle, &h.handle, &dy.handle], [&da, &db], [rows, d_in, d_out, rank], scale, [dtype.into(), dtypes[0].into(), dtypes[1].into()])?;
    let device = x.device.clone();
    Ok((
        CubeTensor::new_contiguous(client.clone(), device.clone(), Shape::new([d_in, rank]), da, dtypes[0]),
        CubeTensor::new_contiguous(client, device, Shape::new([rank, d_out]), db, dtypes[1]),
    ))
}

/// Threads per cube of [`lora_weight_grads`] (one column each).
const WEIGHT_GRAD_THREADS: u32 = 128;

/// Rows per chunk of [`lora_weight_grads`] at least, and f32 partial sums at most (more
/// rows per chunk when the chunks' partials would exceed it).
const WEIGHT_GRAD_MIN_ROWS: usize = 64;
const WEIGHT_GRAD_MAX_PARTIALS: usize = 1 << 22;

/// Rows per chunk of [`lora_weight_grads`] for `rows` rows and `outputs` gradient elements:
/// [`WEIGHT_GRAD_MIN_ROWS`], more where that many chunks' partials would pass
/// [`WEIGHT_GRAD_MAX_PARTIALS`].
pub(super) fn weight_grad_chunk(rows: usize, outputs: usize) -> usize {
    let max_chunks = (WEIGHT_GRAD_MAX_PARTIALS / outputs.max(1)).max(1);
    WEIGHT_GRAD_MIN_ROWS.max(rows.div_ceil(max_chunks))
}

/// Launches [`lora_weight_grads`] and [`sum_weight_grads`]: `inputs` are `x: [rows, d_in]`,
/// `g: [rows, rank]`, `h: [rows, rank]` and `dy: [rows, d_out]` in `dtypes[0]`, `outputs`
/// `dA: [d_in, rank]` in `dtypes[1]` and `dB: [rank, d_out]` in `dtypes[2]`.
pub(super) fn launch_weight_grads_kernels<R: Runtime>(
    client: &ComputeClient<R>,
    [x, g, h, dy]: [&cubecl::server::Handle; 4],
    [da, db]: [&cubecl::server::Handle; 2],
    [rows, d_in, d_out, rank]: [usize; 4],
    scale: f32,
    dtypes: [StorageType; 3],
) -> Result<(), String> {
    let outputs = (d_in + d_out) * rank;
    let chunk = weight_grad_chunk(rows, outputs);
    let chunks = rows.div_ceil(chunk);
    let too_large = [rows * d_in, rows * d_out, rows * rank, chunks * outputs].iter().any(|&n| u32::try_from(n).is_err());
    if rank == 0 || rows == 0 || too_large || chunks > 65_535 {
        return Err(format!("LoRA weight gradients: {rows} rows, {d_in} → {d_out}, rank {rank}"));
    }
    let partials = client.empty(chunks * outputs * 4);
    // Ranks a tile at a time, in registers; a tile divides the rank, so no guards.
    let tile = 1 << rank.trailing_zeros().min(3);
    let columns = d_in + d_out;
    // SAFETY: the caller's contract on the buffers; `partials` holds `chunks · outputs` f32.
    unsafe {
        lora_weight_grads::launch::<R>(
            client,
            CubeCount::Static(columns.div_ceil(WEIGHT_GRAD_THREADS as usize) as u32, chunks as u32, 1),
            CubeDim::new_1d(WEIGHT_GRAD_THREADS),
            arg(x, rows * d_in),
            arg(g, rows * rank),
            arg(h, rows * rank),
            arg(dy, rows * d_out),
            arg(&partials, chunks * outputs),
            rows as u32,
            d_in as u32,
            d_out as u32,
            rank as u32,
            chunk as u32,
            tile,
            dtypes[0],
        );
        sum_weight_grads::launch::<R>(client, cubes(outputs), CubeDim::new_1d(THREADS), arg(&partials, chunks * outputs), arg(da, d_in * rank), arg(db, rank * d_out), chunks as u32, scale, [dtypes[1], dtypes[2]]);
    }
    Ok(())
}

/// What a queued forward pass has besides `x` and `W`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Variant {
    adapter: bool,
    bias: bool,
    residual: bool,
    /// Whether `h = x·A` is an output (for the backward pass; with an adapter only).
    keep_h: bool,
}

impl Variant {
    fn name(self) -> &'static str {
        // burn-fusion matches cached plans by the operations' descriptions; the variants
        // differ in their inputs anyway, the names say which is which in its logs.
        const PLAIN: [&str; 4] = ["sd_linear", "sd_linear_b", "sd_linear_r", "sd_linear_br"];
        const LORA: [&str; 8] = [
            "sd_lora_linear",
            "sd_lora_linear_b",
            "sd_lora_linear_r",
            "sd_lora_linear_br",
            "sd_lora_linear_h",
            "sd_lora_linear_bh",
            "sd_lora_linear_rh",
            "sd_lora_linear_brh",
        ];
        let index = usize::from(self.bias) | usize::from(self.residual) << 1;
        if self.adapter {
            LORA[index | usize::from(self.keep_h) << 2]
        } else {
            PLAIN[index]
        }
    }
}

/// The frozen base and the adapter (`A`, `B`) of one layer as fusion tensors.
struct Operands<R: CubeRuntime> {
    x: Fused<R>,
    weight: Fused<R>,
    bias: Option<Fused<R>>,
    adapter: Option<(Fused<R>, Fused<R>)>,
    residual: Option<Fused<R>>,
}

/// Queues the forward pass: `y` and, with `keep_h` (and an adapter), `h = x·A` (both in
/// `x`'s dtype).
fn register_forward<R: CubeRuntime, BT: BoolElement>(operands: Operands<R>, scale: f32, keep_h: bool) -> (Fused<R>, Option<Fused<R>>) {
    let Operands { x, weight, bias, adapter, residual } = operands;
    let client = x.client.clone();
    let variant = Variant {
        adapter: adapter.is_some(),
        bias: bias.is_some(),
        residual: residual.is_some(),
        keep_h: keep_h && adapter.is_some(),
    };
    let (rows, d_out) = (x.shape[0], weight.shape[1]);
    let rank = adapter.as_ref().map_or(0, |(down, _)| down.shape[1]);
    let dtype = x.dtype;
    let mut inputs = vec![x, weight];
    if let Some((down, up)) = adapter {
        inputs.extend([down, up]);
    }
    inputs.extend(bias);
    inputs.extend(residual);
    let streams = OperationStreams::with_inputs(&inputs);
    let mut outputs = vec![TensorIr::uninit(client.create_empty_handle(), Shape::new([rows, d_out]), dtype)];
    if variant.keep_h {
        outputs.push(TensorIr::uninit(client.create_empty_handle(), Shape::new([rows, rank]), dtype));
    }
    let inputs: Vec<TensorIr> = inputs.into_iter().map(FusionTensor::into_ir).collect();
    let desc = CustomOpIr::new(variant.name(), &inputs, &outputs);
    let op = LoraForward::<R, BT> {
        desc: desc.clone(),
        variant,
        scale,
        routing: Routing::now(),
        _backend: PhantomData,
    };
    let mut outputs = client.register(streams, OperationIr::Custom(desc), op).into_iter();
    let y = outputs.next().expect("the op has an output");
    (y, outputs.next())
}

/// One queued forward pass.
struct LoraForward<R, BT> {
    desc: CustomOpIr,
    variant: Variant,
    scale: f32,
    routing: Routing,
    _backend: PhantomData<fn() -> (R, BT)>,
}

impl<R, BT> std::fmt::Debug for LoraForward<R, BT> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoraForward").field("variant", &self.variant).field("scale", &self.scale).finish()
    }
}

impl<R: CubeRuntime, BT: BoolElement> Operation<FusionCubeRuntime<R>> for LoraForward<R, BT> {
    fn execute(&self, handles: &mut HandleContainer<<FusionCubeRuntime<R> as FusionRuntime>::FusionHandle>) {
        let mut inputs = self.desc.inputs.iter().map(|ir| handles.get_float_tensor::<Inner<R, BT>>(ir));
        let mut next = || inputs.next().expect("input count fixed by `register_forward`");
        let (x, weight) = (next(), next());
        let adapter = self.variant.adapter.then(|| (next(), next()));
        let bias = self.variant.bias.then(&mut next);
        let residual = self.variant.residual.then(&mut next);
        let base = product::<R, BT>(x.clone(), weight, Transpose::default(), self.routing);
        let (y, h) = match adapter {
            Some((down, up)) => {
                let (y, h) = rows_or_products::<R, BT>(Rows { src: x, m1: down, m1_transposed: true, m2: up, m2_transposed: false }, base, self.scale, bias, residual, self.routing);
                (y, Some(h))
            }
            None => (epilogue::<R, BT>(base, None, self.scale, bias, residual), None),
        };
        super::record_fused_lora_linear();
        handles.register_float_tensor::<Inner<R, BT>>(&self.desc.outputs[0].id, y);
        if let (true, Some(h)) = (self.variant.keep_h, h) {
            handles.register_float_tensor::<Inner<R, BT>>(&self.desc.outputs[1].id, h);
        }
    }
}

/// Queues the backward pass: `dx` (with `want_dx`, in `dy`'s dtype) and `(dA, dB)` (with
/// `want_params`, in `A`'s and `B`'s dtypes).
#[allow(clippy::type_complexity)]
fn register_backward<R: CubeRuntime, BT: BoolElement>(
    [x, weight, down, up, h, dy]: [Fused<R>; 6],
    scale: f32,
    want_dx: bool,
    want_params: bool,
) -> (Option<Fused<R>>, Option<(Fused<R>, Fused<R>)>) {
    const NAMES: [&str; 3] = ["sd_lora_linear_backward_x", "sd_lora_linear_backward_ab", "sd_lora_linear_backward"];
    let client = x.client.clone();
    let like = |t: &Fused<R>, dtype: DType| TensorIr::uninit(client.create_empty_handle(), t.shape.clone(), dtype);
    let mut outputs = Vec::new();
    if want_dx {
        outputs.push(like(&x, dy.dtype));
    }
    if want_params {
        outputs.extend([like(&down, down.dtype), like(&up, up.dtype)]);
    }
    let inputs = [x, weight, down, up, h, dy];
    let streams = OperationStreams::with_inputs(&inputs);
    let inputs: Vec<TensorIr> = inputs.into_iter().map(FusionTensor::into_ir).collect();
    let name = NAMES[usize::from(want_dx) + 2 * usize::from(want_params) - 1];
    let desc = CustomOpIr::new(name, &inputs, &outputs);
    let op = LoraBackward::<R, BT> {
        desc: desc.clone(),
        scale,
        want_dx,
        want_params,
        routing: Routing::now(),
        _backend: PhantomData,
    };
    let mut grads = client.register(streams, OperationIr::Custom(desc), op).into_iter();
    let dx = if want_dx { grads.next() } else { None };
    let params = grads.next().zip(grads.next());
    (dx, params)
}

/// One queued backward pass.
struct LoraBackward<R, BT> {
    desc: CustomOpIr,
    scale: f32,
    want_dx: bool,
    want_params: bool,
    routing: Routing,
    _backend: PhantomData<fn() -> (R, BT)>,
}

impl<R, BT> std::fmt::Debug for LoraBackward<R, BT> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoraBackward").field("scale", &self.scale).field("dx", &self.want_dx).field("params", &self.want_params).finish()
    }
}

impl<R: CubeRuntime, BT: BoolElement> Operation<FusionCubeRuntime<R>> for LoraBackward<R, BT> {
    fn execute(&self, handles: &mut HandleContainer<<FusionCubeRuntime<R> as FusionRuntime>::FusionHandle>) {
        let [x, weight, down, up, h, dy] = std::array::from_fn(|i| handles.get_float_tensor::<Inner<R, BT>>(&self.desc.inputs[i]));
        let dtype = dy.dtype;
        let (down_dtype, up_dtype) = (down.dtype, up.dtype);
        let mut results = Vec::new();
        // `g = dy·Bᵀ`, the unscaled gradient of `h`: with `dx`, together with its epilogue
        // `dy·Wᵀ + s·g·Aᵀ`; else a product.
        let g = if self.want_dx {
            let through_base = product::<R, BT>(dy.clone(), weight, Transpose { a: false, b: true }, self.routing);
            let (dx, g) = rows_or_products::<R, BT>(Rows { src: dy.clone(), m1: up, m1_transposed: false, m2: down, m2_transposed: true }, through_base, self.scale, None, None, self.routing);
            results.push(dx);
            g
        } else {
            product::<R, BT>(dy.clone(), cast::<R, BT>(up, dtype), Transpose { a: false, b: true }, self.routing)
        };
        if self.want_params {
            let (da, db) = weight_grads::<R, BT>([x, g, h, dy], self.scale, [down_dtype, up_dtype], self.routing);
            results.extend([da, db]);
        }
        super::record_fused_lora_linear();
        for (ir, t) in self.desc.outputs.iter().zip(results) {
            handles.register_float_tensor::<Inner<R, BT>>(&ir.id, t);
        }
    }
}

/// The inputs of [`super::lora_linear`]: `x·weight + bias + scale·(x·down)·up + residual`
/// on `[rows, ·]` rows, `weight: [d_in, d_out]` (burn's layout), `adapter` = `(down, up)`
/// with `down: [d_in, r]`, `up: [r, d_out]`; without an adapter, `x·weight + bias + residual`.
pub(crate) struct LoraLinearInputs<B: Backend> {
    pub x: Tensor<B, 2>,
    pub weight: Tensor<B, 2>,
    pub bias: Option<Tensor<B, 1>>,
    pub adapter: Option<(Tensor<B, 2>, Tensor<B, 2>)>,
    pub residual: Option<Tensor<B, 2>>,
    pub scale: f32,
}

/// `t` as a tensor of backend `X`, keeping `None`; `B` must be `X`.
fn same_backend<T: 'static, U: 'static>(t: Option<T>) -> Option<U> {
    t.map(|t| downcast(t).expect("the backend was checked"))
}

impl<B: Backend> LoraLinearInputs<B> {
    /// Whether the op takes these dtypes: float activations, the base weight and residual
    /// in them, a float bias (its own dtype) and float adapter weights.
    fn dtypes_fit(&self) -> bool {
        let dtype = self.x.dtype();
        is_float(dtype)
            && self.weight.dtype() == dtype
            && self.bias.as_ref().is_none_or(|b| is_float(b.dtype()))
            && self.residual.as_ref().is_none_or(|r| r.dtype() == dtype)
            && self.adapter.as_ref().is_none_or(|(down, up)| is_float(down.dtype()) && is_float(up.dtype()))
    }

    /// The inputs as tensors of backend `X`, which `B` must be. Taken by value: an input
    /// the op reads as its last handle is released by the op, where a clone would leave a
    /// release operation of its own on the stream.
    fn into_backend<X: Backend>(self) -> LoraLinearInputs<X> {
        let cast = |t: Tensor<B, 2>| -> Tensor<X, 2> { downcast(t).expect("the backend was checked") };
        LoraLinearInputs {
            x: cast(self.x),
            weight: cast(self.weight),
            bias: same_backend(self.bias),
            adapter: self.adapter.map(|(down, up)| (cast(down), cast(up))),
            residual: same_backend(self.residual),
            scale: self.scale,
        }
    }
}

/// The op when `B` is [`FusedCube<R, BT>`] or the autodiff backend over it (a frozen base),
/// else the inputs back.
pub(super) fn dispatch<B: Backend, R: CubeRuntime, BT: BoolElement>(inputs: LoraLinearInputs<B>) -> Result<Tensor<B, 2>, LoraLinearInputs<B>> {
    if !inputs.dtypes_fit() {
        return Err(inputs);
    }
    let id = TypeId::of::<B>();
    if id == TypeId::of::<FusedCube<R, BT>>() {
        let LoraLinearInputs { x, weight, bias, adapter, residual, scale } = inputs.into_backend::<FusedCube<R, BT>>();
        let prim = |t: Tensor<FusedCube<R, BT>, 2>| -> Fused<R> { t.into_primitive().tensor() };
        let operands = Operands {
            x: prim(x),
            weight: prim(weight),
            bias: bias.map(|b: Tensor<FusedCube<R, BT>, 1>| b.into_primitive().tensor()),
            adapter: adapter.map(|(down, up)| (prim(down), prim(up))),
            residual: residual.map(prim),
        };
        let (y, _) = register_forward::<R, BT>(operands, scale, false);
        return Ok(downcast(tensor::<FusedCube<R, BT>, 2>(y)).expect("the backend was checked"));
    }
    if id == TypeId::of::<Autodiff<FusedCube<R, BT>, NoCheckpointing>>() {
        return autodiff::<B, R, BT, NoCheckpointing>(inputs);
    }
    if id == TypeId::of::<Autodiff<FusedCube<R, BT>, BalancedCheckpointing>>() {
        return autodiff::<B, R, BT, BalancedCheckpointing>(inputs);
    }
    Err(inputs)
}

/// Registers the op with autodiff over the parents `$nodes` (`[x, A, B, residual]`, the
/// adapter's and the residual's where present): tracked, with the state the backward pass
/// needs and `h` kept; untracked, the forward pass alone.
macro_rules! record {
    ($op:expr, $c:ty, $n:literal, $nodes:expr, $operands:expr, $scale:expr, $state:expr) => {
        match <LoraLinearBackward as Backward<FusedCube<R, BT>, $n>>::prepare::<$c>($op, $nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (y, h) = register_forward::<R, BT>($operands, $scale, true);
                prep.finish($state(h), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(register_forward::<R, BT>($operands, $scale, false).0),
        }
    };
}

/// The op on `Autodiff<FusedCube<R, BT>, C>` (which `B` must be) with a frozen base; the
/// inputs back for a tracked base weight or bias (a trainable or derived base, which the
/// composed ops differentiate).
fn autodiff<B: Backend, R: CubeRuntime, BT: BoolElement, C: CheckpointStrategy>(inputs: LoraLinearInputs<B>) -> Result<Tensor<B, 2>, LoraLinearInputs<B>> {
    type A<R, BT, C> = Autodiff<FusedCube<R, BT>, C>;
    let tracked = |t: &FloatTensor<A<R, BT, C>>| !t.node.requirement.is_none();
    // Clones for the check, dropped before the inputs are consumed.
    let base_tracked = {
        let weight: Tensor<A<R, BT, C>, 2> = downcast(inputs.weight.clone()).expect("the backend was checked");
        let bias: Option<Tensor<A<R, BT, C>, 1>> = same_backend(inputs.bias.clone());
        tracked(&weight.into_primitive().tensor()) || bias.is_some_and(|b| tracked(&b.into_primitive().tensor()))
    };
    if base_tracked {
        return Err(inputs);
    }
    let LoraLinearInputs { x, weight, bias, adapter, residual, scale } = inputs.into_backend::<A<R, BT, C>>();
    let prim = |t: Tensor<A<R, BT, C>, 2>| -> FloatTensor<A<R, BT, C>> { t.into_primitive().tensor() };
    let (x, weight) = (prim(x), prim(weight));
    let bias: Option<FloatTensor<A<R, BT, C>>> = bias.map(|b| b.into_primitive().tensor());
    let adapter = adapter.map(|(down, up)| (prim(down), prim(up)));
    let residual = residual.map(prim);
    let operands = Operands {
        x: x.primitive.clone(),
        weight: weight.primitive.clone(),
        bias: bias.map(|b| b.primitive),
        adapter: adapter.as_ref().map(|(down, up)| (down.primitive.clone(), up.primitive.clone())),
        residual: residual.as_ref().map(|r| r.primitive.clone()),
    };
    let state = |h: Option<Fused<R>>| LoraState {
        weight: weight.primitive.clone(),
        adapter: adapter.as_ref().map(|(down, up)| AdapterState {
            x: x.primitive.clone(),
            down: down.primitive.clone(),
            up: up.primitive.clone(),
            h: h.expect("h is kept with an adapter"),
        }),
    };
    let op = LoraLinearBackward { scale, adapter: adapter.is_some() };
    let out = match (&adapter, &residual) {
        (Some((down, up)), Some(r)) => record!(op, C, 4, [x.node.clone(), down.node.clone(), up.node.clone(), r.node.clone()], operands, scale, state),
        (Some((down, up)), None) => record!(op, C, 3, [x.node.clone(), down.node.clone(), up.node.clone()], operands, scale, state),
        (None, Some(r)) => record!(op, C, 2, [x.node.clone(), r.node.clone()], operands, scale, state),
        (None, None) => record!(op, C, 1, [x.node.clone()], operands, scale, state),
    };
    Ok(downcast(tensor::<A<R, BT, C>, 2>(out)).expect("the backend was checked"))
}

/// What the backward pass keeps: the frozen weight and, with an adapter, the input, the
/// adapter weights and `h = x·A`.
#[derive(Debug, Clone)]
struct LoraState<R: CubeRuntime> {
    weight: Fused<R>,
    adapter: Option<AdapterState<R>>,
}

/// The adapter's part of [`LoraState`].
#[derive(Debug, Clone)]
struct AdapterState<R: CubeRuntime> {
    x: Fused<R>,
    down: Fused<R>,
    up: Fused<R>,
    h: Fused<R>,
}

/// Backward of the op: parents `x`, then `A` and `B` with an adapter, then the residual
/// (whose gradient is the output's) when there is one.
#[derive(Debug)]
struct LoraLinearBackward {
    scale: f32,
    adapter: bool,
}

impl<R: CubeRuntime, BT: BoolElement, const N: usize> Backward<FusedCube<R, BT>, N> for LoraLinearBackward {
    type State = LoraState<R>;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let dy: Fused<R> = grads.consume::<FusedCube<R, BT>>(&ops.node);
        let parents = &ops.parents;
        let residual = if self.adapter { 3 } else { 1 };
        if let Some(Some(node)) = parents.get(residual) {
            grads.register::<FusedCube<R, BT>>(node.id, dy.clone());
        }
        let LoraState { weight, adapter } = ops.state;
        let Some(AdapterState { x, down, up, h }) = adapter else {
            // The base alone: `dx = dy·Wᵀ`, routed like any product.
            if let Some(node) = &parents[0] {
                let dx = super::matmul_transposed(tensor::<FusedCube<R, BT>, 2>(dy), tensor(weight), false, true);
                grads.register::<FusedCube<R, BT>>(node.id, dx.into_primitive().tensor());
            }
            return;
        };
        let (want_dx, want_params) = (parents[0].is_some(), parents[1].is_some() || parents[2].is_some());
        if !want_dx && !want_params {
            return;
        }
        let (dx, params) = register_backward::<R, BT>([x, weight, down, up, h, dy], self.scale, want_dx, want_params);
        if let (Some(node), Some(dx)) = (&parents[0], dx) {
            grads.register::<FusedCube<R, BT>>(node.id, dx);
        }
        if let Some((da, db)) = params {
            if let Some(node) = &parents[1] {
                grads.register::<FusedCube<R, BT>>(node.id, da);
            }
            if let Some(node) = &parents[2] {
                grads.register::<FusedCube<R, BT>>(node.id, db);
            }
        }
    }
}

#[cfg(all(test, feature = "wgpu-test"))]
mod tests {
    //! The ops on burn's wgpu backend (lavapipe without a GPU):
    //! `cargo test -p lora-core --release --features wgpu-test -- lora_linear`.
    use crate::kernels::tests::{check_fused_lora_linear, SWITCH};

    #[test]
    fn wgpu_fused_lora_linear_matches_composed_ops() {
        let _guard = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
        check_fused_lora_linear::<burn::backend::Autodiff<burn::backend::Wgpu>>(1e-4, burn::tensor::DType::F16, 2e-2);
    }
}
