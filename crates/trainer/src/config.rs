//! Training configuration: kohya-like settings in TOML, with `--set key=value` overrides.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::TrainError;

/// Most rows of 75 tokens `model.max_token_length` may ask for: the rows sampling lays a
/// prompt out in at most.
pub use sd_pipeline::MAX_TOKEN_ROWS;

/// Where the base model comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// `tiny` (the built-in demo model, seeded random weights), `tiny-sdxl` (its SDXL-shaped
    /// sibling) or a diffusers folder / single `.safetensors` checkpoint (SD1.x, SD2.x or
    /// SDXL).
    pub pretrained: String,
    /// Seed of the tiny model's random weights (the same seed gives the same model).
    pub tiny_seed: u64,
    /// CLIP skip (1 = last layer, 2 = penultimate).
    pub clip_skip: usize,
    /// Caption and prompt tokens the text encoder sees (kohya's `max_token_length`): 75, or
    /// 150 / 225 (any multiple of 75) to encode longer captions in rows of 75 tokens whose
    /// hidden states are joined (sd-scripts' layout).
    pub max_token_length: usize,
    /// A VAE to encode the training images with instead of the model's own (kohya's `vae`;
    /// `""` = the model's): a diffusers VAE folder, or a `.safetensors` file in diffusers' or
    /// the original layout (e.g. `vae-ft-mse-840000-ema-pruned.safetensors`). The latent
    /// scale stays the model's.
    pub vae: String,
    /// LoRA files merged into the base model before training (kohya's `base_weights`), as
    /// `FILE[:STRENGTH]` (strength 1 by default): the new LoRA learns what they leave out,
    /// and is saved without them.
    pub base_weights: Vec<String>,
}

impl DataSection {
    /// `(min_bucket_reso, max_bucket_reso, bucket_reso_steps)` as [`TrainConfig::default`]
    /// sets them: sd-scripts' 256 and 64, the maximum from the resolution (0).
    pub fn default_buckets() -> (u32, u32, u32) {
        let d = TrainConfig::default().data;
        (d.min_bucket_reso, d.max_bucket_reso, d.bucket_reso_steps)
    }
}

/// The most optimizer steps a run may have (`train.max_train_steps`, or its epochs as
/// steps): its per-step losses are kept in memory, and a resumed state's step (read from a
/// file) must not make that an absurd allocation. Ten million steps is weeks of training.
pub const MAX_TRAIN_STEPS: usize = 10_000_000;

/// The most demo images a run may ask for (`data.demo_images`): they are drawn in memory
/// before training starts.
pub const MAX_DEMO_IMAGES: usize = 1000;

/// The most pixels the demo's images may have together (`data.demo_images` at
/// `data.resolution`): they are held in memory as 8-bit RGB, so 2^30 pixels are 3 GiB
/// (1000 images at 512 px, 682 at 1024 px: more than a demo needs), where 1000 images at
/// 4096 px would be about 67 GB and abort the process.
pub const MAX_DEMO_PIXELS: u64 = 1 << 30;

/// The training images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// A folder of images with captions (kohya layout), or `demo` for the built-in set.
    pub train_data_dir: String,
    /// Training resolution: a side (`512`), or `[width, height]` / `"width,height"`
    /// (`[512, 768]`) as in kohya. With buckets, its area is the buckets' area; without,
    /// every image is resized and cropped to it.
    pub resolution: sd_data::Resolution,
    /// Number of demo images when `train_data_dir = "demo"` (1 to [`MAX_DEMO_IMAGES`]).
    pub demo_images: usize,
    /// Repeats per image for a plain folder (kohya `N_name` folders set their own).
    pub num_repeats: u32,
    /// Skip unreadable images with a warning instead of failing.
    pub skip_bad_images: bool,
    /// Images with a shorter side (in pixels) are bad input (0: no minimum).
    pub min_image_size: u32,
    /// Read the images in sub-folders of each image folder too (sd-scripts reads only a
    /// folder's own images: `false`).
    pub recursive: bool,
    /// Random horizontal flips.
    pub flip_aug: bool,
    /// Crop at a random offset instead of the centre.
    pub random_crop: bool,
    /// kohya's `face_crop_aug_range = [lo, hi]` (unset: off), without buckets
    /// (`enable_bucket = false`): images named `name_cx_cy_w_h.png` by their face's box are
    /// scaled so the face's larger side is `1/hi` to `1/lo` of the resolution's shorter
    /// side and cropped around it ([`sd_data::SubsetConfig::face_crop_aug_range`]); their
    /// latents are encoded anew each time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub face_crop_aug_range: Option<[f64; 2]>,
    /// kohya's `resize_interpolation`: the filter that resizes the images (`"lanczos"`,
    /// `"nearest"`, `"bilinear"`, `"bicubic"`, `"area"`, `"box"`); unset, sd-scripts'
    /// default per image (area averaging to shrink, Lanczos to enlarge;
    /// [`sd_data::ResizeInterpolation`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resize_interpolation: Option<sd_data::ResizeInterpolation>,
    /// kohya's `color_aug`: a third of the samples get a small hue rotation or gamma
    /// ([`sd_data::image_io::ColorAug`]); their latents are encoded anew each time.
    pub color_aug: bool,
    /// Weigh the loss by each image's alpha channel (kohya's `alpha_mask`), in the
    /// training and regularization folders: transparent areas do not train.
    pub alpha_mask: bool,
    /// A folder of loss masks for the training images (kohya's `masked_loss` with
    /// `conditioning_data_dir`; empty: none): one image of the same name and size per
    /// training image, white = train, black = ignore.
    pub mask_dir: String,
    /// Caption file extension tried first (`.txt` and `.caption` are tried after it).
    pub caption_extension: String,
    /// Read A1111's emphasis syntax in captions, `(word:1.2)`, `[word]`, `BREAK` (kohya's
    /// `weighted_captions`); off, captions are taken literally.
    pub weighted_captions: bool,
    /// Shuffle the comma-separated caption tags after the first `keep_tokens`.
    pub shuffle_caption: bool,
    /// Leading caption tags kept in place by shuffling and tag dropout.
    pub keep_tokens: usize,
    /// Marker of the kept tags inside captions, e.g. `|||` (kohya's
    /// `keep_tokens_separator`; empty: none).
    pub keep_tokens_separator: String,
    /// Text put in front of every caption (kohya's `caption_prefix`; empty: none).
    pub caption_prefix: String,
    /// Text put after every caption (kohya's `caption_suffix`; empty: none).
    pub caption_suffix: String,
    /// Joins caption tags into one for shuffling and dropout, e.g. `;;;` (kohya's
    /// `secondary_separator`; empty: none); it becomes `caption_separator` in the caption
    /// trained on.
    pub secondary_separator: String,
    /// What separates a caption's tags for shuffling, tag dropout and `keep_tokens`
    /// (kohya's `caption_separator`, `,` by default).
    pub caption_separator: String,
    /// kohya's `enable_wildcard`: every non-empty line of a caption file is read and each
    /// sample takes one, and `{a|b|c}` takes one of its options.
    pub enable_wildcard: bool,
    /// Probability of training a sample with an empty caption.
    pub caption_dropout_rate: f32,
    /// Empty every caption in every N-th epoch (kohya's `caption_dropout_every_n_epochs`;
    /// 0 = never).
    pub caption_dropout_every_n_epochs: usize,
    /// Probability of dropping each (non-kept) caption tag.
    pub caption_tag_dropout_rate: f32,
    /// kohya's token warmup: the number of (non-kept) caption tags kept at step 0.
    pub token_warmup_min: usize,
    /// kohya's token warmup: over the first `token_warmup_step` steps (below 1: that
    /// fraction of `train.max_train_steps`) a caption keeps only its first tags after the
    /// kept ones, from `token_warmup_min` growing linearly to all (0 = off).
    pub token_warmup_step: f64,
    /// Aspect-ratio buckets (off: every image is resized and cropped to `resolution`).
    pub enable_bucket: bool,
    /// Smallest bucket side.
    pub min_bucket_reso: u32,
    /// Largest bucket side (0 = twice `resolution`'s longer side, at least 1024, at most
    /// [`sd_data::MAX_SIDE`]).
    pub max_bucket_reso: u32,
    /// Bucket side step.
    pub bucket_reso_steps: u32,
    /// Never upscale an image to fill a bucket.
    pub bucket_no_upscale: bool,
    /// Regularization (prior-preservation) images, kohya layout (`""` = none).
    pub reg_data_dir: String,
    /// kohya's fine-tuning metadata (sd-scripts' `--in_json`; `""` = none): the training
    /// images and captions are this JSON file's entries (keys relative to
    /// `train_data_dir`, which may be `""` when they are absolute paths) instead of
    /// `train_data_dir`'s caption files; see `sd_data::SubsetConfig::metadata_file`.
    pub in_json: String,
    /// Loss weight of regularization images.
    pub prior_loss_weight: f32,
    /// Fraction of the training images held out to measure a validation loss (kohya's
    /// `validation_split`; 0 = none). Never regularization images.
    pub validation_split: f64,
    /// The seed that picks the held-out images and the validation noise (kohya's
    /// `validation_seed`; 0 = `train.seed`): fixed, runs of other training seeds measure
    /// on the same images.
    pub validation_seed: u64,
    /// A dataset config file that replaces `train_data_dir` and `reg_data_dir` (`""` =
    /// none): kohya sd-scripts' (`.toml`: `[general]`, `[[datasets]]`,
    /// `[[datasets.subsets]]`), whose left-out options come from this section, or
    /// sd-data's (`.json`), which replaces every other `[data]` setting. See
    /// docs/datasets.md.
    pub dataset_config: String,
}

impl DataSection {
    /// The seed of the validation split and noise: `validation_seed`, or `train_seed`
    /// when it is 0.
    ///
    /// ```
    /// let mut data = trainer::config::TrainConfig::default().data;
    /// assert_eq!(data.validation_seed_or(42), 42);
    /// data.validation_seed = 7;
    /// assert_eq!(data.validation_seed_or(42), 7);
    /// ```
    pub fn validation_seed_or(&self, train_seed: u64) -> u64 {
        match self.validation_seed {
            0 => train_seed,
            seed => seed,
        }
    }
}

/// The adapters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSection {
    /// Rank (`network_dim`).
    pub rank: usize,
    /// Alpha (`network_alpha`); 0 reads as `rank` (scale 1), as kohya reads it.
    pub alpha: f32,
    /// Dropout on the adapter inputs.
    pub dropout: f64,
    /// kohya's `network_dropout`: dropout on each adapter's `down(x)` ("neuron dropout";
    /// `dropout` acts on the input instead).
    pub network_dropout: f64,
    /// kohya's rank dropout (`network_args` `rank_dropout`): per sample, each rank
    /// component of `down(x)` is dropped with this probability.
    pub rank_dropout: f64,
    /// LyCORIS' `rank_dropout_scale` (LoHa, LoKr): rank dropout divides the rows of `ΔW`
    /// it keeps by the share kept ([`lora_core::LoraConfig::rank_dropout_scale`]).
    pub rank_dropout_scale: bool,
    /// Rank dropout as LyCORIS' LoCon applies it, for `algo = "lora"`: each pass drops
    /// rows of the update `ΔW` (scaled by `rank_dropout_scale`) instead of kohya's
    /// per-sample rank components ([`lora_core::LoraConfig::lycoris_rank_dropout`]).
    pub lycoris_rank_dropout: bool,
    /// LyCORIS' `use_scalar` (LoHa, LoKr, GLoRA): a trained scalar on each update, starting at 0,
    /// with the usually-zero half starting random ([`lora_core::LoraConfig::use_scalar`]).
    pub use_scalar: bool,
    /// kohya's module dropout (`network_args` `module_dropout`): each adapter is skipped
    /// in a pass with this probability.
    pub module_dropout: f64,
    /// rsLoRA scaling (`alpha / sqrt(rank)`).
    pub rslora: bool,
    /// DoRA (weight-decomposed LoRA; LyCORIS' `dora_wd`, PEFT's `use_dora`): each adapter
    /// also learns a magnitude per output feature (see `lora_core::LoraConfig::dora`). Saved
    /// as LyCORIS' `dora_scale` (kohya layout, read by ComfyUI and Forge) or PEFT's
    /// `lora_magnitude_vector`.
    pub dora: bool,
    /// The form of the adapters: `lora` (the default), or LyCORIS' `loha` or `lokr` (kohya's
    /// `network_module = "lycoris.kohya"` with `algo`), trained as LyCORIS trains them and
    /// saved in its layout, which A1111, ComfyUI and Forge load. LoHa and LoKr take `rank`,
    /// `alpha`, `conv_*`, `rslora`, `module_dropout`, `rank_dropout` (LyCORIS': rows of
    /// `ΔW`) and `dora`, not the other dropouts or LoRA+. `oft` is kohya's
    /// `networks.oft` ([`lora_core::oft`]): `rank` blocks per layer (`conv_rank` for 3x3
    /// convolutions) and `alpha` the constraint per output (1e-3 to 1e-2), with none of
    /// the dropouts, DoRA, rsLoRA, Tucker or `train.scale_weight_norms`. `diag-oft` is
    /// LyCORIS' Diag-OFT, the same rotation with `rank` (`conv_rank`) as the block size,
    /// `constraint` and `rescaled`, and the same exclusions but `module_dropout`,
    /// `rank_dropout` (entries of the rotation, LyCORIS' `nn.Dropout`) and
    /// `train.scale_weight_norms` (on the blocks' norm, as LyCORIS; `alpha` is not used); `boft`
    /// LyCORIS' BOFT, butterfly stages of such blocks (the block size an even number of at
    /// most `rank` whose quotient of each layer's outputs is a power of two; no rank
    /// dropout, which LyCORIS' BOFT takes and ignores). `ia3` is
    /// LyCORIS' (IA)³ ([`lora_core::ia3`]: a trained scale per output channel, or per input
    /// channel on the layers `ia3_on_input` names; `rank` and `alpha` are not used) with
    /// `module_dropout` alone; `unet_targets` / `text_encoder_targets = "ia3"` are
    /// LyCORIS' `ia3` preset. `glora` is
    /// LyCORIS' GLoRA ([`lora_core::glora`]: `W + s · (W · a1 a2 + b1 b2)`) with `rank`,
    /// `alpha`, `conv_*`, `rslora`, `module_dropout` and `use_scalar`, none of the other
    /// dropouts, DoRA, Tucker, LoRA+ or `train.scale_weight_norms` (as LyCORIS trains it).
    pub algo: lora_core::Algo,
    /// Diag-OFT's and BOFT's constraint per output (LyCORIS' `constraint`; 0: none,
    /// LyCORIS' default). Only with `algo = "diag-oft"` or `"boft"`.
    pub constraint: f32,
    /// Diag-OFT and BOFT: a trained scale per output on the rotated weight (LyCORIS'
    /// `rescaled`). Only with `algo = "diag-oft"` or `"boft"`.
    pub rescaled: bool,
    /// (IA)³ (`algo = "ia3"`): the module-path globs of the layers whose scale is per input
    /// channel (LyCORIS' `train_on_input`) instead of per output; its `ia3` preset's, the
    /// default, are the feed-forward outputs `*.ff.net.2` and `*.mlp.fc2` (the scale then
    /// acts on the activations they take, as in the paper). Other algorithms ignore it.
    pub ia3_on_input: Vec<String>,
    /// LyCORIS' `train_norm`: the norm layers inside the targeted blocks train too, as
    /// LyCORIS' norm modules (each GroupNorm's / LayerNorm's scale and shift as differences
    /// `w_norm`, `b_norm` starting at zero, whatever `algo` is, with `module_dropout`:
    /// [`lora_core::norm`]): the transformers' norms for `unet_targets = "attn-mlp"`, those
    /// and the ResNet blocks' for `"conv"` and `"all-linear"`, none for `"attn"` and `"ia3"`
    /// ([`sd_model::targets::UnetTargets::matches_norm`]); `include` / `exclude` patterns
    /// apply to them too. The text encoders' norms never train (LyCORIS' presets reach none).
    pub train_norm: bool,
    /// LoKr's factor (LyCORIS' `factor`): each side of a weight is split as `m · n`, `m` the
    /// divisor closest to this; −1: closest to the square root.
    pub lokr_factor: i64,
    /// LoKr: the small half `w1` low-rank too where the rank is small for it (LyCORIS'
    /// `decompose_both`).
    pub lokr_decompose_both: bool,
    /// LoKr: both halves full matrices whatever the rank (LyCORIS' `full_matrix`; the
    /// scale is then 1, whatever the alpha).
    pub lokr_full_matrix: bool,
    /// LoKr: `w1` takes the output side's larger factor (LyCORIS'
    /// `unbalanced_factorization`).
    pub lokr_unbalanced_factorization: bool,
    /// Tucker-decompose the adapters of convolutions with a kernel larger than 1x1
    /// (LyCORIS' `use_tucker`; [`lora_core::LoraConfig::use_tucker`]): LoHa's and LoKr's
    /// halves, a LoRA's (LoCon's) `down` as a 1x1 `down` and a core `lora_mid`.
    pub use_tucker: bool,
    /// LoRA-FA (kohya's `network_module = "networks.lora_fa"`): each adapter's `down`
    /// starts from N(0, 2 / (in + rank)) and stays frozen, only `up` trains
    /// ([`lora_core::LoraConfig::lora_fa`]); saved as a plain LoRA. For `algo = "lora"`
    /// without `dora`, `use_tucker` or `train.scale_weight_norms`.
    pub lora_fa: bool,
    /// DyLoRA (kohya's `network_module = "networks.dylora"`, its `unit`): each training
    /// step trains one chunk of this many ranks per adapter, drawn at random, so that the
    /// saved LoRA's first `k · unit` ranks are a LoRA of their own for every `k`
    /// ([`lora_core::dylora`]; `trainer resize --truncate` cuts them out). 0: off. Must
    /// divide `rank` (and `conv_rank`); for `algo = "lora"` without `dora`, `lora_fa`,
    /// `use_tucker`, the dropouts or a factored optimizer (Adafactor, CAME, Prodigy +
    /// schedule-free).
    pub dylora_unit: usize,
    /// UNet preset: `attn`, `attn-mlp` (kohya's default), `all-linear`, `conv`, `ia3`
    /// (LyCORIS' (IA)³ preset: `to_k`, `to_v`, `ff.net.2`).
    pub unet_targets: sd_model::targets::UnetTargets,
    /// Rank of the adapters on convolutions with a kernel larger than 1x1 (kohya's
    /// `conv_dim`, LoCon); 0: `rank` and `alpha`.
    pub conv_rank: usize,
    /// Alpha of those adapters when `conv_rank` is set (kohya's `conv_alpha`, whose default
    /// is 1); 0 reads as `conv_rank` (scale 1), as kohya reads it.
    pub conv_alpha: f32,
    /// Extra module-path globs to target.
    pub include: Vec<String>,
    /// Module-path globs never to target.
    pub exclude: Vec<String>,
    /// Text-encoder preset: `none` (UNet only), `attn`, `attn-mlp` (kohya's text-encoder set),
    /// `ia3` (LyCORIS' (IA)³ preset: `k_proj`, `v_proj`, `mlp.fc2`).
    pub text_encoder_targets: sd_model::targets::TextEncoderTargets,
    /// An existing LoRA (kohya or diffusers/PEFT file) to start from instead of fresh
    /// adapters (kohya's `network_weights`; empty: none). Its adapters must be among the
    /// targets, at `rank`; they bring their own alpha.
    pub network_weights: String,
    /// Take the adapters' modules, ranks and alphas from `network_weights` instead of the
    /// targets, `rank`, `alpha` and `conv_*` (kohya's `dim_from_weights`).
    pub dim_from_weights: bool,
    /// kohya's block-wise learning rates for the UNet's down blocks: up to 12 weights
    /// separated by commas (blocks 0–11; SDXL: 9, blocks 1–9; missing ones are 1), or a
    /// curve: `cosine`, `sine`, `linear`, `reverse_linear` or `zeros`, optionally `+BASE`
    /// (empty: all 1). See `sd_model::blocks` for both numberings.
    pub down_lr_weight: String,
    /// The middle block's weight (kohya's `mid_lr_weight`; SDXL: up to 3, for its ResNet,
    /// transformer and ResNet; empty: 1).
    pub mid_lr_weight: String,
    /// The up blocks' weights (kohya's `up_lr_weight`, blocks 13–24; SDXL: 13–21), as
    /// `down_lr_weight`.
    pub up_lr_weight: String,
    /// Block weights at or below this are 0, and their blocks get no adapters (kohya's
    /// `block_lr_zero_threshold`).
    pub block_lr_zero_threshold: f64,
    /// Ranks of the linear layers and 1x1 convolutions per block: 25 numbers separated by
    /// commas, 23 for SDXL (kohya's `block_dims`; 0: no adapters in the block; empty:
    /// `rank`).
    pub block_dims: String,
    /// Their alphas per block (kohya's `block_alphas`; empty: `alpha`).
    pub block_alphas: String,
    /// Ranks of the 3x3 convolutions per block (kohya's `conv_block_dims`; empty: `conv_rank`).
    pub conv_block_dims: String,
    /// Their alphas per block (kohya's `conv_block_alphas`; empty: `conv_alpha`).
    pub conv_block_alphas: String,
    /// LoRA+ (kohya's `loraplus_lr_ratio`): the `up` weights train at this multiple of the
    /// learning rate (0: off; the paper suggests 16).
    pub loraplus_lr_ratio: f64,
    /// LoRA+ for the UNet's adapters only (kohya's `loraplus_unet_lr_ratio`; 0: `loraplus_lr_ratio`).
    pub loraplus_unet_lr_ratio: f64,
    /// LoRA+ for the text encoder's adapters only (kohya's
    /// `loraplus_text_encoder_lr_ratio`; 0: `loraplus_lr_ratio`).
    pub loraplus_text_encoder_lr_ratio: f64,
}

