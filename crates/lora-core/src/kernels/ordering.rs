//! Two CubeCL kernels that order a vendor-library call with burn's kernels on the GPU, so
//! the host never waits (see `device::run_on_buffers`, [`super::VendorSync::Device`]).
//!
//! cubecl 0.10 does not expose the CUDA stream its kernels run on, so a cuDNN or cuBLAS call
//! cannot simply be queued behind them. Instead, with one word of device memory per call:
//!
//! 1. [`signal`] runs on cubecl's stream after the kernels that produce the call's inputs
//!    and stores the call's number in its "ready" word;
//! 2. our stream waits for that word (a one-thread PTX kernel of `device`), runs the
//!    library call, and writes the number into the call's "done" word (another, which
//!    fences first, so the call's output is visible before the word);
//! 3. [`wait`] runs on cubecl's stream before anything that reads the output and spins, one
//!    thread, until the "done" word has the number.
//!
//! A spin is bounded: after `max_spins` polls it gives up and counts a timeout in the
//! status word, which [`super::vendor_stats`] reports (the call's result may then be read
//! too early; the device script treats any timeout as a failure).
//!
//! The words are one `u32` array per cubecl stream: `SLOTS` ready words, `SLOTS` done
//! words, one status word and a scratch word. Call `k` uses slot `k % SLOTS`, so each word
//! only ever grows and "has the number" is `>= k`.

use burn_cubecl::cubecl;
use cubecl::prelude::*;

/// Slots of ready and done words. Words only grow and a call waits for "at least its
/// number", so any count is correct (a later call's number in a slot also means the earlier
/// call's step was reached); tests use few, so that slots are reused within a test.
pub(super) const SLOTS: u32 = if cfg!(test) { 16 } else { 256 };

/// Words in the array: ready words, done words, the status word, a scratch word.
pub(super) const WORDS: usize = 2 * SLOTS as usize + 2;

/// Index of the status word (timeouts so far).
pub(super) const STATUS: u32 = 2 * SLOTS;

/// Index of a word no call uses (the ordering test's delays spin on it).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(super) const SCRATCH: u32 = 2 * SLOTS + 1;

/// Polls before [`wait`] gives up: each poll is an L2 atomic (a fraction of a microsecond),
/// so this is about a second, far beyond any single library call at SD sizes (milliseconds),
/// yet short enough that a broken ordering shows up as timeouts rather than a hang.
pub(super) const MAX_SPINS: u32 = 4_000_000;

/// Polls before our stream's wait for a call's inputs gives up (about half a minute or
/// more). That wait starts as soon as our stream is idle and lasts through every kernel of
/// burn's queued before the call's signal, which may be far more than one library call's
/// work (a step's attention kernels, a slow device, a GPU shared with another process); a
/// timeout there would let the library read unfinished inputs, so only a broken ordering
/// may reach it.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(super) const READY_MAX_SPINS: u32 = 30 * MAX_SPINS;

/// Stores `value` in `words[index]` (one thread).
#[cube(launch)]
pub(super) fn signal(words: &mut Array<Atomic<u32>>, index: u32, value: u32) {
    if UNIT_POS == 0 {
        words[index as usize].store(value);
    }
}

/// Returns once `words[index] >= value` (one thread); after `max_spins` polls it adds one
/// to `words[status]` and returns anyway.
#[cube(launch)]
pub(super) fn wait(words: &mut Array<Atomic<u32>>, index: u32, value: u32, status: u32, max_spins: u32) {
    if UNIT_POS == 0 {
        let mut spins = 0u32;
        loop {
            // An atomic load is an L2 read on CUDA (atomicAdd of 0), never a cached value.
            if words[index as usize].load() >= value {
                break;
            }
            spins += 1;
            if spins >= max_spins {
                words[status as usize].fetch_add(1u32);
                break;
            }
        }
    }
}

// With `vulkan-test` (CubeCL's SPIR-V compiler instead of WGSL) the wait test's buffer
// fails wgpu's validation on lavapipe and loses the device for the tests after it;
// scripts/vulkan-test.sh runs these from the WGSL build.
#[cfg(all(test, feature = "wgpu-test", not(feature = "vulkan-test")))]
mod tests {
    //! Runs the kernels on CubeCL's wgpu runtime: on a machine without a GPU, Mesa's
    //! lavapipe Vulkan driver (`apt install mesa-vulkan-drivers`) executes them on the CPU.
    //! `cargo test -p lora-core --release --features wgpu-test -- wgpu`.

    use super::*;
    use cubecl::wgpu::{WgpuDevice, WgpuRuntime};

    fn read(client: &ComputeClient<WgpuRuntime>, handle: &cubecl::server::Handle) -> Vec<u32> {
        let bytes = client.read_one(handle.clone()).expect("read back");
        bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
    }

    fn words(client: &ComputeClient<WgpuRuntime>) -> cubecl::server::Handle {
        client.create_from_slice(&[0u8; 4 * WORDS])
    }

    fn launch_signal(client: &ComputeClient<WgpuRuntime>, handle: &cubecl::server::Handle, index: u32, value: u32) {
        // SAFETY: the array has WORDS u32 elements.
        let array = unsafe { ArrayArg::from_raw_parts(handle.clone(), WORDS) };
        signal::launch::<WgpuRuntime>(client, CubeCount::Static(1, 1, 1), CubeDim::new_1d(1), array, index, value);
    }

    fn launch_wait(client: &ComputeClient<WgpuRuntime>, handle: &cubecl::server::Handle, index: u32, value: u32, max_spins: u32) {
        // SAFETY: as above.
        let array = unsafe { ArrayArg::from_raw_parts(handle.clone(), WORDS) };
        wait::launch::<WgpuRuntime>(client, CubeCount::Static(1, 1, 1), CubeDim::new_1d(1), array, index, value, STATUS, max_spins);
    }

    #[test]
    fn wgpu_signal_stores_the_call_number() {
        let client = WgpuRuntime::client(&WgpuDevice::default());
        let handle = words(&client);
        launch_signal(&client, &handle, 3, 7);
        launch_signal(&client, &handle, SLOTS + 3, 9);
        let got = read(&client, &handle);
        assert_eq!((got[3], got[(SLOTS + 3) as usize]), (7, 9));
        assert_eq!(got.iter().filter(|&&w| w != 0).count(), 2, "only the two words change");
    }

    #[test]
    fn wgpu_wait_returns_once_the_word_is_reached_and_counts_timeouts() {
        let client = WgpuRuntime::client(&WgpuDevice::default());
        let handle = words(&client);
        let done = SLOTS + 5;
        launch_signal(&client, &handle, done, 12);
        // Reached (equal and greater): no timeout.
        launch_wait(&client, &handle, done, 12, 1_000);
        launch_wait(&client, &handle, done, 3, 1_000);
        assert_eq!(read(&client, &handle)[STATUS as usize], 0);
        // Never reached: gives up after the bound and counts it, twice.
        launch_wait(&client, &handle, done, 13, 1_000);
        launch_wait(&client, &handle, SLOTS + 6, 1, 10);
        let got = read(&client, &handle);
        assert_eq!(got[STATUS as usize], 2);
        assert_eq!(got[done as usize], 12, "waiting never writes the word it waits on");
    }
}
