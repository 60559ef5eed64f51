//! Spatial transformers of the UNet (diffusers' `Transformer2DModel`, `BasicTransformerBlock`,
//! `Attention`, `FeedForward` with GEGLU).

use burn::module::Module;
use burn::nn::{Dropout, DropoutConfig, LayerNormConfig, LinearConfig};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};
use lora_core::kernels::dense;
use lora_core::norm::{LoraGroupNorm, LoraLayerNorm};
use lora_core::{LoraConv2d, LoraLinear};

use crate::attention::multi_head_attention_rows;
use crate::resnet::{conv, group_norm};

fn linear<B: Backend>(d_in: usize, d_out: usize, bias: bool, device: &B::Device) -> LoraLinear<B> {
    LoraLinear::new(LinearConfig::new(d_in, d_out).with_bias(bias).init(device))
}

/// Multi-head attention with separate projections; `to_k`/`to_v` read the context.
#[derive(Module, Debug)]
pub struct Attention<B: Backend> {
    /// Query projection (no bias).
    pub to_q: LoraLinear<B>,
    /// Key projection (no bias).
    pub to_k: LoraLinear<B>,
    /// Value projection (no bias).
    pub to_v: LoraLinear<B>,
    /// Output projection (`to_out.0`, with bias).
    pub to_out: Vec<LoraLinear<B>>,
    /// Number of heads.
    pub heads: usize,
    /// Compute the attention in f32 when the model runs in half precision
    /// (diffusers' `upcast_attention`, set for SD2.1).
    pub upcast: bool,
}

impl<B: Backend> Attention<B> {
    /// Attention of width `dim` over a context of width `context_dim`.
    pub fn new(dim: usize, context_dim: usize, heads: usize, device: &B::Device) -> Self {
        Self {
            to_q: linear(dim, dim, false, device),
            to_k: linear(context_dim, dim, false, device),
            to_v: linear(context_dim, dim, false, device),
            to_out: vec![linear(dim, dim, true, device)],
            heads,
            upcast: false,
        }
    }

    /// `x [B, N, dim]` attends to `context [B, M, context_dim]` (itself when `None`).
    pub fn forward(&self, x: Tensor<B, 3>, context: Option<Tensor<B, 3>>) -> Tensor<B, 3> {
        self.forward_plus(x, context, None)
    }

    /// `forward(x, context) + residual`, with the residual added by the output projection
    /// ([`LoraLinear::forward_residual`]: no addition kernel of its own on GPU backends).
    pub fn forward_residual(&self, x: Tensor<B, 3>, context: Option<Tensor<B, 3>>, residual: Tensor<B, 3>) -> Tensor<B, 3> {
        self.forward_plus(x, context, Some(residual))
    }

    fn forward_plus(&self, x: Tensor<B, 3>, context: Option<Tensor<B, 3>>, residual: Option<Tensor<B, 3>>) -> Tensor<B, 3> {
        let [batch, tokens, _] = x.dims();
        let out = self.forward_rows(rows(x), context.map(rows), residual.map(rows), batch);
        let dim = out.dims()[1];
        out.reshape([batch, tokens, dim])
    }

    /// [`forward`](Self::forward) (plus `residual`, as in
    /// [`forward_residual`](Self::forward_residual)) on rows: `x [batch·N, dim]`, `context
    /// [batch·M, context_dim]`, `residual [batch·N, dim]`. The transformer blocks keep their
    /// tokens as rows: every projection then multiplies them as they are, where a
    /// `[B, N, dim]` input is flattened to rows and its output reshaped back at each layer
    /// (on burn's fusion backends each reshape, and its gradient's, is an operation the host
    /// registers and releases: about 1,200 per SD1.5 training step).
    pub fn forward_rows(&self, x: Tensor<B, 2>, context: Option<Tensor<B, 2>>, residual: Option<Tensor<B, 2>>, batch: usize) -> Tensor<B, 2> {
        let context = context.unwrap_or_else(|| x.clone());
        let q = self.to_q.forward(x);
        let k = self.to_k.forward(context.clone());
        let v = self.to_v.forward(context);
        let dtype = q.dtype();
        let mut out = if self.upcast && dtype != DType::F32 {
            let f32 = |t: Tensor<B, 2>| t.cast(DType::F32);
            multi_head_attention_rows(f32(q), f32(k), f32(v), batch, self.heads).cast(dtype)
        } else {
            multi_head_attention_rows(q, k, v, batch, self.heads)
        };
        // The residual goes with the last output layer (`to_out` holds one).
        let Some((last, rest)) = self.to_out.split_last() else {
            return match residual {
                Some(r) => out + r,
                None => out,
            };
        };
        for layer in rest {
            out = layer.forward(out);
        }
        match residual {
            Some(r) => last.forward_residual(out, r),
            None => last.forward(out),
        }
    }
}

