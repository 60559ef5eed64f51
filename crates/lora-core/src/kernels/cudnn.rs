//! cuDNN convolutions on burn's CUDA tensors (legacy cuDNN API, which cuDNN 9 keeps).
//! Ordering and buffers: see [`super::device`].

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ffi::c_void;

use burn::tensor::ops::ConvOptions;
use burn::tensor::DType;
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::cubecl::server::Handle;
use burn_cubecl::tensor::CubeTensor;
use cudarc::cudnn::{result, sys};
use cudarc::driver::sys::CUstream;

use super::conv_op::Kind;
use super::device;

/// Largest workspace an algorithm may ask for; faster algorithms needing more are skipped.
pub(super) const WORKSPACE_LIMIT: usize = 1 << 30;

/// One device's cuDNN handle (bound to our stream) and what each problem needs, built on
/// its first call and kept: a step repeats the same ~hundred problems.
struct DeviceState {
    handle: sys::cudnnHandle_t,
    /// Each problem's plan, or why cuDNN refused it (not asked again: the op falls back).
    plans: HashMap<ProblemKey, Result<Plan, String>>,
}

/// A problem's descriptors, algorithm, workspace size and ordering key.
struct Plan {
    descriptors: Descriptors,
    algo: Algo,
    workspace: usize,
    problem: u64,
}

// SAFETY: the handle and descriptors are only used while holding `STATE`'s lock, one
// thread at a time; cuDNN handles and descriptors may be used from any thread of the process.
unsafe impl Send for DeviceState {}

static STATE: device::PerDevice<DeviceState> = device::PerDevice::new("cuDNN");

/// A chosen cuDNN algorithm, per kind of convolution.
#[derive(Debug, Clone, Copy)]
enum Algo {
    Forward(sys::cudnnConvolutionFwdAlgo_t),
    BackwardData(sys::cudnnConvolutionBwdDataAlgo_t),
    BackwardFilter(sys::cudnnConvolutionBwdFilterAlgo_t),
}

/// What an algorithm choice depends on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ProblemKey {
    kind: Kind,
    x: [usize; 4],
    w: [usize; 4],
    y: [usize; 4],
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    groups: usize,
    dtype: DType,
    /// Written onto the output's current values (`beta = 1`): a problem of its own, so its
    /// first call is host-ordered too (see `device::run_on_buffers`).
    blend: bool,
}

/// The cuDNN version, once the library loads and a handle can be created on device 0.
pub(super) fn status() -> Result<usize, String> {
    with_device(0, |_, _| Ok(result::get_version()))
}

/// Runs `f` with device `index`'s cuDNN state, creating it on first use.
fn with_device<T>(index: usize, f: impl FnOnce(&mut DeviceState, CUstream) -> Result<T, String>) -> Result<T, String> {
    STATE.with(index, init_device, f)
}

fn init_device(stream: CUstream) -> Result<DeviceState, String> {
    let handle = handle_on(stream, 90000, "convolutions")?;
    Ok(DeviceState { handle, plans: HashMap::new() })
}

/// A new cuDNN handle bound to `stream`, once libcudnn loads and is at least version
/// `min_version` (what `purpose` needs, named in the error).
pub(super) fn handle_on(stream: CUstream, min_version: usize, purpose: &str) -> Result<sys::cudnnHandle_t, String> {
    // SAFETY: probing only tries to open the shared library.
    if !unsafe { sys::is_culib_present() } {
        return Err("libcudnn (cuDNN 9) not found; add its directory to LD_LIBRARY_PATH".to_string());
    }
    let version = result::get_version();
    if version < min_version {
        return Err(format!("cuDNN {version} found; {purpose} need {min_version} or later"));
    }
    let handle = result::create_handle().map_err(|e| format!("cudnnCreate: {e}"))?;
    // SAFETY: the handle was just created; the stream lives as long as the process.
    unsafe { result::set_stream(handle, stream as sys::cudaStream_t) }.map_err(|e| format!("cudnnSetStream: {e}"))?;
    Ok(handle)
}

