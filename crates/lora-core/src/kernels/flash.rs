//! Flash attention on tensor cores: `softmax(q kᵀ · scale) v` and its gradients without
//! ever writing the `[queries, keys]` score matrix to memory.
//!
//! Three CubeCL kernels, all built from CubeCL's `cmma` tiles (`T × T × T` matrix products
//! of a plane: WMMA on CUDA's tensor cores, `VK_KHR_cooperative_matrix` on Vulkan) with
//! f32 accumulation, and inputs of one float dtype `E` (bf16 or f16 for tensor cores):
//!
//! - **forward** ([`forward`]): a cube owns `planes · T` queries, a plane `T` of them, in
//!   one sweep over the keys (FlashAttention-2's): per key block each row's maximum `m`
//!   (kept per row, the same in every lane of it), `P = exp(s − m)` cast to `E` into
//!   `P v`'s `cmma` accumulators, and each lane's share of the row sum `Σ P` in f32. When a
//!   block's maximum exceeds `m` by more than [`RESCALE_ABOVE`] the plane rescales its
//!   accumulators (opaque fragments: through shared memory and back) and moves `m`; lazily,
//!   as FlashAttention-3 does, so that most blocks rescale nothing. It writes the output
//!   divided by the row sums and the log-sum-exp `L = m + ln Σ P`, which the backward pass
//!   reuses.
//! - **backward, queries** ([`backward`], `dq`): the same cube layout; per key block
//!   `P = exp(q kᵀ s − L)`, `dP = do vᵀ`, `dS = P ∘ (dP − Δ)` with `Δ = rowsum(do ∘ o)`, and
//!   `dq += dS k · s`.
//! - **backward, keys** (`dk`, `dv`): a cube owns `planes · T` keys; per query block the
//!   transposed tiles `Pᵀ`, `dPᵀ`, `dSᵀ` give `dv += Pᵀ do` and `dk += dSᵀ q · s`.
//!
//! Splitting the backward pass by queries and by keys recomputes `q kᵀ` and `do vᵀ` once
//! more than FlashAttention-2 (which adds `dq` with atomics) but is deterministic and needs
//! no float atomics. Everything between the products (exponentials, the `dS` formula, the
//! casts to `E`) runs per lane on the products' tiles staged in shared memory, the way
//! CubeCL's own attention does with opaque `cmma` fragments. A plane's rows that stay fixed
//! for the whole kernel (`q` and `dO`, or `k` and `v`) stay in registers as fragments for
//! head dimensions up to 80 ([`holds_fragments`]), so those products load only their other
//! operand from shared memory.
//!
//! Inputs are `[batch, heads, seq, d]` operands of dtype `E` with any batch, head and row
//! strides ([`Layout`]; a row's `d` elements adjacent), so attention's head-split views
//! (`[b, s, h, d]` buffers seen as `[b, h, s, d]`) are read where they are; `d` is padded
//! with zeros to a multiple of `T` in shared memory, rows past the sequence are zeros and
//! their scores are masked. Outputs (`o`, `dq`, `dk`, `dv`) are rounded to `E` in the
//! kernels (accumulated in f32) and written in their inputs' layouts, so merging the heads
//! again is a view too; the log-sum-exp is f32 `[batch·heads, seq_q]`. [`plan`] picks `T`,
//! the plane count and the block lengths from the device's `cmma` shapes, plane size and
//! shared memory.

use std::marker::PhantomData;

use burn::tensor::backend::Backend;
use burn::tensor::{DType, Shape, Tensor};
use burn_cubecl::cubecl;
use burn_cubecl::fusion::FusionCubeRuntime;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};
use cubecl::prelude::*;
use cubecl::zspace::metadata::Metadata;

use crate::precision::cast_to;

/// A start value below any score (WGSL and SPIR-V have no infinity literal in CubeCL).
const LOWEST: f32 = -3.0e38;

/// How far (in the exponent) a block's row maximum may exceed the running one before the
/// forward pass rescales its accumulators: `P = exp(s − m)` then stays below e^8 ≈ 3000,
/// well inside bf16 and f16 (FlashAttention-3's lazy rescaling; the arithmetic is exact
/// either way, only the accumulators' scale differs).
const RESCALE_ABOVE: f32 = 8.0;

/// Alignment of the shared tiles in bytes: `cmma` loads and stores need 32 on CUDA.
const ALIGN: usize = 64;

/// Shared memory the kernels may use per cube by default. cubecl-cuda raises a kernel's
/// dynamic shared memory limit as needed (up to 227 KiB on an H100/H200), but 48 KiB keeps
/// four cubes (16 warps) resident per SM; larger blocks are a tuning option for the device
/// (`super::set_flash_shared_kib`).
const MAX_SHARED: usize = super::DEFAULT_FLASH_SHARED;

/// Largest grid extent along one axis on every runtime (wgpu's limit).
const MAX_GRID: usize = 65_535;

/// Copies `rows × dp` elements of a `[seq, d]` matrix whose rows start `row_stride` apart
/// (and whose `d` elements are adjacent), from row `row0` at `base`, into `tile` (row
/// stride `dp`), with zeros past `seq` rows and `d` columns. `src` is read `N` elements at
/// a time (16-byte loads on CUDA where the layout allows, see [`vector_width`]): `base`
/// and `row_stride` count vectors, and `N` divides `d` and `dp`.
#[cube]
#[allow(clippy::too_many_arguments)]
fn load_tile<E: Float, N: Size>(
    src: &Array<Vector<E, N>>,
    base: usize,
    row_stride: usize,
    row0: usize,
    seq: usize,
    d: usize,
    tile: &mut SharedMemory<E>,
    #[comptime] rows: usize,
    #[comptime] dp: usize,
) {
    let threads = CUBE_DIM as usize;
    let per_row = dp / N::value();
    let mut i = UNIT_POS as usize;
    while i < rows * per_row {
        let r = i / per_row;
        let c = i % per_row;
        let mut value = Vector::<E, N>::new(E::from_int(0));
        if row0 + r < seq && c * N::value() < d {
            value = src[base + (row0 + r) * row_stride + c];
        }
        let at = r * dp + c * N::value();
        #[unroll]
        for j in 0..N::value() {
            tile[at + j] = value[j];
        }
        i += threads;
    }
}

/// Reads this unit's share of a `rows × dp` tile (the elements [`load_tile`] would copy,
/// `threads` units sharing the work) into `regs`, without writing shared memory: the
/// loads of the next block are issued before the current block's products, and
/// [`store_tile`] moves them to shared memory once the products are done with it (register
/// double buffering; [`super::set_flash_prefetch`]).
#[cube]
#[allow(clippy::too_many_arguments)]
fn fetch_tile<E: Float, N: Size>(
    src: &Array<Vector<E, N>>,
    base: usize,
    row_stride: usize,
    row0: usize,
    seq: usize,
    d: usize,
    regs: &mut Array<Vector<E, N>>,
    #[comptime] rows: usize,
    #[comptime] dp: usize,
    #[comptime] threads: usize,
    #[comptime] vec: usize,
) {
    let per_row = comptime!(dp / vec);
    let count = comptime!((rows * per_row).div_ceil(threads));
    #[unroll]
    for j in 0..count {
        let i = UNIT_POS as usize + j * threads;
        let r = i / per_row;
        let c = i % per_row;
        let mut value = Vector::<E, N>::new(E::from_int(0));
        if i < rows * per_row && row0 + r < seq && c * vec < d {
            value = src[base + (row0 + r) * row_stride + c];
        }
        regs[j] = value;
    }
}

/// Writes what [`fetch_tile`] read into `tile` (row stride `dp`), as [`load_tile`] would.
#[cube]
#[allow(clippy::too_many_arguments)]
fn store_tile<E: Float, N: Size>(regs: &Array<Vector<E, N>>, tile: &mut SharedMemory<E>, #[comptime] rows: usize, #[comptime] dp: usize, #[comptime] threads: usize, #[comptime] vec: usize) {
    let per_row = comptime!(dp / vec);
    let count = comptime!((rows * per_row).div_ceil(threads));
    #[unroll]
    for j in 0..count {
        let i = UNIT_POS as usize + j * threads;
        if i < rows * per_row {
            let at = (i / per_row) * dp + (i % per_row) * vec;
            let value = regs[j];
            #[unroll]
            for e in 0..vec {
                tile[at + e] = value[e];
            }
        }
    }
}

/// [`fetch_tile`] for `rows` f32 row statistics from `base + row0` (zero past `seq`), as
/// [`load_rows`] would copy them.
#[cube]
fn fetch_rows(src: &Array<f32>, base: usize, row0: usize, seq: usize, regs: &mut Array<f32>, #[comptime] rows: usize, #[comptime] threads: usize) {
    let count = comptime!(rows.div_ceil(threads));
    #[unroll]
    for j in 0..count {
        let i = UNIT_POS as usize + j * threads;
        let mut value = 0.0f32;
        if i < rows && row0 + i < seq {
            value = src[base + row0 + i];
        }
        regs[j] = value;
    }
}

/// Writes what [`fetch_rows`] read into `dst`.
#[cube]
fn store_rows(regs: &Array<f32>, dst: &mut SharedMemory<f32>, #[comptime] rows: usize, #[comptime] threads: usize) {
    let count = comptime!(rows.div_ceil(threads));
    #[unroll]
    for j in 0..count {
        let i = UNIT_POS as usize + j * threads;
        if i < rows {
            dst[i] = regs[j];
        }
    }
}

/// Copies `rows` f32 row statistics from `base + row0`, zero past `seq`.
#[cube]
fn load_rows(src: &Array<f32>, base: usize, row0: usize, seq: usize, dst: &mut SharedMemory<f32>, #[comptime] rows: usize) {
    let threads = CUBE_DIM as usize;
    let mut i = UNIT_POS as usize;
    while i < rows {
        let mut value = 0.0f32;
        if row0 + i < seq {
            value = src[base + row0 + i];
        }
        dst[i] = value;
        i += threads;
    }
}

/// One plane's `out[T × n] = a[T × dp] · b[n × dp]ᵀ`: `a`'s rows from `a_off`, `b`'s rows
/// from row 0 (both with row stride `dp`), `out` row-major with row stride `n` from `out_off`.
/// `a`'s fragments are loaded once per call; [`product_held_abt`] takes them loaded.
#[cube]
#[allow(clippy::too_many_arguments)]
fn product_abt<E: Float>(
    a: &SharedMemory<E>,
    a_off: usize,
    b: &SharedMemory<E>,
    out: &mut SharedMemory<f32>,
    out_off: usize,
    #[comptime] n: usize,
    #[comptime] dp: usize,
    #[comptime] t: usize,
) {
    product_held_abt::<E>(&a_fragments::<E>(a, a_off, true, dp, t), b, out, out_off, n, dp, t);
}

/// Whether the kernels keep a plane's fixed operand rows (`q` and `dO` by queries, `k` and
/// `v` by keys) in registers as `cmma` fragments for the whole kernel instead of loading
/// them from shared memory for every product: up to 5 fragments per operand (head
/// dimensions up to 80 on CUDA's 16-wide tiles), where the registers stay well under
/// ptxas's cap (the key-major kernel at d = 160 already holds 20 accumulators).
fn holds_fragments(dp: usize, t: usize) -> bool {
    dp / t <= 5
}

/// A plane's `T × dp` rows of `a` (row stride `dp`, from `a_off`) as the `dp / T` `cmma` A
/// fragments of [`product_held_abt`]; none when `wanted` is false (a stand-in).
#[cube]
fn a_fragments<E: Float>(a: &SharedMemory<E>, a_off: usize, #[comptime] wanted: bool, #[comptime] dp: usize, #[comptime] t: usize) -> Sequence<cmma::Matrix<E>> {
    let span = (t - 1) * dp + t;
    let mut fragments = Sequence::<cmma::Matrix<E>>::new();
    #[unroll]
    for kk in 0..comptime!(if wanted { dp / t } else { 0 }) {
        let start = a_off + kk * t;
        fragments.push(cmma::Matrix::<E>::from_slice(
            cmma::MatrixIdent::A,
            t,
            t,
            t,
            cmma::MatrixLayout::RowMajor,
            &a.slice(start, start + span),
            dp as u32,
        ));
    }
    fragments
}

/// `out[T × n] = a · b[n × dp]ᵀ` for a plane whose `T × dp` rows of `a` are already in
/// fragments ([`a_fragments`]); `b` and `out` as in [`product_abt`].
#[cube]
fn product_held_abt<E: Float>(
    fa: &Sequence<cmma::Matrix<E>>,
    b: &SharedMemory<E>,
    out: &mut SharedMemory<f32>,
    out_off: usize,
    #[comptime] n: usize,
    #[comptime] dp: usize,
    #[comptime] t: usize,
) {
    let span = (t - 1) * dp + t;
    #[unroll]
    for j in 0..n / t {
        let acc = cmma::Matrix::<f32>::from_value(cmma::MatrixIdent::Accumulator, t, t, t, cmma::MatrixLayout::Undefined, 0.0);
        #[unroll]
        for kk in 0..dp / t {
            let b_start = j * t * dp + kk * t;
            let fb = cmma::Matrix::<E>::from_slice(
                cmma::MatrixIdent::B,
                t,
                t,
                t,
                cmma::MatrixLayout::ColMajor,
                &b.slice(b_start, b_start + span),
                dp as u32,
            );
            cmma::execute::<E, E, f32, f32>(fa.index(kk), &fb, &acc, &acc);
        }
        let o_start = out_off + j * t;
        cmma::store(&mut out.slice_mut(o_start, o_start + (t - 1) * n + t), &acc, n as u32, cmma::MatrixLayout::RowMajor);
    }
}

