//! LoRA for 2-d convolutions (LoCon), with LyCORIS' Tucker form (`lora_mid`).

use burn::module::{Initializer, Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Dropout, DropoutConfig, PaddingConfig2d};
use burn::tensor::module::conv2d;
use burn::tensor::ops::PaddedConvOptions;
use burn::tensor::DType;
use burn::tensor::{backend::Backend, Tensor};

use crate::dylora::{live_chunk, DyLora};
use crate::init::{Draw, InitRng};
use crate::linear::{adapter_for_bias, down_draw, fold_bias, fold_delta, frozen_if, update_frozen, updated_bias};
use crate::precision::cast_to;
use crate::lycoris::LycorisAdapter;
use crate::{Algo, HostTensor, LoraConfig, LoraError, LoraWeights, LycorisWeights, Result};

/// The trainable part of a LoRA conv layer.
///
/// `down` is a convolution with the base layer's kernel size, stride, padding and dilation
/// (`in → rank`); `up` is a 1x1 convolution (`rank → out`). Their composition is a
/// convolution with kernel `ΔW[o,i,kh,kw] = scale · Σ_r up[o,r] · down[r,i,kh,kw]`.
///
/// In LyCORIS' Tucker form ([`LoraConfig::use_tucker`], a kernel larger than 1x1) `down`
/// is a 1x1 convolution (`[rank, in, 1, 1]`) and `mid`, the core, carries the kernel:
/// `up(mid(down(x)))`, with `ΔW[o,i,kh,kw] = scale · Σ_rs up[o,r] · mid[r,s,kh,kw] ·
/// down[s,i]`, LyCORIS' `lora_down` / `lora_mid` / `lora_up`.
#[derive(Module, Debug)]
pub struct Conv2dAdapter<B: Backend> {
    /// Down convolution `in → rank` (weights `[rank, in, kh, kw]`; with a Tucker core
    /// `[rank, in, 1, 1]`, stride 1 and no padding).
    pub down: Conv2d<B>,
    /// The Tucker core (`lora_mid`): a `rank → rank` convolution with the base layer's
    /// kernel size, stride, padding and dilation (weights `[rank, rank, kh, kw]`), between
    /// `down` and `up`; `None` for a plain LoCon.
    pub mid: Option<Conv2d<B>>,
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
    /// Rank dropout drops rows of `ΔW` once per pass, as LyCORIS' LoCon
    /// ([`LoraConfig::lycoris_rank_dropout`]), instead of kohya's rank components.
    pub lycoris_rank_dropout: bool,
    /// With [`lycoris_rank_dropout`](Self::lycoris_rank_dropout): the kept rows are divided
    /// by the share kept ([`LoraConfig::rank_dropout_scale`]).
    pub rank_dropout_scale: bool,
    /// kohya's module dropout probability ([`LoraConfig::module_dropout`]; autodiff backends only).
    pub module_dropout: f64,
    /// DoRA's magnitude `m`, `[out]`, trained (see [`LoraConfig::dora`]); `None` for plain
    /// LoRA. Set from the base kernel by [`LoraConv2d::attach_new`].
    pub magnitude: Option<Param<Tensor<B, 1>>>,
    /// DyLoRA's unit and drawn chunk ([`crate::dylora`]); `None` for plain LoRA.
    #[module(skip)]
    pub dylora: Option<DyLora>,
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

/// A convolution `channels[0] → channels[1]` with `base`'s kernel size, stride, padding
/// and dilation, without bias.
fn kernel_config<B: Backend>(base: &Conv2d<B>, channels: [usize; 2]) -> Conv2dConfig {
    let [_, _, kh, kw] = base.weight.dims();
    Conv2dConfig::new(channels, [kh, kw])
        .with_stride(base.stride)
        .with_dilation(base.dilation)
        .with_padding(base.padding.clone())
        .with_bias(false)
}

fn down_config<B: Backend>(base: &Conv2d<B>, rank: usize) -> Conv2dConfig {
    kernel_config(base, [base.weight.dims()[1], rank])
}

/// A bias-free 1x1 convolution `channels[0] → channels[1]` (stride 1, no padding).
fn pointwise(channels: [usize; 2]) -> Conv2dConfig {
    Conv2dConfig::new(channels, [1, 1]).with_bias(false)
}

impl<B: Backend> Conv2dAdapter<B> {
    /// A freshly initialised adapter for `base` (up is zero).
    pub fn new(config: &LoraConfig, base: &Conv2d<B>, device: &B::Device) -> Result<Self> {
        check_base(base, "<new>")?;
        let [out_ch, in_ch, kh, kw] = base.weight.dims();
        config.validate()?;
        config.check_rank_for(out_ch, in_ch * kh * kw)?;
        let rank = config.rank;
        let mut rng = InitRng::new(config);
        let zeros = |c: Conv2dConfig| c.with_initializer(Initializer::Zeros).init(device);
        // LyCORIS: only a kernel larger than 1x1 gets a Tucker core.
        let (mut down, mid) = if config.use_tucker && kh * kw > 1 {
            let mut down = zeros(pointwise([in_ch, rank]));
            down.weight = rng.param([rank, in_ch, 1, 1], down_draw(config, in_ch, in_ch), device);
            // LyCORIS initialises the core as `lora_down`, Kaiming-uniform (fan-in
            // `rank · kh · kw`).
            let mut mid = zeros(kernel_config(base, [rank, rank]));
            mid.weight = rng.param([rank, rank, kh, kw], Draw::kaiming(rank * kh * kw), device);
            (down, Some(mid))
        } else {
            let mut down = zeros(down_config(base, rank));
            down.weight = rng.param([rank, in_ch, kh, kw], down_draw(config, in_ch, in_ch * kh * kw), device);
            (down, None)
        };
        let up = pointwise([rank, out_ch]).with_initializer(Initializer::Zeros).init(device);
        down.weight = frozen_if(down.weight, config.lora_fa);
        Ok(Self {
            down,
            mid,
            up,
            dropout: DropoutConfig::new(config.dropout).init(),
            network_dropout: DropoutConfig::new(config.network_dropout).init(),
            scale: config.scale(),
            rank_dropout: config.rank_dropout,
            lycoris_rank_dropout: config.lycoris_rank_dropout,
            rank_dropout_scale: config.rank_dropout_scale,
            module_dropout: config.module_dropout,
            magnitude: None,
            dylora: config.dylora_unit.map(DyLora::new),
        })
    }

