//! Reading and writing f32/f16/bf16 safetensors data, and atomic file writes.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use serde::{Deserialize, Serialize};

use crate::{HostTensor, LoraError, Result};

/// Element type used when saving tensors. Serialised as `f32`, `f16`, `bf16`; kohya's
/// `save_precision` names (`float`, `fp16`) and PyTorch's (`float32`, `float16`, `bfloat16`)
/// read too.
///
/// ```
/// use lora_core::tensor_io::SaveDtype;
/// #[derive(serde::Deserialize)]
/// struct Output { save_precision: SaveDtype }
/// let o: Output = serde_json::from_str(r#"{"save_precision": "float"}"#).unwrap();
/// assert_eq!(o.save_precision, SaveDtype::F32);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum SaveDtype {
    /// 32-bit float.
    #[serde(alias = "float", alias = "fp32", alias = "float32")]
    F32,
    /// IEEE half precision (the usual dtype of shared LoRA files).
    #[default]
    #[serde(alias = "fp16", alias = "float16")]
    F16,
    /// bfloat16.
    #[serde(alias = "bfloat16")]
    Bf16,
}

impl SaveDtype {
    /// The safetensors dtype this writes.
    pub fn st_dtype(self) -> Dtype {
        match self {
            SaveDtype::F32 => Dtype::F32,
            SaveDtype::F16 => Dtype::F16,
            SaveDtype::Bf16 => Dtype::BF16,
        }
    }

    /// The save dtype writing `dtype` (`None` for a dtype other than F32, F16 and BF16).
    ///
    /// ```
    /// use lora_core::tensor_io::SaveDtype;
    /// use safetensors::tensor::Dtype;
    /// assert_eq!(SaveDtype::of(Dtype::BF16), Some(SaveDtype::Bf16));
    /// assert_eq!(SaveDtype::of(Dtype::I64), None);
    /// ```
    pub fn of(dtype: Dtype) -> Option<Self> {
        match dtype {
            Dtype::F32 => Some(SaveDtype::F32),
            Dtype::F16 => Some(SaveDtype::F16),
            Dtype::BF16 => Some(SaveDtype::Bf16),
            _ => None,
        }
    }

    /// The index of the first finite value that this dtype cannot hold (it would round to
    /// ±infinity: beyond ±65504 for f16, the very edge of f32's range for bf16).
    ///
    /// ```
    /// use lora_core::tensor_io::SaveDtype;
    /// assert_eq!(SaveDtype::F16.first_out_of_range(&[1.0, -7e4, f32::NAN]), Some(1));
    /// assert_eq!(SaveDtype::Bf16.first_out_of_range(&[1.0, -7e4]), None);
    /// ```
    pub fn first_out_of_range(self, values: &[f32]) -> Option<usize> {
        let overflows = |v: f32| match self {
            SaveDtype::F32 => false,
            SaveDtype::F16 => half::f16::from_f32(v).is_infinite(),
            SaveDtype::Bf16 => half::bf16::from_f32(v).is_infinite(),
        };
        values.iter().position(|v| v.is_finite() && overflows(*v))
    }

    /// Encodes f32 values as little-endian bytes of this dtype (rounding to nearest).
    pub fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            SaveDtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            SaveDtype::F16 => values
                .iter()
                .flat_map(|v| half::f16::from_f32(*v).to_le_bytes())
                .collect(),
            SaveDtype::Bf16 => values
                .iter()
                .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
                .collect(),
        }
    }
}

impl std::str::FromStr for SaveDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" => Ok(Self::F32),
            "f16" | "fp16" | "float16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            other => Err(format!("unknown dtype `{other}`, expected f32, f16 or bf16")),
        }
    }
}

/// What a PyTorch pickle given where safetensors are read is told.
pub const PICKLE_HINT: &str = "a PyTorch pickle (.ckpt / .pt), not safetensors: convert it once with `trainer convert-model FILE --out FILE.safetensors`";

/// Whether a file's bytes begin as a PyTorch pickle does (`torch.save`'s zip archive, or a
/// raw pickle of the pre-1.6 format: the PROTO opcode `0x80` and a protocol of 2 to 5).
/// A safetensors file whose header length's first byte is `0x80` is not one: its header
/// starts with `{` after the 8 length bytes.
///
/// ```
/// use lora_core::tensor_io::looks_like_pickle;
/// assert!(looks_like_pickle(b"\x80\x02}q\x00"));
/// assert!(looks_like_pickle(b"PK\x03\x04rest"));
/// assert!(!looks_like_pickle(b"\x80\x00\x00\x00\x00\x00\x00\x00{\"a\":"));
/// ```
pub fn looks_like_pickle(bytes: &[u8]) -> bool {
    let raw_pickle = matches!(bytes, [0x80, 2..=5, ..]) && bytes.get(8) != Some(&b'{');
    bytes.starts_with(b"PK\x03\x04") || raw_pickle
}

