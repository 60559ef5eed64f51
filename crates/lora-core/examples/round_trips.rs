//! What a library call's buffer lookups cost burn-fusion's thread: `n` blocking
//! `ComputeClient::get_resource` round trips to cubecl's server thread, against one
//! `ComputeClient::exclusive` request that makes the same lookups on that thread (as
//! `lora_core::kernels`' cuDNN / cuBLAS calls do). It runs from inside a fusion-stream
//! operation, where our ops run, on CubeCL's wgpu runtime (on a machine without a GPU,
//! Mesa's lavapipe); the channel between the two threads is the same for CUDA.
//!
//! ```text
//! cargo run --release -p lora-core --features wgpu-test --example round_trips -- [BUFFERS] [CALLS]
//! ```

use std::sync::{Arc, Mutex};
use std::time::Instant;

use burn::backend::Wgpu;
use burn::tensor::{Distribution, Tensor};
use burn_cubecl::cubecl::wgpu::WgpuRuntime;
use burn_cubecl::cubecl::Runtime;
use burn_cubecl::fusion::FusionCubeRuntime;
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::FusionRuntime;
use burn_ir::{CustomOpIr, HandleContainer, OperationIr};

type Fusion = FusionCubeRuntime<WgpuRuntime>;

/// The measurement, run as a fusion-stream operation; the report goes to `out`.
struct Measure {
    buffers: usize,
    calls: usize,
    out: Arc<Mutex<String>>,
}

impl std::fmt::Debug for Measure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Measure")
    }
}

impl Operation<Fusion> for Measure {
    fn execute(&self, _: &mut HandleContainer<<Fusion as FusionRuntime>::FusionHandle>) {
        let client = WgpuRuntime::client(&Default::default());
        let handles: Vec<_> = (0..self.buffers).map(|_| client.empty(1 << 16)).collect();
        let per_call = |start: Instant| start.elapsed().as_secs_f64() * 1e6 / self.calls as f64;
        let mut report = String::from("| round | separate lookups, µs per call | one request, µs per call |\n|---:|---:|---:|\n");
        for round in 0..3 {
            let start = Instant::now();
            for _ in 0..self.calls {
                let resources: Vec<_> = handles.iter().map(|h| client.get_resource(h.clone()).expect("resource")).collect();
                drop(resources);
            }
            let separate = per_call(start);
            let start = Instant::now();
            for _ in 0..self.calls {
                let (server, hs) = (client.clone(), handles.clone());
                client
                    .exclusive(move || {
                        let resources: Vec<_> = hs.iter().map(|h| server.get_resource(h.clone()).expect("resource")).collect();
                        drop(resources);
                    })
                    .expect("exclusive request");
            }
            let together = per_call(start);
            report += &format!("| {round} | {separate:.1} | {together:.1} |\n");
        }
        *self.out.lock().expect("report") = report;
    }
}

fn main() -> Result<(), String> {
    let counts: Vec<usize> = std::env::args()
        .skip(1)
        .map(|a| a.parse::<usize>().ok().filter(|&n| n > 0).ok_or(format!("usage: round_trips [BUFFERS] [CALLS] (positive counts), got {a:?}")))
        .collect::<Result<_, _>>()?;
    let (buffers, calls) = (counts.first().copied().unwrap_or(5), counts.get(1).copied().unwrap_or(2000));
    let device = Default::default();
    // Any fusion tensor gives the stream's client.
    let tensor = Tensor::<Wgpu, 1>::random([8], Distribution::Default, &device);
    let client = tensor.into_primitive().tensor().client.clone();
    let out = Arc::new(Mutex::new(String::new()));
    let desc = CustomOpIr::new("round_trips", &[], &[]);
    client.register(OperationStreams::default(), OperationIr::Custom(desc), Measure { buffers, calls, out: out.clone() });
    client.sync(|| ());
    println!("{buffers} buffer lookups per call, {calls} calls per round");
    print!("{}", out.lock().map_err(|_| "the measurement panicked")?);
    Ok(())
}
