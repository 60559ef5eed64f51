//! Component configurations, read from diffusers / transformers `config.json` files.
//!
//! Field names are those of the JSON files so that a model folder's configs deserialize
//! directly; unknown fields are ignored (the files carry many keys irrelevant here).

use std::path::Path;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::{Result, SdModelError};

/// Activation of the CLIP MLP (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HiddenAct {
    /// `x · sigmoid(1.702 x)` (OpenAI CLIP ViT-L/14, SD1.x).
    QuickGelu,
    /// Exact (erf) GELU (OpenCLIP ViT-H/14, SD2.x).
    Gelu,
}

/// The CLIP text encoder, as in transformers' `CLIPTextConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipTextConfig {
    /// Token vocabulary size (49408 for CLIP).
    pub vocab_size: usize,
    /// Width of the transformer.
    pub hidden_size: usize,
    /// Width of the MLP.
    pub intermediate_size: usize,
    /// Number of encoder layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Sequence length (77).
    pub max_position_embeddings: usize,
    /// MLP activation.
    pub hidden_act: HiddenAct,
    /// LayerNorm epsilon.
    #[serde(default = "default_ln_eps")]
    pub layer_norm_eps: f64,
    /// transformers' model classes for this config; `CLIPTextModelWithProjection` (SDXL's
    /// second encoder) adds the bias-free `text_projection` of the pooled output.
    #[serde(default)]
    pub architectures: Vec<String>,
    /// Width of `text_projection` (used only with `CLIPTextModelWithProjection`; plain
    /// `CLIPTextModel` configs carry it too, without the layer).
    #[serde(default)]
    pub projection_dim: Option<usize>,
}

/// transformers' class name of a CLIP text encoder with the pooled-output projection.
pub const CLIP_WITH_PROJECTION: &str = "CLIPTextModelWithProjection";

/// The widest layer (channels, features, embedding width) a config may give: several times
/// any SD model's (SDXL's widest is 5120 features), so that a corrupt or mistyped config is
/// an error naming the field instead of an abort while its weights are allocated.
pub const MAX_WIDTH: usize = 16_384;

/// The most layers or blocks of one kind a config may give, for the same reason.
pub const MAX_DEPTH: usize = 128;

/// Refuses a width above [`MAX_WIDTH`] or a count above [`MAX_DEPTH`], naming the field.
fn check_sizes(origin: &str, widths: &[(&str, usize)], depths: &[(&str, usize)]) -> Result<()> {
    let over = |fields: &[(&str, usize)], max: usize| fields.iter().find(|(_, v)| *v > max).map(|(f, v)| (f.to_string(), *v, max));
    match over(widths, MAX_WIDTH).or_else(|| over(depths, MAX_DEPTH)) {
        Some((field, value, max)) => Err(SdModelError::InvalidConfig {
            origin: origin.into(),
            reason: format!("{field} = {value} is larger than any Stable Diffusion model's (at most {max} here)"),
        }),
        None => Ok(()),
    }
}

/// The first of `widths` that is 0, as a config error: a layer of no channels.
fn check_positive(origin: &str, widths: &[(&str, usize)]) -> Result<()> {
    match widths.iter().find(|(_, v)| *v == 0) {
        Some((field, _)) => Err(SdModelError::InvalidConfig { origin: origin.into(), reason: format!("{field} = 0: expected a positive number of channels") }),
        None => Ok(()),
    }
}

fn default_ln_eps() -> f64 {
    1e-5
}

