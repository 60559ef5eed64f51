//! LoRA for 2-d convolutions (LoCon).

use burn::module::{Initializer, Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Dropout, DropoutConfig, PaddingConfig2d};
use burn::tensor::module::conv2d;
use burn::tensor::ops::PaddedConvOptions;
use burn::tensor::DType;
use burn::tensor::{backend::Backend, Tensor};

use crate::linear::{down_initializer, fold_delta, update_frozen};
use crate::precision::cast_to;
use crate::lycoris::LycorisAdapter;
use crate::{HostTensor, LoraConfig, LoraError, LoraWeights, Result};

/// The trainable part of a LoRA conv layer.
///
/// `down` is a convolution with the base layer's kernel size, stride, padding and dilation
/// (`in → rank`); `up` is a 1x1 convolution (`rank → out`). Their composition is a
/// convolution with kernel `ΔW[o,i,kh,kw] = scale · Σ_r up[o,r] · down[r,i,kh,kw]`.
#[derive(Module, Debug)]
pub struct Conv2dAdapter<B: Backend> {
    /// Down convolution `in → rank` (weights `[rank, in, kh, kw]`).
    pub down: Conv2d<B>,
    /// Up convolution `rank → out`, 1x1 (weights `[out, rank, 1, 1]`), zero at initialisation.
    pub up: Conv2d<B>,
    /// Dropout on the adapter input (active only on autodiff backends).
    pub dropout: Dropout,
    /// `alpha / rank` (or `alpha / sqrt(rank)` for rsLoRA).
    pub scale: f32,
    /// kohya's network dropout on `down(x)` ([`LoraConfig::network_dropout`]; active only
    /// on autodiff backends).
    pub network_dropout: Dropout,
    /// kohya's rank dropout probability ([`LoraConfig::rank_dropout`]; autodiff backends only).
    pub rank_dropout: f64,
    /// kohya's module dropout probability ([`LoraConfig::module_dropout`]; autodiff backends only).
    pub module_dropout: f64,
    /// DoRA's magnitude `m`, `[out]`, trained (see [`LoraConfig::dora`]); `None` for plain
    /// LoRA. Set from the base kernel by [`LoraConv2d::attach_new`].
    pub magnitude: Option<Param<Tensor<B, 1>>>,
}

fn check_base<B: Backend>(base: &Conv2d<B>, key: &str) -> Result<()> {
    if base.groups != 1 {
        return Err(LoraError::Unsupported(format!(
            "`{key}`: grouped convolution (groups = {})",
            base.groups
        )));
    }
    Ok(())
}

fn down_config<B: Backend>(base: &Conv2d<B>, rank: usize) -> Conv2dConfig {
    let [_, in_ch, kh, kw] = base.weight.dims();
    Conv2dConfig::new([in_ch, rank], [kh, kw])
        .with_stride(base.stride)
        .with_dilation(base.dilation)
        .with_padding(base.padding.clone())
        .with_bias(false)
}

impl<B: Backend> Conv2dAdapter<B> {
    /// A freshly initialised adapter for `base` (up is zero).
    pub fn new(config: &LoraConfig, base: &Conv2d<B>, device: &B::Device) -> Result<Self> {
        check_base(base, "<new>")?;
        let out_ch = base.weight.dims()[0];
        config.validate()?;
        let down = down_config(base, config.rank)
            .with_initializer(down_initializer(config.init, config.rank))
            .init(device);
        let up = Conv2dConfig::new([config.rank, out_ch], [1, 1])
            .with_bias(false)
            .with_initializer(Initializer::Zeros)
            .init(device);
        Ok(Self {
            down,
            up,
            dropout: DropoutConfig::new(config.dropout).init(),
            network_dropout: DropoutConfig::new(config.network_dropout).init(),
            scale: config.scale(),
            rank_dropout: config.rank_dropout,
            module_dropout: config.module_dropout,
            magnitude: None,
        })
    }

