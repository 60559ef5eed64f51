//! The one place where checkpoint key layouts are mapped to our module paths.
//!
//! Our modules are named as in diffusers / transformers, so a diffusers folder's keys are
//! used as they are. Single-file (LDM / "original") checkpoints are mapped here:
//!
//! | single-file prefix | component | mapping |
//! |---|---|---|
//! | `cond_stage_model.transformer.text_model.` (SD1, OpenAI CLIP) | text encoder | prefix → `text_model.` |
//! | `cond_stage_model.transformer.` without `text_model.` (older exports) | text encoder | prefix → `text_model.` |
//! | `cond_stage_model.model.` (SD2, OpenCLIP) | text encoder | see [`open_clip_key`] |
//! | `conditioner.embedders.0.transformer.text_model.` (SDXL, OpenAI CLIP) | text encoder | prefix → `text_model.` |
//! | `conditioner.embedders.1.model.` (SDXL, OpenCLIP bigG) | second text encoder | see [`open_clip_key_at`]; `text_projection` transposed |
//! | `model.diffusion_model.` | UNet | see [`UnetLayout::ldm_key`]; SDXL's `label_emb.0.{0,2}` → `add_embedding.linear_{1,2}` |
//! | `first_stage_model.` | VAE | see [`ldm_vae_key`] |
//!
//! Keys a checkpoint may carry that the model has no use for (position-id buffers,
//! OpenCLIP's `text_projection` / `logit_scale`, its 24th layer that SD2 skips, EMA copies)
//! are listed by [`is_ignored_single_file_key`] / [`is_ignored_diffusers_key`].

/// How to obtain one model tensor from a checkpoint tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSource {
    /// The checkpoint key.
    pub key: String,
    /// Take rows `start..end` of dimension 0 (OpenCLIP's fused q/k/v projections).
    pub rows: Option<(usize, usize)>,
    /// Drop trailing 1x1 dimensions (LDM VAE attention stores linear weights as 1x1 convs).
    pub squeeze_1x1: bool,
    /// The file holds the transpose of the PyTorch weight (OpenCLIP's `text_projection`,
    /// applied as `x @ P`, is `nn.Linear`'s weight transposed).
    pub transpose: bool,
}

impl TensorSource {
    /// The tensor as it is.
    pub fn plain(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            rows: None,
            squeeze_1x1: false,
            transpose: false,
        }
    }
}

/// Buffers and extras in diffusers-layout files that carry no weights of ours.
pub fn is_ignored_diffusers_key(key: &str) -> bool {
    key.ends_with("embeddings.position_ids")
}

/// Keys of a single-file checkpoint that no component uses.
pub fn is_ignored_single_file_key(key: &str) -> bool {
    key.starts_with("model_ema.")
        || key.ends_with("position_ids")
        || key.starts_with("cond_stage_model.model.text_projection")
        || key.starts_with("cond_stage_model.model.logit_scale")
        || key.starts_with("cond_stage_model.model.attn_mask")
        || key.starts_with("conditioner.embedders.1.model.logit_scale")
        || key.starts_with("conditioner.embedders.1.model.attn_mask")
        // Empty marker tensors (ComfyUI's convention): v-prediction, zero terminal SNR.
        || matches!(key, "v_pred" | "ztsnr")
        || matches!(key, "alphas_cumprod" | "alphas_cumprod_prev" | "betas" | "log_one_minus_alphas_cumprod"
            | "model_ema.decay" | "model_ema.num_updates" | "posterior_log_variance_clipped"
            | "posterior_mean_coef1" | "posterior_mean_coef2" | "posterior_variance"
            | "sqrt_alphas_cumprod" | "sqrt_one_minus_alphas_cumprod" | "sqrt_recip_alphas_cumprod"
            | "sqrt_recipm1_alphas_cumprod" | "logvar")
}