impl ClipTextConfig {
    /// SD1.x: OpenAI CLIP ViT-L/14 text tower.
    pub fn sd15() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: HiddenAct::QuickGelu,
            layer_norm_eps: 1e-5,
            architectures: vec![],
            projection_dim: None,
        }
    }

    /// SD2.x: OpenCLIP ViT-H/14 text tower (23 of its 24 layers, as diffusers ships it).
    pub fn sd21() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 1024,
            intermediate_size: 4096,
            num_hidden_layers: 23,
            num_attention_heads: 16,
            max_position_embeddings: 77,
            hidden_act: HiddenAct::Gelu,
            layer_norm_eps: 1e-5,
            architectures: vec![],
            projection_dim: None,
        }
    }

    /// SDXL's second encoder: OpenCLIP ViT-bigG/14's text tower, all 32 layers, with the
    /// 1280-wide projection of the pooled output (SDXL's first encoder is [`sd15`](Self::sd15)).
    pub fn sdxl_text_encoder_2() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 1280,
            intermediate_size: 5120,
            num_hidden_layers: 32,
            num_attention_heads: 20,
            max_position_embeddings: 77,
            hidden_act: HiddenAct::Gelu,
            layer_norm_eps: 1e-5,
            architectures: vec![CLIP_WITH_PROJECTION.into()],
            projection_dim: Some(1280),
        }
    }

    /// A tiny SDXL-like second encoder for tests: [`tiny`](Self::tiny)'s width with 4 GELU
    /// layers and a 32-wide projection.
    pub fn tiny_sdxl_text_encoder_2() -> Self {
        Self {
            num_hidden_layers: 4,
            hidden_act: HiddenAct::Gelu,
            architectures: vec![CLIP_WITH_PROJECTION.into()],
            projection_dim: Some(32),
            ..Self::tiny()
        }
    }

    /// The same module tree (layers, projection) at width 4: a model of it is cheap to
    /// build, for what needs only the module paths (e.g. a [`lora_core::ModuleIndex`] to read
    /// adapter files without loading weights).
    ///
    /// ```
    /// use sd_model::ClipTextConfig;
    /// let narrow = ClipTextConfig::sdxl_text_encoder_2().narrow();
    /// assert_eq!((narrow.hidden_size, narrow.num_hidden_layers, narrow.text_projection_dim()), (4, 32, Some(4)));
    /// ```
    pub fn narrow(&self) -> Self {
        Self {
            hidden_size: 4,
            intermediate_size: 4,
            vocab_size: 4,
            num_attention_heads: 1,
            projection_dim: Some(4),
            ..self.clone()
        }
    }

    /// Width of the pooled-output projection, for a `CLIPTextModelWithProjection` (512,
    /// transformers' default, when the config does not say).
    pub fn text_projection_dim(&self) -> Option<usize> {
        self.architectures
            .iter()
            .any(|a| a == CLIP_WITH_PROJECTION)
            .then(|| self.projection_dim.unwrap_or(512))
    }

    /// A tiny SD1-like encoder for tests and the demo (full CLIP vocabulary, so the real
    /// tokenizer works with it).
    pub fn tiny() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 32,
            intermediate_size: 37,
            num_hidden_layers: 3,
            num_attention_heads: 4,
            max_position_embeddings: 77,
            hidden_act: HiddenAct::QuickGelu,
            layer_norm_eps: 1e-5,
            architectures: vec![],
            projection_dim: None,
        }
    }

    /// Checks the values that the graph depends on.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let bad = |reason: String| SdModelError::InvalidConfig {
            origin: origin.into(),
            reason,
        };
        if self.num_attention_heads == 0 || !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(bad(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        if self.vocab_size == 0 || self.max_position_embeddings == 0 || self.num_hidden_layers == 0 {
            return Err(bad(
                "vocab_size, max_position_embeddings and num_hidden_layers must be positive".into(),
            ));
        }
        if self.text_projection_dim() == Some(0) {
            return Err(bad("projection_dim must be positive".into()));
        }
        let widths = [("hidden_size", self.hidden_size), ("intermediate_size", self.intermediate_size), ("projection_dim", self.text_projection_dim().unwrap_or(0))];
        check_sizes(origin, &widths, &[("num_hidden_layers", self.num_hidden_layers), ("num_attention_heads", self.num_attention_heads)])?;
        check_positive(origin, &widths[..2])?;
        // Token and position tables: far above CLIP's 49408 tokens and 77 positions.
        if self.vocab_size > 1 << 20 || self.max_position_embeddings > MAX_WIDTH {
            return Err(bad(format!("vocab_size {} or max_position_embeddings {} is larger than any CLIP text encoder's", self.vocab_size, self.max_position_embeddings)));
        }
        Ok(())
    }
}

