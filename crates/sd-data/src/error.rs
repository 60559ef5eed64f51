//! The crate's error type.

use std::path::{Path, PathBuf};

/// Boxed error returned by user-supplied encoders ([`crate::LatentEncoder`], [`crate::TextEncoder`]).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong while reading, bucketing, caching or loading a dataset.
///
/// Every variant that concerns a file names it, so a message can be acted on without a debugger.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// A file or directory could not be read or written.
    #[error("cannot access {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying OS error.
        #[source]
        source: std::io::Error,
    },
    /// An image file is corrupt, truncated or in an unsupported format.
    #[error("cannot decode image {path}: {message}")]
    CorruptImage {
        /// The image file.
        path: PathBuf,
        /// What the decoder reported.
        message: String,
    },
    /// An image is smaller than the configured minimum side length.
    #[error("image {path} is {width}x{height} px, below the minimum side of {min_side} px (min_image_size)")]
    ImageTooSmall {
        /// The image file.
        path: PathBuf,
        /// Width after EXIF orientation.
        width: u32,
        /// Height after EXIF orientation.
        height: u32,
        /// The minimum side length that was required.
        min_side: u32,
    },
    /// No aspect-ratio bucket fits an image: with `bucket_no_upscale`, scaled down to the
    /// buckets' area, its shorter side would be under one bucket step.
    #[error("image {path} is {width}x{height} px: no bucket fits it (with bucket_no_upscale, scaled to the buckets' area its shorter side would be under one bucket step of {step} px); use a larger image, or one of a less extreme aspect ratio, or turn bucket_no_upscale off")]
    NoBucketFits {
        /// The image file.
        path: PathBuf,
        /// Width after EXIF orientation.
        width: u32,
        /// Height after EXIF orientation.
        height: u32,
        /// The bucket step (`bucket_reso_steps`).
        step: u32,
    },
    /// An image (by its header) has more pixels than are decoded: a decompression bomb or
    /// a damaged header, refused before memory for it is reserved.
    #[error("image {path} is {width}x{height} px, more than the {max_pixels} pixels an image may have (PIL's limit)")]
    ImageTooLarge {
        /// The image file.
        path: PathBuf,
        /// Width in the file's header.
        width: u32,
        /// Height in the file's header.
        height: u32,
        /// The most pixels an image may have ([`crate::image_io::MAX_IMAGE_PIXELS`]).
        max_pixels: u64,
    },
    /// An image's bucket needs it enlarged to more pixels than an image may have: an image
    /// of an extreme aspect ratio (a long thin strip) scaled so its short side covers its
    /// bucket. Refused before the resize would reserve its buffer (tens of GiB for a
    /// strip of a few million pixels), which would abort the process.
    #[error("image {path} is {width}x{height} px: to cover its {bucket_width}x{bucket_height} bucket it would be resized to {resized_width}x{resized_height} px, more than the {max_pixels} pixels an image may have; crop it to a less extreme aspect ratio, or turn bucket_no_upscale on (which never enlarges)")]
    ResizeTooLarge {
        /// The image file.
        path: PathBuf,
        /// Width after EXIF orientation.
        width: u32,
        /// Height after EXIF orientation.
        height: u32,
        /// The bucket's width.
        bucket_width: u32,
        /// The bucket's height.
        bucket_height: u32,
        /// Width the bucket would resize the image to.
        resized_width: u32,
        /// Height the bucket would resize the image to.
        resized_height: u32,
        /// The most pixels a resized image may have ([`crate::image_io::MAX_IMAGE_PIXELS`]).
        max_pixels: u64,
    },
    /// A caption file is not valid UTF-8.
    #[error(
        "caption file {path} is not valid UTF-8 (byte {valid_up_to} starts an invalid sequence)"
    )]
    CaptionNotUtf8 {
        /// The caption file.
        path: PathBuf,
        /// Number of leading bytes that were valid.
        valid_up_to: usize,
    },
    /// An image has no caption (no caption file, an empty one, or no metadata entry) and the
    /// configuration does not allow falling back to the folder's class tokens.
    #[error("image {path} has no caption (looked for {tried}) and {why}")]
    MissingCaption {
        /// The image file.
        path: PathBuf,
        /// Caption files that were looked for.
        tried: String,
        /// Why no fallback was used.
        why: String,
    },
    /// An image's loss mask (`alpha_mask`, or a file in `mask_dir`) is missing or does not
    /// fit the image.
    #[error("loss mask of image {path}: {message}")]
    Mask {
        /// The image file.
        path: PathBuf,
        /// What is wrong (the mask files looked for, or the mismatched sizes).
        message: String,
    },
    /// No usable image was found.
    #[error("dataset is empty: no usable images in {dirs}")]
    EmptyDataset {
        /// The directories that were searched, comma separated.
        dirs: String,
    },
    /// A sub-folder of a kohya-style training folder is not named `<repeats>_<class tokens>`.
    #[error("folder {path} does not match the kohya pattern `<repeats>_<class tokens>` (e.g. `10_sks dog`): {reason}")]
    UnknownFolderName {
        /// The folder.
        path: PathBuf,
        /// What is wrong with the name.
        reason: String,
    },
    /// A configured image directory does not exist or is not a directory.
    #[error("image directory {path} does not exist or is not a directory")]
    NotADirectory {
        /// The configured path.
        path: PathBuf,
    },
    /// A line of a Hugging Face `metadata.jsonl` file is malformed.
    #[error("{path}:{line}: {message}")]
    Metadata {
        /// The metadata file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong with the line.
        message: String,
    },
    /// An entry of a kohya fine-tuning metadata file is unusable, or an image of a folder
    /// with a `metadata.jsonl` is on none of its lines (and left out).
    #[error("{path}: image `{key}`: {message}")]
    KohyaMetadata {
        /// The metadata file.
        path: PathBuf,
        /// The entry's image key.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// A configuration value is invalid.
    #[error("invalid dataset config `{key}`: {message}")]
    Config {
        /// The offending key (kohya-style name).
        key: String,
        /// What was expected.
        message: String,
    },
    /// A configuration file could not be parsed.
    #[error("cannot parse dataset config {path}: {message}")]
    ConfigFile {
        /// The configuration file.
        path: PathBuf,
        /// What the parser reported.
        message: String,
    },
    /// A cache file is unusable or a required cache entry is missing.
    #[error("cache file {path}: {message}")]
    Cache {
        /// The cache file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A user-supplied encoder (VAE or text encoder) failed or returned a malformed tensor.
    #[error("encoder `{identity}` failed: {source}")]
    Encoder {
        /// The encoder's identity string.
        identity: String,
        /// The encoder's error.
        #[source]
        source: BoxError,
    },
    /// A host tensor could not be converted to the requested shape or rank.
    #[error("tensor shape {shape:?}: {message}")]
    Shape {
        /// The tensor's shape.
        shape: Vec<usize>,
        /// What was expected.
        message: String,
    },
    /// A background loader worker stopped unexpectedly.
    #[error("data loader worker stopped: {message}")]
    Loader {
        /// What happened.
        message: String,
    },
}

impl DataError {
    /// The file or directory this error is about, if any.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Self::Io { path, .. }
            | Self::CorruptImage { path, .. }
            | Self::ImageTooSmall { path, .. }
            | Self::NoBucketFits { path, .. }
            | Self::ImageTooLarge { path, .. }
            | Self::ResizeTooLarge { path, .. }
            | Self::CaptionNotUtf8 { path, .. }
            | Self::MissingCaption { path, .. }
            | Self::Mask { path, .. }
            | Self::UnknownFolderName { path, .. }
            | Self::NotADirectory { path }
            | Self::Metadata { path, .. }
            | Self::KohyaMetadata { path, .. }
            | Self::ConfigFile { path, .. }
            | Self::Cache { path, .. } => Some(path),
            Self::EmptyDataset { .. }
            | Self::Config { .. }
            | Self::Encoder { .. }
            | Self::Shape { .. }
            | Self::Loader { .. } => None,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn config(key: &str, message: impl Into<String>) -> Self {
        Self::Config {
            key: key.to_string(),
            message: message.into(),
        }
    }
}

/// Result alias for this crate.
pub type Result<T, E = DataError> = std::result::Result<T, E>;
