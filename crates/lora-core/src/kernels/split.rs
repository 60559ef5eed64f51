//! One flat vector cut into many tensors by one operation of the fusion stream.
//!
//! [`crate::optim::FlatAdamW`] hands its updated values back to the module as one piece per
//! trained tensor. In burn's ops each piece is a `slice` and a `reshape`: two operations
//! of the fusion stream per tensor, about 500 per step for an SD1.5 attention LoRA, each
//! costing the host a registration, a plan-cache lookup and an execution. This is one
//! custom operation with one output per piece; executing it makes each output a view of
//! the vector (burn-cubecl's `slice`, which copies only where an offset breaks the
//! runtime's alignment) in its own shape. No kernel runs for aligned pieces.

use std::marker::PhantomData;

use burn::tensor::{DType, Shape};
use burn_cubecl::fusion::FusionCubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};

/// Queues [`super::split_flat`] on the fusion stream of a CubeCL backend: `flat`'s
/// consecutive pieces in `shapes`.
pub(super) fn register<R: CubeRuntime, BT: BoolElement>(flat: FusionTensor<FusionCubeRuntime<R>>, shapes: &[Shape]) -> Vec<FusionTensor<FusionCubeRuntime<R>>> {
    let client = flat.client.clone();
    let streams = OperationStreams::with_inputs([&flat]);
    let dtype: DType = flat.dtype;
    let outputs: Vec<TensorIr> = shapes.iter().map(|s| TensorIr::uninit(client.create_empty_handle(), s.clone(), dtype)).collect();
    let desc = CustomOpIr::new("sd_lora_split_flat", &[flat.into_ir()], &outputs);
    let op = SplitFlat::<R, BT> {
        desc: desc.clone(),
        _backend: PhantomData,
    };
    client.register(streams, OperationIr::Custom(desc), op)
}

/// One queued split.
struct SplitFlat<R, BT> {
    desc: CustomOpIr,
    _backend: PhantomData<fn() -> (R, BT)>,
}

impl<R, BT> std::fmt::Debug for SplitFlat<R, BT> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SplitFlat").field("outputs", &self.desc.outputs.len()).finish()
    }
}

impl<R: CubeRuntime, BT: BoolElement> Operation<FusionCubeRuntime<R>> for SplitFlat<R, BT> {
    fn execute(&self, handles: &mut HandleContainer<<FusionCubeRuntime<R> as FusionRuntime>::FusionHandle>) {
        type Inner<R, BT> = CubeBackend<R, f32, i32, BT>;
        let flat: CubeTensor<R> = handles.get_float_tensor::<Inner<R, BT>>(&self.desc.inputs[0]);
        let mut offset = 0;
        for out in &self.desc.outputs {
            let n = out.shape.num_elements();
            // A view where the offset is aligned (else a copy), then new strides: no data moves.
            // The slice takes one range per dimension; `flat` has one.
            #[allow(clippy::single_range_in_vec_init)]
            let piece = burn_cubecl::kernel::slice(flat.clone(), &[offset..offset + n]);
            let piece = burn_cubecl::ops::reshape(piece, out.shape.clone());
            handles.register_float_tensor::<Inner<R, BT>>(&out.id, piece);
            offset += n;
        }
    }
}

#[cfg(all(test, feature = "wgpu-test"))]
mod tests {
    //! The single operation on burn's fusion backend over CubeCL's wgpu runtime (lavapipe
    //! without a GPU) against burn's slices and reshapes.

    use burn::backend::Wgpu;
    use burn::tensor::{Distribution, Shape, Tensor};
    use cubecl::wgpu::WgpuRuntime;

    use crate::kernels::{fused_split_on, split_flat_with_burn, tensor};
    use burn_cubecl::cubecl;

    fn flat_values(piece: burn::tensor::ops::FloatTensor<Wgpu>, n: usize) -> Vec<f32> {
        let flat = <Wgpu as burn::tensor::ops::FloatTensorOps<Wgpu>>::float_reshape(piece, Shape::new([n]));
        tensor::<Wgpu, 1>(flat).into_data().to_vec::<f32>().expect("f32")
    }

    #[test]
    fn wgpu_split_flat_matches_slices() {
        let device = Default::default();
        // Pieces at aligned and unaligned offsets (views and copies), of ranks 1 to 4, and
        // a remainder left over.
        let shapes = [
            Shape::new([4, 32]),
            Shape::new([32, 4]),
            Shape::new([7]),
            Shape::new([3, 3, 3, 3]),
            Shape::new([1000]),
            Shape::new([13, 2]),
            Shape::new([64, 4]),
        ];
        let total: usize = shapes.iter().map(Shape::num_elements).sum();
        let flat = Tensor::<Wgpu, 1>::random([total + 5], Distribution::Normal(0.0, 1.0), &device);
        let ours = fused_split_on::<Wgpu, WgpuRuntime, u32>(flat.clone(), &shapes).expect("the fused path");
        let reference = split_flat_with_burn(flat.clone(), &shapes);
        for ((a, b), shape) in ours.into_iter().zip(reference).zip(&shapes) {
            let n = shape.num_elements();
            assert_eq!(flat_values(a, n), flat_values(b, n), "{shape:?}");
        }
        // The flat vector is still intact after its views are released.
        let again = flat.clone().slice(0..128).into_data().to_vec::<f32>().expect("f32");
        assert_eq!(again, flat.slice(0..128).into_data().to_vec::<f32>().expect("f32"));
    }
}
