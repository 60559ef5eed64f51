//! Many tensors copied into one flat vector by a few kernel launches.
//!
//! burn's `Tensor::cat` is one `slice_assign` launch per input, so gathering the gradients
//! of a LoRA's few hundred adapter tensors for [`crate::optim::FlatAdamW`] cost a few hundred
//! launches per step (6% of a UNet training step's launches; see `docs/benchmarks.md`),
//! while the whole AdamW update after it is one fused kernel. This kernel takes up to
//! [`MAX_INPUTS`] inputs per launch as separate bindings: the cube row `y` copies input `y`
//! to its offset in the output, converting the dtype on the way.

use std::marker::PhantomData;

use burn::tensor::{DType, Shape};
use burn_cubecl::cubecl;
use burn_cubecl::fusion::FusionCubeRuntime;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};
use cubecl::prelude::*;

/// Inputs per launch at most: few enough for every runtime's binding limits (wgpu: the
/// device's storage buffers per shader stage, which can be as low as 8; then fewer) and for
/// one compiled kernel per distinct count.
pub(super) const MAX_INPUTS: usize = 32;

/// Threads per cube.
const THREADS: u32 = 256;

/// Cubes per input row at most; each thread strides over the rest.
const MAX_CUBES_X: usize = 1024;

/// Copies `inputs[k]` (all of dtype `I`) to `output[offsets[k]..]` (dtype `O`), for the `k`
/// given by the cube's row.
#[cube(launch)]
fn concat_into<I: Float, O: Float>(
    inputs: &Sequence<Array<I>>,
    offsets: Sequence<u32>,
    output: &mut Array<O>,
    #[define(I, O)] _dtypes: [StorageType; 2],
) {
    let count = comptime!(inputs.len());
    let row = CUBE_POS_Y as usize;
    let start = (CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X) as usize;
    let stride = (CUBE_COUNT_X * CUBE_DIM_X) as usize;
    // Sequences are indexed at compile time: each cube takes the one branch of its row.
    #[unroll]
    for k in 0..count {
        if row == k {
            let input = &inputs[k];
            let base = offsets[k] as usize;
            let n = input.len();
            let mut i = start;
            while i < n {
                output[base + i] = O::cast_from(input[i]);
                i += stride;
            }
        }
    }
}

/// One input of a launch: a contiguous buffer of `len` elements.
pub(super) struct Part<'a> {
    /// The buffer (with its offset, for views).
    pub handle: &'a cubecl::server::Handle,
    /// Elements.
    pub len: usize,
    /// Where it goes in the output.
    pub offset: usize,
}

