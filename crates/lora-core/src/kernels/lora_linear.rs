//! A linear layer with a frozen base, and its LoRA adapter, as one operation of burn's
//! fusion stream each way.
//!
//! `y = x·W + bias + s·(x·A)·B (+ residual)` written with burn's tensor ops is, per adapted
//! layer and training step, about twenty operations of the fusion stream: the products,
//! the rank scale, the sums, the chunked weight gradients' reshapes and reductions, the
//! gradient sum of the input, and a release for every intermediate. The host registers,
//! plan-matches and executes each of them, though most launch nothing or a tiny kernel;
//! with 128 adapted layers that was a third of an SD1.5 step's ~6700 operations
//! (docs/benchmarks.md). Here the forward pass is one custom
//! operation and the backward pass another. Inside them the products go straight to the
//! kernels [`super::matmul`] would route them to (cuBLAS for large products on CUDA, else
//! the fixed CubeCL matmul), and the sums run in two small kernels of this file:
//!
//! - [`lora_epilogue`]: `out = a + s·b (+ bias) (+ c)` in f32, written in the activations'
//!   dtype (the output `x·W + s·(h·B) + bias + residual`, and the input gradient
//!   `dy·Wᵀ + s·(g·Aᵀ)`);
//! - [`sum_partials`]: `s · Σ_k partials[k]` in f32, written in the adapter weights' dtype
//!   (a weight gradient split in row chunks, [`super::split_rows`]; one chunk when unsplit).
//!
//! The backward pass is `g = dy·Bᵀ`, `dA = s·xᵀ·g`, `dB = s·hᵀ·dy`, `dx = dy·Wᵀ + s·g·Aᵀ`,
//! with `h = x·A` kept from the forward pass (`rows × r`, small). Same arithmetic as the
//! composed ops up to where the scale is applied (in f32 after the rounded products,
//! instead of on the half-precision `B` before them). A layer without an adapter (not
//! targeted, or merged) is `x·W + bias (+ residual)` in one operation, its backward pass
//! the routed product `dy·Wᵀ`.

use std::any::TypeId;
use std::marker::PhantomData;

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::{BalancedCheckpointing, CheckpointStrategy, NoCheckpointing};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::Autodiff;
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, FloatTensorOps};
use burn::tensor::{DType, FloatDType, Shape, Tensor};
use burn_cubecl::cubecl;
use burn_cubecl::fusion::FusionCubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime};
use burn_fusion::stream::{Operation, OperationStreams};
use burn_fusion::{FusionRuntime, FusionTensor};
use burn_ir::{CustomOpIr, HandleContainer, OperationIr, TensorIr};
use cubecl::prelude::*;

use super::fixed_matmul::Transpose;
use super::{contiguous, downcast, tensor, FusedCube};

type Inner<R, BT> = CubeBackend<R, f32, i32, BT>;
type Fused<R> = FusionTensor<FusionCubeRuntime<R>>;

/// Threads per cube of both kernels.
pub(super) const THREADS: u32 = 256;

/// Cubes per launch at most; each thread strides over the rest.
const MAX_CUBES: usize = 65_535;

/// `out = a (+ scale·b) (+ bias[column]) (+ c)`, elementwise over `[rows, columns]` tensors
/// (vectors of `N` along a row; `columns` counts vectors), summed in f32.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
fn lora_epilogue<T: Float, P: Float, N: Size>(
    a: &Array<Vector<T, N>>,
    b: &Array<Vector<T, N>>,
    bias: &Array<Vector<P, N>>,
    c: &Array<Vector<T, N>>,
    out: &mut Array<Vector<T, N>>,
    scale: f32,
    columns: u32,
    #[comptime] has_b: bool,
    #[comptime] has_bias: bool,
    #[comptime] has_c: bool,
    #[define(T, P)] _dtypes: [StorageType; 2],
) {
    let n = out.len();
    let stride = (CUBE_COUNT_X * CUBE_DIM_X) as usize;
    let mut i = (CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X) as usize;
    while i < n {
        let mut v = Vector::<f32, N>::cast_from(a[i]);
        if has_b {
            v += Vector::<f32, N>::cast_from(b[i]) * Vector::<f32, N>::new(scale);
        }
        if has_bias {
            v += Vector::<f32, N>::cast_from(bias[i % columns as usize]);
        }
        if has_c {
            v += Vector::<f32, N>::cast_from(c[i]);
        }
        out[i] = Vector::<T, N>::cast_from(v);
        i += stride;
    }
}

