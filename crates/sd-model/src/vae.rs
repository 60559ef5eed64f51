//! The VAE, as diffusers' `AutoencoderKL`.

use lora_core::precision::cast_to;
use burn::module::Module;
use burn::nn::GroupNorm;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use lora_core::{LoraConv2d, LoraLinear};

use crate::attention::multi_head_attention;
use crate::config::VaeConfig;
use crate::resnet::{conv, group_norm, Downsample2D, ResnetBlock2D, Upsample2D};
use crate::{Result, SdModelError};

/// The VAE's GroupNorm epsilon.
const EPS: f64 = 1e-6;

/// Single-head self-attention over the pixels of a feature map, with a residual.
#[derive(Module, Debug)]
pub struct VaeAttention<B: Backend> {
    /// Norm before the projections.
    pub group_norm: GroupNorm<B>,
    /// Query projection.
    pub to_q: LoraLinear<B>,
    /// Key projection.
    pub to_k: LoraLinear<B>,
    /// Value projection.
    pub to_v: LoraLinear<B>,
    /// Output projection (`to_out.0`).
    pub to_out: Vec<LoraLinear<B>>,
}

impl<B: Backend> VaeAttention<B> {
    fn new(channels: usize, groups: usize, device: &B::Device) -> Self {
        let lin = || LoraLinear::new(burn::nn::LinearConfig::new(channels, channels).init(device));
        Self {
            group_norm: group_norm(groups, channels, EPS, device),
            to_q: lin(),
            to_k: lin(),
            to_v: lin(),
            to_out: vec![lin()],
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let [b, c, h, w] = x.dims();
        let seq = crate::norm::group_norm(&self.group_norm, x.clone(), false).reshape([b, c, h * w]).swap_dims(1, 2);
        let q = self.to_q.forward(seq.clone());
        let k = self.to_k.forward(seq.clone());
        let v = self.to_v.forward(seq);
        let mut out = multi_head_attention(q, k, v, 1, false);
        for layer in &self.to_out {
            out = layer.forward(out);
        }
        x + lora_core::kernels::dense(out.swap_dims(1, 2)).reshape([b, c, h, w])
    }
}

/// ResNet, attention, ResNet at the lowest resolution.
#[derive(Module, Debug)]
pub struct VaeMidBlock<B: Backend> {
    /// The two ResNet blocks.
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// The attention between them (absent when `mid_block_add_attention` is false).
    pub attentions: Vec<VaeAttention<B>>,
}

impl<B: Backend> VaeMidBlock<B> {
    fn new(channels: usize, groups: usize, attention: bool, device: &B::Device) -> Self {
        Self {
            resnets: (0..2)
                .map(|_| ResnetBlock2D::new(channels, channels, None, groups, EPS, device))
                .collect(),
            attentions: if attention {
                vec![VaeAttention::new(channels, groups, device)]
            } else {
                vec![]
            },
        }
    }

    fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        let mut x = self.resnets[0].forward(x, None);
        for (attn, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            x = resnet.forward(attn.forward(x), None);
        }
        if self.attentions.is_empty() {
            x = self.resnets[1].forward(x, None);
        }
        x
    }
}

/// One encoder level (`DownEncoderBlock2D`).
#[derive(Module, Debug)]
pub struct DownEncoderBlock2D<B: Backend> {
    /// ResNet blocks.
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// The stride-2 downsampler (all levels but the last).
    pub downsamplers: Option<Vec<Downsample2D<B>>>,
}

/// One decoder level (`UpDecoderBlock2D`).
#[derive(Module, Debug)]
pub struct UpDecoderBlock2D<B: Backend> {
    /// ResNet blocks.
    pub resnets: Vec<ResnetBlock2D<B>>,
    /// The 2x upsampler (all levels but the last).
    pub upsamplers: Option<Vec<Upsample2D<B>>>,
}

/// Image → latent distribution parameters.
#[derive(Module, Debug)]
pub struct VaeEncoder<B: Backend> {
    /// Input conv.
    pub conv_in: LoraConv2d<B>,
    /// Levels, highest resolution first.
    pub down_blocks: Vec<DownEncoderBlock2D<B>>,
    /// Mid block.
    pub mid_block: VaeMidBlock<B>,
    /// Output norm.
    pub conv_norm_out: GroupNorm<B>,
    /// Output conv to `2 · latent_channels` (mean and log-variance).
    pub conv_out: LoraConv2d<B>,
}

