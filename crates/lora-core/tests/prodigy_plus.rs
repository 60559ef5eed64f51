//! `FlatAdamW::with_prodigy_plus` against the `prodigy-plus-schedule-free` package's
//! `ProdigyPlusScheduleFree` 1.9.2: the trajectories of
//! `xtask/fixtures/lora_core_prodigy_plus.py` (the training values `y`, the evaluation
//! values `x` and each group's estimate `d`; factored and unfactored shapes, two groups at
//! one rate and at two, weight decay both ways, bias correction, SPEED, Adam-atan2, pooled
//! groups, a frozen estimate, tensors without a gradient), replayed with the same
//! gradients; the groups shared between two optimizers; a guarded step that does not
//! happen and a save / restore of the state in the middle of a run; bad settings.

use std::collections::HashMap;

use burn::backend::{Autodiff, Flex};
use burn::module::{Module, Param, ParamId};
use burn::optim::GradientsParams;
use burn::tensor::backend::Backend;
use burn::tensor::{Bool, Tensor, TensorData};
use lora_core::optim::{share_prodigy_plus, AdamWSettings, FlatAdamW, ProdigyPlusSettings};

mod common;

type AD = Autodiff<Flex>;
type Fixture = HashMap<String, (Vec<usize>, Vec<f32>)>;

const STEPS: usize = 12;
const KEEP: [usize; 4] = [0, 1, 5, 11];
const KEEP_X: [usize; 1] = [11];

/// The fixture's tensors: name, shape, starts at zero, group.
const TENSORS: [(&str, &[usize], bool, usize); 8] = [
    ("a", &[2, 32], false, 0),
    ("b", &[32, 2], true, 1),
    ("c", &[4, 32, 1, 1], false, 0),
    ("e", &[32, 4, 1, 1], true, 1),
    ("f", &[8, 6], false, 0),
    ("g", &[32, 2, 3], false, 0),
    ("h", &[3, 32, 3], false, 1),
    ("m", &[32], false, 0),
];

/// The fixture's `hashed`: uniform values in [-0.5, 0.5) from an integer hash.
fn hashed(n: usize, tensor: usize, salt: usize) -> Vec<f32> {
    const MASK: u64 = 0xFFFF_FFFF;
    (0..n as u64)
        .map(|i| {
            let mut h = (i.wrapping_mul(2654435761) + tensor as u64 * 40503 + salt as u64 * 2246822519) & MASK;
            h ^= h >> 15;
            h = h.wrapping_mul(2246822519) & MASK;
            h ^= h >> 13;
            (h as f64 / 4294967296.0 - 0.5) as f32
        })
        .collect()
}

fn start(t: usize) -> Vec<f32> {
    let (_, shape, zero, _) = TENSORS[t];
    let n = shape.iter().product();
    let mut v: Vec<f32> = if zero { vec![0.0; n] } else { hashed(n, t, 1).iter().map(|x| x * 0.2).collect() };
    if TENSORS[t].0 == "m" {
        v.iter_mut().for_each(|x| *x += 1.0);
    }
    v
}

/// The gradient of step `step` at the values `y` (f32 arithmetic in the fixture's order).
fn gradient(t: usize, step: usize, y: &[f32]) -> Vec<f32> {
    let target: Vec<f32> = hashed(y.len(), t, 2).iter().map(|x| x * 0.4).collect();
    let noise = hashed(y.len(), t, 100 + step);
    let scale = (0.05 * (1.0 + 0.5 * ((step + t) % 3) as f64)) as f32;
    y.iter().zip(target).zip(noise).map(|((y, t), n)| 0.5 * (y - t) + (n * 2.0) * scale).collect()
}

/// Tensors of any rank up to 4, each a parameter. A module visits its fields in order:
/// this one the 2-D tensors, the 4-D, the 3-D and the 1-D, which keeps the last tensor of
/// each of the fixture's groups (`h`, `m`) last, as the package's weight sums need.
#[derive(Module, Debug)]
struct Bag<B: Backend> {
    two: Vec<Param<Tensor<B, 2>>>,
    four: Vec<Param<Tensor<B, 4>>>,
    three: Vec<Param<Tensor<B, 3>>>,
    one: Vec<Param<Tensor<B, 1>>>,
}

/// A [`Bag`] of some of the fixture's tensors, and where each went.
struct Model {
    bag: Bag<AD>,
    /// Per fixture tensor in the bag: its index in `TENSORS`, rank and position.
    members: Vec<(usize, usize, usize)>,
}

