//! Per-block strengths of a LoRA when it is applied, as the LoRA Block Weight extension of
//! AUTOMATIC1111's web UI (hako-mikan/sd-webui-lora-block-weight, `lbw=`) sets them.
//!
//! The UNet is cut into the original (LDM) model's blocks: `IN00`–`IN11` (`input_blocks.N`:
//! `conv_in`, then each level's ResNets / transformers and its downsampler), `M00` (the
//! middle block), `OUT00`–`OUT11` (`output_blocks.N`), and `BASE` stands for the text
//! encoders. A weight list has 17 values (SD1.x / SD2.x LoRA: `BASE`, `IN01`, `IN02`,
//! `IN04`, `IN05`, `IN07`, `IN08`, `M00`, `OUT03`–`OUT11`, the blocks with transformers),
//! 26 (every block, for LoCon / LyCORIS), 12 (SDXL LoRA: `BASE`, `IN04`, `IN05`, `IN07`,
//! `IN08`, `M00`, `OUT00`–`OUT05`) or 20 (SDXL, every block: `BASE`, `IN00`–`IN08`, `M00`,
//! `OUT00`–`OUT08`); blocks a list does not name get 0, as the extension gives them.
//! Layers in no block (the time and added embeddings, `conv_out`) keep weight 1. A
//! module's weight multiplies its file's strength (the text encoders': their own strength).
//!
//! ```
//! use lora_core::{AdapterKey, Component};
//! use sd_model::block_weights::BlockWeights;
//!
//! let w: BlockWeights = "OUTALL".parse().unwrap(); // 1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1
//! let key = |c, p: &str| AdapterKey::new(c, p);
//! assert_eq!(w.weight(&key(Component::TextEncoder, "text_model.encoder.layers.0.mlp.fc1"), 2), 1.0);
//! assert_eq!(w.weight(&key(Component::Unet, "down_blocks.1.attentions.0.proj_in"), 2), 0.0); // IN04
//! assert_eq!(w.weight(&key(Component::Unet, "up_blocks.1.attentions.2.proj_out"), 2), 1.0); // OUT05
//! assert_eq!(w.weight(&key(Component::Unet, "up_blocks.0.resnets.0.conv1"), 2), 0.0); // OUT00: not in 17
//! assert_eq!(w.weight(&key(Component::Unet, "time_embedding.linear_1"), 2), 1.0); // no block
//! ```

use std::str::FromStr;

use lora_core::{AdapterKey, Component};

/// Every block, in the order of a 26-value list.
pub const BLOCK_IDS: [&str; 26] = [
    "BASE", "IN00", "IN01", "IN02", "IN03", "IN04", "IN05", "IN06", "IN07", "IN08", "IN09", "IN10", "IN11", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05",
    "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11",
];

