//! Applying LoRA files to the model: several files at once, each with its own strength.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use burn::tensor::backend::Backend;
use lora_core::{sites, AdapterSet, ModuleIndex, ReadOptions};

use crate::{ClipTextModel, Result, SdModelError, UNet2DConditionModel};

/// A LoRA file and the strength to apply it at, written
/// `FILE[:STRENGTH[:TE_STRENGTH]][:lbw=BLOCK_WEIGHTS]` on command lines: one strength for
/// the whole file, or the UNet's and the text encoders' apart (ComfyUI's `strength_model` /
/// `strength_clip`, A1111's `unet=` / `te=`), and optionally a weight per UNet block
/// ([`BlockWeights`](crate::block_weights::BlockWeights): a preset such as `OUTALL` or
/// 12 / 17 / 20 / 26 comma-separated numbers, as the LoRA Block Weight extension reads them).
///
/// ```
/// use sd_model::lora::LoraFile;
/// let f: LoraFile = "style.safetensors:0.7".parse().unwrap();
/// assert_eq!((f.path.to_str().unwrap(), f.strength, f.text_encoder_strength()), ("style.safetensors", 0.7, 0.7));
/// let g: LoraFile = "C:/loras/x.safetensors".parse().unwrap();
/// assert_eq!(g.strength, 1.0);
/// let h: LoraFile = "C:/loras/x.safetensors:0.8:0.3".parse().unwrap();
/// assert_eq!((h.path.to_str().unwrap(), h.strength, h.text_encoder_strength()), ("C:/loras/x.safetensors", 0.8, 0.3));
/// let b: LoraFile = "x.safetensors:0.8:lbw=OUTALL".parse().unwrap();
/// assert_eq!((b.strength, b.block_weights.unwrap().spec()), (0.8, "OUTALL"));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct LoraFile {
    /// The adapter file (kohya or diffusers/PEFT layout).
    pub path: PathBuf,
    /// Strength (1.0 = as trained): of the whole file, or of its UNet adapters when
    /// `text_encoder` is set.
    pub strength: f32,
    /// The text encoders' adapters' own strength (`None`: `strength`).
    pub text_encoder: Option<f32>,
    /// A weight per block, multiplying the strengths (`None`: 1 everywhere).
    pub block_weights: Option<crate::block_weights::BlockWeights>,
}

impl LoraFile {
    /// `path` at `strength` throughout.
    pub fn new(path: impl Into<PathBuf>, strength: f32) -> Self {
        Self { path: path.into(), strength, text_encoder: None, block_weights: None }
    }

    /// The strength of the file's text-encoder adapters.
    pub fn text_encoder_strength(&self) -> f32 {
        self.text_encoder.unwrap_or(self.strength)
    }

    /// `set` (this file's adapters) as the parts to apply and their strengths: the whole
    /// set at [`strength`](Self::strength), or, with a text-encoder strength of its own or
    /// block weights, the adapters grouped by their strength (the UNet's at `strength`
    /// times their block's weight, the text encoders' at theirs times `BASE`'s). The UNet
    /// has `layers_per_block` ResNets per down level (2 in SD1.x, SD2.x and SDXL).
    pub fn strength_parts(&self, set: AdapterSet, layers_per_block: usize) -> Vec<(AdapterSet, f32)> {
        let te = self.text_encoder_strength();
        if te == self.strength && self.block_weights.is_none() {
            return vec![(set, self.strength)];
        }
        let strength_of = |key: &lora_core::AdapterKey| {
            let base = if key.component == lora_core::Component::Unet { self.strength } else { te };
            base * self.block_weights.as_ref().map_or(1.0, |w| w.weight(key, layers_per_block))
        };
        // One part per distinct strength, in order of first appearance.
        let mut parts: Vec<(AdapterSet, f32)> = Vec::new();
        for (key, weights) in set.iter() {
            let strength = strength_of(key);
            let at = match parts.iter().position(|(_, s)| s.to_bits() == strength.to_bits()) {
                Some(at) => at,
                None => {
                    let mut part = AdapterSet::new();
                    part.metadata = set.metadata.clone();
                    parts.push((part, strength));
                    parts.len() - 1
                }
            };
            if let Some(name) = set.kohya_names.get(key) {
                parts[at].0.kohya_names.insert(key.clone(), name.clone());
            }
            // Keys are unique within `set`, so the insert cannot clash.
            let _ = parts[at].0.insert(key.clone(), weights.clone());
        }
        parts
    }
}