/// SD1 text-encoder key: `cond_stage_model.transformer.[text_model.]X` → `text_model.X`.
pub fn sd1_text_key(key: &str) -> Option<String> {
    let rest = key.strip_prefix("cond_stage_model.transformer.")?;
    let rest = rest.strip_prefix("text_model.").unwrap_or(rest);
    Some(format!("text_model.{rest}"))
}

/// SDXL's first text encoder key: `conditioner.embedders.0.transformer.[text_model.]X` →
/// `text_model.X`.
pub fn sdxl_text_key(key: &str) -> Option<String> {
    let rest = key.strip_prefix(SDXL_TEXT_PREFIX)?;
    let rest = rest.strip_prefix("text_model.").unwrap_or(rest);
    Some(format!("text_model.{rest}"))
}

/// Prefix of SDXL's first text encoder in single files.
pub const SDXL_TEXT_PREFIX: &str = "conditioner.embedders.0.transformer.";
/// Prefix of SDXL's second (OpenCLIP) text encoder in single files.
pub const SDXL_TEXT_2_PREFIX: &str = "conditioner.embedders.1.model.";
/// Prefix of SD2's OpenCLIP text encoder in single files.
pub const SD2_TEXT_PREFIX: &str = "cond_stage_model.model.";

/// SD2 (OpenCLIP) text-encoder key → our paths, with `width` the hidden size (to split the
/// fused `in_proj` into q, k, v) and `layers` the number of layers the model keeps.
/// Returns an empty list for keys of modules the model does not keep (the last layer) and
/// `None` for keys that are not OpenCLIP text-encoder keys at all.
pub fn open_clip_key(key: &str, width: usize, layers: usize) -> Option<Vec<(String, TensorSource)>> {
    open_clip_key_at(SD2_TEXT_PREFIX, key, width, layers)
}

/// [`open_clip_key`] for an OpenCLIP text tower under `prefix` (SD2's
/// `cond_stage_model.model.`, SDXL's `conditioner.embedders.1.model.`). Its
/// `text_projection` maps to our `text_projection.weight`, transposed (callers that have no
/// projection list it as ignored).
pub fn open_clip_key_at(prefix: &str, key: &str, width: usize, layers: usize) -> Option<Vec<(String, TensorSource)>> {
    let rest = key.strip_prefix(prefix)?;
    let one = |path: String| vec![(path, TensorSource::plain(key))];
    match rest {
        "text_projection" => {
            let mut src = TensorSource::plain(key);
            src.transpose = true;
            return Some(vec![("text_projection.weight".into(), src)]);
        }
        "token_embedding.weight" => return Some(one("text_model.embeddings.token_embedding.weight".into())),
        "positional_embedding" => return Some(one("text_model.embeddings.position_embedding.weight".into())),
        "ln_final.weight" => return Some(one("text_model.final_layer_norm.weight".into())),
        "ln_final.bias" => return Some(one("text_model.final_layer_norm.bias".into())),
        _ => {}
    }
    let block = rest.strip_prefix("transformer.resblocks.")?;
    let (index, tail) = block.split_once('.')?;
    let i: usize = index.parse().ok()?;
    if i >= layers {
        return Some(vec![]);
    }
    let base = format!("text_model.encoder.layers.{i}");
    match tail {
        "attn.in_proj_weight" | "attn.in_proj_bias" => {
            let kind = if tail.ends_with("weight") { "weight" } else { "bias" };
            Some(["q_proj", "k_proj", "v_proj"]
                .iter()
                .enumerate()
                .map(|(n, proj)| {
                    let src = TensorSource {
                        key: key.to_string(),
                        rows: Some((n * width, (n + 1) * width)),
                        squeeze_1x1: false,
                        transpose: false,
                    };
                    (format!("{base}.self_attn.{proj}.{kind}"), src)
                })
                .collect())
        }
        _ => {
            let (module, p) = tail.rsplit_once('.')?;
            let ours = match module {
                "ln_1" => "layer_norm1",
                "ln_2" => "layer_norm2",
                "attn.out_proj" => "self_attn.out_proj",
                "mlp.c_fc" => "mlp.fc1",
                "mlp.c_proj" => "mlp.fc2",
                _ => return None,
            };
            Some(one(format!("{base}.{ours}.{p}")))
        }
    }
}

