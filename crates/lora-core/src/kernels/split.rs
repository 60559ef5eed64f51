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

/// Queues the release of `tensors` as one operation of the fusion stream (see
/// [`super::release_all`]): each input read last here (its last handle) is released when it
/// runs, the others are only read.
pub(super) fn register_release<R: CubeRuntime, BT: BoolElement>(tensors: Vec<FusionTensor<FusionCubeRuntime<R>>>) {
    let Some(client) = tensors.first().map(|t| t.client.clone()) else {
        return;
    };
    let streams = OperationStreams::with_inputs(tensors.iter());
    let inputs: Vec<TensorIr> = tensors.into_iter().map(FusionTensor::into_ir).collect();
    let desc = CustomOpIr::new("sd_lora_release", &inputs, &[]);
    let op = Release::<R, BT> {
        desc: desc.clone(),
        _backend: PhantomData,
    };
    client.register(streams, OperationIr::Custom(desc), op);
}

/// One queued release.
struct Release<R, BT> {
    desc: CustomOpIr,
    _backend: PhantomData<fn() -> (R, BT)>,
}

impl<R, BT> std::fmt::Debug for Release<R, BT> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Release").field("inputs", &self.desc.inputs.len()).finish()
    }
}

/// Inputs the release operations have run with (tests).
#[cfg(test)]
static RELEASED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

impl<R: CubeRuntime, BT: BoolElement> Operation<FusionCubeRuntime<R>> for Release<R, BT> {
    fn execute(&self, _handles: &mut HandleContainer<<FusionCubeRuntime<R> as FusionRuntime>::FusionHandle>) {
        // Nothing to run: after each operation burn-fusion removes the handles of the inputs
        // it read last (`ReadWrite`), which returns their memory to cubecl's pool.
        #[cfg(test)]
        RELEASED.fetch_add(self.desc.inputs.len(), std::sync::atomic::Ordering::Relaxed);
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

    /// Which of `ids` the fusion stream still holds a handle of, asked by an operation queued
    /// after everything before it.
    fn held(client: &burn_fusion::client::GlobalFusionClient<burn_cubecl::fusion::FusionCubeRuntime<WgpuRuntime>>, ids: Vec<burn_ir::TensorId>) -> Vec<bool> {
        use std::sync::{Arc, Mutex};
        struct Probe {
            ids: Vec<burn_ir::TensorId>,
            found: Arc<Mutex<Vec<bool>>>,
        }
        impl std::fmt::Debug for Probe {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("Probe")
            }
        }
        impl burn_fusion::stream::Operation<burn_cubecl::fusion::FusionCubeRuntime<WgpuRuntime>> for Probe {
            fn execute(&self, handles: &mut burn_ir::HandleContainer<<burn_cubecl::fusion::FusionCubeRuntime<WgpuRuntime> as burn_fusion::FusionRuntime>::FusionHandle>) {
                *self.found.lock().expect("probe") = self.ids.iter().map(|id| handles.has_handle(id)).collect();
            }
        }
        let found = Arc::new(Mutex::new(Vec::new()));
        let desc = burn_ir::CustomOpIr::new("probe", &[], &[]);
        let probe = Probe { ids, found: found.clone() };
        client.register(burn_fusion::stream::OperationStreams::default(), burn_ir::OperationIr::Custom(desc), probe);
        client.sync(|| ());
        found.lock().expect("probe").clone()
    }

    /// One release operation for many tensors: the tensors read last there lose their
    /// handles (their memory goes back to the pool), a shared one stays readable.
    #[test]
    fn wgpu_release_all_frees_the_last_handles_and_keeps_shared_ones() {
        use crate::kernels::release_all;
        let device = Default::default();
        let shared = Tensor::<Wgpu, 2>::random([8, 8], Distribution::Normal(0.0, 1.0), &device);
        let expected = shared.clone().into_data().to_vec::<f32>().expect("f32");
        let owned: Vec<_> = (0..5).map(|i| Tensor::<Wgpu, 2>::full([64, 64], i as f32, &device)).collect();
        // Computed (read) before the release, so that they have handles.
        let values: Vec<f32> = owned.iter().map(|t| t.clone().sum().into_scalar()).collect();
        assert_eq!(values, [0.0, 4096.0, 8192.0, 12288.0, 16384.0]);
        let mut all: Vec<burn_fusion::FusionTensor<_>> = owned.into_iter().map(|t| t.into_primitive().tensor()).collect();
        all.push(shared.clone().into_primitive().tensor());
        let client = all[0].client.clone();
        let ids: Vec<_> = all.iter().map(|t| t.id).collect();
        assert_eq!(held(&client, ids.clone()), [true; 6]);
        let before = super::RELEASED.load(std::sync::atomic::Ordering::Relaxed);
        release_all::<Wgpu>(all);
        assert_eq!(held(&client, ids), [false, false, false, false, false, true]);
        // All six went through one release operation (not a release operation each).
        assert_eq!(super::RELEASED.load(std::sync::atomic::Ordering::Relaxed) - before, 6);
        // Work after the release runs on the stream as before, and the shared tensor survives.
        let sum: f32 = (shared.clone() * 2.0).sum().into_scalar();
        assert_eq!(shared.into_data().to_vec::<f32>().expect("f32"), expected);
        assert!((sum - 2.0 * expected.iter().sum::<f32>()).abs() < 1e-3);
    }
}
