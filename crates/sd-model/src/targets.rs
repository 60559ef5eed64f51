//! Which layers get LoRA adapters: presets by module path, plus include/exclude patterns.

use std::str::FromStr;

use lora_core::sites::LoraSites;
use lora_core::{LoraConfig, LoraSiteMut};
use serde::{Deserialize, Serialize};

use crate::{Result, SdModelError};

/// UNet target presets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum UnetTargets {
    /// `to_q`, `to_k`, `to_v`, `to_out.0` of self- and cross-attention (diffusers' training
    /// scripts).
    Attn,
    /// `attn` plus `ff.net.0.proj`, `ff.net.2`, `proj_in`, `proj_out` — kohya's default set
    /// (192 modules on SD1.x).
    #[default]
    AttnMlp,
    /// Every linear layer (PEFT's `all-linear`), including time-embedding layers.
    AllLinear,
    /// `attn-mlp` plus the ResNet layers (`conv1`, `conv2`, `conv_shortcut`, `time_emb_proj`)
    /// and the down/up-sampler convs — kohya's LoCon (`conv_dim`) set.
    Conv,
    /// LyCORIS' `ia3` preset: `to_k`, `to_v` and `ff.net.2` of the transformer blocks (the
    /// layers whose outputs, or for `ff.net.2` inputs, (IA)³ rescales in the paper).
    Ia3,
    /// No UNet layers (text-encoder-only training).
    None,
}

impl FromStr for UnetTargets {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "attn" => Ok(Self::Attn),
            "attn-mlp" => Ok(Self::AttnMlp),
            "all-linear" => Ok(Self::AllLinear),
            "conv" => Ok(Self::Conv),
            "ia3" => Ok(Self::Ia3),
            "none" => Ok(Self::None),
            other => Err(format!("unknown UNet target preset `{other}`; expected attn, attn-mlp, all-linear, conv, ia3 or none")),
        }
    }
}

const ATTN: [&str; 4] = [".to_q", ".to_k", ".to_v", ".to_out.0"];
const MLP: [&str; 4] = [".ff.net.0.proj", ".ff.net.2", ".proj_in", ".proj_out"];

impl UnetTargets {
    /// The preset's name in configs and on the command line (what `from_str` reads).
    pub fn name(self) -> &'static str {
        match self {
            Self::Attn => "attn",
            Self::AttnMlp => "attn-mlp",
            Self::AllLinear => "all-linear",
            Self::Conv => "conv",
            Self::Ia3 => "ia3",
            Self::None => "none",
        }
    }

    /// Whether the norm layer at `path` is in the preset for LyCORIS' `train_norm`: the
    /// norms inside the blocks the preset reaches, as LyCORIS adds them (its presets target
    /// block classes): the transformers' (`norm`, `norm1`–`norm3`) for `attn-mlp`, those
    /// and the ResNet blocks' (`norm1`, `norm2`) for `conv` and `all-linear`; none for
    /// `attn` and `ia3`, whose presets reach the attention layers alone.
    pub fn matches_norm(self, path: &str) -> bool {
        let (transformer, resnet) = (path.contains(".attentions."), path.contains(".resnets."));
        match self {
            Self::AttnMlp => transformer,
            Self::AllLinear | Self::Conv => transformer || resnet,
            Self::Attn | Self::Ia3 | Self::None => false,
        }
    }

    /// Whether the site at `path` (a linear layer unless `is_conv`) is in the preset.
    pub fn matches(self, path: &str, is_conv: bool) -> bool {
        let in_transformer = path.contains(".attentions.");
        let attn = in_transformer && ATTN.iter().any(|s| path.ends_with(s));
        let mlp = in_transformer && MLP.iter().any(|s| path.ends_with(s));
        match self {
            Self::Attn => attn,
            Self::AttnMlp => attn || mlp,
            Self::AllLinear => !is_conv,
            Self::Conv => attn || mlp || path.contains(".resnets.") || path.contains("samplers."),
            Self::Ia3 => in_transformer && [".to_k", ".to_v", ".ff.net.2"].iter().any(|s| path.ends_with(s)),
            Self::None => false,
        }
    }
}

