//! Counts the GPU kernel launches of one LoRA training step (or CFG inference step) of an
//! SD1.5-structured UNet on burn's wgpu backend with fusion — the same burn-fusion and CubeCL
//! path as CUDA — so that launch overhead can be studied without a GPU (lavapipe).
//!
//! ```text
//! cargo run --release -p sd-model --features vulkan-test --example launches -- \
//!     [--width 32] [--resolution 64] [--batch 1] [--steps 2] [--precision f32|f16] \
//!     [--mode train|infer] [--lora-targets attn|attn-mlp] [--fused-group-norm] \
//!     [--fused-softmax] [--flash-attention] [--plain-autodiff] [--checkpointing] [--casting-adapters] \
//!     [--lora-unmerged] [--fixed-matmul] [--fused-lora-linear] [--conv-op] [--top 40]
//! ```
//!
//! The UNet has SD1.5's blocks, layers and heads, with every channel count scaled so that
//! the first level has `--width` channels (SD1.5: 320) and a 64-wide text context: the launch
//! count depends on the graph, not on the widths. CubeCL's profiling logger (level
//! `minimal`: every kernel that runs, by name, untimed) writes to a temporary file; the
//! example prints the launches per measured step (after one warm-up step), the most
//! frequent kernels, the calling thread's CPU time per step while it queues the steps, and
//! how many kernels were compiled (CubeCL's compilation logger): on CUDA each is an NVRTC
//! compilation on the first run, about a second on the H200 of 2026-11-29, so this is the
//! first step's compile bill there (autotune candidates included: on wgpu the convolutions
//! stay in burn's autotuned kernels, which cuDNN replaces on CUDA).
//! That thread records autodiff and hands each operation to burn-fusion's device thread
//! (which plans, fuses and launches); its CPU time includes spin-waits whenever that thread
//! is behind, as it always is on lavapipe. `scripts/host-profile.sh` samples every thread
//! with `perf` and separates work from waiting.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use burn::backend::Autodiff;
use burn::cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
use burn::module::{AutodiffModule, Module};
use burn::optim::GradientsParams;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, FloatDType, Tensor};
use clap::{Parser, ValueEnum};
use lora_core::guard::{DynamicLossScale, GuardSettings, StepGuard};
use lora_core::optim::{AdamWSettings, FlatAdamW};
use lora_core::LoraConfig;
use sd_model::checkpoint::CheckpointOptions;
use sd_model::targets::{attach_new_adapters, Selection, UnetTargets};
use sd_model::{PerBlock, UNet2DConditionModel, UnetConfig};

type W = burn::backend::Wgpu;
type B = Autodiff<W>;

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    Train,
    Infer,
}

#[derive(Clone, Copy, ValueEnum)]
enum Precision {
    F32,
    F16,
}

#[derive(Clone, Copy, ValueEnum)]
enum Targets {
    Attn,
    AttnMlp,
}

