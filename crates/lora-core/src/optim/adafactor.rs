//! Adafactor on the flat vectors of a [`FlatAdamW`] ([`FlatAdamW::with_adafactor`]).
//!
//! Adafactor (Shazeer and Stern 2018, "Adafactor: Adaptive Learning Rates with Sublinear
//! Memory Cost") keeps, for every tensor of two or more dimensions, running means of the
//! squared gradient over its last dimension (one per row) and over its second-to-last
//! (one per column) instead of one per value, and divides the gradient by their
//! rank-one product. The arithmetic is that of the `transformers` package's `Adafactor`
//! (the one kohya's sd-scripts uses for `optimizer_type = "Adafactor"`), checked step by
//! step against it.
//!
//! The per-tensor quantities (the row and column means, the root mean squares of the
//! update and of the values) are reductions over each tensor. A LoRA's several hundred
//! adapter tensors come in a few shapes, so the step gathers the flat vectors into shape
//! groups (one gather each), reduces each group as one batched tensor (a few operations
//! per shape, not per tensor) and gathers the update back into flat order. (burn's
//! scatter-add ops, `select_assign` and `scatter`, run one GPU thread per indexed axis:
//! on a flat vector that is one thread for all values, so segment sums with them would
//! be serial.)
//!
//! CAME ([`FlatAdamW::with_came`]; Luo et al. 2023, "CAME: Confidence-guided Adaptive
//! Memory Efficient Optimization", the `came-pytorch` package) is Adafactor's factored
//! update with a constant β₂, a first moment, and that moment scaled per value by the
//! factored running mean of its instability `(update − m)²`; it runs in the same groups.

use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Bool, Device, Int, Tensor, TensorData};

use super::{FlatAdamW, FlatMask, BIAS_TABLE_MIN};
use crate::error::{LoraError, Result};

/// Adafactor's hyper-parameters. The defaults are those of `transformers`' `Adafactor`
/// (and so of kohya's `optimizer_type = "Adafactor"` without `optimizer_args`); kohya's LoRA
/// guides mostly set `relative_step`, `scale_parameter` and `warmup_init` to `false` and
/// give a learning rate.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdafactorSettings {
    /// Added to the squared gradient (`eps[0]`, 1e-30).
    pub eps_1: f32,
    /// Floor of a tensor's root mean square in `scale_parameter` (`eps[1]`, 1e-3).
    pub eps_2: f32,
    /// Largest root mean square of a tensor's update before the learning rate (1.0).
    pub clip_threshold: f32,
    /// Exponent of the second moment's decay: step `t` keeps `1 − t^decay_rate` of it
    /// (-0.8).
    pub decay_rate: f32,
    /// Decay of a first moment of the (scaled) updates; `None`: none (the default).
    pub beta_1: Option<f32>,
    /// Decoupled weight decay, scaled by each tensor's learning rate (0).
    pub weight_decay: f32,
    /// Multiply each tensor's learning rate by its root mean square, at least `eps_2`
    /// (`true`).
    pub scale_parameter: bool,
    /// Ignore the learning rate: step `t` takes `min(1e-2, 1/√t)` (`true`).
    pub relative_step: bool,
    /// With `relative_step`, `min(1e-6·t, 1/√t)` instead: a warmup (`false`).
    pub warmup_init: bool,
}

impl Default for AdafactorSettings {
    fn default() -> Self {
        Self {
            eps_1: 1e-30,
            eps_2: 1e-3,
            clip_threshold: 1.0,
            decay_rate: -0.8,
            beta_1: None,
            weight_decay: 0.0,
            scale_parameter: true,
            relative_step: true,
            warmup_init: false,
        }
    }
}

impl AdafactorSettings {
    /// The learning rate of step `t` (from 1) before `scale_parameter`: `lr` itself, or
    /// with `relative_step` `min(1e-2, 1/√t)` (`min(1e-6·t, 1/√t)` with `warmup_init`),
    /// in f64 as `transformers` computes it.
    pub fn step_size(&self, lr: f64, t: usize) -> f64 {
        if !self.relative_step {
            return lr;
        }
        let t = t.max(1) as f64;
        let min_step = if self.warmup_init { 1e-6 * t } else { 1e-2 };
        min_step.min(1.0 / t.sqrt())
    }

