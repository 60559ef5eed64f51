//! AdamW over all adapter tensors at once.
//!
//! burn's `AdamW` updates each parameter tensor on its own: about fifteen tensor operations
//! per tensor and step, so a LoRA with a few hundred small adapter tensors issues thousands of
//! tiny operations per step (as many as the UNet's forward and backward passes together),
//! which is launch and host overhead on a GPU. [`FlatAdamW`] keeps all trainable tensors of
//! a module, and their moments, in flat vectors and updates them with the same fifteen
//! operations on all of them at once: per step, one concatenation of the gradients (a
//! multi-tensor copy kernel on the GPU backends: [`crate::kernels::concat_flat`]), the
//! update, and the new values handed back to the module as views of one buffer, no copies
//! (one operation for all tensors on the GPU backends: [`crate::kernels::split_flat`]).
//! With a half-precision base, [`FlatAdamW::with_working_dtype`] keeps f32 master values
//! here and bf16/f16 copies in the module, so that the LoRA layers need no casts of their
//! weights in the forward and backward passes.
//!
//! The optimizer owns the trained values from [`FlatAdamW::new`] on: each step writes its
//! values into the module, whatever the module held. Changing a trained tensor elsewhere
//! (loading other weights) needs a new optimizer, to which [`FlatAdamW::moments`] /
//! [`FlatAdamW::set_moments`] carry the moments over.
//!
//! The arithmetic is burn's `AdamW`, operation for operation, so results are the same to
//! the last bit; as there, a tensor without a gradient in a step keeps its value, moments
//! and step count. [`FlatAdamW::step_if`] leaves to the device whether a step happens at
//! all (a [`StepGuard`](crate::guard::StepGuard)'s non-finite or overflow check), so a
//! training loop need not read anything back per step: the step counts live on the
//! device, and the bias corrections are looked up in tables the host computes as burn does.
//!
//! ```
//! use burn::backend::{Autodiff, Flex};
//! use burn::nn::LinearConfig;
//! use burn::optim::GradientsParams;
//! use burn::tensor::{Distribution, Tensor};
//! use lora_core::optim::{AdamWSettings, FlatAdamW};
//!
//! type B = Autodiff<Flex>;
//! let device = Default::default();
//! let mut layer = LinearConfig::new(4, 2).init::<B>(&device);
//! let mut optim = FlatAdamW::new(AdamWSettings::default(), &layer, &device);
//! assert_eq!(optim.len(), 4 * 2 + 2);
//! let x = Tensor::<B, 2>::random([3, 4], Distribution::Default, &device);
//! let grads = GradientsParams::from_grads(layer.forward(x).sum().backward(), &layer);
//! let grads = optim.gather_grads(&layer, grads);
//! let before = layer.weight.val();
//! layer = optim.step(1e-3, layer, grads);
//! assert!(layer.weight.val().is_require_grad());
//! let moved: f32 = (layer.weight.val() - before).abs().max().into_scalar();
//! assert!(moved > 0.0);
//! ```

use std::collections::{BTreeMap, HashMap};

use burn::module::{AutodiffModule, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Bool, DType, Device, ElementConversion, FloatDType, Int, Shape, Tensor, TensorData, TensorMetadata};

use crate::error::{LoraError, Result};

mod adafactor;
mod dadapt;
mod schedule_free;
mod prodigy_plus;
mod max_norm;
mod lr_schedule;
mod ademamix;
mod sgd;
pub use ademamix::{AdEMAMixSettings, AdEMAMixState};
pub use sgd::SgdSettings;
pub use adafactor::{AdafactorSettings, AdafactorState, CameSettings, CameState};
pub use dadapt::{DAdaptKind, DAdaptSettings, DAdaptState};
pub use schedule_free::{ScheduleFreeSettings, ScheduleFreeState};
pub use prodigy_plus::{share_prodigy_plus, ProdigyPlusSettings, ProdigyPlusState};
pub use lr_schedule::TorchLrSchedule;
pub use max_norm::{norm_pairs, MaxNormStats, NormFactors, NormPair, RankAxis};

/// Entries of the first bias-correction tables (grown as step counts reach them).
const BIAS_TABLE_MIN: usize = 1024;

/// AdamW's hyper-parameters (as burn's `AdamWConfig`; the learning rate is per step).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWSettings {
    /// Decay of the first moment.
    pub beta_1: f32,
    /// Decay of the second moment.
    pub beta_2: f32,
    /// Added to `sqrt(v̂)`.
    pub epsilon: f32,
    /// Decoupled weight decay (scaled by the learning rate).
    pub weight_decay: f32,
}

impl Default for AdamWSettings {
    /// burn's `AdamWConfig` defaults: β₁ 0.9, β₂ 0.999, ε 1e-5, weight decay 1e-4.
    fn default() -> Self {
        Self {
            beta_1: 0.9,
            beta_2: 0.999,
            epsilon: 1e-5,
            weight_decay: 1e-4,
        }
    }
}

/// Prodigy's step sizes on top of [`FlatAdamW`] ([`FlatAdamW::with_prodigy`]): Adam whose
/// step size the optimizer estimates itself (Mishchenko and Defazio, "Prodigy: An
/// Expeditiously Adaptive Parameter-Free Learner", 2023), as the `prodigyopt` package
/// (1.1) computes it. The learning rate becomes a multiplier of the estimate (1 is usual;
/// a schedule still applies), and β₁, β₂, ε and the decoupled weight decay are the
/// [`AdamWSettings`]'. The defaults are `prodigyopt`'s.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProdigySettings {
    /// Initial estimate `d₀` of the distance to the solution.
    pub d0: f32,
    /// Multiplier of the estimate: the knob to turn (0.5 to 2 are typical values).
    pub d_coef: f32,
    /// Largest factor by which the estimate grows per step (`f32::INFINITY`: no limit;
    /// 1.02 works as a warmup).
    pub growth_rate: f32,
    /// Decay of the estimate's running sums (`None`: `sqrt(β₂)`).
    pub beta_3: Option<f32>,
    /// Adam's bias correction applied to the step size.
    pub use_bias_correction: bool,
    /// Keep the learning rate out of the estimate's denominator (for warmup schedules).
    pub safeguard_warmup: bool,
}

impl Default for ProdigySettings {
    fn default() -> Self {
        Self {
            d0: 1e-6,
            d_coef: 1.0,
            growth_rate: f32::INFINITY,
            beta_3: None,
            use_bias_correction: false,
            safeguard_warmup: false,
        }
    }
}

/// Prodigy's state: the starting values, the running sum `s`, and its four scalars.
#[derive(Debug, Clone)]
struct Prodigy<B: AutodiffBackend> {
    settings: ProdigySettings,
    /// The trained values when the estimate started: it measures the distance from them.
    p0: Tensor<B::InnerBackend, 1>,
    /// The running sum of scaled gradients whose norm is the estimate's denominator.
    s: Tensor<B::InnerBackend, 1>,
    /// `[d, d_max, d_numerator, k]` on the device (a guarded step decides there whether
    /// they change).
    scalars: Tensor<B::InnerBackend, 1>,
    /// Adam's bias correction of the step size for `k = 0..len`, computed on the host in
    /// f64 (`use_bias_correction`); looked up with `k` on the device.
    bias: Option<Tensor<B::InnerBackend, 1>>,
}

/// A setting as the decimal number it was written as: f32 settings (0.999) hold the user's
/// value rounded, and `1 − β` in f32 loses about 1e-5 of its value to cancellation, where
/// `prodigyopt` computes it in f64 from the decimal value.
fn decimal(x: f32) -> f64 {
    x.to_string().parse().unwrap_or(f64::from(x))
}

/// `sqrt(1 − β₂^(k+1)) / (1 − β₁^(k+1))` for `k = 0..len`, in f64 as `prodigyopt` computes it.
fn prodigy_bias_table<B: AutodiffBackend>(beta_1: f32, beta_2: f32, len: usize, device: &Device<B::InnerBackend>) -> Tensor<B::InnerBackend, 1> {
    let (b1, b2) = (decimal(beta_1), decimal(beta_2));
    let values: Vec<f32> = (0..len).map(|k| ((1.0 - b2.powi(k as i32 + 1)).sqrt() / (1.0 - b1.powi(k as i32 + 1))) as f32).collect();
    Tensor::from_data(TensorData::new(values, [len]), device)
}

/// Prodigy's state in flat form, for saving and resuming a run
/// ([`FlatAdamW::prodigy_state`]).
#[derive(Debug, Clone)]
pub struct ProdigyState<B: AutodiffBackend> {
    /// The trained values when the estimate started, in the optimizer's flat order.
    pub p0: Tensor<B::InnerBackend, 1>,
    /// The running sum `s`, in the same order.
    pub s: Tensor<B::InnerBackend, 1>,
    /// `[d, d_max, d_numerator, k]`: the estimate, its largest value, the numerator's
    /// running sum and the number of steps taken.
    pub scalars: Tensor<B::InnerBackend, 1>,
}

/// Where one parameter lives in the flat vectors.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Slot {
    offset: usize,
    len: usize,
    shape: Vec<usize>,
    /// How PyTorch holds the tensor, where not as here ([`FlatAdamW::with_torch_layouts`]).
    torch: Option<TorchLayout>,
}

