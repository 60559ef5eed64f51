//! Resizing adapters (`lora_core::resize`) against the definition: the singular values of
//! the full update `ΔW`, computed directly from the dense matrix, and Eckart–Young (the
//! best rank-k approximation's error is the norm of the dropped singular values).

use lora_core::resize::{resize_adapter, resize_set, RankRule, ResizeSettings};
use lora_core::{AdapterKey, AdapterSet, Component, HostTensor, LoraWeights};
use nalgebra::DMatrix;
use proptest::prelude::*;

/// An adapter with the given shapes and values from `seed` (a small LCG: the values only
/// need to be varied and reproducible). `kernel` > 1 makes a conv adapter.
fn adapter(rank: usize, d_in: usize, d_out: usize, kernel: usize, alpha: f32, seed: u64) -> LoraWeights {
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut next = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 33) as f32 / (1u64 << 31) as f32) - 0.5
    };
    let (down_shape, up_shape) = if kernel > 1 {
        (vec![rank, d_in, kernel, kernel], vec![d_out, rank, 1, 1])
    } else {
        (vec![rank, d_in], vec![d_out, rank])
    };
    let fill = |shape: Vec<usize>, next: &mut dyn FnMut() -> f32| {
        let n = shape.iter().product();
        HostTensor::new(shape, (0..n).map(|_| next()).collect()).unwrap()
    };
    let down = fill(down_shape, &mut next);
    let up = fill(up_shape, &mut next);
    LoraWeights::new(down, up, alpha, "test").unwrap()
}

/// `ΔW` as a dense `[out, in·kh·kw]` f64 matrix.
fn dense(w: &LoraWeights) -> DMatrix<f64> {
    let delta = w.delta();
    let out = delta.shape[0];
    DMatrix::from_row_iterator(out, delta.data.len() / out, delta.data.iter().map(|&v| f64::from(v)))
}

/// Singular values of the dense update, descending.
fn singular_values(m: &DMatrix<f64>) -> Vec<f64> {
    m.clone().svd(false, false).singular_values.iter().copied().collect()
}

fn frobenius(m: &DMatrix<f64>) -> f64 {
    m.iter().map(|v| v * v).sum::<f64>().sqrt()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// For every target rank the resized update is the best one of that rank: its error is
    /// the norm of the dropped singular values of the dense `ΔW`, the kept share is what
    /// `Retained` reports, the scale is unchanged and the layout is the input's. Ranks
    /// above `out` or `in·kh·kw` (a rank-deficient adapter, non-square QR factors) included.
    #[test]
    fn resizing_keeps_the_leading_singular_values(
        rank in 1usize..7, d_in in 3usize..10, d_out in 3usize..10, kernel in prop::sample::select(vec![1usize, 3]),
        alpha in 0.5f32..8.0, seed in any::<u64>(), target in 1usize..8,
    ) {
        let w = adapter(rank, d_in, d_out, kernel, alpha, seed);
        let full = dense(&w);
        let s = singular_values(&full);
        let (small, kept) = resize_adapter(&w, target, RankRule::Fixed, "test").unwrap();
        let k = target.min(rank).min(d_out).min(d_in * kernel * kernel);
        prop_assert_eq!(small.rank(), k);
        prop_assert_eq!(kept.new_rank, k);
        prop_assert_eq!(kept.old_rank, rank);
        prop_assert!((small.scale() - w.scale()).abs() <= 1e-6 * w.scale());
        prop_assert_eq!(&small.down.shape[1..], &w.down.shape[1..]);
        prop_assert_eq!(small.up.shape[0], w.up.shape[0]);
        prop_assert_eq!(&small.up.shape[2..], &w.up.shape[2..]);

        let peak = s[0].max(1e-30);
        let error = frobenius(&(dense(&small) - &full));
        let dropped = s[k..].iter().map(|v| v * v).sum::<f64>().sqrt();
        prop_assert!((error - dropped).abs() <= 2e-5 * peak, "error {} vs dropped singular values {}", error, dropped);
        let total = s.iter().map(|v| v * v).sum::<f64>().sqrt();
        let want_retained = s[..k].iter().map(|v| v * v).sum::<f64>().sqrt() / total;
        prop_assert!((kept.fro_retained - want_retained).abs() <= 1e-4, "{} vs {}", kept.fro_retained, want_retained);
    }

    /// `sv_fro` keeps the smallest rank whose singular values hold the fraction of the norm,
    /// counted on the dense `ΔW`'s singular values.
    #[test]
    fn sv_fro_keeps_the_smallest_sufficient_rank(
        rank in 2usize..7, d in 6usize..12, seed in any::<u64>(), fraction in 0.3f64..0.99,
    ) {
        let w = adapter(rank, d, d, 1, rank as f32, seed);
        let s = singular_values(&dense(&w));
        let total: f64 = s.iter().map(|v| v * v).sum();
        let share = |k: usize| (s[..k].iter().map(|v| v * v).sum::<f64>() / total).sqrt();
        let want = (1..=rank).find(|&k| share(k) >= fraction).unwrap();
        // Ranks whose share is within rounding of the fraction could go either way.
        prop_assume!((1..=rank).all(|k| (share(k) - fraction).abs() > 1e-6));
        let (small, kept) = resize_adapter(&w, 16, RankRule::SvFro(fraction), "test").unwrap();
        prop_assert_eq!(small.rank(), want);
        prop_assert!(kept.fro_retained >= fraction);
    }
}

