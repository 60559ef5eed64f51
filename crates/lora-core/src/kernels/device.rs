//! What the cuDNN and cuBLAS routes share: the device's primary context, a CUDA stream of
//! ours, and running one library call on cubecl buffers.
//!
//! cubecl 0.10 does not expose the CUDA stream its kernels run on, so a call runs on a
//! stream of our own and is ordered with cubecl's kernels either by the host (wait for
//! cubecl's queue to drain, run, wait for our stream: one pipeline drain per call) or, with
//! [`VendorSync::Device`], on the GPU by two tiny kernels on cubecl's side and two on ours
//! ([`super::ordering`], [`STREAM_KERNELS_PTX`]). Only large problems are routed either way
//! (convolutions at SD sizes take up to milliseconds; small matmuls stay in burn, see
//! `super::set_cublas_min_gflop`). Workspaces and outputs come from cubecl's memory pool, so
//! peak memory stays in one place.

use std::collections::{HashMap, HashSet};
use std::ffi::c_void;
use std::hash::Hash;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Mutex;

use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::cubecl::prelude::ComputeClient;
use burn_cubecl::cubecl::prelude::{ArrayArg, CubeCount, CubeDim};
use burn_cubecl::cubecl::server::Handle;
use cubecl_common::stream_id::StreamId;
use cudarc::driver::result as driver;
use cudarc::driver::sys::{self, CUcontext, CUstream};

use super::{ordering, VendorSync};

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
    // cuInit is idempotent; without it, a library call (or a status query) made before
    // cubecl's first kernel finds the driver uninitialised (CUDA_ERROR_NOT_INITIALIZED).
    driver::init().map_err(|e| format!("cuInit: {e:?}"))?;
    let device = driver::device::get(index as i32).map_err(|e| format!("cuDeviceGet({index}): {e:?}"))?;
    // SAFETY: `device` is a valid device.
    let context = unsafe { driver::primary_ctx::retain(device) }.map_err(|e| format!("primary context: {e:?}"))?;
    // SAFETY: as above.
    unsafe { driver::ctx::set_current(context) }.map_err(|e| format!("cuCtxSetCurrent: {e:?}"))?;
    let stream = driver::stream::create(driver::stream::StreamKind::NonBlocking).map_err(|e| format!("cuStreamCreate: {e:?}"))?;
    Ok(DeviceStream { context, stream })
}