impl FromStr for LoraFile {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        // Block weights come last; only suffixes that parse as numbers are strengths, so
        // paths with colons work.
        let (s, block_weights) = match s.rsplit_once(":lbw=") {
            Some((rest, spec)) => (rest, Some(spec.parse::<crate::block_weights::BlockWeights>()?)),
            None => (s, None),
        };
        let number = |t: &str| t.parse::<f32>().ok();
        let mut file = Self::new(s, 1.0);
        if let Some((rest, last)) = s.rsplit_once(':').and_then(|(rest, last)| Some((rest, number(last)?))) {
            file = match rest.rsplit_once(':').and_then(|(path, unet)| Some((path, number(unet)?))) {
                Some((path, unet)) => Self { path: path.into(), strength: unet, text_encoder: Some(last), block_weights: None },
                None => Self::new(rest, last),
            };
        }
        if !file.path.exists()
            && let Some((path, rest)) = existing_prefix(s)
        {
            // `FILE:abc`: the file is there, what follows it is no strength.
            return Err(format!("`{s}`: `{rest}` after {path} is not a strength; expected FILE[:STRENGTH[:TE_STRENGTH]][:lbw=WEIGHTS] with numbers for the strengths"));
        }
        file.block_weights = block_weights;
        if !(file.strength.is_finite() && file.text_encoder_strength().is_finite()) {
            return Err(format!("`{s}`: strengths must be finite"));
        }
        Ok(file)
    }
}

/// The longest part of `s` before one of its colons that names an existing file, and what
/// follows that colon.
fn existing_prefix(s: &str) -> Option<(&str, &str)> {
    let mut end = s.len();
    while let Some(i) = s[..end].rfind(':') {
        if Path::new(&s[..i]).is_file() {
            return Some((&s[..i], &s[i + 1..]));
        }
        end = i;
    }
    None
}

/// How many adapters went where.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppliedLoras {
    /// UNet layers that received an adapter.
    pub unet: usize,
    /// Text-encoder layers that received an adapter (both encoders, for SDXL).
    pub text_encoder: usize,
    /// Keys skipped in lenient mode, per file.
    pub skipped: Vec<(PathBuf, Vec<String>)>,
}

/// The module index of the UNet and (optionally) the text encoder, for resolving kohya keys.
pub fn module_index<B: Backend>(
    unet: &mut UNet2DConditionModel<B>,
    text_encoder: Option<&mut ClipTextModel<B>>,
) -> Result<ModuleIndex> {
    module_index_of(unet, &mut text_encoder.into_iter().collect::<Vec<_>>())
}

/// The module index of the UNet and any number of text encoders (SDXL's two, each under
/// its [`component`](ClipTextModel::component)). The UNet's modules also answer to their
/// original SGM names (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`), which
/// kohya's SDXL files use.
pub fn module_index_of<B: Backend>(unet: &mut UNet2DConditionModel<B>, text_encoders: &mut [&mut ClipTextModel<B>]) -> Result<ModuleIndex> {
    let mut index = ModuleIndex::new();
    extend_index(&mut index, unet, text_encoders)?;
    Ok(index)
}

/// Adds the modules of a UNet (with their SGM names) and text encoders to `index`, as
/// [`module_index_of`] does: one index can then resolve the names of several model
/// families' files.
pub fn extend_index<B: Backend>(index: &mut ModuleIndex, unet: &mut UNet2DConditionModel<B>, text_encoders: &mut [&mut ClipTextModel<B>]) -> Result<()> {
    distinct_components(text_encoders.iter().map(|te| te.component))?;
    sites::add_to_index(index, unet)?;
    let layout = crate::keymap::UnetLayout::of(unet);
    let mut paths = Vec::new();
    lora_core::LoraSites::visit_lora_sites(unet, &mut |path, _| paths.push(path.to_string()));
    for path in paths {
        if let Some(ldm) = layout.ldm_module_path(&path) {
            let key = lora_core::AdapterKey::new(lora_core::Component::Unet, path);
            index.add_alias(format!("lora_unet_{}", ldm.replace('.', "_")), key)?;
        }
    }
    for te in text_encoders.iter_mut() {
        sites::add_to_index(index, &mut **te)?;
    }
    Ok(())
}

