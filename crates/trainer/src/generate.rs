//! Text-to-image sampling with classifier-free guidance, and image grids.

use std::path::Path;

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use image::RgbImage;
use sd_model::tokenizer::ClipTokenizer;
use sd_sched::{NoiseSource, SamplerSpec, SeededNoise};

use crate::models::Components;
use crate::TrainError;

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
    /// Guidance scale (1 = no guidance).
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

/// Attaches LoRA files (`FILE[:STRENGTH]`) to the UNet and every text encoder of `c`
/// ([`sd_model::lora::apply_lora_files_to`]); [`merge_adapters`] then folds them in.
pub fn attach_lora_files<B: Backend>(c: &mut Components<B>, files: &[sd_model::lora::LoraFile], device: &B::Device) -> Result<sd_model::lora::AppliedLoras, TrainError> {
    let mut encoders: Vec<&mut sd_model::ClipTextModel<B>> = std::iter::once(&mut c.text_encoder).chain(c.text_encoder_2.as_mut()).collect();
    Ok(sd_model::lora::apply_lora_files_to(&mut c.unet, &mut encoders, files, false, device)?)
}

/// Folds every LoRA adapter attached to the UNet and the text encoder into their weights and
/// drops the adapters; returns how many were merged. Sampling then runs the base model's
/// layers only: an unmerged adapter costs every adapted layer two more matmuls, a scale and
/// an addition per step (for an SD1.5 attention LoRA about a fifth of a CFG step's kernel
/// launches). The sums are taken in f32 and rounded once to the weights' dtype. Models are
/// values: merging an inference copy (`model.valid()`) leaves the trained model's adapters
/// as they are.
///
/// ```
/// use burn::backend::Flex;
/// use trainer::generate::merge_adapters;
/// use trainer::models::load_components;
///
/// let device = Default::default();
/// let mut c = load_components::<Flex>("tiny", 0, &device).unwrap();
/// assert_eq!(merge_adapters(&mut c), 0); // no adapters attached
/// ```
pub fn merge_adapters<B: Backend>(c: &mut Components<B>) -> usize {
    let second = c.text_encoder_2.as_mut().map_or(0, |te| lora_core::sites::bake_adapters(te));
    lora_core::sites::bake_adapters(&mut c.unet) + lora_core::sites::bake_adapters(&mut c.text_encoder) + second
}

/// The UNet and the text encoder with their parameters (adapters included) in `dtype`; the
/// VAE stays in f32 (it decodes once per image, and diffusers upcasts SD's VAEs too, whose
/// activations can overflow f16: `force_upcast`). Merge
/// adapters first ([`merge_adapters`]): the merged weights are then rounded once, from f32.
/// Sampling keeps its latents in f32 either way (the UNet converts them on the way in and
/// out). On a GPU, `bf16` or `f16` runs the tensor cores and, with
/// `lora_core::kernels::set_flash_attention`, the flash-attention kernels.
///
/// ```
/// use burn::backend::Flex;
/// use burn::tensor::{DType, FloatDType};
/// use trainer::generate::to_precision;
/// use trainer::models::load_components;
///
/// let device = Default::default();
/// let c = to_precision(load_components::<Flex>("tiny", 0, &device).unwrap(), FloatDType::BF16);
/// assert_eq!(c.unet.conv_in.base.weight.val().dtype(), DType::BF16);
/// assert_eq!(c.vae.decoder.conv_in.base.weight.val().dtype(), DType::F32);
/// ```
pub fn to_precision<B: Backend>(mut c: Components<B>, dtype: burn::tensor::FloatDType) -> Components<B> {
    c.unet = lora_core::precision::cast_all(c.unet, dtype);
    c.text_encoder = lora_core::precision::cast_all(c.text_encoder, dtype);
    c.text_encoder_2 = c.text_encoder_2.map(|te| lora_core::precision::cast_all(te, dtype));
    c
}

/// The text encoders a prompt goes through, with their tokenizers: one for SD1.x / SD2.x,
/// SDXL's two.
pub struct TextEncoders<'a, B: Backend> {
    /// The (first) encoder and its tokenizer.
    pub first: (&'a sd_model::ClipTextModel<B>, &'a ClipTokenizer),
    /// SDXL's second encoder (with the pooled projection) and its tokenizer.
    pub second: Option<(&'a sd_model::ClipTextModel<B>, &'a ClipTokenizer)>,
}

// By hand: derived impls would ask `B: Copy`.
impl<B: Backend> Clone for TextEncoders<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend> Copy for TextEncoders<'_, B> {}

impl<'a, B: Backend> TextEncoders<'a, B> {
    /// The encoders of a model.
    pub fn of(c: &'a Components<B>) -> Self {
        Self {
            first: (&c.text_encoder, &c.tokenizer),
            second: c.text_encoder_2.as_ref().zip(c.tokenizer_2.as_ref()),
        }
    }
}

/// What the UNet is conditioned on: the text states `[N, tokens, D]` and, for SDXL, the
/// second encoder's pooled embedding `[N, P]`.
#[derive(Debug, Clone)]
pub struct TextConditioning<B: Backend> {
    /// Text states (SDXL: both encoders' penultimate-layer states side by side).
    pub context: Tensor<B, 3>,
    /// SDXL's pooled embedding (`text_embeds`).
    pub pooled: Option<Tensor<B, 2>>,
}

