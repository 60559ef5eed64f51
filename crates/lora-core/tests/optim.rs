//! `FlatAdamW` against burn's `AdamW`: the same parameters to the last bit, with tensors that
//! miss gradients in some steps, and across an export / import of its state.

use burn::backend::{Autodiff, Flex};
use burn::module::{Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::{Bool, Distribution, FloatDType, Tensor, TensorData};
use lora_core::optim::{AdamWSettings, FlatAdamW};

type AD = Autodiff<Flex>;

/// Held for the whole of every test here. The helpers seed burn's backend-global RNG before
/// they draw, and parameters draw theirs lazily, on first use; tests run in parallel threads,
/// so without the lock another test's draws could fall between a seed and the draws it is
/// meant to fix, and two passes that must see the same inputs would not.
fn rng_lock() -> std::sync::MutexGuard<'static, ()> {
    static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    RNG.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Module, Debug)]
struct Net<B: burn::tensor::backend::Backend> {
    first: Linear<B>,
    /// Used only in even steps: it has no gradient in odd ones.
    sometimes: Linear<B>,
    /// Never used: never has a gradient (as a text encoder's layers past the clip skip).
    never: Linear<B>,
    conv: Conv2d<B>,
    frozen: Param<Tensor<B, 1>>,
}

fn net(seed: u64) -> Net<AD> {
    let device = Default::default();
    <AD as burn::tensor::backend::Backend>::seed(&device, seed);
    Net {
        first: LinearConfig::new(6, 5).init(&device),
        sometimes: LinearConfig::new(5, 5).init(&device),
        never: LinearConfig::new(3, 2).init(&device),
        conv: Conv2dConfig::new([2, 3], [3, 3]).init(&device),
        frozen: Param::from_tensor(Tensor::random([4], Distribution::Default, &device)).set_require_grad(false),
    }
}

fn grads(net: &Net<AD>, step: usize) -> GradientsParams {
    grads_with(net, step, step.is_multiple_of(2))
}

fn grads_with(net: &Net<AD>, step: usize, use_sometimes: bool) -> GradientsParams {
    let device = Default::default();
    <AD as burn::tensor::backend::Backend>::seed(&device, 100 + step as u64);
    let x = Tensor::<AD, 2>::random([3, 6], Distribution::Normal(0.0, 1.0), &device);
    let mut h = net.first.forward(x);
    if use_sometimes {
        h = net.sometimes.forward(h);
    }
    let img = Tensor::<AD, 4>::random([1, 2, 5, 5], Distribution::Normal(0.0, 1.0), &device);
    let loss = h.powf_scalar(2.0).mean() + net.conv.forward(img).tanh().sum() + net.frozen.val().sum();
    GradientsParams::from_grads(loss.backward(), net)
}

/// A second `GradientsParams` with `module`'s gradients from `grads` (`gather_grads` takes
/// its argument whole; these tests hand the same gradients to two optimizers).
fn copy<M: burn::module::AutodiffModule<AD>>(grads: &GradientsParams, module: &M) -> GradientsParams {
    struct Copy<'a> {
        from: &'a GradientsParams,
        to: GradientsParams,
    }
    impl burn::module::ModuleVisitor<AD> for Copy<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AD, D>>) {
            if let Some(t) = self.from.get::<Flex, D>(param.id) {
                self.to.register(param.id, t);
            }
        }
    }
    let mut copy = Copy { from: grads, to: GradientsParams::new() };
    module.visit(&mut copy);
    copy.to
}

fn values(net: &Net<AD>) -> Vec<f32> {
    let mut out = Vec::new();
    for t in [net.first.weight.val(), net.sometimes.weight.val(), net.never.weight.val()] {
        out.extend(t.into_data().to_vec::<f32>().unwrap());
    }
    for t in [net.first.bias.as_ref().unwrap().val(), net.sometimes.bias.as_ref().unwrap().val(), net.frozen.val()] {
        out.extend(t.into_data().to_vec::<f32>().unwrap());
    }
    out.extend(net.conv.weight.val().into_data().to_vec::<f32>().unwrap());
    out
}

const SETTINGS: AdamWSettings = AdamWSettings {
    beta_1: 0.8,
    beta_2: 0.95,
    epsilon: 1e-6,
    weight_decay: 0.05,
};

fn burn_config() -> AdamWConfig {
    AdamWConfig::new()
        .with_beta_1(SETTINGS.beta_1)
        .with_beta_2(SETTINGS.beta_2)
        .with_epsilon(SETTINGS.epsilon)
        .with_weight_decay(SETTINGS.weight_decay)
}

