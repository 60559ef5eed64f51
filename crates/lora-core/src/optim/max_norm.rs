//! Max-norm regularization of adapters (kohya's `scale_weight_norms`), on a [`FlatAdamW`]'s
//! values.
//!
//! After an optimizer step, each adapter whose update `ΔW = scale · up · down` has a
//! Frobenius norm above `max_norm` gets both factors multiplied by
//! `sqrt(max_norm / ‖ΔW‖)`, which brings `‖ΔW‖` down to `max_norm`; the others keep their
//! values. This is sd-scripts' `apply_max_norm_regularization`, including its statistics
//! (adapters scaled, mean and largest norm after scaling). The norms come from the two
//! `rank × rank` Gram matrices, `‖U D‖² = Σ (UᵀU) ∘ (D Dᵀ)`, so `ΔW` is never formed, and
//! everything happens on the device: the training loop does not wait for it. The moments
//! are left as they are, as in sd-scripts.
//!
//! A LyCORIS LoHa or LoKr adapter's `ΔW` is formed from its factors (as its forward pass
//! forms it) and, when scaled, each of its `n` factors is multiplied by `ratio^(1/n)`: its
//! update is linear in every factor, so `ΔW` is multiplied by `ratio`, the share spread
//! over the factors as kohya spreads it over `up` and `down`. (LyCORIS itself multiplies a
//! separate scalar that it folds into `w1_a` when saving; the norms after scaling are the
//! same, the later steps' sizes are not quite. With `use_scalar` that scalar is trained
//! here too, and then it alone is scaled, as in LyCORIS.) A LoCon with a Tucker core is one of those:
//! its core folded into `down` gives the Gram matrix, and its three factors share the
//! ratio. LyCORIS' Diag-OFT and BOFT hold the norm of their `oft_blocks` themselves to the
//! limit, as LyCORIS' `apply_max_norm` does for them (their update is not linear in the
//! blocks; the scale per output is left alone). A GLoRA or an (IA)³ is left alone, as LyCORIS
//! leaves it (its modules have no max-norm).

use burn::module::{AutodiffModule, ParamId};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Int, Tensor, TensorData};

use super::FlatAdamW;
use crate::error::{LoraError, Result};
use crate::sites::{LoraSiteMut, LoraSites};
use crate::Algo;

/// Which axis of a factor's weight is the rank axis, once the weight is viewed as a matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RankAxis {
    /// `[rank, rest]` (a conv adapter's down weight, a linear adapter's up weight in burn's
    /// `[in, out]` layout).
    First,
    /// `[rest, rank]` (a linear adapter's down weight, a conv adapter's 1x1 up weight).
    Last,
}

/// One adapter's factors, by parameter id ([`norm_pairs`]).
#[derive(Debug, Clone, PartialEq)]
pub struct NormPair {
    /// The module path (for errors).
    pub path: String,
    /// The factors.
    pub factors: NormFactors,
    /// The adapter's `alpha / rank` (or rsLoRA's `alpha / sqrt(rank)`).
    pub scale: f32,
}

