//! Writing weights back in a checkpoint's own layout (e.g. after baking LoRAs in).

use std::collections::BTreeMap;
use std::path::Path;

use burn::tensor::backend::Backend;
use burn_store::{BurnToPyTorchAdapter, ModuleSnapshot};
use lora_core::tensor_io::{self, SaveDtype};
use lora_core::HostTensor;
use safetensors::tensor::{Dtype, TensorView};

use crate::load::{text_encoder_2_single_file_mapping, text_encoder_single_file_mapping, unet_single_file_mapping, WeightFile};
use crate::{ClipTextModel, Result, SdModelError, UNet2DConditionModel};

fn data_error(what: &str, reason: String) -> SdModelError {
    SdModelError::BadInput { what: what.into(), reason }
}

/// The module's parameters under their checkpoint (diffusers / transformers) names, in
/// PyTorch layout, as f32. Adapters must be baked in or detached first.
pub fn checkpoint_tensors<B: Backend, M: ModuleSnapshot<B>>(module: &M) -> Result<BTreeMap<String, HostTensor>> {
    let mut out = BTreeMap::new();
    for s in module.collect(None, Some(Box::new(BurnToPyTorchAdapter)), true) {
        let path = s.full_path();
        let segments: Vec<&str> = path.split('.').collect();
        if segments.contains(&"adapter") || segments.contains(&"lycoris") {
            return Err(data_error("model", format!("`{path}` is a LoRA adapter; bake or detach adapters before saving weights")));
        }
        let key = segments.into_iter().filter(|s| *s != "base").collect::<Vec<_>>().join(".");
        let data = s.to_data().map_err(|e| data_error("model", format!("`{path}`: {e:?}")))?;
        let shape = data.shape.to_vec();
        let values = data.convert::<f32>().to_vec::<f32>().map_err(|e| data_error("model", format!("`{path}`: {e:?}")))?;
        out.insert(key, HostTensor::new(shape, values)?);
    }
    Ok(out)
}

/// Writes a component as a diffusers-layout safetensors file (atomically).
pub fn save_diffusers_component<B: Backend, M: ModuleSnapshot<B>>(module: &M, path: &Path, dtype: SaveDtype) -> Result<()> {
    let tensors = checkpoint_tensors(module)?;
    let refs: Vec<(String, &HostTensor)> = tensors.iter().map(|(k, t)| (k.clone(), t)).collect();
    let mut meta = std::collections::HashMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    let bytes = tensor_io::serialize(&refs, dtype, meta)?;
    Ok(tensor_io::write_atomic(path, &bytes)?)
}

fn encode(dtype: Dtype, values: &[f32]) -> Option<Vec<u8>> {
    match dtype {
        Dtype::F32 => Some(SaveDtype::F32.encode(values)),
        Dtype::F16 => Some(SaveDtype::F16.encode(values)),
        Dtype::BF16 => Some(SaveDtype::Bf16.encode(values)),
        _ => None,
    }
}

/// Writes `source` to `out` with the UNet's and text encoder's tensors replaced by the
/// given models' weights, in the file's own key layout (an SDXL file's second encoder is
/// copied as it is: see [`merge_into_single_file_with`]); replaced tensors keep their dtype
/// unless `dtype` says otherwise. Every other tensor (VAE, EMA, buffers) and the header
/// metadata are copied unchanged.
pub fn merge_into_single_file<B: Backend>(
    source: &WeightFile,
    unet: &UNet2DConditionModel<B>,
    text_encoder: &ClipTextModel<B>,
    out: &Path,
    dtype: Option<SaveDtype>,
) -> Result<()> {
    merge_into_single_file_with(source, unet, &[text_encoder], out, dtype)
}

