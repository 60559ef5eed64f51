//! `trainer`: train, sample from and convert Stable Diffusion LoRAs.
//!
//! With no arguments it trains the built-in demo (`trainer train` with defaults).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use anyhow::{Context, Result};

// Console output that a closed pipe (`trainer info X | head -1`, a log reader that went
// away) cannot turn into a panic: the write's error is dropped and the command goes on
// (a training run keeps training and saving).
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}
macro_rules! out_raw {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stdout(), $($t)*);
    }};
}
macro_rules! note {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}
use burn::tensor::backend::{AutodiffBackend, Backend};
use clap::{Parser, Subcommand};
use lora_core::{AdapterFormat, AdapterSet, ModuleIndex, ReadOptions, SaveDtype};
use sd_pipeline::{decode, denoise_masked, grid, img2img_latents, init_image_size, initial_latents, inpaint_latents, latents_from_noise, save_png, GenerateOptions};
use sd_pipeline::load_components;
use trainer::train::{resume_on, train_on, StepInfo};
use trainer::TrainConfig;

#[derive(Parser)]
#[command(
    name = "trainer",
    version,
    about = "LoRA training for Stable Diffusion 1.x / 2.x and SDXL",
    after_help = "Backend: CUDA (built with `--features cuda`) when an NVIDIA driver is present, then a wgpu GPU \
                  (built with `--features vulkan`, `metal` or `wgpu`), else the CPU; SD_LORA_DEVICE=cpu|cuda|wgpu picks one."
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Run the UNet's and VAE's convolutions in cuDNN on CUDA (needs libcudnn 9 on the
    /// library path; falls back to burn's kernels per call when missing). Also
    /// `SD_LORA_CUDNN=1`.
    #[arg(long, global = true)]
    cudnn: bool,
    /// Run the large matmuls on CUDA (linear layers, attention backward) in cuBLAS instead
    /// of burn's kernels; falls back per call. Also `SD_LORA_CUBLAS=1`; the smallest routed
    /// matmul is `SD_LORA_CUBLAS_MIN_GFLOP` (default 4), or `SD_LORA_CUBLAS_TALL_MIN_GFLOP`
    /// (default 0.25) for one of `SD_LORA_CUBLAS_TALL_ROWS` (default 1024) rows or more.
    #[arg(long, global = true)]
    cublas: bool,
    /// How cuDNN / cuBLAS calls are ordered with burn's kernels on CUDA: `device` (the GPU
    /// orders them, no host wait; the default) or `host` (the host waits for the GPU around
    /// each call; the default with --burn-kernels); see lora_core::kernels::VendorSync.
    /// Also `SD_LORA_VENDOR_SYNC`.
    #[arg(long, global = true, value_name = "host|device")]
    vendor_sync: Option<lora_core::kernels::VendorSync>,
    /// Compute attention's softmax on CUDA in one fused kernel instead of burn's ops (one
    /// pass over the scores instead of several; on wgpu too, there only when named). Also
    /// `SD_LORA_FUSED_SOFTMAX=1`.
    #[arg(long, global = true)]
    fused_softmax: bool,
    /// Run attention (forward and backward) on CUDA in the flash-attention kernels (CubeCL
    /// tensor-core tiles; the score matrix is never stored) for bf16 / f16 models; other
    /// dtypes keep the blockwise path. Also `SD_LORA_FLASH_ATTENTION=1`;
    /// `SD_LORA_FLASH_SHARED_KIB` (default 48) sets the kernels' shared memory per cube and
    /// `SD_LORA_FLASH_PREFETCH=1` double-buffers their loads in registers. On wgpu only when
    /// named, and where CubeCL reaches the GPU's matrix tiles (`vulkan` / `metal` builds).
    #[arg(long, global = true)]
    flash_attention: bool,
    /// Run attention (forward and backward) on CUDA in cuDNN's fused attention engines, the
    /// kernels PyTorch uses, where they take the problem (bf16 / f16; backward passes over
    /// key counts that are not multiples of 128, such as the 77-token cross-attention, carry
    /// cudnn-frontend's padding mask, which `SD_LORA_CUDNN_PADDED_BACKWARD=0` leaves to the
    /// flash kernels or, without them, the blockwise path); the rest, and any cuDNN refusal,
    /// go to the flash-attention kernels.
    /// Needs cuDNN 9.6 or later. Also `SD_LORA_CUDNN_ATTENTION=1`.
    #[arg(long, global = true)]
    cudnn_attention: bool,
    /// With --flash-attention, use the flash kernels only for attention over at most this
    /// many keys; longer attention (SD1.5's 4096-token self-attention at 512 px) takes the
    /// blockwise path (cuBLAS products, fused softmax). Also `SD_LORA_FLASH_MAX_KEYS`.
    #[arg(long, global = true, value_name = "KEYS")]
    flash_max_keys: Option<usize>,
    /// Run GroupNorm (+ SiLU) and LayerNorm forward and backward on CUDA in our fused
    /// kernels (two passes over the activation each way instead of burn's chain of
    /// reductions and elementwise ops; on wgpu too, there only when named). Also
    /// `SD_LORA_FUSED_GROUP_NORM=1`.
    #[arg(long, global = true)]
    fused_group_norm: bool,
    /// On CUDA, run the matmuls that cuBLAS does not take (all of them without `--cublas`)
    /// in burn's autotuned kernels instead of one fixed kernel: burn compiles and times ~29
    /// kernels for each new matmul shape, minutes on a first run. Also
    /// `SD_LORA_FIXED_MATMUL=0`.
    #[arg(long, global = true)]
    tuned_matmul: bool,
    /// On CUDA, run each LoRA linear layer (frozen base, active adapter without dropout)
    /// as one operation forward and one backward, instead of about twenty operations of
    /// burn's fusion stream per training step; with the fixed matmul or cuBLAS. Also
    /// `SD_LORA_FUSED_LORA_LINEAR=1`.
    #[arg(long, global = true)]
    fused_lora_linear: bool,
    /// On CUDA, every fast path at once: --cudnn --cublas --vendor-sync device
    /// --fused-softmax --flash-attention --cudnn-attention --fused-group-norm
    /// --fused-lora-linear (each falls back per call where it does not apply). The default
    /// (kept as a flag for scripts); turn one off with its variable set to 0, e.g.
    /// `SD_LORA_CUDNN_ATTENTION=0`. Also `SD_LORA_FAST_KERNELS=1`.
    #[arg(long, global = true, conflicts_with = "burn_kernels")]
    fast_kernels: bool,
    /// On CUDA, start from burn's own kernels (with the fixed matmul) instead of every fast
    /// path; the flags above then turn single fast paths on again. For comparisons and as a
    /// way out should a fast path misbehave on a GPU. Also `SD_LORA_FAST_KERNELS=0`.
    #[arg(long, global = true)]
    burn_kernels: bool,
}

/// Environment variable `name` as a switch: `Some(true)` for `1` / `true`, `Some(false)`
/// for `0` / `false`, `None` when unset or empty.
fn env_switch(name: &str) -> Result<Option<bool>> {
    parse_switch(name, std::env::var(name).ok().as_deref())
}

/// [`env_switch`] on the variable's value (`None`: unset), apart so that tests need not
/// change the process environment.
fn parse_switch(name: &str, value: Option<&str>) -> Result<Option<bool>> {
    match value {
        None | Some("") => Ok(None),
        Some(v) if v == "1" || v.eq_ignore_ascii_case("true") => Ok(Some(true)),
        Some(v) if v == "0" || v.eq_ignore_ascii_case("false") => Ok(Some(false)),
        Some(v) => anyhow::bail!("{name}={v}: expected 1 or 0 (true or false)"),
    }
}

/// The kernels of `--burn-kernels`: burn's, but the fixed matmul (burn's autotuning of each
/// new matmul shape made the first SD1.5 step take minutes; docs/benchmarks.md).
fn burn_kernels() -> lora_core::kernels::KernelSettings {
    lora_core::kernels::KernelSettings { fixed_matmul: true, ..Default::default() }
}

/// The kernel switches from the flags and `SD_LORA_*` variables: every fast path
/// ([`KernelSettings::fast`](lora_core::kernels::KernelSettings::fast), the default since
/// they passed their checks on an H200 on 2026-12-04), or with `--burn-kernels` (or
/// `SD_LORA_FAST_KERNELS=0`) burn's kernels but the fixed matmul; a flag turns its switch
/// on, a variable sets it either way.
fn kernel_settings(cli: &Cli) -> Result<lora_core::kernels::KernelSettings> {
    use lora_core::kernels::KernelSettings;
    let fast_variable = env_switch("SD_LORA_FAST_KERNELS")?;
    if cli.fast_kernels && fast_variable == Some(false) {
        anyhow::bail!("--fast-kernels and SD_LORA_FAST_KERNELS=0 contradict each other: drop one");
    }
    if cli.burn_kernels && fast_variable == Some(true) {
        anyhow::bail!("--burn-kernels and SD_LORA_FAST_KERNELS=1 contradict each other: drop one");
    }
    let fast = !cli.burn_kernels && fast_variable != Some(false);
    let mut k = if fast { KernelSettings::fast() } else { burn_kernels() };
    let switch = |flag: bool, name: &str, base: bool| -> Result<bool> { Ok(flag || env_switch(name)?.unwrap_or(base)) };
    k.cudnn = switch(cli.cudnn, "SD_LORA_CUDNN", k.cudnn)?;
    k.cublas = switch(cli.cublas, "SD_LORA_CUBLAS", k.cublas)?;
    k.fused_softmax = switch(cli.fused_softmax, "SD_LORA_FUSED_SOFTMAX", k.fused_softmax)?;
    k.flash_attention = switch(cli.flash_attention, "SD_LORA_FLASH_ATTENTION", k.flash_attention)?;
    k.cudnn_attention = switch(cli.cudnn_attention, "SD_LORA_CUDNN_ATTENTION", k.cudnn_attention)?;
    k.fused_group_norm = switch(cli.fused_group_norm, "SD_LORA_FUSED_GROUP_NORM", k.fused_group_norm)?;
    k.fixed_matmul = !cli.tuned_matmul && env_switch("SD_LORA_FIXED_MATMUL")?.unwrap_or(k.fixed_matmul);
    k.fused_concat = env_switch("SD_LORA_FUSED_CONCAT")?.unwrap_or(k.fused_concat);
    k.fused_lora_linear = switch(cli.fused_lora_linear, "SD_LORA_FUSED_LORA_LINEAR", k.fused_lora_linear)?;
    k.vendor_sync = match (cli.vendor_sync, std::env::var("SD_LORA_VENDOR_SYNC")) {
        (Some(mode), _) => mode,
        (None, Ok(value)) if !value.is_empty() => value.parse().map_err(|e| anyhow::anyhow!("SD_LORA_VENDOR_SYNC={value}: {e}"))?,
        _ => k.vendor_sync,
    };
    Ok(k)
}

/// The kernel switches on burn's wgpu backend: burn's kernels (and the fused concatenation,
/// a plain copy kernel), plus those of our CubeCL kernels that a flag or `SD_LORA_*`
/// variable turns on by name: the fused softmax, flash attention (where the device has
/// matrix tiles; else the blockwise path), the fused norms, the fixed matmul. They passed
/// their tests on Mesa's lavapipe but have not been timed on a GPU without CUDA, so unlike
/// on CUDA none is on by default (`--burn-kernels` and `--tuned-matmul` are what runs
/// anyway). Also returns the flags and variables set that do not apply there (cuDNN,
/// cuBLAS and their ordering, `--fast-kernels`, the one-op LoRA layers, which build on
/// CUDA's routes), for a note.
fn portable_kernel_settings(cli: &Cli) -> Result<(lora_core::kernels::KernelSettings, Vec<&'static str>)> {
    let mut k = lora_core::kernels::KernelSettings::default();
    let on = |flag: bool, name: &str| -> Result<bool> { Ok(flag || env_switch(name)? == Some(true)) };
    k.fused_softmax = on(cli.fused_softmax, "SD_LORA_FUSED_SOFTMAX")?;
    k.flash_attention = on(cli.flash_attention, "SD_LORA_FLASH_ATTENTION")?;
    k.fused_group_norm = on(cli.fused_group_norm, "SD_LORA_FUSED_GROUP_NORM")?;
    k.fixed_matmul = env_switch("SD_LORA_FIXED_MATMUL")? == Some(true);
    k.fused_concat = env_switch("SD_LORA_FUSED_CONCAT")?.unwrap_or(k.fused_concat);
    let mut ignored = Vec::new();
    for (set, name) in [
        (on(cli.cudnn, "SD_LORA_CUDNN")?, "--cudnn"),
        (on(cli.cublas, "SD_LORA_CUBLAS")?, "--cublas"),
        (on(cli.cudnn_attention, "SD_LORA_CUDNN_ATTENTION")?, "--cudnn-attention"),
        (cli.vendor_sync.is_some() || std::env::var("SD_LORA_VENDOR_SYNC").is_ok_and(|v| !v.is_empty()), "--vendor-sync"),
        (on(cli.fused_lora_linear, "SD_LORA_FUSED_LORA_LINEAR")?, "--fused-lora-linear"),
        (on(cli.fast_kernels, "SD_LORA_FAST_KERNELS")?, "--fast-kernels"),
    ] {
        if set {
            ignored.push(name);
        }
    }
    Ok((k, ignored))
}

