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

/// A JPEG's primary image: `bytes` up to and with its end-of-image marker (`FF D9`), found
/// by walking its markers from the start. Anything after that marker is not part of it:
/// Motion Photos (`*.MP.jpg`) append a video there, MPF files a second JPEG, and PIL (so
/// kohya's loaders) ignores it. Refuses a JPEG cut short, one whose scan data runs to the
/// end of the file with no end marker: the image crate's decoder fills a truncated
/// baseline JPEG's missing rows without an error, where PIL refuses it ("image file is
/// truncated"). Bytes that are not a JPEG, or markers too damaged to walk, are left (whole)
/// to the decoder, which reports them.
fn jpeg_primary<'a>(bytes: &'a [u8], path: &Path) -> Result<&'a [u8]> {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return Ok(bytes);
    }
    match walk_jpeg(bytes) {
        JpegEnd::Eoi(end) => Ok(&bytes[..end]),
        JpegEnd::Truncated => Err(corrupt(path, "the JPEG is truncated (its data ends before its end-of-image marker)")),
        JpegEnd::Unwalkable => Ok(bytes),
    }
}

/// Where a JPEG's marker walk ends.
#[derive(Debug, PartialEq)]
enum JpegEnd {
    /// At the primary image's end marker; the offset just past it.
    Eoi(usize),
    /// At the end of the file, within or after a scan, without an end marker.
    Truncated,
    /// At a malformed segment (a length under 2), or at an end marker or the end of the
    /// file before any scan: damage the decoder reports in its own words.
    Unwalkable,
}

/// Walks a JPEG's markers from its start-of-image marker as a decoder reads them: a
/// segment's length skips its contents (so an EXIF thumbnail's markers, inside `APP1`,
/// are passed over), and after a start-of-scan its entropy-coded data runs to the next
/// marker, `FF` followed by a byte other than `00` (a stuffed data byte `FF`), `D0`–`D7`
/// (restart markers, part of the data) or `FF` (fill).
fn walk_jpeg(bytes: &[u8]) -> JpegEnd {
    let mut pos = 2;
    let mut scanned = false;
    let ended = |scanned| if scanned { JpegEnd::Truncated } else { JpegEnd::Unwalkable };
    loop {
        // A marker is `FF`, any fill `FF`s, then its code; stray bytes before it are skipped
        // as libjpeg skips them (with a warning, still decoding the image).
        let Some(ff) = bytes.get(pos..).and_then(|rest| rest.iter().position(|&b| b == 0xFF)) else {
            return ended(scanned);
        };
        pos += ff;
        while bytes.get(pos + 1) == Some(&0xFF) {
            pos += 1;
        }
        let Some(&code) = bytes.get(pos + 1) else {
            return ended(scanned);
        };
        pos += 2;
        match code {
            // An end before any scan ends no image: the decoder has the whole file.
            0xD9 if !scanned => return JpegEnd::Unwalkable,
            0xD9 => return JpegEnd::Eoi(pos),
            // Markers without a length: restarts, TEM, a stray SOI, a stuffed `00`.
            0xD0..=0xD8 | 0x01 | 0x00 => continue,
            _ => {}
        }
        // A file cut inside a scan's header is cut in its image too.
        scanned |= code == 0xDA;
        let Some(len) = bytes.get(pos..pos + 2).map(|l| usize::from(u16::from_be_bytes([l[0], l[1]]))) else {
            return ended(scanned);
        };
        if len < 2 {
            return JpegEnd::Unwalkable;
        }
        pos += len;
        if pos > bytes.len() {
            return ended(scanned);
        }
        if code == 0xDA {
            pos = match entropy_end(bytes, pos) {
                Some(marker) => marker,
                None => return JpegEnd::Truncated,
            };
        }
    }
}

/// The offset of the first marker at or after `pos` in entropy-coded data, or `None` when
/// the data runs to the end of `bytes`.
fn entropy_end(bytes: &[u8], mut pos: usize) -> Option<usize> {
    loop {
        pos += bytes.get(pos..)?.iter().position(|&b| b == 0xFF)?;
        match *bytes.get(pos + 1)? {
            // A stuffed data byte or a restart marker: still data.
            0x00 | 0xD0..=0xD7 => pos += 2,
            // Fill: the marker's code comes after the last `FF`.
            0xFF => pos += 1,
            _ => return Some(pos),
        }
    }
}

fn decode_dynamic(bytes: &[u8], path: &Path) -> Result<DynamicImage> {
    let bytes = jpeg_primary(bytes, path)?;
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
    let bytes = jpeg_primary(bytes, path)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A JPEG's marker layout without real pixels: what the walk reads.
    fn layout(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    const SOI: &[u8] = &[0xFF, 0xD8];
    const EOI: &[u8] = &[0xFF, 0xD9];
    /// An `APP1` holding an EXIF-thumbnail-like SOI, scan and EOI: skipped by its length.
    const APP1: &[u8] = &[0xFF, 0xE1, 0x00, 0x0A, 0xFF, 0xD8, 0xFF, 0xDA, 0xFF, 0xD9, 0x00, 0x00];
    /// A start-of-scan with a 4-byte header.
    const SOS: &[u8] = &[0xFF, 0xDA, 0x00, 0x04, 0x01, 0x00];
    /// Entropy-coded data with a stuffed `FF`, a restart marker and fill before the next marker.
    const DATA: &[u8] = &[0x12, 0xFF, 0x00, 0x34, 0xFF, 0xD3, 0x56, 0xFF, 0xFF];

    #[test]
    fn the_walk_ends_at_the_primary_image_s_end_marker() {
        let jpeg = layout(&[SOI, APP1, SOS, DATA, SOS, DATA, EOI]);
        assert_eq!(walk_jpeg(&jpeg), JpegEnd::Eoi(jpeg.len()));
        // What follows the end marker, markers and all, is not read.
        let mut motion = jpeg.clone();
        motion.extend_from_slice(&[0xFF, 0xDA, 0x00, 0x02, 0x77, 0xFF, 0xD9, 0xFF, 0xDA]);
        assert_eq!(walk_jpeg(&motion), JpegEnd::Eoi(jpeg.len()));
        // Stray bytes between segments are skipped, as libjpeg skips them.
        let stray = layout(&[SOI, &[0x00, 0x42], SOS, DATA, EOI]);
        assert_eq!(walk_jpeg(&stray), JpegEnd::Eoi(stray.len()));
    }

    #[test]
    fn a_scan_without_an_end_marker_is_truncated() {
        let jpeg = layout(&[SOI, APP1, SOS, DATA, EOI]);
        for cut in SOI.len() + APP1.len() + 2..jpeg.len() - 1 {
            assert_eq!(walk_jpeg(&jpeg[..cut]), JpegEnd::Truncated, "cut at {cut}");
        }
        // Cut before any scan, or with a malformed length, the decoder reports the damage.
        assert_eq!(walk_jpeg(&jpeg[..SOI.len() + 3]), JpegEnd::Unwalkable);
        assert_eq!(walk_jpeg(&layout(&[SOI, &[0xFF, 0xE0, 0x00, 0x01], SOS, DATA, EOI])), JpegEnd::Unwalkable);
        // An end marker before any scan ends no image.
        assert_eq!(walk_jpeg(&layout(&[SOI, EOI, SOS, DATA])), JpegEnd::Unwalkable);
    }
}