/// `out[j] = scale · Σ_k partials[k · len(out) + j]` for `chunks` partial products, summed
/// in f32 and written in `out`'s dtype.
#[cube(launch)]
fn sum_partials<T: Float, O: Float>(partials: &Array<T>, out: &mut Array<O>, chunks: u32, scale: f32, #[define(T, O)] _dtypes: [StorageType; 2]) {
    let n = out.len();
    let stride = (CUBE_COUNT_X * CUBE_DIM_X) as usize;
    let mut j = (CUBE_POS_X * CUBE_DIM_X + UNIT_POS_X) as usize;
    while j < n {
        let mut acc = 0.0f32;
        let mut k = 0usize;
        while k < chunks as usize {
            acc += f32::cast_from(partials[k * n + j]);
            k += 1;
        }
        out[j] = O::cast_from(acc * scale);
        j += stride;
    }
}

/// Cubes for `len` elements (or vectors), one per thread up to [`MAX_CUBES`].
pub(super) fn cubes(len: usize) -> CubeCount {
    CubeCount::Static(len.div_ceil(THREADS as usize).clamp(1, MAX_CUBES) as u32, 1, 1)
}

/// An array argument of `len` elements over `handle`.
///
/// # Safety
///
/// `handle` must hold `len` elements of the kernel's element type for that argument.
pub(super) unsafe fn arg<R: Runtime>(handle: &cubecl::server::Handle, len: usize) -> ArrayArg<R> {
    // SAFETY: the caller's contract.
    unsafe { ArrayArg::from_raw_parts(handle.clone(), len) }
}

fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::F16 | DType::BF16)
}

/// The widest vector the runtime offers that divides a row of `columns` elements of
/// `element` bytes, within 16 bytes (rows start on multiples of it, so every vector is
/// aligned).
pub(super) fn row_vector<R: Runtime>(client: &ComputeClient<R>, element: usize, columns: usize) -> usize {
    client
        .io_optimized_vector_sizes(element)
        .filter(|&v| v >= 1 && columns.is_multiple_of(v) && v * element <= 16)
        .max()
        .unwrap_or(1)
}

/// `t` in `dtype` (a copy only when it differs).
fn cast<R: CubeRuntime, BT: BoolElement>(t: CubeTensor<R>, dtype: DType) -> CubeTensor<R> {
    if t.dtype == dtype {
        t
    } else {
        Inner::<R, BT>::float_cast(t, FloatDType::from(dtype))
    }
}

/// `a (+ scale·b) (+ bias) (+ c)` for `[rows, columns]` tensors `a`, `b`, `c` of one dtype
/// and a `[columns]` bias, in [`lora_epilogue`] (burn's ops where it refuses); `a` itself
/// when there is nothing to add.
fn epilogue<R: CubeRuntime, BT: BoolElement>(a: CubeTensor<R>, b: Option<CubeTensor<R>>, scale: f32, bias: Option<CubeTensor<R>>, c: Option<CubeTensor<R>>) -> CubeTensor<R> {
    if b.is_none() && bias.is_none() && c.is_none() {
        return a;
    }
    match launch_epilogue(&a, b.as_ref(), scale, bias.as_ref(), c.as_ref()) {
        Ok(out) => out,
        Err(reason) => {
            super::record_fallback(reason);
            let mut y = a;
            if let Some(b) = b {
                y = Inner::<R, BT>::float_add(y, Inner::<R, BT>::float_mul_scalar(b, scale.into()));
            }
            if let Some(bias) = bias {
                let columns = bias.meta.shape().num_elements();
                let bias = Inner::<R, BT>::float_reshape(cast::<R, BT>(bias, y.dtype), Shape::new([1, columns]));
                y = Inner::<R, BT>::float_add(y, bias);
            }
            if let Some(c) = c {
                y = Inner::<R, BT>::float_add(y, c);
            }
            y
        }
    }
}

fn launch_epilogue<R: CubeRuntime>(a: &CubeTensor<R>, b: Option<&CubeTensor<R>>, scale: f32, bias: Option<&CubeTensor<R>>, c: Option<&CubeTensor<R>>) -> Result<CubeTensor<R>, String> {
    let shape = a.meta.shape().clone();
    let dims = shape.to_vec();
    let [rows, columns] = dims[..] else {
        return Err(format!("LoRA epilogue: expected [rows, columns], got {dims:?}"));
    };
    let same = |t: &CubeTensor<R>| t.meta.shape().to_vec() == dims && t.dtype == a.dtype;
    if b.is_some_and(|b| !same(b)) || c.is_some_and(|c| !same(c)) || bias.is_some_and(|bias| bias.meta.shape().num_elements() != columns) {
        return Err(format!("LoRA epilogue: operands differ from {dims:?} {:?}", a.dtype));
    }
    if !is_float(a.dtype) || bias.is_some_and(|bias| !is_float(bias.dtype)) {
        return Err(format!("LoRA epilogue: {:?} operands", a.dtype));
    }
    let client = a.client.clone();
    let a = contiguous(a.clone());
    let (b, c) = (b.map(|b| contiguous(b.clone())), c.map(|c| contiguous(c.clone())));
    let bias = bias.map(|bias| contiguous(bias.clone()));
    let out = client.empty(rows * columns * a.dtype.size());
    let bias_dtype = bias.as_ref().map_or(a.dtype, |bias| bias.dtype);
    launch_epilogue_kernel(
        &client,
        &a.handle,
        b.as_ref().map(|b| &b.handle),
        bias.as_ref().map(|bias| &bias.handle),
        c.as_ref().map(|c| &c.handle),
        &out,
        [rows, columns],
        scale,
        [a.dtype.into(), bias_dtype.into()],
    )?;
    Ok(CubeTensor::new_contiguous(client, a.device.clone(), shape, out, a.dtype))
}

