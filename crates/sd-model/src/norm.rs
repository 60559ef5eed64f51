//! GroupNorm with an optional SiLU, and LayerNorm, as one differentiable op.
//!
//! burn 0.21's `GroupNorm` is composed of elementwise tensor ops, and autodiff keeps most of
//! their full-size intermediates (the centred input, the normalised input, the affine result,
//! SiLU's input and sigmoid) until the backward pass; the UNet has two GroupNorm + SiLU pairs
//! per ResNet block, so these dominate activation memory next to attention. [`group_norm`]
//! registers its own backward on burn's autodiff backend over Flex or CUDA: it keeps only the
//! input and the per-group mean and inverse deviation, and recomputes the rest. Statistics
//! are computed in f32 whatever the input dtype (as PyTorch's autocast does), so a bf16 or f16
//! model normalises accurately. Other backends use the same forward without the custom
//! backward. The forward and backward passes themselves are
//! [`lora_core::kernels::group_norm`] and [`lora_core::kernels::group_norm_backward`] (or,
//! with frozen γ and β, [`lora_core::kernels::group_norm_input_grad_plus`], which also adds
//! the input's gradient from its other consumers, a residual's): fused CubeCL kernels
//! on CUDA with [`lora_core::kernels::set_fused_group_norm`] on (for LayerNorm, the forward
//! pass and the input gradient), burn's ops elsewhere.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::nn::{GroupNorm, LayerNorm};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::Tensor;
use lora_core::norm::{LoraGroupNorm, LoraLayerNorm};
use lora_core::kernels::{group_norm as group_norm_forward, group_norm_backward, group_norm_input_grad_plus, group_norm_output, GroupNormSpec};

use crate::autodiff_ext::{downcast, is_autodiff, on_known_autodiff, tensor};

/// `silu(norm(x))` (or `norm(x)` when `silu` is false) for `[batch, channels, h, w]`.
///
/// ```
/// use burn::backend::Flex;
/// use burn::nn::GroupNormConfig;
/// use burn::tensor::activation::silu;
/// use burn::tensor::{Distribution, Tensor};
///
/// let device = Default::default();
/// let norm = GroupNormConfig::new(4, 8).init::<Flex>(&device);
/// let x = Tensor::<Flex, 4>::random([2, 8, 5, 5], Distribution::Normal(1.0, 2.0), &device);
/// let ours = sd_model::norm::group_norm(&norm, x.clone(), true);
/// let reference = silu(norm.forward(x));
/// let err: f32 = (ours - reference).abs().max().into_scalar();
/// assert!(err < 1e-5);
/// ```
pub fn group_norm<B: Backend>(norm: &GroupNorm<B>, x: Tensor<B, 4>, silu: bool) -> Tensor<B, 4> {
    let (Some(gamma), Some(beta)) = (&norm.gamma, &norm.beta) else {
        let y = norm.forward(x);
        return if silu { burn::tensor::activation::silu(y) } else { y };
    };
    let spec = GroupNormSpec {
        groups: norm.num_groups,
        epsilon: norm.epsilon,
        silu,
    };
    normalize(x, gamma.val(), beta.val(), spec)
}

/// [`group_norm`] of a GroupNorm that may hold LyCORIS' norm module
/// ([`lora_core::norm`]): with one attached (and not merged), the norm runs with
/// `γ + m · w_norm` and `β + m · b_norm` (in f32), and the backward pass gives the module
/// its gradients.
///
/// ```
/// use burn::backend::Flex;
/// use burn::nn::GroupNormConfig;
/// use burn::tensor::{Distribution, Tensor};
/// use lora_core::norm::LoraGroupNorm;
/// use lora_core::LoraConfig;
///
/// let device = Default::default();
/// let mut norm = LoraGroupNorm::new(GroupNormConfig::new(2, 4).init::<Flex>(&device));
/// let x = Tensor::<Flex, 4>::random([1, 4, 3, 3], Distribution::Normal(0.0, 1.0), &device);
/// let plain = sd_model::norm::group_norm(&norm.base, x.clone(), true);
/// norm.attach_new(&LoraConfig::new(1), &device)?;
/// // A fresh module changes nothing.
/// let err: f32 = (sd_model::norm::lora_group_norm(&norm, x, true) - plain).abs().max().into_scalar();
/// assert!(err < 1e-6);
/// # Ok::<(), lora_core::LoraError>(())
/// ```
pub fn lora_group_norm<B: Backend>(norm: &LoraGroupNorm<B>, x: Tensor<B, 4>, silu: bool) -> Tensor<B, 4> {
    // Without a module (or with it merged) these are the base norm's own values.
    let (Some(gamma), Some(beta)) = norm.params() else {
        return group_norm(&norm.base, x, silu);
    };
    let spec = GroupNormSpec {
        groups: norm.base.num_groups,
        epsilon: norm.base.epsilon,
        silu,
    };
    normalize(x, gamma, beta, spec)
}

