//! The `trainer` binary's file commands, run as a user runs them.

use std::path::Path;
use std::process::Command;

use burn::backend::{Autodiff, Flex};
use lora_core::{AdapterFormat, AdapterSet, ReadOptions};
use trainer::train::train;
use trainer::TrainConfig;

type B = Autodiff<Flex>;

fn trainer(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_trainer")).args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn tiny_index() -> lora_core::ModuleIndex {
    let mut unet = sd_model::UNet2DConditionModel::<Flex>::new(&sd_model::UnetConfig::tiny(), &Default::default()).unwrap();
    sd_model::lora::module_index(&mut unet, None).unwrap()
}

/// A short run on the built-in demo (4 images, no samples) writing into `dir/run`.
fn quick_config(dir: &Path, steps: usize) -> TrainConfig {
    let mut config = TrainConfig::default();
    config.output.output_dir = dir.join("run");
    config.train.max_train_steps = steps;
    config.train.lr_warmup_steps = 0;
    config.data.demo_images = 4;
    config.output.sample_prompts.clear();
    config
}

fn load(path: &Path) -> (AdapterSet, AdapterFormat) {
    let (set, report) = AdapterSet::load(path, &tiny_index(), ReadOptions::default()).unwrap();
    (set, report.format)
}

/// `trainer resize` on a LoCon trained here: fixed ranks per kind of layer, a dynamic
/// rule, the input's layout kept or changed, and the errors a user can run into; then
/// `trainer merge-loras` of it and its resized copy, exactly and to a rank.
#[test]
fn resize_lowers_ranks_and_refuses_bad_requests() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = TrainConfig::default();
    config.output.output_dir = dir.path().join("run");
    config.train.max_train_steps = 3;
    config.train.lr_warmup_steps = 0;
    config.data.demo_images = 4;
    config.output.sample_prompts.truncate(1);
    config.output.sample_steps = 2;
    config.lora.unet_targets = sd_model::targets::UnetTargets::Conv;
    (config.lora.rank, config.lora.alpha, config.lora.conv_rank, config.lora.conv_alpha) = (8, 4.0, 4, 2.0);
    let report = train::<B>(&config, &Default::default(), &mut |_| true).unwrap();
    let input = report.lora.to_str().unwrap().to_string();
    let (trained, _) = load(&report.lora);
    let spatial = |w: &lora_core::LoraWeights| w.is_conv() && w.down.shape[2..] != [1, 1];

    // `info` reads back what the run recorded: the LoCon's two groups, the run's settings
    // and the demo captions' trigger word as the most frequent tag.
    let (ok, text) = trainer(&["info", &input, "--tags", "1"]);
    assert!(ok, "{text}");
    for expected in ["Kohya layout", "LoRA 3x3-conv (rank 4, alpha 2)", "LoRA (rank 8, alpha 4)", "steps: 3", "caption tags (1 most frequent of", "demostyle ("] {
        assert!(text.contains(expected), "no `{expected}` in {text}");
    }

    // `convert` reads every LoCon key, `conv_shortcut` of the blocks that change width
    // included (its module index once lacked them).
    let converted = dir.path().join("converted.safetensors");
    let (ok, text) = trainer(&["convert", &input, converted.to_str().unwrap(), "--to", "peft", "--dtype", "f32"]);
    assert!(ok, "{text}");
    assert!(trained.iter().any(|(k, _)| k.path.ends_with("conv_shortcut")));
    assert_eq!(load(&converted).0.len(), trained.len());
    // An existing output, the input itself included, is never written over.
    for target in [converted.to_str().unwrap(), input.as_str()] {
        let before = std::fs::read(target).unwrap();
        let (ok, text) = trainer(&["convert", &input, target, "--to", "peft"]);
        assert!(!ok && text.contains("already exists"), "{text}");
        assert_eq!(std::fs::read(target).unwrap(), before);
    }

    let fixed = dir.path().join("fixed.safetensors");
    let (ok, text) = trainer(&["resize", &input, fixed.to_str().unwrap(), "--rank", "2", "--conv-rank", "1", "--dtype", "f32"]);
    assert!(ok, "{text}");
    assert!(text.contains("rank 4..8") && text.contains("rank 1..2"), "{text}");
    let (small, format) = load(&fixed);
    assert_eq!(format, AdapterFormat::Kohya);
    assert_eq!(small.len(), trained.len());
    for (key, w) in small.iter() {
        let before = trained.get(key).unwrap();
        assert_eq!(w.rank(), if spatial(w) { 1 } else { 2 }, "{key}");
        assert!((w.scale() - before.scale()).abs() < 1e-6, "{key}: the scale is kept");
    }

    let dynamic = dir.path().join("dynamic.safetensors");
    let args = ["resize", &input, dynamic.to_str().unwrap(), "--rank", "8", "--dynamic-method", "sv_fro", "--dynamic-param", "0.5", "--to", "peft", "--verbose"];
    let (ok, text) = trainer(&args);
    assert!(ok, "{text}");
    assert!(text.contains("fro retained") && text.contains("sv_fro: 0.5"), "{text}");
    let (picked, format) = load(&dynamic);
    assert_eq!(format, AdapterFormat::Peft);
    assert!(picked.iter().all(|(k, w)| w.rank() <= trained.get(k).unwrap().rank()));
    assert!(picked.iter().any(|(k, w)| w.rank() < trained.get(k).unwrap().rank()), "half the norm needs fewer ranks somewhere");

    // The output exists now: nothing is overwritten.
    let before = std::fs::read(&fixed).unwrap();
    let (ok, text) = trainer(&["resize", &input, fixed.to_str().unwrap(), "--rank", "2"]);
    assert!(!ok && text.contains("already exists"), "{text}");
    assert_eq!(std::fs::read(&fixed).unwrap(), before);
    let other = dir.path().join("other.safetensors");
    let other = other.to_str().unwrap();
    let (ok, text) = trainer(&["resize", &input, other, "--rank", "4", "--dynamic-method", "sv_fro", "--dynamic-param", "2"]);
    assert!(!ok && text.contains("sv_fro: 2"), "{text}");
    let (ok, text) = trainer(&["resize", &input, other, "--rank", "4", "--dynamic-method", "svd", "--dynamic-param", "0.9"]);
    assert!(!ok && text.contains("unknown rank rule `svd`"), "{text}");
    let (ok, text) = trainer(&["resize", &input, other, "--rank", "4", "--dynamic-method", "sv_fro"]);
    assert!(!ok && text.contains("--dynamic-param"), "{text}");
    let (ok, text) = trainer(&["resize", "missing.safetensors", other, "--rank", "4"]);
    assert!(!ok && text.contains("missing.safetensors"), "{text}");
    assert!(!Path::new(other).exists());

    // `merge-loras`: exactly (ranks concatenated), or to a rank (alpha = rank).
    let merged = dir.path().join("merged.safetensors");
    let half = format!("{input}:0.5");
    let fixed_third = format!("{}:-0.25", fixed.display());
    let (ok, text) = trainer(&["merge-loras", &half, &fixed_third, "--out", merged.to_str().unwrap(), "--dtype", "f32"]);
    assert!(ok, "{text}");
    let (sum, _) = load(&merged);
    assert_eq!(sum.len(), trained.len());
    for (key, w) in sum.iter() {
        let (a, b) = (trained.get(key).unwrap(), small.get(key).unwrap());
        assert_eq!(w.rank(), a.rank() + b.rank(), "{key}");
        let want: Vec<f32> = a.delta().data.iter().zip(&b.delta().data).map(|(x, y)| 0.5 * x - 0.25 * y).collect();
        let err = w.delta().data.iter().zip(&want).map(|(g, w)| (g - w).abs()).fold(0.0f32, f32::max);
        assert!(err < 1e-5, "{key}: {err}");
    }
    assert!(sum.metadata.get("ss_training_comment").is_some_and(|c| c.contains("merged from") && c.contains(":0.5")), "{:?}", sum.metadata);
    let svd = dir.path().join("svd.safetensors");
    let (ok, text) = trainer(&["merge-loras", &half, &fixed_third, "--out", svd.to_str().unwrap(), "--rank", "3", "--conv-rank", "2", "--to", "peft"]);
    assert!(ok && text.contains("Frobenius"), "{text}");
    let (low, format) = load(&svd);
    assert_eq!(format, AdapterFormat::Peft);
    for (key, w) in low.iter() {
        assert!(w.rank() <= if spatial(w) { 2 } else { 3 }, "{key}");
        assert!((w.scale() - 1.0).abs() < 1e-6, "{key}: alpha = rank");
    }
    for (args, expect) in [
        (vec!["merge-loras", &half, "--out", merged.to_str().unwrap()], "already exists"),
        (vec!["merge-loras", "missing.safetensors", "--out", other], "missing.safetensors"),
        (vec!["merge-loras", &half, "--out", other, "--conv-rank", "2"], "--rank"),
    ] {
        let (ok, text) = trainer(&args);
        assert!(!ok && text.contains(expect), "{args:?}: {text}");
    }
    assert!(!Path::new(other).exists());

    // A LoRA for another model (one adapter a column wider): the error names both files.
    let (key, w) = trained.iter().find(|(_, w)| !w.is_conv()).map(|(k, w)| (k.clone(), w.clone())).unwrap();
    let (r, cols) = (w.down.shape[0], w.down.shape[1] + 1);
    let wider = lora_core::LoraWeights { down: lora_core::HostTensor { shape: vec![r, cols], data: vec![0.01; r * cols] }, ..w };
    let mut foreign = AdapterSet::new();
    foreign.insert(key, wider).unwrap();
    let foreign_path = dir.path().join("foreign.safetensors");
    foreign.save(&foreign_path, AdapterFormat::Kohya, lora_core::SaveDtype::F32).unwrap();
    let (ok, text) = trainer(&["merge-loras", &half, foreign_path.to_str().unwrap(), "--out", other]);
    assert!(!ok && text.contains(input.as_str()) && text.contains("foreign.safetensors") && text.contains("different base models"), "{text}");
    assert!(!Path::new(other).exists());
}

