//! Attention through cuDNN's fused scaled-dot-product-attention engines (the `sdpa_sm90_flash`
//! kernels PyTorch runs on Hopper), forward and backward, for [`super::set_cudnn_attention`].
//!
//! cuDNN has no single call for attention before 9.13.1 (and none for its backward pass at
//! all): its SDPA engines are picked by the heuristics for an *operation graph* of matmuls,
//! pointwise ops and reductions that spells attention out. The graphs here are the ones
//! NVIDIA's cudnn-frontend (`CompositeSDPANode`, `CompositeSDPABackwardNode`) builds for
//! attention without masks or dropout and with as many key/value heads as query heads,
//! written with cuDNN's backend API (`cudnnBackend*`) directly, the tensors' data types,
//! virtual flags and layouts as the frontend sets them:
//!
//! - forward: `S = Q·Kᵀ`, `S·scale`, the softmax as max / subtract / exp / sum / divide with
//!   the statistics `m + ln Σ` written out (f32, `[b, h, s_q, 1]`), `P` in the inputs' dtype,
//!   `O = P·V`;
//! - backward: `Δ = rowsum(dO ∘ O)` (written to a buffer of ours), `P = exp(S·scale − stats)`,
//!   `dV = Pᵀ·dO`, `dS = P ∘ (dO·Vᵀ − Δ) · scale`, `dK = dSᵀ·Q`, `dQ = dS·K` (through an f32
//!   buffer of ours); for key counts that are not a multiple of 128, with the padding mask
//!   the frontend adds there as a workaround ([`needs_padding_mask`]).
//!
//! The frontend (v1.14 on, cuDNN 9.13.1 on) may build the forward pass as one SDPA
//! operation instead; the composite graph stays the one it falls back to.
//!
//! Inputs and outputs keep their strides (the head-split `[b, s, h, d]` views of the model
//! are read where they are); the statistics have the layout and meaning of the flash
//! kernels' log-sum-exp, so either backward pass takes either forward's. Each problem's
//! execution plan is built once (heuristics mode A, the first engine configuration that
//! finalizes) and cached; calls are ordered with burn's kernels like every cuDNN call
//! ([`super::device::run_on_buffers`]). Any failure is returned as a message naming the
//! step, and the caller falls back to its own kernels: set `CUDNN_LOGERR_DBG=1` and
//! `CUDNN_LOGDEST_DBG=stderr` to have cuDNN say why it refused a graph.

use std::collections::HashMap;
use std::ffi::c_void;

use burn::tensor::{DType, Shape};
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::cubecl::server::Handle;
use burn_cubecl::tensor::CubeTensor;
use cudarc::cudnn::sys::{self, cudnnBackendAttributeName_t as Attr, cudnnBackendAttributeType_t as Ty, cudnnBackendDescriptorType_t as Kind};
use cudarc::cudnn::result;
use cudarc::driver::sys::CUstream;

use super::device;
// Head-split views in and out, as the flash kernels read and write them.
use super::flash::{output_like, rowwise};

/// Byte alignment promised for every tensor (cudnn-frontend's default; cubecl's buffers
/// start 256-byte aligned and SD's head dimensions keep rows 16-byte aligned).
const ALIGNMENT: i64 = 16;

/// One device's cuDNN handle (bound to our stream) and the plans built so far.
struct DeviceState {
    handle: sys::cudnnHandle_t,
    plans: HashMap<Key, Result<Plan, String>>,
}

// SAFETY: the handle and plans are only used while holding `STATE`'s lock, one thread at a
// time; cuDNN handles and backend descriptors may be used from any thread of the process.
unsafe impl Send for DeviceState {}

static STATE: device::PerDevice<DeviceState> = device::PerDevice::new("cuDNN attention");

/// What a plan depends on: the pass, the dtype, the sizes and every operand's strides.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    backward: bool,
    dtype: DType,
    /// `[b, h, s_q, s_kv, d]`.
    sizes: [usize; 5],
    /// Strides of `q, k, v, o` and, backward, `do, dq, dk, dv` (`[b, h, s, d]` order).
    strides: Vec<[usize; 4]>,
    /// The score scale's bits (a by-value operand, but part of the problem's identity).
    scale: u32,
}

/// A built execution plan, the descriptors it was built from (kept alive with it), its
/// workspace size, and the uids of its operands in the order `run` passes their pointers.
struct Plan {
    plan: Desc,
    _graph: Vec<Desc>,
    workspace: usize,
    uids: Vec<i64>,
    /// The uids of the by-value scalars and their values (`attn_scale`, and backward `1.0`
    /// and, with the padding mask, `-inf`).
    scalars: Vec<(i64, f32)>,
    /// Device tensors the plan owns, with their uids: the padding mask's sequence lengths.
    constants: Vec<(i64, Handle)>,
}

/// An owned backend descriptor, destroyed on drop.
struct Desc(sys::cudnnBackendDescriptor_t);

impl Drop for Desc {
    fn drop(&mut self) {
        // SAFETY: the descriptor was created by `Desc::new` and is destroyed once.
        unsafe { sys::cudnnBackendDestroyDescriptor(self.0) };
    }
}

fn check(status: sys::cudnnStatus_t, what: &str) -> Result<(), String> {
    if status == sys::cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(format!("{what}: {status:?}"))
    }
}

impl Desc {
    fn new(kind: Kind) -> Result<Self, String> {
        let mut raw = std::ptr::null_mut();
        // SAFETY: `raw` receives a new descriptor.
        check(unsafe { sys::cudnnBackendCreateDescriptor(kind, &mut raw) }, &format!("creating a {kind:?}"))?;
        Ok(Self(raw))
    }

    /// Sets attribute `name` to `values` of backend type `ty` (`T` must be that type's C type).
    fn set<T>(&self, name: Attr, ty: Ty, values: &[T]) -> Result<(), String> {
        // SAFETY: `values` holds `len` elements of the attribute's C type (the caller's
        // contract); cuDNN copies them.
        check(unsafe { sys::cudnnBackendSetAttribute(self.0, name, ty, values.len() as i64, values.as_ptr().cast()) }, &format!("{name:?}"))
    }

    fn set_desc(&self, name: Attr, other: &Desc) -> Result<(), String> {
        self.set(name, Ty::CUDNN_TYPE_BACKEND_DESCRIPTOR, &[other.0])
    }

    fn set_data_type(&self, name: Attr, dtype: sys::cudnnDataType_t) -> Result<(), String> {
        self.set(name, Ty::CUDNN_TYPE_DATA_TYPE, &[dtype])
    }

