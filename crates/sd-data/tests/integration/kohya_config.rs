//! kohya sd-scripts' dataset config (TOML) read into a `DatasetConfig`: sd-scripts'
//! precedence, the defaults the caller gives, and typed errors naming the file and key.

use std::path::Path;

use proptest::prelude::*;
use sd_data::{DataError, DatasetConfig, Resolution, SubsetConfig};

fn read(text: &str, defaults: &DatasetConfig) -> Result<DatasetConfig, DataError> {
    DatasetConfig::from_kohya_toml(text, Path::new("my/dataset.toml"), defaults)
}

fn message(text: &str) -> String {
    match read(text, &DatasetConfig::default()) {
        Err(DataError::ConfigFile { path, message }) => {
            assert_eq!(path, Path::new("my/dataset.toml"));
            message
        }
        other => panic!("expected a ConfigFile error, got {other:?}"),
    }
}

#[test]
fn subsets_override_datasets_which_override_general_which_override_the_defaults() {
    let defaults = DatasetConfig {
        enable_bucket: false,
        resolution: Resolution::square(1024),
        subsets: vec![SubsetConfig {
            flip_aug: true,
            caption_extension: ".caption".into(),
            num_repeats: Some(1),
            ..SubsetConfig::default()
        }],
        ..DatasetConfig::default()
    };
    let text = r#"
        [general]
        keep_tokens = 2
        caption_extension = ".txt"
        caption_dropout_rate = 0.1

        [[datasets]]
        resolution = [768, 512]
        keep_tokens = 1

          [[datasets.subsets]]
          image_dir = "a"
          num_repeats = 4
          class_tokens = "sks style"

          [[datasets.subsets]]
          image_dir = "b"
          keep_tokens = 3
          flip_aug = false
          conditioning_data_dir = "."

        [[datasets]]
        resolution = [768, 512]

          [[datasets.subsets]]
          image_dir = "c"
          is_reg = true
          color_aug = true
    "#;
    let c = read(text, &defaults).unwrap();
    // Dataset options: the file's, else the defaults'.
    assert_eq!((c.resolution.width, c.resolution.height, c.enable_bucket), (768, 512, false));
    let dirs: Vec<_> = c.subsets.iter().map(|s| s.image_dir.to_str().unwrap()).collect();
    assert_eq!(dirs, ["a", "b", "c"]);
    let keep: Vec<_> = c.subsets.iter().map(|s| s.keep_tokens).collect();
    assert_eq!(keep, [1, 3, 2], "subset > dataset > general");
    assert!(c.subsets.iter().all(|s| s.caption_extension == ".txt" && s.caption_dropout_rate == 0.1));
    assert_eq!(c.subsets.iter().map(|s| s.flip_aug).collect::<Vec<_>>(), [true, false, true], "the defaults' subset template");
    assert_eq!(c.subsets.iter().map(|s| s.num_repeats).collect::<Vec<_>>(), [Some(4), Some(1), Some(1)], "the defaults' num_repeats");
    assert!(c.subsets.iter().all(|s| !s.recursive && !s.folder_names), "sd-scripts' folder reading");
    assert_eq!(c.subsets[0].class_tokens.as_deref(), Some("sks style"));
    assert!(c.subsets[2].is_reg && !c.subsets[0].is_reg);
    assert_eq!(c.subsets.iter().map(|s| s.color_aug).collect::<Vec<_>>(), [false, false, true]);
    // `conditioning_data_dir` is the mask folder (sd-scripts' masked loss).
    assert_eq!(c.subsets[1].mask_dir.as_deref(), Some(Path::new(".")));
}