/// A single-file VAE key (`first_stage_model.…`) → our path and its source; `levels` is
/// the number of resolution levels (the LDM decoder numbers its levels in reverse).
pub fn ldm_vae_key(key: &str, levels: usize) -> Option<(String, TensorSource)> {
    let rest = key.strip_prefix("first_stage_model.")?;
    let (path, squeeze_1x1) = ldm_vae_path(rest, levels)?;
    Some((
        path,
        TensorSource {
            key: key.to_string(),
            rows: None,
            squeeze_1x1,
            transpose: false,
        },
    ))
}

/// The diffusers path of an LDM VAE key and whether its weight must drop 1x1 dims.
pub fn ldm_vae_path(key: &str, levels: usize) -> Option<(String, bool)> {
    let (side, rest) = key.split_once('.')?;
    match side {
        "quant_conv" | "post_quant_conv" => return Some((key.to_string(), false)),
        "encoder" | "decoder" => {}
        _ => return None,
    }
    let parts: Vec<&str> = rest.split('.').collect();
    let joined = |from: usize| parts[from..].join(".");
    let mapped = match parts.as_slice() {
        ["conv_in" | "conv_out", ..] => (rest.to_string(), false),
        ["norm_out", ..] => (format!("conv_norm_out.{}", joined(1)), false),
        ["mid", block @ ("block_1" | "block_2"), ..] => {
            let idx = if *block == "block_1" { 0 } else { 1 };
            (format!("mid_block.resnets.{idx}.{}", resnet_tail(&parts[2..])?), false)
        }
        ["mid", "attn_1", module, param] => {
            let ours = match *module {
                "norm" => "group_norm",
                "q" => "to_q",
                "k" => "to_k",
                "v" => "to_v",
                "proj_out" => "to_out.0",
                _ => return None,
            };
            (format!("mid_block.attentions.0.{ours}.{param}"), *module != "norm")
        }
        [level @ ("down" | "up"), i, "block", j, ..] => {
            let i: usize = i.parse().ok()?;
            let (blocks, idx) = if *level == "down" {
                ("down_blocks", i)
            } else {
                ("up_blocks", levels.checked_sub(1 + i)?)
            };
            (format!("{blocks}.{idx}.resnets.{j}.{}", resnet_tail(&parts[4..])?), false)
        }
        ["down", i, "downsample", "conv", param] => (format!("down_blocks.{i}.downsamplers.0.conv.{param}"), false),
        ["up", i, "upsample", "conv", param] => {
            let i: usize = i.parse().ok()?;
            (format!("up_blocks.{}.upsamplers.0.conv.{param}", levels.checked_sub(1 + i)?), false)
        }
        _ => return None,
    };
    Some((format!("{side}.{}", mapped.0), mapped.1))
}