    /// Builds an adapter for `base` from file weights (`down [rank, in, kh, kw]`,
    /// `up [out, rank, 1, 1]`; 2-d weights are accepted, `down` with the kernel flattened
    /// into its columns, `[rank, in·kh·kw]`, as LyCORIS stores it).
    pub fn from_weights(
        weights: &LoraWeights,
        base: &Conv2d<B>,
        key: &str,
        device: &B::Device,
    ) -> Result<Self> {
        weights.validate(key)?;
        check_base(base, key)?;
        let [out_ch, in_ch, kh, kw] = base.weight.dims();
        let rank = weights.rank();
        let mut down_shape = weights.down.shape.clone();
        if down_shape.len() == 2 && down_shape[1] == in_ch * kh * kw {
            // A linear-layout adapter fits a 1x1 conv (diffusers stores proj_in both ways);
            // a flattened kernel (LyCORIS) unflattens.
            down_shape = vec![rank, in_ch, kh, kw];
        }
        let want_down = vec![rank, in_ch, kh, kw];
        let want_up = vec![out_ch, rank, 1, 1];
        let mut up_shape = weights.up.shape.clone();
        if up_shape.len() == 2 {
            up_shape.extend([1, 1]);
        }
        if down_shape != want_down || up_shape != want_up {
            return Err(LoraError::ShapeMismatch {
                key: key.into(),
                reason: format!(
                    "layer needs down {want_down:?} and up {want_up:?}, file has down {:?} and up {:?}",
                    weights.down.shape, weights.up.shape
                ),
            });
        }
        let down = HostTensor::new(down_shape, weights.down.data.clone())?.to_tensor::<B, 4>(device)?;
        let up = HostTensor::new(up_shape, weights.up.data.clone())?.to_tensor::<B, 4>(device)?;
        let mut down_conv = down_config(base, rank).init::<B>(device);
        down_conv.weight = Param::from_tensor(down);
        let mut up_conv = Conv2dConfig::new([rank, out_ch], [1, 1])
            .with_bias(false)
            .init::<B>(device);
        up_conv.weight = Param::from_tensor(up);
        let magnitude = match &weights.magnitude {
            Some(m) => Some(Param::from_tensor(m.to_tensor::<B, 1>(device)?)),
            None => None,
        };
        Ok(Self {
            down: down_conv,
            up: up_conv,
            dropout: DropoutConfig::new(0.0).init(),
            network_dropout: DropoutConfig::new(0.0).init(),
            scale: weights.scale(),
            rank_dropout: 0.0,
            module_dropout: 0.0,
            magnitude,
        })
    }

    /// The adapter in file layout (4-d tensors); `alpha = scale · rank`.
    pub fn to_weights(&self) -> Result<LoraWeights> {
        let magnitude = match &self.magnitude {
            Some(m) => Some(HostTensor::from_tensor(m.val())?),
            None => None,
        };
        Ok(LoraWeights {
            down: HostTensor::from_tensor(self.down.weight.val())?,
            up: HostTensor::from_tensor(self.up.weight.val())?,
            alpha: self.scale * self.rank() as f32,
            magnitude,
            lycoris: None,
        })
    }

    /// Whether this is a DoRA adapter.
    pub fn is_dora(&self) -> bool {
        self.magnitude.is_some()
    }

    /// DoRA's gain per output channel, `m / ‖W + ΔW‖` `[out]` in f32 (the norm over each
    /// output's `[in, kh, kw]` kernel), for the base kernel `weight`; `None` for plain LoRA.
    /// The norm is a constant to autodiff, as in [`crate::LinearAdapter::dora_gain`].
    pub fn dora_gain(&self, weight: Tensor<B, 4>) -> Option<Tensor<B, 1>> {
        let m = self.magnitude.as_ref()?;
        let norm = kernel_norms(weight, self.delta_weight_detached());
        Some(cast_to(m.val(), DType::F32) / norm)
    }