/// One plane's `acc[j] += a[T × k] · b[k × dp]` for the `dp / T` column tiles `j`: `a`
/// row-major with row stride `k` from `a_off`, `b` row-major with row stride `dp` from row 0.
/// Each fragment of `a` is loaded once and used for every column tile (the other loop
/// order loads it `dp / T` times, and shared memory, not the tensor cores, bounds `cmma`
/// products whose operands both come from it).
#[cube]
fn accumulate_ab<E: Float>(
    a: &SharedMemory<E>,
    a_off: usize,
    b: &SharedMemory<E>,
    acc: &Sequence<cmma::Matrix<f32>>,
    #[comptime] k: usize,
    #[comptime] dp: usize,
    #[comptime] t: usize,
) {
    let a_span = (t - 1) * k + t;
    let b_span = (t - 1) * dp + t;
    for kk in 0..k / t {
        let a_start = a_off + kk * t;
        let fa = cmma::Matrix::<E>::from_slice(
            cmma::MatrixIdent::A,
            t,
            t,
            t,
            cmma::MatrixLayout::RowMajor,
            &a.slice(a_start, a_start + a_span),
            k as u32,
        );
        #[unroll]
        for j in 0..dp / t {
            let b_start = kk * t * dp + j * t;
            let fb = cmma::Matrix::<E>::from_slice(
                cmma::MatrixIdent::B,
                t,
                t,
                t,
                cmma::MatrixLayout::RowMajor,
                &b.slice(b_start, b_start + b_span),
                dp as u32,
            );
            let c = acc.index(j);
            cmma::execute::<E, E, f32, f32>(&fa, &fb, c, c);
        }
    }
}

/// Orders the shared tiles between the lanes of a tile group: the plane (`sync_plane`), or
/// with `whole_cube` the cube, for layouts whose tile group spans several hardware planes
/// (the tests' two-lanes-per-row layout on 8-lane lavapipe; every plane runs the same
/// sequence of syncs, so a cube barrier is always valid, only slower).
#[cube]
fn sync_group(#[comptime] whole_cube: bool) {
    if whole_cube {
        sync_cube();
    } else {
        sync_plane();
    }
}

/// Where head `bh` starts in each operand, and each operand's row stride: the kernels'
/// `strides` hold every operand's batch, head and row strides in turn (see [`Layout`]), and
/// `heads` heads make a batch entry.
#[cube]
fn head_starts(strides: &Sequence<u32>, bh: usize, heads: u32) -> (Sequence<usize>, Sequence<usize>) {
    let (b, h) = (bh / heads as usize, bh % heads as usize);
    let mut bases = Sequence::<usize>::new();
    let mut rows = Sequence::<usize>::new();
    #[unroll]
    for i in 0..comptime!(strides.len() / 3) {
        bases.push(b * strides[3 * i] as usize + h * strides[3 * i + 1] as usize);
        rows.push(strides[3 * i + 2] as usize);
    }
    (bases, rows)
}

/// `dp / T` zeroed accumulators.
#[cube]
fn zero_accumulators(#[comptime] dp: usize, #[comptime] t: usize) -> Sequence<cmma::Matrix<f32>> {
    let mut acc = Sequence::<cmma::Matrix<f32>>::new();
    #[unroll]
    for _ in 0..dp / t {
        acc.push(cmma::Matrix::<f32>::from_value(cmma::MatrixIdent::Accumulator, t, t, t, cmma::MatrixLayout::Undefined, 0.0));
    }
    acc
}

/// Stores one accumulator tile row-major (row stride `n`) into the plane's staging region of
/// `stage` from `stage_off`, between barriers: the lanes' earlier reads of the region are
/// done before it is overwritten, and the tile is complete before they read it.
#[cube]
fn stage_tile(tile: &cmma::Matrix<f32>, stage: &mut SharedMemory<f32>, stage_off: usize, #[comptime] n: usize, #[comptime] t: usize, #[comptime] whole_cube: bool) {
    sync_group(whole_cube);
    cmma::store(&mut stage.slice_mut(stage_off, stage_off + (t - 1) * n + t), tile, n as u32, cmma::MatrixLayout::RowMajor);
    sync_group(whole_cube);
}

/// Writes a plane's accumulators (`T` rows from `row0`, `dp` columns) times `factor`,
/// rounded to `E`, to a `[seq, d]` output at `base` with rows `row_stride` apart, through
/// the plane's staging region of `stage` (`T` rows of stride `n`, `n ≥ T`): rows past `seq`
/// and columns past `d` are dropped. `row` / `sub` / `lanes_per_row` are the lane's place in the tile.
#[cube]
#[allow(clippy::too_many_arguments)]
fn write_accumulators<E: Float>(
    acc: &Sequence<cmma::Matrix<f32>>,
    stage: &mut SharedMemory<f32>,
    stage_off: usize,
    out: &mut Array<E>,
    base: usize,
    row_stride: usize,
    row0: usize,
    seq: usize,
    d: usize,
    factor: f32,
    row: usize,
    sub: usize,
    #[comptime] lanes_per_row: usize,
    #[comptime] n: usize,
    #[comptime] dp: usize,
    #[comptime] t: usize,
    #[comptime] whole_cube: bool,
) {
    #[unroll]
    for j in 0..dp / t {
        stage_tile(acc.index(j), stage, stage_off, n, t, whole_cube);
        let mut c = sub;
        while c < t {
            let col = j * t + c;
            if row0 + row < seq && col < d {
                out[base + (row0 + row) * row_stride + col] = E::cast_from(stage[stage_off + row * n + c] * factor);
            }
            c += lanes_per_row;
        }
    }
}

/// Multiplies a plane's accumulators row by row by `alpha` (each lane its own row `row`,
/// columns `sub, sub + lanes_per_row, …`) through the plane's staging region of `stage`
/// (`T` rows of stride `n`, `n ≥ T`): `cmma` accumulators are opaque, so each tile goes to
/// shared memory and back.
#[cube]
#[allow(clippy::too_many_arguments)]
fn rescale_accumulators(
    acc: &Sequence<cmma::Matrix<f32>>,
    stage: &mut SharedMemory<f32>,
    stage_off: usize,
    alpha: f32,
    row: usize,
    sub: usize,
    #[comptime] lanes_per_row: usize,
    #[comptime] n: usize,
    #[comptime] dp: usize,
    #[comptime] t: usize,
    #[comptime] whole_cube: bool,
) {
    #[unroll]
    for j in 0..dp / t {
        let tile = acc.index(j);
        stage_tile(tile, stage, stage_off, n, t, whole_cube);
        let mut c = sub;
        while c < t {
            let i = stage_off + row * n + c;
            stage[i] *= alpha;
            c += lanes_per_row;
        }
        sync_group(whole_cube);
        cmma::load_with_layout(tile, &stage.slice(stage_off, stage_off + (t - 1) * n + t), n as u32, cmma::MatrixLayout::RowMajor);
    }
}

/// The query-major kernel: the forward pass (`grad` false: writes `out = o` and `lse`), or
/// the backward pass's `dq` (`grad` true: reads `lse` and `delta`, writes `out = dq`).
/// Grid: `(ceil(seq_q / (planes·T)), batch·heads)`; cube: `planes · plane` units.
/// `strides` holds the batch, head and row strides of `q`, `k`, `v`, `dout` (in vectors of
/// `N` elements, as they are read) and `out` (in elements), in that order (see [`Layout`]);
/// `heads` is the number of heads per batch entry.
#[cube(launch)]
#[allow(clippy::too_many_arguments, unused_assignments)]
fn flash_rows<E: Float, N: Size>(
    q: &Array<Vector<E, N>>,
    k: &Array<Vector<E, N>>,
    v: &Array<Vector<E, N>>,
    dout: &Array<Vector<E, N>>,
    lse: &mut Array<f32>,
    delta: &Array<f32>,
    out: &mut Array<E>,
    seq_q: u32,
    seq_k: u32,
    head_dim: u32,
    heads: u32,
    strides: Sequence<u32>,
    scale: f32,
    #[comptime] t: usize,
    #[comptime] planes: usize,
    #[comptime] plane: usize,
    #[comptime] bk: usize,
    #[comptime] dp: usize,
    #[comptime] grad: bool,
    #[comptime] whole_cube: bool,
    #[comptime] prefetch: bool,
    #[comptime] vec: usize,
    #[define(E)] _dtype: StorageType,
) {
    let bq = planes * t;
    let lanes_per_row = plane / t;
    let (seq_q, seq_k, d) = (seq_q as usize, seq_k as usize, head_dim as usize);
    let bh = CUBE_POS_Y as usize;
    let q0 = CUBE_POS_X as usize * bq;
    let unit = UNIT_POS as usize;
    let w = unit / plane;
    let lane = unit % plane;
    let row = lane / lanes_per_row;
    let sub = lane % lanes_per_row;
    let my_row = w * t + row;
    // Operands in `strides` order: q, k, v, dO, out.
    let (base, rs) = head_starts(&strides, bh, heads);
    let region = w * t * bk;
    let blocks = seq_k.div_ceil(bk);

    let mut qs = SharedMemory::<E>::new_aligned(bq * dp, ALIGN);
    let mut ks = SharedMemory::<E>::new_aligned(bk * dp, ALIGN);
    let mut vs = SharedMemory::<E>::new_aligned(bk * dp, ALIGN);
    let mut sc = SharedMemory::<f32>::new_aligned(planes * t * bk, ALIGN);
    let mut pe = SharedMemory::<E>::new_aligned(planes * t * bk, ALIGN);
    // Only the gradient pass reads dO and its products; the forward pass gets stubs.
    let mut dos = SharedMemory::<E>::new_aligned(comptime!(if grad { bq * dp } else { t * t }), ALIGN);
    let mut dps = SharedMemory::<f32>::new_aligned(comptime!(if grad { planes * t * bk } else { t * t }), ALIGN);
    let mut row_stats = SharedMemory::<f32>::new(bq * 2);

    load_tile::<E, N>(q, base[0], rs[0], q0, seq_q, d, &mut qs, bq, dp);
    if grad {
        load_tile::<E, N>(dout, base[3], rs[3], q0, seq_q, d, &mut dos, bq, dp);
        let mut i = unit;
        while i < bq {
            let mut l = 0.0f32;
            let mut dl = 0.0f32;
            if q0 + i < seq_q {
                l = lse[bh * seq_q + q0 + i];
                dl = delta[bh * seq_q + q0 + i];
            }
            row_stats[i] = l;
            row_stats[bq + i] = dl;
            i += CUBE_DIM as usize;
        }
    }

    let mut my_lse = 0.0f32;
    let mut my_delta = 0.0f32;
    if grad {
        sync_cube();
        my_lse = row_stats[my_row];
        my_delta = row_stats[bq + my_row];
    }
    // The forward pass's running row statistics: the maximum `m` the exponentials are taken
    // against (the same in every lane of a row) and this lane's share of `Σ exp(s − m)`.
    let mut m = f32::new(LOWEST);
    let mut l = 0.0f32;
    // The lanes' partial statistics, and the cube's rescale vote.
    let mut stat = SharedMemory::<f32>::new(comptime!(if grad { 1 } else { planes * plane }));
    let mut vote = SharedMemory::<u32>::new(1usize);
    let row_lanes = w * plane + row * lanes_per_row;

    // The plane's `q` (and `dO`) rows as fragments, when they are held (see
    // `holds_fragments`); stand-ins otherwise.
    let hold = comptime!(holds_fragments(dp, t));
    sync_cube();
    let held_q = a_fragments::<E>(&qs, w * t * dp, hold, dp, t);
    let held_do = a_fragments::<E>(&dos, w * t * dp, comptime!(hold && grad), dp, t);

    // With `prefetch`, each block's K and V are read into registers during the block
    // before (the first before the loop) and only stored to shared memory at its start.
    let threads = planes * plane;
    let next_len = comptime!(if prefetch { (bk * (dp / vec)).div_ceil(threads) } else { 1 });
    let mut k_next = Array::<Vector<E, N>>::new(next_len);
    let mut v_next = Array::<Vector<E, N>>::new(next_len);
    if prefetch {
        fetch_tile::<E, N>(k, base[1], rs[1], 0, seq_k, d, &mut k_next, bk, dp, threads, vec);
        fetch_tile::<E, N>(v, base[2], rs[2], 0, seq_k, d, &mut v_next, bk, dp, threads, vec);
    }

    let acc = zero_accumulators(dp, t);
    for kb in 0..blocks {
        let k0 = kb * bk;
        sync_cube();
        if !grad && unit == 0usize {
            vote[0usize] = 0u32;
        }
        if prefetch {
            store_tile::<E, N>(&k_next, &mut ks, bk, dp, threads, vec);
            store_tile::<E, N>(&v_next, &mut vs, bk, dp, threads, vec);
        } else {
            load_tile::<E, N>(k, base[1], rs[1], k0, seq_k, d, &mut ks, bk, dp);
            load_tile::<E, N>(v, base[2], rs[2], k0, seq_k, d, &mut vs, bk, dp);
        }
        sync_cube();
        if prefetch && kb + 1 < blocks {
            fetch_tile::<E, N>(k, base[1], rs[1], k0 + bk, seq_k, d, &mut k_next, bk, dp, threads, vec);
            fetch_tile::<E, N>(v, base[2], rs[2], k0 + bk, seq_k, d, &mut v_next, bk, dp, threads, vec);
        }
        if hold {
            product_held_abt::<E>(&held_q, &ks, &mut sc, region, bk, dp, t);
            if grad {
                product_held_abt::<E>(&held_do, &vs, &mut dps, region, bk, dp, t);
            }
        } else {
            product_abt::<E>(&qs, w * t * dp, &ks, &mut sc, region, bk, dp, t);
            if grad {
                product_abt::<E>(&dos, w * t * dp, &vs, &mut dps, region, bk, dp, t);
            }
        }
        sync_group(whole_cube);
        let mut alpha = 1.0f32;
        if !grad {
            // The block's row maximum, from the lanes' partial maxima.
            let mut partial = f32::new(LOWEST);
            let mut c = sub;
            while c < bk {
                if k0 + c < seq_k {
                    let x = sc[region + row * bk + c] * scale;
                    if x > partial {
                        partial = x;
                    }
                }
                c += lanes_per_row;
            }
            stat[unit] = partial;
            sync_group(whole_cube);
            let mut block_max = f32::new(LOWEST);
            for i in 0..lanes_per_row {
                let mi = stat[row_lanes + i];
                if mi > block_max {
                    block_max = mi;
                }
            }
            // Lazy rescaling: the maximum moves only when the block's exceeds it by more than
            // `RESCALE_ABOVE`, so most blocks leave the accumulators alone (the exponentials
            // below then stay under e^RESCALE_ABOVE, well inside bf16/f16).
            if block_max > m + f32::new(RESCALE_ABOVE) {
                alpha = (m - block_max).exp();
                l *= alpha;
                m = block_max;
                // The first block's accumulators are still zero: nothing to rescale.
                if kb > 0 {
                    vote[0usize] = 1u32;
                }
            }
        }
        let mut c = sub;
        while c < bk {
            let i = region + row * bk + c;
            let mut p = 0.0f32;
            if k0 + c < seq_k {
                if grad {
                    p = (sc[i] * scale - my_lse).exp() * (dps[i] - my_delta);
                } else {
                    p = (sc[i] * scale - m).exp();
                    l += p;
                }
            }
            pe[i] = E::cast_from(p);
            c += lanes_per_row;
        }
        if grad {
            sync_group(whole_cube);
            accumulate_ab::<E>(&pe, region, &ks, &acc, bk, dp, t);
        } else {
            // The accumulators are a plane's together, and the rescale's barriers and `cmma`
            // operations need every unit of the cube to take the same branch (Vulkan drivers
            // such as lavapipe drop the writes of a cube whose planes diverge around
            // barriers): the whole cube rescales when any row needs it, the other rows by 1.
            sync_cube();
            if vote[0usize] != 0u32 {
                rescale_accumulators(&acc, &mut sc, region, alpha, row, sub, lanes_per_row, bk, dp, t, whole_cube);
            }
            accumulate_ab::<E>(&pe, region, &vs, &acc, bk, dp, t);
        }
    }
    let mut factor = scale;
    if !grad {
        // Each row's sum from its lanes' shares; the log-sum-exp for the backward pass.
        sync_cube();
        stat[unit] = l;
        sync_cube();
        let mut total = 0.0f32;
        for i in 0..lanes_per_row {
            total += stat[row_lanes + i];
        }
        if sub == 0 && q0 + my_row < seq_q {
            lse[bh * seq_q + q0 + my_row] = m + total.ln();
        }
        factor = 1.0f32 / total;
    }
    write_accumulators::<E>(&acc, &mut sc, region, out, base[4], rs[4], q0 + w * t, seq_q, d, factor, row, sub, lanes_per_row, bk, dp, t, whole_cube);
}

