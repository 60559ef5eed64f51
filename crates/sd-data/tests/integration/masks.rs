//! Loss masks: alpha channels and mask folders (kohya's `alpha_mask` and masked loss),
//! their geometry, their errors, and their place in the latent cache.

use std::fs;
use std::path::{Path, PathBuf};

use image::{GrayImage, Luma, Rgb, RgbImage, Rgba, RgbaImage};
use proptest::prelude::*;
use sd_data::image_io::area_resize;
use sd_data::{
    BoxError, DataError, Dataset, DatasetConfig, HostTensor, LatentCache, LatentEncoder,
    MaskSource, Resolution, SubsetConfig,
};

/// A 64x64 fixed bucket: images of 64x64 are used as they are, larger ones are resized to
/// cover it and center-cropped.
fn config(dir: &Path, f: impl FnOnce(&mut SubsetConfig)) -> DatasetConfig {
    let mut subset = SubsetConfig::new(dir);
    subset.class_tokens = Some("thing".into());
    f(&mut subset);
    DatasetConfig {
        resolution: Resolution::square(64),
        enable_bucket: false,
        subsets: vec![subset],
        ..DatasetConfig::default()
    }
}

fn rgb(w: u32, h: u32, seed: u8) -> RgbImage {
    RgbImage::from_fn(w, h, |x, y| Rgb([(x as u8).wrapping_mul(3) ^ seed, (y as u8).wrapping_mul(5), seed]))
}

/// Alpha by column: 0 in the left quarter, 128 in the second, 255 in the right half.
fn alpha_of(x: u32, w: u32) -> u8 {
    match 4 * x / w {
        0 => 0,
        1 => 128,
        _ => 255,
    }
}

fn save_rgba(path: &Path, w: u32, h: u32) -> PathBuf {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    let base = rgb(w, h, 9);
    RgbaImage::from_fn(w, h, |x, y| {
        let p = base.get_pixel(x, y);
        Rgba([p[0], p[1], p[2], alpha_of(x, w)])
    })
    .save(path)
    .unwrap();
    path.to_path_buf()
}

fn save_rgb(path: &Path, w: u32, h: u32, seed: u8) -> PathBuf {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    rgb(w, h, seed).save(path).unwrap();
    path.to_path_buf()
}

fn save_mask(path: &Path, w: u32, h: u32, value: impl Fn(u32, u32) -> u8) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    GrayImage::from_fn(w, h, |x, y| Luma([value(x, y)])).save(path).unwrap();
}

/// The first plan's sample of image `name` (plans of epoch 0, flip as planned).
fn sample_of(ds: &Dataset, name: &str) -> sd_data::SamplePlan {
    ds.plan_epoch(0)
        .into_iter()
        .flat_map(|p| p.samples)
        .find(|s| ds.image_path(s.image).file_name().unwrap() == name)
        .unwrap()
}

#[test]
fn alpha_masks_follow_the_alpha_channel_and_leave_the_pixels_alone() {
    let dir = tempfile::tempdir().unwrap();
    save_rgba(&dir.path().join("a.png"), 64, 64);
    let masked = Dataset::open(&config(dir.path(), |s| s.alpha_mask = true)).unwrap();
    let plain = Dataset::open(&config(dir.path(), |_| {})).unwrap();
    assert!(masked.has_masks() && !plain.has_masks());
    assert_eq!(masked.images()[0].mask, Some(MaskSource::Alpha));

    let plan = &masked.plan_epoch(0)[0];
    let batch = masked.load_pixels(plan).unwrap();
    let masks = batch.masks.as_ref().unwrap();
    assert_eq!(masks.shape, vec![1, 1, 64, 64]);
    for y in [0, 31, 63] {
        for x in 0..64 {
            let want = f32::from(alpha_of(x as u32, 64)) / 255.0;
            assert_eq!(masks.data[y * 64 + x], want, "({x}, {y})");
        }
    }
    // The RGB pixels are what they are without the mask; plain batches carry none.
    let plain_batch = plain.load_pixels(&plain.plan_epoch(0)[0]).unwrap();
    assert_eq!(batch.pixels(), plain_batch.pixels());
    assert!(plain_batch.masks.is_none());
    // The per-sample mask is the batch's.
    let one = masked.sample_mask(&plan.samples[0]).unwrap().unwrap();
    assert_eq!(one.data, masks.data);
}

