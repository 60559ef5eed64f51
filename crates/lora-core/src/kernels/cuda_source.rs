//! lora-core's CubeCL kernels compiled for an H100/H200 without a GPU.
//!
//! A GPU session is short and rare, so a kernel that does not compile for CUDA, or spills
//! registers, should be found before one. This test runs every kernel launcher of
//! lora-core (flash attention, GroupNorm/LayerNorm, softmax, the flat concatenation, the
//! stream-ordering kernels) with the arguments the SD1.5 and SD2.1 shapes give, on a
//! stand-in CubeCL runtime: it reports sm_90's device properties (the ones cubecl-cuda's
//! own runtime registers for compute capability 9.0, 32-lane planes, 227 KiB of opt-in
//! shared memory) and, instead of running a launched kernel, translates it with
//! cubecl-cuda's compiler (`CudaCompiler`) into the CUDA C++ that cubecl-cuda hands to
//! NVRTC on the device. So the launch code's choices (flash attention's `plan` on 16×16×16
//! WMMA tiles, GroupNorm's vector widths) and the generated code are the device's.
//!
//! With `SD_LORA_NVRTC=DIR` (a CUDA toolkit root: `DIR/include`, and `libnvrtc` on the
//! library path) each source is also compiled by NVRTC with cubecl-cuda's options
//! (`--gpu-architecture=sm_90a`, the toolkit's headers), and with `SD_LORA_CUDA_OUT=DIR` the
//! sources and PTX are written there; `scripts/cuda-compile.sh` sets both up from NVIDIA's
//! PyPI wheels (NVRTC, headers, `ptxas`) and reports each kernel's registers, spills and
//! shared memory from `ptxas -v`. Without them the test checks the translation alone.
//! (Not `CUDA_PATH`: cudarc's build script watches it, so setting it rebuilds burn.)

use std::ffi::{CStr, CString};
use std::sync::{Arc, Mutex};

use burn_cubecl::cubecl;
use cubecl::cuda::{CudaCompiler, CudaRuntime};
use cubecl::prelude::*;
use cubecl::server::{Binding, ComputeServer, CopyDescriptor, ExecutionMode, IoError, KernelArguments, ProfileError, ProfilingToken, ServerCommunication, ServerError, ServerUtilities};
use cubecl::zspace::{striding::has_pitched_row_major_strides, Shape, Strides};
use cubecl_common::bytes::Bytes;
use cubecl_common::device::{Device, DeviceId, DeviceService};
use cubecl_common::future::DynFut;
use cubecl_common::profile::{ProfileDuration, TimingMethod};
use cubecl_common::stream_id::StreamId;
use cubecl_cpp::cuda::arch::CudaArchitecture;
use cubecl_cpp::cuda::mma::CudaWmmaCompiler;
use cubecl_cpp::shared::{register_mma_features, register_wmma_features, CompilationOptions, CppSupportedFeatures};
use cubecl_cpp::{register_supported_types, DialectWmmaCompiler};
use cubecl_ir::features::{AtomicUsage, Plane, TypeUsage};
use cubecl_ir::{BarrierLevel, DeviceProperties, ElemType, FloatKind, HardwareProperties, MemoryDeviceProperties, OpaqueType, SemanticType, StorageType, TargetProperties, Type, VectorSize};
use cubecl_runtime::allocator::PitchedMemoryLayoutPolicy;
use cubecl_runtime::compiler::CubeTask;
use cubecl_runtime::logging::ServerLogger;
use cubecl_runtime::memory_management::{ManagedMemoryHandle, MemoryAllocationMode, MemoryUsage};
use cubecl_runtime::storage::{ComputeStorage, ManagedResource, StorageHandle, StorageId};

use super::{concat, flash, geglu, group_norm, lora_linear, ordering, softmax, GroupNormSpec};

/// Compute capability of the devices we target (H100, H200).
const ARCH: u32 = 90;

/// Opt-in shared memory per block on sm_90 (227 KiB), what cubecl-cuda reads from the driver.
const SHARED_BYTES: usize = 232_448;

/// One kernel as translated for the device.
struct Translated {
    /// The kernel's entry point.
    name: String,
    /// CUDA C++, or the translation error.
    source: Result<String, String>,
    /// Bounds-checked or not.
    mode: ExecutionMode,
}

/// What the stand-in server translated, in launch order.
static TRANSLATED: Mutex<Vec<Translated>> = Mutex::new(Vec::new());

