//! The benchmark runs both modes on the tiny UNet.

use burn::backend::{Autodiff, Flex};
use sd_model::targets::UnetTargets;
use sd_model::UnetConfig;
use trainer::bench::{run, BenchOptions};

#[test]
fn bench_times_train_and_infer_steps() {
    let _rng = crate::common::seeded();
    for (train, lora_merged) in [(true, false), (false, false), (false, true)] {
        let opts = BenchOptions {
            unet: UnetConfig::tiny(),
            batch: 1,
            resolution: 64,
            steps: 2,
            targets: UnetTargets::AttnMlp,
            train,
            precision: trainer::device_check::Precision::Bf16,
            grad_checkpointing: train,
            lora_merged,
            optimizer: Default::default(),
            algo: Default::default(),
            train_norm: false,
        };
        let (first, median) = run::<Autodiff<Flex>>(&opts, &Default::default()).unwrap();
        assert!(first > 0.0 && median > 0.0 && median.is_finite());
    }
    let bad = BenchOptions { unet: UnetConfig::tiny(), batch: 1, resolution: 60, steps: 1, targets: UnetTargets::Attn, train: true, precision: Default::default(), grad_checkpointing: false, lora_merged: false, optimizer: Default::default(), algo: Default::default(), train_norm: false };
    assert!(run::<Autodiff<Flex>>(&bad, &Default::default()).is_err());
}

#[test]
fn memory_probe_samples_one_extra_untimed_step() {
    let _rng = crate::common::seeded();
    use trainer::bench::{run_probed, MemorySample};
    for (train, per_step) in [(true, 3), (false, 2)] {
        let opts = BenchOptions { unet: UnetConfig::tiny(), batch: 1, resolution: 32, steps: 2, targets: UnetTargets::Attn, train, precision: Default::default(), grad_checkpointing: false, lora_merged: false, optimizer: Default::default(), algo: Default::default(), train_norm: false };
        let mut calls = 0u64;
        let mut probe = || {
            calls += 1;
            Some(MemorySample { in_use: calls, reserved: 100 - calls })
        };
        let timings = run_probed::<Autodiff<Flex>>(&opts, &Default::default(), Some(&mut probe)).unwrap();
        assert_eq!(calls, per_step, "train = {train}");
        assert_eq!(timings.peak, Some(MemorySample { in_use: calls, reserved: 99 }));
        assert!(timings.first_step_s > 0.0 && timings.s_per_step > 0.0 && timings.back_to_back_s_per_step > 0.0);
    }
    // With checkpointing, also once per recomputed block.
    let opts = BenchOptions { unet: UnetConfig::tiny(), batch: 1, resolution: 32, steps: 1, targets: UnetTargets::Attn, train: true, precision: Default::default(), grad_checkpointing: true, lora_merged: false, optimizer: Default::default(), algo: Default::default(), train_norm: false };
    let mut calls = 0u64;
    let mut probe = || {
        calls += 1;
        Some(MemorySample { in_use: 1, reserved: 1 })
    };
    run_probed::<Autodiff<Flex>>(&opts, &Default::default(), Some(&mut probe)).unwrap();
    assert!(calls > 5, "{calls} samples");
    let opts = BenchOptions { unet: UnetConfig::tiny(), batch: 1, resolution: 32, steps: 1, targets: UnetTargets::Attn, train: false, precision: Default::default(), grad_checkpointing: false, lora_merged: false, optimizer: Default::default(), algo: Default::default(), train_norm: false };
    assert_eq!(run_probed::<Autodiff<Flex>>(&opts, &Default::default(), None).unwrap().peak, None);
    assert_eq!(run_probed::<Autodiff<Flex>>(&opts, &Default::default(), Some(&mut || None)).unwrap().peak, None);
}

#[test]
fn profiler_hook_brackets_one_step_after_the_memory_samples() {
    let _rng = crate::common::seeded();
    use std::cell::RefCell;
    use trainer::bench::{run_hooked, BenchHooks, MemorySample};
    let opts = BenchOptions { unet: UnetConfig::tiny(), batch: 1, resolution: 32, steps: 1, targets: UnetTargets::Attn, train: true, precision: Default::default(), grad_checkpointing: false, lora_merged: false, optimizer: Default::default(), algo: Default::default(), train_norm: false };
    let events = RefCell::new(Vec::new());
    let mut probe = || {
        events.borrow_mut().push("sample");
        Some(MemorySample { in_use: 1, reserved: 1 })
    };
    let mut profiler = |start: bool| {
        events.borrow_mut().push(if start { "start" } else { "stop" });
        Ok(())
    };
    let hooks = BenchHooks { memory: Some(&mut probe), profiler: Some(&mut profiler) };
    let timings = run_hooked::<Autodiff<Flex>>(&opts, &Default::default(), hooks).unwrap();
    assert_eq!(events.into_inner(), ["sample", "sample", "sample", "start", "stop"]);
    assert!(timings.peak.is_some() && timings.s_per_step > 0.0);

    // A profiler that cannot start ends the benchmark with its reason.
    let mut failing = |_: bool| Err("no profiler here".to_string());
    let hooks = BenchHooks { memory: None, profiler: Some(&mut failing) };
    let err = run_hooked::<Autodiff<Flex>>(&opts, &Default::default(), hooks).unwrap_err();
    assert!(err.to_string().contains("no profiler here"), "{err}");
}

