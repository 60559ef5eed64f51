//! LyCORIS' normalization-layer modules (`train_norm=True`, its `NormModule`), as LyCORIS
//! trains them and ComfyUI applies them.
//!
//! A GroupNorm's or LayerNorm's scale `γ` and shift `β` train as differences:
//! `γ' = γ + w_norm`, `β' = β + b_norm` (both `[channels]`, starting at zero), so a fresh
//! module changes nothing. LyCORIS adds these modules, with `train_norm`, to every norm
//! layer inside the blocks its preset targets (on SD 1.x / 2.x UNets: the ResNet blocks'
//! `norm1` / `norm2`, the transformer blocks' `norm`, and their `norm1`–`norm3`), beside
//! the algorithm that trains the other layers. Files hold `lora_unet_….w_norm` and
//! `.b_norm`, no alpha; readers apply them at strength `m` as `γ + m · w_norm`,
//! `β + m · b_norm`. A norm's update is not a weight matrix's, so it has no plain-LoRA
//! form ([`crate::Algo::stands_alone`]).
//!
//! [`LoraNorm`] is the adapter-capable norm layer ([`LoraGroupNorm`], [`LoraLayerNorm`]):
//! the frozen norm in `base` (loading and saving checkpoints skip the field name, as for
//! [`crate::LoraLinear`]) and the module in `lycoris`. Models list these layers as
//! [`crate::LoraSiteMut::Norm`] sites; [`LoraNorm::params`] gives a forward pass its
//! `γ'` and `β'`.
//!
//! Two differences from LyCORIS 4.1.3. Its rank dropout on a norm keeps a channel's update
//! where a uniform draw falls *below* the rate (so `rank_dropout = 0.1` drops nine tenths
//! of them, unscaled), which looks like a slip; norm modules here take module dropout
//! only. And an optimizer's weight decay pulls the trained differences toward zero (the
//! norm toward its base values), where LyCORIS' pulls `γ + w_norm` itself toward zero (as
//! for [`crate::full`]).

use burn::module::{Module, Param};
use burn::nn::{GroupNorm, LayerNorm};
use burn::tensor::{backend::Backend, DType, Tensor};

use crate::linear::fold_delta;
use crate::precision::cast_to;
use crate::{Algo, HostTensor, LoraConfig, LoraError, LoraWeights, LycorisAdapter, LycorisWeights, Result};

/// The LyCORIS name of the scale's difference.
pub const W_NORM: &str = "w_norm";
/// The LyCORIS name of the shift's difference.
pub const B_NORM: &str = "b_norm";

/// A norm module's tensors, checked (see [`check_tensors`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NormShape {
    /// The norm's channels.
    pub channels: usize,
    /// Whether the shift's difference (`b_norm`) is there.
    pub bias: bool,
}

/// Checks a norm module's tensors `l` (`w_norm`, then `b_norm` if any, each
/// `[channels]`) and returns the norm they fit; `key` names the module in errors.
pub fn check_tensors(l: &LycorisWeights, key: &str) -> Result<NormShape> {
    let bad = |reason: String| LoraError::ShapeMismatch { key: key.into(), reason };
    let names: Vec<&str> = l.tensors.iter().map(|(n, _)| n.as_str()).collect();
    if l.algo != Algo::Norm || !matches!(names.as_slice(), [W_NORM] | [W_NORM, B_NORM]) {
        return Err(bad(format!("a norm module has `{W_NORM}` and, for a norm with a shift, `{B_NORM}`; found {names:?}")));
    }
    let channels = match l.tensors[0].1.shape.as_slice() {
        &[c] if c > 0 => c,
        other => return Err(bad(format!("`{W_NORM}` is {other:?}; one value per channel ([channels]) expected"))),
    };
    for (name, t) in &l.tensors {
        if t.shape != [channels] || t.data.len() != channels {
            return Err(bad(format!("`{name}` is {:?} with {} values; [{channels}] expected (one per channel, as `{W_NORM}`)", t.shape, t.data.len())));
        }
    }
    Ok(NormShape { channels, bias: l.tensors.len() == 2 })
}

