//! Per-op A/B timings of our GPU kernels against burn's ops (`trainer bench-ops`).
//!
//! `trainer bench` times whole UNet steps, where a kernel's effect mixes with everything
//! else. This times each op that has a kernel of ours at SD1.5's shapes, once with its
//! switch off (burn's ops) and once on, on the same inputs: GroupNorm + SiLU and LayerNorm
//! (forward and backward, as in training: the norm frozen, the input tracked), a LoRA
//! attention projection (its rank-4 matmuls in burn's autotuned kernels against the fixed
//! one, forward and backward), self- and
//! cross-attention (forward and backward; flash attention) and the attention softmax
//! (forward), and flash attention's blocks at 48 against 96 KiB of shared memory per cube
//! and without against with register double buffering.
//! On a backend without the kernels both columns time the same path. Last, one
//! AdamW step over SD1.5's attention adapters, burn's per-tensor `AdamW` against the flat
//! one the trainer uses (`lora_core::optim`), where the difference is launch and host
//! overhead.

use std::time::Instant;

use burn::module::{Module, Param};
use burn::nn::{GroupNormConfig, LayerNormConfig, LinearConfig};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, Distribution, Tensor};
use serde::Serialize;

use crate::device_check::Precision;

/// What to time.
#[derive(Debug, Clone)]
pub struct OpsOptions {
    /// Images per batch (the activations' batch dimension).
    pub batch: usize,
    /// Image side in pixels (SD1.5's level-0 activations are `resolution / 8` on a side).
    pub resolution: usize,
    /// Timed repetitions of each op and setting (after one warm-up).
    pub steps: usize,
    /// dtype of the activations and the norms' parameters.
    pub precision: Precision,
}

/// One op's timings.
#[derive(Debug, Clone, Serialize)]
pub struct OpTiming {
    /// The op, e.g. `group_norm_silu fwd+bwd`.
    pub op: String,
    /// Input shape.
    pub shape: Vec<usize>,
    /// The switch that chooses our kernel (`fused_group_norm`, `flash_attention`, ...) or
    /// a tuning option of one (`flash_prefetch`, ...).
    pub switch: &'static str,
    /// Median milliseconds with the switch off (burn's ops; for a tuning option, our kernel
    /// with the option's default).
    pub ms_off: f64,
    /// Median milliseconds with the switch on (our kernel where the backend has it).
    pub ms_on: f64,
    /// `ms_off / ms_on`: above 1 the switch makes the op faster.
    pub speedup: f64,
}

/// A process-global kernel switch of lora-core: its setter and getter.
struct Switch {
    name: &'static str,
    set: fn(bool),
    get: fn() -> bool,
}

const FUSED_GROUP_NORM: Switch = Switch {
    name: "fused_group_norm",
    set: lora_core::kernels::set_fused_group_norm,
    get: lora_core::kernels::fused_group_norm_enabled,
};
const FLASH_ATTENTION: Switch = Switch {
    name: "flash_attention",
    set: lora_core::kernels::set_flash_attention,
    get: lora_core::kernels::flash_attention_enabled,
};
/// Flash attention with 96 KiB of shared memory per cube (larger blocks) against the
/// default 48 KiB; flash attention itself is on for both.
const FLASH_SHARED_96: Switch = Switch {
    name: "flash_shared_kib 48 → 96",
    set: |large| {
        lora_core::kernels::set_flash_attention(true);
        lora_core::kernels::set_flash_shared_kib(if large { 96 } else { 48 });
    },
    get: || lora_core::kernels::flash_shared_kib() >= 96,
};
/// Flash attention with register double buffering of its operand loads against without;
/// flash attention itself is on for both.
const FLASH_PREFETCH: Switch = Switch {
    name: "flash_prefetch",
    set: |on| {
        lora_core::kernels::set_flash_attention(true);
        lora_core::kernels::set_flash_prefetch(on);
    },
    get: lora_core::kernels::flash_prefetch_enabled,
};
const FIXED_MATMUL: Switch = Switch {
    name: "fixed_matmul",
    set: lora_core::kernels::set_fixed_matmul,
    get: lora_core::kernels::fixed_matmul_enabled,
};
const FUSED_SOFTMAX: Switch = Switch {
    name: "fused_softmax",
    set: lora_core::kernels::set_fused_softmax,
    get: lora_core::kernels::fused_softmax_enabled,
};

