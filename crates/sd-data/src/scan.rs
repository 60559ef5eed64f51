//! Finding images and captions on disk: kohya `N_name` folders, plain folders (recursive), and
//! Hugging Face `metadata.jsonl` image folders.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::RgbImage;

use crate::config::{DatasetConfig, MissingCaption, SubsetConfig};
use crate::error::{DataError, Result};
use crate::image_io::{content_hash, decode_image, is_image_path, probe_size};

/// Name of the Hugging Face imagefolder metadata file.
pub const METADATA_FILE: &str = "metadata.jsonl";

/// Where an image's pixels come from.
#[derive(Clone, Debug)]
pub enum ImageSource {
    /// An image file.
    File(PathBuf),
    /// An image held in memory (e.g. procedural demo data), with a display name.
    Memory {
        /// Name used in messages and listings.
        name: String,
        /// The pixels.
        image: Arc<RgbImage>,
    },
}

impl ImageSource {
    /// Path of a file source, or the name of an in-memory one, for messages.
    pub fn display_path(&self) -> PathBuf {
        match self {
            Self::File(p) => p.clone(),
            Self::Memory { name, .. } => PathBuf::from(name),
        }
    }
}

/// A subset after resolving folder-name conventions: the effective repeats, class tokens and
/// loss weight.
#[derive(Clone, Debug)]
pub struct ResolvedSubset {
    /// The options (with `num_repeats` and `class_tokens` filled in from the folder name).
    pub config: SubsetConfig,
    /// Repeats per epoch as configured (regularization subsets may be rebalanced per image).
    pub num_repeats: u32,
    /// Loss weight of every sample.
    pub loss_weight: f32,
}

/// Where an image's loss mask comes from (kohya's `alpha_mask` and masked loss).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MaskSource {
    /// The image's own alpha channel (opaque everywhere when it has none).
    Alpha,
    /// A mask file of the image's size; its red channel (grey value) / 255 is the weight.
    File {
        /// The mask file.
        path: PathBuf,
        /// Hash of the encoded mask file.
        content_hash: String,
    },
}

impl MaskSource {
    /// A string that changes whenever the mask would: part of latent-cache keys.
    pub fn identity(&self) -> String {
        match self {
            Self::Alpha => "alpha".into(),
            Self::File { content_hash, .. } => format!("file:{content_hash}"),
        }
    }
}

/// One usable image found by a scan.
#[derive(Clone, Debug)]
pub struct ImageRecord {
    /// Where the pixels are.
    pub source: ImageSource,
    /// Raw caption (before transforms); the class tokens if it had none and fallback is on.
    pub caption: String,
    /// Width after EXIF orientation.
    pub width: u32,
    /// Height after EXIF orientation.
    pub height: u32,
    /// Hash of the encoded file (or raw pixels for in-memory images).
    pub content_hash: String,
    /// Index into [`Scan::subsets`].
    pub subset: usize,
    /// The loss mask, when the subset has `alpha_mask` or `mask_dir`.
    pub mask: Option<MaskSource>,
}

/// Result of scanning the configured folders: usable images and every bad file.
#[derive(Debug)]
pub struct Scan {
    /// The config that was scanned.
    pub config: DatasetConfig,
    /// Resolved subsets (a kohya parent folder expands into one per `N_name` child).
    pub subsets: Vec<ResolvedSubset>,
    /// Usable images in a deterministic order.
    pub images: Vec<ImageRecord>,
    /// Bad files and folders, each with a typed error naming it.
    pub problems: Vec<DataError>,
}

/// Parses a kohya folder name `N_name` into `(N, name)`.
///
/// ```
/// assert_eq!(sd_data::parse_kohya_folder_name("10_sks dog"), Ok((10, "sks dog".to_string())));
/// assert!(sd_data::parse_kohya_folder_name("dogs").is_err());
/// assert!(sd_data::parse_kohya_folder_name("0_dog").is_err());
/// ```
pub fn parse_kohya_folder_name(name: &str) -> Result<(u32, String), String> {
    let Some((n, rest)) = name.split_once('_') else {
        return Err("no `_` after the repeat count".into());
    };
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("`{n}` is not a repeat count"));
    }
    let repeats: u32 = n
        .parse()
        .map_err(|_| format!("repeat count `{n}` is too large"))?;
    if repeats == 0 {
        return Err("repeat count must be at least 1".into());
    }
    let tokens = rest.trim();
    if tokens.is_empty() {
        return Err("class tokens after `_` are empty".into());
    }
    Ok((repeats, tokens.to_string()))
}

