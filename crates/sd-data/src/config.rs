//! Dataset configuration with kohya sd-scripts field names.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

/// The largest side, in pixels, of a training resolution and of the buckets (SD trains
/// at 512 to 2048): a larger one is a config error rather than an allocation that fails.
pub const MAX_SIDE: u32 = 8192;

/// `side` capped at [`MAX_SIDE`] in whole bucket `steps`: a default largest bucket side
/// derived from the resolution (twice its longer side) stays one that validates.
///
/// ```
/// assert_eq!(sd_data::capped_bucket_side(1536, 64), 1536);
/// assert_eq!(sd_data::capped_bucket_side(16384, 64), 8192);
/// assert_eq!(sd_data::capped_bucket_side(16384, 96), 8160);
/// ```
pub fn capped_bucket_side(side: u32, steps: u32) -> u32 {
    let steps = steps.max(1);
    side.min(MAX_SIDE / steps * steps)
}

/// Training resolution `(width, height)`; serialised as a number (`512`) or a pair (`[768, 512]`),
/// like kohya's `resolution = "512"` / `"768,512"`, and read from either or from such a
/// string (`"768,512"`, as sd-scripts' command line takes it).
///
/// ```
/// use sd_data::Resolution;
/// let r: Resolution = "768,512".parse().unwrap();
/// assert_eq!((r.width, r.height), (768, 512));
/// assert_eq!("512".parse::<Resolution>().unwrap(), Resolution::square(512));
/// assert!("512,0".parse::<Resolution>().is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(into = "ResolutionRepr")]
pub struct Resolution {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

impl Resolution {
    /// A square resolution.
    pub const fn square(side: u32) -> Self {
        Self {
            width: side,
            height: side,
        }
    }

    /// Width times height.
    pub fn area(&self) -> u64 {
        u64::from(self.width) * u64::from(self.height)
    }

    /// The longer side.
    pub fn max_side(&self) -> u32 {
        self.width.max(self.height)
    }

    fn checked(width: u32, height: u32) -> std::result::Result<Self, String> {
        if width == 0 || height == 0 {
            return Err(format!("{width}x{height}: width and height must be positive"));
        }
        Ok(Self { width, height })
    }
}

impl std::fmt::Display for Resolution {
    /// `512` for a square, `768,512` (width, height) otherwise: what [`FromStr`](std::str::FromStr) reads.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.width == self.height {
            write!(f, "{}", self.width)
        } else {
            write!(f, "{},{}", self.width, self.height)
        }
    }
}

impl std::str::FromStr for Resolution {
    type Err = DataError;

    /// `"512"`, `"768,512"` (width, height), with optional brackets and spaces
    /// (`"(768, 512)"`, `"[768, 512]"`), as kohya configs write it.
    fn from_str(text: &str) -> Result<Self> {
        let bad = |why: String| DataError::config("resolution", why);
        let inner = text.trim().trim_start_matches(['(', '[']).trim_end_matches([')', ']']);
        let sides: Vec<u32> = inner
            .split(',')
            .map(|s| s.trim().parse::<u32>())
            .collect::<std::result::Result<_, _>>()
            .map_err(|_| bad(format!("`{text}` is not a size like \"512\" or \"768,512\" (width,height)")))?;
        match sides[..] {
            [side] => Self::checked(side, side),
            [width, height] => Self::checked(width, height),
            _ => Err(format!("`{text}` has {} numbers; give one side or width,height", sides.len())),
        }
        .map_err(bad)
    }
}

#[derive(Clone, Copy, Serialize)]
#[serde(untagged)]
enum ResolutionRepr {
    Square(u32),
    Rect([u32; 2]),
}

impl From<Resolution> for ResolutionRepr {
    fn from(r: Resolution) -> Self {
        if r.width == r.height {
            Self::Square(r.width)
        } else {
            Self::Rect([r.width, r.height])
        }
    }
}

impl<'de> Deserialize<'de> for Resolution {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        d.deserialize_any(ResolutionVisitor)
    }
}

/// Reads a side, a `[width, height]` pair or a `"width,height"` string, so that a wrong
/// value is named in the error instead of an untagged enum's "no variant matched".
struct ResolutionVisitor;

