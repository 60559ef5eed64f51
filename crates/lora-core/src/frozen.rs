//! Freezing the base layers of adapter-capable wrappers, and building models whose weights
//! a checkpoint is about to replace without drawing random initial values first.
//!
//! burn initialises a layer's parameters lazily: a new `Linear` holds how to draw its
//! weight, not the weight. [`crate::LoraLinear::new`] (and the conv and norm wrappers)
//! freeze their base with burn's `Module::no_grad`, which maps every value and so draws
//! it. That is what a model built from a seed needs (its values are drawn in the order
//! its layers are built), but a model built to be loaded would draw all of its weights
//! (about 1.1 billion values for SD1.5: seconds per 100 M of them on a CPU, the whole
//! model's memory once more on a GPU) only for the file's values to replace them.
//! Inside [`build_for_loading`] the wrappers leave their parameters undrawn instead.

use std::cell::Cell;

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;

thread_local! {
    static FOR_LOADING: Cell<bool> = const { Cell::new(false) };
}

/// Runs `build` (which constructs modules on this thread) with the adapter-capable
/// wrappers it creates freezing their base parameters without drawing them.
///
/// Use it to build a model whose every parameter is then loaded from a checkpoint, as
/// sd-model's loaders do. A parameter that is not replaced draws its initial value when
/// first used, frozen as outside, but the draws then follow the order of first use, not
/// of construction: build models meant to be reproducible from a seed outside.
///
/// ```
/// use burn::backend::Flex;
/// use burn::nn::LinearConfig;
/// use lora_core::frozen::build_for_loading;
/// use lora_core::LoraLinear;
///
/// let device = Default::default();
/// let layer = build_for_loading(|| LoraLinear::new(LinearConfig::new(4, 3).init::<Flex>(&device)));
/// assert!(!layer.base.weight.is_initialized(), "nothing drawn yet");
/// assert_eq!(layer.base.weight.val().dims(), [4, 3]);
/// ```
pub fn build_for_loading<T>(build: impl FnOnce() -> T) -> T {
    /// Restores the flag also when `build` panics.
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            FOR_LOADING.with(|f| f.set(self.0));
        }
    }
    let _restore = Restore(FOR_LOADING.with(|f| f.replace(true)));
    build()
}

/// `module` with every parameter frozen (no gradient): burn's `no_grad`, or inside
/// [`build_for_loading`], the same without drawing undrawn parameters.
pub(crate) fn freeze<B: Backend, M: Module<B>>(module: M) -> M {
    if FOR_LOADING.with(Cell::get) {
        module.map(&mut FreezeUndrawn)
    } else {
        module.no_grad()
    }
}

/// Freezes drawn parameters as `no_grad` does and wraps undrawn ones in a parameter that
/// draws the original when first used, then freezes it. (burn's `Param::set_require_grad`
/// on an undrawn parameter would freeze the value it draws but keep the parameter's own
/// flag, which moving the module to an autodiff backend reads.)
struct FreezeUndrawn;

impl<B: Backend> ModuleMapper<B> for FreezeUndrawn {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        if param.is_initialized() {
            return param.map(|t| t.set_require_grad(false));
        }
        let (id, device, shape) = (param.id, param.lazy_device(), param.lazy_shape());
        Param::uninitialized(id, move |_, _| param.val().set_require_grad(false), device, false, shape)
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use burn::module::AutodiffModule;
    use burn::nn::conv::Conv2dConfig;
    use burn::nn::LinearConfig;

    use super::build_for_loading;
    use crate::{LoraConv2d, LoraLinear};

    type A = Autodiff<Flex>;

    /// Inside, nothing is drawn; a parameter used without being loaded draws then and is
    /// frozen, also after moving to an autodiff backend; outside, wrapping draws (burn's
    /// `no_grad`) and freezes as before; the flag is restored afterwards.
    #[test]
    fn built_for_loading_draws_nothing_and_stays_frozen() {
        let device = Default::default();
        let (linear, conv) = build_for_loading(|| {
            (LoraLinear::new(LinearConfig::new(4, 3).init::<Flex>(&device)), LoraConv2d::new(Conv2dConfig::new([2, 3], [3, 3]).init::<Flex>(&device)))
        });
        assert!(!linear.base.weight.is_initialized() && !conv.base.weight.is_initialized());
        assert_eq!(conv.base.weight.val().dims(), [3, 2, 3, 3]);
        let trained: LoraLinear<A> = LoraLinear::from_inner(linear);
        assert!(!trained.base.weight.val().is_require_grad(), "frozen on the autodiff backend");
        assert!(!trained.base.bias.as_ref().unwrap().val().is_require_grad());

        let outside = LoraLinear::new(LinearConfig::new(4, 3).init::<Flex>(&device));
        assert!(outside.base.weight.is_initialized(), "drawn when wrapped, in build order");
        let trained: LoraLinear<A> = LoraLinear::from_inner(outside);
        assert!(!trained.base.weight.val().is_require_grad());
    }
}