    fn finalize(self, what: &str) -> Result<Self, String> {
        // SAFETY: a descriptor of ours.
        check(unsafe { sys::cudnnBackendFinalize(self.0) }, &format!("finalizing {what}"))?;
        Ok(self)
    }
}

/// A pointwise operation: its mode, the precision it computes in and, for index
/// generation, the axis.
struct Pointwise {
    mode: sys::cudnnPointwiseMode_t,
    precision: sys::cudnnDataType_t,
    axis: Option<i64>,
}

/// A tensor of the graph: its uid and descriptor index in [`Graph::descs`].
#[derive(Clone, Copy)]
struct T {
    uid: i64,
    at: usize,
}

/// An operation graph under construction.
struct Graph {
    descs: Vec<Desc>,
    ops: Vec<usize>,
    next_uid: i64,
}

const FLOAT: sys::cudnnDataType_t = sys::cudnnDataType_t::CUDNN_DATA_FLOAT;

impl Graph {
    fn new() -> Self {
        Self { descs: Vec::new(), ops: Vec::new(), next_uid: 1 }
    }

    fn keep(&mut self, desc: Desc) -> usize {
        self.descs.push(desc);
        self.descs.len() - 1
    }

    fn tensor_with(&mut self, dims: [i64; 4], strides: [i64; 4], dtype: sys::cudnnDataType_t, is_virtual: bool, by_value: bool) -> Result<T, String> {
        let uid = self.next_uid;
        self.next_uid += 1;
        let d = Desc::new(Kind::CUDNN_BACKEND_TENSOR_DESCRIPTOR)?;
        d.set_data_type(Attr::CUDNN_ATTR_TENSOR_DATA_TYPE, dtype)?;
        d.set(Attr::CUDNN_ATTR_TENSOR_DIMENSIONS, Ty::CUDNN_TYPE_INT64, &dims)?;
        d.set(Attr::CUDNN_ATTR_TENSOR_STRIDES, Ty::CUDNN_TYPE_INT64, &strides)?;
        d.set(Attr::CUDNN_ATTR_TENSOR_UNIQUE_ID, Ty::CUDNN_TYPE_INT64, &[uid])?;
        d.set(Attr::CUDNN_ATTR_TENSOR_BYTE_ALIGNMENT, Ty::CUDNN_TYPE_INT64, &[ALIGNMENT])?;
        d.set(Attr::CUDNN_ATTR_TENSOR_IS_VIRTUAL, Ty::CUDNN_TYPE_BOOLEAN, &[is_virtual])?;
        if by_value {
            d.set(Attr::CUDNN_ATTR_TENSOR_IS_BY_VALUE, Ty::CUDNN_TYPE_BOOLEAN, &[true])?;
        }
        let d = d.finalize("a tensor descriptor")?;
        Ok(T { uid, at: self.keep(d) })
    }

    /// A tensor in memory (an operand of the plan).
    fn tensor(&mut self, dims: [i64; 4], strides: [i64; 4], dtype: sys::cudnnDataType_t) -> Result<T, String> {
        self.tensor_with(dims, strides, dtype, false, false)
    }

    /// An intermediate that never reaches memory (the engine keeps it on chip).
    fn virt(&mut self, dims: [i64; 4], strides: [i64; 4], dtype: sys::cudnnDataType_t) -> Result<T, String> {
        self.tensor_with(dims, strides, dtype, true, false)
    }

    /// An f32 scalar passed by value (a host pointer in the variant pack).
    fn scalar(&mut self) -> Result<T, String> {
        self.tensor_with([1, 1, 1, 1], [1, 1, 1, 1], FLOAT, false, true)
    }

    fn op(&mut self, d: Desc, what: &str) -> Result<(), String> {
        let d = d.finalize(what)?;
        let at = self.keep(d);
        self.ops.push(at);
        Ok(())
    }

    fn matmul(&mut self, a: T, b: T, c: T) -> Result<(), String> {
        self.matmul_with(a, b, c, [None; 3])
    }

    /// `c = a·b` whose `[m, n, k]` sizes are overridden per batch by the INT32 tensors
    /// given (the padding mask's sequence lengths).
    fn matmul_with(&mut self, a: T, b: T, c: T, overrides: [Option<T>; 3]) -> Result<(), String> {
        let m = Desc::new(Kind::CUDNN_BACKEND_MATMUL_DESCRIPTOR)?;
        m.set_data_type(Attr::CUDNN_ATTR_MATMUL_COMP_TYPE, FLOAT)?;
        let m = m.finalize("a matmul descriptor")?;
        let op = Desc::new(Kind::CUDNN_BACKEND_OPERATION_MATMUL_DESCRIPTOR)?;
        op.set_desc(Attr::CUDNN_ATTR_OPERATION_MATMUL_ADESC, &self.descs[a.at])?;
        op.set_desc(Attr::CUDNN_ATTR_OPERATION_MATMUL_BDESC, &self.descs[b.at])?;
        op.set_desc(Attr::CUDNN_ATTR_OPERATION_MATMUL_CDESC, &self.descs[c.at])?;
        op.set_desc(Attr::CUDNN_ATTR_OPERATION_MATMUL_DESC, &m)?;
        let names = [Attr::CUDNN_ATTR_OPERATION_MATMUL_GEMM_M_OVERRIDE_DESC, Attr::CUDNN_ATTR_OPERATION_MATMUL_GEMM_N_OVERRIDE_DESC, Attr::CUDNN_ATTR_OPERATION_MATMUL_GEMM_K_OVERRIDE_DESC];
        for (name, size) in names.into_iter().zip(overrides) {
            if let Some(size) = size {
                op.set_desc(name, &self.descs[size.at])?;
            }
        }
        self.keep(m);
        self.op(op, "a matmul")
    }

    fn pointwise(&mut self, mode: sys::cudnnPointwiseMode_t, x: T, b: Option<T>, y: T) -> Result<(), String> {
        self.pointwise_with(Pointwise { mode, precision: FLOAT, axis: None }, [Some(x), b, None], y)
    }