/// The VAE, as in diffusers' `AutoencoderKL` config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VaeConfig {
    /// Image channels in.
    #[serde(default = "three")]
    pub in_channels: usize,
    /// Image channels out.
    #[serde(default = "three")]
    pub out_channels: usize,
    /// Channels of each resolution level (also fixes the number of levels).
    pub block_out_channels: Vec<usize>,
    /// ResNet blocks per encoder level (the decoder has one more).
    #[serde(default = "one")]
    pub layers_per_block: usize,
    /// Latent channels (4 for SD1/SD2).
    #[serde(default = "four")]
    pub latent_channels: usize,
    /// GroupNorm groups.
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    /// Multiplier applied to latents before the UNet (0.18215 for SD1/SD2).
    #[serde(default = "sd_scaling")]
    pub scaling_factor: f64,
    /// Offset subtracted before scaling (absent for SD1/SD2).
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// Whether the 1x1 `quant_conv` exists.
    #[serde(default = "yes")]
    pub use_quant_conv: bool,
    /// Whether the 1x1 `post_quant_conv` exists.
    #[serde(default = "yes")]
    pub use_post_quant_conv: bool,
    /// Whether the mid blocks have self-attention.
    #[serde(default = "yes")]
    pub mid_block_add_attention: bool,
    /// Block types, only checked (diffusers' SD VAEs use the plain encoder/decoder blocks).
    #[serde(default)]
    pub down_block_types: Vec<String>,
    /// Block types, only checked.
    #[serde(default)]
    pub up_block_types: Vec<String>,
    /// Activation, only checked (`silu`).
    #[serde(default = "silu")]
    pub act_fn: String,
}

fn three() -> usize {
    3
}
fn one() -> usize {
    1
}
fn four() -> usize {
    4
}
fn thirty_two() -> usize {
    32
}
fn sd_scaling() -> f64 {
    0.18215
}
fn yes() -> bool {
    true
}
fn silu() -> String {
    "silu".into()
}

impl VaeConfig {
    /// The SD1.x / SD2.x VAE (8x downsampling, 4 latent channels).
    pub fn sd15() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: 0.18215,
            shift_factor: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
            down_block_types: vec!["DownEncoderBlock2D".into(); 4],
            up_block_types: vec!["UpDecoderBlock2D".into(); 4],
            act_fn: "silu".into(),
        }
    }

    /// SD2.x uses the same VAE as SD1.x.
    pub fn sd21() -> Self {
        Self::sd15()
    }

    /// A tiny VAE (3 levels, 4x downsampling) for tests and the demo.
    pub fn tiny() -> Self {
        Self {
            block_out_channels: vec![32, 64, 64],
            layers_per_block: 1,
            down_block_types: vec!["DownEncoderBlock2D".into(); 3],
            up_block_types: vec!["UpDecoderBlock2D".into(); 3],
            ..Self::sd15()
        }
    }

    /// Spatial downsampling factor between pixels and latents.
    pub fn downsample_factor(&self) -> usize {
        1 << (self.block_out_channels.len().saturating_sub(1))
    }

    /// Checks the values that the graph depends on.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let bad = |reason: String| SdModelError::InvalidConfig {
            origin: origin.into(),
            reason,
        };
        if self.block_out_channels.is_empty() {
            return Err(bad("block_out_channels is empty".into()));
        }
        let widths: Vec<(&str, usize)> = self.block_out_channels.iter().map(|c| ("block_out_channels", *c)).chain([("latent_channels", self.latent_channels), ("in_channels", self.in_channels), ("out_channels", self.out_channels)]).collect();
        check_sizes(origin, &widths, &[("layers_per_block", self.layers_per_block), ("block_out_channels (levels)", self.block_out_channels.len())])?;
        check_positive(origin, &widths)?;
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|c| self.norm_num_groups == 0 || **c % self.norm_num_groups != 0)
        {
            return Err(bad(format!(
                "block_out_channels entry {c} is not divisible by norm_num_groups {}",
                self.norm_num_groups
            )));
        }
        for (field, types, want) in [
            ("down_block_types", &self.down_block_types, "DownEncoderBlock2D"),
            ("up_block_types", &self.up_block_types, "UpDecoderBlock2D"),
        ] {
            if let Some(t) = types.iter().find(|t| *t != want) {
                return Err(bad(format!("{field}: unsupported block type `{t}`, expected {want}")));
            }
            if !types.is_empty() && types.len() != self.block_out_channels.len() {
                return Err(bad(format!(
                    "{field} has {} entries but block_out_channels has {}",
                    types.len(),
                    self.block_out_channels.len()
                )));
            }
        }
        if self.act_fn != "silu" {
            return Err(bad(format!("act_fn `{}` is not supported, expected silu", self.act_fn)));
        }
        if self.layers_per_block == 0 || self.latent_channels == 0 {
            return Err(bad("layers_per_block and latent_channels must be positive".into()));
        }
        Ok(())
    }
}

/// Reads and validates-by-parsing a JSON config file, naming the file in errors.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|source| SdModelError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| SdModelError::InvalidConfig {
        origin: path.display().to_string(),
        reason: e.to_string(),
    })
}

