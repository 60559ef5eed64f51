//! Schedule-free AdamW, RAdam and SGD on the flat vectors of a [`FlatAdamW`]
//! ([`FlatAdamW::with_schedule_free`]).
//!
//! Schedule-free training (Defazio et al. 2024, "The Road Less Scheduled") replaces the
//! learning-rate schedule by an average: the optimizer keeps the base sequence `z` (plain
//! Adam steps), the weights `x` (a running, lr-weighted average of `z`) and evaluates the
//! gradients at `y = β₁·x + (1 − β₁)·z`, between them. The module trains with `y`; it is
//! evaluated, sampled and saved with `x` ([`FlatAdamW::to_eval`],
//! [`FlatAdamW::to_master_eval`]), which is what the package's `optimizer.eval()` switches
//! the model to. The arithmetic is the `schedulefree` package's (1.4, kohya's sd-scripts'
//! `optimizer_type = "AdamWScheduleFree"` / `"RAdamScheduleFree"` / `"SGDScheduleFree"`),
//! in f32 on the device, checked step by step against it. Only `y`, `z` and the second
//! moment are stored; `x` is formed when asked for, as the package forms it.

use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Bool, ElementConversion, Tensor, TensorData};

use super::{decimal, FlatAdamW, FlatMask, BIAS_TABLE_MIN};
use crate::error::{LoraError, Result};

/// Schedule-free settings (β, ε and the weight decay are the
/// [`AdamWSettings`](super::AdamWSettings)': β₁ is the interpolation between `x` and `z`,
/// β₂ the second moment's decay). The defaults are the `schedulefree` package's.
///
/// The package's `warmup_steps` (AdamW only) is a learning rate rising as
/// `lr·(k + 1)/warmup_steps`: pass such a rate to the steps (the average then weighs the
/// warmup's steps by their rate, as there).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScheduleFreeSettings {
    /// RAdam's rectified steps (`RAdamScheduleFree`) instead of Adam's: no warmup needed.
    pub radam: bool,
    /// Plain gradient steps (`SGDScheduleFree`) instead of Adam's: no second moment; β₁ is
    /// its `momentum`, β₂ and ε are unused. Not with `radam`.
    pub sgd: bool,
    /// RAdam only: the first steps, before the rectification is defined, change nothing
    /// (`true`, the package's default) instead of taking plain SGD steps.
    pub silent_sgd_phase: bool,
    /// Polynomial weighting of the average: step `t` weighs `t^r` (0: uniform).
    pub r: f32,
    /// The average weighs each step by the largest learning rate so far to this power.
    pub weight_lr_power: f32,
}

impl Default for ScheduleFreeSettings {
    fn default() -> Self {
        Self { radam: false, sgd: false, silent_sgd_phase: true, r: 0.0, weight_lr_power: 2.0 }
    }
}

impl ScheduleFreeSettings {
    /// Checks these settings with the [`AdamWSettings`](super::AdamWSettings) they go
    /// with: β₁ in `[0, 1)` (`x` is recovered dividing by it, so above 0), β₂ in `[0, 1)`,
    /// ε and the weight decay at least 0, `r` and `weight_lr_power` finite and at least 0.
    pub fn validate(&self, adam: &super::AdamWSettings) -> Result<()> {
        let bad = |what: &str| Err(LoraError::Optimizer(format!("schedule-free: {what}")));
        if self.sgd && self.radam {
            return bad("SGD's and RAdam's steps exclude each other");
        }
        if self.sgd && !(adam.beta_1 > 0.0 && adam.beta_1 < 1.0) {
            return bad("SGD's momentum must be in (0, 1)");
        }
        if !(adam.beta_1 > 0.0 && adam.beta_1 < 1.0 && (0.0..1.0).contains(&adam.beta_2)) {
            return bad("beta_1 must be in (0, 1) and beta_2 in [0, 1)");
        }
        if !(adam.epsilon.is_finite() && adam.epsilon >= 0.0 && adam.weight_decay.is_finite() && adam.weight_decay >= 0.0) {
            return bad("epsilon and weight_decay must be at least 0");
        }
        if !(self.r.is_finite() && self.r >= 0.0 && self.weight_lr_power.is_finite() && self.weight_lr_power >= 0.0) {
            return bad("r and weight_lr_power must be finite and at least 0");
        }
        Ok(())
    }
}

/// The schedule-free state in flat form, for saving and resuming a run
/// ([`FlatAdamW::schedule_free_state`]); the optimizer's values are `y`, its second
/// moments the package's `exp_avg_sq`.
#[derive(Debug, Clone)]
pub struct ScheduleFreeState<B: AutodiffBackend> {
    /// The base sequence `z`, in the optimizer's flat order.
    pub z: Tensor<B::InnerBackend, 1>,
    /// `[k, lr_max, weight_sum]`: steps taken, the largest learning rate so far and the
    /// sum of the average's weights.
    pub scalars: Tensor<B::InnerBackend, 1>,
}