impl<'de> serde::de::Visitor<'de> for ResolutionVisitor {
    type Value = Resolution;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a positive side (512), a [width, height] pair or a \"width,height\" string")
    }

    fn visit_u64<E: serde::de::Error>(self, v: u64) -> std::result::Result<Resolution, E> {
        let side = u32::try_from(v).map_err(|_| E::invalid_value(serde::de::Unexpected::Unsigned(v), &self))?;
        Resolution::checked(side, side).map_err(E::custom)
    }

    fn visit_i64<E: serde::de::Error>(self, v: i64) -> std::result::Result<Resolution, E> {
        let side = u64::try_from(v).map_err(|_| E::invalid_value(serde::de::Unexpected::Signed(v), &self))?;
        self.visit_u64(side)
    }

    fn visit_str<E: serde::de::Error>(self, v: &str) -> std::result::Result<Resolution, E> {
        v.parse::<Resolution>().map_err(|e| match e {
            DataError::Config { message, .. } => E::custom(message),
            other => E::custom(other),
        })
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> std::result::Result<Resolution, A::Error> {
        let mut sides = Vec::new();
        while let Some(side) = seq.next_element::<u32>()? {
            sides.push(side);
        }
        match sides[..] {
            [width, height] => Resolution::checked(width, height).map_err(serde::de::Error::custom),
            _ => Err(serde::de::Error::invalid_length(sides.len(), &"two numbers, [width, height]")),
        }
    }
}

/// What to do when an image has no caption.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MissingCaption {
    /// Use the folder's class tokens (kohya DreamBooth behaviour); an error if there are none.
    #[default]
    ClassTokens,
    /// Treat a missing caption as a bad input.
    Error,
}