    /// [`delta_weight`](Self::delta_weight) at factor 1, outside any autodiff graph.
    fn delta_weight_detached(&self) -> Tensor<B, 4> {
        let [rank, in_ch, kh, kw] = self.down.weight.dims();
        let out_ch = self.up.weight.dims()[0];
        let up = cast_to(self.up.weight.val().detach(), DType::F32).reshape([out_ch, rank]);
        let down = cast_to(self.down.weight.val().detach(), DType::F32).reshape([rank, in_ch * kh * kw]);
        up.matmul(down).mul_scalar(self.scale).reshape([out_ch, in_ch, kh, kw])
    }

    /// Rank `r`.
    pub fn rank(&self) -> usize {
        self.down.weight.dims()[0]
    }

    /// `factor · scale · up(down(dropout(x)))`, computed in `x`'s dtype: with a half-precision
    /// base the f32 adapter weights are cast on the fly (see [`crate::precision`]). While
    /// training, kohya's network dropout drops elements of `down(…)`, and its rank and
    /// module dropout multiply it per sample.
    pub fn forward(&self, x: Tensor<B, 4>, factor: f32) -> Tensor<B, 4> {
        self.forward_dropped(self.dropout.forward(x), factor, self.module_dropout)
    }

    /// [`forward`](Self::forward) on an input that has been through the input dropout,
    /// with module dropout at `module_p`.
    fn forward_dropped(&self, x: Tensor<B, 4>, factor: f32, module_p: f64) -> Tensor<B, 4> {
        let dtype = x.dtype();
        let h = self.network_dropout.forward(conv_in_dtype(&self.down, x, dtype));
        let [samples, rank, _, _] = h.dims();
        let h = match crate::rank_dropout::mask::<B>(self.rank_dropout, module_p, samples, rank, &h.device()) {
            Some(mask) => h * cast_to(mask, dtype).reshape([samples, rank, 1, 1]),
            None => h,
        };
        conv_in_dtype(&self.up, h * (factor * self.scale), dtype)
    }

    /// `ΔW` `[out, in, kh, kw]`, times `factor`, in f32.
    pub fn delta_weight(&self, factor: f32) -> Tensor<B, 4> {
        let [rank, in_ch, kh, kw] = self.down.weight.dims();
        let out_ch = self.up.weight.dims()[0];
        // In f32 whatever the adapter weights' dtype (as `LinearAdapter::delta_weight`).
        let up = cast_to(self.up.weight.val(), DType::F32).reshape([out_ch, rank]);
        let down = cast_to(self.down.weight.val(), DType::F32).reshape([rank, in_ch * kh * kw]);
        up.matmul(down)
            .mul_scalar(factor * self.scale)
            .reshape([out_ch, in_ch, kh, kw])
    }
}

/// `‖W + ΔW‖` per output channel (over `[in, kh, kw]`), `[out]`, in f32, plus f32's epsilon.
fn kernel_norms<B: Backend>(weight: Tensor<B, 4>, delta: Tensor<B, 4>) -> Tensor<B, 1> {
    let [out_ch, in_ch, kh, kw] = weight.dims();
    let w = cast_to(weight.detach(), DType::F32) + delta;
    w.reshape([out_ch, in_ch * kh * kw]).powi_scalar(2).sum_dim(1).sqrt().reshape([out_ch]).add_scalar(f32::EPSILON)
}

/// `v` `[c]` cast to `dtype` and shaped `[1, c, 1, 1]`, to scale channels.
fn per_channel<B: Backend>(v: Tensor<B, 1>, dtype: DType) -> Tensor<B, 4> {
    let c = v.dims()[0];
    cast_to(v, dtype).reshape([1, c, 1, 1])
}

/// What the base convolution adds to its output besides its bias.
enum Addend<B: Backend> {
    None,
    /// `[N, K, OH, OW]` or `[N, K, 1, 1]`.
    Full(Tensor<B, 4>),
    /// `[N, K]` at every pixel.
    Channels(Tensor<B, 2>),
}