/// `cuProfilerStart` (`start`) or `cuProfilerStop` with device `index`'s primary context
/// current on this thread; cudarc's loader panics (no libcuda) become errors.
pub(super) fn profiler(index: usize, start: bool) -> Result<(), String> {
    catch_unwind(AssertUnwindSafe(|| {
        stream(index)?;
        let result = if start { cudarc::driver::profiler_start() } else { cudarc::driver::profiler_stop() };
        result.map_err(|e| format!("{}: {e:?}", if start { "cuProfilerStart" } else { "cuProfilerStop" }))
    }))
    .unwrap_or_else(|_| Err("the CUDA driver failed to load (see the message above)".to_string()))
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

impl<S> PerDevice<S> {
    /// Folds `f` over the devices whose state was created successfully.
    pub(super) fn fold<T>(&self, init: T, mut f: impl FnMut(T, &S) -> Result<T, String>) -> Result<T, String> {
        let guard = self.states.lock().map_err(|_| format!("{} state lock poisoned", self.name))?;
        let mut acc = init;
        for state in guard.iter().flat_map(|m| m.values()).flatten() {
            acc = f(acc, state)?;
        }
        Ok(acc)
    }
}

/// Runs `call(pointers)` after everything queued on `buffers` and before anything queued
/// after it, with the buffers' device pointers in the order given; `call` queues its work
/// on `stream` (the library handle's stream, from [`PerDevice::with`]) of device `index`.
///
/// With [`VendorSync::Host`] (or the first time a `problem` is seen) the host orders it:
/// it waits for cubecl's queue to drain, queues `call` and waits for `stream`. With
/// [`VendorSync::Device`] the GPU orders it (see [`super::ordering`]) and this returns as
/// soon as the work is queued. `problem` identifies the library problem (shapes, dtypes,
/// algorithm): its first call is always host-ordered, because a library may load kernels or
/// allocate and free memory on first use, which can wait for the whole device. Every GPU-side
/// wait only depends on work queued before it, so such a device-wide wait would end anyway,
/// but keeping first uses host-ordered means no spinning [`super::ordering::wait`] is ever
/// part of one (CUDA's lazy-loading documentation warns about exactly this pattern).
pub(super) fn run_on_buffers(
    client: &ComputeClient<CudaRuntime>,
    index: usize,
    stream: CUstream,
    problem: u64,
    buffers: &[&Handle],
    call: impl FnOnce(&[*mut c_void]) -> Result<(), String>,
) -> Result<(), String> {
    let mut call = Some(call);
    if super::vendor_sync() == VendorSync::Device {
        let ordered = ORDER.with(index, |stream| Order::new(client, stream), |order, _| Ok(order.run(client, stream, problem, buffers, &mut call)));
        match ordered {
            Ok(Some(done)) => return done,
            Ok(None) => {}
            Err(reason) => super::record_ordering_unavailable(reason),
        }
    }
    let call = call.take().ok_or("library call already consumed")?;
    with_pointers(client, buffers, |pointers| host_ordered(client, stream, pointers, call))?
}

/// Runs `f` with the device pointers of `buffers`, which stay allocated until it returns.
///
/// `f` runs on cubecl's server thread, while the calling thread (burn-fusion's, which
/// executes our operations) waits: one blocking request for the whole call, where a
/// `get_resource` per buffer would be one round trip between the two threads each (5 of
/// them took ~31 µs on the 2-core dev machine, one request holding all 5 ~11 µs: the
/// `round_trips` example; a training step makes hundreds of library calls). On that thread
/// cubecl's own requests run inline.
fn with_pointers<T: Send + 'static>(client: &ComputeClient<CudaRuntime>, buffers: &[&Handle], f: impl FnOnce(&[*mut c_void]) -> T) -> Result<T, String> {
    // The caller made our context current; so must the server thread be (cubecl's context
    // is the same primary context, current there anyway).
    let context = driver::ctx::get_current().map_err(|e| format!("cuCtxGetCurrent: {e:?}"))?;
    let task = OnServer {
        client: client.clone(),
        handles: buffers.iter().map(|h| (*h).clone()).collect(),
        context,
        f,
    };
    let server = client.clone();
    server
        .exclusive(move || task.run())
        .map_err(|e| format!("library call on cubecl's server thread failed or panicked (see the log for \"Task failed\"): {e:?}"))?
}

/// What [`with_pointers`] runs on cubecl's server thread.
struct OnServer<F> {
    client: ComputeClient<CudaRuntime>,
    handles: Vec<Handle>,
    context: Option<CUcontext>,
    f: F,
}

// SAFETY: `exclusive` runs the task on cubecl's server thread while the calling thread waits
// for it, so nothing `f` borrows is used by two threads at once; CUDA contexts, streams and
// library handles may be used from any thread.
unsafe impl<F> Send for OnServer<F> {}

impl<F> OnServer<F> {
    fn run<T>(self) -> Result<T, String>
    where
        F: FnOnce(&[*mut c_void]) -> T,
    {
        if let Some(context) = self.context {
            // SAFETY: the primary context, retained in `create` and never released.
            unsafe { driver::ctx::set_current(context) }.map_err(|e| format!("cuCtxSetCurrent: {e:?}"))?;
        }
        let resources = self
            .handles
            .iter()
            .map(|h| self.client.get_resource(h.clone()).map_err(|e| format!("cubecl resource: {e:?}")))
            .collect::<Result<Vec<_>, _>>()?;
        let pointers: Vec<*mut c_void> = resources.iter().map(|r| r.resource().ptr as *mut c_void).collect();
        let out = (self.f)(&pointers);
        drop(resources);
        Ok(out)
    }
}

