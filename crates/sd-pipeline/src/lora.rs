//! LoRA files attached to a model for sampling, merged into its weights, and the model in
//! half precision.

use burn::tensor::backend::Backend;
use lora_core::sites::count_adapters;

use crate::{Components, PipelineError};

/// Attaches LoRA files (`FILE[:STRENGTH]`, [`LoraFile`](crate::LoraFile)) to the UNet and
/// every text encoder of `c` ([`sd_model::lora::apply_lora_files_to`]); [`merge_adapters`]
/// then folds them in. Several files are combined (pass them in one call); a model that
/// already has adapters attached is an error, since attaching would replace them:
/// [`merge_adapters`] first to stack another file on top.
pub fn attach_lora_files<B: Backend>(c: &mut Components<B>, files: &[sd_model::lora::LoraFile], device: &B::Device) -> Result<sd_model::lora::AppliedLoras, PipelineError> {
    let attached = attached_adapters(c);
    if attached > 0 {
        return Err(PipelineError::Invalid {
            origin: "LoRA files".into(),
            reason: format!(
                "the model already has {attached} adapter(s) attached, which these would replace: pass every LoRA file in one call (they are combined), or merge_adapters first"
            ),
        });
    }
    let mut encoders: Vec<&mut sd_model::ClipTextModel<B>> = std::iter::once(&mut c.text_encoder).chain(c.text_encoder_2.as_mut()).collect();
    Ok(sd_model::lora::apply_lora_files_to(&mut c.unet, &mut encoders, files, false, device)?)
}

/// How many layers of the UNet and the text encoders have an adapter attached.
fn attached_adapters<B: Backend>(c: &mut Components<B>) -> usize {
    count_adapters(&mut c.unet) + count_adapters(&mut c.text_encoder) + c.text_encoder_2.as_mut().map_or(0, |te| count_adapters(te))
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
/// use sd_pipeline::{load_components, merge_adapters};
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
/// use sd_pipeline::{load_components, to_precision};
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