#[derive(Parser)]
#[command(about = "Kernel launches per UNet step on the wgpu backend (lavapipe works)")]
struct Args {
    /// Channels of the first level (SD1.5: 320); the others scale with it.
    #[arg(long, default_value_t = 32)]
    width: usize,
    /// Image side in pixels (latents are 1/8 of it).
    #[arg(long, default_value_t = 64)]
    resolution: usize,
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Measured steps, after one warm-up step.
    #[arg(long, default_value_t = 2)]
    steps: usize,
    #[arg(long, value_enum, default_value = "f32")]
    precision: Precision,
    #[arg(long, value_enum, default_value = "train")]
    mode: Mode,
    #[arg(long, value_enum, default_value = "attn")]
    lora_targets: Targets,
    /// GroupNorm + SiLU and LayerNorm in lora-core's fused kernels.
    #[arg(long)]
    fused_group_norm: bool,
    /// Attention's softmax in lora-core's fused kernel.
    #[arg(long)]
    fused_softmax: bool,
    /// Attention in lora-core's flash-attention kernels (`--precision f16`; needs
    /// `VK_KHR_cooperative_matrix`, e.g. Mesa >= 25.1's lavapipe: see scripts/vulkan-test.sh).
    #[arg(long)]
    flash_attention: bool,
    /// burn's own backward passes instead of sd-model's.
    #[arg(long)]
    plain_autodiff: bool,
    /// Block-wise gradient checkpointing (`sd_model::checkpoint`).
    #[arg(long)]
    checkpointing: bool,
    /// With `--precision f16`: f32 adapters cast in every pass instead of the optimizer's
    /// f16 working copies (`FlatAdamW::with_working_dtype`).
    #[arg(long)]
    casting_adapters: bool,
    /// Infer mode: keep the adapters beside the weights (as diffusers + peft) instead of
    /// merging them in, as `trainer generate` does.
    #[arg(long)]
    lora_unmerged: bool,
    /// The matmuls in lora-core's fixed kernel instead of burn's autotuned one, as the
    /// trainer runs them on CUDA (`lora_core::kernels::set_fixed_matmul`).
    #[arg(long)]
    fixed_matmul: bool,
    /// With `--fixed-matmul`: each LoRA linear layer as one op forward and one backward
    /// (`lora_core::kernels::set_fused_lora_linear`).
    #[arg(long)]
    fused_lora_linear: bool,
    /// The convolutions as the custom operation CUDA runs them in with cuDNN (burn's conv
    /// kernels inside it here; `lora_core::kernels::set_cudnn`), so that the fusion stream
    /// sees CUDA's graph.
    #[arg(long)]
    conv_op: bool,
    /// How many kernel names to list.
    #[arg(long, default_value_t = 40)]
    top: usize,
    /// Also write the measured steps' kernel names, in launch order, to this file.
    #[arg(long)]
    dump: Option<std::path::PathBuf>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.width == 0 || !args.width.is_multiple_of(32) {
        bail!("--width must be a positive multiple of 32 (GroupNorm's 32 groups)");
    }
    if args.resolution == 0 || !args.resolution.is_multiple_of(64) {
        bail!("--resolution must be a positive multiple of 64 (three downsamplings of the latents)");
    }
    let log = std::env::temp_dir().join(format!("sd-model-launches-{}.log", std::process::id()));
    // cubecl.toml and CUBECL_* variables (e.g. CUBECL_AUTOTUNE_LEVEL) as usual, plus the logger.
    let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
    config.profiling.logger.level = burn::cubecl::config::profiling::ProfilingLogLevel::Minimal;
    config.profiling.logger.file = Some(log.clone());
    config.profiling.logger.append = false;
    let compile_log = std::env::temp_dir().join(format!("sd-model-launches-{}-compile.log", std::process::id()));
    config.compilation.logger.level = burn::cubecl::config::compilation::CompilationLogLevel::Basic;
    config.compilation.logger.file = Some(compile_log.clone());
    config.compilation.logger.append = false;
    CubeClRuntimeConfig::set(config);

    lora_core::kernels::set_fused_group_norm(args.fused_group_norm);
    lora_core::kernels::set_fused_softmax(args.fused_softmax);
    lora_core::kernels::set_flash_attention(args.flash_attention);
    lora_core::kernels::set_fixed_matmul(args.fixed_matmul);
    lora_core::kernels::set_fused_lora_linear(args.fused_lora_linear);
    lora_core::kernels::set_cudnn(args.conv_op);
    sd_model::set_custom_backward(!args.plain_autodiff);

    let device = Default::default();
    let unet_config = scaled_sd15(args.width);
    let mut unet = UNet2DConditionModel::<B>::new(&unet_config, &device)?.no_grad();
    let targets = match args.lora_targets {
        Targets::Attn => UnetTargets::Attn,
        Targets::AttnMlp => UnetTargets::AttnMlp,
    };
    let sites = attach_new_adapters(&mut unet, &Selection::new(targets), &LoraConfig::new(4), &device)?;
    if let Precision::F16 = args.precision {
        unet = lora_core::precision::cast_frozen(unet, FloatDType::F16);
    }
    let side = args.resolution / 8;
    let n = match args.mode {
        Mode::Train => args.batch,
        Mode::Infer => 2 * args.batch,
    };
    let latents = Tensor::<B, 4>::random([n, 4, side, side], Distribution::Normal(0.0, 1.0), &device);
    let timesteps = Tensor::<B, 1>::from_floats(vec![500.0; n].as_slice(), &device);
    let context = Tensor::<B, 3>::random([n, 77, unet_config.cross_attention_dim], Distribution::Normal(0.0, 1.0), &device);
    let mut optim = FlatAdamW::new(AdamWSettings::default(), &unet, &device);
    if let (Precision::F16, false) = (args.precision, args.casting_adapters) {
        // As the trainer does: f32 master values in the optimizer, f16 copies in the UNet.
        optim = optim.with_working_dtype(FloatDType::F16);
        unet = optim.to_working(unet);
    }
    // The trainer's step decisions on the device: clipping, non-finite skip, f16 loss scale.
    let settings = GuardSettings {
        max_grad_norm: 1.0,
        loss_scale: matches!(args.precision, Precision::F16).then(DynamicLossScale::default),
    };
    let mut guard = StepGuard::<W>::new(settings, &device);

