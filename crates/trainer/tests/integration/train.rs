//! End-to-end training on the tiny model and the demo data, configuration handling.

use burn::backend::{Autodiff, Flex};
use lora_core::{AdapterFormat, AdapterSet, ReadOptions};
use trainer::config::{LrScheduler, TrainSection};
use trainer::train::{learning_rate, train};
use trainer::{TrainConfig, TrainError};

type B = Autodiff<Flex>;

use crate::common::seeded;

/// The tiny UNet's and text encoder's module paths, to read kohya files back.
fn tiny_index_with_text_encoder() -> lora_core::ModuleIndex {
    let mut unet = sd_model::UNet2DConditionModel::<Flex>::new(&sd_model::UnetConfig::tiny(), &Default::default()).unwrap();
    let mut te = sd_model::ClipTextModel::<Flex>::new(&sd_model::ClipTextConfig::tiny(), &Default::default()).unwrap();
    sd_model::lora::module_index(&mut unet, Some(&mut te)).unwrap()
}

/// The tiny UNet's module paths, to read kohya files back.
fn tiny_index() -> lora_core::ModuleIndex {
    let mut unet = sd_model::UNet2DConditionModel::<Flex>::new(&sd_model::UnetConfig::tiny(), &Default::default()).unwrap();
    sd_model::lora::module_index(&mut unet, None).unwrap()
}

/// The metadata of a LoRA file.
fn lora_metadata(path: &std::path::Path) -> std::collections::BTreeMap<String, String> {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    meta.metadata().clone().unwrap_or_default().into_iter().collect()
}

/// Two LoRA files hold the same tensor bytes and the same metadata except the run's
/// clock readings and session id.
fn assert_same_lora(a: &std::path::Path, b: &std::path::Path) {
    let data = |p: &std::path::Path| {
        let bytes = std::fs::read(p).unwrap();
        let header = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        bytes[8 + header..].to_vec()
    };
    assert!(data(a) == data(b), "the tensors of {} and {} differ", a.display(), b.display());
    let stable = |p| {
        let mut m = lora_metadata(p);
        // (Embedding files have no metadata.)
        for k in ["ss_session_id", "ss_training_started_at", "ss_training_finished_at", "modelspec.date"] {
            assert!(m.remove(k).is_some() || m.is_empty(), "{k}");
        }
        m
    };
    assert_eq!(stable(a), stable(b));
}

/// A run of `config` stopped after its third step and resumed from its state (in its
/// output folder) has `straight`'s losses, bit for bit, and its LoRA; with `edit` applied,
/// the state is refused with an error containing `refusal`.
fn assert_resumes_bit_for_bit(config: &TrainConfig, straight: &trainer::train::TrainReport, edit: impl Fn(&mut TrainConfig), refusal: &str) {
    let state = config.output.output_dir.join("state");
    train::<B>(config, &Default::default(), &mut |info| info.step < 3).unwrap();
    let resumed = trainer::train::resume::<B>(config, &state, &Default::default(), &mut |_| true).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&resumed.losses), bits(&straight.losses), "same losses, step for step");
    assert_same_lora(&straight.lora, &resumed.lora);
    let mut other = config.clone();
    edit(&mut other);
    let err = trainer::train::resume::<B>(&other, &state, &Default::default(), &mut |_| true).unwrap_err();
    assert!(err.to_string().contains(refusal), "{refusal}: {err}");
}

/// `config` trains to finite losses.
fn assert_trains(config: &TrainConfig) {
    let report = train::<B>(config, &Default::default(), &mut |_| true).unwrap();
    assert!(report.losses.iter().all(|l| l.is_finite()), "{:?}", report.losses);
}

fn quick_config(dir: &std::path::Path, steps: usize) -> TrainConfig {
    let mut c = TrainConfig::default();
    c.output.output_dir = dir.to_path_buf();
    c.train.max_train_steps = steps;
    c.train.lr_warmup_steps = 2;
    c.data.demo_images = 8;
    // Folders of 64 px test images train at the default 64 px resolution, which the
    // buckets' smallest side must not exceed (as sd-scripts asserts).
    c.data.min_bucket_reso = 64;
    c.output.sample_prompts.truncate(2);
    c.output.sample_steps = 4;
    // Read every step's loss: a stop asked for in `on_step` then takes effect at once.
    c.output.log_interval_s = 0.0;
    c
}

/// Samples are made at `data.resolution`, whatever bucket the run's first batch drew (the
/// demo data has 48x80, 64x64 and 80x48 buckets; they once took the first batch's).
#[test]
fn samples_are_made_at_the_training_resolution() {
    let _guard = seeded();
    let dir = tempfile::tempdir().unwrap();
    for seed in [1, 3, 4] {
        let mut config = quick_config(&dir.path().join(seed.to_string()), 1);
        config.train.seed = seed;
        let report = train::<B>(&config, &Default::default(), &mut |_| true).unwrap();
        let grid = image::open(report.sample_grid.unwrap()).unwrap();
        assert_eq!((grid.width(), grid.height()), (2 * 64, 64), "seed {seed}: two 64x64 samples in a row");
        // One step of a two-batch epoch: the finished run's file says it trained its one
        // epoch, as sd-scripts' final save does.
        let meta = lora_metadata(&report.lora);
        assert_eq!((meta["ss_epoch"].as_str(), meta["ss_num_epochs"].as_str()), ("1", "1"));
    }
}

/// A stop asked for (Ctrl-C) while sample images are drawn abandons them and ends the run
/// with its LoRA and state saved, as a stop between steps does.
#[test]
fn a_stop_while_sampling_ends_the_run() {
    let _guard = seeded();
    let dir = tempfile::tempdir().unwrap();
    let mut config = quick_config(dir.path(), 6);
    config.output.sample_every_n_steps = 1;
    let report = train::<B>(&config, &Default::default(), &mut |info| {
        if info.step == 2 {
            trainer::train::request_stop();
        }
        true
    })
    .unwrap();
    assert!(report.interrupted && report.sample_grid.is_none());
    assert_eq!(report.losses.len(), 2);
    assert!(dir.path().join("samples-step000001.png").is_file() && !dir.path().join("samples-step000002.png").exists());
    assert!(dir.path().join("state/state.json").is_file() && report.lora.is_file());
    // The next run starts afresh.
    let again = train::<B>(&quick_config(&dir.path().join("again"), 1), &Default::default(), &mut |_| true).unwrap();
    assert!(!again.interrupted);
}

/// Images in sub-folders of a folder train (`data.recursive`, on by default) and the data
/// summary says how many; `false` reads only the folder's own, as sd-scripts does.
#[test]
fn sub_folders_are_read_and_noted_or_left_out() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    write_image(&data.join("10_style"), "a", "mystyle", 10);
    write_image(&data.join("10_style/old"), "b", "mystyle", 20);
    let mut config = quick_config(&root.path().join("out"), 1);
    config.data.train_data_dir = data.display().to_string();
    let both = trainer::train::training_datasets(&config).unwrap();
    assert_eq!(both.0.images().len(), 2);
    let summary = trainer::train::data_summary(&config, &both).unwrap();
    assert!(summary.contains("note: 1 image(s) come from sub-folders") && summary.contains("b.png") && summary.contains("data.recursive = false"), "{summary}");
    config.data.recursive = false;
    let own = trainer::train::training_datasets(&config).unwrap();
    assert_eq!(own.0.images().len(), 1);
    assert!(!trainer::train::data_summary(&config, &own).unwrap().contains("sub-folders"));
}

#[test]
fn demo_training_writes_every_output_and_the_lora_reloads() {
    let _guard = seeded();
    let dir = tempfile::tempdir().unwrap();
    for format in [AdapterFormat::Kohya, AdapterFormat::Peft] {
        let mut config = quick_config(dir.path(), 6);
        config.output.save_format = format;
        config.output.save_every_n_steps = 3;
        config.output.sample_every_n_steps = 4;
        let mut seen = 0;
        let report = train::<B>(&config, &Default::default(), &mut |_| {
            seen += 1;
            true
        })
        .unwrap();
        assert!(!report.interrupted);
        assert_eq!(seen, 6);
        assert_eq!(report.losses.len(), 6);
        assert!(report.losses.iter().all(|l| l.is_finite() && *l > 0.0));
        // Intermediate save at step 3.
        assert!(dir.path().join("demo_lora-step00000003.safetensors").is_file());
        assert!(dir.path().join("samples-step000004.png").is_file());
        // The LoRA loads back in its layout with the tiny model's kohya (attn-mlp) targets.
        let (set, report_read) = AdapterSet::load(&report.lora, &tiny_index(), ReadOptions::default()).unwrap();
        assert_eq!(report_read.format, format);
        assert_eq!(set.len(), 48, "4 transformers x (8 attention + 2 feed-forward + 2 projection) layers");
        // PNGs decode, metrics are JSON lines, the resolved config parses back.
        for png in [report.sample_grid.as_ref().unwrap(), &report.loss_curve] {
            let img = image::open(png).unwrap();
            assert!(img.width() > 0 && img.height() > 0);
        }
        let metrics = std::fs::read_to_string(&report.metrics).unwrap();
        let lines: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 6);
        assert_eq!(lines[5]["step"], 6);
        let resolved = TrainConfig::load(Some(&report.config), &[]).unwrap();
        assert_eq!(resolved, config);
    }
}

#[test]
fn training_reduces_the_loss() {
    let _guard = seeded();
    let dir = tempfile::tempdir().unwrap();
    let mut config = quick_config(dir.path(), 60);
    // One image, fixed timesteps range: the LoRA can only learn this sample.
    config.data.demo_images = 1;
    config.train.train_batch_size = 1;
    config.train.min_timestep = 400;
    config.train.max_timestep = 600;
    config.train.learning_rate = 3e-3;
    config.train.min_snr_gamma = 0.0;
    let report = train::<B>(&config, &Default::default(), &mut |_| true).unwrap();
    let mean = |s: &[f32]| s.iter().sum::<f32>() / s.len() as f32;
    let (first, last) = (mean(&report.losses[..10]), mean(&report.losses[50..]));
    // Fresh noise every step keeps the loss noisy; a 5% fall of the mean is well beyond it
    // (the run is seeded, so this is deterministic).
    assert!(last < 0.95 * first, "loss should fall: first {first}, last {last}");
}

#[test]
fn config_errors_name_the_key_and_suggest_the_nearest() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, "[train]\nlearning_rat = 1e-4\n").unwrap();
    let err = TrainConfig::load(Some(&path), &[]).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, TrainError::Config { .. }));
    assert!(text.contains("train.learning_rat") && text.contains("did you mean `train.learning_rate`"), "{text}");
    std::fs::write(&path, "[trian]\nseed = 1\n").unwrap();
    assert!(TrainConfig::load(Some(&path), &[]).unwrap_err().to_string().contains("did you mean `[train]`"));
    std::fs::write(&path, "[train]\nlearning_rate = \"fast\"\n").unwrap();
    assert!(TrainConfig::load(Some(&path), &[]).unwrap_err().to_string().contains("c.toml"));
    let err = TrainConfig::load(None, &["lora.rnak=4".into()]).unwrap_err();
    assert!(err.to_string().contains("lora.rank"), "{err}");
    let err = TrainConfig::load(None, &["train.max_train_steps=10000001".into()]).unwrap_err();
    assert!(err.to_string().contains("train.max_train_steps = 10000001"), "{err}");
    let err = TrainConfig::load(None, &["train.max_train_steps=0".into()]).unwrap_err();
    assert!(err.to_string().contains("max_train_steps"), "{err}");
    let c = TrainConfig::load(None, &["train.learning_rate=3e-4".into(), "output.output_name=style".into(), "lora.unet_targets=conv".into()]).unwrap();
    assert_eq!(c.train.learning_rate, 3e-4);
    assert_eq!(c.output.output_name, "style");
    assert_eq!(c.lora.unet_targets, sd_model::targets::UnetTargets::Conv);
    let err = TrainConfig::load(Some(&dir.path().join("missing.toml")), &[]).unwrap_err();
    assert!(err.to_string().contains("missing.toml"));
    // A bad --set value is blamed on the --set, not on the file beside it.
    std::fs::write(&path, "[train]\nseed = 1\n").unwrap();
    let err = TrainConfig::load(Some(&path), &["train.learning_rate=\"abc\"".into()]).unwrap_err().to_string();
    assert!(err.contains("--set train.learning_rate") && !err.contains("c.toml"), "{err}");
    // ... and of several, only the bad one is named.
    let sets = ["train.seed=3".into(), "train.learning_rate=\"abc\"".into(), "train.max_train_steps=9".into()];
    let err = TrainConfig::load(Some(&path), &sets).unwrap_err().to_string();
    assert!(err.contains("--set train.learning_rate=\"abc\"") && !err.contains("seed") && !err.contains("max_train_steps"), "{err}");
    let err = TrainConfig::load(None, &sets[..2]).unwrap_err().to_string();
    assert!(err.contains("--set train.learning_rate") && !err.contains("seed"), "{err}");
}

/// Values that would have been taken as "off", written outside the output folder or
/// failed only at the first sample are errors naming the key when the config loads.
#[test]
fn config_values_that_would_misbehave_later_are_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, "x").unwrap();
    let cases: Vec<(String, &str)> = vec![
        ("train.max_grad_norm=-1".into(), "train.max_grad_norm"),
        ("train.max_grad_norm=nan".into(), "train.max_grad_norm"),
        ("train.min_snr_gamma=-5".into(), "train.min_snr_gamma"),
        ("lora.alpha=inf".into(), "lora.alpha"),
        ("output.output_dir=\"\"".into(), "output.output_dir"),
        (format!("output.output_dir={:?}", file.display().to_string()), "is a file"),
        ("output.output_name=\"../../escaped\"".into(), "output.output_name"),
        ("output.output_name=\"/tmp/abs\"".into(), "output.output_name"),
        ("output.output_name=\"\"".into(), "output.output_name"),
        ("output.sample_steps=5000".into(), "output.sample_steps"),
        ("output.sample_cfg=nan".into(), "output.sample_cfg"),
        ("model.pretrained=\"\"".into(), "model.pretrained"),
        ("data.resolution=100000".into(), "at most 8192"),
        ("data.resolution=7".into(), "at least 8"),
        ("train.adam_epsilon=0".into(), "train.adam_epsilon positive"),
        ("data.num_repeats=0".into(), "data.num_repeats"),
        ("data.demo_images=0".into(), "data.demo_images"),
        ("data.demo_images=100000000".into(), "1 to 1000"),
        // A sample prompt's bad option names the prompt.
        ("output.sample_prompts=[\"x --ss nosuchsampler\"]".into(), "sample prompt `x --ss nosuchsampler`"),
        ("output.sample_prompts=[\"x --h 8200\"]".into(), "sample prompt `x --h 8200`"),
    ];
    for (set, expected) in cases {
        let err = TrainConfig::load(None, std::slice::from_ref(&set)).unwrap_err().to_string();
        assert!(err.contains(expected), "{set}: {err}");
    }
    // A prompt's own step count is clamped to 1..=1000, as sd-scripts does.
    assert!(TrainConfig::load(None, &["output.sample_prompts=[\"x --s 5000\", \"y --s 0\"]".into()]).is_ok());
}

/// `[data]`'s rates and prior loss weight are checked with their own keys: with a kohya
/// dataset TOML they reach its subsets through JSON, where NaN became a `null` blamed on
/// `datasets[0].subsets[0].image_dir`.
#[test]
fn data_rates_and_weights_are_refused_with_their_keys() {
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("dataset.toml");
    std::fs::write(&toml, format!("[[datasets]]\n  [[datasets.subsets]]\n  image_dir = {:?}\n", dir.path().display().to_string())).unwrap();
    let dataset = format!("data.dataset_config={:?}", toml.display().to_string());
    for (set, key) in [
        ("data.prior_loss_weight=nan", "data.prior_loss_weight"),
        ("data.prior_loss_weight=-1", "data.prior_loss_weight"),
        ("data.prior_loss_weight=inf", "data.prior_loss_weight"),
        ("data.caption_dropout_rate=nan", "data.caption_dropout_rate"),
        ("data.caption_dropout_rate=1.5", "data.caption_dropout_rate"),
        ("data.caption_tag_dropout_rate=-0.1", "data.caption_tag_dropout_rate"),
    ] {
        let err = TrainConfig::load(None, &[set.into(), dataset.clone()]).unwrap_err().to_string();
        assert!(err.contains(key) && !err.contains("image_dir"), "{set}: {err}");
    }
    let ok = TrainConfig::load(None, &["data.prior_loss_weight=0".into(), "data.caption_dropout_rate=1".into(), dataset]);
    assert!(ok.is_ok(), "{:?}", ok.err().map(|e| e.to_string()));
}

/// The demo's images are drawn in memory all at once: their count times their size is
/// bounded (1000 images at 512 px fit, at 1024 px they do not), with an error naming both
/// keys.
#[test]
fn demo_images_at_a_large_resolution_are_refused_before_drawing() {
    let load = |images: usize, side: u32| TrainConfig::load(None, &[format!("data.demo_images={images}"), format!("data.resolution={side}")]);
    assert!(load(1000, 512).is_ok());
    assert!(load(24, 4096).is_ok());
    let pixels = trainer::config::MAX_DEMO_PIXELS;
    assert!(1000 * 1024 * 1536 > pixels && 682 * 1024 * 1536 <= pixels);
    assert!(load(682, 1024).is_ok());
    for (images, side) in [(683, 1024), (1000, 4096)] {
        let err = load(images, side).unwrap_err().to_string();
        assert!(err.contains("data.demo_images") && err.contains("data.resolution") && err.contains(&pixels.to_string()), "{images} x {side}: {err}");
    }
}

#[test]
fn the_example_configs_are_valid() {
    for name in ["sd15-style", "sdxl-style"] {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("../../examples/{name}.toml"));
        let c = TrainConfig::load(Some(&path), &[]).unwrap();
        assert_eq!(c.lora.unet_targets, sd_model::targets::UnetTargets::AttnMlp);
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/sd15-textual-inversion.toml");
    let c = TrainConfig::load(Some(&path), &[]).unwrap();
    assert_eq!((c.lora.unet_targets, c.embedding.token.as_str(), c.embedding.vectors), (sd_model::targets::UnetTargets::None, "mychar", 4));
}

#[test]
fn learning_rate_schedules() {
    let mut t: TrainSection = TrainConfig::default().train;
    t.max_train_steps = 110;
    t.lr_warmup_steps = 10;
    t.learning_rate = 1.0;
    for sched in [LrScheduler::Constant, LrScheduler::Linear, LrScheduler::Cosine, LrScheduler::CosineWithRestarts, LrScheduler::Polynomial] {
        t.lr_scheduler = sched;
        t.lr_cycles = 2;
        // Linear warmup to the peak.
        assert!((learning_rate(&t, 0) - 0.1).abs() < 1e-12);
        assert!((learning_rate(&t, 9) - 1.0).abs() < 1e-12);
        assert!((learning_rate(&t, 10) - 1.0).abs() < 1e-12, "{sched:?} starts at the peak");
        let end = learning_rate(&t, 109);
        match sched {
            LrScheduler::Constant => assert_eq!(end, 1.0),
            _ => assert!(end < 0.05, "{sched:?} decays, got {end}"),
        }
    }
    t.lr_scheduler = LrScheduler::CosineWithRestarts;
    // The second cycle restarts at the peak halfway through.
    assert!(learning_rate(&t, 59) < 0.01 && learning_rate(&t, 60) > 0.99);
    // kohya's `lr_scheduler_num_cycles = 0`: transformers' cos(π · (0 % 1)) keeps the peak.
    t.lr_cycles = 0;
    for sched in [LrScheduler::CosineWithRestarts, LrScheduler::CosineWithMinLr] {
        t.lr_scheduler = sched;
        t.lr_scheduler_min_lr_ratio = 0.1;
        assert!([10, 60, 109].iter().all(|&s| (learning_rate(&t, s) - 1.0).abs() < 1e-12), "{sched:?}");
    }
    t.lr_cycles = 2;
    // diffusers' polynomial decay: (peak − 1e-7) · (1 − progress)^power + 1e-7; power 1 is
    // the linear schedule but for the floor.
    t.lr_scheduler = LrScheduler::Polynomial;
    t.lr_scheduler_power = 2.0;
    let progress = 50.0 / 100.0;
    assert!((learning_rate(&t, 60) - ((1.0 - 1e-7) * (1.0f64 - progress).powi(2) + 1e-7)).abs() < 1e-12);
    assert!((learning_rate(&t, 110) - 1e-7).abs() < 1e-15, "ends at lr_end");
    // kohya's / diffusers' names read as ours.
    let parsed = TrainConfig::load(None, &["train.lr_scheduler=\"constant_with_warmup\"".into()]).unwrap();
    assert_eq!(parsed.train.lr_scheduler, LrScheduler::Constant);
    let parsed = TrainConfig::load(None, &["train.lr_scheduler=\"polynomial\"".into(), "train.lr_scheduler_power=0.5".into()]).unwrap();
    assert_eq!((parsed.train.lr_scheduler, parsed.train.lr_scheduler_power), (LrScheduler::Polynomial, 0.5));
    assert!(TrainConfig::load(None, &["train.lr_scheduler_power=0".into()]).is_err());
    // A warmup as a share of the steps (sd-scripts' float lr_warmup_steps) replaces the count.
    t.lr_warmup_ratio = 0.1;
    assert!((learning_rate(&t, 0) - 1.0 / 11.0).abs() < 1e-12 && (learning_rate(&t, 10) - 1.0).abs() < 1e-12);
    assert!(TrainConfig::load(None, &["train.lr_warmup_ratio=1.0".into()]).is_err());
}

/// transformers' newer schedules, as sd-scripts configures them (values from their
/// definitions in transformers 4.57's `optimization.py`, at this trainer's warmup).
#[test]
fn min_lr_inverse_sqrt_and_warmup_stable_decay_schedules() {
    let mut t: TrainSection = TrainConfig::default().train;
    (t.max_train_steps, t.lr_warmup_steps, t.learning_rate, t.lr_cycles) = (110, 10, 2.0, 1);
    let close = |a: f64, b: f64| (a - b).abs() < 1e-12;
    let half_wave = |p: f64| 0.5 * (1.0 + (std::f64::consts::PI * p).cos());
    let keep = |f: f64| f * 0.8 + 0.2;
    // Cosine to 20% of the rate: the peak after warmup, half-way at 60%, the floor at the end.
    t.lr_scheduler = LrScheduler::CosineWithMinLr;
    t.lr_scheduler_min_lr_ratio = 0.2;
    assert!(close(learning_rate(&t, 0), 0.2) && close(learning_rate(&t, 10), 2.0));
    assert!(close(learning_rate(&t, 60), 2.0 * 0.6), "{}", learning_rate(&t, 60));
    assert!(close(learning_rate(&t, 110), 2.0 * 0.2));
    // Two cycles (sd-scripts' num_cycles = 2): a full wave, back at the peak at the end.
    t.lr_cycles = 2;
    assert!(close(learning_rate(&t, 60), 2.0 * 0.2) && close(learning_rate(&t, 110), 2.0));
    t.lr_cycles = 1;
    // Inverse square root with the warmup as the timescale: half the rate 3 timescales on.
    t.lr_scheduler = LrScheduler::InverseSqrt;
    assert!(close(learning_rate(&t, 10), 2.0) && close(learning_rate(&t, 40), 1.0));
    t.lr_scheduler_timescale = 5;
    assert!(close(learning_rate(&t, 25), 1.0));
    // Warmup from the floor, stable at the peak, a cosine over the last 20 steps to the floor.
    t.lr_scheduler = LrScheduler::WarmupStableDecay;
    t.lr_decay_steps = 20;
    assert!(close(learning_rate(&t, 0), 2.0 * (0.1 * 0.8 + 0.2)));
    assert!(close(learning_rate(&t, 10), 2.0) && close(learning_rate(&t, 89), 2.0));
    assert!(close(learning_rate(&t, 90), 2.0) && close(learning_rate(&t, 100), 2.0 * (0.5 * 0.8 + 0.2)));
    assert!(close(learning_rate(&t, 110), 2.0 * 0.2));
    // The decay as a share of the steps, as sd-scripts reads a float lr_decay_steps.
    t.lr_decay_ratio = 0.5;
    assert_eq!(t.decay_steps(), 55);
    assert!(close(learning_rate(&t, 54), 2.0) && learning_rate(&t, 56) < 2.0);
    // The names, and what they need.
    let parsed = TrainConfig::load(None, &["train.lr_scheduler=\"cosine_with_min_lr\"".into(), "train.lr_scheduler_min_lr_ratio=0.1".into()]).unwrap();
    assert_eq!(parsed.train.lr_scheduler, LrScheduler::CosineWithMinLr);
    // A decay longer than the steps after warmup starts part-way (transformers' arithmetic).
    (t.lr_decay_ratio, t.lr_decay_steps, t.max_train_steps, t.lr_warmup_steps) = (0.0, 80, 100, 30);
    assert!(close(learning_rate(&t, 30), 2.0 * keep(half_wave(10.0 / 80.0))), "{}", learning_rate(&t, 30));
    assert!(close(learning_rate(&t, 99), 2.0 * keep(half_wave(79.0 / 80.0))));
    // Without a decay (sd-scripts' default lr_decay_steps = 0) it stays at the peak.
    t.lr_decay_steps = 0;
    assert!(close(learning_rate(&t, 99), 2.0));
    let err = TrainConfig::load(None, &["train.lr_scheduler_min_lr_ratio=1.5".into()]).unwrap_err();
    assert!(err.to_string().contains("lr_scheduler_min_lr_ratio"), "{err}");
}

#[test]
fn stopping_early_saves_the_lora_trained_so_far() {
    let _guard = seeded();
    let dir = tempfile::tempdir().unwrap();
    let config = quick_config(dir.path(), 50);
    let report = train::<B>(&config, &Default::default(), &mut |info| info.step < 3).unwrap();
    assert!(report.interrupted);
    assert_eq!(report.losses.len(), 3);
    assert!(report.sample_grid.is_none());
    let (set, _) = AdapterSet::load(&report.lora, &tiny_index(), ReadOptions::default()).unwrap();
    assert_eq!(set.len(), 48);
    // Adapters moved away from their zero-initialised `up` in three steps.
    assert!(set.iter().any(|(_, w)| w.up.data.iter().any(|v| *v != 0.0)));
}

/// kohya's LoCon settings: 3x3 convolutions get `conv_rank` / `conv_alpha`, linear layers
/// and 1x1 convolutions `rank` / `alpha`; the file says so in `ss_network_args`. Setting
/// them with targets that hold no 3x3 convolution is an error naming the keys.
#[test]
fn conv_rank_and_alpha_reach_the_3x3_convolutions_only() {
    let _guard = seeded();
    let dir = tempfile::tempdir().unwrap();
    let mut config = quick_config(dir.path(), 2);
    config.lora.unet_targets = sd_model::targets::UnetTargets::Conv;
    (config.lora.rank, config.lora.alpha) = (8, 4.0);
    (config.lora.conv_rank, config.lora.conv_alpha) = (2, 1.5);
    config.lora.rank_dropout = 0.1;
    let report = train::<B>(&config, &Default::default(), &mut |_| true).unwrap();
    let (set, _) = AdapterSet::load(&report.lora, &tiny_index(), ReadOptions::default()).unwrap();
    let spatial = |w: &lora_core::LoraWeights| w.is_conv() && w.down.shape[2..] != [1, 1];
    let (convs, rest): (Vec<_>, Vec<_>) = set.iter().partition(|(_, w)| spatial(w));
    assert!(!convs.is_empty() && !rest.is_empty());
    for (key, w) in &convs {
        assert_eq!((w.rank(), w.alpha), (2, 1.5), "{key}");
    }
    for (key, w) in &rest {
        assert_eq!((w.rank(), w.alpha), (8, 4.0), "{key}");
    }
    assert!(rest.iter().any(|(k, _)| k.path.ends_with("time_emb_proj")), "linear layers of the ResNet blocks take the linear rank");
    let args: serde_json::Value = serde_json::from_str(&lora_metadata(&report.lora)["ss_network_args"]).unwrap();
    assert_eq!((args["conv_dim"].as_str(), args["conv_alpha"].as_str()), (Some("2"), Some("1.5")));
    assert_eq!(args["rank_dropout"].as_str(), Some("0.1"), "the run's other network args stay: {args}");

    config.lora.unet_targets = sd_model::targets::UnetTargets::AttnMlp;
    match train::<B>(&config, &Default::default(), &mut |_| true) {
        Err(TrainError::Config { origin, reason }) => {
            assert!(origin.contains("lora.conv_rank") && reason.contains("unet_targets = \"conv\""), "{origin}: {reason}");
        }
        other => panic!("expected a configuration error, got {other:?}"),
    }
}

/// `unet_targets = "none"` trains the text encoder alone (it once stopped with "matches no
/// UNet layer"); with no target in either model the error names both keys.
#[test]
fn text_encoder_only_training() {
    let _guard = seeded();
    let dir = tempfile::tempdir().unwrap();
    let mut config = quick_config(dir.path(), 2);
    config.lora.unet_targets = sd_model::targets::UnetTargets::None;
    config.lora.text_encoder_targets = sd_model::targets::TextEncoderTargets::Attn;
    let report = train::<B>(&config, &Default::default(), &mut |_| true).unwrap();
    assert!(report.losses.iter().all(|l| l.is_finite()));
    let (set, _) = AdapterSet::load(&report.lora, &tiny_index_with_text_encoder(), ReadOptions::default()).unwrap();
    assert_eq!(set.len(), 3 * 4, "q/k/v/out of 3 layers");
    assert!(set.iter().all(|(k, _)| k.component == lora_core::Component::TextEncoder));
    assert!(set.iter().any(|(_, w)| w.up.data.iter().any(|v| *v != 0.0)), "the adapters were updated");

    config.lora.text_encoder_targets = sd_model::targets::TextEncoderTargets::None;
    let err = train::<B>(&config, &Default::default(), &mut |_| true).unwrap_err().to_string();
    assert!(err.contains("unet_targets") && err.contains("text_encoder_targets"), "{err}");
}

/// A fresh adapter's initial weights depend on the run's seed and its module path only
/// (a host stream per adapter, the same on every backend): the text encoder's `down`s are
/// the same whether or not UNet adapters were drawn before them, and change with
/// `train.seed`. (After one step they still are the initial ones: `up` starts at zero, so
/// `down` has no gradient yet, and AdamW without weight decay leaves it.)
#[test]
fn initial_adapters_depend_on_seed_and_path_only() {
    let _guard = seeded();
    let dir = tempfile::tempdir().unwrap();
    let downs = |unet: sd_model::targets::UnetTargets, seed: u64| {
        let mut config = quick_config(dir.path(), 1);
        config.output.sample_prompts.clear();
        config.train.adam_weight_decay = 0.0;
        config.train.seed = seed;
        config.lora.unet_targets = unet;
        config.lora.text_encoder_targets = sd_model::targets::TextEncoderTargets::Attn;
        let report = train::<B>(&config, &Default::default(), &mut |_| true).unwrap();
        let (set, _) = AdapterSet::load(&report.lora, &tiny_index_with_text_encoder(), ReadOptions::default()).unwrap();
        let te: std::collections::BTreeMap<String, Vec<f32>> =
            set.iter().filter(|(k, _)| k.component == lora_core::Component::TextEncoder).map(|(k, w)| (k.path.clone(), w.down.data.clone())).collect();
        assert_eq!(te.len(), 3 * 4, "q/k/v/out of 3 layers");
        te
    };
    let alone = downs(sd_model::targets::UnetTargets::None, 7);
    assert!(alone == downs(sd_model::targets::UnetTargets::AttnMlp, 7), "UNet adapters drawn first changed the text encoder's");
    assert!(alone != downs(sd_model::targets::UnetTargets::None, 8), "another seed drew the same");
}