// Parsed once per run: the size difference of the variants is immaterial.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Train a LoRA (defaults: the built-in tiny model and demo images).
    Train {
        /// A TOML configuration (see docs/config.md).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override a setting, e.g. `--set train.learning_rate=3e-4` (a table's key too:
        /// `--set train.lr_scheduler_args.T_max=1000`); repeatable.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Continue from a training state (the `state` folder in an earlier run's
        /// output_dir), e.g. after Ctrl-C or to raise train.max_train_steps.
        #[arg(long, value_name = "DIR")]
        resume: Option<PathBuf>,
        /// Start over an earlier run in output_dir: replace its LoRA, state, metrics and
        /// samples (and let output.save_last_n_* remove its saves). Without it such a run
        /// is refused, so that nothing trained is lost by accident.
        #[arg(long)]
        overwrite: bool,
    },
    /// Generate images from prompts, optionally with LoRAs.
    Generate {
        /// `tiny`, `tiny-sdxl`, a diffusers folder or a single-file checkpoint.
        #[arg(long, default_value = "tiny")]
        model: String,
        /// Seed of the tiny model's weights.
        #[arg(long, default_value_t = 0)]
        tiny_seed: u64,
        /// Prompts, one image each (or --images-per-prompt).
        #[arg(long = "prompt", required_unless_present = "prompt_file")]
        prompts: Vec<String>,
        /// Prompts from an sd-scripts prompt file instead (as kohya's `sample_prompts`:
        /// `.txt` lines with their own `--n --w --h --d --l --s --ss` options, `.toml`
        /// `[[prompt.subset]]` tables or `.json`); unset options take this command's values.
        #[arg(long, conflicts_with_all = ["prompts", "init_image", "init_latents", "save_latents"])]
        prompt_file: Option<PathBuf>,
        /// Images per prompt (diffusers' `num_images_per_prompt`, A1111's batch size), each
        /// from its own noise; all are sampled in one batch and laid out in the grid prompt
        /// by prompt.
        #[arg(long, default_value_t = 1, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=64))]
        images_per_prompt: usize,
        /// Negative prompt.
        #[arg(long, default_value = "")]
        negative_prompt: String,
        /// LoRA files as FILE[:STRENGTH[:TE_STRENGTH]][:lbw=BLOCK_WEIGHTS] (the text encoders at their own strength where given; lbw= a weight per UNet block, e.g. OUTALL or 17 numbers, as A1111's LoRA Block Weight); repeatable (kohya or diffusers/PEFT layout, LoCon,
        /// DoRA, LyCORIS LoHa / LoKr / Diag-OFT / BOFT, kohya OFT). They are merged into the weights (sums in f32, rounded
        /// once), as A1111 and ComfyUI apply LoRAs.
        #[arg(long)]
        lora: Vec<sd_model::lora::LoraFile>,
        /// Keep the LoRAs as adapters beside the weights instead of merging them in (slower:
        /// each adapted layer runs two more matmuls per step).
        #[arg(long, requires = "lora")]
        lora_unmerged: bool,
        /// Precision of the UNet and the text encoder: `f32`, `bf16` or `f16` (on a GPU the
        /// half precisions run the tensor cores; the VAE stays f32). LoRAs are merged first,
        /// in f32.
        #[arg(long, default_value = "f32")]
        precision: trainer::device_check::Precision,
        /// Sampler (ddim, pndm, euler, euler_a, dpmpp_2m, dpmpp_2m_karras, dpmsingle, ddpm, ...).
        #[arg(long, default_value = "dpmpp_2m")]
        sampler: String,
        /// Sampling steps.
        #[arg(long, default_value_t = 25)]
        steps: usize,
        /// Guidance scale (1 or less: no guidance, the prompt alone, as diffusers).
        #[arg(long, default_value_t = 7.5, value_parser = parse_finite)]
        cfg: f32,
        /// Seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Width in pixels [default: the model's size: 1024 for SDXL, 768 for SD2.1
        /// v-prediction, 512 for SD1.x, 64 for the tiny models; with --init-image the
        /// image's, rounded down to the model's multiple]
        #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
        width: Option<usize>,
        /// Height in pixels [default: as --width]
        #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
        height: Option<usize>,
        /// CLIP skip: 1 uses the text encoder's last layer, 2 the penultimate (A1111's "Clip
        /// skip"; anime models and LoRAs trained with `model.clip_skip = 2` want 2). SDXL
        /// always reads the penultimate layers and takes only 1.
        #[arg(long, default_value_t = 1, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
        clip_skip: usize,
        /// The LoRA's `model.max_token_length`: 75, or 150 / 225 to lay prompts out in 2 or 3
        /// rows of 75 tokens as its training did. Longer prompts get more rows anyway, as in
        /// A1111 (up to 600 tokens). Prompts read A1111's emphasis: (word), [word],
        /// (word:1.3), BREAK.
        #[arg(long, default_value_t = 75, value_parser = parse_max_token_length)]
        max_token_length: usize,
        /// Output image, PNG (or another format by its extension: .jpg, .webp, ...; a grid
        /// when there are several prompts). An existing file is refused without
        /// --overwrite [default: outputs/generate.png, or the next free
        /// outputs/generate-N.png]
        #[arg(long)]
        out: Option<PathBuf>,
        /// Write over an existing --out or --save-latents file.
        #[arg(long)]
        overwrite: bool,
        /// Start from these latents (safetensors, tensor `latents` [N,4,h,w] f32/f16/bf16, standard
        /// normal) instead of seeded noise.
        #[arg(long, conflicts_with = "init_image")]
        init_latents: Option<PathBuf>,
        /// img2img: start from this image (PNG, JPEG, WebP, ...) instead of noise, encoded
        /// by the VAE and noised to `--strength` (diffusers' img2img pipeline). It is sampled
        /// at its own size rounded down to the model's multiple (64 px for SD), or stretched
        /// to --width / --height where given; with several prompts each starts from it.
        #[arg(long)]
        init_image: Option<PathBuf>,
        /// With --init-image: how far the image is noised, the share of the --steps steps
        /// that run (0 < strength <= 1; 1 ignores the image but for its size, lower keeps
        /// more of it) [default: 0.8, with --mask 1]
        #[arg(long, requires = "init_image")]
        strength: Option<f64>,
        /// Inpainting, with --init-image: repaint where this mask image is white and keep the
        /// image where it is black (diffusers' inpainting pipeline with the model's own UNet:
        /// the kept part is blended back in after every step). Stretched to the image's size.
        #[arg(long, requires = "init_image")]
        mask: Option<PathBuf>,
        /// Write the final latents (before VAE decoding) to this safetensors file.
        #[arg(long)]
        save_latents: Option<PathBuf>,
        /// Decode with this VAE instead of the model's own (as A1111's SD VAE setting): a
        /// diffusers VAE folder, or a `.safetensors` file (diffusers or original layout, e.g.
        /// vae-ft-mse-840000-ema-pruned.safetensors).
        #[arg(long)]
        vae: Option<PathBuf>,
        /// Textual-inversion embedding files (.safetensors, or A1111's older .pt; repeatable): each file's name
        /// without the extension, written in a prompt, stands for its vectors (A1111's
        /// embeddings, e.g. a negative embedding in --negative-prompt). A folder (A1111's
        /// embeddings/, subfolders too) loads the files whose names the prompts use.
        #[arg(long = "embedding")]
        embeddings: Vec<PathBuf>,
        /// Hires fix (A1111's Hires. fix, kohya's --highres_fix_scale): make each image first
        /// at this share of its size (e.g. 0.5), where the model composes well, then upscale
        /// it and refine it at the full size by img2img.
        #[arg(long, conflicts_with_all = ["init_image", "init_latents", "prompt_file"])]
        hires_scale: Option<f64>,
        /// Steps of the hires fix's first pass (--steps is the second's).
        #[arg(long, default_value_t = 28, requires = "hires_scale", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
        hires_steps: usize,
        /// Denoising strength of the hires fix's second pass: the share of --steps that run
        /// on the upscaled image (0 < strength <= 1).
        #[arg(long, default_value_t = 0.7, requires = "hires_scale")]
        hires_strength: f64,
        /// Upscale the first pass's latents (bicubic) instead of its images (Lanczos).
        #[arg(long, requires = "hires_scale")]
        hires_latents: bool,
    },
    /// Bake LoRAs into a checkpoint: a diffusers folder gives a folder, a single file a file.
    Merge {
        /// The base checkpoint (diffusers folder or single .safetensors file).
        #[arg(long)]
        model: PathBuf,
        /// LoRA files as FILE[:STRENGTH[:TE_STRENGTH]][:lbw=BLOCK_WEIGHTS] (the text encoders at their own strength where given; lbw= a weight per UNet block, e.g. OUTALL or 17 numbers, as A1111's LoRA Block Weight); repeatable.
        #[arg(long, required = true)]
        lora: Vec<sd_model::lora::LoraFile>,
        /// Output folder or .safetensors file (must not exist).
        #[arg(long)]
        out: PathBuf,
        /// Precision of the rewritten UNet / text-encoder weights (default: a diffusers folder
        /// gets f16, a single file keeps each tensor's dtype).
        #[arg(long)]
        dtype: Option<SaveDtype>,
    },
    /// Time a LoRA training step or a CFG inference step of the UNet (random weights).
    /// Prints one JSON object as the last line.
    Bench {
        /// `sd15`, `sd21`, `sdxl`, `tiny`, `tiny-sdxl` or a diffusers `unet/config.json`.
        #[arg(long, default_value = "sd15")]
        unet_config: String,
        /// Images per step.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Image side in pixels.
        #[arg(long, default_value_t = 512)]
        resolution: usize,
        /// Measured steps (after one warm-up step).
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// `cpu`, `cuda` or `wgpu` (each GPU backend needs a build with its feature:
        /// `--features cuda`; `--features vulkan`, `metal` or `wgpu`).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Precision of the frozen UNet weights: `f32`, `bf16` or `f16` (adapters stay f32).
        #[arg(long, default_value = "f32")]
        precision: String,
        /// Let burn differentiate attention, GroupNorm + SiLU, LayerNorm and GEGLU from their
        /// composed ops (keeping every intermediate) instead of with sd-model's own backward
        /// passes, to compare memory and speed.
        #[arg(long)]
        plain_autodiff: bool,
        /// Gradient checkpointing (train mode).
        #[arg(long)]
        grad_checkpointing: bool,
        /// Adapter targets: `attn` (the PyTorch anchor's) or `attn-mlp`; also `all-linear`,
        /// `conv` (kohya's LoCon set) or `ia3`, as `lora.unet_targets` names them.
        #[arg(long, default_value = "attn")]
        lora_targets: sd_model::targets::UnetTargets,
        /// The train step's optimizer: `adamw` (burn's defaults), or `lion`, `prodigy`,
        /// `adafactor`, `dadapt_adam`, `adamw_schedule_free`, `radam_schedule_free`,
        /// `prodigy_plus_schedule_free`, `came`, `ademamix`, `sgd`, `dadapt_adam_preprint`,
        /// `dadapt_lion`, `dadapt_sgd`, `dadapt_adagrad`, `dadapt_adan`, `sgd_schedule_free` with
        /// the trainer's default settings for it.
        #[arg(long, default_value = "adamw")]
        optimizer: trainer::config::Optimizer,
        /// The adapters' form: `lora`, LyCORIS' `loha` or `lokr` (rank 4 each), kohya's
        /// `oft` (4 blocks each, constraint 1e-3) or LyCORIS' `diag-oft` / `boft` (blocks of
        /// 4, BOFT's of 10: SD's widths are 5 · 2^k; no constraint), or LyCORIS' `glora`
        /// (rank 4), `ia3` (a scale per output channel) or `full` (whole weights and biases).
        #[arg(long, default_value = "lora")]
        lora_algo: lora_core::Algo,
        /// Also train LyCORIS' norm modules (as `lora.train_norm`): the GroupNorm / LayerNorm
        /// scales and shifts of the targeted blocks (`attn-mlp`: the transformers' norms).
        #[arg(long)]
        lora_train_norm: bool,
        /// `train` or `infer`.
        #[arg(long, default_value = "train")]
        mode: String,
        /// Infer mode: keep the adapters unmerged (as diffusers + peft run them) instead of
        /// merging them into the weights as `trainer generate` and the training loop's
        /// samples do.
        #[arg(long)]
        lora_unmerged: bool,
        /// CUDA: run one more, untimed step between `cuProfilerStart` and `cuProfilerStop`,
        /// so that a profiler started with its collection off records exactly one step
        /// (`ncu --profile-from-start off`, `nsys profile -c cudaProfilerApi`; see
        /// scripts/device/README.md).
        #[arg(long)]
        cuda_profiler_step: bool,
    },
    /// Time each op that has a GPU kernel of ours (GroupNorm + SiLU, LayerNorm, self- and
    /// cross-attention, the attention softmax) at SD1.5's shapes with its switch off (burn's
    /// ops) and on. Prints a markdown table, then one JSON array as the last line.
    BenchOps {
        /// Images per batch.
        #[arg(long, default_value_t = 8)]
        batch: usize,
        /// Image side in pixels (the top level's activations are a side of resolution / 8).
        #[arg(long, default_value_t = 512)]
        resolution: usize,
        /// Timed repetitions per op and setting (after one warm-up).
        #[arg(long, default_value_t = 5)]
        steps: usize,
        /// `cpu`, `cuda` or `wgpu` (each GPU backend needs a build with its feature:
        /// `--features cuda`; `--features vulkan`, `metal` or `wgpu`).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// dtype of the activations: `f32`, `bf16` or `f16` (flash attention needs bf16/f16).
        #[arg(long, default_value = "f32")]
        precision: String,
    },
    /// Check a backend against the CPU: output and one LoRA adapter's gradients of a
    /// random-weight UNet, as relative errors. Prints one JSON object as the last line and
    /// fails when an error is over the tolerance.
    DeviceCheck {
        /// `sd15`, `sd21`, `sdxl`, `tiny`, `tiny-sdxl` or a diffusers `unet/config.json`.
        #[arg(long, default_value = "tiny")]
        unet_config: String,
        /// Images in the batch.
        #[arg(long, default_value_t = 1)]
        batch: usize,
        /// Image side in pixels.
        #[arg(long, default_value_t = 64)]
        resolution: usize,
        /// Backend under test: `cuda` (needs `--features cuda`), `wgpu` (needs `--features
        /// wgpu`) or `cpu` (the CPU against itself).
        #[arg(long, default_value = "cuda")]
        device: String,
        /// Frozen-weight precision of the tested model: `f32`, `bf16` or `f16` (the reference is f32).
        #[arg(long, default_value = "f32")]
        precision: trainer::device_check::Precision,
        /// Gradient checkpointing on the tested side.
        #[arg(long)]
        grad_checkpointing: bool,
        /// Pass threshold on the relative errors (default: 2e-3 for f32, 3e-2 f16, 1e-1 bf16).
        #[arg(long)]
        tolerance: Option<f64>,
        /// Module path of the adapter whose gradients are compared (default: the first one).
        #[arg(long)]
        adapter: Option<String>,
        /// Seed of the weights and inputs.
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Convert a kohya sd-scripts training config (its `--config_file` TOML, also written by
    /// the kohya_ss GUI) into this trainer's config, e.g. `trainer import-kohya
    /// my_lora.toml --out my-style.toml`, then `trainer train --config my-style.toml`.
    /// Options with no effect here, and approximations, are listed as notes; options that
    /// would train differently and have no counterpart are errors naming them.
    ImportKohya {
        /// The sd-scripts config (`.toml`).
        input: PathBuf,
        /// Where to write this trainer's config (must not exist); without it, the config is
        /// printed.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Convert a LoRA file between the kohya and diffusers/PEFT layouts (a LyCORIS LoHa / LoKr file becomes the plain LoRA with its update).
    Convert {
        /// Input LoRA.
        input: PathBuf,
        /// Output LoRA.
        output: PathBuf,
        /// Target layout: kohya or peft.
        #[arg(long)]
        to: AdapterFormat,
        /// Tensor precision: f32, f16 or bf16.
        #[arg(long, default_value = "f16")]
        dtype: SaveDtype,
    },
    /// Write the textual-inversion embeddings bundled in a LoRA file (`bundle_emb.NAME.*`,
    /// from pivotal tuning) as embedding files `OUT/NAME.safetensors`, for ComfyUI
    /// (`embedding:NAME`), which does not read bundles, or an `embeddings/` folder.
    UnbundleEmbeddings {
        /// The LoRA file.
        lora: PathBuf,
        /// Folder to write the embedding files to (created if missing; existing files are
        /// not overwritten).
        #[arg(long)]
        out: PathBuf,
        /// Tensor precision: f32, f16 or bf16.
        #[arg(long, default_value = "f16")]
        dtype: SaveDtype,
    },
    /// Change the rank of a trained LoRA (kohya's resize_lora.py): each adapter keeps its
    /// update's largest singular values, at a fixed rank or, with --dynamic-method, at the
    /// smallest rank that keeps a share of it. A LyCORIS full fine-tuning file (algo=full)
    /// becomes a LoRA this way too, without its bias differences (named in the output).
    Resize {
        /// Input LoRA (kohya or diffusers/PEFT layout).
        input: PathBuf,
        /// Output LoRA (must not exist yet).
        output: PathBuf,
        /// New rank of linear layers and 1x1 convolutions; with --dynamic-method, the
        /// largest rank kept. Never above an adapter's own rank.
        #[arg(long)]
        rank: usize,
        /// New rank of 3x3 convolutions (LoCon); default: --rank.
        #[arg(long)]
        conv_rank: Option<usize>,
        #[command(flatten)]
        rule: RankRuleArgs,
        #[command(flatten)]
        output_args: LoraOutputArgs,
        /// Print what each adapter kept.
        #[arg(long)]
        verbose: bool,
        /// Keep each adapter's first --rank ranks instead of its largest singular values:
        /// the nested LoRAs of a DyLoRA (lora.dylora_unit; kohya's
        /// extract_lora_from_dylora.py), alpha kept as it is.
        #[arg(long, conflicts_with = "dynamic_method")]
        truncate: bool,
    },
    /// Merge LoRA files into one LoRA, each at its strength (kohya's svd_merge_lora.py;
    /// without --rank exactly, the ranks concatenated, as merge_lora.py merges LoRAs).
    MergeLoras {
        /// LoRA files as FILE[:STRENGTH[:TE_STRENGTH]][:lbw=BLOCK_WEIGHTS] (the text encoders at their own strength where given; lbw= a weight per UNet block, e.g. OUTALL or 17 numbers, as A1111's LoRA Block Weight) (kohya or diffusers/PEFT layout; LyCORIS LoHa / LoKr
        /// enter as the LoRA of their update; DoRA cannot be merged).
        #[arg(required = true)]
        loras: Vec<sd_model::lora::LoraFile>,
        /// Output LoRA (must not exist yet).
        #[arg(long)]
        out: PathBuf,
        /// Bring the merged update of each linear layer and 1x1 convolution to this rank
        /// (the best approximation, from its singular values; alpha = rank, as kohya's
        /// script writes it); without it the merge is exact, at the summed ranks.
        #[arg(long)]
        rank: Option<usize>,
        /// Rank of 3x3 convolutions (LoCon); default: --rank.
        #[arg(long, requires = "rank")]
        conv_rank: Option<usize>,
        #[command(flatten)]
        rule: RankRuleArgs,
        #[command(flatten)]
        output_args: LoraOutputArgs,
    },
    /// Extract a LoRA from a fine-tuned model and its base (kohya's
    /// extract_lora_from_models.py): each layer's weight difference at a low rank, from
    /// its largest singular values (alpha = rank). The text encoders are extracted only
    /// where they differ by more than --min-diff.
    Extract {
        /// The base model (diffusers folder or single .safetensors file).
        #[arg(long)]
        base: PathBuf,
        /// The fine-tuned model of the same family; the LoRA is its difference from the base.
        #[arg(long)]
        tuned: PathBuf,
        /// Output LoRA (must not exist yet).
        #[arg(long)]
        out: PathBuf,
        /// Rank of linear layers and 1x1 convolutions (kohya's --dim); with
        /// --dynamic-method, the largest rank kept.
        #[arg(long, default_value_t = 4, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
        rank: usize,
        /// Also extract the UNet's ResNet blocks and samplers, their 3x3 convolutions at this
        /// rank (LoCon; kohya's --conv_dim).
        #[arg(long, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
        conv_rank: Option<usize>,
        #[command(flatten)]
        rule: RankRuleArgs,
        /// Clamp the LoRA's values to this quantile of them, and its negative (kohya's
        /// --clamp_quantile; in (0, 1]).
        #[arg(long, default_value_t = lora_core::extract::DEFAULT_CLAMP_QUANTILE)]
        clamp_quantile: f64,
        /// Keep the values unclamped (the best rank-N approximation of each difference).
        #[arg(long, conflicts_with = "clamp_quantile")]
        no_clamp: bool,
        /// Extract the text encoders only if some weight differs by more than this (kohya's
        /// --min_diff).
        #[arg(long, default_value_t = lora_core::extract::DEFAULT_MIN_DIFF)]
        min_diff: f32,
        /// Power iterations of the randomized SVD; more come closer to the exact SVD (4
        /// is within 0.1% of its error on fine-tunes' flat spectra).
        #[arg(long, default_value_t = lora_core::extract::DEFAULT_POWER_ITERATIONS)]
        svd_iterations: usize,
        /// Precision the models are loaded in: auto (f16 where both checkpoints store their
        /// UNet and text encoders in f16, else f32), f32 (exact for any checkpoint), f16 (half
        /// the memory, exact for f16 checkpoints: an SDXL pair in ~13 GiB instead of ~27) or
        /// bf16.
        #[arg(long, default_value = "auto", value_parser = parse_load_precision)]
        load_precision: LoadPrecision,
        /// Output layout: kohya or peft.
        #[arg(long, default_value = "kohya")]
        to: AdapterFormat,
        /// Tensor precision: f32, f16 or bf16.
        #[arg(long, default_value = "f16")]
        dtype: SaveDtype,
        /// Write only kohya's ss_* keys, not the SAI model spec (kohya's --no_metadata).
        #[arg(long)]
        no_metadata: bool,
        /// Print what each adapter kept.
        #[arg(long)]
        verbose: bool,
    },
    /// Show what a LoRA file holds (kohya's show_metadata.py and check_lora_weights.py):
    /// layout, modules per component with kind, rank and alpha, the base model, what its
    /// trainer recorded (steps, learning rates, ...) and the captions' most frequent tags;
    /// or, for a checkpoint, its family, components, dtypes and prediction type.
    Info {
        /// The LoRA file (kohya, LyCORIS or diffusers/PEFT layout), or a checkpoint (single
        /// file or diffusers folder).
        file: PathBuf,
        /// Tags to list from the captions' counts (kohya's ss_tag_frequency).
        #[arg(long, default_value_t = 20)]
        tags: usize,
        /// Also list every module with its tensors' shapes.
        #[arg(long)]
        verbose: bool,
        /// Print all metadata keys as they are.
        #[arg(long)]
        metadata: bool,
        /// Print one JSON object instead (layout, dtypes, modules, metadata).
        #[arg(long, conflicts_with_all = ["verbose", "metadata"])]
        json: bool,
    },
    /// Merge checkpoints tensor by tensor, Σ ratio · weights (kohya's merge_models.py,
    /// A1111's checkpoint merger): a weighted average (A:0.5 B:0.5; equal shares without
    /// ratios), or add difference A + m·(B − C) as A:1 B:m C:-m.
    MergeModels {
        /// Checkpoints of one architecture as PATH[:RATIO], all single files or all diffusers
        /// folders: all with ratios or none (then 1/N each). The first model's keys, dtypes,
        /// metadata (and a folder's other files) are kept.
        #[arg(required = true, num_args = 2..)]
        models: Vec<String>,
        /// The merged checkpoint (must not exist).
        #[arg(long)]
        out: PathBuf,
        /// Merge the UNet only; the VAE and text encoders are the first model's.
        #[arg(long)]
        unet_only: bool,
        /// Tensor precision of the merged weights (default: the first model's dtypes).
        #[arg(long)]
        dtype: Option<SaveDtype>,
    },
    /// Convert a checkpoint between a single .safetensors file (as A1111 / ComfyUI use
    /// them) and a diffusers folder, either way (kohya's convert_diffusers20_original_sd.py):
    /// SD1.x, SD2.x and SDXL; configs, tokenizers and scheduler written for a folder. An old
    /// PyTorch .ckpt / .pt becomes a .safetensors file (--out X.safetensors) or a folder.
    ConvertModel {
        /// A single-file checkpoint (becomes a folder), a diffusers folder (becomes a file), or
        /// a PyTorch pickle (.ckpt, .pt, .pth, .bin).
        model: PathBuf,
        /// The converted checkpoint (must not exist).
        #[arg(long)]
        out: PathBuf,
        /// Tensor precision (default: each tensor's own).
        #[arg(long)]
        dtype: Option<SaveDtype>,
        /// Take the UNet's weights from the file's EMA copy (model_ema.*).
        #[arg(long)]
        ema: bool,
        /// What the model predicts: epsilon or v_prediction (default: what the source says,
        /// a folder's scheduler config or a file's v_pred key or model spec; an unmarked
        /// SD2.x file's weights, as ComfyUI reads them; else epsilon).
        #[arg(long)]
        prediction_type: Option<sd_model::convert::Prediction>,
        /// Write this VAE instead of the model's (a .safetensors file in any layout, or a
        /// diffusers VAE folder), e.g. vae-ft-mse-840000-ema-pruned.safetensors.
        #[arg(long)]
        vae: Option<PathBuf>,
    },
}

/// How `resize`, `merge-loras` and `extract` choose each adapter's rank below `--rank`.
#[derive(clap::Args)]
struct RankRuleArgs {
    /// Choose each adapter's rank (at most --rank) from its update's singular values:
    /// sv_fro (keep this share of the update's Frobenius norm), sv_cumulative (of the
    /// singular values' sum) or sv_ratio (keep values at least 1/PARAM of the largest).
    #[arg(long, requires_all = ["dynamic_param", "rank"])]
    dynamic_method: Option<String>,
    /// The parameter of --dynamic-method, e.g. 0.9 for sv_fro.
    #[arg(long, requires = "dynamic_method")]
    dynamic_param: Option<f64>,
}

impl RankRuleArgs {
    /// The rule: fixed ranks unless a dynamic method is given.
    fn rule(&self) -> Result<lora_core::resize::RankRule> {
        Ok(match (&self.dynamic_method, self.dynamic_param) {
            (Some(method), Some(param)) => lora_core::resize::RankRule::parse(method, param)?,
            _ => lora_core::resize::RankRule::Fixed,
        })
    }

    /// The settings for `rank` and `conv_rank` (default: `rank`).
    fn settings(&self, rank: usize, conv_rank: Option<usize>) -> Result<lora_core::resize::ResizeSettings> {
        Ok(lora_core::resize::ResizeSettings { rank, conv_rank: conv_rank.unwrap_or(rank), rule: self.rule()? })
    }
}

/// The layout and precision of a LoRA file a command writes.
#[derive(clap::Args)]
struct LoraOutputArgs {
    /// Output layout: kohya or peft; default: the (first) input's.
    #[arg(long)]
    to: Option<AdapterFormat>,
    /// Tensor precision: f32, f16 or bf16.
    #[arg(long, default_value = "f16")]
    dtype: SaveDtype,
}

/// What `trainer train` shows per step: a progress bar on a terminal; where stderr is a
/// file or a pipe (a log of a remote run), a plain line at the first and last step and
/// every [`PLAIN_LINE_EVERY_S`] seconds, so that the log stays readable.
struct ProgressView {
    bar: Option<indicatif::ProgressBar>,
    last_line: Option<Instant>,
    /// The first step this process showed and its time: the rate counts from there, so
    /// that loading, warm-up and the samples of step 0 do not enter the ETA.
    first: Option<(usize, f64)>,
}

/// Seconds between the plain progress lines of a log.
const PLAIN_LINE_EVERY_S: f64 = 10.0;

impl ProgressView {
    fn new(total: usize) -> Self {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let style = indicatif::ProgressStyle::with_template("[{bar:30}] {pos}/{len} {msg} ETA {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("#>.");
            indicatif::ProgressBar::new(total as u64).with_style(style)
        });
        Self { bar, last_line: None, first: None }
    }

    /// Shows step `info`; `false` once Ctrl-C asked to stop.
    fn step(&mut self, info: &StepInfo) -> bool {
        let (first_step, first_s) = *self.first.get_or_insert((info.step, info.elapsed_s));
        let rate = (info.step > first_step && info.elapsed_s > first_s).then(|| (info.step - first_step) as f64 / (info.elapsed_s - first_s));
        let message = format!("loss {:.4} lr {:.2e} {}", info.loss, info.lr, rate.map_or_else(|| "-- it/s".to_string(), |r| format!("{r:.1} it/s")));
        match &self.bar {
            Some(bar) => {
                if self.last_line.is_none() {
                    // The first step shown (a resumed run's too): the bar's rate starts here.
                    bar.set_position(info.step as u64);
                    bar.reset_eta();
                }
                bar.set_length(info.total as u64);
                bar.set_message(message);
                bar.set_position(info.step as u64);
                if info.step == info.total {
                    bar.finish();
                }
                self.last_line = Some(Instant::now());
            }
            None => {
                let due = self.last_line.is_none_or(|t| t.elapsed().as_secs_f64() >= PLAIN_LINE_EVERY_S);
                if due || info.step == info.total {
                    // As the bar's clock reads (`1d 02:03:04`), not a count of seconds.
                    let eta = rate
                        .and_then(|r| std::time::Duration::try_from_secs_f64((info.total - info.step) as f64 / r).ok())
                        .map_or_else(|| "--".to_string(), |d| indicatif::FormattedDuration(d).to_string());
                    note!("step {}/{} {message} ETA {eta}", info.step, info.total);
                    self.last_line = Some(Instant::now());
                }
            }
        }
        !STOP.load(Ordering::SeqCst)
    }
}

/// Set by Ctrl-C: training saves what it has and stops at its next read of the steps'
/// losses (within about a second).
static STOP: AtomicBool = AtomicBool::new(false);

/// Refuses a new run in an output folder that holds an earlier run's outputs
/// ([`trainer::train::earlier_outputs`]), which it would replace; a resumed run writes
/// over its own. An earlier run of the built-in demo in its default folder is replaced
/// with a note (the README's first command may be run again), but not another run that
/// was written there (its saved `config.toml` names other data or another model).
fn refuse_earlier_run(config: &TrainConfig, resume: Option<&std::path::Path>) -> Result<()> {
    let dir = &config.output.output_dir;
    let same = |a: &std::path::Path, b: &std::path::Path| a.canonicalize().ok().zip(b.canonicalize().ok()).is_some_and(|(a, b)| a == b);
    if resume.and_then(|state| state.parent()).is_some_and(|parent| same(parent, dir)) {
        return Ok(());
    }
    let found = trainer::train::earlier_outputs(config);
    if found.is_empty() {
        return Ok(());
    }
    let default = TrainConfig::default();
    let is_demo = |c: &TrainConfig| c.data.train_data_dir == "demo" && c.model.pretrained == default.model.pretrained;
    let earlier_was_demo = || TrainConfig::load(Some(&dir.join("config.toml")), &[]).is_ok_and(|earlier| is_demo(&earlier));
    if is_demo(config) && *dir == default.output.output_dir && earlier_was_demo() {
        note!("note: replacing the earlier demo run in {}", dir.display());
        return Ok(());
    }
    let names: Vec<String> = found.iter().take(4).map(|p| p.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned())).collect();
    let more = if found.len() > 4 { format!(" and {} more", found.len() - 4) } else { String::new() };
    let state = dir.join("state");
    let resume_hint = if state.join("state.json").is_file() { format!("continue it with --resume {}, ", state.display()) } else { String::new() };
    anyhow::bail!(
        "output.output_dir = {} holds an earlier run ({}{more}), which this run would replace: {resume_hint}choose another output.output_dir, or pass --overwrite to start over",
        dir.display(),
        names.join(", ")
    )
}