/// A kohya sd-scripts config in `dir` that trains the tiny model on the demo data at 64 px
/// for two steps, UNet only, into `dir/run`, with `dataset` and `training` options added
/// to its sections; returns its path and the run's folder.
fn kohya_config(dir: &Path, dataset: &str, training: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let (kohya, run) = (dir.join("kohya.toml"), dir.join("run"));
    let text = format!(
        "[model_arguments]\npretrained_model_name_or_path = \"tiny\"\n[dataset_arguments]\ntrain_data_dir = \"demo\"\nresolution = \"64,64\"\n{dataset}\
         [training_arguments]\noutput_dir = \"{}\"\nmax_train_steps = 2\nunet_lr = 1e-3\nnetwork_train_unet_only = true\nseed = 3\n{training}",
        run.display()
    );
    std::fs::write(&kohya, text).unwrap();
    (kohya, run)
}

/// A kohya sd-scripts config converted with `trainer import-kohya` trains as it is: the
/// LoRA under sd-scripts' default name, no sample grid without sample prompts; the
/// converted file is never written over, and `train --config` on the kohya file says how
/// to convert it.
#[test]
fn an_imported_kohya_config_trains() {
    let dir = tempfile::tempdir().unwrap();
    let (kohya, run) = kohya_config(dir.path(), "cache_latents = true\n", "network_dim = 4\noptimizer_type = \"AdamW8bit\"\n");
    let ours = dir.path().join("ours.toml");
    let (ok, text) = trainer(&["import-kohya", kohya.to_str().unwrap(), "--out", ours.to_str().unwrap()]);
    assert!(ok && text.contains("AdamW8bit") && text.contains("cache_latents"), "{text}");
    let written = std::fs::read_to_string(&ours).unwrap();
    let (ok, text) = trainer(&["import-kohya", kohya.to_str().unwrap(), "--out", ours.to_str().unwrap()]);
    assert!(!ok && text.contains("never written over"), "{text}");
    assert_eq!(std::fs::read_to_string(&ours).unwrap(), written);

    let (ok, text) = trainer(&["train", "--config", kohya.to_str().unwrap()]);
    assert!(!ok && text.contains("trainer import-kohya"), "{text}");
    let (ok, text) = trainer(&["train", "--config", ours.to_str().unwrap()]);
    assert!(ok, "{text}");
    let (set, _) = load(&run.join("last.safetensors"));
    assert_eq!(set.iter().next().unwrap().1.rank(), 4);
    assert!(!run.join("samples.png").exists(), "no sample prompts, no samples");

    // A second run in the same folder would replace the first: refused, and the LoRA
    // stays; with --overwrite it starts over.
    let trained = std::fs::read(run.join("last.safetensors")).unwrap();
    let (ok, text) = trainer(&["train", "--config", ours.to_str().unwrap(), "--set", "train.seed=7"]);
    assert!(!ok && text.contains("holds an earlier run") && text.contains("last.safetensors") && text.contains("--overwrite"), "{text}");
    assert_eq!(std::fs::read(run.join("last.safetensors")).unwrap(), trained);
    let (ok, text) = trainer(&["train", "--config", ours.to_str().unwrap(), "--set", "train.seed=7", "--overwrite"]);
    assert!(ok, "{text}");
    assert_ne!(std::fs::read(run.join("last.safetensors")).unwrap(), trained);
}

/// The README's first command may be run again: a second demo run replaces the first in
/// the demo's default folder, with a note. A run of the user's own that was written there
/// (its saved config names other data) is refused like any earlier run, and kept.
#[test]
fn a_demo_run_replaces_only_an_earlier_demo_run() {
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["train", "--set", "train.max_train_steps=2", "--set", "data.demo_images=4", "--set", "output.sample_prompts=[]"];
        args.extend_from_slice(extra);
        let out = Command::new(env!("CARGO_BIN_EXE_trainer")).args(&args).current_dir(dir.path()).env("SD_LORA_DEVICE", "cpu").output().unwrap();
        (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    };
    let demo = dir.path().join("outputs/demo");
    let (ok, text) = run(&[]);
    assert!(ok && !text.contains("replacing"), "{text}");
    let (ok, text) = run(&["--set", "train.seed=7"]);
    assert!(ok && text.contains("note: replacing the earlier demo run"), "{text}");

    // As if the user's own images had been trained into the default folder.
    let saved = demo.join("config.toml");
    let config = std::fs::read_to_string(&saved).unwrap();
    assert!(config.contains("train_data_dir = \"demo\""), "{config}");
    std::fs::write(&saved, config.replace("train_data_dir = \"demo\"", "train_data_dir = \"my-images\"")).unwrap();
    let lora = std::fs::read(demo.join("demo_lora.safetensors")).unwrap();
    let (ok, text) = run(&[]);
    assert!(!ok && text.contains("holds an earlier run") && text.contains("--overwrite"), "{text}");
    assert_eq!(std::fs::read(demo.join("demo_lora.safetensors")).unwrap(), lora, "the user's LoRA is kept");
}

/// Ctrl-C (SIGINT) during training saves the LoRA and the state, says how to resume, and
/// exits with status 130, so a script sees the run did not finish.
#[cfg(unix)]
#[test]
fn ctrl_c_saves_and_exits_with_130() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut child = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(["train", "--set", "train.max_train_steps=3000", "--set", "data.demo_images=4", "--set", "output.sample_prompts=[]"])
        .args(["--set", &format!("output.output_dir={:?}", out.display().to_string())])
        .env("SD_LORA_DEVICE", "cpu")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The first progress line says training runs; then Ctrl-C. stderr is read to its end
    // (a closed pipe would fail the trainer's later messages).
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = Vec::new();
    for line in stderr.lines() {
        let line = line.unwrap();
        if line.starts_with("step ") && !seen.iter().any(|l: &String| l.starts_with("step ")) {
            let sent = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
            assert!(sent.success());
        }
        seen.push(line);
    }
    assert!(seen.iter().any(|l| l.contains("Ctrl-C: saving")), "{seen:?}");
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(130), "{seen:?}\n{stdout}");
    assert!(stdout.contains("interrupted after") && stdout.contains("resume with"), "{stdout}");
    assert!(out.join("demo_lora.safetensors").is_file() && out.join("state/state.json").is_file());
}

/// A kohya DyLoRA config (`networks.dylora`, LoCon ranks) imports and trains; `trainer
/// resize --truncate` cuts each adapter's first ranks out as a LoRA of its own (kohya's
/// extract_lora_from_dylora.py), alpha kept, and refuses what it cannot do.
#[test]
fn a_kohya_dylora_trains_and_its_nested_loras_are_cut_out() {
    let dir = tempfile::tempdir().unwrap();
    let training = "network_module = \"networks.dylora\"\nnetwork_dim = 4\nnetwork_alpha = 2\nnetwork_args = [\"unit=2\", \"conv_dim=4\", \"conv_alpha=1\"]\n";
    let (kohya, run) = kohya_config(dir.path(), "", training);
    let ours = dir.path().join("ours.toml");
    let (ok, text) = trainer(&["import-kohya", kohya.to_str().unwrap(), "--out", ours.to_str().unwrap()]);
    assert!(ok && text.contains("conv_alpha"), "the ignored conv_alpha is named: {text}");
    assert!(std::fs::read_to_string(&ours).unwrap().contains("dylora_unit = 2"));
    let (ok, text) = trainer(&["train", "--config", ours.to_str().unwrap()]);
    assert!(ok, "{text}");
    let trained_path = run.join("last.safetensors");
    let (trained, _) = load(&trained_path);
    assert!(trained.iter().any(|(_, w)| w.is_conv() && w.down.shape[2..] == [3, 3]), "3x3 convolutions have adapters");

    let input = trained_path.to_str().unwrap();
    let cut_path = dir.path().join("rank2.safetensors");
    let (ok, text) = trainer(&["resize", input, cut_path.to_str().unwrap(), "--rank", "2", "--truncate", "--dtype", "f32"]);
    assert!(ok && text.contains("rank 4)") && text.contains("rank 2)"), "{text}");
    let (cut, format) = load(&cut_path);
    assert_eq!((format, cut.len()), (AdapterFormat::Kohya, trained.len()));
    for (key, w) in cut.iter() {
        let before = trained.get(key).unwrap();
        assert_eq!((w.rank(), w.alpha), (2, before.alpha), "{key}");
        let row = before.down.numel() / 4;
        assert_eq!(w.down.data, before.down.data[..2 * row], "{key}: the first rows of `down`");
        let up: Vec<f32> = before.up.data.chunks(4).flat_map(|r| r[..2].to_vec()).collect();
        assert_eq!(w.up.data, up, "{key}: the first columns of `up`");
    }
    let comment = &cut.metadata["ss_training_comment"];
    assert!(comment.starts_with("split from DyLoRA, rank 4 to 2"), "{comment}");
    let (ok, text) = trainer(&["info", input]);
    assert!(ok && text.contains("network module: networks.dylora") && text.contains("first k·2 ranks"), "{text}");

    let other = dir.path().join("other.safetensors");
    let other = other.to_str().unwrap();
    for (args, expect) in [
        (vec!["resize", input, other, "--rank", "0", "--truncate"], "at least 1"),
        (vec!["resize", input, other, "--rank", "2", "--truncate", "--dynamic-method", "sv_fro", "--dynamic-param", "0.5"], "--truncate"),
        (vec!["resize", input, cut_path.to_str().unwrap(), "--rank", "2", "--truncate"], "already exists"),
    ] {
        let (ok, text) = trainer(&args);
        assert!(!ok && text.contains(expect), "{args:?}: {text}");
    }
    assert!(!Path::new(other).exists());
}

