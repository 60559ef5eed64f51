//! Image decoding (with EXIF orientation), content hashing, and resize / crop / flip to tensors.

use std::io::Cursor;
use std::path::Path;

use image::imageops::FilterType;
use image::{DynamicImage, GrayImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};
use sha2::{Digest, Sha256};

use crate::bucket::Reso;
use crate::error::{DataError, Result};

/// File extensions (lower case) recognised as images.
pub const IMAGE_EXTENSIONS: [&str; 5] = ["png", "jpg", "jpeg", "webp", "bmp"];

/// Whether `path` has an image extension (case-insensitive).
pub fn is_image_path(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

/// Hex SHA-256 of `bytes` (the first 128 bits, plenty to identify image content).
pub fn content_hash(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

/// Content hash of an in-memory image: its size and raw RGB bytes.
pub fn rgb_content_hash(img: &RgbImage) -> String {
    let mut h = Sha256::new();
    h.update(img.width().to_le_bytes());
    h.update(img.height().to_le_bytes());
    h.update(img.as_raw());
    h.finalize()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn reader<'a>(bytes: &'a [u8], path: &Path) -> Result<ImageReader<Cursor<&'a [u8]>>> {
    let mut reader = ImageReader::new(Cursor::new(bytes));
    // Content sniffing wins over the extension: `.png` files that are really JPEGs are common.
    if let Ok(format) = ImageFormat::from_path(path) {
        reader.set_format(format);
    }
    reader
        .with_guessed_format()
        .map_err(|e| DataError::io(path, e))
}

fn corrupt(path: &Path, e: impl std::fmt::Display) -> DataError {
    DataError::CorruptImage {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// The most pixels an image may have, PIL's decompression-bomb error threshold
/// (`2 * Image.MAX_IMAGE_PIXELS`) that kohya's loaders inherit: about 13 400 px square.
/// A header claiming more is refused before its pixel buffer is allocated (a damaged
/// header can claim a buffer of hundreds of GiB, which would abort the process).
pub const MAX_IMAGE_PIXELS: u64 = 178_956_970;

/// Refuses a header whose `width × height` exceeds [`MAX_IMAGE_PIXELS`].
fn check_pixels(path: &Path, (width, height): (u32, u32)) -> Result<()> {
    if u64::from(width) * u64::from(height) > MAX_IMAGE_PIXELS {
        return Err(DataError::ImageTooLarge {
            path: path.to_path_buf(),
            width,
            height,
            max_pixels: MAX_IMAGE_PIXELS,
        });
    }
    Ok(())
}

/// Refuses a JPEG cut short: one with no end-of-image marker (`FF D9`) after its last
/// start-of-scan marker (`FF DA`). The image crate's decoder fills a truncated baseline
/// JPEG's missing rows without an error, where PIL (and so kohya's loaders) refuse it
/// ("image file is truncated"). Neither marker can occur inside entropy-coded data (a
/// data byte `FF` is written `FF 00`), and an EXIF thumbnail's markers come before the
/// image's own scans.
fn check_jpeg_complete(bytes: &[u8], path: &Path) -> Result<()> {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return Ok(());
    }
    let has_scan = |bytes: &[u8]| bytes.windows(2).any(|w| w == [0xFF, 0xDA]);
    // The end marker first, from the back: in a whole file it is (nearly) the last bytes,
    // so only the few bytes after it are searched for a scan, not the whole image.
    match bytes.windows(2).rposition(|w| w == [0xFF, 0xD9]) {
        Some(end) if has_scan(&bytes[end..]) => Err(corrupt(path, "the JPEG is truncated (no end-of-image marker after its last scan)")),
        None if has_scan(bytes) => Err(corrupt(path, "the JPEG is truncated (no end-of-image marker)")),
        _ => Ok(()),
    }
}

fn decode_dynamic(bytes: &[u8], path: &Path) -> Result<DynamicImage> {
    check_jpeg_complete(bytes, path)?;
    let mut decoder = reader(bytes, path)?
        .into_decoder()
        .map_err(|e| corrupt(path, e))?;
    check_pixels(path, decoder.dimensions())?;
    let orientation = decoder.orientation().map_err(|e| corrupt(path, e))?;
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| corrupt(path, e))?;
    img.apply_orientation(orientation);
    Ok(img)
}

/// Decodes an encoded image and applies its EXIF orientation.
pub fn decode_image(bytes: &[u8], path: &Path) -> Result<RgbImage> {
    Ok(decode_dynamic(bytes, path)?.into_rgb8())
}

/// Decodes an encoded image with its alpha channel (EXIF orientation applied): the RGB
/// pixels as [`decode_image`] gives them, and the alpha plane, `None` when the image has
/// none (then it is opaque everywhere).
pub fn decode_image_with_alpha(bytes: &[u8], path: &Path) -> Result<(RgbImage, Option<GrayImage>)> {
    let img = decode_dynamic(bytes, path)?;
    let alpha = img.color().has_alpha().then(|| {
        let rgba = img.to_rgba8();
        GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| image::Luma([rgba.get_pixel(x, y)[3]]))
    });
    Ok((img.into_rgb8(), alpha))
}