/// The key-major kernel of the backward pass: `dk` and `dv` for `planes · T` keys per cube.
/// Grid: `(ceil(seq_k / (planes·T)), batch·heads)`; cube: `planes · plane` units.
/// `strides` holds the batch, head and row strides of `q`, `k`, `v`, `dout` (in vectors of
/// `N` elements) and `dk`, `dv` (in elements).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn flash_keys<E: Float, N: Size>(
    q: &Array<Vector<E, N>>,
    k: &Array<Vector<E, N>>,
    v: &Array<Vector<E, N>>,
    dout: &Array<Vector<E, N>>,
    lse: &Array<f32>,
    delta: &Array<f32>,
    dk: &mut Array<E>,
    dv: &mut Array<E>,
    seq_q: u32,
    seq_k: u32,
    head_dim: u32,
    heads: u32,
    strides: Sequence<u32>,
    scale: f32,
    #[comptime] t: usize,
    #[comptime] planes: usize,
    #[comptime] plane: usize,
    #[comptime] bq: usize,
    #[comptime] dp: usize,
    #[comptime] whole_cube: bool,
    #[comptime] prefetch: bool,
    #[comptime] vec: usize,
    #[define(E)] _dtype: StorageType,
) {
    let bk = planes * t;
    let lanes_per_row = plane / t;
    let (seq_q, seq_k, d) = (seq_q as usize, seq_k as usize, head_dim as usize);
    let bh = CUBE_POS_Y as usize;
    let k0 = CUBE_POS_X as usize * bk;
    let unit = UNIT_POS as usize;
    let w = unit / plane;
    let lane = unit % plane;
    let row = lane / lanes_per_row;
    let sub = lane % lanes_per_row;
    let key_valid = k0 + w * t + row < seq_k;
    // Operands in `strides` order: q, k, v, dO, dk, dv.
    let (base, rs) = head_starts(&strides, bh, heads);
    let region = w * t * bq;

    let mut ks = SharedMemory::<E>::new_aligned(bk * dp, ALIGN);
    let mut vs = SharedMemory::<E>::new_aligned(bk * dp, ALIGN);
    let mut qs = SharedMemory::<E>::new_aligned(bq * dp, ALIGN);
    let mut dos = SharedMemory::<E>::new_aligned(bq * dp, ALIGN);
    let mut sc = SharedMemory::<f32>::new_aligned(planes * t * bq, ALIGN);
    let mut dps = SharedMemory::<f32>::new_aligned(planes * t * bq, ALIGN);
    let mut pe = SharedMemory::<E>::new_aligned(planes * t * bq, ALIGN);
    let mut lse_s = SharedMemory::<f32>::new(bq);
    let mut delta_s = SharedMemory::<f32>::new(bq);

    load_tile::<E, N>(k, base[1], rs[1], k0, seq_k, d, &mut ks, bk, dp);
    load_tile::<E, N>(v, base[2], rs[2], k0, seq_k, d, &mut vs, bk, dp);
    // The plane's `k` and `v` rows as fragments, when they are held.
    let hold = comptime!(holds_fragments(dp, t));
    sync_cube();
    let held_k = a_fragments::<E>(&ks, w * t * dp, hold, dp, t);
    let held_v = a_fragments::<E>(&vs, w * t * dp, hold, dp, t);
    // With `prefetch`, each query block's q, dO and row statistics are read into registers
    // during the block before (see `flash_rows`).
    let threads = planes * plane;
    let next_len = comptime!(if prefetch { (bq * (dp / vec)).div_ceil(threads) } else { 1 });
    let stats_len = comptime!(if prefetch { bq.div_ceil(threads) } else { 1 });
    let mut q_next = Array::<Vector<E, N>>::new(next_len);
    let mut do_next = Array::<Vector<E, N>>::new(next_len);
    let mut lse_next = Array::<f32>::new(stats_len);
    let mut delta_next = Array::<f32>::new(stats_len);
    if prefetch {
        fetch_tile::<E, N>(q, base[0], rs[0], 0, seq_q, d, &mut q_next, bq, dp, threads, vec);
        fetch_tile::<E, N>(dout, base[3], rs[3], 0, seq_q, d, &mut do_next, bq, dp, threads, vec);
        fetch_rows(lse, bh * seq_q, 0, seq_q, &mut lse_next, bq, threads);
        fetch_rows(delta, bh * seq_q, 0, seq_q, &mut delta_next, bq, threads);
    }
    let acc_dk = zero_accumulators(dp, t);
    let acc_dv = zero_accumulators(dp, t);
    let query_blocks = seq_q.div_ceil(bq);
    for qb in 0..query_blocks {
        let q0 = qb * bq;
        sync_cube();
        if prefetch {
            store_tile::<E, N>(&q_next, &mut qs, bq, dp, threads, vec);
            store_tile::<E, N>(&do_next, &mut dos, bq, dp, threads, vec);
            store_rows(&lse_next, &mut lse_s, bq, threads);
            store_rows(&delta_next, &mut delta_s, bq, threads);
        } else {
            load_tile::<E, N>(q, base[0], rs[0], q0, seq_q, d, &mut qs, bq, dp);
            load_tile::<E, N>(dout, base[3], rs[3], q0, seq_q, d, &mut dos, bq, dp);
            load_rows(lse, bh * seq_q, q0, seq_q, &mut lse_s, bq);
            load_rows(delta, bh * seq_q, q0, seq_q, &mut delta_s, bq);
        }
        sync_cube();
        if prefetch && qb + 1 < query_blocks {
            let q1 = q0 + bq;
            fetch_tile::<E, N>(q, base[0], rs[0], q1, seq_q, d, &mut q_next, bq, dp, threads, vec);
            fetch_tile::<E, N>(dout, base[3], rs[3], q1, seq_q, d, &mut do_next, bq, dp, threads, vec);
            fetch_rows(lse, bh * seq_q, q1, seq_q, &mut lse_next, bq, threads);
            fetch_rows(delta, bh * seq_q, q1, seq_q, &mut delta_next, bq, threads);
        }
        // Sᵀ = k qᵀ and dPᵀ = v doᵀ for the plane's keys.
        if hold {
            product_held_abt::<E>(&held_k, &qs, &mut sc, region, bq, dp, t);
            product_held_abt::<E>(&held_v, &dos, &mut dps, region, bq, dp, t);
        } else {
            product_abt::<E>(&ks, w * t * dp, &qs, &mut sc, region, bq, dp, t);
            product_abt::<E>(&vs, w * t * dp, &dos, &mut dps, region, bq, dp, t);
        }
        sync_group(whole_cube);
        let mut c = sub;
        while c < bq {
            let i = region + row * bq + c;
            let mut p = 0.0f32;
            if key_valid && q0 + c < seq_q {
                p = (sc[i] * scale - lse_s[c]).exp();
            }
            pe[i] = E::cast_from(p);
            sc[i] = p * (dps[i] - delta_s[c]);
            c += lanes_per_row;
        }
        sync_group(whole_cube);
        accumulate_ab::<E>(&pe, region, &dos, &acc_dv, bq, dp, t);
        sync_group(whole_cube);
        let mut c = sub;
        while c < bq {
            let i = region + row * bq + c;
            pe[i] = E::cast_from(sc[i]);
            c += lanes_per_row;
        }
        sync_group(whole_cube);
        accumulate_ab::<E>(&pe, region, &qs, &acc_dk, bq, dp, t);
    }
    write_accumulators::<E>(&acc_dk, &mut sc, region, dk, base[4], rs[4], k0 + w * t, seq_k, d, scale, row, sub, lanes_per_row, bq, dp, t, whole_cube);
    write_accumulators::<E>(&acc_dv, &mut sc, region, dv, base[5], rs[5], k0 + w * t, seq_k, d, 1.0, row, sub, lanes_per_row, bq, dp, t, whole_cube);
}

/// Units (one query row each) per cube of [`flash_delta`].
const DELTA_ROWS: usize = 128;

/// The backward pass's row statistic `Δ = rowsum(dO ∘ o)` in f32, `[batch·heads, seq]`
/// contiguous, from `dout` and the forward output `out` in their own layouts (read `N`
/// elements at a time; `strides` holds both operands' batch, head and row strides in
/// vectors). One unit per row: the row's `d / N` vectors are adjacent, so each unit reads
/// whole 16-byte words where the layout allows. Grid: `(ceil(seq / DELTA_ROWS),
/// batch·heads)`. It replaces four launches of burn's ops (two casts to f32, a product, a
/// sum) and their f32 intermediates, twice the size of `dO`.
#[cube(launch)]
fn flash_delta<E: Float, N: Size>(
    dout: &Array<Vector<E, N>>,
    out: &Array<Vector<E, N>>,
    delta: &mut Array<f32>,
    seq: u32,
    head_dim: u32,
    heads: u32,
    strides: Sequence<u32>,
    #[define(E)] _dtype: StorageType,
) {
    let seq = seq as usize;
    let bh = CUBE_POS_Y as usize;
    let r = CUBE_POS_X as usize * CUBE_DIM_X as usize + UNIT_POS_X as usize;
    if r < seq {
        let (base, rs) = head_starts(&strides, bh, heads);
        let (g0, o0) = (base[0] + r * rs[0], base[1] + r * rs[1]);
        let mut sum = 0.0f32;
        for c in 0..head_dim as usize / N::value() {
            let (g, o) = (dout[g0 + c], out[o0 + c]);
            #[unroll]
            for j in 0..N::value() {
                sum += f32::cast_from(g[j]) * f32::cast_from(o[j]);
            }
        }
        delta[bh * seq + r] = sum;
    }
}

/// Tile size, plane layout and block lengths for one problem on one device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Plan {
    /// `cmma` tile edge (`T × T × T` products).
    pub tile: usize,
    /// Units per plane (warp / subgroup).
    pub plane: usize,
    /// Planes per cube of the query-major backward kernel (`dq`).
    pub planes: usize,
    /// Keys per block of the query-major backward kernel.
    pub block_keys: usize,
    /// Planes per cube of the forward kernel: without the backward pass's tiles it fits
    /// larger blocks in the same shared memory.
    pub fwd_planes: usize,
    /// Keys per block of the forward kernel.
    pub fwd_block_keys: usize,
    /// Queries per block of the key-major kernel.
    pub block_queries: usize,
    /// Planes per cube of the key-major kernel.
    pub key_planes: usize,
    /// Head dimension padded to a multiple of `tile`.
    pub dp: usize,
    /// Tile groups of `plane` units span several hardware planes: order them with cube
    /// barriers (tests only; see `sync_group`).
    pub whole_cube: bool,
    /// Read each block's operands into registers during the block before (register double
    /// buffering: the loads' latency overlaps the products, for more registers per unit).
    pub prefetch: bool,
}

/// Shared bytes of [`flash_rows`] (`grad` or not) and of [`flash_keys`], `es` bytes per input element.
fn rows_bytes(t: usize, planes: usize, plane: usize, bk: usize, dp: usize, es: usize, grad: bool) -> usize {
    let bq = planes * t;
    let tiles = (bq + 2 * bk) * dp * es + planes * t * bk * (4 + es);
    let grad_tiles = if grad { bq * dp * es + planes * t * bk * 4 } else { t * t * (es + 4) };
    let stats = if grad { 0 } else { planes * plane * 4 + planes * 4 };
    tiles + grad_tiles + stats + 8 * bq + 8 * ALIGN
}