/// LyCORIS' `ia3` preset's layers with their (IA)³ scale on the inputs.
pub fn default_ia3_on_input() -> Vec<String> {
    vec!["*.ff.net.2".into(), "*.mlp.fc2".into()]
}

impl LoraSection {
    /// `config` for the layer at `path`: with (IA)³, its scale per input channel where
    /// [`ia3_on_input`](Self::ia3_on_input) matches the path.
    ///
    /// ```
    /// use trainer::config::TrainConfig;
    /// let mut lora = TrainConfig::default().lora;
    /// lora.algo = lora_core::Algo::Ia3;
    /// let at = |path: &str| lora.config_at(lora.linear_config(), path).ia3_on_input;
    /// assert!(at("down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"));
    /// assert!(!at("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"));
    /// ```
    pub fn config_at(&self, config: lora_core::LoraConfig, path: &str) -> lora_core::LoraConfig {
        let on_input = self.algo == lora_core::Algo::Ia3 && self.ia3_on_input.iter().any(|g| sd_model::targets::glob_match(g, path));
        config.with_ia3_on_input(on_input)
    }

    /// The adapter settings of linear layers and 1x1 convolutions.
    pub fn linear_config(&self) -> lora_core::LoraConfig {
        let alpha = match self.algo {
            // Diag-OFT's alpha in lora-core (and in its files) is LyCORIS' constraint.
            lora_core::Algo::DiagOft | lora_core::Algo::Boft => self.constraint,
            _ if self.alpha == 0.0 => self.rank as f32,
            _ => self.alpha,
        };
        lora_core::LoraConfig::new(self.rank)
            .with_alpha(alpha)
            .with_dropout(self.dropout)
            .with_network_dropout(self.network_dropout)
            .with_rank_dropout(self.rank_dropout)
            .with_rank_dropout_scale(self.rank_dropout_scale)
            .with_lycoris_rank_dropout(self.lycoris_rank_dropout)
            .with_use_scalar(self.use_scalar)
            .with_module_dropout(self.module_dropout)
            .with_rslora(self.rslora)
            .with_dora(self.dora)
            .with_algo(self.algo)
            .with_lokr_factor(self.lokr_factor)
            .with_lokr_decompose_both(self.lokr_decompose_both)
            .with_lokr_full_matrix(self.lokr_full_matrix)
            .with_lokr_unbalanced_factorization(self.lokr_unbalanced_factorization)
            .with_use_tucker(self.use_tucker)
            .with_lora_fa(self.lora_fa)
            .with_dylora_unit((self.dylora_unit > 0).then_some(self.dylora_unit))
            .with_oft_rescaled(self.rescaled)
    }

    /// The adapter settings of convolutions with a larger kernel: those of linear layers
    /// unless `conv_rank` is set, then `conv_rank` and `conv_alpha` as kohya reads
    /// `conv_dim` and `conv_alpha`.
    ///
    /// ```
    /// use trainer::config::TrainConfig;
    /// let mut lora = TrainConfig::default().lora;
    /// assert_eq!(lora.spatial_config(), lora.linear_config());
    /// lora.conv_rank = 4;
    /// assert_eq!((lora.spatial_config().rank, lora.spatial_config().alpha), (4, 1.0));
    /// lora.conv_alpha = 2.0;
    /// assert_eq!(lora.spatial_config().scale(), 0.5);
    /// lora.conv_alpha = 0.0; // kohya: alpha = rank
    /// assert_eq!(lora.spatial_config().scale(), 1.0);
    /// ```
    pub fn spatial_config(&self) -> lora_core::LoraConfig {
        if self.conv_rank == 0 {
            return self.linear_config();
        }
        if self.algo.is_lycoris_oft() {
            // LyCORIS: one constraint for every layer.
            return self.linear_config().with_rank(self.conv_rank);
        }
        let alpha = if self.conv_alpha == 0.0 { self.conv_rank as f32 } else { self.conv_alpha };
        self.linear_config().with_rank(self.conv_rank).with_alpha(alpha)
    }

    /// Whether the 3x3 convolutions get a rank of their own.
    pub fn has_conv_settings(&self) -> bool {
        self.conv_rank > 0 || !self.conv_block_dims.trim().is_empty()
    }

    /// kohya's block-wise settings of this section, in kohya's syntax, read in `layout`'s
    /// numbering (SD1.x / SD2.x's 25 blocks or SDXL's 23).
    pub fn block_spec(&self, layout: sd_model::blocks::BlockLayout) -> sd_model::blocks::BlockSpec<'_> {
        sd_model::blocks::BlockSpec {
            layout,
            down_lr_weight: &self.down_lr_weight,
            mid_lr_weight: &self.mid_lr_weight,
            up_lr_weight: &self.up_lr_weight,
            block_lr_zero_threshold: self.block_lr_zero_threshold,
            block_dims: &self.block_dims,
            block_alphas: &self.block_alphas,
            conv_block_dims: &self.conv_block_dims,
            conv_block_alphas: &self.conv_block_alphas,
        }
    }

    /// The block-wise settings resolved per block of `layout` (`None` when none is set);
    /// errors name the key.
    ///
    /// ```
    /// use sd_model::blocks::BlockLayout;
    /// use trainer::config::TrainConfig;
    /// let mut lora = TrainConfig::default().lora;
    /// assert!(lora.block_plan(BlockLayout::Sd).unwrap().is_none());
    /// lora.up_lr_weight = "sine+0.5".into();
    /// let plan = lora.block_plan(BlockLayout::Sd).unwrap().unwrap();
    /// assert_eq!(plan.lr_factor("up_blocks.0.attentions.0.proj_in"), 0.5);
    /// // SDXL's up path has 9 blocks, its first level 3 of them.
    /// let plan = lora.block_plan(BlockLayout::Sdxl).unwrap().unwrap();
    /// assert_eq!(plan.lr_factor("up_blocks.0.attentions.0.proj_in"), 0.5);
    /// ```
    pub fn block_plan(&self, layout: sd_model::blocks::BlockLayout) -> Result<Option<sd_model::blocks::BlockPlan>, TrainError> {
        sd_model::blocks::BlockPlan::new(&self.block_spec(layout), &self.linear_config(), &self.spatial_config(), self.conv_alpha).map_err(|e| TrainError::Config {
            origin: "lora".into(),
            reason: e.to_string(),
        })
    }

    /// Whether LoRA+ or kohya's block learning-rate weights give some adapter tensors
    /// their own learning-rate factor.
    pub fn has_lr_factors(&self) -> bool {
        [self.loraplus_lr_ratio, self.loraplus_unet_lr_ratio, self.loraplus_text_encoder_lr_ratio].iter().any(|r| *r > 0.0)
            || [&self.down_lr_weight, &self.mid_lr_weight, &self.up_lr_weight].iter().any(|w| !w.is_empty())
    }

    /// LoRA+'s factors on the `up` weights' learning rate: `(unet, text_encoder)`, 1 when off.
    pub fn loraplus_ratios(&self) -> (f64, f64) {
        let pick = |own: f64| if own > 0.0 { own } else if self.loraplus_lr_ratio > 0.0 { self.loraplus_lr_ratio } else { 1.0 };
        (pick(self.loraplus_unet_lr_ratio), pick(self.loraplus_text_encoder_lr_ratio))
    }
}

/// Learning-rate schedules (each with linear warmup).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrScheduler {
    /// Constant after warmup (also read as kohya's / diffusers' `constant_with_warmup`).
    #[serde(alias = "constant_with_warmup")]
    Constant,
    /// Linear decay to 0.
    Linear,
    /// Cosine decay to 0.
    Cosine,
    /// Cosine with `lr_cycles` hard restarts.
    CosineWithRestarts,
    /// Polynomial decay to 1e-7 with exponent `lr_scheduler_power` (diffusers'
    /// `polynomial`; power 1 is linear).
    Polynomial,
    /// Cosine decay to `lr_scheduler_min_lr_ratio` of the rate (transformers'
    /// `cosine_with_min_lr`; `lr_cycles` half-waves, as sd-scripts passes them).
    CosineWithMinLr,
    /// `1/√((step − warmup + timescale) / timescale)` of the rate after warmup
    /// (transformers' `inverse_sqrt`; timescale `lr_scheduler_timescale`).
    InverseSqrt,
    /// Warmup, a stable stretch at the full rate, then a cosine decay over the last
    /// `lr_decay_steps` steps to `lr_scheduler_min_lr_ratio` of the rate (transformers'
    /// `warmup_stable_decay`).
    WarmupStableDecay,
    /// diffusers' `piecewise_constant`: factors of the rate by step, from
    /// `lr_scheduler_args.step_rules` (`"1:100,0.5:200,0.1"`); no warmup.
    PiecewiseConstant,
    /// PyTorch's `CosineAnnealingLR` (sd-scripts' `lr_scheduler_type`), with
    /// `lr_scheduler_args.T_max` and `eta_min`; no warmup. The PyTorch schedulers below
    /// take their arguments by PyTorch's names in `lr_scheduler_args`, with PyTorch's
    /// defaults; see `lora_core::optim::TorchLrSchedule`.
    #[serde(rename = "CosineAnnealingLR")]
    CosineAnnealingLr,
    /// PyTorch's `CosineAnnealingWarmRestarts` (`T_0`, `T_mult`, `eta_min`).
    #[serde(rename = "CosineAnnealingWarmRestarts")]
    CosineAnnealingWarmRestarts,
    /// PyTorch's `StepLR` (`step_size`, `gamma`).
    #[serde(rename = "StepLR")]
    StepLr,
    /// PyTorch's `MultiStepLR` (`milestones`, `gamma`).
    #[serde(rename = "MultiStepLR")]
    MultiStepLr,
    /// PyTorch's `ExponentialLR` (`gamma`).
    #[serde(rename = "ExponentialLR")]
    ExponentialLr,
    /// PyTorch's `LinearLR` (`start_factor`, `end_factor`, `total_iters`).
    #[serde(rename = "LinearLR")]
    LinearLr,
    /// PyTorch's `ConstantLR` (`factor`, `total_iters`).
    #[serde(rename = "ConstantLR")]
    ConstantLr,
    /// PyTorch's `PolynomialLR` (`total_iters`, `power`).
    #[serde(rename = "PolynomialLR")]
    PolynomialLr,
}

/// The arguments of PyTorch's schedulers and of `piecewise_constant`
/// (`train.lr_scheduler_args`, sd-scripts' `lr_scheduler_args`), by PyTorch's names; unset
/// ones take PyTorch's defaults, and each scheduler takes only its own.
///
/// ```
/// let c = trainer::TrainConfig::load(None, &[
///     "train.lr_scheduler=\"CosineAnnealingLR\"".into(),
///     "train.lr_warmup_steps=0".into(),
///     "train.lr_scheduler_args={ T_max = 500, eta_min = 1e-6 }".into(),
/// ]).unwrap();
/// assert_eq!(c.train.torch_schedule().unwrap().unwrap().name(), "CosineAnnealingLR");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LrSchedulerArgs {
    /// `CosineAnnealingLR`'s steps from the rate to `eta_min`.
    #[serde(rename = "T_max", default, skip_serializing_if = "Option::is_none")]
    pub t_max: Option<usize>,
    /// `CosineAnnealingWarmRestarts`' first cycle, in steps.
    #[serde(rename = "T_0", default, skip_serializing_if = "Option::is_none")]
    pub t_0: Option<usize>,
    /// `CosineAnnealingWarmRestarts`' growth of the cycles (default 1).
    #[serde(rename = "T_mult", default, skip_serializing_if = "Option::is_none")]
    pub t_mult: Option<usize>,
    /// The lowest rate of the cosine schedulers, absolute (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eta_min: Option<f64>,
    /// `StepLR`'s steps between decays.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_size: Option<usize>,
    /// The decay factor of `StepLR` and `MultiStepLR` (default 0.1) and `ExponentialLR`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gamma: Option<f64>,
    /// `MultiStepLR`'s steps of decay.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub milestones: Option<Vec<usize>>,
    /// `LinearLR`'s first factor (default 1/3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_factor: Option<f64>,
    /// `LinearLR`'s last factor (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_factor: Option<f64>,
    /// Steps of `LinearLR`, `ConstantLR` and `PolynomialLR` (default 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_iters: Option<usize>,
    /// `ConstantLR`'s factor (default 1/3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    /// `PolynomialLR`'s exponent (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power: Option<f64>,
    /// `piecewise_constant`'s rules (`"1:100,0.5:200,0.1"`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_rules: Option<String>,
}

impl LrSchedulerArgs {
    /// The names of the arguments that are set.
    pub fn set_names(&self) -> Vec<&'static str> {
        let set = [
            ("T_max", self.t_max.is_some()),
            ("T_0", self.t_0.is_some()),
            ("T_mult", self.t_mult.is_some()),
            ("eta_min", self.eta_min.is_some()),
            ("step_size", self.step_size.is_some()),
            ("gamma", self.gamma.is_some()),
            ("milestones", self.milestones.is_some()),
            ("start_factor", self.start_factor.is_some()),
            ("end_factor", self.end_factor.is_some()),
            ("total_iters", self.total_iters.is_some()),
            ("factor", self.factor.is_some()),
            ("power", self.power.is_some()),
            ("step_rules", self.step_rules.is_some()),
        ];
        set.iter().filter(|(_, on)| *on).map(|(name, _)| *name).collect()
    }
}

/// The name of a schedule as the configuration writes it (`cosine`, `CosineAnnealingLR`).
pub(crate) fn scheduler_name(s: LrScheduler) -> String {
    serde_json::to_value(s).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
}