/// `trainer generate` makes images at the model's size unless told (the tiny model's
/// 64 px, as the demo trains; SD1.x would be 512), takes one side alone, lays several
/// images per prompt out in a row each, and refuses a zero side or one past 8192 px with
/// an error.
#[test]
fn generate_defaults_to_the_models_size() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("g.png");
    let size = |extra: &[&str]| {
        let mut args = vec!["generate", "--overwrite", "--prompt", "a red circle", "--steps", "2", "--out", image.to_str().unwrap()];
        args.extend_from_slice(extra);
        let (ok, text) = trainer(&args);
        assert!(ok, "{text}");
        image::image_dimensions(&image).unwrap()
    };
    assert_eq!(size(&[]), (64, 64));
    assert_eq!(size(&["--height", "128"]), (64, 128));
    // The height is the width's where only that is given.
    assert_eq!(size(&["--width", "32"]), (32, 32));
    // Three images of the prompt in a row; two prompts of two, one row each.
    assert_eq!(size(&["--images-per-prompt", "3"]), (192, 64));
    assert_eq!(size(&["--images-per-prompt", "2", "--prompt", "a blue square"]), (128, 128));
    for (args, expect) in [
        (&["--width", "0"][..], "--width"),
        (&["--width", "8200"][..], "at most 8192"),
        (&["--model", "no/such/model"][..], "no/such/model: no such file or folder: a model is `tiny` or `tiny-sdxl`"),
        // Missing inputs are named by their option before the model loads.
        (&["--lora", "missing.safetensors:0.5"][..], "--lora missing.safetensors: no such file"),
        (&["--vae", "missing-vae"][..], "--vae missing-vae: no such file"),
        (&["--embedding", "missing.pt"][..], "--embedding missing.pt: no such file"),
        (&["--lora-unmerged"][..], "--lora"),
    ] {
        let mut all = vec!["generate", "--overwrite", "--prompt", "a", "--steps", "2", "--out", image.to_str().unwrap()];
        all.extend_from_slice(args);
        let (ok, text) = trainer(&all);
        assert!(!ok && text.contains(expect), "{args:?}: {text}");
    }
    // DPM-Solver's spacing repeats a timestep at 1000 steps (NaN latents before).
    let (ok, text) = trainer(&["generate", "--overwrite", "--prompt", "a", "--steps", "1000", "--out", image.to_str().unwrap()]);
    assert!(!ok && text.contains("at most 999"), "{text}");
}

/// `trainer generate` writes over no file unless told (`--overwrite`), checks the output's
/// format before generating, and without `--out` numbers its images in `outputs/`.
#[test]
fn generate_keeps_existing_files() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_trainer")).args(args).current_dir(dir.path()).output().unwrap();
        (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    };
    let base = ["generate", "--prompt", "a red circle", "--steps", "2"];
    for expected in ["outputs/generate.png", "outputs/generate-2.png"] {
        let (ok, text) = run(&base);
        assert!(ok && text.contains(expected), "{text}");
    }
    std::fs::write(dir.path().join("keep.png"), b"mine").unwrap();
    let with = |extra: &[&'static str]| [&base[..], extra].concat();
    let (ok, text) = run(&with(&["--out", "keep.png"]));
    assert!(!ok && text.contains("keep.png already exists") && text.contains("--overwrite"), "{text}");
    assert_eq!(std::fs::read(dir.path().join("keep.png")).unwrap(), b"mine");
    let (ok, text) = run(&with(&["--out", "new.png", "--save-latents", "keep.png"]));
    assert!(!ok && text.contains("--save-latents keep.png already exists"), "{text}");
    let (ok, text) = run(&with(&["--out", "notes.txt"]));
    assert!(!ok && text.contains("expected an image file name"), "{text}");
    // A format the image library names but does not write here: refused before anything
    // is made or touched (a 0-byte file was left).
    std::fs::write(dir.path().join("keep.tiff"), b"mine").unwrap();
    for out in ["new.tiff", "keep.tiff", "new.gif"] {
        let (ok, text) = run(&with(&["--out", out, "--overwrite"]));
        assert!(!ok && text.contains("expected an image file name this writes"), "{out}: {text}");
    }
    assert!(!dir.path().join("new.tiff").exists() && !dir.path().join("new.gif").exists());
    assert_eq!(std::fs::read(dir.path().join("keep.tiff")).unwrap(), b"mine");
    let (ok, text) = run(&with(&["--out", "new.png", "--save-latents", "latents.png"]));
    assert!(!ok && text.contains("name a .safetensors file"), "{text}");
    let (ok, text) = run(&with(&["--out", "keep.png", "--overwrite"]));
    assert!(ok, "{text}");
    assert!(image::open(dir.path().join("keep.png")).is_ok());
    // --save-latents makes its folder as --out does.
    let (ok, text) = run(&with(&["--out", "a/new.png", "--save-latents", "b/c/latents.safetensors"]));
    assert!(ok, "{text}");
    assert!(dir.path().join("a/new.png").is_file() && dir.path().join("b/c/latents.safetensors").is_file(), "{text}");
}

/// `trainer generate --init-image` (img2img, and inpainting with `--mask`) samples at the
/// image's size rounded down to the model's multiple (the tiny model's 16 px) or at
/// --width / --height, and refuses a strength outside (0, 1], one too small for the steps,
/// `--strength` or `--mask` alone, an unreadable image or mask, and `--init-latents` beside
/// it, each naming what is wrong.
#[test]
fn generate_from_an_init_image() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.png");
    image::RgbImage::from_fn(70, 100, |x, y| image::Rgb([(x * 3) as u8, (y * 2) as u8, 128])).save(&source).unwrap();
    let out = dir.path().join("out.png");
    let run = |extra: &[&str]| {
        let mut args = vec!["generate", "--overwrite", "--prompt", "a red circle", "--steps", "4", "--out", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        trainer(&args)
    };
    let src = source.to_str().unwrap();
    for (extra, size) in [(&["--init-image", src][..], (64, 96)), (&["--init-image", src, "--strength", "0.5", "--width", "32", "--height", "48"][..], (32, 48))] {
        let (ok, text) = run(extra);
        assert!(ok, "{extra:?}: {text}");
        assert_eq!(image::image_dimensions(&out).unwrap(), size, "{extra:?}");
    }
    // Inpainting: a mask of another size is stretched to the image's.
    let mask = dir.path().join("mask.png");
    image::RgbImage::from_fn(35, 50, |x, _| if x < 17 { image::Rgb([255, 255, 255]) } else { image::Rgb([0, 0, 0]) }).save(&mask).unwrap();
    let (ok, text) = run(&["--init-image", src, "--mask", mask.to_str().unwrap(), "--sampler", "euler_a"]);
    assert!(ok, "{text}");
    assert_eq!(image::image_dimensions(&out).unwrap(), (64, 96));
    let junk = dir.path().join("junk.png");
    std::fs::write(&junk, b"not an image").unwrap();
    for (extra, expect) in [
        (&["--init-image", src, "--strength", "0"][..], "img2img strength"),
        (&["--init-image", src, "--strength", "1.5"][..], "(0, 1]"),
        (&["--init-image", src, "--strength", "0.1"][..], "no step to run"),
        (&["--strength", "0.5"][..], "--init-image"),
        (&["--init-image", junk.to_str().unwrap()][..], "junk.png"),
        (&["--init-image", src, "--init-latents", src][..], "cannot be used with"),
        (&["--mask", src][..], "--init-image"),
        (&["--init-image", src, "--mask", junk.to_str().unwrap()][..], "junk.png"),
    ] {
        let (ok, text) = run(extra);
        assert!(!ok && text.contains(expect), "{extra:?}: {text}");
    }
}

/// `trainer generate --hires-scale`: the first pass at a fraction of the size, the second
/// at the full size, from either upscaler; repeatable from the seed, and unlike a plain run;
/// and its errors.
#[test]
fn generate_with_the_hires_fix() {
    let dir = tempfile::tempdir().unwrap();
    let out = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let run = |extra: &[&str], name: &str| {
        let path = out(name);
        let mut args = vec!["generate", "--overwrite", "--prompt", "a red circle", "--steps", "4", "--width", "96", "--height", "128", "--out", &path];
        args.extend_from_slice(extra);
        let (ok, text) = trainer(&args);
        assert!(ok, "{extra:?}: {text}");
        (text, image::open(&path).unwrap().to_rgb8())
    };
    let (text, hires) = run(&["--hires-scale", "0.5", "--hires-steps", "3"], "hires.png");
    // The tiny model's sizes are multiples of 16: 48 x 64 first.
    assert!(text.contains("hires fix: 48x64 in 3 steps, then 96x128 from strength 0.7"), "{text}");
    assert_eq!(hires.dimensions(), (96, 128));
    let (_, again) = run(&["--hires-scale", "0.5", "--hires-steps", "3"], "again.png");
    assert_eq!(hires, again, "the seed fixes both passes");
    let (_, latent) = run(&["--hires-scale", "0.5", "--hires-steps", "3", "--hires-latents", "--hires-strength", "0.5"], "latent.png");
    assert_eq!(latent.dimensions(), (96, 128));
    let (_, plain) = run(&[], "plain.png");
    assert_ne!(hires, plain);
    assert_ne!(hires, latent);
    for (extra, expect) in [
        (&["--hires-scale", "1.5"][..], "(0, 1)"),
        (&["--hires-scale", "0.05"][..], "rounds down to no side"),
        (&["--hires-scale", "0.5", "--hires-strength", "0"][..], "hires fix strength"),
        (&["--hires-scale", "0.5", "--hires-strength", "0.1"][..], "no step to run"),
        (&["--hires-steps", "3"][..], "--hires-scale"),
        (&["--hires-scale", "0.5", "--init-latents", "x.safetensors"][..], "cannot be used with"),
    ] {
        let path = out("bad.png");
        let mut args = vec!["generate", "--overwrite", "--prompt", "x", "--steps", "4", "--width", "96", "--height", "128", "--out", &path];
        args.extend_from_slice(extra);
        let (ok, text) = trainer(&args);
        assert!(!ok && text.contains(expect) && !text.contains("panicked"), "{extra:?}: {text}");
        assert!(!Path::new(&path).exists());
    }
}