fn lr(step: usize) -> f64 {
    1e-2 / (1.0 + step as f64)
}

#[test]
fn flat_adamw_equals_burn_adamw_bit_for_bit() {
    let _rng = rng_lock();
    let device = Default::default();
    // Parameters initialise lazily: read them once so that the clone shares their values.
    let mut a = net(1);
    values(&a);
    let mut b = a.clone();
    let mut burn_optim = burn_config().init::<AD, Net<AD>>();
    let mut flat = FlatAdamW::new(SETTINGS, &b, &device);
    // Three weights, three biases and the conv's weight and bias; the frozen tensor is left out.
    assert_eq!(flat.params().len(), 8);
    assert_eq!(flat.len(), 6 * 5 + 5 + 5 * 5 + 5 + 3 * 2 + 2 + 3 * 2 * 9 + 3);
    let count = values(&a).len();
    for step in 0..6 {
        // One set of gradients for both (the CPU's threaded conv backward is not
        // deterministic); the clones share parameter ids.
        let g = grads(&a, step);
        let flat_grads = flat.gather_grads(&b, copy(&g, &b));
        a = burn_optim.step(lr(step), a, g);
        b = flat.step(lr(step), b, flat_grads);
        assert_eq!(values(&a), values(&b), "step {step}");
    }
    assert_eq!(values(&b).len(), count);
    assert!(b.first.weight.val().is_require_grad() && !b.frozen.val().is_require_grad());
    // The tensor without gradients in odd steps was updated three times, the others six.
    let (t_some, _, _) = flat.moments::<2>(b.sometimes.weight.id).unwrap();
    let (t_first, m, _) = flat.moments::<2>(b.first.weight.id).unwrap();
    assert_eq!((t_some, t_first), (3, 6));
    assert_eq!(m.dims(), [6, 5]);
    assert!(flat.moments::<3>(b.first.weight.id).is_none(), "wrong rank");
    assert!(flat.moments::<1>(b.frozen.id).is_none(), "not trained");
}

#[test]
fn steps_the_device_declines_leave_no_trace() {
    // `step_if` with `false` on the device is burn's AdamW with that step left out: values,
    // moments and step counts (bias corrections) as if it had not happened.
    let _rng = rng_lock();
    let device = Default::default();
    let mut a = net(7);
    values(&a);
    let mut b = a.clone();
    let mut burn_optim = burn_config().init::<AD, Net<AD>>();
    let mut flat = FlatAdamW::new(SETTINGS, &b, &device);
    let declined = [0, 3, 4];
    for step in 0..7 {
        let g = grads(&a, step);
        let flat_grads = flat.gather_grads(&b, copy(&g, &b));
        let apply = !declined.contains(&step);
        if apply {
            a = burn_optim.step(lr(step), a, g);
        }
        let decision = Tensor::<Flex, 1, Bool>::from_bool(TensorData::from([apply]), &device);
        b = flat.step_if(lr(step), b, flat_grads, decision);
        assert_eq!(values(&a), values(&b), "step {step}");
    }
    // `sometimes` has gradients in even steps: 2 and 6 applied, 0 and 4 declined.
    assert_eq!(flat.moments::<2>(b.sometimes.weight.id).unwrap().0, 2);
    assert_eq!(flat.moments::<2>(b.first.weight.id).unwrap().0, 4);
}

#[test]
fn step_counts_past_the_first_bias_table_still_match() {
    // The bias corrections are a table on the device, grown as the step counts reach its
    // end (first at 1024 steps).
    let _rng = rng_lock();
    let device = Default::default();
    let mut a = net(9);
    values(&a);
    let mut b = a.clone();
    let mut burn_optim = burn_config().init::<AD, Net<AD>>();
    let mut flat = FlatAdamW::new(SETTINGS, &b, &device);
    let g = grads_with(&a, 0, true);
    for step in 0..1030 {
        let flat_grads = flat.gather_grads(&b, copy(&g, &b));
        let burn_grads = copy(&g, &a);
        a = burn_optim.step(1e-3, a, burn_grads);
        b = flat.step(1e-3, b, flat_grads);
        if step >= 1020 {
            assert_eq!(values(&a), values(&b), "step {step}");
        }
    }
    assert_eq!(flat.moments::<2>(b.first.weight.id).unwrap().0, 1030);
}