/// Decodes a mask image (EXIF orientation applied) into one plane: the red channel, which
/// is the grey value of a greyscale mask (kohya's masked loss reads the red channel of its
/// conditioning images).
pub fn decode_mask(bytes: &[u8], path: &Path) -> Result<GrayImage> {
    let rgb = decode_dynamic(bytes, path)?.into_rgb8();
    Ok(GrayImage::from_fn(rgb.width(), rgb.height(), |x, y| image::Luma([rgb.get_pixel(x, y)[0]])))
}

/// Size after EXIF orientation, from the header only (no pixel decoding).
pub fn probe_size(bytes: &[u8], path: &Path) -> Result<Reso> {
    check_jpeg_complete(bytes, path)?;
    let mut decoder = reader(bytes, path)?
        .into_decoder()
        .map_err(|e| corrupt(path, e))?;
    let (w, h) = decoder.dimensions();
    check_pixels(path, (w, h))?;
    let orientation = decoder.orientation().map_err(|e| corrupt(path, e))?;
    use image::metadata::Orientation as O;
    Ok(match orientation {
        O::Rotate90 | O::Rotate270 | O::Rotate90FlipH | O::Rotate270FlipH => (h, w),
        _ => (w, h),
    })
}

/// `img` at `size`: itself when it has that size, else resized with `filter`.
fn resized_to<P: image::Pixel + 'static>(img: &image::ImageBuffer<P, Vec<P::Subpixel>>, size: Reso, filter: FilterType) -> std::borrow::Cow<'_, image::ImageBuffer<P, Vec<P::Subpixel>>> {
    if img.dimensions() == size {
        std::borrow::Cow::Borrowed(img)
    } else {
        std::borrow::Cow::Owned(image::imageops::resize(img, size.0, size.1, filter))
    }
}

/// Resizes a mask plane to `resized` (bilinear: unlike Lanczos it does not ring at hard
/// mask edges), crops `bucket` at `crop` = `(left, top)`, optionally mirrors it, and writes
/// it as `f32` in `[0, 1]` to `out` (length `w * h`), the geometry of [`write_pixels`].
pub fn write_mask(mask: &GrayImage, resized: Reso, crop: Reso, bucket: Reso, flip: bool, out: &mut [f32]) {
    let src = resized_to(mask, resized, FilterType::Triangle);
    let bw = bucket.0 as usize;
    debug_assert_eq!(out.len(), bw * bucket.1 as usize);
    for (y, row) in out.chunks_mut(bw).enumerate() {
        for (x, v) in row.iter_mut().enumerate() {
            let sx = if flip { bw - 1 - x } else { x };
            *v = f32::from(src.get_pixel(crop.0 + sx as u32, crop.1 + y as u32)[0]) / 255.0;
        }
    }
}

