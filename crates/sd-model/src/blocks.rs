//! kohya's block-wise LoRA settings: which block of the UNet a layer belongs to, and the
//! per-block learning-rate weights, ranks and alphas of kohya's `network_args`
//! (`down_lr_weight`, `mid_lr_weight`, `up_lr_weight`, `block_lr_zero_threshold`,
//! `block_dims`, `block_alphas`, `conv_block_dims`, `conv_block_alphas`), read in kohya's
//! syntax, for both of kohya's numberings ([`BlockLayout`]).
//!
//! SD1.x / SD2.x UNets have 25 blocks, A1111's `IN` / `MID` / `OUT` numbering: block 0
//! holds no LoRA layer, blocks 1–11 are the down path (`IN01`–`IN11`: three per down
//! block, the third its downsampler), 12 the middle block, 13–24 the up path
//! (`OUT00`–`OUT11`: three per up block, the third with its upsampler).
//!
//! SDXL UNets have 23, numbered by their SGM modules as kohya's sd-scripts do: block 0 the
//! time and size embeddings, 1–9 `input_blocks.0`–`8` (1 is `conv_in`), 10–12 the middle
//! block's ResNet, transformer and ResNet, 13–21 `output_blocks.0`–`8`, 22 the output
//! layers. Blocks 0 and 22 always train at weight 1.
//!
//! ```
//! use sd_model::blocks::{kohya_block, lr_weights, BlockLayout};
//! assert_eq!(kohya_block("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"), Some(4));
//! assert_eq!(kohya_block("mid_block.attentions.0.proj_in"), Some(12));
//! assert_eq!(kohya_block("up_blocks.0.upsamplers.0.conv"), Some(15));
//! assert_eq!(kohya_block("conv_in"), None);
//! let weights = lr_weights(BlockLayout::Sd, "", "0.5", "zeros+0.25", 0.0).unwrap().unwrap();
//! assert_eq!((weights[1], weights[12], weights[13]), (1.0, 0.5, 0.25));
//!
//! // SDXL: `input_blocks.4.1` (IN04), the middle block's transformer, `output_blocks.2.2`.
//! let sdxl = BlockLayout::Sdxl;
//! assert_eq!(sdxl.block("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"), Some(5));
//! assert_eq!(sdxl.block("mid_block.attentions.0.proj_in"), Some(11));
//! assert_eq!(sdxl.block("up_blocks.0.upsamplers.0.conv"), Some(15));
//! let weights = lr_weights(sdxl, "", "1,0.5", "", 0.0).unwrap().unwrap();
//! assert_eq!((weights.len(), weights[10], weights[11], weights[12]), (23, 1.0, 0.5, 1.0));
//! ```

use lora_core::LoraConfig;

use crate::{Result, SdModelError};

/// Number of kohya blocks of an SD1.x / SD2.x UNet (block 0 holds no layer); SDXL's is
/// [`BlockLayout::blocks`].
pub const BLOCKS: usize = 25;

/// The largest rank `block_dims` / `conv_block_dims` accept (SD's widest layer is smaller).
pub const MAX_RANK: usize = 1 << 16;

/// Blocks per half (down or up) of an SD1.x / SD2.x UNet in kohya's lists:
/// `down_lr_weight` and `up_lr_weight` have this many entries (SDXL: [`BlockLayout::half`]).
pub const HALF: usize = 12;

/// Which of kohya's block numberings applies: SD1.x / SD2.x's 25 blocks or SDXL's 23.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum BlockLayout {
    /// SD1.x / SD2.x: 12 down blocks, 1 middle block, 12 up blocks.
    #[default]
    Sd,
    /// SDXL: the embeddings, 9 down blocks, the middle block's 3 layers, 9 up blocks, the
    /// output layers.
    Sdxl,
}

impl BlockLayout {
    /// The numbering of `unet`'s blocks: SDXL's for a UNet with SDXL's added conditioning.
    pub fn of<B: burn::tensor::backend::Backend>(unet: &crate::UNet2DConditionModel<B>) -> Self {
        if unet.has_added_conditions() {
            Self::Sdxl
        } else {
            Self::Sd
        }
    }

    /// Number of blocks: the entries of `block_dims` and the other per-block lists.
    ///
    /// ```
    /// use sd_model::blocks::BlockLayout;
    /// assert_eq!((BlockLayout::Sd.blocks(), BlockLayout::Sdxl.blocks()), (25, 23));
    /// ```
    pub fn blocks(self) -> usize {
        match self {
            Self::Sd => BLOCKS,
            Self::Sdxl => 23,
        }
    }

