//! GEGLU, the transformer feed-forward's gated activation, as one differentiable op.
//!
//! `hidden · gelu(gate)` composed from tensor ops leaves autodiff holding `hidden`, `gate`
//! and `gelu(gate)` (three `[batch, tokens, 4·dim]` tensors per transformer block) until the
//! backward pass; [`geglu`]'s own backward (on burn's autodiff backend over Flex or CUDA, see
//! [`crate::autodiff_ext`]) keeps only the projection it splits and recomputes the rest.
//! [`geglu_projected`] goes further for a frozen projection without an adapter (every
//! feed-forward input layer when only attention is trained): it keeps the projection's
//! *input*, an eighth of the size, and recomputes the projection in the backward pass.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::activation::gelu;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor};
use lora_core::kernels::{geglu_bias, geglu_bias_backward, matmul, matmul_transposed};
use lora_core::precision::cast_to;
use lora_core::LoraLinear;

use crate::autodiff_ext::{downcast, is_autodiff, on_known_autodiff, tensor};

/// `hidden · gelu(gate)` where `[hidden, gate]` are the two halves of `h`'s last dimension
/// (diffusers' `GEGLU`, exact erf GELU).
///
/// ```
/// use burn::backend::Flex;
/// use burn::tensor::{Distribution, Tensor};
///
/// let device = Default::default();
/// let h = Tensor::<Flex, 3>::random([1, 3, 8], Distribution::Normal(0.0, 1.0), &device);
/// let out = sd_model::activation::geglu(h);
/// assert_eq!(out.dims(), [1, 3, 4]);
/// ```
pub fn geglu<B: Backend>(h: Tensor<B, 3>) -> Tensor<B, 3> {
    if let Some(out) = on_known_autodiff!(for_autodiff::<B>(&h)) {
        return out;
    }
    geglu_on_rows(h)
}

/// `hidden · gelu(gate)` with the halves taken from `h`'s rows (`[batch · tokens, 2n]`):
/// each half is then a strided 2-d view, which burn-flex (the CPU backend) combines row by
/// row, while 3-d strided views take its element-by-element iterator (a fifth of a small
/// training step on a CPU, with the backward pass's products). A reshape of the
/// contiguous projection is free.
fn geglu_on_rows<X: Backend>(h: Tensor<X, 3>) -> Tensor<X, 3> {
    let [batch, tokens, n2] = h.dims();
    let (hidden, gate) = halves(h.reshape([batch * tokens, n2]));
    (hidden * gelu(gate)).reshape([batch, tokens, n2 / 2])
}

fn halves<B: Backend, const D: usize>(h: Tensor<B, D>) -> (Tensor<B, D>, Tensor<B, D>) {
    let n = h.dims()[D - 1] / 2;
    (h.clone().narrow(D - 1, 0, n), h.narrow(D - 1, n, n))
}

fn for_autodiff<B: Backend, X: Backend, C: CheckpointStrategy>(h: &Tensor<B, 3>) -> Option<Tensor<B, 3>> {
    if !is_autodiff::<B, X, C>() {
        return None;
    }
    downcast(op::<X, C>(downcast(h.clone())?))
}

fn op<X: Backend, C: CheckpointStrategy>(h: Tensor<Autodiff<X, C>, 3>) -> Tensor<Autodiff<X, C>, 3> {
    let h = h.into_primitive().tensor();
    let forward = |p: FloatTensor<X>| geglu_on_rows(tensor::<X, 3>(p)).into_primitive().tensor();
    let out = match GegluBackward.prepare::<C>([h.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let out = forward(h.primitive.clone());
            prep.finish(h.primitive, out)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(h.primitive)),
    };
    tensor(out)
}

/// Backward of GEGLU from its input alone: `d hidden = dy · gelu(gate)`,
/// `d gate = dy · hidden · (Φ(gate) + gate · φ(gate))`.
#[derive(Debug)]
struct GegluBackward;

impl<X: Backend> Backward<X, 1> for GegluBackward {
    type State = FloatTensor<X>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad_out = grads.consume::<X>(&ops.node);
        let [parent] = ops.parents;
        let Some(node) = parent else { return };
        // On rows, as the forward pass (`geglu_on_rows`).
        let h = tensor::<X, 3>(ops.state);
        let [batch, tokens, n2] = h.dims();
        let grad_out = tensor::<X, 3>(grad_out).reshape([batch * tokens, n2 / 2]);
        let dh = geglu_grad(h.reshape([batch * tokens, n2]), grad_out).reshape([batch, tokens, n2]);
        grads.register::<X>(node.id, dh.into_primitive().tensor());
    }
}