    /// Checks the settings: positive `eps_2` and `clip_threshold`, a negative
    /// `decay_rate`, `warmup_init` only with `relative_step` (as `transformers` checks),
    /// a `beta_1` in `[0, 1)`, a finite non-negative weight decay.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(LoraError::Optimizer(format!("Adafactor: {what}")));
        if !(self.eps_1.is_finite() && self.eps_1 >= 0.0 && self.eps_2.is_finite() && self.eps_2 > 0.0) {
            return bad("eps_1 must be at least 0 and eps_2 positive");
        }
        if !(self.clip_threshold.is_finite() && self.clip_threshold > 0.0) {
            return bad("clip_threshold must be positive");
        }
        if !(self.decay_rate.is_finite() && self.decay_rate < 0.0) {
            return bad("decay_rate must be negative (-0.8 is usual)");
        }
        if self.warmup_init && !self.relative_step {
            return bad("warmup_init needs relative_step");
        }
        if self.beta_1.is_some_and(|b| !(0.0..1.0).contains(&b)) {
            return bad("beta_1 must be in [0, 1)");
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad("weight_decay must be at least 0");
        }
        Ok(())
    }
}

/// Adafactor's running means of the squared gradients: one per row and one per column of
/// every tensor of two or more dimensions (its last two dimensions; leading ones count as
/// separate matrices), in the optimizer's shape groups (an order fixed by its tensors), for
/// saving and resuming a run ([`FlatAdamW::adafactor_state`]). Tensors of one dimension
/// keep theirs per value in the second moments ([`FlatAdamW::moments`]).
#[derive(Debug, Clone)]
pub struct AdafactorState<B: AutodiffBackend> {
    /// Per row (`exp_avg_sq_row`).
    pub rows: Tensor<B::InnerBackend, 1>,
    /// Per column (`exp_avg_sq_col`).
    pub cols: Tensor<B::InnerBackend, 1>,
}

/// CAME's hyper-parameters, with the defaults of the `came-pytorch` package's `CAME`
/// (kohya's `optimizer_type = "came_pytorch.CAME"`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CameSettings {
    /// Added to the squared gradient (`eps[0]`, 1e-30).
    pub eps_1: f32,
    /// Added to the squared instability (`eps[1]`, 1e-16).
    pub eps_2: f32,
    /// Largest root mean square of a tensor's update before the first moment (1.0).
    pub clip_threshold: f32,
    /// Decay of the first moment of the updates (`betas[0]`, 0.9; the betas are f64, as
    /// Python's floats: `1 − β` in f32 would be off by 1e-4 relative for 0.9999).
    pub beta_1: f64,
    /// Decay of the squared gradient's running means (`betas[1]`, 0.999).
    pub beta_2: f64,
    /// Decay of the instability's running means (`betas[2]`, 0.9999).
    pub beta_3: f64,
    /// Weight decay, scaled by each tensor's learning rate and subtracted from the values
    /// (0).
    pub weight_decay: f32,
}

impl Default for CameSettings {
    fn default() -> Self {
        Self {
            eps_1: 1e-30,
            eps_2: 1e-16,
            clip_threshold: 1.0,
            beta_1: 0.9,
            beta_2: 0.999,
            beta_3: 0.9999,
            weight_decay: 0.0,
        }
    }
}

impl CameSettings {
    /// Checks the settings: betas in `[0, 1]` (as `came-pytorch` asserts), a positive
    /// clip threshold, finite non-negative epsilons and weight decay.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(LoraError::Optimizer(format!("CAME: {what}")));
        if ![self.beta_1, self.beta_2, self.beta_3].iter().all(|b| (0.0..=1.0).contains(b)) {
            return bad("betas must be in [0, 1]");
        }
        if !(self.clip_threshold.is_finite() && self.clip_threshold > 0.0) {
            return bad("clip_threshold must be positive");
        }
        if ![self.eps_1, self.eps_2, self.weight_decay].iter().all(|v| v.is_finite() && *v >= 0.0) {
            return bad("eps and weight_decay must be at least 0");
        }
        Ok(())
    }
}

/// CAME's factored running means, in the optimizer's shape groups, for saving and
/// resuming a run ([`FlatAdamW::came_state`]); the first moments and the unfactored
/// tensors' squared-gradient means are the [`FlatAdamW::moments`].
#[derive(Debug, Clone)]
pub struct CameState<B: AutodiffBackend> {
    /// The squared gradient's, per row (`exp_avg_sq_row`).
    pub rows: Tensor<B::InnerBackend, 1>,
    /// The squared gradient's, per column (`exp_avg_sq_col`).
    pub cols: Tensor<B::InnerBackend, 1>,
    /// The instability's, per row (`exp_avg_res_row`).
    pub res_rows: Tensor<B::InnerBackend, 1>,
    /// The instability's, per column (`exp_avg_res_col`).
    pub res_cols: Tensor<B::InnerBackend, 1>,
}

