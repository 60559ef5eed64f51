//! Folder layouts, repeats, epoch plans and every bad-input case.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use image::codecs::png::PngEncoder;
use image::{ImageEncoder, Rgb, RgbImage};
use sd_data::image_io::ColorAug;
use sd_data::{scan, DataError, Dataset, DatasetConfig, MissingCaption, SubsetConfig};

fn img(w: u32, h: u32, seed: u8) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| {
        Rgb([
            (x as u8).wrapping_mul(3) ^ seed,
            (y as u8).wrapping_mul(5),
            seed,
        ])
    })
}

fn save(path: &Path, w: u32, h: u32, seed: u8) -> PathBuf {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    img(w, h, seed).save(path).unwrap();
    path.to_path_buf()
}

fn caption(image: &Path, ext: &str, text: &str) {
    fs::write(image.with_extension(ext), text).unwrap();
}

fn config(dir: &Path) -> DatasetConfig {
    DatasetConfig {
        min_bucket_reso: 64,
        max_bucket_reso: 256,
        resolution: sd_data::Resolution::square(128),
        ..DatasetConfig::single(dir)
    }
}

fn names(ds: &Dataset) -> Vec<String> {
    (0..ds.images().len())
        .map(|i| {
            ds.image_path(i)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

#[test]
fn plain_folder_all_formats_recursive_captions() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path();
    let a = save(&root.join("a.png"), 96, 64, 1);
    caption(&a, "txt", "\u{feff}\n  first line, tags  \nsecond line");
    let b = save(&root.join("b.jpg"), 64, 96, 2);
    caption(&b, "caption", "from caption file");
    let c = save(&root.join("C.WEBP"), 80, 80, 3);
    caption(&c, "txt", "webp");
    let e = save(&root.join("nested/deeper/e.bmp"), 70, 90, 4);
    caption(&e, "txt", "nested bmp");
    save(&root.join(".hidden/x.png"), 64, 64, 5);
    // 16-bit grayscale and RGBA images are converted to 8-bit RGB.
    let gray = root.join("nested/g16.png");
    image::ImageBuffer::<image::Luma<u16>, _>::from_fn(64, 64, |x, _| {
        image::Luma([x as u16 * 1000])
    })
    .save(&gray)
    .unwrap();
    caption(&gray, "txt", "gray");
    let rgba = root.join("nested/rgba.png");
    image::RgbaImage::from_fn(64, 64, |_, y| image::Rgba([200, 100, 50, y as u8]))
        .save(&rgba)
        .unwrap();
    caption(&rgba, "txt", "alpha");
    fs::write(root.join("notes.md"), "not an image").unwrap();
    let ds = Dataset::open(&config(root)).unwrap();
    assert_eq!(
        names(&ds),
        ["C.WEBP", "a.png", "b.jpg", "e.bmp", "g16.png", "rgba.png"]
    );
    let caps: Vec<&str> = ds.images().iter().map(|i| i.caption.as_str()).collect();
    assert_eq!(
        caps,
        [
            "webp",
            "first line, tags",
            "from caption file",
            "nested bmp",
            "gray",
            "alpha"
        ]
    );
    assert_eq!((ds.images()[1].width, ds.images()[1].height), (96, 64));
    assert_eq!(ds.samples_per_epoch(), 6);
    assert_eq!(ds.decode(4).unwrap().get_pixel(63, 0).0, [245, 245, 245]); // 16-bit to 8-bit: round(63000 / 257) = 245
    assert_eq!(ds.decode(5).unwrap().get_pixel(0, 0).0, [200, 100, 50]);

    let mut flat = config(root);
    flat.subsets[0].recursive = false;
    assert_eq!(Dataset::open(&flat).unwrap().images().len(), 3);
}

#[test]
fn kohya_parent_folder_repeats_and_class_tokens() {
    let d = tempfile::tempdir().unwrap();
    let train = d.path().join("train");
    save(&train.join("10_sks dog/1.png"), 64, 64, 1);
    save(&train.join("10_sks dog/2.png"), 128, 64, 2);
    let cat = save(&train.join("3_cat/1.png"), 64, 128, 3);
    caption(&cat, "txt", "a cat, sitting");
    let mut cfg = config(&train);
    cfg.batch_size = 2;
    let ds = Dataset::open(&cfg).unwrap();
    assert_eq!(ds.subsets().len(), 2);
    assert_eq!(ds.subsets()[0].num_repeats, 10);
    assert_eq!(ds.subsets()[0].config.image_dir, train.join("10_sks dog"));
    assert_eq!(
        ds.subsets()[0].config.class_tokens.as_deref(),
        Some("sks dog")
    );
    let caps: Vec<&str> = ds.images().iter().map(|i| i.caption.as_str()).collect();
    assert_eq!(caps, ["sks dog", "sks dog", "a cat, sitting"]);
    assert_eq!(ds.samples_per_epoch(), 23);
    assert_eq!(ds.bucket_table().values().sum::<usize>(), 23);

    // Each epoch holds every image exactly `repeats` times, in batches of one bucket each.
    for epoch in 0..3 {
        let plan = ds.plan_epoch(epoch);
        // One bucket per image (square, landscape, portrait) with 10, 10 and 3 samples:
        // 5 + 5 + 2 batches of up to 2, whatever the epoch draws.
        assert_eq!((plan.len(), ds.batches_per_epoch()), (12, 12));
        let mut count: HashMap<usize, usize> = HashMap::new();
        for b in &plan {
            assert!(!b.samples.is_empty() && b.samples.len() <= 2);
            for s in &b.samples {
                assert_eq!(s.bucket, b.bucket);
                assert_eq!(s.bucket, ds.assignment(s.image).bucket);
                *count.entry(s.image).or_default() += 1;
            }
        }
        assert_eq!(count[&0], 10);
        assert_eq!(count[&1], 10);
        assert_eq!(count[&2], 3);
    }
    // A folder passed directly takes its repeats from its own name; config overrides it.
    let mut direct = config(&train.join("3_cat"));
    assert_eq!(Dataset::open(&direct).unwrap().repeats(0), 3);
    direct.subsets[0].num_repeats = Some(7);
    assert_eq!(Dataset::open(&direct).unwrap().repeats(0), 7);
}

#[test]
fn plans_are_seeded() {
    let d = tempfile::tempdir().unwrap();
    for i in 0..6 {
        let p = save(
            &d.path().join(format!("5_x/{i}.png")),
            64 + 32 * (i % 3),
            64,
            i as u8,
        );
        caption(&p, "txt", &format!("img {i}, a, b, c"));
    }
    let mut cfg = config(d.path());
    cfg.batch_size = 3;
    cfg.subsets[0].flip_aug = true;
    cfg.subsets[0].shuffle_caption = true;
    cfg.seed = 42;
    let ds = Dataset::open(&cfg).unwrap();
    assert_eq!(ds.plan_epoch(0), ds.plan_epoch(0));
    assert_ne!(ds.plan_epoch(0), ds.plan_epoch(1));
    cfg.seed = 43;
    let other = Dataset::open(&cfg).unwrap();
    assert_ne!(ds.plan_epoch(0), other.plan_epoch(0));
    // Flips happen at roughly half the samples over several epochs.
    let flips: usize = (0..10)
        .flat_map(|e| ds.plan_epoch(e))
        .flat_map(|b| b.samples)
        .filter(|s| s.flip)
        .count();
    assert!((100..200).contains(&flips), "{flips} flips of 300");
}

/// kohya's `color_aug` changes about a third of the samples, half by hue and half by
/// gamma, differently from epoch to epoch and only in its own subset, and nothing else in
/// the plan; without it no sample changes, and the held-out validation images never do.
#[test]
fn color_aug_changes_a_third_of_the_samples_of_its_subset() {
    let d = tempfile::tempdir().unwrap();
    for i in 0..6 {
        let p = save(&d.path().join(format!("10_x/{i}.png")), 64, 64, i as u8);
        caption(&p, "txt", "x");
        let p = save(&d.path().join(format!("10_y/{i}.png")), 64, 64, i as u8);
        caption(&p, "txt", "y");
    }
    let mut cfg = config(d.path());
    let plain = Dataset::open(&cfg).unwrap();
    assert!(!plain.has_color_aug());
    assert!((0..3).flat_map(|e| plain.plan_epoch(e)).flat_map(|b| b.samples).all(|s| s.color.is_none()));
    cfg.subsets = vec![SubsetConfig { color_aug: true, ..SubsetConfig::new(d.path().join("10_x")) }, SubsetConfig::new(d.path().join("10_y"))];
    let ds = Dataset::open(&cfg).unwrap();
    assert!(ds.has_color_aug());
    let subset_of = |s: &sd_data::SamplePlan| ds.images()[s.image].caption.clone();
    let samples: Vec<_> = (0..10).flat_map(|e| ds.plan_epoch(e)).flat_map(|b| b.samples).collect();
    assert!(samples.iter().filter(|s| subset_of(s) == "y").all(|s| s.color.is_none()));
    let x: Vec<_> = samples.iter().filter(|s| subset_of(s) == "x").collect();
    assert_eq!(x.len(), 600);
    let hue = x.iter().filter(|s| matches!(s.color, Some(ColorAug::Hue(_)))).count();
    let gamma = x.iter().filter(|s| matches!(s.color, Some(ColorAug::Gamma(_)))).count();
    assert!((70..130).contains(&hue) && (70..130).contains(&gamma), "{hue} hue, {gamma} gamma changes of 600");
    let colors = |epoch: u64| ds.plan_epoch(epoch).into_iter().flat_map(|b| b.samples).map(|s| s.color).collect::<Vec<_>>();
    assert_ne!(colors(0), colors(1));
    // The same batches, samples, flips and crops as without the option.
    cfg.subsets[0].color_aug = false;
    let without = Dataset::open(&cfg).unwrap();
    for epoch in 0..3 {
        let uncoloured: Vec<_> = ds.plan_epoch(epoch).into_iter().map(|mut b| {
            b.samples.iter_mut().for_each(|s| s.color = None);
            b
        }).collect();
        assert_eq!(uncoloured, without.plan_epoch(epoch), "epoch {epoch}");
    }
    cfg.subsets[0].color_aug = true;
    let (_, val) = Dataset::open(&cfg).unwrap().split_validation(0.5, 0).unwrap();
    assert!(val.plan_epoch(0).iter().flat_map(|b| &b.samples).all(|s| s.color.is_none()));
}

/// `caption_dropout_every_n_epochs = 2` empties every caption of epochs 2, 4, … (indices
/// 1, 3, …) and changes nothing else: the other epochs, and the shuffles, flips and batch
/// order of the emptied ones, are those of a plan without the option.
#[test]
fn every_nth_epoch_has_empty_captions_and_the_same_draws() {
    let d = tempfile::tempdir().unwrap();
    for i in 0..5 {
        let p = save(&d.path().join(format!("3_x/{i}.png")), 64, 64 + 32 * (i % 2), i as u8);
        caption(&p, "txt", &format!("img {i}, a, b, c"));
    }
    let mut cfg = config(d.path());
    cfg.batch_size = 2;
    cfg.subsets[0].flip_aug = true;
    cfg.subsets[0].shuffle_caption = true;
    let plain = Dataset::open(&cfg).unwrap();
    cfg.subsets[0].caption_dropout_every_n_epochs = 2;
    assert!(!cfg.subsets[0].captions_are_fixed());
    let every = Dataset::open(&cfg).unwrap();
    for epoch in 0..4u64 {
        let (a, b) = (plain.plan_epoch(epoch), every.plan_epoch(epoch));
        if epoch % 2 == 0 {
            assert_eq!(a, b, "epoch index {epoch}");
            continue;
        }
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.samples.len(), y.samples.len());
            for (s, t) in x.samples.iter().zip(&y.samples) {
                assert!(!s.caption.is_empty() && t.caption.is_empty(), "epoch index {epoch}");
                assert_eq!((s.image, s.flip, s.crop), (t.image, t.flip, t.crop));
            }
        }
    }
}