#[test]
fn a_tensor_without_gradients_keeps_its_value_step_after_step() {
    let _rng = rng_lock();
    // The same tensors lack gradients in every step: the partial update's mask is reused.
    let device = Default::default();
    let mut a = net(4);
    let never = values(&a);
    let mut b = a.clone();
    let mut burn_optim = burn_config().init::<AD, Net<AD>>();
    let mut flat = FlatAdamW::new(SETTINGS, &b, &device);
    for step in 0..4 {
        let g = grads_with(&a, step, true);
        let flat_grads = flat.gather_grads(&b, copy(&g, &b));
        a = burn_optim.step(lr(step), a, g);
        b = flat.step(lr(step), b, flat_grads);
        assert_eq!(values(&a), values(&b), "step {step}");
    }
    let unused = |n: &Net<AD>| n.never.weight.val().into_data().to_vec::<f32>().unwrap();
    assert_eq!(unused(&b), never[6 * 5 + 5 * 5..6 * 5 + 5 * 5 + 6].to_vec());
    assert_eq!(flat.moments::<2>(b.never.weight.id).unwrap().0, 0);
    assert_eq!(flat.moments::<2>(b.sometimes.weight.id).unwrap().0, 4);
}

#[test]
fn exported_state_resumes_to_the_same_bits() {
    let _rng = rng_lock();
    let device = Default::default();
    let mut a = net(2);
    let mut first = FlatAdamW::new(SETTINGS, &a, &device);
    for step in 0..3 {
        let g = first.gather_grads(&a, grads(&a, step));
        a = first.step(lr(step), a, g);
    }
    let mut b = a.clone();
    // A fresh optimizer given the exported moments continues exactly as the first one.
    let mut second = FlatAdamW::new(SETTINGS, &b, &device);
    for id in first.params().to_vec() {
        if let Some((t, m, v)) = first.moments::<2>(id) {
            second.set_moments(id, t, m, v).unwrap();
        } else if let Some((t, m, v)) = first.moments::<1>(id) {
            second.set_moments(id, t, m, v).unwrap();
        } else {
            let (t, m, v) = first.moments::<4>(id).unwrap();
            second.set_moments(id, t, m, v).unwrap();
        }
    }
    for step in 3..6 {
        let g = grads(&a, step);
        let (ga, gb) = (first.gather_grads(&a, copy(&g, &a)), second.gather_grads(&b, g));
        a = first.step(lr(step), a, ga);
        b = second.step(lr(step), b, gb);
        assert_eq!(values(&a), values(&b), "step {step}");
    }
    // Bad state is an error, not a panic.
    let id = b.first.weight.id;
    let wrong = Tensor::<Flex, 2>::zeros([5, 6], &device);
    assert!(second.set_moments(id, 1, wrong.clone(), wrong).is_err());
    let z = Tensor::<Flex, 1>::zeros([4], &device);
    assert!(second.set_moments(b.frozen.id, 1, z.clone(), z).is_err());
}

#[test]
fn gradient_norm_and_scaling_act_on_every_tensor() {
    let _rng = rng_lock();
    let device = Default::default();
    let a = net(3);
    let flat = FlatAdamW::new(SETTINGS, &a, &device);
    let grads = grads(&a, 0);
    let g = flat.gather_grads(&a, copy(&grads, &a));
    let mut expected = 0.0f32;
    for t in [grads.get::<Flex, 2>(a.first.weight.id).unwrap(), grads.get::<Flex, 2>(a.sometimes.weight.id).unwrap()] {
        expected += t.powf_scalar(2.0).sum().into_scalar();
    }
    for id in [a.first.bias.as_ref().unwrap().id, a.sometimes.bias.as_ref().unwrap().id, a.conv.bias.as_ref().unwrap().id] {
        expected += grads.get::<Flex, 1>(id).unwrap().powf_scalar(2.0).sum().into_scalar();
    }
    expected += grads.get::<Flex, 4>(a.conv.weight.id).unwrap().powf_scalar(2.0).sum().into_scalar();
    let norm: f32 = g.sq_norm().into_scalar();
    assert!((norm - expected).abs() <= 1e-5 * expected, "{norm} vs {expected}");
    let scaled: f32 = g.scale(0.5).sq_norm().into_scalar();
    assert!((scaled - expected / 4.0).abs() <= 1e-5 * expected);
}

/// Two LoRA layers over a bf16 base, as a half-precision UNet has them.
#[derive(Module, Debug)]
struct Lora<B: burn::tensor::backend::Backend> {
    first: lora_core::LoraLinear<B>,
    second: lora_core::LoraLinear<B>,
}

fn lora(seed: u64) -> Lora<AD> {
    let device = Default::default();
    <AD as burn::tensor::backend::Backend>::seed(&device, seed);
    let layer = |i, o| {
        let mut l = lora_core::LoraLinear::new(LinearConfig::new(i, o).init::<AD>(&device));
        l.attach_new(&lora_core::LoraConfig::new(3), &device).unwrap();
        l
    };
    let net = Lora { first: layer(8, 6), second: layer(6, 4) };
    lora_core::precision::cast_frozen(net, FloatDType::BF16)
}