/// How PyTorch holds a trained tensor whose layout here differs
/// ([`FlatAdamW::with_torch_layouts`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TorchLayout {
    /// A 2-D tensor PyTorch keeps transposed: a linear LoRA's `down` and `up` (burn's
    /// `Linear` keeps its weight `[in, out]`, `nn.Linear` `[out, in]`).
    Transposed,
    /// The same values in the same order in another shape of at most 4 dimensions: a full
    /// LoKr `lokr_w2` of a convolution, 2-d here and `[out_k, in_n, kh, kw]` in LyCORIS, or
    /// a Tucker core (`hada_t1`, `lokr_t2`, …), 2-d here and `[r, r, kh, kw]` there.
    Reshaped(Vec<usize>),
}

/// The gradients of a [`FlatAdamW`]'s tensors, concatenated in its order.
#[derive(Debug, Clone)]
pub struct FlatGrads<B: AutodiffBackend> {
    /// `None` when the optimizer trains nothing.
    values: Option<Tensor<B::InnerBackend, 1>>,
    device: Device<B::InnerBackend>,
    /// Per slot, whether the tensor had a gradient (missing ones are zeros in `values`).
    present: Vec<bool>,
    /// Per value, whether the step trains it, where only some rank chunks of some tensors
    /// train ([`FlatAdamW::restrict_to_chunks`]); `None`: every value with a gradient.
    live: Option<Tensor<B::InnerBackend, 1, Bool>>,
}

impl<B: AutodiffBackend> FlatGrads<B> {
    /// `Σ g²` over every gradient, on the device (no host sync).
    pub fn sq_norm(&self) -> Tensor<B::InnerBackend, 1> {
        match &self.values {
            Some(v) => v.clone().powf_scalar(2.0).sum(),
            None => Tensor::zeros([1], &self.device),
        }
    }

    /// The gradients times `factor` (clipping, loss-scale removal).
    pub fn scale(mut self, factor: f32) -> Self {
        self.values = self.values.map(|v| v.mul_scalar(factor));
        self
    }

    /// The gradients times a factor held on the device (one value, shape `[1]`), as a
    /// [`StepGuard`](crate::guard::StepGuard) computes it: no host read.
    pub fn scale_by(mut self, factor: Tensor<B::InnerBackend, 1>) -> Self {
        self.values = self.values.map(|v| {
            let len = v.dims()[0];
            v.mul(factor.expand([len]))
        });
        self
    }

    /// The concatenated gradients (`None` when the optimizer trains nothing).
    pub fn values(&self) -> Option<&Tensor<B::InnerBackend, 1>> {
        self.values.as_ref()
    }
}

/// `true` over the flat ranges of the tensors a partial update touches.
type FlatMask<B> = Tensor<<B as AutodiffBackend>::InnerBackend, 1, Bool>;

/// AdamW's bias corrections `1 - β^t` for `t = 0..len`, computed on the host as burn's
/// `AdamW` computes them (entry 0, never used by an update, is 1).
#[derive(Debug, Clone)]
struct BiasTables<B: AutodiffBackend> {
    beta_1: Tensor<B::InnerBackend, 1>,
    beta_2: Tensor<B::InnerBackend, 1>,
    len: usize,
}

impl<B: AutodiffBackend> BiasTables<B> {
    fn new(settings: &AdamWSettings, len: usize, device: &Device<B::InnerBackend>) -> Self {
        let table = |beta: f32| {
            let values: Vec<f32> = (0..len).map(|t| if t == 0 { 1.0 } else { 1f32 - beta.powi(t as i32) }).collect();
            Tensor::from_data(TensorData::new(values, [len]), device)
        };
        Self { beta_1: table(settings.beta_1), beta_2: table(settings.beta_2), len }
    }
}

/// AdamW over every trainable tensor of one module, with flat moment vectors (see the
/// [module docs](self)).
#[derive(Debug, Clone)]
pub struct FlatAdamW<B: AutodiffBackend> {
    settings: AdamWSettings,
    slots: HashMap<ParamId, Slot>,
    /// Parameter ids in flat order.
    order: Vec<ParamId>,
    /// Their shapes, in the same order: the pieces that
    /// [`split_flat`](crate::kernels::split_flat) cuts.
    shapes: Vec<Shape>,
    /// The trained values, in flat order.
    params: Tensor<B::InnerBackend, 1>,
    moment_1: Tensor<B::InnerBackend, 1>,
    moment_2: Tensor<B::InnerBackend, 1>,
    /// Per trained scalar, the steps its tensor has been updated (AdamW's `t`). On the
    /// device, because a guarded step ([`FlatAdamW::step_if`]) decides there whether it
    /// updates anything.
    time: Tensor<B::InnerBackend, 1, Int>,
    /// No element's `time` exceeds this (the host's count of possible updates).
    time_bound: usize,
    bias: BiasTables<B>,
    /// The last partial update's mask: the same tensors lack gradients step after step
    /// (a text encoder's layers after the clip-skip cut), so it is built once.
    last_mask: Option<(Vec<bool>, FlatMask<B>)>,
    /// The dtype of the module's copies of the trained tensors, when it differs from the
    /// master values' ([`FlatAdamW::with_working_dtype`]).
    working: Option<DType>,
    /// Prodigy's step sizes instead of the learning rate's ([`FlatAdamW::with_prodigy`]).
    prodigy: Option<Prodigy<B>>,
    /// The element-to-adapter index of the last [`FlatAdamW::apply_max_norm`].
    max_norm_index: Option<max_norm::PairIndex<B>>,
    /// Per trained scalar, the factor on the learning rate of its tensor
    /// ([`FlatAdamW::with_lr_scales`]); `None`: 1 everywhere.
    lr_scales: Option<Tensor<B::InnerBackend, 1>>,
    /// Tensors whose module copies stay in the master dtype ([`FlatAdamW::with_master_copies`]).
    master_copies: std::collections::HashSet<ParamId>,
    /// Lion's update instead of Adam's ([`FlatAdamW::with_lion`]).
    lion: bool,
    /// Adafactor's update instead of Adam's ([`FlatAdamW::with_adafactor`]).
    adafactor: Option<adafactor::Adafactor<B>>,
    /// DAdaptAdam's step sizes ([`FlatAdamW::with_dadapt_adam`]).
    dadapt: Option<dadapt::DAdapt<B>>,
    /// Schedule-free AdamW / RAdam ([`FlatAdamW::with_schedule_free`]).
    schedule_free: Option<schedule_free::ScheduleFree<B>>,
    /// Prodigy + schedule-free ([`FlatAdamW::with_prodigy_plus`]).
    prodigy_plus: Option<prodigy_plus::ProdigyPlus<B>>,
    /// AdEMAMix's slow moment and tables ([`FlatAdamW::with_ademamix`]).
    ademamix: Option<ademamix::AdEMAMix<B>>,
    /// SGD's update ([`FlatAdamW::with_sgd`]).
    sgd: Option<SgdSettings>,
    /// Tensors trained a rank chunk at a time ([`FlatAdamW::with_rank_chunks`]).
    chunks: Option<ChunkTable<B>>,
    /// AMSGrad's largest second moment so far, per value ([`FlatAdamW::with_amsgrad`]).
    amsgrad: Option<Tensor<B::InnerBackend, 1>>,
}

/// What one AdamW / Lion update computes (`FlatAdamW::update`), before the step's mask.
struct Updated<B: AutodiffBackend> {
    /// First moments.
    m: Tensor<B::InnerBackend, 1>,
    /// Second moments.
    v: Tensor<B::InnerBackend, 1>,
    /// AMSGrad's largest second moments, with this step's (`None` without AMSGrad).
    max_v: Option<Tensor<B::InnerBackend, 1>>,
    /// Parameters.
    params: Tensor<B::InnerBackend, 1>,
}

/// Why factored optimizers refuse tensors trained a rank chunk at a time.
const FACTORED_CHUNKS: &str = "optimizers with factored second moments (Adafactor, CAME, Prodigy + schedule-free) keep statistics per tensor, which a tensor trained a rank chunk at a time (DyLoRA; each chunk a tensor of its own in kohya's) does not fit";

/// Which rank chunk each value belongs to ([`FlatAdamW::with_rank_chunks`]).
#[derive(Debug, Clone)]
struct ChunkTable<B: AutodiffBackend> {
    /// Per value, its chunk's number: 0 for the values of tensors not cut into chunks
    /// (always trained), from 1 for the chunks.
    ids: Tensor<B::InnerBackend, 1, Int>,
    /// Per cut tensor, the number of its first chunk and its chunk count.
    first: HashMap<ParamId, (usize, usize)>,
    /// Chunk numbers in use, 0 included.
    count: usize,
}