/// The original (LDM) key of a diffusers VAE path, the inverse of [`ldm_vae_path`], and
/// whether its weight gains trailing 1x1 dims (the mid-block attention's linear layers are
/// 1x1 convs there). diffusers' older attention names (`query`, `key`, `value`,
/// `proj_attn`) are read too.
///
/// ```
/// use sd_model::keymap::{diffusers_vae_to_ldm, ldm_vae_path};
/// let (ldm, conv) = diffusers_vae_to_ldm("decoder.up_blocks.0.resnets.2.conv_shortcut.weight", 4).unwrap();
/// assert_eq!((ldm.as_str(), conv), ("decoder.up.3.block.2.nin_shortcut.weight", false));
/// assert_eq!(ldm_vae_path(&ldm, 4).unwrap().0, "decoder.up_blocks.0.resnets.2.conv_shortcut.weight");
/// assert_eq!(diffusers_vae_to_ldm("encoder.mid_block.attentions.0.to_q.weight", 4).unwrap(), ("encoder.mid.attn_1.q.weight".into(), true));
/// ```
pub fn diffusers_vae_to_ldm(path: &str, levels: usize) -> Option<(String, bool)> {
    let (side, rest) = path.split_once('.')?;
    match side {
        "quant_conv" | "post_quant_conv" => return Some((path.to_string(), false)),
        "encoder" | "decoder" => {}
        _ => return None,
    }
    let parts: Vec<&str> = rest.split('.').collect();
    let (ldm, conv) = match parts.as_slice() {
        ["conv_in" | "conv_out", _] => (rest.to_string(), false),
        ["conv_norm_out", p] => (format!("norm_out.{p}"), false),
        ["mid_block", "resnets", k @ ("0" | "1"), tail @ ..] => (format!("mid.block_{}.{}", if *k == "0" { 1 } else { 2 }, resnet_ldm_name(tail)?), false),
        ["mid_block", "attentions", "0", module @ .., p] => {
            let ldm = match module {
                ["group_norm"] => "norm",
                ["to_q"] | ["query"] => "q",
                ["to_k"] | ["key"] => "k",
                ["to_v"] | ["value"] => "v",
                ["to_out", "0"] | ["proj_attn"] => "proj_out",
                _ => return None,
            };
            (format!("mid.attn_1.{ldm}.{p}"), ldm != "norm" && *p == "weight")
        }
        [level @ ("down_blocks" | "up_blocks"), i, kind, "0", "conv", p] if matches!(*kind, "downsamplers" | "upsamplers") => {
            let down = *level == "down_blocks";
            if down != (*kind == "downsamplers") {
                return None;
            }
            let i: usize = i.parse().ok()?;
            let (name, idx, op) = if down { ("down", i, "downsample") } else { ("up", levels.checked_sub(1 + i)?, "upsample") };
            (format!("{name}.{idx}.{op}.conv.{p}"), false)
        }
        [level @ ("down_blocks" | "up_blocks"), i, "resnets", j, tail @ ..] => {
            let i: usize = i.parse().ok()?;
            let (name, idx) = if *level == "down_blocks" { ("down", i) } else { ("up", levels.checked_sub(1 + i)?) };
            (format!("{name}.{idx}.block.{j}.{}", resnet_ldm_name(tail)?), false)
        }
        _ => return None,
    };
    Some((format!("{side}.{ldm}"), conv))
}

/// A diffusers VAE ResNet's parameter (`conv_shortcut.weight`) in the original layout.
fn resnet_ldm_name(parts: &[&str]) -> Option<String> {
    match parts {
        ["conv_shortcut", p] => Some(format!("nin_shortcut.{p}")),
        [m @ ("norm1" | "norm2" | "conv1" | "conv2"), p] => Some(format!("{m}.{p}")),
        _ => None,
    }
}

/// What an OpenCLIP text tower (SD2's, SDXL's second encoder) calls a transformers
/// `CLIPTextModel[WithProjection]` parameter: the inverse of [`open_clip_key_at`] without
/// its prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenClipName {
    /// The tensor under this name, as it is.
    Plain(String),
    /// The tensor transposed under this name (`text_projection`).
    Transposed(String),
    /// Rows `part·width..(part+1)·width` of the fused `in_proj_{weight,bias}` under this
    /// name (`part` 0, 1, 2 for q, k, v).
    Fused(String, usize),
}

