//! kohya's OFT (`networks.oft`: constrained orthogonal fine-tuning, Qiu et al. 2023),
//! LyCORIS' Diag-OFT and BOFT, held as a [`crate::LycorisAdapter`] with [`Algo::Oft`],
//! [`Algo::DiagOft`] or [`Algo::Boft`].
//!
//! The adapter trains `oft_blocks`, `[k, n, n]` for a layer with `out = k · n` outputs
//! (`k` blocks, kohya's `network_dim`). Each pass, as kohya's `OFTModule`:
//!
//! 1. `Q = P − Pᵀ` per block (skew-symmetric), scaled by `(min(‖Q‖, c) + 1e-8) / (‖Q‖ + 1e-8)`
//!    with `‖Q‖` the Frobenius norm over all blocks and the constraint `c = alpha · out`
//!    (kohya's `network_alpha`, e.g. 1e-3);
//! 2. the Cayley transform `R = (I + Q)(I − Q)⁻¹` per block (orthogonal), and at strength
//!    `m`, `R_m = m · (R − I) + I`;
//! 3. the layer's weight `W` (`[out, cols]` in PyTorch's layout, a convolution's kernel in
//!    the columns) becomes `R_mᵀ · W` block by block: output rows `b·n .. (b+1)·n` mix by
//!    block `b`. The update `ΔW = (R_m − I)ᵀ · W` depends on the base weight, so an OFT has
//!    no plain-LoRA form.
//!
//! LyCORIS' Diag-OFT (`DiagOFTModule`) computes the same rotation with three differences:
//! its `dim` sets the block size `n` by LyCORIS' [`factorization`](crate::lycoris::factorization)
//! of the outputs ([`diag_block_shape`]), its constraint (the file's `alpha`, LyCORIS'
//! `constraint` per output) may be 0 for none, and with `rescaled` a trained scale `s` per
//! output (`rescale`, starting at 1) multiplies the rotated weight: `W' = s ⊙ (R_mᵀ · W)`, so
//! `ΔW = s ⊙ ((R_m − I)ᵀ · W) + (s − 1) ⊙ W` (the strength scales the rotation only, as in
//! LyCORIS). With [`crate::LoraConfig::rank_dropout`], each training pass drops entries
//! of the scaled rotation as LyCORIS' Diag-OFT does (`torch.nn.Dropout` on `m · R`, its
//! diagonal too, before `m · I` is taken off): `ΔW = (D ⊙ (m · R) − m · I)ᵀ · W` with `D`
//! 0 for a dropped entry and `1 / (1 − p)` for a kept one ([`update_dropped`]).
//!
//! LyCORIS' BOFT (`ButterflyOFTModule`, Liu et al. 2024) trains `oft_blocks` `[m, k, n, n]`:
//! `m` stages of `k` blocks ([`butterfly_shape`]), every block's rotation `R_m` made as
//! above (one constraint over all of them). Stage `s` regroups the rows of the weight so
//! that each block mixes rows `2^s · n / 2` apart (LyCORIS' butterfly permutation), applies
//! the stage's blocks as `R_m · W` per block (not `R_mᵀ`), and puts the rows back: with
//! `log2(k) + 1` stages every output mixes with every other. The strength applies per
//! block, the scale after the last stage: `W' = s ⊙ B(W)` ([`butterfly_update`]).
//!
//! `P` starts at zero (`R = I`: the layer is unchanged). The inverse is that of
//! `A = I − Q`, whose singular values lie in `[1, sqrt(1 + c²)]` (`AᵀA = I + QᵀQ`): a
//! Newton–Schulz iteration started at `X₀ = 2 / (2 + ‖Q‖²) · Aᵀ` converges for every such
//! `A` (its residual `I − X₀A` has norm at most `c² / (2 + c²) < 1` and squares with each
//! step), so it runs, outside the autodiff graph, as many steps as the constraint needs
//! for f32 precision (without a constraint, as many as a block norm `‖Q_b‖` of
//! [`UNCONSTRAINED`] needs, which leaves it exact to f32 up to about twice that: rotations by
//! up to 2·atan(32) ≈ 176°; the start is per block, so only a block's own norm counts).
//! One more step `Y = X (2I − A X)` in the graph, with `X` detached,
//! gives `Y = A⁻¹` to that precision and the exact gradient `dY = −X dA X` of the inverse:
//! matmuls only, on any backend, with no host read.
//!
//! ```
//! use burn::backend::{Autodiff, Flex};
//! use burn::nn::LinearConfig;
//! use burn::tensor::Tensor;
//! use lora_core::{Algo, LoraConfig, LoraLinear};
//!
//! type B = Autodiff<Flex>;
//! let device = Default::default();
//! let mut layer = LoraLinear::new(LinearConfig::new(6, 8).init::<B>(&device));
//! // 4 blocks of 2 outputs each; the constraint is 1e-3 · 8.
//! layer.attach_new(&LoraConfig::new(4).with_alpha(1e-3).with_algo(Algo::Oft), &device)?;
//! let oft = layer.lycoris.as_ref().unwrap();
//! assert_eq!(oft.names(), ["oft_blocks"]);
//! assert_eq!(oft.torch_shapes(), [vec![4, 2, 2]]);
//! let x = Tensor::<B, 2>::ones([3, 6], &device);
//! // `oft_blocks` starts at zero: the layer's output is unchanged ...
//! let err: f32 = (layer.forward(x.clone()) - layer.base.forward(x.clone())).abs().max().into_scalar();
//! assert!(err < 1e-6);
//! // ... and the blocks take a gradient, the frozen weight none.
//! let grads = layer.forward(x).sum().backward();
//! assert!(oft.factors[0].grad(&grads).is_some());
//! assert!(layer.base.weight.grad(&grads).is_none());
//! # Ok::<(), lora_core::LoraError>(())
//! ```

