//! GroupNorm (+ SiLU) forward and backward as CubeCL kernels.
//!
//! Composed of tensor ops, a GroupNorm + SiLU of a `[b, c, h, w]` activation is a cast, two
//! reductions (mean, variance) and an elementwise tail in the forward pass, and about twice
//! that in the backward pass, each a pass over the activation (burn's fusion joins some of
//! the elementwise ones, never across a reduction). The UNet runs two per ResNet block. These
//! kernels read the activation twice in each direction and write the result once:
//!
//! - **forward**: [`channel_stats`] gives each `(batch, channel)` plane its mean and centred
//!   sum of squares (two sweeps over the plane, the second from cache); [`normalize`]
//!   combines a group's channels into the group's mean and `1/σ` (the parallel-variance
//!   formula, exact in f32 however far the mean is from zero), writes them for the backward
//!   pass, and writes `silu(x̂ γ + β)`.
//! - **backward**: [`channel_grads`] gives each plane `Σ dh x̂` and `Σ dh` (`dh` the gradient
//!   before the SiLU); summed over the batch they are `dγ` and `dβ`, and weighted by `γ`
//!   over a group's channels they are the two group means the input gradient needs, which
//!   [`input_grad`] forms and applies.
//!
//! One cube per `(batch, channel)` plane (a 2-D grid, so more than 65535 planes fit), units
//! striding over the plane in vectors of up to 16 bytes; statistics and sums in f32 whatever
//! the dtypes of the input (`I`), output gradient (`G`) and `γ`, `β` (`P`).

use std::marker::PhantomData;

use burn::tensor::ops::FloatTensorOps;
use burn::tensor::{DType, FloatDType, Shape};
use burn_cubecl::cubecl;
use burn_cubecl::fusion::FusionCubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};
use cubecl::prelude::*;

use super::{contiguous, GroupNormSpec};

/// Most units per cube (a power of two, for the tree reduction).
const MAX_THREADS: usize = 256;

/// Largest grid extent along one axis on every runtime (wgpu's limit).
const MAX_GRID: usize = 65_535;

/// The plane (`batch · channels + channel`) this cube owns.
#[cube]
fn plane_index() -> usize {
    (CUBE_POS_Y * CUBE_COUNT_X + CUBE_POS_X) as usize
}

/// The sum of `value` over the cube's units (a tree in `shared`); every unit gets it.
#[cube]
fn cube_sum(value: f32, shared: &mut SharedMemory<f32>) -> f32 {
    let tid = UNIT_POS_X as usize;
    shared[tid] = value;
    sync_cube();
    let mut stride = (CUBE_DIM_X / 2) as usize;
    while stride > 0 {
        if tid < stride {
            shared[tid] = shared[tid] + shared[tid + stride];
        }
        sync_cube();
        stride /= 2;
    }
    let total = shared[0];
    // `shared` is reused by the next sum.
    sync_cube();
    total
}

/// The sum of a vector's lanes.
#[cube]
fn lanes_sum<N: Size>(v: Vector<f32, N>) -> f32 {
    let mut sum = f32::new(0.0);
    #[unroll]
    for j in 0..N::value() {
        sum += v[j];
    }
    sum
}

/// The gradient before the SiLU, `dh = dy · s (1 + h (1 − s))` with `h = x̂ γ + β` and
/// `s = sigmoid(h)`, or `dy` itself without the SiLU.
#[cube]
#[allow(unused_assignments)]
fn pre_activation_grad<N: Size>(xhat: Vector<f32, N>, dy: Vector<f32, N>, gamma: Vector<f32, N>, beta: Vector<f32, N>, #[comptime] silu: bool) -> Vector<f32, N> {
    let mut dh = dy;
    if silu {
        let one = Vector::<f32, N>::new(1.0);
        let h = xhat * gamma + beta;
        // `0 − h`, not `-h`: cubecl-cpp writes a vector's negation as C++ unary minus on its
        // `float_4`-style struct, which has no such operator (NVRTC rejects the kernel).
        let s = one / (one + (Vector::<f32, N>::new(0.0) - h).exp());
        dh = dy * s * (one + h * (one - s));
    }
    dh
}

/// The mean of the `n` vectors of `x` from `base` (a plane or a row), summed relative to
/// its first element: far from zero, the differences are exact where the plain sum would
/// round away the low digits. Every unit gets it.
#[cube]
fn pivoted_mean<I: Float, N: Size>(x: &Array<Vector<I, N>>, base: usize, n: usize, shared: &mut SharedMemory<f32>) -> f32 {
    let pivot = Vector::<f32, N>::cast_from(x[base])[0];
    let pivots = Vector::<f32, N>::new(pivot);
    let mut acc = Vector::<f32, N>::new(0.0);
    let mut i = UNIT_POS_X as usize;
    while i < n {
        acc += Vector::<f32, N>::cast_from(x[base + i]) - pivots;
        i += CUBE_DIM_X as usize;
    }
    pivot + cube_sum(lanes_sum(acc), shared) / f32::cast_from((n * N::value()) as u32)
}

/// `Σ (x − mean)²` over the `n` vectors of `x` from `base`; the second sweep reads them from
/// cache (a plane or a row is at most a few tens of KiB). Every unit gets it.
#[cube]
fn centred_squares<I: Float, N: Size>(x: &Array<Vector<I, N>>, base: usize, n: usize, mean: f32, shared: &mut SharedMemory<f32>) -> f32 {
    let centre = Vector::<f32, N>::new(mean);
    let mut acc = Vector::<f32, N>::new(0.0);
    let mut i = UNIT_POS_X as usize;
    while i < n {
        let d = Vector::<f32, N>::cast_from(x[base + i]) - centre;
        acc += d * d;
        i += CUBE_DIM_X as usize;
    }
    cube_sum(lanes_sum(acc), shared)
}

/// `silu(h)`, or `h` itself without the SiLU.
#[cube]
#[allow(unused_assignments)]
fn activation<N: Size>(h: Vector<f32, N>, #[comptime] silu: bool) -> Vector<f32, N> {
    let mut out = h;
    if silu {
        // `0 − h`: see `pre_activation_grad`.
        out = h / (Vector::<f32, N>::new(1.0) + (Vector::<f32, N>::new(0.0) - h).exp());
    }
    out
}

/// Per plane: the mean and the centred sum of squares `Σ (x − mean)²`.
#[cube(launch)]
fn channel_stats<I: Float, N: Size>(
    x: &Array<Vector<I, N>>,
    mean: &mut Array<f32>,
    m2: &mut Array<f32>,
    planes: u32,
    vectors: u32,
    #[define(I)] _dtype: StorageType,
) {
    let plane = plane_index();
    if plane >= planes as usize {
        terminate!();
    }
    let n = vectors as usize;
    let base = plane * n;
    let mut shared = SharedMemory::<f32>::new(MAX_THREADS);
    let mu = pivoted_mean::<I, N>(x, base, n, &mut shared);
    let squares = centred_squares::<I, N>(x, base, n, mu, &mut shared);
    if UNIT_POS_X == 0 {
        mean[plane] = mu;
        m2[plane] = squares;
    }
}

