//! How training images are resized (kohya's `resize_interpolation`), including OpenCV's
//! area averaging, which sd-scripts uses by default to shrink images.

use std::borrow::Cow;

use image::imageops::FilterType;
use image::RgbImage;
use serde::{Deserialize, Serialize};

use crate::bucket::Reso;

/// A resize filter, by sd-scripts' `resize_interpolation` names. Unset in a subset
/// ([`crate::SubsetConfig::resize_interpolation`]), each image takes sd-scripts' default,
/// [`for_resize`](Self::for_resize): area averaging to shrink, Lanczos to enlarge.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeInterpolation {
    /// Lanczos (a = 3), PIL's `LANCZOS` (sd-scripts' `lanczos`, also `lanczos4`).
    #[serde(alias = "lanczos4")]
    Lanczos,
    /// The nearest pixel.
    Nearest,
    /// Bilinear (a triangle filter widened when shrinking; also `linear`).
    #[serde(alias = "linear")]
    Bilinear,
    /// Bicubic (Catmull-Rom, widened when shrinking; also `cubic`).
    #[serde(alias = "cubic")]
    Bicubic,
    /// Area averaging, OpenCV's `INTER_AREA`: each output pixel is the mean of the input
    /// area it covers, weighted by how much of each input pixel falls in it.
    Area,
    /// PIL's `BOX`, the same area averaging.
    Box,
}

impl ResizeInterpolation {
    /// sd-scripts' choice when none is set: area averaging when neither side grows,
    /// Lanczos otherwise.
    ///
    /// ```
    /// use sd_data::ResizeInterpolation;
    /// assert_eq!(ResizeInterpolation::for_resize((1024, 768), (512, 384)), ResizeInterpolation::Area);
    /// assert_eq!(ResizeInterpolation::for_resize((400, 300), (512, 384)), ResizeInterpolation::Lanczos);
    /// ```
    pub fn for_resize(from: Reso, to: Reso) -> Self {
        if from.0 >= to.0 && from.1 >= to.1 {
            Self::Area
        } else {
            Self::Lanczos
        }
    }

    /// The name sd-scripts gives it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Lanczos => "lanczos",
            Self::Nearest => "nearest",
            Self::Bilinear => "bilinear",
            Self::Bicubic => "bicubic",
            Self::Area => "area",
            Self::Box => "box",
        }
    }
}

/// `img` at `size` with `interpolation`: itself when it has that size.
///
/// ```
/// use sd_data::{resize::resize_rgb, ResizeInterpolation};
/// // Area averaging halves a 4x2 image into the means of its 2x2 blocks.
/// let img = image::RgbImage::from_fn(4, 2, |x, _| image::Rgb([if x < 2 { 10 } else { 30 }, 0, 255]));
/// let small = resize_rgb(&img, (2, 1), ResizeInterpolation::Area);
/// assert_eq!(small.get_pixel(0, 0).0, [10, 0, 255]);
/// assert_eq!(small.get_pixel(1, 0).0, [30, 0, 255]);
/// ```
pub fn resize_rgb(img: &RgbImage, size: Reso, interpolation: ResizeInterpolation) -> Cow<'_, RgbImage> {
    if img.dimensions() == size {
        return Cow::Borrowed(img);
    }
    let filter = match interpolation {
        ResizeInterpolation::Area | ResizeInterpolation::Box => return Cow::Owned(area(img, size)),
        ResizeInterpolation::Lanczos => FilterType::Lanczos3,
        ResizeInterpolation::Nearest => FilterType::Nearest,
        ResizeInterpolation::Bilinear => FilterType::Triangle,
        ResizeInterpolation::Bicubic => FilterType::CatmullRom,
    };
    Cow::Owned(image::imageops::resize(img, size.0, size.1, filter))
}

/// Each output index's input pixels and weights (summing to 1) along one axis of `from`
/// pixels resampled to `to` by area: output `i` covers `[i·s, (i+1)·s)` with `s = from / to`.
fn area_weights(from: usize, to: usize) -> Vec<Vec<(usize, f32)>> {
    let scale = from as f64 / to as f64;
    (0..to)
        .map(|i| {
            let (start, end) = (i as f64 * scale, (i + 1) as f64 * scale);
            let first = start.floor() as usize;
            let last = (end.ceil() as usize).min(from);
            (first..last)
                .filter_map(|j| {
                    let overlap = end.min(j as f64 + 1.0) - start.max(j as f64);
                    (overlap > 1e-12).then_some((j, (overlap / scale) as f32))
                })
                .collect()
        })
        .collect()
}