use burn::tensor::{backend::Backend, DType, Tensor};

use crate::precision::cast_to;
use crate::{Algo, HostTensor, LoraError, LoraWeights, LycorisWeights, Result};

/// The OFT blocks' tensor name (kohya's and LyCORIS').
pub const BLOCKS: &str = "oft_blocks";

/// Diag-OFT's and BOFT's scale per output (LyCORIS' `rescaled`).
pub const RESCALE: &str = "rescale";

/// The block norm `‖Q_b‖` the inverse's steps are counted for when there is no
/// constraint (LyCORIS' Diag-OFT with constraint 0); see the [module docs](self).
pub const UNCONSTRAINED: f32 = 16.0;

/// The most Newton–Schulz steps an inverse takes (a constraint of `c` needs about
/// `log2(ln(1e-8) / ln(c² / (2 + c²)))`: 3 at `c = 0.3`, 11 at `c = 13`, 24 at `c = 1280`).
const MAX_STEPS: usize = 40;

/// The blocks `(k, n)` of a layer with `out` outputs cut into `blocks` blocks, or why it
/// cannot be (kohya's `out_dim // num_blocks`, which must divide exactly).
pub fn block_shape(out: usize, blocks: usize) -> std::result::Result<(usize, usize), String> {
    if blocks == 0 || !out.is_multiple_of(blocks) {
        return Err(format!("OFT's {blocks} blocks (its rank, kohya's network_dim) must divide the layer's {out} outputs"));
    }
    Ok((blocks, out / blocks))
}

/// Diag-OFT's blocks `(k, n)` for a layer with `out` outputs and LyCORIS' `dim` `dim`:
/// LyCORIS' `block_size, block_num = factorization(out, dim)`, so `n = dim` when it divides
/// `out` and is at most `out / dim`, otherwise the divisor pair nearest a square with
/// `n ≤ dim` (the smaller of the pair is always the block size).
///
/// ```
/// use lora_core::oft::diag_block_shape;
/// assert_eq!(diag_block_shape(320, 4), (80, 4));
/// assert_eq!(diag_block_shape(320, 64), (64, 5)); // LyCORIS swaps a pair's sides to keep n ≤ k
/// assert_eq!(diag_block_shape(12, 5), (4, 3));
/// ```
pub fn diag_block_shape(out: usize, dim: usize) -> (usize, usize) {
    let (n, k) = crate::lycoris::factorization(out, dim as i64);
    (k, n)
}

