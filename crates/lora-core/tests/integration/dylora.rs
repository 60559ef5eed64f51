//! DyLoRA against kohya's `networks/dylora.py` as PyTorch trains it (fixtures from
//! `xtask/fixtures/lora_core_dylora.py`): the layer's output in each pass (the chunk's
//! factor), and the adapter after a few AdamW steps in which only the drawn chunks train
//! (PyTorch skips the ranks without a gradient: their values, moments and step counts
//! stay), with one or two passes per step.

use crate::common;

use burn::backend::{Autodiff, Flex};
use burn::module::{AutodiffModule, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{Linear, PaddingConfig2d};
use burn::optim::{GradientsAccumulator, GradientsParams};
use burn::tensor::Tensor;
use lora_core::dylora::TrainedChunks;
use lora_core::optim::{AdamWSettings, FlatAdamW};
use lora_core::{LoraConfig, LoraConv2d, LoraLinear, LoraSiteMut, LoraWeights};

use common::{rel_err, values, Fixture};

type B = Autodiff<Flex>;

/// One case's settings, as the script wrote them.
#[derive(serde::Deserialize)]
struct Case {
    layer: Vec<serde_json::Value>,
    rank: usize,
    alpha: f32,
    unit: usize,
    chunks: Vec<Vec<usize>>,
}

fn fixture() -> Fixture {
    Fixture::open("dylora.safetensors")
}

/// The case's base layer with the fixture's weights, and a DyLoRA adapter set to the
/// fixture's starting values (through `load_weights`, which keeps the unit).
fn layer<M>(
    f: &Fixture,
    name: &str,
    make: impl FnOnce(&Fixture, &str, &[usize]) -> M,
    site: fn(&mut M) -> LoraSiteMut<'_, B>,
) -> M {
    let case: Case = f.case(name);
    let dims: Vec<usize> = case.layer[1..]
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    let mut layer = make(f, name, &dims);
    let device = Default::default();
    let config = LoraConfig::new(case.rank)
        .with_alpha(case.alpha)
        .with_dylora_unit(Some(case.unit));
    site(&mut layer).attach_new(&config, &device).unwrap();
    let weights = LoraWeights::new(
        f.host(&format!("{name}.down0")).clone(),
        f.host(&format!("{name}.up0")).clone(),
        case.alpha,
        name,
    )
    .unwrap();
    site(&mut layer)
        .load_weights(&weights, name, &device)
        .unwrap();
    assert_eq!(
        site(&mut layer).dylora().map(|d| d.unit),
        Some(case.unit),
        "load_weights keeps the unit"
    );
    layer
}

fn linear(f: &Fixture, name: &str, _: &[usize]) -> LoraLinear<B> {
    let weight = Param::from_tensor(f.tensor::<B, 2>(&format!("{name}.weight")).transpose());
    let bias = Some(Param::from_tensor(
        f.tensor::<B, 1>(&format!("{name}.bias")),
    ));
    LoraLinear::new(Linear { weight, bias })
}

fn conv(f: &Fixture, name: &str, dims: &[usize]) -> LoraConv2d<B> {
    let k = dims[2];
    let device = Default::default();
    let base = Conv2dConfig::new([dims[0], dims[1]], [k, k])
        .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
        .init::<B>(&device);
    let weight = Param::from_tensor(f.tensor::<B, 4>(&format!("{name}.weight")));
    let bias = Some(Param::from_tensor(
        f.tensor::<B, 1>(&format!("{name}.bias")),
    ));
    LoraConv2d::new(Conv2d {
        weight,
        bias,
        ..base
    })
}

fn linear_site(l: &mut LoraLinear<B>) -> LoraSiteMut<'_, B> {
    LoraSiteMut::Linear(l)
}

fn conv_site(c: &mut LoraConv2d<B>) -> LoraSiteMut<'_, B> {
    LoraSiteMut::Conv(c)
}

fn linear_forward(l: &LoraLinear<B>, f: &Fixture, key: &str) -> Tensor<B, 2> {
    l.forward(f.tensor::<B, 2>(key))
}

fn conv_forward(c: &LoraConv2d<B>, f: &Fixture, key: &str) -> Tensor<B, 2> {
    c.forward(f.tensor::<B, 4>(key)).flatten(1, 3)
}

/// The fixture's loss weights (or outputs) of one pass, shaped as `forward`'s output.
fn flat(f: &Fixture, key: &str, like: &Tensor<B, 2>) -> Tensor<B, 2> {
    Tensor::from_data(
        burn::tensor::TensorData::new(f.host(key).data.clone(), like.dims()),
        &Default::default(),
    )
}