/// CAME's part of the state: its settings and the instability's running means.
#[derive(Debug, Clone)]
struct Came<B: AutodiffBackend> {
    settings: CameSettings,
    res_rows: Tensor<B::InnerBackend, 1>,
    res_cols: Tensor<B::InnerBackend, 1>,
}

/// Tensors of one shape `[.., rows, cols]` (`matrices` of them per tensor), contiguous in
/// the grouped order; one-dimensional tensors of one length form unfactored groups.
#[derive(Debug, Clone)]
struct Group<B: AutodiffBackend> {
    tensors: usize,
    matrices: usize,
    rows: usize,
    cols: usize,
    factored: bool,
    /// Where the group's values start in the grouped order, and its rows and columns in
    /// the states.
    offset: usize,
    row_offset: usize,
    col_offset: usize,
    /// The flat position of each tensor's first value (its step count and whether it has
    /// a gradient).
    firsts: Tensor<B::InnerBackend, 1, Int>,
}

impl<B: AutodiffBackend> Group<B> {
    fn values_per_tensor(&self) -> usize {
        self.matrices * self.rows * self.cols
    }

    fn range(&self) -> std::ops::Range<usize> {
        self.offset..self.offset + self.tensors * self.values_per_tensor()
    }
}

/// The shape groups and the permutations between flat and grouped order.
#[derive(Debug, Clone)]
struct Layout<B: AutodiffBackend> {
    groups: Vec<Group<B>>,
    /// Grouped position → flat position, and back.
    to_grouped: Tensor<B::InnerBackend, 1, Int>,
    to_flat: Tensor<B::InnerBackend, 1, Int>,
    /// Per flat value: whether its tensor is factored.
    factored: Tensor<B::InnerBackend, 1, Bool>,
}

/// Adafactor's settings, layout, state and step-count tables.
#[derive(Debug, Clone)]
pub(super) struct Adafactor<B: AutodiffBackend> {
    settings: AdafactorSettings,
    layout: Layout<B>,
    rows: Tensor<B::InnerBackend, 1>,
    cols: Tensor<B::InnerBackend, 1>,
    /// `β₂ₜ = 1 − t^decay_rate`, `1 − β₂ₜ` and the relative step size for `t = 0..len`
    /// (entry 0 unused), computed on the host in f64 as `transformers` computes them.
    decay: Tensor<B::InnerBackend, 1>,
    fresh: Tensor<B::InnerBackend, 1>,
    relative: Tensor<B::InnerBackend, 1>,
    table_len: usize,
    /// CAME's update on the same groups ([`FlatAdamW::with_came`]).
    came: Option<Came<B>>,
}

/// The step-count tables of [`Adafactor`].
type Tables<B> = (Tensor<<B as AutodiffBackend>::InnerBackend, 1>, Tensor<<B as AutodiffBackend>::InnerBackend, 1>, Tensor<<B as AutodiffBackend>::InnerBackend, 1>);

impl<B: AutodiffBackend> Adafactor<B> {
    /// The tables; with CAME's `beta_2`, that constant decay instead of Adafactor's.
    fn tables(settings: &AdafactorSettings, beta_2: Option<f64>, len: usize, device: &Device<B::InnerBackend>) -> Tables<B> {
        let power = |t: usize| match beta_2 {
            // `1 − β₂` as PyTorch's `add_(x, alpha=1 − β₂)` takes it: the f64 difference.
            Some(b) => 1.0 - b,
            None if t == 0 => 1.0,
            None => (t as f64).powf(f64::from(settings.decay_rate)),
        };
        let decay: Vec<f32> = (0..len).map(|t| (1.0 - power(t)) as f32).collect();
        let fresh: Vec<f32> = (0..len).map(|t| power(t) as f32).collect();
        let relative: Vec<f32> = (0..len).map(|t| settings.step_size(1.0, t) as f32).collect();
        (floats::<B>(decay, device), floats::<B>(fresh, device), floats::<B>(relative, device))
    }

    /// Grows the tables so that step counts up to `bound` can be looked up.
    fn cover(&mut self, bound: usize) {
        if bound < self.table_len {
            return;
        }
        let len = (bound + 1).next_power_of_two().max(BIAS_TABLE_MIN);
        let device = self.rows.device();
        let beta_2 = self.came.as_ref().map(|c| c.settings.beta_2);
        (self.decay, self.fresh, self.relative) = Self::tables(&self.settings, beta_2, len, &device);
        self.table_len = len;
    }
}