/// Launches [`lora_epilogue`] on contiguous buffers: `a`, `b`, `c` and `out` hold
/// `rows · columns` elements of `dtypes[0]`, the bias `columns` of `dtypes[1]`.
#[allow(clippy::too_many_arguments)]
pub(super) fn launch_epilogue_kernel<R: Runtime>(
    client: &ComputeClient<R>,
    a: &cubecl::server::Handle,
    b: Option<&cubecl::server::Handle>,
    bias: Option<&cubecl::server::Handle>,
    c: Option<&cubecl::server::Handle>,
    out: &cubecl::server::Handle,
    [rows, columns]: [usize; 2],
    scale: f32,
    dtypes: [StorageType; 2],
) -> Result<(), String> {
    let len = rows * columns;
    if u32::try_from(len).is_err() {
        return Err(format!("LoRA epilogue: {len} elements are over u32"));
    }
    let vector = row_vector(client, dtypes[0].size(), columns);
    // Absent operands are bound to `a` and never read.
    let (bias_handle, bias_len) = bias.map_or((a, len), |bias| (bias, columns));
    // SAFETY: the caller's contract on the buffers; the vector divides a row, so the bias
    // is whole vectors. Array arguments count elements; the kernel sees `len / vector`.
    unsafe {
        lora_epilogue::launch::<R>(
            client,
            cubes(len / vector),
            CubeDim::new_1d(THREADS),
            vector,
            arg(a, len),
            arg(b.unwrap_or(a), len),
            arg(bias_handle, bias_len),
            arg(c.unwrap_or(a), len),
            arg(out, len),
            scale,
            (columns / vector) as u32,
            b.is_some(),
            bias.is_some(),
            c.is_some(),
            dtypes,
        );
    }
    Ok(())
}

/// `op(a) · op(b)` where [`super::matmul_transposed`] would run it: cuBLAS on CUDA (switch
/// on, large enough), else the fixed CubeCL kernel, else burn's matmul; counted the same.
fn product<R: CubeRuntime, BT: BoolElement>(a: CubeTensor<R>, b: CubeTensor<R>, transpose: Transpose) -> CubeTensor<R> {
    let a = Transpose::apply::<R, BT>(transpose.a, a);
    let b = Transpose::apply::<R, BT>(transpose.b, b);
    #[cfg(feature = "cuda")]
    if super::cublas_enabled() && super::worth_routing(&a.meta.shape().to_vec(), &b.meta.shape().to_vec()) {
        if let Some(result) = cublas_product(&a, &b) {
            match result {
                Ok(y) => {
                    super::record_cublas_call();
                    return y;
                }
                Err(reason) => super::record_fallback(reason),
            }
        }
    }
    if super::fixed_matmul_enabled() {
        match super::fixed_matmul::run(a.clone(), b.clone()) {
            Ok(y) => {
                super::record_fixed_matmul();
                return y;
            }
            Err(reason) => super::record_fallback(reason),
        }
    }
    Inner::<R, BT>::float_matmul(a, b)
}

/// cuBLAS's product when `R` is the CUDA runtime, else `None`.
#[cfg(feature = "cuda")]
fn cublas_product<R: CubeRuntime>(a: &CubeTensor<R>, b: &CubeTensor<R>) -> Option<Result<CubeTensor<R>, String>> {
    use burn_cubecl::cubecl::cuda::CudaRuntime;
    if TypeId::of::<R>() != TypeId::of::<CudaRuntime>() {
        return None;
    }
    let (a, b): (CubeTensor<CudaRuntime>, CubeTensor<CudaRuntime>) = (downcast(a.clone())?, downcast(b.clone())?);
    Some(super::cublas::run(a, b).map(|y| downcast(y).expect("R is the CUDA runtime")))
}

