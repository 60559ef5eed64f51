//! Matmuls in one fixed CubeCL kernel, without burn's autotuning.
//!
//! burn's matmul autotunes every new problem key (shape class, layout, dtypes): it compiles
//! and times each of its ~29 candidate kernels, about a second apiece on an H200 (NVRTC
//! compiles). On the first SD1.5 training step that was minutes before the first result
//! (device run of 2026-11-29, docs/benchmarks.md): the LoRA rank-4 products, the time
//! embedding and the cross-attention projections of the 77 context tokens give dozens of
//! keys, and every new aspect bucket adds more. Here each problem runs in cubek's simple
//! cyclic MMA matmul (one of burn's own candidates: on that H200 it ran every key of the
//! step, at 1.26× the autotuned winner's time on average, 1.65× at worst, all of them
//! 25–100 µs problems), else in the simple unit matmul (no tensor cores), else, when both
//! reject the problem, in burn's autotuned matmul, counted as a fallback.
//!
//! The op is queued on burn's fusion stream like the cuBLAS route, so it runs in order
//! with the fused kernels around it and needs no synchronisation.

use std::marker::PhantomData;

use burn::tensor::Shape;
use burn_cubecl::fusion::FusionCubeRuntime;
use burn_cubecl::cubecl::zspace::calculate_matmul_output;
use burn_cubecl::ops::numeric::empty_device_contiguous_dtype;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};
use cubek::matmul::definition::{MatmulElems, MatmulGlobalElems};
use cubek::matmul::launch::{launch_ref, Strategy};
use cubek::std::InputBinding;

/// Which operands of a product are read transposed: their last two dimensions swapped
/// inside the op, as a view of the same buffer. A transposition by burn's `swap_dims` is
/// an operation of the fusion stream (registered, matched against the plan cache and
/// released by the host, though it launches nothing); the backward passes of the linear
/// layers took hundreds of them per SD1.5 step (docs/benchmarks.md).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub(super) struct Transpose {
    /// `a` is read as `aᵀ`.
    pub a: bool,
    /// `b` is read as `bᵀ`.
    pub b: bool,
}

impl Transpose {
    /// This pair's entry in an op's four names (`[plain, a transposed, b transposed,
    /// both]`): burn-fusion matches cached plans by the operations' descriptions, so
    /// products that read their operands differently must differ there.
    fn name(self, names: &'static [&'static str; 4]) -> &'static str {
        names[usize::from(self.a) | usize::from(self.b) << 1]
    }

    /// `tensor` with its last two dimensions swapped when `flag` is set (metadata only).
    pub(super) fn apply<R: CubeRuntime, BT: BoolElement>(flag: bool, tensor: CubeTensor<R>) -> CubeTensor<R> {
        if !flag {
            return tensor;
        }
        let d = tensor.meta.shape().num_dims();
        <CubeBackend<R, f32, i32, BT> as burn::tensor::ops::FloatTensorOps<CubeBackend<R, f32, i32, BT>>>::float_swap_dims(tensor, d - 2, d - 1)
    }
}

/// Queues `op(a) · op(b)` (equal batch dimensions, equal dtypes; `op` transposes where
/// `transpose` says) on the fusion stream.
pub(super) fn register<R: CubeRuntime, BT: BoolElement>(
    a: FusionTensor<FusionCubeRuntime<R>>,
    b: FusionTensor<FusionCubeRuntime<R>>,
    transpose: Transpose,
) -> FusionTensor<FusionCubeRuntime<R>> {
    const NAMES: [&str; 4] = ["sd_lora_fixed_matmul", "sd_lora_fixed_matmul_tn", "sd_lora_fixed_matmul_nt", "sd_lora_fixed_matmul_tt"];
    register_product(&NAMES, a, b, transpose, |desc| FixedMatmul::<R, BT> { desc, transpose, _backend: PhantomData })
}