impl<B: AutodiffBackend> FlatAdamW<B> {
    /// An optimizer for the tensors of `module` that require gradients (its frozen ones are
    /// left alone), starting from their current values, with zero moments.
    ///
    /// Create it once the module's adapters are attached: tensors added later are not
    /// trained, and [`gather_grads`](Self::gather_grads) panics when it meets gradients of
    /// such tensors.
    pub fn new<M: AutodiffModule<B>>(settings: AdamWSettings, module: &M, device: &B::Device) -> Self {
        let mut found = Trainable::default();
        module.visit(&mut found);
        let len = found.next;
        let mut optim = Self {
            settings,
            shapes: found.order.iter().map(|id| Shape::from(found.slots[id].shape.clone())).collect(),
            slots: found.slots,
            order: found.order,
            params: Tensor::zeros([len], device),
            moment_1: Tensor::zeros([len], device),
            moment_2: Tensor::zeros([len], device),
            time: Tensor::zeros([len], device),
            time_bound: 0,
            bias: BiasTables::new(&settings, BIAS_TABLE_MIN, device),
            last_mask: None,
            working: None,
            prodigy: None,
            max_norm_index: None,
            lr_scales: None,
            master_copies: Default::default(),
            lion: false,
            adafactor: None,
            dadapt: None,
            schedule_free: None,
            prodigy_plus: None,
            ademamix: None,
            sgd: None,
            chunks: None,
            amsgrad: None,
        };
        if len > 0 {
            let mut gather = Gather::<B> {
                slots: &optim.slots,
                grads: None,
                pieces: BTreeMap::new(),
            };
            module.visit(&mut gather);
            let dtype = gather.pieces.values().flatten().next().map_or(DType::F32, TensorMetadata::dtype);
            optim.params = optim.concat(gather.pieces, dtype, device);
        }
        optim
    }

    /// Mixed precision with master weights: the optimizer keeps the trained values (in the
    /// dtype the module had at [`new`](Self::new), f32 for a LoRA) and writes `dtype` copies
    /// of them into the module at each [`step`](Self::step) (and
    /// [`to_working`](Self::to_working)); gradients may come in either dtype.
    ///
    /// With a bf16 or f16 base, a LoRA layer casts its f32 weights to the activations' dtype
    /// in every forward pass and its weight gradients back in every backward pass: two small
    /// kernels per adapter tensor and pass, several hundred launches per UNet step. With
    /// working copies the casts happen once per step, in the optimizer's update kernel. The
    /// numbers are those of the casting forward and backward pass, to the bit: the forward
    /// pass used the same rounded weights, and the gradient of a cast is the cast gradient.
    /// Save or export trained values through [`to_master`](Self::to_master): the module
    /// holds rounded copies.
    ///
    /// ```
    /// use burn::backend::{Autodiff, Flex};
    /// use burn::nn::LinearConfig;
    /// use burn::optim::GradientsParams;
    /// use burn::tensor::{DType, Distribution, FloatDType, Tensor};
    /// use lora_core::optim::{AdamWSettings, FlatAdamW};
    ///
    /// type B = Autodiff<Flex>;
    /// let device = Default::default();
    /// let layer = LinearConfig::new(4, 2).init::<B>(&device);
    /// let mut optim = FlatAdamW::new(AdamWSettings::default(), &layer, &device).with_working_dtype(FloatDType::BF16);
    /// let mut layer = optim.to_working(layer);
    /// assert_eq!(layer.weight.val().dtype(), DType::BF16);
    /// let x = Tensor::<B, 2>::random([3, 4], Distribution::Default, &device).cast(FloatDType::BF16);
    /// let grads = GradientsParams::from_grads(layer.forward(x).cast(FloatDType::F32).sum().backward(), &layer);
    /// let grads = optim.gather_grads(&layer, grads);
    /// layer = optim.step(1e-3, layer, grads);
    /// assert_eq!(layer.weight.val().dtype(), DType::BF16);
    /// // The f32 values, for saving.
    /// let saved = optim.to_master(layer.clone());
    /// assert_eq!(saved.weight.val().dtype(), DType::F32);
    /// ```
    pub fn with_working_dtype(mut self, dtype: FloatDType) -> Self {
        let dtype = DType::from(dtype);
        self.working = (dtype != self.params.dtype()).then_some(dtype);
        self
    }

    /// A learning rate per tensor: each step moves the tensor with id `id` at the step's
    /// learning rate times `scale(id)`, as torch's parameter groups with their own `lr`
    /// (kohya's block-wise learning rates, LoRA+'s faster `up` weights). Weight decay
    /// scales with it, as in torch's AdamW. With Prodigy the factor multiplies the step
    /// size `d·lr` of its tensor, in the update and in the estimate of `d`: factors of 1
    /// are plain Prodigy (prodigyopt accepts no other factors than 0 and 1). With
    /// DAdaptAdam the factor is its `layer_scale` (the weight decay does not scale), and
    /// with Adafactor it multiplies each tensor's learning rate.
    ///
    /// ```
    /// use burn::backend::{Autodiff, Flex};
    /// use burn::nn::LinearConfig;
    /// use burn::optim::GradientsParams;
    /// use burn::tensor::{Distribution, Tensor};
    /// use lora_core::optim::{AdamWSettings, FlatAdamW};
    ///
    /// type B = Autodiff<Flex>;
    /// let device = Default::default();
    /// let mut layer = LinearConfig::new(4, 2).init::<B>(&device);
    /// let frozen_bias = layer.bias.as_ref().unwrap().id;
    /// let mut optim = FlatAdamW::new(AdamWSettings::default(), &layer, &device)
    ///     .with_lr_scales(|id| if id == frozen_bias { 0.0 } else { 16.0 });
    /// let x = Tensor::<B, 2>::random([3, 4], Distribution::Default, &device);
    /// let grads = GradientsParams::from_grads(layer.forward(x).sum().backward(), &layer);
    /// let grads = optim.gather_grads(&layer, grads);
    /// let bias = layer.bias.as_ref().unwrap().val();
    /// layer = optim.step(1e-3, layer, grads);
    /// let moved: f32 = (layer.bias.as_ref().unwrap().val() - bias).abs().max().into_scalar();
    /// assert_eq!(moved, 0.0);
    /// ```
    pub fn with_lr_scales(mut self, scale: impl Fn(ParamId) -> f32) -> Self {
        let mut values = vec![1.0f32; self.len()];
        for id in &self.order {
            let slot = &self.slots[id];
            values[slot.offset..slot.offset + slot.len].fill(scale(*id));
        }
        // All ones take the unscaled path: bit for bit the optimizer without scales.
        self.lr_scales = values.iter().any(|v| *v != 1.0).then(|| {
            let len = values.len();
            Tensor::from_data(TensorData::new(values, [len]), &self.params.device())
        });
        self
    }

    /// Prodigy's step sizes ([`ProdigySettings`]): from here on each step estimates its own
    /// step size `d`, which the learning rate multiplies, measuring the distance from the
    /// current values. Tensors without a gradient in a step keep their values and state, as
    /// in `prodigyopt`; [`step_if`](Self::step_if)'s `false` leaves all of it unchanged.
    /// Replaces the other update rules.
    ///
    /// ```
    /// use burn::backend::{Autodiff, Flex};
    /// use burn::nn::LinearConfig;
    /// use burn::optim::GradientsParams;
    /// use burn::tensor::{Distribution, Tensor};
    /// use lora_core::optim::{AdamWSettings, FlatAdamW, ProdigySettings};
    ///
    /// type B = Autodiff<Flex>;
    /// let device = Default::default();
    /// let mut layer = LinearConfig::new(4, 2).init::<B>(&device);
    /// let settings = AdamWSettings { epsilon: 1e-8, weight_decay: 0.0, ..Default::default() };
    /// let mut optim = FlatAdamW::new(settings, &layer, &device).with_prodigy(ProdigySettings::default());
    /// for _ in 0..3 {
    ///     let x = Tensor::<B, 2>::random([3, 4], Distribution::Default, &device);
    ///     let grads = GradientsParams::from_grads(layer.forward(x).sum().backward(), &layer);
    ///     let grads = optim.gather_grads(&layer, grads);
    ///     layer = optim.step(1.0, layer, grads);
    /// }
    /// let d: f32 = optim.prodigy_d().unwrap().into_scalar();
    /// assert!(d > 1e-6, "the estimate grew from d0: {d}");
    /// ```
    pub fn with_prodigy(mut self, settings: ProdigySettings) -> Self {
        self.clear_rules();
        let device = self.moment_1.device();
        let scalars = Tensor::from_data(TensorData::new(vec![settings.d0, settings.d0, 0.0, 0.0], [4]), &device);
        let s = Tensor::zeros([self.len()], &device);
        self.prodigy = Some(Prodigy { settings, p0: self.params.clone(), s, scalars, bias: None });
        self
    }

    /// Lion's update (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"; the
    /// `lion-pytorch` package kohya uses) instead of Adam's: each value moves by the learning
    /// rate times the sign of `β₁·m + (1 − β₁)·g`, after the decoupled weight decay
    /// `p·(1 − lr·wd)`, and then `m = β₂·m + (1 − β₂)·g`. β₁, β₂ and the weight decay come
    /// from the [`AdamWSettings`] (ε is unused; the paper's betas are 0.9 and 0.99); the
    /// second moment stays zero. Every step is the same size, so Lion wants a learning rate
    /// 3–10 times smaller than AdamW's and a weight decay as many times larger. Replaces
    /// the other update rules. Checked step by step against `lion-pytorch`.
    ///
    /// ```
    /// use burn::backend::{Autodiff, Flex};
    /// use burn::nn::LinearConfig;
    /// use burn::optim::GradientsParams;
    /// use burn::tensor::Tensor;
    /// use lora_core::optim::{AdamWSettings, FlatAdamW};
    ///
    /// type B = Autodiff<Flex>;
    /// let device = Default::default();
    /// let layer = LinearConfig::new(4, 2).with_bias(false).init::<B>(&device);
    /// let settings = AdamWSettings { weight_decay: 0.0, ..AdamWSettings::default() };
    /// let mut optim = FlatAdamW::new(settings, &layer, &device).with_lion();
    /// let x = Tensor::<B, 2>::ones([3, 4], &device);
    /// let grads = GradientsParams::from_grads(layer.forward(x).sum().backward(), &layer);
    /// let grads = optim.gather_grads(&layer, grads);
    /// let before = layer.weight.val();
    /// let layer = optim.step(1e-2, layer, grads);
    /// // Every value moved by exactly the learning rate (against its gradient's sign).
    /// let moved: Vec<f32> = (before - layer.weight.val()).abs().into_data().to_vec().unwrap();
    /// assert!(moved.iter().all(|d| (d - 1e-2).abs() < 1e-6), "{moved:?}");
    /// ```
    pub fn with_lion(mut self) -> Self {
        self.clear_rules();
        self.lion = true;
        self
    }