/// A norm module as [`LoraWeights`]: its `w_norm` and `b_norm` (LyCORIS' names and shapes)
/// in [`LoraWeights::lycoris`] beside an empty plain form (rank 0 of a `channels → 1`
/// "layer"), checked; `key` names it in errors.
///
/// ```
/// use lora_core::{norm, HostTensor};
/// let w = norm::weights(HostTensor::new(vec![4], vec![0.1; 4])?, Some(HostTensor::new(vec![4], vec![0.2; 4])?), "k")?;
/// assert!(w.stands_alone() && w.rank() == 0);
/// assert!(norm::weights(HostTensor::new(vec![4], vec![0.1; 4])?, Some(HostTensor::new(vec![3], vec![0.2; 3])?), "k").is_err());
/// # Ok::<(), lora_core::LoraError>(())
/// ```
pub fn weights(w_norm: HostTensor, b_norm: Option<HostTensor>, key: &str) -> Result<LoraWeights> {
    let tensors = std::iter::once((W_NORM.to_string(), w_norm)).chain(b_norm.map(|b| (B_NORM.to_string(), b))).collect();
    // No alpha: LyCORIS writes none and the readers scale by 1.
    let lycoris = LycorisWeights { algo: Algo::Norm, tensors, alpha: 1.0 };
    let shape = check_tensors(&lycoris, key)?;
    LoraWeights::base_relative(vec![0, 1], vec![shape.channels, 0], lycoris, key)
}

/// Checks a norm module's [`LoraWeights`] (see [`weights`]); `key` names it in errors.
pub(crate) fn validate(w: &LoraWeights, key: &str) -> Result<()> {
    let bad = |reason: String| LoraError::ShapeMismatch { key: key.into(), reason };
    let Some(l) = w.lycoris.as_ref().filter(|l| l.algo == Algo::Norm) else {
        return Err(bad("not a norm module".into()));
    };
    let shape = check_tensors(l, key)?;
    if w.down.shape != [0, 1] || w.up.shape != [shape.channels, 0] || w.magnitude.is_some() {
        return Err(bad(format!("a norm module of {} channels has an empty plain form (down [0, 1], up [{}, 0]) and no DoRA magnitude; found down {:?}, up {:?}", shape.channels, shape.channels, w.down.shape, w.up.shape)));
    }
    Ok(())
}

/// An error naming `key` when `adapter` is a norm module, which a linear layer or a
/// convolution (`what`) does not take.
pub(crate) fn refuse_on_layer<B: Backend>(adapter: &LycorisAdapter<B>, what: &str, key: &str) -> Result<()> {
    match adapter.algo() {
        Algo::Norm => Err(LoraError::ShapeMismatch { key: key.into(), reason: format!("LyCORIS' norm module (`{W_NORM}`, `{B_NORM}`) fits a GroupNorm or LayerNorm, not a {what}") }),
        _ => Ok(()),
    }
}

/// A norm's scale `γ` or shift `β`: one value per channel.
pub type NormParam<B> = Param<Tensor<B, 1>>;

/// A norm layer whose scale and shift a [`LoraNorm`] can change: burn's [`GroupNorm`] and
/// [`LayerNorm`].
pub trait NormBase<B: Backend>: Module<B> {
    /// The scale `γ` and shift `β` (`[channels]` each), where the norm has them.
    fn params(&self) -> (Option<&NormParam<B>>, Option<&NormParam<B>>);
    /// [`params`](Self::params), to change.
    fn params_mut(&mut self) -> (Option<&mut NormParam<B>>, Option<&mut NormParam<B>>);
}