/// Per plane: combines the group's channel statistics into the group's mean and `1/σ`
/// (written once per group, by the group's first plane) and writes
/// `silu((x − mean) / σ · γ + β)` (or without the SiLU).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn normalize<I: Float, P: Float, N: Size>(
    x: &Array<Vector<I, N>>,
    gamma: &Array<P>,
    beta: &Array<P>,
    channel_mean: &Array<f32>,
    channel_m2: &Array<f32>,
    y: &mut Array<Vector<I, N>>,
    group_mean: &mut Array<f32>,
    group_rstd: &mut Array<f32>,
    planes: u32,
    channels: u32,
    per_group: u32,
    vectors: u32,
    epsilon: f32,
    #[comptime] silu: bool,
    #[define(I, P)] _dtypes: [StorageType; 2],
) {
    let plane = plane_index();
    if plane >= planes as usize {
        terminate!();
    }
    let (channels, per_group) = (channels as usize, per_group as usize);
    let (batch, c) = (plane / channels, plane % channels);
    let group = c / per_group;
    let first = batch * channels + group * per_group;
    // Chan et al.: M2 = Σ_c [M2_c + n_c (mean_c − mean)²], all n_c equal. The cube's units
    // share the group's channels (a serial loop would put tens of dependent loads on every
    // cube's critical path); sums relative to the first channel's mean, as in
    // `channel_stats`.
    let (tid, threads) = (UNIT_POS_X as usize, CUBE_DIM_X as usize);
    let mut shared = SharedMemory::<f32>::new(MAX_THREADS);
    let pivot = channel_mean[first];
    let mut part = f32::new(0.0);
    let mut j = tid;
    while j < per_group {
        part += channel_mean[first + j] - pivot;
        j += threads;
    }
    let mean = pivot + cube_sum(part, &mut shared) / f32::cast_from(per_group as u32);
    let count = f32::cast_from(vectors * N::value() as u32);
    let mut part = f32::new(0.0);
    let mut j = tid;
    while j < per_group {
        let d = channel_mean[first + j] - mean;
        part += channel_m2[first + j] + count * d * d;
        j += threads;
    }
    let m2 = cube_sum(part, &mut shared);
    let rstd = 1.0f32 / (m2 / (count * f32::cast_from(per_group as u32)) + epsilon).sqrt();
    if tid == 0 && c % per_group == 0 {
        let groups = channels / per_group;
        group_mean[batch * groups + group] = mean;
        group_rstd[batch * groups + group] = rstd;
    }
    // `(x − mean) · scale + β` rather than `x · scale + shift`: the latter cancels two large
    // terms when the mean is far from zero.
    let mu = Vector::<f32, N>::new(mean);
    let scale = Vector::<f32, N>::new(rstd * f32::cast_from(gamma[c]));
    let shift = Vector::<f32, N>::new(f32::cast_from(beta[c]));

    let n = vectors as usize;
    let base = plane * n;
    let mut i = tid;
    while i < n {
        let h = (Vector::<f32, N>::cast_from(x[base + i]) - mu) * scale + shift;
        y[base + i] = Vector::<I, N>::cast_from(activation::<N>(h, silu));
        i += threads;
    }
}

/// Per plane: `Σ dh · x̂` and `Σ dh` (`dh` the gradient before the SiLU).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn channel_grads<I: Float, G: Float, P: Float, N: Size>(
    x: &Array<Vector<I, N>>,
    dy: &Array<Vector<G, N>>,
    gamma: &Array<P>,
    beta: &Array<P>,
    group_mean: &Array<f32>,
    group_rstd: &Array<f32>,
    sum_dh_xhat: &mut Array<f32>,
    sum_dh: &mut Array<f32>,
    planes: u32,
    channels: u32,
    per_group: u32,
    vectors: u32,
    #[comptime] silu: bool,
    #[define(I, G, P)] _dtypes: [StorageType; 3],
) {
    let plane = plane_index();
    if plane >= planes as usize {
        terminate!();
    }
    let (channels, per_group) = (channels as usize, per_group as usize);
    let (batch, c) = (plane / channels, plane % channels);
    let stat = batch * (channels / per_group) + c / per_group;
    let (mu, rstd) = (Vector::<f32, N>::new(group_mean[stat]), Vector::<f32, N>::new(group_rstd[stat]));
    let (g, b) = (Vector::<f32, N>::new(f32::cast_from(gamma[c])), Vector::<f32, N>::new(f32::cast_from(beta[c])));

    let (n, tid, threads) = (vectors as usize, UNIT_POS_X as usize, CUBE_DIM_X as usize);
    let base = plane * n;
    let mut acc_a = Vector::<f32, N>::new(0.0);
    let mut acc_b = Vector::<f32, N>::new(0.0);
    let mut i = tid;
    while i < n {
        let xhat = (Vector::<f32, N>::cast_from(x[base + i]) - mu) * rstd;
        let dh = pre_activation_grad::<N>(xhat, Vector::<f32, N>::cast_from(dy[base + i]), g, b, silu);
        acc_a += dh * xhat;
        acc_b += dh;
        i += threads;
    }
    let mut shared = SharedMemory::<f32>::new(MAX_THREADS);
    let a = cube_sum(lanes_sum(acc_a), &mut shared);
    let b = cube_sum(lanes_sum(acc_b), &mut shared);
    if tid == 0 {
        sum_dh_xhat[plane] = a;
        sum_dh[plane] = b;
    }
}

/// Per plane: `dx = (dx̂ − mean(dx̂) − x̂ · mean(dx̂ x̂)) / σ` with `dx̂ = dh γ`; the group
/// means are `Σ_c γ_c Σ dh` and `Σ_c γ_c Σ dh x̂` over the group's channels, divided by the
/// group's element count.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn input_grad<I: Float, G: Float, P: Float, N: Size>(
    x: &Array<Vector<I, N>>,
    dy: &Array<Vector<G, N>>,
    gamma: &Array<P>,
    beta: &Array<P>,
    group_mean: &Array<f32>,
    group_rstd: &Array<f32>,
    sum_dh_xhat: &Array<f32>,
    sum_dh: &Array<f32>,
    acc: &Array<Vector<I, N>>,
    dx: &mut Array<Vector<I, N>>,
    planes: u32,
    channels: u32,
    per_group: u32,
    vectors: u32,
    #[comptime] silu: bool,
    #[comptime] accumulate: bool,
    #[define(I, G, P)] _dtypes: [StorageType; 3],
) {
    let plane = plane_index();
    if plane >= planes as usize {
        terminate!();
    }
    let (channels, per_group) = (channels as usize, per_group as usize);
    let (batch, c) = (plane / channels, plane % channels);
    let group = c / per_group;
    let stat = batch * (channels / per_group) + group;
    // The units share the group's channels, as in `normalize`.
    let (tid, threads) = (UNIT_POS_X as usize, CUBE_DIM_X as usize);
    let (first, first_c) = (batch * channels + group * per_group, group * per_group);
    let mut part1 = f32::new(0.0);
    let mut part2 = f32::new(0.0);
    let mut j = tid;
    while j < per_group {
        let g = f32::cast_from(gamma[first_c + j]);
        part1 += g * sum_dh[first + j];
        part2 += g * sum_dh_xhat[first + j];
        j += threads;
    }
    let mut shared = SharedMemory::<f32>::new(MAX_THREADS);
    let count = f32::cast_from(vectors * N::value() as u32) * f32::cast_from(per_group as u32);
    let m1 = cube_sum(part1, &mut shared) / count;
    let m2 = cube_sum(part2, &mut shared) / count;
    let (mu, rstd) = (Vector::<f32, N>::new(group_mean[stat]), Vector::<f32, N>::new(group_rstd[stat]));
    let (g, b) = (Vector::<f32, N>::new(f32::cast_from(gamma[c])), Vector::<f32, N>::new(f32::cast_from(beta[c])));
    let (m1, m2) = (Vector::<f32, N>::new(m1), Vector::<f32, N>::new(m2));

    let n = vectors as usize;
    let base = plane * n;
    let mut i = tid;
    while i < n {
        let xhat = (Vector::<f32, N>::cast_from(x[base + i]) - mu) * rstd;
        let dh = pre_activation_grad::<N>(xhat, Vector::<f32, N>::cast_from(dy[base + i]), g, b, silu);
        let mut grad = (dh * g - m1 - xhat * m2) * rstd;
        if comptime!(accumulate) {
            grad += Vector::<f32, N>::cast_from(acc[base + i]);
        }
        dx[base + i] = Vector::<I, N>::cast_from(grad);
        i += threads;
    }
}

