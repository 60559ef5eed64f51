//! LyCORIS' (IA)³ (`algo=ia3`, "infused adapter by inhibiting and amplifying inner
//! activations", Liu et al. 2022), as LyCORIS' `IA3Module` trains it and A1111 applies it.
//!
//! One trained value per output channel of a layer (or, with `on_input`, per input
//! channel) scales its weight: at strength `m`, `W' = W ⊙ (1 + m · w)` along the outputs
//! (each output's row) or the inputs (each input channel's columns, every kernel position),
//! so the layer's output (before the bias, as LyCORIS' default pass leaves the bias alone)
//! or its input is rescaled per channel. `w` starts at zero: a fresh adapter changes
//! nothing. There is no rank or alpha. Since the update `m · W ⊙ w` depends on the base
//! weight, an (IA)³ has no plain-LoRA form ([`crate::Algo::depends_on_base`]). LyCORIS'
//! files hold `weight` (`[channels]`, a convolution's `[1, channels, 1, 1]`) and `on_input`
//! (a scalar, 1 when the scale is per input; LyCORIS writes it as int64, kohya's
//! `save_precision` as a float) per module, with no `alpha`.

use burn::prelude::Backend;
use burn::tensor::Tensor;

use crate::{Algo, HostTensor, LoraError, LoraWeights, LycorisWeights, Result};

/// The LyCORIS name of the trained scale.
pub const WEIGHT: &str = "weight";
/// The LyCORIS name of the flag that says the scale is per input channel.
pub const ON_INPUT: &str = "on_input";

/// An (IA)³'s tensors, checked (see [`check_tensors`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ia3Shape {
    /// The number of channels scaled (the layer's inputs or outputs).
    pub channels: usize,
    /// Whether they are the inputs.
    pub on_input: bool,
    /// Whether the file's `weight` is a convolution's (`[1, channels, 1, 1]`).
    pub conv: bool,
}

/// The update `m · W ⊙ w` of a base weight `w_base` (burn's layout: a linear layer's
/// `[in, out]` as `D = 2`, a convolution's `[out, in, kh, kw]` as `D = 4`) by the scale
/// `scale` `[channels]`, per input channel when `on_input`; differentiable in `scale`.
///
/// ```
/// use burn::backend::Flex;
/// use burn::tensor::Tensor;
/// let device = Default::default();
/// // A linear layer, 2 in, 3 out (burn's [in, out]); a scale per output.
/// let w = Tensor::<Flex, 2>::from_floats([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], &device);
/// let s = Tensor::<Flex, 1>::from_floats([0.5, 0.0, -1.0], &device);
/// let delta = lora_core::ia3::delta(w, s, false, 2.0);
/// assert_eq!(delta.into_data().to_vec::<f32>().unwrap(), vec![1.0, 0.0, -6.0, 4.0, 0.0, -12.0]);
/// ```
pub fn delta<B: Backend, const D: usize>(w_base: Tensor<B, D>, scale: Tensor<B, 1>, on_input: bool, multiplier: f32) -> Tensor<B, D> {
    let channels = scale.dims()[0];
    // The channel's axis in burn's layouts: a linear weight is `[in, out]`, a
    // convolution's `[out, in, kh, kw]`.
    let axis = match (D == 2, on_input) {
        (true, true) | (false, false) => 0,
        (true, false) | (false, true) => 1,
    };
    let mut shape = [1; D];
    shape[axis] = channels;
    w_base * scale.reshape(shape).mul_scalar(multiplier)
}