/// Per step count `k`, what the host computes in f64 as the package does: Adam's bias
/// correction `1 − β₂^(k+1)`, and RAdam's learning-rate factor and whether the step is an
/// Adam step (1) or an SGD one (0).
#[derive(Debug, Clone)]
struct Tables<B: AutodiffBackend> {
    bias_2: Tensor<B::InnerBackend, 1>,
    rect: Tensor<B::InnerBackend, 1>,
    adam: Tensor<B::InnerBackend, 1>,
    len: usize,
}

impl<B: AutodiffBackend> Tables<B> {
    fn new(settings: &ScheduleFreeSettings, beta_2: f64, len: usize, device: &burn::tensor::Device<B::InnerBackend>) -> Self {
        let (mut bias_2, mut rect, mut adam) = (Vec::with_capacity(len), Vec::with_capacity(len), Vec::with_capacity(len));
        let rho_inf = 2.0 / (1.0 - beta_2) - 1.0;
        for k in 0..len {
            let step = (k + 1) as f64;
            let beta_2_t = beta_2.powf(step);
            let correction = 1.0 - beta_2_t;
            bias_2.push(correction as f32);
            let (factor, is_adam) = if settings.radam {
                let rho_t = rho_inf - 2.0 * step * beta_2_t / correction;
                match rho_t > 4.0 {
                    true => ((((rho_t - 4.0) * (rho_t - 2.0) * rho_inf) / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)).sqrt(), 1.0),
                    false => (if settings.silent_sgd_phase { 0.0 } else { 1.0 }, 0.0),
                }
            } else {
                (1.0, 1.0)
            };
            rect.push(factor as f32);
            adam.push(is_adam);
        }
        let upload = |v: Vec<f32>| Tensor::from_data(TensorData::new(v, [len]), device);
        Self { bias_2: upload(bias_2), rect: upload(rect), adam: upload(adam), len }
    }
}

/// Schedule-free's settings, state and per-step tables.
#[derive(Debug, Clone)]
pub(super) struct ScheduleFree<B: AutodiffBackend> {
    settings: ScheduleFreeSettings,
    z: Tensor<B::InnerBackend, 1>,
    scalars: Tensor<B::InnerBackend, 1>,
    tables: Tables<B>,
}

impl<B: AutodiffBackend> FlatAdamW<B> {
    /// Schedule-free AdamW or RAdam ([`ScheduleFreeSettings`], the `schedulefree`
    /// package's `AdamWScheduleFree` / `RAdamScheduleFree`) instead of Adam's update: no
    /// schedule is needed (pass a constant learning rate, or a linear warmup), and the
    /// module's values during training are the point `y` where gradients are taken. Give
    /// the module [`to_eval`](Self::to_eval)'s values to sample or validate, and save
    /// [`to_master_eval`](Self::to_master_eval)'s (the package's `optimizer.eval()`);
    /// [`to_master`](Self::to_master) keeps `y`, for a training state. The factors of
    /// [`with_lr_scales`](Self::with_lr_scales) act as the package's per-group learning
    /// rates. Tensors without a gradient in a step keep their values and state. Replaces
    /// the other update rules. Errors on invalid settings
    /// ([`ScheduleFreeSettings::validate`]).
    ///
    /// ```
    /// use burn::backend::{Autodiff, Flex};
    /// use burn::nn::LinearConfig;
    /// use burn::optim::GradientsParams;
    /// use burn::tensor::{Distribution, Tensor};
    /// use lora_core::optim::{AdamWSettings, FlatAdamW, ScheduleFreeSettings};
    ///
    /// type B = Autodiff<Flex>;
    /// let device = Default::default();
    /// let mut layer = LinearConfig::new(4, 2).init::<B>(&device);
    /// let settings = AdamWSettings { epsilon: 1e-8, weight_decay: 0.0, ..Default::default() };
    /// let mut optim = FlatAdamW::new(settings, &layer, &device).with_schedule_free(ScheduleFreeSettings::default()).unwrap();
    /// for _ in 0..3 {
    ///     let x = Tensor::<B, 2>::random([3, 4], Distribution::Default, &device);
    ///     let grads = GradientsParams::from_grads(layer.forward(x).sum().backward(), &layer);
    ///     let grads = optim.gather_grads(&layer, grads);
    ///     layer = optim.step(1e-2, layer, grads);
    /// }
    /// // Trained at y, evaluated at x: they differ once steps were taken.
    /// let y = layer.weight.val();
    /// let x = optim.to_eval(layer).weight.val();
    /// let gap: f32 = (x - y).abs().max().into_scalar();
    /// assert!(gap > 0.0);
    /// ```
    pub fn with_schedule_free(mut self, settings: ScheduleFreeSettings) -> Result<Self> {
        settings.validate(&self.settings)?;
        self.clear_rules();
        let device = self.params.device();
        let scalars = Tensor::from_data(TensorData::new(vec![0.0f32, 0.0, 0.0], [3]), &device);
        let tables = Tables::new(&settings, decimal(self.settings.beta_2), BIAS_TABLE_MIN, &device);
        // The package clones `z` from the values at a tensor's first step; they do not
        // move before it, so this is the same.
        self.schedule_free = Some(ScheduleFree { settings, z: self.params.clone(), scalars, tables });
        Ok(self)
    }