    /// Whether this optimizer takes Lion's update ([`with_lion`](Self::with_lion)).
    pub fn is_lion(&self) -> bool {
        self.lion
    }

    /// AMSGrad (Reddi et al. 2018; PyTorch's `AdamW(amsgrad=True)`): Adam's step divides
    /// by the square root of the largest second moment each value has had so far (bias
    /// corrected with the current step count), not by the current one, so a value's step
    /// size never grows back when its gradients shrink. One more flat vector of state
    /// ([`amsgrad_state`](Self::amsgrad_state)). For Adam's update only: an error when
    /// another rule (Lion, Prodigy, Adafactor, D-Adaptation, schedule-free, AdEMAMix, SGD)
    /// is set, and a later `with_*` rule drops it.
    ///
    /// ```
    /// use burn::backend::{Autodiff, Flex};
    /// use burn::module::Param;
    /// use burn::optim::GradientsParams;
    /// use burn::tensor::Tensor;
    /// use lora_core::optim::{AdamWSettings, FlatAdamW};
    ///
    /// type B = Autodiff<Flex>;
    /// let device = Default::default();
    /// let settings = AdamWSettings { weight_decay: 0.0, ..AdamWSettings::default() };
    /// let start = Param::from_tensor(Tensor::<B, 1>::zeros([1], &device));
    /// let run = |amsgrad: bool| -> f32 {
    ///     let mut p = start.clone();
    ///     let mut optim = FlatAdamW::new(settings, &p, &device);
    ///     if amsgrad {
    ///         optim = optim.with_amsgrad().unwrap();
    ///     }
    ///     // A large gradient, then small ones: Adam's second moment decays, AMSGrad's not.
    ///     for g in [10.0, 0.1, 0.1, 0.1] {
    ///         let grads = (p.val() * g).sum().backward();
    ///         let grads = optim.gather_grads(&p, GradientsParams::from_grads(grads, &p));
    ///         p = optim.step(0.1, p, grads);
    ///     }
    ///     p.val().into_scalar()
    /// };
    /// let (adam, amsgrad) = (run(false), run(true));
    /// assert!(amsgrad.abs() < adam.abs(), "smaller late steps: {amsgrad} vs {adam}");
    /// assert!(FlatAdamW::new(settings, &start, &device).with_lion().with_amsgrad().is_err());
    /// ```
    pub fn with_amsgrad(mut self) -> Result<Self> {
        let other = self.lion
            || self.prodigy.is_some()
            || self.adafactor.is_some()
            || self.dadapt.is_some()
            || self.schedule_free.is_some()
            || self.prodigy_plus.is_some()
            || self.ademamix.is_some()
            || self.sgd.is_some();
        if other {
            return Err(LoraError::Optimizer("AMSGrad is a variant of Adam's update; this optimizer has another".into()));
        }
        self.amsgrad = Some(self.moment_2.zeros_like());
        Ok(self)
    }

    /// AMSGrad's largest second moment of each value, flat (`None` without AMSGrad), to
    /// save with a run.
    pub fn amsgrad_state(&self) -> Option<Tensor<B::InnerBackend, 1>> {
        self.amsgrad.clone()
    }

    /// Restores [`amsgrad_state`](Self::amsgrad_state) (resuming a run): an error without
    /// AMSGrad or for a vector of another length.
    pub fn set_amsgrad_state(&mut self, max_v: Tensor<B::InnerBackend, 1>) -> Result<()> {
        let Some(current) = &self.amsgrad else {
            return Err(LoraError::Optimizer("this optimizer has no AMSGrad state".into()));
        };
        if max_v.dims() != current.dims() {
            return Err(LoraError::ShapeMismatch {
                key: "AMSGrad's largest second moments".into(),
                reason: format!("{} values for an optimizer of {}", max_v.dims()[0], current.dims()[0]),
            });
        }
        self.amsgrad = Some(max_v);
        Ok(())
    }

    /// Prodigy's current step-size estimate `d` (shape `[1]`, on the device: no read);
    /// `None` without Prodigy. The step size of a step is `d` times its learning rate.
    pub fn prodigy_d(&self) -> Option<Tensor<B::InnerBackend, 1>> {
        self.prodigy.as_ref().map(|p| p.scalars.clone().slice(0..1))
    }

    /// Prodigy's state, to save with a run (`None` without Prodigy).
    pub fn prodigy_state(&self) -> Option<ProdigyState<B>> {
        self.prodigy.as_ref().map(|p| ProdigyState { p0: p.p0.clone(), s: p.s.clone(), scalars: p.scalars.clone() })
    }

    /// Restores Prodigy's state (resuming a run); an error without Prodigy or when the
    /// lengths do not fit this optimizer's tensors. Reads the step count `k` (a sync),
    /// which the bias-correction table must cover.
    pub fn set_prodigy_state(&mut self, state: ProdigyState<B>) -> Result<()> {
        let len = self.len();
        let Some(prodigy) = self.prodigy.as_mut() else {
            return Err(LoraError::Optimizer("this optimizer does not use Prodigy's step sizes".into()));
        };
        for (name, tensor, expected) in [("p0", &state.p0, len), ("s", &state.s, len), ("scalars", &state.scalars, 4)] {
            if tensor.dims()[0] != expected {
                return Err(LoraError::ShapeMismatch {
                    key: format!("Prodigy state {name}"),
                    reason: format!("{} values, the optimizer needs {expected}", tensor.dims()[0]),
                });
            }
        }
        let k: f32 = state.scalars.clone().slice(3..4).into_scalar().elem();
        (prodigy.p0, prodigy.s, prodigy.scalars) = (state.p0, state.s, state.scalars);
        self.raise_time_bound(k.max(0.0) as usize);
        Ok(())
    }

    /// The dtype of the module's working copies ([`with_working_dtype`](Self::with_working_dtype)),
    /// `None` when the module holds the trained values themselves.
    pub fn working_dtype(&self) -> Option<DType> {
        self.working
    }

    /// `module` with its trained tensors set to the optimizer's values in the working dtype
    /// ([`with_working_dtype`](Self::with_working_dtype); the values themselves without one).
    pub fn to_working<M: AutodiffModule<B>>(&self, module: M) -> M {
        self.scatter_working(module)
    }

    /// `module` with its trained tensors set to the optimizer's values in their own dtype
    /// (f32 for a LoRA): what to save, whatever the working dtype.
    pub fn to_master<M: AutodiffModule<B>>(&self, module: M) -> M {
        self.scatter(module, self.params.clone())
    }

    /// `module` with its trained tensors set to the working copies, those of
    /// [`with_master_copies`](Self::with_master_copies) in the master dtype.
    fn scatter_working<M: AutodiffModule<B>>(&self, module: M) -> M {
        self.scatter_values_working(module, self.params.clone())
    }

    /// `module` with its trained tensors set to `values` (flat, master dtype) in the
    /// working dtype, those of [`with_master_copies`](Self::with_master_copies) as they are.
    fn scatter_values_working<M: AutodiffModule<B>>(&self, module: M, values: Tensor<B::InnerBackend, 1>) -> M {
        let Some(dtype) = self.working else {
            return self.scatter(module, values);
        };
        let working = values.clone().cast(FloatDType::from(dtype));
        if self.master_copies.is_empty() {
            return self.scatter(module, working);
        }
        // Each tensor is written once: the kept ones from the master values, the rest cast.
        let module = self.scatter_where(module, working, |id| !self.master_copies.contains(&id));
        self.scatter_where(module, values, |id| self.master_copies.contains(&id))
    }

    /// With [`with_working_dtype`](Self::with_working_dtype), the module's copies of the
    /// tensors for which `keep` holds stay in the master dtype (f32). For DoRA's magnitudes:
    /// rounded to bf16, a magnitude `m ≈ ‖W‖` would move the gain `m / ‖W‖` off 1 by up to
    /// 2⁻⁹, more than training moves it. The layer must take such a tensor in f32 (DoRA's
    /// gain is computed in f32).
    ///
    /// ```
    /// use burn::backend::{Autodiff, Flex};
    /// use burn::nn::LinearConfig;
    /// use burn::tensor::{DType, FloatDType};
    /// use lora_core::optim::{AdamWSettings, FlatAdamW};
    ///
    /// type B = Autodiff<Flex>;
    /// let device = Default::default();
    /// let layer = LinearConfig::new(4, 2).init::<B>(&device);
    /// let bias = layer.bias.as_ref().unwrap().id;
    /// let optim = FlatAdamW::new(AdamWSettings::default(), &layer, &device)
    ///     .with_working_dtype(FloatDType::BF16)
    ///     .with_master_copies(|id| id == bias);
    /// let layer = optim.to_working(layer);
    /// assert_eq!(layer.weight.val().dtype(), DType::BF16);
    /// assert_eq!(layer.bias.unwrap().val().dtype(), DType::F32);
    /// ```
    pub fn with_master_copies(mut self, keep: impl Fn(ParamId) -> bool) -> Self {
        self.master_copies = self.order.iter().copied().filter(|id| keep(*id)).collect();
        self
    }