/// The OpenCLIP name of a transformers text-encoder parameter (`None` for one that has no
/// place there, such as the position-id buffer).
///
/// ```
/// use sd_model::keymap::{open_clip_name, OpenClipName};
/// assert_eq!(open_clip_name("text_model.encoder.layers.3.self_attn.k_proj.bias"), Some(OpenClipName::Fused("transformer.resblocks.3.attn.in_proj_bias".into(), 1)));
/// assert_eq!(open_clip_name("text_model.encoder.layers.0.mlp.fc2.weight"), Some(OpenClipName::Plain("transformer.resblocks.0.mlp.c_proj.weight".into())));
/// assert_eq!(open_clip_name("text_projection.weight"), Some(OpenClipName::Transposed("text_projection".into())));
/// ```
pub fn open_clip_name(path: &str) -> Option<OpenClipName> {
    let plain = |s: &str| Some(OpenClipName::Plain(s.to_string()));
    match path {
        "text_projection.weight" => return Some(OpenClipName::Transposed("text_projection".into())),
        "text_model.embeddings.token_embedding.weight" => return plain("token_embedding.weight"),
        "text_model.embeddings.position_embedding.weight" => return plain("positional_embedding"),
        "text_model.final_layer_norm.weight" => return plain("ln_final.weight"),
        "text_model.final_layer_norm.bias" => return plain("ln_final.bias"),
        _ => {}
    }
    let rest = path.strip_prefix("text_model.encoder.layers.")?;
    let (i, tail) = rest.split_once('.')?;
    let i: usize = i.parse().ok()?;
    let (module, p) = tail.rsplit_once('.')?;
    let base = format!("transformer.resblocks.{i}");
    let part = match module {
        "self_attn.q_proj" => Some(0),
        "self_attn.k_proj" => Some(1),
        "self_attn.v_proj" => Some(2),
        _ => None,
    };
    if let Some(part) = part {
        return Some(OpenClipName::Fused(format!("{base}.attn.in_proj_{p}"), part));
    }
    let theirs = match module {
        "layer_norm1" => "ln_1",
        "layer_norm2" => "ln_2",
        "self_attn.out_proj" => "attn.out_proj",
        "mlp.fc1" => "mlp.c_fc",
        "mlp.fc2" => "mlp.c_proj",
        _ => return None,
    };
    Some(OpenClipName::Plain(format!("{base}.{theirs}.{p}")))
}

fn resnet_tail(parts: &[&str]) -> Option<String> {
    match parts {
        ["nin_shortcut", p] => Some(format!("conv_shortcut.{p}")),
        [m @ ("norm1" | "norm2" | "conv1" | "conv2"), p] => Some(format!("{m}.{p}")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vae_keys() {
        assert_eq!(
            ldm_vae_path("decoder.up.0.block.2.nin_shortcut.weight", 4),
            Some(("decoder.up_blocks.3.resnets.2.conv_shortcut.weight".into(), false))
        );
        assert_eq!(
            ldm_vae_path("encoder.mid.attn_1.proj_out.weight", 4),
            Some(("encoder.mid_block.attentions.0.to_out.0.weight".into(), true))
        );
        assert_eq!(
            ldm_vae_path("encoder.down.1.downsample.conv.bias", 4),
            Some(("encoder.down_blocks.1.downsamplers.0.conv.bias".into(), false))
        );
        assert_eq!(ldm_vae_path("decoder.norm_out.weight", 4), Some(("decoder.conv_norm_out.weight".into(), false)));
        assert_eq!(ldm_vae_path("decoder.up.3.upsample.conv.weight", 4), Some(("decoder.up_blocks.0.upsamplers.0.conv.weight".into(), false)));
        assert_eq!(ldm_vae_path("encoder.what.ever", 4), None);
    }

    #[test]
    fn open_clip_split() {
        let m = open_clip_key("cond_stage_model.model.transformer.resblocks.3.attn.in_proj_weight", 8, 23).unwrap();
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].0, "text_model.encoder.layers.3.self_attn.k_proj.weight");
        assert_eq!(m[1].1.rows, Some((8, 16)));
        assert!(open_clip_key("cond_stage_model.model.transformer.resblocks.23.ln_1.weight", 8, 23).unwrap().is_empty());
        assert_eq!(
            open_clip_key("cond_stage_model.model.transformer.resblocks.0.mlp.c_fc.bias", 8, 23).unwrap()[0].0,
            "text_model.encoder.layers.0.mlp.fc1.bias"
        );
        assert!(open_clip_key("first_stage_model.x", 8, 23).is_none());
    }
}

