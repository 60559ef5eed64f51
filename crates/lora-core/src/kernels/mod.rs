//! Where the frozen base layers' convolutions and matmuls run.
//!
//! [`LoraConv2d`](crate::LoraConv2d) sends its base convolution through [`conv2d`], which
//! registers its own backward pass on burn's autodiff backend over Flex or CUDA (any
//! checkpointing strategy):
//!
//! - **Frozen weights cost no activation memory.** burn's conv backward keeps the input
//!   alive for the weight gradient even when the weight never receives one. Ours keeps the
//!   input only when the weight is tracked; the input gradient needs just the weight. In the
//!   UNet most conv inputs are GroupNorm + SiLU outputs that nothing else keeps.
//! - **cuDNN on CUDA** ([`set_cudnn`], `cuda` feature). burn 0.21's convolution kernels
//!   reach about a tenth of cuDNN's throughput on an H100/H200, and convolutions are about
//!   half of the UNet's FLOPs. With cuDNN on, the forward, input-gradient and
//!   weight-gradient convolutions of the CUDA backend run through `libcudnn` (version 9,
//!   loaded at run time; see [`cudnn_status`]).
//!
//! [`LoraLinear`](crate::LoraLinear) sends its base layer through [`linear`], and callers
//! with large matmuls of their own (sd-model's attention backward) use [`matmul`]: with
//! [`set_cublas`] on, matmuls of at least [`set_cublas_min_gflop`] run in cuBLAS on CUDA;
//! with [`set_fixed_matmul`] on, the others run in one fixed CubeCL kernel instead of burn's
//! autotuned matmul (whose tuning costs about half a minute per new shape on a first run).
//!
//! A shape or dtype a library rejects, or a missing library, falls back to burn's kernel for
//! that call and is counted in [`vendor_stats`]. Each library call waits for the GPU
//! pipeline to drain first (cubecl 0.10 does not expose its CUDA stream), which is why only
//! large problems are routed. Any other backend, or an asymmetric padding, takes burn's own
//! ops. [`set_custom_conv_backward`]`(false)` turns the conv op off everywhere.

use std::any::{Any, TypeId};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::NodeId;
use burn::backend::Autodiff;
use burn::nn::conv::Conv2d;
use burn::nn::Linear;
use burn::nn::PaddingConfig2d;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{ConvOptions, ConvTransposeOptions, FloatTensor};
use burn::tensor::{DType, Tensor, TensorMetadata, TensorPrimitive};

use crate::precision::cast_to;

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
mod cublas;
#[cfg(feature = "cuda")]
mod cudnn;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod conv_op;
#[cfg(feature = "cuda")]
mod cudnn_sdpa;
#[cfg(feature = "cuda")]
mod device;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod ordering;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
mod softmax;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
#[allow(dead_code)]
mod flash;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod group_norm;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod concat;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod fixed_matmul;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod lora_linear;
#[cfg(not(any(feature = "cuda", feature = "wgpu")))]
mod lora_linear {
    /// The inputs of [`super::lora_linear`] (the op itself needs a CubeCL backend).
    #[allow(dead_code)]
    pub(crate) struct LoraLinearInputs<B: burn::tensor::backend::Backend> {
        pub x: burn::tensor::Tensor<B, 2>,
        pub weight: burn::tensor::Tensor<B, 2>,
        pub bias: Option<burn::tensor::Tensor<B, 1>>,
        #[allow(clippy::type_complexity)]
        pub adapter: Option<(burn::tensor::Tensor<B, 2>, burn::tensor::Tensor<B, 2>)>,
        pub residual: Option<burn::tensor::Tensor<B, 2>>,
        pub scale: f32,
    }
}
pub(crate) use lora_linear::LoraLinearInputs;
mod dense;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod geglu;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod pack;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod split;
mod settings;
pub use settings::KernelSettings;
mod self_check;
pub use self_check::{check_routes, Route, RouteCheck};
#[cfg(all(test, feature = "cuda"))]
mod cuda_source;

static CUSTOM_CONV_BACKWARD: AtomicBool = AtomicBool::new(true);
static CUDNN: AtomicBool = AtomicBool::new(false);
static CUDNN_CALLS: AtomicU64 = AtomicU64::new(0);
static CUDNN_BLENDED_CALLS: AtomicU64 = AtomicU64::new(0);
static CUBLAS: AtomicBool = AtomicBool::new(false);
static CUBLAS_CALLS: AtomicU64 = AtomicU64::new(0);
/// Smallest matmul (in FLOPs) routed to cuBLAS; see [`set_cublas_min_gflop`].
static CUBLAS_MIN_FLOPS: AtomicU64 = AtomicU64::new(4_000_000_000);
/// Smallest tall matmul (in FLOPs) routed to cuBLAS; see [`set_cublas_tall_min_gflop`].
static CUBLAS_TALL_MIN_FLOPS: AtomicU64 = AtomicU64::new(250_000_000);

/// Default rows (`a`'s elements over its last dimension) from which a matmul counts as
/// tall for [`set_cublas_tall_min_gflop`]; [`set_cublas_tall_rows`] changes it.
pub const CUBLAS_TALL_ROWS: usize = 1024;
/// Rows from which a matmul counts as tall; see [`set_cublas_tall_rows`].
static CUBLAS_TALL_MIN_ROWS: AtomicUsize = AtomicUsize::new(CUBLAS_TALL_ROWS);
static FALLBACKS: AtomicU64 = AtomicU64::new(0);
static DEVICE_SYNC: AtomicBool = AtomicBool::new(false);
static FUSED_SOFTMAX: AtomicBool = AtomicBool::new(false);
static FUSED_SOFTMAX_CALLS: AtomicU64 = AtomicU64::new(0);
static FLASH: AtomicBool = AtomicBool::new(false);
static FLASH_CALLS: AtomicU64 = AtomicU64::new(0);
static CUDNN_ATTENTION: AtomicBool = AtomicBool::new(false);
static CUDNN_PADDED_BACKWARD: AtomicBool = AtomicBool::new(true);
static CUDNN_ATTENTION_CALLS: AtomicU64 = AtomicU64::new(0);
/// Shared memory per cube of the flash-attention kernels unless set otherwise: 48 KiB keeps
/// four cubes (16 warps) resident per multiprocessor on an H100/H200.
const DEFAULT_FLASH_SHARED: usize = 48 * 1024;
static FLASH_SHARED: AtomicUsize = AtomicUsize::new(DEFAULT_FLASH_SHARED);
static FLASH_MAX_KEYS: AtomicUsize = AtomicUsize::new(usize::MAX);
static FLASH_PREFETCH: AtomicBool = AtomicBool::new(false);
static FUSED_GROUP_NORM: AtomicBool = AtomicBool::new(false);
static FUSED_GROUP_NORM_CALLS: AtomicU64 = AtomicU64::new(0);
static FUSED_CONCAT: AtomicBool = AtomicBool::new(true);
static CUDNN_BLEND: AtomicBool = AtomicBool::new(true);
static FUSED_CONCAT_CALLS: AtomicU64 = AtomicU64::new(0);
static FIXED_MATMUL: AtomicBool = AtomicBool::new(false);
static FIXED_MATMUL_CALLS: AtomicU64 = AtomicU64::new(0);
static FUSED_LORA_LINEAR: AtomicBool = AtomicBool::new(false);
static FUSED_LORA_LINEAR_CALLS: AtomicU64 = AtomicU64::new(0);
static FUSED_GEGLU_CALLS: AtomicU64 = AtomicU64::new(0);
/// Largest head dimension given to the flash-attention kernels: their tiles for 160 fit in
/// 48 KiB of shared memory with 16-wide `cmma` tiles (see `flash::plan`).
const FLASH_MAX_HEAD_DIM: usize = 160;
static DEVICE_ORDERED: AtomicU64 = AtomicU64::new(0);
static ORDERING_ERROR: Mutex<Option<String>> = Mutex::new(None);
static LAST_ERROR: Mutex<Option<String>> = Mutex::new(None);

/// Turns the base convolutions' own backward pass (see the [module docs](self)) on or off
/// for the whole process (default on). Off, burn differentiates `Conv2d::forward` itself;
/// the gradients are the same, the memory is not. For benchmarks and A/B checks.
pub fn set_custom_conv_backward(enabled: bool) {
    CUSTOM_CONV_BACKWARD.store(enabled, Ordering::Relaxed);
}

/// Whether the base convolutions use their own backward pass ([`set_custom_conv_backward`]).
pub fn custom_conv_backward() -> bool {
    CUSTOM_CONV_BACKWARD.load(Ordering::Relaxed)
}

/// Routes the CUDA backend's base convolutions (forward and both gradients) to cuDNN, for
/// the whole process (default off). Has no effect without the `cuda` feature or on other
/// backends (but wgpu with the `wgpu` feature: there the convolutions take the same
/// custom operation, burn's kernels inside); a missing or failing cuDNN falls back to
/// burn's kernels per call.
pub fn set_cudnn(enabled: bool) {
    CUDNN.store(enabled, Ordering::Relaxed);
}

/// Whether [`set_cudnn`] is on.
pub fn cudnn_enabled() -> bool {
    CUDNN.load(Ordering::Relaxed)
}

/// Routes the CUDA backend's large matmuls to cuBLAS, for the whole process (default off):
/// the frozen linear layers (forward and input gradient, through [`linear`]) and every
/// [`matmul`] caller (sd-model's attention backward). Has no effect without the `cuda`
/// feature or on other backends; a missing or failing cuBLAS falls back to burn's kernel.
pub fn set_cublas(enabled: bool) {
    CUBLAS.store(enabled, Ordering::Relaxed);
}

/// Whether [`set_cublas`] is on.
pub fn cublas_enabled() -> bool {
    CUBLAS.load(Ordering::Relaxed)
}

/// The smallest matmul routed to cuBLAS, in GFLOP (`2·batch·m·n·k`; default 4). Each routed
/// call drains the GPU pipeline once (see the [module docs](self)), which costs more than
/// cuBLAS saves on small problems.
pub fn set_cublas_min_gflop(gflop: f64) {
    CUBLAS_MIN_FLOPS.store((gflop.max(0.0) * 1e9) as u64, Ordering::Relaxed);
}

/// The smallest *tall* matmul routed to cuBLAS, in GFLOP (default 0.25): one whose `a` has
/// at least [`CUBLAS_TALL_ROWS`] rows. On an H200 (2026-12-04, SD1.5 at 512 px) routing
/// every matmul from 0.25 GFLOP made a batch-1 training step 1.2x faster (its attention
/// projections, 0.84 GFLOP over 4096 / 1024 / 256 rows, ran ~10x slower in the fixed
/// kernel) but a batch-8 step 0.8x as fast (the matmuls it added there have 512–616 rows:
/// the cross-attention's keys and values, the middle block); the tall rule keeps the
/// first kind and leaves the second. Set it to [`set_cublas_min_gflop`]'s value to route
/// by size alone.
pub fn set_cublas_tall_min_gflop(gflop: f64) {
    CUBLAS_TALL_MIN_FLOPS.store((gflop.max(0.0) * 1e9) as u64, Ordering::Relaxed);
}

/// The rows (`a`'s elements over its last dimension) from which a matmul counts as tall
/// for [`set_cublas_tall_min_gflop`] (default [`CUBLAS_TALL_ROWS`], 1024). At 512 a CFG
/// inference step (a batch of 2) also hands SD1.5's 256-token level to cuBLAS: its
/// attention projections, 512 rows of 1280 channels, 1.7 GFLOP each. A training step at
/// batch 8 then routes its 512- and 616-row matmuls too, which measured slower on an H200
/// when they were routed by size (see [`set_cublas_tall_min_gflop`]).
pub fn set_cublas_tall_rows(rows: usize) {
    CUBLAS_TALL_MIN_ROWS.store(rows, Ordering::Relaxed);
}

/// How a cuDNN or cuBLAS call is ordered with burn's kernels on the CUDA backend.
///
/// cubecl 0.10 does not expose the CUDA stream burn's kernels run on, so library calls run
/// on a stream of their own and must be ordered with burn's work some other way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VendorSync {
    /// The host waits for burn's queued kernels to finish, queues the call and waits for
    /// it: one pipeline drain per call, during which the GPU idles while the host catches
    /// up. Proven, and the default.
    #[default]
    Host,
    /// The GPU orders the call: a one-thread kernel on burn's stream marks that the inputs
    /// are ready, a one-thread kernel on the library's stream waits for the mark, the call
    /// runs, a one-thread kernel marks it done, and a one-thread kernel on burn's stream
    /// spins until it is. The host never waits. The first call of each problem (shapes,
    /// dtypes, algorithm) is still host-ordered, so that a library's first-use work
    /// (loading kernels, freeing memory, which wait for the whole device) cannot wait on a
    /// spinning kernel. Where the library stream's kernels fail to load or launch, calls
    /// fall back to [`VendorSync::Host`] (see [`VendorStats::ordering_error`]).
    Device,
}

impl std::str::FromStr for VendorSync {
    type Err = String;

    /// `host` or `device`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "host" => Ok(Self::Host),
            "device" => Ok(Self::Device),
            other => Err(format!("`{other}`: expected `host` or `device`")),
        }
    }
}

/// Chooses how cuDNN / cuBLAS calls are ordered with burn's kernels (default
/// [`VendorSync::Host`]); has no effect on other backends. The mode is read when a call
/// runs, which burn-fusion may defer: sync the device before changing it mid-run.
///
/// ```
/// use lora_core::kernels::{set_vendor_sync, vendor_sync, VendorSync};
///
/// let mode: VendorSync = "device".parse().unwrap();
/// set_vendor_sync(mode);
/// assert_eq!(vendor_sync(), VendorSync::Device);
/// set_vendor_sync(VendorSync::Host);
/// ```
pub fn set_vendor_sync(mode: VendorSync) {
    DEVICE_SYNC.store(mode == VendorSync::Device, Ordering::Relaxed);
}

/// The current [`VendorSync`].
pub fn vendor_sync() -> VendorSync {
    if DEVICE_SYNC.load(Ordering::Relaxed) {
        VendorSync::Device
    } else {
        VendorSync::Host
    }
}

/// Counters of the vendor-library routing since the process started.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VendorStats {
    /// Convolutions (forward or gradient) that ran in cuDNN.
    pub cudnn_calls: u64,
    /// Of those, forward convolutions that cuDNN wrote onto their addend (the residual or
    /// time embedding plus the bias; [`set_cudnn_blend`]).
    pub cudnn_blended_calls: u64,
    /// Matmuls that ran in cuBLAS.
    pub cublas_calls: u64,
    /// Refusals: calls meant for cuDNN / cuBLAS or one of our kernels that ran elsewhere
    /// (an attention pass refused by cuDNN and then by the flash kernels counts twice).
    pub fallbacks: u64,
    /// Why the most recent fallback happened.
    pub last_error: Option<String>,
    /// Library calls ordered on the GPU ([`VendorSync::Device`]), without a host wait.
    pub device_ordered: u64,
    /// Times a GPU-side wait of [`VendorSync::Device`] gave up (burn's stream's wait for a
    /// library call's output after about a second, ours for its inputs after about half a
    /// minute) and let work go on, so a buffer may have been read too early; should be 0.
    pub ordering_timeouts: u64,
    /// Why [`VendorSync::Device`] could not be used (calls were then host-ordered), or why
    /// its timeouts could not be read.
    pub ordering_error: Option<String>,
    /// Softmaxes that ran in the fused kernel ([`set_fused_softmax`]).
    pub fused_softmax_calls: u64,
    /// Attention forward and backward passes that ran in the flash-attention kernels
    /// ([`set_flash_attention`]).
    pub flash_attention_calls: u64,
    /// GroupNorm forward and backward passes that ran in the fused kernels
    /// ([`set_fused_group_norm`]).
    pub fused_group_norm_calls: u64,
    /// Flat concatenations that ran in the multi-tensor copy kernel ([`concat_flat`]).
    pub fused_concat_calls: u64,
    /// Matmuls that ran in the fixed (not autotuned) kernel ([`set_fixed_matmul`]).
    pub fixed_matmul_calls: u64,
    /// Attention forward and backward passes that ran in cuDNN's fused attention engines
    /// ([`set_cudnn_attention`]).
    pub cudnn_attention_calls: u64,
    /// LoRA linear layers' forward and backward passes that ran as one op each
    /// ([`set_fused_lora_linear`]).
    pub fused_lora_linear_calls: u64,
    /// GEGLU passes (with the projection's bias) that ran as one op each
    /// ([`geglu_bias`], [`geglu_bias_backward`]).
    pub fused_geglu_calls: u64,
}

/// What the vendor-library routing has done so far (see [`VendorStats`]).
///
/// Once calls have been ordered on the GPU this reads a status word from each device, which
/// waits for the work queued there: call it between steps, not inside one.
pub fn vendor_stats() -> VendorStats {
    let device_ordered = DEVICE_ORDERED.load(Ordering::Relaxed);
    let ordering_error = ORDERING_ERROR.lock().map(|e| e.clone()).unwrap_or(None);
    // Timeouts can only have happened on a device that ordered calls.
    let timeouts = if device_ordered > 0 { ordering_timeouts() } else { Ok(0) };
    let (ordering_timeouts, ordering_error) = match timeouts {
        Ok(n) => (n, ordering_error),
        Err(reason) => (0, Some(reason)),
    };
    VendorStats {
        cudnn_calls: CUDNN_CALLS.load(Ordering::Relaxed),
        cudnn_blended_calls: CUDNN_BLENDED_CALLS.load(Ordering::Relaxed),
        cublas_calls: CUBLAS_CALLS.load(Ordering::Relaxed),
        fallbacks: FALLBACKS.load(Ordering::Relaxed),
        last_error: LAST_ERROR.lock().map(|e| e.clone()).unwrap_or(None),
        device_ordered,
        ordering_timeouts,
        ordering_error,
        fused_softmax_calls: FUSED_SOFTMAX_CALLS.load(Ordering::Relaxed),
        flash_attention_calls: FLASH_CALLS.load(Ordering::Relaxed),
        fused_group_norm_calls: FUSED_GROUP_NORM_CALLS.load(Ordering::Relaxed),
        fused_concat_calls: FUSED_CONCAT_CALLS.load(Ordering::Relaxed),
        fixed_matmul_calls: FIXED_MATMUL_CALLS.load(Ordering::Relaxed),
        cudnn_attention_calls: CUDNN_ATTENTION_CALLS.load(Ordering::Relaxed),
        fused_lora_linear_calls: FUSED_LORA_LINEAR_CALLS.load(Ordering::Relaxed),
        fused_geglu_calls: FUSED_GEGLU_CALLS.load(Ordering::Relaxed),
    }
}