/// The stand-in device (one, index 0).
#[derive(Debug, Clone, Default)]
struct SourceDevice;

impl Device for SourceDevice {
    fn from_id(_: DeviceId) -> Self {
        Self
    }

    fn to_id(&self) -> DeviceId {
        DeviceId::new(0x5390, 0)
    }
}

/// A CubeCL runtime whose compiler is cubecl-cuda's and whose server translates kernels.
#[derive(Debug, Clone)]
struct SourceRuntime;

impl Runtime for SourceRuntime {
    type Compiler = CudaCompiler;
    type Server = SourceServer;
    type Device = SourceDevice;

    fn client(device: &Self::Device) -> ComputeClient<Self> {
        ComputeClient::load(device)
    }

    fn name(_: &ComputeClient<Self>) -> &'static str {
        "cuda (translation only)"
    }

    fn require_array_lengths() -> bool {
        true
    }

    fn max_cube_count() -> (u32, u32, u32) {
        <CudaRuntime as Runtime>::max_cube_count()
    }

    fn can_read_tensor(shape: &Shape, strides: &Strides) -> bool {
        has_pitched_row_major_strides(shape, strides)
    }

    fn target_properties() -> TargetProperties {
        <CudaRuntime as Runtime>::target_properties()
    }

    fn enumerate_devices(_: u16, _: &()) -> Vec<DeviceId> {
        vec![SourceDevice.to_id()]
    }
}

/// The server: no memory, no execution; `launch` translates.
#[derive(Debug)]
struct SourceServer {
    utilities: Arc<ServerUtilities<Self>>,
    options: CompilationOptions,
}

/// sm_90's properties as cubecl-cuda registers them (its `DeviceService::init`), with an
/// H200's counts where the driver would be asked.
fn properties() -> DeviceProperties {
    let arch = CudaArchitecture { version: ARCH };
    let memory = MemoryDeviceProperties { max_page_size: 140 << 30, alignment: 512 };
    let hardware = HardwareProperties {
        load_width: 128,
        plane_size_min: 32,
        plane_size_max: 32,
        max_bindings: cubecl::cuda::CUDA_MAX_BINDINGS,
        max_shared_memory_size: SHARED_BYTES,
        max_cube_count: <CudaRuntime as Runtime>::max_cube_count(),
        max_units_per_cube: 1024,
        max_cube_dim: (1024, 1024, 64),
        num_streaming_multiprocessors: Some(132),
        num_tensor_cores: Some(4),
        min_tensor_cores_dim: Some(8),
        num_cpu_cores: None,
        max_vector_size: VectorSize::MAX,
    };
    let mut props = DeviceProperties::new(Default::default(), memory, hardware, TimingMethod::System);
    register_supported_types(&mut props);
    props.register_type_usage(ElemType::Float(FloatKind::TF32), TypeUsage::Conversion);
    let atomic = |elem: FloatKind| Type::new(StorageType::Atomic(ElemType::Float(elem)));
    props.register_atomic_type_usage(atomic(FloatKind::F64), AtomicUsage::Add | AtomicUsage::LoadStore);
    props.register_atomic_type_usage(atomic(FloatKind::F16), AtomicUsage::Add | AtomicUsage::LoadStore);
    props.register_atomic_type_usage(atomic(FloatKind::F16).with_vector_size(2), AtomicUsage::Add | AtomicUsage::LoadStore);
    props.register_atomic_type_usage(atomic(FloatKind::F32).with_vector_size(2), AtomicUsage::LoadStore | AtomicUsage::Add);
    props.register_atomic_type_usage(atomic(FloatKind::F32).with_vector_size(4), AtomicUsage::LoadStore | AtomicUsage::Add);
    props.register_semantic_type(SemanticType::Pipeline);
    props.register_type_usage(OpaqueType::Barrier(BarrierLevel::Unit), TypeUsage::Buffer);
    props.register_type_usage(OpaqueType::Barrier(BarrierLevel::Cube), TypeUsage::Buffer);
    props.features.plane.insert(Plane::Sync);
    props.features.plane.insert(Plane::Ops);
    props.features.plane.insert(Plane::NonUniformControlFlow);
    props.features.copy_async = true;
    props.features.memory_reinterpret = true;
    props.features.alignment = true;
    register_wmma_features(CudaWmmaCompiler::supported_wmma_combinations(&arch), &mut props);
    register_mma_features(CudaWmmaCompiler::supported_mma_combinations(&arch), &mut props);
    props
}

