//! Text-to-image sampling with classifier-free guidance: the options, the initial latents
//! and the sampler loop (with inpainting's blend), which a stop request ends between steps.

use std::sync::atomic::{AtomicBool, Ordering};

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use sd_sched::{NoiseSource, SamplerSpec, SeededNoise};

use crate::text::{condition_prompts, prompt_rows, TextConditioning};
use crate::{Components, PipelineError};

/// Set by [`request_stop`], cleared by [`clear_stop`].
static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);

/// Asks sampling to stop (from a Ctrl-C handler, say): the sampler loop of every running
/// [`denoise`] returns [`PipelineError::Interrupted`] before its next step (a step can take
/// seconds on a CPU). The request is process-wide and stays until [`clear_stop`].
///
/// ```no_run
/// // In a Ctrl-C handler (the doc-tests share one process, so this one does not run).
/// sd_pipeline::request_stop();
/// assert!(sd_pipeline::stop_requested());
/// ```
pub fn request_stop() {
    STOP_REQUESTED.store(true, Ordering::SeqCst);
}

/// Whether [`request_stop`] was called since the last [`clear_stop`].
pub fn stop_requested() -> bool {
    STOP_REQUESTED.load(Ordering::SeqCst)
}

/// Withdraws a stop request, before a new run.
pub fn clear_stop() {
    STOP_REQUESTED.store(false, Ordering::SeqCst);
}

/// What to generate.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateOptions {
    /// One image per prompt.
    pub prompts: Vec<String>,
    /// Negative prompt (the unconditional branch of guidance).
    pub negative_prompt: String,
    /// Sampler name (any `sd-sched` name: `ddim`, `euler_a`, `dpmpp_2m_karras`, ...).
    pub sampler: String,
    /// Sampling steps.
    pub steps: usize,
    /// Guidance scale. Above 1, classifier-free guidance with the negative prompt; at 1 or
    /// less the prompt's branch alone runs (half the UNet work), as diffusers' and
    /// sd-scripts' pipelines decide (`guidance_scale > 1`), so values below 1 sample as 1.
    pub cfg_scale: f32,
    /// Seed of the initial noise and of stochastic samplers.
    pub seed: u64,
    /// Image width in pixels.
    pub width: usize,
    /// Image height in pixels.
    pub height: usize,
    /// CLIP skip.
    pub clip_skip: usize,
    /// kohya's `max_token_length` of the LoRA: 75, or 150 / 225 to lay prompts out in 2 or
    /// 3 rows of 75 tokens as training did; longer prompts get more rows ([`prompt_rows`]).
    pub max_token_length: usize,
}

impl GenerateOptions {
    /// Options for `prompts` with `trainer generate`'s defaults: no negative prompt,
    /// `dpmpp_2m` in 25 steps, guidance 7.5, seed 0, the model's own image size
    /// ([`Components::default_size`]), CLIP skip 1, one row of 75 tokens (longer prompts
    /// still get the rows they need). Change fields with struct update syntax.
    ///
    /// ```
    /// use burn::backend::Flex;
    /// use sd_pipeline::{load_components, GenerateOptions};
    ///
    /// let device = Default::default();
    /// let model = load_components::<Flex>("tiny", 0, &device)?;
    /// let opts = GenerateOptions { seed: 7, ..GenerateOptions::new(&model, ["a red house"]) };
    /// assert_eq!((opts.width, opts.height, opts.steps), (64, 64, 25));
    /// # Ok::<(), sd_pipeline::PipelineError>(())
    /// ```
    pub fn new<B: Backend>(model: &Components<B>, prompts: impl IntoIterator<Item = impl Into<String>>) -> Self {
        let size = model.default_size();
        Self {
            prompts: prompts.into_iter().map(Into::into).collect(),
            negative_prompt: String::new(),
            sampler: "dpmpp_2m".into(),
            steps: 25,
            cfg_scale: 7.5,
            seed: 0,
            width: size,
            height: size,
            clip_skip: 1,
            max_token_length: 75,
        }
    }

