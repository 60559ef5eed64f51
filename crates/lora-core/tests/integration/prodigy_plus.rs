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
use lora_core::optim::{share_prodigy_plus, AdamWSettings, FlatAdamW, ProdigyPlusSettings, TorchLayout};

use crate::common;

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
    /// Whether the bag holds the 2-D tensors transposed (as burn's `Linear` holds a
    /// linear LoRA's) and the 3-D ones in another shape (as a convolution's full LoKr
    /// `lokr_w2`).
    other_layouts: bool,
}

/// How the bag holds fixture tensor `t`: its shape and PyTorch's layout of it.
fn stored(t: usize, other_layouts: bool) -> (Vec<usize>, Option<TorchLayout>) {
    let shape = TENSORS[t].1;
    match (other_layouts, shape.len()) {
        (true, 2) => (vec![shape[1], shape[0]], Some(TorchLayout::Transposed)),
        // Still 3-D, to keep the bag's order of tensors.
        (true, 3) => (vec![shape[0], shape[1] * shape[2], 1], Some(TorchLayout::Reshaped(shape.to_vec()))),
        _ => (shape.to_vec(), None),
    }
}

/// `values` of a `[rows, cols]` matrix, transposed.
fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    (0..cols).flat_map(|c| (0..rows).map(move |r| values[r * cols + c])).collect()
}

/// Fixture tensor `t`'s values (PyTorch's order) as the bag holds them, or back with `back`.
fn relayout(values: Vec<f32>, t: usize, other_layouts: bool, back: bool) -> Vec<f32> {
    let shape = TENSORS[t].1;
    match stored(t, other_layouts).1 {
        Some(TorchLayout::Transposed) if back => transpose(&values, shape[1], shape[0]),
        Some(TorchLayout::Transposed) => transpose(&values, shape[0], shape[1]),
        _ => values,
    }
}

fn param<const D: usize>(values: Vec<f32>, shape: &[usize]) -> Param<Tensor<AD, D>> {
    let shape: [usize; D] = shape.try_into().unwrap();
    Param::from_tensor(Tensor::<AD, D>::from_data(TensorData::new(values, shape), &Default::default()).require_grad())
}

impl Model {
    /// The fixture's tensors `which`, at their starts.
    fn new(which: &[usize]) -> Self {
        Self::with_layouts(which, false)
    }

    /// [`new`](Self::new), the 2-D and 3-D tensors held in other layouts than PyTorch's
    /// with `other_layouts`.
    fn with_layouts(which: &[usize], other_layouts: bool) -> Self {
        let mut bag = Bag { one: vec![], two: vec![], three: vec![], four: vec![] };
        let mut members = vec![];
        for &t in which {
            let shape = stored(t, other_layouts).0;
            let v = relayout(start(t), t, other_layouts, false);
            let position = match shape.len() {
                1 => (bag.one.push(param::<1>(v, &shape)), bag.one.len() - 1).1,
                2 => (bag.two.push(param::<2>(v, &shape)), bag.two.len() - 1).1,
                3 => (bag.three.push(param::<3>(v, &shape)), bag.three.len() - 1).1,
                _ => (bag.four.push(param::<4>(v, &shape)), bag.four.len() - 1).1,
            };
            members.push((t, shape.len(), position));
        }
        Self { bag, members, other_layouts }
    }