/// `model.vae`: another VAE (the tiny model's of another seed, written in diffusers'
/// layout) encodes the images, which changes the latents and so the losses, and the LoRA
/// names it (`ss_vae_name`); the model's own VAE from a file trains as without the key; a
/// file that holds no VAE is an error naming it.
#[test]
fn a_separate_vae_encodes_the_images() {
    let _guard = seeded();
    let dir = tempfile::tempdir().unwrap();
    let write_vae = |seed: u64, name: &str| {
        let c = sd_pipeline::load_components::<Flex>("tiny", seed, &Default::default()).unwrap();
        let path = dir.path().join(name);
        sd_model::save::save_diffusers_component(&c.vae, &path, lora_core::SaveDtype::F32).unwrap();
        path.display().to_string()
    };
    let (other, own) = (write_vae(7, "other-vae.safetensors"), write_vae(0, "own-vae.safetensors"));
    let run = |vae: &str, out: &str| {
        let mut config = quick_config(&dir.path().join(out), 2);
        config.output.sample_prompts.clear();
        config.model.vae = vae.into();
        train::<B>(&config, &Default::default(), &mut |_| true)
    };
    let plain = run("", "plain").unwrap();
    let with_other = run(&other, "other").unwrap();
    let with_own = run(&own, "own").unwrap();
    assert_ne!(plain.losses, with_other.losses);
    assert_eq!(plain.losses, with_own.losses);
    assert_eq!(lora_metadata(&with_other.lora)["ss_vae_name"], "other-vae.safetensors");
    assert!(!lora_metadata(&plain.lora).contains_key("ss_vae_name"));
    let err = run(&plain.lora.display().to_string(), "bad").unwrap_err().to_string();
    assert!(err.contains("no VAE found") && err.contains(plain.lora.file_name().unwrap().to_str().unwrap()), "{err}");
}

#[test]
fn text_encoder_adapters_train_and_save_with_the_unet_ones() {
    let _guard = seeded();
    let dir = tempfile::tempdir().unwrap();
    let mut config = quick_config(dir.path(), 3);
    config.lora.text_encoder_targets = sd_model::targets::TextEncoderTargets::AttnMlp;
    config.train.text_encoder_lr = 5e-4;
    let report = train::<B>(&config, &Default::default(), &mut |_| true).unwrap();
    let index = tiny_index_with_text_encoder();
    let (set, _) = AdapterSet::load(&report.lora, &index, ReadOptions::default()).unwrap();
    let te_adapters: Vec<_> = set.iter().filter(|(k, _)| k.component == lora_core::Component::TextEncoder).collect();
    assert_eq!(te_adapters.len(), 3 * 6, "q/k/v/out + fc1/fc2 of 3 layers");
    assert!(te_adapters.iter().any(|(_, w)| w.up.data.iter().any(|v| *v != 0.0)), "text-encoder adapters were updated");
    assert_eq!(set.len(), 48 + 18);
}

/// Overfitting one image: sampling from a fixed seed with the trained LoRA lands closer to
/// that image's latent than the same sampling without it.
#[test]
fn lora_pulls_samples_towards_the_training_image() {
    let _guard = seeded();
    use burn::tensor::Tensor;
    use sd_pipeline::{denoise, initial_latents, GenerateOptions};
    type I = Flex;
    let dir = tempfile::tempdir().unwrap();
    let mut config = quick_config(dir.path(), 300);
    config.data.demo_images = 1;
    config.train.train_batch_size = 4;
    config.train.learning_rate = 5e-3;
    config.train.min_snr_gamma = 0.0;
    config.lora.rank = 16;
    config.lora.alpha = 16.0;
    config.lora.unet_targets = sd_model::targets::UnetTargets::Conv;
    let report = train::<B>(&config, &Default::default(), &mut |_| true).unwrap();

    let device = Default::default();
    let base = sd_pipeline::load_components::<I>("tiny", config.model.tiny_seed, &device).unwrap();
    let dataset = trainer::train::open_dataset(&config).unwrap();
    let plan = &dataset.plan_epoch(0)[0];
    let caption = plan.samples[0].caption.clone();
    let pixels = dataset.load_pixels(plan).unwrap().to_tensor::<I>(&device).unwrap();
    let target = base.vae.scale_latents(base.vae.encode(pixels).unwrap().mean);
    let [_, _, h, w] = target.dims();
    let f = base.vae.downsample_factor();
    let opts = GenerateOptions {
        prompts: vec![caption],
        negative_prompt: String::new(),
        sampler: "ddim".into(),
        steps: 20,
        cfg_scale: 1.0,
        seed: 3,
        width: w * f,
        height: h * f,
        clip_skip: 1,
        max_token_length: 75,
    };
    let distance = |c: &sd_pipeline::Components<I>| -> f32 {
        let z = denoise(c, &opts, initial_latents(c, &opts, &device).unwrap(), &device).unwrap();
        let d: Tensor<I, 4> = z - target.clone();
        d.powf_scalar(2.0).mean().into_scalar()
    };
    let without = distance(&base);
    let mut tuned = sd_pipeline::load_components::<I>("tiny", config.model.tiny_seed, &device).unwrap();
    let files = vec![sd_model::lora::LoraFile::new(report.lora.clone(), 1.0)];
    sd_model::lora::apply_lora_files(&mut tuned.unet, Some(&mut tuned.text_encoder), &files, false, &device).unwrap();
    let with = distance(&tuned);
    eprintln!("distance to the training latent: with LoRA {with}, without {without}");
    assert!(with < 0.5 * without, "distance to the training latent: with LoRA {with}, without {without}");
}

#[test]
fn a_non_finite_loss_stops_or_is_skipped() {
    let _guard = seeded();
    let dir = tempfile::tempdir().unwrap();
    let mut config = quick_config(dir.path(), 2);
    // A huge learning rate blows the adapters up after the first update.
    config.train.learning_rate = 1e30;
    config.train.lr_warmup_steps = 0;
    config.train.max_grad_norm = 0.0;
    config.train.adam_epsilon = 1e-38;
    let err = train::<B>(&config, &Default::default(), &mut |_| true);
    match err {
        Err(TrainError::NonFinite { step, .. }) => assert_eq!(step, 2),
        other => panic!("expected a non-finite error, got {other:?}"),
    }
    config.train.on_non_finite = trainer::config::OnNonFinite::Skip;
    // Step 1's update blew the adapters past f16's range: the LoRA cannot be written in
    // f16 (an error naming the setting, with the state saved in f32 first); f32 holds it.
    let err = train::<B>(&config, &Default::default(), &mut |_| true).unwrap_err().to_string();
    assert!(err.contains("output.save_precision") && err.contains("beyond the range of F16") && err.contains("state is saved"), "{err}");
    assert!(dir.path().join("state/state.json").is_file());
    config.output.save_precision = lora_core::SaveDtype::F32;
    let report = train::<B>(&config, &Default::default(), &mut |_| true).unwrap();
    assert!(!report.losses[1].is_finite());
    // The blown-up adapters sample NaN: no sample grid (rather than a black one).
    assert_eq!(report.sample_grid, None);
    // Read back only at the end: steps 3 and 4 were queued after the bad one, and the
    // error still names step 2, with no LoRA written.
    let dir = tempfile::tempdir().unwrap();
    config.output.output_dir = dir.path().to_path_buf();
    config.train.max_train_steps = 4;
    config.train.on_non_finite = trainer::config::OnNonFinite::Stop;
    config.output.log_interval_s = 1e9;
    let mut seen = vec![];
    let err = train::<B>(&config, &Default::default(), &mut |info| {
        seen.push(info.step);
        true
    });
    assert!(matches!(err, Err(TrainError::NonFinite { step: 2, .. })), "{err:?}");
    assert_eq!(seen, [1], "steps before the bad one are reported");
    assert!(!dir.path().join("demo_lora.safetensors").exists());
    let metrics = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 1);
}

/// A configuration that exercises every random stream and counter a resume must restore:
/// dropout, flips, colour changes, offset noise, accumulation with short steps at epoch ends, text-encoder
/// adapters and clipping.
fn resume_config(dir: &std::path::Path, steps: usize) -> TrainConfig {
    let mut c = quick_config(dir, steps);
    c.data.demo_images = 6;
    c.data.flip_aug = true;
    c.data.color_aug = true;
    c.train.train_batch_size = 2;
    c.train.gradient_accumulation_steps = 2;
    c.train.noise_offset = 0.05;
    // Every extra noise draw and weight must replay in a resumed run too.
    c.train.multires_noise_iterations = 3;
    c.train.ip_noise_gamma = 0.1;
    c.train.noise_offset_random_strength = true;
    c.train.ip_noise_gamma_random_strength = true;
    c.train.debiased_estimation_loss = true;
    c.train.max_grad_norm = 0.05;
    c.train.text_encoder_lr = 5e-4;
    c.lora.dropout = 0.1;
    c.lora.rank = 4;
    c.lora.text_encoder_targets = sd_model::targets::TextEncoderTargets::Attn;
    c.output.save_precision = lora_core::SaveDtype::F32;
    c.output.save_every_n_epochs = 2;
    c
}

/// kohya's `color_aug` reaches the images the VAE encodes and changes nothing else: the
/// same run with it has the same losses up to the first step with a colour-changed
/// sample, and another one there; the LoRA records it.
#[test]
fn color_aug_changes_the_encoded_images() {
    let _guard = seeded();
    let config = |dir: &std::path::Path, color_aug: bool| {
        let mut c = quick_config(dir, 6);
        c.data.color_aug = color_aug;
        c
    };
    let run = |color_aug: bool| {
        let dir = tempfile::tempdir().unwrap();
        let out = train::<B>(&config(dir.path(), color_aug), &Default::default(), &mut |_| true).unwrap();
        (out.losses, lora_metadata(&out.lora)["ss_color_aug"].clone())
    };
    let (plain, plain_flag) = run(false);
    let (changed, flag) = run(true);
    assert_eq!((plain_flag.as_str(), flag.as_str()), ("False", "True"));
    // One batch per step: the steps' batches, epoch after epoch.
    let dir = tempfile::tempdir().unwrap();
    let dataset = trainer::train::open_dataset(&config(dir.path(), true)).unwrap();
    let coloured: Vec<bool> = (0..).flat_map(|e| dataset.plan_epoch(e)).take(6).map(|b| b.samples.iter().any(|s| s.color.is_some())).collect();
    let first = coloured.iter().position(|c| *c).expect("a colour-changed sample in 6 steps");
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&plain[..first]), bits(&changed[..first]), "before step {first}");
    assert_ne!(plain[first], changed[first], "at step {first}");
}

#[test]
fn ten_steps_resume_ten_steps_equals_twenty_steps_bit_for_bit() {
    let _guard = seeded();
    let straight_dir = tempfile::tempdir().unwrap();
    let mut batched = resume_config(straight_dir.path(), 20);
    // Read back only before the epoch saves (every fourth step) and at the end: batched
    // reads must change nothing against the runs below, which read every step.
    batched.output.log_interval_s = 1e9;
    let mut seen = vec![];
    let straight = train::<B>(&batched, &Default::default(), &mut |info| {
        seen.push(info.step);
        true
    })
    .unwrap();
    assert_eq!(seen, (1..=20).collect::<Vec<_>>());
    assert_eq!(straight.losses.len(), 20);
    // Epoch saves: 3 batches per epoch, 2 per step: an epoch is two steps (the second
    // takes the last batch alone, as sd-scripts' steps), so 20 steps are 10 epochs, the
    // last of which is the final save.
    assert!(straight_dir.path().join("demo_lora-000002.safetensors").is_file());
    assert!(straight_dir.path().join("demo_lora-000008.safetensors").is_file());
    assert!(!straight_dir.path().join("demo_lora-000010.safetensors").exists());

    let dir = tempfile::tempdir().unwrap();
    let config = resume_config(dir.path(), 20);
    // Stopped after step 10 as by Ctrl-C: the LoRA and the state are saved.
    let first = train::<B>(&config, &Default::default(), &mut |info| info.step < 10).unwrap();
    assert!(first.interrupted);
    let state = dir.path().join("state");
    assert!(state.join("state.json").is_file());
    let mut steps = vec![];
    let second = trainer::train::resume::<B>(&config, &state, &Default::default(), &mut |info| {
        steps.push(info.step);
        true
    })
    .unwrap();
    assert_eq!(steps, (11..=20).collect::<Vec<_>>());
    assert_eq!(second.losses.len(), 20);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&second.losses), bits(&straight.losses), "same losses, step for step");
    assert_same_lora(&straight.lora, &second.lora);
    let metrics = std::fs::read_to_string(&second.metrics).unwrap();
    assert_eq!(metrics.lines().count(), 20, "metrics.jsonl continues where it stopped");
    // Its times go on from the first part's (not from 0 again), its epochs count from 1.
    let lines: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let elapsed: Vec<f64> = lines.iter().map(|l| l["elapsed_s"].as_f64().unwrap()).collect();
    assert!(elapsed.windows(2).all(|w| w[0] <= w[1]) && elapsed[10] > elapsed[9], "{elapsed:?}");
    let epochs: Vec<u64> = lines.iter().map(|l| l["epoch"].as_u64().unwrap()).collect();
    assert_eq!((epochs[0], epochs[19]), (1, 10), "{epochs:?}");

    // Raising max_train_steps continues the finished run, here into another folder, which
    // receives the earlier metrics too.
    let more_dir = tempfile::tempdir().unwrap();
    let mut more = resume_config(more_dir.path(), 22);
    more.output.save_every_n_epochs = 0;
    let longer = trainer::train::resume::<B>(&more, &state, &Default::default(), &mut |_| true).unwrap();
    assert_eq!(longer.losses.len(), 22);
    assert_eq!(bits(&longer.losses[..20]), bits(&straight.losses), "the first 20 losses come from the earlier run");
    assert_eq!(std::fs::read_to_string(&longer.metrics).unwrap().lines().count(), 22);

    // A finished state cannot be resumed without raising max_train_steps, and the [lora]
    // section must match.
    let err = trainer::train::resume::<B>(&config, &state, &Default::default(), &mut |_| true).unwrap_err();
    assert!(err.to_string().contains("max_train_steps"), "{err}");
    let mut other = resume_config(dir.path(), 30);
    other.lora.rank = 8;
    let err = trainer::train::resume::<B>(&other, &state, &Default::default(), &mut |_| true).unwrap_err();
    assert!(err.to_string().contains("rank"), "{err}");
    let err = trainer::train::resume::<B>(&config, dir.path(), &Default::default(), &mut |_| true).unwrap_err();
    assert!(err.to_string().contains("state.json"), "{err}");

    // The data the state was trained on is recorded: the same data resumes without a
    // note, another batch size or other images are named.
    let same = trainer::train::training_datasets(&config).unwrap();
    assert_eq!(trainer::train::resume_data_changes(&state, &config, &same).unwrap(), Vec::<String>::new());
    let mut changed = resume_config(dir.path(), 30);
    changed.train.train_batch_size = 1;
    changed.data.demo_images += 1;
    let data = trainer::train::training_datasets(&changed).unwrap();
    let changes = trainer::train::resume_data_changes(&state, &changed, &data).unwrap();
    assert!(changes.iter().any(|c| c == "train.train_batch_size: 2 -> 1"), "{changes:?}");
    assert!(changes.iter().any(|c| c.starts_with("images: ")) && changes.iter().any(|c| c.starts_with("image contents and repeats: ")), "{changes:?}");
}

/// A small training state (one adapter tensor, no optimizer moments) at `step`.
fn small_state(dir: &std::path::Path, step: usize) -> trainer::state::TrainingState {
    use trainer::state::{RngStateJson, StateInfo, TrainingState, STATE_VERSION};
    let rng = RngStateJson { seed: "00".repeat(32), stream: 0, word_pos: "0".into() };
    let info = StateInfo {
        version: STATE_VERSION,
        step,
        epoch: 1,
        batch_in_epoch: 2,
        timestep_rng: rng.clone(),
        noise_rng: rng,
        loss_scale: 1.0,
        good_steps: 0,
        optimizer_time: [("unet.a.down".to_string(), step)].into(),
        fingerprint: "[lora]".into(),
        data: None,
    };
    let tensor = lora_core::HostTensor::new(vec![2], vec![1.0, step as f32]).unwrap();
    TrainingState { info, adapters: [("unet.a.down".to_string(), tensor)].into(), moments: Default::default(), dir: dir.to_path_buf() }
}

/// A save replaces the previous state and leaves no `.tmp` / `.old` folder behind. A save
/// killed between its two renames leaves only `state.old` (and `state.tmp`): `--resume
/// state` names them and says what to rename, and the renamed folder resumes.
#[test]
fn an_interrupted_state_save_is_named_on_resume() {
    use trainer::state::TrainingState;
    let out = tempfile::tempdir().unwrap();
    let state = out.path().join("state");
    small_state(&state, 3).save(&state).unwrap();
    small_state(&state, 4).save(&state).unwrap();
    let loaded = TrainingState::load(&state).unwrap();
    assert_eq!((loaded.info.step, loaded.adapters["unet.a.down"].data[1]), (4, 4.0));
    assert!(!out.path().join("state.old").exists() && !out.path().join("state.tmp").exists());

    // As if killed after `state` -> `state.old`, before `state.tmp` -> `state`.
    std::fs::rename(&state, out.path().join("state.old")).unwrap();
    let message = |dir: &std::path::Path| TrainingState::load(dir).err().map(|e| e.to_string()).unwrap_or_default();
    let err = message(&state);
    assert!(err.contains("state.old") && err.contains("rename it to") && !err.contains("state.tmp"), "{err}");
    small_state(&state, 5).save(&out.path().join("state.tmp")).unwrap();
    let err = message(&state);
    assert!(err.contains("state.old") && err.contains("state.tmp"), "{err}");
    // A `state` folder without state.json in the way is to be moved aside first.
    std::fs::create_dir(&state).unwrap();
    let err = message(&state);
    assert!(err.contains("aside") && err.contains("state.old"), "{err}");
    std::fs::remove_dir(&state).unwrap();
    std::fs::rename(out.path().join("state.old"), &state).unwrap();
    assert_eq!(TrainingState::load(&state).unwrap().info.step, 4);
    // Without a `.old` folder the message stays the plain one.
    let err = message(out.path());
    assert!(err.contains("no state.json") && !err.contains(".old"), "{err}");
}

/// Counters of a damaged or hand-edited `state.json` that no run reaches (and that would
/// overflow where they are counted on) are errors naming the file and the key.
#[test]
fn a_state_json_with_counters_no_run_reaches_is_refused() {
    use trainer::state::TrainingState;
    let out = tempfile::tempdir().unwrap();
    let state = out.path().join("state");
    let file = state.join("state.json");
    for (key, value, shown) in [
        ("epoch", serde_json::json!(u64::MAX), "`epoch`"),
        ("step", serde_json::json!(u64::MAX), "`step`"),
        ("batch_in_epoch", serde_json::json!(1u64 << 41), "`batch_in_epoch`"),
        ("good_steps", serde_json::json!(u64::MAX), "`good_steps`"),
        ("optimizer_time", serde_json::json!({"unet.a.down": u64::MAX}), "`optimizer_time.unet.a.down`"),
        ("loss_scale", serde_json::json!(-1.0), "`loss_scale`"),
    ] {
        small_state(&state, 3).save(&state).unwrap();
        let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
        json[key] = value;
        std::fs::write(&file, json.to_string()).unwrap();
        let err = TrainingState::load(&state).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("state.json") && err.contains(shown), "{key}: {err}");
    }
    // The largest counters a state may hold still load.
    small_state(&state, trainer::config::MAX_TRAIN_STEPS).save(&state).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    json["epoch"] = serde_json::json!(trainer::state::MAX_STATE_COUNT);
    std::fs::write(&file, json.to_string()).unwrap();
    assert_eq!(TrainingState::load(&state).unwrap().info.epoch, trainer::state::MAX_STATE_COUNT);
}

/// A resumed run that fails before its first save (here it diverges) leaves the earlier
/// `config.toml`, which belongs to the LoRA and state still there; one that saves
/// replaces it.
#[test]
fn config_toml_is_replaced_only_with_a_save() {
    let _guard = seeded();
    let dir = tempfile::tempdir().unwrap();
    let mut config = quick_config(dir.path(), 3);
    config.output.sample_prompts.clear();
    train::<B>(&config, &Default::default(), &mut |_| true).unwrap();
    let written = || TrainConfig::load(Some(&dir.path().join("config.toml")), &[]).unwrap();
    assert_eq!(written(), config);
    let state = dir.path().join("state");
    let mut diverging = config.clone();
    diverging.train.max_train_steps = 6;
    diverging.train.learning_rate = 1e30;
    let err = trainer::train::resume::<B>(&diverging, &state, &Default::default(), &mut |_| true).unwrap_err();
    assert!(matches!(err, TrainError::NonFinite { .. }), "{err}");
    assert_eq!(written(), config, "the failed run's settings are not the state's");
    let mut longer = config.clone();
    longer.train.max_train_steps = 4;
    trainer::train::resume::<B>(&longer, &state, &Default::default(), &mut |_| true).unwrap();
    assert_eq!(written(), longer);

    // A new run over it (what `--overwrite` allows) that fails before saving keeps the
    // earlier run's metrics too; one that saves has only its own.
    let metrics = || std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let earlier = metrics();
    assert_eq!(earlier.lines().count(), 4);
    let mut fresh = diverging.clone();
    fresh.train.max_train_steps = 3;
    let err = train::<B>(&fresh, &Default::default(), &mut |_| true).unwrap_err();
    assert!(matches!(err, TrainError::NonFinite { .. }), "{err}");
    assert!(metrics().starts_with(&earlier) && written() == longer, "{}", metrics());
    train::<B>(&config, &Default::default(), &mut |_| true).unwrap();
    let steps: Vec<u64> = metrics().lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap()).collect();
    assert_eq!((steps, written()), (vec![1, 2, 3], config));
}

/// A resume with a larger batch, whose epochs end before the state's place in its epoch,
/// goes on from the next epoch's start (it was an error, though the docs allow the change).
#[test]
fn a_resume_past_a_shorter_epoch_goes_on_from_the_next() {
    let _guard = seeded();
    let dir = tempfile::tempdir().unwrap();
    let mut config = resume_config(dir.path(), 14);
    config.train.gradient_accumulation_steps = 1;
    // Spread over the demo's three buckets: more batches at 2 per batch than at 6.
    config.data.demo_images = 12;
    let batches = trainer::train::open_dataset(&config).unwrap().plan_epoch(0).len();
    // Stopped one batch before an epoch's end: its place is batch `batches - 1`.
    let stop = batches + batches - 1;
    let first = train::<B>(&config, &Default::default(), &mut |info| info.step < stop).unwrap();
    assert!(first.interrupted);
    let state = dir.path().join("state");
    let mut larger = config.clone();
    larger.train.train_batch_size = 6;
    let now = trainer::train::open_dataset(&larger).unwrap().plan_epoch(0).len();
    assert!(now < batches - 1, "{now} batches per epoch now, {batches} before");
    let mut steps = vec![];
    let report = trainer::train::resume::<B>(&larger, &state, &Default::default(), &mut |info| {
        steps.push(info.step);
        true
    })
    .unwrap();
    assert_eq!(steps, (stop + 1..=14).collect::<Vec<_>>());
    let metrics = std::fs::read_to_string(&report.metrics).unwrap();
    let line: serde_json::Value = serde_json::from_str(metrics.lines().nth(stop).unwrap()).unwrap();
    assert_eq!((line["step"].as_u64(), line["epoch"].as_u64()), (Some(stop as u64 + 1), Some(3)), "epoch 2 was cut short: {line}");
}

/// kohya's `initial_step` / `initial_epoch`: a run without a state starts part-way, at
/// the batch the steps before it would have used, with the step count, the epoch numbers
/// of saves and samples and the learning-rate schedule going on from there; a start at or
/// past the end is refused before anything is written.
#[test]
fn initial_epoch_and_step_start_a_run_part_way() {
    let _guard = seeded();
    // 6 images in batches of 2 (3 per epoch), 2 per step: an epoch is a step of two batches
    // and one of the last batch alone (sd-scripts' steps), ending in steps 2, 4, 6.
    let config = |dir: &std::path::Path| {
        let mut c = quick_config(dir, 6);
        c.data.demo_images = 6;
        c.train.train_batch_size = 2;
        c.train.gradient_accumulation_steps = 2;
        c.train.lr_warmup_steps = 0;
        c.output.save_every_n_epochs = 1;
        c.output.sample_at_first = true;
        c
    };
    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    let dataset = trainer::train::open_dataset(&c).unwrap();
    assert_eq!(dataset.plan_epoch(0).len(), 3);
    let at = |c: &TrainConfig| {
        let p = trainer::train::initial_progress(c, &dataset).unwrap();
        (p.step, p.epoch, p.batch_in_epoch)
    };
    assert_eq!(at(&c), (0, 0, 0));
    c.train.initial_epoch = 1;
    assert_eq!(at(&c), (0, 0, 0), "epoch 1 is the first");
    c.train.initial_epoch = 3;
    assert_eq!(at(&c), (4, 2, 0), "two epochs of ⌈3 / 2⌉ steps");
    c.train.initial_step = 3;
    assert_eq!(at(&c), (3, 1, 2), "one epoch of two steps, then a step of two batches; initial_step wins");
    c.train.initial_step = 4;
    assert_eq!(at(&c), (4, 2, 0), "two epochs of two steps");
    c.train.initial_step = 6;
    let err = trainer::train::initial_progress(&c, &dataset).unwrap_err().to_string();
    assert!(err.contains("train.initial_step") && err.contains("max_train_steps = 6"), "{err}");
    c.train.initial_step = 0;
    c.train.initial_epoch = 5;
    let err = trainer::train::initial_progress(&c, &dataset).unwrap_err().to_string();
    assert!(err.contains("train.initial_epoch") && err.contains("its first step is 8"), "{err}");
    // Far starts are counted, not walked epoch by epoch (this once planned 10⁹ epochs).
    c.train.initial_epoch = 0;
    c.train.max_train_steps = 4_000_000_002;
    c.train.initial_step = 4_000_000_001;
    assert_eq!(at(&c), (4_000_000_001, 2_000_000_000, 2), "2·10⁹ epochs of two steps, and a step of two batches");
    c.train.initial_step = 0;
    c.train.initial_epoch = usize::MAX;
    let err = trainer::train::initial_progress(&c, &dataset).unwrap_err().to_string();
    assert!(err.contains("train.initial_epoch") && err.contains(&format!("its first step is {}", (usize::MAX as u128 - 1) * 2)), "{err}");
    c.train.initial_epoch = 5;
    c.train.max_train_steps = 6;
    // Refused before the output folder is made.
    let unwritten = dir.path().join("never");
    c.output.output_dir = unwritten.clone();
    assert!(train::<B>(&c, &Default::default(), &mut |_| true).is_err());
    assert!(!unwritten.exists());

    let dir = tempfile::tempdir().unwrap();
    let mut c = config(dir.path());
    c.train.initial_epoch = 2;
    let mut seen = vec![];
    let report = train::<B>(&c, &Default::default(), &mut |info| {
        seen.push((info.step, info.lr));
        true
    })
    .unwrap();
    let expected: Vec<(usize, f64)> = (3..=6).map(|s| (s, trainer::train::learning_rate(&c.train, s - 1))).collect();
    assert_eq!(seen, expected, "steps 3 to 6 at the schedule's rates there");
    assert!(seen[0].1 < c.train.learning_rate, "the cosine schedule is past its peak at step 3");
    assert_eq!(report.losses.len(), 4);
    let metrics = std::fs::read_to_string(&report.metrics).unwrap();
    let first: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
    assert_eq!((first["step"].as_u64(), first["epoch"].as_u64()), (Some(3), Some(2)), "{first}");
    assert_eq!(metrics.lines().count(), 4);
    let out = dir.path();
    assert!(out.join("samples-step000002.png").is_file(), "sample_at_first names the start step");
    assert!(!out.join("samples-step000000.png").exists());
    assert!(!out.join("demo_lora-000001.safetensors").exists(), "epoch 1 was skipped");
    assert!(out.join("demo_lora-000002.safetensors").is_file(), "epoch 2 ends in step 4");
    assert_eq!(lora_metadata(&report.lora)["ss_steps"], "6");
}

#[test]
fn half_precision_bases_train_f32_adapters() {
    let _guard = seeded();
    for precision in [trainer::config::MixedPrecision::Bf16, trainer::config::MixedPrecision::Fp16] {
        let dir = tempfile::tempdir().unwrap();
        let mut config = quick_config(dir.path(), 3);
        config.train.mixed_precision = precision;
        config.lora.text_encoder_targets = sd_model::targets::TextEncoderTargets::Attn;
        config.output.save_precision = lora_core::SaveDtype::F32;
        let report = train::<B>(&config, &Default::default(), &mut |_| true).unwrap();
        assert!(report.losses.iter().all(|l| l.is_finite()), "{precision:?}: {:?}", report.losses);
        let (set, _) = AdapterSet::load(&report.lora, &tiny_index(), ReadOptions { lenient: true }).unwrap();
        assert!(set.iter().any(|(_, w)| w.up.data.iter().any(|v| *v != 0.0)), "{precision:?}: adapters were updated");
        // An f32 file holds the optimizer's f32 values, not the models' half-precision copies.
        let rounds = |v: f32| match precision {
            trainer::config::MixedPrecision::Fp16 => burn::tensor::f16::from_f32(v).to_f32() != v,
            _ => burn::tensor::bf16::from_f32(v).to_f32() != v,
        };
        for (key, w) in set.iter() {
            assert!(w.down.data.iter().chain(&w.up.data).any(|v| rounds(*v)), "{precision:?}: {key} holds rounded values only");
        }
        let metrics = std::fs::read_to_string(&report.metrics).unwrap();
        let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
        let scale = last["loss_scale"].as_f64().unwrap();
        match precision {
            trainer::config::MixedPrecision::Fp16 => assert!(scale > 1.0, "f16 scales the loss"),
            _ => assert_eq!(scale, 1.0),
        }
    }
}

#[test]
fn gradient_checkpointing_trains_the_same_way() {
    let _guard = seeded();
    let dir = tempfile::tempdir().unwrap();
    let mut config = quick_config(dir.path(), 3);
    // The text encoder too: its gradient comes back through the checkpointed UNet.
    config.lora.text_encoder_targets = sd_model::targets::TextEncoderTargets::Attn;
    let plain = train::<B>(&config, &Default::default(), &mut |_| true).unwrap();
    let plain_lora = std::fs::read(&plain.lora).unwrap();
    config.train.gradient_checkpointing = true;
    let checkpointed = train::<B>(&config, &Default::default(), &mut |_| true).unwrap();
    assert_eq!(plain.losses.len(), 3);
    for (a, b) in plain.losses.iter().zip(&checkpointed.losses) {
        assert!((a - b).abs() <= 1e-4 * a.abs(), "losses {:?} vs {:?}", plain.losses, checkpointed.losses);
    }
    // The trained adapters (UNet and text encoder) agree to rounding.
    let index = tiny_index_with_text_encoder();
    let (a, _) = AdapterSet::from_bytes(&plain_lora, &plain.lora, &index, ReadOptions::default()).unwrap();
    let (b, _) = AdapterSet::load(&checkpointed.lora, &index, ReadOptions::default()).unwrap();
    let mut compared = 0;
    for ((ka, wa), (kb, wb)) in a.iter().zip(b.iter()) {
        assert_eq!(ka, kb);
        for (x, y) in [(&wa.up.data, &wb.up.data), (&wa.down.data, &wb.down.data)] {
            // AdamW's first steps move each weight by about ±lr whatever the gradient's
            // size, so rounding-level gradient differences show up relative to the tensor.
            let peak = x.iter().fold(0f32, |m, v| m.max(v.abs()));
            let diff = x.iter().zip(y.iter()).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(diff <= 1e-3 * peak, "{ka:?}: {diff} of {peak}");
        }
        compared += 1;
    }
    assert!(compared > 0 && a.iter().any(|(k, _)| k.component == lora_core::Component::TextEncoder), "{compared} adapters");
}