    /// Checks what the options can be checked for without a model: at least one prompt, a
    /// finite guidance scale, steps in `1..=`[`MAX_SAMPLE_STEPS`](crate::MAX_SAMPLE_STEPS),
    /// CLIP skip at least 1 and `max_token_length` a multiple of 75 up to
    /// [`MAX_TOKEN_ROWS`](crate::MAX_TOKEN_ROWS) rows. The sampler name, the image size and
    /// the CLIP skip's upper end (the text encoder's layers) are checked against the model
    /// where they are used. Sampling calls this first.
    ///
    /// ```
    /// let mut opts = sd_pipeline::GenerateOptions {
    ///     prompts: vec!["a house".into()],
    ///     negative_prompt: String::new(),
    ///     sampler: "euler_a".into(),
    ///     steps: 20,
    ///     cfg_scale: f32::NAN,
    ///     seed: 0,
    ///     width: 512,
    ///     height: 512,
    ///     clip_skip: 1,
    ///     max_token_length: 75,
    /// };
    /// assert!(opts.check().unwrap_err().to_string().starts_with("cfg_scale: "));
    /// opts.cfg_scale = 7.0;
    /// assert!(opts.check().is_ok());
    /// ```
    pub fn check(&self) -> Result<(), PipelineError> {
        let bad = |origin: &str, reason: String| Err(PipelineError::Invalid { origin: origin.into(), reason });
        let most_tokens = 75 * crate::MAX_TOKEN_ROWS;
        if self.prompts.is_empty() {
            return bad("prompts", "at least one prompt is needed (one image is made per prompt)".into());
        }
        if !self.cfg_scale.is_finite() {
            return bad("cfg_scale", format!("must be a finite number (7.5 is usual; 1 or less turns guidance off), got {}", self.cfg_scale));
        }
        if !(1..=crate::MAX_SAMPLE_STEPS).contains(&self.steps) {
            return bad("steps", format!("must be 1 to {}, got {}", crate::MAX_SAMPLE_STEPS, self.steps));
        }
        if self.clip_skip == 0 {
            return bad("clip_skip", "must be at least 1 (1 reads the text encoder's last layer, 2 the penultimate)".into());
        }
        if !crate::text::is_max_token_length(self.max_token_length) {
            return bad("max_token_length", format!("must be 75, 150 or 225 (a multiple of 75 up to {most_tokens}), got {}", self.max_token_length));
        }
        Ok(())
    }
}

/// Text-to-image in one call: the seeded initial noise ([`initial_latents`]), the sampler
/// loop ([`denoise`]) and the VAE ([`decode`](crate::decode)); one image per prompt, in
/// order.
///
/// ```
/// use burn::backend::Flex;
/// use sd_pipeline::{generate, load_components, GenerateOptions};
///
/// let device = Default::default();
/// let model = load_components::<Flex>("tiny", 0, &device)?;
/// let opts = GenerateOptions { steps: 3, ..GenerateOptions::new(&model, ["a red house", "a blue boat"]) };
/// let images = generate(&model, &opts, &device)?;
/// assert_eq!(images.len(), 2);
/// assert_eq!(images, generate(&model, &opts, &device)?); // seeded: the same images again
/// # Ok::<(), sd_pipeline::PipelineError>(())
/// ```
///
/// Latents that end up NaN or infinite (a LoRA or guidance scale far too strong, a broken
/// model) are [`PipelineError::NonFinite`], not black images.
pub fn generate<B: Backend>(c: &Components<B>, opts: &GenerateOptions, device: &B::Device) -> Result<Vec<image::RgbImage>, PipelineError> {
    let latents = denoise(c, opts, initial_latents(c, opts, device)?, device)?;
    crate::images::decode(c, finite(latents)?)
}

/// `latents`, or [`PipelineError::NonFinite`] where any value is NaN or infinite (one
/// reduction read back).
pub fn finite<B: Backend>(latents: Tensor<B, 4>) -> Result<Tensor<B, 4>, PipelineError> {
    use burn::tensor::ElementConversion;
    match latents.clone().is_finite().all().into_scalar().elem::<bool>() {
        true => Ok(latents),
        false => Err(PipelineError::NonFinite),
    }
}

/// Runs the sampler from `latents` (already scaled by the sampler's initial sigma).
pub fn denoise<B: Backend>(
    c: &Components<B>,
    opts: &GenerateOptions,
    latents: Tensor<B, 4>,
    device: &B::Device,
) -> Result<Tensor<B, 4>, PipelineError> {
    denoise_from(c, opts, latents, 0, device)
}