/// Checks an (IA)³'s tensors `l` (`weight`, then `on_input` 0 or 1, one value) and returns
/// what they hold; `key` names the adapter in errors.
pub fn check_tensors(l: &LycorisWeights, key: &str) -> Result<Ia3Shape> {
    let bad = |reason: String| LoraError::ShapeMismatch { key: key.into(), reason };
    let [(w_name, weight), (flag_name, flag)] = l.tensors.as_slice() else {
        return Err(bad(format!("an (IA)³ has `{WEIGHT}` and `{ON_INPUT}`, found {:?}", l.tensors.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>())));
    };
    if l.algo != Algo::Ia3 || w_name != WEIGHT || flag_name != ON_INPUT {
        return Err(bad(format!("an (IA)³ has `{WEIGHT}` and `{ON_INPUT}`, found `{w_name}` and `{flag_name}`")));
    }
    let on_input = match flag.data.as_slice() {
        [v] if *v == 0.0 => false,
        [v] if *v == 1.0 => true,
        other => return Err(bad(format!("`{ON_INPUT}` must be one value, 0 or 1; found {other:?}"))),
    };
    let channels = weight.shape.iter().product::<usize>();
    let conv = match weight.shape.as_slice() {
        [_] => false,
        [1, _, 1, 1] => true,
        other => return Err(bad(format!("`{WEIGHT}` is {other:?}; one value per channel expected ([channels], or [1, channels, 1, 1] for a convolution)"))),
    };
    if channels == 0 || weight.data.len() != channels {
        return Err(bad(format!("`{WEIGHT}` has {} values for shape {:?}", weight.data.len(), weight.shape)));
    }
    Ok(Ia3Shape { channels, on_input, conv })
}

/// An (IA)³ as [`LoraWeights`]: its `weight` and `on_input` flag (LyCORIS' names and
/// shapes) in [`LoraWeights::lycoris`] beside an empty plain form (rank 0; the side the
/// scale is on has its channels, the other side 0, as a file does not say it), checked;
/// `key` names it in errors.
///
/// ```
/// use lora_core::{ia3, HostTensor};
/// let weight = HostTensor::new(vec![8], vec![0.1; 8])?;
/// let w = ia3::weights(weight.clone(), HostTensor::new(vec![], vec![1.0])?, "k")?;
/// assert!(w.depends_on_base() && w.in_features() == 8);
/// assert!(ia3::weights(weight, HostTensor::new(vec![], vec![2.0])?, "k").is_err());
/// # Ok::<(), lora_core::LoraError>(())
/// ```
pub fn weights(weight: HostTensor, on_input: HostTensor, key: &str) -> Result<LoraWeights> {
    let lycoris = LycorisWeights { algo: Algo::Ia3, tensors: vec![(WEIGHT.into(), weight), (ON_INPUT.into(), on_input)], alpha: 1.0 };
    let shape = check_tensors(&lycoris, key)?;
    let (input, out) = if shape.on_input { (shape.channels, 0) } else { (0, shape.channels) };
    let (down, up) = if shape.conv { (vec![0, input, 1, 1], vec![out, 0, 1, 1]) } else { (vec![0, input], vec![out, 0]) };
    LoraWeights::base_relative(down, up, lycoris, key)
}

/// Checks an (IA)³'s [`LoraWeights`] (see [`weights`]); `key` names it in errors.
pub(crate) fn validate(w: &LoraWeights, key: &str) -> Result<()> {
    let bad = |reason: String| LoraError::ShapeMismatch { key: key.into(), reason };
    let Some(l) = w.lycoris.as_ref().filter(|l| l.algo == Algo::Ia3) else {
        return Err(bad("not an (IA)³".into()));
    };
    let shape = check_tensors(l, key)?;
    let (input, out) = if shape.on_input { (shape.channels, 0) } else { (0, shape.channels) };
    let rank_of = |s: &[usize], i: usize| s.get(i).copied();
    if rank_of(&w.down.shape, 0) != Some(0) || rank_of(&w.up.shape, 1) != Some(0) || w.magnitude.is_some() {
        return Err(bad("an (IA)³'s plain form must be empty (rank 0) and it has no DoRA magnitude".into()));
    }
    if rank_of(&w.down.shape, 1) != Some(input) || rank_of(&w.up.shape, 0) != Some(out) {
        return Err(bad(format!("an (IA)³ of {} {} channels has the plain form down {:?}, up {:?}", shape.channels, if shape.on_input { "input" } else { "output" }, w.down.shape, w.up.shape)));
    }
    Ok(())
}