/// The optimizer of the adapters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Optimizer {
    /// AdamW at the scheduled learning rate.
    #[default]
    Adamw,
    /// AdamW with Prodigy's own step-size estimate, which the scheduled learning rate
    /// multiplies (set `learning_rate = 1.0`); see `lora_core::optim::ProdigySettings`.
    Prodigy,
    /// Lion (the `lion-pytorch` package, kohya's `Lion`): every value moves by the learning
    /// rate times a sign, so it wants a learning rate 3–10 times smaller than AdamW's; see
    /// `lora_core::optim::FlatAdamW::with_lion`.
    Lion,
    /// Adafactor (the `transformers` package's, kohya's `Adafactor`): factored second
    /// moments, updates clipped per tensor, and optionally its own relative step size
    /// instead of the learning rate (`adafactor_relative_step`); see
    /// `lora_core::optim::FlatAdamW::with_adafactor`.
    Adafactor,
    /// DAdaptAdam (the `dadaptation` package's, kohya's `DAdaptAdam`): AdamW whose step
    /// size the optimizer estimates, as Prodigy (its successor) does; set
    /// `learning_rate = 1.0`. See `lora_core::optim::FlatAdamW::with_dadapt_adam`.
    #[serde(rename = "dadapt_adam")]
    DadaptAdam,
    /// DAdaptAdamPreprint (the `dadaptation` package's experimental one, kohya's
    /// `DAdaptation` and `DAdaptAdamPreprint`): the preprint's Adam variant of
    /// D-Adaptation; set `learning_rate = 1.0`. The `dadapt_*` keys and the `adam_*` ones.
    #[serde(rename = "dadapt_adam_preprint")]
    DadaptAdamPreprint,
    /// DAdaptLion (kohya's `DAdaptLion`): Lion's sign steps with D-Adaptation's step size;
    /// set `learning_rate = 1.0`. β from `lion_beta1` / `lion_beta2`, `dadapt_d0`, the
    /// decoupled weight decay `adam_weight_decay`.
    #[serde(rename = "dadapt_lion")]
    DadaptLion,
    /// DAdaptSGD (kohya's `DAdaptSGD`): dual-averaged SGD with D-Adaptation's step size;
    /// set `learning_rate = 1.0`. `dadapt_d0`, `dadapt_growth_rate`, `dadapt_momentum`,
    /// L2 weight decay `adam_weight_decay`.
    #[serde(rename = "dadapt_sgd")]
    DadaptSgd,
    /// DAdaptAdaGrad (kohya's `DAdaptAdaGrad`): dual-averaged AdaGrad with D-Adaptation's
    /// step size; set `learning_rate = 1.0`. `dadapt_d0`, `dadapt_growth_rate`,
    /// `dadapt_momentum`, `adam_epsilon` (the package's 1e-6), L2 weight decay
    /// `adam_weight_decay`.
    #[serde(rename = "dadapt_adagrad")]
    DadaptAdagrad,
    /// DAdaptAdan (kohya's `DAdaptAdan`): Adan with D-Adaptation's step size; set
    /// `learning_rate = 1.0`. β from `adam_beta1`, `adam_beta2` and `dadapt_beta3` (the
    /// package's 0.98, 0.92, 0.99), `adam_epsilon`, proximal weight decay
    /// `adam_weight_decay` (decoupled with `dadapt_no_prox`).
    #[serde(rename = "dadapt_adan")]
    DadaptAdan,
    /// Schedule-free AdamW (the `schedulefree` package's `AdamWScheduleFree`, kohya's
    /// `AdamWScheduleFree`): no schedule (`lr_scheduler` must be `constant`;
    /// `lr_warmup_steps` is the package's `warmup_steps`). It trains at one point and
    /// averages towards another, which the saved LoRA, the samples and the validation
    /// loss use. β, ε and the weight decay are the `adam_*` keys; see
    /// `lora_core::optim::FlatAdamW::with_schedule_free`.
    #[serde(rename = "adamw_schedule_free")]
    AdamwScheduleFree,
    /// Schedule-free RAdam (`RAdamScheduleFree`): as `adamw_schedule_free`, with RAdam's
    /// rectified steps, which warm up by themselves (`schedule_free_silent_sgd_phase`).
    #[serde(rename = "radam_schedule_free")]
    RadamScheduleFree,
    /// Schedule-free SGD (`SGDScheduleFree`): as `adamw_schedule_free`, with plain
    /// gradient steps and `sgd_momentum` as the interpolation (no second moment); the
    /// weight decay is `adam_weight_decay`.
    #[serde(rename = "sgd_schedule_free")]
    SgdScheduleFree,
    /// Prodigy + schedule-free (the `prodigy-plus-schedule-free` package's
    /// `ProdigyPlusScheduleFree`, kohya's `prodigyplus.ProdigyPlusScheduleFree`):
    /// schedule-free AdamW whose step size Prodigy estimates, per parameter group; set
    /// `learning_rate = 1.0` and `lr_scheduler = "constant"`. Its settings are the
    /// `prodigy_plus_*` keys, the package's names after the prefix; see
    /// `lora_core::optim::FlatAdamW::with_prodigy_plus`.
    #[serde(rename = "prodigy_plus_schedule_free")]
    ProdigyPlusScheduleFree,
    /// CAME (the `came-pytorch` package's `CAME`, kohya's `came_pytorch.CAME`):
    /// Adafactor's factored second moments with a first moment scaled by its factored
    /// instability. Its settings are the `came_*` keys, its weight decay
    /// `adam_weight_decay`; see `lora_core::optim::FlatAdamW::with_came`.
    Came,
    /// AdEMAMix (the `bitsandbytes` package's, kohya's
    /// `bitsandbytes.optim.AdEMAMix8bit`): Adam with a second, slow first moment
    /// (`ademamix_beta3`) weighted by `ademamix_alpha`; β₁, β₂, ε and the weight decay are
    /// the `adam_*` keys. See `lora_core::optim::FlatAdamW::with_ademamix`.
    Ademamix,
    /// SGD with momentum (PyTorch's `SGD`, kohya's `SGDNesterov`): the `sgd_*` keys, L2
    /// weight decay from `adam_weight_decay`; it wants far larger learning rates than
    /// AdamW. See `lora_core::optim::FlatAdamW::with_sgd`.
    Sgd,
}

impl Optimizer {
    /// Which of the `dadaptation` package's optimizers this is (`None`: another).
    ///
    /// ```
    /// use lora_core::optim::DAdaptKind;
    /// use trainer::config::Optimizer;
    /// assert_eq!(Optimizer::DadaptLion.dadapt_kind(), Some(DAdaptKind::Lion));
    /// assert_eq!(Optimizer::Lion.dadapt_kind(), None);
    /// ```
    pub fn dadapt_kind(self) -> Option<lora_core::optim::DAdaptKind> {
        use lora_core::optim::DAdaptKind;
        match self {
            Self::DadaptAdam => Some(DAdaptKind::Adam),
            Self::DadaptAdamPreprint => Some(DAdaptKind::AdamPreprint),
            Self::DadaptLion => Some(DAdaptKind::Lion),
            Self::DadaptSgd => Some(DAdaptKind::Sgd),
            Self::DadaptAdagrad => Some(DAdaptKind::AdaGrad),
            Self::DadaptAdan => Some(DAdaptKind::Adan),
            _ => None,
        }
    }

    /// Whether this is a schedule-free optimizer (`adamw_schedule_free`,
    /// `radam_schedule_free`, `prodigy_plus_schedule_free`).
    pub fn is_schedule_free(self) -> bool {
        matches!(self, Self::AdamwScheduleFree | Self::RadamScheduleFree | Self::SgdScheduleFree | Self::ProdigyPlusScheduleFree)
    }
}

impl std::str::FromStr for Optimizer {
    type Err = String;

    /// The configuration's names: `adamw`, `prodigy`, `lion`, `adafactor`, `dadapt_adam`,
    /// `adamw_schedule_free`, `radam_schedule_free`, `prodigy_plus_schedule_free`, `came`,
    /// `ademamix`, `sgd`, `dadapt_adam_preprint`, `dadapt_lion`, `dadapt_sgd`,
    /// `dadapt_adagrad`, `dadapt_adan`, `sgd_schedule_free`.
    ///
    /// ```
    /// use trainer::config::Optimizer;
    /// assert_eq!("dadapt_adam".parse::<Optimizer>(), Ok(Optimizer::DadaptAdam));
    /// assert!("radam_schedule_free".parse::<Optimizer>().unwrap().is_schedule_free());
    /// assert_eq!("sgd".parse::<Optimizer>(), Ok(Optimizer::Sgd));
    /// assert!("sgd_nesterov".parse::<Optimizer>().is_err());
    /// ```
    fn from_str(s: &str) -> Result<Self, String> {
        use serde::de::IntoDeserializer;
        Self::deserialize(s.into_deserializer()).map_err(|_: serde::de::value::Error| format!("unknown optimizer `{s}` (adamw, prodigy, lion, adafactor, dadapt_adam, adamw_schedule_free, radam_schedule_free, prodigy_plus_schedule_free, came, ademamix, sgd, dadapt_adam_preprint, dadapt_lion, dadapt_sgd, dadapt_adagrad, dadapt_adan or sgd_schedule_free)"))
    }
}

/// The training loss (kohya's `loss_type`; see `sd_sched::training::elementwise_loss`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossKind {
    /// Mean squared error.
    L2,
    /// Mean absolute error.
    L1,
    /// Pseudo-Huber scaled by its threshold.
    Huber,
    /// Pseudo-Huber without the threshold factor.
    SmoothL1,
}

/// How the pseudo-Huber threshold follows the timestep (kohya's `huber_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HuberScheduleKind {
    /// From 1 at high SNR to `huber_c` at low SNR.
    Snr,
    /// `huber_c` at the last timestep, growing exponentially to `huber_scale` at timestep 0.
    Exponential,
    /// `huber_c · huber_scale` everywhere.
    Constant,
}

/// What to do when a step's loss is NaN or infinite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnNonFinite {
    /// Stop with an error naming the step (the LoRA saved so far is kept).
    Stop,
    /// Drop the step's update, log it and go on.
    Skip,
}

/// Precision of the frozen base model during training (kohya's `mixed_precision`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MixedPrecision {
    /// Everything in f32.
    #[serde(rename = "no")]
    No,
    /// Frozen UNet and text encoder in bf16; adapters, optimizer state and loss in f32.
    #[serde(rename = "bf16")]
    Bf16,
    /// Frozen UNet and text encoder in f16 with dynamic loss scaling; adapters, optimizer
    /// state and loss in f32.
    #[serde(rename = "fp16")]
    Fp16,
}

impl MixedPrecision {
    /// The dtype of the frozen weights (`None` = f32).
    pub fn base_dtype(self) -> Option<burn::tensor::FloatDType> {
        match self {
            Self::No => None,
            Self::Bf16 => Some(burn::tensor::FloatDType::BF16),
            Self::Fp16 => Some(burn::tensor::FloatDType::F16),
        }
    }
}

/// What the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Prediction {
    /// Use the model's scheduler config.
    Auto,
    /// ε-prediction (SD1.x, SD2.x base).
    Epsilon,
    /// v-prediction (SD2.x 768).
    VPrediction,
}

/// The most denoising steps a sample may take (`output.sample_steps`).
pub use sd_pipeline::MAX_SAMPLE_STEPS;

