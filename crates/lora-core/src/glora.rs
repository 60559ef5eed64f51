//! LyCORIS' GLoRA (`algo=glora`, generalized LoRA, Chavan et al. 2023, as LyCORIS'
//! `GLoRAModule` trains it and ComfyUI applies it; A1111 applies only its layout before 2.0).
//!
//! A layer with weight `W [out, in·kh·kw]` becomes `W + s · (W ⊗ A + B)` with
//!
//! - `A = a1 · a2`, `a1 [in, r]`, `a2 [r, in]`: a low-rank map of the input channels,
//!   applied to `W` along them (`(W ⊗ A)[o, j, h, w] = Σᵢ W[o, i, h, w] · A[i, j]`; for a
//!   linear layer simply `W · a1 · a2`), so that the layer sees `x + A·x`;
//! - `B = b1 · b2`, `b1 [out, r]`, `b2 [r, in·kh·kw]`: a LoRA;
//! - `s = alpha / r` (`alpha / sqrt(r)` with rsLoRA), times the strength, and LyCORIS'
//!   trained scalar if any.
//!
//! `a1` and `b1` start Kaiming-uniform, `a2` and `b2` at zero (with a scalar: all four
//! random and the scalar at zero), so a fresh adapter changes nothing. Since `W ⊗ A`
//! depends on the base weight, a GLoRA has no plain-LoRA form
//! ([`crate::Algo::depends_on_base`]). LyCORIS' files hold `a1.weight`, `a2.weight`,
//! `b1.weight`, `b2.weight` and `alpha` per module (a convolution's `a1`, `a2`, `b1` as
//! 1x1 kernels, `b2` with the layer's kernel), its scalar folded into `a2` and `b2`.
//!
//! LyCORIS before 2.0 wrote the same update with the roles swapped: `a1 [r, in]`,
//! `a2 [in, r]`, `b1 [r, in·k]`, `b2 [out, r]`, its update `W · a2 · a1 + b2 · b1`, which
//! ComfyUI and A1111 still read. [`weights`] reads such a file as the current layout
//! (`a1` ↔ `a2`, `b1` ↔ `b2`: the same update) where its shapes say so: they chain
//! through the rank the old way and not the current one, or, on a square layer where
//! both fit, the old way gives the smaller rank (ComfyUI tells them apart by the layer's
//! width, which comes to the same). On a convolution with a kernel larger than 1x1 the old `W · a2` mixed the
//! kernel positions too, which no reader applies: an error.

use burn::prelude::Backend;
use burn::tensor::Tensor;

use crate::{Algo, HostTensor, LoraError, LoraWeights, LycorisWeights, Result};

/// The LyCORIS names of GLoRA's tensors, in the order LyCORIS writes them.
pub const NAMES: [&str; 4] = ["a1.weight", "a2.weight", "b1.weight", "b2.weight"];

/// The shapes a GLoRA's tensors were found to have: the layer's outputs, inputs and
/// kernel `[kh, kw]` (`None` for a linear layer), and the rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GloraShape {
    /// Outputs (`b1`'s rows).
    pub out: usize,
    /// Input channels (`a1`'s rows).
    pub input: usize,
    /// A convolution's kernel (`b2`'s last two dimensions); `None` for a linear layer.
    pub kernel: Option<[usize; 2]>,
    /// The rank (`a2`'s rows, as ComfyUI reads it).
    pub rank: usize,
}

/// GLoRA's unscaled update `W ⊗ a1 a2 + b1 b2` `[out, in·k]` of a base weight `w`
/// `[out, in·k]` (PyTorch's layout, the kernel flattened), from the factors kept 2-d
/// (`a1 [in, r]`, `a2 [r, in]`, `b1 [out, r]`, `b2 [r, in·k]`); differentiable in all.
///
/// ```
/// use burn::backend::Flex;
/// use burn::tensor::Tensor;
/// let device = Default::default();
/// // A 1-in, 1-out layer with W = 2, a1 a2 = 0.5, b1 b2 = 3: ΔW = 2 · 0.5 + 3.
/// let t = |v: f32| Tensor::<Flex, 2>::from_floats([[v]], &device);
/// let delta = lora_core::glora::delta(t(0.5), t(1.0), t(3.0), t(1.0), t(2.0));
/// assert_eq!(delta.into_data().to_vec::<f32>().unwrap(), vec![4.0]);
/// ```
pub fn delta<B: Backend>(a1: Tensor<B, 2>, a2: Tensor<B, 2>, b1: Tensor<B, 2>, b2: Tensor<B, 2>, w: Tensor<B, 2>) -> Tensor<B, 2> {
    let [out, cols] = w.dims();
    let input = a1.dims()[0];
    let k = cols / input.max(1);
    // `W · a1` first: `[out·k, r]`, never the `[in, in]` product.
    let wa = if k == 1 {
        w.matmul(a1).matmul(a2)
    } else {
        // The input channels last: `[out·k, in]`, one row per output and kernel position.
        let rows: Tensor<B, 3> = w.reshape([out, input, k]).swap_dims(1, 2);
        let mixed = rows.reshape([out * k, input]).matmul(a1).matmul(a2);
        mixed.reshape([out, k, input]).swap_dims(1, 2).reshape([out, cols])
    };
    wa + b1.matmul(b2)
}