fn looks_kohya(name: &str) -> bool {
    name.split_once('_')
        .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>> {
    let rd = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        let p = entry.path();
        if !is_hidden(&p) {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// A candidate image before decoding: path, subset, caption and mask outcomes.
struct Candidate {
    path: PathBuf,
    subset: usize,
    caption: Result<String>,
    /// The mask, or why the image has none (a [`DataError::Mask`] message).
    mask: std::result::Result<Option<PendingMask>, String>,
}

/// A mask found by the scan, before its file (if any) is read.
enum PendingMask {
    Alpha,
    File(PathBuf),
}

struct Scanner<'a> {
    config: &'a DatasetConfig,
    subsets: Vec<ResolvedSubset>,
    candidates: Vec<Candidate>,
    problems: Vec<DataError>,
    /// The configured `image_dir` being scanned: masks mirror paths relative to it.
    root: PathBuf,
    /// The subset's `mask_dir` (canonical), which is never scanned for training images.
    mask_dir: Option<PathBuf>,
}

impl Scanner<'_> {
    fn resolve(
        &mut self,
        cfg: &SubsetConfig,
        dir: &Path,
        name_info: Option<(u32, String)>,
    ) -> usize {
        let mut config = cfg.clone();
        config.image_dir = dir.to_path_buf();
        let (repeats, tokens) = match name_info {
            Some((n, t)) => (Some(n), Some(t)),
            None => (None, None),
        };
        config.num_repeats = config.num_repeats.or(repeats).or(Some(1));
        config.class_tokens = config.class_tokens.clone().or(tokens);
        let loss_weight = config.loss_weight.unwrap_or(if config.is_reg {
            self.config.prior_loss_weight
        } else {
            1.0
        });
        self.subsets.push(ResolvedSubset {
            num_repeats: config.num_repeats.unwrap_or(1),
            config,
            loss_weight,
        });
        self.subsets.len() - 1
    }

    fn scan_subset(&mut self, cfg: &SubsetConfig) -> Result<()> {
        let dir = &cfg.image_dir;
        if let Some(file) = &cfg.metadata_file {
            // The folder is only where relative keys (and masks) are; it may be unset.
            if !dir.as_os_str().is_empty() && !dir.is_dir() {
                return Err(DataError::NotADirectory { path: dir.clone() });
            }
            self.root = dir.clone();
            self.mask_dir = match &cfg.mask_dir {
                Some(m) => Some(m.canonicalize().map_err(|e| DataError::io(m, e))?),
                None => None,
            };
            let idx = self.resolve(cfg, dir, None);
            return self.scan_kohya_metadata(file, idx);
        }
        if !dir.is_dir() {
            return Err(DataError::NotADirectory { path: dir.clone() });
        }
        self.root = dir.clone();
        self.mask_dir = match &cfg.mask_dir {
            Some(m) => Some(m.canonicalize().map_err(|e| DataError::io(m, e))?),
            None => None,
        };
        if self.mask_dir.is_some() && self.is_mask_dir(dir) {
            return Err(DataError::config(
                "mask_dir",
                format!("{} is the image folder itself: every image would be its own mask", dir.display()),
            ));
        }
        let own_name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| parse_kohya_folder_name(n).ok())
            .filter(|_| cfg.folder_names);
        if dir.join(METADATA_FILE).is_file() {
            let idx = self.resolve(cfg, dir, own_name);
            return self.scan_metadata(dir, idx);
        }
        let entries = sorted_entries(dir)?;
        let subdirs: Vec<&PathBuf> = entries
            .iter()
            .filter(|p| p.is_dir() && !self.is_mask_dir(p))
            .collect();
        let kohya_parent = cfg.folder_names
            && subdirs.iter().any(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(looks_kohya)
            });
        if !kohya_parent {
            let idx = self.resolve(cfg, dir, own_name);
            let mut visited = HashSet::new();
            return self.collect_images(dir, idx, cfg.recursive, &mut visited);
        }
        // A kohya train_data_dir: every child folder is `N_name`; loose images belong to the parent.
        let loose: Vec<&PathBuf> = entries
            .iter()
            .filter(|p| p.is_file() && is_image_path(p))
            .collect();
        if !loose.is_empty() {
            let idx = self.resolve(cfg, dir, own_name);
            for p in loose {
                self.add_candidate(p, idx);
            }
        }
        for sub in subdirs {
            let name = sub.file_name().and_then(|n| n.to_str()).unwrap_or("");
            match parse_kohya_folder_name(name) {
                Ok(info) => {
                    let idx = self.resolve(cfg, sub, Some(info));
                    let mut visited = HashSet::new();
                    self.collect_images(sub, idx, cfg.recursive, &mut visited)?;
                }
                Err(reason) => self.problems.push(DataError::UnknownFolderName {
                    path: sub.clone(),
                    reason,
                }),
            }
        }
        Ok(())
    }

    fn collect_images(
        &mut self,
        dir: &Path,
        idx: usize,
        recursive: bool,
        visited: &mut HashSet<PathBuf>,
    ) -> Result<()> {
        // Symlinked folders can form cycles; visit each real folder once.
        let real = dir.canonicalize().map_err(|e| DataError::io(dir, e))?;
        if !visited.insert(real) {
            return Ok(());
        }
        for p in sorted_entries(dir)? {
            if p.is_dir() {
                if recursive && !self.is_mask_dir(&p) {
                    self.collect_images(&p, idx, recursive, visited)?;
                }
            } else if is_image_path(&p) && !is_special_file(&p) {
                self.add_candidate(&p, idx);
            }
        }
        Ok(())
    }

    /// Whether `dir` is the subset's mask folder (masks are not training images).
    fn is_mask_dir(&self, dir: &Path) -> bool {
        self.mask_dir
            .as_ref()
            .is_some_and(|m| dir.canonicalize().is_ok_and(|d| &d == m))
    }

    fn add_candidate(&mut self, path: &Path, idx: usize) {
        let caption = self.caption_for(path, idx);
        let mask = self.mask_for(path, idx);
        self.candidates.push(Candidate {
            path: path.to_path_buf(),
            subset: idx,
            caption,
            mask,
        });
    }

    /// The image's mask: its alpha channel, or the file of its name in `mask_dir`, first at
    /// the image's place relative to `image_dir`, then at the folder's top (kohya's layout).
    fn mask_for(&self, image: &Path, idx: usize) -> std::result::Result<Option<PendingMask>, String> {
        let cfg = &self.subsets[idx].config;
        if cfg.alpha_mask {
            return Ok(Some(PendingMask::Alpha));
        }
        let Some(mask_dir) = &cfg.mask_dir else {
            return Ok(None);
        };
        let Some(stem) = image.file_stem() else {
            return Err("the image has no file name to look its mask up by".into());
        };
        // Only plain folder names are mirrored: `..` in a metadata.jsonl `file_name` must
        // not lead out of the mask folder.
        let relative = image
            .strip_prefix(&self.root)
            .ok()
            .and_then(Path::parent)
            .filter(|p| !p.as_os_str().is_empty())
            .filter(|p| p.components().all(|c| matches!(c, std::path::Component::Normal(_))));
        let itself = image.canonicalize().ok();
        let mut places = Vec::new();
        if let Some(rel) = relative {
            places.push(mask_dir.join(rel));
        }
        places.push(mask_dir.clone());
        let mut tried = Vec::new();
        for place in places {
            for ext in crate::image_io::IMAGE_EXTENSIONS {
                for ext in [ext.to_string(), ext.to_ascii_uppercase()] {
                    let mut name = stem.to_os_string();
                    name.push(".");
                    name.push(&ext);
                    let candidate = place.join(name);
                    // An image is never its own mask (a mask folder that mirrors into the
                    // image folder).
                    if candidate.is_file() && candidate.canonicalize().ok() != itself {
                        return Ok(Some(PendingMask::File(candidate)));
                    }
                }
            }
            tried.push(place.join(stem).display().to_string() + ".*");
        }
        Err(format!("no mask image found (looked for {})", tried.join(", ")))
    }

    fn caption_for(&self, image: &Path, idx: usize) -> Result<String> {
        let cfg = &self.subsets[idx].config;
        let mut exts = vec![cfg.caption_extension.as_str()];
        for e in [".txt", ".caption"] {
            if !exts.contains(&e) {
                exts.push(e);
            }
        }
        let mut tried = Vec::new();
        // A face-crop image, `name_cx_cy_w_h.png`, is also captioned by `name.txt`, as
        // sd-scripts reads it (its own caption first).
        let face_base = face_crop_base(image);
        for base in std::iter::once(image.to_path_buf()).chain(face_base) {
            for ext in &exts {
                let cap = base.with_extension(&ext[1..]);
                tried.push(cap.display().to_string());
                if cap.is_file() && let Some(text) = read_caption_file(&cap, cfg.enable_wildcard)? {
                    return Ok(text);
                }
            }
        }
        self.fallback_caption(image, idx, tried.join(", "))
    }

    fn fallback_caption(&self, image: &Path, idx: usize, tried: String) -> Result<String> {
        let cfg = &self.subsets[idx].config;
        let why = match (
            cfg.missing_caption,
            cfg.class_tokens.as_deref().map(str::trim),
        ) {
            (MissingCaption::ClassTokens, Some(t)) if !t.is_empty() => return Ok(t.to_string()),
            (MissingCaption::ClassTokens, _) => "the folder has no class tokens to fall back on",
            (MissingCaption::Error, _) => "missing_caption = \"error\"",
        };
        Err(DataError::MissingCaption {
            path: image.to_path_buf(),
            tried,
            why: why.to_string(),
        })
    }

    fn scan_metadata(&mut self, dir: &Path, idx: usize) -> Result<()> {
        let meta_path = dir.join(METADATA_FILE);
        let bytes = std::fs::read(&meta_path).map_err(|e| DataError::io(&meta_path, e))?;
        let text = String::from_utf8(bytes).map_err(|e| DataError::CaptionNotUtf8 {
            path: meta_path.clone(),
            valid_up_to: e.utf8_error().valid_up_to(),
        })?;
        // A byte-order mark, as caption files may have (Windows editors write one).
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        let column = self.subsets[idx].config.caption_column.clone();
        let mut listed = HashSet::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let bad = |message: String| DataError::Metadata {
                path: meta_path.clone(),
                line: i + 1,
                message,
            };
            let value: serde_json::Value = match serde_json::from_str(line) {
                Ok(v) => v,
                Err(e) => {
                    self.problems.push(bad(format!("invalid JSON: {e}")));
                    continue;
                }
            };
            let Some(file_name) = value.get("file_name").and_then(|v| v.as_str()) else {
                self.problems
                    .push(bad("missing string field `file_name`".into()));
                continue;
            };
            let path = dir.join(file_name);
            listed.insert(path.canonicalize().unwrap_or_else(|_| path.clone()));
            let caption = match value.get(&column) {
                Some(serde_json::Value::String(s)) if !s.trim().is_empty() => {
                    Ok(s.trim().to_string())
                }
                Some(serde_json::Value::String(_)) | None | Some(serde_json::Value::Null) => self
                    .fallback_caption(&path, idx, format!("`{column}` in {}", meta_path.display())),
                Some(other) => Err(bad(format!("`{column}` must be a string, got {other}"))),
            };
            let mask = self.mask_for(&path, idx);
            self.candidates.push(Candidate {
                path,
                subset: idx,
                caption,
                mask,
            });
        }
        // The folder's own images that no line names are left out, as the metadata file
        // lists the data set; each is reported (a stale `metadata.jsonl` beside captioned
        // images would otherwise drop them silently).
        for image in sorted_entries(dir)?.into_iter().filter(|p| p.is_file() && is_image_path(p) && !listed.contains(&p.canonicalize().unwrap_or_else(|_| p.clone()))) {
            let key = image.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            self.problems.push(DataError::KohyaMetadata {
                path: meta_path.clone(),
                key,
                message: "is in the folder but on no line of this file (its `file_name`), so it is left out: add a line for it, or remove the metadata file to use caption files".into(),
            });
        }
        Ok(())
    }
}