/// Writes a 64-pixel PNG with a caption file next to it.
fn write_image(dir: &std::path::Path, name: &str, caption: &str, shade: u8) {
    std::fs::create_dir_all(dir).unwrap();
    let img = image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([shade, (x * 4) as u8, (y * 4) as u8]));
    img.save(dir.join(format!("{name}.png"))).unwrap();
    std::fs::write(dir.join(format!("{name}.txt")), caption).unwrap();
}

/// `data.face_crop_aug_range` (kohya's), without buckets: an image named by its face's box
/// is scaled anew each epoch so that the face's larger side is `1/hi` to `1/lo` of the
/// resolution (never enlarged) and cropped around the face, other images crop as usual;
/// the run trains (with loss masks, encoded per sample) and records the range; with
/// buckets, on the demo data, or with a bad range it is a config error, and a name of five
/// parts that is no face box is an error naming the file.
#[test]
fn face_crop_scales_and_crops_around_named_faces() {
    let _guard = seeded();
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("faces");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, shade) in [("alice_120_40_40_48", 30u8), ("plain", 200)] {
        let img = image::RgbImage::from_fn(160, 128, |x, y| image::Rgb([shade, x as u8, y as u8]));
        img.save(dir.join(format!("{name}.png"))).unwrap();
        std::fs::write(dir.join(format!("{name}.txt")), "a face").unwrap();
    }
    let mut config = quick_config(&root.path().join("out"), 3);
    config.data.train_data_dir = dir.display().to_string();
    config.data.enable_bucket = false;
    config.data.face_crop_aug_range = Some([1.0, 2.0]);
    config.data.alpha_mask = true;
    config.train.train_batch_size = 2;
    config.output.sample_prompts.clear();
    let dataset = trainer::train::open_dataset(&config).unwrap();
    assert!(dataset.has_face_crop());
    let mut scales = std::collections::BTreeSet::new();
    for epoch in 0..8 {
        for s in dataset.plan_epoch(epoch).iter().flat_map(|b| b.samples.iter()) {
            let face = dataset.image_path(s.image).to_string_lossy().contains("alice");
            assert_eq!(dataset.face_crop(s.image), face);
            if !face {
                assert_eq!((s.resized, s.crop), ((80, 64), (8, 0)), "the usual centre crop");
                continue;
            }
            // The face's 48 px become 32 to 64: a scale of 2/3 to 1 (never above).
            let scale = f64::from(s.resized.0) / 160.0;
            assert!((0.66..=1.001).contains(&scale), "{s:?}");
            // Centred on the face where the borders allow, moved by at most 48/20 px.
            let (cx, cy) = (120.0 * scale, 40.0 * scale);
            let want = ((cx - 32.0).clamp(0.0, f64::from(s.resized.0) - 64.0), (cy - 32.0).clamp(0.0, f64::from(s.resized.1) - 64.0));
            assert!((f64::from(s.crop.0) - want.0).abs() <= 4.0 && (f64::from(s.crop.1) - want.1).abs() <= 4.0, "{s:?} vs {want:?}");
            scales.insert(s.resized.0);
        }
    }
    assert!(scales.len() > 2, "a new scale each epoch: {scales:?}");
    let report = train::<B>(&config, &Default::default(), &mut |_| true).unwrap();
    assert!(report.losses.len() == 3 && report.losses.iter().all(|l| l.is_finite()), "{:?}", report.losses);
    assert_eq!(lora_metadata(&report.lora)["ss_face_crop_aug_range"], "(1.0, 2.0)");

    for (edit, expect) in [
        (&(|c: &mut TrainConfig| c.data.enable_bucket = true) as &dyn Fn(&mut TrainConfig), "data.enable_bucket = false"),
        (&|c: &mut TrainConfig| c.data.train_data_dir = "demo".into(), "demo"),
        (&|c: &mut TrainConfig| c.data.face_crop_aug_range = Some([2.0, 1.0]), "lo <= hi"),
    ] {
        let mut c = config.clone();
        edit(&mut c);
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("data.face_crop_aug_range") && err.contains(expect), "{expect}: {err}");
    }
    image::RgbImage::new(64, 64).save(dir.join("x_a_b_c_d.png")).unwrap();
    std::fs::write(dir.join("x_a_b_c_d.txt"), "no face").unwrap();
    let err = trainer::train::open_dataset(&config).map(|_| ()).unwrap_err().to_string();
    assert!(err.contains("x_a_b_c_d.png") && err.contains("_cx_cy_w_h"), "{err}");
}

#[test]
fn kohya_folders_repeats_regularization_and_caption_options() {
    let root = tempfile::tempdir().unwrap();
    let train_dir = root.path().join("train");
    write_image(&train_dir.join("5_mystyle"), "a", "mystyle, red, circle, field", 10);
    write_image(&train_dir.join("5_mystyle"), "b", "mystyle, blue, square, sky", 200);
    write_image(&root.path().join("reg/1_style"), "r", "a picture", 90);

    let mut config = TrainConfig::default();
    config.data.train_data_dir = train_dir.display().to_string();
    config.data.reg_data_dir = root.path().join("reg").display().to_string();
    config.data.prior_loss_weight = 0.5;
    config.data.resolution = sd_data::Resolution::square(64);
    config.data.min_bucket_reso = 32;
    config.data.max_bucket_reso = 128;
    config.data.bucket_reso_steps = 16;
    config.data.shuffle_caption = true;
    config.data.keep_tokens = 1;
    config.train.train_batch_size = 1;
    let dataset = trainer::train::open_dataset(&config).unwrap();
    let samples: Vec<_> = (0..3).flat_map(|e| dataset.plan_epoch(e)).flat_map(|p| p.samples).collect();
    let train: Vec<_> = samples.iter().filter(|s| s.loss_weight == 1.0).collect();
    let reg: Vec<_> = samples.iter().filter(|s| s.loss_weight == 0.5).collect();
    // The `5_` folder's repeats count (num_repeats only applies to plain folders).
    assert_eq!(train.len(), 3 * 2 * 5);
    assert!(!reg.is_empty(), "regularization images are planned with prior_loss_weight");
    assert!(train.iter().all(|s| s.caption.starts_with("mystyle")), "keep_tokens keeps the trigger first");
    let orders: std::collections::HashSet<&str> = train.iter().filter(|s| s.caption.contains("red")).map(|s| s.caption.as_str()).collect();
    assert!(orders.len() > 1, "shuffle_caption varies the tag order: {orders:?}");

    // kohya's caption prefix and suffix and the keep-tokens separator reach the samples.
    write_image(&train_dir.join("5_mystyle"), "c", "mystyle ||| green, hexagon ||| flat colours", 120);
    let mut framed = config.clone();
    (framed.data.caption_prefix, framed.data.caption_suffix) = ("by artist,".into(), ", masterpiece".into());
    framed.data.keep_tokens_separator = "|||".into();
    let dataset = trainer::train::open_dataset(&framed).unwrap();
    let captions: Vec<String> = (0..3).flat_map(|e| dataset.plan_epoch(e)).flat_map(|p| p.samples).filter(|s| s.loss_weight == 1.0).map(|s| s.caption).collect();
    // The prefix is the first tag, which keep_tokens = 1 keeps first; elsewhere the suffix is
    // just another tag to shuffle, as in kohya.
    assert!(captions.iter().all(|c| c.starts_with("by artist, ") && c.contains("masterpiece")), "{captions:?}");
    let hexagon: Vec<&String> = captions.iter().filter(|c| c.contains("hexagon")).collect();
    assert!(!hexagon.is_empty() && hexagon.iter().all(|c| c.starts_with("by artist, mystyle, ") && c.ends_with(", flat colours, masterpiece") && !c.contains("|||")), "{hexagon:?}");

    // A plain folder takes num_repeats; a missing reg folder is a typed error naming it.
    let plain = root.path().join("plain");
    write_image(&plain, "p", "x", 5);
    config.data.train_data_dir = plain.display().to_string();
    config.data.reg_data_dir = String::new();
    config.data.num_repeats = 3;
    let per_epoch: usize = trainer::train::open_dataset(&config).unwrap().plan_epoch(0).iter().map(|p| p.samples.len()).sum();
    assert_eq!(per_epoch, 3);
    config.data.reg_data_dir = root.path().join("nope").display().to_string();
    let Err(err) = trainer::train::open_dataset(&config) else { panic!("a missing reg folder must be an error") };
    assert!(err.to_string().contains("nope"), "{err}");
    // An empty one is named in the data summary, not skipped without a word.
    let empty = root.path().join("empty-reg");
    std::fs::create_dir_all(&empty).unwrap();
    config.data.reg_data_dir = empty.display().to_string();
    let data = trainer::train::training_datasets(&config).unwrap();
    let summary = trainer::train::data_summary(&config, &data).unwrap();
    assert!(summary.contains("empty-reg holds no usable images"), "{summary}");
}

/// A non-square `data.resolution` (kohya's `"width,height"`): without buckets every image
/// trains at that size, the samples and metadata take it; a size the model cannot take is
/// a config error naming the key before any step; every spelling reads width first.
#[test]
fn non_square_resolution_trains_at_its_size() {
    let _guard = seeded();
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    write_image(&data, "a", "mystyle, red", 10);
    write_image(&data, "b", "mystyle, blue", 200);
    let mut config = quick_config(&root.path().join("out"), 2);
    config.data.train_data_dir = data.display().to_string();
    config.data.resolution = sd_data::Resolution { width: 32, height: 48 };
    config.data.enable_bucket = false;
    config.train.train_batch_size = 2;
    config.output.sample_prompts.truncate(1);
    let dataset = trainer::train::open_dataset(&config).unwrap();
    assert_eq!(dataset.bucket_table().keys().copied().collect::<Vec<_>>(), vec![(32, 48)]);
    let report = train::<B>(&config, &Default::default(), &mut |_| true).unwrap();
    assert!(report.losses.iter().all(|l| l.is_finite()));
    let grid = image::open(report.sample_grid.unwrap()).unwrap();
    assert_eq!((grid.width(), grid.height()), (32, 48));
    let meta = lora_metadata(&report.lora);
    assert_eq!((meta["ss_resolution"].as_str(), meta["modelspec.resolution"].as_str()), ("(32, 48)", "32x48"));
    // The written config reads back as it was.
    let written = TrainConfig::load(Some(&report.config), &[]).unwrap();
    assert_eq!(written.data.resolution, config.data.resolution);

    // The tiny model takes multiples of 8 pixels: 44 fails before any step, naming the key.
    config.data.resolution = sd_data::Resolution { width: 32, height: 44 };
    config.output.output_dir = root.path().join("bad");
    let e = train::<B>(&config, &Default::default(), &mut |_| panic!("no step may run")).unwrap_err().to_string();
    assert!(e.contains("data.resolution") && e.contains("32x44") && e.contains("multiples of 8"), "{e}");
    assert!(!root.path().join("bad/metrics.jsonl").exists());
    // Nothing that counts as an earlier run is left: the corrected retry needs no --overwrite.
    assert_eq!(trainer::train::earlier_outputs(&config), Vec::<std::path::PathBuf>::new());

    for text in ["[32, 48]", "\"32,48\"", "\"(32, 48)\""] {
        let c = TrainConfig::load(None, &[format!("data.resolution={text}")]).unwrap();
        assert_eq!(c.data.resolution, sd_data::Resolution { width: 32, height: 48 }, "{text}");
    }
    for text in ["0", "[32]", "\"32x48\"", "32.5", "[32, 0]"] {
        let e = TrainConfig::load(None, &[format!("data.resolution={text}")]).unwrap_err().to_string();
        assert!(e.contains("resolution"), "{text}: {e}");
    }
}

/// A plain folder's data settings are named as `[data]` keys (there is no dataset config
/// to blame), and `data.min_image_size` sets the smallest side an image may have.
#[test]
fn folder_settings_are_named_as_data_keys() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    write_image(&data, "a", "mystyle", 10);
    let mut config = quick_config(&root.path().join("out"), 1);
    config.data.train_data_dir = data.display().to_string();
    config.data.min_bucket_reso = 128;
    let e = trainer::train::open_dataset(&config).unwrap_err().to_string();
    assert!(e.starts_with("data.resolution: ") && e.contains("min_bucket_reso (128)") && !e.contains("dataset config"), "{e}");
    // The tiny models scale the bucket keys' defaults to the resolution, as the demo's.
    (config.data.min_bucket_reso, config.data.max_bucket_reso, config.data.bucket_reso_steps) = trainer::config::DataSection::default_buckets();
    assert_eq!(trainer::train::open_dataset(&config).unwrap().images().len(), 1);
    config.model.pretrained = "tiny-sdxl".into();
    assert_eq!(trainer::train::open_dataset(&config).unwrap().images().len(), 1);
    config.model.pretrained = "tiny".into();
    config.data.min_bucket_reso = 64;
    config.data.min_image_size = 65;
    let e = trainer::train::open_dataset(&config).unwrap_err().to_string();
    assert!(e.contains("a.png") && e.contains("minimum side of 65 px (min_image_size)"), "{e}");
    config.data.min_image_size = 64;
    assert_eq!(trainer::train::open_dataset(&config).unwrap().images().len(), 1);
    // A setting of the folder's subset is the [data] key of its name, not `subsets[0]`'s.
    config.data.caption_extension = "txt".into();
    let e = trainer::train::open_dataset(&config).unwrap_err().to_string();
    assert!(e.starts_with("data.caption_extension: ") && !e.contains("subsets["), "{e}");
    config.data.caption_extension = ".txt".into();
    // An output folder inside the data would train on its own sample grids next time.
    config.output.output_dir = data.join("out");
    let e = trainer::train::open_dataset(&config).unwrap_err().to_string();
    assert!(e.starts_with("output.output_dir: ") && e.contains("inside the image folder"), "{e}");
}

/// `data.in_json` (sd-scripts' `--in_json`): the metadata's entries are the training
/// images, `data.num_repeats` times, with their captions and tags; the run names the file
/// in `ss_dataset_dirs` as sd-scripts does.
#[test]
fn fine_tuning_metadata_trains_on_its_entries() {
    let _guard = seeded();
    let root = tempfile::tempdir().unwrap();
    let images = root.path().join("images");
    write_image(&images, "a", "ignored caption file", 10);
    write_image(&images, "b", "ignored", 200);
    write_image(&images, "unlisted", "not in the metadata", 120);
    let meta = root.path().join("meta_cap_dd.json");
    std::fs::write(&meta, r#"{"a": {"caption": "a red field", "tags": "red, field"}, "b.png": {"tags": "blue, sky"}}"#).unwrap();
    let mut config = quick_config(&root.path().join("out"), 2);
    config.data.train_data_dir = images.display().to_string();
    config.data.in_json = meta.display().to_string();
    config.data.num_repeats = 2;
    config.output.sample_prompts.clear();
    config.validate().unwrap();
    let dataset = trainer::train::open_dataset(&config).unwrap();
    let mut captions: Vec<&str> = dataset.images().iter().map(|i| i.caption.as_str()).collect();
    captions.sort();
    assert_eq!(captions, ["a red field,red, field", "blue, sky"]);
    let folders = dataset.folders();
    assert_eq!((folders[0].name.as_str(), folders[0].num_repeats, folders[0].images), ("meta_cap_dd.json", 2, 2));
    let report = train::<B>(&config, &Default::default(), &mut |_| true).unwrap();
    let metadata = lora_metadata(&report.lora);
    assert!(metadata["ss_dataset_dirs"].contains("meta_cap_dd.json"), "{metadata:?}");
    config.data.in_json = root.path().join("nope.json").display().to_string();
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("data.in_json") && err.contains("nope.json"), "{err}");
    // It names the images itself: not with the demo data or a dataset config.
    config.data.in_json = meta.display().to_string();
    config.data.train_data_dir = "demo".into();
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("data.in_json"), "{err}");
}

/// `data.dataset_config` with kohya's TOML: sd-scripts' precedence (subset over dataset
/// over `[general]` over the `[data]` section), its folder reading (a subset's own images,
/// `num_repeats` times), one batch size with `[train]`; a JSON config replaces the default
/// demo data too. The run trains on the file's folders.
#[test]
fn kohya_dataset_config_toml_trains_on_its_subsets() {
    let _guard = seeded();
    let root = tempfile::tempdir().unwrap();
    let style = root.path().join("img/style");
    write_image(&style, "a", "red, circle", 10);
    write_image(&style, "b", "blue, square", 200);
    // sd-scripts reads a subset's folder itself, not its sub-folders.
    write_image(&style.join("old"), "c", "old, picture", 120);
    write_image(&root.path().join("img/reg"), "r", "a picture", 90);
    let toml = root.path().join("dataset.toml");
    let text = format!(
        "[general]\nkeep_tokens = 1\ncaption_prefix = \"mystyle,\"\n\n[[datasets]]\nresolution = 64\nmin_bucket_reso = 32\nmax_bucket_reso = 128\nbucket_reso_steps = 16\nbatch_size = 2\nshuffle_caption = true\n\n  [[datasets.subsets]]\n  image_dir = {:?}\n  num_repeats = 3\n\n  [[datasets.subsets]]\n  image_dir = {:?}\n  is_reg = true\n  shuffle_caption = false\n",
        style.display().to_string(),
        root.path().join("img/reg").display().to_string()
    );
    std::fs::write(&toml, text).unwrap();
    let mut config = quick_config(&root.path().join("out"), 2);
    config.data.dataset_config = toml.display().to_string();
    config.data.prior_loss_weight = 0.5;
    config.data.flip_aug = true;
    config.train.train_batch_size = 2;
    config.output.sample_prompts.clear();
    let dataset = trainer::train::open_dataset(&config).unwrap();
    let folders = dataset.folders();
    assert_eq!(folders.iter().map(|f| (f.num_repeats, f.images, f.is_reg)).collect::<Vec<_>>(), vec![(3, 2, false), (1, 1, true)], "{folders:?}");
    let subsets = &dataset.config().subsets;
    // [data] gives what the file leaves out (flip_aug), [general] what the datasets leave
    // out (keep_tokens, caption_prefix), the dataset what its subsets leave out.
    assert!(subsets.iter().all(|s| s.flip_aug && s.keep_tokens == 1 && s.caption_prefix.as_deref() == Some("mystyle,")));
    assert_eq!((subsets[0].shuffle_caption, subsets[1].shuffle_caption), (true, false));
    assert_eq!(dataset.config().resolution.width, 64);
    let samples: Vec<_> = dataset.plan_epoch(0).into_iter().flat_map(|p| p.samples).collect();
    assert!(samples.iter().all(|s| s.caption.starts_with("mystyle, ")), "{samples:?}");
    // As in sd-scripts, regularization images repeat to match the 2 x 3 training samples.
    assert_eq!(samples.iter().filter(|s| s.loss_weight == 0.5).count(), 6);
    let report = train::<B>(&config, &Default::default(), &mut |_| true).unwrap();
    assert_eq!(report.losses.len(), 2);
    let meta = lora_metadata(&report.lora);
    assert!(meta["ss_dataset_dirs"].contains("style") && meta["ss_reg_dataset_dirs"].contains("reg"), "{meta:?}");

    // One batch size: the file's must agree with [train]'s.
    config.train.train_batch_size = 1;
    let Err(err) = trainer::train::open_dataset(&config) else { panic!("batch sizes that differ must be an error") };
    assert!(err.to_string().contains("batch_size = 2") && err.to_string().contains("train.train_batch_size"), "{err}");
    // sd-scripts options this trainer lacks are named.
    std::fs::write(&toml, "[[datasets]]\n  [[datasets.subsets]]\n  image_dir = \"x\"\n  custom_attributes = { a = 1 }\n").unwrap();
    let Err(err) = trainer::train::open_dataset(&config) else { panic!("custom attributes other than diff_output_preservation must be refused") };
    assert!(err.to_string().contains("dataset.toml") && err.to_string().contains("datasets[0].subsets[0].custom_attributes"), "{err}");

    // A JSON config replaces the default demo data as well.
    let json = root.path().join("dataset.json");
    std::fs::write(&json, format!("{{\"subsets\": [{{\"image_dir\": {:?}, \"recursive\": false}}], \"resolution\": 64, \"min_bucket_reso\": 32, \"bucket_reso_steps\": 16}}", style.display().to_string())).unwrap();
    config.data.dataset_config = json.display().to_string();
    let dataset = trainer::train::open_dataset(&config).unwrap();
    assert_eq!(dataset.images().len(), 2);
}

/// kohya's differential output preservation (`custom_attributes = {
/// diff_output_preservation = true }` on a subset): a kept sample's target is the model's
/// own prediction without its adapters, so with fresh adapters (which add nothing) its
/// first-step loss is 0. With one image per subset in a batch of two, the plain run's
/// first loss is then the sum of the runs that keep one subset each. Keeping every
/// subset is an error (nothing would train).
#[test]
fn differential_output_preservation_targets_the_model_without_adapters() {
    let _guard = seeded();
    let root = tempfile::tempdir().unwrap();
    let (a, b) = (root.path().join("a"), root.path().join("b"));
    write_image(&a, "a", "a woman", 40);
    write_image(&b, "b", "mystyle, a woman", 220);
    let toml = root.path().join("dataset.toml");
    let subset = |dir: &std::path::Path, keep: bool| {
        let attributes = if keep { "  custom_attributes = { diff_output_preservation = true }\n" } else { "" };
        format!("  [[datasets.subsets]]\n  image_dir = {:?}\n{attributes}", dir.display().to_string())
    };
    let first_loss = |keep_a: bool, keep_b: bool| {
        std::fs::write(&toml, format!("[[datasets]]\n{}{}", subset(&a, keep_a), subset(&b, keep_b))).unwrap();
        let mut config = quick_config(&root.path().join("out"), 1);
        config.data.dataset_config = toml.display().to_string();
        config.train.train_batch_size = 2;
        config.output.sample_prompts.clear();
        let data = trainer::train::training_datasets(&config)?;
        let summary = trainer::train::data_summary(&config, &data)?;
        assert_eq!(summary.contains("1 samples per epoch keep the model's output"), keep_a || keep_b, "{summary}");
        let report = trainer::train::train_on::<B>(&config, data, &Default::default(), &mut |_| true)?;
        Ok::<f32, trainer::TrainError>(report.losses[0])
    };
    let plain = first_loss(false, false).unwrap();
    let (kept_a, kept_b) = (first_loss(true, false).unwrap(), first_loss(false, true).unwrap());
    assert!(kept_a > 0.0 && kept_b > 0.0 && plain > 0.0);
    assert!((plain - (kept_a + kept_b)).abs() <= 1e-5 * plain, "{plain} vs {kept_a} + {kept_b}");
    let err = first_loss(true, true).unwrap_err().to_string();
    assert!(err.contains("diff_output_preservation") && err.contains("learn nothing"), "{err}");
}

/// kohya's `sample_every_n_epochs`: a grid at the end of every N-th epoch, replacing the
/// grids by steps.
#[test]
fn sample_grids_every_n_epochs_replace_those_every_n_steps() {
    let _guard = seeded();
    let dir = tempfile::tempdir().unwrap();
    let mut config = quick_config(dir.path(), 1);
    config.output.sample_prompts.truncate(1);
    config.output.sample_steps = 2;
    let batches = trainer::train::open_dataset(&config).unwrap().plan_epoch(0).len();
    // Two epochs and one step into the third: grids after epochs 1 and 2, none by step.
    config.train.max_train_steps = 2 * batches + 1;
    config.output.sample_every_n_steps = 1;
    config.output.sample_every_n_epochs = 1;
    train::<B>(&config, &Default::default(), &mut |_| true).unwrap();
    let mut grids: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("samples"))
        .collect();
    grids.sort();
    assert_eq!(grids, ["samples-epoch0001.png", "samples-epoch0002.png", "samples.png"]);
}

#[test]
fn prodigy_trains_and_resumes_bit_for_bit() {
    let _guard = seeded();
    let prodigy = |dir: &std::path::Path, steps: usize| {
        let mut c = resume_config(dir, steps);
        c.train.optimizer = trainer::config::Optimizer::Prodigy;
        c.train.learning_rate = 1.0;
        c.train.text_encoder_lr = 0.5;
        c.train.adam_weight_decay = 0.0;
        c.train.prodigy_use_bias_correction = true;
        c.train.prodigy_safeguard_warmup = true;
        c.output.save_every_n_epochs = 0;
        c
    };
    let straight_dir = tempfile::tempdir().unwrap();
    let straight = train::<B>(&prodigy(straight_dir.path(), 8), &Default::default(), &mut |_| true).unwrap();
    let metrics = std::fs::read_to_string(&straight.metrics).unwrap();
    // Prodigy's estimate d (the logged step size over the learning rate) starts at d0 and
    // never falls (its numerics are checked against prodigyopt in lora-core's tests).
    let d: Vec<f64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|m| m["d_lr"].as_f64().unwrap() / m["lr"].as_f64().unwrap())
        .collect();
    assert_eq!(d.len(), 8);
    assert!((d[0] / 1e-6 - 1.0).abs() < 1e-4 && d.windows(2).all(|w| w[1] >= w[0] * (1.0 - 1e-5)), "{d:?}");

    let dir = tempfile::tempdir().unwrap();
    let config = prodigy(dir.path(), 8);
    let first = train::<B>(&config, &Default::default(), &mut |info| info.step < 4).unwrap();
    assert!(first.interrupted);
    let second = trainer::train::resume::<B>(&config, &dir.path().join("state"), &Default::default(), &mut |_| true).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&second.losses), bits(&straight.losses), "same losses, step for step");
    assert_same_lora(&straight.lora, &second.lora);

    // A Prodigy state does not resume with AdamW (and the other way round).
    let mut adamw = prodigy(dir.path(), 12);
    adamw.train.optimizer = trainer::config::Optimizer::Adamw;
    let err = trainer::train::resume::<B>(&adamw, &dir.path().join("state"), &Default::default(), &mut |_| true).unwrap_err();
    assert!(err.to_string().contains("train.optimizer = \"prodigy\""), "{err}");

    // Settings: the TOML names, and out-of-range values name their key.
    let parsed = TrainConfig::load(None, &["train.optimizer=\"prodigy\"".into(), "train.prodigy_growth_rate=inf".into()]).unwrap();
    assert_eq!(parsed.train.optimizer, trainer::config::Optimizer::Prodigy);
    assert!(parsed.optimizer_settings().1.is_some_and(|p| p.growth_rate.is_infinite()));
    let err = TrainConfig::load(None, &["train.prodigy_growth_rate=0.5".into()]).unwrap_err();
    assert!(err.to_string().contains("prodigy_growth_rate"), "{err}");
}

/// `train.amsgrad`: AdamW with AMSGrad trains other adapters than plain AdamW (its step
/// sizes cannot grow back), records it as sd-scripts' optimizer string does, resumes bit
/// for bit (its largest second moments saved with the state), and its state does not
/// resume without it; other optimizers refuse it by name.
#[test]
fn amsgrad_trains_and_resumes_bit_for_bit() {
    let _guard = seeded();
    let ams = |dir: &std::path::Path, steps: usize| {
        let mut c = resume_config(dir, steps);
        c.train.amsgrad = true;
        // A fast-forgetting second moment, so that its maximum differs from it early on.
        c.train.adam_beta2 = 0.5;
        c.output.save_every_n_epochs = 0;
        c
    };
    let straight_dir = tempfile::tempdir().unwrap();
    let straight = train::<B>(&ams(straight_dir.path(), 6), &Default::default(), &mut |_| true).unwrap();
    assert!(lora_metadata(&straight.lora)["ss_optimizer"].ends_with(",amsgrad=True)"));
    let adamw_dir = tempfile::tempdir().unwrap();
    let mut adamw = ams(adamw_dir.path(), 6);
    adamw.train.amsgrad = false;
    let adamw = train::<B>(&adamw, &Default::default(), &mut |_| true).unwrap();
    assert_eq!(straight.losses[..2], adamw.losses[..2], "the same first steps: the maxima are the moments");
    assert_ne!(straight.losses, adamw.losses, "AMSGrad's later steps differ");

    let dir = tempfile::tempdir().unwrap();
    assert_resumes_bit_for_bit(&ams(dir.path(), 6), &straight, |c| c.train.amsgrad = false, "amsgrad");
    let mut lion = ams(dir.path(), 6);
    lion.train.optimizer = trainer::config::Optimizer::Lion;
    let err = lion.validate().unwrap_err().to_string();
    assert!(err.contains("train.amsgrad") && err.contains("lion"), "{err}");
}

#[test]
fn lion_trains_and_resumes_bit_for_bit() {
    let _guard = seeded();
    let lion = |dir: &std::path::Path, steps: usize| {
        let mut c = resume_config(dir, steps);
        c.train.optimizer = trainer::config::Optimizer::Lion;
        c.train.learning_rate = 1e-4;
        c.train.adam_weight_decay = 0.1;
        c.output.save_every_n_epochs = 0;
        c
    };
    let straight_dir = tempfile::tempdir().unwrap();
    let straight = train::<B>(&lion(straight_dir.path(), 6), &Default::default(), &mut |_| true).unwrap();
    assert!(lora_metadata(&straight.lora)["ss_optimizer"].starts_with("Lion(weight_decay=0.1,betas=(0.9, 0.99))"));
    // Lion's step, not AdamW's (whose first steps are also about the learning rate in size):
    // the `up` weights (zero at the start) differ from an AdamW run's.
    let adamw_dir = tempfile::tempdir().unwrap();
    let mut adamw = lion(adamw_dir.path(), 6);
    adamw.train.optimizer = trainer::config::Optimizer::Adamw;
    let adamw = train::<B>(&adamw, &Default::default(), &mut |_| true).unwrap();
    let index = tiny_index_with_text_encoder();
    let ups = |p: &std::path::Path| {
        let (set, _) = AdapterSet::load(p, &index, ReadOptions::default()).unwrap();
        set.iter().flat_map(|(_, w)| w.up.data.clone()).collect::<Vec<f32>>()
    };
    let (lion_up, adamw_up) = (ups(&straight.lora), ups(&adamw.lora));
    assert!(lion_up.iter().any(|v| *v != 0.0));
    let diff = lion_up.iter().zip(&adamw_up).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(diff > 1e-5, "Lion and AdamW gave the same adapters");

    let dir = tempfile::tempdir().unwrap();
    let config = lion(dir.path(), 6);
    train::<B>(&config, &Default::default(), &mut |info| info.step < 3).unwrap();
    let second = trainer::train::resume::<B>(&config, &dir.path().join("state"), &Default::default(), &mut |_| true).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&second.losses), bits(&straight.losses), "same losses, step for step");
    assert_same_lora(&straight.lora, &second.lora);

    // A Lion state does not resume with AdamW.
    let mut adamw = lion(dir.path(), 8);
    adamw.train.optimizer = trainer::config::Optimizer::Adamw;
    let err = trainer::train::resume::<B>(&adamw, &dir.path().join("state"), &Default::default(), &mut |_| true).unwrap_err();
    assert!(err.to_string().contains("lion"), "{err}");
    let err = TrainConfig::load(None, &["train.lion_beta2=1.5".into()]).unwrap_err();
    assert!(err.to_string().contains("lion_beta2"), "{err}");
}

