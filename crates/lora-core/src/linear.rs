//! LoRA for linear layers.

use burn::module::{Initializer, Module, Param};
use burn::nn::{Dropout, DropoutConfig, Linear, LinearConfig};
use burn::tensor::{backend::Backend, DType, Tensor};

use crate::precision::cast_to;

use crate::dylora::{live_chunk, DyLora};
use crate::init::{Draw, InitRng};
use crate::lycoris::LycorisAdapter;
use crate::{HostTensor, LoraConfig, LoraError, LoraInit, LoraWeights, Result};

/// The distribution of the down projection of an adapter with `config`, for a layer with
/// `in_features` inputs (a convolution's input channels) and `fan_in` inputs per output
/// (times the kernel's taps).
pub(crate) fn down_draw(config: &LoraConfig, in_features: usize, fan_in: usize) -> Draw {
    if config.lora_fa {
        // LoRA-FA's frozen projection, as the paper and kohya's networks.lora_fa draw it.
        return Draw::Normal((2.0 / (in_features + config.rank) as f64).sqrt());
    }
    match config.init {
        // PyTorch's nn.Linear / nn.Conv2d default, which kohya and PEFT use for
        // lora_down / lora_A.
        LoraInit::KaimingUniform => Draw::kaiming(fan_in),
        LoraInit::Gaussian => Draw::Normal(1.0 / config.rank as f64),
    }
}

/// `param` detached and without gradient, unless `frozen` is false (LoRA-FA's `down`).
pub(crate) fn frozen_if<B: Backend, const D: usize>(param: Param<Tensor<B, D>>, frozen: bool) -> Param<Tensor<B, D>> {
    if frozen {
        param.map(|w| w.detach()).set_require_grad(false)
    } else {
        param
    }
}

/// Replaces a frozen parameter's value with `f(value)` without attaching it to any graph:
/// the result is detached and keeps the parameter's `require_grad` flag.
pub(crate) fn update_frozen<B: Backend, const D: usize>(
    param: Param<Tensor<B, D>>,
    f: impl FnOnce(Tensor<B, D>) -> Tensor<B, D>,
) -> Param<Tensor<B, D>> {
    let require_grad = param.is_require_grad();
    // Stored dense: on CUDA a new tensor has padded rows (see `kernels::packed`).
    param.map(|w| crate::kernels::packed(f(w)).detach().set_require_grad(require_grad))
}

/// A frozen weight plus `sign · delta`, summed in f32 and rounded once to the weight's
/// dtype. Adding in half precision would round the (small) update to the weight's precision
/// first and the sum again, and unmerging would then restore the weight less closely.
pub(crate) fn fold_delta<B: Backend, const D: usize>(param: Param<Tensor<B, D>>, delta: Tensor<B, D>, sign: f32) -> Param<Tensor<B, D>> {
    update_frozen(param, |w| {
        let dtype = w.dtype();
        cast_to(cast_to(w, DType::F32) + cast_to(delta, DType::F32).mul_scalar(sign), dtype)
    })
}

/// A frozen bias plus `sign · k · Δb` of LyCORIS' full fine-tuning ([`LycorisAdapter::bias_delta`]
/// at strength `k`), summed in f32 as [`fold_delta`]; the bias as it is for any other adapter.
pub(crate) fn fold_bias<B: Backend>(bias: Option<Param<Tensor<B, 1>>>, lycoris: &LycorisAdapter<B>, k: f32, sign: f32) -> Option<Param<Tensor<B, 1>>> {
    match (bias, lycoris.bias_delta(k)) {
        (Some(bias), Some(delta)) => Some(fold_delta(bias, delta.detach(), sign)),
        (bias, _) => bias,
    }
}

/// A layer's bias `bias` plus LyCORIS' full fine-tuning's update `delta` (`b + k·Δb`, in
/// f32; the bias as it is without an update), for a pass.
pub(crate) fn updated_bias<B: Backend>(bias: Option<&Param<Tensor<B, 1>>>, delta: Option<Tensor<B, 1>>) -> Option<Tensor<B, 1>> {
    let bias = bias?.val();
    Some(match delta {
        Some(d) => cast_to(bias, DType::F32) + d,
        None => bias,
    })
}

/// `adapter` as attached to a layer (`what`, for errors) with or without a bias (`bias`;
/// a norm's shift): a full difference (LyCORIS' `algo=full`) or a norm module on a layer
/// with a bias gets the bias's difference, at zero where it has none yet (LyCORIS trains
/// it, and reads a file without one so); one with a bias's difference on a layer without a
/// bias is an error naming `key`.
pub(crate) fn adapter_for_bias<B: Backend>(adapter: LycorisAdapter<B>, bias: bool, what: &str, key: &str) -> Result<LycorisAdapter<B>> {
    match (bias, adapter.bias_name().filter(|n| adapter.names().contains(n))) {
        (true, _) => Ok(adapter.with_bias_update()),
        (false, Some(name)) => Err(LoraError::ShapeMismatch { key: key.into(), reason: format!("the adapter changes a bias (`{name}`) but the {what} has none") }),
        (false, None) => Ok(adapter),
    }
}