/// Whether `path` is there but is no regular file (a FIFO, socket or device named like an
/// image, which reading would block on or misread). A broken link is not special: reading
/// it reports the error.
fn is_special_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| !m.is_file() && !m.is_dir())
}

impl Scanner<'_> {
    /// kohya's fine-tuning metadata ([`SubsetConfig::metadata_file`]): each entry's image,
    /// found from its key, and its caption from `caption` and `tags`.
    fn scan_kohya_metadata(&mut self, file: &Path, idx: usize) -> Result<()> {
        let bytes = std::fs::read(file).map_err(|e| DataError::io(file, e))?;
        let text = String::from_utf8(bytes).map_err(|e| DataError::CaptionNotUtf8 {
            path: file.to_path_buf(),
            valid_up_to: e.utf8_error().valid_up_to(),
        })?;
        let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
        let entries = kohya_metadata_entries(text, file)?;
        if entries.is_empty() {
            return Err(DataError::Metadata { path: file.to_path_buf(), line: 1, message: "has no image entries".into() });
        }
        for (key, entry) in entries {
            let bad = |message: String| DataError::KohyaMetadata { path: file.to_path_buf(), key: key.clone(), message };
            let path = match self.kohya_image_path(&key) {
                Ok(p) => p,
                Err(message) => {
                    self.problems.push(bad(message));
                    continue;
                }
            };
            let text_of = |field: &str| match entry.get(field) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                Some(other) => Err(bad(format!("`{field}` must be a string, got {other}"))),
            };
            let caption = match (text_of("caption"), text_of("tags")) {
                (Ok(caption), Ok(tags)) => {
                    let cfg = &self.subsets[idx].config;
                    let joined = kohya_caption(caption.unwrap_or_default(), tags, &cfg.caption_separator, cfg.enable_wildcard);
                    if joined.trim().is_empty() {
                        self.fallback_caption(&path, idx, format!("`caption` and `tags` of `{key}` in {}", file.display()))
                    } else {
                        Ok(joined)
                    }
                }
                (Err(e), _) | (_, Err(e)) => Err(e),
            };
            let mask = self.mask_for(&path, idx);
            self.candidates.push(Candidate { path, subset: idx, caption, mask });
        }
        Ok(())
    }

    /// The image of a metadata key: the path itself (relative to `image_dir`, else to the
    /// working directory, as the scripts' `--full_path` keys are, unless absolute), or,
    /// for a key without its extension (as the scripts write them by default), the image
    /// file of that name.
    fn kohya_image_path(&self, key: &str) -> std::result::Result<PathBuf, String> {
        let key_path = Path::new(key);
        let mut places = Vec::new();
        if !key_path.is_absolute() && !self.root.as_os_str().is_empty() {
            places.push(self.root.join(key_path));
        }
        places.push(key_path.to_path_buf());
        for path in &places {
            if path.is_file() && is_image_path(path) {
                return Ok(path.clone());
            }
            for ext in crate::image_io::IMAGE_EXTENSIONS {
                for ext in [ext.to_string(), ext.to_ascii_uppercase()] {
                    let mut name = path.as_os_str().to_os_string();
                    name.push(".");
                    name.push(&ext);
                    let candidate = PathBuf::from(name);
                    if candidate.is_file() {
                        return Ok(candidate);
                    }
                }
            }
        }
        if let Some(cached) = places.iter().map(|p| p.with_extension("npz")).find(|c| c.is_file()) {
            return Err(format!("only its cached latents {} are there; this trainer reads the image itself", cached.display()));
        }
        let tried: Vec<String> = places.iter().map(|p| p.display().to_string()).collect();
        let hint = if self.root.as_os_str().is_empty() && !key_path.is_absolute() { " (a relative key: set the subset's image_dir, sd-scripts' train_data_dir, to the folder it is relative to)" } else { "" };
        Err(format!("no image at {} (with or without an image extension){hint}", tried.join(" or ")))
    }
}

