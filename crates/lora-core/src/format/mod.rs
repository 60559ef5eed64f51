//! Adapter files: the kohya / A1111 / ComfyUI layout and the diffusers / PEFT layout.
//!
//! See `docs/lora-formats.md` in the repository for both layouts with worked key examples.

mod kohya;
pub(crate) mod lycoris;
pub(crate) mod peft;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::tensor_io::{self, SaveDtype};
use crate::{AdapterSet, HostTensor, LoraError, LoraWeights, ModuleIndex, Result};

/// Key prefix of textual-inversion embeddings bundled in a LoRA file (A1111's
/// `bundle_emb.NAME.…`): the readers leave these keys alone.
pub const BUNDLED_EMBEDDING_PREFIX: &str = "bundle_emb.";

/// How many unknown keys an error message lists.
const SHOW_UNKNOWN: usize = 5;

/// An adapter file layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AdapterFormat {
    /// kohya sd-scripts / A1111 / ComfyUI: `lora_unet_<path_with_underscores>.lora_down.weight`,
    /// `.lora_up.weight`, `.alpha`.
    Kohya,
    /// diffusers / PEFT: `unet.<dotted.path>.lora_A.weight`, `.lora_B.weight`, no alpha.
    Peft,
}

impl std::str::FromStr for AdapterFormat {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "kohya" | "a1111" | "comfyui" => Ok(Self::Kohya),
            "peft" | "diffusers" => Ok(Self::Peft),
            other => Err(format!("unknown adapter format `{other}`, expected kohya or peft")),
        }
    }
}

/// What to do with keys that do not name a module of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReadOptions {
    /// Skip unknown keys and list them in [`ReadReport::skipped`] instead of failing.
    pub lenient: bool,
}

/// What reading a file found besides the adapters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadReport {
    /// The detected layout.
    pub format: AdapterFormat,
    /// Keys skipped in lenient mode.
    pub skipped: Vec<String>,
}

/// One adapter's tensors as collected from a file before validation.
#[derive(Default)]
struct Parts {
    down: Option<HostTensor>,
    up: Option<HostTensor>,
    alpha: Option<f32>,
    magnitude: Option<HostTensor>,
    /// LoCon's Tucker core (`lora_mid`, kohya layout).
    mid: Option<HostTensor>,
    /// LyCORIS LoHa / LoKr tensors (kohya layout).
    lycoris: lycoris::Tensors,
    keys: Vec<String>,
}

/// Which tensor of an adapter a key holds.
#[derive(Clone, Copy, PartialEq)]
enum Role {
    Down,
    Up,
    Alpha,
    /// DoRA's magnitude (`dora_scale`, `lora_magnitude_vector`).
    Magnitude,
    /// LoCon's Tucker core (`lora_mid`).
    Mid,
    /// A LyCORIS LoHa / LoKr tensor.
    Lycoris(lycoris::Part),
}

/// Splits `key` into (module name, role) using `suffixes`.
fn split_key<'a>(key: &'a str, suffixes: &[(&str, Role)]) -> Option<(&'a str, Role)> {
    suffixes
        .iter()
        .find_map(|(suffix, role)| key.strip_suffix(suffix).map(|name| (name, *role)))
}

/// A file's tensors grouped per module, the keys with no known suffix, and the metadata.
/// Per-module parts, keys of no known role, header metadata, bundled embeddings.
type Grouped = (BTreeMap<String, Parts>, Vec<String>, HashMap<String, String>, BTreeMap<String, HostTensor>);

