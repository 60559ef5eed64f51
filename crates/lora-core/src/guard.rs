//! Gradient clipping, skipping of non-finite steps and dynamic loss scaling, decided on the
//! device.
//!
//! A training loop that reads the loss and the gradient norm back to the host to decide
//! whether and how far to step waits, every step, for the device to finish everything
//! queued so far; the device then idles while the host queues the next step's first
//! operations. [`StepGuard`] makes the same decisions with tensor operations: it returns the
//! factor to multiply the gradients by (clipping to a maximum global norm and removing the
//! loss scale), whether to apply the update (both loss and norm finite), and updates an f16
//! loss scale as PyTorch's `GradScaler` does (halved on overflow, doubled after a run of good
//! steps). [`FlatAdamW::step_if`](crate::optim::FlatAdamW::step_if) takes the decision as it
//! is. Each step's [`StepRecord`] (loss, norm, scale, outcome) stays on the device until the
//! loop reads a batch of them with [`read_records`], once a second or before saving.
//!
//! The arithmetic is the host's, operation for operation, so the numbers match a loop that
//! reads every step: `norm = sqrt(Σg²) / scale`; `clip = max / (norm + 1e-6)` where
//! `norm > max`, else 1; gradients times `clip / scale`.
//!
//! ```
//! use burn::backend::{Autodiff, Flex};
//! use burn::nn::LinearConfig;
//! use burn::optim::GradientsParams;
//! use burn::tensor::Tensor;
//! use lora_core::guard::{read_records, GuardSettings, StepGuard, StepOutcome};
//! use lora_core::optim::{AdamWSettings, FlatAdamW};
//!
//! type B = Autodiff<Flex>;
//! let device = Default::default();
//! let mut layer = LinearConfig::new(4, 2).init::<B>(&device);
//! let mut optim = FlatAdamW::new(AdamWSettings::default(), &layer, &device);
//! let mut guard = StepGuard::new(GuardSettings { max_grad_norm: 1.0, ..Default::default() }, &device);
//! let mut records = Vec::new();
//! for _ in 0..3 {
//!     let x = Tensor::<B, 2>::ones([3, 4], &device) * 100.0;
//!     let loss = layer.forward(x).powf_scalar(2.0).mean();
//!     let grads = GradientsParams::from_grads(guard.scale_loss(loss.clone()).backward(), &layer);
//!     let grads = optim.gather_grads(&layer, grads);
//!     let check = guard.check(guard.unscale(loss.inner()), grads.sq_norm());
//!     layer = optim.step_if(1e-3, layer, check.scale(grads), check.apply.clone());
//!     records.push(check.record);
//! }
//! // One read for all three steps.
//! let records = read_records(records).unwrap();
//! assert!(records.iter().all(|r| r.outcome == StepOutcome::Applied && r.grad_norm > 1.0));
//! ```

use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Bool, Tensor};

use crate::error::{LoraError, Result};

/// What a [`StepGuard`] checks and scales.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GuardSettings {
    /// Clip the global gradient norm to this (0: no clipping).
    pub max_grad_norm: f32,
    /// Scale the loss dynamically (f16 training); `None`: no loss scale.
    pub loss_scale: Option<DynamicLossScale>,
}

impl Default for GuardSettings {
    /// No clipping, no loss scale: only the non-finite check.
    fn default() -> Self {
        Self {
            max_grad_norm: 0.0,
            loss_scale: None,
        }
    }
}

/// A loss scale that halves when the scaled gradients overflow and doubles after
/// `growth_interval` good steps in a row (PyTorch's `GradScaler` defaults: 65536, 2000).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DynamicLossScale {
    /// The first scale.
    pub initial: f32,
    /// Good steps in a row after which the scale doubles.
    pub growth_interval: usize,
}

impl Default for DynamicLossScale {
    fn default() -> Self {
        Self {
            initial: 65536.0,
            growth_interval: 2000,
        }
    }
}

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepOutcome {
    /// The update was applied.
    Applied,
    /// The scaled gradients overflowed with a finite loss: skipped, the loss scale halved.
    Overflow,
    /// The loss or the gradient norm was not finite (and no loss scale was left to lower):
    /// skipped.
    NonFinite,
}

