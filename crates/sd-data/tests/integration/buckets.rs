//! Aspect-ratio bucketing: bucket tables, assignment, resize / crop geometry.

use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use sd_data::bucket::crop_offset;
use sd_data::{make_bucket_resolutions, BucketManager};

/// Output of kohya sd-scripts `library/model_util.py::make_bucket_resolutions` (run in Python on
/// the upstream function) for the arguments in each case.
#[test]
fn bucket_tables_match_kohya() {
    type Case = ((u32, u32), u32, u32, u32, &'static [(u32, u32)]);
    let cases: [Case; 4] = [
        (
            (512, 512),
            256,
            1024,
            64,
            &[
                (256, 832),
                (256, 896),
                (256, 960),
                (256, 1024),
                (320, 704),
                (320, 768),
                (384, 640),
                (448, 576),
                (512, 512),
                (576, 448),
                (640, 384),
                (704, 320),
                (768, 320),
                (832, 256),
                (896, 256),
                (960, 256),
                (1024, 256),
            ],
        ),
        (
            (1024, 1024),
            256,
            1024,
            64,
            &[
                (256, 1024),
                (320, 1024),
                (384, 1024),
                (448, 1024),
                (512, 1024),
                (576, 1024),
                (640, 1024),
                (704, 1024),
                (768, 1024),
                (832, 1024),
                (896, 1024),
                (960, 1024),
                (1024, 256),
                (1024, 320),
                (1024, 384),
                (1024, 448),
                (1024, 512),
                (1024, 576),
                (1024, 640),
                (1024, 704),
                (1024, 768),
                (1024, 832),
                (1024, 896),
                (1024, 960),
                (1024, 1024),
            ],
        ),
        (
            (768, 512),
            320,
            960,
            64,
            &[
                (320, 960),
                (384, 896),
                (384, 960),
                (448, 832),
                (512, 704),
                (512, 768),
                (576, 576),
                (576, 640),
                (640, 576),
                (704, 512),
                (768, 512),
                (832, 448),
                (896, 384),
                (960, 320),
                (960, 384),
            ],
        ),
        (
            (64, 64),
            32,
            128,
            16,
            &[
                (32, 96),
                (32, 112),
                (32, 128),
                (48, 80),
                (64, 64),
                (80, 48),
                (96, 32),
                (112, 32),
                (128, 32),
            ],
        ),
    ];
    for (reso, min, max, steps, expected) in cases {
        assert_eq!(
            make_bucket_resolutions(reso, min, max, steps),
            expected,
            "{reso:?} {min} {max} {steps}"
        );
    }
    // sd-scripts' current function (pixel area, heights below `min_size` left out): a
    // large `max_bucket_reso` adds no bucket thinner than `min_bucket_reso` (the block-area
    // version without the check made 2048x128 here), and a resolution that is no multiple
    // of the steps takes its area in pixels (448x1984: the block version gave 448x1856).
    let wide = make_bucket_resolutions((512, 512), 256, 2048, 64);
    assert_eq!(wide, make_bucket_resolutions((512, 512), 256, 1024, 64));
    let odd = make_bucket_resolutions((1000, 1000), 256, 2048, 64);
    assert_eq!(odd.len(), 41);
    for b in [(256, 2048), (448, 1984), (448, 2048), (512, 1792), (960, 960), (960, 1024), (2048, 256)] {
        assert!(odd.contains(&b), "{b:?}: {odd:?}");
    }
    assert!(!odd.contains(&(448, 1856)) && !odd.contains(&(1024, 1024)), "{odd:?}");
}

#[test]
fn kohya_examples_assign_expected_buckets() {
    let m = BucketManager::predefined((512, 512), 256, 1024, 64);
    // 3:2 landscape (1.5): 640x384 (1.667, error 0.167) beats 576x448 (1.286, error 0.214).
    let a = m.select((1536, 1024)).unwrap();
    assert_eq!(a.bucket, (640, 384));
    // The image is narrower than the bucket's ratio, so the width is matched (640 / 1536 scale)
    // and the height, int(1024 * 640 / 1536 + 0.5) = 427, is cropped to 384.
    assert_eq!(a.resized, (640, 427));
    // An image already at a bucket size keeps it and is not resized.
    let b = m.select((448, 576)).unwrap();
    assert_eq!((b.bucket, b.resized), ((448, 576), (448, 576)));
    // Square images go to the square bucket.
    assert_eq!(m.select((300, 300)).unwrap().bucket, (512, 512));
}

fn ar(r: (u32, u32)) -> f64 {
    f64::from(r.0) / f64::from(r.1)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn buckets_are_step_aligned_and_within_area(side in 4u32..24, min_k in 1u32..6, extra in 0u32..12) {
        let steps = 64;
        let reso = (side * steps / 2, side * steps / 2);
        let (min, max) = (min_k * steps, (min_k + extra) * steps);
        let buckets = make_bucket_resolutions(reso, min, max, steps);
        let area = u64::from(reso.0) * u64::from(reso.1);
        for &(w, h) in &buckets {
            prop_assert!(w % steps == 0 && h % steps == 0);
            prop_assert!(u64::from(w) * u64::from(h) <= area);
            // Every bucket but the square one keeps both sides within min..=max.
            prop_assert!(w == h || (w.min(h) >= min && w.max(h) <= max), "{:?} outside {}..={}", (w, h), min, max);
        }
        // Symmetric under transposition.
        for &(w, h) in &buckets {
            prop_assert!(buckets.contains(&(h, w)) || w == h);
        }
    }

    /// The chosen bucket has the smallest aspect-ratio error of all buckets; the resized image
    /// covers it with one side matching; the error is bounded by half the largest gap between
    /// neighbouring bucket ratios for images inside the table's ratio range.
    #[test]
    fn assignment_is_nearest_aspect_and_covers(w in 16u32..4000, h in 16u32..4000) {
        let m = BucketManager::predefined((512, 512), 256, 1024, 64);
        let a = m.select((w, h)).unwrap();
        let img_ar = f64::from(w) / f64::from(h);
        let err = (ar(a.bucket) - img_ar).abs();
        prop_assert!((a.ar_error - (ar(a.bucket) - img_ar)).abs() < 1e-12);
        if !m.buckets().contains(&(w, h)) {
            for &b in m.buckets() {
                prop_assert!(err <= (ar(b) - img_ar).abs() + 1e-12);
            }
        }
        prop_assert!(a.resized.0 >= a.bucket.0 && a.resized.1 >= a.bucket.1);
        prop_assert!(a.resized.0 == a.bucket.0 || a.resized.1 == a.bucket.1);
        // Resizing keeps the aspect ratio up to rounding of one pixel per side.
        let resized_ar = ar(a.resized);
        prop_assert!((resized_ar - img_ar).abs() <= img_ar * (1.0 / f64::from(a.resized.0.min(a.resized.1))) * 2.0 + 1e-9);
        let mut ars: Vec<f64> = m.buckets().iter().map(|&b| ar(b)).collect();
        ars.sort_by(f64::total_cmp);
        let max_gap = ars.windows(2).map(|p| p[1] - p[0]).fold(0.0, f64::max);
        if img_ar >= ars[0] && img_ar <= ars[ars.len() - 1] {
            prop_assert!(err <= max_gap / 2.0 + 1e-12, "err {} gap {}", err, max_gap);
        }
    }

    /// No-upscale buckets never exceed the image or the target area (in step blocks), are step
    /// aligned, and keep the aspect ratio within one step per side.
    #[test]
    fn no_upscale_never_enlarges(w in 64u32..3000, h in 64u32..3000) {
        let m = BucketManager::no_upscale((512, 512), 64);
        let Some(a) = m.select((w, h)) else {
            // Only extreme ratios can round a side down to zero.
            prop_assert!(w / h > 8 || h / w > 8);
            return Ok(());
        };
        prop_assert!(a.bucket.0 % 64 == 0 && a.bucket.1 % 64 == 0);
        prop_assert!(a.bucket.0 <= a.resized.0 && a.bucket.1 <= a.resized.1);
        if u64::from(w) * u64::from(h) <= 512 * 512 {
            prop_assert_eq!(a.resized, (w, h));
        } else {
            prop_assert!(a.resized.0 <= w + 1 && a.resized.1 <= h + 1);
            prop_assert!(u64::from(a.bucket.0) * u64::from(a.bucket.1) <= 512 * 512 + 64 * 1024);
        }
        let bound = 64.0 / f64::from(a.bucket.0.min(a.bucket.1)) + 64.0 / f64::from(a.bucket.0.max(a.bucket.1));
        prop_assert!((ar(a.bucket) / (f64::from(w) / f64::from(h)) - 1.0).abs() <= bound * 1.01 + 0.01);
    }

    #[test]
    fn crops_stay_inside(rw in 64u32..2000, rh in 64u32..2000, bw in 1u32..64, bh in 1u32..64, seed: u64) {
        let (resized, bucket) = ((rw, rh), (bw, bh));
        let c = crop_offset::<ChaCha8Rng>(resized, bucket, None);
        prop_assert_eq!(c, ((rw - bw) / 2, (rh - bh) / 2));
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let r = crop_offset(resized, bucket, Some(&mut rng));
        prop_assert!(r.0 + bw <= rw && r.1 + bh <= rh);
    }
}

#[test]
fn fixed_bucket_covers_and_crops() {
    let m = BucketManager::fixed((512, 512));
    let a = m.select((1000, 500)).unwrap();
    assert_eq!(a.bucket, (512, 512));
    assert_eq!(a.resized, (1024, 512));
}
