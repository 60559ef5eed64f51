//! The device check on the tiny UNet, CPU against CPU (the CUDA side needs a GPU).

use burn::backend::{Autodiff, Flex};
use burn::module::Module;
use sd_model::{UNet2DConditionModel, UnetConfig};
use trainer::device_check::{copy_parameters, run, unet_config_by_name, DeviceCheckOptions, Precision};

use crate::common::seeded;

#[test]
fn cpu_against_checkpointed_cpu_passes() {
    let _rng = seeded();
    let mut opts = DeviceCheckOptions::new(UnetConfig::tiny(), 2, 64);
    opts.grad_checkpointing = true;
    let report = run::<Autodiff<Flex>, Autodiff<Flex>>(&opts, &Default::default(), &Default::default()).unwrap();
    assert!(report.pass, "{report:?}");
    assert_eq!(report.check, "device-check");
    assert!(report.adapter.ends_with("attn1.to_q"), "{}", report.adapter);
    // Same arithmetic on both sides: the errors are at rounding level or zero.
    for e in [report.output, report.grad_up, report.grad_down] {
        assert!(e.finite && e.rel_l2 < 1e-5 && e.max_abs_ref > 0.0, "{e:?}");
    }
    assert_eq!(report.output.len, 2 * 4 * 8 * 8);
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["precision"], "f32");
    assert_eq!(json["grad_checkpointing"], true);
    assert!(json["grad_down"]["rel_l2"].is_number());
}

#[test]
fn a_zero_tolerance_and_bad_options_fail() {
    let _rng = seeded();
    // bf16 frozen weights against the f32 reference: a real error, so a zero tolerance fails.
    let mut opts = DeviceCheckOptions::new(UnetConfig::tiny(), 1, 32);
    opts.precision = Precision::Bf16;
    opts.tolerance = Some(0.0);
    let report = run::<Autodiff<Flex>, Autodiff<Flex>>(&opts, &Default::default(), &Default::default()).unwrap();
    assert!(!report.pass && report.output.rel_l2 > 0.0, "{report:?}");
    assert!(report.output.rel_l2 < Precision::Bf16.tolerance(), "{report:?}");

    let mut bad = DeviceCheckOptions::new(UnetConfig::tiny(), 1, 60);
    assert!(run::<Autodiff<Flex>, Autodiff<Flex>>(&bad, &Default::default(), &Default::default()).is_err());
    bad.resolution = 64;
    bad.adapter = Some("no.such.layer".into());
    assert!(run::<Autodiff<Flex>, Autodiff<Flex>>(&bad, &Default::default(), &Default::default()).is_err());
    assert!(unet_config_by_name("/no/such/config.json").is_err());
}

#[test]
fn copy_parameters_checks_the_architecture() {
    let device = Default::default();
    let tiny = UNet2DConditionModel::<Flex>::new(&UnetConfig::tiny(), &device).unwrap();
    let mut other = UnetConfig::tiny();
    other.block_out_channels = vec![16, 32];
    let smaller = UNet2DConditionModel::<Flex>::new(&other, &device).unwrap();
    assert!(copy_parameters(&tiny, smaller, &device).is_err());
    let copy = UNet2DConditionModel::<Flex>::new(&UnetConfig::tiny(), &device).unwrap();
    let copy = copy_parameters(&tiny, copy, &device).unwrap();
    assert_eq!(copy.num_params(), tiny.num_params());
}

/// burn's wgpu backend (`--features wgpu`) against the CPU: f32 with and without gradient
/// checkpointing (the hand-written backward passes are registered for both on `Wgpu`), f16,
/// f16 with our fused GroupNorm and softmax kernels (`--fused-group-norm --fused-softmax`),
/// and bf16 refused by name. Needs a wgpu adapter (a GPU's Vulkan or Metal driver, or Mesa's
/// lavapipe, where the first run autotunes for minutes):
/// `cargo test -p trainer --release --features wgpu --test integration device_check::wgpu -- --ignored`
/// (`--features vulkan` or `metal` checks the SPIR-V or MSL kernels instead of WGSL).
#[cfg(feature = "wgpu")]
#[test]
#[ignore = "needs a wgpu adapter (Vulkan, Metal or DirectX 12 driver)"]
fn wgpu_against_cpu_passes_at_f32_and_f16() {
    type W = Autodiff<burn::backend::Wgpu>;
    let _rng = seeded();
    let cpu = Default::default();
    let mut opts = DeviceCheckOptions::new(UnetConfig::tiny(), 2, 64);
    for checkpointing in [false, true] {
        opts.grad_checkpointing = checkpointing;
        let report = run::<Autodiff<Flex>, W>(&opts, &cpu, &Default::default()).unwrap();
        assert!(report.pass, "{report:?}");
        // f32 on both sides: only the order of the sums differs.
        for e in [report.output, report.grad_up, report.grad_down] {
            assert!(e.finite && e.rel_l2 < 1e-4 && e.max_abs_ref > 0.0, "checkpointing {checkpointing}: {e:?}");
        }
        assert!(report.device.contains("wgpu"), "{}", report.device);
    }
    opts.grad_checkpointing = false;
    opts.precision = Precision::F16;
    let report = run::<Autodiff<Flex>, W>(&opts, &cpu, &Default::default()).unwrap();
    assert!(report.pass && report.output.rel_l2 > 0.0, "{report:?}");
    // The CubeCL kernels the trainer runs on wgpu when named (the switches are global: no
    // other test of this binary runs on wgpu).
    use lora_core::kernels::{vendor_stats, KernelSettings};
    let before = vendor_stats();
    KernelSettings { fused_group_norm: true, fused_softmax: true, ..KernelSettings::default() }.apply();
    let report = run::<Autodiff<Flex>, W>(&opts, &cpu, &Default::default());
    KernelSettings::default().apply();
    let (report, after) = (report.unwrap(), vendor_stats());
    assert!(report.pass, "{report:?}");
    assert!(after.fused_group_norm_calls > before.fused_group_norm_calls && after.fused_softmax_calls > before.fused_softmax_calls, "{after:?}");
    opts.precision = Precision::Bf16;
    let err = run::<Autodiff<Flex>, W>(&opts, &cpu, &Default::default()).unwrap_err().to_string();
    assert!(err.contains("--precision") && err.contains("bf16") && err.contains("f16 or f32"), "{err}");
}