/// Checks a GLoRA's tensors `l` (their names, values and shapes against each other) and
/// returns the layer they fit; `key` names the adapter in errors.
pub fn check_tensors(l: &LycorisWeights, key: &str) -> Result<GloraShape> {
    let bad = |reason: String| LoraError::ShapeMismatch { key: key.into(), reason };
    let names: Vec<&str> = l.tensors.iter().map(|(n, _)| n.as_str()).collect();
    if l.algo != Algo::Glora || names != NAMES {
        return Err(bad(format!("a GLoRA has {NAMES:?}, found {names:?}")));
    }
    let [a1, a2, b1, b2] = [0, 1, 2, 3].map(|i| &l.tensors[i].1);
    for (name, t) in NAMES.iter().zip([a1, a2, b1, b2]) {
        if t.data.len() != t.shape.iter().product::<usize>() {
            return Err(bad(format!("`{name}` has {} values for shape {:?}", t.data.len(), t.shape)));
        }
        if !matches!(t.shape.len(), 2 | 4) || t.shape.contains(&0) {
            return Err(bad(format!("`{name}` is {:?}; 2-d (a linear layer) or 4-d (a convolution) with no empty dimension expected", t.shape)));
        }
        if t.shape.len() != b2.shape.len() {
            return Err(bad(format!("`{name}` is {:?} but `b2.weight` is {:?}: a GLoRA is all linear (2-d) or all convolution (4-d)", t.shape, b2.shape)));
        }
        if name != &"b2.weight" && t.shape.len() == 4 && t.shape[2..] != [1, 1] {
            return Err(bad(format!("`{name}` is {:?}; GLoRA's `a1`, `a2` and `b1` are 1x1 kernels", t.shape)));
        }
    }
    let (input, rank, out) = (a1.shape[0], a2.shape[0], b1.shape[0]);
    let want = [("a1.weight", a1, [input, rank]), ("a2.weight", a2, [rank, input]), ("b1.weight", b1, [out, rank]), ("b2.weight", b2, [rank, input])];
    if let Some((name, t, w)) = want.iter().find(|(_, t, w)| t.shape[..2] != w[..]) {
        return Err(bad(format!(
            "`{name}` is {:?}, [{}, {}] expected: GLoRA's `a1` is [in, r], `a2` [r, in], `b1` [out, r] and `b2` [r, in, …] (the file's `a1.weight` {:?} and `a2.weight` {:?} give in = {input}, r = {rank}; LyCORIS' layout before 2.0 reads where all four fit it)",
            t.shape, w[0], w[1], a1.shape, a2.shape
        )));
    }
    let kernel = (b2.shape.len() == 4).then(|| [b2.shape[2], b2.shape[3]]);
    Ok(GloraShape { out, input, kernel, rank })
}

