//! PyTorch pickle files (`.ckpt`, `.pt`, `.pth`, `.bin`): the checkpoints, LoRAs and
//! embeddings shared before safetensors. They are read through burn-store's pickle reader,
//! an interpreter of the pickle subset `torch.save` writes that never runs code from the
//! file, and turned into safetensors ([`pytorch_to_safetensors`]), which everything else
//! here reads. A checkpoint's `state_dict` (and kohya's / Lightning's `epoch`,
//! `global_step` beside it) is unwrapped as kohya and A1111 unwrap it.
//!
//! ```no_run
//! use sd_model::torch_file::pytorch_to_safetensors;
//! use std::path::Path;
//!
//! let n = pytorch_to_safetensors(Path::new("sd-v1-5.ckpt"), Path::new("sd-v1-5.safetensors"), None)?;
//! println!("{n} tensors");
//! # Ok::<(), sd_model::SdModelError>(())
//! ```

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::Path;

use burn::tensor::DType;
use burn_store::pytorch::PytorchReader;
use burn_store::TensorSnapshot;
use lora_core::tensor_io::{decode_bytes, write_streamed, SaveDtype, StreamedTensor};
use lora_core::HostTensor;
use safetensors::tensor::Dtype;

use crate::{Result, SdModelError};

/// File extensions of PyTorch pickles.
pub const EXTENSIONS: [&str; 4] = ["ckpt", "pt", "pth", "bin"];

/// Whether `path` is a PyTorch pickle by its extension (`.ckpt`, `.pt`, `.pth`, `.bin`).
pub fn is_pytorch_file(path: &Path) -> bool {
    path.extension().and_then(|e| e.to_str()).is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn bad(path: &Path, reason: impl Into<String>) -> SdModelError {
    SdModelError::BadInput { what: path.display().to_string(), reason: reason.into() }
}

/// The tensors of a PyTorch file by key, a checkpoint's `state_dict.` prefix dropped.
pub fn read_pytorch(path: &Path) -> Result<Vec<(String, TensorSnapshot)>> {
    if !path.is_file() {
        return Err(SdModelError::Io { path: path.to_path_buf(), source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file") });
    }
    // burn-store reads nested containers recursively and copies memoized objects: bound
    // the nesting and the objects first.
    crate::pickle_scan::check_pickle(path).map_err(|reason| bad(path, reason))?;
    let reader = PytorchReader::new(path).map_err(|e| bad(path, format!("not a readable PyTorch file: {e}")))?;
    let mut tensors: Vec<(String, TensorSnapshot)> = reader.into_tensors().into_iter().collect();
    // burn-store allocates a tensor's declared size when it is read, however little data
    // is stored for it: a shape larger than the whole (uncompressed) file is refused here.
    let file_len = std::fs::metadata(path).map_or(u64::MAX, |m| m.len());
    for (key, t) in &tensors {
        let bytes = t.shape.iter().try_fold(t.dtype.size() as u64, |n, d| n.checked_mul(*d as u64));
        if bytes.is_none_or(|b| b > file_len) {
            return Err(bad(path, format!("`{key}` has shape {:?}, more {:?} values than the whole file holds (a damaged file)", t.shape.to_vec(), t.dtype)));
        }
    }
    // A training checkpoint (Lightning's `.ckpt`) holds the weights under `state_dict`
    // beside other state (callbacks, loops): the weights are what is under it, as diffusers
    // takes `checkpoint["state_dict"]` (nested ones too).
    while tensors.iter().any(|(k, _)| k.starts_with("state_dict.")) {
        tensors.retain(|(k, _)| k.starts_with("state_dict."));
        for (k, _) in &mut tensors {
            k.drain(.."state_dict.".len());
        }
    }
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(tensors)
}

fn st_dtype(dtype: DType) -> Option<Dtype> {
    Some(match dtype {
        DType::F64 => Dtype::F64,
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        DType::I64 => Dtype::I64,
        DType::I32 => Dtype::I32,
        DType::I16 => Dtype::I16,
        DType::I8 => Dtype::I8,
        DType::U8 => Dtype::U8,
        DType::Bool(_) => Dtype::BOOL,
        _ => return None,
    })
}

/// One tensor of a pickle, read when the writer asks for it.
struct Lazy<'a> {
    key: &'a str,
    snapshot: &'a TensorSnapshot,
    stored: Dtype,
    dtype: Dtype,
    shape: Vec<usize>,
}

impl Lazy<'_> {
    fn bytes(&self) -> Vec<u8> {
        // An unreadable tensor comes out empty, and write_streamed refuses the short file.
        let Ok(data) = self.snapshot.to_data() else { return Vec::new() };
        let bytes = data.bytes.to_vec();
        if self.dtype == self.stored {
            return bytes;
        }
        let values = decode_bytes(self.stored, &bytes).unwrap_or_default();
        SaveDtype::of(self.dtype).unwrap_or(SaveDtype::F32).encode(&values)
    }
}

/// Writes the tensors of the PyTorch file `src` to the safetensors file `out` under the same
/// keys (a checkpoint's `state_dict.` dropped), one tensor in memory at a time and
/// atomically; float tensors in `dtype` where given. Returns how many tensors were written.
/// A tensor of a dtype safetensors cannot hold, or whose data cannot be read, is an error
/// naming it; an existing `out` is never overwritten.
pub fn pytorch_to_safetensors(src: &Path, out: &Path, dtype: Option<SaveDtype>) -> Result<usize> {
    if out.exists() {
        return Err(bad(out, "already exists: choose a new path (nothing is overwritten)"));
    }
    let tensors = read_pytorch(src)?;
    if tensors.is_empty() {
        return Err(bad(src, "holds no tensors"));
    }
    let mut plan = Vec::with_capacity(tensors.len());
    for (key, snapshot) in &tensors {
        let stored = st_dtype(snapshot.dtype).ok_or_else(|| bad(src, format!("`{key}` has dtype {:?}, which safetensors cannot hold", snapshot.dtype)))?;
        let float = SaveDtype::of(stored).is_some();
        let dtype = match dtype {
            Some(d) if float => d.st_dtype(),
            _ => stored,
        };
        plan.push(Lazy { key, snapshot, stored, dtype, shape: snapshot.shape.to_vec() });
    }
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let count = plan.len();
    let tensors = plan.iter().map(|t| (t.key.to_string(), StreamedTensor::new(t.dtype, t.shape.clone(), move || Cow::Owned(t.bytes())))).collect();
    write_streamed(out, tensors, metadata).map_err(|e| bad(src, format!("converting to safetensors: {e}")))?;
    Ok(count)
}

/// One tensor of a PyTorch file as f32 values (for small files: embeddings).
pub fn host_tensor(snapshot: &TensorSnapshot, key: &str, path: &Path) -> Result<HostTensor> {
    let data = snapshot.to_data().map_err(|e| bad(path, format!("`{key}`: {e:?}")))?;
    let values = data.convert::<f32>().to_vec::<f32>().map_err(|e| bad(path, format!("`{key}`: {e:?}")))?;
    Ok(HostTensor::new(snapshot.shape.to_vec(), values)?)
}