impl<B: Backend> NormBase<B> for GroupNorm<B> {
    fn params(&self) -> (Option<&NormParam<B>>, Option<&NormParam<B>>) {
        (self.gamma.as_ref(), self.beta.as_ref())
    }
    fn params_mut(&mut self) -> (Option<&mut NormParam<B>>, Option<&mut NormParam<B>>) {
        (self.gamma.as_mut(), self.beta.as_mut())
    }
}

impl<B: Backend> NormBase<B> for LayerNorm<B> {
    fn params(&self) -> (Option<&NormParam<B>>, Option<&NormParam<B>>) {
        (Some(&self.gamma), self.beta.as_ref())
    }
    fn params_mut(&mut self) -> (Option<&mut NormParam<B>>, Option<&mut NormParam<B>>) {
        (Some(&mut self.gamma), self.beta.as_mut())
    }
}

/// A norm layer that can hold LyCORIS' norm module (see the [module docs](self)).
///
/// ```
/// use burn::backend::Flex;
/// use burn::nn::GroupNormConfig;
/// use lora_core::norm::LoraGroupNorm;
/// use lora_core::LoraConfig;
///
/// let device = Default::default();
/// let mut norm = LoraGroupNorm::new(GroupNormConfig::new(2, 4).init::<Flex>(&device));
/// norm.attach_new(&LoraConfig::new(1), &device)?;
/// let adapter = norm.lycoris.as_ref().unwrap();
/// assert_eq!(adapter.names(), ["w_norm", "b_norm"]);
/// let (gamma, beta) = norm.params();
/// // A fresh module changes nothing: γ' = γ = 1, β' = β = 0.
/// assert_eq!(gamma.unwrap().into_data().to_vec::<f32>().unwrap(), vec![1.0; 4]);
/// assert_eq!(beta.unwrap().into_data().to_vec::<f32>().unwrap(), vec![0.0; 4]);
/// # Ok::<(), lora_core::LoraError>(())
/// ```
#[derive(Module, Debug)]
pub struct LoraNorm<B: Backend, N: Module<B>> {
    /// The frozen norm (its parameters do not require gradients).
    pub base: N,
    /// LyCORIS' norm module ([`Algo::Norm`]), if one is attached.
    pub lycoris: Option<LycorisAdapter<B>>,
    /// Strength of the module at run time (1.0 = as trained).
    pub multiplier: f32,
    /// Whether the module is currently folded into `base`.
    merged: bool,
}

/// A GroupNorm that can hold a norm module.
pub type LoraGroupNorm<B> = LoraNorm<B, GroupNorm<B>>;
/// A LayerNorm that can hold a norm module.
pub type LoraLayerNorm<B> = LoraNorm<B, LayerNorm<B>>;

impl<B: Backend, N: NormBase<B>> LoraNorm<B, N> {
    /// Wraps a norm layer and freezes its parameters.
    pub fn new(base: N) -> Self {
        Self { base: crate::frozen::freeze(base), lycoris: None, multiplier: 1.0, merged: false }
    }

    /// The norm's channels (`γ`'s or `β`'s length; 0 for a norm with neither).
    pub fn channels(&self) -> usize {
        match self.base.params() {
            (Some(g), _) => g.dims()[0],
            (None, Some(b)) => b.dims()[0],
            (None, None) => 0,
        }
    }

    /// Attaches a fresh norm module (differences at zero), replacing any previous one. Of
    /// `config` only the module dropout applies (see the [module docs](self)); its
    /// algorithm is not this layer's, which is always [`Algo::Norm`].
    pub fn attach_new(&mut self, config: &LoraConfig, device: &B::Device) -> Result<()> {
        let norm = LoraConfig::new(1).with_algo(Algo::Norm).with_module_dropout(config.module_dropout);
        let adapter = LycorisAdapter::new(&norm, [self.channels(), 1, 1, 1], false, device)?;
        self.attach_lycoris(adapter, "<new>")
    }