/// cubecl-cuda's compilation options for sm_90 with a CUDA 13 toolkit.
fn options() -> CompilationOptions {
    CompilationOptions {
        warp_size: 32,
        supports_features: CppSupportedFeatures {
            grid_constants: true,
            clusters: true,
            fast_math: true,
            fast_tanh: true,
            elect_sync: true,
        },
    }
}

impl DeviceService for SourceServer {
    fn init(_: DeviceId) -> Self {
        let props = properties();
        let policy = PitchedMemoryLayoutPolicy::new(props.memory.alignment as usize);
        let utilities = ServerUtilities::new(props, Arc::new(ServerLogger::default()), (), policy);
        Self { utilities: Arc::new(utilities), options: options() }
    }

    fn utilities(&self) -> cubecl_common::device::ServerUtilitiesHandle {
        self.utilities.clone()
    }
}

impl ServerCommunication for SourceServer {
    const SERVER_COMM_ENABLED: bool = false;
}

fn no_memory() -> ServerError {
    ServerError::Generic {
        reason: "the translation-only runtime has no memory".into(),
        backtrace: Default::default(),
    }
}

impl ComputeServer for SourceServer {
    type Kernel = Box<dyn CubeTask<CudaCompiler>>;
    type Info = ();
    type MemoryLayoutPolicy = PitchedMemoryLayoutPolicy;
    type Storage = NoStorage;

    fn initialize_memory(&mut self, _: ManagedMemoryHandle, _: u64, _: StreamId) {}

    fn logger(&self) -> Arc<ServerLogger> {
        self.utilities.logger.clone()
    }

    fn utilities(&self) -> Arc<ServerUtilities<Self>> {
        self.utilities.clone()
    }

    fn read(&mut self, _: Vec<CopyDescriptor>, _: StreamId) -> DynFut<Result<Vec<Bytes>, ServerError>> {
        Box::pin(async { Err(no_memory()) })
    }

    fn write(&mut self, _: Vec<(CopyDescriptor, Bytes)>, _: StreamId) {}

    fn sync(&mut self, _: StreamId) -> DynFut<Result<(), ServerError>> {
        Box::pin(async { Ok(()) })
    }

    fn get_resource(&mut self, _: Binding, _: StreamId) -> Result<ManagedResource<()>, ServerError> {
        Err(no_memory())
    }

    unsafe fn launch(&mut self, kernel: Self::Kernel, _: CubeCount, _: KernelArguments, mode: ExecutionMode, _: StreamId) {
        let compiled = kernel.compile(&mut Default::default(), &self.options, mode, kernel.address_type());
        let (name, source) = match compiled {
            Ok(c) => (c.entrypoint_name, Ok(c.source)),
            Err(e) => (kernel.name().to_string(), Err(format!("{e:?}"))),
        };
        TRANSLATED.lock().unwrap_or_else(|e| e.into_inner()).push(Translated { name, source, mode });
    }

    fn flush(&mut self, _: StreamId) -> Result<(), ServerError> {
        Ok(())
    }

    fn memory_usage(&mut self, _: StreamId) -> Result<MemoryUsage, ServerError> {
        Err(no_memory())
    }

    fn memory_cleanup(&mut self, _: StreamId) {}

    fn start_profile(&mut self, _: StreamId) -> Result<ProfilingToken, ServerError> {
        Err(no_memory())
    }

    fn end_profile(&mut self, _: StreamId, _: ProfilingToken) -> Result<ProfileDuration, ProfileError> {
        Err(ProfileError::NotRegistered { backtrace: Default::default() })
    }

    fn allocation_mode(&mut self, _: MemoryAllocationMode, _: StreamId) {}
}

/// The server's storage: none.
#[derive(Debug)]
struct NoStorage;

impl ComputeStorage for NoStorage {
    type Resource = ();

    fn alignment(&self) -> usize {
        512
    }

    fn get(&mut self, _: &StorageHandle) {}

    fn alloc(&mut self, _: u64) -> Result<StorageHandle, IoError> {
        Err(IoError::UnsupportedIoOperation { backtrace: Default::default() })
    }

    fn dealloc(&mut self, _: StorageId) {}

    fn flush(&mut self) {}
}

fn float(kind: FloatKind) -> StorageType {
    StorageType::Scalar(ElemType::Float(kind))
}

