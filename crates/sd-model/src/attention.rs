//! Multi-head scaled dot-product attention shared by the text encoder, the VAE and the UNet,
//! with a memory-efficient backward pass.
//!
//! burn 0.21 differentiates its `attention` op by decomposing it, so the backward pass keeps
//! the `[batch, heads, queries, keys]` probability matrix of every attention layer alive
//! until it runs: at 512 px and batch 8 that is over 1 GiB per SD1.5 self-attention layer in
//! bf16. [`scaled_dot_product_attention`] instead registers its own backward (a backend
//! extension of burn's autodiff backend) that keeps only `q`, `k`, `v` and the output and
//! recomputes the probabilities block of queries by block (FlashAttention-2's backward
//! recurrence, written with tensor ops so it runs on every backend). The forward pass uses
//! the inner backend's `attention` op (a fused kernel on CUDA), or, with
//! [`lora_core::kernels::set_cublas`] or [`lora_core::kernels::set_fused_softmax`] on, the
//! same blocks of queries through [`lora_core::kernels::matmul`] (cuBLAS on CUDA; burn
//! measured its fused forward slower than matmul + softmax) and
//! [`lora_core::kernels::scaled_softmax`] (one CubeCL kernel on CUDA), which the backward
//! pass uses too.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::{AttentionModuleOptions, FloatTensor};
use burn::tensor::{DType, Tensor};
use lora_core::kernels::{dense, flash_attention, flash_attention_backward, flash_attention_backward_rows, flash_attention_rows, matmul, matmul_transposed, scaled_softmax, scaled_softmax_lse, AttentionRowsBackward};
use lora_core::precision::cast_to;

use crate::autodiff_ext::{downcast, is_autodiff, on_known_autodiff, tensor};
use crate::checkpoint::accumulate;

/// Elements of one `[batch, heads, block, keys]` score block in the backward pass (f32):
/// 2^26 is 256 MiB, and about four such tensors are alive at a time. Larger blocks mean
/// fewer, larger kernels (SD1.5 at 512 px, batch 8: 16 blocks per 4096-token layer).
const BACKWARD_BLOCK_ELEMENTS: usize = 1 << 26;

/// `softmax(q kᵀ / sqrt(d)) v` over `heads` heads, for `[batch, seq, heads·d]` inputs.
///
/// Non-causal attention goes through [`scaled_dot_product_attention`]; causal attention
/// (the text encoder, 77 tokens) through burn's `attention` op.
pub fn multi_head_attention<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    heads: usize,
    causal: bool,
) -> Tensor<B, 3> {
    let [batch, seq_q, width] = q.dims();
    let seq_k = k.dims()[1];
    let head_dim = width / heads;
    // `dense`: the heads copied in runs of `head_dim` on the CPU backend (see `split_heads`).
    let split = |t: Tensor<B, 3>, seq: usize| dense(t.reshape([batch, seq, heads, head_dim]).swap_dims(1, 2));
    let out = attend(split(q, seq_q), split(k, seq_k), split(v, seq_k), causal);
    dense(out.swap_dims(1, 2)).reshape([batch, seq_q, width])
}

/// [`multi_head_attention`] (non-causal) on rows: `q [batch·seq_q, heads·d]`, `k` and `v`
/// `[batch·seq_k, heads·d]`, the output in `q`'s rows. Each head split is one reshape of
/// the rows (the heads are then a strided view, which the fused attention kernels read as
/// it is), and the output goes back to rows without an intermediate `[batch, seq, width]`.
///
/// ```
/// use burn::backend::Flex;
/// use burn::tensor::{Distribution, Tensor};
/// use sd_model::attention::{multi_head_attention, multi_head_attention_rows};
///
/// let device = Default::default();
/// let q = Tensor::<Flex, 3>::random([2, 5, 8], Distribution::Normal(0.0, 1.0), &device);
/// let kv = Tensor::<Flex, 3>::random([2, 3, 8], Distribution::Normal(0.0, 1.0), &device);
/// let rows = |t: Tensor<Flex, 3>| t.reshape([-1, 8]);
/// let ours = multi_head_attention_rows(rows(q.clone()), rows(kv.clone()), rows(kv.clone()), 2, 2);
/// let reference = multi_head_attention(q, kv.clone(), kv, 2, false);
/// let err: f32 = (ours - rows(reference)).abs().max().into_scalar();
/// assert!(err < 1e-6);
/// ```
pub fn multi_head_attention_rows<B: Backend>(q: Tensor<B, 2>, k: Tensor<B, 2>, v: Tensor<B, 2>, batch: usize, heads: usize) -> Tensor<B, 2> {
    let layout = Layout::Rows { batch: batch.max(1), heads };
    let args = (q, k, v);
    if let Some(out) = on_known_autodiff!(for_autodiff::<B, 2>(&args, layout)) {
        return out;
    }
    let (q, k, v) = args;
    rows_forward(q, k, v, batch.max(1), heads, BACKWARD_BLOCK_ELEMENTS, false).0
}

/// How [`multi_head_attention_rows`] and [`scaled_dot_product_attention`] hand their tensors
/// to the attention op.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// `[batch, heads, seq, d]` tensors.
    Heads,
    /// `[batch·seq, heads·d]` rows: the fused attention kernels view them as heads
    /// themselves ([`flash_attention_rows`]); elsewhere the op splits the heads (a reshape
    /// and a transposition per tensor) and merges them again. Either way autodiff sees one
    /// op, not the split and merge and their gradients.
    Rows { batch: usize, heads: usize },
}

/// `[batch·seq, heads·d]` rows as `[batch, heads, seq, d]` heads (a view; dense on the CPU).
fn split_heads<X: Backend>(t: Tensor<X, 2>, batch: usize, heads: usize) -> Tensor<X, 4> {
    let [rows, width] = t.dims();
    // Dense on the CPU, copied in runs of `d` (burn-flex's attention and the backward's
    // products would make the view dense element by element).
    dense(t.reshape([batch, rows / batch, heads, width / heads]).swap_dims(1, 2))
}