fn param<const D: usize>(values: Vec<f32>, shape: &[usize]) -> Param<Tensor<AD, D>> {
    let shape: [usize; D] = shape.try_into().unwrap();
    Param::from_tensor(Tensor::<AD, D>::from_data(TensorData::new(values, shape), &Default::default()).require_grad())
}

impl Model {
    /// The fixture's tensors `which`, at their starts.
    fn new(which: &[usize]) -> Self {
        let mut bag = Bag { one: vec![], two: vec![], three: vec![], four: vec![] };
        let mut members = vec![];
        for &t in which {
            let (_, shape, _, _) = TENSORS[t];
            let v = start(t);
            let position = match shape.len() {
                1 => (bag.one.push(param::<1>(v, shape)), bag.one.len() - 1).1,
                2 => (bag.two.push(param::<2>(v, shape)), bag.two.len() - 1).1,
                3 => (bag.three.push(param::<3>(v, shape)), bag.three.len() - 1).1,
                _ => (bag.four.push(param::<4>(v, shape)), bag.four.len() - 1).1,
            };
            members.push((t, shape.len(), position));
        }
        Self { bag, members }
    }

    fn id(&self, t: usize) -> ParamId {
        let &(_, rank, i) = self.members.iter().find(|m| m.0 == t).unwrap();
        match rank {
            1 => self.bag.one[i].id,
            2 => self.bag.two[i].id,
            3 => self.bag.three[i].id,
            _ => self.bag.four[i].id,
        }
    }

    fn values_of(bag: &Bag<AD>, rank: usize, i: usize) -> Vec<f32> {
        let data = match rank {
            1 => bag.one[i].val().into_data(),
            2 => bag.two[i].val().into_data(),
            3 => bag.three[i].val().into_data(),
            _ => bag.four[i].val().into_data(),
        };
        data.convert::<f32>().to_vec().unwrap()
    }

    /// The gradients of `step` (none for the tensors in `skip`).
    fn grads(&self, step: usize, skip: &[&str]) -> GradientsParams {
        let mut grads = GradientsParams::new();
        for &(t, rank, i) in &self.members {
            if skip.contains(&TENSORS[t].0) {
                continue;
            }
            let shape = TENSORS[t].1;
            let g = gradient(t, step, &Self::values_of(&self.bag, rank, i));
            let data = TensorData::new(g, shape.to_vec());
            let device = Default::default();
            match rank {
                1 => grads.register(self.bag.one[i].id, Tensor::<Flex, 1>::from_data(data, &device)),
                2 => grads.register(self.bag.two[i].id, Tensor::<Flex, 2>::from_data(data, &device)),
                3 => grads.register(self.bag.three[i].id, Tensor::<Flex, 3>::from_data(data, &device)),
                _ => grads.register(self.bag.four[i].id, Tensor::<Flex, 4>::from_data(data, &device)),
            }
        }
        grads
    }

    /// `bag`'s values of fixture tensor `t`.
    fn values(&self, bag: &Bag<AD>, t: usize) -> Vec<f32> {
        let &(_, rank, i) = self.members.iter().find(|m| m.0 == t).unwrap();
        Self::values_of(bag, rank, i)
    }
}

struct Case {
    name: &'static str,
    settings: ProdigyPlusSettings,
    group_lr: &'static [f32],
    no_grad: &'static [(usize, &'static str)],
}

