//! How sd-model's ops with hand-written backward passes reach burn's autodiff internals.
//!
//! burn registers custom backward passes through its `Autodiff<X, C>` backend type, but the
//! model is generic over any `B: Backend`. Rather than adding a trait bound to every model
//! type, each op checks whether `B` *is* `Autodiff<X, C>` for one of the backends we ship
//! (Flex, CUDA with the `cuda` feature and wgpu with the `wgpu` feature; with and without
//! gradient checkpointing) and, if so, moves its tensors into that concrete type (a `TypeId`
//! check and an `Any` downcast: no unsafe code). Any other backend takes the op's plain
//! formulation, which burn differentiates itself.

use std::any::TypeId;
use std::sync::atomic::{AtomicBool, Ordering};

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::tensor::backend::Backend;

/// Whether the hand-written backward passes are used (default on).
static CUSTOM_BACKWARD: AtomicBool = AtomicBool::new(true);

/// Turns sd-model's hand-written backward passes (blockwise attention, GroupNorm + SiLU,
/// LayerNorm, GEGLU, and lora-core's base convolution, see [`lora_core::kernels`]) on or off for the whole process; off, burn differentiates the ops'
/// plain formulations and keeps all their intermediates. The gradients are the same either
/// way (up to rounding); memory and speed differ. For benchmarks and A/B checks.
pub fn set_custom_backward(enabled: bool) {
    CUSTOM_BACKWARD.store(enabled, Ordering::Relaxed);
    lora_core::kernels::set_custom_conv_backward(enabled);
}

/// Whether sd-model's hand-written backward passes are on (see [`set_custom_backward`]).
pub fn custom_backward() -> bool {
    CUSTOM_BACKWARD.load(Ordering::Relaxed)
}

/// Whether `B` is `Autodiff<X, C>` and the custom backward passes are on.
pub(crate) fn is_autodiff<B: Backend, X: Backend, C: CheckpointStrategy>() -> bool {
    custom_backward() && TypeId::of::<B>() == TypeId::of::<Autodiff<X, C>>()
}

pub(crate) use lora_core::kernels::{downcast, tensor};

/// Calls `$f::<$b, X, C>($args...)` for every autodiff backend we register backward passes
/// on, returning the first `Some`; generic arguments after `$b` (a rank, say) follow `C`:
/// `f::<B, 4>(..)` calls `f::<B, X, C, 4>(..)`. The arguments are evaluated once per
/// attempt, so pass references.
macro_rules! on_known_autodiff {
    ($f:ident::<$b:ty $(, $extra:tt)*>($($arg:expr),* $(,)?)) => {{
        use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, NoCheckpointing};
        let found = $f::<$b, burn::backend::Flex, NoCheckpointing $(, $extra)*>($($arg),*)
            .or_else(|| $f::<$b, burn::backend::Flex, BalancedCheckpointing $(, $extra)*>($($arg),*));
        #[cfg(feature = "cuda")]
        let found = found
            .or_else(|| $f::<$b, burn::backend::Cuda, NoCheckpointing $(, $extra)*>($($arg),*))
            .or_else(|| $f::<$b, burn::backend::Cuda, BalancedCheckpointing $(, $extra)*>($($arg),*));
        #[cfg(feature = "wgpu")]
        let found = found
            .or_else(|| $f::<$b, burn::backend::Wgpu, NoCheckpointing $(, $extra)*>($($arg),*))
            .or_else(|| $f::<$b, burn::backend::Wgpu, BalancedCheckpointing $(, $extra)*>($($arg),*));
        found
    }};
}
pub(crate) use on_known_autodiff;
