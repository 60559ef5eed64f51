//! Max-norm regularization (`FlatAdamW::apply_max_norm`, kohya's `scale_weight_norms`)
//! against the definition computed on the host from each adapter's full `ΔW`.

use crate::common;

use burn::backend::{Autodiff, Flex};
use burn::module::{AutodiffModule, Module};
use burn::nn::conv::Conv2dConfig;
use burn::nn::LinearConfig;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Tensor};
use common::{random_weights, Rng};
use lora_core::optim::{norm_pairs, AdamWSettings, FlatAdamW};
use lora_core::{Component, LoraConv2d, LoraLinear, LoraSiteMut, LoraSites};

type AD = Autodiff<Flex>;

#[derive(Module, Debug)]
struct Net<B: Backend> {
    big: LoraLinear<B>,
    conv: LoraConv2d<B>,
    small: LoraLinear<B>,
}

impl<B: Backend> LoraSites<B> for Net<B> {
    fn component(&self) -> Component {
        Component::Unet
    }

    fn visit_lora_sites(&mut self, f: &mut dyn FnMut(&str, LoraSiteMut<'_, B>)) {
        f("big", LoraSiteMut::Linear(&mut self.big));
        f("conv", LoraSiteMut::Conv(&mut self.conv));
        f("small", LoraSiteMut::Linear(&mut self.small));
    }
}

/// Three adapters with update norms far above, about at and far below 1; the first layer's
/// base stays trainable (an optimizer tensor outside every adapter).
fn net() -> Net<AD> {
    let device = Default::default();
    let mut rng = Rng::new(11);
    let mut net = Net {
        big: LoraLinear::new(LinearConfig::new(16, 24).init(&device)),
        conv: LoraConv2d::new(Conv2dConfig::new([8, 8], [3, 3]).init(&device).no_grad()),
        small: LoraLinear::new(LinearConfig::new(8, 8).init(&device).no_grad()),
    };
    net.big.attach_weights(&random_weights(&mut rng, 16, 24, 4, None, 4.0), "big", &device).unwrap();
    net.conv.attach_weights(&random_weights(&mut rng, 8, 8, 2, Some([3, 3]), 0.12), "conv", &device).unwrap();
    let mut small = random_weights(&mut rng, 8, 8, 2, None, 2.0);
    small.up.data.iter_mut().for_each(|v| *v *= 0.01);
    net.small.attach_weights(&small, "small", &device).unwrap();
    net
}

/// Each adapter's `‖ΔW‖` and its factors (down, up) as flat host vectors.
fn adapters(net: &Net<AD>) -> Vec<(f32, Vec<f32>, Vec<f32>)> {
    let host = |t: Tensor<Flex, 2>| t.into_data().to_vec::<f32>().unwrap();
    let norm = |d: Vec<f32>| d.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt() as f32;
    let mut out = Vec::new();
    for l in [&net.big, &net.small] {
        let a = l.adapter.as_ref().unwrap().valid();
        out.push((norm(host(a.delta_weight(1.0))), host(a.down.weight.val()), host(a.up.weight.val())));
    }
    let c = net.conv.adapter.as_ref().unwrap().valid();
    let flat4 = |t: Tensor<Flex, 4>| t.into_data().to_vec::<f32>().unwrap();
    out.insert(1, (norm(flat4(c.delta_weight(1.0))), flat4(c.down.weight.val()), flat4(c.up.weight.val())));
    out
}

#[test]
fn adapters_over_the_limit_are_scaled_to_it_as_sd_scripts_does() {
    let device = Default::default();
    let mut model = net();
    let before = adapters(&model);
    let norms: Vec<f32> = before.iter().map(|a| a.0).collect();
    assert!(norms[0] > 2.0 && (0.5..2.0).contains(&norms[1]) && norms[2] < 0.5, "{norms:?}");
    let base_before = model.big.base.weight.val().into_data();
    let max_norm = 1.0;
    let mut optim = FlatAdamW::new(AdamWSettings::default(), &model, &device);
    let pairs = norm_pairs(&mut model);
    let (model, stats) = optim.apply_max_norm(model, &pairs, max_norm).unwrap();
    let after = adapters(&model);
    // sd-scripts: ratio = min(max(n, m/2), m) / max(n, m/2); both factors times sqrt(ratio).
    let mut expected_stats = [0.0f32, 0.0, 0.0];
    for ((n, down, up), (n_after, down_after, up_after)) in before.iter().zip(&after) {
        let clamped = n.max(max_norm / 2.0);
        let ratio = clamped.min(max_norm) / clamped;
        for (old, new) in [(down, down_after), (up, up_after)] {
            for (o, v) in old.iter().zip(new) {
                assert!((o * ratio.sqrt() - v).abs() <= 1e-6 * o.abs().max(1e-3), "{o} * {} vs {v}", ratio.sqrt());
            }
        }
        if ratio == 1.0 {
            assert_eq!((down, up), (down_after, up_after), "an adapter under the limit keeps its bits");
        }
        assert!((n_after - n * ratio).abs() <= 1e-5 * n, "{n_after} vs {}", n * ratio);
        expected_stats[0] += f32::from(ratio < 1.0);
        expected_stats[1] += n * ratio;
        expected_stats[2] = expected_stats[2].max(n * ratio);
    }
    assert_eq!(expected_stats[0], 1.0, "only the big adapter is over the limit");
    let got = stats.values.into_data().to_vec::<f32>().unwrap();
    assert_eq!(stats.count, 3);
    assert_eq!(got[0], expected_stats[0]);
    for k in 1..3 {
        assert!((got[k] - expected_stats[k]).abs() <= 1e-5 * expected_stats[k], "{got:?} vs {expected_stats:?}");
    }
    model.big.base.weight.val().into_data().assert_eq(&base_before, true);
    // Applying it again changes nothing that matters: every norm is at most the limit.
    let (model, _) = optim.apply_max_norm(model, &pairs, max_norm).unwrap();
    for (a, b) in adapters(&model).iter().zip(&after) {
        assert!((a.0 - b.0).abs() <= 1e-6 && a.0 <= max_norm * (1.0 + 1e-6));
    }
    // The optimizer's values are what was written: a later step starts from them.
    let saved = optim.to_master(model.clone());
    assert_eq!(adapters(&saved)[0].1, adapters(&model)[0].1);
}

#[test]
fn working_copies_get_the_scaled_values_and_bad_input_is_an_error() {
    let device = Default::default();
    let mut model = net();
    let pairs = norm_pairs(&mut model);
    let mut optim = FlatAdamW::new(AdamWSettings::default(), &model, &device).with_working_dtype(FloatDType::BF16);
    let model = optim.to_working(model);
    let (model, _) = optim.apply_max_norm(model, &pairs, 1.0).unwrap();
    let a = model.big.adapter.as_ref().unwrap();
    assert_eq!(a.up.weight.val().dtype(), DType::BF16);
    let master = optim.to_master(model.clone());
    let norm: f32 = master.big.adapter.as_ref().unwrap().delta_weight(1.0).powf_scalar(2.0).sum().sqrt().into_scalar();
    assert!((norm - 1.0).abs() < 1e-4, "{norm}");
    for bad in [0.0, -1.0, f32::NAN] {
        assert!(optim.apply_max_norm(model.clone(), &pairs, bad).is_err(), "{bad}");
    }
    // Pairs of another model's tensors are not this optimizer's.
    let other = norm_pairs(&mut net());
    let err = optim.apply_max_norm(model, &other, 1.0).unwrap_err().to_string();
    assert!(err.contains("`big`"), "{err}");
}

#[derive(Module, Debug)]
struct Lyco<B: Backend> {
    loha: LoraLinear<B>,
    lokr: LoraConv2d<B>,
    lokr_small: LoraLinear<B>,
}

impl<B: Backend> LoraSites<B> for Lyco<B> {
    fn component(&self) -> Component {
        Component::Unet
    }