/// `scale · xᵀ · dy` for `x: [rows, m]`, `dy: [rows, n]`, in `dtype`: the product in row
/// chunks where [`super::split_rows`] splits it (as [`super::weight_grad`] does), the
/// partial products summed and scaled in f32 by [`sum_partials`].
fn weight_grad<R: CubeRuntime, BT: BoolElement>(x: CubeTensor<R>, dy: CubeTensor<R>, scale: f32, dtype: DType) -> CubeTensor<R> {
    let (rows, m, n) = (x.meta.shape()[0], x.meta.shape()[1], dy.meta.shape()[1]);
    let transposed = Transpose { a: true, b: false };
    let (partials, chunks) = match super::split_rows(rows, m * n) {
        Some(chunk) => {
            let chunks = rows / chunk;
            let x = Inner::<R, BT>::float_reshape(x, Shape::new([chunks, chunk, m]));
            let dy = Inner::<R, BT>::float_reshape(dy, Shape::new([chunks, chunk, n]));
            (product::<R, BT>(x, dy, transposed), chunks)
        }
        None => (product::<R, BT>(x, dy, transposed), 1),
    };
    match launch_sum_partials(&partials, chunks, m * n, scale, dtype) {
        Ok(out) => Inner::<R, BT>::float_reshape(out, Shape::new([m, n])),
        Err(reason) => {
            super::record_fallback(reason);
            let partials = Inner::<R, BT>::float_reshape(cast::<R, BT>(partials, DType::F32), Shape::new([chunks, m * n]));
            let sum = Inner::<R, BT>::float_mul_scalar(Inner::<R, BT>::float_sum_dim(partials, 0), scale.into());
            Inner::<R, BT>::float_reshape(cast::<R, BT>(sum, dtype), Shape::new([m, n]))
        }
    }
}

fn launch_sum_partials<R: CubeRuntime>(partials: &CubeTensor<R>, chunks: usize, len: usize, scale: f32, dtype: DType) -> Result<CubeTensor<R>, String> {
    if !is_float(partials.dtype) || !is_float(dtype) {
        return Err(format!("LoRA weight gradient: {:?} partials into {dtype:?}", partials.dtype));
    }
    if partials.meta.shape().num_elements() != chunks * len {
        return Err(format!("LoRA weight gradient: partials {:?} for {chunks} chunks of {len}", partials.meta.shape()));
    }
    let partials = contiguous(partials.clone());
    let client = partials.client.clone();
    let out = client.empty(len * dtype.size());
    launch_sum_partials_kernel(&client, &partials.handle, &out, chunks, len, scale, [partials.dtype.into(), dtype.into()])?;
    Ok(CubeTensor::new_contiguous(client, partials.device.clone(), Shape::new([len]), out, dtype))
}

/// Launches [`sum_partials`]: `partials` holds `chunks · len` elements of `dtypes[0]`,
/// `out` `len` of `dtypes[1]`.
pub(super) fn launch_sum_partials_kernel<R: Runtime>(
    client: &ComputeClient<R>,
    partials: &cubecl::server::Handle,
    out: &cubecl::server::Handle,
    chunks: usize,
    len: usize,
    scale: f32,
    dtypes: [StorageType; 2],
) -> Result<(), String> {
    let chunks_u32 = u32::try_from(chunks).map_err(|_| format!("LoRA weight gradient: {chunks} chunks"))?;
    if u32::try_from(chunks * len).is_err() {
        return Err(format!("LoRA weight gradient: {chunks} × {len} partial elements are over u32"));
    }
    // SAFETY: the caller's contract on the buffers.
    unsafe {
        sum_partials::launch::<R>(client, cubes(len), CubeDim::new_1d(THREADS), arg(partials, chunks * len), arg(out, len), chunks_u32, scale, dtypes);
    }
    Ok(())
}

/// What a queued forward pass has besides `x` and `W`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Variant {
    adapter: bool,
    bias: bool,
    residual: bool,
    /// Whether `h = x·A` is an output (for the backward pass; with an adapter only).
    keep_h: bool,
}

impl Variant {
    fn name(self) -> &'static str {
        // burn-fusion matches cached plans by the operations' descriptions; the variants
        // differ in their inputs anyway, the names say which is which in its logs.
        const PLAIN: [&str; 4] = ["sd_linear", "sd_linear_b", "sd_linear_r", "sd_linear_br"];
        const LORA: [&str; 8] = [
            "sd_lora_linear",
            "sd_lora_linear_b",
            "sd_lora_linear_r",
            "sd_lora_linear_br",
            "sd_lora_linear_h",
            "sd_lora_linear_bh",
            "sd_lora_linear_rh",
            "sd_lora_linear_brh",
        ];
        let index = usize::from(self.bias) | usize::from(self.residual) << 1;
        if self.adapter {
            LORA[index | usize::from(self.keep_h) << 2]
        } else {
            PLAIN[index]
        }
    }
}