/// Prefix of UNet keys in single-file checkpoints.
pub const LDM_UNET_PREFIX: &str = "model.diffusion_model.";

/// What the LDM UNet key map needs to know about the model: blocks per level and which
/// levels have attention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnetLayout {
    /// ResNets per down level (up levels have one more).
    pub layers: usize,
    /// Whether each down level has transformers.
    pub down_attention: Vec<bool>,
    /// Whether each up level has transformers.
    pub up_attention: Vec<bool>,
}

impl UnetLayout {
    /// The layout a config builds (levels with `CrossAttn…` blocks have transformers).
    pub fn from_config(config: &crate::UnetConfig) -> Self {
        let attn = |types: &[String]| types.iter().map(|t| t.starts_with("CrossAttn")).collect();
        Self {
            layers: config.layers_per_block,
            down_attention: attn(&config.down_block_types),
            up_attention: attn(&config.up_block_types),
        }
    }

    /// A diffusers UNet key → its single-file key (`model.diffusion_model.…`), the inverse
    /// of [`ldm_key`](Self::ldm_key); `None` for a key the layout has no place for.
    ///
    /// ```
    /// use sd_model::keymap::UnetLayout;
    /// let sd15 = UnetLayout { layers: 2, down_attention: vec![true, true, true, false], up_attention: vec![false, true, true, true] };
    /// let ldm = sd15.diffusers_to_ldm_key("up_blocks.1.resnets.2.conv_shortcut.weight").unwrap();
    /// assert_eq!(ldm, "model.diffusion_model.output_blocks.5.0.skip_connection.weight");
    /// assert_eq!(sd15.ldm_key(&ldm).unwrap(), "up_blocks.1.resnets.2.conv_shortcut.weight");
    /// ```
    pub fn diffusers_to_ldm_key(&self, key: &str) -> Option<String> {
        let (module, param) = key.rsplit_once('.')?;
        Some(format!("{LDM_UNET_PREFIX}{}.{param}", self.ldm_module_path(module)?))
    }

    /// The layout of a model.
    pub fn of<B: burn::tensor::backend::Backend>(model: &crate::UNet2DConditionModel<B>) -> Self {
        Self {
            layers: model.down_blocks.first().map_or(1, |b| b.resnets.len()),
            down_attention: model.down_blocks.iter().map(|b| !b.attentions.is_empty()).collect(),
            up_attention: model.up_blocks.iter().map(|b| !b.attentions.is_empty()).collect(),
        }
    }

