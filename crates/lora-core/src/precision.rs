//! Mixed precision: a frozen base in bf16 or f16 with f32 adapters.
//!
//! burn has no autocast and does not promote mixed dtypes, so a half-precision model is
//! made explicitly: [`cast_frozen`] converts every parameter that does not require
//! gradients (the frozen base) and leaves trainable adapter weights in f32. The adapters
//! then compute in the activations' dtype with their weights cast on the fly (the
//! gradient of a cast is a cast, so the f32 master weights receive the update), which is
//! what PyTorch's autocast does for a LoRA layer. A training loop with
//! [`FlatAdamW`](crate::optim::FlatAdamW) can instead keep the f32 master weights in the
//! optimizer and half-precision copies in the model
//! ([`with_working_dtype`](crate::optim::FlatAdamW::with_working_dtype)): the same numbers
//! without the casts in every pass.
//!
//! ```
//! use burn::backend::{Autodiff, Flex};
//! use burn::module::Module;
//! use burn::nn::LinearConfig;
//! use burn::tensor::{DType, FloatDType, Tensor};
//! use lora_core::{precision, LoraConfig, LoraLinear};
//!
//! type B = Autodiff<Flex>;
//! let device = Default::default();
//! let mut layer = LoraLinear::new(LinearConfig::new(8, 8).init::<B>(&device));
//! layer.attach_new(&LoraConfig::new(2), &device).unwrap();
//! let layer = precision::cast_frozen(layer, FloatDType::BF16);
//! assert_eq!(layer.base.weight.val().dtype(), DType::BF16);
//! let adapter = layer.adapter.as_ref().unwrap();
//! assert_eq!(adapter.up.weight.val().dtype(), DType::F32);
//!
//! let x = Tensor::<B, 2>::ones([1, 8], &device).cast(FloatDType::BF16);
//! let loss = layer.forward(x).cast(FloatDType::F32).sum();
//! let grads = loss.backward();
//! let grad = adapter.up.weight.grad(&grads).unwrap();
//! assert_eq!(grad.dtype(), DType::F32); // f32 gradients for the f32 master weights
//! ```

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Tensor};

use crate::linear::update_frozen;

/// Converts a module's frozen parameters (those that do not require gradients) to `dtype`,
/// each stored in a dense buffer ([`crate::kernels::packed`]: on CUDA the weights as
/// loaded or cast have padded rows).
///
/// Trainable parameters keep their dtype. On a backend without autodiff no parameter
/// requires gradients, so everything is converted.
pub fn cast_frozen<B: Backend, M: Module<B>>(module: M, dtype: FloatDType) -> M {
    module.map(&mut CastFrozen { dtype })
}

/// Converts every float parameter of a module to `dtype` (trainable ones included), each
/// stored in a dense buffer ([`crate::kernels::packed`]).
pub fn cast_all<B: Backend, M: Module<B>>(module: M, dtype: FloatDType) -> M {
    module.map(&mut CastAll { dtype: Some(dtype) })
}

/// Stores every float parameter of a module in a dense buffer, its dtype and whether it
/// requires gradients unchanged: on CUDA, weights as loaded or initialised have padded rows
/// (a bf16 3x3 convolution weight takes 2.67 times its size; see
/// [`crate::kernels::packed`]). A no-op on backends without padding.
///
/// ```
/// use burn::backend::Flex;
/// use burn::nn::LinearConfig;
/// use lora_core::precision::pack_all;
///
/// let layer = LinearConfig::new(3, 2).init::<Flex>(&Default::default());
/// let weight = layer.weight.val().into_data();
/// let packed = pack_all(layer);
/// assert_eq!(packed.weight.val().into_data(), weight);
/// ```
pub fn pack_all<B: Backend, M: Module<B>>(module: M) -> M {
    module.map(&mut CastAll { dtype: None })
}

struct CastFrozen {
    dtype: FloatDType,
}

impl<B: Backend> ModuleMapper<B> for CastFrozen {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        if param.is_require_grad() {
            return param;
        }
        // Also where the dtype is already right: loaded or initialised weights have padded
        // rows on CUDA, and `update_frozen` stores them dense.
        let dtype = self.dtype;
        update_frozen(param, |w| cast_to(w, DType::from(dtype)))
    }
}

/// Every parameter to `dtype` (`None`: its own), stored dense.
struct CastAll {
    dtype: Option<FloatDType>,
}

impl<B: Backend> ModuleMapper<B> for CastAll {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let (id, tensor, mapper) = param.consume();
        let require_grad = tensor.is_require_grad();
        let dtype = self.dtype.map_or(tensor.dtype(), DType::from);
        let cast = crate::kernels::packed(cast_to(tensor, dtype)).detach().set_require_grad(require_grad);
        Param::from_mapped_value(id, cast, mapper)
    }
}

/// `x` in `dtype` (no-op when it already is, or when `dtype` is not a float type).
pub fn cast_to<B: Backend, const D: usize>(x: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if x.dtype() == dtype || !dtype.is_float() {
        return x;
    }
    x.cast(FloatDType::from(dtype))
}
