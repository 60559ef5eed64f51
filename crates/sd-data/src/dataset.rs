//! A scanned, bucketed dataset and its seeded per-epoch batch plans.

use std::collections::BTreeMap;
use std::path::PathBuf;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::bucket::{crop_offset, BucketAssignment, BucketManager, Reso};
use crate::caption::CaptionTransform;
use crate::config::{DatasetConfig, SubsetConfig};
use crate::error::{DataError, Result};
use crate::face::{face_crop, face_in_name, FaceBox};
use crate::image_io::{ColorAug, MAX_IMAGE_PIXELS};
use crate::scan::{scan, scan_memory, ImageRecord, ResolvedSubset, Scan};

/// One sample of a batch: which image, how it is cropped and flipped, and its caption.
#[derive(Clone, Debug, PartialEq)]
pub struct SamplePlan {
    /// Index into [`Dataset::images`].
    pub image: usize,
    /// Caption after transforms (empty when dropped).
    pub caption: String,
    /// Bucket `(width, height)`.
    pub bucket: Reso,
    /// Size the image is resized to before cropping.
    pub resized: Reso,
    /// Crop offset `(left, top)` in the resized, un-flipped image.
    pub crop: Reso,
    /// Mirrored horizontally (after cropping).
    pub flip: bool,
    /// Colour change (kohya's `color_aug`), applied before the flip.
    pub color: Option<ColorAug>,
    /// Loss weight.
    pub loss_weight: f32,
    /// Trained towards the model's own prediction without its adapters
    /// ([`SubsetConfig::diff_output_preservation`]).
    pub diff_output_preservation: bool,
}

impl SamplePlan {
    /// SDXL `crop_coords_top_left` as `(top, left)`, in the frame of the (possibly flipped)
    /// training image: a flip mirrors the left offset, as kohya does.
    pub fn crop_top_left(&self) -> Reso {
        let left = if self.flip {
            self.resized.0.saturating_sub(self.crop.0 + self.bucket.0)
        } else {
            self.crop.0
        };
        (self.crop.1, left)
    }
}

/// One batch; all samples share a bucket.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchPlan {
    /// The shared bucket `(width, height)`.
    pub bucket: Reso,
    /// The samples.
    pub samples: Vec<SamplePlan>,
}

/// One image folder of a [`Dataset`] ([`Dataset::folders`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FolderSummary {
    /// The folder's last path component (e.g. `10_mystyle`).
    pub name: String,
    /// Repeats per epoch as configured.
    pub num_repeats: u32,
    /// Usable images in the folder.
    pub images: usize,
    /// A regularization folder.
    pub is_reg: bool,
}

/// A subset's name as kohya's metadata names it: its folder's last component, or a
/// fine-tuning subset's metadata file name.
fn folder_name(subset: &SubsetConfig) -> String {
    let named = subset.metadata_file.as_deref().unwrap_or(&subset.image_dir);
    named.file_name().map_or_else(|| "unnamed".to_owned(), |n| n.to_string_lossy().into_owned())
}

/// A scanned dataset with every image assigned to a bucket.
///
/// ```
/// use sd_data::{demo, Dataset, DatasetConfig, SubsetConfig};
/// let config = DatasetConfig::demo("unused");
/// let samples = demo::generate(&demo::DemoConfig { count: 8, ..Default::default() });
/// let ds = Dataset::from_memory(&config, SubsetConfig::default(), demo::into_memory_images(samples)).unwrap();
/// let epoch = ds.plan_epoch(0);
/// assert_eq!(epoch.iter().map(|b| b.samples.len()).sum::<usize>(), 8);
/// assert!(epoch.iter().all(|b| b.samples.iter().all(|s| s.bucket == b.bucket)));
/// ```
#[derive(Debug)]
pub struct Dataset {
    config: DatasetConfig,
    subsets: Vec<ResolvedSubset>,
    images: Vec<ImageRecord>,
    assignments: Vec<BucketAssignment>,
    repeats: Vec<u32>,
    skipped: Vec<DataError>,
    buckets: BucketManager,
    /// Batches per optimizer step, which turns a batch's place into its step for the
    /// token warmup ([`Dataset::with_steps`]).
    accumulation: usize,
    /// Each image's face box from its file name, where its subset crops around faces
    /// (`face_crop_aug_range`, without buckets).
    faces: Vec<Option<FaceBox>>,
}

