//! kohya's block-wise LoRA settings for SD1.x / SD2.x UNets: which of the 25 blocks a layer
//! belongs to, and the per-block learning-rate weights, ranks and alphas of kohya's
//! `network_args` (`down_lr_weight`, `mid_lr_weight`, `up_lr_weight`,
//! `block_lr_zero_threshold`, `block_dims`, `block_alphas`, `conv_block_dims`,
//! `conv_block_alphas`), read in kohya's syntax.
//!
//! The blocks are A1111's `IN` / `MID` / `OUT` numbering: block 0 holds no LoRA layer,
//! blocks 1–11 are the down path (`IN01`–`IN11`: three per down block, the third its
//! downsampler), 12 the middle block, 13–24 the up path (`OUT00`–`OUT11`: three per up
//! block, the third with its upsampler).
//!
//! ```
//! use sd_model::blocks::{kohya_block, lr_weights};
//! assert_eq!(kohya_block("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"), Some(4));
//! assert_eq!(kohya_block("mid_block.attentions.0.proj_in"), Some(12));
//! assert_eq!(kohya_block("up_blocks.0.upsamplers.0.conv"), Some(15));
//! assert_eq!(kohya_block("conv_in"), None);
//! let weights = lr_weights("", "0.5", "zeros+0.25", 0.0).unwrap().unwrap();
//! assert_eq!((weights[1], weights[12], weights[13]), (1.0, 0.5, 0.25));
//! ```

use lora_core::LoraConfig;

use crate::{Result, SdModelError};

/// Number of kohya blocks of an SD1.x / SD2.x UNet (block 0 holds no layer).
pub const BLOCKS: usize = 25;

/// The largest rank `block_dims` / `conv_block_dims` accept (SD's widest layer is smaller).
pub const MAX_RANK: usize = 1 << 16;

/// Blocks per half (down or up) in kohya's lists: `down_lr_weight` and `up_lr_weight`
/// have this many entries.
pub const HALF: usize = 12;

/// The block of the UNet layer at `path` (diffusers module path): `None` for layers outside
/// the down, middle and up blocks (`conv_in`, the time embedding, `conv_out`) and for
/// positions past SD1.x's layout (a UNet config with more layers per block).
pub fn kohya_block(path: &str) -> Option<usize> {
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
    let mut parts = rest.split('.');
    let block: usize = parts.next()?.parse().ok()?;
    let kind = parts.next()?;
    let layer: usize = parts.next()?.parse().ok()?;
    let within = match kind {
        "resnets" | "attentions" if layer < 3 => layer,
        "downsamplers" | "upsamplers" => 2,
        _ => return None,
    };
    let index = first + 3 * block + within;
    (index < first + HALF).then_some(index)
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
fn half_weights(key: &str, text: &str) -> Result<Vec<f64>> {
    if text.contains(',') || text.trim().parse::<f64>().is_ok() {
        let values = parse_list(key, text)?;
        if values.len() > HALF {
            return Err(bad(key, format!("has {} entries; a half of the UNet has {HALF} blocks", values.len())));
        }
        // kohya fills a short list with ones.
        return Ok(values.into_iter().chain(std::iter::repeat(1.0)).take(HALF).collect());
    }
    let (name, base) = match text.split_once('+') {
        Some((name, base)) => (name.trim(), base.trim().parse::<f64>().ok().filter(|b| b.is_finite()).ok_or_else(|| bad(key, format!("`{base}` after `+` is not a number")))?),
        None => (text.trim(), 0.0),
    };
    let last = (HALF - 1) as f64;
    let quarter_sine = |i: usize| (std::f64::consts::FRAC_PI_2 * i as f64 / last).sin();
    let curve: Vec<f64> = match name {
        "cosine" => (0..HALF).rev().map(quarter_sine).collect(),
        "sine" => (0..HALF).map(quarter_sine).collect(),
        "linear" => (0..HALF).map(|i| i as f64 / last).collect(),
        "reverse_linear" => (0..HALF).rev().map(|i| i as f64 / last).collect(),
        "zeros" => vec![0.0; HALF],
        other => return Err(bad(key, format!("unknown curve `{other}`; expected numbers separated by commas or cosine, sine, linear, reverse_linear or zeros (optionally `+BASE`)"))),
    };
    Ok(curve.into_iter().map(|w| w + base).collect())
}

/// kohya's block-wise learning-rate weights, one factor per block: `down` and `up` are
/// lists of up to 12 numbers (shorter ones are filled with 1) or curves (`sine+0.5`),
/// `mid` one number; an empty string leaves its blocks at 1. Weights at or below
/// `zero_threshold` become 0: kohya then trains no adapter in those blocks. `None` when
/// all three are empty.
pub fn lr_weights(down: &str, mid: &str, up: &str, zero_threshold: f64) -> Result<Option<[f64; BLOCKS]>> {
    if down.trim().is_empty() && mid.trim().is_empty() && up.trim().is_empty() {
        return Ok(None);
    }
    // As kohya, the threshold applies to the weights given; halves left out stay at 1.
    let cut = |w: f64| if w > zero_threshold { w } else { 0.0 };
    let half = |key: &str, text: &str| -> Result<Vec<f64>> {
        match text.trim() {
            "" => Ok(vec![1.0; HALF]),
            text => Ok(half_weights(key, text)?.into_iter().map(cut).collect()),
        }
    };
    let mid = match mid.trim() {
        "" => 1.0,
        text => match parse_list("mid_lr_weight", text)?.as_slice() {
            [w] => cut(*w),
            more => return Err(bad("mid_lr_weight", format!("has {} entries; the middle block is one block", more.len()))),
        },
    };
    let mut weights = [0.0; BLOCKS];
    let all = half("down_lr_weight", down)?.into_iter().chain([mid]).chain(half("up_lr_weight", up)?);
    for (slot, w) in weights.iter_mut().zip(all) {
        *slot = w;
    }
    Ok(Some(weights))
}

/// One value per block for `key` (`block_dims`, `block_alphas`, ...): exactly 25 numbers
/// separated by commas; `None` when `text` is empty.
pub fn block_values(key: &str, text: &str) -> Result<Option<[f64; BLOCKS]>> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    let values = parse_list(key, text)?;
    if let Some(v) = values.iter().find(|v| v.abs() > f64::from(f32::MAX)) {
        return Err(bad(key, format!("has the entry {v}, beyond f32")));
    }
    let values: [f64; BLOCKS] = values
        .as_slice()
        .try_into()
        .map_err(|_| bad(key, format!("has {} entries; expected one per block, {BLOCKS}", values.len())))?;
    if let Some(v) = values.iter().find(|v| **v < 0.0) {
        return Err(bad(key, format!("has the negative entry {v}")));
    }
    Ok(Some(values))
}