/// The optimisation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Optimizer steps.
    pub max_train_steps: usize,
    /// Passes over the data set to train for instead (0 = use `max_train_steps`, which is
    /// then computed from it: see [`crate::train::with_epoch_steps`]).
    pub max_train_epochs: usize,
    /// The step a run without a state starts at (kohya's `initial_step`; 0 = the first):
    /// steps, epochs, the learning-rate schedule and the place in the data go on from
    /// there, as if that many steps had run (see [`crate::train::initial_progress`]).
    /// A resumed run starts where its state is instead.
    pub initial_step: usize,
    /// The epoch a run without a state starts at, counting from 1 (kohya's
    /// `initial_epoch`; 0 or 1 = the first): the first step of that epoch, as
    /// `initial_step`; `initial_step`, when set, wins.
    pub initial_epoch: usize,
    /// Images per micro-batch.
    pub train_batch_size: usize,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Peak learning rate of the text-encoder adapters (0 = `learning_rate`).
    pub text_encoder_lr: f64,
    /// Learning-rate schedule.
    pub lr_scheduler: LrScheduler,
    /// Linear warmup steps.
    pub lr_warmup_steps: usize,
    /// Linear warmup as a share of `max_train_steps` instead (sd-scripts' float
    /// `lr_warmup_steps`; 0 = use `lr_warmup_steps`): `⌊ratio · max_train_steps⌋` steps.
    pub lr_warmup_ratio: f64,
    /// Restarts of `cosine_with_restarts`; half-waves of `cosine_with_min_lr` and of
    /// `warmup_stable_decay`'s decay (kohya's `lr_scheduler_num_cycles`).
    pub lr_cycles: usize,
    /// Exponent of the `polynomial` schedule.
    pub lr_scheduler_power: f64,
    /// The share of the learning rate `cosine_with_min_lr` and `warmup_stable_decay` decay
    /// to (kohya's `lr_scheduler_min_lr_ratio`).
    pub lr_scheduler_min_lr_ratio: f64,
    /// Steps of `warmup_stable_decay`'s decay (kohya's integer `lr_decay_steps`).
    pub lr_decay_steps: usize,
    /// Those steps as a share of `max_train_steps` instead (kohya's float `lr_decay_steps`;
    /// 0 = use `lr_decay_steps`).
    pub lr_decay_ratio: f64,
    /// `inverse_sqrt`'s timescale in steps (kohya's `lr_scheduler_timescale`; 0 = the
    /// warmup steps, or 10 000 without warmup, as in transformers).
    pub lr_scheduler_timescale: usize,
    /// The arguments of `piecewise_constant` and of PyTorch's schedulers, by PyTorch's
    /// names (an inline table: `lr_scheduler_args = { T_max = 500, eta_min = 1e-6 }`).
    #[serde(default)]
    pub lr_scheduler_args: LrSchedulerArgs,
    /// AdamW β₁.
    pub adam_beta1: f32,
    /// AdamW β₂.
    pub adam_beta2: f32,
    /// AdamW ε.
    pub adam_epsilon: f32,
    /// AdamW decoupled weight decay.
    pub adam_weight_decay: f32,
    /// AMSGrad (PyTorch's `AdamW(amsgrad=True)`, kohya's `optimizer_args =
    /// ["amsgrad=True"]`): each value's step divides by the largest second moment it has
    /// had, so its step size never grows back when its gradients shrink. With `optimizer =
    /// "adamw"` only; one more vector of optimizer state (the size of the adapters).
    pub amsgrad: bool,
    /// `adamw`, `prodigy` (AdamW with Prodigy's step sizes; β, ε and weight decay are the
    /// `adam_*` keys), `lion` (β from `lion_beta1` / `lion_beta2`, weight decay from
    /// `adam_weight_decay`), `adafactor` (the `adafactor_*` keys, weight decay from
    /// `adam_weight_decay`), `dadapt_adam` (the `dadapt_*` keys and the `adam_*` ones), or
    /// `adamw_schedule_free` / `radam_schedule_free` (the `schedule_free_*` keys and the
    /// `adam_*` ones; no schedule), or `prodigy_plus_schedule_free` (the
    /// `prodigy_plus_*` keys; no schedule), or `came` (the `came_*` keys, weight decay
    /// from `adam_weight_decay`), or `ademamix` (the `ademamix_*` keys and the `adam_*`
    /// ones), or `sgd` (the `sgd_*` keys, L2 weight decay from `adam_weight_decay`).
    pub optimizer: Optimizer,
    /// Lion's β₁ (the sign of `β₁·m + (1 − β₁)·g` is the step; lion-pytorch's default 0.9).
    pub lion_beta1: f32,
    /// Lion's β₂ (the momentum's decay; lion-pytorch's default 0.99).
    pub lion_beta2: f32,
    /// Prodigy's multiplier of its estimate (`d_coef`).
    pub prodigy_d_coef: f32,
    /// Prodigy's initial estimate (`d0`).
    pub prodigy_d0: f32,
    /// Prodigy's largest growth of the estimate per step (`growth_rate`; `inf` = none).
    pub prodigy_growth_rate: f32,
    /// Prodigy's decay of its running sums (`beta3`; 0 = `sqrt(adam_beta2)`).
    pub prodigy_beta3: f32,
    /// Prodigy's `use_bias_correction`.
    pub prodigy_use_bias_correction: bool,
    /// Prodigy's `safeguard_warmup` (for warmup schedules).
    pub prodigy_safeguard_warmup: bool,
    /// DAdaptAdam's initial estimate (`d0`).
    pub dadapt_d0: f32,
    /// DAdaptAdam's largest growth of the estimate per step (`growth_rate`; `inf` = none).
    pub dadapt_growth_rate: f32,
    /// DAdaptAdam's `decouple`: AdamW-style weight decay (`false`: L2 on the gradient).
    pub dadapt_decouple: bool,
    /// DAdaptAdam's `use_bias_correction`.
    pub dadapt_use_bias_correction: bool,
    /// DAdaptSGD's and DAdaptAdaGrad's `momentum` (0: none; `dadapt_sgd` and
    /// `dadapt_adagrad` only).
    pub dadapt_momentum: f32,
    /// DAdaptAdan's third beta (`betas[2]`; `dadapt_adan` only).
    pub dadapt_beta3: f32,
    /// DAdaptAdan's `no_prox`: decoupled instead of proximal weight decay.
    pub dadapt_no_prox: bool,
    /// Schedule-free's polynomial weighting of its average (`r`: step `t` weighs `t^r`;
    /// 0 = uniform).
    pub schedule_free_r: f32,
    /// Schedule-free's weighting of its average by the largest learning rate so far, to
    /// this power (`weight_lr_power`).
    pub schedule_free_weight_lr_power: f32,
    /// `radam_schedule_free`'s first steps, before its rectification is defined: `true`
    /// changes nothing in them, `false` takes plain SGD steps (`silent_sgd_phase`).
    pub schedule_free_silent_sgd_phase: bool,
    /// `prodigy_plus_schedule_free`'s `betas` (β₁, β₂; the package's (0.9, 0.99)).
    pub prodigy_plus_betas: (f32, f32),
    /// Its `beta3`, the decay of the estimate's running sums (0 = `sqrt(β₂)`, the
    /// package's `None`).
    pub prodigy_plus_beta3: f32,
    /// Its `eps` (0 = Adam-atan2, the package's `eps=None`).
    pub prodigy_plus_eps: f32,
    /// Its decoupled `weight_decay`.
    pub prodigy_plus_weight_decay: f32,
    /// Its `weight_decay_by_lr`: the decay scaled by the step size.
    pub prodigy_plus_weight_decay_by_lr: bool,
    /// Its `use_bias_correction` (RAdam's rectification).
    pub prodigy_plus_use_bias_correction: bool,
    /// Its initial estimate `d0`.
    pub prodigy_plus_d0: f32,
    /// Its `d_coef`, the multiplier of the estimate.
    pub prodigy_plus_d_coef: f32,
    /// Its `prodigy_steps`: the estimate frozen after this many steps (0 = never).
    pub prodigy_plus_prodigy_steps: usize,
    /// Its `use_speed` (SPEED: an estimate from signs).
    pub prodigy_plus_use_speed: bool,
    /// Its `split_groups`: one estimate per parameter group.
    pub prodigy_plus_split_groups: bool,
    /// Its `split_groups_mean`: the groups step at their harmonic mean.
    pub prodigy_plus_split_groups_mean: bool,
    /// Its `factored` second moments.
    pub prodigy_plus_factored: bool,
    /// Its `use_stableadamw` (updates clipped per tensor).
    pub prodigy_plus_use_stableadamw: bool,
    /// Its experimental `use_cautious` (C-Optim).
    pub prodigy_plus_use_cautious: bool,
    /// Its experimental `use_grams` (Grams; off with `use_cautious`).
    pub prodigy_plus_use_grams: bool,
    /// Its experimental `use_adopt` (ADOPT's order of the second moments).
    pub prodigy_plus_use_adopt: bool,
    /// Its experimental `use_orthograd` (OrthoGrad).
    pub prodigy_plus_use_orthograd: bool,
    /// Adafactor's `relative_step`: ignore the learning rate, its schedule and warmup, and
    /// step by `min(1e-2, 1/√t)` (times the values' RMS with `adafactor_scale_parameter`).
    pub adafactor_relative_step: bool,
    /// Adafactor's `scale_parameter`: each tensor's step times its RMS (at least
    /// `adafactor_eps2`).
    pub adafactor_scale_parameter: bool,
    /// Adafactor's `warmup_init` (with `adafactor_relative_step`): `min(1e-6·t, 1/√t)`.
    pub adafactor_warmup_init: bool,
    /// Adafactor's `beta1`: a first moment of the updates (0 = none, transformers' `None`).
    pub adafactor_beta1: f32,
    /// Adafactor's `clip_threshold`: largest RMS of a tensor's update before the
    /// learning rate.
    pub adafactor_clip_threshold: f32,
    /// Adafactor's `decay_rate`: step `t` keeps `1 − t^decay_rate` of the second moments.
    pub adafactor_decay_rate: f32,
    /// Adafactor's `eps[0]` (added to the squared gradients) and `eps[1]` (floor of the
    /// values' RMS in `adafactor_scale_parameter`).
    pub adafactor_eps1: f64,
    /// See `adafactor_eps1`.
    pub adafactor_eps2: f64,
    /// CAME's `betas[0]`: the first moment's decay (came-pytorch's default 0.9).
    pub came_beta1: f64,
    /// CAME's `betas[1]`: the squared gradient's running means' decay (0.999).
    pub came_beta2: f64,
    /// CAME's `betas[2]`: the instability's running means' decay (0.9999).
    pub came_beta3: f64,
    /// CAME's `eps[0]`, added to the squared gradients (1e-30).
    pub came_eps1: f64,
    /// CAME's `eps[1]`, added to the squared instability (1e-16).
    pub came_eps2: f64,
    /// CAME's `clip_threshold`: largest RMS of a tensor's update (1.0).
    pub came_clip_threshold: f32,
    /// AdEMAMix's `betas[2]`: the slow first moment's decay (bitsandbytes' 0.9999).
    pub ademamix_beta3: f32,
    /// AdEMAMix's `alpha`: the slow moment's weight (5.0).
    pub ademamix_alpha: f32,
    /// AdEMAMix's `t_alpha`: steps over which `alpha` rises from 0 (0 = none, `None`).
    pub ademamix_t_alpha: usize,
    /// AdEMAMix's `t_beta3`: steps over which `betas[2]` rises from β₁ (0 = none, `None`).
    pub ademamix_t_beta3: usize,
    /// SGD's `momentum` (0.9, kohya's SGDNesterov; 0 = plain SGD).
    pub sgd_momentum: f32,
    /// SGD's `dampening` of the gradient in the momentum buffer (0).
    pub sgd_dampening: f32,
    /// SGD's `nesterov`: step along `g + momentum·buf` (true, kohya's SGDNesterov).
    pub sgd_nesterov: bool,
    /// Clip the global L2 norm of all adapter gradients (UNet and text encoder together)
    /// to this value (0 = off).
    pub max_grad_norm: f32,
    /// kohya's `scale_weight_norms`: after each step, scale down every adapter whose update
    /// `‖ΔW‖` exceeds this (0 = off; 1 is common): max-norm regularization, which keeps
    /// single layers from running away.
    pub scale_weight_norms: f64,
    /// `no` (f32), `bf16` or `fp16`: precision of the frozen base weights; the VAE always
    /// runs in f32.
    pub mixed_precision: MixedPrecision,
    /// Recompute activations in the backward pass instead of storing them (less memory,
    /// slower steps).
    pub gradient_checkpointing: bool,
    /// Training target.
    pub prediction: Prediction,
    /// Min-SNR-γ loss weighting (0 = off; 5 is the usual value).
    pub min_snr_gamma: f64,
    /// Offset noise strength (0 = off; 0.05–0.1 typical).
    pub noise_offset: f64,
    /// kohya's `adaptive_noise_scale`: each sample's channel gets a noise offset of
    /// `max(0, noise_offset + adaptive_noise_scale · |mean of its latent|)` (0 = off; needs
    /// `noise_offset`; kohya suggests a value near `noise_offset`, e.g. 0.05).
    pub adaptive_noise_scale: f64,
    /// Levels of multi-resolution (pyramid) noise added to the noise (0 = off; 6–10 typical).
    pub multires_noise_iterations: usize,
    /// Weight decay per level of multi-resolution noise (0.3 typical).
    pub multires_noise_discount: f64,
    /// Input perturbation: the noised latents get `γ·N(0, 1)` more noise than the target
    /// has (0 = off; 0.1 typical).
    pub ip_noise_gamma: f64,
    /// Draw the noise offset per micro-batch uniformly in `[0, noise_offset)`.
    pub noise_offset_random_strength: bool,
    /// Draw the input perturbation's γ per micro-batch uniformly in `[0, ip_noise_gamma)`.
    pub ip_noise_gamma_random_strength: bool,
    /// Weight each sample's loss by `1/sqrt(SNR)` (ε) or `1/(SNR + 1)` (v-prediction).
    pub debiased_estimation_loss: bool,
    /// v-prediction: weigh each sample's loss by `SNR / (SNR + 1)`, the scale of the
    /// ε-prediction loss (kohya's `scale_v_pred_loss_like_noise_pred`).
    pub scale_v_pred_loss_like_noise_pred: bool,
    /// ε-prediction: add this multiple of a v-prediction-like loss, `loss · (SNR + 1) / SNR`
    /// (kohya's `v_pred_like_loss`; 0: off).
    pub v_pred_like_loss: f64,
    /// The loss: `l2` (MSE), `l1`, `huber` or `smooth_l1` (scheduled pseudo-Huber).
    pub loss_type: LossKind,
    /// How the pseudo-Huber threshold follows the timestep.
    pub huber_schedule: HuberScheduleKind,
    /// The pseudo-Huber threshold `c`.
    pub huber_c: f64,
    /// Scale of the `exponential` and `constant` thresholds.
    pub huber_scale: f64,
    /// Rescale the training noise schedule to zero terminal SNR (Lin et al. 2023; kohya's
    /// `zero_terminal_snr`), for v-prediction models. Unset (`None`): as the model's own
    /// schedule says (a diffusers folder's `rescale_betas_zero_snr`, a single file's
    /// `ztsnr` key); `true` / `false` turn it on or off whatever the model says.
    pub zero_terminal_snr: Option<bool>,
    /// Lowest timestep sampled.
    pub min_timestep: usize,
    /// One past the highest timestep sampled.
    pub max_timestep: usize,
    /// Seed of everything random in training.
    pub seed: u64,
    /// `stop` or `skip` when the loss is not finite.
    pub on_non_finite: OnNonFinite,
}

impl TrainSection {
    /// The warmup's length in steps: `lr_warmup_ratio` of `max_train_steps` when set, else
    /// `lr_warmup_steps`.
    ///
    /// ```
    /// let mut train = trainer::TrainConfig::default().train;
    /// assert_eq!(train.warmup_steps(), train.lr_warmup_steps);
    /// (train.max_train_steps, train.lr_warmup_ratio) = (1000, 0.05);
    /// assert_eq!(train.warmup_steps(), 50);
    /// ```
    pub fn warmup_steps(&self) -> usize {
        if self.lr_warmup_ratio > 0.0 {
            (self.lr_warmup_ratio * self.max_train_steps as f64) as usize
        } else {
            self.lr_warmup_steps
        }
    }

    /// The steps of `warmup_stable_decay`'s decay: `lr_decay_steps`, or
    /// `⌊lr_decay_ratio · max_train_steps⌋` when that is set (as sd-scripts reads a float
    /// `lr_decay_steps`).
    pub fn decay_steps(&self) -> usize {
        if self.lr_decay_ratio > 0.0 {
            (self.lr_decay_ratio * self.max_train_steps as f64) as usize
        } else {
            self.lr_decay_steps
        }
    }

    /// The schedule of a PyTorch `lr_scheduler` or of `piecewise_constant`, from
    /// `lr_scheduler_args` (PyTorch's defaults for the unset ones); `None` for this
    /// trainer's own schedules, which take no `lr_scheduler_args`. An argument the
    /// scheduler does not take, one it needs and lacks, or a value PyTorch refuses is an
    /// error naming it.
    ///
    /// ```
    /// use trainer::config::LrScheduler;
    /// let mut train = trainer::TrainConfig::default().train;
    /// assert!(train.torch_schedule().unwrap().is_none());
    /// train.lr_scheduler = LrScheduler::StepLr;
    /// assert!(train.torch_schedule().unwrap_err().to_string().contains("step_size"));
    /// train.lr_scheduler_args.step_size = Some(100);
    /// let schedule = train.torch_schedule().unwrap().unwrap();
    /// assert_eq!(schedule.lr(1.0, 100), 0.1);
    /// ```
    pub fn torch_schedule(&self) -> Result<Option<lora_core::optim::TorchLrSchedule>, TrainError> {
        use lora_core::optim::TorchLrSchedule as S;
        let a = &self.lr_scheduler_args;
        let name = scheduler_name(self.lr_scheduler);
        let bad = |reason: String| TrainError::Config {
            origin: "train.lr_scheduler_args".into(),
            reason,
        };
        let takes: &[&str] = match self.lr_scheduler {
            LrScheduler::PiecewiseConstant => &["step_rules"],
            LrScheduler::CosineAnnealingLr => &["T_max", "eta_min"],
            LrScheduler::CosineAnnealingWarmRestarts => &["T_0", "T_mult", "eta_min"],
            LrScheduler::StepLr => &["step_size", "gamma"],
            LrScheduler::MultiStepLr => &["milestones", "gamma"],
            LrScheduler::ExponentialLr => &["gamma"],
            LrScheduler::LinearLr => &["start_factor", "end_factor", "total_iters"],
            LrScheduler::ConstantLr => &["factor", "total_iters"],
            LrScheduler::PolynomialLr => &["total_iters", "power"],
            _ => &[],
        };
        if let Some(extra) = a.set_names().into_iter().find(|n| !takes.contains(n)) {
            return Err(bad(if takes.is_empty() {
                format!("`{extra}` is set, but train.lr_scheduler = \"{name}\" takes no lr_scheduler_args (they are for piecewise_constant and PyTorch's schedulers; this one's settings are the train.lr_* keys)")
            } else {
                format!("`{extra}` is not an argument of {name} (it takes {})", takes.join(", "))
            }));
        }
        let need = |value: Option<usize>, arg: &str| value.ok_or_else(|| bad(format!("{name} needs `{arg}` (lr_scheduler_args = {{ {arg} = ... }})")));
        let schedule = match self.lr_scheduler {
            LrScheduler::PiecewiseConstant => {
                let rules = a.step_rules.as_deref().ok_or_else(|| bad(format!("{name} needs `step_rules` (lr_scheduler_args = {{ step_rules = \"1:100,0.5:200,0.1\" }})")))?;
                S::piecewise_constant(rules).map_err(|e| bad(e.to_string()))?
            }
            LrScheduler::CosineAnnealingLr => S::CosineAnnealing { t_max: need(a.t_max, "T_max")?, eta_min: a.eta_min.unwrap_or(0.0) },
            LrScheduler::CosineAnnealingWarmRestarts => S::CosineAnnealingWarmRestarts {
                t_0: need(a.t_0, "T_0")?,
                t_mult: a.t_mult.unwrap_or(1),
                eta_min: a.eta_min.unwrap_or(0.0),
            },
            LrScheduler::StepLr => S::Step { step_size: need(a.step_size, "step_size")?, gamma: a.gamma.unwrap_or(0.1) },
            LrScheduler::MultiStepLr => S::MultiStep {
                milestones: a.milestones.clone().ok_or_else(|| bad(format!("{name} needs `milestones` (lr_scheduler_args = {{ milestones = [500, 800] }})")))?,
                gamma: a.gamma.unwrap_or(0.1),
            },
            LrScheduler::ExponentialLr => S::Exponential {
                gamma: a.gamma.ok_or_else(|| bad(format!("{name} needs `gamma` (lr_scheduler_args = {{ gamma = 0.999 }})")))?,
            },
            LrScheduler::LinearLr => S::Linear {
                start_factor: a.start_factor.unwrap_or(1.0 / 3.0),
                end_factor: a.end_factor.unwrap_or(1.0),
                total_iters: a.total_iters.unwrap_or(5),
            },
            LrScheduler::ConstantLr => S::Constant { factor: a.factor.unwrap_or(1.0 / 3.0), total_iters: a.total_iters.unwrap_or(5) },
            LrScheduler::PolynomialLr => S::Polynomial { total_iters: a.total_iters.unwrap_or(5), power: a.power.unwrap_or(1.0) },
            _ => return Ok(None),
        };
        schedule.validate().map_err(|e| bad(e.to_string()))?;
        Ok(Some(schedule))
    }

    /// DAdaptAdam's own settings with `optimizer = "dadapt_adam"` (`None` otherwise; β, ε
    /// and weight decay are the `adam_*` keys).
    pub fn dadapt_settings(&self) -> Option<lora_core::optim::DAdaptSettings> {
        self.optimizer.dadapt_kind().map(|kind| lora_core::optim::DAdaptSettings {
            kind,
            d0: self.dadapt_d0,
            growth_rate: self.dadapt_growth_rate,
            decouple: self.dadapt_decouple,
            use_bias_correction: self.dadapt_use_bias_correction,
            momentum: self.dadapt_momentum,
            beta_3: self.dadapt_beta3,
            no_prox: self.dadapt_no_prox,
        })
    }

    /// AdEMAMix's own settings with `optimizer = "ademamix"` (`None` otherwise; β₁, β₂, ε
    /// and the weight decay are the `adam_*` keys).
    ///
    /// ```
    /// let mut train = trainer::config::TrainConfig::default().train;
    /// assert!(train.ademamix_settings().is_none());
    /// train.optimizer = trainer::config::Optimizer::Ademamix;
    /// train.ademamix_t_alpha = 1000;
    /// let s = train.ademamix_settings().unwrap();
    /// assert_eq!((s.alpha, s.t_alpha, s.t_beta3), (5.0, Some(1000), None));
    /// ```
    pub fn ademamix_settings(&self) -> Option<lora_core::optim::AdEMAMixSettings> {
        let steps = |n: usize| (n > 0).then_some(n);
        (self.optimizer == Optimizer::Ademamix).then_some(lora_core::optim::AdEMAMixSettings {
            beta_3: self.ademamix_beta3,
            alpha: self.ademamix_alpha,
            t_alpha: steps(self.ademamix_t_alpha),
            t_beta3: steps(self.ademamix_t_beta3),
        })
    }

    /// SGD's settings with `optimizer = "sgd"` (`None` otherwise; the weight decay is
    /// `adam_weight_decay`).
    pub fn sgd_settings(&self) -> Option<lora_core::optim::SgdSettings> {
        (self.optimizer == Optimizer::Sgd).then_some(lora_core::optim::SgdSettings {
            momentum: self.sgd_momentum,
            dampening: self.sgd_dampening,
            nesterov: self.sgd_nesterov,
        })
    }

    /// Schedule-free's settings with a schedule-free `optimizer` (`None` otherwise; β, ε
    /// and the weight decay are the `adam_*` keys).
    pub fn schedule_free_settings(&self) -> Option<lora_core::optim::ScheduleFreeSettings> {
        self.optimizer.is_schedule_free().then_some(lora_core::optim::ScheduleFreeSettings {
            radam: self.optimizer == Optimizer::RadamScheduleFree,
            sgd: self.optimizer == Optimizer::SgdScheduleFree,
            silent_sgd_phase: self.schedule_free_silent_sgd_phase,
            r: self.schedule_free_r,
            weight_lr_power: self.schedule_free_weight_lr_power,
        })
    }

    /// `prodigy_plus_schedule_free`'s settings: the `prodigy_plus_*` keys (whatever the
    /// optimizer).
    ///
    /// ```
    /// let train = trainer::config::TrainConfig::default().train;
    /// assert_eq!(train.prodigy_plus_settings(), lora_core::optim::ProdigyPlusSettings::default());
    /// ```
    pub fn prodigy_plus_settings(&self) -> lora_core::optim::ProdigyPlusSettings {
        lora_core::optim::ProdigyPlusSettings {
            betas: self.prodigy_plus_betas,
            beta3: (self.prodigy_plus_beta3 > 0.0).then_some(self.prodigy_plus_beta3),
            eps: self.prodigy_plus_eps,
            weight_decay: self.prodigy_plus_weight_decay,
            weight_decay_by_lr: self.prodigy_plus_weight_decay_by_lr,
            use_bias_correction: self.prodigy_plus_use_bias_correction,
            d0: self.prodigy_plus_d0,
            d_coef: self.prodigy_plus_d_coef,
            prodigy_steps: self.prodigy_plus_prodigy_steps,
            use_speed: self.prodigy_plus_use_speed,
            split_groups: self.prodigy_plus_split_groups,
            split_groups_mean: self.prodigy_plus_split_groups_mean,
            factored: self.prodigy_plus_factored,
            use_stableadamw: self.prodigy_plus_use_stableadamw,
            use_cautious: self.prodigy_plus_use_cautious,
            use_grams: self.prodigy_plus_use_grams,
            use_adopt: self.prodigy_plus_use_adopt,
            use_orthograd: self.prodigy_plus_use_orthograd,
        }
    }