/// The most samples (images times repeats) an epoch may have: its plan is built in memory,
/// about a kilobyte and a half per sample. More repeats train no differently from more
/// epochs of fewer (`max_train_epochs` / `max_train_steps` set the length).
pub const MAX_SAMPLES_PER_EPOCH: usize = 1_000_000;

/// Refuses an epoch of more than [`MAX_SAMPLES_PER_EPOCH`] samples, naming the subset
/// with the most (a folder named `1000000000_x` would otherwise exhaust memory).
fn check_epoch_size(images: &[ImageRecord], subsets: &[ResolvedSubset], repeats: &[u32]) -> Result<()> {
    let mut per_subset = vec![0usize; subsets.len()];
    for (img, &r) in images.iter().zip(repeats) {
        per_subset[img.subset] = per_subset[img.subset].saturating_add(r as usize);
    }
    let total = per_subset.iter().fold(0usize, |a, &n| a.saturating_add(n));
    if total <= MAX_SAMPLES_PER_EPOCH {
        return Ok(());
    }
    let (largest, n) = per_subset.iter().enumerate().max_by_key(|(_, n)| **n).map(|(i, n)| (i, *n)).unwrap_or_default();
    let subset = &subsets[largest];
    Err(DataError::config(
        "num_repeats",
        format!(
            "{total} samples per epoch (images times repeats), more than {MAX_SAMPLES_PER_EPOCH}: {} gives {n} ({} repeats); lower the repeats and train for more epochs or steps instead",
            subset.config.image_dir.display(),
            subset.num_repeats
        ),
    ))
}

/// `img`'s bucket, or why it has none: no bucket fits it, or covering its bucket would
/// enlarge it past [`MAX_IMAGE_PIXELS`]. Samples are resized whole before they are cropped,
/// so an extreme strip (e.g. 2 796 202 × 64 px into a 1024 × 256 bucket, 11 184 808 × 256
/// px resized) would otherwise make a loader reserve tens of GiB and abort the process.
/// Face crops resize to at most the covering size or the image's own, so this bounds them
/// too.
fn assign(buckets: &BucketManager, config: &DatasetConfig, img: &ImageRecord) -> Result<BucketAssignment> {
    let size = (img.width, img.height);
    let Some(a) = buckets.select(size) else {
        return Err(DataError::NoBucketFits {
            path: img.source.display_path(),
            width: img.width,
            height: img.height,
            step: config.bucket_reso_steps,
        });
    };
    if u64::from(a.resized.0) * u64::from(a.resized.1) > MAX_IMAGE_PIXELS {
        return Err(DataError::ResizeTooLarge {
            path: img.source.display_path(),
            width: img.width,
            height: img.height,
            bucket_width: a.bucket.0,
            bucket_height: a.bucket.1,
            resized_width: a.resized.0,
            resized_height: a.resized.1,
            max_pixels: MAX_IMAGE_PIXELS,
        });
    }
    Ok(a)
}

/// For an empty dataset: the files of its folders that are not images of a read format
/// (GIFs, TIFFs, ...), counted with one named, or nothing when there are none.
fn unread_files_hint(config: &DatasetConfig) -> String {
    let mut others: Vec<std::path::PathBuf> = config
        .subsets
        .iter()
        .filter_map(|s| std::fs::read_dir(&s.image_dir).ok())
        .flat_map(|entries| entries.flatten().map(|e| e.path()))
        .filter(|p| p.is_file() && !crate::image_io::is_image_path(p))
        .filter(|p| !p.extension().is_some_and(|e| ["txt", "caption", "json", "jsonl", "toml", "npz"].iter().any(|c| c.eq_ignore_ascii_case(&e.to_string_lossy()))))
        .collect();
    others.sort();
    match others.first() {
        None => String::new(),
        Some(first) => format!(
            " ({} other file(s), e.g. {}; the formats read are {})",
            others.len(),
            first.display(),
            crate::image_io::IMAGE_EXTENSIONS.map(|e| format!(".{e}")).join(", ")
        ),
    }
}

impl Dataset {
    /// Scans the configured folders and builds the dataset; see [`Dataset::from_scan`].
    pub fn open(config: &DatasetConfig) -> Result<Self> {
        Self::from_scan(scan(config)?)
    }

