//! A small loss-curve plot (raw loss in grey, its moving average in blue) as a PNG.

use image::{Rgb, RgbImage};

fn line(img: &mut RgbImage, (x0, y0): (i64, i64), (x1, y1): (i64, i64), color: Rgb<u8>) {
    let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
    let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
    let (mut x, mut y, mut err) = (x0, y0, dx + dy);
    loop {
        if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
            img.put_pixel(x as u32, y as u32, color);
        }
        if x == x1 && y == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

/// Plots `losses` (one per step) into a `width x height` image.
pub fn loss_curve(losses: &[f32], width: u32, height: u32) -> RgbImage {
    let mut img = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    let margin = 24i64;
    let (w, h) = (width as i64 - 2 * margin, height as i64 - 2 * margin);
    let axis = Rgb([0, 0, 0]);
    line(&mut img, (margin, margin), (margin, margin + h), axis);
    line(&mut img, (margin, margin + h), (margin + w, margin + h), axis);
    let finite: Vec<f32> = losses.iter().copied().filter(|v| v.is_finite()).collect();
    if finite.len() < 2 {
        return img;
    }
    let (lo, hi) = finite.iter().fold((f32::MAX, f32::MIN), |(a, b), v| (a.min(*v), b.max(*v)));
    let span = (hi - lo).max(1e-12);
    let to_px = |i: usize, v: f32| {
        let x = margin + (i as i64 * w) / (finite.len() as i64 - 1);
        let y = margin + h - (((v - lo) / span) * h as f32) as i64;
        (x, y)
    };
    let mut ema = finite[0];
    let mut smooth = Vec::with_capacity(finite.len());
    for v in &finite {
        ema = 0.9 * ema + 0.1 * v;
        smooth.push(ema);
    }
    for (series, color) in [(&finite, Rgb([190, 190, 190])), (&smooth, Rgb([30, 90, 200]))] {
        for i in 1..series.len() {
            line(&mut img, to_px(i - 1, series[i - 1]), to_px(i, series[i]), color);
        }
    }
    img
}
