//! The LoRA training / inference step benchmark behind `trainer bench`.

use std::time::Instant;

use burn::module::{AutodiffModule, Module};
use burn::optim::GradientsParams;
use lora_core::guard::{DynamicLossScale, GuardSettings, StepGuard};
use lora_core::optim::{AdamWSettings, FlatAdamW};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, Tensor};
use lora_core::LoraConfig;
use sd_model::checkpoint::CheckpointOptions;
use sd_model::targets::{attach_new_adapters_by_kernel, KernelConfigs, Selection, UnetTargets};
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
    /// Precision of the frozen UNet weights (adapters stay f32, inputs and loss f32).
    pub precision: crate::device_check::Precision,
    /// Block-wise gradient checkpointing in the train step
    /// ([`UNet2DConditionModel::forward_backward_checkpointed`]).
    pub grad_checkpointing: bool,
    /// Inference step: the adapters merged into the weights, as `trainer generate` and the
    /// training loop's samples run them ([`sd_pipeline::merge_adapters`]), or (false)
    /// kept beside them, as diffusers + peft run them. Unused by the train step.
    pub lora_merged: bool,
    /// The adapters' optimizer in the train step: AdamW with burn's defaults, or another
    /// one with this trainer's default settings for it (as `train.optimizer`).
    pub optimizer: crate::config::Optimizer,
    /// The adapters' form (rank 4 each): LoRA, LyCORIS' LoHa or LoKr, or kohya's OFT (4
    /// blocks each) (as `lora.algo`).
    pub algo: lora_core::Algo,
    /// LyCORIS' norm modules too (as `lora.train_norm`): the targeted blocks' GroupNorm /
    /// LayerNorm scales and shifts train beside the adapters. `attn-mlp` reaches the
    /// transformers' norms, `conv` and `all-linear` the ResNet blocks' too; `attn` none (an
    /// error), and kohya's OFT has none (an error, as in training).
    pub train_norm: bool,
}

/// The result, printed as one JSON line.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BenchResult {
    /// Median seconds per step, each step followed by a device sync.
    pub s_per_step: f64,
    /// Images per second (`batch / s_per_step`).
    pub img_per_s: f64,
    /// Mean seconds per step of `steps` further steps run back to back with one device
    /// sync after the last, as the PyTorch anchor times its steps (the host queues the
    /// next step while the device runs the last one).
    pub back_to_back_s_per_step: f64,
    /// `batch / back_to_back_s_per_step`.
    pub back_to_back_img_per_s: f64,
    /// Peak memory in GiB: process peak RSS on the CPU; on CUDA the peak of the bytes held by
    /// live tensors (see [`BenchTimings::peak`]); `null` where not measurable.
    pub peak_mem_gib: Option<f64>,
    /// Peak memory the allocator reserved from the device, in GiB (CUDA; `null` elsewhere).
    pub peak_reserved_gib: Option<f64>,
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
    /// Whether the inference step ran with the adapters merged into the weights (always
    /// false for the train step).
    pub lora_merged: bool,
    /// Whether sd-model's own backward passes were on (`false` with `--plain-autodiff`).
    pub custom_backward: bool,
    /// Whether one more step ran between `cuProfilerStart` and `cuProfilerStop`
    /// (`--cuda-profiler-step`, [`BenchHooks::profiler`]).
    pub profiled_step: bool,
    /// The train step's optimizer (`--optimizer`, as `train.optimizer` names it).
    pub optimizer: crate::config::Optimizer,
    /// The adapters' form (`--lora-algo`, as `lora.algo` names it).
    pub algo: lora_core::Algo,
    /// Whether LyCORIS' norm modules trained too (`--lora-train-norm`).
    pub train_norm: bool,
    /// The adapters' targets (`--lora-targets`, as `lora.unet_targets` names them; the
    /// PyTorch anchor's are `attn`).
    pub lora_targets: String,
    /// What ran in cuDNN / cuBLAS.
    pub vendor: VendorUse,
}