/// `block_values` for ranks: whole numbers.
pub fn block_ranks(key: &str, text: &str) -> Result<Option<[usize; BLOCKS]>> {
    let Some(values) = block_values(key, text)? else { return Ok(None) };
    if let Some(v) = values.iter().find(|v| v.fract() != 0.0 || **v > MAX_RANK as f64) {
        return Err(bad(key, format!("has {v}; ranks are whole numbers up to {MAX_RANK}")));
    }
    Ok(Some(values.map(|v| v as usize)))
}

/// kohya's block-wise `network_args`, as text in kohya's syntax (an empty string: not set).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BlockSpec<'a> {
    /// `down_lr_weight`: up to 12 numbers for blocks 0–11, or a curve ([`lr_weights`]).
    pub down_lr_weight: &'a str,
    /// `mid_lr_weight`: one number for block 12.
    pub mid_lr_weight: &'a str,
    /// `up_lr_weight`: up to 12 numbers for blocks 13–24, or a curve.
    pub up_lr_weight: &'a str,
    /// `block_lr_zero_threshold`: weights at or below it are 0 (no adapters there).
    pub block_lr_zero_threshold: f64,
    /// `block_dims`: 25 ranks of linear layers and 1x1 convolutions (0: none in the block).
    pub block_dims: &'a str,
    /// `block_alphas`: 25 alphas to go with them (0 reads as the block's rank).
    pub block_alphas: &'a str,
    /// `conv_block_dims`: 25 ranks of the 3x3 convolutions (kohya's LoCon per block).
    pub conv_block_dims: &'a str,
    /// `conv_block_alphas`: 25 alphas to go with them (0 reads as the block's rank).
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
/// use sd_model::blocks::{BlockPlan, BlockSpec};
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
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct BlockPlan {
    linear: Vec<Option<LoraConfig>>,
    spatial: Vec<Option<LoraConfig>>,
    lr: [f64; BLOCKS],
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
        let lr = lr_weights(spec.down_lr_weight, spec.mid_lr_weight, spec.up_lr_weight, spec.block_lr_zero_threshold)?.unwrap_or([1.0; BLOCKS]);
        let dims = block_ranks("block_dims", spec.block_dims)?;
        let alphas = block_values("block_alphas", spec.block_alphas)?;
        let conv_dims = block_ranks("conv_block_dims", spec.conv_block_dims)?;
        let conv_alphas = block_values("conv_block_alphas", spec.conv_block_alphas)?;
        if conv_alphas.is_some() && conv_dims.is_none() {
            return Err(bad("conv_block_alphas", "is set without lora.conv_block_dims, the ranks they go with"));
        }
        // Alpha 0 reads as the rank, as kohya reads `network_alpha = 0`.
        let with = |base: &LoraConfig, rank: usize, alpha: f32| base.clone().with_rank(rank).with_alpha(if alpha == 0.0 { rank as f32 } else { alpha });
        let mut plan = Self { linear: Vec::with_capacity(BLOCKS), spatial: Vec::with_capacity(BLOCKS), lr, base_linear: linear.clone(), base_spatial: spatial.clone() };
        for b in 0..BLOCKS {
            let trained = lr[b] != 0.0;
            let rank = dims.map_or(linear.rank, |d| d[b]);
            let alpha = alphas.map_or(linear.alpha, |a| a[b] as f32);
            plan.linear.push((trained && rank > 0).then(|| with(linear, rank, alpha)));
            let conv = match conv_dims {
                Some(d) => (d[b] > 0).then(|| with(spatial, d[b], conv_alphas.map_or(conv_alpha, |a| a[b] as f32))),
                None => Some(spatial.clone()),
            };
            plan.spatial.push(conv.filter(|_| trained));
        }
        Ok(Some(plan))
    }

    /// The adapter settings of the layer at `path` with kernel `kernel` (`[1, 1]` for linear
    /// layers): its block's, the base settings outside the blocks, `None` for no adapter.
    pub fn config(&self, path: &str, kernel: [usize; 2]) -> Option<LoraConfig> {
        let spatial = kernel != [1, 1];
        match (kohya_block(path), spatial) {
            (Some(b), false) => self.linear[b].clone(),
            (Some(b), true) => self.spatial[b].clone(),
            (None, false) => Some(self.base_linear.clone()),
            (None, true) => Some(self.base_spatial.clone()),
        }
    }

    /// The learning-rate factor of the layer at `path`: its block's weight, 1 outside the
    /// blocks (kohya's index −1 there reads the last block's weight).
    pub fn lr_factor(&self, path: &str) -> f64 {
        kohya_block(path).map_or(1.0, |b| self.lr[b])
    }

    /// The learning-rate weight of every block.
    pub fn lr_weights(&self) -> &[f64; BLOCKS] {
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
        let w = lr_weights("sine", "", "cosine+0.5", 0.0).unwrap().unwrap();
        assert_eq!(w[0], 0.0, "sin(0) is at the threshold");
        assert!((w[11] - 1.0).abs() < 1e-12 && (w[13] - 1.5).abs() < 1e-12 && (w[24] - 0.5).abs() < 1e-12);
        let w = lr_weights("1,0.5,,2", "", "", 0.1).unwrap().unwrap();
        assert_eq!(&w[..5], &[1.0, 0.5, 0.0, 2.0, 1.0]);
        assert_eq!(&w[12..], &[1.0; 13]);
        let w = lr_weights("", "", "linear", 0.5).unwrap().unwrap();
        assert_eq!(w[13..19], [0.0; 6]);
        assert!(w[19] > 0.5);
        // The threshold cuts the weights given, not the halves left at 1.
        let w = lr_weights("", "", "0.5,2", 0.9).unwrap().unwrap();
        assert_eq!((w[0], w[12], w[13], w[14], w[15]), (1.0, 1.0, 0.0, 2.0, 1.0));
        assert!(lr_weights("sine+inf", "", "", 0.0).is_err() && lr_weights("sine+NaN", "", "", 0.0).is_err());
        assert_eq!(lr_weights(" ", "", "", 0.0).unwrap(), None);
        for (down, mid) in [("1,2,3,4,5,6,7,8,9,10,11,12,13", ""), ("wave", ""), ("sine+x", ""), ("", "1,2"), ("1,a", "")] {
            let err = lr_weights(down, mid, "", 0.0).unwrap_err().to_string();
            assert!(err.contains("lr_weight"), "{err}");
        }
        assert_eq!(block_ranks("block_dims", &["4"; 25].join(",")).unwrap(), Some([4; 25]));
        assert!(block_ranks("block_dims", "4,4").unwrap_err().to_string().contains("25"));
        assert!(block_ranks("block_dims", &["1.5"; 25].join(",")).is_err());
        assert!(block_ranks("block_dims", &["1e12"; 25].join(",")).is_err());
        assert!(block_values("block_alphas", &["1e300"; 25].join(",")).is_err());
        assert!(block_values("block_alphas", &["-1"; 25].join(",")).is_err());
    }
}
