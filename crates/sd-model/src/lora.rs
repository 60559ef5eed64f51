//! Applying LoRA files to the model: several files at once, each with its own strength.

use std::path::PathBuf;
use std::str::FromStr;

use burn::tensor::backend::Backend;
use lora_core::{sites, AdapterSet, ModuleIndex, ReadOptions};

use crate::{ClipTextModel, Result, SdModelError, UNet2DConditionModel};

/// A LoRA file and the strength to apply it at, written `FILE[:STRENGTH[:TE_STRENGTH]]` on
/// command lines: one strength for the whole file, or the UNet's and the text encoders'
/// apart (ComfyUI's `strength_model` / `strength_clip`, A1111's `unet=` / `te=`).
///
/// ```
/// use sd_model::lora::LoraFile;
/// let f: LoraFile = "style.safetensors:0.7".parse().unwrap();
/// assert_eq!((f.path.to_str().unwrap(), f.strength, f.text_encoder_strength()), ("style.safetensors", 0.7, 0.7));
/// let g: LoraFile = "C:/loras/x.safetensors".parse().unwrap();
/// assert_eq!(g.strength, 1.0);
/// let h: LoraFile = "C:/loras/x.safetensors:0.8:0.3".parse().unwrap();
/// assert_eq!((h.path.to_str().unwrap(), h.strength, h.text_encoder_strength()), ("C:/loras/x.safetensors", 0.8, 0.3));
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
}

impl LoraFile {
    /// `path` at `strength` throughout.
    pub fn new(path: impl Into<PathBuf>, strength: f32) -> Self {
        Self { path: path.into(), strength, text_encoder: None }
    }

    /// The strength of the file's text-encoder adapters.
    pub fn text_encoder_strength(&self) -> f32 {
        self.text_encoder.unwrap_or(self.strength)
    }

    /// `set` (this file's adapters) as the parts to apply and their strengths: the whole
    /// set at [`strength`](Self::strength), or, with a text-encoder strength of its own,
    /// the UNet's adapters and the text encoders' apart.
    pub fn strength_parts(&self, set: AdapterSet) -> Vec<(AdapterSet, f32)> {
        let te = self.text_encoder_strength();
        if te == self.strength {
            return vec![(set, self.strength)];
        }
        let keys: Vec<_> = set.iter().map(|(key, _)| key.clone()).collect();
        let (mut unet, mut text) = (set.clone(), set);
        for key in &keys {
            match key.component == lora_core::Component::Unet {
                true => text.remove(key),
                false => unet.remove(key),
            };
        }
        vec![(unet, self.strength), (text, te)]
    }
}

impl FromStr for LoraFile {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        // Only suffixes that parse as numbers are strengths, so paths with colons work.
        let number = |t: &str| t.parse::<f32>().ok();
        let mut file = Self::new(s, 1.0);
        if let Some((rest, last)) = s.rsplit_once(':').and_then(|(rest, last)| Some((rest, number(last)?))) {
            file = match rest.rsplit_once(':').and_then(|(path, unet)| Some((path, number(unet)?))) {
                Some((path, unet)) => Self { path: path.into(), strength: unet, text_encoder: Some(last) },
                None => Self::new(rest, last),
            };
        }
        if !(file.strength.is_finite() && file.text_encoder_strength().is_finite()) {
            return Err(format!("`{s}`: strengths must be finite"));
        }
        Ok(file)
    }
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
/// DoRA adapters do not combine (each rescales its whole layer): each is attached alone,
/// at its file's strength as the layer's multiplier, which moves the layer from its base
/// weight toward the adapter's (ComfyUI's and Forge's convention). A DoRA adapter on a
/// layer that another file also adapts is an error naming the layer (bake one file into
/// the checkpoint first). A single file is attached as it is, at its strength.
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
    let mut applied = AppliedLoras::default();
    let mut sets = Vec::with_capacity(files.len());
    for file in files {
        let (set, report) = AdapterSet::load(&file.path, &index, ReadOptions { lenient })?;
        if !report.skipped.is_empty() {
            applied.skipped.push((file.path.clone(), report.skipped));
        }
        sets.extend(file.strength_parts(set));
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
    for (set, multiplier) in &groups {
        applied.unet += sites::attach_adapters(unet, set, *multiplier, device)?;
        for te in text_encoders.iter_mut() {
            applied.text_encoder += sites::attach_adapters(&mut **te, set, *multiplier, device)?;
        }
    }
    Ok(applied)
}

/// Each file's plain adapters and its DoRA adapters apart (with the file's strength); a
/// DoRA adapter's layer must be in no other file.
#[allow(clippy::type_complexity)]
fn split_dora(sets: &[(AdapterSet, f32)]) -> Result<(Vec<(AdapterSet, f32)>, Vec<(AdapterSet, f32)>)> {
    let (mut plain, mut dora) = (Vec::new(), Vec::new());
    for (i, (set, strength)) in sets.iter().enumerate() {
        let (mut p, mut d) = (AdapterSet::new(), AdapterSet::new());
        p.metadata = set.metadata.clone();
        for (key, w) in set.iter() {
            if !w.is_dora() {
                p.insert(key.clone(), w.clone())?;
                continue;
            }
            if sets.iter().enumerate().any(|(j, (other, _))| j != i && other.get(key).is_some()) {
                return Err(lora_core::LoraError::Unsupported(format!(
                    "`{key}`: a DoRA adapter cannot be combined with another file's adapter on the same layer (it rescales the whole layer); merge one of the files into the checkpoint first"
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
        assert_eq!(whole.strength_parts(set.clone()).len(), 1);
        let same: LoraFile = "x.safetensors:0.6:0.6".parse().unwrap();
        assert_eq!(same.strength_parts(set.clone()).len(), 1);
        let split: LoraFile = "x.safetensors:0.6:0.25".parse().unwrap();
        let parts = split.strength_parts(set);
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
}