fn data_type(dtype: DType) -> Result<sys::cudnnDataType_t, String> {
    match dtype {
        DType::F32 => Ok(sys::cudnnDataType_t::CUDNN_DATA_FLOAT),
        DType::F16 => Ok(sys::cudnnDataType_t::CUDNN_DATA_HALF),
        DType::BF16 => Ok(sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16),
        other => Err(format!("dtype {other:?} is not routed to cuDNN")),
    }
}

fn dims_i32(shape: [usize; 4]) -> Result<[i32; 4], String> {
    let mut out = [0i32; 4];
    for (o, s) in out.iter_mut().zip(shape) {
        *o = i32::try_from(s).map_err(|_| format!("dimension {s} too large for cuDNN"))?;
    }
    Ok(out)
}

/// Tensor, filter and convolution descriptors of one problem, destroyed on drop.
struct Descriptors {
    x: sys::cudnnTensorDescriptor_t,
    y: sys::cudnnTensorDescriptor_t,
    w: sys::cudnnFilterDescriptor_t,
    conv: sys::cudnnConvolutionDescriptor_t,
}

impl Descriptors {
    fn new(key: &ProblemKey) -> Result<Self, String> {
        fn err(what: &'static str) -> impl Fn(result::CudnnError) -> String {
            move |e| format!("{what}: {e}")
        }
        let dt = data_type(key.dtype)?;
        let mut d = Descriptors {
            x: std::ptr::null_mut(),
            y: std::ptr::null_mut(),
            w: std::ptr::null_mut(),
            conv: std::ptr::null_mut(),
        };
        d.x = result::create_tensor_descriptor().map_err(err("cudnnCreateTensorDescriptor"))?;
        d.y = result::create_tensor_descriptor().map_err(err("cudnnCreateTensorDescriptor"))?;
        d.w = result::create_filter_descriptor().map_err(err("cudnnCreateFilterDescriptor"))?;
        d.conv = result::create_convolution_descriptor().map_err(err("cudnnCreateConvolutionDescriptor"))?;
        let nchw = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NCHW;
        let i = |v: usize| v as i32;
        // SAFETY: the descriptors were just created and are destroyed only in `drop`.
        unsafe {
            result::set_tensor4d_descriptor(d.x, nchw, dt, dims_i32(key.x)?).map_err(err("x descriptor"))?;
            result::set_tensor4d_descriptor(d.y, nchw, dt, dims_i32(key.y)?).map_err(err("y descriptor"))?;
            result::set_filter4d_descriptor(d.w, dt, nchw, dims_i32(key.w)?).map_err(err("filter descriptor"))?;
            result::set_convolution2d_descriptor(
                d.conv,
                i(key.padding[0]),
                i(key.padding[1]),
                i(key.stride[0]),
                i(key.stride[1]),
                i(key.dilation[0]),
                i(key.dilation[1]),
                sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                // f32 accumulation for every data type (PyTorch does the same for bf16/f16).
                sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
            )
            .map_err(err("convolution descriptor"))?;
            result::set_convolution_group_count(d.conv, i(key.groups)).map_err(err("group count"))?;
            // Tensor cores for half types; f32 may use TF32 on Ampere and newer, as
            // PyTorch's default and burn's own f32 kernels do.
            let math = match key.dtype {
                DType::F32 => sys::cudnnMathType_t::CUDNN_DEFAULT_MATH,
                _ => sys::cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
            };
            result::set_convolution_math_type(d.conv, math).map_err(err("math type"))?;
        }
        Ok(d)
    }
}

impl Drop for Descriptors {
    fn drop(&mut self) {
        // SAFETY: each non-null descriptor was created in `new` and is destroyed once.
        unsafe {
            if !self.x.is_null() {
                let _ = result::destroy_tensor_descriptor(self.x);
            }
            if !self.y.is_null() {
                let _ = result::destroy_tensor_descriptor(self.y);
            }
            if !self.w.is_null() {
                let _ = result::destroy_filter_descriptor(self.w);
            }
            if !self.conv.is_null() {
                let _ = result::destroy_convolution_descriptor(self.conv);
            }
        }
    }
}

