//! DyLoRA (Valipour et al. 2023), as kohya's `networks.dylora` trains it.
//!
//! A DyLoRA adapter is a LoRA (or LoCon) whose `rank` is cut into chunks of `unit` ranks
//! ([`LoraConfig::dylora_unit`](crate::LoraConfig::dylora_unit)). Before each training
//! pass every adapter draws one chunk `c` (kohya: a rank uniform in `0..rank`, rounded down
//! to a multiple of the unit, so each chunk is as likely) and that pass
//!
//! - trains chunk `c` of `down` and `up` only: the other ranks take part in the product
//!   but are detached, so they get no gradient; an optimizer then leaves them, their
//!   moments and their step counts as they are, as PyTorch's optimizers skip the
//!   parameters kohya switches off (each rank there is a tensor of its own), see
//!   [`crate::optim::FlatAdamW::with_rank_chunks`];
//! - multiplies the update by `sqrt(rank / ((c + 1) · unit))` (kohya's factor; 1 for the
//!   last chunk).
//!
//! Every rank still takes part in every pass, as in kohya's module (the paper's DyLoRA
//! drops the ranks past `c`). Without a chunk drawn (between training steps) the adapter
//! is the plain LoRA it saves as: all ranks, factor 1. Its file is a kohya LoRA
//! whose first `k · unit` ranks can be cut out as a LoRA of their own
//! ([`crate::resize::truncate_set`], kohya's `extract_lora_from_dylora.py`).
//!
//! ```
//! use burn::backend::{Autodiff, Flex};
//! use burn::nn::LinearConfig;
//! use burn::tensor::{Distribution, Tensor};
//! use lora_core::dylora::DyLora;
//! use lora_core::{LoraConfig, LoraLinear, LoraSiteMut};
//!
//! type B = Autodiff<Flex>;
//! let device = Default::default();
//! let mut layer = LoraLinear::new(LinearConfig::new(6, 5).init::<B>(&device));
//! layer.attach_new(&LoraConfig::new(4).with_dylora_unit(Some(2)), &device)?;
//! let adapter = layer.adapter.as_mut().unwrap();
//! // `up` starts at zero; move it off zero so `down` gets a gradient.
//! let up = adapter.up.weight.clone();
//! adapter.up.weight = up.map(|w| Tensor::from_inner(w.inner().add_scalar(0.5)).require_grad());
//! LoraSiteMut::Linear(&mut layer).set_dylora_chunk(Some(0)); // ranks 0 and 1 train
//! let x = Tensor::<B, 2>::random([3, 6], Distribution::Normal(0.0, 1.0), &device);
//! let grads = layer.forward(x).sum().backward();
//! let adapter = layer.adapter.as_ref().unwrap();
//! let g = adapter.down.weight.grad(&grads).unwrap(); // [in, rank]
//! let trained: f32 = g.clone().slice([0..6, 0..2]).abs().sum().into_scalar();
//! let others: f32 = g.slice([0..6, 2..4]).abs().sum().into_scalar();
//! assert!(trained > 0.0 && others == 0.0);
//! assert_eq!(DyLora::factor(4, 2, 0), 2f32.sqrt());
//! # Ok::<(), lora_core::LoraError>(())
//! ```

use std::collections::{BTreeSet, HashMap};

use burn::module::ParamId;
use burn::tensor::{backend::Backend, Tensor};
use rand::Rng;

/// One adapter's DyLoRA setting: its unit and the chunk the next training pass trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DyLora {
    /// Ranks per chunk (kohya's `unit`), dividing the adapter's rank.
    pub unit: usize,
    /// The chunk (`0..rank / unit`) training passes train; `None`: the adapter acts as the
    /// plain LoRA it saves as (all ranks, factor 1), as between training steps.
    pub chunk: Option<usize>,
}

