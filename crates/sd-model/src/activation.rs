//! GEGLU, the transformer feed-forward's gated activation, as one differentiable op.
//!
//! `hidden · gelu(gate)` composed from tensor ops leaves autodiff holding `hidden`, `gate`
//! and `gelu(gate)` (three `[batch, tokens, 4·dim]` tensors per transformer block) until the
//! backward pass; [`geglu`]'s own backward (on burn's autodiff backend over Flex or CUDA, see
//! [`crate::autodiff_ext`]) keeps only the projection it splits and recomputes the rest.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::activation::gelu;
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, Tensor};
use lora_core::precision::cast_to;

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
    let (hidden, gate) = halves(h);
    hidden * gelu(gate)
}

fn halves<B: Backend>(h: Tensor<B, 3>) -> (Tensor<B, 3>, Tensor<B, 3>) {
    let n = h.dims()[2] / 2;
    (h.clone().narrow(2, 0, n), h.narrow(2, n, n))
}

fn for_autodiff<B: Backend, X: Backend, C: CheckpointStrategy>(h: &Tensor<B, 3>) -> Option<Tensor<B, 3>> {
    if !is_autodiff::<B, X, C>() {
        return None;
    }
    downcast(op::<X, C>(downcast(h.clone())?))
}

fn op<X: Backend, C: CheckpointStrategy>(h: Tensor<Autodiff<X, C>, 3>) -> Tensor<Autodiff<X, C>, 3> {
    let h = h.into_primitive().tensor();
    let forward = |p: FloatTensor<X>| {
        let (hidden, gate) = halves(tensor::<X, 3>(p));
        (hidden * gelu(gate)).into_primitive().tensor()
    };
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
        let h = tensor::<X, 3>(ops.state);
        let dtype = h.dtype();
        let (hidden, gate) = halves(cast_to(h, DType::F32));
        let dy = cast_to(tensor::<X, 3>(grad_out), DType::F32);
        let cdf = gate.clone().mul_scalar(std::f32::consts::FRAC_1_SQRT_2).erf().add_scalar(1.0).mul_scalar(0.5);
        let pdf = gate.clone().square().mul_scalar(-0.5).exp().mul_scalar(0.398_942_3);
        let d_hidden = dy.clone() * gate.clone() * cdf.clone();
        let d_gate = dy * hidden * (cdf + gate * pdf);
        let dh = Tensor::cat(vec![d_hidden, d_gate], 2);
        grads.register::<X>(node.id, cast_to(dh, dtype).into_primitive().tensor());
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
}
