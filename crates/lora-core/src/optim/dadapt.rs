//! The D-Adaptation optimizers on the flat vectors of a [`FlatAdamW`]
//! ([`FlatAdamW::with_dadapt_adam`]).
//!
//! D-Adaptation (Defazio and Mishchenko 2023, "Learning-Rate-Free Learning by
//! D-Adaptation") estimates the step size `d` from the gradients, as Prodigy (its
//! successor) does; the learning rate multiplies the estimate. The arithmetic is the
//! `dadaptation` package's (3.2) `DAdaptAdam`, `DAdaptLion`, `DAdaptSGD`, `DAdaptAdaGrad`,
//! `DAdaptAdan` and `experimental.DAdaptAdamPreprint` (kohya's sd-scripts' `optimizer_type`
//! of those names, and `"DAdaptation"` for the last), in f32 on the device, checked step
//! by step against it ([`DAdaptKind`]).

use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Bool, ElementConversion, Tensor, TensorData};

use super::{decimal, FlatAdamW, FlatMask};
use crate::error::{LoraError, Result};

/// Which of the `dadaptation` package's optimizers a [`DAdaptSettings`] configures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DAdaptKind {
    /// `DAdaptAdam`: Adam whose step size is the estimate (kohya's `DAdaptAdam`).
    #[default]
    Adam,
    /// `experimental.DAdaptAdamPreprint`, the paper preprint's Adam variant, whose estimate
    /// weighs the running sums by Adam's denominator (kohya's `DAdaptation` and
    /// `DAdaptAdamPreprint`).
    AdamPreprint,
    /// `DAdaptLion`: Lion's sign steps of size `d·lr`, decoupled weight decay; the
    /// estimate never shrinks and has no growth limit.
    Lion,
    /// `DAdaptSGD`: dual averaging of the gradients (each value is its start minus their
    /// sum, scaled by `d·lr` over the first gradient's norm), `momentum` as averaging of
    /// the iterates, weight decay added to the gradient.
    Sgd,
    /// `DAdaptAdaGrad`: dual-averaged AdaGrad (each value is its start minus the scaled
    /// gradients' sum over the root of the squared gradients' sum, which starts at 1e-6),
    /// `momentum` as DAdaptSGD's, weight decay added to the gradient.
    AdaGrad,
    /// `DAdaptAdan`: Adan (a moment of the gradients, one of their differences from step
    /// to step, and one of the squared Nesterov estimate) with three betas (β₁, β₂ and
    /// `beta_3`) and a proximal weight decay (`no_prox`: decoupled).
    Adan,
}

impl DAdaptKind {
    /// The package's class name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Adam => "DAdaptAdam",
            Self::AdamPreprint => "DAdaptAdamPreprint",
            Self::Lion => "DAdaptLion",
            Self::Sgd => "DAdaptSGD",
            Self::AdaGrad => "DAdaptAdaGrad",
            Self::Adan => "DAdaptAdan",
        }
    }

    /// Entries of the state's scalars: `[d, numerator, k]`, with DAdaptSGD's first
    /// gradient norm after them.
    fn scalars(self) -> usize {
        if self == Self::Sgd {
            4
        } else {
            3
        }
    }
}

/// The D-Adaptation optimizers' own settings (β, ε and the weight decay are the
/// [`AdamWSettings`](super::AdamWSettings)'; Lion's betas are its β₁ and β₂). The defaults
/// are the `dadaptation` package's `DAdaptAdam`'s.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DAdaptSettings {
    /// Which optimizer.
    pub kind: DAdaptKind,
    /// Initial estimate `d₀`.
    pub d0: f32,
    /// Largest factor by which the estimate grows per step (`f32::INFINITY`: no limit).
    pub growth_rate: f32,
    /// AdamW-style decoupled weight decay; `false` (the package's default) adds
    /// `weight_decay · p` to the gradient instead (L2).
    pub decouple: bool,
    /// Adam's bias correction applied to the step size (DAdaptAdam only).
    pub use_bias_correction: bool,
    /// DAdaptSGD's and DAdaptAdaGrad's momentum: each value moves `1 − momentum` of the
    /// way to the averaged point per step (0: all the way).
    pub momentum: f32,
    /// DAdaptAdan's third beta, the squared estimate's decay (the package's 0.99).
    pub beta_3: f32,
    /// DAdaptAdan's `no_prox`: decay the values by `1 − d·lr·wd` before the step instead
    /// of dividing them by `1 + d·lr·wd` after it.
    pub no_prox: bool,
}

impl Default for DAdaptSettings {
    fn default() -> Self {
        Self { kind: DAdaptKind::Adam, d0: 1e-6, growth_rate: f32::INFINITY, decouple: false, use_bias_correction: false, momentum: 0.0, beta_3: 0.99, no_prox: false }
    }
}

