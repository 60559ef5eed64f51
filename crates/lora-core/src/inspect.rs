//! What a LoRA file holds, read from its header alone (kohya's `tools/show_metadata.py`
//! and `networks/check_lora_weights.py`): its layout, every module's kind, rank, alpha and
//! kernel, the tensors' dtypes, and the metadata, including what kohya's trainer records
//! (base model, steps, learning rates, the captions' tag counts).
//!
//! No model is needed: modules are named as the file names them, so any LoRA (for any
//! model, with keys this crate could not attach) can be inspected.
//!
//! ```
//! use lora_core::inspect::{inspect, ModuleKind};
//! use lora_core::{AdapterKey, AdapterSet, Component, AdapterFormat, HostTensor, LoraWeights, SaveDtype};
//!
//! let mut set = AdapterSet::new();
//! let down = HostTensor::new(vec![4, 8], vec![0.1; 32]).unwrap();
//! let up = HostTensor::new(vec![16, 4], vec![0.2; 64]).unwrap();
//! let key = AdapterKey::new(Component::Unet, "mid_block.attentions.0.proj_in");
//! set.insert(key, LoraWeights::new(down, up, 2.0, "example").unwrap()).unwrap();
//! let bytes = set.to_bytes(AdapterFormat::Kohya, SaveDtype::F16).unwrap();
//! let info = inspect(&bytes, "example.safetensors".as_ref()).unwrap();
//! assert_eq!(info.format, AdapterFormat::Kohya);
//! let m = &info.modules[0];
//! assert_eq!((m.name.as_str(), m.kind, m.rank, m.alpha), ("lora_unet_mid_block_attentions_0_proj_in", ModuleKind::Lora, Some(4), Some(2.0)));
//! assert_eq!(info.summary(Component::Unet)[0].count, 1);
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use safetensors::tensor::TensorView;

use crate::{tensor_io, AdapterFormat, Component, LoraError, Result};

/// The kind of adapter one module of a file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ModuleKind {
    /// `lora_down` / `lora_up` (`lora_A` / `lora_B`).
    Lora,
    /// A LoRA with DoRA's magnitude (`dora_scale`, `lora_magnitude_vector`).
    Dora,
    /// A LoCon with a Tucker core (`lora_mid`).
    TuckerLora,
    /// LyCORIS LoHa (`hada_*`).
    Loha,
    /// LyCORIS LoKr (`lokr_*`).
    Lokr,
    /// kohya's OFT (`oft_blocks`); its rank is the number of blocks, its alpha the
    /// constraint per output.
    Oft,
    /// LyCORIS' Diag-OFT (`oft_blocks` under a `lora_…` name, maybe `rescale`); its rank is
    /// the block size (LyCORIS' `dim`), its alpha the constraint per output (0: none).
    DiagOft,
    /// LyCORIS' BOFT (`oft_blocks` `[stages, blocks, n, n]` under a `lora_…` name); its
    /// rank is the block size, its alpha the constraint per output (0: none).
    Boft,
    /// LyCORIS' GLoRA (`a1.weight`, `a2.weight`, `b1.weight`, `b2.weight`); its rank is
    /// `a2`'s rows.
    Glora,
    /// LyCORIS' (IA)³ (`weight`, `on_input`): no rank or alpha.
    Ia3,
    /// LyCORIS' full fine-tuning (`diff`, `diff_b`): no rank or alpha.
    Full,
    /// LyCORIS' norm module (`w_norm`, `b_norm`, of `train_norm`): no rank or alpha.
    Norm,
    /// Tensors of no adapter kind this crate knows.
    Other,
}

impl ModuleKind {
    /// A short name for listings (`LoRA`, `DoRA`, `LoCon+Tucker`, `LoHa`, `LoKr`, `other`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Lora => "LoRA",
            Self::Dora => "DoRA",
            Self::TuckerLora => "LoCon+Tucker",
            Self::Loha => "LoHa",
            Self::Lokr => "LoKr",
            Self::Oft => "OFT",
            Self::DiagOft => "Diag-OFT",
            Self::Boft => "BOFT",
            Self::Glora => "GLoRA",
            Self::Ia3 => "(IA)³",
            Self::Full => "full",
            Self::Norm => "norm",
            Self::Other => "other",
        }
    }
}