/// `dL/dh` of `hidden · gelu(gate)` from `h = [hidden, gate]` and `dL/dy`, computed in f32
/// and returned in `h`'s dtype.
fn geglu_grad<X: Backend, const D: usize>(h: Tensor<X, D>, grad_out: Tensor<X, D>) -> Tensor<X, D> {
    let (hidden, gate) = halves(h);
    geglu_grad_halves(hidden, gate, grad_out)
}

/// [`geglu_grad`] from the two halves of `h`.
fn geglu_grad_halves<X: Backend, const D: usize>(hidden: Tensor<X, D>, gate: Tensor<X, D>, grad_out: Tensor<X, D>) -> Tensor<X, D> {
    let dtype = hidden.dtype();
    let (hidden, gate) = (cast_to(hidden, DType::F32), cast_to(gate, DType::F32));
    let dy = cast_to(grad_out, DType::F32);
    let cdf = gate.clone().mul_scalar(std::f32::consts::FRAC_1_SQRT_2).erf().add_scalar(1.0).mul_scalar(0.5);
    let pdf = gate.clone().square().mul_scalar(-0.5).exp().mul_scalar(0.398_942_3);
    let d_hidden = dy.clone() * gate.clone() * cdf.clone();
    let d_gate = dy * hidden * (cdf + gate * pdf);
    cast_to(Tensor::cat(vec![d_hidden, d_gate], D - 1), dtype)
}

/// `geglu(proj(x))` for a feed-forward input layer.
///
/// When `proj` has no active adapter (none attached, merged, or multiplier 0) and the model
/// runs on burn's autodiff backend over Flex or CUDA, this is one op that keeps `x`, the
/// weight and the bias, and recomputes `proj(x)` in the backward pass (one extra matmul)
/// instead of keeping the 8x larger projection. Otherwise it is `geglu(proj.forward(x))`.
/// The gradients are the same either way.
///
/// ```
/// use burn::backend::{Autodiff, Flex};
/// use burn::nn::LinearConfig;
/// use burn::tensor::{Distribution, Tensor};
/// use lora_core::LoraLinear;
///
/// type B = Autodiff<Flex>;
/// let device = Default::default();
/// let proj = LoraLinear::new(LinearConfig::new(4, 16).init::<B>(&device));
/// let x = Tensor::<B, 3>::random([1, 3, 4], Distribution::Normal(0.0, 1.0), &device);
/// let fused = sd_model::activation::geglu_projected(&proj, x.clone());
/// let plain = sd_model::activation::geglu(proj.forward(x));
/// let err: f32 = (fused - plain).abs().max().into_scalar();
/// assert!(err < 1e-5);
/// ```
pub fn geglu_projected<B: Backend>(proj: &LoraLinear<B>, x: Tensor<B, 3>) -> Tensor<B, 3> {
    let [batch, tokens, d_in] = x.dims();
    let out = geglu_projected_rows(proj, x.reshape([batch * tokens, d_in]));
    let n = out.dims()[1];
    out.reshape([batch, tokens, n])
}

/// [`geglu_projected`] on `[rows, d_in]` rows (the transformer blocks' layout).
///
/// ```
/// use burn::backend::{Autodiff, Flex};
/// use burn::nn::LinearConfig;
/// use burn::tensor::{Distribution, Tensor};
/// use lora_core::LoraLinear;
///
/// type B = Autodiff<Flex>;
/// let device = Default::default();
/// let proj = LoraLinear::new(LinearConfig::new(4, 16).init::<B>(&device));
/// let x = Tensor::<B, 2>::random([3, 4], Distribution::Normal(0.0, 1.0), &device);
/// let fused = sd_model::activation::geglu_projected_rows(&proj, x.clone());
/// let plain = sd_model::activation::geglu(proj.forward(x.unsqueeze::<3>())).reshape([3, 8]);
/// let err: f32 = (fused - plain).abs().max().into_scalar();
/// assert!(err < 1e-5);
/// ```
pub fn geglu_projected_rows<B: Backend>(proj: &LoraLinear<B>, x: Tensor<B, 2>) -> Tensor<B, 2> {
    let weight = proj.base.weight.val();
    if proj.has_active_adapter() || weight.dtype() != x.dtype() {
        // (GEGLU's own op is 3-d: one reshape each way, on this path only.)
        let h = proj.forward(x);
        let [rows, n] = h.dims();
        return geglu(h.reshape([1, rows, n])).reshape([rows, n / 2]);
    }
    let bias = match &proj.base.bias {
        Some(b) => b.val(),
        None => cast_to(Tensor::zeros([weight.dims()[1]], &weight.device()), weight.dtype()),
    };
    let args = (x, weight, bias);
    if let Some(out) = on_known_autodiff!(projected_for_autodiff::<B>(&args)) {
        return out;
    }
    // The op's own arithmetic, so that a pass without autodiff gives the values a pass
    // with it does (gradient checkpointing recomputes from checkpoints taken without).
    let (x, w, b) = args;
    projected(x, w, b)
}