fn keys_bytes(t: usize, planes: usize, bq: usize, dp: usize, es: usize) -> usize {
    let bk = planes * t;
    (2 * bk + 2 * bq) * dp * es + planes * t * bq * (8 + es) + 8 * bq + 8 * ALIGN
}

/// Picks the kernels' layout: the largest `cmma` tile the device offers for `E × E → f32`
/// (16, else 8), one plane per `T` rows, and the largest blocks that fit in shared memory.
pub(super) fn plan<R: Runtime>(client: &ComputeClient<R>, dtype: StorageType, head_dim: usize) -> Result<Plan, String> {
    let props = client.properties();
    let f32_type = StorageType::Scalar(cubecl::ir::ElemType::Float(cubecl::ir::FloatKind::F32));
    let supports = |t: usize| {
        props.features.matmul.cmma.iter().any(|c| c.a_type == dtype && c.b_type == dtype && c.cd_type == f32_type && c.m as usize == t && c.n as usize == t && c.k as usize == t)
    };
    let tile = [16, 8].into_iter().find(|&t| supports(t)).ok_or_else(|| format!("flash attention: no {dtype:?} x {dtype:?} -> f32 cmma tile of 16 or 8 on this device"))?;
    let hw = &props.hardware;
    let plane = hw.plane_size_max as usize;
    if hw.plane_size_min != hw.plane_size_max || plane < tile || !plane.is_multiple_of(tile) {
        return Err(format!("flash attention: plane size {}..{} does not fit {tile}-row tiles", hw.plane_size_min, hw.plane_size_max));
    }
    let plan = layout(tile, plane, hw.max_units_per_cube as usize, hw.max_shared_memory_size.min(super::flash_shared_bytes()), head_dim, dtype.size())?;
    Ok(plan.with_prefetch(super::flash_prefetch_enabled()))
}

impl Plan {
    /// This plan with register double buffering on or off. It stays off where the kernels
    /// do not hold their fixed rows as fragments (head dimensions over 80 on CUDA): they
    /// already use most of their registers there, and ptxas spills the prefetched blocks.
    pub(super) fn with_prefetch(self, on: bool) -> Self {
        Self { prefetch: on && holds_fragments(self.dp, self.tile), ..self }
    }
}

/// [`plan`] once the device's tile, plane size, units per cube and shared memory are known.
fn layout(tile: usize, plane: usize, max_units: usize, limit: usize, head_dim: usize, es: usize) -> Result<Plan, String> {
    let dp = head_dim.div_ceil(tile) * tile;
    let fits_units = |planes: usize| planes * plane <= max_units;
    let candidates = [(4, 64), (4, 32), (2, 64), (2, 32), (4, 16), (2, 16), (1, 32), (1, 16), (1, 8)];
    let usable = |planes: usize, block: usize| block >= tile && block.is_multiple_of(tile) && fits_units(planes);
    let too_large = || format!("flash attention: head dimension {head_dim} does not fit in {limit} bytes of shared memory");
    let rows_fit = |grad: bool| candidates.into_iter().find(|&(p, b)| usable(p, b) && rows_bytes(tile, p, plane, b, dp, es, grad) <= limit);
    let (planes, block_keys) = rows_fit(true).ok_or_else(too_large)?;
    let (fwd_planes, fwd_block_keys) = rows_fit(false).ok_or_else(too_large)?;
    let (key_planes, block_queries) = candidates
        .into_iter()
        .find(|&(p, b)| usable(p, b) && keys_bytes(tile, p, b, dp, es) <= limit)
        .ok_or_else(too_large)?;
    Ok(Plan {
        tile,
        plane,
        planes,
        block_keys,
        fwd_planes,
        fwd_block_keys,
        block_queries,
        key_planes,
        dp,
        whole_cube: false,
        prefetch: false,
    })
}

/// Sizes of one attention problem: `batch·heads` independent heads of `seq_q` queries,
/// `seq_k` keys and head dimension `d`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Problem {
    /// `batch · heads`.
    pub heads: usize,
    /// Heads per batch entry (`heads` is a multiple).
    pub group: usize,
    /// Queries per head.
    pub seq_q: usize,
    /// Keys (and values) per head.
    pub seq_k: usize,
    /// Head dimension.
    pub d: usize,
    /// Score scale, usually `d^-0.5`.
    pub scale: f32,
}

impl Problem {
    /// Checks the sizes against the grid and index limits; the `u32` scalars.
    fn scalars(&self) -> Result<(u32, u32, u32), String> {
        let fail = |what: &str| Err(format!("flash attention: {what}"));
        if self.heads == 0 || self.seq_q == 0 || self.seq_k == 0 || self.d == 0 {
            return fail("empty problem");
        }
        if self.group == 0 || !self.heads.is_multiple_of(self.group) {
            return fail("batch·heads is not a multiple of the heads");
        }
        if self.heads > MAX_GRID {
            return fail("more than 65535 batch·heads");
        }
        let largest = self.heads.checked_mul(self.seq_q.max(self.seq_k)).and_then(|n| n.checked_mul(self.d));
        if largest.is_none_or(|n| u32::try_from(n).is_err()) {
            return fail("more than 2^32 elements");
        }
        Ok((self.seq_q as u32, self.seq_k as u32, self.d as u32))
    }
}

/// Array argument over `len` elements of `handle`.
///
/// # Safety
/// `handle` holds at least `len` elements of the kernel parameter's type.
unsafe fn arg<R: Runtime>(handle: &cubecl::server::Handle, len: usize) -> ArrayArg<R> {
    // SAFETY: the caller's contract.
    unsafe { ArrayArg::from_raw_parts(handle.clone(), len) }
}

/// Where the elements of a `[batch, heads, seq, d]` operand lie in its buffer: the strides of
/// its batch, head and row dimensions (a row's `d` elements are adjacent). Attention's
/// heads are split as a view (`[b, s, h, d]` seen as `[b, h, s, d]`), so the kernels read
/// that layout as it is and write each gradient in its input's layout: no copies on either
/// side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Layout {
    /// Batch, head and row strides, in elements.
    pub strides: [usize; 3],
}

impl Layout {
    /// A dense `[batch, heads, seq, d]` buffer.
    pub fn contiguous(heads: usize, seq: usize, d: usize) -> Self {
        Self { strides: [heads * seq * d, seq * d, d] }
    }

    /// Elements from the first to one past the last of an operand of `batch · group` heads
    /// of `seq` rows, or an error past the kernels' `u32` indexing.
    fn span(&self, problem: &Problem, seq: usize) -> Result<usize, String> {
        let [sb, sh, sr] = self.strides;
        let batch = problem.heads / problem.group;
        let last = [(batch - 1, sb), (problem.group - 1, sh), (seq - 1, sr)]
            .into_iter()
            .try_fold(problem.d, |acc, (n, stride)| n.checked_mul(stride).and_then(|x| acc.checked_add(x)));
        last.filter(|&n| u32::try_from(n).is_ok()).ok_or_else(|| "flash attention: an operand spans more than 2^32 elements".to_string())
    }
}

/// One `[batch, heads, seq, d]` operand of the kernels: its buffer and layout.
#[derive(Clone, Copy)]
pub(super) struct Operand<'a> {
    /// The buffer (from the operand's first element).
    pub handle: &'a cubecl::server::Handle,
    /// Its strides.
    pub layout: Layout,
}

impl Operand<'_> {
    /// The array argument over the operand's span (`seq` rows per head), in vectors of
    /// `width` elements (`width` divides the span: see [`vector_width`]).
    fn arg<R: Runtime>(&self, problem: &Problem, seq: usize, width: usize) -> Result<ArrayArg<R>, String> {
        let span = self.layout.span(problem, seq)?;
        // SAFETY: the caller of `forward` / `backward` guarantees the buffer covers the layout.
        Ok(unsafe { arg(self.handle, span / width) })
    }

    /// Whether the operand can be read `width` elements at a time: its strides and its
    /// start are multiples of the vector.
    fn reads_as(&self, width: usize, element_bytes: usize) -> bool {
        let start = self.handle.offset_start.unwrap_or(0);
        self.layout.strides.iter().all(|s| s.is_multiple_of(width)) && start.is_multiple_of((width * element_bytes) as u64)
    }
}