fn run_train<B: AutodiffBackend>(config: TrainConfig, resume_from: Option<&std::path::Path>, device: &B::Device) -> Result<()> {
    let length = match config.train.max_train_epochs {
        0 => format!("{} steps", config.train.max_train_steps),
        epochs => format!("{epochs} epochs"),
    };
    let what = match config.lora.algo {
        lora_core::Algo::Lora => "LoRA",
        lora_core::Algo::Loha => "LoHa",
        lora_core::Algo::Lokr => "LoKr",
        lora_core::Algo::Oft => "OFT",
        lora_core::Algo::DiagOft => "Diag-OFT",
        lora_core::Algo::Boft => "BOFT",
        lora_core::Algo::Glora => "GLoRA",
        lora_core::Algo::Ia3 => "(IA)³",
        lora_core::Algo::Full => "fine-tuning difference (LyCORIS' full)",
        // Not an algorithm of its own (refused by the config).
        lora_core::Algo::Norm => "norm module",
    };
    // kohya's OFT's rank is its number of blocks (network_dim), Diag-OFT's the block size.
    let size = match config.lora.algo {
        lora_core::Algo::Oft => format!("{}-block", config.lora.rank),
        lora_core::Algo::DiagOft | lora_core::Algo::Boft => format!("block-size-{}", config.lora.rank),
        lora_core::Algo::Ia3 => "per-channel".to_string(),
        lora_core::Algo::Full => "full".to_string(),
        _ => format!("rank-{}", config.lora.rank),
    };
    // LyCORIS' norm modules train beside the other layers' algorithm.
    let what = if config.lora.train_norm { format!("{what} with norm modules") } else { what.to_string() };
    let what = match (config.embedding.enabled(), config.trains_adapters()) {
        (true, false) => format!("an embedding for `{}`", config.embedding.token),
        (true, true) => format!("a {size} {what} and an embedding for `{}`", config.embedding.token),
        (false, _) => format!("a {size} {what}"),
    };
    note!(
        "training {what} on `{}` with {} for {length} -> {}",
        config.model.pretrained,
        match (config.data.dataset_config.as_str(), config.data.train_data_dir.as_str()) {
            // A dataset config replaces the folders.
            ("", "demo") => "the demo images".to_string(),
            ("", dir) => dir.to_string(),
            (file, _) => format!("the dataset config {file}"),
        },
        config.output.output_dir.display()
    );
    // The data is scanned once, for the summary and the run.
    let data = trainer::train::training_datasets(&config)?;
    note!("{}", trainer::train::data_summary(&config, &data)?);
    if !config.lora.network_weights.is_empty() {
        note!("starting from the LoRA {}", config.lora.network_weights);
    }
    if config.lora.algo == lora_core::Algo::Oft && config.lora.alpha >= 1.0 {
        // kohya warns alike: the constraint `alpha · outputs` then hardly constrains.
        note!("note: with lora.algo = \"oft\" lora.alpha is the constraint per output; 1e-3 to 1e-2 is usual (it is {}), and 1 or more leaves the rotations almost unconstrained", config.lora.alpha);
    }
    let estimates = match config.train.optimizer {
        trainer::config::Optimizer::Prodigy => Some(("prodigy", "Prodigy")),
        trainer::config::Optimizer::DadaptAdam => Some(("dadapt_adam", "DAdaptAdam")),
        trainer::config::Optimizer::DadaptAdamPreprint => Some(("dadapt_adam_preprint", "DAdaptAdamPreprint")),
        trainer::config::Optimizer::DadaptLion => Some(("dadapt_lion", "DAdaptLion")),
        trainer::config::Optimizer::DadaptSgd => Some(("dadapt_sgd", "DAdaptSGD")),
        trainer::config::Optimizer::DadaptAdagrad => Some(("dadapt_adagrad", "DAdaptAdaGrad")),
        trainer::config::Optimizer::DadaptAdan => Some(("dadapt_adan", "DAdaptAdan")),
        trainer::config::Optimizer::ProdigyPlusScheduleFree => Some(("prodigy_plus_schedule_free", "Prodigy")),
        _ => None,
    };
    if let Some((key, name)) = estimates.filter(|_| config.train.learning_rate < 0.1) {
        note!(
            "note: with train.optimizer = \"{key}\" the learning rate multiplies {name}'s own step size; 1.0 is usual (it is {})",
            config.train.learning_rate
        );
    }
    if config.train.optimizer == trainer::config::Optimizer::Lion && config.train.learning_rate >= 1e-3 {
        note!(
            "note: with train.optimizer = \"lion\" every value moves by the learning rate each step; 3-10 times less than AdamW's is usual (it is {})",
            config.train.learning_rate
        );
    }
    if config.train.optimizer == trainer::config::Optimizer::Came && config.train.learning_rate >= 1e-3 {
        note!(
            "note: with train.optimizer = \"came\" the first steps move each value by about 11 times the learning rate (its instability's means start from 0); 1e-5 to 1e-4 is usual (it is {})",
            config.train.learning_rate
        );
    }
    if config.train.optimizer == trainer::config::Optimizer::ProdigyPlusScheduleFree && config.train.max_grad_norm > 0.0 {
        note!(
            "note: prodigy_plus_schedule_free clips each tensor's update itself (StableAdamW), and its authors advise against gradient clipping, which slows its estimate: consider train.max_grad_norm = 0 (it is {})",
            config.train.max_grad_norm
        );
    }
    let o = &config.output;
    if o.sample_prompts.is_empty() && (o.sample_every_n_steps > 0 || o.sample_every_n_epochs > 0 || o.sample_at_first) {
        note!("note: output.sample_prompts is empty, so no sample images are written (sample_every_n_steps, sample_every_n_epochs and sample_at_first need prompts)");
    }
    if config.train.relative_step() {
        note!(
            "note: with train.adafactor_relative_step Adafactor sets its own step size, min(1e-2, 1/sqrt(step)){}; train.learning_rate, text_encoder_lr, lr_scheduler and the warmup are not used",
            if config.train.adafactor_scale_parameter { " times each tensor's RMS" } else { "" }
        );
    }
    // A second Ctrl-C while saving falls through to the default (immediate exit).
    let _ = ctrlc::set_handler(|| {
        if STOP.swap(true, Ordering::SeqCst) {
            std::process::exit(130);
        }
        trainer::train::request_stop();
        note!("\nCtrl-C: saving the LoRA trained so far (press again to quit at once)");
    });
    let mut view = ProgressView::new(config.train.max_train_steps);
    let report = match resume_from {
        Some(dir) => {
            note!("resuming from {}", dir.display());
            let changes = trainer::train::resume_data_changes(dir, &config, &data)?;
            if !changes.is_empty() {
                note!(
                    "note: the data changed since the state was saved ({}); training goes on from the state's step and place in its epoch (the next epoch's start where the epoch is now shorter than that) with the data as it is now",
                    changes.join(", ")
                );
            }
            resume_on::<B>(&config, dir, data, device, &mut |info| view.step(info))?
        }
        None => train_on::<B>(&config, data, device, &mut |info| view.step(info))?,
    };
    // A resumed run whose earlier metrics.jsonl is gone knows no losses before its own
    // (NaN in the report): the means are of the steps with a loss.
    let known: Vec<f32> = report.losses.iter().copied().filter(|l| l.is_finite()).collect();
    // Up to 20 steps at each end, never overlapping (a short run compares its halves).
    let window = (known.len() / 2).min(20);
    let first = known.iter().take(window).sum::<f32>() / window.max(1) as f32;
    let last = known.iter().rev().take(window).sum::<f32>() / window.max(1) as f32;
    let verb = if report.interrupted { "interrupted after" } else { "done in" };
    let means = match window {
        0 => String::new(),
        1 => format!("; loss of the first/last step: {first:.4} -> {last:.4}"),
        n => format!("; mean loss of the first/last {n} steps: {first:.4} -> {last:.4}"),
    };
    // A resumed run's report holds the earlier steps too.
    let before = view.first.map_or(0, |(step, _)| step - 1);
    let steps = match before {
        0 => format!("{} steps", report.losses.len()),
        _ => format!("{} steps, {} in all", report.losses.len().saturating_sub(before), report.losses.len()),
    };
    out!("\n{verb} {:.0}s ({steps}){means}", report.seconds);
    match report.embedding_file {
        true => {
            let stem = report.lora.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            out!("  embedding:     {} (write `{stem}` in prompts, with --embedding; A1111 calls it by the file's name)", report.lora.display());
        }
        false => out!("  LoRA ({:?}):   {}", config.output.save_format, report.lora.display()),
    }
    if let Some(grid) = &report.sample_grid {
        out!("  sample grid:   {}", grid.display());
    }
    out!("  loss curve:    {}", report.loss_curve.display());
    out!("  metrics:       {}", report.metrics.display());
    if let Some((step, loss)) = report.validation.last() {
        let (best_step, best) = report.validation.iter().fold((0, f32::INFINITY), |b, (s, l)| if *l < b.1 { (*s, *l) } else { b });
        out!(
            "  validation:    {} (loss {loss:.4} at step {step}; lowest {best:.4} at step {best_step})",
            config.output.output_dir.join("validation.jsonl").display()
        );
    }
    if let Some(events) = &report.tensorboard {
        let logs = events.parent().unwrap_or(events);
        out!("  TensorBoard:   {} (tensorboard --logdir {})", logs.display(), logs.display());
    }
    out!("  config:        {}", report.config.display());
    if config.output.save_state {
        out!("  state:         {}", config.output.output_dir.join("state").display());
        if report.interrupted {
            out!("\nresume with: trainer train <same config> --resume {}", config.output.output_dir.join("state").display());
        }
    }
    if config.model.pretrained == "tiny" && config.data.train_data_dir == "demo" && config.data.dataset_config.is_empty() {
        out!(
            "\nThis was the built-in demo. To train a style LoRA on real SD1.5 weights, copy\n\
             examples/sd15-style.toml, point model.pretrained at your checkpoint (diffusers folder or\n\
             .safetensors file) and data.train_data_dir at your images, then run\n\
             \n    cargo run -p trainer --release -- train --config my-style.toml\n\
             \n(build with --features cuda to train on an NVIDIA GPU, --features vulkan on another GPU under\n Linux or Windows, --features metal on a Mac; see README.md)."
        );
    }
    if report.interrupted {
        // Everything is saved; exit as a process stopped by SIGINT does (128 + 2), so that a
        // script running the trainer sees the run did not finish.
        std::io::Write::flush(&mut std::io::stdout())?;
        std::process::exit(130);
    }
    Ok(())
}

/// Where `generate` writes its image, checked before anything is generated: an explicit
/// `--out` (and `--save-latents`) must not exist unless `overwrite`, and must name an image
/// format; without `--out`, `outputs/generate.png` or the first free
/// `outputs/generate-N.png`.
fn generate_outputs(out: Option<PathBuf>, save_latents: Option<&std::path::Path>, overwrite: bool) -> Result<PathBuf> {
    let out = match out {
        Some(out) => out,
        None => {
            let dir = std::path::Path::new("outputs");
            let mut numbered = (1..).map(|n| if n == 1 { dir.join("generate.png") } else { dir.join(format!("generate-{n}.png")) });
            numbered.find(|p| !p.exists()).expect("a free name")
        }
    };
    for (flag, path) in [("--out", Some(out.as_path())), ("--save-latents", save_latents)] {
        let Some(path) = path else { continue };
        if path.is_dir() {
            anyhow::bail!("{flag} {} is a folder; name a file", path.display());
        }
        if path.exists() && !overwrite {
            anyhow::bail!("{flag} {} already exists; choose a new path or pass --overwrite", path.display());
        }
        // A device or pipe would be replaced by the file written beside it and renamed.
        if path.exists() && !path.is_file() {
            anyhow::bail!("{flag} {} is not a regular file; name a file", path.display());
        }
    }
    if !image::ImageFormat::from_path(&out).is_ok_and(|f| f.writing_enabled()) {
        anyhow::bail!("--out {}: expected an image file name this writes: .png, .jpg, .webp or .bmp", out.display());
    }
    if save_latents.is_some_and(|latents| latents == out) {
        anyhow::bail!("--save-latents and --out are both {}: the image would replace the latents; name two files", out.display());
    }
    if let Some(latents) = save_latents.filter(|p| !p.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))) {
        anyhow::bail!("--save-latents {}: the latents are written as safetensors; name a .safetensors file", latents.display());
    }
    Ok(out)
}