/// [`merge_into_single_file`] with any number of text encoders (SDXL's two: each is
/// written under its [`component`](ClipTextModel::component)'s keys).
pub fn merge_into_single_file_with<B: Backend>(
    source: &WeightFile,
    unet: &UNet2DConditionModel<B>,
    text_encoders: &[&ClipTextModel<B>],
    out: &Path,
    dtype: Option<SaveDtype>,
) -> Result<()> {
    crate::lora::distinct_components(text_encoders.iter().map(|te| te.component))?;
    // (our tensors, their sources) per component: the encoders share parameter names.
    let mut parts = vec![(checkpoint_tensors(unet)?, unet_single_file_mapping(unet, source).0)];
    for te in text_encoders {
        let mapping = match te.component {
            lora_core::Component::TextEncoder2 => text_encoder_2_single_file_mapping(te, source).0,
            _ => text_encoder_single_file_mapping(te, source).0,
        };
        parts.push((checkpoint_tensors(*te)?, mapping));
    }
    // Every tensor of every model must find its place in the file.
    for (ours, mapping) in &parts {
        let mapped: std::collections::HashSet<&str> = mapping.iter().map(|(path, _)| path.as_str()).collect();
        if let Some(lost) = ours.keys().find(|k| !mapped.contains(k.as_str())) {
            return Err(data_error("source", format!("`{lost}` has no place in {} (a different model?)", source.path().display())));
        }
    }
    let mut by_key: BTreeMap<String, Vec<(usize, String, crate::keymap::TensorSource)>> = BTreeMap::new();
    for (i, (_, mapping)) in parts.iter().enumerate() {
        for (path, src) in mapping {
            by_key.entry(src.key.clone()).or_default().push((i, path.clone(), src.clone()));
        }
    }
    let mut keys: Vec<&str> = source.keys().collect();
    keys.sort();
    let mut entries: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::with_capacity(keys.len());
    for key in keys {
        let (mut tensor_dtype, raw) = source.raw(key).ok_or_else(|| data_error("source", format!("`{key}` vanished")))?;
        let shape = source.shape(key).unwrap_or_default().to_vec();
        let bytes = match by_key.get(key) {
            None => raw.to_vec(),
            Some(sources) => {
                let numel: usize = shape.iter().product();
                let row = numel / shape.first().copied().unwrap_or(1).max(1);
                let mut values = vec![0f32; numel];
                for (i, path, src) in sources {
                    let t = parts[*i].0.get(path).ok_or_else(|| data_error("model", format!("no parameter `{path}` for `{key}`")))?;
                    let start = src.rows.map_or(0, |(r0, _)| r0 * row);
                    let end = start + t.data.len();
                    if end > numel {
                        return Err(data_error("model", format!("`{path}` does not fit `{key}` {shape:?}")));
                    }
                    if src.rows.is_none() && !src.transpose && t.data.len() != numel {
                        return Err(data_error("model", format!("`{path}` does not fill `{key}` {shape:?}")));
                    }
                    if src.transpose {
                        // The file holds the transpose of our `[rows, cols]` weight.
                        let (rows, cols) = match t.shape.as_slice() {
                            [r, c] if shape.as_slice() == [*c, *r] => (*r, *c),
                            other => return Err(data_error("model", format!("`{path}` {other:?} is not the transpose of `{key}` {shape:?}"))),
                        };
                        for r in 0..rows {
                            for c in 0..cols {
                                values[c * rows + r] = t.data[r * cols + c];
                            }
                        }
                    } else {
                        values[start..end].copy_from_slice(&t.data);
                    }
                }
                if let Some(d) = dtype {
                    tensor_dtype = match d {
                        SaveDtype::F32 => Dtype::F32,
                        SaveDtype::F16 => Dtype::F16,
                        SaveDtype::Bf16 => Dtype::BF16,
                    };
                }
                encode(tensor_dtype, &values).ok_or_else(|| data_error("source", format!("`{key}` has dtype {tensor_dtype:?}, expected a float type")))?
            }
        };
        entries.push((key.to_string(), tensor_dtype, shape, bytes));
    }
    let views = entries
        .iter()
        .map(|(k, d, s, b)| TensorView::new(*d, s.clone(), b).map(|v| (k.as_str(), v)))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| data_error("merged checkpoint", e.to_string()))?;
    let bytes = safetensors::serialize(views, Some(source.metadata().clone())).map_err(|e| data_error("merged checkpoint", e.to_string()))?;
    Ok(tensor_io::write_atomic(out, &bytes)?)
}