/// The frozen base and the adapter (`A`, `B`) of one layer as fusion tensors.
struct Operands<R: CubeRuntime> {
    x: Fused<R>,
    weight: Fused<R>,
    bias: Option<Fused<R>>,
    adapter: Option<(Fused<R>, Fused<R>)>,
    residual: Option<Fused<R>>,
}

/// Queues the forward pass: `y` and, with `keep_h` (and an adapter), `h = x·A` (both in
/// `x`'s dtype).
fn register_forward<R: CubeRuntime, BT: BoolElement>(operands: Operands<R>, scale: f32, keep_h: bool) -> (Fused<R>, Option<Fused<R>>) {
    let Operands { x, weight, bias, adapter, residual } = operands;
    let client = x.client.clone();
    let variant = Variant {
        adapter: adapter.is_some(),
        bias: bias.is_some(),
        residual: residual.is_some(),
        keep_h: keep_h && adapter.is_some(),
    };
    let (rows, d_out) = (x.shape[0], weight.shape[1]);
    let rank = adapter.as_ref().map_or(0, |(down, _)| down.shape[1]);
    let dtype = x.dtype;
    let mut inputs = vec![x, weight];
    if let Some((down, up)) = adapter {
        inputs.extend([down, up]);
    }
    inputs.extend(bias);
    inputs.extend(residual);
    let streams = OperationStreams::with_inputs(&inputs);
    let mut outputs = vec![TensorIr::uninit(client.create_empty_handle(), Shape::new([rows, d_out]), dtype)];
    if variant.keep_h {
        outputs.push(TensorIr::uninit(client.create_empty_handle(), Shape::new([rows, rank]), dtype));
    }
    let inputs: Vec<TensorIr> = inputs.into_iter().map(FusionTensor::into_ir).collect();
    let desc = CustomOpIr::new(variant.name(), &inputs, &outputs);
    let op = LoraForward::<R, BT> {
        desc: desc.clone(),
        variant,
        scale,
        _backend: PhantomData,
    };
    let mut outputs = client.register(streams, OperationIr::Custom(desc), op).into_iter();
    let y = outputs.next().expect("the op has an output");
    (y, outputs.next())
}

/// One queued forward pass.
struct LoraForward<R, BT> {
    desc: CustomOpIr,
    variant: Variant,
    scale: f32,
    _backend: PhantomData<fn() -> (R, BT)>,
}

impl<R, BT> std::fmt::Debug for LoraForward<R, BT> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoraForward").field("variant", &self.variant).field("scale", &self.scale).finish()
    }
}

impl<R: CubeRuntime, BT: BoolElement> Operation<FusionCubeRuntime<R>> for LoraForward<R, BT> {
    fn execute(&self, handles: &mut HandleContainer<<FusionCubeRuntime<R> as FusionRuntime>::FusionHandle>) {
        let mut inputs = self.desc.inputs.iter().map(|ir| handles.get_float_tensor::<Inner<R, BT>>(ir));
        let mut next = || inputs.next().expect("input count fixed by `register_forward`");
        let (x, weight) = (next(), next());
        let adapter = self.variant.adapter.then(|| (next(), next()));
        let bias = self.variant.bias.then(&mut next);
        let residual = self.variant.residual.then(&mut next);
        let dtype = x.dtype;
        let plain = Transpose::default();
        let base = product::<R, BT>(x.clone(), weight, plain);
        let (delta, h) = match adapter {
            Some((down, up)) => {
                let (down, up) = (cast::<R, BT>(down, dtype), cast::<R, BT>(up, dtype));
                let h = product::<R, BT>(x, down, plain);
                (Some(product::<R, BT>(h.clone(), up, plain)), Some(h))
            }
            None => (None, None),
        };
        let y = epilogue::<R, BT>(base, delta, self.scale, bias, residual);
        super::record_fused_lora_linear();
        handles.register_float_tensor::<Inner<R, BT>>(&self.desc.outputs[0].id, y);
        if let (true, Some(h)) = (self.variant.keep_h, h) {
            handles.register_float_tensor::<Inner<R, BT>>(&self.desc.outputs[1].id, h);
        }
    }
}