impl StepOutcome {
    fn code(self) -> f32 {
        match self {
            Self::Applied => 0.0,
            Self::Overflow => 1.0,
            Self::NonFinite => 2.0,
        }
    }
}

/// One step's numbers, as read back by [`read_records`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepRecord {
    /// The (unscaled) loss.
    pub loss: f32,
    /// The global gradient norm before clipping, loss scale removed.
    pub grad_norm: f32,
    /// The loss scale after the step (1 without one).
    pub loss_scale: f32,
    /// Whether the update was applied.
    pub outcome: StepOutcome,
}

/// Values per record on the device: loss, norm, scale, outcome code.
const RECORD_LEN: usize = 4;

/// Reads the records of several steps with one host read (see the [module docs](self)).
pub fn read_records<B: Backend>(records: Vec<Tensor<B, 1>>) -> Result<Vec<StepRecord>> {
    if records.is_empty() {
        return Ok(Vec::new());
    }
    let values = Tensor::cat(records, 0)
        .into_data()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| LoraError::Unsupported(format!("reading step records: {e:?}")))?;
    if !values.len().is_multiple_of(RECORD_LEN) {
        return Err(LoraError::Unsupported(format!("step records: {} values, not a multiple of {RECORD_LEN}", values.len())));
    }
    let records = values
        .chunks_exact(RECORD_LEN)
        .map(|r| {
            let outcome = match r[3] {
                c if c == StepOutcome::Applied.code() => StepOutcome::Applied,
                c if c == StepOutcome::Overflow.code() => StepOutcome::Overflow,
                _ => StepOutcome::NonFinite,
            };
            StepRecord {
                loss: r[0],
                grad_norm: r[1],
                loss_scale: r[2],
                outcome,
            }
        })
        .collect();
    Ok(records)
}

/// One step's decision, on the device.
#[derive(Debug, Clone)]
pub struct StepCheck<B: Backend> {
    /// What to multiply the gradients by (clipping and loss-scale removal); `None` when
    /// that is always 1 (no clipping, no loss scale).
    pub factor: Option<Tensor<B, 1>>,
    /// Whether to apply the update (shape `[1]`), for
    /// [`FlatAdamW::step_if`](crate::optim::FlatAdamW::step_if).
    pub apply: Tensor<B, 1, Bool>,
    /// The step's numbers for [`read_records`].
    pub record: Tensor<B, 1>,
}

impl<B: Backend> StepCheck<B> {
    /// `grads` times [`factor`](Self::factor).
    pub fn scale<AB: AutodiffBackend<InnerBackend = B>>(&self, grads: crate::optim::FlatGrads<AB>) -> crate::optim::FlatGrads<AB> {
        match &self.factor {
            Some(factor) => grads.scale_by(factor.clone()),
            None => grads,
        }
    }
}

/// Clipping, non-finite skips and the loss scale of a training loop, on the device (see
/// the [module docs](self)).
#[derive(Debug, Clone)]
pub struct StepGuard<B: Backend> {
    settings: GuardSettings,
    /// The loss scale (shape `[1]`; 1 without dynamic scaling).
    scale: Tensor<B, 1>,
    /// Good steps since the scale last changed, as an exact f32 count.
    good_steps: Tensor<B, 1>,
}