    /// Tells the optimizer how PyTorch holds the tensors whose layout differs here
    /// (`None` for the rest): burn's `Linear` keeps its weight `[in, out]` where
    /// `nn.Linear` keeps `[out, in]`, so a linear LoRA's `down` and `up` are transposed,
    /// and LyCORIS keeps a convolution's full `lokr_w2` and its Tucker cores 4-d
    /// ([`crate::sites::LoraSiteMut::torch_layouts`] lists them). The element-wise updates
    /// do not care; Prodigy + schedule-free does (its estimate reads every 11th value of
    /// each tensor in PyTorch's order, and its factored second moments reduce PyTorch's
    /// dimensions), and so does Adafactor (it factors a tensor over PyTorch's last two
    /// dimensions), so this is to be called before
    /// [`with_prodigy_plus`](Self::with_prodigy_plus) and
    /// [`with_adafactor`](Self::with_adafactor) for a run to follow the packages'.
    /// Errors on a layout that does not fit its tensor, or when either is already on.
    ///
    /// ```
    /// use burn::backend::{Autodiff, Flex};
    /// use burn::nn::LinearConfig;
    /// use lora_core::optim::{AdamWSettings, FlatAdamW, ProdigyPlusSettings, TorchLayout};
    ///
    /// type B = Autodiff<Flex>;
    /// let device = Default::default();
    /// let layer = LinearConfig::new(4, 2).with_bias(false).init::<B>(&device);
    /// let weight = layer.weight.id;
    /// let optim = FlatAdamW::new(AdamWSettings::default(), &layer, &device)
    ///     .with_torch_layouts(|id| (id == weight).then_some(TorchLayout::Transposed))
    ///     .unwrap()
    ///     .with_prodigy_plus(ProdigyPlusSettings::default(), |_| 0)
    ///     .unwrap();
    /// assert!(optim.is_schedule_free());
    /// ```
    pub fn with_torch_layouts(mut self, layout: impl Fn(ParamId) -> Option<TorchLayout>) -> Result<Self> {
        if self.prodigy_plus.is_some() || self.adafactor.is_some() {
            return Err(LoraError::Optimizer("with_torch_layouts comes before with_prodigy_plus and with_adafactor, whose layouts it changes".into()));
        }
        for id in &self.order {
            let Some(slot) = self.slots.get_mut(id) else { continue };
            slot.torch = layout(*id);
            let fits = match &slot.torch {
                None => true,
                Some(TorchLayout::Transposed) => slot.shape.len() == 2,
                Some(TorchLayout::Reshaped(shape)) => shape.len() <= 4 && shape.iter().product::<usize>() == slot.len,
            };
            if !fits {
                return Err(LoraError::Optimizer(format!("a tensor of shape {:?} cannot be held as {:?} in PyTorch", slot.shape, slot.torch)));
            }
        }
        Ok(self)
    }

    /// `module` with its trained tensors set to slices of `flat`.
    fn scatter<M: AutodiffModule<B>>(&self, module: M, flat: Tensor<B::InnerBackend, 1>) -> M {
        self.scatter_where(module, flat, |_| true)
    }

    /// [`scatter`](Self::scatter) for the tensors whose id passes `which`.
    fn scatter_where<M: AutodiffModule<B>>(&self, module: M, flat: Tensor<B::InnerBackend, 1>, which: impl Fn(ParamId) -> bool) -> M {
        if self.is_empty() {
            return module;
        }
        // All pieces in one operation on a fusion backend (`kernels::split_flat`).
        let pieces = crate::kernels::split_flat(flat, &self.shapes);
        let pieces = self.order.iter().copied().zip(pieces).filter(|(id, _)| which(*id)).collect();
        let mut scatter = Scatter::<B> { slots: &self.slots, pieces, replaced: Vec::with_capacity(self.shapes.len()) };
        let module = module.map(&mut scatter);
        // The old values, released together (one operation on a fusion backend, not one each).
        crate::kernels::release_all::<B::InnerBackend>(scatter.replaced);
        module
    }

    /// Number of trained scalars.
    pub fn len(&self) -> usize {
        self.moment_1.dims()[0]
    }

    /// Whether there is nothing to train.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The trained tensors' ids, in flat order.
    pub fn params(&self) -> &[ParamId] {
        &self.order
    }

    /// `module`'s gradients from `grads`, concatenated (zeros where a tensor has none).
    ///
    /// # Panics
    ///
    /// When `grads` holds gradients of tensors this optimizer does not train (attached
    /// after [`new`](Self::new), or another module's): they would never be updated.
    ///
    /// Takes `grads` whole so that its tensors are released in the module's order. On a
    /// fusion backend a release is an operation of the stream, and burn-fusion reuses an
    /// execution plan only for the same sequence of operations; `GradientsParams` dropped
    /// as a whole releases its tensors in hash order, which differs from one step to the
    /// next, so the end of every step was planned anew (about a thousand operations
    /// explored per step for an SD1.5 attention LoRA).
    pub fn gather_grads<M: AutodiffModule<B>>(&self, module: &M, mut grads: GradientsParams) -> FlatGrads<B> {
        let mut gather = Gather::<B> {
            slots: &self.slots,
            grads: Some(&mut grads),
            pieces: BTreeMap::new(),
        };
        module.visit(&mut gather);
        let pieces = gather.pieces;
        // A gradient left over belongs to a tensor this optimizer does not know: one made
        // after it (adapters attached, or attached anew, after `new`), which would
        // otherwise never move, silently. That is a bug in the caller's loop, not a data
        // problem, hence a panic (as burn's own optimizers panic on foreign gradients).
        assert!(
            grads.is_empty(),
            "FlatAdamW::gather_grads: {} trainable tensor(s) of the module have gradients but are not trained by this optimizer; create the optimizer after attaching the adapters (and a new one after attaching others), and keep one GradientsParams per optimizer",
            grads.len()
        );
        drop(grads);
        let present = self.order.iter().map(|id| pieces.get(&self.slots[id].offset).is_some_and(Option::is_some)).collect();
        let device = self.moment_1.device();
        // Gradients of working copies are converted to the master values' dtype here.
        let values = (!self.is_empty()).then(|| self.concat(pieces, self.params.dtype(), &device));
        FlatGrads { values, device, present, live: None }
    }

    /// One AdamW step at learning rate `lr`: returns `module` with its trained tensors set
    /// to the optimizer's values updated from `grads` (from
    /// [`gather_grads`](Self::gather_grads) on the same module).
    pub fn step<M: AutodiffModule<B>>(&mut self, lr: f64, module: M, grads: FlatGrads<B>) -> M {
        self.step_masked(lr, module, grads, None)
    }

    /// [`step`](Self::step) where the device decides whether it happens: where `apply`
    /// (one value, shape `[1]`) is `false`, values, moments and step counts stay as they
    /// were, as if the step had not been taken. The host queues the update without
    /// waiting for the decision (a [`StepGuard`](crate::guard::StepGuard)'s non-finite or
    /// overflow check), so the training loop needs no read per step.
    ///
    /// ```
    /// use burn::backend::{Autodiff, Flex};
    /// use burn::nn::LinearConfig;
    /// use burn::optim::GradientsParams;
    /// use burn::tensor::{Bool, Tensor};
    /// use lora_core::optim::{AdamWSettings, FlatAdamW};
    ///
    /// type B = Autodiff<Flex>;
    /// let device = Default::default();
    /// let layer = LinearConfig::new(4, 2).init::<B>(&device);
    /// let mut optim = FlatAdamW::new(AdamWSettings::default(), &layer, &device);
    /// let x = Tensor::<B, 2>::ones([3, 4], &device);
    /// let grads = GradientsParams::from_grads(layer.forward(x).sum().backward(), &layer);
    /// let grads = optim.gather_grads(&layer, grads);
    /// let before = layer.weight.val().into_data();
    /// let no = Tensor::<_, 1, Bool>::from_bool([false].into(), &device);
    /// let layer = optim.step_if(1e-3, layer, grads, no);
    /// assert_eq!(layer.weight.val().into_data(), before);
    /// assert_eq!(optim.moments::<2>(layer.weight.id).unwrap().0, 0, "no step counted");
    /// ```
    pub fn step_if<M: AutodiffModule<B>>(&mut self, lr: f64, module: M, grads: FlatGrads<B>, apply: Tensor<B::InnerBackend, 1, Bool>) -> M {
        self.step_masked(lr, module, grads, Some(apply))
    }