#[test]
fn datasets_must_agree_on_dataset_options() {
    let text = r#"
        [[datasets]]
        resolution = 512
          [[datasets.subsets]]
          image_dir = "a"
        [[datasets]]
        resolution = 768
          [[datasets.subsets]]
          image_dir = "b"
    "#;
    let m = message(text);
    assert!(m.contains("`datasets[1].resolution`") && m.contains("datasets[0]"), "{m}");
    // The same value spelt otherwise is the same.
    let same = text.replace("resolution = 512", "resolution = [768, 768]");
    assert_eq!(read(&same, &DatasetConfig::default()).unwrap().subsets.len(), 2);
    // Agreeing ones, with the value in [general], merge.
    let text = text.replace("resolution = 512", "").replace("resolution = 768", "");
    let c = read(&format!("[general]\nresolution = 640\n{text}"), &DatasetConfig::default()).unwrap();
    assert_eq!((c.resolution.width, c.subsets.len()), (640, 2));
}

#[test]
fn bad_files_are_errors_naming_the_key() {
    let subset = |extra: &str| format!("[[datasets]]\n  [[datasets.subsets]]\n  image_dir = \"a\"\n  {extra}\n");
    let cases = [
        (subset("custom_attributes = { a = 1 }"), "`datasets[0].subsets[0].custom_attributes.a` is not read by this trainer"),
        (subset("custom_attributes = { diff_output_preservation = 1 }"), "`datasets[0].subsets[0].custom_attributes.diff_output_preservation` must be true or false"),
        (subset("custom_attributes = \"dop\""), "`datasets[0].subsets[0].custom_attributes` must be a table"),
        ("[general]\ncustom_attributes = { b = true }\n".to_string() + &subset(""), "`general.custom_attributes.b` is not read"),
        (subset("network_multiplier = -1.0"), "`datasets[0].subsets[0].network_multiplier` (sd-scripts' option) is not supported"),
        (subset("resize_interpolation = \"hamming\""), "`datasets[0].subsets[0].resize_interpolation` has the wrong type"),
        // sd-scripts crops around faces only without buckets.
        (subset("face_crop_aug_range = [2.0, 4.0]"), "`datasets[0].subsets[0].face_crop_aug_range` needs enable_bucket = false"),
        ("[general]\nenable_bucket = false\n".to_string() + &subset("face_crop_aug_range = [4.0, 2.0]"), "`datasets[0].subsets[0].face_crop_aug_range` must be two positive numbers"),
        (subset("face_crop_aug_range = [2.0]"), "`datasets[0].subsets[0].face_crop_aug_range` has the wrong type"),
        (subset("color_aug = \"yes\""), "`datasets[0].subsets[0].color_aug` has the wrong type"),
        (subset("token_warmup_step = -1"), "`datasets[0].subsets[0].token_warmup_step` must be"),
        (subset("metadata_file = \"meta.json\""), "meta.json does not exist"),
        ("[[datasets]]\n  [[datasets.subsets]]\n  num_repeats = 2\n".to_string(), "`datasets[0].subsets[0].image_dir` is required"),
        (subset("resolution = 512"), "`datasets[0].subsets[0].resolution` is a dataset option"),
        ("[general]\nresolution = 10000\n".to_string() + &subset(""), "10000x10000: a side may be at most 8192 px"),
        ("[general]\nenable_bucket = true\nmax_bucket_reso = 100000\n".to_string() + &subset(""), "max_bucket_reso` 100000 is over the largest side"),
        (subset("num_repeat = 2"), "`datasets[0].subsets[0].num_repeat` is not a dataset option"),
        (subset("num_repeats = \"ten\""), "`datasets[0].subsets[0].num_repeats` has the wrong type"),
        (subset("num_repeats = 0"), "num_repeats"),
        (subset("caption_dropout_rate = 2.0"), "caption_dropout_rate"),
        ("[general]\nvalidation_split = 0.1\n".to_string() + &subset(""), "`general.validation_split`"),
        // A value's type is checked where the file sets it.
        ("[general]\nkeep_tokens = \"one\"\n".to_string() + &subset(""), "`general.keep_tokens` has the wrong type"),
        ("[general]\nbatch_size = 1.5\n".to_string() + &subset(""), "`general.batch_size` has the wrong type"),
        (subset("conditioning_data_dir = 5"), "`datasets[0].subsets[0].conditioning_data_dir` has the wrong type"),
        ("[[datasets]]\nbatch_size = \"x\"\n  [[datasets.subsets]]\n  image_dir = \"a\"\n".into(), "`datasets[0].batch_size` has the wrong type"),
        ("[[datasets]]\nenable_bucket = \"yes\"\n  [[datasets.subsets]]\n  image_dir = \"a\"\n".into(), "`datasets[0].enable_bucket` has the wrong type"),
        (subset("conditioning_data_dir = \".\"\n  mask_dir = \".\""), "`datasets[0].subsets[0].conditioning_data_dir` and `mask_dir`"),
        // Checks after typing name the subset as the file places it.
        (format!("{}{}", subset(""), subset("num_repeats = 0")), "`datasets[1].subsets[0].num_repeats`"),
        ("[[datasets]]\n  [[datasets.subsets]]\n  num_repeats = 2\n".into(), "`datasets[0].subsets[0].image_dir` is required"),
        ("[[datasets]]\nresolution = [1024, 1536]\nenable_bucket = true\n  [[datasets.subsets]]\n  image_dir = \"a\"\n".into(), "`datasets[0].max_bucket_reso` 1024 is below the resolution's longer side"),
        ("[[datasets]]\nresolution = 128\nenable_bucket = true\n  [[datasets.subsets]]\n  image_dir = \"a\"\n".into(), "min_bucket_reso (256)"),
        ("[[datasets]]\nresolution = 512.5\n  [[datasets.subsets]]\n  image_dir = \"a\"\n".into(), "`datasets[0].resolution` has the wrong type"),
        ("[[datasets]]\nresolution = [512, 0]\n  [[datasets.subsets]]\n  image_dir = \"a\"\n".into(), "`datasets[0].resolution`"),
        ("[[datasets]]\nresolution = [512]\n  [[datasets.subsets]]\n  image_dir = \"a\"\n".into(), "`datasets[0].resolution`"),
        ("[[datasets]]\nresolution = 512\n".into(), "`datasets[0].subsets`"),
        ("[general]\nresolution = 512\n".into(), "[[datasets]]"),
        ("[dataset]\nresolution = 512\n".into(), "unknown top-level key `dataset`"),
        ("general = 3\n".into(), "must be a table"),
        ("[[datasets]\n".into(), "TOML parse error"),
    ];
    for (text, want) in cases {
        let m = message(&text);
        assert!(m.contains(want), "{text}: {m}");
    }
    let missing = DatasetConfig::from_kohya_toml_file(Path::new("no/such.toml"), &DatasetConfig::default()).unwrap_err();
    assert!(missing.to_string().contains("no/such.toml"), "{missing}");
}