    /// Sets the `prodigy_plus_*` keys from `settings` (a `beta3` of `None` as 0).
    pub fn set_prodigy_plus_settings(&mut self, settings: lora_core::optim::ProdigyPlusSettings) {
        self.prodigy_plus_betas = settings.betas;
        self.prodigy_plus_beta3 = settings.beta3.unwrap_or(0.0);
        self.prodigy_plus_eps = settings.eps;
        self.prodigy_plus_weight_decay = settings.weight_decay;
        self.prodigy_plus_weight_decay_by_lr = settings.weight_decay_by_lr;
        self.prodigy_plus_use_bias_correction = settings.use_bias_correction;
        self.prodigy_plus_d0 = settings.d0;
        self.prodigy_plus_d_coef = settings.d_coef;
        self.prodigy_plus_prodigy_steps = settings.prodigy_steps;
        self.prodigy_plus_use_speed = settings.use_speed;
        self.prodigy_plus_split_groups = settings.split_groups;
        self.prodigy_plus_split_groups_mean = settings.split_groups_mean;
        self.prodigy_plus_factored = settings.factored;
        self.prodigy_plus_use_stableadamw = settings.use_stableadamw;
        self.prodigy_plus_use_cautious = settings.use_cautious;
        self.prodigy_plus_use_grams = settings.use_grams;
        self.prodigy_plus_use_adopt = settings.use_adopt;
        self.prodigy_plus_use_orthograd = settings.use_orthograd;
    }

    /// Whether Adafactor's relative step replaces the learning rate and its schedule.
    pub fn relative_step(&self) -> bool {
        self.adafactor_settings().is_some_and(|a| a.relative_step)
    }

    /// Adafactor's settings with `optimizer = "adafactor"` (`None` otherwise): the
    /// `adafactor_*` keys, and `adam_weight_decay` as its weight decay.
    ///
    /// ```
    /// let mut train = trainer::config::TrainConfig::default().train;
    /// assert!(train.adafactor_settings().is_none());
    /// train.optimizer = trainer::config::Optimizer::Adafactor;
    /// let settings = train.adafactor_settings().unwrap();
    /// assert!(!settings.relative_step && !settings.scale_parameter && settings.beta_1.is_none());
    /// ```
    pub fn adafactor_settings(&self) -> Option<lora_core::optim::AdafactorSettings> {
        (self.optimizer == Optimizer::Adafactor).then_some(lora_core::optim::AdafactorSettings {
            eps_1: self.adafactor_eps1 as f32,
            eps_2: self.adafactor_eps2 as f32,
            clip_threshold: self.adafactor_clip_threshold,
            decay_rate: self.adafactor_decay_rate,
            beta_1: (self.adafactor_beta1 > 0.0).then_some(self.adafactor_beta1),
            weight_decay: self.adam_weight_decay,
            scale_parameter: self.adafactor_scale_parameter,
            relative_step: self.adafactor_relative_step,
            warmup_init: self.adafactor_warmup_init,
        })
    }

    /// CAME's settings with `optimizer = "came"` (`None` otherwise): the `came_*` keys,
    /// and `adam_weight_decay` as its weight decay.
    ///
    /// ```
    /// let mut train = trainer::config::TrainConfig::default().train;
    /// assert!(train.came_settings().is_none());
    /// train.optimizer = trainer::config::Optimizer::Came;
    /// assert_eq!(train.came_settings().unwrap().beta_3, 0.9999);
    /// ```
    pub fn came_settings(&self) -> Option<lora_core::optim::CameSettings> {
        (self.optimizer == Optimizer::Came).then_some(lora_core::optim::CameSettings {
            eps_1: self.came_eps1 as f32,
            eps_2: self.came_eps2 as f32,
            clip_threshold: self.came_clip_threshold,
            beta_1: self.came_beta1,
            beta_2: self.came_beta2,
            beta_3: self.came_beta3,
            weight_decay: self.adam_weight_decay,
        })
    }
}

/// Outputs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSection {
    /// Output folder.
    pub output_dir: PathBuf,
    /// File stem of the LoRA.
    pub output_name: String,
    /// `kohya` (A1111 / ComfyUI) or `peft` (diffusers).
    pub save_format: lora_core::AdapterFormat,
    /// `f16`, `bf16` or `f32`.
    pub save_precision: lora_core::SaveDtype,
    /// Save the LoRA every N steps as well, as `NAME-stepNNNNNNNN.safetensors`
    /// ([`crate::train::step_save_name`]; 0 = only at the end).
    pub save_every_n_steps: usize,
    /// Save the LoRA at the end of every N-th epoch as well, as `NAME-NNNNNN.safetensors`
    /// ([`crate::train::epoch_save_name`]; 0 = off).
    pub save_every_n_epochs: usize,
    /// kohya's `save_n_epoch_ratio`: about this many epoch saves over the run, i.e. every
    /// `⌊epochs / N⌋` epochs (at least 1); replaces `save_every_n_epochs` (0 = off).
    pub save_n_epoch_ratio: usize,
    /// Keep only the step saves of the last N steps (kohya's `save_last_n_steps`; 0 = all).
    pub save_last_n_steps: usize,
    /// Keep only the last N epoch saves (kohya's `save_last_n_epochs`; 0 = all).
    pub save_last_n_epochs: usize,
    /// With every save, also write the full training state to `<output_dir>/state`
    /// (adapters, optimizer moments, step, data position, random streams) for
    /// `trainer train --resume <output_dir>/state`.
    pub save_state: bool,
    /// Write a sample grid every N steps (0 = only at the end).
    pub sample_every_n_steps: usize,
    /// Write a sample grid at the end of every N-th epoch instead (kohya's
    /// `sample_every_n_epochs`, which then overrides `sample_every_n_steps`; 0 = off).
    pub sample_every_n_epochs: usize,
    /// Prompts of the sample grid (empty: no sample images).
    pub sample_prompts: Vec<String>,
    /// Sampler of the sample grid (any `sd-sched` name).
    pub sample_sampler: String,
    /// Sampling steps.
    pub sample_steps: usize,
    /// Classifier-free guidance scale.
    pub sample_cfg: f32,
    /// Seed of the sample grid.
    pub sample_seed: u64,
    /// Seconds between reads of the steps' losses for `metrics.jsonl` and the progress
    /// line (also before every sample, save and the end). The device decides clipping and
    /// skips itself, so training does not wait for a step between reads; 0 reads every step,
    /// which makes a GPU idle while the host queues the next one. A stop (Ctrl-C) takes
    /// effect at a read.
    pub log_interval_s: f64,
    /// Write the steps' loss, learning rates, gradient norm and (fp16) loss scale as
    /// TensorBoard event files to `<output_dir>/logs` too (`tensorboard --logdir`), at
    /// every read of the steps' numbers.
    pub tensorboard: bool,
    /// With `data.validation_split`: measure the validation loss every N steps as well as
    /// at the end (0 = only at the end).
    pub validate_every_n_steps: usize,
    /// With `data.validation_split`: also measure it at the end of every N-th epoch
    /// (kohya's `validate_every_n_epochs`; 0 = off).
    pub validate_every_n_epochs: usize,
    /// Measure the validation loss on the first N batches of held-out images only
    /// (kohya's `max_validation_steps`; 0 = all).
    pub max_validation_steps: usize,
    /// Also sample before the first step (kohya's `sample_at_first`), to
    /// `samples-step000000.png` (the start step's number with `train.initial_step`): the
    /// base model's images to compare the later grids with.
    pub sample_at_first: bool,
    /// Write only the metadata loading needs (kohya's `no_metadata`): no training settings,
    /// dataset folders or tag counts in the LoRA file (the model spec and hashes stay).
    pub no_metadata: bool,
    /// Free text stored as `ss_training_comment` (kohya's `training_comment`).
    pub training_comment: String,
    /// `modelspec.title` (default: `output_name`), as kohya's `metadata_title`.
    pub metadata_title: String,
    /// `modelspec.author` (kohya's `metadata_author`; empty: not written).
    pub metadata_author: String,
    /// `modelspec.description` (kohya's `metadata_description`).
    pub metadata_description: String,
    /// `modelspec.license` (kohya's `metadata_license`).
    pub metadata_license: String,
    /// `modelspec.tags`, comma-separated (kohya's `metadata_tags`).
    pub metadata_tags: String,
    /// `modelspec.usage_hint` (kohya's `metadata_usage_hint`): a short hint on how to use
    /// the LoRA, e.g. "add mystyle to the prompt".
    pub metadata_usage_hint: String,
    /// `modelspec.trigger_phrase` (kohya's `metadata_trigger_phrase`).
    pub metadata_trigger_phrase: String,
    /// `modelspec.thumbnail` (kohya's `metadata_thumbnail`): an image file, written as a
    /// `data:` URL, or a `data:` URL as it is.
    pub metadata_thumbnail: String,
    /// `modelspec.merged_from` (kohya's `metadata_merged_from`).
    pub metadata_merged_from: String,
    /// `modelspec.preprocessor` (kohya's `metadata_preprocessor`).
    pub metadata_preprocessor: String,
    /// `modelspec.is_negative_embedding` (kohya's `metadata_is_negative_embedding`).
    pub metadata_is_negative_embedding: String,
}

impl OutputSection {
    /// Epoch saves every this many epochs of a run of `epochs`: `save_every_n_epochs`, or
    /// with `save_n_epoch_ratio` `⌊epochs / ratio⌋` (at least 1), as sd-scripts computes
    /// it (0: no epoch saves).
    ///
    /// ```
    /// let mut output = trainer::config::TrainConfig::default().output;
    /// output.save_every_n_epochs = 3;
    /// assert_eq!(output.epoch_save_interval(20), 3);
    /// output.save_n_epoch_ratio = 4;
    /// assert_eq!((output.epoch_save_interval(20), output.epoch_save_interval(3)), (5, 1));
    /// ```
    pub fn epoch_save_interval(&self, epochs: usize) -> usize {
        match self.save_n_epoch_ratio {
            0 => self.save_every_n_epochs,
            ratio => (epochs / ratio).max(1),
        }
    }
}

/// Captions for an embedding trained without its own (kohya's `use_object_template` /
/// `use_style_template`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CaptionTemplate {
    /// The dataset's captions, which hold the word.
    #[default]
    None,
    /// "a photo of a WORD", ... ([`sd_model::textual_inversion::OBJECT_TEMPLATES`]).
    Object,
    /// "a painting in the style of WORD", ... ([`sd_model::textual_inversion::STYLE_TEMPLATES`]).
    Style,
}

impl CaptionTemplate {
    /// The prompts, `{}` for the word; `None` for the dataset's captions.
    pub fn prompts(self) -> Option<&'static [&'static str]> {
        match self {
            Self::None => None,
            Self::Object => Some(sd_model::textual_inversion::OBJECT_TEMPLATES),
            Self::Style => Some(sd_model::textual_inversion::STYLE_TEMPLATES),
        }
    }
}

/// A textual-inversion embedding trained with the run (kohya's `train_textual_inversion.py`;
/// with adapters too, pivotal tuning): new tokens of the text encoder(s) that the word
/// `token` in captions and sample prompts stands for. Off while `token` is empty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingSection {
    /// The word (kohya's `token_string`); empty: no embedding.
    pub token: String,
    /// Vectors (tokens) it has (kohya's `num_vectors_per_token`).
    pub vectors: usize,
    /// A word whose token rows start the vectors, repeated or cut to `vectors` (kohya's
    /// `init_word`); empty: random rows with the vocabulary's per-dimension statistics.
    pub init_word: String,
    /// An embedding file (or a LoRA file bundling one called `token`) to start from
    /// (kohya's `weights`); empty: `init_word`.
    pub weights: String,
    /// Its learning rate; 0: `train.text_encoder_lr`, or `train.learning_rate` when that is
    /// 0 too.
    pub learning_rate: f64,
    /// `object` or `style`: captions made from templates instead of the dataset's (kohya's
    /// `use_object_template` / `use_style_template`); `none`: the captions, which must hold
    /// the word.
    pub template: CaptionTemplate,
    /// The share of `train.max_train_steps` during which the embedding trains (diffusers'
    /// `train_text_encoder_ti_frac`): after step `ceil(fraction · steps)` its vectors stay
    /// as they are and the adapters train on with them; 1: the whole run.
    pub train_fraction: f64,
}

impl Default for EmbeddingSection {
    fn default() -> Self {
        Self { token: String::new(), vectors: 1, init_word: String::new(), weights: String::new(), learning_rate: 0.0, template: CaptionTemplate::None, train_fraction: 1.0 }
    }
}

impl EmbeddingSection {
    /// Whether an embedding is trained.
    pub fn enabled(&self) -> bool {
        !self.token.is_empty()
    }

    /// The steps (of `total`) during which the embedding trains: `train_fraction` of them,
    /// rounded up.
    pub fn train_steps(&self, total: usize) -> usize {
        ((self.train_fraction * total as f64).ceil() as usize).min(total)
    }
}

/// The whole training configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Base model.
    pub model: ModelSection,
    /// Training data.
    pub data: DataSection,
    /// Adapters.
    pub lora: LoraSection,
    /// Optimisation.
    pub train: TrainSection,
    /// Outputs.
    pub output: OutputSection,
    /// A textual-inversion embedding to train (off by default).
    #[serde(default)]
    pub embedding: EmbeddingSection,
}