/// Drains cubecl's queue, runs `call`, waits for `stream`.
fn host_ordered(client: &ComputeClient<CudaRuntime>, stream: CUstream, pointers: &[*mut c_void], call: impl FnOnce(&[*mut c_void]) -> Result<(), String>) -> Result<(), String> {
    burn_cubecl::cubecl::future::block_on(client.sync()).map_err(|e| format!("cubecl sync: {e:?}"))?;
    // A missing symbol panics inside cudarc's loader; turn that into an error.
    let called = catch_unwind(AssertUnwindSafe(|| call(pointers))).map_err(|_| "library call panicked (missing symbol?)".to_string());
    // SAFETY: the stream was created in `create` and is never destroyed.
    unsafe { driver::stream::synchronize(stream) }.map_err(|e| format!("cuStreamSynchronize: {e:?}"))?;
    called?
}

/// Device-side ordering state of one device: the ready/done/status words
/// ([`super::ordering`]) of each cubecl stream that used it, the next call number, and the
/// problems seen so far.
struct Order {
    client: ComputeClient<CudaRuntime>,
    /// One word array per cubecl stream (burn-fusion runs a thread's operations on that
    /// thread's stream): a signal and the wait after the call run on the stream of the
    /// operation, and each array's words only ever grow.
    words: HashMap<StreamId, Handle>,
    next: u32,
    seen: HashSet<u64>,
    /// Why device ordering stopped working on this device (then every call is host-ordered).
    broken: Option<String>,
    /// The two kernels our stream runs around a call.
    kernels: StreamKernels,
}

// SAFETY: the client and handles are cubecl's thread-safe handles; raw pointers are not kept.
unsafe impl Send for Order {}

static ORDER: PerDevice<Order> = PerDevice::new("stream ordering");

impl Order {
    fn new(client: &ComputeClient<CudaRuntime>, stream: CUstream) -> Result<Self, String> {
        let kernels = StreamKernels::load()?;
        let mut order = Self {
            client: client.clone(),
            words: HashMap::new(),
            next: 1,
            seen: HashSet::new(),
            broken: None,
            kernels,
        };
        let words = order.words(client)?;
        // Run both of our kernels once now (a wait that is met at once, a store of the zero
        // already there): CUDA loads a kernel lazily at its first launch, which may wait for
        // the whole device, and must never do so behind a spinning wait.
        with_pointers(client, &[&words], |p| {
            let status = p[0] as u64 + 4 * u64::from(ordering::STATUS);
            // SAFETY: the status word lies in the live `words` buffer; the stream is ours.
            unsafe { kernels.wait_ready(stream, status, 0, status)?; kernels.store(stream, status, 0)?; driver::stream::synchronize(stream) }.map_err(|e| format!("first launch of the ordering kernels: {e:?}"))
        })??;
        Ok(order)
    }

    /// The words of the current cubecl stream, made on its first use: zeroed, and cubecl's
    /// two kernels run once on them (compiled and loaded, and a failed launch found, before
    /// anything waits on them).
    fn words(&mut self, client: &ComputeClient<CudaRuntime>) -> Result<Handle, String> {
        let stream = StreamId::current();
        if let Some(words) = self.words.get(&stream) {
            return Ok(words.clone());
        }
        let words = client.create_from_slice(&[0u8; 4 * ordering::WORDS]);
        // A store of the zero already there and a wait that is met at once.
        launch_signal(client, &words, ordering::STATUS, 0);
        launch_wait(client, &words, ordering::STATUS, 0);
        // The zeros must be in place before our stream ever waits on a word.
        burn_cubecl::cubecl::future::block_on(client.sync()).map_err(|e| format!("first launch of cubecl's ordering kernels: {e:?}"))?;
        self.words.insert(stream, words.clone());
        Ok(words)
    }