/// The fastest algorithm (cuDNN's heuristic ranking, as PyTorch's default) whose workspace
/// fits [`WORKSPACE_LIMIT`], and its workspace size.
fn choose_algorithm(handle: sys::cudnnHandle_t, kind: Kind, d: &Descriptors) -> Result<(Algo, usize), String> {
    macro_rules! pick {
        ($variant:ident, $get:ident, $size:ident, $perf:ty, $count:expr, $($desc:expr),+) => {{
            // SAFETY: all-zero is a valid value of these plain C structs (enum variant 0).
            let mut perf: Vec<$perf> = vec![unsafe { std::mem::zeroed() }; $count];
            let mut returned = 0i32;
            // SAFETY: the handle and descriptors are live; `perf` has room for `$count`.
            unsafe { result::$get(handle, $($desc),+, $count as i32, &mut returned, perf.as_mut_ptr()) }
                .map_err(|e| format!(concat!(stringify!($get), ": {}"), e))?;
            perf.truncate(returned.max(0) as usize);
            let mut chosen = None;
            for p in perf {
                if p.status != sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS || p.memory > WORKSPACE_LIMIT {
                    continue;
                }
                // The ranking is per algorithm and math type: run it with the math type it
                // was ranked with (PyTorch does the same), or cuDNN may pick another kernel.
                // SAFETY: the descriptor is live and only used under the state's lock.
                unsafe { result::set_convolution_math_type(d.conv, p.mathType) }.map_err(|e| format!("math type: {e}"))?;
                // SAFETY: as above; the size query is exact where the ranking's is an estimate.
                let size = unsafe { result::$size(handle, $($desc),+, p.algo) }.map_err(|e| format!(concat!(stringify!($size), ": {}"), e))?;
                if size <= WORKSPACE_LIMIT {
                    chosen = Some((Algo::$variant(p.algo), size));
                    break;
                }
            }
            chosen.ok_or_else(|| "cuDNN has no algorithm for this convolution".to_string())
        }};
    }
    match kind {
        Kind::Forward => pick!(
            Forward,
            get_convolution_forward_algorithm,
            get_convolution_forward_workspace_size,
            sys::cudnnConvolutionFwdAlgoPerf_t,
            sys::cudnnConvolutionFwdAlgo_t::CUDNN_CONVOLUTION_FWD_ALGO_COUNT as usize,
            d.x,
            d.w,
            d.conv,
            d.y
        ),
        Kind::BackwardData => pick!(
            BackwardData,
            get_convolution_backward_data_algorithm,
            get_convolution_backward_data_workspace_size,
            sys::cudnnConvolutionBwdDataAlgoPerf_t,
            sys::cudnnConvolutionBwdDataAlgo_t::CUDNN_CONVOLUTION_BWD_DATA_ALGO_COUNT as usize,
            d.w,
            d.y,
            d.conv,
            d.x
        ),
        Kind::BackwardFilter => pick!(
            BackwardFilter,
            get_convolution_backward_filter_algorithm,
            get_convolution_backward_filter_workspace_size,
            sys::cudnnConvolutionBwdFilterAlgoPerf_t,
            sys::cudnnConvolutionBwdFilterAlgo_t::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_COUNT as usize,
            d.x,
            d.y,
            d.conv,
            d.w
        ),
    }
}