/// Text encoders must be different components: two of one would share its adapters.
pub(crate) fn distinct_components(components: impl Iterator<Item = lora_core::Component>) -> Result<()> {
    let mut seen = Vec::new();
    for c in components {
        if seen.contains(&c) {
            return Err(SdModelError::BadInput {
                what: "text encoders".into(),
                reason: format!("two text encoders are both {c:?} (see ClipTextModel::with_component)"),
            });
        }
        seen.push(c);
    }
    Ok(())
}

/// Names `set`'s adapters in the kohya layout as kohya's SDXL files do (for an SDXL
/// UNet): UNet modules by their original SGM paths
/// (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`, see
/// [`UnetLayout::ldm_module_path`](crate::keymap::UnetLayout::ldm_module_path)) and the
/// first text encoder as `lora_te1_` ([`AdapterSet::kohya_names`]); returns how many were
/// named. sd-scripts, ComfyUI and AUTOMATIC1111 read SDXL LoRAs by these names.
pub fn use_sdxl_kohya_names<B: Backend>(set: &mut AdapterSet, unet: &UNet2DConditionModel<B>) -> usize {
    use_sdxl_kohya_names_by(set, &crate::keymap::UnetLayout::of(unet))
}

/// What a LoRA file's metadata says of its base model: `Some(true)` for SDXL, `Some(false)`
/// for another family, `None` where it says nothing. kohya's `ss_base_model_version`
/// (`sdxl_base_v1-0`, `tiny_sdxl`, `sd_v1`, `sd_v2`, ...) wins; without it, the
/// ModelSpec `modelspec.architecture` (`stable-diffusion-xl-v1-base/lora`,
/// `stable-diffusion-v1/lora`, ...). Empty values count as unset; case is ignored.
///
/// ```
/// use sd_model::lora::base_model_is_sdxl;
///
/// assert_eq!(base_model_is_sdxl(Some("sdxl_base_v1-0"), None), Some(true));
/// assert_eq!(base_model_is_sdxl(Some("sd_v1"), Some("stable-diffusion-xl-v1-base/lora")), Some(false));
/// assert_eq!(base_model_is_sdxl(Some(""), Some("stable-diffusion-xl-v1-base/lora")), Some(true));
/// assert_eq!(base_model_is_sdxl(None, None), None);
/// ```
pub fn base_model_is_sdxl(ss_base_model_version: Option<&str>, modelspec_architecture: Option<&str>) -> Option<bool> {
    let set = |v: Option<&str>| v.map(str::to_lowercase).filter(|v| !v.is_empty());
    match (set(ss_base_model_version), set(modelspec_architecture)) {
        (Some(version), _) => Some(version.contains("sdxl")),
        (None, Some(architecture)) => Some(architecture.contains("-xl")),
        (None, None) => None,
    }
}

/// Whether an adapter set read with no model at hand is for an SDXL UNet: it adapts the
/// second text encoder, one of its UNet transformers holds a second block (SD1.x's and
/// SD2.x's hold one), or its metadata says so ([`base_model_is_sdxl`]). The adapters'
/// evidence wins over metadata that says otherwise (they are what gets named).
///
/// ```
/// use lora_core::{AdapterKey, AdapterSet, Component, HostTensor, LoraWeights};
///
/// let t = |shape: Vec<usize>| HostTensor::new(shape, vec![0.0; 8]).unwrap();
/// let mut set = AdapterSet::new();
/// let path = "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q";
/// set.insert(AdapterKey::new(Component::Unet, path), LoraWeights::new(t(vec![1, 8]), t(vec![8, 1]), 1.0, "doc").unwrap()).unwrap();
/// assert!(sd_model::lora::adapter_set_is_sdxl(&set));
/// ```
pub fn adapter_set_is_sdxl(set: &AdapterSet) -> bool {
    let deep = |path: &str| {
        let parts: Vec<&str> = path.split('.').collect();
        parts.windows(2).any(|w| w[0] == "transformer_blocks" && w[1].parse::<usize>().is_ok_and(|i| i > 0))
    };
    let structural = set.iter().any(|(key, _)| {
        key.component == lora_core::Component::TextEncoder2 || (key.component == lora_core::Component::Unet && deep(&key.path))
    });
    let said = |key: &str| set.metadata.get(key).map(String::as_str);
    structural || base_model_is_sdxl(said("ss_base_model_version"), said("modelspec.architecture")) == Some(true)
}