#[test]
fn flipped_samples_flip_their_masks() {
    let dir = tempfile::tempdir().unwrap();
    save_rgba(&dir.path().join("a.png"), 64, 64);
    let ds = Dataset::open(&config(dir.path(), |s| s.alpha_mask = true)).unwrap();
    let mut s = sample_of(&ds, "a.png");
    s.flip = false;
    let straight = ds.sample_mask(&s).unwrap().unwrap();
    s.flip = true;
    let flipped = ds.sample_mask(&s).unwrap().unwrap();
    for y in 0..64 {
        for x in 0..64 {
            assert_eq!(flipped.data[y * 64 + x], straight.data[y * 64 + 63 - x]);
        }
    }
    assert_ne!(straight.data, flipped.data);
}

#[test]
fn masks_are_resized_and_cropped_with_their_image() {
    // 192x128 resizes to 96x64 and the center crop keeps columns 16..80: the edge at column
    // 96 of the original (48 resized) lands on column 32 of the sample, for the pixels and
    // for the mask alike.
    let dir = tempfile::tempdir().unwrap();
    let img = RgbImage::from_fn(192, 128, |x, _| if x < 96 { Rgb([0, 0, 0]) } else { Rgb([255, 255, 255]) });
    fs::create_dir_all(dir.path().join("img")).unwrap();
    img.save(dir.path().join("img/a.png")).unwrap();
    save_mask(&dir.path().join("masks/a.png"), 192, 128, |x, _| if x < 96 { 0 } else { 255 });
    let ds = Dataset::open(&config(&dir.path().join("img"), |s| s.mask_dir = Some(dir.path().join("masks")))).unwrap();
    for flip in [false, true] {
        let mut s = sample_of(&ds, "a.png");
        s.flip = flip;
        let pixels = ds.sample_pixels(&s).unwrap();
        let mask = ds.sample_mask(&s).unwrap().unwrap();
        for x in (0..64).filter(|x| (*x as i32 - 32).abs() > 2) {
            let col = if flip { 63 - x } else { x };
            let dark = col < 32;
            assert_eq!(mask.data[10 * 64 + x], if dark { 0.0 } else { 1.0 }, "flip {flip} column {x}");
            let p = pixels.data[10 * 64 + x];
            assert!(if dark { p < -0.9 } else { p > 0.9 }, "flip {flip} column {x}: pixel {p}");
        }
    }
}

#[test]
fn masks_are_cropped_vertically_with_their_image() {
    // 128x192 resizes to 64x96 and the center crop keeps rows 16..80: the edge at row 96 of
    // the original (48 resized) lands on row 32. Each half of the mask also has its own
    // value left and right, which a flip swaps.
    let dir = tempfile::tempdir().unwrap();
    let value = |x: u32, y: u32| match (x < 64, y < 96) {
        (true, true) => 0,
        (false, true) => 60,
        (true, false) => 180,
        (false, false) => 255,
    };
    fs::create_dir_all(dir.path().join("img")).unwrap();
    RgbImage::from_fn(128, 192, |x, y| Rgb([value(x, y); 3])).save(dir.path().join("img/t.png")).unwrap();
    save_mask(&dir.path().join("masks/t.png"), 128, 192, value);
    let ds = Dataset::open(&config(&dir.path().join("img"), |s| s.mask_dir = Some(dir.path().join("masks")))).unwrap();
    for flip in [false, true] {
        let mut s = sample_of(&ds, "t.png");
        s.flip = flip;
        assert_eq!(s.crop, (0, 16));
        let pixels = ds.sample_pixels(&s).unwrap();
        let mask = ds.sample_mask(&s).unwrap().unwrap();
        for (y, x) in [(5, 5), (5, 58), (58, 5), (58, 58), (29, 10), (35, 50)] {
            let (sx, sy) = (if flip { 63 - x } else { x }, y + 16);
            let want = f32::from(value(2 * sx as u32, 2 * sy as u32)) / 255.0;
            assert!((mask.data[y * 64 + x] - want).abs() < 0.02, "flip {flip} ({x}, {y}): {} vs {want}", mask.data[y * 64 + x]);
            assert!(((pixels.data[y * 64 + x] + 1.0) / 2.0 - want).abs() < 0.05, "pixels, flip {flip} ({x}, {y})");
        }
    }
}