    /// A dataset of in-memory images (e.g. [`crate::demo`] data), all using `subset`'s options.
    /// Each image is `(name, pixels, caption)`.
    pub fn from_memory(
        config: &DatasetConfig,
        subset: SubsetConfig,
        images: Vec<(String, image::RgbImage, String)>,
    ) -> Result<Self> {
        Self::from_scan(scan_memory(config, subset, images)?)
    }

    /// A dataset of procedural demo images ([`crate::demo`]) with `config`'s bucketing and batch
    /// options; caption and augmentation options come from `config.subsets[0]` when present
    /// (its `image_dir` is ignored).
    ///
    /// ```
    /// use sd_data::{demo::DemoConfig, Dataset, DatasetConfig};
    /// let ds = Dataset::from_demo(&DatasetConfig::demo(""), &DemoConfig { count: 6, ..Default::default() }).unwrap();
    /// assert_eq!(ds.bucket_table().len(), 3);
    /// ```
    pub fn from_demo(config: &DatasetConfig, demo: &crate::demo::DemoConfig) -> Result<Self> {
        let subset = config.subsets.first().cloned().unwrap_or_default();
        let images = crate::demo::into_memory_images(crate::demo::generate(demo));
        Self::from_memory(config, subset, images)
    }

    /// Builds the dataset from a scan. With `skip_bad_images` off the first problem is returned
    /// as the error; with it on, bad files are left out and listed in [`Dataset::skipped`].
    pub fn from_scan(scan: Scan) -> Result<Self> {
        let Scan {
            config,
            subsets,
            images,
            problems,
        } = scan;
        if !config.skip_bad_images {
            if let Some(first) = problems.into_iter().next() {
                return Err(first);
            }
            return Self::build(config, subsets, images, Vec::new());
        }
        Self::build(config, subsets, images, problems)
    }

    fn build(
        config: DatasetConfig,
        subsets: Vec<ResolvedSubset>,
        images: Vec<ImageRecord>,
        mut skipped: Vec<DataError>,
    ) -> Result<Self> {
        let res = (config.resolution.width, config.resolution.height);
        let buckets = if !config.enable_bucket {
            BucketManager::fixed(res)
        } else if config.bucket_no_upscale {
            BucketManager::no_upscale(res, config.bucket_reso_steps)
        } else {
            BucketManager::predefined(
                res,
                config.min_bucket_reso,
                config.max_bucket_reso,
                config.bucket_reso_steps,
            )
        };
        let mut kept = Vec::with_capacity(images.len());
        let mut assignments = Vec::with_capacity(images.len());
        for img in images {
            match assign(&buckets, &config, &img) {
                Ok(a) => {
                    assignments.push(a);
                    kept.push(img);
                }
                Err(e) if config.skip_bad_images => skipped.push(e),
                Err(e) => return Err(e),
            }
        }
        if kept.iter().all(|i| subsets[i.subset].config.is_reg) {
            let dirs: Vec<String> = config
                .subsets
                .iter()
                .map(|s| s.image_dir.display().to_string())
                .collect();
            return Err(DataError::EmptyDataset {
                dirs: if kept.is_empty() {
                    format!("{}{}", dirs.join(", "), unread_files_hint(&config))
                } else {
                    format!(
                        "{} (only regularization images were found)",
                        dirs.join(", ")
                    )
                },
            });
        }
        // The training folders first: regularization images are balanced to match them, so
        // a training folder that is too large is the one to name.
        let own: Vec<u32> = kept.iter().map(|i| if subsets[i.subset].config.is_reg { 0 } else { subsets[i.subset].num_repeats }).collect();
        check_epoch_size(&kept, &subsets, &own)?;
        let repeats = balance_repeats(&kept, &subsets);
        check_epoch_size(&kept, &subsets, &repeats)?;
        let faces = faces(&config, &subsets, &kept)?;
        Ok(Self {
            config,
            subsets,
            images: kept,
            assignments,
            repeats,
            skipped,
            buckets,
            accumulation: 1,
            faces,
        })
    }