    /// Blocks per half (down or up): the entries of `down_lr_weight` and `up_lr_weight`.
    pub fn half(self) -> usize {
        match self {
            Self::Sd => HALF,
            Self::Sdxl => 9,
        }
    }

    /// Blocks of the middle: the entries of `mid_lr_weight`.
    pub fn mid(self) -> usize {
        match self {
            Self::Sd => 1,
            Self::Sdxl => 3,
        }
    }

    /// The models the numbering is for, for messages.
    pub fn models(self) -> &'static str {
        match self {
            Self::Sd => "SD1.x / SD2.x",
            Self::Sdxl => "SDXL",
        }
    }

    /// Index of the first down block in the per-block lists (SDXL's block 0 is the
    /// embeddings, which `down_lr_weight` does not set).
    fn down_start(self) -> usize {
        match self {
            Self::Sd => 0,
            Self::Sdxl => 1,
        }
    }

    /// The block of the UNet layer at `path` (diffusers module path). `None` for layers in
    /// no block (SD1.x / SD2.x: `conv_in`, the time embedding, `conv_out`) and for positions
    /// past the family's layout (a UNet config with more layers per block). The numbering
    /// is that of the family's own layout (two ResNets per down level); a UNet with another
    /// number (e.g. the tiny test models) keeps each layer's position in its level.
    pub fn block(self, path: &str) -> Option<usize> {
        match self {
            Self::Sd => sd_block(path),
            Self::Sdxl => sdxl_block(path),
        }
    }
}

/// The block of the UNet layer at `path` (diffusers module path) in SD1.x / SD2.x's
/// numbering: [`BlockLayout::Sd`]'s [`block`](BlockLayout::block).
pub fn kohya_block(path: &str) -> Option<usize> {
    sd_block(path)
}

/// Where a layer of a down or up block sits in it: `(level, index)`, with the resampler at
/// index `resampler` (two ResNets per level, and the third position).
fn level_position(rest: &str, resampler: usize) -> Option<(usize, usize, &str)> {
    let mut parts = rest.split('.');
    let level: usize = parts.next()?.parse().ok()?;
    let kind = parts.next()?;
    let layer: usize = parts.next()?.parse().ok()?;
    let within = match kind {
        "resnets" | "attentions" => layer,
        "downsamplers" | "upsamplers" => resampler,
        _ => return None,
    };
    Some((level, within, kind))
}

fn sd_block(path: &str) -> Option<usize> {
    if path.starts_with("mid_block.") {
        return Some(HALF);
    }
    let (first, rest) = if let Some(rest) = path.strip_prefix("down_blocks.") {
        (1, rest)
    } else if let Some(rest) = path.strip_prefix("up_blocks.") {
        (HALF + 1, rest)
    } else {
        return None;
    };
    let (level, within, _) = level_position(rest, 2)?;
    let index = first + 3 * level + within;
    (within < 3 && index < first + HALF).then_some(index)
}

/// kohya's SDXL numbering, from diffusers paths: SGM's `input_blocks.n` is block `1 + n`
/// (`input_blocks.0` is `conv_in`, then three per level: two ResNets with their
/// transformers and the downsampler), `middle_block.n` is `10 + n`, `output_blocks.n` is
/// `13 + n` (three per level, the last with the upsampler).
fn sdxl_block(path: &str) -> Option<usize> {
    let first = |prefix: &str| path == prefix || path.starts_with(&format!("{prefix}."));
    if first("time_embedding") || first("add_embedding") {
        return Some(0);
    }
    if first("conv_in") {
        return Some(1);
    }
    if first("conv_norm_out") || first("conv_out") {
        return Some(22);
    }
    if let Some(rest) = path.strip_prefix("mid_block.") {
        let mut parts = rest.split('.');
        return match (parts.next()?, parts.next()?) {
            ("resnets", "0") => Some(10),
            ("attentions", "0") => Some(11),
            ("resnets", "1") => Some(12),
            _ => None,
        };
    }
    if let Some(rest) = path.strip_prefix("down_blocks.") {
        // Two ResNets (with transformers) and the downsampler per level.
        let (level, within, kind) = level_position(rest, 2)?;
        let fits = level < 3 && (within < 2 || kind == "downsamplers");
        return fits.then_some(2 + 3 * level + within).filter(|b| *b <= 9);
    }
    if let Some(rest) = path.strip_prefix("up_blocks.") {
        let (level, within, _) = level_position(rest, 2)?;
        return (level < 3 && within < 3).then_some(13 + 3 * level + within);
    }
    None
}

