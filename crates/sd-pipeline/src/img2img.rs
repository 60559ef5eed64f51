//! Sampling that starts from an image: img2img, inpainting and the two-pass hires fix.

use burn::tensor::backend::Backend;
use burn::tensor::{Tensor, TensorData};
use image::RgbImage;
use sd_sched::{NoiseSource, SamplerSpec, SeededNoise};

use crate::sampling::{denoise, denoise_from, initial_latents, latent_shape, GenerateOptions, Inpaint};
use crate::images::decode;
use crate::{Components, PipelineError};

/// The size img2img samples `image` (`width × height` pixels) at: `opts.width` /
/// `opts.height` where set (non-zero), else the image's own side rounded down to the
/// model's size multiple (the VAE's factor times the UNet's; diffusers' img2img takes the
/// image's size rounded down to a multiple of 8, and its UNet pads what ours requires).
pub fn init_image_size<B: Backend>(c: &Components<B>, opts: &GenerateOptions, (width, height): (u32, u32)) -> (usize, usize) {
    let m = c.vae.downsample_factor() * c.unet.size_multiple();
    let side = |given: usize, own: u32| if given > 0 { given } else { own as usize / m * m };
    (side(opts.width, width), side(opts.height, height))
}

/// `image` resized to `width × height` (Lanczos, as diffusers' image processor resizes;
/// stretched where the aspect ratio differs, as its default resize mode does), as
/// `[1, 3, height, width]` pixels in `[-1, 1]`.
pub fn image_pixels<B: Backend>(image: &RgbImage, width: usize, height: usize, device: &B::Device) -> Tensor<B, 4> {
    let resized = match image.dimensions() == (width as u32, height as u32) {
        true => image.clone(),
        false => image::imageops::resize(image, width as u32, height as u32, image::imageops::FilterType::Lanczos3),
    };
    let plane = width * height;
    let mut data = vec![0f32; 3 * plane];
    for (x, y, p) in resized.enumerate_pixels() {
        for ch in 0..3 {
            data[ch * plane + y as usize * width + x as usize] = f32::from(p[ch]) / 127.5 - 1.0;
        }
    }
    Tensor::from_data(TensorData::new(data, [1, 3, height, width]), device)
}

/// img2img's starting point and first step (diffusers' `StableDiffusionImg2ImgPipeline`):
/// `image` at `opts`' size (a width or height of 0 takes the image's, [`init_image_size`];
/// [`image_pixels`]), encoded by the VAE (a sample of its
/// posterior, seeded by `opts.seed + 2`) and scaled, once for all prompts; then, per prompt,
/// noised (seeded by `opts.seed`, as text-to-image's initial noise) to the level of the
/// step where `strength` of the `opts.steps` steps remain ([`sd_sched::img2img_start`]).
/// Strength 1 starts from (almost) pure noise; lower strengths keep more of the image.
/// Returns the latents for [`denoise_from`] and that step.
pub fn img2img_latents<B: Backend>(c: &Components<B>, opts: &GenerateOptions, image: &RgbImage, strength: f64, device: &B::Device) -> Result<(Tensor<B, 4>, usize), PipelineError> {
    let start = ImageStart::new(c, opts, image, strength, device)?;
    Ok((start.sampler.add_noise(start.clean, start.noise, start.first)?, start.first))
}

/// Inpainting's starting point, first step and what [`denoise_masked`](crate::denoise_masked) keeps (diffusers'
/// `StableDiffusionInpaintPipeline` with a text-to-image UNet): as [`img2img_latents`],
/// except that strength 1 starts from pure noise (times the sampler's initial sigma), and
/// with `mask` ([`mask_latents`]: white repaints, black keeps the image).
pub fn inpaint_latents<B: Backend>(c: &Components<B>, opts: &GenerateOptions, image: &RgbImage, mask: &RgbImage, strength: f64, device: &B::Device) -> Result<(Tensor<B, 4>, usize, Inpaint<B>), PipelineError> {
    let start = ImageStart::new(c, opts, image, strength, device)?;
    let latents = match strength == 1.0 {
        true => start.noise.clone() * start.sampler.init_noise_sigma(),
        false => start.sampler.add_noise(start.clean.clone(), start.noise.clone(), start.first)?,
    };
    let [n, _, h, w] = start.clean.dims();
    let mask = mask_latents::<B>(mask, start.size, (w, h), device)?.repeat_dim(0, n);
    Ok((latents, start.first, Inpaint { image: start.clean, noise: start.noise, mask }))
}