/// LayerNorm's forward pass per row of a contiguous `[rows, d]` input (a GroupNorm of one
/// group over `[rows, d, 1, 1]`, whose planes are single elements): the row's mean and
/// `1/σ`, and `silu((x − mean) σ⁻¹ γ + β)` (or without the SiLU) with `γ`, `β` per column.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn layer_norm_rows<I: Float, P: Float, N: Size>(
    x: &Array<Vector<I, N>>,
    gamma: &Array<Vector<P, N>>,
    beta: &Array<Vector<P, N>>,
    y: &mut Array<Vector<I, N>>,
    mean: &mut Array<f32>,
    rstd: &mut Array<f32>,
    rows: u32,
    vectors: u32,
    epsilon: f32,
    #[comptime] silu: bool,
    #[define(I, P)] _dtypes: [StorageType; 2],
) {
    let row = plane_index();
    if row >= rows as usize {
        terminate!();
    }
    let (n, tid, threads) = (vectors as usize, UNIT_POS_X as usize, CUBE_DIM_X as usize);
    let base = row * n;
    let count = f32::cast_from(vectors * N::value() as u32);
    let mut shared = SharedMemory::<f32>::new(MAX_THREADS);
    let mu = pivoted_mean::<I, N>(x, base, n, &mut shared);
    let r = 1.0f32 / (centred_squares::<I, N>(x, base, n, mu, &mut shared) / count + epsilon).sqrt();
    if tid == 0 {
        mean[row] = mu;
        rstd[row] = r;
    }
    let (centre, rv) = (Vector::<f32, N>::new(mu), Vector::<f32, N>::new(r));
    let mut i = tid;
    while i < n {
        let xhat = (Vector::<f32, N>::cast_from(x[base + i]) - centre) * rv;
        let h = xhat * Vector::<f32, N>::cast_from(gamma[i]) + Vector::<f32, N>::cast_from(beta[i]);
        y[base + i] = Vector::<I, N>::cast_from(activation::<N>(h, silu));
        i += threads;
    }
}

/// LayerNorm's input gradient per row (see [`layer_norm_rows`]):
/// `dx = (dx̂ − mean(dx̂) − x̂ · mean(dx̂ x̂)) / σ` with `dx̂ = dh γ`, both means over the row,
/// so one cube per row needs nothing from other rows. `dγ` and `dβ` (sums over rows) are
/// not computed: LayerNorms are frozen in LoRA training.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn layer_norm_input_grad<I: Float, G: Float, P: Float, N: Size>(
    x: &Array<Vector<I, N>>,
    dy: &Array<Vector<G, N>>,
    gamma: &Array<Vector<P, N>>,
    beta: &Array<Vector<P, N>>,
    mean: &Array<f32>,
    rstd: &Array<f32>,
    acc: &Array<Vector<I, N>>,
    dx: &mut Array<Vector<I, N>>,
    rows: u32,
    vectors: u32,
    #[comptime] silu: bool,
    #[comptime] accumulate: bool,
    #[define(I, G, P)] _dtypes: [StorageType; 3],
) {
    let row = plane_index();
    if row >= rows as usize {
        terminate!();
    }
    let (n, tid, threads) = (vectors as usize, UNIT_POS_X as usize, CUBE_DIM_X as usize);
    let base = row * n;
    let (mu, r) = (Vector::<f32, N>::new(mean[row]), Vector::<f32, N>::new(rstd[row]));
    let mut acc1 = Vector::<f32, N>::new(0.0);
    let mut acc2 = Vector::<f32, N>::new(0.0);
    let mut i = tid;
    while i < n {
        let xhat = (Vector::<f32, N>::cast_from(x[base + i]) - mu) * r;
        let g = Vector::<f32, N>::cast_from(gamma[i]);
        let dh = pre_activation_grad::<N>(xhat, Vector::<f32, N>::cast_from(dy[base + i]), g, Vector::<f32, N>::cast_from(beta[i]), silu);
        let dxhat = dh * g;
        acc1 += dxhat;
        acc2 += dxhat * xhat;
        i += threads;
    }
    let mut shared = SharedMemory::<f32>::new(MAX_THREADS);
    let count = f32::cast_from(vectors * N::value() as u32);
    let m1 = Vector::<f32, N>::new(cube_sum(lanes_sum(acc1), &mut shared) / count);
    let m2 = Vector::<f32, N>::new(cube_sum(lanes_sum(acc2), &mut shared) / count);
    // The second sweep reads the row again from cache.
    let mut i = tid;
    while i < n {
        let xhat = (Vector::<f32, N>::cast_from(x[base + i]) - mu) * r;
        let g = Vector::<f32, N>::cast_from(gamma[i]);
        let dh = pre_activation_grad::<N>(xhat, Vector::<f32, N>::cast_from(dy[base + i]), g, Vector::<f32, N>::cast_from(beta[i]), silu);
        let mut grad = (dh * g - m1 - xhat * m2) * r;
        if comptime!(accumulate) {
            grad += Vector::<f32, N>::cast_from(acc[base + i]);
        }
        dx[base + i] = Vector::<I, N>::cast_from(grad);
        i += threads;
    }
}

/// The launch geometry shared by the kernels, for `planes` planes of `plane_len`
/// elements of at most `element_bytes` bytes.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    planes: u32,
    vectors: u32,
    vector: usize,
    count: (u32, u32),
    threads: u32,
}

impl Geometry {
    fn new<R: Runtime>(client: &ComputeClient<R>, planes: usize, plane_len: usize, element_bytes: usize) -> Result<Self, String> {
        let too_large = |what: &str| format!("fused group norm: {what} over u32");
        let total = planes.checked_mul(plane_len).ok_or_else(|| too_large("element count"))?;
        u32::try_from(total).map_err(|_| too_large("element count"))?;
        // The widest vector the runtime offers that divides a plane (planes start on
        // multiples of it, so every vector is aligned) and stays within 16 bytes.
        let vector = client
            .io_optimized_vector_sizes(element_bytes)
            .filter(|&v| v >= 1 && plane_len.is_multiple_of(v) && v * element_bytes <= 16)
            .max()
            .unwrap_or(1);
        let vectors = plane_len / vector;
        // Enough units that each has a few vectors, a power of two from 32 to 256.
        let threads = vectors.div_ceil(4).next_power_of_two().clamp(32, MAX_THREADS);
        let count = (planes.min(MAX_GRID) as u32, planes.div_ceil(MAX_GRID) as u32);
        Ok(Self {
            planes: planes as u32,
            vectors: vectors as u32,
            vector,
            count,
            threads: threads as u32,
        })
    }

    fn cube_count(&self) -> CubeCount {
        CubeCount::Static(self.count.0, self.count.1.max(1), 1)
    }

    fn cube_dim(&self) -> CubeDim {
        CubeDim::new_1d(self.threads)
    }
}

/// An array argument of `len` elements over `handle`.
///
/// # Safety
///
/// `handle` must hold `len` elements of the kernel's element type for that argument.
unsafe fn arg<R: Runtime>(handle: &cubecl::server::Handle, len: usize) -> ArrayArg<R> {
    // SAFETY: the caller's contract.
    unsafe { ArrayArg::from_raw_parts(handle.clone(), len) }
}

/// The shape of a GroupNorm problem: `[batch, channels, h, w]` in `groups` groups.
#[derive(Debug, Clone, Copy)]
pub(super) struct Problem {
    /// Batch size.
    pub batch: usize,
    /// Channels (a multiple of `groups`).
    pub channels: usize,
    /// Elements of one channel plane, `h · w`.
    pub plane_len: usize,
    /// The settings.
    pub spec: GroupNormSpec,
}

impl Problem {
    fn planes(&self) -> usize {
        self.batch * self.channels
    }

    /// A LayerNorm seen as a GroupNorm (one group over single-element planes): the row
    /// kernels, one cube per row of `channels` elements.
    pub(super) fn is_rows(&self) -> bool {
        self.plane_len == 1 && self.spec.groups == 1
    }

    fn per_group(&self) -> Result<usize, String> {
        if self.spec.groups == 0 || !self.channels.is_multiple_of(self.spec.groups) {
            return Err(format!("fused group norm: {} channels do not split into {} groups", self.channels, self.spec.groups));
        }
        Ok(self.channels / self.spec.groups)
    }
}

