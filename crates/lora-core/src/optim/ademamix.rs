//! AdEMAMix on the flat vectors of a [`FlatAdamW`] ([`FlatAdamW::with_ademamix`]).
//!
//! AdEMAMix (Pagliardini, Ablin and Grangier 2024, "The AdEMAMix Optimizer: Better,
//! Faster, Older") adds to Adam's first moment a second, slow one (decay β₃, e.g.
//! 0.9999) that remembers gradients over tens of thousands of steps, weighted by `α` in
//! the numerator. The arithmetic is the `bitsandbytes` package's `AdEMAMix` (kohya's
//! `optimizer_type = "bitsandbytes.optim.AdEMAMix8bit"`), as its CUDA kernel computes it,
//! in f32 on the device with f32 state (its 8-bit variants quantize the two moments
//! blockwise; the update is the same), checked step by step against the package.

use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor, TensorData};

use super::{FlatAdamW, FlatMask, BIAS_TABLE_MIN};
use crate::error::{LoraError, Result};

/// AdEMAMix's own settings (β₁, β₂, ε and the weight decay are the
/// [`AdamWSettings`](super::AdamWSettings)'). The defaults are `bitsandbytes`'.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdEMAMixSettings {
    /// Decay of the slow first moment (`betas[2]`).
    pub beta_3: f32,
    /// Weight of the slow moment in the numerator.
    pub alpha: f32,
    /// Steps over which `α` rises linearly from 0 (`None`: from the start).
    pub t_alpha: Option<usize>,
    /// Steps over which β₃ rises from β₁ to its value, on the paper's schedule (`None`:
    /// from the start).
    pub t_beta3: Option<usize>,
}

impl Default for AdEMAMixSettings {
    fn default() -> Self {
        Self { beta_3: 0.9999, alpha: 5.0, t_alpha: None, t_beta3: None }
    }
}

impl AdEMAMixSettings {
    /// Checks these settings with the [`AdamWSettings`](super::AdamWSettings) they go
    /// with, as `bitsandbytes` checks them: betas in `[0, 1)`, ε and the weight decay at
    /// least 0, `α` at least 0, and positive warm-up lengths; β₃'s schedule also takes the
    /// logarithms of β₁ and β₃, which must then be positive.
    pub fn validate(&self, adam: &super::AdamWSettings) -> Result<()> {
        let bad = |what: &str| Err(LoraError::Optimizer(format!("AdEMAMix: {what}")));
        if ![adam.beta_1, adam.beta_2, self.beta_3].iter().all(|b| (0.0..1.0).contains(b)) {
            return bad("the betas must be in [0, 1)");
        }
        if !(adam.epsilon.is_finite() && adam.epsilon >= 0.0 && adam.weight_decay.is_finite() && adam.weight_decay >= 0.0) {
            return bad("epsilon and weight_decay must be at least 0");
        }
        if !(self.alpha.is_finite() && self.alpha >= 0.0) {
            return bad("alpha must be at least 0");
        }
        if self.t_alpha == Some(0) || self.t_beta3 == Some(0) {
            return bad("t_alpha and t_beta3 must be positive step counts");
        }
        if self.t_beta3.is_some() && (adam.beta_1 == 0.0 || self.beta_3 == 0.0) {
            return bad("t_beta3 needs beta1 and beta3 above 0 (its schedule takes their logarithms)");
        }
        Ok(())
    }

    /// `α` at step `t` (from 1): `min(t·α / t_alpha, α)`, as `bitsandbytes` computes it.
    fn alpha_at(&self, t: usize) -> f64 {
        let alpha = f64::from(self.alpha);
        match self.t_alpha {
            Some(total) => (t as f64 * alpha / total as f64).min(alpha),
            None => alpha,
        }
    }

    /// β₃ at step `t` (from 1): `min(exp(ln β₁ · ln β₃ / ((1 − t/T)·ln β₃ + (t/T)·ln β₁)), β₃)`.
    fn beta_3_at(&self, beta_1: f32, t: usize) -> f64 {
        let beta_3 = super::decimal(self.beta_3);
        let Some(total) = self.t_beta3 else { return beta_3 };
        let (ln_1, ln_3) = (super::decimal(beta_1).ln(), beta_3.ln());
        let scale = t as f64 / total as f64;
        ((ln_1 * ln_3) / ((1.0 - scale) * ln_3 + scale * ln_1)).exp().min(beta_3)
    }
}

/// AdEMAMix's state beyond Adam's two moments, for saving and resuming a run
/// ([`FlatAdamW::ademamix_state`]).
#[derive(Debug, Clone)]
pub struct AdEMAMixState<B: AutodiffBackend> {
    /// The slow first moment, in the optimizer's flat order.
    pub slow: Tensor<B::InnerBackend, 1>,
}