/// One image folder ("subset" in kohya's dataset config) with its own repeats, captions and
/// augmentation options.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SubsetConfig {
    /// The folder. It may hold images directly (searched recursively), be a kohya `N_name`
    /// folder, be the parent of several `N_name` folders, or hold a Hugging Face `metadata.jsonl`.
    pub image_dir: PathBuf,
    /// Repeats per epoch; `None` takes them from an `N_name` folder name, else 1.
    pub num_repeats: Option<u32>,
    /// Class / trigger tokens; `None` takes them from an `N_name` folder name.
    pub class_tokens: Option<String>,
    /// Regularization (prior-preservation) images.
    pub is_reg: bool,
    /// Loss weight of this subset's samples; `None` means 1.0, or `prior_loss_weight` for
    /// regularization subsets.
    pub loss_weight: Option<f32>,
    /// kohya's differential output preservation (sd-scripts' `custom_attributes = {
    /// diff_output_preservation = true }`): this subset's samples are trained towards what
    /// the model predicts without its adapters (on the same noisy latents, timestep and
    /// caption) instead of towards their noise or velocity, so that the adapters leave the
    /// model's output for such images and captions as it was (prior preservation without
    /// generated regularization images). Their loss weight applies as usual.
    pub diff_output_preservation: bool,
    /// Search sub-folders too.
    pub recursive: bool,
    /// Caption file extension tried first; `.txt` and `.caption` are tried after it.
    pub caption_extension: String,
    /// Separator between caption tags.
    pub caption_separator: String,
    /// Column of `metadata.jsonl` that holds the caption.
    pub caption_column: String,
    /// Trigger word put in front of every caption as the first tag (counts towards `keep_tokens`).
    pub trigger_word: Option<String>,
    /// Text put in front of every caption, followed by a space (kohya's `caption_prefix`).
    pub caption_prefix: Option<String>,
    /// Text put after every caption, after a space (kohya's `caption_suffix`).
    pub caption_suffix: Option<String>,
    /// Marks the kept tags in the caption itself (kohya's `keep_tokens_separator`, e.g.
    /// `|||`): the tags before it stay first, those after a second one stay last, and only
    /// those between are shuffled and dropped; it replaces `keep_tokens` for captions that
    /// contain it. It never reaches the text encoder.
    pub keep_tokens_separator: Option<String>,
    /// What to do when an image has no caption.
    pub missing_caption: MissingCaption,
    /// Shuffle the caption's tags (those after the first `keep_tokens`).
    pub shuffle_caption: bool,
    /// Number of leading tags kept in place by shuffling and tag dropout.
    pub keep_tokens: usize,
    /// Probability of replacing the whole caption with the empty string (unconditional training).
    pub caption_dropout_rate: f32,
    /// Empty every caption in every N-th epoch (epochs counted from 1, as kohya's
    /// `caption_dropout_every_n_epochs`; 0 = never).
    pub caption_dropout_every_n_epochs: usize,
    /// Probability of dropping each (non-kept) tag.
    pub caption_tag_dropout_rate: f32,
    /// kohya's token warmup: the number of (non-kept) tags a caption keeps at step 0.
    pub token_warmup_min: usize,
    /// kohya's token warmup: over the first `token_warmup_step` optimizer steps a caption
    /// keeps only its first tags (after the kept ones, before shuffling and tag dropout),
    /// from `token_warmup_min` at step 0 growing linearly to all of them; below 1, a
    /// fraction of the run's steps ([`crate::Dataset::with_steps`] resolves it, as
    /// sd-scripts does: `floor(fraction · max_train_steps)`); 0 = off.
    pub token_warmup_step: f64,
    /// Randomly flip images horizontally (p = 0.5).
    pub flip_aug: bool,
    /// Crop at a random offset instead of the center.
    pub random_crop: bool,
    /// kohya's `face_crop_aug_range = [lo, hi]`: without buckets (`enable_bucket =
    /// false`), an image whose file name ends in its face's box, `name_cx_cy_w_h.png`
    /// (centre and size in pixels, as sd-scripts reads the last four of five or more
    /// `_`-separated parts), is scaled so that the face's larger side is between
    /// `1 / hi` and `1 / lo` of the resolution's shorter side (drawn per sample, never
    /// enlarging the image beyond what covering the resolution needs) and cropped around
    /// the face: centred, moved a little at random when `lo < hi` for a face of at least 40
    /// px, or anywhere with the face kept in view with `random_crop`. Other images crop as
    /// usual. Latents then cannot be cached.
    pub face_crop_aug_range: Option<[f64; 2]>,
    /// kohya's `resize_interpolation`: the filter that resizes this subset's images
    /// (`lanczos`, `nearest`, `bilinear`, `bicubic`, `area`, `box`); unset, sd-scripts'
    /// default per image: area averaging to shrink, Lanczos to enlarge
    /// ([`crate::ResizeInterpolation::for_resize`]).
    pub resize_interpolation: Option<crate::ResizeInterpolation>,
    /// kohya's `color_aug`: a third of the samples get a small colour change, half of them
    /// a hue rotation of up to ±16°, half a gamma of 0.95 to 1.05 on the 0–255 values (see
    /// [`ColorAug`](crate::image_io::ColorAug)), drawn per sample and epoch. Latents then
    /// cannot be cached.
    pub color_aug: bool,
    /// Weigh the loss by each image's alpha channel (kohya's `alpha_mask`): transparent
    /// areas do not train, half-transparent ones half; images without alpha count fully.
    pub alpha_mask: bool,
    /// A folder of loss masks, one per image with the image's name (any image extension) at
    /// the same place relative to the folder as the image is in `image_dir`, or at its top
    /// (kohya's masked loss with `conditioning_data_dir`, also read under that name). A mask
    /// has its image's size; its grey value (red channel) weighs the loss: white trains
    /// fully, black not at all.
    #[serde(alias = "conditioning_data_dir")]
    pub mask_dir: Option<PathBuf>,
    /// Joins tags into one for shuffling and dropout; replaced by `caption_separator` in
    /// the caption the model sees (kohya's `secondary_separator`, e.g. `;;;`).
    pub secondary_separator: Option<String>,
    /// kohya's `enable_wildcard`: a caption file's non-empty lines are all read and one is
    /// picked per sample, and each `{a|b|c}` is replaced by one of its options per sample
    /// (`{{` and `}}` are literal braces). Off, a caption is its file's first non-empty line.
    pub enable_wildcard: bool,
    /// Read kohya folder names: an `N_name` folder's repeats and class tokens, and a folder
    /// of `N_name` folders as their parent. Off, the folder is only its images (as
    /// sd-scripts reads a subset of its dataset configs).
    pub folder_names: bool,
    /// kohya's fine-tuning metadata (`metadata_file`, sd-scripts' `--in_json`): the images
    /// and captions are the file's entries instead of the folder's files. A `.json` file
    /// maps image keys to `{"caption": ..., "tags": ...}` (as sd-scripts'
    /// `merge_captions_to_metadata.py` and `merge_dd_tags_to_metadata.py` write it); a
    /// `.jsonl` file has one `{"image_path": ..., "caption": ..., "tags": ...}` per line.
    /// A key is an image path, absolute or relative to `image_dir` (which may then be
    /// left empty), with or without its extension (the scripts write the file's stem).
    /// The caption is `caption`, then `caption_separator` and `tags` when there are tags
    /// (with `enable_wildcard`, the tags go after each line of the caption); the other
    /// caption options apply as to caption files. Not for regularization subsets.
    pub metadata_file: Option<PathBuf>,
}

