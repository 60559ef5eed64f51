//! A tensor copied into a dense buffer, as one operation of the fusion stream.
//!
//! On CUDA, CubeCL gives the outputs of burn's ops (and uploaded data) padded rows: the
//! row length in bytes is rounded up to a power of two of at least 16 bytes, or to a
//! multiple of the 512-byte pitch alignment. A 3x3 convolution weight in bf16 has rows of
//! 3 values, 6 bytes, stored in 16: the weight takes 2.67 times its size, and cuDNN, which
//! wants it packed, gets a copy at every call. A `[320, 320]` bf16 linear weight has rows
//! of 640 bytes stored in 1024. Frozen weights live for the whole run, so they are packed
//! once ([`super::packed`]).

use std::marker::PhantomData;

use burn_cubecl::fusion::FusionCubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};

/// Queues the packing of `x` on its fusion stream.
pub(super) fn register<R: CubeRuntime, BT: BoolElement>(x: FusionTensor<FusionCubeRuntime<R>>) -> FusionTensor<FusionCubeRuntime<R>> {
    let client = x.client.clone();
    let streams = OperationStreams::with_inputs([&x]);
    let out = TensorIr::uninit(client.create_empty_handle(), x.shape.clone(), x.dtype);
    let desc = CustomOpIr::new("sd_lora_pack", &[x.into_ir()], &[out]);
    let op = Pack::<R, BT> {
        desc: desc.clone(),
        _backend: PhantomData,
    };
    client.register(streams, OperationIr::Custom(desc), op).output()
}

/// One queued packing.
struct Pack<R, BT> {
    desc: CustomOpIr,
    _backend: PhantomData<fn() -> (R, BT)>,
}

impl<R, BT> std::fmt::Debug for Pack<R, BT> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pack").field("shape", &self.desc.outputs[0].shape).finish()
    }
}

impl<R: CubeRuntime, BT: BoolElement> Operation<FusionCubeRuntime<R>> for Pack<R, BT> {
    fn execute(&self, handles: &mut HandleContainer<<FusionCubeRuntime<R> as FusionRuntime>::FusionHandle>) {
        type Inner<R, BT> = CubeBackend<R, f32, i32, BT>;
        let x: CubeTensor<R> = handles.get_float_tensor::<Inner<R, BT>>(&self.desc.inputs[0]);
        // `x` itself where its strides are row-major without gaps, else a copy into a fresh
        // buffer of exactly its size (burn-cubecl's `into_contiguous` allocates no padding).
        let packed = burn_cubecl::kernel::into_contiguous(x);
        handles.register_float_tensor::<Inner<R, BT>>(&self.desc.outputs[0].id, packed);
    }
}

#[cfg(all(test, feature = "wgpu-test"))]
mod tests {
    //! On burn's wgpu backend (lavapipe without a GPU), whose buffers have no padded rows:
    //! strided views stand in for CUDA's padded ones.
    //! `cargo test -p lora-core --release --features wgpu-test -- wgpu_packed`.
    use burn::backend::{Autodiff, Wgpu};
    use burn::tensor::{Distribution, Tensor};

    use crate::kernels::packed;

    #[test]
    fn wgpu_packed_keeps_the_values_of_strided_views() {
        let device = Default::default();
        let w = Tensor::<Wgpu, 4>::random([6, 5, 3, 3], Distribution::Normal(0.0, 1.0), &device);
        for view in [w.clone(), w.clone().swap_dims(2, 3), w.clone().slice([1..5, 0..5, 0..3, 1..3]), w.clone().permute([1, 0, 3, 2])] {
            let expected = view.to_data();
            assert_eq!(packed(view).into_data(), expected);
        }
        // With autodiff, as frozen weights are: the values, detached.
        let ad = Tensor::<Autodiff<Wgpu>, 4>::from_inner(w.clone()).swap_dims(0, 1);
        let out = packed(ad.clone());
        assert!(!out.is_require_grad());
        assert_eq!(out.into_data(), ad.into_data());
    }
}