/// Parses a safetensors buffer, mapping errors to [`LoraError::Malformed`] naming `path`.
pub fn parse<'a>(bytes: &'a [u8], path: &Path) -> Result<(SafeTensors<'a>, HashMap<String, String>)> {
    // PyTorch pickles are the usual wrong file: say so.
    let pickle = looks_like_pickle(bytes);
    let malformed = |e: safetensors::SafeTensorError| LoraError::Malformed {
        path: path.to_path_buf(),
        reason: if pickle {
            PICKLE_HINT.to_string()
        } else {
            e.to_string()
        },
    };
    let (_, meta) = SafeTensors::read_metadata(bytes).map_err(malformed)?;
    let st = SafeTensors::deserialize(bytes).map_err(malformed)?;
    Ok((st, meta.metadata().clone().unwrap_or_default()))
}

/// Little-endian values of a float dtype (F64, F32, F16, BF16) as f32; `None` for other
/// dtypes.
///
/// ```
/// use lora_core::tensor_io::decode_bytes;
/// use safetensors::Dtype;
/// assert_eq!(decode_bytes(Dtype::F16, &[0x00, 0x3c]), Some(vec![1.0]));
/// assert_eq!(decode_bytes(Dtype::I64, &[0; 8]), None);
/// ```
pub fn decode_bytes(dtype: Dtype, bytes: &[u8]) -> Option<Vec<f32>> {
    Some(match dtype {
        Dtype::F64 => bytes.chunks_exact(8).map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]) as f32).collect(),
        Dtype::F32 => bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F16 => bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        Dtype::BF16 => bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        _ => return None,
    })
}

/// Decodes an F32, F16 or BF16 tensor to f32 on the host.
pub fn decode(view: &TensorView<'_>, key: &str, path: &Path) -> Result<HostTensor> {
    let data = match view.dtype() {
        Dtype::F32 | Dtype::F16 | Dtype::BF16 => decode_bytes(view.dtype(), view.data()).unwrap_or_default(),
        other => {
            return Err(LoraError::UnsupportedDtype {
                path: path.to_path_buf(),
                key: key.to_string(),
                dtype: format!("{other:?}"),
            })
        }
    };
    HostTensor::new(view.shape().to_vec(), data).map_err(|e| LoraError::BadTensor {
        path: path.to_path_buf(),
        key: key.to_string(),
        reason: e.to_string(),
    })
}

/// A tensor that holds a count or a setting rather than weights (an `alpha`): [`decode`]'s
/// float types, and integer ones too, as LyCORIS writes an `alpha` of 0 (read as the
/// rank) with the rank's integer type (`torch.tensor(dim)`, int64).
///
/// ```
/// use lora_core::tensor_io::{decode_number, serialize, parse, SaveDtype};
/// use safetensors::{tensor::TensorView, Dtype};
/// use std::path::Path;
/// let bytes = 4i64.to_le_bytes();
/// let view = TensorView::new(Dtype::I64, vec![], &bytes).unwrap();
/// assert_eq!(decode_number(&view, "m.alpha", Path::new("f")).unwrap().data, vec![4.0]);
/// ```
pub fn decode_number(view: &TensorView<'_>, key: &str, path: &Path) -> Result<HostTensor> {
    let ints = |size: usize, f: fn(&[u8]) -> f64| view.data().chunks_exact(size).map(|c| f(c) as f32).collect::<Vec<f32>>();
    let data = match view.dtype() {
        Dtype::I64 => ints(8, |c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as f64),
        Dtype::I32 => ints(4, |c| f64::from(i32::from_le_bytes(c.try_into().expect("4 bytes")))),
        Dtype::I16 => ints(2, |c| f64::from(i16::from_le_bytes(c.try_into().expect("2 bytes")))),
        Dtype::I8 => ints(1, |c| f64::from(c[0] as i8)),
        Dtype::U8 => ints(1, |c| f64::from(c[0])),
        Dtype::F64 => decode_bytes(Dtype::F64, view.data()).unwrap_or_default(),
        _ => return decode(view, key, path),
    };
    HostTensor::new(view.shape().to_vec(), data).map_err(|e| LoraError::BadTensor { path: path.to_path_buf(), key: key.to_string(), reason: e.to_string() })
}