/// The trainable part of a LoRA linear layer: `scale · up(down(dropout(x)))`.
///
/// Weights are kept in burn's `Linear` layout (`[in, rank]` and `[rank, out]`); files use
/// PyTorch's transposed layout, see [`LinearAdapter::to_weights`].
#[derive(Module, Debug)]
pub struct LinearAdapter<B: Backend> {
    /// Down projection `in → rank`, no bias.
    pub down: Linear<B>,
    /// Up projection `rank → out`, no bias, zero at initialisation.
    pub up: Linear<B>,
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
    /// How many samples the rows of a 2-d input hold, for rank dropout's per-sample masks
    /// (set per batch with [`crate::LoraSiteMut::set_samples`]; inputs of three or more
    /// dimensions take their first); 0: each row is a sample.
    pub samples: usize,
    /// DoRA's magnitude `m`, `[out]`, trained (see [`LoraConfig::dora`]); `None` for plain
    /// LoRA. Set from the base weight by [`LoraLinear::attach_new`].
    pub magnitude: Option<Param<Tensor<B, 1>>>,
    /// DyLoRA's unit and drawn chunk ([`crate::dylora`]); `None` for plain LoRA.
    #[module(skip)]
    pub dylora: Option<DyLora>,
}

impl<B: Backend> LinearAdapter<B> {
    /// A freshly initialised adapter for a layer `d_input → d_output` (up is zero).
    pub fn new(config: &LoraConfig, d_input: usize, d_output: usize, device: &B::Device) -> Result<Self> {
        config.validate()?;
        config.check_rank_for(d_output, d_input)?;
        let mut down = LinearConfig::new(d_input, config.rank)
            .with_bias(false)
            .with_initializer(Initializer::Zeros)
            .init(device);
        let weight = InitRng::new(config).param([d_input, config.rank], down_draw(config, d_input, d_input), device);
        down.weight = frozen_if(weight, config.lora_fa);
        let up = LinearConfig::new(config.rank, d_output)
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
            lycoris_rank_dropout: config.lycoris_rank_dropout,
            rank_dropout_scale: config.rank_dropout_scale,
            module_dropout: config.module_dropout,
            samples: 0,
            magnitude: None,
            dylora: config.dylora_unit.map(DyLora::new),
        })
    }

    /// Builds an adapter from file weights (`down [rank, in]`, `up [out, rank]`).
    pub fn from_weights(weights: &LoraWeights, key: &str, device: &B::Device) -> Result<Self> {
        weights.validate(key)?;
        if weights.is_conv() {
            return Err(LoraError::ShapeMismatch {
                key: key.into(),
                reason: format!(
                    "conv adapter (down {:?}) given for a linear layer",
                    weights.down.shape
                ),
            });
        }
        let down: Tensor<B, 2> = weights.down.to_tensor(device)?;
        let up: Tensor<B, 2> = weights.up.to_tensor(device)?;
        let magnitude = match &weights.magnitude {
            Some(m) => Some(Param::from_tensor(m.to_tensor::<B, 1>(device)?)),
            None => None,
        };
        Ok(Self {
            down: Linear {
                weight: Param::from_tensor(down.transpose()),
                bias: None,
            },
            up: Linear {
                weight: Param::from_tensor(up.transpose()),
                bias: None,
            },
            dropout: DropoutConfig::new(0.0).init(),
            network_dropout: DropoutConfig::new(0.0).init(),
            scale: weights.scale(),
            rank_dropout: 0.0,
            lycoris_rank_dropout: false,
            rank_dropout_scale: false,
            module_dropout: 0.0,
            samples: 0,
            magnitude,
            dylora: None,
        })
    }

    /// The adapter in file layout; `alpha = scale · rank` so every reader gets the same update.
    pub fn to_weights(&self) -> Result<LoraWeights> {
        let down = HostTensor::from_tensor(self.down.weight.val().transpose())?;
        let up = HostTensor::from_tensor(self.up.weight.val().transpose())?;
        let rank = self.rank();
        let magnitude = match &self.magnitude {
            Some(m) => Some(HostTensor::from_tensor(m.val())?),
            None => None,
        };
        Ok(LoraWeights {
            down,
            up,
            alpha: self.scale * rank as f32,
            magnitude,
            lycoris: None,
        })
    }

    /// Whether this is a DoRA adapter.
    pub fn is_dora(&self) -> bool {
        self.magnitude.is_some()
    }

    /// DoRA's gain per output, `m / ‖W + ΔW‖` `[out]` in f32, for the base weight `weight`
    /// (burn layout `[in, out]`); `None` for plain LoRA. The norm is a constant to autodiff,
    /// as in the DoRA paper (§4.3) and PEFT: the gradient reaches `m` through the gain and
    /// `down` / `up` through the adapter's own branch only, and the backward pass stores no
    /// `[in, out]` matrix.
    pub fn dora_gain(&self, weight: Tensor<B, 2>) -> Option<Tensor<B, 1>> {
        let m = self.magnitude.as_ref()?;
        let norm = column_norms(weight, self.delta_weight_detached());
        Some(cast_to(m.val(), DType::F32) / norm)
    }

    /// [`delta_weight`](Self::delta_weight) at factor 1, outside any autodiff graph.
    fn delta_weight_detached(&self) -> Tensor<B, 2> {
        let f32 = |w: Tensor<B, 2>| cast_to(w.detach(), DType::F32);
        f32(self.down.weight.val()).matmul(f32(self.up.weight.val())).mul_scalar(self.scale)
    }

    /// Rank `r`.
    pub fn rank(&self) -> usize {
        self.down.weight.dims()[1]
    }

    /// `(in, out)` features.
    pub fn features(&self) -> (usize, usize) {
        (self.down.weight.dims()[0], self.up.weight.dims()[1])
    }

    /// `factor · scale · up(down(dropout(x)))`, computed in `x`'s dtype: with a half-precision
    /// base the f32 adapter weights are cast on the fly (see [`crate::precision`]). While
    /// training, kohya's network dropout drops elements of `down(…)`, and its rank and
    /// module dropout multiply it per sample.
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>, factor: f32) -> Tensor<B, D> {
        self.forward_dropped(self.dropout.forward(x), factor, self.module_dropout)
    }

    /// [`forward`](Self::forward) on an input that has been through the input dropout,
    /// with module dropout at `module_p` (DoRA applies its own to the whole layer update).
    fn forward_dropped<const D: usize>(&self, x: Tensor<B, D>, factor: f32, module_p: f64) -> Tensor<B, D> {
        let dtype = x.dtype();
        let (mut down, mut up) = (self.down.weight.val(), self.up.weight.val());
        let mut factor = factor;
        if let Some((chunk, unit, dy)) = DyLora::training(self.dylora.as_ref(), self.rank()) {
            // DyLoRA: one chunk of ranks trains (burn's layout: `down [in, r]`, `up [r, out]`).
            (down, up) = (
                live_chunk(down, 1, chunk, unit),
                live_chunk(up, 0, chunk, unit),
            );
            factor *= dy;
        }
        let down = cast_to(down, dtype);
        // The scale goes on the `[r, out]` up weight rather than the `[rows, r]` activation:
        // with the products in custom ops (cuBLAS or the fixed matmul) either is a kernel
        // launch of its own each way, but this one reads a few thousand values instead of
        // rows × r, and with f32 adapter weights it joins their cast (burn's fusion).
        let up = cast_to(up.mul_scalar(factor * self.scale), dtype);
        let h = crate::kernels::linear_weight(x, down);
        let h = self.rank_dropout(self.network_dropout.forward(h), module_p);
        let y = crate::kernels::linear_weight(h, up);
        // LyCORIS' rank dropout: rows of `ΔW`, which are the outputs' columns here.
        match self.lycoris_rows(&y.device()) {
            Some(rows) => {
                let mut shape = [1; D];
                shape[D - 1] = rows.dims()[0];
                y * cast_to(rows, dtype).reshape(shape)
            }
            None => y,
        }
    }

    /// LyCORIS' rank dropout mask of one pass, `[out]` (see
    /// [`LoraConfig::lycoris_rank_dropout`]); `None` with kohya's, or none, or inference.
    fn lycoris_rows(&self, device: &B::Device) -> Option<Tensor<B, 1>> {
        let (_, p) = crate::rank_dropout::split(self.rank_dropout, self.lycoris_rank_dropout);
        crate::rank_dropout::rows::<B>(p, self.rank_dropout_scale, self.features().1, device)
    }

    /// Whether kohya's network, rank or module dropout is set (the layer then takes the
    /// plain composed path while training).
    pub fn has_kohya_dropout(&self) -> bool {
        self.network_dropout.prob > 0.0 || self.rank_dropout > 0.0 || self.module_dropout > 0.0
    }

    /// Whether a pass on `device` takes the composed path: kohya's dropouts while training
    /// (autodiff backends only), or a DyLoRA chunk drawn.
    fn composed_while_training(&self, device: &B::Device) -> bool {
        (B::ad_enabled(device) && self.has_kohya_dropout())
            || self.dylora.is_some_and(|d| d.chunk.is_some())
    }

    /// `h = down(x)` `[.., rank]` times the rank / module dropout mask of its samples
    /// (module dropout at `module_p`).
    fn rank_dropout<const D: usize>(&self, h: Tensor<B, D>, module_p: f64) -> Tensor<B, D> {
        let dims = h.dims();
        let rank = dims[D - 1];
        let rows = dims[..D - 1].iter().product::<usize>();
        if rows == 0 {
            return h;
        }
        let leading = (D >= 3).then(|| dims[0]);
        // Module dropout alone needs one draw per pass, not one per sample.
        let (rank_p, _) = crate::rank_dropout::split(self.rank_dropout, self.lycoris_rank_dropout);
        let groups = if rank_p > 0.0 { crate::rank_dropout::groups(rows, leading, self.samples) } else { 1 };
        let Some(mask) = crate::rank_dropout::mask::<B>(rank_p, module_p, groups, rank, &h.device()) else {
            return h;
        };
        // One mask row per sample, broadcast over the sample's rows.
        let mask = cast_to(mask, h.dtype()).reshape([groups, 1, rank]);
        (h.reshape([groups, rows / groups, rank]) * mask).reshape(dims)
    }

    /// `ΔW` in burn layout `[in, out]`, times `factor`, in f32 (whatever the adapter weights'
    /// dtype: half-precision copies of them give the update at full precision).
    pub fn delta_weight(&self, factor: f32) -> Tensor<B, 2> {
        let f32 = |w: Tensor<B, 2>| cast_to(w, DType::F32);
        f32(self.down.weight.val()).matmul(f32(self.up.weight.val())).mul_scalar(factor * self.scale)
    }
}