/// Text-encoder target presets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum TextEncoderTargets {
    /// No text-encoder adapters (the default: UNet-only training).
    #[default]
    None,
    /// `q_proj`, `k_proj`, `v_proj`, `out_proj`.
    Attn,
    /// Attention plus `mlp.fc1`, `mlp.fc2` — kohya's text-encoder set (72 modules on SD1.x).
    AttnMlp,
    /// LyCORIS' `ia3` preset: `k_proj`, `v_proj` and `mlp.fc2`.
    Ia3,
}

impl FromStr for TextEncoderTargets {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "attn" => Ok(Self::Attn),
            "attn-mlp" => Ok(Self::AttnMlp),
            "ia3" => Ok(Self::Ia3),
            other => Err(format!("unknown text-encoder target preset `{other}`; expected none, attn, attn-mlp or ia3")),
        }
    }
}

impl TextEncoderTargets {
    /// Whether the site at `path` is in the preset.
    pub fn matches(self, path: &str) -> bool {
        let attn = path.contains(".self_attn.");
        match self {
            Self::None => false,
            Self::Attn => attn,
            Self::AttnMlp => attn || path.contains(".mlp."),
            Self::Ia3 => [".self_attn.k_proj", ".self_attn.v_proj", ".mlp.fc2"].iter().any(|s| path.ends_with(s)),
        }
    }
}

/// Glob matching of module paths: `*` matches any run of characters (dots included).
pub fn glob_match(pattern: &str, path: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == path;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !path.starts_with(first) || path.len() < first.len() + last.len() || !path.ends_with(last) {
        return false;
    }
    let mut rest = &path[first.len()..path.len() - last.len()];
    for part in &parts[1..parts.len() - 1] {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    true
}

/// A target selection: a preset refined by glob patterns on module paths.
///
/// A site is targeted when it is in the preset or matches an `include` pattern, and matches
/// no `exclude` pattern. Norm layers (sites for LyCORIS' norm module, [`lora_core::norm`])
/// are targeted only with [`norms`](Self::norms) (LyCORIS' `train_norm`), by the preset's
/// [`Preset::holds_norm`] or an `include` pattern, and no `exclude` pattern.
///
/// ```
/// use sd_model::targets::{glob_match, Selection, UnetTargets};
/// let sel = Selection::new(UnetTargets::Attn).exclude(["*.attn1.*"]);
/// assert!(sel.selects("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q", false));
/// assert!(!sel.selects("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", false));
/// assert!(glob_match("up_blocks.*.to_out.0", "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Selection<P> {
    /// The preset.
    pub preset: P,
    /// Extra module-path globs to target.
    #[serde(default)]
    pub include: Vec<String>,
    /// Module-path globs never to target.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Whether norm layers are targeted too (LyCORIS' `train_norm`).
    #[serde(default)]
    pub norms: bool,
}

/// Something that decides by path (and layer kind) whether a site is in a preset.
pub trait Preset: Copy {
    /// Whether the preset holds the site.
    fn holds(self, path: &str, is_conv: bool) -> bool;

    /// Whether the preset holds the norm layer at `path` when norms are trained (none by
    /// default).
    fn holds_norm(self, _path: &str) -> bool {
        false
    }
}

impl Preset for UnetTargets {
    fn holds(self, path: &str, is_conv: bool) -> bool {
        self.matches(path, is_conv)
    }

    fn holds_norm(self, path: &str) -> bool {
        self.matches_norm(path)
    }
}

impl Preset for TextEncoderTargets {
    fn holds(self, path: &str, _is_conv: bool) -> bool {
        self.matches(path)
    }
}

impl<P: Preset> Selection<P> {
    /// A selection with only a preset.
    pub fn new(preset: P) -> Self {
        Self {
            preset,
            include: vec![],
            exclude: vec![],
            norms: false,
        }
    }