/// Where `generate` reads and writes files.
struct GenerateFiles {
    out: PathBuf,
    /// Prompt lines with their own options, from `--prompt-file`, each repeated per image.
    prompt_lines: Option<Vec<String>>,
    /// Images per row of `out`'s grid (0: up to 4).
    columns: usize,
    init_latents: Option<PathBuf>,
    /// img2img's image and strength.
    init_image: Option<(PathBuf, f64)>,
    /// Inpainting's mask (with `init_image`).
    mask: Option<PathBuf>,
    save_latents: Option<PathBuf>,
    vae: Option<PathBuf>,
    hires: Option<sd_pipeline::HiresFix>,
    embeddings: Vec<PathBuf>,
}

fn read_latents<B: Backend>(path: &std::path::Path, device: &B::Device) -> Result<burn::tensor::Tensor<B, 4>> {
    let bytes = lora_core::tensor_io::read_file(path)?;
    let (st, _) = lora_core::tensor_io::parse(&bytes, path)?;
    let view = st.tensor("latents").with_context(|| format!("{} has no tensor `latents`", path.display()))?;
    let host = lora_core::tensor_io::decode_finite(&view, "latents", path)?;
    host.to_tensor::<B, 4>(device)
        .with_context(|| format!("{}: `latents` must be 4-d [N, 4, h, w], got {:?}", path.display(), host.shape))
}

fn write_latents<B: Backend>(path: &std::path::Path, latents: burn::tensor::Tensor<B, 4>) -> Result<()> {
    let host = lora_core::HostTensor::from_tensor(latents)?;
    let bytes = lora_core::tensor_io::serialize(&[("latents".to_string(), &host)], SaveDtype::F32, Default::default())?;
    // As `--out` does: a folder that does not exist yet is made.
    make_output_folder(path)?;
    lora_core::tensor_io::write_atomic(path, &bytes)?;
    Ok(())
}

/// `trainer generate`'s LoRA files, and whether they are merged into the weights.
struct Loras<'a> {
    files: &'a [sd_model::lora::LoraFile],
    merged: bool,
}

fn run_generate<B: Backend>(
    model: &str,
    tiny_seed: u64,
    loras: Loras<'_>,
    precision: trainer::device_check::Precision,
    mut opts: GenerateOptions,
    files: &GenerateFiles,
    device: &B::Device,
) -> Result<()> {
    // Before the model loads: a precision the device cannot compute in.
    trainer::train::check_dtype_support::<B>(device, precision.dtype(), "--precision", "f16 or f32")?;
    let out = files.out.as_path();
    let mut prompt_lines = files.prompt_lines.clone();
    let mut c = load_components::<B>(model, tiny_seed, device)?;
    let init_image = match &files.init_image {
        Some((path, strength)) => {
            let image = read_image("--init-image", path)?;
            (opts.width, opts.height) = init_image_size(&c, &opts, image.dimensions());
            if opts.width == 0 || opts.height == 0 {
                let (w, h) = image.dimensions();
                anyhow::bail!("--init-image {}: {w}x{h} pixels rounds down to no side of a multiple of {} (this model's); set --width and --height", path.display(), c.vae.downsample_factor() * c.unet.size_multiple());
            }
            Some((image, *strength))
        }
        None => None,
    };
    let mask = files.mask.as_deref().map(|path| read_image("--mask", path)).transpose()?;
    for side in [&mut opts.width, &mut opts.height] {
        if *side == 0 {
            *side = c.default_size();
        }
    }
    if let Some(vae) = &files.vae {
        sd_pipeline::load_separate_vae(&mut c, vae)?;
    }
    let lora_paths: Vec<PathBuf> = loras.files.iter().map(|l| l.path.clone()).collect();
    let embedding_files = embedding_files(&files.embeddings, &opts, prompt_lines.as_deref())?;
    let names = sd_pipeline::load_embeddings(&mut c, &embedding_files, &lora_paths, device)?;
    if !names.is_empty() {
        let expand = |p: &str| sd_model::textual_inversion::expand_prompt(p, &names);
        opts.prompts = opts.prompts.iter().map(|p| expand(p)).collect();
        opts.negative_prompt = expand(&opts.negative_prompt);
        prompt_lines = prompt_lines.map(|lines| lines.iter().map(|l| expand(l)).collect());
        let list = names.iter().map(|(n, t)| format!("{n} ({} vectors)", t.len())).collect::<Vec<_>>().join(", ");
        note!("embeddings: {list}");
    }
    if c.is_sdxl() && opts.clip_skip != 1 {
        anyhow::bail!("--clip-skip {}: SDXL always reads both encoders' penultimate layers; leave it at 1", opts.clip_skip);
    }
    let limit = trainer::config::MAX_TOKEN_ROWS * 75;
    for p in opts.prompts.iter().chain([&opts.negative_prompt]) {
        if c.tokenizer.weighted_words(p)?.rows > trainer::config::MAX_TOKEN_ROWS {
            note!("note: a prompt has more than {limit} tokens; the text encoder does not see the rest: {p:?}");
        }
    }
    if !loras.files.is_empty() {
        let applied = sd_pipeline::attach_lora_files(&mut c, loras.files, device)?;
        let how = if loras.merged {
            sd_pipeline::merge_adapters(&mut c);
            "merged into"
        } else {
            "beside"
        };
        note!("LoRA: {} UNet and {} text-encoder layers adapted ({how} the weights)", applied.unet, applied.text_encoder);
    }
    if precision != trainer::device_check::Precision::F32 {
        c = sd_pipeline::to_precision(c, precision.dtype());
    }
    let start = Instant::now();
    if let Some(lines) = &prompt_lines {
        // Each line with its own options; lines that agree are one batch.
        let images = sd_pipeline::sample_images(&c, lines, &opts, device)?;
        return save_grid(out, files.columns, &images, start);
    }
    if let Some(hires) = &files.hires {
        // Checked before the first pass runs.
        let first = hires.first_pass(&c, &opts)?;
        note!("hires fix: {}x{} in {} steps, then {}x{} from strength {}", first.width, first.height, first.steps, opts.width, opts.height, hires.strength);
        let latents = sd_pipeline::hires_fix(&c, &opts, hires, device)?;
        return finish_generate(&c, latents, files, start);
    }
    let (z, first_step, inpaint) = match (&files.init_latents, &init_image, &mask) {
        (Some(path), _, _) => (latents_from_noise(&c, &opts, read_latents::<B>(path, device)?)?, 0, None),
        (None, Some((image, strength)), Some(mask)) => {
            let (z, first, keep) = inpaint_latents(&c, &opts, image, mask, *strength, device)?;
            (z, first, Some(keep))
        }
        (None, Some((image, strength)), None) => {
            let (z, first) = img2img_latents(&c, &opts, image, *strength, device)?;
            (z, first, None)
        }
        (None, None, _) => (initial_latents(&c, &opts, device)?, 0, None),
    };
    let latents = denoise_masked(&c, &opts, z, first_step, inpaint.as_ref(), device)?;
    finish_generate(&c, latents, files, start)
}

/// Writes the final latents where asked, decodes them and saves the grid.
fn finish_generate<B: Backend>(c: &sd_pipeline::Components<B>, latents: burn::tensor::Tensor<B, 4>, files: &GenerateFiles, start: Instant) -> Result<()> {
    // NaN or infinite latents decode to a black image: say why instead of writing one.
    let latents = sd_pipeline::finite(latents).map_err(|_| {
        anyhow::anyhow!("the denoised latents are not finite (NaN or inf), so no image was written: a --lora strength or --cfg far too large, or a broken LoRA or model")
    })?;
    if let Some(path) = &files.save_latents {
        write_latents(path, latents.clone())?;
        out!("wrote {}", path.display());
    }
    let images = decode(c, latents)?;
    save_grid(&files.out, files.columns, &images, start)
}

/// The RGB image at `path`, given as `flag` (named in errors).
fn read_image(flag: &str, path: &std::path::Path) -> Result<image::RgbImage> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {flag} {}", path.display()))?;
    Ok(sd_data::image_io::decode_image(&bytes, path)?)
}

/// Writes `images` as one grid of `columns` per row (0: up to 4) to `out`.
fn save_grid(out: &std::path::Path, columns: usize, images: &[image::RgbImage], start: Instant) -> Result<()> {
    make_output_folder(out)?;
    let columns = if columns > 0 { columns } else { images.len().min(4) };
    save_png(&grid(images, columns), out)?;
    out!("wrote {} ({} images, {:.1}s)", out.display(), images.len(), start.elapsed().as_secs_f64());
    Ok(())
}

/// The model families whose kohya names [`sd_module_indexes`] resolves, each a list of
/// (UNet, text encoder) configs whose SGM names agree: two ResNets per level (SD1.x,
/// SD2.x, SDXL) and one (the tiny models).
fn sd_families() -> [Vec<(sd_model::UnetConfig, sd_model::ClipTextConfig)>; 2] {
    [
        vec![
            (sd_model::UnetConfig::sd15(), sd_model::ClipTextConfig::sd15()),
            (sd_model::UnetConfig::sd21(), sd_model::ClipTextConfig::sd21()),
            (sd_model::UnetConfig::sdxl(), sd_model::ClipTextConfig::sd15()),
        ],
        vec![
            (sd_model::UnetConfig::tiny(), sd_model::ClipTextConfig::tiny()),
            (sd_model::UnetConfig::tiny_sdxl(), sd_model::ClipTextConfig::tiny()),
        ],
    ]
}

/// The module paths of the SD1.x, SD2.x, SDXL and tiny UNets and text encoders (the UNets'
/// also by their SGM names), for resolving kohya names without loading a model: one index
/// per family ([`sd_families`]). Where the family's models disagree on a layer (SD1.x's
/// `proj_in` is a 1x1 convolution, SD2.x's and SDXL's a linear layer) the index knows no
/// kernel; [`use_model_conv_layout`] settles those once the set says which model it is for.
fn sd_module_indexes() -> Result<Vec<ModuleIndex>> {
    sd_families().into_iter().map(|family| family_index(&family)).collect()
}

/// One [`ModuleIndex`] of the models of `configs`.
fn family_index(configs: &[(sd_model::UnetConfig, sd_model::ClipTextConfig)]) -> Result<ModuleIndex> {
    let mut index = ModuleIndex::new();
    for (unet_cfg, te_cfg) in configs.iter().cloned() {
        add_narrow_model(&mut index, unet_cfg, te_cfg)?;
    }
    Ok(index)
}

/// Adds the module paths of a narrow model built from `unet_cfg` / `te_cfg` to `index`.
fn add_narrow_model(index: &mut ModuleIndex, unet_cfg: sd_model::UnetConfig, te_cfg: sd_model::ClipTextConfig) -> Result<()> {
    type B = burn::backend::Flex;
    let device = Default::default();
    // Narrow widths: only the module tree matters. Levels of equal width stay equal
    // and the others differ, so that the ResNet blocks that change width keep their
    // `conv_shortcut` (a LoCon adapts it).
    let mut distinct = unet_cfg.block_out_channels.clone();
    distinct.sort_unstable();
    distinct.dedup();
    let narrow = unet_cfg.block_out_channels.iter().map(|c| 8 * (1 + distinct.binary_search(c).unwrap_or(0))).collect();
    let unet_cfg = sd_model::UnetConfig {
        block_out_channels: narrow,
        norm_num_groups: 4,
        attention_head_dim: sd_model::PerBlock::All(1),
        num_attention_heads: None,
        cross_attention_dim: 4,
        addition_time_embed_dim: unet_cfg.addition_time_embed_dim.map(|_| 2),
        projection_class_embeddings_input_dim: unet_cfg.projection_class_embeddings_input_dim.map(|_| 4 + 6 * 2),
        ..unet_cfg
    };
    let mut unet = sd_model::UNet2DConditionModel::<B>::new(&unet_cfg, &device)?;
    let mut te = sd_model::ClipTextModel::<B>::new(&te_cfg.narrow(), &device)?;
    let mut encoders = vec![&mut te];
    // SDXL's second encoder (the tiny one's has fewer layers than bigG's 32).
    let mut te2 = match unet_cfg.has_text_time() {
        true => Some(sd_model::ClipTextModel::<B>::new(&sd_model::ClipTextConfig::sdxl_text_encoder_2().narrow(), &device)?),
        false => None,
    };
    encoders.extend(te2.as_mut());
    sd_model::lora::extend_index(index, &mut unet, &mut encoders)?;
    Ok(())
}

/// Puts a set read with a family's index ([`sd_module_indexes`], `family`) in the conv
/// layout of the one model of the family it is for (SDXL by
/// [`sd_model::lora::adapter_set_is_sdxl`], SD2.x by [`sd_model::lora::adapter_set_is_sd2`],
/// else SD1.x): LyCORIS stores a 1x1 convolution's LoHa / LoKr halves 2-d, and the plain
/// LoRA `convert` writes of them must be 4-d for kohya's and PEFT's conv modules to load.
fn use_model_conv_layout(set: &mut AdapterSet, family: usize) -> Result<()> {
    let Some(configs) = sd_families().into_iter().nth(family) else { return Ok(()) };
    let pick = if sd_model::lora::adapter_set_is_sdxl(set) {
        configs.iter().find(|(unet, _)| unet.has_text_time())
    } else {
        let sd2 = sd_model::lora::adapter_set_is_sd2(set);
        let sd2_width = sd_model::ClipTextConfig::sd21().hidden_size;
        configs.iter().filter(|(unet, _)| !unet.has_text_time()).find(|(_, te)| !sd2 || te.hidden_size == sd2_width).or_else(|| configs.iter().find(|(unet, _)| !unet.has_text_time()))
    };
    if let Some(model) = pick {
        set.use_conv_layout(&family_index(std::slice::from_ref(model))?);
    }
    Ok(())
}