/// `‖W + ΔW‖` per output (column of burn's `[in, out]` layout), `[out]`, in f32, plus f32's
/// epsilon against a zero column (as LyCORIS). `delta` is f32.
pub(crate) fn column_norms<B: Backend>(weight: Tensor<B, 2>, delta: Tensor<B, 2>) -> Tensor<B, 1> {
    let d_out = weight.dims()[1];
    let w = cast_to(weight.detach(), DType::F32) + delta;
    w.powi_scalar(2).sum_dim(0).sqrt().reshape([d_out]).add_scalar(f32::EPSILON)
}

/// `v` `[n]` cast to `dtype` and shaped `[1, …, 1, n]` to scale the last axis of a `D`-d
/// tensor.
pub(crate) fn on_last_axis<B: Backend, const D: usize>(v: Tensor<B, 1>, dtype: DType) -> Tensor<B, D> {
    let mut shape = [1; D];
    shape[D - 1] = v.dims()[0];
    cast_to(v, dtype).reshape(shape)
}

/// A linear layer whose weights are frozen, with an optional LoRA adapter.
///
/// `forward(x) = base(x) + multiplier · scale · up(down(dropout(x)))`.
///
/// The adapter can be attached, detached, merged into the base weight and unmerged
/// again without rebuilding the surrounding model.
///
/// ```
/// use burn::backend::Flex;
/// use burn::nn::LinearConfig;
/// use burn::tensor::Tensor;
/// use lora_core::{LoraConfig, LoraLinear};
///
/// let device = Default::default();
/// let base = LinearConfig::new(16, 8).init::<Flex>(&device);
/// let mut layer = LoraLinear::new(base);
/// layer.attach_new(&LoraConfig::new(4).with_alpha(4.0), &device).unwrap();
/// let x = Tensor::<Flex, 2>::ones([2, 16], &device);
/// // `up` starts at zero, so the adapter does not change the output yet.
/// let y = layer.forward(x.clone());
/// let plain = layer.base.forward(x);
/// assert_eq!(y.into_data(), plain.into_data());
/// ```
#[derive(Module, Debug)]
pub struct LoraLinear<B: Backend> {
    /// The frozen base layer (its parameters do not require gradients).
    pub base: Linear<B>,
    /// The adapter, if a LoRA is attached.
    pub adapter: Option<LinearAdapter<B>>,
    /// The adapter, if a LyCORIS LoHa or LoKr is attached (never both).
    pub lycoris: Option<LycorisAdapter<B>>,
    /// Strength of the adapter at run time (1.0 = as trained).
    pub multiplier: f32,
    /// Whether the adapter is currently folded into `base`.
    merged: bool,
    /// The base weight a merged DoRA adapter replaced, restored by unmerging (a DoRA
    /// merge is not undone by subtracting, and solving for the base would divide by
    /// `1 + k·(g − 1)`, which can be 0).
    merged_base: Option<Tensor<B, 2>>,
}