/// Whether an adapter set read with no model at hand, and not SDXL's
/// ([`adapter_set_is_sdxl`]), is for SD2.x rather than SD1.x (whose kohya names are the
/// same): its text-encoder adapters or its UNet's cross-attention keys and values take
/// 1024 features (OpenCLIP ViT-H; SD1.x's CLIP ViT-L gives 768), or, where no adapter
/// sits there, its metadata says so (sd-scripts' `ss_v2`, `ss_base_model_version`
/// `sd_v2`, a `stable-diffusion-v2` modelspec architecture).
///
/// ```
/// use lora_core::{AdapterKey, AdapterSet, Component, HostTensor, LoraWeights};
///
/// let t = |shape: Vec<usize>| HostTensor::new(shape.clone(), vec![0.0; shape.iter().product()]).unwrap();
/// let mut set = AdapterSet::new();
/// let path = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k";
/// set.insert(AdapterKey::new(Component::Unet, path), LoraWeights::new(t(vec![1, 1024]), t(vec![320, 1]), 1.0, "doc").unwrap()).unwrap();
/// assert!(sd_model::lora::adapter_set_is_sd2(&set));
/// set.metadata.insert("ss_v2".into(), "True".into());
/// set.insert(AdapterKey::new(Component::Unet, path), LoraWeights::new(t(vec![1, 768]), t(vec![320, 1]), 1.0, "doc").unwrap()).unwrap();
/// assert!(!sd_model::lora::adapter_set_is_sd2(&set));
/// ```
pub fn adapter_set_is_sd2(set: &AdapterSet) -> bool {
    let sd2_width = crate::ClipTextConfig::sd21().hidden_size;
    let context = |key: &lora_core::AdapterKey| match key.component {
        lora_core::Component::TextEncoder => key.path.starts_with("text_model.encoder.layers.") && key.path.contains(".self_attn."),
        lora_core::Component::Unet => key.path.ends_with(".attn2.to_k") || key.path.ends_with(".attn2.to_v"),
        lora_core::Component::TextEncoder2 => false,
    };
    // A stand-alone adapter (OFT, GLoRA) has no plain form to read widths from.
    let widths: Vec<usize> = set.iter().filter(|(key, w)| context(key) && !w.stands_alone()).map(|(_, w)| w.in_features()).collect();
    if !widths.is_empty() {
        return widths.contains(&sd2_width);
    }
    let said = |key: &str| set.metadata.get(key).map(|v| v.to_lowercase()).unwrap_or_default();
    said("ss_v2") == "true" || said("ss_base_model_version").starts_with("sd_v2") || said("modelspec.architecture").starts_with("stable-diffusion-v2")
}

/// The UNet layout behind an SDXL set's SGM names, guessed from the set alone (for tools
/// that load no model; the names of later levels depend on the ResNets per level):
/// SDXL's two ResNets per level, or the tiny SDXL models' one where every UNet adapter is
/// narrower than SDXL's narrowest level and none sits where only a second ResNet per
/// level fits.
pub fn guess_sdxl_layout(set: &AdapterSet) -> crate::keymap::UnetLayout {
    let sdxl = crate::UnetConfig::sdxl();
    let unet = || set.iter().filter(|(key, _)| key.component == lora_core::Component::Unet);
    // Shapes read with `get`: a stand-alone adapter's tensors need not be matrices.
    let width = |w: &lora_core::LoraWeights| w.down.shape.get(1).copied().unwrap_or(0).max(w.up.shape.first().copied().unwrap_or(0));
    let narrow = unet().all(|(_, w)| width(w) < sdxl.block_out_channels[0]);
    let second_resnet = |path: &str| {
        let parts: Vec<&str> = path.split('.').collect();
        match parts.as_slice() {
            ["down_blocks", _, "resnets" | "attentions", j, ..] => j.parse::<usize>().is_ok_and(|j| j >= 1),
            ["up_blocks", _, "resnets" | "attentions", j, ..] => j.parse::<usize>().is_ok_and(|j| j >= 2),
            _ => false,
        }
    };
    let layers = if narrow && !unet().any(|(key, _)| second_resnet(&key.path)) { 1 } else { sdxl.layers_per_block };
    crate::keymap::UnetLayout { layers, ..crate::keymap::UnetLayout::from_config(&sdxl) }
}