/// Whether cuDNN can be used in this process: `Ok(version)` (e.g. `90800` for 9.8.0) when
/// the library loads and a handle can be created, otherwise why not. Always an error
/// without the `cuda` feature.
pub fn cudnn_status() -> Result<usize, String> {
    #[cfg(feature = "cuda")]
    {
        cudnn::status()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err("built without the `cuda` feature".to_string())
    }
}

/// Whether cuDNN's fused attention can be used in this process: `Ok(version)` when cuDNN
/// 9.6 or later loads and a handle can be created, otherwise why not. Always an error
/// without the `cuda` feature.
pub fn cudnn_attention_status() -> Result<usize, String> {
    #[cfg(feature = "cuda")]
    {
        cudnn_sdpa::status()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err("built without the `cuda` feature".to_string())
    }
}

/// `Ok` when cuBLAS loads and a handle can be created on device 0, otherwise why not.
/// Always an error without the `cuda` feature.
pub fn cublas_status() -> Result<(), String> {
    #[cfg(feature = "cuda")]
    {
        cublas::status()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err("built without the `cuda` feature".to_string())
    }
}

/// Starts (`start`) or stops CUDA's profiler data collection on device `index`
/// (`cuProfilerStart` / `cuProfilerStop` in the primary context, the one burn's CUDA backend
/// uses). Profilers started with their collection off (`ncu --profile-from-start off`,
/// `nsys -c cudaProfilerApi`) then record only the kernels launched in between; without a
/// profiler both calls do nothing. Always an error without the `cuda` feature, and when the
/// driver cannot be loaded.
///
/// ```
/// // On a machine without CUDA (or a build without the `cuda` feature) this is an error,
/// // never a panic.
/// let _ = lora_core::kernels::cuda_profiler(0, true);
/// ```
pub fn cuda_profiler(index: usize, start: bool) -> Result<(), String> {
    #[cfg(feature = "cuda")]
    {
        device::profiler(index, start)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (index, start);
        Err("built without the `cuda` feature".to_string())
    }
}

/// One convolution ran in cuDNN (`blended`: written onto its addend, `beta = 1`).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn record_cudnn_call(blended: bool) {
    CUDNN_CALLS.fetch_add(1, Ordering::Relaxed);
    if blended {
        CUDNN_BLENDED_CALLS.fetch_add(1, Ordering::Relaxed);
    }
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn record_cublas_call() {
    CUBLAS_CALLS.fetch_add(1, Ordering::Relaxed);
}