/// BOFT's blocks `(m, k, n)` for a layer with `out` outputs and LyCORIS' `dim` `dim`: `k`
/// blocks of `n` outputs in `m = log2(k) + 1` butterfly stages, with `n` the largest even
/// number of at most `dim` for which `out / n` is a power of two (LyCORIS'
/// `power2factorization`), or why there is none.
///
/// ```
/// use lora_core::oft::butterfly_shape;
/// assert_eq!(butterfly_shape(64, 8), Ok((4, 8, 8)));
/// assert_eq!(butterfly_shape(320, 10), Ok((6, 32, 10)));
/// assert!(butterfly_shape(320, 8).is_err()); // 320 = 5 · 64: no even size up to 8
/// ```
pub fn butterfly_shape(out: usize, dim: usize) -> std::result::Result<(usize, usize, usize), String> {
    // LyCORIS' power2factorization: the last even divisor `n ≤ dim` with `out / n` a power
    // of two.
    let mut blocks = 0;
    let mut n = 0;
    while n <= dim {
        n += 2;
        while !out.is_multiple_of(n) && n < out {
            n += 2;
        }
        if n > dim {
            break;
        }
        if (out / n).is_power_of_two() {
            blocks = out / n;
        }
    }
    if blocks == 0 {
        return Err(format!("BOFT cannot split the layer's {out} outputs into blocks of an even size of at most {dim} (its rank, LyCORIS' dim) whose number is a power of two"));
    }
    Ok(((blocks - 1).count_ones() as usize + 1, blocks, out / blocks))
}

/// The constraint on `‖Q‖`: `alpha · out_dim` (kohya's and LyCORIS'; 0: none).
pub fn constraint(alpha: f32, out: usize) -> f32 {
    alpha * out as f32
}

/// How many detached Newton–Schulz steps bring the inverse of `I − Q` with `‖Q‖ ≤ c` to
/// f32 precision (see the [module docs](self)).
fn newton_steps(c: f32) -> usize {
    let c2 = f64::from(c) * f64::from(c);
    let rho = c2 / (2.0 + c2);
    if rho < 1e-12 {
        return 1;
    }
    let needed = (1e-8f64.ln() / rho.ln()).max(1.0);
    (needed.log2().ceil() as usize + 1).clamp(1, MAX_STEPS)
}

/// `[k, n, n]` identities.
fn eye<B: Backend>(k: usize, n: usize, device: &B::Device) -> Tensor<B, 3> {
    let eye: Tensor<B, 2> = Tensor::eye(n, device);
    eye.unsqueeze_dim::<3>(0).repeat_dim(0, k)
}

/// The rotation `R_m = m · (R − I) + I`, `[k, n, n]` in f32, of the blocks `blocks`
/// (`[k, n, n]`, any float type) with constraint `c`, in their autodiff graph.
pub fn rotation<B: Backend>(blocks: Tensor<B, 3>, c: f32, multiplier: f32) -> Tensor<B, 3> {
    let [k, n, _] = blocks.dims();
    let i = eye::<B>(k, n, &blocks.device());
    turn(blocks, c, multiplier, &i) + i
}