impl DAdaptSettings {
    /// Checks these settings with the [`AdamWSettings`](super::AdamWSettings) they go
    /// with, as `dadaptation` checks them: a positive `d0`, a growth rate of at least 1,
    /// betas in `[0, 1)`, a positive ε and a weight decay of at least 0 (the estimate
    /// divides by `1 − √β₂` and by ε).
    ///
    /// Each optimizer takes only its own options: `use_bias_correction` is DAdaptAdam's,
    /// `momentum` DAdaptSGD's and DAdaptAdaGrad's, `no_prox` DAdaptAdan's (whose
    /// `beta_3` must be in `[0, 1)`), and DAdaptLion has no `growth_rate` (it must be
    /// infinite).
    pub fn validate(&self, adam: &super::AdamWSettings) -> Result<()> {
        let name = self.kind.name();
        let bad = |what: &str| Err(LoraError::Optimizer(format!("{name}: {what}")));
        if !(self.d0.is_finite() && self.d0 > 0.0) || self.growth_rate.is_nan() || self.growth_rate < 1.0 {
            return bad("d0 must be positive and growth_rate at least 1");
        }
        let betas_unused = matches!(self.kind, DAdaptKind::Sgd | DAdaptKind::AdaGrad);
        if !(betas_unused || ((0.0..1.0).contains(&adam.beta_1) && (0.0..1.0).contains(&adam.beta_2))) {
            return bad("the betas must be in [0, 1)");
        }
        let epsilon_ok = matches!(self.kind, DAdaptKind::Lion | DAdaptKind::Sgd) || (adam.epsilon.is_finite() && adam.epsilon > 0.0);
        if !(epsilon_ok && adam.weight_decay.is_finite() && adam.weight_decay >= 0.0) {
            return bad("epsilon must be positive and weight_decay at least 0");
        }
        if self.use_bias_correction && self.kind != DAdaptKind::Adam {
            return bad("use_bias_correction is DAdaptAdam's option");
        }
        if self.momentum != 0.0 && !matches!(self.kind, DAdaptKind::Sgd | DAdaptKind::AdaGrad) {
            return bad("momentum is DAdaptSGD's and DAdaptAdaGrad's option");
        }
        if self.no_prox && self.kind != DAdaptKind::Adan {
            return bad("no_prox is DAdaptAdan's option");
        }
        if self.kind == DAdaptKind::Adan && !(0.0..1.0).contains(&self.beta_3) {
            return bad("beta3 must be in [0, 1)");
        }
        if !(0.0..1.0).contains(&self.momentum) {
            return bad("momentum must be in [0, 1)");
        }
        if self.kind == DAdaptKind::Lion && self.growth_rate.is_finite() {
            return bad("DAdaptLion has no growth_rate (its estimate grows without limit)");
        }
        Ok(())
    }
}

/// A D-Adaptation optimizer's state in flat form, for saving and resuming a run
/// ([`FlatAdamW::dadapt_state`]).
#[derive(Debug, Clone)]
pub struct DAdaptState<B: AutodiffBackend> {
    /// The running sum `s` of scaled gradients (steps, for DAdaptLion), in the optimizer's
    /// flat order.
    pub s: Tensor<B::InnerBackend, 1>,
    /// `[d, numerator, k]`: the estimate, the numerator's running sum (DAdaptAdamPreprint:
    /// the weighted sum of squared gradients) and the number of steps taken; DAdaptSGD adds
    /// the first gradient's norm.
    pub scalars: Tensor<B::InnerBackend, 1>,
    /// DAdaptSGD's and DAdaptAdaGrad's starting values (`None` for the others).
    pub x0: Option<Tensor<B::InnerBackend, 1>>,
    /// DAdaptAdan's moment of the gradients' differences (`None` for the others).
    pub diff: Option<Tensor<B::InnerBackend, 1>>,
    /// DAdaptAdan's previous gradients (`None` for the others).
    pub pre_grad: Option<Tensor<B::InnerBackend, 1>>,
}