/// [`decode`], refusing a tensor with a NaN or infinite value (a diverged run's file): it
/// would turn every image black or spread into merged weights.
pub fn decode_finite(view: &TensorView<'_>, key: &str, path: &Path) -> Result<HostTensor> {
    finite(decode(view, key, path)?, key, path)
}

/// `tensor` (the file's `key`) unless it holds a NaN or infinite value, which is an error
/// naming it (see [`decode_finite`]).
pub fn finite(tensor: HostTensor, key: &str, path: &Path) -> Result<HostTensor> {
    match tensor.data.iter().position(|v| !v.is_finite()) {
        None => Ok(tensor),
        Some(i) => Err(LoraError::BadTensor {
            path: path.to_path_buf(),
            key: key.to_string(),
            reason: format!("has a non-finite value ({} at index {i}): the file is broken, e.g. saved from a diverged run", tensor.data[i]),
        }),
    }
}

/// Serialises named host tensors in `dtype` with string metadata (none at all, e.g. the
/// moments of an optimizer that has taken no step, is a valid file too). A finite value
/// that `dtype` cannot hold is an error naming its tensor, not an infinity in the file.
///
/// ```
/// use lora_core::tensor_io::{parse, serialize};
/// use lora_core::{HostTensor, SaveDtype};
/// let t = HostTensor::new(vec![2], vec![1.0, 2.0]).unwrap();
/// let bytes = serialize(&[("w".into(), &t)], SaveDtype::F32, [("k".to_string(), "v".to_string())].into()).unwrap();
/// let (file, metadata) = parse(&bytes, "a.safetensors".as_ref()).unwrap();
/// assert_eq!((file.len(), metadata["k"].as_str()), (1, "v"));
/// let empty = serialize(&[], SaveDtype::F32, Default::default()).unwrap();
/// assert_eq!(parse(&empty, "b.safetensors".as_ref()).unwrap().0.len(), 0);
/// // 1e5 is beyond f16's range: an error naming the tensor, not an infinity in the file.
/// let big = HostTensor::new(vec![1], vec![1e5]).unwrap();
/// let err = serialize(&[("w".into(), &big)], SaveDtype::F16, Default::default()).unwrap_err();
/// assert!(err.to_string().contains("`w` holds 1e5"), "{err}");
/// ```
pub fn serialize(
    tensors: &[(String, &HostTensor)],
    dtype: SaveDtype,
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>> {
    if let Some((key, value)) = tensors.iter().find_map(|(k, t)| dtype.first_out_of_range(&t.data).map(|i| (k.clone(), t.data[i]))) {
        return Err(LoraError::OutOfRange { key, value, dtype: format!("{dtype:?}") });
    }
    let encoded: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(k, t)| (k.clone(), dtype.encode(&t.data), t.shape.clone()))
        .collect();
    let views = encoded
        .iter()
        .map(|(k, bytes, shape)| {
            TensorView::new(dtype.st_dtype(), shape.clone(), bytes)
                .map(|v| (k.as_str(), v))
                .map_err(|e| LoraError::Data(format!("tensor `{k}`: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    // safetensors 0.7 writes a broken header for no tensors with an empty metadata map
    // (`{},"__metadata__":{}}`): an empty map is left out.
    let metadata = (!metadata.is_empty()).then_some(metadata);
    let mut bytes = safetensors::serialize(views, metadata).map_err(|e| LoraError::Data(e.to_string()))?;
    canonicalize_header(&mut bytes)?;
    Ok(bytes)
}

/// The two hashes of a safetensors file that sd-webui-additional-networks defined and A1111
/// and Civitai (AutoV3) use for LoRAs: the SHA-256 of everything after the header (the
/// tensors' bytes, so metadata does not change it), as 64 hex digits, and the first 8 hex
/// digits of the SHA-256 of the file's bytes `0x100000 .. 0x110000` (the "legacy" hash;
/// those of the empty string for a smaller file).
///
/// ```
/// use lora_core::tensor_io::addnet_hashes;
/// let mut file = 2u64.to_le_bytes().to_vec();
/// file.extend_from_slice(b"{}abc");
/// let (model, legacy) = addnet_hashes(&file).unwrap();
/// assert_eq!(model, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"); // sha256("abc")
/// assert_eq!(legacy, "e3b0c442"); // sha256("")
/// ```
pub fn addnet_hashes(bytes: &[u8]) -> Result<(String, String)> {
    use sha2::{Digest, Sha256};
    let truncated = || LoraError::Data("safetensors header: truncated".into());
    let len_bytes: [u8; 8] = bytes.get(..8).and_then(|b| b.try_into().ok()).ok_or_else(truncated)?;
    let data_start = usize::try_from(u64::from_le_bytes(len_bytes)).ok().and_then(|n| n.checked_add(8)).filter(|&s| s <= bytes.len()).ok_or_else(truncated)?;
    let hex = |digest: &[u8]| digest.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let model = hex(&Sha256::digest(&bytes[data_start..]));
    let legacy_range = bytes.get(0x100000..bytes.len().min(0x110000)).unwrap_or(&[]);
    let legacy = hex(&Sha256::digest(legacy_range))[..8].to_owned();
    Ok((model, legacy))
}

/// Rewrites a serialized file's JSON header with its keys (and metadata keys) sorted, so
/// the same tensors and metadata always give the same bytes (`HashMap` order is random).
fn canonicalize_header(bytes: &mut [u8]) -> Result<()> {
    let bad = |e: String| LoraError::Data(format!("safetensors header: {e}"));
    let len_bytes: [u8; 8] = bytes.get(..8).and_then(|b| b.try_into().ok()).ok_or_else(|| bad("truncated".into()))?;
    let len = u64::from_le_bytes(len_bytes) as usize;
    let header = bytes.get(8..8 + len).ok_or_else(|| bad("truncated".into()))?;
    let mut parsed: std::collections::BTreeMap<String, serde_json::Value> = serde_json::from_slice(header).map_err(|e| bad(e.to_string()))?;
    if let Some(meta) = parsed.remove("__metadata__") {
        let sorted: std::collections::BTreeMap<String, serde_json::Value> = serde_json::from_value(meta).map_err(|e| bad(e.to_string()))?;
        parsed.insert("__metadata__".into(), serde_json::to_value(sorted).map_err(|e| bad(e.to_string()))?);
    }
    let mut canonical = serde_json::to_vec(&parsed).map_err(|e| bad(e.to_string()))?;
    if canonical.len() > len {
        return Err(bad("canonical form is longer than the original".into()));
    }
    // The header keeps its length (it is padded with spaces for alignment).
    canonical.resize(len, b' ');
    bytes[8..8 + len].copy_from_slice(&canonical);
    Ok(())
}

/// A tensor for [`write_streamed`] whose bytes are made when the writer reaches it, so a
/// file of many large tensors is written with one of them in memory at a time.
pub struct StreamedTensor<'a> {
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Box<dyn Fn() -> std::borrow::Cow<'a, [u8]> + 'a>,
}

impl<'a> StreamedTensor<'a> {
    /// A tensor of `dtype` and `shape` whose little-endian bytes `bytes` makes; they must
    /// be `shape`'s element count times the dtype's size (checked by [`write_streamed`]).
    pub fn new(dtype: Dtype, shape: Vec<usize>, bytes: impl Fn() -> std::borrow::Cow<'a, [u8]> + 'a) -> Self {
        Self { dtype, shape, bytes: Box::new(bytes) }
    }

    fn len(&self) -> usize {
        self.shape.iter().product::<usize>() * self.dtype.bitsize() / 8
    }
}

impl safetensors::tensor::View for &StreamedTensor<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        (self.bytes)()
    }
    fn data_len(&self) -> usize {
        self.len()
    }
}

/// The sibling of `path` that an output is written through before it is renamed to
/// `path`: `NAME.partial-PID`. The process id keeps it apart from any file of the user's
/// (a `NAME.partial` of theirs is never truncated or deleted) and from another run
/// writing the same output; a run that is killed leaves it, visibly, beside `path`.
///
/// ```
/// use std::path::Path;
/// let partial = lora_core::tensor_io::partial_sibling(Path::new("out/model.safetensors"));
/// assert_eq!(partial, Path::new(&format!("out/model.safetensors.partial-{}", std::process::id())));
/// ```
pub fn partial_sibling(path: &Path) -> PathBuf {
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".partial-{}", std::process::id()));
    path.with_file_name(name)
}