/// AdEMAMix's settings, slow moment and per-step tables.
#[derive(Debug, Clone)]
pub(super) struct AdEMAMix<B: AutodiffBackend> {
    settings: AdEMAMixSettings,
    slow: Tensor<B::InnerBackend, 1>,
    /// Per step count `t`, rows `1 − β₁^t`, `sqrt(1 − β₂^t)`, `α_t`, `β₃_t` and `1 − β₃_t`
    /// (entry 0, never used by an update, is neutral), as a `[5, len]` tensor.
    tables: Option<Tensor<B::InnerBackend, 2>>,
}

impl<B: AutodiffBackend> FlatAdamW<B> {
    /// AdEMAMix's update ([`AdEMAMixSettings`], `bitsandbytes`' `AdEMAMix`) instead of
    /// Adam's: with step counts `t` per tensor, `m₁ ← β₁m₁ + (1 − β₁)g`,
    /// `m₂ ← β₃m₂ + (1 − β₃)g`, `ν ← β₂ν + (1 − β₂)g²`, and each value moves by
    /// `lr · (m₁/(1 − β₁^t) + α·m₂) / (√ν/√(1 − β₂^t) + ε)`, then decays by a factor
    /// `1 − lr·weight_decay` (the order of bitsandbytes' CUDA kernel). β₁, β₂, ε and the
    /// weight decay come from the [`AdamWSettings`](super::AdamWSettings) (bitsandbytes'
    /// defaults: 0.9, 0.999, 1e-8, 0.01). Per-tensor factors of
    /// [`with_lr_scales`](Self::with_lr_scales) scale the learning rate. Replaces the other
    /// updates. Errors on invalid settings ([`AdEMAMixSettings::validate`]).
    ///
    /// ```
    /// use burn::backend::{Autodiff, Flex};
    /// use burn::nn::LinearConfig;
    /// use burn::optim::GradientsParams;
    /// use burn::tensor::Tensor;
    /// use lora_core::optim::{AdEMAMixSettings, AdamWSettings, FlatAdamW};
    ///
    /// type B = Autodiff<Flex>;
    /// let device = Default::default();
    /// let layer = LinearConfig::new(4, 2).with_bias(false).init::<B>(&device);
    /// let adam = AdamWSettings { epsilon: 1e-8, weight_decay: 0.0, ..Default::default() };
    /// let mut optim = FlatAdamW::new(adam, &layer, &device).with_ademamix(AdEMAMixSettings::default()).unwrap();
    /// let x = Tensor::<B, 2>::ones([3, 4], &device);
    /// let grads = GradientsParams::from_grads(layer.forward(x).sum().backward(), &layer);
    /// let grads = optim.gather_grads(&layer, grads);
    /// let before = layer.weight.val();
    /// let layer = optim.step(1e-3, layer, grads);
    /// // First step, gradient g = 3: Adam's bias-corrected direction is 1, the slow moment
    /// // adds α·(1 − β₃)·g / |g| = 5e-4.
    /// let moved: Vec<f32> = (before - layer.weight.val()).into_data().to_vec().unwrap();
    /// assert!(moved.iter().all(|d| (d - 1e-3 * 1.0005).abs() < 1e-8), "{moved:?}");
    /// ```
    pub fn with_ademamix(mut self, settings: AdEMAMixSettings) -> Result<Self> {
        settings.validate(&self.settings)?;
        self.clear_rules();
        let slow = Tensor::zeros([self.len()], &self.moment_1.device());
        self.ademamix = Some(AdEMAMix { settings, slow, tables: None });
        Ok(self)
    }

    /// AdEMAMix's settings, when this optimizer takes its update.
    pub fn ademamix_settings(&self) -> Option<AdEMAMixSettings> {
        self.ademamix.as_ref().map(|a| a.settings)
    }

    /// AdEMAMix's slow moment, to save with a run (`None` without AdEMAMix).
    pub fn ademamix_state(&self) -> Option<AdEMAMixState<B>> {
        self.ademamix.as_ref().map(|a| AdEMAMixState { slow: a.slow.clone() })
    }

    /// Restores AdEMAMix's slow moment (resuming a run; the step counts and the other
    /// moments come with [`set_moments`](Self::set_moments)); an error without AdEMAMix or
    /// when the length does not fit this optimizer's tensors.
    pub fn set_ademamix_state(&mut self, state: AdEMAMixState<B>) -> Result<()> {
        let len = self.len();
        let Some(ademamix) = self.ademamix.as_mut() else {
            return Err(LoraError::Optimizer("this optimizer does not use AdEMAMix".into()));
        };
        if state.slow.dims()[0] != len {
            return Err(LoraError::ShapeMismatch {
                key: "AdEMAMix state slow".into(),
                reason: format!("{} values, the optimizer needs {len}", state.slow.dims()[0]),
            });
        }
        ademamix.slow = state.slow;
        Ok(())
    }

