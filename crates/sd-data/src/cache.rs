//! On-disk caches: VAE latents per (image content, bucket, crop, flip, VAE identity) and text
//! embeddings per (caption, text-encoder identity), stored as safetensors files.
//!
//! Files are named by a SHA-256 of their key, so any change to the key is a miss; the key is also
//! written into the file's metadata and checked on load, so a stale or damaged file is a miss
//! (and is rewritten) rather than an error.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use sha2::{Digest, Sha256};

use crate::batch::{Batch, BatchData, HostTensor};
use crate::bucket::{crop_offset, Reso};
use crate::dataset::{BatchPlan, Dataset, SamplePlan};
use crate::error::{BoxError, DataError, Result};

/// Version of the cache key format; bump to invalidate every existing cache entry.
const CACHE_FORMAT: &str = "sd-data-cache-v1";

/// Encodes pixels into latents: implemented by sd-model's VAE encoder.
///
/// `pixels` is `[N, 3, H, W]` in `[-1, 1]` (all samples share a bucket). The result is
/// `[N, C, H / f, W / f]`, already in the form the diffusion model consumes (sampled or mean,
/// times the scaling factor); the cache stores it verbatim.
pub trait LatentEncoder {
    /// A string that changes whenever the encoder's output would (model file hash, dtype,
    /// scaling factor, sampling mode, ...). It is part of every cache key.
    fn identity(&self) -> String;

    /// Encodes a batch of images.
    fn encode(&self, pixels: &HostTensor) -> Result<HostTensor, BoxError>;
}

/// Encodes captions for the text-embedding cache: implemented by sd-model's text encoder(s).
pub trait TextEncoder {
    /// A string that changes whenever the encoder's output would (model hash, layer choice, ...).
    fn identity(&self) -> String;

    /// Encodes captions; one map of named tensors (e.g. `hidden_states`, `pooled`) per caption.
    fn encode(&self, captions: &[String]) -> Result<Vec<BTreeMap<String, HostTensor>>, BoxError>;
}

/// Everything a cached latent depends on.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct LatentKey {
    /// Content hash of the source image.
    pub content_hash: String,
    /// Bucket `(width, height)`.
    pub bucket: Reso,
    /// Resized size before cropping.
    pub resized: Reso,
    /// Crop `(left, top)`.
    pub crop: Reso,
    /// Flipped horizontally.
    pub flip: bool,
    /// The filter that resized the image ([`Dataset::resize_interpolation`]).
    pub interpolation: crate::ResizeInterpolation,
    /// [`LatentEncoder::identity`].
    pub encoder: String,
    /// [`crate::MaskSource::identity`] of the image's loss mask, which the entry then holds
    /// too (at the latent's size).
    pub mask: Option<String>,
}

impl LatentKey {
    /// The key of a planned sample.
    pub fn for_sample(ds: &Dataset, s: &SamplePlan, encoder: &str) -> Self {
        Self {
            content_hash: ds.images()[s.image].content_hash.clone(),
            bucket: s.bucket,
            resized: s.resized,
            crop: s.crop,
            flip: s.flip,
            interpolation: ds.resize_interpolation(s),
            encoder: encoder.to_string(),
            mask: ds.images()[s.image].mask.as_ref().map(|m| m.identity()),
        }
    }

    fn canonical(&self) -> String {
        // Keys without a mask are spelled as before masks existed: their entries stay valid.
        let mask = self.mask.as_ref().map_or(String::new(), |m| format!("|mask={m}"));
        // Entries from before the filter was chosen per image (all Lanczos) miss, and are
        // encoded anew.
        format!(
            "{CACHE_FORMAT}|latent|{}|bucket={}x{}|resized={}x{}|filter={}|crop={},{}|flip={}|encoder={}{mask}",
            self.content_hash,
            self.bucket.0,
            self.bucket.1,
            self.resized.0,
            self.resized.1,
            self.interpolation.name(),
            self.crop.0,
            self.crop.1,
            self.flip,
            self.encoder
        )
    }
}

/// Hit / miss counts of a caching pass.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Entries that were already cached and valid.
    pub hits: usize,
    /// Entries that were computed and written.
    pub misses: usize,
}

fn digest_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A directory of safetensors files keyed by a string.
#[derive(Clone, Debug)]
struct KeyedStore {
    dir: PathBuf,
}

impl KeyedStore {
    fn new(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir
            .join(format!("{}.safetensors", &digest_hex(key)[..40]))
    }