/// `trainer generate --prompt-file` reads an sd-scripts prompt file: each line with its own
/// options (a size of its own sets its cell; unset options take the command's), comments
/// and blank lines skipped, unknown options noted; `--images-per-prompt` repeats each line;
/// an unreadable file or one without prompts is an error naming it, as is `--prompt` beside it.
#[test]
fn generate_from_a_prompt_file() {
    let dir = tempfile::tempdir().unwrap();
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(&prompts, "# samples\na red circle --w 32 --h 48 --d 3\n\na blue square --l 3 --ss euler --foo 1\n").unwrap();
    let out = dir.path().join("out.png");
    let run = |extra: &[&str]| {
        let mut args = vec!["generate", "--overwrite", "--steps", "3", "--out", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        trainer(&args)
    };
    let file = prompts.to_str().unwrap();
    let (ok, text) = run(&["--prompt-file", file]);
    assert!(ok && text.contains("`foo`"), "{text}");
    // Two cells of the larger image's size (64 x 64: the second prompt's default).
    assert_eq!(image::image_dimensions(&out).unwrap(), (128, 64));
    let (ok, text) = run(&["--prompt-file", file, "--images-per-prompt", "2"]);
    assert!(ok, "{text}");
    assert_eq!(image::image_dimensions(&out).unwrap(), (128, 128));
    // A JSON prompt file saved with a byte-order mark (Windows' Notepad).
    let json = dir.path().join("prompts.json");
    std::fs::write(&json, "\u{feff}[{\"prompt\": \"a red circle\", \"width\": 32, \"height\": 32}]").unwrap();
    let (ok, text) = run(&["--prompt-file", json.to_str().unwrap()]);
    assert!(ok, "{text}");
    assert_eq!(image::image_dimensions(&out).unwrap(), (32, 32));
    let empty = dir.path().join("empty.txt");
    std::fs::write(&empty, "# nothing\n\n").unwrap();
    for (extra, expect) in [
        (&["--prompt-file", empty.to_str().unwrap()][..], "no prompts"),
        (&["--prompt-file", dir.path().join("missing.txt").to_str().unwrap()][..], "missing.txt"),
        (&["--prompt-file", file, "--prompt", "a"][..], "cannot be used with"),
        // A device would be read without end.
        (&["--prompt-file", "/dev/zero"][..], "not a file"),
    ] {
        let (ok, text) = run(extra);
        assert!(!ok && text.contains(expect), "{extra:?}: {text}");
    }
}

/// `trainer info` on files of every layout and adapter kind, as text and JSON, and on files
/// that are not LoRAs.
#[test]
fn info_describes_any_lora_file() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let path = |p: &str| fixtures.join(p).to_str().unwrap().to_string();
    let sdxl = path("sd-model/tests/fixtures/sdxl/lora_kohya.safetensors");
    let (ok, text) = trainer(&["info", &sdxl]);
    assert!(ok, "{text}");
    for expected in ["UNet: 194 LoRA (rank 2, alpha 1.5)", "text encoder: 18 LoRA", "text encoder 2: 24 LoRA"] {
        assert!(text.contains(expected), "no `{expected}` in {text}");
    }
    // Into a pipe closed by its reader (`trainer info X | head -1`): no panic, a success.
    let mut child = Command::new(env!("CARGO_BIN_EXE_trainer"))
        .args(["info", &sdxl, "--verbose"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && !stderr.contains("panicked"), "{:?}: {stderr}", out.status);
    let (ok, text) = trainer(&["info", &path("lora-core/tests/fixtures/lycoris_tucker.safetensors"), "--verbose"]);
    assert!(ok, "{text}");
    for expected in ["LoCon+Tucker 3x3-conv (rank 2, alpha 1)", "LoHa 3x3-conv", "LoKr 3x3-conv", "hada_t1 ["] {
        assert!(text.contains(expected), "no `{expected}` in {text}");
    }
    let (ok, text) = trainer(&["info", &path("sd-model/tests/fixtures/parity/sd1_lora_peft.safetensors"), "--json"]);
    assert!(ok, "{text}");
    let value: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(value["format"], "peft");
    let modules = value["modules"].as_array().unwrap();
    assert_eq!(modules.len(), 48);
    assert!(modules.iter().all(|m| m["component"] == "UNet" && m["rank"] == 2 && m["alpha"].is_null()), "{value}");

    // Checkpoints: family, layout and components from the headers.
    let (ok, text) = trainer(&["info", &path("sd-model/tests/fixtures/sdxl/tiny_single_file.safetensors")]);
    assert!(ok, "{text}");
    for expected in ["SDXL checkpoint (single file)", "UNet: 0.5M parameters (550 BF16 tensors)", "text encoder 2:", "VAE:", "prediction type: not recorded"] {
        assert!(text.contains(expected), "no `{expected}` in {text}");
    }
    let (ok, text) = trainer(&["info", &path("sd-model/tests/fixtures/parity/sd1"), "--json"]);
    assert!(ok, "{text}");
    let value: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!((value["family"].as_str(), value["layout"].as_str()), (Some("SD1.x"), Some("diffusers folder")));
    assert_eq!(value["components"][0]["dtypes"]["F16"], 208);

    for (file, expected) in [
        (path("sd-model/tests/fixtures/parity/sd1/unet/config.json"), "not a valid safetensors file"),
        (path("sd-model/tests/fixtures/parity/sd1/unet/diffusion_pytorch_model.fp16.safetensors"), "no LoRA keys"),
        ("missing.safetensors".to_string(), "missing.safetensors"),
    ] {
        let (ok, text) = trainer(&["info", &file]);
        assert!(!ok && text.contains(expected) && !text.contains("panicked"), "{file}: {text}");
    }
}

/// `merge` with block weights (`FILE:STRENGTH:lbw=...`, the LoRA Block Weight extension's
/// lists): a block at 0 keeps the base weights, at 1 gets the whole update, at 0.5 half.
#[test]
fn merge_applies_block_weights() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sd-model/tests/fixtures/parity");
    let base = fixtures.join("sd1_single_file.safetensors");
    let lora = fixtures.join("sd1_lora_kohya.safetensors").to_str().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let merge = |spec: &str, name: &str| {
        let out = dir.path().join(name);
        let (ok, text) = trainer(&["merge", "--model", base.to_str().unwrap(), "--lora", &format!("{lora}{spec}"), "--out", out.to_str().unwrap(), "--dtype", "f32"]);
        assert!(ok, "{text}");
        out
    };
    let values = |path: &Path, key: &str| -> Vec<f32> {
        let bytes = std::fs::read(path).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let t = st.tensor(key).unwrap();
        match t.dtype() {
            safetensors::Dtype::F32 => t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            safetensors::Dtype::BF16 => t.data().chunks_exact(2).map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16)).collect(),
            other => panic!("{other:?}"),
        }
    };
    let plain = merge("", "plain.safetensors");
    // This UNet has one ResNet per level: IN01 = down_blocks.0, M00, OUT02 / OUT03 =
    // up_blocks.1's two transformers.
    let mut w = vec!["1"; 26];
    (w[2], w[13], w[16], w[17]) = ("0", "0.5", "1", "0"); // IN01, M00, OUT02, OUT03
    let weighted = merge(&format!(":lbw={}", w.join(",")), "weighted.safetensors");
    let key = |block: &str| format!("model.diffusion_model.{block}.proj_in.weight");
    let close = |a: &[f32], b: &[f32]| a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-6 * (1.0 + y.abs()));
    for (block, expected) in [("input_blocks.1.1", 0.0f32), ("middle_block.1", 0.5), ("output_blocks.2.1", 1.0), ("output_blocks.3.1", 0.0)] {
        let (b, p, got) = (values(&base, &key(block)), values(&plain, &key(block)), values(&weighted, &key(block)));
        assert!(!close(&b, &p), "{block}: the LoRA changes it");
        let want: Vec<f32> = b.iter().zip(&p).map(|(b, p)| b + expected * (p - b)).collect();
        assert!(close(&got, &want), "{block} at {expected}");
    }
    let (ok, text) = trainer(&["merge", "--model", base.to_str().unwrap(), "--lora", &format!("{lora}:lbw=1,2,3"), "--out", dir.path().join("x.safetensors").to_str().unwrap()]);
    assert!(!ok && text.contains("3 values; expected 17 or 26"), "{text}");
    // A strength that is no number is named as such, not taken for a missing file.
    let (ok, text) = trainer(&["merge", "--model", base.to_str().unwrap(), "--lora", &format!("{lora}:abc"), "--out", dir.path().join("x.safetensors").to_str().unwrap()]);
    assert!(!ok && text.contains("`abc` after") && text.contains("not a strength"), "{text}");
}