/// sd-scripts reads a subset's folder as it is: its own images, no repeats or class tokens
/// from its name, no `N_name` children; `folder_names = true` reads them as sd-data does.
#[test]
fn subsets_read_their_folders_as_sd_scripts_does() {
    let root = tempfile::tempdir().unwrap();
    let image = |dir: &Path, name: &str| {
        std::fs::create_dir_all(dir).unwrap();
        image::RgbImage::from_pixel(64, 64, image::Rgb([90, 120, 30])).save(dir.join(format!("{name}.png"))).unwrap();
        std::fs::write(dir.join(format!("{name}.txt")), "a tag").unwrap();
    };
    let named = root.path().join("10_style");
    image(&named, "a");
    let parent = root.path().join("train");
    image(&parent, "loose");
    image(&parent.join("5_child"), "b");
    let toml = |extra: &str| {
        format!(
            "[general]\nresolution = 64\nmin_bucket_reso = 64\n[[datasets]]\n  [[datasets.subsets]]\n  image_dir = {:?}\n  {extra}\n  [[datasets.subsets]]\n  image_dir = {:?}\n  {extra}\n",
            named.display().to_string(),
            parent.display().to_string()
        )
    };
    let open = |text: &str| sd_data::Dataset::open(&read(text, &DatasetConfig::default()).unwrap()).unwrap();
    let ds = open(&toml(""));
    let folders: Vec<_> = ds.folders().into_iter().map(|f| (f.name, f.num_repeats, f.images)).collect();
    assert_eq!(folders, [("10_style".to_string(), 1, 1), ("train".to_string(), 1, 1)]);
    assert!(ds.config().subsets.iter().all(|s| s.class_tokens.is_none()));
    let ds = open(&toml("folder_names = true\n  recursive = true"));
    let mut folders: Vec<_> = ds.folders().into_iter().map(|f| (f.name, f.num_repeats, f.images)).collect();
    folders.sort();
    assert_eq!(folders, [("10_style".to_string(), 10, 1), ("5_child".to_string(), 5, 1), ("train".to_string(), 1, 1)]);
}