/// `_approx_sq_grad` of Adafactor and CAME for `matrices` matrices of `rows × cols`:
/// `rsqrt(row / mean of the matrix's rows) · rsqrt(col)`, from the running means per row
/// and per column (any shape holding them in order).
fn approx_sq<I: burn::tensor::backend::Backend, const D: usize>(rows: Tensor<I, D>, cols: Tensor<I, D>, matrices: usize, r: usize, c: usize) -> Tensor<I, 3> {
    let rows = rows.reshape([matrices, r]);
    let mean = rows.clone().mean_dim(1);
    let row_factor = rows.div(mean).sqrt().recip().reshape([matrices, r, 1]);
    let col_factor = cols.reshape([matrices, 1, c]).sqrt().recip();
    row_factor.mul(col_factor)
}

/// A host vector as a device tensor.
fn ints<B: AutodiffBackend>(values: Vec<i64>, device: &Device<B::InnerBackend>) -> Tensor<B::InnerBackend, 1, Int> {
    let len = values.len();
    Tensor::from_data(TensorData::new(values, [len]), device)
}

fn floats<B: AutodiffBackend>(values: Vec<f32>, device: &Device<B::InnerBackend>) -> Tensor<B::InnerBackend, 1> {
    let len = values.len();
    Tensor::from_data(TensorData::new(values, [len]), device)
}

impl<B: AutodiffBackend> FlatAdamW<B> {
    /// Adafactor's update ([`AdafactorSettings`], the `transformers` package's
    /// `Adafactor`, which kohya's sd-scripts uses) instead of Adam's. Per tensor of two or
    /// more dimensions it keeps running means of the squared gradient per row and per
    /// column of its last two dimensions, whose product (over their mean) stands in for
    /// Adam's second moment; one-dimensional tensors keep one per value. Each tensor's
    /// update is clipped to a root mean square of `clip_threshold`, then scaled by the
    /// learning rate (the step's, or with `relative_step` `min(1e-2, 1/√t)`), times the
    /// tensor's root mean square with `scale_parameter`, times its factor of
    /// [`with_lr_scales`](Self::with_lr_scales). The [`AdamWSettings`](super::AdamWSettings)
    /// are unused. Replaces the other update rules.
    /// Errors on invalid settings.
    ///
    /// ```
    /// use burn::backend::{Autodiff, Flex};
    /// use burn::nn::LinearConfig;
    /// use burn::optim::GradientsParams;
    /// use burn::tensor::Tensor;
    /// use lora_core::optim::{AdafactorSettings, AdamWSettings, FlatAdamW};
    ///
    /// type B = Autodiff<Flex>;
    /// let device = Default::default();
    /// let layer = LinearConfig::new(4, 2).with_bias(false).init::<B>(&device);
    /// // kohya's usual LoRA settings: a learning rate, no relative step or scaling.
    /// let settings = AdafactorSettings { relative_step: false, scale_parameter: false, ..Default::default() };
    /// let mut optim = FlatAdamW::new(AdamWSettings::default(), &layer, &device).with_adafactor(settings).unwrap();
    /// let x = Tensor::<B, 2>::ones([3, 4], &device);
    /// let grads = GradientsParams::from_grads(layer.forward(x).sum().backward(), &layer);
    /// let grads = optim.gather_grads(&layer, grads);
    /// let before = layer.weight.val();
    /// let layer = optim.step(1e-2, layer, grads);
    /// // The first step of a constant gradient moves every value by the learning rate
    /// // (its update has a root mean square of 1).
    /// let moved: Vec<f32> = (before - layer.weight.val()).into_data().to_vec().unwrap();
    /// assert!(moved.iter().all(|d| (d - 1e-2).abs() < 1e-6), "{moved:?}");
    /// ```
    pub fn with_adafactor(mut self, settings: AdafactorSettings) -> Result<Self> {
        settings.validate()?;
        self.refuse_rank_chunks("Adafactor and CAME")?;
        self.clear_rules();
        let device = self.params.device();
        let len = self.len();
        // Tensors by shape: `(factored, matrices, rows, cols)` → their flat offsets.
        let mut by_shape: std::collections::BTreeMap<(bool, usize, usize, usize), Vec<usize>> = Default::default();
        for id in &self.order {
            let slot = &self.slots[id];
            if slot.len == 0 {
                continue;
            }
            // transformers factors a tensor over its last two dimensions in PyTorch's shape
            // (a transposed matrix factors alike).
            let shape = match &slot.torch {
                Some(super::TorchLayout::Reshaped(shape)) => shape,
                _ => &slot.shape,
            };
            let d = shape.len();
            let key = match d {
                0 | 1 => (false, 1, 1, slot.len),
                _ => {
                    let (r, c) = (shape[d - 2], shape[d - 1]);
                    (true, slot.len / (r * c), r, c)
                }
            };
            by_shape.entry(key).or_default().push(slot.offset);
        }
        let (mut to_grouped, mut factored) = (Vec::with_capacity(len), vec![false; len]);
        let (mut groups, mut n_rows, mut n_cols) = (Vec::new(), 0, 0);
        for ((is_factored, matrices, rows, cols), offsets) in by_shape {
            let per_tensor = matrices * rows * cols;
            let group = Group {
                tensors: offsets.len(),
                matrices,
                rows,
                cols,
                factored: is_factored,
                offset: to_grouped.len(),
                row_offset: n_rows,
                col_offset: n_cols,
                firsts: ints::<B>(offsets.iter().map(|o| *o as i64).collect(), &device),
            };
            for o in &offsets {
                to_grouped.extend((*o..*o + per_tensor).map(|e| e as i64));
                factored[*o..*o + per_tensor].fill(is_factored);
            }
            if is_factored {
                n_rows += offsets.len() * matrices * rows;
                n_cols += offsets.len() * matrices * cols;
            }
            groups.push(group);
        }
        let mut to_flat = vec![0i64; len];
        for (g, f) in to_grouped.iter().enumerate() {
            to_flat[*f as usize] = g as i64;
        }
        let layout = Layout {
            groups,
            to_grouped: ints::<B>(to_grouped, &device),
            to_flat: ints::<B>(to_flat, &device),
            factored: Tensor::from_data(TensorData::new(factored, [len]), &device),
        };
        let (decay, fresh, relative) = Adafactor::<B>::tables(&settings, None, BIAS_TABLE_MIN, &device);
        self.adafactor = Some(Adafactor {
            settings,
            layout,
            rows: Tensor::zeros([n_rows], &device),
            cols: Tensor::zeros([n_cols], &device),
            decay,
            fresh,
            relative,
            table_len: BIAS_TABLE_MIN,
            came: None,
        });
        Ok(self)
    }