    fn visit_lora_sites(&mut self, f: &mut dyn FnMut(&str, LoraSiteMut<'_, B>)) {
        f("loha", LoraSiteMut::Linear(&mut self.loha));
        f("lokr", LoraSiteMut::Conv(&mut self.lokr));
        f("lokr_small", LoraSiteMut::Linear(&mut self.lokr_small));
    }
}

/// LoHa and LoKr adapters (the conv LoKr Tucker-decomposed): the norms of their full
/// updates, and over the limit every factor times `ratio^(1/n)`, which brings `‖ΔW‖` to it.
#[test]
fn lycoris_adapters_are_scaled_through_all_their_factors() {
    use lora_core::{Algo, LoraConfig};
    let device = Default::default();
    let mut model = Lyco {
        loha: LoraLinear::new(LinearConfig::new(16, 24).init::<AD>(&device).no_grad()),
        lokr: LoraConv2d::new(Conv2dConfig::new([8, 12], [3, 3]).init(&device).no_grad()),
        lokr_small: LoraLinear::new(LinearConfig::new(16, 16).init(&device).no_grad()),
    };
    let mut rng = Rng::new(5);
    model.loha.attach_new(&LoraConfig::new(3).with_alpha(6.0).with_algo(Algo::Loha), &device).unwrap();
    model.lokr.attach_new(&LoraConfig::new(1).with_algo(Algo::Lokr).with_lokr_decompose_both(true).with_use_tucker(true), &device).unwrap();
    assert_eq!(model.lokr.lycoris.as_ref().unwrap().names(), ["lokr_w1_a", "lokr_w1_b", "lokr_t2", "lokr_w2_a", "lokr_w2_b"]);
    model.lokr_small.attach_new(&LoraConfig::new(2).with_algo(Algo::Lokr), &device).unwrap();
    // Non-zero factors: large updates on the first two, a tiny one on the third.
    for (adapter, size) in [(model.loha.lycoris.as_mut(), 1.0), (model.lokr.lycoris.as_mut(), 1.0), (model.lokr_small.lycoris.as_mut(), 0.01)] {
        let adapter = adapter.unwrap();
        for p in adapter.factors.iter_mut() {
            let [r, c] = p.dims();
            let values: Vec<f32> = rng.vec(r * c).iter().map(|v| v * size).collect();
            *p = burn::module::Param::from_tensor(Tensor::from_data(burn::tensor::TensorData::new(values, [r, c]), &device));
        }
    }
    let deltas = |m: &Lyco<AD>| -> Vec<(f32, Vec<Vec<f32>>)> {
        [m.loha.lycoris.as_ref(), m.lokr.lycoris.as_ref(), m.lokr_small.lycoris.as_ref()]
            .into_iter()
            .map(|a| {
                let a = a.unwrap();
                let norm: f32 = a.delta(1.0).inner().powf_scalar(2.0).sum().sqrt().into_scalar();
                (norm, a.factors.iter().map(|p| p.val().inner().into_data().to_vec::<f32>().unwrap()).collect())
            })
            .collect()
    };
    let before = deltas(&model);
    assert!(before[0].0 > 2.0 && before[1].0 > 2.0 && before[2].0 < 0.5, "{:?}", before.iter().map(|b| b.0).collect::<Vec<_>>());
    let mut optim = FlatAdamW::new(AdamWSettings::default(), &model, &device);
    let pairs = norm_pairs(&mut model);
    assert_eq!(pairs.len(), 3);
    let (model, stats) = optim.apply_max_norm(model, &pairs, 1.0).unwrap();
    let after = deltas(&model);
    for ((n, factors), (n_after, factors_after)) in before.iter().zip(&after) {
        let ratio = n.clamp(0.5, 1.0) / n.max(0.5);
        assert!((n_after - n * ratio).abs() <= 1e-4 * n, "{n_after} vs {}", n * ratio);
        let each = ratio.powf(1.0 / factors.len() as f32);
        for (old, new) in factors.iter().zip(factors_after) {
            for (o, v) in old.iter().zip(new) {
                assert!((o * each - v).abs() <= 1e-5 * o.abs().max(1e-3), "{o} * {each} vs {v}");
            }
        }
    }
    assert_eq!(stats.values.into_data().to_vec::<f32>().unwrap()[0], 2.0, "the LoHa and the conv LoKr are scaled");
}

#[derive(Module, Debug)]
struct Ofts<B: Backend> {
    diag: LoraLinear<B>,
    boft: LoraConv2d<B>,
    small: LoraLinear<B>,
}

impl<B: Backend> LoraSites<B> for Ofts<B> {
    fn component(&self) -> Component {
        Component::Unet
    }