/// The vendor-library routing of a run ([`lora_core::kernels`]), as reported in JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VendorUse {
    /// `--cudnn` / `SD_LORA_CUDNN` was on.
    pub cudnn: bool,
    /// `--cublas` / `SD_LORA_CUBLAS` was on.
    pub cublas: bool,
    /// Convolutions that ran in cuDNN.
    pub cudnn_calls: u64,
    /// Of those, forward convolutions cuDNN wrote onto their residual or time embedding.
    pub cudnn_blended_calls: u64,
    /// Matmuls that ran in cuBLAS.
    pub cublas_calls: u64,
    /// Calls meant for cuDNN / cuBLAS that ran in burn's kernels instead.
    pub fallbacks: u64,
    /// Why the last fallback happened.
    pub last_error: Option<String>,
    /// `--vendor-sync`: `"host"` or `"device"`.
    pub sync: &'static str,
    /// Calls ordered on the GPU (with `--vendor-sync device`), without a host wait.
    pub device_ordered: u64,
    /// GPU-side waits that gave up (should be 0; a result may have been read early).
    pub ordering_timeouts: u64,
    /// Why GPU-side ordering was not used, if it was asked for and failed.
    pub ordering_error: Option<String>,
    /// `--fused-softmax` / `SD_LORA_FUSED_SOFTMAX` was on.
    pub fused_softmax: bool,
    /// Softmaxes that ran in the fused kernel.
    pub fused_softmax_calls: u64,
    /// `--flash-attention` / `SD_LORA_FLASH_ATTENTION` was on.
    pub flash_attention: bool,
    /// Attention passes (forward or backward) that ran in the flash-attention kernels.
    pub flash_attention_calls: u64,
    /// `--cudnn-attention` / `SD_LORA_CUDNN_ATTENTION` was on.
    pub cudnn_attention: bool,
    /// Attention passes (forward or backward) that ran in cuDNN's fused attention.
    pub cudnn_attention_calls: u64,
    /// `--flash-max-keys`: the longest attention (in keys) given to the flash kernels,
    /// `None` without a limit.
    pub flash_max_keys: Option<usize>,
    /// `--fused-group-norm` / `SD_LORA_FUSED_GROUP_NORM` was on.
    pub fused_group_norm: bool,
    /// GroupNorm passes (forward or backward) that ran in the fused kernels.
    pub fused_group_norm_calls: u64,
    /// The fixed matmul kernel was on (CUDA default; off with `--tuned-matmul`).
    pub fixed_matmul: bool,
    /// Matmuls that ran in the fixed kernel.
    pub fixed_matmul_calls: u64,
    /// `--fused-lora-linear` / `SD_LORA_FUSED_LORA_LINEAR` was on.
    pub fused_lora_linear: bool,
    /// LoRA linear layers' passes (forward or backward) that ran as one op.
    pub fused_lora_linear_calls: u64,
    /// GEGLU passes (with the projection's bias) that ran as one op (with
    /// `--fused-lora-linear`).
    pub fused_geglu_calls: u64,
}

