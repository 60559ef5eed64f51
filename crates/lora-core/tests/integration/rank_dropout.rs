//! kohya's rank and module dropout: per-sample masks on `down(x)` scaled by `1 / (1 − p)`,
//! whole-adapter skips, nothing at inference.
//!
//! The adapters here have identity `down` and `up` weights (`in = out = rank`), so the
//! update of each row is `scale · mask ⊙ x`: the ratio `update / (scale · x)` shows the mask.

use burn::backend::{Autodiff, Flex};
use burn::module::Param;
use burn::nn::conv::Conv2dConfig;
use burn::nn::LinearConfig;
use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};
use lora_core::{LoraConfig, LoraConv2d, LoraLinear};

type B = Autodiff<Flex>;
const R: usize = 8;

fn linear(config: &LoraConfig) -> LoraLinear<B> {
    let device = Default::default();
    let mut layer = LoraLinear::new(LinearConfig::new(R, R).init::<B>(&device));
    layer.attach_new(config, &device).unwrap();
    let adapter = layer.adapter.as_mut().unwrap();
    adapter.down.weight = Param::from_tensor(Tensor::eye(R, &device));
    adapter.up.weight = Param::from_tensor(Tensor::eye(R, &device));
    layer
}

/// A 1x1 LoRA convolution `R -> R` whose adapter (`config`) has identity `down` and `up`.
fn conv(config: &LoraConfig) -> LoraConv2d<B> {
    let device = Default::default();
    let mut conv = LoraConv2d::new(Conv2dConfig::new([R, R], [1, 1]).init::<B>(&device));
    conv.attach_new(config, &device).unwrap();
    let adapter = conv.adapter.as_mut().unwrap();
    adapter.down.weight = Param::from_tensor(Tensor::<B, 2>::eye(R, &device).reshape([R, R, 1, 1]));
    adapter.up.weight = Param::from_tensor(Tensor::<B, 2>::eye(R, &device).reshape([R, R, 1, 1]));
    conv
}

/// The mask factors `update / (scale · x)` of a linear layer's rows, `[rows][R]`.
fn linear_factors<const D: usize>(layer: &LoraLinear<B>, x: Tensor<B, D>) -> Vec<Vec<f32>> {
    let scale = layer.adapter.as_ref().unwrap().scale;
    let update = layer.forward(x.clone()) - layer.base.forward(x.clone());
    let ratio = (update / x.mul_scalar(scale)).into_data().to_vec::<f32>().unwrap();
    ratio.chunks(R).map(<[f32]>::to_vec).collect()
}

fn assert_in(values: &[f32], allowed: &[f32]) {
    for v in values {
        assert!(allowed.iter().any(|a| (v - a).abs() < 1e-4), "{v} not among {allowed:?}");
    }
}

/// Each sample (3-d input: the first dimension; 2-d rows: the `samples` hint) gets one
/// mask over the rank, the same on all its rows, with values 0 and `1 / (1 − p)`; about a
/// fraction `p` of them are 0; masks differ between samples.
#[test]
fn rank_dropout_masks_each_sample_over_the_rank() {
    let device = Default::default();
    B::seed(&device, 5);
    let p = 0.25;
    let mut layer = linear(&LoraConfig::new(R).with_rank_dropout(p));
    let (samples, tokens) = (16, 6);
    let x3 = Tensor::<B, 3>::random([samples, tokens, R], Distribution::Uniform(0.5, 1.5), &device);
    let rows3 = linear_factors(&layer, x3.clone());
    layer.adapter.as_mut().unwrap().samples = samples;
    let rows2 = linear_factors(&layer, x3.reshape([samples * tokens, R]));
    for rows in [rows3, rows2] {
        let mut zeros = 0;
        let mut patterns = std::collections::BTreeSet::new();
        for sample in rows.chunks(tokens) {
            for row in sample {
                assert_in(row, &[0.0, 1.0 / (1.0 - p as f32)]);
                assert_eq!(row.iter().map(|v| *v == 0.0).collect::<Vec<_>>(), sample[0].iter().map(|v| *v == 0.0).collect::<Vec<_>>(), "one mask per sample");
            }
            zeros += sample[0].iter().filter(|v| v.abs() < 1e-4).count();
            patterns.insert(sample[0].iter().map(|v| v.abs() < 1e-4).collect::<Vec<_>>());
        }
        // 128 draws at p = 0.25: mean 32, sd ≈ 4.9.
        assert!((12..=52).contains(&zeros), "{zeros} of {} components dropped", samples * R);
        assert!(patterns.len() > samples / 2, "masks differ between samples");
    }
}