/// The loss of a bf16 forward pass, and its gradients.
fn lora_grads(net: &Lora<AD>, step: usize) -> (f32, GradientsParams) {
    let device = Default::default();
    <AD as burn::tensor::backend::Backend>::seed(&device, 300 + step as u64);
    let x = Tensor::<AD, 2>::random([5, 8], Distribution::Normal(0.0, 1.0), &device).cast(FloatDType::BF16);
    let y = net.second.forward(net.first.forward(x).tanh());
    let loss = y.cast(FloatDType::F32).powf_scalar(2.0).mean();
    let value = loss.clone().into_scalar();
    (value, GradientsParams::from_grads(loss.backward(), net))
}

fn adapter_values(net: &Lora<AD>) -> Vec<f32> {
    let mut out = Vec::new();
    for layer in [&net.first, &net.second] {
        let adapter = layer.adapter.as_ref().unwrap();
        for w in [adapter.down.weight.val(), adapter.up.weight.val()] {
            out.extend(w.cast(FloatDType::F32).into_data().to_vec::<f32>().unwrap());
        }
    }
    out
}

#[test]
fn working_copies_train_as_casting_layers_do_to_the_bit() {
    let _rng = rng_lock();
    use burn::tensor::DType;
    let device = Default::default();
    let mut a = lora(5);
    adapter_values(&a);
    let mut b = a.clone();
    assert_eq!(a.first.adapter.as_ref().unwrap().down.weight.val().dtype(), DType::F32);
    // a: f32 adapters cast in every pass; b: bf16 working copies of f32 master values.
    let mut casting = FlatAdamW::new(SETTINGS, &a, &device);
    let mut working = FlatAdamW::new(SETTINGS, &b, &device).with_working_dtype(FloatDType::BF16);
    assert_eq!(working.working_dtype(), Some(DType::BF16));
    b = working.to_working(b);
    assert_eq!(b.second.adapter.as_ref().unwrap().up.weight.val().dtype(), DType::BF16);
    for step in 0..5 {
        let (loss_a, ga) = lora_grads(&a, step);
        let (loss_b, gb) = lora_grads(&b, step);
        assert_eq!(loss_a.to_bits(), loss_b.to_bits(), "step {step}: the same forward pass");
        let (ga, gb) = (casting.gather_grads(&a, ga), working.gather_grads(&b, gb));
        assert_eq!(gb.values().unwrap().dtype(), DType::F32, "gradients gathered in f32");
        a = casting.step(lr(step), a, ga);
        b = working.step(lr(step), b, gb);
        assert_eq!(b.first.adapter.as_ref().unwrap().down.weight.val().dtype(), DType::BF16);
        let master = working.to_master(b.clone());
        assert_eq!(adapter_values(&a), adapter_values(&master), "step {step}: the same f32 values");
    }
    // The working copies are those values rounded, and the module still trains through them.
    let rounded: Vec<f32> = adapter_values(&a).iter().map(|v| half::bf16::from_f32(*v).to_f32()).collect();
    assert_eq!(adapter_values(&b), rounded);
    assert!(b.first.adapter.as_ref().unwrap().up.weight.val().is_require_grad());
}

/// `grads` restricted to the tensors `keep` selects.
fn only(grads: &GradientsParams, module: &Net<AD>, keep: &dyn Fn(burn::module::ParamId) -> bool) -> GradientsParams {
    let all = copy(grads, module);
    let mut out = GradientsParams::new();
    struct Keep<'a> {
        from: &'a GradientsParams,
        keep: &'a dyn Fn(burn::module::ParamId) -> bool,
        to: &'a mut GradientsParams,
    }
    impl burn::module::ModuleVisitor<AD> for Keep<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<AD, D>>) {
            if let (true, Some(t)) = ((self.keep)(param.id), self.from.get::<Flex, D>(param.id)) {
                self.to.register(param.id, t);
            }
        }
    }
    module.visit(&mut Keep { from: &all, keep, to: &mut out });
    out
}

