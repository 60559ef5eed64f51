//! Gradient checkpointing of the UNet block by block, as diffusers' `gradient_checkpointing`.
//!
//! [`UNet2DConditionModel::forward_backward_checkpointed`] runs the forward pass without an
//! autodiff graph and keeps only the input of every block (ResNet, transformer, down- and
//! upsampler, the input and output convolutions). The backward pass then walks the blocks
//! from the last to the first: it rebuilds one block's graph from the saved input,
//! backpropagates the gradient that reached the block's output and drops that graph before
//! the next block. Activation memory falls from the whole network's to the blocks' inputs
//! plus one block's intermediates, for one more forward pass.
//!
//! Why not burn's `BalancedCheckpointing` strategy: it recomputes only the operations marked
//! memory-bound and keeps, from the forward pass, the outputs of their compute-bound
//! parents, i.e. of every convolution and matmul; a UNet is made of those, so it keeps
//! nearly everything (measured: no saving at all on SD1.5). And burn 0.21 cannot run a
//! backward pass inside another one (the outer graph's lock is held while it runs), which
//! rules out PyTorch's reentrant recipe; so each block gets a top-level backward pass of
//! its own, driven from here.

use burn::module::{AutodiffModule, Module, ModuleVisitor, Param};
use burn::nn::GroupNorm;
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor};
use lora_core::precision::cast_to;
use lora_core::LoraConv2d;

use crate::resnet::{Downsample2D, ResnetBlock2D, SiluTemb, Upsample2D};
use crate::transformer::Transformer2DModel;
use crate::{AddedConditions, Result, UNet2DConditionModel};

/// Options of [`UNet2DConditionModel::forward_backward_checkpointed`].
pub struct CheckpointOptions<'a, B: Backend> {
    /// Also return `∂loss/∂encoder_hidden_states`, to backpropagate into a text encoder
    /// that is being trained.
    pub context_grad: bool,
    /// SDXL's added conditioning (required by a UNet that has it, see
    /// [`UNet2DConditionModel::forward_added`]).
    pub added: Option<AddedConditions<B>>,
    /// Also return `∂loss/∂text_embeds` of [`added`](Self::added), to backpropagate into
    /// the second text encoder's pooled output.
    pub added_grad: bool,
    /// Called in the backward pass right after each block's forward pass has been rebuilt,
    /// when that block's activations are all alive (for memory probes).
    pub after_recompute: Option<&'a mut dyn FnMut()>,
}

impl<B: Backend> Default for CheckpointOptions<'_, B> {
    fn default() -> Self {
        Self {
            context_grad: false,
            added: None,
            added_grad: false,
            after_recompute: None,
        }
    }
}

/// What [`UNet2DConditionModel::forward_backward_checkpointed`] returns.
pub struct CheckpointedStep<B: AutodiffBackend> {
    /// The loss, as the `loss` closure returned it.
    pub loss: Tensor<B::InnerBackend, 1>,
    /// The gradients of the UNet's trainable parameters, by parameter id (an optimizer's
    /// input, as `GradientsParams::from_grads(loss.backward(), &unet)` would give).
    pub grads: GradientsParams,
    /// `∂loss/∂encoder_hidden_states`, in their dtype, when
    /// [`CheckpointOptions::context_grad`] asked for it.
    pub context_grad: Option<Tensor<B::InnerBackend, 3>>,
    /// `∂loss/∂text_embeds`, in their dtype, when [`CheckpointOptions::added_grad`] asked
    /// for it (zeros if no gradient reached them).
    pub text_embeds_grad: Option<Tensor<B::InnerBackend, 2>>,
}

