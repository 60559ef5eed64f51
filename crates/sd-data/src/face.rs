//! kohya's face-crop augmentation (`face_crop_aug_range`): faces found in file names, and
//! the per-sample scale and crop around them.
//!
//! sd-scripts reads a face's box from the image's file name: with five or more
//! `_`-separated parts in its stem, the last four are the face's centre and size in pixels,
//! `name_cx_cy_w_h.png` (as its face-detection script names the crops it writes). Without
//! buckets, such an image is scaled so that the face's larger side is between `1 / hi` and
//! `1 / lo` of the resolution's shorter side (never enlarging it beyond what covering the
//! resolution needs), then cropped around the face.

use std::path::Path;

use rand::Rng;

use crate::bucket::Reso;
use crate::error::{DataError, Result};

/// A face's box in an image's pixels: centre `(cx, cy)` and size `(w, h)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaceBox {
    /// Centre, from the left.
    pub cx: i64,
    /// Centre, from the top.
    pub cy: i64,
    /// Width.
    pub w: i64,
    /// Height.
    pub h: i64,
}

/// The face box in `path`'s file name, as sd-scripts reads it: `None` for a stem of fewer
/// than five `_`-separated parts, or when the centre's `cx` is not positive or the box is
/// empty (sd-scripts crops such an image as any other); an error naming the file when the
/// last four parts are not whole numbers (sd-scripts stops there).
///
/// ```
/// use std::path::Path;
/// use sd_data::face::{face_in_name, FaceBox};
/// let face = face_in_name(Path::new("photos/alice_0001_320_240_96_120.png")).unwrap();
/// assert_eq!(face, Some(FaceBox { cx: 320, cy: 240, w: 96, h: 120 }));
/// assert_eq!(face_in_name(Path::new("alice_01.png")).unwrap(), None);
/// assert!(face_in_name(Path::new("a_b_c_d_e.png")).is_err());
/// ```
pub fn face_in_name(path: &Path) -> Result<Option<FaceBox>> {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let parts: Vec<&str> = stem.split('_').collect();
    if parts.len() < 5 {
        return Ok(None);
    }
    let numbers: Option<Vec<i64>> = parts[parts.len() - 4..].iter().map(|p| p.parse().ok()).collect();
    let Some(&[cx, cy, w, h]) = numbers.as_deref() else {
        return Err(DataError::config(
            "face_crop_aug_range",
            format!("image {}: with five or more `_`-separated parts, a file name must end in its face's box `_cx_cy_w_h` (whole numbers of pixels), as sd-scripts reads it; rename the file or leave face_crop_aug_range unset for its folder", path.display()),
        ));
    };
    Ok((cx > 0 && w.max(h) > 0).then_some(FaceBox { cx, cy, w, h }))
}