fn bad(key: &str, reason: impl Into<String>) -> SdModelError {
    SdModelError::BadInput { what: format!("lora.{key}"), reason: reason.into() }
}

/// Numbers separated by commas, kohya's list syntax (an empty entry reads as 0, as kohya
/// reads it).
fn parse_list(key: &str, text: &str) -> Result<Vec<f64>> {
    text.split(',')
        .map(|s| match s.trim() {
            "" => Ok(0.0),
            v => v.parse::<f64>().ok().filter(|x| x.is_finite()).ok_or_else(|| bad(key, format!("`{v}` is not a number (expected numbers separated by commas)"))),
        })
        .collect()
}

/// One half's weights: a list, or one of kohya's curves (`cosine`, `sine`, `linear`,
/// `reverse_linear`, `zeros`) with an optional `+base` added to every entry.
fn half_weights(layout: BlockLayout, key: &str, text: &str) -> Result<Vec<f64>> {
    let half = layout.half();
    if text.contains(',') || text.trim().parse::<f64>().is_ok() {
        let values = parse_list(key, text)?;
        if values.len() > half {
            return Err(bad(key, format!("has {} entries; a half of an {} UNet has {half} blocks", values.len(), layout.models())));
        }
        // kohya fills a short list with ones.
        return Ok(values.into_iter().chain(std::iter::repeat(1.0)).take(half).collect());
    }
    let (name, base) = match text.split_once('+') {
        Some((name, base)) => (name.trim(), base.trim().parse::<f64>().ok().filter(|b| b.is_finite()).ok_or_else(|| bad(key, format!("`{base}` after `+` is not a number")))?),
        None => (text.trim(), 0.0),
    };
    let last = (half - 1) as f64;
    let quarter_sine = |i: usize| (std::f64::consts::FRAC_PI_2 * i as f64 / last).sin();
    let curve: Vec<f64> = match name {
        "cosine" => (0..half).rev().map(quarter_sine).collect(),
        "sine" => (0..half).map(quarter_sine).collect(),
        "linear" => (0..half).map(|i| i as f64 / last).collect(),
        "reverse_linear" => (0..half).rev().map(|i| i as f64 / last).collect(),
        "zeros" => vec![0.0; half],
        other => return Err(bad(key, format!("unknown curve `{other}`; expected numbers separated by commas or cosine, sine, linear, reverse_linear or zeros (optionally `+BASE`)"))),
    };
    Ok(curve.into_iter().map(|w| w + base).collect())
}

/// kohya's block-wise learning-rate weights, one factor per block of `layout`: `down` and
/// `up` are lists of up to [`half`](BlockLayout::half) numbers (shorter ones are filled
/// with 1) or curves (`sine+0.5`), `mid` up to [`mid`](BlockLayout::mid) numbers (one for
/// SD1.x / SD2.x, three for SDXL); an empty string leaves its blocks at 1. Weights at or
/// below `zero_threshold` become 0: kohya then trains no adapter in those blocks. SDXL's
/// blocks 0 and 22 are always 1. `None` when all three are empty.
pub fn lr_weights(layout: BlockLayout, down: &str, mid: &str, up: &str, zero_threshold: f64) -> Result<Option<Vec<f64>>> {
    if down.trim().is_empty() && mid.trim().is_empty() && up.trim().is_empty() {
        return Ok(None);
    }
    // As kohya, the threshold applies to the weights given; parts left out stay at 1.
    let cut = |w: f64| if w > zero_threshold { w } else { 0.0 };
    let half = |key: &str, text: &str| -> Result<Vec<f64>> {
        match text.trim() {
            "" => Ok(vec![1.0; layout.half()]),
            text => Ok(half_weights(layout, key, text)?.into_iter().map(cut).collect()),
        }
    };
    let mid = match mid.trim() {
        "" => vec![1.0; layout.mid()],
        text => {
            let values = parse_list("mid_lr_weight", text)?;
            if values.len() > layout.mid() {
                let what = match layout {
                    BlockLayout::Sd => "the middle block is one block".to_string(),
                    BlockLayout::Sdxl => format!("SDXL's middle block has {} blocks", layout.mid()),
                };
                return Err(bad("mid_lr_weight", format!("has {} entries; {what}", values.len())));
            }
            // As kohya: filled with ones, then cut.
            values.into_iter().chain(std::iter::repeat(1.0)).take(layout.mid()).map(cut).collect()
        }
    };
    let mut weights = vec![1.0; layout.down_start()];
    weights.extend(half("down_lr_weight", down)?);
    weights.extend(mid);
    weights.extend(half("up_lr_weight", up)?);
    weights.resize(layout.blocks(), 1.0);
    Ok(Some(weights))
}

