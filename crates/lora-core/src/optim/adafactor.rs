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
//! update and of the values) are segment sums over the flat vectors: each value knows its
//! row, column and tensor, and one `select_assign` adds them all up, so a step costs the
//! same few operations whatever the number of tensors.

use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Bool, Device, IndexingUpdateOp, Int, Tensor, TensorData};

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
        let bad = |what: &str| Err(LoraError::Unsupported(format!("Adafactor: {what}")));
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

/// Adafactor's running means of the squared gradients, in flat order: one per row and
/// one per column of every tensor of two or more dimensions (its last two dimensions;
/// leading ones count as separate matrices), for saving and resuming a run
/// ([`FlatAdamW::adafactor_state`]). Tensors of one dimension keep theirs per value in
/// the second moments ([`FlatAdamW::moments`]).
#[derive(Debug, Clone)]
pub struct AdafactorState<B: AutodiffBackend> {
    /// Per row (`exp_avg_sq_row`), plus one unused entry at the end.
    pub rows: Tensor<B::InnerBackend, 1>,
    /// Per column (`exp_avg_sq_col`), plus one unused entry at the end.
    pub cols: Tensor<B::InnerBackend, 1>,
}

/// Where each flat value sits among the rows, columns, matrices and tensors. The values
/// of one-dimensional tensors point at an extra last row and column, which no result
/// reads.
#[derive(Debug, Clone)]
struct Layout<B: AutodiffBackend> {
    /// Per value: its row, column and tensor.
    row_of: Tensor<B::InnerBackend, 1, Int>,
    col_of: Tensor<B::InnerBackend, 1, Int>,
    tensor_of: Tensor<B::InnerBackend, 1, Int>,
    /// Per value: whether its tensor is factored (two or more dimensions).
    factored: Tensor<B::InnerBackend, 1, Bool>,
    /// Per row / column: one of its values (for its step count) and its length.
    row_first: Tensor<B::InnerBackend, 1, Int>,
    col_first: Tensor<B::InnerBackend, 1, Int>,
    row_len: Tensor<B::InnerBackend, 1>,
    col_len: Tensor<B::InnerBackend, 1>,
    /// Per row: its matrix; per matrix: its number of rows.
    row_matrix: Tensor<B::InnerBackend, 1, Int>,
    matrix_rows: Tensor<B::InnerBackend, 1>,
    /// Per tensor: the square root of its number of values.
    tensor_sqrt_len: Tensor<B::InnerBackend, 1>,
}

/// Adafactor's settings, layout, state and step-count tables.
#[derive(Debug, Clone)]
pub(super) struct Adafactor<B: AutodiffBackend> {
    settings: AdafactorSettings,
    layout: Layout<B>,
    rows: Tensor<B::InnerBackend, 1>,
    cols: Tensor<B::InnerBackend, 1>,
    /// `1 − t^decay_rate` and the relative step size for `t = 0..len` (entry 0 unused),
    /// computed on the host in f64 as `transformers` computes them.
    decay: Tensor<B::InnerBackend, 1>,
    relative: Tensor<B::InnerBackend, 1>,
    table_len: usize,
}

impl<B: AutodiffBackend> Adafactor<B> {
    fn tables(settings: &AdafactorSettings, len: usize, device: &Device<B::InnerBackend>) -> (Tensor<B::InnerBackend, 1>, Tensor<B::InnerBackend, 1>) {
        let decay: Vec<f32> = (0..len).map(|t| if t == 0 { 0.0 } else { (1.0 - (t as f64).powf(f64::from(settings.decay_rate))) as f32 }).collect();
        let relative: Vec<f32> = (0..len).map(|t| settings.step_size(1.0, t) as f32).collect();
        (Tensor::from_data(TensorData::new(decay, [len]), device), Tensor::from_data(TensorData::new(relative, [len]), device))
    }

