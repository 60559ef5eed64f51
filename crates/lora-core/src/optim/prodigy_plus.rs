//! Prodigy + schedule-free ([`FlatAdamW::with_prodigy_plus`]): the
//! `prodigy-plus-schedule-free` package's `ProdigyPlusScheduleFree` (version 1.9.2, the one
//! kohya_ss pins; sd-scripts' `optimizer_type = "prodigyplus.ProdigyPlusScheduleFree"`).
//!
//! It is schedule-free AdamW (Defazio et al. 2024) whose step size Prodigy estimates
//! (Mishchenko and Defazio 2023), with the package's changes: the estimate `d` comes from
//! every 11th value of each tensor (`Σ g·(p₀ − y)` over `Σ|s|`, through `atan2`), one per
//! parameter group, all groups stepping at their harmonic mean; second moments factored
//! as Adafactor's for tensors with a dimension of 32 or more, rescaled by `(d_prev / d)²`
//! instead of holding `d²·g²`; each tensor's update clipped to a root mean square of 1
//! (StableAdamW, 50 while `d` is still `d₀`); and the average weighted by `(d·lr)²`.
//! The package keeps `p₀` and `s` in bf16, and so does this (rounded to bf16 after each
//! operation, as torch rounds a bf16 tensor's in-place arithmetic): the estimate's first
//! steps measure distances below bf16's resolution of the starting values.
//!
//! The per-tensor quantities (factored moments, root mean squares, sums over the sliced
//! values) are reductions over each tensor; as for Adafactor, the tensors of one shape are
//! reduced together as one batched tensor.
//!
//! Where the package's arithmetic has quirks, this keeps them, so that a run here follows
//! one with the package: a group's average weight `Σ (d·lr)²` advances only when the
//! group's last tensor had a gradient in the step; with `split_groups = false` only the
//! first group's `d_prev` follows `d`; after `prodigy_steps` the last `d_prev / d` keeps
//! rescaling the second moments.

use burn::module::ParamId;
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Bool, Device, ElementConversion, FloatDType, Int, Slice, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::{decimal, FlatAdamW, TorchLayout, BIAS_TABLE_MIN};
use crate::error::{LoraError, Result};

/// The package's stride through each tensor for Prodigy's statistics.
const SLICE: usize = 11;
/// Tensors with a dimension at least this long get factored second moments.
const MIN_DIM_TO_FACTOR: usize = 32;

/// `ProdigyPlusScheduleFree`'s settings, under the package's names and with its defaults
/// (its `lr` is the step's learning rate, 1 as a rule). Read from TOML or JSON by serde,
/// each key optional.
///
/// The package's `factored_fp32`, `stochastic_rounding` and `fused_back_pass` change
/// nothing for f32 master values and are not here; of its experimental options,
/// `use_cautious`, `use_grams`, `use_adopt` and `use_orthograd` are, `use_muon_pp` and
/// `use_focus` are not implemented.
///
/// ```
/// use lora_core::optim::ProdigyPlusSettings;
///
/// let s: ProdigyPlusSettings = serde_json::from_str(r#"{"d_coef": 0.5, "betas": [0.9, 0.999]}"#).unwrap();
/// assert_eq!((s.d_coef, s.betas, s.d0), (0.5, (0.9, 0.999), 1e-6));
/// assert!(s.validate().is_ok());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProdigyPlusSettings {
    /// β₁ (the interpolation between the average and the base sequence; above 0) and β₂
    /// (the second moments' decay).
    pub betas: (f32, f32),
    /// Decay of Prodigy's running sums (`None`: `sqrt(β₂)`).
    pub beta3: Option<f32>,
    /// Added to the second moments' square root; 0: Adam-atan2 (the package's
    /// `eps=None`), which needs none and turns StableAdamW off.
    pub eps: f32,
    /// Decoupled weight decay.
    pub weight_decay: f32,
    /// Scale the weight decay by the step size `d·lr` (as torch's AdamW); otherwise it
    /// acts at full strength each step.
    pub weight_decay_by_lr: bool,
    /// RAdam's rectification of the first steps (the package warns that it delays the
    /// estimate's growth).
    pub use_bias_correction: bool,
    /// The estimate's starting value, also its floor.
    pub d0: f32,
    /// Multiplier of the estimate: the knob to turn (0.5 to 2 are typical).
    pub d_coef: f32,
    /// Freeze the estimate after this many steps (0: never).
    pub prodigy_steps: usize,
    /// The package's SPEED: an estimate from signs, growing at most to `d^0.975` per step.
    pub use_speed: bool,
    /// One estimate per parameter group (else one for all, the reference Prodigy).
    pub split_groups: bool,
    /// With `split_groups`, every group steps at the harmonic mean of the groups'
    /// estimates (else at its own).
    pub split_groups_mean: bool,
    /// Adafactor's factored second moments for tensors with a dimension of 32 or more.
    pub factored: bool,
    /// Clip each tensor's update to a root mean square of 1 (StableAdamW).
    pub use_stableadamw: bool,
    /// Experimental: C-Optim's cautious update, the step masked to where it agrees with
    /// the update's direction (and rescaled by the mask's mean, per tensor).
    pub use_cautious: bool,
    /// Experimental: Grams' update, the step's magnitudes with the update's signs (off
    /// with `use_cautious`, as in the package).
    pub use_grams: bool,
    /// Experimental: ADOPT's order, the denominator from the second moments before they
    /// take the gradient; the first step only fills them.
    pub use_adopt: bool,
    /// Experimental: OrthoGrad, each tensor's gradient made orthogonal to its `z` (at the
    /// gradient's norm) before the moments and the update take it.
    pub use_orthograd: bool,
}

impl Default for ProdigyPlusSettings {
    fn default() -> Self {
        Self {
            betas: (0.9, 0.99),
            beta3: None,
            eps: 1e-8,
            weight_decay: 0.0,
            weight_decay_by_lr: true,
            use_bias_correction: false,
            d0: 1e-6,
            d_coef: 1.0,
            prodigy_steps: 0,
            use_speed: false,
            split_groups: true,
            split_groups_mean: true,
            factored: true,
            use_stableadamw: true,
            use_cautious: false,
            use_grams: false,
            use_adopt: false,
            use_orthograd: false,
        }
    }
}

impl ProdigyPlusSettings {
    /// Checks the settings as the package does, and β₁ above 0 (the average is recovered
    /// dividing by it): `d0` and `d_coef` positive, `eps`, `weight_decay` at least 0, the
    /// betas and `beta3` in `[0, 1)`.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(LoraError::Optimizer(format!("Prodigy + schedule-free: {what}")));
        let (b1, b2) = self.betas;
        if !(b1 > 0.0 && b1 < 1.0 && (0.0..1.0).contains(&b2)) {
            return bad("betas must be in (0, 1) and [0, 1)");
        }
        if self.beta3.is_some_and(|b| !(0.0..1.0).contains(&b)) {
            return bad("beta3 must be in [0, 1)");
        }
        if !(self.d0.is_finite() && self.d0 > 0.0 && self.d_coef.is_finite() && self.d_coef > 0.0) {
            return bad("d0 and d_coef must be positive");
        }
        if !(self.eps.is_finite() && self.eps >= 0.0 && self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("eps and weight_decay must be at least 0 (eps 0: Adam-atan2)");
        }
        Ok(())
    }

    /// `beta3`, or `sqrt(β₂)` from β₂'s decimal value as Python computes it.
    fn beta_3(&self) -> f32 {
        self.beta3.unwrap_or_else(|| decimal(self.betas.1).sqrt() as f32)
    }

    /// Whether StableAdamW clips the updates (never with Adam-atan2).
    fn stable(&self) -> bool {
        self.use_stableadamw && self.eps > 0.0
    }

    /// Whether Grams' update applies (the package turns it off with C-Optim).
    fn grams(&self) -> bool {
        self.use_grams && !self.use_cautious
    }
}