/// Reads an adapter file with the first of [`sd_module_indexes`] that knows every key (the
/// first's error when none does), in the conv layout of the model it is for
/// ([`use_model_conv_layout`]). An SDXL set read without kohya names of its own (the
/// diffusers/PEFT layout, ComfyUI's state-dict names) gets kohya's SDXL names
/// ([`sd_model::lora::use_sdxl_kohya_names_by`], the layout guessed by
/// [`sd_model::lora::guess_sdxl_layout`]), as `train` and `extract` give theirs (a
/// kohya file's set carries the names it was read by).
fn load_adapters(input: &std::path::Path) -> Result<(AdapterSet, lora_core::ReadReport)> {
    let mut first_error = None;
    for (family, index) in sd_module_indexes()?.into_iter().enumerate() {
        match AdapterSet::load(input, &index, ReadOptions::default()) {
            Ok((mut set, report)) => {
                if set.kohya_names.is_empty() && sd_model::lora::adapter_set_is_sdxl(&set) {
                    let layout = sd_model::lora::guess_sdxl_layout(&set);
                    sd_model::lora::use_sdxl_kohya_names_by(&mut set, &layout);
                }
                use_model_conv_layout(&mut set, family)?;
                return Ok((set, report));
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    Err(first_error.map_or_else(|| anyhow::anyhow!("no module index"), anyhow::Error::from))
}

fn run_convert(input: &std::path::Path, output: &std::path::Path, to: AdapterFormat, dtype: SaveDtype) -> Result<()> {
    check_output(output)?;
    // LoHa / LoKr adapters become the LoRAs with their updates (what `convert` is for).
    let (set, report) = load_adapters(input)?;
    let set = set.into_plain_lora();
    save_adapters(&set, output, to, dtype)?;
    out!("{} ({:?}, {} adapters) -> {} ({to:?}, {dtype:?})", input.display(), report.format, set.len(), output.display());
    Ok(())
}

/// `--embedding` paths with each folder replaced by its files that the prompts use
/// ([`sd_pipeline::used_embedding_files`]); a folder's file named as a given file is
/// left out (the given one wins).
fn embedding_files(paths: &[PathBuf], opts: &GenerateOptions, prompt_lines: Option<&[String]>) -> Result<Vec<PathBuf>> {
    let stem = |p: &PathBuf| p.file_stem().map(|s| s.to_string_lossy().to_lowercase());
    let given: Vec<&PathBuf> = paths.iter().filter(|p| !p.is_dir()).collect();
    let mut texts: Vec<&str> = opts.prompts.iter().map(String::as_str).collect();
    texts.push(&opts.negative_prompt);
    texts.extend(prompt_lines.unwrap_or_default().iter().map(String::as_str));
    let mut out: Vec<PathBuf> = given.iter().map(|p| (*p).clone()).collect();
    for dir in paths.iter().filter(|p| p.is_dir()) {
        for file in sd_pipeline::used_embedding_files(dir, &texts)? {
            if !given.iter().any(|g| stem(g) == stem(&file)) && !out.contains(&file) {
                out.push(file);
            }
        }
    }
    Ok(out)
}

/// `trainer unbundle-embeddings`: each bundled embedding as `out/NAME.safetensors`; no file
/// is written when one of them exists already or the LoRA bundles none.
fn run_unbundle_embeddings(lora: &std::path::Path, out: &std::path::Path, dtype: SaveDtype) -> Result<()> {
    // The folder is made when the files are written; what would stop that is named first.
    anyhow::ensure!(!out.exists() || out.is_dir(), "--out {}: is a file; expected a folder for the embedding files", out.display());
    check_folder_can_be_made(out, out)?;
    let embeddings = sd_model::textual_inversion::read_bundled_embeddings(lora)?;
    if embeddings.is_empty() {
        anyhow::bail!("{}: bundles no embedding (no `bundle_emb.NAME.*` tensors)", lora.display());
    }
    // The names come from the file's keys: each must be a plain file name, so that every
    // file lands in `out` (no folders, no `..`, no hidden or nameless file).
    if let Some(bad) = embeddings.iter().find(|e| !is_plain_file_stem(&e.name)) {
        anyhow::bail!(
            "{}: the bundled embedding `{}` (keys `bundle_emb.{}.*`) is not a plain file name (no path separators, no leading dot, not empty); nothing was written",
            lora.display(),
            bad.name,
            bad.name
        );
    }
    let paths: Vec<PathBuf> = embeddings.iter().map(|e| out.join(format!("{}.safetensors", e.name))).collect();
    if let Some(existing) = paths.iter().find(|p| p.exists()) {
        anyhow::bail!("{} already exists; choose another --out folder", existing.display());
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for (embedding, path) in embeddings.iter().zip(&paths) {
        embedding.write(path, dtype, Default::default())?;
        out!("{} ({} vectors) -> {}", embedding.name, embedding.len(), path.display());
    }
    Ok(())
}

/// Whether `name` can stand alone as a file's stem: not empty, no leading dot, and no path
/// separator or other character that would make `DIR/NAME.safetensors` leave `DIR`.
fn is_plain_file_stem(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('.') && !name.chars().any(|c| matches!(c, '/' | '\\' | ':' | '\0') || c.is_control())
}

/// A path's file name for messages (the whole path where it has none).
fn file_name(p: &std::path::Path) -> String {
    p.file_name().map_or_else(|| p.display().to_string(), |n| n.to_string_lossy().into_owned())
}

/// ResNets per down level of SD1.x, SD2.x and SDXL UNets: the block layout `merge-loras`
/// reads block weights against (it has no model).
const SD_LAYERS_PER_BLOCK: usize = 2;

fn run_merge_loras(loras: &[sd_model::lora::LoraFile], output: &std::path::Path, settings: Option<&lora_core::resize::ResizeSettings>, to: Option<AdapterFormat>, dtype: SaveDtype) -> Result<()> {
    check_output(output)?;
    let mut sets = Vec::with_capacity(loras.len());
    for file in loras {
        sets.push(load_adapters(&file.path).with_context(|| format!("reading {}", file.path.display()))?);
    }
    let format = to.unwrap_or(sets[0].1.format);
    // Each file's adapter keys, to name the files behind a mismatch (its message has the shapes).
    let keys: Vec<std::collections::HashSet<String>> = sets.iter().map(|(set, _)| set.iter().map(|(k, _)| k.to_string()).collect()).collect();
    let parts: Vec<(AdapterSet, f32)> = sets.into_iter().zip(loras).flat_map(|((set, _), file)| file.strength_parts(set, SD_LAYERS_PER_BLOCK)).collect();
    let refs: Vec<(&AdapterSet, f32)> = parts.iter().map(|(set, strength)| (set, *strength)).collect();
    let mut merged = lora_core::resize::merge_sets(&refs, settings).map_err(|e| match &e {
        lora_core::LoraError::ShapeMismatch { key, .. } => {
            let holders: Vec<String> = loras.iter().zip(&keys).filter(|(_, k)| k.contains(key)).map(|(f, _)| f.path.display().to_string()).collect();
            anyhow::anyhow!("{e}: `{key}` differs between {}; LoRAs for different base models cannot be merged", holders.join(" and "))
        }
        _ => anyhow::Error::new(e).context("merging the LoRAs"),
    })?;
    let name = |f: &sd_model::lora::LoraFile| file_name(&f.path);
    let strengths = |f: &sd_model::lora::LoraFile| {
        let mut s = match f.text_encoder {
            Some(te) => format!("{}:{te}", f.strength),
            None => f.strength.to_string(),
        };
        if let Some(b) = &f.block_weights {
            s.push_str(&format!(":lbw={}", b.spec()));
        }
        s
    };
    let sources = loras.iter().map(|f| format!("{}:{}", name(f), strengths(f))).collect::<Vec<_>>().join(", ");
    let how = settings.map_or("concatenated ranks".to_string(), |s| format!("to rank {}, {}", s.rank, s.rule.describe()));
    merged.set.metadata.insert("ss_training_comment".into(), format!("merged from {sources} ({how}) by trainer merge-loras"));
    save_adapters(&merged.set, output, format, dtype)?;
    let (lo, hi) = merged.modules.values().map(|r| r.new_rank).fold((usize::MAX, 0), |(lo, hi), r| (lo.min(r), hi.max(r)));
    let worst = merged.modules.values().map(|r| r.fro_retained).fold(1.0, f64::min);
    out!(
        "{sources} -> {} ({format:?}, {dtype:?}, {} adapters, rank {}): Frobenius norm of the summed updates kept {:.1}% on average, {:.1}% at least",
        output.display(),
        merged.set.len(),
        if lo == hi { lo.to_string() } else { format!("{lo}..{hi}") },
        100.0 * merged.mean_fro_retained(),
        100.0 * worst
    );
    Ok(())
}

fn run_resize(input: &std::path::Path, output: &std::path::Path, settings: &lora_core::resize::ResizeSettings, to: Option<AdapterFormat>, dtype: SaveDtype, verbose: bool) -> Result<()> {
    check_output(output)?;
    let (set, report) = load_adapters(input)?;
    let resized = lora_core::resize::resize_set(&set, settings).with_context(|| format!("resizing {}", input.display()))?;
    let format = to.unwrap_or(report.format);
    save_adapters(&resized.set, output, format, dtype)?;
    if verbose {
        for (key, kept) in &resized.modules {
            // A full fine-tuning difference's other singular values are not computed.
            let sum = if kept.sum_retained.is_nan() { "   n/a ".to_string() } else { format!("{:>6.1}%", 100.0 * kept.sum_retained) };
            out!(
                "{:75} | rank {:>3} -> {:>3} | sum(S) retained {sum}, fro retained {:>6.1}%, max(S) ratio {:.1}",
                key.kohya_name(),
                kept.old_rank,
                kept.new_rank,
                100.0 * kept.fro_retained,
                kept.max_ratio
            );
        }
    }
    if let Some((key, largest)) = resized.dropped_biases.iter().max_by(|a, b| a.1.total_cmp(b.1)) {
        let n = resized.dropped_biases.len();
        let mut names: Vec<String> = resized.dropped_biases.keys().take(5).map(|k| k.kohya_name()).collect();
        if n > names.len() {
            names.push(format!("and {} more", n - names.len()));
        }
        out!(
            "note: {n} full fine-tuning module(s) became LoRAs without their bias differences, which no LoRA holds (largest |diff_b| {largest:.3e}, on {}): {}",
            key.kohya_name(),
            names.join(", ")
        );
    }
    let ranks = |f: &dyn Fn(&lora_core::resize::Retained) -> usize| {
        let (lo, hi) = resized.modules.values().map(f).fold((usize::MAX, 0), |(lo, hi), r| (lo.min(r), hi.max(r)));
        if lo == hi { lo.to_string() } else { format!("{lo}..{hi}") }
    };
    let worst = resized.modules.values().map(|r| r.fro_retained).fold(1.0, f64::min);
    out!(
        "{} ({:?}, {} adapters, rank {}) -> {} ({format:?}, {dtype:?}, rank {}, {}): Frobenius norm kept {:.1}% on average, {:.1}% at least",
        input.display(),
        report.format,
        set.len(),
        ranks(&|r| r.old_rank),
        output.display(),
        ranks(&|r| r.new_rank),
        settings.rule.describe(),
        100.0 * resized.mean_fro_retained(),
        100.0 * worst
    );
    Ok(())
}

/// `trainer resize --truncate`: each adapter's first ranks (a DyLoRA's nested LoRAs).
fn run_truncate(
    input: &std::path::Path,
    output: &std::path::Path,
    (rank, conv_rank): (usize, usize),
    to: Option<AdapterFormat>,
    dtype: SaveDtype,
) -> Result<()> {
    check_output(output)?;
    let (set, report) = load_adapters(input)?;
    let cut = lora_core::resize::truncate_set(&set, rank, conv_rank).with_context(|| format!("truncating {}", input.display()))?;
    let format = to.unwrap_or(report.format);
    save_adapters(&cut, output, format, dtype)?;
    let ranks = |s: &lora_core::AdapterSet| {
        let (lo, hi) = s.iter().map(|(_, w)| w.rank()).fold((usize::MAX, 0), |(lo, hi), r| (lo.min(r), hi.max(r)));
        if lo == hi { lo.to_string() } else { format!("{lo}..{hi}") }
    };
    out!("{} ({:?}, {} adapters, rank {}) -> {} ({format:?}, {dtype:?}, rank {}): the first ranks of each adapter, alpha kept", input.display(), report.format, set.len(), ranks(&set), output.display(), ranks(&cut));
    Ok(())
}

/// Refuses, before any work, an output path that exists or whose folder cannot be made: a
/// missing folder is made when the result is written (as `generate --out` does, see
/// [`make_output_folder`]), so that the commands agree, and a file standing in its way would
/// otherwise surface only after the models are loaded and the work is done.
fn check_output(out: &std::path::Path) -> Result<()> {
    if out.exists() {
        anyhow::bail!("{} already exists; choose a new output path", out.display());
    }
    check_folder_can_be_made(&output_parent(out), out)
}

/// The folder `out` is written into (`.` for a bare file name).
fn output_parent(out: &std::path::Path) -> PathBuf {
    out.parent().filter(|p| !p.as_os_str().is_empty()).map_or_else(|| PathBuf::from("."), std::path::Path::to_path_buf)
}

/// Errors, naming `out`, when a file stands where `dir` or one of its missing parents
/// would be made (the nearest part of its path that exists must be a folder).
fn check_folder_can_be_made(dir: &std::path::Path, out: &std::path::Path) -> Result<()> {
    match dir.ancestors().find(|a| !a.as_os_str().is_empty() && a.exists()) {
        Some(found) if !found.is_dir() => anyhow::bail!("{}: its folder {} cannot be made: {} is a file, not a folder", out.display(), dir.display(), found.display()),
        _ => Ok(()),
    }
}

/// Makes `out`'s missing folders just before it is written (not up front, so that a command
/// failing earlier leaves no empty folders behind).
fn make_output_folder(out: &std::path::Path) -> Result<()> {
    let dir = output_parent(out);
    std::fs::create_dir_all(&dir).with_context(|| format!("{}: making its folder {}", out.display(), dir.display()))
}

/// Writes an adapter set to `out`, its folder made first.
fn save_adapters(set: &AdapterSet, out: &std::path::Path, format: AdapterFormat, dtype: SaveDtype) -> Result<()> {
    make_output_folder(out)?;
    Ok(set.save(out, format, dtype)?)
}

/// `path` made absolute with symbolic links and `..` resolved, for a path that need not
/// exist: its longest existing part canonicalized, the rest (no links there, as it does not
/// exist) resolved by its components.
fn resolved_path(path: &std::path::Path) -> Result<PathBuf> {
    use std::path::Component;
    let absolute = std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))?;
    let (base, rest) = absolute
        .ancestors()
        .find_map(|a| std::fs::canonicalize(a).ok().map(|c| (c, absolute.strip_prefix(a).unwrap_or(std::path::Path::new("")))))
        .with_context(|| format!("resolving {}: no part of it exists", path.display()))?;
    let mut out = base;
    for part in rest.components() {
        match part {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(name) => out.push(name),
            _ => {}
        }
    }
    Ok(out)
}

/// Refuses an `out` that is, or lies inside, one of the input model folders `inputs`,
/// before any work: a folder copied into itself never ends (each copy holds the next) and
/// fills the disk. (The `NAME.partial-PID` sibling it is written through is the run's own,
/// so it cannot be an input.)
fn refuse_output_inside(out: &std::path::Path, inputs: &[&std::path::Path]) -> Result<()> {
    let target = resolved_path(out)?;
    for input in inputs {
        if std::fs::canonicalize(input).is_ok_and(|i| target.starts_with(i)) {
            anyhow::bail!(
                "--out {} is inside the input model folder {}: the output would be copied into itself; choose an --out outside it",
                out.display(),
                input.display()
            );
        }
    }
    Ok(())
}

/// Copies a folder tree, skipping files for which `skip` is true. The copy itself is never
/// copied: were `to` inside `from`, listing `from` would find the copy and copy it into
/// itself without end (callers refuse such an output; this is the second guard).
fn copy_tree(from: &std::path::Path, to: &std::path::Path, skip: &dyn Fn(&std::path::Path) -> bool) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    let target = std::fs::canonicalize(to).with_context(|| format!("resolving {}", to.display()))?;
    copy_tree_into(from, to, &target, skip)
}

/// [`copy_tree`] into the existing folder `to`, leaving out the folder `target`.
fn copy_tree_into(from: &std::path::Path, to: &std::path::Path, target: &std::path::Path, skip: &dyn Fn(&std::path::Path) -> bool) -> Result<()> {
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if entry.file_type()?.is_dir() {
            if std::fs::canonicalize(&src).is_ok_and(|c| c == target) {
                continue;
            }
            std::fs::create_dir(&dst).with_context(|| format!("creating {}", dst.display()))?;
            copy_tree_into(&src, &dst, target, skip)?;
        } else if !skip(&src) {
            std::fs::copy(&src, &dst).with_context(|| format!("copying {}", src.display()))?;
        }
    }
    Ok(())
}

/// `extract --load-precision`: a float dtype, or `None` for `auto`.
#[derive(Debug, Clone, Copy)]
struct LoadPrecision(Option<burn::tensor::DType>);

fn parse_load_precision(s: &str) -> std::result::Result<LoadPrecision, String> {
    use burn::tensor::DType;
    Ok(LoadPrecision(match s {
        "auto" => None,
        "f32" | "fp32" | "float" => Some(DType::F32),
        "f16" | "fp16" => Some(DType::F16),
        "bf16" => Some(DType::BF16),
        other => return Err(format!("unknown precision `{other}`; expected auto, f32, f16 or bf16")),
    }))
}

/// `FILE[:RATIO]` arguments of `merge-models`: every one with a ratio, or none (1/N each).
fn model_ratios(models: &[String]) -> Result<Vec<(PathBuf, f64)>> {
    let parsed: Vec<(PathBuf, Option<f64>)> = models
        .iter()
        .map(|m| match m.rsplit_once(':').map(|(path, r)| (path, r.parse::<f64>())) {
            Some((path, Ok(ratio))) if ratio.is_finite() => Ok((PathBuf::from(path), Some(ratio))),
            // `A:nan`, `A:inf`: a ratio, but not a usable one (a path ending so is one that
            // exists).
            Some((path, Ok(ratio))) if !std::path::Path::new(m).exists() => anyhow::bail!("{m}: the ratio of {path} must be a finite number, not {ratio}"),
            // `A:abc` where A exists: not a ratio (a path ending so is one that exists).
            Some((path, Err(_))) if !std::path::Path::new(m).exists() && std::path::Path::new(path).exists() => {
                anyhow::bail!("{m}: `{}` after {path} is not a ratio; expected FILE[:RATIO] with a number", &m[path.len() + 1..])
            }
            _ => Ok((PathBuf::from(m), None)),
        })
        .collect::<Result<_>>()?;
    let with = parsed.iter().filter(|(_, r)| r.is_some()).count();
    anyhow::ensure!(with == 0 || with == parsed.len(), "give every model a ratio (FILE:RATIO) or none (equal shares)");
    let equal = 1.0 / parsed.len() as f64;
    Ok(parsed.into_iter().map(|(p, r)| (p, r.unwrap_or(equal))).collect())
}

fn run_merge_models(models: &[String], out: &std::path::Path, unet_only: bool, dtype: Option<SaveDtype>) -> Result<()> {
    use sd_model::load::{ModelSource, WeightFile};
    check_output(out)?;
    let ratios = model_ratios(models)?;
    let mut folders = 0;
    for (path, _) in &ratios {
        folders += usize::from(matches!(ModelSource::detect(path)?, ModelSource::Diffusers(_)));
    }
    if folders == ratios.len() {
        let inputs: Vec<&std::path::Path> = ratios.iter().map(|(p, _)| p.as_path()).collect();
        refuse_output_inside(out, &inputs)?;
        return run_merge_model_folders(&ratios, out, unet_only, dtype);
    }
    anyhow::ensure!(folders == 0, "give single-file checkpoints only, or diffusers folders only");
    let mut files = Vec::with_capacity(models.len());
    for (path, ratio) in ratios {
        files.push((WeightFile::open(&path)?, ratio));
    }
    make_output_folder(out)?;
    let report = sd_model::merge_models::merge_models(&files, out, unet_only, dtype)?;
    let shares = files.iter().map(|(f, r)| format!("{}:{r}", file_name(f.path()))).collect::<Vec<_>>().join(" + ");
    out!(
        "{shares} -> {} ({} tensors, {} merged from every model{})",
        out.display(),
        report.tensors,
        report.merged,
        if unet_only { ", UNet only" } else { "" }
    );
    merge_notes("", &report);
    Ok(())
}

/// The keys a model merge substituted or dropped ([`sd_model::merge_models::MergeReport`]),
/// each kind in a line starting with `label`.
fn merge_notes(label: &str, report: &sd_model::merge_models::MergeReport) {
    if !report.incomplete.is_empty() {
        out!("{label}{} keys are missing from some model; the first model's value stood in (in an add difference, the key is the first model's as it is; e.g. `{}`)", report.incomplete.len(), report.incomplete[0].0);
    }
    if !report.skipped.is_empty() {
        out!("{label}{} keys not in the first model were left out (e.g. `{}`)", report.skipped.len(), report.skipped[0]);
    }
}

fn run_convert_model(model: &std::path::Path, out: &std::path::Path, options: &sd_model::convert::ConvertOptions) -> Result<()> {
    check_output(out)?;
    make_output_folder(out)?;
    let report = sd_model::convert::convert_checkpoint(model, out, options)?;
    let tensors: usize = report.written.iter().map(|(_, n)| n).sum();
    if sd_model::torch_file::is_pytorch_file(model) && out.extension().is_some_and(|e| e == "safetensors") {
        // Any pickle of tensors (a checkpoint, a LoRA, an embedding), keys as they were.
        out!("{} -> {} ({tensors} tensors, the same keys)", model.display(), out.display());
        return Ok(());
    }
    let layout = if out.is_dir() { "diffusers folder" } else { "single file" };
    out!(
        "{} {} -> {} ({layout}, {tensors} tensors{}, {}{})",
        report.family.name(),
        model.display(),
        out.display(),
        if report.ema { ", UNet from EMA" } else { "" },
        report.prediction.name(),
        if report.zero_terminal_snr { ", zero terminal SNR" } else { "" }
    );
    if !report.placeholders.is_empty() {
        out!("{} placeholder tensors for what diffusers drops and SD2 never reads (e.g. `{}`)", report.placeholders.len(), report.placeholders[0]);
    }
    if !report.left_out.is_empty() {
        out!("{} keys have no place in the other layout and were left out (e.g. `{}`)", report.left_out.len(), report.left_out[0]);
    }
    if report.family == sd_model::load::ModelFamily::Sd2 && out.is_dir() && options.prediction.is_none() {
        // SD2's 768-px models predict v, and nothing in their files says so: the weights tell.
        // (A PyTorch pickle source is read apart; its note is left out.)
        let file = sd_model::load::WeightFile::open(model).ok();
        let marked = |f: &sd_model::load::WeightFile| f.contains("v_pred") || f.metadata().contains_key("modelspec.prediction_type");
        if file.as_ref().is_some_and(|f| !marked(f) && sd_model::convert::sd2_v_prediction(f).is_some()) {
            out!("note: the file does not say what it predicts; {} was read from its weights (as ComfyUI reads SD2.x files); --prediction-type overrides it", report.prediction.name());
        }
    }
    Ok(())
}