impl DyLora {
    /// A DyLoRA setting with chunks of `unit` ranks and no chunk drawn.
    pub fn new(unit: usize) -> Self {
        Self { unit, chunk: None }
    }

    /// kohya's draw of the chunk a pass trains: a rank uniform in `0..rank`, rounded down
    /// to a multiple of `unit`, as a chunk index.
    ///
    /// ```
    /// use lora_core::dylora::DyLora;
    /// use rand::SeedableRng;
    /// let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    /// let mut seen = [0; 4];
    /// for _ in 0..400 {
    ///     seen[DyLora::draw(8, 2, &mut rng)] += 1;
    /// }
    /// assert!(seen.iter().all(|n| *n > 60), "{seen:?}");
    /// ```
    pub fn draw(rank: usize, unit: usize, rng: &mut impl Rng) -> usize {
        rng.random_range(0..rank.max(1)) / unit.max(1)
    }

    /// The factor on the update of a pass that trains `chunk`: `sqrt(rank / ((chunk + 1) ·
    /// unit))`, kohya's.
    pub fn factor(rank: usize, unit: usize, chunk: usize) -> f32 {
        (rank as f32 / ((chunk + 1) * unit) as f32).sqrt()
    }

    /// The chunk a training pass trains, with its unit and the factor of its update;
    /// `None` without a chunk drawn. On any backend: a gradient-checkpointed step's first
    /// pass, without autodiff, must compute what its recomputation does.
    pub(crate) fn training(this: Option<&Self>, rank: usize) -> Option<(usize, usize, f32)> {
        let d = this?;
        let chunk = d.chunk?;
        Some((chunk, d.unit, Self::factor(rank, d.unit, chunk)))
    }
}

/// `w` with its rank axis `axis` cut at chunk `chunk` of `unit` ranks: the chunk as it is,
/// the ranks before and after it detached (no gradient reaches them).
pub(crate) fn live_chunk<B: Backend, const D: usize>(
    w: Tensor<B, D>,
    axis: usize,
    chunk: usize,
    unit: usize,
) -> Tensor<B, D> {
    let rank = w.dims()[axis];
    let (start, end) = (chunk * unit, ((chunk + 1) * unit).min(rank));
    let part = |from: usize, to: usize| w.clone().narrow(axis, from, to - from);
    let mut parts = Vec::with_capacity(3);
    if start > 0 {
        parts.push(part(0, start).detach());
    }
    parts.push(part(start, end));
    if end < rank {
        parts.push(part(end, rank).detach());
    }
    if parts.len() == 1 {
        return w;
    }
    Tensor::cat(parts, axis)
}

/// How a trained tensor is cut into rank chunks (DyLoRA's `down` and `up`): the axis that
/// holds the rank, and the ranks per chunk. For
/// [`crate::optim::FlatAdamW::with_rank_chunks`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankChunks {
    /// The tensor's axis (in its burn shape) that holds the rank.
    pub axis: usize,
    /// Ranks per chunk.
    pub unit: usize,
}

/// The rank chunks one optimizer step trains, per tensor: the union of the chunks drawn by
/// the passes whose gradients the step takes (one per micro-batch with gradient
/// accumulation, as kohya's parameters keep the gradients of every pass that switched
/// them on).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrainedChunks {
    chunks: HashMap<ParamId, BTreeSet<usize>>,
}

impl TrainedChunks {
    /// Records that chunk `chunk` of tensor `id` trains.
    pub fn insert(&mut self, id: ParamId, chunk: usize) {
        self.chunks.entry(id).or_default().insert(chunk);
    }

    /// Whether chunk `chunk` of tensor `id` trains.
    pub fn contains(&self, id: ParamId, chunk: usize) -> bool {
        self.chunks.get(&id).is_some_and(|c| c.contains(&chunk))
    }

    /// Whether no chunk was recorded.
    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    /// Forgets every chunk (for the next step).
    pub fn clear(&mut self) {
        self.chunks.clear();
    }
}