/// A frozen 2-d convolution with an optional LoCon adapter; the conv counterpart of
/// [`crate::LoraLinear`].
///
/// ```
/// use burn::backend::Flex;
/// use burn::nn::conv::Conv2dConfig;
/// use burn::nn::PaddingConfig2d;
/// use lora_core::{LoraConfig, LoraConv2d};
///
/// let device = Default::default();
/// let base = Conv2dConfig::new([4, 8], [3, 3])
///     .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
///     .init::<Flex>(&device);
/// let mut layer = LoraConv2d::new(base);
/// layer.attach_new(&LoraConfig::new(2), &device).unwrap();
/// let plain = layer.merged(); // a burn `Conv2d` with W + ΔW
/// assert_eq!(plain.weight.dims(), [8, 4, 3, 3]);
/// ```
#[derive(Module, Debug)]
pub struct LoraConv2d<B: Backend> {
    /// The frozen base convolution.
    pub base: Conv2d<B>,
    /// The adapter, if one is attached.
    pub adapter: Option<Conv2dAdapter<B>>,
    /// The adapter, if a LyCORIS LoHa or LoKr is attached (never both).
    pub lycoris: Option<LycorisAdapter<B>>,
    /// Strength of the adapter at run time (1.0 = as trained).
    pub multiplier: f32,
    /// Whether the adapter is currently folded into `base`.
    merged: bool,
    /// The base kernel a merged DoRA adapter replaced, restored by unmerging (as
    /// [`crate::LoraLinear`]'s).
    merged_base: Option<Tensor<B, 4>>,
}

impl<B: Backend> LoraConv2d<B> {
    /// Wraps a convolution and freezes its parameters.
    pub fn new(base: Conv2d<B>) -> Self {
        Self {
            base: base.no_grad(),
            adapter: None,
            lycoris: None,
            multiplier: 1.0,
            merged: false,
            merged_base: None,
        }
    }

    /// Attaches a freshly initialised adapter, replacing any previous one. With
    /// [`LoraConfig::dora`], its magnitude starts at the base kernel's norms.
    pub fn attach_new(&mut self, config: &LoraConfig, device: &B::Device) -> Result<()> {
        if config.algo.is_lycoris() {
            check_base(&self.base, "<new>")?;
            let adapter = LycorisAdapter::new(config, self.base.weight.dims(), true, device)?;
            return self.attach_lycoris(adapter, "<new>");
        }
        let mut adapter = Conv2dAdapter::new(config, &self.base, device)?;
        self.detach();
        if config.dora {
            let norms = kernel_norms(self.base.weight.val(), adapter.delta_weight_detached());
            adapter.magnitude = Some(Param::from_tensor(norms.detach().to_device(device)));
        }
        self.attach(adapter, "<new>")
    }

    /// Attaches an adapter, checking that it fits the base kernel; `key` names it in errors.
    pub fn attach(&mut self, adapter: Conv2dAdapter<B>, key: &str) -> Result<()> {
        let [out_ch, in_ch, kh, kw] = self.base.weight.dims();
        let [_, a_in, a_kh, a_kw] = adapter.down.weight.dims();
        let a_out = adapter.up.weight.dims()[0];
        if (a_out, a_in, a_kh, a_kw) != (out_ch, in_ch, kh, kw)
            || adapter.down.stride != self.base.stride
            || adapter.down.dilation != self.base.dilation
            || adapter.down.padding != self.base.padding
        {
            return Err(LoraError::ShapeMismatch {
                key: key.into(),
                reason: format!(
                    "layer is {in_ch}→{out_ch} with kernel {kh}x{kw}, adapter is {a_in}→{a_out} with kernel {a_kh}x{a_kw} (stride, padding and dilation must match too)"
                ),
            });
        }
        self.unmerge_in_place();
        self.lycoris = None;
        self.adapter = Some(adapter);
        Ok(())
    }