/// Median of `steps` timed runs of `f` (after one warm-up run, which also pays kernel
/// compilation and autotuning). `f` returns a scalar read back from the device, so each run
/// includes its own completion.
fn median_ms(steps: usize, mut f: impl FnMut() -> f32) -> f64 {
    let _ = f();
    let mut times: Vec<f64> = (0..steps.max(1))
        .map(|_| {
            let t = Instant::now();
            let _ = f();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// Times `f` with `switch` off, then on, and restores the switch.
fn ab(op: &str, shape: &[usize], switch: &Switch, steps: usize, mut f: impl FnMut() -> f32) -> OpTiming {
    let before = (switch.get)();
    (switch.set)(false);
    let ms_off = median_ms(steps, &mut f);
    (switch.set)(true);
    let ms_on = median_ms(steps, &mut f);
    (switch.set)(before);
    OpTiming {
        op: op.to_string(),
        shape: shape.to_vec(),
        switch: switch.name,
        ms_off,
        ms_on,
        speedup: ms_off / ms_on,
    }
}

/// A scalar of `t` read back to the host (the end of a timed run).
fn read<B: burn::tensor::backend::Backend, const D: usize>(t: Tensor<B, D>) -> f32 {
    use burn::tensor::cast::ToElement;
    t.sum().into_scalar().to_f32()
}

/// Runs every op at SD1.5's shapes for `opts` on backend `B`; one [`OpTiming`] per op.
pub fn run<B: AutodiffBackend>(opts: &OpsOptions, device: &B::Device) -> Vec<OpTiming> {
    let dtype: DType = opts.precision.dtype().into();
    let side = (opts.resolution / 8).max(1);
    let tokens = side * side;
    let b = opts.batch;
    let random = |shape: Vec<usize>, std: f64| lora_core::precision::cast_to(Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, std), device), dtype);
    let mut out = Vec::new();

    // GroupNorm + SiLU at the top level (320 channels) and the bottom (1280 at side / 8).
    for (channels, s) in [(320, side), (1280, (side / 8).max(1))] {
        let shape = vec![b, channels, s, s];
        let norm = lora_core::precision::cast_all(GroupNormConfig::new(32, channels).init::<B>(device), opts.precision.dtype()).no_grad();
        let (x, w) = (random(shape.clone(), 1.0), random(shape.clone(), 1.0));
        out.push(ab("group_norm_silu fwd+bwd", &shape, &FUSED_GROUP_NORM, opts.steps, || {
            let x = x.clone().require_grad();
            let y = sd_model::norm::group_norm(&norm, x.clone(), true);
            let grads = (y * w.clone()).sum().backward();
            read(x.grad(&grads).expect("x is tracked"))
        }));
    }

    // A transformer's LayerNorm over the top level's tokens.
    let shape = vec![b, tokens, 320];
    let mut ln = LayerNormConfig::new(320).with_epsilon(1e-5).init::<B>(device);
    ln.gamma = Param::from_tensor(Tensor::ones([320], device));
    let ln = lora_core::precision::cast_all(ln, opts.precision.dtype()).no_grad();
    let (x, w) = (random(vec![b, tokens, 320, 1], 1.0), random(vec![b, tokens, 320, 1], 1.0));
    let (x, w) = (x.reshape([b, tokens, 320]), w.reshape([b, tokens, 320]));
    out.push(ab("layer_norm fwd+bwd", &shape, &FUSED_GROUP_NORM, opts.steps, || {
        let x = x.clone().require_grad();
        let y = sd_model::norm::layer_norm(&ln, x.clone(), 1e-5);
        let grads = (y * w.clone()).sum().backward();
        read(x.grad(&grads).expect("x is tracked"))
    }));

    // A LoRA attention projection (320 → 320, rank 4: an f32 adapter on a frozen base of
    // the model's dtype) over the same tokens, forward and backward: its rank-4 matmuls run
    // in burn's autotuned kernels or the fixed one (the base matmul goes to cuBLAS with
    // `--cublas` either way).
    let base = lora_core::precision::cast_all(LinearConfig::new(320, 320).init::<B>(device), opts.precision.dtype()).no_grad();
    let mut proj = lora_core::LoraLinear::new(base);
    proj.attach_new(&lora_core::LoraConfig::new(4), device).expect("a rank-4 adapter fits a 320 → 320 layer");
    out.push(ab("lora linear fwd+bwd", &shape, &FIXED_MATMUL, opts.steps, || {
        let x = x.clone().require_grad();
        let y = proj.forward(x.clone());
        let grads = (y * w.clone()).sum().backward();
        read(x.grad(&grads).expect("x is tracked"))
    }));

    // Self-attention over the top level's tokens: 8 heads of 40; then flash attention's
    // tuning options, which turn flash attention on and set the shared memory to 48 or 96
    // KiB: both are put back as they were (e.g. `SD_LORA_FLASH_SHARED_KIB`) afterwards.
    let shape = vec![b, 8, tokens, 40];
    let (q, k, v, w) = (random(shape.clone(), 1.0), random(shape.clone(), 1.0), random(shape.clone(), 1.0), random(shape.clone(), 1.0));
    let self_attention = || {
        let (q, k, v) = (q.clone().require_grad(), k.clone().require_grad(), v.clone().require_grad());
        let y = sd_model::attention::scaled_dot_product_attention(q.clone(), k.clone(), v.clone());
        let grads = (y * w.clone()).sum().backward();
        read(q.grad(&grads).expect("q is tracked"))
    };
    out.push(ab("attention fwd+bwd", &shape, &FLASH_ATTENTION, opts.steps, self_attention));
    let (flash_before, shared_before) = (lora_core::kernels::flash_attention_enabled(), lora_core::kernels::flash_shared_kib());
    out.push(ab("attention fwd+bwd, flash blocks", &shape, &FLASH_SHARED_96, opts.steps, self_attention));
    out.push(ab("attention fwd+bwd, flash prefetch", &shape, &FLASH_PREFETCH, opts.steps, self_attention));
    lora_core::kernels::set_flash_attention(flash_before);
    lora_core::kernels::set_flash_shared_kib(shared_before);

    // Cross-attention of the same queries to the text encoder's 77 tokens.
    let kv_shape = vec![b, 8, 77, 40];
    let (k, v) = (random(kv_shape.clone(), 1.0), random(kv_shape, 1.0));
    out.push(ab("cross-attention fwd+bwd", &shape, &FLASH_ATTENTION, opts.steps, || {
        let (q, k, v) = (q.clone().require_grad(), k.clone().require_grad(), v.clone().require_grad());
        let y = sd_model::attention::scaled_dot_product_attention(q.clone(), k.clone(), v.clone());
        let grads = (y * w.clone()).sum().backward();
        read(k.grad(&grads).expect("k is tracked"))
    }));

    // The attention softmax of one score block per batch element (forward; f32 scores in
    // and the model's dtype out, as the blockwise attention uses it).
    let shape = vec![b.min(2), 8, tokens, tokens];
    let scores = Tensor::<B::InnerBackend, 4>::random(shape.clone(), Distribution::Normal(0.0, 3.0), device);
    out.push(ab("softmax fwd", &shape, &FUSED_SOFTMAX, opts.steps, || {
        read(lora_core::kernels::scaled_softmax(scores.clone(), 0.158, dtype))
    }));

    out.push(adamw_step::<B>(opts.steps, device));
    out
}

/// SD1.5's rank-4 attention adapters (`to_q/k/v/out.0` of the 16 transformers, burn layout
/// `[in, out]`): 256 tensors, 797,184 values, as in the PyTorch anchor.
fn sd15_attention_adapter_shapes() -> Vec<[usize; 2]> {
    let mut shapes = Vec::new();
    let widths = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320];
    for c in widths {
        for context in [c, 768] {
            // attn1 (self: k, v from c) then attn2 (cross: k, v from 768).
            for d_in in [c, context, context, c] {
                shapes.push([d_in, 4]);
                shapes.push([4, c]);
            }
        }
    }
    shapes
}