/// The GroupNorm op with its own backward on the autodiff backends it knows, its
/// forward alone elsewhere (the op's own arithmetic either way, so that both give the
/// same values: gradient checkpointing recomputes from checkpoints taken without
/// autodiff).
fn normalize<B: Backend, const D: usize>(x: Tensor<B, D>, gamma: Tensor<B, 1>, beta: Tensor<B, 1>, spec: GroupNormSpec) -> Tensor<B, D> {
    let args = (x, gamma, beta);
    if let Some(out) = on_known_autodiff!(for_autodiff::<B, D>(&args, spec)) {
        return out;
    }
    let (x, gamma, beta) = args;
    group_norm_output(x, gamma, beta, spec)
}

/// Runs the op with its own backward when `B` is `Autodiff<X, C>` (see
/// [`crate::autodiff_ext`]).
fn for_autodiff<B: Backend, X: Backend, C: CheckpointStrategy, const D: usize>(args: &(Tensor<B, D>, Tensor<B, 1>, Tensor<B, 1>), spec: GroupNormSpec) -> Option<Tensor<B, D>> {
    if !is_autodiff::<B, X, C>() {
        return None;
    }
    let (x, gamma, beta) = args.clone();
    let out = autodiff_op::<X, C, D>(downcast(x)?, downcast(gamma)?, downcast(beta)?, spec);
    downcast(out)
}

fn autodiff_op<X: Backend, C: CheckpointStrategy, const D: usize>(
    x: Tensor<Autodiff<X, C>, D>,
    gamma: Tensor<Autodiff<X, C>, 1>,
    beta: Tensor<Autodiff<X, C>, 1>,
    spec: GroupNormSpec,
) -> Tensor<Autodiff<X, C>, D> {
    let (x, gamma, beta) = (x.into_primitive().tensor(), gamma.into_primitive().tensor(), beta.into_primitive().tensor());
    // A key to the input's gradient in the backward pass: its graph node, with neither its
    // data (γ's small tensor stands in) nor its reference count (autodiff's memory
    // management frees a node's graph by that count; a clone held here would pin it).
    let input = (!x.node.requirement.is_none()).then(|| {
        let mut key = x.clone();
        key.primitive = gamma.primitive.clone();
        key.rc = std::sync::Arc::new(key.node.id);
        key
    });
    let op = GroupNormBackward::<X, D> { spec, input };
    let out = match op.prepare::<C>([x.node.clone(), gamma.node.clone(), beta.node.clone()]).compute_bound().stateful() {
        OpsKind::Tracked(prep) => {
            let (y, mean, rstd) = group_norm_forward::<X, D>(tensor(x.primitive.clone()), tensor(gamma.primitive.clone()), tensor(beta.primitive.clone()), spec);
            let stats = (mean.into_primitive().tensor(), rstd.into_primitive().tensor());
            prep.finish((x.primitive, gamma.primitive, beta.primitive, stats.0, stats.1), y.into_primitive().tensor())
        }
        OpsKind::UnTracked(prep) => {
            let y = group_norm_output::<X, D>(tensor(x.primitive), tensor(gamma.primitive), tensor(beta.primitive), spec);
            prep.finish(y.into_primitive().tensor())
        }
    };
    tensor(out)
}

/// Backward of GroupNorm (+ SiLU) from the input and the group statistics alone, for a
/// `D`-dimensional input.
#[derive(Debug)]
struct GroupNormBackward<X: Backend, const D: usize> {
    spec: GroupNormSpec,
    /// The key of the input's gradient (when the input is tracked).
    input: Option<FloatTensor<Autodiff<X>>>,
}

impl<X: Backend, const D: usize> Backward<X, 3> for GroupNormBackward<X, D> {
    /// Input, γ, β, per-group mean and 1/std.
    type State = (FloatTensor<X>, FloatTensor<X>, FloatTensor<X>, FloatTensor<X>, FloatTensor<X>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let grad_out = grads.consume::<X>(&ops.node);
        let (x, gamma, beta, mean, rstd) = ops.state;
        let [px, pg, pb] = ops.parents;
        let (x, gamma, beta, mean, rstd, dy) = (tensor(x), tensor(gamma), tensor(beta), tensor(mean), tensor(rstd), tensor(grad_out));
        if pg.is_none() && pb.is_none() {
            // Frozen γ and β (LoRA training): the input gradient alone, which also lets a
            // LayerNorm take the fused row kernels.
            if let Some(node) = px {
                // The input's gradient from its other consumers so far (a residual
                // connection's, registered first: the backward pass runs in reverse order)
                // goes into the kernel, not into an addition of its own after it.
                let acc = self.input.as_ref().and_then(|input| grads.remove::<X>(input)).map(tensor::<X, D>);
                let dx = group_norm_input_grad_plus::<X, D>(x, gamma, beta, mean, rstd, dy, self.spec, acc);
                grads.register::<X>(node.id, dx.into_primitive().tensor());
            }
            return;
        }
        let (dx, dgamma, dbeta) = group_norm_backward::<X, D>(x, gamma, beta, mean, rstd, dy, self.spec);
        if let Some(node) = px {
            grads.register::<X>(node.id, dx.into_primitive().tensor());
        }
        if let Some(node) = pg {
            grads.register::<X>(node.id, dgamma.into_primitive().tensor());
        }
        if let Some(node) = pb {
            grads.register::<X>(node.id, dbeta.into_primitive().tensor());
        }
    }
}

