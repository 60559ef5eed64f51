//! The denoising UNet, as diffusers' `UNet2DConditionModel` (SD1.x, SD2.x and SDXL).

use lora_core::precision::cast_to;
use burn::module::Module;
use burn::nn::GroupNorm;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use lora_core::{Component, LoraConv2d, LoraSiteMut, LoraSites};

use crate::config::UnetConfig;
use crate::embeddings::{timestep_embedding, TimestepEmbedding};
use crate::resnet::{conv, group_norm, ResnetBlock2D, SiluTemb};
use crate::transformer::{Projection, Transformer2DModel};
use crate::unet_blocks::{BlockSettings, UNetMidBlock2DCrossAttn, UnetDownBlock, UnetUpBlock};
use crate::{Result, SdModelError};

/// Settings of the sinusoidal timestep projection (no parameters).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TimeProj {
    /// Embedding width (`block_out_channels[0]`).
    pub dim: usize,
    /// `cos, sin` order.
    pub flip_sin_to_cos: bool,
    /// Frequency shift.
    pub freq_shift: f64,
}

/// SDXL's added conditioning (diffusers' `added_cond_kwargs` for `text_time`).
#[derive(Debug, Clone)]
pub struct AddedConditions<B: Backend> {
    /// The second text encoder's projected pooled output `[B, pooled]` (`text_embeds`).
    pub text_embeds: Tensor<B, 2>,
    /// The time ids `[B, n]`: for SDXL base `[original height, original width, crop top,
    /// crop left, target height, target width]` in pixels (see [`AddedConditions::sdxl_time_ids`]).
    /// Keep them f32: they are embedded in f32, and bf16 cannot hold sizes such as 833.
    pub time_ids: Tensor<B, 2>,
}

/// One image's SDXL size conditioning, in pixels: original size `(height, width)`, crop
/// top-left corner `(top, left)` and target size `(height, width)`.
pub type SdxlSizes = ((u32, u32), (u32, u32), (u32, u32));

impl<B: Backend> AddedConditions<B> {
    /// SDXL base's time ids `[B, 6]`, one row per sample: original size `(h, w)`, crop
    /// top-left `(top, left)` and target size `(h, w)`, in pixels.
    ///
    /// ```
    /// use burn::backend::Flex;
    /// use sd_model::AddedConditions;
    ///
    /// let ids = AddedConditions::<Flex>::sdxl_time_ids(&[((1024, 768), (0, 32), (1024, 704))], &Default::default());
    /// assert_eq!(ids.to_data().to_vec::<f32>().unwrap(), [1024.0, 768.0, 0.0, 32.0, 1024.0, 704.0]);
    /// ```
    pub fn sdxl_time_ids(rows: &[SdxlSizes], device: &B::Device) -> Tensor<B, 2> {
        let values: Vec<f32> = rows
            .iter()
            .flat_map(|&((oh, ow), (top, left), (th, tw))| [oh, ow, top, left, th, tw].map(|v| v as f32))
            .collect();
        Tensor::<B, 1>::from_floats(values.as_slice(), device).reshape([rows.len(), 6])
    }
}

/// The UNet (`UNet2DConditionModel`).
///
/// ```
/// use burn::backend::Flex;
/// use burn::tensor::Tensor;
/// use sd_model::{UNet2DConditionModel, UnetConfig};
///
/// let device = Default::default();
/// let unet = UNet2DConditionModel::<Flex>::new(&UnetConfig::tiny(), &device).unwrap();
/// let latents = Tensor::<Flex, 4>::zeros([1, 4, 8, 8], &device);
/// let t = Tensor::<Flex, 1>::from_floats([500.0], &device);
/// let text = Tensor::<Flex, 3>::zeros([1, 77, 32], &device);
/// assert_eq!(unet.forward(latents, t, text).unwrap().dims(), [1, 4, 8, 8]);
/// ```
#[derive(Module, Debug)]
pub struct UNet2DConditionModel<B: Backend> {
    /// Input conv.
    pub conv_in: LoraConv2d<B>,
    /// Time MLP.
    pub time_embedding: TimestepEmbedding<B>,
    /// Down levels.
    pub down_blocks: Vec<UnetDownBlock<B>>,
    /// Middle block.
    pub mid_block: UNetMidBlock2DCrossAttn<B>,
    /// Up levels.
    pub up_blocks: Vec<UnetUpBlock<B>>,
    /// Output norm.
    pub conv_norm_out: GroupNorm<B>,
    /// Output conv.
    pub conv_out: LoraConv2d<B>,
    /// Sinusoidal timestep projection settings.
    #[module(skip)]
    pub time_proj: TimeProj,
    /// SDXL's MLP of the added conditioning (`text_time`), added to the time embedding.
    pub add_embedding: Option<TimestepEmbedding<B>>,
    /// Sinusoidal projection of each time id (`text_time`).
    #[module(skip)]
    pub add_time_proj: Option<TimeProj>,
    /// Width of the text embeddings.
    pub cross_attention_dim: usize,
}