/// [`denoise`] from step `first_step` of the sampler's timesteps on (img2img: `latents`
/// noised to that step's level, see [`img2img_latents`](crate::img2img_latents)); 0 runs every step.
pub fn denoise_from<B: Backend>(
    c: &Components<B>,
    opts: &GenerateOptions,
    latents: Tensor<B, 4>,
    first_step: usize,
    device: &B::Device,
) -> Result<Tensor<B, 4>, PipelineError> {
    denoise_masked(c, opts, latents, first_step, None, device)
}

/// What inpainting keeps of the image: its latents, the noise they are noised with and
/// the mask (1 where the image is repainted), per prompt ([`inpaint_latents`](crate::inpaint_latents)).
#[derive(Debug, Clone)]
pub struct Inpaint<B: Backend> {
    /// The image's scaled VAE latents, `[N, C, h, w]`.
    pub image: Tensor<B, 4>,
    /// The standard-normal noise of the run's first latents, `[N, C, h, w]`.
    pub noise: Tensor<B, 4>,
    /// The latent-size mask, `[N, 1, h, w]`: 1 repaints, 0 keeps the image.
    pub mask: Tensor<B, 4>,
}

/// [`denoise_from`], with `inpaint` blending the image back in after every step as
/// diffusers' `StableDiffusionInpaintPipeline` does for a text-to-image UNet: where the
/// mask is 0 the latents become the image's, noised (with the same noise) to the next
/// step's level, and after the last step the image's own latents.
pub fn denoise_masked<B: Backend>(
    c: &Components<B>,
    opts: &GenerateOptions,
    mut latents: Tensor<B, 4>,
    first_step: usize,
    inpaint: Option<&Inpaint<B>>,
    device: &B::Device,
) -> Result<Tensor<B, 4>, PipelineError> {
    opts.check()?;
    let n = opts.prompts.len();
    check_latents(c, opts, &latents, inpaint)?;
    // diffusers and sd-scripts guide only above 1 (`do_classifier_free_guidance`): at 1 or
    // less the negative prompt is not encoded and the UNet runs the prompts alone.
    let guide = opts.cfg_scale > 1.0;
    let negative = guide.then_some(opts.negative_prompt.as_str());
    let all = opts.prompts.iter().map(String::as_str).chain(negative);
    let rows = prompt_rows(&c.tokenizer, all, opts.max_token_length)?;
    let cond = condition_prompts(c, &opts.prompts, opts.clip_skip, rows, device)?;
    let text = match guide {
        true => {
            let uncond = condition_prompts(c, &vec![opts.negative_prompt.clone(); n], opts.clip_skip, rows, device)?;
            TextConditioning::cat(vec![uncond, cond])
        }
        false => cond,
    };
    let branches = if guide { 2 } else { 1 };
    let [_, _, h, w] = latents.dims();
    let f = c.vae.downsample_factor();
    // SDXL: the image's size as original and target size, no crop (diffusers' default).
    let added = text.added((h * f, w * f));
    let context = text.context;
    let mut sampler = opts.sampler.parse::<SamplerSpec>()?.build::<B>(&c.scheduler)?;
    sampler.set_timesteps(opts.steps)?;
    if first_step > 0 {
        sampler.set_begin_index(first_step)?;
    }
    // Stochastic samplers draw from a stream seeded apart from the initial noise.
    let mut noise = SeededNoise::new(opts.seed.wrapping_add(1));
    let timesteps = sampler.timesteps().to_vec();
    // Inpainting's `1 − mask`, once for the run.
    let inpaint = inpaint.map(|keep| (keep, keep.mask.clone().neg() + 1.0));
    for (i, t) in timesteps.iter().enumerate().skip(first_step) {
        if stop_requested() {
            return Err(PipelineError::Interrupted);
        }
        let input = sampler.scale_model_input(Tensor::cat(vec![latents.clone(); branches], 0), i)?;
        let t = Tensor::<B, 1>::from_floats(vec![*t; branches * n].as_slice(), device);
        let out = c.unet.forward_added(input, t, context.clone(), added.clone())?;
        let guided = match guide {
            true => {
                let mut halves = out.split(n, 0).into_iter();
                let (u, cnd) = match (halves.next(), halves.next()) {
                    (Some(u), Some(c)) => (u, c),
                    _ => unreachable!("the batch holds both guidance branches"),
                };
                u.clone() + (cnd - u) * opts.cfg_scale
            }
            false => out,
        };
        latents = sampler.step(guided, i, latents, &mut noise)?;
        if let Some((keep, kept)) = &inpaint {
            let image = match i + 1 < timesteps.len() {
                true => sampler.add_noise(keep.image.clone(), keep.noise.clone(), i + 1)?,
                false => keep.image.clone(),
            };
            latents = image * kept.clone() + latents * keep.mask.clone();
        }
    }
    Ok(latents)
}