/// Queues the custom op `op(desc)`, named by `transpose`'s entry in `names`, that computes
/// `op(a) · op(b)` (equal batch dimensions; the output in `a`'s dtype) on the fusion
/// stream, and returns its (lazy) output: the registration the fixed matmul and the cuBLAS
/// route share.
pub(super) fn register_product<R: CubeRuntime, O: Operation<FusionCubeRuntime<R>> + 'static>(
    names: &'static [&'static str; 4],
    a: FusionTensor<FusionCubeRuntime<R>>,
    b: FusionTensor<FusionCubeRuntime<R>>,
    transpose: Transpose,
    op: impl FnOnce(CustomOpIr) -> O,
) -> FusionTensor<FusionCubeRuntime<R>> {
    let client = a.client.clone();
    let (da, db) = (a.shape.num_dims(), b.shape.num_dims());
    let mut out_shape = a.shape.to_vec();
    out_shape[da - 2] = if transpose.a { a.shape[da - 1] } else { a.shape[da - 2] };
    out_shape[da - 1] = if transpose.b { b.shape[db - 2] } else { b.shape[db - 1] };
    let streams = OperationStreams::with_inputs([&a, &b]);
    let out = TensorIr::uninit(client.create_empty_handle(), Shape::from(out_shape), a.dtype);
    let desc = CustomOpIr::new(transpose.name(names), &[a.into_ir(), b.into_ir()], &[out]);
    client.register(streams, OperationIr::Custom(desc.clone()), op(desc)).output()
}

/// One queued matmul.
struct FixedMatmul<R, BT> {
    desc: CustomOpIr,
    transpose: Transpose,
    _backend: PhantomData<fn() -> (R, BT)>,
}

impl<R, BT> std::fmt::Debug for FixedMatmul<R, BT> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FixedMatmul").field("out", &self.desc.outputs[0].shape).field("transpose", &self.transpose).finish()
    }
}

impl<R: CubeRuntime, BT: BoolElement> Operation<FusionCubeRuntime<R>> for FixedMatmul<R, BT> {
    fn execute(&self, handles: &mut HandleContainer<<FusionCubeRuntime<R> as FusionRuntime>::FusionHandle>) {
        type Inner<R, BT> = CubeBackend<R, f32, i32, BT>;
        let ([a, b], [out]) = self.desc.as_fixed();
        let a = Transpose::apply::<R, BT>(self.transpose.a, handles.get_float_tensor::<Inner<R, BT>>(a));
        let b = Transpose::apply::<R, BT>(self.transpose.b, handles.get_float_tensor::<Inner<R, BT>>(b));
        let y = match run(a.clone(), b.clone()) {
            Ok(y) => {
                super::record_fixed_matmul();
                y
            }
            Err(reason) => {
                super::record_fallback(reason);
                <Inner<R, BT> as burn::tensor::ops::FloatTensorOps<Inner<R, BT>>>::float_matmul(a, b)
            }
        };
        handles.register_float_tensor::<Inner<R, BT>>(&out.id, y);
    }
}

/// `a · b` in the first of the fixed kernels that takes the problem; why each refused
/// otherwise. The output is contiguous: burn's own matmul output is "pitched" on CUDA
/// (rows padded to 512-byte multiples: a `[rows, 320]` bf16 product takes 60% more memory,
/// and every kernel of ours that reads it densely would copy it first).
pub(super) fn run<R: CubeRuntime>(a: CubeTensor<R>, b: CubeTensor<R>) -> Result<CubeTensor<R>, String> {
    if a.dtype != b.dtype {
        return Err(format!("fixed matmul: operand dtypes differ ({:?} · {:?})", a.dtype, b.dtype));
    }
    let shape = calculate_matmul_output(a.meta.shape(), b.meta.shape()).map_err(|e| format!("fixed matmul: {e:?}"))?;
    let out = empty_device_contiguous_dtype(a.client.clone(), a.device.clone(), shape, a.dtype);
    let mut refusals = Vec::new();
    for strategy in [Strategy::SimpleCyclicMma(Default::default()), Strategy::SimpleUnit(Default::default())] {
        let mut dtypes = MatmulElems::from_globals(&MatmulGlobalElems { lhs: a.dtype.into(), rhs: b.dtype.into(), out: out.dtype.into() });
        let lhs = InputBinding::new(a.clone().binding(), a.dtype.into());
        let rhs = InputBinding::new(b.clone().binding(), b.dtype.into());
        match launch_ref(&strategy, &out.client, lhs, rhs, out.clone().binding(), &mut dtypes) {
            Ok(()) => return Ok(out),
            Err(error) => refusals.push(format!("{strategy}: {error:?}")),
        }
    }
    Err(format!("fixed matmul kernels refused {:?} · {:?}: {}", a.meta.shape(), b.meta.shape(), refusals.join("; ")))
}