/// LayerNorm over the last dimension of `[batch, tokens, channels]`, with [`group_norm`]'s
/// backward (input and per-row statistics kept, statistics in f32).
/// `epsilon` must be the one `norm` was built with (burn keeps it private).
///
/// ```
/// use burn::backend::Flex;
/// use burn::nn::LayerNormConfig;
/// use burn::tensor::{Distribution, Tensor};
///
/// let device = Default::default();
/// let norm = LayerNormConfig::new(16).with_epsilon(1e-5).init::<Flex>(&device);
/// let x = Tensor::<Flex, 3>::random([2, 7, 16], Distribution::Normal(1.0, 2.0), &device);
/// let ours = sd_model::norm::layer_norm(&norm, x.clone(), 1e-5);
/// let err: f32 = (ours - norm.forward(x)).abs().max().into_scalar();
/// assert!(err < 1e-5);
/// ```
pub fn layer_norm<B: Backend>(norm: &LayerNorm<B>, x: Tensor<B, 3>, epsilon: f64) -> Tensor<B, 3> {
    let [b, s, d] = x.dims();
    layer_norm_rows(norm, x.reshape([b * s, d]), epsilon).reshape([b, s, d])
}

/// [`layer_norm`] of `[rows, channels]` rows.
///
/// ```
/// use burn::backend::Flex;
/// use burn::nn::LayerNormConfig;
/// use burn::tensor::{Distribution, Tensor};
///
/// let device = Default::default();
/// let norm = LayerNormConfig::new(8).with_epsilon(1e-5).init::<Flex>(&device);
/// let x = Tensor::<Flex, 2>::random([3, 8], Distribution::Normal(0.0, 1.0), &device);
/// let ours = sd_model::norm::layer_norm_rows(&norm, x.clone(), 1e-5);
/// let err: f32 = (ours - norm.forward(x)).abs().max().into_scalar();
/// assert!(err < 1e-5);
/// ```
pub fn layer_norm_rows<B: Backend>(norm: &LayerNorm<B>, x: Tensor<B, 2>, epsilon: f64) -> Tensor<B, 2> {
    let Some(beta) = &norm.beta else {
        return norm.forward(x);
    };
    // LayerNorm of a row is GroupNorm with one group over `[rows, channels]`: same
    // statistics, γ and β per channel, so the GroupNorm op (and its backward) serves both,
    // on the rows as they are (a reshape to `[rows, channels, 1, 1]` and back would be four
    // more operations per norm on a fusion backend, with the backward's).
    normalize(x, norm.gamma.val(), beta.val(), layer_spec(epsilon))
}

/// LayerNorm as a GroupNorm of one group over `[rows, channels]`.
fn layer_spec(epsilon: f64) -> GroupNormSpec {
    GroupNormSpec {
        groups: 1,
        epsilon,
        silu: false,
    }
}