fn ordering_timeouts() -> Result<u64, String> {
    #[cfg(feature = "cuda")]
    {
        device::ordering_timeouts()
    }
    #[cfg(not(feature = "cuda"))]
    {
        Ok(0)
    }
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn record_flash_attention() {
    FLASH_CALLS.fetch_add(1, Ordering::Relaxed);
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn record_cudnn_attention() {
    CUDNN_ATTENTION_CALLS.fetch_add(1, Ordering::Relaxed);
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn record_fused_group_norm() {
    FUSED_GROUP_NORM_CALLS.fetch_add(1, Ordering::Relaxed);
}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn record_fused_concat() {
    FUSED_CONCAT_CALLS.fetch_add(1, Ordering::Relaxed);
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn record_fused_softmax() {
    FUSED_SOFTMAX_CALLS.fetch_add(1, Ordering::Relaxed);
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn record_device_ordered() {
    DEVICE_ORDERED.fetch_add(1, Ordering::Relaxed);
}

/// Remembers why device-side ordering is unavailable (the first reason is kept).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn record_ordering_unavailable(reason: String) {
    if let Ok(mut error) = ORDERING_ERROR.lock() {
        error.get_or_insert(reason);
    }
}

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn record_fallback(reason: String) {
    FALLBACKS.fetch_add(1, Ordering::Relaxed);
    if let Ok(mut last) = LAST_ERROR.lock() {
        *last = Some(reason);
    }
}

/// `conv.forward(x)`, through the custom op where it applies (see the [module docs](self)).
///
/// ```
/// use burn::backend::{Autodiff, Flex};
/// use burn::nn::conv::Conv2dConfig;
/// use burn::nn::PaddingConfig2d;
/// use burn::tensor::{Distribution, Tensor};
///
/// type B = Autodiff<Flex>;
/// let device = Default::default();
/// let conv = Conv2dConfig::new([3, 4], [3, 3])
///     .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
///     .init::<B>(&device);
/// let x = Tensor::<B, 4>::random([2, 3, 8, 8], Distribution::Default, &device);
/// let ours = lora_core::kernels::conv2d(&conv, x.clone());
/// let err: f32 = (ours - conv.forward(x)).abs().max().into_scalar();
/// assert!(err < 1e-5);
/// ```
pub fn conv2d<B: Backend>(conv: &Conv2d<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    conv2d_plus(conv, x, None)
}

/// `conv.forward(x) + addend`, where `addend` is `[N, K, OH, OW]` (the output's shape: a
/// residual) or `[N, K, 1, 1]` (one value per sample and channel: a ResNet block's time
/// embedding), in one operation where [`conv2d`]'s custom op applies: on CUDA with cuDNN
/// the addition happens in the convolution's output stage (cuDNN's `beta = 1` blend, with
/// the bias folded into the addend), so neither the addition nor the bias costs a pass over
/// the output of its own. The addend's gradient is the output's (summed over the spatial
/// axes for `[N, K, 1, 1]`). Other shapes take burn's broadcasting addition after the
/// convolution.
///
/// ```
/// use burn::backend::{Autodiff, Flex};
/// use burn::nn::conv::Conv2dConfig;
/// use burn::nn::PaddingConfig2d;
/// use burn::tensor::{Distribution, Tensor};
///
/// type B = Autodiff<Flex>;
/// let device = Default::default();
/// let conv = Conv2dConfig::new([3, 4], [3, 3])
///     .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
///     .init::<B>(&device);
/// let x = Tensor::<B, 4>::random([2, 3, 8, 8], Distribution::Default, &device);
/// let temb = Tensor::<B, 4>::random([2, 4, 1, 1], Distribution::Default, &device);
/// let ours = lora_core::kernels::conv2d_add(&conv, x.clone(), temb.clone());
/// let err: f32 = (ours - (conv.forward(x) + temb)).abs().max().into_scalar();
/// assert!(err < 1e-5);
/// ```
pub fn conv2d_add<B: Backend>(conv: &Conv2d<B>, x: Tensor<B, 4>, addend: Tensor<B, 4>) -> Tensor<B, 4> {
    conv2d_plus(conv, x, Some(Addend::Map(addend)))
}

/// [`conv2d_add`] with `per_channel [N, K]` added at every pixel of the output (sample
/// `n`, channel `k`): a ResNet block's projected time embedding, with no reshape of its
/// own on the fusion stream (the op views it as `[N, K, 1, 1]`).
///
/// ```
/// use burn::backend::Flex;
/// use burn::nn::conv::Conv2dConfig;
/// use burn::tensor::{Distribution, Tensor};
///
/// let device = Default::default();
/// let conv = Conv2dConfig::new([3, 4], [1, 1]).init::<Flex>(&device);
/// let x = Tensor::<Flex, 4>::random([2, 3, 5, 5], Distribution::Default, &device);
/// let temb = Tensor::<Flex, 2>::random([2, 4], Distribution::Default, &device);
/// let ours = lora_core::kernels::conv2d_add_channels(&conv, x.clone(), temb.clone());
/// let err: f32 = (ours - (conv.forward(x) + temb.reshape([2, 4, 1, 1]))).abs().max().into_scalar();
/// assert!(err < 1e-5);
/// ```
pub fn conv2d_add_channels<B: Backend>(conv: &Conv2d<B>, x: Tensor<B, 4>, per_channel: Tensor<B, 2>) -> Tensor<B, 4> {
    conv2d_plus(conv, x, Some(Addend::Channels(per_channel)))
}

/// What [`conv2d_add`] (`Map`) or [`conv2d_add_channels`] (`Channels`) adds.
enum Addend<B: Backend> {
    /// `[N, K, OH, OW]` or `[N, K, 1, 1]`.
    Map(Tensor<B, 4>),
    /// `[N, K]`.
    Channels(Tensor<B, 2>),
}

impl<B: Backend> Addend<B> {
    /// As a tensor of the output's rank (a reshape for `Channels`).
    fn into_map(self) -> Tensor<B, 4> {
        match self {
            Addend::Map(t) => t,
            Addend::Channels(t) => {
                let [n, k] = t.dims();
                t.reshape([n, k, 1, 1])
            }
        }
    }

    /// The addend as the dims of a map (`Channels` as `[N, K, 1, 1]`) and its dtype.
    fn map_dims(&self) -> ([usize; 4], DType) {
        match self {
            Addend::Map(t) => (t.dims(), t.dtype()),
            Addend::Channels(t) => {
                let [n, k] = t.dims();
                ([n, k, 1, 1], t.dtype())
            }
        }
    }

    /// The backend primitive (any rank: the op's kernels view `[N, K]` as `[N, K, 1, 1]`).
    fn into_primitive(self) -> FloatTensor<B> {
        match self {
            Addend::Map(t) => t.into_primitive().tensor(),
            Addend::Channels(t) => t.into_primitive().tensor(),
        }
    }

    /// The same addend as a tensor of `X`, which `B` must be.
    fn into_backend<X: Backend>(self) -> Addend<X> {
        let checked = "the backend was checked";
        match self {
            Addend::Map(t) => Addend::Map(downcast(t).expect(checked)),
            Addend::Channels(t) => Addend::Channels(downcast(t).expect(checked)),
        }
    }
}

/// [`conv2d`] plus an optional addend (see [`conv2d_add`]).
fn conv2d_plus<B: Backend>(conv: &Conv2d<B>, x: Tensor<B, 4>, addend: Option<Addend<B>>) -> Tensor<B, 4> {
    let weight = conv.weight.val();
    let options = symmetric_options(conv).filter(|options| {
        custom_conv_backward() && weight.dtype() == x.dtype() && addend.as_ref().is_none_or(|a| addend_fits(a, &x, &weight, options))
    });
    let Some(options) = options else {
        let y = conv.forward(x);
        return match addend {
            Some(a) => {
                let dtype = y.dtype();
                y + cast_to(a.into_map(), dtype)
            }
            None => y,
        };
    };
    let dtype = x.dtype();
    // The bias in the activations' dtype goes into the convolution op (one operation, not
    // a reshape and an addition after it); a trainable one is added after the op.
    let bias = conv.bias.as_ref().map(|b| cast_to(b.val(), dtype));
    let args = ConvArgs { x, weight, bias, addend };
    // Elsewhere burn's convolution with the bias (and the addend after it), the arithmetic
    // of the op's default kernels, so that a pass without autodiff gives the values a pass
    // with it does: gradient checkpointing recomputes blocks from checkpoints taken
    // without autodiff.
    dispatch(args, &options).unwrap_or_else(|ConvArgs { x, weight, bias, addend }| {
        let y = burn::tensor::module::conv2d(x, weight, bias, options);
        match addend {
            Some(a) => y + a.into_map(),
            None => y,
        }
    })
}

/// Whether `addend` is an addend the op takes for `conv(x, weight)`: the activations' dtype
/// and the output's shape, or `[N, K, 1, 1]`.
fn addend_fits<B: Backend>(addend: &Addend<B>, x: &Tensor<B, 4>, weight: &Tensor<B, 4>, options: &ConvOptions<2>) -> bool {
    let [n, _, h, w] = x.dims();
    let [k, _, kh, kw] = weight.dims();
    let out = |size: usize, kernel: usize, axis: usize| {
        (size + 2 * options.padding[axis]).checked_sub(options.dilation[axis] * (kernel - 1) + 1).map(|span| span / options.stride[axis] + 1)
    };
    let (dims, dtype) = addend.map_dims();
    dtype == x.dtype() && (Some(dims) == out(h, kh, 0).zip(out(w, kw, 1)).map(|(oh, ow)| [n, k, oh, ow]) || dims == [n, k, 1, 1])
}

/// A convolution's operands: input, weight, optional bias and addend (in the input's
/// dtype).
struct ConvArgs<B: Backend> {
    x: Tensor<B, 4>,
    weight: Tensor<B, 4>,
    bias: Option<Tensor<B, 1>>,
    addend: Option<Addend<B>>,
}

impl<B: Backend> ConvArgs<B> {
    /// The operands as tensors of `X`, which `B` must be. Moved, not cloned: an input the
    /// op reads last is released by it, where a clone would leave a release operation of
    /// its own on a fusion backend's stream (the input of every frozen convolution).
    fn into_backend<X: Backend>(self) -> ConvArgs<X> {
        let checked = "the backend was checked";
        ConvArgs {
            x: downcast(self.x).expect(checked),
            weight: downcast(self.weight).expect(checked),
            bias: self.bias.map(|b| downcast(b).expect(checked)),
            addend: self.addend.map(Addend::into_backend),
        }
    }
}

/// burn's `ConvOptions` for `conv`, when its padding is explicit (or none) and the same on
/// both sides of each axis: what cuDNN and burn's conv op take, and what every SD
/// convolution uses. `Same` padding takes burn's own path, which resolves it per input size.
fn symmetric_options<B: Backend>(conv: &Conv2d<B>) -> Option<ConvOptions<2>> {
    let padding = match conv.padding {
        PaddingConfig2d::Valid => [0, 0],
        PaddingConfig2d::Explicit(top, left, bottom, right) if top == bottom && left == right => [top, left],
        _ => return None,
    };
    Some(ConvOptions::new(conv.stride, padding, conv.dilation, conv.groups))
}

/// The custom op for the backends it is registered on; the operands back elsewhere.
fn dispatch<B: Backend>(args: ConvArgs<B>, options: &ConvOptions<2>) -> Result<Tensor<B, 4>, ConvArgs<B>> {
    use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, NoCheckpointing};
    let is = |id: TypeId| TypeId::of::<B>() == id;
    macro_rules! on_autodiff {
        ($x:ty) => {
            if is(TypeId::of::<Autodiff<$x, NoCheckpointing>>()) {
                return Ok(for_autodiff::<B, $x, NoCheckpointing>(args, options));
            }
            if is(TypeId::of::<Autodiff<$x, BalancedCheckpointing>>()) {
                return Ok(for_autodiff::<B, $x, BalancedCheckpointing>(args, options));
            }
        };
    }
    on_autodiff!(burn::backend::Flex);
    #[cfg(feature = "cuda")]
    {
        on_autodiff!(burn::backend::Cuda);
        if is(TypeId::of::<burn::backend::Cuda>()) && cudnn_enabled() {
            return Ok(for_inference::<B, burn::backend::Cuda>(args, options));
        }
    }
    // On wgpu for the `wgpu` feature (burn's kernels), so that the op's graph (and its
    // count of fusion-stream operations) can be studied without a GPU.
    #[cfg(feature = "wgpu")]
    {
        on_autodiff!(burn::backend::Wgpu);
        if is(TypeId::of::<burn::backend::Wgpu>()) && cudnn_enabled() {
            return Ok(for_inference::<B, burn::backend::Wgpu>(args, options));
        }
    }
    Err(args)
}

/// `value` as a `U` when it is one: moves a tensor into the concrete backend type `B` was
/// just checked to be (a `TypeId` check and an `Any` downcast, no unsafe code).
#[doc(hidden)]
pub fn downcast<T: 'static, U: 'static>(value: T) -> Option<U> {
    (Box::new(value) as Box<dyn Any>).downcast::<U>().ok().map(|b| *b)
}

/// A backend primitive (as backward passes receive them) as a tensor of rank `D`.
#[doc(hidden)]
pub fn tensor<X: Backend, const D: usize>(primitive: FloatTensor<X>) -> Tensor<X, D> {
    Tensor::from_primitive(TensorPrimitive::Float(primitive))
}

/// `t`'s values laid out densely (row-major), or `t` itself: on the CPU backend (Flex) a
/// strided view whose innermost dimension is contiguous, or whose last two dimensions are
/// a transposed matrix, is copied in runs or tiles, where burn-flex would make it dense
/// element by element when an op needs it so (its attention reads dense heads; a
/// `reshape` of most permuted views copies). Other backends, dense tensors and other
/// views are returned as they are. The values are the same either way; call it where a
/// view is about to be made dense anyway, such as attention heads split from rows.
///
/// ```
/// use burn::backend::Flex;
/// use burn::tensor::{Int, Tensor};
///
/// let device = Default::default();
/// let rows = Tensor::<Flex, 1, Int>::arange(0..24, &device).float().reshape([1, 3, 2, 4]);
/// let heads = rows.clone().swap_dims(1, 2); // [1, 2, 3, 4]: a strided view
/// let dense = lora_core::kernels::dense(heads.clone());
/// assert_eq!(dense.to_data(), heads.to_data());
/// ```
pub fn dense<X: Backend, const D: usize>(t: Tensor<X, D>) -> Tensor<X, D> {
    if TypeId::of::<X>() != TypeId::of::<burn::backend::Flex>() {
        return t;
    }
    let Some(flex) = downcast::<FloatTensor<X>, burn_flex::FlexTensor>(t.clone().into_primitive().tensor()) else {
        return t;
    };
    let Some(copy) = dense::dense(&flex) else {
        return t;
    };
    downcast::<burn_flex::FlexTensor, FloatTensor<X>>(copy).map_or(t, tensor)
}

/// Whether `B` is the CPU backend (Flex), with or without autodiff: it runs every op
/// eagerly, so op order and fusion-friendly formulations do not matter there (and burn's
/// own `linear` is faster on it than the equivalent matmuls).
pub(crate) fn on_flex<B: Backend>() -> bool {
    use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, NoCheckpointing};
    type Flex = burn::backend::Flex;
    let id = TypeId::of::<B>();
    id == TypeId::of::<Flex>() || id == TypeId::of::<Autodiff<Flex, NoCheckpointing>>() || id == TypeId::of::<Autodiff<Flex, BalancedCheckpointing>>()
}

/// The op on `Autodiff<X, C>`, which `B` must be.
fn for_autodiff<B: Backend, X: ConvKernels, C: CheckpointStrategy>(args: ConvArgs<B>, options: &ConvOptions<2>) -> Tensor<B, 4> {
    let ConvArgs { x, weight, bias, addend } = args.into_backend::<Autodiff<X, C>>();
    // A trainable bias is added after the op (burn differentiates the addition).
    let (frozen, trained) = match bias {
        Some(b) if !b.clone().into_primitive().tensor().node.requirement.is_none() => (None, Some(b)),
        b => (b.map(|b| b.inner().into_primitive().tensor()), None),
    };
    let mut out = autodiff_op::<X, C>(x, weight, frozen, addend, options.clone());
    if let Some(b) = trained {
        let c = b.dims()[0];
        out = out + b.reshape([1, c, 1, 1]);
    }
    downcast(out).expect("the backend was checked")
}

/// The op without autodiff on `X`, which `B` must be.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn for_inference<B: Backend, X: ConvKernels>(args: ConvArgs<B>, options: &ConvOptions<2>) -> Tensor<B, 4> {
    let ConvArgs { x, weight, bias, addend } = args.into_backend::<X>();
    let primitive = |t: Tensor<X, 4>| t.into_primitive().tensor();
    let y = X::forward(primitive(x), primitive(weight), bias.map(|b| b.into_primitive().tensor()), addend.map(Addend::into_primitive), options);
    downcast(tensor::<X, 4>(y)).expect("the backend was checked")
}

/// The three convolutions of a conv layer's forward and backward pass, per backend.
/// The defaults are burn's own ops; CUDA overrides them with cuDNN.
trait ConvKernels: Backend {
    /// `y = conv(x, w) + bias + addend` (the bias in `x`'s dtype, a frozen one: the
    /// backward pass gives it no gradient; the addend `[N, K, OH, OW]`, `[N, K, 1, 1]` or
    /// `[N, K]`, which adds per sample and channel as `[N, K, 1, 1]`).
    fn forward(x: FloatTensor<Self>, weight: FloatTensor<Self>, bias: Option<FloatTensor<Self>>, addend: Option<FloatTensor<Self>>, options: &ConvOptions<2>) -> FloatTensor<Self> {
        add_addend::<Self>(burn_forward::<Self>(x, weight, bias, options), addend)
    }

    /// `dL/dx` from `dL/dy` and the weight alone.
    fn backward_data(weight: FloatTensor<Self>, grad_out: FloatTensor<Self>, x_shape: [usize; 4], options: &ConvOptions<2>) -> FloatTensor<Self> {
        burn_backward_data::<Self>(weight, grad_out, x_shape, options)
    }

    /// `dL/dW` from the input and `dL/dy` (the weight gives the shape).
    fn backward_filter(x: FloatTensor<Self>, weight: FloatTensor<Self>, grad_out: FloatTensor<Self>, options: &ConvOptions<2>) -> FloatTensor<Self> {
        burn_backward_filter::<Self>(x, weight, grad_out, options)
    }
}

/// `y + addend` (broadcast over the spatial axes when `addend` is `[N, K, 1, 1]` or
/// `[N, K]`).
fn add_addend<X: Backend>(y: FloatTensor<X>, addend: Option<FloatTensor<X>>) -> FloatTensor<X> {
    match addend {
        Some(addend) => X::float_add(y, as_map::<X>(addend)),
        None => y,
    }
}

/// A `[N, K]` addend as `[N, K, 1, 1]`; others as they are.
fn as_map<X: Backend>(addend: FloatTensor<X>) -> FloatTensor<X> {
    let shape = addend.shape();
    if shape.num_dims() == 2 {
        let [n, k] = shape.dims::<2>();
        X::float_reshape(addend, burn::tensor::Shape::new([n, k, 1, 1]))
    } else {
        addend
    }
}

fn burn_forward<X: Backend>(x: FloatTensor<X>, weight: FloatTensor<X>, bias: Option<FloatTensor<X>>, options: &ConvOptions<2>) -> FloatTensor<X> {
    X::conv2d(x, weight, bias, options.clone())
}

/// A transposed convolution whose output padding restores the rows a strided forward pass
/// dropped, so `dL/dx` has `x`'s exact size.
fn burn_backward_data<X: Backend>(weight: FloatTensor<X>, grad_out: FloatTensor<X>, x_shape: [usize; 4], options: &ConvOptions<2>) -> FloatTensor<X> {
    let [_, _, kh, kw] = weight.shape().dims();
    let [_, _, oh, ow] = grad_out.shape().dims();
    let padding_out = [
        padding_out(kh, options.stride[0], options.padding[0], options.dilation[0], x_shape[2], oh),
        padding_out(kw, options.stride[1], options.padding[1], options.dilation[1], x_shape[3], ow),
    ];
    let transpose = ConvTransposeOptions::new(options.stride, options.padding, padding_out, options.dilation, options.groups);
    X::conv_transpose2d(grad_out, weight, None, transpose)
}

fn burn_backward_filter<X: Backend>(x: FloatTensor<X>, weight: FloatTensor<X>, grad_out: FloatTensor<X>, options: &ConvOptions<2>) -> FloatTensor<X> {
    X::conv2d_weight_backward(x, weight, grad_out, options.clone())
}

impl ConvKernels for burn::backend::Flex {}


/// Input rows (or columns) past the last window of a strided convolution.
fn padding_out(kernel: usize, stride: usize, padding: usize, dilation: usize, size_in: usize, size_out: usize) -> usize {
    if stride <= 1 {
        return 0;
    }
    let covered = (size_out - 1) * stride + dilation * (kernel - 1) + 1;
    (size_in + 2 * padding).saturating_sub(covered)
}

/// The convolution as one autodiff op; `bias` (an untracked inner tensor) joins the forward
/// pass and has no gradient; `addend` is added to the output (its gradient is the output's).
fn autodiff_op<X: ConvKernels, C: CheckpointStrategy>(
    x: Tensor<Autodiff<X, C>, 4>,
    weight: Tensor<Autodiff<X, C>, 4>,
    bias: Option<FloatTensor<X>>,
    addend: Option<Addend<Autodiff<X, C>>>,
    options: ConvOptions<2>,
) -> Tensor<Autodiff<X, C>, 4> {
    let (x, weight) = (x.into_primitive().tensor(), weight.into_primitive().tensor());
    let weight_tracked = !weight.node.requirement.is_none();
    let x_shape: [usize; 4] = x.primitive.shape().dims();
    let Some(addend) = addend else {
        let op = ConvBackward { options: options.clone(), x_shape };
        let out = match op.prepare::<C>([x.node.clone(), weight.node.clone()]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let y = X::forward(x.primitive.clone(), weight.primitive.clone(), bias, None, &options);
                // The input is kept only for the weight gradient: a frozen weight frees it.
                let kept_x = weight_tracked.then_some(x.primitive);
                prep.finish((kept_x, weight.primitive), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(X::forward(x.primitive, weight.primitive, bias, None, &options)),
        };
        return tensor(out);
    };
    let (map_dims, _) = addend.map_dims();
    let channels = matches!(addend, Addend::Channels(_));
    let addend = addend.into_primitive();
    // A `[N, K, 1, 1]` (or `[N, K]`) addend's gradient sums over the output's spatial axes
    // (a no-op where those are 1 x 1 too).
    let broadcast = map_dims[2..] == [1, 1];
    let op = ConvAddBackward { conv: ConvBackward { options: options.clone(), x_shape }, broadcast, channels };
    let out = match op.prepare::<C>([x.node.clone(), weight.node.clone(), addend.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let y = X::forward(x.primitive.clone(), weight.primitive.clone(), bias, Some(addend.primitive), &options);
            let kept_x = weight_tracked.then_some(x.primitive);
            prep.finish((kept_x, weight.primitive), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(X::forward(x.primitive, weight.primitive, bias, Some(addend.primitive), &options)),
    };
    tensor(out)
}

/// Backward of a convolution (its bias, if any, frozen).
#[derive(Debug)]
struct ConvBackward {
    options: ConvOptions<2>,
    x_shape: [usize; 4],
}

impl ConvBackward {
    /// Registers the input's and the weight's gradients (for the parents that are tracked).
    fn register<X: ConvKernels>(self, grad_out: FloatTensor<X>, state: (Option<FloatTensor<X>>, FloatTensor<X>), px: Option<NodeId>, pw: Option<NodeId>, grads: &mut Gradients) {
        let (x, weight) = state;
        if let (Some(node), Some(x)) = (pw, x) {
            let dw = X::backward_filter(x, weight.clone(), grad_out.clone(), &self.options);
            grads.register::<X>(node, dw);
        }
        if let Some(node) = px {
            let dx = X::backward_data(weight, grad_out, self.x_shape, &self.options);
            grads.register::<X>(node, dx);
        }
    }
}

impl<X: ConvKernels> Backward<X, 2> for ConvBackward {
    /// The input (only when the weight is tracked) and the weight.
    type State = (Option<FloatTensor<X>>, FloatTensor<X>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad_out = grads.consume::<X>(&ops.node);
        let [px, pw] = ops.parents;
        self.register::<X>(grad_out, ops.state, px.map(|n| n.id), pw.map(|n| n.id), grads);
    }
}

/// Backward of a convolution with an addend: the addend's gradient is the output's, summed
/// over the spatial axes where the addend was broadcast over them (and `[N, K]` for a
/// per-channel addend).
#[derive(Debug)]
struct ConvAddBackward {
    conv: ConvBackward,
    broadcast: bool,
    channels: bool,
}

impl<X: ConvKernels> Backward<X, 3> for ConvAddBackward {
    /// As [`ConvBackward`]'s.
    type State = (Option<FloatTensor<X>>, FloatTensor<X>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad_out = grads.consume::<X>(&ops.node);
        let [px, pw, pa] = ops.parents;
        if let Some(node) = pa {
            let mut da = if self.broadcast { X::float_sum_dim(X::float_sum_dim(grad_out.clone(), 2), 3) } else { grad_out.clone() };
            if self.channels {
                let [n, k, _, _] = da.shape().dims::<4>();
                da = X::float_reshape(da, burn::tensor::Shape::new([n, k]));
            }
            grads.register::<X>(node.id, da);
        }
        self.conv.register::<X>(grad_out, ops.state, px.map(|n| n.id), pw.map(|n| n.id), grads);
    }
}

/// `softmax(scale · x)` along the last dimension, computed in f32 and returned in `dtype`.
///
/// With [`set_fused_softmax`] on and `X` the CUDA backend this is one CubeCL kernel (one
/// read of `x` from memory, one write of the result: see the `softmax` kernel's docs);
/// otherwise burn's ops (`cast`, scale, `softmax`, `cast`). sd-model's attention uses it for
/// its score blocks, the largest tensors of a UNet step.
///
/// ```
/// use burn::backend::Flex;
/// use burn::tensor::{DType, Tensor};
/// use lora_core::kernels::scaled_softmax;
///
/// let x = Tensor::<Flex, 2>::from_floats([[0.0, 2.0], [1.0, 1.0]], &Default::default());
/// let p = scaled_softmax(x, 0.5, DType::F32).into_data().to_vec::<f32>().unwrap();
/// let e = std::f32::consts::E;
/// assert!((p[1] - e / (1.0 + e)).abs() < 1e-6 && (p[2] - 0.5).abs() < 1e-6);
/// ```
pub fn scaled_softmax<X: Backend, const D: usize>(x: Tensor<X, D>, scale: f32, dtype: DType) -> Tensor<X, D> {
    if let Some((out, _)) = fused_softmax(&x, scale, dtype) {
        return out;
    }
    cast_to(burn::tensor::activation::softmax(cast_to(x, DType::F32).mul_scalar(scale), D - 1), dtype)
}

/// [`scaled_softmax`] and each row's log-sum-exp `logsumexp(scale · x)` (f32, `x`'s shape
/// with the last dimension 1), from which `softmax(scale · x) = exp(scale · x − lse)`
/// elementwise: a backward pass can recompute the probabilities without a reduction.
///
/// With [`set_fused_softmax`] on, on the CUDA backend, the same one kernel as
/// [`scaled_softmax`] (it writes the log-sum-exp beside the probabilities); otherwise burn's
/// ops (a max and a sum reduction, then the exponentials from the log-sum-exp).
///
/// ```
/// use burn::backend::Flex;
/// use burn::tensor::{DType, Tensor};
/// use lora_core::kernels::scaled_softmax_lse;
///
/// let x = Tensor::<Flex, 2>::from_floats([[0.0, 2.0], [1.0, 1.0]], &Default::default());
/// let (p, lse) = scaled_softmax_lse(x, 0.5, DType::F32);
/// assert_eq!(lse.dims(), [2, 1]);
/// let lse = lse.into_data().to_vec::<f32>().unwrap();
/// assert!((lse[0] - (1.0 + std::f32::consts::E).ln()).abs() < 1e-6);
/// assert!((lse[1] - (0.5 + 2f32.ln())).abs() < 1e-6);
/// assert!((p.sum().into_scalar() - 2.0).abs() < 1e-6);
/// ```
pub fn scaled_softmax_lse<X: Backend, const D: usize>(x: Tensor<X, D>, scale: f32, dtype: DType) -> (Tensor<X, D>, Tensor<X, D>) {
    if let Some(out) = fused_softmax(&x, scale, dtype) {
        return out;
    }
    let scores = cast_to(x, DType::F32).mul_scalar(scale);
    let max = scores.clone().max_dim(D - 1);
    let lse = (scores.clone() - max.clone()).exp().sum_dim(D - 1).log() + max;
    (cast_to((scores - lse.clone()).exp(), dtype), lse)
}

/// The fused softmax kernel's probabilities and log-sum-exp, with [`set_fused_softmax`] on
/// and `X` a backend that has the kernel; else `None`.
fn fused_softmax<X: Backend, const D: usize>(x: &Tensor<X, D>, scale: f32, dtype: DType) -> Option<(Tensor<X, D>, Tensor<X, D>)> {
    if !fused_softmax_enabled() {
        return None;
    }
    #[cfg(feature = "cuda")]
    if let Some(out) = fused_softmax_on::<X, burn_cubecl::cubecl::cuda::CudaRuntime, u8, D>(x, scale, dtype) {
        return Some(out);
    }
    // The same op on wgpu, so that it can be tested without a GPU (lavapipe).
    #[cfg(feature = "wgpu")]
    if let Some(out) = fused_softmax_on::<X, burn_cubecl::cubecl::wgpu::WgpuRuntime, u32, D>(x, scale, dtype) {
        return Some(out);
    }
    let _ = (x, scale, dtype);
    None
}

/// burn's fusion backend over CubeCL runtime `R` with bool element `BT` (burn's `Cuda` and
/// `Wgpu` backends), where our fused ops run.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
type FusedCube<R, BT> = burn_fusion::Fusion<burn_cubecl::CubeBackend<R, f32, i32, BT>>;

/// `t`'s fusion primitive when `X` is [`FusedCube<R, BT>`], else `None`.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn to_fused<X: Backend, R: burn_cubecl::CubeRuntime, BT: burn_cubecl::BoolElement, const D: usize>(
    t: &Tensor<X, D>,
) -> Option<burn_fusion::FusionTensor<burn_cubecl::fusion::FusionCubeRuntime<R>>> {
    if TypeId::of::<X>() != TypeId::of::<FusedCube<R, BT>>() {
        return None;
    }
    downcast::<_, Tensor<FusedCube<R, BT>, D>>(t.clone()).map(|t| t.into_primitive().tensor())
}

/// The fusion primitive `t` of [`FusedCube<R, BT>`] as a tensor of `X` (which is that backend).
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn from_fused<X: Backend, R: burn_cubecl::CubeRuntime, BT: burn_cubecl::BoolElement, const D: usize>(
    t: burn_fusion::FusionTensor<burn_cubecl::fusion::FusionCubeRuntime<R>>,
) -> Option<Tensor<X, D>> {
    downcast(tensor::<FusedCube<R, BT>, D>(t))
}

/// The fused softmax op when `X` is [`FusedCube<R, BT>`], else `None`.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn fused_softmax_on<X: Backend, R: burn_cubecl::CubeRuntime, BT: burn_cubecl::BoolElement, const D: usize>(
    x: &Tensor<X, D>,
    scale: f32,
    dtype: DType,
) -> Option<(Tensor<X, D>, Tensor<X, D>)> {
    let [out, lse] = softmax::register::<R, BT>(to_fused::<X, R, BT, D>(x)?, scale, dtype);
    Some((from_fused::<X, R, BT, D>(out)?, from_fused::<X, R, BT, D>(lse)?))
}

/// The tensors of `parts`, one after another, as one vector of `dtype` (each part converted
/// to it): `Tensor::cat` of the parts cast to `dtype`.
///
/// burn's `cat` is one copy kernel per part; on burn's CUDA backend (and wgpu for the
/// `wgpu` feature) this is one multi-tensor copy kernel per 32 parts instead, which is
/// how [`FlatAdamW`](crate::optim::FlatAdamW) gathers a LoRA's few hundred gradients each
/// step. [`set_fused_concat`] turns that kernel off (it is on by default). Empty `parts`
/// give an empty vector.
///
/// ```
/// use burn::backend::Flex;
/// use burn::tensor::{DType, Tensor};
/// use lora_core::kernels::concat_flat;
///
/// let device = Default::default();
/// let a = Tensor::<Flex, 1>::from_floats([1.0, 2.0], &device);
/// let b = Tensor::<Flex, 1>::from_floats([3.0], &device);
/// let flat = concat_flat(vec![a, b], DType::F32, &device);
/// assert_eq!(flat.into_data().to_vec::<f32>().unwrap(), vec![1.0, 2.0, 3.0]);
/// ```
pub fn concat_flat<X: Backend>(parts: Vec<Tensor<X, 1>>, dtype: DType, device: &X::Device) -> Tensor<X, 1> {
    concat_flattened(parts.into_iter().map(|p| p.into_primitive().tensor()).collect(), dtype, device)
}

/// [`concat_flat`] of float tensors of any rank, each flattened in row-major order: on the
/// GPU backends the multi-tensor copy reads them as they are, so the optimizer's gather
/// needs no reshape per gradient (each one an operation of burn's fusion stream that the
/// host registers and releases: 256 of them, and their releases, per SD1.5 step).
pub(crate) fn concat_flattened<X: Backend>(parts: Vec<FloatTensor<X>>, dtype: DType, device: &X::Device) -> Tensor<X, 1> {
    if parts.is_empty() {
        return cast_to(Tensor::zeros([0], device), dtype);
    }
    if fused_concat_enabled() && dtype.is_float() {
        #[cfg(feature = "cuda")]
        let parts = match fused_concat_on::<X, burn_cubecl::cubecl::cuda::CudaRuntime, u8>(parts, dtype) {
            Ok(out) => return out,
            Err(parts) => parts,
        };
        // The same op on wgpu, so that it can be tested without a GPU (lavapipe).
        #[cfg(feature = "wgpu")]
        let parts = match fused_concat_on::<X, burn_cubecl::cubecl::wgpu::WgpuRuntime, u32>(parts, dtype) {
            Ok(out) => return out,
            Err(parts) => parts,
        };
        return concat_flat_with_burn(parts.into_iter().map(flatten::<X>).collect(), dtype);
    }
    concat_flat_with_burn(parts.into_iter().map(flatten::<X>).collect(), dtype)
}

/// A float primitive of any rank as a vector (row-major; burn copies non-contiguous views).
fn flatten<X: Backend>(t: FloatTensor<X>) -> Tensor<X, 1> {
    let n = t.shape().num_elements();
    tensor::<X, 1>(X::float_reshape(t, burn::tensor::Shape::new([n])))
}

/// [`concat_flat`] in burn's ops.
fn concat_flat_with_burn<X: Backend>(parts: Vec<Tensor<X, 1>>, dtype: DType) -> Tensor<X, 1> {
    Tensor::cat(parts.into_iter().map(|p| cast_to(p, dtype)).collect(), 0)
}

/// The multi-tensor copy op when `X` is [`FusedCube<R, BT>`] and every part is a float
/// tensor, else the parts back.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
#[allow(clippy::type_complexity)]
fn fused_concat_on<X: Backend, R: burn_cubecl::CubeRuntime, BT: burn_cubecl::BoolElement>(
    parts: Vec<FloatTensor<X>>,
    dtype: DType,
) -> Result<Tensor<X, 1>, Vec<FloatTensor<X>>> {
    if TypeId::of::<X>() != TypeId::of::<FusedCube<R, BT>>() || parts.iter().any(|p| !p.dtype().is_float()) {
        return Err(parts);
    }
    // `X` is that backend, so every downcast succeeds. The parts move into the op: one it
    // holds the last handle of is released by the op, where a clone would leave a release
    // operation of its own on the stream when the caller's handle drops.
    let fused = parts.into_iter().map(|p| downcast::<_, burn_fusion::FusionTensor<burn_cubecl::fusion::FusionCubeRuntime<R>>>(p).expect("X is the fusion backend")).collect();
    Ok(from_fused::<X, R, BT, 1>(concat::register::<R, BT>(fused, dtype)).expect("X is the fusion backend"))
}

/// Turns [`concat_flat`]'s multi-tensor copy kernel and [`split_flat`]'s single operation
/// on or off (default on); has no effect on other backends.
pub fn set_fused_concat(enabled: bool) {
    FUSED_CONCAT.store(enabled, Ordering::Relaxed);
}

/// Whether [`set_fused_concat`] is on.
pub fn fused_concat_enabled() -> bool {
    FUSED_CONCAT.load(Ordering::Relaxed)
}

/// Turns cuDNN's output blend on or off (default on): a convolution with an addend
/// ([`conv2d_add`]) on cuDNN writes its result onto the addend plus the bias (cuDNN's
/// `beta = 1`), with no pass over the output of its own. Off, cuDNN writes a fresh output
/// and one kernel adds the bias and the addend after it (still one operation of burn's
/// fusion stream). A switch for a device on which the blend fails its test
/// (`kernels::tests::cudnn_conv_add_matches_burn_kernels_on_cuda`).
///
/// ```
/// lora_core::kernels::set_cudnn_blend(false);
/// assert!(!lora_core::kernels::cudnn_blend_enabled());
/// lora_core::kernels::set_cudnn_blend(true);
/// ```
pub fn set_cudnn_blend(enabled: bool) {
    CUDNN_BLEND.store(enabled, Ordering::Relaxed);
}

/// Whether [`set_cudnn_blend`] is on.
pub fn cudnn_blend_enabled() -> bool {
    CUDNN_BLEND.load(Ordering::Relaxed)
}

/// Turns the fixed matmul kernel on or off (default off): on burn's CUDA backend, the
/// matmuls of [`matmul`], [`linear`] and [`linear_weight`] that do not go to cuBLAS (all of
/// them without [`set_cublas`]) run in one CubeCL kernel chosen up front (cubek's simple
/// cyclic MMA matmul, else its simple unit matmul) instead of burn's autotuned matmul.
///
/// burn autotunes each new matmul key by compiling and timing its ~29 candidate kernels,
/// about a second each on an H200, so the first SD1.5 training step spent minutes tuning
/// small matmuls (the LoRA rank-r products, the time embedding, the 77-token
/// cross-attention projections), and each new resolution bucket added more. The fixed
/// kernel is compiled once per tile configuration and took 1.26× the tuned winner's time on
/// average on those (25–100 µs) problems. A problem both kernels reject runs in burn's
/// matmul and counts as a fallback in [`vendor_stats`]. `trainer` turns this on on CUDA
/// (`SD_LORA_FIXED_MATMUL=0` turns it off).
///
/// ```
/// lora_core::kernels::set_fixed_matmul(true);
/// assert!(lora_core::kernels::fixed_matmul_enabled());
/// lora_core::kernels::set_fixed_matmul(false);
/// ```
pub fn set_fixed_matmul(enabled: bool) {
    FIXED_MATMUL.store(enabled, Ordering::Relaxed);
}

/// Whether [`set_fixed_matmul`] is on.
pub fn fixed_matmul_enabled() -> bool {
    FIXED_MATMUL.load(Ordering::Relaxed)
}

/// Whether [`linear`] and [`linear_weight`] send their matmuls through [`matmul`]'s routes
/// ([`set_cublas`] or [`set_fixed_matmul`] on) rather than burn's `linear`.
pub fn matmuls_routed() -> bool {
    cublas_enabled() || fixed_matmul_enabled()
}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn record_fixed_matmul() {
    FIXED_MATMUL_CALLS.fetch_add(1, Ordering::Relaxed);
}

/// Turns the one-op LoRA linear layer on or off (default off until it has run on a GPU):
/// with it, and with [`matmuls_routed`], a [`LoraLinear`](crate::LoraLinear) with a frozen
/// base and an active adapter (no dropout) runs `x·W + bias + s·(x·A)·B (+ residual)` as
/// one operation of burn's fusion stream, and its backward pass (`dx`, `dA`, `dB`) as
/// another, on burn's CUDA backend (and wgpu for the `wgpu` feature), with or without
/// autodiff. Composed of burn's tensor ops, the layer is about twenty operations per
/// training step, each registered, plan-matched and executed by the host; inside the two
/// ops the products run in the kernels [`matmul`] routes them to and the sums in two small
/// kernels. No effect elsewhere.
///
/// ```
/// lora_core::kernels::set_fused_lora_linear(true);
/// assert!(lora_core::kernels::fused_lora_linear_enabled());
/// lora_core::kernels::set_fused_lora_linear(false);
/// ```
pub fn set_fused_lora_linear(enabled: bool) {
    FUSED_LORA_LINEAR.store(enabled, Ordering::Relaxed);
}

/// Whether [`set_fused_lora_linear`] is on.
pub fn fused_lora_linear_enabled() -> bool {
    FUSED_LORA_LINEAR.load(Ordering::Relaxed)
}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn record_fused_lora_linear() {
    FUSED_LORA_LINEAR_CALLS.fetch_add(1, Ordering::Relaxed);
}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn record_fused_geglu() {
    FUSED_GEGLU_CALLS.fetch_add(1, Ordering::Relaxed);
}

/// `(h₁ + b₁) · gelu(h₂ + b₂)` over the halves of `h` (`[rows, 2n]`, a feed-forward
/// projection before its bias) and `bias` (`[2n]`): GEGLU, as one operation of the fusion
/// stream computing in f32 (see [`set_fused_lora_linear`], which turns it on with the
/// one-op linear layers), or the inputs back where it does not apply (the switch off,
/// another backend, dtypes or shapes it does not take).
///
/// ```
/// use burn::backend::Flex;
/// use burn::tensor::Tensor;
///
/// let device = Default::default();
/// let h = Tensor::<Flex, 2>::zeros([3, 8], &device);
/// let bias = Tensor::<Flex, 1>::zeros([8], &device);
/// // No kernel on the CPU backend: the caller composes GEGLU from burn's ops.
/// assert!(lora_core::kernels::geglu_bias(h, bias).is_err());
/// ```
#[allow(clippy::type_complexity)]
pub fn geglu_bias<X: Backend>(h: Tensor<X, 2>, bias: Tensor<X, 1>) -> Result<Tensor<X, 2>, (Tensor<X, 2>, Tensor<X, 1>)> {
    if !fused_lora_linear_enabled() || !geglu_takes(&h, &bias) {
        return Err((h, bias));
    }
    #[cfg(feature = "cuda")]
    if is_fused::<X, burn_cubecl::cubecl::cuda::CudaRuntime, u8>() {
        type R = burn_cubecl::cubecl::cuda::CudaRuntime;
        let out = geglu::register_forward::<R, u8>(into_fused::<X, R, u8, 2>(h), into_fused::<X, R, u8, 1>(bias));
        return Ok(from_fused::<X, R, u8, 2>(out).expect("the backend was checked"));
    }
    // The same op on wgpu, so that it can be tested without a GPU (lavapipe).
    #[cfg(feature = "wgpu")]
    if is_fused::<X, burn_cubecl::cubecl::wgpu::WgpuRuntime, u32>() {
        type R = burn_cubecl::cubecl::wgpu::WgpuRuntime;
        let out = geglu::register_forward::<R, u32>(into_fused::<X, R, u32, 2>(h), into_fused::<X, R, u32, 1>(bias));
        return Ok(from_fused::<X, R, u32, 2>(out).expect("the backend was checked"));
    }
    Err((h, bias))
}

/// The gradient of [`geglu_bias`]'s output with respect to `h` (`[rows, 2n]`, in `h`'s
/// dtype) for the output gradient `grad_out` (`[rows, n]`), as one operation of the fusion
/// stream; the inputs back where [`geglu_bias`] would not apply. The bias's gradient is the
/// column sum of this one.
///
/// ```
/// use burn::backend::Flex;
/// use burn::tensor::Tensor;
///
/// let device = Default::default();
/// let (h, dy) = (Tensor::<Flex, 2>::zeros([3, 8], &device), Tensor::<Flex, 2>::zeros([3, 4], &device));
/// let bias = Tensor::<Flex, 1>::zeros([8], &device);
/// assert!(lora_core::kernels::geglu_bias_backward(h, bias, dy).is_err());
/// ```
#[allow(clippy::type_complexity)]
pub fn geglu_bias_backward<X: Backend>(h: Tensor<X, 2>, bias: Tensor<X, 1>, grad_out: Tensor<X, 2>) -> Result<Tensor<X, 2>, (Tensor<X, 2>, Tensor<X, 1>, Tensor<X, 2>)> {
    let [rows, width] = h.dims();
    if !fused_lora_linear_enabled() || !geglu_takes(&h, &bias) || grad_out.dims() != [rows, width / 2] || grad_out.dtype() != h.dtype() {
        return Err((h, bias, grad_out));
    }
    #[cfg(feature = "cuda")]
    if is_fused::<X, burn_cubecl::cubecl::cuda::CudaRuntime, u8>() {
        type R = burn_cubecl::cubecl::cuda::CudaRuntime;
        let dh = geglu::register_backward::<R, u8>(into_fused::<X, R, u8, 2>(h), into_fused::<X, R, u8, 1>(bias), into_fused::<X, R, u8, 2>(grad_out));
        return Ok(from_fused::<X, R, u8, 2>(dh).expect("the backend was checked"));
    }
    #[cfg(feature = "wgpu")]
    if is_fused::<X, burn_cubecl::cubecl::wgpu::WgpuRuntime, u32>() {
        type R = burn_cubecl::cubecl::wgpu::WgpuRuntime;
        let dh = geglu::register_backward::<R, u32>(into_fused::<X, R, u32, 2>(h), into_fused::<X, R, u32, 1>(bias), into_fused::<X, R, u32, 2>(grad_out));
        return Ok(from_fused::<X, R, u32, 2>(dh).expect("the backend was checked"));
    }
    Err((h, bias, grad_out))
}

/// Whether the GEGLU op takes `h` and `bias` (see [`geglu_bias`]).
fn geglu_takes<X: Backend>(h: &Tensor<X, 2>, bias: &Tensor<X, 1>) -> bool {
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    {
        geglu::takes(h.dims(), bias.dims()[0], h.dtype(), bias.dtype())
    }
    #[cfg(not(any(feature = "cuda", feature = "wgpu")))]
    {
        let _ = (h, bias);
        false
    }
}

/// `x·weight + bias + scale·(x·down)·up + residual` on rows as one op each way (see
/// [`set_fused_lora_linear`]), or the inputs back where it does not apply: the switch or
/// the routed matmuls off, another backend, dtypes it does not take, or a trainable base
/// weight or bias (those go through burn's ops). Taken by value so that the op releases
/// the inputs it reads last.
pub(crate) fn lora_linear<B: Backend>(inputs: LoraLinearInputs<B>) -> Result<Tensor<B, 2>, LoraLinearInputs<B>> {
    if !fused_lora_linear_enabled() || !matmuls_routed() {
        return Err(inputs);
    }
    #[cfg(feature = "cuda")]
    let inputs = match lora_linear::dispatch::<B, burn_cubecl::cubecl::cuda::CudaRuntime, u8>(inputs) {
        Ok(y) => return Ok(y),
        Err(inputs) => inputs,
    };
    // The same op on wgpu, so that it can be tested without a GPU (lavapipe).
    #[cfg(feature = "wgpu")]
    let inputs = match lora_linear::dispatch::<B, burn_cubecl::cubecl::wgpu::WgpuRuntime, u32>(inputs) {
        Ok(y) => return Ok(y),
        Err(inputs) => inputs,
    };
    Err(inputs)
}

/// `flat`'s consecutive pieces in `shapes` (which must not add up to more than its
/// length), as backend primitives ([`tensor`] makes each a tensor of its rank): what
/// [`FlatAdamW`](crate::optim::FlatAdamW) hands back to a module after each step.
///
/// In burn's ops a piece is a `slice` and a `reshape`; on a fusion backend those are two
/// operations of the stream per piece, which the host registers, plans and executes one
/// by one. On burn's CUDA backend (and wgpu for the `wgpu` feature) this is one
/// operation for all pieces, each a view of `flat` where its offset is aligned for the
/// runtime. [`set_fused_concat`] turns it off.
///
/// ```
/// use burn::backend::Flex;
/// use burn::tensor::{Shape, Tensor};
/// use lora_core::kernels::{split_flat, tensor};
///
/// let device = Default::default();
/// let flat = Tensor::<Flex, 1>::from_floats([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], &device);
/// let mut pieces = split_flat(flat, &[Shape::new([2, 3]), Shape::new([1])]).into_iter();
/// let matrix = tensor::<Flex, 2>(pieces.next().unwrap());
/// let last = tensor::<Flex, 1>(pieces.next().unwrap());
/// assert_eq!(matrix.into_data().to_vec::<f32>().unwrap(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
/// assert_eq!(last.into_data().to_vec::<f32>().unwrap(), vec![7.0]);
/// ```
pub fn split_flat<X: Backend>(flat: Tensor<X, 1>, shapes: &[burn::tensor::Shape]) -> Vec<FloatTensor<X>> {
    if fused_concat_enabled() && !shapes.is_empty() {
        #[cfg(feature = "cuda")]
        let flat = match fused_split_on::<X, burn_cubecl::cubecl::cuda::CudaRuntime, u8>(flat, shapes) {
            Ok(pieces) => return pieces,
            Err(flat) => flat,
        };
        #[cfg(feature = "wgpu")]
        let flat = match fused_split_on::<X, burn_cubecl::cubecl::wgpu::WgpuRuntime, u32>(flat, shapes) {
            Ok(pieces) => return pieces,
            Err(flat) => flat,
        };
        return split_flat_with_burn(flat, shapes);
    }
    split_flat_with_burn(flat, shapes)
}

/// [`split_flat`] in burn's ops.
fn split_flat_with_burn<X: Backend>(flat: Tensor<X, 1>, shapes: &[burn::tensor::Shape]) -> Vec<FloatTensor<X>> {
    let flat = flat.into_primitive().tensor();
    let mut offset = 0;
    shapes
        .iter()
        .map(|shape| {
            let n = shape.num_elements();
            let piece = X::float_slice(flat.clone(), &[burn::tensor::Slice::from(offset..offset + n)]);
            offset += n;
            X::float_reshape(piece, shape.clone())
        })
        .collect()
}

/// `t` in a buffer without row padding: what frozen weights are stored as.
///
/// On burn's CUDA backend the outputs of burn's ops and uploaded data have padded rows
/// (CubeCL rounds a row of a few bytes up to a power of two of at least 16 bytes, longer
/// ones to a multiple of the pitch alignment): a bf16 3x3 convolution weight then takes 2.67
/// times its size and cuDNN, which needs it packed, gets a copy at every call; a
/// `[320, 320]` bf16 linear weight takes 1.6 times. There (and on wgpu for the `wgpu`
/// feature) this is one operation that copies a padded or strided tensor into a dense
/// buffer and passes a dense one through; elsewhere `t` is returned as it is. With autodiff
/// the result is detached (for frozen weights). [`crate::precision::cast_frozen`] and the
/// merging of adapters into frozen weights store their results this way.
///
/// ```
/// use burn::backend::Flex;
/// use burn::tensor::Tensor;
/// use lora_core::kernels::packed;
///
/// let w = Tensor::<Flex, 2>::from_floats([[1.0, 2.0], [3.0, 4.0]], &Default::default());
/// assert_eq!(packed(w.clone()).into_data(), w.into_data());
/// ```
pub fn packed<X: Backend, const D: usize>(t: Tensor<X, D>) -> Tensor<X, D> {
    #[cfg(feature = "cuda")]
    let t = match packed_on::<X, burn_cubecl::cubecl::cuda::CudaRuntime, u8, D>(t) {
        Ok(p) => return p,
        Err(t) => t,
    };
    #[cfg(feature = "wgpu")]
    let t = match packed_on::<X, burn_cubecl::cubecl::wgpu::WgpuRuntime, u32, D>(t) {
        Ok(p) => return p,
        Err(t) => t,
    };
    t
}

/// [`packed`] when `X` is [`FusedCube<R, BT>`] or autodiff over it, else `Err(t)`.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn packed_on<X: Backend, R: burn_cubecl::CubeRuntime, BT: burn_cubecl::BoolElement, const D: usize>(t: Tensor<X, D>) -> Result<Tensor<X, D>, Tensor<X, D>> {
    use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, NoCheckpointing};
    if let Some(fused) = to_fused::<X, R, BT, D>(&t) {
        return from_fused::<X, R, BT, D>(pack::register::<R, BT>(fused)).ok_or(t);
    }
    packed_autodiff::<X, R, BT, NoCheckpointing, D>(t).or_else(packed_autodiff::<X, R, BT, BalancedCheckpointing, D>)
}

