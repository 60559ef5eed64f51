//! Image decoding (with EXIF orientation), content hashing, and resize / crop / flip to tensors.

use std::io::Cursor;
use std::path::Path;

use image::imageops::FilterType;
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, RgbImage};
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

/// Decodes an encoded image and applies its EXIF orientation.
pub fn decode_image(bytes: &[u8], path: &Path) -> Result<RgbImage> {
    let mut decoder = reader(bytes, path)?
        .into_decoder()
        .map_err(|e| corrupt(path, e))?;
    let orientation = decoder.orientation().map_err(|e| corrupt(path, e))?;
    let mut img = DynamicImage::from_decoder(decoder).map_err(|e| corrupt(path, e))?;
    img.apply_orientation(orientation);
    Ok(img.into_rgb8())
}

/// Size after EXIF orientation, from the header only (no pixel decoding).
pub fn probe_size(bytes: &[u8], path: &Path) -> Result<Reso> {
    let mut decoder = reader(bytes, path)?
        .into_decoder()
        .map_err(|e| corrupt(path, e))?;
    let (w, h) = decoder.dimensions();
    let orientation = decoder.orientation().map_err(|e| corrupt(path, e))?;
    use image::metadata::Orientation as O;
    Ok(match orientation {
        O::Rotate90 | O::Rotate270 | O::Rotate90FlipH | O::Rotate270FlipH => (h, w),
        _ => (w, h),
    })
}

/// Resizes `img` to `resized` (Lanczos3), crops `bucket` at `crop` = `(left, top)`, optionally
/// mirrors it, and writes it as CHW `f32` in `[-1, 1]` to `out` (length `3 * w * h`).
pub fn write_pixels(
    img: &RgbImage,
    resized: Reso,
    crop: Reso,
    bucket: Reso,
    flip: bool,
    out: &mut [f32],
) {
    let owned;
    let src = if img.dimensions() == resized {
        img
    } else {
        owned = image::imageops::resize(img, resized.0, resized.1, FilterType::Lanczos3);
        &owned
    };
    let (bw, bh) = (bucket.0 as usize, bucket.1 as usize);
    let plane = bw * bh;
    debug_assert_eq!(out.len(), 3 * plane);
    for y in 0..bh {
        for x in 0..bw {
            let sx = if flip { bw - 1 - x } else { x };
            let p = src.get_pixel(crop.0 + sx as u32, crop.1 + y as u32);
            for c in 0..3 {
                out[c * plane + y * bw + x] = f32::from(p[c]) / 127.5 - 1.0;
            }
        }
    }
}