    /// Attaches a norm module (unmerging and dropping any previous one), checking that it
    /// fits: its channels, and a shift's difference only for a norm with a shift (one
    /// without gets it at zero, as LyCORIS reads such a file); `key` names it in errors.
    pub fn attach_lycoris(&mut self, adapter: LycorisAdapter<B>, key: &str) -> Result<()> {
        let bad = |reason: String| Err(LoraError::ShapeMismatch { key: key.into(), reason });
        let (gamma, beta) = self.base.params();
        let (has_gamma, has_beta) = (gamma.is_some(), beta.is_some());
        let channels = self.channels();
        if adapter.algo() != Algo::Norm {
            return bad(format!("a norm layer takes LyCORIS' norm module (`{W_NORM}`, `{B_NORM}`), not a {}", adapter.algo().name()));
        }
        if !has_gamma {
            return bad("the norm has no scale (γ) to train".into());
        }
        if adapter.shape()[0] != channels {
            return bad(format!("the norm has {channels} channels, the module {}", adapter.shape()[0]));
        }
        let adapter = crate::linear::adapter_for_bias(adapter, has_beta, "norm", key)?;
        self.unmerge_in_place();
        self.lycoris = Some(adapter);
        Ok(())
    }

    /// Attaches a norm module read from a file ([`weights`]); `key` names it in errors.
    pub fn attach_weights(&mut self, weights: &LoraWeights, key: &str, device: &B::Device) -> Result<()> {
        let Some(lycoris) = weights.lycoris.as_ref().filter(|l| l.algo == Algo::Norm) else {
            let kind = weights.lycoris.as_ref().map_or("LoRA", |l| l.algo.name());
            return Err(LoraError::ShapeMismatch { key: key.into(), reason: format!("the layer is a norm, which takes LyCORIS' norm module (`{W_NORM}`, `{B_NORM}`); the weights are a {kind}") });
        };
        let adapter = LycorisAdapter::from_weights(lycoris, [self.channels(), 1, 1, 1], false, key, device)?;
        self.attach_lycoris(adapter, key)
    }

    /// Removes the module (unmerging it first) and returns it.
    pub fn detach(&mut self) -> Option<LycorisAdapter<B>> {
        self.unmerge_in_place();
        self.lycoris.take()
    }

    /// Sets the module's strength (re-merging it at the new strength if it was merged).
    pub fn set_multiplier(&mut self, multiplier: f32) {
        let was_merged = self.merged;
        self.unmerge_in_place();
        self.multiplier = multiplier;
        if was_merged {
            self.merge_in_place();
        }
    }

    /// Whether the module is folded into the base norm.
    pub fn is_merged(&self) -> bool {
        self.merged
    }

    /// Folds the module into the base norm at the current strength (`γ + m · w_norm`,
    /// `β + m · b_norm`, summed in f32 and rounded once to the norm's dtype); the forward
    /// pass then costs what the plain norm's does.
    pub fn merge_in_place(&mut self) {
        self.fold(1.0);
    }

    /// Undoes [`merge_in_place`](Self::merge_in_place).
    pub fn unmerge_in_place(&mut self) {
        self.fold(-1.0);
    }

    /// Folds the module in (`sign` 1, when not merged) or out (-1, when merged).
    fn fold(&mut self, sign: f32) {
        let Some(adapter) = &self.lycoris else { return };
        if self.merged == (sign > 0.0) {
            return;
        }
        let (dw, db) = adapter.norm_deltas(self.multiplier, false);
        let (gamma, beta) = self.base.params_mut();
        if let Some(g) = gamma {
            *g = fold_delta(g.clone(), dw.detach(), sign);
        }
        if let (Some(b), Some(db)) = (beta, db) {
            *b = fold_delta(b.clone(), db.detach(), sign);
        }
        self.merged = sign > 0.0;
    }