/// LoRA-FA (`lora.lora_fa`): only `up` trains. The saved downs are those the run started
/// with (the same after one step as after six, to the bit; the text encoder's too), drawn
/// from N(0, 2 / (in + rank)); the ups train; a run resumes bit for bit, and a state of it
/// does not resume without LoRA-FA.
#[test]
fn lora_fa_trains_only_up_and_resumes_bit_for_bit() {
    let _guard = seeded();
    let fa = |dir: &std::path::Path, steps: usize| {
        let mut c = resume_config(dir, steps);
        c.lora.lora_fa = true;
        c.lora.unet_targets = sd_model::targets::UnetTargets::Conv;
        c.lora.conv_rank = 2;
        c.output.save_every_n_epochs = 0;
        c
    };
    let straight_dir = tempfile::tempdir().unwrap();
    let straight = train::<B>(&fa(straight_dir.path(), 6), &Default::default(), &mut |_| true).unwrap();
    let short_dir = tempfile::tempdir().unwrap();
    let short = train::<B>(&fa(short_dir.path(), 1), &Default::default(), &mut |_| true).unwrap();
    assert_eq!(lora_metadata(&straight.lora)["ss_network_module"], "networks.lora_fa", "as sd-scripts records it");
    let index = tiny_index_with_text_encoder();
    let load = |p: &std::path::Path| AdapterSet::load(p, &index, ReadOptions::default()).unwrap().0;
    let (long, one) = (load(&straight.lora), load(&short.lora));
    assert!(one.iter().any(|(k, _)| k.component == lora_core::Component::TextEncoder));
    assert!(one.iter().any(|(_, w)| w.down.shape.len() == 4 && w.down.shape[2] == 3), "3x3 convolutions have adapters");
    let mut z = Vec::new();
    for ((key, a), (_, b)) in long.iter().zip(one.iter()) {
        assert_eq!(a.down, b.down, "{key:?}: the down did not change");
        assert_ne!(a.up, b.up, "{key:?}: the up trained");
        // In units of LoRA-FA's deviation, `in` the input channels (not × kernel).
        let sd = (2.0 / (a.down.shape[1] + a.rank()) as f64).sqrt();
        z.extend(a.down.data.iter().map(|v| f64::from(*v) / sd));
    }
    let n = z.len() as f64;
    let (mean, var) = (z.iter().sum::<f64>() / n, z.iter().map(|v| v * v).sum::<f64>() / n);
    assert!(n > 5000.0 && mean.abs() < 0.1 && (var.sqrt() - 1.0).abs() < 0.06, "{n} values: mean {mean}, std {}", var.sqrt());

    let dir = tempfile::tempdir().unwrap();
    assert_resumes_bit_for_bit(&fa(dir.path(), 6), &straight, |c| c.lora.lora_fa = false, "lora_fa");
}

/// DyLoRA (`lora.dylora_unit`, kohya's networks.dylora): a step trains one chunk of `unit`
/// ranks per adapter and pass, so after a first step from zero `up`s (one pass, gradient
/// checkpointing on: the recomputed forward trains the same chunk) each adapter's `up` is
/// nonzero in exactly one chunk, and different adapters drew different chunks. The file
/// records kohya's module and unit; a run (two passes a step, text encoder adapters
/// included) resumes bit for bit, each value's step count restored (AdamW's bias
/// correction depends on it), and its state does not resume without DyLoRA.
#[test]
fn dylora_trains_a_rank_chunk_per_pass_and_resumes_bit_for_bit() {
    let _guard = seeded();
    let dy = |dir: &std::path::Path, steps: usize| {
        let mut c = resume_config(dir, steps);
        c.lora.dropout = 0.0;
        c.lora.dylora_unit = 2;
        c.lora.unet_targets = sd_model::targets::UnetTargets::Conv;
        c.lora.conv_rank = 4;
        c.output.save_every_n_epochs = 0;
        c
    };
    let one_dir = tempfile::tempdir().unwrap();
    let mut one = dy(one_dir.path(), 1);
    one.train.gradient_accumulation_steps = 1;
    one.train.gradient_checkpointing = true;
    let first = train::<B>(&one, &Default::default(), &mut |_| true).unwrap();
    let meta = lora_metadata(&first.lora);
    assert_eq!(meta["ss_network_module"], "networks.dylora", "as sd-scripts records it");
    let args: serde_json::Value = serde_json::from_str(&meta["ss_network_args"]).unwrap();
    assert_eq!(args["unit"], "2", "{args}");
    let (set, _) = AdapterSet::load(&first.lora, &tiny_index_with_text_encoder(), ReadOptions::default()).unwrap();
    let mut drawn = std::collections::BTreeSet::new();
    for (key, w) in set.iter() {
        assert_eq!(w.rank(), 4, "{key:?}");
        // `up [out, rank, ..]` (1x1 for convolutions): the chunks with a nonzero value.
        let live: std::collections::BTreeSet<usize> = w.up.data.chunks(4).flat_map(|r| r.iter().enumerate().filter(|(_, v)| **v != 0.0).map(|(j, _)| j / 2)).collect();
        assert_eq!(live.len(), 1, "{key:?}: one chunk of `up` trained, not {live:?}");
        drawn.extend(live);
    }
    assert_eq!(drawn.len(), 2, "adapters draw their own chunks");

    let straight_dir = tempfile::tempdir().unwrap();
    let straight = train::<B>(&dy(straight_dir.path(), 6), &Default::default(), &mut |_| true).unwrap();
    assert!(straight.losses.iter().all(|l| l.is_finite()), "{:?}", straight.losses);
    let dir = tempfile::tempdir().unwrap();
    assert_resumes_bit_for_bit(&dy(dir.path(), 6), &straight, |c| c.lora.dylora_unit = 0, "dylora_unit");
}

/// Continuing a file (`network_weights` with `dim_from_weights`) with DyLoRA trains the
/// file's adapters a chunk at a time: after one step each adapter's `up` changed in one
/// chunk only, the others kept to the bit (no update, no weight decay). A file whose ranks
/// the unit does not divide is refused, naming the key and the file.
#[test]
fn dylora_continues_a_file_one_chunk_at_a_time() {
    let _guard = seeded();
    let index = tiny_index();
    let load = |path: &std::path::Path| AdapterSet::load(path, &index, ReadOptions::default()).unwrap().0;
    let first_dir = tempfile::tempdir().unwrap();
    let mut first = quick_config(first_dir.path(), 2);
    first.output.sample_prompts.clear();
    first.lora.unet_targets = sd_model::targets::UnetTargets::Attn;
    first.lora.rank = 4;
    first.output.save_precision = lora_core::SaveDtype::F32;
    let before = load(&train::<B>(&first, &Default::default(), &mut |_| true).unwrap().lora);

    let dir = tempfile::tempdir().unwrap();
    let mut next = first.clone();
    next.output.output_dir = dir.path().to_path_buf();
    next.train.max_train_steps = 1;
    next.train.lr_warmup_steps = 0;
    next.lora.network_weights = first_dir.path().join("demo_lora.safetensors").display().to_string();
    next.lora.dim_from_weights = true;
    next.lora.dylora_unit = 2;
    let after = load(&train::<B>(&next, &Default::default(), &mut |_| true).unwrap().lora);
    for (key, w) in after.iter() {
        let old = before.get(key).unwrap();
        let changed: std::collections::BTreeSet<usize> = w.up.data.iter().zip(&old.up.data).enumerate().filter(|(_, (a, b))| a != b).map(|(i, _)| i % 4 / 2).collect();
        assert_eq!(changed.len(), 1, "{key:?}: one chunk of `up` trained, not {changed:?}");
    }

    let mut uneven = next.clone();
    (uneven.lora.rank, uneven.lora.dylora_unit) = (6, 3);
    let err = train::<B>(&uneven, &Default::default(), &mut |_| true).unwrap_err().to_string();
    assert!(err.contains("lora.dylora_unit") && err.contains("demo_lora.safetensors"), "{err}");
}

/// What DyLoRA cannot combine with is refused by name before a run starts.
#[test]
fn dylora_refuses_what_it_cannot_train() {
    let dir = tempfile::tempdir().unwrap();
    let base = {
        let mut c = quick_config(dir.path(), 2);
        (c.lora.rank, c.lora.dylora_unit) = (4, 2);
        c
    };
    assert!(base.validate().is_ok());
    type Edit = fn(&mut TrainConfig);
    let cases: [(&str, Edit); 5] = [
        ("divide", |c| c.lora.dylora_unit = 3),
        ("lora.dora", |c| c.lora.dora = true),
        ("lora.dropout", |c| c.lora.dropout = 0.1),
        ("lora.conv_rank", |c| {
            c.lora.unet_targets = sd_model::targets::UnetTargets::Conv;
            c.lora.conv_rank = 3;
        }),
        ("adafactor", |c| c.train.optimizer = trainer::config::Optimizer::Adafactor),
    ];
    for (expect, edit) in cases {
        let mut c = base.clone();
        edit(&mut c);
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("lora.dylora_unit") && err.to_lowercase().contains(expect), "{expect}: {err}");
    }
}

/// LyCORIS' rank dropout on a LoRA (`lora.lycoris_rank_dropout`, LyCORIS' LoCon) trains,
/// and not as kohya's does; `rank_dropout_scale` needs it (or LoHa / LoKr), and DoRA does
/// not combine with it.
#[test]
fn lycoris_rank_dropout_trains_a_locon() {
    let _guard = seeded();
    let dir = tempfile::tempdir().unwrap();
    let mut lycoris = quick_config(&dir.path().join("lycoris"), 4);
    lycoris.output.sample_prompts.clear();
    lycoris.lora.unet_targets = sd_model::targets::UnetTargets::Conv;
    lycoris.lora.conv_rank = 2;
    lycoris.lora.rank_dropout = 0.5;
    lycoris.lora.lycoris_rank_dropout = true;
    lycoris.lora.rank_dropout_scale = true;
    let rows = train::<B>(&lycoris, &Default::default(), &mut |_| true).unwrap();
    assert!(rows.losses.iter().all(|l| l.is_finite()), "{:?}", rows.losses);
    let mut kohya = lycoris.clone();
    kohya.output.output_dir = dir.path().join("kohya");
    (kohya.lora.lycoris_rank_dropout, kohya.lora.rank_dropout_scale) = (false, false);
    let components = train::<B>(&kohya, &Default::default(), &mut |_| true).unwrap();
    // The first step trains from zero `up` weights, which no dropout changes.
    assert_eq!(rows.losses[0], components.losses[0]);
    assert_ne!(rows.losses[1..], components.losses[1..]);

    let mut scale_alone = kohya.clone();
    scale_alone.lora.rank_dropout_scale = true;
    let err = scale_alone.validate().unwrap_err().to_string();
    assert!(err.contains("rank_dropout_scale") && err.contains("lycoris_rank_dropout"), "{err}");
    let mut dora = lycoris.clone();
    dora.lora.dora = true;
    let err = dora.validate().unwrap_err().to_string();
    assert!(err.contains("lora.lycoris_rank_dropout") && err.contains("lora.dora"), "{err}");
}

#[test]
fn dadapt_adam_trains_and_resumes_bit_for_bit() {
    let _guard = seeded();
    let dadapt = |dir: &std::path::Path, steps: usize| {
        let mut c = resume_config(dir, steps);
        c.train.optimizer = trainer::config::Optimizer::DadaptAdam;
        (c.train.learning_rate, c.train.text_encoder_lr) = (1.0, 0.5);
        c.train.adam_weight_decay = 0.1;
        c.train.dadapt_use_bias_correction = true;
        c.output.save_every_n_epochs = 0;
        c
    };
    let straight_dir = tempfile::tempdir().unwrap();
    let straight = train::<B>(&dadapt(straight_dir.path(), 8), &Default::default(), &mut |_| true).unwrap();
    assert!(lora_metadata(&straight.lora)["ss_optimizer"].starts_with("DAdaptAdam(decouple=True,weight_decay=0.1"));
    // The estimate d (the logged step size over the learning rate) starts at d0 and never
    // falls (its numerics are checked against dadaptation in lora-core's tests).
    let metrics = std::fs::read_to_string(&straight.metrics).unwrap();
    let d: Vec<f64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|m| m["d_lr"].as_f64().unwrap() / m["lr"].as_f64().unwrap())
        .collect();
    assert_eq!(d.len(), 8);
    assert!(d[0] >= 1e-6 * (1.0 - 1e-4) && d.windows(2).all(|w| w[1] >= w[0] * (1.0 - 1e-5)) && d[7] > d[0], "{d:?}");

    let dir = tempfile::tempdir().unwrap();
    let config = dadapt(dir.path(), 8);
    train::<B>(&config, &Default::default(), &mut |info| info.step < 4).unwrap();
    let second = trainer::train::resume::<B>(&config, &dir.path().join("state"), &Default::default(), &mut |_| true).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&second.losses), bits(&straight.losses), "same losses, step for step");
    assert_same_lora(&straight.lora, &second.lora);

    // A DAdaptAdam state does not resume with Prodigy (each keeps its own estimate): the
    // state's fingerprint names the optimizer.
    let mut prodigy = dadapt(dir.path(), 12);
    prodigy.train.optimizer = trainer::config::Optimizer::Prodigy;
    let err = trainer::train::resume::<B>(&prodigy, &dir.path().join("state"), &Default::default(), &mut |_| true).unwrap_err();
    assert!(err.to_string().contains("dadapt_adam"), "{err}");
    let err = TrainConfig::load(None, &["train.dadapt_growth_rate=0.5".into()]).unwrap_err();
    assert!(err.to_string().contains("dadapt_growth_rate"), "{err}");
}

/// Schedule-free AdamW: the LoRA saved is its average `x`, the state keeps the point `y`
/// it trains at (and `z`), so a resume is bit for bit; a schedule is a config error; the
/// RAdam variant's first steps change nothing unless `schedule_free_silent_sgd_phase` is
/// off. (The numerics are checked against the `schedulefree` package in lora-core.)
#[test]
fn schedule_free_saves_its_average_and_resumes_bit_for_bit() {
    use trainer::config::Optimizer;
    let _guard = seeded();
    let schedule_free = |dir: &std::path::Path, steps: usize| {
        let mut c = resume_config(dir, steps);
        c.train.optimizer = Optimizer::AdamwScheduleFree;
        c.train.lr_scheduler = trainer::config::LrScheduler::Constant;
        (c.train.learning_rate, c.train.lr_warmup_steps) = (2e-3, 3);
        // The text encoder's average must move measurably from its point in 8 steps.
        c.train.text_encoder_lr = 2e-3;
        c.train.adam_weight_decay = 0.01;
        c.train.schedule_free_r = 0.5;
        c.output.save_every_n_epochs = 0;
        c
    };
    let straight_dir = tempfile::tempdir().unwrap();
    let straight = train::<B>(&schedule_free(straight_dir.path(), 8), &Default::default(), &mut |_| true).unwrap();
    let meta = lora_metadata(&straight.lora);
    assert!(meta["ss_optimizer"].starts_with("AdamWScheduleFree(weight_decay=0.01,betas=(0.9, 0.999),eps=0.00000001,r=0.5,weight_lr_power=2,warmup_steps=3)"), "{}", meta["ss_optimizer"]);
    assert!(straight.sample_grid.is_some());
    // The LoRA holds x, the state y: they differ once steps were taken.
    let index = tiny_index_with_text_encoder();
    let (set, _) = AdapterSet::load(&straight.lora, &index, ReadOptions::default()).unwrap();
    let bytes = std::fs::read(straight_dir.path().join("state/adapters.safetensors")).unwrap();
    let state = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (key, w) = set.iter().find(|(k, _)| k.component == lora_core::Component::Unet).unwrap();
    let y_up = state.tensor(&format!("unet.{}.up", key.path)).unwrap();
    let mut y_up: Vec<f32> = y_up.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
    // The state keeps burn's layout, the file kohya's: compare the values sorted.
    let mut x_up = w.up.data.clone();
    y_up.sort_by(f32::total_cmp);
    x_up.sort_by(f32::total_cmp);
    assert_eq!(y_up.len(), x_up.len());
    assert!(y_up != x_up && x_up.iter().any(|v| *v != 0.0), "the LoRA must be the average, not the training point");
    // And it is x = y + (1 − 1/β₁)(z − y), per model: the state's z is flat in the
    // optimizer's order, so the check takes sums, which no order changes.
    let optimizer_bytes = std::fs::read(straight_dir.path().join("state/optimizer.safetensors")).unwrap();
    let optimizer_state = safetensors::SafeTensors::deserialize(&optimizer_bytes).unwrap();
    let sum = |bytes: &[u8]| bytes.chunks_exact(4).map(|b| f64::from(f32::from_le_bytes(b.try_into().unwrap()))).sum::<f64>();
    for (prefix, component) in [("unet", lora_core::Component::Unet), ("text_encoder", lora_core::Component::TextEncoder)] {
        let sum_y: f64 = state.tensors().iter().filter(|(k, _)| k.starts_with(&format!("{prefix}."))).map(|(_, t)| sum(t.data())).sum();
        let sum_x: f64 = set.iter().filter(|(k, _)| k.component == component).map(|(_, w)| w.down.data.iter().chain(&w.up.data).map(|v| f64::from(*v)).sum::<f64>()).sum();
        let sum_z = sum(optimizer_state.tensor(&format!("schedule_free.{prefix}.z")).unwrap().data());
        let expected = (1.0 - 1.0 / 0.9) * (sum_z - sum_y);
        assert!(expected.abs() > 1e-4 * sum_y.abs().max(1e-3), "{prefix}: z must have moved away from y for the check to mean anything ({expected:e})");
        assert!((sum_x - sum_y - expected).abs() <= 1e-3 * expected.abs(), "{prefix}: Σx − Σy = {:e}, (1 − 1/β₁)(Σz − Σy) = {expected:e}", sum_x - sum_y);
    }

    let dir = tempfile::tempdir().unwrap();
    let config = schedule_free(dir.path(), 8);
    train::<B>(&config, &Default::default(), &mut |info| info.step < 4).unwrap();
    let second = trainer::train::resume::<B>(&config, &dir.path().join("state"), &Default::default(), &mut |_| true).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&second.losses), bits(&straight.losses), "same losses, step for step");
    assert_same_lora(&straight.lora, &second.lora);
    let mut adamw = schedule_free(dir.path(), 12);
    adamw.train.optimizer = Optimizer::Adamw;
    let err = trainer::train::resume::<B>(&adamw, &dir.path().join("state"), &Default::default(), &mut |_| true).unwrap_err();
    assert!(err.to_string().contains("adamw_schedule_free"), "{err}");

    // No schedule with a schedule-free optimizer.
    let err = TrainConfig::load(None, &["train.optimizer=\"radam_schedule_free\"".into(), "train.lr_scheduler=\"cosine\"".into()]).unwrap_err();
    assert!(err.to_string().contains("train.lr_scheduler = \"cosine\"") && err.to_string().contains("constant"), "{err}");
    let err = TrainConfig::load(None, &["train.optimizer=\"adamw_schedule_free\"".into(), "train.lr_scheduler=\"constant\"".into(), "train.schedule_free_r=-1".into()]).unwrap_err();
    assert!(err.to_string().contains("schedule_free_r"), "{err}");

    // RAdam's first steps (β₂ = 0.999: four of them) are silent, or plain SGD steps.
    let radam = |dir: &std::path::Path, silent: bool| {
        let mut c = quick_config(dir, 3);
        c.train.optimizer = Optimizer::RadamScheduleFree;
        c.train.lr_scheduler = trainer::config::LrScheduler::Constant;
        (c.train.lr_warmup_steps, c.train.learning_rate) = (0, 1e-2);
        c.train.schedule_free_silent_sgd_phase = silent;
        c.output.sample_prompts.clear();
        c
    };
    let ups = |p: &std::path::Path| {
        let (set, _) = AdapterSet::load(p, &index, ReadOptions::default()).unwrap();
        set.iter().flat_map(|(_, w)| w.up.data.clone()).collect::<Vec<f32>>()
    };
    let silent_dir = tempfile::tempdir().unwrap();
    let silent = train::<B>(&radam(silent_dir.path(), true), &Default::default(), &mut |_| true).unwrap();
    assert!(ups(&silent.lora).iter().all(|v| *v == 0.0), "silent first steps train nothing");
    let sgd_dir = tempfile::tempdir().unwrap();
    let sgd = train::<B>(&radam(sgd_dir.path(), false), &Default::default(), &mut |_| true).unwrap();
    assert!(ups(&sgd.lora).iter().any(|v| *v != 0.0), "SGD first steps train");
}

/// `prodigy_plus_schedule_free`: the UNet's and the text encoder's groups (LoRA+ splits
/// each in two) estimate their step sizes and step at their shared mean; the LoRA is the
/// average x, the state y and z, and a resume is bit for bit.
#[test]
fn prodigy_plus_shares_its_mean_saves_its_average_and_resumes_bit_for_bit() {
    use trainer::config::Optimizer;
    let _guard = seeded();
    let prodigy_plus = |dir: &std::path::Path, steps: usize| {
        let mut c = resume_config(dir, steps);
        c.train.optimizer = Optimizer::ProdigyPlusScheduleFree;
        c.train.lr_scheduler = trainer::config::LrScheduler::Constant;
        (c.train.learning_rate, c.train.text_encoder_lr, c.train.lr_warmup_steps) = (1.0, 0.5, 0);
        c.train.prodigy_plus_d0 = 1e-4;
        c.train.prodigy_plus_weight_decay = 0.01;
        c.lora.loraplus_lr_ratio = 4.0;
        c.output.save_every_n_epochs = 0;
        c
    };
    let straight_dir = tempfile::tempdir().unwrap();
    let straight = train::<B>(&prodigy_plus(straight_dir.path(), 8), &Default::default(), &mut |_| true).unwrap();
    let meta = lora_metadata(&straight.lora);
    assert!(meta["ss_optimizer"].starts_with("ProdigyPlusScheduleFree(betas=(0.9, 0.99),d0=0.0001,d_coef=1,weight_decay=0.01"), "{}", meta["ss_optimizer"]);
    // The logged step size over the learning rate: the groups' shared estimate, from d0 up.
    let metrics = std::fs::read_to_string(&straight.metrics).unwrap();
    let d: Vec<f64> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .map(|m| m["d_lr"].as_f64().unwrap() / m["lr"].as_f64().unwrap())
        .collect();
    assert_eq!(d.len(), 8);
    assert!(d[0] >= 1e-4 * (1.0 - 1e-4) && d[7] > 2e-4, "{d:?}");
    // The LoRA is x = y + (1 − 1/β₁)(z − y), per model (sums: the orders differ).
    let index = tiny_index_with_text_encoder();
    let (set, _) = AdapterSet::load(&straight.lora, &index, ReadOptions::default()).unwrap();
    let state_bytes = std::fs::read(straight_dir.path().join("state/adapters.safetensors")).unwrap();
    let state = safetensors::SafeTensors::deserialize(&state_bytes).unwrap();
    let optimizer_bytes = std::fs::read(straight_dir.path().join("state/optimizer.safetensors")).unwrap();
    let optimizer_state = safetensors::SafeTensors::deserialize(&optimizer_bytes).unwrap();
    let sum = |bytes: &[u8]| bytes.chunks_exact(4).map(|b| f64::from(f32::from_le_bytes(b.try_into().unwrap()))).sum::<f64>();
    for (prefix, component) in [("unet", lora_core::Component::Unet), ("text_encoder", lora_core::Component::TextEncoder)] {
        let sum_y: f64 = state.tensors().iter().filter(|(k, _)| k.starts_with(&format!("{prefix}."))).map(|(_, t)| sum(t.data())).sum();
        let sum_x: f64 = set.iter().filter(|(k, _)| k.component == component).map(|(_, w)| w.down.data.iter().chain(&w.up.data).map(|v| f64::from(*v)).sum::<f64>()).sum();
        let sum_z = sum(optimizer_state.tensor(&format!("prodigy_plus.{prefix}.z")).unwrap().data());
        let expected = (1.0 - 1.0 / 0.9) * (sum_z - sum_y);
        assert!(expected.abs() > 1e-5 * sum_y.abs().max(1e-3), "{prefix}: z must have moved away from y for the check to mean anything ({expected:e})");
        assert!((sum_x - sum_y - expected).abs() <= 1e-3 * expected.abs(), "{prefix}: Σx − Σy = {:e}, (1 − 1/β₁)(Σz − Σy) = {expected:e}", sum_x - sum_y);
    }

    let dir = tempfile::tempdir().unwrap();
    let config = prodigy_plus(dir.path(), 8);
    train::<B>(&config, &Default::default(), &mut |info| info.step < 4).unwrap();
    let second = trainer::train::resume::<B>(&config, &dir.path().join("state"), &Default::default(), &mut |_| true).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&second.losses), bits(&straight.losses), "same losses, step for step");
    assert_same_lora(&straight.lora, &second.lora);
    // ADOPT's first step fills the second moments without counting a step: a save right
    // after it keeps them (unfactored, they are the optimizer's moments).
    let adopt = |dir: &std::path::Path| {
        let mut c = prodigy_plus(dir, 3);
        (c.train.prodigy_plus_use_adopt, c.train.prodigy_plus_factored) = (true, false);
        c
    };
    let adopt_dir = tempfile::tempdir().unwrap();
    let adopt_straight = train::<B>(&adopt(adopt_dir.path()), &Default::default(), &mut |_| true).unwrap();
    let adopt_dir = tempfile::tempdir().unwrap();
    train::<B>(&adopt(adopt_dir.path()), &Default::default(), &mut |info| info.step < 1).unwrap();
    let adopt_second = trainer::train::resume::<B>(&adopt(adopt_dir.path()), &adopt_dir.path().join("state"), &Default::default(), &mut |_| true).unwrap();
    assert_eq!(bits(&adopt_second.losses), bits(&adopt_straight.losses), "ADOPT: same losses, step for step");
    assert_same_lora(&adopt_straight.lora, &adopt_second.lora);

    let mut other = prodigy_plus(dir.path(), 12);
    other.train.optimizer = Optimizer::AdamwScheduleFree;
    let err = trainer::train::resume::<B>(&other, &dir.path().join("state"), &Default::default(), &mut |_| true).unwrap_err();
    assert!(err.to_string().contains("prodigy_plus_schedule_free"), "{err}");

    // Its settings: the package's names after a prefix, checked.
    let load = |extra: &[&str]| {
        let mut args = vec!["train.optimizer=\"prodigy_plus_schedule_free\"".to_string(), "train.lr_scheduler=\"constant\"".to_string()];
        args.extend(extra.iter().map(|a| a.to_string()));
        TrainConfig::load(None, &args)
    };
    let c = load(&["train.prodigy_plus_betas=[0.9, 0.999]", "train.prodigy_plus_d_coef=0.5", "train.prodigy_plus_eps=0"]).unwrap();
    let settings = c.train.prodigy_plus_settings();
    assert_eq!((settings.betas, settings.d_coef, settings.eps, settings.beta3), ((0.9, 0.999), 0.5, 0.0, None));
    let err = load(&["train.prodigy_plus_d0=0"]).unwrap_err().to_string();
    assert!(err.contains("train.prodigy_plus_*") && err.contains("d0"), "{err}");
    let err = load(&["train.prodigy_plus_betas=[0.9, 1.0]"]).unwrap_err().to_string();
    assert!(err.contains("betas"), "{err}");
    let err = TrainConfig::load(None, &["train.optimizer=\"prodigy_plus_schedule_free\"".into(), "train.lr_scheduler=\"cosine\"".into()]).unwrap_err();
    assert!(err.to_string().contains("constant"), "{err}");
}

/// A schedule-free run's validation loss is the one of its average `x`, the weights it
/// saves: a run that starts from the saved file (f32) and cannot move (a learning rate of
/// 1e-30) measures the same loss, to the bit. Measured at `y`, after six steps at a rate of
/// 5e-3, it would differ by far more.
#[test]
fn schedule_free_validates_at_its_average() {
    use trainer::config::{LrScheduler, Optimizer};
    let _guard = seeded();
    let root = tempfile::tempdir().unwrap();
    let mut a = quick_config(&root.path().join("a"), 6);
    a.train.optimizer = Optimizer::AdamwScheduleFree;
    (a.train.lr_scheduler, a.train.lr_warmup_steps, a.train.learning_rate) = (LrScheduler::Constant, 0, 5e-3);
    a.lora.text_encoder_targets = sd_model::targets::TextEncoderTargets::Attn;
    a.data.validation_split = 0.25;
    a.output.sample_prompts.clear();
    // The file holds x exactly (the default f16 would round it, and the loss's last bits).
    a.output.save_precision = lora_core::SaveDtype::F32;
    let trained = train::<B>(&a, &Default::default(), &mut |_| true).unwrap();
    let mut b = a.clone();
    b.output.output_dir = root.path().join("b");
    b.train.optimizer = Optimizer::Adamw;
    (b.train.max_train_steps, b.train.learning_rate, b.train.text_encoder_lr, b.train.adam_weight_decay) = (1, 1e-30, 1e-30, 0.0);
    b.lora.network_weights = trained.lora.display().to_string();
    let still = train::<B>(&b, &Default::default(), &mut |_| true).unwrap();
    let (at_x, from_file) = (trained.validation.last().unwrap().1, still.validation.last().unwrap().1);
    assert_eq!(at_x.to_bits(), from_file.to_bits(), "validation at x {at_x}, from the saved file {from_file}");
}

#[test]
fn adafactor_trains_and_resumes_bit_for_bit() {
    let _guard = seeded();
    // transformers' defaults (the relative step, scaled by the values' RMS), a first moment
    // and weight decay: every part of the state must survive a resume.
    let adafactor = |dir: &std::path::Path, steps: usize| {
        let mut c = resume_config(dir, steps);
        c.train.optimizer = trainer::config::Optimizer::Adafactor;
        (c.train.adafactor_relative_step, c.train.adafactor_scale_parameter) = (true, true);
        c.train.adafactor_beta1 = 0.9;
        c.train.adam_weight_decay = 0.01;
        c.output.save_every_n_epochs = 0;
        c
    };
    let straight_dir = tempfile::tempdir().unwrap();
    let straight = train::<B>(&adafactor(straight_dir.path(), 6), &Default::default(), &mut |_| true).unwrap();
    let metadata = lora_metadata(&straight.lora);
    assert!(metadata["ss_optimizer"].starts_with("Adafactor(scale_parameter=True,relative_step=True,warmup_init=False"));
    assert_eq!(metadata["ss_lr_scheduler"], "adafactor", "sd-scripts' name for the relative step");
    // The relative step replaces the learning rate and its schedule (min(1e-2, 1/sqrt(t))).
    let metrics = std::fs::read_to_string(&straight.metrics).unwrap();
    for line in metrics.lines() {
        let m: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(m["lr"].as_f64(), Some(1e-2), "{line}");
    }
    let index = tiny_index_with_text_encoder();
    let ups = |p: &std::path::Path| {
        let (set, _) = AdapterSet::load(p, &index, ReadOptions::default()).unwrap();
        set.iter().flat_map(|(_, w)| w.up.data.clone()).collect::<Vec<f32>>()
    };
    assert!(ups(&straight.lora).iter().filter(|v| **v != 0.0).count() > 100, "the up weights trained");

    let dir = tempfile::tempdir().unwrap();
    let config = adafactor(dir.path(), 6);
    train::<B>(&config, &Default::default(), &mut |info| info.step < 3).unwrap();
    let second = trainer::train::resume::<B>(&config, &dir.path().join("state"), &Default::default(), &mut |_| true).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&second.losses), bits(&straight.losses), "same losses, step for step");
    assert_same_lora(&straight.lora, &second.lora);

    // An Adafactor state does not resume with AdamW: the state's fingerprint names the
    // optimizer.
    let mut adamw = adafactor(dir.path(), 8);
    adamw.train.optimizer = trainer::config::Optimizer::Adamw;
    let err = trainer::train::resume::<B>(&adamw, &dir.path().join("state"), &Default::default(), &mut |_| true).unwrap_err();
    assert!(err.to_string().contains("adafactor"), "{err}");
    // Settings transformers refuses name their key.
    let err = TrainConfig::load(None, &["train.optimizer=\"adafactor\"".into(), "train.adafactor_warmup_init=true".into()]).unwrap_err();
    assert!(err.to_string().contains("adafactor_warmup_init"), "{err}");
    let err = TrainConfig::load(None, &["train.adafactor_decay_rate=0.8".into()]).unwrap_err();
    assert!(err.to_string().contains("adafactor_decay_rate"), "{err}");
}

