//! The LoRA training / inference step benchmark behind `trainer bench`.

use std::time::Instant;

use burn::module::AutodiffModule;
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, Tensor};
use lora_core::LoraConfig;
use sd_model::targets::{attach_new_adapters, Selection, UnetTargets};
use sd_model::{UNet2DConditionModel, UnetConfig};
use serde::Serialize;

use crate::TrainError;

/// What to measure.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchOptions {
    /// The UNet config.
    pub unet: UnetConfig,
    /// Images per step (the inference step runs the doubled CFG batch).
    pub batch: usize,
    /// Image side in pixels (latents are 1/8 of it).
    pub resolution: usize,
    /// Measured steps (after one warm-up step, reported as `first_step_s`).
    pub steps: usize,
    /// `attn` or `attn-mlp` adapters (rank 4, as the PyTorch anchor).
    pub targets: UnetTargets,
    /// Train step (forward, backward, AdamW) or CFG inference step.
    pub train: bool,
}

/// The result, printed as one JSON line.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchResult {
    /// Median seconds per step.
    pub s_per_step: f64,
    /// Images per second (`batch / s_per_step`).
    pub img_per_s: f64,
    /// Peak memory in GiB: process peak RSS on the CPU, `null` where not measurable.
    pub peak_mem_gib: Option<f64>,
    /// Seconds of the first step (compilation, autotuning, allocation).
    pub first_step_s: f64,
    /// `cpu` or `cuda`.
    pub device: String,
    /// Parameter precision.
    pub precision: String,
    /// `train` or `infer`.
    pub mode: String,
    /// Images per step.
    pub batch: usize,
    /// Image side.
    pub resolution: usize,
    /// Whether gradient checkpointing was on.
    pub grad_checkpointing: bool,
}

/// Peak resident memory of this process (Linux), in GiB.
pub fn peak_rss_gib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmHWM:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / (1024.0 * 1024.0))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Runs the benchmark on backend `B` and returns the timings (median over `steps`).
pub fn run<B: AutodiffBackend>(opts: &BenchOptions, device: &B::Device) -> Result<(f64, f64), TrainError> {
    if opts.batch == 0 || opts.steps == 0 || opts.resolution == 0 || !opts.resolution.is_multiple_of(8) {
        return Err(TrainError::Config {
            origin: "bench".into(),
            reason: "batch and steps must be at least 1 and resolution a positive multiple of 8".into(),
        });
    }
    B::seed(device, 0);
    let mut unet = UNet2DConditionModel::<B>::new(&opts.unet, device)?;
    attach_new_adapters(&mut unet, &Selection::new(opts.targets), &LoraConfig::new(4), device)?;
    let side = opts.resolution / 8;
    let n = if opts.train { opts.batch } else { 2 * opts.batch };
    let latents = Tensor::<B, 4>::random([n, opts.unet.in_channels, side, side], Distribution::Normal(0.0, 1.0), device);
    let timesteps = Tensor::<B, 1>::from_floats(vec![500.0; n].as_slice(), device);
    let context = Tensor::<B, 3>::random([n, 77, opts.unet.cross_attention_dim], Distribution::Normal(0.0, 1.0), device);
    let mut optim = AdamWConfig::new().init::<B, UNet2DConditionModel<B>>();
    let frozen = (!opts.train).then(|| unet.valid());
    let mut times = Vec::with_capacity(opts.steps + 1);
    for _ in 0..=opts.steps {
        let start = Instant::now();
        if opts.train {
            let pred = unet.forward(latents.clone(), timesteps.clone(), context.clone())?;
            let loss = (pred - latents.clone()).powf_scalar(2.0).mean();
            let grads = GradientsParams::from_grads(loss.backward(), &unet);
            unet = optim.step(1e-4, unet, grads);
        } else if let Some(valid) = &frozen {
            let out = valid.forward(latents.clone().inner(), timesteps.clone().inner(), context.clone().inner())?;
            drop(out);
        }
        <B as Backend>::sync(device).map_err(|e| TrainError::Config { origin: "bench".into(), reason: format!("device sync failed: {e:?}") })?;
        times.push(start.elapsed().as_secs_f64());
    }
    Ok((times[0], median(times[1..].to_vec())))
}
