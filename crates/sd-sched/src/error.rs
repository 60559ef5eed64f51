//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong building a schedule or sampler, or stepping one.
#[derive(Debug, thiserror::Error)]
pub enum SchedError {
    /// A scheduler config file could not be read.
    #[error("cannot read scheduler config {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A scheduler config is not valid JSON or has a value of the wrong type or variant.
    #[error("invalid scheduler config {origin}: {source}")]
    Parse {
        /// The file, or `<string>` for configs parsed from memory.
        origin: String,
        /// The serde error; its message names the offending value and its position.
        source: serde_json::Error,
    },
    /// A config key holds a value outside its valid range.
    #[error("scheduler config {}key `{key}`: expected {expected}, found {found}", origin_prefix(.origin))]
    InvalidValue {
        /// The file the config was read from (`<string>` for JSON parsed from memory);
        /// `None` for a config built in code, or checked against a sampler's settings.
        origin: Option<String>,
        /// The diffusers config key.
        key: &'static str,
        /// What the key accepts.
        expected: String,
        /// What it holds.
        found: String,
    },
    /// The config asks for a diffusers feature this crate does not implement for a sampler.
    #[error("{sampler} does not support `{key}` = {value}")]
    Unsupported {
        /// The sampler (diffusers class name).
        sampler: &'static str,
        /// The diffusers config key.
        key: &'static str,
        /// The requested value.
        value: String,
    },
    /// A sampler name that [`crate::SamplerSpec`] does not know.
    #[error("unknown sampler `{0}`; expected a diffusers class name or one of {known}", known = crate::sampler::KNOWN_NAMES)]
    UnknownSampler(String),
    /// `num_inference_steps` outside `1..=num_train_timesteps` (or too few for the sampler).
    #[error("num_inference_steps = {steps} is invalid: expected {expected}")]
    InvalidSteps {
        /// The requested number of steps.
        steps: usize,
        /// The valid range.
        expected: String,
    },
    /// A sampler was used before [`crate::Sampler::set_timesteps`].
    #[error("call set_timesteps before using the sampler")]
    TimestepsNotSet,
    /// A step index past the end of the timesteps.
    #[error("step index {index} is out of range: the sampler has {len} timesteps")]
    StepOutOfRange {
        /// The index given.
        index: usize,
        /// Number of timesteps.
        len: usize,
    },
    /// A multistep sampler was stepped out of order (it keeps history between steps).
    #[error("{sampler} must be stepped in order: expected step {expected}, got {got}")]
    StepOutOfOrder {
        /// The sampler (diffusers class name).
        sampler: &'static str,
        /// The next step index the sampler expects.
        expected: usize,
        /// The step index given.
        got: usize,
    },
    /// A noise source could not provide noise (for example a replay queue ran dry).
    #[error("noise source exhausted: {0}")]
    NoiseExhausted(String),
    /// A training-helper argument is invalid.
    #[error("invalid argument `{name}`: {reason}")]
    InvalidArgument {
        /// The argument.
        name: &'static str,
        /// Why it is rejected.
        reason: String,
    },
}

impl SchedError {
    /// An [`SchedError::InvalidValue`] without an origin (the config loaders add theirs).
    pub(crate) fn invalid_value(key: &'static str, expected: impl Into<String>, found: impl ToString) -> Self {
        Self::InvalidValue {
            origin: None,
            key,
            expected: expected.into(),
            found: found.to_string(),
        }
    }
}

/// `"<origin>: "` where a range error knows its file, so the message names it.
fn origin_prefix(origin: &Option<String>) -> String {
    origin.as_ref().map(|o| format!("{o}: ")).unwrap_or_default()
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, SchedError>;