/// `merge-models` of diffusers folders: each component's weights file merged as a single
/// file is (the UNet always, the others unless `unet_only`), everything else copied from
/// the first folder.
fn run_merge_model_folders(models: &[(PathBuf, f64)], out: &std::path::Path, unet_only: bool, dtype: Option<SaveDtype>) -> Result<()> {
    use sd_model::load::WeightFile;
    use sd_model::load::ModelSource;
    let first = &models[0].0;
    let components = ["unet", "text_encoder", "text_encoder_2", "vae"];
    let merged: Vec<&str> = components.iter().copied().filter(|c| (!unet_only || *c == "unet") && ModelSource::weights_file(first, c).is_ok()).collect();
    anyhow::ensure!(merged.contains(&"unet"), "{}: no unet/*.safetensors to merge", first.display());
    // Every weights file of a merged component is written anew; the rest is copied.
    let rewritten = |p: &std::path::Path| {
        let parent = p.parent().and_then(|d| d.file_name()).and_then(|n| n.to_str());
        parent.is_some_and(|c| merged.contains(&c)) && p.extension().is_some_and(|e| e == "safetensors" || e == "bin")
    };
    make_output_folder(out)?;
    // Into a `.partial` sibling, renamed when complete: a failed merge leaves no
    // half-written folder at `out`.
    let mut total = 0;
    let mut notes = Vec::new();
    sd_model::convert::write_atomically(out, |partial| -> Result<()> {
        copy_tree(first, partial, &rewritten)?;
        for component in &merged {
            let mut files = Vec::with_capacity(models.len());
            for (dir, ratio) in models {
                let path = ModelSource::weights_file(dir, component)?;
                files.push((WeightFile::open(&path)?, *ratio));
            }
            let name = files[0].0.path().file_name().map(|n| n.to_os_string()).unwrap_or_default();
            let report = sd_model::merge_models::merge_models(&files, &partial.join(component).join(name), false, dtype)?;
            total += report.tensors;
            notes.push((component, report));
        }
        Ok(())
    })?;
    out!("{} diffusers folders -> {} ({} merged: {total} tensors)", models.len(), out.display(), merged.join(", "));
    for (component, report) in &notes {
        merge_notes(&format!("{component}: "), report);
    }
    Ok(())
}

/// kohya metadata worth a line of `trainer info`, with their labels, in print order.
const INFO_KEYS: [(&str, &str); 24] = [
    ("modelspec.title", "title"),
    ("ss_output_name", "output name"),
    ("modelspec.architecture", "architecture"),
    ("ss_base_model_version", "base model version"),
    ("ss_sd_model_name", "trained on"),
    ("ss_network_module", "network module"),
    ("ss_network_args", "network args"),
    ("ss_resolution", "resolution"),
    ("ss_num_train_images", "training images (with repeats)"),
    ("ss_steps", "steps"),
    ("ss_epoch", "epochs"),
    ("ss_batch_size_per_device", "batch size"),
    ("ss_learning_rate", "learning rate"),
    ("ss_unet_lr", "UNet learning rate"),
    ("ss_text_encoder_lr", "text-encoder learning rate"),
    ("ss_optimizer", "optimizer"),
    ("ss_lr_scheduler", "scheduler"),
    ("ss_clip_skip", "clip skip"),
    ("ss_min_snr_gamma", "min-SNR gamma"),
    ("ss_noise_offset", "noise offset"),
    ("ss_training_comment", "comment"),
    ("modelspec.trigger_phrase", "trigger phrase"),
    ("modelspec.usage_hint", "usage hint"),
    ("sshs_model_hash", "model hash (A1111)"),
];

/// `trainer info` on a checkpoint: family, layout, components, prediction type, metadata.
fn run_checkpoint_info(path: &std::path::Path, all_metadata: bool, json: bool) -> Result<()> {
    let info = sd_model::inspect::inspect_checkpoint(path)?;
    if json {
        let components: Vec<serde_json::Value> = info.components.iter().map(|c| serde_json::json!({"name": c.name, "parameters": c.parameters, "dtypes": c.dtypes})).collect();
        let value = serde_json::json!({
            "file": path.display().to_string(),
            "family": info.family,
            "layout": info.layout,
            "components": components,
            "prediction_type": info.prediction,
            "metadata": info.metadata,
        });
        out!("{value}");
        return Ok(());
    }
    out!("{}: {} checkpoint ({})", path.display(), info.family, info.layout);
    for c in &info.components {
        let dtypes = c.dtypes.iter().map(|(d, n)| format!("{n} {d}")).collect::<Vec<_>>().join(" + ");
        out!("  {}: {:.1}M parameters ({dtypes} tensors)", c.name, c.parameters as f64 / 1e6);
    }
    match &info.prediction {
        Some(p) => out!("  prediction type: {p}"),
        None => out!("  prediction type: not recorded (no scheduler config, model spec or v_pred key: epsilon is assumed)"),
    }
    for key in ["modelspec.title", "modelspec.architecture", "modelspec.resolution", "modelspec.author", "modelspec.description"] {
        if let Some(v) = info.metadata.get(key) {
            out!("  {key}: {v}");
        }
    }
    if all_metadata {
        out!("metadata:");
        for (k, v) in &info.metadata {
            out!("  {k} = {v}");
        }
    }
    Ok(())
}

/// `trainer info` on a textual-inversion embedding: its word, vectors, width and family.
fn embedding_info(file: &std::path::Path, embedding: &sd_model::textual_inversion::Embedding, json: bool) -> Result<()> {
    let widths: Vec<usize> = embedding.vectors.iter().map(|v| v.shape[1]).collect();
    let family = match widths.as_slice() {
        [768] => "SD1.x",
        [1024] => "SD2.x",
        [768, 1280] => "SDXL",
        _ => "unknown",
    };
    if json {
        out!("{}", serde_json::json!({"file": file.display().to_string(), "kind": "embedding", "name": embedding.name, "vectors": embedding.len(), "widths": widths, "family": family}));
    } else {
        let widths = widths.iter().map(usize::to_string).collect::<Vec<_>>().join(" + ");
        out!("{}: textual-inversion embedding `{}` ({} vectors, width {widths}: {family}); write `{}` in a prompt with --embedding", file.display(), embedding.name, embedding.len(), embedding.name);
    }
    Ok(())
}