/// Queues the forward pass: `y` (`dtypes[0]`, like `x`) and the f32 group statistics
/// `mean`, `rstd` (`[batch, groups]`) for contiguous `x` and `γ`, `β` (`dtypes[1]`).
#[allow(clippy::too_many_arguments)]
pub(super) fn forward<R: Runtime>(
    client: &ComputeClient<R>,
    problem: Problem,
    dtypes: [StorageType; 2],
    [x, gamma, beta]: [&cubecl::server::Handle; 3],
    [y, mean, rstd]: [&cubecl::server::Handle; 3],
) -> Result<(), String> {
    let per_group = problem.per_group()?;
    let planes = problem.planes();
    if planes == 0 || problem.plane_len == 0 {
        return Ok(());
    }
    if problem.is_rows() {
        return forward_rows(client, problem, dtypes, [x, gamma, beta], [y, mean, rstd]);
    }
    let geo = Geometry::new(client, planes, problem.plane_len, dtypes[0].size())?;
    let len = planes * geo.vectors as usize;
    let groups = problem.batch * problem.spec.groups;
    let channel_mean = client.empty(planes * 4);
    let channel_m2 = client.empty(planes * 4);
    // SAFETY: `x` and `y` hold `planes · plane_len` elements of `dtypes[0]` (`len` vectors),
    // γ and β `channels` of `dtypes[1]`, the statistics `planes` or `groups` f32 (the
    // caller's contract and the buffers made here).
    unsafe {
        channel_stats::launch::<R>(
            client,
            geo.cube_count(),
            geo.cube_dim(),
            geo.vector,
            arg(x, len),
            arg(&channel_mean, planes),
            arg(&channel_m2, planes),
            geo.planes,
            geo.vectors,
            dtypes[0],
        );
        normalize::launch::<R>(
            client,
            geo.cube_count(),
            geo.cube_dim(),
            geo.vector,
            arg(x, len),
            arg(gamma, problem.channels),
            arg(beta, problem.channels),
            arg(&channel_mean, planes),
            arg(&channel_m2, planes),
            arg(y, len),
            arg(mean, groups),
            arg(rstd, groups),
            geo.planes,
            problem.channels as u32,
            per_group as u32,
            geo.vectors,
            problem.spec.epsilon as f32,
            problem.spec.silu,
            dtypes,
        );
    }
    Ok(())
}

/// Queues the backward pass: `dx` (`dtypes[0]`, like `x`) and, into `sums` when given, the
/// per-plane sums `Σ dh x̂`, `Σ dh` (f32, `[batch, channels]`; summed over the batch they
/// are `dγ`, `dβ`), from contiguous `x`, `dy` (`dtypes[1]`), `γ`, `β` (`dtypes[2]`) and the
/// forward pass's group statistics. With `acc` (contiguous, `x`'s dtype and shape) `dx`
/// is the input gradient plus `acc`: another consumer's gradient of the same input,
/// accumulated in the kernel instead of by an addition after it. The row layout
/// ([`Problem::is_rows`]) computes `dx` alone and takes no `sums`.
#[allow(clippy::too_many_arguments)]
pub(super) fn backward<R: Runtime>(
    client: &ComputeClient<R>,
    problem: Problem,
    dtypes: [StorageType; 3],
    [x, dy, gamma, beta]: [&cubecl::server::Handle; 4],
    [mean, rstd]: [&cubecl::server::Handle; 2],
    acc: Option<&cubecl::server::Handle>,
    dx: &cubecl::server::Handle,
    sums: Option<[&cubecl::server::Handle; 2]>,
) -> Result<(), String> {
    let per_group = problem.per_group()?;
    let planes = problem.planes();
    if planes == 0 || problem.plane_len == 0 {
        return Ok(());
    }
    let bytes = dtypes[0].size().max(dtypes[1].size());
    if problem.is_rows() {
        if sums.is_some() {
            return Err("fused layer norm: the row kernels do not compute dγ and dβ".to_string());
        }
        return input_grad_rows(client, problem, dtypes, bytes, [x, dy, gamma, beta], [mean, rstd], acc, dx);
    }
    let geo = Geometry::new(client, planes, problem.plane_len, bytes)?;
    let len = planes * geo.vectors as usize;
    let groups = problem.batch * problem.spec.groups;
    let channels = problem.channels as u32;
    // Without `sums`, buffers of our own: the input gradient needs them either way.
    let own;
    let [sum_dh_xhat, sum_dh] = match sums {
        Some(given) => given,
        None => {
            own = [client.empty(planes * 4), client.empty(planes * 4)];
            [&own[0], &own[1]]
        }
    };
    // SAFETY: as in `forward`; `dy` and `dx` hold as many elements as `x`, the sums
    // `planes` f32.
    unsafe {
        channel_grads::launch::<R>(
            client,
            geo.cube_count(),
            geo.cube_dim(),
            geo.vector,
            arg(x, len),
            arg(dy, len),
            arg(gamma, problem.channels),
            arg(beta, problem.channels),
            arg(mean, groups),
            arg(rstd, groups),
            arg(sum_dh_xhat, planes),
            arg(sum_dh, planes),
            geo.planes,
            channels,
            per_group as u32,
            geo.vectors,
            problem.spec.silu,
            dtypes,
        );
        input_grad::launch::<R>(
            client,
            geo.cube_count(),
            geo.cube_dim(),
            geo.vector,
            arg(x, len),
            arg(dy, len),
            arg(gamma, problem.channels),
            arg(beta, problem.channels),
            arg(mean, groups),
            arg(rstd, groups),
            arg(sum_dh_xhat, planes),
            arg(sum_dh, planes),
            // Not read without `acc` (the flag is a compile-time constant).
            arg(acc.unwrap_or(x), len),
            arg(dx, len),
            geo.planes,
            channels,
            per_group as u32,
            geo.vectors,
            problem.spec.silu,
            acc.is_some(),
            dtypes,
        );
    }
    Ok(())
}

/// [`forward`] for the row layout: `batch` rows of `channels` elements.
fn forward_rows<R: Runtime>(
    client: &ComputeClient<R>,
    problem: Problem,
    dtypes: [StorageType; 2],
    [x, gamma, beta]: [&cubecl::server::Handle; 3],
    [y, mean, rstd]: [&cubecl::server::Handle; 3],
) -> Result<(), String> {
    let (rows, d) = (problem.batch, problem.channels);
    let geo = Geometry::new(client, rows, d, dtypes[0].size())?;
    let len = rows * geo.vectors as usize;
    // SAFETY: `x` and `y` hold `rows · d` elements of `dtypes[0]`, γ and β `d` of
    // `dtypes[1]` (`d / vector` vectors: the vector divides `d`), the statistics `rows` f32.
    unsafe {
        layer_norm_rows::launch::<R>(
            client,
            geo.cube_count(),
            geo.cube_dim(),
            geo.vector,
            arg(x, len),
            arg(gamma, geo.vectors as usize),
            arg(beta, geo.vectors as usize),
            arg(y, len),
            arg(mean, rows),
            arg(rstd, rows),
            geo.planes,
            geo.vectors,
            problem.spec.epsilon as f32,
            problem.spec.silu,
            dtypes,
        );
    }
    Ok(())
}

/// [`backward`]'s input gradient for the row layout.
#[allow(clippy::too_many_arguments)]
fn input_grad_rows<R: Runtime>(
    client: &ComputeClient<R>,
    problem: Problem,
    dtypes: [StorageType; 3],
    bytes: usize,
    [x, dy, gamma, beta]: [&cubecl::server::Handle; 4],
    [mean, rstd]: [&cubecl::server::Handle; 2],
    acc: Option<&cubecl::server::Handle>,
    dx: &cubecl::server::Handle,
) -> Result<(), String> {
    let (rows, d) = (problem.batch, problem.channels);
    let geo = Geometry::new(client, rows, d, bytes)?;
    let len = rows * geo.vectors as usize;
    // SAFETY: as in `forward_rows`; `dy` and `dx` hold as many elements as `x`.
    unsafe {
        layer_norm_input_grad::launch::<R>(
            client,
            geo.cube_count(),
            geo.cube_dim(),
            geo.vector,
            arg(x, len),
            arg(dy, len),
            arg(gamma, geo.vectors as usize),
            arg(beta, geo.vectors as usize),
            arg(mean, rows),
            arg(rstd, rows),
            arg(acc.unwrap_or(x), len),
            arg(dx, len),
            geo.planes,
            geo.vectors,
            problem.spec.silu,
            acc.is_some(),
            dtypes,
        );
    }
    Ok(())
}