    /// Runs `call` (taking it out of the option) and returns its result, or returns `None`
    /// (leaving `call`) when the host must order it.
    fn run(
        &mut self,
        client: &ComputeClient<CudaRuntime>,
        stream: CUstream,
        problem: u64,
        buffers: &[&Handle],
        call: &mut Option<impl FnOnce(&[*mut c_void]) -> Result<(), String>>,
    ) -> Option<Result<(), String>> {
        if self.broken.is_some() || self.next == u32::MAX {
            return None;
        }
        // A buffer written on another cubecl stream is ordered with this one only when its
        // pointer is looked up, after the signal: let the host order such a call.
        let current = StreamId::current();
        if buffers.iter().any(|h| h.stream != current) {
            return None;
        }
        let words = match self.words(client) {
            Ok(words) => words,
            Err(reason) => {
                super::record_ordering_unavailable(reason.clone());
                self.broken = Some(reason);
                return None;
            }
        };
        let k = self.next;
        let slot = k % ordering::SLOTS;
        // Signal first: the resource lookups below are blocking requests to cubecl's server,
        // served in order, so once they return the signal kernel has been launched.
        launch_signal(client, &words, slot, k);
        // Every launched signal uses up its number, or a later wait for the same number
        // could be met by this signal before its own.
        self.next += 1;
        let all: Vec<&Handle> = std::iter::once(&words).chain(buffers.iter().copied()).collect();
        match with_pointers(client, &all, |p| self.ordered(client, stream, problem, k, (&words, p[0] as u64), &p[1..], call)) {
            Ok(done) => done,
            Err(reason) => Some(Err(reason)),
        }
    }

    /// [`Order::run`] once the signal for call `k` is launched; `words` are the words and
    /// their address.
    #[allow(clippy::too_many_arguments)]
    fn ordered(
        &mut self,
        client: &ComputeClient<CudaRuntime>,
        stream: CUstream,
        problem: u64,
        k: u32,
        (words, base): (&Handle, u64),
        pointers: &[*mut c_void],
        call: &mut Option<impl FnOnce(&[*mut c_void]) -> Result<(), String>>,
    ) -> Option<Result<(), String>> {
        let slot = k % ordering::SLOTS;
        // First use of a problem (with these pointer alignments, which steer a library's
        // kernel choice): host-ordered, see `run_on_buffers`.
        let key = pointers.iter().fold(problem, |h, p| h.rotate_left(7) ^ u64::from((*p as u64).trailing_zeros().min(8)));
        if self.seen.insert(key) {
            let call = call.take()?;
            return Some(host_ordered(client, stream, pointers, call));
        }
        let word = |index: u32| base + 4 * u64::from(index);
        let kernels = self.kernels;
        let hooks = test_hooks::get();
        // SAFETY: the words lie in the live `words` buffer; the stream is ours.
        if !hooks.skip_ready && let Err(reason) = unsafe { kernels.wait_ready(stream, word(slot), k, word(ordering::STATUS)) } {
            super::record_ordering_unavailable(reason.clone());
            self.broken = Some(reason);
            return None;
        }
        if hooks.library_delay > 0 {
            // The test's late library output: spin on the scratch word, which never reaches
            // the value (its timeouts count into the scratch word itself).
            let scratch = word(ordering::SCRATCH);
            // SAFETY: as above.
            if let Err(reason) = unsafe { kernels.wait_ready_spins(stream, scratch, u32::MAX, scratch, hooks.library_delay) } {
                return Some(Err(reason));
            }
        }
        let call = call.take()?;
        let called = catch_unwind(AssertUnwindSafe(|| call(pointers))).map_err(|_| "library call panicked (missing symbol?)".to_string()).and_then(|r| r);
        // Always release, even after a failed call: the fallback kernel queues behind `wait`.
        // SAFETY: as above.
        if let Err(reason) = unsafe { kernels.store(stream, word(ordering::SLOTS + slot), k) } {
            // Nothing queued on cubecl's side waits for the release: wait on the host.
            super::record_ordering_unavailable(reason.clone());
            self.broken = Some(reason);
            // SAFETY: the stream is ours; what it waits for (the signal) is launched.
            let synced = unsafe { driver::stream::synchronize(stream) }.map_err(|e| format!("cuStreamSynchronize: {e:?}"));
            return Some(synced.and(called));
        }
        if !hooks.skip_done {
            launch_wait(client, words, ordering::SLOTS + slot, k);
        }
        if called.is_ok() {
            super::record_device_ordered();
        }
        Some(called)
    }

