//! LoRA-FA (`LoraConfig::lora_fa`, kohya's `networks.lora_fa`): `down` is drawn from
//! N(0, 2 / (in + rank)) and frozen, only `up` trains.

use burn::backend::{Autodiff, Flex};
use burn::module::Module;
use burn::nn::conv::Conv2dConfig;
use burn::nn::LinearConfig;
use burn::optim::GradientsParams;
use burn::tensor::{Distribution, Tensor};
use lora_core::optim::{AdamWSettings, FlatAdamW};
use lora_core::{Algo, LoraConfig, LoraConv2d, LoraLinear, LoraSiteMut, LoraWeights, HostTensor};

type B = Autodiff<Flex>;

fn mean_std(v: &[f32]) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().map(|x| f64::from(*x)).sum::<f64>() / n;
    let var = v.iter().map(|x| (f64::from(*x) - mean).powi(2)).sum::<f64>() / n;
    (mean, var.sqrt())
}

/// The sample's mean and spread are those of N(0, want²): the mean within four standard
/// errors, the deviation within 3% (over 10⁴+ values its standard error is under 1%).
fn assert_normal(values: &[f32], want: f64, what: &str) {
    let (mean, std) = mean_std(values);
    assert!(mean.abs() < 4.0 * want / (values.len() as f64).sqrt(), "{what}: mean {mean}");
    assert!((std / want - 1.0).abs() < 0.03, "{what}: std {std}, want {want}");
}

#[test]
fn downs_start_from_the_papers_normal_counting_a_convolutions_channels() {
    let device = Default::default();
    let mut linear = LoraLinear::new(LinearConfig::new(1024, 64).init::<B>(&device).no_grad());
    linear.attach_new(&LoraConfig::new(16).with_lora_fa(true), &device).unwrap();
    let down = linear.adapter.as_ref().unwrap().down.weight.val().into_data().to_vec::<f32>().unwrap();
    // Kaiming-uniform (the default) would spread as 1/sqrt(3·1024) = 0.018.
    assert_normal(&down, (2.0f64 / (1024.0 + 16.0)).sqrt(), "linear");

    // kohya counts a convolution's input channels, not channels × kernel.
    let mut conv = LoraConv2d::new(Conv2dConfig::new([256, 32], [3, 3]).init::<B>(&device).no_grad());
    conv.attach_new(&LoraConfig::new(8).with_lora_fa(true), &device).unwrap();
    let down = conv.adapter.as_ref().unwrap().down.weight.val().into_data().to_vec::<f32>().unwrap();
    assert_eq!(down.len(), 8 * 256 * 9);
    assert_normal(&down, (2.0f64 / (256.0 + 8.0)).sqrt(), "conv");
}

/// Trains `layer` three AdamW steps on a squared output; returns it.
fn train(mut layer: LoraLinear<B>) -> LoraLinear<B> {
    let device = &Default::default();
    let mut optim = FlatAdamW::new(AdamWSettings::default(), &layer, device);
    for _ in 0..3 {
        let x = Tensor::<B, 2>::random([5, 8], Distribution::Normal(0.0, 1.0), device);
        let loss = layer.forward(x).powf_scalar(2.0).sum();
        let grads = loss.backward();
        let adapter = layer.adapter.as_ref().unwrap();
        assert!(adapter.down.weight.grad(&grads).is_none(), "the frozen down has no gradient");
        assert!(adapter.up.weight.grad(&grads).is_some());
        let grads = optim.gather_grads(&layer, GradientsParams::from_grads(grads, &layer));
        layer = optim.step(1e-2, layer, grads);
    }
    layer
}

fn values(t: Tensor<B, 2>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

#[test]
fn only_up_trains_fresh_or_read_from_a_file() {
    let device = Default::default();
    let base = LinearConfig::new(8, 6).init::<B>(&device).no_grad();
    let mut layer = LoraLinear::new(base.clone());
    layer.attach_new(&LoraConfig::new(3).with_lora_fa(true), &device).unwrap();
    let down = values(layer.adapter.as_ref().unwrap().down.weight.val());
    let layer = train(layer);
    let adapter = layer.adapter.as_ref().unwrap();
    assert_eq!(values(adapter.down.weight.val()), down, "down unchanged to the bit");
    assert!(values(adapter.up.weight.val()).iter().all(|v| *v != 0.0), "up trained");

    // An adapter read from a file trains both halves until its down is frozen.
    let weights = LoraWeights::new(
        HostTensor::new(vec![3, 8], (0..24).map(|i| (i as f32 - 12.0) / 10.0).collect()).unwrap(),
        HostTensor::new(vec![6, 3], (0..18).map(|i| (i as f32 - 9.0) / 20.0).collect()).unwrap(),
        3.0,
        "k",
    )
    .unwrap();
    let mut layer = LoraLinear::new(base);
    LoraSiteMut::Linear(&mut layer).attach_weights(&weights, "k", &device).unwrap();
    assert!(LoraSiteMut::Linear(&mut layer).freeze_down());
    let down = values(layer.adapter.as_ref().unwrap().down.weight.val());
    let layer = train(layer);
    assert_eq!(values(layer.adapter.as_ref().unwrap().down.weight.val()), down);
}

#[test]
fn forms_with_a_down_of_their_own_are_refused() {
    let fa = LoraConfig::new(4).with_lora_fa(true);
    for (config, what) in [(fa.clone().with_algo(Algo::Loha), "loha"), (fa.clone().with_algo(Algo::Lokr), "lokr"), (fa.clone().with_dora(true), "dora"), (fa.clone().with_use_tucker(true), "use_tucker")] {
        let e = config.validate().unwrap_err().to_string();
        assert!(e.contains("lora_fa") && e.contains(what), "{e}");
    }
    // A LyCORIS adapter has no single down to freeze.
    let device = Default::default();
    let mut layer = LoraLinear::new(LinearConfig::new(8, 6).init::<B>(&device).no_grad());
    layer.attach_new(&LoraConfig::new(2).with_algo(Algo::Loha), &device).unwrap();
    assert!(!LoraSiteMut::Linear(&mut layer).freeze_down());
}