/// [`use_sdxl_kohya_names`] with the UNet's layout, kept where the UNet itself is gone.
pub fn use_sdxl_kohya_names_by(set: &mut AdapterSet, layout: &crate::keymap::UnetLayout) -> usize {
    let mut names = Vec::new();
    for (key, _) in set.iter() {
        let name = match key.component {
            lora_core::Component::Unet => layout.ldm_module_path(&key.path).map(|p| format!("lora_unet_{}", p.replace('.', "_"))),
            lora_core::Component::TextEncoder => Some(format!("lora_te1_{}", key.path.replace('.', "_"))),
            lora_core::Component::TextEncoder2 => None,
        };
        if let Some(name) = name {
            names.push((key.clone(), name));
        }
    }
    let n = names.len();
    set.kohya_names.extend(names);
    n
}

/// Reads every file, combines them (ranks concatenated, each at its strength, so the
/// update is exactly the weighted sum) and attaches the result to the UNet and the text
/// encoder. Text-encoder adapters without a text encoder, or keys matching no module, are
/// an error unless `lenient` (then they are reported in [`AppliedLoras::skipped`]).
///
/// DoRA adapters and those with no plain-LoRA form (OFTs, GLoRAs, (IA)³s, LyCORIS' full
/// differences: [`lora_core::Algo::stands_alone`]) do not combine (each changes its whole
/// layer): each is attached alone, at its file's strength as the
/// layer's multiplier, which moves the layer from its base weight toward the adapter's
/// (ComfyUI's and Forge's convention; kohya's for OFT). Such an adapter on a layer that
/// another file also adapts is an error naming the layer (bake one file into the
/// checkpoint first). A single file is attached as it is, at its strength.
pub fn apply_lora_files<B: Backend>(
    unet: &mut UNet2DConditionModel<B>,
    text_encoder: Option<&mut ClipTextModel<B>>,
    files: &[LoraFile],
    lenient: bool,
    device: &B::Device,
) -> Result<AppliedLoras> {
    apply_lora_files_to(unet, &mut text_encoder.into_iter().collect::<Vec<_>>(), files, lenient, device)
}

/// [`apply_lora_files`] for any number of text encoders (SDXL's two, each taking the
/// adapters of its [`component`](ClipTextModel::component)).
pub fn apply_lora_files_to<B: Backend>(
    unet: &mut UNet2DConditionModel<B>,
    text_encoders: &mut [&mut ClipTextModel<B>],
    files: &[LoraFile],
    lenient: bool,
    device: &B::Device,
) -> Result<AppliedLoras> {
    if files.is_empty() {
        return Err(SdModelError::BadInput {
            what: "LoRA files".into(),
            reason: "no file given".into(),
        });
    }
    let index = module_index_of(unet, text_encoders)?;
    let layers_per_block = crate::keymap::UnetLayout::of(unet).layers;
    let sdxl = unet.has_added_conditions();
    // A list of the other family's blocks would weigh other layers than it names.
    if let Some((file, weights)) = files.iter().find_map(|f| f.block_weights.as_ref().filter(|w| w.for_sdxl() != sdxl).map(|w| (f, w))) {
        let (theirs, ours) = if sdxl { ("SD1.x / SD2.x (17 or 26 values; every preset is)", "12 or 20 values") } else { ("SDXL (12 or 20 values)", "17 or 26 values, or a preset") };
        return Err(SdModelError::BadInput {
            what: file.path.display().to_string(),
            reason: format!("lbw=`{}` is a block-weight list for {theirs}, and this model takes {ours}", weights.spec()),
        });
    }
    let mut applied = AppliedLoras::default();
    let mut sets = Vec::with_capacity(files.len());
    // A LoRA of the other family fails to load or to fit: the error says so.
    let hinted = |file: &LoraFile, e: SdModelError| {
        let what = file.path.display().to_string();
        match family_mismatch(&file.path, sdxl) {
            Some(hint) => {
                // The file is named once, by this error, where `e` names it too.
                let text = e.to_string();
                let reason = text.strip_prefix(&format!("{what}: ")).map_or(text.clone(), str::to_string);
                SdModelError::BadInput { what, reason: format!("{reason} ({hint})") }
            }
            None => e,
        }
    };
    for file in files {
        let (set, report) = AdapterSet::load(&file.path, &index, ReadOptions { lenient }).map_err(|e| hinted(file, e.into()))?;
        // Lenient reading skips keys the model lacks; a file all of whose keys were skipped
        // would change nothing, which no one asks for.
        if set.is_empty() && !report.skipped.is_empty() {
            let reason = format!("none of its {} LoRA keys names a layer of this model (e.g. `{}`), so it would change nothing", report.skipped.len(), report.skipped[0]);
            return Err(hinted(file, SdModelError::BadInput { what: file.path.display().to_string(), reason }));
        }
        if !report.skipped.is_empty() {
            applied.skipped.push((file.path.clone(), report.skipped));
        }
        sets.extend(file.strength_parts(set, layers_per_block));
    }
    // (adapters, the multiplier to attach them at)
    let groups: Vec<(AdapterSet, f32)> = match sets.as_slice() {
        [(set, strength)] => vec![(set.clone(), *strength)],
        _ => {
            let (plain, dora) = split_dora(&sets)?;
            let refs: Vec<(&AdapterSet, f32)> = plain.iter().map(|(s, m)| (s, *m)).collect();
            // Strengths are folded into the combined weights, so the sites run at multiplier 1.
            std::iter::once((AdapterSet::combine(&refs)?, 1.0)).chain(dora).collect()
        }
    };
    // An adapter that does not fit its layer: with one file, name the file (with several,
    // the combined adapters are attached: the error names the module and every file).
    let in_file = |e: lora_core::LoraError| match files {
        [file] => hinted(file, SdModelError::BadInput { what: file.path.display().to_string(), reason: e.to_string() }),
        _ => SdModelError::BadInput {
            what: files.iter().map(|f| f.path.display().to_string()).collect::<Vec<_>>().join(", "),
            reason: format!("{e} (in one of these files, combined)"),
        },
    };
    for (set, multiplier) in &groups {
        applied.unet += sites::attach_adapters(unet, set, *multiplier, device).map_err(in_file)?;
        for te in text_encoders.iter_mut() {
            applied.text_encoder += sites::attach_adapters(&mut **te, set, *multiplier, device).map_err(in_file)?;
        }
    }
    Ok(applied)
}