/// An inpainting mask at the latents' size `[1, 1, h, w]`, as diffusers' inpainting
/// pipeline prepares it: resized to the image's `size` (Lanczos), grey (ITU-R 601 luma, as
/// PIL's `convert("L")`), binarised at one half (1 where at least half white: repaint),
/// then sampled down to `latent` `(w, h)` by the nearest pixel (`interpolate`'s default).
/// An empty mask or size is an error.
pub fn mask_latents<B: Backend>(mask: &RgbImage, size: (usize, usize), latent: (usize, usize), device: &B::Device) -> Result<Tensor<B, 4>, PipelineError> {
    let (width, height) = size;
    if mask.width() == 0 || mask.height() == 0 || width == 0 || height == 0 || latent.0 == 0 || latent.1 == 0 {
        return Err(PipelineError::Invalid {
            origin: "inpainting mask".into(),
            reason: format!("a mask of {}x{} px for an image of {width}x{height} px and latents of {}x{}: none may be empty", mask.width(), mask.height(), latent.0, latent.1),
        });
    }
    let rgb = match mask.dimensions() == (width as u32, height as u32) {
        true => mask.clone(),
        false => image::imageops::resize(mask, width as u32, height as u32, image::imageops::FilterType::Lanczos3),
    };
    let grey = image::GrayImage::from_fn(rgb.width(), rgb.height(), |x, y| {
        let [r, g, b] = rgb.get_pixel(x, y).0.map(u32::from);
        // PIL: L = (R·19595 + G·38470 + B·7471 + 0x8000) >> 16.
        image::Luma([((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16) as u8])
    });
    let (lw, lh) = latent;
    let mut data = Vec::with_capacity(lw * lh);
    for y in 0..lh {
        for x in 0..lw {
            // torch's nearest: source index ⌊dst · in / out⌋.
            let (sx, sy) = (x * width / lw, y * height / lh);
            data.push(if f32::from(grey.get_pixel(sx as u32, sy as u32)[0]) / 255.0 >= 0.5 { 1.0f32 } else { 0.0 });
        }
    }
    Ok(Tensor::from_data(TensorData::new(data, [1, 1, lh, lw]), device))
}

/// What img2img and inpainting start from: the sampler set up, the first step, the image's
/// latents once per prompt, the seeded noise and the image size sampled at.
struct ImageStart<B: Backend> {
    sampler: Box<dyn sd_sched::Sampler<B>>,
    size: (usize, usize),
    first: usize,
    clean: Tensor<B, 4>,
    noise: Tensor<B, 4>,
}

impl<B: Backend> ImageStart<B> {
    fn new(c: &Components<B>, opts: &GenerateOptions, image: &RgbImage, strength: f64, device: &B::Device) -> Result<Self, PipelineError> {
        if image.width() == 0 || image.height() == 0 {
            return Err(PipelineError::Invalid { origin: "init image".into(), reason: format!("the image is empty ({}x{} px)", image.width(), image.height()) });
        }
        let (width, height) = init_image_size(c, opts, image.dimensions());
        let opts = &GenerateOptions { width, height, ..opts.clone() };
        let shape = latent_shape(c, opts)?;
        let mut sampler = opts.sampler.parse::<SamplerSpec>()?.build::<B>(&c.scheduler)?;
        sampler.set_timesteps(opts.steps)?;
        let first = sd_sched::img2img_start(opts.steps, strength, sampler.order()).map_err(named("img2img strength"))?;
        let posterior = c.vae.encode(image_pixels(image, opts.width, opts.height, device))?;
        let eps = SeededNoise::new(opts.seed.wrapping_add(2)).sample(posterior.mean.dims(), device)?;
        let clean = c.vae.scale_latents(posterior.sample(eps)?).repeat_dim(0, shape[0]);
        let noise = SeededNoise::new(opts.seed).sample(shape, device)?;
        Ok(Self { sampler, size: (width, height), first, clean, noise })
    }
}

/// A scheduler's refusal of an argument as an error naming the input it came from, `origin`
/// (the scheduler's own message names its parameter).
fn named(origin: &'static str) -> impl FnOnce(sd_sched::SchedError) -> PipelineError {
    move |e| match e {
        sd_sched::SchedError::InvalidArgument { reason, .. } => PipelineError::Invalid { origin: origin.into(), reason },
        e => e.into(),
    }
}

/// A two-pass "hires fix" (A1111's *Hires. fix*, kohya's `gen_img.py --highres_fix_*`):
/// the image is first made at a fraction of the asked size, where the model composes well,
/// then upscaled and refined by img2img at the full size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HiresFix {
    /// The first pass's side as a share of the final one (kohya's `--highres_fix_scale`),
    /// in (0, 1); rounded down to the model's size multiple.
    pub scale: f64,
    /// Steps of the first pass (kohya's `--highres_fix_steps`, 28).
    pub steps: usize,
    /// How far the upscaled image is noised for the second pass, the share of its steps
    /// that run (A1111's denoising strength; 0.7 there).
    pub strength: f64,
    /// Upscale the first pass's latents (bicubic, kohya's `--highres_fix_latents_upscaling`,
    /// A1111's *Latent (bicubic)*) instead of its decoded images (Lanczos, then encoded).
    pub latents: bool,
}