    /// Timeouts counted by [`ordering::wait`] on this device (reads the status word, which
    /// waits for the device's queue).
    fn timeouts(&self) -> Result<u64, String> {
        let mut sum = 0;
        for words in self.words.values() {
            let bytes = self.client.read_one(words.clone()).map_err(|e| format!("reading the ordering words: {e:?}"))?;
            let at = 4 * ordering::STATUS as usize;
            let word = bytes.get(at..at + 4).ok_or("ordering words too short")?;
            sum += u64::from(u32::from_le_bytes([word[0], word[1], word[2], word[3]]));
        }
        Ok(sum)
    }
}

/// PTX of the two one-thread kernels that our stream runs around a GPU-ordered library
/// call: `sd_lora_wait_ready(word, value, status, max_spins)` polls `word` until it reaches
/// `value` (unsigned `>=`), or adds one to `status` after `max_spins` polls and returns;
/// `sd_lora_store(word, value)` stores `value` after a memory barrier.
///
/// They replace the stream memory operations (`cuStreamWaitValue32`, `cuStreamWriteValue32`)
/// that did the same: on the H200 of 2026-11-30 (driver 580) `cuStreamWaitValue32` refused
/// the address of cubecl's buffer (`CUDA_ERROR_INVALID_VALUE`; cubecl allocates from
/// `cuMemAllocAsync`'s pool), while any kernel can read that memory. Plain PTX (ISA 7.0,
/// sm_75 and later, compiled by the driver when the module loads) needs no NVRTC.
pub(super) const STREAM_KERNELS_PTX: &str = "\
.version 7.0
.target sm_75
.address_size 64

.visible .entry sd_lora_wait_ready(
    .param .u64 word,
    .param .u32 value,
    .param .u64 status,
    .param .u32 max_spins
)
{
    .reg .pred %p<3>;
    .reg .b32 %r<6>;
    .reg .b64 %rd<5>;

    ld.param.u64 %rd1, [word];
    ld.param.u32 %r1, [value];
    ld.param.u64 %rd2, [status];
    ld.param.u32 %r2, [max_spins];
    cvta.to.global.u64 %rd3, %rd1;
    cvta.to.global.u64 %rd4, %rd2;
    mov.u32 %r3, 0;
$L_poll:
    ld.volatile.global.u32 %r4, [%rd3];
    setp.ge.u32 %p1, %r4, %r1;
    @%p1 bra $L_done;
    add.u32 %r3, %r3, 1;
    setp.lt.u32 %p2, %r3, %r2;
    @%p2 bra $L_poll;
    atom.global.add.u32 %r5, [%rd4], 1;
$L_done:
    membar.gl;
    ret;
}

.visible .entry sd_lora_store(
    .param .u64 word,
    .param .u32 value
)
{
    .reg .b32 %r<2>;
    .reg .b64 %rd<3>;

    ld.param.u64 %rd1, [word];
    ld.param.u32 %r1, [value];
    cvta.to.global.u64 %rd2, %rd1;
    membar.gl;
    st.volatile.global.u32 [%rd2], %r1;
    ret;
}
\0";

/// The kernels of [`STREAM_KERNELS_PTX`], loaded into the current context.
#[derive(Clone, Copy)]
struct StreamKernels {
    wait_ready: sys::CUfunction,
    store: sys::CUfunction,
}