/// The train step runs with each optimizer the trainer has (`--optimizer`).
#[test]
fn bench_trains_with_every_optimizer() {
    let _rng = crate::common::seeded();
    use trainer::config::Optimizer;
    for optimizer in [Optimizer::Lion, Optimizer::Prodigy, Optimizer::Adafactor, Optimizer::DadaptAdam, Optimizer::AdamwScheduleFree, Optimizer::RadamScheduleFree, Optimizer::Came, Optimizer::Ademamix, Optimizer::Sgd, Optimizer::DadaptAdamPreprint, Optimizer::DadaptLion, Optimizer::DadaptSgd, Optimizer::DadaptAdagrad, Optimizer::DadaptAdan, Optimizer::SgdScheduleFree] {
        let opts = BenchOptions { unet: UnetConfig::tiny(), batch: 1, resolution: 32, steps: 1, targets: UnetTargets::Attn, train: true, precision: Default::default(), grad_checkpointing: false, lora_merged: false, optimizer, algo: Default::default(), train_norm: false };
        let (first, median) = run::<Autodiff<Flex>>(&opts, &Default::default()).unwrap();
        assert!(first > 0.0 && median.is_finite(), "{optimizer:?}");
    }
}

/// The train and inference steps run with LyCORIS' LoHa and LoKr adapters (`--lora-algo`),
/// on a bf16 base too, with gradient checkpointing.
#[test]
fn bench_runs_loha_and_lokr() {
    let _rng = crate::common::seeded();
    for algo in [lora_core::Algo::Loha, lora_core::Algo::Lokr] {
        for (train, precision) in [(true, trainer::device_check::Precision::F32), (true, trainer::device_check::Precision::Bf16), (false, trainer::device_check::Precision::F32)] {
            let opts = BenchOptions { unet: UnetConfig::tiny(), batch: 1, resolution: 32, steps: 1, targets: UnetTargets::AttnMlp, train, precision, grad_checkpointing: train, lora_merged: false, optimizer: Default::default(), algo, train_norm: false };
            let (first, median) = run::<Autodiff<Flex>>(&opts, &Default::default()).unwrap();
            assert!(first > 0.0 && median.is_finite(), "{algo:?}, train {train}, {precision:?}");
        }
    }
}

/// LyCORIS' norm modules train beside LoRA and LoHa adapters (`--lora-train-norm`), on a
/// bf16 base too; targets that reach no norm, and kohya's OFT, are errors naming the flag.
#[test]
fn bench_trains_norm_modules() {
    let _rng = crate::common::seeded();
    let opts = |algo, targets, precision| BenchOptions { unet: UnetConfig::tiny(), batch: 1, resolution: 32, steps: 1, targets, train: true, precision, grad_checkpointing: false, lora_merged: false, optimizer: Default::default(), algo, train_norm: true };
    for (algo, precision) in [(lora_core::Algo::Lora, trainer::device_check::Precision::F32), (lora_core::Algo::Loha, trainer::device_check::Precision::Bf16)] {
        let (first, median) = run::<Autodiff<Flex>>(&opts(algo, UnetTargets::AttnMlp, precision), &Default::default()).unwrap();
        assert!(first > 0.0 && median.is_finite(), "{algo:?}");
    }
    let no_norm = run::<Autodiff<Flex>>(&opts(lora_core::Algo::Lora, UnetTargets::Attn, Default::default()), &Default::default()).unwrap_err().to_string();
    assert!(no_norm.contains("--lora-train-norm") && no_norm.contains("--lora-targets attn reaches no norm"), "{no_norm}");
    let oft = run::<Autodiff<Flex>>(&opts(lora_core::Algo::Oft, UnetTargets::AttnMlp, Default::default()), &Default::default()).unwrap_err().to_string();
    assert!(oft.contains("kohya's OFT has no norm modules"), "{oft}");
}