#[test]
fn alpha_masks_are_resized_with_their_image() {
    // 128x128 halves to the 64x64 bucket: the alpha quarters keep their places.
    let dir = tempfile::tempdir().unwrap();
    save_rgba(&dir.path().join("a.png"), 128, 128);
    let ds = Dataset::open(&config(dir.path(), |s| s.alpha_mask = true)).unwrap();
    let mask = ds.sample_mask(&sample_of(&ds, "a.png")).unwrap().unwrap();
    for (x, want) in [(4, 0.0), (24, 128.0 / 255.0), (40, 1.0), (60, 1.0)] {
        assert!((mask.data[30 * 64 + x] - want).abs() < 1e-3, "column {x}: {}", mask.data[30 * 64 + x]);
    }
}

#[test]
fn a_mask_serves_one_image_and_never_the_image_itself() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("train");
    save_rgb(&root.join("10_cat/a.png"), 64, 64, 1);
    save_rgb(&root.join("5_dog/a.png"), 64, 64, 2);
    save_mask(&dir.path().join("masks/a.png"), 64, 64, |_, _| 255);
    // Both images would fall back to the same top-level mask.
    let err = Dataset::open(&config(&root, |s| s.mask_dir = Some(dir.path().join("masks")))).unwrap_err();
    assert!(matches!(err, DataError::Mask { .. }) && err.to_string().contains("also the mask of") && err.to_string().contains("relative to image_dir"), "{err}");
    // The image folder as its own mask folder is refused; the folder above it holds no
    // mask for it (its images are not their own masks).
    let err = Dataset::open(&config(&root, |s| s.mask_dir = Some(root.clone()))).unwrap_err();
    assert!(err.to_string().contains("its own mask"), "{err}");
    let err = Dataset::open(&config(&root.join("10_cat"), |s| s.mask_dir = Some(root.clone()))).unwrap_err();
    assert!(matches!(&err, DataError::Mask { path, .. } if path.ends_with("10_cat/a.png")), "{err}");
}

/// Two images of one folder with one stem (`cat.png`, `cat.jpg`) find the same mask, as
/// masks are found by stem: the second is refused with advice that can be followed
/// (renaming one), not the mirrored-place advice, which cannot separate them.
#[test]
fn images_sharing_a_stem_are_told_to_rename_one() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("img");
    save_rgb(&root.join("cat.png"), 64, 64, 1);
    save_rgb(&root.join("cat.jpg"), 64, 64, 2);
    save_mask(&dir.path().join("masks/cat.png"), 64, 64, |_, _| 255);
    let err = Dataset::open(&config(&root, |s| s.mask_dir = Some(dir.path().join("masks")))).unwrap_err();
    let DataError::Mask { message, .. } = &err else { panic!("{err}") };
    assert!(message.contains("also the mask of") && message.contains("stem `cat`") && message.contains("rename one"), "{err}");
    assert!(!message.contains("relative to image_dir"), "{err}");
}

#[test]
fn mask_folders_mirror_the_image_folders_and_are_not_training_images() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("train");
    save_rgb(&root.join("10_cat/a.png"), 64, 64, 1);
    save_rgb(&root.join("10_cat/b.jpg"), 64, 64, 2);
    save_rgb(&root.join("5_dog/a.png"), 64, 64, 3);
    // Masks inside the training folder: mirrored for 10_cat/a, at the top for the others
    // (kohya's flat layout); they must not be read as training images.
    let masks = root.join("masks");
    save_mask(&masks.join("10_cat/a.png"), 64, 64, |_, _| 10);
    save_mask(&masks.join("b.png"), 64, 64, |_, _| 20);
    save_mask(&masks.join("a.webp.png"), 64, 64, |_, _| 0);
    save_mask(&masks.join("a.png"), 64, 64, |_, _| 30);
    let ds = Dataset::open(&config(&root, |s| s.mask_dir = Some(masks.clone()))).unwrap();
    assert_eq!(ds.images().len(), 3, "{:?}", ds.images().iter().map(|i| i.source.display_path()).collect::<Vec<_>>());
    let value = |folder: &str, name: &str| {
        let s = ds
            .plan_epoch(0)
            .into_iter()
            .flat_map(|p| p.samples)
            .find(|s| ds.image_path(s.image).ends_with(Path::new(folder).join(name)))
            .unwrap();
        ds.sample_mask(&s).unwrap().unwrap().data[0]
    };
    assert_eq!(value("10_cat", "a.png"), 10.0 / 255.0);
    assert_eq!(value("10_cat", "b.jpg"), 20.0 / 255.0);
    assert_eq!(value("5_dog", "a.png"), 30.0 / 255.0);
}

