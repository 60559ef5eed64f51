//! Deterministic procedural demo data: small images of shapes over gradient fields, all in one
//! recognisable style (soft vertical gradient, diagonal hatching, dark outlines, vignette), with
//! captions like `"a large red circle over a blue field, demostyle"`.
//!
//! Used by the default trainer run and by tests, so no dataset has to be shipped or downloaded.

use std::path::{Path, PathBuf};

use image::{Rgb, RgbImage};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};

/// Options of the demo generator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DemoConfig {
    /// Number of images.
    pub count: usize,
    /// Seed; the same seed always gives the same pixels and captions.
    pub seed: u64,
    /// Style token appended to every caption (the "trigger word" a LoRA learns).
    pub style_token: String,
    /// Short side in pixels; images are square, 2:3 portrait or 3:2 landscape.
    pub base_size: u32,
}

impl Default for DemoConfig {
    fn default() -> Self {
        Self {
            count: 24,
            seed: 0,
            style_token: "demostyle".into(),
            base_size: 64,
        }
    }
}

/// One generated image and its caption.
#[derive(Clone, Debug, PartialEq)]
pub struct DemoSample {
    /// File stem, e.g. `demo_003`.
    pub name: String,
    /// The pixels.
    pub image: RgbImage,
    /// The caption.
    pub caption: String,
}

const PALETTE: [(&str, [u8; 3]); 8] = [
    ("red", [214, 64, 52]),
    ("orange", [236, 138, 46]),
    ("yellow", [238, 206, 70]),
    ("green", [74, 164, 88]),
    ("teal", [44, 156, 156]),
    ("blue", [56, 94, 196]),
    ("purple", [128, 76, 176]),
    ("pink", [226, 124, 168]),
];
const SHAPES: [&str; 5] = ["circle", "square", "triangle", "diamond", "ring"];
const OUTLINE: [f64; 3] = [34.0, 28.0, 46.0];

/// Generates `config.count` samples.
///
/// ```
/// let cfg = sd_data::demo::DemoConfig { count: 3, ..Default::default() };
/// let a = sd_data::demo::generate(&cfg);
/// assert_eq!(a, sd_data::demo::generate(&cfg)); // deterministic
/// assert!(a.iter().all(|s| s.caption.ends_with(", demostyle")));
/// ```
pub fn generate(config: &DemoConfig) -> Vec<DemoSample> {
    (0..config.count).map(|i| sample(config, i)).collect()
}

/// Converts samples to the `(name, image, caption)` triples [`crate::Dataset::from_memory`] takes.
pub fn into_memory_images(samples: Vec<DemoSample>) -> Vec<(String, RgbImage, String)> {
    samples
        .into_iter()
        .map(|s| (s.name, s.image, s.caption))
        .collect()
}

/// Writes the samples to `dir` as `NAME.png` + `NAME.txt` (creating `dir`) and returns the image paths.
pub fn write(dir: &Path, config: &DemoConfig) -> Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).map_err(|e| DataError::io(dir, e))?;
    let mut paths = Vec::with_capacity(config.count);
    for s in generate(config) {
        let png = dir.join(format!("{}.png", s.name));
        s.image.save(&png).map_err(|e| DataError::CorruptImage {
            path: png.clone(),
            message: format!("cannot encode: {e}"),
        })?;
        let txt = dir.join(format!("{}.txt", s.name));
        std::fs::write(&txt, format!("{}\n", s.caption)).map_err(|e| DataError::io(&txt, e))?;
        paths.push(png);
    }
    Ok(paths)
}