/// The entries of a kohya fine-tuning metadata file: a JSON object of image keys (`.json`;
/// sorted by key), or lines with `image_path` (`.jsonl`, sd-scripts' other form; in the
/// file's order).
fn kohya_metadata_entries(text: &str, file: &Path) -> Result<Vec<(String, serde_json::Map<String, serde_json::Value>)>> {
    let bad = |line: usize, message: String| DataError::Metadata { path: file.to_path_buf(), line, message };
    let jsonl = file.extension().is_some_and(|e| e.eq_ignore_ascii_case("jsonl"));
    if !jsonl {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| bad(e.line(), format!("invalid JSON: {e}")))?;
        let serde_json::Value::Object(map) = value else {
            return Err(bad(1, "must be a JSON object of image keys, e.g. {\"img001\": {\"caption\": \"...\", \"tags\": \"...\"}}".into()));
        };
        return map
            .into_iter()
            .map(|(key, entry)| match entry {
                serde_json::Value::Object(e) => Ok((key, e)),
                other => Err(DataError::KohyaMetadata { path: file.to_path_buf(), key, message: format!("must be an object with `caption` / `tags`, got {other}") }),
            })
            .collect();
    }
    let mut entries = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let mut entry = match serde_json::from_str::<serde_json::Value>(line) {
            Ok(serde_json::Value::Object(e)) => e,
            Ok(other) => return Err(bad(i + 1, format!("must be a JSON object, got {other}"))),
            Err(e) => return Err(bad(i + 1, format!("invalid JSON: {e}"))),
        };
        let Some(serde_json::Value::String(key)) = entry.remove("image_path") else {
            return Err(bad(i + 1, "missing string field `image_path`".into()));
        };
        entries.push((key, entry));
    }
    Ok(entries)
}