/// Queues the copies of `parts` (all of dtype `dtypes[0]`) into `output` (`total` elements
/// of `dtypes[1]`), [`MAX_INPUTS`] or fewer per launch (fewer when the runtime's binding
/// limit is lower).
pub(super) fn launch<R: Runtime>(
    client: &ComputeClient<R>,
    parts: &[Part<'_>],
    output: &cubecl::server::Handle,
    total: usize,
    dtypes: [StorageType; 2],
) -> Result<(), String> {
    if u32::try_from(total).is_err() {
        return Err(format!("flat concatenation: {total} elements are over u32"));
    }
    if let Some(part) = parts.iter().find(|p| p.offset + p.len > total) {
        return Err(format!("flat concatenation: a part of {} elements at {} does not fit in {total}", part.len, part.offset));
    }
    // One binding is the output; wgpu reserves one more for itself (counted in its limit).
    let per_launch = (client.properties().hardware.max_bindings as usize).saturating_sub(1).min(MAX_INPUTS);
    if per_launch == 0 {
        return Err("flat concatenation: the runtime allows no input bindings".into());
    }
    for chunk in parts.chunks(per_launch) {
        let longest = chunk.iter().map(|p| p.len).max().unwrap_or(0);
        if longest == 0 {
            continue;
        }
        let cubes_x = longest.div_ceil(THREADS as usize).clamp(1, MAX_CUBES_X);
        let count = CubeCount::Static(cubes_x as u32, chunk.len() as u32, 1);
        let mut inputs = SequenceArg::new();
        let mut offsets = SequenceArg::new();
        for part in chunk {
            // SAFETY: each handle holds `len` elements of the input dtype (the caller's contract).
            inputs.push(unsafe { ArrayArg::from_raw_parts(part.handle.clone(), part.len) });
            offsets.push(part.offset as u32);
        }
        // SAFETY: `output` holds `total` elements of the output dtype, and every part fits.
        let output = unsafe { ArrayArg::from_raw_parts(output.clone(), total) };
        concat_into::launch::<R>(client, count, CubeDim::new_1d(THREADS), inputs, offsets, output, dtypes);
    }
    Ok(())
}

/// Queues [`super::concat_flat`] on the fusion stream of a CubeCL backend: the flattened
/// `parts`, one after another, as one vector of `dtype`.
pub(super) fn register<R: CubeRuntime, BT: BoolElement>(parts: Vec<FusionTensor<FusionCubeRuntime<R>>>, dtype: DType) -> FusionTensor<FusionCubeRuntime<R>> {
    let client = parts[0].client.clone();
    let streams = OperationStreams::with_inputs(&parts);
    let total = parts.iter().map(|p| p.shape.num_elements()).sum::<usize>();
    let out = TensorIr::uninit(client.create_empty_handle(), Shape::new([total]), dtype);
    let inputs: Vec<TensorIr> = parts.into_iter().map(FusionTensor::into_ir).collect();
    let desc = CustomOpIr::new("sd_lora_concat_flat", &inputs, &[out]);
    let op = ConcatFlat::<R, BT> {
        desc: desc.clone(),
        _backend: PhantomData,
    };
    client.register(streams, OperationIr::Custom(desc), op).output()
}

/// One queued flat concatenation.
struct ConcatFlat<R, BT> {
    desc: CustomOpIr,
    _backend: PhantomData<fn() -> (R, BT)>,
}

impl<R, BT> std::fmt::Debug for ConcatFlat<R, BT> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConcatFlat").field("inputs", &self.desc.inputs.len()).finish()
    }
}

impl<R: CubeRuntime, BT: BoolElement> Operation<FusionCubeRuntime<R>> for ConcatFlat<R, BT> {
    fn execute(&self, handles: &mut HandleContainer<<FusionCubeRuntime<R> as FusionRuntime>::FusionHandle>) {
        let out = &self.desc.outputs[0];
        let inputs: Vec<CubeTensor<R>> = self.desc.inputs.iter().map(|ir| handles.get_float_tensor::<CubeBackend<R, f32, i32, BT>>(ir)).collect();
        let y = match kernel(&inputs, out.dtype) {
            Ok(y) => {
                super::record_fused_concat();
                y
            }
            Err(reason) => {
                super::record_fallback(reason);
                burn_ops::<R, BT>(inputs, out.dtype)
            }
        };
        handles.register_float_tensor::<CubeBackend<R, f32, i32, BT>>(&out.id, y);
    }
}

/// The kernel on CubeCL tensors (each made contiguous first): runs of inputs of one dtype
/// go to one [`launch`] each.
fn kernel<R: CubeRuntime>(inputs: &[CubeTensor<R>], dtype: DType) -> Result<CubeTensor<R>, String> {
    let is_float = |d: DType| matches!(d, DType::F32 | DType::BF16 | DType::F16);
    if let Some(bad) = inputs.iter().map(|t| t.dtype).chain([dtype]).find(|d| !is_float(*d)) {
        return Err(format!("flat concatenation: {bad:?} is not a float type this kernel converts"));
    }
    let first = inputs.first().ok_or("flat concatenation of nothing")?;
    let (client, device) = (first.client.clone(), first.device.clone());
    let inputs: Vec<CubeTensor<R>> = inputs.iter().map(|t| if t.is_contiguous() { t.clone() } else { into_contiguous(t.clone()) }).collect();
    let total = inputs.iter().map(|t| t.meta.shape().num_elements()).sum::<usize>();
    let output = client.empty(total.max(1) * dtype.size());
    let mut offset = 0;
    let mut run: Vec<Part<'_>> = Vec::new();
    let mut run_dtype = inputs[0].dtype;
    for t in &inputs {
        if t.dtype != run_dtype {
            launch(&client, &run, &output, total, [run_dtype.into(), dtype.into()])?;
            run.clear();
            run_dtype = t.dtype;
        }
        let len = t.meta.shape().num_elements();
        run.push(Part { handle: &t.handle, len, offset });
        offset += len;
    }
    launch(&client, &run, &output, total, [run_dtype.into(), dtype.into()])?;
    Ok(CubeTensor::new_contiguous(client, device, Shape::new([total]), output, dtype))
}