/// Groups a file's tensors into per-module parts; keys with no known suffix are returned apart.
fn group(bytes: &[u8], path: &Path, suffixes: &[(&str, Role)]) -> Result<Grouped> {
    let (st, metadata) = tensor_io::parse(bytes, path)?;
    let mut parts: BTreeMap<String, Parts> = BTreeMap::new();
    let mut stray = Vec::new();
    let mut bundled = BTreeMap::new();
    for (key, view) in st.iter() {
        if let Some(rest) = key.strip_prefix(BUNDLED_EMBEDDING_PREFIX) {
            // Textual-inversion embeddings riding along (sd-model reads them), not adapters.
            bundled.insert(rest.to_string(), tensor_io::decode_finite(&view, key, path)?);
            continue;
        }
        let Some((name, role)) = split_key(key, suffixes) else {
            stray.push(key.to_string());
            continue;
        };
        // LyCORIS writes an alpha of 0 as the rank, an integer.
        let number = matches!(role, Role::Alpha | Role::Lycoris(lycoris::Part::Ia3OnInput));
        let tensor = if number { tensor_io::finite(tensor_io::decode_number(&view, key, path)?, key, path)? } else { tensor_io::decode_finite(&view, key, path)? };
        let entry = parts.entry(name.to_string()).or_default();
        // Two keys for one tensor of a module (`lora_A.weight` beside `lora.down.weight`):
        // which one a loader takes would depend on the file's order, so neither is taken.
        if let Some(first) = entry.keys.iter().find(|k| split_key(k, suffixes).is_some_and(|(_, r)| r == role)) {
            return Err(LoraError::BadTensor {
                path: path.to_path_buf(),
                key: key.to_string(),
                reason: format!("`{first}` holds the same tensor of module `{name}`; keep one of the two"),
            });
        }
        entry.keys.push(key.to_string());
        match role {
            Role::Down => entry.down = Some(tensor),
            Role::Up => entry.up = Some(tensor),
            Role::Magnitude => entry.magnitude = Some(tensor),
            Role::Mid => entry.mid = Some(tensor),
            Role::Lycoris(part) => entry.lycoris.insert(part, tensor),
            Role::Alpha => {
                if tensor.numel() != 1 {
                    return Err(LoraError::BadTensor {
                        path: path.to_path_buf(),
                        key: key.to_string(),
                        reason: format!("alpha must be a scalar, got shape {:?}", tensor.shape),
                    });
                }
                entry.alpha = Some(tensor.data[0]);
            }
        }
    }
    Ok((parts, stray, metadata, bundled))
}

/// The set's bundled embeddings under their file keys, to write beside the adapters.
fn bundled_tensors(set: &AdapterSet) -> impl Iterator<Item = (String, &HostTensor)> {
    set.bundled_embeddings.iter().map(|(k, t)| (format!("{BUNDLED_EMBEDDING_PREFIX}{k}"), t))
}

/// Turns collected parts into validated weights; `missing` names the up/down tensors in errors.
fn finish(parts: Parts, name: &str, path: &Path, missing: (&str, &str), format: AdapterFormat) -> Result<LoraWeights> {
    if !parts.lycoris.is_empty() {
        return finish_lycoris(parts, name, path);
    }
    let (down, up) = match (parts.down, parts.up) {
        (Some(d), Some(u)) => (d, u),
        (None, _) => {
            return Err(LoraError::IncompletePair {
                path: path.to_path_buf(),
                key: name.to_string(),
                missing: missing.0.to_string(),
            })
        }
        (_, None) => {
            return Err(LoraError::IncompletePair {
                path: path.to_path_buf(),
                key: name.to_string(),
                missing: missing.1.to_string(),
            })
        }
    };
    let bad = |reason: String| LoraError::BadTensor {
        path: path.to_path_buf(),
        key: name.to_string(),
        reason,
    };
    let rank = down.shape.first().copied().unwrap_or(0) as f32;
    let alpha = parts.alpha.unwrap_or(rank);
    // LoCon's Tucker form: `lora_mid` folded into a `lora_down` with the kernel, the
    // convolution LoRA of the same update, beside the file's own tensors (kept to train
    // on and to write back as they were).
    let (down, tucker) = match parts.mid {
        Some(mid) => {
            let folded = lycoris::tucker_core(&mid, &down).map_err(|e| bad(format!("`lora_mid`: {e}")))?;
            // `tucker_core` checked both: mid `[r, r, kh, kw]`, down `[r, in, 1, 1]`.
            let shape = vec![mid.shape[0], down.shape[1], mid.shape[2], mid.shape[3]];
            let folded = HostTensor::new(shape, folded.data).map_err(|e| bad(format!("`lora_mid`: {e}")))?;
            let tensors = vec![("lora_down.weight".to_string(), down), ("lora_mid.weight".to_string(), mid), ("lora_up.weight".to_string(), up.clone())];
            (folded, Some(crate::LycorisWeights { algo: crate::Algo::Lora, tensors, alpha }))
        }
        None => (down, None),
    };
    let magnitude = parts.magnitude.map(|m| output_magnitude(m, up.shape.first().copied().unwrap_or(0), format)).transpose().map_err(bad)?;
    let weights = LoraWeights {
        down,
        up,
        alpha,
        magnitude,
        lycoris: tucker,
    };
    weights.validate(name).map_err(|e| bad(e.to_string()))?;
    Ok(weights)
}