    /// PyTorch's layout of each tensor held otherwise.
    fn torch_layout(&self, id: ParamId) -> Option<TorchLayout> {
        let &(t, _, _) = self.members.iter().find(|m| self.id(m.0) == id)?;
        stored(t, self.other_layouts).1
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
            let g = gradient(t, step, &self.values(&self.bag, t));
            let data = TensorData::new(relayout(g, t, self.other_layouts, false), stored(t, self.other_layouts).0);
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

    /// `bag`'s values of fixture tensor `t`, in PyTorch's order.
    fn values(&self, bag: &Bag<AD>, t: usize) -> Vec<f32> {
        let &(_, rank, i) = self.members.iter().find(|m| m.0 == t).unwrap();
        relayout(Self::values_of(bag, rank, i), t, self.other_layouts, true)
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
            .with_torch_layouts(|id| model.torch_layout(id))
            .unwrap()
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
    follows_the_package(false);
}

/// With the linear LoRAs' layout (2-D tensors transposed against PyTorch's) and tensors in
/// another shape (a convolution's full LoKr `lokr_w2`: 2-d here, 4-d there): the estimate
/// reads the values in PyTorch's order and the factored moments reduce its dimensions.
#[test]
fn prodigy_plus_follows_the_package_in_other_layouts() {
    follows_the_package(true);
}

fn follows_the_package(other_layouts: bool) {
    let f = common::f32_fixture("prodigy_plus.safetensors");
    for case in cases() {
        let mut model = Model::with_layouts(&all(), other_layouts);
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
/// mean, step as the package's one optimizer with both groups; so do they with the groups
/// pooled (`split_groups = false`: every group's sums in the first's).
#[test]
fn two_optimizers_share_their_groups_mean() {
    let f = common::f32_fixture("prodigy_plus.safetensors");
    for case in cases().into_iter().filter(|c| ["defaults", "grouped", "pooled"].contains(&c.name)) {
        let (first, second): (Vec<usize>, Vec<usize>) = all().into_iter().partition(|t| TENSORS[*t].3 == 0);
        let (mut m1, mut m2) = (Model::new(&first), Model::new(&second));
        let (mut o1, mut o2) = (case.optimizer(&m1), case.optimizer(&m2));
        for s in 0..STEPS {
            step(&mut o1, &mut m1, &case, s);
            step(&mut o2, &mut m2, &case, s);
            share_prodigy_plus(&mut [&mut o1, &mut o2], &[]).unwrap();
            check_step(&f, &case, s, &m1, &o1);
            check_step(&f, &case, s, &m2, &o2);
        }
    }
}

/// The package's groups split between optimizers (SDXL's two text encoders are one group
/// in kohya) and pooled: their sums make one estimate, counted once in the mean; a group's
/// average advances when its last tensor (the pool's last optimizer's) had a gradient; and
/// without `split_groups`, the first group's `d_prev` follows the estimate in every
/// optimizer that holds part of it.
#[test]
fn a_group_split_between_optimizers_pools_its_sums() {
    let f = common::f32_fixture("prodigy_plus.safetensors");
    // Group 0 (a, c, f, g, m) in two optimizers, group 1 (b, e, h) in two, `h` (group 1's
    // last, without a gradient in some steps) alone in the last.
    let parts = [vec![0, 2, 4], vec![5, 7], vec![1, 3], vec![6]];
    let pools = [vec![(0, 0), (1, 0)], vec![(2, 0), (3, 0)]];
    for case in cases().into_iter().filter(|c| ["defaults", "grouped", "bias_speed", "adopt_bias", "pooled"].contains(&c.name)) {
        let mut models: Vec<Model> = parts.iter().map(|p| Model::new(p)).collect();
        let mut optims: Vec<FlatAdamW<AD>> = models.iter().map(|m| case.optimizer(m)).collect();
        let groups = case.group_lr.len();
        for s in 0..STEPS {
            for (o, m) in optims.iter_mut().zip(&mut models) {
                step(o, m, &case, s);
            }
            let mut refs: Vec<&mut FlatAdamW<AD>> = optims.iter_mut().collect();
            share_prodigy_plus(&mut refs, &pools[..groups]).unwrap();
            for (o, m) in optims.iter().zip(&models) {
                check_step(&f, &case, s, m, o);
            }
            let d: Vec<f32> = [0, 2][..groups].iter().flat_map(|i| optims[*i].prodigy_plus_d().unwrap().into_data().to_vec::<f32>().unwrap()).collect();
            assert_close(&d, &f[&format!("{}.d", case.name)].1[s * groups..(s + 1) * groups], 1e-4, 0.0, &format!("{} step {s} d", case.name));
        }
    }
    // A pool must name groups that are there, each once, all training or none.
    let case = &cases()[1];
    let models = [Model::new(&[0]), Model::new(&[1])];
    let mut o: Vec<FlatAdamW<AD>> = models.iter().map(|m| case.optimizer(m)).collect();
    let frozen = Case { group_lr: &[1.0, 0.0], ..cases().swap_remove(1) };
    o.push(frozen.optimizer(&models[1]));
    let [a, b, c] = &mut o[..] else { unreachable!() };
    for (pools, expect) in [
        (vec![vec![(0, 0), (5, 0)]], "(5, 0)"),
        (vec![vec![(0, 0), (0, 0)]], "pooled twice"),
        (vec![vec![(0, 0), (2, 0)]], "mixes groups"),
    ] {
        let err = share_prodigy_plus(&mut [&mut *a, &mut *b, &mut *c], &pools).unwrap_err().to_string();
        assert!(err.contains(expect), "{err}");
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
    let mut copy = Model { bag: model.bag.clone(), members: model.members.clone(), other_layouts: false };
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
/// moves (not by weight decay either) nor counts in the shared mean or the pooled sums:
/// the other group steps as an optimizer of its tensors alone.
#[test]
fn a_group_at_factor_zero_stays_out_of_the_optimizer() {
    let d = ProdigyPlusSettings { d0: 1e-4, weight_decay: 0.05, ..Default::default() };
    // Frozen: group 1, or group 0 (then the first group that trains takes the first's
    // part without `split_groups`: its `d_prev` follows).
    for (frozen_group, group_lr) in [(1, &[1.0f32, 0.0][..]), (0, &[0.0, 1.0][..])] {
        let (frozen, live): (Vec<usize>, Vec<usize>) = all().into_iter().partition(|t| TENSORS[*t].3 == frozen_group);
        for settings in [ProdigyPlusSettings { weight_decay_by_lr: false, ..d }, ProdigyPlusSettings { split_groups: false, ..d }] {
            let case = Case { name: "frozen", settings, group_lr, no_grad: &[] };
            let alone = Case { group_lr: &[1.0], ..case };
            let (mut model, mut reference) = (Model::new(&all()), Model::new(&live));
            let (mut optim, mut reference_optim) = (case.optimizer(&model), alone.optimizer(&reference));
            let what = format!("group {frozen_group} frozen, {settings:?}");
            for s in 0..STEPS {
                step(&mut optim, &mut model, &case, s);
                step(&mut reference_optim, &mut reference, &alone, s);
                let d: Vec<f32> = optim.prodigy_plus_d().unwrap().into_data().to_vec().unwrap();
                let expected: Vec<f32> = reference_optim.prodigy_plus_d().unwrap().into_data().to_vec().unwrap();
                let live_group = 1 - frozen_group;
                assert_close(&d[live_group..live_group + 1], &expected, 1e-5, 0.0, &format!("{what} step {s} d"));
                let shared: f32 = optim.prodigy_plus_step_d().unwrap().into_scalar();
                let expected: f32 = reference_optim.prodigy_plus_step_d().unwrap().into_scalar();
                assert_close(&[shared], &[expected], 1e-5, 0.0, &format!("{what} step {s} shared d"));
                for &t in &live {
                    let name = TENSORS[t].0;
                    assert_close(&model.values(&model.bag, t), &reference.values(&reference.bag, t), 1e-5, 1e-9, &format!("{what} step {s} {name}"));
                }
            }
            let d: Vec<f32> = optim.prodigy_plus_d().unwrap().into_data().to_vec().unwrap();
            assert!(d[1 - frozen_group] > 2e-4, "the live group's estimate grew: {d:?}");
            for &t in &frozen {
                assert_eq!(model.values(&model.bag, t), start(t), "tensor {} at factor 0 moved", TENSORS[t].0);
                assert_eq!(model.values(&optim.to_eval(model.bag.clone()), t), start(t), "tensor {} at factor 0 moved", TENSORS[t].0);
            }
        }
    }
}

/// The sites name the tensors PyTorch holds otherwise, with PyTorch's shapes: a linear
/// LoRA's `down` / `up` (kohya's `[rank, in]` / `[out, rank]`) transposed, a convolution's
/// full LoKr `lokr_w2` 4-d as LyCORIS writes it; a convolution's LoRA and the other
/// LyCORIS factors as they are.
#[test]
fn sites_name_the_tensors_torch_holds_otherwise() {
    use burn::nn::conv::Conv2dConfig;
    use burn::nn::LinearConfig;
    use lora_core::{Algo, LoraConfig, LoraConv2d, LoraLinear, LoraSiteMut};

    let device = Default::default();
    let mut linear = LoraLinear::<AD>::new(LinearConfig::new(16, 24).init(&device));
    linear.attach_new(&LoraConfig::new(4), &device).unwrap();
    let torch = |dims: [usize; 2], layout: &TorchLayout| match layout {
        TorchLayout::Transposed => vec![dims[1], dims[0]],
        TorchLayout::Reshaped(shape) => shape.clone(),
    };
    let layouts = LoraSiteMut::Linear(&mut linear).torch_layouts();
    let adapter = linear.adapter.as_ref().unwrap();
    assert_eq!(layouts.len(), 2);
    assert_eq!((layouts[0].0, torch(adapter.down.weight.dims(), &layouts[0].1)), (adapter.down.weight.id, vec![4, 16]));
    assert_eq!((layouts[1].0, torch(adapter.up.weight.dims(), &layouts[1].1)), (adapter.up.weight.id, vec![24, 4]));

    let mut conv = LoraConv2d::<AD>::new(Conv2dConfig::new([8, 12], [3, 3]).init(&device));
    conv.attach_new(&LoraConfig::new(4), &device).unwrap();
    assert!(LoraSiteMut::Conv(&mut conv).torch_layouts().is_empty(), "a convolution's LoRA is 4-d as in torch");
    // A factor of 4 and rank 4: w2 (the larger halves, 12 = 3·4 out and 8 = 2·4 in) is full.
    conv.detach();
    conv.attach_new(&LoraConfig::new(4).with_algo(Algo::Lokr).with_lokr_factor(4), &device).unwrap();
    let layouts = LoraSiteMut::Conv(&mut conv).torch_layouts();
    let lokr = conv.lycoris.as_ref().unwrap();
    let written = lokr.to_lycoris_weights().unwrap();
    assert_eq!(layouts.len(), 1, "{layouts:?}");
    let w2 = lokr.names().iter().position(|n| *n == "lokr_w2").unwrap();
    assert_eq!(layouts[0], (lokr.factors[w2].id, TorchLayout::Reshaped(vec![4, 4, 3, 3])));
    assert_eq!(written.tensors[w2].1.shape, vec![4, 4, 3, 3]);
}

/// An empty tensor (a dimension of 0, factored or not) takes no part: the others step as
/// without it.
#[test]
fn an_empty_tensor_changes_nothing() {
    let mut with_empty = Model::new(&[0, 4]);
    with_empty.bag.two.insert(0, param::<2>(vec![], &[0, 64]));
    with_empty.bag.three.push(param::<3>(vec![], &[2, 0, 3]));
    with_empty.members.iter_mut().filter(|m| m.1 == 2).for_each(|m| m.2 += 1);
    let mut alone = Model::new(&[0, 4]);
    let case = &cases()[0];
    let optimizer = |m: &Model| FlatAdamW::new(AdamWSettings::default(), &m.bag, &Default::default()).with_prodigy_plus(case.settings, |_| 0).unwrap();
    let (mut o1, mut o2) = (optimizer(&with_empty), optimizer(&alone));
    for s in 0..4 {
        step(&mut o1, &mut with_empty, case, s);
        step(&mut o2, &mut alone, case, s);
        for t in [0, 4] {
            assert_close(&with_empty.values(&with_empty.bag, t), &alone.values(&alone.bag, t), 1e-6, 0.0, &format!("step {s} tensor {t}"));
        }
    }
    assert_eq!(o1.prodigy_plus_d().unwrap().into_data(), o2.prodigy_plus_d().unwrap().into_data());
}