/// The blocks of a 17-value list (SD1.x / SD2.x LoRA: the blocks with transformers).
const BLOCKS_17: [&str; 17] = ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"];
/// The blocks of a 12-value list (SDXL LoRA).
const BLOCKS_12: [&str; 12] = ["BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05"];
/// The blocks of a 20-value list (SDXL, every block).
const BLOCKS_20: [&str; 20] = ["BASE", "IN00", "IN01", "IN02", "IN03", "IN04", "IN05", "IN06", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05", "OUT06", "OUT07", "OUT08"];

/// The extension's built-in presets (17 values each).
pub const PRESETS: [(&str, &str); 10] = [
    ("NONE", "0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0,0"),
    ("ALL", "1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1"),
    ("INS", "1,1,1,1,0,0,0,0,0,0,0,0,0,0,0,0,0"),
    ("IND", "1,0,0,0,1,1,1,0,0,0,0,0,0,0,0,0,0"),
    ("INALL", "1,1,1,1,1,1,1,0,0,0,0,0,0,0,0,0,0"),
    ("MIDD", "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0"),
    ("OUTD", "1,0,0,0,0,0,0,0,1,1,1,1,0,0,0,0,0"),
    ("OUTS", "1,0,0,0,0,0,0,0,0,0,0,0,1,1,1,1,1"),
    ("OUTALL", "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1"),
    ("ALL0.5", "0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5,0.5"),
];

/// A weight per block (see the [module docs](self)).
#[derive(Debug, Clone, PartialEq)]
pub struct BlockWeights {
    /// In [`BLOCK_IDS`] order.
    weights: [f32; 26],
    /// The list as given (a preset's name or the values), for messages and metadata.
    spec: String,
    /// Whether the list is one of SDXL's (12 or 20 values).
    sdxl: bool,
}

impl FromStr for BlockWeights {
    type Err = String;

    /// A preset name ([`PRESETS`]) or 12, 17, 20 or 26 comma-separated numbers.
    fn from_str(spec: &str) -> Result<Self, String> {
        let spec = spec.trim();
        let values = PRESETS.iter().find(|(name, _)| *name == spec).map_or(spec, |(_, values)| values);
        let numbers = values
            .split(',')
            .map(|v| v.trim().parse::<f32>().ok().filter(|x| x.is_finite()))
            .collect::<Option<Vec<f32>>>()
            .ok_or_else(|| {
                let presets = PRESETS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ");
                format!("block weights `{spec}`: expected a preset ({presets}) or 12, 17, 20 or 26 comma-separated numbers")
            })?;
        let ids: &[&str] = match numbers.len() {
            12 => &BLOCKS_12,
            17 => &BLOCKS_17,
            20 => &BLOCKS_20,
            26 => &BLOCK_IDS,
            n => return Err(format!("block weights `{spec}`: {n} values; expected 17 or 26 (SD1.x / SD2.x), 12 or 20 (SDXL)")),
        };
        let mut weights = [0.0; 26];
        for (id, w) in ids.iter().zip(numbers) {
            let at = BLOCK_IDS.iter().position(|b| b == id).expect("every list names known blocks");
            weights[at] = w;
        }
        Ok(Self { weights, spec: spec.to_string(), sdxl: ids.len() == 12 || ids.len() == 20 })
    }
}

impl BlockWeights {
    /// The list as it was given.
    pub fn spec(&self) -> &str {
        &self.spec
    }

    /// Whether this is an SDXL list (12 or 20 values) rather than an SD1.x / SD2.x one (17
    /// or 26 values, and every preset): the same block names sit at other layers of the
    /// other family's UNet, so a list weighs only models of its own family.
    ///
    /// ```
    /// use sd_model::block_weights::BlockWeights;
    /// assert!(!"ALL".parse::<BlockWeights>().unwrap().for_sdxl());
    /// assert!("1,1,1,1,1,1,0,0,0,0,0,0".parse::<BlockWeights>().unwrap().for_sdxl());
    /// ```
    pub fn for_sdxl(&self) -> bool {
        self.sdxl
    }

    /// The weight of block `id` (`BASE`, `IN00`, ..., `OUT11`), `None` for an unknown id.
    pub fn of_block(&self, id: &str) -> Option<f32> {
        BLOCK_IDS.iter().position(|b| *b == id).map(|i| self.weights[i])
    }

    /// The weight of the adapter at `key`, for a UNet with `layers_per_block` ResNets per
    /// down level (2 in SD1.x, SD2.x and SDXL): the text encoders take `BASE`; UNet layers
    /// outside every block take 1.
    pub fn weight(&self, key: &AdapterKey, layers_per_block: usize) -> f32 {
        if key.component != Component::Unet {
            return self.weights[0];
        }
        block_index(&key.path, layers_per_block).map_or(1.0, |i| self.weights[i])
    }
}

/// The position in [`BLOCK_IDS`] of the LDM block holding the UNet module at diffusers path
/// `path`, `None` for modules in no block.
fn block_index(path: &str, layers: usize) -> Option<usize> {
    let mut parts = path.split('.');
    let head = parts.next()?;
    let number = |p: Option<&str>| p.and_then(|s| s.parse::<usize>().ok());
    let input = |n: usize| (n <= 11).then_some(1 + n);
    let output = |n: usize| (n <= 11).then_some(14 + n);
    match head {
        "conv_in" => input(0),
        "mid_block" => Some(13),
        "down_blocks" | "up_blocks" => {
            let level = number(parts.next())?;
            let kind = parts.next()?;
            let j = match kind {
                "resnets" | "attentions" => number(parts.next())?,
                "downsamplers" | "upsamplers" => layers,
                _ => return None,
            };
            if head == "down_blocks" {
                // input_blocks: conv_in, then per level `layers` blocks and the downsampler.
                input(1 + level * (layers + 1) + j)
            } else {
                // output_blocks: per level `layers + 1` blocks, the upsampler in the last.
                output(level * (layers + 1) + j.min(layers))
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diffusers_paths_fall_in_the_ldm_blocks() {
        let id = |p: &str| block_index(p, 2).map(|i| BLOCK_IDS[i]);
        assert_eq!(id("conv_in"), Some("IN00"));
        assert_eq!(id("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"), Some("IN01"));
        assert_eq!(id("down_blocks.0.resnets.1.conv2"), Some("IN02"));
        assert_eq!(id("down_blocks.0.downsamplers.0.conv"), Some("IN03"));
        assert_eq!(id("down_blocks.2.attentions.1.proj_out"), Some("IN08"));
        assert_eq!(id("down_blocks.3.resnets.1.conv1"), Some("IN11"));
        assert_eq!(id("mid_block.attentions.0.proj_in"), Some("M00"));
        assert_eq!(id("up_blocks.0.resnets.2.conv_shortcut"), Some("OUT02"));
        assert_eq!(id("up_blocks.0.upsamplers.0.conv"), Some("OUT02"));
        assert_eq!(id("up_blocks.1.attentions.0.proj_in"), Some("OUT03"));
        assert_eq!(id("up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2"), Some("OUT11"));
        assert_eq!(id("time_embedding.linear_1"), None);
        assert_eq!(id("conv_out"), None);
    }

    #[test]
    fn lists_expand_to_every_block_with_zeros() {
        let sdxl: BlockWeights = "0,1,1,1,1,1,0.5,0.5,0.5,0.5,0.5,0.5".parse().unwrap();
        assert_eq!(sdxl.of_block("BASE"), Some(0.0));
        assert_eq!(sdxl.of_block("IN04"), Some(1.0));
        assert_eq!(sdxl.of_block("IN01"), Some(0.0));
        assert_eq!(sdxl.of_block("OUT05"), Some(0.5));
        assert_eq!(sdxl.of_block("OUT06"), Some(0.0));
        let all: BlockWeights = "ALL0.5".parse().unwrap();
        assert_eq!((all.of_block("IN02"), all.of_block("IN03"), all.spec()), (Some(0.5), Some(0.0), "ALL0.5"));
        assert!(BlockWeights::from_str("1,2,3").unwrap_err().contains("3 values"));
        assert!(BlockWeights::from_str("OUTSIDE").unwrap_err().contains("preset"));
        assert!(BlockWeights::from_str("1,1,1,1,1,1,1,1,1,1,1,nan").is_err());
    }
}