/// A D-Adaptation optimizer's settings, state and bias-correction table.
#[derive(Debug, Clone)]
pub(super) struct DAdapt<B: AutodiffBackend> {
    settings: DAdaptSettings,
    s: Tensor<B::InnerBackend, 1>,
    scalars: Tensor<B::InnerBackend, 1>,
    bias: Option<Tensor<B::InnerBackend, 1>>,
    /// DAdaptSGD's and DAdaptAdaGrad's starting values.
    x0: Option<Tensor<B::InnerBackend, 1>>,
    /// DAdaptAdan's moment of the gradients' differences and previous gradients.
    diff: Option<Tensor<B::InnerBackend, 1>>,
    pre_grad: Option<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> FlatAdamW<B> {
    /// A D-Adaptation update ([`DAdaptSettings`]; its [`kind`](DAdaptSettings::kind)
    /// picks the `dadaptation` package's optimizer, `DAdaptAdam` by default) instead of
    /// Adam's: the step size is the optimizer's own estimate `d` times the learning rate
    /// (1 is usual; a schedule still applies). β, ε and the weight decay come from the
    /// [`AdamWSettings`](super::AdamWSettings). The factors of
    /// [`with_lr_scales`](Self::with_lr_scales) act as DAdaptAdam's `layer_scale` (on the
    /// first moment and in the estimate), and with the other kinds as per-tensor learning
    /// rates (which the package refuses); a factor of 0 freezes a tensor. Tensors without
    /// a gradient in a step keep their values and state; a learning rate of 0 changes
    /// nothing. Replaces the other update rules. Errors on invalid settings
    /// ([`DAdaptSettings::validate`]).
    ///
    /// ```
    /// use burn::backend::{Autodiff, Flex};
    /// use burn::nn::LinearConfig;
    /// use burn::optim::GradientsParams;
    /// use burn::tensor::{Distribution, Tensor};
    /// use lora_core::optim::{AdamWSettings, DAdaptSettings, FlatAdamW};
    ///
    /// type B = Autodiff<Flex>;
    /// let device = Default::default();
    /// let mut layer = LinearConfig::new(4, 2).init::<B>(&device);
    /// let settings = AdamWSettings { epsilon: 1e-8, weight_decay: 0.0, ..Default::default() };
    /// let mut optim = FlatAdamW::new(settings, &layer, &device).with_dadapt_adam(DAdaptSettings::default()).unwrap();
    /// for _ in 0..3 {
    ///     let x = Tensor::<B, 2>::random([3, 4], Distribution::Default, &device);
    ///     let grads = GradientsParams::from_grads(layer.forward(x).sum().backward(), &layer);
    ///     let grads = optim.gather_grads(&layer, grads);
    ///     layer = optim.step(1.0, layer, grads);
    /// }
    /// let d: f32 = optim.dadapt_d().unwrap().into_scalar();
    /// assert!(d > 1e-6, "the estimate grew from d0: {d}");
    /// ```
    pub fn with_dadapt_adam(mut self, settings: DAdaptSettings) -> Result<Self> {
        settings.validate(&self.settings)?;
        self.clear_rules();
        let device = self.moment_1.device();
        let mut scalars = vec![settings.d0, 0.0, 0.0];
        scalars.resize(settings.kind.scalars(), 0.0);
        let scalars = Tensor::from_data(TensorData::new(scalars, [settings.kind.scalars()]), &device);
        let x0 = matches!(settings.kind, DAdaptKind::Sgd | DAdaptKind::AdaGrad).then(|| self.params.clone());
        let adan = settings.kind == DAdaptKind::Adan;
        let len = self.len();
        let zeros = || Tensor::zeros([len], &device);
        let (diff, pre_grad) = (adan.then(zeros), adan.then(zeros));
        if settings.kind == DAdaptKind::AdaGrad {
            // The package's squared-gradient sums start at 1e-6.
            self.moment_2 = Tensor::full([len], 1e-6, &device);
        }
        self.dadapt = Some(DAdapt { settings, s: zeros(), scalars, bias: None, x0, diff, pre_grad });
        Ok(self)
    }

    /// The D-Adaptation optimizer's settings, when this optimizer takes its update.
    pub fn dadapt_settings(&self) -> Option<DAdaptSettings> {
        self.dadapt.as_ref().map(|a| a.settings)
    }

    /// The D-Adaptation optimizer's current estimate `d` (shape `[1]`, on the device: no
    /// read); `None` without one. The step size of a step is `d` times its learning rate.
    pub fn dadapt_d(&self) -> Option<Tensor<B::InnerBackend, 1>> {
        self.dadapt.as_ref().map(|a| a.scalars.clone().slice(0..1))
    }

    /// The D-Adaptation optimizer's state, to save with a run (`None` without one).
    pub fn dadapt_state(&self) -> Option<DAdaptState<B>> {
        self.dadapt.as_ref().map(|a| DAdaptState { s: a.s.clone(), scalars: a.scalars.clone(), x0: a.x0.clone(), diff: a.diff.clone(), pre_grad: a.pre_grad.clone() })
    }

    /// Restores the D-Adaptation optimizer's state (resuming a run); an error without one,
    /// when the lengths do not fit this optimizer's tensors, or when DAdaptSGD's starting
    /// values are missing. Reads the step count `k` (a sync), which the bias-correction
    /// table must cover.
    pub fn set_dadapt_state(&mut self, state: DAdaptState<B>) -> Result<()> {
        let len = self.len();
        let Some(dadapt) = self.dadapt.as_mut() else {
            return Err(LoraError::Optimizer("this optimizer does not use D-Adaptation".into()));
        };
        let kind = dadapt.settings.kind;
        let length = |x: &Option<Tensor<B::InnerBackend, 1>>| x.as_ref().map_or(0, |x| x.dims()[0]);
        let wanted = |on: bool| if on { len } else { 0 };
        let x0_wanted = wanted(matches!(kind, DAdaptKind::Sgd | DAdaptKind::AdaGrad));
        let adan_wanted = wanted(kind == DAdaptKind::Adan);
        for (name, got, expected) in [
            ("s", state.s.dims()[0], len),
            ("scalars", state.scalars.dims()[0], kind.scalars()),
            ("x0", length(&state.x0), x0_wanted),
            ("diff", length(&state.diff), adan_wanted),
            ("pre_grad", length(&state.pre_grad), adan_wanted),
        ] {
            if got != expected {
                return Err(LoraError::ShapeMismatch {
                    key: format!("{} state {name}", kind.name()),
                    reason: format!("{got} values, the optimizer needs {expected}"),
                });
            }
        }
        let k: f32 = state.scalars.clone().slice(2..3).into_scalar().elem();
        (dadapt.s, dadapt.scalars, dadapt.x0, dadapt.diff, dadapt.pre_grad) = (state.s, state.scalars, state.x0, state.diff, state.pre_grad);
        self.raise_time_bound(k.max(0.0) as usize);
        Ok(())
    }

    /// One DAdaptAdam step (`dadaptation`'s `DAdaptAdam.step`): the estimate's numerator
    /// takes `dlr · Σ r·g·s / (√v + ε)` with the old `s` and `v`, the moments and `s` are
    /// updated (the first moment already scaled by `dlr`), `d` grows towards
    /// `numerator / ((1 − √β₂) Σ r·|s|)`, and the values move by `m / (√v + ε)`. As in the
    /// package, a step whose `Σ|s|` is zero updates the moments and `s` only.
    pub(super) fn dadapt_step(&mut self, lr: f64, grad: Tensor<B::InnerBackend, 1>, present: Option<FlatMask<B>>, apply: Option<Tensor<B::InnerBackend, 1, Bool>>) {
        let Some(mut state) = self.dadapt.clone() else { return };
        if lr == 0.0 {
            return;
        }
        match state.settings.kind {
            DAdaptKind::Adam => {}
            DAdaptKind::AdamPreprint => return self.dadapt_preprint_step(state, lr, grad, present, apply),
            DAdaptKind::Lion => return self.dadapt_lion_step(state, lr, grad, present, apply),
            DAdaptKind::Sgd => return self.dadapt_sgd_step(state, lr, grad, present, apply),
            DAdaptKind::AdaGrad => return self.dadapt_adagrad_step(state, lr, grad, present, apply),
            DAdaptKind::Adan => return self.dadapt_adan_step(state, lr, grad, present, apply),
        }
        self.raise_time_bound(self.time_bound + 1);
        let (a, p) = (self.settings, state.settings);
        let len = self.len();
        let scalar = |i: usize| state.scalars.clone().slice(i..i + 1);
        let (d, numerator_weighted, k) = (scalar(0), scalar(1), scalar(2));
        let full = |x: Tensor<B::InnerBackend, 1>| x.expand([len]);
        // Host scalars in f64 from the settings' decimal values, as the package's.
        let (beta_1, beta_2) = (decimal(a.beta_1), decimal(a.beta_2));
        let sqrt_beta_2 = beta_2.sqrt();
        let dlr = self.estimate_step(d.clone(), k.clone(), lr, p.use_bias_correction.then_some(&mut state.bias));
        let params = self.params.clone();
        let grad = match (a.weight_decay, p.decouple) {
            (wd, false) if wd != 0.0 => grad.add(params.clone().mul_scalar(wd)),
            _ => grad,
        };
        let live = self.dadapt_live(present);
        let scaled = |x: Tensor<B::InnerBackend, 1>| match &self.lr_scales {
            Some(r) => x.mul(r.clone()),
            None => x,
        };
        let denom = self.moment_2.clone().sqrt().add_scalar(a.epsilon);
        let numerator = counted(scaled(grad.clone().mul(state.s.clone()).div(denom)), live.as_ref()).sum().mul(dlr.clone());
        let mut m = self.moment_1.clone().mul_scalar(beta_1 as f32).add(scaled(grad.clone().mul(full(dlr.clone().mul_scalar((1.0 - beta_1) as f32)))));
        let mut v = self.moment_2.clone().mul_scalar(beta_2 as f32).add(grad.clone().square().mul_scalar((1.0 - beta_2) as f32));
        let mut s = state.s.clone().mul_scalar(sqrt_beta_2 as f32).add(grad.mul(full(dlr.clone().mul_scalar((1.0 - sqrt_beta_2) as f32))));
        if let Some(live) = &live {
            m = self.moment_1.clone().mask_where(live.clone(), m);
            v = self.moment_2.clone().mask_where(live.clone(), v);
            s = state.s.clone().mask_where(live.clone(), s);
        }
        let sk_l1 = counted(scaled(s.clone().abs()), live.as_ref()).sum();
        let numerator_weighted = numerator_weighted.mul_scalar(sqrt_beta_2 as f32).add(numerator.mul_scalar((1.0 - sqrt_beta_2) as f32));
        let progress = sk_l1.clone().greater_elem(0.0);
        let d_hat = numerator_weighted.clone().div(sk_l1.mul_scalar((1.0 - sqrt_beta_2) as f32));
        let new_d = d.clone().max_pair(d_hat.min_pair(d.mul_scalar(p.growth_rate)));
        let decayed = match (a.weight_decay, p.decouple) {
            (wd, true) if wd != 0.0 => params.clone().sub(params.clone().mul(full(dlr.mul_scalar(wd)))),
            _ => params.clone(),
        };
        let new_params = decayed.sub(m.clone().div(v.clone().sqrt().add_scalar(a.epsilon)));
        let new_scalars = Tensor::cat(vec![new_d, numerator_weighted, k.add_scalar(1.0)], 0);

        // Commit: moments and `s` where the step happens, the rest where it also made
        // progress (values only where the step counts).
        let (happens, updates) = self.commit_estimated(apply, progress, live.as_ref(), (m, v), new_params);
        self.dadapt = Some(DAdapt {
            s: state.s.mask_where(happens, s),
            scalars: state.scalars.mask_where(updates.expand([3]), new_scalars),
            ..state
        });
    }

    /// Where a D-Adaptation step counts: tensors with a gradient and a factor above 0
    /// (`None`: everywhere).
    fn dadapt_live(&self, present: Option<FlatMask<B>>) -> Option<FlatMask<B>> {
        match (present, &self.lr_scales) {
            (None, None) => None,
            (Some(present), None) => Some(present),
            (None, Some(r)) => Some(r.clone().greater_elem(0.0)),
            (Some(present), Some(r)) => Some(present.bool_and(r.clone().greater_elem(0.0))),
        }
    }

    /// Each value's step size: `dlr` times its tensor's factor.
    fn dadapt_step_sizes(&self, dlr: Tensor<B::InnerBackend, 1>) -> Tensor<B::InnerBackend, 1> {
        match &self.lr_scales {
            Some(r) => r.clone().mul(dlr.expand([self.len()])),
            None => dlr.expand([self.len()]),
        }
    }

    /// `DAdaptAdamPreprint.step`: the moments and `s` take the gradient (L2 weight decay
    /// added unless decoupled) scaled by `d·lr`, the estimate is `(Σ s²/δ / (1 − β₂) −
    /// Σ_w g²/δ) / Σ|s|` with `δ = √v + ε` and the weighted sum `Σ_w` of past `(d·lr)²·g²/δ`,
    /// and the values move by `m / δ`. A step whose `Σ|s|` is zero updates the moments and
    /// `s` only. A tensor's factor acts as its group's learning rate would.
    fn dadapt_preprint_step(&mut self, mut state: DAdapt<B>, lr: f64, grad: Tensor<B::InnerBackend, 1>, present: Option<FlatMask<B>>, apply: Option<Tensor<B::InnerBackend, 1, Bool>>) {
        self.raise_time_bound(self.time_bound + 1);
        let (a, p) = (self.settings, state.settings);
        let scalar = |i: usize| state.scalars.clone().slice(i..i + 1);
        let (d, gsq_weighted, k) = (scalar(0), scalar(1), scalar(2));
        let (beta_1, beta_2) = (decimal(a.beta_1), decimal(a.beta_2));
        let (live, step) = (self.dadapt_live(present), self.dadapt_step_sizes(d.clone().mul_scalar(lr)));
        let params = self.params.clone();
        let grad = match (a.weight_decay, p.decouple) {
            (wd, false) if wd != 0.0 => grad.add(params.clone().mul_scalar(wd)),
            _ => grad,
        };
        let mut m = self.moment_1.clone().mul_scalar(a.beta_1).add(grad.clone().mul(step.clone().mul_scalar((1.0 - beta_1) as f32)));
        let mut v = self.moment_2.clone().mul_scalar(a.beta_2).add(grad.clone().square().mul_scalar((1.0 - beta_2) as f32));
        let mut s = state.s.clone().mul_scalar(a.beta_2).add(grad.clone().mul(step.clone().mul_scalar((1.0 - beta_2) as f32)));
        if let Some(live) = &live {
            m = self.moment_1.clone().mask_where(live.clone(), m);
            v = self.moment_2.clone().mask_where(live.clone(), v);
            s = state.s.clone().mask_where(live.clone(), s);
        }
        let denom = v.clone().sqrt().add_scalar(a.epsilon);
        // `(d·lr)²` inside the sum: each tensor's own step size.
        let g_sq = counted(grad.square().mul(step.clone().square()).div(denom.clone()), live.as_ref()).sum();
        let sksq = counted(s.clone().square().div(denom.clone()), live.as_ref()).sum();
        let sk_l1 = counted(s.clone().abs(), live.as_ref()).sum();
        let gsq_weighted = gsq_weighted.mul_scalar(beta_2 as f32).add(g_sq.mul_scalar((1.0 - beta_2) as f32));
        let progress = sk_l1.clone().greater_elem(0.0);
        let d_hat = sksq.div_scalar((1.0 - beta_2) as f32).sub(gsq_weighted.clone()).div(sk_l1);
        let new_d = d.clone().max_pair(d_hat.min_pair(d.mul_scalar(p.growth_rate)));
        let decayed = match (a.weight_decay, p.decouple) {
            (wd, true) if wd != 0.0 => params.clone().sub(params.clone().mul(step.mul_scalar(wd))),
            _ => params.clone(),
        };
        let new_params = decayed.sub(m.clone().div(denom));
        let new_scalars = Tensor::cat(vec![new_d, gsq_weighted, k.add_scalar(1.0)], 0);
        let (happens, updates) = self.commit_estimated(apply, progress, live.as_ref(), (m, v), new_params);
        state.s = state.s.clone().mask_where(happens, s);
        state.scalars = state.scalars.clone().mask_where(updates.expand([3]), new_scalars);
        self.dadapt = Some(state);
    }

    /// `DAdaptLion.step`: the values decay by `1 − d·lr·wd` and move by `d·lr` times the
    /// sign of `β₁·m + (1 − β₁)·g`; the moment takes `(1 − β₂)·d·lr·g`, `s` those signs
    /// times `(1 − √β₂)·d·lr`, and `d` grows to `Σ_w / ((1 − √β₂) Σ|s|)` (the weighted sum
    /// of `d·lr·⟨sign, s⟩`) when that is larger. As in the package, the values move even in
    /// a step whose `Σ|s|` is zero (only the estimate waits). A tensor's factor acts as its
    /// group's learning rate would.
    fn dadapt_lion_step(&mut self, mut state: DAdapt<B>, lr: f64, grad: Tensor<B::InnerBackend, 1>, present: Option<FlatMask<B>>, apply: Option<Tensor<B::InnerBackend, 1, Bool>>) {
        self.raise_time_bound(self.time_bound + 1);
        let a = self.settings;
        let scalar = |i: usize| state.scalars.clone().slice(i..i + 1);
        let (d, numerator_weighted, k) = (scalar(0), scalar(1), scalar(2));
        let (beta_1, beta_2) = (decimal(a.beta_1), decimal(a.beta_2));
        let sqrt_beta_2 = beta_2.sqrt();
        let (live, step) = (self.dadapt_live(present), self.dadapt_step_sizes(d.clone().mul_scalar(lr)));
        let params = self.params.clone();
        let decayed = match a.weight_decay {
            0.0 => params,
            wd => params.clone().mul(step.clone().mul_scalar(-wd).add_scalar(1.0)),
        };
        let update = self.moment_1.clone().mul_scalar(beta_1 as f32).add(grad.clone().mul_scalar((1.0 - beta_1) as f32)).sign();
        let new_params = decayed.sub(update.clone().mul(step.clone()));
        let mut m = self.moment_1.clone().mul_scalar(beta_2 as f32).add(grad.mul(step.clone().mul_scalar((1.0 - beta_2) as f32)));
        let numerator = counted(update.clone().mul(state.s.clone()).mul(step.clone()), live.as_ref()).sum();
        let mut s = state.s.clone().mul_scalar(sqrt_beta_2 as f32).add(update.mul(step.mul_scalar((1.0 - sqrt_beta_2) as f32)));
        if let Some(live) = &live {
            m = self.moment_1.clone().mask_where(live.clone(), m);
            s = state.s.clone().mask_where(live.clone(), s);
        }
        let sk_l1 = counted(s.clone().abs(), live.as_ref()).sum();
        let numerator_weighted = numerator_weighted.mul_scalar(sqrt_beta_2 as f32).add(numerator.mul_scalar((1.0 - sqrt_beta_2) as f32));
        let progress = sk_l1.clone().greater_elem(0.0);
        let d_hat = numerator_weighted.clone().div(sk_l1.mul_scalar((1.0 - sqrt_beta_2) as f32));
        let new_d = d.max_pair(d_hat);
        let new_scalars = Tensor::cat(vec![new_d, numerator_weighted, k.add_scalar(1.0)], 0);
        // The values move whether or not the estimate can (a step always "progresses").
        let always = Tensor::<B::InnerBackend, 1, Bool>::from_bool([true].into(), &self.moment_1.device());
        let v = self.moment_2.clone();
        let (happens, moved) = self.commit_estimated(apply, always, live.as_ref(), (m, v), new_params);
        state.s = state.s.clone().mask_where(happens, s);
        state.scalars = state.scalars.clone().mask_where(moved.bool_and(progress).expand([3]), new_scalars);
        self.dadapt = Some(state);
    }

    /// `DAdaptSGD.step`: with the first step's gradient norm `‖g₀‖` (taken again until a
    /// step makes progress), `s` sums the gradients (L2 weight decay added) times
    /// `d·lr/‖g₀‖`, the estimate grows to `2 Σ d·lr/‖g₀‖·⟨g, s⟩ / ‖s‖` (capped by
    /// `growth_rate`), and each value moves `1 − momentum` of the way to its start minus
    /// `s`. A step whose `‖s‖` is zero updates `s` only. A tensor's factor acts as its
    /// group's learning rate would.
    fn dadapt_sgd_step(&mut self, mut state: DAdapt<B>, lr: f64, grad: Tensor<B::InnerBackend, 1>, present: Option<FlatMask<B>>, apply: Option<Tensor<B::InnerBackend, 1, Bool>>) {
        self.raise_time_bound(self.time_bound + 1);
        let (a, p) = (self.settings, state.settings);
        let scalar = |i: usize| state.scalars.clone().slice(i..i + 1);
        let (d, numerator, k, g0) = (scalar(0), scalar(1), scalar(2), scalar(3));
        let live = self.dadapt_live(present);
        // The norm of the first step's gradients (before the weight decay, as the package
        // takes it), until a step makes progress.
        let g0 = g0.clone().mask_where(k.clone().equal_elem(0.0), counted(grad.clone().square(), live.as_ref()).sum().sqrt());
        let step = self.dadapt_step_sizes(d.clone().mul_scalar(lr).div(g0.clone()));
        let params = self.params.clone();
        let grad = match a.weight_decay {
            0.0 => grad,
            wd => grad.add(params.clone().mul_scalar(wd)),
        };
        let numerator = numerator.add(counted(grad.clone().mul(state.s.clone()).mul(step.clone()), live.as_ref()).sum());
        let mut s = state.s.clone().add(grad.mul(step));
        if let Some(live) = &live {
            s = state.s.clone().mask_where(live.clone(), s);
        }
        let sk_sq = counted(s.clone().square(), live.as_ref()).sum();
        let progress = sk_sq.clone().greater_elem(0.0).bool_and(g0.clone().greater_elem(0.0));
        let d_hat = numerator.clone().mul_scalar(2.0).div(sk_sq.sqrt());
        let new_d = d.clone().max_pair(d_hat.min_pair(d.mul_scalar(p.growth_rate)));
        let x0 = state.x0.clone().unwrap_or_else(|| params.clone());
        let z = x0.sub(s.clone());
        let ck = 1.0 - p.momentum;
        let new_params = params.mul_scalar(1.0 - ck).add(z.mul_scalar(ck));
        let new_scalars = Tensor::cat(vec![new_d, numerator, k.add_scalar(1.0), g0], 0);
        let (m, v) = (self.moment_1.clone(), self.moment_2.clone());
        let (happens, updates) = self.commit_estimated(apply, progress, live.as_ref(), (m, v), new_params);
        state.s = state.s.clone().mask_where(happens, s);
        state.scalars = state.scalars.clone().mask_where(updates.expand([4]), new_scalars);
        self.dadapt = Some(state);
    }

    /// `DAdaptAdaGrad.step`: the squared gradients (L2 weight decay added) add to `α`
    /// (the second moment, from 1e-6), `s` sums the gradients times `d·lr`, the estimate
    /// grows to `(Σ s²/δ − Σ_w) / Σ|s|` with `δ = √α + ε` over every tensor that trains
    /// (the package keeps running totals) and the sum `Σ_w` of `(d·lr)²·g²/δ`, and each
    /// value moves `1 − momentum` of the way to `x₀ − s/δ`. A step whose `Σ|s|` is zero
    /// updates `α` and `s` only. A tensor's factor acts as its group's learning rate would.
    fn dadapt_adagrad_step(&mut self, mut state: DAdapt<B>, lr: f64, grad: Tensor<B::InnerBackend, 1>, present: Option<FlatMask<B>>, apply: Option<Tensor<B::InnerBackend, 1, Bool>>) {
        self.raise_time_bound(self.time_bound + 1);
        let (a, p) = (self.settings, state.settings);
        let scalar = |i: usize| state.scalars.clone().slice(i..i + 1);
        let (d, gsq_weighted, k) = (scalar(0), scalar(1), scalar(2));
        let (live, step) = (self.dadapt_live(present), self.dadapt_step_sizes(d.clone().mul_scalar(lr)));
        // The running totals cover every tensor in the optimizer (factor above 0), with a
        // gradient this step or not.
        let trains = self.lr_scales.as_ref().map(|r| r.clone().greater_elem(0.0));
        let total = |x: Tensor<B::InnerBackend, 1>| match &trains {
            Some(t) => x.mask_fill(t.clone().bool_not(), 0.0).sum(),
            None => x.sum(),
        };
        let params = self.params.clone();
        let grad = match a.weight_decay {
            0.0 => grad,
            wd => grad.add(params.clone().mul_scalar(wd)),
        };
        let mut alpha = self.moment_2.clone().add(grad.clone().square());
        let mut s = state.s.clone().add(grad.clone().mul(step.clone()));
        if let Some(live) = &live {
            alpha = self.moment_2.clone().mask_where(live.clone(), alpha);
            s = state.s.clone().mask_where(live.clone(), s);
        }
        let denom = alpha.clone().sqrt().add_scalar(a.epsilon);
        let g_sq = counted(grad.square().mul(step.square()).div(denom.clone()), live.as_ref()).sum();
        let sksq = total(s.clone().square().div(denom.clone()));
        let skl1 = total(s.clone().abs());
        let gsq_weighted = gsq_weighted.add(g_sq);
        let progress = skl1.clone().greater_elem(0.0);
        let d_hat = sksq.sub(gsq_weighted.clone()).div(skl1);
        let new_d = d.clone().max_pair(d_hat.min_pair(d.mul_scalar(p.growth_rate)));
        let x0 = state.x0.clone().unwrap_or_else(|| params.clone());
        let z = x0.sub(s.clone().div(denom));
        let ck = 1.0 - p.momentum;
        let new_params = match p.momentum {
            0.0 => z,
            _ => params.mul_scalar(1.0 - ck).add(z.mul_scalar(ck)),
        };
        let new_scalars = Tensor::cat(vec![new_d, gsq_weighted, k.add_scalar(1.0)], 0);
        let m = self.moment_1.clone();
        let (happens, updates) = self.commit_estimated(apply, progress, live.as_ref(), (m, alpha), new_params);
        state.s = state.s.clone().mask_where(happens, s);
        state.scalars = state.scalars.clone().mask_where(updates.expand([3]), new_scalars);
        self.dadapt = Some(state);
    }

    /// `DAdaptAdan.step`: with the gradients' change `Δ = g − g_prev` (0 in a tensor's
    /// first step), the moments `m ← β₁m + d·lr(1 − β₁)g`, `n ← β₂n + d·lr(1 − β₂)Δ`,
    /// `v ← β₃v + (1 − β₃)(g + β₂Δ)²` and `s ← β₃s + d·lr(1 − β₃)g`, the estimate as
    /// DAdaptAdamPreprint's with β₃, and each value moves by `(m + β₂n)/(√v + ε)`, then is
    /// divided by `1 + d·lr·wd` (`no_prox`: first multiplied by `1 − d·lr·wd`). A step whose
    /// `Σ|s|` is zero updates the moments and `s` only (the previous gradients and step
    /// counts wait). A tensor's factor acts as its group's learning rate would.
    fn dadapt_adan_step(&mut self, mut state: DAdapt<B>, lr: f64, grad: Tensor<B::InnerBackend, 1>, present: Option<FlatMask<B>>, apply: Option<Tensor<B::InnerBackend, 1, Bool>>) {
        self.raise_time_bound(self.time_bound + 1);
        let (a, p) = (self.settings, state.settings);
        let scalar = |i: usize| state.scalars.clone().slice(i..i + 1);
        let (d, gsq_weighted, k) = (scalar(0), scalar(1), scalar(2));
        let (beta_1, beta_2, beta_3) = (decimal(a.beta_1), decimal(a.beta_2), decimal(p.beta_3));
        let (live, step) = (self.dadapt_live(present), self.dadapt_step_sizes(d.clone().mul_scalar(lr)));
        let zeros = || Tensor::zeros([self.len()], &self.params.device());
        let (old_diff, old_pre) = (state.diff.clone().unwrap_or_else(zeros), state.pre_grad.clone().unwrap_or_else(zeros));
        // A tensor's first step (no step counted yet) takes its own gradient as the previous.
        let previous = old_pre.clone().mask_where(self.time.clone().equal_elem(0), grad.clone());
        let change = grad.clone().sub(previous);
        let nesterov = grad.clone().add(change.clone().mul_scalar(a.beta_2));
        let mut m = self.moment_1.clone().mul_scalar(a.beta_1).add(grad.clone().mul(step.clone().mul_scalar((1.0 - beta_1) as f32)));
        let mut diff = old_diff.clone().mul_scalar(a.beta_2).add(change.mul(step.clone().mul_scalar((1.0 - beta_2) as f32)));
        let mut v = self.moment_2.clone().mul_scalar(p.beta_3).add(nesterov.square().mul_scalar((1.0 - beta_3) as f32));
        let mut s = state.s.clone().mul_scalar(p.beta_3).add(grad.clone().mul(step.clone().mul_scalar((1.0 - beta_3) as f32)));
        if let Some(live) = &live {
            m = self.moment_1.clone().mask_where(live.clone(), m);
            diff = old_diff.clone().mask_where(live.clone(), diff);
            v = self.moment_2.clone().mask_where(live.clone(), v);
            s = state.s.clone().mask_where(live.clone(), s);
        }
        let denom = v.clone().sqrt().add_scalar(a.epsilon);
        let g_sq = counted(grad.clone().square().mul(step.clone().square()).div(denom.clone()), live.as_ref()).sum();
        let sksq = counted(s.clone().square().div(denom.clone()), live.as_ref()).sum();
        let sk_l1 = counted(s.clone().abs(), live.as_ref()).sum();
        let gsq_weighted = gsq_weighted.mul_scalar(p.beta_3).add(g_sq.mul_scalar((1.0 - beta_3) as f32));
        let progress = sk_l1.clone().greater_elem(0.0);
        let d_hat = sksq.div_scalar((1.0 - beta_3) as f32).sub(gsq_weighted.clone()).div(sk_l1);
        let new_d = d.clone().max_pair(d_hat.min_pair(d.mul_scalar(p.growth_rate)));
        let update = m.clone().add(diff.clone().mul_scalar(a.beta_2)).div(denom);
        let params = self.params.clone();
        let decay = step.mul_scalar(a.weight_decay);
        let new_params = match (a.weight_decay, p.no_prox) {
            (0.0, _) => params.sub(update),
            (_, true) => params.clone().mul(decay.neg().add_scalar(1.0)).sub(update),
            (_, false) => params.sub(update).div(decay.add_scalar(1.0)),
        };
        let new_scalars = Tensor::cat(vec![new_d, gsq_weighted, k.add_scalar(1.0)], 0);
        let (happens, updates) = self.commit_estimated(apply, progress, live.as_ref(), (m, v), new_params);
        // The previous gradients move on where the values did.
        let moved = match &live {
            Some(live) => updates.clone().expand([self.len()]).bool_and(live.clone()),
            None => updates.clone().expand([self.len()]),
        };
        state.pre_grad = Some(old_pre.mask_where(moved, grad));
        state.diff = Some(old_diff.mask_where(happens.clone(), diff));
        state.s = state.s.clone().mask_where(happens, s);
        state.scalars = state.scalars.clone().mask_where(updates.expand([3]), new_scalars);
        self.dadapt = Some(state);
    }
}

/// `x` with the values outside `live` zeroed (all of it counts without a mask): what a
/// D-Adaptation sum takes over the tensors that step.
fn counted<I: burn::tensor::backend::Backend>(x: Tensor<I, 1>, live: Option<&Tensor<I, 1, Bool>>) -> Tensor<I, 1> {
    match live {
        Some(live) => x.mask_fill(live.clone().bool_not(), 0.0),
        None => x,
    }
}