    /// Folds the module into the base norm and drops it: a plain norm again.
    pub fn bake(&mut self) {
        self.merge_in_place();
        self.lycoris = None;
        self.merged = false;
        self.multiplier = 1.0;
    }

    /// The scale and shift of a forward pass: the base norm's, or with an unmerged module
    /// `γ + m · w_norm` and `β + m · b_norm` in f32, in the graph of the module's tensors
    /// (with module dropout on autodiff backends). Not detached: the base's are frozen.
    pub fn params(&self) -> (Option<Tensor<B, 1>>, Option<Tensor<B, 1>>) {
        let (gamma, beta) = self.base.params();
        let (gamma, beta) = (gamma.map(|p| p.val()), beta.map(|p| p.val()));
        let Some(adapter) = self.lycoris.as_ref().filter(|_| !self.merged) else {
            return (gamma, beta);
        };
        let (dw, db) = adapter.norm_deltas(self.multiplier, true);
        let add = |p: Tensor<B, 1>, d: Tensor<B, 1>| cast_to(p, DType::F32) + d;
        let gamma = gamma.map(|g| add(g, dw));
        let beta = match (beta, db) {
            (Some(b), Some(d)) => Some(add(b, d)),
            (b, _) => b,
        };
        (gamma, beta)
    }
}

/// What [`crate::LoraSiteMut::Norm`] needs of a norm layer with a module, whatever its
/// kind (implemented by [`LoraNorm`]).
pub trait NormSite<B: Backend> {
    /// The attached module, if any.
    fn lycoris(&self) -> Option<&LycorisAdapter<B>>;
    /// The attached module, if any, to change.
    fn lycoris_mut(&mut self) -> Option<&mut LycorisAdapter<B>>;
    /// [`LoraNorm::attach_new`].
    fn attach_new(&mut self, config: &LoraConfig, device: &B::Device) -> Result<()>;
    /// [`LoraNorm::attach_weights`].
    fn attach_weights(&mut self, weights: &LoraWeights, key: &str, device: &B::Device) -> Result<()>;
    /// [`LoraNorm::detach`].
    fn detach(&mut self) -> Option<LycorisAdapter<B>>;
    /// [`LoraNorm::set_multiplier`].
    fn set_multiplier(&mut self, multiplier: f32);
    /// [`LoraNorm::merge_in_place`].
    fn merge_in_place(&mut self);
    /// [`LoraNorm::unmerge_in_place`].
    fn unmerge_in_place(&mut self);
    /// [`LoraNorm::bake`].
    fn bake(&mut self);
    /// [`LoraNorm::channels`].
    fn channels(&self) -> usize;
}

impl<B: Backend, N: NormBase<B>> NormSite<B> for LoraNorm<B, N> {
    fn lycoris(&self) -> Option<&LycorisAdapter<B>> {
        self.lycoris.as_ref()
    }
    fn lycoris_mut(&mut self) -> Option<&mut LycorisAdapter<B>> {
        self.lycoris.as_mut()
    }
    fn attach_new(&mut self, config: &LoraConfig, device: &B::Device) -> Result<()> {
        LoraNorm::attach_new(self, config, device)
    }
    fn attach_weights(&mut self, weights: &LoraWeights, key: &str, device: &B::Device) -> Result<()> {
        LoraNorm::attach_weights(self, weights, key, device)
    }
    fn detach(&mut self) -> Option<LycorisAdapter<B>> {
        LoraNorm::detach(self)
    }
    fn set_multiplier(&mut self, multiplier: f32) {
        LoraNorm::set_multiplier(self, multiplier)
    }
    fn merge_in_place(&mut self) {
        LoraNorm::merge_in_place(self)
    }
    fn unmerge_in_place(&mut self) {
        LoraNorm::unmerge_in_place(self)
    }
    fn bake(&mut self) {
        LoraNorm::bake(self)
    }
    fn channels(&self) -> usize {
        LoraNorm::channels(self)
    }
}