type Inner<R, BT> = CubeBackend<R, f32, i32, BT>;
type Fused<R> = FusionTensor<FusionCubeRuntime<R>>;

/// Queues [`super::group_norm`] on the fusion stream of a CubeCL backend: `(y, mean, rstd)`.
#[allow(clippy::type_complexity)]
pub(super) fn register_forward<R: CubeRuntime, BT: BoolElement>(x: Fused<R>, gamma: Fused<R>, beta: Fused<R>, spec: GroupNormSpec, with_stats: bool) -> (Fused<R>, Option<(Fused<R>, Fused<R>)>) {
    let client = x.client.clone();
    let streams = OperationStreams::with_inputs([&x, &gamma, &beta]);
    let batch = x.shape.to_vec()[0];
    let y = TensorIr::uninit(client.create_empty_handle(), x.shape.clone(), x.dtype);
    let stat = || TensorIr::uninit(client.create_empty_handle(), Shape::new([batch, spec.groups, 1]), DType::F32);
    // Without a backward pass the statistics stay inside the op: no outputs for the
    // stream to release afterwards.
    let mut outputs = vec![y];
    if with_stats {
        outputs.extend([stat(), stat()]);
    }
    let desc = CustomOpIr::new("sd_lora_group_norm", &[x.into_ir(), gamma.into_ir(), beta.into_ir()], &outputs);
    let op = GroupNormForward::<R, BT> {
        desc: desc.clone(),
        spec,
        _backend: PhantomData,
    };
    let mut out = client.register(streams, OperationIr::Custom(desc), op).into_iter();
    let y = out.next().expect("the op has an output");
    (y, out.next().zip(out.next()))
}

/// Queues [`super::group_norm_backward`] (`params`) or [`super::group_norm_input_grad`] on
/// the fusion stream of a CubeCL backend: `dx` and, with `params`, `(dγ, dβ)`, in the dtypes
/// of `x`, `γ` and `β`.
#[allow(clippy::type_complexity)]
pub(super) fn register_backward<R: CubeRuntime, BT: BoolElement>(
    [x, gamma, beta, dy]: [Fused<R>; 4],
    [mean, rstd]: [Fused<R>; 2],
    acc: Option<Fused<R>>,
    spec: GroupNormSpec,
    params: bool,
) -> (Fused<R>, Option<(Fused<R>, Fused<R>)>) {
    let client = x.client.clone();
    let mut ins = vec![x, gamma, beta, dy, mean, rstd];
    let accumulate = acc.is_some();
    ins.extend(acc);
    let streams = OperationStreams::with_inputs(ins.iter());
    let grad = |t: &Fused<R>| TensorIr::uninit(client.create_empty_handle(), t.shape.clone(), t.dtype);
    let mut outputs = vec![grad(&ins[0])];
    if params {
        outputs.extend([grad(&ins[1]), grad(&ins[2])]);
    }
    let inputs: Vec<TensorIr> = ins.into_iter().map(FusionTensor::into_ir).collect();
    let desc = CustomOpIr::new("sd_lora_group_norm_backward", &inputs, &outputs);
    let op = GroupNormBackward::<R, BT> {
        desc: desc.clone(),
        spec,
        params,
        accumulate,
        _backend: PhantomData,
    };
    let mut grads = client.register(streams, OperationIr::Custom(desc), op).into_iter();
    let dx = grads.next().expect("the op has a dx output");
    let params = grads.next().zip(grads.next());
    (dx, params)
}

/// One queued forward pass.
struct GroupNormForward<R, BT> {
    desc: CustomOpIr,
    spec: GroupNormSpec,
    _backend: PhantomData<fn() -> (R, BT)>,
}

/// One queued backward pass.
struct GroupNormBackward<R, BT> {
    desc: CustomOpIr,
    spec: GroupNormSpec,
    /// Whether `dγ` and `dβ` are outputs too.
    params: bool,
    /// Whether a seventh input, another gradient of `x`, is added to `dx`.
    accumulate: bool,
    _backend: PhantomData<fn() -> (R, BT)>,
}

impl<R, BT> std::fmt::Debug for GroupNormForward<R, BT> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupNormForward").field("desc", &self.desc).field("spec", &self.spec).finish()
    }
}

impl<R, BT> std::fmt::Debug for GroupNormBackward<R, BT> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupNormBackward").field("desc", &self.desc).field("spec", &self.spec).finish()
    }
}

/// A `[batch, channels, spatial...]` input as `[batch, channels, plane, 1]`, for the
/// fallback in burn's ops (which takes a fixed rank).
fn as_planes<R: CubeRuntime, BT: BoolElement>(x: CubeTensor<R>) -> burn::tensor::Tensor<Inner<R, BT>, 4> {
    let dims = x.meta.shape().to_vec();
    let plane = dims[2..].iter().product();
    super::tensor(Inner::<R, BT>::float_reshape(x, Shape::new([dims[0], dims[1], plane, 1])))
}

/// The inverse of [`as_planes`]: the result back in the input's `shape`.
fn from_planes<R: CubeRuntime, BT: BoolElement>(y: burn::tensor::Tensor<Inner<R, BT>, 4>, shape: Shape) -> CubeTensor<R> {
    Inner::<R, BT>::float_reshape(y.into_primitive().tensor(), shape)
}

/// A contiguous tensor of `shape` and `dtype` with a fresh buffer, on `like`'s device.
fn empty<R: CubeRuntime>(like: &CubeTensor<R>, shape: Shape, dtype: DType) -> CubeTensor<R> {
    let handle = like.client.empty(shape.num_elements() * dtype.size());
    CubeTensor::new_contiguous(like.client.clone(), like.device.clone(), shape, handle, dtype)
}

/// The problem of a `[b, c, h, w]` input, or why the kernels do not take it.
fn problem<R: CubeRuntime>(x: &CubeTensor<R>, spec: GroupNormSpec) -> Result<Problem, String> {
    let dims = x.meta.shape().to_vec();
    let [batch, channels, ref spatial @ ..] = dims[..] else {
        return Err(format!("fused group norm: expected [batch, channels, spatial...], got {dims:?}"));
    };
    if !matches!(x.dtype, DType::F32 | DType::BF16 | DType::F16) {
        return Err(format!("fused group norm: {:?} input", x.dtype));
    }
    Ok(Problem {
        batch,
        channels,
        plane_len: spatial.iter().product(),
        spec,
    })
}

impl<R: CubeRuntime, BT: BoolElement> GroupNormForward<R, BT> {
    fn kernel(&self, x: CubeTensor<R>, gamma: CubeTensor<R>, beta: CubeTensor<R>) -> Result<[CubeTensor<R>; 3], String> {
        let (x, gamma, beta) = (contiguous(x), contiguous(gamma), contiguous(beta));
        let problem = problem(&x, self.spec)?;
        if beta.dtype != gamma.dtype {
            return Err(format!("fused group norm: γ is {:?}, β {:?}", gamma.dtype, beta.dtype));
        }
        let y = empty(&x, x.meta.shape().clone(), x.dtype);
        let stat_shape = Shape::new([problem.batch, self.spec.groups, 1]);
        let (mean, rstd) = (empty(&x, stat_shape.clone(), DType::F32), empty(&x, stat_shape, DType::F32));
        let dtypes = [x.dtype.into(), gamma.dtype.into()];
        forward(&x.client, problem, dtypes, [&x.handle, &gamma.handle, &beta.handle], [&y.handle, &mean.handle, &rstd.handle])?;
        Ok([y, mean, rstd])
    }
}