impl<B: Backend> TextConditioning<B> {
    /// Conditionings of several batches stacked along the batch.
    pub fn cat(parts: Vec<Self>) -> Self {
        let pooled = parts.iter().map(|p| p.pooled.clone()).collect::<Option<Vec<_>>>().map(|p| Tensor::cat(p, 0));
        Self { context: Tensor::cat(parts.into_iter().map(|p| p.context).collect(), 0), pooled }
    }

    /// SDXL's added conditioning for images of `(height, width)` pixels (original and
    /// target size, no crop, as diffusers' pipelines sample), when there is a pooled
    /// embedding.
    pub fn added(&self, (height, width): (usize, usize)) -> Option<sd_model::AddedConditions<B>> {
        let pooled = self.pooled.clone()?;
        let n = pooled.dims()[0];
        let size = (height as u32, width as u32);
        let time_ids = sd_model::AddedConditions::sdxl_time_ids(&vec![(size, (0, 0), size); n], &pooled.device());
        Some(sd_model::AddedConditions { text_embeds: pooled, time_ids })
    }
}

/// Encodes rows of ids (`ids` for the first tokenizer, `ids_2` for SDXL's second) to the
/// UNet's conditioning. SDXL conditions on both encoders' penultimate layers without the
/// final norm (whatever `clip_skip` says, as kohya's sd-scripts do) and on the second
/// encoder's pooled output of each prompt's first row.
fn condition<B: Backend>(
    encoders: TextEncoders<'_, B>,
    ids: Vec<Vec<u32>>,
    ids_2: Option<Vec<Vec<u32>>>,
    clip_skip: usize,
    rows: usize,
    device: &B::Device,
) -> Result<TextConditioning<B>, TrainError> {
    let (te, tok) = encoders.first;
    let ids = ids_tensor(tok, te.vocab_size(), ids, rows, device)?;
    match (encoders.second, ids_2) {
        (Some((te2, tok2)), Some(ids_2)) => {
            let one = te.forward_chunked_pooled(ids, tok.max_length(), 2, false)?;
            let ids_2 = ids_tensor(tok2, te2.vocab_size(), ids_2, rows, device)?;
            let two = te2.forward_chunked_pooled(ids_2, tok2.max_length(), 2, false)?;
            Ok(TextConditioning { context: Tensor::cat(vec![one.hidden, two.hidden], 2), pooled: Some(two.pooled) })
        }
        _ => Ok(TextConditioning { context: te.forward_chunked(ids, tok.max_length(), clip_skip)?, pooled: None }),
    }
}

/// The ids of `prompts` for SDXL's second tokenizer (which pads differently), when there is one.
fn second_ids(encoders: TextEncoders<'_, impl Backend>, encode: impl Fn(&ClipTokenizer) -> Result<Vec<Vec<u32>>, TrainError>) -> Result<Option<Vec<Vec<u32>>>, TrainError> {
    encoders.second.map(|(_, tok)| encode(tok)).transpose()
}

/// Rows of `tokenizer.max_length()` ids that hold `max_token_length` prompt tokens (75 per
/// row for CLIP; at least one row).
pub fn token_rows(tokenizer: &ClipTokenizer, max_token_length: usize) -> usize {
    (max_token_length / tokenizer.max_length().saturating_sub(2).max(1)).max(1)
}

/// Token ids `[N, rows × 77]` of `prompts` (rows: [`token_rows`]), checked against a
/// text-encoder vocabulary of `vocab`.
pub fn prompt_ids<B: Backend>(tokenizer: &ClipTokenizer, vocab: usize, prompts: &[String], max_token_length: usize, device: &B::Device) -> Result<Tensor<B, 2, Int>, TrainError> {
    let rows = token_rows(tokenizer, max_token_length);
    let ids = prompts.iter().map(|p| tokenizer.encode_chunked(p, rows)).collect::<Result<Vec<_>, _>>()?;
    ids_tensor(tokenizer, vocab, ids, rows, device)
}

/// Rows of ids as a `[N, rows × 77]` tensor, checked against the vocabulary.
fn ids_tensor<B: Backend>(tokenizer: &ClipTokenizer, vocab: usize, ids: Vec<Vec<u32>>, rows: usize, device: &B::Device) -> Result<Tensor<B, 2, Int>, TrainError> {
    if let Some(bad) = ids.iter().flatten().find(|i| **i as usize >= vocab) {
        return Err(TrainError::Config {
            origin: "tokenizer".into(),
            reason: format!("token id {bad} is outside the text encoder's vocabulary of {vocab} (a tokenizer with added tokens needs a text encoder trained with them)"),
        });
    }
    let n = ids.len();
    let len = ids.first().map_or(tokenizer.max_length() * rows, Vec::len);
    let flat: Vec<i32> = ids.into_iter().flatten().map(|i| i as i32).collect();
    Ok(Tensor::from_data(TensorData::new(flat, [n, len]), device))
}