/// Queues the backward pass: `dx` (with `want_dx`, in `dy`'s dtype) and `(dA, dB)` (with
/// `want_params`, in `A`'s and `B`'s dtypes).
#[allow(clippy::type_complexity)]
fn register_backward<R: CubeRuntime, BT: BoolElement>(
    [x, weight, down, up, h, dy]: [Fused<R>; 6],
    scale: f32,
    want_dx: bool,
    want_params: bool,
) -> (Option<Fused<R>>, Option<(Fused<R>, Fused<R>)>) {
    const NAMES: [&str; 3] = ["sd_lora_linear_backward_x", "sd_lora_linear_backward_ab", "sd_lora_linear_backward"];
    let client = x.client.clone();
    let like = |t: &Fused<R>, dtype: DType| TensorIr::uninit(client.create_empty_handle(), t.shape.clone(), dtype);
    let mut outputs = Vec::new();
    if want_dx {
        outputs.push(like(&x, dy.dtype));
    }
    if want_params {
        outputs.extend([like(&down, down.dtype), like(&up, up.dtype)]);
    }
    let inputs = [x, weight, down, up, h, dy];
    let streams = OperationStreams::with_inputs(&inputs);
    let inputs: Vec<TensorIr> = inputs.into_iter().map(FusionTensor::into_ir).collect();
    let name = NAMES[usize::from(want_dx) + 2 * usize::from(want_params) - 1];
    let desc = CustomOpIr::new(name, &inputs, &outputs);
    let op = LoraBackward::<R, BT> {
        desc: desc.clone(),
        scale,
        want_dx,
        want_params,
        _backend: PhantomData,
    };
    let mut grads = client.register(streams, OperationIr::Custom(desc), op).into_iter();
    let dx = if want_dx { grads.next() } else { None };
    let params = grads.next().zip(grads.next());
    (dx, params)
}

/// One queued backward pass.
struct LoraBackward<R, BT> {
    desc: CustomOpIr,
    scale: f32,
    want_dx: bool,
    want_params: bool,
    _backend: PhantomData<fn() -> (R, BT)>,
}

impl<R, BT> std::fmt::Debug for LoraBackward<R, BT> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoraBackward").field("scale", &self.scale).field("dx", &self.want_dx).field("params", &self.want_params).finish()
    }
}

impl<R: CubeRuntime, BT: BoolElement> Operation<FusionCubeRuntime<R>> for LoraBackward<R, BT> {
    fn execute(&self, handles: &mut HandleContainer<<FusionCubeRuntime<R> as FusionRuntime>::FusionHandle>) {
        let [x, weight, down, up, h, dy] = std::array::from_fn(|i| handles.get_float_tensor::<Inner<R, BT>>(&self.desc.inputs[i]));
        let dtype = dy.dtype;
        let (down_dtype, up_dtype) = (down.dtype, up.dtype);
        let (down, up) = (cast::<R, BT>(down, dtype), cast::<R, BT>(up, dtype));
        // `g = dy·Bᵀ`, the unscaled gradient of `h`.
        let g = product::<R, BT>(dy.clone(), up, Transpose { a: false, b: true });
        let mut results = Vec::new();
        if self.want_dx {
            let through_base = product::<R, BT>(dy.clone(), weight, Transpose { a: false, b: true });
            let through_adapter = product::<R, BT>(g.clone(), down, Transpose { a: false, b: true });
            results.push(epilogue::<R, BT>(through_base, Some(through_adapter), self.scale, None, None));
        }
        if self.want_params {
            results.push(weight_grad::<R, BT>(x, g, self.scale, down_dtype));
            results.push(weight_grad::<R, BT>(h, dy, self.scale, up_dtype));
        }
        super::record_fused_lora_linear();
        for (ir, t) in self.desc.outputs.iter().zip(results) {
            handles.register_float_tensor::<Inner<R, BT>>(&ir.id, t);
        }
    }
}

/// The inputs of [`super::lora_linear`]: `x·weight + bias + scale·(x·down)·up + residual`
/// on `[rows, ·]` rows, `weight: [d_in, d_out]` (burn's layout), `adapter` = `(down, up)`
/// with `down: [d_in, r]`, `up: [r, d_out]`; without an adapter, `x·weight + bias + residual`.
pub(crate) struct LoraLinearInputs<B: Backend> {
    pub x: Tensor<B, 2>,
    pub weight: Tensor<B, 2>,
    pub bias: Option<Tensor<B, 1>>,
    pub adapter: Option<(Tensor<B, 2>, Tensor<B, 2>)>,
    pub residual: Option<Tensor<B, 2>>,
    pub scale: f32,
}

/// `t` as a tensor of backend `X`, keeping `None`; `B` must be `X`.
fn same_backend<T: 'static, U: 'static>(t: Option<T>) -> Option<U> {
    t.map(|t| downcast(t).expect("the backend was checked"))
}

impl<B: Backend> LoraLinearInputs<B> {
    /// Whether the op takes these dtypes: float activations, the base weight and residual
    /// in them, a float bias (its own dtype) and float adapter weights.
    fn dtypes_fit(&self) -> bool {
        let dtype = self.x.dtype();
        is_float(dtype)
            && self.weight.dtype() == dtype
            && self.bias.as_ref().is_none_or(|b| is_float(b.dtype()))
            && self.residual.as_ref().is_none_or(|r| r.dtype() == dtype)
            && self.adapter.as_ref().is_none_or(|(down, up)| is_float(down.dtype()) && is_float(up.dtype()))
    }