/// A GLoRA as [`LoraWeights`]: its tensors (LyCORIS' names and shapes, [`NAMES`]) in
/// [`LoraWeights::lycoris`] beside an empty plain form (rank 0: no plain LoRA has its
/// update), checked; `alpha` is the file's (`None`: the one that gives a scale of 1, as
/// ComfyUI reads a file without one); `key` names it in errors.
///
/// ```
/// use lora_core::{glora, HostTensor};
/// let t = |shape: Vec<usize>| HostTensor::new(shape.clone(), vec![0.1; shape.iter().product()]).unwrap();
/// let tensors = vec![t(vec![6, 2]), t(vec![2, 6]), t(vec![8, 2]), t(vec![2, 6])];
/// let w = glora::weights(tensors, Some(1.0), "k")?;
/// assert!(w.depends_on_base() && w.rank() == 0);
/// assert_eq!(w.lycoris.as_ref().unwrap().scale(), 0.5);
/// assert!(glora::weights(vec![t(vec![6, 2]), t(vec![3, 6]), t(vec![8, 2]), t(vec![2, 6])], None, "k").is_err());
/// # Ok::<(), lora_core::LoraError>(())
/// ```
pub fn weights(mut tensors: Vec<HostTensor>, alpha: Option<f32>, key: &str) -> Result<LoraWeights> {
    if tensors.len() != NAMES.len() {
        return Err(LoraError::ShapeMismatch { key: key.into(), reason: format!("a GLoRA has 4 tensors ({NAMES:?}), got {}", tensors.len()) });
    }
    if old_layout(&tensors) {
        if tensors[2].shape.len() == 4 && tensors[2].shape[2..] != [1, 1] {
            return Err(LoraError::Unsupported(format!(
                "`{key}` is a GLoRA in LyCORIS' layout before 2.0 (`a1.weight` {:?}, `b1.weight` {:?}) on a convolution with a {}x{} kernel, whose update no reader applies; retrain it with a current LyCORIS",
                tensors[0].shape, tensors[2].shape, tensors[2].shape[2], tensors[2].shape[3]
            )));
        }
        // The same update in the current layout.
        tensors.swap(0, 1);
        tensors.swap(2, 3);
    }
    let rank = tensors[1].shape.first().copied().unwrap_or(0);
    let tensors = NAMES.iter().map(|n| n.to_string()).zip(tensors).collect();
    let mut lycoris = LycorisWeights { algo: Algo::Glora, tensors, alpha: alpha.unwrap_or(0.0) };
    let shape = check_tensors(&lycoris, key)?;
    if alpha.is_none() {
        lycoris.alpha = rank as f32;
    }
    let (down, up) = match shape.kernel {
        Some([kh, kw]) => (vec![0, shape.input, kh, kw], vec![shape.out, 0, 1, 1]),
        None => (vec![0, shape.input], vec![shape.out, 0]),
    };
    LoraWeights::base_relative(down, up, lycoris, key)
}

/// Whether `[a1, a2, b1, b2]` are in LyCORIS' layout before 2.0 (see the
/// [module docs](self)), as ComfyUI tells it: their shapes chain through one rank as
/// `a1 [r, in]`, `a2 [in, r]`, `b1 [r, …]`, `b2 [out, r]`, and not as a current GLoRA's
/// (`a1 [in, r]`, …) unless that reading's rank is the larger: a square layer fits both,
/// `a1 [p, q]` being rank `p` of width `q` the old way and rank `q` of width `p` now.
fn old_layout(t: &[HostTensor]) -> bool {
    let dims = |i: usize| t[i].shape.get(..2).map(|d| (d[0], d[1]));
    let (Some(a1), Some(a2), Some(b1), Some(b2)) = (dims(0), dims(1), dims(2), dims(3)) else { return false };
    let old = a1.0 == a2.1 && a2.1 == b1.0 && b1.0 == b2.1;
    let current = a1.1 == a2.0 && a2.0 == b1.1 && b1.1 == b2.0;
    old && (!current || a1.0 < a1.1)
}

/// Checks a GLoRA's [`LoraWeights`] (see [`weights`]); `key` names it in errors.
pub(crate) fn validate(w: &LoraWeights, key: &str) -> Result<()> {
    let bad = |reason: String| LoraError::ShapeMismatch { key: key.into(), reason };
    let Some(l) = w.lycoris.as_ref().filter(|l| l.algo == Algo::Glora) else {
        return Err(bad("not a GLoRA".into()));
    };
    let shape = check_tensors(l, key)?;
    let (down, up) = (&w.down.shape, &w.up.shape);
    let kernel = if down.len() == 4 { Some([down[2], down[3]]) } else { None };
    if down.first() != Some(&0) || up.get(1) != Some(&0) || w.magnitude.is_some() {
        return Err(bad("a GLoRA's plain form must be empty (rank 0) and it has no DoRA magnitude".into()));
    }
    if down.get(1) != Some(&shape.input) || up.first() != Some(&shape.out) || kernel != shape.kernel {
        return Err(bad(format!("a GLoRA of a {}→{} layer (kernel {:?}) has the plain form down {down:?}, up {up:?}", shape.input, shape.out, shape.kernel)));
    }
    if !l.alpha.is_finite() {
        return Err(bad(format!("alpha must be finite, got {}", l.alpha)));
    }
    Ok(())
}