    /// A single-file UNet key (`model.diffusion_model.…`) → our path, or `None` for a key
    /// the layout has no place for.
    ///
    /// LDM numbers blocks flatly: `input_blocks.0` is `conv_in`, then each level's ResNets
    /// (`input_blocks.n.0`, with its transformer at `.1`) and downsampler (`.0.op`);
    /// `middle_block.{0,1,2}` is ResNet, transformer, ResNet; `output_blocks.n` are the up
    /// levels' ResNets (`.0`), transformers (`.1`) and upsampler conv (the last entry).
    /// Inside ResNets `in_layers.{0,2}`, `emb_layers.1`, `out_layers.{0,3}`, `skip_connection`
    /// are `norm1`, `conv1`, `time_emb_proj`, `norm2`, `conv2`, `conv_shortcut`; transformer
    /// internals already carry diffusers' names.
    pub fn ldm_key(&self, key: &str) -> Option<String> {
        let rest = key.strip_prefix(LDM_UNET_PREFIX)?;
        let (head, tail) = rest.split_once('.')?;
        let simple = match head {
            "time_embed" => Some(match tail.split_once('.')? {
                ("0", p) => format!("time_embedding.linear_1.{p}"),
                ("2", p) => format!("time_embedding.linear_2.{p}"),
                _ => return None,
            }),
            // SDXL's added conditioning MLP (`label_emb.0` is a Sequential in SGM).
            "label_emb" => Some(match tail.strip_prefix("0.")?.split_once('.')? {
                ("0", p) => format!("add_embedding.linear_1.{p}"),
                ("2", p) => format!("add_embedding.linear_2.{p}"),
                _ => return None,
            }),
            "out" => Some(match tail.split_once('.')? {
                ("0", p) => format!("conv_norm_out.{p}"),
                ("2", p) => format!("conv_out.{p}"),
                _ => return None,
            }),
            _ => None,
        };
        if simple.is_some() {
            return simple;
        }
        let (n, tail) = tail.split_once('.')?;
        let n: usize = n.parse().ok()?;
        if head == "middle_block" {
            return match n {
                0 | 2 => Some(format!("mid_block.resnets.{}.{}", n / 2, resnet_ldm_tail(tail)?)),
                1 => Some(format!("mid_block.attentions.0.{tail}")),
                _ => None,
            };
        }
        let (m, tail) = tail.split_once('.')?;
        let m: usize = m.parse().ok()?;
        let per_level = self.layers + 1;
        match head {
            "input_blocks" if n == 0 => (m == 0).then(|| format!("conv_in.{tail}")),
            "input_blocks" => {
                let (level, j) = ((n - 1) / per_level, (n - 1) % per_level);
                let has_attn = *self.down_attention.get(level)?;
                let base = format!("down_blocks.{level}");
                match (j == self.layers, m) {
                    (true, 0) => Some(format!("{base}.downsamplers.0.conv.{}", tail.strip_prefix("op.")?)),
                    (false, 0) => Some(format!("{base}.resnets.{j}.{}", resnet_ldm_tail(tail)?)),
                    (false, 1) if has_attn => Some(format!("{base}.attentions.{j}.{tail}")),
                    _ => None,
                }
            }
            "output_blocks" => {
                let (level, j) = (n / per_level, n % per_level);
                let has_attn = *self.up_attention.get(level)?;
                let is_last_level = level + 1 == self.up_attention.len();
                let base = format!("up_blocks.{level}");
                let upsampler_slot = if has_attn { 2 } else { 1 };
                match m {
                    0 => Some(format!("{base}.resnets.{j}.{}", resnet_ldm_tail(tail)?)),
                    1 if has_attn => Some(format!("{base}.attentions.{j}.{tail}")),
                    _ if m == upsampler_slot && j == self.layers && !is_last_level => {
                        Some(format!("{base}.upsamplers.0.conv.{}", tail.strip_prefix("conv.")?))
                    }
                    _ => None,
                }
            }
            _ => None,
        }
    }
}