/// A LyCORIS LoHa / LoKr module as the LoRA with its update (see [`lycoris`]), with its
/// DoRA magnitude if any.
fn finish_lycoris(parts: Parts, name: &str, path: &Path) -> Result<LoraWeights> {
    let bad = |reason: String| LoraError::BadTensor {
        path: path.to_path_buf(),
        key: name.to_string(),
        reason,
    };
    if parts.down.is_some() || parts.up.is_some() || parts.mid.is_some() {
        return Err(bad("the module has both LoRA (`lora_down` / `lora_up` / `lora_mid`) and LyCORIS tensors".into()));
    }
    let weights = parts.lycoris.to_lora(parts.alpha, name, path)?;
    match parts.magnitude {
        Some(m) => {
            let m = output_magnitude(m, weights.out_features(), AdapterFormat::Kohya).map_err(bad)?;
            weights.with_magnitude(m, name).map_err(|e| bad(e.to_string()))
        }
        None => Ok(weights),
    }
}

/// A DoRA magnitude from a file as `[out]`: PEFT's `[out]` (linear) or `[1, out, 1, 1]`
/// (conv), LyCORIS' `[out, 1]` / `[out, 1, 1, 1]` (norms over each output's inputs, also in
/// diffusers' conversions of such files). LyCORIS' other layout (`wd_on_out = False`:
/// `[1, in]` / `[1, in, 1, 1]`, norms over each input's outputs) is a different
/// decomposition and an error. Only `[1, c, 1, 1]` is ambiguous, PEFT's for `c` outputs and
/// LyCORIS' for `c` inputs: PEFT-layout files read it as PEFT's.
fn output_magnitude(m: HostTensor, out: usize, format: AdapterFormat) -> std::result::Result<HostTensor, String> {
    let leading = m.shape.first() == Some(&out) && m.shape[1..].iter().all(|&d| d == 1);
    let peft_conv = m.shape == [1, out, 1, 1];
    if leading || (format == AdapterFormat::Peft && peft_conv) {
        return Ok(HostTensor { shape: vec![out], data: m.data });
    }
    if m.shape.first() == Some(&1) && m.shape.len() > 1 {
        return Err(format!(
            "DoRA magnitude of shape {:?} is per input feature (LyCORIS' `wd_on_out = False`), which is not supported; expected [{out}] or [{out}, 1]",
            m.shape
        ));
    }
    Err(format!("DoRA magnitude must be [{out}] or [{out}, 1] (one value per output), got {:?}", m.shape))
}

/// Fails in strict mode when anything is unknown; otherwise reports the skipped keys.
fn settle_unknown(mut unknown: Vec<String>, path: &Path, options: ReadOptions) -> Result<Vec<String>> {
    unknown.sort();
    if unknown.is_empty() || options.lenient {
        return Ok(unknown);
    }
    Err(LoraError::UnknownKeys {
        path: path.to_path_buf(),
        count: unknown.len(),
        first: unknown.into_iter().take(SHOW_UNKNOWN).collect(),
    })
}