#[test]
fn a_missing_mask_names_the_image_and_where_it_was_looked_for() {
    let dir = tempfile::tempdir().unwrap();
    save_rgb(&dir.path().join("img/a.png"), 64, 64, 1);
    save_rgb(&dir.path().join("img/b.png"), 64, 64, 2);
    save_mask(&dir.path().join("masks/a.png"), 64, 64, |_, _| 255);
    let mut cfg = config(&dir.path().join("img"), |s| s.mask_dir = Some(dir.path().join("masks")));
    let err = Dataset::open(&cfg).unwrap_err();
    let DataError::Mask { path, message } = &err else { panic!("{err}") };
    assert!(path.ends_with("img/b.png"), "{err}");
    assert!(message.contains("masks") && message.contains("b.*"), "{err}");
    // With skip_bad_images the image is left out and listed.
    cfg.skip_bad_images = true;
    let ds = Dataset::open(&cfg).unwrap();
    assert_eq!(ds.images().len(), 1);
    assert!(matches!(ds.skipped(), [DataError::Mask { .. }]));
}

#[test]
fn a_mask_of_another_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    save_rgb(&dir.path().join("img/a.png"), 64, 64, 1);
    save_mask(&dir.path().join("masks/a.png"), 64, 32, |_, _| 255);
    let err = Dataset::open(&config(&dir.path().join("img"), |s| s.mask_dir = Some(dir.path().join("masks")))).unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, DataError::Mask { .. }) && text.contains("64x32") && text.contains("64x64"), "{text}");
}

#[test]
fn mask_options_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    save_rgb(&dir.path().join("a.png"), 64, 64, 1);
    let both = config(dir.path(), |s| {
        s.alpha_mask = true;
        s.mask_dir = Some(dir.path().to_path_buf());
    });
    assert!(matches!(Dataset::open(&both), Err(DataError::Config { key, .. }) if key == "subsets[0].mask_dir"));
    let missing = config(dir.path(), |s| s.mask_dir = Some(dir.path().join("nope")));
    let err = Dataset::open(&missing).unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
    // kohya's name for the folder is read too.
    let json: SubsetConfig = serde_json::from_str(r#"{"image_dir": "x", "conditioning_data_dir": "m"}"#).unwrap();
    assert_eq!(json.mask_dir, Some(PathBuf::from("m")));
}

#[test]
fn images_without_alpha_or_without_a_masked_subset_weigh_everything() {
    let dir = tempfile::tempdir().unwrap();
    save_rgb(&dir.path().join("masked/a.png"), 64, 64, 1);
    save_rgba(&dir.path().join("plain/b.png"), 64, 64);
    let mut cfg = config(&dir.path().join("masked"), |s| s.alpha_mask = true);
    let mut plain = SubsetConfig::new(dir.path().join("plain"));
    plain.class_tokens = Some("thing".into());
    cfg.subsets.push(plain);
    cfg.batch_size = 2;
    let ds = Dataset::open(&cfg).unwrap();
    let plan = &ds.plan_epoch(0)[0];
    assert_eq!(plan.samples.len(), 2);
    let masks = ds.load_pixels(plan).unwrap().masks.unwrap();
    // An RGB image under alpha_mask is opaque; an RGBA image of a subset without masks
    // is not masked by its alpha.
    assert!(masks.data.iter().all(|&v| v == 1.0));
}

/// 8x8 average pooling of the pixels' first channel into one latent channel.
struct Pool;

impl LatentEncoder for Pool {
    fn identity(&self) -> String {
        "pool".into()
    }

    fn encode(&self, pixels: &HostTensor) -> Result<HostTensor, BoxError> {
        let [n, c, h, w] = pixels.shape[..] else { return Err("rank".into()) };
        let mut out = Vec::new();
        for b in 0..n {
            let plane = &pixels.data[b * c * h * w..(b * c + 1) * h * w];
            out.extend(area_resize(plane, (h, w), (h / 8, w / 8)));
        }
        Ok(HostTensor::new(out, vec![n, 1, h / 8, w / 8])?)
    }
}