/// Module dropout skips the whole update on about a fraction `p` of the passes, and leaves
/// it whole (no rescaling) otherwise.
#[test]
fn module_dropout_skips_whole_passes() {
    let device = Default::default();
    B::seed(&device, 9);
    let p = 0.3;
    let layer = linear(&LoraConfig::new(R).with_module_dropout(p));
    let x = Tensor::<B, 3>::random([2, 3, R], Distribution::Uniform(0.5, 1.5), &device);
    let mut skipped = 0;
    for _ in 0..200 {
        let rows = linear_factors(&layer, x.clone());
        let all: Vec<f32> = rows.concat();
        assert_in(&all, &[0.0, 1.0]);
        let off = all.iter().filter(|v| v.abs() < 1e-4).count();
        assert!(off == 0 || off == all.len(), "a pass is skipped whole or not at all");
        skipped += usize::from(off == all.len());
    }
    // 200 passes at p = 0.3: mean 60, sd ≈ 6.5.
    assert!((35..=85).contains(&skipped), "{skipped} of 200 passes skipped");
}

/// A conv adapter masks each sample's rank channels at every pixel; inference backends
/// (and rank dropout 0) leave the update whole.
#[test]
fn conv_masks_and_inference_is_untouched() {
    let device = Default::default();
    B::seed(&device, 3);
    let p = 0.5;
    let conv = conv(&LoraConfig::new(R).with_rank_dropout(p));
    let scale = conv.adapter.as_ref().unwrap().scale;
    let (n, hw) = (6, 4);
    let x = Tensor::<B, 4>::random([n, R, hw, hw], Distribution::Uniform(0.5, 1.5), &device);
    let ratio = |conv: &LoraConv2d<B>| {
        let update = conv.forward(x.clone()) - conv.base.forward(x.clone());
        (update / x.clone().mul_scalar(scale)).into_data().to_vec::<f32>().unwrap()
    };
    let values = ratio(&conv);
    assert_in(&values, &[0.0, 2.0]);
    for channel in values.chunks(hw * hw) {
        assert!(channel.iter().all(|v| (v - channel[0]).abs() < 1e-4), "one factor per sample and rank channel");
    }
    assert!(values.contains(&0.0) && values.iter().any(|v| *v > 1.0));

    // The same layer without autodiff: no dropout.
    let inner = burn::module::AutodiffModule::valid(&conv);
    let update = inner.forward(x.clone().inner()) - inner.base.forward(x.clone().inner());
    let ratio: Vec<f32> = (update / x.inner().mul_scalar(scale)).into_data().to_vec().unwrap();
    assert_in(&ratio, &[1.0]);
}

/// Whether each factor is (about) zero.
fn zeros(factors: &[f32]) -> Vec<bool> {
    factors.iter().map(|v| v.abs() < 1e-4).collect()
}

/// LyCORIS' rank dropout on a LoRA (`lycoris_rank_dropout`, LyCORIS' LoCon): one mask over
/// the outputs (the rows of `ΔW`) per pass, the same for every sample and row, with values
/// 0 and 1 (with `rank_dropout_scale`, 1 over the share kept); each pass draws its own; a
/// convolution masks its output channels; set_dropout sets it; nothing at inference.
#[test]
fn lycoris_rank_dropout_drops_rows_of_the_update_once_per_pass() {
    let device = Default::default();
    B::seed(&device, 11);
    let p = 0.5;
    let kept_factor = |mask: &[bool], scale: bool| if scale { R as f32 / mask.iter().filter(|z| !**z).count().max(1) as f32 } else { 1.0 };
    for scale in [false, true] {
        let config = LoraConfig::new(R).with_rank_dropout(p).with_lycoris_rank_dropout(true).with_rank_dropout_scale(scale);
        let layer = linear(&config);
        let x = Tensor::<B, 3>::random([4, 5, R], Distribution::Uniform(0.5, 1.5), &device);
        let mut patterns = std::collections::BTreeSet::new();
        for _ in 0..8 {
            let rows = linear_factors(&layer, x.clone());
            let mask = zeros(&rows[0]);
            for row in &rows {
                assert_eq!(zeros(row), mask, "one mask for the pass");
                assert_in(row, &[0.0, kept_factor(&mask, scale)]);
            }
            patterns.insert(mask);
        }
        assert!(patterns.len() > 2, "each pass draws its mask: {patterns:?}");

        let mut conv = conv(&LoraConfig::new(R));
        lora_core::LoraSiteMut::Conv(&mut conv).set_dropout(&config);
        let scale_ = conv.adapter.as_ref().unwrap().scale;
        let x = Tensor::<B, 4>::random([3, R, 2, 2], Distribution::Uniform(0.5, 1.5), &device);
        let update = conv.forward(x.clone()) - conv.base.forward(x.clone());
        let ratio = (update / x.clone().mul_scalar(scale_)).into_data().to_vec::<f32>().unwrap();
        // `[n, channel, 2, 2]`: the channel's factor, the same for every sample and pixel.
        let channels: Vec<f32> = ratio[..R * 4].chunks(4).map(|c| c[0]).collect();
        let mask = zeros(&channels);
        for (i, v) in ratio.iter().enumerate() {
            let c = (i / 4) % R;
            assert!((v - channels[c]).abs() < 1e-4, "one factor per output channel");
        }
        assert_in(&channels, &[0.0, kept_factor(&mask, scale)]);
        let inner = burn::module::AutodiffModule::valid(&conv);
        let update = inner.forward(x.clone().inner()) - inner.base.forward(x.clone().inner());
        assert_in(&(update / x.inner().mul_scalar(scale_)).into_data().to_vec::<f32>().unwrap(), &[1.0]);
    }
    let err = LoraConfig::new(R).with_lycoris_rank_dropout(true).with_dora(true).validate().unwrap_err().to_string();
    assert!(err.contains("lycoris_rank_dropout") && err.contains("dora"), "{err}");
}