/// `trainer merge-models`: a weighted average, add difference (`A:1 B:1 A:-1` is `B`
/// exactly), UNet only, the result a working checkpoint; and the refusals.
#[test]
fn merge_models_sums_checkpoints() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sd-model/tests/fixtures/parity");
    let a = fixtures.join("sd1_single_file.safetensors").to_str().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    // B: A with a LoRA baked in (f32).
    let b = path("b.safetensors");
    let lora = fixtures.join("sd1_lora_kohya.safetensors");
    let (ok, text) = trainer(&["merge", "--model", &a, "--lora", lora.to_str().unwrap(), "--out", &b, "--dtype", "f32"]);
    assert!(ok, "{text}");
    let tensors = |p: &str| -> std::collections::BTreeMap<String, (safetensors::Dtype, Vec<f32>)> {
        let bytes = std::fs::read(p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        st.tensors()
            .into_iter()
            .filter_map(|(k, t)| {
                let values = match t.dtype() {
                    safetensors::Dtype::F32 => t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
                    safetensors::Dtype::BF16 => t.data().chunks_exact(2).map(|c| f32::from_bits(u32::from(u16::from_le_bytes([c[0], c[1]])) << 16)).collect(),
                    _ => return None,
                };
                Some((k, (t.dtype(), values)))
            })
            .collect()
    };
    let (ta, tb) = (tensors(&a), tensors(&b));
    let unet_key = "model.diffusion_model.middle_block.1.proj_in.weight";
    assert_ne!(ta[unet_key].1, tb[unet_key].1);

    let average = path("average.safetensors");
    let (ok, text) = trainer(&["merge-models", &a, &b, "--out", &average, "--dtype", "f32"]);
    assert!(ok && text.contains("merged from every model"), "{text}");
    for (key, (dtype, values)) in tensors(&average) {
        assert_eq!(dtype, safetensors::Dtype::F32, "{key}");
        let want: Vec<f32> = ta[&key].1.iter().zip(&tb[&key].1).map(|(x, y)| (0.5 * (f64::from(*x) + f64::from(*y))) as f32).collect();
        assert_eq!(values, want, "{key}");
    }
    let difference = path("difference.safetensors");
    let (ok, text) = trainer(&["merge-models", &format!("{a}:1"), &format!("{b}:1"), &format!("{a}:-1"), "--out", &difference, "--dtype", "f32"]);
    assert!(ok, "{text}");
    assert!(tensors(&difference).iter().all(|(k, (_, v))| *v == tb[k].1), "A + (B - A) is B");
    let unet_only = path("unet-only.safetensors");
    let (ok, text) = trainer(&["merge-models", &format!("{a}:0"), &format!("{b}:1"), "--out", &unet_only, "--unet-only"]);
    assert!(ok && text.contains("UNet only"), "{text}");
    let tu = tensors(&unet_only);
    let te_key = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight";
    assert_eq!(tu[te_key], ta[te_key], "the text encoder is the first model's");
    assert_eq!(tu[unet_key].0, ta[unet_key].0, "the first model's dtype");
    // The merged checkpoint loads as one (this tiny fixture's vocabulary is too small to
    // generate with CLIP's tokenizer; baking a LoRA into it loads every part).
    let (ok, text) = trainer(&["merge", "--model", &average, "--lora", lora.to_str().unwrap(), "--out", &path("again.safetensors")]);
    assert!(ok, "the merged checkpoint loads: {text}");

    // Diffusers folders: each component merged, the rest copied from the first folder.
    let folder_a = fixtures.join("sd1").to_str().unwrap().to_string();
    let folder_b = path("b-folder");
    let (ok, text) = trainer(&["merge", "--model", &folder_a, "--lora", lora.to_str().unwrap(), "--out", &folder_b, "--dtype", "f32"]);
    assert!(ok, "{text}");
    // An output the kind of model cannot become is refused before anything is written (a
    // folder merge wrote a folder named `x.safetensors`).
    for (model, out, expected) in [(&folder_a, path("x.safetensors"), "convert-model"), (&a, path("x"), "end the path with .safetensors")] {
        let (ok, text) = trainer(&["merge", "--model", model, "--lora", lora.to_str().unwrap(), "--out", &out]);
        assert!(!ok && text.contains(expected) && !Path::new(&out).exists(), "{text}");
    }
    let folder_out = path("difference-folder");
    let (ok, text) = trainer(&["merge-models", &format!("{folder_a}:1"), &format!("{folder_b}:1"), &format!("{folder_a}:-1"), "--out", &folder_out, "--dtype", "f32"]);
    assert!(ok && text.contains("unet, text_encoder, vae merged"), "{text}");
    let unet = |dir: &str| {
        let file = std::fs::read_dir(Path::new(dir).join("unet")).unwrap().filter_map(|e| e.ok().map(|e| e.path())).find(|p| p.extension().is_some_and(|x| x == "safetensors")).unwrap();
        tensors(file.to_str().unwrap())
    };
    let (got, want) = (unet(&folder_out), unet(&folder_b));
    assert!(got.iter().all(|(k, (_, v))| *v == want[k].1), "A + (B - A) is B, folder by folder");
    assert!(Path::new(&folder_out).join("unet/config.json").is_file() && Path::new(&folder_out).join("model_index.json").is_file());

    let other = path("other.safetensors");
    let sd2 = fixtures.join("sd2_single_file.safetensors").to_str().unwrap().to_string();
    // A with one UNet weight stored as integers.
    let ints = path("ints.safetensors");
    with_tensor(&a, &ints, unet_key, safetensors::Dtype::I64, vec![0u8; ta[unet_key].1.len() * 8]);
    for (args, expected) in [
        (vec![a.as_str(), ints.as_str()], "is I64, where"),
        (vec![a.as_str(), sd2.as_str()], "one architecture"),
        (vec![a.as_str(), fixtures.join("sd1").to_str().unwrap()], "diffusers folders only"),
        (vec![&format!("{a}:0.5"), b.as_str()], "ratio"),
        (vec![&format!("{a}:nan"), &format!("{b}:0.5")], "must be a finite number"),
        (vec![a.as_str()], "2"),
    ] {
        let mut full = vec!["merge-models"];
        full.extend(args.iter().map(|s| &**s));
        full.extend(["--out", &other]);
        let (ok, text) = trainer(&full);
        assert!(!ok && text.contains(expected) && !text.contains("panicked"), "{full:?}: {text}");
    }
    assert!(!Path::new(&other).exists());
    // A first model with an F64 weight: merged (read as f64, written as f32), never f32
    // bytes under an F64 header.
    let f64s = path("f64.safetensors");
    with_tensor(&a, &f64s, unet_key, safetensors::Dtype::F64, ta[unet_key].1.iter().flat_map(|v| f64::from(*v).to_le_bytes()).collect());
    let from_f64 = path("from-f64.safetensors");
    let (ok, text) = trainer(&["merge-models", &f64s, &b, "--out", &from_f64]);
    assert!(ok, "{text}");
    let merged = tensors(&from_f64);
    let want: Vec<f32> = ta[unet_key].1.iter().zip(&tb[unet_key].1).map(|(x, y)| (0.5 * (f64::from(*x) + f64::from(*y))) as f32).collect();
    assert_eq!(merged[unet_key], (safetensors::Dtype::F32, want));
    // A folder merge that fails leaves no folder behind.
    let broken_folder = path("broken-folder");
    copy_dir_all(&fixtures.join("sd1"), Path::new(&broken_folder));
    let te = sd_model::load::ModelSource::weights_file(Path::new(&broken_folder), "text_encoder").unwrap();
    std::fs::copy(&ints, &te).unwrap();
    let failed = path("failed-folder");
    let (ok, text) = trainer(&["merge-models", &broken_folder, &folder_a, "--out", &failed]);
    assert!(!ok && !text.contains("panicked"), "{text}");
    let failed_name = Path::new(&failed).file_name().unwrap().to_string_lossy().into_owned();
    let left: Vec<_> = std::fs::read_dir(Path::new(&failed).parent().unwrap()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).filter(|n| n.starts_with(&failed_name)).collect();
    assert!(left.is_empty(), "{left:?}: {text}");
    let (ok, text) = trainer(&["merge-models", &a, &b, "--out", &average]);
    assert!(!ok && text.contains("already exists"), "{text}");
}