/// A fine-tuning subset names its metadata file, with or without an image folder; the
/// caller's default subset never makes others fine-tuning ones.
#[test]
fn fine_tuning_subsets_read_their_metadata_file() {
    let d = tempfile::tempdir().unwrap();
    let meta = d.path().join("meta.json");
    std::fs::write(&meta, "{}").unwrap();
    let text = format!("[[datasets]]\n  [[datasets.subsets]]\n  metadata_file = {:?}\n  num_repeats = 3\n  [[datasets.subsets]]\n  image_dir = \"img\"\n", meta.to_str().unwrap());
    let defaults = DatasetConfig { subsets: vec![SubsetConfig { metadata_file: Some("other.json".into()), ..SubsetConfig::default() }], ..DatasetConfig::default() };
    let c = read(&text, &defaults).unwrap();
    assert_eq!((c.subsets[0].metadata_file.as_deref(), c.subsets[0].num_repeats), (Some(meta.as_path()), Some(3)));
    assert!(c.subsets[0].image_dir.as_os_str().is_empty());
    assert_eq!(c.subsets[1].metadata_file, None);
}

/// `resize_interpolation` by sd-scripts' names, in `[general]`, a dataset or a subset (the
/// nearest wins); unset, sd-scripts' default per image.
/// sd-scripts' `custom_attributes = { diff_output_preservation = true }` marks a subset
/// for differential output preservation; like any subset option it cascades from
/// `[general]` and `[[datasets]]`, and a table given lower down replaces the one above
/// (an empty one turns preservation off again).
#[test]
fn custom_attributes_mark_differential_output_preservation() {
    let text = r#"
[general]
custom_attributes = { diff_output_preservation = true }

[[datasets]]
  [[datasets.subsets]]
  image_dir = "keep"

  [[datasets.subsets]]
  image_dir = "style"
  custom_attributes = {}

  [[datasets.subsets]]
  image_dir = "off"
  custom_attributes = { diff_output_preservation = false }
"#;
    let c = read(text, &DatasetConfig::default()).unwrap();
    let flags: Vec<bool> = c.subsets.iter().map(|s| s.diff_output_preservation).collect();
    assert_eq!(flags, [true, false, false]);
    let plain = read("[[datasets]]\n  [[datasets.subsets]]\n  image_dir = \"a\"\n", &DatasetConfig::default()).unwrap();
    assert!(!plain.subsets[0].diff_output_preservation);
}

#[test]
fn resize_interpolation_reads_sd_scripts_names() {
    let text = "[general]\nresize_interpolation = \"cubic\"\n[[datasets]]\n  [[datasets.subsets]]\n  image_dir = \"a\"\n  [[datasets.subsets]]\n  image_dir = \"b\"\n  resize_interpolation = \"area\"\n";
    let c = read(text, &DatasetConfig::default()).unwrap();
    let got: Vec<_> = c.subsets.iter().map(|s| s.resize_interpolation).collect();
    assert_eq!(got, [Some(sd_data::ResizeInterpolation::Bicubic), Some(sd_data::ResizeInterpolation::Area)]);
    let c = read("[[datasets]]\n  [[datasets.subsets]]\n  image_dir = \"a\"\n", &DatasetConfig::default()).unwrap();
    assert_eq!(c.subsets[0].resize_interpolation, None);
    // sd-scripts' scan cache changes only its speed: read and left alone.
    read("[general]\ncache_info = true\n[[datasets]]\n  [[datasets.subsets]]\n  image_dir = \"a\"\n", &DatasetConfig::default()).unwrap();
}