    /// `None` when missing, unreadable, or written for a different key.
    fn load(&self, key: &str) -> Option<BTreeMap<String, HostTensor>> {
        let bytes = std::fs::read(self.path(key)).ok()?;
        let (_, meta) = SafeTensors::read_metadata(&bytes).ok()?;
        if meta.metadata().as_ref()?.get("key")? != key {
            return None;
        }
        let st = SafeTensors::deserialize(&bytes).ok()?;
        let mut out = BTreeMap::new();
        for (name, view) in st.iter() {
            if view.dtype() != Dtype::F32 {
                return None;
            }
            let data = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            out.insert(
                name.to_string(),
                HostTensor::new(data, view.shape().to_vec()).ok()?,
            );
        }
        Some(out)
    }

    fn store(&self, key: &str, tensors: &BTreeMap<String, HostTensor>) -> Result<()> {
        let path = self.path(key);
        let cache_err = |message: String| DataError::Cache {
            path: path.clone(),
            message,
        };
        let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
            .iter()
            .map(|(n, t)| {
                (
                    n.clone(),
                    t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    t.shape.clone(),
                )
            })
            .collect();
        let mut views = Vec::with_capacity(bytes.len());
        for (name, data, shape) in &bytes {
            let view = TensorView::new(Dtype::F32, shape.clone(), data)
                .map_err(|e| cache_err(e.to_string()))?;
            views.push((name.clone(), view));
        }
        let meta = HashMap::from([("key".to_string(), key.to_string())]);
        let serialized =
            safetensors::serialize(views, Some(meta)).map_err(|e| cache_err(e.to_string()))?;
        // Write-then-rename so an interrupted run never leaves a truncated entry under the real name.
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, serialized).map_err(|e| DataError::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| DataError::io(&path, e))
    }
}

/// Latent cache directory.
#[derive(Clone, Debug)]
pub struct LatentCache {
    store: KeyedStore,
}