/// sd-scripts' caption of a fine-tuning entry: `caption`, then `separator` and `tags`; with
/// `wildcard`, the tags (on one line) after each non-empty line of the caption.
fn kohya_caption(caption: String, tags: Option<String>, separator: &str, wildcard: bool) -> String {
    match tags.filter(|t| !t.is_empty()) {
        None => caption,
        Some(tags) if wildcard => {
            let tags = tags.replace('\n', separator);
            let lines: Vec<String> = caption.lines().filter(|l| !l.trim().is_empty()).map(|l| format!("{l}{separator}{tags}")).collect();
            // (sd-scripts drops the tags of an entry without a caption here, a slip.)
            if lines.is_empty() {
                tags
            } else {
                lines.join("\n")
            }
        }
        Some(tags) if caption.is_empty() => tags,
        Some(tags) => format!("{caption}{separator}{tags}"),
    }
}

/// For a face-crop image named `name_cx_cy_w_h.EXT` (five or more `_`-separated parts,
/// the last four whole numbers), the path `name.EXT` whose caption files caption it too
/// (sd-scripts' `read_caption` tries `name` + the caption extension after the image's own).
fn face_crop_base(image: &Path) -> Option<PathBuf> {
    let stem = image.file_stem()?.to_str()?;
    let parts: Vec<&str> = stem.split('_').collect();
    if parts.len() < 5 || !parts[parts.len() - 4..].iter().all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())) {
        return None;
    }
    let name = parts[..parts.len() - 4].join("_");
    let ext = image.extension().map(|e| e.to_string_lossy().into_owned()).unwrap_or_default();
    Some(image.with_file_name(format!("{name}.{ext}")))
}