/// `geglu(x·W + b)` on `[rows, d_in]`, the op's forward arithmetic: GEGLU with the bias as
/// one operation where [`geglu_bias`] takes it (CUDA with the one-op linear layers), else
/// burn's ops.
fn projected<X: Backend>(x: Tensor<X, 2>, w: Tensor<X, 2>, b: Tensor<X, 1>) -> Tensor<X, 2> {
    match geglu_bias(matmul(x, w), b) {
        Ok(out) => out,
        Err((h, b)) => {
            let (hidden, gate) = bias_halves(h, b);
            hidden * gelu(gate)
        }
    }
}

fn projected_for_autodiff<B: Backend, X: Backend, C: CheckpointStrategy>(args: &(Tensor<B, 2>, Tensor<B, 2>, Tensor<B, 1>)) -> Option<Tensor<B, 2>> {
    if !is_autodiff::<B, X, C>() {
        return None;
    }
    let (x, w, b) = args.clone();
    downcast(projected_op::<X, C>(downcast(x)?, downcast(w)?, downcast(b)?))
}

/// The halves `(hidden, gate)` of `h + b` for the projection `h = x·W` (`[rows, 2n]`), as
/// `[rows, n]`. Each half gets its half of the bias after the split, and the rows stay
/// rows: on burn's fusion the slices are views that close no block after the additions, so
/// the bias joins the GELU's kernel (or the gradient's) instead of writing the whole
/// `[rows, 2n]` projection once more.
fn bias_halves<X: Backend>(h: Tensor<X, 2>, b: Tensor<X, 1>) -> (Tensor<X, 2>, Tensor<X, 2>) {
    let n = h.dims()[1] / 2;
    let (b_hidden, b_gate) = (b.clone().narrow(0, 0, n).unsqueeze::<2>(), b.narrow(0, n, n).unsqueeze::<2>());
    let (hidden, gate) = halves(h);
    (hidden + b_hidden, gate + b_gate)
}