impl<B: AutodiffBackend> UNet2DConditionModel<B> {
    /// One forward and backward pass with gradient checkpointing (see [the module
    /// docs](crate::checkpoint)): predicts for `latents`, `timesteps` and
    /// `encoder_hidden_states` (and SDXL's [`CheckpointOptions::added`]) exactly as
    /// [`forward_added`](Self::forward_added) does, hands the
    /// prediction to `loss` and returns the loss with the gradients of every trainable
    /// parameter. The gradients equal those of `loss(unet.forward(..)).backward()` up to
    /// rounding; the latents get none.
    ///
    /// ```
    /// use burn::backend::{Autodiff, Flex};
    /// use burn::module::Module;
    /// use burn::tensor::Tensor;
    /// use lora_core::LoraConfig;
    /// use sd_model::checkpoint::CheckpointOptions;
    /// use sd_model::targets::{attach_new_adapters, Selection, UnetTargets};
    /// use sd_model::{UNet2DConditionModel, UnetConfig};
    ///
    /// type B = Autodiff<Flex>;
    /// let device = Default::default();
    /// let mut unet = UNet2DConditionModel::<B>::new(&UnetConfig::tiny(), &device).unwrap().no_grad();
    /// let sites = attach_new_adapters(&mut unet, &Selection::new(UnetTargets::Attn), &LoraConfig::new(2), &device).unwrap();
    /// let latents = Tensor::<B, 4>::ones([1, 4, 8, 8], &device);
    /// let t = Tensor::<B, 1>::from_floats([500.0], &device);
    /// let text = Tensor::<B, 3>::ones([1, 77, 32], &device);
    /// let target = latents.clone();
    /// let step = unet
    ///     .forward_backward_checkpointed(latents, t, text, CheckpointOptions::default(), |pred| (pred - target).powf_scalar(2.0).mean())
    ///     .unwrap();
    /// // `up` of every adapter, initialised to zero, gets a gradient (`down` does not yet).
    /// assert!(step.grads.len() >= sites.len());
    /// assert!(step.context_grad.is_none());
    /// ```
    pub fn forward_backward_checkpointed(
        &self,
        latents: Tensor<B, 4>,
        timesteps: Tensor<B, 1>,
        context: Tensor<B, 3>,
        mut options: CheckpointOptions<'_, B>,
        loss: impl FnOnce(Tensor<B, 4>) -> Tensor<B, 1>,
    ) -> Result<CheckpointedStep<B>> {
        self.check_inputs(&latents, &timesteps, &context)?;
        let (io_dtype, context_dtype) = (latents.dtype(), context.dtype());
        let dtype = self.conv_in.base.weight.val().dtype();
        // SDXL's pooled text embedding enters as a leaf of the time embedding's graph; its
        // gradient goes back to the caller, as the text embeddings' does.
        let added_grad = options.added_grad && options.added.is_some();
        let mut text_leaf = None;
        let added = options.added.take().map(|a| {
            let leaf = leaf::<B, 2>(a.text_embeds.clone().inner(), added_grad);
            text_leaf = Some((leaf.clone(), a.text_embeds.dtype()));
            AddedConditions {
                text_embeds: leaf,
                time_ids: Tensor::from_inner(a.time_ids.inner()),
            }
        });
        // The time embedding is tiny: it keeps its ordinary graph, backpropagated last.
        // Its SiLU, shared by all ResNet blocks, belongs to this graph too.
        let temb = burn::tensor::activation::silu(self.time_embedding_input(timesteps, added)?);
        let temb_grad = trainable(|v| self.time_embedding.visit(v))
            || self.add_embedding.as_ref().is_some_and(|m| trainable(|v| m.visit(v)))
            || added_grad;
        let temb_inner = temb.clone().inner();
        let context = cast_to(context.inner(), dtype);
        let context_grad = options.context_grad;

        // Forward without a graph. Every block's input is kept: these are the checkpoints.
        let inner = self.valid();
        let mut values = vec![cast_to(latents.inner(), dtype)];
        for stage in stages(&inner) {
            let x = values[stage.input].clone();
            let skip = stage.skip.map(|i| values[i].clone());
            values.push(stage.piece.run(x, skip, &temb_inner, &context));
        }
        drop(inner);

        let stages = stages(self);
        // Which values depend on something that wants a gradient; blocks on which nothing
        // upstream depends skip their backward pass (the frozen blocks before the first
        // adapter, with a frozen base).
        let mut tracked = vec![false; values.len()];
        let mut needed = Vec::with_capacity(stages.len());
        for (k, stage) in stages.iter().enumerate() {
            let need = trainable(|v| stage.piece.visit(v))
                || tracked[stage.input]
                || stage.skip.is_some_and(|i| tracked[i])
                || (stage.piece.uses_temb() && temb_grad)
                || (stage.piece.uses_context() && context_grad);
            tracked[k + 1] = need;
            needed.push(need);
        }

        // The loss on the prediction, with a graph of its own.
        let out = values.pop().expect("value 0 is the latents");
        let mut grad_of: Vec<Option<Tensor<B::InnerBackend, 4>>> = vec![None; values.len() + 1];
        let pred = Tensor::<B, 4>::from_inner(out).require_grad();
        let loss_value = loss(cast_to(pred.clone(), io_dtype));
        let mut grads = loss_value.backward();
        grad_of[values.len()] = pred.grad_remove(&mut grads);
        drop((grads, pred));
        let loss_value = loss_value.inner();

        let mut params = GradientsParams::new();
        let mut temb_sum: Option<Tensor<B::InnerBackend, 2>> = None;
        let mut context_sum: Option<Tensor<B::InnerBackend, 3>> = None;
        for (k, stage) in stages.iter().enumerate().rev() {
            // Every consumer of stage k's output comes later and is done.
            values.truncate(k + 1);
            let Some(grad_out) = grad_of[k + 1].take() else { continue };
            if !needed[k] {
                continue;
            }
            let x = leaf::<B, 4>(values[stage.input].clone(), tracked[stage.input]);
            let skip = stage.skip.map(|i| leaf::<B, 4>(values[i].clone(), tracked[i]));
            let temb_leaf = leaf::<B, 2>(temb_inner.clone(), temb_grad && stage.piece.uses_temb());
            let context_leaf = leaf::<B, 3>(context.clone(), context_grad && stage.piece.uses_context());
            let y = stage.piece.run(x.clone(), skip.clone(), &temb_leaf, &context_leaf);
            if let Some(probe) = options.after_recompute.as_mut() {
                probe();
            }
            // d(Σ y·g)/dy = g: the gradient that reached this block's output.
            let mut grads = (y * Tensor::from_inner(grad_out)).sum().backward();
            stage.piece.visit(&mut CollectGrads::<B> { grads: &mut grads, out: &mut params });
            accumulate(&mut grad_of[stage.input], x.grad_remove(&mut grads));
            if let (Some(i), Some(skip)) = (stage.skip, &skip) {
                accumulate(&mut grad_of[i], skip.grad_remove(&mut grads));
            }
            // Every ResNet adds to the time embedding's gradient and every transformer to the
            // text embeddings': small tensors, summed in f32 so that a bf16 model keeps digits.
            accumulate(&mut temb_sum, temb_leaf.grad_remove(&mut grads).map(|g| cast_to(g, DType::F32)));
            accumulate(&mut context_sum, context_leaf.grad_remove(&mut grads).map(|g| cast_to(g, DType::F32)));
        }
        let mut text_embeds_grad = None;
        if let Some(g) = temb_sum {
            let g = cast_to(g, temb.dtype());
            let mut grads = (temb * Tensor::from_inner(g)).sum().backward();
            self.time_embedding.visit(&mut CollectGrads::<B> { grads: &mut grads, out: &mut params });
            if let Some(add) = &self.add_embedding {
                add.visit(&mut CollectGrads::<B> { grads: &mut grads, out: &mut params });
            }
            if let Some((leaf, _)) = &text_leaf {
                text_embeds_grad = leaf.grad_remove(&mut grads);
            }
        }
        let text_embeds_grad = match (added_grad, text_leaf) {
            (true, Some((leaf, te_dtype))) => Some(cast_to(text_embeds_grad.unwrap_or_else(|| leaf.inner().zeros_like()), te_dtype)),
            _ => None,
        };
        let context_grad = context_grad.then(|| match context_sum {
            Some(g) => cast_to(g, context_dtype),
            None => cast_to(context.zeros_like(), context_dtype),
        });
        Ok(CheckpointedStep {
            loss: loss_value,
            grads: params,
            context_grad,
            text_embeds_grad,
        })
    }
}