/// AdEMAMix, SGD and the D-Adaptation variants train, write their settings in the
/// metadata and resume bit for bit (AdEMAMix's slow moment and DAdaptSGD's starting values
/// are in the state, SGD's buffer is the first moment); a state of one does not resume
/// with another or with AdamW.
#[test]
fn newer_optimizers_train_and_resume_bit_for_bit() {
    use trainer::config::Optimizer;
    let _guard = seeded();
    let configured = |optimizer: Optimizer, dir: &std::path::Path, steps: usize| {
        let mut c = resume_config(dir, steps);
        c.train.optimizer = optimizer;
        c.output.save_every_n_epochs = 0;
        match optimizer {
            Optimizer::Ademamix => (c.train.learning_rate, c.train.ademamix_t_alpha, c.train.ademamix_t_beta3) = (1e-4, 4, 5),
            Optimizer::Sgd => (c.train.learning_rate, c.train.adam_weight_decay) = (0.05, 1e-4),
            Optimizer::DadaptSgd => (c.train.learning_rate, c.train.dadapt_momentum, c.train.adam_weight_decay) = (1.0, 0.5, 0.0),
            Optimizer::SgdScheduleFree => (c.train.learning_rate, c.train.lr_scheduler) = (0.05, trainer::config::LrScheduler::Constant),
            _ => c.train.learning_rate = 1.0,
        }
        c
    };
    let cases = [
        (Optimizer::Ademamix, "AdEMAMix(weight_decay=0.01,betas=(0.9, 0.999, 0.9999),alpha=5,eps=0.00000001,t_alpha=4,t_beta3=5)"),
        (Optimizer::Sgd, "SGD(momentum=0.9,dampening=0,nesterov=True,weight_decay=0.0001)"),
        (Optimizer::DadaptAdamPreprint, "DAdaptAdamPreprint(decouple=True,weight_decay=0.01,betas=(0.9, 0.999),growth_rate=inf)"),
        (Optimizer::DadaptLion, "DAdaptLion(weight_decay=0.01,betas=(0.9, 0.99))"),
        (Optimizer::DadaptSgd, "DAdaptSGD(momentum=0.5,weight_decay=0,growth_rate=inf)"),
        (Optimizer::DadaptAdagrad, "DAdaptAdaGrad(momentum=0,weight_decay=0.01,eps=0.00000001,growth_rate=inf)"),
        (Optimizer::DadaptAdan, "DAdaptAdan(betas=(0.9, 0.999, 0.99),weight_decay=0.01,no_prox=False,growth_rate=inf)"),
        (Optimizer::SgdScheduleFree, "SGDScheduleFree(momentum=0.9,weight_decay=0.01,r=0,weight_lr_power=2,warmup_steps=2)"),
    ];
    for (optimizer, metadata) in cases {
        let straight_dir = tempfile::tempdir().unwrap();
        let straight = train::<B>(&configured(optimizer, straight_dir.path(), 6), &Default::default(), &mut |_| true).unwrap();
        assert_eq!(lora_metadata(&straight.lora)["ss_optimizer"], metadata);
        let index = tiny_index_with_text_encoder();
        let (set, _) = AdapterSet::load(&straight.lora, &index, ReadOptions::default()).unwrap();
        let trained = set.iter().flat_map(|(_, w)| w.up.data.clone()).filter(|v| *v != 0.0).count();
        assert!(trained > 100, "{optimizer:?}: the up weights trained ({trained})");

        let dir = tempfile::tempdir().unwrap();
        let config = configured(optimizer, dir.path(), 6);
        train::<B>(&config, &Default::default(), &mut |info| info.step < 3).unwrap();
        let second = trainer::train::resume::<B>(&config, &dir.path().join("state"), &Default::default(), &mut |_| true).unwrap();
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&second.losses), bits(&straight.losses), "{optimizer:?}: same losses, step for step");
        assert_same_lora(&straight.lora, &second.lora);

        for other in [Optimizer::Adamw, Optimizer::Ademamix, Optimizer::Sgd, Optimizer::DadaptLion, Optimizer::DadaptSgd, Optimizer::DadaptAdan].into_iter().filter(|o| *o != optimizer) {
            let mut changed = configured(optimizer, dir.path(), 8);
            changed.train.optimizer = other;
            let err = trainer::train::resume::<B>(&changed, &dir.path().join("state"), &Default::default(), &mut |_| true).unwrap_err();
            assert!(err.to_string().contains("optimizer"), "{optimizer:?} -> {other:?}: {err}");
        }
    }
    let err = TrainConfig::load(None, &["train.optimizer=\"ademamix\"".into(), "train.ademamix_beta3=1.0".into()]).unwrap_err();
    assert!(err.to_string().contains("train.ademamix_") && err.to_string().contains("betas"), "{err}");
    let err = TrainConfig::load(None, &["train.optimizer=\"sgd\"".into(), "train.sgd_momentum=0".into()]).unwrap_err();
    assert!(err.to_string().contains("train.sgd_") && err.to_string().contains("Nesterov"), "{err}");
}

/// CAME trains, writes its settings in the metadata, and resumes bit for bit (its
/// instability's running means are in the state); a CAME state does not resume with
/// Adafactor, whose factored means have the same shapes.
#[test]
fn came_trains_and_resumes_bit_for_bit() {
    let _guard = seeded();
    let came = |dir: &std::path::Path, steps: usize| {
        let mut c = resume_config(dir, steps);
        c.train.optimizer = trainer::config::Optimizer::Came;
        (c.train.learning_rate, c.train.adam_weight_decay, c.train.came_beta3) = (1e-4, 0.01, 0.999);
        c.output.save_every_n_epochs = 0;
        c
    };
    let straight_dir = tempfile::tempdir().unwrap();
    let straight = train::<B>(&came(straight_dir.path(), 6), &Default::default(), &mut |_| true).unwrap();
    let metadata = lora_metadata(&straight.lora);
    assert_eq!(metadata["ss_optimizer"], "CAME(weight_decay=0.01,betas=(0.9, 0.999, 0.999),eps=(1e-30, 1e-16),clip_threshold=1)");
    let index = tiny_index_with_text_encoder();
    let (set, _) = AdapterSet::load(&straight.lora, &index, ReadOptions::default()).unwrap();
    assert!(set.iter().flat_map(|(_, w)| w.up.data.clone()).filter(|v| *v != 0.0).count() > 100, "the up weights trained");

    let dir = tempfile::tempdir().unwrap();
    let config = came(dir.path(), 6);
    train::<B>(&config, &Default::default(), &mut |info| info.step < 3).unwrap();
    let second = trainer::train::resume::<B>(&config, &dir.path().join("state"), &Default::default(), &mut |_| true).unwrap();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&second.losses), bits(&straight.losses), "same losses, step for step");
    assert_same_lora(&straight.lora, &second.lora);

    let mut adafactor = came(dir.path(), 8);
    adafactor.train.optimizer = trainer::config::Optimizer::Adafactor;
    let err = trainer::train::resume::<B>(&adafactor, &dir.path().join("state"), &Default::default(), &mut |_| true).unwrap_err();
    assert!(err.to_string().contains("came"), "{err}");
    let err = TrainConfig::load(None, &["train.optimizer=\"came\"".into(), "train.came_beta2=1.5".into()]).unwrap_err();
    assert!(err.to_string().contains("train.came_") && err.to_string().contains("betas"), "{err}");
}

#[test]
fn network_weights_start_from_an_existing_lora() {
    let _guard = seeded();
    let load = |path: &std::path::Path| {
        let index = tiny_index_with_text_encoder();
        AdapterSet::load(path, &index, ReadOptions::default()).unwrap().0
    };
    let first_dir = tempfile::tempdir().unwrap();
    let mut first = quick_config(first_dir.path(), 4);
    first.lora.text_encoder_targets = sd_model::targets::TextEncoderTargets::Attn;
    first.lora.alpha = 4.0;
    first.output.save_precision = lora_core::SaveDtype::F32;
    let trained = train::<B>(&first, &Default::default(), &mut |_| true).unwrap();

    // A run starting from that LoRA at a vanishing learning rate saves it back unchanged:
    // every adapter (UNet and text encoder) and its alpha came from the file, though this
    // configuration's own alpha differs.
    let dir = tempfile::tempdir().unwrap();
    let mut next = quick_config(dir.path(), 1);
    next.lora.text_encoder_targets = sd_model::targets::TextEncoderTargets::Attn;
    next.lora.network_weights = trained.lora.display().to_string();
    next.train.learning_rate = 1e-15;
    next.output.save_precision = lora_core::SaveDtype::F32;
    let continued = train::<B>(&next, &Default::default(), &mut |_| true).unwrap();
    let (a, b) = (load(&trained.lora), load(&continued.lora));
    assert_eq!(a.len(), b.len());
    for (key, w) in a.iter() {
        let v = b.get(key).unwrap();
        assert_eq!(v.alpha, w.alpha, "{key}");
        let diff = w.up.data.iter().zip(&v.up.data).chain(w.down.data.iter().zip(&v.down.data)).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-7, "{key}: {diff}");
    }
    assert!(a.iter().any(|(_, w)| w.up.data.iter().any(|v| *v != 0.0)), "the first run trained its up weights");

    // The file's adapters must be among the targets, at the configured rank.
    let mut no_te = next.clone();
    no_te.lora.text_encoder_targets = sd_model::targets::TextEncoderTargets::None;
    let err = train::<B>(&no_te, &Default::default(), &mut |_| true).unwrap_err().to_string();
    assert!(err.contains("lora.network_weights") && err.contains("no adapter is attached"), "{err}");
    let mut other_rank = next.clone();
    other_rank.lora.rank = 4;
    let err = train::<B>(&other_rank, &Default::default(), &mut |_| true).unwrap_err().to_string();
    assert!(err.contains("rank 8 in the weights, 4"), "{err}");
    let mut missing = next.clone();
    missing.lora.network_weights = dir.path().join("nope.safetensors").display().to_string();
    let err = train::<B>(&missing, &Default::default(), &mut |_| true).unwrap_err().to_string();
    assert!(err.contains("nope.safetensors"), "{err}");

    // The key is read from configuration files and `--set` (it once was not: an empty
    // value left it out of the defaults that valid keys are taken from).
    let file = dir.path().join("start.toml");
    std::fs::write(&file, format!("[lora]\nnetwork_weights = {:?}\n", trained.lora.display().to_string())).unwrap();
    let loaded = TrainConfig::load(Some(&file), &[]).unwrap();
    assert_eq!(loaded.lora.network_weights, trained.lora.display().to_string());
    let set = format!("lora.network_weights={}", dir.path().join("nope.safetensors").display());
    let err = TrainConfig::load(None, &[set]).unwrap_err().to_string();
    assert!(err.contains("no file at") && err.contains("nope.safetensors"), "{err}");
}

/// `lora.dim_from_weights`: the file's modules, ranks and alphas, whatever the targets and
/// rank say (a LoRA of rank 2 on the UNet's attention and the text encoder, continued by a
/// configuration asking for rank 8 on attn-mlp without the text encoder); a resumed run
/// rebuilds them from the file too.
#[test]
fn dim_from_weights_takes_the_files_modules_and_ranks() {
    let _guard = seeded();
    let index = tiny_index_with_text_encoder();
    let load = |path: &std::path::Path| AdapterSet::load(path, &index, ReadOptions::default()).unwrap().0;
    let first_dir = tempfile::tempdir().unwrap();
    let mut first = quick_config(first_dir.path(), 2);
    first.lora.unet_targets = sd_model::targets::UnetTargets::Attn;
    first.lora.text_encoder_targets = sd_model::targets::TextEncoderTargets::Attn;
    (first.lora.rank, first.lora.alpha) = (2, 1.0);
    first.output.save_precision = lora_core::SaveDtype::F32;
    let trained = load(&train::<B>(&first, &Default::default(), &mut |_| true).unwrap().lora);

    let dir = tempfile::tempdir().unwrap();
    let mut next = quick_config(dir.path(), 3);
    next.lora.network_weights = first_dir.path().join("demo_lora.safetensors").display().to_string();
    next.lora.dim_from_weights = true;
    next.output.save_precision = lora_core::SaveDtype::F32;
    let continued = load(&train::<B>(&next, &Default::default(), &mut |info| info.step < 2).unwrap().lora);
    let shape = |set: &AdapterSet| set.iter().map(|(k, w)| (k.clone(), w.rank(), w.alpha)).collect::<Vec<_>>();
    assert_eq!(shape(&continued), shape(&trained));
    assert!(continued.iter().any(|(k, _)| k.component == lora_core::Component::TextEncoder));
    assert!(continued.iter().any(|(k, w)| w.up.data != trained.get(k).unwrap().up.data), "the adapters trained on");

    // A state holds the adapters' values, the file their alphas: a changed file is refused.
    let copy = dir.path().join("copy.safetensors");
    std::fs::copy(&next.lora.network_weights, &copy).unwrap();
    let mut changed = next.clone();
    changed.lora.network_weights = copy.display().to_string();
    let mut set = load(&copy);
    let first_key = set.iter().next().map(|(k, _)| k.clone()).unwrap();
    set.remove(&first_key);
    set.save(&copy, lora_core::AdapterFormat::Kohya, lora_core::SaveDtype::F32).unwrap();
    let err = trainer::train::resume::<B>(&changed, &dir.path().join("state"), &Default::default(), &mut |_| true).unwrap_err().to_string();
    assert!(err.contains("network_weights tensors"), "{err}");
    let resumed = trainer::train::resume::<B>(&next, &dir.path().join("state"), &Default::default(), &mut |_| true).unwrap();
    assert_eq!(resumed.losses.len(), 3);
    assert_eq!(shape(&load(&resumed.lora)), shape(&trained));

    next.lora.network_weights.clear();
    let err = train::<B>(&next, &Default::default(), &mut |_| true).unwrap_err().to_string();
    assert!(err.contains("dim_from_weights") && err.contains("network_weights"), "{err}");
}

/// kohya's rank and module dropout change the run from its second step (the first sees
/// zero `up` weights), reproducibly, and are read from `--set`; with gradient
/// checkpointing (whose recomputed blocks would draw other masks) they are refused.
#[test]
fn rank_and_module_dropout_train_reproducibly() {
    let _guard = seeded();
    let dir = tempfile::tempdir().unwrap();
    let losses = |edit: &dyn Fn(&mut TrainConfig)| {
        let mut c = quick_config(dir.path(), 3);
        c.output.sample_steps = 1;
        c.train.learning_rate = 1e-2;
        edit(&mut c);
        train::<B>(&c, &Default::default(), &mut |_| true).unwrap().losses
    };
    let plain = losses(&|_| {});
    let dropped = losses(&|c| (c.lora.rank_dropout, c.lora.module_dropout) = (0.5, 0.3));
    assert_eq!(plain[0].to_bits(), dropped[0].to_bits());
    assert_ne!(plain[1..], dropped[1..]);
    assert_eq!(dropped, losses(&|c| (c.lora.rank_dropout, c.lora.module_dropout) = (0.5, 0.3)), "seeded");
    // kohya's network dropout (on down(x)): from the second step on (the first `up` is 0).
    let network = losses(&|c| c.lora.network_dropout = 0.5);
    assert_eq!(plain[0].to_bits(), network[0].to_bits());
    assert!(network[1..] != plain[1..] && network[1..] != dropped[1..]);
    for (key, p) in [("lora.dropout", "0.1"), ("lora.network_dropout", "0.1"), ("lora.rank_dropout", "0.1"), ("lora.module_dropout", "0.1")] {
        let sets = [format!("{key}={p}"), "train.gradient_checkpointing=true".into()];
        let err = TrainConfig::load(None, &sets).unwrap_err().to_string();
        assert!(err.contains("gradient_checkpointing") && err.contains(key), "{err}");
    }

    let c = TrainConfig::load(None, &["lora.rank_dropout=0.1".into(), "lora.module_dropout=0.05".into()]).unwrap();
    assert_eq!((c.lora.linear_config().rank_dropout, c.lora.linear_config().module_dropout), (0.1, 0.05));
    let err = TrainConfig::load(None, &["lora.rank_dropout=1.0".into()]).unwrap_err().to_string();
    assert!(err.contains("lora.rank_dropout"), "{err}");
}

#[test]
fn multires_noise_input_perturbation_and_debiased_weights_change_the_loss() {
    let _guard = seeded();
    let dir = tempfile::tempdir().unwrap();
    let first_loss = |edit: &dyn Fn(&mut TrainConfig)| {
        let mut c = quick_config(dir.path(), 1);
        c.output.sample_steps = 1;
        edit(&mut c);
        train::<B>(&c, &Default::default(), &mut |_| true).unwrap().losses[0]
    };
    let plain = first_loss(&|_| {});
    assert_eq!(plain.to_bits(), first_loss(&|_| {}).to_bits(), "deterministic");
    type Edit<'a> = (&'a str, &'a dyn Fn(&mut TrainConfig));
    let edits: [Edit; 3] = [
        ("multires", &|c| c.train.multires_noise_iterations = 4),
        ("ip noise", &|c| c.train.ip_noise_gamma = 0.5),
        ("debiased", &|c| c.train.debiased_estimation_loss = true),
    ];
    for (name, edit) in edits {
        let loss = first_loss(edit);
        assert!(loss.is_finite() && loss != plain, "{name}: {loss} vs {plain}");
    }
    // Random strengths draw a different offset / γ than the fixed maximum.
    let offset = first_loss(&|c| c.train.noise_offset = 0.5);
    let random_offset = first_loss(&|c| (c.train.noise_offset, c.train.noise_offset_random_strength) = (0.5, true));
    assert!(random_offset.is_finite() && random_offset != offset);
    let gamma = first_loss(&|c| c.train.ip_noise_gamma = 0.5);
    let random_gamma = first_loss(&|c| (c.train.ip_noise_gamma, c.train.ip_noise_gamma_random_strength) = (0.5, true));
    assert!(random_gamma.is_finite() && random_gamma != gamma);
    let err = TrainConfig::load(None, &["train.ip_noise_gamma=-1".into()]).unwrap_err();
    assert!(err.to_string().contains("ip_noise_gamma"), "{err}");
    // A level count past any latent size is refused (4294967296 aborted on its allocation).
    TrainConfig::load(None, &[format!("train.multires_noise_iterations={}", sd_sched::training::MAX_PYRAMID_LEVELS)]).unwrap();
    let err = TrainConfig::load(None, &["train.multires_noise_iterations=4294967296".into()]).unwrap_err();
    assert!(err.to_string().contains("train.multires_noise_iterations = 4294967296"), "{err}");
    // kohya's adaptive noise offset: per-channel strengths from the latents' means, the
    // same draws as the plain offset (so a scale of 0 is the plain offset).
    let adaptive = first_loss(&|c| (c.train.noise_offset, c.train.adaptive_noise_scale) = (0.5, 0.5));
    assert!(adaptive.is_finite() && adaptive != offset, "{adaptive} vs {offset}");
    let err = TrainConfig::load(None, &["train.adaptive_noise_scale=0.05".into()]).unwrap_err();
    assert!(err.to_string().contains("adaptive_noise_scale") && err.to_string().contains("noise_offset"), "{err}");

    // kohya's v-prediction loss scalings: SNR/(SNR+1) < 1 lowers a v-prediction loss;
    // 1 + λ(SNR+1)/SNR > 1 raises an ε-prediction loss.
    let v = |c: &mut TrainConfig| c.train.prediction = trainer::config::Prediction::VPrediction;
    let plain_v = first_loss(&v);
    let scaled_v = first_loss(&|c| {
        v(c);
        c.train.scale_v_pred_loss_like_noise_pred = true;
    });
    assert!(scaled_v > 0.0 && scaled_v < plain_v, "{scaled_v} vs {plain_v}");
    let v_like = first_loss(&|c| c.train.v_pred_like_loss = 0.5);
    assert!(v_like > plain * 1.5, "{v_like} vs {plain}");
    let mut c = quick_config(dir.path(), 1);
    c.train.scale_v_pred_loss_like_noise_pred = true;
    let err = train::<B>(&c, &Default::default(), &mut |_| true).unwrap_err().to_string();
    assert!(err.contains("v-prediction"), "{err}");
    let mut c = quick_config(dir.path(), 1);
    v(&mut c);
    c.train.v_pred_like_loss = 0.5;
    let err = train::<B>(&c, &Default::default(), &mut |_| true).unwrap_err().to_string();
    assert!(err.contains("v_pred_like_loss") && err.contains("ε-prediction"), "{err}");
}

#[test]
fn max_train_epochs_sets_the_steps() {
    let _guard = seeded();
    let dir = tempfile::tempdir().unwrap();
    let mut config = quick_config(dir.path(), 1000);
    config.data.demo_images = 6;
    config.train.train_batch_size = 2;
    let batches = trainer::train::open_dataset(&config).unwrap().plan_epoch(0).len();
    assert!(batches >= 3);
    config.train.max_train_epochs = 2;
    config.train.gradient_accumulation_steps = 2;
    let resolved = trainer::train::with_epoch_steps(&config).unwrap();
    assert_eq!(resolved.train.max_train_steps, 2 * batches.div_ceil(2), "sd-scripts' count: the epoch's last step takes what is left");
    config.train.max_train_epochs = 1;
    config.train.gradient_accumulation_steps = 1;
    config.output.save_every_n_epochs = 1;
    config.output.sample_steps = 1;
    let report = train::<B>(&config, &Default::default(), &mut |_| true).unwrap();
    assert_eq!(report.losses.len(), batches, "one epoch: one step per batch");
    let written = TrainConfig::load(Some(&report.config), &[]).unwrap();
    assert_eq!((written.train.max_train_epochs, written.train.max_train_steps), (1, batches));
    // A bad configuration is an error here too, not a division by zero.
    config.train.gradient_accumulation_steps = 0;
    assert!(trainer::train::with_epoch_steps(&config).is_err());
}

/// kohya's `validate_every_n_epochs` measures at the end of every N-th epoch (and at the
/// end); its `save_n_epoch_ratio` saves every `⌊epochs / ratio⌋` epochs.
#[test]
fn validation_and_saves_by_epochs() {
    let _guard = seeded();
    let dir = tempfile::tempdir().unwrap();
    let mut c = quick_config(dir.path(), 9);
    (c.data.demo_images, c.data.validation_split, c.train.train_batch_size) = (10, 0.2, 2);
    (c.output.validate_every_n_epochs, c.output.save_n_epoch_ratio, c.output.save_every_n_epochs) = (1, 2, 7);
    let (train_set, _) = trainer::train::training_datasets(&c).unwrap();
    let batches = train_set.plan_epoch(0).len();
    assert!(batches > 1 && batches < 9, "{batches} batches per epoch");
    let report = train::<B>(&c, &Default::default(), &mut |_| true).unwrap();
    let steps: Vec<usize> = report.validation.iter().map(|(s, _)| *s).collect();
    let mut expected: Vec<usize> = (1..).map(|e| e * batches).take_while(|s| *s < 9).collect();
    expected.push(9);
    assert_eq!(steps, expected);
    // ⌈9 / batches⌉ epochs, saves every ⌊epochs / 2⌋ (the ratio replaces save_every_n_epochs).
    let every = (9usize.div_ceil(batches) / 2).max(1);
    let mut saves: Vec<String> = std::fs::read_dir(dir.path()).unwrap().filter_map(|e| e.ok()?.file_name().into_string().ok()).filter(|n| n.strip_prefix("demo_lora-").is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_digit()))).collect();
    saves.sort();
    let expected: Vec<String> = (1..).map(|e| e * every).take_while(|e| e * batches < 9).map(|e| format!("demo_lora-{e:06}.safetensors")).collect();
    assert_eq!(saves, expected);
}

/// kohya's `max_validation_steps` measures the first batches of held-out images only.
#[test]
fn max_validation_steps_takes_the_first_batches() {
    let _guard = seeded();
    let run = |max: usize| {
        let dir = tempfile::tempdir().unwrap();
        let mut c = quick_config(dir.path(), 1);
        (c.data.demo_images, c.data.validation_split, c.train.train_batch_size) = (10, 0.4, 1);
        c.output.max_validation_steps = max;
        let (_, validation) = trainer::train::training_datasets(&c).unwrap();
        assert_eq!(validation.unwrap().plan_epoch(0).len(), 4, "4 held-out batches");
        train::<B>(&c, &Default::default(), &mut |_| true).unwrap().validation[0].1
    };
    let (all, first, many) = (run(0), run(1), run(10));
    assert_ne!(all.to_bits(), first.to_bits());
    assert_eq!(all.to_bits(), many.to_bits(), "a limit above the batches changes nothing");
}

#[test]
fn validation_loss_is_measured_without_touching_the_training_run() {
    let _guard = seeded();
    let run = |every: usize, stop_at: Option<usize>| {
        let dir = tempfile::tempdir().unwrap();
        let mut c = quick_config(dir.path(), 6);
        c.data.demo_images = 10;
        c.data.validation_split = 0.2;
        c.output.validate_every_n_steps = every;
        c.output.sample_steps = 1;
        c.lora.dropout = 0.1;
        let first = train::<B>(&c, &Default::default(), &mut |info| stop_at.is_none_or(|s| info.step < s)).unwrap();
        let report = match stop_at {
            Some(_) => trainer::train::resume::<B>(&c, &dir.path().join("state"), &Default::default(), &mut |_| true).unwrap(),
            None => first,
        };
        let log = std::fs::read_to_string(dir.path().join("validation.jsonl")).unwrap();
        (report, log, dir)
    };
    let (every_2, log, _d1) = run(2, None);
    let steps: Vec<usize> = every_2.validation.iter().map(|(s, _)| *s).collect();
    assert_eq!(steps, [2, 4, 6]);
    assert!(every_2.validation.iter().all(|(_, l)| l.is_finite() && *l > 0.0));
    assert_eq!(log.lines().count(), 3);
    // Validating draws nothing from the training streams: the same losses without it, and
    // the same validation loss at the end.
    let (at_end, _, _d2) = run(0, None);
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&at_end.losses), bits(&every_2.losses));
    assert_eq!(at_end.validation.len(), 1);
    assert_eq!(at_end.validation[0].1.to_bits(), every_2.validation[2].1.to_bits());
    // A resumed run keeps the earlier measurements and makes the same ones.
    let (resumed, log, _d3) = run(2, Some(3));
    assert_eq!(resumed.validation, every_2.validation);
    assert_eq!(log.lines().count(), 3);
    // 10 demo images, 2 held out.
    let mut c = quick_config(std::path::Path::new("unused"), 1);
    c.data.demo_images = 10;
    c.data.validation_split = 0.2;
    let (train_set, validation) = trainer::train::training_datasets(&c).unwrap();
    assert_eq!((train_set.images().len(), validation.unwrap().images().len()), (8, 2));
}

#[test]
fn save_last_n_keeps_only_the_latest_intermediate_saves() {
    let _guard = seeded();
    let dir = tempfile::tempdir().unwrap();
    let mut c = quick_config(dir.path(), 7);
    c.data.demo_images = 4;
    c.train.train_batch_size = 2;
    c.output.sample_steps = 1;
    c.output.save_state = false;
    c.output.save_every_n_steps = 1;
    c.output.save_last_n_steps = 3;
    c.output.save_every_n_epochs = 1;
    c.output.save_last_n_epochs = 2;
    // Someone else's file in the folder stays.
    std::fs::write(dir.path().join("demo_lora-step-notes.safetensors"), b"x").unwrap();
    train::<B>(&c, &Default::default(), &mut |_| true).unwrap();
    let mut files: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".safetensors"))
        .collect();
    files.sort();
    let batches = trainer::train::open_dataset(&c).unwrap().plan_epoch(0).len();
    // Epoch saves replace the step saves of the steps that end an epoch.
    let epoch_steps: Vec<usize> = (1..7).filter(|s| s % batches == 0).collect();
    // kohya keeps the saves of steps `last save − 3` and later: 3, 4, 5, 6.
    let mut expected: Vec<String> = (3..7).filter(|s| !epoch_steps.contains(s)).map(|s| format!("demo_lora-step{s:08}.safetensors")).collect();
    let epochs: Vec<usize> = epoch_steps.iter().map(|s| s / batches).collect();
    expected.extend(epochs.iter().rev().take(2).map(|e| format!("demo_lora-{e:06}.safetensors")));
    expected.extend(["demo_lora-step-notes.safetensors".to_string(), "demo_lora.safetensors".to_string()]);
    expected.sort();
    assert_eq!(files, expected, "{batches} batches per epoch");
}

#[test]
fn zero_terminal_snr_trains_at_the_last_timestep() {
    let _guard = seeded();
    let dir = tempfile::tempdir().unwrap();
    for prediction in [trainer::config::Prediction::VPrediction, trainer::config::Prediction::Epsilon] {
        let mut c = quick_config(dir.path(), 2);
        c.output.sample_steps = 1;
        c.train.zero_terminal_snr = Some(true);
        c.train.prediction = prediction;
        c.train.debiased_estimation_loss = true;
        // Only t = 999, where the rescaled schedule's SNR is exactly 0.
        (c.train.min_timestep, c.train.max_timestep) = (999, 1000);
        let report = train::<B>(&c, &Default::default(), &mut |_| true).unwrap();
        assert!(report.losses.iter().all(|l| l.is_finite()), "{prediction:?}: {:?}", report.losses);
        let mut plain = c.clone();
        plain.train.zero_terminal_snr = Some(false);
        let other = train::<B>(&plain, &Default::default(), &mut |_| true).unwrap();
        assert_ne!(other.losses[0], report.losses[0], "{prediction:?}: the rescaled schedule changes the noised input");
    }
}

#[test]
fn data_summary_counts_images_batches_buckets_and_epochs() {
    let mut c = TrainConfig::default();
    c.data.demo_images = 12;
    c.train.train_batch_size = 2;
    c.train.max_train_epochs = 3;
    c.train.gradient_accumulation_steps = 2;
    c.data.validation_split = 0.25;
    let summary = trainer::train::data_summary(&c, &trainer::train::training_datasets(&c).unwrap()).unwrap();
    let batches = trainer::train::training_datasets(&c).unwrap().0.plan_epoch(0).len();
    assert!(summary.starts_with(&format!("data: 9 images, 9 samples per epoch in {batches} batches of up to 2; buckets (WxH: samples) ")), "{summary}");
    assert!(summary.contains("validation: 3 held-out images"), "{summary}");
    let steps = 3 * batches.div_ceil(2);
    assert!(summary.ends_with(&format!("{steps} optimizer steps of 2 batches each: 3.0 epochs")), "{summary}");
}

#[test]
fn l1_and_scheduled_pseudo_huber_losses_train() {
    use trainer::config::{HuberScheduleKind, LossKind};
    let _guard = seeded();
    let dir = tempfile::tempdir().unwrap();
    let first_loss = |kind: LossKind, schedule: HuberScheduleKind| {
        let mut c = quick_config(dir.path(), 1);
        c.output.sample_steps = 1;
        (c.train.loss_type, c.train.huber_schedule) = (kind, schedule);
        train::<B>(&c, &Default::default(), &mut |_| true).unwrap().losses[0]
    };
    let l2 = first_loss(LossKind::L2, HuberScheduleKind::Snr);
    let mut seen = vec![l2];
    for (kind, schedule) in [
        (LossKind::L1, HuberScheduleKind::Snr),
        (LossKind::Huber, HuberScheduleKind::Snr),
        (LossKind::Huber, HuberScheduleKind::Exponential),
        (LossKind::SmoothL1, HuberScheduleKind::Constant),
    ] {
        let loss = first_loss(kind, schedule);
        assert!(loss.is_finite() && loss > 0.0 && !seen.contains(&loss), "{kind:?} {schedule:?}: {loss} ({seen:?})");
        seen.push(loss);
    }
    let parsed = TrainConfig::load(None, &["train.loss_type=\"smooth_l1\"".into(), "train.huber_schedule=\"exponential\"".into()]).unwrap();
    assert_eq!((parsed.train.loss_type, parsed.train.huber_schedule), (LossKind::SmoothL1, HuberScheduleKind::Exponential));
    let err = TrainConfig::load(None, &["train.huber_c=0".into()]).unwrap_err();
    assert!(err.to_string().contains("huber_c"), "{err}");
}