    fn step_masked<M: AutodiffModule<B>>(&mut self, lr: f64, module: M, grads: FlatGrads<B>, apply: Option<Tensor<B::InnerBackend, 1, Bool>>) -> M {
        let FlatGrads { values, present, live, .. } = grads;
        let Some(grad) = values else { return module };
        if self.prodigy_plus.is_some() {
            // As schedule-free's, its step count and average weights advance with every step.
            self.prodigy_plus_step(lr, grad, &present, apply);
            return self.scatter_working(module);
        }
        if self.schedule_free.is_some() {
            // Its step count and average weights advance with every step, as the package's
            // group counters do, even one without gradients.
            let present = self.live_mask(&present, live);
            self.schedule_free_step(lr, grad, present, apply);
            return self.scatter_working(module);
        }
        if !present.iter().any(|p| *p) {
            return self.scatter_working(module);
        }
        let len = self.len();
        if self.prodigy.is_some() {
            let present = self.live_mask(&present, live);
            self.prodigy_step(lr, grad, present, apply);
            return self.scatter_working(module);
        }
        if self.dadapt.is_some() {
            let present = self.live_mask(&present, live);
            self.dadapt_step(lr, grad, present, apply);
            return self.scatter_working(module);
        }
        // Where this step updates: tensors with a gradient, if the device says so.
        let mask = match (self.live_mask(&present, live), apply) {
            (None, None) => None,
            (Some(present), None) => Some(present),
            (None, Some(apply)) => Some(apply.expand([len])),
            (Some(present), Some(apply)) => Some(present.bool_and(apply.expand([len]))),
        };
        let time = match &mask {
            None => self.time.clone().add_scalar(1),
            Some(mask) => self.time.clone().add(mask.clone().int()),
        };
        self.raise_time_bound(self.time_bound + 1);
        if self.adafactor.is_some() {
            self.adafactor_step(lr, time.clone(), grad, mask);
            self.time = time;
            return self.scatter_working(module);
        }
        if self.ademamix.is_some() {
            self.ademamix_step(lr, time.clone(), grad, mask);
            self.time = time;
            return self.scatter_working(module);
        }
        if self.sgd.is_some() {
            self.sgd_step(lr, time.clone(), grad, mask);
            self.time = time;
            return self.scatter_working(module);
        }
        let Updated { m, v, max_v, params } = self.update(lr, time.clone(), grad, self.params.clone());
        if let (Some(old), Some(grown)) = (&self.amsgrad, max_v) {
            self.amsgrad = Some(match &mask {
                None => grown,
                Some(mask) => old.clone().mask_where(mask.clone(), grown),
            });
        }
        match mask {
            None => (self.moment_1, self.moment_2, self.params) = (m, v, params),
            Some(mask) => {
                self.moment_1 = self.moment_1.clone().mask_where(mask.clone(), m);
                self.moment_2 = self.moment_2.clone().mask_where(mask.clone(), v);
                self.params = self.params.clone().mask_where(mask, params);
            }
        }
        self.time = time;
        // On a fusion backend the working copies' cast joins the update's kernel.
        self.scatter_working(module)
    }

    /// burn's `AdamW` step on the flat vectors with step counts `time`, operation for
    /// operation (the bias corrections are the host's `1 - β.powi(t)`, looked up per
    /// element), or Lion's ([`with_lion`](Self::with_lion)): new moments and parameters.
    fn update(&self, lr: f64, time: Tensor<B::InnerBackend, 1, Int>, grad: Tensor<B::InnerBackend, 1>, param: Tensor<B::InnerBackend, 1>) -> Updated<B> {
        let s = &self.settings;
        let (m, v, max_v, delta) = if self.lion {
            // lion-pytorch: the direction from the old moment, then the moment's update, with
            // `1 − β` from the settings' decimal values (as Python computes it).
            let complement = |b: f32| (1.0 - decimal(b)) as f32;
            let direction = self.moment_1.clone().mul_scalar(s.beta_1).add(grad.clone().mul_scalar(complement(s.beta_1))).sign();
            let m = self.moment_1.clone().mul_scalar(s.beta_2).add(grad.mul_scalar(complement(s.beta_2)));
            (m, self.moment_2.clone(), None, direction)
        } else {
            let m = self.moment_1.clone().mul_scalar(s.beta_1).add(grad.clone().mul_scalar(1.0 - s.beta_1));
            let v = self.moment_2.clone().mul_scalar(s.beta_2).add(grad.square().mul_scalar(1.0 - s.beta_2));
            let m_hat = m.clone().div(self.bias.beta_1.clone().select(0, time.clone()));
            // AMSGrad divides by the largest second moment so far (PyTorch's
            // `max_exp_avg_sq`, bias-corrected with this step's count).
            let max_v = self.amsgrad.as_ref().map(|old| old.clone().max_pair(v.clone()));
            let v_hat = max_v.clone().unwrap_or_else(|| v.clone()).div(self.bias.beta_2.clone().select(0, time));
            let delta = m_hat.div(v_hat.sqrt().add_scalar(s.epsilon));
            (m, v, max_v, delta)
        };
        if let Some(scales) = &self.lr_scales {
            // Per-tensor learning rates: `p·(1 − lr·wd) − lr·δ` with each element's `lr`.
            let lr = scales.clone().mul_scalar(lr);
            let decayed = match s.weight_decay {
                0.0 => param,
                wd => param.clone() - param.mul(lr.clone().mul_scalar(wd)),
            };
            return Updated { m, v, max_v, params: decayed - delta.mul(lr) };
        }
        // burn's AdamW takes the f32 decay as it is; lion-pytorch its decimal value.
        let decay = lr * if self.lion { decimal(s.weight_decay) } else { f64::from(s.weight_decay) };
        let decayed = if decay == 0.0 { param } else { param.mul_scalar(1.0 - decay) };
        Updated { m, v, max_v, params: decayed - delta.mul_scalar(lr) }
    }

    /// One Prodigy step (`prodigyopt`'s `Prodigy.step`, in f32 on the device): the running
    /// sums and moments take the gradients scaled by the current estimate `d`, the
    /// estimate is updated from `Σ g·(p₀ − p)` and `Σ|s|`, and the values move by `d·lr`
    /// times Adam's direction, with `d·ε` in its denominator. As in `prodigyopt`, a step
    /// whose `Σ|s|` is zero (no gradient yet) updates the sums and moments only, and a
    /// learning rate of zero changes nothing.
    fn prodigy_step(&mut self, lr: f64, grad: Tensor<B::InnerBackend, 1>, present: Option<FlatMask<B>>, apply: Option<Tensor<B::InnerBackend, 1, Bool>>) {
        let Some(mut state) = self.prodigy.clone() else { return };
        if lr == 0.0 {
            return;
        }
        self.raise_time_bound(self.time_bound + 1);
        let (a, p) = (self.settings, state.settings);
        let len = self.len();
        let scalar = |i: usize| state.scalars.clone().slice(i..i + 1);
        let (d, d_max, d_numerator, k) = (scalar(0), scalar(1), scalar(2), scalar(3));
        let full = |x: Tensor<B::InnerBackend, 1>| x.expand([len]);
        // The host's scalars in f64 from the settings' decimal values, as prodigyopt's.
        let (beta_1, beta_2) = (decimal(a.beta_1), decimal(a.beta_2));
        let beta_3 = p.beta_3.map_or(beta_2.sqrt(), decimal) as f32;
        let dlr = self.estimate_step(d.clone(), k.clone(), lr, p.use_bias_correction.then_some(&mut state.bias));
        // `d / d₀` keeps the sums away from tiny values.
        let ratio = d.clone().div_scalar(p.d0);
        let params = self.params.clone();
        // Each element's step size: `d·lr` times its tensor's factor.
        let step_size = |dlr: Tensor<B::InnerBackend, 1>| match &self.lr_scales {
            None => full(dlr),
            Some(scales) => scales.clone().mul(full(dlr)),
        };
        let scaled_grad = match &self.lr_scales {
            None => grad.clone(),
            Some(scales) => grad.clone().mul(scales.clone()),
        };
        let dot = scaled_grad.clone().mul(state.p0.clone().sub(params.clone())).sum();
        let numerator = d_numerator.mul_scalar(beta_3).add(ratio.clone().mul(dlr.clone()).mul(dot));
        let mut s = match p.safeguard_warmup {
            // Tensors at a factor of 0 are left out of the sums, as prodigyopt leaves out
            // groups at a learning rate of 0.
            true => {
                let live = match &self.lr_scales {
                    None => grad.clone(),
                    Some(scales) => grad.clone().mask_fill(scales.clone().equal_elem(0.0), 0.0),
                };
                state.s.clone().mul_scalar(beta_3).add(live.mul(full(ratio.mul(d.clone()))))
            }
            false => state.s.clone().mul_scalar(beta_3).add(scaled_grad.mul(full(ratio.mul(dlr.clone())))),
        };
        let mut m = self.moment_1.clone().mul_scalar(a.beta_1).add(grad.clone().mul(full(d.clone().mul_scalar((1.0 - beta_1) as f32))));
        let mut v = self.moment_2.clone().mul_scalar(a.beta_2).add(grad.square().mul(full(d.clone().square().mul_scalar((1.0 - beta_2) as f32))));
        // Tensors without a gradient keep their sums and moments, and count in no sum.
        let denominator = match &present {
            None => s.clone().abs().sum(),
            Some(mask) => {
                s = state.s.clone().mask_where(mask.clone(), s);
                m = self.moment_1.clone().mask_where(mask.clone(), m);
                v = self.moment_2.clone().mask_where(mask.clone(), v);
                s.clone().abs().mask_fill(mask.clone().bool_not(), 0.0).sum()
            }
        };
        let progress = denominator.clone().greater_elem(0.0);
        let d_hat = numerator.clone().mul_scalar(p.d_coef).div(denominator);
        let new_d = d.clone().mask_where(d.clone().equal_elem(p.d0), d.clone().max_pair(d_hat.clone()));
        let new_d_max = d_max.max_pair(d_hat);
        let new_d = new_d_max.clone().min_pair(new_d.mul_scalar(p.growth_rate));
        let denom = v.clone().sqrt().add(full(new_d.clone().mul_scalar(a.epsilon)));
        let step = step_size(dlr);
        let decayed = match a.weight_decay {
            0.0 => params.clone(),
            decay => params.clone().sub(params.clone().mul(step.clone().mul_scalar(decay))),
        };
        let new_params = decayed.sub(m.clone().div(denom).mul(step));
        let new_scalars = Tensor::cat(vec![new_d, new_d_max, numerator, k.add_scalar(1.0)], 0);

        // Commit: sums and moments where the step happens, values and scalars where it
        // also made progress.
        let (happens, updates) = self.commit_estimated(apply, progress, present.as_ref(), (m, v), new_params);
        self.prodigy = Some(Prodigy {
            s: state.s.mask_where(happens, s),
            scalars: state.scalars.mask_where(updates.expand([4]), new_scalars),
            ..state
        });
    }