#[cfg(all(test, feature = "wgpu-test"))]
mod tests {
    //! The op on burn's wgpu backend (lavapipe without a GPU):
    //! `cargo test -p lora-core --release --features wgpu-test -- fixed_matmul`.
    use burn::tensor::{DType, Distribution, Tensor};

    use crate::kernels::tests::SWITCH;
    use crate::kernels::{matmul, matmul_transposed, set_fixed_matmul, vendor_stats};

    #[test]
    fn wgpu_fixed_matmul_matches_burn() {
        type B = burn::backend::Wgpu;
        let _guard = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
        let device = Default::default();
        let rand = |shape: [usize; 3], dtype| crate::precision::cast_to(Tensor::<B, 3>::random(shape, Distribution::Normal(0.0, 1.0), &device), dtype);
        let before = vendor_stats();
        let mut runs = 0;
        for dtype in [DType::F32, DType::F16] {
            let tolerance = if dtype == DType::F32 { 1e-4 } else { 2e-2 };
            // A LoRA down and up projection (rank 4), a transposed view (as a backward pass
            // reads its operands) and a row count off every tile size.
            let cases: Vec<(&str, Tensor<B, 3>, Tensor<B, 3>)> = vec![
                ("down", rand([2, 256, 64], dtype), rand([2, 64, 4], dtype)),
                ("up", rand([2, 256, 4], dtype), rand([2, 4, 96], dtype)),
                ("transposed", rand([1, 64, 77], dtype).swap_dims(1, 2), rand([1, 64, 40], dtype)),
                ("odd", rand([3, 37, 19], dtype), rand([3, 19, 23], dtype)),
            ];
            for (name, a, b) in cases {
                set_fixed_matmul(false);
                let reference = matmul(a.clone(), b.clone());
                // Each operand also stored transposed (a contiguous copy of its transpose),
                // read back by the op's own transposition (`matmul_transposed`).
                // (`from_data` converts to f32: the cast restores the exact half values.)
                let stored = |t: &Tensor<B, 3>, transpose: bool| {
                    if transpose {
                        crate::precision::cast_to(Tensor::from_data(t.clone().swap_dims(1, 2).into_data(), &device), dtype)
                    } else {
                        t.clone()
                    }
                };
                for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                    let (a, b) = (stored(&a, ta), stored(&b, tb));
                    set_fixed_matmul(true);
                    let ours = matmul_transposed(a, b, ta, tb);
                    set_fixed_matmul(false);
                    runs += 1;
                    assert_eq!(ours.dtype(), dtype, "{name}");
                    let f32 = |t: Tensor<B, 3>| crate::precision::cast_to(t, DType::F32);
                    let (ours, reference) = (f32(ours), f32(reference.clone()));
                    let scale: f32 = reference.clone().abs().max().into_scalar();
                    let err: f32 = (ours - reference).abs().max().into_scalar();
                    assert!(err <= tolerance * scale.max(1.0), "{dtype:?} {name} (transposed {ta}, {tb}): max error {err} (scale {scale})");
                }
            }
        }
        let after = vendor_stats();
        assert_eq!(after.fallbacks, before.fallbacks, "fallbacks: {:?}", after.last_error);
        assert_eq!(after.fixed_matmul_calls - before.fixed_matmul_calls, runs);
    }

    /// A LoRA linear layer's forward and backward with every matmul in the fixed kernel
    /// (the trainer's CUDA path: `linear`'s autodiff op, the adapter's rank-4 products):
    /// burn's output and gradients; two forward and four backward products per layer.
    #[test]
    fn wgpu_routed_lora_linear_matches_burn() {
        let _guard = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
        let before = vendor_stats();
        crate::kernels::tests::check_routed_lora_linear::<burn::backend::Autodiff<burn::backend::Wgpu>>(1e-4);
        let after = vendor_stats();
        assert_eq!(after.fallbacks, before.fallbacks, "fallbacks: {:?}", after.last_error);
        // Base forward, the adapter's two products; dx through the base and through both
        // adapter products, and the two adapter weight gradients (the frozen base's none;
        // split in chunks for the second input, still one batched product each): two inputs.
        assert_eq!(after.fixed_matmul_calls - before.fixed_matmul_calls, 2 * (3 + 5));
    }
}
