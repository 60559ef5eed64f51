//! What the cuDNN and cuBLAS routes share: the device's primary context, a CUDA stream of
//! ours, and running one library call on cubecl buffers.
//!
//! cubecl 0.10 does not expose the CUDA stream its kernels run on, so a call is ordered by
//! host synchronisation: wait for the buffers' stream to drain, run the library on our own
//! stream, wait for it. Each call therefore costs one pipeline drain (tens of
//! microseconds), which is why only large problems are routed (convolutions at SD sizes
//! take up to milliseconds; small matmuls stay in burn, see `super::set_cublas_min_gflop`).
//! Workspaces and outputs come from cubecl's memory pool, so peak memory stays in one place.

use std::collections::HashMap;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Mutex;

use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::cubecl::prelude::ComputeClient;
use burn_cubecl::cubecl::server::Handle;
use cudarc::driver::result as driver;
use cudarc::driver::sys::{CUcontext, CUstream};

/// One device's primary context and our stream on it.
#[derive(Clone, Copy)]
struct DeviceStream {
    context: CUcontext,
    stream: CUstream,
}

// SAFETY: a CUDA context and stream may be used from any thread of the process; the stream
// is only used while a library call holds its own lock (cuDNN's or cuBLAS's state).
unsafe impl Send for DeviceStream {}

static STREAMS: Mutex<Option<HashMap<usize, Result<DeviceStream, String>>>> = Mutex::new(None);

/// Makes device `index`'s primary context (the one cubecl uses) current on this thread and
/// returns our stream on it, created on first use.
pub(super) fn stream(index: usize) -> Result<CUstream, String> {
    let mut guard = STREAMS.lock().map_err(|_| "stream lock poisoned".to_string())?;
    let found = guard.get_or_insert_with(HashMap::new).entry(index).or_insert_with(|| create(index)).clone()?;
    // SAFETY: the context was retained in `create` and is never released.
    unsafe { driver::ctx::set_current(found.context) }.map_err(|e| format!("cuCtxSetCurrent: {e:?}"))?;
    Ok(found.stream)
}

fn create(index: usize) -> Result<DeviceStream, String> {
    let device = driver::device::get(index as i32).map_err(|e| format!("cuDeviceGet({index}): {e:?}"))?;
    // SAFETY: `device` is a valid device.
    let context = unsafe { driver::primary_ctx::retain(device) }.map_err(|e| format!("primary context: {e:?}"))?;
    // SAFETY: as above.
    unsafe { driver::ctx::set_current(context) }.map_err(|e| format!("cuCtxSetCurrent: {e:?}"))?;
    let stream = driver::stream::create(driver::stream::StreamKind::NonBlocking).map_err(|e| format!("cuStreamCreate: {e:?}"))?;
    Ok(DeviceStream { context, stream })
}

/// A library's state per device (a cuDNN or cuBLAS handle bound to our stream), created on
/// first use; an `Err` remembers why a device cannot use the library.
pub(super) struct PerDevice<S> {
    states: Mutex<Option<HashMap<usize, Result<S, String>>>>,
    name: &'static str,
}

impl<S> PerDevice<S> {
    /// An empty table for library `name` (used in error messages).
    pub(super) const fn new(name: &'static str) -> Self {
        Self { states: Mutex::new(None), name }
    }

    /// Runs `f` with device `index`'s state and our stream, the context current on this
    /// thread. On first use the state is made by `init` from the stream; a panic there
    /// (cudarc's loader panics when libcuda or a symbol is missing) becomes an error.
    pub(super) fn with<T>(&self, index: usize, init: impl FnOnce(CUstream) -> Result<S, String>, f: impl FnOnce(&mut S, CUstream) -> Result<T, String>) -> Result<T, String> {
        let mut guard = self.states.lock().map_err(|_| format!("{} state lock poisoned", self.name))?;
        let state = guard.get_or_insert_with(HashMap::new).entry(index).or_insert_with(|| {
            catch_unwind(AssertUnwindSafe(|| init(stream(index)?)))
                .unwrap_or_else(|_| Err(format!("{} unavailable: the CUDA driver or the library failed to load (see the message above)", self.name)))
        });
        match state {
            Ok(state) => {
                let stream = stream(index)?;
                f(state, stream)
            }
            Err(reason) => Err(reason.clone()),
        }
    }
}

/// Runs `call(pointers)` once everything queued on `buffers` has finished, with the
/// buffers' device pointers in the order given, and waits for `call`'s work on `stream`
/// (the library handle's stream, from [`PerDevice::with`]).
///
/// The buffers stay alive (and unused by cubecl) until this returns.
pub(super) fn run_on_buffers(
    client: &ComputeClient<CudaRuntime>,
    stream: CUstream,
    buffers: &[&Handle],
    call: impl FnOnce(&[*mut c_void]) -> Result<(), String>,
) -> Result<(), String> {
    let resources = buffers
        .iter()
        .map(|h| client.get_resource((*h).clone()).map_err(|e| format!("cubecl resource: {e:?}")))
        .collect::<Result<Vec<_>, _>>()?;
    burn_cubecl::cubecl::future::block_on(client.sync()).map_err(|e| format!("cubecl sync: {e:?}"))?;
    let pointers: Vec<*mut c_void> = resources.iter().map(|r| r.resource().ptr as *mut c_void).collect();
    // A missing symbol panics inside cudarc's loader; turn that into an error.
    catch_unwind(AssertUnwindSafe(|| call(&pointers))).map_err(|_| "library call panicked (missing symbol?)".to_string())??;
    // SAFETY: the stream was created in `create` and is never destroyed.
    unsafe { driver::stream::synchronize(stream) }.map_err(|e| format!("cuStreamSynchronize: {e:?}"))?;
    drop(resources);
    Ok(())
}