/// The state of [`FlatAdamW::with_prodigy_plus`] in flat form, for saving and resuming a
/// run; the optimizer's values are `y`, its second moments the unfactored tensors'
/// `exp_avg_sq`.
#[derive(Debug, Clone)]
pub struct ProdigyPlusState<B: AutodiffBackend> {
    /// The base sequence `z`, in the optimizer's flat order.
    pub z: Tensor<B::InnerBackend, 1>,
    /// The factored tensors' second moments, reduced over their largest dimension, in the
    /// optimizer's shape groups.
    pub rows: Tensor<B::InnerBackend, 1>,
    /// The same, reduced over the second largest dimension.
    pub cols: Tensor<B::InnerBackend, 1>,
    /// Every 11th starting value of each tensor (bf16 values), in the shape groups.
    pub p0: Tensor<B::InnerBackend, 1>,
    /// Prodigy's running sums over the same values (bf16 values).
    pub s: Tensor<B::InnerBackend, 1>,
    /// Per group `d`, then per group `d_prev`, `d_numerator` and the average's weight sum;
    /// then the step count `k` (from 1) and the groups' shared estimate: `4·groups + 2`
    /// values.
    pub scalars: Tensor<B::InnerBackend, 1>,
}

/// Factored second moments of one shape: the package's reduction dimensions.
#[derive(Debug, Clone, Copy)]
struct Factored {
    /// The largest dimension (reduced into `rows`), the second largest (into `cols`), and
    /// the dimension of `rows` whose mean normalizes it.
    dr: usize,
    dc: usize,
    reduce: usize,
    row_len: usize,
    col_len: usize,
}

/// The package's `factored_dims`: the indices of the two largest dimensions (ties to the
/// later one), when the tensor has two or more dimensions and one of at least 32.
fn factored_dims(shape: &[usize]) -> Option<Factored> {
    // An empty tensor has nothing to factor.
    if shape.len() < 2 || shape.contains(&0) || shape.iter().all(|d| *d < MIN_DIM_TO_FACTOR) {
        return None;
    }
    let mut sorted: Vec<(usize, usize)> = shape.iter().copied().zip(0..).collect();
    sorted.sort();
    let (dr, dc) = (sorted[sorted.len() - 1].1, sorted[sorted.len() - 2].1);
    let len: usize = shape.iter().product();
    // The package reduces `rows` (which keeps `dr` as a dimension of 1) over `dc − 1`
    // when `dc > dr`: the dimension it would be had `dr` been removed.
    let reduce = if dc > dr { dc - 1 } else { dc };
    Some(Factored { dr, dc, reduce, row_len: len / shape[dr], col_len: len / shape[dc] })
}

/// The tensors of one shape, contiguous in the grouped order.
#[derive(Debug, Clone)]
struct ShapeGroup<B: AutodiffBackend> {
    tensors: usize,
    /// The shape padded to four dimensions with trailing ones.
    dims: [usize; 4],
    len: usize,
    /// Values per tensor in the sliced statistics: `ceil(len / 11)`.
    sliced: usize,
    factored: Option<Factored>,
    offset: usize,
    sliced_offset: usize,
    row_offset: usize,
    col_offset: usize,
    /// The position of its first tensor in the grouped tensor order.
    first: usize,
    /// Each tensor's parameter group.
    groups: Tensor<B::InnerBackend, 1, Int>,
}

/// The shape groups, the permutations between flat and grouped order, and the parameter
/// groups.
#[derive(Debug, Clone)]
struct Layout<B: AutodiffBackend> {
    shapes: Vec<ShapeGroup<B>>,
    to_grouped: Tensor<B::InnerBackend, 1, Int>,
    to_flat: Tensor<B::InnerBackend, 1, Int>,
    /// Per flat value, its parameter group.
    element_group: Tensor<B::InnerBackend, 1, Int>,
    /// Per flat value, its tensor's position in the grouped tensor order.
    element_tensor: Tensor<B::InnerBackend, 1, Int>,
    /// Per tensor in the grouped order, its index in the optimizer's order.
    tensor_order: Vec<usize>,
    /// `[groups, tensors]`: sums the per-tensor statistics into their group's (all into
    /// the first group's when the groups are pooled).
    sum_matrix: Tensor<B::InnerBackend, 2>,
    groups: usize,
    /// Each group's learning-rate factor.
    factors: Tensor<B::InnerBackend, 1>,
    /// 1 for the groups that train (a factor other than 0), 0 for the others: kohya leaves
    /// a group at a learning rate of 0 out of the optimizer, and so out of the mean.
    live: Tensor<B::InnerBackend, 1>,
    /// The same on the host.
    live_groups: Vec<bool>,
    live_count: usize,
    /// Per tensor in the optimizer's order, whether its group is at a factor of 0: it
    /// neither moves (not by weight decay either) nor counts in pooled sums.
    frozen: Vec<bool>,
    /// Each group's last tensor, in the optimizer's order.
    last_tensor: Vec<usize>,
}

/// Per step count `k` (from 1), what the host computes in f64 as the package does: RAdam's
/// factor of the step size, β₂ of the step and whether the step is an Adam step.
#[derive(Debug, Clone)]
struct Tables<B: AutodiffBackend> {
    rect: Tensor<B::InnerBackend, 1>,
    beta_2: Tensor<B::InnerBackend, 1>,
    /// `1 − β₂` of the step, from the f64 value.
    fresh: Tensor<B::InnerBackend, 1>,
    adam: Tensor<B::InnerBackend, 1, Bool>,
    len: usize,
}

impl<B: AutodiffBackend> Tables<B> {
    fn new(settings: &ProdigyPlusSettings, len: usize, device: &Device<B::InnerBackend>) -> Self {
        let beta_2 = decimal(settings.betas.1);
        let (mut rect, mut b2, mut adam) = (Vec::with_capacity(len), Vec::with_capacity(len), Vec::with_capacity(len));
        let mut fresh = Vec::with_capacity(len);
        let rho_inf = 2.0 / (1.0 - beta_2) - 1.0;
        for k in 0..len {
            if !settings.use_bias_correction || k == 0 {
                rect.push(1.0f32);
                b2.push(beta_2 as f32);
                fresh.push((1.0 - beta_2) as f32);
                adam.push(true);
                continue;
            }
            let beta_2_t = beta_2.powi(k as i32);
            let correction = 1.0 - beta_2_t;
            let rho_t = rho_inf - 2.0 * k as f64 * beta_2_t / correction;
            let factor = match rho_t > 4.0 {
                true => (((rho_t - 4.0) * (rho_t - 2.0) * rho_inf) / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)).sqrt(),
                false => 0.0,
            };
            rect.push(factor as f32);
            b2.push((1.0 - (1.0 - beta_2) / correction) as f32);
            fresh.push(((1.0 - beta_2) / correction) as f32);
            adam.push(rho_t > 4.0);
        }
        let floats = |v: Vec<f32>| Tensor::from_data(TensorData::new(v, [len]), device);
        Self { rect: floats(rect), beta_2: floats(b2), fresh: floats(fresh), adam: Tensor::from_data(TensorData::new(adam, [len]), device), len }
    }
}

/// Per-step masks of the tensors with a gradient, built once per pattern.
#[derive(Debug, Clone)]
struct PresentMasks<B: AutodiffBackend> {
    pattern: Vec<bool>,
    /// Per tensor in the grouped order.
    tensors: Tensor<B::InnerBackend, 1, Bool>,
    /// Per group: whether its last tensor has a gradient.
    last: Tensor<B::InnerBackend, 1, Bool>,
}

/// The optimizer's settings, layout, state and tables.
#[derive(Debug, Clone)]
pub(super) struct ProdigyPlus<B: AutodiffBackend> {
    settings: ProdigyPlusSettings,
    layout: Layout<B>,
    z: Tensor<B::InnerBackend, 1>,
    rows: Tensor<B::InnerBackend, 1>,
    cols: Tensor<B::InnerBackend, 1>,
    p0: Tensor<B::InnerBackend, 1>,
    s: Tensor<B::InnerBackend, 1>,
    scalars: Tensor<B::InnerBackend, 1>,
    tables: Tables<B>,
    masks: Option<PresentMasks<B>>,
    /// The last step's per-group sums and the scalars before it, for
    /// [`share_prodigy_plus`] to pool groups across optimizers.
    pending: Option<Pending<B>>,
}