/// The same concatenation in burn's ops ([`super::concat_flat`]'s own path elsewhere).
fn burn_ops<R: CubeRuntime, BT: BoolElement>(inputs: Vec<CubeTensor<R>>, dtype: DType) -> CubeTensor<R> {
    type Inner<R, BT> = CubeBackend<R, f32, i32, BT>;
    let parts = inputs.into_iter().map(super::flatten::<Inner<R, BT>>).collect();
    super::concat_flat_with_burn(parts, dtype).into_primitive().tensor()
}

/// Checks [`super::concat_flat`] and [`super::concat_flattened`] on backend `B` (burn's
/// fusion backend over CUDA or wgpu) against burn's `cat`: 70 parts (three launches of up
/// to 32) of assorted lengths, some in `half`, some views at an offset into a larger buffer,
/// some matrices (a transposed view among them, read in its own row-major order), into an
/// f32 and a `half` vector.
#[cfg(test)]
pub(super) fn check_matches_cat<B: burn::tensor::backend::Backend>(half: DType) {
    use burn::tensor::ops::FloatTensor;
    use burn::tensor::{Distribution, Tensor};
    let device = Default::default();
    let lengths = |k: usize| [1, 7, 256, 257, 1000, 4099, 40][k % 7] + k;
    // Each part in its own shape (as the optimizer gathers gradients) and flattened.
    let (shaped, parts): (Vec<FloatTensor<B>>, Vec<Tensor<B, 1>>) = (0..70)
        .map(|k| {
            let n = lengths(k);
            let part: FloatTensor<B> = match k % 5 {
                // A view at an offset, as FlatAdamW's parameters are after a step.
                0 => Tensor::<B, 1>::random([n + 13], Distribution::Normal(0.0, 1.0), &device).slice(5..5 + n).into_primitive().tensor(),
                1 => super::cast_to(Tensor::<B, 1>::random([n], Distribution::Normal(0.0, 1.0), &device), half).into_primitive().tensor(),
                // A matrix's transpose (a view; copied to its own layout when flattened).
                2 if n % 2 == 0 => Tensor::<B, 2>::random([2, n / 2], Distribution::Normal(0.0, 1.0), &device).swap_dims(0, 1).into_primitive().tensor(),
                3 if n % 3 == 0 => Tensor::<B, 3>::random([n / 3, 1, 3], Distribution::Normal(0.0, 1.0), &device).into_primitive().tensor(),
                _ => Tensor::<B, 1>::random([n], Distribution::Normal(0.0, 1.0), &device).into_primitive().tensor(),
            };
            (part.clone(), super::flatten::<B>(part))
        })
        .unzip();
    let total: usize = (0..70).map(lengths).sum();
    for dtype in [DType::F32, half] {
        let reference = super::concat_flat_with_burn(parts.clone(), dtype);
        let reference = super::cast_to(reference, DType::F32).into_data().to_vec::<f32>().expect("f32");
        for flattened in [false, true] {
            let before = super::vendor_stats();
            let ours = if flattened { super::concat_flattened(shaped.clone(), dtype, &device) } else { super::concat_flat(parts.clone(), dtype, &device) };
            assert_eq!(ours.dims(), [total]);
            assert_eq!(ours.dtype(), dtype);
            let ours = super::cast_to(ours, DType::F32).into_data().to_vec::<f32>().expect("f32");
            // A copy and one rounding (the same rounding as burn's cast): equal values.
            let mismatch = ours.iter().zip(&reference).position(|(a, b)| a != b);
            assert_eq!(mismatch, None, "{dtype:?} (shaped parts: {flattened}): first mismatch at {mismatch:?}");
            let after = super::vendor_stats();
            assert_eq!(after.fallbacks, before.fallbacks, "fallbacks: {:?}", after.last_error);
            assert!(after.fused_concat_calls > before.fused_concat_calls, "the kernel did not run");
        }
    }
}

#[cfg(all(test, feature = "wgpu-test"))]
mod tests {
    #[test]
    fn wgpu_concat_flat_matches_cat() {
        super::check_matches_cat::<burn::backend::Wgpu>(burn::tensor::DType::F16);
    }
}