/// One value per block of `layout` for `key` (`block_dims`, `block_alphas`, ...):
/// exactly [`blocks`](BlockLayout::blocks) numbers separated by commas; `None` when `text`
/// is empty.
pub fn block_values(layout: BlockLayout, key: &str, text: &str) -> Result<Option<Vec<f64>>> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    let values = parse_list(key, text)?;
    if let Some(v) = values.iter().find(|v| v.abs() > f64::from(f32::MAX)) {
        return Err(bad(key, format!("has the entry {v}, beyond f32")));
    }
    if values.len() != layout.blocks() {
        return Err(bad(key, format!("has {} entries; expected one per block, {} for an {} UNet", values.len(), layout.blocks(), layout.models())));
    }
    if let Some(v) = values.iter().find(|v| **v < 0.0) {
        return Err(bad(key, format!("has the negative entry {v}")));
    }
    Ok(Some(values))
}

/// `block_values` for ranks: whole numbers.
pub fn block_ranks(layout: BlockLayout, key: &str, text: &str) -> Result<Option<Vec<usize>>> {
    let Some(values) = block_values(layout, key, text)? else { return Ok(None) };
    if let Some(v) = values.iter().find(|v| v.fract() != 0.0 || **v > MAX_RANK as f64) {
        return Err(bad(key, format!("has {v}; ranks are whole numbers up to {MAX_RANK}")));
    }
    Ok(Some(values.into_iter().map(|v| v as usize).collect()))
}

/// kohya's block-wise `network_args`, as text in kohya's syntax (an empty string: not set),
/// and the numbering they are read in.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BlockSpec<'a> {
    /// Which numbering the lists follow (SD1.x / SD2.x's by default).
    pub layout: BlockLayout,
    /// `down_lr_weight`: up to 12 numbers (SDXL: 9) for the down blocks, or a curve
    /// ([`lr_weights`]).
    pub down_lr_weight: &'a str,
    /// `mid_lr_weight`: one number for block 12 (SDXL: up to three, blocks 10–12).
    pub mid_lr_weight: &'a str,
    /// `up_lr_weight`: up to 12 numbers (SDXL: 9) for the up blocks, or a curve.
    pub up_lr_weight: &'a str,
    /// `block_lr_zero_threshold`: weights at or below it are 0 (no adapters there).
    pub block_lr_zero_threshold: f64,
    /// `block_dims`: one rank per block (25, SDXL 23) of linear layers and 1x1
    /// convolutions (0: none in the block).
    pub block_dims: &'a str,
    /// `block_alphas`: the alphas to go with them (0 reads as the block's rank).
    pub block_alphas: &'a str,
    /// `conv_block_dims`: one rank per block of the 3x3 convolutions (kohya's LoCon per
    /// block).
    pub conv_block_dims: &'a str,
    /// `conv_block_alphas`: the alphas to go with them (0 reads as the block's rank).
    pub conv_block_alphas: &'a str,
}

impl BlockSpec<'_> {
    /// Whether any block-wise setting is given.
    pub fn is_set(&self) -> bool {
        [self.down_lr_weight, self.mid_lr_weight, self.up_lr_weight, self.block_dims, self.block_alphas, self.conv_block_dims, self.conv_block_alphas]
            .iter()
            .any(|t| !t.trim().is_empty())
    }
}