impl<R: CubeRuntime, BT: BoolElement> Operation<FusionCubeRuntime<R>> for GroupNormForward<R, BT> {
    fn execute(&self, handles: &mut HandleContainer<<FusionCubeRuntime<R> as FusionRuntime>::FusionHandle>) {
        let [x, gamma, beta] = [0, 1, 2].map(|i| &self.desc.inputs[i]);
        // The output alone, or with the statistics (zip registers what the op declared).
        let outputs = &self.desc.outputs;
        let get = |h: &mut HandleContainer<_>, t: &TensorIr| h.get_float_tensor::<Inner<R, BT>>(t);
        let (tx, tg, tb) = (get(handles, x), get(handles, gamma), get(handles, beta));
        let results = match self.kernel(tx.clone(), tg.clone(), tb.clone()) {
            Ok(results) => {
                super::record_fused_group_norm();
                results
            }
            Err(reason) => {
                super::record_fallback(reason);
                let shape = tx.meta.shape().clone();
                let (y, mean, rstd) = super::group_norm_math(as_planes::<R, BT>(tx), super::tensor(tg), super::tensor(tb), self.spec);
                [from_planes(y, shape), mean.into_primitive().tensor(), rstd.into_primitive().tensor()]
            }
        };
        for (ir, tensor) in outputs.iter().zip(results) {
            handles.register_float_tensor::<Inner<R, BT>>(&ir.id, tensor);
        }
    }
}

impl<R: CubeRuntime, BT: BoolElement> GroupNormBackward<R, BT> {
    fn kernel(&self, [x, gamma, beta, dy]: [CubeTensor<R>; 4], [mean, rstd]: [CubeTensor<R>; 2], acc: Option<CubeTensor<R>>) -> Result<Vec<CubeTensor<R>>, String> {
        let [x, gamma, beta, dy, mean, rstd] = [x, gamma, beta, dy, mean, rstd].map(contiguous);
        let acc = acc.map(contiguous);
        let problem = problem(&x, self.spec)?;
        if let Some(acc) = &acc && (acc.dtype != x.dtype || acc.meta.shape() != x.meta.shape()) {
            return Err(format!("fused group norm backward: the gradient to add is {:?} {:?}, the input {:?} {:?}", acc.dtype, acc.meta.shape(), x.dtype, x.meta.shape()));
        }
        let acc = acc.as_ref().map(|a| &a.handle);
        if beta.dtype != gamma.dtype || mean.dtype != DType::F32 || rstd.dtype != DType::F32 || !matches!(dy.dtype, DType::F32 | DType::BF16 | DType::F16) {
            return Err(format!(
                "fused group norm backward: unexpected dtypes (dy {:?}, γ {:?}, β {:?}, statistics {:?})",
                dy.dtype, gamma.dtype, beta.dtype, mean.dtype
            ));
        }
        let dx = empty(&x, x.meta.shape().clone(), x.dtype);
        let dtypes = [x.dtype.into(), dy.dtype.into(), gamma.dtype.into()];
        let inputs = [&x.handle, &dy.handle, &gamma.handle, &beta.handle];
        if !self.params {
            backward(&x.client, problem, dtypes, inputs, [&mean.handle, &rstd.handle], acc, &dx.handle, None)?;
            return Ok(vec![dx]);
        }
        let sums = Shape::new([problem.batch, problem.channels]);
        let (sum_dh_xhat, sum_dh) = (empty(&x, sums.clone(), DType::F32), empty(&x, sums, DType::F32));
        backward(&x.client, problem, dtypes, inputs, [&mean.handle, &rstd.handle], acc, &dx.handle, Some([&sum_dh_xhat.handle, &sum_dh.handle]))?;
        // dγ and dβ: the per-plane sums over the batch (`[b, c]` → `[c]`), in γ's dtype.
        let reduce = |sums: CubeTensor<R>| {
            let total = Inner::<R, BT>::float_sum_dim(sums, 0);
            let total = Inner::<R, BT>::float_reshape(total, Shape::new([problem.channels]));
            if gamma.dtype == DType::F32 {
                total
            } else {
                Inner::<R, BT>::float_cast(total, FloatDType::from(gamma.dtype))
            }
        };
        Ok(vec![dx, reduce(sum_dh_xhat), reduce(sum_dh)])
    }
}

impl<R: CubeRuntime, BT: BoolElement> Operation<FusionCubeRuntime<R>> for GroupNormBackward<R, BT> {
    fn execute(&self, handles: &mut HandleContainer<<FusionCubeRuntime<R> as FusionRuntime>::FusionHandle>) {
        let [x, gamma, beta, dy, mean, rstd] = &self.desc.inputs[..6] else {
            unreachable!("the op is registered with six inputs and an optional seventh")
        };
        let get = |h: &mut HandleContainer<_>, t: &TensorIr| h.get_float_tensor::<Inner<R, BT>>(t);
        let inputs = [get(handles, x), get(handles, gamma), get(handles, beta), get(handles, dy)];
        let stats = [get(handles, mean), get(handles, rstd)];
        let acc = self.accumulate.then(|| get(handles, &self.desc.inputs[6]));
        let results = match self.kernel(inputs.clone(), stats.clone(), acc.clone()) {
            Ok(results) => {
                super::record_fused_group_norm();
                results
            }
            Err(reason) => {
                super::record_fallback(reason);
                let [x, gamma, beta, dy] = inputs;
                let [mean, rstd] = stats.map(super::tensor::<Inner<R, BT>, 3>);
                let t1 = super::tensor::<Inner<R, BT>, 1>;
                let shape = x.meta.shape().clone();
                let (dx, params) = super::group_norm_grads_math(as_planes::<R, BT>(x), t1(gamma), t1(beta), mean, rstd, as_planes::<R, BT>(dy), self.spec, self.params);
                let dx = from_planes(dx, shape);
                let dx = match acc {
                    Some(acc) => Inner::<R, BT>::float_add(dx, acc),
                    None => dx,
                };
                let mut results = vec![dx];
                if let Some((dg, db)) = params {
                    results.extend([dg.into_primitive().tensor(), db.into_primitive().tensor()]);
                }
                results
            }
        };
        for (ir, tensor) in self.desc.outputs.iter().zip(results) {
            handles.register_float_tensor::<Inner<R, BT>>(&ir.id, tensor);
        }
    }
}

#[cfg(all(test, feature = "wgpu-test"))]
mod tests {
    //! The kernels on CubeCL's wgpu runtime (lavapipe on a machine without a GPU) against a
    //! GroupNorm computed here in f64, and the fusion ops against burn's ops.
    //! `cargo test -p lora-core --release --features wgpu-test -- group_norm`.

    use super::*;
    use cubecl::wgpu::{WgpuDevice, WgpuRuntime};

    fn f32_type() -> StorageType {
        StorageType::Scalar(cubecl::ir::ElemType::Float(cubecl::ir::FloatKind::F32))
    }