impl StreamKernels {
    /// Loads the module into the current context (kept for the process).
    fn load() -> Result<Self, String> {
        let loaded = catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: the image is a NUL-terminated PTX string.
            let module = unsafe { driver::module::load_data(STREAM_KERNELS_PTX.as_ptr().cast()) }.map_err(|e| format!("loading the ordering kernels' PTX: {e:?}"))?;
            let function = |name: &str| {
                let c_name = std::ffi::CString::new(name).map_err(|e| e.to_string())?;
                // SAFETY: the module was just loaded and is never unloaded.
                unsafe { driver::module::get_function(module, c_name) }.map_err(|e| format!("ordering kernel {name}: {e:?}"))
            };
            Ok(Self { wait_ready: function("sd_lora_wait_ready")?, store: function("sd_lora_store")? })
        }));
        loaded.unwrap_or_else(|_| Err("the CUDA driver's module functions are missing".to_string()))
    }

    /// Queues on `stream` a wait until the word at `word` reaches `value`; a timeout is
    /// counted in the word at `status`.
    ///
    /// # Safety
    /// `word` and `status` must be live device words of the stream's context.
    unsafe fn wait_ready(&self, stream: CUstream, word: u64, value: u32, status: u64) -> Result<(), String> {
        // SAFETY: the caller's contract.
        unsafe { self.wait_ready_spins(stream, word, value, status, ordering::READY_MAX_SPINS) }
    }

    /// [`StreamKernels::wait_ready`] giving up after `spins` polls.
    ///
    /// # Safety
    /// As [`StreamKernels::wait_ready`].
    unsafe fn wait_ready_spins(&self, stream: CUstream, word: u64, value: u32, status: u64, spins: u32) -> Result<(), String> {
        let (mut word, mut value, mut status, mut spins) = (word, value, status, spins);
        let mut params = [(&raw mut word).cast::<c_void>(), (&raw mut value).cast(), (&raw mut status).cast(), (&raw mut spins).cast()];
        // SAFETY: the parameters match the kernel's signature; see the caller's contract.
        unsafe { launch_one(self.wait_ready, stream, &mut params) }.map_err(|e| format!("ordering wait kernel: {e}"))
    }

    /// Queues on `stream` a store of `value` into the word at `word`.
    ///
    /// # Safety
    /// As [`StreamKernels::wait_ready`].
    unsafe fn store(&self, stream: CUstream, word: u64, value: u32) -> Result<(), String> {
        let (mut word, mut value) = (word, value);
        let mut params = [(&raw mut word).cast::<c_void>(), (&raw mut value).cast()];
        // SAFETY: as above.
        unsafe { launch_one(self.store, stream, &mut params) }.map_err(|e| format!("ordering store kernel: {e}"))
    }
}

/// Launches one thread of `function` on `stream`; a loader panic becomes an error.
///
/// # Safety
/// `params` must point to the kernel's parameters, in order and of its types.
unsafe fn launch_one(function: sys::CUfunction, stream: CUstream, params: &mut [*mut c_void]) -> Result<(), String> {
    // SAFETY: see the caller's contract.
    let launched = catch_unwind(AssertUnwindSafe(|| unsafe { driver::launch_kernel(function, (1, 1, 1), (1, 1, 1), 0, stream, params) }));
    flatten(launched, "cuLaunchKernel")
}

fn flatten(result: std::thread::Result<Result<(), driver::DriverError>>, what: &str) -> Result<(), String> {
    match result {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("{what}: {e:?}")),
        Err(_) => Err(format!("{what} is missing from the CUDA driver")),
    }
}

fn words_arg(words: &Handle) -> ArrayArg<CudaRuntime> {
    // SAFETY: the buffer holds `WORDS` u32 words.
    unsafe { ArrayArg::from_raw_parts(words.clone(), ordering::WORDS) }
}

fn launch_signal(client: &ComputeClient<CudaRuntime>, words: &Handle, index: u32, value: u32) {
    ordering::signal::launch::<CudaRuntime>(client, CubeCount::Static(1, 1, 1), CubeDim::new_1d(1), words_arg(words), index, value);
}