impl<B: Backend> StepGuard<B> {
    /// A guard at its initial loss scale.
    pub fn new(settings: GuardSettings, device: &B::Device) -> Self {
        let initial = settings.loss_scale.map_or(1.0, |s| s.initial);
        Self {
            settings,
            scale: Tensor::from_floats([initial], device),
            good_steps: Tensor::zeros([1], device),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &GuardSettings {
        &self.settings
    }

    /// Sets the loss scale and the count of good steps (resuming a run).
    pub fn set_state(&mut self, loss_scale: f32, good_steps: usize) {
        let device = self.scale.device();
        self.scale = Tensor::from_floats([loss_scale], &device);
        self.good_steps = Tensor::from_floats([good_steps as f32], &device);
    }

    /// The loss scale and the count of good steps since it last changed (one host read).
    pub fn state(&self) -> Result<(f32, usize)> {
        let values = Tensor::cat(vec![self.scale.clone(), self.good_steps.clone()], 0)
            .into_data()
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| LoraError::Unsupported(format!("reading the loss scale: {e:?}")))?;
        Ok((values[0], values[1] as usize))
    }

    /// `loss` times the loss scale, to backpropagate (unchanged without a loss scale).
    pub fn scale_loss<AB: AutodiffBackend<InnerBackend = B>>(&self, loss: Tensor<AB, 1>) -> Tensor<AB, 1> {
        match self.settings.loss_scale {
            Some(_) => loss * Tensor::from_inner(self.scale.clone()),
            None => loss,
        }
    }

    /// A scaled loss's value divided by the loss scale (unchanged without one).
    pub fn unscale(&self, loss: Tensor<B, 1>) -> Tensor<B, 1> {
        match self.settings.loss_scale {
            Some(_) => loss / self.scale.clone(),
            None => loss,
        }
    }

    /// The decision for a step with (unscaled) `loss` and scaled squared gradient norm
    /// `sq_norm` (both shape `[1]`); updates the loss scale for the next step.
    pub fn check(&mut self, loss: Tensor<B, 1>, sq_norm: Tensor<B, 1>) -> StepCheck<B> {
        // Float arithmetic on one-element tensors throughout, with a single comparison for
        // the returned decision: a fusion backend compiles it into one or two kernels,
        // where boolean operations (and, not, is_nan) would each launch their own.
        let dynamic = self.settings.loss_scale.is_some();
        let norm = if dynamic { sq_norm.sqrt() / self.scale.clone() } else { sq_norm.sqrt() };
        let ones = norm.ones_like();
        let zeros = norm.zeros_like();
        // 1 where finite, 0 for NaN and ±inf (a NaN compares false).
        let finite_of = |x: Tensor<B, 1>| zeros.clone().mask_where(x.abs().lower_elem(f32::INFINITY), ones.clone());
        let loss_ok = finite_of(loss.clone());
        let finite = loss_ok.clone() * finite_of(norm.clone());
        let max = self.settings.max_grad_norm;
        let clip = (max > 0.0).then(|| {
            let clipped = ones.clone().mul_scalar(max) / (norm.clone() + 1e-6);
            ones.clone().mask_where(norm.clone().greater_elem(max), clipped)
        });
        let factor = match (clip, dynamic) {
            (Some(clip), true) => Some(clip / self.scale.clone()),
            (Some(clip), false) => Some(clip),
            (None, true) => Some(ones.clone() / self.scale.clone()),
            (None, false) => None,
        };
        // 0 applied, 1 overflow (scale halved), 2 non-finite.
        let skipped = ones.clone() - finite.clone();
        let mut outcome = skipped.clone().mul_scalar(StepOutcome::NonFinite.code());
        if let Some(settings) = self.settings.loss_scale {
            let good = self.good_steps.clone().add_scalar(1.0);
            let due = zeros.clone().mask_where(good.clone().greater_equal_elem(settings.growth_interval as f32), ones.clone());
            let above_one = zeros.clone().mask_where(self.scale.clone().greater_elem(1.0), ones.clone());
            let grow = finite.clone() * due;
            let shrink = skipped.clone() * loss_ok * above_one;
            // Good steps: +1 when finite, 0 after a change of scale, kept on a plain skip;
            // the scale doubles or halves (exact in f32).
            let kept_good = (ones.clone() - grow.clone()) * finite.clone() * good + (ones.clone() - shrink.clone()) * skipped * self.good_steps.clone();
            self.good_steps = kept_good;
            self.scale = self.scale.clone() * (grow + 1.0) / (shrink.clone() + 1.0);
            outcome = outcome - shrink;
        }
        let apply = finite.greater_elem(0.5);
        let record = Tensor::cat(vec![loss, norm, self.scale.clone(), outcome], 0);
        StepCheck { factor, apply, record }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::ElementConversion;

    type B = Flex;

    fn one(v: f32) -> Tensor<B, 1> {
        Tensor::from_floats([v], &Default::default())
    }

    fn host(t: &Tensor<B, 1>) -> f32 {
        t.clone().into_scalar().elem()
    }

    #[test]
    fn clip_factor_is_the_hosts_formula() {
        let mut guard = StepGuard::<B>::new(GuardSettings { max_grad_norm: 1.5, loss_scale: None }, &Default::default());
        for norm in [0.3f32, 1.5, 1.6, 40.0] {
            let check = guard.check(one(0.25), one(norm * norm));
            let expected = if norm > 1.5 { 1.5 / ((norm * norm).sqrt() + 1e-6) } else { 1.0 };
            assert_eq!(host(check.factor.as_ref().unwrap()).to_bits(), expected.to_bits(), "norm {norm}");
            let r = read_records(vec![check.record]).unwrap()[0];
            assert_eq!((r.loss, r.grad_norm, r.loss_scale, r.outcome), (0.25, (norm * norm).sqrt(), 1.0, StepOutcome::Applied));
        }
    }

    #[test]
    fn non_finite_steps_are_skipped() {
        let mut guard = StepGuard::<B>::new(GuardSettings::default(), &Default::default());
        for (loss, sq) in [(f32::NAN, 1.0), (1.0, f32::INFINITY), (1.0, f32::NAN)] {
            let check = guard.check(one(loss), one(sq));
            assert!(check.factor.is_none());
            assert!(!check.apply.into_scalar().elem::<bool>());
            assert_eq!(read_records(vec![check.record]).unwrap()[0].outcome, StepOutcome::NonFinite);
        }
        assert!(guard.check(one(1.0), one(4.0)).apply.into_scalar().elem::<bool>());
    }

    #[test]
    fn loss_scale_halves_on_overflow_and_grows_after_good_steps() {
        let settings = GuardSettings {
            max_grad_norm: 0.0,
            loss_scale: Some(DynamicLossScale { initial: 8.0, growth_interval: 3 }),
        };
        let mut guard = StepGuard::<B>::new(settings, &Default::default());
        let scaled = guard.scale_loss(Tensor::<burn::backend::Autodiff<B>, 1>::from_floats([0.5], &Default::default()));
        assert_eq!(scaled.into_scalar(), 4.0);
        let mut outcomes = Vec::new();
        // Overflow (scale 8 -> 4), a plain non-finite loss (kept), then good steps.
        for (loss, sq) in [(1.0, f32::INFINITY), (f32::NAN, 1.0), (1.0, 16.0), (1.0, 16.0), (1.0, 16.0), (1.0, 64.0)] {
            let check = guard.check(one(loss), one(sq));
            outcomes.push(read_records(vec![check.record.clone()]).unwrap()[0]);
            if outcomes.len() == 3 {
                // Norm 4 / scale 4 = 1; the factor removes the scale.
                assert_eq!(host(check.factor.as_ref().unwrap()), 0.25);
            }
        }
        let scales: Vec<f32> = outcomes.iter().map(|r| r.loss_scale).collect();
        assert_eq!(scales, [4.0, 4.0, 4.0, 4.0, 8.0, 8.0]);
        let kinds: Vec<StepOutcome> = outcomes.iter().map(|r| r.outcome).collect();
        use StepOutcome::*;
        assert_eq!(kinds, [Overflow, NonFinite, Applied, Applied, Applied, Applied]);
        assert_eq!(outcomes[2].grad_norm, 1.0);
        assert_eq!(guard.state().unwrap(), (8.0, 1));
        guard.set_state(2.0, 2);
        guard.check(one(1.0), one(1.0));
        assert_eq!(guard.state().unwrap(), (4.0, 0));
        // At scale 1 there is nothing left to lower: a plain skip.
        guard.set_state(1.0, 0);
        let check = guard.check(one(1.0), one(f32::INFINITY));
        assert_eq!(read_records(vec![check.record]).unwrap()[0].outcome, NonFinite);
    }
}

#[cfg(all(test, feature = "wgpu-test"))]
mod wgpu_tests {
    //! The guard and a guarded `FlatAdamW` on burn's fusion backend over CubeCL's wgpu
    //! runtime (lavapipe without a GPU) against the CPU: the new operations (bool
    //! broadcasts, the bias-table lookups, masked updates) as fused kernels.

    use super::*;
    use crate::optim::{AdamWSettings, FlatAdamW};
    use burn::backend::{Autodiff, Flex, Wgpu};
    use burn::module::{Module, Param};
    use burn::optim::GradientsParams;
    use burn::tensor::backend::AutodiffBackend;
    use burn::tensor::TensorData;

    #[derive(Module, Debug)]
    struct Weights<B: Backend> {
        w: Param<Tensor<B, 1>>,
    }

    /// Final values and every step's record: gradients of growing size (clipped from the
    /// third on), a NaN in the fourth step (an overflow at scale 4), then good steps.
    fn run<AB: AutodiffBackend>(device: &AB::Device) -> (Vec<f32>, Vec<StepRecord>) {
        let start: Vec<f32> = (0..40).map(|i| (i as f32 * 0.37).sin()).collect();
        let mut module = Weights::<AB> { w: Param::from_tensor(Tensor::from_data(TensorData::new(start, [40]), device)) };
        let mut optim = FlatAdamW::new(AdamWSettings::default(), &module, device);
        let settings = GuardSettings {
            max_grad_norm: 2.0,
            loss_scale: Some(DynamicLossScale { initial: 4.0, growth_interval: 2 }),
        };
        let mut guard = StepGuard::<AB::InnerBackend>::new(settings, device);
        let mut records = Vec::new();
        for step in 0..7 {
            let mut g: Vec<f32> = (0..40).map(|i| ((i * 7 + step * 3) as f32 * 0.11).cos() * 0.05 * (step + 1) as f32).collect();
            if step == 3 {
                g[5] = f32::NAN;
            }
            let mut grads = GradientsParams::new();
            grads.register(module.w.id, Tensor::<AB::InnerBackend, 1>::from_data(TensorData::new(g, [40]), device));
            let grads = optim.gather_grads(&module, grads);
            let loss = Tensor::<AB::InnerBackend, 1>::from_floats([0.5 + step as f32], device);
            let check = guard.check(loss, grads.sq_norm());
            module = optim.step_if(1e-2, module, check.scale(grads), check.apply.clone());
            records.push(check.record);
        }
        let values = module.w.val().into_data().convert::<f32>().into_vec::<f32>().unwrap();
        (values, read_records(records).unwrap())
    }

    #[test]
    fn wgpu_guarded_steps_match_the_cpu() {
        let (cpu, cpu_records) = run::<Autodiff<Flex>>(&Default::default());
        let (gpu, gpu_records) = run::<Autodiff<Wgpu>>(&Default::default());
        let outcomes: Vec<StepOutcome> = gpu_records.iter().map(|r| r.outcome).collect();
        use StepOutcome::*;
        assert_eq!(outcomes, [Applied, Applied, Applied, Overflow, Applied, Applied, Applied]);
        for (a, b) in cpu_records.iter().zip(&gpu_records) {
            assert_eq!((a.outcome, a.loss_scale), (b.outcome, b.loss_scale));
            assert!((a.grad_norm - b.grad_norm).abs() <= 1e-5 * a.grad_norm || a.grad_norm.is_nan() && b.grad_norm.is_nan());
        }
        // The scale: 4, doubled after steps 2 (8), halved at the overflow (4), doubled after 5 (8).
        let scales: Vec<f32> = gpu_records.iter().map(|r| r.loss_scale).collect();
        assert_eq!(scales, [4.0, 8.0, 8.0, 4.0, 4.0, 8.0, 8.0]);
        for (a, b) in cpu.iter().zip(&gpu) {
            assert!((a - b).abs() <= 1e-5 * a.abs().max(1e-3), "{cpu:?}\nvs\n{gpu:?}");
        }
    }
}
