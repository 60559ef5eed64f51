//! UNet levels: `CrossAttnDownBlock2D` / `DownBlock2D`, `UNetMidBlock2DCrossAttn`,
//! `CrossAttnUpBlock2D` / `UpBlock2D`. A block without attention has an empty `attentions`.

use burn::module::Module;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

use crate::resnet::{Downsample2D, ResnetBlock2D, SiluTemb, Upsample2D};
use crate::transformer::Transformer2DModel;

/// Shared settings of the blocks of one UNet.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BlockSettings {
    pub temb: usize,
    pub groups: usize,
    pub eps: f64,
    pub context_dim: usize,
    pub linear_projection: bool,
}

impl BlockSettings {
    fn resnet<B: Backend>(&self, c_in: usize, c_out: usize, device: &B::Device) -> ResnetBlock2D<B> {
        ResnetBlock2D::new(c_in, c_out, Some(self.temb), self.groups, self.eps, device)
    }

    fn transformer<B: Backend>(&self, channels: usize, heads: usize, layers: usize, device: &B::Device) -> Transformer2DModel<B> {
        Transformer2DModel::new(channels, self.context_dim, heads, layers, self.groups, self.linear_projection, device)
    }
}

/// A down level.
#[derive(Module, Debug)]
pub struct UnetDownBlock<B: Backend> {
    /// ResNet blocks.
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// One transformer after each ResNet (cross-attention levels only).
    pub attentions: Vec<Transformer2DModel<B>>,
    /// Stride-2 conv (all levels but the last).
    pub downsamplers: Option<Vec<Downsample2D<B>>>,
}

impl<B: Backend> UnetDownBlock<B> {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        s: &BlockSettings,
        c_in: usize,
        c_out: usize,
        layers: usize,
        attention: Option<(usize, usize)>,
        downsample: bool,
        device: &B::Device,
    ) -> Self {
        Self {
            resnets: (0..layers)
                .map(|j| s.resnet(if j == 0 { c_in } else { c_out }, c_out, device))
                .collect(),
            attentions: attention
                .map(|(heads, depth)| (0..layers).map(|_| s.transformer(c_out, heads, depth, device)).collect())
                .unwrap_or_default(),
            downsamplers: downsample.then(|| vec![Downsample2D::new(c_out, false, device)]),
        }
    }

    /// Runs the level, pushing every intermediate output onto `skips`.
    pub fn forward(&self, mut x: Tensor<B, 4>, temb: &SiluTemb<B>, context: &Tensor<B, 3>, skips: &mut Vec<Tensor<B, 4>>) -> Tensor<B, 4> {
        for (j, resnet) in self.resnets.iter().enumerate() {
            x = resnet.forward_silu_temb(x, Some(temb));
            if let Some(attn) = self.attentions.get(j) {
                x = attn.forward(x, context.clone());
            }
            skips.push(x.clone());
        }
        for d in self.downsamplers.iter().flatten() {
            x = d.forward(x);
            skips.push(x.clone());
        }
        x
    }
}

/// The middle: ResNet, transformer, ResNet.
#[derive(Module, Debug)]
pub struct UNetMidBlock2DCrossAttn<B: Backend> {
    /// The two ResNet blocks.
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// The transformer between them.
    pub attentions: Vec<Transformer2DModel<B>>,
}

impl<B: Backend> UNetMidBlock2DCrossAttn<B> {
    pub(crate) fn new(s: &BlockSettings, channels: usize, heads: usize, depth: usize, device: &B::Device) -> Self {
        Self {
            resnets: (0..2).map(|_| s.resnet(channels, channels, device)).collect(),
            attentions: vec![s.transformer(channels, heads, depth, device)],
        }
    }

    /// Runs the middle block.
    pub fn forward(&self, x: Tensor<B, 4>, temb: &SiluTemb<B>, context: &Tensor<B, 3>) -> Tensor<B, 4> {
        let mut x = self.resnets[0].forward_silu_temb(x, Some(temb));
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            x = resnet.forward_silu_temb(attn.forward(x, context.clone()), Some(temb));
        }
        x
    }
}

/// An up level.
#[derive(Module, Debug)]
pub struct UnetUpBlock<B: Backend> {
    /// ResNet blocks (each takes the previous output concatenated with a skip).
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// One transformer after each ResNet (cross-attention levels only).
    pub attentions: Vec<Transformer2DModel<B>>,
    /// Nearest 2x upsampling and conv (all levels but the last).
    pub upsamplers: Option<Vec<Upsample2D<B>>>,
}

impl<B: Backend> UnetUpBlock<B> {
    /// `c_in`: channels of the matching down level's input; `c_prev`: channels coming from
    /// the level below; `c_out`: this level's channels (diffusers' channel bookkeeping).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        s: &BlockSettings,
        c_in: usize,
        c_prev: usize,
        c_out: usize,
        layers: usize,
        attention: Option<(usize, usize)>,
        upsample: bool,
        device: &B::Device,
    ) -> Self {
        Self {
            resnets: (0..layers)
                .map(|j| {
                    let skip = if j == layers - 1 { c_in } else { c_out };
                    let input = if j == 0 { c_prev } else { c_out };
                    s.resnet(input + skip, c_out, device)
                })
                .collect(),
            attentions: attention
                .map(|(heads, depth)| (0..layers).map(|_| s.transformer(c_out, heads, depth, device)).collect())
                .unwrap_or_default(),
            upsamplers: upsample.then(|| vec![Upsample2D::new(c_out, device)]),
        }
    }

    /// Runs the level, consuming skips from the end of `skips`.
    pub fn forward(&self, mut x: Tensor<B, 4>, temb: &SiluTemb<B>, context: &Tensor<B, 3>, skips: &mut Vec<Tensor<B, 4>>) -> Tensor<B, 4> {
        for (j, resnet) in self.resnets.iter().enumerate() {
            if let Some(skip) = skips.pop() {
                x = Tensor::cat(vec![x, skip], 1);
            }
            x = resnet.forward_silu_temb(x, Some(temb));
            if let Some(attn) = self.attentions.get(j) {
                x = attn.forward(x, context.clone());
            }
        }
        for u in self.upsamplers.iter().flatten() {
            x = u.forward(x);
        }
        x
    }
}