/// Guesses the layout from the tensor names.
pub fn detect_format(bytes: &[u8], path: &Path) -> Result<AdapterFormat> {
    let (st, _) = tensor_io::parse(bytes, path)?;
    let names = st.names();
    if names.is_empty() {
        return Err(LoraError::UnknownFormat {
            path: path.to_path_buf(),
            reason: "the file holds no tensors".into(),
        });
    }
    // kohya's OFT names the UNet's modules `oft_unet_…`; ComfyUI's own files name them by
    // state-dict path (`diffusion_model.…`), with kohya's tensor names.
    let comfy = |n: &str| kohya::COMFY_PREFIXES.iter().any(|(p, _)| n.starts_with(p));
    let kohya = names.iter().any(|n| n.starts_with("lora_unet_") || n.starts_with("lora_te") || n.starts_with("oft_unet_") || comfy(n));
    // diffusers' attention-processor files: `….processor.to_q_lora.down.weight`, and
    // `….q_proj.lora_linear_layer.down.weight` for text encoders.
    let peft = names.iter().any(|n| {
        n.contains(".lora_A.") || n.contains(".lora_B.") || n.contains(".lora.down.") || n.contains("_lora.down.") || n.contains(".lora_linear_layer.")
    });
    match (kohya, peft) {
        (true, false) => Ok(AdapterFormat::Kohya),
        (false, true) => Ok(AdapterFormat::Peft),
        (true, true) => Err(LoraError::UnknownFormat {
            path: path.to_path_buf(),
            reason: "it mixes kohya (`lora_unet_...`) and PEFT (`...lora_A...`) keys".into(),
        }),
        (false, false) => Err(LoraError::UnknownFormat {
            path: path.to_path_buf(),
            reason: format!("no LoRA keys; first key is `{}`", names[0]),
        }),
    }
}

impl AdapterSet {
    /// Reads an adapter file of either layout (detected from its keys).
    ///
    /// Kohya keys are resolved through `index` (the model's module paths, from
    /// [`crate::sites::add_to_index`]: kohya's `lora_unet_down_blocks_0_...` names lose the
    /// dots, so only the model can tell where they belong). PEFT keys carry the dotted path
    /// and are checked against `index` unless it is empty.
    pub fn load(path: impl AsRef<Path>, index: &ModuleIndex, options: ReadOptions) -> Result<(Self, ReadReport)> {
        let path = path.as_ref();
        let bytes = tensor_io::read_file(path)?;
        Self::from_bytes(&bytes, path, index, options)
    }

    /// Like [`AdapterSet::load`] for a buffer; `path` only names it in errors.
    pub fn from_bytes(
        bytes: &[u8],
        path: &Path,
        index: &ModuleIndex,
        options: ReadOptions,
    ) -> Result<(Self, ReadReport)> {
        match detect_format(bytes, path)? {
            AdapterFormat::Kohya => kohya::read(bytes, path, index, options).map_err(|e| match e {
                // Every key is unknown to an empty index: say what is missing.
                LoraError::UnknownKeys { path, .. } if index.is_empty() => LoraError::InvalidConfig(format!(
                    "{}: kohya keys (`lora_unet_…`) drop the dots of module paths, so reading them needs the model's paths, but the module index is empty: fill it from the model with lora_core::sites::add_to_index",
                    path.display()
                )),
                other => other,
            }),
            AdapterFormat::Peft => peft::read(bytes, path, index, options),
        }
    }

    /// Serialises the set in `format`, with tensors in `dtype`.
    pub fn to_bytes(&self, format: AdapterFormat, dtype: SaveDtype) -> Result<Vec<u8>> {
        match format {
            AdapterFormat::Kohya => kohya::write(self, dtype),
            AdapterFormat::Peft => peft::write(self, dtype),
        }
    }

    /// Writes the set to `path` atomically (a temp file renamed over the target).
    pub fn save(&self, path: impl AsRef<Path>, format: AdapterFormat, dtype: SaveDtype) -> Result<()> {
        let bytes = self.to_bytes(format, dtype)?;
        tensor_io::write_atomic(path.as_ref(), &bytes)
    }
}