    /// The step size `d·lr` of an estimating optimizer (Prodigy, DAdaptAdam) at its step
    /// count `k`, with Adam's bias correction for step `k + 1` when `bias` holds its table
    /// (grown here to the steps queued so far, which `k` never exceeds).
    fn estimate_step(&self, d: Tensor<B::InnerBackend, 1>, k: Tensor<B::InnerBackend, 1>, lr: f64, bias: Option<&mut Option<Tensor<B::InnerBackend, 1>>>) -> Tensor<B::InnerBackend, 1> {
        let dlr = d.mul_scalar(lr);
        let Some(bias) = bias else { return dlr };
        let device = self.moment_1.device();
        if bias.as_ref().is_none_or(|t| t.dims()[0] <= self.time_bound) {
            let len = (self.time_bound + 1).next_power_of_two().max(BIAS_TABLE_MIN);
            *bias = Some(prodigy_bias_table::<B>(self.settings.beta_1, self.settings.beta_2, len, &device));
        }
        let table = bias.clone().unwrap_or_else(|| Tensor::ones([1], &device));
        dlr.mul(table.select(0, k.int()))
    }

    /// Commits an estimating optimizer's step (Prodigy, DAdaptAdam): the moments `(m, v)`
    /// where the step happens (`apply`, all without it), the values and step counts where it
    /// also made `progress`, on the tensors `live` marks (all without it). Returns where
    /// the step happens (per value) and whether it updates (one value), for the
    /// optimizer's own state.
    #[allow(clippy::type_complexity)]
    fn commit_estimated(
        &mut self,
        apply: Option<Tensor<B::InnerBackend, 1, Bool>>,
        progress: Tensor<B::InnerBackend, 1, Bool>,
        live: Option<&FlatMask<B>>,
        (m, v): (Tensor<B::InnerBackend, 1>, Tensor<B::InnerBackend, 1>),
        new_params: Tensor<B::InnerBackend, 1>,
    ) -> (FlatMask<B>, Tensor<B::InnerBackend, 1, Bool>) {
        let len = self.len();
        let happens = apply.unwrap_or_else(|| Tensor::<B::InnerBackend, 1, Bool>::from_bool([true].into(), &self.moment_1.device()));
        let updates = happens.clone().bool_and(progress);
        let happens = happens.expand([len]);
        let moved = match live {
            None => updates.clone().expand([len]),
            Some(live) => updates.clone().expand([len]).bool_and(live.clone()),
        };
        self.moment_1 = self.moment_1.clone().mask_where(happens.clone(), m);
        self.moment_2 = self.moment_2.clone().mask_where(happens.clone(), v);
        self.params = self.params.clone().mask_where(moved.clone(), new_params);
        self.time = self.time.clone().add(moved.int());
        (happens, updates)
    }

    /// Marks the tensors that train a rank chunk at a time (DyLoRA's `down` and `up`,
    /// [`crate::dylora`]; [`crate::sites::LoraSiteMut::dylora_rank_chunks`] lists them):
    /// `chunks(id)` says along which axis of the tensor's shape the ranks lie and how many
    /// make a chunk. A step whose gradients went through
    /// [`restrict_to_chunks`](Self::restrict_to_chunks) then updates only the chunks that
    /// trained: the others keep their values, moments and step counts, as PyTorch's
    /// optimizers skip the parameters without a gradient (kohya's DyLoRA keeps each rank
    /// as a parameter of its own). The table of chunks is built once, here.
    ///
    /// ```
    /// use burn::backend::{Autodiff, Flex};
    /// use burn::nn::LinearConfig;
    /// use burn::optim::GradientsParams;
    /// use burn::tensor::Tensor;
    /// use lora_core::dylora::{RankChunks, TrainedChunks};
    /// use lora_core::optim::{AdamWSettings, FlatAdamW};
    ///
    /// type B = Autodiff<Flex>;
    /// let device = Default::default();
    /// let layer = LinearConfig::new(2, 4).with_bias(false).init::<B>(&device); // weight [2, 4]
    /// let id = layer.weight.id;
    /// let mut optim = FlatAdamW::new(AdamWSettings::default(), &layer, &device)
    ///     .with_rank_chunks(|p| (p == id).then_some(RankChunks { axis: 1, unit: 2 }))?;
    /// let before = layer.weight.val();
    /// let x = Tensor::<B, 2>::ones([3, 2], &device);
    /// let grads = GradientsParams::from_grads(layer.forward(x).sum().backward(), &layer);
    /// let mut trained = TrainedChunks::default();
    /// trained.insert(id, 1); // columns 2 and 3
    /// let grads = optim.restrict_to_chunks(optim.gather_grads(&layer, grads), &trained);
    /// let layer = optim.step(0.1, layer, grads);
    /// let moved = layer.weight.val().not_equal(before);
    /// assert_eq!(moved.into_data().to_vec::<bool>().unwrap(), [false, false, true, true, false, false, true, true]);
    /// assert_eq!(optim.step_counts(id).unwrap(), [0, 0, 1, 1, 0, 0, 1, 1]);
    /// # Ok::<(), lora_core::LoraError>(())
    /// ```
    pub fn with_rank_chunks(
        mut self,
        chunks: impl Fn(ParamId) -> Option<crate::dylora::RankChunks>,
    ) -> Result<Self> {
        if self.adafactor.is_some() || self.prodigy_plus.is_some() {
            return Err(LoraError::Optimizer(FACTORED_CHUNKS.into()));
        }
        let mut ids = vec![0i64; self.len()];
        let mut first = HashMap::new();
        let mut count = 1;
        for id in &self.order {
            let Some(c) = chunks(*id) else { continue };
            let slot = &self.slots[id];
            let (rank, unit) = (slot.shape.get(c.axis).copied().unwrap_or(0), c.unit);
            if unit == 0 || rank == 0 || !rank.is_multiple_of(unit) {
                return Err(LoraError::Optimizer(format!(
                    "a tensor of shape {:?} cannot be cut into chunks of {unit} along axis {}",
                    slot.shape, c.axis
                )));
            }
            // Row-major: the rank coordinate of value `i` is `(i / stride) % rank`.
            let stride: usize = slot.shape[c.axis + 1..].iter().product();
            for (i, chunk) in ids[slot.offset..slot.offset + slot.len]
                .iter_mut()
                .enumerate()
            {
                *chunk = (count + (i / stride) % rank / unit) as i64;
            }
            first.insert(*id, (count, rank / unit));
            count += rank / unit;
        }
        if !first.is_empty() {
            let device = self.moment_1.device();
            let len = ids.len();
            self.chunks = Some(ChunkTable {
                ids: Tensor::from_data(TensorData::new(ids, [len]), &device),
                first,
                count,
            });
        }
        Ok(self)
    }

    /// `grads` with the values of the chunks that did not train this step marked as
    /// without a gradient (see [`with_rank_chunks`](Self::with_rank_chunks)); `trained`
    /// lists the chunks that did. Unchanged without chunked tensors.
    pub fn restrict_to_chunks(
        &self,
        mut grads: FlatGrads<B>,
        trained: &crate::dylora::TrainedChunks,
    ) -> FlatGrads<B> {
        let Some(table) = &self.chunks else {
            return grads;
        };
        let mut live = vec![0i64; table.count];
        live[0] = 1;
        for (id, (first, n)) in &table.first {
            for c in 0..*n {
                live[first + c] = i64::from(trained.contains(*id, c));
            }
        }
        let device = self.moment_1.device();
        let live = Tensor::<B::InnerBackend, 1, Int>::from_data(
            TensorData::new(live, [table.count]),
            &device,
        );
        grads.live = Some(live.select(0, table.ids.clone()).equal_elem(1));
        grads
    }

    /// Whether some tensor trains a rank chunk at a time
    /// ([`with_rank_chunks`](Self::with_rank_chunks)), so that its values' step counts may
    /// differ ([`step_counts`](Self::step_counts)).
    pub fn has_rank_chunks(&self, id: ParamId) -> bool {
        self.chunks
            .as_ref()
            .is_some_and(|t| t.first.contains_key(&id))
    }

    /// The step count of each value of one tensor, in its (row-major) order: the same for
    /// every value unless the tensor trains a rank chunk at a time. `None` for a tensor
    /// this optimizer does not train. Reads the device (a sync).
    pub fn step_counts(&self, id: ParamId) -> Option<Vec<usize>> {
        let slot = self.slots.get(&id)?;
        let data = self
            .time
            .clone()
            .slice(slot.offset..slot.offset + slot.len)
            .into_data()
            .convert::<i64>();
        Some(
            data.to_vec::<i64>()
                .ok()?
                .into_iter()
                .map(|t| usize::try_from(t).unwrap_or_default())
                .collect(),
        )
    }

