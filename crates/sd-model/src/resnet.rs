//! ResNet blocks and resamplers shared by the VAE and the UNet (diffusers' `resnet.py`).

use burn::module::Module;
use burn::nn::conv::Conv2dConfig;
use burn::nn::interpolate::{Interpolate2dConfig, InterpolateMode};
use burn::nn::{GroupNorm, GroupNormConfig, LinearConfig, PaddingConfig2d};
use burn::tensor::activation::silu;

use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use lora_core::norm::LoraGroupNorm;
use lora_core::{LoraConv2d, LoraLinear};

/// A conv layer with the given kernel, "same" padding for odd kernels, as an adapter site.
pub(crate) fn conv<B: Backend>(c_in: usize, c_out: usize, kernel: usize, device: &B::Device) -> LoraConv2d<B> {
    let p = kernel / 2;
    LoraConv2d::new(
        Conv2dConfig::new([c_in, c_out], [kernel, kernel])
            .with_padding(PaddingConfig2d::Explicit(p, p, p, p))
            .init(device),
    )
}

pub(crate) fn group_norm<B: Backend>(groups: usize, channels: usize, eps: f64, device: &B::Device) -> GroupNorm<B> {
    GroupNormConfig::new(groups, channels).with_epsilon(eps).init(device)
}


/// The time embedding after the SiLU with which every UNet ResNet block starts, `silu(temb)`.
///
/// diffusers recomputes it in each of SD1.5's 22 ResNet blocks; the UNet computes it once
/// per call and hands it to all of them (the same numbers, 21 fewer activations per step).
///
/// ```
/// use burn::backend::Flex;
/// use burn::tensor::Tensor;
/// use sd_model::SiluTemb;
///
/// let temb = Tensor::<Flex, 2>::from_floats([[0.0, 2.0]], &Default::default());
/// let act = SiluTemb::new(temb);
/// let v = act.activated().to_data().to_vec::<f32>().unwrap();
/// assert!((v[0] - 0.0).abs() < 1e-6 && (v[1] - 2.0 / (1.0 + (-2.0f32).exp())).abs() < 1e-5);
/// ```
#[derive(Debug, Clone)]
pub struct SiluTemb<B: Backend>(Tensor<B, 2>);

impl<B: Backend> SiluTemb<B> {
    /// `silu(temb)` of a time embedding `[B, T]`.
    pub fn new(temb: Tensor<B, 2>) -> Self {
        Self(silu(temb))
    }

    /// Wraps a tensor that already holds `silu(temb)` (a checkpointed pass re-enters with it).
    pub fn from_activated(activated: Tensor<B, 2>) -> Self {
        Self(activated)
    }

    /// `silu(temb)`, `[B, T]`.
    pub fn activated(&self) -> &Tensor<B, 2> {
        &self.0
    }
}

/// diffusers' `ResnetBlock2D` with the default time-embedding norm.
#[derive(Module, Debug)]
pub struct ResnetBlock2D<B: Backend> {
    /// First norm (an adapter site for LyCORIS' norm module).
    pub norm1: LoraGroupNorm<B>,
    /// First 3x3 conv.
    pub conv1: LoraConv2d<B>,
    /// Projection of the time embedding (UNet only).
    pub time_emb_proj: Option<LoraLinear<B>>,
    /// Second norm (an adapter site for LyCORIS' norm module).
    pub norm2: LoraGroupNorm<B>,
    /// Second 3x3 conv.
    pub conv2: LoraConv2d<B>,
    /// 1x1 conv on the skip path when channels change.
    pub conv_shortcut: Option<LoraConv2d<B>>,
}