/// How many elements the kernels read from `q`, `k`, `v` and `dO` at a time: the widest
/// vector of at most 16 bytes that the runtime offers (CUDA: 8 bf16/f16, one 128-bit load;
/// CubeCL's wgpu runtime: 4) and that divides the head dimension, the tile and every
/// input's strides and start; 1 otherwise. A row of SD's heads (40, 64, 80 or 160
/// elements) then takes 5 to 20 loads instead of 40 to 160.
fn vector_width<R: Runtime>(client: &ComputeClient<R>, problem: &Problem, plan: &Plan, element_bytes: usize, inputs: &[Operand<'_>]) -> usize {
    client
        .io_optimized_vector_sizes(element_bytes)
        .filter(|&n| n * element_bytes <= 16 && problem.d.is_multiple_of(n) && plan.tile.is_multiple_of(n))
        .find(|&n| inputs.iter().all(|x| x.reads_as(n, element_bytes)))
        .unwrap_or(1)
}

/// The kernels' `strides` argument: the batch, head and row strides of the `inputs` (in
/// vectors of `width` elements, as the kernels read them) and then of the `outputs` (in
/// elements).
fn strides_arg<R: Runtime>(inputs: &[Layout], outputs: &[Layout], width: usize) -> Result<SequenceArg<R, u32>, String> {
    let mut seq = SequenceArg::new();
    let input_strides = inputs.iter().flat_map(|l| l.strides.map(|s| s / width));
    for stride in input_strides.chain(outputs.iter().flat_map(|l| l.strides)) {
        seq.push(u32::try_from(stride).map_err(|_| "flash attention: a stride over u32".to_string())?);
    }
    Ok(seq)
}

/// Queues the forward pass: `out = softmax(q kᵀ · scale) v` (in `dtype`) and the rows'
/// log-sum-exp `lse` (f32, contiguous `[heads, seq_q]`), for `q` `[heads, seq_q, d]` and `k`,
/// `v` `[heads, seq_k, d]` of `dtype` in their layouts; `out` is written in its own layout.
/// `plan` comes from [`plan`] for this device, dtype and head dimension.
#[allow(clippy::too_many_arguments)]
pub(super) fn forward<R: Runtime>(
    client: &ComputeClient<R>,
    problem: Problem,
    plan: Plan,
    dtype: StorageType,
    [q, k, v]: [Operand<'_>; 3],
    out: Operand<'_>,
    lse: &cubecl::server::Handle,
) -> Result<(), String> {
    let (seq_q, seq_k, d) = problem.scalars()?;
    let Problem { heads, scale, .. } = problem;
    let (sq, sk) = (problem.seq_q, problem.seq_k);
    let width = vector_width(client, &problem, &plan, dtype.size(), &[q, k, v]);
    let (aq, ak, av, aout) = (q.arg(&problem, sq, width)?, k.arg(&problem, sk, width)?, v.arg(&problem, sk, width)?, out.arg(&problem, sq, 1)?);
    // The forward pass reads neither dO nor Δ: small stand-ins of their own (dO's layout is
    // never used).
    let strides = strides_arg::<R>(&[q.layout, k.layout, v.layout, Layout { strides: [0; 3] }], &[out.layout], width)?;
    let stub_e = client.empty(ALIGN);
    let stub_f = client.empty(ALIGN);
    let count = CubeCount::Static(problem.seq_q.div_ceil(plan.fwd_planes * plan.tile) as u32, heads as u32, 1);
    let dim = CubeDim::new_1d((plan.fwd_planes * plan.plane) as u32);
    // SAFETY: the buffers hold the element counts given (the caller's contract; the stubs
    // are never read past their one element).
    unsafe {
        flash_rows::launch::<R>(
            client,
            count,
            dim,
            width,
            aq,
            ak,
            av,
            arg(&stub_e, 1),
            arg(lse, heads * problem.seq_q),
            arg(&stub_f, 1),
            aout,
            seq_q,
            seq_k,
            d,
            problem.group as u32,
            strides,
            scale,
            plan.tile,
            plan.fwd_planes,
            plan.plane,
            plan.fwd_block_keys,
            plan.dp,
            false,
            plan.whole_cube,
            plan.prefetch,
            width,
            dtype,
        );
    }
    Ok(())
}

/// Queues the backward pass: `dq`, `dk`, `dv` (in `dtype`, each in its own layout) from the
/// inputs, the output gradient `dout` (`dtype`, like `q`), the forward output `out` and the
/// forward pass's `lse` (f32, contiguous `[heads, seq_q]`). `delta` (f32, `heads · seq_q`
/// elements) is scratch: a first kernel writes `Δ = rowsum(dout ∘ out)` there for the other two.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward<R: Runtime>(
    client: &ComputeClient<R>,
    problem: Problem,
    plan: Plan,
    dtype: StorageType,
    [q, k, v, dout, out]: [Operand<'_>; 5],
    [lse, delta]: [&cubecl::server::Handle; 2],
    [dq, dk, dv]: [Operand<'_>; 3],
) -> Result<(), String> {
    let (seq_q, seq_k, d) = problem.scalars()?;
    let Problem { heads, scale, .. } = problem;
    let (sq, sk, rows) = (problem.seq_q, problem.seq_k, heads * problem.seq_q);
    let width = vector_width(client, &problem, &plan, dtype.size(), &[q, k, v, dout, out]);
    let delta_strides = strides_arg::<R>(&[dout.layout, out.layout], &[], width)?;
    let (gd, od) = (dout.arg::<R>(&problem, sq, width)?, out.arg::<R>(&problem, sq, width)?);
    // SAFETY: `dout` and `out` cover their layouts (the caller's contract) and `delta` holds
    // `rows` f32 values.
    unsafe {
        flash_delta::launch::<R>(
            client,
            CubeCount::Static(sq.div_ceil(DELTA_ROWS) as u32, heads as u32, 1),
            CubeDim::new_1d(DELTA_ROWS as u32),
            width,
            gd,
            od,
            arg(delta, rows),
            seq_q,
            d,
            problem.group as u32,
            delta_strides,
            dtype,
        );
    }
    let inputs = |r: &Problem| -> Result<_, String> { Ok((q.arg::<R>(r, sq, width)?, k.arg::<R>(r, sk, width)?, v.arg::<R>(r, sk, width)?, dout.arg::<R>(r, sq, width)?)) };
    let (q1, k1, v1, g1) = inputs(&problem)?;
    let (q2, k2, v2, g2) = inputs(&problem)?;
    let (adq, adk, adv) = (dq.arg(&problem, sq, 1)?, dk.arg(&problem, sk, 1)?, dv.arg(&problem, sk, 1)?);
    let input_layouts = [q.layout, k.layout, v.layout, dout.layout];
    let rows_strides = strides_arg::<R>(&input_layouts, &[dq.layout], width)?;
    let keys_strides = strides_arg::<R>(&input_layouts, &[dk.layout, dv.layout], width)?;
    let rows_count = CubeCount::Static(problem.seq_q.div_ceil(plan.planes * plan.tile) as u32, heads as u32, 1);
    let keys_count = CubeCount::Static(problem.seq_k.div_ceil(plan.key_planes * plan.tile) as u32, heads as u32, 1);
    // SAFETY: the buffers hold the element counts given (the caller's contract). `lse` is
    // bound mutably by the shared kernel but only read when `grad` is set.
    unsafe {
        flash_rows::launch::<R>(
            client,
            rows_count,
            CubeDim::new_1d((plan.planes * plan.plane) as u32),
            width,
            q1,
            k1,
            v1,
            g1,
            arg(lse, rows),
            arg(delta, rows),
            adq,
            seq_q,
            seq_k,
            d,
            problem.group as u32,
            rows_strides,
            scale,
            plan.tile,
            plan.planes,
            plan.plane,
            plan.block_keys,
            plan.dp,
            true,
            plan.whole_cube,
            plan.prefetch,
            width,
            dtype,
        );
        flash_keys::launch::<R>(
            client,
            keys_count,
            CubeDim::new_1d((plan.key_planes * plan.plane) as u32),
            width,
            q2,
            k2,
            v2,
            g2,
            arg(lse, rows),
            arg(delta, rows),
            adk,
            adv,
            seq_q,
            seq_k,
            d,
            problem.group as u32,
            keys_strides,
            scale,
            plan.tile,
            plan.key_planes,
            plan.plane,
            plan.block_queries,
            plan.dp,
            plan.whole_cube,
            plan.prefetch,
            width,
            dtype,
        );
    }
    Ok(())
}

/// `(softmax(q kᵀ · scale) v, logsumexp(q kᵀ · scale))` in burn's ops for `[b, h, s, d]`
/// tensors, computed in f32 (the output in `q`'s dtype, the log-sum-exp in f32): what the
/// kernels compute, for the ops' fallback.
pub(super) fn forward_math<X: Backend>(q: Tensor<X, 4>, k: Tensor<X, 4>, v: Tensor<X, 4>, scale: f32) -> (Tensor<X, 4>, Tensor<X, 3>) {
    let dtype = q.dtype();
    let f32 = |t: Tensor<X, 4>| cast_to(t, DType::F32);
    let s = f32(q).matmul(f32(k).swap_dims(2, 3)).mul_scalar(scale);
    let m = s.clone().max_dim(3);
    let lse = (s.clone() - m.clone()).exp().sum_dim(3).log() + m;
    let p = (s - lse.clone()).exp();
    (cast_to(p.matmul(f32(v)), dtype), lse.squeeze_dim(3))
}

/// Most f32 scores the ops' fallback holds at once (256 Mi elements, 1 GiB): the fallback
/// runs [`forward_math`] and [`backward_math`] over blocks of queries, so that a refused
/// pass at SD's 4096 tokens and batch 8 does not need the whole score matrix (4 GiB).
const FALLBACK_SCORES: usize = 1 << 28;

/// Query rows per block so that a block's scores stay within `max_scores`.
fn fallback_rows(dims: [usize; 4], s_kv: usize, max_scores: usize) -> usize {
    let [b, h, s_q, _] = dims;
    (max_scores / (b * h * s_kv).max(1)).clamp(1, s_q.max(1))
}

/// The `(start, len)` query blocks of [`fallback_rows`] rows.
fn query_blocks(s_q: usize, rows: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..s_q).step_by(rows.max(1)).map(move |start| (start, rows.min(s_q - start)))
}

/// [`forward_math`] over blocks of at most `max_scores` scores (the op's fallback).
pub(super) fn forward_math_in_blocks<X: Backend>(q: Tensor<X, 4>, k: Tensor<X, 4>, v: Tensor<X, 4>, scale: f32, max_scores: usize) -> (Tensor<X, 4>, Tensor<X, 3>) {
    let s_q = q.dims()[2];
    let rows = fallback_rows(q.dims(), k.dims()[2], max_scores);
    if rows >= s_q {
        return forward_math(q, k, v, scale);
    }
    let (outs, lses): (Vec<_>, Vec<_>) = query_blocks(s_q, rows).map(|(start, len)| forward_math(q.clone().narrow(2, start, len), k.clone(), v.clone(), scale)).unzip();
    (Tensor::cat(outs, 2), Tensor::cat(lses, 2))
}

/// [`backward_math`] over blocks of at most `max_scores` scores (the op's fallback): `dq`
/// per block of queries, `dk` and `dv` summed over the blocks in f32 and rounded once.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward_math_in_blocks<X: Backend>(
    q: Tensor<X, 4>,
    k: Tensor<X, 4>,
    v: Tensor<X, 4>,
    dout: Tensor<X, 4>,
    lse: Tensor<X, 3>,
    delta: Tensor<X, 3>,
    scale: f32,
    max_scores: usize,
) -> (Tensor<X, 4>, Tensor<X, 4>, Tensor<X, 4>) {
    let s_q = q.dims()[2];
    let rows = fallback_rows(q.dims(), k.dims()[2], max_scores);
    if rows >= s_q {
        return backward_math(q, k, v, dout, lse, delta, scale);
    }
    let dtype = q.dtype();
    let (mut dqs, mut dks, mut dvs) = (Vec::new(), Vec::new(), Vec::new());
    for (start, len) in query_blocks(s_q, rows) {
        let (rows4, rows3) = (|t: &Tensor<X, 4>| t.clone().narrow(2, start, len), |t: &Tensor<X, 3>| t.clone().narrow(2, start, len));
        let (dq, dk, dv) = backward_math_f32(rows4(&q), k.clone(), v.clone(), rows4(&dout), rows3(&lse), rows3(&delta), scale);
        dqs.push(cast_to(dq, dtype));
        dks.push(dk);
        dvs.push(dv);
    }
    let sum = |terms: Vec<Tensor<X, 4>>| cast_to(terms.into_iter().reduce(|a, b| a + b).expect("rows < s_q gives two blocks or more"), dtype);
    (Tensor::cat(dqs, 2), sum(dks), sum(dvs))
}

/// `Δ = rowsum(dout ∘ out)` in f32 (`[b, h, s]`) in burn's ops: what [`flash_delta`]
/// computes, for the ops' fallback.
pub(super) fn delta_math<X: Backend>(dout: Tensor<X, 4>, out: Tensor<X, 4>) -> Tensor<X, 3> {
    (cast_to(dout, DType::F32) * cast_to(out, DType::F32)).sum_dim(3).squeeze_dim::<3>(3)
}

/// The gradients `(dq, dk, dv)` of [`forward_math`] in burn's ops, from the forward pass's
/// log-sum-exp and `delta = rowsum(dout ∘ out)` (f32, `[b, h, s]`).
#[allow(clippy::too_many_arguments)]
pub(super) fn backward_math<X: Backend>(
    q: Tensor<X, 4>,
    k: Tensor<X, 4>,
    v: Tensor<X, 4>,
    dout: Tensor<X, 4>,
    lse: Tensor<X, 3>,
    delta: Tensor<X, 3>,
    scale: f32,
) -> (Tensor<X, 4>, Tensor<X, 4>, Tensor<X, 4>) {
    let dtype = q.dtype();
    let (dq, dk, dv) = backward_math_f32(q, k, v, dout, lse, delta, scale);
    (cast_to(dq, dtype), cast_to(dk, dtype), cast_to(dv, dtype))
}

/// [`backward_math`] with its gradients left in f32.
#[allow(clippy::too_many_arguments)]
fn backward_math_f32<X: Backend>(
    q: Tensor<X, 4>,
    k: Tensor<X, 4>,
    v: Tensor<X, 4>,
    dout: Tensor<X, 4>,
    lse: Tensor<X, 3>,
    delta: Tensor<X, 3>,
    scale: f32,
) -> (Tensor<X, 4>, Tensor<X, 4>, Tensor<X, 4>) {
    let f32 = |t: Tensor<X, 4>| cast_to(t, DType::F32);
    let (q, k, v, dout) = (f32(q), f32(k), f32(v), f32(dout));
    let p = (q.clone().matmul(k.clone().swap_dims(2, 3)).mul_scalar(scale) - lse.unsqueeze_dim(3)).exp();
    let dv = p.clone().swap_dims(2, 3).matmul(dout.clone());
    let ds = p * (dout.matmul(v.swap_dims(2, 3)) - delta.unsqueeze_dim(3));
    let dq = ds.clone().matmul(k).mul_scalar(scale);
    let dk = ds.swap_dims(2, 3).matmul(q).mul_scalar(scale);
    (dq, dk, dv)
}

type Inner<R, BT> = CubeBackend<R, f32, i32, BT>;

/// Which kernels a queued attention pass may run, decided when it is queued: burn-fusion
/// may execute it later, after the switches have changed. cuDNN is tried first, then the
/// flash kernels, each where the route has it; a pass that neither takes (or both refuse)
/// runs the same math in burn's ops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Route {
    /// cuDNN's fused attention ([`super::set_cudnn_attention`] on, the problem in its
    /// support surface).
    pub(super) cudnn: bool,
    /// The flash kernels ([`super::set_flash_attention`] on, the problem within their limits).
    pub(super) flash: bool,
}
type Fused<R> = FusionTensor<FusionCubeRuntime<R>>;

/// How the op's tensors are laid out: `q`, `k`, `v` (and the backward pass's `dO`, `O`
/// and gradients) as `[b, h, s, d]` heads, or as `[b·s, h·d]` rows of `batch` sequences
/// of `heads` heads each, which the op views as heads without a copy. In rows the caller's
/// head split and merge (a reshape and a transposition per tensor, each an operation of
/// burn's fusion stream, and their gradients) are not needed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Heads {
    /// `[b, h, s, d]` tensors.
    Split,
    /// `[b·s, h·d]` rows.
    Rows {
        /// Sequences (`b`).
        batch: usize,
        /// Heads (`h`).
        heads: usize,
    },
}

impl Heads {
    /// The log-sum-exp's shape `[b, h, s_q]` for a `q` of `shape`.
    fn lse_shape(self, shape: &Shape) -> Shape {
        let dims = shape.to_vec();
        match self {
            Heads::Split => Shape::new([dims[0], dims[1], dims[2]]),
            Heads::Rows { batch, heads } => Shape::new([batch, heads, dims[0] / batch]),
        }
    }

    /// `x` as `[b, h, s, d]` heads: itself, or its rows viewed as heads (no copy unless
    /// the rows' elements are not adjacent, see [`rowwise`]).
    pub(super) fn view<R: CubeRuntime>(self, x: CubeTensor<R>) -> CubeTensor<R> {
        let Heads::Rows { batch, heads } = self else {
            return x;
        };
        let x = rowwise(x);
        let ([rows, width], row_stride) = ([x.meta.shape()[0], x.meta.shape()[1]], x.meta.strides()[0]);
        let (seq, d) = (rows / batch, width / heads);
        let meta = Metadata::new([batch, heads, seq, d], [seq * row_stride, d, row_stride, 1]);
        CubeTensor::new(x.client, x.handle, meta, x.device, x.dtype)
    }

    /// A `[b, h, s, d]` result in the op's layout: itself, or back in `[b·s, h·d]` rows,
    /// without a copy when it is laid out as a head view of dense rows (as the kernels'
    /// outputs are for such inputs, see [`output_like`]), else copied into rows.
    pub(super) fn unview<R: CubeRuntime>(self, x: CubeTensor<R>) -> CubeTensor<R> {
        if self == Heads::Split {
            return x;
        }
        let (shape, strides) = (x.meta.shape().to_vec(), x.meta.strides().to_vec());
        let [b, h, s, d] = [shape[0], shape[1], shape[2], shape[3]];
        let rows = Shape::new([b * s, h * d]);
        // Each dimension of more than one element must step as in `[b, s, h, d]` rows.
        let dense = [(b, s * h * d), (h, d), (s, h * d), (d, 1)].iter().zip(&strides).all(|(&(n, want), &got)| n == 1 || got == want);
        if dense {
            return CubeTensor::new(x.client, x.handle, Metadata::new(rows, [h * d, 1]), x.device, x.dtype);
        }
        // `[b, s, h, d]` as a view of `x`, copied densely: those are the rows.
        let swapped = Metadata::new([b, s, h, d], [strides[0], strides[2], strides[1], strides[3]]);
        let copy = into_contiguous(CubeTensor::new(x.client, x.handle, swapped, x.device, x.dtype));
        CubeTensor::new(copy.client, copy.handle, Metadata::new(rows, [h * d, 1]), copy.device, copy.dtype)
    }
}