/// [`layer_norm_rows`] of a LayerNorm that may hold LyCORIS' norm module (see
/// [`lora_group_norm`]).
///
/// ```
/// use burn::backend::Flex;
/// use burn::nn::LayerNormConfig;
/// use burn::tensor::{Distribution, Tensor};
/// use lora_core::norm::LoraLayerNorm;
/// use lora_core::LoraConfig;
///
/// let device = Default::default();
/// let mut norm = LoraLayerNorm::new(LayerNormConfig::new(8).init::<Flex>(&device));
/// norm.attach_new(&LoraConfig::new(1), &device)?;
/// let x = Tensor::<Flex, 2>::random([3, 8], Distribution::Normal(0.0, 1.0), &device);
/// let err: f32 = (sd_model::norm::lora_layer_norm_rows(&norm, x.clone(), 1e-5) - norm.base.forward(x)).abs().max().into_scalar();
/// assert!(err < 1e-5);
/// # Ok::<(), lora_core::LoraError>(())
/// ```
pub fn lora_layer_norm_rows<B: Backend>(norm: &LoraLayerNorm<B>, x: Tensor<B, 2>, epsilon: f64) -> Tensor<B, 2> {
    let (Some(gamma), Some(beta)) = norm.params() else {
        return layer_norm_rows(&norm.base, x, epsilon);
    };
    normalize(x, gamma, beta, layer_spec(epsilon))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, NoCheckpointing};
    use burn::backend::Flex;
    use burn::module::Param;
    use burn::module::Module;
    use burn::nn::GroupNormConfig;
    use burn::tensor::Distribution;

    /// lora-core's switches and counters are process-global: the tests that flip them take
    /// turns.
    #[cfg(feature = "vulkan-test")]
    use crate::KERNEL_SWITCHES as SWITCH;

    fn max_rel<const D: usize>(a: Tensor<Flex, D>, b: Tensor<Flex, D>) -> f32 {
        let scale: f32 = b.clone().abs().max().into_scalar();
        let diff: f32 = (a - b).abs().max().into_scalar();
        diff / scale.max(1e-12)
    }

    /// Output and the gradients of x, γ and β against differentiating burn's GroupNorm.
    fn check<C: CheckpointStrategy>(silu: bool) {
        type A<C> = Autodiff<Flex, C>;
        let device = Default::default();
        let mut norm = GroupNormConfig::new(4, 8).with_epsilon(1e-5).init::<A<C>>(&device);
        norm.gamma = Some(Param::from_tensor(Tensor::random([8], Distribution::Normal(1.0, 0.5), &device)));
        norm.beta = Some(Param::from_tensor(Tensor::random([8], Distribution::Normal(0.0, 0.5), &device)));
        let x0 = Tensor::<Flex, 4>::random([2, 8, 5, 3], Distribution::Normal(0.5, 2.0), &device);
        let w = Tensor::<Flex, 4>::random([2, 8, 5, 3], Distribution::Normal(0.0, 1.0), &device);
        let x = Tensor::<A<C>, 4>::from_inner(x0.clone()).require_grad();
        let ours = group_norm(&norm, x.clone(), silu);
        let grads = (ours.clone() * Tensor::from_inner(w.clone())).sum().backward();
        let x2 = Tensor::<A<C>, 4>::from_inner(x0).require_grad();
        let reference = norm.forward(x2.clone());
        let reference = if silu { burn::tensor::activation::silu(reference) } else { reference };
        let grads2 = (reference.clone() * Tensor::from_inner(w)).sum().backward();
        assert!(max_rel(ours.inner(), reference.inner()) < 1e-5);
        assert!(max_rel(x.grad(&grads).unwrap(), x2.grad(&grads2).unwrap()) < 1e-4);
        let (g, b) = (norm.gamma.as_ref().unwrap(), norm.beta.as_ref().unwrap());
        assert!(max_rel(g.grad(&grads).unwrap(), g.grad(&grads2).unwrap()) < 1e-4);
        assert!(max_rel(b.grad(&grads).unwrap(), b.grad(&grads2).unwrap()) < 1e-4);
    }

    /// A norm module's `w_norm` and `b_norm` (and the input) get through the op's own
    /// backward the gradients burn's composed norm gives them with `γ + m·w_norm`,
    /// `β + m·b_norm`; the frozen base γ and β take none.
    fn check_module<C: CheckpointStrategy>(layer: bool) {
        use burn::nn::LayerNormConfig;
        use lora_core::LoraConfig;
        type A<C> = Autodiff<Flex, C>;
        let device = Default::default();
        let (c, k) = (8, 0.7);
        let random = |mean, std| Tensor::<Flex, 1>::random([c], Distribution::Normal(mean, std), &device);
        let n = if layer { 10 * c } else { 18 * c };
        let x0 = Tensor::<Flex, 1>::random([n], Distribution::Normal(0.5, 2.0), &device);
        let w = Tensor::<Flex, 1>::random([n], Distribution::Normal(0.0, 1.0), &device);
        let (gamma, beta, dw, db) = (random(1.0, 0.3), random(0.0, 0.3), random(0.0, 0.3), random(0.0, 0.3));
        let frozen = |t: &Tensor<Flex, 1>| Param::from_tensor(Tensor::<A<C>, 1>::from_inner(t.clone())).set_require_grad(false);
        let loss = |y: Tensor<A<C>, 1>| (y * Tensor::from_inner(w.clone())).sum();

        // Ours: the module on the wrapped norm, through the op's own backward.
        let x = Tensor::<A<C>, 1>::from_inner(x0.clone()).require_grad();
        let factors = || vec![Param::from_tensor(Tensor::from_inner(dw.clone().reshape([c, 1]))), Param::from_tensor(Tensor::from_inner(db.clone().reshape([c, 1])))];
        let (ours, module, base) = if layer {
            let mut norm = LayerNormConfig::new(c).with_epsilon(1e-5).init::<A<C>>(&device);
            (norm.gamma, norm.beta) = (frozen(&gamma), Some(frozen(&beta)));
            let mut norm = LoraLayerNorm::new(norm);
            norm.attach_new(&LoraConfig::new(1), &device).unwrap();
            norm.set_multiplier(k);
            norm.lycoris.as_mut().unwrap().factors = factors();
            let y = lora_layer_norm_rows(&norm, x.clone().reshape([10, c]), 1e-5).reshape([n]);
            (y, norm.lycoris.unwrap(), (norm.base.gamma, norm.base.beta.unwrap()))
        } else {
            let mut norm = GroupNormConfig::new(4, c).with_epsilon(1e-5).init::<A<C>>(&device);
            (norm.gamma, norm.beta) = (Some(frozen(&gamma)), Some(frozen(&beta)));
            let mut norm = LoraGroupNorm::new(norm);
            norm.attach_new(&LoraConfig::new(1), &device).unwrap();
            norm.set_multiplier(k);
            norm.lycoris.as_mut().unwrap().factors = factors();
            let y = lora_group_norm(&norm, x.clone().reshape([2, c, 3, 3]), true).reshape([n]);
            (y, norm.lycoris.unwrap(), (norm.base.gamma.unwrap(), norm.base.beta.unwrap()))
        };
        let grads = loss(ours.clone()).backward();

        // Reference: the norm composed of burn's ops with `γ + k·dw`, `β + k·db`.
        let x2 = Tensor::<A<C>, 1>::from_inner(x0).require_grad();
        let (dw2, db2) = (Tensor::<A<C>, 1>::from_inner(dw).require_grad(), Tensor::<A<C>, 1>::from_inner(db).require_grad());
        let g2 = Tensor::<A<C>, 1>::from_inner(gamma) + dw2.clone().mul_scalar(k);
        let b2 = Tensor::<A<C>, 1>::from_inner(beta) + db2.clone().mul_scalar(k);
        let (groups, rows) = if layer { (10, 1) } else { (2 * 4, 2) };
        let grouped = x2.clone().reshape([groups, n / groups]);
        let centred = grouped.clone() - grouped.mean_dim(1);
        let normed = centred.clone() / centred.powi_scalar(2).mean_dim(1).add_scalar(1e-5).sqrt();
        let reference = if layer {
            (normed.reshape([10, c]) * g2.reshape([1, c]) + b2.reshape([1, c])).reshape([n])
        } else {
            let y = normed.reshape([rows, c, 3, 3]) * g2.reshape([1, c, 1, 1]) + b2.reshape([1, c, 1, 1]);
            burn::tensor::activation::silu(y).reshape([n])
        };
        let grads2 = loss(reference.clone()).backward();

        assert!(max_rel(ours.inner(), reference.inner()) < 1e-5, "layer {layer}: output");
        assert!(max_rel(x.grad(&grads).unwrap(), x2.grad(&grads2).unwrap()) < 1e-4, "layer {layer}: input gradient");
        let [gw, gb] = [0, 1].map(|i| module.factors[i].grad(&grads).unwrap().reshape([c]));
        assert!(max_rel(gw, dw2.grad(&grads2).unwrap()) < 1e-4, "layer {layer}: w_norm's gradient");
        assert!(max_rel(gb, db2.grad(&grads2).unwrap()) < 1e-4, "layer {layer}: b_norm's gradient");
        assert!(base.0.grad(&grads).is_none() && base.1.grad(&grads).is_none(), "layer {layer}: frozen base");
    }

    #[test]
    fn a_norm_module_trains_through_the_custom_backward() {
        check_module::<NoCheckpointing>(false);
        check_module::<NoCheckpointing>(true);
        check_module::<BalancedCheckpointing>(false);
    }

    #[test]
    fn custom_backward_matches_burns_group_norm() {
        check::<NoCheckpointing>(true);
        check::<NoCheckpointing>(false);
        check::<BalancedCheckpointing>(true);
    }

    fn check_layer_norm<C: CheckpointStrategy>() {
        use burn::nn::LayerNormConfig;
        type A<C> = Autodiff<Flex, C>;
        let device = Default::default();
        let mut norm = LayerNormConfig::new(12).with_epsilon(1e-5).init::<A<C>>(&device);
        norm.gamma = Param::from_tensor(Tensor::random([12], Distribution::Normal(1.0, 0.5), &device));
        norm.beta = Some(Param::from_tensor(Tensor::random([12], Distribution::Normal(0.0, 0.5), &device)));
        let x0 = Tensor::<Flex, 3>::random([2, 9, 12], Distribution::Normal(0.5, 2.0), &device);
        let w = Tensor::<Flex, 3>::random([2, 9, 12], Distribution::Normal(0.0, 1.0), &device);
        let x = Tensor::<A<C>, 3>::from_inner(x0.clone()).require_grad();
        let ours = layer_norm(&norm, x.clone(), 1e-5);
        let grads = (ours.clone() * Tensor::from_inner(w.clone())).sum().backward();
        let x2 = Tensor::<A<C>, 3>::from_inner(x0).require_grad();
        let reference = norm.forward(x2.clone());
        let grads2 = (reference.clone() * Tensor::from_inner(w)).sum().backward();
        assert!(max_rel(ours.inner(), reference.inner()) < 1e-5);
        assert!(max_rel(x.grad(&grads).unwrap(), x2.grad(&grads2).unwrap()) < 1e-4);
        let b = norm.beta.as_ref().unwrap();
        assert!(max_rel(norm.gamma.grad(&grads).unwrap(), norm.gamma.grad(&grads2).unwrap()) < 1e-4);
        assert!(max_rel(b.grad(&grads).unwrap(), b.grad(&grads2).unwrap()) < 1e-4);
    }

    /// Frozen γ and β (LoRA training) take the input-gradient-only path: same `dx`.
    #[test]
    fn frozen_parameters_give_the_same_input_gradient() {
        type A = Autodiff<Flex>;
        let device = Default::default();
        let norm = GroupNormConfig::new(4, 8).with_epsilon(1e-5).init::<A>(&device).no_grad();
        let trained = GroupNormConfig::new(4, 8).with_epsilon(1e-5).init::<A>(&device);
        let x0 = Tensor::<Flex, 4>::random([2, 8, 5, 3], Distribution::Normal(0.5, 2.0), &device);
        let w = Tensor::<Flex, 4>::random([2, 8, 5, 3], Distribution::Normal(0.0, 1.0), &device);
        let dx = |norm: &GroupNorm<A>| {
            let x = Tensor::<A, 4>::from_inner(x0.clone()).require_grad();
            let grads = (group_norm(norm, x.clone(), true) * Tensor::from_inner(w.clone())).sum().backward();
            x.grad(&grads).unwrap()
        };
        assert!(max_rel(dx(&norm), dx(&trained)) < 1e-6);
    }

    /// A frozen norm whose input also feeds a residual (`x·v`, made before or after the
    /// norm, so that its gradient reaches `x` before or after the norm's): the norm's
    /// backward adds it in (`group_norm_input_grad_plus`), and `dx` is burn's.
    #[test]
    fn residual_gradient_is_added_by_the_norm() {
        use burn::nn::LayerNormConfig;
        type A = Autodiff<Flex>;
        let device = Default::default();
        let gn = GroupNormConfig::new(4, 8).with_epsilon(1e-5).init::<A>(&device).no_grad();
        let ln = LayerNormConfig::new(15).with_epsilon(1e-5).init::<A>(&device).no_grad();
        let x0 = Tensor::<Flex, 4>::random([2, 8, 5, 3], Distribution::Normal(0.5, 2.0), &device);
        let w = Tensor::<Flex, 4>::random([2, 8, 5, 3], Distribution::Normal(0.0, 1.0), &device);
        let v = Tensor::<Flex, 4>::random([2, 8, 5, 3], Distribution::Normal(0.0, 1.0), &device);
        for residual_first in [false, true] {
            for layer in [false, true] {
                let dx = |ours: bool| {
                    let x = Tensor::<A, 4>::from_inner(x0.clone()).require_grad();
                    let residual = || x.clone() * Tensor::from_inner(v.clone());
                    let early = residual_first.then(residual);
                    let y = match (layer, ours) {
                        (false, true) => group_norm(&gn, x.clone(), true),
                        (false, false) => burn::tensor::activation::silu(gn.forward(x.clone())),
                        (true, true) => layer_norm(&ln, x.clone().reshape([2, 8, 15]), 1e-5).reshape([2, 8, 5, 3]),
                        (true, false) => ln.forward(x.clone().reshape([2, 8, 15])).reshape([2, 8, 5, 3]),
                    };
                    let r = early.unwrap_or_else(residual);
                    let grads = (y * Tensor::from_inner(w.clone()) + r).sum().backward();
                    x.grad(&grads).unwrap()
                };
                let err = max_rel(dx(true), dx(false));
                assert!(err < 1e-4, "layer norm {layer}, residual first {residual_first}: {err}");
            }
        }
    }

    #[test]
    fn layer_norm_backward_matches_burns() {
        check_layer_norm::<NoCheckpointing>();
        check_layer_norm::<BalancedCheckpointing>();
    }

    #[test]
    fn half_precision_inputs_keep_their_dtype() {
        use burn::tensor::{DType, FloatDType};
        let device = Default::default();
        let norm = GroupNormConfig::new(2, 4).init::<Flex>(&device);
        let x = Tensor::<Flex, 4>::random([1, 4, 3, 3], Distribution::Normal(0.0, 1.0), &device);
        let full = group_norm(&norm, x.clone(), true);
        let half = lora_core::precision::cast_all(norm, FloatDType::BF16);
        let y = group_norm(&half, x.cast(FloatDType::BF16), true);
        assert_eq!(y.dtype(), DType::BF16);
        assert!(max_rel(y.cast(FloatDType::F32), full) < 2e-2);
    }

    /// The fused GroupNorm kernels through this module's autodiff op on `Autodiff<Wgpu>`
    /// (lavapipe), against the same op in burn's ops: output and the gradients of x, γ, β.
    #[cfg(feature = "vulkan-test")]
    #[test]
    fn vulkan_fused_group_norm_matches_burn_ops() {
        let _guard = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
        type W = Autodiff<burn::backend::Wgpu>;
        let device = Default::default();
        let mut norm = GroupNormConfig::new(4, 16).with_epsilon(1e-5).init::<W>(&device);
        norm.gamma = Some(Param::from_tensor(Tensor::random([16], Distribution::Normal(1.0, 0.5), &device)));
        norm.beta = Some(Param::from_tensor(Tensor::random([16], Distribution::Normal(0.0, 0.5), &device)));
        let x0 = Tensor::<W, 4>::random([2, 16, 8, 6], Distribution::Normal(0.5, 2.0), &device);
        let w = Tensor::<W, 4>::random([2, 16, 8, 6], Distribution::Normal(0.0, 1.0), &device);
        let run = |fused: bool| {
            lora_core::kernels::set_fused_group_norm(fused);
            let x = x0.clone().require_grad();
            let y = group_norm(&norm, x.clone(), true);
            let grads = (y.clone() * w.clone()).sum().backward();
            lora_core::kernels::set_fused_group_norm(false);
            let (g, b) = (norm.gamma.as_ref().unwrap(), norm.beta.as_ref().unwrap());
            let flat = |t: Tensor<burn::backend::Wgpu, 4>| t.flatten::<1>(0, 3);
            [flat(y.inner()), flat(x.grad(&grads).unwrap()), g.grad(&grads).unwrap(), b.grad(&grads).unwrap()]
        };
        let before = lora_core::kernels::vendor_stats();
        let fused = run(true);
        let plain = run(false);
        for (what, (a, b)) in ["y", "dx", "dγ", "dβ"].iter().zip(fused.into_iter().zip(plain)) {
            let peak: f32 = b.clone().abs().max().into_scalar();
            let err: f32 = (a - b).abs().max().into_scalar();
            assert!(err <= 1e-4 * peak, "{what}: error {err} of the peak {peak}");
        }
        let after = lora_core::kernels::vendor_stats();
        assert_eq!(after.fallbacks, before.fallbacks, "fallbacks: {:?}", after.last_error);
        assert_eq!(after.fused_group_norm_calls - before.fused_group_norm_calls, 2, "forward and backward in the kernels");
    }

    /// A frozen GroupNorm + SiLU whose input also feeds a residual (a ResNet block's
    /// shortcut) on `Autodiff<Wgpu>`: the residual's gradient added inside the fused
    /// backward kernel against burn's ops.
    #[cfg(feature = "vulkan-test")]
    #[test]
    fn vulkan_fused_group_norm_adds_the_residual_gradient() {
        let _guard = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
        type W = Autodiff<burn::backend::Wgpu>;
        let device = Default::default();
        let norm = GroupNormConfig::new(4, 16).with_epsilon(1e-5).init::<W>(&device).no_grad();
        let x0 = Tensor::<W, 4>::random([2, 16, 8, 6], Distribution::Normal(0.5, 2.0), &device);
        let w = Tensor::<W, 4>::random([2, 16, 8, 6], Distribution::Normal(0.0, 1.0), &device);
        let run = |fused: bool| {
            lora_core::kernels::set_fused_group_norm(fused);
            let x = x0.clone().require_grad();
            let y = group_norm(&norm, x.clone(), true);
            // Made after the norm (as a ResNet block's shortcut), so its gradient reaches x
            // first and goes into the norm's backward kernel.
            let skip = x.clone() * w.clone().cos();
            let grads = (y * w.clone() + skip).sum().backward();
            lora_core::kernels::set_fused_group_norm(false);
            x.grad(&grads).unwrap()
        };
        let before = lora_core::kernels::vendor_stats();
        let (fused, plain) = (run(true), run(false));
        let peak: f32 = plain.clone().abs().max().into_scalar();
        let err: f32 = (fused - plain).abs().max().into_scalar();
        assert!(err <= 1e-4 * peak, "dx: error {err} of the peak {peak}");
        let after = lora_core::kernels::vendor_stats();
        assert_eq!(after.fallbacks, before.fallbacks, "fallbacks: {:?}", after.last_error);
        assert_eq!(after.fused_group_norm_calls - before.fused_group_norm_calls, 2, "forward and input gradient in the kernels");
    }

    /// A frozen LayerNorm (as in the transformer blocks under LoRA) through this module's
    /// autodiff op on `Autodiff<Wgpu>`: the fused row kernels against burn's ops.
    #[cfg(feature = "vulkan-test")]
    #[test]
    fn vulkan_fused_layer_norm_matches_burn_ops() {
        let _guard = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
        use burn::nn::LayerNormConfig;
        type W = Autodiff<burn::backend::Wgpu>;
        let device = Default::default();
        let mut norm = LayerNormConfig::new(96).with_epsilon(1e-5).init::<W>(&device);
        norm.gamma = Param::from_tensor(Tensor::random([96], Distribution::Normal(1.0, 0.5), &device));
        norm.beta = Some(Param::from_tensor(Tensor::random([96], Distribution::Normal(0.0, 0.5), &device)));
        let norm = norm.no_grad();
        let x0 = Tensor::<W, 3>::random([2, 40, 96], Distribution::Normal(0.5, 2.0), &device);
        let w = Tensor::<W, 3>::random([2, 40, 96], Distribution::Normal(0.0, 1.0), &device);
        let run = |fused: bool| {
            lora_core::kernels::set_fused_group_norm(fused);
            let x = x0.clone().require_grad();
            let y = layer_norm(&norm, x.clone(), 1e-5);
            // A residual use of x: its gradient is added by the norm's backward kernel.
            let grads = (y.clone() * w.clone() + x.clone() * w.clone().cos()).sum().backward();
            lora_core::kernels::set_fused_group_norm(false);
            [y.inner(), x.grad(&grads).unwrap()]
        };
        let before = lora_core::kernels::vendor_stats();
        let fused = run(true);
        let plain = run(false);
        for (what, (a, b)) in ["y", "dx"].iter().zip(fused.into_iter().zip(plain)) {
            let peak: f32 = b.clone().abs().max().into_scalar();
            let err: f32 = (a - b).abs().max().into_scalar();
            assert!(err <= 1e-4 * peak, "{what}: error {err} of the peak {peak}");
        }
        let after = lora_core::kernels::vendor_stats();
        assert_eq!(after.fallbacks, before.fallbacks, "fallbacks: {:?}", after.last_error);
        assert_eq!(after.fused_group_norm_calls - before.fused_group_norm_calls, 2, "forward and input gradient in the kernels");
    }

    /// The tiny UNet with LoRA adapters on `Autodiff<Wgpu>` (lavapipe), a training step with
    /// the fused norms on against off: every GroupNorm (+ SiLU) and LayerNorm of the model
    /// at its real shapes (8×8 and 4×4 planes in the kernels, 2×2 in burn's ops), output and
    /// one adapter's gradients.
    #[cfg(feature = "vulkan-test")]
    #[test]
    fn vulkan_fused_norms_in_a_unet_training_step() {
        use crate::targets::{attach_new_adapters, Selection, UnetTargets};
        use crate::{UNet2DConditionModel, UnetConfig};
        use lora_core::LoraConfig;
        let _guard = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
        type W = Autodiff<burn::backend::Wgpu>;
        let device = Default::default();
        let mut unet = UNet2DConditionModel::<W>::new(&UnetConfig::tiny(), &device).unwrap().no_grad();
        attach_new_adapters(&mut unet, &Selection::new(UnetTargets::Attn), &LoraConfig::new(2), &device).unwrap();
        let adapter = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.adapter.as_mut().unwrap();
        adapter.up.weight = Param::from_tensor(Tensor::random([2, 64], Distribution::Normal(0.0, 0.1), &device));
        let x = Tensor::<W, 4>::random([2, 4, 8, 8], Distribution::Normal(0.0, 1.0), &device);
        let t = Tensor::<W, 1>::from_floats([10.0, 900.0], &device);
        let ctx = Tensor::<W, 3>::random([2, 77, 32], Distribution::Normal(0.0, 1.0), &device);
        let run = |fused: bool| {
            lora_core::kernels::set_fused_group_norm(fused);
            let out = unet.forward(x.clone(), t.clone(), ctx.clone()).unwrap();
            let grads = (out.clone() - x.clone()).powf_scalar(2.0).mean().backward();
            lora_core::kernels::set_fused_group_norm(false);
            let a = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q.adapter.as_ref().unwrap();
            let flat = |t: Tensor<burn::backend::Wgpu, 2>| t.flatten::<1>(0, 1);
            [out.inner().flatten::<1>(0, 3), flat(a.up.weight.grad(&grads).unwrap()), flat(a.down.weight.grad(&grads).unwrap())]
        };
        let before = lora_core::kernels::vendor_stats();
        let fused = run(true);
        let plain = run(false);
        for (what, (a, b)) in ["output", "grad up", "grad down"].iter().zip(fused.into_iter().zip(plain)) {
            let peak: f32 = b.clone().abs().max().into_scalar();
            let err: f32 = (a - b).abs().max().into_scalar();
            assert!(err <= 1e-4 * peak, "{what}: error {err} of the peak {peak}");
        }
        // Counted when the fusion stream runs the ops, i.e. once the results were read.
        let after = lora_core::kernels::vendor_stats();
        assert_eq!(after.fallbacks, before.fallbacks, "fallbacks: {:?}", after.last_error);
        let calls = after.fused_group_norm_calls - before.fused_group_norm_calls;
        assert!(calls >= 20, "only {calls} norm passes ran in the kernels");
    }
}