/// Reads a caption file: the first non-empty line (kohya), or with `all_lines` (kohya's
/// `enable_wildcard`) every non-empty line, joined by newlines; `None` when there is none.
fn read_caption_file(path: &Path, all_lines: bool) -> Result<Option<String>> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let text = String::from_utf8(bytes).map_err(|e| DataError::CaptionNotUtf8 {
        path: path.to_path_buf(),
        valid_up_to: e.utf8_error().valid_up_to(),
    })?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    if all_lines {
        let joined = lines.collect::<Vec<_>>().join("\n");
        return Ok((!joined.is_empty()).then_some(joined));
    }
    Ok(lines.next().map(str::to_string))
}

/// What the inspection of one candidate gives: width, height, content hash and mask.
type Inspected = (u32, u32, String, Option<MaskSource>);

/// Reads, hashes and checks one candidate's image and mask files.
fn inspect(c: &Candidate, verify: bool, min_side: u32) -> Result<Inspected> {
    let (w, h, hash) = inspect_file(&c.path, verify, min_side)?;
    let mask = match &c.mask {
        Err(message) => return Err(DataError::Mask { path: c.path.clone(), message: message.clone() }),
        Ok(None) => None,
        Ok(Some(PendingMask::Alpha)) => Some(MaskSource::Alpha),
        Ok(Some(PendingMask::File(path))) => Some(inspect_mask(path, &c.path, (w, h), verify)?),
    };
    Ok((w, h, hash, mask))
}

