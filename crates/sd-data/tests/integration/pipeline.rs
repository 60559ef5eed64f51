//! Latent / text caches (hit, miss, invalidation), background loading, pixel preparation and demo data.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use burn::backend::Flex;
use image::{Rgb, RgbImage};
use sd_data::image_io::ColorAug;
use sd_data::{
    demo, BoxError, DataError, Dataset, DatasetConfig, HostTensor, LatentCache, LatentEncoder,
    LoaderOptions, SamplePlan, SubsetConfig, TextEmbeddingCache, TextEncoder,
};

/// A stand-in VAE: 8x8 average pooling of RGB plus a channel mixing in a per-identity offset.
struct PoolEncoder {
    identity: String,
    calls: AtomicUsize,
    images: AtomicUsize,
}

impl PoolEncoder {
    fn new(identity: &str) -> Self {
        Self {
            identity: identity.into(),
            calls: AtomicUsize::new(0),
            images: AtomicUsize::new(0),
        }
    }
}

impl LatentEncoder for PoolEncoder {
    fn identity(&self) -> String {
        self.identity.clone()
    }

    fn encode(&self, pixels: &HostTensor) -> Result<HostTensor, BoxError> {
        let [n, c, h, w] = pixels.shape[..] else {
            return Err("expected rank 4".into());
        };
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.images.fetch_add(n, Ordering::SeqCst);
        let (lh, lw) = (h / 8, w / 8);
        let offset = self.identity.len() as f32;
        let mut out = vec![0.0; n * 4 * lh * lw];
        for b in 0..n {
            for y in 0..lh {
                for x in 0..lw {
                    let mut sum = [0.0f32; 3];
                    for (ch, s) in sum.iter_mut().enumerate().take(c) {
                        for dy in 0..8 {
                            for dx in 0..8 {
                                *s += pixels.data[((b * c + ch) * h + y * 8 + dy) * w + x * 8 + dx];
                            }
                        }
                    }
                    for ch in 0..3 {
                        out[((b * 4 + ch) * lh + y) * lw + x] = sum[ch] / 64.0;
                    }
                    out[((b * 4 + 3) * lh + y) * lw + x] = offset;
                }
            }
        }
        Ok(HostTensor::new(out, vec![n, 4, lh, lw])?)
    }
}

fn demo_dataset(dir: &Path, count: usize, f: impl FnOnce(&mut DatasetConfig)) -> Dataset {
    if !dir.join("demo_000.png").exists() {
        demo::write(
            dir,
            &demo::DemoConfig {
                count,
                ..Default::default()
            },
        )
        .unwrap();
    }
    let mut cfg = DatasetConfig::demo(dir);
    cfg.subsets[0].flip_aug = true;
    f(&mut cfg);
    Dataset::open(&cfg).unwrap()
}