impl<B: Backend> LoraLinear<B> {
    /// Wraps a linear layer and freezes its parameters.
    pub fn new(base: Linear<B>) -> Self {
        Self {
            base: crate::frozen::freeze(base),
            adapter: None,
            lycoris: None,
            multiplier: 1.0,
            merged: false,
            merged_base: None,
        }
    }

    /// `(in, out)` features of the base layer.
    pub fn features(&self) -> (usize, usize) {
        let [i, o] = self.base.weight.dims();
        (i, o)
    }

    /// Attaches a freshly initialised adapter, replacing any previous one. With
    /// [`LoraConfig::dora`], its magnitude starts at the base weight's norms, so the layer's
    /// output is unchanged.
    pub fn attach_new(&mut self, config: &LoraConfig, device: &B::Device) -> Result<()> {
        let (i, o) = self.features();
        if config.algo.is_lycoris() {
            let mut adapter = LycorisAdapter::new(config, [o, i, 1, 1], false, device)?;
            if config.dora {
                adapter.magnitude = Some(Param::from_tensor(crate::lycoris::output_norms(self.base.weight.val()).to_device(device)));
            }
            return self.attach_lycoris(adapter, "<new>");
        }
        let mut adapter = LinearAdapter::new(config, i, o, device)?;
        self.detach();
        if config.dora {
            let norms = column_norms(self.base.weight.val(), adapter.delta_weight_detached());
            adapter.magnitude = Some(Param::from_tensor(norms.detach().to_device(device)));
        }
        self.attach(adapter, "<new>")
    }

    /// Attaches an adapter (unmerging the previous one first), checking its shape; `key`
    /// names it in errors.
    pub fn attach(&mut self, adapter: LinearAdapter<B>, key: &str) -> Result<()> {
        let (i, o) = self.features();
        if adapter.features() != (i, o) {
            return Err(LoraError::ShapeMismatch {
                key: key.into(),
                reason: format!(
                    "layer is {i}→{o} but adapter is {}→{}",
                    adapter.features().0,
                    adapter.features().1
                ),
            });
        }
        self.unmerge_in_place();
        self.lycoris = None;
        self.adapter = Some(adapter);
        Ok(())
    }

    /// Attaches a LyCORIS adapter (unmerging and dropping any previous one), checking its
    /// shape and, for a full difference, giving it the bias's where the layer has a bias
    /// (a bias's difference for a layer without one is an error); `key` names it in errors.
    pub fn attach_lycoris(&mut self, adapter: LycorisAdapter<B>, key: &str) -> Result<()> {
        crate::norm::refuse_on_layer(&adapter, "linear layer", key)?;
        let (i, o) = self.features();
        let [a_out, a_in, kh, kw] = adapter.shape();
        if (a_out, a_in, kh * kw) != (o, i, 1) || adapter.is_conv() {
            return Err(LoraError::ShapeMismatch {
                key: key.into(),
                reason: format!("layer is {i}→{o} but the {} adapter is {a_in}→{a_out} with kernel {kh}x{kw}", adapter.algo().name()),
            });
        }
        let adapter = adapter_for_bias(adapter, self.base.bias.is_some(), "layer", key)?;
        self.unmerge_in_place();
        self.adapter = None;
        self.lycoris = Some(adapter);
        Ok(())
    }

    /// Attaches an adapter read from a file: a LyCORIS LoHa or LoKr
    /// ([`LoraWeights::lycoris`]) as its own factors (with its DoRA magnitude, if any),
    /// anything else as a LoRA.
    pub fn attach_weights(&mut self, weights: &LoraWeights, key: &str, device: &B::Device) -> Result<()> {
        if let Some(lycoris) = weights.lycoris.as_ref().filter(|l| l.algo.is_lycoris()) {
            let (i, o) = self.features();
            let mut adapter = LycorisAdapter::from_weights(lycoris, [o, i, 1, 1], false, key, device)?;
            adapter.set_magnitude(weights.magnitude.as_ref(), key, device)?;
            return self.attach_lycoris(adapter, key);
        }
        let adapter = LinearAdapter::from_weights(weights, key, device)?;
        self.attach(adapter, key)
    }