/// What a step's estimate came from, per group: the estimate, `d_prev` and numerator before
/// the step, the step's sums, whether the estimate was to move (`prodigy_steps`) and
/// whether the step happened.
#[derive(Debug, Clone)]
struct Pending<B: AutodiffBackend> {
    d: Tensor<B::InnerBackend, 1>,
    d_prev: Tensor<B::InnerBackend, 1>,
    numerator: Tensor<B::InnerBackend, 1>,
    run_num: Tensor<B::InnerBackend, 1>,
    run_den: Tensor<B::InnerBackend, 1>,
    moves: Tensor<B::InnerBackend, 1, Bool>,
}

/// Prodigy's new estimate and numerator from the estimate `d`, the running `numerator` and
/// a step's sums (per group, or pooled).
fn estimate<B: burn::tensor::backend::Backend>(
    s: &ProdigyPlusSettings,
    d: Tensor<B, 1>,
    numerator: Tensor<B, 1>,
    run_num: Tensor<B, 1>,
    run_den: Tensor<B, 1>,
) -> (Tensor<B, 1>, Tensor<B, 1>) {
    let decayed = numerator.mul_scalar(s.beta_3());
    let grown = d.clone().greater_elem(s.d0);
    let negative = run_num.clone().lower_elem(0.0);
    let held = decayed.clone().mask_where(grown, decayed.clone().min_pair(run_num.clone()));
    let new_numerator = decayed.add(run_num).mask_where(negative, held);
    let d_hat = new_numerator.clone().mul_scalar(s.d_coef).atan2(run_den);
    let mut new_d = d.clone().max_pair(d_hat);
    if s.use_speed {
        new_d = new_d.min_pair(d.powf_scalar(0.975));
    }
    (new_d, new_numerator)
}

/// OrthoGrad (the package's `orthograd`): each row of `grad` (one tensor each) without its
/// component along the same row of `w`, rescaled to the gradient's norm.
fn orthograd<B: burn::tensor::backend::Backend>(w: Tensor<B, 2>, grad: Tensor<B, 2>) -> Tensor<B, 2> {
    let dot = w.clone().mul(grad.clone()).sum_dim(1);
    let proj = dot.div(w.clone().square().sum_dim(1).add_scalar(1e-30));
    let orth = grad.clone().sub(w.mul(proj));
    let norm = |x: Tensor<B, 2>| x.square().sum_dim(1).sqrt();
    let scale = norm(grad).div(norm(orth.clone()).add_scalar(1e-30));
    orth.mul(scale)
}

/// `x` rounded to the nearest bf16 (ties to even), kept in f32.
fn bf16<const D: usize, B: burn::tensor::backend::Backend>(x: Tensor<B, D>) -> Tensor<B, D> {
    x.cast(FloatDType::BF16).cast(FloatDType::F32)
}

/// Every 11th value of each row.
fn sliced<B: burn::tensor::backend::Backend>(x: Tensor<B, 2>) -> Tensor<B, 2> {
    x.slice([Slice::new(0, None, 1), Slice::new(0, None, SLICE as isize)])
}

fn ints<B: AutodiffBackend>(values: Vec<i64>, device: &Device<B::InnerBackend>) -> Tensor<B::InnerBackend, 1, Int> {
    let len = values.len();
    Tensor::from_data(TensorData::new(values, [len]), device)
}