/// One module of a LoRA file.
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleInfo {
    /// The module's name as the file writes it (`lora_unet_…` or the PEFT path).
    pub name: String,
    /// The model component, from the name's prefix (`None` where the name has none).
    pub component: Option<Component>,
    /// What the module holds.
    pub kind: ModuleKind,
    /// The rank (`None` for a LoKr with two full halves, or an unknown kind).
    pub rank: Option<usize>,
    /// The stored alpha, or in a PEFT-layout file the alpha its diffusers LoRA config
    /// (`lora_adapter_metadata`) gives; `None` where the file has neither (PEFT's default:
    /// alpha = rank).
    pub alpha: Option<f32>,
    /// The kernel of a convolution (`[1, 1]` for 1x1), `None` for a linear layer.
    pub kernel: Option<[usize; 2]>,
    /// The module's tensors: name suffix and shape.
    pub tensors: Vec<(String, Vec<usize>)>,
}

/// The modules of one component that share kind, kernel class, rank and alpha.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// Their kind.
    pub kind: ModuleKind,
    /// Whether they are convolutions with kernels larger than 1x1.
    pub spatial: bool,
    /// Their rank.
    pub rank: Option<usize>,
    /// Their alpha.
    pub alpha: Option<f32>,
    /// How many.
    pub count: usize,
}

/// What [`inspect`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraInfo {
    /// The key layout.
    pub format: AdapterFormat,
    /// Every module, in name order.
    pub modules: Vec<ModuleInfo>,
    /// How many tensors of each dtype (`F16`, `F32`, ...).
    pub dtypes: BTreeMap<String, usize>,
    /// The file's metadata.
    pub metadata: BTreeMap<String, String>,
    /// Textual-inversion embeddings bundled in the file (`bundle_emb.NAME.…`): each name
    /// with its tensors' keys after the name and shapes.
    pub bundled_embeddings: BTreeMap<String, Vec<(String, Vec<usize>)>>,
}

/// The parts of a kohya key after the module name that name an adapter's tensors.
const KOHYA_PARTS: [&str; 28] = [
    "lora_down.weight",
    "lora_up.weight",
    "lora_mid.weight",
    "alpha",
    "dora_scale",
    "hada_w1_a",
    "hada_w1_b",
    "hada_w2_a",
    "hada_w2_b",
    "hada_t1",
    "hada_t2",
    "lokr_w1",
    "lokr_w1_a",
    "lokr_w1_b",
    "lokr_w2",
    "lokr_w2_a",
    "lokr_w2_b",
    "lokr_t2",
    "scalar",
    "diff",
    "w_norm",
    "b_norm",
    "rescale",
    "a1.weight",
    "a2.weight",
    "b1.weight",
    "b2.weight",
    "on_input",
];

/// The parts of a PEFT / diffusers key after the module path.
const PEFT_PARTS: [&str; 11] = [
    // A PEFT model's raw `state_dict()` names the adapter (`default`).
    "lora_A.default.weight",
    "lora_B.default.weight",
    "lora_magnitude_vector.default.weight",
    "lora_A.weight",
    "lora_B.weight",
    "lora_magnitude_vector",
    "lora_magnitude_vector.weight",
    "lora.down.weight",
    "lora.up.weight",
    "alpha",
    "lora.alpha",
];