impl VendorUse {
    /// The process's counters so far.
    pub fn now() -> Self {
        let stats = lora_core::kernels::vendor_stats();
        Self {
            cudnn: lora_core::kernels::cudnn_enabled(),
            cublas: lora_core::kernels::cublas_enabled(),
            cudnn_calls: stats.cudnn_calls,
            cudnn_blended_calls: stats.cudnn_blended_calls,
            cublas_calls: stats.cublas_calls,
            fallbacks: stats.fallbacks,
            last_error: stats.last_error,
            sync: match lora_core::kernels::vendor_sync() {
                lora_core::kernels::VendorSync::Host => "host",
                lora_core::kernels::VendorSync::Device => "device",
            },
            device_ordered: stats.device_ordered,
            ordering_timeouts: stats.ordering_timeouts,
            ordering_error: stats.ordering_error,
            fused_softmax: lora_core::kernels::fused_softmax_enabled(),
            fused_softmax_calls: stats.fused_softmax_calls,
            flash_attention: lora_core::kernels::flash_attention_enabled(),
            flash_attention_calls: stats.flash_attention_calls,
            cudnn_attention: lora_core::kernels::cudnn_attention_enabled(),
            cudnn_attention_calls: stats.cudnn_attention_calls,
            flash_max_keys: Some(lora_core::kernels::flash_max_keys()).filter(|&keys| keys != usize::MAX),
            fused_group_norm: lora_core::kernels::fused_group_norm_enabled(),
            fused_group_norm_calls: stats.fused_group_norm_calls,
            fixed_matmul: lora_core::kernels::fixed_matmul_enabled(),
            fixed_matmul_calls: stats.fixed_matmul_calls,
            fused_lora_linear: lora_core::kernels::fused_lora_linear_enabled(),
            fused_lora_linear_calls: stats.fused_lora_linear_calls,
            fused_geglu_calls: stats.fused_geglu_calls,
        }
    }
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

/// Device memory counters at one moment, in bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemorySample {
    /// Bytes held by live tensors (cubecl's `MemoryUsage::bytes_in_use`, the analogue of
    /// `torch.cuda.memory_allocated`).
    pub in_use: u64,
    /// Bytes the allocator holds from the device (cubecl's `bytes_reserved`, the analogue of
    /// `torch.cuda.memory_reserved`).
    pub reserved: u64,
}

impl MemorySample {
    /// Field-wise maximum.
    pub fn max(self, other: Self) -> Self {
        Self {
            in_use: self.in_use.max(other.in_use),
            reserved: self.reserved.max(other.reserved),
        }
    }
}

/// Bytes as GiB.
pub fn gib(bytes: u64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64
}

/// The timings and peak memory of one benchmark run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BenchTimings {
    /// Seconds of the warm-up step.
    pub first_step_s: f64,
    /// Median seconds of the measured steps, each followed by a device sync.
    pub s_per_step: f64,
    /// Mean seconds of as many steps again run back to back, with one device sync after
    /// the last (how the PyTorch anchor times its steps).
    pub back_to_back_s_per_step: f64,
    /// Field-wise maxima of the memory probe's samples (`None` without a probe or when it
    /// gives none). They come from one extra, untimed step after the measured ones, sampled
    /// (each after a device sync) after the forward pass (all activations alive), after the
    /// backward pass and after the optimizer step; an inference step after the forward pass
    /// and at its end.
    pub peak: Option<MemorySample>,
}

/// The memory counters of a CUDA device (cubecl's memory pools of this thread's stream).
///
/// burn 0.21 allocates when an operation is issued (this build has no fusion), so a sample
/// taken right after issuing the forward pass sees every activation the backward pass needs.
#[cfg(feature = "cuda")]
pub fn cuda_memory(device: &burn::backend::cuda::CudaDevice) -> Option<MemorySample> {
    cube_memory::<burn::cubecl::cuda::CudaRuntime>(device)
}

/// The memory counters of a wgpu device (cubecl's memory pools of this thread's stream), as
/// [`cuda_memory`] reads them on CUDA.
#[cfg(feature = "wgpu")]
pub fn wgpu_memory(device: &burn::backend::wgpu::WgpuDevice) -> Option<MemorySample> {
    cube_memory::<burn::cubecl::wgpu::WgpuRuntime>(device)
}

/// The memory counters of cubecl runtime `R`'s client for `device`.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn cube_memory<R: burn::cubecl::Runtime>(device: &R::Device) -> Option<MemorySample> {
    let usage = R::client(device).memory_usage().ok()?;
    Some(MemorySample {
        in_use: usage.bytes_in_use,
        reserved: usage.bytes_reserved,
    })
}

fn sync<B: Backend>(device: &B::Device) -> Result<(), TrainError> {
    B::sync(device).map_err(|e| TrainError::Config {
        origin: "bench".into(),
        reason: format!("device sync failed: {e:?}"),
    })
}