/// `m · (R − I)` for the blocks `blocks` with constraint `c` (see [`rotation`]), given the
/// `[k, n, n]` identities `i`. With `Y = (I − Q)⁻¹`, `R = (I + Q) · Y = 2Y − I`, so
/// `R − I = 2 (Y − I)`: no product beyond the inverse's.
fn turn<B: Backend>(blocks: Tensor<B, 3>, c: f32, multiplier: f32, i: &Tensor<B, 3>) -> Tensor<B, 3> {
    let p = cast_to(blocks, DType::F32);
    let q = p.clone() - p.swap_dims(1, 2);
    let q = if c > 0.0 {
        // The tiny term keeps the norm's gradient finite at Q = 0 (where the ratio's is 0).
        let norm = q.clone().powi_scalar(2).sum().add_scalar(1e-20).sqrt();
        let ratio = norm.clone().clamp_max(c).add_scalar(1e-8) / norm.add_scalar(1e-8);
        q * ratio.reshape([1, 1, 1])
    } else {
        q
    };
    let bound = if c > 0.0 { c } else { UNCONSTRAINED };
    (inverse_near_identity(q, i, bound) - i.clone()).mul_scalar(2.0 * multiplier)
}

/// `(I − Q)⁻¹` (`[k, n, n]`, f32) for skew-symmetric `Q` with `‖Q‖ ≤ c`, given the
/// identities `i`: detached Newton–Schulz steps and one in the graph (see the
/// [module docs](self)).
fn inverse_near_identity<B: Backend>(q: Tensor<B, 3>, i: &Tensor<B, 3>, c: f32) -> Tensor<B, 3> {
    let i2 = i.clone().mul_scalar(2.0);
    let a = i.clone() - q.clone();
    let fixed = a.clone().detach();
    // ‖Q_b‖² per block bounds the spectral norm² of the block's Q, which sets the starting
    // step 2 / (2 + ‖Q_b‖²) (the singular values² of A are 1 + those of Q).
    let skew = q.detach().powi_scalar(2).sum_dim(2).sum_dim(1);
    let start = skew.add_scalar(2.0).recip().mul_scalar(2.0);
    let mut x = fixed.clone().swap_dims(1, 2) * start;
    for _ in 0..newton_steps(c) {
        x = x.clone().matmul(i2.clone() - fixed.clone().matmul(x));
    }
    x.clone().matmul(i2 - a.matmul(x))
}

/// The update `(R_m − I)ᵀ · W` of a weight `weight` (`[out, cols]`, PyTorch's layout with a
/// convolution's kernel in the columns, f32, outside the graph) under the blocks `blocks`
/// (`[k, n, n]`) with constraint `c` (0: none), `[out, cols]` in f32 in the graph of the
/// blocks and of `rescale` (Diag-OFT's scale per output, `[out, 1]`): with it,
/// `s ⊙ ((R_m − I)ᵀ · W) + (s − 1) ⊙ W`.
pub fn update<B: Backend>(blocks: Tensor<B, 3>, c: f32, multiplier: f32, weight: Tensor<B, 2>, rescale: Option<Tensor<B, 2>>) -> Tensor<B, 2> {
    update_with(blocks, c, multiplier, weight, rescale, None)
}

/// [`update`] with LyCORIS' Diag-OFT rank dropout: `drop` (`[k, n, n]`, 0 for a dropped
/// entry and `1 / (1 − p)` for a kept one, as `torch.nn.Dropout(p)` leaves its input)
/// multiplies the entries of the scaled rotation `m · R` before `m · I` is taken off, as
/// LyCORIS' `rank_drop(r * scale) - scale * I` does: `(D ⊙ (m · R) − m · I)ᵀ · W`, then
/// `rescale` as in [`update`]. A dropped diagonal entry drops that row's part of the
/// weight, so the update is large where the rotation is small.
///
/// ```
/// use burn::backend::Flex;
/// use burn::tensor::Tensor;
///
/// let device = Default::default();
/// let blocks = Tensor::<Flex, 3>::zeros([2, 2, 2], &device);
/// let w = Tensor::<Flex, 2>::ones([4, 3], &device);
/// // Keeping every entry (at p = 0) is the plain update: zero for blocks at zero.
/// let kept = Tensor::<Flex, 3>::ones([2, 2, 2], &device);
/// let delta = lora_core::oft::update_dropped(blocks.clone(), 0.0, 1.0, w.clone(), None, kept);
/// assert_eq!(delta.abs().sum().into_scalar(), 0.0);
/// // Dropping every entry takes the whole weight off.
/// let dropped = Tensor::<Flex, 3>::zeros([2, 2, 2], &device);
/// let delta = lora_core::oft::update_dropped(blocks, 0.0, 1.0, w.clone(), None, dropped);
/// assert_eq!((delta + w).abs().sum().into_scalar(), 0.0);
/// ```
pub fn update_dropped<B: Backend>(blocks: Tensor<B, 3>, c: f32, multiplier: f32, weight: Tensor<B, 2>, rescale: Option<Tensor<B, 2>>, drop: Tensor<B, 3>) -> Tensor<B, 2> {
    update_with(blocks, c, multiplier, weight, rescale, Some(drop))
}