/// Latent → image.
#[derive(Module, Debug)]
pub struct VaeDecoder<B: Backend> {
    /// Input conv.
    pub conv_in: LoraConv2d<B>,
    /// Mid block.
    pub mid_block: VaeMidBlock<B>,
    /// Levels, lowest resolution first.
    pub up_blocks: Vec<UpDecoderBlock2D<B>>,
    /// Output norm.
    pub conv_norm_out: GroupNorm<B>,
    /// Output conv to image channels.
    pub conv_out: LoraConv2d<B>,
}

/// The posterior `N(mean, exp(logvar))` of a latent given an image.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian<B: Backend> {
    /// Mean `[B, latent, h, w]`.
    pub mean: Tensor<B, 4>,
    /// Log-variance, clamped to `[-30, 20]` as diffusers does.
    pub logvar: Tensor<B, 4>,
}

impl<B: Backend> DiagonalGaussian<B> {
    /// `mean + std · noise`, with `noise` standard normal of the mean's shape (the caller
    /// draws it from a seeded source so runs reproduce).
    pub fn sample(&self, noise: Tensor<B, 4>) -> Result<Tensor<B, 4>> {
        if noise.dims() != self.mean.dims() {
            return Err(SdModelError::BadInput {
                what: "posterior noise".into(),
                reason: format!("shape {:?} must equal the mean's {:?}", noise.dims(), self.mean.dims()),
            });
        }
        Ok(self.mean.clone() + (self.logvar.clone() * 0.5).exp() * noise)
    }
}

/// The variational autoencoder (`AutoencoderKL`).
///
/// ```
/// use burn::backend::Flex;
/// use burn::tensor::Tensor;
/// use sd_model::{AutoencoderKl, VaeConfig};
///
/// let device = Default::default();
/// let vae = AutoencoderKl::<Flex>::new(&VaeConfig::tiny(), &device).unwrap();
/// let image = Tensor::<Flex, 4>::zeros([1, 3, 16, 16], &device);
/// let posterior = vae.encode(image).unwrap();
/// assert_eq!(posterior.mean.dims(), [1, 4, 4, 4]);
/// assert_eq!(vae.decode(posterior.mean).unwrap().dims(), [1, 3, 16, 16]);
/// assert!(vae.decode(Tensor::zeros([1, 3, 4, 4], &device)).is_err(), "3 channels, not the latents' 4");
/// ```
#[derive(Module, Debug)]
pub struct AutoencoderKl<B: Backend> {
    /// Encoder.
    pub encoder: VaeEncoder<B>,
    /// Decoder.
    pub decoder: VaeDecoder<B>,
    /// 1x1 conv after the encoder.
    pub quant_conv: Option<LoraConv2d<B>>,
    /// 1x1 conv before the decoder.
    pub post_quant_conv: Option<LoraConv2d<B>>,
    /// Latent scaling factor (`scaling_factor`).
    pub scaling_factor: f64,
    /// Latent shift (`shift_factor`, 0 when absent).
    pub shift_factor: f64,
}

impl<B: Backend> AutoencoderKl<B> {
    /// A randomly initialised VAE (load weights with [`crate::load`]).
    pub fn new(config: &VaeConfig, device: &B::Device) -> Result<Self> {
        config.validate("vae config")?;
        let ch = &config.block_out_channels;
        let g = config.norm_num_groups;
        let levels = ch.len();
        let latent = config.latent_channels;
        let top = ch[levels - 1];

        let mut down_blocks = Vec::with_capacity(levels);
        let mut c_prev = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let resnets = (0..config.layers_per_block)
                .map(|j| ResnetBlock2D::new(if j == 0 { c_prev } else { c }, c, None, g, EPS, device))
                .collect();
            let downsamplers = (i + 1 < levels).then(|| vec![Downsample2D::new(c, true, device)]);
            down_blocks.push(DownEncoderBlock2D { resnets, downsamplers });
            c_prev = c;
        }
        let encoder = VaeEncoder {
            conv_in: conv(config.in_channels, ch[0], 3, device),
            down_blocks,
            mid_block: VaeMidBlock::new(top, g, config.mid_block_add_attention, device),
            conv_norm_out: group_norm(g, top, EPS, device),
            conv_out: conv(top, 2 * latent, 3, device),
        };

