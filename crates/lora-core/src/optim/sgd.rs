//! SGD with momentum on the flat vectors of a [`FlatAdamW`] ([`FlatAdamW::with_sgd`]).
//!
//! PyTorch's `torch.optim.SGD` (kohya's `optimizer_type = "SGDNesterov"`, which sets
//! `nesterov=True` and a momentum of 0.9): the weight decay is added to the gradient (L2),
//! the momentum buffer starts as the first gradient, and Nesterov's variant steps along
//! `g + μ·buf`. Checked step by step against PyTorch.

use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Int, Tensor};

use super::{FlatAdamW, FlatMask};
use crate::error::{LoraError, Result};

/// SGD's settings (the weight decay is the [`AdamWSettings`](super::AdamWSettings)'; β and
/// ε are unused). The defaults are kohya's `SGDNesterov`: momentum 0.9, Nesterov.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SgdSettings {
    /// Momentum `μ` (0: plain SGD, no buffer).
    pub momentum: f32,
    /// Dampening: the buffer takes `(1 − dampening)·g` after its first step.
    pub dampening: f32,
    /// Nesterov momentum: step along `g + μ·buf` instead of `buf`.
    pub nesterov: bool,
}

impl Default for SgdSettings {
    fn default() -> Self {
        Self { momentum: 0.9, dampening: 0.0, nesterov: true }
    }
}

impl SgdSettings {
    /// Checks these settings with the [`AdamWSettings`](super::AdamWSettings) they go
    /// with, as PyTorch checks them: momentum and weight decay at least 0, and Nesterov
    /// only with a momentum and no dampening.
    pub fn validate(&self, adam: &super::AdamWSettings) -> Result<()> {
        let bad = |what: &str| Err(LoraError::Optimizer(format!("SGD: {what}")));
        if !(self.momentum.is_finite() && self.momentum >= 0.0 && self.dampening.is_finite()) {
            return bad("momentum must be at least 0");
        }
        if !(adam.weight_decay.is_finite() && adam.weight_decay >= 0.0) {
            return bad("weight_decay must be at least 0");
        }
        if self.nesterov && (self.momentum == 0.0 || self.dampening != 0.0) {
            return bad("Nesterov momentum requires a momentum and zero dampening");
        }
        Ok(())
    }
}

impl<B: AutodiffBackend> FlatAdamW<B> {
    /// SGD's update ([`SgdSettings`], PyTorch's `SGD`) instead of Adam's: the gradient
    /// takes `weight_decay · p` (L2), the momentum buffer (the first moment) starts as
    /// that gradient in a tensor's first step and becomes `μ·buf + (1 − dampening)·g`
    /// after, and each value moves by the learning rate times `buf` (`g + μ·buf` with
    /// Nesterov). Per-tensor factors of [`with_lr_scales`](Self::with_lr_scales) scale the
    /// learning rate. Replaces the other updates. Errors on invalid settings
    /// ([`SgdSettings::validate`]).
    ///
    /// ```
    /// use burn::backend::{Autodiff, Flex};
    /// use burn::nn::LinearConfig;
    /// use burn::optim::GradientsParams;
    /// use burn::tensor::Tensor;
    /// use lora_core::optim::{AdamWSettings, FlatAdamW, SgdSettings};
    ///
    /// type B = Autodiff<Flex>;
    /// let device = Default::default();
    /// let mut layer = LinearConfig::new(4, 2).with_bias(false).init::<B>(&device);
    /// let adam = AdamWSettings { weight_decay: 0.0, ..Default::default() };
    /// let mut optim = FlatAdamW::new(adam, &layer, &device).with_sgd(SgdSettings::default()).unwrap();
    /// let start = layer.weight.val();
    /// for _ in 0..2 {
    ///     let x = Tensor::<B, 2>::ones([3, 4], &device);
    ///     let grads = GradientsParams::from_grads(layer.forward(x).sum().backward(), &layer);
    ///     let grads = optim.gather_grads(&layer, grads);
    ///     layer = optim.step(0.01, layer, grads);
    /// }
    /// // g = 3 both times: Nesterov steps along g + 0.9·buf, with buf 3, then 5.7.
    /// let moved: Vec<f32> = (start - layer.weight.val()).into_data().to_vec().unwrap();
    /// assert!(moved.iter().all(|d| (d - 0.01 * (5.7 + 8.13)).abs() < 1e-5), "{moved:?}");
    /// ```
    pub fn with_sgd(mut self, settings: SgdSettings) -> Result<Self> {
        settings.validate(&self.settings)?;
        self.clear_rules();
        self.sgd = Some(settings);
        Ok(self)
    }

    /// SGD's settings, when this optimizer takes its update.
    pub fn sgd_settings(&self) -> Option<SgdSettings> {
        self.sgd
    }

    /// One SGD step with the step counts `time` (already counting this step where it
    /// happens) on the values `mask` marks (all without it).
    pub(super) fn sgd_step(&mut self, lr: f64, time: Tensor<B::InnerBackend, 1, Int>, grad: Tensor<B::InnerBackend, 1>, mask: Option<FlatMask<B>>) {
        let Some(s) = self.sgd else { return };
        let params = self.params.clone();
        let grad = match self.settings.weight_decay {
            0.0 => grad,
            wd => grad.add(params.clone().mul_scalar(wd)),
        };
        let (buffer, direction) = if s.momentum == 0.0 {
            (self.moment_1.clone(), grad)
        } else {
            // A tensor's first step (its count is 1 now) starts the buffer at the gradient.
            let first = time.equal_elem(1);
            let later = self.moment_1.clone().mul_scalar(s.momentum).add(grad.clone().mul_scalar(1.0 - s.dampening));
            let buffer = later.mask_where(first, grad.clone());
            let direction = match s.nesterov {
                true => grad.add(buffer.clone().mul_scalar(s.momentum)),
                false => buffer.clone(),
            };
            (buffer, direction)
        };
        let new_params = match &self.lr_scales {
            Some(scales) => params.sub(direction.mul(scales.clone().mul_scalar(lr))),
            None => params.sub(direction.mul_scalar(lr)),
        };
        match mask {
            None => (self.moment_1, self.params) = (buffer, new_params),
            Some(mask) => {
                self.moment_1 = self.moment_1.clone().mask_where(mask.clone(), buffer);
                self.params = self.params.clone().mask_where(mask, new_params);
            }
        }
    }
}