/// Reads a text encoder `config.json` (transformers layout).
pub fn read_clip_config(path: &Path) -> Result<ClipTextConfig> {
    let cfg: ClipTextConfig = read_json(path)?;
    cfg.validate(&path.display().to_string())?;
    Ok(cfg)
}

/// Reads a VAE `config.json` (diffusers layout).
pub fn read_vae_config(path: &Path) -> Result<VaeConfig> {
    let cfg: VaeConfig = read_json(path)?;
    cfg.validate(&path.display().to_string())?;
    Ok(cfg)
}

/// `attention_head_dim` / `num_attention_heads`: one value for all blocks or one per block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    /// The same value for every block.
    All(usize),
    /// One value per down block (up blocks use them reversed).
    Each(Vec<usize>),
}

impl PerBlock {
    /// The value for down block `i`.
    pub fn get(&self, i: usize) -> usize {
        match self {
            PerBlock::All(v) => *v,
            PerBlock::Each(v) => v.get(i).copied().unwrap_or_else(|| v.last().copied().unwrap_or(1)),
        }
    }
}

/// The UNet, as diffusers' `UNet2DConditionModel` config (the SD1.x, SD2.x and SDXL subset).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnetConfig {
    /// Latent channels in.
    #[serde(default = "four")]
    pub in_channels: usize,
    /// Latent channels out.
    #[serde(default = "four")]
    pub out_channels: usize,
    /// Latent size the model was trained at (64 for SD1.5 at 512 px, 96 for SD2.1 at 768 px).
    #[serde(default = "sixty_four")]
    pub sample_size: usize,
    /// `CrossAttnDownBlock2D` or `DownBlock2D` per level.
    pub down_block_types: Vec<String>,
    /// `UpBlock2D` or `CrossAttnUpBlock2D` per level.
    pub up_block_types: Vec<String>,
    /// Channels per level.
    pub block_out_channels: Vec<usize>,
    /// ResNet blocks per down level (up levels have one more).
    #[serde(default = "two")]
    pub layers_per_block: usize,
    /// GroupNorm groups.
    #[serde(default = "thirty_two")]
    pub norm_num_groups: usize,
    /// GroupNorm epsilon of the ResNet blocks and the output norm.
    #[serde(default = "unet_eps")]
    pub norm_eps: f64,
    /// Width of the text embeddings (768 for SD1.x, 1024 for SD2.x).
    pub cross_attention_dim: usize,
    /// Attention heads per block. diffusers' SD configs call this `attention_head_dim`
    /// (a long-standing misnomer that diffusers itself reads as the head count).
    #[serde(default = "eight_heads")]
    pub attention_head_dim: PerBlock,
    /// When present, overrides `attention_head_dim` as the head count.
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    /// `proj_in`/`proj_out` are linear layers (SD2.x) instead of 1x1 convs (SD1.x).
    #[serde(default, deserialize_with = "null_as_false")]
    pub use_linear_projection: bool,
    /// Compute attention scores in f32 even for half-precision models (SD2.1; SDXL's config
    /// says `null`, read as false).
    #[serde(default, deserialize_with = "null_as_false")]
    pub upcast_attention: bool,
    /// Sinusoidal embedding order: `cos, sin` when true.
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    /// Frequency shift of the sinusoidal embedding.
    #[serde(default)]
    pub freq_shift: f64,
    /// Transformer blocks per attention (1 for SD1.x / SD2.x).
    #[serde(default = "transformer_layers")]
    pub transformer_layers_per_block: PerBlock,
    /// Absent or null, or `text_time` for SDXL's added conditioning: a pooled text
    /// embedding and the size / crop time ids, embedded into the time embedding.
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// Width of the sinusoidal embedding of each time id (`text_time`; 256 for SDXL).
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// Input width of the added embedding's MLP (`text_time`): the pooled text embedding's
    /// width plus the time ids times `addition_time_embed_dim` (SDXL base: 1280 + 6 × 256).
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// Must be absent or null.
    #[serde(default)]
    pub class_embed_type: Option<String>,
    /// Must be absent or null (distilled SDXL variants such as SSD-1B set it: not supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
}

/// A JSON `null` (diffusers writes some flags so) as `false`.
fn null_as_false<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