/// Queues the forward pass on the fusion stream of a CubeCL backend
/// (`Fusion<CubeBackend<R, f32, i32, BT>>`): `(out, lse)` for `[b, h, s, d]` inputs.
pub(super) fn register_forward<R: CubeRuntime, BT: BoolElement>(q: Fused<R>, k: Fused<R>, v: Fused<R>, scale: f32, route: Route, heads: Heads) -> (Fused<R>, Fused<R>) {
    let client = q.client.clone();
    let streams = OperationStreams::with_inputs([&q, &k, &v]);
    let out = TensorIr::uninit(client.create_empty_handle(), q.shape.clone(), q.dtype);
    let lse = TensorIr::uninit(client.create_empty_handle(), heads.lse_shape(&q.shape), DType::F32);
    let desc = CustomOpIr::new("sd_lora_flash_attention", &[q.into_ir(), k.into_ir(), v.into_ir()], &[out, lse]);
    let op = FlashForward::<R, BT> {
        desc: desc.clone(),
        scale,
        route,
        heads,
        _backend: PhantomData,
    };
    let [out, lse] = client.register(streams, OperationIr::Custom(desc), op).outputs();
    (out, lse)
}

/// Queues the backward pass: `(dq, dk, dv)` in the inputs' dtype, from the inputs, the
/// output gradient `dout`, the forward output `out` and its log-sum-exp `lse`.
pub(super) fn register_backward<R: CubeRuntime, BT: BoolElement>([q, k, v, dout, out]: [Fused<R>; 5], lse: Fused<R>, scale: f32, route: Route, heads: Heads) -> (Fused<R>, Fused<R>, Fused<R>) {
    let client = q.client.clone();
    let streams = OperationStreams::with_inputs([&q, &k, &v, &dout, &out, &lse]);
    let grad = |t: &Fused<R>| TensorIr::uninit(client.create_empty_handle(), t.shape.clone(), t.dtype);
    let outputs = [grad(&q), grad(&k), grad(&v)];
    let inputs = [q.into_ir(), k.into_ir(), v.into_ir(), dout.into_ir(), out.into_ir(), lse.into_ir()];
    let desc = CustomOpIr::new("sd_lora_flash_attention_backward", &inputs, &outputs);
    let op = FlashBackward::<R, BT> {
        desc: desc.clone(),
        scale,
        route,
        heads,
        _backend: PhantomData,
    };
    let [dq, dk, dv] = client.register(streams, OperationIr::Custom(desc), op).outputs();
    (dq, dk, dv)
}

/// One queued forward pass.
struct FlashForward<R, BT> {
    desc: CustomOpIr,
    scale: f32,
    route: Route,
    heads: Heads,
    _backend: PhantomData<fn() -> (R, BT)>,
}

/// One queued backward pass.
struct FlashBackward<R, BT> {
    desc: CustomOpIr,
    scale: f32,
    route: Route,
    heads: Heads,
    _backend: PhantomData<fn() -> (R, BT)>,
}

impl<R, BT> std::fmt::Debug for FlashForward<R, BT> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlashForward").field("desc", &self.desc).field("scale", &self.scale).field("route", &self.route).field("heads", &self.heads).finish()
    }
}

impl<R, BT> std::fmt::Debug for FlashBackward<R, BT> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FlashBackward").field("desc", &self.desc).field("scale", &self.scale).field("route", &self.route).field("heads", &self.heads).finish()
    }
}

/// `x`, or a contiguous copy of it unless its rows are dense (last stride 1): the kernels
/// take any batch, head and row strides ([`Layout`]).
pub(super) fn rowwise<R: CubeRuntime>(x: CubeTensor<R>) -> CubeTensor<R> {
    if x.meta.strides().last() == Some(&1) || x.meta.shape().to_vec().last() == Some(&1) {
        x
    } else {
        into_contiguous(x)
    }
}

/// `x`'s [`Layout`] (`x` is a `[b, h, s, d]` tensor with dense rows: [`rowwise`]).
fn layout_of<R: CubeRuntime>(x: &CubeTensor<R>) -> Layout {
    let strides = x.meta.strides().to_vec();
    Layout { strides: [strides[0], strides[1], strides[2]] }
}

/// Whether `x`'s elements fill its span without gaps or overlaps in some order of its
/// dimensions (a permuted contiguous tensor, such as a head-split view).
fn is_dense_permutation<R: CubeRuntime>(x: &CubeTensor<R>) -> bool {
    let (shape, strides) = (x.meta.shape().to_vec(), x.meta.strides().to_vec());
    // Dimensions of size 1 may carry any stride; the others, from the innermost out, must
    // each step over exactly the elements of the ones inside them.
    let mut dims: Vec<(usize, usize)> = shape.into_iter().zip(strides).filter(|(n, _)| *n != 1).collect();
    dims.sort_by_key(|&(_, stride)| stride);
    let mut next = 1;
    for (n, stride) in dims {
        if stride != next {
            return false;
        }
        next *= n;
    }
    true
}

/// A new tensor of `like`'s shape and `dtype`, laid out as `like` when that is a permuted
/// contiguous layout (so that a head-split view's gradient comes back in the same layout and
/// merging the heads again needs no copy), contiguous otherwise.
pub(super) fn output_like<R: CubeRuntime>(like: &CubeTensor<R>, dtype: DType) -> CubeTensor<R> {
    let shape = like.meta.shape().clone();
    let handle = like.client.empty(shape.num_elements() * dtype.size());
    if is_dense_permutation(like) {
        CubeTensor::new(like.client.clone(), handle, (*like.meta).clone(), like.device.clone(), dtype)
    } else {
        CubeTensor::new_contiguous(like.client.clone(), like.device.clone(), shape, handle, dtype)
    }
}

/// `x` as a kernel operand.
fn operand<R: CubeRuntime>(x: &CubeTensor<R>) -> Operand<'_> {
    Operand { handle: &x.handle, layout: layout_of(x) }
}

/// A contiguous f32 tensor of `shape` with a fresh buffer.
fn empty_f32<R: CubeRuntime>(like: &CubeTensor<R>, shape: Shape) -> CubeTensor<R> {
    let handle = like.client.empty(shape.num_elements() * 4);
    CubeTensor::new_contiguous(like.client.clone(), like.device.clone(), shape, handle, DType::F32)
}

/// The attention problem of `[b, h, s, d]` inputs `q` and `k`.
fn problem<R: CubeRuntime>(q: &CubeTensor<R>, k: &CubeTensor<R>, scale: f32) -> Problem {
    let (qd, kd) = (q.meta.shape().to_vec(), k.meta.shape().to_vec());
    Problem {
        heads: qd[0] * qd[1],
        group: qd[1],
        seq_q: qd[2],
        seq_k: kd[2],
        d: qd[3],
        scale,
    }
}

impl<R: CubeRuntime, BT: BoolElement> FlashForward<R, BT> {
    fn kernel(&self, q: CubeTensor<R>, k: CubeTensor<R>, v: CubeTensor<R>) -> Result<(CubeTensor<R>, CubeTensor<R>), String> {
        let (q, k, v) = (rowwise(q), rowwise(k), rowwise(v));
        if k.dtype != q.dtype || v.dtype != q.dtype {
            return Err(format!("flash attention: mixed input dtypes {:?}, {:?}, {:?}", q.dtype, k.dtype, v.dtype));
        }
        let problem = problem(&q, &k, self.scale);
        let dims = q.meta.shape().clone();
        let out = output_like(&q, q.dtype);
        let lse = empty_f32(&q, Shape::new([dims[0], dims[1], dims[2]]));
        let layout = plan(&q.client, q.dtype.into(), problem.d)?;
        forward(&q.client, problem, layout, q.dtype.into(), [operand(&q), operand(&k), operand(&v)], operand(&out), &lse.handle)?;
        Ok((out, lse))
    }
}

impl<R: CubeRuntime, BT: BoolElement> Operation<FusionCubeRuntime<R>> for FlashForward<R, BT> {
    fn execute(&self, handles: &mut HandleContainer<<FusionCubeRuntime<R> as FusionRuntime>::FusionHandle>) {
        let ([q, k, v], [out, lse]) = self.desc.as_fixed();
        let get = |h: &mut HandleContainer<_>, t: &TensorIr| h.get_float_tensor::<Inner<R, BT>>(t);
        let view = |t| self.heads.view(t);
        let (tq, tk, tv) = (view(get(handles, q)), view(get(handles, k)), view(get(handles, v)));
        let ours = || self.kernel(tq.clone(), tk.clone(), tv.clone());
        let (o, l) = match on_route(self.route, || cudnn_forward(&tq, &tk, &tv, self.scale), ours) {
            Some(result) => result,
            None => {
                let t = super::tensor::<Inner<R, BT>, 4>;
                let (o, l) = forward_math_in_blocks(t(tq), t(tk), t(tv), self.scale, FALLBACK_SCORES);
                (o.into_primitive().tensor(), l.into_primitive().tensor())
            }
        };
        handles.register_float_tensor::<Inner<R, BT>>(&out.id, self.heads.unview(o));
        handles.register_float_tensor::<Inner<R, BT>>(&lse.id, l);
    }
}

impl<R: CubeRuntime, BT: BoolElement> FlashBackward<R, BT> {
    #[allow(clippy::type_complexity)]
    fn kernel(&self, [q, k, v, dout, out]: [CubeTensor<R>; 5], lse: CubeTensor<R>) -> Result<(CubeTensor<R>, CubeTensor<R>, CubeTensor<R>), String> {
        let [q, k, v, dout, out] = [q, k, v, dout, out].map(rowwise);
        let lse = if lse.is_contiguous() { lse } else { into_contiguous(lse) };
        if [&k, &v, &dout, &out].iter().any(|t| t.dtype != q.dtype) || lse.dtype != DType::F32 {
            return Err(format!("flash attention backward: unexpected dtypes (q {:?}, dO {:?}, o {:?}, lse {:?})", q.dtype, dout.dtype, out.dtype, lse.dtype));
        }
        let problem = problem(&q, &k, self.scale);
        let (dq, dk, dv) = (output_like(&q, q.dtype), output_like(&k, q.dtype), output_like(&v, q.dtype));
        let delta = empty_f32(&q, lse.meta.shape().clone());
        let layout = plan(&q.client, q.dtype.into(), problem.d)?;
        let inputs = [operand(&q), operand(&k), operand(&v), operand(&dout), operand(&out)];
        backward(&q.client, problem, layout, q.dtype.into(), inputs, [&lse.handle, &delta.handle], [operand(&dq), operand(&dk), operand(&dv)])?;
        Ok((dq, dk, dv))
    }
}

impl<R: CubeRuntime, BT: BoolElement> Operation<FusionCubeRuntime<R>> for FlashBackward<R, BT> {
    fn execute(&self, handles: &mut HandleContainer<<FusionCubeRuntime<R> as FusionRuntime>::FusionHandle>) {
        let ([q, k, v, dout, out, lse], [dq, dk, dv]) = self.desc.as_fixed();
        let get = |h: &mut HandleContainer<_>, t: &TensorIr| h.get_float_tensor::<Inner<R, BT>>(t);
        let inputs = [get(handles, q), get(handles, k), get(handles, v), get(handles, dout), get(handles, out)].map(|t| self.heads.view(t));
        let lse = get(handles, lse);
        let ours = || self.kernel(inputs.clone(), lse.clone());
        let grads = match on_route(self.route, || cudnn_backward(&inputs, &lse, self.scale), ours) {
            Some(result) => result,
            None => {
                let [q, k, v, dout, out] = inputs.map(super::tensor::<Inner<R, BT>, 4>);
                let lse = super::tensor::<Inner<R, BT>, 3>(lse);
                let delta = delta_math(dout.clone(), out);
                let (a, b, c) = backward_math_in_blocks(q, k, v, dout, lse, delta, self.scale, FALLBACK_SCORES);
                (a.into_primitive().tensor(), b.into_primitive().tensor(), c.into_primitive().tensor())
            }
        };
        handles.register_float_tensor::<Inner<R, BT>>(&dq.id, self.heads.unview(grads.0));
        handles.register_float_tensor::<Inner<R, BT>>(&dk.id, self.heads.unview(grads.1));
        handles.register_float_tensor::<Inner<R, BT>>(&dv.id, self.heads.unview(grads.2));
    }
}

/// The result of the first of cuDNN (`cudnn`; `None` where the runtime is not CUDA) and the
/// flash kernels (`ours`) that `route` has and that runs, counting each success and each
/// refusal (a fallback); `None` when the pass is left to burn's ops.
fn on_route<T>(route: Route, cudnn: impl FnOnce() -> Option<Result<T, String>>, ours: impl FnOnce() -> Result<T, String>) -> Option<T> {
    if route.cudnn {
        match cudnn() {
            Some(Ok(result)) => {
                super::record_cudnn_attention();
                return Some(result);
            }
            Some(Err(reason)) => super::record_fallback(reason),
            None => {}
        }
    }
    if route.flash {
        match ours() {
            Ok(result) => {
                super::record_flash_attention();
                return Some(result);
            }
            Err(reason) => super::record_fallback(reason),
        }
    }
    None
}

/// `a` as a `B` when `A` is `B` (a CubeCL tensor of a generic runtime as a CUDA one and back).
#[cfg(feature = "cuda")]
fn recast<A: 'static, B: 'static>(a: A) -> Option<B> {
    (Box::new(a) as Box<dyn std::any::Any>).downcast::<B>().ok().map(|b| *b)
}