/// A set mixing linear and 3x3 conv adapters: each kind takes its own rank, the metadata is
/// kept with kohya's note in front of the comment.
#[test]
fn sets_resize_linear_and_conv_adapters_to_their_own_ranks() {
    let mut set = AdapterSet::new();
    let linear = AdapterKey::new(Component::Unet, "down_blocks.0.attentions.0.proj_in");
    let conv = AdapterKey::new(Component::Unet, "down_blocks.0.resnets.0.conv1");
    let one_by_one = AdapterKey::new(Component::Unet, "down_blocks.1.resnets.0.conv_shortcut");
    set.insert(linear.clone(), adapter(8, 12, 12, 1, 4.0, 1)).unwrap();
    set.insert(conv.clone(), adapter(6, 4, 8, 3, 1.0, 2)).unwrap();
    let mut one = adapter(8, 12, 10, 1, 8.0, 3);
    one.down.shape.extend([1, 1]);
    one.up.shape.extend([1, 1]);
    set.insert(one_by_one.clone(), one).unwrap();
    set.metadata.insert("ss_training_comment".into(), "trigger: mystyle".into());
    set.metadata.insert("ss_base_model_version".into(), "sd_v1".into());

    let settings = ResizeSettings { rank: 4, conv_rank: 2, rule: RankRule::Fixed };
    let resized = resize_set(&set, &settings).unwrap();
    assert_eq!(resized.set.get(&linear).unwrap().rank(), 4);
    assert_eq!(resized.set.get(&conv).unwrap().rank(), 2);
    assert_eq!(resized.set.get(&one_by_one).unwrap().rank(), 4, "1x1 convolutions count as linear, as kohya's training counts them");
    assert_eq!(resized.set.get(&one_by_one).unwrap().up.shape, vec![10, 4, 1, 1]);
    assert_eq!(resized.modules.len(), 3);
    assert!(resized.mean_fro_retained() > 0.0 && resized.mean_fro_retained() < 1.0);
    assert_eq!(resized.set.metadata["ss_base_model_version"], "sd_v1");
    assert_eq!(resized.set.metadata["ss_training_comment"], "dimension is resized from 8 to 4 (conv: 2); trigger: mystyle");
    assert!(!resized.set.metadata.contains_key("ss_network_dim"), "the writers recompute it");

    let dynamic = ResizeSettings { rank: 16, conv_rank: 16, rule: RankRule::SvFro(1.0) };
    let kept = resize_set(&set, &dynamic).unwrap();
    for (key, w) in set.iter() {
        assert_eq!(kept.set.get(key).unwrap().rank(), w.rank(), "{key}: keeping all of the norm keeps the rank");
    }
    assert!(kept.set.metadata["ss_training_comment"].starts_with("Dynamic resize with sv_fro: 1 from 8; "));
    // kohya's marker survives the kohya writer, which otherwise writes the most common rank.
    assert_eq!(kept.set.metadata["ss_network_dim"], "Dynamic");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dynamic.safetensors");
    kept.set.save(&path, lora_core::AdapterFormat::Kohya, lora_core::SaveDtype::F32).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!((meta["ss_network_dim"].as_str(), meta["ss_network_alpha"].as_str()), ("Dynamic", "Dynamic"));
}

/// A zero update (a fresh adapter) becomes rank 1; bad settings and non-finite weights are
/// errors naming what is wrong.
#[test]
fn zero_updates_bad_settings_and_non_finite_weights() {
    let mut w = adapter(4, 6, 6, 1, 4.0, 9);
    w.up.data.iter_mut().for_each(|v| *v = 0.0);
    let (small, kept) = resize_adapter(&w, 4, RankRule::Fixed, "fresh").unwrap();
    assert_eq!(small.rank(), 1);
    assert!(small.up.data.iter().all(|v| *v == 0.0));
    assert_eq!(kept.fro_retained, 1.0);

    let w = adapter(4, 6, 6, 1, 4.0, 9);
    for rule in [RankRule::SvFro(0.0), RankRule::SvFro(1.5), RankRule::SvCumulative(f64::NAN), RankRule::SvRatio(0.5)] {
        let err = resize_adapter(&w, 4, rule, "k").unwrap_err().to_string();
        assert!(err.contains(&rule.describe()), "{err}");
    }
    assert!(resize_adapter(&w, 0, RankRule::Fixed, "k").is_err());
    let mut empty = w.clone();
    (empty.down.shape, empty.down.data) = (vec![4, 0], vec![]);
    let err = resize_adapter(&empty, 2, RankRule::Fixed, "lora_unet_empty").unwrap_err().to_string();
    assert!(err.contains("lora_unet_empty") && err.contains("size 0"), "{err}");
    let mut short = w.clone();
    short.up.data.pop();
    let err = resize_adapter(&short, 2, RankRule::Fixed, "lora_unet_short").unwrap_err().to_string();
    assert!(err.contains("lora_unet_short") && err.contains("23 values for shape [6, 4]"), "{err}");
    let mut bad = w.clone();
    bad.down.data[3] = f32::NAN;
    let err = resize_adapter(&bad, 2, RankRule::Fixed, "lora_unet_x").unwrap_err().to_string();
    assert!(err.contains("lora_unet_x") && err.contains("NaN"), "{err}");
    let mut set = AdapterSet::new();
    set.insert(AdapterKey::new(Component::Unet, "a"), w).unwrap();
    assert!(resize_set(&set, &ResizeSettings { rank: 2, conv_rank: 0, rule: RankRule::Fixed }).is_err());
}