    /// CAME's update ([`CameSettings`], the `came-pytorch` package's `CAME`) instead of
    /// Adam's. As Adafactor ([`with_adafactor`](Self::with_adafactor)) it keeps running
    /// means of the squared gradient per row and column of every tensor of two or more
    /// dimensions (per value for one-dimensional tensors), here with a constant `beta_2`,
    /// and clips each tensor's update `u` to a root mean square of `clip_threshold`. Then
    /// `m = β₁·m + (1 − β₁)·u`, and the factored running means (`beta_3`) of the
    /// instability `(u − m)² + eps_2` scale `m` per value as the squared gradient's scale
    /// the gradient (one-dimensional tensors take `m` itself); the values move by the
    /// learning rate times that, after a weight decay of `lr · weight_decay` of
    /// themselves. Per-tensor factors of [`with_lr_scales`](Self::with_lr_scales) scale
    /// the learning rate. The [`AdamWSettings`](super::AdamWSettings) are unused. Replaces
    /// the other updates. Errors on invalid settings.
    ///
    /// ```
    /// use burn::backend::{Autodiff, Flex};
    /// use burn::nn::LinearConfig;
    /// use burn::optim::GradientsParams;
    /// use burn::tensor::Tensor;
    /// use lora_core::optim::{AdamWSettings, CameSettings, FlatAdamW};
    ///
    /// type B = Autodiff<Flex>;
    /// let device = Default::default();
    /// let layer = LinearConfig::new(4, 2).with_bias(false).init::<B>(&device);
    /// let mut optim = FlatAdamW::new(AdamWSettings::default(), &layer, &device).with_came(CameSettings::default()).unwrap();
    /// let x = Tensor::<B, 2>::ones([3, 4], &device);
    /// let grads = GradientsParams::from_grads(layer.forward(x).sum().backward(), &layer);
    /// let grads = optim.gather_grads(&layer, grads);
    /// let before = layer.weight.val();
    /// let layer = optim.step(1e-2, layer, grads);
    /// // A constant gradient: the clipped update is 1 everywhere, the first moment 0.1,
    /// // the instability 0.81 everywhere, whose running mean (from 0, not bias-corrected,
    /// // as in came-pytorch) is 1e-4 · 0.81: each value moves by lr · 0.1 / 0.009.
    /// let moved: Vec<f32> = (before - layer.weight.val()).into_data().to_vec().unwrap();
    /// assert!(moved.iter().all(|d| (d - 1e-2 / 0.09).abs() < 1e-5), "{moved:?}");
    /// assert!(optim.came_settings().is_some() && optim.adafactor_settings().is_none());
    /// ```
    pub fn with_came(self, settings: CameSettings) -> Result<Self> {
        settings.validate()?;
        // Adafactor's groups and clipping, with its learning rate as given (no relative
        // step or scaling) and CAME's weight decay.
        let plain = AdafactorSettings {
            eps_1: settings.eps_1,
            clip_threshold: settings.clip_threshold,
            beta_1: None,
            weight_decay: settings.weight_decay,
            scale_parameter: false,
            relative_step: false,
            warmup_init: false,
            ..AdafactorSettings::default()
        };
        let mut optim = self.with_adafactor(plain)?;
        if let Some(state) = optim.adafactor.as_mut() {
            let device = state.rows.device();
            state.came = Some(Came {
                settings,
                res_rows: Tensor::zeros(state.rows.dims(), &device),
                res_cols: Tensor::zeros(state.cols.dims(), &device),
            });
            (state.decay, state.fresh, state.relative) = Adafactor::<B>::tables(&plain, Some(settings.beta_2), state.table_len, &device);
        }
        Ok(optim)
    }

