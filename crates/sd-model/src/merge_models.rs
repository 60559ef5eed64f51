//! Merging checkpoints tensor by tensor (kohya's `tools/merge_models.py`, A1111's
//! checkpoint merger): `Σ ratioᵢ · Wᵢ` over single-file checkpoints of one architecture.
//!
//! A weighted average takes ratios summing to 1 (`0.5`, `0.5`); A1111's *add difference*
//! `A + m·(B − C)` is the ratios `1`, `m`, `−m`. As in kohya's script: the text encoder's
//! older key layout (`cond_stage_model.transformer.encoder.…`, without `text_model.`) is
//! read as the newer one and written so; a key of the first model that another model lacks
//! takes the first model's value in that model's place (with a negative ratio, an add
//! difference, the key is the first model's value as it is: `A + m·(A − C)` would be no
//! model's weights); keys not in the first model are
//! left out (and reported); with `unet_only` the VAE and the text encoders are the first
//! model's. Non-float tensors (position ids) are the first model's. Tensors keep the first
//! model's dtype unless one is asked for, and the first model's header metadata is kept.
//! The output is written one tensor at a time: memory holds the inputs' maps and one tensor.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use lora_core::tensor_io::{decode_bytes, write_streamed, SaveDtype, StreamedTensor};
use safetensors::tensor::Dtype;

use crate::load::WeightFile;
use crate::{Result, SdModelError};

/// kohya's text-encoder key replacements (older SD1 exports have no `text_model.`).
const TEXT_ENCODER_KEYS: [(&str, &str); 3] = [
    ("cond_stage_model.transformer.embeddings.", "cond_stage_model.transformer.text_model.embeddings."),
    ("cond_stage_model.transformer.encoder.", "cond_stage_model.transformer.text_model.encoder."),
    ("cond_stage_model.transformer.final_layer_norm.", "cond_stage_model.transformer.text_model.final_layer_norm."),
];

fn normalized(key: &str) -> String {
    for (from, to) in TEXT_ENCODER_KEYS {
        if let Some(rest) = key.strip_prefix(from) {
            return format!("{to}{rest}");
        }
    }
    key.to_string()
}

/// Whether a single-file key belongs to the UNet (not the VAE or a text encoder).
fn is_unet_key(key: &str) -> bool {
    !(key.contains("first_stage_model") || key.contains("cond_stage_model") || key.contains("conditioner."))
}

/// What [`merge_models`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MergeReport {
    /// Tensors written.
    pub tensors: usize,
    /// Tensors merged from every model.
    pub merged: usize,
    /// Keys of the first model that some other model lacks (the first model's value stood
    /// in for it; with a negative ratio the key is the first model's value as it is), with
    /// the files lacking them.
    pub incomplete: Vec<(String, Vec<PathBuf>)>,
    /// Keys of other models that the first lacks (left out).
    pub skipped: Vec<String>,
}

/// One output tensor: the weighted sources to sum (model index, key, ratio), or one to
/// copy as it is.
struct Output<'a> {
    key: String,
    models: &'a [(WeightFile, f64)],
    sources: Vec<(usize, String, f64)>,
    copy: bool,
    dtype: Dtype,
    shape: Vec<usize>,
}

impl Output<'_> {
    fn bytes(&self) -> Vec<u8> {
        let raw = |i: usize, key: &str| self.models[i].0.raw(key).map(|(_, b)| b).unwrap_or_default();
        if self.copy {
            let (i, key, _) = &self.sources[0];
            return raw(*i, key).to_vec();
        }
        let mut acc = vec![0f64; self.shape.iter().product()];
        for (i, key, ratio) in &self.sources {
            let (dtype, bytes) = self.models[*i].0.raw(key).unwrap_or((Dtype::F32, &[]));
            // Checked when the plan was made: a float tensor of this shape.
            for (a, v) in acc.iter_mut().zip(decode_bytes(dtype, bytes).unwrap_or_default()) {
                *a += ratio * f64::from(v);
            }
        }
        let values: Vec<f32> = acc.into_iter().map(|v| v as f32).collect();
        SaveDtype::of(self.dtype).unwrap_or(SaveDtype::F32).encode(&values)
    }
}