fn sixty_four() -> usize {
    64
}
fn two() -> usize {
    2
}
fn unet_eps() -> f64 {
    1e-5
}
fn eight_heads() -> PerBlock {
    PerBlock::All(8)
}
fn transformer_layers() -> PerBlock {
    PerBlock::All(1)
}

impl UnetConfig {
    /// SD1.x (v1.5): 4 levels of 320/640/1280/1280 channels, 8 heads, conv projections.
    pub fn sd15() -> Self {
        let mut down = vec!["CrossAttnDownBlock2D".to_string(); 3];
        down.push("DownBlock2D".into());
        let mut up = vec!["UpBlock2D".to_string()];
        up.extend(vec!["CrossAttnUpBlock2D".to_string(); 3]);
        Self {
            in_channels: 4,
            out_channels: 4,
            sample_size: 64,
            down_block_types: down,
            up_block_types: up,
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: 2,
            norm_num_groups: 32,
            norm_eps: 1e-5,
            cross_attention_dim: 768,
            attention_head_dim: PerBlock::All(8),
            num_attention_heads: None,
            use_linear_projection: false,
            upcast_attention: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            transformer_layers_per_block: PerBlock::All(1),
            addition_embed_type: None,
            addition_time_embed_dim: None,
            projection_class_embeddings_input_dim: None,
            class_embed_type: None,
            reverse_transformer_layers_per_block: None,
        }
    }

    /// SD2.x (v2.1, 768 px, v-prediction): 64-wide heads, linear projections, upcast attention.
    pub fn sd21() -> Self {
        Self {
            sample_size: 96,
            cross_attention_dim: 1024,
            attention_head_dim: PerBlock::Each(vec![5, 10, 20, 20]),
            use_linear_projection: true,
            upcast_attention: true,
            ..Self::sd15()
        }
    }

    /// A tiny SD1-like UNet for tests and the demo (2 levels of 32/64 channels, text width
    /// 32). Attention sits on the lower level only, which keeps a CPU training step fast.
    pub fn tiny() -> Self {
        Self {
            sample_size: 16,
            down_block_types: vec!["DownBlock2D".into(), "CrossAttnDownBlock2D".into()],
            up_block_types: vec!["CrossAttnUpBlock2D".into(), "UpBlock2D".into()],
            block_out_channels: vec![32, 64],
            layers_per_block: 1,
            norm_num_groups: 8,
            cross_attention_dim: 32,
            attention_head_dim: PerBlock::All(4),
            ..Self::sd15()
        }
    }

    /// SDXL 1.0 base (1024 px): 3 levels of 320/640/1280 channels, no attention on the
    /// first, 1/2/10 transformer blocks on the others, 64-wide heads, text width 2048 (both
    /// encoders' states side by side) and the `text_time` added conditioning.
    pub fn sdxl() -> Self {
        Self {
            sample_size: 128,
            down_block_types: vec!["DownBlock2D".into(), "CrossAttnDownBlock2D".into(), "CrossAttnDownBlock2D".into()],
            up_block_types: vec!["CrossAttnUpBlock2D".into(), "CrossAttnUpBlock2D".into(), "UpBlock2D".into()],
            block_out_channels: vec![320, 640, 1280],
            cross_attention_dim: 2048,
            attention_head_dim: PerBlock::Each(vec![5, 10, 20]),
            use_linear_projection: true,
            transformer_layers_per_block: PerBlock::Each(vec![1, 2, 10]),
            addition_embed_type: Some("text_time".into()),
            addition_time_embed_dim: Some(256),
            projection_class_embeddings_input_dim: Some(2816),
            ..Self::sd15()
        }
    }

    /// A tiny SDXL-like UNet for tests: 3 levels of 16/32/64 channels, attention on the
    /// lower two with 1 and 2 transformer blocks, text width 64 (two 32-wide encoders), a
    /// 32-wide pooled embedding and 8-wide time-id embeddings.
    pub fn tiny_sdxl() -> Self {
        Self {
            sample_size: 16,
            block_out_channels: vec![16, 32, 64],
            layers_per_block: 1,
            norm_num_groups: 8,
            cross_attention_dim: 64,
            attention_head_dim: PerBlock::Each(vec![2, 2, 4]),
            transformer_layers_per_block: PerBlock::Each(vec![1, 1, 2]),
            addition_time_embed_dim: Some(8),
            projection_class_embeddings_input_dim: Some(32 + 6 * 8),
            ..Self::sdxl()
        }
    }