fn run_info(file: &std::path::Path, tags: usize, verbose: bool, all_metadata: bool, json: bool) -> Result<()> {
    use lora_core::inspect::inspect;
    // A checkpoint (a folder, or a file with UNet weights) is described from its header.
    let is_checkpoint = file.is_dir() || sd_model::load::WeightFile::open(file).is_ok_and(|f| f.keys().any(|k| k.starts_with(sd_model::keymap::LDM_UNET_PREFIX)));
    if is_checkpoint {
        return run_checkpoint_info(file, all_metadata, json);
    }
    let bytes = lora_core::tensor_io::read_file(file)?;
    let info = match inspect(&bytes, file) {
        Ok(info) => info,
        // Not a LoRA: a textual-inversion embedding (safetensors or A1111's .pt) is described.
        Err(e) => match sd_model::textual_inversion::read_embedding(file) {
            Ok(embedding) => return embedding_info(file, &embedding, json),
            Err(_) => return Err(e.into()),
        },
    };
    if json {
        let modules: Vec<serde_json::Value> = info
            .modules
            .iter()
            .map(|m| {
                serde_json::json!({
                    "name": m.name,
                    "component": m.component.map(lora_core::Component::name),
                    "kind": m.kind.name(),
                    "rank": m.rank,
                    "alpha": m.alpha,
                    "kernel": m.kernel,
                    "tensors": m.tensors.iter().map(|(p, s)| serde_json::json!({"part": p, "shape": s})).collect::<Vec<_>>(),
                })
            })
            .collect();
        let value = serde_json::json!({
            "file": file.display().to_string(),
            "format": format!("{:?}", info.format).to_lowercase(),
            "dtypes": info.dtypes,
            "modules": modules,
            "metadata": info.metadata,
            "bundled_embeddings": info.bundled_embeddings.iter().map(|(name, parts)| (name.clone(), serde_json::Value::from(parts.iter().map(|(p, s)| serde_json::json!({"part": p, "shape": s})).collect::<Vec<_>>()))).collect::<serde_json::Map<_, _>>(),
        });
        out!("{value}");
        return Ok(());
    }
    let dtypes = info.dtypes.iter().map(|(d, n)| format!("{n} {d}")).collect::<Vec<_>>().join(" + ");
    out!("{}: {:?} layout, {} modules, {dtypes} tensors, {:.1} MB", file.display(), info.format, info.modules.len(), bytes.len() as f64 / 1e6);
    for component in lora_core::Component::ALL {
        let groups = info.summary(component);
        if groups.is_empty() {
            continue;
        }
        let parts: Vec<String> = groups
            .iter()
            .map(|g| {
                use lora_core::inspect::ModuleKind;
                let oft = matches!(g.kind, ModuleKind::Oft | ModuleKind::DiagOft | ModuleKind::Boft);
                let rank = match g.rank {
                    Some(r) if matches!(g.kind, ModuleKind::DiagOft | ModuleKind::Boft) => format!("blocks of {r}"),
                    Some(r) if oft => format!("{r} blocks"),
                    Some(r) => format!("rank {r}"),
                    None if g.kind == ModuleKind::Ia3 => "a scale per channel".to_string(),
                    None if g.kind == ModuleKind::Full => "the whole weight and bias".to_string(),
                    None if g.kind == ModuleKind::Norm => "a norm's scale and shift".to_string(),
                    None => "full".to_string(),
                };
                let alpha = match g.alpha {
                    Some(a) if oft && a == 0.0 => "no constraint".to_string(),
                    Some(a) if oft => format!("constraint {a} per output"),
                    Some(a) => format!("alpha {a}"),
                    None => "no alpha".to_string(),
                };
                let conv = if g.spatial { " 3x3-conv" } else { "" };
                format!("{} {}{conv} ({rank}, {alpha})", g.count, g.kind.name())
            })
            .collect();
        out!("  {}: {}", component.name(), parts.join("; "));
    }
    if info.unassigned() > 0 {
        out!("  {} modules of no known component", info.unassigned());
    }
    if !info.bundled_embeddings.is_empty() {
        let list: Vec<String> = info
            .bundled_embeddings
            .iter()
            .map(|(name, parts)| {
                let vectors = parts.first().map_or(0, |(_, s)| if s.len() == 2 { s[0] } else { 1 });
                let sets = parts.iter().map(|(p, _)| p.as_str()).collect::<Vec<_>>().join(" + ");
                format!("{name} ({vectors} vectors, {sets})")
            })
            .collect();
        out!("  bundled embeddings (called by name in prompts): {}", list.join(", "));
    }
    for (key, label) in INFO_KEYS {
        if let Some(value) = info.metadata.get(key).filter(|v| !v.is_empty() && v.as_str() != "None") {
            out!("  {label}: {value}");
        }
    }
    if info.metadata.get("ss_network_module").is_some_and(|m| m == "networks.dylora") {
        // What a DyLoRA is for, in the words of its tool.
        let unit = info.metadata.get("ss_network_args").and_then(|a| serde_json::from_str::<serde_json::Value>(a).ok()).and_then(|a| a["unit"].as_str().map(String::from));
        let unit = unit.unwrap_or_else(|| "1".into());
        out!("  DyLoRA: its first k·{unit} ranks are a LoRA of their own (trainer resize IN OUT --rank K --truncate)");
    }
    let counts = info.tag_frequency();
    if !counts.is_empty() && tags > 0 {
        let shown: Vec<String> = counts.iter().take(tags).map(|(t, n)| format!("{t} ({n})")).collect();
        out!("  caption tags ({} most frequent of {}): {}", shown.len(), counts.len(), shown.join(", "));
    }
    if all_metadata {
        out!("metadata:");
        for (k, v) in &info.metadata {
            out!("  {k} = {v}");
        }
    }
    if verbose {
        for m in &info.modules {
            let shapes = m.tensors.iter().map(|(p, s)| format!("{p} {s:?}")).collect::<Vec<_>>().join(", ");
            out!("{:75} {:>12} rank {:>4} alpha {:>6} | {shapes}", m.name, m.kind.name(), m.rank.map_or("-".into(), |r| r.to_string()), m.alpha.map_or("-".into(), |a| a.to_string()));
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_extract<B: Backend>(
    base: &std::path::Path,
    tuned: &std::path::Path,
    out: &std::path::Path,
    options: &trainer::extract::ExtractOptions,
    (format, dtype): (AdapterFormat, SaveDtype),
    no_metadata: bool,
    verbose: bool,
    device: &B::Device,
) -> Result<()> {
    check_output(out)?;
    options.settings.validate()?;
    let mut bar: Option<indicatif::ProgressBar> = None;
    let mut progress = |done: usize, total: usize| {
        let bar = bar.get_or_insert_with(|| {
            let style = indicatif::ProgressStyle::with_template("extracting [{bar:30}] {pos}/{len} ETA {eta}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("#>.");
            indicatif::ProgressBar::new(total as u64).with_style(style)
        });
        bar.set_position(done as u64);
    };
    let mut lora = trainer::extract::extract_lora::<B>(base, tuned, options, device, &mut progress)?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    out!("models loaded in {:?}", lora.load_dtype);
    if !lora.text_encoders {
        out!(
            "the text encoders differ by at most {} (--min-diff {}): extracting the UNet only",
            lora.text_encoder_difference, options.min_diff
        );
    }
    let s = &options.settings;
    let clamp = s.clamp_quantile.map_or("unclamped".to_string(), |q| format!("clamped at the {q} quantile"));
    let ranks = if options.conv { format!("rank {}, conv rank {}", s.rank, s.conv_rank) } else { format!("rank {}", s.rank) };
    let comment = format!("extracted from {} (base) and {} (tuned) by trainer extract ({ranks}, {}, {clamp})", file_name(base), file_name(tuned), s.rule.describe());
    let title = out.file_stem().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let keys = trainer::metadata::extraction_metadata(lora.base_model(), &title, &comment, no_metadata, std::time::SystemTime::now());
    lora.extracted.set.metadata.extend(keys);
    save_adapters(&lora.extracted.set, out, format, dtype)?;
    let modules = &lora.extracted.modules;
    if verbose {
        for (key, e) in modules {
            out!(
                "{:75} | rank {:>3} | fro retained {:>6.1}%, error {:>6.1}% | max |diff| {:.3e}",
                lora.extracted.set.kohya_name_of(key),
                e.rank,
                100.0 * e.fro_retained,
                100.0 * e.relative_error,
                e.max_abs_difference
            );
        }
    }
    let (lo, hi) = modules.values().map(|e| e.rank).fold((usize::MAX, 0), |(lo, hi), r| (lo.min(r), hi.max(r)));
    out!(
        "{} ({format:?}, {dtype:?}, {} adapters, rank {}): the Frobenius norm of the differences kept {:.1}% on average; relative error {:.1}% on average",
        out.display(),
        modules.len(),
        if lo == hi { lo.to_string() } else { format!("{lo}..{hi}") },
        100.0 * lora.extracted.mean_fro_retained(),
        100.0 * lora.extracted.mean_relative_error()
    );
    Ok(())
}

fn run_merge<B: Backend>(model: &std::path::Path, loras: &[sd_model::lora::LoraFile], out: &std::path::Path, dtype: Option<SaveDtype>, device: &B::Device) -> Result<()> {
    use sd_model::load::{LoadOptions, ModelSource, WeightFile};
    check_output(out)?;
    let source = ModelSource::detect(model)?;
    let file_out = out.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors") || e.eq_ignore_ascii_case("ckpt"));
    match &source {
        ModelSource::Diffusers(_) if file_out => anyhow::bail!(
            "--out {}: a diffusers folder merges into a folder, not a file; give a folder path, then `trainer convert-model FOLDER --out {}` makes the single file",
            out.display(),
            out.display()
        ),
        ModelSource::SingleFile(_) if !out.extension().is_some_and(|e| e.eq_ignore_ascii_case("safetensors")) => anyhow::bail!(
            "--out {}: a single-file checkpoint merges into a single .safetensors file; end the path with .safetensors",
            out.display()
        ),
        ModelSource::Diffusers(dir) => refuse_output_inside(out, &[dir.as_path()])?,
        _ => {}
    }
    let options = LoadOptions::default();
    let mut unet = source.load_unet::<B>(device, &options)?;
    let mut te = source.load_text_encoder::<B>(device, &options)?;
    let mut te2 = source.load_text_encoder_2::<B>(device, &options)?;
    let mut encoders = vec![&mut te];
    encoders.extend(te2.as_mut());
    let applied = sd_model::lora::apply_lora_files_to(&mut unet, &mut encoders, loras, false, device)?;
    lora_core::sites::bake_adapters(&mut unet);
    lora_core::sites::bake_adapters(&mut te);
    if let Some(te2) = te2.as_mut() {
        lora_core::sites::bake_adapters(te2);
    }
    match &source {
        ModelSource::SingleFile(path) => {
            let mut encoders = vec![&te];
            encoders.extend(te2.as_ref());
            make_output_folder(out)?;
            sd_model::save::merge_into_single_file_with(&WeightFile::open(path)?, &unet, &encoders, out, dtype)?;
        }
        ModelSource::Diffusers(dir) => {
            // Everything but the rewritten weights is copied as it is (configs, tokenizer, VAE, ...).
            let rewritten = |p: &std::path::Path| {
                let parent = p.parent().and_then(|d| d.file_name()).and_then(|n| n.to_str());
                matches!(parent, Some("unet" | "text_encoder" | "text_encoder_2")) && p.extension().is_some_and(|e| e == "safetensors" || e == "bin")
            };
            let dtype = dtype.unwrap_or(SaveDtype::F16);
            make_output_folder(out)?;
            // Into a `.partial` sibling, renamed when complete: a failed copy or save leaves
            // no half-written folder at `out` (which a rerun would refuse as existing).
            sd_model::convert::write_atomically(out, |partial| -> Result<()> {
                copy_tree(dir, partial, &rewritten)?;
                sd_model::save::save_diffusers_component(&unet, &partial.join("unet/diffusion_pytorch_model.safetensors"), dtype)?;
                sd_model::save::save_diffusers_component(&te, &partial.join("text_encoder/model.safetensors"), dtype)?;
                if let Some(te2) = &te2 {
                    sd_model::save::save_diffusers_component(te2, &partial.join("text_encoder_2/model.safetensors"), dtype)?;
                }
                Ok(())
            })?;
        }
    }
    out!("merged {} UNet and {} text-encoder adapters into {}", applied.unet, applied.text_encoder, out.display());
    for lora in loras {
        let bundled = sd_model::textual_inversion::read_bundled_embeddings(&lora.path)?;
        if !bundled.is_empty() {
            // A checkpoint has no place for added tokens (A1111 does not bake them either).
            let names = bundled.iter().map(|e| e.name.as_str()).collect::<Vec<_>>().join(", ");
            out!("note: {} bundles embeddings ({names}) that a checkpoint cannot hold; give the LoRA to `generate` to use them", lora.path.display());
        }
    }
    Ok(())
}

/// `trainer bench`'s arguments.
struct BenchArgs {
    unet_config: String,
    batch: usize,
    resolution: usize,
    steps: usize,
    device: String,
    precision: String,
    mode: String,
    plain_autodiff: bool,
    grad_checkpointing: bool,
    lora_targets: sd_model::targets::UnetTargets,
    lora_unmerged: bool,
    cuda_profiler_step: bool,
    optimizer: trainer::config::Optimizer,
    lora_algo: lora_core::Algo,
    lora_train_norm: bool,
}

fn run_bench(args: BenchArgs) -> Result<()> {
    use trainer::bench::{gib, peak_rss_gib, run_hooked, BenchHooks, BenchOptions, BenchResult};
    let BenchArgs { unet_config, batch, resolution, steps, device, precision, mode, plain_autodiff, grad_checkpointing, lora_targets, lora_unmerged, cuda_profiler_step, optimizer, lora_algo, lora_train_norm } = args;
    let (unet_config, device, precision, mode) = (unet_config.as_str(), device.as_str(), precision.as_str(), mode.as_str());
    let unet = trainer::device_check::unet_config_by_name(unet_config)?;
    let precision: trainer::device_check::Precision = precision.parse().map_err(|e: String| anyhow::anyhow!("--precision: {e}"))?;
    sd_model::set_custom_backward(!plain_autodiff);
    let train = match mode {
        "train" => true,
        "infer" => false,
        other => anyhow::bail!("--mode {other}: expected train or infer"),
    };
    let lora_merged = !train && !lora_unmerged;
    let opts = BenchOptions { unet, batch, resolution, steps, targets: lora_targets, train, precision, grad_checkpointing, lora_merged, optimizer, algo: lora_algo, train_norm: lora_train_norm };
    if cuda_profiler_step && device != "cuda" {
        anyhow::bail!("--cuda-profiler-step: only with --device cuda (got --device {device})");
    }
    // On the CPU the peak is the process's peak RSS (below); on CUDA the allocator's counters.
    #[cfg(feature = "cuda")]
    let cuda_probe = &mut || trainer::bench::cuda_memory(&Default::default());
    #[cfg(feature = "cuda")]
    let cuda_profiler = &mut |start: bool| lora_core::kernels::cuda_profiler(0, start);
    #[cfg(feature = "wgpu")]
    let wgpu_probe = &mut || trainer::bench::wgpu_memory(&Default::default());
    let timings = match device {
        "cpu" => run_hooked::<burn::backend::Autodiff<burn::backend::Flex>>(&opts, &Default::default(), BenchHooks::default())?,
        #[cfg(feature = "cuda")]
        "cuda" => {
            let profiler: Option<&mut dyn FnMut(bool) -> Result<(), String>> = if cuda_profiler_step { Some(cuda_profiler) } else { None };
            run_hooked::<burn::backend::Autodiff<burn::backend::Cuda>>(&opts, &Default::default(), BenchHooks { memory: Some(cuda_probe), profiler })?
        }
        #[cfg(feature = "wgpu")]
        "wgpu" => run_hooked::<burn::backend::Autodiff<burn::backend::Wgpu>>(&opts, &Default::default(), BenchHooks { memory: Some(wgpu_probe), profiler: None })?,
        other => unknown_device(other)?,
    };
    let (first, median) = (timings.first_step_s, timings.s_per_step);
    let result = BenchResult {
        s_per_step: median,
        img_per_s: batch as f64 / median,
        back_to_back_s_per_step: timings.back_to_back_s_per_step,
        back_to_back_img_per_s: batch as f64 / timings.back_to_back_s_per_step,
        peak_mem_gib: if device == "cpu" { peak_rss_gib() } else { timings.peak.map(|p| gib(p.in_use)) },
        peak_reserved_gib: timings.peak.map(|p| gib(p.reserved)),
        first_step_s: first,
        device: device.into(),
        precision: precision.as_str().into(),
        mode: mode.into(),
        batch,
        resolution,
        grad_checkpointing,
        lora_merged,
        custom_backward: !plain_autodiff,
        profiled_step: cuda_profiler_step,
        optimizer,
        algo: lora_algo,
        train_norm: lora_train_norm,
        lora_targets: lora_targets.name().into(),
        vendor: trainer::bench::VendorUse::now(),
    };
    out!("{}", serde_json::to_string(&result)?);
    Ok(())
}

/// The error for a `--device` this build cannot run: one it was not built for, or an unknown
/// name.
fn unknown_device<T>(name: &str) -> Result<T> {
    match name {
        "cuda" | "wgpu" => anyhow::bail!("--device {name} needs a build with `--features {name}`"),
        other => anyhow::bail!("--device {other}: expected cpu, cuda or wgpu"),
    }
}

fn run_bench_ops(batch: usize, resolution: usize, steps: usize, device: &str, precision: &str) -> Result<()> {
    use trainer::bench_ops::{run, table, OpsOptions};
    let precision: trainer::device_check::Precision = precision.parse().map_err(|e: String| anyhow::anyhow!("--precision: {e}"))?;
    if batch == 0 || resolution < 8 {
        anyhow::bail!("--batch must be at least 1 and --resolution at least 8");
    }
    let opts = OpsOptions { batch, resolution, steps, precision };
    let timings = match device {
        "cpu" => run::<burn::backend::Autodiff<burn::backend::Flex>>(&opts, &Default::default()),
        #[cfg(feature = "cuda")]
        "cuda" => run::<burn::backend::Autodiff<burn::backend::Cuda>>(&opts, &Default::default()),
        #[cfg(feature = "wgpu")]
        "wgpu" => run::<burn::backend::Autodiff<burn::backend::Wgpu>>(&opts, &Default::default()),
        other => unknown_device(other)?,
    };
    out_raw!("{}", table(&timings));
    out!("{}", serde_json::to_string(&timings)?);
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn run_device_check(unet_config: &str, batch: usize, resolution: usize, device: &str, precision: trainer::device_check::Precision, grad_checkpointing: bool, tolerance: Option<f64>, adapter: Option<String>, seed: u64) -> Result<()> {
    use burn::backend::{Autodiff, Flex};
    use trainer::device_check::{run, unet_config_by_name, DeviceCheckOptions};
    type Reference = Autodiff<Flex>;
    let opts = DeviceCheckOptions { unet: unet_config_by_name(unet_config)?, batch, resolution, precision, tolerance, adapter, seed, grad_checkpointing };
    let cpu = Default::default();
    let report = match device {
        "cpu" => run::<Reference, Autodiff<Flex>>(&opts, &cpu, &Default::default())?,
        #[cfg(feature = "cuda")]
        "cuda" => run::<Reference, Autodiff<burn::backend::Cuda>>(&opts, &cpu, &Default::default())?,
        #[cfg(feature = "wgpu")]
        "wgpu" => run::<Reference, Autodiff<burn::backend::Wgpu>>(&opts, &cpu, &Default::default())?,
        other => unknown_device(other)?,
    };
    // The report plus what cuDNN / cuBLAS ran (with --cudnn / --cublas), one JSON line.
    let mut line = serde_json::to_value(&report)?;
    line["vendor"] = serde_json::to_value(trainer::bench::VendorUse::now())?;
    out!("{line}");
    if !report.pass {
        anyhow::bail!("device check failed: a relative error is over {} (or not finite)", report.tolerance);
    }
    Ok(())
}

/// `trainer import-kohya`: the converted config to `out` (never over an existing file) or
/// standard output, the notes to standard error.
fn run_import_kohya(input: &std::path::Path, out: Option<&std::path::Path>) -> Result<()> {
    let import = trainer::kohya::import_kohya_config_file(input)?;
    let text = import.to_toml(input);
    for note in &import.notes {
        note!("note: {note}");
    }
    match out {
        None => out_raw!("{text}"),
        Some(path) => {
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)
                .map_err(|e| match e.kind() {
                    std::io::ErrorKind::AlreadyExists => anyhow::anyhow!("{}: {e} (the converted config is never written over an existing file)", path.display()),
                    _ => anyhow::anyhow!("{}: {e}", path.display()),
                })?;
            std::io::Write::write_all(&mut file, text.as_bytes()).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            note!("wrote {}; train with: trainer train --config {}", path.display(), path.display());
        }
    }
    Ok(())
}

/// `--max-token-length`: a multiple of 75 up to `trainer::config::MAX_TOKEN_ROWS` rows.
/// A finite number (NaN or infinity would make every image black).
fn parse_finite(value: &str) -> Result<f32, String> {
    value.parse::<f32>().ok().filter(|v| v.is_finite()).ok_or_else(|| format!("expected a finite number, got `{value}`"))
}

fn parse_max_token_length(value: &str) -> Result<usize, String> {
    let rows = trainer::config::MAX_TOKEN_ROWS;
    match value.parse::<usize>() {
        Ok(n) if sd_pipeline::text::is_max_token_length(n) => Ok(n),
        _ => Err(format!("expected 75, 150 or 225 (a multiple of 75 up to {})", 75 * rows)),
    }
}

/// Runs a command on backend `B`.
fn dispatch<B: AutodiffBackend>(command: Command, device: &B::Device) -> Result<()> {
    match command {
        Command::Train { config, sets, resume, overwrite } => {
            let config = TrainConfig::load(config.as_deref(), &sets)?;
            if !overwrite {
                refuse_earlier_run(&config, resume.as_deref())?;
            }
            run_train::<B>(config, resume.as_deref(), device)
        }
        Command::Generate { model, tiny_seed, prompts, prompt_file, images_per_prompt, negative_prompt, lora, lora_unmerged, precision, sampler, steps, cfg, seed, width, height, clip_skip, max_token_length, out, overwrite, init_latents, init_image, strength, mask, save_latents, vae, embeddings, hires_scale, hires_steps, hires_strength, hires_latents } => {
            let out = generate_outputs(out, save_latents.as_deref(), overwrite)?;
            let prompts = prompts.iter().flat_map(|p| std::iter::repeat_n(p.clone(), images_per_prompt)).collect();
            // The size is the model's unless given (0: known once the model is loaded).
            // The height is the width's where only that is given (the init image's own without it).
            let height = height.or(width.filter(|_| init_image.is_none()));
            let opts = GenerateOptions { prompts, negative_prompt, sampler, steps, cfg_scale: cfg, seed, width: width.unwrap_or(0), height: height.unwrap_or(0), clip_skip, max_token_length };
            // diffusers' img2img and inpainting default strengths.
            let default_strength = if mask.is_some() { 1.0 } else { 0.8 };
            let init_image = init_image.map(|path| (path, strength.unwrap_or(default_strength)));
            // Several images per prompt: one row per prompt.
            let columns = if images_per_prompt > 1 { images_per_prompt } else { 0 };
            let prompt_lines = match &prompt_file {
                Some(path) => {
                    let mut notes = Vec::new();
                    let lines = trainer::kohya::read_prompt_file(path, None, &mut notes).map_err(|reason| anyhow::anyhow!("--prompt-file {}: {reason}", path.display()))?;
                    notes.iter().for_each(|n| note!("note: {n}"));
                    anyhow::ensure!(!lines.is_empty(), "--prompt-file {}: no prompts in it", path.display());
                    Some(lines.into_iter().flat_map(|l| std::iter::repeat_n(l, images_per_prompt)).collect())
                }
                None => None,
            };
            // Named by their option before the model loads.
            let inputs = lora.iter().map(|f| ("--lora", &f.path)).chain(vae.iter().map(|v| ("--vae", v))).chain(embeddings.iter().map(|e| ("--embedding", e)));
            for (flag, path) in inputs {
                anyhow::ensure!(path.exists(), "{flag} {}: no such file or folder", path.display());
            }
            let hires = hires_scale.map(|scale| sd_pipeline::HiresFix { scale, steps: hires_steps, strength: hires_strength, latents: hires_latents });
            let files = GenerateFiles { out, prompt_lines, columns, init_latents, init_image, mask, save_latents, vae, hires, embeddings };
            let loras = Loras { files: &lora, merged: !lora_unmerged };
            run_generate::<B::InnerBackend>(&model, tiny_seed, loras, precision, opts, &files, device)
        }
        Command::Convert { input, output, to, dtype } => run_convert(&input, &output, to, dtype),
        Command::ImportKohya { input, out } => run_import_kohya(&input, out.as_deref()),
        Command::UnbundleEmbeddings { lora, out, dtype } => run_unbundle_embeddings(&lora, &out, dtype),
        Command::Resize { input, output, rank, conv_rank, output_args, truncate: true, .. } => {
            run_truncate(&input, &output, (rank, conv_rank.unwrap_or(rank)), output_args.to, output_args.dtype)
        }
        Command::Resize { input, output, rank, conv_rank, rule, output_args, verbose, .. } => {
            let settings = rule.settings(rank, conv_rank)?;
            run_resize(&input, &output, &settings, output_args.to, output_args.dtype, verbose)
        }
        Command::MergeLoras { loras, out, rank, conv_rank, rule, output_args } => {
            let settings = rank.map(|rank| rule.settings(rank, conv_rank)).transpose()?;
            run_merge_loras(&loras, &out, settings.as_ref(), output_args.to, output_args.dtype)
        }
        Command::Merge { model, lora, out, dtype } => run_merge::<B::InnerBackend>(&model, &lora, &out, dtype, device),
        Command::Info { file, tags, verbose, metadata, json } => run_info(&file, tags, verbose, metadata, json),
        Command::MergeModels { models, out, unet_only, dtype } => run_merge_models(&models, &out, unet_only, dtype),
        Command::ConvertModel { model, out, dtype, ema, prediction_type, vae } => {
            let options = sd_model::convert::ConvertOptions { dtype, ema, prediction: prediction_type, vae };
            run_convert_model(&model, &out, &options)
        }
        Command::Extract { base, tuned, out, rank, conv_rank, rule, clamp_quantile, no_clamp, min_diff, svd_iterations, load_precision, to, dtype, no_metadata, verbose } => {
            let settings = lora_core::extract::ExtractSettings {
                rank,
                conv_rank: conv_rank.unwrap_or(rank),
                rule: rule.rule()?,
                clamp_quantile: (!no_clamp).then_some(clamp_quantile),
                power_iterations: svd_iterations,
            };
            let options = trainer::extract::ExtractOptions {
                settings,
                conv: conv_rank.is_some(),
                min_diff,
                load_dtype: load_precision.0,
                ..trainer::extract::ExtractOptions::new(rank)
            };
            run_extract::<B::InnerBackend>(&base, &tuned, &out, &options, (to, dtype), no_metadata, verbose, device)
        }
        Command::Bench { unet_config, batch, resolution, steps, device, precision, plain_autodiff, grad_checkpointing, lora_targets, optimizer, lora_algo, lora_train_norm, mode, lora_unmerged, cuda_profiler_step } => run_bench(BenchArgs {
            unet_config,
            batch,
            resolution,
            steps,
            device,
            precision,
            mode,
            plain_autodiff,
            grad_checkpointing,
            lora_targets,
            lora_unmerged,
            cuda_profiler_step,
            optimizer,
            lora_algo,
            lora_train_norm,
        }),
        Command::BenchOps { batch, resolution, steps, device, precision } => run_bench_ops(batch, resolution, steps, &device, &precision),
        Command::DeviceCheck { unet_config, batch, resolution, device, precision, grad_checkpointing, tolerance, adapter, seed } => {
            run_device_check(&unet_config, batch, resolution, &device, precision, grad_checkpointing, tolerance, adapter, seed)
        }
    }
}

/// Makes cubecl keep compiled GPU kernels on disk (it keeps autotune results by default), so
/// only the first run pays the minutes of kernel compilation. A `cubecl.toml` in the working
/// directory (or its parents) that sets `[compilation] cache` wins; otherwise the kernels go
/// to `$SD_LORA_CACHE_DIR`, else `$XDG_CACHE_HOME/sd-lora-rs`, else `~/.cache/sd-lora-rs`.
#[cfg(feature = "cuda")]
fn configure_kernel_cache() -> Option<PathBuf> {
    use burn::cubecl::config::cache::CacheConfig;
    use burn::cubecl::config::{CubeClRuntimeConfig, RuntimeConfig};
    let mut config = CubeClRuntimeConfig::from_current_dir().override_from_env();
    let chosen = match &config.compilation.cache {
        Some(existing) => existing.root(),
        None => {
            let env = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
            let dir = env("SD_LORA_CACHE_DIR")
                .or_else(|| env("XDG_CACHE_HOME").map(|d| d.join("sd-lora-rs")))
                .or_else(|| env("HOME").map(|d| d.join(".cache/sd-lora-rs")))?
                .join("kernels");
            config.compilation.cache = Some(CacheConfig::File(dir.clone()));
            dir
        }
    };
    CubeClRuntimeConfig::set(config);
    Some(chosen)
}

/// Says on stderr which kernels the CUDA or wgpu run uses (and which libraries are missing).
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn report_kernels(k: &lora_core::kernels::KernelSettings, flash_max_keys: Option<usize>) {
    if k.fused_softmax {
        note!("attention softmax: fused kernel");
    }
    if k.flash_attention {
        match flash_max_keys {
            Some(keys) => note!("attention: flash-attention kernels up to {keys} keys, blockwise above (bf16 / f16 models)"),
            None => note!("attention: flash-attention kernels (bf16 / f16 models)"),
        }
    }
    if k.cudnn_attention {
        match lora_core::kernels::cudnn_attention_status() {
            Ok(version) => note!("attention: cuDNN {version} fused attention where it applies"),
            Err(reason) => note!("attention: not in cuDNN ({reason})"),
        }
    }
    if k.fused_group_norm {
        note!("group / layer norms: fused kernels");
    }
    if !k.fused_concat {
        note!("optimizer gather: burn's concatenation (SD_LORA_FUSED_CONCAT=0)");
    }
    if k.fused_lora_linear {
        note!("LoRA linear layers: one op each way");
    }
    note!(
        "small matmuls: {}",
        if k.fixed_matmul { "one fixed kernel, no autotuning (--tuned-matmul autotunes them)" } else { "burn's autotuned kernels" }
    );
    if k.cudnn {
        match lora_core::kernels::cudnn_status() {
            Ok(version) => note!("convolutions: cuDNN {version}"),
            Err(reason) => note!("convolutions: burn's kernels ({reason})"),
        }
    }
    if k.cublas {
        match lora_core::kernels::cublas_status() {
            Ok(()) => note!("large matmuls: cuBLAS"),
            Err(reason) => note!("large matmuls: burn's kernels ({reason})"),
        }
    }
    if k.cudnn || k.cublas || k.cudnn_attention {
        note!("library calls ordered by the {}", if k.vendor_sync == lora_core::kernels::VendorSync::Device { "GPU" } else { "host" });
    }
}

/// Compares the routes that no GPU run has checked against the CPU yet (cuBLAS's products,
/// the fused softmax) with the CPU on small problems, and turns off one that disagrees:
/// a wrong library or kernel on some GPU then costs speed, not the run.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn check_routes<B: burn::tensor::backend::Backend>() {
    for check in lora_core::kernels::check_routes::<B>(&Default::default()) {
        match check.result {
            Ok(err) if check.failed() => {
                check.route.turn_off();
                note!(
                    "{}: disagreed with the CPU on a small check (relative error {err:.1e}, tolerance {:.0e}); turned off, burn's ops do that work",
                    check.route, check.tolerance
                );
            }
            Ok(err) => note!("{}: checked against the CPU (relative error {err:.1e})", check.route),
            Err(reason) => note!("{}: not checked ({reason})", check.route),
        }
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let kernels = kernel_settings(&cli)?;
    // What the switches mean on the wgpu backend (where none is on by default).
    #[cfg_attr(not(feature = "wgpu"), allow(unused_variables))]
    let (portable, ignored_on_wgpu) = portable_kernel_settings(&cli)?;
    let command = cli.command.unwrap_or(Command::Train { config: None, sets: vec![], resume: None, overwrite: false });
    lora_core::kernels::set_flash_prefetch(env_switch("SD_LORA_FLASH_PREFETCH")?.unwrap_or(false));
    // A kill switch for cuDNN's padded attention backward (the 77-token cross-attention).
    if let Some(on) = env_switch("SD_LORA_CUDNN_PADDED_BACKWARD")? {
        lora_core::kernels::set_cudnn_padded_backward(on);
    }
    // A kill switch for cuDNN's output blend (a convolution written onto its residual).
    if let Some(on) = env_switch("SD_LORA_CUDNN_BLEND")? {
        lora_core::kernels::set_cudnn_blend(on);
    }
    if let Ok(value) = std::env::var("SD_LORA_FLASH_SHARED_KIB") {
        let kib: usize = value.parse().map_err(|_| anyhow::anyhow!("SD_LORA_FLASH_SHARED_KIB={value}: expected KiB of shared memory per cube (16 to 227)"))?;
        lora_core::kernels::set_flash_shared_kib(kib);
    }
    let flash_max_keys = match (cli.flash_max_keys, std::env::var("SD_LORA_FLASH_MAX_KEYS")) {
        (Some(keys), _) => Some(keys),
        (None, Ok(value)) => Some(value.parse().map_err(|_| anyhow::anyhow!("SD_LORA_FLASH_MAX_KEYS={value}: expected a number of keys"))?),
        (None, Err(_)) => None,
    };
    if let Some(keys) = flash_max_keys {
        lora_core::kernels::set_flash_max_keys(keys);
    }
    for (name, set) in [
        ("SD_LORA_CUBLAS_MIN_GFLOP", lora_core::kernels::set_cublas_min_gflop as fn(f64)),
        ("SD_LORA_CUBLAS_TALL_MIN_GFLOP", lora_core::kernels::set_cublas_tall_min_gflop),
    ] {
        if let Ok(value) = std::env::var(name) {
            set(value.parse().map_err(|_| anyhow::anyhow!("{name}={value}: expected a number of GFLOP"))?);
        }
    }
    if let Ok(value) = std::env::var("SD_LORA_CUBLAS_TALL_ROWS") {
        let rows = value.parse().map_err(|_| anyhow::anyhow!("SD_LORA_CUBLAS_TALL_ROWS={value}: expected a number of rows"))?;
        lora_core::kernels::set_cublas_tall_rows(rows);
    }
    // bench, bench-ops and device-check name their backend with --device.
    let device = match &command {
        Command::Bench { device, .. } | Command::BenchOps { device, .. } | Command::DeviceCheck { device, .. } => named_device(device),
        _ => choose_device()?,
    };
    #[cfg(feature = "cuda")]
    {
        if device == DeviceKind::Cuda {
            note!("device: CUDA GPU 0");
            kernels.apply();
            // The cache first: the route checks compile kernels too.
            let cache = configure_kernel_cache();
            if runs_kernels(&command) {
                check_routes::<burn::backend::Cuda>();
            }
            report_kernels(&lora_core::kernels::KernelSettings::current(), flash_max_keys);
            match cache {
                Some(dir) => note!(
                    "the first steps compile and autotune GPU kernels (minutes on a first run); compiled kernels are kept in {}",
                    dir.display()
                ),
                None => note!("the first steps compile and autotune GPU kernels (minutes; set SD_LORA_CACHE_DIR to keep them)"),
            }
            return dispatch::<burn::backend::Autodiff<burn::backend::Cuda>>(command, &Default::default());
        }
    }
    #[cfg(feature = "wgpu")]
    {
        if device == DeviceKind::Wgpu {
            // burn's kernels, plus the CubeCL kernels the user names (none is on by
            // default: they are checked on CUDA and on lavapipe, not timed on these GPUs).
            if !ignored_on_wgpu.is_empty() {
                note!("{} (or their SD_LORA_* variables): CUDA's, ignored on the wgpu backend", ignored_on_wgpu.join(" / "));
            }
            portable.apply();
            if runs_kernels(&command) {
                check_routes::<burn::backend::Wgpu>();
            }
            if portable != lora_core::kernels::KernelSettings::default() || flash_max_keys.is_some() {
                report_kernels(&lora_core::kernels::KernelSettings::current(), flash_max_keys);
            }
            if portable.flash_attention {
                // Unlike CUDA's tensor cores, these are not on every GPU (nor reachable from WGSL).
                note!(
                    "flash attention on wgpu needs f16 matrix tiles (Vulkan's cooperative matrices with `--features vulkan`, Apple's simdgroup matrices with `metal`): without them each call takes the blockwise path (`trainer device-check --device wgpu --precision f16 --flash-attention` reports it under `fallbacks` / `last_error`)"
                );
            }
            note!("the first steps compile and autotune GPU kernels (minutes on a first run; cubecl keeps the autotune results for later runs)");
            return dispatch::<burn::backend::Autodiff<burn::backend::Wgpu>>(command, &Default::default());
        }
    }
    // The GPU backends returned above (a GPU named but not built was an error).
    debug_assert_eq!(device, DeviceKind::Cpu);
    if kernels != lora_core::kernels::KernelSettings::fast() || flash_max_keys.is_some() {
        note!(
            "--burn-kernels / --cudnn / --cublas / --vendor-sync / --fused-softmax / --flash-attention / --cudnn-attention / --flash-max-keys / --fused-group-norm / --tuned-matmul (or their SD_LORA_* variables): ignored on the CPU backend"
        );
    }
    dispatch::<burn::backend::Autodiff<burn::backend::Flex>>(command, &Default::default())
}

/// Whether `command` runs the model's kernels on the device (and so wants the start-up route
/// checks): import, convert, merge and resize need none (nor a working NVRTC on CUDA).
#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn runs_kernels(command: &Command) -> bool {
    matches!(command, Command::Train { .. } | Command::Generate { .. } | Command::Bench { .. } | Command::BenchOps { .. } | Command::DeviceCheck { .. })
}

/// The backend the commands run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DeviceKind {
    /// burn-flex on the CPU.
    Cpu,
    /// burn's CUDA backend (NVIDIA), with the `cuda` feature.
    Cuda,
    /// burn's wgpu backend (Vulkan, Metal, DirectX 12), with the `wgpu` feature.
    Wgpu,
}

/// `SD_LORA_DEVICE` (`auto`, `cpu`, `cuda` or `wgpu`) or, by default (`auto`), the first of:
/// CUDA (built with `cuda` and an NVIDIA driver present), a wgpu GPU adapter (built with
/// `wgpu`; a CPU adapter such as lavapipe only when asked for by name), the CPU. Says on
/// stderr which it chose and why it passed over a GPU backend it was built with.
fn choose_device() -> Result<DeviceKind> {
    let wanted = std::env::var("SD_LORA_DEVICE").unwrap_or_default().trim().to_ascii_lowercase();
    let nvidia = nvidia_driver_present;
    match wanted.as_str() {
        "cpu" => Ok(DeviceKind::Cpu),
        "cuda" if !cfg!(feature = "cuda") => anyhow::bail!("SD_LORA_DEVICE=cuda needs a build with `--features cuda`"),
        "cuda" if !nvidia() => anyhow::bail!("SD_LORA_DEVICE=cuda: no NVIDIA driver found ({} is missing)", nvidia_driver_file().display()),
        "cuda" => Ok(DeviceKind::Cuda),
        "wgpu" if !cfg!(feature = "wgpu") => anyhow::bail!("SD_LORA_DEVICE=wgpu needs a build with `--features vulkan`, `metal` or `wgpu`"),
        "wgpu" => {
            #[cfg(feature = "wgpu")]
            match wgpu_adapters().first() {
                Some(adapter) => note!("device: wgpu, {adapter}"),
                None => anyhow::bail!("SD_LORA_DEVICE=wgpu: no wgpu adapter found (is a Vulkan, Metal or DirectX 12 driver installed?)"),
            }
            Ok(DeviceKind::Wgpu)
        }
        "" | "auto" => {
            if cfg!(feature = "cuda") {
                if nvidia() {
                    return Ok(DeviceKind::Cuda);
                }
                note!("built with `cuda` but no NVIDIA GPU found");
            }
            #[cfg(feature = "wgpu")]
            {
                let adapters = wgpu_adapters();
                match adapters.iter().find(|a| !a.cpu) {
                    Some(adapter) => {
                        note!("device: wgpu, {adapter}");
                        return Ok(DeviceKind::Wgpu);
                    }
                    None if adapters.is_empty() => note!("built with `wgpu` but no wgpu adapter found"),
                    None => note!("built with `wgpu` but its only adapters run on the CPU ({}; SD_LORA_DEVICE=wgpu uses them)", adapters[0]),
                }
            }
            if cfg!(any(feature = "cuda", feature = "wgpu")) {
                note!("using the CPU");
            }
            Ok(DeviceKind::Cpu)
        }
        other => anyhow::bail!("SD_LORA_DEVICE={other}: expected auto, cpu, cuda or wgpu"),
    }
}

/// The file an installed NVIDIA driver provides: its control device on Linux, the CUDA
/// driver library (`nvcuda.dll`) in the system folder on Windows.
fn nvidia_driver_file() -> PathBuf {
    if cfg!(windows) {
        let root = std::env::var_os("SystemRoot").map_or_else(|| PathBuf::from(r"C:\Windows"), PathBuf::from);
        root.join("System32").join("nvcuda.dll")
    } else {
        PathBuf::from("/dev/nvidiactl")
    }
}

/// Whether an NVIDIA driver is installed ([`nvidia_driver_file`] exists).
fn nvidia_driver_present() -> bool {
    nvidia_driver_file().exists()
}

/// The backend to set up for a command that names its own with `--device`: that one where
/// this build and machine have it, else the CPU (the command then says what is missing).
fn named_device(name: &str) -> DeviceKind {
    match name {
        "cuda" if cfg!(feature = "cuda") && nvidia_driver_present() => DeviceKind::Cuda,
        "wgpu" if cfg!(feature = "wgpu") => DeviceKind::Wgpu,
        _ => DeviceKind::Cpu,
    }
}

/// A wgpu adapter, as [`wgpu_adapters`] lists it.
#[cfg(feature = "wgpu")]
struct WgpuAdapter {
    name: String,
    api: String,
    /// The language cubecl compiles kernels to for this adapter's API: SPIR-V for Vulkan
    /// with the `vulkan` feature (WGSL should the driver lack what the SPIR-V compiler
    /// needs), MSL for Metal with `metal`, else WGSL.
    shaders: &'static str,
    /// A driver that runs on the CPU (lavapipe, WARP).
    cpu: bool,
}

#[cfg(feature = "wgpu")]
impl std::fmt::Display for WgpuAdapter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({}, {} shaders)", self.name, self.api, self.shaders)
    }
}