#[test]
fn latent_cache_hits_misses_and_invalidation() {
    let data = tempfile::tempdir().unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let cache = LatentCache::open(cache_dir.path()).unwrap();
    let ds = demo_dataset(data.path(), 6, |_| {});
    let vae = PoolEncoder::new("vae-a");

    let first = cache.cache_dataset(&ds, &vae, 4).unwrap();
    assert_eq!((first.hits, first.misses), (0, 12)); // 6 images x {plain, flipped}
    assert_eq!(vae.images.load(Ordering::SeqCst), 12);
    // Batches are per bucket and at most 4: 3 buckets of 4 variants each.
    assert_eq!(vae.calls.load(Ordering::SeqCst), 3);

    // Cached entries equal encoding the sample directly.
    let a = ds.assignment(1);
    let s = SamplePlan {
        image: 1,
        caption: String::new(),
        bucket: a.bucket,
        resized: a.resized,
        crop: sd_data::bucket::crop_offset::<rand_chacha::ChaCha8Rng>(a.resized, a.bucket, None),
        flip: true,
        color: None,
        loss_weight: 1.0,
        diff_output_preservation: false,
    };
    let direct = PoolEncoder::new("vae-a")
        .encode(&ds.sample_pixels(&s).unwrap())
        .unwrap();
    let key = sd_data::LatentKey::for_sample(&ds, &s, "vae-a");
    assert_eq!(cache.load(&key).unwrap(), direct);

    // Second run: all hits, the encoder is not called.
    let again = cache.cache_dataset(&ds, &vae, 4).unwrap();
    assert_eq!((again.hits, again.misses), (12, 0));
    assert_eq!(vae.calls.load(Ordering::SeqCst), 3);

    // A different VAE identity misses everything.
    let other = PoolEncoder::new("vae-b");
    assert_eq!(cache.cache_dataset(&ds, &other, 4).unwrap().misses, 12);

    // Fewer variants (no flips) are all hits.
    let no_flip = demo_dataset(data.path(), 6, |c| c.subsets[0].flip_aug = false);
    assert_eq!(
        cache.cache_dataset(&no_flip, &vae, 4).unwrap(),
        sd_data::CacheStats { hits: 6, misses: 0 }
    );

    // Changing one image's content invalidates only its two entries.
    let path = ds.image_path(2);
    let mut img = image::open(&path).unwrap().into_rgb8();
    img.put_pixel(3, 3, Rgb([0, 255, 0]));
    img.save(&path).unwrap();
    let changed = demo_dataset(data.path(), 6, |_| {});
    assert_eq!(
        cache.cache_dataset(&changed, &vae, 4).unwrap(),
        sd_data::CacheStats {
            hits: 10,
            misses: 2
        }
    );

    // New bucket geometry (another resolution) invalidates every entry whose resize changed.
    let bigger = demo_dataset(data.path(), 6, |c| {
        c.resolution = sd_data::Resolution::square(96)
    });
    assert_eq!(cache.cache_dataset(&bigger, &vae, 4).unwrap().misses, 12);

    // A damaged file or one holding another key's latent is a miss, and is rewritten.
    let victim = cache.path(&key);
    fs::write(&victim, b"garbage").unwrap();
    let other_key = sd_data::LatentKey {
        flip: false,
        ..key.clone()
    };
    assert!(cache.load(&key).is_none());
    assert_eq!(
        cache.cache_dataset(&ds, &vae, 4).unwrap(),
        sd_data::CacheStats {
            hits: 11,
            misses: 1
        }
    );
    assert_eq!(cache.load(&key).unwrap(), direct);
    fs::copy(cache.path(&other_key), &victim).unwrap();
    assert!(cache.load(&key).is_none());
}

#[test]
fn latent_loader_reads_cache_in_plan_order() {
    let data = tempfile::tempdir().unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let ds = Arc::new(demo_dataset(data.path(), 8, |c| c.batch_size = 3));
    let cache = LatentCache::open(cache_dir.path()).unwrap();
    let vae = PoolEncoder::new("vae");

    // Before caching: a typed error naming the missing cache file.
    let mut early = ds.latent_loader(0, cache.clone(), "vae".into(), LoaderOptions::default());
    match early.next().unwrap() {
        Err(DataError::Cache { path, message }) => {
            assert!(path.starts_with(cache_dir.path()));
            assert!(message.contains("demo_"), "{message}");
        }
        other => panic!("unexpected {other:?}"),
    }
    drop(early);

    cache.cache_dataset(&ds, &vae, 8).unwrap();
    let plans = ds.plan_epoch(2);
    let latents: Vec<_> = ds
        .latent_loader(
            2,
            cache.clone(),
            "vae".into(),
            LoaderOptions {
                workers: 3,
                prefetch: 1,
            },
        )
        .map(Result::unwrap)
        .collect();
    assert_eq!(latents.len(), plans.len());
    for (batch, plan) in latents.iter().zip(&plans) {
        let pixels = ds.load_pixels(plan).unwrap();
        let expected = vae.encode(pixels.pixels().unwrap()).unwrap();
        assert_eq!(batch.latents().unwrap(), &expected);
        assert_eq!(batch.captions, pixels.captions);
        assert_eq!(batch.flipped, pixels.flipped);
        let t = batch.to_tensor::<Flex>(&Default::default()).unwrap();
        assert_eq!(t.dims()[..2], [plan.samples.len(), 4]);
    }
}

#[test]
fn random_crop_cannot_be_latent_cached() {
    let data = tempfile::tempdir().unwrap();
    let ds = demo_dataset(data.path(), 3, |c| c.subsets[0].random_crop = true);
    let cache = LatentCache::open(data.path().join("cache")).unwrap();
    let e = cache
        .cache_dataset(&ds, &PoolEncoder::new("v"), 2)
        .unwrap_err();
    assert!(
        matches!(e, DataError::Config { ref key, .. } if key == "random_crop"),
        "{e}"
    );
}