/// kohya's block-wise settings resolved per block: the adapter settings of each kind of
/// layer and the learning-rate factor.
///
/// ```
/// use lora_core::LoraConfig;
/// use sd_model::blocks::{BlockLayout, BlockPlan, BlockSpec};
///
/// let dims = ["4"; 25].join(",").replacen("4", "0", 1).replacen(",4", ",2", 1); // 0,2,4,4,…
/// let spec = BlockSpec { block_dims: &dims, up_lr_weight: "0.5", ..Default::default() };
/// let linear = LoraConfig::new(8).with_alpha(4.0);
/// let plan = BlockPlan::new(&spec, &linear, &linear, 1.0).unwrap().unwrap();
/// let q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"; // block 1
/// assert_eq!(plan.config(q, [1, 1]).map(|c| (c.rank, c.alpha)), Some((2, 4.0)));
/// assert_eq!(plan.lr_factor("up_blocks.0.attentions.0.proj_in"), 0.5); // OUT00
/// assert_eq!(plan.lr_factor("up_blocks.1.attentions.0.proj_in"), 1.0); // a short list ends in ones
/// assert_eq!(plan.config("conv_in", [3, 3]), Some(linear.clone()), "outside the blocks: the base settings");
///
/// // SDXL's 23 blocks: no adapters in the middle block's transformer (block 11).
/// let spec = BlockSpec { layout: BlockLayout::Sdxl, mid_lr_weight: "1,0,1", ..Default::default() };
/// let plan = BlockPlan::new(&spec, &linear, &linear, 1.0).unwrap().unwrap();
/// assert_eq!(plan.config("mid_block.attentions.0.proj_in", [1, 1]), None);
/// assert_eq!(plan.config("mid_block.resnets.1.conv1", [3, 3]), Some(linear.clone()));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct BlockPlan {
    layout: BlockLayout,
    linear: Vec<Option<LoraConfig>>,
    spatial: Vec<Option<LoraConfig>>,
    lr: Vec<f64>,
    base_linear: LoraConfig,
    base_spatial: LoraConfig,
}

impl BlockPlan {
    /// Resolves `spec` over the base settings: `linear` (linear layers and 1x1
    /// convolutions), `spatial` (larger convolutions) and `conv_alpha`, the alpha of
    /// `conv_block_dims` without `conv_block_alphas` (kohya's `conv_alpha`, 1 by default).
    /// As in kohya, a block whose learning-rate weight is 0 gets no adapters; without
    /// `block_dims` the blocks take `linear`'s rank, and without `conv_block_dims` the 3x3
    /// convolutions keep `spatial`. `None` when `spec` sets nothing.
    pub fn new(spec: &BlockSpec<'_>, linear: &LoraConfig, spatial: &LoraConfig, conv_alpha: f32) -> Result<Option<Self>> {
        if !spec.is_set() {
            return Ok(None);
        }
        let layout = spec.layout;
        let blocks = layout.blocks();
        let lr = lr_weights(layout, spec.down_lr_weight, spec.mid_lr_weight, spec.up_lr_weight, spec.block_lr_zero_threshold)?.unwrap_or_else(|| vec![1.0; blocks]);
        let dims = block_ranks(layout, "block_dims", spec.block_dims)?;
        let alphas = block_values(layout, "block_alphas", spec.block_alphas)?;
        let conv_dims = block_ranks(layout, "conv_block_dims", spec.conv_block_dims)?;
        let conv_alphas = block_values(layout, "conv_block_alphas", spec.conv_block_alphas)?;
        if conv_alphas.is_some() && conv_dims.is_none() {
            return Err(bad("conv_block_alphas", "is set without lora.conv_block_dims, the ranks they go with"));
        }
        // Alpha 0 reads as the rank, as kohya reads `network_alpha = 0`.
        let with = |base: &LoraConfig, rank: usize, alpha: f32| base.clone().with_rank(rank).with_alpha(if alpha == 0.0 { rank as f32 } else { alpha });
        let mut plan = Self {
            layout,
            linear: Vec::with_capacity(blocks),
            spatial: Vec::with_capacity(blocks),
            lr,
            base_linear: linear.clone(),
            base_spatial: spatial.clone(),
        };
        for b in 0..blocks {
            let trained = plan.lr[b] != 0.0;
            let rank = dims.as_ref().map_or(linear.rank, |d| d[b]);
            let alpha = alphas.as_ref().map_or(linear.alpha, |a| a[b] as f32);
            plan.linear.push((trained && rank > 0).then(|| with(linear, rank, alpha)));
            let conv = match &conv_dims {
                Some(d) => (d[b] > 0).then(|| with(spatial, d[b], conv_alphas.as_ref().map_or(conv_alpha, |a| a[b] as f32))),
                None => Some(spatial.clone()),
            };
            plan.spatial.push(conv.filter(|_| trained));
        }
        Ok(Some(plan))
    }

    /// The numbering the plan follows.
    pub fn layout(&self) -> BlockLayout {
        self.layout
    }

    /// The adapter settings of the layer at `path` with kernel `kernel` (`[1, 1]` for linear
    /// layers): its block's, the base settings outside the blocks, `None` for no adapter.
    pub fn config(&self, path: &str, kernel: [usize; 2]) -> Option<LoraConfig> {
        let spatial = kernel != [1, 1];
        match (self.layout.block(path), spatial) {
            (Some(b), false) => self.linear[b].clone(),
            (Some(b), true) => self.spatial[b].clone(),
            (None, false) => Some(self.base_linear.clone()),
            (None, true) => Some(self.base_spatial.clone()),
        }
    }