impl<B: Backend> ResnetBlock2D<B> {
    /// A block `c_in → c_out`; `temb_channels` adds the time-embedding projection.
    pub fn new(
        c_in: usize,
        c_out: usize,
        temb_channels: Option<usize>,
        groups: usize,
        eps: f64,
        device: &B::Device,
    ) -> Self {
        Self {
            norm1: LoraGroupNorm::new(group_norm(groups, c_in, eps, device)),
            conv1: conv(c_in, c_out, 3, device),
            time_emb_proj: temb_channels.map(|t| LoraLinear::new(LinearConfig::new(t, c_out).init(device))),
            norm2: LoraGroupNorm::new(group_norm(groups, c_out, eps, device)),
            conv2: conv(c_out, c_out, 3, device),
            conv_shortcut: (c_in != c_out).then(|| conv(c_in, c_out, 1, device)),
        }
    }

    /// `x [B, C, H, W]`, optional `temb [B, T]` (the time embedding as diffusers passes it:
    /// the block applies the SiLU).
    pub fn forward(&self, x: Tensor<B, 4>, temb: Option<Tensor<B, 2>>) -> Tensor<B, 4> {
        self.forward_silu_temb(x, temb.map(SiluTemb::new).as_ref())
    }

    /// [`Self::forward`] with the time embedding's SiLU already applied, as the UNet shares
    /// it between all its blocks.
    pub fn forward_silu_temb(&self, x: Tensor<B, 4>, temb: Option<&SiluTemb<B>>) -> Tensor<B, 4> {
        // The time embedding and the shortcut are added by the convolutions' ops (on CUDA in
        // cuDNN's output stage), not by additions of their own.
        let normed = group_norm_silu(&self.norm1, x.clone());
        let h = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => self.conv1.forward_add_channels(normed, proj.forward(temb.activated().clone())),
            _ => self.conv1.forward(normed),
        };
        let skip = match &self.conv_shortcut {
            Some(c) => c.forward(x),
            None => x,
        };
        self.conv2.forward_add(group_norm_silu(&self.norm2, h), skip)
    }
}

/// Stride-2 downsampling conv. With `pad_right_bottom` (the VAE's form) the input is padded
/// by one pixel right and bottom and the conv has no padding; otherwise padding is 1.
#[derive(Module, Debug)]
pub struct Downsample2D<B: Backend> {
    /// The 3x3 stride-2 conv.
    pub conv: LoraConv2d<B>,
}

impl<B: Backend> Downsample2D<B> {
    /// A downsampler for `channels` channels.
    pub fn new(channels: usize, pad_right_bottom: bool, device: &B::Device) -> Self {
        let padding = if pad_right_bottom {
            PaddingConfig2d::Explicit(0, 0, 1, 1)
        } else {
            PaddingConfig2d::Explicit(1, 1, 1, 1)
        };
        Self {
            conv: LoraConv2d::new(
                Conv2dConfig::new([channels, channels], [3, 3])
                    .with_stride([2, 2])
                    .with_padding(padding)
                    .init(device),
            ),
        }
    }

    /// Halves height and width.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.conv.forward(x)
    }
}

/// Nearest-neighbour 2x upsampling followed by a 3x3 conv.
#[derive(Module, Debug)]
pub struct Upsample2D<B: Backend> {
    /// The 3x3 conv.
    pub conv: LoraConv2d<B>,
}

impl<B: Backend> Upsample2D<B> {
    /// An upsampler for `channels` channels.
    pub fn new(channels: usize, device: &B::Device) -> Self {
        Self {
            conv: conv(channels, channels, 3, device),
        }
    }

    /// Doubles height and width.
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [_, _, h, w] = x.dims();
        let up = Interpolate2dConfig::new()
            .with_output_size(Some([h * 2, w * 2]))
            .with_mode(InterpolateMode::Nearest)
            .with_align_corners(false)
            .init()
            .forward(x);
        self.conv.forward(up)
    }
}

/// `silu(norm(x))` through the fused op of [`crate::norm`].
fn group_norm_silu<B: Backend>(norm: &LoraGroupNorm<B>, x: Tensor<B, 4>) -> Tensor<B, 4> {
    crate::norm::lora_group_norm(norm, x, true)
}