/// Merges `models` (opened single-file checkpoints with their ratios) into `out` (see the
/// [module docs](self)), written atomically. Two models whose tensors of one key differ in
/// shape (different architectures) are an error naming the key; so is a model with none of
/// the first model's UNet keys.
pub fn merge_models(models: &[(WeightFile, f64)], out: &Path, unet_only: bool, dtype: Option<SaveDtype>) -> Result<MergeReport> {
    let Some((first, _)) = models.first() else {
        return Err(SdModelError::BadInput { what: "models".into(), reason: "no model given".into() });
    };
    let mut report = MergeReport::default();
    // Every model's keys by their normalized name.
    let names: Vec<BTreeMap<String, String>> = models.iter().map(|(f, _)| f.keys().map(|k| (normalized(k), k.to_string())).collect()).collect();
    for (i, (file, _)) in models.iter().enumerate().skip(1) {
        if !names[i].keys().any(|k| is_unet_key(k) && names[0].contains_key(k)) {
            return Err(SdModelError::BadInput {
                what: file.path().display().to_string(),
                reason: format!("it shares no UNet weight with {}: not a checkpoint of the same kind", first.path().display()),
            });
        }
        report.skipped.extend(names[i].keys().filter(|k| !names[0].contains_key(*k)).cloned());
    }
    report.skipped.sort();
    report.skipped.dedup();
    let mut outputs = Vec::with_capacity(names[0].len());
    for (key, first_key) in &names[0] {
        let (first_dtype, _) = first.raw(first_key).ok_or_else(|| SdModelError::Layout { path: first.path().to_path_buf(), reason: format!("`{first_key}` vanished") })?;
        let shape = first.shape(first_key).unwrap_or_default().to_vec();
        let float = decode_bytes(first_dtype, &[]).is_some();
        let mut output = Output { key: key.clone(), models, sources: vec![(0, first_key.clone(), 1.0)], copy: true, dtype: first_dtype, shape };
        if float && (!unet_only || is_unet_key(key)) {
            output.copy = false;
            // F64 weights (which the merge reads) are written as F32, the widest it writes.
            output.dtype = dtype.unwrap_or(SaveDtype::of(first_dtype).unwrap_or(SaveDtype::F32)).st_dtype();
            output.sources.clear();
            let mut lacking = Vec::new();
            for (i, (file, ratio)) in models.iter().enumerate() {
                match names[i].get(key) {
                    Some(k) => {
                        let (d, _) = file.raw(k).unwrap_or((Dtype::BOOL, &[]));
                        if decode_bytes(d, &[]).is_none() {
                            return Err(SdModelError::BadInput {
                                what: file.path().display().to_string(),
                                reason: format!("`{k}` is {d:?}, where {} has a float tensor: only F64, F32, F16 and BF16 weights are merged", first.path().display()),
                            });
                        }
                        if file.shape(k) != Some(output.shape.as_slice()) {
                            return Err(SdModelError::BadInput {
                                what: file.path().display().to_string(),
                                reason: format!(
                                    "`{k}` is {d:?} {:?} where {} has {:?}: the models must share one architecture",
                                    file.shape(k).unwrap_or_default(),
                                    first.path().display(),
                                    output.shape
                                ),
                            });
                        }
                        output.sources.push((i, k.clone(), *ratio));
                    }
                    None => {
                        // kohya's rule: the first model's value in the lacking model's place.
                        output.sources.push((0, first_key.clone(), *ratio));
                        lacking.push(file.path().to_path_buf());
                    }
                }
            }
            if lacking.is_empty() {
                report.merged += 1;
            } else {
                // A difference needs both its models: without one, the first model's
                // weights are kept as they are (a VAE that B lacks stays A's, not 2A − C).
                if models.iter().any(|(_, ratio)| *ratio < 0.0) {
                    output.sources = vec![(0, first_key.clone(), 1.0)];
                }
                report.incomplete.push((key.clone(), lacking));
            }
        } else if dtype.is_some() && float {
            // Copied, but in the asked dtype.
            output.copy = false;
            output.dtype = dtype.map_or(first_dtype, SaveDtype::st_dtype);
        }
        outputs.push(output);
    }
    report.tensors = outputs.len();
    let metadata: std::collections::HashMap<String, String> = first.metadata().clone();
    let tensors = outputs.iter().map(|o| (o.key.clone(), StreamedTensor::new(o.dtype, o.shape.clone(), move || Cow::Owned(o.bytes())))).collect();
    write_streamed(out, tensors, metadata)?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_encoder_keys_are_normalized_and_unet_keys_told_apart() {
        assert_eq!(normalized("cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight"), "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight");
        assert_eq!(normalized("cond_stage_model.transformer.text_model.encoder.x"), "cond_stage_model.transformer.text_model.encoder.x");
        assert!(is_unet_key("model.diffusion_model.input_blocks.0.0.weight"));
        assert!(!is_unet_key("first_stage_model.decoder.conv_in.weight"));
        assert!(!is_unet_key("conditioner.embedders.1.model.ln_final.weight"));
    }

    /// A key one model lacks: its place is the first model's value in an average (kohya's
    /// rule), but in an add difference the key is the first model's as it is.
    #[test]
    fn a_key_a_model_lacks_is_the_first_models_in_a_difference() {
        let dir = tempfile::tempdir().unwrap();
        let file = |name: &str, tensors: &[(&str, &[f32])]| {
            let hosts: Vec<(String, lora_core::HostTensor)> = tensors.iter().map(|(k, v)| (k.to_string(), lora_core::HostTensor::new(vec![v.len()], v.to_vec()).unwrap())).collect();
            let refs: Vec<(String, &lora_core::HostTensor)> = hosts.iter().map(|(k, t)| (k.clone(), t)).collect();
            let path = dir.path().join(name);
            std::fs::write(&path, lora_core::tensor_io::serialize(&refs, SaveDtype::F32, Default::default()).unwrap()).unwrap();
        };
        let open = |name: &str| WeightFile::open(dir.path().join(name)).unwrap();
        let (unet, vae) = ("model.diffusion_model.out.2.weight", "first_stage_model.decoder.conv_in.bias");
        file("a.safetensors", &[(unet, &[1.0, 2.0]), (vae, &[3.0])]);
        file("b.safetensors", &[(unet, &[5.0, 6.0])]);
        file("c.safetensors", &[(unet, &[1.0, 1.0]), (vae, &[10.0])]);
        let (a, b, c) = ("a.safetensors", "b.safetensors", "c.safetensors");
        let merged = |models: Vec<(WeightFile, f64)>, name: &str| {
            let out = dir.path().join(name);
            let report = merge_models(&models, &out, false, None).unwrap();
            assert_eq!(report.incomplete.len(), 1);
            let bytes = std::fs::read(&out).unwrap();
            let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
            let values = |k: &str| decode_bytes(Dtype::F32, st.tensor(k).unwrap().data()).unwrap();
            (values(unet), values(vae))
        };
        assert_eq!(merged(vec![(open(a), 1.0), (open(b), 1.0), (open(c), -1.0)], "difference.safetensors"), (vec![5.0, 7.0], vec![3.0]));
        assert_eq!(merged(vec![(open(a), 0.25), (open(b), 0.75)], "average.safetensors"), (vec![4.0, 5.0], vec![3.0]));
    }
}