/// NaN and infinity (which JSON, the way in, cannot hold) are errors naming the key, not
/// a default (`loss_weight = nan` trained at 1.0) or a type error about a `null`.
#[test]
fn non_finite_numbers_are_errors_naming_the_key() {
    let text = |v: &str| format!("[general]\nprior_loss_weight = 1.0\n\n[[datasets]]\n\n  [[datasets.subsets]]\n  image_dir = \"img\"\n\n  [[datasets.subsets]]\n  image_dir = \"reg\"\n  loss_weight = {v}\n");
    assert!(read(&text("0.5"), &DatasetConfig::default()).is_ok());
    for v in ["nan", "inf", "-inf"] {
        let m = message(&text(v));
        assert!(m.contains("`datasets[0].subsets[1].loss_weight`") && m.contains("finite"), "{m}");
    }
    let m = message("[general]\ncaption_tag_dropout_rate = nan\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = \"img\"\n");
    assert!(m.contains("`general.caption_tag_dropout_rate`") && !m.contains("null"), "{m}");
}

/// A `key = value` line of kohya's dataset options at edge values: numbers out of range,
/// NaN, wrong types, odd strings, tables and lists where scalars go.
fn option_line() -> impl Strategy<Value = String> {
    const KEYS: &[&str] = &[
        "resolution", "batch_size", "enable_bucket", "min_bucket_reso", "max_bucket_reso", "bucket_reso_steps", "bucket_no_upscale",
        "num_repeats", "keep_tokens", "shuffle_caption", "caption_extension", "caption_dropout_rate", "caption_dropout_every_n_epochs",
        "caption_tag_dropout_rate", "token_warmup_min", "token_warmup_step", "flip_aug", "color_aug", "random_crop", "face_crop_aug_range",
        "class_tokens", "is_reg", "keep_tokens_separator", "secondary_separator", "enable_wildcard", "caption_prefix", "caption_suffix",
        "alpha_mask", "conditioning_data_dir", "resize_interpolation", "custom_attributes", "cache_info", "prior_loss_weight", "loss_weight",
        "metadata_file", "network_multiplier", "validation_split",
    ];
    const VALUES: &[&str] = &[
        "0", "1", "-1", "64", "512", "100000", "4294967296", "0.5", "nan", "inf", "-0.0", "true", "false", "\"\"", "\"x\"", "\"512,768\"",
        "\"area\"", "[]", "[1]", "[2.0, 4.0]", "[4.0, 2.0]", "[512, 768]", "{}", "{ diff_output_preservation = true }", "{ a = 1 }",
    ];
    (prop::sample::select(KEYS), prop::sample::select(VALUES)).prop_map(|(k, v)| format!("{k} = {v}"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(4096))]

    /// Any dataset config of kohya's options at edge values, wherever they stand
    /// (`[general]`, a dataset, a subset), reads as a config that validates, or is an
    /// error naming the file — never a panic.
    #[test]
    fn any_kohya_dataset_config_reads_or_names_the_file(
        general in prop::collection::vec(option_line(), 0..3),
        dataset in prop::collection::vec(option_line(), 0..3),
        subsets in prop::collection::vec(prop::collection::vec(option_line(), 0..3), 1..3),
    ) {
        // TOML refuses a key given twice in a table: the first stays.
        let table = |lines: &[String]| {
            let mut seen = std::collections::HashSet::new();
            lines.iter().filter(|l| seen.insert(l.split(" = ").next().unwrap_or_default().to_string())).cloned().collect::<Vec<_>>().join("\n")
        };
        let mut text = format!("[general]\n{}\n\n[[datasets]]\n{}\n", table(&general), table(&dataset));
        for s in &subsets {
            text.push_str(&format!("\n  [[datasets.subsets]]\n  image_dir = \"img\"\n{}\n", table(s)));
        }
        match read(&text, &DatasetConfig::default()) {
            Ok(config) => prop_assert!(config.validate().is_ok()),
            Err(e) => prop_assert!(e.to_string().contains("dataset.toml"), "{}\n-> {}", text, e),
        }
    }
}