/// One AdamW step over SD1.5's attention adapters: burn's per-tensor `AdamW` against
/// [`lora_core::optim::FlatAdamW`] (which the trainer uses), same gradients.
fn adamw_step<B: AutodiffBackend>(steps: usize, device: &B::Device) -> OpTiming {
    use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
    use lora_core::optim::{AdamWSettings, FlatAdamW};
    let shapes = sd15_attention_adapter_shapes();
    let params: Vec<Param<Tensor<B, 2>>> = shapes.iter().map(|s| Param::from_tensor(Tensor::random(*s, Distribution::Normal(0.0, 0.02), device))).collect();
    let grads: Vec<Tensor<B::InnerBackend, 2>> = shapes.iter().map(|s| Tensor::random(*s, Distribution::Normal(0.0, 1e-3), device)).collect();
    let grads_params = |params: &Vec<Param<Tensor<B, 2>>>| {
        let mut g = GradientsParams::new();
        for (p, t) in params.iter().zip(&grads) {
            g.register(p.id, t.clone());
        }
        g
    };
    let mut module = Some(params);
    let mut burn_optim = AdamWConfig::new().init::<B, Vec<Param<Tensor<B, 2>>>>();
    let ms_off = median_ms(steps, || {
        let m = module.take().expect("the module is put back after each step");
        let g = grads_params(&m);
        let m = burn_optim.step(1e-4, m, g);
        let value = read(m[0].val());
        module = Some(m);
        value
    });
    let mut flat = FlatAdamW::new(AdamWSettings::default(), module.as_ref().expect("the module is there"), device);
    let ms_on = median_ms(steps, || {
        let m = module.take().expect("the module is put back after each step");
        let g = flat.gather_grads(&m, grads_params(&m));
        let m = flat.step(1e-4, m, g);
        let value = read(m[0].val());
        module = Some(m);
        value
    });
    OpTiming {
        op: "AdamW step, SD1.5 attention adapters".into(),
        shape: vec![shapes.len(), shapes.iter().map(|[a, b]| a * b).sum()],
        switch: "flat_adamw",
        ms_off,
        ms_on,
        speedup: ms_off / ms_on,
    }
}