    /// Targets norm layers too (`true`) or not (LyCORIS' `train_norm`).
    pub fn with_norms(mut self, norms: bool) -> Self {
        self.norms = norms;
        self
    }

    /// Adds include patterns.
    pub fn include<I: IntoIterator<Item = S>, S: Into<String>>(mut self, patterns: I) -> Self {
        self.include.extend(patterns.into_iter().map(Into::into));
        self
    }

    /// Adds exclude patterns.
    pub fn exclude<I: IntoIterator<Item = S>, S: Into<String>>(mut self, patterns: I) -> Self {
        self.exclude.extend(patterns.into_iter().map(Into::into));
        self
    }

    /// Whether the (linear or convolution) site at `path` is selected.
    pub fn selects(&self, path: &str, is_conv: bool) -> bool {
        self.chosen(self.preset.holds(path, is_conv), path)
    }

    /// Whether the site at `path`, in the preset or not (`held`), is selected by the
    /// patterns: held or included, and not excluded.
    fn chosen(&self, held: bool, path: &str) -> bool {
        (held || self.include.iter().any(|p| glob_match(p, path))) && !self.exclude.iter().any(|p| glob_match(p, path))
    }

    /// Whether the norm layer at `path` is selected (never without
    /// [`norms`](Self::norms)).
    ///
    /// ```
    /// use sd_model::targets::{Selection, UnetTargets};
    /// let path = "down_blocks.0.resnets.0.norm1";
    /// assert!(!Selection::new(UnetTargets::Conv).selects_norm(path));
    /// assert!(Selection::new(UnetTargets::Conv).with_norms(true).selects_norm(path));
    /// assert!(!Selection::new(UnetTargets::AttnMlp).with_norms(true).selects_norm(path));
    /// ```
    pub fn selects_norm(&self, path: &str) -> bool {
        self.norms && self.chosen(self.preset.holds_norm(path), path)
    }

    /// Whether the site at `path` is selected ([`selects_norm`](Self::selects_norm) for a
    /// norm layer, [`selects`](Self::selects) for the others).
    pub fn selects_site<B: burn::tensor::backend::Backend>(&self, path: &str, site: &LoraSiteMut<'_, B>) -> bool {
        match site.is_norm() {
            true => self.selects_norm(path),
            false => self.selects(path, site.is_conv()),
        }
    }
}

/// Attaches fresh adapters (`config`) to every selected site of `model`; returns the paths.
/// Include patterns that match no site are an error (a typo would silently train nothing).
pub fn attach_new_adapters<B: burn::tensor::backend::Backend, P: Preset>(
    model: &mut impl LoraSites<B>,
    selection: &Selection<P>,
    config: &LoraConfig,
    device: &B::Device,
) -> Result<Vec<String>> {
    let configs = KernelConfigs { linear: config, spatial: config };
    Ok(attach_new_adapters_by_kernel(model, selection, configs, device)?.paths)
}

/// The adapter settings of each kind of layer, as kohya's LoCon: `linear` for linear layers
/// and 1x1 convolutions (`network_dim` / `network_alpha`), `spatial` for convolutions with
/// a larger kernel (`conv_dim` / `conv_alpha`).
#[derive(Debug, Clone, Copy)]
pub struct KernelConfigs<'a> {
    /// Linear layers and 1x1 convolutions.
    pub linear: &'a LoraConfig,
    /// Convolutions whose kernel is larger than 1x1 (the ResNet blocks' `conv1` / `conv2`,
    /// the down- and upsamplers).
    pub spatial: &'a LoraConfig,
}

/// What [`attach_new_adapters_by_kernel`] attached.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Attached {
    /// Module paths of all new adapters, in visiting order.
    pub paths: Vec<String>,
    /// How many of them sit on convolutions with a kernel larger than 1x1.
    pub spatial: usize,
    /// How many of them are norm modules ([`Selection::norms`]).
    pub norms: usize,
}