/// Reads and hashes a mask file and checks that it has the image's size.
fn inspect_mask(path: &Path, image: &Path, size: (u32, u32), verify: bool) -> Result<MaskSource> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let (w, h) = if verify {
        crate::image_io::decode_mask(&bytes, path)?.dimensions()
    } else {
        probe_size(&bytes, path)?
    };
    if (w, h) != size {
        return Err(DataError::Mask {
            path: image.to_path_buf(),
            message: format!(
                "the mask {} is {w}x{h} px but the image is {}x{} px; a mask must have its image's size",
                path.display(),
                size.0,
                size.1
            ),
        });
    }
    Ok(MaskSource::File {
        path: path.to_path_buf(),
        content_hash: content_hash(&bytes),
    })
}

/// Reads, hashes and checks one image file; returns `(width, height, hash)`.
fn inspect_file(path: &Path, verify: bool, min_side: u32) -> Result<(u32, u32, String)> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let (w, h) = if verify {
        decode_image(&bytes, path)?.dimensions()
    } else {
        probe_size(&bytes, path)?
    };
    if w < min_side || h < min_side || w == 0 || h == 0 {
        return Err(DataError::ImageTooSmall {
            path: path.to_path_buf(),
            width: w,
            height: h,
            min_side,
        });
    }
    Ok((w, h, content_hash(&bytes)))
}

/// Scans every configured folder. Only configuration errors and unreadable top-level folders
/// fail here; per-file problems are collected in [`Scan::problems`].
pub fn scan(config: &DatasetConfig) -> Result<Scan> {
    // A folder that is not there is the error to report, before the settings (bucket sizes
    // derived from the resolution, say) that would fail without it being named.
    // (A subset described by a metadata file alone may have no folder.)
    let missing = |s: &&crate::SubsetConfig| {
        let metadata_only = s.metadata_file.is_some() && s.image_dir.as_os_str().is_empty();
        !metadata_only && !s.image_dir.is_dir()
    };
    if let Some(s) = config.subsets.iter().find(missing) {
        return Err(DataError::NotADirectory { path: s.image_dir.clone() });
    }
    config.validate()?;
    let mut s = Scanner {
        config,
        subsets: Vec::new(),
        candidates: Vec::new(),
        problems: Vec::new(),
        root: PathBuf::new(),
        mask_dir: None,
    };
    for cfg in &config.subsets {
        s.scan_subset(cfg)?;
    }
    let Scanner {
        subsets,
        candidates,
        mut problems,
        ..
    } = s;
    let checked = inspect_parallel(&candidates, config.verify_images, config.min_image_size);
    let mut images = Vec::with_capacity(candidates.len());
    // Mask file -> the image that uses it: a mask at the mask folder's top can match
    // same-named images of several folders, and would then mask each of them alike.
    let mut mask_users: std::collections::HashMap<PathBuf, PathBuf> = std::collections::HashMap::new();
    for (cand, result) in candidates.into_iter().zip(checked) {
        if let Ok((_, _, _, Some(MaskSource::File { path, .. }))) = &result {
            if let Some(first) = mask_users.get(path) {
                problems.push(DataError::Mask {
                    message: shared_mask_advice(path, first, &cand.path),
                    path: cand.path,
                });
                continue;
            }
            mask_users.insert(path.clone(), cand.path.clone());
        }
        match (result, cand.caption) {
            (Ok((width, height, content_hash, mask)), Ok(caption)) => images.push(ImageRecord {
                source: ImageSource::File(cand.path),
                caption,
                width,
                height,
                content_hash,
                subset: cand.subset,
                mask,
            }),
            (Err(e), _) | (Ok(_), Err(e)) => problems.push(e),
        }
    }
    Ok(Scan {
        config: config.clone(),
        subsets,
        images,
        problems,
    })
}