/// `trainer convert-model`: an SDXL folder to a single file and back, the prediction type
/// travelling with it (a `v_pred` key, then the scheduler config sd-sched reads); the result
/// loads (a LoRA bakes into it); refusals name what is wrong.
#[test]
fn convert_model_both_ways() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sd-model/tests/fixtures");
    let folder = fixtures.join("sdxl/tiny").to_str().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let single = path("xl.safetensors");
    let (ok, text) = trainer(&["convert-model", &folder, "--out", &single, "--prediction-type", "v_prediction", "--dtype", "bf16"]);
    assert!(ok && text.contains("SDXL") && text.contains("single file") && text.contains("v_prediction"), "{text}");
    let (ok, text) = trainer(&["info", &single]);
    assert!(ok && text.contains("prediction type: v_prediction") && text.contains("BF16"), "{text}");
    // Training and generation from the single file read its mark (`train.prediction = "auto"`).
    let components = sd_pipeline::load_components::<Flex>(&single, 0, &Default::default()).unwrap();
    assert_eq!(components.scheduler.prediction_type, sd_sched::PredictionType::VPrediction);
    let back = path("xl");
    let (ok, text) = trainer(&["convert-model", &single, "--out", &back]);
    assert!(ok && text.contains("diffusers folder"), "{text}");
    let scheduler = sd_sched::SchedulerConfig::from_model_dir(&back).unwrap();
    assert_eq!(scheduler.prediction_type, sd_sched::PredictionType::VPrediction);
    assert_eq!(scheduler.class_name.as_deref(), Some("EulerDiscreteScheduler"));
    let lora = fixtures.join("sdxl/lora_kohya.safetensors");
    let (ok, text) = trainer(&["merge", "--model", &back, "--lora", lora.to_str().unwrap(), "--out", &path("merged")]);
    assert!(ok, "the converted folder loads: {text}");
    for (args, expected) in [
        (vec!["convert-model", &folder, "--out", &single], "already exists"),
        (vec!["convert-model", &folder, "--out", &path("e.safetensors"), "--ema"], "--ema applies to single files"),
        (vec!["convert-model", &single, "--out", &path("v"), "--vae", &path("missing.safetensors")], "missing.safetensors"),
        (vec!["convert-model", &single, "--out", &path("p"), "--prediction-type", "sample"], "epsilon or v_prediction"),
    ] {
        let (ok, text) = trainer(&args);
        assert!(!ok && text.contains(expected) && !text.contains("panicked"), "{args:?}: {text}");
    }
    assert!(!Path::new(&path("v")).exists() && !Path::new(&path("e.safetensors")).exists());

    // PyTorch pickles: a .ckpt to safetensors, an A1111 .pt embedding described.
    let pickles = fixtures.join("pickles");
    let (ok, text) = trainer(&["convert-model", pickles.join("sd1.ckpt").to_str().unwrap(), "--out", &path("sd1.safetensors")]);
    assert!(ok && text.contains("384 tensors, the same keys"), "{text}");
    let (ok, text) = trainer(&["info", pickles.join("myemb.pt").to_str().unwrap()]);
    assert!(ok && text.contains("textual-inversion embedding `myemb` (2 vectors"), "{text}");
    let (ok, text) = trainer(&["info", pickles.join("sd1.ckpt").to_str().unwrap()]);
    assert!(!ok && text.contains("convert-model"), "{text}");
}

/// `trainer generate --embedding FILE`: the file's name calls it in both prompts; a file of
/// another width, or not an embedding, is refused naming it.
#[test]
fn generate_with_embeddings() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, key: &str, width: usize| {
        let path = dir.path().join(name);
        let t = lora_core::HostTensor::new(vec![2, width], (0..2 * width).map(|i| (i as f32 * 0.37).sin() * 0.02).collect()).unwrap();
        std::fs::write(&path, lora_core::tensor_io::serialize(&[(key.to_string(), &t)], lora_core::SaveDtype::F16, Default::default()).unwrap()).unwrap();
        path.to_str().unwrap().to_string()
    };
    // The tiny text encoder is 32 wide.
    let good = write("badhands.safetensors", "emb_params", 32);
    let wide = write("wide.safetensors", "emb_params", 768);
    let out = dir.path().join("out.png");
    let run = |extra: &[&str]| {
        let mut args = vec!["generate", "--overwrite", "--prompt", "a red circle", "--negative-prompt", "BadHands, blurry", "--steps", "2", "--out", out.to_str().unwrap()];
        args.extend_from_slice(extra);
        trainer(&args)
    };
    let (ok, text) = run(&["--embedding", &good]);
    assert!(ok && text.contains("embeddings: badhands (2 vectors)"), "{text}");
    // A folder loads what the prompts use: badhands, not the SD1.5-wide `unused` (it would
    // not fit the tiny model), nor the text file.
    let folder = dir.path().join("embeddings");
    std::fs::create_dir_all(folder.join("negative")).unwrap();
    std::fs::copy(&good, folder.join("negative/badhands.safetensors")).unwrap();
    std::fs::copy(&wide, folder.join("unused.safetensors")).unwrap();
    std::fs::write(folder.join("badhands.txt"), "notes").unwrap();
    let (ok, text) = run(&["--embedding", folder.to_str().unwrap()]);
    assert!(ok && text.contains("embeddings: badhands (2 vectors)"), "{text}");
    // A given file of the same name wins over the folder's.
    let (ok, text) = run(&["--embedding", folder.to_str().unwrap(), "--embedding", &good]);
    assert!(ok && text.contains("embeddings: badhands (2 vectors)"), "{text}");
    for (extra, expected) in [(vec!["--embedding", wide.as_str()], "wide.safetensors"), (vec!["--embedding", "missing.safetensors"], "missing.safetensors"), (vec!["--embedding", &good, "--embedding", &good], "a second embedding")] {
        let (ok, text) = run(&extra);
        assert!(!ok && text.contains(expected) && !text.contains("panicked"), "{extra:?}: {text}");
    }
}

/// A pivotal-tuning LoRA's bundled embedding: `unbundle-embeddings` writes it as an
/// embedding file named by its word, which `generate --embedding` loads; existing files
/// and LoRAs without bundles are errors.
#[test]
fn unbundle_embeddings_writes_embedding_files() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = quick_config(dir.path(), 1);
    config.lora.unet_targets = sd_model::targets::UnetTargets::Attn;
    config.embedding.token = "demostyle".into();
    config.embedding.vectors = 2;
    let report = train::<B>(&config, &Default::default(), &mut |_| true).unwrap();
    let lora = report.lora.to_str().unwrap();
    let out = dir.path().join("embeddings");
    let (ok, text) = trainer(&["unbundle-embeddings", lora, "--out", out.to_str().unwrap()]);
    assert!(ok && text.contains("demostyle (2 vectors)"), "{text}");
    let file = out.join("demostyle.safetensors");
    let e = sd_model::textual_inversion::read_embedding(&file).unwrap();
    let bundled = sd_model::textual_inversion::read_bundled_embeddings(&report.lora).unwrap();
    assert_eq!((e.name.as_str(), &e.vectors), ("demostyle", &bundled[0].vectors), "f16 in, f16 out");
    let png = dir.path().join("out.png");
    let (ok, text) = trainer(&["generate", "--overwrite", "--prompt", "a red circle, demostyle", "--steps", "2", "--embedding", file.to_str().unwrap(), "--out", png.to_str().unwrap()]);
    assert!(ok && text.contains("demostyle (2 vectors)"), "{text}");
    let (ok, text) = trainer(&["unbundle-embeddings", lora, "--out", out.to_str().unwrap()]);
    assert!(!ok && text.contains("already exists"), "{text}");
    let plain = dir.path().join("plain.safetensors");
    AdapterSet::new().save(&plain, AdapterFormat::Kohya, lora_core::SaveDtype::F16).unwrap();
    let (ok, text) = trainer(&["unbundle-embeddings", plain.to_str().unwrap(), "--out", out.to_str().unwrap()]);
    assert!(!ok && text.contains("bundles no embedding") && !text.contains("panicked"), "{text}");

    // A bundle whose name would put the file outside --out (or hide it) is refused, and
    // nothing is written.
    let bytes = std::fs::read(&report.lora).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for name in ["sub/inner", "", "back\\slash"] {
        let renamed: Vec<(String, safetensors::tensor::TensorView)> =
            st.tensors().into_iter().map(|(k, v)| (k.replace("bundle_emb.demostyle.", &format!("bundle_emb.{name}.")), v)).collect();
        let crafted = dir.path().join("crafted.safetensors");
        safetensors::serialize_to_file(renamed, None, &crafted).unwrap();
        let fresh = dir.path().join("fresh");
        let (ok, text) = trainer(&["unbundle-embeddings", crafted.to_str().unwrap(), "--out", fresh.to_str().unwrap()]);
        assert!(!ok && text.contains("not a plain file name") && !text.contains("panicked"), "{name}: {text}");
        assert!(!fresh.exists(), "{name}: nothing written");
    }

    // A finite but absurd strength makes the latents NaN: an error, not a black image.
    let black = dir.path().join("black.png");
    let (ok, text) = trainer(&["generate", "--lora", &format!("{lora}:1e30"), "--prompt", "a", "--steps", "2", "--out", black.to_str().unwrap()]);
    assert!(!ok && text.contains("not finite") && !text.contains("panicked"), "{text}");
    assert!(!black.exists(), "no image written");
}

/// `trainer resize` on a LyCORIS full fine-tuning file trained here: a LoRA of the asked
/// rank, written as kohya's `networks.lora`, the layers whose bias differences it leaves out
/// named in a note, and `--verbose` saying that the share of the singular values' sum is
/// not known.
#[test]
fn resize_turns_a_full_fine_tuning_into_a_lora() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = quick_config(dir.path(), 2);
    config.lora.algo = lora_core::Algo::Full;
    config.lora.dropout = 0.0;
    let report = train::<B>(&config, &Default::default(), &mut |_| true).unwrap();
    let input = report.lora.to_str().unwrap().to_string();
    let (full, _) = load(&report.lora);
    assert!(full.iter().all(|(_, w)| w.stands_alone()));

    let out = dir.path().join("lora.safetensors");
    let (ok, text) = trainer(&["resize", &input, out.to_str().unwrap(), "--rank", "2", "--verbose"]);
    assert!(ok, "{text}");
    assert!(text.contains("n/a") && text.contains("full fine-tuning module(s) became LoRAs without their bias differences"), "{text}");
    let (lora, format) = load(&out);
    assert_eq!((format, lora.len()), (AdapterFormat::Kohya, full.len()));
    assert!(lora.iter().all(|(_, w)| w.lycoris.is_none() && w.rank() <= 2), "plain LoRAs of rank 2 at most");
    assert_eq!(lora.metadata.get("ss_network_module").map(String::as_str), Some("networks.lora"));
}