/// kohya's `max_token_length`: captions past 75 tokens are noted in the summary and, with
/// 150, reach the text encoder (frozen and cached, or trained), the validation loss and the
/// samples; other lengths are rejected naming the key.
#[test]
fn long_captions_train_with_max_token_length() {
    let _guard = seeded();
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    let long: Vec<String> = (0..40).map(|i| format!("tag{}", i % 7)).collect();
    write_image(&data, "a", &format!("mystyle, {}", long.join(", ")), 30);
    write_image(&data, "b", "mystyle, a short caption", 220);
    write_image(&data, "c", "mystyle, another one", 120);
    let mut config = quick_config(&root.path().join("out75"), 2);
    config.data.train_data_dir = data.display().to_string();
    config.data.resolution = sd_data::Resolution::square(64);
    config.train.train_batch_size = 3;
    config.output.sample_prompts = vec![format!("mystyle, {}", long.join(", "))];
    let summary = trainer::train::data_summary(&config, &trainer::train::training_datasets(&config).unwrap()).unwrap();
    assert!(summary.contains("note: 1 of 3 captions have more than 75 tokens (the longest 122)"), "{summary}");
    assert!(summary.contains("model.max_token_length = 150 or 225"), "{summary}");
    let short = train::<B>(&config, &Default::default(), &mut |_| true).unwrap();

    let mut long_config = config.clone();
    long_config.model.max_token_length = 150;
    long_config.output.output_dir = root.path().join("out150");
    long_config.data.validation_split = 0.34;
    long_config.train.train_batch_size = 2;
    let summary = trainer::train::data_summary(&long_config, &trainer::train::training_datasets(&long_config).unwrap()).unwrap();
    assert!(!summary.contains("note:"), "{summary}");
    let frozen = train::<B>(&long_config, &Default::default(), &mut |_| true).unwrap();
    assert!(frozen.sample_grid.is_some() && frozen.losses.iter().all(|l| l.is_finite()));
    assert!(!frozen.validation.is_empty());
    long_config.lora.text_encoder_targets = sd_model::targets::TextEncoderTargets::Attn;
    long_config.output.output_dir = root.path().join("out150te");
    let trained = train::<B>(&long_config, &Default::default(), &mut |_| true).unwrap();
    // The text encoder's adapters start at zero: the first step's loss is the frozen run's
    // (up to rounding: the frozen run encodes its captions once for the cache, in other
    // batches, and CPU matmul kernels round by batch shape and instruction set).
    let (a, b) = (trained.losses[0], frozen.losses[0]);
    assert!((a - b).abs() <= 1e-6 * b.abs(), "{a} against {b}");
    assert!(trained.validation.iter().all(|(_, l)| l.is_finite()));

    // The same batch with 150 tokens conditions the UNet on the whole long caption.
    long_config.data.validation_split = 0.0;
    long_config.train.train_batch_size = 3;
    long_config.lora.text_encoder_targets = sd_model::targets::TextEncoderTargets::None;
    long_config.output.output_dir = root.path().join("out150all");
    let all = train::<B>(&long_config, &Default::default(), &mut |_| true).unwrap();
    assert_ne!(all.losses[0], short.losses[0]);

    for bad in [0, 100, 76, 75 * 9] {
        config.model.max_token_length = bad;
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("model.max_token_length"), "{bad}: {err}");
    }
}

/// LoRA files carry kohya's training metadata (dataset folders, tag counts, settings, the
/// step and epoch of each save), the model spec and the A1111 hash; `no_metadata` keeps
/// only what loading needs.
#[test]
fn lora_files_carry_kohya_metadata_and_the_model_spec() {
    let _guard = seeded();
    let root = tempfile::tempdir().unwrap();
    let train_dir = root.path().join("train");
    write_image(&train_dir.join("3_mystyle"), "a", "mystyle, Red, circle", 10);
    write_image(&train_dir.join("3_mystyle"), "b", "mystyle, blue, circle", 200);
    write_image(&root.path().join("reg/1_style"), "r", "a picture", 90);
    let mut config = quick_config(&root.path().join("out"), 4);
    config.data.train_data_dir = train_dir.display().to_string();
    config.data.reg_data_dir = root.path().join("reg").display().to_string();
    config.train.train_batch_size = 2;
    config.output.save_every_n_steps = 2;
    config.output.training_comment = "trigger: mystyle".into();
    config.output.metadata_author = "me".into();
    config.output.metadata_trigger_phrase = "mystyle".into();
    config.output.metadata_usage_hint = "add mystyle".into();
    // A thumbnail file becomes a data URL (sd-scripts' base64 of its bytes).
    std::fs::write(root.path().join("thumb.png"), b"\x89PNG\r\n\x1a\n").unwrap();
    config.output.metadata_thumbnail = root.path().join("thumb.png").display().to_string();
    config.model.clip_skip = 2;
    let report = train::<B>(&config, &Default::default(), &mut |_| true).unwrap();
    let meta = lora_metadata(&report.lora);
    let json = |k: &str| serde_json::from_str::<serde_json::Value>(&meta[k]).unwrap_or_else(|e| panic!("{k}: {e}"));
    assert_eq!(json("ss_tag_frequency"), serde_json::json!({ "3_mystyle": { "mystyle": 2, "red": 1, "blue": 1, "circle": 2 }, "1_style": { "a picture": 1 } }));
    assert_eq!(json("ss_dataset_dirs"), serde_json::json!({ "3_mystyle": { "n_repeats": 3, "img_count": 2 } }));
    assert_eq!(json("ss_reg_dataset_dirs"), serde_json::json!({ "1_style": { "n_repeats": 1, "img_count": 1 } }));
    for (k, v) in [
        ("ss_output_name", "demo_lora"),
        ("ss_num_train_images", "6"),
        ("ss_num_reg_images", "1"),
        ("ss_steps", "4"),
        ("ss_clip_skip", "2"),
        ("ss_network_dim", "8"),
        ("ss_base_model_version", "tiny"),
        ("ss_v2", "False"),
        ("ss_training_comment", "trigger: mystyle"),
        ("ss_lr_scheduler", "cosine"),
        ("modelspec.sai_model_spec", "1.0.1"),
        ("modelspec.title", "demo_lora"),
        ("modelspec.author", "me"),
        ("modelspec.trigger_phrase", "mystyle"),
        ("modelspec.usage_hint", "add mystyle"),
        ("modelspec.thumbnail", "data:image/png;base64,iVBORw0KGgo="),
        ("modelspec.encoder_layer", "2"),
        ("modelspec.prediction_type", "epsilon"),
    ] {
        assert_eq!(meta.get(k).map(String::as_str), Some(v), "{k}");
    }
    assert!(meta["sshs_model_hash"].len() == 64 && meta["sshs_legacy_hash"].len() == 8);
    let started: f64 = meta["ss_training_started_at"].parse().unwrap();
    assert!(meta["ss_training_finished_at"].parse::<f64>().unwrap() >= started);
    assert!(meta["modelspec.date"].starts_with("20") && meta["modelspec.date"].ends_with('Z'), "{}", meta["modelspec.date"]);
    // An intermediate save records its own step.
    let early = root.path().join("out/demo_lora-step00000002.safetensors");
    assert_eq!(lora_metadata(&early)["ss_steps"], "2");

    config.output.no_metadata = true;
    config.output.output_dir = root.path().join("bare");
    let bare = lora_metadata(&train::<B>(&config, &Default::default(), &mut |_| true).unwrap().lora);
    assert!(!bare.contains_key("ss_tag_frequency") && !bare.contains_key("ss_training_comment") && !bare.contains_key("ss_steps"), "{bare:?}");
    for k in ["ss_network_dim", "ss_network_alpha", "ss_base_model_version", "modelspec.architecture", "sshs_model_hash"] {
        assert!(bare.contains_key(k), "{k}");
    }
    // A thumbnail that is not there is an error before any step.
    config.output.metadata_thumbnail = root.path().join("missing.png").display().to_string();
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("output.metadata_thumbnail") && err.contains("missing.png"), "{err}");
    // Nor one that is not an image, whatever its name.
    std::fs::write(root.path().join("notes.png"), b"just some notes").unwrap();
    config.output.metadata_thumbnail = root.path().join("notes.png").display().to_string();
    let err = config.validate().unwrap_err().to_string();
    assert!(err.contains("output.metadata_thumbnail") && err.contains("not an image"), "{err}");
}

/// kohya's `scale_weight_norms`: every adapter written (UNet and text encoder) has an
/// update norm at most the limit, the steps' statistics reach metrics.jsonl, and off
/// means no statistics.
#[test]
fn scale_weight_norms_keeps_every_adapter_under_the_limit() {
    let _guard = seeded();
    let dir = tempfile::tempdir().unwrap();
    let mut config = quick_config(dir.path(), 4);
    config.lora.text_encoder_targets = sd_model::targets::TextEncoderTargets::Attn;
    config.train.learning_rate = 1e-2;
    let free = train::<B>(&config, &Default::default(), &mut |_| true).unwrap();
    let metrics = std::fs::read_to_string(&free.metrics).unwrap();
    assert!(!metrics.contains("keys_scaled"));
    let norms = |path: &std::path::Path| -> Vec<f64> {
        let index = tiny_index_with_text_encoder();
        let (set, _) = AdapterSet::load(path, &index, ReadOptions::default()).unwrap();
        set.iter().map(|(_, w)| w.delta().data.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt()).collect()
    };
    let free_norms = norms(&free.lora);
    let limit = free_norms.iter().cloned().fold(0.0, f64::max) / 2.0;
    assert!(free_norms.iter().filter(|n| **n > limit).count() >= 1);

    config.train.scale_weight_norms = limit;
    config.output.output_dir = dir.path().join("limited");
    let limited = train::<B>(&config, &Default::default(), &mut |_| true).unwrap();
    let limited_norms = norms(&limited.lora);
    assert!(limited_norms.iter().all(|n| *n <= limit * (1.0 + 1e-4)), "{limited_norms:?} over {limit}");
    let last: serde_json::Value = serde_json::from_str(std::fs::read_to_string(&limited.metrics).unwrap().lines().last().unwrap()).unwrap();
    assert!(last["keys_scaled"].as_f64().unwrap() >= 1.0, "{last}");
    let max_key = last["max_key_norm"].as_f64().unwrap();
    assert!(max_key <= limit * (1.0 + 1e-4) && last["average_key_norm"].as_f64().unwrap() <= max_key, "{last}");
    assert!((limited_norms.iter().cloned().fold(0.0, f64::max) - max_key).abs() <= 1e-3 * max_key, "the statistics describe the saved adapters");

    config.train.scale_weight_norms = -1.0;
    assert!(config.validate().unwrap_err().to_string().contains("train.scale_weight_norms"));
}

/// kohya's `sample_at_first`: a grid before the first step, and the run is otherwise the
/// same, loss for loss.
#[test]
fn sample_at_first_writes_the_untrained_grid_and_changes_nothing_else() {
    let _guard = seeded();
    let dir = tempfile::tempdir().unwrap();
    let mut config = quick_config(&dir.path().join("plain"), 2);
    let plain = train::<B>(&config, &Default::default(), &mut |_| true).unwrap();
    assert!(!dir.path().join("plain/samples-step000000.png").exists());
    config.output.sample_at_first = true;
    config.output.output_dir = dir.path().join("first");
    let first = train::<B>(&config, &Default::default(), &mut |_| true).unwrap();
    let grid = image::open(dir.path().join("first/samples-step000000.png")).unwrap();
    assert_eq!(grid.width(), image::open(first.sample_grid.unwrap()).unwrap().width());
    assert_eq!(plain.losses, first.losses);
}

/// Writes `name.png`, 96x64 px, with an alpha channel from `alpha(x)`, and its caption.
fn write_rgba_image(dir: &std::path::Path, name: &str, alpha: impl Fn(u32) -> u8) {
    std::fs::create_dir_all(dir).unwrap();
    let img = image::RgbaImage::from_fn(96, 64, |x, y| image::Rgba([40, (x * 2) as u8, (y * 4) as u8, alpha(x)]));
    img.save(dir.join(format!("{name}.png"))).unwrap();
    std::fs::write(dir.join(format!("{name}.txt")), "masked").unwrap();
}

/// kohya's masked loss: the loss is linear in the mask, so masks that split the image in
/// two give losses that add up to the unmasked one; an opaque alpha changes nothing, a
/// transparent one trains nothing. Masks from a folder work the same way. The image sits
/// in a non-square bucket (80x48), so a mask with its sides swapped could not be applied.
#[test]
fn masked_loss_trains_only_where_the_mask_lets_it() {
    let _guard = seeded();
    let root = tempfile::tempdir().unwrap();
    let first_loss = |folder: &str, alpha: &dyn Fn(u32) -> u8, edit: &dyn Fn(&mut TrainConfig)| {
        let dir = root.path().join(folder);
        write_rgba_image(&dir, "a", alpha);
        let mut c = quick_config(&root.path().join(format!("out-{folder}")), 1);
        c.data.train_data_dir = dir.display().to_string();
        (c.data.min_bucket_reso, c.data.bucket_reso_steps) = (32, 16);
        c.train.train_batch_size = 1;
        c.output.sample_prompts.clear();
        edit(&mut c);
        assert_eq!(trainer::train::open_dataset(&c).unwrap().plan_epoch(0)[0].bucket, (80, 48));
        train::<B>(&c, &Default::default(), &mut |_| true).unwrap().losses[0]
    };
    let alpha_mask = |c: &mut TrainConfig| c.data.alpha_mask = true;
    let half = |x: u32| if x < 48 { 255 } else { 0 };
    let plain = first_loss("plain", &|_| 255, &|_| {});
    assert_eq!(first_loss("opaque", &|_| 255, &alpha_mask).to_bits(), plain.to_bits());
    let left = first_loss("left", &half, &alpha_mask);
    let right = first_loss("right", &|x| 255 - half(x), &alpha_mask);
    assert!(left > 0.0 && right > 0.0 && left < plain && right < plain, "{left} {right} {plain}");
    assert!(((left + right) - plain).abs() <= 1e-5 * plain, "{left} + {right} != {plain}");
    assert_eq!(first_loss("clear", &|_| 0, &alpha_mask), 0.0);
    // Without alpha_mask the alpha channel is not a mask.
    assert_eq!(first_loss("unmasked", &half, &|_| {}).to_bits(), plain.to_bits());
    // Gradient checkpointing computes the same masked loss.
    let checkpointed = first_loss("checkpointed", &half, &|c| (c.data.alpha_mask, c.train.gradient_checkpointing) = (true, true));
    assert!((checkpointed - left).abs() <= 1e-5 * plain, "{checkpointed} vs {left}");

    // A mask folder: grey value 255 where the left half of the alpha above was opaque.
    let masks = root.path().join("masks");
    std::fs::create_dir_all(&masks).unwrap();
    image::GrayImage::from_fn(96, 64, |x, _| image::Luma([half(x)])).save(masks.join("a.png")).unwrap();
    let mask_dir = masks.display().to_string();
    let from_file = first_loss("file", &|_| 255, &|c| c.data.mask_dir = mask_dir.clone());
    assert!((from_file - left).abs() <= 1e-6 * plain, "{from_file} vs {left}");

    // A missing mask names the image; masks and the demo data do not mix.
    std::fs::remove_file(masks.join("a.png")).unwrap();
    let mut c = quick_config(root.path(), 1);
    c.data.train_data_dir = root.path().join("file").display().to_string();
    c.data.mask_dir = mask_dir.clone();
    let err = train::<B>(&c, &Default::default(), &mut |_| true).unwrap_err().to_string();
    assert!(err.contains("a.png") && err.contains("mask"), "{err}");
    let err = TrainConfig::load(None, &[format!("data.mask_dir={mask_dir}")]).unwrap_err().to_string();
    assert!(err.contains("data.mask_dir"), "{err}");
    let err = TrainConfig::load(None, &["data.alpha_mask=true".into(), "data.mask_dir=x".into(), "data.train_data_dir=y".into()]).unwrap_err().to_string();
    assert!(err.contains("alpha_mask"), "{err}");
    let err = TrainConfig::load(None, &["data.alpha_mask=true".into(), "data.dataset_config=d.json".into()]).unwrap_err().to_string();
    assert!(err.contains("dataset_config"), "{err}");
}

/// kohya's block-wise ranks and learning rates and LoRA+, read off the adapters after one
/// AdamW step: a zero-initialised `up` weight moves by the learning rate times its
/// factor (Adam's first step is `±lr` per element).
#[test]
fn block_ranks_block_learning_rates_and_loraplus() {
    let _guard = seeded();
    let dir = tempfile::tempdir().unwrap();
    let mut config = quick_config(dir.path(), 1);
    config.train.lr_warmup_steps = 0;
    config.output.sample_prompts.clear();
    config.lora.unet_targets = sd_model::targets::UnetTargets::Conv;
    // Ranks: 2 in the down path, 4 in the middle, 3 in the up path; 3x3 convolutions rank 1
    // in the up path only.
    let per_block = |down: &str, mid: &str, up: &str| {
        let mut v = vec!["0"];
        v.extend([down; 11]);
        v.push(mid);
        v.extend([up; 12]);
        v.join(",")
    };
    config.lora.block_dims = per_block("2", "4", "3");
    config.lora.block_alphas = per_block("1", "0", "1.5");
    config.lora.conv_block_dims = per_block("0", "0", "1");
    // All twelve up blocks at 0.5 (a shorter list would end in ones, as kohya's).
    config.lora.up_lr_weight = ["0.5"; 12].join(",");
    // LoRA+ on the text encoder from the shared ratio (the UNet has its own).
    config.lora.text_encoder_targets = sd_model::targets::TextEncoderTargets::Attn;
    config.lora.loraplus_lr_ratio = 2.0;
    config.lora.mid_lr_weight = "0".into();
    config.lora.loraplus_unet_lr_ratio = 4.0;
    let lr = config.train.learning_rate as f32;
    let report = train::<B>(&config, &Default::default(), &mut |_| true).unwrap();
    let (set, _) = AdapterSet::load(&report.lora, &tiny_index_with_text_encoder(), ReadOptions::default()).unwrap();
    let block = |path: &str| sd_model::blocks::kohya_block(path);
    let (mut down, mut up, mut te) = (0, 0, 0);
    for (key, w) in set.iter() {
        if key.component == lora_core::Component::TextEncoder {
            te += 1;
            let max = w.up.data.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            assert!((max - 2.0 * lr).abs() <= 2e-3 * lr, "{key}: {max} vs {}", 2.0 * lr);
            continue;
        }
        let spatial = w.is_conv() && w.down.shape[2..] != [1, 1];
        let b = block(&key.path);
        assert_ne!(b, Some(12), "the middle block's weight is 0: no adapters there ({key})");
        let moved: Vec<f32> = w.up.data.iter().map(|v| v.abs()).filter(|v| *v > 0.0).collect();
        assert!(!moved.is_empty(), "{key}");
        let (rank, alpha, factor) = match b {
            Some(1..=11) => {
                down += 1;
                assert!(!spatial, "no 3x3 adapters in the down path: {key}");
                (2, 1.0, 1.0)
            }
            Some(13..) if spatial => (1, 1.0, 0.5),
            Some(13..) => {
                up += 1;
                (3, 1.5, 0.5)
            }
            _ => (config.lora.rank, config.lora.alpha, 1.0),
        };
        assert_eq!((w.rank(), w.alpha), (rank, alpha), "{key}");
        // LoRA+ times the block's weight: Adam's first step moves each element by the
        // learning rate, less where a gradient is as small as ε (the file holds f16).
        let want = lr * factor * 4.0;
        let max = moved.iter().fold(0.0f32, |m, v| m.max(*v));
        let half = moved.iter().filter(|v| **v > 0.5 * want).count();
        assert!((max - want).abs() <= 2e-3 * want && 2 * half > moved.len(), "{key}: max {max} vs {want}, {half} of {} above half", moved.len());
    }
    assert!(down > 0 && up > 0 && te > 0, "{down} {up} {te}");
    let args: serde_json::Value = serde_json::from_str(&lora_metadata(&report.lora)["ss_network_args"]).unwrap();
    assert_eq!((args["up_lr_weight"].as_str(), args["loraplus_unet_lr_ratio"].as_str()), (Some(&config.lora.up_lr_weight[..]), Some("4")));

    // Bad block settings name their key.
    for (key, value) in [("block_dims", "1,2"), ("up_lr_weight", "wave"), ("conv_block_alphas", &per_block("1", "1", "1")[..])] {
        let err = TrainConfig::load(None, &[format!("lora.{key}={value:?}")]).unwrap_err().to_string();
        assert!(err.contains(key) || err.contains("conv_block_dims"), "{key}: {err}");
    }
    let err = TrainConfig::load(None, &["lora.loraplus_lr_ratio=-1".into()]).unwrap_err().to_string();
    assert!(err.contains("loraplus"), "{err}");
}

/// `data.weighted_captions` reaches the training captions: emphasis changes the loss, and
/// a caption without it trains as it does literally.
#[test]
fn weighted_captions_read_emphasis_in_training() {
    let _guard = seeded();
    let root = tempfile::tempdir().unwrap();
    let first_loss = |caption: &str, weighted: bool| {
        let dir = root.path().join(format!("{}-{weighted}", caption.len()));
        write_image(&dir, "a", caption, 60);
        let mut c = quick_config(&root.path().join("out"), 1);
        c.data.train_data_dir = dir.display().to_string();
        (c.data.min_bucket_reso, c.train.train_batch_size) = (64, 1);
        c.output.sample_prompts.clear();
        c.data.weighted_captions = weighted;
        train::<B>(&c, &Default::default(), &mut |_| true).unwrap().losses[0]
    };
    let literal = first_loss("mystyle, red circle", false);
    assert_eq!(first_loss("mystyle, red circle", true).to_bits(), literal.to_bits());
    // The same tokens as the literal caption, one of them weighted.
    let emphasis = first_loss("(mystyle:1.5), red circle", true);
    assert!(emphasis.is_finite() && emphasis != literal, "{emphasis} vs {literal}");
}

/// At strength 0.5 the LoRA file `lora` moves the tiny UNet's output off the base model's;
/// baked in, it gives what it gives attached. `what` names it in failures.
fn assert_applies_at_half_strength(lora: &std::path::Path, what: &str) {
    let device = Default::default();
    let run = |unet: &sd_model::UNet2DConditionModel<Flex>| {
        let x = burn::tensor::Tensor::<Flex, 4>::ones([1, 4, 8, 8], &device).mul_scalar(0.3);
        let t = burn::tensor::Tensor::<Flex, 1>::from_floats([500.0], &device);
        let ctx = burn::tensor::Tensor::<Flex, 3>::ones([1, 77, sd_model::UnetConfig::tiny().cross_attention_dim], &device).mul_scalar(0.1);
        unet.forward(x, t, ctx).unwrap().into_data().to_vec::<f32>().unwrap()
    };
    // The trained-on tiny model (seeded: both copies hold the same weights).
    let base = sd_pipeline::load_components::<Flex>("tiny", 0, &device).unwrap().unet;
    let mut half = sd_pipeline::load_components::<Flex>("tiny", 0, &device).unwrap().unet;
    let file: sd_model::lora::LoraFile = format!("{}:0.5", lora.display()).parse().unwrap();
    sd_model::lora::apply_lora_files(&mut half, None, &[file], true, &device).unwrap();
    let (plain, with) = (run(&base), run(&half));
    assert!(plain.iter().zip(&with).any(|(a, b)| (a - b).abs() > 1e-6), "{what} changes nothing");
    lora_core::sites::bake_adapters(&mut half);
    let merged = run(&half);
    let err = merged.iter().zip(&with).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(err < 1e-4, "{what}: merged vs attached: {err}");
}

/// `lora.dora`: every adapter (linear, 3x3 conv, text encoder) is saved with its magnitude
/// as LyCORIS' `dora_scale`; a stopped run resumes bit for bit (the magnitudes and their
/// moments are in the state); a bf16 base trains; the file applies at a strength in
/// generation, and a second file on the same layers is refused.
#[test]
fn dora_trains_resumes_and_applies() {
    let _guard = seeded();
    let dora_config = |dir: &std::path::Path, steps: usize| {
        let mut c = resume_config(dir, steps);
        c.lora.dora = true;
        c.lora.unet_targets = sd_model::targets::UnetTargets::Conv;
        (c.lora.conv_rank, c.lora.conv_alpha) = (2, 1.0);
        c.output.save_every_n_epochs = 0;
        c
    };
    let straight_dir = tempfile::tempdir().unwrap();
    let straight = train::<B>(&dora_config(straight_dir.path(), 6), &Default::default(), &mut |_| true).unwrap();
    let (set, _) = AdapterSet::load(&straight.lora, &tiny_index_with_text_encoder(), ReadOptions::default()).unwrap();
    assert!(set.iter().any(|(k, _)| k.component == lora_core::Component::TextEncoder));
    assert!(set.iter().any(|(_, w)| w.is_conv() && w.down.shape[2..] == [3, 3]));
    for (key, w) in set.iter() {
        assert!(w.is_dora(), "{key} has no magnitude");
    }
    let meta = lora_metadata(&straight.lora);
    assert_eq!(meta["ss_network_module"], "lycoris.kohya");
    assert!(meta["ss_network_args"].contains("\"dora_wd\":\"True\""), "{}", meta["ss_network_args"]);

    // A plain-LoRA configuration cannot resume a DoRA state.
    let dir = tempfile::tempdir().unwrap();
    assert_resumes_bit_for_bit(&dora_config(dir.path(), 6), &straight, |c| c.lora.dora = false, "dora");

    let bf16_dir = tempfile::tempdir().unwrap();
    let mut bf16 = dora_config(bf16_dir.path(), 2);
    bf16.train.mixed_precision = trainer::config::MixedPrecision::Bf16;
    assert_trains(&bf16);

    let device = Default::default();
    let mut unet = sd_model::UNet2DConditionModel::<Flex>::new(&sd_model::UnetConfig::tiny(), &device).unwrap();
    let mut te = sd_model::ClipTextModel::<Flex>::new(&sd_model::ClipTextConfig::tiny(), &device).unwrap();
    let file: sd_model::lora::LoraFile = format!("{}:0.5", straight.lora.display()).parse().unwrap();
    let applied = sd_model::lora::apply_lora_files(&mut unet, Some(&mut te), std::slice::from_ref(&file), false, &device).unwrap();
    assert_eq!(applied.unet + applied.text_encoder, set.len());
    let err = sd_model::lora::apply_lora_files(&mut unet, Some(&mut te), &[file.clone(), file], false, &device).unwrap_err();
    assert!(err.to_string().contains("DoRA"), "{err}");

    assert_applies_at_half_strength(&straight.lora, "the DoRA LoRA");
}

/// `lora.algo = "loha"` / `"lokr"`: every adapter (linear, 3x3 conv, text encoder) is
/// saved as LyCORIS saves it, with `lycoris.kohya` and the algorithm in the metadata; a
/// stopped run resumes bit for bit (with module dropout and max-norm on); every adapter
/// trains (no fused path bypasses one); the file continues training
/// as `network_weights` (and with `dim_from_weights`), and a LoRA config is refused for
/// it and for the state; a bf16 base runs; the file applies at a strength in generation,
/// merged as attached.
#[test]
fn loha_and_lokr_train_resume_and_apply() {
    let _guard = seeded();
    for (algo, tucker) in [(lora_core::Algo::Loha, false), (lora_core::Algo::Lokr, false), (lora_core::Algo::Loha, true), (lora_core::Algo::Lokr, true)] {
        let name = algo.name();
        let lycoris_config = |dir: &std::path::Path, steps: usize| {
            let mut c = resume_config(dir, steps);
            c.lora.algo = algo;
            c.lora.use_tucker = tucker;
            // LyCORIS' trained scalar on the Tucker runs (saved folded, resumed, scaled by
            // max-norm).
            c.lora.use_scalar = tucker;
            (c.lora.dropout, c.lora.module_dropout) = (0.0, 0.2);
            c.train.scale_weight_norms = 0.05;
            c.lora.unet_targets = sd_model::targets::UnetTargets::Conv;
            (c.lora.conv_rank, c.lora.conv_alpha) = (2, 1.0);
            c.output.save_every_n_epochs = 0;
            c
        };
        let straight_dir = tempfile::tempdir().unwrap();
        let straight = train::<B>(&lycoris_config(straight_dir.path(), 6), &Default::default(), &mut |_| true).unwrap();
        let (set, _) = AdapterSet::load(&straight.lora, &tiny_index_with_text_encoder(), ReadOptions::default()).unwrap();
        assert!(set.iter().any(|(k, _)| k.component == lora_core::Component::TextEncoder), "{name}");
        assert!(set.iter().any(|(_, w)| w.is_conv() && w.down.shape[2..] == [3, 3]), "{name}");
        for (key, w) in set.iter() {
            assert_eq!(w.lycoris.as_ref().map(|l| l.algo), Some(algo), "{key}");
            // Every adapter trained (its zero half moved): none is bypassed by a fused path.
            assert!(w.delta().data.iter().any(|v| *v != 0.0), "{key} did not train");
        }
        // With use_tucker the 3x3 convolutions' adapters (only those; for LoKr, those with
        // a low-rank w2) have LyCORIS' cores.
        let core = if algo == lora_core::Algo::Loha { "hada_t1" } else { "lokr_t2" };
        let mut cores = 0;
        for (key, w) in set.iter() {
            let lycoris = w.lycoris.as_ref().unwrap();
            let spatial = w.is_conv() && w.down.shape[2..] == [3, 3] && lycoris.get("lokr_w2").is_none();
            let t = lycoris.get(core);
            assert_eq!(t.map(|t| t.shape.clone()), (tucker && spatial).then(|| vec![2, 2, 3, 3]), "{name}, tucker {tucker}: {key}");
            cores += usize::from(t.is_some());
        }
        assert_eq!(cores > 0, tucker, "{name}");
        let meta = lora_metadata(&straight.lora);
        assert_eq!(meta["ss_network_module"], "lycoris.kohya");
        assert!(meta["ss_network_args"].contains(&format!("\"algo\":\"{name}\"")), "{}", meta["ss_network_args"]);
        assert_eq!(meta["ss_network_args"].contains("\"use_tucker\":\"True\""), tucker, "{}", meta["ss_network_args"]);
        assert_eq!(meta["ss_network_dim"], "4", "{name}: LyCORIS' own rank");

        let dir = tempfile::tempdir().unwrap();
        assert_resumes_bit_for_bit(&lycoris_config(dir.path(), 6), &straight, |c| (c.lora.algo, c.lora.use_tucker, c.lora.use_scalar) = (lora_core::Algo::Lora, false, false), "cannot resume with a different model, [lora] section");

        // The trained file as `network_weights`: its adapters load into the new ones; a
        // LoRA config cannot take them.
        let more_dir = tempfile::tempdir().unwrap();
        let mut more = lycoris_config(more_dir.path(), 2);
        more.lora.network_weights = straight.lora.display().to_string();
        assert_trains(&more);
        (more.lora.algo, more.lora.use_tucker, more.lora.use_scalar) = (lora_core::Algo::Lora, false, false);
        let err = train::<B>(&more, &Default::default(), &mut |_| true).unwrap_err().to_string();
        assert!(err.contains(name) && err.contains("LoRA"), "{err}");
        // With dim_from_weights the file's adapters train as what they are: lora.algo must say so.
        more.lora.dim_from_weights = true;
        let err = train::<B>(&more, &Default::default(), &mut |_| true).unwrap_err().to_string();
        assert!(err.contains(&format!("set lora.algo = \"{name}\"")), "{err}");
        more.lora.algo = algo;
        let report = train::<B>(&more, &Default::default(), &mut |_| true).unwrap();
        assert!(report.losses.iter().all(|l| l.is_finite()), "{:?}", report.losses);

        let bf16_dir = tempfile::tempdir().unwrap();
        let mut bf16 = lycoris_config(bf16_dir.path(), 2);
        bf16.train.mixed_precision = trainer::config::MixedPrecision::Bf16;
        let report = train::<B>(&bf16, &Default::default(), &mut |_| true).unwrap();
        assert!(report.losses.iter().all(|l| l.is_finite()), "{:?}", report.losses);

        assert_applies_at_half_strength(&straight.lora, name);
    }
}