/// [`update`], with [`update_dropped`]'s mask where there is one.
fn update_with<B: Backend>(blocks: Tensor<B, 3>, c: f32, multiplier: f32, weight: Tensor<B, 2>, rescale: Option<Tensor<B, 2>>, drop: Option<Tensor<B, 3>>) -> Tensor<B, 2> {
    let [k, n, _] = blocks.dims();
    let [out, cols] = weight.dims();
    let i = eye::<B>(k, n, &blocks.device());
    let turn = turn(blocks, c, multiplier, &i);
    let turn = match drop {
        // `m · (R − I)` back to `m · R`, dropped, less `m · I`.
        Some(d) => {
            let mi = i.mul_scalar(multiplier);
            cast_to(d, DType::F32) * (turn + mi.clone()) - mi
        }
        None => turn,
    };
    let w: Tensor<B, 3> = weight.clone().reshape([k, n, cols]);
    let delta = turn.swap_dims(1, 2).matmul(w).reshape([out, cols]);
    match rescale {
        Some(s) => {
            let s = cast_to(s, DType::F32);
            delta * s.clone() + weight * s.sub_scalar(1.0)
        }
        None => delta,
    }
}

/// BOFT's butterfly `B(W)` at strength `multiplier`, less `W` (see the
/// [module docs](self)): the update of a weight `weight` (`[out, cols]`, PyTorch's layout,
/// f32, outside the graph) under `stages` stages of blocks `blocks` (`[stages · k, n, n]`,
/// stage by stage) with constraint `c` (0: none), `[out, cols]` in f32 in the graph of the
/// blocks and of `rescale` (the scale per output, `[out, 1]`): `s ⊙ B(W) − W`.
pub fn butterfly_update<B: Backend>(blocks: Tensor<B, 3>, stages: usize, c: f32, multiplier: f32, weight: Tensor<B, 2>, rescale: Option<Tensor<B, 2>>) -> Tensor<B, 2> {
    let [rows, n, _] = blocks.dims();
    let k = rows / stages.max(1);
    let [out, cols] = weight.dims();
    let i = eye::<B>(rows, n, &blocks.device());
    let r = turn(blocks, c, multiplier, &i) + i;
    let mut inp = weight.clone();
    for s in 0..stages {
        // Rows `half` apart meet in a block: groups of `2 · half` rows, read as `[2, half]`
        // and transposed, are cut into blocks of `n`; the reverse puts them back.
        let half = (1 << s) * n / 2;
        let groups = out / (2 * half);
        let grouped: Tensor<B, 3> = inp.reshape([groups, 2, half, cols]).swap_dims(1, 2).reshape([k, n, cols]);
        let stage = r.clone().slice(s * k..(s + 1) * k);
        inp = stage.matmul(grouped).reshape([groups, half, 2, cols]).swap_dims(1, 2).reshape([out, cols]);
    }
    match rescale {
        Some(s) => inp * cast_to(s, DType::F32) - weight,
        None => inp - weight,
    }
}

