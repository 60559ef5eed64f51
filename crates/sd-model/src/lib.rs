//! # sd-model
//!
//! The Stable Diffusion graph on [burn](https://burn.dev), generic over backends, for
//! SD1.x, SD2.x and SDXL: the CLIP tokenizer ([`tokenizer`]) and text encoders
//! ([`ClipTextModel`], with SDXL's pooled projection), the UNet
//! ([`UNet2DConditionModel`], with SDXL's added conditioning), the VAE
//! ([`AutoencoderKl`]), their configs with presets (`sd15()`, `sd21()`, `sdxl()`, `tiny()`), and
//! loading of real checkpoints ([`load`]) in the diffusers folder layout and as single
//! `.safetensors` files.
//!
//! [`convert`] converts a checkpoint between the single-file layout and a diffusers folder.
//! [`extract`] pairs two models' adapter sites for extracting a LoRA from their difference;
//! [`merge_models`] merges single-file checkpoints tensor by tensor; [`block_weights`] gives
//! a LoRA a strength per UNet block.
//!
//! [`checkpoint`] trains the UNet with gradient checkpointing block by block, as diffusers'
//! `gradient_checkpointing` does.
//!
//! Module paths mirror diffusers / transformers
//! (`text_model.encoder.layers.0.self_attn.q_proj`, `encoder.down_blocks.0.resnets.0.conv1`),
//! and every linear and conv layer is a `lora_core` adapter site, so LoRA files attach by
//! module path without rebuilding the model.
//!
//! ## Depending on this crate
//!
//! Its API takes and returns [burn](https://burn.dev) 0.21 types (`Tensor<B, D>`,
//! `Module<B>`, backends). Use the same burn, re-exported as [`sd_model::burn`](crate::burn),
//! or depend on `burn = "=0.21.0"` yourself: a second burn version's types would not fit.
#![deny(missing_docs)]

/// The burn this crate is built on (0.21), for its API's types without a burn dependency of
/// one's own.
pub use burn;

pub mod activation;
pub mod attention;
pub mod block_weights;
pub mod blocks;
pub mod checkpoint;
pub mod autodiff_ext;
pub use autodiff_ext::{custom_backward, set_custom_backward};
mod clip;
pub mod config;
pub mod convert;
mod embeddings;
mod error;
pub mod extract;
pub mod inspect;
pub mod keymap;
pub mod norm;
pub mod prompt;
pub mod load;
pub mod lora;
pub mod merge_models;
mod pickle_scan;
mod resnet;
pub mod save;
pub mod targets;
pub mod textual_inversion;
pub mod tokenizer;
pub mod torch_file;
mod transformer;
mod unet;
mod unet_blocks;
mod vae;

/// lora-core's kernel switches and call counters are process-global: the vulkan tests that
/// flip them take turns.
#[cfg(all(test, feature = "vulkan-test"))]
pub(crate) static KERNEL_SWITCHES: std::sync::Mutex<()> = std::sync::Mutex::new(());
#[cfg(all(test, feature = "vulkan-test"))]
mod bucket_tests;

pub use clip::{ClipAttention, ClipEmbeddings, ClipOutput, ClipEncoder, ClipEncoderLayer, ClipMlp, ClipTextModel, ClipTextTransformer};
pub use config::{ClipTextConfig, HiddenAct, PerBlock, UnetConfig, VaeConfig};
pub use embeddings::{timestep_embedding, TimestepEmbedding};
pub use transformer::{Attention, BasicTransformerBlock, FeedForward, Geglu, Projection, Transformer2DModel};
pub use unet::{AddedConditions, SdxlSizes, TimeProj, UNet2DConditionModel};
pub use unet_blocks::{UNetMidBlock2DCrossAttn, UnetDownBlock, UnetUpBlock};
pub use error::{KeyMismatch, Result, SdModelError};
pub use resnet::{Downsample2D, ResnetBlock2D, SiluTemb, Upsample2D};
pub use tokenizer::ClipTokenizer;

pub use vae::{AutoencoderKl, DiagonalGaussian, DownEncoderBlock2D, UpDecoderBlock2D, VaeAttention, VaeDecoder, VaeEncoder, VaeMidBlock};