    /// `y = mode(x[, b[, t]])` (`inputs`: x, b, t) computed in `spec.precision`.
    fn pointwise_with(&mut self, spec: Pointwise, inputs: [Option<T>; 3], y: T) -> Result<(), String> {
        let mode = spec.mode;
        let p = Desc::new(Kind::CUDNN_BACKEND_POINTWISE_DESCRIPTOR)?;
        p.set(Attr::CUDNN_ATTR_POINTWISE_MODE, Ty::CUDNN_TYPE_POINTWISE_MODE, &[mode])?;
        p.set_data_type(Attr::CUDNN_ATTR_POINTWISE_MATH_PREC, spec.precision)?;
        if let Some(axis) = spec.axis {
            p.set(Attr::CUDNN_ATTR_POINTWISE_AXIS, Ty::CUDNN_TYPE_INT64, &[axis])?;
        }
        let p = p.finalize("a pointwise descriptor")?;
        let op = Desc::new(Kind::CUDNN_BACKEND_OPERATION_POINTWISE_DESCRIPTOR)?;
        op.set_desc(Attr::CUDNN_ATTR_OPERATION_POINTWISE_PW_DESCRIPTOR, &p)?;
        let ports = [Attr::CUDNN_ATTR_OPERATION_POINTWISE_XDESC, Attr::CUDNN_ATTR_OPERATION_POINTWISE_BDESC, Attr::CUDNN_ATTR_OPERATION_POINTWISE_TDESC];
        for (port, input) in ports.into_iter().zip(inputs) {
            if let Some(input) = input {
                op.set_desc(port, &self.descs[input.at])?;
            }
        }
        op.set_desc(Attr::CUDNN_ATTR_OPERATION_POINTWISE_YDESC, &self.descs[y.at])?;
        // The frontend always sets both blend factors.
        op.set(Attr::CUDNN_ATTR_OPERATION_POINTWISE_ALPHA1, Ty::CUDNN_TYPE_FLOAT, &[1.0f32])?;
        op.set(Attr::CUDNN_ATTR_OPERATION_POINTWISE_ALPHA2, Ty::CUDNN_TYPE_FLOAT, &[1.0f32])?;
        self.keep(p);
        self.op(op, &format!("a pointwise {mode:?}"))
    }

    fn reduction(&mut self, mode: sys::cudnnReduceTensorOp_t, x: T, y: T) -> Result<(), String> {
        let r = Desc::new(Kind::CUDNN_BACKEND_REDUCTION_DESCRIPTOR)?;
        r.set(Attr::CUDNN_ATTR_REDUCTION_OPERATOR, Ty::CUDNN_TYPE_REDUCTION_OPERATOR_TYPE, &[mode])?;
        r.set_data_type(Attr::CUDNN_ATTR_REDUCTION_COMP_TYPE, FLOAT)?;
        // cudnn-frontend sets the flag (to false) from cuDNN 9.11 on; do as it does, so the
        // graph is the one the SDPA engines are matched against.
        if result::get_version() >= 91100 {
            r.set(Attr::CUDNN_ATTR_REDUCTION_IS_DETERMINISTIC, Ty::CUDNN_TYPE_BOOLEAN, &[false])?;
        }
        let r = r.finalize("a reduction descriptor")?;
        let op = Desc::new(Kind::CUDNN_BACKEND_OPERATION_REDUCTION_DESCRIPTOR)?;
        op.set_desc(Attr::CUDNN_ATTR_OPERATION_REDUCTION_XDESC, &self.descs[x.at])?;
        op.set_desc(Attr::CUDNN_ATTR_OPERATION_REDUCTION_YDESC, &self.descs[y.at])?;
        op.set_desc(Attr::CUDNN_ATTR_OPERATION_REDUCTION_DESC, &r)?;
        self.keep(r);
        self.op(op, &format!("a reduction {mode:?}"))
    }

    /// A view of `x` under other dimensions and strides (a transposition here).
    fn reshape(&mut self, x: T, y: T) -> Result<(), String> {
        let op = Desc::new(Kind::CUDNN_BACKEND_OPERATION_RESHAPE_DESCRIPTOR)?;
        op.set_desc(Attr::CUDNN_ATTR_OPERATION_RESHAPE_XDESC, &self.descs[x.at])?;
        op.set_desc(Attr::CUDNN_ATTR_OPERATION_RESHAPE_YDESC, &self.descs[y.at])?;
        self.op(op, "a reshape")
    }

    /// The execution plan of this graph: heuristics mode A, the first configuration that
    /// finalizes with a workspace of at most [`super::cudnn::WORKSPACE_LIMIT`].
    fn build(mut self, handle: sys::cudnnHandle_t, uids: Vec<i64>, scalars: Vec<(i64, f32)>, constants: Vec<(i64, Handle)>) -> Result<Plan, String> {
        let graph = Desc::new(Kind::CUDNN_BACKEND_OPERATIONGRAPH_DESCRIPTOR)?;
        let ops: Vec<sys::cudnnBackendDescriptor_t> = self.ops.iter().map(|&i| self.descs[i].0).collect();
        graph.set(Attr::CUDNN_ATTR_OPERATIONGRAPH_OPS, Ty::CUDNN_TYPE_BACKEND_DESCRIPTOR, &ops)?;
        graph.set(Attr::CUDNN_ATTR_OPERATIONGRAPH_HANDLE, Ty::CUDNN_TYPE_HANDLE, &[handle])?;
        let graph = graph.finalize("the operation graph")?;
        let heur = Desc::new(Kind::CUDNN_BACKEND_ENGINEHEUR_DESCRIPTOR)?;
        heur.set_desc(Attr::CUDNN_ATTR_ENGINEHEUR_OPERATION_GRAPH, &graph)?;
        heur.set(Attr::CUDNN_ATTR_ENGINEHEUR_MODE, Ty::CUDNN_TYPE_HEUR_MODE, &[sys::cudnnBackendHeurMode_t::CUDNN_HEUR_MODE_A])?;
        let heur = heur.finalize("the heuristics")?;
        let mut count = 0i64;
        // SAFETY: a count query (no output array).
        check(
            unsafe { sys::cudnnBackendGetAttribute(heur.0, Attr::CUDNN_ATTR_ENGINEHEUR_RESULTS, Ty::CUDNN_TYPE_BACKEND_DESCRIPTOR, 0, &mut count, std::ptr::null_mut()) },
            "counting the heuristics' engine configurations",
        )?;
        if count <= 0 {
            return Err("cuDNN's heuristics offer no engine for this attention graph".to_string());
        }
        let configs = (0..count).map(|_| Desc::new(Kind::CUDNN_BACKEND_ENGINECFG_DESCRIPTOR)).collect::<Result<Vec<_>, _>>()?;
        let mut raw: Vec<sys::cudnnBackendDescriptor_t> = configs.iter().map(|c| c.0).collect();
        let mut got = 0i64;
        // SAFETY: `raw` holds `count` engine-configuration descriptors for cuDNN to fill.
        check(
            unsafe { sys::cudnnBackendGetAttribute(heur.0, Attr::CUDNN_ATTR_ENGINEHEUR_RESULTS, Ty::CUDNN_TYPE_BACKEND_DESCRIPTOR, count, &mut got, raw.as_mut_ptr().cast()) },
            "reading the heuristics' engine configurations",
        )?;
        let mut refusals = Vec::new();
        for config in configs.iter().take(got.max(0) as usize) {
            let plan = Desc::new(Kind::CUDNN_BACKEND_EXECUTION_PLAN_DESCRIPTOR)?;
            plan.set(Attr::CUDNN_ATTR_EXECUTION_PLAN_HANDLE, Ty::CUDNN_TYPE_HANDLE, &[handle])?;
            plan.set_desc(Attr::CUDNN_ATTR_EXECUTION_PLAN_ENGINE_CONFIG, config)?;
            match plan.finalize("an execution plan") {
                Ok(plan) => {
                    let mut workspace = 0i64;
                    let mut n = 0i64;
                    // SAFETY: one int64 out.
                    check(
                        unsafe {
                            sys::cudnnBackendGetAttribute(plan.0, Attr::CUDNN_ATTR_EXECUTION_PLAN_WORKSPACE_SIZE, Ty::CUDNN_TYPE_INT64, 1, &mut n, (&raw mut workspace).cast())
                        },
                        "reading the plan's workspace size",
                    )?;
                    if workspace.max(0) as usize > super::cudnn::WORKSPACE_LIMIT {
                        refusals.push(format!("a plan wanting {workspace} bytes of workspace"));
                        continue;
                    }
                    self.descs.push(graph);
                    self.descs.push(heur);
                    self.descs.extend(configs);
                    return Ok(Plan { plan, _graph: self.descs, workspace: workspace.max(0) as usize, uids, scalars, constants });
                }
                Err(reason) => refusals.push(reason),
            }
        }
        Err(format!("none of cuDNN's {got} engine configurations finalized for this attention graph ({})", refusals.join("; ")))
    }
}