    /// Removes the adapter (unmerging it first) and returns it if it is a LoRA (a LyCORIS
    /// adapter is dropped).
    pub fn detach(&mut self) -> Option<LinearAdapter<B>> {
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

    /// Whether an adapter (LoRA or LyCORIS) takes part in `forward`: attached, not merged,
    /// at a multiplier other than 0. Paths that compute the base layer alone (fused ops on
    /// its weight) may run only when this is false.
    ///
    /// ```
    /// use burn::backend::Flex;
    /// use burn::nn::LinearConfig;
    /// use lora_core::{Algo, LoraConfig, LoraLinear};
    /// let device = Default::default();
    /// let mut layer = LoraLinear::<Flex>::new(LinearConfig::new(4, 4).init(&device));
    /// assert!(!layer.has_active_adapter());
    /// layer.attach_new(&LoraConfig::new(2).with_algo(Algo::Loha), &device).unwrap();
    /// assert!(layer.has_active_adapter());
    /// layer.merge_in_place();
    /// assert!(!layer.has_active_adapter());
    /// ```
    pub fn has_active_adapter(&self) -> bool {
        (self.adapter.is_some() || self.lycoris.is_some()) && !self.merged && self.multiplier != 0.0
    }

    /// Folds `multiplier · ΔW` into the base weight; `forward` then skips the adapter.
    /// A DoRA adapter at multiplier `k` gives `W + k · (g ⊙ (W + ΔW) − W)` with its gain
    /// `g = m / ‖W + ΔW‖` (the weight moves from the base toward DoRA's, as ComfyUI and
    /// Forge apply a strength); unmerging then restores the kept base weight exactly. That
    /// copy is outside the module's parameters: casting or loading the module while a DoRA
    /// adapter is merged leaves it as it was (unmerge first, or [`bake`](Self::bake)). Does
    /// nothing without an adapter or when already merged.
    pub fn merge_in_place(&mut self) {
        if self.merged {
            return;
        }
        if let Some(lycoris) = &self.lycoris {
            // With DoRA or an OFT the weight is not `W + ΔW` for a fixed `ΔW`: the base is
            // kept to restore exactly.
            if lycoris.depends_on_base() {
                self.merged_base = Some(self.base.weight.val());
            }
            let update = lycoris.update::<2>(self.multiplier, self.base.weight.val()).detach();
            self.base.weight = fold_delta(self.base.weight.clone(), update, 1.0);
            self.base.bias = fold_bias(self.base.bias.take(), lycoris, self.multiplier, 1.0);
            self.merged = true;
        }
        if let Some(adapter) = &self.adapter {
            let k = self.multiplier;
            match adapter.dora_gain(self.base.weight.val()) {
                Some(gain) => {
                    let delta = adapter.delta_weight(1.0).detach();
                    let g = gain.detach().reshape([1, delta.dims()[1]]);
                    self.merged_base = Some(self.base.weight.val());
                    self.base.weight = update_frozen(self.base.weight.clone(), |w| {
                        let dtype = w.dtype();
                        let w = cast_to(w, DType::F32);
                        let merged = w.clone() * (g.clone().sub_scalar(1.0).mul_scalar(k).add_scalar(1.0)) + delta * g.mul_scalar(k);
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
    /// plain frozen layer with `W + multiplier · ΔW` (for exporting a merged checkpoint, or
    /// a base to train a new adapter on), at multiplier 1 for the next adapter.
    ///
    /// ```
    /// use burn::backend::Flex;
    /// use burn::nn::LinearConfig;
    /// use lora_core::{LoraConfig, LoraLinear};
    /// let device = Default::default();
    /// let mut layer = LoraLinear::<Flex>::new(LinearConfig::new(4, 3).init(&device));
    /// layer.attach_new(&LoraConfig::new(2), &device).unwrap();
    /// layer.set_multiplier(0.5);
    /// layer.bake();
    /// assert!(layer.adapter.is_none());
    /// assert_eq!(layer.multiplier, 1.0);
    /// ```
    pub fn bake(&mut self) {
        self.merge_in_place();
        self.adapter = None;
        self.lycoris = None;
        self.merged = false;
        self.merged_base = None;
        // A plain layer again: an adapter attached later runs at full strength.
        self.multiplier = 1.0;
    }

    /// Subtracts the merged update again, restoring the base weight (up to rounding).
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
            self.base.weight = fold_delta(self.base.weight.clone(), lycoris.delta_weight::<2>(self.multiplier), -1.0);
        }
        if let Some(lycoris) = &self.lycoris {
            self.base.bias = fold_bias(self.base.bias.take(), lycoris, self.multiplier, -1.0);
        }
        self.merged = false;
    }

    /// A plain `Linear` with `W + multiplier · ΔW` (the layer itself is unchanged).
    pub fn merged(&self) -> Linear<B> {
        let mut copy = self.clone();
        copy.merge_in_place();
        copy.base
    }

    /// Consumes the wrapper, returning the base layer with the adapter merged in.
    pub fn into_merged(mut self) -> Linear<B> {
        self.merge_in_place();
        self.base
    }

    /// Recovers the unmerged layer from a merged `Linear` and the adapter that was merged
    /// into it at strength `multiplier`. Not for DoRA adapters (an error): their merged
    /// weight does not determine the base weight's norms; keep the `LoraLinear` and call
    /// [`unmerge_in_place`](Self::unmerge_in_place).
    pub fn unmerge(merged: Linear<B>, adapter: LinearAdapter<B>, multiplier: f32) -> Result<Self> {
        if adapter.is_dora() {
            return Err(LoraError::Unsupported("unmerging a DoRA adapter from a plain merged layer (the base weight's norms are lost); use LoraLinear::unmerge_in_place".into()));
        }
        let mut layer = Self::new(merged);
        layer.multiplier = multiplier;
        layer.attach(adapter, "<unmerge>")?;
        layer.merged = true;
        layer.unmerge_in_place();
        Ok(layer)
    }

    /// `base(x)` plus the adapter's contribution (unless merged or absent).
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        self.forward_plus(x, None)
    }

    /// `forward(x) + residual` (a residual connection after the layer, as in a transformer
    /// block). The same sum as writing it out, but on fusion backends the residual joins
    /// the kernel that already adds the bias and the adapter's update (the fused matmul's
    /// epilogue without cuBLAS routing), instead of an addition kernel of its own that reads
    /// both `[.., d_out]` tensors and writes a third.
    ///
    /// ```
    /// use burn::backend::Flex;
    /// use burn::nn::LinearConfig;
    /// use burn::tensor::{Distribution, Tensor};
    /// use lora_core::LoraLinear;
    ///
    /// let device = Default::default();
    /// let layer = LoraLinear::new(LinearConfig::new(8, 6).init::<Flex>(&device));
    /// let x = Tensor::<Flex, 3>::random([2, 3, 8], Distribution::Normal(0.0, 1.0), &device);
    /// let r = Tensor::<Flex, 3>::random([2, 3, 6], Distribution::Normal(0.0, 1.0), &device);
    /// let err: f32 = (layer.forward_residual(x.clone(), r.clone()) - (layer.forward(x) + r)).abs().max().into_scalar();
    /// assert!(err < 1e-6);
    /// ```
    pub fn forward_residual<const D: usize>(&self, x: Tensor<B, D>, residual: Tensor<B, D>) -> Tensor<B, D> {
        self.forward_plus(x, Some(residual))
    }

    /// `base(x)`, plus the adapter's contribution, plus `extra`, in that order.
    fn forward_plus<const D: usize>(&self, x: Tensor<B, D>, extra: Option<Tensor<B, D>>) -> Tensor<B, D> {
        if let Some(lycoris) = self.lycoris.as_ref().filter(|_| !self.merged && self.multiplier != 0.0) {
            return self.forward_lycoris(lycoris, x, extra);
        }
        // kohya's rank / module dropout while training: per-sample masks need the input's
        // own shape, so the composed path below (none of the fused or row-wise ones).
        let masked = !self.merged && self.adapter.as_ref().is_some_and(|a| a.composed_while_training(&x.device()));
        let fusion = D >= 2 && !crate::kernels::on_flex::<B>() && !masked;
        match &self.adapter {
            Some(adapter) if !self.merged && self.multiplier != 0.0 && adapter.is_dora() => self.forward_dora(adapter, x, extra),
            Some(adapter) if !self.merged && self.multiplier != 0.0 => {
                if fusion && fused_applies(Some(adapter)) {
                    return self.forward_fused(Some(adapter), x, extra);
                }
                if fusion && !crate::kernels::matmuls_routed() {
                    return self.forward_fusable(adapter, x, extra);
                }
                if fusion && D > 2 {
                    return self.forward_rows(x, extra);
                }
                let delta = adapter.forward(x.clone(), self.multiplier);
                plus(crate::kernels::linear(&self.base, x) + delta, extra)
            }
            _ if fusion && fused_applies::<B>(None) => self.forward_fused(None, x, extra),
            _ if fusion && D > 2 && extra.is_some() => self.forward_rows(x, extra),
            _ => plus(crate::kernels::linear(&self.base, x), extra),
        }
    }

    /// [`forward_plus`](Self::forward_plus) on `x` (and `extra`) flattened to rows, for
    /// fusion backends: burn's fusion (burn-fusion 0.21) cannot reshape a tensor computed
    /// inside a fused block to a higher rank, so with the base output reshaped back to
    /// `[.., d_out]` before `+ delta` (cuBLAS route) or `+ extra`, each sum ran as a kernel
    /// of its own. On rows they are one with the bias (the output is read and written
    /// once). `extra` is flattened first: a view, queued before the matmuls.
    fn forward_rows<const D: usize>(&self, x: Tensor<B, D>, extra: Option<Tensor<B, D>>) -> Tensor<B, D> {
        let mut dims = x.dims();
        let rows = dims[..D - 1].iter().product::<usize>();
        let extra = extra.map(|e| {
            let d_out = e.dims()[D - 1];
            e.reshape([rows, d_out])
        });
        let y = self.forward_plus(x.reshape([rows, dims[D - 1]]), extra);
        dims[D - 1] = y.dims()[1];
        y.reshape(dims)
    }

    /// [`forward_plus`](Self::forward_plus) with a LyCORIS adapter: `x · (W + k·ΔW) + b`, one
    /// product with the updated weight, for an f32 base; `x · W + b + x · (k·ΔW)` for a
    /// half-precision one, as LyCORIS computes it (see [`crate::lycoris`]).
    fn forward_lycoris<const D: usize>(&self, lycoris: &LycorisAdapter<B>, x: Tensor<B, D>, extra: Option<Tensor<B, D>>) -> Tensor<B, D> {
        let weight = self.base.weight.val();
        let dtype = x.dtype();
        if weight.dtype() != DType::F32 {
            // `W + ΔW` in bf16 / f16 would round the (small) update to the weight's
            // precision; its own product keeps the update's.
            let (delta, bias_delta) = lycoris.forward_delta::<2>(self.multiplier, dtype, weight);
            let y = crate::kernels::linear(&self.base, x.clone()) + crate::kernels::linear_weight(x, delta);
            let y = match bias_delta {
                Some(b) => y + on_last_axis::<B, D>(b, dtype),
                None => y,
            };
            return plus(y, extra);
        }
        let (delta, bias_delta) = lycoris.forward_delta::<2>(self.multiplier, DType::F32, weight.clone());
        let y = crate::kernels::linear_weight(x, weight + delta);
        let y = match updated_bias(self.base.bias.as_ref(), bias_delta) {
            Some(bias) => y + on_last_axis::<B, D>(bias, dtype),
            None => y,
        };
        plus(y, extra)
    }

    /// [`forward_plus`](Self::forward_plus) with a DoRA adapter at multiplier `k`:
    /// `x·W + b + k·((g − 1) ⊙ x·W + g ⊙ Δ(x))`, PEFT's order (the base product once, the
    /// gain `g = m / ‖W + ΔW‖` on the outputs; no `[in, out]` weight in the graph). At `k = 1`
    /// it is `x · (g ⊙ (W + ΔW)) + b`. Module dropout skips the whole update.
    fn forward_dora<const D: usize>(&self, adapter: &LinearAdapter<B>, x: Tensor<B, D>, extra: Option<Tensor<B, D>>) -> Tensor<B, D> {
        let dtype = x.dtype();
        let k = self.multiplier;
        let weight = self.base.weight.val();
        let gain = adapter.dora_gain(weight.clone()).expect("a DoRA adapter");
        let xw = crate::kernels::linear_weight(x.clone(), weight.clone());
        // With input dropout while training, the update's base term takes the dropped input
        // too, as PEFT's: `x·W + b + (g − 1) ⊙ x'·W + g ⊙ Δ(x')`.
        let (x_branch, xw_update) = match adapter.dropout.prob > 0.0 && B::ad_enabled(&x.device()) {
            true => {
                let dropped = adapter.dropout.forward(x);
                (dropped.clone(), crate::kernels::linear_weight(dropped, weight))
            }
            false => (x, xw.clone()),
        };
        let branch = adapter.forward_dropped(x_branch, 1.0, 0.0);
        let update = xw_update * on_last_axis::<B, D>(gain.clone().sub_scalar(1.0).mul_scalar(k), dtype) + branch * on_last_axis::<B, D>(gain.mul_scalar(k), dtype);
        let update = match crate::rank_dropout::mask::<B>(0.0, adapter.module_dropout, 1, 1, &update.device()) {
            Some(keep) => update * cast_to(keep, dtype).reshape([1; D]),
            None => update,
        };
        let y = xw + update;
        let y = match &self.base.bias {
            Some(bias) => y + on_last_axis::<B, D>(bias.val(), dtype),
            None => y,
        };
        plus(y, extra)
    }

    /// [`forward`](Self::forward) with the adapter, as three 2-D matmuls in an order that
    /// burn's fusion (burn-fusion 0.21) can fuse: it starts a fused matmul only when the
    /// matmul is the first op of its block and then appends the elementwise ops after it.
    /// burn's `linear` reshapes its weight right before each matmul (which puts the reshape
    /// first), so the rank scale and the final sum ran as kernels of their own: 5 launches
    /// per layer. Here `x` is flattened to rows once, then `x·A·s` (scale fused), `·B`, and
    /// `x·W + bias + delta` (bias and sum fused): 3 launches (counted with sd-model's
    /// `launches` example). Same arithmetic. Not on the CPU backend, which fuses nothing and
    /// runs burn's `linear` faster than these matmuls.
    /// `extra` (the residual of [`forward_residual`](Self::forward_residual)) joins the
    /// same epilogue.
    fn forward_fusable<const D: usize>(&self, adapter: &LinearAdapter<B>, x: Tensor<B, D>, extra: Option<Tensor<B, D>>) -> Tensor<B, D> {
        let dtype = x.dtype();
        let mut dims = x.dims();
        let [d_in, d_out] = self.base.weight.dims();
        let rows = dims[..D - 1].iter().product::<usize>();
        let extra = extra.map(|e| e.reshape([rows, d_out]));
        let x = x.reshape([rows, d_in]);
        let down = cast_to(adapter.down.weight.val(), dtype);
        let up = cast_to(adapter.up.weight.val(), dtype);
        let h = adapter.dropout.forward(x.clone()).matmul(down) * (self.multiplier * adapter.scale);
        let delta = h.matmul(up);
        let y = x.matmul(self.base.weight.val());
        let y = match &self.base.bias {
            Some(bias) => y + bias.val().unsqueeze::<2>() + delta,
            None => y + delta,
        };
        let y = plus(y, extra);
        dims[D - 1] = d_out;
        y.reshape(dims)
    }
}

/// Whether [`LoraLinear::forward_fused`] is worth trying: the one-op layer and the routed
/// matmuls are on, and the adapter (if any) has no dropout (the op has none).
fn fused_applies<B: Backend>(adapter: Option<&LinearAdapter<B>>) -> bool {
    crate::kernels::fused_lora_linear_enabled() && crate::kernels::matmuls_routed() && adapter.is_none_or(|a| a.dropout.prob == 0.0)
}

impl<B: Backend> LoraLinear<B> {
    /// [`forward_plus`](Self::forward_plus) as one op each way
    /// ([`crate::kernels::set_fused_lora_linear`]) on `x` (and `extra`) flattened to rows,
    /// with the active adapter or (`None`) the base alone; where the op does not apply (a
    /// trainable base, dtypes it does not take), the same sum in the routed matmuls.
    fn forward_fused<const D: usize>(&self, adapter: Option<&LinearAdapter<B>>, x: Tensor<B, D>, extra: Option<Tensor<B, D>>) -> Tensor<B, D> {
        let mut dims = x.dims();
        let d_out = self.base.weight.dims()[1];
        let rows = dims[..D - 1].iter().product::<usize>();
        let inputs = crate::kernels::LoraLinearInputs {
            x: x.reshape([rows, dims[D - 1]]),
            weight: self.base.weight.val(),
            bias: self.base.bias.as_ref().map(|b| b.val()),
            adapter: adapter.map(|a| (a.down.weight.val(), a.up.weight.val())),
            residual: extra.map(|e| e.reshape([rows, d_out])),
            scale: adapter.map_or(0.0, |a| self.multiplier * a.scale),
        };
        let y = crate::kernels::lora_linear(inputs).unwrap_or_else(|inputs| {
            let crate::kernels::LoraLinearInputs { x, residual, .. } = inputs;
            let y = crate::kernels::linear(&self.base, x.clone());
            let y = match adapter {
                Some(adapter) => y + adapter.forward(x, self.multiplier),
                None => y,
            };
            plus(y, residual)
        });
        dims[D - 1] = d_out;
        y.reshape(dims)
    }
}

/// `y + extra`, or `y` without one.
fn plus<B: Backend, const D: usize>(y: Tensor<B, D>, extra: Option<Tensor<B, D>>) -> Tensor<B, D> {
    match extra {
        Some(e) => y + e,
        None => y,
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use burn::module::Module;
    use burn::nn::LinearConfig;
    use burn::tensor::{Distribution, Tensor};

    use super::*;

    type B = Autodiff<Flex>;

    fn max_rel(a: Tensor<Flex, 2>, b: Tensor<Flex, 2>) -> f32 {
        let peak: f32 = b.clone().abs().max().into_scalar();
        let err: f32 = (a - b).abs().max().into_scalar();
        err / peak.max(1e-12)
    }

    /// The row-wise residual sum of a layer without an adapter (and with the adapter
    /// merged) is `forward(x) + residual`.
    #[test]
    fn residual_on_rows_without_an_active_adapter() {
        let device = Default::default();
        let mut layer = LoraLinear::new(LinearConfig::new(12, 10).init::<B>(&device).no_grad());
        let x = Tensor::<B, 3>::random([2, 5, 12], Distribution::Normal(0.0, 1.0), &device);
        let r = Tensor::<B, 3>::random([2, 5, 10], Distribution::Normal(0.0, 1.0), &device);
        let flat = |t: Tensor<B, 3>| t.inner().reshape([10, -1]);
        let check = |layer: &LoraLinear<B>, what: &str| {
            let want = flat(layer.forward(x.clone()) + r.clone());
            for (order, got) in [("rows", layer.forward_rows(x.clone(), Some(r.clone()))), ("api", layer.forward_residual(x.clone(), r.clone()))] {
                let err = max_rel(flat(got), want.clone());
                assert!(err < 1e-6, "{what}, {order}: relative error {err}");
            }
        };
        check(&layer, "no adapter");
        layer.attach_new(&LoraConfig::new(3), &device).unwrap();
        layer.merge_in_place();
        check(&layer, "merged");
    }

    /// The fusion-ordered forward and the row-wise one (used on GPU backends) compute what
    /// the eager one does: output, input gradient and both adapter gradients, with and
    /// without bias.
    #[test]
    fn fusable_order_matches_the_eager_forward() {
        let device = Default::default();
        for bias in [true, false] {
            let base = LinearConfig::new(12, 10).with_bias(bias).init::<B>(&device).no_grad();
            let mut layer = LoraLinear::new(base);
            layer.attach_new(&LoraConfig::new(3).with_alpha(6.0), &device).unwrap();
            layer.multiplier = 0.7;
            let adapter = layer.adapter.clone().unwrap();
            // Non-zero `up`, so every gradient is non-trivial.
            let up = Tensor::<B, 2>::random([3, 10], Distribution::Normal(0.0, 1.0), &device);
            let adapter = LinearAdapter { up: Linear { weight: Param::from_tensor(up), bias: None }, ..adapter };
            layer.adapter = Some(adapter.clone());
            let x0 = Tensor::<B, 3>::random([2, 5, 12], Distribution::Normal(0.0, 1.0), &device);
            let weights = Tensor::<B, 3>::random([2, 5, 10], Distribution::Normal(0.0, 1.0), &device);
            let run = |order: &str| {
                let x = x0.clone().require_grad();
                let y = match order {
                    "fusable" => layer.forward_fusable(&adapter, x.clone(), None),
                    "rows" => layer.forward_rows(x.clone(), None),
                    // With a residual (`weights`, a constant) added and taken off again.
                    "fusable+residual" => layer.forward_fusable(&adapter, x.clone(), Some(weights.clone())) - weights.clone(),
                    "rows+residual" => layer.forward_rows(x.clone(), Some(weights.clone())) - weights.clone(),
                    _ => crate::kernels::linear(&layer.base, x.clone()) + adapter.forward(x.clone(), layer.multiplier),
                };
                let grads = (y.clone() * weights.clone()).sum().backward();
                let flat = |t: Tensor<Flex, 3>| t.reshape([10, -1]);
                [
                    flat(y.inner()),
                    flat(x.grad(&grads).unwrap()),
                    adapter.down.weight.grad(&grads).unwrap(),
                    adapter.up.weight.grad(&grads).unwrap(),
                ]
            };
            let eager = run("eager");
            for order in ["fusable", "rows", "fusable+residual", "rows+residual"] {
                for (what, (a, b)) in ["y", "dx", "d down", "d up"].iter().zip(run(order).into_iter().zip(eager.clone())) {
                    let err = max_rel(a, b);
                    assert!(err < 1e-5, "{order}, bias {bias}, {what}: relative error {err}");
                }
            }
        }
    }
}
