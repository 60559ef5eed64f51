//! LyCORIS' full fine-tuning (`algo=full`, its `FullModule`; the kohya_ss GUI's
//! "LyCORIS/Native Fine-Tuning"), as LyCORIS trains it and ComfyUI and A1111 apply it.
//!
//! The layer's whole weight and bias are trained. LyCORIS trains a copy of them,
//! `W' = W + ΔW` and `b' = b + Δb`, and saves the differences: `diff = W' − W` (the
//! weight's shape, `[out, in]` or `[out, in, kh, kw]`) and `diff_b = b' − b` (`[out]`,
//! where the layer has a bias). Here the differences themselves are the trained tensors,
//! starting at zero: the outputs and the gradients are LyCORIS', and a fresh adapter
//! changes nothing. Readers apply a file at strength `m` as `W + m · diff` and
//! `b + m · diff_b` (ComfyUI, A1111), as the layers here do. There is no rank and no alpha
//! (LyCORIS writes none). A bias's update is not a weight's, so a full adapter has no
//! plain-LoRA form ([`crate::Algo::stands_alone`]): it is merged into its own layer, never
//! combined with another file's adapter on that layer or written as PEFT; resizing
//! ([`crate::resize`]) turns it into a LoRA of the weight's update alone.
//!
//! One difference in training: an optimizer's weight decay acts on the trained tensors,
//! so here it pulls `ΔW` toward zero (the layer toward its base weight), where LyCORIS'
//! pulls the whole weight `W + ΔW` toward zero. With AdamW's decoupled decay the two
//! differ by `lr · wd · W` per step (a thousandth of the weight after 1000 steps at a
//! learning rate of 1e-4 and a decay of 0.01); Adafactor's relative step with
//! `scale_parameter` likewise sizes its steps by the difference's RMS here, by the
//! weight's in LyCORIS.

use crate::{Algo, HostTensor, LoraError, LoraWeights, LycorisWeights, Result};

/// The LyCORIS name of the weight's difference.
pub const DIFF: &str = "diff";
/// The LyCORIS name of the bias's difference.
pub const DIFF_B: &str = "diff_b";

/// A full adapter's tensors, checked (see [`check_tensors`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FullShape {
    /// The layer's outputs.
    pub out: usize,
    /// The layer's inputs.
    pub input: usize,
    /// A convolution's kernel `[kh, kw]` (`diff` is 4-d); `None` for a linear layer.
    pub kernel: Option<[usize; 2]>,
    /// Whether the bias's difference is there.
    pub bias: bool,
}

/// Checks a full adapter's tensors `l` (`diff`, then `diff_b` if any) and returns the
/// layer they fit; `key` names the adapter in errors.
pub fn check_tensors(l: &LycorisWeights, key: &str) -> Result<FullShape> {
    let bad = |reason: String| LoraError::ShapeMismatch { key: key.into(), reason };
    let names: Vec<&str> = l.tensors.iter().map(|(n, _)| n.as_str()).collect();
    if l.algo != Algo::Full || !matches!(names.as_slice(), [DIFF] | [DIFF, DIFF_B]) {
        return Err(bad(format!("a full adapter has `{DIFF}` and, for a layer with a bias, `{DIFF_B}`; found {names:?}")));
    }
    let diff = &l.tensors[0].1;
    for (name, t) in &l.tensors {
        if t.data.len() != t.shape.iter().product::<usize>() {
            return Err(bad(format!("`{name}` has {} values for shape {:?}", t.data.len(), t.shape)));
        }
    }
    let (out, input, kernel) = match diff.shape.as_slice() {
        &[out, input] => (out, input, None),
        &[out, input, kh, kw] => (out, input, Some([kh, kw])),
        other => return Err(bad(format!("`{DIFF}` is {other:?}; the layer's weight shape expected ([out, in], or [out, in, kh, kw] for a convolution)"))),
    };
    if diff.shape.contains(&0) {
        return Err(bad(format!("`{DIFF}` is {:?}, which has an empty dimension", diff.shape)));
    }
    if let Some((_, b)) = l.tensors.get(1) && b.shape != [out] {
        return Err(bad(format!("`{DIFF_B}` is {:?}, one value per output ([{out}]) expected", b.shape)));
    }
    Ok(FullShape { out, input, kernel, bias: l.tensors.len() == 2 })
}

/// A full adapter as [`LoraWeights`]: its `diff` and `diff_b` (LyCORIS' names and shapes)
/// in [`LoraWeights::lycoris`] beside an empty plain form (rank 0), checked; `key` names
/// it in errors.
///
/// ```
/// use lora_core::{full, HostTensor};
/// let diff = HostTensor::new(vec![3, 2], vec![0.1; 6])?;
/// let w = full::weights(diff.clone(), Some(HostTensor::new(vec![3], vec![0.5; 3])?), "k")?;
/// assert!(w.stands_alone() && w.in_features() == 2 && w.rank() == 0);
/// assert!(full::weights(diff, Some(HostTensor::new(vec![2], vec![0.5; 2])?), "k").is_err(), "one bias value per output");
/// # Ok::<(), lora_core::LoraError>(())
/// ```
pub fn weights(diff: HostTensor, diff_b: Option<HostTensor>, key: &str) -> Result<LoraWeights> {
    let tensors = std::iter::once((DIFF.to_string(), diff)).chain(diff_b.map(|b| (DIFF_B.to_string(), b))).collect();
    // No alpha: LyCORIS writes none and the readers scale by 1.
    let lycoris = LycorisWeights { algo: Algo::Full, tensors, alpha: 1.0 };
    let shape = check_tensors(&lycoris, key)?;
    let (down, up) = plain_shapes(&shape);
    LoraWeights::base_relative(down, up, lycoris, key)
}

/// The empty plain form's `down` and `up` shapes for a layer of `shape`.
fn plain_shapes(shape: &FullShape) -> (Vec<usize>, Vec<usize>) {
    match shape.kernel {
        Some([kh, kw]) => (vec![0, shape.input, kh, kw], vec![shape.out, 0, 1, 1]),
        None => (vec![0, shape.input], vec![shape.out, 0]),
    }
}

/// Checks a full adapter's [`LoraWeights`] (see [`weights`]); `key` names it in errors.
pub(crate) fn validate(w: &LoraWeights, key: &str) -> Result<()> {
    let bad = |reason: String| LoraError::ShapeMismatch { key: key.into(), reason };
    let Some(l) = w.lycoris.as_ref().filter(|l| l.algo == Algo::Full) else {
        return Err(bad("not a full adapter".into()));
    };
    let shape = check_tensors(l, key)?;
    let (down, up) = plain_shapes(&shape);
    if w.down.shape != down || w.up.shape != up || w.magnitude.is_some() {
        return Err(bad(format!("a full adapter of a {}→{} layer has an empty plain form (down {down:?}, up {up:?}) and no DoRA magnitude; found down {:?}, up {:?}", shape.input, shape.out, w.down.shape, w.up.shape)));
    }
    Ok(())
}