/// Colour-changed samples are neither cached nor served from a cache filled without the
/// option.
#[test]
fn color_aug_cannot_be_latent_cached() {
    let data = tempfile::tempdir().unwrap();
    let ds = demo_dataset(data.path(), 3, |c| c.subsets[0].color_aug = true);
    let cache = LatentCache::open(data.path().join("cache")).unwrap();
    let e = cache.cache_dataset(&ds, &PoolEncoder::new("v"), 2).unwrap_err();
    assert!(matches!(e, DataError::Config { ref key, .. } if key == "color_aug"), "{e}");
    let plain = demo_dataset(data.path(), 3, |_| {});
    cache.cache_dataset(&plain, &PoolEncoder::new("v"), 2).unwrap();
    let mut plan = plain.plan_epoch(0).remove(0);
    assert!(cache.load_batch(&plain, &plan, "v").is_ok());
    plan.samples[0].color = Some(ColorAug::Gamma(1.05));
    let e = cache.load_batch(&plain, &plan, "v").unwrap_err();
    assert!(matches!(e, DataError::Config { ref key, .. } if key == "color_aug"), "{e}");
}

struct ByteEncoder {
    identity: String,
    captions: AtomicUsize,
}

impl TextEncoder for ByteEncoder {
    fn identity(&self) -> String {
        self.identity.clone()
    }

    fn encode(&self, captions: &[String]) -> Result<Vec<BTreeMap<String, HostTensor>>, BoxError> {
        self.captions.fetch_add(captions.len(), Ordering::SeqCst);
        captions
            .iter()
            .map(|c| {
                let v: Vec<f32> = c.bytes().map(f32::from).collect();
                let pooled = HostTensor::new(vec![v.iter().sum()], vec![1, 1])?;
                let n = v.len();
                let hidden = HostTensor::new(v, vec![1, n, 1])?;
                Ok(BTreeMap::from([
                    ("hidden_states".to_string(), hidden),
                    ("pooled".to_string(), pooled),
                ]))
            })
            .collect()
    }
}

#[test]
fn text_embedding_cache() {
    let data = tempfile::tempdir().unwrap();
    let cache = TextEmbeddingCache::open(data.path().join(".text-cache")).unwrap();
    let ds = demo_dataset(data.path(), 10, |c| {
        c.subsets[0].trigger_word = Some("trig".into())
    });
    assert!(ds.captions_are_fixed());
    let unique: std::collections::BTreeSet<String> = (0..10).map(|i| ds.fixed_caption(i)).collect();
    assert!(unique.iter().all(|c| c.starts_with("trig, a ")));
    let enc = ByteEncoder {
        identity: "clip-l".into(),
        captions: AtomicUsize::new(0),
    };
    let s1 = cache.cache_dataset(&ds, &enc, 4).unwrap();
    assert_eq!((s1.hits, s1.misses), (0, unique.len()));
    let s2 = cache.cache_dataset(&ds, &enc, 4).unwrap();
    assert_eq!((s2.hits, s2.misses), (unique.len(), 0));
    assert_eq!(enc.captions.load(Ordering::SeqCst), unique.len());
    let first = unique.iter().next().unwrap();
    let got = cache.load(first, "clip-l").unwrap();
    assert_eq!(
        got,
        enc.encode(std::slice::from_ref(first)).unwrap().remove(0)
    );
    assert!(cache.load(first, "clip-g").is_none());
    assert!(cache.load("a caption never seen", "clip-l").is_none());

    let shuffled = demo_dataset(data.path(), 10, |c| c.subsets[0].shuffle_caption = true);
    assert!(!shuffled.captions_are_fixed());
    assert!(matches!(
        cache.cache_dataset(&shuffled, &enc, 4),
        Err(DataError::Config { .. })
    ));
}