/// [`packed`] when `X` is `Autodiff<FusedCube<R, BT>, C>`: the inner tensor packed, detached.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn packed_autodiff<X: Backend, R: burn_cubecl::CubeRuntime, BT: burn_cubecl::BoolElement, C: CheckpointStrategy, const D: usize>(
    t: Tensor<X, D>,
) -> Result<Tensor<X, D>, Tensor<X, D>> {
    type Ad<R, BT, C> = Autodiff<FusedCube<R, BT>, C>;
    let Some(ad) = downcast::<_, Tensor<Ad<R, BT, C>, D>>(t.clone()) else { return Err(t) };
    let inner = pack::register::<R, BT>(ad.inner().into_primitive().tensor());
    downcast(Tensor::<Ad<R, BT, C>, D>::from_inner(tensor(inner))).ok_or(t)
}

/// Releases `tensors` (backend primitives): on burn's CUDA backend (and wgpu for the
/// `wgpu` feature), with [`set_fused_concat`] on, as one operation of the fusion stream,
/// where dropping them one by one registers a release operation each (the old values of
/// all trained tensors after an optimizer step: 256 for an SD1.5 attention LoRA).
/// Elsewhere they are dropped.
pub(crate) fn release_all<X: Backend>(tensors: Vec<FloatTensor<X>>) {
    if !fused_concat_enabled() || tensors.is_empty() {
        return;
    }
    #[cfg(feature = "cuda")]
    if is_fused::<X, burn_cubecl::cubecl::cuda::CudaRuntime, u8>() {
        let fused = tensors.into_iter().map(|t| downcast(t).expect("the backend was checked")).collect();
        return split::register_release::<burn_cubecl::cubecl::cuda::CudaRuntime, u8>(fused);
    }
    #[cfg(feature = "wgpu")]
    if is_fused::<X, burn_cubecl::cubecl::wgpu::WgpuRuntime, u32>() {
        let fused = tensors.into_iter().map(|t| downcast(t).expect("the backend was checked")).collect();
        return split::register_release::<burn_cubecl::cubecl::wgpu::WgpuRuntime, u32>(fused);
    }
    drop(tensors);
}