/// `[B, N, C]` as `[B·N, C]` rows.
fn rows<B: Backend>(t: Tensor<B, 3>) -> Tensor<B, 2> {
    let [b, n, c] = t.dims();
    t.reshape([b * n, c])
}

/// GELU-gated linear unit: `proj` to twice the width, `hidden · gelu(gate)`.
#[derive(Module, Debug)]
pub struct Geglu<B: Backend> {
    /// `dim → 2 · inner`.
    pub proj: LoraLinear<B>,
}

/// The feed-forward block: `net.0` is the GEGLU, `net.1` diffusers' (parameter-free)
/// dropout, `net.2` the output layer `inner → dim`; a tuple keeps diffusers' indices.
#[derive(Module, Debug)]
pub struct FeedForward<B: Backend> {
    /// GEGLU, dropout (inactive at p = 0), output layer.
    pub net: (Geglu<B>, Dropout, LoraLinear<B>),
}

impl<B: Backend> FeedForward<B> {
    fn new(dim: usize, device: &B::Device) -> Self {
        let inner = dim * 4;
        Self {
            net: (
                Geglu {
                    proj: linear(dim, inner * 2, true, device),
                },
                DropoutConfig::new(0.0).init(),
                linear(inner, dim, true, device),
            ),
        }
    }

    /// `ff(x) + residual` on `[rows, dim]` rows, the residual added by the output layer.
    fn forward_residual(&self, x: Tensor<B, 2>, residual: Tensor<B, 2>) -> Tensor<B, 2> {
        let h = crate::activation::geglu_projected_rows(&self.net.0.proj, x);
        self.net.2.forward_residual(self.net.1.forward(h), residual)
    }
}

/// LayerNorm epsilon of the transformer blocks (diffusers' default).
const LAYER_NORM_EPS: f64 = 1e-5;

/// Self-attention, cross-attention and feed-forward, each pre-LayerNorm with a residual.
#[derive(Module, Debug)]
pub struct BasicTransformerBlock<B: Backend> {
    /// Norm before self-attention (an adapter site for LyCORIS' norm module, as are
    /// `norm2` and `norm3`).
    pub norm1: LoraLayerNorm<B>,
    /// Self-attention.
    pub attn1: Attention<B>,
    /// Norm before cross-attention.
    pub norm2: LoraLayerNorm<B>,
    /// Cross-attention to the text embeddings.
    pub attn2: Attention<B>,
    /// Norm before the feed-forward.
    pub norm3: LoraLayerNorm<B>,
    /// Feed-forward.
    pub ff: FeedForward<B>,
}

impl<B: Backend> BasicTransformerBlock<B> {
    fn new(dim: usize, context_dim: usize, heads: usize, device: &B::Device) -> Self {
        let ln = || LoraLayerNorm::new(LayerNormConfig::new(dim).with_epsilon(LAYER_NORM_EPS).init(device));
        Self {
            norm1: ln(),
            attn1: Attention::new(dim, dim, heads, device),
            norm2: ln(),
            attn2: Attention::new(dim, context_dim, heads, device),
            norm3: ln(),
            ff: FeedForward::new(dim, device),
        }
    }