fn data_type(dtype: DType) -> Result<sys::cudnnDataType_t, String> {
    match dtype {
        DType::F16 => Ok(sys::cudnnDataType_t::CUDNN_DATA_HALF),
        DType::BF16 => Ok(sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16),
        other => Err(format!("cuDNN attention: {other:?} inputs (bf16 or f16 needed)")),
    }
}

fn i64s(v: [usize; 4]) -> [i64; 4] {
    v.map(|x| x as i64)
}

/// `[b, h, s, d]` strides of `t`.
fn strides(t: &CubeTensor<CudaRuntime>) -> [usize; 4] {
    let s = t.meta.strides().to_vec();
    [s[0], s[1], s[2], s[3]]
}

/// Contiguous strides of `[b, h, s, 1]` statistics.
fn stats_strides(h: usize, s: usize) -> [i64; 4] {
    [(h * s) as i64, s as i64, 1, 1]
}

/// Contiguous strides of `dims`.
fn packed(dims: [i64; 4]) -> [i64; 4] {
    [dims[1] * dims[2] * dims[3], dims[2] * dims[3], dims[3], 1]
}

/// Swaps the last two entries (`[b, h, s, d]` ↔ `[b, h, d, s]`).
fn swap(v: [i64; 4]) -> [i64; 4] {
    [v[0], v[1], v[3], v[2]]
}

use sys::cudnnPointwiseMode_t as Pw;
use sys::cudnnReduceTensorOp_t as Red;

/// cudnn-frontend's forward graph (see the module docs); the operands in `run` order:
/// `q, k, v, o, stats`.
fn forward_graph(handle: sys::cudnnHandle_t, key: &Key) -> Result<Plan, String> {
    let dt = data_type(key.dtype)?;
    let [b, h, sq, skv, d] = key.sizes.map(|x| x as i64);
    let [qs, ks, vs, os] = [0, 1, 2, 3].map(|i| i64s(key.strides[i]));
    let mut g = Graph::new();
    let q = g.tensor([b, h, sq, d], qs, dt)?;
    // Kᵀ: the same memory as K, described as `[b, h, d, s_kv]`.
    let kt = g.tensor([b, h, d, skv], swap(ks), dt)?;
    let v = g.tensor([b, h, skv, d], vs, dt)?;
    let scores = [b, h, sq, skv];
    let rows = [b, h, sq, 1];
    let (sp, rp) = (packed(scores), stats_strides(h as usize, sq as usize));
    let scale = g.scalar()?;
    let s = g.virt(scores, sp, FLOAT)?;
    g.matmul(q, kt, s)?;
    let s_scaled = g.virt(scores, sp, FLOAT)?;
    g.pointwise(Pw::CUDNN_POINTWISE_MUL, s, Some(scale), s_scaled)?;
    let max = g.virt(rows, rp, FLOAT)?;
    g.reduction(Red::CUDNN_REDUCE_TENSOR_MAX, s_scaled, max)?;
    let sub = g.virt(scores, sp, FLOAT)?;
    g.pointwise(Pw::CUDNN_POINTWISE_SUB, s_scaled, Some(max), sub)?;
    let exp = g.virt(scores, sp, FLOAT)?;
    g.pointwise(Pw::CUDNN_POINTWISE_EXP, sub, None, exp)?;
    let sum = g.virt(rows, rp, FLOAT)?;
    g.reduction(Red::CUDNN_REDUCE_TENSOR_ADD, exp, sum)?;
    let log = g.virt(rows, rp, FLOAT)?;
    g.pointwise(Pw::CUDNN_POINTWISE_LOG, sum, None, log)?;
    let stats = g.tensor(rows, rp, FLOAT)?;
    g.pointwise(Pw::CUDNN_POINTWISE_ADD, max, Some(log), stats)?;
    // P in the inputs' dtype, as the second product reads it.
    let p = g.virt(scores, sp, dt)?;
    g.pointwise(Pw::CUDNN_POINTWISE_DIV, exp, Some(sum), p)?;
    let o = g.tensor([b, h, sq, d], os, dt)?;
    g.matmul(p, v, o)?;
    let uids = vec![q.uid, kt.uid, v.uid, o.uid, stats.uid];
    g.build(handle, uids, vec![(scale.uid, f32::from_bits(key.scale))], Vec::new())
}