/// Latents (and what inpainting keeps) that fit the prompts of `opts` and the model: one
/// per prompt, the VAE's latent channels, inpainting's tensors of the latents' shape.
fn check_latents<B: Backend>(c: &Components<B>, opts: &GenerateOptions, latents: &Tensor<B, 4>, inpaint: Option<&Inpaint<B>>) -> Result<(), PipelineError> {
    let [n, ch, h, w] = latents.dims();
    let expected = (opts.prompts.len(), c.vae.latent_channels());
    if (n, ch) != expected {
        return Err(PipelineError::Invalid {
            origin: "latents".into(),
            reason: format!("shape {:?}: expected {} (one per prompt) x {} channels (the VAE's latents)", latents.dims(), expected.0, expected.1),
        });
    }
    let Some(keep) = inpaint else { return Ok(()) };
    for (name, t, shape) in [("image", &keep.image, [n, ch, h, w]), ("noise", &keep.noise, [n, ch, h, w]), ("mask", &keep.mask, [n, 1, h, w])] {
        if t.dims() != shape {
            return Err(PipelineError::Invalid {
                origin: format!("inpainting {name}"),
                reason: format!("shape {:?} does not fit latents of shape {:?}: expected {shape:?} (make it with inpaint_latents for these options)", t.dims(), latents.dims()),
            });
        }
    }
    Ok(())
}

/// The shape of the initial latents for `opts`, checking the image size.
pub fn latent_shape<B: Backend>(c: &Components<B>, opts: &GenerateOptions) -> Result<[usize; 4], PipelineError> {
    opts.check()?;
    let f = c.vae.downsample_factor();
    let m = f * c.unet.size_multiple();
    let max = sd_data::MAX_SIDE as usize;
    if opts.width == 0 || opts.height == 0 || !opts.width.is_multiple_of(m) || !opts.height.is_multiple_of(m) || opts.width.max(opts.height) > max {
        return Err(PipelineError::Invalid {
            origin: "size".into(),
            reason: format!("width and height must be positive multiples of {m} for this model, at most {max}, got {}x{}", opts.width, opts.height),
        });
    }
    Ok([opts.prompts.len(), c.vae.latent_channels(), opts.height / f, opts.width / f])
}

/// Standard-normal `noise` of [`latent_shape`] scaled by the sampler's initial sigma, as
/// diffusers' pipelines prepare given latents.
pub fn latents_from_noise<B: Backend>(c: &Components<B>, opts: &GenerateOptions, noise: Tensor<B, 4>) -> Result<Tensor<B, 4>, PipelineError> {
    let shape = latent_shape(c, opts)?;
    if noise.dims() != shape {
        return Err(PipelineError::Invalid {
            origin: "initial latents".into(),
            reason: format!("shape {:?} does not match {} prompt(s) at {}x{}: expected {shape:?}", noise.dims(), opts.prompts.len(), opts.width, opts.height),
        });
    }
    let mut sampler = opts.sampler.parse::<SamplerSpec>()?.build::<B>(&c.scheduler)?;
    sampler.set_timesteps(opts.steps)?;
    Ok(noise * sampler.init_noise_sigma())
}

/// The seeded initial noise for `opts`, times the sampler's initial sigma.
pub fn initial_latents<B: Backend>(c: &Components<B>, opts: &GenerateOptions, device: &B::Device) -> Result<Tensor<B, 4>, PipelineError> {
    let noise = SeededNoise::new(opts.seed).sample(latent_shape(c, opts)?, device)?;
    latents_from_noise(c, opts, noise)
}