/// The blocks of a BOFT file's `oft_blocks` for a layer with `out` outputs, checked:
/// `[m, k, n, n]` with `k · n = out`, `n` even, and `k` divisible by `2^(m − 1)` (each stage
/// groups rows `2^s · n` at a time); `key` names the adapter in errors.
pub fn check_butterfly(blocks: &HostTensor, out: usize, key: &str) -> Result<(usize, usize, usize)> {
    let bad = |reason: String| LoraError::ShapeMismatch { key: key.into(), reason };
    match blocks.shape.as_slice() {
        &[m, k, n, q] if n == q && k * n == out && m > 0 && n > 0 && n % 2 == 0 && m <= usize::BITS as usize && k.is_multiple_of(1 << (m - 1)) => Ok((m, k, n)),
        &[m, k, n, q] if n == q && k * n != out => Err(bad(format!("BOFT's `oft_blocks` is [{m}, {k}, {n}, {n}], {} outputs, the layer has {out}", k * n))),
        shape => Err(bad(format!("BOFT's `oft_blocks` must be [stages, blocks, n, n] with n even and the blocks a multiple of 2^(stages − 1), got {shape:?}"))),
    }
}

/// The blocks of an OFT file's `oft_blocks` for a layer with `out` outputs, checked:
/// `[k, n, n]` with `k · n = out`; `key` names the adapter in errors.
pub fn check_blocks(blocks: &HostTensor, out: usize, key: &str) -> Result<(usize, usize)> {
    let bad = |reason: String| LoraError::ShapeMismatch { key: key.into(), reason };
    match blocks.shape.as_slice() {
        &[k, n, m] if n == m && k * n == out && k > 0 => Ok((k, n)),
        &[k, n, m] if n == m && k > 0 => Err(bad(format!("OFT's `oft_blocks` is [{k}, {n}, {n}], {} outputs, the layer has {out}", k * n))),
        shape => Err(bad(format!("OFT's `oft_blocks` must be [blocks, n, n] (square blocks), got {shape:?}"))),
    }
}

/// The [`LoraWeights`] that carry an OFT (`algo`: kohya's or Diag-OFT): its tensors in
/// [`LoraWeights::lycoris`] (`oft_blocks`, then Diag-OFT's `rescale` if any) and an empty
/// plain form (rank 0: `down [0, cols…]`, `up [out, 0…]`, in the layer's layout when
/// known: `in_shape` is `[in]` or `[in, kh, kw]`, empty when not), which
/// [`LoraWeights::is_oft`] tells apart; `key` names the adapter in errors.
pub fn weights(algo: Algo, blocks: HostTensor, rescale: Option<HostTensor>, alpha: f32, in_shape: &[usize], key: &str) -> Result<LoraWeights> {
    // `[k, n, n]`, or BOFT's `[m, k, n, n]`: `k · n` outputs.
    let skip = usize::from(algo == Algo::Boft);
    let out = blocks.shape.iter().skip(skip).take(2).product();
    let conv = in_shape.len() == 3;
    let mut down = vec![0];
    down.extend(if in_shape.is_empty() { &[0][..] } else { in_shape });
    let up = if conv { vec![out, 0, 1, 1] } else { vec![out, 0] };
    let mut tensors = vec![(BLOCKS.to_string(), blocks)];
    tensors.extend(rescale.map(|t| (RESCALE.to_string(), t)));
    LoraWeights::base_relative(down, up, LycorisWeights { algo, tensors, alpha }, key)
}

/// Checks an OFT's [`LoraWeights`] (see [`weights`]); `key` names it in errors.
pub(crate) fn validate(w: &LoraWeights, key: &str) -> Result<()> {
    let bad = |reason: String| LoraError::ShapeMismatch { key: key.into(), reason };
    let Some(l) = w.lycoris.as_ref().filter(|l| l.algo.is_oft()) else {
        return Err(bad("not an OFT".into()));
    };
    check_tensors(l, w.up.shape.first().copied().unwrap_or(0), key)?;
    if w.down.shape.first() != Some(&0) || w.up.shape.get(1) != Some(&0) || w.magnitude.is_some() {
        return Err(bad("an OFT's plain form must be empty (rank 0) and it has no DoRA magnitude".into()));
    }
    Ok(())
}