/// The forward pass in cuDNN ([`super::set_cudnn_attention`]; the op's [`Route`] says
/// whether to try) when `R` is CUDA; `None` otherwise.
#[cfg(feature = "cuda")]
#[allow(clippy::type_complexity)]
fn cudnn_forward<R: CubeRuntime>(q: &CubeTensor<R>, k: &CubeTensor<R>, v: &CubeTensor<R>, scale: f32) -> Option<Result<(CubeTensor<R>, CubeTensor<R>), String>> {
    type Cuda = CubeTensor<cubecl::cuda::CudaRuntime>;
    let (q, k, v): (Cuda, Cuda, Cuda) = (recast(q.clone())?, recast(k.clone())?, recast(v.clone())?);
    Some(super::cudnn_sdpa::forward(q, k, v, scale).and_then(|(o, l)| Ok((recast(o).ok_or("cuDNN attention: runtime mismatch")?, recast(l).ok_or("cuDNN attention: runtime mismatch")?))))
}

#[cfg(not(feature = "cuda"))]
#[allow(clippy::type_complexity)]
fn cudnn_forward<R: CubeRuntime>(_: &CubeTensor<R>, _: &CubeTensor<R>, _: &CubeTensor<R>, _: f32) -> Option<Result<(CubeTensor<R>, CubeTensor<R>), String>> {
    None
}

/// The backward pass in cuDNN, as [`cudnn_forward`].
#[cfg(feature = "cuda")]
#[allow(clippy::type_complexity)]
fn cudnn_backward<R: CubeRuntime>(inputs: &[CubeTensor<R>; 5], lse: &CubeTensor<R>, scale: f32) -> Option<Result<(CubeTensor<R>, CubeTensor<R>, CubeTensor<R>), String>> {
    type Cuda = CubeTensor<cubecl::cuda::CudaRuntime>;
    let [q, k, v, dout, out] = inputs.clone();
    let cast = |t: CubeTensor<R>| -> Option<Cuda> { recast(t) };
    let inputs = [cast(q)?, cast(k)?, cast(v)?, cast(dout)?, cast(out)?];
    let mismatch = "cuDNN attention: runtime mismatch";
    Some(
        super::cudnn_sdpa::backward(inputs, cast(lse.clone())?, scale)
            .and_then(|(a, b, c)| Ok((recast(a).ok_or(mismatch)?, recast(b).ok_or(mismatch)?, recast(c).ok_or(mismatch)?))),
    )
}

#[cfg(not(feature = "cuda"))]
#[allow(clippy::type_complexity)]
fn cudnn_backward<R: CubeRuntime>(_: &[CubeTensor<R>; 5], _: &CubeTensor<R>, _: f32) -> Option<Result<(CubeTensor<R>, CubeTensor<R>, CubeTensor<R>), String>> {
    None
}

#[cfg(all(test, feature = "vulkan-test"))]
mod tests {
    //! The kernels on CubeCL's wgpu runtime with its SPIR-V compiler, whose `cmma` is
    //! `VK_KHR_cooperative_matrix`: on a machine without a GPU, Mesa's lavapipe (>= 25.1,
    //! 8×8×8 f16 tiles, 8-lane subgroups) runs them on the CPU. f16 inputs against an f64
    //! reference computed here from the same f16 values.
    //! `cargo test -p lora-core --release --features vulkan-test -- flash`.

    use super::*;
    use burn::tensor::FloatDType;
    use cubecl::wgpu::{WgpuDevice, WgpuRuntime};
    use half::f16;

    fn f16_type() -> StorageType {
        StorageType::Scalar(cubecl::ir::ElemType::Float(cubecl::ir::FloatKind::F16))
    }