impl Default for SubsetConfig {
    fn default() -> Self {
        Self {
            image_dir: PathBuf::new(),
            num_repeats: None,
            class_tokens: None,
            is_reg: false,
            loss_weight: None,
            diff_output_preservation: false,
            recursive: true,
            caption_extension: ".txt".into(),
            caption_separator: ",".into(),
            caption_column: "text".into(),
            trigger_word: None,
            caption_prefix: None,
            caption_suffix: None,
            keep_tokens_separator: None,
            missing_caption: MissingCaption::ClassTokens,
            shuffle_caption: false,
            keep_tokens: 0,
            caption_dropout_rate: 0.0,
            caption_dropout_every_n_epochs: 0,
            caption_tag_dropout_rate: 0.0,
            token_warmup_min: 1,
            token_warmup_step: 0.0,
            flip_aug: false,
            random_crop: false,
            face_crop_aug_range: None,
            resize_interpolation: None,
            color_aug: false,
            alpha_mask: false,
            mask_dir: None,
            secondary_separator: None,
            enable_wildcard: false,
            folder_names: true,
            metadata_file: None,
        }
    }
}

impl SubsetConfig {
    /// A subset for `image_dir` with default options.
    pub fn new(image_dir: impl Into<PathBuf>) -> Self {
        Self {
            image_dir: image_dir.into(),
            ..Self::default()
        }
    }

    /// Whether captions of this subset are the same in every epoch (no shuffling or dropout),
    /// which is what makes caching text embeddings valid.
    pub fn captions_are_fixed(&self) -> bool {
        !self.shuffle_caption
            && !self.enable_wildcard
            && self.caption_dropout_rate == 0.0
            && self.caption_dropout_every_n_epochs == 0
            && self.caption_tag_dropout_rate == 0.0
            && self.token_warmup_step == 0.0
    }

    fn validate(&self, i: usize) -> Result<()> {
        let key = |k: &str| format!("subsets[{i}].{k}");
        if self.num_repeats == Some(0) {
            return Err(DataError::config(&key("num_repeats"), "must be at least 1"));
        }
        for (name, v) in [
            ("caption_dropout_rate", self.caption_dropout_rate),
            ("caption_tag_dropout_rate", self.caption_tag_dropout_rate),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(DataError::config(
                    &key(name),
                    format!("must be in [0, 1], got {v}"),
                ));
            }
        }
        if !self.token_warmup_step.is_finite() || self.token_warmup_step < 0.0 {
            return Err(DataError::config(
                &key("token_warmup_step"),
                format!("must be a number of steps (or a fraction of the run's below 1) of at least 0, got {}", self.token_warmup_step),
            ));
        }
        if let Some(w) = self.loss_weight && (!w.is_finite() || w < 0.0) {
            return Err(DataError::config(
                &key("loss_weight"),
                format!("must be finite and >= 0, got {w}"),
            ));
        }
        if let Some([lo, hi]) = self.face_crop_aug_range && !(lo.is_finite() && hi.is_finite() && lo > 0.0 && lo <= hi) {
            return Err(DataError::config(&key("face_crop_aug_range"), format!("must be two positive numbers [lo, hi] with lo <= hi, got [{lo}, {hi}]")));
        }
        if let Some(file) = &self.metadata_file {
            if self.is_reg {
                return Err(DataError::config(&key("metadata_file"), "is for training images: regularization images are a folder (sd-scripts' fine-tuning datasets have none)"));
            }
            if !file.is_file() {
                return Err(DataError::config(&key("metadata_file"), format!("{} does not exist or is not a file", file.display())));
            }
        }
        if self.alpha_mask && self.mask_dir.is_some() {
            return Err(DataError::config(
                &key("mask_dir"),
                "a subset takes its loss masks from `alpha_mask` or from `mask_dir`, not both",
            ));
        }
        if let Some(dir) = &self.mask_dir && !dir.is_dir() {
            return Err(DataError::config(
                &key("mask_dir"),
                format!("{} does not exist or is not a directory", dir.display()),
            ));
        }
        if self.caption_separator.is_empty() {
            return Err(DataError::config(
                &key("caption_separator"),
                "must not be empty",
            ));
        }
        if !self.caption_extension.starts_with('.') || self.caption_extension.len() < 2 {
            return Err(DataError::config(
                &key("caption_extension"),
                format!("must look like `.txt`, got `{}`", self.caption_extension),
            ));
        }
        Ok(())
    }
}

