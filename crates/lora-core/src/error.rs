//! Error type of the crate.

use std::path::PathBuf;

/// Everything that can go wrong building adapters or reading and writing adapter files.
///
/// Every variant names the file, key or module involved so that a user can fix the input.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoraError {
    /// A [`crate::LoraConfig`] value is out of range.
    #[error("invalid LoRA config: {0}")]
    InvalidConfig(String),

    /// An adapter's shapes do not fit the layer it should attach to.
    #[error("adapter for `{key}` does not fit its layer: {reason}")]
    ShapeMismatch {
        /// Module path or file key of the adapter.
        key: String,
        /// What was expected and what was found.
        reason: String,
    },

    /// The `down` and `up` matrices of one adapter disagree on the rank.
    #[error("adapter `{key}`: down has rank {down_rank} but up has rank {up_rank}")]
    RankMismatch {
        /// Module path or file key of the adapter.
        key: String,
        /// Rows of the down projection.
        down_rank: usize,
        /// Columns of the up projection.
        up_rank: usize,
    },

    /// A layer kind that the adapters do not support (for example grouped convolutions).
    #[error("unsupported layer for LoRA: {0}")]
    Unsupported(String),

    /// Optimizer settings out of range, parameter groups that do not fit, or a saved state
    /// for another optimizer.
    #[error("optimizer: {0}")]
    Optimizer(String),

    /// Reading or writing a file failed at the operating-system level.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The file is not a readable safetensors file (truncated, corrupt header, ...).
    #[error("{path}: not a valid safetensors file: {reason}")]
    Malformed {
        /// The file (or `<memory>` for in-memory buffers).
        path: PathBuf,
        /// What the safetensors parser reported.
        reason: String,
    },

    /// A tensor has a dtype this crate cannot read.
    #[error("{path}: tensor `{key}` has dtype {dtype}, expected F32, F16 or BF16")]
    UnsupportedDtype {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        key: String,
        /// The dtype found.
        dtype: String,
    },

    /// A tensor in the file has the wrong number of dimensions or a wrong size.
    #[error("{path}: tensor `{key}`: {reason}")]
    BadTensor {
        /// The file.
        path: PathBuf,
        /// The tensor name.
        key: String,
        /// What was expected and what was found.
        reason: String,
    },

    /// An adapter has a `down` tensor but no `up` tensor, or the other way round.
    #[error("{path}: adapter `{key}` has no {missing} tensor")]
    IncompletePair {
        /// The file.
        path: PathBuf,
        /// Key prefix of the adapter.
        key: String,
        /// Which half is missing (`lora_up`, `lora_B`, ...).
        missing: String,
    },

    /// The file holds keys that do not name a module of the model (strict mode).
    #[error("{path}: {count} key(s) do not match any module of the model, e.g. {}", first.join(", "))]
    UnknownKeys {
        /// The file.
        path: PathBuf,
        /// The first few unknown keys.
        first: Vec<String>,
        /// How many keys are unknown in total.
        count: usize,
    },

    /// The file does not look like any adapter format this crate knows.
    #[error("{path}: not a LoRA file in kohya or diffusers/PEFT layout ({reason})")]
    UnknownFormat {
        /// The file.
        path: PathBuf,
        /// Why detection failed.
        reason: String,
    },

    /// Two module paths of one component map to the same kohya name, so kohya keys
    /// cannot be resolved unambiguously.
    #[error("module paths `{first}` and `{second}` both map to kohya name `{kohya}`")]
    AmbiguousModuleName {
        /// The kohya name.
        kohya: String,
        /// First module path.
        first: String,
        /// Second module path.
        second: String,
    },

    /// Two keys of an adapter file name one module (e.g. its diffusers and its SGM name).
    #[error("{path}: `{first}` and `{second}` both name the module `{module}`")]
    DuplicateModule {
        /// The file.
        path: PathBuf,
        /// One name.
        first: String,
        /// The other name.
        second: String,
        /// The module (`component.path`).
        module: String,
    },

    /// A header metadata entry of an adapter file holds what its reader cannot use (e.g.
    /// diffusers' `lora_adapter_metadata` JSON with a non-numeric `lora_alpha`).
    #[error("{path}: metadata `{key}`: {reason}")]
    BadMetadata {
        /// The file.
        path: PathBuf,
        /// The metadata key (and the entry inside it).
        key: String,
        /// What was expected and what was found.
        reason: String,
    },

    /// A tensor could not be read back from the backend.
    #[error("tensor data error: {0}")]
    Data(String),

    /// A finite value that the dtype a tensor is saved in cannot hold (it would be written
    /// as an infinity).
    #[error("tensor `{key}` holds {value:e}, beyond the range of {dtype}: save it as f32{}", if dtype == "F16" { " or bf16" } else { "" })]
    OutOfRange {
        /// The tensor's key.
        key: String,
        /// The first value out of range.
        value: f32,
        /// The dtype it was to be saved in (`F16`, `Bf16`).
        dtype: String,
    },
}

/// Short alias for results of this crate.
pub type Result<T, E = LoraError> = std::result::Result<T, E>;