impl<B: AutodiffBackend> FlatAdamW<B> {
    /// Prodigy + schedule-free ([`ProdigyPlusSettings`], the `prodigy-plus-schedule-free`
    /// package's `ProdigyPlusScheduleFree` 1.9.2, which kohya_ss pins) instead of Adam's
    /// update: schedule-free AdamW whose step size Prodigy estimates, with the package's
    /// changes (the estimate from every 11th value of each tensor, kept in bf16 as there;
    /// Adafactor's factored second moments for tensors with a dimension of 32 or more,
    /// rescaled by `(d_prev / d)²`; each tensor's update clipped to a root mean square of 1,
    /// StableAdamW; the average weighted by `(d·lr)²`), its quirks included so that a run
    /// follows one with the package (a group's average weight advances only when its last
    /// tensor had a gradient; with `split_groups = false` only the first group's `d_prev`
    /// follows `d`). Checked step by step against the package. With parameter groups: `group_of` gives each trained tensor's group
    /// (numbered from 0, each number used), as torch's `param_groups` (kohya puts the text
    /// encoder's, the UNet's, LoRA+'s `up` weights and each block's in their own). Each
    /// group estimates its own step size `d`; the learning rate (1 as a rule) times a
    /// group's factor of [`with_lr_scales`](Self::with_lr_scales), which must be one per
    /// group, multiplies it. As a schedule-free optimizer it trains at `y`: evaluate and
    /// save [`to_eval`](Self::to_eval)'s and [`to_master_eval`](Self::to_master_eval)'s
    /// values. Several optimizers of one run share their groups' harmonic mean through
    /// [`share_prodigy_plus`]. Tensors without a gradient in a
    /// step keep their values and state. Replaces the other updates. Errors on invalid
    /// settings or groups.
    ///
    /// ```
    /// use burn::backend::{Autodiff, Flex};
    /// use burn::nn::LinearConfig;
    /// use burn::optim::GradientsParams;
    /// use burn::tensor::{Distribution, Tensor};
    /// use lora_core::optim::{AdamWSettings, FlatAdamW, ProdigyPlusSettings};
    ///
    /// type B = Autodiff<Flex>;
    /// let device = Default::default();
    /// let mut layer = LinearConfig::new(4, 2).init::<B>(&device);
    /// let bias = layer.bias.as_ref().unwrap().id;
    /// // The weight and the bias in groups of their own.
    /// let mut optim = FlatAdamW::new(AdamWSettings::default(), &layer, &device)
    ///     .with_prodigy_plus(ProdigyPlusSettings::default(), |id| usize::from(id == bias))
    ///     .unwrap();
    /// for _ in 0..3 {
    ///     let x = Tensor::<B, 2>::random([3, 4], Distribution::Default, &device);
    ///     let grads = GradientsParams::from_grads(layer.forward(x).sum().backward(), &layer);
    ///     let grads = optim.gather_grads(&layer, grads);
    ///     layer = optim.step(1.0, layer, grads);
    /// }
    /// let d: Vec<f32> = optim.prodigy_plus_d().unwrap().into_data().to_vec().unwrap();
    /// assert_eq!(d.len(), 2);
    /// assert!(optim.is_schedule_free());
    /// ```
    pub fn with_prodigy_plus(mut self, settings: ProdigyPlusSettings, group_of: impl Fn(ParamId) -> usize) -> Result<Self> {
        settings.validate()?;
        self.refuse_rank_chunks("Prodigy + schedule-free")?;
        let device = self.params.device();
        let len = self.len();
        let tensor_groups: Vec<usize> = self.order.iter().map(|id| group_of(*id)).collect();
        // An optimizer without tensors (a model that trains nothing) keeps one empty group.
        let groups = tensor_groups.iter().max().map_or(1, |g| g + 1);
        if let Some(missing) = (0..groups).find(|g| !tensor_groups.contains(g)).filter(|_| !tensor_groups.is_empty()) {
            return Err(LoraError::Optimizer(format!("Prodigy + schedule-free: parameter group {missing} has no tensors (groups are numbered from 0)")));
        }
        let factors = self.group_factors(&tensor_groups, groups)?;
        let mut last_tensor = vec![0; groups];
        for (i, g) in tensor_groups.iter().enumerate() {
            last_tensor[*g] = i;
        }
        // Tensors by their PyTorch shape, in order of first appearance.
        let mut by_shape: Vec<(Vec<usize>, Vec<usize>)> = Vec::new();
        for (i, id) in self.order.iter().enumerate() {
            let slot = &self.slots[id];
            let shape = match &slot.torch {
                Some(TorchLayout::Transposed) => vec![slot.shape[1], slot.shape[0]],
                Some(TorchLayout::Reshaped(shape)) => shape.clone(),
                None => slot.shape.clone(),
            };
            if shape.len() > 4 {
                return Err(LoraError::Optimizer(format!("Prodigy + schedule-free: a tensor of {} dimensions (at most 4)", shape.len())));
            }
            match by_shape.iter_mut().find(|(s, _)| *s == shape) {
                Some((_, members)) => members.push(i),
                None => by_shape.push((shape, vec![i])),
            }
        }
        let (mut to_grouped, mut tensor_order, mut shapes) = (Vec::with_capacity(len), Vec::new(), Vec::new());
        let (mut sliced_len, mut rows, mut cols) = (0, 0, 0);
        let mut p0_parts = Vec::new();
        for (shape, members) in by_shape {
            let len_t: usize = shape.iter().product();
            let mut dims = [1usize; 4];
            dims[..shape.len()].copy_from_slice(&shape);
            let factored = if settings.factored { factored_dims(&shape) } else { None };
            let group = ShapeGroup {
                tensors: members.len(),
                dims,
                len: len_t,
                sliced: len_t.div_ceil(SLICE),
                factored,
                offset: to_grouped.len(),
                sliced_offset: sliced_len,
                row_offset: rows,
                col_offset: cols,
                first: tensor_order.len(),
                groups: ints::<B>(members.iter().map(|i| tensor_groups[*i] as i64).collect(), &device),
            };
            for i in &members {
                let slot = &self.slots[&self.order[*i]];
                let offset = slot.offset;
                match slot.torch == Some(TorchLayout::Transposed) {
                    // PyTorch's row-major order of the transpose: its element (r, c) is
                    // ours (c, r).
                    true => {
                        let (torch_rows, torch_cols) = (shape[0], shape[1]);
                        to_grouped.extend((0..torch_rows).flat_map(|r| (0..torch_cols).map(move |c| (offset + c * torch_rows + r) as i64)));
                    }
                    false => to_grouped.extend((offset..offset + len_t).map(|e| e as i64)),
                }
                tensor_order.push(*i);
            }
            sliced_len += group.tensors * group.sliced;
            if let Some(f) = factored {
                rows += group.tensors * f.row_len;
                cols += group.tensors * f.col_len;
            }
            shapes.push(group);
        }
        let mut to_flat = vec![0i64; len];
        for (g, f) in to_grouped.iter().enumerate() {
            to_flat[*f as usize] = g as i64;
        }
        let (to_grouped, to_flat) = (ints::<B>(to_grouped, &device), ints::<B>(to_flat, &device));
        let grouped_params = match len {
            0 => self.params.clone(),
            _ => self.params.clone().select(0, to_grouped.clone()),
        };
        for g in &shapes {
            if g.len == 0 {
                continue;
            }
            let values = grouped_params.clone().slice(g.offset..g.offset + g.tensors * g.len).reshape([g.tensors, g.len]);
            p0_parts.push(bf16(sliced(values)).reshape([g.tensors * g.sliced]));
        }
        let mut element_group = vec![0i64; len];
        for (i, id) in self.order.iter().enumerate() {
            let slot = &self.slots[id];
            element_group[slot.offset..slot.offset + slot.len].fill(tensor_groups[i] as i64);
        }
        let mut element_tensor = vec![0i64; len];
        for (t, i) in tensor_order.iter().enumerate() {
            let slot = &self.slots[&self.order[*i]];
            element_tensor[slot.offset..slot.offset + slot.len].fill(t as i64);
        }
        let pooled = !settings.split_groups || groups == 1;
        let tensors = tensor_order.len();
        let mut sum = vec![0f32; groups * tensors];
        for (t, i) in tensor_order.iter().enumerate() {
            let g = if pooled { 0 } else { tensor_groups[*i] };
            sum[g * tensors + t] = 1.0;
        }
        let layout = Layout {
            shapes,
            to_grouped,
            to_flat,
            element_group: ints::<B>(element_group, &device),
            element_tensor: ints::<B>(element_tensor, &device),
            tensor_order,
            sum_matrix: Tensor::from_data(TensorData::new(sum, [groups, tensors]), &device),
            groups,
            live: Tensor::from_data(TensorData::new(factors.iter().map(|f| f32::from(u8::from(*f != 0.0))).collect::<Vec<_>>(), [groups]), &device),
            live_groups: factors.iter().map(|f| *f != 0.0).collect(),
            live_count: factors.iter().filter(|f| **f != 0.0).count(),
            frozen: tensor_groups.iter().map(|g| factors[*g] == 0.0).collect(),
            factors: Tensor::from_data(TensorData::new(factors, [groups]), &device),
            last_tensor,
        };
        let mut scalars = vec![settings.d0; groups * 2];
        scalars.extend(vec![0.0; groups * 2]);
        scalars.extend([1.0, settings.d0]);
        let p0 = match p0_parts.is_empty() {
            true => Tensor::zeros([0], &device),
            false => Tensor::cat(p0_parts, 0),
        };
        self.clear_rules();
        self.prodigy_plus = Some(ProdigyPlus {
            settings,
            z: self.params.clone(),
            rows: Tensor::zeros([rows], &device),
            cols: Tensor::zeros([cols], &device),
            s: Tensor::zeros([sliced_len], &device),
            p0,
            scalars: Tensor::from_data(TensorData::new(scalars, [groups * 4 + 2]), &device),
            tables: Tables::new(&settings, BIAS_TABLE_MIN, &device),
            layout,
            masks: None,
            pending: None,
        });
        Ok(self)
    }

    /// Each group's learning-rate factor ([`with_lr_scales`](Self::with_lr_scales)); an
    /// error when a group's tensors have different ones. Reads the factors (a sync).
    fn group_factors(&self, tensor_groups: &[usize], groups: usize) -> Result<Vec<f32>> {
        let Some(scales) = &self.lr_scales else { return Ok(vec![1.0; groups]) };
        let scales: Vec<f32> = scales.clone().into_data().convert::<f32>().to_vec().unwrap_or_default();
        let mut factors: Vec<Option<f32>> = vec![None; groups];
        for (id, g) in self.order.iter().zip(tensor_groups) {
            let slot = &self.slots[id];
            let Some(factor) = scales.get(slot.offset).copied() else { continue };
            match factors[*g] {
                Some(f) if f != factor => {
                    return Err(LoraError::Optimizer(format!("Prodigy + schedule-free: parameter group {g} holds tensors at learning-rate factors {f} and {factor}; give each factor its own group")))
                }
                _ => factors[*g] = Some(factor),
            }
        }
        Ok(factors.into_iter().map(|f| f.unwrap_or(1.0)).collect())
    }

    /// The Prodigy + schedule-free settings (`None` without it).
    pub fn prodigy_plus_settings(&self) -> Option<ProdigyPlusSettings> {
        self.prodigy_plus.as_ref().map(|p| p.settings)
    }

    /// Each parameter group's estimate `d` (shape `[groups]`, on the device); `None`
    /// without Prodigy + schedule-free.
    pub fn prodigy_plus_d(&self) -> Option<Tensor<B::InnerBackend, 1>> {
        self.prodigy_plus.as_ref().map(|p| p.scalars.clone().slice(0..p.layout.groups))
    }

    /// The estimate the next step takes (shape `[1]`, on the device): the groups' shared
    /// harmonic mean (`split_groups` and `split_groups_mean`), else the first group's `d`.
    /// A group's step size is this times the learning rate and its factor.
    pub fn prodigy_plus_step_d(&self) -> Option<Tensor<B::InnerBackend, 1>> {
        self.prodigy_plus.as_ref().map(|p| {
            let g = p.layout.groups;
            match p.settings.split_groups && p.settings.split_groups_mean {
                true => p.scalars.clone().slice(4 * g + 1..4 * g + 2),
                false => p.scalars.clone().slice(0..1),
            }
        })
    }