/// Whether the backward graph needs cudnn-frontend's padding-mask workaround: for key
/// counts that are not a multiple of 128 the frontend masks the padding of cuDNN's tiles
/// (with the full lengths) on cuDNN up to 9.15.0, working around a cuDNN bug; later
/// versions accept the mask too.
fn needs_padding_mask(s_kv: usize) -> bool {
    !s_kv.is_multiple_of(128)
}

/// The workaround's part of the graph: per-batch sequence lengths `[b, 1, 1, 1]` (INT32
/// tensors the plan owns, holding the full lengths) and the scores outside them set to
/// `-inf` (cudnn-frontend's `padding_mask` score modifier; before cuDNN 9.10 the lowest
/// finite float, applied once more after the statistics are subtracted).
struct PaddingMask {
    seq_q: T,
    seq_kv: T,
    neg_inf: T,
}

impl PaddingMask {
    fn new(g: &mut Graph, b: i64) -> Result<Self, String> {
        let int32 = sys::cudnnDataType_t::CUDNN_DATA_INT32;
        Ok(Self { seq_q: g.tensor([b, 1, 1, 1], [1, 1, 1, 1], int32)?, seq_kv: g.tensor([b, 1, 1, 1], [1, 1, 1, 1], int32)?, neg_inf: g.scalar()? })
    }

    /// `scores` where row < s_q and column < s_kv, else `-inf`.
    fn apply(&self, g: &mut Graph, scores: T, dims: [i64; 4]) -> Result<T, String> {
        let (int32, boolean) = (sys::cudnnDataType_t::CUDNN_DATA_INT32, sys::cudnnDataType_t::CUDNN_DATA_BOOLEAN);
        let strides = packed(dims);
        let index = |g: &mut Graph, axis: i64| -> Result<T, String> {
            let out = g.virt(dims, strides, int32)?;
            g.pointwise_with(Pointwise { mode: Pw::CUDNN_POINTWISE_GEN_INDEX, precision: int32, axis: Some(axis) }, [Some(scores), None, None], out)?;
            Ok(out)
        };
        let less = |g: &mut Graph, x: T, bound: T| -> Result<T, String> {
            let out = g.virt(dims, strides, boolean)?;
            g.pointwise_with(Pointwise { mode: Pw::CUDNN_POINTWISE_CMP_LT, precision: boolean, axis: None }, [Some(x), Some(bound), None], out)?;
            Ok(out)
        };
        let (row, col) = (index(g, 2)?, index(g, 3)?);
        let (row_in, col_in) = (less(g, row, self.seq_q)?, less(g, col, self.seq_kv)?);
        let inside = g.virt(dims, strides, boolean)?;
        g.pointwise_with(Pointwise { mode: Pw::CUDNN_POINTWISE_LOGICAL_AND, precision: boolean, axis: None }, [Some(row_in), Some(col_in), None], inside)?;
        let masked = g.virt(dims, strides, FLOAT)?;
        g.pointwise_with(Pointwise { mode: Pw::CUDNN_POINTWISE_BINARY_SELECT, precision: FLOAT, axis: None }, [Some(scores), Some(self.neg_inf), Some(inside)], masked)?;
        Ok(masked)
    }
}

/// cudnn-frontend's backward graph (see the module docs); the operands in `run` order:
/// `q, k, v, o, do, stats, dq, dk, dv, softmax_sum, dq_accum`. Key counts that are not a
/// multiple of 128 get the frontend's padding-mask workaround ([`needs_padding_mask`]):
/// the mask after the scaled scores and the sequence lengths as the products' size
/// overrides.
fn backward_graph(handle: sys::cudnnHandle_t, key: &Key, client: &burn_cubecl::cubecl::prelude::ComputeClient<CudaRuntime>) -> Result<Plan, String> {
    let dt = data_type(key.dtype)?;
    let [b, h, sq, skv, d] = key.sizes.map(|x| x as i64);
    let [qs, ks, vs, os, dos, dqs, dks, dvs] = [0, 1, 2, 3, 4, 5, 6, 7].map(|i| i64s(key.strides[i]));
    let mut g = Graph::new();
    let q = g.tensor([b, h, sq, d], qs, dt)?;
    let kt = g.tensor([b, h, d, skv], swap(ks), dt)?;
    let vt = g.tensor([b, h, d, skv], swap(vs), dt)?;
    let o = g.tensor([b, h, sq, d], os, dt)?;
    let d_o = g.tensor([b, h, sq, d], dos, dt)?;
    let rows = [b, h, sq, 1];
    let rp = stats_strides(h as usize, sq as usize);
    let stats = g.tensor(rows, rp, FLOAT)?;
    let scale = g.scalar()?;
    let one = g.scalar()?;
    let mask = if needs_padding_mask(key.sizes[3]) { Some(PaddingMask::new(&mut g, b)?) } else { None };
    let old_masking = result::get_version() < 91000;
    // The size overrides `[m, n, k]` of each product: by the sequence lengths with the mask.
    let (lq, lkv) = (mask.as_ref().map(|m| m.seq_q), mask.as_ref().map(|m| m.seq_kv));
    let scores = [b, h, sq, skv];
    let sp = packed(scores);
    // Δ = rowsum(dO ∘ O), into a buffer of ours (the frontend's layout for the product).
    let prod = g.virt([b, h, sq, d], [h * sq * d, sq * d, h * d, 1], FLOAT)?;
    g.pointwise(Pw::CUDNN_POINTWISE_MUL, d_o, Some(o), prod)?;
    let rowsum = g.virt(rows, rp, FLOAT)?;
    g.reduction(Red::CUDNN_REDUCE_TENSOR_ADD, prod, rowsum)?;
    let softmax_sum = g.tensor(rows, rp, FLOAT)?;
    g.pointwise(Pw::CUDNN_POINTWISE_MUL, rowsum, Some(one), softmax_sum)?;
    // P = exp(Q·Kᵀ·scale − stats).
    let s = g.virt(scores, sp, FLOAT)?;
    g.matmul_with(q, kt, s, [lq, lkv, None])?;
    let mut s_scaled = g.virt(scores, sp, FLOAT)?;
    g.pointwise(Pw::CUDNN_POINTWISE_MUL, s, Some(scale), s_scaled)?;
    if let Some(mask) = &mask {
        s_scaled = mask.apply(&mut g, s_scaled, scores)?;
    }
    let mut s_sub = g.virt(scores, sp, FLOAT)?;
    g.pointwise(Pw::CUDNN_POINTWISE_SUB, s_scaled, Some(stats), s_sub)?;
    // Before cuDNN 9.10 the frontend masks again once the statistics are subtracted.
    if let (Some(mask), true) = (&mask, old_masking) {
        s_sub = mask.apply(&mut g, s_sub, scores)?;
    }
    let p = g.virt(scores, sp, FLOAT)?;
    g.pointwise(Pw::CUDNN_POINTWISE_EXP, s_sub, None, p)?;
    // dV = Pᵀ·dO (Pᵀ a transposed view in the inputs' dtype).
    let transposed = [b, h, skv, sq];
    let tp = [h * sq * skv, sq * skv, 1, skv];
    let pt = g.virt(transposed, tp, dt)?;
    g.reshape(p, pt)?;
    let dv = g.tensor([b, h, skv, d], dvs, dt)?;
    g.matmul_with(pt, d_o, dv, [lkv, None, lq])?;
    // dS = P ∘ (dO·Vᵀ − Δ) · scale.
    let dp = g.virt(scores, sp, FLOAT)?;
    g.matmul_with(d_o, vt, dp, [lq, lkv, None])?;
    let dp_sub = g.virt(scores, sp, FLOAT)?;
    g.pointwise(Pw::CUDNN_POINTWISE_SUB, dp, Some(softmax_sum), dp_sub)?;
    let ds_unscaled = g.virt(scores, sp, FLOAT)?;
    g.pointwise(Pw::CUDNN_POINTWISE_MUL, dp_sub, Some(p), ds_unscaled)?;
    let ds = g.virt(scores, sp, FLOAT)?;
    g.pointwise(Pw::CUDNN_POINTWISE_MUL, ds_unscaled, Some(scale), ds)?;
    // dK = dSᵀ·Q.
    let dst = g.virt(transposed, tp, dt)?;
    g.reshape(ds, dst)?;
    let dk = g.tensor([b, h, skv, d], dks, dt)?;
    g.matmul_with(dst, q, dk, [lkv, None, lq])?;
    // dQ = dS·K through an f32 accumulator of ours (K: Kᵀ viewed back).
    let k = g.virt([b, h, skv, d], ks, FLOAT)?;
    g.reshape(kt, k)?;
    let dq_accum = g.tensor([b, h, sq, d], packed([b, h, sq, d]), FLOAT)?;
    g.matmul_with(ds, k, dq_accum, [lq, None, lkv])?;
    let dq = g.tensor([b, h, sq, d], dqs, dt)?;
    g.pointwise(Pw::CUDNN_POINTWISE_IDENTITY, dq_accum, None, dq)?;
    let uids = vec![q.uid, kt.uid, vt.uid, o.uid, d_o.uid, stats.uid, dq.uid, dk.uid, dv.uid, softmax_sum.uid, dq_accum.uid];
    let mut scalars = vec![(scale.uid, f32::from_bits(key.scale)), (one.uid, 1.0)];
    let mut constants = Vec::new();
    if let Some(mask) = &mask {
        // The frontend's masked value: before cuDNN 9.10 the lowest finite float.
        scalars.push((mask.neg_inf.uid, if old_masking { f32::MIN } else { f32::NEG_INFINITY }));
        // The full lengths, one per batch entry.
        let lengths = |n: usize| -> Vec<u8> { (0..key.sizes[0]).flat_map(|_| (n as i32).to_le_bytes()).collect() };
        constants.push((mask.seq_q.uid, client.create_from_slice(&lengths(key.sizes[2]))));
        constants.push((mask.seq_kv.uid, client.create_from_slice(&lengths(key.sizes[3]))));
    }
    g.build(handle, uids, scalars, constants)
}