    /// The run's step count for what depends on it, the token warmup: each optimizer step
    /// takes `gradient_accumulation_steps` batches of one epoch, an epoch's last step what
    /// is left (sd-scripts' steps with accelerate, `⌈batches / gradient_accumulation_steps⌉`
    /// per epoch; so [`plan_epoch`](Self::plan_epoch)'s batch `b` of epoch `e` is taken at
    /// step `e · ⌈batches / gradient_accumulation_steps⌉ + b / gradient_accumulation_steps`),
    /// and a subset's `token_warmup_step` below 1 is that fraction of `max_train_steps`
    /// (floored, as sd-scripts resolves it).
    pub fn with_steps(mut self, gradient_accumulation_steps: usize, max_train_steps: usize) -> Self {
        self.accumulation = gradient_accumulation_steps.max(1);
        for s in &mut self.subsets {
            let step = &mut s.config.token_warmup_step;
            if *step > 0.0 && *step < 1.0 {
                *step = (*step * max_train_steps as f64).floor();
            }
        }
        self
    }

    /// Holds out `fraction` of the training images (never regularization images) as a
    /// validation set, chosen by `seed` (kohya's `validation_split`): returns the dataset
    /// without them and the validation dataset, whose images appear once per epoch with no
    /// augmentation (no flips, centre crops, captions as written: no shuffle or dropout).
    /// At least one image stays on each side; an error when that is impossible or
    /// `fraction` is not in `(0, 1)`.
    ///
    /// ```
    /// use sd_data::{demo::DemoConfig, Dataset, DatasetConfig};
    /// let ds = Dataset::from_demo(&DatasetConfig::demo(""), &DemoConfig { count: 10, ..Default::default() }).unwrap();
    /// let (train, validation) = ds.split_validation(0.2, 7).unwrap();
    /// assert_eq!((train.images().len(), validation.images().len()), (8, 2));
    /// ```
    pub fn split_validation(self, fraction: f64, seed: u64) -> Result<(Dataset, Dataset)> {
        let bad = |message: String| DataError::Config { key: "validation_split".into(), message };
        if !(fraction > 0.0 && fraction < 1.0) {
            return Err(bad(format!("must be between 0 and 1, got {fraction}")));
        }
        let is_reg = |img: &ImageRecord| self.subsets[img.subset].config.is_reg;
        let mut candidates: Vec<usize> = (0..self.images.len()).filter(|&i| !is_reg(&self.images[i])).collect();
        if candidates.len() < 2 {
            return Err(bad(format!("needs at least 2 training images, the dataset has {}", candidates.len())));
        }
        let held = ((fraction * candidates.len() as f64).round() as usize).clamp(1, candidates.len() - 1);
        candidates.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        let mut validation = vec![false; self.images.len()];
        for &i in &candidates[..held] {
            validation[i] = true;
        }
        let (mut train_images, mut val_images) = (Vec::new(), Vec::new());
        for (i, img) in self.images.into_iter().enumerate() {
            if validation[i] { val_images.push(img) } else { train_images.push(img) }
        }
        // The same subsets (indices stay valid) without repeats or augmentation.
        let val_subsets = self
            .subsets
            .iter()
            .map(|s| ResolvedSubset {
                config: SubsetConfig {
                    flip_aug: false,
                    random_crop: false,
                    face_crop_aug_range: None,
                    color_aug: false,
                    shuffle_caption: false,
                    caption_dropout_rate: 0.0,
                    caption_dropout_every_n_epochs: 0,
                    caption_tag_dropout_rate: 0.0,
                    token_warmup_step: 0.0,
                    ..s.config.clone()
                },
                num_repeats: 1,
                loss_weight: s.loss_weight,
            })
            .collect();
        let val = Self::build(self.config.clone(), val_subsets, val_images, Vec::new())?;
        let train = Self::build(self.config, self.subsets, train_images, self.skipped)?;
        Ok((train, val))
    }

    /// The configuration.
    pub fn config(&self) -> &DatasetConfig {
        &self.config
    }

    /// Resolved subsets; [`ImageRecord::subset`] indexes this.
    pub fn subsets(&self) -> &[ResolvedSubset] {
        &self.subsets
    }

    /// Usable images.
    pub fn images(&self) -> &[ImageRecord] {
        &self.images
    }

    /// Bucket assignment of image `i`.
    pub fn assignment(&self, i: usize) -> &BucketAssignment {
        &self.assignments[i]
    }