    /// Whether this optimizer is schedule-free ([`with_schedule_free`](Self::with_schedule_free)
    /// or [`with_prodigy_plus`](Self::with_prodigy_plus)): it trains at one point and
    /// evaluates at another ([`to_eval`](Self::to_eval)).
    pub fn is_schedule_free(&self) -> bool {
        self.schedule_free.is_some() || self.prodigy_plus.is_some()
    }

    /// The schedule-free settings (`None` when the optimizer is not schedule-free).
    pub fn schedule_free_settings(&self) -> Option<ScheduleFreeSettings> {
        self.schedule_free.as_ref().map(|s| s.settings)
    }

    /// The schedule-free state, to save with a run (`None` without it).
    pub fn schedule_free_state(&self) -> Option<ScheduleFreeState<B>> {
        self.schedule_free.as_ref().map(|s| ScheduleFreeState { z: s.z.clone(), scalars: s.scalars.clone() })
    }

    /// Restores the schedule-free state (resuming a run); an error without it or when the
    /// lengths do not fit this optimizer's tensors. Reads the step count `k` (a sync),
    /// which the per-step tables must cover.
    pub fn set_schedule_free_state(&mut self, state: ScheduleFreeState<B>) -> Result<()> {
        let len = self.len();
        let Some(sf) = self.schedule_free.as_mut() else {
            return Err(LoraError::Optimizer("this optimizer is not schedule-free".into()));
        };
        for (name, tensor, expected) in [("z", &state.z, len), ("scalars", &state.scalars, 3)] {
            if tensor.dims()[0] != expected {
                return Err(LoraError::ShapeMismatch {
                    key: format!("schedule-free state {name}"),
                    reason: format!("{} values, the optimizer needs {expected}", tensor.dims()[0]),
                });
            }
        }
        let k: f32 = state.scalars.clone().slice(0..1).into_scalar().elem();
        (sf.z, sf.scalars) = (state.z, state.scalars);
        self.raise_time_bound(k.max(0.0) as usize);
        Ok(())
    }

    /// The base sequence `z` of a schedule-free update (AdamW / RAdam or Prodigy's) and
    /// the β₁ that interpolates towards it.
    fn schedule_free_z(&self) -> Option<(Tensor<B::InnerBackend, 1>, f32)> {
        if let Some(zb) = self.prodigy_plus_z() {
            return Some(zb);
        }
        self.schedule_free.as_ref().map(|sf| (sf.z.clone(), self.settings.beta_1))
    }

    /// The values to evaluate: schedule-free's `x = y + (1 − 1/β₁)·(z − y)` (the packages'
    /// `eval()`), the trained values themselves for the other updates.
    fn eval_values(&self) -> Tensor<B::InnerBackend, 1> {
        match self.schedule_free_z() {
            None => self.params.clone(),
            Some((z, beta_1)) => {
                let weight = (1.0 - 1.0 / decimal(beta_1)) as f32;
                let y = self.params.clone();
                y.clone().add(z.sub(y).mul_scalar(weight))
            }
        }
    }

    /// `module` with its trained tensors set to the values to evaluate, sample or validate
    /// with, in the working dtype: schedule-free's `x`
    /// ([`with_schedule_free`](Self::with_schedule_free)), otherwise the same as
    /// [`to_working`](Self::to_working). Training goes on from the optimizer's own values:
    /// hand the module [`to_working`](Self::to_working)'s before the next step.
    pub fn to_eval<M: burn::module::AutodiffModule<B>>(&self, module: M) -> M {
        match self.is_schedule_free() {
            false => self.to_working(module),
            true => self.scatter_values_working(module, self.eval_values()),
        }
    }

    /// `module` with its trained tensors set to the values to save, in their own dtype
    /// (f32 for a LoRA): schedule-free's `x`, otherwise the same as
    /// [`to_master`](Self::to_master).
    pub fn to_master_eval<M: burn::module::AutodiffModule<B>>(&self, module: M) -> M {
        self.scatter(module, self.eval_values())
    }

