//! kohya sd-scripts / A1111 / ComfyUI layout.

use std::collections::HashMap;
use std::path::Path;

use super::{finish, group, settle_unknown, AdapterFormat, ReadOptions, ReadReport, Role};
use crate::tensor_io::{self, SaveDtype};
use crate::{AdapterSet, HostTensor, ModuleIndex, Result};

const SUFFIXES: &[(&str, Role)] = &[
    (".lora_down.weight", Role::Down),
    (".lora_up.weight", Role::Up),
    (".alpha", Role::Alpha),
    // DoRA's magnitude, as LyCORIS writes it (with `wd_on_out`, its default; read by
    // ComfyUI and Forge).
    (".dora_scale", Role::Magnitude),
    // LoCon's Tucker core (LyCORIS' `use_tucker` for a convolution): kept with its
    // `lora_down` / `lora_up` in `LoraWeights::lycoris`, folded into `lora_down` beside.
    (".lora_mid.weight", Role::Mid),
];

pub(super) fn read(
    bytes: &[u8],
    path: &Path,
    index: &ModuleIndex,
    options: ReadOptions,
) -> Result<(AdapterSet, ReadReport)> {
    // LyCORIS' LoHa and LoKr modules share the layout (read with their own tensors).
    let suffixes: Vec<(&str, Role)> = SUFFIXES.iter().copied().chain(super::lycoris::SUFFIXES.iter().map(|(s, p)| (*s, Role::Lycoris(*p)))).collect();
    let (parts, mut unknown, metadata, bundled) = group(bytes, path, &suffixes)?;
    let mut set = AdapterSet::new();
    set.metadata = metadata.into_iter().collect();
    set.bundled_embeddings = bundled;
    // A file that says it is kohya's OFT holds kohya's OFT under `lora_te_…` names too.
    let kohya_oft = set.metadata.get("ss_network_module").is_some_and(|m| m == "networks.oft");
    for (name, mut part) in parts {
        // kohya's OFT names the UNet's modules `oft_unet_…`; ComfyUI's own names are its
        // state-dict paths.
        let comfy = comfy_name(&name);
        let resolved = match (name.strip_prefix("oft_unet_"), &comfy) {
            (Some(rest), _) => index.resolve_kohya(&format!("lora_unet_{rest}")),
            (None, Some(kohya)) => index.resolve_kohya(kohya),
            (None, None) => index.resolve_kohya(&name),
        };
        let Some(key) = resolved.cloned() else {
            unknown.extend(part.keys);
            continue;
        };
        part.lycoris.set_kohya_oft_file(kohya_oft);
        let mut weights = finish(part, &name, path, ("lora_down", "lora_up"), AdapterFormat::Kohya)?;
        if let Some(kernel) = index.kernel(&key) {
            // LyCORIS stores a convolution's kernel flattened into the columns.
            weights = super::lycoris::unflatten(weights, kernel);
        }
        if set.get(&key).is_some() {
            // Two names of one module (e.g. its diffusers and its SGM name).
            return Err(crate::LoraError::DuplicateModule {
                path: path.to_path_buf(),
                first: set.kohya_name_of(&key),
                second: name,
                module: key.to_string(),
            });
        }
        // A file's kohya names are kept for writing; ComfyUI's paths are not kohya names
        // (A1111 and sd-scripts read none), so such modules are written by kohya's.
        if name != key.kohya_name() && comfy.is_none() {
            set.kohya_names.insert(key.clone(), name);
        }
        set.insert(key, weights)?;
    }
    let skipped = settle_unknown(unknown, path, options)?;
    Ok((
        set,
        ReadReport {
            format: AdapterFormat::Kohya,
            skipped,
        },
    ))
}

/// Prefixes of the module names ComfyUI gives LoRAs it writes itself (its "Extract and
/// Save Lora" and training nodes) and reads beside kohya's: the UNet's original (SGM)
/// state-dict paths under `diffusion_model.`, a text encoder's under
/// `text_encoders.clip_<l|h|g>.transformer.` (CLIP ViT-L for SD1.x and SDXL's first,
/// OpenCLIP ViT-H for SD2.x, ViT-bigG for SDXL's second), each with its kohya prefix.
pub(super) const COMFY_PREFIXES: &[(&str, &str)] = &[
    ("diffusion_model.", "lora_unet_"),
    ("text_encoders.clip_l.transformer.", "lora_te_"),
    ("text_encoders.clip_h.transformer.", "lora_te_"),
    ("text_encoders.clip_g.transformer.", "lora_te2_"),
];