    /// The block on `x [batch·N, dim]` rows with `context [batch·M, context_dim]` rows.
    fn forward_rows(&self, x: Tensor<B, 2>, context: Tensor<B, 2>, batch: usize) -> Tensor<B, 2> {
        let norm = |n: &LoraLayerNorm<B>, x: Tensor<B, 2>| crate::norm::lora_layer_norm_rows(n, x, LAYER_NORM_EPS);
        let x = self.attn1.forward_rows(norm(&self.norm1, x.clone()), None, Some(x), batch);
        let x = self.attn2.forward_rows(norm(&self.norm2, x.clone()), Some(context), Some(x), batch);
        self.ff.forward_residual(norm(&self.norm3, x.clone()), x)
    }
}

/// `proj_in` / `proj_out`: a 1x1 conv (SD1.x) or a linear layer (SD2.x).
// One projection exists per transformer, so the size difference of the variants is immaterial.
#[allow(clippy::large_enum_variant)]
#[derive(Module, Debug)]
pub enum Projection<B: Backend> {
    /// 1x1 convolution on the feature map.
    Conv(LoraConv2d<B>),
    /// Linear layer on the token sequence.
    Linear(LoraLinear<B>),
}

/// A spatial transformer: GroupNorm, `proj_in`, transformer blocks, `proj_out`, residual.
#[derive(Module, Debug)]
pub struct Transformer2DModel<B: Backend> {
    /// Input norm (an adapter site for LyCORIS' norm module).
    pub norm: LoraGroupNorm<B>,
    /// Input projection.
    pub proj_in: Projection<B>,
    /// The blocks.
    pub transformer_blocks: Vec<BasicTransformerBlock<B>>,
    /// Output projection.
    pub proj_out: Projection<B>,
}

impl<B: Backend> Transformer2DModel<B> {
    /// A transformer over `channels` channels with `heads` heads and `layers` blocks.
    pub fn new(
        channels: usize,
        context_dim: usize,
        heads: usize,
        layers: usize,
        groups: usize,
        linear_projection: bool,
        device: &B::Device,
    ) -> Self {
        let proj = || {
            if linear_projection {
                Projection::Linear(linear(channels, channels, true, device))
            } else {
                Projection::Conv(conv(channels, channels, 1, device))
            }
        };
        Self {
            norm: LoraGroupNorm::new(group_norm(groups, channels, 1e-6, device)),
            proj_in: proj(),
            transformer_blocks: (0..layers)
                .map(|_| BasicTransformerBlock::new(channels, context_dim, heads, device))
                .collect(),
            proj_out: proj(),
        }
    }

    /// `x [B, C, H, W]` conditioned on `context [B, M, context_dim]`.
    pub fn forward(&self, x: Tensor<B, 4>, context: Tensor<B, 3>) -> Tensor<B, 4> {
        let [b, c, h, w] = x.dims();
        // The blocks work on `[B·H·W, C]` token rows (see `Attention::forward_rows`). Each
        // way is one transposition per image (`dense`: in tiles on the CPU backend without
        // autodiff, as when sampling; autodiff's reshape copies as it is).
        let to_rows = |t: Tensor<B, 4>| dense(t.permute([0, 2, 3, 1])).reshape([b * h * w, c]);
        let to_map = |t: Tensor<B, 2>| dense(t.reshape([b, h * w, c]).swap_dims(1, 2)).reshape([b, c, h, w]);
        let normed = crate::norm::lora_group_norm(&self.norm, x.clone(), false);
        let mut seq = match &self.proj_in {
            Projection::Conv(p) => to_rows(p.forward(normed)),
            Projection::Linear(p) => p.forward(to_rows(normed)),
        };
        let context = rows(context);
        for block in &self.transformer_blocks {
            seq = block.forward_rows(seq, context.clone(), b);
        }
        match &self.proj_out {
            // The residual added by the convolution's op (on CUDA in cuDNN's output stage).
            Projection::Conv(p) => p.forward_add(to_map(seq), x),
            Projection::Linear(p) => to_map(p.forward(seq)) + x,
        }
    }
}