    /// Deterministic pseudo-random values, uniform in `mean ± spread`.
    fn values(len: usize, seed: u32, mean: f32, spread: f32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                mean + spread * ((state % 20_001) as f32 / 10_000.0 - 1.0)
            })
            .collect()
    }

    /// What the kernels compute, in f64: `(y, mean, rstd, dx, Σ dh x̂, Σ dh)`.
    struct Reference {
        y: Vec<f64>,
        mean: Vec<f64>,
        rstd: Vec<f64>,
        dx: Vec<f64>,
        sum_dh_xhat: Vec<f64>,
        sum_dh: Vec<f64>,
    }

    fn reference(p: Problem, x: &[f32], gamma: &[f32], beta: &[f32], dy: &[f32]) -> Reference {
        let (groups, hw) = (p.spec.groups, p.plane_len);
        let per_group = p.channels / groups;
        let n = per_group * hw;
        let mut r = Reference {
            y: vec![0.0; x.len()],
            mean: vec![],
            rstd: vec![],
            dx: vec![0.0; x.len()],
            sum_dh_xhat: vec![0.0; p.batch * p.channels],
            sum_dh: vec![0.0; p.batch * p.channels],
        };
        for b in 0..p.batch {
            for g in 0..groups {
                let start = (b * p.channels + g * per_group) * hw;
                let xs: Vec<f64> = x[start..start + n].iter().map(|&v| f64::from(v)).collect();
                let mu = xs.iter().sum::<f64>() / n as f64;
                let var = xs.iter().map(|v| (v - mu).powi(2)).sum::<f64>() / n as f64;
                let rstd = 1.0 / (var + p.spec.epsilon).sqrt();
                r.mean.push(mu);
                r.rstd.push(rstd);
                let (mut dxhat, mut xhat_all) = (vec![0.0; n], vec![0.0; n]);
                for i in 0..n {
                    let c = g * per_group + i / hw;
                    let (gc, bc) = (f64::from(gamma[c]), f64::from(beta[c]));
                    let xhat = (xs[i] - mu) * rstd;
                    let h = xhat * gc + bc;
                    let s = 1.0 / (1.0 + (-h).exp());
                    let dyi = f64::from(dy[start + i]);
                    let (y, dh) = if p.spec.silu { (h * s, dyi * s * (1.0 + h * (1.0 - s))) } else { (h, dyi) };
                    r.y[start + i] = y;
                    r.sum_dh_xhat[b * p.channels + c] += dh * xhat;
                    r.sum_dh[b * p.channels + c] += dh;
                    dxhat[i] = dh * gc;
                    xhat_all[i] = xhat;
                }
                let m1 = dxhat.iter().sum::<f64>() / n as f64;
                let m2 = dxhat.iter().zip(&xhat_all).map(|(a, b)| a * b).sum::<f64>() / n as f64;
                for i in 0..n {
                    r.dx[start + i] = (dxhat[i] - m1 - xhat_all[i] * m2) * rstd;
                }
            }
        }
        r
    }

    fn read(client: &ComputeClient<WgpuRuntime>, handle: cubecl::server::Handle) -> Vec<f32> {
        client.read_one(handle).expect("read").chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    }

    /// The largest error of `got` against `want`, relative to `want`'s peak.
    fn worst(got: &[f32], want: &[f64]) -> f64 {
        assert_eq!(got.len(), want.len(), "lengths");
        let peak = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-6);
        got.iter().zip(want).map(|(&g, &w)| (f64::from(g) - w).abs()).fold(0.0, f64::max) / peak
    }

    /// Runs the forward and backward kernels on values `mean ± spread` and asserts each
    /// output's error (relative to its peak) against `bounds`: y, mean, rstd, dx, Σ dh x̂, Σ dh.
    fn run(p: Problem, mean: f32, spread: f32, bounds: [f64; 6]) {
        let client = WgpuRuntime::client(&WgpuDevice::default());
        let len = p.batch * p.channels * p.plane_len;
        let x = values(len, (len + p.channels) as u32, mean, spread);
        let gamma = values(p.channels, 3, 1.0, 0.5);
        let beta = values(p.channels, 5, 0.0, 0.5);
        let dy = values(len, 7, 0.0, 1.0);
        let want = reference(p, &x, &gamma, &beta, &dy);
        let upload = |v: &[f32]| client.create_from_slice(&v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>());
        let (hx, hg, hb, hdy) = (upload(&x), upload(&gamma), upload(&beta), upload(&dy));
        let groups = p.batch * p.spec.groups;
        let planes = p.batch * p.channels;
        let (y, m, r) = (client.empty(4 * len), client.empty(4 * groups), client.empty(4 * groups));
        forward::<WgpuRuntime>(&client, p, [f32_type(); 2], [&hx, &hg, &hb], [&y, &m, &r]).expect("forward");
        let (dx, a, b) = (client.empty(4 * len), client.empty(4 * planes), client.empty(4 * planes));
        // The row kernels (a LayerNorm) compute no per-plane sums.
        let sums = (!p.is_rows()).then_some([&a, &b]);
        backward::<WgpuRuntime>(&client, p, [f32_type(); 3], [&hx, &hdy, &hg, &hb], [&m, &r], None, &dx, sums).expect("backward");
        let outputs = [y, m, r, dx, a, b].map(|h| read(&client, h));
        let wanted = [&want.y, &want.mean, &want.rstd, &want.dx, &want.sum_dh_xhat, &want.sum_dh];
        let checked = if p.is_rows() { 4 } else { 6 };
        for (i, name) in ["y", "mean", "rstd", "dx", "sum dh x̂", "sum dh"].iter().enumerate().take(checked) {
            let err = worst(&outputs[i], wanted[i]);
            assert!(err <= bounds[i], "{p:?} {name}: error {err:.2e} of the peak, over {:.0e}", bounds[i]);
        }
    }

    const TIGHT: [f64; 6] = [1e-5, 1e-6, 1e-5, 1e-4, 1e-5, 1e-5];

    fn problem(batch: usize, channels: usize, groups: usize, plane_len: usize, silu: bool) -> Problem {
        Problem {
            batch,
            channels,
            plane_len,
            spec: GroupNormSpec { groups, epsilon: 1e-5, silu },
        }
    }

    #[test]
    fn wgpu_group_norm_kernels_match_the_reference() {
        // Planes of odd length (scalar loads), of lengths the 4-wide vectors divide, longer
        // than a cube's units times their vectors; one group, one channel per group; more
        // channels in a group than units in a cube.
        for (p, mean) in [
            (problem(2, 8, 4, 25, true), 0.5),
            (problem(1, 6, 2, 64, false), -1.0),
            (problem(3, 4, 4, 16, true), 0.0),
            (problem(2, 6, 1, 1600, true), 2.0),
            (problem(1, 3, 3, 9, false), 0.0),
            (problem(2, 300, 1, 16, true), 0.0),
        ] {
            run(p, mean, 2.0, TIGHT);
        }
    }

    #[test]
    fn wgpu_layer_norm_rows_match_the_reference() {
        // A LayerNorm as a GroupNorm of one group over `[rows, d, 1, 1]`: rows of a
        // transformer's width, of an odd width (scalar loads), wider than a cube's units times
        // their vectors; with the SiLU too (the kernels allow it).
        for (rows, d, silu) in [(7, 320, false), (5, 33, false), (3, 2048, true), (MAX_GRID + 2, 4, false)] {
            assert!(problem(rows, d, 1, 1, silu).is_rows());
            run(problem(rows, d, 1, 1, silu), 0.5, 2.0, TIGHT);
        }
    }

    #[test]
    fn wgpu_group_norm_is_accurate_far_from_zero() {
        // Values 10⁴ ± 0.5: `Σx² − (Σx)² / n` in f32 would lose every digit of the variance
        // (and `x · scale + shift` most of the output's). What remains is the f32 mean's own
        // rounding (half an ulp of 10⁴, about 2·10⁻³ of σ), which PyTorch's f32 statistics
        // share. The kernels reach y 1.2e-3, rstd 6.5e-5, dx 1.0e-3, Σ dh x̂ 2.1e-3; without
        // the sums' pivots rstd is 2.5e-4, dx 1.8e-3 and Σ dh x̂ 3.1e-3, and `x · scale +
        // shift` makes y 2.3e-3.
        run(problem(2, 8, 2, 64, true), 1.0e4, 0.5, [1.8e-3, 1e-6, 1.5e-4, 1.5e-3, 2.5e-3, 1e-3]);
    }

    #[test]
    fn wgpu_group_norm_covers_more_planes_than_one_grid_axis() {
        run(problem(1, MAX_GRID + 5, MAX_GRID + 5, 16, true), 0.0, 1.0, TIGHT);
    }

    /// The ops on burn's fusion stream (`burn::backend::Wgpu`) between elementwise ops, for a
    /// contiguous and a transposed input, against burn's ops; γ and β in another dtype
    /// than the input where the runtime has f16.
    #[test]
    fn wgpu_fusion_ops_match_burn_ops() {
        // The switch and the call counter are process-global.
        let _guard = super::super::tests::SWITCH.lock().unwrap_or_else(|e| e.into_inner());
        use burn::tensor::{Distribution, Tensor};
        type W = burn::backend::Wgpu;
        let device = Default::default();
        let x = Tensor::<W, 4>::random([2, 8, 6, 6], Distribution::Normal(0.5, 2.0), &device);
        let dy = Tensor::<W, 4>::random([2, 8, 6, 6], Distribution::Normal(0.0, 1.0), &device);
        let gamma = Tensor::<W, 1>::random([8], Distribution::Normal(1.0, 0.5), &device);
        let beta = Tensor::<W, 1>::random([8], Distribution::Normal(0.0, 0.5), &device);
        let spec = GroupNormSpec { groups: 4, epsilon: 1e-5, silu: true };
        let chain = |fused: bool, transposed: bool| {
            super::super::set_fused_group_norm(fused);
            let input = x.clone() * 1.5 - 0.25;
            let input = if transposed { input.swap_dims(2, 3) } else { input };
            // The op without its statistics as outputs, for passes without a backward.
            let y_only = super::super::group_norm_output(input.clone(), gamma.clone(), beta.clone(), spec);
            let (y, mean, rstd) = super::super::group_norm(input.clone(), gamma.clone(), beta.clone(), spec);
            let (dx, dg, db) = super::super::group_norm_backward(input, gamma.clone(), beta.clone(), mean.clone(), rstd, dy.clone() * 2.0, spec);
            super::super::set_fused_group_norm(false);
            let data = |t: burn::tensor::TensorData| t.to_vec::<f32>().expect("f32 data");
            [data((y * 3.0).into_data()), data(mean.into_data()), data(dx.exp().into_data()), data(dg.into_data()), data(db.into_data()), data((y_only * 3.0).into_data())]
        };
        let before = super::super::vendor_stats();
        for transposed in [false, true] {
            let (ours, reference) = (chain(true, transposed), chain(false, transposed));
            for (what, (a, b)) in ["y", "mean", "dx", "dγ", "dβ", "y (output only)"].iter().zip(ours.iter().zip(&reference)) {
                assert_eq!(a.len(), b.len());
                let peak = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                for (i, (p, q)) in a.iter().zip(b).enumerate() {
                    assert!((p - q).abs() <= 1e-4 * peak.max(1.0), "transposed {transposed}: {what}[{i}]: {p} vs {q}");
                }
            }
        }
        let after = super::super::vendor_stats();
        assert_eq!(after.fallbacks, before.fallbacks, "fallbacks: {:?}", after.last_error);
        assert_eq!(after.fused_group_norm_calls - before.fused_group_norm_calls, 6);
    }

    /// A LayerNorm's rows (`[rows, d]`, one group) through the fusion ops: the forward
    /// pass and the input gradient in the row kernels, against burn's ops; the full
    /// backward pass (with `dγ`, `dβ`) stays in burn's ops. The `[rows, d, 1, 1]` layout
    /// takes the same kernels.
    #[test]
    fn wgpu_layer_norm_rows_through_the_fusion_ops() {
        // The switch and the call counter are process-global.
        let _guard = super::super::tests::SWITCH.lock().unwrap_or_else(|e| e.into_inner());
        use burn::tensor::{Distribution, Tensor};
        type W = burn::backend::Wgpu;
        let device = Default::default();
        let x = Tensor::<W, 3>::random([2, 77, 96], Distribution::Normal(0.5, 2.0), &device);
        let dy = Tensor::<W, 2>::random([154, 96], Distribution::Normal(0.0, 1.0), &device);
        let gamma = Tensor::<W, 1>::random([96], Distribution::Normal(1.0, 0.5), &device);
        let beta = Tensor::<W, 1>::random([96], Distribution::Normal(0.0, 0.5), &device);
        let spec = GroupNormSpec { groups: 1, epsilon: 1e-5, silu: false };
        let rows = |x: Tensor<W, 3>| x.reshape([154, 96]);
        let data = |t: Tensor<W, 2>| t.into_data().to_vec::<f32>().expect("f32 data");
        let chain = |fused: bool| {
            super::super::set_fused_group_norm(fused);
            let (y, mean, rstd) = super::super::group_norm(rows(x.clone() * 2.0), gamma.clone(), beta.clone(), spec);
            let dx = super::super::group_norm_input_grad(rows(x.clone() * 2.0), gamma.clone(), beta.clone(), mean.clone(), rstd.clone(), dy.clone(), spec);
            let (full, _, _) = super::super::group_norm_backward(rows(x.clone() * 2.0), gamma.clone(), beta.clone(), mean, rstd, dy.clone(), spec);
            let planes = (x.clone() * 2.0).reshape([154, 96, 1, 1]);
            let (y4, _, _) = super::super::group_norm(planes, gamma.clone(), beta.clone(), spec);
            super::super::set_fused_group_norm(false);
            [data(y), data(dx), data(full), data(y4.reshape([154, 96]))]
        };
        let before = super::super::vendor_stats();
        let (ours, reference) = (chain(true), chain(false));
        for (what, (a, b)) in ["y", "dx", "dx (full backward)", "y of [rows, d, 1, 1]"].iter().zip(ours.iter().zip(&reference)) {
            let peak = b.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            for (i, (p, q)) in a.iter().zip(b).enumerate() {
                assert!((p - q).abs() <= 1e-5 * peak.max(1.0), "{what}[{i}]: {p} vs {q}");
            }
        }
        let after = super::super::vendor_stats();
        assert_eq!(after.fallbacks, before.fallbacks, "fallbacks: {:?}", after.last_error);
        assert_eq!(after.fused_group_norm_calls - before.fused_group_norm_calls, 3, "forward (both layouts) and input gradient");
    }

    /// f16 activations and output gradients with f32 γ and β (a half-precision model whose
    /// norms stay in f32), against the f64 reference on the same f16 values.
    #[test]
    fn wgpu_group_norm_takes_f16_activations() {
        use half::f16;
        let client = WgpuRuntime::client(&WgpuDevice::default());
        let f16_type = StorageType::Scalar(cubecl::ir::ElemType::Float(cubecl::ir::FloatKind::F16));
        let p = problem(2, 8, 4, 48, true);
        let len = p.batch * p.channels * p.plane_len;
        let half = |v: Vec<f32>| v.into_iter().map(f16::from_f32).collect::<Vec<f16>>();
        let (x, dy) = (half(values(len, 11, 0.5, 2.0)), half(values(len, 13, 0.0, 1.0)));
        let (gamma, beta) = (values(p.channels, 3, 1.0, 0.5), values(p.channels, 5, 0.0, 0.5));
        let wide = |v: &[f16]| v.iter().map(|h| h.to_f32()).collect::<Vec<f32>>();
        let want = reference(p, &wide(&x), &gamma, &beta, &wide(&dy));
        let bytes16 = |v: &[f16]| v.iter().flat_map(|h| h.to_le_bytes()).collect::<Vec<u8>>();
        let bytes32 = |v: &[f32]| v.iter().flat_map(|f| f.to_le_bytes()).collect::<Vec<u8>>();
        let (hx, hdy) = (client.create_from_slice(&bytes16(&x)), client.create_from_slice(&bytes16(&dy)));
        let (hg, hb) = (client.create_from_slice(&bytes32(&gamma)), client.create_from_slice(&bytes32(&beta)));
        let groups = p.batch * p.spec.groups;
        let planes = p.batch * p.channels;
        let (y, m, r) = (client.empty(2 * len), client.empty(4 * groups), client.empty(4 * groups));
        forward::<WgpuRuntime>(&client, p, [f16_type, f32_type()], [&hx, &hg, &hb], [&y, &m, &r]).expect("forward");
        let (dx, a, b) = (client.empty(2 * len), client.empty(4 * planes), client.empty(4 * planes));
        backward::<WgpuRuntime>(&client, p, [f16_type, f16_type, f32_type()], [&hx, &hdy, &hg, &hb], [&m, &r], None, &dx, Some([&a, &b])).expect("backward");
        let read16 = |h| client.read_one(h).expect("read").chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect::<Vec<f32>>();
        // f16 outputs: half an ulp is 2⁻¹¹ of the value; statistics and sums stay f32.
        for (name, got, want, bound) in [
            ("y", read16(y), &want.y, 1e-3),
            ("dx", read16(dx), &want.dx, 1e-3),
            ("rstd", read(&client, r), &want.rstd, 1e-5),
            ("sum dh x̂", read(&client, a), &want.sum_dh_xhat, 1e-5),
        ] {
            let err = worst(&got, want);
            assert!(err <= bound, "{name}: error {err:.2e} of the peak");
        }
    }
}