impl LatentCache {
    /// Opens (creating if needed) a cache directory.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        Ok(Self {
            store: KeyedStore::new(dir.as_ref())?,
        })
    }

    /// File that holds (or would hold) `key`.
    pub fn path(&self, key: &LatentKey) -> PathBuf {
        self.store.path(&key.canonical())
    }

    /// The cached latent `[1, C, h, w]`, or `None` on a miss.
    pub fn load(&self, key: &LatentKey) -> Option<HostTensor> {
        self.load_with_mask(key).map(|(latent, _)| latent)
    }

    /// The cached latent `[1, C, h, w]` and, for a key with a mask, the mask
    /// `[1, 1, h, w]`; `None` on a miss (a key with a mask whose entry lacks it is a miss).
    pub fn load_with_mask(&self, key: &LatentKey) -> Option<(HostTensor, Option<HostTensor>)> {
        let mut entry = self.store.load(&key.canonical())?;
        let latent = entry.remove("latent")?;
        let mask = match key.mask {
            Some(_) => Some(entry.remove("mask")?),
            None => None,
        };
        // A mask that does not fit its latent is a damaged entry: a miss.
        if let (Some(m), [_, _, h, w]) = (&mask, latent.shape.as_slice()) && m.shape != [1, 1, *h, *w] {
            return None;
        }
        Some((latent, mask))
    }

    /// Stores a latent `[1, C, h, w]`.
    pub fn store(&self, key: &LatentKey, latent: &HostTensor) -> Result<()> {
        self.store_with_mask(key, latent, None)
    }

    /// Stores a latent `[1, C, h, w]` with its loss mask `[1, 1, h, w]`.
    pub fn store_with_mask(&self, key: &LatentKey, latent: &HostTensor, mask: Option<&HostTensor>) -> Result<()> {
        let mut entry = BTreeMap::from([("latent".to_string(), latent.clone())]);
        if let Some(mask) = mask {
            entry.insert("mask".to_string(), mask.clone());
        }
        self.store.store(&key.canonical(), &entry)
    }

    /// Encodes every sample variant the dataset can produce — each image in its bucket with the
    /// center crop, flipped too when `flip_aug` is on — that is not cached yet, in encoder
    /// batches of up to `batch_size` samples of one bucket.
    ///
    /// Fails with a config error when a subset uses `random_crop` (crops are not enumerable),
    /// crops around faces (`face_crop_aug_range`: scale and crop drawn per epoch) or uses
    /// `color_aug` (the pixels change from epoch to epoch).
    pub fn cache_dataset(
        &self,
        ds: &Dataset,
        encoder: &dyn LatentEncoder,
        batch_size: usize,
    ) -> Result<CacheStats> {
        if ds.has_random_crop() {
            return Err(DataError::config(
                "random_crop",
                "latent caching needs deterministic crops; turn random_crop off or disable the latent cache",
            ));
        }
        if ds.has_face_crop() {
            return Err(DataError::config(
                "face_crop_aug_range",
                "latent caching needs deterministic crops; a face crop's scale and crop change every epoch: unset face_crop_aug_range or disable the latent cache",
            ));
        }
        if ds.has_color_aug() {
            return Err(DataError::config(
                "color_aug",
                "latent caching needs the same pixels every epoch; turn color_aug off or disable the latent cache",
            ));
        }
        let identity = encoder.identity();
        let mut stats = CacheStats::default();
        let mut misses: BTreeMap<Reso, Vec<SamplePlan>> = BTreeMap::new();
        for i in 0..ds.images().len() {
            if ds.repeats(i) == 0 {
                continue;
            }
            let a = ds.assignment(i);
            let crop = crop_offset::<rand_chacha::ChaCha8Rng>(a.resized, a.bucket, None);
            let flips: &[bool] = if ds.flip_aug(i) {
                &[false, true]
            } else {
                &[false]
            };
            for &flip in flips {
                let s = SamplePlan {
                    image: i,
                    caption: String::new(),
                    bucket: a.bucket,
                    resized: a.resized,
                    crop,
                    flip,
                    color: None,
                    loss_weight: 1.0,
                    diff_output_preservation: false,
                };
                if self
                    .load_with_mask(&LatentKey::for_sample(ds, &s, &identity))
                    .is_some()
                {
                    stats.hits += 1;
                } else {
                    misses.entry(a.bucket).or_default().push(s);
                }
            }
        }
        for (bucket, samples) in misses {
            for chunk in samples.chunks(batch_size.max(1)) {
                let plan = BatchPlan {
                    bucket,
                    samples: chunk.to_vec(),
                };
                self.encode_and_store(ds, &plan, encoder, &identity)?;
                stats.misses += chunk.len();
            }
        }
        Ok(stats)
    }

    fn encode_and_store(
        &self,
        ds: &Dataset,
        plan: &BatchPlan,
        encoder: &dyn LatentEncoder,
        identity: &str,
    ) -> Result<()> {
        let batch = ds.load_pixels(plan)?;
        let Some(pixels) = batch.pixels() else {
            return Err(DataError::Loader {
                message: "pixel loader returned latents".into(),
            });
        };
        let latents = encoder
            .encode(pixels)
            .map_err(|source| DataError::Encoder {
                identity: identity.to_string(),
                source,
            })?;
        if latents.shape.len() != 4 || latents.shape[0] != plan.samples.len() {
            return Err(DataError::Encoder {
                identity: identity.to_string(),
                source: format!(
                    "returned shape {:?} for {} images; expected [N, C, h, w]",
                    latents.shape,
                    plan.samples.len()
                )
                .into(),
            });
        }
        let latent_hw = (latents.shape[2], latents.shape[3]);
        for (k, s) in plan.samples.iter().enumerate() {
            let row = latents.row(k).ok_or_else(|| DataError::Shape {
                shape: latents.shape.clone(),
                message: format!("has no row {k}"),
            })?;
            let key = LatentKey::for_sample(ds, s, identity);
            // The mask is stored at the latent's size, as the loss uses it.
            let mask = match &key.mask {
                Some(_) => batch.mask_at(k, latent_hw).transpose()?,
                None => None,
            };
            self.store_with_mask(&key, &row, mask.as_ref())?;
        }
        Ok(())
    }

    /// A batch of cached latents for `plan`, with loss masks at the latents' size when the
    /// dataset has any; a missing entry is an error naming its file, and a colour-changed
    /// sample (`color_aug`, never cached) a config error.
    pub fn load_batch(&self, ds: &Dataset, plan: &BatchPlan, identity: &str) -> Result<Batch> {
        let mut rows = Vec::with_capacity(plan.samples.len());
        let mut masks = Vec::with_capacity(plan.samples.len());
        for s in &plan.samples {
            if s.color.is_some() {
                return Err(DataError::config("color_aug", "a colour-changed sample has no cached latent; turn color_aug off or encode its pixels"));
            }
            let key = LatentKey::for_sample(ds, s, identity);
            let (row, mask) = self.load_with_mask(&key).ok_or_else(|| DataError::Cache {
                path: self.path(&key),
                message: format!(
                    "no valid latent for {} (bucket {}x{}, flip {}); run the caching pass first",
                    ds.image_path(s.image).display(),
                    s.bucket.0,
                    s.bucket.1,
                    s.flip
                ),
            })?;
            let &[_, _, h, w] = row.shape.as_slice() else {
                return Err(DataError::Cache {
                    path: self.path(&key),
                    message: format!("holds a latent of shape {:?}; expected [1, C, h, w]", row.shape),
                });
            };
            // Samples without a mask weigh the whole latent, as kohya fills them with ones.
            masks.push(mask.unwrap_or_else(|| HostTensor {
                data: vec![1.0; h * w],
                shape: vec![1, 1, h, w],
            }));
            rows.push(row);
        }
        let latents = HostTensor::stack_rows(&rows)?;
        let mut batch = Batch::from_plan(ds, plan, BatchData::Latents(latents));
        if ds.has_masks() {
            batch.masks = Some(HostTensor::stack_rows(&masks)?);
        }
        Ok(batch)
    }
}