/// Per-tensor learning rates are torch's parameter groups: one optimizer with factors
/// moves each tensor as a step at `lr · factor` of that tensor alone does (weight decay
/// included), a factor of 0 leaves a tensor where it is, and factors of 1 are the
/// optimizer without factors to the bit.
#[test]
fn learning_rate_factors_act_as_parameter_groups() {
    let _rng = rng_lock();
    let device = Default::default();
    let mut a = net(3);
    values(&a);
    let mut b = a.clone();
    let mut c = a.clone();
    let (w, bias, conv) = (a.first.weight.id, a.first.bias.as_ref().unwrap().id, a.conv.weight.id);
    let factor = move |id: burn::module::ParamId| {
        if id == w {
            4.0
        } else if id == bias {
            0.5
        } else if id == conv {
            0.0
        } else {
            1.0
        }
    };
    let mut groups = FlatAdamW::new(SETTINGS, &a, &device);
    let mut scaled = FlatAdamW::new(SETTINGS, &b, &device).with_lr_scales(factor);
    let mut ones = FlatAdamW::new(SETTINGS, &c, &device).with_lr_scales(|_| 1.0);
    let mut plain = FlatAdamW::new(SETTINGS, &c, &device);
    let mut d = c.clone();
    let conv_start = values(&b);
    for step in 0..5 {
        let g = grads(&a, step);
        // The reference: one step per group, each with only its tensors' gradients.
        for f in [4.0f32, 0.5, 0.0, 1.0] {
            let part = only(&g, &a, &|id| factor(id) == f);
            let part = groups.gather_grads(&a, part);
            a = groups.step(lr(step) * f as f64, a, part);
        }
        let gb = scaled.gather_grads(&b, copy(&g, &b));
        b = scaled.step(lr(step), b, gb);
        let gc = ones.gather_grads(&c, copy(&g, &c));
        c = ones.step(lr(step), c, gc);
        let gd = plain.gather_grads(&d, copy(&g, &d));
        d = plain.step(lr(step), d, gd);
        for (x, y) in values(&a).iter().zip(values(&b)) {
            assert!((x - y).abs() <= 1e-6 * x.abs().max(1e-3), "step {step}: {x} vs {y}");
        }
        assert_eq!(values(&c), values(&d), "factors of 1, step {step}");
    }
    let conv_now = b.conv.weight.val().into_data().to_vec::<f32>().unwrap();
    assert_eq!(conv_now, conv_start[conv_start.len() - conv_now.len()..], "a factor of 0 freezes");
    assert_ne!(values(&b), values(&d), "the factors change the trajectory");
}

/// With Prodigy the factor multiplies the step size `d·lr`: factors of `k` everywhere are a
/// learning rate `k` times as large.
#[test]
fn prodigy_takes_the_factors_into_its_step_size() {
    let _rng = rng_lock();
    let device = Default::default();
    let mut a = net(4);
    values(&a);
    let mut b = a.clone();
    let prodigy = lora_core::optim::ProdigySettings::default();
    let mut by_lr = FlatAdamW::new(SETTINGS, &a, &device).with_prodigy(prodigy);
    let mut by_factor = FlatAdamW::new(SETTINGS, &b, &device).with_prodigy(prodigy).with_lr_scales(|_| 3.0);
    for step in 0..4 {
        let g = grads(&a, step);
        let ga = by_lr.gather_grads(&a, copy(&g, &a));
        a = by_lr.step(3.0, a, ga);
        let gb = by_factor.gather_grads(&b, copy(&g, &b));
        b = by_factor.step(1.0, b, gb);
        for (x, y) in values(&a).iter().zip(values(&b)) {
            assert!((x - y).abs() <= 1e-5 * x.abs().max(1e-3), "step {step}: {x} vs {y}");
        }
    }
    let d = |o: &FlatAdamW<AD>| o.prodigy_d().unwrap().into_scalar();
    // `d` comes from `p₀ − p`, differences of nearly equal values: their rounding shows.
    assert!((d(&by_lr) - d(&by_factor)).abs() <= 1e-2 * d(&by_lr), "{} vs {}", d(&by_lr), d(&by_factor));
}

/// An optimizer made before the adapters were attached knows none of them: it must not
/// run steps that silently leave them where they are.
#[test]
#[should_panic(expected = "not trained by this optimizer")]
fn an_optimizer_made_before_the_adapters_refuses_their_gradients() {
    let device = Default::default();
    let mut layer = lora_core::LoraLinear::new(LinearConfig::new(4, 4).init::<AD>(&device));
    let optim = FlatAdamW::new(AdamWSettings::default(), &layer, &device);
    assert!(optim.is_empty(), "the base is frozen");
    layer.attach_new(&lora_core::LoraConfig::new(2), &device).unwrap();
    let x = Tensor::<AD, 2>::ones([3, 4], &device);
    let grads = GradientsParams::from_grads(layer.forward(x).sum().backward(), &layer);
    let _ = optim.gather_grads(&layer, grads);
}