    /// Attaches a LyCORIS adapter (unmerging and dropping any previous one), checking that
    /// it fits the base kernel; `key` names it in errors.
    pub fn attach_lycoris(&mut self, adapter: LycorisAdapter<B>, key: &str) -> Result<()> {
        check_base(&self.base, key)?;
        let [out_ch, in_ch, kh, kw] = self.base.weight.dims();
        let [a_out, a_in, a_kh, a_kw] = adapter.shape();
        if [a_out, a_in, a_kh, a_kw] != [out_ch, in_ch, kh, kw] || !adapter.is_conv() {
            return Err(LoraError::ShapeMismatch {
                key: key.into(),
                reason: format!("layer is {in_ch}→{out_ch} with kernel {kh}x{kw}, the {} adapter is {a_in}→{a_out} with kernel {a_kh}x{a_kw}", adapter.algo().name()),
            });
        }
        self.unmerge_in_place();
        self.adapter = None;
        self.lycoris = Some(adapter);
        Ok(())
    }

    /// Attaches an adapter read from a file: a LyCORIS one ([`LoraWeights::lycoris`],
    /// without DoRA) as its own factors, anything else as a LoRA.
    pub fn attach_weights(&mut self, weights: &LoraWeights, key: &str, device: &B::Device) -> Result<()> {
        if let (Some(lycoris), None) = (&weights.lycoris, &weights.magnitude) {
            check_base(&self.base, key)?;
            let adapter = LycorisAdapter::from_weights(lycoris, self.base.weight.dims(), true, key, device)?;
            return self.attach_lycoris(adapter, key);
        }
        let adapter = Conv2dAdapter::from_weights(weights, &self.base, key, device)?;
        self.attach(adapter, key)
    }

    /// Removes the adapter (unmerging it first) and returns it if it is a LoRA (a LyCORIS
    /// adapter is dropped).
    pub fn detach(&mut self) -> Option<Conv2dAdapter<B>> {
        self.unmerge_in_place();
        self.lycoris = None;
        self.adapter.take()
    }

    /// Sets the run-time strength, keeping a merged adapter merged at the new strength.
    pub fn set_multiplier(&mut self, multiplier: f32) {
        let was_merged = self.merged;
        self.unmerge_in_place();
        self.multiplier = multiplier;
        if was_merged {
            self.merge_in_place();
        }
    }

    /// Whether the adapter is folded into the base weight.
    pub fn is_merged(&self) -> bool {
        self.merged
    }

    /// Folds `multiplier · ΔW` into the base kernel; `forward` then skips the adapter. A
    /// DoRA adapter merges as in [`crate::LoraLinear::merge_in_place`] (keeping the base
    /// kernel outside the module's parameters until unmerged).
    pub fn merge_in_place(&mut self) {
        if self.merged {
            return;
        }
        if let Some(lycoris) = &self.lycoris {
            self.base.weight = fold_delta(self.base.weight.clone(), lycoris.delta_weight::<4>(self.multiplier), 1.0);
            self.merged = true;
        }
        if let Some(adapter) = &self.adapter {
            let k = self.multiplier;
            match adapter.dora_gain(self.base.weight.val()) {
                Some(gain) => {
                    let delta = adapter.delta_weight(1.0).detach();
                    let g = gain.detach().reshape([delta.dims()[0], 1, 1, 1]);
                    self.merged_base = Some(self.base.weight.val());
                    self.base.weight = update_frozen(self.base.weight.clone(), |w| {
                        let dtype = w.dtype();
                        let merged = cast_to(w, DType::F32) * g.clone().sub_scalar(1.0).mul_scalar(k).add_scalar(1.0) + delta * g.mul_scalar(k);
                        cast_to(merged, dtype)
                    });
                }
                None => {
                    let delta = adapter.delta_weight(k);
                    self.base.weight = fold_delta(self.base.weight.clone(), delta, 1.0);
                }
            }
            self.merged = true;
        }
    }