/// The single split operation when `X` is [`FusedCube<R, BT>`], else `flat` back.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn fused_split_on<X: Backend, R: burn_cubecl::CubeRuntime, BT: burn_cubecl::BoolElement>(
    flat: Tensor<X, 1>,
    shapes: &[burn::tensor::Shape],
) -> Result<Vec<FloatTensor<X>>, Tensor<X, 1>> {
    if shapes.iter().map(|s| s.num_elements()).sum::<usize>() > flat.dims()[0] {
        return Err(flat);
    }
    let Some(fused) = to_fused::<X, R, BT, 1>(&flat) else { return Err(flat) };
    let pieces = split::register::<R, BT>(fused, shapes);
    pieces.into_iter().map(downcast::<_, FloatTensor<X>>).collect::<Option<Vec<_>>>().ok_or(flat)
}

/// Turns the fused softmax kernel of [`scaled_softmax`] on or off (default off until it
/// has run on a GPU); has no effect on other backends.
pub fn set_fused_softmax(enabled: bool) {
    FUSED_SOFTMAX.store(enabled, Ordering::Relaxed);
}

/// Whether [`set_fused_softmax`] is on.
pub fn fused_softmax_enabled() -> bool {
    FUSED_SOFTMAX.load(Ordering::Relaxed)
}

/// Runs [`flash_attention`] and [`flash_attention_backward`] in cuDNN's fused attention
/// engines where they take the problem (default off until checked on a GPU; CUDA only):
/// the SDPA kernels PyTorch runs, built from the operation graphs cudnn-frontend builds
/// (see the `cudnn_sdpa` module). bf16 / f16 inputs and head dimensions a multiple of 8 up
/// to 256 (backward passes over key counts that are not multiples of 128, SD's 77-token
/// cross-attention, need [`set_cudnn_padded_backward`], on by default). Other problems, and any cuDNN refusal (counted in
/// [`VendorStats::fallbacks`]), take the flash-attention kernels with
/// [`set_flash_attention`] on, else the same math in burn's ops. The choice is made when a
/// pass is queued, so switching between passes is safe. Needs cuDNN 9.6 or later
/// ([`cudnn_attention_status`]).
///
/// ```
/// lora_core::kernels::set_cudnn_attention(true);
/// assert!(lora_core::kernels::cudnn_attention_enabled());
/// lora_core::kernels::set_cudnn_attention(false);
/// ```
pub fn set_cudnn_attention(enabled: bool) {
    CUDNN_ATTENTION.store(enabled, Ordering::Relaxed);
}

/// Whether [`set_cudnn_attention`] is on.
pub fn cudnn_attention_enabled() -> bool {
    CUDNN_ATTENTION.load(Ordering::Relaxed)
}

/// Lets cuDNN's attention ([`set_cudnn_attention`]) take backward passes whose key count is
/// not a multiple of 128, SD's 77-token cross-attention and 64-token middle block (default
/// on): their graphs carry the padding mask that cudnn-frontend adds for them on cuDNN up
/// to 9.15.0 (a workaround for a cuDNN bug). Off, those passes take the flash kernels when
/// [`set_flash_attention`] is on, else the caller's own backward
/// ([`flash_attention_backward`] returns `None`). Read when a pass is queued.
///
/// ```
/// use lora_core::kernels::{cudnn_padded_backward_enabled, set_cudnn_padded_backward};
///
/// assert!(cudnn_padded_backward_enabled());
/// set_cudnn_padded_backward(false);
/// assert!(!cudnn_padded_backward_enabled());
/// ```
pub fn set_cudnn_padded_backward(enabled: bool) {
    CUDNN_PADDED_BACKWARD.store(enabled, Ordering::Relaxed);
}

/// Whether [`set_cudnn_padded_backward`] is on.
pub fn cudnn_padded_backward_enabled() -> bool {
    CUDNN_PADDED_BACKWARD.load(Ordering::Relaxed)
}

/// Whether cuDNN's attention takes the forward (`backward` false) or backward pass of a
/// `[b, h, s_q, d]` × `[b, h, s_kv, d]` problem in `dtype` (with [`set_cudnn_attention`] on,
/// in a `cuda` build).
#[cfg_attr(not(feature = "cuda"), allow(unused_variables))]
fn cudnn_attention_takes(dtype: DType, d: usize, s_q: usize, s_kv: usize, backward: bool) -> bool {
    #[cfg(feature = "cuda")]
    {
        // The switch first: the support check reads the GPU's architecture and cuDNN's
        // version once, which loads cuDNN; without a usable cuDNN (missing, too old) it
        // supports nothing and the pass keeps the other kernels.
        cudnn_attention_enabled() && if backward { cudnn_sdpa::supports_backward(dtype, d, s_q, s_kv, cudnn_padded_backward_enabled()) } else { cudnn_sdpa::supports(dtype, d, s_q, s_kv) }
    }
    #[cfg(not(feature = "cuda"))]
    {
        false
    }
}

/// Turns the flash-attention kernels of [`flash_attention`] and [`flash_attention_backward`]
/// on or off (default off until they have run on a GPU); has no effect on other backends.
pub fn set_flash_attention(enabled: bool) {
    FLASH.store(enabled, Ordering::Relaxed);
}

/// Whether [`set_flash_attention`] is on.
pub fn flash_attention_enabled() -> bool {
    FLASH.load(Ordering::Relaxed)
}

/// Sets the shared memory, in KiB, that each cube of the flash-attention kernels may use
/// (default 48; clamped to 16..=227 and to what the device offers). The kernels take the
/// largest blocks of queries and keys that fit: more shared memory means fewer, longer
/// blocks per cube but fewer cubes resident per multiprocessor, a trade-off for the device
/// to measure (`trainer bench-ops` times 48 against 96; the trainer reads
/// `SD_LORA_FLASH_SHARED_KIB`). Problems planned after the call use it.
pub fn set_flash_shared_kib(kib: usize) {
    FLASH_SHARED.store(kib.clamp(16, 227) * 1024, Ordering::Relaxed);
}

/// The per-cube shared memory of [`set_flash_shared_kib`], in KiB.
pub fn flash_shared_kib() -> usize {
    FLASH_SHARED.load(Ordering::Relaxed) / 1024
}

/// Turns register double buffering in the flash-attention kernels on or off (default off
/// until it has been timed on a GPU): each block's operands (`k`, `v` in the forward and
/// `dq` kernels; `q`, `dO` and their row statistics in the `dk`/`dv` kernel) are read into
/// registers while the block before is computed, so the loads' latency overlaps the
/// products, at the cost of more registers per unit (fewer resident cubes). `trainer
/// bench-ops` times both; the trainer reads `SD_LORA_FLASH_PREFETCH=1`. Problems planned
/// after the call use it.
pub fn set_flash_prefetch(enabled: bool) {
    FLASH_PREFETCH.store(enabled, Ordering::Relaxed);
}

/// Whether [`set_flash_prefetch`] is on.
pub fn flash_prefetch_enabled() -> bool {
    FLASH_PREFETCH.load(Ordering::Relaxed)
}

/// Limits [`flash_attention`] to problems of at most `keys` keys (default: no limit);
/// longer ones keep the caller's own attention (sd-model's blockwise path: cuBLAS products
/// and the fused softmax). Which is faster per key length is the device's to measure
/// (docs/benchmarks.md); the trainer reads `--flash-max-keys` / `SD_LORA_FLASH_MAX_KEYS`.
///
/// ```
/// lora_core::kernels::set_flash_max_keys(1024);
/// assert_eq!(lora_core::kernels::flash_max_keys(), 1024);
/// lora_core::kernels::set_flash_max_keys(usize::MAX);
/// ```
pub fn set_flash_max_keys(keys: usize) {
    FLASH_MAX_KEYS.store(keys, Ordering::Relaxed);
}

/// The key-length limit of [`set_flash_max_keys`].
pub fn flash_max_keys() -> usize {
    FLASH_MAX_KEYS.load(Ordering::Relaxed)
}

/// [`flash_shared_kib`] in bytes.
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
fn flash_shared_bytes() -> usize {
    FLASH_SHARED.load(Ordering::Relaxed)
}

/// Flash attention's forward pass for `[batch, heads, seq, d]` tensors: the output
/// `softmax(q kᵀ · scale) v` (in `q`'s dtype) and each query's log-sum-exp
/// `logsumexp(q kᵀ · scale)` (f32, `[batch, heads, seq_q]`), which
/// [`flash_attention_backward`] takes, without the score matrix ever being stored.
///
/// `Some` only with [`set_flash_attention`] on, on the CUDA backend (built with the `cuda`
/// feature; tensor cores, so bf16 or f16 inputs of one dtype) and for head dimensions up to
/// 160 (SD's UNets: 40 to 160; the VAE's single 512-wide head keeps its own path);
/// otherwise `None` and the caller keeps its own attention. The kernels are CubeCL `cmma` code (see
/// `docs/benchmarks.md`); a device that lacks the tile shapes or shared memory they need
/// falls back to the same math in burn's ops, counted in [`VendorStats::fallbacks`].
///
/// ```
/// use burn::backend::Flex;
/// use burn::tensor::Tensor;
/// use lora_core::kernels::flash_attention;
///
/// let q = Tensor::<Flex, 4>::zeros([1, 2, 8, 16], &Default::default());
/// // No kernel on the CPU backend: the caller uses its own attention.
/// assert!(flash_attention(q.clone(), q.clone(), q, 0.25).is_none());
/// ```
pub fn flash_attention<X: Backend>(q: Tensor<X, 4>, k: Tensor<X, 4>, v: Tensor<X, 4>, scale: f32) -> Option<(Tensor<X, 4>, Tensor<X, 3>)> {
    let ([_, _, s_q, d], s_kv) = (q.dims(), k.dims()[2]);
    let (cudnn, flash) = (cudnn_attention_takes(q.dtype(), d, s_q, s_kv, false), flash_kernels_take(d, s_kv));
    if !matches!(q.dtype(), DType::BF16 | DType::F16) || !(flash || cudnn) {
        return None;
    }
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    let route = flash::Route { cudnn, flash };
    #[cfg(feature = "cuda")]
    if let Some(out) = flash_forward_on::<X, burn_cubecl::cubecl::cuda::CudaRuntime, u8>(&q, &k, &v, scale, route) {
        return Some(out);
    }
    // The same op on wgpu, so that it can be tested without a GPU (lavapipe).
    #[cfg(feature = "wgpu")]
    if let Some(out) = flash_forward_on::<X, burn_cubecl::cubecl::wgpu::WgpuRuntime, u32>(&q, &k, &v, scale, route) {
        return Some(out);
    }
    let _ = (k, v, scale);
    None
}

/// Whether the flash kernels are on ([`set_flash_attention`]) for attention of head
/// dimension `d` over `s_kv` keys ([`set_flash_max_keys`]).
fn flash_kernels_take(d: usize, s_kv: usize) -> bool {
    flash_attention_enabled() && d <= FLASH_MAX_HEAD_DIM && s_kv <= flash_max_keys()
}

/// The gradients `(dq, dk, dv)` of [`flash_attention`] for the output gradient `grad_out`,
/// from the inputs, the forward output `out` and its log-sum-exp `lse`, in the inputs' dtype.
/// `None` where neither cuDNN's attention nor the flash kernels take this backward pass
/// (e.g. SD's 77-token cross-attention with [`set_cudnn_padded_backward`] off and the flash
/// kernels off): the caller differentiates its own way, from the same log-sum-exp.
///
/// ```
/// use burn::backend::Flex;
/// use burn::tensor::Tensor;
/// use lora_core::kernels::flash_attention_backward;
///
/// let device = Default::default();
/// let x = Tensor::<Flex, 4>::zeros([1, 2, 8, 16], &device);
/// let lse = Tensor::<Flex, 3>::zeros([1, 2, 8], &device);
/// assert!(flash_attention_backward(x.clone(), x.clone(), x.clone(), x.clone(), x, lse, 0.25).is_none());
/// ```
#[allow(clippy::type_complexity)]
pub fn flash_attention_backward<X: Backend>(
    q: Tensor<X, 4>,
    k: Tensor<X, 4>,
    v: Tensor<X, 4>,
    out: Tensor<X, 4>,
    grad_out: Tensor<X, 4>,
    lse: Tensor<X, 3>,
    scale: f32,
) -> Option<(Tensor<X, 4>, Tensor<X, 4>, Tensor<X, 4>)> {
    if !(flash_attention_enabled() || cudnn_attention_enabled()) || !matches!(q.dtype(), DType::BF16 | DType::F16) {
        return None;
    }
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    if flash_backend::<X>() {
        let ([_, _, s_q, d], s_kv) = (q.dims(), k.dims()[2]);
        let route = flash::Route { cudnn: cudnn_attention_takes(q.dtype(), d, s_q, s_kv, true), flash: flash_kernels_take(d, s_kv) };
        // Neither takes it: the caller's own backward (sd-model's blockwise one, from the
        // same log-sum-exp) holds less than the op's whole-score fallback would.
        if !(route.cudnn || route.flash) {
            return None;
        }
        // The op computes Δ = rowsum(dO ∘ O) itself (one kernel, f32 sums of the halves).
        let grad_out = cast_to(grad_out.clone(), q.dtype());
        let out = cast_to(out.clone(), q.dtype());
        #[cfg(feature = "cuda")]
        if let Some(grads) = flash_backward_on::<X, burn_cubecl::cubecl::cuda::CudaRuntime, u8>([&q, &k, &v, &grad_out, &out], &lse, scale, route) {
            return Some(grads);
        }
        #[cfg(feature = "wgpu")]
        if let Some(grads) = flash_backward_on::<X, burn_cubecl::cubecl::wgpu::WgpuRuntime, u32>([&q, &k, &v, &grad_out, &out], &lse, scale, route) {
            return Some(grads);
        }
    }
    let _ = (k, v, out, grad_out, lse, scale);
    None
}

/// Whether `X` is one of the fusion backends with flash-attention kernels (CUDA; wgpu for
/// the `wgpu` feature).
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn flash_backend<X: Backend>() -> bool {
    let id = TypeId::of::<X>();
    #[cfg(feature = "cuda")]
    if id == TypeId::of::<FusedCube<burn_cubecl::cubecl::cuda::CudaRuntime, u8>>() {
        return true;
    }
    #[cfg(feature = "wgpu")]
    if id == TypeId::of::<FusedCube<burn_cubecl::cubecl::wgpu::WgpuRuntime, u32>>() {
        return true;
    }
    false
}

/// The flash forward op when `X` is [`FusedCube<R, BT>`], else `None`.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn flash_forward_on<X: Backend, R: burn_cubecl::CubeRuntime, BT: burn_cubecl::BoolElement>(
    q: &Tensor<X, 4>,
    k: &Tensor<X, 4>,
    v: &Tensor<X, 4>,
    scale: f32,
    route: flash::Route,
) -> Option<(Tensor<X, 4>, Tensor<X, 3>)> {
    let fused = to_fused::<X, R, BT, 4>;
    let (out, lse) = flash::register_forward::<R, BT>(fused(q)?, fused(k)?, fused(v)?, scale, route, flash::Heads::Split);
    Some((from_fused::<X, R, BT, 4>(out)?, from_fused::<X, R, BT, 3>(lse)?))
}

/// The flash backward op when `X` is [`FusedCube<R, BT>`], else `None`.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
#[allow(clippy::type_complexity)]
fn flash_backward_on<X: Backend, R: burn_cubecl::CubeRuntime, BT: burn_cubecl::BoolElement>(
    inputs: [&Tensor<X, 4>; 5],
    lse: &Tensor<X, 3>,
    scale: f32,
    route: flash::Route,
) -> Option<(Tensor<X, 4>, Tensor<X, 4>, Tensor<X, 4>)> {
    let [q, k, v, g, o] = inputs.map(to_fused::<X, R, BT, 4>);
    let (dq, dk, dv) = flash::register_backward::<R, BT>([q?, k?, v?, g?, o?], to_fused::<X, R, BT, 3>(lse)?, scale, route, flash::Heads::Split);
    let back = from_fused::<X, R, BT, 4>;
    Some((back(dq)?, back(dk)?, back(dv)?))
}