    /// Sets the shared estimate of the next steps (shape `[1]`): what
    /// [`share_prodigy_plus`] computes over several optimizers.
    fn set_prodigy_plus_shared_d(&mut self, d: Tensor<B::InnerBackend, 1>) {
        if let Some(p) = self.prodigy_plus.as_mut() {
            let g = p.layout.groups;
            p.scalars = p.scalars.clone().slice_assign(4 * g + 1..4 * g + 2, d);
        }
    }

    /// The Prodigy + schedule-free state, to save with a run (`None` without it).
    pub fn prodigy_plus_state(&self) -> Option<ProdigyPlusState<B>> {
        self.prodigy_plus.as_ref().map(|p| ProdigyPlusState {
            z: p.z.clone(),
            rows: p.rows.clone(),
            cols: p.cols.clone(),
            p0: p.p0.clone(),
            s: p.s.clone(),
            scalars: p.scalars.clone(),
        })
    }

    /// Restores the Prodigy + schedule-free state (resuming a run); an error without it or
    /// when the lengths do not fit this optimizer's tensors and groups. Reads the step
    /// count (a sync), which the per-step tables must cover.
    pub fn set_prodigy_plus_state(&mut self, state: ProdigyPlusState<B>) -> Result<()> {
        let len = self.len();
        let Some(p) = self.prodigy_plus.as_mut() else {
            return Err(LoraError::Optimizer("this optimizer is not Prodigy + schedule-free".into()));
        };
        let expected = [
            ("z", &state.z, len),
            ("rows", &state.rows, p.rows.dims()[0]),
            ("cols", &state.cols, p.cols.dims()[0]),
            ("p0", &state.p0, p.p0.dims()[0]),
            ("s", &state.s, p.s.dims()[0]),
            ("scalars", &state.scalars, p.scalars.dims()[0]),
        ];
        for (name, tensor, expected) in expected {
            if tensor.dims()[0] != expected {
                return Err(LoraError::ShapeMismatch {
                    key: format!("Prodigy + schedule-free state {name}"),
                    reason: format!("{} values, the optimizer needs {expected}", tensor.dims()[0]),
                });
            }
        }
        let g = p.layout.groups;
        let k: f32 = state.scalars.clone().slice(4 * g..4 * g + 1).into_scalar().elem();
        (p.z, p.rows, p.cols, p.p0, p.s, p.scalars) = (state.z, state.rows, state.cols, state.p0, state.s, state.scalars);
        p.pending = None;
        self.raise_time_bound(k.max(0.0) as usize);
        Ok(())
    }

    /// The masks of the tensors with a gradient (`present`, in the optimizer's order), in
    /// the layout's orders.
    fn prodigy_plus_masks(&mut self, present: &[bool]) -> Option<PresentMasks<B>> {
        let p = self.prodigy_plus.as_mut()?;
        if let Some(m) = &p.masks && m.pattern.as_slice() == present {
            return Some(m.clone());
        }
        let device = self.params.device();
        let tensors: Vec<bool> = p.layout.tensor_order.iter().map(|i| present[*i]).collect();
        let last: Vec<bool> = p.layout.last_tensor.iter().map(|i| present[*i]).collect();
        let (t, g) = (tensors.len(), last.len());
        let masks = PresentMasks {
            pattern: present.to_vec(),
            tensors: Tensor::from_data(TensorData::new(tensors, [t]), &device),
            last: Tensor::from_data(TensorData::new(last, [g]), &device),
        };
        p.masks = Some(masks.clone());
        Some(masks)
    }