/// A dataset: shared bucketing / batching options plus one or more image folders.
///
/// Defaults follow kohya sd-scripts (`min_bucket_reso` 256, `max_bucket_reso` 1024,
/// `bucket_reso_steps` 64) with bucketing enabled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DatasetConfig {
    /// Target resolution; its area is the bucket area.
    pub resolution: Resolution,
    /// Samples per batch; a batch never mixes buckets.
    pub batch_size: usize,
    /// Aspect-ratio bucketing; when off every image is resized and cropped to `resolution`.
    pub enable_bucket: bool,
    /// Smallest bucket side.
    pub min_bucket_reso: u32,
    /// Largest bucket side.
    pub max_bucket_reso: u32,
    /// Bucket sides are multiples of this.
    pub bucket_reso_steps: u32,
    /// Never upscale: each image gets its own bucket no larger than itself.
    pub bucket_no_upscale: bool,
    /// Images with a side shorter than this are bad input.
    pub min_image_size: u32,
    /// Skip bad files with a warning instead of failing.
    pub skip_bad_images: bool,
    /// Fully decode every image while scanning (catches truncated files up front).
    pub verify_images: bool,
    /// Default loss weight of regularization subsets.
    pub prior_loss_weight: f32,
    /// Seed for shuffling, augmentation and caption transforms.
    pub seed: u64,
    /// The image folders.
    pub subsets: Vec<SubsetConfig>,
}

impl Default for DatasetConfig {
    fn default() -> Self {
        Self {
            resolution: Resolution::square(512),
            batch_size: 1,
            enable_bucket: true,
            min_bucket_reso: 256,
            max_bucket_reso: 1024,
            bucket_reso_steps: 64,
            bucket_no_upscale: false,
            min_image_size: 64,
            skip_bad_images: false,
            verify_images: true,
            prior_loss_weight: 1.0,
            seed: 0,
            subsets: Vec::new(),
        }
    }
}

impl DatasetConfig {
    /// A config with one folder and default options.
    pub fn single(image_dir: impl Into<PathBuf>) -> Self {
        Self {
            subsets: vec![SubsetConfig::new(image_dir)],
            ..Self::default()
        }
    }

    /// Small-image preset used with the procedural demo data: 64 px target, buckets from 32 to
    /// 128 px in 16-px steps (so 2:3 and 3:2 images get 48x80 / 80x48 buckets).
    pub fn demo(image_dir: impl Into<PathBuf>) -> Self {
        Self::demo_at(image_dir, Resolution::square(64))
    }