/// `[batch, heads, seq, d]` heads as `[batch·seq, heads·d]` rows.
fn merge_heads<X: Backend>(t: Tensor<X, 4>) -> Tensor<X, 2> {
    let [b, h, s, d] = t.dims();
    dense(t.swap_dims(1, 2)).reshape([b * s, h * d])
}

/// [`attention_forward`] on rows (see [`Layout::Rows`]): the fused kernels on the rows
/// where they take the problem, else the heads split, attended and merged.
fn rows_forward<X: Backend>(q: Tensor<X, 2>, k: Tensor<X, 2>, v: Tensor<X, 2>, batch: usize, heads: usize, block_elements: usize, stats: bool) -> (Tensor<X, 2>, Stats<Tensor<X, 3>>) {
    let scale = ((q.dims()[1] / heads.max(1)) as f64).powf(-0.5) as f32;
    match flash_attention_rows(q, k, v, batch, heads, scale) {
        Ok((out, lse)) => (out, Some((lse, true))),
        Err([q, k, v]) => {
            let split = |t| split_heads(t, batch, heads);
            let (out, lse) = attention_forward(split(q), split(k), split(v), block_elements, stats);
            (merge_heads(out), lse)
        }
    }
}

/// Attention of `[batch, heads, seq, d]` heads: causal through burn's `attention` op, else
/// [`scaled_dot_product_attention`].
fn attend<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>, causal: bool) -> Tensor<B, 4> {
    if causal {
        let options = AttentionModuleOptions {
            scale: None,
            softcap: None,
            is_causal: true,
        };
        attention(q, k, v, None, None, options)
    } else {
        scaled_dot_product_attention(q, k, v)
    }
}

/// `softmax(q kᵀ / sqrt(d)) v` for `[batch, heads, seq, d]` tensors.
///
/// On burn's autodiff backend over the CPU (`Flex`) or CUDA backend, with or without
/// gradient checkpointing, the backward pass recomputes the attention probabilities in
/// blocks instead of storing them (see the module docs); it gives the same gradients as
/// differentiating the plain formulation. On other backends this is burn's `attention`.
///
/// ```
/// use burn::backend::{Autodiff, Flex};
/// use burn::tensor::{Distribution, Tensor};
/// use sd_model::attention::scaled_dot_product_attention;
///
/// type B = Autodiff<Flex>;
/// let device = Default::default();
/// let q = Tensor::<B, 4>::random([1, 2, 16, 8], Distribution::Normal(0.0, 1.0), &device).require_grad();
/// let k = Tensor::<B, 4>::random([1, 2, 24, 8], Distribution::Normal(0.0, 1.0), &device);
/// let v = Tensor::<B, 4>::random([1, 2, 24, 8], Distribution::Normal(0.0, 1.0), &device);
/// let out = scaled_dot_product_attention(q.clone(), k, v);
/// assert_eq!(out.dims(), [1, 2, 16, 8]);
/// let grads = out.sum().backward();
/// assert_eq!(q.grad(&grads).unwrap().dims(), [1, 2, 16, 8]);
/// ```
pub fn scaled_dot_product_attention<B: Backend>(q: Tensor<B, 4>, k: Tensor<B, 4>, v: Tensor<B, 4>) -> Tensor<B, 4> {
    let args = (q, k, v);
    if let Some(out) = on_known_autodiff!(for_autodiff::<B, 4>(&args, Layout::Heads)) {
        return out;
    }
    let (q, k, v) = args;
    attention_forward(q, k, v, BACKWARD_BLOCK_ELEMENTS, false).0
}

/// What the forward pass hands its backward pass besides the inputs and the output: each
/// query's log-sum-exp `logsumexp(q kᵀ s)` (f32, `[batch, heads, seq_q]`) and whether the
/// flash kernel wrote it (then its backward kernels run; otherwise the blockwise backward
/// recomputes the probabilities elementwise from it).
type Stats<T> = Option<(T, bool)>;

/// The forward pass: the flash-attention kernel where [`flash_attention`] has one, else
/// burn's `attention` op, or with cuBLAS routing or the fused softmax on
/// ([`lora_core::kernels::set_cublas`], [`lora_core::kernels::set_fused_softmax`])
/// `softmax(qᵢ kᵀ s) v` per block of queries, the matmuls through [`matmul`] and the
/// softmax through [`scaled_softmax`] (in f32), at most `block_elements` scores at once.
/// With `stats` (a training forward pass) also returns the log-sum-exp for the backward
/// pass ([`Stats`]): the flash kernel's, or the blockwise path's from its fused softmax.
fn attention_forward<X: Backend>(q: Tensor<X, 4>, k: Tensor<X, 4>, v: Tensor<X, 4>, block_elements: usize, stats: bool) -> (Tensor<X, 4>, Stats<Tensor<X, 3>>) {
    let scale = (q.dims()[3] as f64).powf(-0.5) as f32;
    if let Some((out, lse)) = flash_attention(q.clone(), k.clone(), v.clone(), scale) {
        return (out, Some((lse, true)));
    }
    if lora_core::kernels::cublas_enabled() || lora_core::kernels::fused_softmax_enabled() {
        let (out, lse) = blockwise_forward(q, k, v, block_elements, stats);
        (out, lse.map(|lse| (lse, false)))
    } else {
        (attention(q, k, v, None, None, plain_options()), None)
    }
}