/// Half the final side (A1111's "upscale by 2"), kohya's 28 first-pass steps, A1111's
/// strength 0.7, images upscaled (not latents).
impl Default for HiresFix {
    fn default() -> Self {
        Self { scale: 0.5, steps: 28, strength: 0.7, latents: false }
    }
}

impl HiresFix {
    /// The first pass's options: `opts` at the scaled size (rounded to the nearest pixel,
    /// then down to the model's multiple) and the first pass's steps. Checks the scale and
    /// that the strength leaves at least one of `opts.steps` to run.
    pub fn first_pass<B: Backend>(&self, c: &Components<B>, opts: &GenerateOptions) -> Result<GenerateOptions, PipelineError> {
        if !(self.scale > 0.0 && self.scale < 1.0) {
            return Err(PipelineError::Invalid { origin: "hires fix scale".into(), reason: format!("must be in (0, 1), got {}", self.scale) });
        }
        if !(1..=crate::MAX_SAMPLE_STEPS).contains(&self.steps) {
            return Err(PipelineError::Invalid { origin: "hires fix steps".into(), reason: format!("the first pass's steps must be 1 to {}, got {}", crate::MAX_SAMPLE_STEPS, self.steps) });
        }
        let sampler = opts.sampler.parse::<SamplerSpec>()?.build::<B>(&c.scheduler)?;
        sd_sched::img2img_start(opts.steps, self.strength, sampler.order()).map_err(named("hires fix strength"))?;
        let m = c.vae.downsample_factor() * c.unet.size_multiple();
        let side = |s: usize| (s as f64 * self.scale + 0.5) as usize / m * m;
        let (width, height) = (side(opts.width), side(opts.height));
        if width == 0 || height == 0 {
            return Err(PipelineError::Invalid {
                origin: "hires fix scale".into(),
                reason: format!("{} of {}x{} rounds down to no side of a multiple of {m} (this model's)", self.scale, opts.width, opts.height),
            });
        }
        Ok(GenerateOptions { width, height, steps: self.steps, ..opts.clone() })
    }
}

/// Runs both passes of `hires` for `opts` (the final size and steps) and returns the final
/// latents. The first pass is text-to-image from `opts.seed`; its result is upscaled to
/// `opts`' size, encoded where it was decoded (a sample of the VAE's posterior, seeded by
/// `opts.seed + 2`, as img2img encodes), noised with noise seeded by `opts.seed + 1` (kohya's
/// second-pass seed) to the step where `hires.strength` of `opts.steps` remain, and
/// denoised from there.
pub fn hires_fix<B: Backend>(c: &Components<B>, opts: &GenerateOptions, hires: &HiresFix, device: &B::Device) -> Result<Tensor<B, 4>, PipelineError> {
    let first = hires.first_pass(c, opts)?;
    let shape = latent_shape(c, opts)?;
    // A first pass gone NaN would decode to black and be refined from there.
    let small = crate::sampling::finite(denoise(c, &first, initial_latents(c, &first, device)?, device)?)?;
    let clean = if hires.latents {
        upscale_latents(small, [shape[2], shape[3]])
    } else {
        let pixels: Vec<Tensor<B, 4>> = decode(c, small)?.iter().map(|image| image_pixels(image, opts.width, opts.height, device)).collect();
        let posterior = c.vae.encode(Tensor::cat(pixels, 0))?;
        let eps = SeededNoise::new(opts.seed.wrapping_add(2)).sample(posterior.mean.dims(), device)?;
        c.vae.scale_latents(posterior.sample(eps)?)
    };
    let mut sampler = opts.sampler.parse::<SamplerSpec>()?.build::<B>(&c.scheduler)?;
    sampler.set_timesteps(opts.steps)?;
    let first_step = sd_sched::img2img_start(opts.steps, hires.strength, sampler.order()).map_err(named("hires fix strength"))?;
    let noise = SeededNoise::new(opts.seed.wrapping_add(1)).sample(shape, device)?;
    let latents = sampler.add_noise(clean, noise, first_step)?;
    denoise_from(c, opts, latents, first_step, device)
}

/// Latents resized to `[h, w]` bicubically, as `torch.nn.functional.interpolate(mode=
/// "bicubic")` (half-pixel centres, no antialiasing) resizes them for kohya's latent hires fix.
pub fn upscale_latents<B: Backend>(latents: Tensor<B, 4>, size: [usize; 2]) -> Tensor<B, 4> {
    let options = burn::tensor::ops::InterpolateOptions::new(burn::tensor::ops::InterpolateMode::Bicubic).with_align_corners(false);
    burn::tensor::module::interpolate(latents, size, options)
}