    /// Folds the adapter into the base weights for good and drops it: the layer becomes a
    /// plain frozen layer with `W + multiplier · ΔW` (for exporting a merged checkpoint).
    pub fn bake(&mut self) {
        self.merge_in_place();
        self.adapter = None;
        self.lycoris = None;
        self.merged = false;
        self.merged_base = None;
        // A plain layer again: an adapter attached later runs at full strength.
        self.multiplier = 1.0;
    }

    /// Subtracts the merged update again.
    pub fn unmerge_in_place(&mut self) {
        if !self.merged {
            return;
        }
        if let Some(base) = self.merged_base.take() {
            self.base.weight = update_frozen(self.base.weight.clone(), |_| base);
        } else if let Some(adapter) = &self.adapter {
            let delta = adapter.delta_weight(self.multiplier);
            self.base.weight = fold_delta(self.base.weight.clone(), delta, -1.0);
        } else if let Some(lycoris) = &self.lycoris {
            self.base.weight = fold_delta(self.base.weight.clone(), lycoris.delta_weight::<4>(self.multiplier), -1.0);
        }
        self.merged = false;
    }

    /// A plain `Conv2d` with `W + multiplier · ΔW` (the layer itself is unchanged).
    pub fn merged(&self) -> Conv2d<B> {
        let mut copy = self.clone();
        copy.merge_in_place();
        copy.base
    }

    /// Consumes the wrapper, returning the base conv with the adapter merged in.
    pub fn into_merged(mut self) -> Conv2d<B> {
        self.merge_in_place();
        self.base
    }

    /// Recovers the unmerged layer from a merged `Conv2d` and the adapter merged into it
    /// at strength `multiplier`. Not for DoRA adapters (an error, as
    /// [`crate::LoraLinear::unmerge`]).
    pub fn unmerge(merged: Conv2d<B>, adapter: Conv2dAdapter<B>, multiplier: f32) -> Result<Self> {
        if adapter.is_dora() {
            return Err(LoraError::Unsupported("unmerging a DoRA adapter from a plain merged convolution (the base kernel's norms are lost); use LoraConv2d::unmerge_in_place".into()));
        }
        let mut layer = Self::new(merged);
        layer.multiplier = multiplier;
        layer.attach(adapter, "<unmerge>")?;
        layer.merged = true;
        layer.unmerge_in_place();
        Ok(layer)
    }

    /// `base(x)` plus the adapter's contribution (unless merged or absent).
    pub fn forward(&self, x: Tensor<B, 4>) -> Tensor<B, 4> {
        self.with_delta(x, Addend::None)
    }

    /// The base convolution plus `addend`, plus the adapter's contribution (unless merged or
    /// absent).
    fn with_delta(&self, x: Tensor<B, 4>, addend: Addend<B>) -> Tensor<B, 4> {
        let base_op = |x: Tensor<B, 4>, addend: Addend<B>| match addend {
            Addend::None => crate::kernels::conv2d(&self.base, x),
            Addend::Full(a) => crate::kernels::conv2d_add(&self.base, x, a),
            Addend::Channels(c) => crate::kernels::conv2d_add_channels(&self.base, x, c),
        };
        if let Some(lycoris) = self.lycoris.as_ref().filter(|_| !self.merged && self.multiplier != 0.0) {
            let weight = self.base.weight.val();
            if weight.dtype() != DType::F32 {
                // As LyCORIS: the base convolution plus one with `k·ΔW`, so that the update
                // keeps its own precision (`W + ΔW` in bf16 / f16 would round it to W's).
                let delta = lycoris.forward_delta::<4>(self.multiplier, x.dtype(), &x.device());
                return base_op(x.clone(), addend) + conv_with_weight(&self.base, x, delta, false);
            }
            // An f32 base: one convolution with the updated kernel `W + k·ΔW`.
            let delta = lycoris.forward_delta::<4>(self.multiplier, DType::F32, &x.device());
            let y = conv_with_weight(&self.base, x, weight + delta, true);
            return match addend {
                Addend::None => y,
                Addend::Full(a) => y + a,
                Addend::Channels(c) => {
                    let [n, ch] = c.dims();
                    y + c.reshape([n, ch, 1, 1])
                }
            };
        }
        match &self.adapter {
            Some(adapter) if !self.merged && self.multiplier != 0.0 && adapter.is_dora() => self.forward_dora(adapter, x, addend),
            Some(adapter) if !self.merged && self.multiplier != 0.0 => {
                let delta = adapter.forward(x.clone(), self.multiplier);
                base_op(x, addend) + delta
            }
            _ => base_op(x, addend),
        }
    }