/// Runs the benchmark on backend `B` and returns the timings (median over `steps`).
pub fn run<B: AutodiffBackend>(opts: &BenchOptions, device: &B::Device) -> Result<(f64, f64), TrainError> {
    let timings = run_probed::<B>(opts, device, None)?;
    Ok((timings.first_step_s, timings.s_per_step))
}

/// [`run`], also recording the peak of `probe`'s memory samples on one extra step
/// (see [`BenchTimings::peak`]; on CUDA pass `cuda_memory`, built with the `cuda` feature).
pub fn run_probed<B: AutodiffBackend>(
    opts: &BenchOptions,
    device: &B::Device,
    probe: Option<&mut dyn FnMut() -> Option<MemorySample>>,
) -> Result<BenchTimings, TrainError> {
    run_hooked::<B>(opts, device, BenchHooks { memory: probe, profiler: None })
}

/// What [`run_hooked`] calls besides the steps.
#[derive(Default)]
pub struct BenchHooks<'a> {
    /// Memory probe for one extra, untimed step (see [`BenchTimings::peak`]; on CUDA
    /// `cuda_memory`, built with the `cuda` feature).
    pub memory: Option<&'a mut dyn FnMut() -> Option<MemorySample>>,
    /// Called with `true` right before and with `false` right after one more untimed step,
    /// each time with the device idle (synchronised): for a profiler that records only
    /// what runs in between (on CUDA `lora_core::kernels::cuda_profiler`, for
    /// `ncu --profile-from-start off`). An error ends the benchmark.
    pub profiler: Option<&'a mut dyn FnMut(bool) -> Result<(), String>>,
}