    /// CAME's settings, when this optimizer takes its update.
    pub fn came_settings(&self) -> Option<CameSettings> {
        self.adafactor.as_ref().and_then(|a| a.came.as_ref()).map(|c| c.settings)
    }

    /// CAME's factored running means, to save with a run (`None` without CAME).
    pub fn came_state(&self) -> Option<CameState<B>> {
        let a = self.adafactor.as_ref()?;
        let came = a.came.as_ref()?;
        Some(CameState { rows: a.rows.clone(), cols: a.cols.clone(), res_rows: came.res_rows.clone(), res_cols: came.res_cols.clone() })
    }

    /// Restores CAME's factored running means (resuming a run); an error without CAME or
    /// when the lengths do not fit this optimizer's tensors.
    pub fn set_came_state(&mut self, state: CameState<B>) -> Result<()> {
        let Some(a) = self.adafactor.as_mut().filter(|a| a.came.is_some()) else {
            return Err(LoraError::Optimizer("this optimizer does not use CAME".into()));
        };
        let (rows, cols) = (a.rows.dims()[0], a.cols.dims()[0]);
        for (name, tensor, expected) in [("rows", &state.rows, rows), ("cols", &state.cols, cols), ("res_rows", &state.res_rows, rows), ("res_cols", &state.res_cols, cols)] {
            if tensor.dims()[0] != expected {
                return Err(LoraError::ShapeMismatch {
                    key: format!("CAME state {name}"),
                    reason: format!("{} values, the optimizer needs {expected}", tensor.dims()[0]),
                });
            }
        }
        (a.rows, a.cols) = (state.rows, state.cols);
        if let Some(came) = a.came.as_mut() {
            (came.res_rows, came.res_cols) = (state.res_rows, state.res_cols);
        }
        Ok(())
    }

    /// Adafactor's settings, when this optimizer takes its update.
    pub fn adafactor_settings(&self) -> Option<AdafactorSettings> {
        self.adafactor.as_ref().filter(|a| a.came.is_none()).map(|a| a.settings)
    }

    /// Adafactor's factored second moments, to save with a run (`None` without Adafactor).
    pub fn adafactor_state(&self) -> Option<AdafactorState<B>> {
        self.adafactor.as_ref().filter(|a| a.came.is_none()).map(|a| AdafactorState { rows: a.rows.clone(), cols: a.cols.clone() })
    }

    /// Restores Adafactor's factored second moments (resuming a run); an error without
    /// Adafactor or when the lengths do not fit this optimizer's tensors.
    pub fn set_adafactor_state(&mut self, state: AdafactorState<B>) -> Result<()> {
        let Some(adafactor) = self.adafactor.as_mut().filter(|a| a.came.is_none()) else {
            return Err(LoraError::Optimizer("this optimizer does not use Adafactor".into()));
        };
        for (name, tensor, expected) in [("rows", &state.rows, adafactor.rows.dims()[0]), ("cols", &state.cols, adafactor.cols.dims()[0])] {
            if tensor.dims()[0] != expected {
                return Err(LoraError::ShapeMismatch {
                    key: format!("Adafactor state {name}"),
                    reason: format!("{} values, the optimizer needs {expected}", tensor.dims()[0]),
                });
            }
        }
        (adafactor.rows, adafactor.cols) = (state.rows, state.cols);
        Ok(())
    }