/// Launches every kernel of lora-core with the settings SD1.5 / SD2.1 training uses.
fn launch_all(client: &ComputeClient<SourceRuntime>) -> Result<(), String> {
    let (f32_, bf16, f16) = (float(FloatKind::F32), float(FloatKind::BF16), float(FloatKind::F16));
    let buffer = |bytes: usize| client.empty(bytes);

    // Flash attention: SD1.5's head dimensions 40/80/160 (8 heads), SD2.1's 64; self- and
    // cross-attention (77 text tokens); one batch entry.
    for dtype in [bf16, f16] {
        // Each also with register double buffering (`set_flash_prefetch`).
        let problems = [(40, 4096, 4096), (80, 1024, 77), (160, 256, 256), (64, 4096, 77)];
        for ((d, seq_q, seq_k), prefetch) in problems.into_iter().flat_map(|p| [(p, false), (p, true)]) {
            let plan = flash::plan(client, dtype, d)?.with_prefetch(prefetch);
            let problem = flash::Problem { heads: 8, group: 8, seq_q, seq_k, d, scale: (d as f32).powf(-0.5) };
            let es = dtype.size();
            let q = buffer(8 * seq_q * d * es);
            let kv = [buffer(8 * seq_k * d * es), buffer(8 * seq_k * d * es)];
            let out = buffer(8 * seq_q * d * es);
            let lse = buffer(8 * seq_q * 4);
            let delta = buffer(8 * seq_q * 4);
            // Heads split as attention's views: `[b, s, h, d]` read as `[b, h, s, d]`.
            let split = |seq: usize| flash::Layout { strides: [seq * 8 * d, d, 8 * d] };
            let op = |h, seq| flash::Operand { handle: h, layout: split(seq) };
            flash::forward(client, problem, plan, dtype, [op(&q, seq_q), op(&kv[0], seq_k), op(&kv[1], seq_k)], op(&out, seq_q), &lse)?;
            let (dq, dk, dv) = (buffer(8 * seq_q * d * es), buffer(8 * seq_k * d * es), buffer(8 * seq_k * d * es));
            flash::backward(
                client,
                problem,
                plan,
                dtype,
                [op(&q, seq_q), op(&kv[0], seq_k), op(&kv[1], seq_k), op(&out, seq_q), op(&out, seq_q)],
                [&lse, &delta],
                [op(&dq, seq_q), op(&dk, seq_k), op(&dv, seq_k)],
            )?;
        }
    }

    // GroupNorm (+ SiLU) over the UNet's planes, and LayerNorm as a one-group row problem;
    // f32 and half-precision activations with f32 or half parameters. Plane sizes pick the
    // vector width: 64² and 8² the widest (4 f32 / 8 half), 9×7 (a 576×448 bucket's lowest
    // level) 1, 6×3 2.
    let planes = [(320, 64 * 64, 32, true), (1280, 8 * 8, 32, false), (1280, 9 * 7, 32, true), (640, 6 * 3, 32, true), (320, 1, 1, false)];
    for (x_dtype, p_dtype) in [(f32_, f32_), (bf16, bf16), (f16, f16), (bf16, f32_)] {
        for (channels, plane_len, groups, silu) in planes {
            let spec = GroupNormSpec { groups, epsilon: 1e-5, silu };
            let problem = group_norm::Problem { batch: 2, channels, plane_len, spec };
            let n = 2 * channels * plane_len;
            let (x, dy, dx) = (buffer(n * x_dtype.size()), buffer(n * x_dtype.size()), buffer(n * x_dtype.size()));
            let (gamma, beta) = (buffer(channels * p_dtype.size()), buffer(channels * p_dtype.size()));
            let y = buffer(n * x_dtype.size());
            let stats = if problem.is_rows() { 2 * plane_len.max(1) * 2 } else { 2 * groups };
            let (mean, rstd) = (buffer(stats * 4), buffer(stats * 4));
            group_norm::forward(client, problem, [x_dtype, p_dtype], [&x, &gamma, &beta], [&y, &mean, &rstd])?;
            let sums = [buffer(2 * channels * 4), buffer(2 * channels * 4)];
            let sums = if problem.is_rows() { None } else { Some([&sums[0], &sums[1]]) };
            // With and without a residual's gradient to add.
            let acc = buffer(n * x_dtype.size());
            for acc in [None, Some(&acc)] {
                group_norm::backward(client, problem, [x_dtype, x_dtype, p_dtype], [&x, &dy, &gamma, &beta], [&mean, &rstd], acc, &dx, sums)?;
            }
        }
    }

    // The attention softmax: f32 scores to the matmul's dtype.
    for (input, output) in [(f32_, f32_), (f32_, bf16), (bf16, bf16), (f32_, f16), (f16, f16)] {
        let (x, y, lse) = (buffer(64 * 4096 * input.size()), buffer(64 * 4096 * output.size()), buffer(64 * 4));
        softmax::launch(client, &x, &y, &lse, 64, 4096, 0.125, [input, output])?;
    }

    // The optimizer's gather: f32 and half-precision gradients into f32, 40 tensors (two
    // launches).
    for input in [f32_, bf16, f16] {
        let parts: Vec<_> = (0..40).map(|i| buffer((100 + i) * input.size())).collect();
        let mut offset = 0;
        let parts: Vec<_> = parts
            .iter()
            .enumerate()
            .map(|(i, handle)| {
                let part = concat::Part { handle, len: 100 + i, offset };
                offset += 100 + i;
                part
            })
            .collect();
        let output = buffer(offset * 4);
        concat::launch(client, &parts, &output, offset, [input, f32_])?;
    }

    // The one-op linear layer's kernels: the output / input-gradient epilogue (SD1.5's
    // projections at 512 px: 4096-token rows of 320, the 77-token context rows of 768 into
    // 320, an odd width for the scalar path; with and without an adapter's term), the
    // weight-gradient reduction (16 chunks of a rank-4 × 320 gradient, one chunk of
    // 768 × 4) and both weight gradients of a rank-4 (tile 4) and a rank-24 (tile 8) layer.
    for (t, p) in [(f32_, f32_), (bf16, bf16), (bf16, f32_), (f16, f32_)] {
        let cases = [(8192, 320, true, true, true), (154, 320, true, true, false), (8192, 4, true, false, false), (77, 33, true, false, true), (8192, 1280, false, true, false), (154, 320, false, true, true)];
        for (rows, columns, with_b, with_bias, with_c) in cases {
            let n = rows * columns * t.size();
            let (a, b, c, out) = (buffer(n), buffer(n), buffer(n), buffer(n));
            let bias = buffer(columns * p.size());
            lora_linear::launch_epilogue_kernel(client, &a, with_b.then_some(&b), with_bias.then_some(&bias), with_c.then_some(&c), &out, [rows, columns], 0.5, [t, p])?;
        }
        for (chunks, len) in [(16, 4 * 320), (1, 768 * 4)] {
            let (partials, out) = (buffer(chunks * len * t.size()), buffer(len * p.size()));
            lora_linear::launch_sum_partials_kernel(client, &partials, &out, chunks, len, 0.25, [t, p])?;
        }
        // The adapter's side with its epilogue: forward (`x·A`, then `·B`, bias, residual)
        // and backward (`dy·Bᵀ`, then `·Aᵀ`), SD1.5's level-0 projection and an odd width.
        for (rows, width, columns, rank, with_bias, with_c) in [(4096, 320, 320, 4, true, true), (4096, 320, 320, 4, false, false), (77, 33, 33, 24, true, false)] {
            let (src, a, c, out) = (buffer(rows * width * t.size()), buffer(rows * columns * t.size()), buffer(rows * columns * t.size()), buffer(rows * columns * t.size()));
            let (m1, m2, bias, low) = (buffer(rank * width * p.size()), buffer(rank * columns * p.size()), buffer(columns * p.size()), buffer(rows * rank * t.size()));
            let buffers = lora_linear::RowsBuffers { src: &src, m1: &m1, a: &a, m2: &m2, bias: with_bias.then_some(&bias), c: with_c.then_some(&c), low: &low, out: &out };
            lora_linear::launch_rows_kernel(client, buffers, [rows, width, columns, rank], [[1, rank], [columns, 1]], 0.5, [t, p, p]);
        }
        for (rows, d_in, d_out, rank) in [(4096, 320, 320, 4), (77, 768, 320, 24)] {
            let (x, dy) = (buffer(rows * d_in * t.size()), buffer(rows * d_out * t.size()));
            let (g, h) = (buffer(rows * rank * t.size()), buffer(rows * rank * t.size()));
            let (da, db) = (buffer(d_in * rank * p.size()), buffer(rank * d_out * p.size()));
            lora_linear::launch_weight_grads_kernels(client, [&x, &g, &h, &dy], [&da, &db], [rows, d_in, d_out, rank], 0.5, [t, p, p])?;
        }
    }

    // GEGLU with its bias, both passes (SD1.5's level-0 feed-forward at 512 px: 4096-token
    // rows of 2 × 1280; an odd half width for the scalar path).
    for (t, p) in [(f32_, f32_), (bf16, bf16), (f16, f16)] {
        for (rows, n) in [(4096, 1280), (77, 7)] {
            let (h, dh) = (buffer(rows * 2 * n * t.size()), buffer(rows * 2 * n * t.size()));
            let (out, dy, bias) = (buffer(rows * n * t.size()), buffer(rows * n * t.size()), buffer(2 * n * p.size()));
            geglu::launch_kernel(client, geglu::Pass::Forward, &h, &bias, None, &out, [rows, n], [t, p])?;
            geglu::launch_kernel(client, geglu::Pass::Backward, &h, &bias, Some(&dy), &dh, [rows, n], [t, p])?;
        }
    }

    // The stream-ordering kernels.
    let words = buffer(4 * ordering::WORDS);
    // SAFETY: never executed; the buffer holds `WORDS` words.
    let arg = || unsafe { ArrayArg::from_raw_parts(words.clone(), ordering::WORDS) };
    ordering::signal::launch::<SourceRuntime>(client, CubeCount::Static(1, 1, 1), CubeDim::new_1d(1), arg(), 3, 7);
    ordering::wait::launch::<SourceRuntime>(client, CubeCount::Static(1, 1, 1), CubeDim::new_1d(1), arg(), ordering::SLOTS + 3, 7, ordering::STATUS, ordering::MAX_SPINS);
    Ok(())
}