/// The attention problem of `[batch·seq, heads·d]` rows `q`, `k`, `v`: `(seq_q, seq_kv, d)`,
/// or `None` where the rows do not split into `batch` sequences of `heads` heads each or
/// the three disagree (different widths, `k` and `v` of different lengths).
fn rows_problem<X: Backend>(q: &Tensor<X, 2>, k: &Tensor<X, 2>, v: &Tensor<X, 2>, batch: usize, heads: usize) -> Option<(usize, usize, usize)> {
    let ([rows_q, width], [rows_k, width_k], [rows_v, width_v]) = (q.dims(), k.dims(), v.dims());
    let fits = batch > 0 && heads > 0 && rows_q % batch == 0 && rows_k % batch == 0 && width % heads == 0;
    let agree = rows_k == rows_v && width_k == width && width_v == width && rows_q > 0 && rows_k > 0;
    (fits && agree).then(|| (rows_q / batch, rows_k / batch, width / heads))
}

/// [`flash_attention`] on rows: `q` `[batch·seq_q, heads·d]`, `k` and `v`
/// `[batch·seq_kv, heads·d]` (as linear layers produce them, sequence by sequence), the
/// output in `q`'s rows and the log-sum-exp `[batch, heads, seq_q]`. The op views the rows
/// as heads itself, so the caller's head split and merge (a reshape and a transposition of
/// each tensor, each an operation of burn's fusion stream) go away. Taken by value, so that
/// the op releases the inputs it reads last; where [`flash_attention`] would return `None`
/// (or the rows do not split into `batch` sequences of `heads` heads) the inputs come back.
///
/// ```
/// use burn::backend::Flex;
/// use burn::tensor::Tensor;
/// use lora_core::kernels::flash_attention_rows;
///
/// let q = Tensor::<Flex, 2>::zeros([2 * 8, 2 * 16], &Default::default());
/// // No kernel on the CPU backend: the inputs come back for the caller's own attention.
/// let [q, _k, _v] = flash_attention_rows(q.clone(), q.clone(), q, 2, 2, 0.25).unwrap_err();
/// assert_eq!(q.dims(), [16, 32]);
/// ```
#[allow(clippy::type_complexity)]
pub fn flash_attention_rows<X: Backend>(q: Tensor<X, 2>, k: Tensor<X, 2>, v: Tensor<X, 2>, batch: usize, heads: usize, scale: f32) -> Result<(Tensor<X, 2>, Tensor<X, 3>), [Tensor<X, 2>; 3]> {
    let Some((s_q, s_kv, d)) = rows_problem(&q, &k, &v, batch, heads) else {
        return Err([q, k, v]);
    };
    let (cudnn, flash) = (cudnn_attention_takes(q.dtype(), d, s_q, s_kv, false), flash_kernels_take(d, s_kv));
    let half = matches!(q.dtype(), DType::BF16 | DType::F16) && k.dtype() == q.dtype() && v.dtype() == q.dtype();
    if !half || !(flash || cudnn) {
        return Err([q, k, v]);
    }
    let inputs = [q, k, v];
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    let (route, layout) = (flash::Route { cudnn, flash }, flash::Heads::Rows { batch, heads });
    #[cfg(feature = "cuda")]
    let inputs = match flash_rows_forward_on::<X, burn_cubecl::cubecl::cuda::CudaRuntime, u8>(inputs, scale, route, layout) {
        Ok(out) => return Ok(out),
        Err(inputs) => inputs,
    };
    // The same op on wgpu, so that it can be tested without a GPU (lavapipe).
    #[cfg(feature = "wgpu")]
    let inputs = match flash_rows_forward_on::<X, burn_cubecl::cubecl::wgpu::WgpuRuntime, u32>(inputs, scale, route, layout) {
        Ok(out) => return Ok(out),
        Err(inputs) => inputs,
    };
    let _ = scale;
    Err(inputs)
}

/// The inputs of [`flash_attention_backward_rows`]: the forward pass's rows and
/// log-sum-exp, and the output gradient.
#[derive(Debug, Clone)]
pub struct AttentionRowsBackward<X: Backend> {
    /// Queries, `[batch·seq_q, heads·d]`.
    pub q: Tensor<X, 2>,
    /// Keys, `[batch·seq_kv, heads·d]`.
    pub k: Tensor<X, 2>,
    /// Values, `[batch·seq_kv, heads·d]`.
    pub v: Tensor<X, 2>,
    /// The forward output, `[batch·seq_q, heads·d]`.
    pub out: Tensor<X, 2>,
    /// The output's gradient, `[batch·seq_q, heads·d]`.
    pub grad_out: Tensor<X, 2>,
    /// The forward pass's log-sum-exp, `[batch, heads, seq_q]` (f32).
    pub lse: Tensor<X, 3>,
}

/// [`flash_attention_backward`] on rows (see [`flash_attention_rows`]): `(dq, dk, dv)` in
/// the rows of `q`, `k` and `v`, or the inputs back where [`flash_attention_backward`] would
/// return `None`.
///
/// ```
/// use burn::backend::Flex;
/// use burn::tensor::Tensor;
/// use lora_core::kernels::{flash_attention_backward_rows, AttentionRowsBackward};
///
/// let device = Default::default();
/// let x = Tensor::<Flex, 2>::zeros([2 * 8, 2 * 16], &device);
/// let lse = Tensor::<Flex, 3>::zeros([2, 2, 8], &device);
/// let inputs = AttentionRowsBackward { q: x.clone(), k: x.clone(), v: x.clone(), out: x.clone(), grad_out: x, lse };
/// assert!(flash_attention_backward_rows(inputs, 2, 2, 0.25).is_err());
/// ```
#[allow(clippy::type_complexity)]
pub fn flash_attention_backward_rows<X: Backend>(inputs: AttentionRowsBackward<X>, batch: usize, heads: usize, scale: f32) -> Result<[Tensor<X, 2>; 3], AttentionRowsBackward<X>> {
    if !(flash_attention_enabled() || cudnn_attention_enabled()) || !matches!(inputs.q.dtype(), DType::BF16 | DType::F16) {
        return Err(inputs);
    }
    let Some((s_q, s_kv, d)) = rows_problem(&inputs.q, &inputs.k, &inputs.v, batch, heads) else {
        return Err(inputs);
    };
    let same = |t: &Tensor<X, 2>| t.dims() == inputs.q.dims();
    if !same(&inputs.out) || !same(&inputs.grad_out) || inputs.lse.dims() != [batch, heads, s_q] {
        return Err(inputs);
    }
    let (cudnn, flash) = (cudnn_attention_takes(inputs.q.dtype(), d, s_q, s_kv, true), flash_kernels_take(d, s_kv));
    // Neither takes it: the caller's own backward (sd-model's blockwise one, from the same
    // log-sum-exp) holds less than the op's whole-score fallback would.
    if !(cudnn || flash) {
        return Err(inputs);
    }
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    let (route, layout) = (flash::Route { cudnn, flash }, flash::Heads::Rows { batch, heads });
    #[cfg(feature = "cuda")]
    let inputs = match flash_rows_backward_on::<X, burn_cubecl::cubecl::cuda::CudaRuntime, u8>(inputs, scale, route, layout) {
        Ok(grads) => return Ok(grads),
        Err(inputs) => inputs,
    };
    #[cfg(feature = "wgpu")]
    let inputs = match flash_rows_backward_on::<X, burn_cubecl::cubecl::wgpu::WgpuRuntime, u32>(inputs, scale, route, layout) {
        Ok(grads) => return Ok(grads),
        Err(inputs) => inputs,
    };
    let _ = scale;
    Err(inputs)
}

/// `t`, which must be a tensor of [`FusedCube<R, BT>`], as its fusion primitive.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn into_fused<X: Backend, R: burn_cubecl::CubeRuntime, BT: burn_cubecl::BoolElement, const D: usize>(t: Tensor<X, D>) -> burn_fusion::FusionTensor<burn_cubecl::fusion::FusionCubeRuntime<R>> {
    downcast::<_, Tensor<FusedCube<R, BT>, D>>(t).expect("the backend was checked").into_primitive().tensor()
}

/// The flash forward op on rows when `X` is [`FusedCube<R, BT>`], else the inputs back.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
#[allow(clippy::type_complexity)]
fn flash_rows_forward_on<X: Backend, R: burn_cubecl::CubeRuntime, BT: burn_cubecl::BoolElement>(
    [q, k, v]: [Tensor<X, 2>; 3],
    scale: f32,
    route: flash::Route,
    layout: flash::Heads,
) -> Result<(Tensor<X, 2>, Tensor<X, 3>), [Tensor<X, 2>; 3]> {
    if TypeId::of::<X>() != TypeId::of::<FusedCube<R, BT>>() {
        return Err([q, k, v]);
    }
    let fused = into_fused::<X, R, BT, 2>;
    let (out, lse) = flash::register_forward::<R, BT>(fused(q), fused(k), fused(v), scale, route, layout);
    let back = "the backend was checked";
    Ok((from_fused::<X, R, BT, 2>(out).expect(back), from_fused::<X, R, BT, 3>(lse).expect(back)))
}

/// The flash backward op on rows when `X` is [`FusedCube<R, BT>`], else the inputs back.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn flash_rows_backward_on<X: Backend, R: burn_cubecl::CubeRuntime, BT: burn_cubecl::BoolElement>(
    inputs: AttentionRowsBackward<X>,
    scale: f32,
    route: flash::Route,
    layout: flash::Heads,
) -> Result<[Tensor<X, 2>; 3], AttentionRowsBackward<X>> {
    if TypeId::of::<X>() != TypeId::of::<FusedCube<R, BT>>() {
        return Err(inputs);
    }
    let AttentionRowsBackward { q, k, v, out, grad_out, lse } = inputs;
    // The op computes Δ = rowsum(dO ∘ O) itself (one kernel, f32 sums of the halves).
    let dtype = q.dtype();
    let (grad_out, out) = (cast_to(grad_out, dtype), cast_to(out, dtype));
    let fused = into_fused::<X, R, BT, 2>;
    let operands = [fused(q), fused(k), fused(v), fused(grad_out), fused(out)];
    let (dq, dk, dv) = flash::register_backward::<R, BT>(operands, into_fused::<X, R, BT, 3>(lse), scale, route, layout);
    Ok([dq, dk, dv].map(|g| from_fused::<X, R, BT, 2>(g).expect("the backend was checked")))
}

/// Settings of a GroupNorm for [`group_norm`] and [`group_norm_backward`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GroupNormSpec {
    /// Groups the channels split into (the channel count must be a multiple).
    pub groups: usize,
    /// Added to each group's variance before the square root.
    pub epsilon: f64,
    /// Whether a SiLU follows the affine transform: `silu(x̂ γ + β)` instead of `x̂ γ + β`.
    pub silu: bool,
}

/// Smallest `h · w` the fused GroupNorm kernels take: they give each channel plane a cube,
/// which smaller planes (a LayerNorm seen as a GroupNorm has planes of one element) leave
/// mostly idle.
const FUSED_GROUP_NORM_MIN_PLANE: usize = 16;

/// Turns the fused GroupNorm kernels of [`group_norm`] and [`group_norm_backward`] on or off
/// (default off until they have run on a GPU); has no effect on other backends.
pub fn set_fused_group_norm(enabled: bool) {
    FUSED_GROUP_NORM.store(enabled, Ordering::Relaxed);
}

/// Whether [`set_fused_group_norm`] is on.
pub fn fused_group_norm_enabled() -> bool {
    FUSED_GROUP_NORM.load(Ordering::Relaxed)
}

/// GroupNorm of a `[batch, channels, spatial...]` input (as PyTorch's `(N, C, *)`: a
/// `[b, c, h, w]` feature map, or `[rows, c]` rows, which makes one group a LayerNorm),
/// optionally followed by a SiLU: `(y, mean, rstd)` with `y` in `x`'s dtype and each
/// group's mean and `1/σ` in f32 (`[batch, groups, 1]`), which [`group_norm_backward`]
/// takes. Statistics are computed in
/// f32 whatever the dtypes (as PyTorch's autocast does), so bf16 and f16 models normalise
/// accurately; `γ` and `β` (`[channels]`) may have a dtype of their own.
///
/// With [`set_fused_group_norm`] on, on the CUDA backend (`cuda` feature) this is two
/// kernels of ours that read the input twice and write the output once (see
/// `docs/benchmarks.md`), and for rows (one group, no spatial dimensions) one kernel;
/// otherwise, or for planes under 16 elements, burn's tensor ops. Rows need no reshape to
/// a 4-D layout, which on a fusion backend would be two more operations for the host to
/// register each way.
///
/// # Panics
///
/// When `D < 2`, or the channel count is not a multiple of `spec.groups` (as burn's
/// `GroupNorm` does).
///
/// ```
/// use burn::backend::Flex;
/// use burn::nn::GroupNormConfig;
/// use burn::tensor::activation::silu;
/// use burn::tensor::{Distribution, Tensor};
/// use lora_core::kernels::{group_norm, GroupNormSpec};
///
/// let device = Default::default();
/// let norm = GroupNormConfig::new(4, 8).init::<Flex>(&device);
/// let x = Tensor::<Flex, 4>::random([2, 8, 5, 5], Distribution::Normal(1.0, 2.0), &device);
/// let spec = GroupNormSpec { groups: 4, epsilon: 1e-5, silu: true };
/// let (gamma, beta) = (norm.gamma.as_ref().unwrap().val(), norm.beta.as_ref().unwrap().val());
/// let (y, mean, rstd) = group_norm(x.clone(), gamma, beta, spec);
/// assert_eq!(mean.dims(), [2, 4, 1]);
/// let err: f32 = (y - silu(norm.forward(x))).abs().max().into_scalar();
/// assert!(err < 1e-5);
/// ```
pub fn group_norm<X: Backend, const D: usize>(x: Tensor<X, D>, gamma: Tensor<X, 1>, beta: Tensor<X, 1>, spec: GroupNormSpec) -> (Tensor<X, D>, Tensor<X, 3>, Tensor<X, 3>) {
    let (y, stats) = group_norm_with(x, gamma, beta, spec, true);
    let (mean, rstd) = stats.expect("every path returns the statistics when asked");
    (y, mean, rstd)
}

/// [`group_norm`]'s output alone, for a pass without a backward one (inference, a
/// checkpointed forward pass, layers nothing upstream of needs a gradient): the same
/// numbers, and on the fused backends the group statistics stay inside the op instead of
/// becoming two outputs for burn's fusion stream to release.
///
/// # Panics
///
/// As [`group_norm`].
///
/// ```
/// use burn::backend::Flex;
/// use burn::tensor::{Distribution, Tensor};
/// use lora_core::kernels::{group_norm, group_norm_output, GroupNormSpec};
///
/// let device = Default::default();
/// let x = Tensor::<Flex, 4>::random([2, 8, 5, 5], Distribution::Normal(1.0, 2.0), &device);
/// let (gamma, beta) = (Tensor::<Flex, 1>::ones([8], &device), Tensor::<Flex, 1>::zeros([8], &device));
/// let spec = GroupNormSpec { groups: 4, epsilon: 1e-5, silu: true };
/// let (y, _, _) = group_norm(x.clone(), gamma.clone(), beta.clone(), spec);
/// let err: f32 = (group_norm_output(x, gamma, beta, spec) - y).abs().max().into_scalar();
/// assert_eq!(err, 0.0);
/// ```
pub fn group_norm_output<X: Backend, const D: usize>(x: Tensor<X, D>, gamma: Tensor<X, 1>, beta: Tensor<X, 1>, spec: GroupNormSpec) -> Tensor<X, D> {
    group_norm_with(x, gamma, beta, spec, false).0
}

/// [`group_norm`] and [`group_norm_output`]: the fused op where it applies (with the
/// statistics as outputs only `with_stats`), else burn's ops (which compute them anyway).
#[allow(clippy::type_complexity)]
fn group_norm_with<X: Backend, const D: usize>(
    x: Tensor<X, D>,
    gamma: Tensor<X, 1>,
    beta: Tensor<X, 1>,
    spec: GroupNormSpec,
    with_stats: bool,
) -> (Tensor<X, D>, Option<(Tensor<X, 3>, Tensor<X, 3>)>) {
    if fused_group_norm_applies(&x, spec, false) {
        #[cfg(feature = "cuda")]
        if is_fused::<X, burn_cubecl::cubecl::cuda::CudaRuntime, u8>() {
            return group_norm_on::<X, burn_cubecl::cubecl::cuda::CudaRuntime, u8, D>(x, gamma, beta, spec, with_stats);
        }
        // The same op on wgpu, so that it can be tested without a GPU (lavapipe).
        #[cfg(feature = "wgpu")]
        if is_fused::<X, burn_cubecl::cubecl::wgpu::WgpuRuntime, u32>() {
            return group_norm_on::<X, burn_cubecl::cubecl::wgpu::WgpuRuntime, u32, D>(x, gamma, beta, spec, with_stats);
        }
    }
    // Read by the fused backends only.
    let _ = with_stats;
    let (y, mean, rstd) = group_norm_math(x, gamma, beta, spec);
    (y, Some((mean, rstd)))
}

