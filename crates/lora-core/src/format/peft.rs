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
    // A PEFT model's raw `state_dict()` names the adapter (`default` unless named);
    // `get_peft_model_state_dict`, which diffusers saves through, drops the name.
    (".lora_A.default.weight", Role::Down),
    (".lora_B.default.weight", Role::Up),
    (".lora_magnitude_vector.default.weight", Role::Magnitude),
    // diffusers' attention-processor files (before PEFT): `….attn1.processor.to_q_lora.down.weight`,
    // and a text encoder's `….self_attn.to_q_lora.down.weight` or
    // `….self_attn.q_proj.lora_linear_layer.down.weight` ([`module_path`] maps them).
    ("_lora.down.weight", Role::Down),
    ("_lora.up.weight", Role::Up),
    (".lora_linear_layer.down.weight", Role::Down),
    (".lora_linear_layer.up.weight", Role::Up),
];

/// The module path of a name in diffusers' attention-processor layout, as diffusers
/// converts it (`UNET_TO_DIFFUSERS`, `DIFFUSERS_OLD_TO_PEFT`): without the `processor`
/// step, the UNet's `to_out` as `to_out.0`, a text encoder's `to_q` / `to_k` / `to_v` /
/// `to_out` as its `q_proj` / `k_proj` / `v_proj` / `out_proj`. Other paths are returned as
/// they are (no module of the current layout ends in `to_out` or in a CLIP `to_q`).
fn module_path(component: Component, path: &str) -> String {
    let path = path.replace(".processor.", ".");
    let Some((parent, last)) = path.rsplit_once('.') else { return path };
    let renamed = match (component, last) {
        (Component::Unet, "to_out") => "to_out.0",
        (Component::TextEncoder | Component::TextEncoder2, "to_q") => "q_proj",
        (Component::TextEncoder | Component::TextEncoder2, "to_k") => "k_proj",
        (Component::TextEncoder | Component::TextEncoder2, "to_v") => "v_proj",
        (Component::TextEncoder | Component::TextEncoder2, "to_out") => "out_proj",
        _ => return path,
    };
    format!("{parent}.{renamed}")
}