#[test]
fn background_loader_matches_synchronous_loading() {
    let data = tempfile::tempdir().unwrap();
    let ds = Arc::new(demo_dataset(data.path(), 9, |c| {
        c.batch_size = 2;
        c.subsets[0].random_crop = true;
        c.subsets[0].num_repeats = Some(2);
    }));
    let plans = ds.plan_epoch(1);
    let expected: Vec<_> = plans.iter().map(|p| ds.load_pixels(p).unwrap()).collect();
    for workers in [1, 3] {
        let got: Vec<_> = ds
            .pixel_loader(
                1,
                LoaderOptions {
                    workers,
                    prefetch: 2,
                },
            )
            .map(Result::unwrap)
            .collect();
        assert_eq!(got, expected, "workers {workers}");
    }
    for (b, p) in expected.iter().zip(&plans) {
        let px = b.pixels().unwrap();
        assert_eq!(
            px.shape,
            [p.samples.len(), 3, p.bucket.1 as usize, p.bucket.0 as usize]
        );
        assert!(px.data.iter().all(|v| (-1.0..=1.0).contains(v)));
        assert_eq!(b.target_sizes_hw[0], (p.bucket.1, p.bucket.0));
        assert_eq!(b.loss_weights.len(), p.samples.len());
    }
    // Dropping a loader mid-epoch stops its workers.
    let mut partial = ds.pixel_loader(
        1,
        LoaderOptions {
            workers: 2,
            prefetch: 1,
        },
    );
    assert!(partial.next().unwrap().is_ok());
    drop(partial);
}

#[test]
fn pixels_are_exact_for_unresized_images_and_flip_mirrors() {
    let image = RgbImage::from_fn(64, 64, |x, y| {
        Rgb([(x * 4) as u8, (y * 4) as u8, ((x + y) * 2) as u8])
    });
    let cfg = DatasetConfig::demo("");
    let ds = Dataset::from_memory(
        &cfg,
        SubsetConfig::default(),
        vec![("grad".into(), image.clone(), "c".into())],
    )
    .unwrap();
    let a = *ds.assignment(0);
    assert_eq!((a.bucket, a.resized), ((64, 64), (64, 64)));
    let mut s = SamplePlan {
        image: 0,
        caption: String::new(),
        bucket: a.bucket,
        resized: a.resized,
        crop: (0, 0),
        flip: false,
        color: None,
        loss_weight: 1.0,
        diff_output_preservation: false,
    };
    let plain = ds.sample_pixels(&s).unwrap();
    for (c, y, x) in [(0, 0, 0), (1, 10, 20), (2, 63, 63), (0, 5, 40)] {
        let p = image.get_pixel(x as u32, y as u32)[c];
        assert_eq!(
            plain.data[(c * 64 + y) * 64 + x],
            f32::from(p) / 127.5 - 1.0
        );
    }
    s.flip = true;
    let flipped = ds.sample_pixels(&s).unwrap();
    for c in 0..3 {
        for y in 0..64 {
            for x in 0..64 {
                assert_eq!(
                    flipped.data[(c * 64 + y) * 64 + x],
                    plain.data[(c * 64 + y) * 64 + 63 - x]
                );
            }
        }
    }
    // kohya's color_aug changes each pixel's colour, before the flip.
    for aug in [ColorAug::Hue(-7.5), ColorAug::Gamma(1.04)] {
        s.color = Some(aug);
        let changed = ds.sample_pixels(&s).unwrap();
        for (c, y, x) in [(0, 0, 0), (1, 10, 20), (2, 63, 63), (0, 5, 40)] {
            let want = aug.apply(image.get_pixel(63 - x as u32, y as u32).0)[c] / 127.5 - 1.0;
            assert!((changed.data[(c * 64 + y) * 64 + x] - want).abs() < 1e-6, "{aug:?} at {c},{y},{x}");
        }
        assert_ne!(changed.data, flipped.data);
    }
    s.color = None;
    // Hand-made plans that do not fit are errors, not panics.
    let outside = SamplePlan {
        crop: (10, 0),
        ..s.clone()
    };
    assert!(
        matches!(ds.sample_pixels(&outside), Err(DataError::Config { ref key, .. }) if key == "sample_plan")
    );
    let missing = SamplePlan {
        image: 99,
        ..s.clone()
    };
    assert!(matches!(
        ds.sample_pixels(&missing),
        Err(DataError::Config { .. })
    ));
    // Crop conditioning mirrors the left offset when flipped.
    let wide = SamplePlan {
        resized: (100, 64),
        crop: (10, 0),
        flip: true,
        ..s.clone()
    };
    assert_eq!(wide.crop_top_left(), (0, 100 - 10 - 64));
    assert_eq!(
        SamplePlan {
            flip: false,
            ..wide
        }
        .crop_top_left(),
        (0, 10)
    );
}