/// [`attach_new_adapters`] with settings per kind of layer (`configs`): a LoCon with its own
/// rank and alpha for the 3x3 convolutions.
///
/// ```
/// use burn::backend::Flex;
/// use lora_core::LoraConfig;
/// use sd_model::targets::{attach_new_adapters_by_kernel, KernelConfigs, Selection, UnetTargets};
/// use sd_model::{UNet2DConditionModel, UnetConfig};
///
/// let device = Default::default();
/// let mut unet = UNet2DConditionModel::<Flex>::new(&UnetConfig::tiny(), &device).unwrap();
/// let (linear, spatial) = (LoraConfig::new(4), LoraConfig::new(2).with_alpha(1.0));
/// let configs = KernelConfigs { linear: &linear, spatial: &spatial };
/// let attached = attach_new_adapters_by_kernel(&mut unet, &Selection::new(UnetTargets::Conv), configs, &device).unwrap();
/// assert!(attached.spatial > 0 && attached.spatial < attached.paths.len());
/// ```
pub fn attach_new_adapters_by_kernel<B: burn::tensor::backend::Backend, P: Preset>(
    model: &mut impl LoraSites<B>,
    selection: &Selection<P>,
    configs: KernelConfigs<'_>,
    device: &B::Device,
) -> Result<Attached> {
    attach_new_adapters_with(model, selection, &mut |_, kernel| Some(if kernel != [1, 1] { configs.spatial.clone() } else { configs.linear.clone() }), device)
}

/// [`attach_new_adapters`] with settings per layer: `config(path, kernel_size)` gives the
/// selected layer at `path` its adapter settings, or `None` to leave it without one
/// (kohya's block-wise ranks, where a rank of 0 trains nothing in a block).
///
/// ```
/// use burn::backend::Flex;
/// use lora_core::LoraConfig;
/// use sd_model::targets::{attach_new_adapters_with, Selection, UnetTargets};
/// use sd_model::{UNet2DConditionModel, UnetConfig};
///
/// let device = Default::default();
/// let mut unet = UNet2DConditionModel::<Flex>::new(&UnetConfig::tiny(), &device).unwrap();
/// let mut by_path = |path: &str, _kernel: [usize; 2]| (!path.starts_with("mid_block.")).then(|| LoraConfig::new(4));
/// let attached = attach_new_adapters_with(&mut unet, &Selection::new(UnetTargets::Attn), &mut by_path, &device).unwrap();
/// assert!(!attached.paths.is_empty() && attached.paths.iter().all(|p| !p.starts_with("mid_block.")));
/// ```
pub fn attach_new_adapters_with<B: burn::tensor::backend::Backend, P: Preset>(
    model: &mut impl LoraSites<B>,
    selection: &Selection<P>,
    config: &mut dyn FnMut(&str, [usize; 2]) -> Option<LoraConfig>,
    device: &B::Device,
) -> Result<Attached> {
    let mut attached = Attached::default();
    let mut all = Vec::new();
    let mut error = None;
    model.visit_lora_sites(&mut |path, mut site: LoraSiteMut<'_, B>| {
        all.push(path.to_string());
        if error.is_some() || !selection.selects_site(path, &site) {
            return;
        }
        let (spatial, norm) = (site.kernel_size() != [1, 1], site.is_norm());
        let Some(config) = config(path, site.kernel_size()) else { return };
        match site.attach_new(&config, device) {
            Ok(()) => {
                attached.paths.push(path.to_string());
                attached.spatial += usize::from(spatial);
                attached.norms += usize::from(norm);
            }
            Err(e) => error = Some(SdModelError::BadInput {
                what: format!("LoRA adapter for `{path}`"),
                reason: e.to_string(),
            }),
        }
    });
    if let Some(e) = error {
        return Err(e);
    }
    if let Some(p) = selection.include.iter().find(|p| !all.iter().any(|path| glob_match(p, path))) {
        return Err(SdModelError::BadInput {
            what: "LoRA include pattern".into(),
            reason: format!("`{p}` matches no module path"),
        });
    }
    Ok(attached)
}