fn split_key(key: &str, format: AdapterFormat) -> (String, String) {
    let parts: &[&str] = match format {
        AdapterFormat::Kohya => &KOHYA_PARTS,
        AdapterFormat::Peft => &PEFT_PARTS,
    };
    for part in parts {
        if let Some(name) = key.strip_suffix(part).and_then(|k| k.strip_suffix('.')) {
            return (name.to_string(), (*part).to_string());
        }
    }
    // Unknown tensors: the module is everything before the last dot.
    match key.rsplit_once('.') {
        Some((name, part)) => (name.to_string(), part.to_string()),
        None => (key.to_string(), String::new()),
    }
}

fn component_of(name: &str) -> Option<Component> {
    let stripped = name.strip_prefix("base_model.model.").unwrap_or(name);
    if stripped.starts_with("oft_unet_") {
        return Some(Component::Unet);
    }
    if let Some(rest) = stripped.strip_prefix("lora_") {
        return match rest {
            r if r.starts_with("unet_") => Some(Component::Unet),
            r if r.starts_with("te2_") => Some(Component::TextEncoder2),
            r if r.starts_with("te1_") || r.starts_with("te_") => Some(Component::TextEncoder),
            _ => None,
        };
    }
    // PEFT: `unet.`, `text_encoder.`, `text_encoder_2.` (longest first).
    [Component::TextEncoder2, Component::TextEncoder, Component::Unet]
        .into_iter()
        .find(|c| stripped.starts_with(&format!("{}.", c.peft_prefix())))
}