/// Why the LoRA file at `path` cannot fit a model that is (`model_sdxl`) or is not SDXL:
/// its metadata's base model (`ss_base_model_version`, `modelspec.architecture`), else
/// its keys (kohya's SDXL names: `lora_te2_`, LDM-style `input_blocks`; PEFT's
/// `text_encoder_2.`), say it is for the other family. `None` when it cannot tell.
fn family_mismatch(path: &std::path::Path, model_sdxl: bool) -> Option<String> {
    let file = crate::load::WeightFile::open(path).ok()?;
    let said = |key: &str| file.metadata().get(key).map(String::as_str);
    let lora_sdxl = base_model_is_sdxl(said("ss_base_model_version"), said("modelspec.architecture")).unwrap_or_else(|| {
        let sdxl_prefixes = ["lora_te2_", "lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_", "text_encoder_2."];
        file.keys().any(|k| sdxl_prefixes.iter().any(|p| k.starts_with(p)))
    });
    (lora_sdxl != model_sdxl).then(|| match lora_sdxl {
        true => "this LoRA is for SDXL, and the model is SD1.x / SD2.x".to_string(),
        false => "this LoRA is for SD1.x / SD2.x, and the model is SDXL".to_string(),
    })
}

/// Each file's plain adapters and its DoRA adapters and adapters with no plain form apart
/// (with the file's strength); the layer of one of those must be in no other file.
#[allow(clippy::type_complexity)]
fn split_dora(sets: &[(AdapterSet, f32)]) -> Result<(Vec<(AdapterSet, f32)>, Vec<(AdapterSet, f32)>)> {
    let (mut plain, mut dora) = (Vec::new(), Vec::new());
    for (i, (set, strength)) in sets.iter().enumerate() {
        let (mut p, mut d) = (AdapterSet::new(), AdapterSet::new());
        p.metadata = set.metadata.clone();
        for (key, w) in set.iter() {
            if !w.is_dora() && !w.stands_alone() {
                p.insert(key.clone(), w.clone())?;
                continue;
            }
            if sets.iter().enumerate().any(|(j, (other, _))| j != i && other.get(key).is_some()) {
                let algo = w.lycoris.as_ref().map(|l| l.algo);
                let (what, how) = if w.is_oft() {
                    ("an OFT", "rotates")
                } else if algo == Some(lora_core::Algo::Glora) {
                    ("a GLoRA", "maps")
                } else if algo == Some(lora_core::Algo::Ia3) {
                    ("an (IA)³", "rescales")
                } else if algo == Some(lora_core::Algo::Full) {
                    ("a full fine-tuning difference", "changes")
                } else if algo == Some(lora_core::Algo::Norm) {
                    ("a norm module", "changes")
                } else {
                    ("a DoRA adapter", "rescales")
                };
                return Err(lora_core::LoraError::Unsupported(format!(
                    "`{key}`: {what} cannot be combined with another file's adapter on the same layer (it {how} the whole layer); merge one of the files into the checkpoint first"
                ))
                .into());
            }
            d.insert(key.clone(), w.clone())?;
        }
        plain.push((p, *strength));
        if !d.is_empty() {
            dora.push((d, *strength));
        }
    }
    Ok((plain, dora))
}

