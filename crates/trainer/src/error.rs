//! Error type of the trainer library.

use std::path::PathBuf;

/// Everything that can stop training, generation or conversion.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrainError {
    /// Stopped by [`crate::train::request_stop`] (Ctrl-C) while sample images were drawn.
    #[error("interrupted")]
    Interrupted,
    /// A configuration value or key is wrong.
    #[error("{origin}: {reason}")]
    Config {
        /// The file, `--set` argument or section.
        origin: String,
        /// What is wrong and what was expected.
        reason: String,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The loss or gradients stopped being finite.
    #[error(
        "training diverged at step {step}: loss is {loss}, gradient norm {grad_norm} (lower train.learning_rate, \
         set train.max_grad_norm, or set train.on_non_finite = \"skip\"); the last saved LoRA and state are kept"
    )]
    NonFinite {
        /// The optimizer step.
        step: usize,
        /// The loss value.
        loss: f32,
        /// The global gradient norm (NaN when the loss already was).
        grad_norm: f32,
    },
    /// The GPU-side ordering of cuDNN / cuBLAS calls (`--vendor-sync device`) gave up
    /// waiting, so a library call may have read its inputs before they were written.
    #[error(
        "GPU-side ordering of cuDNN / cuBLAS calls timed out {timeouts} time(s) by step {step}, so results may be \
         wrong: rerun with --vendor-sync host (SD_LORA_VENDOR_SYNC=host); the last saved LoRA and state are kept"
    )]
    OrderingTimeout {
        /// The optimizer step read back last.
        step: usize,
        /// Timeouts so far.
        timeouts: u64,
    },
    /// A model problem.
    #[error(transparent)]
    Model(#[from] sd_model::SdModelError),
    /// A LoRA problem.
    #[error(transparent)]
    Lora(#[from] lora_core::LoraError),
    /// A scheduler problem.
    #[error(transparent)]
    Sched(#[from] sd_sched::SchedError),
    /// A dataset problem.
    #[error(transparent)]
    Data(#[from] sd_data::DataError),
    /// A tokenizer problem.
    #[error(transparent)]
    Tokenizer(#[from] sd_model::tokenizer::TokenizerError),
    /// Writing an image failed.
    #[error("{path}: {reason}")]
    Image {
        /// The file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
}

/// Pipeline errors keep their meaning: a bad input is a [`TrainError::Config`] naming it.
impl From<sd_pipeline::PipelineError> for TrainError {
    fn from(e: sd_pipeline::PipelineError) -> Self {
        use sd_pipeline::PipelineError as P;
        match e {
            P::Interrupted => Self::Interrupted,
            e @ P::NonFinite => Self::Config { origin: "sampling".into(), reason: e.to_string() },
            P::Invalid { origin, reason } => Self::Config { origin, reason },
            P::Io { path, source } => Self::Io { path, source },
            P::Image { path, reason } => Self::Image { path, reason },
            P::Model(e) => Self::Model(e),
            P::Lora(e) => Self::Lora(e),
            P::Sched(e) => Self::Sched(e),
            P::Tokenizer(e) => Self::Tokenizer(e),
            // `PipelineError` is non-exhaustive: a later variant keeps its message.
            other => Self::Config { origin: "generation".into(), reason: other.to_string() },
        }
    }
}