/// The factors of a [`NormPair`]'s adapter.
#[derive(Debug, Clone, PartialEq)]
pub enum NormFactors {
    /// A LoRA's down and up weights.
    Lora {
        /// The down factor's parameter.
        down: ParamId,
        /// Where its rank axis is.
        down_rank: RankAxis,
        /// The up factor's parameter.
        up: ParamId,
        /// Where its rank axis is.
        up_rank: RankAxis,
    },
    /// A LyCORIS LoHa's or LoKr's factors, each `[rows, cols]`, by LyCORIS name
    /// (see [`crate::LycorisAdapter`]).
    Lycoris {
        /// LoHa or LoKr.
        algo: Algo,
        /// `(name, parameter)` of each factor.
        factors: Vec<(&'static str, ParamId)>,
        /// The trained scalar on the update ([`crate::LycorisAdapter::scalar`]), which is
        /// then what is scaled.
        scalar: Option<ParamId>,
    },
    /// LyCORIS' Diag-OFT or BOFT: its `oft_blocks`, whose own norm LyCORIS holds to the
    /// limit (its `apply_max_norm`; a `rescale` is left as it is).
    Oft {
        /// The blocks' parameter.
        blocks: ParamId,
    },
    /// A LoCon with a Tucker core ([`crate::Conv2dAdapter::mid`]).
    LoconTucker {
        /// `down`, `[rank, in, 1, 1]`.
        down: ParamId,
        /// The core, `[rank, rank, kh, kw]`.
        mid: ParamId,
        /// `up`, `[out, rank, 1, 1]`.
        up: ParamId,
    },
}

impl NormFactors {
    /// The parameters, in order.
    fn ids(&self) -> Vec<ParamId> {
        match self {
            Self::Lora { down, up, .. } => vec![*down, *up],
            Self::Lycoris { scalar: Some(scalar), .. } => vec![*scalar],
            Self::Lycoris { factors, .. } => factors.iter().map(|(_, id)| *id).collect(),
            Self::LoconTucker { down, mid, up } => vec![*down, *mid, *up],
            Self::Oft { blocks } => vec![*blocks],
        }
    }
}

/// The attached adapters of `model`, in visiting order.
pub fn norm_pairs<B: Backend>(model: &mut impl LoraSites<B>) -> Vec<NormPair> {
    let mut pairs = Vec::new();
    model.visit_lora_sites(&mut |path, site| {
        if let Some(a) = site.lycoris_adapter().filter(|a| a.algo().is_lycoris_oft()) {
            // The blocks come first (`crate::oft::BLOCKS`).
            pairs.push(NormPair { path: path.to_owned(), factors: NormFactors::Oft { blocks: a.factors[0].id }, scale: 1.0 });
            return;
        }
        if site.lycoris_adapter().is_some_and(|a| matches!(a.algo(), crate::Algo::Glora | crate::Algo::Ia3 | crate::Algo::Full | crate::Algo::Norm)) {
            // LyCORIS' GLoRA, (IA)³, full and norm modules have no max-norm: their layers are not scaled.
            return;
        }
        if let Some(a) = site.lycoris_adapter() {
            let factors = a.names().iter().copied().zip(a.factors.iter().map(|p| p.id)).collect();
            let scalar = a.scalar.as_ref().map(|s| s.id);
            pairs.push(NormPair { path: path.to_owned(), factors: NormFactors::Lycoris { algo: a.algo(), factors, scalar }, scale: a.scale });
            return;
        }
        // burn's layouts: linear down `[in, rank]` / up `[rank, out]`; conv down
        // `[rank, in, kh, kw]` / up `[out, rank, 1, 1]`.
        let (down, up, scale, down_rank, up_rank) = match site {
            LoraSiteMut::Linear(l) => match &l.adapter {
                Some(a) => (a.down.weight.id, a.up.weight.id, a.scale, RankAxis::Last, RankAxis::First),
                None => return,
            },
            LoraSiteMut::Conv(c) => match &c.adapter {
                Some(a) => match &a.mid {
                    Some(mid) => {
                        let factors = NormFactors::LoconTucker { down: a.down.weight.id, mid: mid.weight.id, up: a.up.weight.id };
                        pairs.push(NormPair { path: path.to_owned(), factors, scale: a.scale });
                        return;
                    }
                    None => (a.down.weight.id, a.up.weight.id, a.scale, RankAxis::First, RankAxis::Last),
                },
                None => return,
            },
            LoraSiteMut::Norm(_) => return,
        };
        pairs.push(NormPair { path: path.to_owned(), factors: NormFactors::Lora { down, down_rank, up, up_rank }, scale });
    });
    pairs
}

/// What one [`FlatAdamW::apply_max_norm`] did, on the device (read it when convenient).
#[derive(Debug, Clone)]
pub struct MaxNormStats<B: Backend> {
    /// `[adapters scaled, sum of the norms after scaling, largest norm after scaling]`.
    pub values: Tensor<B, 1>,
    /// Number of adapters (the mean norm is the sum over this).
    pub count: usize,
}

/// The per-element pair index of a [`FlatAdamW`]'s flat values, for one list of pairs.
#[derive(Debug, Clone)]
pub(super) struct PairIndex<B: AutodiffBackend> {
    pairs: Vec<Vec<ParamId>>,
    index: Tensor<B::InnerBackend, 1, Int>,
}

impl<B: AutodiffBackend> FlatAdamW<B> {
    /// Max-norm regularization (kohya's `scale_weight_norms`): every adapter of `pairs`
    /// whose update `ΔW = scale · up · down` has a Frobenius norm above `max_norm` gets both
    /// factors multiplied by `sqrt(max_norm / ‖ΔW‖)`, which brings `‖ΔW‖` to `max_norm`;
    /// the others keep their values, and the moments are left alone (sd-scripts'
    /// `apply_max_norm_regularization`, with its statistics). The norms come from two
    /// `rank × rank` Gram matrices per adapter, `‖U D‖² = Σ (UᵀU) ∘ (D Dᵀ)`, so `ΔW` is
    /// never formed, and nothing is read back to the host. The values are then written into
    /// `module`, in the working dtype. Errors when `max_norm` is not positive or a pair's
    /// tensors are not trained by this optimizer.
    ///
    /// ```
    /// use burn::backend::{Autodiff, Flex};
    /// use burn::nn::LinearConfig;
    /// use burn::tensor::{Distribution, Tensor};
    /// use lora_core::optim::{norm_pairs, AdamWSettings, FlatAdamW};
    /// use lora_core::{LoraConfig, LoraLinear, LoraSiteMut, LoraSites, Component};
    ///
    /// type B = Autodiff<Flex>;
    /// #[derive(burn::module::Module, Debug)]
    /// struct Net<B: burn::tensor::backend::Backend> { proj: LoraLinear<B> }
    /// impl<B: burn::tensor::backend::Backend> LoraSites<B> for Net<B> {
    ///     fn component(&self) -> Component { Component::Unet }
    ///     fn visit_lora_sites(&mut self, f: &mut dyn FnMut(&str, LoraSiteMut<'_, B>)) {
    ///         f("proj", LoraSiteMut::Linear(&mut self.proj));
    ///     }
    /// }
    /// let device = Default::default();
    /// let mut net = Net { proj: LoraLinear::new(LinearConfig::new(16, 16).init::<B>(&device)) };
    /// net.proj.attach_new(&LoraConfig::new(4), &device).unwrap();
    /// let a = net.proj.adapter.as_mut().unwrap();
    /// a.up.weight = a.up.weight.clone().map(|w| w.random_like(Distribution::Normal(0.0, 1.0)).require_grad());
    /// let mut optim = FlatAdamW::new(AdamWSettings::default(), &net, &device);
    /// let pairs = norm_pairs(&mut net);
    /// let (net, stats) = optim.apply_max_norm(net, &pairs, 0.5).unwrap();
    /// let norm: f32 = net.proj.adapter.as_ref().unwrap().delta_weight(1.0).powf_scalar(2.0).sum().sqrt().into_scalar();
    /// assert!((norm - 0.5).abs() < 1e-4);
    /// assert_eq!(stats.values.into_data().to_vec::<f32>().unwrap()[0], 1.0); // one adapter scaled
    /// ```
    pub fn apply_max_norm<M: AutodiffModule<B>>(&mut self, module: M, pairs: &[NormPair], max_norm: f32) -> Result<(M, MaxNormStats<B::InnerBackend>)> {
        if !(max_norm.is_finite() && max_norm > 0.0) {
            return Err(LoraError::Data(format!("max_norm must be positive, got {max_norm}")));
        }
        let device = self.params.device();
        if pairs.is_empty() {
            return Ok((module, MaxNormStats { values: Tensor::zeros([3], &device), count: 0 }));
        }
        let mut squares = Vec::with_capacity(pairs.len());
        // Each pair's factors share `ratio^(1/n)`.
        let mut exponents = Vec::with_capacity(pairs.len());
        for pair in pairs {
            let square = match &pair.factors {
                NormFactors::Lora { down, down_rank, up, up_rank } => {
                    let gram_down = self.gram(*down, *down_rank, &pair.path)?;
                    let gram_up = self.gram(*up, *up_rank, &pair.path)?;
                    if gram_down.dims() != gram_up.dims() {
                        return Err(LoraError::Data(format!("`{}`: the down and up factors' ranks differ", pair.path)));
                    }
                    (gram_down * gram_up).sum()
                }
                NormFactors::Lycoris { algo, factors, scalar } => {
                    let square = self.lycoris_delta(*algo, factors, &pair.path)?.powi_scalar(2).sum();
                    match scalar {
                        Some(id) => square * self.matrix(*id, &pair.path)?.reshape([1]).powi_scalar(2),
                        None => square,
                    }
                }
                NormFactors::Oft { blocks } => self.matrix(*blocks, &pair.path)?.powi_scalar(2).sum(),
                NormFactors::LoconTucker { down, mid, up } => {
                    let (down, core) = (self.matrix(*down, &pair.path)?, self.matrix(*mid, &pair.path)?);
                    if core.dims()[0] != down.dims()[0] || core.dims()[1] % down.dims()[0].max(1) != 0 {
                        return Err(LoraError::Data(format!("`{}`: the Tucker core {:?} does not fit down {:?}", pair.path, core.dims(), down.dims())));
                    }
                    let folded = crate::lycoris::tucker_fold(core, down);
                    let gram_down = folded.clone().matmul(folded.transpose());
                    let gram_up = self.gram(*up, RankAxis::Last, &pair.path)?;
                    if gram_down.dims() != gram_up.dims() {
                        return Err(LoraError::Data(format!("`{}`: the down and up factors' ranks differ", pair.path)));
                    }
                    (gram_down * gram_up).sum()
                }
            };
            squares.push(square.mul_scalar(pair.scale * pair.scale));
            exponents.push(1.0 / pair.factors.ids().len() as f32);
        }
        // Rounding can make a zero norm's square slightly negative.
        let norms = Tensor::cat(squares, 0).clamp_min(0.0).sqrt();
        // sd-scripts' arithmetic: norms below half the limit count as half the limit,
        // which leaves their ratio at 1.
        let clamped = norms.clone().clamp_min(max_norm / 2.0);
        let ratio = clamped.clone().clamp_max(max_norm) / clamped;
        let scaled = ratio.clone().lower_elem(1.0).int().sum().float();
        let after = norms * ratio.clone();
        let values = Tensor::cat(vec![scaled, after.clone().sum(), after.max()], 0);
        // LoRA's square root as it was (bit for bit), the general power only for LyCORIS.
        let per_factor = match pairs.iter().all(|p| matches!(p.factors, NormFactors::Lora { .. })) {
            true => ratio.sqrt(),
            false => ratio.powf(Tensor::from_data(TensorData::new(exponents, [pairs.len()]), &device)),
        };
        let factors = Tensor::cat(vec![per_factor, Tensor::ones([1], &device)], 0);
        let index = self.pair_index(pairs, &device)?;
        self.params = self.params.clone() * factors.select(0, index);
        let module = self.scatter_working(module);
        Ok((module, MaxNormStats { values, count: pairs.len() }))
    }