impl<B: Backend> UNet2DConditionModel<B> {
    /// A randomly initialised UNet (load weights with [`crate::load`]).
    pub fn new(config: &UnetConfig, device: &B::Device) -> Result<Self> {
        config.validate("unet config")?;
        let ch = &config.block_out_channels;
        let levels = ch.len();
        let temb = ch[0] * 4;
        let s = BlockSettings {
            temb,
            groups: config.norm_num_groups,
            eps: config.norm_eps,
            context_dim: config.cross_attention_dim,
            linear_projection: config.use_linear_projection,
        };
        let attention = |cross: bool, i: usize| cross.then(|| (config.heads(i), config.transformer_layers_per_block.get(i)));

        let mut down_blocks = Vec::with_capacity(levels);
        let mut c_prev = ch[0];
        for (i, kind) in config.down_block_types.iter().enumerate() {
            let cross = kind == "CrossAttnDownBlock2D";
            down_blocks.push(UnetDownBlock::new(&s, c_prev, ch[i], config.layers_per_block, attention(cross, i), i + 1 < levels, device));
            c_prev = ch[i];
        }
        let top = ch[levels - 1];
        let mid_block = UNetMidBlock2DCrossAttn::new(&s, top, config.heads(levels - 1), config.transformer_layers_per_block.get(levels - 1), device);

        let mut up_blocks = Vec::with_capacity(levels);
        let mut c_out = top;
        for (i, kind) in config.up_block_types.iter().enumerate() {
            let rev = levels - 1 - i;
            let c_prev = c_out;
            c_out = ch[rev];
            let c_in = ch[rev.saturating_sub(1)];
            let cross = kind == "CrossAttnUpBlock2D";
            up_blocks.push(UnetUpBlock::new(&s, c_in, c_prev, c_out, config.layers_per_block + 1, attention(cross, rev), i + 1 < levels, device));
        }
        let mut model = Self {
            conv_in: conv(config.in_channels, ch[0], 3, device),
            time_embedding: TimestepEmbedding::new(ch[0], temb, device),
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: group_norm(config.norm_num_groups, ch[0], config.norm_eps, device),
            conv_out: conv(ch[0], config.out_channels, 3, device),
            time_proj: TimeProj {
                dim: ch[0],
                flip_sin_to_cos: config.flip_sin_to_cos,
                freq_shift: config.freq_shift,
            },
            cross_attention_dim: config.cross_attention_dim,
            add_embedding: None,
            add_time_proj: None,
        };
        if let (true, Some(dim), Some(input)) = (config.has_text_time(), config.addition_time_embed_dim, config.projection_class_embeddings_input_dim) {
            model.add_embedding = Some(TimestepEmbedding::new(input, temb, device));
            model.add_time_proj = Some(TimeProj {
                dim,
                flip_sin_to_cos: config.flip_sin_to_cos,
                freq_shift: config.freq_shift,
            });
        }
        if config.upcast_attention {
            model.for_each_attention(&mut |a| a.upcast = true);
        }
        Ok(model)
    }

    /// Calls `f` on every attention layer (self- and cross-attention of every transformer).
    pub fn for_each_attention(&mut self, f: &mut dyn FnMut(&mut crate::Attention<B>)) {
        let transformers = self
            .down_blocks
            .iter_mut()
            .flat_map(|b| b.attentions.iter_mut())
            .chain(self.mid_block.attentions.iter_mut())
            .chain(self.up_blocks.iter_mut().flat_map(|b| b.attentions.iter_mut()));
        for t in transformers {
            for block in &mut t.transformer_blocks {
                f(&mut block.attn1);
                f(&mut block.attn2);
            }
        }
    }