/// The adapters wgpu finds on the graphics API burn's wgpu backend uses on this platform
/// (Vulkan on Linux and Windows, Metal on macOS), GPUs first: discrete, integrated, virtual,
/// then other kinds and CPU drivers (burn's default device asks wgpu for the
/// high-performance one).
#[cfg(feature = "wgpu")]
fn wgpu_adapters() -> Vec<WgpuAdapter> {
    use burn::backend::wgpu::graphics::{AutoGraphicsApi, GraphicsApi};
    let api: wgpu::Backends = AutoGraphicsApi::backend().into();
    let instance = wgpu::Instance::new(wgpu::InstanceDescriptor { backends: api, ..wgpu::InstanceDescriptor::new_without_display_handle() });
    let adapters = burn::cubecl::future::block_on(instance.enumerate_adapters(api));
    let rank = |t: wgpu::DeviceType| match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    };
    let mut infos: Vec<_> = adapters.iter().map(|a| a.get_info()).collect();
    infos.sort_by_key(|i| rank(i.device_type));
    infos
        .into_iter()
        .map(|i| WgpuAdapter { name: i.name, api: format!("{:?}", i.backend), shaders: shader_language(i.backend), cpu: i.device_type == wgpu::DeviceType::Cpu })
        .collect()
}

/// What cubecl compiles kernels to on `api` in this build (see [`WgpuAdapter::shaders`]).
#[cfg(feature = "wgpu")]
fn shader_language(api: wgpu::Backend) -> &'static str {
    match api {
        wgpu::Backend::Vulkan if cfg!(feature = "vulkan") => "SPIR-V",
        wgpu::Backend::Metal if cfg!(all(feature = "metal", target_os = "macos")) => "MSL",
        _ => "WGSL",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--save-latents` on `--out`'s path would be replaced by the image: refused; a
    /// bundled embedding's name must be a file name of its own.
    #[test]
    fn generate_and_unbundle_paths_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("x.png");
        let err = generate_outputs(Some(out.clone()), Some(&out), false).unwrap_err().to_string();
        assert!(err.contains("name two files"), "{err}");
        assert_eq!(generate_outputs(Some(out.clone()), Some(&dir.path().join("x.safetensors")), false).unwrap(), out);
        let err = generate_outputs(Some(out.clone()), Some(&dir.path().join("x.latents")), false).unwrap_err().to_string();
        assert!(err.contains("name a .safetensors file"), "{err}");
        for bad in ["", ".x", "../x", "a/b", "a\\b", "c:x", "a\nb"] {
            assert!(!is_plain_file_stem(bad), "{bad:?}");
        }
        for good in ["demostyle", "my style", "x.v2", "\u{e9}t\u{e9}"] {
            assert!(is_plain_file_stem(good), "{good:?}");
        }
    }

    /// `merge-models A:abc` names `abc` as the bad ratio when A exists; ratios parse.
    #[test]
    fn a_model_ratio_that_is_no_number_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.safetensors");
        std::fs::write(&a, b"").unwrap();
        let a = a.to_str().unwrap();
        let err = model_ratios(&[format!("{a}:abc"), format!("{a}:0.5")]).unwrap_err().to_string();
        assert!(err.contains("`abc` after") && err.contains("not a ratio"), "{err}");
        let ok = model_ratios(&[format!("{a}:0.25"), format!("{a}:0.75")]).unwrap();
        assert_eq!(ok.iter().map(|(_, r)| *r).collect::<Vec<_>>(), [0.25, 0.75]);
    }

    /// A copy into a folder inside its source leaves the copy out (no endless nesting), and
    /// paths that do not exist yet resolve through `..` and links as the OS would.
    #[test]
    fn a_tree_copied_into_itself_stops_and_paths_resolve_before_they_exist() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("model");
        std::fs::create_dir_all(from.join("unet")).unwrap();
        std::fs::write(from.join("unet/config.json"), "{}").unwrap();
        std::fs::write(from.join("unet/w.safetensors"), "w").unwrap();
        let to = from.join("out");
        copy_tree(&from, &to, &|p| p.extension().is_some_and(|e| e == "safetensors")).unwrap();
        assert!(to.join("unet/config.json").is_file() && !to.join("unet/w.safetensors").exists());
        assert!(!to.join("out").exists(), "the copy is not copied");

        let real = std::fs::canonicalize(dir.path()).unwrap();
        assert_eq!(resolved_path(&dir.path().join("no/such/../../model/x")).unwrap(), real.join("model/x"));
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(&from, dir.path().join("link")).unwrap();
            assert_eq!(resolved_path(&dir.path().join("link/new/x")).unwrap(), real.join("model/new/x"));
            let err = refuse_output_inside(&dir.path().join("link/baked"), &[&from]).unwrap_err().to_string();
            assert!(err.contains("is inside the input model folder"), "{err}");
        }
        assert!(refuse_output_inside(&dir.path().join("model2/x"), &[&from]).is_ok(), "a sibling sharing the name's start is outside");
    }

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("trainer").chain(args.iter().copied())).expect("valid flags")
    }

    /// The flags alone (the `SD_LORA_*` switch variables are not set in the test run).
    fn settings(args: &[&str]) -> lora_core::kernels::KernelSettings {
        kernel_settings(&parse(args)).expect("valid settings")
    }

    /// On the wgpu backend nothing is on by default; a flag turns on its CubeCL kernel, and
    /// CUDA's switches are named as ignored.
    #[test]
    fn wgpu_runs_only_the_cubecl_kernels_named() {
        use lora_core::kernels::KernelSettings;
        let portable = |args: &[&str]| portable_kernel_settings(&parse(args)).expect("valid settings");
        assert_eq!(portable(&["bench"]), (KernelSettings::default(), vec![]));
        let (k, ignored) = portable(&["--fused-group-norm", "--flash-attention", "--fused-softmax", "--cudnn", "--vendor-sync", "device", "bench"]);
        assert_eq!(k, KernelSettings { fused_group_norm: true, flash_attention: true, fused_softmax: true, ..Default::default() });
        assert_eq!(ignored, ["--cudnn", "--vendor-sync"]);
        let (k, ignored) = portable(&["--fast-kernels", "--fused-lora-linear", "bench"]);
        assert_eq!(k, KernelSettings::default());
        assert_eq!(ignored, ["--fused-lora-linear", "--fast-kernels"]);
    }

    #[test]
    fn fast_kernels_are_the_default_and_burn_kernels_start_from_burns() {
        use lora_core::kernels::{KernelSettings, VendorSync};
        // Every fast path by default, and with the flag kept for scripts.
        assert_eq!(settings(&["bench"]), KernelSettings::fast());
        assert_eq!(settings(&["--fast-kernels", "bench"]), KernelSettings::fast());
        assert_eq!(settings(&["bench", "--tuned-matmul"]), KernelSettings { fixed_matmul: false, ..KernelSettings::fast() });
        assert_eq!(settings(&["--vendor-sync", "host", "bench"]).vendor_sync, VendorSync::Host);
        // --burn-kernels: burn's kernels with the fixed matmul, single fast paths added back.
        assert_eq!(settings(&["bench", "--burn-kernels"]), burn_kernels());
        assert!(burn_kernels().fixed_matmul && !burn_kernels().cudnn && burn_kernels().vendor_sync == VendorSync::Host);
        let some = settings(&["--burn-kernels", "bench", "--cudnn", "--flash-attention", "--fused-lora-linear"]);
        assert_eq!(some, KernelSettings { cudnn: true, flash_attention: true, fused_lora_linear: true, ..burn_kernels() });
        assert!(Cli::try_parse_from(["trainer", "--fast-kernels", "--burn-kernels", "bench"]).is_err(), "the two starting points conflict");
    }

    #[test]
    fn switch_variables_take_one_or_zero_and_name_themselves_otherwise() {
        let name = "SD_LORA_TEST_ONLY_SWITCH";
        // Unset in this process: no variable of that name.
        assert_eq!(env_switch(name).unwrap(), None);
        for (value, expected) in [(None, None), (Some("1"), Some(true)), (Some("TRUE"), Some(true)), (Some("0"), Some(false)), (Some("false"), Some(false)), (Some(""), None)] {
            assert_eq!(parse_switch(name, value).unwrap(), expected, "{value:?}");
        }
        let err = parse_switch(name, Some("yes")).unwrap_err().to_string();
        assert!(err.contains(name) && err.contains("yes"), "{err}");
    }
}