/// [`run`] with [`BenchHooks`]: the timed steps, then the memory probe's step, then the
/// profiled step, each only when its hook is given.
///
/// ```
/// use burn::backend::{Autodiff, Flex};
/// use trainer::bench::{run_hooked, BenchHooks, BenchOptions};
///
/// let opts = BenchOptions {
///     unet: sd_model::UnetConfig::tiny(),
///     batch: 1,
///     resolution: 64,
///     steps: 1,
///     targets: sd_model::targets::UnetTargets::Attn,
///     train: true,
///     precision: trainer::device_check::Precision::F32,
///     grad_checkpointing: false,
///     lora_merged: false,
///     optimizer: trainer::config::Optimizer::Adamw,
///     algo: lora_core::Algo::Lora,
///     train_norm: false,
/// };
/// let mut calls = Vec::new();
/// let mut profiler = |start: bool| -> Result<(), String> {
///     calls.push(start);
///     Ok(())
/// };
/// let hooks = BenchHooks { memory: None, profiler: Some(&mut profiler) };
/// let timings = run_hooked::<Autodiff<Flex>>(&opts, &Default::default(), hooks)?;
/// assert!(timings.s_per_step > 0.0);
/// assert_eq!(calls, [true, false]);
/// # Ok::<(), trainer::TrainError>(())
/// ```
pub fn run_hooked<B: AutodiffBackend>(opts: &BenchOptions, device: &B::Device, hooks: BenchHooks<'_>) -> Result<BenchTimings, TrainError> {
    let BenchHooks { memory: mut probe, mut profiler } = hooks;
    if opts.batch == 0 || opts.steps == 0 || opts.resolution == 0 || !opts.resolution.is_multiple_of(8) {
        return Err(TrainError::Config {
            origin: "bench".into(),
            reason: "batch and steps must be at least 1 and resolution a positive multiple of 8".into(),
        });
    }
    crate::train::check_dtype_support::<B>(device, opts.precision.dtype(), "--precision", "f16 or f32")?;
    B::seed(device, 0);
    // Frozen base, as in training: only the adapters get gradients and AdamW updates.
    let mut unet = UNet2DConditionModel::<B>::new(&opts.unet, device)?.no_grad();
    // kohya's OFT at its usual constraint (alpha 1e-3), Diag-OFT at LyCORIS' default
    // (none); the constraint sets the inverse's steps.
    let adapters = match opts.algo {
        lora_core::Algo::Oft => LoraConfig::new(4).with_alpha(1e-3),
        lora_core::Algo::DiagOft => LoraConfig::new(4).with_alpha(0.0),
        // SD's widths (320 · 2^k, 768 for the text encoder's) split into blocks of 10.
        lora_core::Algo::Boft => LoraConfig::new(10).with_alpha(0.0),
        _ => LoraConfig::new(4),
    };
    if opts.train_norm && opts.algo == lora_core::Algo::Oft {
        return Err(TrainError::Config { origin: "bench".into(), reason: "--lora-train-norm: kohya's OFT has no norm modules (LyCORIS' train_norm); use --lora-algo diag-oft".into() });
    }
    let selection = Selection::new(opts.targets).with_norms(opts.train_norm);
    let adapters = adapters.with_algo(opts.algo);
    let configs = KernelConfigs { linear: &adapters, spatial: &adapters };
    let attached = attach_new_adapters_by_kernel(&mut unet, &selection, configs, device)?;
    if opts.train_norm && attached.norms == 0 {
        return Err(TrainError::Config {
            origin: "bench".into(),
            reason: format!("--lora-train-norm: --lora-targets {} reaches no norm layer; use attn-mlp (the transformers' norms), conv or all-linear", opts.targets.name()),
        });
    }
    // Half precision as in training: frozen weights converted once, adapters trained as f32
    // master values in the optimizer (with half-precision copies in the model, below).
    if opts.precision != crate::device_check::Precision::F32 {
        unet = lora_core::precision::cast_frozen(unet, opts.precision.dtype());
    }
    let side = opts.resolution / 8;
    let n = if opts.train { opts.batch } else { 2 * opts.batch };
    let latents = Tensor::<B, 4>::random([n, opts.unet.in_channels, side, side], Distribution::Normal(0.0, 1.0), device);
    let timesteps = Tensor::<B, 1>::from_floats(vec![500.0; n].as_slice(), device);
    let context = Tensor::<B, 3>::random([n, 77, opts.unet.cross_attention_dim], Distribution::Normal(0.0, 1.0), device);
    // SDXL's added conditioning: a pooled embedding and the time ids of a square image.
    let added = match crate::device_check::pooled_width(&opts.unet)? {
        Some(pooled) => {
            let size = (opts.resolution as u32, opts.resolution as u32);
            Some(sd_model::AddedConditions {
                text_embeds: Tensor::<B, 2>::random([n, pooled], Distribution::Normal(0.0, 1.0), device),
                time_ids: sd_model::AddedConditions::sdxl_time_ids(&vec![(size, (0, 0), size); n], device),
            })
        }
        None => None,
    };
    // The trainer's optimizer: all adapter tensors in one update (AdamW unless asked).
    let mut optim = match opts.optimizer {
        crate::config::Optimizer::Adamw => FlatAdamW::new(AdamWSettings::default(), &unet, device),
        other => {
            let mut config = crate::config::TrainConfig::default();
            config.train.optimizer = other;
            crate::train::model_optimizer(&mut unet, &Default::default(), &Default::default(), &config, device)?
        }
    };
    if opts.precision != crate::device_check::Precision::F32 {
        optim = optim.with_working_dtype(opts.precision.dtype());
        unet = optim.to_working(unet);
    }
    // The trainer's step decisions, with its defaults: clipping at norm 1, the non-finite
    // skip, and with f16 the dynamic loss scale; all on the device.
    let half = opts.precision == crate::device_check::Precision::F16;
    let settings = GuardSettings {
        max_grad_norm: 1.0,
        loss_scale: half.then(DynamicLossScale::default),
    };
    let mut guard = StepGuard::<B::InnerBackend>::new(settings, device);
    let frozen = (!opts.train).then(|| {
        let mut frozen = unet.valid();
        if opts.lora_merged {
            lora_core::sites::bake_adapters(&mut frozen);
        }
        frozen
    });
    let mut times = Vec::new();
    let mut peak: Option<MemorySample> = None;
    // Steps 0..=steps are timed one by one, each followed by a device sync (step 0 is the
    // warm-up: compilation, autotuning). Then `steps` more run back to back with one sync at
    // the end, as the PyTorch anchor times its steps: the host queues a step while the
    // device still runs the one before. With a probe, one last untimed step samples memory,
    // synchronising before each sample so that queued (fused) work has allocated what it
    // needs; keeping the probe out of the timed steps keeps their launches free of host
    // round trips.
    let window_end = 2 * opts.steps;
    let probe_step = probe.is_some().then_some(window_end + 1);
    let profiled_step = profiler.is_some().then(|| window_end + 1 + usize::from(probe.is_some()));
    let last = probe_step.max(profiled_step).unwrap_or(window_end);
    let mut window = Instant::now();
    let mut back_to_back = f64::NAN;
    let mut profile = |start: bool| -> Result<(), TrainError> {
        match profiler.as_mut() {
            Some(hook) => hook(start).map_err(|reason| TrainError::Config { origin: "bench profiler".into(), reason }),
            None => Ok(()),
        }
    };
    for step in 0..=last {
        let in_window = step > opts.steps && step <= window_end;
        let probing = Some(step) == probe_step;
        let profiling = Some(step) == profiled_step;
        if step == opts.steps + 1 {
            window = Instant::now();
        }
        if profiling {
            sync::<B>(device)?;
            profile(true)?;
        }
        let mut sample = || -> Result<(), TrainError> {
            if let (true, Some(probe)) = (probing, probe.as_mut()) {
                sync::<B>(device)?;
                if let Some(s) = probe() {
                    peak = Some(peak.map_or(s, |p| p.max(s)));
                }
            }
            Ok(())
        };
        let start = Instant::now();
        if opts.train && opts.grad_checkpointing {
            // Memory peaks inside the backward pass, once per block: sample there too.
            let mut failed = None;
            let mut after_recompute = || {
                if let Err(e) = sample() {
                    failed.get_or_insert(e);
                }
            };
            let options = CheckpointOptions {
                after_recompute: Some(&mut after_recompute),
                added: added.clone(),
                ..Default::default()
            };
            let step = unet.forward_backward_checkpointed(latents.clone(), timesteps.clone(), context.clone(), options, |pred| {
                guard.scale_loss((pred - latents.clone()).powf_scalar(2.0).mean())
            })?;
            if let Some(e) = failed {
                return Err(e);
            }
            sample()?;
            let grads = optim.gather_grads(&unet, step.grads);
            let check = guard.check(guard.unscale(step.loss), grads.sq_norm());
            unet = optim.step_if(1e-4, unet, check.scale(grads), check.apply);
        } else if opts.train {
            let pred = unet.forward_added(latents.clone(), timesteps.clone(), context.clone(), added.clone())?;
            let loss = guard.scale_loss((pred - latents.clone()).powf_scalar(2.0).mean());
            let value = guard.unscale(loss.clone().inner());
            sample()?;
            let grads = GradientsParams::from_grads(loss.backward(), &unet);
            sample()?;
            let grads = optim.gather_grads(&unet, grads);
            let check = guard.check(value, grads.sq_norm());
            unet = optim.step_if(1e-4, unet, check.scale(grads), check.apply);
        } else if let Some(valid) = &frozen {
            let inner = added.clone().map(|a| sd_model::AddedConditions { text_embeds: a.text_embeds.inner(), time_ids: a.time_ids.inner() });
            let out = valid.forward_added(latents.clone().inner(), timesteps.clone().inner(), context.clone().inner(), inner)?;
            sample()?;
            drop(out);
        }
        if in_window {
            if step == window_end {
                sync::<B>(device)?;
                back_to_back = window.elapsed().as_secs_f64() / opts.steps as f64;
            }
            continue;
        }
        sync::<B>(device)?;
        sample()?;
        if profiling {
            profile(false)?;
        } else if !probing {
            times.push(start.elapsed().as_secs_f64());
        }
    }
    Ok(BenchTimings {
        first_step_s: times[0],
        s_per_step: median(times[1..].to_vec()),
        back_to_back_s_per_step: back_to_back,
        peak,
    })
}