/// Why `image` cannot have `mask`, which `first` already has, and what to do. Masks are
/// found by file stem, so two images of one folder that differ only in their extension
/// (`cat.png`, `cat.jpg`) share a mask wherever it is put: one must be renamed. Images of
/// different folders share one only through the mask folder's top, and a mask at each
/// one's place relative to `image_dir` separates them.
fn shared_mask_advice(mask: &Path, first: &Path, image: &Path) -> String {
    let shared = format!("the mask {} is also the mask of {}", mask.display(), first.display());
    if first.parent() == image.parent() {
        let stem = image.file_stem().unwrap_or_default().to_string_lossy();
        format!("{shared}: masks are found by file stem and both images have the stem `{stem}`; rename one of them (and give it a mask of its new name)")
    } else {
        format!("{shared}; put each image's mask at its place relative to image_dir")
    }
}

/// Decodes / hashes candidates on all cores; results keep the candidates' order.
fn inspect_parallel(
    cands: &[Candidate],
    verify: bool,
    min_side: u32,
) -> Vec<Result<Inspected>> {
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(cands.len().max(1));
    let chunk = cands.len().div_ceil(workers).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = cands
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .map(|c| inspect(c, verify, min_side))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .zip(cands.chunks(chunk))
            .flat_map(|(h, part)| {
                h.join().unwrap_or_else(|_| {
                    part.iter()
                        .map(|c| {
                            Err(DataError::CorruptImage {
                                path: c.path.clone(),
                                message: "the image decoder panicked".into(),
                            })
                        })
                        .collect()
                })
            })
            .collect()
    })
}

/// Builds a scan from in-memory images that all belong to `subset` (its `image_dir` is ignored).
pub fn scan_memory(
    config: &DatasetConfig,
    subset: SubsetConfig,
    images: Vec<(String, RgbImage, String)>,
) -> Result<Scan> {
    let mut config = config.clone();
    config.subsets = vec![subset.clone()];
    config.validate()?;
    let mut s = Scanner {
        config: &config,
        subsets: Vec::new(),
        candidates: Vec::new(),
        problems: Vec::new(),
        root: PathBuf::new(),
        mask_dir: None,
    };
    let idx = s.resolve(&subset, &subset.image_dir, None);
    if subset.mask_dir.is_some() {
        return Err(DataError::config(
            "mask_dir",
            "in-memory images have no files to find masks for; use alpha_mask or image folders",
        ));
    }
    let subsets = s.subsets;
    let mut records = Vec::new();
    let mut problems = Vec::new();
    for (name, image, caption) in images {
        let (w, h) = image.dimensions();
        if w < config.min_image_size || h < config.min_image_size || w == 0 || h == 0 {
            problems.push(DataError::ImageTooSmall {
                path: PathBuf::from(&name),
                width: w,
                height: h,
                min_side: config.min_image_size,
            });
            continue;
        }
        records.push(ImageRecord {
            content_hash: crate::image_io::rgb_content_hash(&image),
            source: ImageSource::Memory {
                name,
                image: Arc::new(image),
            },
            caption,
            width: w,
            height: h,
            subset: idx,
            // In-memory images are RGB: an alpha mask is opaque everywhere.
            mask: subset.alpha_mask.then_some(MaskSource::Alpha),
        });
    }
    Ok(Scan {
        config,
        subsets,
        images: records,
        problems,
    })
}