/// The settings of the fixture script's `CASES`.
fn cases() -> Vec<Case> {
    let d = ProdigyPlusSettings::default();
    vec![
        Case { name: "defaults", settings: d, group_lr: &[1.0, 1.0], no_grad: &[] },
        Case { name: "grouped", settings: ProdigyPlusSettings { d0: 1e-4, d_coef: 2.0, weight_decay: 0.05, ..d }, group_lr: &[1.0, 2.0], no_grad: &[(5, "b"), (9, "h")] },
        Case {
            name: "single",
            settings: ProdigyPlusSettings { d0: 1e-3, betas: (0.95, 0.999), beta3: Some(0.9), weight_decay: 0.1, weight_decay_by_lr: false, ..d },
            group_lr: &[1.0],
            no_grad: &[],
        },
        Case { name: "bias_speed", settings: ProdigyPlusSettings { d0: 1e-3, use_bias_correction: true, use_speed: true, ..d }, group_lr: &[1.0, 1.0], no_grad: &[] },
        Case { name: "bias", settings: ProdigyPlusSettings { d0: 1e-4, use_bias_correction: true, ..d }, group_lr: &[0.5, 1.0], no_grad: &[] },
        Case { name: "atan2", settings: ProdigyPlusSettings { eps: 0.0, split_groups_mean: false, factored: false, d0: 1e-4, ..d }, group_lr: &[1.0, 1.0], no_grad: &[] },
        Case {
            name: "pooled",
            settings: ProdigyPlusSettings { split_groups: false, use_stableadamw: false, prodigy_steps: 6, d0: 1e-4, ..d },
            group_lr: &[1.0, 1.5],
            no_grad: &[],
        },
        Case { name: "cautious", settings: ProdigyPlusSettings { use_cautious: true, weight_decay: 0.02, d0: 1e-4, ..d }, group_lr: &[1.0, 2.0], no_grad: &[(4, "b")] },
        Case {
            name: "grams_ortho",
            settings: ProdigyPlusSettings { use_grams: true, use_orthograd: true, weight_decay: 0.05, weight_decay_by_lr: false, d0: 1e-4, ..d },
            group_lr: &[1.0, 1.0],
            no_grad: &[],
        },
        Case { name: "adopt", settings: ProdigyPlusSettings { use_adopt: true, d0: 1e-4, ..d }, group_lr: &[1.0, 1.0], no_grad: &[] },
        Case {
            name: "adopt_bias",
            settings: ProdigyPlusSettings { use_adopt: true, use_bias_correction: true, factored: false, d0: 1e-3, ..d },
            group_lr: &[1.0, 1.0],
            no_grad: &[(3, "h")],
        },
    ]
}

impl Case {
    fn group(&self, t: usize) -> usize {
        TENSORS[t].3.min(self.group_lr.len() - 1)
    }

    fn skip(&self, step: usize) -> Vec<&'static str> {
        self.no_grad.iter().filter(|(s, _)| *s == step).map(|(_, t)| *t).collect()
    }

    /// An optimizer over `model`'s tensors with their groups (renumbered from 0 within the
    /// model) and group rates.
    fn optimizer(&self, model: &Model) -> FlatAdamW<AD> {
        let mut groups: Vec<usize> = Vec::new();
        for m in &model.members {
            if !groups.contains(&self.group(m.0)) {
                groups.push(self.group(m.0));
            }
        }
        let of = |id: ParamId| {
            let t = (0..TENSORS.len()).find(|t| model.members.iter().any(|m| m.0 == *t) && model.id(*t) == id).unwrap();
            self.group(t)
        };
        let local = |id: ParamId| groups.iter().position(|g| *g == of(id)).unwrap();
        FlatAdamW::new(AdamWSettings::default(), &model.bag, &Default::default())
            .with_lr_scales(|id| self.group_lr[of(id)])
            .with_prodigy_plus(self.settings, local)
            .unwrap()
    }
}

/// `|x − y| ≤ tol · max(|y|) + floor`, with the worst offender in the message.
fn assert_close(x: &[f32], y: &[f32], tol: f32, floor: f32, what: &str) {
    assert_eq!(x.len(), y.len(), "{what}");
    let scale = y.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    let worst = x.iter().zip(y).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(worst <= tol * scale + floor, "{what}: max |diff| {worst:e} against max |ref| {scale:e}");
}

/// The values' movement from the start against the package's: f32 scalars on the device
/// here, f64 ones on the host there.
fn assert_moved_like(f: &Fixture, case: &str, key: &str, step: usize, model: &Model, bag: &Bag<AD>) {
    for &(t, _, _) in &model.members {
        let init = start(t);
        let moved = |v: &[f32]| v.iter().zip(&init).map(|(x, i)| x - i).collect::<Vec<_>>();
        let ulps = 4.0 * f32::EPSILON * init.iter().fold(0f32, |m, v| m.max(v.abs()));
        let name = TENSORS[t].0;
        assert_close(&moved(&model.values(bag, t)), &moved(&f[&format!("{case}.{key}.{step}.{name}")].1), 1e-4, ulps, &format!("{case} step {step} {key}.{name}"));
    }
}

fn step(optim: &mut FlatAdamW<AD>, model: &mut Model, case: &Case, s: usize) {
    let grads = optim.gather_grads(&model.bag, model.grads(s, &case.skip(s)));
    let bag = std::mem::replace(&mut model.bag, Bag { one: vec![], two: vec![], three: vec![], four: vec![] });
    model.bag = optim.step(1.0, bag, grads);
}