/// Area resampling of an `h × w` plane (row major) to `out_h × out_w`, as PyTorch's
/// `interpolate(mode="area")` (adaptive average pooling): output cell `(i, j)` is the mean
/// of input rows `⌊i·h/out_h⌋ .. ⌈(i+1)·h/out_h⌉` and the matching columns. kohya brings
/// loss masks to the latent size this way.
///
/// ```
/// let plane = [1.0, 0.0, 0.0, 0.0, /**/ 1.0, 1.0, 0.0, 0.0];
/// assert_eq!(sd_data::image_io::area_resize(&plane, (2, 4), (1, 2)), vec![0.75, 0.0]);
/// ```
pub fn area_resize(plane: &[f32], (h, w): (usize, usize), (out_h, out_w): (usize, usize)) -> Vec<f32> {
    assert_eq!(plane.len(), h * w, "area_resize: the plane is not {h}x{w}");
    let span = |i: usize, n: usize, out: usize| (i * n / out, ((i + 1) * n).div_ceil(out));
    let mut out = Vec::with_capacity(out_h * out_w);
    for i in 0..out_h {
        let (y0, y1) = span(i, h, out_h);
        for j in 0..out_w {
            let (x0, x1) = span(j, w, out_w);
            let sum: f64 = (y0..y1).flat_map(|y| &plane[y * w + x0..y * w + x1]).map(|&v| f64::from(v)).sum();
            out.push((sum / ((y1 - y0) * (x1 - x0)) as f64) as f32);
        }
    }
    out
}

/// kohya's `color_aug`: one sample's colour change, drawn by
/// [`ColorAug::draw`] and applied to its resized, cropped 8-bit pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ColorAug {
    /// Rotates every pixel's hue by this many of OpenCV's 8-bit hue units (2° each; the
    /// draw gives −8 to 8, i.e. up to ±16°), keeping saturation and value.
    Hue(f32),
    /// Raises every channel value `v` in `0..=255` to this power (the draw gives 0.95 to
    /// 1.05) and clips it to 255. As in sd-scripts, the power applies to the 0–255 value,
    /// not to `v / 255`: 1.05 brightens mid-grey 128 to 163 and clips from 196 up; 0.95
    /// darkens 128 to 100.4 and white to 193.3.
    Gamma(f32),
}

impl ColorAug {
    /// sd-scripts' draw (`AugHelper.color_aug`): with probability 0.33 a change, then a
    /// hue rotation or a gamma with equal odds; otherwise none.
    ///
    /// ```
    /// use rand::SeedableRng;
    /// use sd_data::image_io::ColorAug;
    /// let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    /// let draws: Vec<_> = (0..3000).map(|_| ColorAug::draw(&mut rng)).collect();
    /// let changed = draws.iter().filter(|d| d.is_some()).count();
    /// assert!((900..1100).contains(&changed)); // about a third
    /// assert!(draws.iter().flatten().all(|d| match *d {
    ///     ColorAug::Hue(h) => (-8.0..=8.0).contains(&h),
    ///     ColorAug::Gamma(g) => (0.95..=1.05).contains(&g),
    /// }));
    /// ```
    pub fn draw<R: rand::Rng>(rng: &mut R) -> Option<Self> {
        if rng.random::<f64>() > 0.33 {
            return None;
        }
        Some(match rng.random::<f64>() > 0.5 {
            true => Self::Hue(rng.random_range(-8.0..=8.0)),
            false => Self::Gamma(rng.random_range(0.95..=1.05)),
        })
    }