    /// Sets the step count of each value of one tensor (resuming a run whose tensor
    /// trained a rank chunk at a time); `counts` in the tensor's row-major order.
    pub fn set_step_counts(&mut self, id: ParamId, counts: &[usize]) -> Result<()> {
        let slot = self.slots.get(&id).ok_or_else(|| {
            LoraError::Optimizer(format!("parameter {id} is not trained by this optimizer"))
        })?;
        if counts.len() != slot.len {
            return Err(LoraError::ShapeMismatch {
                key: format!("optimizer step counts of parameter {id}"),
                reason: format!(
                    "{} counts for a tensor of {} values",
                    counts.len(),
                    slot.len
                ),
            });
        }
        let range = slot.offset..slot.offset + slot.len;
        let values: Vec<i64> = counts.iter().map(|c| *c as i64).collect();
        let device = self.moment_1.device();
        let counts_tensor = Tensor::<B::InnerBackend, 1, Int>::from_data(
            TensorData::new(values, [range.len()]),
            &device,
        );
        self.time = self.time.clone().slice_assign(range, counts_tensor);
        self.raise_time_bound(counts.iter().copied().max().unwrap_or(0));
        Ok(())
    }

    /// Refuses a rule whose state is per tensor (`rule`: factored second moments) when
    /// tensors train a rank chunk at a time.
    fn refuse_rank_chunks(&self, rule: &str) -> Result<()> {
        match &self.chunks {
            Some(_) => Err(LoraError::Optimizer(format!("{rule}: {FACTORED_CHUNKS}"))),
            None => Ok(()),
        }
    }

    /// The values this step updates, from the tensors with a gradient and the chunks that
    /// trained; `None`: all of them.
    fn live_mask(&mut self, present: &[bool], live: Option<FlatMask<B>>) -> Option<FlatMask<B>> {
        let present = self.present_mask(present);
        match (present, live) {
            (None, live) => live,
            (Some(p), None) => Some(p),
            (Some(p), Some(l)) => Some(p.bool_and(l)),
        }
    }

    /// Drops every update rule but Adam's (each `with_*` rule replaces the others).
    fn clear_rules(&mut self) {
        self.lion = false;
        self.prodigy = None;
        self.adafactor = None;
        self.dadapt = None;
        self.schedule_free = None;
        self.prodigy_plus = None;
        self.ademamix = None;
        self.sgd = None;
        self.amsgrad = None;
    }

    /// Records that step counts may reach `bound`, growing the bias tables to cover it.
    fn raise_time_bound(&mut self, bound: usize) {
        self.time_bound = self.time_bound.max(bound);
        if self.time_bound >= self.bias.len {
            let len = (self.time_bound + 1).next_power_of_two().max(BIAS_TABLE_MIN);
            self.bias = BiasTables::new(&self.settings, len, &self.moment_1.device());
        }
    }

    /// `true` over the flat ranges of the tensors `present` marks (in flat order); `None`
    /// when that is all of them.
    fn present_mask(&mut self, present: &[bool]) -> Option<FlatMask<B>> {
        if present.iter().all(|p| *p) {
            return None;
        }
        if let Some((cached, mask)) = &self.last_mask && cached.as_slice() == present {
            return Some(mask.clone());
        }
        let mut bits = vec![false; self.len()];
        for (id, _) in self.order.iter().zip(present).filter(|(_, p)| **p) {
            let slot = &self.slots[id];
            bits[slot.offset..slot.offset + slot.len].fill(true);
        }
        let mask = Tensor::from_data(TensorData::new(bits, [self.len()]), &self.moment_1.device());
        self.last_mask = Some((present.to_vec(), mask.clone()));
        Some(mask)
    }

    /// Pieces keyed by offset, in flat order, as one vector of `dtype` (zeros for missing
    /// pieces).
    fn concat(
        &self,
        mut pieces: BTreeMap<usize, Option<FloatTensor<B::InnerBackend>>>,
        dtype: DType,
        device: &Device<B::InnerBackend>,
    ) -> Tensor<B::InnerBackend, 1> {
        // Moved out of the map (every slot has its own offset), so that the gradients reach
        // the copy as their last handle and need no release operation of their own.
        let parts: Vec<_> = self
            .order
            .iter()
            .map(|id| {
                let slot = &self.slots[id];
                pieces.remove(&slot.offset).flatten().unwrap_or_else(|| Tensor::<B::InnerBackend, 1>::zeros([slot.len], device).into_primitive().tensor())
            })
            .collect::<Vec<_>>();
        // Several hundred small tensors: one multi-tensor copy kernel per 32 on the GPU
        // backends instead of one copy each, reading them in their own shapes.
        crate::kernels::concat_flattened(parts, dtype, device)
    }

    /// AdamW's state of one tensor: its step count and first and second moments in its
    /// shape (`None` for a tensor this optimizer does not train or of another rank). The
    /// step count lives on the device: this reads it (a sync).
    #[allow(clippy::type_complexity)]
    pub fn moments<const D: usize>(&self, id: ParamId) -> Option<(usize, Tensor<B::InnerBackend, D>, Tensor<B::InnerBackend, D>)> {
        let slot = self.slots.get(&id)?;
        let shape: [usize; D] = slot.shape.clone().try_into().ok()?;
        let range = slot.offset..slot.offset + slot.len;
        let m = self.moment_1.clone().slice(range.clone()).reshape(shape);
        let v = self.moment_2.clone().slice(range).reshape(shape);
        let time = self.time.clone().slice(slot.offset..slot.offset + 1).into_scalar().elem::<i64>();
        Some((usize::try_from(time).unwrap_or_default(), m, v))
    }

    /// Sets one tensor's step count and moments (resuming a run).
    pub fn set_moments<const D: usize>(&mut self, id: ParamId, time: usize, moment_1: Tensor<B::InnerBackend, D>, moment_2: Tensor<B::InnerBackend, D>) -> Result<()> {
        let slot = self
            .slots
            .get_mut(&id)
            .ok_or_else(|| LoraError::Optimizer(format!("parameter {id} is not trained by this optimizer")))?;
        for m in [&moment_1, &moment_2] {
            if m.dims().as_slice() != slot.shape.as_slice() {
                return Err(LoraError::ShapeMismatch {
                    key: format!("optimizer state of parameter {id}"),
                    reason: format!("moments of shape {:?}, the parameter is {:?}", m.dims(), slot.shape),
                });
            }
        }
        let range = slot.offset..slot.offset + slot.len;
        let n = slot.len;
        let device = self.moment_1.device();
        self.moment_1 = self.moment_1.clone().slice_assign(range.clone(), moment_1.reshape([n]));
        self.moment_2 = self.moment_2.clone().slice_assign(range.clone(), moment_2.reshape([n]));
        self.time = self.time.clone().slice_assign(range, Tensor::full([n], time as i64, &device));
        self.raise_time_bound(time);
        Ok(())
    }
}

/// Lays out the trainable tensors of a module.
#[derive(Default)]
struct Trainable {
    slots: HashMap<ParamId, Slot>,
    order: Vec<ParamId>,
    next: usize,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Trainable {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let shape = param.dims().to_vec();
        let len = shape.iter().product();
        // An empty tensor has nothing to train (and would share its offset with the next).
        if !param.is_require_grad() || len == 0 || self.slots.contains_key(&param.id) {
            return;
        }
        self.slots.insert(param.id, Slot { offset: self.next, len, shape, torch: None });
        self.order.push(param.id);
        self.next += len;
    }
}

/// Collects the trained tensors' gradients (with `grads`) or values.
struct Gather<'a, B: AutodiffBackend> {
    slots: &'a HashMap<ParamId, Slot>,
    grads: Option<&'a mut GradientsParams>,
    /// In the parameters' shapes, keyed by flat offset: the flat concatenation reads them
    /// as they are (no reshape per tensor).
    pieces: BTreeMap<usize, Option<FloatTensor<B::InnerBackend>>>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Gather<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let Some(slot) = self.slots.get(&param.id) else { return };
        let piece = match self.grads.as_deref_mut() {
            Some(grads) => grads.remove::<B::InnerBackend, D>(param.id),
            None => Some(param.val().inner()),
        };
        self.pieces.insert(slot.offset, piece.map(|t| t.into_primitive().tensor()));
    }
}

/// Puts the updated values back: the flat vector's pieces, in the parameters' shapes.
struct Scatter<'a, B: AutodiffBackend> {
    slots: &'a HashMap<ParamId, Slot>,
    pieces: HashMap<ParamId, FloatTensor<B::InnerBackend>>,
    /// The values the pieces replaced.
    replaced: Vec<FloatTensor<B::InnerBackend>>,
}

impl<B: AutodiffBackend> ModuleMapper<B> for Scatter<'_, B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let Some(slot) = self.slots.get(&param.id) else { return param };
        let Some(piece) = self.pieces.get(&param.id).cloned() else { return param };
        debug_assert_eq!(slot.shape.len(), D);
        let (id, old, mapper) = param.consume();
        self.replaced.push(old.inner().into_primitive().tensor());
        let value = crate::kernels::tensor::<B::InnerBackend, D>(piece);
        Param::from_mapped_value(id, Tensor::from_inner(value).require_grad(), mapper)
    }
}