/// kohya's token warmup counts optimizer steps: batch `b` of epoch `e` is at step
/// `e · ⌈batches / gradient_accumulation_steps⌉ + b / gradient_accumulation_steps` (an
/// epoch's last step takes the batches left, as sd-scripts'), a fraction below 1 is of the run's
/// steps; the flips and crops stay what they are without it, and the held-out validation
/// images keep every tag.
#[test]
fn token_warmup_follows_the_steps_of_the_batches() {
    let d = tempfile::tempdir().unwrap();
    for i in 0..6 {
        let p = save(&d.path().join(format!("1_x/{i}.png")), 64, 64 + 32 * (i % 2), i as u8);
        caption(&p, "txt", &format!("img{i}, a, b, c, d, e, f, g, h"));
    }
    let mut cfg = config(d.path());
    cfg.subsets[0].flip_aug = true;
    cfg.subsets[0].keep_tokens = 1;
    let plain = Dataset::open(&cfg).unwrap();
    // 6 batches an epoch, 4 per step: 2 steps an epoch, the second of the 2 batches left;
    // 0.5 of 8 steps is 4.
    cfg.subsets[0].token_warmup_step = 0.5;
    let warm = Dataset::open(&cfg).unwrap().with_steps(4, 8);
    assert!(!warm.captions_are_fixed());
    let warmup = sd_data::TokenWarmup { min: 1, steps: 4.0 };
    for epoch in 0..3u64 {
        let (a, b) = (plain.plan_epoch(epoch), warm.plan_epoch(epoch));
        assert_eq!(b.len(), 6);
        for (i, (x, y)) in a.iter().zip(&b).enumerate() {
            let step = epoch * 2 + i as u64 / 4;
            for (s, t) in x.samples.iter().zip(&y.samples) {
                assert_eq!((s.image, s.flip, s.crop, &s.caption[..4]), (t.image, t.flip, t.crop, &t.caption[..4]));
                let tags = t.caption.split(", ").count() - 1;
                assert_eq!(tags, warmup.tags_at(8, step), "epoch {epoch} batch {i} (step {step}): {}", t.caption);
            }
        }
    }
    // A long run's warmup (0.5 of 800 steps) keeps one tag throughout the first epoch;
    // the held-out images see whole captions.
    let (train, validation) = Dataset::open(&cfg).unwrap().split_validation(0.34, 1).unwrap();
    let train = train.with_steps(1, 800);
    assert!(train.plan_epoch(0).iter().flat_map(|p| &p.samples).all(|s| s.caption.split(", ").count() == 2));
    assert!(validation.plan_epoch(0).iter().flat_map(|p| &p.samples).all(|s| s.caption.split(", ").count() == 9));
}