    /// Times image `i` appears per epoch (regularization images are rebalanced, see
    /// [`docs/datasets.md`](https://github.com/sd-lora-rs/sd-lora-rs/blob/main/docs/datasets.md)).
    pub fn repeats(&self, i: usize) -> u32 {
        self.repeats[i]
    }

    /// The bucket manager (predefined buckets, or per-image buckets with `bucket_no_upscale`).
    pub fn bucket_manager(&self) -> &BucketManager {
        &self.buckets
    }

    /// Files left out because `skip_bad_images` was on, each with its error.
    pub fn skipped(&self) -> &[DataError] {
        &self.skipped
    }

    /// A few lines naming the skipped files (the first [`Self::SKIPPED_LISTED`], each with
    /// its error), or `None` when nothing was skipped.
    pub fn skipped_summary(&self) -> Option<String> {
        (!self.skipped.is_empty()).then(|| {
            let mut out = format!("skipped {} bad file(s) (skip_bad_images):", self.skipped.len());
            for e in self.skipped.iter().take(Self::SKIPPED_LISTED) {
                out.push_str(&format!("\n  {e}"));
            }
            if self.skipped.len() > Self::SKIPPED_LISTED {
                out.push_str(&format!("\n  ... and {} more", self.skipped.len() - Self::SKIPPED_LISTED));
            }
            out
        })
    }

    /// How many skipped files [`Self::skipped_summary`] names.
    pub const SKIPPED_LISTED: usize = 20;

    /// Whether any image has a loss mask (a subset with `alpha_mask` or `mask_dir`): then
    /// batches carry [`crate::Batch::masks`].
    pub fn has_masks(&self) -> bool {
        self.images.iter().any(|i| i.mask.is_some())
    }

    /// Samples per epoch (images times repeats).
    pub fn samples_per_epoch(&self) -> usize {
        self.repeats.iter().map(|&r| r as usize).sum()
    }

    /// Batches per epoch: each bucket's samples in batches of `batch_size` (the last one
    /// per bucket may be smaller). Every epoch has this many, whatever it draws (only the
    /// order, captions, flips and crops change), so it is [`plan_epoch`](Self::plan_epoch)`(e).len()`
    /// for any `e` without planning one.
    ///
    /// ```
    /// use sd_data::{demo, Dataset, DatasetConfig, SubsetConfig};
    /// let samples = demo::generate(&demo::DemoConfig { count: 5, ..Default::default() });
    /// let subset = SubsetConfig { num_repeats: Some(3), ..Default::default() };
    /// let config = DatasetConfig { batch_size: 4, ..DatasetConfig::demo("") };
    /// let ds = Dataset::from_memory(&config, subset, demo::into_memory_images(samples)).unwrap();
    /// assert_eq!(ds.batches_per_epoch(), ds.plan_epoch(7).len());
    /// ```
    pub fn batches_per_epoch(&self) -> usize {
        let size = self.config.batch_size.max(1);
        self.bucket_table().values().map(|n| n.div_ceil(size)).sum()
    }

    /// Samples per epoch in each bucket.
    pub fn bucket_table(&self) -> BTreeMap<Reso, usize> {
        let mut table = BTreeMap::new();
        for (a, &r) in self.assignments.iter().zip(&self.repeats) {
            if r > 0 {
                *table.entry(a.bucket).or_insert(0) += r as usize;
            }
        }
        table
    }

    /// Each image folder (subset) as kohya's sd-scripts record it in a LoRA's metadata
    /// (`ss_dataset_dirs`, `ss_reg_dataset_dirs`): its name (the folder's last component;
    /// `unnamed` when empty), configured repeats and usable images, in subset order.
    ///
    /// ```
    /// use sd_data::{demo, Dataset, DatasetConfig, SubsetConfig};
    /// let samples = demo::generate(&demo::DemoConfig { count: 5, ..Default::default() });
    /// let subset = SubsetConfig { image_dir: "train/10_mystyle".into(), num_repeats: Some(10), ..Default::default() };
    /// let ds = Dataset::from_memory(&DatasetConfig::demo(""), subset, demo::into_memory_images(samples)).unwrap();
    /// let folders = ds.folders();
    /// assert_eq!((folders[0].name.as_str(), folders[0].num_repeats, folders[0].images), ("10_mystyle", 10, 5));
    /// ```
    pub fn folders(&self) -> Vec<FolderSummary> {
        let mut folders: Vec<FolderSummary> = self
            .subsets
            .iter()
            .map(|s| FolderSummary {
                name: folder_name(&s.config),
                num_repeats: s.num_repeats,
                images: 0,
                is_reg: s.config.is_reg,
            })
            .collect();
        for img in &self.images {
            folders[img.subset].images += 1;
        }
        folders
    }