fn init_device(stream: CUstream) -> Result<DeviceState, String> {
    // cudnn-frontend refuses half-precision SDPA on these two releases (known bugs).
    let version = result::get_version();
    if version == 91000 || version == 91001 {
        return Err(format!("cuDNN {version}: its fused attention has known bugs (9.10.2 or later needed)"));
    }
    // The backward graph leaves its f32 dQ accumulator to cuDNN to clear from 9.6 on.
    let handle = super::cudnn::handle_on(stream, 90600, "attention")?;
    Ok(DeviceState { handle, plans: HashMap::new() })
}

/// The cuDNN version, once the library loads and a handle can be created on device 0.
pub(super) fn status() -> Result<usize, String> {
    STATE.with(0, init_device, |_, _| Ok(result::get_version()))
}

/// Whether cuDNN's SDPA engines take the forward pass of `[b, h, s, d]` problems of head
/// dimension `d`, `s_q` queries and `s_kv` keys in `dtype` on this process's GPU
/// (cudnn-frontend's support surface: `d` a multiple of 8 up to [`head_dim_limit`], any
/// sequence lengths but `1 × 1`; the frontend's padding workaround for key counts that are
/// not a multiple of 64 applies only before cuDNN 9, below the 9.6 this module needs).
pub(super) fn supports(dtype: DType, d: usize, s_q: usize, s_kv: usize) -> bool {
    supports_on(device_arch(), false, dtype, d, s_q, s_kv)
}

/// Whether cuDNN's SDPA engines take the backward pass of such a problem: as [`supports`]
/// (with the backward pass's head-dimension limit); key counts that are not a multiple of
/// 128 only with `padded` (the graph then carries cudnn-frontend's padding-mask
/// workaround, [`needs_padding_mask`]).
pub(super) fn supports_backward(dtype: DType, d: usize, s_q: usize, s_kv: usize, padded: bool) -> bool {
    supports_on(device_arch(), true, dtype, d, s_q, s_kv) && (padded || !needs_padding_mask(s_kv))
}

/// [`supports`] (`backward` false) or the shapes of [`supports_backward`] on a GPU of
/// compute capability `major` with cuDNN `version` (`arch`; `None`: no usable GPU).
fn supports_on(arch: Option<(i32, usize)>, backward: bool, dtype: DType, d: usize, s_q: usize, s_kv: usize) -> bool {
    let Some((major, version)) = arch else {
        return false;
    };
    matches!(dtype, DType::BF16 | DType::F16) && d.is_multiple_of(8) && d <= head_dim_limit(major, version, backward) && !(s_q == 1 && s_kv == 1)
}

/// The largest head dimension cudnn-frontend lets half-precision SDPA graphs have on a GPU of
/// compute capability `major` with cuDNN `version` (its `sdpa_support_surface.h` and the
/// backward node's checks): 256 on Hopper both ways; elsewhere 128 for the backward pass,
/// and for the forward pass 128 on Ampere/Ada up to cuDNN 9.9 and on Blackwell before 9.9,
/// else 256; nothing before Ampere. SD1.5's deepest attention has `d = 160`: off Hopper its
/// backward pass stays with the other kernels instead of being refused on every call.
fn head_dim_limit(major: i32, version: usize, backward: bool) -> usize {
    match major {
        ..=7 => 0,
        9 => 256,
        _ if backward => 128,
        8 if version <= 90900 => 128,
        10 if version < 90900 => 128,
        _ => 256,
    }
}