/// Writes `tensors` with `metadata` to the safetensors file `path`, each tensor's bytes made
/// as the writer reaches it, atomically: into [`partial_sibling`]`(path)`, checked and
/// renamed over `path` when complete, removed on failure (an error naming `path`).
///
/// ```
/// use lora_core::tensor_io::{write_streamed, StreamedTensor, SaveDtype};
/// use std::borrow::Cow;
/// let dir = tempfile::tempdir().unwrap();
/// let path = dir.path().join("x.safetensors");
/// let t = StreamedTensor::new(SaveDtype::F32.st_dtype(), vec![2], || Cow::Owned(SaveDtype::F32.encode(&[1.0, 2.0])));
/// write_streamed(&path, vec![("x".to_string(), t)], Default::default()).unwrap();
/// assert!(path.is_file() && std::fs::read_dir(dir.path()).unwrap().count() == 1);
/// ```
pub fn write_streamed<'a>(path: &Path, tensors: Vec<(String, StreamedTensor<'a>)>, metadata: HashMap<String, String>) -> Result<()> {
    output_folder(path)?;
    let partial = partial_sibling(path);
    let fail = |reason: String| LoraError::Malformed { path: path.to_path_buf(), reason };
    let result = safetensors::serialize_to_file(tensors.iter().map(|(k, t)| (k.clone(), t)), Some(metadata), &partial)
        .map_err(|e| match e {
            // A full disk or a read-only folder is an I/O error of the output, not a bad file.
            safetensors::SafeTensorError::IoError(source) => through_temporary(path, &partial, source),
            other => fail(format!("writing: {other}")),
        })
        .and_then(|()| {
            // A tensor whose bytes came out another length than its header says leaves a
            // broken file: refuse it (the data follows the 8-byte length and the header).
            let expected: usize = tensors.iter().map(|(_, t)| t.len()).sum();
            let mut head = [0u8; 8];
            std::fs::File::open(&partial)
                .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
                .map_err(|source| through_temporary(path, &partial, source))?;
            let size = std::fs::metadata(&partial).map_err(|source| through_temporary(path, &partial, source))?.len() as usize;
            let data = size.saturating_sub(8).saturating_sub(u64::from_le_bytes(head) as usize);
            if data != expected {
                return Err(fail(format!("wrote {data} bytes of tensor data for {expected} bytes of tensors (a tensor could not be read)")));
            }
            std::fs::rename(&partial, path).map_err(|source| LoraError::Io { path: path.to_path_buf(), source })
        });
    if result.is_err() {
        let _ = std::fs::remove_file(&partial);
    }
    result
}