/// The kohya name of a module ComfyUI names by its state-dict path
/// ([`COMFY_PREFIXES`]), e.g. `diffusion_model.input_blocks.1.1.proj_in` →
/// `lora_unet_input_blocks_1_1_proj_in` (the SGM name an index knows as an alias).
fn comfy_name(name: &str) -> Option<String> {
    COMFY_PREFIXES.iter().find_map(|(comfy, kohya)| name.strip_prefix(comfy).map(|rest| format!("{kohya}{}", rest.replace('.', "_"))))
}

/// The most common value of an iterator (ties: the smallest), for `ss_network_dim` etc.
fn mode<T: Ord + Copy>(values: impl Iterator<Item = T>) -> Option<T> {
    let mut sorted: Vec<T> = values.collect();
    sorted.sort();
    let mut best: Option<(T, usize)> = None;
    let mut i = 0;
    while i < sorted.len() {
        let j = sorted[i..].iter().take_while(|v| **v == sorted[i]).count();
        if best.is_none_or(|(_, n)| j > n) {
            best = Some((sorted[i], j));
        }
        i += j;
    }
    best.map(|(v, _)| v)
}

/// `ss_network_*` keys as kohya writes them, computed from the adapters themselves.
fn network_metadata(set: &AdapterSet) -> HashMap<String, String> {
    let mut meta = HashMap::new();
    // kohya's LoRA-FA and DyLoRA modules train plain LoRAs: a recorded `networks.lora_fa`
    // or `networks.dylora` stays (a DoRA or LyCORIS adapter below says otherwise).
    let recorded = set.metadata.get("ss_network_module").map(String::as_str);
    let module = recorded.filter(|m| matches!(*m, "networks.lora_fa" | "networks.dylora")).unwrap_or("networks.lora");
    meta.insert("ss_network_module".into(), module.into());
    // The recorded network args, with ours added (kohya writes all it was given, e.g.
    // `rank_dropout`).
    let mut args = match set.metadata.get("ss_network_args").map(|s| serde_json::from_str::<serde_json::Value>(s)) {
        Some(Ok(serde_json::Value::Object(args))) => args,
        _ => serde_json::Map::new(),
    };
    if set.iter().any(|(_, w)| w.is_dora()) {
        // kohya's own module has no DoRA: such files come from LyCORIS, which records this.
        meta.insert("ss_network_module".into(), "lycoris.kohya".into());
        args.insert("algo".into(), "lora".into());
        args.insert("dora_wd".into(), "True".into());
    }
    // LyCORIS' norm modules train beside the algorithm of the other layers (`train_norm`).
    let is_norm = |l: &crate::LycorisWeights| l.algo == crate::Algo::Norm;
    let norms = set.iter().any(|(_, w)| w.lycoris.as_ref().is_some_and(is_norm));
    match set.iter().find_map(|(_, w)| w.lycoris.as_ref().filter(|l| !is_norm(l))) {
        // kohya's own module: `network_dim` blocks and the constraint `network_alpha` for
        // every layer (its 3x3 convolutions too), with kohya's `enable_conv` /
        // `enable_all_linear` arguments as recorded.
        Some(l) if l.algo == crate::Algo::Oft => {
            meta.insert("ss_network_module".into(), "networks.oft".into());
            args.retain(|k, _| matches!(k.as_str(), "enable_all_linear" | "enable_conv"));
            // The linear layers' blocks and constraint (3x3 convolutions may have their own
            // here), or any layer's.
            let spatial = |w: &crate::LoraWeights| w.is_conv() && w.down.shape[2..] != [1, 1];
            let of = |w: &crate::LoraWeights| w.lycoris.as_ref().and_then(|l| l.rank().map(|r| (r, l.alpha)));
            let linear: Vec<(usize, f32)> = set.iter().filter(|(_, w)| !spatial(w)).filter_map(|(_, w)| of(w)).collect();
            let pairs = if linear.is_empty() { set.iter().filter_map(|(_, w)| of(w)).collect() } else { linear };
            if let Some(dim) = mode(pairs.iter().map(|(r, _)| *r)) {
                meta.insert("ss_network_dim".into(), dim.to_string());
                let alpha = pairs.iter().find(|(r, _)| *r == dim).map_or(l.alpha, |(_, a)| *a);
                meta.insert("ss_network_alpha".into(), alpha.to_string());
            }
            if !args.is_empty() {
                meta.insert("ss_network_args".into(), serde_json::Value::Object(args).to_string());
            }
            return meta;
        }
        Some(l) => {
            meta.insert("ss_network_module".into(), "lycoris.kohya".into());
            args.insert("algo".into(), l.algo.name().into());
            if l.algo.is_lycoris_oft() {
                // LyCORIS' arguments: the constraint per output (its `alpha` buffers), and
                // `rescaled` when the layers carry a scale.
                args.insert("constraint".into(), l.alpha.to_string().into());
                if set.iter().filter_map(|(_, w)| w.lycoris.as_ref()).any(|l| l.get(crate::oft::RESCALE).is_some()) {
                    args.insert("rescaled".into(), "True".into());
                }
            }
            let tucker = |l: &crate::LycorisWeights| l.tensors.iter().any(|(n, _)| matches!(n.as_str(), "hada_t1" | "hada_t2" | "lokr_t2" | "lora_mid.weight"));
            if set.iter().filter_map(|(_, w)| w.lycoris.as_ref()).any(tucker) {
                args.insert("use_tucker".into(), "True".into());
            }
        }
        None => {
            // A LoHa / LoKr file's recorded arguments do not describe its plain-LoRA form,
            // nor a full fine-tuning's those of the LoRA resized from it.
            if args.get("algo").and_then(|a| a.as_str()).is_some_and(|a| matches!(a, "loha" | "lokr" | "full")) {
                for key in ["algo", "factor", "decompose_both", "full_matrix", "unbalanced_factorization", "use_tucker", "preset"] {
                    args.remove(key);
                }
            }
        }
    }
    if norms {
        meta.insert("ss_network_module".into(), "lycoris.kohya".into());
        args.entry("algo").or_insert_with(|| "lora".into());
        args.insert("train_norm".into(), "True".into());
    }
    // A LyCORIS adapter's own rank and alpha (a LoKr with two full halves has no rank).
    let dim_alpha = |w: &crate::LoraWeights| match &w.lycoris {
        Some(l) => l.rank().map(|r| (r, l.alpha)),
        None => Some((w.rank(), w.alpha)),
    };
    let linear = || set.iter().filter(|(_, w)| !w.is_conv() || w.down.shape[2..] == [1, 1]).filter_map(|(_, w)| dim_alpha(w));
    let conv = || set.iter().filter(|(_, w)| w.is_conv() && w.down.shape[2..] != [1, 1]).filter_map(|(_, w)| dim_alpha(w));
    if let Some(dim) = mode(linear().map(|(r, _)| r)) {
        meta.insert("ss_network_dim".into(), dim.to_string());
        if let Some((_, alpha)) = linear().find(|(r, _)| *r == dim) {
            meta.insert("ss_network_alpha".into(), format_alpha(alpha));
        }
    }
    if let Some(dim) = mode(conv().map(|(r, _)| r)) {
        let alpha = conv().find(|(r, _)| *r == dim).map(|(_, a)| format_alpha(a)).unwrap_or_default();
        args.insert("conv_dim".into(), dim.to_string().into());
        args.insert("conv_alpha".into(), alpha.into());
    }
    if !args.is_empty() {
        meta.insert("ss_network_args".into(), serde_json::Value::Object(args).to_string());
    }
    meta
}