/// `softmax(qᵢ kᵀ s) v` per block of queries (see [`attention_forward`]); with `stats`, also
/// each query's log-sum-exp `[b, h, seq_q]`.
fn blockwise_forward<X: Backend>(q: Tensor<X, 4>, k: Tensor<X, 4>, v: Tensor<X, 4>, block_elements: usize, stats: bool) -> (Tensor<X, 4>, Option<Tensor<X, 3>>) {
    let dtype = q.dtype();
    let [b, h, seq_q, d] = q.dims();
    let seq_k = k.dims()[2];
    let scale = (d as f64).powf(-0.5) as f32;
    let block = (block_elements / (b * h * seq_k).max(1)).clamp(1, seq_q.max(1));
    let (blocks, lses): (Vec<Tensor<X, 4>>, Vec<Option<Tensor<X, 4>>>) = (0..seq_q)
        .step_by(block)
        .map(|start| {
            let qi = q.clone().narrow(2, start, block.min(seq_q - start));
            // The softmax reads the scores in the model's dtype and computes in f32.
            let scores = matmul_transposed(qi, k.clone(), false, true);
            let (p, lse) = if stats {
                let (p, lse) = scaled_softmax_lse(scores, scale, dtype);
                (p, Some(lse))
            } else {
                (scaled_softmax(scores, scale, dtype), None)
            };
            (matmul(p, v.clone()), lse)
        })
        .unzip();
    let lse = lses.into_iter().collect::<Option<Vec<_>>>().filter(|parts| !parts.is_empty()).map(|parts| concat(parts, 2).reshape([b, h, seq_q]));
    (concat(blocks, 2), lse)
}

/// `Tensor::cat`, except that a single tensor is returned as it is: a cat is one copy
/// kernel per input, even for one input.
fn concat<X: Backend>(mut parts: Vec<Tensor<X, 4>>, dim: usize) -> Tensor<X, 4> {
    if parts.len() == 1 {
        return parts.pop().expect("one part");
    }
    Tensor::cat(parts, dim)
}


/// Runs the memory-efficient op when `B` is `Autodiff<X, C>` (see [`crate::autodiff_ext`]),
/// on `[b, h, s, d]` heads (`D` = 4, [`Layout::Heads`]) or rows (`D` = 2, [`Layout::Rows`]).
fn for_autodiff<B: Backend, X: Backend, C: CheckpointStrategy, const D: usize>(args: &(Tensor<B, D>, Tensor<B, D>, Tensor<B, D>), layout: Layout) -> Option<Tensor<B, D>> {
    if !is_autodiff::<B, X, C>() {
        return None;
    }
    let (q, k, v) = args.clone();
    let out = memory_efficient::<X, C, D>(downcast(q)?, downcast(k)?, downcast(v)?, layout, BACKWARD_BLOCK_ELEMENTS);
    downcast(out)
}

fn plain_options() -> AttentionModuleOptions {
    AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal: false,
    }
}

/// The autodiff op: forward with [`attention_forward`], backward in query blocks.
fn memory_efficient<X: Backend, C: CheckpointStrategy, const D: usize>(
    q: Tensor<Autodiff<X, C>, D>,
    k: Tensor<Autodiff<X, C>, D>,
    v: Tensor<Autodiff<X, C>, D>,
    layout: Layout,
    block_elements: usize,
) -> Tensor<Autodiff<X, C>, D> {
    let (q, k, v) = (q.into_primitive().tensor(), k.into_primitive().tensor(), v.into_primitive().tensor());
    let forward = |q: FloatTensor<X>, k: FloatTensor<X>, v: FloatTensor<X>, stats: bool| {
        let (out, lse) = match layout {
            Layout::Heads => {
                let (out, lse) = attention_forward(tensor::<X, 4>(q), tensor(k), tensor(v), block_elements, stats);
                (out.into_primitive().tensor(), lse)
            }
            Layout::Rows { batch, heads } => {
                let (out, lse) = rows_forward(tensor::<X, 2>(q), tensor(k), tensor(v), batch, heads, block_elements, stats);
                (out.into_primitive().tensor(), lse)
            }
        };
        (out, lse.map(|(lse, flash)| (lse.into_primitive().tensor(), flash)))
    };
    let op = BlockwiseAttentionBackward { block_elements, layout };
    let out = match op.prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            // The log-sum-exp lets the backward pass skip the softmax statistics.
            let (out, lse) = forward(q.primitive.clone(), k.primitive.clone(), v.primitive.clone(), true);
            prep.finish((q.primitive, k.primitive, v.primitive, out.clone(), lse), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(q.primitive, k.primitive, v.primitive, false).0),
    };
    tensor(out)
}

/// Backward of `softmax(q kᵀ s) v` that keeps `q`, `k`, `v` and the output only.
#[derive(Debug)]
struct BlockwiseAttentionBackward {
    block_elements: usize,
    layout: Layout,
}

impl<X: Backend> Backward<X, 3> for BlockwiseAttentionBackward {
    /// `q`, `k`, `v`, the output and the forward pass's [`Stats`].
    type State = (FloatTensor<X>, FloatTensor<X>, FloatTensor<X>, FloatTensor<X>, Stats<FloatTensor<X>>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad_out = grads.consume::<X>(&ops.node);
        let (q, k, v, out, lse) = ops.state;
        let lse = lse.map(|(lse, flash)| (tensor::<X, 3>(lse), flash));
        let [dq, dk, dv] = match self.layout {
            Layout::Heads => heads_backward([q, k, v, out, grad_out].map(tensor::<X, 4>), lse, self.block_elements).map(|g| g.into_primitive().tensor()),
            Layout::Rows { batch, heads } => rows_backward([q, k, v, out, grad_out].map(tensor::<X, 2>), lse, batch, heads, self.block_elements).map(|g| g.into_primitive().tensor()),
        };
        let [pq, pk, pv] = ops.parents;
        for (parent, grad) in [(pq, dq), (pk, dk), (pv, dv)] {
            if let Some(node) = parent {
                grads.register::<X>(node.id, grad);
            }
        }
    }
}