fn check_step(f: &Fixture, case: &Case, s: usize, model: &Model, optim: &FlatAdamW<AD>) {
    if KEEP.contains(&s) {
        assert_moved_like(f, case.name, "y", s, model, &model.bag);
    }
    if KEEP_X.contains(&s) {
        let x = optim.to_eval(model.bag.clone());
        assert_moved_like(f, case.name, "x", s, model, &x);
        assert_moved_like(f, case.name, "x", s, model, &optim.to_master_eval(model.bag.clone()));
    }
}

fn all() -> Vec<usize> {
    (0..TENSORS.len()).collect()
}

#[test]
fn prodigy_plus_follows_the_package() {
    let f = common::f32_fixture("prodigy_plus.safetensors");
    for case in cases() {
        let mut model = Model::new(&all());
        let mut optim = case.optimizer(&model);
        let (ref_d, groups) = (&f[&format!("{}.d", case.name)], case.group_lr.len());
        for s in 0..STEPS {
            step(&mut optim, &mut model, &case, s);
            check_step(&f, &case, s, &model, &optim);
            let d: Vec<f32> = optim.prodigy_plus_d().unwrap().into_data().to_vec().unwrap();
            assert_close(&d, &ref_d.1[s * groups..(s + 1) * groups], 1e-4, 0.0, &format!("{} step {s} d", case.name));
        }
        let last: Vec<f32> = optim.prodigy_plus_d().unwrap().into_data().to_vec().unwrap();
        if !["bias", "adopt_bias"].contains(&case.name) {
            assert!(last.iter().any(|d| *d > case.settings.d0 * 2.0), "{}: the estimate must grow for the test to mean anything: {last:?}", case.name);
        }
    }
}

/// A UNet's and a text encoder's optimizers, one group each, sharing their harmonic
/// mean, step as the package's one optimizer with both groups.
#[test]
fn two_optimizers_share_their_groups_mean() {
    let f = common::f32_fixture("prodigy_plus.safetensors");
    for case in cases().into_iter().filter(|c| ["defaults", "grouped"].contains(&c.name)) {
        let (first, second): (Vec<usize>, Vec<usize>) = all().into_iter().partition(|t| TENSORS[*t].3 == 0);
        let (mut m1, mut m2) = (Model::new(&first), Model::new(&second));
        let (mut o1, mut o2) = (case.optimizer(&m1), case.optimizer(&m2));
        for s in 0..STEPS {
            step(&mut o1, &mut m1, &case, s);
            step(&mut o2, &mut m2, &case, s);
            share_prodigy_plus(&mut [&mut o1, &mut o2]);
            check_step(&f, &case, s, &m1, &o1);
            check_step(&f, &case, s, &m2, &o2);
        }
    }
}

