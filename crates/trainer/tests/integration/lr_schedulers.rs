//! PyTorch's learning-rate schedulers and diffusers' `piecewise_constant` against the rates
//! the real ones give (`xtask/fixtures/trainer_lr_schedulers.py`), for a UNet group and a
//! text-encoder group with a lower rate, step by step.

use trainer::config::{LrScheduler, LrSchedulerArgs};
use trainer::train::group_learning_rate;
use trainer::TrainConfig;

const FIXTURE: &str = include_str!("../fixtures/lr_schedulers.json");

#[test]
fn rates_match_pytorch_and_diffusers() {
    let fixture: serde_json::Value = serde_json::from_str(FIXTURE).unwrap();
    let meta = &fixture["meta"];
    let (unet_lr, te_lr) = (meta["unet_lr"].as_f64().unwrap(), meta["text_encoder_lr"].as_f64().unwrap());
    let cases = fixture["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 15);
    for case in cases {
        let name = case["lr_scheduler"].as_str().unwrap();
        let mut t = TrainConfig::default().train;
        t.lr_scheduler = serde_json::from_value(case["lr_scheduler"].clone()).unwrap();
        t.lr_scheduler_args = serde_json::from_value::<LrSchedulerArgs>(case["lr_scheduler_args"].clone()).unwrap();
        (t.learning_rate, t.text_encoder_lr, t.lr_warmup_steps, t.max_train_steps) = (unet_lr, te_lr, 0, 1000);
        assert!(t.torch_schedule().unwrap().is_some(), "{name}");
        for (step, expected) in case["rates"].as_array().unwrap().iter().enumerate() {
            for (group, peak) in [(0, unet_lr), (1, te_lr)] {
                let want = expected[group].as_f64().unwrap();
                let got = group_learning_rate(&t, step, peak);
                // PyTorch's recursive updates drift from the closed form by rounding only.
                assert!((got - want).abs() <= 1e-9 * peak, "{name} {}: step {step}, group {group}: {got} vs {want}", case["lr_scheduler_args"]);
            }
        }
    }
}

#[test]
fn scheduler_arguments_are_checked_by_name() {
    let load = |sets: &[&str]| {
        let mut all = vec!["train.lr_warmup_steps=0".to_string()];
        all.extend(sets.iter().map(|s| s.to_string()));
        TrainConfig::load(None, &all)
    };
    let err = |sets: &[&str]| load(sets).unwrap_err().to_string();
    // Arguments by PyTorch's names, defaults for the rest.
    let c = load(&["train.lr_scheduler=\"CosineAnnealingWarmRestarts\"", "train.lr_scheduler_args={ T_0 = 100 }"]).unwrap();
    assert_eq!(c.train.lr_scheduler, LrScheduler::CosineAnnealingWarmRestarts);
    assert_eq!(c.train.torch_schedule().unwrap(), Some(lora_core::optim::TorchLrSchedule::CosineAnnealingWarmRestarts { t_0: 100, t_mult: 1, eta_min: 0.0 }));
    // One it needs, one it does not take, a misspelt one, one of the trainer's own
    // schedules with arguments, a value PyTorch refuses, and malformed rules.
    let e = err(&["train.lr_scheduler=\"CosineAnnealingLR\""]);
    assert!(e.contains("train.lr_scheduler_args") && e.contains("needs `T_max`"), "{e}");
    let e = err(&["train.lr_scheduler=\"StepLR\"", "train.lr_scheduler_args={ step_size = 10, T_max = 5 }"]);
    assert!(e.contains("`T_max` is not an argument of StepLR (it takes step_size, gamma)"), "{e}");
    let e = err(&["train.lr_scheduler=\"StepLR\"", "train.lr_scheduler_args={ step_sise = 10 }"]);
    assert!(e.contains("step_sise"), "{e}");
    let e = err(&["train.lr_scheduler=\"cosine\"", "train.lr_scheduler_args={ eta_min = 1e-6 }"]);
    assert!(e.contains("takes no lr_scheduler_args"), "{e}");
    let e = err(&["train.lr_scheduler=\"LinearLR\"", "train.lr_scheduler_args={ start_factor = 0.0 }"]);
    assert!(e.contains("LinearLR") && e.contains("start_factor"), "{e}");
    let e = err(&["train.lr_scheduler=\"piecewise_constant\"", "train.lr_scheduler_args={ step_rules = \"1:10,x:20,0.1\" }"]);
    assert!(e.contains("`x:20`"), "{e}");
    // No warmup: sd-scripts refuses one with PyTorch's schedulers.
    let e = TrainConfig::load(None, &["train.lr_scheduler=\"ExponentialLR\"".into(), "train.lr_scheduler_args={ gamma = 0.99 }".into(), "train.lr_warmup_steps=10".into()])
        .unwrap_err()
        .to_string();
    assert!(e.contains("no warmup") && e.contains("lr_warmup_steps"), "{e}");
    // One argument at a time on the command line, and a misspelt one there.
    let c = load(&["train.lr_scheduler=\"StepLR\"", "train.lr_scheduler_args.step_size=50", "train.lr_scheduler_args.gamma=0.5"]).unwrap();
    assert_eq!((c.train.lr_scheduler_args.step_size, c.train.lr_scheduler_args.gamma), (Some(50), Some(0.5)));
    let e = err(&["train.lr_scheduler=\"StepLR\"", "train.lr_scheduler_args.stepsize=50"]);
    assert!(e.contains("stepsize"), "{e}");
    let e = err(&["train.learning_rate.x=1"]);
    assert!(e.contains("train.learning_rate") && e.contains("not a table"), "{e}");
    // The resolved configuration writes the arguments back, and reads as the same.
    let c = load(&["train.lr_scheduler=\"MultiStepLR\"", "train.lr_scheduler_args={ milestones = [10, 20], gamma = 0.5 }"]).unwrap();
    let text = toml::to_string(&c).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c.toml"), &text).unwrap();
    assert_eq!(TrainConfig::load(Some(&dir.path().join("c.toml")), &[]).unwrap(), c);
}