/// The gradients `(dx, dγ, dβ)` of [`group_norm`] for the output gradient `grad_out`, from
/// the input, `γ`, `β` and the forward pass's `mean` and `rstd`, in the dtypes of `x`, `γ`
/// and `β`: with `h = x̂ γ + β`, `s = sigmoid(h)` and `dh = dy · s (1 + h (1 − s))` (just
/// `dy` without the SiLU), `dγ = Σ dh x̂`, `dβ = Σ dh` and
/// `dx = (dx̂ − mean(dx̂) − x̂ · mean(dx̂ x̂)) / σ` over each group, `dx̂ = dh γ`. Nothing but
/// the input and the group statistics has to be kept from the forward pass. Fused kernels
/// under the same conditions as [`group_norm`].
///
/// # Panics
///
/// As [`group_norm`], or when the statistics do not have its shapes.
///
/// ```
/// use burn::backend::Flex;
/// use burn::tensor::{Distribution, Tensor};
/// use lora_core::kernels::{group_norm, group_norm_backward, GroupNormSpec};
///
/// let device = Default::default();
/// let x = Tensor::<Flex, 4>::random([1, 4, 3, 3], Distribution::Normal(0.0, 1.0), &device);
/// let (gamma, beta) = (Tensor::<Flex, 1>::ones([4], &device), Tensor::<Flex, 1>::zeros([4], &device));
/// let spec = GroupNormSpec { groups: 2, epsilon: 1e-5, silu: false };
/// let (_, mean, rstd) = group_norm(x.clone(), gamma.clone(), beta.clone(), spec);
/// // A constant output gradient: normalised groups do not move with a shift of their input.
/// let dy = Tensor::<Flex, 4>::ones([1, 4, 3, 3], &device);
/// let (dx, _, dbeta) = group_norm_backward(x, gamma, beta, mean, rstd, dy, spec);
/// assert!(dx.abs().max().into_scalar() < 1e-5);
/// assert_eq!(dbeta.into_data().to_vec::<f32>().unwrap(), vec![9.0; 4]);
/// ```
#[allow(clippy::type_complexity)]
pub fn group_norm_backward<X: Backend, const D: usize>(
    x: Tensor<X, D>,
    gamma: Tensor<X, 1>,
    beta: Tensor<X, 1>,
    mean: Tensor<X, 3>,
    rstd: Tensor<X, 3>,
    grad_out: Tensor<X, D>,
    spec: GroupNormSpec,
) -> (Tensor<X, D>, Tensor<X, 1>, Tensor<X, 1>) {
    let (dx, params) = group_norm_grads(x, gamma, beta, mean, rstd, grad_out, spec, true, None);
    let (dgamma, dbeta) = params.expect("parameter gradients were asked for");
    (dx, dgamma, dbeta)
}

/// The input gradient of [`group_norm`] alone: [`group_norm_backward`]'s `dx`, for a norm
/// whose `γ` and `β` are frozen (as in LoRA training). Besides skipping their reductions,
/// this lets a LayerNorm (a GroupNorm of one group over `[rows, channels]`) take the
/// fused kernels: its `dx` needs only row statistics, while `dγ` and `dβ` would be sums over
/// all rows.
///
/// # Panics
///
/// As [`group_norm_backward`].
///
/// ```
/// use burn::backend::Flex;
/// use burn::tensor::{Distribution, Tensor};
/// use lora_core::kernels::{group_norm, group_norm_backward, group_norm_input_grad, GroupNormSpec};
///
/// let device = Default::default();
/// // LayerNorm rows.
/// let x = Tensor::<Flex, 2>::random([6, 16], Distribution::Normal(0.0, 1.0), &device);
/// let dy = Tensor::<Flex, 2>::random([6, 16], Distribution::Normal(0.0, 1.0), &device);
/// let (gamma, beta) = (Tensor::<Flex, 1>::ones([16], &device), Tensor::<Flex, 1>::zeros([16], &device));
/// let spec = GroupNormSpec { groups: 1, epsilon: 1e-5, silu: false };
/// let (_, mean, rstd) = group_norm(x.clone(), gamma.clone(), beta.clone(), spec);
/// let dx = group_norm_input_grad(x.clone(), gamma.clone(), beta.clone(), mean.clone(), rstd.clone(), dy.clone(), spec);
/// let (full, _, _) = group_norm_backward(x, gamma, beta, mean, rstd, dy, spec);
/// assert!((dx - full).abs().max().into_scalar() < 1e-6);
/// ```
pub fn group_norm_input_grad<X: Backend, const D: usize>(
    x: Tensor<X, D>,
    gamma: Tensor<X, 1>,
    beta: Tensor<X, 1>,
    mean: Tensor<X, 3>,
    rstd: Tensor<X, 3>,
    grad_out: Tensor<X, D>,
    spec: GroupNormSpec,
) -> Tensor<X, D> {
    group_norm_grads(x, gamma, beta, mean, rstd, grad_out, spec, false, None).0
}

/// [`group_norm_input_grad`] plus `acc` (`x`'s shape): the input gradient added to another
/// gradient of the same input, as a residual connection gives it, inside the fused
/// backward kernel (one pass over the activations and one operation of burn's fusion stream
/// fewer than an addition after it); burn's ops add it elsewhere.
///
/// # Panics
///
/// As [`group_norm_backward`].
///
/// ```
/// use burn::backend::Flex;
/// use burn::tensor::{Distribution, Tensor};
/// use lora_core::kernels::{group_norm, group_norm_input_grad, group_norm_input_grad_plus, GroupNormSpec};
///
/// let device = Default::default();
/// let x = Tensor::<Flex, 4>::random([2, 4, 3, 3], Distribution::Normal(0.0, 1.0), &device);
/// let dy = Tensor::<Flex, 4>::random([2, 4, 3, 3], Distribution::Normal(0.0, 1.0), &device);
/// let skip = Tensor::<Flex, 4>::random([2, 4, 3, 3], Distribution::Normal(0.0, 1.0), &device);
/// let (gamma, beta) = (Tensor::<Flex, 1>::ones([4], &device), Tensor::<Flex, 1>::zeros([4], &device));
/// let spec = GroupNormSpec { groups: 2, epsilon: 1e-5, silu: true };
/// let (_, mean, rstd) = group_norm(x.clone(), gamma.clone(), beta.clone(), spec);
/// let dx = group_norm_input_grad(x.clone(), gamma.clone(), beta.clone(), mean.clone(), rstd.clone(), dy.clone(), spec);
/// let plus = group_norm_input_grad_plus(x, gamma, beta, mean, rstd, dy, spec, Some(skip.clone()));
/// assert!((plus - (dx + skip)).abs().max().into_scalar() < 1e-6);
/// ```
#[allow(clippy::too_many_arguments)]
pub fn group_norm_input_grad_plus<X: Backend, const D: usize>(
    x: Tensor<X, D>,
    gamma: Tensor<X, 1>,
    beta: Tensor<X, 1>,
    mean: Tensor<X, 3>,
    rstd: Tensor<X, 3>,
    grad_out: Tensor<X, D>,
    spec: GroupNormSpec,
    acc: Option<Tensor<X, D>>,
) -> Tensor<X, D> {
    group_norm_grads(x, gamma, beta, mean, rstd, grad_out, spec, false, acc).0
}

/// [`group_norm_backward`] (`params`) or [`group_norm_input_grad`]: the fused kernels where
/// they apply, burn's ops otherwise.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn group_norm_grads<X: Backend, const D: usize>(
    x: Tensor<X, D>,
    gamma: Tensor<X, 1>,
    beta: Tensor<X, 1>,
    mean: Tensor<X, 3>,
    rstd: Tensor<X, 3>,
    grad_out: Tensor<X, D>,
    spec: GroupNormSpec,
    params: bool,
    acc: Option<Tensor<X, D>>,
) -> (Tensor<X, D>, Option<(Tensor<X, 1>, Tensor<X, 1>)>) {
    // The kernels add a gradient of the input's dtype and shape.
    let acc_fits = acc.as_ref().is_none_or(|a| a.dtype() == x.dtype() && a.dims() == x.dims());
    if acc_fits && fused_group_norm_applies(&x, spec, params) {
        #[cfg(feature = "cuda")]
        if is_fused::<X, burn_cubecl::cubecl::cuda::CudaRuntime, u8>() {
            return group_norm_backward_on::<X, burn_cubecl::cubecl::cuda::CudaRuntime, u8, D>([x, grad_out], [gamma, beta], [mean, rstd], acc, spec, params);
        }
        #[cfg(feature = "wgpu")]
        if is_fused::<X, burn_cubecl::cubecl::wgpu::WgpuRuntime, u32>() {
            return group_norm_backward_on::<X, burn_cubecl::cubecl::wgpu::WgpuRuntime, u32, D>([x, grad_out], [gamma, beta], [mean, rstd], acc, spec, params);
        }
    }
    let (dx, param_grads) = group_norm_grads_math(x, gamma, beta, mean, rstd, grad_out, spec, params);
    match acc {
        Some(acc) => {
            let dtype = dx.dtype();
            (dx + cast_to(acc, dtype), param_grads)
        }
        None => (dx, param_grads),
    }
}

/// Whether the fused GroupNorm kernels are on and take inputs shaped like `x`: planes of
/// at least [`FUSED_GROUP_NORM_MIN_PLANE`] elements, or a LayerNorm's rows (one group over
/// single-element planes) when `dγ` and `dβ` are not wanted (`params`).
fn fused_group_norm_applies<X: Backend, const D: usize>(x: &Tensor<X, D>, spec: GroupNormSpec, params: bool) -> bool {
    let (_, _, plane) = norm_layout(&x.dims());
    let rows = plane == 1 && spec.groups == 1 && !params;
    fused_group_norm_enabled() && (plane >= FUSED_GROUP_NORM_MIN_PLANE || rows)
}

/// `(batch, channels, plane)` of a `[batch, channels, spatial...]` GroupNorm input, the
/// plane being the product of the spatial dimensions (1 for rows).
///
/// # Panics
///
/// For fewer than two dimensions.
fn norm_layout(dims: &[usize]) -> (usize, usize, usize) {
    let [batch, channels, spatial @ ..] = dims else {
        panic!("group norm: expected [batch, channels, spatial...], got {dims:?}");
    };
    (*batch, *channels, spatial.iter().product())
}

/// `x`, or a contiguous copy of it when it is a strided view (for kernels that index densely).
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn contiguous<R: burn_cubecl::CubeRuntime>(x: burn_cubecl::tensor::CubeTensor<R>) -> burn_cubecl::tensor::CubeTensor<R> {
    if x.is_contiguous() {
        x
    } else {
        burn_cubecl::kernel::into_contiguous(x)
    }
}

/// Whether `X` is [`FusedCube<R, BT>`] (the ops taking their inputs by value check first).
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn is_fused<X: Backend, R: burn_cubecl::CubeRuntime, BT: burn_cubecl::BoolElement>() -> bool {
    TypeId::of::<X>() == TypeId::of::<FusedCube<R, BT>>()
}

/// The fused GroupNorm op; `X` must be [`FusedCube<R, BT>`] ([`is_fused`]). The inputs are
/// moved into the op, so that the last reader releases them (a clone would leave a release
/// operation of its own on the stream).
#[cfg(any(feature = "cuda", feature = "wgpu"))]
#[allow(clippy::type_complexity)]
fn group_norm_on<X: Backend, R: burn_cubecl::CubeRuntime, BT: burn_cubecl::BoolElement, const D: usize>(
    x: Tensor<X, D>,
    gamma: Tensor<X, 1>,
    beta: Tensor<X, 1>,
    spec: GroupNormSpec,
    with_stats: bool,
) -> (Tensor<X, D>, Option<(Tensor<X, 3>, Tensor<X, 3>)>) {
    let [gamma, beta] = [gamma, beta].map(into_fused::<X, R, BT, 1>);
    let (y, stats) = group_norm::register_forward::<R, BT>(into_fused::<X, R, BT, D>(x), gamma, beta, spec, with_stats);
    let checked = "the backend was checked";
    let stat = |t| from_fused::<X, R, BT, 3>(t).expect(checked);
    (from_fused::<X, R, BT, D>(y).expect(checked), stats.map(|(mean, rstd)| (stat(mean), stat(rstd))))
}

/// The fused GroupNorm backward op; `X` must be [`FusedCube<R, BT>`] ([`is_fused`]), the
/// inputs moved into the op as in [`group_norm_on`].
#[cfg(any(feature = "cuda", feature = "wgpu"))]
#[allow(clippy::type_complexity)]
fn group_norm_backward_on<X: Backend, R: burn_cubecl::CubeRuntime, BT: burn_cubecl::BoolElement, const D: usize>(
    [x, grad_out]: [Tensor<X, D>; 2],
    [gamma, beta]: [Tensor<X, 1>; 2],
    [mean, rstd]: [Tensor<X, 3>; 2],
    acc: Option<Tensor<X, D>>,
    spec: GroupNormSpec,
    params: bool,
) -> (Tensor<X, D>, Option<(Tensor<X, 1>, Tensor<X, 1>)>) {
    let [x, dy] = [x, grad_out].map(into_fused::<X, R, BT, D>);
    let [gamma, beta] = [gamma, beta].map(into_fused::<X, R, BT, 1>);
    let [mean, rstd] = [mean, rstd].map(into_fused::<X, R, BT, 3>);
    let acc = acc.map(into_fused::<X, R, BT, D>);
    let (dx, param_grads) = group_norm::register_backward::<R, BT>([x, gamma, beta, dy], [mean, rstd], acc, spec, params);
    let checked = "the backend was checked";
    let param = |t| from_fused::<X, R, BT, 1>(t).expect(checked);
    (from_fused::<X, R, BT, D>(dx).expect(checked), param_grads.map(|(dgamma, dbeta)| (param(dgamma), param(dbeta))))
}

/// GroupNorm (+ SiLU) in burn's ops: `y` in `x`'s dtype and the per-group mean and
/// `1/σ` (f32, `[b, groups, 1]`), statistics in f32.
fn group_norm_math<X: Backend, const D: usize>(x: Tensor<X, D>, gamma: Tensor<X, 1>, beta: Tensor<X, 1>, spec: GroupNormSpec) -> (Tensor<X, D>, Tensor<X, 3>, Tensor<X, 3>) {
    let dtype = x.dtype();
    let shape = x.dims();
    let (b, c, plane) = norm_layout(&shape);
    let xg = cast_to(x, DType::F32).reshape([b, spec.groups, (c / spec.groups) * plane]);
    let mean = xg.clone().mean_dim(2);
    let centred = xg - mean.clone();
    let var = centred.clone().square().mean_dim(2);
    let rstd = var.add_scalar(spec.epsilon).sqrt().recip();
    let xhat = (centred * rstd.clone()).reshape([b, c, plane]);
    let hpre = add_channels(mul_channels(xhat, per_channel(gamma, b, plane)), per_channel(beta, b, plane));
    let y = if spec.silu { hpre.clone() * burn::tensor::activation::sigmoid(hpre) } else { hpre };
    (cast_to(y.reshape(shape), dtype), mean, rstd)
}

/// A per-channel parameter `[c]` in f32, shaped to scale or shift `[b, c, plane]` values:
/// `[b, c, 1]` (stored, not a broadcast view) for planes, `[1, c, 1]` for rows (`plane`
/// 1). Same values as broadcasting `[1, c, 1]`, but burn-flex (the CPU backend) takes a
/// broadcast over the batch and the plane at once element by element through its strided
/// iterator, most of a small training step's time on a CPU, while one per-row value over
/// contiguous rows, or one shared row, runs its vectorised loops.
fn per_channel<X: Backend>(t: Tensor<X, 1>, b: usize, plane: usize) -> Tensor<X, 3> {
    let c = t.dims()[0];
    let t = cast_to(t, DType::F32).reshape([1, c, 1]);
    if plane == 1 || b == 1 {
        t
    } else {
        t.repeat_dim(0, b)
    }
}

/// `t · p` for values `t` (`[b, c, plane]`) and a [`per_channel`] parameter `p`. Rows
/// (`plane` 1, a LayerNorm's) are multiplied as `[b, c]` by `[1, c]`, one shared row that
/// burn-flex vectorises; `[b, c, 1]` against `[1, c, 1]` would take its element-by-element
/// iterator.
fn mul_channels<X: Backend>(t: Tensor<X, 3>, p: Tensor<X, 3>) -> Tensor<X, 3> {
    let [b, c, plane] = t.dims();
    if plane == 1 {
        (t.reshape([b, c]) * p.reshape([1, c])).reshape([b, c, 1])
    } else {
        t * p
    }
}

/// `t + p`, laid out as in [`mul_channels`].
fn add_channels<X: Backend>(t: Tensor<X, 3>, p: Tensor<X, 3>) -> Tensor<X, 3> {
    let [b, c, plane] = t.dims();
    if plane == 1 {
        (t.reshape([b, c]) + p.reshape([1, c])).reshape([b, c, 1])
    } else {
        t + p
    }
}

/// The gradients of [`group_norm_math`] in burn's ops: `dh = dy · s (1 + h (1 − s))` with
/// `s = sigmoid(h)`, `dx̂ = dh γ`, `dx = (dx̂ − mean(dx̂) − x̂ · mean(dx̂ x̂)) / σ` over each
/// group and, with `params`, `dγ = Σ dh x̂`, `dβ = Σ dh`; in the dtypes of `x`, `γ` and `β`.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn group_norm_grads_math<X: Backend, const D: usize>(
    x: Tensor<X, D>,
    gamma: Tensor<X, 1>,
    beta: Tensor<X, 1>,
    mean: Tensor<X, 3>,
    rstd: Tensor<X, 3>,
    grad_out: Tensor<X, D>,
    spec: GroupNormSpec,
    params: bool,
) -> (Tensor<X, D>, Option<(Tensor<X, 1>, Tensor<X, 1>)>) {
    let (x_dtype, gamma_dtype, beta_dtype) = (x.dtype(), gamma.dtype(), beta.dtype());
    let shape = x.dims();
    let (b, c, plane) = norm_layout(&shape);
    let groups = spec.groups;
    let per_group = (c / groups) * plane;
    let xhat = ((cast_to(x, DType::F32).reshape([b, groups, per_group]) - mean) * rstd.clone()).reshape([b, c, plane]);
    let g = per_channel(gamma, b, plane);
    let dy = cast_to(grad_out, DType::F32).reshape([b, c, plane]);
    let dh = if spec.silu {
        let hpre = add_channels(mul_channels(xhat.clone(), g.clone()), per_channel(beta, b, plane));
        let s = burn::tensor::activation::sigmoid(hpre.clone());
        dy * s.clone() * (hpre * (s.neg().add_scalar(1.0))).add_scalar(1.0)
    } else {
        dy
    };
    let param_grads = params.then(|| {
        // Sums over the batch and the plane.
        let sum = |t: Tensor<X, 3>| t.sum_dim(2).sum_dim(0).reshape([c]);
        let dgamma = sum(dh.clone() * xhat.clone());
        let dbeta = sum(dh.clone());
        (cast_to(dgamma, gamma_dtype), cast_to(dbeta, beta_dtype))
    });
    let dxhat = mul_channels(dh, g).reshape([b, groups, per_group]);
    let xhat = xhat.reshape([b, groups, per_group]);
    let m1 = dxhat.clone().mean_dim(2);
    let m2 = (dxhat.clone() * xhat.clone()).mean_dim(2);
    let dx = ((dxhat - m1 - xhat * m2) * rstd).reshape(shape);
    (cast_to(dx, x_dtype), param_grads)
}