    /// How often each tag occurs in each folder's captions, as kohya's `ss_tag_frequency`
    /// counts them (UIs such as A1111 show it as the LoRA's training tags): every image's
    /// caption file as written, split at commas, trimmed and lower-cased, once per image
    /// (repeats are not counted), keyed by folder name as [`folders`](Self::folders) names
    /// them (folders of the same name share one table).
    ///
    /// ```
    /// use sd_data::{Dataset, DatasetConfig, SubsetConfig};
    /// let img = || image::RgbImage::new(64, 64);
    /// let images = vec![("a".into(), img(), "mystyle, Red, circle".into()), ("b".into(), img(), "mystyle, red,, square".into())];
    /// let subset = SubsetConfig { image_dir: "5_mystyle".into(), ..Default::default() };
    /// let ds = Dataset::from_memory(&DatasetConfig::demo(""), subset, images).unwrap();
    /// let tags = &ds.tag_frequency()["5_mystyle"];
    /// assert_eq!((tags["mystyle"], tags["red"], tags["circle"], tags.len()), (2, 2, 1, 4));
    /// ```
    pub fn tag_frequency(&self) -> BTreeMap<String, BTreeMap<String, usize>> {
        let mut out: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
        for img in &self.images {
            let folder = out.entry(folder_name(&self.subsets[img.subset].config)).or_default();
            for tag in img.caption.split(',').map(str::trim).filter(|t| !t.is_empty()) {
                *folder.entry(tag.to_lowercase()).or_insert(0) += 1;
            }
        }
        out
    }

    /// Whether every caption is the same in every epoch, which makes a text-embedding cache valid.
    pub fn captions_are_fixed(&self) -> bool {
        self.subsets.iter().all(|s| s.config.captions_are_fixed())
    }

    /// Caption of image `i` with only the deterministic transforms (trigger word).
    pub fn fixed_caption(&self, i: usize) -> String {
        let img = &self.images[i];
        CaptionTransform::from_subset(&self.subsets[img.subset].config).fixed(&img.caption)
    }

    /// Whether any subset uses random crops (latent caching needs deterministic crops).
    pub fn has_random_crop(&self) -> bool {
        self.subsets.iter().any(|s| s.config.random_crop)
    }

    /// Whether any subset changes colours (kohya's `color_aug`): samples then differ from
    /// epoch to epoch, so their latents cannot be cached.
    pub fn has_color_aug(&self) -> bool {
        self.subsets.iter().any(|s| s.config.color_aug)
    }

    /// Whether any subset crops around faces (`face_crop_aug_range`, without buckets): a
    /// sample's scale and crop then change from epoch to epoch, so its latents cannot be
    /// cached.
    pub fn has_face_crop(&self) -> bool {
        self.faces.iter().any(Option::is_some)
    }

    /// Whether image `i` takes a random crop that can differ from epoch to epoch (its
    /// subset's `random_crop`, with the resized image larger than its bucket), so its
    /// samples are new pixels each time, as with `color_aug`.
    ///
    /// ```
    /// use sd_data::{demo, Dataset, DatasetConfig, SubsetConfig};
    /// let dir = tempfile::tempdir().unwrap();
    /// // Square, portrait and landscape images, cropped to 48x48 squares.
    /// demo::write(dir.path(), &demo::DemoConfig { count: 3, ..Default::default() }).unwrap();
    /// let config = |random_crop| DatasetConfig {
    ///     subsets: vec![SubsetConfig { image_dir: dir.path().into(), random_crop, ..Default::default() }],
    ///     resolution: sd_data::Resolution::square(48),
    ///     enable_bucket: false,
    ///     bucket_reso_steps: 16,
    ///     ..Default::default()
    /// };
    /// let varying = |ds: Dataset| (0..3).filter(|&i| ds.random_crop(i)).count();
    /// assert_eq!(varying(Dataset::open(&config(false)).unwrap()), 0);
    /// // The square image has no room to move its crop.
    /// assert_eq!(varying(Dataset::open(&config(true)).unwrap()), 2);
    /// ```
    pub fn random_crop(&self, i: usize) -> bool {
        let (Some(img), Some(a)) = (self.images.get(i), self.assignments.get(i)) else { return false };
        self.subsets[img.subset].config.random_crop && a.resized != a.bucket
    }