impl Default for TrainConfig {
    /// The built-in demo: the tiny model on the demo images, a few hundred steps on the CPU.
    fn default() -> Self {
        Self {
            model: ModelSection {
                pretrained: "tiny".into(),
                tiny_seed: 0,
                clip_skip: 1,
                max_token_length: 75,
                vae: String::new(),
                base_weights: vec![],
            },
            data: DataSection {
                train_data_dir: "demo".into(),
                resolution: sd_data::Resolution::square(64),
                demo_images: 24,
                num_repeats: 1,
                skip_bad_images: false,
                min_image_size: 64,
                recursive: true,
                flip_aug: false,
                random_crop: false,
                face_crop_aug_range: None,
                resize_interpolation: None,
                color_aug: false,
                alpha_mask: false,
                mask_dir: String::new(),
                caption_extension: ".txt".into(),
                weighted_captions: false,
                shuffle_caption: false,
                keep_tokens: 0,
                keep_tokens_separator: String::new(),
                caption_prefix: String::new(),
                caption_suffix: String::new(),
                secondary_separator: String::new(),
                caption_separator: ",".into(),
                enable_wildcard: false,
                caption_dropout_rate: 0.0,
                caption_dropout_every_n_epochs: 0,
                caption_tag_dropout_rate: 0.0,
                token_warmup_min: 1,
                token_warmup_step: 0.0,
                enable_bucket: true,
                min_bucket_reso: 256,
                max_bucket_reso: 0,
                bucket_reso_steps: 64,
                bucket_no_upscale: false,
                reg_data_dir: String::new(),
                in_json: String::new(),
                prior_loss_weight: 1.0,
                validation_split: 0.0,
                validation_seed: 0,
                dataset_config: String::new(),
            },
            lora: LoraSection {
                rank: 8,
                alpha: 8.0,
                dropout: 0.0,
                network_dropout: 0.0,
                rank_dropout: 0.0,
                rank_dropout_scale: false,
                lycoris_rank_dropout: false,
                use_scalar: false,
                module_dropout: 0.0,
                rslora: false,
                dora: false,
                algo: lora_core::Algo::Lora,
                lokr_factor: -1,
                constraint: 0.0,
                rescaled: false,
                ia3_on_input: default_ia3_on_input(),
                train_norm: false,
                lokr_decompose_both: false,
                lokr_full_matrix: false,
                lokr_unbalanced_factorization: false,
                use_tucker: false,
                lora_fa: false,
                dylora_unit: 0,
                unet_targets: sd_model::targets::UnetTargets::AttnMlp,
                conv_rank: 0,
                conv_alpha: 1.0,
                include: vec![],
                exclude: vec![],
                text_encoder_targets: sd_model::targets::TextEncoderTargets::None,
                network_weights: String::new(),
                dim_from_weights: false,
                down_lr_weight: String::new(),
                mid_lr_weight: String::new(),
                up_lr_weight: String::new(),
                block_lr_zero_threshold: 0.0,
                block_dims: String::new(),
                block_alphas: String::new(),
                conv_block_dims: String::new(),
                conv_block_alphas: String::new(),
                loraplus_lr_ratio: 0.0,
                loraplus_unet_lr_ratio: 0.0,
                loraplus_text_encoder_lr_ratio: 0.0,
            },
            train: TrainSection {
                max_train_steps: 300,
                max_train_epochs: 0,
                initial_step: 0,
                initial_epoch: 0,
                train_batch_size: 4,
                gradient_accumulation_steps: 1,
                learning_rate: 1e-3,
                text_encoder_lr: 0.0,
                lr_scheduler: LrScheduler::Cosine,
                lr_warmup_steps: 20,
                lr_warmup_ratio: 0.0,
                lr_cycles: 1,
                lr_scheduler_power: 1.0,
                lr_scheduler_min_lr_ratio: 0.0,
                lr_decay_steps: 0,
                lr_decay_ratio: 0.0,
                lr_scheduler_timescale: 0,
                lr_scheduler_args: LrSchedulerArgs::default(),
                adam_beta1: 0.9,
                adam_beta2: 0.999,
                adam_epsilon: 1e-8,
                adam_weight_decay: 1e-2,
                amsgrad: false,
                optimizer: Optimizer::Adamw,
                lion_beta1: 0.9,
                lion_beta2: 0.99,
                prodigy_d_coef: 1.0,
                prodigy_d0: 1e-6,
                prodigy_growth_rate: f32::INFINITY,
                prodigy_beta3: 0.0,
                prodigy_use_bias_correction: false,
                prodigy_safeguard_warmup: false,
                dadapt_d0: 1e-6,
                dadapt_growth_rate: f32::INFINITY,
                dadapt_decouple: true,
                dadapt_use_bias_correction: false,
                dadapt_momentum: 0.0,
                dadapt_beta3: 0.99,
                dadapt_no_prox: false,
                schedule_free_r: 0.0,
                schedule_free_weight_lr_power: 2.0,
                schedule_free_silent_sgd_phase: true,
                prodigy_plus_betas: (0.9, 0.99),
                prodigy_plus_beta3: 0.0,
                prodigy_plus_eps: 1e-8,
                prodigy_plus_weight_decay: 0.0,
                prodigy_plus_weight_decay_by_lr: true,
                prodigy_plus_use_bias_correction: false,
                prodigy_plus_d0: 1e-6,
                prodigy_plus_d_coef: 1.0,
                prodigy_plus_prodigy_steps: 0,
                prodigy_plus_use_speed: false,
                prodigy_plus_split_groups: true,
                prodigy_plus_split_groups_mean: true,
                prodigy_plus_factored: true,
                prodigy_plus_use_stableadamw: true,
                prodigy_plus_use_cautious: false,
                prodigy_plus_use_grams: false,
                prodigy_plus_use_adopt: false,
                prodigy_plus_use_orthograd: false,
                adafactor_relative_step: false,
                adafactor_scale_parameter: false,
                adafactor_warmup_init: false,
                adafactor_beta1: 0.0,
                adafactor_clip_threshold: 1.0,
                adafactor_decay_rate: -0.8,
                adafactor_eps1: 1e-30,
                adafactor_eps2: 1e-3,
                came_beta1: 0.9,
                came_beta2: 0.999,
                came_beta3: 0.9999,
                came_eps1: 1e-30,
                came_eps2: 1e-16,
                came_clip_threshold: 1.0,
                ademamix_beta3: 0.9999,
                ademamix_alpha: 5.0,
                ademamix_t_alpha: 0,
                ademamix_t_beta3: 0,
                sgd_momentum: 0.9,
                sgd_dampening: 0.0,
                sgd_nesterov: true,
                max_grad_norm: 1.0,
                scale_weight_norms: 0.0,
                mixed_precision: MixedPrecision::No,
                gradient_checkpointing: false,
                prediction: Prediction::Auto,
                min_snr_gamma: 5.0,
                noise_offset: 0.0,
                adaptive_noise_scale: 0.0,
                multires_noise_iterations: 0,
                multires_noise_discount: 0.3,
                ip_noise_gamma: 0.0,
                noise_offset_random_strength: false,
                ip_noise_gamma_random_strength: false,
                debiased_estimation_loss: false,
                scale_v_pred_loss_like_noise_pred: false,
                v_pred_like_loss: 0.0,
                zero_terminal_snr: None,
                loss_type: LossKind::L2,
                huber_schedule: HuberScheduleKind::Snr,
                huber_c: 0.1,
                huber_scale: 1.0,
                min_timestep: 0,
                max_timestep: 1000,
                seed: 42,
                on_non_finite: OnNonFinite::Stop,
            },
            output: OutputSection {
                output_dir: "outputs/demo".into(),
                output_name: "demo_lora".into(),
                save_format: lora_core::AdapterFormat::Kohya,
                save_precision: lora_core::SaveDtype::F16,
                save_every_n_steps: 0,
                save_every_n_epochs: 0,
                save_n_epoch_ratio: 0,
                save_last_n_steps: 0,
                save_last_n_epochs: 0,
                save_state: true,
                sample_every_n_steps: 0,
                sample_every_n_epochs: 0,
                sample_prompts: vec![
                    "a large red circle over a blue field, demostyle".into(),
                    "a small yellow square over a green field, demostyle".into(),
                    "a purple triangle over an orange field, demostyle".into(),
                    "a red circle over a blue field".into(),
                ],
                sample_sampler: "ddim".into(),
                sample_steps: 20,
                sample_cfg: 5.0,
                sample_seed: 1234,
                log_interval_s: 1.0,
                tensorboard: true,
                validate_every_n_steps: 0,
                validate_every_n_epochs: 0,
                max_validation_steps: 0,
                sample_at_first: false,
                no_metadata: false,
                training_comment: String::new(),
                metadata_title: String::new(),
                metadata_author: String::new(),
                metadata_description: String::new(),
                metadata_license: String::new(),
                metadata_tags: String::new(),
                metadata_usage_hint: String::new(),
                metadata_trigger_phrase: String::new(),
                metadata_thumbnail: String::new(),
                metadata_merged_from: String::new(),
                metadata_preprocessor: String::new(),
                metadata_is_negative_embedding: String::new(),
            },
            embedding: EmbeddingSection::default(),
        }
    }
}

/// Levenshtein distance, for "did you mean" suggestions.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut prev = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let cur = row[j + 1];
            row[j + 1] = (prev + usize::from(ca != *cb)).min(row[j] + 1).min(row[j + 1] + 1);
            prev = cur;
        }
    }
    row[b.len()]
}

/// The valid key closest to `unknown` among `candidates`.
pub fn nearest<'a>(unknown: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .into_iter()
        .map(|c| (edit_distance(unknown, c), c))
        .min()
        .filter(|(d, c)| *d <= (c.len().max(unknown.len()) / 2).max(2))
        .map(|(_, c)| c)
}

/// All valid dotted keys of the configuration (`train.learning_rate`, ...), optional ones
/// (unset by default, such as `data.face_crop_aug_range`) included.
pub fn valid_keys() -> Vec<String> {
    let sections = [
        ("model", struct_fields::<ModelSection>()),
        ("data", struct_fields::<DataSection>()),
        ("lora", struct_fields::<LoraSection>()),
        ("train", struct_fields::<TrainSection>()),
        ("output", struct_fields::<OutputSection>()),
        ("embedding", struct_fields::<EmbeddingSection>()),
    ];
    let mut keys: Vec<String> = sections.iter().flat_map(|(section, fields)| fields.iter().map(move |f| format!("{section}.{f}"))).collect();
    keys.sort();
    keys
}

/// The field names serde reads for the struct `T`. The defaults serialized leave out
/// fields that are unset (`Option`s skipped when `None`), so the names come from `T`'s
/// `Deserialize`, which hands them to the deserializer.
fn struct_fields<T: serde::de::DeserializeOwned>() -> Vec<&'static str> {
    use serde::de::{Error, Visitor};
    struct Probe<'a>(&'a mut Vec<&'static str>);
    impl<'de> serde::Deserializer<'de> for Probe<'_> {
        type Error = serde::de::value::Error;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Self::Error> {
            Err(Self::Error::custom("not a struct"))
        }
        fn deserialize_struct<V: Visitor<'de>>(self, _: &'static str, fields: &'static [&'static str], _: V) -> Result<V::Value, Self::Error> {
            self.0.extend_from_slice(fields);
            Err(Self::Error::custom("fields read"))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
            unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
        }
    }
    let mut fields = Vec::new();
    let _ = T::deserialize(Probe(&mut fields));
    fields
}

/// Finds keys of `value` that the configuration does not have, with suggestions.
fn check_keys(value: &toml::Value, origin: &str) -> Result<(), TrainError> {
    let valid = valid_keys();
    let sections: Vec<&str> = valid.iter().filter_map(|k| k.split_once('.').map(|(s, _)| s)).collect();
    let toml::Value::Table(table) = value else { return Ok(()) };
    for (section, v) in table {
        if !sections.contains(&section.as_str()) {
            return Err(TrainError::Config {
                origin: origin.into(),
                reason: match nearest(section, sections.iter().copied()) {
                    Some(s) => format!("unknown section `[{section}]`; did you mean `[{s}]`?"),
                    None => format!("unknown section `[{section}]`; sections are model, data, lora, train, output, embedding"),
                },
            });
        }
        let toml::Value::Table(fields) = v else {
            return Err(TrainError::Config {
                origin: origin.into(),
                reason: format!("`{section}` must be a table"),
            });
        };
        for key in fields.keys() {
            let full = format!("{section}.{key}");
            if !valid.contains(&full) {
                let hint = nearest(&full, valid.iter().map(String::as_str))
                    .map(|n| format!("; did you mean `{n}`?"))
                    .unwrap_or_default();
                return Err(TrainError::Config {
                    origin: origin.into(),
                    reason: format!("unknown key `{full}`{hint}"),
                });
            }
        }
    }
    Ok(())
}

/// Whether a TOML tree is a kohya sd-scripts training config (its options at the top
/// level or in tables like `[model_arguments]`), which has no section of this trainer's.
fn looks_like_kohya(value: &toml::Value) -> bool {
    const KOHYA: [&str; 4] = ["pretrained_model_name_or_path", "network_module", "network_dim", "train_data_dir"];
    let toml::Value::Table(table) = value else { return false };
    let ours = ["model", "data", "lora", "train", "output"];
    let has = |t: &toml::Table| KOHYA.iter().any(|k| t.contains_key(*k));
    !table.keys().any(|k| ours.contains(&k.as_str())) && (has(table) || table.values().any(|v| v.as_table().is_some_and(has)))
}

/// Sets `section.key = value` in a TOML tree; `value` is parsed as TOML (`3e-4`, `true`,
/// `"text"`, `[1, 2]`) and taken as a plain string when it does not parse.
fn set_key(tree: &mut toml::Value, assignment: &str) -> Result<(), TrainError> {
    let bad = |reason: String| TrainError::Config {
        origin: format!("--set {assignment}"),
        reason,
    };
    let (key, raw) = assignment.split_once('=').ok_or_else(|| bad("expected KEY=VALUE".into()))?;
    let (section, field) = key.trim().split_once('.').ok_or_else(|| bad("KEY must be SECTION.NAME, e.g. train.learning_rate".into()))?;
    let value = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    let toml::Value::Table(root) = tree else { return Err(bad("configuration is not a table".into())) };
    // `train.lr_scheduler_args.T_max`: a key of a table inside the section.
    let mut path: Vec<&str> = std::iter::once(section).chain(field.split('.')).collect();
    let last = path.pop().unwrap_or(field);
    let mut table = root;
    for (depth, name) in path.iter().enumerate() {
        let entry = table.entry(name.to_string()).or_insert_with(|| toml::Value::Table(Default::default()));
        match entry {
            toml::Value::Table(t) => table = t,
            _ => return Err(bad(format!("`{}` is not a table", path[..=depth].join(".")))),
        }
    }
    table.insert(last.to_string(), value);
    Ok(())
}

/// The first of `sets` after which `tree` (which reads well) no longer reads as a
/// configuration: the assignment an error should name, rather than all of them.
fn first_bad_set(mut tree: toml::Value, sets: &[String]) -> Option<&String> {
    sets.iter().find(|s| set_key(&mut tree, s).is_err() || tree.clone().try_into::<TrainConfig>().is_err())
}

