//! Adapter sites of a model, addressed by module path.
//!
//! A model lists its adapter-capable layers through [`LoraSites`]; the functions here attach
//! an [`AdapterSet`] to them, collect trained adapters back into a set, and build the
//! [`ModuleIndex`] that resolves kohya keys — all without knowing the model's structure.

use burn::tensor::backend::Backend;

use crate::norm::NormSite;
use crate::{AdapterKey, AdapterSet, Component, LoraConfig, LoraConv2d, LoraError, LoraLinear, LoraWeights, ModuleIndex, Result};

/// A mutable view of one adapter-capable layer.
pub enum LoraSiteMut<'a, B: Backend> {
    /// A linear layer.
    Linear(&'a mut LoraLinear<B>),
    /// A 2-d convolution.
    Conv(&'a mut LoraConv2d<B>),
    /// A GroupNorm or LayerNorm ([`crate::norm::LoraNorm`]), which takes LyCORIS' norm
    /// module ([`crate::Algo::Norm`]) only.
    Norm(&'a mut dyn NormSite<B>),
}

impl<B: Backend> LoraSiteMut<'_, B> {
    /// Attaches adapter weights read from a file; `key` names the adapter in errors.
    pub fn attach_weights(&mut self, weights: &LoraWeights, key: &str, device: &B::Device) -> Result<()> {
        match self {
            Self::Linear(l) => {
                if weights.is_conv() && weights.down.shape[2..] == [1, 1] {
                    // A 1x1-conv adapter (4-d) fits a linear layer after dropping the 1x1 dims.
                    let squeeze = |t: &crate::HostTensor| crate::HostTensor {
                        shape: t.shape[..2].to_vec(),
                        data: t.data.clone(),
                    };
                    let w = LoraWeights {
                        down: squeeze(&weights.down),
                        up: squeeze(&weights.up),
                        alpha: weights.alpha,
                        magnitude: weights.magnitude.clone(),
                        lycoris: weights.lycoris.clone(),
                    };
                    return l.attach_weights(&w, key, device);
                }
                l.attach_weights(weights, key, device)
            }
            Self::Conv(c) => c.attach_weights(weights, key, device),
            Self::Norm(n) => n.attach_weights(weights, key, device),
        }
    }

    /// Sets the attached adapter's weights and scale from `weights` (continuing training from
    /// a file), keeping its dropout probabilities and DyLoRA unit: an error when no adapter is attached or the ranks
    /// differ; the layouts are checked as [`attach_weights`](Self::attach_weights) checks
    /// them. `key` names the adapter in errors.
    pub fn load_weights(&mut self, weights: &LoraWeights, key: &str, device: &B::Device) -> Result<()> {
        let keep = |rank: usize, [input, network, rank_p, module_p]: [f64; 4], (rows, scale): (bool, bool)| {
            let config = LoraConfig::new(rank).with_dropout(input).with_network_dropout(network);
            let config = config.with_rank_dropout(rank_p).with_module_dropout(module_p);
            (rank, config.with_lycoris_rank_dropout(rows).with_rank_dropout_scale(scale))
        };
        if let Some(lycoris) = self.attached_lycoris() {
            return self.load_lycoris(lycoris, weights, key, device);
        }
        let lycoris = weights.lycoris.as_ref().filter(|l| l.algo.is_lycoris());
        if lycoris.is_some() && self.has_adapter() {
            return Err(LoraError::Unsupported(format!("{key}: the weights are a {}, the attached adapter is a LoRA", lycoris.map_or("", |l| l.algo.name()))));
        }
        // LyCORIS' LoCon with and without a Tucker core have different tensors.
        let file_tucker = weights.lycoris.as_ref().is_some_and(|l| l.is_tucker_locon());
        if let Self::Conv(c) = self && let Some(attached) = c.adapter.as_ref().filter(|a| a.is_tucker() != file_tucker) {
            let form = |tucker: bool| if tucker { "a LoCon with a Tucker core (`lora_mid`)" } else { "a LoCon without one" };
            return Err(LoraError::Unsupported(format!("{key}: the weights are {}, the attached adapter is {} (lora.use_tucker must match the file)", form(file_tucker), form(attached.is_tucker()))));
        }
        let attached = match self {
            Self::Linear(l) => l.adapter.as_ref().map(|a| (keep(a.rank(), [a.dropout.prob, a.network_dropout.prob, a.rank_dropout, a.module_dropout], (a.lycoris_rank_dropout, a.rank_dropout_scale)), a.is_dora())),
            Self::Conv(c) => c.adapter.as_ref().map(|a| (keep(a.rank(), [a.dropout.prob, a.network_dropout.prob, a.rank_dropout, a.module_dropout], (a.lycoris_rank_dropout, a.rank_dropout_scale)), a.is_dora())),
            Self::Norm(_) => None,
        };
        let Some(((rank, dropout), dora)) = attached else {
            if self.is_norm() {
                return Err(LoraError::Unsupported(format!("{key}: a norm layer without a norm module to load the weights into (norm layers train with LyCORIS' train_norm)")));
            }
            return Err(LoraError::Unsupported(format!("{key}: no adapter is attached to load weights into")));
        };
        let dylora = self.dylora();
        if weights.rank() != rank {
            return Err(LoraError::ShapeMismatch {
                key: key.to_string(),
                reason: format!("rank {} in the weights, {rank} in the attached adapter", weights.rank()),
            });
        }
        if weights.is_dora() != dora {
            let kind = |dora: bool| if dora { "DoRA" } else { "plain LoRA" };
            return Err(LoraError::Unsupported(format!("{key}: the weights are {}, the attached adapter is {}", kind(weights.is_dora()), kind(dora))));
        }
        self.attach_weights(weights, key, device)?;
        self.set_dropout(&dropout);
        self.set_dylora_unit(dylora.map(|d| d.unit), key)
    }

    /// What [`load_weights`](Self::load_weights) checks of an attached LyCORIS adapter, if
    /// one is attached.
    fn attached_lycoris(&self) -> Option<AttachedLycoris> {
        let l = self.lycoris_adapter()?;
        Some(AttachedLycoris {
            algo: l.algo(),
            rank: l.rank(),
            shapes: l.names().iter().zip(l.torch_shapes()).map(|(n, shape)| (*n, flat(&shape))).collect(),
            module_dropout: l.module_dropout,
            rank_dropout: (l.rank_dropout, l.rank_dropout_scale),
            dora: l.is_dora(),
            scalar: l.scalar.is_some(),
            ia3_on_input: l.ia3_on_input(),
        })
    }

    /// [`load_weights`](Self::load_weights) into an attached LyCORIS adapter: the weights
    /// must be the same algorithm with factors of the same shapes.
    fn load_lycoris(&mut self, attached: AttachedLycoris, weights: &LoraWeights, key: &str, device: &B::Device) -> Result<()> {
        let AttachedLycoris { algo, rank, shapes, module_dropout, rank_dropout, dora, scalar, ia3_on_input } = attached;
        let Some(lycoris) = weights.lycoris.as_ref().filter(|l| l.algo == algo) else {
            let kind = weights.lycoris.as_ref().map_or("LoRA", |l| l.algo.name());
            return Err(LoraError::Unsupported(format!("{key}: the weights are a {kind}, the attached adapter is a {}", algo.name())));
        };
        if weights.is_dora() != dora {
            let kind = |dora: bool| if dora { "with DoRA's `dora_scale`" } else { "without DoRA" };
            return Err(LoraError::Unsupported(format!("{key}: the weights are a {} {}, the attached adapter is one {} (lora.dora must match the file)", algo.name(), kind(weights.is_dora()), kind(dora))));
        }
        // A full difference may leave out the bias's (read as zero, as LyCORIS reads it).
        let optional = |name: &str| (algo == crate::Algo::Full && name == crate::full::DIFF_B) || (algo == crate::Algo::Norm && name == crate::norm::B_NORM);
        let shapes: Vec<(&str, Vec<usize>)> = shapes.into_iter().filter(|(name, _)| lycoris.get(name).is_some() || !optional(name)).collect();
        let found: Vec<(&str, Vec<usize>)> = shapes.iter().map(|(name, _)| (*name, lycoris.get(name).map(|t| flat(&t.shape)).unwrap_or_default())).collect();
        // An (IA)³'s flag is no factor.
        let flag = lycoris.get(crate::ia3::ON_INPUT).filter(|_| algo == crate::Algo::Ia3);
        if let Some(on_input) = flag.map(|t| t.data.first() == Some(&1.0)).filter(|on| *on != ia3_on_input) {
            let side = |input: bool| if input { "input" } else { "output" };
            return Err(LoraError::ShapeMismatch {
                key: key.to_string(),
                reason: format!("the weights' (IA)³ scales each {} channel, the attached adapter each {} channel (lora.ia3_on_input must match the file)", side(on_input), side(ia3_on_input)),
            });
        }
        if found != shapes || lycoris.tensors.len() != shapes.len() + usize::from(flag.is_some()) || lycoris.rank() != rank {
            return Err(LoraError::ShapeMismatch {
                key: key.to_string(),
                reason: format!("the weights' {} factors are {found:?}, the attached adapter's are {shapes:?} (another rank, factor or use_tucker?)", algo.name()),
            });
        }
        self.attach_weights(weights, key, device)?;
        self.set_dropout(&LoraConfig::new(1).with_module_dropout(module_dropout).with_rank_dropout(rank_dropout.0).with_rank_dropout_scale(rank_dropout.1));
        // LyCORIS' `use_scalar` continues from a file (whose factors hold the scalar it was
        // saved with) at a scalar of 1.
        if let (true, Some(a)) = (scalar, self.lycoris_adapter_mut()) {
            a.scalar = Some(burn::module::Param::from_tensor(burn::tensor::Tensor::ones([1], device)));
        }
        Ok(())
    }

    /// Sets the attached adapter's dropout probabilities from `config` (input dropout,
    /// kohya's network, rank and module dropout; adapters read from files have none); does nothing
    /// without an adapter.
    pub fn set_dropout(&mut self, config: &LoraConfig) {
        let dropout = burn::nn::DropoutConfig::new(config.dropout).init();
        let network = burn::nn::DropoutConfig::new(config.network_dropout).init();
        // A LyCORIS adapter has module and LyCORIS' rank dropout (its config refuses the
        // others).
        if let Some(a) = self.lycoris_adapter_mut() {
            // A norm module takes module dropout only (see `crate::norm`).
            let rank_dropout = if a.algo() == crate::Algo::Norm { 0.0 } else { config.rank_dropout };
            (a.module_dropout, a.rank_dropout, a.rank_dropout_scale) = (config.module_dropout, rank_dropout, config.rank_dropout_scale);
        }
        let rows = (config.lycoris_rank_dropout, config.rank_dropout_scale);
        match self {
            Self::Linear(l) => {
                if let Some(a) = l.adapter.as_mut() {
                    (a.dropout, a.network_dropout, a.rank_dropout, a.module_dropout) = (dropout, network, config.rank_dropout, config.module_dropout);
                    (a.lycoris_rank_dropout, a.rank_dropout_scale) = rows;
                }
            }
            Self::Conv(c) => {
                if let Some(a) = c.adapter.as_mut() {
                    (a.dropout, a.network_dropout, a.rank_dropout, a.module_dropout) = (dropout, network, config.rank_dropout, config.module_dropout);
                    (a.lycoris_rank_dropout, a.rank_dropout_scale) = rows;
                }
            }
            Self::Norm(_) => {}
        }
    }

    /// Freezes the attached LoRA adapter's `down` (LoRA-FA, [`LoraConfig::lora_fa`]): it is
    /// detached and takes no gradient, so optimizers leave it as it is. Returns whether
    /// there was such an adapter (a LyCORIS one, or a LoCon with a Tucker core, is left
    /// as it is).
    ///
    /// ```
    /// use burn::backend::{Autodiff, Flex};
    /// use burn::nn::LinearConfig;
    /// use lora_core::{LoraConfig, LoraLinear, LoraSiteMut};
    ///
    /// type B = Autodiff<Flex>;
    /// let device = Default::default();
    /// let mut layer = LoraLinear::new(LinearConfig::new(8, 4).init::<B>(&device));
    /// layer.attach_new(&LoraConfig::new(2), &device)?;
    /// assert!(layer.adapter.as_ref().unwrap().down.weight.is_require_grad());
    /// assert!(LoraSiteMut::Linear(&mut layer).freeze_down());
    /// let adapter = layer.adapter.as_ref().unwrap();
    /// assert!(!adapter.down.weight.is_require_grad() && adapter.up.weight.is_require_grad());
    /// # Ok::<(), lora_core::LoraError>(())
    /// ```
    pub fn freeze_down(&mut self) -> bool {
        match self {
            Self::Linear(l) => match l.adapter.as_mut() {
                Some(a) if l.lycoris.is_none() => {
                    a.down.weight = crate::linear::frozen_if(a.down.weight.clone(), true);
                    true
                }
                _ => false,
            },
            Self::Conv(c) => match c.adapter.as_mut() {
                Some(a) if c.lycoris.is_none() && a.mid.is_none() => {
                    a.down.weight = crate::linear::frozen_if(a.down.weight.clone(), true);
                    true
                }
                _ => false,
            },
            Self::Norm(_) => false,
        }
    }

    /// Tells a linear adapter how many samples the rows of its 2-d inputs hold (the batch
    /// size, for rank dropout's per-sample masks: a UNet's transformer layers see
    /// `[batch · tokens, channels]`); conv adapters read it from their input.
    pub fn set_samples(&mut self, samples: usize) {
        if let Self::Linear(l) = self && let Some(a) = l.adapter.as_mut() {
            a.samples = samples;
        }
    }

    /// The attached LoRA's DyLoRA setting ([`crate::dylora`]); `None` without a DyLoRA
    /// adapter.
    pub fn dylora(&self) -> Option<crate::dylora::DyLora> {
        match self {
            Self::Linear(l) => l.adapter.as_ref().and_then(|a| a.dylora),
            Self::Conv(c) => c.adapter.as_ref().and_then(|a| a.dylora),
            Self::Norm(_) => None,
        }
    }

    /// The rank of the attached LoRA (LoCon); `None` without one (or with a LyCORIS
    /// adapter).
    pub fn lora_rank(&self) -> Option<usize> {
        match self {
            Self::Linear(l) => l.adapter.as_ref().map(|a| a.rank()),
            Self::Conv(c) => c.adapter.as_ref().map(|a| a.rank()),
            Self::Norm(_) => None,
        }
    }

    /// Makes the attached LoRA a DyLoRA with chunks of `unit` ranks (`None`: a plain LoRA),
    /// e.g. one read from a file to train further; `key` names it in errors. A LoRA with a
    /// DoRA magnitude or a Tucker core, or whose rank `unit` does not divide, is refused;
    /// nothing happens without a LoRA adapter.
    pub fn set_dylora_unit(&mut self, unit: Option<usize>, key: &str) -> Result<()> {
        let Some(rank) = self.lora_rank() else {
            return Ok(());
        };
        if let Some(unit) = unit {
            let bad = |reason: String| Err(LoraError::InvalidConfig(format!("`{key}`: {reason}")));
            if unit == 0 || !rank.is_multiple_of(unit) {
                return bad(format!(
                    "DyLoRA's unit {unit} does not divide the adapter's rank {rank}"
                ));
            }
            if self.magnitude_param_id().is_some() || self.tucker_param_id().is_some() {
                return bad("DyLoRA does not train a DoRA magnitude or a Tucker core".into());
            }
        }
        let dylora = unit.map(crate::dylora::DyLora::new);
        match self {
            Self::Linear(l) => l.adapter.iter_mut().for_each(|a| a.dylora = dylora),
            Self::Conv(c) => c.adapter.iter_mut().for_each(|a| a.dylora = dylora),
            Self::Norm(_) => {}
        }
        Ok(())
    }

    /// Sets the chunk of ranks the next training passes of a DyLoRA adapter train (`None`:
    /// none, the adapter acts as the plain LoRA it saves as); does nothing to other
    /// adapters. See [`crate::dylora`].
    pub fn set_dylora_chunk(&mut self, chunk: Option<usize>) {
        let set = |d: &mut Option<crate::dylora::DyLora>| {
            if let Some(d) = d {
                d.chunk = chunk;
            }
        };
        match self {
            Self::Linear(l) => l.adapter.iter_mut().for_each(|a| set(&mut a.dylora)),
            Self::Conv(c) => c.adapter.iter_mut().for_each(|a| set(&mut a.dylora)),
            Self::Norm(_) => {}
        }
    }

    /// How the attached DyLoRA adapter's `down` and `up` are cut into rank chunks, for
    /// [`crate::optim::FlatAdamW::with_rank_chunks`]; empty without a DyLoRA adapter.
    pub fn dylora_rank_chunks(&self) -> Vec<(burn::module::ParamId, crate::dylora::RankChunks)> {
        let (Some(d), Some((down, up))) = (self.dylora(), self.adapter_param_ids()) else {
            return Vec::new();
        };
        // burn's layouts: a linear `down [in, r]` and `up [r, out]`; a convolution's
        // `down [r, in, kh, kw]` and `up [out, r, 1, 1]`.
        let (down_axis, up_axis) = if self.is_conv() { (0, 1) } else { (1, 0) };
        let chunks = |axis| crate::dylora::RankChunks { axis, unit: d.unit };
        vec![(down, chunks(down_axis)), (up, chunks(up_axis))]
    }

    /// Attaches a freshly initialised adapter (to a norm layer, LyCORIS' norm module with
    /// `config`'s module dropout, whatever `config`'s algorithm: [`crate::norm`]).
    pub fn attach_new(&mut self, config: &LoraConfig, device: &B::Device) -> Result<()> {
        match self {
            Self::Linear(l) => l.attach_new(config, device),
            Self::Conv(c) => c.attach_new(config, device),
            Self::Norm(n) => n.attach_new(config, device),
        }
    }

    /// Removes the adapter, if any.
    pub fn detach(&mut self) {
        match self {
            Self::Linear(l) => drop(l.detach()),
            Self::Conv(c) => drop(c.detach()),
            Self::Norm(n) => drop(n.detach()),
        }
    }

    /// Sets the adapter strength.
    pub fn set_multiplier(&mut self, multiplier: f32) {
        match self {
            Self::Linear(l) => l.set_multiplier(multiplier),
            Self::Conv(c) => c.set_multiplier(multiplier),
            Self::Norm(n) => n.set_multiplier(multiplier),
        }
    }

    /// Folds the adapter into the base weights.
    pub fn merge_in_place(&mut self) {
        match self {
            Self::Linear(l) => l.merge_in_place(),
            Self::Conv(c) => c.merge_in_place(),
            Self::Norm(n) => n.merge_in_place(),
        }
    }

    /// Subtracts a merged adapter from the base weights again ([`merge_in_place`](Self::merge_in_place)
    /// undone; nothing when not merged).
    pub fn unmerge_in_place(&mut self) {
        match self {
            Self::Linear(l) => l.unmerge_in_place(),
            Self::Conv(c) => c.unmerge_in_place(),
            Self::Norm(n) => n.unmerge_in_place(),
        }
    }

    /// Folds the adapter into the base weights and drops it.
    pub fn bake(&mut self) {
        match self {
            Self::Linear(l) => l.bake(),
            Self::Conv(c) => c.bake(),
            Self::Norm(n) => n.bake(),
        }
    }

    /// The attached adapter in file layout, if any (a LyCORIS one with its own tensors in
    /// [`LoraWeights::lycoris`]).
    pub fn adapter_weights(&self) -> Option<Result<LoraWeights>> {
        self.named_weights("<adapter>")
    }

    /// [`adapter_weights`](Self::adapter_weights), with `key` naming the adapter in errors.
    fn named_weights(&self, key: &str) -> Option<Result<LoraWeights>> {
        let lora = match self {
            Self::Linear(l) => l.adapter.as_ref().map(|a| a.to_weights()),
            Self::Conv(c) => c.adapter.as_ref().map(|a| a.to_weights()),
            Self::Norm(_) => None,
        };
        lora.or_else(|| self.lycoris_adapter().map(|a| a.to_weights(key)))
    }

    /// Whether an adapter (LoRA or LyCORIS) is attached.
    pub fn has_adapter(&self) -> bool {
        let lora = match self {
            Self::Linear(l) => l.adapter.is_some(),
            Self::Conv(c) => c.adapter.is_some(),
            Self::Norm(_) => false,
        };
        lora || self.lycoris_adapter().is_some()
    }

    /// The attached LyCORIS adapter (LoHa / LoKr), if any.
    pub fn lycoris_adapter(&self) -> Option<&crate::LycorisAdapter<B>> {
        match self {
            Self::Linear(l) => l.lycoris.as_ref(),
            Self::Conv(c) => c.lycoris.as_ref(),
            Self::Norm(n) => n.lycoris(),
        }
    }

    /// The attached LyCORIS adapter (LoHa / LoKr), if any, to change.
    pub fn lycoris_adapter_mut(&mut self) -> Option<&mut crate::LycorisAdapter<B>> {
        match self {
            Self::Linear(l) => l.lycoris.as_mut(),
            Self::Conv(c) => c.lycoris.as_mut(),
            Self::Norm(n) => n.lycoris_mut(),
        }
    }

    /// The parameter ids of the attached LyCORIS adapter's factors, DoRA magnitude and
    /// trained scalar (empty without one).
    pub fn lycoris_param_ids(&self) -> Vec<burn::module::ParamId> {
        self.lycoris_adapter().map(|a| a.factors.iter().map(|p| p.id).chain(a.magnitude.as_ref().map(|m| m.id)).chain(a.scalar.as_ref().map(|s| s.id)).collect()).unwrap_or_default()
    }

    /// The parameter ids of the attached adapter's `down` and `up` weights (kohya's
    /// `lora_down` / `lora_up`, PEFT's `lora_A` / `lora_B`), to give them their own
    /// learning rates ([`crate::optim::FlatAdamW::with_lr_scales`]); `None` without one.
    pub fn adapter_param_ids(&self) -> Option<(burn::module::ParamId, burn::module::ParamId)> {
        match self {
            Self::Linear(l) => l.adapter.as_ref().map(|a| (a.down.weight.id, a.up.weight.id)),
            Self::Conv(c) => c.adapter.as_ref().map(|a| (a.down.weight.id, a.up.weight.id)),
            Self::Norm(_) => None,
        }
    }

    /// The parameter id of the attached LoRA's Tucker core (`mid`, LyCORIS' `lora_mid`);
    /// `None` without one. It takes `down`'s learning rate.
    pub fn tucker_param_id(&self) -> Option<burn::module::ParamId> {
        match self {
            Self::Linear(_) | Self::Norm(_) => None,
            Self::Conv(c) => c.adapter.as_ref().and_then(|a| a.mid.as_ref()).map(|m| m.weight.id),
        }
    }

    /// The attached adapter's tensors that PyTorch holds in another layout, with it: a
    /// linear LoRA's `down` (`[in, rank]` here, `[rank, in]` in torch) and `up`
    /// (`[rank, out]`, `[out, rank]`), as burn's `Linear` keeps its weight `[in, out]`;
    /// a convolution's full LoKr `lokr_w2` and LyCORIS' Tucker cores (2-d here, 4-d in
    /// LyCORIS). For
    /// [`crate::optim::FlatAdamW::with_torch_layouts`].
    pub fn torch_layouts(&self) -> Vec<(burn::module::ParamId, crate::optim::TorchLayout)> {
        use crate::optim::TorchLayout;
        let mut out = Vec::new();
        if let Self::Linear(l) = self && let Some(a) = &l.adapter {
            out.extend([(a.down.weight.id, TorchLayout::Transposed), (a.up.weight.id, TorchLayout::Transposed)]);
        }
        if let Some(a) = self.lycoris_adapter() {
            for (p, shape) in a.factors.iter().zip(a.torch_shapes()) {
                if p.dims().as_slice() != shape.as_slice() {
                    out.push((p.id, TorchLayout::Reshaped(shape)));
                }
            }
        }
        out
    }

    /// The parameter id of the attached adapter's DoRA magnitude (a LoRA's or a LyCORIS
    /// adapter's); `None` without a DoRA adapter.
    pub fn magnitude_param_id(&self) -> Option<burn::module::ParamId> {
        if let Some(m) = self.lycoris_adapter().and_then(|a| a.magnitude.as_ref()) {
            return Some(m.id);
        }
        match self {
            Self::Linear(l) => l.adapter.as_ref().and_then(|a| a.magnitude.as_ref()).map(|m| m.id),
            Self::Conv(c) => c.adapter.as_ref().and_then(|a| a.magnitude.as_ref()).map(|m| m.id),
            Self::Norm(_) => None,
        }
    }

    /// Whether the layer is a convolution.
    pub fn is_conv(&self) -> bool {
        matches!(self, Self::Conv(_))
    }

    /// Whether the layer is a norm (GroupNorm or LayerNorm), which takes LyCORIS' norm
    /// module only.
    pub fn is_norm(&self) -> bool {
        matches!(self, Self::Norm(_))
    }

    /// The kernel size `[kh, kw]`: `[1, 1]` for a linear layer. kohya gives layers with a
    /// larger kernel their own rank (`conv_dim`); 1x1 convolutions count as linear.
    pub fn kernel_size(&self) -> [usize; 2] {
        match self {
            Self::Linear(_) | Self::Norm(_) => [1, 1],
            Self::Conv(c) => c.base.kernel_size,
        }
    }
}

/// A LyCORIS tensor's shape as weights are checked against an attached adapter: 2-d, the
/// trailing dimensions in the columns (a file may keep a convolution's kernel flattened or
/// not; the adapter's own tensors are compared in PyTorch's shapes, flattened alike).
fn flat(shape: &[usize]) -> Vec<usize> {
    shape.first().map(|&rows| vec![rows, shape.iter().product::<usize>() / rows.max(1)]).unwrap_or_default()
}

/// An attached LyCORIS adapter as [`LoraSiteMut::load_weights`] checks weights against it.
struct AttachedLycoris {
    algo: crate::Algo,
    rank: Option<usize>,
    /// Each factor's name and PyTorch shape, flattened to 2-d ([`flat`]).
    shapes: Vec<(&'static str, Vec<usize>)>,
    module_dropout: f64,
    /// LyCORIS' rank dropout and whether it scales.
    rank_dropout: (f64, bool),
    /// Whether it has DoRA's magnitude.
    dora: bool,
    /// Whether it has LyCORIS' trained scalar.
    scalar: bool,
    /// Whether an (IA)³'s scale is per input channel.
    ia3_on_input: bool,
}

/// A model (component) whose adapter-capable layers can be visited by module path.
pub trait LoraSites<B: Backend> {
    /// The component these sites belong to (keys of adapter files are per component).
    fn component(&self) -> Component;

    /// Calls `f` with the dotted module path and a view of every adapter-capable layer.
    fn visit_lora_sites(&mut self, f: &mut dyn FnMut(&str, LoraSiteMut<'_, B>));
}

/// The module paths of all sites.
pub fn site_paths<B: Backend>(model: &mut impl LoraSites<B>) -> Vec<String> {
    let mut paths = Vec::new();
    model.visit_lora_sites(&mut |path, _| paths.push(path.to_string()));
    paths
}

/// Adds a model's site paths to a [`ModuleIndex`] under its component, with each
/// convolution's kernel ([`ModuleIndex::set_kernel`]) and each linear layer recorded as
/// such (norms are neither).
pub fn add_to_index<B: Backend>(index: &mut ModuleIndex, model: &mut impl LoraSites<B>) -> Result<()> {
    let component = model.component();
    let mut sites = Vec::new();
    model.visit_lora_sites(&mut |path, site| sites.push((path.to_string(), site.is_conv().then(|| site.kernel_size()), site.is_norm())));
    index.add(component, sites.iter().map(|(path, _, _)| path))?;
    for (path, kernel, norm) in sites {
        let key = AdapterKey::new(component, path);
        match kernel {
            Some(kernel) => index.set_kernel(key, kernel),
            None if !norm => index.set_linear(key),
            None => {}
        }
    }
    Ok(())
}

/// Attaches a fresh adapter of `config` to every site of `model` (replacing any attached
/// one); returns how many. The first site that cannot take one (a rank past the layer's
/// sides, a layer kind the algorithm does not support) is an error naming its path, and
/// the sites visited before it keep their new adapters.
///
/// Create optimizers after this: [`crate::optim::FlatAdamW::new`] trains the tensors that
/// exist when it is made.
pub fn attach_new_adapters<B: Backend>(model: &mut impl LoraSites<B>, config: &LoraConfig, device: &B::Device) -> Result<usize> {
    let mut attached = 0;
    let mut first_error = None;
    model.visit_lora_sites(&mut |path, mut site| {
        if first_error.is_some() {
            return;
        }
        match site.attach_new(config, device) {
            Ok(()) => attached += 1,
            Err(e) => first_error = Some(at_path(path, e)),
        }
    });
    first_error.map_or(Ok(attached), Err)
}

/// Removes every attached adapter of `model` (a merged one is subtracted from the weights
/// first, so the base is as before it was attached); returns how many were removed.
pub fn detach_adapters<B: Backend>(model: &mut impl LoraSites<B>) -> usize {
    for_each_adapter(model, |mut site| site.detach())
}

/// How many sites of `model` have an adapter attached.
pub fn count_adapters<B: Backend>(model: &mut impl LoraSites<B>) -> usize {
    for_each_adapter(model, |_| ())
}

/// Calls `f` on every site of `model` that has an adapter; returns how many.
fn for_each_adapter<B: Backend>(model: &mut impl LoraSites<B>, mut f: impl FnMut(LoraSiteMut<'_, B>)) -> usize {
    let mut n = 0;
    model.visit_lora_sites(&mut |_, site| {
        if site.has_adapter() {
            f(site);
            n += 1;
        }
    });
    n
}

/// `e` with the module path it happened at, where its message has no key of its own.
fn at_path(path: &str, e: LoraError) -> LoraError {
    match e {
        LoraError::InvalidConfig(m) => LoraError::InvalidConfig(format!("`{path}`: {m}")),
        LoraError::Unsupported(m) => LoraError::Unsupported(format!("`{path}`: {m}")),
        other => other,
    }
}

/// Attaches every adapter of `set` that belongs to `model`'s component, at strength
/// `multiplier`. Adapters whose path is not a site of the model are an error listing them.
/// Returns how many adapters were attached: 0 when the set holds none of this component
/// (a file with UNet and text-encoder adapters is attached to each model in turn, so
/// that is no error here; check the count where a set must apply).
pub fn attach_adapters<B: Backend>(
    model: &mut impl LoraSites<B>,
    set: &AdapterSet,
    multiplier: f32,
    device: &B::Device,
) -> Result<usize> {
    let component = model.component();
    let mut attached = 0;
    let mut first_error = None;
    let mut seen = std::collections::HashSet::new();
    model.visit_lora_sites(&mut |path, mut site| {
        if first_error.is_some() {
            return;
        }
        let key = AdapterKey::new(component, path);
        if let Some(weights) = set.get(&key) {
            seen.insert(key.clone());
            let result = site.attach_weights(weights, &key.to_string(), device).map(|()| {
                site.set_multiplier(multiplier);
            });
            match result {
                Ok(()) => attached += 1,
                Err(e) => first_error = Some(e),
            }
        }
    });
    if let Some(e) = first_error {
        return Err(e);
    }
    let unknown = unvisited(set, component, &seen);
    if !unknown.is_empty() {
        return Err(LoraError::UnknownKeys {
            path: "<adapter set>".into(),
            count: unknown.len(),
            first: unknown.into_iter().take(5).collect(),
        });
    }
    Ok(attached)
}

/// Loads the weights of `set`'s adapters into the adapters attached to `model` (its
/// component's part of the set), to continue training from an existing LoRA (kohya's
/// `--network_weights`): each takes the set's weights and scale (`alpha / rank`) and keeps
/// its dropout. An adapter of the set without an attached adapter of the same rank is an
/// error naming it (the set's adapters outside the trained targets would be lost); attached
/// adapters the set lacks keep their values, and their paths are returned.
///
/// ```
/// use burn::backend::Flex;
/// use burn::nn::LinearConfig;
/// use lora_core::sites::{collect_adapters, load_adapter_weights, LoraSites};
/// use lora_core::{AdapterSet, Component, LoraConfig, LoraLinear, LoraSiteMut};
///
/// struct Model { a: LoraLinear<Flex>, b: LoraLinear<Flex> }
/// impl LoraSites<Flex> for Model {
///     fn component(&self) -> Component { Component::Unet }
///     fn visit_lora_sites(&mut self, f: &mut dyn FnMut(&str, LoraSiteMut<'_, Flex>)) {
///         f("a", LoraSiteMut::Linear(&mut self.a));
///         f("b", LoraSiteMut::Linear(&mut self.b));
///     }
/// }
/// let device = Default::default();
/// let layer = || LoraLinear::new(LinearConfig::new(8, 8).init(&device));
/// let (mut trained, mut fresh) = (Model { a: layer(), b: layer() }, Model { a: layer(), b: layer() });
/// trained.a.attach_new(&LoraConfig::new(4).with_alpha(2.0), &device)?;
/// fresh.a.attach_new(&LoraConfig::new(4).with_dropout(0.1), &device)?;
/// fresh.b.attach_new(&LoraConfig::new(4), &device)?;
/// let mut set = AdapterSet::new();
/// collect_adapters(&mut trained, &mut set)?;
/// let kept = load_adapter_weights(&mut fresh, &set, &device)?;
/// assert_eq!(kept, ["b"], "b has no weights in the set: it keeps its own");
/// let a = fresh.a.adapter.as_ref().unwrap();
/// assert_eq!((a.scale, a.dropout.prob), (0.5, 0.1), "the set's scale, the attached dropout");
/// # Ok::<(), lora_core::LoraError>(())
/// ```
pub fn load_adapter_weights<B: Backend>(model: &mut impl LoraSites<B>, set: &AdapterSet, device: &B::Device) -> Result<Vec<String>> {
    let component = model.component();
    let mut kept = Vec::new();
    let mut first_error = None;
    let mut seen = std::collections::HashSet::new();
    model.visit_lora_sites(&mut |path, mut site| {
        let key = AdapterKey::new(component, path);
        match set.get(&key) {
            Some(weights) if first_error.is_none() => {
                seen.insert(key.clone());
                if let Err(e) = site.load_weights(weights, &key.to_string(), device) {
                    first_error = Some(e);
                }
            }
            None if site.has_adapter() => kept.push(path.to_string()),
            _ => {}
        }
    });
    if let Some(e) = first_error {
        return Err(e);
    }
    let unknown = unvisited(set, component, &seen);
    if !unknown.is_empty() {
        return Err(LoraError::Unsupported(format!(
            "{} adapter(s) of the weights have no attached adapter to load into (are they outside the trained targets?), e.g. {}",
            unknown.len(),
            unknown.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(kept)
}

/// The keys of `set`'s adapters of `component` that a visit of the model's sites did not
/// reach (`seen`).
fn unvisited(set: &AdapterSet, component: Component, seen: &std::collections::HashSet<AdapterKey>) -> Vec<String> {
    set.iter().map(|(k, _)| k).filter(|k| k.component == component && !seen.contains(*k)).map(|k| k.to_string()).collect()
}

/// Collects the adapters attached to `model` into `set` (for saving a trained LoRA).
pub fn collect_adapters<B: Backend>(model: &mut impl LoraSites<B>, set: &mut AdapterSet) -> Result<usize> {
    let component = model.component();
    let mut found = Vec::new();
    model.visit_lora_sites(&mut |path, site| {
        let key = AdapterKey::new(component, path);
        if let Some(w) = site.named_weights(&key.to_string()) {
            found.push((key, w));
        }
    });
    let n = found.len();
    for (key, weights) in found {
        set.insert(key, weights?)?;
    }
    Ok(n)
}

/// Draws the chunk each DyLoRA adapter of `model` trains in its next training pass
/// ([`crate::dylora::DyLora::draw`], from a generator seeded with `seed`) and records it
/// for both its tensors in `trained` (for
/// [`crate::optim::FlatAdamW::restrict_to_chunks`]); returns how many adapters drew.
pub fn draw_dylora_chunks<B: Backend>(
    model: &mut impl LoraSites<B>,
    seed: u64,
    trained: &mut crate::dylora::TrainedChunks,
) -> usize {
    use rand::SeedableRng;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let rng = &mut rng;
    let mut n = 0;
    model.visit_lora_sites(&mut |_, mut site| {
        let (Some(d), Some(rank)) = (site.dylora(), site.lora_rank()) else {
            return;
        };
        let chunk = crate::dylora::DyLora::draw(rank, d.unit, rng);
        site.set_dylora_chunk(Some(chunk));
        for (id, _) in site.dylora_rank_chunks() {
            trained.insert(id, chunk);
        }
        n += 1;
    });
    n
}

/// Clears the drawn chunk of every DyLoRA adapter of `model`: they act as the plain LoRAs
/// they save as (for validation, samples, saving).
pub fn clear_dylora_chunks<B: Backend>(model: &mut impl LoraSites<B>) {
    model.visit_lora_sites(&mut |_, mut site| site.set_dylora_chunk(None));
}

/// Folds every attached adapter into its base weights at its strength, keeping the
/// adapters (so that [`unmerge_adapters`] restores the base); returns how many adapters
/// `model` has. A merged model runs at the base model's cost, e.g. for inference.
///
/// ```
/// use burn::backend::Flex;
/// use burn::nn::LinearConfig;
/// use burn::tensor::Tensor;
/// use lora_core::sites::{merge_adapters, unmerge_adapters, LoraSites};
/// use lora_core::{Component, LoraConfig, LoraLinear, LoraSiteMut};
///
/// struct Model { fc: LoraLinear<Flex> }
/// impl LoraSites<Flex> for Model {
///     fn component(&self) -> Component { Component::Unet }
///     fn visit_lora_sites(&mut self, f: &mut dyn FnMut(&str, LoraSiteMut<'_, Flex>)) {
///         f("fc", LoraSiteMut::Linear(&mut self.fc));
///     }
/// }
/// let device = Default::default();
/// let mut model = Model { fc: LoraLinear::new(LinearConfig::new(4, 4).init(&device)) };
/// model.fc.attach_new(&LoraConfig::new(2).with_init_seed(Some(7)), &device)?;
/// model.fc.adapter.as_mut().unwrap().up.weight = burn::module::Param::from_tensor(Tensor::ones([2, 4], &device));
/// let x = Tensor::<Flex, 2>::ones([1, 4], &device);
/// let unmerged = model.fc.forward(x.clone());
/// let base = model.fc.base.weight.val();
/// assert_eq!(merge_adapters(&mut model), 1);
/// assert!(model.fc.is_merged());
/// model.fc.forward(x).into_data().assert_approx_eq::<f32>(&unmerged.into_data(), Default::default());
/// unmerge_adapters(&mut model);
/// model.fc.base.weight.val().into_data().assert_approx_eq::<f32>(&base.into_data(), Default::default());
/// # Ok::<(), lora_core::LoraError>(())
/// ```
pub fn merge_adapters<B: Backend>(model: &mut impl LoraSites<B>) -> usize {
    for_each_adapter(model, |mut site| site.merge_in_place())
}

/// Undoes [`merge_adapters`]: subtracts every merged adapter from its base weights again
/// (up to rounding; exactly for DoRA and OFT, whose base is kept); returns how many
/// adapters `model` has.
pub fn unmerge_adapters<B: Backend>(model: &mut impl LoraSites<B>) -> usize {
    for_each_adapter(model, |mut site| site.unmerge_in_place())
}

/// Folds every attached adapter into its base weights and drops the adapters; returns how
/// many were baked. The model then holds plain merged weights (e.g. to save a checkpoint).
pub fn bake_adapters<B: Backend>(model: &mut impl LoraSites<B>) -> usize {
    for_each_adapter(model, |mut site| site.bake())
}
