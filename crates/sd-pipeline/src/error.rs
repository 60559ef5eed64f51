//! Error type of the pipeline.

use std::path::PathBuf;

/// Everything that can stop loading a model or sampling from it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    /// Stopped by [`crate::request_stop`] between two sampler steps.
    #[error("interrupted")]
    Interrupted,
    /// An input is wrong: a size, a strength, a sample prompt's option, an embedding that
    /// does not fit the model, a model path.
    #[error("{origin}: {reason}")]
    Invalid {
        /// The input: a file, an option or a prompt.
        origin: String,
        /// What is wrong and what was expected.
        reason: String,
    },
    /// Sampling ended in NaN or infinite latents, which would decode to a black image.
    #[error("the denoised latents are not finite (NaN or inf), so no image was made: a LoRA strength or guidance scale far too large, or a broken LoRA or model")]
    NonFinite,
    /// A file or folder could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Writing an image failed.
    #[error("{path}: {reason}")]
    Image {
        /// The file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// A model problem (loading, shapes, LoRA files, embeddings).
    #[error(transparent)]
    Model(#[from] sd_model::SdModelError),
    /// A LoRA problem.
    #[error(transparent)]
    Lora(#[from] lora_core::LoraError),
    /// A scheduler or sampler problem.
    #[error(transparent)]
    Sched(#[from] sd_sched::SchedError),
    /// A tokenizer problem.
    #[error(transparent)]
    Tokenizer(#[from] sd_model::tokenizer::TokenizerError),
}