#[test]
fn host_tensor_conversions() {
    let t = HostTensor::new((0..24).map(|v| v as f32).collect(), vec![2, 3, 2, 2]).unwrap();
    let x = t.to_tensor::<Flex, 4>(&Default::default()).unwrap();
    assert_eq!(HostTensor::from_tensor(x).unwrap(), t);
    assert!(matches!(
        t.to_tensor::<Flex, 3>(&Default::default()),
        Err(DataError::Shape { .. })
    ));
    assert!(matches!(
        HostTensor::new(vec![1.0], vec![2]),
        Err(DataError::Shape { .. })
    ));
    let rows: Vec<_> = (0..2).map(|i| t.row(i).unwrap()).collect();
    assert_eq!(HostTensor::stack_rows(&rows).unwrap(), t);
    assert!(t.row(2).is_none());
}

#[test]
fn demo_data_is_deterministic_and_styled() {
    let cfg = demo::DemoConfig {
        count: 9,
        ..Default::default()
    };
    let a = demo::generate(&cfg);
    assert_eq!(a, demo::generate(&cfg));
    let b = demo::generate(&demo::DemoConfig {
        seed: 1,
        ..cfg.clone()
    });
    assert_ne!(a, b);
    let sizes: std::collections::BTreeSet<_> = a.iter().map(|s| s.image.dimensions()).collect();
    assert_eq!(
        sizes.into_iter().collect::<Vec<_>>(),
        [(64, 64), (64, 96), (96, 64)]
    );
    for s in &a {
        assert!(
            s.caption.starts_with("a ") && s.caption.ends_with(", demostyle"),
            "{}",
            s.caption
        );
        // The shared style: dark outline pixels are present in every image.
        assert!(
            s.image.pixels().any(|p| p.0.iter().all(|&v| v < 60)),
            "{} has no outline",
            s.name
        );
    }
    // Writing twice gives identical files, and the folder scans back to the same data.
    let d1 = tempfile::tempdir().unwrap();
    let d2 = tempfile::tempdir().unwrap();
    demo::write(d1.path(), &cfg).unwrap();
    demo::write(d2.path(), &cfg).unwrap();
    for s in &a {
        let f = format!("{}.png", s.name);
        assert_eq!(
            fs::read(d1.path().join(&f)).unwrap(),
            fs::read(d2.path().join(&f)).unwrap()
        );
    }
    let ds = Dataset::open(&DatasetConfig::demo(d1.path())).unwrap();
    assert_eq!(ds.images().len(), 9);
    for (i, s) in a.iter().enumerate() {
        assert_eq!(ds.images()[i].caption, s.caption);
        assert_eq!(ds.decode(i).unwrap(), s.image);
    }
    // The demo preset gives the three aspect ratios their own buckets.
    let table: Vec<_> = ds.bucket_table().into_iter().collect();
    assert_eq!(table, [((48, 80), 3), ((64, 64), 3), ((80, 48), 3)]);
}

/// Workers run ahead of the consumer by exactly `prefetch` queued batches plus one in flight each.
#[test]
fn loader_prefetches_ahead_and_is_bounded() {
    use sd_data::{Batch, BatchData, BatchPlan, Loader};
    let loaded = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&loaded);
    let plans: Vec<BatchPlan> = (0..10)
        .map(|i| BatchPlan {
            bucket: (i, 1),
            samples: vec![],
        })
        .collect();
    let mut loader = Loader::spawn(
        plans,
        LoaderOptions {
            workers: 2,
            prefetch: 1,
        },
        move |plan| {
            counter.fetch_add(1, Ordering::SeqCst);
            Ok(Batch {
                data: BatchData::Pixels(HostTensor::new(
                    vec![],
                    vec![0, 3, 1, plan.bucket.0 as usize],
                )?),
                captions: vec![],
                loss_weights: vec![],
                original_sizes_hw: vec![],
                crop_top_lefts: vec![],
                target_sizes_hw: vec![],
                flipped: vec![],
                images: vec![],
                masks: None,
            })
        },
    );
    assert_eq!(
        loader.next().unwrap().unwrap().pixels().unwrap().shape[3],
        0
    );
    // Consumed batch 0; batches 1..=4 are queued or waiting to be queued.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while loaded.load(Ordering::SeqCst) < 5 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(std::time::Duration::from_millis(50));
    assert_eq!(loaded.load(Ordering::SeqCst), 5);
    let rest: Vec<usize> = loader
        .map(|b| b.unwrap().pixels().unwrap().shape[3])
        .collect();
    assert_eq!(rest, (1..10).collect::<Vec<_>>());
    assert_eq!(loaded.load(Ordering::SeqCst), 10);
}