    /// One schedule-free step (`AdamWScheduleFree.step` / `RAdamScheduleFree.step` /
    /// `SGDScheduleFree.step`, whose "normalized" gradient is the gradient itself): the
    /// learning rate (times RAdam's rectification), its running maximum, the average's
    /// weight `(k + 1)^r · lr_max^p` and `c = weight / Σ weights`; then the second moments,
    /// the normalized gradient `g / (√(v / (1 − β₂^(k+1))) + ε)` (plus `wd · y`), `y`
    /// moved towards `z` by `c` and along the gradient by `lr·(β₁(1 − c) − 1)`, and `z`
    /// by `−lr`.
    pub(super) fn schedule_free_step(&mut self, lr: f64, grad: Tensor<B::InnerBackend, 1>, present: Option<FlatMask<B>>, apply: Option<Tensor<B::InnerBackend, 1, Bool>>) {
        let Some(mut state) = self.schedule_free.clone() else { return };
        self.raise_time_bound(self.time_bound + 1);
        let device = self.params.device();
        if state.tables.len <= self.time_bound {
            let len = (self.time_bound + 1).next_power_of_two().max(BIAS_TABLE_MIN);
            state.tables = Tables::new(&state.settings, decimal(self.settings.beta_2), len, &device);
        }
        let (a, s) = (self.settings, state.settings);
        let len = self.len();
        let full = |x: Tensor<B::InnerBackend, 1>| x.expand([len]);
        let scalar = |i: usize| state.scalars.clone().slice(i..i + 1);
        let (k, lr_max, weight_sum) = (scalar(0), scalar(1), scalar(2));
        let index = k.clone().int();
        let lr_t = state.tables.rect.clone().select(0, index.clone()).mul_scalar(lr);
        let lr_max = lr_max.max_pair(lr_t.clone());
        let mut weight = lr_max.clone().powf_scalar(s.weight_lr_power);
        if s.r != 0.0 {
            weight = weight.mul(k.clone().add_scalar(1.0).powf_scalar(s.r));
        }
        let weight_sum = weight_sum.add(weight.clone());
        // The package's `ZeroDivisionError` branch: no weight yet, no averaging.
        let ckp1 = weight.div(weight_sum.clone()).mask_fill(weight_sum.clone().lower_equal_elem(0.0), 0.0);

        let params = self.params.clone();
        let (v, mut normalized) = if s.sgd {
            (self.moment_2.clone(), grad)
        } else {
            let v = self.moment_2.clone().mul_scalar(a.beta_2).add(grad.clone().square().mul_scalar((1.0 - decimal(a.beta_2)) as f32));
            let bias_2 = full(state.tables.bias_2.clone().select(0, index.clone()));
            let normalized = grad.clone().div(v.clone().div(bias_2).sqrt().add_scalar(a.epsilon));
            let normalized = match s.radam {
                // RAdam's first steps take the raw gradient (SGD).
                true => grad.mask_where(full(state.tables.adam.clone().select(0, index)).equal_elem(1.0), normalized),
                false => normalized,
            };
            (v, normalized)
        };
        if a.weight_decay != 0.0 {
            normalized = normalized.add(params.clone().mul_scalar(a.weight_decay));
        }
        // Each element's learning rate: the step's times its tensor's factor.
        let step = match &self.lr_scales {
            None => full(lr_t.clone()),
            Some(scales) => scales.clone().mul(full(lr_t.clone())),
        };
        let toward_z = params.clone().add(state.z.clone().sub(params).mul(full(ckp1.clone())));
        let y_lr = ckp1.neg().add_scalar(1.0).mul_scalar(a.beta_1).sub_scalar(1.0);
        let y = toward_z.add(normalized.clone().mul(step.clone()).mul(full(y_lr)));
        let z = state.z.clone().sub(normalized.mul(step));
        let new_scalars = Tensor::cat(vec![k.add_scalar(1.0), lr_max, weight_sum], 0);

        // Commit: the step's tensors (those with a gradient) where the device says the step
        // happens; the scalars advance with every step that happens, as the package's
        // group counters do.
        let happens = apply.unwrap_or_else(|| Tensor::<B::InnerBackend, 1, Bool>::from_bool([true].into(), &device));
        let moved = match &present {
            None => happens.clone().expand([len]),
            Some(present) => happens.clone().expand([len]).bool_and(present.clone()),
        };
        self.moment_2 = self.moment_2.clone().mask_where(moved.clone(), v);
        self.params = self.params.clone().mask_where(moved.clone(), y);
        self.time = self.time.clone().add(moved.clone().int());
        self.schedule_free = Some(ScheduleFree {
            z: state.z.mask_where(moved, z),
            scalars: state.scalars.mask_where(happens.expand([3]), new_scalars),
            ..state
        });
    }
}