    /// One `ProdigyPlusScheduleFree.step`, in f32 on the device (see the [module
    /// docs](self)); `present` marks the tensors with a gradient, `apply` (one value)
    /// whether the step happens at all.
    pub(super) fn prodigy_plus_step(&mut self, lr: f64, grad: Tensor<B::InnerBackend, 1>, present: &[bool], apply: Option<Tensor<B::InnerBackend, 1, Bool>>) {
        // A group at a factor of 0 is out of the optimizer, as in kohya: as if without a
        // gradient.
        let Some(frozen) = self.prodigy_plus.as_ref().map(|p| &p.layout.frozen) else { return };
        let present: Vec<bool> = present.iter().zip(frozen).map(|(p, f)| *p && !*f).collect();
        let Some(masks) = self.prodigy_plus_masks(&present) else { return };
        let flat_present = self.present_mask(&present);
        let Some(mut st) = self.prodigy_plus.take() else { return };
        self.raise_time_bound(self.time_bound + 1);
        let device = self.params.device();
        // `k` starts at 1 and is at most the steps queued so far plus one.
        if st.tables.len <= self.time_bound + 1 {
            st.tables = Tables::new(&st.settings, (self.time_bound + 2).next_power_of_two().max(BIAS_TABLE_MIN), &device);
        }
        let s = st.settings;
        let (groups, len) = (st.layout.groups, self.len());
        let scalar = |i: usize, n: usize| st.scalars.clone().slice(i..i + n);
        let (d, d_prev, numerator, weight_sum) = (scalar(0, groups), scalar(groups, groups), scalar(2 * groups, groups), scalar(3 * groups, groups));
        let (k, shared) = (scalar(4 * groups, 1), scalar(4 * groups + 1, 1));
        let k_index = k.clone().int();
        let happens = apply.unwrap_or_else(|| Tensor::<B::InnerBackend, 1, Bool>::from_bool([true].into(), &device));
        let moved_tensors = masks.tensors.clone().bool_and(happens.clone().expand([masks.tensors.dims()[0]]));

        // Per group: the step size `d·lr` (the shared estimate with split groups and their
        // mean), β₂·(d_prev/d)², the clip threshold and Prodigy's `√d` factor.
        let base = match s.split_groups && s.split_groups_mean {
            true => shared.clone().expand([groups]),
            false => d.clone(),
        };
        let mut dlr = base.mul(st.layout.factors.clone()).mul_scalar(lr);
        if s.use_bias_correction {
            dlr = dlr.mul(st.tables.rect.clone().select(0, k_index.clone()).expand([groups]));
        }
        let beta_2 = st.tables.beta_2.clone().select(0, k_index.clone());
        let d_k = d_prev.clone().div(d.clone());
        let mut decay = d_k.square().mul(beta_2.clone().expand([groups]));
        let mut fresh = st.tables.fresh.clone().select(0, k_index.clone());
        // ADOPT's first step only fills the second moments (β₂ = 0); nothing moves.
        let adopt_first = s.use_adopt.then(|| k.clone().equal_elem(1.0));
        if let Some(first) = &adopt_first {
            decay = decay.mask_fill(first.clone().expand([groups]), 0.0);
            fresh = fresh.mask_fill(first.clone(), 1.0);
        }
        // Where the values and Prodigy's sums move: the tensors with a gradient, unless
        // this is ADOPT's first step.
        let steps_tensors = match &adopt_first {
            None => moved_tensors.clone(),
            Some(first) => moved_tensors.clone().bool_and(first.clone().bool_not().expand([moved_tensors.dims()[0]])),
        };
        let clip = match s.use_speed {
            true => Tensor::ones([groups], &device),
            false => Tensor::<B::InnerBackend, 1>::ones([groups], &device).mask_fill(d.clone().lower_equal_elem(s.d0), 50.0),
        };
        let mut d_update = d.clone().sqrt();
        if s.use_speed {
            d_update = d_update.mul_scalar(s.d0);
        }
        let adam_step = st.tables.adam.clone().select(0, k_index.clone());
        let beta_3 = s.beta_3();

        let grouped = |x: Tensor<B::InnerBackend, 1>| x.select(0, st.layout.to_grouped.clone());
        let (grad_g, y_g, v_g) = (grouped(grad), grouped(self.params.clone()), grouped(self.moment_2.clone()));
        let z_g = s.use_orthograd.then(|| grouped(st.z.clone()));
        let (mut updates, mut moments, mut rows, mut cols, mut sums, mut numerators, mut denominators) = (vec![], vec![], vec![], vec![], vec![], vec![], vec![]);
        for g in &st.layout.shapes {
            let (n, l) = (g.tensors, g.len);
            if n * l == 0 {
                // Empty tensors: no values, nothing to the sums.
                numerators.push(Tensor::zeros([n], &device));
                denominators.push(Tensor::zeros([n], &device));
                continue;
            }
            let [a, b, c, e] = g.dims;
            let shape = [n, a, b, c, e];
            let per = |v: Tensor<B::InnerBackend, 1>| v.select(0, g.groups.clone()).reshape([n, 1, 1, 1, 1]);
            let moved = moved_tensors.clone().slice(g.first..g.first + n);
            let moved5 = moved.clone().reshape([n, 1, 1, 1, 1]);
            let stepped = steps_tensors.clone().slice(g.first..g.first + n);
            let range = g.offset..g.offset + n * l;
            let raw = grad_g.clone().slice(range.clone()).reshape(shape);
            let grad = match &z_g {
                None => raw.clone(),
                Some(z_g) => orthograd(z_g.clone().slice(range.clone()).reshape([n, l]), raw.clone().reshape([n, l])).reshape(shape),
            };
            let (dec, fr) = (per(decay.clone()), fresh.clone().reshape([1, 1, 1, 1, 1]));
            let denom = match g.factored {
                Some(f) => {
                    let sq = grad.clone().square();
                    let mut row_shape = shape;
                    row_shape[f.dr + 1] = 1;
                    let mut col_shape = shape;
                    col_shape[f.dc + 1] = 1;
                    let row_mean = sq.clone().sum_dim(f.dr + 1).mul_scalar(1.0 / shape[f.dr + 1] as f64);
                    let col_mean = sq.sum_dim(f.dc + 1).mul_scalar(1.0 / shape[f.dc + 1] as f64);
                    let old_rows = st.rows.clone().slice(g.row_offset..g.row_offset + n * f.row_len).reshape(row_shape);
                    let old_cols = st.cols.clone().slice(g.col_offset..g.col_offset + n * f.col_len).reshape(col_shape);
                    let new_rows = old_rows.clone().mul(dec.clone()).add(row_mean.mul(fr.clone()));
                    let new_cols = old_cols.clone().mul(dec).add(col_mean.mul(fr));
                    rows.push(old_rows.clone().mask_where(moved5.clone().expand(row_shape), new_rows.clone()).reshape([n * f.row_len]));
                    cols.push(old_cols.clone().mask_where(moved5.clone().expand(col_shape), new_cols.clone()).reshape([n * f.col_len]));
                    moments.push(v_g.clone().slice(range.clone()));
                    // ADOPT divides by the moments before they take this gradient.
                    let (r, c) = if s.use_adopt { (old_rows, old_cols) } else { (new_rows, new_cols) };
                    let mean = r.clone().mean_dim(f.reduce + 1).add_scalar(1e-30);
                    r.div(mean).sqrt().mul(c.sqrt())
                }
                None => {
                    let old = v_g.clone().slice(range.clone()).reshape(shape);
                    let new = old.clone().mul(dec).add(grad.clone().square().mul(fr));
                    moments.push(old.clone().mask_where(moved5.clone().expand(shape), new.clone()).reshape([n * l]));
                    if s.use_adopt { old.sqrt() } else { new.sqrt() }
                }
            };
            let mut update = match s.eps > 0.0 {
                true => grad.clone().div(denom.add_scalar(s.eps)),
                false => {
                    // Adam-atan2, scaled by the clip threshold to an Adam-like size.
                    let b = per(clip.clone());
                    grad.clone().atan2(denom.mul(b.clone())).mul(b)
                }
            };
            if s.use_bias_correction {
                // Before the rectification is defined, the raw gradient (at a step size of 0).
                update = grad.clone().mask_where(adam_step.clone().reshape([1, 1, 1, 1, 1]).expand(shape), update);
            }
            if s.stable() {
                let rms = update.clone().reshape([n, l]).square().sum_dim(1).div_scalar(l as f64).sqrt().clamp_min(1.0);
                let rms = rms.reshape([n, 1, 1, 1, 1]).div(per(clip.clone())).clamp_min(1.0);
                update = update.div(rms);
            }
            updates.push(update.reshape([n * l]));

            // Prodigy's statistics over every 11th value, at the values before the step.
            let m = g.sliced;
            let srange = g.sliced_offset..g.sliced_offset + n * m;
            // The raw gradient (OrthoGrad changes only the update's).
            let mut grad_s = sliced(raw.reshape([n, l]));
            let y_s = sliced(y_g.clone().slice(range).reshape([n, l]));
            let p0 = st.p0.clone().slice(srange.clone()).reshape([n, m]);
            let mut dot = p0.sub(y_s).mul(grad_s.clone()).sum_dim(1);
            if s.use_speed {
                (dot, grad_s) = (dot.sign(), grad_s.sign());
            }
            let du = d_update.clone().select(0, g.groups.clone()).reshape([n, 1]);
            let old_s = st.s.clone().slice(srange).reshape([n, m]);
            let new_s = bf16(bf16(old_s.clone().mul_scalar(beta_3)).add(grad_s.mul(du.clone())));
            denominators.push(bf16(new_s.clone().abs().sum_dim(1)).reshape([n]));
            numerators.push(dot.mul(du).reshape([n]));
            sums.push(old_s.mask_where(stepped.reshape([n, 1]).expand([n, m]), new_s).reshape([n * m]));
        }
        let tensors = masks.tensors.dims()[0];
        if updates.is_empty() {
            self.prodigy_plus = Some(st);
            return;
        }
        let to_flat = |parts: Vec<Tensor<B::InnerBackend, 1>>| Tensor::cat(parts, 0).select(0, st.layout.to_flat.clone());
        let (mut update, v) = (to_flat(updates), to_flat(moments));
        let live = Tensor::<B::InnerBackend, 1>::zeros([tensors], &device).mask_fill(steps_tensors, 1.0).reshape([tensors, 1]);
        let group_sum = |parts: Vec<Tensor<B::InnerBackend, 1>>| st.layout.sum_matrix.clone().matmul(Tensor::cat(parts, 0).reshape([tensors, 1]).mul(live.clone())).reshape([groups]);
        let (run_num, run_den) = (group_sum(numerators), group_sum(denominators));

        // The schedule-free step, per value with its group's scalars.
        let (beta_1, _) = s.betas;
        let weight = dlr.clone().square();
        let weight_step = weight_sum.clone().add(weight.clone());
        let ckp1 = weight.div(weight_step.clone()).mask_fill(weight_step.clone().lower_equal_elem(0.0), 0.0);
        let xy_step = ckp1.clone().neg().add_scalar(1.0).mul_scalar(beta_1).neg().add_scalar(1.0);
        let per_value = |v: Tensor<B::InnerBackend, 1>| v.select(0, st.layout.element_group.clone());
        let (dlr_v, ckp1_v, xy_v) = (per_value(dlr), per_value(ckp1), per_value(xy_step));
        let (y, z) = (self.params.clone(), st.z.clone());
        if s.weight_decay != 0.0 && s.weight_decay_by_lr {
            update = update.add(y.clone().mul_scalar(s.weight_decay));
        }
        let (mut new_y, mut new_z) = match s.use_cautious || s.grams() {
            false => {
                // torch's `lerp`: from the nearer end.
                let diff = z.clone().sub(y.clone());
                let far = ckp1_v.clone().greater_equal_elem(0.5);
                let toward = y.clone().add(diff.clone().mul(ckp1_v.clone())).mask_where(far, z.clone().sub(diff.mul(ckp1_v.neg().add_scalar(1.0))));
                (toward.sub(update.clone().mul(dlr_v.clone().mul(xy_v.clone()))), z.sub(update.mul(dlr_v)))
            }
            true => {
                // y's whole step `u`, masked (C-Optim) or given the update's signs (Grams).
                let u = y.clone().sub(z.clone()).mul(ckp1_v).add(update.clone().mul(dlr_v.clone().mul(xy_v.clone())));
                let new_z = z.sub(update.clone().mul(dlr_v));
                let u = match s.use_cautious {
                    true => {
                        let mask = update.mul(u.clone()).sign().clamp_min(0.0);
                        let mean = self.per_tensor_mean(&st.layout, mask.clone()).clamp_min(1e-3);
                        u.mul(mask.div(mean))
                    }
                    false => u.abs().mul(update.sign()),
                };
                (y.clone().sub(u), new_z)
            }
        };
        if s.weight_decay != 0.0 && !s.weight_decay_by_lr {
            new_z = new_z.sub(y.clone().mul_scalar(s.weight_decay));
            new_y = new_y.sub(y.mul(xy_v.mul_scalar(s.weight_decay)));
        }
        let moved = match &flat_present {
            None => happens.clone().expand([len]),
            Some(present) => happens.clone().expand([len]).bool_and(present.clone()),
        };
        self.moment_2 = self.moment_2.clone().mask_where(moved.clone(), v);
        let moved = match &adopt_first {
            None => moved,
            Some(first) => moved.bool_and(first.clone().bool_not().expand([len])),
        };
        self.params = self.params.clone().mask_where(moved.clone(), new_y);
        self.time = self.time.clone().add(moved.clone().int());
        st.z = st.z.clone().mask_where(moved, new_z);
        if !rows.is_empty() {
            (st.rows, st.cols) = (Tensor::cat(rows, 0), Tensor::cat(cols, 0));
        }
        st.s = Tensor::cat(sums, 0);

        // The end of the step: the estimate from the running sums, per group or pooled.
        let active = match s.prodigy_steps {
            0 => Tensor::<B::InnerBackend, 1, Bool>::from_bool([true].into(), &device),
            steps => k.clone().lower_elem(steps as f64),
        };
        st.pending = Some(Pending {
            d: d.clone(),
            d_prev: d_prev.clone(),
            numerator: numerator.clone(),
            run_num: run_num.clone(),
            run_den: run_den.clone(),
            moves: active.clone().bool_and(happens.clone()),
        });
        let (new_d, new_numerator) = estimate(&s, d.clone(), numerator.clone(), run_num, run_den);
        let (new_d, new_d_prev, new_numerator) = match s.split_groups && groups > 1 {
            true => (new_d, d.clone(), new_numerator),
            false => {
                // The pooled values (in the first group's row) for all; only the first
                // group's `d_prev` follows: the first that trains (kohya leaves the others
                // out of the optimizer).
                let first = |v: Tensor<B::InnerBackend, 1>| v.slice(0..1).expand([groups]);
                let lead = st.layout.live_groups.iter().position(|l| *l).unwrap_or(0);
                let d_prev = d_prev.clone().slice_assign(lead..lead + 1, d.clone().slice(lead..lead + 1));
                (first(new_d), d_prev, first(new_numerator))
            }
        };
        let active = active.expand([groups]);
        let new_d = d.clone().mask_where(active.clone(), new_d);
        let new_d_prev = d_prev.mask_where(active.clone(), new_d_prev);
        let new_numerator = numerator.mask_where(active, new_numerator);
        // A group's weight sum advances when its last tensor took a step.
        let advances = match &adopt_first {
            None => masks.last.clone(),
            Some(first) => masks.last.clone().bool_and(first.clone().bool_not().expand([groups])),
        };
        let new_weight_sum = weight_sum.mask_where(advances, weight_step);
        let new_shared = match s.split_groups && s.split_groups_mean && st.layout.live_count > 0 {
            true => new_d.clone().recip().mul(st.layout.live.clone()).sum().recip().mul_scalar(st.layout.live_count as f64),
            false => shared,
        };
        let new_scalars = Tensor::cat(vec![new_d, new_d_prev, new_numerator, new_weight_sum, k.add_scalar(1.0), new_shared], 0);
        st.scalars = st.scalars.clone().mask_where(happens.expand([4 * groups + 2]), new_scalars);
        self.prodigy_plus = Some(st);
    }