/// `lora.algo = "oft"` (kohya's `networks.oft`): every adapter (attention, 3x3 conv at
/// `conv_rank` blocks, text encoder) is saved as kohya saves it (`oft_unet_…` /
/// `lora_te_…` `oft_blocks` `[k, n, n]` and `alpha`, `networks.oft` with the blocks and
/// the constraint in the metadata), and every one trains; a stopped run resumes bit for
/// bit; the file continues training as `network_weights` (and with `dim_from_weights`), not
/// into a LoRA; a bf16 base runs; it applies at a strength in generation, merged as
/// attached, and does not combine with a second file on its layers.
#[test]
fn oft_trains_resumes_and_applies() {
    let _guard = seeded();
    let oft_config = |dir: &std::path::Path, steps: usize| {
        let mut c = resume_config(dir, steps);
        c.lora.algo = lora_core::Algo::Oft;
        (c.lora.dropout, c.lora.alpha) = (0.0, 0.01);
        c.lora.unet_targets = sd_model::targets::UnetTargets::Conv;
        (c.lora.conv_rank, c.lora.conv_alpha) = (2, 0.05);
        c.output.save_every_n_epochs = 0;
        c
    };
    let straight_dir = tempfile::tempdir().unwrap();
    let straight = train::<B>(&oft_config(straight_dir.path(), 6), &Default::default(), &mut |_| true).unwrap();
    let (set, _) = AdapterSet::load(&straight.lora, &tiny_index_with_text_encoder(), ReadOptions::default()).unwrap();
    assert!(set.iter().any(|(k, _)| k.component == lora_core::Component::TextEncoder));
    let mut spatial = 0;
    for (key, w) in set.iter() {
        assert!(w.is_oft(), "{key}");
        let l = w.lycoris.as_ref().unwrap();
        let blocks = l.get("oft_blocks").unwrap();
        let k = if w.is_conv() && w.down.shape[2..] == [3, 3] { 2 } else { 4 };
        spatial += usize::from(k == 2);
        assert_eq!((blocks.shape[0], blocks.shape[1] * k, blocks.shape[2]), (k, w.out_features(), blocks.shape[1]), "{key}");
        assert_eq!(l.alpha, if k == 2 { 0.05 } else { 0.01 }, "{key}");
        assert!(blocks.data.iter().any(|v| *v != 0.0), "{key} did not train");
    }
    assert!(spatial > 0, "the 3x3 convolutions at conv_rank blocks");
    let bytes = std::fs::read(&straight.lora).unwrap();
    let (st, _) = lora_core::tensor_io::parse(&bytes, &straight.lora).unwrap();
    assert!(st.names().iter().all(|n| n.starts_with("oft_unet_") || n.starts_with("lora_te_")), "{:?}", st.names());
    let meta = lora_metadata(&straight.lora);
    assert_eq!((meta["ss_network_module"].as_str(), meta["ss_network_dim"].as_str(), meta["ss_network_alpha"].as_str()), ("networks.oft", "4", "0.01"));

    let dir = tempfile::tempdir().unwrap();
    assert_resumes_bit_for_bit(&oft_config(dir.path(), 6), &straight, |c| c.lora.algo = lora_core::Algo::Lora, "cannot resume with a different model, [lora] section");

    let more_dir = tempfile::tempdir().unwrap();
    let mut more = oft_config(more_dir.path(), 2);
    more.lora.network_weights = straight.lora.display().to_string();
    assert_trains(&more);
    more.lora.algo = lora_core::Algo::Lora;
    let err = train::<B>(&more, &Default::default(), &mut |_| true).unwrap_err().to_string();
    assert!(err.contains("oft") && err.contains("LoRA"), "{err}");
    more.lora.dim_from_weights = true;
    let err = train::<B>(&more, &Default::default(), &mut |_| true).unwrap_err().to_string();
    assert!(err.contains("set lora.algo = \"oft\""), "{err}");
    more.lora.algo = lora_core::Algo::Oft;
    assert_trains(&more);

    let bf16_dir = tempfile::tempdir().unwrap();
    let mut bf16 = oft_config(bf16_dir.path(), 2);
    bf16.train.mixed_precision = trainer::config::MixedPrecision::Bf16;
    assert_trains(&bf16);

    assert_applies_at_half_strength(&straight.lora, "the OFT");
    let device = Default::default();
    let mut unet = sd_pipeline::load_components::<Flex>("tiny", 0, &device).unwrap().unet;
    let file: sd_model::lora::LoraFile = straight.lora.display().to_string().parse().unwrap();
    let err = sd_model::lora::apply_lora_files(&mut unet, None, &[file.clone(), file], true, &device).unwrap_err();
    assert!(err.to_string().contains("an OFT cannot be combined"), "{err}");
}

/// `lora.algo = "diag-oft"` (LyCORIS' Diag-OFT) with `lora.rescaled` and no constraint:
/// saved as LyCORIS saves it (`lora_unet_` / `lora_te_` names, blocks of `rank` (3x3
/// convolutions: `conv_rank`), a `rescale` per output, `alpha` 0, `lycoris.kohya` with
/// `algo=diag-oft`), every block and scale trains (max-norm and rank dropout on); a stopped run resumes bit for bit; the
/// file continues training as `network_weights` and with `dim_from_weights`; it applies at
/// a strength in generation.
#[test]
fn diag_oft_trains_resumes_and_applies() {
    lycoris_oft_trains_resumes_and_applies(lora_core::Algo::DiagOft);
}

/// `lora.algo = "boft"` (LyCORIS' BOFT), as Diag-OFT above: its `[stages, k, n, n]` blocks.
#[test]
fn boft_trains_resumes_and_applies() {
    lycoris_oft_trains_resumes_and_applies(lora_core::Algo::Boft);
}

fn lycoris_oft_trains_resumes_and_applies(algo: lora_core::Algo) {
    let _guard = seeded();
    let diag_config = |dir: &std::path::Path, steps: usize| {
        let mut c = resume_config(dir, steps);
        c.lora.algo = algo;
        c.lora.dropout = 0.0;
        (c.lora.rank, c.lora.rescaled, c.lora.module_dropout) = (4, true, 0.1);
        // Diag-OFT's rank dropout: entries of the rotation (BOFT has none).
        if algo == lora_core::Algo::DiagOft {
            c.lora.rank_dropout = 0.1;
        }
        // LyCORIS' max-norm on the blocks.
        c.train.scale_weight_norms = 0.05;
        c.lora.unet_targets = sd_model::targets::UnetTargets::Conv;
        c.lora.conv_rank = 2;
        c.output.save_every_n_epochs = 0;
        c
    };
    let straight_dir = tempfile::tempdir().unwrap();
    let straight = train::<B>(&diag_config(straight_dir.path(), 6), &Default::default(), &mut |_| true).unwrap();
    let (set, _) = AdapterSet::load(&straight.lora, &tiny_index_with_text_encoder(), ReadOptions::default()).unwrap();
    assert!(set.iter().any(|(k, _)| k.component == lora_core::Component::TextEncoder));
    let mut spatial = 0;
    for (key, w) in set.iter() {
        let l = w.lycoris.as_ref().unwrap();
        assert_eq!((l.algo, l.alpha), (algo, 0.0), "{key}");
        let blocks = l.get("oft_blocks").unwrap();
        let dim = if w.is_conv() && w.down.shape[2..] == [3, 3] { 2 } else { 4 };
        spatial += usize::from(dim == 2);
        let want = match algo {
            lora_core::Algo::Boft => {
                let (m, k, n) = lora_core::oft::butterfly_shape(w.out_features(), dim).unwrap();
                vec![m, k, n, n]
            }
            _ => {
                let (k, n) = lora_core::oft::diag_block_shape(w.out_features(), dim);
                vec![k, n, n]
            }
        };
        assert_eq!(blocks.shape, want, "{key}");
        let rescale = l.get("rescale").unwrap();
        assert_eq!(rescale.shape[0], w.out_features(), "{key}");
        assert!(rescale.data.iter().any(|v| *v != 1.0), "{key}: the scale did not train");
        assert!(blocks.shape[blocks.shape.len() - 1] == 1 || blocks.data.iter().any(|v| *v != 0.0), "{key} did not train");
    }
    assert!(spatial > 0, "the 3x3 convolutions at conv_rank");
    let bytes = std::fs::read(&straight.lora).unwrap();
    let (st, _) = lora_core::tensor_io::parse(&bytes, &straight.lora).unwrap();
    assert!(st.names().iter().all(|n| n.starts_with("lora_unet_") || n.starts_with("lora_te_")), "{:?}", st.names());
    let meta = lora_metadata(&straight.lora);
    let args: serde_json::Value = serde_json::from_str(&meta["ss_network_args"]).unwrap();
    assert_eq!((meta["ss_network_module"].as_str(), meta["ss_network_dim"].as_str()), ("lycoris.kohya", "4"));
    assert_eq!((args["algo"].as_str(), args["rescaled"].as_str(), args["constraint"].as_str()), (Some(algo.name()), Some("True"), Some("0")));

    let dir = tempfile::tempdir().unwrap();
    assert_resumes_bit_for_bit(&diag_config(dir.path(), 6), &straight, |c| c.lora.rescaled = false, "cannot resume with a different model, [lora] section");

    let more_dir = tempfile::tempdir().unwrap();
    let mut more = diag_config(more_dir.path(), 2);
    more.lora.network_weights = straight.lora.display().to_string();
    assert_trains(&more);
    more.lora.dim_from_weights = true;
    assert_trains(&more);
    more.lora.algo = lora_core::Algo::Oft;
    (more.lora.alpha, more.lora.rescaled, more.lora.module_dropout, more.lora.rank_dropout, more.train.scale_weight_norms) = (0.01, false, 0.0, 0.0, 0.0);
    let err = train::<B>(&more, &Default::default(), &mut |_| true).unwrap_err().to_string();
    assert!(err.contains(&format!("set lora.algo = \"{}\"", algo.name())), "{err}");

    assert_applies_at_half_strength(&straight.lora, algo.name());
}

/// `lora.algo = "glora"` (LyCORIS' GLoRA): every layer's four factors (a 3x3
/// convolution's `b2` with its kernel, at `conv_rank`) are saved as LyCORIS saves them with
/// `lycoris.kohya` and `algo=glora` (module dropout and the trained scalar on, the scalar
/// trained); a stopped run resumes bit for bit; the file continues training as
/// `network_weights` and with `dim_from_weights`, not as another algorithm; it applies at a
/// strength in generation. Rank dropout and max-norm, which LyCORIS' GLoRA does not apply,
/// are refused.
#[test]
fn glora_trains_resumes_and_applies() {
    let _guard = seeded();
    let glora_config = |dir: &std::path::Path, steps: usize| {
        let mut c = resume_config(dir, steps);
        c.lora.algo = lora_core::Algo::Glora;
        c.lora.dropout = 0.0;
        (c.lora.rank, c.lora.alpha, c.lora.module_dropout, c.lora.use_scalar) = (4, 2.0, 0.1, true);
        c.lora.unet_targets = sd_model::targets::UnetTargets::Conv;
        (c.lora.conv_rank, c.lora.conv_alpha) = (2, 1.0);
        c.output.save_every_n_epochs = 0;
        c
    };
    let straight_dir = tempfile::tempdir().unwrap();
    let straight = train::<B>(&glora_config(straight_dir.path(), 6), &Default::default(), &mut |_| true).unwrap();
    let (set, _) = AdapterSet::load(&straight.lora, &tiny_index_with_text_encoder(), ReadOptions::default()).unwrap();
    assert!(set.iter().any(|(k, _)| k.component == lora_core::Component::TextEncoder));
    let mut spatial = 0;
    for (key, w) in set.iter() {
        let l = w.lycoris.as_ref().unwrap();
        let is_3x3 = w.is_conv() && w.down.shape[2..] == [3, 3];
        spatial += usize::from(is_3x3);
        let (rank, alpha) = if is_3x3 { (2, 1.0) } else { (4, 2.0) };
        assert_eq!((l.algo, l.rank(), l.alpha), (lora_core::Algo::Glora, Some(rank), alpha), "{key}");
        let names: Vec<&str> = l.tensors.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, lora_core::glora::NAMES, "{key}");
        let b2 = l.get("b2.weight").unwrap();
        assert_eq!(b2.shape[..2], [rank, w.in_features()], "{key}");
        if is_3x3 {
            assert_eq!((b2.shape[2..].to_vec(), l.get("a1.weight").unwrap().shape.clone()), (vec![3, 3], vec![w.in_features(), rank, 1, 1]), "{key}");
        }
        assert!(l.tensors.iter().all(|(_, t)| t.data.iter().all(|v| v.is_finite())), "{key}");
        // The trained scalar, which starts at 0, is saved folded into `a2` and `b2`: nonzero
        // there only if it trained.
        for name in ["a2.weight", "b2.weight"] {
            assert!(l.get(name).unwrap().data.iter().any(|v| *v != 0.0), "{key}: {name} (the scalar did not train)");
        }
    }
    assert!(spatial > 0, "the 3x3 convolutions at conv_rank");
    let meta = lora_metadata(&straight.lora);
    let args: serde_json::Value = serde_json::from_str(&meta["ss_network_args"]).unwrap();
    assert_eq!((meta["ss_network_module"].as_str(), meta["ss_network_dim"].as_str(), meta["ss_network_alpha"].as_str()), ("lycoris.kohya", "4", "2.0"));
    assert_eq!((args["algo"].as_str(), args["conv_dim"].as_str()), (Some("glora"), Some("2")));

    let dir = tempfile::tempdir().unwrap();
    assert_resumes_bit_for_bit(&glora_config(dir.path(), 6), &straight, |c| c.lora.use_scalar = false, "cannot resume with a different model, [lora] section");

    let more_dir = tempfile::tempdir().unwrap();
    let mut more = glora_config(more_dir.path(), 2);
    more.lora.network_weights = straight.lora.display().to_string();
    assert_trains(&more);
    more.lora.dim_from_weights = true;
    assert_trains(&more);
    more.lora.algo = lora_core::Algo::Loha;
    more.lora.use_scalar = false;
    let err = train::<B>(&more, &Default::default(), &mut |_| true).unwrap_err().to_string();
    assert!(err.contains("set lora.algo = \"glora\""), "{err}");

    for (change, key) in [(&(|c: &mut TrainConfig| c.lora.rank_dropout = 0.1) as &dyn Fn(&mut TrainConfig), "lora.rank_dropout"), (&|c: &mut TrainConfig| c.train.scale_weight_norms = 1.0, "train.scale_weight_norms"), (&|c: &mut TrainConfig| c.lora.dora = true, "lora.dora")] {
        let mut bad = glora_config(more_dir.path(), 2);
        change(&mut bad);
        let err = train::<B>(&bad, &Default::default(), &mut |_| true).unwrap_err().to_string();
        assert!(err.contains(key) && err.contains("glora"), "{key}: {err}");
    }

    assert_applies_at_half_strength(&straight.lora, "glora");
}

/// `lora.algo = "ia3"` (LyCORIS' (IA)³) on its `ia3` targets: each layer's scale is saved
/// as LyCORIS saves it (`weight`, `on_input`, no `alpha`), per input channel on the
/// feed-forward outputs (`ff.net.2`, `mlp.fc2`) and per output elsewhere, with
/// `lycoris.kohya` and `algo=ia3`, and every one trains (from zero); a stopped run resumes
/// bit for bit; the file continues training as `network_weights` and with
/// `dim_from_weights`; it applies at a strength in generation. The options (IA)³ does not
/// take are refused.
#[test]
fn ia3_trains_resumes_and_applies() {
    let _guard = seeded();
    let ia3_config = |dir: &std::path::Path, steps: usize| {
        let mut c = resume_config(dir, steps);
        c.lora.algo = lora_core::Algo::Ia3;
        c.lora.dropout = 0.0;
        c.lora.module_dropout = 0.1;
        c.lora.unet_targets = sd_model::targets::UnetTargets::Ia3;
        c.lora.text_encoder_targets = sd_model::targets::TextEncoderTargets::Ia3;
        c.output.save_every_n_epochs = 0;
        c
    };
    let straight_dir = tempfile::tempdir().unwrap();
    let straight = train::<B>(&ia3_config(straight_dir.path(), 6), &Default::default(), &mut |_| true).unwrap();
    let (set, _) = AdapterSet::load(&straight.lora, &tiny_index_with_text_encoder(), ReadOptions::default()).unwrap();
    let (mut inputs, mut outputs) = (0, 0);
    for (key, w) in set.iter() {
        let l = w.lycoris.as_ref().unwrap();
        let path = key.path.to_string();
        assert!([".to_k", ".to_v", ".ff.net.2", ".k_proj", ".v_proj", ".mlp.fc2"].iter().any(|s| path.ends_with(s)), "{key}");
        let on_input = path.ends_with(".ff.net.2") || path.ends_with(".mlp.fc2");
        assert_eq!((l.algo, l.get("on_input").unwrap().data.clone()), (lora_core::Algo::Ia3, vec![f32::from(u8::from(on_input))]), "{key}");
        (inputs, outputs) = (inputs + usize::from(on_input), outputs + usize::from(!on_input));
        assert!(l.get("weight").unwrap().data.iter().any(|v| *v != 0.0), "{key} did not train");
    }
    assert!(inputs > 0 && outputs > 0 && set.iter().any(|(k, _)| k.component == lora_core::Component::TextEncoder));
    let bytes = std::fs::read(&straight.lora).unwrap();
    let (st, _) = lora_core::tensor_io::parse(&bytes, &straight.lora).unwrap();
    assert!(st.names().iter().all(|n| n.ends_with(".weight") || n.ends_with(".on_input")), "no alpha: {:?}", st.names());
    let meta = lora_metadata(&straight.lora);
    let args: serde_json::Value = serde_json::from_str(&meta["ss_network_args"]).unwrap();
    assert_eq!((meta["ss_network_module"].as_str(), args["algo"].as_str()), ("lycoris.kohya", Some("ia3")));

    let dir = tempfile::tempdir().unwrap();
    assert_resumes_bit_for_bit(&ia3_config(dir.path(), 6), &straight, |c| c.lora.ia3_on_input.clear(), "cannot resume with a different model, [lora] section");

    let more_dir = tempfile::tempdir().unwrap();
    let mut more = ia3_config(more_dir.path(), 2);
    more.lora.network_weights = straight.lora.display().to_string();
    assert_trains(&more);
    more.lora.dim_from_weights = true;
    assert_trains(&more);

    for (change, key) in [(&(|c: &mut TrainConfig| c.lora.rank_dropout = 0.1) as &dyn Fn(&mut TrainConfig), "lora.rank_dropout"), (&|c: &mut TrainConfig| c.train.scale_weight_norms = 1.0, "train.scale_weight_norms"), (&|c: &mut TrainConfig| c.lora.use_scalar = true, "lora.use_scalar")] {
        let mut bad = ia3_config(more_dir.path(), 2);
        change(&mut bad);
        let err = train::<B>(&bad, &Default::default(), &mut |_| true).unwrap_err().to_string();
        assert!(err.contains(key) && err.contains("ia3"), "{key}: {err}");
    }

    assert_applies_at_half_strength(&straight.lora, "ia3");
}

/// LyCORIS' full fine-tuning (`lora.algo = "full"`): every targeted layer's difference is
/// saved as LyCORIS saves it (`diff`, and `diff_b` where the layer has a bias; no alpha),
/// with `lycoris.kohya` and `algo=full`, and every one trains (from zero), with module and
/// rank dropout; a stopped run resumes bit for bit; the file continues training as
/// `network_weights` and with `dim_from_weights`; it applies at a strength in generation.
/// The options LyCORIS' full module does not take are refused.
#[test]
fn full_trains_resumes_and_applies() {
    let _guard = seeded();
    let full_config = |dir: &std::path::Path, steps: usize| {
        let mut c = resume_config(dir, steps);
        c.lora.algo = lora_core::Algo::Full;
        c.lora.dropout = 0.0;
        (c.lora.module_dropout, c.lora.rank_dropout) = (0.1, 0.1);
        c.output.save_every_n_epochs = 0;
        c
    };
    let straight_dir = tempfile::tempdir().unwrap();
    let straight = train::<B>(&full_config(straight_dir.path(), 6), &Default::default(), &mut |_| true).unwrap();
    let (set, _) = AdapterSet::load(&straight.lora, &tiny_index_with_text_encoder(), ReadOptions::default()).unwrap();
    let (mut with_bias, mut without) = (0, 0);
    for (key, w) in set.iter() {
        let l = w.lycoris.as_ref().unwrap();
        assert_eq!(l.algo, lora_core::Algo::Full, "{key}");
        assert!(l.get("diff").unwrap().data.iter().any(|v| *v != 0.0), "{key}'s diff did not train");
        match l.get("diff_b") {
            Some(b) => {
                assert!(b.data.iter().any(|v| *v != 0.0), "{key}'s diff_b did not train");
                with_bias += 1;
            }
            None => without += 1,
        }
    }
    assert!(with_bias > 0 && without > 0, "to_q / to_k / to_v have no bias, to_out.0 has: {with_bias} with, {without} without");
    let bytes = std::fs::read(&straight.lora).unwrap();
    let (st, _) = lora_core::tensor_io::parse(&bytes, &straight.lora).unwrap();
    assert!(st.names().iter().all(|n| n.ends_with(".diff") || n.ends_with(".diff_b")), "no alpha: {:?}", st.names());
    let meta = lora_metadata(&straight.lora);
    let args: serde_json::Value = serde_json::from_str(&meta["ss_network_args"]).unwrap();
    assert_eq!((meta["ss_network_module"].as_str(), args["algo"].as_str()), ("lycoris.kohya", Some("full")));

    let dir = tempfile::tempdir().unwrap();
    assert_resumes_bit_for_bit(&full_config(dir.path(), 6), &straight, |c| c.lora.rank_dropout = 0.2, "cannot resume with a different model, [lora] section");

    let more_dir = tempfile::tempdir().unwrap();
    let mut more = full_config(more_dir.path(), 2);
    more.lora.network_weights = straight.lora.display().to_string();
    assert_trains(&more);
    more.lora.dim_from_weights = true;
    assert_trains(&more);

    for (change, key) in [(&(|c: &mut TrainConfig| c.lora.dora = true) as &dyn Fn(&mut TrainConfig), "lora.dora"), (&|c: &mut TrainConfig| c.train.scale_weight_norms = 1.0, "train.scale_weight_norms"), (&|c: &mut TrainConfig| c.lora.use_scalar = true, "lora.use_scalar"), (&|c: &mut TrainConfig| c.lora.rslora = true, "lora.rslora")] {
        let mut bad = full_config(more_dir.path(), 2);
        change(&mut bad);
        let err = train::<B>(&bad, &Default::default(), &mut |_| true).unwrap_err().to_string();
        assert!(err.contains(key) && err.contains("full"), "{key}: {err}");
    }

    assert_applies_at_half_strength(&straight.lora, "full");
}

/// `lora.train_norm` (LyCORIS' `train_norm`) with a LoHa on the transformer blocks
/// (`attn-mlp`): every transformer norm (`norm`, `norm1`–`norm3`) gets LyCORIS' norm
/// module, saved as `w_norm` / `b_norm` (no alpha) beside the LoHa's tensors with
/// `lycoris.kohya`, `algo=loha` and `train_norm=True`, and trains from zero; the ResNet
/// blocks' norms do not; a stopped run resumes bit for bit (module dropout on); the file
/// continues training as `network_weights` (with `dim_from_weights` too), not into a run
/// without `train_norm`; it applies at a strength in generation. Targets that reach no
/// norm, kohya's OFT and the PEFT layout are refused.
#[test]
fn train_norm_trains_resumes_and_applies() {
    let _guard = seeded();
    let norm_config = |dir: &std::path::Path, steps: usize| {
        let mut c = resume_config(dir, steps);
        c.lora.algo = lora_core::Algo::Loha;
        c.lora.train_norm = true;
        c.lora.dropout = 0.0;
        c.lora.module_dropout = 0.1;
        c.output.save_every_n_epochs = 0;
        c
    };
    let straight_dir = tempfile::tempdir().unwrap();
    let straight = train::<B>(&norm_config(straight_dir.path(), 6), &Default::default(), &mut |_| true).unwrap();
    let (set, _) = AdapterSet::load(&straight.lora, &tiny_index_with_text_encoder(), ReadOptions::default()).unwrap();
    let mut norms = Vec::new();
    for (key, w) in set.iter() {
        let l = w.lycoris.as_ref().unwrap();
        if l.algo == lora_core::Algo::Norm {
            for name in ["w_norm", "b_norm"] {
                assert!(l.get(name).unwrap().data.iter().any(|v| *v != 0.0), "{key}'s {name} did not train");
            }
            norms.push(key.path.clone());
        } else {
            assert_eq!(l.algo, lora_core::Algo::Loha, "{key}");
        }
    }
    // The tiny UNet's four transformers, each with its input norm and one block's three.
    assert_eq!(norms.len(), 16, "{norms:?}");
    assert!(norms.iter().all(|p| p.contains(".attentions.")), "the ResNet blocks' norms are not in attn-mlp: {norms:?}");
    let bytes = std::fs::read(&straight.lora).unwrap();
    let (st, _) = lora_core::tensor_io::parse(&bytes, &straight.lora).unwrap();
    assert!(st.names().iter().any(|n| n == &"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_norm1.w_norm"));
    assert!(!st.names().iter().any(|n| n.ends_with("norm1.alpha") || n.ends_with("norm.alpha")), "norm modules have no alpha");
    let meta = lora_metadata(&straight.lora);
    let args: serde_json::Value = serde_json::from_str(&meta["ss_network_args"]).unwrap();
    assert_eq!((meta["ss_network_module"].as_str(), args["algo"].as_str(), args["train_norm"].as_str()), ("lycoris.kohya", Some("loha"), Some("True")));

    let dir = tempfile::tempdir().unwrap();
    assert_resumes_bit_for_bit(&norm_config(dir.path(), 6), &straight, |c| c.lora.train_norm = false, "cannot resume with a different model, [lora] section");

    let more_dir = tempfile::tempdir().unwrap();
    let mut more = norm_config(more_dir.path(), 2);
    more.lora.network_weights = straight.lora.display().to_string();
    assert_trains(&more);
    more.lora.dim_from_weights = true;
    assert_trains(&more);
    more.lora.dim_from_weights = false;
    more.lora.train_norm = false;
    let err = train::<B>(&more, &Default::default(), &mut |_| true).unwrap_err().to_string();
    assert!(err.contains("norm module") && err.contains("train_norm"), "{err}");

    for (change, says) in [
        (&(|c: &mut TrainConfig| c.lora.unet_targets = sd_model::targets::UnetTargets::Attn) as &dyn Fn(&mut TrainConfig), "reach no norm layer"),
        (&|c: &mut TrainConfig| (c.lora.algo, c.lora.alpha) = (lora_core::Algo::Oft, 1e-3), "kohya's OFT"),
        (&|c: &mut TrainConfig| (c.lora.algo, c.output.save_format) = (lora_core::Algo::Lora, lora_core::AdapterFormat::Peft), "PEFT"),
    ] {
        let mut bad = norm_config(more_dir.path(), 2);
        change(&mut bad);
        let err = train::<B>(&bad, &Default::default(), &mut |_| true).unwrap_err().to_string();
        assert!(err.contains("lora.train_norm") && err.contains(says), "{says}: {err}");
    }

    assert_applies_at_half_strength(&straight.lora, "a LoHa with norm modules");
}

/// `lora.use_tucker` with a LoRA (LyCORIS' LoCon with `use_tucker`): the 3x3
/// convolutions' adapters (only those) are saved as LyCORIS saves them, `lora_down` 1x1,
/// `lora_mid` and `lora_up`, with `lycoris.kohya` and `use_tucker` in the metadata; every
/// one trains; a stopped run resumes bit for bit (max-norm on, LoRA+ on); the file
/// continues training as `network_weights`, not into adapters without cores; it applies at
/// a strength in generation, merged as attached.
#[test]
fn locon_tucker_trains_resumes_and_continues() {
    let _guard = seeded();
    let tucker_config = |dir: &std::path::Path, steps: usize| {
        let mut c = resume_config(dir, steps);
        c.lora.use_tucker = true;
        c.train.scale_weight_norms = 0.05;
        c.lora.loraplus_lr_ratio = 4.0;
        c.lora.unet_targets = sd_model::targets::UnetTargets::Conv;
        (c.lora.conv_rank, c.lora.conv_alpha) = (2, 1.0);
        c.output.save_every_n_epochs = 0;
        c
    };
    let straight_dir = tempfile::tempdir().unwrap();
    let straight = train::<B>(&tucker_config(straight_dir.path(), 6), &Default::default(), &mut |_| true).unwrap();
    let (set, _) = AdapterSet::load(&straight.lora, &tiny_index_with_text_encoder(), ReadOptions::default()).unwrap();
    let mut cores = 0;
    for (key, w) in set.iter() {
        let spatial = w.is_conv() && w.down.shape[2..] == [3, 3];
        let core = w.lycoris.as_ref().filter(|l| l.is_tucker_locon()).and_then(|l| l.get("lora_mid.weight"));
        assert_eq!(core.map(|t| t.shape.clone()), spatial.then(|| vec![2, 2, 3, 3]), "{key}");
        cores += usize::from(core.is_some());
        assert!(w.delta().data.iter().any(|v| *v != 0.0), "{key} did not train");
    }
    assert!(cores > 0 && set.len() > cores, "cores on the 3x3 convolutions only");
    let meta = lora_metadata(&straight.lora);
    assert_eq!(meta["ss_network_module"], "lycoris.kohya");
    let args = &meta["ss_network_args"];
    assert!(args.contains("\"algo\":\"lora\"") && args.contains("\"use_tucker\":\"True\"") && args.contains("\"conv_dim\":\"2\""), "{args}");

    let dir = tempfile::tempdir().unwrap();
    assert_resumes_bit_for_bit(&tucker_config(dir.path(), 6), &straight, |c| c.lora.use_tucker = false, "use_tucker");

    let more_dir = tempfile::tempdir().unwrap();
    let mut more = tucker_config(more_dir.path(), 2);
    more.lora.network_weights = straight.lora.display().to_string();
    assert_trains(&more);
    more.lora.use_tucker = false;
    let err = train::<B>(&more, &Default::default(), &mut |_| true).unwrap_err().to_string();
    assert!(err.contains("use_tucker"), "{err}");

    assert_applies_at_half_strength(&straight.lora, "the Tucker LoCon");
}

/// `lora.dora` with LoHa / LoKr (LyCORIS' `weight_decompose`): every adapter is saved with
/// its factors and `dora_scale`, `dora_wd` in the metadata; a stopped run (with LyCORIS'
/// rank dropout) resumes bit for bit (magnitudes in the state), not without DoRA; the file continues training as
/// `network_weights` (and with `dim_from_weights`); a bf16 base runs; it applies at a
/// strength in generation.
#[test]
fn lycoris_dora_trains_resumes_and_continues() {
    let _guard = seeded();
    for algo in [lora_core::Algo::Loha, lora_core::Algo::Lokr] {
        let name = algo.name();
        let dora_config = |dir: &std::path::Path, steps: usize| {
            let mut c = resume_config(dir, steps);
            (c.lora.algo, c.lora.dora) = (algo, true);
            // LyCORIS' rank dropout draws replay in a resumed run too.
            (c.lora.dropout, c.lora.rank_dropout, c.lora.rank_dropout_scale) = (0.0, 0.2, true);
            c.lora.unet_targets = sd_model::targets::UnetTargets::Conv;
            (c.lora.conv_rank, c.lora.conv_alpha) = (2, 1.0);
            c.output.save_every_n_epochs = 0;
            c
        };
        let straight_dir = tempfile::tempdir().unwrap();
        let straight = train::<B>(&dora_config(straight_dir.path(), 6), &Default::default(), &mut |_| true).unwrap();
        let (set, _) = AdapterSet::load(&straight.lora, &tiny_index_with_text_encoder(), ReadOptions::default()).unwrap();
        for (key, w) in set.iter() {
            assert!(w.is_dora() && w.lycoris.as_ref().is_some_and(|l| l.algo == algo), "{name}: {key}");
            assert!(w.delta().data.iter().any(|v| *v != 0.0), "{name}: {key} did not train");
        }
        let meta = lora_metadata(&straight.lora);
        let args = &meta["ss_network_args"];
        assert!(args.contains("\"dora_wd\":\"True\"") && args.contains(&format!("\"algo\":\"{name}\"")), "{args}");

        let dir = tempfile::tempdir().unwrap();
        assert_resumes_bit_for_bit(&dora_config(dir.path(), 6), &straight, |c| c.lora.dora = false, "dora");

        let more_dir = tempfile::tempdir().unwrap();
        let mut more = dora_config(more_dir.path(), 2);
        more.lora.network_weights = straight.lora.display().to_string();
        assert_trains(&more);
        more.lora.dora = false;
        let err = train::<B>(&more, &Default::default(), &mut |_| true).unwrap_err().to_string();
        assert!(err.contains("lora.dora"), "{err}");
        more.lora.dim_from_weights = true;
        assert_trains(&more);

        let bf16_dir = tempfile::tempdir().unwrap();
        let mut bf16 = dora_config(bf16_dir.path(), 2);
        bf16.train.mixed_precision = trainer::config::MixedPrecision::Bf16;
        assert_trains(&bf16);

        assert_applies_at_half_strength(&straight.lora, name);
    }
}