    /// Builds an adapter for `base` from file weights (`down [rank, in, kh, kw]`,
    /// `up [out, rank, 1, 1]`; 2-d weights are accepted, `down` with the kernel flattened
    /// into its columns, `[rank, in·kh·kw]`, as LyCORIS stores it). Weights in LyCORIS'
    /// Tucker form ([`crate::LycorisWeights::is_tucker_locon`]) make an adapter with a core.
    pub fn from_weights(
        weights: &LoraWeights,
        base: &Conv2d<B>,
        key: &str,
        device: &B::Device,
    ) -> Result<Self> {
        weights.validate(key)?;
        check_base(base, key)?;
        if let Some(tucker) = weights.lycoris.as_ref().filter(|l| l.is_tucker_locon()) {
            return Self::from_tucker(weights, tucker, base, key, device);
        }
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
            mid: None,
            up: up_conv,
            dropout: DropoutConfig::new(0.0).init(),
            network_dropout: DropoutConfig::new(0.0).init(),
            scale: weights.scale(),
            rank_dropout: 0.0,
            lycoris_rank_dropout: false,
            rank_dropout_scale: false,
            module_dropout: 0.0,
            magnitude,
            dylora: None,
        })
    }

    /// The adapter in file layout (4-d tensors); `alpha = scale · rank`. With a Tucker
    /// core, `down` is the LoCon of the same update (the core folded into it) and
    /// [`LoraWeights::lycoris`] holds the adapter's own `lora_down.weight`,
    /// `lora_mid.weight` and `lora_up.weight`, which the kohya-layout writer writes.
    pub fn to_weights(&self) -> Result<LoraWeights> {
        let magnitude = match &self.magnitude {
            Some(m) => Some(HostTensor::from_tensor(m.val())?),
            None => None,
        };
        let alpha = self.scale * self.rank() as f32;
        let up = HostTensor::from_tensor(cast_to(self.up.weight.val(), DType::F32))?;
        let lycoris = match &self.mid {
            Some(mid) => Some(LycorisWeights {
                algo: Algo::Lora,
                tensors: vec![
                    ("lora_down.weight".into(), HostTensor::from_tensor(cast_to(self.down.weight.val(), DType::F32))?),
                    ("lora_mid.weight".into(), HostTensor::from_tensor(cast_to(mid.weight.val(), DType::F32))?),
                    ("lora_up.weight".into(), up.clone()),
                ],
                alpha,
            }),
            None => None,
        };
        Ok(LoraWeights {
            down: HostTensor::from_tensor(self.down_kernel(false))?,
            up,
            alpha,
            magnitude,
            lycoris,
        })
    }

    /// An adapter with a Tucker core from `tucker`'s `lora_down` `[r, in, 1, 1]`,
    /// `lora_mid` `[r, r, kh, kw]` and `lora_up` `[out, r, 1, 1]` (2-d halves accepted).
    fn from_tucker(weights: &LoraWeights, tucker: &LycorisWeights, base: &Conv2d<B>, key: &str, device: &B::Device) -> Result<Self> {
        let [out_ch, in_ch, kh, kw] = base.weight.dims();
        let get = |name: &str| tucker.get(name).ok_or_else(|| LoraError::ShapeMismatch { key: key.into(), reason: format!("the Tucker LoCon has no `{name}`") });
        let (down, mid, up) = (get("lora_down.weight")?, get("lora_mid.weight")?, get("lora_up.weight")?);
        let rank = down.shape.first().copied().unwrap_or(0);
        let as_4d = |t: &HostTensor| match t.shape.len() {
            2 => vec![t.shape[0], t.shape[1], 1, 1],
            _ => t.shape.clone(),
        };
        let want = [vec![rank, in_ch, 1, 1], vec![rank, rank, kh, kw], vec![out_ch, rank, 1, 1]];
        let found = [as_4d(down), mid.shape.clone(), as_4d(up)];
        if rank == 0 || found != want {
            return Err(LoraError::ShapeMismatch {
                key: key.into(),
                reason: format!("layer is {in_ch}→{out_ch} with kernel {kh}x{kw}: lora_down, lora_mid and lora_up must be {want:?}, the file has {found:?}"),
            });
        }
        let upload = |t: &HostTensor, shape: Vec<usize>| HostTensor::new(shape, t.data.clone())?.to_tensor::<B, 4>(device).map(Param::from_tensor);
        let mut down_conv = pointwise([in_ch, rank]).init::<B>(device);
        down_conv.weight = upload(down, want[0].clone())?;
        let mut mid_conv = kernel_config(base, [rank, rank]).init::<B>(device);
        mid_conv.weight = upload(mid, want[1].clone())?;
        let mut up_conv = pointwise([rank, out_ch]).init::<B>(device);
        up_conv.weight = upload(up, want[2].clone())?;
        let magnitude = match &weights.magnitude {
            Some(m) => Some(Param::from_tensor(m.to_tensor::<B, 1>(device)?)),
            None => None,
        };
        Ok(Self {
            down: down_conv,
            mid: Some(mid_conv),
            up: up_conv,
            dropout: DropoutConfig::new(0.0).init(),
            network_dropout: DropoutConfig::new(0.0).init(),
            scale: tucker.scale(),
            rank_dropout: 0.0,
            lycoris_rank_dropout: false,
            rank_dropout_scale: false,
            module_dropout: 0.0,
            magnitude,
            dylora: None,
        })
    }

    /// Whether the adapter has a Tucker core (`mid`).
    pub fn is_tucker(&self) -> bool {
        self.mid.is_some()
    }

    /// The convolution that carries the kernel, stride, padding and dilation: `mid` with a
    /// Tucker core, else `down`.
    fn kernel_conv(&self) -> &Conv2d<B> {
        self.mid.as_ref().unwrap_or(&self.down)
    }

    /// `down` as a LoCon's `[rank, in, kh, kw]` kernel in f32 (with a Tucker core, the
    /// core contracted with the 1x1 `down`), detached from the autodiff graph if `detach`.
    fn down_kernel(&self, detach: bool) -> Tensor<B, 4> {
        let value = |p: &Param<Tensor<B, 4>>| {
            let v = cast_to(p.val(), DType::F32);
            if detach { v.detach() } else { v }
        };
        let down = value(&self.down.weight);
        let Some(mid) = &self.mid else { return down };
        let [rank, in_ch, _, _] = down.dims();
        let [_, _, kh, kw] = mid.weight.dims();
        let core = value(&mid.weight).reshape([rank, rank * kh * kw]);
        crate::lycoris::tucker_fold(core, down.reshape([rank, in_ch])).reshape([rank, in_ch, kh, kw])
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
        self.delta(1.0, true)
    }

    /// `factor · scale · up · down` `[out, in, kh, kw]` in f32, detached if `detach`.
    fn delta(&self, factor: f32, detach: bool) -> Tensor<B, 4> {
        let down = self.down_kernel(detach);
        let [rank, in_ch, kh, kw] = down.dims();
        let out_ch = self.up.weight.dims()[0];
        let up = cast_to(self.up.weight.val(), DType::F32);
        let up = if detach { up.detach() } else { up }.reshape([out_ch, rank]);
        up.matmul(down.reshape([rank, in_ch * kh * kw]))
            .mul_scalar(factor * self.scale)
            .reshape([out_ch, in_ch, kh, kw])
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
        if let Some((chunk, unit, dy)) = DyLora::training(self.dylora.as_ref(), self.rank()) {
            return self.forward_chunk(x, factor * dy, chunk, unit);
        }
        let h = conv_in_dtype(&self.down, x, dtype);
        // LyCORIS' Tucker form: the core follows `down`; the dropouts act on its output.
        let h = match &self.mid {
            Some(mid) => conv_in_dtype(mid, h, dtype),
            None => h,
        };
        let h = self.network_dropout.forward(h);
        let [samples, rank, _, _] = h.dims();
        let (kohya_p, lycoris_p) = crate::rank_dropout::split(self.rank_dropout, self.lycoris_rank_dropout);
        let h = match crate::rank_dropout::mask::<B>(kohya_p, module_p, samples, rank, &h.device()) {
            Some(mask) => h * cast_to(mask, dtype).reshape([samples, rank, 1, 1]),
            None => h,
        };
        let y = conv_in_dtype(&self.up, h * (factor * self.scale), dtype);
        // LyCORIS' rank dropout: rows of `ΔW`, the output channels.
        let out = self.up.weight.dims()[0];
        match crate::rank_dropout::rows::<B>(lycoris_p, self.rank_dropout_scale, out, &y.device()) {
            Some(rows) => y * cast_to(rows, dtype).reshape([1, out, 1, 1]),
            None => y,
        }
    }

    /// A DyLoRA training pass that trains chunk `chunk` of `unit` ranks (`down [r, in, kh,
    /// kw]`, `up [out, r, 1, 1]`); DyLoRA has no Tucker core and no dropouts.
    fn forward_chunk(
        &self,
        x: Tensor<B, 4>,
        factor: f32,
        chunk: usize,
        unit: usize,
    ) -> Tensor<B, 4> {
        let dtype = x.dtype();
        let down = cast_to(live_chunk(self.down.weight.val(), 0, chunk, unit), dtype);
        let up = cast_to(
            live_chunk(self.up.weight.val(), 1, chunk, unit).mul_scalar(factor * self.scale),
            dtype,
        );
        let h = conv_with_weight(&self.down, x, down, None);
        conv_with_weight(&self.up, h, up, None)
    }

    /// `ΔW` `[out, in, kh, kw]`, times `factor`, in f32 (whatever the adapter weights'
    /// dtype, as `LinearAdapter::delta_weight`), in the autodiff graph of the weights.
    pub fn delta_weight(&self, factor: f32) -> Tensor<B, 4> {
        self.delta(factor, false)
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
            base: crate::frozen::freeze(base),
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
            let mut adapter = LycorisAdapter::new(config, self.base.weight.dims(), true, device)?;
            if config.dora {
                adapter.magnitude = Some(Param::from_tensor(crate::lycoris::output_norms(self.base.weight.val()).to_device(device)));
            }
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
        let a_in = adapter.down.weight.dims()[1];
        let kernel = adapter.kernel_conv();
        let [_, _, a_kh, a_kw] = kernel.weight.dims();
        let a_out = adapter.up.weight.dims()[0];
        if (a_out, a_in, a_kh, a_kw) != (out_ch, in_ch, kh, kw)
            || kernel.stride != self.base.stride
            || kernel.dilation != self.base.dilation
            || kernel.padding != self.base.padding
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
    /// it fits the base kernel and, for a full difference, giving it the bias's where the
    /// convolution has a bias (as [`crate::LoraLinear::attach_lycoris`]); `key` names it in
    /// errors.
    pub fn attach_lycoris(&mut self, adapter: LycorisAdapter<B>, key: &str) -> Result<()> {
        check_base(&self.base, key)?;
        crate::norm::refuse_on_layer(&adapter, "convolution", key)?;
        let [out_ch, in_ch, kh, kw] = self.base.weight.dims();
        let [a_out, a_in, a_kh, a_kw] = adapter.shape();
        if [a_out, a_in, a_kh, a_kw] != [out_ch, in_ch, kh, kw] || !adapter.is_conv() {
            return Err(LoraError::ShapeMismatch {
                key: key.into(),
                reason: format!("layer is {in_ch}→{out_ch} with kernel {kh}x{kw}, the {} adapter is {a_in}→{a_out} with kernel {a_kh}x{a_kw}", adapter.algo().name()),
            });
        }
        let adapter = adapter_for_bias(adapter, self.base.bias.is_some(), "convolution", key)?;
        self.unmerge_in_place();
        self.adapter = None;
        self.lycoris = Some(adapter);
        Ok(())
    }

    /// Attaches an adapter read from a file: a LyCORIS LoHa or LoKr
    /// ([`LoraWeights::lycoris`]) as its own factors (with its DoRA magnitude, if any),
    /// anything else as a LoRA (a Tucker LoCon with its core).
    pub fn attach_weights(&mut self, weights: &LoraWeights, key: &str, device: &B::Device) -> Result<()> {
        if let Some(lycoris) = weights.lycoris.as_ref().filter(|l| l.algo.is_lycoris()) {
            check_base(&self.base, key)?;
            let mut adapter = LycorisAdapter::from_weights(lycoris, self.base.weight.dims(), true, key, device)?;
            adapter.set_magnitude(weights.magnitude.as_ref(), key, device)?;
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
            // With DoRA or an OFT the kernel is not `W + ΔW` for a fixed `ΔW`: the base is
            // kept to restore exactly.
            if lycoris.depends_on_base() {
                self.merged_base = Some(self.base.weight.val());
            }
            let update = lycoris.update::<4>(self.multiplier, self.base.weight.val()).detach();
            self.base.weight = fold_delta(self.base.weight.clone(), update, 1.0);
            self.base.bias = fold_bias(self.base.bias.take(), lycoris, self.multiplier, 1.0);
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
        if let Some(lycoris) = &self.lycoris {
            self.base.bias = fold_bias(self.base.bias.take(), lycoris, self.multiplier, -1.0);
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
                let (delta, bias_delta) = lycoris.forward_delta::<4>(self.multiplier, x.dtype(), weight);
                let y = base_op(x.clone(), addend) + conv_with_weight(&self.base, x, delta, None);
                return match bias_delta {
                    Some(b) => {
                        let out = b.dims()[0];
                        y + b.reshape([1, out, 1, 1])
                    }
                    None => y,
                };
            }
            // An f32 base: one convolution with the updated kernel `W + k·ΔW` (and, for
            // LyCORIS' full fine-tuning, bias `b + k·Δb`).
            let (delta, bias_delta) = lycoris.forward_delta::<4>(self.multiplier, DType::F32, weight.clone());
            let y = conv_with_weight(&self.base, x, weight + delta, updated_bias(self.base.bias.as_ref(), bias_delta));
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
    conv_with_weight(conv, x, cast_to(weight, dtype), conv.bias.as_ref().map(|b| b.val()))
}

/// `conv`'s convolution (its stride, padding, dilation and groups) with `bias`, if any,
/// with `weight` instead of its own kernel; the bias is cast to `x`'s dtype.
fn conv_with_weight<B: Backend>(conv: &Conv2d<B>, x: Tensor<B, 4>, weight: Tensor<B, 4>, bias: Option<Tensor<B, 1>>) -> Tensor<B, 4> {
    let dtype = x.dtype();
    let [_, _, h, w] = x.dims();
    let (top, bottom) = padding_pair(&conv.padding, 0, h, conv.kernel_size[0], conv.stride[0]);
    let (left, right) = padding_pair(&conv.padding, 1, w, conv.kernel_size[1], conv.stride[1]);
    let options = PaddedConvOptions::asymmetric(conv.stride, [top, left], [bottom, right], conv.dilation, conv.groups);
    let bias = bias.map(|b| cast_to(b, dtype));
    conv2d(x, weight, bias, options)
}