/// The backward pass of `[b, h, s, d]` heads `[q, k, v, out, grad_out]`: the fused kernels
/// where the forward pass's [`Stats`] came from them and they take the problem, else
/// [`backward_in_blocks`].
fn heads_backward<X: Backend>([q, k, v, out, grad_out]: [Tensor<X, 4>; 5], lse: Stats<Tensor<X, 3>>, block_elements: usize) -> [Tensor<X, 4>; 3] {
    let scale = (q.dims()[3] as f64).powf(-0.5) as f32;
    let flash = match &lse {
        Some((lse, true)) => flash_attention_backward(q.clone(), k.clone(), v.clone(), out.clone(), grad_out.clone(), lse.clone(), scale),
        _ => None,
    };
    let (dq, dk, dv) = match flash {
        Some(grads) => grads,
        None => backward_in_blocks::<X>(q, k, v, out, grad_out, lse.map(|(lse, _)| lse), block_elements),
    };
    [dq, dk, dv]
}

/// [`heads_backward`] on `[b·s, h·d]` rows (see [`Layout::Rows`]): the fused kernels on the
/// rows, else the heads split, differentiated and the gradients merged.
fn rows_backward<X: Backend>([q, k, v, out, grad_out]: [Tensor<X, 2>; 5], lse: Stats<Tensor<X, 3>>, batch: usize, heads: usize, block_elements: usize) -> [Tensor<X, 2>; 3] {
    let scale = ((q.dims()[1] / heads.max(1)) as f64).powf(-0.5) as f32;
    let (inputs, lse) = match lse {
        Some((lse, true)) => {
            let inputs = AttentionRowsBackward { q, k, v, out, grad_out, lse };
            match flash_attention_backward_rows(inputs, batch, heads, scale) {
                Ok(grads) => return grads,
                Err(AttentionRowsBackward { q, k, v, out, grad_out, lse }) => ([q, k, v, out, grad_out], Some((lse, true))),
            }
        }
        lse => ([q, k, v, out, grad_out], lse),
    };
    heads_backward(inputs.map(|t| split_heads(t, batch, heads)), lse, block_elements).map(merge_heads)
}

/// Gradients of `o = softmax(q kᵀ / sqrt(d)) v` given `do`, for `[b, h, s, d]` tensors,
/// computed over blocks of queries so that at most `block_elements` scores exist at once.
///
/// Per block `i`: `P = softmax(qᵢ kᵀ s)`, `dV += Pᵀ doᵢ`, `dP = doᵢ vᵀ`,
/// `dS = P ∘ (dP − rowsum(doᵢ ∘ oᵢ))`, `dqᵢ = dS k s`, `dK += dSᵀ qᵢ s`. The softmax, `dS`
/// and the sums over blocks run in f32; the five products run in the inputs' dtype when all
/// four are bf16 or f16 (`P` and `dS` rounded to it first, as FlashAttention does and as the
/// forward pass already computes the scores: tensor-core matmuls at half the memory traffic),
/// else in f32. The gradients are returned in the inputs' dtype. The matmuls go through
/// [`lora_core::kernels::matmul`] (cuBLAS on CUDA when turned on).
pub fn attention_backward<X: Backend>(
    q: Tensor<X, 4>,
    k: Tensor<X, 4>,
    v: Tensor<X, 4>,
    out: Tensor<X, 4>,
    grad_out: Tensor<X, 4>,
    block_elements: usize,
) -> (Tensor<X, 4>, Tensor<X, 4>, Tensor<X, 4>) {
    backward_in_blocks(q, k, v, out, grad_out, None, block_elements)
}