    /// Each value's tensor's mean of `x` (flat order in and out).
    fn per_tensor_mean(&self, layout: &Layout<B>, x: Tensor<B::InnerBackend, 1>) -> Tensor<B::InnerBackend, 1> {
        let grouped = x.select(0, layout.to_grouped.clone());
        let means: Vec<_> = layout
            .shapes
            .iter()
            .map(|g| match g.len {
                // Empty tensors keep their places in the tensor order.
                0 => Tensor::zeros([g.tensors], &grouped.device()),
                l => grouped.clone().slice(g.offset..g.offset + g.tensors * l).reshape([g.tensors, l]).mean_dim(1).reshape([g.tensors]),
            })
            .collect();
        Tensor::cat(means, 0).select(0, layout.element_tensor.clone())
    }

    /// Prodigy + schedule-free's base sequence `z` and its β₁.
    pub(super) fn prodigy_plus_z(&self) -> Option<(Tensor<B::InnerBackend, 1>, f32)> {
        self.prodigy_plus.as_ref().map(|p| (p.z.clone(), p.settings.betas.0))
    }
}

/// Makes several Prodigy + schedule-free optimizers of one run (one per model: a UNet's
/// and its text encoders') step as the package's one `ProdigyPlusScheduleFree` over all
/// their groups: call it after each round of steps, the optimizers in the package's order
/// of groups (kohya's: the text encoders' first). `pools` lists the groups that are one
/// group there, each as `(optimizer, group)` pairs in the package's order of their tensors
/// (kohya puts SDXL's two text encoders' adapters in one group, and their LoRA+ `up`
/// weights in another): their sums make one estimate and, as one group's, their average
/// advances when the pool's last tensor had a gradient. With `split_groups` and
/// `split_groups_mean`, all step at the harmonic mean of the groups' estimates (a pool
/// counts once; groups at a learning-rate factor of 0 and optimizers that train nothing do
/// not count, as kohya leaves them out). Without `split_groups` every group's sums make
/// one estimate, and only the package's first group (the first that trains, with its
/// pool) has its `d_prev` follow it. The settings are the first optimizer's; optimizers
/// without Prodigy + schedule-free are left alone. On the device, no read. Errors on a pool
/// naming an optimizer or group that is not there, naming one twice, or mixing groups that
/// train with groups at a factor of 0.
///
/// ```
/// use burn::backend::{Autodiff, Flex};
/// use burn::nn::LinearConfig;
/// use lora_core::optim::{share_prodigy_plus, AdamWSettings, FlatAdamW, ProdigyPlusSettings};
///
/// type B = Autodiff<Flex>;
/// let device = Default::default();
/// let (unet, te) = (LinearConfig::new(4, 2).init::<B>(&device), LinearConfig::new(3, 2).init::<B>(&device));
/// let new = |m: &burn::nn::Linear<B>| FlatAdamW::new(AdamWSettings::default(), m, &device).with_prodigy_plus(ProdigyPlusSettings::default(), |_| 0).unwrap();
/// let (mut a, mut b) = (new(&te), new(&unet));
/// share_prodigy_plus(&mut [&mut a, &mut b], &[]).unwrap();
/// let d: f32 = b.prodigy_plus_step_d().unwrap().into_scalar();
/// assert!((d - 1e-6).abs() < 1e-12, "the mean of two starting estimates: {d}");
/// ```
pub fn share_prodigy_plus<B: AutodiffBackend>(optims: &mut [&mut FlatAdamW<B>], pools: &[Vec<(usize, usize)>]) -> Result<()> {
    let layout_of = |o: &FlatAdamW<B>| o.prodigy_plus.as_ref().filter(|_| !o.is_empty()).map(|p| (p.layout.groups, p.layout.live_groups.clone()));
    let mut seen = Vec::new();
    for pool in pools {
        let mut live = Vec::new();
        for &(o, g) in pool {
            let Some((_, live_groups)) = optims.get(o).and_then(|o| layout_of(o)).filter(|(groups, _)| g < *groups) else {
                return Err(LoraError::Optimizer(format!("Prodigy + schedule-free: a pooled group ({o}, {g}) names no optimizer's parameter group")));
            };
            if seen.contains(&(o, g)) {
                return Err(LoraError::Optimizer(format!("Prodigy + schedule-free: the group ({o}, {g}) is pooled twice")));
            }
            seen.push((o, g));
            live.push(live_groups[g]);
        }
        if live.iter().any(|l| *l != live[0]) {
            return Err(LoraError::Optimizer(format!("Prodigy + schedule-free: the pool {pool:?} mixes groups that train with groups at a learning-rate factor of 0")));
        }
    }
    let Some(settings) = optims.iter().find_map(|o| o.prodigy_plus_settings()) else { return Ok(()) };
    let pools: Vec<&Vec<(usize, usize)>> = pools.iter().filter(|p| p.len() > 1).collect();
    if settings.split_groups {
        for pool in &pools {
            pool_estimate(optims, pool, &settings);
        }
    } else {
        pool_all(optims, &pools, &settings);
    }
    for pool in &pools {
        share_weight_sum(optims, pool);
    }
    if !(settings.split_groups && settings.split_groups_mean) {
        return Ok(());
    }
    // The groups that train count, a pool once.
    let (mut inverses, mut count) = (Vec::new(), 0);
    for (i, o) in optims.iter().enumerate() {
        let (Some((groups, live)), Some(p)) = (layout_of(o), o.prodigy_plus.as_ref()) else { continue };
        let mut counted = vec![1f32; groups];
        for pool in &pools {
            pool.iter().skip(1).filter(|(o, _)| *o == i).for_each(|(_, g)| counted[*g] = 0.0);
        }
        count += counted.iter().zip(&live).filter(|(c, live)| **c != 0.0 && **live).count();
        let counted = Tensor::from_data(TensorData::new(counted, [groups]), &p.scalars.device()).mul(p.layout.live.clone());
        inverses.push(p.scalars.clone().slice(0..groups).recip().mul(counted));
    }
    if count == 0 {
        return Ok(());
    }
    let mean = Tensor::cat(inverses, 0).sum().recip().mul_scalar(count as f64);
    for o in optims.iter_mut() {
        o.set_prodigy_plus_shared_d(mean.clone());
    }
    Ok(())
}