/// An autodiff leaf holding `value`, tracked when its gradient is wanted.
fn leaf<B: AutodiffBackend, const D: usize>(value: Tensor<B::InnerBackend, D>, grad: bool) -> Tensor<B, D> {
    let t = Tensor::from_inner(value);
    if grad {
        t.require_grad()
    } else {
        t
    }
}

/// Adds `grad` to the running sum in `slot` (the first one starts it: no zero tensor).
pub(crate) fn accumulate<B: Backend, const D: usize>(slot: &mut Option<Tensor<B, D>>, grad: Option<Tensor<B, D>>) {
    if let Some(g) = grad {
        *slot = Some(match slot.take() {
            Some(sum) => sum + g,
            None => g,
        });
    }
}

/// Whether `visit` (a module's or a piece's `visit`) meets a parameter that requires a
/// gradient.
fn trainable(visit: impl FnOnce(&mut Trainable)) -> bool {
    let mut found = Trainable(false);
    visit(&mut found);
    found.0
}

struct Trainable(bool);

impl<B: AutodiffBackend> ModuleVisitor<B> for Trainable {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.0 |= param.is_require_grad();
    }
}

/// Moves every parameter gradient found in `grads` into `out` (summing if one is there).
struct CollectGrads<'a, B: AutodiffBackend> {
    grads: &'a mut B::Gradients,
    out: &'a mut GradientsParams,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for CollectGrads<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(g) = param.grad_remove(self.grads) {
            let sum = match self.out.remove::<B::InnerBackend, D>(param.id) {
                Some(old) => old + g,
                None => g,
            };
            self.out.register::<B::InnerBackend, D>(param.id, sum);
        }
    }
}

