//! Algebraic laws of the adapters, checked over random shapes, ranks and conv geometry.

use crate::common;

use burn::module::Param;
use burn::nn::conv::Conv2dConfig;
use burn::nn::{LinearConfig, PaddingConfig2d};
use common::{numerical_rank, random_weights, rel_err, values, Rng, B};
use lora_core::{LinearAdapter, LoraConfig, LoraConv2d, LoraLinear, LoraWeights};
use proptest::prelude::*;

const TOL: f64 = 1e-4;

/// `||a - b||` relative to `||base|| + ||sum - base||`, the sizes of the two terms of
/// `sum = base + update` (a base output and the adapter's update, or a base weight and the
/// merged delta). Merging reorders the float sums, so where the update nearly cancels the
/// base (one output element, a large negative multiplier) the result itself is too small a
/// yardstick for the rounding of the larger terms.
fn err_vs_terms(a: &[f32], b: &[f32], base: &[f32], sum: &[f32]) -> f64 {
    let norm = |v: &mut dyn Iterator<Item = f32>| v.map(|x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let diff = norm(&mut a.iter().zip(b).map(|(x, y)| x - y));
    let update = norm(&mut sum.iter().zip(base).map(|(y, z)| y - z));
    diff / (norm(&mut base.iter().copied()) + update).max(1e-30)
}

fn cases() -> ProptestConfig {
    ProptestConfig::with_cases(48)
}

fn linear_layer(rng: &mut Rng, d_in: usize, d_out: usize, bias: bool) -> LoraLinear<B> {
    let mut base = LinearConfig::new(d_in, d_out).with_bias(bias).init::<B>(&Default::default());
    base.weight = Param::from_tensor(rng.tensor([d_in, d_out]));
    LoraLinear::new(base)
}

#[derive(Debug, Clone)]
struct ConvGeom {
    kernel: usize,
    stride: usize,
    pad: usize,
    dilation: usize,
}

fn conv_layer(rng: &mut Rng, c_in: usize, c_out: usize, g: &ConvGeom) -> LoraConv2d<B> {
    let mut base = Conv2dConfig::new([c_in, c_out], [g.kernel, g.kernel])
        .with_stride([g.stride, g.stride])
        .with_dilation([g.dilation, g.dilation])
        .with_padding(PaddingConfig2d::Explicit(g.pad, g.pad, g.pad, g.pad))
        .init::<B>(&Default::default());
    base.weight = Param::from_tensor(rng.tensor([c_out, c_in, g.kernel, g.kernel]));
    LoraConv2d::new(base)
}

fn geom() -> impl Strategy<Value = ConvGeom> {
    prop_oneof![
        Just((1usize, 1usize, 0usize, 1usize)),
        (Just(3usize), 1usize..=2, 0usize..=2, 1usize..=2),
    ]
    .prop_map(|(kernel, stride, pad, dilation)| ConvGeom {
        kernel,
        stride,
        pad,
        dilation,
    })
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn linear_merged_forward_equals_unmerged(
        d_in in 1usize..24, d_out in 1usize..24, rank_frac in 0.0f64..1.0,
        batch in 1usize..5, alpha in 0.25f32..32.0, mult in -1.5f32..2.0, bias: bool, seed: u64,
    ) {
        let rank = 1 + (rank_frac * d_in.min(d_out) as f64) as usize;
        let rank = rank.min(d_in.min(d_out));
        let mut rng = Rng::new(seed);
        let mut layer = linear_layer(&mut rng, d_in, d_out, bias);
        let w = random_weights(&mut rng, d_in, d_out, rank, None, alpha);
        layer.attach_weights(&w, "site", &Default::default()).unwrap();
        layer.set_multiplier(mult);
        let x = rng.tensor([batch, d_in]);
        let base = values(layer.base.forward(x.clone()));
        let unmerged = values(layer.forward(x.clone()));
        let merged = values(layer.merged().forward(x.clone()));
        let err = err_vs_terms(&merged, &unmerged, &base, &unmerged);
        prop_assert!(err <= TOL, "merged: error {err} of the terms' size");
        layer.merge_in_place();
        let in_place = values(layer.forward(x));
        let err = err_vs_terms(&in_place, &unmerged, &base, &unmerged);
        prop_assert!(err <= TOL, "merged in place: error {err} of the terms' size");
    }

    #[test]
    fn conv_merged_forward_equals_unmerged(
        c_in in 1usize..7, c_out in 1usize..7, rank_frac in 0.0f64..1.0, g in geom(),
        batch in 1usize..3, hw in 5usize..10, alpha in 0.25f32..16.0, mult in -1.5f32..2.0, seed: u64,
    ) {
        let rank = (1 + (rank_frac * c_in.min(c_out) as f64) as usize).min(c_in.min(c_out));
        let mut rng = Rng::new(seed);
        let mut layer = conv_layer(&mut rng, c_in, c_out, &g);
        let w = random_weights(&mut rng, c_in, c_out, rank, Some([g.kernel, g.kernel]), alpha);
        layer.attach_weights(&w, "site", &Default::default()).unwrap();
        layer.set_multiplier(mult);
        let x = rng.tensor([batch, c_in, hw, hw]);
        let base = values(layer.base.forward(x.clone()));
        let unmerged = values(layer.forward(x.clone()));
        let merged = values(layer.merged().forward(x));
        let err = err_vs_terms(&merged, &unmerged, &base, &unmerged);
        prop_assert!(err <= TOL, "merged: error {err} of the terms' size");
    }

    #[test]
    fn merge_then_unmerge_restores_weights(
        d_in in 1usize..16, d_out in 1usize..16, kernel in prop_oneof![Just(1usize), Just(3usize)],
        alpha in 0.5f32..8.0, mult in -2.0f32..2.0, seed: u64,
    ) {
        let mut rng = Rng::new(seed);
        let rank = 1 + (seed as usize) % d_in.min(d_out);
        // Linear.
        let mut lin = linear_layer(&mut rng, d_in, d_out, true);
        let before = values(lin.base.weight.val());
        lin.attach_weights(&random_weights(&mut rng, d_in, d_out, rank, None, alpha), "l", &Default::default()).unwrap();
        lin.set_multiplier(mult);
        lin.merge_in_place();
        prop_assert!(lin.is_merged());
        let merged_w = values(lin.base.weight.val());
        lin.unmerge_in_place();
        prop_assert!(err_vs_terms(&values(lin.base.weight.val()), &before, &before, &merged_w) <= 1e-5);
        // Unmerging a merged plain layer recovers the base too.
        let adapter = lin.adapter.clone().unwrap();
        let merged = lin.merged();
        let restored = LoraLinear::unmerge(merged, adapter, mult).unwrap();
        prop_assert!(err_vs_terms(&values(restored.base.weight.val()), &before, &before, &merged_w) <= 1e-5);
        // Conv.
        let g = ConvGeom { kernel, stride: 1, pad: kernel / 2, dilation: 1 };
        let mut conv = conv_layer(&mut rng, d_in, d_out, &g);
        let before = values(conv.base.weight.val());
        conv.attach_weights(&random_weights(&mut rng, d_in, d_out, rank, Some([kernel, kernel]), alpha), "c", &Default::default()).unwrap();
        conv.set_multiplier(mult);
        conv.merge_in_place();
        let merged_w = values(conv.base.weight.val());
        let detached = conv.detach();
        prop_assert!(detached.is_some());
        prop_assert!(!conv.is_merged());
        prop_assert!(err_vs_terms(&values(conv.base.weight.val()), &before, &before, &merged_w) <= 1e-5);
    }

    #[test]
    fn zero_up_gives_exactly_the_base_output(
        d_in in 1usize..20, d_out in 1usize..20, batch in 1usize..4, alpha in 0.5f32..64.0, seed: u64,
    ) {
        let mut rng = Rng::new(seed);
        let rank = 1 + (seed as usize) % d_in.min(d_out);
        let mut layer = linear_layer(&mut rng, d_in, d_out, true);
        let config = LoraConfig::new(rank).with_alpha(alpha);
        layer.attach_new(&config, &Default::default()).unwrap();
        let x = rng.tensor([batch, d_in]);
        prop_assert_eq!(values(layer.forward(x.clone())), values(layer.base.forward(x.clone())));
        let g = ConvGeom { kernel: 3, stride: 1, pad: 1, dilation: 1 };
        let mut conv = conv_layer(&mut rng, d_in, d_out, &g);
        conv.attach_new(&config, &Default::default()).unwrap();
        let xc = rng.tensor([1, d_in, 6, 6]);
        prop_assert_eq!(values(conv.forward(xc.clone())), values(conv.base.forward(xc)));
    }

    #[test]
    fn delta_has_rank_at_most_r(
        d_in in 2usize..20, d_out in 2usize..20, kernel in prop_oneof![Just(1usize), Just(3usize)], seed: u64,
    ) {
        let mut rng = Rng::new(seed);
        let rank = 1 + (seed as usize) % (d_in.min(d_out) - 1);
        let lin = random_weights(&mut rng, d_in, d_out, rank, None, 1.0);
        let delta = lin.delta();
        prop_assert!(numerical_rank(&delta.data, d_out, d_in, 1e-5) <= rank);
        // The device computation agrees with the host one.
        let adapter = LinearAdapter::<B>::from_weights(&lin, "l", &Default::default()).unwrap();
        let device_delta = values(adapter.delta_weight(1.0).transpose());
        prop_assert!(rel_err(&device_delta, &delta.data) <= TOL);
        let conv = random_weights(&mut rng, d_in, d_out, rank, Some([kernel, kernel]), 1.0);
        let delta = conv.delta();
        prop_assert!(numerical_rank(&delta.data, d_out, d_in * kernel * kernel, 1e-5) <= rank);
    }

    #[test]
    fn rslora_scales_by_sqrt_rank(rank in 1usize..64, alpha in 0.5f32..64.0) {
        let classic = LoraConfig::new(rank).with_alpha(alpha);
        let rs = classic.clone().with_rslora(true);
        let ratio = rs.scale() / classic.scale();
        prop_assert!((ratio - (rank as f32).sqrt()).abs() <= 1e-4 * ratio);
        // Writing an rsLoRA adapter uses an alpha that gives the same scale under alpha / r.
        prop_assert!((rs.kohya_alpha() / rank as f32 - rs.scale()).abs() <= 1e-5 * rs.scale());
    }
}

#[test]
fn rslora_adapter_exports_equivalent_weights() {
    let mut rng = Rng::new(7);
    let mut layer = linear_layer(&mut rng, 12, 10, false);
    let config = LoraConfig::new(4).with_alpha(8.0).with_rslora(true);
    layer.attach_new(&config, &Default::default()).unwrap();
    // Give `up` non-zero values so the update is visible.
    let adapter = layer.adapter.as_mut().unwrap();
    adapter.up.weight = Param::from_tensor(rng.tensor([4, 10]));
    let exported: LoraWeights = adapter.to_weights().unwrap();
    assert!((exported.alpha - 8.0 * 2.0).abs() < 1e-5); // scale 8/sqrt(4) = 4 = alpha'/4
    let x = rng.tensor([3, 12]);
    let y = values(layer.forward(x.clone()));
    let mut reloaded = linear_layer(&mut Rng::new(7), 12, 10, false);
    reloaded.attach_weights(&exported, "site", &Default::default()).unwrap();
    assert!(rel_err(&values(reloaded.forward(x)), &y) <= TOL);
}

#[test]
fn gaussian_init_and_config_validation() {
    use lora_core::LoraInit;
    let mut layer = linear_layer(&mut Rng::new(1), 64, 48, false);
    let cfg = LoraConfig::new(8).with_init(LoraInit::Gaussian);
    layer.attach_new(&cfg, &Default::default()).unwrap();
    let down = values(layer.adapter.as_ref().unwrap().down.weight.val());
    let std = (down.iter().map(|v| (*v as f64).powi(2)).sum::<f64>() / down.len() as f64).sqrt();
    assert!((std - 1.0 / 8.0).abs() < 0.02, "std {std}");
    assert!(values(layer.adapter.as_ref().unwrap().up.weight.val()).iter().all(|v| *v == 0.0));
    // Kaiming-uniform: bound 1/sqrt(fan_in).
    layer.attach_new(&LoraConfig::new(8), &Default::default()).unwrap();
    let down = values(layer.adapter.as_ref().unwrap().down.weight.val());
    assert!(down.iter().all(|v| v.abs() <= 1.0 / 8.0 + 1e-6));
    assert!(down.iter().any(|v| v.abs() > 0.1));
    // Bad configs are errors, not panics.
    assert!(layer.attach_new(&LoraConfig::new(0), &Default::default()).is_err());
    // A rank above min(in, out) is allowed, as in kohya, PEFT and LyCORIS; one above
    // max(in, out) is refused, naming both sides.
    assert!(layer.attach_new(&LoraConfig::new(64), &Default::default()).is_ok());
    let err = layer.attach_new(&LoraConfig::new(65), &Default::default()).unwrap_err().to_string();
    assert!(err.contains("rank 65") && err.contains("48 x 64"), "{err}");
    assert_eq!(layer.adapter.as_ref().unwrap().down.weight.dims(), [64, 64], "the attached adapter stays");
    assert!(layer.attach_new(&LoraConfig::new(4).with_dropout(1.0), &Default::default()).is_err());
    assert!(layer.attach_new(&LoraConfig::new(4).with_alpha(f32::NAN), &Default::default()).is_err());
}

/// With an init seed, a fresh adapter's weights come from a host stream: the same
/// whatever burn's backend RNG holds (so the same on every backend), others for another
/// seed; without one they come from the backend RNG. Checked for LoRA, LoCon (Tucker too),
/// LoRA-FA, LoHa, LoKr and GLoRA on a linear and a 3x3 convolution.
#[test]
fn seeded_init_ignores_the_backend_rng() {
    use burn::tensor::backend::Backend;
    use lora_core::{adapter_seed, Algo, LoraInit};
    let device = Default::default();
    let draw = |config: &LoraConfig, backend_seed: u64| -> Vec<f32> {
        B::seed(&device, backend_seed);
        let mut linear = linear_layer(&mut Rng::new(1), 12, 10, false);
        let mut conv = conv_layer(&mut Rng::new(2), 6, 8, &ConvGeom { kernel: 3, stride: 1, pad: 1, dilation: 1 });
        linear.attach_new(config, &device).unwrap();
        conv.attach_new(config, &device).unwrap();
        let mut all = Vec::new();
        if let Some(a) = linear.adapter {
            all.extend(values(a.down.weight.val()));
            all.extend(values(a.up.weight.val()));
        }
        if let Some(a) = conv.adapter {
            all.extend(values(a.down.weight.val()));
            all.extend(a.mid.map(|m| values(m.weight.val())).unwrap_or_default());
            all.extend(values(a.up.weight.val()));
        }
        for a in linear.lycoris.into_iter().chain(conv.lycoris) {
            all.extend(a.factors.iter().flat_map(|f| values(f.val())));
        }
        all
    };
    let configs = [
        LoraConfig::new(4),
        LoraConfig::new(4).with_use_tucker(true),
        LoraConfig::new(4).with_init(LoraInit::Gaussian).with_lora_fa(true),
        LoraConfig::new(4).with_algo(Algo::Loha),
        LoraConfig::new(2).with_algo(Algo::Lokr).with_lokr_decompose_both(true),
        LoraConfig::new(4).with_algo(Algo::Glora),
    ];
    for config in configs {
        let seeded = config.clone().with_init_seed(Some(adapter_seed(7, "mid_block.proj")));
        let first = draw(&seeded, 1);
        assert!(first.iter().any(|v| *v != 0.0), "{config:?}");
        assert_eq!(first, draw(&seeded, 2), "{config:?}: the backend's seed changed a host-seeded init");
        let other = config.clone().with_init_seed(Some(adapter_seed(8, "mid_block.proj")));
        assert_ne!(first, draw(&other, 1), "{config:?}");
        assert_ne!(draw(&config, 1), draw(&config, 2), "{config:?}: without a seed the backend's RNG draws");
    }
    // Kaiming's bound takes the kernel's taps: 1 / sqrt(6 · 3 · 3) for the 3x3 LoCon down.
    let mut conv = conv_layer(&mut Rng::new(2), 6, 8, &ConvGeom { kernel: 3, stride: 1, pad: 1, dilation: 1 });
    conv.attach_new(&LoraConfig::new(4).with_init_seed(Some(3)), &device).unwrap();
    let down = values(conv.adapter.unwrap().down.weight.val());
    let bound = 1.0 / 54f32.sqrt();
    assert!(down.iter().all(|v| v.abs() <= bound) && down.iter().any(|v| v.abs() > 0.8 * bound), "{down:?}");
}

#[test]
fn mismatched_adapter_is_rejected() {
    let mut rng = Rng::new(3);
    let mut layer = linear_layer(&mut rng, 8, 6, true);
    let wrong = random_weights(&mut rng, 6, 8, 2, None, 1.0);
    let err = layer.attach_weights(&wrong, "down_blocks.0.to_q", &Default::default()).unwrap_err();
    assert!(err.to_string().contains("down_blocks.0.to_q"), "{err}");
    let conv_w = random_weights(&mut rng, 8, 6, 2, Some([3, 3]), 1.0);
    assert!(layer.attach_weights(&conv_w, "x", &Default::default()).is_err());
    let g = ConvGeom { kernel: 3, stride: 1, pad: 1, dilation: 1 };
    let mut conv = conv_layer(&mut rng, 8, 6, &g);
    let one_by_one = random_weights(&mut rng, 8, 6, 2, Some([1, 1]), 1.0);
    assert!(conv.attach_weights(&one_by_one, "conv", &Default::default()).is_err());
}

proptest! {
    #![proptest_config(cases())]

    /// Several adapters combined by rank concatenation give the strength-weighted sum of
    /// their updates, for linear and conv adapters.
    #[test]
    fn combining_adapters_sums_their_updates(
        d_in in 1usize..10, d_out in 1usize..10, r1 in 1usize..4, r2 in 1usize..4,
        s1 in -1.5f32..1.5, s2 in -1.5f32..1.5, kernel in prop_oneof![Just(None), Just(Some([3usize, 3])), Just(Some([1, 1]))], seed: u64,
    ) {
        let mut rng = Rng::new(seed);
        let a = random_weights(&mut rng, d_in, d_out, r1, kernel, 2.0);
        let b = random_weights(&mut rng, d_in, d_out, r2, kernel, 0.5);
        let c = LoraWeights::combine(&[(&a, s1), (&b, s2)], "k").unwrap();
        prop_assert_eq!(c.rank(), r1 + r2);
        let want: Vec<f32> = a.delta().data.iter().zip(&b.delta().data).map(|(x, y)| s1 * x + s2 * y).collect();
        let got = c.delta().data;
        // The terms' size, not the sum's: two updates that nearly cancel leave a small sum
        // beside the rounding of the larger terms.
        let (da, db) = (a.delta().data, b.delta().data);
        let terms = da.iter().zip(&db).map(|(x, y)| (s1 * x).abs() + (s2 * y).abs());
        let scale = terms.fold(1e-6f32, f32::max) as f64;
        let max_diff = got.iter().zip(&want).fold(0f64, |m, (g, w)| m.max((g - w).abs() as f64));
        prop_assert!(max_diff <= 1e-5 * scale, "max diff {max_diff}");
    }
}

#[test]
fn bake_leaves_a_plain_merged_layer() {
    let mut rng = Rng::new(11);
    let mut layer = linear_layer(&mut rng, 6, 5, true);
    layer.attach_weights(&random_weights(&mut rng, 6, 5, 2, None, 1.0), "l", &Default::default()).unwrap();
    let x = rng.tensor([2, 6]);
    let y = values(layer.forward(x.clone()));
    layer.bake();
    assert!(layer.adapter.is_none() && !layer.is_merged());
    assert!(rel_err(&values(layer.forward(x)), &y) <= TOL);
}

/// Merging into half-precision weights sums in f32 and rounds once: the merged weight is
/// `round(w + ΔW)`, not `round(w + round(ΔW))`, and unmerging gets back closer to `w`.
#[test]
fn half_precision_merge_rounds_the_sum_once() {
    use burn::tensor::FloatDType;
    type Round = fn(f32) -> f32;
    let to_bf16: Round = |x| half::bf16::from_f32(x).to_f32();
    let to_f16: Round = |x| half::f16::from_f32(x).to_f32();
    for (dtype, round) in [(FloatDType::BF16, to_bf16), (FloatDType::F16, to_f16)] {
        let mut rng = Rng::new(21);
        let mut layer = linear_layer(&mut rng, 16, 12, false);
        layer.base.weight = layer.base.weight.clone().map(|w| w.cast(dtype));
        // A small update, as a trained LoRA's is against its weights: here the two roundings
        // differ in many elements.
        layer.attach_weights(&random_weights(&mut rng, 16, 12, 4, None, 0.2), "l", &Default::default()).unwrap();
        let w = values(layer.base.weight.val());
        let delta = values(layer.adapter.as_ref().unwrap().delta_weight(1.0));
        let once: Vec<f32> = w.iter().zip(&delta).map(|(w, d)| round(w + d)).collect();
        let twice: Vec<f32> = w.iter().zip(&delta).map(|(w, d)| round(w + round(*d))).collect();
        assert!(once.iter().zip(&twice).filter(|(a, b)| a != b).count() >= 4, "{dtype:?}: the test data cannot tell the roundings apart");
        // Sums within a few f32 ulps of a rounding tie may go either way (the order of the
        // matmul's additions is the backend's).
        let near_tie = |x: f32| round(x * (1.0 - 4.0 * f32::EPSILON)) != round(x * (1.0 + 4.0 * f32::EPSILON));
        let agree = |got: &[f32], want: &[f32], exact: &[f32]| got.iter().zip(want).zip(exact).all(|((g, w), x)| g == w || near_tie(*x));
        layer.merge_in_place();
        let merged = values(layer.base.weight.val());
        let sums: Vec<f32> = w.iter().zip(&delta).map(|(w, d)| w + d).collect();
        assert!(agree(&merged, &once, &sums), "{dtype:?}: merged {merged:?}, want {once:?}");
        layer.unmerge_in_place();
        let restored = values(layer.base.weight.val());
        let differences: Vec<f32> = merged.iter().zip(&delta).map(|(m, d)| m - d).collect();
        let want: Vec<f32> = differences.iter().map(|x| round(*x)).collect();
        assert!(agree(&restored, &want, &differences), "{dtype:?}: restored {restored:?}, want {want:?}");
    }
}