fn format_alpha(alpha: f32) -> String {
    if alpha.fract() == 0.0 {
        format!("{alpha:.1}")
    } else {
        alpha.to_string()
    }
}

pub(super) fn write(set: &AdapterSet, dtype: SaveDtype) -> Result<Vec<u8>> {
    let alphas: Vec<HostTensor> = set
        .iter()
        .map(|(_, w)| HostTensor {
            shape: vec![],
            data: vec![w.lycoris.as_ref().map_or(w.alpha, |l| l.alpha)],
        })
        .collect();
    // DoRA magnitudes in LyCORIS' layout: `[out, 1]`, or `[out, 1, 1, 1]` for convolutions.
    let magnitudes: Vec<Option<HostTensor>> = set
        .iter()
        .map(|(_, w)| {
            w.magnitude.as_ref().map(|m| {
                let mut shape = vec![m.numel(), 1];
                if w.is_conv() {
                    shape.extend([1, 1]);
                }
                HostTensor { shape, data: m.data.clone() }
            })
        })
        .collect();
    let mut tensors: Vec<(String, &HostTensor)> = Vec::with_capacity(set.len() * 4);
    for (((key, w), alpha), magnitude) in set.iter().zip(&alphas).zip(&magnitudes) {
        let name = set.kohya_name_of(key);
        // kohya's OFT names the UNet's modules `oft_unet_…`, as A1111 reads them.
        let name = match name.strip_prefix("lora_unet_") {
            Some(rest) if w.lycoris.as_ref().is_some_and(|l| l.algo == crate::Algo::Oft) => format!("oft_unet_{rest}"),
            _ => name,
        };
        match &w.lycoris {
            // LyCORIS' own tensors, as LyCORIS writes them.
            Some(l) => tensors.extend(l.tensors.iter().map(|(part, t)| (format!("{name}.{part}"), t))),
            None => {
                tensors.push((format!("{name}.lora_down.weight"), &w.down));
                tensors.push((format!("{name}.lora_up.weight"), &w.up));
            }
        }
        // LyCORIS' (IA)³, full fine-tuning and norm modules have no alpha.
        if w.lycoris.as_ref().is_none_or(|l| !matches!(l.algo, crate::Algo::Ia3 | crate::Algo::Full | crate::Algo::Norm)) {
            tensors.push((format!("{name}.alpha"), alpha));
        }
        if let Some(m) = magnitude {
            tensors.push((format!("{name}.dora_scale"), m));
        }
    }
    tensors.extend(super::bundled_tensors(set));
    let mut metadata: HashMap<String, String> = set.metadata.clone().into_iter().collect();
    let mut network = network_metadata(set);
    // A resize with a dynamic rule (`crate::resize`) marks the ranks as per adapter, as
    // kohya's script does; one number would be wrong for most adapters.
    for key in ["ss_network_dim", "ss_network_alpha"] {
        if set.metadata.get(key).map(String::as_str) == Some(crate::resize::DYNAMIC) {
            network.remove(key);
        }
    }
    // Recorded network arguments that left nothing to record (a LoHa's, LoKr's or full
    // fine-tuning's on the LoRA resized from it) are not kept from the input either; ones
    // this writer cannot read stay as they were.
    let read = set.metadata.get("ss_network_args").is_some_and(|s| serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(s).is_ok());
    if read && !network.contains_key("ss_network_args") {
        metadata.remove("ss_network_args");
    }
    metadata.extend(network);
    metadata.insert("format".into(), "pt".into());
    // kohya's precomputed hashes, which A1111 reads instead of hashing the file (its LoRA
    // hash, Civitai's AutoV3) and sd-webui-additional-networks uses. They are taken, as
    // sd-scripts takes them, from the file written with only the `ss_*` metadata, so that
    // editing other metadata later leaves them valid.
    metadata.retain(|k, _| !k.starts_with("sshs_"));
    let training: HashMap<String, String> = metadata.iter().filter(|(k, _)| k.starts_with("ss_")).map(|(k, v)| (k.clone(), v.clone())).collect();
    let (model_hash, legacy_hash) = tensor_io::addnet_hashes(&tensor_io::serialize(&tensors, dtype, training)?)?;
    metadata.insert("sshs_model_hash".into(), model_hash);
    metadata.insert("sshs_legacy_hash".into(), legacy_hash);
    tensor_io::serialize(&tensors, dtype, metadata)
}