/// Lines of `source` that negate a vector with C++ unary minus (`const float_4 l_3 = -l_2;`):
/// cubecl-cpp's vector structs (`float_4`, `__nv_bfloat16_8`, ...) define no such operator,
/// so NVRTC rejects them. Checked without NVRTC too, so CI catches it (write `0 − x`).
fn vector_negations(source: &str) -> Vec<&str> {
    source
        .lines()
        .map(str::trim)
        .filter(|line| {
            let Some((lhs, rhs)) = line.split_once(" = -") else { return false };
            let ty = lhs.trim_start_matches("const ").split_whitespace().next().unwrap_or("");
            let vector = ty.rsplit_once('_').is_some_and(|(_, n)| matches!(n, "2" | "4" | "8" | "16"));
            vector && rhs.starts_with("l_")
        })
        .collect()
}

/// NVRTC's PTX for `source`, compiled as cubecl-cuda compiles on the device with the
/// toolkit at `cuda`, or its log.
fn nvrtc(source: &str, cuda: &str) -> Result<Vec<u8>, String> {
    use cudarc::nvrtc::result as nvrtc;
    let include = format!("--include-path={cuda}/include");
    let cccl = format!("--include-path={cuda}/include/cccl");
    let arch = format!("--gpu-architecture=sm_{ARCH}a");
    let options = [arch.as_str(), include.as_str(), "-lineinfo", cccl.as_str()];
    let source = CString::new(source).map_err(|e| e.to_string())?;
    // SAFETY: NVRTC FFI on a NUL-terminated source that outlives the program.
    unsafe {
        let program = nvrtc::create_program(source.as_c_str(), None).map_err(|e| format!("{e:?}"))?;
        if nvrtc::compile_program(program, &options).is_err() {
            let log = nvrtc::get_program_log(program).map_err(|e| format!("{e:?}"))?;
            return Err(CStr::from_ptr(log.as_ptr()).to_string_lossy().into_owned());
        }
        let ptx = nvrtc::get_ptx(program).map_err(|e| format!("{e:?}"))?;
        Ok(ptx.iter().take_while(|&&c| c != 0).map(|&c| c as u8).collect())
    }
}