/// Device 0's compute capability (major) and the cuDNN version, once both can be read
/// (cached, so the support checks on the queuing path take no lock); `None` without a
/// usable GPU or cuDNN (as [`status`] then reports, once and for good).
fn device_arch() -> Option<(i32, usize)> {
    static ARCH: std::sync::OnceLock<Option<(i32, usize)>> = std::sync::OnceLock::new();
    *ARCH.get_or_init(|| {
        let version = status().ok()?;
        // cudarc's loader panics when libcuda or a symbol is missing.
        let major = std::panic::catch_unwind(|| {
            use cudarc::driver::{result as driver, sys as cuda};
            driver::init().ok()?;
            let device = driver::device::get(0).ok()?;
            // SAFETY: `device` is a valid device and the attribute an int.
            unsafe { driver::device::get_attribute(device, cuda::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR) }.ok()
        })
        .ok()??;
        Some((major, version))
    })
}

/// Runs `plan` with `operands` (in its uid order) and a workspace, ordered with burn's
/// kernels on our stream.
fn execute(state: &mut DeviceState, stream: CUstream, key: &Key, operands: &[&Handle], client: &burn_cubecl::cubecl::prelude::ComputeClient<CudaRuntime>, device_index: usize) -> Result<(), String> {
    let handle = state.handle;
    if !state.plans.contains_key(key) {
        // Finalizing a plan may load or compile cuDNN's kernels, which can wait for the
        // whole device: never behind a GPU-side ordering wait of cubecl's (see `device`).
        burn_cubecl::cubecl::future::block_on(client.sync()).map_err(|e| format!("cubecl sync: {e:?}"))?;
        let built = if key.backward { backward_graph(handle, key, client) } else { forward_graph(handle, key) };
        state.plans.insert(key.clone(), built);
    }
    let plan = state.plans.get(key).ok_or("cuDNN attention: plan cache")?.as_ref().map_err(|e| e.clone())?;
    let workspace = (plan.workspace > 0).then(|| client.empty(plan.workspace));
    // The operands, the plan's own tensors, then the workspace.
    let mut buffers: Vec<&Handle> = operands.to_vec();
    buffers.extend(plan.constants.iter().map(|(_, h)| h));
    buffers.extend(workspace.as_ref());
    let problem = device::problem_hash("cudnn-sdpa", key);
    let (scalars, raw_plan) = (&plan.scalars, plan.plan.0);
    let uids: Vec<i64> = plan.uids.iter().copied().chain(plan.constants.iter().map(|&(uid, _)| uid)).collect();
    let n = uids.len();
    let (mut misaligned, mut refused) = (false, false);
    let ran = device::run_on_buffers(client, device_index, stream, problem, &buffers, |p| {
        // The tensor descriptors promise this alignment (a view's offset may break it).
        if p.iter().any(|&x| !(x as usize).is_multiple_of(ALIGNMENT as usize)) {
            misaligned = true;
            return Err(format!("cuDNN attention: an operand is not {ALIGNMENT}-byte aligned"));
        }
        let mut all_uids = uids;
        let mut pointers: Vec<*mut c_void> = p[..n].to_vec();
        // By-value scalars: host pointers, read when the call is queued.
        let values: Vec<f32> = scalars.iter().map(|&(_, v)| v).collect();
        for (i, &(uid, _)) in scalars.iter().enumerate() {
            all_uids.push(uid);
            pointers.push((&values[i] as *const f32).cast_mut().cast());
        }
        let ws = if p.len() > n { p[n] } else { std::ptr::null_mut() };
        let pack = Desc::new(Kind::CUDNN_BACKEND_VARIANT_PACK_DESCRIPTOR)?;
        pack.set(Attr::CUDNN_ATTR_VARIANT_PACK_UNIQUE_IDS, Ty::CUDNN_TYPE_INT64, &all_uids)?;
        pack.set(Attr::CUDNN_ATTR_VARIANT_PACK_DATA_POINTERS, Ty::CUDNN_TYPE_VOID_PTR, &pointers)?;
        pack.set(Attr::CUDNN_ATTR_VARIANT_PACK_WORKSPACE, Ty::CUDNN_TYPE_VOID_PTR, &[ws])?;
        let pack = pack.finalize("the variant pack")?;
        // SAFETY: the pointers address live cubecl buffers of the planned shapes and
        // strides (and host scalars that outlive the call: cuDNN reads by-value operands
        // when it queues the work); the handle is bound to `stream`.
        let executed = check(unsafe { sys::cudnnBackendExecute(handle, raw_plan, pack.0) }, "cudnnBackendExecute (attention)");
        refused = executed.is_err();
        executed
    });
    // A plan cuDNN refuses to run is not tried again for this problem; a failure around it
    // (ordering, buffer lookup, an operand's alignment) leaves the plan for the next call.
    if let (Err(reason), true, false) = (&ran, refused, misaligned) {
        state.plans.insert(key.clone(), Err(reason.clone()));
    }
    ran
}

/// An error unless every tensor has its expected `[b, h, s, d]` shape: the graphs describe
/// all operands from `q`'s and `k`'s sizes (one key/value head per query head, `d_v = d`).
fn check_shapes(expected: &[(&CubeTensor<CudaRuntime>, [usize; 4])]) -> Result<(), String> {
    for (t, dims) in expected {
        if t.meta.shape().to_vec() != dims {
            return Err(format!("cuDNN attention: an operand of shape {:?} where {dims:?} was expected", t.meta.shape().to_vec()));
        }
    }
    Ok(())
}