/// LoKr's `full_matrix` and `unbalanced_factorization`: the saved halves take the shapes
/// LyCORIS gives them (checked against LyCORIS in lora-core), both train, and the
/// metadata names the settings.
#[test]
fn lokr_full_matrix_and_unbalanced_factorization_train() {
    let _guard = seeded();
    let dir = tempfile::tempdir().unwrap();
    let mut c = quick_config(dir.path(), 2);
    c.lora.algo = lora_core::Algo::Lokr;
    (c.lora.lokr_full_matrix, c.lora.lokr_unbalanced_factorization, c.lora.lokr_factor) = (true, true, 4);
    c.output.sample_prompts.clear();
    let report = train::<B>(&c, &Default::default(), &mut |_| true).unwrap();
    let (set, _) = AdapterSet::load(&report.lora, &tiny_index_with_text_encoder(), ReadOptions::default()).unwrap();
    for (key, w) in set.iter() {
        let ly = w.lycoris.as_ref().unwrap();
        let (w1, w2) = (ly.get("lokr_w1").unwrap_or_else(|| panic!("{key}: a full w1")), ly.get("lokr_w2").unwrap_or_else(|| panic!("{key}: a full w2")));
        // Unbalanced: w1 takes the output's larger factor (LyCORIS' factorization puts the
        // smaller first), w2 the smaller; the input side is as usual.
        let (out, input) = (w1.shape[0] * w2.shape[0], w1.shape[1] * w2.shape[1]);
        let ((out_small, out_large), (in_small, _)) = (lora_core::lycoris::factorization(out, 4), lora_core::lycoris::factorization(input, 4));
        assert_eq!((w1.shape[0], w1.shape[1], w2.shape[0]), (out_large, in_small, out_small), "{key}");
        assert!(w.delta().data.iter().any(|v| *v != 0.0), "{key} did not train");
    }
    let meta = lora_metadata(&report.lora);
    let args = &meta["ss_network_args"];
    assert!(args.contains("\"full_matrix\":\"True\"") && args.contains("\"unbalanced_factorization\":\"True\""), "{args}");
    // No adapter has a rank of its own: the configured one is recorded, as sd-scripts does.
    assert_eq!((meta["ss_network_dim"].as_str(), meta["ss_network_alpha"].as_str()), (c.lora.rank.to_string().as_str(), format!("{:.1}", c.lora.alpha).as_str()), "{meta:?}");
}

/// What LoHa and LoKr do not train is a config error naming the key.
#[test]
fn lycoris_config_errors_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let base = || {
        let mut c = quick_config(dir.path(), 2);
        c.lora.algo = lora_core::Algo::Loha;
        c
    };
    type Edit<'a> = &'a dyn Fn(&mut TrainConfig);
    let oft = |c: &mut TrainConfig| (c.lora.algo, c.lora.alpha) = (lora_core::Algo::Oft, 1e-3);
    let diag = |c: &mut TrainConfig| c.lora.algo = lora_core::Algo::DiagOft;
    let cases: [(Edit, &str); 23] = [
        (&|c| c.lora.dropout = 0.1, "lora.dropout"),
        (&|c| { diag(c); c.lora.constraint = -0.1 }, "lora.constraint"),
        (&|c| { diag(c); c.lora.constraint = f32::NAN }, "lora.constraint"),
        (&|c| { diag(c); c.lora.dora = true }, "lora.dora"),
        (&|c| (c.lora.algo, c.lora.rank_dropout) = (lora_core::Algo::Boft, 0.1), "lora.rank_dropout"),
        (&|c| { diag(c); c.lora.rank_dropout_scale = true }, "lora.rank_dropout_scale"),
        (&|c| c.lora.rescaled = true, "lora.rescaled"),
        (&|c| { oft(c); c.lora.constraint = 0.01 }, "kohya's OFT takes its constraint in lora.alpha"),
        (&|c| (c.lora.algo, c.lora.alpha) = (lora_core::Algo::Oft, 0.0), "lora.alpha"),
        (&|c| { oft(c); (c.lora.conv_rank, c.lora.conv_alpha) = (2, -1.0) }, "lora.conv_alpha"),
        (&|c| { oft(c); c.lora.module_dropout = 0.1 }, "lora.module_dropout"),
        (&|c| { oft(c); c.lora.rank_dropout = 0.1 }, "lora.rank_dropout"),
        (&|c| { oft(c); c.lora.dora = true }, "lora.dora"),
        (&|c| { oft(c); c.lora.rslora = true }, "lora.rslora"),
        (&|c| { oft(c); c.train.scale_weight_norms = 1.0 }, "train.scale_weight_norms"),
        (&|c| c.lora.lokr_full_matrix = true, "lora.lokr_full_matrix"),
        (&|c| c.lora.lokr_unbalanced_factorization = true, "lora.lokr_unbalanced_factorization"),
        (&|c| (c.lora.algo, c.lora.rank_dropout_scale) = (lora_core::Algo::Lora, true), "lora.rank_dropout_scale"),
        (&|c| (c.lora.algo, c.lora.use_scalar) = (lora_core::Algo::Lora, true), "lora.use_scalar"),
        (&|c| c.lora.loraplus_lr_ratio = 16.0, "loraplus"),
        (&|c| c.lora.lokr_factor = 4, "lora.lokr_factor"),
        (&|c| c.output.save_format = AdapterFormat::Peft, "output.save_format"),
        (&|c| (c.lora.algo, c.lora.lokr_factor) = (lora_core::Algo::Lora, 4), "lora.lokr_factor"),
    ];
    for (edit, expect) in cases {
        let mut c = base();
        edit(&mut c);
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains(expect), "{expect}: {err}");
    }
    let mut ok = base();
    ok.lora.module_dropout = 0.1;
    (ok.lora.rank_dropout, ok.lora.rank_dropout_scale) = (0.1, true);
    ok.validate().unwrap();
    let mut ok = base();
    oft(&mut ok);
    ok.validate().unwrap();
    // Diag-OFT: no constraint, or one; a scale; LyCORIS' module dropout.
    let mut ok = base();
    diag(&mut ok);
    (ok.lora.rescaled, ok.lora.module_dropout, ok.train.scale_weight_norms) = (true, 0.1, 1.0);
    ok.validate().unwrap();
    ok.lora.constraint = 1e-3;
    ok.validate().unwrap();
}

/// `model.base_weights` (kohya's `base_weights`): a LoRA merged into the frozen model before
/// training acts as that LoRA attached at full strength (the first step's loss is the one a
/// run starting from it as `network_weights` sees), at strength 0 changes nothing, and a
/// resume must keep it.
#[test]
fn base_weights_are_merged_before_training() {
    let _guard = seeded();
    let dir = tempfile::tempdir().unwrap();
    let mut first = quick_config(&dir.path().join("first"), 4);
    first.lora.text_encoder_targets = sd_model::targets::TextEncoderTargets::Attn;
    first.train.learning_rate = 1e-2;
    first.output.save_precision = lora_core::SaveDtype::F32;
    let trained = train::<B>(&first, &Default::default(), &mut |_| true).unwrap();
    let file = trained.lora.display().to_string();
    let first_loss = |config: &TrainConfig| train::<B>(config, &Default::default(), &mut |_| true).unwrap_or_else(|e| panic!("{}: {e}", config.output.output_dir.display())).losses[0];

    let plain = quick_config(&dir.path().join("plain"), 1);
    let mut started = plain.clone();
    started.output.output_dir = dir.path().join("started");
    started.lora.text_encoder_targets = sd_model::targets::TextEncoderTargets::Attn;
    started.lora.network_weights = file.clone();
    let mut based = plain.clone();
    based.output.output_dir = dir.path().join("based");
    based.model.base_weights = vec![file.clone()];
    let mut zero = based.clone();
    zero.output.output_dir = dir.path().join("zero");
    zero.model.base_weights = vec![format!("{file}:0")];
    let (p, s, b, z) = (first_loss(&plain), first_loss(&started), first_loss(&based), first_loss(&zero));
    assert_eq!(z, p, "strength 0 leaves the model as it was");
    // The new adapters train at full strength whatever the base LoRA's (they once took its
    // multiplier, here 0, and did not train).
    let index = tiny_index_with_text_encoder();
    let (set, _) = AdapterSet::load(zero.output.output_dir.join("demo_lora.safetensors"), &index, ReadOptions::default()).unwrap();
    assert!(set.iter().any(|(_, w)| w.up.data.iter().any(|v| *v != 0.0)), "the adapters trained");
    assert!((b - s).abs() <= 1e-5 * s.abs(), "merged {b} vs attached {s}");
    assert!((b - p).abs() > 50.0 * (b - s).abs(), "the base LoRA changes the model: {b} vs {p} (attached: {s})");

    let state = based.output.output_dir.join("state");
    let mut other = based.clone();
    other.model.base_weights.clear();
    other.train.max_train_steps = 2;
    let err = trainer::train::resume::<B>(&other, &state, &Default::default(), &mut |_| true).unwrap_err().to_string();
    assert!(err.contains("base_weights"), "{err}");
    let mut missing = plain.clone();
    missing.model.base_weights = vec![dir.path().join("nope.safetensors:0.5").display().to_string()];
    let err = missing.validate().unwrap_err().to_string();
    assert!(err.contains("model.base_weights") && err.contains("nope.safetensors"), "{err}");
}

/// A key's default value; an optional key's (unset by default) reads as a string, whose
/// values and the odd ones cover both strings and lists.
fn default_of(defaults: &toml::Value, section: &str, field: &str) -> toml::Value {
    defaults.get(section).and_then(|s| s.get(field)).cloned().unwrap_or(toml::Value::String(String::new()))
}

/// Values that tend to break configurations, for a key whose default is `default`: edge
/// numbers (0, negative, huge, NaN, infinities), empty and odd strings, short lists, and
/// with `odd` values of other types.
fn nasty_values(default: &toml::Value, odd: bool) -> Vec<String> {
    let odd_types = if odd { ["true", "\"x\"", "[]", "1"].map(String::from).to_vec() } else { Vec::new() };
    let own: Vec<&str> = match default {
        toml::Value::Integer(_) => vec!["0", "1", "2", "3", "7", "64", "1000", "4294967296", "-1"],
        toml::Value::Float(_) => vec!["0.0", "-1.0", "1e-12", "0.5", "1.0", "2.0", "1e30", "nan", "inf", "-inf"],
        toml::Value::Boolean(_) => vec!["true", "false"],
        toml::Value::String(_) => vec!["\"\"", "\"x\"", "\"none\"", "\"ü\"", "\"../nope\"", "\"demo\"", "\"tiny\"", "\"cosine\"", "\"adamw\""],
        toml::Value::Array(_) => vec!["[]", "[0]", "[1.0, 2.0]", "[\"\"]", "[\"a\", \"b\"]", "[-1, 1e30]"],
        _ => vec![],
    };
    own.into_iter().map(String::from).chain(odd_types).collect()
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config::with_cases(384))]

    /// Any one to three keys of the configuration set to edge values (`--set`) make a
    /// config error naming the problem, or a configuration that writes a TOML which loads
    /// back the same and whose data (the demo images) opens and plans its epochs — never
    /// a panic.
    #[test]
    fn any_settings_are_errors_or_configs_that_reload(picks in proptest::collection::vec((0usize..10_000, 0usize..100), 1..4)) {
        let defaults = toml::Value::try_from(TrainConfig::default()).unwrap();
        let keys = trainer::config::valid_keys();
        let mut sets = vec!["output.sample_prompts=[]".to_string(), "data.demo_images=2".to_string()];
        for (k, v) in picks {
            let key = &keys[k % keys.len()];
            // The data's size stays small (resolutions past 8192 px are errors).
            if key == "data.demo_images" {
                continue;
            }
            let (section, field) = key.split_once('.').unwrap();
            let values = nasty_values(&default_of(&defaults, section, field), true);
            sets.push(format!("{key}={}", values[v % values.len()]));
        }
        let config = match TrainConfig::load(None, &sets) {
            Ok(config) => config,
            Err(err) => {
                // Errors name the key or what is wrong with the configuration's values.
                let text = err.to_string();
                let named = sets[2..].iter().any(|s| text.contains(s.split('=').next().unwrap_or(s)));
                proptest::prop_assert!(named || text.starts_with("configuration:"), "{:?}: {}", sets, text);
                return Ok(());
            }
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("written.toml");
        std::fs::write(&path, config.to_toml()).unwrap();
        let back = TrainConfig::load(Some(&path), &[]);
        proptest::prop_assert!(back.is_ok(), "{:?}: the written config does not load: {}", sets, back.err().map(|e| e.to_string()).unwrap_or_default());
        proptest::prop_assert_eq!(back.unwrap().to_toml(), config.to_toml(), "{:?}", sets);
        if let Ok(data) = trainer::train::training_datasets(&config) {
            let _ = trainer::train::data_summary(&config, &data);
            for epoch in 0..2 {
                let _ = data.0.plan_epoch(epoch);
            }
        }
    }
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config::with_cases(64))]

    /// Settings that validate also train: any one to three keys at edge values (sizes kept
    /// small) either are refused or give a two-step run on the demo data that ends with its
    /// LoRA written, or stops with a typed error (a diverging loss, a missing file) — never
    /// a panic.
    #[test]
    fn any_valid_settings_train_or_fail_with_an_error(picks in proptest::collection::vec((0usize..10_000, 0usize..100), 1..4)) {
        let _guard = seeded();
        let defaults = toml::Value::try_from(TrainConfig::default()).unwrap();
        let keys = trainer::config::valid_keys();
        let dir = tempfile::tempdir().unwrap();
        let mut sets = vec![
            "output.sample_prompts=[]".to_string(),
            "data.demo_images=2".to_string(),
            "train.max_train_steps=2".to_string(),
            format!("output.output_dir={:?}", dir.path().join("out").display().to_string()),
        ];
        // What sets the run's size stays as it is (steps, epochs, images, resolution), and
        // other counts stay below 1000 (ranks, repeats).
        let sizes = ["train.max_train_steps", "train.max_train_epochs", "data.demo_images", "data.resolution", "output.output_dir"];
        for (k, v) in picks {
            let key = &keys[k % keys.len()];
            if sizes.contains(&key.as_str()) {
                continue;
            }
            let (section, field) = key.split_once('.').unwrap();
            let values: Vec<String> = nasty_values(&default_of(&defaults, section, field), false).into_iter().filter(|v| v != "4294967296" && v != "1000").collect();
            if values.is_empty() {
                continue;
            }
            sets.push(format!("{key}={}", values[v % values.len()]));
        }
        let Ok(config) = TrainConfig::load(None, &sets) else { return Ok(()) };
        if let Ok(report) = train::<B>(&config, &Default::default(), &mut |_| true) {
            proptest::prop_assert!(report.lora.is_file(), "{:?}: no LoRA written", sets);
        }
    }
}

/// Settings that are unset by default (`data.face_crop_aug_range`,
/// `data.resize_interpolation`) are valid keys of files and `--set`, and a config with
/// them set writes a TOML that loads back the same.
#[test]
fn optional_settings_load_from_files_and_set() {
    let keys = trainer::config::valid_keys();
    for key in ["data.face_crop_aug_range", "data.resize_interpolation", "train.lr_scheduler_args", "lora.conv_rank"] {
        assert!(keys.iter().any(|k| k == key), "{key} missing from {keys:?}");
    }
    let sets = ["data.resize_interpolation=\"area\"", "data.face_crop_aug_range=[2.0, 4.0]", "data.enable_bucket=false", "data.train_data_dir=\"faces\""].map(String::from);
    let config = TrainConfig::load(None, &sets).unwrap();
    assert_eq!((config.data.resize_interpolation, config.data.face_crop_aug_range), (Some(sd_data::ResizeInterpolation::Area), Some([2.0, 4.0])));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.toml");
    std::fs::write(&path, config.to_toml()).unwrap();
    assert_eq!(TrainConfig::load(Some(&path), &[]).unwrap().to_toml(), config.to_toml());
}

/// A state folder of an interrupted run (2 of 4 steps, text encoder in training), made
/// once for the damaged-state property test.
fn interrupted_state() -> &'static (std::path::PathBuf, TrainConfig) {
    static STATE: std::sync::OnceLock<(std::path::PathBuf, TrainConfig)> = std::sync::OnceLock::new();
    STATE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap().keep();
        let mut config = quick_config(&dir.join("out"), 4);
        config.data.demo_images = 2;
        config.train.text_encoder_lr = 5e-4;
        config.output.sample_prompts.clear();
        let first = train::<B>(&config, &Default::default(), &mut |info| info.step < 2).unwrap();
        assert!(first.interrupted);
        (dir.join("out/state"), config)
    })
}

/// One thing done to a file of a state folder.
#[derive(Clone, Debug)]
enum StateDamage {
    /// Cut a file to this many thousandths of its length.
    Truncate(usize),
    /// Leave out a tensor of a safetensors file (`state.json`: a key).
    Drop(usize),
    /// Give a tensor another shape, or a `state.json` value another value.
    Reshape(usize, Vec<usize>),
    /// Fill a tensor with a value (`state.json`: set a value to it).
    Fill(usize, f32),
}

fn state_damage() -> impl proptest::strategy::Strategy<Value = (usize, StateDamage)> {
    use proptest::prelude::*;
    let damage = prop_oneof![
        (0usize..1000).prop_map(StateDamage::Truncate),
        any::<usize>().prop_map(StateDamage::Drop),
        (any::<usize>(), proptest::collection::vec(0usize..6, 0..4)).prop_map(|(i, s)| StateDamage::Reshape(i, s)),
        (any::<usize>(), proptest::sample::select(vec![f32::NAN, f32::INFINITY, -1.0, 0.0, 1e30])).prop_map(|(i, v)| StateDamage::Fill(i, v)),
    ];
    (0usize..3, damage)
}

/// `value` (a JSON document) with its `i`-th leaf (in a walk of the document) changed by `f`.
fn json_leaf(value: &mut serde_json::Value, i: &mut usize, f: &mut dyn FnMut(&mut serde_json::Value)) {
    match value {
        serde_json::Value::Object(map) => map.values_mut().for_each(|v| json_leaf(v, i, f)),
        serde_json::Value::Array(items) if !items.is_empty() => items.iter_mut().for_each(|v| json_leaf(v, i, f)),
        leaf => {
            if *i == 0 {
                f(leaf);
            }
            *i = i.wrapping_sub(1);
        }
    }
}

fn damage_state_file(path: &std::path::Path, damage: &StateDamage) {
    let bytes = std::fs::read(path).unwrap();
    if let StateDamage::Truncate(t) = damage {
        std::fs::write(path, &bytes[..bytes.len() * t / 1000]).unwrap();
        return;
    }
    if path.extension().is_some_and(|e| e == "json") {
        let mut doc: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        let leaves = doc.to_string().len();
        let (mut i, new) = match damage {
            StateDamage::Drop(i) => (i % leaves, serde_json::Value::Null),
            StateDamage::Reshape(i, s) => (i % leaves, serde_json::json!(s)),
            StateDamage::Fill(i, v) => (i % leaves, serde_json::json!(if v.is_finite() { f64::from(*v) } else { 1e300 })),
            StateDamage::Truncate(_) => unreachable!(),
        };
        json_leaf(&mut doc, &mut i, &mut |leaf| *leaf = new.clone());
        std::fs::write(path, doc.to_string()).unwrap();
        return;
    }
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, Vec<usize>, Vec<f32>)> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.shape().to_vec(), v.data().chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()))
        .collect();
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let n = tensors.len();
    match damage {
        StateDamage::Drop(i) => drop(tensors.remove(i % n)),
        StateDamage::Reshape(i, shape) => {
            let t = &mut tensors[i % n];
            t.2 = (0..shape.iter().product::<usize>()).map(|k| k as f32 * 0.01).collect();
            t.1 = shape.clone();
        }
        StateDamage::Fill(i, v) => tensors[i % n].2.iter_mut().for_each(|x| *x = *v),
        StateDamage::Truncate(_) => unreachable!(),
    }
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors.into_iter().map(|(k, s, d)| (k, s, d.iter().flat_map(|x| x.to_le_bytes()).collect())).collect();
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> =
        data.iter().map(|(k, s, b)| (k.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b).unwrap())).collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config::with_cases(32))]

    /// A damaged state folder (a file cut short, a tensor left out, reshaped or filled with
    /// NaN, a `state.json` value changed) resumes, or is refused with an error naming the
    /// state — never a panic.
    #[test]
    fn damaged_states_resume_or_are_refused((file, damage) in state_damage()) {
        // The backend's random stream is global: runs (this one's first too) take turns.
        let _guard = seeded();
        let (state, config) = interrupted_state();
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("state");
        std::fs::create_dir_all(&copy).unwrap();
        for entry in std::fs::read_dir(state).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), copy.join(entry.file_name())).unwrap();
        }
        let name = ["state.json", "adapters.safetensors", "optimizer.safetensors"][file];
        damage_state_file(&copy.join(name), &damage);
        let mut resumed = config.clone();
        resumed.output.output_dir = dir.path().join("out");
        if let Err(err) = trainer::train::resume::<B>(&resumed, &copy, &Default::default(), &mut |_| true) {
            let text = err.to_string();
            proptest::prop_assert!(text.contains("state") || text.contains("diverged"), "{}: {}", name, text);
        }
    }
}

/// kohya's textual inversion: with no adapter targets, `[embedding]` trains the word's
/// vectors alone, started from the init word's token rows, and writes an embedding file
/// (`emb_params`) that generation reads and calls by the file's name; a resumed run ends
/// where a straight one does, and a state is refused for another number of vectors.
#[test]
fn textual_inversion_trains_an_embedding_file_and_resumes_bit_for_bit() {
    let _guard = seeded();
    let config = |dir: &std::path::Path| {
        let mut c = quick_config(dir, 6);
        c.lora.unet_targets = sd_model::targets::UnetTargets::None;
        c.embedding.token = "demostyle".into();
        c.embedding.vectors = 2;
        c.embedding.init_word = "painting".into();
        c.embedding.learning_rate = 5e-3;
        c.output.save_precision = lora_core::SaveDtype::F32;
        c
    };
    let dir = tempfile::tempdir().unwrap();
    let straight = train::<B>(&config(dir.path()), &Default::default(), &mut |_| true).unwrap();
    assert!(straight.losses.iter().all(|l| l.is_finite()), "{:?}", straight.losses);
    let trained = sd_model::textual_inversion::read_embedding(&straight.lora).unwrap();
    assert_eq!((trained.name.as_str(), trained.vectors.len(), trained.vectors[0].shape.as_slice()), ("demo_lora", 1, [2usize, 32].as_slice()));
    // The init word's rows (one token, repeated), moved by training but not far.
    let device = Default::default();
    let base = sd_pipeline::load_components::<Flex>("tiny", 0, &device).unwrap();
    let ids = base.tokenizer.encode_unpadded("painting").unwrap();
    assert_eq!(ids.len(), 1);
    let init = lora_core::HostTensor::from_tensor(base.text_encoder.token_rows(&[ids[0], ids[0]]).unwrap()).unwrap();
    let moved = trained.vectors[0].data.iter().zip(&init.data).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(moved > 1e-3 && moved < 0.2, "largest change {moved}");

    // Generation loads it and calls it by the file's stem.
    let mut c = sd_pipeline::load_components::<Flex>("tiny", 0, &device).unwrap();
    let names = sd_pipeline::load_embeddings(&mut c, std::slice::from_ref(&straight.lora), &[], &device).unwrap();
    assert_eq!(names[0].0, "demo_lora");

    let resumed_dir = tempfile::tempdir().unwrap();
    assert_resumes_bit_for_bit(&config(resumed_dir.path()), &straight, |c| c.embedding.vectors = 3, "embedding.token");
}

/// Pivotal tuning: adapters and an embedding train together; the LoRA file bundles the
/// vectors (`bundle_emb.WORD.emb_params`), which generation loads with the LoRA; the
/// embedding's own learning rate moves it where the default one moves it less.
#[test]
fn pivotal_tuning_bundles_the_embedding_in_the_lora() {
    let _guard = seeded();
    let run = |lr: f64| {
        let dir = tempfile::tempdir().unwrap();
        let mut c = quick_config(dir.path(), 3);
        c.lora.unet_targets = sd_model::targets::UnetTargets::Attn;
        c.embedding.token = "demostyle".into();
        c.embedding.vectors = 2;
        c.embedding.learning_rate = lr;
        c.output.save_precision = lora_core::SaveDtype::F32;
        let report = train::<B>(&c, &Default::default(), &mut |_| true).unwrap();
        let (set, _) = AdapterSet::load(&report.lora, &tiny_index(), ReadOptions::default()).unwrap();
        let bundled = sd_model::textual_inversion::read_bundled_embeddings(&report.lora).unwrap();
        (dir, report, set, bundled)
    };
    let (dir, report, set, bundled) = run(1e-2);
    assert_eq!(set.len(), 32, "4 transformers x 8 attention layers");
    // Continuing the LoRA (`lora.network_weights`) continues its embedding.
    let mut c = quick_config(&dir.path().join("continued"), 1);
    c.lora.unet_targets = sd_model::targets::UnetTargets::Attn;
    c.lora.network_weights = report.lora.to_str().unwrap().into();
    (c.embedding.token, c.embedding.vectors, c.embedding.learning_rate) = ("demostyle".into(), 2, 1e-30);
    c.output.save_precision = lora_core::SaveDtype::F32;
    let continued = train::<B>(&c, &Default::default(), &mut |_| true).unwrap();
    let again = sd_model::textual_inversion::read_bundled_embeddings(&continued.lora).unwrap();
    assert_eq!(again[0].vectors, bundled[0].vectors, "started from the LoRA's vectors (and barely moved)");
    assert_eq!(bundled.len(), 1);
    assert_eq!((bundled[0].name.as_str(), bundled[0].vectors[0].shape.as_slice()), ("demostyle", [2usize, 32].as_slice()));
    let device = Default::default();
    let mut c = sd_pipeline::load_components::<Flex>("tiny", 0, &device).unwrap();
    let names = sd_pipeline::load_embeddings(&mut c, &[], std::slice::from_ref(&report.lora), &device).unwrap();
    assert_eq!(names, vec![("demostyle".to_string(), sd_model::textual_inversion::token_names("demostyle", 2))]);
    // Random starting rows (no init word) from the same seed: a rate of 1e-6 leaves them
    // where they start, 1e-2 moves them.
    let (_slow_dir, _, _, slow) = run(1e-6);
    let moved = bundled[0].vectors[0].data.iter().zip(&slow[0].vectors[0].data).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(moved > 1e-3, "largest difference {moved}");
}

/// `[embedding]` settings are checked before anything trains: a setting without a word, a
/// word of two, too many vectors, and captions that never hold the word.
#[test]
fn embedding_settings_are_checked() {
    let _guard = seeded();
    let dir = tempfile::tempdir().unwrap();
    let err = |edit: &dyn Fn(&mut TrainConfig)| {
        let mut c = quick_config(dir.path(), 1);
        c.embedding.token = "demostyle".into();
        edit(&mut c);
        train::<B>(&c, &Default::default(), &mut |_| true).unwrap_err().to_string()
    };
    assert!(err(&|c| { c.embedding.token.clear(); c.embedding.init_word = "cat".into() }).contains("embedding.init_word"));
    assert!(err(&|c| c.embedding.token = "demo style".into()).contains("embedding.token"));
    assert!(err(&|c| c.embedding.vectors = 76).contains("embedding.vectors"));
    // Bundled in a PEFT-layout LoRA, diffusers would refuse the file.
    let peft = err(&|c| c.output.save_format = lora_core::AdapterFormat::Peft);
    assert!(peft.contains("output.save_format") && peft.contains("unbundle-embeddings"), "{peft}");
    // Starting vectors of another family's width (SD1.5's 768, the tiny model's 32).
    let wide = dir.path().join("wide.safetensors");
    sd_model::textual_inversion::Embedding { name: "wide".into(), vectors: vec![lora_core::HostTensor::new(vec![1, 768], vec![0.0; 768]).unwrap()] }.write(&wide, lora_core::SaveDtype::F16, Default::default()).unwrap();
    let width = err(&|c| c.embedding.weights = wide.to_str().unwrap().into());
    assert!(width.contains("embedding.weights") && width.contains("width 768"), "{width}");
    let none = err(&|c| c.embedding.token = "nowhere".into());
    assert!(none.contains("no caption holds the word `nowhere`"), "{none}");
    // With templates the captions need not hold it.
    let mut c = quick_config(dir.path(), 1);
    c.embedding.token = "nowhere".into();
    c.embedding.template = trainer::config::CaptionTemplate::Style;
    assert_trains(&c);
}

/// `embedding.train_fraction` (diffusers' `train_text_encoder_ti_frac`): the embedding
/// trains for the first half of the steps and then keeps its vectors while the adapters
/// train on, with and without gradient checkpointing; without adapters it is refused.
#[test]
fn the_embedding_stops_training_after_its_fraction() {
    let _guard = seeded();
    for checkpointing in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let mut c = quick_config(dir.path(), 6);
        c.lora.unet_targets = sd_model::targets::UnetTargets::Attn;
        c.train.gradient_checkpointing = checkpointing;
        c.embedding.token = "demostyle".into();
        c.embedding.learning_rate = 1e-2;
        c.embedding.train_fraction = 0.5;
        c.output.save_every_n_steps = 2;
        c.output.save_precision = lora_core::SaveDtype::F32;
        let report = train::<B>(&c, &Default::default(), &mut |_| true).unwrap();
        let bundle = |name: &str| sd_model::textual_inversion::read_bundled_embeddings(&dir.path().join(name)).unwrap().remove(0).vectors.remove(0);
        let adapters = |name: &str| AdapterSet::load(dir.path().join(name), &tiny_index(), ReadOptions::default()).unwrap().0;
        let (step2, step4, last) = (bundle("demo_lora-step00000002.safetensors"), bundle("demo_lora-step00000004.safetensors"), bundle("demo_lora.safetensors"));
        assert_ne!(step2, step4, "step 3 trains the embedding");
        assert_eq!(step4, last, "steps 4 to 6 leave it");
        let changed = adapters("demo_lora-step00000004.safetensors").iter().zip(adapters("demo_lora.safetensors").iter()).any(|((_, a), (_, b))| a.up.data != b.up.data);
        assert!(changed, "the adapters train on");
        assert!(report.losses.iter().all(|l| l.is_finite()));
    }
    let dir = tempfile::tempdir().unwrap();
    let mut c = quick_config(dir.path(), 2);
    c.lora.unet_targets = sd_model::targets::UnetTargets::None;
    c.embedding.token = "demostyle".into();
    c.embedding.train_fraction = 0.5;
    let err = train::<B>(&c, &Default::default(), &mut |_| true).unwrap_err().to_string();
    assert!(err.contains("embedding.train_fraction"), "{err}");
}