    /// A LyCORIS adapter's unscaled `ΔW` `[out, cols]` from the trained values of its
    /// factors (as [`crate::LycorisAdapter::delta`] forms it).
    fn lycoris_delta(&self, algo: Algo, factors: &[(&'static str, ParamId)], path: &str) -> Result<Tensor<B::InnerBackend, 2>> {
        let mut values = Vec::with_capacity(factors.len());
        for (name, id) in factors {
            let slot = self.slots.get(id).ok_or_else(|| LoraError::Data(format!("`{path}`: an adapter tensor is not trained by this optimizer")))?;
            let rows = slot.shape.first().copied().filter(|r| *r > 0 && slot.len.is_multiple_of(*r));
            let rows = rows.ok_or_else(|| LoraError::Data(format!("`{path}`: factor `{name}` of shape {:?}", slot.shape)))?;
            values.push((*name, self.params.clone().slice(slot.offset..slot.offset + slot.len).reshape([rows, slot.len / rows])));
        }
        let factor = |name: &str| values.iter().find(|(n, _)| *n == name).map(|(_, t)| t.clone());
        let has = |name: &str| values.iter().any(|(n, _)| *n == name);
        crate::lycoris::unscaled_delta(algo, |name| crate::lycoris::plain_factor(name, has, factor)).map_err(|e| LoraError::Data(format!("`{path}`: {e}")))
    }

    /// One trained tensor's values as `[rows, rest]`, rows its first dimension.
    fn matrix(&self, id: ParamId, path: &str) -> Result<Tensor<B::InnerBackend, 2>> {
        let slot = self.slots.get(&id).ok_or_else(|| LoraError::Data(format!("`{path}`: an adapter tensor is not trained by this optimizer")))?;
        let rows = slot.shape.first().copied().filter(|r| *r > 0 && slot.len.is_multiple_of(*r));
        let rows = rows.ok_or_else(|| LoraError::Data(format!("`{path}`: adapter weight of shape {:?}", slot.shape)))?;
        Ok(self.params.clone().slice(slot.offset..slot.offset + slot.len).reshape([rows, slot.len / rows]))
    }

    /// The `rank × rank` Gram matrix of one trained tensor viewed as a matrix.
    fn gram(&self, id: ParamId, rank_axis: RankAxis, path: &str) -> Result<Tensor<B::InnerBackend, 2>> {
        let slot = self.slots.get(&id).ok_or_else(|| LoraError::Data(format!("`{path}`: an adapter tensor is not trained by this optimizer")))?;
        let values = self.params.clone().slice(slot.offset..slot.offset + slot.len);
        let rank = match rank_axis {
            RankAxis::First => slot.shape.first(),
            RankAxis::Last => slot.shape[1..].iter().rev().find(|d| **d != 1).or(slot.shape.last()),
        }
        .copied()
        .filter(|r| *r > 0 && slot.len.is_multiple_of(*r))
        .ok_or_else(|| LoraError::Data(format!("`{path}`: adapter weight of shape {:?}", slot.shape)))?;
        Ok(match rank_axis {
            RankAxis::First => {
                let m = values.reshape([rank, slot.len / rank]);
                m.clone().matmul(m.transpose())
            }
            RankAxis::Last => {
                let m = values.reshape([slot.len / rank, rank]);
                m.clone().transpose().matmul(m)
            }
        })
    }

    /// Each flat element's pair (or `pairs.len()` outside every pair), built once per list.
    fn pair_index(&mut self, pairs: &[NormPair], device: &burn::tensor::Device<B::InnerBackend>) -> Result<Tensor<B::InnerBackend, 1, Int>> {
        let ids: Vec<Vec<ParamId>> = pairs.iter().map(|p| p.factors.ids()).collect();
        if let Some(cached) = self.max_norm_index.as_ref().filter(|c| c.pairs == ids) {
            return Ok(cached.index.clone());
        }
        let mut index = vec![pairs.len() as i64; self.len()];
        for (k, group) in ids.iter().enumerate() {
            for id in group {
                let slot = &self.slots[id];
                index[slot.offset..slot.offset + slot.len].fill(k as i64);
            }
        }
        let len = index.len();
        let index = Tensor::from_data(TensorData::new(index, [len]), device);
        self.max_norm_index = Some(PairIndex { pairs: ids, index: index.clone() });
        Ok(index)
    }
}