/// Attention's forward pass in cuDNN: `(o, lse)` for `[b, h, s, d]` inputs, `lse` f32
/// `[b, h, s_q]` (the flash kernels' log-sum-exp).
pub(super) fn forward(q: CubeTensor<CudaRuntime>, k: CubeTensor<CudaRuntime>, v: CubeTensor<CudaRuntime>, scale: f32) -> Result<(CubeTensor<CudaRuntime>, CubeTensor<CudaRuntime>), String> {
    let (q, k, v) = (rowwise(q), rowwise(k), rowwise(v));
    let [b, h, sq, d] = q.meta.shape().dims::<4>();
    let skv = k.meta.shape().dims::<4>()[2];
    if k.dtype != q.dtype || v.dtype != q.dtype || !supports(q.dtype, d, sq, skv) {
        return Err(format!("cuDNN attention: {:?} d = {d}, {sq} × {skv} is outside its support", q.dtype));
    }
    check_shapes(&[(&k, [b, h, skv, d]), (&v, [b, h, skv, d])])?;
    let o = output_like(&q, q.dtype);
    let client = q.client.clone();
    let lse_handle = client.empty(b * h * sq * 4);
    let key = Key { backward: false, dtype: q.dtype, sizes: [b, h, sq, skv, d], strides: vec![strides(&q), strides(&k), strides(&v), strides(&o)], scale: scale.to_bits() };
    let index = q.device.index;
    STATE.with(index, init_device, |state, stream| execute(state, stream, &key, &[&q.handle, &k.handle, &v.handle, &o.handle, &lse_handle], &client, index))?;
    let lse = CubeTensor::new_contiguous(client, q.device.clone(), Shape::new([b, h, sq]), lse_handle, DType::F32);
    Ok((o, lse))
}

/// Attention's backward pass in cuDNN: `(dq, dk, dv)` from the inputs, the forward output,
/// its gradient and the log-sum-exp of [`forward`] (or of the flash kernels).
#[allow(clippy::type_complexity)]
pub(super) fn backward(
    [q, k, v, dout, out]: [CubeTensor<CudaRuntime>; 5],
    lse: CubeTensor<CudaRuntime>,
    scale: f32,
) -> Result<(CubeTensor<CudaRuntime>, CubeTensor<CudaRuntime>, CubeTensor<CudaRuntime>), String> {
    let [q, k, v, dout, out] = [q, k, v, dout, out].map(rowwise);
    let [b, h, sq, d] = q.meta.shape().dims::<4>();
    let skv = k.meta.shape().dims::<4>()[2];
    // Any key count: the padded-backward switch was read when the pass was queued (its route).
    if [&k, &v, &dout, &out].iter().any(|t| t.dtype != q.dtype) || lse.dtype != DType::F32 || !supports(q.dtype, d, sq, skv) {
        return Err(format!("cuDNN attention backward: {:?} d = {d}, {sq} × {skv} is outside its support", q.dtype));
    }
    check_shapes(&[(&k, [b, h, skv, d]), (&v, [b, h, skv, d]), (&out, [b, h, sq, d]), (&dout, [b, h, sq, d])])?;
    if lse.meta.shape().to_vec() != [b, h, sq] {
        return Err(format!("cuDNN attention backward: log-sum-exp of shape {:?}, expected {:?}", lse.meta.shape().to_vec(), [b, h, sq]));
    }
    let lse = if lse.is_contiguous() { lse } else { burn_cubecl::kernel::into_contiguous(lse) };
    let (dq, dk, dv) = (output_like(&q, q.dtype), output_like(&k, q.dtype), output_like(&v, q.dtype));
    let client = q.client.clone();
    let softmax_sum = client.empty(b * h * sq * 4);
    let dq_accum = client.empty(b * h * sq * d * 4);
    let key = Key {
        backward: true,
        dtype: q.dtype,
        sizes: [b, h, sq, skv, d],
        strides: [&q, &k, &v, &out, &dout, &dq, &dk, &dv].map(strides).to_vec(),
        scale: scale.to_bits(),
    };
    let index = q.device.index;
    let operands = [&q.handle, &k.handle, &v.handle, &out.handle, &dout.handle, &lse.handle, &dq.handle, &dk.handle, &dv.handle, &softmax_sum, &dq_accum];
    STATE.with(index, init_device, |state, stream| execute(state, stream, &key, &operands, &client, index))?;
    Ok((dq, dk, dv))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The support surface: SD's head dimensions (40, 80, 160; SD2's 64) at any length,
    /// the backward pass at key counts that are not multiples of 128 only with the padding
    /// mask; not odd head dimensions, f32, or `1 × 1`.
    #[test]
    fn support_surface() {
        // An H100/H200 with cuDNN 9.14, as on the device.
        let hopper = Some((9, 91400));
        let forward = |dtype, d, s_q, s_kv| supports_on(hopper, false, dtype, d, s_q, s_kv);
        let backward = |dtype, d, s_q, s_kv, padded| supports_on(hopper, true, dtype, d, s_q, s_kv) && (padded || !needs_padding_mask(s_kv));
        for d in [40, 64, 80, 160] {
            assert!(backward(DType::BF16, d, 4096, 4096, false), "d = {d}");
        }
        assert!(backward(DType::F16, 40, 77, 256, false));
        assert!(forward(DType::BF16, 40, 4096, 77), "77 keys forward");
        assert!(forward(DType::BF16, 160, 64, 64), "the middle block forward");
        assert!(backward(DType::BF16, 40, 4096, 77, true), "77 keys backward with the padding mask");
        assert!(!backward(DType::BF16, 40, 4096, 77, false));
        assert!(!backward(DType::BF16, 160, 64, 64, false));
        assert!(needs_padding_mask(77) && needs_padding_mask(64) && !needs_padding_mask(4096));
        assert!(!forward(DType::BF16, 40, 1, 1));
        assert!(!forward(DType::BF16, 36, 128, 128));
        assert!(!forward(DType::BF16, 264, 128, 128));
        assert!(!forward(DType::F32, 40, 128, 128));
        // Off Hopper SD's d = 160 backward stays with the other kernels; its forward needs
        // cuDNN 9.10 on Ampere / Ada. Nothing before Ampere, nothing without a GPU.
        for (arch, d160_forward) in [((8, 91400), true), ((8, 90900), false), ((10, 90800), false), ((12, 91400), true)] {
            assert_eq!(supports_on(Some(arch), false, DType::BF16, 160, 4096, 4096), d160_forward, "{arch:?}");
            assert!(!supports_on(Some(arch), true, DType::BF16, 160, 4096, 4096), "{arch:?}");
            assert!(supports_on(Some(arch), true, DType::BF16, 80, 4096, 4096), "{arch:?}");
        }
        assert!(!supports_on(Some((7, 91400)), false, DType::F16, 40, 128, 128));
        assert!(!supports_on(None, false, DType::F16, 40, 128, 128));
    }

    /// Without a GPU (or without libcudnn) the status is an error, never a panic.
    #[test]
    fn status_without_a_device_is_an_error_or_a_version() {
        match status() {
            Ok(version) => assert!(version >= 90600),
            Err(reason) => assert!(!reason.is_empty()),
        }
    }
}
