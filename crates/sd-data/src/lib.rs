//! Captioned image datasets for diffusion fine-tuning, laid out the way people prepare them for
//! kohya sd-scripts.
//!
//! * **Folders** ([`scan()`], [`mod@scan`]): images (png, jpg/jpeg, webp, bmp; EXIF orientation applied) with
//!   same-stem `.txt` / `.caption` captions; `N_name` folders give repeats and class tokens;
//!   recursion; Hugging Face `metadata.jsonl` folders; several folders with their own options;
//!   regularization folders with their own loss weight.
//! * **Buckets** ([`bucket`]): kohya's aspect-ratio buckets, nearest-aspect assignment, Lanczos
//!   resize and center / random crop, optional no-upscale; a batch never mixes buckets.
//! * **Epoch plans** ([`Dataset::plan_epoch`]): seeded shuffles, repeats, flips, crops and
//!   caption transforms ([`CaptionTransform`]) decided up front, so a run is reproducible.
//! * **Loading** ([`Loader`]): worker threads prepare upcoming batches ([`Batch`]) while the
//!   accelerator trains.
//! * **Caches** ([`cache`]): VAE latents and text embeddings as safetensors files keyed by
//!   everything they depend on; the VAE plugs in through the small [`LatentEncoder`] trait.
//! * **Demo data** ([`demo`]): a deterministic procedural generator of captioned images.
//!
//! Bad input is reported as a [`DataError`] naming the file, or skipped with
//! `skip_bad_images` and listed in [`Dataset::skipped`]. Nothing panics on user data.
//!
//! ```
//! use sd_data::{demo, Dataset, DatasetConfig};
//! let dir = tempfile::tempdir().unwrap();
//! demo::write(dir.path(), &demo::DemoConfig { count: 6, ..Default::default() }).unwrap();
//! let ds = Dataset::open(&DatasetConfig::demo(dir.path())).unwrap();
//! assert_eq!(ds.images().len(), 6);
//! let batch = ds.load_pixels(&ds.plan_epoch(0)[0]).unwrap();
//! let pixels = batch.pixels().unwrap();
//! assert_eq!(pixels.shape[1], 3);
//! assert!(pixels.data.iter().all(|v| (-1.0..=1.0).contains(v)));
//! ```
//!
//! ## Depending on this crate
//!
//! Its API takes and returns [burn](https://burn.dev) 0.21 types (`Tensor<B, D>`,
//! `Module<B>`, backends). Use the same burn, re-exported as [`sd_data::burn`](crate::burn),
//! or depend on `burn = "=0.21.0"` yourself: a second burn version's types would not fit.
#![deny(missing_docs)]

/// The burn this crate is built on (0.21), for its API's types without a burn dependency of
/// one's own.
pub use burn;

mod batch;
pub mod bucket;
pub mod cache;
mod caption;
mod config;
mod dataset;
pub mod demo;
mod error;
pub mod face;
pub mod image_io;
mod kohya_config;
mod loader;
pub mod resize;
pub mod scan;

pub use batch::{Batch, BatchData, HostTensor};
pub use bucket::{make_bucket_resolutions, BucketAssignment, BucketManager, Reso};
pub use cache::{
    CacheStats, LatentCache, LatentEncoder, LatentKey, TextEmbeddingCache, TextEncoder,
};
pub use caption::{CaptionTransform, TokenWarmup};
pub use config::{capped_bucket_side, DatasetConfig, MissingCaption, Resolution, SubsetConfig, MAX_SIDE};
pub use dataset::{BatchPlan, Dataset, FolderSummary, SamplePlan, MAX_SAMPLES_PER_EPOCH};
pub use error::{BoxError, DataError, Result};
pub use loader::{Loader, LoaderOptions};
pub use resize::ResizeInterpolation;
pub use scan::{
    parse_kohya_folder_name, scan, ImageRecord, ImageSource, MaskSource, ResolvedSubset, Scan,
};