        let mut up_blocks = Vec::with_capacity(levels);
        let mut c_prev = top;
        for (i, &c) in ch.iter().rev().enumerate() {
            let resnets = (0..config.layers_per_block + 1)
                .map(|j| ResnetBlock2D::new(if j == 0 { c_prev } else { c }, c, None, g, EPS, device))
                .collect();
            let upsamplers = (i + 1 < levels).then(|| vec![Upsample2D::new(c, device)]);
            up_blocks.push(UpDecoderBlock2D { resnets, upsamplers });
            c_prev = c;
        }
        let decoder = VaeDecoder {
            conv_in: conv(latent, top, 3, device),
            mid_block: VaeMidBlock::new(top, g, config.mid_block_add_attention, device),
            up_blocks,
            conv_norm_out: group_norm(g, ch[0], EPS, device),
            conv_out: conv(ch[0], config.out_channels, 3, device),
        };
        Ok(Self {
            encoder,
            decoder,
            quant_conv: config.use_quant_conv.then(|| conv(2 * latent, 2 * latent, 1, device)),
            post_quant_conv: config.use_post_quant_conv.then(|| conv(latent, latent, 1, device)),
            scaling_factor: config.scaling_factor,
            shift_factor: config.shift_factor.unwrap_or(0.0),
        })
    }

    /// Number of latent channels.
    pub fn latent_channels(&self) -> usize {
        self.decoder.conv_in.base.weight.dims()[1]
    }

    /// Spatial downsampling factor.
    pub fn downsample_factor(&self) -> usize {
        1 << self.encoder.down_blocks.iter().filter(|b| b.downsamplers.is_some()).count()
    }

    /// Encodes images `[B, 3, H, W]` in `[-1, 1]` (H and W multiples of the downsampling
    /// factor) to the latent posterior.
    pub fn encode(&self, pixels: Tensor<B, 4>) -> Result<DiagonalGaussian<B>> {
        let [_, c, h, w] = pixels.dims();
        let f = self.downsample_factor();
        let c_in = self.encoder.conv_in.base.weight.dims()[1];
        if c != c_in || h % f != 0 || w % f != 0 || h == 0 || w == 0 {
            return Err(SdModelError::BadInput {
                what: "pixels".into(),
                reason: format!(
                    "shape {:?} needs {c_in} channels and a height and width that are positive multiples of {f}",
                    pixels.dims()
                ),
            });
        }
        let e = &self.encoder;
        // Inputs and outputs keep the caller's dtype; the network runs in its weights' dtype.
        let io_dtype = pixels.dtype();
        let mut x = e.conv_in.forward(cast_to(pixels, e.conv_in.base.weight.val().dtype()));
        for block in &e.down_blocks {
            for r in &block.resnets {
                x = r.forward(x, None);
            }
            for d in block.downsamplers.iter().flatten() {
                x = d.forward(x);
            }
        }
        x = e.mid_block.forward(x);
        x = e.conv_out.forward(crate::norm::group_norm(&e.conv_norm_out, x, true));
        if let Some(q) = &self.quant_conv {
            x = q.forward(x);
        }
        let latent = x.dims()[1] / 2;
        let mut halves = x.split(latent, 1).into_iter();
        let (mean, logvar) = match (halves.next(), halves.next()) {
            (Some(m), Some(l)) => (m, l),
            _ => unreachable!("conv_out has 2 · latent channels by construction"),
        };
        Ok(DiagonalGaussian {
            mean: cast_to(mean, io_dtype),
            logvar: cast_to(logvar, io_dtype).clamp(-30.0, 20.0),
        })
    }

    /// Decodes raw (unscaled) latents `[B, latent, h, w]` to images in about `[-1, 1]`;
    /// latents of another channel count or an empty size are an error.
    pub fn decode(&self, latents: Tensor<B, 4>) -> Result<Tensor<B, 4>> {
        let [_, c, h, w] = latents.dims();
        let latent = self.latent_channels();
        if c != latent || h == 0 || w == 0 {
            return Err(SdModelError::BadInput {
                what: "latents".into(),
                reason: format!("shape {:?} needs {latent} channels and a positive height and width", latents.dims()),
            });
        }
        let d = &self.decoder;
        let io_dtype = latents.dtype();
        let latents = cast_to(latents, d.conv_in.base.weight.val().dtype());
        let mut x = match &self.post_quant_conv {
            Some(p) => p.forward(latents),
            None => latents,
        };
        x = d.conv_in.forward(x);
        x = d.mid_block.forward(x);
        for block in &d.up_blocks {
            for r in &block.resnets {
                x = r.forward(x, None);
            }
            for u in block.upsamplers.iter().flatten() {
                x = u.forward(x);
            }
        }
        Ok(cast_to(d.conv_out.forward(crate::norm::group_norm(&d.conv_norm_out, x, true)), io_dtype))
    }

    /// Raw latents → the scaled latents the UNet works on: `(z - shift) · scale`.
    pub fn scale_latents(&self, latents: Tensor<B, 4>) -> Tensor<B, 4> {
        (latents - self.shift_factor) * self.scaling_factor
    }

    /// Inverse of [`AutoencoderKl::scale_latents`].
    pub fn unscale_latents(&self, latents: Tensor<B, 4>) -> Tensor<B, 4> {
        latents / self.scaling_factor + self.shift_factor
    }
}