    /// Spatial size multiple the latents must have (`2^(levels-1)`).
    pub fn size_multiple(&self) -> usize {
        1 << self.down_blocks.iter().filter(|b| b.downsamplers.is_some()).count()
    }

    /// Predicts the model output (noise, velocity or sample, as trained) for `latents`
    /// `[B, C, h, w]` at `timesteps` `[B]` given text embeddings `[B, M, cross_attention_dim]`.
    /// An SDXL UNet also needs [`forward_added`](Self::forward_added)'s added conditioning.
    pub fn forward(&self, latents: Tensor<B, 4>, timesteps: Tensor<B, 1>, context: Tensor<B, 3>) -> Result<Tensor<B, 4>> {
        self.forward_added(latents, timesteps, context, None)
    }

    /// [`forward`](Self::forward) with SDXL's added conditioning, which a UNet with an
    /// `add_embedding` requires and any other refuses.
    ///
    /// ```
    /// use burn::backend::Flex;
    /// use burn::tensor::Tensor;
    /// use sd_model::{AddedConditions, UNet2DConditionModel, UnetConfig};
    ///
    /// let device = Default::default();
    /// let unet = UNet2DConditionModel::<Flex>::new(&UnetConfig::tiny_sdxl(), &device).unwrap();
    /// let latents = Tensor::<Flex, 4>::zeros([1, 4, 8, 8], &device);
    /// let t = Tensor::<Flex, 1>::from_floats([500.0], &device);
    /// let text = Tensor::<Flex, 3>::zeros([1, 77, 64], &device);
    /// let added = AddedConditions {
    ///     text_embeds: Tensor::zeros([1, 32], &device),
    ///     time_ids: AddedConditions::sdxl_time_ids(&[((64, 64), (0, 0), (64, 64))], &device),
    /// };
    /// assert_eq!(unet.forward_added(latents.clone(), t.clone(), text.clone(), Some(added)).unwrap().dims(), [1, 4, 8, 8]);
    /// assert!(unet.forward(latents, t, text).is_err());
    /// ```
    pub fn forward_added(
        &self,
        latents: Tensor<B, 4>,
        timesteps: Tensor<B, 1>,
        context: Tensor<B, 3>,
        added: Option<AddedConditions<B>>,
    ) -> Result<Tensor<B, 4>> {
        self.check_inputs(&latents, &timesteps, &context)?;
        // Inputs and output keep the caller's dtype; the network runs in its weights' dtype
        // (a bf16/f16 base for mixed-precision training).
        let io_dtype = latents.dtype();
        let dtype = self.conv_in.base.weight.val().dtype();
        let temb = SiluTemb::new(self.time_embedding_input(timesteps, added)?);
        let context = cast_to(context, dtype);
        let mut x = self.conv_in.forward(cast_to(latents, dtype));
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            x = block.forward(x, &temb, &context, &mut skips);
        }
        x = self.mid_block.forward(x, &temb, &context);
        for block in &self.up_blocks {
            x = block.forward(x, &temb, &context, &mut skips);
        }
        Ok(cast_to(self.conv_out.forward(crate::norm::group_norm(&self.conv_norm_out, x, true)), io_dtype))
    }

    /// The embedding every ResNet block takes (before its SiLU) `[B, temb]`, in the
    /// weights' dtype: the time MLP of the sinusoidal timestep embedding, plus for SDXL the
    /// added MLP of `[text_embeds, sinusoidal embedding of each time id]`.
    pub fn time_embedding_input(&self, timesteps: Tensor<B, 1>, added: Option<AddedConditions<B>>) -> Result<Tensor<B, 2>> {
        let dtype = self.conv_in.base.weight.val().dtype();
        let [batch] = timesteps.dims();
        let t = timestep_embedding(timesteps, self.time_proj.dim, self.time_proj.flip_sin_to_cos, self.time_proj.freq_shift);
        let temb = self.time_embedding.forward(cast_to(t, dtype));
        match (&self.add_embedding, self.add_time_proj, added) {
            (None, _, None) => Ok(temb),
            (Some(mlp), Some(proj), Some(added)) => {
                self.check_added(batch, &added)?;
                let [_, n] = added.time_ids.dims();
                // Each time id gets its own sinusoidal embedding, computed in f32 as diffusers does.
                let ids = cast_to(added.time_ids, DType::F32).reshape([batch * n]);
                let ids = timestep_embedding(ids, proj.dim, proj.flip_sin_to_cos, proj.freq_shift).reshape([batch, n * proj.dim]);
                let input = Tensor::cat(vec![cast_to(added.text_embeds, dtype), cast_to(ids, dtype)], 1);
                Ok(temb + mlp.forward(input))
            }
            (Some(_), _, None) => Err(SdModelError::BadInput {
                what: "added conditions".into(),
                reason: "this UNet (addition_embed_type `text_time`, SDXL) needs text_embeds and time_ids".into(),
            }),
            (_, _, Some(_)) => Err(SdModelError::BadInput {
                what: "added conditions".into(),
                reason: "this UNet has no added conditioning (no addition_embed_type); pass none".into(),
            }),
        }
    }

    /// Whether the UNet takes SDXL's added conditioning.
    pub fn has_added_conditions(&self) -> bool {
        self.add_embedding.is_some()
    }

    fn check_added(&self, batch: usize, added: &AddedConditions<B>) -> Result<()> {
        let (Some(mlp), Some(proj)) = (&self.add_embedding, self.add_time_proj) else {
            return Ok(());
        };
        let input = mlp.linear_1.base.weight.dims()[0];
        let [tb, pooled] = added.text_embeds.dims();
        let [ib, n] = added.time_ids.dims();
        if tb != batch || ib != batch || pooled + n * proj.dim != input {
            return Err(SdModelError::BadInput {
                what: "added conditions".into(),
                reason: format!(
                    "text_embeds {:?} and time_ids {:?} must have {batch} rows, and pooled width + time ids × {} must be {input}",
                    added.text_embeds.dims(),
                    added.time_ids.dims(),
                    proj.dim
                ),
            });
        }
        Ok(())
    }

    pub(crate) fn check_inputs(&self, latents: &Tensor<B, 4>, timesteps: &Tensor<B, 1>, context: &Tensor<B, 3>) -> Result<()> {
        let [b, c, h, w] = latents.dims();
        let c_in = self.conv_in.base.weight.dims()[1];
        let m = self.size_multiple();
        let bad = |what: &str, reason: String| Err(SdModelError::BadInput { what: what.into(), reason });
        if c != c_in || h == 0 || w == 0 || h % m != 0 || w % m != 0 {
            return bad("latents", format!("shape {:?} needs {c_in} channels and sides that are positive multiples of {m}", latents.dims()));
        }
        if timesteps.dims() != [b] {
            return bad("timesteps", format!("shape {:?} must be [{b}]", timesteps.dims()));
        }
        let [cb, _, cd] = context.dims();
        if cb != b || cd != self.cross_attention_dim {
            return bad(
                "encoder_hidden_states",
                format!("shape {:?} must be [{b}, tokens, {}]", context.dims(), self.cross_attention_dim),
            );
        }
        Ok(())
    }
}