fn sample(config: &DemoConfig, index: usize) -> DemoSample {
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    rng.set_stream(index as u64);
    let b = config.base_size.max(8);
    let long = b * 3 / 2;
    let (w, h) = match index % 3 {
        0 => (b, b),
        1 => (b, long),
        _ => (long, b),
    };
    let shape = SHAPES[rng.random_range(0..SHAPES.len())];
    let fg = rng.random_range(0..PALETTE.len());
    let bg = (fg + rng.random_range(1..PALETTE.len())) % PALETTE.len();
    let large = rng.random::<bool>();
    let min_side = f64::from(w.min(h));
    let radius = min_side * if large { 0.36 } else { 0.22 };
    let jitter =
        |rng: &mut ChaCha8Rng, side: u32| f64::from(side) * (0.5 + rng.random_range(-0.12..0.12));
    let center = (jitter(&mut rng, w), jitter(&mut rng, h));
    let image = render(w, h, shape, PALETTE[fg].1, PALETTE[bg].1, center, radius);
    let caption = format!(
        "a {} {} {} over a {} field, {}",
        if large { "large" } else { "small" },
        PALETTE[fg].0,
        shape,
        PALETTE[bg].0,
        config.style_token
    );
    DemoSample {
        name: format!("demo_{index:03}"),
        image,
        caption,
    }
}

fn render(
    w: u32,
    h: u32,
    shape: &str,
    fg: [u8; 3],
    bg: [u8; 3],
    center: (f64, f64),
    r: f64,
) -> RgbImage {
    let outline_half = (r * 0.08).max(1.0);
    RgbImage::from_fn(w, h, |x, y| {
        let (fx, fy) = (f64::from(x) + 0.5, f64::from(y) + 0.5);
        // Background: lighter at the top, darker at the bottom, with faint diagonal hatching.
        let t = fy / f64::from(h);
        let shade = 1.25 - 0.5 * t - if (x + y) % 6 < 2 { 0.06 } else { 0.0 };
        let mut c = bg.map(|v| f64::from(v) * shade);
        let d = sdf(shape, fx - center.0, fy - center.1, r);
        let fill = (0.5 - d).clamp(0.0, 1.0);
        let lit = 1.1 - 0.25 * ((fy - center.1) / r).clamp(-1.0, 1.0);
        for (k, v) in c.iter_mut().enumerate() {
            *v += (f64::from(fg[k]) * lit - *v) * fill;
        }
        let edge = (outline_half + 0.5 - d.abs()).clamp(0.0, 1.0);
        for (k, v) in c.iter_mut().enumerate() {
            *v += (OUTLINE[k] - *v) * edge;
        }
        // Vignette: darken towards the corners.
        let (nx, ny) = (fx / f64::from(w) - 0.5, fy / f64::from(h) - 0.5);
        let vignette = 1.0 - 0.55 * (nx * nx + ny * ny);
        Rgb(c.map(|v| (v * vignette).round().clamp(0.0, 255.0) as u8))
    })
}

/// Signed distance (pixels) from `(x, y)` (relative to the shape center, y down) to the shape.
fn sdf(shape: &str, x: f64, y: f64, r: f64) -> f64 {
    match shape {
        "circle" => x.hypot(y) - r,
        "square" => {
            let (qx, qy) = (x.abs() - r * 0.82, y.abs() - r * 0.82);
            qx.max(0.0).hypot(qy.max(0.0)) + qx.max(qy).min(0.0)
        }
        "diamond" => (x.abs() + y.abs() - r) / std::f64::consts::SQRT_2,
        "ring" => (x.hypot(y) - r * 0.78).abs() - r * 0.22,
        _ => triangle_sdf(x, -y, r),
    }
}

/// Equilateral triangle pointing up (y up), after Inigo Quilez's 2D distance functions.
fn triangle_sdf(x: f64, y: f64, r: f64) -> f64 {
    let k = 3f64.sqrt();
    let (mut px, mut py) = (x.abs() - r, y + r / k);
    if px + k * py > 0.0 {
        (px, py) = ((px - k * py) / 2.0, (-k * px - py) / 2.0);
    }
    px -= px.clamp(-2.0 * r, 0.0);
    -px.hypot(py) * py.signum()
}