    // The inference model, made once: with the adapters merged into the weights unless
    // `--lora-unmerged` (as `trainer generate` and `trainer bench --mode infer` run it).
    let inference = matches!(args.mode, Mode::Infer).then(|| {
        let mut valid = unet.valid();
        if !args.lora_unmerged {
            lora_core::sites::bake_adapters(&mut valid);
        }
        valid
    });

    let mut step = |unet: UNet2DConditionModel<B>| -> Result<UNet2DConditionModel<B>> {
        match &inference {
            Some(valid) => {
                let out = valid.forward(latents.clone().inner(), timesteps.clone().inner(), context.clone().inner())?;
                drop(out);
                Ok(unet)
            }
            None if args.checkpointing => {
                let target = latents.clone();
                let step = unet.forward_backward_checkpointed(latents.clone(), timesteps.clone(), context.clone(), CheckpointOptions::default(), |pred| {
                    guard.scale_loss((pred - target).powf_scalar(2.0).mean())
                })?;
                let grads = optim.gather_grads(&unet, step.grads);
                let check = guard.check(guard.unscale(step.loss), grads.sq_norm());
                Ok(optim.step_if(1e-4, unet, check.scale(grads), check.apply))
            }
            None => {
                let pred = unet.forward(latents.clone(), timesteps.clone(), context.clone())?;
                let loss = guard.scale_loss((pred - latents.clone()).powf_scalar(2.0).mean());
                let value = guard.unscale(loss.clone().inner());
                let grads = GradientsParams::from_grads(loss.backward(), &unet);
                let grads = optim.gather_grads(&unet, grads);
                let check = guard.check(value, grads.sq_norm());
                Ok(optim.step_if(1e-4, unet, check.scale(grads), check.apply))
            }
        }
    };
    let sync = || W::sync(&device).map_err(|e| anyhow::anyhow!("device sync failed: {e:?}"));

    let start = Instant::now();
    unet = step(unet)?;
    sync()?;
    let warm_up = start.elapsed();
    let before = executions(&log)?;
    let compiled = compilations(&compile_log);
    eprintln!("warm-up step done in {:.1} s; measuring {} steps", warm_up.as_secs_f64(), args.steps);
    let start = Instant::now();
    let cpu_start = thread_cpu_s();
    for _ in 0..args.steps {
        unet = step(unet)?;
    }
    let queued = start.elapsed();
    let cpu_queued = thread_cpu_s();
    sync()?;
    let measured = start.elapsed();
    let all = executions(&log)?;
    let compiled_later = compilations(&compile_log).len().saturating_sub(compiled.len());
    drop(unet);