/// Runs one convolution of `kind` in cuDNN and returns its output, of `out_shape`.
///
/// Inputs: forward `(x, w)`; input gradient `(w, dy)`; weight gradient `(x, w, dy)` (the
/// weight only gives the shape). `x_shape` is the layer input's shape.
///
/// With `prior` (a contiguous tensor of `out_shape` that nothing else holds) the result is
/// added to it in place, `y = conv + prior` (cuDNN's `beta = 1` blend, done by the
/// convolution's own output stage): how a forward pass adds its bias and a residual without
/// a pass of its own over the output.
pub(super) fn run(
    kind: Kind,
    inputs: &[CubeTensor<CudaRuntime>],
    x_shape: [usize; 4],
    out_shape: [usize; 4],
    options: &ConvOptions<2>,
    prior: Option<&CubeTensor<CudaRuntime>>,
) -> Result<CubeTensor<CudaRuntime>, String> {
    let dtype = inputs[0].dtype;
    if inputs.iter().any(|t| t.dtype != dtype) {
        return Err("mixed input dtypes".to_string());
    }
    data_type(dtype)?;
    let dims = |t: &CubeTensor<CudaRuntime>| t.meta.shape().dims::<4>();
    let (w_shape, y_shape) = match kind {
        Kind::Forward => (dims(&inputs[1]), out_shape),
        Kind::BackwardData => (dims(&inputs[0]), dims(&inputs[1])),
        Kind::BackwardFilter => (dims(&inputs[1]), dims(&inputs[2])),
    };
    let key = ProblemKey {
        kind,
        x: x_shape,
        w: w_shape,
        y: y_shape,
        stride: options.stride,
        padding: options.padding,
        dilation: options.dilation,
        groups: options.groups,
        dtype,
        blend: prior.is_some(),
    };
    let inputs: Vec<CubeTensor<CudaRuntime>> = inputs
        .iter()
        .map(|t| if t.is_contiguous() { t.clone() } else { into_contiguous(t.clone()) })
        .collect();
    let client = inputs[0].client.clone();
    let device = inputs[0].device.clone();
    let elem = dtype.size();
    if let Some(prior) = prior {
        let fits = prior.dtype == dtype && prior.meta.shape().dims::<4>() == out_shape && prior.is_contiguous() && prior.handle.can_mut();
        if !fits {
            return Err("the output to add to is not an exclusive contiguous tensor of the output's shape and dtype".to_string());
        }
    }
    let beta = if prior.is_some() { 1.0f32 } else { 0.0 };
    let out_handle = match prior {
        Some(prior) => prior.handle.clone(),
        None => client.empty(out_shape.iter().product::<usize>() * elem),
    };

    with_device(device.index, |state, stream| {
        let plan = match state.plans.entry(key) {
            Entry::Occupied(found) => found.into_mut(),
            Entry::Vacant(slot) => {
                let plan = Descriptors::new(slot.key()).and_then(|descriptors| {
                    let (algo, workspace) = choose_algorithm(state.handle, kind, &descriptors)?;
                    Ok(Plan { descriptors, algo, workspace, problem: device::problem_hash("cudnn", slot.key()) })
                });
                slot.insert(plan)
            }
        };
        let plan = plan.as_ref().map_err(|reason| reason.clone())?;
        let (algo, workspace, problem) = (plan.algo, plan.workspace, plan.problem);
        let workspace_handle = (workspace > 0).then(|| client.empty(workspace));
        let mut buffers: Vec<&Handle> = inputs.iter().map(|t| &t.handle).collect();
        buffers.push(&out_handle);
        buffers.extend(workspace_handle.as_ref());
        let alpha = 1.0f32;
        let (alpha, beta) = (&alpha as *const f32 as *const c_void, &beta as *const f32 as *const c_void);
        let (d, h) = (&plan.descriptors, state.handle);
        device::run_on_buffers(&client, device.index, stream, problem, &buffers, |p| {
            let n = inputs.len();
            let (out, ws) = (p[n], if workspace > 0 { p[n + 1] } else { std::ptr::null_mut() });
            let input = |i: usize| p[i] as *const c_void;
            // SAFETY: the pointers address live cubecl buffers of the described shapes
            // (contiguous NCHW); the algorithm and workspace size come from cuDNN for these
            // descriptors; the handle is bound to `stream`.
            unsafe {
                match algo {
                    Algo::Forward(algo) => result::convolution_forward(h, alpha, d.x, input(0), d.w, input(1), d.conv, algo, ws, workspace, beta, d.y, out),
                    Algo::BackwardData(algo) => result::convolution_backward_data(h, alpha, d.w, input(0), d.y, input(1), d.conv, algo, ws, workspace, beta, d.x, out),
                    Algo::BackwardFilter(algo) => {
                        result::convolution_backward_filter(h, alpha, d.x, input(0), d.y, input(2), d.conv, algo, ws, workspace, beta, d.w, out)
                    }
                }
            }
            .map_err(|e| format!("cuDNN {kind:?} convolution: {e}"))
        })
    })?;
    Ok(CubeTensor::new_contiguous(client, device, out_shape.into(), out_handle, dtype))
}