impl TrainConfig {
    /// The defaults, overridden by `file` (if any) and then by `--set` assignments. Every
    /// unknown key is an error naming the nearest valid key.
    pub fn load(file: Option<&Path>, sets: &[String]) -> Result<Self, TrainError> {
        let mut tree = toml::Value::try_from(Self::default()).map_err(|e| TrainError::Config {
            origin: "defaults".into(),
            reason: e.to_string(),
        })?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| TrainError::Io {
                path: path.to_path_buf(),
                source,
            })?;
            let user: toml::Value = toml::from_str(&text).map_err(|e| TrainError::Config {
                origin: path.display().to_string(),
                reason: e.to_string(),
            })?;
            if looks_like_kohya(&user) {
                return Err(TrainError::Config {
                    origin: path.display().to_string(),
                    reason: format!(
                        "this is a kohya sd-scripts training config, not this trainer's; convert it with `trainer import-kohya {} --out my-lora.toml` and train with `--config my-lora.toml`",
                        path.display()
                    ),
                });
            }
            check_keys(&user, &path.display().to_string())?;
            merge(&mut tree, user);
        }
        let from_file = (!sets.is_empty()).then(|| tree.clone());
        for s in sets {
            set_key(&mut tree, s)?;
        }
        check_keys(&tree, "--set")?;
        let config: Self = tree.try_into().map_err(|e: toml::de::Error| {
            // The file's values alone read well: then a --set value is the bad one.
            let origin = match (file, from_file) {
                (Some(p), Some(t)) if t.clone().try_into::<Self>().is_err() => p.display().to_string(),
                (_, Some(t)) => first_bad_set(t, sets).map_or_else(|| format!("--set {}", sets.join(" --set ")), |s| format!("--set {s}")),
                (Some(p), None) => p.display().to_string(),
                (None, None) => "--set".into(),
            };
            TrainError::Config { origin, reason: e.to_string() }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// The block-wise settings checked in the numbering of `model.pretrained` (SDXL's 23
    /// blocks or SD1.x / SD2.x's 25). A model that cannot be read here (yet) is reported
    /// when training starts; its settings only need to fit one of the numberings.
    fn check_block_settings(&self) -> Result<(), TrainError> {
        use sd_model::blocks::BlockLayout;
        match sd_pipeline::is_sdxl(&self.model.pretrained) {
            Ok(sdxl) => self.lora.block_plan(if sdxl { BlockLayout::Sdxl } else { BlockLayout::Sd }).map(drop),
            Err(_) => match self.lora.block_plan(BlockLayout::Sd) {
                Ok(_) => Ok(()),
                Err(e) => self.lora.block_plan(BlockLayout::Sdxl).map(drop).map_err(|_| e),
            },
        }
    }

    /// Checks value ranges.
    pub fn validate(&self) -> Result<(), TrainError> {
        let bad = |reason: &str| {
            Err(TrainError::Config {
                origin: "configuration".into(),
                reason: reason.into(),
            })
        };
        let t = &self.train;
        if t.max_train_steps == 0 || t.train_batch_size == 0 || t.gradient_accumulation_steps == 0 {
            return bad("train.max_train_steps, train.train_batch_size and train.gradient_accumulation_steps must be at least 1");
        }
        if t.max_train_steps > MAX_TRAIN_STEPS {
            return bad(&format!("train.max_train_steps = {} is more than the {MAX_TRAIN_STEPS} steps a run may have", t.max_train_steps));
        }
        if !(t.learning_rate.is_finite() && t.learning_rate > 0.0) {
            return bad("train.learning_rate must be positive");
        }
        if !(t.text_encoder_lr.is_finite() && t.text_encoder_lr >= 0.0) {
            return bad("train.text_encoder_lr must be 0 (same as learning_rate) or positive");
        }
        // 0 turns these off; a negative or NaN value would silently too.
        if !(t.max_grad_norm.is_finite() && t.max_grad_norm >= 0.0) {
            return bad(&format!("train.max_grad_norm must be 0 (no clipping) or a positive norm, got {}", t.max_grad_norm));
        }
        if !(t.min_snr_gamma.is_finite() && t.min_snr_gamma >= 0.0) {
            return bad(&format!("train.min_snr_gamma must be 0 (off) or positive, got {}", t.min_snr_gamma));
        }
        if !(self.lora.alpha.is_finite() && self.lora.conv_alpha.is_finite()) {
            return bad("lora.alpha and lora.conv_alpha must be finite numbers");
        }
        self.check_paths()?;
        let prodigy = [t.prodigy_d_coef, t.prodigy_d0];
        let growth_ok = t.prodigy_growth_rate >= 1.0; // NaN fails
        if !prodigy.iter().all(|v| v.is_finite() && *v > 0.0) || !growth_ok || !(0.0..1.0).contains(&t.prodigy_beta3) {
            return bad("train.prodigy_d_coef and train.prodigy_d0 must be positive, train.prodigy_growth_rate at least 1 (inf: no limit), train.prodigy_beta3 in [0, 1) (0: sqrt(adam_beta2))");
        }
        if ![t.lion_beta1, t.lion_beta2].iter().all(|b| (0.0..=1.0).contains(b)) {
            return bad("train.lion_beta1 and train.lion_beta2 must be in [0, 1]");
        }
        // torch's AdamW, prodigyopt and dadaptation refuse betas outside [0, 1). ε must be
        // positive: torch accepts 0, but a LoRA's `down` gets an exactly zero gradient in its
        // first step (its `up` starts at zero), and Adam's `m / (√v + ε)` is then 0 / 0.
        let eps_ok = t.adam_epsilon.is_finite() && t.adam_epsilon > 0.0;
        if !((0.0..1.0).contains(&t.adam_beta1) && (0.0..1.0).contains(&t.adam_beta2) && eps_ok) {
            return bad("train.adam_beta1 and train.adam_beta2 must be in [0, 1) and train.adam_epsilon positive (0 makes Adam divide zero by zero where a gradient is exactly 0, as a LoRA's `down` in its first step)");
        }
        if !(t.adam_weight_decay.is_finite() && t.adam_weight_decay >= 0.0) {
            return bad("train.adam_weight_decay must be at least 0");
        }
        if t.amsgrad && t.optimizer != Optimizer::Adamw {
            let name = serde_json::to_value(t.optimizer).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
            return Err(TrainError::Config { origin: "train.amsgrad".into(), reason: format!("is AdamW's (optimizer = \"adamw\"); train.optimizer is \"{name}\"") });
        }
        if t.torch_schedule()?.is_some() && t.warmup_steps() > 0 && !t.optimizer.is_schedule_free() {
            return bad(&format!(
                "train.lr_scheduler = \"{}\" has no warmup (sd-scripts refuses lr_warmup_steps with lr_scheduler_type and ignores it with piecewise_constant): set train.lr_warmup_steps = 0 and train.lr_warmup_ratio = 0",
                scheduler_name(t.lr_scheduler)
            ));
        }
        if t.optimizer.is_schedule_free() {
            if t.lr_scheduler != LrScheduler::Constant {
                return bad(&format!(
                    "train.lr_scheduler = \"{}\" with a schedule-free train.optimizer, which replaces the schedule (sd-scripts ignores lr_scheduler with one): set \"constant\" (train.lr_warmup_steps still warms up)",
                    scheduler_name(t.lr_scheduler)
                ));
            }
            if t.adam_beta1 == 0.0 && matches!(t.optimizer, Optimizer::AdamwScheduleFree | Optimizer::RadamScheduleFree) {
                return bad("train.adam_beta1 must be above 0 with a schedule-free optimizer (its average is recovered dividing by it)");
            }
            let weights = [t.schedule_free_r, t.schedule_free_weight_lr_power];
            if !weights.iter().all(|w| w.is_finite() && *w >= 0.0) {
                return bad("train.schedule_free_r and train.schedule_free_weight_lr_power must be at least 0");
            }
        }
        if let Some(Err(e)) = t.came_settings().map(|c| c.validate()) {
            return bad(&format!("train.came_*: {e}"));
        }
        let adamw = self.optimizer_settings().0;
        if let Some(Err(e)) = t.ademamix_settings().map(|a| a.validate(&adamw)) {
            return bad(&format!("train.ademamix_* / train.adam_*: {e}"));
        }
        if let Some(Err(e)) = t.sgd_settings().map(|a| a.validate(&adamw)) {
            return bad(&format!("train.sgd_*: {e}"));
        }
        if let Some(Err(e)) = t.dadapt_settings().map(|a| a.validate(&adamw)) {
            return bad(&format!("train.dadapt_*: {e}"));
        }
        if let Some(Err(e)) = t.schedule_free_settings().filter(|s| s.sgd).map(|s| s.validate(&adamw)) {
            return bad(&format!("train.sgd_momentum with sgd_schedule_free: {e}"));
        }
        if t.optimizer == Optimizer::ProdigyPlusScheduleFree && let Err(e) = t.prodigy_plus_settings().validate() {
            return bad(&format!("train.prodigy_plus_*: {e}"));
        }
        if !(t.dadapt_d0.is_finite() && t.dadapt_d0 > 0.0) || t.dadapt_growth_rate < 1.0 || t.dadapt_growth_rate.is_nan() {
            return bad("train.dadapt_d0 must be positive and train.dadapt_growth_rate at least 1 (inf: no limit)");
        }
        if t.adafactor_warmup_init && !t.adafactor_relative_step && t.optimizer == Optimizer::Adafactor {
            return bad("train.adafactor_warmup_init needs train.adafactor_relative_step = true (as in transformers)");
        }
        let clip_ok = t.adafactor_clip_threshold.is_finite() && t.adafactor_clip_threshold > 0.0;
        let decay_ok = t.adafactor_decay_rate.is_finite() && t.adafactor_decay_rate < 0.0;
        if !((0.0..1.0).contains(&t.adafactor_beta1) && clip_ok && decay_ok) {
            return bad("train.adafactor_beta1 must be in [0, 1) (0: no first moment), train.adafactor_clip_threshold positive, train.adafactor_decay_rate negative (-0.8 is usual)");
        }
        // Checked as the optimizer takes them, in f32 (1e-50 is 0 there).
        let (eps1, eps2) = (t.adafactor_eps1 as f32, t.adafactor_eps2 as f32);
        if !(eps1.is_finite() && eps1 >= 0.0 && eps2.is_finite() && eps2 > 0.0) {
            return bad("train.adafactor_eps1 must be at least 0 and train.adafactor_eps2 positive");
        }
        if !(t.scale_weight_norms.is_finite() && t.scale_weight_norms >= 0.0) {
            return bad("train.scale_weight_norms must be 0 (off) or a positive norm");
        }
        if !self.data.in_json.is_empty() && (self.data.train_data_dir == "demo" || !self.data.dataset_config.is_empty()) {
            return bad("data.in_json names the training images itself: set data.train_data_dir to the folder its keys are relative to (\"\" for absolute keys), without data.dataset_config (whose subsets take `metadata_file`)");
        }
        if !self.data.in_json.is_empty() && !Path::new(&self.data.in_json).is_file() {
            return bad(&format!("data.in_json = \"{}\" is not a file", self.data.in_json));
        }
        if self.data.alpha_mask && !self.data.mask_dir.is_empty() {
            return bad("data.alpha_mask and data.mask_dir both give loss masks; set one of them");
        }
        if let Some([lo, hi]) = self.data.face_crop_aug_range {
            if !(lo.is_finite() && hi.is_finite() && lo > 0.0 && lo <= hi) {
                return bad(&format!("data.face_crop_aug_range must be two positive numbers [lo, hi] with lo <= hi (a face of 1/hi to 1/lo of the resolution's shorter side), got [{lo}, {hi}]"));
            }
            let kohya_dataset = Path::new(&self.data.dataset_config).extension().is_some_and(|e| e.eq_ignore_ascii_case("toml"));
            if !self.data.dataset_config.is_empty() && !kohya_dataset {
                return bad("data.face_crop_aug_range does not reach the subsets of a .json data.dataset_config: set `face_crop_aug_range` on them");
            }
            // A kohya dataset config sets its own enable_bucket (checked with its subsets).
            if self.data.enable_bucket && !kohya_dataset {
                return bad("data.face_crop_aug_range needs data.enable_bucket = false: faces are cropped around only without buckets (sd-scripts ignores the option with them)");
            }
            if self.data.train_data_dir == "demo" && self.data.dataset_config.is_empty() {
                return bad("data.face_crop_aug_range crops around faces named in image file names (`name_cx_cy_w_h.png`); the demo images have none");
            }
        }
        if !self.data.mask_dir.is_empty() && (self.data.train_data_dir == "demo" || !self.data.dataset_config.is_empty()) {
            return bad("data.mask_dir needs data.train_data_dir to be an image folder (with data.dataset_config, set `mask_dir` on its subsets)");
        }
        let kohya_dataset = Path::new(&self.data.dataset_config).extension().is_some_and(|e| e.eq_ignore_ascii_case("toml"));
        if self.data.alpha_mask && !self.data.dataset_config.is_empty() && !kohya_dataset {
            return bad("data.alpha_mask does not reach the subsets of a .json data.dataset_config: set `alpha_mask` on them");
        }
        self.check_data_rates()?;
        if !self.data.token_warmup_step.is_finite() || self.data.token_warmup_step < 0.0 {
            return bad("data.token_warmup_step must be a number of steps of at least 0 (a fraction of train.max_train_steps below 1; 0 = off)");
        }
        if !(0.0..1.0).contains(&self.data.validation_split) {
            return bad("data.validation_split must be at least 0 (none) and below 1");
        }
        if !(0.0..1.0).contains(&t.lr_warmup_ratio) {
            return bad("train.lr_warmup_ratio must be at least 0 (off: train.lr_warmup_steps) and below 1");
        }
        if !(0.0..=1.0).contains(&self.train.lr_scheduler_min_lr_ratio) || !(0.0..1.0).contains(&self.train.lr_decay_ratio) {
            return bad("train.lr_scheduler_min_lr_ratio must be in [0, 1] and train.lr_decay_ratio in [0, 1)");
        }
        if self.data.caption_separator.is_empty() {
            return bad("data.caption_separator must not be empty (\",\" splits captions into tags)");
        }
        if !(self.train.lr_scheduler_power.is_finite() && self.train.lr_scheduler_power > 0.0) {
            return bad("train.lr_scheduler_power must be positive");
        }
        if !(self.train.huber_c > 0.0 && self.train.huber_c <= 1.0 && self.train.huber_scale.is_finite() && self.train.huber_scale > 0.0) {
            return bad("train.huber_c must be in (0, 1] and train.huber_scale positive");
        }
        if t.multires_noise_iterations > sd_sched::training::MAX_PYRAMID_LEVELS {
            return bad(&format!(
                "train.multires_noise_iterations = {} is past the {} levels any latent size has (each level is at most half the last one's size; 6 to 10 are usual)",
                t.multires_noise_iterations,
                sd_sched::training::MAX_PYRAMID_LEVELS
            ));
        }
        let discount_ok = t.multires_noise_discount.is_finite() && t.multires_noise_discount > 0.0;
        if !(discount_ok && t.ip_noise_gamma.is_finite() && t.ip_noise_gamma >= 0.0) {
            return bad("train.multires_noise_discount must be positive and train.ip_noise_gamma 0 (off) or positive");
        }
        if !(t.noise_offset.is_finite() && t.adaptive_noise_scale.is_finite()) {
            return bad("train.noise_offset and train.adaptive_noise_scale must be finite numbers");
        }
        if t.adaptive_noise_scale != 0.0 && t.noise_offset == 0.0 {
            return bad("train.adaptive_noise_scale needs train.noise_offset (it scales the offset per channel; kohya refuses it without one)");
        }
        if !(t.v_pred_like_loss.is_finite() && t.v_pred_like_loss >= 0.0) {
            return bad("train.v_pred_like_loss must be 0 (off) or positive");
        }
        if t.min_timestep >= t.max_timestep || t.max_timestep > 1000 {
            return bad("train.min_timestep must be below train.max_timestep, which is at most 1000");
        }
        if self.lora.rank == 0 {
            return bad("lora.rank must be at least 1");
        }
        let l = &self.lora;
        let dropouts = [l.dropout, l.network_dropout, l.rank_dropout, l.module_dropout];
        if !dropouts.iter().all(|p| (0.0..1.0).contains(p)) {
            return bad("lora.dropout, lora.network_dropout, lora.rank_dropout and lora.module_dropout must be in [0, 1)");
        }
        if t.gradient_checkpointing && dropouts.iter().any(|p| *p > 0.0) {
            // The checkpointed forward pass runs without a graph (no dropout) and each
            // block's recomputation draws its own masks: the gradients would belong to no
            // single masked pass.
            return bad("train.gradient_checkpointing cannot be combined with lora.dropout, lora.network_dropout, lora.rank_dropout or lora.module_dropout: the recomputed blocks would draw other dropout masks than the forward pass; turn one of them off");
        }
        if !(self.lora.conv_alpha.is_finite() && self.lora.conv_alpha >= 0.0) {
            return bad("lora.conv_alpha must be 0 (= conv_rank) or positive");
        }
        self.check_train_norm()?;
        self.check_lycoris()?;
        self.check_lora_fa()?;
        self.check_dylora()?;
        self.check_embedding()?;
        for entry in &self.model.base_weights {
            let file: sd_model::lora::LoraFile = entry.parse().map_err(|e: String| TrainError::Config { origin: "model.base_weights".into(), reason: e })?;
            if !file.path.is_file() {
                return bad(&format!("model.base_weights: there is no file at {}", file.path.display()));
            }
        }
        let weights = std::path::Path::new(&self.lora.network_weights);
        if !self.lora.network_weights.is_empty() && !weights.is_file() {
            return bad(&format!("lora.network_weights: there is no file at {}", weights.display()));
        }
        let l = &self.lora;
        if ![l.loraplus_lr_ratio, l.loraplus_unet_lr_ratio, l.loraplus_text_encoder_lr_ratio, l.block_lr_zero_threshold].iter().all(|r| r.is_finite() && *r >= 0.0) {
            return bad("lora.loraplus_lr_ratio, lora.loraplus_unet_lr_ratio, lora.loraplus_text_encoder_lr_ratio (0: off) and lora.block_lr_zero_threshold must be 0 or positive");
        }
        self.check_block_settings()?;
        let block_ranks = [&l.block_dims, &l.block_alphas, &l.conv_block_dims, &l.conv_block_alphas].iter().any(|t| !t.trim().is_empty());
        if l.dim_from_weights && block_ranks {
            return bad("lora.dim_from_weights takes the ranks and alphas from lora.network_weights; lora.block_dims, block_alphas, conv_block_dims and conv_block_alphas cannot apply");
        }
        if self.lora.dim_from_weights && self.lora.network_weights.is_empty() {
            return bad("lora.dim_from_weights takes the adapters from lora.network_weights, which is not set");
        }
        if self.model.clip_skip == 0 {
            return bad("model.clip_skip must be at least 1");
        }
        let tokens = self.model.max_token_length;
        if !sd_pipeline::text::is_max_token_length(tokens) {
            return bad(&format!("model.max_token_length must be 75, 150 or 225 (a multiple of 75 up to {}), got {tokens}", 75 * MAX_TOKEN_ROWS));
        }
        if !(1..=MAX_SAMPLE_STEPS).contains(&self.output.sample_steps) {
            return bad(&format!("output.sample_steps must be 1 to {MAX_SAMPLE_STEPS} (the model's training timesteps), got {}", self.output.sample_steps));
        }
        if !self.output.sample_cfg.is_finite() {
            return bad("output.sample_cfg must be a finite guidance scale");
        }
        // Per-prompt options (`--w 768 --l 7`) are checked here, not at the first sample.
        let defaults = self.sample_defaults((0, 0));
        for prompt in &self.output.sample_prompts {
            sd_pipeline::parse_sample_prompt(prompt, &defaults)?;
        }
        if !(self.output.log_interval_s.is_finite() && self.output.log_interval_s >= 0.0) {
            return bad("output.log_interval_s must be 0 (every step) or a positive number of seconds");
        }
        // The thumbnail is read at every save: it must be there from the start.
        if let Err(e) = crate::metadata::thumbnail_url(&self.output.metadata_thumbnail) {
            return bad(&format!("output.metadata_thumbnail = \"{}\" cannot be read: {e} (an image file or a data: URL)", self.output.metadata_thumbnail));
        }
        Ok(())
    }

    /// The paths a run reads first and writes to: a model, an output folder that is one
    /// (or is not there yet), an output name that stays in it; the data's repeats and demo
    /// images, and a resolution it can be drawn at. Checked before anything is read or
    /// written.
    fn check_paths(&self) -> Result<(), TrainError> {
        let bad = |origin: &str, reason: String| Err(TrainError::Config { origin: origin.into(), reason });
        if self.model.pretrained.trim().is_empty() {
            return bad("model.pretrained", "is empty: expected `tiny`, `tiny-sdxl`, a diffusers folder or a single-file checkpoint".into());
        }
        let dir = &self.output.output_dir;
        if dir.as_os_str().is_empty() {
            return bad("output.output_dir", "is empty: name a folder for the run's outputs (\"\" would write into the current folder)".into());
        }
        if dir.exists() && !dir.is_dir() {
            return bad("output.output_dir", format!("= \"{}\" is a file, not a folder", dir.display()));
        }
        let name = &self.output.output_name;
        let escapes = name.contains(['/', '\\']) || name.starts_with('.') || name.trim().is_empty();
        if escapes {
            return bad("output.output_name", format!("= \"{name}\": expected a file name without folders or a leading dot (the files go into output.output_dir)"));
        }
        if self.data.num_repeats == 0 {
            return bad("data.num_repeats", "= 0: expected at least 1 (repeats of each image per epoch)".into());
        }
        // The demo's images are drawn in memory at `resolution` before training starts.
        if self.data.train_data_dir == "demo" && !(1..=MAX_DEMO_IMAGES).contains(&self.data.demo_images) {
            return bad("data.demo_images", format!("= {}: expected 1 to {MAX_DEMO_IMAGES} (the built-in demo's images, drawn in memory; train on a folder of your own for more)", self.data.demo_images));
        }
        let r = &self.data.resolution;
        if r.width.min(r.height) < 8 {
            return bad("data.resolution", format!("= {}x{}: a side must be at least 8 px (the VAE's downsampling; SD trains at 512 and more)", r.width, r.height));
        }
        if r.width.max(r.height) > sd_data::MAX_SIDE {
            return bad("data.resolution", format!("= {}x{}: a side may be at most {} px", r.width, r.height, sd_data::MAX_SIDE));
        }
        self.check_demo_pixels()
    }

    /// The demo's images together, which are all drawn in memory before training starts:
    /// at most [`MAX_DEMO_PIXELS`].
    fn check_demo_pixels(&self) -> Result<(), TrainError> {
        let d = &self.data;
        if d.train_data_dir != "demo" || !d.dataset_config.is_empty() {
            return Ok(());
        }
        // The demo draws squares, 2:3 and 3:2 images of the resolution's shorter side
        // (sd_data::demo): at most short × 1.5 short pixels each.
        let short = u64::from(d.resolution.width.min(d.resolution.height));
        let pixels = (d.demo_images as u64).saturating_mul(short * (short * 3 / 2));
        if pixels > MAX_DEMO_PIXELS {
            let r = &d.resolution;
            return Err(TrainError::Config {
                origin: "data.demo_images".into(),
                reason: format!(
                    "= {} at data.resolution = {}x{} draws up to {pixels} pixels in memory, more than the {MAX_DEMO_PIXELS} (3 GiB) the demo may hold: lower data.demo_images or data.resolution, or train on a folder of your own",
                    d.demo_images, r.width, r.height
                ),
            });
        }
        Ok(())
    }

    /// `[data]`'s probabilities and loss weight, which reach every subset: checked here so
    /// that an error names the key the user wrote (a kohya dataset TOML's subsets take them
    /// through JSON, where NaN turns into a `null` blamed on another key).
    fn check_data_rates(&self) -> Result<(), TrainError> {
        let d = &self.data;
        let bad = |key: &str, reason: String| Err(TrainError::Config { origin: format!("data.{key}"), reason });
        for (key, rate) in [("caption_dropout_rate", d.caption_dropout_rate), ("caption_tag_dropout_rate", d.caption_tag_dropout_rate)] {
            if !(0.0..=1.0).contains(&rate) {
                return bad(key, format!("= {rate}: expected a probability from 0 (off) to 1"));
            }
        }
        // sd-scripts takes any weight; a negative one would train away from the
        // regularization images, and sd-data refuses it as well.
        if !(d.prior_loss_weight.is_finite() && d.prior_loss_weight >= 0.0) {
            return bad("prior_loss_weight", format!("= {}: expected a finite loss weight of at least 0 (1 = as much as a training image)", d.prior_loss_weight));
        }
        Ok(())
    }

    /// The sample images' options before a prompt's own (`--n`, `--w`, ...): the
    /// `output.sample_*` settings at `size` (width, height).
    pub(crate) fn sample_defaults(&self, (width, height): (usize, usize)) -> sd_pipeline::GenerateOptions {
        let o = &self.output;
        sd_pipeline::GenerateOptions {
            prompts: Vec::new(),
            negative_prompt: String::new(),
            sampler: o.sample_sampler.clone(),
            steps: o.sample_steps,
            cfg_scale: o.sample_cfg,
            seed: o.sample_seed,
            width,
            height,
            clip_skip: self.model.clip_skip,
            max_token_length: self.model.max_token_length,
        }
    }

    /// What LoHa and LoKr (`lora.algo`) do not train: the LoRA-only settings.
    fn check_lycoris(&self) -> Result<(), TrainError> {
        let l = &self.lora;
        let algo = l.algo.name();
        let bad = |reason: String| Err(TrainError::Config { origin: "lora.algo".into(), reason });
        let lokr_settings = l.lokr_factor != -1 || l.lokr_decompose_both || l.lokr_full_matrix || l.lokr_unbalanced_factorization;
        if l.algo != lora_core::Algo::Lokr && lokr_settings {
            return bad(format!("lora.lokr_factor, lora.lokr_decompose_both, lora.lokr_full_matrix and lora.lokr_unbalanced_factorization are LoKr's; lora.algo is \"{algo}\""));
        }
        if !l.algo.is_lycoris_oft() {
            for (key, on) in [("lora.constraint", l.constraint != 0.0), ("lora.rescaled", l.rescaled)] {
                if on {
                    return Err(TrainError::Config { origin: key.into(), reason: format!("is LyCORIS' Diag-OFT's and BOFT's (lora.algo = \"diag-oft\" or \"boft\"); lora.algo is \"{algo}\"{}", if l.algo == lora_core::Algo::Oft && key == "lora.constraint" { " (kohya's OFT takes its constraint in lora.alpha)" } else { "" }) });
                }
            }
        }
        if !l.algo.is_lycoris() {
            if l.rank_dropout_scale && !l.lycoris_rank_dropout {
                return bad(format!("lora.rank_dropout_scale is LyCORIS' for LoHa, LoKr and a LoRA with lora.lycoris_rank_dropout; lora.algo is \"{algo}\" (kohya's rank dropout always rescales what it keeps)"));
            }
            if l.lycoris_rank_dropout && l.dora {
                return Err(TrainError::Config { origin: "lora.lycoris_rank_dropout".into(), reason: "does not combine with lora.dora (LyCORIS' rank dropout of a DoRA LoCon is not trained here)".into() });
            }
            if l.use_scalar {
                return bad(format!("lora.use_scalar (LyCORIS' trained scalar) is trained for LoHa, LoKr and GLoRA; lora.algo is \"{algo}\""));
            }
            return Ok(());
        }
        for (key, p) in [("lora.dropout", l.dropout), ("lora.network_dropout", l.network_dropout)] {
            if p > 0.0 {
                return bad(format!("{key} is LoRA's; with lora.algo = \"{algo}\" lora.module_dropout and lora.rank_dropout (LyCORIS' rank dropout) apply, as LyCORIS trains them"));
            }
        }
        if [l.loraplus_lr_ratio, l.loraplus_unet_lr_ratio, l.loraplus_text_encoder_lr_ratio].iter().any(|r| *r > 0.0) {
            return bad(format!("LoRA+ (lora.loraplus_*) speeds up LoRA's `up` weights; a {algo} has none"));
        }
        if l.lokr_factor == 0 || l.lokr_factor < -1 {
            return bad(format!("lora.lokr_factor must be -1 (square root) or at least 1, got {}", l.lokr_factor));
        }
        if l.algo.is_oft() {
            self.check_oft()?;
        }
        if l.algo == lora_core::Algo::Glora {
            self.check_glora()?;
        }
        if l.algo == lora_core::Algo::Ia3 {
            self.check_ia3()?;
        }
        if l.algo == lora_core::Algo::Full {
            self.check_full()?;
        }
        if self.output.save_format == lora_core::AdapterFormat::Peft {
            return bad(format!("a {algo} is saved in the kohya / LyCORIS layout (output.save_format = \"kohya\"); the PEFT layout here holds LoRAs"));
        }
        Ok(())
    }

    /// What an OFT takes (`lora.algo = "oft"`, kohya's: a positive constraint in `alpha`;
    /// `"diag-oft"`, LyCORIS': a constraint that is 0 or positive) and none of the other
    /// adapters' options.
    fn check_oft(&self) -> Result<(), TrainError> {
        let l = &self.lora;
        let algo = l.algo.name();
        let bad = |key: &str, reason: String| Err(TrainError::Config { origin: key.into(), reason });
        if l.algo.is_lycoris_oft() && !(l.constraint.is_finite() && l.constraint >= 0.0) {
            return bad("lora.constraint", format!("= {}: {algo}'s constraint per output must be 0 (none) or positive; 1e-3 to 1e-2 constrains the rotations as kohya's OFT does", l.constraint));
        }
        let kohya = l.algo == lora_core::Algo::Oft;
        for (key, alpha, used) in [("lora.alpha", l.alpha, kohya), ("lora.conv_alpha", l.conv_alpha, kohya && l.conv_rank > 0)] {
            if used && (alpha.is_nan() || alpha <= 0.0) {
                return bad(key, format!("= {alpha}: with lora.algo = \"oft\" it is the constraint per output (kohya's network_alpha), which must be positive; 1e-3 to 1e-2 is usual"));
            }
        }
        let options = [
            (l.module_dropout > 0.0 && kohya, "lora.module_dropout"),
            // Diag-OFT's drops entries of its rotation (LyCORIS' nn.Dropout, which always
            // rescales); LyCORIS' BOFT takes the option and applies none.
            (l.rank_dropout > 0.0 && l.algo != lora_core::Algo::DiagOft, "lora.rank_dropout"),
            (l.rank_dropout_scale, "lora.rank_dropout_scale"),
            (l.dora, "lora.dora"),
            (l.use_scalar, "lora.use_scalar"),
            (l.rslora, "lora.rslora"),
            (l.use_tucker, "lora.use_tucker"),
            // LyCORIS holds Diag-OFT's and BOFT's block norms to it; kohya's OFT has none.
            (self.train.scale_weight_norms > 0.0 && kohya, "train.scale_weight_norms"),
        ];
        match options.iter().find(|(on, _)| *on) {
            Some((_, key)) => bad(key, format!("is not trained with lora.algo = \"{algo}\" (the OFT modules have no such option here)")),
            None => Ok(()),
        }
    }

    /// What LyCORIS' GLoRA takes beyond LoRA's rank, alpha, `conv_*`, rsLoRA, module
    /// dropout and scalar: none of rank dropout (its default pass applies none), DoRA,
    /// Tucker (LyCORIS never decomposes it) or max-norm (LyCORIS scales no GLoRA).
    fn check_glora(&self) -> Result<(), TrainError> {
        let l = &self.lora;
        let options = [
            (l.rank_dropout > 0.0, "lora.rank_dropout"),
            (l.dora, "lora.dora"),
            (l.use_tucker, "lora.use_tucker"),
            (self.train.scale_weight_norms > 0.0, "train.scale_weight_norms"),
        ];
        refuse_unapplied(&options, lora_core::Algo::Glora, "GLoRA")
    }

    /// What LyCORIS' (IA)³ takes: `module_dropout` alone (no rank dropout, DoRA, Tucker,
    /// scalar, rsLoRA or max-norm; `rank` / `conv_rank` and the alphas are not used).
    fn check_ia3(&self) -> Result<(), TrainError> {
        let l = &self.lora;
        let options = [
            (l.rank_dropout > 0.0, "lora.rank_dropout"),
            (l.dora, "lora.dora"),
            (l.use_tucker, "lora.use_tucker"),
            (l.use_scalar, "lora.use_scalar"),
            (l.rslora, "lora.rslora"),
            (self.train.scale_weight_norms > 0.0, "train.scale_weight_norms"),
        ];
        refuse_unapplied(&options, lora_core::Algo::Ia3, "(IA)³")
    }

    /// What LyCORIS' full fine-tuning takes: module and rank dropout (no DoRA, Tucker,
    /// scalar, rsLoRA or max-norm; `rank` and the alphas are not used).
    fn check_full(&self) -> Result<(), TrainError> {
        let l = &self.lora;
        let options = [
            (l.dora, "lora.dora"),
            (l.use_tucker, "lora.use_tucker"),
            (l.use_scalar, "lora.use_scalar"),
            (l.rslora, "lora.rslora"),
            (self.train.scale_weight_norms > 0.0, "train.scale_weight_norms"),
        ];
        refuse_unapplied(&options, lora_core::Algo::Full, "full")
    }

    /// Whether the run trains adapters: its targets select layers (or `dim_from_weights`
    /// takes them from a file). Without, an `[embedding]` trains alone.
    pub fn trains_adapters(&self) -> bool {
        let l = &self.lora;
        l.dim_from_weights || l.unet_targets != sd_model::targets::UnetTargets::None || l.text_encoder_targets != sd_model::targets::TextEncoderTargets::None || !l.include.is_empty()
    }

    /// The `[embedding]` settings: a word [`expand_prompt`](sd_model::textual_inversion::expand_prompt)
    /// finds, 1–75 vectors (one prompt row), one starting point; none without a word.
    fn check_embedding(&self) -> Result<(), TrainError> {
        let e = &self.embedding;
        let bad = |key: &str, reason: String| Err(TrainError::Config { origin: format!("embedding.{key}"), reason });
        if !e.enabled() {
            let set = [(e.vectors != 1, "vectors"), (!e.init_word.is_empty(), "init_word"), (!e.weights.is_empty(), "weights"), (e.learning_rate != 0.0, "learning_rate"), (e.template != CaptionTemplate::None, "template"), (e.train_fraction != 1.0, "train_fraction")];
            return match set.iter().find(|(on, _)| *on) {
                Some((_, key)) => bad(key, "is set but embedding.token is empty: set the word the embedding is trained for".into()),
                None => Ok(()),
            };
        }
        if let Err(err) = sd_model::textual_inversion::check_word(&e.token) {
            return bad("token", err.to_string());
        }
        if !(1..=75).contains(&e.vectors) {
            return bad("vectors", format!("{} must be in 1..=75 (one prompt row holds 75 tokens)", e.vectors));
        }
        if !(e.learning_rate.is_finite() && e.learning_rate >= 0.0) {
            return bad("learning_rate", "must be 0 (the text encoders' learning rate) or positive".into());
        }
        if !(e.train_fraction > 0.0 && e.train_fraction <= 1.0) {
            return bad("train_fraction", format!("{} must be in (0, 1] (1: the whole run)", e.train_fraction));
        }
        if e.train_fraction < 1.0 && !self.trains_adapters() {
            return bad("train_fraction", "stops the embedding's training part-way, but nothing else trains (no adapter targets): shorten train.max_train_steps instead".into());
        }
        if !e.weights.is_empty() && !e.init_word.is_empty() {
            return bad("init_word", "and embedding.weights both say where the vectors start: set one".into());
        }
        if self.trains_adapters() && self.output.save_format == lora_core::AdapterFormat::Peft {
            // The embedding is bundled in the LoRA file, which diffusers then refuses.
            return Err(TrainError::Config {
                origin: "output.save_format".into(),
                reason: "\"peft\" cannot hold the embedding trained with the adapters (diffusers refuses a LoRA file with bundled embeddings): keep \"kohya\" (A1111 reads the bundle; `trainer unbundle-embeddings` writes it apart for ComfyUI and diffusers)".into(),
            });
        }
        if !e.weights.is_empty() && !std::path::Path::new(&e.weights).is_file() {
            return bad("weights", format!("there is no file at {}", e.weights));
        }
        Ok(())
    }

    /// What LoRA-FA (`lora.lora_fa`) does not combine with: each of these trains or
    /// rescales a `down` of its own (sd-scripts' max-norm scales the frozen `down` too).
    /// LyCORIS' `train_norm` (`lora.train_norm`): its norm modules are LyCORIS' (kohya's
    /// OFT has none) and are saved in its layout (not PEFT's).
    fn check_train_norm(&self) -> Result<(), TrainError> {
        let l = &self.lora;
        if !l.train_norm {
            return Ok(());
        }
        let bad = |reason: &str| Err(TrainError::Config { origin: "lora.train_norm".into(), reason: reason.into() });
        if l.algo == lora_core::Algo::Oft {
            return bad("norm modules are LyCORIS' (its train_norm); kohya's OFT (lora.algo = \"oft\") has none: use \"diag-oft\" (LyCORIS' OFT) or turn train_norm off");
        }
        if self.output.save_format == lora_core::AdapterFormat::Peft {
            return bad("norm modules are saved in the kohya / LyCORIS layout (output.save_format = \"kohya\"); the PEFT layout holds LoRAs");
        }
        Ok(())
    }

    fn check_lora_fa(&self) -> Result<(), TrainError> {
        let l = &self.lora;
        if !l.lora_fa {
            return Ok(());
        }
        let bad = |reason: String| Err(TrainError::Config { origin: "lora.lora_fa".into(), reason });
        if l.algo.is_lycoris() {
            return bad(format!("LoRA-FA freezes a LoRA's `down`; lora.algo is \"{}\"", l.algo.name()));
        }
        for (on, key) in [(l.dora, "lora.dora"), (l.use_tucker, "lora.use_tucker"), (self.train.scale_weight_norms > 0.0, "train.scale_weight_norms")] {
            if on {
                return bad(format!("does not combine with {key} (kohya's networks.lora_fa has no such option, or it would change the frozen `down`)"));
            }
        }
        Ok(())
    }

    /// What DyLoRA (`lora.dylora_unit`) needs: a LoRA whose ranks the unit divides, and none
    /// of what kohya's networks.dylora lacks or an optimizer that keeps per-tensor
    /// statistics (kohya's DyLoRA keeps each rank as a tensor of its own).
    fn check_dylora(&self) -> Result<(), TrainError> {
        let l = &self.lora;
        let unit = l.dylora_unit;
        if unit == 0 {
            return Ok(());
        }
        let bad = |reason: String| Err(TrainError::Config { origin: "lora.dylora_unit".into(), reason });
        for (rank, key) in [(l.rank, "lora.rank"), (l.conv_rank, "lora.conv_rank")] {
            if !rank.is_multiple_of(unit) {
                return bad(format!("= {unit} must divide {key} ({rank})"));
            }
        }
        if l.algo.is_lycoris() {
            return bad(format!("DyLoRA trains a LoRA's ranks in chunks; lora.algo is \"{}\"", l.algo.name()));
        }
        let dropouts = l.dropout > 0.0 || l.network_dropout > 0.0 || l.rank_dropout > 0.0 || l.module_dropout > 0.0;
        let others = [(l.dora, "lora.dora"), (l.lora_fa, "lora.lora_fa"), (l.use_tucker, "lora.use_tucker"), (dropouts, "lora.dropout / network_dropout / rank_dropout / module_dropout"), (!(l.block_dims.trim().is_empty() && l.conv_block_dims.trim().is_empty()), "lora.block_dims / conv_block_dims")];
        if let Some((_, key)) = others.iter().find(|(on, _)| *on) {
            return bad(format!("does not combine with {key} (kohya's networks.dylora has no such option)"));
        }
        if matches!(self.train.optimizer, Optimizer::Adafactor | Optimizer::Came | Optimizer::ProdigyPlusScheduleFree) {
            let name = serde_json::to_value(self.train.optimizer).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
            return bad(format!("does not combine with train.optimizer = \"{name}\": its factored second moments are kept per tensor, and each DyLoRA rank is a tensor of its own in sd-scripts"));
        }
        Ok(())
    }

    /// The optimizer settings of the `[train]` section: AdamW's (Lion's betas with
    /// `optimizer = "lion"`), and Prodigy's when `optimizer = "prodigy"` (Adafactor's and
    /// DAdaptAdam's: [`TrainSection::adafactor_settings`], [`TrainSection::dadapt_settings`]).
    pub fn optimizer_settings(&self) -> (lora_core::optim::AdamWSettings, Option<lora_core::optim::ProdigySettings>) {
        let t = &self.train;
        let (beta_1, beta_2) = match t.optimizer {
            Optimizer::Lion | Optimizer::DadaptLion => (t.lion_beta1, t.lion_beta2),
            Optimizer::SgdScheduleFree => (t.sgd_momentum, t.adam_beta2),
            _ => (t.adam_beta1, t.adam_beta2),
        };
        let adamw = lora_core::optim::AdamWSettings {
            beta_1,
            beta_2,
            epsilon: t.adam_epsilon,
            weight_decay: t.adam_weight_decay,
        };
        let prodigy = (t.optimizer == Optimizer::Prodigy).then_some(lora_core::optim::ProdigySettings {
            d0: t.prodigy_d0,
            d_coef: t.prodigy_d_coef,
            growth_rate: t.prodigy_growth_rate,
            beta_3: (t.prodigy_beta3 > 0.0).then_some(t.prodigy_beta3),
            use_bias_correction: t.prodigy_use_bias_correction,
            safeguard_warmup: t.prodigy_safeguard_warmup,
        });
        (adamw, prodigy)
    }

    /// The configuration as TOML (written next to the outputs).
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }
}

/// The first of `options` (whether set, its config key) that is set, as the error that
/// `algo`'s LyCORIS module (`module`: "GLoRA", ...) does not apply it.
fn refuse_unapplied(options: &[(bool, &str)], algo: lora_core::Algo, module: &str) -> Result<(), TrainError> {
    match options.iter().find(|(on, _)| *on) {
        Some((_, key)) => Err(TrainError::Config { origin: key.to_string(), reason: format!("is not trained with lora.algo = \"{}\" (LyCORIS' {module} module applies none)", algo.name()) }),
        None => Ok(()),
    }
}

/// Overlays `user` onto `base`, table by table.
fn merge(base: &mut toml::Value, user: toml::Value) {
    match (base, user) {
        (toml::Value::Table(b), toml::Value::Table(u)) => {
            for (k, v) in u {
                match b.get_mut(&k) {
                    Some(existing) => merge(existing, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}