/// Probabilities outside [0, 1) are configuration errors naming the option.
#[test]
fn probabilities_are_checked() {
    let device = Default::default();
    let mut layer = LoraLinear::new(LinearConfig::new(R, R).init::<Flex>(&device));
    let err = layer.attach_new(&LoraConfig::new(2).with_rank_dropout(1.0), &device).unwrap_err().to_string();
    assert!(err.contains("rank_dropout"), "{err}");
    let err = layer.attach_new(&LoraConfig::new(2).with_module_dropout(-0.1), &device).unwrap_err().to_string();
    assert!(err.contains("module_dropout"), "{err}");
}

/// kohya's network dropout drops single elements of `down(x)` (not whole samples' rank
/// components), scaling the rest by `1 / (1 − p)`, in linear and conv adapters; without
/// autodiff nothing is dropped; `set_dropout` sets it and its range is checked.
#[test]
fn network_dropout_drops_elements_of_down_x() {
    let device = Default::default();
    B::seed(&device, 11);
    let p = 0.5;
    let layer = linear(&LoraConfig::new(R).with_network_dropout(p));
    let (samples, tokens) = (8, 6);
    let x = Tensor::<B, 3>::random([samples, tokens, R], Distribution::Uniform(0.5, 1.5), &device);
    let rows = linear_factors(&layer, x.clone());
    let values: Vec<f32> = rows.iter().flatten().copied().collect();
    assert_in(&values, &[0.0, 2.0]);
    let zeros = values.iter().filter(|v| **v == 0.0).count();
    // 384 draws at p = 0.5: mean 192, sd ≈ 9.8.
    assert!((140..=244).contains(&zeros), "{zeros} of {}", values.len());
    // Not one mask per sample: the rows of a sample differ.
    assert!(rows.chunks(tokens).any(|sample| sample.iter().any(|r| r != &sample[0])));
    let inner = burn::module::AutodiffModule::valid(&layer);
    let update = inner.forward(x.clone().inner()) - inner.base.forward(x.clone().inner());
    let ratio: Vec<f32> = (update / x.inner().mul_scalar(layer.adapter.as_ref().unwrap().scale)).into_data().to_vec().unwrap();
    assert_in(&ratio, &[1.0]);

    let mut conv = conv(&LoraConfig::new(R));
    lora_core::LoraSiteMut::Conv(&mut conv).set_dropout(&LoraConfig::new(R).with_network_dropout(p));
    let scale = conv.adapter.as_ref().unwrap().scale;
    let x = Tensor::<B, 4>::random([2, R, 4, 4], Distribution::Uniform(0.5, 1.5), &device);
    let update = conv.forward(x.clone()) - conv.base.forward(x.clone());
    let values: Vec<f32> = (update / x.mul_scalar(scale)).into_data().to_vec().unwrap();
    assert_in(&values, &[0.0, 2.0]);
    // Pixels of one channel differ: elementwise, not per channel.
    assert!(values.chunks(16).any(|c| c.iter().any(|v| v != &c[0])));

    let mut plain = LoraLinear::new(LinearConfig::new(R, R).init::<Flex>(&device));
    let err = plain.attach_new(&LoraConfig::new(2).with_network_dropout(1.0), &device).unwrap_err().to_string();
    assert!(err.contains("network_dropout"), "{err}");
}