    /// The inputs as tensors of backend `X`, which `B` must be. Taken by value: an input
    /// the op reads as its last handle is released by the op, where a clone would leave a
    /// release operation of its own on the stream.
    fn into_backend<X: Backend>(self) -> LoraLinearInputs<X> {
        let cast = |t: Tensor<B, 2>| -> Tensor<X, 2> { downcast(t).expect("the backend was checked") };
        LoraLinearInputs {
            x: cast(self.x),
            weight: cast(self.weight),
            bias: same_backend(self.bias),
            adapter: self.adapter.map(|(down, up)| (cast(down), cast(up))),
            residual: same_backend(self.residual),
            scale: self.scale,
        }
    }
}

/// The op when `B` is [`FusedCube<R, BT>`] or the autodiff backend over it (a frozen base),
/// else the inputs back.
pub(super) fn dispatch<B: Backend, R: CubeRuntime, BT: BoolElement>(inputs: LoraLinearInputs<B>) -> Result<Tensor<B, 2>, LoraLinearInputs<B>> {
    if !inputs.dtypes_fit() {
        return Err(inputs);
    }
    let id = TypeId::of::<B>();
    if id == TypeId::of::<FusedCube<R, BT>>() {
        let LoraLinearInputs { x, weight, bias, adapter, residual, scale } = inputs.into_backend::<FusedCube<R, BT>>();
        let prim = |t: Tensor<FusedCube<R, BT>, 2>| -> Fused<R> { t.into_primitive().tensor() };
        let operands = Operands {
            x: prim(x),
            weight: prim(weight),
            bias: bias.map(|b: Tensor<FusedCube<R, BT>, 1>| b.into_primitive().tensor()),
            adapter: adapter.map(|(down, up)| (prim(down), prim(up))),
            residual: residual.map(prim),
        };
        let (y, _) = register_forward::<R, BT>(operands, scale, false);
        return Ok(downcast(tensor::<FusedCube<R, BT>, 2>(y)).expect("the backend was checked"));
    }
    if id == TypeId::of::<Autodiff<FusedCube<R, BT>, NoCheckpointing>>() {
        return autodiff::<B, R, BT, NoCheckpointing>(inputs);
    }
    if id == TypeId::of::<Autodiff<FusedCube<R, BT>, BalancedCheckpointing>>() {
        return autodiff::<B, R, BT, BalancedCheckpointing>(inputs);
    }
    Err(inputs)
}