#[test]
fn a_step_that_does_not_happen_and_a_restored_state_change_nothing() {
    let f = common::f32_fixture("prodigy_plus.safetensors");
    let case = &cases()[1];
    let mut model = Model::new(&all());
    let mut optim = case.optimizer(&model);
    let half = 6;
    for s in 0..half {
        step(&mut optim, &mut model, case, s);
    }
    // A guarded step the device refuses: nothing moves, not even the step count.
    let values = |o: &FlatAdamW<AD>, m: &Model| (m.values(&m.bag, 0), m.values(&o.to_eval(m.bag.clone()), 1), o.prodigy_plus_d().unwrap().into_data());
    let before = values(&optim, &model);
    let no = Tensor::<Flex, 1, Bool>::from_bool([false].into(), &Default::default());
    let grads = optim.gather_grads(&model.bag, model.grads(half, &[]));
    model.bag = optim.step_if(1.0, model.bag.clone(), grads, no);
    assert_eq!(values(&optim, &model), before);

    // The state carried into a new optimizer (a resumed run) gives the same steps, bit for bit.
    let mut copy = Model { bag: model.bag.clone(), members: model.members.clone() };
    let mut resumed = case.optimizer(&copy);
    for id in optim.params().to_vec() {
        if let Some((time, m1, m2)) = optim.moments::<2>(id) {
            resumed.set_moments(id, time, m1, m2).unwrap();
        }
        if let Some((time, m1, m2)) = optim.moments::<1>(id) {
            resumed.set_moments(id, time, m1, m2).unwrap();
        }
        if let Some((time, m1, m2)) = optim.moments::<3>(id) {
            resumed.set_moments(id, time, m1, m2).unwrap();
        }
        if let Some((time, m1, m2)) = optim.moments::<4>(id) {
            resumed.set_moments(id, time, m1, m2).unwrap();
        }
    }
    resumed.set_prodigy_plus_state(optim.prodigy_plus_state().unwrap()).unwrap();
    for s in half..STEPS {
        step(&mut optim, &mut model, case, s);
        check_step(&f, case, s, &model, &optim);
        step(&mut resumed, &mut copy, case, s);
        assert_eq!(values(&optim, &model), values(&resumed, &copy), "step {s}");
        for t in all() {
            assert_eq!(model.values(&model.bag, t), copy.values(&copy.bag, t), "step {s} tensor {t}");
        }
    }
    // The state must fit: a wrong length is an error naming it; another optimizer has none.
    let mut wrong = optim.prodigy_plus_state().unwrap();
    wrong.s = wrong.s.slice(0..3);
    let err = resumed.set_prodigy_plus_state(wrong).unwrap_err().to_string();
    assert!(err.contains("Prodigy + schedule-free state s"), "{err}");
    let mut plain = FlatAdamW::new(AdamWSettings::default(), &model.bag, &Default::default());
    assert!(!plain.is_schedule_free() && plain.set_prodigy_plus_state(optim.prodigy_plus_state().unwrap()).is_err());
    assert!(!resumed.with_lion().is_schedule_free());
}

#[test]
fn bad_settings_and_groups_are_errors() {
    let model = Model::new(&all());
    let d = ProdigyPlusSettings::default();
    let bad = [
        ProdigyPlusSettings { betas: (0.0, 0.99), ..d },
        ProdigyPlusSettings { betas: (0.9, 1.0), ..d },
        ProdigyPlusSettings { beta3: Some(1.5), ..d },
        ProdigyPlusSettings { d0: 0.0, ..d },
        ProdigyPlusSettings { d_coef: f32::NAN, ..d },
        ProdigyPlusSettings { eps: -1.0, ..d },
        ProdigyPlusSettings { weight_decay: -0.1, ..d },
    ];
    let new = || FlatAdamW::new(AdamWSettings::default(), &model.bag, &Default::default());
    for settings in bad {
        let err = new().with_prodigy_plus(settings, |_| 0).expect_err("an error").to_string();
        assert!(err.contains("Prodigy + schedule-free"), "{settings:?}: {err}");
    }
    let err = new().with_prodigy_plus(d, |_| 1).expect_err("group 0 is empty").to_string();
    assert!(err.contains("parameter group 0 has no tensors"), "{err}");
    let a = model.id(0);
    let err = new().with_lr_scales(|id| if id == a { 2.0 } else { 1.0 }).with_prodigy_plus(d, |_| 0).expect_err("two rates in a group").to_string();
    assert!(err.contains("learning-rate factors"), "{err}");
    // Unknown keys are errors too (serde).
    assert!(serde_json::from_str::<ProdigyPlusSettings>(r#"{"use_muon_pp": true}"#).is_err());
}

/// A group at a learning-rate factor of 0 (kohya leaves it out of the optimizer) neither
/// moves nor counts in the shared mean: the other group steps at its own estimate.
#[test]
fn a_group_at_factor_zero_stays_out_of_the_mean() {
    let case = Case { name: "frozen", settings: ProdigyPlusSettings { d0: 1e-4, ..Default::default() }, group_lr: &[1.0, 0.0], no_grad: &[] };
    let mut model = Model::new(&all());
    let mut optim = case.optimizer(&model);
    for s in 0..STEPS {
        step(&mut optim, &mut model, &case, s);
    }
    let d: Vec<f32> = optim.prodigy_plus_d().unwrap().into_data().to_vec().unwrap();
    let shared: f32 = optim.prodigy_plus_step_d().unwrap().into_scalar();
    assert!(d[0] > 2e-4, "the live group's estimate grew: {d:?}");
    assert!((shared - d[0]).abs() <= 1e-6 * d[0], "the mean is the live group's own: {shared} against {d:?}");
    for t in all().into_iter().filter(|t| TENSORS[*t].3 == 1) {
        assert_eq!(model.values(&model.bag, t), start(t), "tensor {} at factor 0 moved", TENSORS[t].0);
    }
}
