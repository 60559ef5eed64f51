//! All kernel switches of this module as one value: what an application reads from its
//! flags or configuration and applies once at start.

use super::VendorSync;

/// Every kernel choice of [`crate::kernels`] at once. Each field is the switch of the same
/// name (`set_*`); they act on the CUDA backend only (the CPU and other backends keep burn's
/// ops whatever is set) and each falls back per call when its library or kernel refuses.
///
/// [`KernelSettings::default`] is the conservative set every switch starts with;
/// [`KernelSettings::fast`] turns every fast path on. Apply a set before the first tensor
/// operation ([`KernelSettings::apply`]): the GPU-side ordering mode is read when a queued
/// call runs, so changing it mid-run needs a device sync first. Tuning knobs stay separate
/// setters and are not reset by `apply`: [`super::set_flash_max_keys`],
/// [`super::set_flash_shared_kib`], [`super::set_flash_prefetch`],
/// [`super::set_cudnn_padded_backward`], [`super::set_cublas_min_gflop`].
///
/// ```
/// use lora_core::kernels::{KernelSettings, VendorSync};
///
/// assert_eq!(KernelSettings::current(), KernelSettings::default());
/// let mut settings = KernelSettings::fast();
/// settings.cudnn_attention = false; // e.g. an old cuDNN
/// settings.apply();
/// assert_eq!(KernelSettings::current(), settings);
/// assert_eq!(lora_core::kernels::vendor_sync(), VendorSync::Device);
/// KernelSettings::default().apply();
/// assert!(!lora_core::kernels::flash_attention_enabled());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelSettings {
    /// Convolutions in cuDNN ([`super::set_cudnn`]).
    pub cudnn: bool,
    /// Large matmuls in cuBLAS ([`super::set_cublas`]).
    pub cublas: bool,
    /// How cuDNN / cuBLAS calls are ordered with burn's kernels ([`super::set_vendor_sync`]).
    pub vendor_sync: VendorSync,
    /// Attention's softmax in one fused kernel ([`super::set_fused_softmax`]).
    pub fused_softmax: bool,
    /// Attention in the flash kernels ([`super::set_flash_attention`]).
    pub flash_attention: bool,
    /// Attention in cuDNN's fused engines ([`super::set_cudnn_attention`]).
    pub cudnn_attention: bool,
    /// GroupNorm (+ SiLU) and LayerNorm in fused kernels ([`super::set_fused_group_norm`]).
    pub fused_group_norm: bool,
    /// The matmuls cuBLAS does not take in one fixed kernel instead of burn's autotuned
    /// ones ([`super::set_fixed_matmul`]).
    pub fixed_matmul: bool,
    /// Multi-tensor concatenation in one kernel ([`super::set_fused_concat`]).
    pub fused_concat: bool,
    /// LoRA linear layers as one op each way ([`super::set_fused_lora_linear`]).
    pub fused_lora_linear: bool,
}

impl Default for KernelSettings {
    /// The switches' own defaults: burn's kernels everywhere but the fused concatenation
    /// (a plain copy kernel that saves hundreds of launches per step), calls host-ordered.
    fn default() -> Self {
        Self {
            cudnn: false,
            cublas: false,
            vendor_sync: VendorSync::Host,
            fused_softmax: false,
            flash_attention: false,
            cudnn_attention: false,
            fused_group_norm: false,
            fixed_matmul: false,
            fused_concat: true,
            fused_lora_linear: false,
        }
    }
}

impl KernelSettings {
    /// Every fast path on: cuDNN convolutions and attention, cuBLAS, GPU-side ordering, the
    /// fused softmax, flash attention (for what cuDNN's attention does not take), the fused
    /// norms, the fixed matmul (no minutes of autotuning per new shape), the fused
    /// concatenation and the one-op LoRA linear layers. The `trainer` binary applies this
    /// set on CUDA by default: every path passed its kernel tests and the CUDA-against-CPU
    /// checks on an H200 (2026-12-04; the repository's docs/benchmarks.md).
    pub fn fast() -> Self {
        Self {
            cudnn: true,
            cublas: true,
            vendor_sync: VendorSync::Device,
            fused_softmax: true,
            flash_attention: true,
            cudnn_attention: true,
            fused_group_norm: true,
            fixed_matmul: true,
            fused_concat: true,
            fused_lora_linear: true,
        }
    }

    /// The switches as they are set now.
    pub fn current() -> Self {
        Self {
            cudnn: super::cudnn_enabled(),
            cublas: super::cublas_enabled(),
            vendor_sync: super::vendor_sync(),
            fused_softmax: super::fused_softmax_enabled(),
            flash_attention: super::flash_attention_enabled(),
            cudnn_attention: super::cudnn_attention_enabled(),
            fused_group_norm: super::fused_group_norm_enabled(),
            fixed_matmul: super::fixed_matmul_enabled(),
            fused_concat: super::fused_concat_enabled(),
            fused_lora_linear: super::fused_lora_linear_enabled(),
        }
    }

    /// Sets every switch to this value.
    pub fn apply(&self) {
        super::set_cudnn(self.cudnn);
        super::set_cublas(self.cublas);
        super::set_vendor_sync(self.vendor_sync);
        super::set_fused_softmax(self.fused_softmax);
        super::set_flash_attention(self.flash_attention);
        super::set_cudnn_attention(self.cudnn_attention);
        super::set_fused_group_norm(self.fused_group_norm);
        super::set_fixed_matmul(self.fixed_matmul);
        super::set_fused_concat(self.fused_concat);
        super::set_fused_lora_linear(self.fused_lora_linear);
    }
}