/// Checks an OFT's tensors `l` for a layer with `out` outputs (names, values, the blocks'
/// and the scale's shapes, the constraint) and returns the blocks' `(stages, k, n)`
/// (`stages` is 1 but for BOFT); `key` names the adapter in errors.
pub(crate) fn check_tensors(l: &LycorisWeights, out: usize, key: &str) -> Result<(usize, usize, usize)> {
    let bad = |reason: String| LoraError::ShapeMismatch { key: key.into(), reason };
    let (blocks, rescale) = match l.tensors.as_slice() {
        [(name, t)] if name == BLOCKS => (t, None),
        [(name, t), (s, r)] if name == BLOCKS && s == RESCALE && l.algo.is_lycoris_oft() => (t, Some(r)),
        _ => {
            let want = if l.algo.is_lycoris_oft() { "`oft_blocks` and optionally `rescale`" } else { "one tensor, `oft_blocks`" };
            return Err(bad(format!("an OFT ({}) has {want}; found {:?}", l.algo.name(), l.tensors.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>())));
        }
    };
    for (name, t) in [(BLOCKS, Some(blocks)), (RESCALE, rescale)] {
        if let Some(t) = t.filter(|t| t.data.len() != t.shape.iter().product::<usize>()) {
            return Err(bad(format!("`{name}` has {} values for shape {:?}", t.data.len(), t.shape)));
        }
    }
    let shape = match l.algo {
        Algo::Boft => check_butterfly(blocks, out, key)?,
        _ => {
            let (k, n) = check_blocks(blocks, out, key)?;
            (1, k, n)
        }
    };
    if let Some(r) = rescale && (r.shape.first() != Some(&out) || r.shape.iter().skip(1).any(|&d| d != 1)) {
        return Err(bad(format!("{}'s `rescale` is {:?}, one value per output ([{out}, 1, …]) expected", l.algo.name(), r.shape)));
    }
    match l.algo {
        Algo::Oft if !(l.alpha.is_finite() && l.alpha > 0.0) => Err(bad(format!("kohya's OFT's alpha (its constraint per output) must be positive and finite, got {}", l.alpha))),
        _ if !(l.alpha.is_finite() && l.alpha >= 0.0) => Err(bad(format!("{}'s alpha (its constraint per output, 0 for none) must be finite and not negative, got {}", l.algo.name(), l.alpha))),
        _ => Ok(shape),
    }
}

/// The error for an operation on an OFT that needs a plain LoRA (`what`: "combined",
/// "resized", ...): its update depends on the base weight.
pub fn no_plain_form(key: &str, what: &str) -> LoraError {
    LoraError::Unsupported(format!("`{key}` is an OFT (kohya's networks.oft or LyCORIS' Diag-OFT / BOFT), whose update depends on the base weight: it cannot be {what}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;
    use burn::tensor::Distribution;

    #[test]
    fn steps_grow_with_the_constraint() {
        assert_eq!(newton_steps(0.0), 1);
        assert!(newton_steps(0.32) <= 4);
        assert!(newton_steps(12.8) <= 13);
        assert!(newton_steps(1280.0) <= MAX_STEPS);
    }

    /// The rotation is orthogonal and the inverse exact to f32 precision, for constraints
    /// from kohya's default to far above it (then `‖Q‖` reaches the constraint).
    #[test]
    fn rotation_is_orthogonal() {
        let device = Default::default();
        for (c, std) in [(0.08f32, 0.01), (0.32, 0.3), (12.8, 0.5), (200.0, 3.0)] {
            let p = Tensor::<Flex, 3>::random([3, 16, 16], Distribution::Normal(0.0, std), &device);
            let r = rotation(p, c, 1.0);
            let rtr = r.clone().swap_dims(1, 2).matmul(r);
            let err: f32 = (rtr - eye::<Flex>(3, 16, &device)).abs().max().into_scalar();
            assert!(err < 2e-4, "c = {c}: |RᵀR − I| = {err}");
        }
    }
}