/// kohya's `enable_wildcard` reads every line of a caption file and picks per sample; its
/// `secondary_separator` keeps joined tags together and ends as the separator. Without
/// them a caption is its first line and plans are unchanged.
#[test]
fn wildcards_pick_a_line_and_options_per_sample() {
    let d = tempfile::tempdir().unwrap();
    let p = save(&d.path().join("2_x/a.png"), 64, 64, 1);
    caption(&p, "txt", "\na {red|blue} circle;;;round\n\nsecond line, plain\n");
    let mut cfg = config(d.path());
    let first_line = Dataset::open(&cfg).unwrap();
    assert_eq!(first_line.images()[0].caption, "a {red|blue} circle;;;round");
    cfg.subsets[0].enable_wildcard = true;
    cfg.subsets[0].secondary_separator = Some(";;;".into());
    let wild = Dataset::open(&cfg).unwrap();
    assert_eq!(wild.images()[0].caption, "a {red|blue} circle;;;round\nsecond line, plain");
    let captions: std::collections::BTreeSet<String> = (0..20).flat_map(|e| wild.plan_epoch(e)).flat_map(|p| p.samples).map(|s| s.caption).collect();
    assert_eq!(captions.into_iter().collect::<Vec<_>>(), ["a blue circle,round", "a red circle,round", "second line, plain"]);
}

#[test]
fn regularization_images_are_balanced_and_weighted() {
    let d = tempfile::tempdir().unwrap();
    save(&d.path().join("train/5_sks dog/a.png"), 64, 64, 1);
    save(&d.path().join("train/5_sks dog/b.png"), 64, 64, 2);
    for i in 0..3 {
        save(&d.path().join(format!("reg/1_dog/{i}.png")), 64, 64, 10 + i);
    }
    let cfg = DatasetConfig {
        prior_loss_weight: 0.5,
        subsets: vec![
            SubsetConfig::new(d.path().join("train")),
            SubsetConfig {
                is_reg: true,
                ..SubsetConfig::new(d.path().join("reg"))
            },
        ],
        ..config(d.path())
    };
    let ds = Dataset::open(&cfg).unwrap();
    let reg: Vec<u32> = (2..5).map(|i| ds.repeats(i)).collect();
    // kohya: one pass at the folder's repeats, then one extra repeat per image round-robin
    // until regularization samples equal the 10 training samples.
    assert_eq!(reg, [4, 3, 3]);
    assert_eq!(ds.samples_per_epoch(), 20);
    // Billions of training samples: balancing is computed, not counted one by one (which
    // took minutes), and the epoch is refused by its size.
    let huge = tempfile::tempdir().unwrap();
    for name in ["4294967295_a", "4294967295_b", "4294967295_c"] {
        save(&huge.path().join(format!("train/{name}/x.png")), 64, 64, 1);
    }
    save(&huge.path().join("reg/1_dog/r.png"), 64, 64, 2);
    let huge_cfg = DatasetConfig {
        subsets: vec![
            SubsetConfig::new(huge.path().join("train")),
            SubsetConfig { is_reg: true, ..SubsetConfig::new(huge.path().join("reg")) },
        ],
        ..config(huge.path())
    };
    let err = Dataset::open(&huge_cfg).unwrap_err().to_string();
    assert!(err.contains("4294967295_"), "{err}");
    for s in ds.plan_epoch(0).iter().flat_map(|b| &b.samples) {
        let expected = if s.image >= 2 { 0.5 } else { 1.0 };
        assert_eq!(s.loss_weight, expected);
        assert_eq!(s.caption, if s.image >= 2 { "dog" } else { "sks dog" });
    }
    // Many reg images: only as many as needed are used.
    let d2 = tempfile::tempdir().unwrap();
    save(&d2.path().join("train/1_a/a.png"), 64, 64, 1);
    for i in 0..4 {
        save(&d2.path().join(format!("reg/1_b/{i}.png")), 64, 64, 10 + i);
    }
    let cfg2 = DatasetConfig {
        subsets: vec![
            SubsetConfig::new(d2.path().join("train")),
            SubsetConfig {
                is_reg: true,
                ..SubsetConfig::new(d2.path().join("reg"))
            },
        ],
        ..config(d2.path())
    };
    let ds2 = Dataset::open(&cfg2).unwrap();
    assert_eq!(
        (1..5).map(|i| ds2.repeats(i)).collect::<Vec<_>>(),
        [1, 0, 0, 0]
    );
    assert_eq!(ds2.samples_per_epoch(), 2);
}

#[test]
fn metadata_jsonl_folder() {
    let d = tempfile::tempdir().unwrap();
    save(&d.path().join("img/a.png"), 64, 64, 1);
    save(&d.path().join("img/b.png"), 64, 64, 2);
    fs::write(
        d.path().join("metadata.jsonl"),
        "{\"file_name\": \"img/a.png\", \"text\": \"caption a\"}\n\n{\"file_name\": \"img/b.png\", \"text\": \"caption b\", \"extra\": 1}\n",
    )
    .unwrap();
    let ds = Dataset::open(&config(d.path())).unwrap();
    let caps: Vec<&str> = ds.images().iter().map(|i| i.caption.as_str()).collect();
    assert_eq!(caps, ["caption a", "caption b"]);

    fs::write(
        d.path().join("metadata.jsonl"),
        "{\"file_name\": \"img/a.png\", \"text\": \"ok\"}\nnot json\n",
    )
    .unwrap();
    match Dataset::open(&config(d.path())).unwrap_err() {
        DataError::Metadata { path, line, .. } => {
            assert!(path.ends_with("metadata.jsonl"));
            assert_eq!(line, 2);
        }
        e => panic!("unexpected {e}"),
    }
    fs::write(
        d.path().join("metadata.jsonl"),
        "{\"file_name\": \"img/missing.png\", \"text\": \"x\"}\n",
    )
    .unwrap();
    match Dataset::open(&config(d.path())).unwrap_err() {
        DataError::Io { path, .. } => assert!(path.ends_with("img/missing.png")),
        e => panic!("unexpected {e}"),
    }

    // A byte-order mark is read past; an image of the folder itself that no line names
    // is reported (left out), not dropped silently.
    save(&d.path().join("c.png"), 64, 64, 3);
    caption(&d.path().join("c.png"), "txt", "c from its caption file");
    fs::write(d.path().join("metadata.jsonl"), "\u{feff}{\"file_name\": \"img/a.png\", \"text\": \"caption a\"}\n").unwrap();
    match Dataset::open(&config(d.path())).unwrap_err() {
        DataError::KohyaMetadata { path, key, message } => assert!(path.ends_with("metadata.jsonl") && key == "c.png" && message.contains("left out"), "{message}"),
        e => panic!("unexpected {e}"),
    }
    let mut lenient = config(d.path());
    lenient.skip_bad_images = true;
    let ds = Dataset::open(&lenient).unwrap();
    assert_eq!(ds.images().iter().map(|i| i.caption.as_str()).collect::<Vec<_>>(), ["caption a"]);
    assert_eq!(ds.skipped().len(), 1);
}