/// Trains the case's layer as the script did, with the fixture's chunks; `chunked`: the
/// optimizer updates only the chunks that trained (else every rank, as a plain LoRA's
/// AdamW would). Returns the worst output error and the final adapter.
fn train<M: AutodiffModule<B>>(
    f: &Fixture,
    name: &str,
    mut layer: M,
    site: fn(&mut M) -> LoraSiteMut<'_, B>,
    forward: fn(&M, &Fixture, &str) -> Tensor<B, 2>,
    chunked: bool,
) -> (f64, LoraWeights) {
    let case: Case = f.case(name);
    let (lr, weight_decay): (f64, f32) = (f.case("lr"), f.case("weight_decay"));
    let device = Default::default();
    let settings = AdamWSettings {
        beta_1: 0.9,
        beta_2: 0.999,
        epsilon: 1e-8,
        weight_decay,
    };
    let chunks: std::collections::HashMap<_, _> =
        site(&mut layer).dylora_rank_chunks().into_iter().collect();
    assert_eq!(chunks.len(), 2, "down and up are cut into chunks");
    let mut optim = FlatAdamW::new(settings, &layer, &device);
    if chunked {
        optim = optim
            .with_rank_chunks(|id| chunks.get(&id).copied())
            .unwrap();
    }
    let mut worst: f64 = 0.0;
    for (s, passes) in case.chunks.iter().enumerate() {
        let mut trained = TrainedChunks::default();
        let mut acc = GradientsAccumulator::<M>::new();
        for (p, chunk) in passes.iter().enumerate() {
            site(&mut layer).set_dylora_chunk(Some(*chunk));
            for (id, _) in site(&mut layer).dylora_rank_chunks() {
                trained.insert(id, *chunk);
            }
            let y = forward(&layer, f, &format!("{name}.x.{s}.{p}"));
            let want = flat(f, &format!("{name}.y.{s}.{p}"), &y);
            worst = worst.max(rel_err(&values(y.clone().inner()), &values(want.inner())));
            let g = flat(f, &format!("{name}.g.{s}.{p}"), &y);
            let grads = (y * g).sum().backward();
            acc.accumulate(&layer, GradientsParams::from_grads(grads, &layer));
        }
        let grads = optim.restrict_to_chunks(optim.gather_grads(&layer, acc.grads()), &trained);
        layer = optim.step(lr, layer, grads);
        site(&mut layer).set_dylora_chunk(None);
    }
    let weights = site(&mut layer).adapter_weights().unwrap().unwrap();
    (worst, weights)
}

/// The adapter after training against the fixture's: `(down error, up error)`.
fn final_errors(f: &Fixture, name: &str, w: &LoraWeights) -> (f64, f64) {
    let (down, up) = (
        f.host(&format!("{name}.down")),
        f.host(&format!("{name}.up")),
    );
    (
        rel_err(&w.down.data, &down.data),
        rel_err(&w.up.data, &up.data),
    )
}

fn check(name: &str, result: (f64, LoraWeights)) {
    let f = fixture();
    let (worst, weights) = result;
    assert!(worst < 1e-5, "{name}: outputs off by {worst:.2e}");
    let (down, up) = final_errors(&f, name, &weights);
    assert!(
        down < 1e-5 && up < 1e-5,
        "{name}: trained adapter off by {down:.2e} / {up:.2e}"
    );
}

#[test]
fn linear_trains_as_kohya() {
    let f = fixture();
    let layer = layer(&f, "linear", linear, linear_site);
    check("linear", train(&f, "linear", layer, linear_site, linear_forward, true));
}

#[test]
fn conv_trains_as_kohya() {
    let f = fixture();
    let layer = layer(&f, "conv", conv, conv_site);
    check("conv", train(&f, "conv", layer, conv_site, conv_forward, true));
}

#[test]
fn accumulated_passes_train_both_chunks() {
    let f = fixture();
    let layer = layer(&f, "accumulated", linear, linear_site);
    check("accumulated", train(&f, "accumulated", layer, linear_site, linear_forward, true));
}

/// Without the chunk-wise update (every rank's moments, decay and step count moving each
/// step) the same passes end elsewhere: what the fixture checks is the optimizer's part.
#[test]
fn updating_every_rank_is_not_kohyas_dylora() {
    let f = fixture();
    let layer = layer(&f, "linear", linear, linear_site);
    let (worst, weights) = train(&f, "linear", layer, linear_site, linear_forward, false);
    assert!(
        worst > 1e-4,
        "the outputs of later steps differ once the weights do"
    );
    let (down, up) = final_errors(&f, "linear", &weights);
    assert!(down.max(up) > 1e-3, "{down:.2e} / {up:.2e}");
}

/// A drawn chunk changes the pass on any backend (a gradient-checkpointed step's first pass
/// runs without autodiff and must compute what its recomputation does); without one the
/// adapter is the plain LoRA it saves as.
#[test]
fn chunk_applies_without_autodiff_and_clears() {
    let f = fixture();
    let mut layer = layer(&f, "linear", linear, linear_site);
    let x = f.tensor::<B, 2>("linear.x.0.0");
    let plain = layer.forward(x.clone());
    LoraSiteMut::Linear(&mut layer).set_dylora_chunk(Some(0));
    let with_graph = layer.forward(x.clone());
    let without = layer.valid().forward(x.clone().inner());
    assert!(rel_err(&values(with_graph.clone().inner()), &values(without)) < 1e-6);
    assert!(
        rel_err(&values(with_graph.inner()), &values(plain.clone().inner())) > 1e-3,
        "chunk 0 of rank 4 in units of 2 multiplies the update by sqrt(2)"
    );
    LoraSiteMut::Linear(&mut layer).set_dylora_chunk(None);
    assert_eq!(values(layer.forward(x).inner()), values(plain.inner()));
}