/// Reads a whole file, naming it in the error.
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| LoraError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder is written,
/// flushed and renamed over `path`, so an interrupted save never destroys an earlier file.
/// Errors name `path` (a missing folder as such), not the temporary file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = output_folder(path)?;
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "adapter".into());
    let tmp = dir.join(format!(".{file_name}.tmp-{}", std::process::id()));
    let result = (|| {
        let io = |e| through_temporary(path, &tmp, e);
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(|source| LoraError::Io { path: path.to_path_buf(), source })
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The folder the output `path` is written into (`.` for a bare file name), or an error
/// naming `path` when that folder is missing or not a folder: otherwise the failure would
/// surface on the temporary file the output is written through, a name the user never gave.
/// [`write_atomic`] and [`write_streamed`] check it; writers of their own call it first.
///
/// ```
/// use lora_core::tensor_io::output_folder;
/// let dir = tempfile::tempdir().unwrap();
/// assert_eq!(output_folder(&dir.path().join("x.safetensors")).unwrap(), dir.path());
/// let err = output_folder(&dir.path().join("no/x.safetensors")).unwrap_err().to_string();
/// let want = format!("x.safetensors: its folder {} does not exist", dir.path().join("no").display());
/// assert!(err.ends_with(&want), "{err}");
/// ```
pub fn output_folder(path: &Path) -> Result<PathBuf> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let (kind, what) = match std::fs::metadata(&dir) {
        Ok(meta) if meta.is_dir() => return Ok(dir),
        Ok(_) => (std::io::ErrorKind::NotADirectory, "is a file, not a folder"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (std::io::ErrorKind::NotFound, "does not exist"),
        // Permission denied on a parent and the like: the OS's own words.
        Err(e) => return Err(LoraError::Io { path: path.to_path_buf(), source: std::io::Error::new(e.kind(), format!("its folder {}: {e}", dir.display())) }),
    };
    let source = std::io::Error::new(kind, format!("its folder {} {what}", dir.display()));
    Err(LoraError::Io { path: path.to_path_buf(), source })
}

/// An I/O error on the temporary file `tmp` that `path` is written through, named for
/// `path` (the name the user gave) with the temporary file as a detail.
fn through_temporary(path: &Path, tmp: &Path, e: std::io::Error) -> LoraError {
    let name = tmp.file_name().map_or_else(|| tmp.display().to_string(), |n| n.to_string_lossy().into_owned());
    let source = std::io::Error::new(e.kind(), format!("{e} (writing the temporary file {name} beside it)"));
    LoraError::Io { path: path.to_path_buf(), source }
}