/// The size to resize an image of `size` to and the crop `(left, top)` of `target` in it
/// for a sample with `face` at `range = [lo, hi]`, drawn from `rng` as sd-scripts draws
/// them (scale, then the crop's top, then its left); `random_crop` moves the crop anywhere
/// the face stays in view, else it is centred on the face, moved by up to a twentieth of
/// the face's size when `lo < hi` and the face is at least 40 px and a tenth of the
/// target's shorter side. An image that needs enlarging to cover `target` is enlarged just
/// that much (sd-scripts stops there).
pub fn face_crop<R: Rng + ?Sized>(size: Reso, target: Reso, face: FaceBox, [lo, hi]: [f64; 2], random_crop: bool, rng: &mut R) -> (Reso, Reso) {
    let (width, height) = (f64::from(size.0), f64::from(size.1));
    let face_size = face.w.max(face.h);
    let short = i64::from(target.0.min(target.1));
    let cover = (f64::from(target.1) / height).max(f64::from(target.0) / width);
    let wanted = |side: f64| short as f64 / (face_size as f64 * side);
    let min_scale = cover.max(wanted(hi)).min(1.0);
    let max_scale = min_scale.max(wanted(lo)).min(1.0);
    let scale = match min_scale >= max_scale {
        true => min_scale,
        false => min_scale + (max_scale - min_scale) * rng.random::<f64>(),
    };
    // Never below covering the target (which only an image smaller than it needs).
    let scale = scale.max(cover);
    let scaled = |v: f64| (v * scale + 0.5) as i64;
    let resized = (scaled(width).max(i64::from(target.0)), scaled(height).max(i64::from(target.1)));
    // A centre named outside the image (a file name is anyone's input) is taken at its
    // edge, which keeps the crop arithmetic in range.
    let centre = (scaled(face.cx as f64).clamp(0, resized.0), scaled(face.cy as f64).clamp(0, resized.1));
    let mut crop = [0i64; 2];
    // sd-scripts' order: the top, then the left.
    for (axis, target_side, length, face_at) in [(1, i64::from(target.1), resized.1, centre.1), (0, i64::from(target.0), resized.0, centre.0)] {
        let mut p = face_at - target_side / 2;
        if random_crop {
            // Mostly near the face, sometimes far from it, to take in the background.
            let reach = (length - face_at).max(face_at).max(0);
            p += rng.random_range(0..=reach) + rng.random_range(0..=reach) - reach;
        } else if lo != hi && face_size > short / 10 && face_size >= 40 {
            p += rng.random_range((-face_size).div_euclid(20)..=face_size.div_euclid(20));
        }
        crop[axis] = p.clamp(0, length - target_side);
    }
    let to_u32 = |v: i64| u32::try_from(v).unwrap_or(u32::MAX);
    ((to_u32(resized.0), to_u32(resized.1)), (to_u32(crop[0]), to_u32(crop[1])))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// The face's larger side after scaling, over the target's shorter side.
    fn face_share(size: Reso, resized: Reso, face: FaceBox, target: Reso) -> f64 {
        let scale = f64::from(resized.0) / f64::from(size.0);
        face.w.max(face.h) as f64 * scale / f64::from(target.0.min(target.1))
    }

    #[test]
    fn the_face_takes_its_share_and_stays_in_the_crop() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (size, target) = ((2000, 1600), (512, 512));
        let face = FaceBox { cx: 1400, cy: 500, w: 200, h: 260 };
        for random_crop in [false, true] {
            let mut shares = Vec::new();
            for _ in 0..200 {
                let (resized, crop) = face_crop(size, target, face, [2.0, 4.0], random_crop, &mut rng);
                assert!(resized.0 >= target.0 && resized.1 >= target.1 && crop.0 + target.0 <= resized.0 && crop.1 + target.1 <= resized.1, "{resized:?} {crop:?}");
                let share = face_share(size, resized, face, target);
                assert!((0.25 - 1e-3..=0.5 + 1e-3).contains(&share), "{share}");
                shares.push(share);
                if !random_crop {
                    // Centred (give or take a twentieth of the face) unless at the border.
                    let scale = f64::from(resized.0) / f64::from(size.0);
                    let cx = face.cx as f64 * scale;
                    let want = (cx - 256.0).clamp(0.0, f64::from(resized.0 - target.0));
                    assert!((f64::from(crop.0) - want).abs() <= 14.0, "{crop:?} vs {want}");
                }
            }
            // The scale is drawn over the range.
            let (lo, hi) = shares.iter().fold((1.0f64, 0.0f64), |(a, b), s| (a.min(*s), b.max(*s)));
            assert!(lo < 0.3 && hi > 0.45, "{lo}..{hi}");
        }
    }

    #[test]
    fn fixed_range_small_faces_and_small_images() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        // lo == hi: one scale, no jitter: the same crop every time.
        let face = FaceBox { cx: 300, cy: 300, w: 100, h: 100 };
        let first = face_crop((1000, 800), (256, 256), face, [3.0, 3.0], false, &mut rng);
        assert_eq!(face_crop((1000, 800), (256, 256), face, [3.0, 3.0], false, &mut rng), first);
        assert!((face_share((1000, 800), first.0, face, (256, 256)) - 1.0 / 3.0).abs() < 0.01);
        // A face already small enough: the image is not enlarged, only made to cover.
        let tiny = FaceBox { cx: 50, cy: 50, w: 4, h: 4 };
        let (resized, _) = face_crop((600, 300), (256, 256), tiny, [2.0, 4.0], false, &mut rng);
        assert_eq!(resized, (600, 300));
        // A box named far outside the image (or absurdly large) still gives a crop inside it.
        let wild = FaceBox { cx: i64::MAX / 2, cy: 7, w: i64::MAX / 4, h: 3 };
        for random_crop in [false, true] {
            let (resized, crop) = face_crop((600, 300), (256, 256), wild, [2.0, 4.0], random_crop, &mut rng);
            assert!(crop.0 + 256 <= resized.0 && crop.1 + 256 <= resized.1, "{resized:?} {crop:?}");
        }
        // An image smaller than the target is enlarged to cover it.
        let (resized, crop) = face_crop((200, 100), (256, 256), tiny, [2.0, 4.0], false, &mut rng);
        assert!(resized.0 >= 256 && resized.1 == 256 && crop.1 == 0, "{resized:?} {crop:?}");
    }

    #[test]
    fn names_with_and_without_faces() {
        let p = |s: &str| face_in_name(Path::new(s));
        assert_eq!(p("x/a_b_10_20_30_40.webp").unwrap(), Some(FaceBox { cx: 10, cy: 20, w: 30, h: 40 }));
        assert_eq!(p("a_0_20_30_40.png").unwrap(), None, "cx 0: no face");
        assert_eq!(p("a_5_20_0_0.png").unwrap(), None, "an empty box");
        assert_eq!(p("a_b_c_d.png").unwrap(), None, "four parts");
        let err = p("dir/my_cat_photo_2023_x.png").unwrap_err().to_string();
        assert!(err.contains("my_cat_photo_2023_x.png") && err.contains("_cx_cy_w_h"), "{err}");
    }
}