/// One block of the UNet's forward pass, the unit that checkpointing recomputes.
enum Piece<'a, B: Backend> {
    ConvIn(&'a LoraConv2d<B>),
    Resnet(&'a ResnetBlock2D<B>),
    Transformer(&'a Transformer2DModel<B>),
    Downsample(&'a Downsample2D<B>),
    Upsample(&'a Upsample2D<B>),
    Out(&'a GroupNorm<B>, &'a LoraConv2d<B>),
}

impl<B: Backend> Piece<'_, B> {
    /// The block on `x` (concatenated with `skip` along channels first, for an up-level ResNet).
    fn run(&self, x: Tensor<B, 4>, skip: Option<Tensor<B, 4>>, temb: &Tensor<B, 2>, context: &Tensor<B, 3>) -> Tensor<B, 4> {
        let x = match skip {
            Some(skip) => Tensor::cat(vec![x, skip], 1),
            None => x,
        };
        match self {
            Piece::ConvIn(conv) => conv.forward(x),
            Piece::Resnet(resnet) => resnet.forward_silu_temb(x, Some(&SiluTemb::from_activated(temb.clone()))),
            Piece::Transformer(t) => t.forward(x, context.clone()),
            Piece::Downsample(d) => d.forward(x),
            Piece::Upsample(u) => u.forward(x),
            Piece::Out(norm, conv) => conv.forward(crate::norm::group_norm(norm, x, true)),
        }
    }

    fn uses_temb(&self) -> bool {
        matches!(self, Piece::Resnet(_))
    }

    fn uses_context(&self) -> bool {
        matches!(self, Piece::Transformer(_))
    }

    fn visit<V: ModuleVisitor<B>>(&self, visitor: &mut V) {
        match self {
            Piece::ConvIn(conv) => conv.visit(visitor),
            Piece::Resnet(resnet) => resnet.visit(visitor),
            Piece::Transformer(t) => t.visit(visitor),
            Piece::Downsample(d) => d.visit(visitor),
            Piece::Upsample(u) => u.visit(visitor),
            Piece::Out(norm, conv) => {
                norm.visit(visitor);
                conv.visit(visitor);
            }
        }
    }
}

/// A block and the values it reads: value 0 is the latents, value `k + 1` stage `k`'s output.
struct Stage<'a, B: Backend> {
    piece: Piece<'a, B>,
    input: usize,
    /// The skip connection an up-level ResNet concatenates to its input.
    skip: Option<usize>,
}

/// The UNet's forward pass as a list of blocks, in the order
/// [`UNet2DConditionModel::forward`] and the levels' `forward`s run them (the tests check
/// that both give the same gradients).
fn stages<B: Backend>(unet: &UNet2DConditionModel<B>) -> Vec<Stage<'_, B>> {
    let mut plan = Vec::new();
    let mut push = |piece, input, skip| {
        plan.push(Stage { piece, input, skip });
        plan.len()
    };
    let mut x = push(Piece::ConvIn(&unet.conv_in), 0, None);
    let mut skips = vec![x];
    for block in &unet.down_blocks {
        for (j, resnet) in block.resnets.iter().enumerate() {
            x = push(Piece::Resnet(resnet), x, None);
            if let Some(attn) = block.attentions.get(j) {
                x = push(Piece::Transformer(attn), x, None);
            }
            skips.push(x);
        }
        for d in block.downsamplers.iter().flatten() {
            x = push(Piece::Downsample(d), x, None);
            skips.push(x);
        }
    }
    let mid = &unet.mid_block;
    if let Some(first) = mid.resnets.first() {
        x = push(Piece::Resnet(first), x, None);
    }
    for (attn, resnet) in mid.attentions.iter().zip(mid.resnets.iter().skip(1)) {
        x = push(Piece::Transformer(attn), x, None);
        x = push(Piece::Resnet(resnet), x, None);
    }
    for block in &unet.up_blocks {
        for (j, resnet) in block.resnets.iter().enumerate() {
            x = push(Piece::Resnet(resnet), x, skips.pop());
            if let Some(attn) = block.attentions.get(j) {
                x = push(Piece::Transformer(attn), x, None);
            }
        }
        for u in block.upsamplers.iter().flatten() {
            x = push(Piece::Upsample(u), x, None);
        }
    }
    push(Piece::Out(&unet.conv_norm_out, &unet.conv_out), x, None);
    plan
}