/// Every lora-core kernel translates to CUDA C++ for sm_90 with no construct NVRTC is known
/// to reject (and, with `SD_LORA_NVRTC`, compiles with NVRTC); see the module documentation.
#[test]
fn kernels_translate_to_cuda_for_sm90() {
    let client = SourceRuntime::client(&SourceDevice);
    launch_all(&client).expect("launch arguments for sm_90");
    // Launches are queued to the server's thread; wait for all of them.
    cubecl::future::block_on(client.sync()).expect("sync");
    let translated = std::mem::take(&mut *TRANSLATED.lock().unwrap_or_else(|e| e.into_inner()));
    let toolkit = std::env::var("SD_LORA_NVRTC").ok().filter(|v| !v.is_empty());
    let out = std::env::var_os("SD_LORA_CUDA_OUT").map(std::path::PathBuf::from);
    if let Some(dir) = &out {
        std::fs::create_dir_all(dir).expect("creating SD_LORA_CUDA_OUT");
    }
    let mut failures = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (i, kernel) in translated.iter().enumerate() {
        let source = match &kernel.source {
            Ok(source) => source,
            Err(e) => {
                failures.push(format!("{}: translation failed: {e}", kernel.name));
                continue;
            }
        };
        assert!(source.contains("__global__"), "{}: no kernel entry point in\n{source}", kernel.name);
        let negations = vector_negations(source);
        if !negations.is_empty() {
            failures.push(format!("{}: unary minus on a vector, which NVRTC rejects: {negations:?}", kernel.name));
        }
        // Identical sources (the same kernel launched twice) are compiled once.
        if !seen.insert(source.clone()) {
            continue;
        }
        let stem = format!("{i:03}_{}", kernel.name);
        if let Some(dir) = &out {
            std::fs::write(dir.join(format!("{stem}.cu")), source).expect("writing a source");
        }
        if let Some(cuda) = &toolkit {
            match nvrtc(source, cuda) {
                Ok(ptx) => {
                    if let Some(dir) = &out {
                        std::fs::write(dir.join(format!("{stem}.ptx")), ptx).expect("writing PTX");
                    }
                }
                Err(log) => failures.push(format!("{stem} ({:?}): NVRTC failed:\n{log}", kernel.mode)),
            }
        }
    }
    eprintln!("{} kernel launches, {} distinct sources, NVRTC {}", translated.len(), seen.len(), if toolkit.is_some() { "on" } else { "off" });
    // Every launcher above queued at least one kernel of each family.
    for family in ["flash_rows", "flash_keys", "flash_delta", "channel_stats", "normalize", "channel_grads", "input_grad", "layer_norm_rows", "layer_norm_input_grad", "scaled_softmax_rows", "concat_into", "lora_epilogue", "lora_rows", "sum_partials", "lora_weight_grads", "sum_weight_grads", "geglu_forward", "geglu_backward", "signal", "wait"] {
        assert!(translated.iter().any(|k| k.name.starts_with(family)), "no {family} kernel was launched");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

/// The PTX of the kernels our stream runs around a GPU-ordered library call (hand-written,
/// loaded by the driver) names both entry points and, with `SD_LORA_NVRTC`, assembles with
/// the toolkit's ptxas for sm_90a.
#[test]
fn stream_kernels_ptx_assembles_for_sm90() {
    let ptx = super::device::STREAM_KERNELS_PTX;
    assert!(ptx.ends_with('\0'), "the driver reads a NUL-terminated image");
    for entry in ["sd_lora_wait_ready", "sd_lora_store"] {
        assert!(ptx.contains(&format!(".visible .entry {entry}(")), "no {entry} entry");
    }
    let Some(cuda) = std::env::var("SD_LORA_NVRTC").ok().filter(|v| !v.is_empty()) else {
        return;
    };
    let path = std::env::temp_dir().join(format!("sd-lora-stream-kernels-{}.ptx", std::process::id()));
    std::fs::write(&path, ptx.trim_end_matches('\0')).expect("writing the PTX");
    let out = std::process::Command::new(format!("{cuda}/bin/ptxas")).args(["-arch=sm_90a", "-v", "-o", "/dev/null"]).arg(&path).output().expect("running ptxas");
    let _ = std::fs::remove_file(&path);
    assert!(out.status.success(), "ptxas rejected the stream kernels:\n{}", String::from_utf8_lossy(&out.stderr));
}

/// The scan finds what NVRTC rejected in the GroupNorm kernels, and only that.
#[test]
fn vector_negation_scan() {
    let source = "const float_4 l_85 = -l_81;\nconst float l_9 = -l_8;\nconst float_4 l_7 = l_6 - l_5;\nconst __nv_bfloat16_8 l_2 = -l_1;";
    assert_eq!(vector_negations(source), ["const float_4 l_85 = -l_81;", "const __nv_bfloat16_8 l_2 = -l_1;"]);
}