/// Text-embedding cache directory. Valid only while the text encoder is frozen and captions are
/// fixed ([`Dataset::captions_are_fixed`]).
#[derive(Clone, Debug)]
pub struct TextEmbeddingCache {
    store: KeyedStore,
}

impl TextEmbeddingCache {
    /// Opens (creating if needed) a cache directory.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        Ok(Self {
            store: KeyedStore::new(dir.as_ref())?,
        })
    }

    fn key(caption: &str, encoder: &str) -> String {
        format!("{CACHE_FORMAT}|text|encoder={encoder}|caption={caption}")
    }

    /// File that holds (or would hold) a caption's embedding.
    pub fn path(&self, caption: &str, encoder: &str) -> PathBuf {
        self.store.path(&Self::key(caption, encoder))
    }

    /// The cached embedding of `caption`, or `None` on a miss.
    pub fn load(&self, caption: &str, encoder: &str) -> Option<BTreeMap<String, HostTensor>> {
        self.store.load(&Self::key(caption, encoder))
    }

    /// Stores an embedding.
    pub fn store(
        &self,
        caption: &str,
        encoder: &str,
        tensors: &BTreeMap<String, HostTensor>,
    ) -> Result<()> {
        self.store.store(&Self::key(caption, encoder), tensors)
    }

    /// Encodes every distinct caption of the dataset (after the trigger word) that is not cached,
    /// `batch_size` captions per encoder call. Fails with a config error when captions are
    /// shuffled or dropped, because cached embeddings would then be wrong.
    pub fn cache_dataset(
        &self,
        ds: &Dataset,
        encoder: &dyn TextEncoder,
        batch_size: usize,
    ) -> Result<CacheStats> {
        if !ds.captions_are_fixed() {
            return Err(DataError::config(
                "shuffle_caption",
                "text-embedding caching needs fixed captions: turn off shuffle_caption, enable_wildcard, caption_dropout_rate, caption_dropout_every_n_epochs, caption_tag_dropout_rate and token_warmup_step",
            ));
        }
        let identity = encoder.identity();
        let captions: BTreeSet<String> = (0..ds.images().len())
            .map(|i| ds.fixed_caption(i))
            .collect();
        let mut stats = CacheStats::default();
        let missing: Vec<String> = captions
            .into_iter()
            .filter(|c| {
                let hit = self.load(c, &identity).is_some();
                stats.hits += usize::from(hit);
                !hit
            })
            .collect();
        for chunk in missing.chunks(batch_size.max(1)) {
            let out = encoder.encode(chunk).map_err(|source| DataError::Encoder {
                identity: identity.clone(),
                source,
            })?;
            if out.len() != chunk.len() {
                return Err(DataError::Encoder {
                    identity: identity.clone(),
                    source: format!(
                        "returned {} embeddings for {} captions",
                        out.len(),
                        chunk.len()
                    )
                    .into(),
                });
            }
            for (caption, tensors) in chunk.iter().zip(&out) {
                self.store(caption, &identity, tensors)?;
            }
            stats.misses += chunk.len();
        }
        Ok(stats)
    }
}