    /// Whether image `i` is cropped around its face (a new scale and crop each epoch).
    pub fn face_crop(&self, i: usize) -> bool {
        self.faces.get(i).is_some_and(Option::is_some)
    }

    /// The filter that resizes sample `s`'s image: its subset's `resize_interpolation`,
    /// else sd-scripts' default for its sizes (area averaging to shrink, Lanczos to
    /// enlarge).
    pub fn resize_interpolation(&self, s: &SamplePlan) -> crate::ResizeInterpolation {
        let img = &self.images[s.image];
        self.subsets[img.subset].config.resize_interpolation.unwrap_or_else(|| crate::ResizeInterpolation::for_resize((img.width, img.height), s.resized))
    }

    /// Whether image `i` may be flipped.
    pub fn flip_aug(&self, i: usize) -> bool {
        self.subsets[self.images[i].subset].config.flip_aug
    }

    /// Path (or in-memory name) of image `i`.
    pub fn image_path(&self, i: usize) -> PathBuf {
        self.images[i].source.display_path()
    }

    /// The batches of `epoch` (counted from 0), fully determined by `seed` and `epoch`:
    /// captions, flips, crops and colour changes (`color_aug`, from a random stream of
    /// their own, once the batches are made) are drawn per sample, samples are shuffled within each bucket
    /// and chunked into batches of `batch_size` (the last one per bucket may be smaller), and
    /// the batch order is shuffled. A subset's `caption_dropout_every_n_epochs` empties its
    /// captions in epochs `N − 1`, `2N − 1`, … (kohya's N-th, 2N-th, … epoch), drawing the
    /// same random numbers as any other epoch. With a token warmup, the captions are drawn
    /// once the batches are (from a random stream of their own), each at its batch's step
    /// ([`with_steps`](Self::with_steps)).
    pub fn plan_epoch(&self, epoch: u64) -> Vec<BatchPlan> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.config.seed);
        rng.set_stream(epoch);
        // With a token warmup a caption depends on its batch's step, known once the
        // batches are: the captions are drawn then, from a stream of their own.
        let warmup = self.subsets.iter().any(|s| s.config.token_warmup_step > 0.0);
        let mut by_bucket: BTreeMap<Reso, Vec<SamplePlan>> = BTreeMap::new();
        for (i, img) in self.images.iter().enumerate() {
            let subset = &self.subsets[img.subset];
            let transform = CaptionTransform::from_subset(&subset.config);
            let a = &self.assignments[i];
            for _ in 0..self.repeats[i] {
                let caption = match warmup {
                    true => String::new(),
                    false => self.epoch_caption(&transform, img, epoch, u64::MAX, &mut rng),
                };
                let flip = subset.config.flip_aug && rng.random::<bool>();
                let face = self.faces[i].zip(subset.config.face_crop_aug_range).filter(|_| (img.width, img.height) != a.bucket);
                let (resized, crop) = match face {
                    // Drawn where sd-scripts draws them, after the flip.
                    Some((face, range)) => face_crop((img.width, img.height), a.bucket, face, range, subset.config.random_crop, &mut rng),
                    None if subset.config.random_crop => (a.resized, crop_offset(a.resized, a.bucket, Some(&mut rng))),
                    None => (a.resized, crop_offset::<ChaCha8Rng>(a.resized, a.bucket, None)),
                };
                by_bucket.entry(a.bucket).or_default().push(SamplePlan {
                    image: i,
                    caption,
                    bucket: a.bucket,
                    resized,
                    crop,
                    flip,
                    color: None,
                    loss_weight: subset.loss_weight,
                    diff_output_preservation: subset.config.diff_output_preservation,
                });
            }
        }
        let mut batches = Vec::new();
        for (bucket, mut samples) in by_bucket {
            samples.shuffle(&mut rng);
            for chunk in samples.chunks(self.config.batch_size) {
                batches.push(BatchPlan {
                    bucket,
                    samples: chunk.to_vec(),
                });
            }
        }
        batches.shuffle(&mut rng);
        if self.has_color_aug() {
            // From a stream of their own: the option changes nothing else in the plan.
            let mut colors = ChaCha8Rng::seed_from_u64(self.config.seed);
            colors.set_stream(epoch | 1 << 62);
            for sample in batches.iter_mut().flat_map(|b| b.samples.iter_mut()) {
                if self.subsets[self.images[sample.image].subset].config.color_aug {
                    sample.color = ColorAug::draw(&mut colors);
                }
            }
        }
        if warmup {
            let mut captions = ChaCha8Rng::seed_from_u64(self.config.seed);
            captions.set_stream(epoch | 1 << 63);
            let accumulation = self.accumulation as u64;
            let steps_per_epoch = (batches.len() as u64).div_ceil(accumulation);
            for (b, batch) in batches.iter_mut().enumerate() {
                let step = epoch * steps_per_epoch + b as u64 / accumulation;
                for sample in &mut batch.samples {
                    let img = &self.images[sample.image];
                    let transform = CaptionTransform::from_subset(&self.subsets[img.subset].config);
                    sample.caption = self.epoch_caption(&transform, img, epoch, step, &mut captions);
                }
            }
        }
        batches
    }

    /// One sample's caption in `epoch` at optimizer step `step`: the subset's transform,
    /// and empty in the epochs its `caption_dropout_every_n_epochs` empties.
    fn epoch_caption(&self, transform: &CaptionTransform, img: &ImageRecord, epoch: u64, step: u64, rng: &mut ChaCha8Rng) -> String {
        let mut caption = transform.apply_at(&img.caption, step, rng);
        let every = self.subsets[img.subset].config.caption_dropout_every_n_epochs;
        if every > 0 && (epoch + 1).is_multiple_of(every as u64) {
            caption.clear();
        }
        caption
    }
}