    /// One pixel's 8-bit RGB after the change, as `0.0..=255.0`, in floating point.
    /// sd-scripts computes in 8 bits (its hue in 2° steps, the shift and the gamma's result
    /// truncated), and as it hands RGB pixels to OpenCV's BGR conversion its hue turns the
    /// other way for a given draw; the draws are symmetric, so the changes are alike in
    /// distribution.
    ///
    /// ```
    /// use sd_data::image_io::ColorAug;
    /// // Pure red rotated by 60 OpenCV units (120°) is pure green; greys keep their value.
    /// let green = ColorAug::Hue(60.0).apply([255, 0, 0]);
    /// assert!((green[0] - 0.0).abs() < 1e-3 && (green[1] - 255.0).abs() < 1e-3 && green[2].abs() < 1e-3);
    /// assert_eq!(ColorAug::Hue(5.0).apply([90, 90, 90]), [90.0; 3]);
    /// assert_eq!(ColorAug::Gamma(1.05).apply([255, 128, 0])[0], 255.0);
    /// assert!((ColorAug::Gamma(0.95).apply([255, 128, 0])[1] - 128f32.powf(0.95)).abs() < 1e-3);
    /// ```
    pub fn apply(self, [r, g, b]: [u8; 3]) -> [f32; 3] {
        let rgb = [f32::from(r), f32::from(g), f32::from(b)];
        match self {
            Self::Gamma(gamma) => rgb.map(|v| v.powf(gamma).clamp(0.0, 255.0)),
            Self::Hue(shift) => {
                let (h, s, v) = rgb_to_hsv(rgb);
                hsv_to_rgb(((h + 2.0 * shift) % 360.0 + 360.0) % 360.0, s, v)
            }
        }
    }
}

/// Hue in degrees `[0, 360)`, saturation in `[0, 1]`, value as the largest channel.
fn rgb_to_hsv([r, g, b]: [f32; 3]) -> (f32, f32, f32) {
    let max = r.max(g).max(b);
    let min = r.min(g).min(b);
    let delta = max - min;
    if delta == 0.0 {
        return (0.0, 0.0, max);
    }
    let sector = if max == r {
        (g - b) / delta
    } else if max == g {
        (b - r) / delta + 2.0
    } else {
        (r - g) / delta + 4.0
    };
    ((sector * 60.0 + 360.0) % 360.0, delta / max, max)
}

fn hsv_to_rgb(h: f32, s: f32, v: f32) -> [f32; 3] {
    let c = v * s;
    let sector = h / 60.0;
    let x = c * (1.0 - (sector % 2.0 - 1.0).abs());
    let (r, g, b) = match sector as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = v - c;
    [r + m, g + m, b + m]
}

/// Resizes `img` to `resized` with `interpolation` (see [`crate::resize`]), crops `bucket`
/// at `crop` = `(left, top)`, changes its colours by `color` (kohya's `color_aug`),
/// optionally mirrors it, and writes it as CHW `f32` in `[-1, 1]` to `out` (length
/// `3 * w * h`).
#[allow(clippy::too_many_arguments)] // one sample's geometry, as the plan gives it
pub fn write_pixels(
    img: &RgbImage,
    resized: Reso,
    interpolation: crate::ResizeInterpolation,
    crop: Reso,
    bucket: Reso,
    flip: bool,
    color: Option<ColorAug>,
    out: &mut [f32],
) {
    let src = crate::resize::resize_rgb(img, resized, interpolation);
    let (bw, bh) = (bucket.0 as usize, bucket.1 as usize);
    let plane = bw * bh;
    debug_assert_eq!(out.len(), 3 * plane);
    for y in 0..bh {
        for x in 0..bw {
            let sx = if flip { bw - 1 - x } else { x };
            let p = src.get_pixel(crop.0 + sx as u32, crop.1 + y as u32).0;
            let rgb = match color {
                Some(aug) => aug.apply(p),
                None => p.map(f32::from),
            };
            for c in 0..3 {
                out[c * plane + y * bw + x] = rgb[c] / 127.5 - 1.0;
            }
        }
    }
}