/// Rows of 75 tokens to sample `prompts` (with their negative prompt) with: as many as the
/// longest needs after A1111 emphasis and `BREAK`s (as A1111 adds rows), at least the
/// rows of `max_token_length` (the layout a LoRA trained with it saw), at most
/// [`crate::config::MAX_TOKEN_ROWS`] (the rest is cut). All prompts of a batch must share it.
pub fn prompt_rows<'a>(tokenizer: &ClipTokenizer, prompts: impl IntoIterator<Item = &'a str>, max_token_length: usize) -> Result<usize, TrainError> {
    let least = token_rows(tokenizer, max_token_length);
    let mut rows = least;
    for p in prompts {
        rows = rows.max(tokenizer.weighted_words(p)?.rows);
    }
    Ok(rows.min(crate::config::MAX_TOKEN_ROWS.max(least)))
}

/// Encodes prompts for sampling to text embeddings `[N, 75 × rows + 2, D]` (`[N, 77, D]`
/// for one row; rows joined as kohya's sd-scripts join them in training:
/// [`sd_model::ClipTextModel::forward_chunked`]; `rows` from [`prompt_rows`]), reading
/// A1111's emphasis syntax: `(word)`, `[word]`, `(word:1.3)`, `BREAK`
/// ([`sd_model::prompt`]). Captions for training go through [`encode_with`], which takes
/// them literally, or with `data.weighted_captions` [`encode_weighted_with`]. For SDXL this
/// is the states only: [`condition_prompts`] gives the pooled embedding too.
pub fn encode_prompts<B: Backend>(c: &Components<B>, prompts: &[String], clip_skip: usize, rows: usize, device: &B::Device) -> Result<Tensor<B, 3>, TrainError> {
    Ok(condition_prompts(c, prompts, clip_skip, rows, device)?.context)
}

/// [`encode_prompts`] with SDXL's pooled embedding: the whole conditioning of `prompts`.
///
/// SDXL: each encoder's states are weighted and get their own mean back, as AUTOMATIC1111
/// weighs them; the pooled embedding is not weighted. An empty negative prompt is encoded
/// as the text `""` (as kohya's sd-scripts and ComfyUI sample), not as zeros (diffusers'
/// `force_zeros_for_empty_prompt`).
pub fn condition_prompts<B: Backend>(c: &Components<B>, prompts: &[String], clip_skip: usize, rows: usize, device: &B::Device) -> Result<TextConditioning<B>, TrainError> {
    let (cond, weights) = weighted_condition(TextEncoders::of(c), prompts, clip_skip, rows, device)?;
    let context = match cond.pooled {
        Some(_) => {
            let [n, tokens, d] = cond.context.dims();
            let first = c.text_encoder.text_model.final_layer_norm.gamma.dims()[0];
            let one = cond.context.clone().slice([0..n, 0..tokens, 0..first]);
            let two = cond.context.slice([0..n, 0..tokens, first..d]);
            Tensor::cat(vec![sd_model::prompt::apply_weights(one, &weights)?, sd_model::prompt::apply_weights(two, &weights)?], 2)
        }
        None => sd_model::prompt::apply_weights(cond.context, &weights)?,
    };
    Ok(TextConditioning { context, pooled: cond.pooled })
}

/// The conditioning of prompts read with emphasis, in `rows` rows, and the tokens' weights
/// (both tokenizers split a prompt alike: the weights hold for both encoders' states).
fn weighted_condition<B: Backend>(
    encoders: TextEncoders<'_, B>,
    prompts: &[String],
    clip_skip: usize,
    rows: usize,
    device: &B::Device,
) -> Result<(TextConditioning<B>, Vec<f32>), TrainError> {
    let (mut ids, mut weights) = (Vec::with_capacity(prompts.len()), Vec::new());
    for p in prompts {
        let (i, w) = encoders.first.1.encode_weighted(p, rows)?;
        ids.push(i);
        weights.extend(w);
    }
    let ids_2 = second_ids(encoders, |tok| Ok(prompts.iter().map(|p| tok.encode_weighted(p, rows).map(|(i, _)| i)).collect::<Result<_, _>>()?))?;
    Ok((condition(encoders, ids, ids_2, clip_skip, rows, device)?, weights))
}

/// Encodes captions literally (no emphasis syntax) with a given text encoder (one being
/// trained, say); otherwise as [`encode_prompts`]. One encoder: SDXL's conditioning
/// is [`condition_with`]'s.
pub fn encode_with<B: Backend>(
    text_encoder: &sd_model::ClipTextModel<B>,
    tokenizer: &ClipTokenizer,
    prompts: &[String],
    clip_skip: usize,
    max_token_length: usize,
    device: &B::Device,
) -> Result<Tensor<B, 3>, TrainError> {
    let encoders = TextEncoders { first: (text_encoder, tokenizer), second: None };
    Ok(condition_with(encoders, prompts, clip_skip, max_token_length, device)?.context)
}

/// [`encode_with`] through one or two encoders ([`TextEncoders`]): the whole conditioning
/// of literal captions.
pub fn condition_with<B: Backend>(
    encoders: TextEncoders<'_, B>,
    prompts: &[String],
    clip_skip: usize,
    max_token_length: usize,
    device: &B::Device,
) -> Result<TextConditioning<B>, TrainError> {
    let rows = token_rows(encoders.first.1, max_token_length);
    let chunked = |tok: &ClipTokenizer| -> Result<Vec<Vec<u32>>, TrainError> { Ok(prompts.iter().map(|p| tok.encode_chunked(p, rows)).collect::<Result<_, _>>()?) };
    let ids = chunked(encoders.first.1)?;
    let ids_2 = second_ids(encoders, chunked)?;
    condition(encoders, ids, ids_2, clip_skip, rows, device)
}