fn projected_op<X: Backend, C: CheckpointStrategy>(x: Tensor<Autodiff<X, C>, 2>, w: Tensor<Autodiff<X, C>, 2>, b: Tensor<Autodiff<X, C>, 1>) -> Tensor<Autodiff<X, C>, 2> {
    let (x, w, b) = (x.into_primitive().tensor(), w.into_primitive().tensor(), b.into_primitive().tensor());
    let forward = |x: FloatTensor<X>, w: FloatTensor<X>, b: FloatTensor<X>| {
        projected(tensor::<X, 2>(x), tensor(w), tensor(b)).into_primitive().tensor()
    };
    let out = match ProjectedGegluBackward.prepare::<C>([x.node.clone(), w.node.clone(), b.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let out = forward(x.primitive.clone(), w.primitive.clone(), b.primitive.clone());
            prep.finish((x.primitive, w.primitive, b.primitive), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(x.primitive, w.primitive, b.primitive)),
    };
    tensor(out)
}

/// Backward of `geglu(x·W + b)` from `x`, `W` and `b`: recomputes the projection `h`, then
/// `dh` as GEGLU's backward does, `dx = dh·Wᵀ`, `dW = xᵀ·dh`, `db = Σ dh`.
#[derive(Debug)]
struct ProjectedGegluBackward;

impl<X: Backend> Backward<X, 3> for ProjectedGegluBackward {
    type State = (FloatTensor<X>, FloatTensor<X>, FloatTensor<X>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad_out = tensor::<X, 2>(grads.consume::<X>(&ops.node));
        let (x, w, b) = (tensor::<X, 2>(ops.state.0), tensor::<X, 2>(ops.state.1), tensor::<X, 1>(ops.state.2));
        // The projection recomputed (through `matmul`: cuBLAS on CUDA when on), then GEGLU's
        // gradient with the bias in one operation where it applies.
        let dh = match geglu_bias_backward(matmul(x.clone(), w.clone()), b, grad_out) {
            Ok(dh) => dh,
            Err((h, b, grad_out)) => {
                let (hidden, gate) = bias_halves(h, b);
                geglu_grad_halves(hidden, gate, grad_out)
            }
        };
        let [px, pw, pb] = ops.parents;
        if let Some(node) = pw {
            let dw = matmul_transposed(x.clone(), dh.clone(), true, false);
            grads.register::<X>(node.id, dw.into_primitive().tensor());
        }
        if let Some(node) = pb {
            grads.register::<X>(node.id, dh.clone().sum_dim(0).squeeze_dim::<1>(0).into_primitive().tensor());
        }
        if let Some(node) = px {
            let dx = matmul_transposed(dh, w, false, true);
            grads.register::<X>(node.id, dx.into_primitive().tensor());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, NoCheckpointing};
    use burn::backend::Flex;
    use burn::tensor::Distribution;

    fn check<C: CheckpointStrategy>() {
        let device = Default::default();
        let h0 = Tensor::<Flex, 3>::random([2, 5, 16], Distribution::Normal(0.0, 2.0), &device);
        let w = Tensor::<Flex, 3>::random([2, 5, 8], Distribution::Normal(0.0, 1.0), &device);
        let h = Tensor::<Autodiff<Flex, C>, 3>::from_inner(h0.clone()).require_grad();
        let ours = geglu(h.clone());
        let grads = (ours.clone() * Tensor::from_inner(w.clone())).sum().backward();
        let h2 = Tensor::<Autodiff<Flex, C>, 3>::from_inner(h0).require_grad();
        let (hidden, gate) = halves(h2.clone());
        let reference = hidden * gelu(gate);
        let grads2 = (reference.clone() * Tensor::from_inner(w)).sum().backward();
        let rel = |a: Tensor<Flex, 3>, b: Tensor<Flex, 3>| -> f32 {
            let scale: f32 = b.clone().abs().max().into_scalar();
            let diff: f32 = (a - b).abs().max().into_scalar();
            diff / scale
        };
        assert!(rel(ours.inner(), reference.inner()) < 1e-6);
        let err = rel(h.grad(&grads).unwrap(), h2.grad(&grads2).unwrap());
        assert!(err < 1e-4, "gradient relative error {err}");
    }

    #[test]
    fn geglu_backward_matches_burns() {
        check::<NoCheckpointing>();
        check::<BalancedCheckpointing>();
    }

    /// The projected op against `geglu(proj.forward(x))`: output, input gradient and, for a
    /// trainable projection, weight and bias gradients; a frozen projection gets none.
    fn check_projected<C: CheckpointStrategy>() {
        use burn::module::Param;
        use burn::nn::LinearConfig;
        type A<C> = Autodiff<Flex, C>;
        let device = Default::default();
        for frozen in [false, true] {
            // `LoraLinear::new` freezes its base; a trainable base is rebuilt from its values.
            let mut proj = LoraLinear::new(LinearConfig::new(6, 16).init::<A<C>>(&device));
            if !frozen {
                proj.base.weight = Param::from_tensor(proj.base.weight.val());
                proj.base.bias = proj.base.bias.map(|b| Param::from_tensor(b.val()));
            }
            let x0 = Tensor::<Flex, 3>::random([2, 5, 6], Distribution::Normal(0.0, 1.0), &device);
            let w = Tensor::<Flex, 3>::random([2, 5, 8], Distribution::Normal(0.0, 1.0), &device);
            let run = |fused: bool| {
                let x = Tensor::<A<C>, 3>::from_inner(x0.clone()).require_grad();
                let y = if fused { geglu_projected(&proj, x.clone()) } else { geglu(proj.forward(x.clone())) };
                let grads = (y.clone() * Tensor::from_inner(w.clone())).sum().backward();
                let dw = proj.base.weight.grad(&grads).map(|g| g.flatten::<1>(0, 1));
                let db = proj.base.bias.as_ref().and_then(|b| b.grad(&grads));
                (y.inner().flatten::<1>(0, 2), x.grad(&grads).unwrap().flatten::<1>(0, 2), dw, db)
            };
            let (ours, reference) = (run(true), run(false));
            let rel = |a: Tensor<Flex, 1>, b: Tensor<Flex, 1>| -> f32 {
                let scale: f32 = b.clone().abs().max().into_scalar();
                let diff: f32 = (a - b).abs().max().into_scalar();
                diff / scale
            };
            assert!(rel(ours.0, reference.0) < 1e-5, "frozen {frozen}: output");
            assert!(rel(ours.1, reference.1) < 1e-4, "frozen {frozen}: dx");
            assert_eq!(ours.2.is_some(), !frozen, "frozen {frozen}: weight gradient presence");
            assert_eq!(reference.2.is_some(), !frozen);
            if let (Some(a), Some(b)) = (ours.2, reference.2) {
                assert!(rel(a, b) < 1e-4, "dW");
            }
            if let (Some(a), Some(b)) = (ours.3, reference.3) {
                assert!(rel(a, b) < 1e-4, "db");
            }
        }
    }

    #[test]
    fn projected_geglu_matches_the_plain_path() {
        check_projected::<NoCheckpointing>();
        check_projected::<BalancedCheckpointing>();
    }
}
