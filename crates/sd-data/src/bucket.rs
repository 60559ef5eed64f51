//! Aspect-ratio bucketing, following kohya sd-scripts (`library/model_util.py`
//! `make_bucket_resolutions` and `library/train_util.py` `BucketManager`).

use rand::Rng;
use serde::{Deserialize, Serialize};

/// A bucket or image size as `(width, height)` in pixels.
pub type Reso = (u32, u32);

/// The bucket resolutions kohya sd-scripts predefines for a target resolution, sorted.
///
/// With `A` the pixel area of `max_reso`: for every width `w` from `min_size` to `max_size`
/// in steps of `divisible`, the height is `⌊A / w⌋` rounded down to `divisible`, capped at
/// `max_size`; where it is at least `min_size`, both `(w, h)` and `(h, w)` are added, plus
/// the square bucket `⌊√A⌋` rounded down to `divisible` (sd-scripts' current function;
/// its earlier one counted the area in `divisible`-blocks and had no `min_size` check,
/// which gives the same table where `max_reso` is a multiple of `divisible` and no
/// height falls below `min_size`).
///
/// ```
/// let buckets = sd_data::make_bucket_resolutions((512, 512), 256, 1024, 64);
/// assert!(buckets.contains(&(512, 512)));
/// assert!(buckets.contains(&(768, 320)) && buckets.contains(&(320, 768)));
/// assert!(buckets.iter().all(|&(w, h)| w * h <= 512 * 512 && w % 64 == 0 && h % 64 == 0));
/// ```
pub fn make_bucket_resolutions(
    max_reso: Reso,
    min_size: u32,
    max_size: u32,
    divisible: u32,
) -> Vec<Reso> {
    let divisible = divisible.max(1);
    let step = u64::from(divisible);
    let max_area = u64::from(max_reso.0) * u64::from(max_reso.1);
    let mut resos = std::collections::BTreeSet::new();
    // int(sqrt(max_area) // divisible) * divisible, with the root exact on integers.
    let side = u32::try_from(integer_sqrt(max_area) / step * step).unwrap_or(u32::MAX);
    resos.insert((side, side));
    let mut width = min_size.max(divisible);
    while width <= max_size {
        let height = max_area / u64::from(width) / step * step;
        let height = u32::try_from(height).unwrap_or(u32::MAX).min(max_size);
        // sd-scripts leaves out pairs whose short side would fall below `min_size`.
        if height >= min_size {
            resos.insert((width, height));
            resos.insert((height, width));
        }
        let Some(next) = width.checked_add(divisible) else {
            break;
        };
        width = next;
    }
    resos.into_iter().filter(|&(w, h)| w > 0 && h > 0).collect()
}

fn integer_sqrt(n: u64) -> u64 {
    let mut r = (n as f64).sqrt() as u64;
    while r * r > n {
        r -= 1;
    }
    while (r + 1) * (r + 1) <= n {
        r += 1;
    }
    r
}

/// Where an image goes: its bucket, the size it is resized to before cropping, and the
/// aspect-ratio error `bucket_ar - image_ar`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct BucketAssignment {
    /// The bucket `(width, height)`; the training sample has exactly this size.
    pub bucket: Reso,
    /// Size after resizing; at least the bucket in both dimensions, the excess is cropped.
    pub resized: Reso,
    /// `bucket_w / bucket_h - image_w / image_h`.
    pub ar_error: f64,
}

/// Chooses buckets for images (kohya's `BucketManager`).
#[derive(Clone, Debug)]
pub struct BucketManager {
    no_upscale: bool,
    max_area: u64,
    reso_steps: u32,
    predefined: Vec<Reso>,
    predefined_ars: Vec<f64>,
}

impl BucketManager {
    /// Predefined buckets for `resolution` (kohya bucketing with upscaling allowed).
    pub fn predefined(resolution: Reso, min_size: u32, max_size: u32, reso_steps: u32) -> Self {
        Self::with_buckets(
            resolution,
            reso_steps,
            make_bucket_resolutions(resolution, min_size, max_size, reso_steps),
        )
    }

    /// A single bucket of exactly `resolution`: every image is resized to cover it and cropped
    /// (training without bucketing).
    pub fn fixed(resolution: Reso) -> Self {
        Self::with_buckets(resolution, 1, vec![resolution])
    }

    /// kohya's `bucket_no_upscale`: images larger than the target area are shrunk to it, each image
    /// gets a bucket that is its (shrunk) size rounded down to `reso_steps`.
    pub fn no_upscale(resolution: Reso, reso_steps: u32) -> Self {
        let mut m = Self::with_buckets(resolution, reso_steps, Vec::new());
        m.no_upscale = true;
        m
    }