#[test]
fn the_latent_cache_keeps_masks_at_the_latent_size() {
    let dir = tempfile::tempdir().unwrap();
    save_rgba(&dir.path().join("img/a.png"), 64, 64);
    let cache = LatentCache::open(dir.path().join("cache")).unwrap();
    // A 64x32 bucket (the 64x64 image is cropped to rows 16..48), flipped and not.
    let wide = |c: &mut DatasetConfig| c.resolution = Resolution { width: 64, height: 32 };
    let plain = Dataset::open(&{
        let mut c = config(&dir.path().join("img"), |s| s.flip_aug = true);
        wide(&mut c);
        c
    })
    .unwrap();
    let masked = Dataset::open(&{
        let mut c = config(&dir.path().join("img"), |s| (s.alpha_mask, s.flip_aug) = (true, true));
        wide(&mut c);
        c
    })
    .unwrap();
    assert_eq!(cache.cache_dataset(&plain, &Pool, 4).unwrap().misses, 2);
    // The mask is part of the key: turning masks on caches again, with the mask.
    assert_eq!(cache.cache_dataset(&masked, &Pool, 4).unwrap().misses, 2);
    assert_eq!(cache.cache_dataset(&masked, &Pool, 4).unwrap().hits, 2);

    let quarters = [0.0, 0.0, 128.0 / 255.0, 128.0 / 255.0, 1.0, 1.0, 1.0, 1.0];
    for flip in [false, true] {
        let mut s = sample_of(&masked, "a.png");
        s.flip = flip;
        let plan = sd_data::BatchPlan { bucket: s.bucket, samples: vec![s] };
        let batch = cache.load_batch(&masked, &plan, "pool").unwrap();
        let masks = batch.masks.unwrap();
        assert_eq!(masks.shape, vec![1, 1, 4, 8]);
        let pixel_masks = masked.load_pixels(&plan).unwrap().masks.unwrap();
        assert_eq!(masks.data, area_resize(&pixel_masks.data, (32, 64), (4, 8)));
        // 0, 128/255 and 1 by column quarter, as the alpha channel; mirrored when flipped.
        let mut want = quarters;
        if flip {
            want.reverse();
        }
        for row in masks.data.chunks(8) {
            assert_eq!(row, want, "flip {flip}");
        }
    }
    assert!(cache.load_batch(&plain, &plain.plan_epoch(0)[0], "pool").unwrap().masks.is_none());
}

#[test]
fn area_resize_averages_pytorch_s_adaptive_windows() {
    // torch.nn.functional.adaptive_avg_pool1d([1, 2, 3], 2) = [1.5, 2.5]: the windows
    // [0, 2) and [1, 3) overlap.
    assert_eq!(area_resize(&[1.0, 2.0, 3.0], (1, 3), (1, 2)), vec![1.5, 2.5]);
    assert_eq!(area_resize(&[1.0, 2.0, 3.0, 4.0, 5.0], (5, 1), (2, 1)), vec![2.0, 4.0]);
    assert_eq!(area_resize(&[4.0], (1, 1), (2, 3)), vec![4.0; 6]);
}

proptest! {
    /// With an integer factor, area resampling is block averaging: it keeps the plane's
    /// mean and each output is its block's mean.
    #[test]
    fn area_resize_by_an_integer_factor_averages_blocks(
        (oh, ow, f, plane) in (1usize..5, 1usize..5, 1usize..5).prop_flat_map(|(oh, ow, f)| {
            (Just(oh), Just(ow), Just(f), proptest::collection::vec(0.0f32..1.0, oh * f * ow * f))
        })
    ) {
        let (h, w) = (oh * f, ow * f);
        let out = area_resize(&plane, (h, w), (oh, ow));
        for i in 0..oh {
            for j in 0..ow {
                let block: f32 = (0..f).flat_map(|dy| (0..f).map(move |dx| (dy, dx)))
                    .map(|(dy, dx)| plane[(i * f + dy) * w + j * f + dx]).sum();
                prop_assert!((out[i * ow + j] - block / (f * f) as f32).abs() < 1e-5);
            }
        }
        let mean = |v: &[f32]| v.iter().map(|&x| f64::from(x)).sum::<f64>() / v.len() as f64;
        prop_assert!((mean(&out) - mean(&plane)).abs() < 1e-5);
    }
}