    let window = &all[before.len().min(all.len())..];
    if let Some(path) = &args.dump {
        std::fs::write(path, window.join("\n")).with_context(|| format!("writing {}", path.display()))?;
    }
    let mut by_name: HashMap<&str, usize> = HashMap::new();
    for name in window {
        *by_name.entry(name.as_str()).or_default() += 1;
    }
    let mut ranked: Vec<(&str, usize)> = by_name.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let per_step = window.len() as f64 / args.steps as f64;
    let mut compiled_by_name: HashMap<&str, usize> = HashMap::new();
    for name in &compiled {
        *compiled_by_name.entry(name.as_str()).or_default() += 1;
    }
    let mut compiled_ranked: Vec<(&str, usize)> = compiled_by_name.into_iter().collect();
    compiled_ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    println!("| kernels compiled in the warm-up step | kernel |");
    println!("|---:|---|");
    for (name, count) in compiled_ranked.iter().take(args.top) {
        println!("| {count} | `{}` |", short(name));
    }
    println!();
    println!("| launches / step | share | kernel |");
    println!("|---:|---:|---|");
    for (name, count) in ranked.iter().take(args.top) {
        println!("| {:.1} | {:.1}% | `{}` |", *count as f64 / args.steps as f64, 100.0 * *count as f64 / window.len().max(1) as f64, short(name));
    }
    // Over the whole run (warm-up included): which of lora-core's kernels ran, and whether
    // any fell back to burn's ops.
    let stats = lora_core::kernels::vendor_stats();
    println!(
        "{{\"launches_per_step\": {per_step:.1}, \"distinct_kernels\": {}, \"adapters\": {}, \"compiled_warm_up\": {}, \"compiled_measured\": {compiled_later}, \"warm_up_s\": {:.2}, \"s_per_step\": {:.3}, \"host_queue_s_per_step\": {:.3}, \"host_cpu_s_per_step\": {:.3}, \"host_cpu_us_per_launch\": {:.1}, \"mode\": \"{}\", \"batch\": {}, \"resolution\": {}, \"width\": {}, \"kernel_calls\": {{\"flash_attention\": {}, \"fused_softmax\": {}, \"fused_group_norm\": {}, \"fused_concat\": {}, \"fixed_matmul\": {}, \"fused_lora_linear\": {}, \"fused_geglu\": {}, \"fallbacks\": {}}}}}",
        ranked.len(),
        sites.len(),
        compiled.len(),
        warm_up.as_secs_f64(),
        measured.as_secs_f64() / args.steps as f64,
        queued.as_secs_f64() / args.steps as f64,
        (cpu_queued - cpu_start) / args.steps as f64,
        1e6 * (cpu_queued - cpu_start) / window.len().max(1) as f64,
        match args.mode {
            Mode::Train if args.checkpointing => "train-ckpt",
            Mode::Train => "train",
            Mode::Infer if args.lora_unmerged => "infer-unmerged",
            Mode::Infer => "infer",
        },
        args.batch,
        args.resolution,
        args.width,
        stats.flash_attention_calls,
        stats.fused_softmax_calls,
        stats.fused_group_norm_calls,
        stats.fused_concat_calls,
        stats.fixed_matmul_calls,
        stats.fused_lora_linear_calls,
        stats.fused_geglu_calls,
        stats.fallbacks,
    );
    let _ = std::fs::remove_file(&log);
    let _ = std::fs::remove_file(&compile_log);
    Ok(())
}

/// CPU seconds the calling thread has used (user + system), from `/proc/thread-self/stat`
/// (clock ticks, 100 per second); NaN where that file does not exist.
fn thread_cpu_s() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/thread-self/stat") else { return f64::NAN };
    // Fields after the command name (which may hold spaces) start at field 3; utime and
    // stime are fields 14 and 15.
    let Some((_, rest)) = stat.rsplit_once(')') else { return f64::NAN };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let tick = |i: usize| fields.get(i - 3).and_then(|f| f.parse::<f64>().ok()).unwrap_or(f64::NAN);
    (tick(14) + tick(15)) / 100.0
}

/// SD1.5's UNet with `width` channels at the first level instead of 320 (levels 1:2:4:4),
/// eight heads everywhere and a 64-wide text context.
fn scaled_sd15(width: usize) -> UnetConfig {
    let mut config = UnetConfig::sd15();
    config.block_out_channels = vec![width, 2 * width, 4 * width, 4 * width];
    config.cross_attention_dim = 64;
    config.attention_head_dim = PerBlock::All(8);
    config.num_attention_heads = None;
    config
}

/// The kernel names CubeCL's compilation logger has recorded so far (`[Compiling kernel]
/// NAME` lines), one per compilation; none when the log cannot be read.
fn compilations(log: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| line.strip_prefix("[Compiling kernel] "))
        .map(|name| name.trim().to_string())
        .collect()
}

/// The names of the kernels the profiling log has recorded so far (the logger writes from a
/// background task: wait until the file stops growing).
fn executions(log: &std::path::Path) -> Result<Vec<String>> {
    let mut last = None;
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let len = std::fs::metadata(log).map(|m| m.len()).unwrap_or(0);
        if last == Some(len) {
            break;
        }
        last = Some(len);
    }
    if last == Some(0) {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(log).with_context(|| format!("reading the profiling log {}", log.display()))?;
    Ok(text.lines().filter_map(|l| l.split_once("Executing ").map(|(_, name)| name.trim().to_string())).collect())
}

/// A kernel name without its (long) type parameters.
fn short(name: &str) -> String {
    let cut = name.find('<').unwrap_or(name.len()).min(120);
    name[..cut].to_string()
}