/// Reads a LoRA file's layout, modules and metadata from its bytes; `path` names it in
/// errors. A file that is not safetensors, or holds no LoRA keys, is an error.
pub fn inspect(bytes: &[u8], path: &Path) -> Result<LoraInfo> {
    let format = crate::detect_format(bytes, path)?;
    let (st, metadata) = tensor_io::parse(bytes, path)?;
    let mut dtypes = BTreeMap::new();
    let mut grouped: BTreeMap<String, Vec<(String, TensorView<'_>)>> = BTreeMap::new();
    let mut bundled_embeddings: BTreeMap<String, Vec<(String, Vec<usize>)>> = BTreeMap::new();
    for (key, view) in st.tensors() {
        *dtypes.entry(format!("{:?}", view.dtype())).or_insert(0) += 1;
        if let Some((name, part)) = key.strip_prefix(crate::BUNDLED_EMBEDDING_PREFIX).and_then(|k| k.split_once('.')) {
            bundled_embeddings.entry(name.to_string()).or_default().push((part.to_string(), view.shape().to_vec()));
            continue;
        }
        let (name, part) = split_key(&key, format);
        grouped.entry(name).or_default().push((part, view));
    }
    // kohya's OFT files name text-encoder modules `lora_te_…` too.
    let kohya_oft = metadata.get("ss_network_module").is_some_and(|m| m == "networks.oft");
    // diffusers' LoRA config (PEFT layout): the alphas the loader takes (`format::peft`).
    let peft_configs = match (format, metadata.get(crate::format::peft::ADAPTER_METADATA_KEY)) {
        (AdapterFormat::Peft, Some(json)) => Some(crate::format::peft::PeftConfigs::parse(json, path)?),
        _ => None,
    };
    let mut modules = Vec::with_capacity(grouped.len());
    for (name, tensors) in grouped {
        let mut info = module_info(name, &tensors, kohya_oft, path)?;
        if let (None, Some(rank), Some(component), Some(configs)) = (info.alpha, info.rank, info.component, &peft_configs) {
            let module = info.name.strip_prefix(&format!("{}.", component.peft_prefix())).unwrap_or(&info.name);
            info.alpha = configs.alpha(&crate::AdapterKey::new(component, module), rank);
        }
        modules.push(info);
    }
    Ok(LoraInfo { format, modules, dtypes, metadata: metadata.into_iter().collect(), bundled_embeddings })
}

fn module_info(name: String, tensors: &[(String, TensorView<'_>)], kohya_oft: bool, path: &Path) -> Result<ModuleInfo> {
    let shape = |part: &str| tensors.iter().find(|(p, _)| p == part).map(|(_, v)| v.shape().to_vec());
    let has = |prefix: &str| tensors.iter().any(|(p, _)| p.starts_with(prefix));
    let oft = shape("oft_blocks").map(|s| crate::format::lycoris::oft_algo(&name, s.len(), kohya_oft));
    let kind = if let Some(algo) = oft {
        match algo {
            crate::Algo::Oft => ModuleKind::Oft,
            crate::Algo::Boft => ModuleKind::Boft,
            _ => ModuleKind::DiagOft,
        }
    } else if has("on_input") {
        ModuleKind::Ia3
    } else if shape("diff").is_some() || shape("diff_b").is_some() {
        ModuleKind::Full
    } else if shape("w_norm").is_some() || shape("b_norm").is_some() {
        ModuleKind::Norm
    } else if has("a1.weight") || has("b2.weight") {
        ModuleKind::Glora
    } else if has("hada_") {
        ModuleKind::Loha
    } else if has("lokr_") {
        ModuleKind::Lokr
    } else if has("lora_mid") {
        ModuleKind::TuckerLora
    } else if has("dora_scale") || has("lora_magnitude_vector") {
        ModuleKind::Dora
    } else if has("lora_down") || has("lora_A") || has("lora.down") {
        ModuleKind::Lora
    } else {
        ModuleKind::Other
    };
    let down = shape("lora_down.weight").or_else(|| shape("lora_A.weight")).or_else(|| shape("lora_A.default.weight")).or_else(|| shape("lora.down.weight"));
    // The rank is the leading dimension; a broken file's 0-d tensor has none (no rank shown).
    let leading = |s: Vec<usize>| s.first().copied();
    let rank = match kind {
        ModuleKind::Loha => shape("hada_w1_b").and_then(leading),
        // The rank the loader takes (`format::lycoris`): lokr_w2's where both halves are low-rank.
        ModuleKind::Lokr => shape("lokr_w2_b").or_else(|| shape("lokr_w1_b")).and_then(leading),
        ModuleKind::Oft => shape("oft_blocks").and_then(leading),
        ModuleKind::DiagOft => shape("oft_blocks").and_then(|s| s.get(1).copied()),
        ModuleKind::Boft => shape("oft_blocks").and_then(|s| s.get(2).copied()),
        ModuleKind::Glora => shape("a2.weight").and_then(leading),
        ModuleKind::Other | ModuleKind::Full | ModuleKind::Norm => None,
        _ => down.clone().and_then(leading),
    };
    // A convolution's kernel: LoCon's down (or Tucker core), LoHa / LoKr cores or full halves.
    let kernel_of = |s: Vec<usize>| (s.len() == 4).then(|| [s[2], s[3]]);
    let kernel = match kind {
        ModuleKind::TuckerLora => shape("lora_mid.weight").and_then(kernel_of),
        ModuleKind::Loha => shape("hada_t1").and_then(kernel_of).or_else(|| shape("hada_w1_b").and_then(kernel_of)),
        ModuleKind::Lokr => shape("lokr_t2").and_then(kernel_of).or_else(|| shape("lokr_w2").and_then(kernel_of)),
        ModuleKind::Glora => shape("b2.weight").and_then(kernel_of),
        ModuleKind::Full => shape("diff").and_then(kernel_of),
        _ => down.and_then(kernel_of),
    };
    let alpha = match tensors.iter().find(|(p, _)| p == "alpha" || p == "lora.alpha") {
        Some((_, view)) => {
            let value = tensor_io::decode_number(view, &format!("{name}.alpha"), path)?;
            match value.data.as_slice() {
                [a] => Some(*a),
                _ => return Err(LoraError::Data(format!("{}: `{name}.alpha` holds {} values, expected one", path.display(), value.data.len()))),
            }
        }
        None => None,
    };
    Ok(ModuleInfo {
        component: component_of(&name),
        name,
        kind,
        rank,
        alpha,
        kernel,
        tensors: tensors.iter().map(|(p, v)| (p.clone(), v.shape().to_vec())).collect(),
    })
}

impl LoraInfo {
    /// The modules of `component`, grouped by kind, kernel class (larger than 1x1 or not),
    /// rank and alpha, largest group first.
    pub fn summary(&self, component: Component) -> Vec<Group> {
        let mut groups: Vec<Group> = Vec::new();
        for m in self.modules.iter().filter(|m| m.component == Some(component)) {
            let spatial = m.kernel.is_some_and(|k| k != [1, 1]);
            match groups.iter_mut().find(|g| g.kind == m.kind && g.spatial == spatial && g.rank == m.rank && g.alpha == m.alpha) {
                Some(g) => g.count += 1,
                None => groups.push(Group { kind: m.kind, spatial, rank: m.rank, alpha: m.alpha, count: 1 }),
            }
        }
        groups.sort_by_key(|g| std::cmp::Reverse(g.count));
        groups
    }

    /// Modules whose name carries no component prefix.
    pub fn unassigned(&self) -> usize {
        self.modules.iter().filter(|m| m.component.is_none()).count()
    }

    /// kohya's caption tag counts (`ss_tag_frequency`, one table per dataset folder),
    /// summed over the folders, most frequent first (ties by tag). Empty where the file has
    /// none or it is not valid JSON.
    pub fn tag_frequency(&self) -> Vec<(String, u64)> {
        let Some(raw) = self.metadata.get("ss_tag_frequency") else {
            return vec![];
        };
        let Ok(serde_json::Value::Object(folders)) = serde_json::from_str::<serde_json::Value>(raw) else {
            return vec![];
        };
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        for tags in folders.values() {
            if let serde_json::Value::Object(tags) = tags {
                for (tag, n) in tags {
                    // Counts come from the file: a hostile one must not overflow the sum.
                    let count = counts.entry(tag.trim().to_string()).or_insert(0);
                    *count = count.saturating_add(n.as_u64().unwrap_or(0));
                }
            }
        }
        let mut sorted: Vec<(String, u64)> = counts.into_iter().collect();
        sorted.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        sorted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_into_modules_and_components() {
        assert_eq!(split_key("lora_unet_a_b.lora_down.weight", AdapterFormat::Kohya), ("lora_unet_a_b".into(), "lora_down.weight".into()));
        assert_eq!(split_key("lora_te2_x.hada_w1_a", AdapterFormat::Kohya), ("lora_te2_x".into(), "hada_w1_a".into()));
        assert_eq!(split_key("unet.down_blocks.0.to_q.lora_A.weight", AdapterFormat::Peft), ("unet.down_blocks.0.to_q".into(), "lora_A.weight".into()));
        assert_eq!(component_of("lora_te1_text_model_x"), Some(Component::TextEncoder));
        assert_eq!(component_of("lora_te_text_model_x"), Some(Component::TextEncoder));
        assert_eq!(component_of("lora_te2_text_model_x"), Some(Component::TextEncoder2));
        assert_eq!(component_of("text_encoder_2.text_model.x"), Some(Component::TextEncoder2));
        assert_eq!(component_of("unet.mid_block.x"), Some(Component::Unet));
        assert_eq!(component_of("transformer.x"), None);
    }

    #[test]
    fn tag_frequency_sums_the_folders() {
        let mut info = LoraInfo { format: AdapterFormat::Kohya, modules: vec![], dtypes: BTreeMap::new(), metadata: BTreeMap::new(), bundled_embeddings: BTreeMap::new() };
        assert!(info.tag_frequency().is_empty());
        info.metadata.insert("ss_tag_frequency".into(), r#"{"10_a": {"mystyle": 10, " red": 2}, "5_b": {"mystyle": 5, "blue": 2}}"#.into());
        assert_eq!(info.tag_frequency(), vec![("mystyle".into(), 15), ("blue".into(), 2), ("red".into(), 2)]);
        info.metadata.insert("ss_tag_frequency".into(), "not json".into());
        assert!(info.tag_frequency().is_empty());
    }
}