/// The last step's [`Pending`] sums of the `(optimizer, group)` pairs, when each has them.
fn pending_of<B: AutodiffBackend>(optims: &[&mut FlatAdamW<B>], pairs: &[(usize, usize)]) -> Option<Vec<(Pending<B>, usize)>> {
    pairs.iter().map(|&(o, g)| optims[o].prodigy_plus.as_ref().and_then(|p| p.pending.clone()).map(|q| (q, g))).collect()
}

/// One value of a per-group vector.
fn at<B: burn::tensor::backend::Backend>(t: &Tensor<B, 1>, g: usize) -> Tensor<B, 1> {
    t.clone().slice(g..g + 1)
}

/// One value on the device, `[1]`.
type Scalar<B> = Tensor<<B as AutodiffBackend>::InnerBackend, 1>;

/// The estimate and numerator of the pairs' sums together, from the first pair's state
/// (where the last step moved the estimate; else the state before it).
fn joint_estimate<B: AutodiffBackend>(pending: &[(Pending<B>, usize)], s: &ProdigyPlusSettings) -> Option<(Scalar<B>, Scalar<B>)> {
    let (first, g0) = pending.first()?;
    let run_num = pending.iter().map(|(q, g)| at(&q.run_num, *g)).reduce(|a, b| a.add(b))?;
    let run_den = pending.iter().map(|(q, g)| at(&q.run_den, *g)).reduce(|a, b| a.add(b))?;
    let (d, numerator) = (at(&first.d, *g0), at(&first.numerator, *g0));
    let (new_d, new_numerator) = estimate(s, d.clone(), numerator.clone(), run_num, run_den);
    Some((d.mask_where(first.moves.clone(), new_d), numerator.mask_where(first.moves.clone(), new_numerator)))
}

/// Sets the estimate and numerator of `groups` (a range of one optimizer's groups).
fn set_estimate<B: AutodiffBackend>(o: &mut FlatAdamW<B>, groups: std::ops::Range<usize>, d: &Tensor<B::InnerBackend, 1>, numerator: &Tensor<B::InnerBackend, 1>) {
    let Some(p) = o.prodigy_plus.as_mut() else { return };
    let (g, n) = (p.layout.groups, groups.len());
    p.scalars = p.scalars.clone().slice_assign(groups.clone(), d.clone().expand([n]));
    p.scalars = p.scalars.clone().slice_assign(2 * g + groups.start..2 * g + groups.end, numerator.clone().expand([n]));
}

/// With `split_groups`: one estimate for the groups of `pool` from their sums together.
fn pool_estimate<B: AutodiffBackend>(optims: &mut [&mut FlatAdamW<B>], pool: &[(usize, usize)], s: &ProdigyPlusSettings) {
    let Some((d, numerator)) = pending_of(optims, pool).and_then(|pending| joint_estimate(&pending, s)) else { return };
    for &(o, g) in pool {
        set_estimate(optims[o], g..g + 1, &d, &numerator);
    }
}

/// Without `split_groups`: one estimate for every group of every optimizer from all their
/// sums (each optimizer's step pooled its own into its first group's), and the `d_prev`
/// that each step let follow kept only for the package's first group: the first optimizer
/// with a group that trains, its first such group, and that group's pool.
fn pool_all<B: AutodiffBackend>(optims: &mut [&mut FlatAdamW<B>], pools: &[&Vec<(usize, usize)>], s: &ProdigyPlusSettings) {
    let first_live = |o: &FlatAdamW<B>| o.prodigy_plus.as_ref().filter(|_| !o.is_empty()).and_then(|p| p.layout.live_groups.iter().position(|l| *l));
    let members: Vec<(usize, usize)> = optims.iter().enumerate().filter(|(_, o)| o.prodigy_plus.is_some() && !o.is_empty()).map(|(i, _)| (i, 0)).collect();
    if members.len() < 2 {
        return;
    }
    let Some(pending) = pending_of(optims, &members) else { return };
    let Some((d, numerator)) = joint_estimate(&pending, s) else { return };
    let leader = optims.iter().enumerate().find_map(|(i, o)| first_live(o).map(|g| (i, g)));
    let leaders: Vec<(usize, usize)> = match leader {
        Some(first) => pools.iter().find(|p| p.contains(&first)).map_or(vec![first], |p| p.to_vec()),
        None => Vec::new(),
    };
    for ((o, _), (q, _)) in members.iter().zip(&pending) {
        let groups = optims[*o].prodigy_plus.as_ref().map_or(0, |p| p.layout.groups);
        set_estimate(optims[*o], 0..groups, &d, &numerator);
        // The group whose `d_prev` the optimizer's own step let follow, unless it leads.
        let Some(own) = first_live(optims[*o]) else { continue };
        if !leaders.contains(&(*o, own)) && let Some(p) = optims[*o].prodigy_plus.as_mut() {
            p.scalars = p.scalars.clone().slice_assign(groups + own..groups + own + 1, at(&q.d_prev, own));
        }
    }
}

/// A pool's average weight: the package's group sum `Σ (d·lr)²` advances when the group's
/// last tensor (the pool's last member's) had a gradient; every member takes that one's.
fn share_weight_sum<B: AutodiffBackend>(optims: &mut [&mut FlatAdamW<B>], pool: &[(usize, usize)]) {
    let Some(&(last_o, last_g)) = pool.last() else { return };
    let Some(sum) = optims[last_o].prodigy_plus.as_ref().map(|p| at(&p.scalars, 3 * p.layout.groups + last_g)) else { return };
    for &(o, g) in &pool[..pool.len() - 1] {
        if let Some(p) = optims[o].prodigy_plus.as_mut() {
            let at_g = 3 * p.layout.groups + g;
            p.scalars = p.scalars.clone().slice_assign(at_g..at_g + 1, sum.clone());
        }
    }
}