    /// The layer with a DoRA adapter at multiplier `k`: `conv(x, W) + b + k·((g − 1) ⊙
    /// conv(x, W) + g ⊙ Δ(x)) + addend`, with the gain on the output channels (as
    /// [`crate::LoraLinear`]'s DoRA path).
    fn forward_dora(&self, adapter: &Conv2dAdapter<B>, x: Tensor<B, 4>, addend: Addend<B>) -> Tensor<B, 4> {
        let dtype = x.dtype();
        let k = self.multiplier;
        let gain = adapter.dora_gain(self.base.weight.val()).expect("a DoRA adapter");
        // The kernel alone: the gain scales `x * W`, not the bias or the addend.
        let mut kernel = self.base.clone();
        kernel.bias = None;
        let xw = crate::kernels::conv2d(&kernel, x.clone());
        // Input dropout reaches the update's base term too, as PEFT's (see `LoraLinear`).
        let (x_branch, xw_update) = match adapter.dropout.prob > 0.0 && B::ad_enabled(&x.device()) {
            true => {
                let dropped = adapter.dropout.forward(x);
                (dropped.clone(), crate::kernels::conv2d(&kernel, dropped))
            }
            false => (x, xw.clone()),
        };
        let branch = adapter.forward_dropped(x_branch, 1.0, 0.0);
        let update = xw_update * per_channel(gain.clone().sub_scalar(1.0).mul_scalar(k), dtype) + branch * per_channel(gain.mul_scalar(k), dtype);
        let update = match crate::rank_dropout::mask::<B>(0.0, adapter.module_dropout, 1, 1, &update.device()) {
            Some(keep) => update * cast_to(keep, dtype).reshape([1, 1, 1, 1]),
            None => update,
        };
        let y = xw + update;
        let y = match &self.base.bias {
            Some(bias) => y + per_channel(bias.val(), dtype),
            None => y,
        };
        match addend {
            Addend::None => y,
            Addend::Full(a) => y + a,
            Addend::Channels(c) => {
                let [n, ch] = c.dims();
                y + c.reshape([n, ch, 1, 1])
            }
        }
    }

    /// `forward(x) + addend`, the addition done by the base convolution's op (see
    /// [`crate::kernels::conv2d_add`]): `addend` is `[N, K, OH, OW]` (a residual) or
    /// `[N, K, 1, 1]` (per sample and channel, as a ResNet block's time embedding).
    ///
    /// ```
    /// use burn::backend::Flex;
    /// use burn::nn::conv::Conv2dConfig;
    /// use burn::tensor::{Distribution, Tensor};
    /// use lora_core::LoraConv2d;
    ///
    /// let device = Default::default();
    /// let conv = LoraConv2d::new(Conv2dConfig::new([4, 8], [1, 1]).init::<Flex>(&device));
    /// let x = Tensor::<Flex, 4>::random([2, 4, 5, 5], Distribution::Default, &device);
    /// let skip = Tensor::<Flex, 4>::random([2, 8, 5, 5], Distribution::Default, &device);
    /// let err: f32 = (conv.forward_add(x.clone(), skip.clone()) - (conv.forward(x) + skip)).abs().max().into_scalar();
    /// assert!(err < 1e-5);
    /// ```
    pub fn forward_add(&self, x: Tensor<B, 4>, addend: Tensor<B, 4>) -> Tensor<B, 4> {
        self.with_delta(x, Addend::Full(addend))
    }