    fn with_buckets(resolution: Reso, reso_steps: u32, predefined: Vec<Reso>) -> Self {
        let predefined_ars = predefined
            .iter()
            .map(|&(w, h)| f64::from(w) / f64::from(h))
            .collect();
        Self {
            no_upscale: false,
            max_area: u64::from(resolution.0) * u64::from(resolution.1),
            reso_steps: reso_steps.max(1),
            predefined,
            predefined_ars,
        }
    }

    /// The predefined buckets (empty with `bucket_no_upscale`).
    pub fn buckets(&self) -> &[Reso] {
        &self.predefined
    }

    /// Whether this manager never upscales.
    pub fn is_no_upscale(&self) -> bool {
        self.no_upscale
    }

    /// The bucket for an image of `size`; `None` when the image is too small to yield a
    /// non-empty bucket (only possible with `bucket_no_upscale`) or has a zero side.
    pub fn select(&self, size: Reso) -> Option<BucketAssignment> {
        let (w, h) = size;
        if w == 0 || h == 0 {
            return None;
        }
        let ar = f64::from(w) / f64::from(h);
        let (bucket, resized) = if self.no_upscale {
            self.select_no_upscale(w, h, ar)?
        } else {
            self.select_predefined(w, h, ar)?
        };
        if bucket.0 == 0 || bucket.1 == 0 {
            return None;
        }
        Some(BucketAssignment {
            bucket,
            resized,
            ar_error: f64::from(bucket.0) / f64::from(bucket.1) - ar,
        })
    }

    fn select_predefined(&self, w: u32, h: u32, ar: f64) -> Option<(Reso, Reso)> {
        // An image already at a bucket size keeps it even if another bucket shares its ratio.
        let bucket = if self.predefined.contains(&(w, h)) {
            (w, h)
        } else {
            let mut best = None::<(usize, f64)>;
            for (i, &b_ar) in self.predefined_ars.iter().enumerate() {
                let err = (b_ar - ar).abs();
                if best.is_none_or(|(_, e)| err < e) {
                    best = Some((i, err));
                }
            }
            self.predefined[best?.0]
        };
        let bucket_ar = f64::from(bucket.0) / f64::from(bucket.1);
        // Scale so the image covers the bucket: match the side that would otherwise fall short.
        let scale = if ar > bucket_ar {
            f64::from(bucket.1) / f64::from(h)
        } else {
            f64::from(bucket.0) / f64::from(w)
        };
        let resized = (
            round_half_up(f64::from(w) * scale).max(bucket.0),
            round_half_up(f64::from(h) * scale).max(bucket.1),
        );
        Some((bucket, resized))
    }

    fn select_no_upscale(&self, w: u32, h: u32, ar: f64) -> Option<(Reso, Reso)> {
        let resized = if u64::from(w) * u64::from(h) > self.max_area {
            let max_area = self.max_area as f64;
            let resized_w = (max_area * ar).sqrt();
            let resized_h = max_area / resized_w;
            // Round either the width or the height to steps, whichever keeps the ratio better.
            let bw = self.round_to_steps(resized_w);
            let bh_in_w = self.round_to_steps(f64::from(bw) / ar);
            let bh = self.round_to_steps(resized_h);
            let bw_in_h = self.round_to_steps(f64::from(bh) * ar);
            if bh_in_w == 0 || bh == 0 {
                return None;
            }
            let ar_w = f64::from(bw) / f64::from(bh_in_w);
            let ar_h = f64::from(bw_in_h) / f64::from(bh);
            if (ar_w - ar).abs() < (ar_h - ar).abs() {
                (bw, round_half_up(f64::from(bw) / ar))
            } else {
                (round_half_up(f64::from(bh) * ar), bh)
            }
        } else {
            (w, h)
        };
        let bucket = (
            resized.0 - resized.0 % self.reso_steps,
            resized.1 - resized.1 % self.reso_steps,
        );
        Some((bucket, resized))
    }

    fn round_to_steps(&self, x: f64) -> u32 {
        let x = round_half_up(x);
        x - x % self.reso_steps
    }
}

fn round_half_up(x: f64) -> u32 {
    // Python's int(x + 0.5) for non-negative x.
    (x + 0.5).floor().clamp(0.0, f64::from(u32::MAX)) as u32
}

/// Crop offset `(left, top)` that cuts `bucket` out of an image resized to `resized`:
/// centered (kohya: `trim // 2`), or uniformly random when `rng` is given.
pub fn crop_offset<R: Rng + ?Sized>(resized: Reso, bucket: Reso, rng: Option<&mut R>) -> Reso {
    let trim = (
        resized.0.saturating_sub(bucket.0),
        resized.1.saturating_sub(bucket.1),
    );
    match rng {
        Some(rng) => (rng.random_range(0..=trim.0), rng.random_range(0..=trim.1)),
        None => (trim.0 / 2, trim.1 / 2),
    }
}