/// Splits `unet.<path>` / `text_encoder.<path>` / `text_encoder_2.<path>`; PEFT's own
/// `base_model.model.<path>` prefix is resolved through the index, else by the path's shape.
fn parse_name(name: &str, index: &ModuleIndex) -> Option<AdapterKey> {
    for component in [Component::TextEncoder2, Component::TextEncoder, Component::Unet] {
        if let Some(path) = name.strip_prefix(component.peft_prefix()).and_then(|r| r.strip_prefix('.')) {
            return Some(AdapterKey::new(component, module_path(component, path)));
        }
    }
    // A UNet's `save_attn_procs` file names its modules without the `unet.` prefix.
    if name.contains(".processor.") && ["down_blocks.", "mid_block.", "up_blocks."].iter().any(|p| name.starts_with(p)) {
        return Some(AdapterKey::new(Component::Unet, module_path(Component::Unet, name)));
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
    let (parts, mut unknown, mut metadata, bundled) = group(bytes, path, SUFFIXES)?;
    // Taken out of the set's metadata once applied: the alphas are in the weights now, and
    // a file written from the set (scale folded into B) must not carry them a second time.
    let configs = match metadata.remove(ADAPTER_METADATA_KEY) {
        Some(json) => Some(PeftConfigs::parse(&json, path)?),
        None => None,
    };
    let mut set = AdapterSet::new();
    set.metadata = metadata.into_iter().collect();
    set.bundled_embeddings = bundled;
    // Module → the file name that gave it, for the error when a second name gives it too.
    let mut names: HashMap<AdapterKey, String> = HashMap::new();
    for (name, part) in parts {
        let key = match parse_name(&name, index) {
            Some(k) if index.is_empty() || index.contains(&k) => k,
            _ => {
                unknown.extend(part.keys);
                continue;
            }
        };
        let has_alpha = part.alpha.is_some();
        let mut weights = finish(part, &name, path, ("lora_A", "lora_B"), AdapterFormat::Peft)?;
        // A stored `.alpha` tensor is the module's own; otherwise the config's, if any.
        if let (false, Some(alpha)) = (has_alpha, configs.as_ref().and_then(|c| c.alpha(&key, weights.rank()))) {
            weights.alpha = alpha;
        }
        if let Some(first) = names.insert(key.clone(), name.clone()) {
            // `unet.X` beside `base_model.model.X`: one module named twice.
            return Err(crate::LoraError::DuplicateModule { path: path.to_path_buf(), first, second: name, module: key.to_string() });
        }
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

/// diffusers' safetensors metadata key (`LORA_ADAPTER_METADATA_KEY`) for the PEFT
/// `LoraConfig` each component was trained with, as one JSON object: `unet.lora_alpha`,
/// `unet.r`, `unet.alpha_pattern`, `text_encoder.use_rslora`, ... (`save_lora_weights`), or
/// without the component prefix (one model's `save_lora_adapter`).
pub(crate) const ADAPTER_METADATA_KEY: &str = "lora_adapter_metadata";

/// The scaling part of one component's PEFT `LoraConfig`: PEFT scales an adapter by
/// `alpha / r` (`alpha / √r` with rsLoRA), `alpha` being the first `alpha_pattern` entry
/// that matches the module's path, else `lora_alpha`; with no config, alpha = rank.
#[derive(Debug, Default)]
struct PeftConfig {
    lora_alpha: Option<f32>,
    /// `alpha_pattern`: PEFT matches `(.*\.)?(PATTERN)$` against the module path.
    patterns: Vec<(regex::Regex, f32)>,
    rslora: bool,
}

/// The configs of a file's `lora_adapter_metadata`, per component.
#[derive(Debug)]
pub(crate) struct PeftConfigs {
    per_component: Vec<(Component, PeftConfig)>,
    /// Entries without a component prefix: they hold for every component.
    shared: Option<PeftConfig>,
}

impl PeftConfigs {
    /// Parses the JSON of the metadata entry; what it cannot use is an error naming `path`.
    pub(crate) fn parse(json: &str, path: &Path) -> Result<Self> {
        let bad = |entry: &str, reason: String| crate::LoraError::BadMetadata {
            path: path.to_path_buf(),
            key: if entry.is_empty() { ADAPTER_METADATA_KEY.to_string() } else { format!("{ADAPTER_METADATA_KEY}: {entry}") },
            reason,
        };
        let value: serde_json::Value = serde_json::from_str(json).map_err(|e| bad("", format!("expected a JSON object (a PEFT LoraConfig per component): {e}")))?;
        let serde_json::Value::Object(map) = value else {
            return Err(bad("", "expected a JSON object (a PEFT LoraConfig per component)".into()));
        };
        let mut per_component = Vec::new();
        for component in Component::ALL {
            let prefix = format!("{}.", component.peft_prefix());
            let fields: Vec<(&str, &serde_json::Value)> = map.iter().filter_map(|(k, v)| k.strip_prefix(&prefix).map(|f| (f, v))).collect();
            if !fields.is_empty() {
                per_component.push((component, PeftConfig::parse(&fields, &prefix, &bad)?));
            }
        }
        let bare: Vec<(&str, &serde_json::Value)> = map.iter().filter(|(k, _)| !k.contains('.')).map(|(k, v)| (k.as_str(), v)).collect();
        let shared = if bare.is_empty() { None } else { Some(PeftConfig::parse(&bare, "", &bad)?) };
        Ok(Self { per_component, shared })
    }

    /// The alpha (in this crate's `alpha / rank` convention) of the module at `key` of
    /// `rank`, where the config sets one (else alpha = rank, PEFT's default).
    pub(crate) fn alpha(&self, key: &AdapterKey, rank: usize) -> Option<f32> {
        let config = self.per_component.iter().find(|(c, _)| *c == key.component).map(|(_, c)| c).or(self.shared.as_ref());
        config.and_then(|c| c.alpha(&key.path, rank))
    }
}

impl PeftConfig {
    /// Reads the fields this crate needs (`lora_alpha`, `alpha_pattern`, `use_rslora`) from
    /// one component's entries; `prefix` names them in errors. Other fields (`r`,
    /// `rank_pattern`, `target_modules`, ...) are left: the tensors' shapes give the ranks.
    fn parse(fields: &[(&str, &serde_json::Value)], prefix: &str, bad: &dyn Fn(&str, String) -> crate::LoraError) -> Result<Self> {
        let number = |name: &str, v: &serde_json::Value| -> Result<f32> {
            match v.as_f64() {
                Some(x) if x.is_finite() && x >= 0.0 && x <= f32::MAX as f64 => Ok(x as f32),
                _ => Err(bad(name, format!("expected a finite number >= 0, got {v}"))),
            }
        };
        let mut config = PeftConfig::default();
        for &(field, value) in fields {
            let name = format!("{prefix}{field}");
            match field {
                "lora_alpha" => config.lora_alpha = Some(number(&name, value)?),
                "use_rslora" => config.rslora = value.as_bool().ok_or_else(|| bad(&name, format!("expected true or false, got {value}")))?,
                "alpha_pattern" => {
                    let serde_json::Value::Object(patterns) = value else {
                        return Err(bad(&name, format!("expected an object of module patterns and alphas, got {value}")));
                    };
                    for (pattern, alpha) in patterns {
                        let entry = format!("{name}.{pattern}");
                        let re = regex::Regex::new(&format!(r"^(?:.*\.)?(?:{pattern})$")).map_err(|e| bad(&entry, format!("not a regular expression PEFT can match: {e}")))?;
                        config.patterns.push((re, number(&entry, alpha)?));
                    }
                }
                _ => {}
            }
        }
        Ok(config)
    }

    fn alpha(&self, path: &str, rank: usize) -> Option<f32> {
        let alpha = self.patterns.iter().find(|(re, _)| re.is_match(path)).map(|&(_, a)| a).or(self.lora_alpha)?;
        // rsLoRA's `alpha / √r` as an alpha over the rank.
        Some(if self.rslora { alpha * (rank as f32).sqrt() } else { alpha })
    }
}

pub(super) fn write(set: &AdapterSet, dtype: SaveDtype) -> Result<Vec<u8>> {
    // PEFT files carry no alpha and loaders assume alpha = rank, so the scale is folded
    // into B: ΔW stays exactly what it was.
    if let Some((key, w)) = set.iter().find(|(_, w)| w.stands_alone()) {
        return Err(w.no_plain_form(&key.to_string(), "written in the diffusers / PEFT layout (PEFT's OFT is another method); keep it in kohya's"));
    }
    // diffusers' `load_lora_weights` refuses a file with any key that is no LoRA's, so
    // bundled embeddings would make the whole file unreadable where this layout is used.
    if let Some(name) = set.bundled_embeddings.keys().next() {
        return Err(crate::LoraError::Unsupported(format!(
            "embeddings bundled in the set (`{BUNDLED}{name}`) cannot be written in the diffusers / PEFT layout: diffusers refuses a LoRA file holding them; write the embeddings apart (`trainer unbundle-embeddings`) and the LoRA without them, or keep kohya's layout (A1111 reads its bundles)",
            BUNDLED = super::BUNDLED_EMBEDDING_PREFIX
        )));
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
    let mut metadata: HashMap<String, String> = set
        .metadata
        .iter()
        // A source file's LoRA config: the scales are folded into B here (alpha = rank).
        // Its hashes (`sshs_*`, of a kohya file's tensors) do not hash this file's.
        .filter(|(k, _)| !k.starts_with("ss_network") && !k.starts_with("sshs_") && k.as_str() != ADAPTER_METADATA_KEY)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    metadata.insert("format".into(), "pt".into());
    if let Some(config) = adapter_metadata(&folded) {
        metadata.insert(ADAPTER_METADATA_KEY.into(), config);
    }
    tensor_io::serialize(&tensors, dtype, metadata)
}

/// diffusers' `lora_adapter_metadata` for a set whose scales are folded into B: per
/// component, the PEFT `LoraConfig` fields that give every module the scale 1 (alpha =
/// rank): `r` and `lora_alpha` the most common rank, each module of another rank in
/// `rank_pattern` and `alpha_pattern` (full module paths, as diffusers writes them),
/// `target_modules` every module, and `use_dora`. diffusers 0.34 and newer build the
/// adapter's config from it; without it, diffusers before 0.40 took the first module's
/// rank as every module's alpha, so a set of mixed ranks (a LoCon's `conv_rank`, dynamic
/// resizes, block ranks) loaded at the wrong strengths.
fn adapter_metadata(folded: &[(AdapterKey, LoraWeights)]) -> Option<String> {
    let mut config = serde_json::Map::new();
    for component in Component::ALL {
        let modules: Vec<(&str, &LoraWeights)> = folded.iter().filter(|(k, _)| k.component == component).map(|(k, w)| (k.path.as_str(), w)).collect();
        if modules.is_empty() {
            continue;
        }
        let mut counts: std::collections::BTreeMap<usize, usize> = Default::default();
        for (_, w) in &modules {
            *counts.entry(w.rank()).or_default() += 1;
        }
        // The most common rank (the smallest of equally common ones).
        let r = counts.iter().max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0))).map_or(1, |(&r, _)| r);
        let pattern: serde_json::Map<String, serde_json::Value> = modules.iter().filter(|(_, w)| w.rank() != r).map(|(p, w)| (p.to_string(), w.rank().into())).collect();
        let prefix = component.peft_prefix();
        let mut targets: Vec<&str> = modules.iter().map(|(p, _)| *p).collect();
        targets.sort_unstable();
        config.insert(format!("{prefix}.r"), r.into());
        config.insert(format!("{prefix}.lora_alpha"), r.into());
        config.insert(format!("{prefix}.rank_pattern"), pattern.clone().into());
        config.insert(format!("{prefix}.alpha_pattern"), pattern.into());
        config.insert(format!("{prefix}.target_modules"), targets.into());
        config.insert(format!("{prefix}.use_dora"), modules.iter().any(|(_, w)| w.magnitude.is_some()).into());
    }
    (!config.is_empty()).then(|| serde_json::Value::Object(config).to_string())
}