    fn visit_lora_sites(&mut self, f: &mut dyn FnMut(&str, LoraSiteMut<'_, B>)) {
        f("diag", LoraSiteMut::Linear(&mut self.diag));
        f("boft", LoraSiteMut::Conv(&mut self.boft));
        f("small", LoraSiteMut::Linear(&mut self.small));
    }
}

/// LyCORIS' Diag-OFT and BOFT: as LyCORIS' `apply_max_norm`, the norm of the `oft_blocks`
/// themselves is held to the limit (sd-scripts' ratio on it); their scale per output stays.
#[test]
fn lycoris_oft_blocks_are_scaled_by_their_own_norm() {
    use lora_core::{Algo, LoraConfig};
    let device = Default::default();
    let mut model = Ofts {
        diag: LoraLinear::new(LinearConfig::new(6, 8).init::<AD>(&device).no_grad()),
        boft: LoraConv2d::new(Conv2dConfig::new([4, 8], [3, 3]).init(&device).no_grad()),
        small: LoraLinear::new(LinearConfig::new(6, 8).init(&device).no_grad()),
    };
    let config = |algo| LoraConfig::new(2).with_alpha(0.0).with_algo(algo).with_oft_rescaled(true);
    model.diag.attach_new(&config(Algo::DiagOft), &device).unwrap();
    model.boft.attach_new(&config(Algo::Boft), &device).unwrap();
    model.small.attach_new(&config(Algo::DiagOft), &device).unwrap();
    let mut rng = Rng::new(9);
    for (adapter, size) in [(model.diag.lycoris.as_mut(), 1.0), (model.boft.lycoris.as_mut(), 1.0), (model.small.lycoris.as_mut(), 0.01)] {
        let adapter = adapter.unwrap();
        for p in adapter.factors.iter_mut() {
            let [r, c] = p.dims();
            // Large blocks on the first two, tiny ones on the third.
            let values: Vec<f32> = rng.vec(r * c).iter().map(|v| if size < 1.0 { v * size } else { 1.0 + v }).collect();
            *p = burn::module::Param::from_tensor(Tensor::from_data(burn::tensor::TensorData::new(values, [r, c]), &device));
        }
    }
    let values = |m: &Ofts<AD>| -> Vec<[Vec<f32>; 2]> {
        [m.diag.lycoris.as_ref(), m.boft.lycoris.as_ref(), m.small.lycoris.as_ref()]
            .map(|a| {
                let a = a.unwrap();
                assert_eq!(a.names(), ["oft_blocks", "rescale"]);
                [0, 1].map(|i| a.factors[i].val().inner().into_data().to_vec::<f32>().unwrap())
            })
            .to_vec()
    };
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    let before = values(&model);
    let limit = 2.0;
    assert!(norm(&before[0][0]) > limit && norm(&before[1][0]) > limit && norm(&before[2][0]) < limit / 2.0);
    let mut optim = FlatAdamW::new(AdamWSettings::default(), &model, &device);
    let pairs = norm_pairs(&mut model);
    let (model, stats) = optim.apply_max_norm(model, &pairs, limit).unwrap();
    let after = values(&model);
    for ([blocks, rescale], [blocks_after, rescale_after]) in before.iter().zip(&after) {
        let n = norm(blocks);
        let ratio = n.clamp(limit / 2.0, limit) / n.max(limit / 2.0);
        for (o, v) in blocks.iter().zip(blocks_after) {
            assert!((o * ratio - v).abs() <= 1e-5 * o.abs().max(1e-3), "{o} * {ratio} vs {v}");
        }
        assert_eq!(rescale, rescale_after, "the scale per output stays");
    }
    let stats: Vec<f32> = stats.values.into_data().to_vec().unwrap();
    assert_eq!(stats[0], 2.0, "the first two layers' blocks are over the limit");
    assert!((stats[2] - limit).abs() < 1e-4, "the largest norm after scaling is the limit: {stats:?}");
}
