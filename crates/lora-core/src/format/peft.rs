//! diffusers / PEFT layout.

use std::collections::HashMap;
use std::path::Path;

use super::{finish, group, settle_unknown, AdapterFormat, ReadOptions, ReadReport, Role};
use crate::tensor_io::{self, SaveDtype};
use crate::{AdapterKey, AdapterSet, Component, HostTensor, LoraWeights, ModuleIndex, Result};

const SUFFIXES: &[(&str, Role)] = &[
    (".lora_A.weight", Role::Down),
    (".lora_B.weight", Role::Up),
    // diffusers' pre-PEFT naming, still found in older files.
    (".lora.down.weight", Role::Down),
    (".lora.up.weight", Role::Up),
    // Written by some converters; absent means alpha = rank.
    (".alpha", Role::Alpha),
    // DoRA's magnitude: PEFT's key, and diffusers' conversion of kohya files.
    (".lora_magnitude_vector", Role::Magnitude),
    (".lora_magnitude_vector.weight", Role::Magnitude),
];

/// Splits `unet.<path>` / `text_encoder.<path>` / `text_encoder_2.<path>`; PEFT's own
/// `base_model.model.<path>` prefix is resolved through the index, else by the path's shape.
fn parse_name(name: &str, index: &ModuleIndex) -> Option<AdapterKey> {
    for component in [Component::TextEncoder2, Component::TextEncoder, Component::Unet] {
        if let Some(path) = name.strip_prefix(component.peft_prefix()).and_then(|r| r.strip_prefix('.')) {
            return Some(AdapterKey::new(component, path));
        }
    }
    let path = name.strip_prefix("base_model.model.")?;
    let component = index.component_of(path).unwrap_or(if path.starts_with("text_model.") {
        Component::TextEncoder
    } else {
        Component::Unet
    });
    Some(AdapterKey::new(component, path))
}

pub(super) fn read(
    bytes: &[u8],
    path: &Path,
    index: &ModuleIndex,
    options: ReadOptions,
) -> Result<(AdapterSet, ReadReport)> {
    let (parts, mut unknown, metadata, bundled) = group(bytes, path, SUFFIXES)?;
    let mut set = AdapterSet::new();
    set.metadata = metadata.into_iter().collect();
    set.bundled_embeddings = bundled;
    for (name, part) in parts {
        let key = match parse_name(&name, index) {
            Some(k) if index.is_empty() || index.contains(&k) => k,
            _ => {
                unknown.extend(part.keys);
                continue;
            }
        };
        let weights = finish(part, &name, path, ("lora_A", "lora_B"), AdapterFormat::Peft)?;
        set.insert(key, weights)?;
    }
    let skipped = settle_unknown(unknown, path, options)?;
    Ok((
        set,
        ReadReport {
            format: AdapterFormat::Peft,
            skipped,
        },
    ))
}

pub(super) fn write(set: &AdapterSet, dtype: SaveDtype) -> Result<Vec<u8>> {
    // PEFT files carry no alpha and loaders assume alpha = rank, so the scale is folded
    // into B: ΔW stays exactly what it was.
    if let Some((key, w)) = set.iter().find(|(_, w)| w.stands_alone()) {
        return Err(w.no_plain_form(&key.to_string(), "written in the diffusers / PEFT layout (PEFT's OFT is another method); keep it in kohya's"));
    }
    let mut folded: Vec<(AdapterKey, LoraWeights)> = set.iter().map(|(k, w)| (k.clone(), w.with_scale_folded())).collect();
    // DoRA magnitudes in PEFT's layout: `[out]`, or `[1, out, 1, 1]` for convolutions.
    for (_, w) in &mut folded {
        if let (true, Some(m)) = (w.is_conv(), w.magnitude.as_mut()) {
            m.shape = vec![1, m.numel(), 1, 1];
        }
    }
    let mut tensors: Vec<(String, &HostTensor)> = Vec::with_capacity(folded.len() * 3);
    for (key, w) in &folded {
        let name = key.peft_name();
        tensors.push((format!("{name}.lora_A.weight"), &w.down));
        tensors.push((format!("{name}.lora_B.weight"), &w.up));
        if let Some(m) = &w.magnitude {
            tensors.push((format!("{name}.lora_magnitude_vector"), m));
        }
    }
    tensors.extend(super::bundled_tensors(set));
    let mut metadata: HashMap<String, String> = set
        .metadata
        .iter()
        .filter(|(k, _)| !k.starts_with("ss_network"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    metadata.insert("format".into(), "pt".into());
    tensor_io::serialize(&tensors, dtype, metadata)
}