/// `a.matmul(b)`, in cuBLAS when `X` is the CUDA backend, [`set_cublas`] is on, the batch
/// dimensions of `a` and `b` are equal and the product is at least the size set by
/// [`set_cublas_min_gflop`]; otherwise, with [`set_fixed_matmul`] on, equal batch
/// dimensions and equal dtypes, in the fixed CubeCL matmul kernel; burn's (autotuned) matmul
/// otherwise. Transposed views (`swap_dims` of the last two dimensions) are read as they are.
///
/// ```
/// use burn::backend::Flex;
/// use burn::tensor::Tensor;
///
/// let device = Default::default();
/// let a = Tensor::<Flex, 3>::ones([2, 3, 4], &device);
/// let b = Tensor::<Flex, 3>::ones([2, 4, 5], &device);
/// let c = lora_core::kernels::matmul(a, b);
/// assert_eq!(c.dims(), [2, 3, 5]);
/// ```
pub fn matmul<X: Backend, const D: usize>(a: Tensor<X, D>, b: Tensor<X, D>) -> Tensor<X, D> {
    matmul_transposed(a, b, false, false)
}

/// `op(a) · op(b)`, where `op` swaps the last two dimensions of `a` (with `transpose_a`)
/// and of `b` (with `transpose_b`): [`matmul`] of `a.swap_dims(D - 2, D - 1)` and so on,
/// routed the same way. In the routed ops (cuBLAS, the fixed kernel) the transposition is
/// a view taken inside the op, so it adds no operation to burn's fusion stream, where each
/// `swap_dims` is one the host registers, matches and releases (a linear layer's backward
/// pass transposes its weight for the input gradient and its input for the weight
/// gradient).
///
/// # Panics
///
/// When `D < 2`, or the shapes do not multiply (as burn's `matmul`).
///
/// ```
/// use burn::backend::Flex;
/// use burn::tensor::{Distribution, Tensor};
/// use lora_core::kernels::{matmul, matmul_transposed};
///
/// let device = Default::default();
/// let x = Tensor::<Flex, 2>::random([5, 3], Distribution::Default, &device);
/// let dy = Tensor::<Flex, 2>::random([5, 4], Distribution::Default, &device);
/// // A weight gradient, `xᵀ · dy`.
/// let dw = matmul_transposed(x.clone(), dy.clone(), true, false);
/// let err: f32 = (dw - matmul(x.swap_dims(0, 1), dy)).abs().max().into_scalar();
/// assert_eq!(err, 0.0);
/// ```
pub fn matmul_transposed<X: Backend, const D: usize>(a: Tensor<X, D>, b: Tensor<X, D>, transpose_a: bool, transpose_b: bool) -> Tensor<X, D> {
    assert!(D >= 2, "matmul_transposed needs at least two dimensions, got {D}");
    let read = |dims: [usize; D], transpose: bool| {
        let mut dims = dims;
        if transpose {
            dims.swap(D - 2, D - 1);
        }
        dims
    };
    let (da, db) = (read(a.dims(), transpose_a), read(b.dims(), transpose_b));
    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    let transpose = fixed_matmul::Transpose { a: transpose_a, b: transpose_b };
    #[cfg(feature = "cuda")]
    if cublas_enabled() && TypeId::of::<X>() == TypeId::of::<burn::backend::Cuda>() && worth_routing(&da, &db) {
        type Cuda = burn::backend::Cuda;
        if let (Some(ca), Some(cb)) = (downcast::<_, Tensor<Cuda, D>>(a.clone()), downcast::<_, Tensor<Cuda, D>>(b.clone())) {
            let out = cuda::matmul(ca.into_primitive().tensor(), cb.into_primitive().tensor(), transpose);
            if let Some(out) = downcast(tensor::<Cuda, D>(out)) {
                return out;
            }
        }
    }
    if fixed_matmul_enabled() && a.dtype() == b.dtype() && same_batch(&da, &db) {
        #[cfg(feature = "cuda")]
        if let Some(out) = fixed_matmul_on::<X, burn_cubecl::cubecl::cuda::CudaRuntime, u8, D>(&a, &b, transpose) {
            return out;
        }
        // The same op on wgpu, so that it can be tested without a GPU (lavapipe).
        #[cfg(feature = "wgpu")]
        if let Some(out) = fixed_matmul_on::<X, burn_cubecl::cubecl::wgpu::WgpuRuntime, u32, D>(&a, &b, transpose) {
            return out;
        }
    }
    let view = |t: Tensor<X, D>, transpose: bool| if transpose { t.swap_dims(D - 2, D - 1) } else { t };
    view(a, transpose_a).matmul(view(b, transpose_b))
}

/// The fixed-kernel matmul op when `X` is [`FusedCube<R, BT>`], else `None`.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn fixed_matmul_on<X: Backend, R: burn_cubecl::CubeRuntime, BT: burn_cubecl::BoolElement, const D: usize>(
    a: &Tensor<X, D>,
    b: &Tensor<X, D>,
    transpose: fixed_matmul::Transpose,
) -> Option<Tensor<X, D>> {
    let out = fixed_matmul::register::<R, BT>(to_fused::<X, R, BT, D>(a)?, to_fused::<X, R, BT, D>(b)?, transpose);
    from_fused::<X, R, BT, D>(out)
}

/// Whether `a · b` is a matmul of equal batch dimensions (no broadcasting).
fn same_batch(a: &[usize], b: &[usize]) -> bool {
    let d = a.len();
    d >= 2 && a[..d - 2] == b[..d - 2] && a[d - 1] == b[d - 2]
}

/// Whether `a · b` has equal batch dimensions and at least the routing threshold of FLOPs
/// ([`set_cublas_min_gflop`], or [`set_cublas_tall_min_gflop`] for a tall one).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn worth_routing(a: &[usize], b: &[usize]) -> bool {
    worth_routing_at(a, b, cublas_thresholds())
}

/// The routing thresholds of [`set_cublas_min_gflop`] and [`set_cublas_tall_min_gflop`],
/// in FLOPs.
#[derive(Debug, Clone, Copy, PartialEq)]
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
struct CublasThresholds {
    min_flops: f64,
    tall_min_flops: f64,
    tall_rows: usize,
}

#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
fn cublas_thresholds() -> CublasThresholds {
    CublasThresholds {
        min_flops: cublas_min_flops(),
        tall_min_flops: CUBLAS_TALL_MIN_FLOPS.load(Ordering::Relaxed) as f64,
        tall_rows: CUBLAS_TALL_MIN_ROWS.load(Ordering::Relaxed),
    }
}

/// [`worth_routing`] with the thresholds `at`.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn worth_routing_at(a: &[usize], b: &[usize], at: CublasThresholds) -> bool {
    if !same_batch(a, b) {
        return false;
    }
    let rows: usize = a[..a.len() - 1].iter().product();
    let flops = 2.0 * rows as f64 * a[a.len() - 1] as f64 * b[a.len() - 1] as f64;
    flops >= at.min_flops || (rows >= at.tall_rows && flops >= at.tall_min_flops)
}

/// The current routing threshold of [`set_cublas_min_gflop`], in FLOPs.
#[cfg_attr(not(any(feature = "cuda", feature = "wgpu")), allow(dead_code))]
fn cublas_min_flops() -> f64 {
    CUBLAS_MIN_FLOPS.load(Ordering::Relaxed) as f64
}

/// `linear.forward(x)`; with [`set_cublas`] or [`set_fixed_matmul`] on, through an op whose
/// matmuls go through [`matmul`] (forward `x·W`, input gradient `dy·Wᵀ`, weight gradient
/// `xᵀ·dy`), on the autodiff backend over Flex or CUDA and on plain CUDA. Like burn's own linear backward it
/// keeps the input only for a trainable weight.
///
/// ```
/// use burn::backend::Flex;
/// use burn::nn::LinearConfig;
/// use burn::tensor::{Distribution, Tensor};
///
/// let device = Default::default();
/// let layer = LinearConfig::new(8, 4).init::<Flex>(&device);
/// let x = Tensor::<Flex, 3>::random([2, 5, 8], Distribution::Default, &device);
/// let ours = lora_core::kernels::linear(&layer, x.clone());
/// let err: f32 = (ours - layer.forward(x)).abs().max().into_scalar();
/// assert!(err < 1e-5);
/// ```
pub fn linear<B: Backend, const D: usize>(layer: &Linear<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    if !matmuls_routed() {
        return layer.forward(x);
    }
    linear_op(layer, x)
}

/// `x · weight` for a weight in burn's `[d_in, d_out]` layout (burn's
/// `module::linear(x, weight, None)`); with [`set_cublas`] or [`set_fixed_matmul`] on, through
/// the same op as [`linear`], whose forward and backward matmuls go through [`matmul`].
/// [`LoraLinear`](crate::LoraLinear)'s adapters use it for their rank-r products.
///
/// ```
/// use burn::backend::Flex;
/// use burn::tensor::{Distribution, Tensor};
///
/// let device = Default::default();
/// let x = Tensor::<Flex, 3>::random([2, 5, 8], Distribution::Default, &device);
/// let w = Tensor::<Flex, 2>::random([8, 4], Distribution::Default, &device);
/// let y = lora_core::kernels::linear_weight(x.clone(), w.clone());
/// let err: f32 = (y - burn::tensor::module::linear(x, w, None)).abs().max().into_scalar();
/// assert!(err < 1e-5);
/// ```
pub fn linear_weight<B: Backend, const D: usize>(x: Tensor<B, D>, weight: Tensor<B, 2>) -> Tensor<B, D> {
    if !matmuls_routed() {
        return burn::tensor::module::linear(x, weight, None);
    }
    linear_weight_op(x, weight)
}

/// [`linear`] with a routing switch on.
fn linear_op<B: Backend, const D: usize>(layer: &Linear<B>, x: Tensor<B, D>) -> Tensor<B, D> {
    let dtype = x.dtype();
    // The bias joins on the rows, before the reshape back (see `linear_rows`).
    linear_rows(x, layer.weight.val(), |y| match &layer.bias {
        Some(bias) => y + cast_to(bias.val(), dtype).unsqueeze::<2>(),
        None => y,
    })
}

/// [`linear_weight`] with a routing switch on.
fn linear_weight_op<B: Backend, const D: usize>(x: Tensor<B, D>, weight: Tensor<B, 2>) -> Tensor<B, D> {
    linear_rows(x, weight, |y| y)
}

/// `then(x_rows · weight)` reshaped back to `x`'s leading dimensions, the product in the op
/// of [`dispatch_linear`]; burn's `linear` (then `then`'s epilogue on its output) where that
/// op does not apply. The epilogue runs on the 2-d rows because burn's fusion cannot fuse
/// an elementwise op into a block after a reshape to a higher rank.
fn linear_rows<B: Backend, const D: usize>(x: Tensor<B, D>, weight: Tensor<B, 2>, then: impl FnOnce(Tensor<B, 2>) -> Tensor<B, 2>) -> Tensor<B, D> {
    let dims = x.dims();
    let [d_in, d_out] = weight.dims();
    let mut out_dims = dims;
    out_dims[D - 1] = d_out;
    if D < 2 || weight.dtype() != x.dtype() {
        let rows = dims[..D - 1].iter().product::<usize>();
        let y = burn::tensor::module::linear(x, weight, None).reshape([rows, d_out]);
        return then(y).reshape(out_dims);
    }
    let rows = dims[..D - 1].iter().product::<usize>();
    let args = (x.reshape([rows, d_in]), weight);
    let y = match dispatch_linear(&args) {
        Some(y) => y,
        None => {
            let (x, weight) = args;
            burn::tensor::module::linear(x, weight, None)
        }
    };
    then(y).reshape(out_dims)
}

fn dispatch_linear<B: Backend>(args: &(Tensor<B, 2>, Tensor<B, 2>)) -> Option<Tensor<B, 2>> {
    use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, NoCheckpointing};
    let found = linear_autodiff::<B, burn::backend::Flex, NoCheckpointing>(args).or_else(|| linear_autodiff::<B, burn::backend::Flex, BalancedCheckpointing>(args));
    #[cfg(feature = "cuda")]
    let found = found.or_else(|| dispatch_linear_on::<B, burn::backend::Cuda>(args));
    // The same op on wgpu, so that the routed linear layers (and their backward) run there
    // without a GPU, as on CUDA (lavapipe; sd-model's `launches` example).
    #[cfg(feature = "wgpu")]
    let found = found.or_else(|| dispatch_linear_on::<B, burn::backend::Wgpu>(args));
    found
}

/// [`dispatch_linear`] when `B` is GPU backend `X` (plain, where [`matmul`] routes the
/// product) or the autodiff backend over it (either checkpointing strategy).
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn dispatch_linear_on<B: Backend, X: Backend>(args: &(Tensor<B, 2>, Tensor<B, 2>)) -> Option<Tensor<B, 2>> {
    use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, NoCheckpointing};
    linear_autodiff::<B, X, NoCheckpointing>(args)
        .or_else(|| linear_autodiff::<B, X, BalancedCheckpointing>(args))
        .or_else(|| {
            let (x, w) = args.clone();
            let (x, w): (Tensor<X, 2>, Tensor<X, 2>) = (downcast(x)?, downcast(w)?);
            downcast(matmul(x, w))
        })
}

fn linear_autodiff<B: Backend, X: Backend, C: CheckpointStrategy>(args: &(Tensor<B, 2>, Tensor<B, 2>)) -> Option<Tensor<B, 2>> {
    if TypeId::of::<B>() != TypeId::of::<Autodiff<X, C>>() {
        return None;
    }
    let (x, weight) = args.clone();
    let x: Tensor<Autodiff<X, C>, 2> = downcast(x)?;
    let weight: Tensor<Autodiff<X, C>, 2> = downcast(weight)?;
    let (x, weight) = (x.into_primitive().tensor(), weight.into_primitive().tensor());
    let (x_tracked, weight_tracked) = (!x.node.requirement.is_none(), !weight.node.requirement.is_none());
    let forward = |x: FloatTensor<X>, w: FloatTensor<X>| matmul(tensor::<X, 2>(x), tensor(w)).into_primitive().tensor();
    let out = match LinearBackward.prepare::<C>([x.node.clone(), weight.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let y = forward(x.primitive.clone(), weight.primitive.clone());
            // The input is needed only for the weight gradient and the weight only for the
            // input gradient.
            let state = (weight_tracked.then_some(x.primitive), x_tracked.then_some(weight.primitive));
            prep.finish(state, y)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(x.primitive, weight.primitive)),
    };
    downcast(tensor::<Autodiff<X, C>, 2>(out))
}

/// Backward of a bias-free linear layer on `[rows, d_in]` inputs.
#[derive(Debug)]
struct LinearBackward;

impl<X: Backend> Backward<X, 2> for LinearBackward {
    /// The input (when the weight is tracked) and the weight (when the input is).
    type State = (Option<FloatTensor<X>>, Option<FloatTensor<X>>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad_out = tensor::<X, 2>(grads.consume::<X>(&ops.node));
        let (x, weight) = ops.state;
        let [px, pw] = ops.parents;
        if let (Some(node), Some(x)) = (pw, x) {
            let dw = weight_grad(tensor::<X, 2>(x), grad_out.clone());
            grads.register::<X>(node.id, dw.into_primitive().tensor());
        }
        if let (Some(node), Some(w)) = (px, weight) {
            let dx = matmul_transposed(grad_out, tensor::<X, 2>(w), false, true);
            grads.register::<X>(node.id, dx.into_primitive().tensor());
        }
    }
}

/// Fewest rows per chunk of a split weight gradient ([`weight_grad`]).
const SPLIT_MIN_ROWS: usize = 256;

/// Most rows per chunk of a split weight gradient: longer chunks are not split.
const SPLIT_MAX_ROWS: usize = 4096;

/// Most elements of a split weight gradient's partial products (8 MiB in bf16).
const SPLIT_MAX_PARTIALS: usize = 1 << 22;

/// `xᵀ · dy`, the weight gradient of a linear layer, for `x: [rows, d_in]` and
/// `dy: [rows, d_out]`; in chunks of rows ([`split_rows`]) when the rows dwarf the output.
///
/// LoRA's rank-r products have tens of thousands of rows (batch × tokens) and outputs of a
/// few hundred by r: as one matmul, the few output tiles go to a few SMs, each looping over
/// every row. On the H200 those products took about 0.2 ms each, 100 ms of an SD1.5 batch-8
/// step (device run of 2026-11-30, docs/benchmarks.md). Split, each chunk is one entry of a
/// batched matmul (a view of the same buffers), which spreads the rows over the whole GPU,
/// and the partial products are summed in f32.
fn weight_grad<X: Backend>(x: Tensor<X, 2>, dy: Tensor<X, 2>) -> Tensor<X, 2> {
    let [rows, d_in] = x.dims();
    let d_out = dy.dims()[1];
    let Some(chunk) = split_rows(rows, d_in * d_out) else {
        return matmul_transposed(x, dy, true, false);
    };
    let chunks = rows / chunk;
    let dtype = dy.dtype();
    let partials = matmul_transposed(x.reshape([chunks, chunk, d_in]), dy.reshape([chunks, chunk, d_out]), true, false);
    // Each partial is rounded to the operands' dtype once; the sum is in f32.
    cast_to(cast_to(partials, DType::F32).sum_dim(0), dtype).reshape([d_in, d_out])
}

/// Rows per chunk for [`weight_grad`] of a `[rows, ·]ᵀ · [rows, ·]` product with `outputs`
/// output elements: the shortest chunk of at least [`SPLIT_MIN_ROWS`] rows that divides
/// `rows` and keeps the partials within [`SPLIT_MAX_PARTIALS`]; `None` (no split) when the
/// rows do not outnumber the outputs' rows and columns by far, or no such chunk of at most
/// [`SPLIT_MAX_ROWS`] rows exists.
fn split_rows(rows: usize, outputs: usize) -> Option<usize> {
    if outputs == 0 || rows < 4 * SPLIT_MIN_ROWS || rows < 64 * outputs.isqrt() {
        return None;
    }
    let shortest = SPLIT_MIN_ROWS.max((rows * outputs).div_ceil(SPLIT_MAX_PARTIALS));
    (shortest..=SPLIT_MAX_ROWS.min(rows / 2)).find(|&chunk| rows.is_multiple_of(chunk))
}

#[cfg(test)]
mod tests;