/// [`attention_backward`], given the forward pass's log-sum-exp `lse` (`[b, h, seq_q]`,
/// f32) when there is one: then each block's probabilities are `exp(qᵢ kᵀ s − lseᵢ)`, an
/// elementwise op that burn fuses twice over the block's scores (once into `P` for `dV`,
/// once into `dS`), instead of a softmax's reductions and an f32 `P` kept between them.
fn backward_in_blocks<X: Backend>(
    q: Tensor<X, 4>,
    k: Tensor<X, 4>,
    v: Tensor<X, 4>,
    out: Tensor<X, 4>,
    grad_out: Tensor<X, 4>,
    lse: Option<Tensor<X, 3>>,
    block_elements: usize,
) -> (Tensor<X, 4>, Tensor<X, 4>, Tensor<X, 4>) {
    let dtypes = (q.dtype(), k.dtype(), v.dtype());
    let half = matches!(dtypes.0, DType::BF16 | DType::F16) && dtypes.1 == dtypes.0 && dtypes.2 == dtypes.0 && grad_out.dtype() == dtypes.0;
    // The products' dtype; everything between them is f32.
    let product = if half { dtypes.0 } else { DType::F32 };
    let to = |t: Tensor<X, 4>| cast_to(t, product);
    let f32 = |t: Tensor<X, 4>| cast_to(t, DType::F32);
    let out = f32(out);
    let (q, k, v, grad_out) = (to(q), to(k), to(v), to(grad_out));
    let [b, h, seq_q, d] = q.dims();
    let seq_k = k.dims()[2];
    let scale = (d as f64).powf(-0.5) as f32;
    let block = (block_elements / (b * h * seq_k).max(1)).clamp(1, seq_q.max(1));
    // Summed over the query blocks (the first block's term is the start: no zero fill).
    let (mut dk, mut dv) = (None, None);
    let mut dq_blocks = Vec::with_capacity(seq_q.div_ceil(block));
    for start in (0..seq_q).step_by(block) {
        let len = block.min(seq_q - start);
        let qi = q.clone().narrow(2, start, len);
        let doi = grad_out.clone().narrow(2, start, len);
        let oi = out.clone().narrow(2, start, len);
        let scores = matmul_transposed(qi.clone(), k.clone(), false, true);
        // P in f32: from the log-sum-exp, recomputed elementwise from the stored scores for
        // each use (nothing but the scores stays alive between the products); else a softmax.
        let (p_for_dv, p_for_ds) = match &lse {
            Some(lse) => {
                let lse_i = lse.clone().narrow(2, start, len).unsqueeze_dim::<4>(3);
                let p = |scores: Tensor<X, 4>| (f32(scores).mul_scalar(scale) - lse_i.clone()).exp();
                (p(scores.clone()), p(scores))
            }
            None => {
                let p = scaled_softmax(scores, scale, DType::F32);
                (p.clone(), p)
            }
        };
        accumulate(&mut dv, Some(f32(matmul_transposed(to(p_for_dv), doi.clone(), true, false))));
        let dp = f32(matmul_transposed(doi.clone(), v.clone(), false, true));
        let row = (f32(doi) * oi).sum_dim(3);
        let ds = to(p_for_ds * (dp - row));
        dq_blocks.push(f32(matmul(ds.clone(), k.clone())).mul_scalar(scale));
        accumulate(&mut dk, Some(f32(matmul_transposed(ds, qi, true, false)).mul_scalar(scale)));
    }
    let dq = concat(dq_blocks, 2);
    // Always set: there is at least one query block (`dq` above needs one too).
    let dk = dk.unwrap_or_else(|| Tensor::zeros(k.dims(), &k.device()));
    let dv = dv.unwrap_or_else(|| Tensor::zeros(v.dims(), &v.device()));
    (cast_to(dq, dtypes.0), cast_to(dk, dtypes.1), cast_to(dv, dtypes.2))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, NoCheckpointing};
    use burn::backend::Flex;
    use burn::tensor::Distribution;

    fn max_rel(a: Tensor<Flex, 4>, b: Tensor<Flex, 4>) -> f32 {
        let scale: f32 = b.clone().abs().max().into_scalar();
        let diff: f32 = (a - b).abs().max().into_scalar();
        diff / scale.max(1e-12)
    }

    /// Output and gradients against differentiating burn's own attention, with blocks small
    /// enough that several are needed, on both autodiff flavours.
    fn check<C: CheckpointStrategy>(block_elements: usize) {
        type I = Flex;
        let device = Default::default();
        let rand = |shape: [usize; 4]| Tensor::<I, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let (q0, k0, v0, w) = (rand([2, 3, 37, 8]), rand([2, 3, 29, 8]), rand([2, 3, 29, 8]), rand([2, 3, 37, 8]));
        let leaf = |t: &Tensor<I, 4>| Tensor::<Autodiff<I, C>, 4>::from_inner(t.clone()).require_grad();
        let (q, k, v) = (leaf(&q0), leaf(&k0), leaf(&v0));
        let ours = memory_efficient::<I, C, 4>(q.clone(), k.clone(), v.clone(), Layout::Heads, block_elements);
        let grads = (ours.clone() * Tensor::from_inner(w.clone())).sum().backward();
        let (q2, k2, v2) = (leaf(&q0), leaf(&k0), leaf(&v0));
        let reference = attention(q2.clone(), k2.clone(), v2.clone(), None, None, plain_options());
        let grads2 = (reference.clone() * Tensor::from_inner(w)).sum().backward();
        assert!(max_rel(ours.inner(), reference.inner()) < 1e-5);
        for (a, b) in [(q.grad(&grads), q2.grad(&grads2)), (k.grad(&grads), k2.grad(&grads2)), (v.grad(&grads), v2.grad(&grads2))] {
            let err = max_rel(a.unwrap(), b.unwrap());
            assert!(err < 1e-4, "gradient relative error {err}");
        }
    }

    #[test]
    fn blockwise_backward_matches_the_plain_gradients() {
        // 2·3·29 scores per query row: 500 elements give blocks of 2 queries.
        check::<NoCheckpointing>(500);
        check::<BalancedCheckpointing>(500);
        check::<NoCheckpointing>(BACKWARD_BLOCK_ELEMENTS);
    }

    /// bf16 and f16 inputs: the products run in that dtype, against the f32 gradients of the
    /// same (rounded) values, within the half types' rounding.
    #[test]
    fn half_precision_backward_matches_f32_within_rounding() {
        use burn::tensor::FloatDType;
        let device = Default::default();
        let rand = |shape: [usize; 4]| Tensor::<Flex, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        for (dtype, tolerance) in [(FloatDType::BF16, 3e-2), (FloatDType::F16, 5e-3)] {
            let round = |t: Tensor<Flex, 4>| t.cast(dtype);
            let (q, k, v, g) = (round(rand([2, 3, 37, 16])), round(rand([2, 3, 29, 16])), round(rand([2, 3, 29, 16])), round(rand([2, 3, 37, 16])));
            let wide = |t: &Tensor<Flex, 4>| t.clone().cast(FloatDType::F32);
            let out = attention(wide(&q), wide(&k), wide(&v), None, None, plain_options());
            let reference = attention_backward(wide(&q), wide(&k), wide(&v), out.clone(), wide(&g), 500);
            let ours = attention_backward(q, k, v, out.cast(dtype), g, 500);
            for (what, a, b) in [("dq", ours.0, reference.0), ("dk", ours.1, reference.1), ("dv", ours.2, reference.2)] {
                assert_eq!(a.dtype(), DType::from(dtype), "{what} keeps the inputs' dtype");
                let err = max_rel(a.cast(FloatDType::F32), b);
                assert!(err < tolerance, "{dtype:?} {what}: relative error {err}");
            }
        }
    }

    #[test]
    fn blockwise_forward_matches_burn() {
        let device = Default::default();
        let rand = |shape: [usize; 4]| Tensor::<Flex, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
        let (q, k, v) = (rand([2, 3, 37, 8]), rand([2, 3, 29, 8]), rand([2, 3, 29, 8]));
        let reference = attention(q.clone(), k.clone(), v.clone(), None, None, plain_options());
        // logsumexp(q kᵀ s) per query, from burn's ops.
        let scores = q.clone().matmul(k.clone().swap_dims(2, 3)).mul_scalar(8f32.powf(-0.5));
        let max = scores.clone().max_dim(3);
        let lse_reference = ((scores - max.clone()).exp().sum_dim(3).log() + max).reshape([2, 3, 37]);
        for block_elements in [500, BACKWARD_BLOCK_ELEMENTS] {
            let (ours, none) = blockwise_forward(q.clone(), k.clone(), v.clone(), block_elements, false);
            assert!(none.is_none());
            assert!(max_rel(ours, reference.clone()) < 1e-5, "block_elements {block_elements}");
            let (ours, lse) = blockwise_forward(q.clone(), k.clone(), v.clone(), block_elements, true);
            assert!(max_rel(ours, reference.clone()) < 1e-5, "block_elements {block_elements}, with stats");
            let lse = lse.expect("stats asked for");
            assert_eq!(lse.dims(), [2, 3, 37]);
            let err: f32 = (lse - lse_reference.clone()).abs().max().into_scalar();
            assert!(err < 1e-5, "block_elements {block_elements}: log-sum-exp error {err}");
        }
    }

    /// Normal(0, 1) values from `seed` alone (SplitMix64 and Box–Muller), not from the
    /// backend's RNG, which tests running at the same time share: a tolerance checked on
    /// these inputs holds on every run.
    fn fixed_normal(shape: [usize; 4], seed: u64) -> Tensor<Flex, 4> {
        let mut state = seed;
        let mut uniform = || {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
        };
        let n = shape.iter().product::<usize>();
        let values: Vec<f32> = (0..n).map(|_| ((-2.0 * (1.0 - uniform()).ln()).sqrt() * (std::f64::consts::TAU * uniform()).cos()) as f32).collect();
        Tensor::from_data(burn::tensor::TensorData::new(values, shape), &Default::default())
    }

    /// The backward pass from the forward's log-sum-exp (probabilities recomputed
    /// elementwise) against the one that recomputes the softmax: f32, and bf16 against the
    /// f32 gradients within bf16's rounding (on fixed inputs, where the largest is about
    /// 0.013: the shared RNG's inputs once gave 0.034, over the 0.03 allowed).
    #[test]
    fn backward_from_the_log_sum_exp_matches_the_softmax_backward() {
        use burn::tensor::FloatDType;
        let (q, k, v, g) = (fixed_normal([2, 3, 37, 16], 1), fixed_normal([2, 3, 29, 16], 2), fixed_normal([2, 3, 29, 16], 3), fixed_normal([2, 3, 37, 16], 4));
        let (out, lse) = blockwise_forward(q.clone(), k.clone(), v.clone(), 500, true);
        let lse = lse.expect("stats");
        let reference = attention_backward(q.clone(), k.clone(), v.clone(), out.clone(), g.clone(), 500);
        let ours = backward_in_blocks(q.clone(), k.clone(), v.clone(), out.clone(), g.clone(), Some(lse.clone()), 500);
        for (what, a, b) in [("dq", ours.0, reference.0.clone()), ("dk", ours.1, reference.1.clone()), ("dv", ours.2, reference.2.clone())] {
            let err = max_rel(a, b);
            assert!(err < 1e-5, "f32 {what}: relative error {err}");
        }
        let half = |t: &Tensor<Flex, 4>| t.clone().cast(FloatDType::BF16);
        let ours = backward_in_blocks(half(&q), half(&k), half(&v), half(&out), half(&g), Some(lse), 500);
        for (what, a, b) in [("dq", ours.0, reference.0), ("dk", ours.1, reference.1), ("dv", ours.2, reference.2)] {
            let err = max_rel(a.cast(FloatDType::F32), b);
            assert!(err < 3e-2, "bf16 {what}: relative error {err}");
        }
    }

    /// The autodiff op with the blockwise forward (the fused-softmax switch routes it there
    /// on every backend): its log-sum-exp reaches the backward pass, and the gradients are
    /// burn's.
    #[test]
    fn blockwise_autodiff_op_passes_its_log_sum_exp() {
        lora_core::kernels::set_fused_softmax(true);
        let (q, k, v) = {
            let device = Default::default();
            let rand = |shape: [usize; 4]| Tensor::<Flex, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            (rand([2, 3, 37, 8]), rand([2, 3, 29, 8]), rand([2, 3, 29, 8]))
        };
        let (_, stats) = attention_forward(q, k, v, 500, true);
        let routed = matches!(stats, Some((_, false)));
        check::<NoCheckpointing>(500);
        lora_core::kernels::set_fused_softmax(false);
        assert!(routed, "the blockwise forward gave no log-sum-exp");
    }

    /// Attention on rows (the op splits and merges the heads itself) against the heads split
    /// and merged around the op by the caller: output and gradients, on both autodiff
    /// flavours, through the blockwise path too.
    fn check_rows<C: CheckpointStrategy>(block_elements: usize) {
        type I = Flex;
        let device = Default::default();
        let (batch, heads, d) = (2, 3, 8);
        let rand = |rows: usize| Tensor::<I, 2>::random([rows, heads * d], Distribution::Normal(0.0, 1.0), &device);
        let (q0, k0, v0, w) = (rand(batch * 37), rand(batch * 29), rand(batch * 29), rand(batch * 37));
        let leaf = |t: &Tensor<I, 2>| Tensor::<Autodiff<I, C>, 2>::from_inner(t.clone()).require_grad();
        let (q, k, v) = (leaf(&q0), leaf(&k0), leaf(&v0));
        let ours = memory_efficient::<I, C, 2>(q.clone(), k.clone(), v.clone(), Layout::Rows { batch, heads }, block_elements);
        assert_eq!(ours.dims(), [batch * 37, heads * d]);
        let grads = (ours.clone() * Tensor::from_inner(w.clone())).sum().backward();
        let (q2, k2, v2) = (leaf(&q0), leaf(&k0), leaf(&v0));
        let split = |t: Tensor<Autodiff<I, C>, 2>| split_heads(t, batch, heads);
        let reference = merge_heads(memory_efficient::<I, C, 4>(split(q2.clone()), split(k2.clone()), split(v2.clone()), Layout::Heads, block_elements));
        let grads2 = (reference.clone() * Tensor::from_inner(w)).sum().backward();
        let as4 = |t: Tensor<I, 2>| t.unsqueeze::<4>();
        assert!(max_rel(as4(ours.inner()), as4(reference.inner())) < 1e-6);
        for (a, b) in [(q.grad(&grads), q2.grad(&grads2)), (k.grad(&grads), k2.grad(&grads2)), (v.grad(&grads), v2.grad(&grads2))] {
            let err = max_rel(as4(a.unwrap()), as4(b.unwrap()));
            assert!(err < 1e-6, "gradient relative error {err}");
        }
    }

    #[test]
    fn attention_on_rows_matches_heads_split_by_the_caller() {
        check_rows::<NoCheckpointing>(500);
        check_rows::<BalancedCheckpointing>(500);
        check_rows::<NoCheckpointing>(BACKWARD_BLOCK_ELEMENTS);
        // Without autodiff, as the public function runs it.
        let device = Default::default();
        let x = Tensor::<Flex, 2>::random([2 * 5, 12], Distribution::Normal(0.0, 1.0), &device);
        let rows = multi_head_attention_rows(x.clone(), x.clone(), x.clone(), 2, 3);
        let split = |t: Tensor<Flex, 2>| split_heads(t, 2, 3);
        let reference = merge_heads(scaled_dot_product_attention(split(x.clone()), split(x.clone()), split(x)));
        assert!(max_rel(rows.unsqueeze::<4>(), reference.unsqueeze::<4>()) < 1e-6);
    }

    #[test]
    fn dispatch_reaches_the_extension_on_autodiff_flex() {
        type B = Autodiff<Flex>;
        let device = Default::default();
        let t = Tensor::<B, 4>::random([1, 1, 4, 2], Distribution::Normal(0.0, 1.0), &device);
        let args = (t.clone(), t.clone(), t.clone());
        assert!(for_autodiff::<B, Flex, NoCheckpointing, 4>(&args, Layout::Heads).is_some());
        assert!(for_autodiff::<B, Flex, BalancedCheckpointing, 4>(&args, Layout::Heads).is_none());
        let plain = (t.clone().inner(), t.clone().inner(), t.inner());
        assert!(for_autodiff::<Flex, Flex, NoCheckpointing, 4>(&plain, Layout::Heads).is_none());
    }

    /// The flash-attention kernels through this module's autodiff op on `Autodiff<Wgpu>`
    /// (lavapipe; f16), against the blockwise path: output and the three input gradients.
    #[cfg(feature = "vulkan-test")]
    #[test]
    fn vulkan_flash_path_matches_the_blockwise_path() {
        use burn::tensor::FloatDType;
        type W = Autodiff<burn::backend::Wgpu>;
        let _switches = crate::KERNEL_SWITCHES.lock().unwrap_or_else(|e| e.into_inner());
        let device = Default::default();
        let input = |s: usize, mean: f64| Tensor::<W, 4>::random([2, 3, s, 40], Distribution::Normal(mean, 1.0), &device).cast(FloatDType::F16);
        let (q0, k0, v0) = (input(50, 0.1), input(77, -0.1), input(77, 0.0));
        let weights = Tensor::<W, 4>::random([2, 3, 50, 40], Distribution::Normal(0.0, 1.0), &device).cast(FloatDType::F16);
        let run = |flash: bool| {
            lora_core::kernels::set_flash_attention(flash);
            let (q, k, v) = (q0.clone().require_grad(), k0.clone().require_grad(), v0.clone().require_grad());
            let out = scaled_dot_product_attention(q.clone(), k.clone(), v.clone());
            let grads = (out.clone() * weights.clone()).cast(FloatDType::F32).sum().backward();
            lora_core::kernels::set_flash_attention(false);
            let f32 = |t: Tensor<burn::backend::Wgpu, 4>| t.cast(FloatDType::F32);
            [f32(out.inner()), f32(q.grad(&grads).unwrap()), f32(k.grad(&grads).unwrap()), f32(v.grad(&grads).unwrap())]
        };
        let before = lora_core::kernels::vendor_stats().flash_attention_calls;
        let flash = run(true);
        let plain = run(false);
        for (what, (a, b)) in ["out", "dq", "dk", "dv"].iter().zip(flash.into_iter().zip(plain)) {
            let peak: f32 = b.clone().abs().max().into_scalar();
            let err: f32 = (a - b).abs().max().into_scalar();
            assert!(err <= 5e-3 * peak, "{what}: error {err} of the peak {peak}");
        }
        // Counted when the fusion stream runs the ops, i.e. once the results were read.
        assert_eq!(lora_core::kernels::vendor_stats().flash_attention_calls - before, 2, "forward and backward in the kernels");
    }

    /// A LoRA training step of the tiny UNet on wgpu (lavapipe) with the routed matmuls,
    /// the one-op linear layers (`lora_core::kernels::set_fused_lora_linear`) on against
    /// off: every linear layer of the model (adapted projections on token and context rows,
    /// `to_out` with its residual, the projections and feed-forward layers without an
    /// adapter), output and the gradients of an adapter on a self-attention query and of
    /// one on a cross-attention key.
    /// [`multi_head_attention_rows`] through the autodiff op on rows: the flash kernels
    /// viewing the rows as heads against the blockwise path (heads split inside the op).
    #[cfg(feature = "vulkan-test")]
    #[test]
    fn vulkan_flash_path_on_rows_matches_the_blockwise_path() {
        use burn::tensor::FloatDType;
        type W = Autodiff<burn::backend::Wgpu>;
        let _switches = crate::KERNEL_SWITCHES.lock().unwrap_or_else(|e| e.into_inner());
        let device = Default::default();
        let input = |rows: usize, mean: f64| Tensor::<W, 2>::random([rows, 120], Distribution::Normal(mean, 1.0), &device).cast(FloatDType::F16);
        let (q0, k0, v0) = (input(2 * 50, 0.1), input(2 * 77, -0.1), input(2 * 77, 0.0));
        let weights = input(2 * 50, 0.0);
        let run = |flash: bool| {
            lora_core::kernels::set_flash_attention(flash);
            let (q, k, v) = (q0.clone().require_grad(), k0.clone().require_grad(), v0.clone().require_grad());
            let out = multi_head_attention_rows(q.clone(), k.clone(), v.clone(), 2, 3);
            let grads = (out.clone() * weights.clone()).cast(FloatDType::F32).sum().backward();
            lora_core::kernels::set_flash_attention(false);
            let f32 = |t: Tensor<burn::backend::Wgpu, 2>| t.cast(FloatDType::F32);
            [f32(out.inner()), f32(q.grad(&grads).unwrap()), f32(k.grad(&grads).unwrap()), f32(v.grad(&grads).unwrap())]
        };
        let before = lora_core::kernels::vendor_stats().flash_attention_calls;
        let flash = run(true);
        let plain = run(false);
        for (what, (a, b)) in ["out", "dq", "dk", "dv"].iter().zip(flash.into_iter().zip(plain)) {
            assert_eq!(a.dims(), b.dims(), "{what}");
            let peak: f32 = b.clone().abs().max().into_scalar();
            let err: f32 = (a - b).abs().max().into_scalar();
            assert!(err <= 5e-3 * peak, "{what}: error {err} of the peak {peak}");
        }
        assert_eq!(lora_core::kernels::vendor_stats().flash_attention_calls - before, 2, "forward and backward in the kernels");
    }

    #[cfg(feature = "vulkan-test")]
    #[test]
    fn vulkan_fused_linear_layers_in_a_unet_training_step() {
        use crate::targets::{attach_new_adapters, Selection, UnetTargets};
        use crate::{UNet2DConditionModel, UnetConfig};
        use burn::backend::Autodiff;
        use burn::module::{Module, Param};
        use lora_core::LoraConfig;
        let _guard = crate::KERNEL_SWITCHES.lock().unwrap_or_else(|e| e.into_inner());
        type W = Autodiff<burn::backend::Wgpu>;
        let device = Default::default();
        let mut unet = UNet2DConditionModel::<W>::new(&UnetConfig::tiny(), &device).unwrap().no_grad();
        attach_new_adapters(&mut unet, &Selection::new(UnetTargets::Attn), &LoraConfig::new(2), &device).unwrap();
        let block = &mut unet.down_blocks[1].attentions[0].transformer_blocks[0];
        for layer in [&mut block.attn1.to_q, &mut block.attn2.to_k, &mut block.attn2.to_out[0]] {
            let adapter = layer.adapter.as_mut().unwrap();
            let d_out = adapter.up.weight.dims()[1];
            adapter.up.weight = Param::from_tensor(Tensor::random([2, d_out], Distribution::Normal(0.0, 0.1), &device));
        }
        let x = Tensor::<W, 4>::random([2, 4, 8, 8], Distribution::Normal(0.0, 1.0), &device);
        let t = Tensor::<W, 1>::from_floats([10.0, 900.0], &device);
        let ctx = Tensor::<W, 3>::random([2, 77, 32], Distribution::Normal(0.0, 1.0), &device);
        let run = |fused: bool| {
            lora_core::kernels::set_fixed_matmul(true);
            lora_core::kernels::set_fused_lora_linear(fused);
            let out = unet.forward(x.clone(), t.clone(), ctx.clone()).unwrap();
            let grads = (out.clone() - x.clone()).powf_scalar(2.0).mean().backward();
            lora_core::kernels::set_fused_lora_linear(false);
            lora_core::kernels::set_fixed_matmul(false);
            let block = &unet.down_blocks[1].attentions[0].transformer_blocks[0];
            let flat = |t: Tensor<burn::backend::Wgpu, 2>| t.flatten::<1>(0, 1);
            let mut results = vec![out.inner().flatten::<1>(0, 3)];
            for layer in [&block.attn1.to_q, &block.attn2.to_k, &block.attn2.to_out[0]] {
                let a = layer.adapter.as_ref().unwrap();
                results.extend([flat(a.up.weight.grad(&grads).unwrap()), flat(a.down.weight.grad(&grads).unwrap())]);
            }
            results
        };
        let before = lora_core::kernels::vendor_stats();
        let fused = run(true);
        let composed = run(false);
        let names = ["output", "to_q up", "to_q down", "attn2.to_k up", "attn2.to_k down", "attn2.to_out up", "attn2.to_out down"];
        for (what, (a, b)) in names.iter().zip(fused.into_iter().zip(composed)) {
            let peak: f32 = b.clone().abs().max().into_scalar();
            let err: f32 = (a - b).abs().max().into_scalar();
            assert!(err <= 1e-4 * peak, "{what}: error {err} of the peak {peak}");
        }
        // Counted when the fusion stream runs the ops, i.e. once the results were read.
        let after = lora_core::kernels::vendor_stats();
        assert_eq!(after.fallbacks, before.fallbacks, "fallbacks: {:?}", after.last_error);
        let calls = after.fused_lora_linear_calls - before.fused_lora_linear_calls;
        assert!(calls >= 40, "only {calls} linear passes ran as one op");
    }
}
