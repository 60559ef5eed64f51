//! DAdaptAdam on the flat vectors of a [`FlatAdamW`] ([`FlatAdamW::with_dadapt_adam`]).
//!
//! D-Adaptation (Defazio and Mishchenko 2023, "Learning-Rate-Free Learning by
//! D-Adaptation") estimates Adam's step size `d` from the gradients, as Prodigy (its
//! successor) does; the learning rate multiplies the estimate. The arithmetic is the
//! `dadaptation` package's `DAdaptAdam` (3.2, kohya's sd-scripts' `optimizer_type =
//! "DAdaptAdam"`), in f32 on the device, checked step by step against it.

use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Bool, ElementConversion, Tensor, TensorData};

use super::{decimal, FlatAdamW, FlatMask};
use crate::error::{LoraError, Result};

/// DAdaptAdam's own settings (β, ε and the weight decay are the
/// [`AdamWSettings`](super::AdamWSettings)'). The defaults are the `dadaptation`
/// package's.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DAdaptSettings {
    /// Initial estimate `d₀`.
    pub d0: f32,
    /// Largest factor by which the estimate grows per step (`f32::INFINITY`: no limit).
    pub growth_rate: f32,
    /// AdamW-style decoupled weight decay; `false` (the package's default) adds
    /// `weight_decay · p` to the gradient instead (L2).
    pub decouple: bool,
    /// Adam's bias correction applied to the step size.
    pub use_bias_correction: bool,
}

impl Default for DAdaptSettings {
    fn default() -> Self {
        Self { d0: 1e-6, growth_rate: f32::INFINITY, decouple: false, use_bias_correction: false }
    }
}

impl DAdaptSettings {
    /// Checks these settings with the [`AdamWSettings`](super::AdamWSettings) they go
    /// with, as `dadaptation` checks them: a positive `d0`, a growth rate of at least 1,
    /// betas in `[0, 1)`, a positive ε and a weight decay of at least 0 (the estimate
    /// divides by `1 − √β₂` and by ε).
    pub fn validate(&self, adam: &super::AdamWSettings) -> Result<()> {
        let bad = |what: &str| Err(LoraError::Optimizer(format!("DAdaptAdam: {what}")));
        if !(self.d0.is_finite() && self.d0 > 0.0) || self.growth_rate.is_nan() || self.growth_rate < 1.0 {
            return bad("d0 must be positive and growth_rate at least 1");
        }
        if !((0.0..1.0).contains(&adam.beta_1) && (0.0..1.0).contains(&adam.beta_2)) {
            return bad("the betas must be in [0, 1)");
        }
        if !(adam.epsilon.is_finite() && adam.epsilon > 0.0 && adam.weight_decay.is_finite() && adam.weight_decay >= 0.0) {
            return bad("epsilon must be positive and weight_decay at least 0");
        }
        Ok(())
    }
}

/// DAdaptAdam's state in flat form, for saving and resuming a run
/// ([`FlatAdamW::dadapt_state`]).
#[derive(Debug, Clone)]
pub struct DAdaptState<B: AutodiffBackend> {
    /// The running sum `s` of scaled gradients, in the optimizer's flat order.
    pub s: Tensor<B::InnerBackend, 1>,
    /// `[d, numerator_weighted, k]`: the estimate, the numerator's running sum and the
    /// number of steps taken.
    pub scalars: Tensor<B::InnerBackend, 1>,
}

/// DAdaptAdam's settings, state and bias-correction table.
#[derive(Debug, Clone)]
pub(super) struct DAdapt<B: AutodiffBackend> {
    settings: DAdaptSettings,
    s: Tensor<B::InnerBackend, 1>,
    scalars: Tensor<B::InnerBackend, 1>,
    bias: Option<Tensor<B::InnerBackend, 1>>,
}