fn visit_resnet<B: Backend>(p: &str, r: &mut ResnetBlock2D<B>, f: &mut dyn FnMut(&str, LoraSiteMut<'_, B>)) {
    f(&format!("{p}.norm1"), LoraSiteMut::Norm(&mut r.norm1));
    f(&format!("{p}.conv1"), LoraSiteMut::Conv(&mut r.conv1));
    if let Some(l) = &mut r.time_emb_proj {
        f(&format!("{p}.time_emb_proj"), LoraSiteMut::Linear(l));
    }
    f(&format!("{p}.norm2"), LoraSiteMut::Norm(&mut r.norm2));
    f(&format!("{p}.conv2"), LoraSiteMut::Conv(&mut r.conv2));
    if let Some(c) = &mut r.conv_shortcut {
        f(&format!("{p}.conv_shortcut"), LoraSiteMut::Conv(c));
    }
}

fn visit_projection<B: Backend>(p: &str, proj: &mut Projection<B>, f: &mut dyn FnMut(&str, LoraSiteMut<'_, B>)) {
    match proj {
        Projection::Conv(c) => f(p, LoraSiteMut::Conv(c)),
        Projection::Linear(l) => f(p, LoraSiteMut::Linear(l)),
    }
}

fn visit_transformer<B: Backend>(p: &str, t: &mut Transformer2DModel<B>, f: &mut dyn FnMut(&str, LoraSiteMut<'_, B>)) {
    f(&format!("{p}.norm"), LoraSiteMut::Norm(&mut t.norm));
    visit_projection(&format!("{p}.proj_in"), &mut t.proj_in, f);
    for (k, block) in t.transformer_blocks.iter_mut().enumerate() {
        let b = format!("{p}.transformer_blocks.{k}");
        for (name, attn, norm_name, norm) in [("attn1", &mut block.attn1, "norm1", &mut block.norm1), ("attn2", &mut block.attn2, "norm2", &mut block.norm2)] {
            f(&format!("{b}.{norm_name}"), LoraSiteMut::Norm(norm));
            f(&format!("{b}.{name}.to_q"), LoraSiteMut::Linear(&mut attn.to_q));
            f(&format!("{b}.{name}.to_k"), LoraSiteMut::Linear(&mut attn.to_k));
            f(&format!("{b}.{name}.to_v"), LoraSiteMut::Linear(&mut attn.to_v));
            for (o, out) in attn.to_out.iter_mut().enumerate() {
                f(&format!("{b}.{name}.to_out.{o}"), LoraSiteMut::Linear(out));
            }
        }
        f(&format!("{b}.norm3"), LoraSiteMut::Norm(&mut block.norm3));
        f(&format!("{b}.ff.net.0.proj"), LoraSiteMut::Linear(&mut block.ff.net.0.proj));
        f(&format!("{b}.ff.net.2"), LoraSiteMut::Linear(&mut block.ff.net.2));
    }
    visit_projection(&format!("{p}.proj_out"), &mut t.proj_out, f);
}

impl<B: Backend> LoraSites<B> for UNet2DConditionModel<B> {
    fn component(&self) -> Component {
        Component::Unet
    }

    /// Every linear and conv layer of the UNet, by diffusers module path.
    fn visit_lora_sites(&mut self, f: &mut dyn FnMut(&str, LoraSiteMut<'_, B>)) {
        f("conv_in", LoraSiteMut::Conv(&mut self.conv_in));
        f("time_embedding.linear_1", LoraSiteMut::Linear(&mut self.time_embedding.linear_1));
        f("time_embedding.linear_2", LoraSiteMut::Linear(&mut self.time_embedding.linear_2));
        if let Some(add) = &mut self.add_embedding {
            f("add_embedding.linear_1", LoraSiteMut::Linear(&mut add.linear_1));
            f("add_embedding.linear_2", LoraSiteMut::Linear(&mut add.linear_2));
        }
        let level = |p: String, resnets: &mut Vec<ResnetBlock2D<B>>, attns: &mut Vec<Transformer2DModel<B>>, f: &mut dyn FnMut(&str, LoraSiteMut<'_, B>)| {
            for (j, r) in resnets.iter_mut().enumerate() {
                visit_resnet(&format!("{p}.resnets.{j}"), r, f);
            }
            for (j, a) in attns.iter_mut().enumerate() {
                visit_transformer(&format!("{p}.attentions.{j}"), a, f);
            }
        };
        for (i, block) in self.down_blocks.iter_mut().enumerate() {
            let p = format!("down_blocks.{i}");
            level(p.clone(), &mut block.resnets, &mut block.attentions, f);
            for (k, d) in block.downsamplers.iter_mut().flatten().enumerate() {
                f(&format!("{p}.downsamplers.{k}.conv"), LoraSiteMut::Conv(&mut d.conv));
            }
        }
        level("mid_block".into(), &mut self.mid_block.resnets, &mut self.mid_block.attentions, f);
        for (i, block) in self.up_blocks.iter_mut().enumerate() {
            let p = format!("up_blocks.{i}");
            level(p.clone(), &mut block.resnets, &mut block.attentions, f);
            for (k, u) in block.upsamplers.iter_mut().flatten().enumerate() {
                f(&format!("{p}.upsamplers.{k}.conv"), LoraSiteMut::Conv(&mut u.conv));
            }
        }
        f("conv_out", LoraSiteMut::Conv(&mut self.conv_out));
    }
}
