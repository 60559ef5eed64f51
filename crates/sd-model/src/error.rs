//! Error type of the crate.

use std::path::PathBuf;

/// Everything that can go wrong building or loading the Stable Diffusion components.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SdModelError {
    /// A config file or preset has a value the graph cannot use.
    #[error("{origin}: invalid config: {reason}")]
    InvalidConfig {
        /// The file or preset.
        origin: String,
        /// What is wrong.
        reason: String,
    },

    /// A file or folder could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A weights file is truncated, corrupt or not safetensors.
    #[error("{path}: not a valid safetensors file: {reason}")]
    CorruptWeights {
        /// The file.
        path: PathBuf,
        /// What the parser reported.
        reason: String,
    },

    /// The checkpoint's keys do not match the model.
    #[error("{}", .0)]
    KeyMismatch(Box<KeyMismatch>),

    /// A tensor has a dtype that cannot be loaded as float weights.
    #[error("{path}: tensor `{key}` has dtype {dtype}, expected F32, F16 or BF16")]
    UnsupportedDtype {
        /// The file.
        path: PathBuf,
        /// The tensor.
        key: String,
        /// The dtype found.
        dtype: String,
    },

    /// A model folder or file is not laid out as expected.
    #[error("{path}: {reason}")]
    Layout {
        /// The folder or file.
        path: PathBuf,
        /// What was expected.
        reason: String,
    },

    /// An input tensor has the wrong shape.
    #[error("{what}: {reason}")]
    BadInput {
        /// The input.
        what: String,
        /// What was expected.
        reason: String,
    },

    /// A tokenizer file or prompt problem.
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),

    /// A LoRA error (bad adapter file or adapter that does not fit the model).
    #[error(transparent)]
    Lora(#[from] lora_core::LoraError),
}

/// Missing, unexpected and mis-shaped keys of one checkpoint, found together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyMismatch {
    /// The file.
    pub path: PathBuf,
    /// `text_encoder`, `vae` or `unet`.
    pub component: String,
    /// Parameters of the model absent from the file (first few), and the total count.
    pub missing: (Vec<String>, usize),
    /// Keys of the file the model does not have (first few), and the total count.
    pub unexpected: (Vec<String>, usize),
    /// Keys whose shape differs: `key: file [..] vs model [..]` (first few), and the count.
    pub mismatched: (Vec<String>, usize),
}

impl std::fmt::Display for KeyMismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}: {} weights do not match the model: {}",
            self.path.display(),
            self.component,
            summary(&self.missing, &self.unexpected, &self.mismatched)
        )
    }
}

fn summary(
    missing: &(Vec<String>, usize),
    unexpected: &(Vec<String>, usize),
    mismatched: &(Vec<String>, usize),
) -> String {
    let mut parts = Vec::new();
    for (label, (first, count)) in [
        ("missing", missing),
        ("unexpected", unexpected),
        ("wrong shape", mismatched),
    ] {
        if *count > 0 {
            let more = if *count > first.len() {
                format!(", ... ({} more)", count - first.len())
            } else {
                String::new()
            };
            parts.push(format!("{count} {label} [{}{more}]", first.join(", ")));
        }
    }
    parts.join("; ")
}

/// Short alias for results of this crate.
pub type Result<T, E = SdModelError> = std::result::Result<T, E>;