    /// One Adafactor step (`transformers`' `Adafactor.step`, in f32 on the device) with
    /// the step counts `time` (already counting this step where it happens) over the
    /// values where `mask` holds (all without one): new moments, row and column means and
    /// values are committed there.
    pub(super) fn adafactor_step(&mut self, lr: f64, time: Tensor<B::InnerBackend, 1, Int>, grad: Tensor<B::InnerBackend, 1>, mask: Option<FlatMask<B>>) {
        let Some(mut state) = self.adafactor.take() else { return };
        state.cover(self.time_bound);
        let s = state.settings;
        let device = self.params.device();
        // `update = g² + ε₁`; the unfactored tensors' running means and updates, per value.
        let squared = grad.clone().square().add_scalar(s.eps_1);
        let v = self.moment_2.clone().mul(state.decay.clone().select(0, time.clone())).add(squared.clone().mul(state.fresh.clone().select(0, time.clone())));
        let unfactored = v.clone().sqrt().recip().mul(grad.clone());
        // Into the shape groups.
        let grouped = |x: Tensor<B::InnerBackend, 1>| x.select(0, state.layout.to_grouped.clone());
        let (squared, grad, unfactored) = (grouped(squared), grouped(grad), grouped(unfactored));
        let params = grouped(self.params.clone());
        let moment_1 = state.came.is_some().then(|| grouped(self.moment_1.clone()));
        let (mut updates, mut steps, mut rows, mut cols) = (vec![], vec![], vec![], vec![]);
        let (mut moments, mut res_rows, mut res_cols) = (vec![], vec![], vec![]);
        for g in &state.layout.groups {
            let (n, m, r, c, len) = (g.tensors, g.matrices, g.rows, g.cols, g.values_per_tensor());
            // Each tensor's step count, and whether it takes this step.
            let t = time.clone().select(0, g.firsts.clone());
            let takes = mask.as_ref().map(|mask| mask.clone().int().select(0, g.firsts.clone()).equal_elem(1));
            let update = if g.factored {
                let per_tensor = |x: Tensor<B::InnerBackend, 1>| x.reshape([n, 1, 1]);
                let (beta, fresh) = (per_tensor(state.decay.clone().select(0, t.clone())), per_tensor(state.fresh.clone().select(0, t.clone())));
                let sq = squared.clone().slice(g.range()).reshape([n * m, r, c]);
                let row_mean = sq.clone().mean_dim(2).reshape([n, m * r, 1]);
                let col_mean = sq.mean_dim(1).reshape([n, m * c, 1]);
                let old_rows = state.rows.clone().slice(g.row_offset..g.row_offset + n * m * r).reshape([n, m * r, 1]);
                let old_cols = state.cols.clone().slice(g.col_offset..g.col_offset + n * m * c).reshape([n, m * c, 1]);
                let mut new_rows = old_rows.clone().mul(beta.clone()).add(row_mean.mul(fresh.clone()));
                let mut new_cols = old_cols.clone().mul(beta).add(col_mean.mul(fresh));
                if let Some(takes) = &takes {
                    new_rows = old_rows.mask_where(takes.clone().reshape([n, 1, 1]).expand([n, m * r, 1]), new_rows);
                    new_cols = old_cols.mask_where(takes.clone().reshape([n, 1, 1]).expand([n, m * c, 1]), new_cols);
                }
                rows.push(new_rows.clone().reshape([n * m * r]));
                cols.push(new_cols.clone().reshape([n * m * c]));
                approx_sq(new_rows, new_cols, n * m, r, c).mul(grad.clone().slice(g.range()).reshape([n * m, r, c])).reshape([n, len])
            } else {
                unfactored.clone().slice(g.range()).reshape([n, len])
            };
            // Clipped to a root mean square of `clip_threshold` per tensor.
            let rms = |x: Tensor<B::InnerBackend, 2>| x.square().sum_dim(1).sqrt().div_scalar((len as f64).sqrt());
            let clip = rms(update.clone()).div_scalar(s.clip_threshold).clamp_min(1.0);
            let mut update = update.div(clip);
            if let (Some(came), Some(moment_1)) = (&state.came, &moment_1) {
                let c = came.settings;
                // The first moment of the clipped updates, and the instability's scale of it.
                let m = moment_1.clone().slice(g.range()).reshape([n, len]).mul_scalar(c.beta_1).add(update.clone().mul_scalar(1.0 - c.beta_1));
                moments.push(m.clone().reshape([n * len]));
                update = if g.factored {
                    let res = update.sub(m.clone()).square().add_scalar(c.eps_2).reshape([n * g.matrices, g.rows, g.cols]);
                    let (r, cc, mm) = (g.rows, g.cols, g.matrices);
                    let row_mean = res.clone().mean_dim(2).reshape([n, mm * r, 1]);
                    let col_mean = res.mean_dim(1).reshape([n, mm * cc, 1]);
                    let old_rows = came.res_rows.clone().slice(g.row_offset..g.row_offset + n * mm * r).reshape([n, mm * r, 1]);
                    let old_cols = came.res_cols.clone().slice(g.col_offset..g.col_offset + n * mm * cc).reshape([n, mm * cc, 1]);
                    let keep = 1.0 - c.beta_3;
                    let mut new_rows = old_rows.clone().mul_scalar(c.beta_3).add(row_mean.mul_scalar(keep));
                    let mut new_cols = old_cols.clone().mul_scalar(c.beta_3).add(col_mean.mul_scalar(keep));
                    if let Some(takes) = &takes {
                        new_rows = old_rows.mask_where(takes.clone().reshape([n, 1, 1]).expand([n, mm * r, 1]), new_rows);
                        new_cols = old_cols.mask_where(takes.clone().reshape([n, 1, 1]).expand([n, mm * cc, 1]), new_cols);
                    }
                    res_rows.push(new_rows.clone().reshape([n * mm * r]));
                    res_cols.push(new_cols.clone().reshape([n * mm * cc]));
                    approx_sq(new_rows, new_cols, n * mm, r, cc).mul(m.reshape([n * mm, r, cc])).reshape([n, len])
                } else {
                    m
                };
            }
            // Each tensor's learning rate.
            let mut step = match s.relative_step {
                true => state.relative.clone().select(0, t).reshape([n, 1]),
                false => Tensor::full([n, 1], lr, &device),
            };
            if s.scale_parameter {
                step = step.mul(rms(params.clone().slice(g.range()).reshape([n, len])).clamp_min(s.eps_2));
            }
            updates.push(update.mul(step.clone()).reshape([n * len]));
            steps.push(step.expand([n, len]).reshape([n * len]));
        }
        // Back into flat order.
        let flat = |parts: Vec<Tensor<B::InnerBackend, 1>>| Tensor::cat(parts, 0).select(0, state.layout.to_flat.clone());
        let (mut update, mut step) = (flat(updates), flat(steps));
        if let Some(scales) = &self.lr_scales {
            (update, step) = (update.mul(scales.clone()), step.mul(scales.clone()));
        }
        let (m, update) = match s.beta_1 {
            // CAME's first moments, computed in the groups.
            None if !moments.is_empty() => (flat(moments), update),
            Some(b) => {
                let m = self.moment_1.clone().mul_scalar(b).add(update.mul_scalar(1.0 - b));
                (m.clone(), m)
            }
            None => (self.moment_1.clone(), update),
        };
        let params = self.params.clone();
        let decayed = match s.weight_decay {
            0.0 => params,
            wd => params.clone().sub(params.mul(step.mul_scalar(wd))),
        };
        let new_params = decayed.sub(update);
        // The factored tensors' per-value second moments stay zero.
        let v = v.mask_fill(state.layout.factored.clone(), 0.0);
        if !rows.is_empty() {
            (state.rows, state.cols) = (Tensor::cat(rows, 0), Tensor::cat(cols, 0));
        }
        if let Some(came) = state.came.as_mut().filter(|_| !res_rows.is_empty()) {
            (came.res_rows, came.res_cols) = (Tensor::cat(res_rows, 0), Tensor::cat(res_cols, 0));
        }
        match mask {
            None => (self.moment_1, self.moment_2, self.params) = (m, v, new_params),
            Some(mask) => {
                self.moment_1 = self.moment_1.clone().mask_where(mask.clone(), m);
                self.moment_2 = self.moment_2.clone().mask_where(mask.clone(), v);
                self.params = self.params.clone().mask_where(mask, new_params);
            }
        }
        self.adafactor = Some(state);
    }
}