    /// Grows the tables so that step counts up to `bound` can be looked up.
    fn cover(&mut self, bound: usize) {
        if bound < self.table_len {
            return;
        }
        let len = (bound + 1).next_power_of_two().max(BIAS_TABLE_MIN);
        let device = self.rows.device();
        (self.decay, self.relative) = Self::tables(&self.settings, len, &device);
        self.table_len = len;
    }
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

/// `1 − x`.
fn complement<B: AutodiffBackend>(x: Tensor<B::InnerBackend, 1>) -> Tensor<B::InnerBackend, 1> {
    x.neg().add_scalar(1.0)
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
    /// are unused. Replaces [`with_prodigy`](Self::with_prodigy) and
    /// [`with_lion`](Self::with_lion). Errors on invalid settings.
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
        self.prodigy = None;
        self.lion = false;
        let device = self.params.device();
        let len = self.len();
        let (mut row_of, mut col_of, mut tensor_of) = (vec![0i64; len], vec![0i64; len], vec![0i64; len]);
        let mut factored = vec![false; len];
        let (mut row_first, mut col_first, mut row_len, mut col_len) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut row_matrix, mut matrix_rows, mut tensor_sqrt_len) = (Vec::new(), Vec::new(), Vec::new());
        // First pass: the factored tensors' rows and columns; the unfactored values point
        // at the extra entries, which the second pass appends.
        let mut unfactored = Vec::new();
        for (k, id) in self.order.iter().enumerate() {
            let slot = &self.slots[id];
            tensor_sqrt_len.push((slot.len as f64).sqrt() as f32);
            let range = slot.offset..slot.offset + slot.len;
            tensor_of[range.clone()].fill(k as i64);
            let d = slot.shape.len();
            if d < 2 {
                unfactored.push(range);
                continue;
            }
            let (r, c) = (slot.shape[d - 2], slot.shape[d - 1]);
            let matrices = slot.len.checked_div(r * c).unwrap_or(0);
            for m in 0..matrices {
                let (row_base, col_base, start) = (row_first.len(), col_first.len(), slot.offset + m * r * c);
                for i in 0..r {
                    row_first.push(start + i * c);
                    row_len.push(c as f32);
                    row_matrix.push(matrix_rows.len() as i64);
                }
                for j in 0..c {
                    col_first.push(start + j);
                    col_len.push(r as f32);
                }
                matrix_rows.push(r as f32);
                for i in 0..r {
                    for j in 0..c {
                        let e = start + i * c + j;
                        row_of[e] = (row_base + i) as i64;
                        col_of[e] = (col_base + j) as i64;
                        factored[e] = true;
                    }
                }
            }
        }
        let (spare_row, spare_col) = (row_first.len() as i64, col_first.len() as i64);
        for range in unfactored {
            row_of[range.clone()].fill(spare_row);
            col_of[range].fill(spare_col);
        }
        row_first.push(0);
        col_first.push(0);
        row_len.push(1.0);
        col_len.push(1.0);
        row_matrix.push(matrix_rows.len() as i64);
        matrix_rows.push(1.0);
        let to_i64 = |v: Vec<usize>| v.into_iter().map(|x| x as i64).collect::<Vec<_>>();
        let (n_rows, n_cols) = (row_first.len(), col_first.len());
        let layout = Layout {
            row_of: ints::<B>(row_of, &device),
            col_of: ints::<B>(col_of, &device),
            tensor_of: ints::<B>(tensor_of, &device),
            factored: Tensor::from_data(TensorData::new(factored, [len]), &device),
            row_first: ints::<B>(to_i64(row_first), &device),
            col_first: ints::<B>(to_i64(col_first), &device),
            row_len: floats::<B>(row_len, &device),
            col_len: floats::<B>(col_len, &device),
            row_matrix: ints::<B>(row_matrix, &device),
            matrix_rows: floats::<B>(matrix_rows, &device),
            tensor_sqrt_len: floats::<B>(tensor_sqrt_len, &device),
        };
        let (decay, relative) = Adafactor::<B>::tables(&settings, BIAS_TABLE_MIN, &device);
        self.adafactor = Some(Adafactor {
            settings,
            layout,
            rows: Tensor::zeros([n_rows], &device),
            cols: Tensor::zeros([n_cols], &device),
            decay,
            relative,
            table_len: BIAS_TABLE_MIN,
        });
        Ok(self)
    }

    /// Adafactor's settings, when this optimizer takes its update.
    pub fn adafactor_settings(&self) -> Option<AdafactorSettings> {
        self.adafactor.as_ref().map(|a| a.settings)
    }

    /// Adafactor's factored second moments, to save with a run (`None` without Adafactor).
    pub fn adafactor_state(&self) -> Option<AdafactorState<B>> {
        self.adafactor.as_ref().map(|a| AdafactorState { rows: a.rows.clone(), cols: a.cols.clone() })
    }

    /// Restores Adafactor's factored second moments (resuming a run); an error without
    /// Adafactor or when the lengths do not fit this optimizer's tensors.
    pub fn set_adafactor_state(&mut self, state: AdafactorState<B>) -> Result<()> {
        let Some(adafactor) = self.adafactor.as_mut() else {
            return Err(LoraError::Unsupported("this optimizer does not use Adafactor".into()));
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
        let l = &state.layout;
        let device = self.params.device();
        let (n_rows, n_cols, n_tensors) = (state.rows.dims()[0], state.cols.dims()[0], l.tensor_sqrt_len.dims()[0]);
        let matrices = l.matrix_rows.dims()[0];
        let sum_into = |n: usize, index: &Tensor<B::InnerBackend, 1, Int>, values: Tensor<B::InnerBackend, 1>| {
            Tensor::<B::InnerBackend, 1>::zeros([n], &device).select_assign(0, index.clone(), values, IndexingUpdateOp::Add)
        };
        // `update = g² + ε₁`, its means per row and column, and the decayed running means
        // (each row and column at its tensor's step count).
        let squared = grad.clone().square().add_scalar(s.eps_1);
        let row_mean = sum_into(n_rows, &l.row_of, squared.clone()).div(l.row_len.clone());
        let col_mean = sum_into(n_cols, &l.col_of, squared.clone()).div(l.col_len.clone());
        let decay_of = |t: Tensor<B::InnerBackend, 1, Int>| state.decay.clone().select(0, t);
        let row_decay = decay_of(time.clone().select(0, l.row_first.clone()));
        let col_decay = decay_of(time.clone().select(0, l.col_first.clone()));
        let value_decay = decay_of(time.clone());
        let rows = state.rows.clone().mul(row_decay.clone()).add(row_mean.mul(complement::<B>(row_decay)));
        let cols = state.cols.clone().mul(col_decay.clone()).add(col_mean.mul(complement::<B>(col_decay)));
        let v = self.moment_2.clone().mul(value_decay.clone()).add(squared.mul(complement::<B>(value_decay)));
        // `_approx_sq_grad`: rsqrt(row / mean of the matrix's rows) · rsqrt(col).
        let matrix_mean = sum_into(matrices, &l.row_matrix, rows.clone()).div(l.matrix_rows.clone());
        let row_factor = rows.clone().div(matrix_mean.select(0, l.row_matrix.clone())).sqrt().recip();
        let col_factor = cols.clone().sqrt().recip();
        let factored = row_factor.select(0, l.row_of.clone()).mul(col_factor.select(0, l.col_of.clone())).mul(grad.clone());
        let update = v.clone().sqrt().recip().mul(grad).mask_where(l.factored.clone(), factored);
        // Clipped to a root mean square of `clip_threshold` per tensor.
        let rms = |x: Tensor<B::InnerBackend, 1>| sum_into(n_tensors, &l.tensor_of, x.square()).sqrt().div(l.tensor_sqrt_len.clone());
        let clip = rms(update.clone()).div_scalar(s.clip_threshold).clamp_min(1.0);
        let update = update.div(clip.select(0, l.tensor_of.clone()));
        // Each value's learning rate.
        let mut step = match s.relative_step {
            true => state.relative.clone().select(0, time),
            false => Tensor::full([self.len()], lr, &device),
        };
        if s.scale_parameter {
            let scale = rms(self.params.clone()).clamp_min(s.eps_2);
            step = step.mul(scale.select(0, l.tensor_of.clone()));
        }
        if let Some(scales) = &self.lr_scales {
            step = step.mul(scales.clone());
        }
        let update = update.mul(step.clone());
        let (m, update) = match s.beta_1 {
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
        let v = v.mask_fill(l.factored.clone(), 0.0);
        match mask {
            None => {
                (self.moment_1, self.moment_2, self.params) = (m, v, new_params);
                (state.rows, state.cols) = (rows, cols);
            }
            Some(mask) => {
                let at = |index: &Tensor<B::InnerBackend, 1, Int>| mask.clone().int().select(0, index.clone()).equal_elem(1);
                state.rows = state.rows.clone().mask_where(at(&l.row_first), rows);
                state.cols = state.cols.clone().mask_where(at(&l.col_first), cols);
                self.moment_1 = self.moment_1.clone().mask_where(mask.clone(), m);
                self.moment_2 = self.moment_2.clone().mask_where(mask.clone(), v);
                self.params = self.params.clone().mask_where(mask, new_params);
            }
        }
        self.adafactor = Some(state);
    }
}