/// Encodes captions with A1111's emphasis syntax (kohya's `weighted_captions`), with a
/// given text encoder, in the rows of `max_token_length` (longer captions are cut, as in
/// [`encode_with`]): `(word:1.2)` scales the word's hidden states, and nothing else, as
/// kohya's training does ([`sd_model::prompt::scale_states`]; sample prompts also keep the
/// mean). `BREAK` is a plain word here, as in kohya's training (it would start a new row).
/// One encoder: SDXL's conditioning is [`condition_weighted_with`]'s.
pub fn encode_weighted_with<B: Backend>(
    text_encoder: &sd_model::ClipTextModel<B>,
    tokenizer: &ClipTokenizer,
    prompts: &[String],
    clip_skip: usize,
    max_token_length: usize,
    device: &B::Device,
) -> Result<Tensor<B, 3>, TrainError> {
    let encoders = TextEncoders { first: (text_encoder, tokenizer), second: None };
    Ok(condition_weighted_with(encoders, prompts, clip_skip, max_token_length, device)?.context)
}

/// [`encode_weighted_with`] through one or two encoders ([`TextEncoders`]); the pooled
/// embedding is not weighted (kohya's SDXL training leaves it as it is).
pub fn condition_weighted_with<B: Backend>(
    encoders: TextEncoders<'_, B>,
    prompts: &[String],
    clip_skip: usize,
    max_token_length: usize,
    device: &B::Device,
) -> Result<TextConditioning<B>, TrainError> {
    // CLIP lower-cases its input: `break` tokenizes as `BREAK` does, without the keyword.
    let captions: Vec<String> = prompts.iter().map(|p| p.replace("BREAK", "break")).collect();
    let rows = token_rows(encoders.first.1, max_token_length);
    let (cond, weights) = weighted_condition(encoders, &captions, clip_skip, rows, device)?;
    Ok(TextConditioning { context: sd_model::prompt::scale_states(cond.context, &weights)?, pooled: cond.pooled })
}

/// How many of `prompts` have more tokens than `max_token_length` (their tail is not seen
/// by the text encoder), and the largest token count.
pub fn overlong_prompts<'a>(tokenizer: &ClipTokenizer, prompts: impl IntoIterator<Item = &'a str>, max_token_length: usize) -> Result<(usize, usize), TrainError> {
    let limit = token_rows(tokenizer, max_token_length) * tokenizer.max_length().saturating_sub(2);
    let (mut over, mut longest) = (0, 0);
    for p in prompts {
        let n = tokenizer.encode_unpadded(p)?.len();
        over += usize::from(n > limit);
        longest = longest.max(n);
    }
    Ok((over, longest))
}

/// Runs the sampler from `latents` (already scaled by the sampler's initial sigma).
pub fn denoise<B: Backend>(
    c: &Components<B>,
    opts: &GenerateOptions,
    latents: Tensor<B, 4>,
    device: &B::Device,
) -> Result<Tensor<B, 4>, TrainError> {
    denoise_from(c, opts, latents, 0, device)
}

/// [`denoise`] from step `first_step` of the sampler's timesteps on (img2img: `latents`
/// noised to that step's level, see [`img2img_latents`]); 0 runs every step.
pub fn denoise_from<B: Backend>(
    c: &Components<B>,
    opts: &GenerateOptions,
    latents: Tensor<B, 4>,
    first_step: usize,
    device: &B::Device,
) -> Result<Tensor<B, 4>, TrainError> {
    denoise_masked(c, opts, latents, first_step, None, device)
}