    /// Deterministic values in `[-amp, amp)`, rounded to f16.
    fn values(n: usize, seed: u32, amp: f32) -> Vec<f16> {
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(12_345);
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                f16::from_f32(((state % 20_000) as f32 / 10_000.0 - 1.0) * amp)
            })
            .collect()
    }

    fn upload(client: &ComputeClient<WgpuRuntime>, x: &[f16]) -> cubecl::server::Handle {
        let bytes: Vec<u8> = x.iter().flat_map(|v| v.to_le_bytes()).collect();
        client.create_from_slice(&bytes)
    }

    fn download(client: &ComputeClient<WgpuRuntime>, h: cubecl::server::Handle) -> Vec<f32> {
        client.read_one(h).expect("read back").chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    }

    fn download_f16(client: &ComputeClient<WgpuRuntime>, h: cubecl::server::Handle) -> Vec<f32> {
        client.read_one(h).expect("read back").chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
    }

    /// Where element `(bh, s, c)` of a logical `[batch·heads, seq, d]` operand lies in a
    /// buffer of `layout`.
    fn position(layout: Layout, group: usize, bh: usize, s: usize, c: usize) -> usize {
        let [sb, sh, sr] = layout.strides;
        (bh / group) * sb + (bh % group) * sh + s * sr + c
    }

    /// The operand layout of a test: dense, or heads split from `[b, s, h, d]` rows.
    fn test_layout(p: &Problem, seq: usize, split: bool) -> Layout {
        if split {
            Layout { strides: [seq * p.group * p.d, p.d, p.group * p.d] }
        } else {
            Layout::contiguous(p.group, seq, p.d)
        }
    }

    /// Logical `[batch·heads, seq, d]` values laid out in `layout`.
    fn scatter_to(x: &[f16], p: &Problem, seq: usize, layout: Layout) -> Vec<f16> {
        let mut out = vec![f16::ZERO; x.len()];
        for bh in 0..p.heads {
            for s in 0..seq {
                for c in 0..p.d {
                    out[position(layout, p.group, bh, s, c)] = x[(bh * seq + s) * p.d + c];
                }
            }
        }
        out
    }

    /// A buffer in `layout` read back in logical order.
    fn gather_from(x: &[f32], p: &Problem, seq: usize, layout: Layout) -> Vec<f32> {
        let mut out = Vec::with_capacity(x.len());
        for bh in 0..p.heads {
            for s in 0..seq {
                for c in 0..p.d {
                    out.push(x[position(layout, p.group, bh, s, c)]);
                }
            }
        }
        out
    }

    /// The f64 reference: output, log-sum-exp, and the gradients for `dout`.
    #[allow(clippy::type_complexity)]
    fn reference(p: Problem, q: &[f64], k: &[f64], v: &[f64], dout: &[f64]) -> (Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>, Vec<f64>) {
        let (sq, sk, d) = (p.seq_q, p.seq_k, p.d);
        let scale = f64::from(p.scale);
        let mut out = vec![0.0; p.heads * sq * d];
        let mut lse = vec![0.0; p.heads * sq];
        let (mut dq, mut dk, mut dv) = (vec![0.0; out.len()], vec![0.0; p.heads * sk * d], vec![0.0; p.heads * sk * d]);
        for h in 0..p.heads {
            let (qh, kh) = (h * sq * d, h * sk * d);
            for i in 0..sq {
                let s: Vec<f64> = (0..sk).map(|j| (0..d).map(|c| q[qh + i * d + c] * k[kh + j * d + c]).sum::<f64>() * scale).collect();
                let m = s.iter().copied().fold(f64::MIN, f64::max);
                let l = m + s.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
                lse[h * sq + i] = l;
                let prob: Vec<f64> = s.iter().map(|x| (x - l).exp()).collect();
                for c in 0..d {
                    out[qh + i * d + c] = (0..sk).map(|j| prob[j] * v[kh + j * d + c]).sum();
                }
                let row = |t: &[f64], j: usize| (0..d).map(|c| dout[qh + i * d + c] * t[kh + j * d + c]).sum::<f64>();
                let delta: f64 = (0..d).map(|c| dout[qh + i * d + c] * out[qh + i * d + c]).sum();
                for j in 0..sk {
                    let ds = prob[j] * (row(v, j) - delta);
                    for c in 0..d {
                        dv[kh + j * d + c] += prob[j] * dout[qh + i * d + c];
                        dq[qh + i * d + c] += ds * k[kh + j * d + c] * scale;
                        dk[kh + j * d + c] += ds * q[qh + i * d + c] * scale;
                    }
                }
            }
        }
        (out, lse, dq, dk, dv)
    }

    fn assert_close(what: &str, got: &[f32], want: &[f64], tolerance: f64) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        let peak = want.iter().fold(0.0f64, |a, b| a.max(b.abs())).max(1e-6);
        let worst = got.iter().zip(want).map(|(g, w)| (f64::from(*g) - w).abs() / peak).fold(0.0, f64::max);
        eprintln!("{what}: worst error {worst:.2e} of the peak {peak:.3}");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            let err = (f64::from(*g) - w).abs() / peak;
            assert!(err <= tolerance, "{what}[{i}]: {g} vs {w} (relative to the peak {peak}: {err})");
        }
    }

    /// `wide`: tile groups of two hardware planes (16 lanes for 8-row tiles), i.e. two
    /// lanes per tile row as on CUDA's 32-lane warps with 16-row tiles, ordered by cube
    /// barriers. `split`: every operand (inputs and outputs) in the head-split layout of
    /// attention (`[b, s, h, d]` buffers).
    fn run(p: Problem, seed: u32, wide: bool, split: bool) {
        run_growing(p, seed, wide, split, 0.0);
    }

    /// [`run`] with key `j` scaled by `1 + growth · j`: scores whose row maxima keep rising
    /// along the keys, so that the forward pass rescales its accumulators block after block.
    fn run_growing(p: Problem, seed: u32, wide: bool, split: bool, growth: f32) {
        let client = WgpuRuntime::client(&WgpuDevice::default());
        let mut layout = plan(&client, f16_type(), p.d).expect("plan");
        if wide {
            layout = Plan {
                plane: 2 * layout.plane,
                whole_cube: true,
                ..layout
            };
        }
        // Loads straight to shared memory, and through registers a block ahead.
        for prefetch in [false, true] {
            check_plan(&client, p, layout.with_prefetch(prefetch), seed, split, growth);
        }
    }

    /// [`run_growing`] with one plan.
    fn check_plan(client: &ComputeClient<WgpuRuntime>, p: Problem, layout: Plan, seed: u32, split: bool, growth: f32) {
        let client = client.clone();
        let (nq, nk) = (p.heads * p.seq_q * p.d, p.heads * p.seq_k * p.d);
        let (q, mut k, v, dout) = (values(nq, seed, 2.0), values(nk, seed + 1, 2.0), values(nk, seed + 2, 1.0), values(nq, seed + 3, 1.0));
        for (i, x) in k.iter_mut().enumerate() {
            let j = (i / p.d) % p.seq_k;
            *x = f16::from_f32(x.to_f32() * (1.0 + growth * j as f32));
        }
        let wide = |x: &[f16]| x.iter().map(|v| f64::from(v.to_f32())).collect::<Vec<_>>();
        let (out_ref, lse_ref, dq_ref, dk_ref, dv_ref) = reference(p, &wide(&q), &wide(&k), &wide(&v), &wide(&dout));
        let (lq, lk) = (test_layout(&p, p.seq_q, split), test_layout(&p, p.seq_k, split));
        let (hq, hk) = (upload(&client, &scatter_to(&q, &p, p.seq_q, lq)), upload(&client, &scatter_to(&k, &p, p.seq_k, lk)));
        let (hv, hdo) = (upload(&client, &scatter_to(&v, &p, p.seq_k, lk)), upload(&client, &scatter_to(&dout, &p, p.seq_q, lq)));
        let (out, lse) = (client.empty(2 * nq), client.empty(4 * p.heads * p.seq_q));
        let op = |handle| Operand { handle, layout: lq };
        let kop = |handle| Operand { handle, layout: lk };
        forward(&client, p, layout, f16_type(), [op(&hq), kop(&hk), kop(&hv)], op(&out), &lse).expect("forward");
        let out_got = gather_from(&download_f16(&client, out.clone()), &p, p.seq_q, lq);
        assert_close("out", &out_got, &out_ref, 2e-3);
        let lse_got = download(&client, lse.clone());
        for (i, (g, w)) in lse_got.iter().zip(&lse_ref).enumerate() {
            assert!((f64::from(*g) - w).abs() < 1e-2 * w.abs().max(1.0), "lse[{i}]: {g} vs {w}");
        }
        let hdelta = client.empty(4 * p.heads * p.seq_q);
        let (dq, dk, dv) = (client.empty(2 * nq), client.empty(2 * nk), client.empty(2 * nk));
        backward(&client, p, layout, f16_type(), [op(&hq), kop(&hk), kop(&hv), op(&hdo), op(&out)], [&lse, &hdelta], [op(&dq), kop(&dk), kop(&dv)]).expect("backward");
        // Δ = rowsum(dO ∘ o) as the backward pass's first kernel wrote it, against the same
        // f16 values summed here.
        let delta: Vec<f32> = out_got.chunks(p.d).zip(dout.chunks(p.d)).map(|(o, g)| o.iter().zip(g).map(|(a, b)| a * b.to_f32()).sum()).collect();
        for (i, (g, w)) in download(&client, hdelta).iter().zip(&delta).enumerate() {
            assert!((g - w).abs() < 1e-4 * w.abs().max(1.0), "delta[{i}]: {g} vs {w}");
        }
        // With growing keys the scores reach ~100 and `dk` (whose peak is then small next to
        // `dq`'s) carries the f16 rounding of `dS` at a larger share: 2.3e-3 of its peak.
        let grad_tolerance = if growth > 0.0 { 4e-3 } else { 2e-3 };
        assert_close("dq", &gather_from(&download_f16(&client, dq), &p, p.seq_q, lq), &dq_ref, grad_tolerance);
        assert_close("dk", &gather_from(&download_f16(&client, dk), &p, p.seq_k, lk), &dk_ref, grad_tolerance);
        assert_close("dv", &gather_from(&download_f16(&client, dv), &p, p.seq_k, lk), &dv_ref, grad_tolerance);
    }

    #[test]
    fn vulkan_flash_attention_matches_the_reference() {
        // Sequences that are not multiples of the blocks, a head dimension that is not a
        // multiple of the tile (padded), cross-attention-like key counts, and one row; head
        // dimensions read 4 (20, 40, 8, 24), 2 (18) and 1 (13) elements at a time.
        let cases = [(2, 37, 45, 20), (3, 64, 77, 40), (1, 1, 9, 8), (2, 70, 16, 24), (2, 9, 10, 18), (1, 6, 5, 13)];
        for (i, (heads, seq_q, seq_k, d)) in cases.into_iter().enumerate() {
            let scale = (d as f32).powf(-0.5);
            run(Problem { heads, group: heads, seq_q, seq_k, d, scale }, 11 * i as u32 + 1, false, false);
        }
    }

    /// Row maxima that rise by more than `RESCALE_ABOVE` from block to block: the forward
    /// pass's rescaling of its accumulators (checked to fail when the rescale is skipped),
    /// with one and two lanes per row.
    #[test]
    fn vulkan_flash_attention_rescales_rising_maxima() {
        let client = WgpuRuntime::client(&WgpuDevice::default());
        // The forward pass rescales per block of its own keys.
        let block = plan(&client, f16_type(), 16).expect("plan").fwd_block_keys;
        for (i, wide) in [false, true].into_iter().enumerate() {
            let (seq_q, seq_k, d) = (21, 5 * block + 3, 16);
            let scale = (d as f32).powf(-0.5);
            run_growing(Problem { heads: 2, group: 2, seq_q, seq_k, d, scale }, 3 * i as u32 + 4, wide, false, 8.0 / block as f32);
        }
    }

    /// Every operand in attention's head-split layout (`[b, s, h, d]` buffers read and
    /// written through their strides), batches of several heads.
    #[test]
    fn vulkan_flash_attention_reads_and_writes_head_split_layouts() {
        for (i, (batch, group, seq_q, seq_k, d)) in [(2, 3, 37, 45, 20), (1, 2, 64, 77, 40), (3, 1, 5, 9, 8), (1, 2, 9, 10, 18)].into_iter().enumerate() {
            let scale = (d as f32).powf(-0.5);
            run(Problem { heads: batch * group, group, seq_q, seq_k, d, scale }, 5 * i as u32 + 2, false, true);
        }
    }

    /// Two lanes per tile row, as on CUDA (32-lane warps, 16-row tiles): each lane keeps the
    /// row statistics of half the columns, combined in shared memory by the forward pass.
    #[test]
    fn vulkan_flash_attention_with_two_lanes_per_row() {
        for (i, (heads, seq_q, seq_k, d)) in [(2, 37, 45, 20), (1, 9, 77, 40), (1, 1, 3, 8)].into_iter().enumerate() {
            let scale = (d as f32).powf(-0.5);
            run(Problem { heads, group: if i == 0 { 2 } else { 1 }, seq_q, seq_k, d, scale }, 7 * i as u32 + 3, true, i == 0);
        }
    }

    /// The ops on burn's fusion stream (`burn::backend::Wgpu`, f16), between fused
    /// elementwise ops, with transposed (strided) inputs, against the same math in burn's ops.
    #[test]
    fn vulkan_flash_fusion_ops_match_burn_ops() {
        use burn::tensor::{Distribution, Tensor};
        type W = burn::backend::Wgpu;
        let device = Default::default();
        let half = |t: Tensor<W, 4>| t.cast(FloatDType::F16);
        // [b, s, h, d] viewed as [b, h, s, d], as attention's heads are split.
        let input = |s: usize, seed: f64| half(Tensor::<W, 4>::random([2, s, 3, 20], Distribution::Normal(seed, 1.0), &device)).swap_dims(1, 2);
        let (q, k, v, g) = (input(37, 0.1), input(45, -0.1), input(45, 0.0), input(37, 0.2));
        let scale = 20f32.powf(-0.5);
        let before = super::super::vendor_stats();
        super::super::set_flash_attention(true);
        let (out, lse) = super::super::flash_attention(q.clone() * 1.0, k.clone(), v.clone(), scale).expect("flash forward on wgpu");
        let grads = super::super::flash_attention_backward(q.clone(), k.clone(), v.clone(), out.clone(), g.clone() + 0.0, lse.clone(), scale).expect("flash backward on wgpu");
        super::super::set_flash_attention(false);
        let (out_ref, lse_ref) = forward_math(q.clone(), k.clone(), v.clone(), scale);
        let delta = delta_math(g.clone(), out_ref.clone());
        let (dq, dk, dv) = backward_math(q, k, v, g, lse_ref.clone(), delta, scale);
        let close = |what: &str, a: Tensor<W, 4>, b: Tensor<W, 4>| {
            let (a, b) = (a.cast(FloatDType::F32), b.cast(FloatDType::F32));
            let peak: f32 = b.clone().abs().max().into_scalar();
            let err: f32 = (a - b).abs().max().into_scalar();
            assert!(err <= 4e-3 * peak, "{what}: error {err} of the peak {peak}");
        };
        close("out", out, out_ref);
        let lse_err: f32 = (lse - lse_ref).abs().max().into_scalar();
        assert!(lse_err < 1e-3, "lse error {lse_err}");
        close("dq", grads.0, dq);
        close("dk", grads.1, dk);
        close("dv", grads.2, dv);
        let after = super::super::vendor_stats();
        assert_eq!(after.fallbacks, before.fallbacks, "fallbacks: {:?}", after.last_error);
        assert_eq!(after.flash_attention_calls - before.flash_attention_calls, 2);
    }

    /// The ops on rows (`flash_attention_rows`, `flash_attention_backward_rows`) against the
    /// same ops on the head-split views of those rows: dense rows (outputs written in rows
    /// with no copy), and rows of a wider tensor (as `q` of a fused projection would be:
    /// the row stride is not the width, so the outputs are copied into rows).
    #[test]
    fn vulkan_flash_fusion_ops_on_rows_match_head_split_ops() {
        use super::super::{flash_attention_backward_rows, flash_attention_rows, AttentionRowsBackward};
        use burn::tensor::{Distribution, Tensor};
        type W = burn::backend::Wgpu;
        let device = Default::default();
        let (batch, heads, d) = (2, 3, 20);
        let rows = |s: usize, seed: f64, wide: bool| {
            let width = if wide { heads * d + 8 } else { heads * d };
            let t = Tensor::<W, 2>::random([batch * s, width], Distribution::Normal(seed, 1.0), &device).cast(FloatDType::F16);
            if wide { t.narrow(1, 4, heads * d) } else { t }
        };
        let split = |t: Tensor<W, 2>| {
            let s = t.dims()[0] / batch;
            t.reshape([batch, s, heads, d]).swap_dims(1, 2)
        };
        let merge = |t: Tensor<W, 4>| {
            let [b, h, s, d] = t.dims();
            t.swap_dims(1, 2).reshape([b * s, h * d])
        };
        let close = |what: &str, a: Tensor<W, 2>, b: Tensor<W, 2>| {
            let (a, b) = (a.cast(FloatDType::F32), b.cast(FloatDType::F32));
            let peak: f32 = b.clone().abs().max().into_scalar();
            let err: f32 = (a - b).abs().max().into_scalar();
            assert!(err <= 1e-3 * peak, "{what}: error {err} of the peak {peak}");
        };
        let scale = (d as f32).powf(-0.5);
        for wide in [false, true] {
            let (q, k, v, g) = (rows(37, 0.1, wide), rows(45, -0.1, wide), rows(45, 0.0, false), rows(37, 0.2, false));
            super::super::set_flash_attention(true);
            let before = super::super::vendor_stats();
            let (out, lse) = flash_attention_rows(q.clone(), k.clone(), v.clone(), batch, heads, scale).expect("flash forward on rows");
            assert_eq!(out.dims(), [batch * 37, heads * d]);
            let inputs = AttentionRowsBackward { q: q.clone(), k: k.clone(), v: v.clone(), out: out.clone(), grad_out: g.clone(), lse: lse.clone() };
            let [dq, dk, dv] = flash_attention_backward_rows(inputs, batch, heads, scale).expect("flash backward on rows");
            let (out_ref, lse_ref) = super::super::flash_attention(split(q.clone()), split(k.clone()), split(v.clone()), scale).expect("flash forward");
            let (dq_ref, dk_ref, dv_ref) = super::super::flash_attention_backward(split(q), split(k), split(v), out_ref.clone(), split(g), lse_ref.clone(), scale).expect("flash backward");
            super::super::set_flash_attention(false);
            close("out", out, merge(out_ref));
            let lse_err: f32 = (lse - lse_ref).abs().max().into_scalar();
            assert!(lse_err < 1e-4, "lse error {lse_err}");
            close("dq", dq, merge(dq_ref));
            close("dk", dk, merge(dk_ref));
            close("dv", dv, merge(dv_ref));
            // burn-fusion runs the ops when their results are read: count after the reads.
            let after = super::super::vendor_stats();
            assert_eq!(after.fallbacks, before.fallbacks, "fallbacks: {:?}", after.last_error);
            assert_eq!(after.flash_attention_calls - before.flash_attention_calls, 4);
        }
    }

    /// Rows that do not split into the given sequences and heads come back untouched.
    #[test]
    fn vulkan_flash_rows_refuse_rows_that_do_not_split() {
        use super::super::flash_attention_rows;
        use burn::tensor::Tensor;
        type W = burn::backend::Wgpu;
        let x = Tensor::<W, 2>::zeros([15, 60], &Default::default()).cast(FloatDType::F16);
        super::super::set_flash_attention(true);
        let refused = [(2, 3), (3, 7), (0, 3)].map(|(batch, heads)| flash_attention_rows(x.clone(), x.clone(), x.clone(), batch, heads, 0.2).is_err());
        super::super::set_flash_attention(false);
        assert_eq!(refused, [true, true, true]);
    }

    #[test]
    fn vulkan_flash_plan_fits_shared_memory() {
        let client = WgpuRuntime::client(&WgpuDevice::default());
        for d in [8, 40, 64, 80, 160] {
            let plan = plan(&client, f16_type(), d).expect("plan");
            assert_eq!(plan.dp % plan.tile, 0);
            assert!(plan.dp >= d && plan.dp < d + plan.tile);
            assert!(rows_bytes(plan.tile, plan.planes, plan.plane, plan.block_keys, plan.dp, 2, true) <= MAX_SHARED);
            assert!(rows_bytes(plan.tile, plan.fwd_planes, plan.plane, plan.fwd_block_keys, plan.dp, 2, false) <= MAX_SHARED);
            assert!(plan.fwd_planes * plan.fwd_block_keys >= plan.planes * plan.block_keys, "{plan:?}");
        }
        // lavapipe's 32 KiB give the forward pass larger blocks than `dq` at d = 40, so the
        // reference test's d = 40 case checks that the passes need not share their blocks.
        let p40 = plan(&client, f16_type(), 40).expect("plan");
        assert!(p40.fwd_planes * p40.fwd_block_keys > p40.planes * p40.block_keys, "{p40:?}");
        // CUDA's layout (16-wide WMMA tiles, 32-lane warps, 48 KiB) for every head dimension
        // the API passes on (`FLASH_MAX_HEAD_DIM`), bf16.
        for d in [40, 64, 80, 160] {
            let plan = layout(16, 32, 1024, MAX_SHARED, d, 2).expect("CUDA layout");
            assert_eq!((plan.tile, plan.plane), (16, 32));
            assert!(plan.block_keys >= 16 && plan.block_queries >= 16, "{plan:?}");
        }
        // SD1.5's top level (d = 40): the forward pass, without the backward pass's tiles,
        // takes twice the keys per block in the same 48 KiB; with 96 KiB (a tuning option,
        // `set_flash_shared_kib`) the backward pass does too.
        let sd15 = |limit: usize| layout(16, 32, 1024, limit, 40, 2).map(|p| (p.planes, p.block_keys, p.fwd_planes, p.fwd_block_keys));
        assert_eq!(sd15(MAX_SHARED), Ok((4, 32, 4, 64)));
        assert_eq!(sd15(96 * 1024), Ok((4, 64, 4, 64)));
        assert!(layout(16, 32, 1024, MAX_SHARED, 512, 2).is_err(), "the VAE's 512-wide head does not fit");
    }
}

#[cfg(test)]
mod fallback_tests {
    //! The ops' fallback math over blocks of queries against one block, on the CPU.

    use super::*;
    use burn::backend::Flex;
    use burn::tensor::{Distribution, ElementConversion};

    fn gap<const D: usize>(a: Tensor<Flex, D>, b: Tensor<Flex, D>) -> f32 {
        (a - b).abs().max().into_scalar().elem()
    }

    #[test]
    fn fallback_blocks_match_one_block() {
        let device = Default::default();
        let t = |s: usize| Tensor::<Flex, 4>::random([2, 3, s, 8], Distribution::Normal(0.0, 1.0), &device);
        let (q, k, v, g) = (t(13), t(7), t(7), t(13));
        let scale = 0.35;
        // 2·3·7 scores per query row: blocks of 2 rows (the last one of 1).
        let max_scores = 2 * 3 * 7 * 2;
        assert_eq!(fallback_rows(q.dims(), 7, max_scores), 2);
        let (out, lse) = forward_math(q.clone(), k.clone(), v.clone(), scale);
        let (out_b, lse_b) = forward_math_in_blocks(q.clone(), k.clone(), v.clone(), scale, max_scores);
        assert!(gap(out_b, out.clone()) < 1e-5 && gap(lse_b, lse.clone()) < 1e-5, "forward");
        let delta = delta_math(g.clone(), out);
        let (dq, dk, dv) = backward_math(q.clone(), k.clone(), v.clone(), g.clone(), lse.clone(), delta.clone(), scale);
        let (dq_b, dk_b, dv_b) = backward_math_in_blocks(q, k, v, g, lse, delta, scale, max_scores);
        for (what, a, b) in [("dq", dq_b, dq), ("dk", dk_b, dk), ("dv", dv_b, dv)] {
            let err = gap(a, b);
            assert!(err < 1e-4, "{what}: {err}");
        }
    }
}