    /// One AdEMAMix step with the step counts `time` (already counting this step where it
    /// happens) on the values `mask` marks (all without it).
    pub(super) fn ademamix_step(&mut self, lr: f64, time: Tensor<B::InnerBackend, 1, Int>, grad: Tensor<B::InnerBackend, 1>, mask: Option<FlatMask<B>>) {
        let Some(mut state) = self.ademamix.clone() else { return };
        let a = self.settings;
        let tables = self.ademamix_tables(&mut state);
        let row = |i: usize| tables.clone().narrow(0, i, 1).reshape([-1]).select(0, time.clone());
        let (correction_1, correction_2) = (row(0), row(1));
        // The kernel's f32 constants.
        let m1 = self.moment_1.clone().mul_scalar(a.beta_1).add(grad.clone().mul_scalar(1.0 - a.beta_1));
        let nu = self.moment_2.clone().mul_scalar(a.beta_2).add(grad.clone().square().mul_scalar(1.0 - a.beta_2));
        let scheduled = state.settings.t_alpha.is_some() || state.settings.t_beta3.is_some();
        let (m2, mixed) = if scheduled {
            let (alpha, beta_3, complement) = (row(2), row(3), row(4));
            let m2 = state.slow.clone().mul(beta_3).add(grad.mul(complement));
            (m2.clone(), m1.clone().div(correction_1).add(m2.mul(alpha)))
        } else {
            let beta_3 = state.settings.beta_3;
            let m2 = state.slow.clone().mul_scalar(beta_3).add(grad.mul_scalar(1.0 - beta_3));
            (m2.clone(), m1.clone().div(correction_1).add(m2.mul_scalar(state.settings.alpha)))
        };
        let direction = mixed.div(nu.clone().sqrt().div(correction_2).add_scalar(a.epsilon));
        let params = self.params.clone();
        let new_params = match &self.lr_scales {
            Some(scales) => {
                let lr = scales.clone().mul_scalar(lr);
                let moved = params.sub(direction.mul(lr.clone()));
                match a.weight_decay {
                    0.0 => moved,
                    wd => moved.clone().sub(moved.mul(lr.mul_scalar(wd))),
                }
            }
            None => {
                let moved = params.sub(direction.mul_scalar(lr));
                match (lr as f32) * a.weight_decay {
                    0.0 => moved,
                    decay => moved.mul_scalar(1.0 - decay),
                }
            }
        };
        match mask {
            None => {
                (self.moment_1, self.moment_2, self.params) = (m1, nu, new_params);
                state.slow = m2;
            }
            Some(mask) => {
                self.moment_1 = self.moment_1.clone().mask_where(mask.clone(), m1);
                self.moment_2 = self.moment_2.clone().mask_where(mask.clone(), nu);
                self.params = self.params.clone().mask_where(mask.clone(), new_params);
                state.slow = state.slow.clone().mask_where(mask, m2);
            }
        }
        self.ademamix = Some(state);
    }

    /// The per-step tables, (re)built on the host when the step counts outgrow them.
    fn ademamix_tables(&self, state: &mut AdEMAMix<B>) -> Tensor<B::InnerBackend, 2> {
        if let Some(tables) = state.tables.as_ref().filter(|t| t.dims()[1] > self.time_bound) {
            return tables.clone();
        }
        let len = (self.time_bound + 1).next_power_of_two().max(BIAS_TABLE_MIN);
        let (b1, b2) = (super::decimal(self.settings.beta_1), super::decimal(self.settings.beta_2));
        let s = state.settings;
        let mut values = Vec::with_capacity(5 * len);
        let entry = |t: usize| -> [f64; 5] {
            if t == 0 {
                let beta_3 = super::decimal(s.beta_3);
                return [1.0, 1.0, f64::from(s.alpha), beta_3, 1.0 - beta_3];
            }
            let beta_3 = s.beta_3_at(self.settings.beta_1, t);
            [1.0 - b1.powi(t as i32), (1.0 - b2.powi(t as i32)).sqrt(), s.alpha_at(t), beta_3, 1.0 - beta_3]
        };
        let entries: Vec<[f64; 5]> = (0..len).map(entry).collect();
        for row in 0..5 {
            values.extend(entries.iter().map(|e| e[row] as f32));
        }
        let tables = Tensor::from_data(TensorData::new(values, [5, len]), &self.moment_1.device());
        state.tables = Some(tables.clone());
        tables
    }
}