/// The timings as a markdown table.
pub fn table(timings: &[OpTiming]) -> String {
    let mut s = String::from("| op | shape | switch | off ms | on ms | speedup |\n|---|---|---|---|---|---|\n");
    for t in timings {
        s += &format!("| {} | {:?} | {} | {:.3} | {:.3} | {:.2} |\n", t.op, t.shape, t.switch, t.ms_off, t.ms_on, t.speedup);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On the CPU backend the switches change nothing, so this checks the plumbing: every op
    /// runs, restores its switch and gives finite timings.
    #[test]
    fn ops_bench_runs_on_the_cpu() {
        type B = burn::backend::Autodiff<burn::backend::Flex>;
        let opts = OpsOptions { batch: 1, resolution: 32, steps: 1, precision: Precision::F32 };
        let timings = run::<B>(&opts, &Default::default());
        assert_eq!(timings.len(), 10);
        assert_eq!(timings[9].shape, vec![256, 797_184], "the anchor's LoRA size");
        assert!(timings.iter().all(|t| t.ms_off.is_finite() && t.ms_on > 0.0));
        assert!(!lora_core::kernels::fused_group_norm_enabled() && !lora_core::kernels::flash_attention_enabled());
        assert_eq!(lora_core::kernels::flash_shared_kib(), 48, "the block-size row restores the default");
        assert!(!lora_core::kernels::flash_prefetch_enabled());
        assert!(!lora_core::kernels::fixed_matmul_enabled(), "the LoRA row restores the switch");
        assert_eq!(table(&timings).lines().count(), 12);
    }
}