/// What inpainting keeps of the image: its latents, the noise they are noised with and
/// the mask (1 where the image is repainted), per prompt ([`inpaint_latents`]).
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
) -> Result<Tensor<B, 4>, TrainError> {
    let n = opts.prompts.len();
    let all = opts.prompts.iter().chain([&opts.negative_prompt]).map(String::as_str);
    let rows = prompt_rows(&c.tokenizer, all, opts.max_token_length)?;
    let cond = condition_prompts(c, &opts.prompts, opts.clip_skip, rows, device)?;
    let uncond = condition_prompts(c, &vec![opts.negative_prompt.clone(); n], opts.clip_skip, rows, device)?;
    let both = TextConditioning::cat(vec![uncond, cond]);
    let [_, _, h, w] = latents.dims();
    let f = c.vae.downsample_factor();
    // SDXL: the image's size as original and target size, no crop (diffusers' default).
    let added = both.added((h * f, w * f));
    let context = both.context;
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
        if crate::train::stop_requested() {
            return Err(TrainError::Interrupted);
        }
        let input = sampler.scale_model_input(Tensor::cat(vec![latents.clone(), latents.clone()], 0), i)?;
        let t = Tensor::<B, 1>::from_floats(vec![*t; 2 * n].as_slice(), device);
        let out = c.unet.forward_added(input, t, context.clone(), added.clone())?;
        let mut halves = out.split(n, 0).into_iter();
        let (u, cnd) = match (halves.next(), halves.next()) {
            (Some(u), Some(c)) => (u, c),
            _ => unreachable!("the batch holds both guidance branches"),
        };
        let guided = u.clone() + (cnd - u) * opts.cfg_scale;
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

/// The shape of the initial latents for `opts`, checking the image size.
pub fn latent_shape<B: Backend>(c: &Components<B>, opts: &GenerateOptions) -> Result<[usize; 4], TrainError> {
    let f = c.vae.downsample_factor();
    let m = f * c.unet.size_multiple();
    let max = sd_data::MAX_SIDE as usize;
    if opts.width == 0 || opts.height == 0 || !opts.width.is_multiple_of(m) || !opts.height.is_multiple_of(m) || opts.width.max(opts.height) > max {
        return Err(TrainError::Config {
            origin: "size".into(),
            reason: format!("width and height must be positive multiples of {m} for this model, at most {max}, got {}x{}", opts.width, opts.height),
        });
    }
    Ok([opts.prompts.len(), c.vae.latent_channels(), opts.height / f, opts.width / f])
}

/// Standard-normal `noise` of [`latent_shape`] scaled by the sampler's initial sigma, as
/// diffusers' pipelines prepare given latents.
pub fn latents_from_noise<B: Backend>(c: &Components<B>, opts: &GenerateOptions, noise: Tensor<B, 4>) -> Result<Tensor<B, 4>, TrainError> {
    let shape = latent_shape(c, opts)?;
    if noise.dims() != shape {
        return Err(TrainError::Config {
            origin: "initial latents".into(),
            reason: format!("shape {:?} does not match {} prompt(s) at {}x{}: expected {shape:?}", noise.dims(), opts.prompts.len(), opts.width, opts.height),
        });
    }
    let mut sampler = opts.sampler.parse::<SamplerSpec>()?.build::<B>(&c.scheduler)?;
    sampler.set_timesteps(opts.steps)?;
    Ok(noise * sampler.init_noise_sigma())
}

/// The seeded initial noise for `opts`, times the sampler's initial sigma.
pub fn initial_latents<B: Backend>(c: &Components<B>, opts: &GenerateOptions, device: &B::Device) -> Result<Tensor<B, 4>, TrainError> {
    let noise = SeededNoise::new(opts.seed).sample(latent_shape(c, opts)?, device)?;
    latents_from_noise(c, opts, noise)
}

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
/// `image` at `opts`' size ([`image_pixels`]), encoded by the VAE (a sample of its
/// posterior, seeded by `opts.seed + 2`) and scaled, once for all prompts; then, per prompt,
/// noised (seeded by `opts.seed`, as text-to-image's initial noise) to the level of the
/// step where `strength` of the `opts.steps` steps remain ([`sd_sched::img2img_start`]).
/// Strength 1 starts from (almost) pure noise; lower strengths keep more of the image.
/// Returns the latents for [`denoise_from`] and that step.
pub fn img2img_latents<B: Backend>(c: &Components<B>, opts: &GenerateOptions, image: &RgbImage, strength: f64, device: &B::Device) -> Result<(Tensor<B, 4>, usize), TrainError> {
    let start = ImageStart::new(c, opts, image, strength, device)?;
    Ok((start.sampler.add_noise(start.clean, start.noise, start.first)?, start.first))
}

/// Inpainting's starting point, first step and what [`denoise_masked`] keeps (diffusers'
/// `StableDiffusionInpaintPipeline` with a text-to-image UNet): as [`img2img_latents`],
/// except that strength 1 starts from pure noise (times the sampler's initial sigma), and
/// with `mask` ([`mask_latents`]: white repaints, black keeps the image).
pub fn inpaint_latents<B: Backend>(c: &Components<B>, opts: &GenerateOptions, image: &RgbImage, mask: &RgbImage, strength: f64, device: &B::Device) -> Result<(Tensor<B, 4>, usize, Inpaint<B>), TrainError> {
    let start = ImageStart::new(c, opts, image, strength, device)?;
    let latents = match strength == 1.0 {
        true => start.noise.clone() * start.sampler.init_noise_sigma(),
        false => start.sampler.add_noise(start.clean.clone(), start.noise.clone(), start.first)?,
    };
    let [n, _, h, w] = start.clean.dims();
    let mask = mask_latents::<B>(mask, (opts.width, opts.height), (w, h), device).repeat_dim(0, n);
    Ok((latents, start.first, Inpaint { image: start.clean, noise: start.noise, mask }))
}

/// An inpainting mask at the latents' size `[1, 1, h, w]`, as diffusers' inpainting
/// pipeline prepares it: resized to the image's `size` (Lanczos), grey (ITU-R 601 luma, as
/// PIL's `convert("L")`), binarised at one half (1 where at least half white: repaint),
/// then sampled down to `latent` `(w, h)` by the nearest pixel (`interpolate`'s default).
pub fn mask_latents<B: Backend>(mask: &RgbImage, size: (usize, usize), latent: (usize, usize), device: &B::Device) -> Tensor<B, 4> {
    let (width, height) = size;
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
    Tensor::from_data(TensorData::new(data, [1, 1, lh, lw]), device)
}

/// What img2img and inpainting start from: the sampler set up, the first step, the image's
/// latents once per prompt and the seeded noise.
struct ImageStart<B: Backend> {
    sampler: Box<dyn sd_sched::Sampler<B>>,
    first: usize,
    clean: Tensor<B, 4>,
    noise: Tensor<B, 4>,
}

impl<B: Backend> ImageStart<B> {
    fn new(c: &Components<B>, opts: &GenerateOptions, image: &RgbImage, strength: f64, device: &B::Device) -> Result<Self, TrainError> {
        let shape = latent_shape(c, opts)?;
        let mut sampler = opts.sampler.parse::<SamplerSpec>()?.build::<B>(&c.scheduler)?;
        sampler.set_timesteps(opts.steps)?;
        let first = sd_sched::img2img_start(opts.steps, strength, sampler.order()).map_err(|e| TrainError::Config { origin: "--strength".into(), reason: e.to_string() })?;
        let posterior = c.vae.encode(image_pixels(image, opts.width, opts.height, device))?;
        let eps = SeededNoise::new(opts.seed.wrapping_add(2)).sample(posterior.mean.dims(), device)?;
        let clean = c.vae.scale_latents(posterior.sample(eps)?).repeat_dim(0, shape[0]);
        let noise = SeededNoise::new(opts.seed).sample(shape, device)?;
        Ok(Self { sampler, first, clean, noise })
    }
}

/// The embedding files of folder `dir` (A1111's `embeddings/`, subfolders included:
/// `.safetensors`, `.pt` and `.bin` files) whose names (file stems) `texts` use as a word,
/// by path: only those need loading, as A1111 applies only those a prompt names. An
/// unreadable folder is an error naming it.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// for name in ["EasyNegative.safetensors", "style/mystyle.pt", "unused.safetensors", "notes.txt"] {
///     let path = dir.path().join(name);
///     std::fs::create_dir_all(path.parent().unwrap()).unwrap();
///     std::fs::write(path, b"").unwrap();
/// }
/// let used = trainer::generate::used_embedding_files(dir.path(), &["a house, mystyle", "(easynegative:1.2)"]).unwrap();
/// let names: Vec<_> = used.iter().map(|p| p.file_name().unwrap().to_str().unwrap()).collect();
/// assert_eq!(names, ["EasyNegative.safetensors", "mystyle.pt"]);
/// ```
pub fn used_embedding_files(dir: &std::path::Path, texts: &[&str]) -> Result<Vec<std::path::PathBuf>, TrainError> {
    let mut found = Vec::new();
    let mut folders = vec![dir.to_path_buf()];
    while let Some(folder) = folders.pop() {
        let entries = std::fs::read_dir(&folder).map_err(crate::train::io_err(&folder))?;
        for entry in entries {
            let path = entry.map_err(crate::train::io_err(&folder))?.path();
            if path.is_dir() {
                folders.push(path);
                continue;
            }
            let known = path.extension().and_then(|e| e.to_str()).is_some_and(|e| ["safetensors", "pt", "bin"].contains(&e.to_ascii_lowercase().as_str()));
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
            if known && !stem.is_empty() && crate::embedding::captions_with_word(stem, texts.iter().copied()) > 0 {
                found.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Loads textual-inversion embeddings ([`sd_model::textual_inversion`]) into the model:
/// each file's vectors become added tokens of the tokenizer(s) and rows of the text
/// encoder(s) (SDXL files hold a set for each), then the embeddings bundled in `lora_files`
/// (A1111's `bundle_emb.NAME.…`, loaded with the LoRA as A1111 does; one whose name is
/// already taken, by a file or an earlier LoRA, is left out). Returns each embedding's name
/// with its tokens, for [`sd_model::textual_inversion::expand_prompt`]. Vectors that do not
/// fit the model (another family's width, one set for SDXL's two encoders) are an error
/// naming their file; so are two embedding files of one name.
pub fn load_embeddings<B: Backend>(
    c: &mut Components<B>,
    paths: &[std::path::PathBuf],
    lora_files: &[std::path::PathBuf],
    device: &B::Device,
) -> Result<Vec<(String, Vec<String>)>, TrainError> {
    use sd_model::textual_inversion::{read_bundled_embeddings, read_embedding};
    let taken = |loaded: &[(String, Vec<String>)], name: &str| loaded.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
    let mut loaded: Vec<(String, Vec<String>)> = Vec::with_capacity(paths.len());
    for path in paths {
        let embedding = read_embedding(path)?;
        if taken(&loaded, &embedding.name) {
            return Err(TrainError::Config { origin: path.display().to_string(), reason: format!("a second embedding named `{}`", embedding.name) });
        }
        loaded.push(add_embedding(c, embedding, path, device)?);
    }
    for path in lora_files {
        for embedding in read_bundled_embeddings(path)? {
            if !taken(&loaded, &embedding.name) {
                loaded.push(add_embedding(c, embedding, path, device)?);
            }
        }
    }
    Ok(loaded)
}

/// Adds one embedding's tokens and vectors to the model; `origin` names it in errors.
fn add_embedding<B: Backend>(c: &mut Components<B>, embedding: sd_model::textual_inversion::Embedding, origin: &std::path::Path, device: &B::Device) -> Result<(String, Vec<String>), TrainError> {
    use sd_model::textual_inversion::token_names;
    let bad = |reason: String| TrainError::Config { origin: format!("{} (embedding `{}`)", origin.display(), embedding.name), reason };
    let encoders = if c.is_sdxl() { 2 } else { 1 };
    if embedding.vectors.len() != encoders {
        return Err(bad(format!("{} set(s) of vectors, this model has {encoders} text encoder(s) (SDXL embeddings hold clip_l and clip_g)", embedding.vectors.len())));
    }
    let tokens = token_names(&embedding.name, embedding.len());
    let mut targets: Vec<(&mut ClipTokenizer, &mut sd_model::ClipTextModel<B>)> = vec![(&mut c.tokenizer, &mut c.text_encoder)];
    if let (Some(t), Some(e)) = (c.tokenizer_2.as_mut(), c.text_encoder_2.as_mut()) {
        targets.push((t, e));
    }
    for ((tokenizer, encoder), vectors) in targets.into_iter().zip(&embedding.vectors) {
        if tokenizer.vocab_size() != encoder.vocab_size() {
            return Err(bad(format!("the tokenizer has {} ids but the text encoder {} rows", tokenizer.vocab_size(), encoder.vocab_size())));
        }
        let width = encoder.hidden_size();
        if vectors.shape[1] != width {
            return Err(bad(format!("vectors of width {}, this model's text encoder takes {width}: an embedding for another model family", vectors.shape[1])));
        }
        let (extended, _) = tokenizer.clone().with_added_tokens(&tokens)?;
        encoder.extend_vocabulary(vectors.to_tensor::<B, 2>(device)?)?;
        *tokenizer = extended;
    }
    Ok((embedding.name, tokens))
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

impl HiresFix {
    /// The first pass's options: `opts` at the scaled size (rounded to the nearest pixel,
    /// then down to the model's multiple) and the first pass's steps. Checks the scale and
    /// that the strength leaves at least one of `opts.steps` to run.
    pub fn first_pass<B: Backend>(&self, c: &Components<B>, opts: &GenerateOptions) -> Result<GenerateOptions, TrainError> {
        if !(self.scale > 0.0 && self.scale < 1.0) {
            return Err(TrainError::Config { origin: "--hires-scale".into(), reason: format!("must be in (0, 1), got {}", self.scale) });
        }
        let sampler = opts.sampler.parse::<SamplerSpec>()?.build::<B>(&c.scheduler)?;
        sd_sched::img2img_start(opts.steps, self.strength, sampler.order()).map_err(|e| TrainError::Config { origin: "--hires-strength".into(), reason: e.to_string() })?;
        let m = c.vae.downsample_factor() * c.unet.size_multiple();
        let side = |s: usize| (s as f64 * self.scale + 0.5) as usize / m * m;
        let (width, height) = (side(opts.width), side(opts.height));
        if width == 0 || height == 0 {
            return Err(TrainError::Config {
                origin: "--hires-scale".into(),
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
pub fn hires_fix<B: Backend>(c: &Components<B>, opts: &GenerateOptions, hires: &HiresFix, device: &B::Device) -> Result<Tensor<B, 4>, TrainError> {
    let first = hires.first_pass(c, opts)?;
    let shape = latent_shape(c, opts)?;
    let small = denoise(c, &first, initial_latents(c, &first, device)?, device)?;
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
    let first_step = sd_sched::img2img_start(opts.steps, hires.strength, sampler.order()).map_err(|e| TrainError::Config { origin: "--hires-strength".into(), reason: e.to_string() })?;
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

/// Decodes scaled latents to RGB images.
pub fn decode<B: Backend>(c: &Components<B>, latents: Tensor<B, 4>) -> Result<Vec<RgbImage>, TrainError> {
    let pixels = c.vae.decode(c.vae.unscale_latents(latents))?;
    let [n, _, h, w] = pixels.dims();
    let data = pixels
        .into_data()
        .convert::<f32>()
        .to_vec::<f32>()
        .map_err(|e| TrainError::Config { origin: "decode".into(), reason: format!("{e:?}") })?;
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

/// A sample prompt with kohya's per-prompt options (sd-scripts' sample prompt files):
/// `PROMPT --n NEGATIVE --w WIDTH --h HEIGHT --d SEED --l CFG_SCALE --s STEPS --ss SAMPLER`,
/// each option optional and in any order. Returns `defaults` with the prompt as its only
/// prompt and the options applied; an unknown option or a bad value is an error naming
/// the prompt.
///
/// ```
/// use trainer::generate::{parse_sample_prompt, GenerateOptions};
/// let defaults = GenerateOptions {
///     prompts: vec![],
///     negative_prompt: String::new(),
///     sampler: "ddim".into(),
///     steps: 20,
///     cfg_scale: 5.0,
///     seed: 1,
///     width: 512,
///     height: 512,
///     clip_skip: 1,
///     max_token_length: 75,
/// };
/// let o = parse_sample_prompt("a lighthouse at dusk, mystyle --n blurry, lowres --w 768 --d 42 --l 7.5", &defaults)?;
/// assert_eq!(o.prompts, ["a lighthouse at dusk, mystyle"]);
/// assert_eq!((o.negative_prompt.as_str(), o.width, o.height, o.seed, o.cfg_scale, o.steps), ("blurry, lowres", 768, 512, 42, 7.5, 20));
/// let err = parse_sample_prompt("a lighthouse --w 0", &defaults).unwrap_err();
/// assert!(err.to_string().contains("--w 0"), "{err}");
/// # Ok::<(), trainer::TrainError>(())
/// ```
pub fn parse_sample_prompt(text: &str, defaults: &GenerateOptions) -> Result<GenerateOptions, TrainError> {
    Ok(parse_prompt_options(text, defaults)?.0)
}

/// [`parse_sample_prompt`], and whether the prompt sets its own seed (`--d`).
fn parse_prompt_options(text: &str, defaults: &GenerateOptions) -> Result<(GenerateOptions, bool), TrainError> {
    let mut seeded = false;
    let mut parts = text.split(" --");
    let mut o = GenerateOptions { prompts: vec![parts.next().unwrap_or_default().trim().to_string()], ..defaults.clone() };
    for part in parts {
        let (key, value) = part.split_once(char::is_whitespace).unwrap_or((part, ""));
        let value = value.trim();
        let bad = |what: &str| TrainError::Config {
            origin: format!("sample prompt `{text}`"),
            reason: format!("--{key} {value}: {what}"),
        };
        let number = |what: &str| value.parse::<f64>().ok().filter(|v| v.is_finite() && *v >= 0.0).ok_or_else(|| bad(what));
        let side = |v: f64| match v {
            v if v < 1.0 => Err(bad("expected a size of at least 1 px (it is rounded to the model's size step)")),
            v if v > f64::from(sd_data::MAX_SIDE) => Err(bad(&format!("at most {} px", sd_data::MAX_SIDE))),
            v => Ok(v as usize),
        };
        match key.to_ascii_lowercase().as_str() {
            "n" => o.negative_prompt = value.to_string(),
            "w" => o.width = side(number("expected a width in pixels")?)?,
            "h" => o.height = side(number("expected a height in pixels")?)?,
            "d" => {
                o.seed = value.parse().map_err(|_| bad("expected a seed (a whole number)"))?;
                seeded = true;
            }
            "l" => o.cfg_scale = number("expected a guidance scale")? as f32,
            // As sd-scripts: clamped to the model's training timesteps.
            "s" => o.steps = (number("expected a number of steps")? as usize).clamp(1, crate::config::MAX_SAMPLE_STEPS),
            "ss" => {
                value.parse::<SamplerSpec>().map_err(|e| bad(&e.to_string()))?;
                o.sampler = value.to_string();
            }
            _ => return Err(bad("unknown option (known: --n, --w, --h, --d, --l, --s, --ss)")),
        }
    }
    Ok((o, seeded))
}

/// Generates one image per sample prompt ([`parse_sample_prompt`]), in prompt order:
/// prompts whose options agree are sampled together in one batch (so plain prompts make
/// one batch, as [`denoise`] runs them), except that a prompt with its own seed (`--d`) is
/// sampled alone, so that it gets that seed's noise wherever it stands (as in kohya).
/// Sizes are rounded down to the model's size step (64 px for SD; kohya rounds to 8).
pub fn sample_images<B: Backend>(c: &Components<B>, prompts: &[String], defaults: &GenerateOptions, device: &B::Device) -> Result<Vec<RgbImage>, TrainError> {
    let step = c.vae.downsample_factor() * c.unet.size_multiple();
    let fit = |v: usize| (v - v % step).max(step);
    let mut parsed = Vec::with_capacity(prompts.len());
    for p in prompts {
        let (mut o, seeded) = parse_prompt_options(p, defaults)?;
        (o.width, o.height) = (fit(o.width), fit(o.height));
        parsed.push((o, seeded));
    }
    // Groups of prompts with the same options, in order of first appearance; a prompt
    // with its own seed is a group of its own (a batch would shift its sampler's draws).
    let mut groups: Vec<(GenerateOptions, Vec<usize>, bool)> = Vec::new();
    for (i, (o, seeded)) in parsed.into_iter().enumerate() {
        let same = |g: &GenerateOptions| GenerateOptions { prompts: vec![], ..g.clone() } == GenerateOptions { prompts: vec![], ..o.clone() };
        match groups.iter_mut().find(|(g, _, alone)| !seeded && !alone && same(g)) {
            Some((g, members, _)) => {
                g.prompts.extend(o.prompts);
                members.push(i);
            }
            None => groups.push((o, vec![i], seeded)),
        }
    }
    let mut images: Vec<Option<RgbImage>> = vec![None; prompts.len()];
    for (opts, members, _) in groups {
        let z = initial_latents(c, &opts, device)?;
        for (i, img) in members.into_iter().zip(decode(c, denoise(c, &opts, z, device)?)?) {
            images[i] = Some(img);
        }
    }
    Ok(images.into_iter().flatten().collect())
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

/// Saves a PNG, naming the file on error.
pub fn save_png(img: &RgbImage, path: &Path) -> Result<(), TrainError> {
    img.save(path).map_err(|e| TrainError::Image {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}
