//! Latents to images, image grids and PNG files.

use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use image::RgbImage;

use crate::{Components, PipelineError};

/// Decodes scaled latents to RGB images.
pub fn decode<B: Backend>(c: &Components<B>, latents: Tensor<B, 4>) -> Result<Vec<RgbImage>, PipelineError> {
    let pixels = c.vae.decode(c.vae.unscale_latents(latents))?;
    let [n, _, h, w] = pixels.dims();
    let data = pixels
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| PipelineError::Invalid { origin: "decode".into(), reason: format!("{e:?}") })?;
    let plane = h * w;
    Ok((0..n)
        .map(|i| {
            RgbImage::from_fn(w as u32, h as u32, |x, y| {
                let at = |ch: usize| {
                    let v = data[i * 3 * plane + ch * plane + y as usize * w + x as usize];
                    ((v.clamp(-1.0, 1.0) + 1.0) * 127.5).round() as u8
                };
                image::Rgb([at(0), at(1), at(2)])
            })
        })
        .collect())
}

/// Lays images out in a grid with `cols` columns.
pub fn grid(images: &[RgbImage], cols: usize) -> RgbImage {
    let cols = cols.max(1);
    // Cells fit the largest image (sample prompts may set their own sizes).
    let w = images.iter().map(|i| i.width()).max().unwrap_or(1);
    let h = images.iter().map(|i| i.height()).max().unwrap_or(1);
    let rows = images.len().div_ceil(cols).max(1);
    let mut out = RgbImage::from_pixel(w * cols as u32, h * rows as u32, image::Rgb([255, 255, 255]));
    for (k, img) in images.iter().enumerate() {
        let (x0, y0) = ((k % cols) as u32 * w, (k / cols) as u32 * h);
        image::imageops::overlay(&mut out, img, x0 as i64, y0 as i64);
    }
    out
}

/// Saves an image as a PNG, or in the format another extension of `path` names (`.jpg`,
/// `.webp`, `.bmp`); an extension that names no format this writes, or a file that cannot
/// be written, is an error naming the file. The image is encoded first and written through
/// a temporary file beside `path` ([`lora_core::tensor_io::write_atomic`]), so a failure
/// leaves an existing file as it was.
pub fn save_png(img: &RgbImage, path: &Path) -> Result<(), PipelineError> {
    let failed = |reason: String| PipelineError::Image { path: path.to_path_buf(), reason };
    let format = image::ImageFormat::from_path(path)
        .ok()
        .filter(|f| f.writing_enabled())
        .ok_or_else(|| failed("the extension names no image format this writes: use .png, .jpg, .webp or .bmp".into()))?;
    let mut bytes = std::io::Cursor::new(Vec::new());
    img.write_to(&mut bytes, format).map_err(|e| failed(e.to_string()))?;
    Ok(lora_core::tensor_io::write_atomic(path, bytes.get_ref())?)
}