    /// `forward(x)` plus `per_channel [N, K]` at every pixel (see
    /// [`crate::kernels::conv2d_add_channels`]): a ResNet block's time embedding.
    ///
    /// ```
    /// use burn::backend::Flex;
    /// use burn::nn::conv::Conv2dConfig;
    /// use burn::tensor::{Distribution, Tensor};
    /// use lora_core::LoraConv2d;
    ///
    /// let device = Default::default();
    /// let conv = LoraConv2d::new(Conv2dConfig::new([4, 8], [1, 1]).init::<Flex>(&device));
    /// let x = Tensor::<Flex, 4>::random([2, 4, 5, 5], Distribution::Default, &device);
    /// let temb = Tensor::<Flex, 2>::random([2, 8], Distribution::Default, &device);
    /// let expected = conv.forward(x.clone()) + temb.clone().reshape([2, 8, 1, 1]);
    /// let err: f32 = (conv.forward_add_channels(x, temb) - expected).abs().max().into_scalar();
    /// assert!(err < 1e-5);
    /// ```
    pub fn forward_add_channels(&self, x: Tensor<B, 4>, per_channel: Tensor<B, 2>) -> Tensor<B, 4> {
        self.with_delta(x, Addend::Channels(per_channel))
    }
}

/// Leading and trailing padding of one spatial axis (burn's rule for `Same`).
fn padding_pair(padding: &PaddingConfig2d, axis: usize, size: usize, kernel: usize, stride: usize) -> (usize, usize) {
    match padding {
        PaddingConfig2d::Valid => (0, 0),
        PaddingConfig2d::Explicit(top, left, bottom, right) => {
            if axis == 0 {
                (*top, *bottom)
            } else {
                (*left, *right)
            }
        }
        PaddingConfig2d::Same => {
            let out = size.div_ceil(stride);
            let total = if out > 0 { ((out - 1) * stride + kernel).saturating_sub(size) } else { 0 };
            (total / 2, total - total / 2)
        }
    }
}

/// `conv.forward(x)` with the weight cast to `dtype` inside the graph, so the gradient
/// still reaches the (f32) parameter.
fn conv_in_dtype<B: Backend>(conv: &Conv2d<B>, x: Tensor<B, 4>, dtype: DType) -> Tensor<B, 4> {
    let weight = conv.weight.val();
    if weight.dtype() == dtype {
        return conv.forward(x);
    }
    conv_with_weight(conv, x, cast_to(weight, dtype), true)
}

/// `conv`'s convolution (its stride, padding, dilation and groups, and its bias if `bias`)
/// with `weight` instead of its own kernel; the bias is cast to `x`'s dtype.
fn conv_with_weight<B: Backend>(conv: &Conv2d<B>, x: Tensor<B, 4>, weight: Tensor<B, 4>, bias: bool) -> Tensor<B, 4> {
    let dtype = x.dtype();
    let [_, _, h, w] = x.dims();
    let (top, bottom) = padding_pair(&conv.padding, 0, h, conv.kernel_size[0], conv.stride[0]);
    let (left, right) = padding_pair(&conv.padding, 1, w, conv.kernel_size[1], conv.stride[1]);
    let options = PaddedConvOptions::asymmetric(conv.stride, [top, left], [bottom, right], conv.dilation, conv.groups);
    let bias = conv.bias.as_ref().filter(|_| bias).map(|b| cast_to(b.val(), dtype));
    conv2d(x, weight, bias, options)
}