/// `SD_LORA_DEVICE` picks the backend before the command runs: an unknown name, or a GPU
/// backend this build lacks, is an error naming the variable and what was expected.
#[test]
fn sd_lora_device_is_checked_before_the_command_runs() {
    let run = |value: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_trainer")).env("SD_LORA_DEVICE", value).args(["info", "no-such-file.safetensors"]).output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (ok, err) = run("tpu");
    assert!(!ok && err.contains("SD_LORA_DEVICE=tpu") && err.contains("expected auto, cpu, cuda or wgpu"), "{err}");
    // Named in any case; the command itself then runs (and fails on its missing file).
    let (ok, err) = run("CPU");
    assert!(!ok && err.contains("no-such-file") && !err.contains("SD_LORA_DEVICE"), "{err}");
    for (name, built, features) in [("cuda", cfg!(feature = "cuda"), "`--features cuda`"), ("wgpu", cfg!(feature = "wgpu"), "`--features vulkan`, `metal` or `wgpu`")] {
        if !built {
            let (ok, err) = run(name);
            assert!(!ok && err.contains(&format!("SD_LORA_DEVICE={name} needs a build with {features}")), "{err}");
        }
    }
}

/// Writes the safetensors file `from` to `to` with tensor `key` stored as `dtype` `bytes`
/// (its shape kept).
fn with_tensor(from: &str, to: &str, key: &str, dtype: safetensors::Dtype, bytes: Vec<u8>) {
    let file = std::fs::read(from).unwrap();
    let st = safetensors::SafeTensors::deserialize(&file).unwrap();
    let data: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(k, t)| match k == key {
            true => (k, dtype, t.shape().to_vec(), bytes.clone()),
            false => (k, t.dtype(), t.shape().to_vec(), t.data().to_vec()),
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = data.iter().map(|(k, d, s, b)| (k.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap())).collect();
    std::fs::write(to, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// Copies the folder `from` to `to`, recursively.
fn copy_dir_all(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        let target = to.join(path.file_name().unwrap());
        if path.is_dir() {
            copy_dir_all(&path, &target);
        } else {
            std::fs::copy(&path, &target).unwrap();
        }
    }
}

/// The writing commands make a missing `--out` folder (as `generate --out` does), and a file
/// standing where that folder goes is named before any input is read (the inputs here do
/// not exist: an input read first would fail on them instead).
#[test]
fn missing_output_folders_are_made_and_files_in_the_way_are_named_first() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sd-model/tests/fixtures");
    let parity = fixtures.join("parity");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (base, lora) = (s(&parity.join("sd1_single_file.safetensors")), s(&parity.join("sd1_lora_kohya.safetensors")));
    let dir = tempfile::tempdir().unwrap();
    let deep = |name: &str| s(&dir.path().join("new/folders").join(name));
    let tuned = deep("tuned.safetensors");
    let ckpt = s(&fixtures.join("pickles/sd1.ckpt"));
    // Each in a folder of its own that does not exist yet.
    let out = |n: usize| s(&dir.path().join(format!("new{n}/folders/out.safetensors")));
    for (n, args) in [
        vec!["convert", &lora, "OUT", "--to", "peft"],
        vec!["resize", &lora, "OUT", "--rank", "1"],
        vec!["merge-loras", &lora, &lora, "--out", "OUT"],
        vec!["merge", "--model", &base, "--lora", &lora, "--out", "OUT"],
        vec!["merge-models", &base, &tuned, "--out", "OUT"],
        vec!["extract", "--base", &base, "--tuned", &tuned, "--out", "OUT", "--rank", "2"],
        vec!["convert-model", &ckpt, "--out", "OUT"],
    ]
    .into_iter()
    .enumerate()
    {
        let target = out(n);
        let args: Vec<&str> = args.into_iter().map(|a| if a == "OUT" { target.as_str() } else { a }).collect();
        if n == 4 {
            // merge-models and extract take a tuned model, made here into a new folder too.
            let (ok, text) = trainer(&["merge", "--model", &base, "--lora", &lora, "--out", &tuned, "--dtype", "f32"]);
            assert!(ok && Path::new(&tuned).is_file(), "{text}");
        }
        let (ok, text) = trainer(&args);
        assert!(ok && Path::new(&target).is_file(), "{args:?}: {text}");
    }

    let blocker = dir.path().join("blocker");
    std::fs::write(&blocker, "a file").unwrap();
    let out = s(&blocker.join("sub/out.safetensors"));
    let folder_out = s(&blocker.join("sub/out"));
    for args in [
        vec!["convert", "missing.safetensors", &out, "--to", "peft"],
        vec!["resize", "missing.safetensors", &out, "--rank", "1"],
        vec!["merge-loras", "missing.safetensors", "--out", &out],
        vec!["merge", "--model", "missing-model", "--lora", &lora, "--out", &out],
        vec!["merge-models", "missing-a", "missing-b", "--out", &out],
        vec!["extract", "--base", "missing-a", "--tuned", "missing-b", "--out", &out],
        vec!["convert-model", "missing-model", "--out", &folder_out],
        vec!["unbundle-embeddings", "missing.safetensors", "--out", &folder_out],
    ] {
        let (ok, text) = trainer(&args);
        let named = format!("{} is a file, not a folder", blocker.display());
        assert!(!ok && text.contains(&named) && !text.contains("missing") && !text.contains("panicked"), "{args:?}: {text}");
    }
    // A file given as unbundle-embeddings' folder is named as such.
    let (ok, text) = trainer(&["unbundle-embeddings", "missing.safetensors", "--out", &s(&blocker)]);
    assert!(!ok && text.contains("is a file; expected a folder") && !text.contains("panicked"), "{text}");
}

/// An `--out` inside an input model folder is refused before any work, naming both (its
/// copy of the folder would hold the copy, without end), through `..` too. An input named
/// like a partial output (`m.partial` for `--out m`) is only read: outputs are written
/// through the run's own `m.partial-PID`.
#[test]
fn an_output_inside_an_input_model_folder_is_refused() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sd-model/tests/fixtures/parity");
    let lora = fixtures.join("sd1_lora_kohya.safetensors").to_str().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    copy_dir_all(&fixtures.join("sd1"), &model);
    let listing = |p: &Path| {
        let mut names: Vec<_> = walk(p);
        names.sort();
        names
    };
    let before = listing(dir.path());
    let m = model.to_str().unwrap().to_string();
    let other = fixtures.join("sd1").to_str().unwrap().to_string();
    let through_dotdot = dir.path().join("nowhere/../model/baked").to_str().unwrap().to_string();
    for args in [
        vec!["merge", "--model", &m, "--lora", &lora, "--out", &format!("{m}/baked")],
        vec!["merge", "--model", &m, "--lora", &lora, "--out", &through_dotdot],
        vec!["merge-models", &other, &m, "--out", &format!("{m}/unet/merged")],
    ] {
        let (ok, text) = trainer(&args);
        assert!(!ok && text.contains("is inside the input model folder") && text.contains(&m) && !text.contains("panicked"), "{args:?}: {text}");
    }
    let partial = dir.path().join("m.partial");
    copy_dir_all(&fixtures.join("sd1"), &partial);
    assert_eq!(listing(dir.path()).len(), before.len() + listing(&partial).len() + 1);
    let (ok, text) = trainer(&["merge-models", partial.to_str().unwrap(), &other, "--out", dir.path().join("m").to_str().unwrap()]);
    assert!(ok, "{text}");
    assert!(partial.join("model_index.json").is_file() && dir.path().join("m/model_index.json").is_file(), "the input is kept");
    std::fs::remove_dir_all(&partial).unwrap();
    std::fs::remove_dir_all(dir.path().join("m")).unwrap();
    assert_eq!(listing(dir.path()), before, "nothing else written");
}

/// Every path under `root`, relative to it.
fn walk(root: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(root).unwrap() {
        let path = entry.unwrap().path();
        out.push(path.strip_prefix(root).unwrap().to_path_buf());
        if path.is_dir() {
            out.extend(walk(&path).into_iter().map(|p| path.strip_prefix(root).unwrap().join(p)));
        }
    }
    out
}

/// `merge` into a diffusers folder writes it whole or not at all: a copy failing after the
/// LoRA is baked (a dangling link in the model folder) leaves neither `--out` nor its
/// `.partial`, and the same `--out` then works.
#[cfg(unix)]
#[test]
fn a_failed_folder_merge_leaves_no_output() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sd-model/tests/fixtures/parity");
    let lora = fixtures.join("sd1_lora_kohya.safetensors").to_str().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    copy_dir_all(&fixtures.join("sd1"), &model);
    let link = model.join("vae/zz-dangling.json");
    std::os::unix::fs::symlink(dir.path().join("gone.json"), &link).unwrap();
    let out = dir.path().join("baked");
    let args = ["merge", "--model", model.to_str().unwrap(), "--lora", &lora, "--out", out.to_str().unwrap(), "--dtype", "f32"];
    let (ok, text) = trainer(&args);
    assert!(!ok && text.contains("zz-dangling.json") && !text.contains("panicked"), "{text}");
    let left: Vec<_> = walk(dir.path()).into_iter().filter(|p| p.to_string_lossy().starts_with("baked")).collect();
    assert!(left.is_empty(), "{left:?}: {text}");
    std::fs::remove_file(&link).unwrap();
    let (ok, text) = trainer(&args);
    assert!(ok && out.join("unet/diffusion_pytorch_model.safetensors").is_file() && out.join("model_index.json").is_file(), "{text}");
}