/// Registers the op with autodiff over the parents `$nodes` (`[x, A, B, residual]`, the
/// adapter's and the residual's where present): tracked, with the state the backward pass
/// needs and `h` kept; untracked, the forward pass alone.
macro_rules! record {
    ($op:expr, $c:ty, $n:literal, $nodes:expr, $operands:expr, $scale:expr, $state:expr) => {
        match <LoraLinearBackward as Backward<FusedCube<R, BT>, $n>>::prepare::<$c>($op, $nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (y, h) = register_forward::<R, BT>($operands, $scale, true);
                prep.finish($state(h), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(register_forward::<R, BT>($operands, $scale, false).0),
        }
    };
}

/// The op on `Autodiff<FusedCube<R, BT>, C>` (which `B` must be) with a frozen base; the
/// inputs back for a tracked base weight or bias (a trainable or derived base, which the
/// composed ops differentiate).
fn autodiff<B: Backend, R: CubeRuntime, BT: BoolElement, C: CheckpointStrategy>(inputs: LoraLinearInputs<B>) -> Result<Tensor<B, 2>, LoraLinearInputs<B>> {
    type A<R, BT, C> = Autodiff<FusedCube<R, BT>, C>;
    let tracked = |t: &FloatTensor<A<R, BT, C>>| !t.node.requirement.is_none();
    // Clones for the check, dropped before the inputs are consumed.
    let base_tracked = {
        let weight: Tensor<A<R, BT, C>, 2> = downcast(inputs.weight.clone()).expect("the backend was checked");
        let bias: Option<Tensor<A<R, BT, C>, 1>> = same_backend(inputs.bias.clone());
        tracked(&weight.into_primitive().tensor()) || bias.is_some_and(|b| tracked(&b.into_primitive().tensor()))
    };
    if base_tracked {
        return Err(inputs);
    }
    let LoraLinearInputs { x, weight, bias, adapter, residual, scale } = inputs.into_backend::<A<R, BT, C>>();
    let prim = |t: Tensor<A<R, BT, C>, 2>| -> FloatTensor<A<R, BT, C>> { t.into_primitive().tensor() };
    let (x, weight) = (prim(x), prim(weight));
    let bias: Option<FloatTensor<A<R, BT, C>>> = bias.map(|b| b.into_primitive().tensor());
    let adapter = adapter.map(|(down, up)| (prim(down), prim(up)));
    let residual = residual.map(prim);
    let operands = Operands {
        x: x.primitive.clone(),
        weight: weight.primitive.clone(),
        bias: bias.map(|b| b.primitive),
        adapter: adapter.as_ref().map(|(down, up)| (down.primitive.clone(), up.primitive.clone())),
        residual: residual.as_ref().map(|r| r.primitive.clone()),
    };
    let state = |h: Option<Fused<R>>| LoraState {
        weight: weight.primitive.clone(),
        adapter: adapter.as_ref().map(|(down, up)| AdapterState {
            x: x.primitive.clone(),
            down: down.primitive.clone(),
            up: up.primitive.clone(),
            h: h.expect("h is kept with an adapter"),
        }),
    };
    let op = LoraLinearBackward { scale, adapter: adapter.is_some() };
    let out = match (&adapter, &residual) {
        (Some((down, up)), Some(r)) => record!(op, C, 4, [x.node.clone(), down.node.clone(), up.node.clone(), r.node.clone()], operands, scale, state),
        (Some((down, up)), None) => record!(op, C, 3, [x.node.clone(), down.node.clone(), up.node.clone()], operands, scale, state),
        (None, Some(r)) => record!(op, C, 2, [x.node.clone(), r.node.clone()], operands, scale, state),
        (None, None) => record!(op, C, 1, [x.node.clone()], operands, scale, state),
    };
    Ok(downcast(tensor::<A<R, BT, C>, 2>(out)).expect("the backend was checked"))
}

/// What the backward pass keeps: the frozen weight and, with an adapter, the input, the
/// adapter weights and `h = x·A`.
#[derive(Debug, Clone)]
struct LoraState<R: CubeRuntime> {
    weight: Fused<R>,
    adapter: Option<AdapterState<R>>,
}

/// The adapter's part of [`LoraState`].
#[derive(Debug, Clone)]
struct AdapterState<R: CubeRuntime> {
    x: Fused<R>,
    down: Fused<R>,
    up: Fused<R>,
    h: Fused<R>,
}

/// Backward of the op: parents `x`, then `A` and `B` with an adapter, then the residual
/// (whose gradient is the output's) when there is one.
#[derive(Debug)]
struct LoraLinearBackward {
    scale: f32,
    adapter: bool,
}

impl<R: CubeRuntime, BT: BoolElement, const N: usize> Backward<FusedCube<R, BT>, N> for LoraLinearBackward {
    type State = LoraState<R>;

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _checkpointer: &mut Checkpointer) {
        let dy: Fused<R> = grads.consume::<FusedCube<R, BT>>(&ops.node);
        let parents = &ops.parents;
        let residual = if self.adapter { 3 } else { 1 };
        if let Some(Some(node)) = parents.get(residual) {
            grads.register::<FusedCube<R, BT>>(node.id, dy.clone());
        }
        let LoraState { weight, adapter } = ops.state;
        let Some(AdapterState { x, down, up, h }) = adapter else {
            // The base alone: `dx = dy·Wᵀ`, routed like any product.
            if let Some(node) = &parents[0] {
                let dx = super::matmul_transposed(tensor::<FusedCube<R, BT>, 2>(dy), tensor(weight), false, true);
                grads.register::<FusedCube<R, BT>>(node.id, dx.into_primitive().tensor());
            }
            return;
        };
        let (want_dx, want_params) = (parents[0].is_some(), parents[1].is_some() || parents[2].is_some());
        if !want_dx && !want_params {
            return;
        }
        let (dx, params) = register_backward::<R, BT>([x, weight, down, up, h, dy], self.scale, want_dx, want_params);
        if let (Some(node), Some(dx)) = (&parents[0], dx) {
            grads.register::<FusedCube<R, BT>>(node.id, dx);
        }
        if let Some((da, db)) = params {
            if let Some(node) = &parents[1] {
                grads.register::<FusedCube<R, BT>>(node.id, da);
            }
            if let Some(node) = &parents[2] {
                grads.register::<FusedCube<R, BT>>(node.id, db);
            }
        }
    }
}

#[cfg(all(test, feature = "wgpu-test"))]
mod tests {
    //! The ops on burn's wgpu backend (lavapipe without a GPU):
    //! `cargo test -p lora-core --release --features wgpu-test -- lora_linear`.
    use crate::kernels::tests::{check_fused_lora_linear, SWITCH};

    #[test]
    fn wgpu_fused_lora_linear_matches_composed_ops() {
        let _guard = SWITCH.lock().unwrap_or_else(|e| e.into_inner());
        check_fused_lora_linear::<burn::backend::Autodiff<burn::backend::Wgpu>>(burn::tensor::DType::F16, 2e-2);
    }
}