fn launch_wait(client: &ComputeClient<CudaRuntime>, words: &Handle, index: u32, value: u32) {
    ordering::wait::launch::<CudaRuntime>(client, CubeCount::Static(1, 1, 1), CubeDim::new_1d(1), words_arg(words), index, value, ordering::STATUS, ordering::MAX_SPINS);
}

/// A key for `run_on_buffers`'s `problem`: library `tag` and what decides its kernels.
pub(super) fn problem_hash(tag: &str, what: &impl Hash) -> u64 {
    use std::hash::{DefaultHasher, Hasher};
    let mut hasher = DefaultHasher::new();
    tag.hash(&mut hasher);
    what.hash(&mut hasher);
    hasher.finish()
}

/// Spin timeouts of the device-side ordering, summed over the devices that used it.
pub(super) fn ordering_timeouts() -> Result<u64, String> {
    ORDER.fold(0, |sum, order| Ok(sum + order.timeouts()?))
}

/// Test switches of the device-side ordering: a delay of the library call (our stream spins
/// first, so its output lands late) and skipping either wait (negative controls: the
/// ordering test must then see wrong results). Always off outside this crate's tests.
pub(super) mod test_hooks {
    #[cfg(test)]
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    /// The switches as read by one call.
    #[derive(Clone, Copy)]
    pub(in super::super) struct Hooks {
        /// Polls our stream spins before each GPU-ordered library call.
        pub(in super::super) library_delay: u32,
        /// Skip our stream's wait for the call's inputs (the signal).
        pub(in super::super) skip_ready: bool,
        /// Skip cubecl's wait for the call's output (the done word).
        pub(in super::super) skip_done: bool,
    }

    #[cfg(test)]
    static LIBRARY_DELAY: AtomicU32 = AtomicU32::new(0);
    #[cfg(test)]
    static SKIP_READY: AtomicBool = AtomicBool::new(false);
    #[cfg(test)]
    static SKIP_DONE: AtomicBool = AtomicBool::new(false);

    /// Sets the switches.
    #[cfg(test)]
    pub(in super::super) fn set(hooks: Hooks) {
        LIBRARY_DELAY.store(hooks.library_delay, Ordering::SeqCst);
        SKIP_READY.store(hooks.skip_ready, Ordering::SeqCst);
        SKIP_DONE.store(hooks.skip_done, Ordering::SeqCst);
    }

    #[cfg(test)]
    pub(super) fn get() -> Hooks {
        Hooks { library_delay: LIBRARY_DELAY.load(Ordering::SeqCst), skip_ready: SKIP_READY.load(Ordering::SeqCst), skip_done: SKIP_DONE.load(Ordering::SeqCst) }
    }

    #[cfg(not(test))]
    pub(super) fn get() -> Hooks {
        Hooks { library_delay: 0, skip_ready: false, skip_done: false }
    }
}

/// Waits until our stream of device `index` has run everything queued on it (a test that
/// skipped the ordering waits must not leave a library call writing into reused memory).
#[cfg(test)]
pub(super) fn sync_library_stream(index: usize) -> Result<(), String> {
    let stream = stream(index)?;
    // SAFETY: the stream was created in `create` and is never destroyed.
    unsafe { driver::stream::synchronize(stream) }.map_err(|e| format!("cuStreamSynchronize: {e:?}"))
}

/// Queues on cubecl's stream of this thread a one-thread spin of about `spins` polls of a
/// word that never changes (a test's late input: the kernels queued after it run late).
#[cfg(test)]
pub(super) fn delay_cubecl_stream(client: &ComputeClient<CudaRuntime>, spins: u32) {
    let words = client.create_from_slice(&[0u8; 4 * ordering::WORDS]);
    // Index, value and status as the scratch word: never met, and the timeout counts there.
    ordering::wait::launch::<CudaRuntime>(client, CubeCount::Static(1, 1, 1), CubeDim::new_1d(1), words_arg(&words), ordering::SCRATCH, u32::MAX, ordering::SCRATCH, spins);
}