#[cfg(test)]
mod tests {
    use lora_core::{AdapterKey, Component, HostTensor, LoraWeights};

    use super::*;

    /// A file with a text-encoder strength of its own splits into its UNet part at the
    /// file's strength and its text-encoder part at that one; combined, each update is
    /// scaled by its component's strength. Without one, the set stays whole.
    #[test]
    fn text_encoder_strength_splits_the_file_by_component() {
        let unet = AdapterKey::new(Component::Unet, "mid_block.attentions.0.proj_in");
        let te = AdapterKey::new(Component::TextEncoder, "text_model.encoder.layers.0.self_attn.q_proj");
        let lora = || LoraWeights::new(HostTensor::new(vec![1, 2], vec![1.0, 2.0]).unwrap(), HostTensor::new(vec![2, 1], vec![1.0, -1.0]).unwrap(), 1.0, "t").unwrap();
        let mut set = AdapterSet::new();
        set.insert(unet.clone(), lora()).unwrap();
        set.insert(te.clone(), lora()).unwrap();
        let whole: LoraFile = "x.safetensors:0.6".parse().unwrap();
        assert_eq!(whole.strength_parts(set.clone(), 2).len(), 1);
        let same: LoraFile = "x.safetensors:0.6:0.6".parse().unwrap();
        assert_eq!(same.strength_parts(set.clone(), 2).len(), 1);
        let split: LoraFile = "x.safetensors:0.6:0.25".parse().unwrap();
        let parts = split.strength_parts(set, 2);
        assert_eq!(parts.iter().map(|(s, k)| (s.len(), *k)).collect::<Vec<_>>(), [(1, 0.6), (1, 0.25)]);
        let refs: Vec<(&AdapterSet, f32)> = parts.iter().map(|(s, k)| (s, *k)).collect();
        let combined = AdapterSet::combine(&refs).unwrap();
        let base = lora().delta().data;
        for (key, k) in [(&unet, 0.6f32), (&te, 0.25)] {
            let got = combined.get(key).unwrap().delta().data;
            assert!(got.iter().zip(&base).all(|(g, b)| (g - k * b).abs() < 1e-6), "{key:?}: {got:?}");
        }
        assert!("x.safetensors:0.5:inf".parse::<LoraFile>().is_err());
        let odd: LoraFile = "dir:1/x.safetensors:0.5".parse().unwrap();
        assert_eq!((odd.path.to_str().unwrap(), odd.strength, odd.text_encoder), ("dir:1/x.safetensors", 0.5, None));
    }

