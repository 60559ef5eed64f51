//! # sd-pipeline
//!
//! Sampling from Stable Diffusion models (SD1.x, SD2.x, SDXL) on [burn](https://burn.dev),
//! as diffusers' pipelines and AUTOMATIC1111 do it, for any burn backend:
//!
//! - [`components`]: a model's tokenizers, text encoders, VAE, UNet and schedule, loaded
//!   from a diffusers folder or a single-file checkpoint ([`load_components`]), or the
//!   built-in tiny models (`tiny`, `tiny-sdxl`: random weights, no download).
//! - [`text`]: prompts to the UNet's conditioning, in rows of 75 CLIP tokens, with A1111's
//!   emphasis (`(word:1.3)`, `[word]`, `BREAK`); SDXL's two encoders and pooled embedding;
//!   captions read literally or with kohya's weighted captions, as training encodes them.
//! - [`sampling`]: text-to-image ([`generate`]): classifier-free guidance with any
//!   `sd-sched` sampler from seeded noise ([`GenerateOptions`]); a process-wide stop
//!   request ([`request_stop`]) ends it between steps.
//! - [`img2img`]: img2img, inpainting (diffusers' blend for text-to-image UNets) and the
//!   two-pass hires fix.
//! - [`lora`]: LoRA files (kohya / A1111 / ComfyUI, diffusers / PEFT, LyCORIS) attached
//!   and merged into the weights, and the model in half precision.
//! - [`embeddings`]: textual-inversion embeddings named by a prompt.
//! - [`sample_prompts`]: kohya's sample prompts (`--n`, `--w`, `--h`, `--d`, `--l`, `--s`,
//!   `--ss`) sampled in batches; [`images`]: latents to images, grids and PNG files.
//!
//! Bad inputs are typed errors ([`PipelineError`]) that name the input and what was
//! expected.
//!
//! ```
//! use burn::backend::Flex;
//! use sd_pipeline::{denoise, decode, generate, initial_latents, load_components, GenerateOptions};
//!
//! let device = Default::default();
//! let model = load_components::<Flex>("tiny", 0, &device)?;
//! let opts = GenerateOptions {
//!     prompts: vec!["a lighthouse at dusk, (oil painting:1.2)".into()],
//!     negative_prompt: "blurry".into(),
//!     sampler: "dpmpp_2m_karras".into(),
//!     steps: 4,
//!     cfg_scale: 7.0,
//!     seed: 42,
//!     width: model.default_size(),
//!     height: model.default_size(),
//!     clip_skip: 1,
//!     max_token_length: 75,
//! };
//! let images = generate(&model, &opts, &device)?;
//! assert_eq!(images[0].dimensions(), (64, 64));
//! // The same in steps, to start from latents of one's own or keep them:
//! let latents = denoise(&model, &opts, initial_latents(&model, &opts, &device)?, &device)?;
//! assert_eq!(decode(&model, latents)?, images);
//! # Ok::<(), sd_pipeline::PipelineError>(())
//! ```
//!
//! ## Depending on this crate
//!
//! Its API takes and returns [burn](https://burn.dev) 0.21 types (`Tensor<B, D>`,
//! `Module<B>`, backends) and [`image`] 0.25 images. Use the same crates,
//! re-exported as [`sd_pipeline::burn`](crate::burn) and [`sd_pipeline::image`](crate::image)
//! (and the workspace's own as [`lora_core`], [`sd_model`], [`sd_sched`]), or depend on
//! `burn = "=0.21.0"` and `image = "0.25"` yourself: another version's types would not fit.
//! A backend's device type is `burn::tensor::Device<B>`.
#![deny(missing_docs)]

/// The burn this crate is built on (0.21, with its CPU backend `Flex`), for its API's types
/// without a burn dependency of one's own.
pub use burn;
/// The `image` crate whose [`RgbImage`](image::RgbImage)s this crate takes and returns.
pub use image;
/// The crates this one is built on, at the versions its types come from.
pub use {lora_core, sd_model, sd_sched};

pub mod components;
pub mod sampling;
pub mod embeddings;
mod error;
pub mod images;
pub mod img2img;
pub mod lora;
pub mod sample_prompts;
pub mod text;

pub use components::{is_sdxl, load_components, load_separate_vae, load_tokenizer, Components, SDXL_BASE_VERSION, TINY_MODELS};
pub use sampling::{
    clear_stop, denoise, denoise_from, denoise_masked, finite, generate, initial_latents, latent_shape, latents_from_noise, request_stop, stop_requested,
    GenerateOptions, Inpaint,
};
pub use embeddings::{load_embeddings, texts_with_word, used_embedding_files};
pub use error::PipelineError;
pub use images::{decode, grid, save_png};
pub use img2img::{hires_fix, image_pixels, img2img_latents, init_image_size, inpaint_latents, mask_latents, upscale_latents, HiresFix};
pub use lora::{attach_lora_files, merge_adapters, to_precision};
pub use sd_model::lora::{AppliedLoras, LoraFile};
pub use sd_model::tokenizer::ClipTokenizer;
pub use sample_prompts::{parse_sample_prompt, sample_images, MAX_SAMPLE_STEPS};
pub use text::{
    condition_captions, condition_prompts, encode_captions, encode_prompts, overlong_prompts, CaptionSyntax,
    prompt_ids, prompt_rows, token_rows, TextConditioning, TextEncoders, MAX_TOKEN_ROWS,
};