/// `merge-models` of diffusers folders says, per component, which keys a model lacked (the
/// first model's value stood in) or only the others had (left out), as a file merge does.
#[test]
fn folder_merges_name_the_keys_they_substitute_or_drop() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sd-model/tests/fixtures/parity");
    let dir = tempfile::tempdir().unwrap();
    let (full, short) = (fixtures.join("sd1"), dir.path().join("short"));
    copy_dir_all(&full, &short);
    // `short`'s text encoder without one of its tensors.
    let te = sd_model::load::ModelSource::weights_file(&short, "text_encoder").unwrap();
    let bytes = std::fs::read(&te).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut kept = st.tensors();
    kept.sort_by(|a, b| a.0.cmp(&b.0));
    let dropped = kept.pop().unwrap().0;
    std::fs::write(&te, safetensors::serialize(kept, None).unwrap()).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let (ok, text) = trainer(&["merge-models", &s(&full), &s(&short), "--out", &s(&dir.path().join("a"))]);
    assert!(ok && text.contains(&format!("text_encoder: 1 keys are missing from some model; the first model's value stood in (in an add difference, the key is the first model's as it is; e.g. `{dropped}`)")), "{text}");
    assert!(!text.contains("unet: "), "{text}");
    let (ok, text) = trainer(&["merge-models", &s(&short), &s(&full), "--out", &s(&dir.path().join("b"))]);
    assert!(ok && text.contains(&format!("text_encoder: 1 keys not in the first model were left out (e.g. `{dropped}`)")), "{text}");
}

/// An SDXL LoRA read from the diffusers/PEFT layout is written in the kohya layout with
/// kohya's SDXL names (`lora_te1_`, `lora_te2_`, the UNet's SGM paths), by `convert`,
/// `resize` and `merge-loras` alike, and reads back: a tiny SDXL's (one ResNet per level)
/// known by its second text encoder; full-width SDXL sets (two ResNets per level) known by
/// a second transformer block or by their metadata; an SD1 set keeps SD1's names.
#[test]
fn sdxl_peft_loras_get_kohyas_sdxl_names() {
    use lora_core::Component::{TextEncoder, TextEncoder2, Unet};
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let names = |p: &str| -> std::collections::BTreeSet<String> {
        let bytes = std::fs::read(p).unwrap();
        safetensors::SafeTensors::deserialize(&bytes).unwrap().names().into_iter().map(|n| n.split('.').next().unwrap().to_string()).collect()
    };
    let adapter = |width: usize| {
        let t = |shape: Vec<usize>| lora_core::HostTensor::new(shape, vec![0.01; width]).unwrap();
        lora_core::LoraWeights::new(t(vec![1, width]), t(vec![width, 1]), 1.0, "test").unwrap()
    };
    let write = |name: &str, modules: &[(lora_core::Component, &str, usize)], version: Option<&str>| {
        let mut set = AdapterSet::new();
        for (component, module, width) in modules {
            set.insert(lora_core::AdapterKey::new(*component, *module), adapter(*width)).unwrap();
        }
        set.metadata.extend(version.map(|v| ("ss_base_model_version".to_string(), v.to_string())));
        let file = path(name);
        set.save(Path::new(&file), AdapterFormat::Peft, lora_core::SaveDtype::F32).unwrap();
        file
    };
    let te = "text_model.encoder.layers.0.self_attn.q_proj";
    let want = |list: &[&str]| list.iter().map(|n| n.to_string()).collect::<std::collections::BTreeSet<_>>();

    let tiny = write("tiny.safetensors", &[(Unet, "down_blocks.1.attentions.0.proj_in", 32), (Unet, "up_blocks.0.attentions.1.proj_out", 64), (TextEncoder, te, 32), (TextEncoder2, te, 32)], None);
    let tiny_names = want(&["lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_model_encoder_layers_0_self_attn_q_proj", "lora_unet_input_blocks_3_1_proj_in", "lora_unet_output_blocks_1_1_proj_out"]);
    for (args, out) in [
        (vec!["convert", &tiny, &path("back.safetensors"), "--to", "kohya"], path("back.safetensors")),
        (vec!["resize", &tiny, &path("resized.safetensors"), "--rank", "1", "--to", "kohya"], path("resized.safetensors")),
        (vec!["merge-loras", &tiny, &tiny, "--out", &path("merged.safetensors"), "--to", "kohya"], path("merged.safetensors")),
    ] {
        let (ok, text) = trainer(&args);
        assert!(ok, "{args:?}: {text}");
        assert_eq!(names(&out), tiny_names, "{args:?}");
    }
    // The SGM names read back without a model, to the same modules.
    let (ok, text) = trainer(&["convert", &path("back.safetensors"), &path("again.safetensors"), "--to", "peft"]);
    assert!(ok, "{text}");
    assert_eq!(names(&path("again.safetensors")), names(&tiny));

    let deep = write("deep.safetensors", &[(Unet, "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q", 640), (TextEncoder, te, 768)], None);
    let marked = write("marked.safetensors", &[(Unet, "down_blocks.2.attentions.0.proj_in", 1280)], Some("sdxl_base_v1-0"));
    let sd1 = write("sd1.safetensors", &[(Unet, "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", 640), (TextEncoder, te, 768)], Some("sd_v1"));
    for (input, expected) in [
        (deep, want(&["lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_q"])),
        (marked, want(&["lora_unet_input_blocks_7_1_proj_in"])),
        (sd1, want(&["lora_te_text_model_encoder_layers_0_self_attn_q_proj", "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"])),
    ] {
        let out = format!("{input}.kohya.safetensors");
        let (ok, text) = trainer(&["convert", &input, &out, "--to", "kohya"]);
        assert!(ok, "{text}");
        assert_eq!(names(&out), expected, "{input}");
    }
}

/// `trainer convert` of a LyCORIS LoHa (which keeps every layer's halves 2-d) writes the
/// LoRA of a 1x1 convolution in the conv layout, as sd-scripts' and PEFT's conv modules
/// load it: SD1.x's `proj_in` and every family's `conv_shortcut`; SD2.x's and SDXL's
/// linear `proj_in` stays 2-d. The family comes from the cross-attention widths, or the
/// metadata where no adapter tells.
#[test]
fn converted_lohas_of_1x1_convolutions_are_in_the_conv_layout() {
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name).to_str().unwrap().to_string();
    let proj_in = "lora_unet_down_blocks_1_attentions_0_proj_in";
    let shortcut = "lora_unet_down_blocks_1_resnets_0_conv_shortcut";
    let to_k = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k";
    // A rank-2 LoHa of an `[out, in]` layer, deterministic values.
    let write = |name: &str, modules: &[(&str, usize, usize)], metadata: &[(&str, &str)]| {
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
        for (module, out, inp) in modules {
            for (part, shape) in [("hada_w1_a", vec![*out, 2]), ("hada_w1_b", vec![2, *inp]), ("hada_w2_a", vec![*out, 2]), ("hada_w2_b", vec![2, *inp])] {
                let n: usize = shape.iter().product();
                let bytes = (0..n).flat_map(|i| (0.01 * ((i % 7) as f32 - 3.0)).to_le_bytes()).collect();
                tensors.push((format!("{module}.{part}"), shape, bytes));
            }
            tensors.push((format!("{module}.alpha"), vec![], 2.0f32.to_le_bytes().to_vec()));
        }
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> =
            tensors.iter().map(|(k, shape, bytes)| (k.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes).unwrap())).collect();
        let meta: std::collections::HashMap<String, String> = metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let file = path(name);
        safetensors::serialize_to_file(views, Some(meta), Path::new(&file)).unwrap();
        file
    };
    let down_shape = |file: &str, module: &str| {
        let bytes = std::fs::read(file).unwrap();
        let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        tensors.tensor(&format!("{module}.lora_down.weight")).unwrap().shape().to_vec()
    };
    let sd1 = write("sd1.safetensors", &[(proj_in, 8, 8), (shortcut, 8, 4), (to_k, 8, 768)], &[]);
    let sd2 = write("sd2.safetensors", &[(proj_in, 8, 8), (shortcut, 8, 4), (to_k, 8, 1024)], &[]);
    let sd2_said = write("sd2_said.safetensors", &[(proj_in, 8, 8)], &[("ss_v2", "True")]);
    // SDXL's width (a narrower one reads as the tiny SDXL model's layout).
    let sdxl = write("sdxl.safetensors", &[(proj_in, 640, 640)], &[("ss_base_model_version", "sdxl_base_v1-0")]);
    // SDXL's is written by its SGM name, as sd-scripts' SDXL loader needs.
    let sgm_proj_in = "lora_unet_input_blocks_4_1_proj_in";
    for (input, proj_in_name, proj_in_shape, shortcut_shape) in [
        (&sd1, proj_in, vec![4, 8, 1, 1], Some(vec![4, 4, 1, 1])),
        (&sd2, proj_in, vec![4, 8], Some(vec![4, 4, 1, 1])),
        (&sd2_said, proj_in, vec![4, 8], None),
        (&sdxl, sgm_proj_in, vec![4, 640], None),
    ] {
        let out = format!("{input}.lora.safetensors");
        let (ok, text) = trainer(&["convert", input, &out, "--to", "kohya"]);
        assert!(ok, "{text}");
        assert_eq!(down_shape(&out, proj_in_name), proj_in_shape, "{input}");
        if let Some(shape) = shortcut_shape {
            assert_eq!(down_shape(&out, shortcut), shape, "{input}");
            // The linear layer stays 2-d.
            assert_eq!(down_shape(&out, to_k).len(), 2, "{input}");
        }
    }
}