/// Each image's face box (from its file name) where its subset has `face_crop_aug_range`
/// and there are no buckets, which alone crop around faces (sd-scripts' rule).
fn faces(config: &DatasetConfig, subsets: &[ResolvedSubset], images: &[ImageRecord]) -> Result<Vec<Option<FaceBox>>> {
    images
        .iter()
        .map(|img| match (&img.source, subsets[img.subset].config.face_crop_aug_range) {
            (crate::scan::ImageSource::File(path), Some(_)) if !config.enable_bucket => face_in_name(path),
            _ => Ok(None),
        })
        .collect()
}

/// Per-image repeats. Regularization images are repeated (round-robin, one extra repeat at a
/// time) until they are as many per epoch as the training samples, like kohya's DreamBooth dataset.
fn balance_repeats(images: &[ImageRecord], subsets: &[ResolvedSubset]) -> Vec<u32> {
    let mut repeats: Vec<u32> = images
        .iter()
        .map(|i| subsets[i.subset].num_repeats)
        .collect();
    let is_reg = |i: usize| subsets[images[i].subset].config.is_reg;
    let train: u64 = (0..images.len())
        .filter(|&i| !is_reg(i))
        .map(|i| u64::from(repeats[i]))
        .sum();
    let reg: Vec<usize> = (0..images.len()).filter(|&i| is_reg(i)).collect();
    if reg.is_empty() {
        return repeats;
    }
    // kohya's first pass registers reg images with their own repeats until they match the
    // training samples, and only the images reached count.
    let mut n: u64 = 0;
    for (pos, &i) in reg.iter().enumerate() {
        n += u64::from(repeats[i]);
        if n >= train {
            for &j in &reg[pos + 1..] {
                repeats[j] = 0;
            }
            return repeats;
        }
    }
    // Then it adds one repeat per image, in order, until they do: `missing` ones in all,
    // computed at once (one at a time took minutes for billions of training samples).
    let missing = train - n;
    let per_image = missing / reg.len() as u64;
    let extra = (missing % reg.len() as u64) as usize;
    for (pos, &i) in reg.iter().enumerate() {
        let added = per_image + u64::from(pos < extra);
        // Past u32 the epoch is far beyond its limit, which the caller reports.
        repeats[i] = u32::try_from(u64::from(repeats[i]) + added).unwrap_or(u32::MAX);
    }
    repeats
}