    /// The demo preset scaled to `resolution`: buckets from half its shorter side to twice
    /// its longer one, in steps of the largest power of two up to a quarter of the shorter
    /// side (at least 8 px), and images down to half the shorter side.
    ///
    /// ```
    /// use sd_data::{DatasetConfig, Resolution};
    /// let c = DatasetConfig::demo_at("demo", Resolution::square(512));
    /// assert_eq!((c.min_bucket_reso, c.max_bucket_reso, c.bucket_reso_steps), (256, 1024, 128));
    /// assert_eq!(DatasetConfig::demo_at("demo", Resolution::square(64)).bucket_reso_steps, 16);
    /// c.validate().unwrap();
    /// ```
    pub fn demo_at(image_dir: impl Into<PathBuf>, resolution: Resolution) -> Self {
        let short = resolution.width.min(resolution.height);
        let long = resolution.width.max(resolution.height);
        let quarter = (short / 4).max(8);
        let step = 1 << (31 - quarter.leading_zeros());
        Self {
            resolution,
            min_bucket_reso: (short / 2 / step * step).max(step),
            max_bucket_reso: capped_bucket_side(long * 2, step),
            bucket_reso_steps: step,
            min_image_size: (short / 2).max(1),
            batch_size: 4,
            ..Self::single(image_dir)
        }
    }

    /// Reads a JSON config file and validates it.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
        let config: Self = serde_json::from_str(&text).map_err(|e| DataError::ConfigFile {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks value ranges and bucket parameters.
    pub fn validate(&self) -> Result<()> {
        let Resolution { width, height } = self.resolution;
        if width == 0 || height == 0 {
            return Err(DataError::config(
                "resolution",
                "width and height must be positive",
            ));
        }
        if width.max(height) > MAX_SIDE {
            return Err(DataError::config("resolution", format!("{width}x{height}: a side may be at most {MAX_SIDE} px")));
        }
        if self.enable_bucket && self.max_bucket_reso > MAX_SIDE {
            return Err(DataError::config("max_bucket_reso", format!("{} is over the largest side, {MAX_SIDE} px", self.max_bucket_reso)));
        }
        if self.batch_size == 0 {
            return Err(DataError::config("batch_size", "must be at least 1"));
        }
        let steps = self.bucket_reso_steps;
        if steps == 0 {
            return Err(DataError::config("bucket_reso_steps", "must be positive"));
        }
        if self.enable_bucket {
            if self.min_bucket_reso < steps || !self.min_bucket_reso.is_multiple_of(steps) {
                return Err(DataError::config(
                    "min_bucket_reso",
                    format!(
                        "must be a positive multiple of bucket_reso_steps ({steps}), got {}",
                        self.min_bucket_reso
                    ),
                ));
            }
            if !self.max_bucket_reso.is_multiple_of(steps)
                || self.max_bucket_reso < self.min_bucket_reso
            {
                return Err(DataError::config(
                    "max_bucket_reso",
                    format!(
                        "must be a multiple of bucket_reso_steps ({steps}) and >= min_bucket_reso ({}), got {}",
                        self.min_bucket_reso, self.max_bucket_reso
                    ),
                ));
            }
            if width < steps || height < steps {
                return Err(DataError::config(
                    "resolution",
                    format!("sides must be >= bucket_reso_steps ({steps}), got {width}x{height}"),
                ));
            }
            // As sd-scripts asserts: the buckets span the resolution's sides.
            if width.min(height) < self.min_bucket_reso {
                return Err(DataError::config(
                    "resolution",
                    format!("{width}x{height}: the shorter side must be at least min_bucket_reso ({}) with buckets; raise the resolution or lower min_bucket_reso", self.min_bucket_reso),
                ));
            }
            if width.max(height) > self.max_bucket_reso {
                return Err(DataError::config(
                    "max_bucket_reso",
                    format!("{} is below the resolution's longer side ({width}x{height}); raise it to at least {}", self.max_bucket_reso, width.max(height)),
                ));
            }
        }
        if let Some(i) = self.subsets.iter().position(|s| s.face_crop_aug_range.is_some()).filter(|_| self.enable_bucket) {
            return Err(DataError::config(
                &format!("subsets[{i}].face_crop_aug_range"),
                "needs enable_bucket = false: sd-scripts crops around faces only without buckets (with buckets it ignores the option)",
            ));
        }
        if !self.prior_loss_weight.is_finite() || self.prior_loss_weight < 0.0 {
            return Err(DataError::config(
                "prior_loss_weight",
                "must be finite and >= 0",
            ));
        }
        if self.subsets.is_empty() {
            return Err(DataError::config(
                "subsets",
                "list at least one image folder",
            ));
        }
        self.subsets
            .iter()
            .enumerate()
            .try_for_each(|(i, s)| s.validate(i))
    }
}