    /// The learning-rate factor of the layer at `path`: its block's weight, 1 outside the
    /// blocks (kohya's index −1 there reads the last block's weight).
    pub fn lr_factor(&self, path: &str) -> f64 {
        self.layout.block(path).map_or(1.0, |b| self.lr[b])
    }

    /// The learning-rate weight of every block.
    pub fn lr_weights(&self) -> &[f64] {
        &self.lr
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every SD1.5 site with a block lands in kohya's numbering, and each of blocks 1–24
    /// but the down path's last downsampler slot (IN12 does not exist) has layers.
    #[test]
    fn sd15_sites_fill_the_blocks() {
        // SD1.5's module tree at narrow widths: only the paths matter.
        let narrow = crate::UnetConfig {
            block_out_channels: vec![32, 64, 128, 128],
            norm_num_groups: 8,
            attention_head_dim: crate::PerBlock::All(2),
            cross_attention_dim: 16,
            ..crate::UnetConfig::sd15()
        };
        let mut unet = crate::UNet2DConditionModel::<burn::backend::Flex>::new(&narrow, &Default::default()).unwrap();
        let paths = lora_core::sites::site_paths(&mut unet);
        let mut seen = [0usize; BLOCKS];
        for p in &paths {
            if let Some(b) = kohya_block(p) {
                seen[b] += 1;
            } else {
                assert!(!p.contains("_blocks.") && !p.starts_with("mid_block"), "{p}");
            }
        }
        assert_eq!(seen[0], 0);
        assert!(seen[1..].iter().all(|n| *n > 0), "{seen:?}");
        assert_eq!(kohya_block("down_blocks.2.downsamplers.0.conv"), Some(9));
        assert_eq!(kohya_block("down_blocks.3.resnets.1.conv1"), Some(11));
        assert_eq!(kohya_block("up_blocks.3.attentions.2.proj_out"), Some(24));
        assert_eq!(kohya_block("up_blocks.4.resnets.0.conv1"), None);
    }

    #[test]
    fn plans_resolve_ranks_alphas_and_zero_weights_per_block() {
        let linear = LoraConfig::new(8).with_alpha(8.0).with_dropout(0.1);
        let spatial = LoraConfig::new(8).with_alpha(8.0);
        let dims: Vec<String> = (0..BLOCKS).map(|b| (b % 5).to_string()).collect();
        let alphas: Vec<String> = (0..BLOCKS).map(|b| (b % 3).to_string()).collect();
        let conv: Vec<String> = (0..BLOCKS).map(|b| (b % 2 * 6).to_string()).collect();
        let (dims, alphas, conv) = (dims.join(","), alphas.join(","), conv.join(","));
        let spec = BlockSpec { block_dims: &dims, block_alphas: &alphas, conv_block_dims: &conv, down_lr_weight: "1,1,1,0", ..Default::default() };
        let plan = BlockPlan::new(&spec, &linear, &spatial, 2.0).unwrap().unwrap();
        // Block 1 (IN01): rank 1, alpha 1; its 3x3 convolutions rank 6 with conv_alpha 2.
        let q = plan.config("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", [1, 1]).unwrap();
        assert_eq!((q.rank, q.alpha, q.dropout), (1, 1.0, 0.1));
        let c = plan.config("down_blocks.0.resnets.0.conv1", [3, 3]).unwrap();
        assert_eq!((c.rank, c.alpha), (6, 2.0));
        assert_eq!(plan.config("down_blocks.0.resnets.0.conv_shortcut", [1, 1]).map(|c| c.rank), Some(1));
        // Block 2: alpha 2; no 3x3 adapters (conv rank 0).
        assert_eq!(plan.config("down_blocks.0.resnets.1.conv1", [3, 3]), None);
        assert_eq!(plan.config("down_blocks.0.attentions.1.proj_in", [1, 1]).map(|c| (c.rank, c.alpha)), Some((2, 2.0)));
        // Block 3 (the downsampler) has lr weight 0: nothing trains there.
        assert_eq!(plan.config("down_blocks.0.downsamplers.0.conv", [3, 3]), None);
        assert_eq!(plan.lr_factor("down_blocks.0.downsamplers.0.conv"), 0.0);
        // Block 5: rank 0, no adapter; block 6: alpha 0 reads as the rank 1.
        assert_eq!(plan.config("down_blocks.1.attentions.1.proj_out", [1, 1]), None);
        assert_eq!(plan.config("down_blocks.1.downsamplers.0.conv", [1, 1]).map(|c| (c.rank, c.alpha)), Some((1, 1.0)));
        // Outside the blocks, the base settings and factor 1.
        assert_eq!(plan.config("time_embedding.linear_1", [1, 1]), Some(linear.clone()));
        assert_eq!(plan.lr_factor("conv_in"), 1.0);
        assert_eq!(BlockPlan::new(&BlockSpec::default(), &linear, &spatial, 1.0).unwrap(), None);
        let err = BlockPlan::new(&BlockSpec { conv_block_alphas: &alphas, ..Default::default() }, &linear, &spatial, 1.0).unwrap_err();
        assert!(err.to_string().contains("conv_block_dims"), "{err}");
    }

    #[test]
    fn curves_and_lists_follow_kohya() {
        let w = lr_weights(BlockLayout::Sd, "sine", "", "cosine+0.5", 0.0).unwrap().unwrap();
        assert_eq!(w[0], 0.0, "sin(0) is at the threshold");
        assert!((w[11] - 1.0).abs() < 1e-12 && (w[13] - 1.5).abs() < 1e-12 && (w[24] - 0.5).abs() < 1e-12);
        let w = lr_weights(BlockLayout::Sd, "1,0.5,,2", "", "", 0.1).unwrap().unwrap();
        assert_eq!(&w[..5], &[1.0, 0.5, 0.0, 2.0, 1.0]);
        assert_eq!(&w[12..], &[1.0; 13]);
        let w = lr_weights(BlockLayout::Sd, "", "", "linear", 0.5).unwrap().unwrap();
        assert_eq!(w[13..19], [0.0; 6]);
        assert!(w[19] > 0.5);
        // The threshold cuts the weights given, not the halves left at 1.
        let w = lr_weights(BlockLayout::Sd, "", "", "0.5,2", 0.9).unwrap().unwrap();
        assert_eq!((w[0], w[12], w[13], w[14], w[15]), (1.0, 1.0, 0.0, 2.0, 1.0));
        assert!(lr_weights(BlockLayout::Sd, "sine+inf", "", "", 0.0).is_err() && lr_weights(BlockLayout::Sd, "sine+NaN", "", "", 0.0).is_err());
        assert_eq!(lr_weights(BlockLayout::Sd, " ", "", "", 0.0).unwrap(), None);
        for (down, mid) in [("1,2,3,4,5,6,7,8,9,10,11,12,13", ""), ("wave", ""), ("sine+x", ""), ("", "1,2"), ("1,a", "")] {
            let err = lr_weights(BlockLayout::Sd, down, mid, "", 0.0).unwrap_err().to_string();
            assert!(err.contains("lr_weight"), "{err}");
        }
        assert_eq!(block_ranks(BlockLayout::Sd, "block_dims", &["4"; 25].join(",")).unwrap(), Some(vec![4; 25]));
        assert!(block_ranks(BlockLayout::Sd, "block_dims", "4,4").unwrap_err().to_string().contains("25"));
        assert!(block_ranks(BlockLayout::Sd, "block_dims", &["1.5"; 25].join(",")).is_err());
        assert!(block_ranks(BlockLayout::Sd, "block_dims", &["1e12"; 25].join(",")).is_err());
        assert!(block_values(BlockLayout::Sd, "block_alphas", &["1e300"; 25].join(",")).is_err());
        assert!(block_values(BlockLayout::Sd, "block_alphas", &["-1"; 25].join(",")).is_err());
    }

    /// kohya computes SDXL's blocks from the SGM names of its LoRA modules
    /// (`lora_unet_input_blocks_4_1_…`); [`BlockLayout::Sdxl`] reads diffusers paths. Both
    /// give the same block for every site of SDXL's module tree, and every block has layers.
    #[test]
    fn sdxl_sites_follow_kohyas_sgm_numbering() {
        let narrow = crate::UnetConfig {
            block_out_channels: vec![32, 64, 64],
            norm_num_groups: 8,
            attention_head_dim: crate::PerBlock::All(2),
            cross_attention_dim: 16,
            transformer_layers_per_block: crate::PerBlock::All(1),
            addition_time_embed_dim: Some(8),
            projection_class_embeddings_input_dim: Some(16 + 6 * 8),
            ..crate::UnetConfig::sdxl()
        };
        let mut unet = crate::UNet2DConditionModel::<burn::backend::Flex>::new(&narrow, &Default::default()).unwrap();
        assert_eq!(BlockLayout::of(&unet), BlockLayout::Sdxl);
        let layout = crate::keymap::UnetLayout::of(&unet);
        // kohya's `get_block_index` for SDXL, on the kohya name of the module.
        let kohya = |name: &str| -> usize {
            let name = name.strip_prefix("lora_unet_").unwrap();
            let nth = |prefix: &str| name[prefix.len()..].split('_').next().unwrap().parse::<usize>().unwrap();
            if name.starts_with("time_embed_") || name.starts_with("label_emb_") {
                0
            } else if name.starts_with("input_blocks_") {
                1 + nth("input_blocks_")
            } else if name.starts_with("middle_block_") {
                10 + nth("middle_block_")
            } else if name.starts_with("output_blocks_") {
                13 + nth("output_blocks_")
            } else {
                assert!(name.starts_with("out_"), "{name}");
                22
            }
        };
        let mut seen = vec![0usize; BlockLayout::Sdxl.blocks()];
        for path in lora_core::sites::site_paths(&mut unet) {
            let sgm = layout.ldm_module_path(&path).unwrap_or_else(|| panic!("{path}"));
            let name = format!("lora_unet_{}", sgm.replace('.', "_"));
            let block = BlockLayout::Sdxl.block(&path);
            assert_eq!(block, Some(kohya(&name)), "{path} = {sgm}");
            seen[block.unwrap()] += 1;
        }
        assert!(seen.iter().all(|n| *n > 0), "{seen:?}");
    }

    #[test]
    fn sdxl_lists_have_kohyas_lengths() {
        let sdxl = BlockLayout::Sdxl;
        let w = lr_weights(sdxl, "sine", "0.5", "zeros+0.25", 0.0).unwrap().unwrap();
        assert_eq!(w.len(), 23);
        // Block 0 (the embeddings) and 22 (the output) are fixed at 1.
        assert_eq!((w[0], w[22]), (1.0, 1.0));
        // The curve spans the 9 down blocks: 0 at `input_blocks.0`, 1 at `input_blocks.8`.
        assert_eq!(w[1], 0.0);
        assert!((w[9] - 1.0).abs() < 1e-12 && (w[5] - (std::f64::consts::FRAC_PI_4).sin()).abs() < 1e-12);
        // A short middle list ends in ones.
        assert_eq!(&w[10..13], &[0.5, 1.0, 1.0]);
        assert_eq!(&w[13..22], &[0.25; 9]);
        // As kohya, a short middle list is filled with ones before the threshold cuts.
        let w = lr_weights(sdxl, "", "0.5", "", 1.0).unwrap().unwrap();
        assert_eq!(&w[10..13], &[0.0; 3]);
        let w = lr_weights(sdxl, "1,2,3,4,5,6,7,8,9", "", "", 0.0).unwrap().unwrap();
        assert_eq!(&w[..11], &[1.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 1.0]);
        for (down, mid, want) in [("1,2,3,4,5,6,7,8,9,10", "", "9 blocks"), ("", "1,1,1,1", "3 blocks"), ("", "1,2", "")] {
            match lr_weights(sdxl, down, mid, "", 0.0) {
                Err(e) => assert!(!want.is_empty() && e.to_string().contains(want), "{e}"),
                Ok(_) => assert!(want.is_empty(), "{down} / {mid} should fail"),
            }
        }
        // The SD lists do not fit SDXL, nor SDXL's SD.
        let sd_dims = ["4"; 25].join(",");
        let sdxl_dims = ["4"; 23].join(",");
        assert!(block_ranks(sdxl, "block_dims", &sd_dims).unwrap_err().to_string().contains("23 for an SDXL UNet"));
        assert_eq!(block_ranks(sdxl, "block_dims", &sdxl_dims).unwrap(), Some(vec![4; 23]));
        assert!(block_ranks(BlockLayout::Sd, "block_dims", &sdxl_dims).unwrap_err().to_string().contains("25"));
        // Outside the middle: `mid_block.attentions.1` does not exist in SDXL.
        assert_eq!(sdxl.block("mid_block.attentions.1.proj_in"), None);
        assert_eq!(sdxl.block("down_blocks.3.resnets.0.conv1"), None);
        assert_eq!(sdxl.block("down_blocks.2.downsamplers.0.conv"), None);
    }
}