impl UnetLayout {
    /// Our module path (diffusers') → the original SGM / LDM module path without
    /// `model.diffusion_model.`, the inverse of [`ldm_key`](Self::ldm_key) for modules
    /// (kohya's SDXL LoRA files name the UNet's modules so:
    /// `down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q` at 2 ResNets per level is
    /// `input_blocks.4.1.transformer_blocks.0.attn1.to_q`). `None` for a path with no LDM name.
    ///
    /// ```
    /// use sd_model::keymap::UnetLayout;
    /// let sdxl = UnetLayout { layers: 2, down_attention: vec![false, true, true], up_attention: vec![true, true, false] };
    /// assert_eq!(sdxl.ldm_module_path("down_blocks.1.attentions.0.proj_in").unwrap(), "input_blocks.4.1.proj_in");
    /// assert_eq!(sdxl.ldm_module_path("up_blocks.1.upsamplers.0.conv").unwrap(), "output_blocks.5.2.conv");
    /// assert_eq!(sdxl.ldm_module_path("add_embedding.linear_2").unwrap(), "label_emb.0.2");
    /// ```
    pub fn ldm_module_path(&self, path: &str) -> Option<String> {
        let fixed = match path {
            "conv_in" => Some("input_blocks.0.0"),
            "time_embedding.linear_1" => Some("time_embed.0"),
            "time_embedding.linear_2" => Some("time_embed.2"),
            "add_embedding.linear_1" => Some("label_emb.0.0"),
            "add_embedding.linear_2" => Some("label_emb.0.2"),
            "conv_norm_out" => Some("out.0"),
            "conv_out" => Some("out.2"),
            _ => None,
        };
        if let Some(p) = fixed {
            return Some(p.to_string());
        }
        let per_level = self.layers + 1;
        let resnet = |rest: &str| -> Option<String> {
            Some(match rest {
                "norm1" => "in_layers.0",
                "conv1" => "in_layers.2",
                "time_emb_proj" => "emb_layers.1",
                "norm2" => "out_layers.0",
                "conv2" => "out_layers.3",
                "conv_shortcut" => "skip_connection",
                _ => return None,
            }
            .to_string())
        };
        let parts: Vec<&str> = path.splitn(5, '.').collect();
        let tail = |from: usize| parts[from..].join(".");
        match parts.as_slice() {
            ["mid_block", "resnets", k, ..] if parts.len() == 4 => {
                let k: usize = k.parse().ok()?;
                (k < 2).then_some(())?;
                Some(format!("middle_block.{}.{}", 2 * k, resnet(parts[3])?))
            }
            ["mid_block", "attentions", "0", ..] if parts.len() > 3 => Some(format!("middle_block.1.{}", tail(3))),
            [side @ ("down_blocks" | "up_blocks"), i, kind, j, ..] if parts.len() == 5 => {
                let (i, j): (usize, usize) = (i.parse().ok()?, j.parse().ok()?);
                let down = *side == "down_blocks";
                let attention = if down { &self.down_attention } else { &self.up_attention };
                let has_attn = *attention.get(i)?;
                let resnets = if down { self.layers } else { per_level };
                let n = |j: usize| if down { 1 + i * per_level + j } else { i * per_level + j };
                match *kind {
                    "resnets" if j < resnets => Some(format!("{}.{}.0.{}", block_list(down), n(j), resnet(parts[4])?)),
                    "attentions" if has_attn && j < resnets => Some(format!("{}.{}.1.{}", block_list(down), n(j), parts[4])),
                    "downsamplers" if down && j == 0 && parts[4] == "conv" && i + 1 < attention.len() => {
                        Some(format!("input_blocks.{}.0.op", n(self.layers)))
                    }
                    "upsamplers" if !down && j == 0 && parts[4] == "conv" && i + 1 < attention.len() => {
                        Some(format!("output_blocks.{}.{}.conv", n(self.layers), if has_attn { 2 } else { 1 }))
                    }
                    _ => None,
                }
            }
            _ => None,
        }
    }
}

fn block_list(down: bool) -> &'static str {
    if down {
        "input_blocks"
    } else {
        "output_blocks"
    }
}

/// LDM ResNet parameter names → diffusers'.
fn resnet_ldm_tail(tail: &str) -> Option<String> {
    let (module, param) = tail.rsplit_once('.')?;
    let ours = match module {
        "in_layers.0" => "norm1",
        "in_layers.2" => "conv1",
        "emb_layers.1" => "time_emb_proj",
        "out_layers.0" => "norm2",
        "out_layers.3" => "conv2",
        "skip_connection" => "conv_shortcut",
        _ => return None,
    };
    Some(format!("{ours}.{param}"))
}