/// kohya's fine-tuning metadata (`metadata_file` / `--in_json`): entries keyed by image
/// stem (as merge_captions_to_metadata.py writes them), by relative or absolute path, in
/// JSON or JSONL; captions joined with tags as sd-scripts joins them.
#[test]
fn kohya_fine_tuning_metadata() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("train");
    save(&dir.join("a.png"), 64, 64, 1);
    save(&dir.join("sub/b.jpg"), 64, 64, 2);
    let c = save(&d.path().join("elsewhere/c.png"), 64, 64, 3);
    // An image the file does not list is not trained.
    save(&dir.join("unlisted.png"), 64, 64, 4);
    let meta = d.path().join("meta_lat.json");
    let json = serde_json::json!({
        "a": {"caption": "a watercolor fox", "tags": "fox, watercolor", "train_resolution": [64, 64]},
        "sub/b.jpg": {"tags": "tree, ink"},
        c.to_str().unwrap(): {"caption": "a cat"},
    });
    fs::write(&meta, serde_json::to_string_pretty(&json).unwrap()).unwrap();
    let fine_tuning = |dir: &Path, meta: &Path, edit: &dyn Fn(&mut SubsetConfig)| {
        let mut cfg = config(dir);
        cfg.subsets[0].metadata_file = Some(meta.to_path_buf());
        cfg.subsets[0].num_repeats = Some(2);
        edit(&mut cfg.subsets[0]);
        cfg
    };
    let ds = Dataset::open(&fine_tuning(&dir, &meta, &|_| {})).unwrap();
    let mut caps: Vec<(String, String)> = ds.images().iter().enumerate().map(|(i, r)| (names(&ds)[i].clone(), r.caption.clone())).collect();
    caps.sort();
    assert_eq!(caps, [("a.png".to_string(), "a watercolor fox,fox, watercolor".to_string()), ("b.jpg".into(), "tree, ink".into()), ("c.png".into(), "a cat".into())]);
    assert_eq!(ds.plan_epoch(0).iter().map(|b| b.samples.len()).sum::<usize>(), 6, "2 repeats of 3 images");
    // Wildcards: the tags after each line of the caption.
    let wild = d.path().join("wild.jsonl");
    fs::write(&wild, "{\"image_path\": \"a\", \"caption\": \"one\\n\\ntwo\", \"tags\": \"x\\ny\"}\n").unwrap();
    let ds = Dataset::open(&fine_tuning(&dir, &wild, &|s| {
        s.enable_wildcard = true;
        s.caption_separator = ", ".into();
    }))
    .unwrap();
    assert_eq!(ds.images()[0].caption, "one, x, y\ntwo, x, y");
    // Absolute keys need no image_dir; relative ones do.
    let abs = d.path().join("abs.jsonl");
    fs::write(&abs, format!("{{\"image_path\": {:?}, \"caption\": \"a cat\"}}\n", c.to_str().unwrap())).unwrap();
    assert_eq!(Dataset::open(&fine_tuning(Path::new(""), &abs, &|_| {})).unwrap().images().len(), 1);
    let err = Dataset::open(&fine_tuning(Path::new(""), &meta, &|_| {})).unwrap_err().to_string();
    assert!(err.contains("meta_lat.json") && err.contains("image_dir"), "{err}");

    // Bad entries name the file and the key.
    let bad = d.path().join("bad.json");
    for (text, expected) in [
        (r#"{"missing": {"caption": "x"}}"#, "image `missing`: no image at"),
        (r#"{"a": {"caption": 5}}"#, "image `a`: `caption` must be a string"),
        (r#"{"a": "a caption"}"#, "image `a`: must be an object"),
        (r#"["a"]"#, "must be a JSON object of image keys"),
        (r#"{"a": {"caption": "x"}"#, "invalid JSON"),
        (r#"{}"#, "no image entries"),
    ] {
        fs::write(&bad, text).unwrap();
        let err = Dataset::open(&fine_tuning(&dir, &bad, &|_| {})).unwrap_err().to_string();
        assert!(err.contains("bad.json") && err.contains(expected), "{text}: {err}");
    }
    fs::write(dir.join("cached.npz"), b"").unwrap();
    fs::write(&bad, r#"{"cached": {"caption": "x"}}"#).unwrap();
    let err = Dataset::open(&fine_tuning(&dir, &bad, &|_| {})).unwrap_err().to_string();
    assert!(err.contains("cached latents"), "{err}");
    // The file must exist, and is for training images.
    let err = Dataset::open(&fine_tuning(&dir, &d.path().join("nope.json"), &|_| {})).unwrap_err().to_string();
    assert!(err.contains("subsets[0].metadata_file") && err.contains("nope.json"), "{err}");
    let err = Dataset::open(&fine_tuning(&dir, &meta, &|s| s.is_reg = true)).unwrap_err().to_string();
    assert!(err.contains("subsets[0].metadata_file") && err.contains("regularization"), "{err}");
}

fn exif_orientation(value: u16) -> Vec<u8> {
    let mut v = b"MM\0\x2a\0\0\0\x08".to_vec();
    v.extend_from_slice(&1u16.to_be_bytes());
    v.extend_from_slice(&0x0112u16.to_be_bytes());
    v.extend_from_slice(&3u16.to_be_bytes());
    v.extend_from_slice(&1u32.to_be_bytes());
    v.extend_from_slice(&value.to_be_bytes());
    v.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    v
}

#[test]
fn exif_orientation_is_applied() {
    let d = tempfile::tempdir().unwrap();
    // 96x64, left half red, right half blue, tagged "rotate 90 degrees clockwise".
    let src = RgbImage::from_fn(96, 64, |x, _| {
        if x < 48 {
            Rgb([255, 0, 0])
        } else {
            Rgb([0, 0, 255])
        }
    });
    let path = d.path().join("rot.png");
    let mut enc = PngEncoder::new(fs::File::create(&path).unwrap());
    enc.set_exif_metadata(exif_orientation(6)).unwrap();
    enc.write_image(src.as_raw(), 96, 64, image::ExtendedColorType::Rgb8)
        .unwrap();
    caption(&path, "txt", "rotated");

    for verify in [true, false] {
        let mut cfg = config(d.path());
        cfg.verify_images = verify;
        let ds = Dataset::open(&cfg).unwrap();
        assert_eq!(
            (ds.images()[0].width, ds.images()[0].height),
            (64, 96),
            "verify {verify}"
        );
        let pixels = ds.decode(0).unwrap();
        assert_eq!(pixels.dimensions(), (64, 96));
        // Clockwise rotation puts the left (red) half on top.
        assert_eq!(pixels.get_pixel(32, 5).0, [255, 0, 0]);
        assert_eq!(pixels.get_pixel(32, 90).0, [0, 0, 255]);
    }
}

fn expect_err(cfg: &DatasetConfig) -> DataError {
    match Dataset::open(cfg) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e,
    }
}

#[test]
fn corrupt_and_truncated_images() {
    let d = tempfile::tempdir().unwrap();
    let ok = save(&d.path().join("ok.png"), 64, 64, 1);
    caption(&ok, "txt", "ok");
    fs::write(d.path().join("bad.png"), b"definitely not a png").unwrap();
    caption(&d.path().join("bad.png"), "txt", "x");
    match expect_err(&config(d.path())) {
        DataError::CorruptImage { path, .. } => assert!(path.ends_with("bad.png")),
        e => panic!("unexpected {e}"),
    }
    fs::remove_file(d.path().join("bad.png")).unwrap();
    let bytes = fs::read(&ok).unwrap();
    fs::write(d.path().join("trunc.png"), &bytes[..bytes.len() / 2]).unwrap();
    caption(&d.path().join("trunc.png"), "txt", "x");
    let e = expect_err(&config(d.path()));
    assert!(
        matches!(&e, DataError::CorruptImage { path, .. } if path.ends_with("trunc.png")),
        "{e}"
    );
    assert!(e.to_string().contains("trunc.png"));
}

/// A FIFO named like an image is passed over: reading it blocked the scan for good.
#[cfg(unix)]
#[test]
fn special_files_named_like_images_are_passed_over() {
    let d = tempfile::tempdir().unwrap();
    let ok = save(&d.path().join("ok.png"), 64, 64, 1);
    caption(&ok, "txt", "ok");
    let fifo = d.path().join("pipe.png");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status().is_ok_and(|s| s.success());
    if !made {
        eprintln!("mkfifo is not available; skipped");
        return;
    }
    caption(&fifo, "txt", "x");
    assert_eq!(Dataset::open(&config(d.path())).unwrap().images().len(), 1);
}

/// A JPEG cut short is refused as PIL refuses it, though the image crate's decoder would
/// fill its missing rows without an error; bytes after the end marker (some cameras append
/// data there) are no truncation. With and without verify_images (the scan's header probe).
#[test]
fn truncated_jpegs_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let whole = encoded(image::ImageFormat::Jpeg, 3);
    let mut trailing = whole.clone();
    trailing.extend_from_slice(b"camera trailer");
    fs::write(d.path().join("whole.jpg"), &whole).unwrap();
    fs::write(d.path().join("trailing.jpg"), &trailing).unwrap();
    for name in ["whole.jpg", "trailing.jpg", "cut.jpg"] {
        caption(&d.path().join(name), "txt", "x");
    }
    assert_eq!(Dataset::open(&config(d.path())).unwrap().images().len(), 2);
    fs::write(d.path().join("cut.jpg"), &whole[..whole.len() * 2 / 3]).unwrap();
    for verify in [true, false] {
        let mut cfg = config(d.path());
        cfg.verify_images = verify;
        let e = expect_err(&cfg);
        assert!(matches!(&e, DataError::CorruptImage { path, message } if path.ends_with("cut.jpg") && message.contains("truncated")), "{e}");
    }
}

/// 2 KiB of noise strewn with JPEG end and start-of-scan markers, like the MP4 a Motion
/// Photo (`*.MP.jpg`) carries after its image.
fn noisy_trailer() -> Vec<u8> {
    let mut state = 0x2545_f491u32;
    let mut out: Vec<u8> = (0..2048)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        })
        .collect();
    for at in (0..out.len() - 1).step_by(97) {
        let marker = if at % 2 == 0 { 0xD9 } else { 0xDA };
        out[at..at + 2].copy_from_slice(&[0xFF, marker]);
    }
    // The last marker is a start-of-scan: a search for the file's last end marker saw a
    // scan after it and called the file truncated.
    out.extend_from_slice(&[0xFF, 0xD9, 0x00, 0xFF, 0xDA, 0x00, 0x08]);
    out
}

/// Data after a JPEG's end-of-image marker (a Motion Photo's video, a second MPF image)
/// is not part of its image, whatever markers it holds: such photos load, as in PIL,
/// while one cut inside its scan is still refused as truncated.
#[test]
fn jpegs_with_data_after_their_image_load_and_cut_ones_do_not() {
    let d = tempfile::tempdir().unwrap();
    let whole = encoded(image::ImageFormat::Jpeg, 5);
    let mut motion = whole.clone();
    motion.extend_from_slice(&noisy_trailer());
    let path = d.path().join("PXL_0001.MP.jpg");
    fs::write(&path, &motion).unwrap();
    caption(&path, "txt", "x");
    let want = sd_data::image_io::decode_image(&whole, Path::new("whole.jpg")).unwrap();
    assert_eq!(sd_data::image_io::decode_image(&motion, &path).unwrap(), want);
    for verify in [true, false] {
        let mut cfg = config(d.path());
        cfg.verify_images = verify;
        let ds = Dataset::open(&cfg).unwrap();
        assert_eq!((ds.images()[0].width, ds.images()[0].height), (64, 64));
        for s in ds.plan_epoch(0).iter().flat_map(|b| b.samples.iter()) {
            ds.sample_pixels(s).unwrap();
        }
    }
    // Cut in the middle of its scan (the scan starts after the headers, well before the
    // middle of this 64x64 image), the trailer gone: truncated.
    let scan = whole.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
    let cut = (scan + whole.len()) / 2;
    fs::write(&path, &whole[..cut]).unwrap();
    for verify in [true, false] {
        let mut cfg = config(d.path());
        cfg.verify_images = verify;
        let e = expect_err(&cfg);
        assert!(matches!(&e, DataError::CorruptImage { path, message } if path.ends_with("PXL_0001.MP.jpg") && message.contains("truncated")), "{e}");
    }
}

/// An image so thin that covering its bucket would enlarge it past the pixel limit is
/// refused when the dataset is built, before any resize reserves its buffer: 20 000 × 16
/// px into a 384 × 384 bucket is 480 000 × 384 px resized, 184 million pixels.
#[test]
fn images_whose_resize_would_pass_the_pixel_limit_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let strip = save(&d.path().join("strip.png"), 20_000, 16, 1);
    caption(&strip, "txt", "strip");
    let mut cfg = DatasetConfig {
        resolution: sd_data::Resolution::square(384),
        enable_bucket: false,
        min_image_size: 16,
        ..DatasetConfig::single(d.path())
    };
    match expect_err(&cfg) {
        DataError::ResizeTooLarge { path, width: 20_000, height: 16, bucket_width: 384, bucket_height: 384, resized_width: 480_000, resized_height: 384, max_pixels } => {
            assert!(path.ends_with("strip.png"));
            assert_eq!(max_pixels, sd_data::image_io::MAX_IMAGE_PIXELS);
        }
        e => panic!("unexpected {e}"),
    }
    // At 368 px it is 460 000 × 368 px, 169 million pixels: under the limit, kept.
    cfg.resolution = sd_data::Resolution::square(368);
    let ds = Dataset::open(&cfg).unwrap();
    assert_eq!(ds.assignment(0).resized, (460_000, 368));
    // With skip_bad_images the strip is left out and listed, beside a usable image.
    cfg.resolution = sd_data::Resolution::square(384);
    cfg.skip_bad_images = true;
    let ok = save(&d.path().join("ok.png"), 384, 384, 2);
    caption(&ok, "txt", "ok");
    let ds = Dataset::open(&cfg).unwrap();
    assert_eq!(names(&ds), ["ok.png"]);
    assert!(matches!(ds.skipped(), [DataError::ResizeTooLarge { .. }]), "{:?}", ds.skipped());
}

/// A header claiming a huge image (a decompression bomb, or a damaged width) is refused
/// before its pixel buffer is reserved: here 60 000 × 60 000 px, 10.8 GB as RGB.
#[test]
fn images_past_the_pixel_limit_are_refused_before_decoding() {
    let d = tempfile::tempdir().unwrap();
    let mut bytes = encoded(image::ImageFormat::Bmp, 1);
    // BITMAPINFOHEADER: width and height are little-endian i32 at bytes 18 and 22.
    bytes[18..22].copy_from_slice(&60_000i32.to_le_bytes());
    bytes[22..26].copy_from_slice(&60_000i32.to_le_bytes());
    let path = d.path().join("bomb.bmp");
    fs::write(&path, &bytes).unwrap();
    caption(&path, "txt", "bomb");
    match expect_err(&config(d.path())) {
        DataError::ImageTooLarge { path, width: 60_000, height: 60_000, max_pixels } => {
            assert!(path.ends_with("bomb.bmp"));
            assert_eq!(max_pixels, sd_data::image_io::MAX_IMAGE_PIXELS);
        }
        e => panic!("unexpected {e}"),
    }
}

#[test]
fn image_below_minimum_size() {
    let d = tempfile::tempdir().unwrap();
    save(&d.path().join("1_x/big.png"), 64, 64, 1);
    save(&d.path().join("1_x/small.png"), 64, 40, 2);
    match expect_err(&config(d.path())) {
        DataError::ImageTooSmall {
            path,
            width,
            height,
            min_side,
        } => {
            assert!(path.ends_with("small.png"));
            assert_eq!((width, height, min_side), (64, 40, 64));
        }
        e => panic!("unexpected {e}"),
    }
    // With no-upscale, an image below one bucket step cannot form a bucket, and the error
    // says so (not that the image is under a minimum size it meets).
    let mut cfg = config(d.path());
    cfg.min_image_size = 1;
    cfg.bucket_no_upscale = true;
    let err = expect_err(&cfg);
    assert!(matches!(err, DataError::NoBucketFits { width: 64, height: 40, step: 64, .. }), "{err}");
    assert!(err.to_string().contains("no bucket fits") && err.path().unwrap().ends_with("small.png"));
}

#[test]
fn caption_not_utf8() {
    let d = tempfile::tempdir().unwrap();
    let p = save(&d.path().join("a.png"), 64, 64, 1);
    fs::write(p.with_extension("txt"), b"caf\xe9 latin-1").unwrap();
    match expect_err(&config(d.path())) {
        DataError::CaptionNotUtf8 { path, valid_up_to } => {
            assert!(path.ends_with("a.txt"));
            assert_eq!(valid_up_to, 3);
        }
        e => panic!("unexpected {e}"),
    }
}

#[test]
fn empty_dataset_and_missing_dir() {
    let d = tempfile::tempdir().unwrap();
    fs::write(d.path().join("readme.txt"), "no images").unwrap();
    assert!(
        matches!(expect_err(&config(d.path())), DataError::EmptyDataset { dirs } if dirs.contains(&d.path().display().to_string()) && !dirs.contains("other file"))
    );
    // Images in formats that are not read (GIF here) are named, with the formats read.
    fs::write(d.path().join("anim.gif"), b"GIF89a").unwrap();
    let e = expect_err(&config(d.path())).to_string();
    assert!(e.contains("1 other file(s), e.g.") && e.contains("anim.gif") && e.contains(".png, .jpg"), "{e}");
    fs::remove_file(d.path().join("anim.gif")).unwrap();
    let missing = d.path().join("nope");
    assert!(
        matches!(expect_err(&config(&missing)), DataError::NotADirectory { path } if path == missing)
    );
    // Only regularization images is empty too.
    save(&d.path().join("r.png"), 64, 64, 1);
    let mut cfg = config(d.path());
    cfg.subsets[0].is_reg = true;
    cfg.subsets[0].class_tokens = Some("x".into());
    assert!(matches!(expect_err(&cfg), DataError::EmptyDataset { .. }));
}

#[test]
fn unknown_folder_name_in_kohya_parent() {
    let d = tempfile::tempdir().unwrap();
    save(&d.path().join("10_dog/a.png"), 64, 64, 1);
    save(&d.path().join("dogs_extra/b.png"), 64, 64, 2);
    save(&d.path().join("0_none/c.png"), 64, 64, 3);
    let mut cfg = config(d.path());
    let e = expect_err(&cfg);
    assert!(
        matches!(&e, DataError::UnknownFolderName { path, .. } if path.ends_with("0_none")),
        "{e}"
    );
    let s = scan(&cfg).unwrap();
    let bad: Vec<_> = s
        .problems
        .iter()
        .map(|p| p.path().unwrap().file_name().unwrap().to_owned())
        .collect();
    assert_eq!(bad, ["0_none", "dogs_extra"]);
    cfg.skip_bad_images = true;
    let ds = Dataset::open(&cfg).unwrap();
    assert_eq!(names(&ds), ["a.png"]);
}

#[test]
fn missing_caption_policy() {
    let d = tempfile::tempdir().unwrap();
    save(&d.path().join("5_sks cat/a.png"), 64, 64, 1);
    let p = save(&d.path().join("5_sks cat/b.png"), 64, 64, 2);
    caption(&p, "txt", "   \n\n"); // empty counts as missing
    let ds = Dataset::open(&config(&d.path().join("5_sks cat"))).unwrap();
    assert!(ds.images().iter().all(|i| i.caption == "sks cat"));

    let mut cfg = config(&d.path().join("5_sks cat"));
    cfg.subsets[0].missing_caption = MissingCaption::Error;
    match expect_err(&cfg) {
        DataError::MissingCaption { path, tried, .. } => {
            assert!(path.ends_with("a.png"));
            assert!(tried.contains("a.txt") && tried.contains("a.caption"));
        }
        e => panic!("unexpected {e}"),
    }
    // A plain folder has no class tokens to fall back on.
    let plain = tempfile::tempdir().unwrap();
    save(&plain.path().join("a.png"), 64, 64, 1);
    assert!(matches!(
        expect_err(&config(plain.path())),
        DataError::MissingCaption { .. }
    ));
}

/// A face-crop image `name_cx_cy_w_h.png` without a caption of its own is captioned by
/// `name.txt`, as sd-scripts reads it; its own caption wins, and a name whose last four
/// parts are not numbers has no such fallback.
#[test]
fn face_crop_images_share_their_base_names_caption() {
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().join("2_x");
    save(&dir.join("alice_100_120_50_60.png"), 64, 64, 1);
    let own = save(&dir.join("alice_30_40_20_20.png"), 64, 64, 2);
    caption(&own, "txt", "alice, close-up");
    fs::write(dir.join("alice.txt"), "alice, portrait").unwrap();
    save(&dir.join("a_b_c_d_e.png"), 64, 64, 3);
    let mut cfg = config(&dir);
    cfg.subsets[0].missing_caption = MissingCaption::Error;
    match expect_err(&cfg) {
        DataError::MissingCaption { path, .. } => assert!(path.ends_with("a_b_c_d_e.png"), "{}", path.display()),
        e => panic!("unexpected {e}"),
    }
    fs::remove_file(dir.join("a_b_c_d_e.png")).unwrap();
    let ds = Dataset::open(&cfg).unwrap();
    let mut caps: Vec<(String, String)> = ds.images().iter().enumerate().map(|(i, r)| (names(&ds)[i].clone(), r.caption.clone())).collect();
    caps.sort();
    assert_eq!(caps, [("alice_100_120_50_60.png".to_string(), "alice, portrait".to_string()), ("alice_30_40_20_20.png".into(), "alice, close-up".into())]);
}

#[test]
fn skip_bad_images_collects_warnings() {
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("2_thing");
    for (i, name) in ["good1.png", "good2.png"].iter().enumerate() {
        save(&root.join(name), 64, 64, i as u8);
    }
    fs::write(root.join("corrupt.jpg"), b"\xff\xd8\xff garbage").unwrap();
    save(&root.join("tiny.png"), 16, 16, 9);
    let p = save(&root.join("latin1.png"), 64, 64, 3);
    fs::write(p.with_extension("txt"), b"\xff\xfe").unwrap();
    let mut cfg = config(&root);
    cfg.skip_bad_images = true;
    let ds = Dataset::open(&cfg).unwrap();
    assert_eq!(names(&ds), ["good1.png", "good2.png"]);
    let mut skipped: Vec<String> = ds
        .skipped()
        .iter()
        .map(|e| {
            e.path()
                .unwrap()
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    skipped.sort();
    assert_eq!(skipped, ["corrupt.jpg", "latin1.txt", "tiny.png"]);
    assert!(ds
        .skipped()
        .iter()
        .any(|e| matches!(e, DataError::ImageTooSmall { .. })));
    let summary = ds.skipped_summary().unwrap();
    assert!(
        summary.starts_with("skipped 3 bad file(s)"),
        "{summary}"
    );
    // Each skipped file is named with its error, one per line.
    for name in ["corrupt.jpg", "latin1.txt", "tiny.png"] {
        assert_eq!(summary.lines().filter(|l| l.contains(name)).count(), 1, "{name}: {summary}");
    }
    assert!(summary.contains("16x16"), "{summary}");
    // All bad: still an empty-dataset error.
    fs::remove_file(root.join("good1.png")).unwrap();
    fs::remove_file(root.join("good2.png")).unwrap();
    assert!(matches!(expect_err(&cfg), DataError::EmptyDataset { .. }));
}

#[test]
fn config_json_and_validation() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("ds.json");
    fs::write(
        &path,
        r#"{"resolution": [768, 512], "enable_bucket": true, "bucket_no_upscale": true, "batch_size": 4,
            "subsets": [{"image_dir": "imgs", "num_repeats": 3, "class_tokens": "sks", "keep_tokens": 1,
                         "shuffle_caption": true, "caption_extension": ".caption", "is_reg": false,
                         "missing_caption": "error"}]}"#,
    )
    .unwrap();
    let cfg = DatasetConfig::from_json_file(&path).unwrap();
    assert_eq!((cfg.resolution.width, cfg.resolution.height), (768, 512));
    assert_eq!(cfg.subsets[0].num_repeats, Some(3));
    assert_eq!(cfg.subsets[0].missing_caption, MissingCaption::Error);
    let back: DatasetConfig = serde_json::from_str(&serde_json::to_string(&cfg).unwrap()).unwrap();
    assert_eq!(back, cfg);

    fs::write(&path, r#"{"resolutoin": 512, "subsets": []}"#).unwrap();
    assert!(
        matches!(DatasetConfig::from_json_file(&path), Err(DataError::ConfigFile { path: p, message }) if p == path && message.contains("resolutoin"))
    );

    let bad = |f: &dyn Fn(&mut DatasetConfig), key: &str| {
        let mut c = DatasetConfig::single("x");
        f(&mut c);
        match c.validate() {
            Err(DataError::Config { key: k, .. }) => assert_eq!(k, key),
            other => panic!("{key}: {other:?}"),
        }
    };
    bad(&|c| c.batch_size = 0, "batch_size");
    bad(&|c| c.min_bucket_reso = 100, "min_bucket_reso");
    bad(&|c| c.max_bucket_reso = 128, "max_bucket_reso");
    bad(&|c| c.bucket_reso_steps = 0, "bucket_reso_steps");
    bad(&|c| c.subsets.clear(), "subsets");
    bad(
        &|c| c.subsets[0].caption_dropout_rate = 1.5,
        "subsets[0].caption_dropout_rate",
    );
    bad(
        &|c| c.subsets[0].num_repeats = Some(0),
        "subsets[0].num_repeats",
    );
    bad(
        &|c| c.subsets[0].caption_extension = "txt".into(),
        "subsets[0].caption_extension",
    );
}

#[test]
fn validation_split_holds_out_training_images_without_augmentation() {
    let d = tempfile::tempdir().unwrap();
    for i in 0..10 {
        save(&d.path().join(format!("train/3_sks dog/{i}.png")), 64, 64, i);
    }
    for i in 0..2 {
        save(&d.path().join(format!("reg/1_dog/r{i}.png")), 64, 64, 50 + i);
    }
    let mut train_subset = SubsetConfig::new(d.path().join("train"));
    (train_subset.flip_aug, train_subset.shuffle_caption, train_subset.caption_dropout_rate) = (true, true, 0.5);
    let cfg = DatasetConfig {
        subsets: vec![train_subset, SubsetConfig { is_reg: true, ..SubsetConfig::new(d.path().join("reg")) }],
        ..config(d.path())
    };
    let (train, val) = Dataset::open(&cfg).unwrap().split_validation(0.25, 3).unwrap();
    // 10 training images: 3 (rounded) held out, none of the regularization images.
    assert_eq!(val.images().len(), 3);
    assert_eq!(train.images().len(), 7 + 2);
    let held: Vec<String> = names(&val);
    assert!(held.iter().all(|n| !names(&train).contains(n)));
    assert!((0..val.images().len()).all(|i| val.repeats(i) == 1 && !val.flip_aug(i)));
    // Once per epoch, captions as written, in every epoch.
    for epoch in 0..3 {
        let samples: Vec<_> = val.plan_epoch(epoch).into_iter().flat_map(|b| b.samples).collect();
        assert_eq!(samples.len(), 3);
        assert!(samples.iter().all(|s| !s.flip && s.caption == "sks dog"));
    }
    // The training side still balances its regularization images against 7 × 3 samples.
    assert_eq!(train.samples_per_epoch(), 2 * 21);
    // Seeded: the same split again, another with another seed.
    let (_, again) = Dataset::open(&cfg).unwrap().split_validation(0.25, 3).unwrap();
    assert_eq!(names(&again), held);
    let others: Vec<Vec<String>> = (4..12).map(|seed| names(&Dataset::open(&cfg).unwrap().split_validation(0.25, seed).unwrap().1)).collect();
    assert!(others.iter().any(|n| *n != held));
    // Bad fractions and too few images are errors naming the key.
    for fraction in [0.0, 1.0, f64::NAN] {
        let err = Dataset::open(&cfg).unwrap().split_validation(fraction, 0).unwrap_err();
        assert!(err.to_string().contains("validation_split"), "{err}");
    }
    let one = tempfile::tempdir().unwrap();
    let a = save(&one.path().join("a.png"), 64, 64, 1);
    caption(&a, "txt", "a photo");
    let err = Dataset::open(&config(one.path())).unwrap().split_validation(0.5, 0).unwrap_err();
    assert!(err.to_string().contains("at least 2"), "{err}");
}

/// What kohya records in a LoRA's metadata: folders with repeats and image counts
/// (regularization folders marked), and per-folder tag counts from the caption files.
#[test]
fn folders_and_tag_frequency_as_kohya_records_them() {
    let d = tempfile::tempdir().unwrap();
    let train = d.path().join("train");
    save(&train.join("10_sks dog/1.png"), 64, 64, 1);
    let a = save(&train.join("3_cat/a.png"), 64, 64, 2);
    caption(&a, "txt", "A cat, sitting, , cat ");
    let b = save(&train.join("3_cat/b.png"), 64, 64, 3);
    caption(&b, "txt", "a cat,standing");
    save(&d.path().join("reg/1_dog/r.png"), 64, 64, 4);
    let mut cfg = config(&train);
    cfg.subsets.push(SubsetConfig { is_reg: true, ..SubsetConfig::new(d.path().join("reg")) });
    let ds = Dataset::open(&cfg).unwrap();
    let folders: Vec<(String, u32, usize, bool)> = ds.folders().into_iter().map(|f| (f.name, f.num_repeats, f.images, f.is_reg)).collect();
    assert_eq!(folders, [("10_sks dog".into(), 10, 1, false), ("3_cat".into(), 3, 2, false), ("1_dog".into(), 1, 1, true)]);
    let tags = ds.tag_frequency();
    assert_eq!(tags.len(), 3);
    let cat: Vec<(&str, usize)> = tags["3_cat"].iter().map(|(k, v)| (k.as_str(), *v)).collect();
    assert_eq!(cat, [("a cat", 2), ("cat", 1), ("sitting", 1), ("standing", 1)]);
    // Images without a caption file count their class tokens, as kohya's do.
    assert_eq!(tags["10_sks dog"]["sks dog"], 1);
    assert_eq!(tags["1_dog"]["dog"], 1);
}

/// Images shrink by area averaging unless a subset names another filter (sd-scripts'
/// default): a 1-px checkerboard halved averages to flat grey; Lanczos gives other pixels,
/// nearest keeps black and white.
#[test]
fn images_shrink_by_area_unless_a_filter_is_named() {
    let d = tempfile::tempdir().unwrap();
    let path = d.path().join("board.png");
    RgbImage::from_fn(256, 256, |x, y| Rgb([if (x + y) % 2 == 0 { 255 } else { 0 }; 3])).save(&path).unwrap();
    caption(&path, "txt", "a board");
    let pixels = |interpolation: Option<sd_data::ResizeInterpolation>| {
        let mut c = config(d.path());
        c.subsets[0].resize_interpolation = interpolation;
        let ds = Dataset::open(&c).unwrap();
        let plan = ds.plan_epoch(0);
        let s = &plan[0].samples[0];
        assert_eq!(s.resized, (128, 128));
        assert_eq!(ds.resize_interpolation(s), interpolation.unwrap_or(sd_data::ResizeInterpolation::Area));
        ds.sample_pixels(s).unwrap().data
    };
    let spread = |v: &[f32]| v.iter().fold(f32::MIN, |m, x| m.max(*x)) - v.iter().fold(f32::MAX, |m, x| m.min(*x));
    let area = pixels(None);
    assert_eq!(spread(&area), 0.0, "each output is the mean of a 2x2 block");
    assert_ne!(pixels(Some(sd_data::ResizeInterpolation::Lanczos)), area);
    assert!(pixels(Some(sd_data::ResizeInterpolation::Nearest)).iter().all(|v| v.abs() > 0.99), "nearest keeps black and white");
}

/// A 64 × 64 image in `format` (PNG, JPEG, WebP or BMP), as bytes.
fn encoded(format: image::ImageFormat, seed: u8) -> Vec<u8> {
    let mut bytes = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img(64, 64, seed)).write_to(&mut bytes, format).unwrap();
    bytes.into_inner()
}

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config::with_cases(256))]

    /// A damaged image file (cut short, or bytes overwritten in its header or its data) in
    /// any of the formats read makes opening the dataset a typed error naming the file, or
    /// a dataset whose samples all load — never a panic.
    #[test]
    fn damaged_images_are_errors_naming_the_file(
        format in proptest::sample::select(vec![image::ImageFormat::Png, image::ImageFormat::Jpeg, image::ImageFormat::WebP, image::ImageFormat::Bmp]),
        cut in proptest::option::of(0usize..1000),
        writes in proptest::collection::vec((0usize..1000, 0usize..64, proptest::num::u8::ANY), 0..4),
    ) {
        let d = tempfile::tempdir().unwrap();
        let mut bytes = encoded(format, 3);
        for (at, header, value) in writes {
            // Half the writes land in the first 64 bytes, where the headers are.
            let i = if at % 2 == 0 { header } else { at * bytes.len() / 1000 };
            if let Some(b) = bytes.get_mut(i) {
                *b = value;
            }
        }
        if let Some(cut) = cut {
            bytes.truncate(bytes.len() * cut / 1000);
        }
        let path = d.path().join(format!("damaged.{}", format.extensions_str()[0]));
        fs::write(&path, &bytes).unwrap();
        caption(&path, "txt", "damaged");
        match Dataset::open(&config(d.path())) {
            Err(e) => proptest::prop_assert!(e.to_string().contains("damaged."), "{}", e),
            Ok(ds) => {
                for s in ds.plan_epoch(0).iter().flat_map(|b| b.samples.iter()) {
                    if let Err(e) = ds.sample_pixels(s) {
                        proptest::prop_assert!(e.to_string().contains("damaged."), "{}", e);
                    }
                }
            }
        }
    }
}

/// A repeat count that would plan more than a million samples per epoch is refused
/// before any plan is built, naming the folder; just under the limit opens.
#[test]
fn huge_repeat_counts_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let train = d.path().join("train");
    save(&train.join("1000000000_x/1.png"), 64, 64, 1);
    let err = expect_err(&config(&train)).to_string();
    assert!(err.contains("more than 1000000") && err.contains("1000000000_x") && err.contains("num_repeats"), "{err}");
    let ok = tempfile::tempdir().unwrap();
    let under = ok.path().join("train");
    save(&under.join("500000_x/1.png"), 64, 64, 1);
    save(&under.join("500000_x/2.png"), 64, 64, 2);
    assert_eq!(Dataset::open(&config(&under)).unwrap().samples_per_epoch(), sd_data::MAX_SAMPLES_PER_EPOCH);
}