    /// Whether the UNet takes SDXL's added conditioning (`addition_embed_type = "text_time"`).
    pub fn has_text_time(&self) -> bool {
        self.addition_embed_type.as_deref() == Some("text_time")
    }

    /// Heads of down block `i`.
    pub fn heads(&self, i: usize) -> usize {
        self.num_attention_heads.as_ref().unwrap_or(&self.attention_head_dim).get(i)
    }

    /// Checks the values that the graph depends on.
    pub fn validate(&self, origin: &str) -> Result<()> {
        let bad = |reason: String| SdModelError::InvalidConfig {
            origin: origin.into(),
            reason,
        };
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(bad(format!(
                "block_out_channels ({n}), down_block_types ({}) and up_block_types ({}) must have the same non-zero length",
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        let widths: Vec<(&str, usize)> = self
            .block_out_channels
            .iter()
            .map(|c| ("block_out_channels", *c))
            .chain([("cross_attention_dim", self.cross_attention_dim), ("in_channels", self.in_channels), ("out_channels", self.out_channels)])
            .chain(self.projection_class_embeddings_input_dim.map(|d| ("projection_class_embeddings_input_dim", d)))
            .chain(self.addition_time_embed_dim.map(|d| ("addition_time_embed_dim", d)))
            .collect();
        let depths: Vec<(&str, usize)> = (0..n).map(|i| ("transformer_layers_per_block", self.transformer_layers_per_block.get(i))).chain([("layers_per_block", self.layers_per_block), ("block_out_channels (levels)", n)]).collect();
        check_sizes(origin, &widths, &depths)?;
        check_positive(origin, &widths)?;
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                return Err(bad(format!("unsupported down block type `{t}`")));
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                return Err(bad(format!("unsupported up block type `{t}`")));
            }
        }
        if let Some(c) = self.block_out_channels.iter().find(|c| self.norm_num_groups == 0 || **c % self.norm_num_groups != 0) {
            return Err(bad(format!("channels {c} not divisible by norm_num_groups {}", self.norm_num_groups)));
        }
        for (i, c) in self.block_out_channels.iter().enumerate() {
            let h = self.heads(i);
            if h == 0 || c % h != 0 {
                return Err(bad(format!("channels {c} of block {i} not divisible by its {h} attention heads")));
            }
        }
        if !self.block_out_channels[0].is_multiple_of(2) {
            return Err(bad("block_out_channels[0] must be even (sinusoidal embedding)".into()));
        }
        match self.addition_embed_type.as_deref() {
            None => {}
            Some("text_time") => {
                let (Some(dim), Some(input)) = (self.addition_time_embed_dim, self.projection_class_embeddings_input_dim) else {
                    return Err(bad("addition_embed_type `text_time` needs addition_time_embed_dim and projection_class_embeddings_input_dim".into()));
                };
                if dim == 0 || !dim.is_multiple_of(2) || input <= dim {
                    return Err(bad(format!(
                        "addition_time_embed_dim {dim} must be positive and even, and projection_class_embeddings_input_dim {input} larger than it"
                    )));
                }
            }
            Some(t) => return Err(bad(format!("addition_embed_type `{t}` is not supported (only `text_time`, SDXL's)"))),
        }
        if let Some(t) = &self.class_embed_type {
            return Err(bad(format!("class_embed_type `{t}` is not supported")));
        }
        if self.reverse_transformer_layers_per_block.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(bad("reverse_transformer_layers_per_block (distilled SDXL variants) is not supported".into()));
        }
        for (name, per_block) in [("attention_head_dim", Some(&self.attention_head_dim)), ("num_attention_heads", self.num_attention_heads.as_ref()), ("transformer_layers_per_block", Some(&self.transformer_layers_per_block))] {
            if let Some(PerBlock::Each(v)) = per_block && v.len() != n {
                return Err(bad(format!("{name} lists {} values for {n} levels", v.len())));
            }
        }
        if (0..n).any(|i| self.transformer_layers_per_block.get(i) == 0) {
            return Err(bad("transformer_layers_per_block must be at least 1".into()));
        }
        if self.layers_per_block == 0 || self.cross_attention_dim == 0 {
            return Err(bad("layers_per_block and cross_attention_dim must be positive".into()));
        }
        Ok(())
    }
}

/// Reads a UNet `config.json` (diffusers layout).
pub fn read_unet_config(path: &Path) -> Result<UnetConfig> {
    let cfg: UnetConfig = read_json(path)?;
    cfg.validate(&path.display().to_string())?;
    Ok(cfg)
}