    /// An SDXL set is known by its adapters (a second text encoder, a second transformer
    /// block) whatever its metadata says, and otherwise by its metadata, kohya's key first;
    /// the guessed layout has one ResNet per level only for narrow sets with no adapter
    /// where only a second one fits.
    #[test]
    fn sdxl_sets_are_known_by_adapters_then_metadata() {
        let lora = |width: usize| LoraWeights::new(HostTensor::new(vec![1, width], vec![0.1; width]).unwrap(), HostTensor::new(vec![width, 1], vec![0.1; width]).unwrap(), 1.0, "t").unwrap();
        let with = |modules: &[(Component, &str, usize)], metadata: &[(&str, &str)]| {
            let mut set = AdapterSet::new();
            for (component, path, width) in modules {
                set.insert(AdapterKey::new(*component, *path), lora(*width)).unwrap();
            }
            set.metadata.extend(metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            set
        };
        let plain = [(Component::Unet, "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 640)];
        assert!(!adapter_set_is_sdxl(&with(&plain, &[])));
        assert!(adapter_set_is_sdxl(&with(&plain, &[("ss_base_model_version", "sdxl_base_v1-0")])));
        assert!(adapter_set_is_sdxl(&with(&plain, &[("modelspec.architecture", "Stable-Diffusion-XL-v1-base/lora")])));
        // kohya's key wins over ModelSpec's.
        assert!(!adapter_set_is_sdxl(&with(&plain, &[("ss_base_model_version", "sd_v1"), ("modelspec.architecture", "stable-diffusion-xl-v1-base/lora")])));
        // The adapters win over metadata.
        let te2 = [(Component::TextEncoder2, "text_model.encoder.layers.0.self_attn.q_proj", 1280)];
        assert!(adapter_set_is_sdxl(&with(&te2, &[("ss_base_model_version", "sd_v1")])));
        let deep = [(Component::Unet, "down_blocks.2.attentions.0.transformer_blocks.3.ff.net.2", 1280)];
        assert!(adapter_set_is_sdxl(&with(&deep, &[])));

        let layers = |modules: &[(Component, &str, usize)]| guess_sdxl_layout(&with(modules, &[])).layers;
        assert_eq!(layers(&[(Component::Unet, "down_blocks.1.attentions.0.proj_in", 32)]), 1);
        assert_eq!(layers(&[(Component::Unet, "down_blocks.1.attentions.1.proj_in", 32)]), 2);
        assert_eq!(layers(&[(Component::Unet, "down_blocks.1.attentions.0.proj_in", 640)]), 2);
    }

    /// A strength that is no number after an existing file is named as such, not taken for
    /// part of a missing file's name; a missing file's colons stay part of its name.
    #[test]
    fn a_bad_strength_after_an_existing_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("x.safetensors");
        std::fs::write(&file, b"").unwrap();
        let f = file.to_str().unwrap();
        for (suffix, rest) in [(":abc", "abc"), (":1:2:3", "1:2:3"), (":0x10", "0x10"), (":0.5:abc:lbw=OUTALL", "0.5:abc")] {
            let err = format!("{f}{suffix}").parse::<LoraFile>().unwrap_err();
            assert!(err.contains(&format!("`{rest}` after")) && err.contains("not a strength"), "{suffix}: {err}");
        }
        let good: LoraFile = format!("{f}:0.5:0.25").parse().unwrap();
        assert_eq!((good.strength, good.text_encoder), (0.5, Some(0.25)));
        let missing: LoraFile = format!("{}/missing:abc", dir.path().display()).parse().unwrap();
        assert!(missing.path.ends_with("missing:abc"));
    }

    /// Block weights group a file's adapters by block: each part's strength is the
    /// component's strength times its block's weight (`BASE` for the text encoders).
    #[test]
    fn block_weights_scale_each_block() {
        let lora = || LoraWeights::new(HostTensor::new(vec![1, 2], vec![1.0, 2.0]).unwrap(), HostTensor::new(vec![2, 1], vec![1.0, -1.0]).unwrap(), 1.0, "t").unwrap();
        let keys = [
            (AdapterKey::new(Component::Unet, "down_blocks.0.attentions.0.proj_in"), 0.5 * 0.2), // IN01
            (AdapterKey::new(Component::Unet, "down_blocks.0.attentions.1.proj_in"), 0.5 * 0.0), // IN02
            (AdapterKey::new(Component::Unet, "up_blocks.3.attentions.2.proj_out"), 0.5 * 0.7), // OUT11
            (AdapterKey::new(Component::Unet, "time_embedding.linear_1"), 0.5),                  // no block
            (AdapterKey::new(Component::TextEncoder, "text_model.encoder.layers.0.mlp.fc1"), 0.25 * 0.9), // BASE
        ];
        let mut set = AdapterSet::new();
        for (key, _) in &keys {
            set.insert(key.clone(), lora()).unwrap();
        }
        let file: LoraFile = "x.safetensors:0.5:0.25:lbw=0.9,0.2,0,1,1,1,1,1,1,1,1,1,1,1,1,1,0.7".parse().unwrap();
        let parts = file.strength_parts(set, 2);
        assert_eq!(parts.iter().map(|(p, _)| p.len()).sum::<usize>(), keys.len());
        for (key, strength) in &keys {
            let (_, got) = parts.iter().find(|(p, _)| p.get(key).is_some()).unwrap();
            assert!((got - strength).abs() < 1e-7, "{key:?}: {got} vs {strength}");
        }
        assert!("x.safetensors:lbw=1,2".parse::<LoraFile>().unwrap_err().contains("2 values"));
        let plain: LoraFile = "x.safetensors:lbw=OUTS".parse().unwrap();
        assert_eq!((plain.strength, plain.block_weights.map(|b| b.spec().to_string())), (1.0, Some("OUTS".into())));
    }
}