impl<B: AutodiffBackend> FlatAdamW<B> {
    /// DAdaptAdam's update ([`DAdaptSettings`], the `dadaptation` package's `DAdaptAdam`)
    /// instead of Adam's: the step size is the optimizer's own estimate `d` times the
    /// learning rate (1 is usual; a schedule still applies). β, ε and the weight decay
    /// come from the [`AdamWSettings`](super::AdamWSettings). The factors of
    /// [`with_lr_scales`](Self::with_lr_scales) act as DAdaptAdam's `layer_scale` (on the
    /// first moment and in the estimate; a factor of 0 freezes a tensor). Tensors without
    /// a gradient in a step keep their values and state; a learning rate of 0 changes
    /// nothing. Replaces [`with_prodigy`](Self::with_prodigy),
    /// [`with_lion`](Self::with_lion) and [`with_adafactor`](Self::with_adafactor).
    /// Errors on invalid settings ([`DAdaptSettings::validate`]).
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
        let scalars = Tensor::from_data(TensorData::new(vec![settings.d0, 0.0, 0.0], [3]), &device);
        self.dadapt = Some(DAdapt { settings, s: Tensor::zeros([self.len()], &device), scalars, bias: None });
        Ok(self)
    }

    /// DAdaptAdam's current estimate `d` (shape `[1]`, on the device: no read); `None`
    /// without it. The step size of a step is `d` times its learning rate.
    pub fn dadapt_d(&self) -> Option<Tensor<B::InnerBackend, 1>> {
        self.dadapt.as_ref().map(|a| a.scalars.clone().slice(0..1))
    }

    /// DAdaptAdam's state, to save with a run (`None` without it).
    pub fn dadapt_state(&self) -> Option<DAdaptState<B>> {
        self.dadapt.as_ref().map(|a| DAdaptState { s: a.s.clone(), scalars: a.scalars.clone() })
    }

    /// Restores DAdaptAdam's state (resuming a run); an error without DAdaptAdam or when
    /// the lengths do not fit this optimizer's tensors. Reads the step count `k` (a sync),
    /// which the bias-correction table must cover.
    pub fn set_dadapt_state(&mut self, state: DAdaptState<B>) -> Result<()> {
        let len = self.len();
        let Some(dadapt) = self.dadapt.as_mut() else {
            return Err(LoraError::Optimizer("this optimizer does not use DAdaptAdam".into()));
        };
        for (name, tensor, expected) in [("s", &state.s, len), ("scalars", &state.scalars, 3)] {
            if tensor.dims()[0] != expected {
                return Err(LoraError::ShapeMismatch {
                    key: format!("DAdaptAdam state {name}"),
                    reason: format!("{} values, the optimizer needs {expected}", tensor.dims()[0]),
                });
            }
        }
        let k: f32 = state.scalars.clone().slice(2..3).into_scalar().elem();
        (dadapt.s, dadapt.scalars) = (state.s, state.scalars);
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
        // Where the step counts: tensors with a gradient and a factor above 0.
        let live = match (&present, &self.lr_scales) {
            (None, None) => None,
            (Some(present), None) => Some(present.clone()),
            (None, Some(r)) => Some(r.clone().greater_elem(0.0)),
            (Some(present), Some(r)) => Some(present.clone().bool_and(r.clone().greater_elem(0.0))),
        };
        let scaled = |x: Tensor<B::InnerBackend, 1>| match &self.lr_scales {
            Some(r) => x.mul(r.clone()),
            None => x,
        };
        let counted = |x: Tensor<B::InnerBackend, 1>| match &live {
            Some(live) => x.mask_fill(live.clone().bool_not(), 0.0),
            None => x,
        };
        let denom = self.moment_2.clone().sqrt().add_scalar(a.epsilon);
        let numerator = counted(scaled(grad.clone().mul(state.s.clone()).div(denom))).sum().mul(dlr.clone());
        let mut m = self.moment_1.clone().mul_scalar(beta_1 as f32).add(scaled(grad.clone().mul(full(dlr.clone().mul_scalar((1.0 - beta_1) as f32)))));
        let mut v = self.moment_2.clone().mul_scalar(beta_2 as f32).add(grad.clone().square().mul_scalar((1.0 - beta_2) as f32));
        let mut s = state.s.clone().mul_scalar(sqrt_beta_2 as f32).add(grad.mul(full(dlr.clone().mul_scalar((1.0 - sqrt_beta_2) as f32))));
        if let Some(live) = &live {
            m = self.moment_1.clone().mask_where(live.clone(), m);
            v = self.moment_2.clone().mask_where(live.clone(), v);
            s = state.s.clone().mask_where(live.clone(), s);
        }
        let sk_l1 = counted(scaled(s.clone().abs())).sum();
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
}