/// Area resampling of `img` to `size`: rows first, then columns, in f32, rounded once.
fn area(img: &RgbImage, (out_w, out_h): Reso) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let (ow, oh) = (out_w as usize, out_h as usize);
    let (cols, rows) = (area_weights(w, ow), area_weights(h, oh));
    let src = img.as_raw();
    // Horizontal pass: `h` rows of `ow` pixels.
    let mut mid = vec![0f32; h * ow * 3];
    for y in 0..h {
        for (x, taps) in cols.iter().enumerate() {
            let out = &mut mid[(y * ow + x) * 3..][..3];
            for &(j, weight) in taps {
                let p = &src[(y * w + j) * 3..][..3];
                for c in 0..3 {
                    out[c] += f32::from(p[c]) * weight;
                }
            }
        }
    }
    let mut dst = vec![0u8; oh * ow * 3];
    for (y, taps) in rows.iter().enumerate() {
        for x in 0..ow {
            let mut acc = [0f32; 3];
            for &(i, weight) in taps {
                let p = &mid[(i * ow + x) * 3..][..3];
                for c in 0..3 {
                    acc[c] += p[c] * weight;
                }
            }
            for c in 0..3 {
                dst[(y * ow + x) * 3 + c] = acc[c].round().clamp(0.0, 255.0) as u8;
            }
        }
    }
    RgbImage::from_raw(out_w, out_h, dst).expect("the buffer has the image's size")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn area_weights_cover_each_output_once() {
        for (from, to) in [(10, 3), (7, 7), (1000, 512), (512, 1000), (3, 2)] {
            let weights = area_weights(from, to);
            for taps in &weights {
                let sum: f32 = taps.iter().map(|(_, w)| w).sum();
                assert!((sum - 1.0).abs() < 1e-5, "{from}->{to}: {taps:?}");
            }
            // Every input pixel counts `to / from` in all (its share of the outputs).
            let mut total = vec![0f32; from];
            weights.iter().flatten().for_each(|(j, w)| total[*j] += w);
            assert!(total.iter().all(|t| (t - to as f32 / from as f32).abs() < 1e-4), "{from}->{to}");
        }
        // 3 -> 2: the middle pixel is split between both outputs.
        assert_eq!(area_weights(3, 2), vec![vec![(0, 2.0 / 3.0), (1, 1.0 / 3.0)], vec![(1, 1.0 / 3.0), (2, 2.0 / 3.0)]]);
    }

    #[test]
    fn area_keeps_flat_images_and_means() {
        let flat = RgbImage::from_pixel(37, 23, image::Rgb([12, 200, 99]));
        let small = resize_rgb(&flat, (10, 7), ResizeInterpolation::Area);
        assert!(small.pixels().all(|p| p.0 == [12, 200, 99]));
        // A 2x2-block checkerboard of 0 / 100 halves to its block means; a 1-px one to 50.
        let fine = RgbImage::from_fn(8, 8, |x, y| image::Rgb([if (x + y) % 2 == 0 { 100 } else { 0 }; 3]));
        let half = resize_rgb(&fine, (4, 4), ResizeInterpolation::Area);
        assert!(half.pixels().all(|p| p.0 == [50; 3]), "{:?}", half.pixels().next());
        // Box is the same filter.
        assert_eq!(resize_rgb(&fine, (3, 5), ResizeInterpolation::Box).into_owned(), resize_rgb(&fine, (3, 5), ResizeInterpolation::Area).into_owned());
        // Every filter leaves an image of the right size as it is.
        assert!(matches!(resize_rgb(&fine, (8, 8), ResizeInterpolation::Bicubic), Cow::Borrowed(_)));
    }

    #[test]
    fn names_read_as_sd_scripts_spells_them() {
        for (name, want) in [("lanczos", ResizeInterpolation::Lanczos), ("lanczos4", ResizeInterpolation::Lanczos), ("linear", ResizeInterpolation::Bilinear), ("cubic", ResizeInterpolation::Bicubic), ("area", ResizeInterpolation::Area), ("box", ResizeInterpolation::Box), ("nearest", ResizeInterpolation::Nearest)] {
            let got: ResizeInterpolation = serde_json::from_value(serde_json::Value::String(name.into())).unwrap();
            assert_eq!(got, want, "{name}");
        }
        assert!(serde_json::from_value::<ResizeInterpolation>(serde_json::Value::String("hamming".into())).is_err());
    }
}
