//! LyCORIS' LoHa and LoKr adapters, trained as LyCORIS trains them (and the same holder
//! for the OFTs, [`crate::oft`], and GLoRA, [`crate::glora`]).
//!
//! A [`LycorisAdapter`] holds the factors of one layer's update `ΔW` (`[out, cols]`, with
//! `cols = in·kh·kw` for a convolution) in LyCORIS' names and layout:
//!
//! - LoHa: `ΔW = scale · (hada_w1_a · hada_w1_b) ⊙ (hada_w2_a · hada_w2_b)`, each product of
//!   rank `r`. Initialised as LyCORIS does: `w1_b` and `w2_b` from N(0, 1), `w1_a` from
//!   N(0, 0.1²) and `w2_a` at zero, so a fresh adapter leaves the layer unchanged.
//! - LoKr: `ΔW = scale · lokr_w1 ⊗ lokr_w2`, with `out = a·b` and `in = c·d` split by
//!   [`factorization`]. `w1` is `[a, c]`, full unless `decompose_both` and the rank is
//!   below half its larger side; `w2` is `[b, d·kh·kw]`, the product `lokr_w2_a · lokr_w2_b`
//!   unless the rank is at least half its larger side (then full). `full_matrix` makes
//!   both halves full; `unbalanced_factorization` swaps the output side's `a` and `b`
//!   (`w1` takes the larger). `lokr_w1`, `lokr_w1_a`,
//!   `lokr_w1_b` and `lokr_w2_a` start Kaiming-uniform (PyTorch's default), `lokr_w2` /
//!   `lokr_w2_b` at zero. With both halves full the scale is 1 (LyCORIS' too, except that
//!   with rsLoRA its training scale is then `sqrt(r)`, which its files cannot record:
//!   readers apply 1).
//!
//! The scale is `alpha / r` (`alpha / sqrt(r)` with rsLoRA). LyCORIS' default forward
//! (not its bypass mode) forms `ΔW` and adds `x · (multiplier · ΔW)` to the base layer's
//! output, which is what a layer with a bf16 / f16 base does here (`W + ΔW` in half
//! precision would round the small update to the weight's precision). With an f32 base
//! the layer takes the weight `W + multiplier · ΔW` in one product instead: the same
//! output and gradients, with one matmul or convolution of the layer's size instead of two
//! each way. Module dropout skips the update for a pass; with [`LoraConfig::rank_dropout`],
//! LyCORIS' rank dropout drops whole rows of `ΔW` (one per output) per pass (Diag-OFT's
//! drops entries of its rotation instead, see [`crate::oft`]; kohya's OFT, BOFT, GLoRA and
//! (IA)³ take none: an error); LyCORIS' other dropouts are not trained.
//!
//! With [`LoraConfig::use_tucker`] (LyCORIS' `use_tucker`), a convolution with a kernel
//! larger than 1x1 has each LoHa half, and LoKr's low-rank `w2`, Tucker-decomposed: a core
//! `t [r, r, kh, kw]` (`hada_t1`, `hada_t2`, `lokr_t2`) with `a [r, out]` and `b [r, in]`,
//! the half being `W[o, c, h, w] = Σᵢⱼ t[i, j, h, w] · a[i, o] · b[j, c]`. The cores start
//! as LyCORIS starts them (LoHa's from N(0, 0.1²), LoKr's Kaiming-uniform) and the halves'
//! `a`, `b` as their non-Tucker counterparts. Each pass forms the non-Tucker halves of the
//! same update from them (`aᵀ` and the core contracted with `b`) in the autodiff graph.
//!
//! With [`LoraConfig::dora`] (LyCORIS' `weight_decompose`, kohya's `dora_wd`) the adapter
//! also trains a magnitude per output, `m` (starting at the base weight's norms, LyCORIS'
//! `dora_scale`), and the layer's weight becomes `m ⊙ (W + ΔW) / ‖W + ΔW‖`, the norm per
//! output and in the autodiff graph, as in LyCORIS ([`LycorisAdapter::update`]).
//!
//! ```
//! use burn::backend::{Autodiff, Flex};
//! use burn::nn::LinearConfig;
//! use burn::tensor::Tensor;
//! use lora_core::{Algo, LoraConfig, LoraLinear};
//!
//! type B = Autodiff<Flex>;
//! let device = Default::default();
//! let mut layer = LoraLinear::new(LinearConfig::new(8, 12).init::<B>(&device));
//! layer.attach_new(&LoraConfig::new(2).with_algo(Algo::Loha), &device).unwrap();
//! let loha = layer.lycoris.as_ref().unwrap();
//! assert_eq!(loha.names(), ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"]);
//! let x = Tensor::<B, 2>::ones([3, 8], &device);
//! // `hada_w2_a` starts at zero: the layer's output is unchanged.
//! assert_eq!(layer.forward(x.clone()).into_data(), layer.base.forward(x.clone()).into_data());
//! let grads = layer.forward(x).sum().backward();
//! assert!(loha.factors[2].grad(&grads).is_some()); // hada_w2_a
//! assert!(layer.base.weight.grad(&grads).is_none()); // frozen
//! ```

use burn::module::{Module, Param};
use burn::tensor::{backend::Backend, DType, Tensor};

use crate::init::{Draw, InitRng};
use crate::precision::cast_to;
use crate::{Algo, HostTensor, LoraConfig, LoraError, LoraWeights, LycorisWeights, Result};

/// `dimension = m · n` with `m ≤ n`, `m` the divisor closest to `factor` from below
/// (`factor = -1`: as close to `sqrt(dimension)` as the divisors allow), as LyCORIS'
/// `factorization` splits a LoKr's sides. A positive `factor` that divides `dimension` is
/// taken as it is.
///
/// ```
/// use lora_core::lycoris::factorization;
/// assert_eq!(factorization(128, -1), (8, 16));
/// assert_eq!(factorization(320, -1), (16, 20));
/// assert_eq!(factorization(360, 8), (8, 45));
/// assert_eq!(factorization(250, 4), (2, 125));
/// assert_eq!(factorization(127, -1), (1, 127));
/// ```
pub fn factorization(dimension: usize, factor: i64) -> (usize, usize) {
    if factor > 0 && dimension.is_multiple_of(factor as usize) {
        let m = factor as usize;
        let n = dimension / m;
        return (m.min(n), m.max(n));
    }
    let limit = if factor < 0 { dimension } else { factor as usize };
    let (mut m, mut n) = (1, dimension);
    let length = m + n;
    while m < n {
        let mut new_m = m + 1;
        while !dimension.is_multiple_of(new_m) {
            new_m += 1;
        }
        let new_n = dimension / new_m;
        if new_m + new_n > length || new_m > limit {
            break;
        }
        (m, n) = (new_m, new_n);
    }
    (m.min(n), m.max(n))
}

/// One layer's LoHa or LoKr factors, trainable (see the [module docs](self)), its
/// OFT blocks (kohya's [`Algo::Oft`] or LyCORIS' [`Algo::DiagOft`] / [`Algo::Boft`],
/// [`crate::oft`]: the factor `oft_blocks` kept as `[k·n, n]` (BOFT's as `[m·k·n, n]`),
/// LyCORIS' `rescale` as `[out, 1]`, `scale` holding the alpha), or its GLoRA factors
/// ([`Algo::Glora`], [`crate::glora`]: `a1.weight [in, r]`, `a2.weight [r, in]`,
/// `b1.weight [out, r]`, `b2.weight [r, in·kh·kw]`), or its (IA)³ scale ([`Algo::Ia3`],
/// [`crate::ia3`]: `weight [channels, 1]`), or its full differences ([`Algo::Full`],
/// [`crate::full`]: `diff [out, in·kh·kw]` and, for a layer with a bias, `diff_b [out, 1]`).
#[derive(Module, Debug)]
pub struct LycorisAdapter<B: Backend> {
    /// The factors, named by [`names`](Self::names), each `[rows, cols]` in LyCORIS'
    /// layout (a convolution's kernel flattened into the columns; a full `lokr_w2` of a
    /// convolution and the Tucker cores too, which LyCORIS keeps 4-d). Replace values only:
    /// the names, their order and the shapes are the adapter's.
    pub factors: Vec<Param<Tensor<B, 2>>>,
    /// The LyCORIS names of the factors.
    #[module(skip)]
    names: Vec<&'static str>,
    /// LoHa or LoKr.
    #[module(skip)]
    algo: Algo,
    /// The update's shape `[out, in, kh, kw]` (`kh = kw = 1` for a linear layer).
    #[module(skip)]
    shape: [usize; 4],
    /// Whether the layer is a convolution (its files keep a full `lokr_w2` 4-d).
    #[module(skip)]
    conv: bool,
    /// The factor on the product: `alpha / r` (`alpha / sqrt(r)` with rsLoRA; 1 for a LoKr
    /// with two full halves).
    pub scale: f32,
    /// kohya's module dropout probability (autodiff backends only): a pass skips the update.
    pub module_dropout: f64,
    /// LyCORIS' rank dropout probability (autodiff backends only): each pass drops each
    /// output's row of `ΔW` with it ([`LoraConfig::rank_dropout`]).
    pub rank_dropout: f64,
    /// LyCORIS' `rank_dropout_scale`: the kept rows are divided by the share kept.
    pub rank_dropout_scale: bool,
    /// DoRA's magnitude `m`, `[out]` in f32 (LyCORIS' `weight_decompose`, its `dora_scale`
    /// with `wd_on_out`), trained; `None` without DoRA. The layers set it from their base
    /// weight's norms when they attach a new adapter with [`LoraConfig::dora`].
    pub magnitude: Option<Param<Tensor<B, 1>>>,
    /// LyCORIS' trained scalar on the update, `[1]` ([`LoraConfig::use_scalar`]); `None`
    /// without one (a factor of 1).
    pub scalar: Option<Param<Tensor<B, 1>>>,
    /// An (IA)³'s scale is per input channel ([`LoraConfig::ia3_on_input`]).
    #[module(skip)]
    ia3_on_input: bool,
}

/// PyTorch's default initialisation of a `[rows, cols]` weight (Kaiming-uniform with
/// `a = sqrt(5)`: bound `1 / sqrt(cols)`), as LyCORIS initialises LoKr's halves.
fn kaiming<B: Backend>(rng: &mut InitRng, rows: usize, cols: usize, device: &B::Device) -> Param<Tensor<B, 2>> {
    rng.param([rows, cols], Draw::kaiming(cols), device)
}

fn normal<B: Backend>(rng: &mut InitRng, rows: usize, cols: usize, std: f64, device: &B::Device) -> Param<Tensor<B, 2>> {
    rng.param([rows, cols], Draw::Normal(std), device)
}

fn zeros<B: Backend>(rows: usize, cols: usize, device: &B::Device) -> Param<Tensor<B, 2>> {
    Param::from_tensor(Tensor::zeros([rows, cols], device))
}

impl<B: Backend> LycorisAdapter<B> {
    /// A freshly initialised adapter (`config.algo` LoHa, LoKr or an OFT) for a layer with update
    /// shape `[out, in, kh, kw]`; `conv` tells a convolution (even 1x1) from a linear layer.
    pub fn new(config: &LoraConfig, [out, input, kh, kw]: [usize; 4], conv: bool, device: &B::Device) -> Result<Self> {
        config.validate()?;
        let r = config.rank;
        let k = kh * kw;
        let mut rng = InitRng::new(config);
        // LoKr reads a large rank as "full halves", and the OFTs as a block size.
        if matches!(config.algo, Algo::Loha | Algo::Glora) {
            config.check_rank_for(out, input * k)?;
        }
        // LyCORIS: only a kernel larger than 1x1 is Tucker-decomposed.
        let tucker = config.use_tucker && conv && k > 1;
        let scalar = config.use_scalar;
        let (names, factors, both_full) = match config.algo {
            Algo::Loha if tucker => {
                let factors = vec![
                    normal(&mut rng, r, r * k, 0.1, device),
                    normal(&mut rng, r, out, 0.1, device),
                    normal(&mut rng, r, input, 1.0, device),
                    normal(&mut rng, r, r * k, 0.1, device),
                    if scalar { normal(&mut rng, r, out, 0.1, device) } else { zeros(r, out, device) },
                    normal(&mut rng, r, input, 1.0, device),
                ];
                (vec!["hada_t1", "hada_w1_a", "hada_w1_b", "hada_t2", "hada_w2_a", "hada_w2_b"], factors, false)
            }
            Algo::Loha => {
                let cols = input * k;
                let w2_a = if scalar { normal(&mut rng, out, r, 0.1, device) } else { zeros(out, r, device) };
                let factors = vec![normal(&mut rng, out, r, 0.1, device), normal(&mut rng, r, cols, 1.0, device), w2_a, normal(&mut rng, r, cols, 1.0, device)];
                (vec!["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"], factors, false)
            }
            Algo::Lokr => {
                let (in_m, in_n) = factorization(input, config.lokr_factor);
                let (mut out_l, mut out_k) = factorization(out, config.lokr_factor);
                if config.lokr_unbalanced_factorization {
                    (out_l, out_k) = (out_k, out_l);
                }
                let full_matrix = config.lokr_full_matrix;
                let mut names = Vec::new();
                let mut factors = Vec::new();
                // LyCORIS compares the rank with half the larger side (a float division).
                let w1_full = full_matrix || !(config.lokr_decompose_both && 2 * r < out_l.max(in_m));
                if w1_full {
                    names.push("lokr_w1");
                    factors.push(kaiming(&mut rng, out_l, in_m, device));
                } else {
                    names.extend(["lokr_w1_a", "lokr_w1_b"]);
                    factors.extend([kaiming(&mut rng, out_l, r, device), kaiming(&mut rng, r, in_m, device)]);
                }
                let w2_full = full_matrix || 2 * r >= out_k.max(in_n);
                // The half that starts at zero, unless a scalar (at zero) holds the update.
                let zero_or_kaiming = |rng: &mut InitRng, rows, cols| if scalar { kaiming(rng, rows, cols, device) } else { zeros(rows, cols, device) };
                if w2_full {
                    names.push("lokr_w2");
                    factors.push(zero_or_kaiming(&mut rng, out_k, in_n * k));
                } else if tucker {
                    names.extend(["lokr_t2", "lokr_w2_a", "lokr_w2_b"]);
                    factors.extend([kaiming(&mut rng, r, r * k, device), kaiming(&mut rng, r, out_k, device), zero_or_kaiming(&mut rng, r, in_n)]);
                } else {
                    names.extend(["lokr_w2_a", "lokr_w2_b"]);
                    factors.extend([kaiming(&mut rng, out_k, r, device), zero_or_kaiming(&mut rng, r, in_n * k)]);
                }
                (names, factors, w1_full && w2_full)
            }
            Algo::Oft => {
                let (k, n) = crate::oft::block_shape(out, r).map_err(LoraError::InvalidConfig)?;
                (vec![crate::oft::BLOCKS], vec![zeros(k * n, n, device)], false)
            }
            Algo::DiagOft | Algo::Boft => {
                let (m, k, n) = match config.algo {
                    Algo::Boft => crate::oft::butterfly_shape(out, r).map_err(LoraError::InvalidConfig)?,
                    _ => {
                        let (k, n) = crate::oft::diag_block_shape(out, r);
                        (1, k, n)
                    }
                };
                let mut names = vec![crate::oft::BLOCKS];
                let mut factors = vec![zeros(m * k * n, n, device)];
                if config.oft_rescaled {
                    names.push(crate::oft::RESCALE);
                    factors.push(Param::from_tensor(Tensor::ones([out, 1], device)));
                }
                (names, factors, false)
            }
            Algo::Glora => {
                // LyCORIS: `a1` and `b1` Kaiming-uniform, `a2` and `b2` at zero unless a
                // scalar (at zero) holds the update.
                let zero_or_kaiming = |rng: &mut InitRng, rows, cols| if scalar { kaiming(rng, rows, cols, device) } else { zeros(rows, cols, device) };
                let factors = vec![kaiming(&mut rng, input, r, device), zero_or_kaiming(&mut rng, r, input), kaiming(&mut rng, out, r, device), zero_or_kaiming(&mut rng, r, input * k)];
                (crate::glora::NAMES.to_vec(), factors, false)
            }
            Algo::Ia3 => {
                // LyCORIS: one value per channel, starting at 0.
                let channels = if config.ia3_on_input { input } else { out };
                (vec![crate::ia3::WEIGHT], vec![zeros(channels, 1, device)], false)
            }
            // The weight's difference, starting at zero (LyCORIS' copy of the weight); the
            // bias's is added by a layer that has a bias when it attaches the adapter.
            Algo::Full => (vec![crate::full::DIFF], vec![zeros(out, input * k, device)], false),
            // A norm's scale's difference per channel (`[channels, 1]`, shape
            // `[channels, 1, 1, 1]`); the shift's is added by a norm with a shift.
            Algo::Norm => (vec![crate::norm::W_NORM], vec![zeros(out, 1, device)], false),
            Algo::Lora => return Err(LoraError::InvalidConfig("a LyCORIS adapter needs algo loha, lokr, oft, diag-oft, boft, glora, ia3 or full, not lora".into())),
        };
        Ok(Self {
            factors,
            names,
            algo: config.algo,
            shape: [out, input, kh, kw],
            conv,
            // LyCORIS: a LoKr with two full halves has scale 1 whatever the alpha. An OFT
            // keeps its alpha (the constraint per output).
            scale: if both_full || matches!(config.algo, Algo::Full | Algo::Norm) { 1.0 } else if config.algo.is_oft() { config.alpha } else { config.scale() },
            module_dropout: config.module_dropout,
            // Norm modules take module dropout only (see `crate::norm`).
            rank_dropout: if config.algo == Algo::Norm { 0.0 } else { config.rank_dropout },
            rank_dropout_scale: config.rank_dropout_scale,
            magnitude: None,
            scalar: scalar.then(|| Param::from_tensor(Tensor::zeros([1], device))),
            ia3_on_input: config.ia3_on_input,
        })
    }

    /// Builds an adapter from a file's LyCORIS tensors for a layer with update shape
    /// `[out, in, kh, kw]`, checking that they fit it; `key` names the adapter in errors.
    pub fn from_weights(weights: &LycorisWeights, shape: [usize; 4], conv: bool, key: &str, device: &B::Device) -> Result<Self> {
        let bad = |reason: String| LoraError::ShapeMismatch { key: key.into(), reason };
        if weights.algo.is_oft() {
            return Self::oft_from_weights(weights, shape, conv, key, device);
        }
        if weights.algo == Algo::Glora {
            return Self::glora_from_weights(weights, shape, conv, key, device);
        }
        if weights.algo == Algo::Ia3 {
            return Self::ia3_from_weights(weights, shape, conv, key, device);
        }
        if weights.algo == Algo::Full {
            return Self::full_from_weights(weights, shape, conv, key, device);
        }
        if weights.algo == Algo::Norm {
            return Self::norm_from_weights(weights, shape, key, device);
        }
        let names: Vec<&'static str> = match weights.algo {
            Algo::Loha if weights.get("hada_t1").is_some() => vec!["hada_t1", "hada_w1_a", "hada_w1_b", "hada_t2", "hada_w2_a", "hada_w2_b"],
            Algo::Loha => vec!["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"],
            Algo::Lokr => {
                let mut names = vec![];
                for half in ["lokr_w1", "lokr_w2"] {
                    match (weights.get(half).is_some(), names_of(half)) {
                        (true, (full, _, _)) => names.push(full),
                        (false, (_, a, b)) if half == "lokr_w2" && weights.get("lokr_t2").is_some() => names.extend(["lokr_t2", a, b]),
                        (false, (_, a, b)) => names.extend([a, b]),
                    }
                }
                names
            }
            Algo::Lora | Algo::Oft | Algo::DiagOft | Algo::Boft | Algo::Glora | Algo::Ia3 | Algo::Full | Algo::Norm => return Err(bad("not a LyCORIS adapter".into())),
        };
        if weights.tensors.len() != names.len() {
            let found: Vec<&str> = weights.tensors.iter().map(|(n, _)| n.as_str()).collect();
            return Err(bad(format!("a {} needs {names:?}, the weights have {found:?}", weights.algo.name())));
        }
        let mut factors = Vec::with_capacity(names.len());
        let [_, _, kh, kw] = shape;
        for name in &names {
            let t = weights.get(name).ok_or_else(|| bad(format!("`{name}` is missing")))?;
            let rows = *t.shape.first().ok_or_else(|| bad(format!("`{name}` is a scalar")))?;
            let is_core = TUCKER_HALVES.iter().any(|(core, _, _)| core == name);
            if is_core && (t.shape.len() != 4 || t.shape[2..] != [kh, kw]) {
                return Err(bad(format!("the Tucker core `{name}` is {:?}, the layer's kernel is {kh}x{kw} ([r, r, {kh}, {kw}] expected)", t.shape)));
            }
            // Stored 2-d, the kernel flattened into the columns.
            let flat = HostTensor { shape: vec![rows, t.numel() / rows.max(1)], data: t.data.clone() };
            factors.push(Param::from_tensor(flat.to_tensor::<B, 2>(device)?));
        }
        let adapter = Self::read(factors, names, weights.algo, shape, conv, weights.scale());
        let [out, input, kh, kw] = shape;
        let (rows, cols) = adapter.delta_shape().map_err(bad)?;
        if (rows, cols) != (out, input * kh * kw) {
            return Err(bad(format!("the update is [{rows}, {cols}], the layer's weight is [{out}, {}] ({input}→{out}, kernel {kh}x{kw})", input * kh * kw)));
        }
        Ok(adapter)
    }

    /// [`from_weights`](Self::from_weights) for an OFT: `oft_blocks` `[k, n, n]` with
    /// `k · n` the layer's outputs, kept as `[k · n, n]`, and Diag-OFT's `rescale` if any
    /// (kept as `[out, 1]`); the scale is the file's alpha (the constraint).
    fn oft_from_weights(weights: &LycorisWeights, shape: [usize; 4], conv: bool, key: &str, device: &B::Device) -> Result<Self> {
        let out = shape[0];
        // The tensors' names and shapes, against each other and this layer's outputs.
        let (m, k, n) = crate::oft::check_tensors(weights, out, key)?;
        let mut names = vec![];
        let mut factors = vec![];
        // Kept 2-d: the blocks `[m·k·n, n]`, the scale `[out, 1]`.
        for (name, (_, t)) in [crate::oft::BLOCKS, crate::oft::RESCALE].into_iter().zip(&weights.tensors) {
            let rows = if name == crate::oft::BLOCKS { m * k * n } else { out };
            names.push(name);
            let flat = HostTensor { shape: vec![rows, t.data.len() / rows.max(1)], data: t.data.clone() };
            factors.push(Param::from_tensor(flat.to_tensor::<B, 2>(device)?));
        }
        Ok(Self::read(factors, names, weights.algo, shape, conv, weights.alpha))
    }

    /// [`from_weights`](Self::from_weights) for a GLoRA: its four tensors checked against
    /// each other ([`crate::glora::check_tensors`]) and the layer, kept 2-d (a
    /// convolution's kernel flattened into `b2`'s columns).
    fn glora_from_weights(weights: &LycorisWeights, shape: [usize; 4], conv: bool, key: &str, device: &B::Device) -> Result<Self> {
        let found = crate::glora::check_tensors(weights, key)?;
        let [out, input, kh, kw] = shape;
        let kernel = found.kernel.unwrap_or([1, 1]);
        if (found.out, found.input, kernel) != (out, input, [kh, kw]) {
            return Err(LoraError::ShapeMismatch {
                key: key.into(),
                reason: format!("the GLoRA is for a {}→{} layer with a {}x{} kernel, the layer is {input}→{out} with {kh}x{kw}", found.input, found.out, kernel[0], kernel[1]),
            });
        }
        let mut factors = Vec::with_capacity(4);
        for (_, t) in &weights.tensors {
            let rows = t.shape[0];
            let flat = HostTensor { shape: vec![rows, t.data.len() / rows], data: t.data.clone() };
            factors.push(Param::from_tensor(flat.to_tensor::<B, 2>(device)?));
        }
        Ok(Self::read(factors, crate::glora::NAMES.to_vec(), Algo::Glora, shape, conv, weights.scale()))
    }

    /// [`from_weights`](Self::from_weights) for an (IA)³: its scale, one value per input or
    /// output channel of the layer ([`crate::ia3::check_tensors`]), kept as `[channels, 1]`.
    fn ia3_from_weights(weights: &LycorisWeights, shape: [usize; 4], conv: bool, key: &str, device: &B::Device) -> Result<Self> {
        let found = crate::ia3::check_tensors(weights, key)?;
        let [out, input, ..] = shape;
        let (side, want) = if found.on_input { ("inputs", input) } else { ("outputs", out) };
        if found.channels != want {
            return Err(LoraError::ShapeMismatch { key: key.into(), reason: format!("the (IA)³ scales {} channels, the layer has {want} {side}", found.channels) });
        }
        let scale = HostTensor { shape: vec![want, 1], data: weights.tensors[0].1.data.clone() };
        let factors = vec![Param::from_tensor(scale.to_tensor::<B, 2>(device)?)];
        Ok(Self { ia3_on_input: found.on_input, ..Self::read(factors, vec![crate::ia3::WEIGHT], Algo::Ia3, shape, conv, 1.0) })
    }

    /// [`from_weights`](Self::from_weights) for LyCORIS' full fine-tuning: `diff` of the
    /// layer's weight shape (kept as `[out, in·kh·kw]`) and `diff_b` `[out]` if any (kept as
    /// `[out, 1]`; the layer checks it against its bias, [`crate::LoraLinear::attach_lycoris`]).
    fn full_from_weights(weights: &LycorisWeights, shape: [usize; 4], conv: bool, key: &str, device: &B::Device) -> Result<Self> {
        let found = crate::full::check_tensors(weights, key)?;
        let [out, input, kh, kw] = shape;
        let kernel = found.kernel.unwrap_or([1, 1]);
        if (found.out, found.input, kernel) != (out, input, [kh, kw]) || (found.kernel.is_some() != conv && kh * kw > 1) {
            return Err(LoraError::ShapeMismatch {
                key: key.into(),
                reason: format!("the full difference is for a {}→{} layer with a {}x{} kernel, the layer is {input}→{out} with {kh}x{kw}", found.input, found.out, kernel[0], kernel[1]),
            });
        }
        let mut factors = Vec::with_capacity(2);
        let mut names = Vec::with_capacity(2);
        for ((name, t), cols) in weights.tensors.iter().zip([input * kh * kw, 1]) {
            let flat = HostTensor { shape: vec![out, cols], data: t.data.clone() };
            factors.push(Param::from_tensor(flat.to_tensor::<B, 2>(device)?));
            names.push(if name == crate::full::DIFF { crate::full::DIFF } else { crate::full::DIFF_B });
        }
        Ok(Self::read(factors, names, Algo::Full, shape, conv, 1.0))
    }

    /// [`from_weights`](Self::from_weights) for LyCORIS' norm module: `w_norm` and
    /// `b_norm` if any, `[channels]` each (kept as `[channels, 1]`), for a norm of
    /// `shape[0]` channels.
    fn norm_from_weights(weights: &LycorisWeights, shape: [usize; 4], key: &str, device: &B::Device) -> Result<Self> {
        let found = crate::norm::check_tensors(weights, key)?;
        if found.channels != shape[0] {
            return Err(LoraError::ShapeMismatch { key: key.into(), reason: format!("the norm module has {} channels, the norm {}", found.channels, shape[0]) });
        }
        let mut factors = Vec::with_capacity(2);
        let mut names = Vec::with_capacity(2);
        for (name, t) in &weights.tensors {
            let column = HostTensor { shape: vec![found.channels, 1], data: t.data.clone() };
            factors.push(Param::from_tensor(column.to_tensor::<B, 2>(device)?));
            names.push(if name == crate::norm::W_NORM { crate::norm::W_NORM } else { crate::norm::B_NORM });
        }
        Ok(Self::read(factors, names, Algo::Norm, [found.channels, 1, 1, 1], false, 1.0))
    }

    /// The name of the bias's (a norm's shift's) difference, for the algorithms that have
    /// one.
    pub(crate) fn bias_name(&self) -> Option<&'static str> {
        match self.algo {
            Algo::Full => Some(crate::full::DIFF_B),
            Algo::Norm => Some(crate::norm::B_NORM),
            _ => None,
        }
    }

    /// For LyCORIS' full fine-tuning ([`Algo::Full`]) on a layer with a bias, or a norm
    /// module ([`Algo::Norm`]) on a norm with a shift: the adapter with the bias's
    /// difference (`diff_b` / `b_norm`, starting at zero, on the weight's difference's
    /// device) beside the weight's. Any other adapter, or one that has it, is returned as
    /// it is.
    pub(crate) fn with_bias_update(mut self) -> Self {
        if let Some(name) = self.bias_name().filter(|n| self.factor(n).is_none()) {
            let device = self.factors[0].val().device();
            self.names.push(name);
            self.factors.push(zeros(self.shape[0], 1, &device));
        }
        self
    }

    /// A norm module's differences of the scale and the shift at strength `multiplier`,
    /// `[channels]` each in f32 in the graph of its tensors ([`delta`](Self::delta) and
    /// [`bias_delta`](Self::bias_delta)); with `dropout`, times module dropout's keep mask
    /// on autodiff backends (drawn on the device).
    pub(crate) fn norm_deltas(&self, multiplier: f32, dropout: bool) -> (Tensor<B, 1>, Option<Tensor<B, 1>>) {
        let dw = self.delta(multiplier).reshape([self.shape[0]]);
        let db = self.bias_delta(multiplier);
        let keep = if dropout { crate::rank_dropout::mask::<B>(0.0, self.module_dropout, 1, 1, &dw.device()) } else { None };
        match keep {
            Some(keep) => (dw * keep.clone().reshape([1]), db.map(|b| b * keep.reshape([1]))),
            None => (dw, db),
        }
    }

    /// The change of the layer's bias at strength `multiplier`, `[out]` in f32 in the
    /// graph of the adapter's tensors: LyCORIS' full fine-tuning's `multiplier · diff_b`;
    /// `None` for every other adapter (they leave the bias alone) and for a full one
    /// without it.
    pub fn bias_delta(&self, multiplier: f32) -> Option<Tensor<B, 1>> {
        let diff_b = self.factor(self.bias_name()?)?;
        Some(cast_to(diff_b.val(), DType::F32).reshape([self.shape[0]]).mul_scalar(multiplier))
    }

    /// An adapter read from a file: its factors under their names, with none of the
    /// training-only settings (dropouts, DoRA's magnitude, a trained scalar), which the
    /// caller sets where they apply.
    fn read(factors: Vec<Param<Tensor<B, 2>>>, names: Vec<&'static str>, algo: Algo, shape: [usize; 4], conv: bool, scale: f32) -> Self {
        Self {
            factors,
            names,
            algo,
            shape,
            conv,
            scale,
            module_dropout: 0.0,
            rank_dropout: 0.0,
            rank_dropout_scale: false,
            magnitude: None,
            scalar: None,
            ia3_on_input: false,
        }
    }

    /// Whether an (IA)³'s scale is per input channel (false for other algorithms).
    pub fn ia3_on_input(&self) -> bool {
        self.ia3_on_input
    }

    /// The factors' LyCORIS names (`hada_w1_a`, …), in the order of
    /// [`factors`](Self::factors).
    pub fn names(&self) -> &[&'static str] {
        &self.names
    }

    /// The shape `[out, in, kh, kw]` of the update (`kh = kw = 1` for a linear layer).
    pub fn shape(&self) -> [usize; 4] {
        self.shape
    }

    /// Whether the adapter was made for a convolution (a 1x1 one too), whose files keep a
    /// full `lokr_w2` 4-d.
    pub fn is_conv(&self) -> bool {
        self.conv
    }

    /// LoHa, LoKr or OFT.
    pub fn algo(&self) -> Algo {
        self.algo
    }

    /// Whether the layer's update depends on its base weight (DoRA's magnitude, an OFT or
    /// a GLoRA): merging it keeps the base weight to restore exactly.
    pub fn depends_on_base(&self) -> bool {
        self.is_dora() || self.algo.depends_on_base()
    }

    /// The rank of the low-rank products (LoHa's, or LoKr's `_a` / `_b` halves), kohya's
    /// OFT's number of blocks, Diag-OFT's block size (LyCORIS' `dim`) or GLoRA's rank;
    /// `None` for a LoKr whose halves are both full.
    pub fn rank(&self) -> Option<usize> {
        let rows = |name: &str| self.factor(name).map(|p| p.dims()[0]);
        match self.algo {
            Algo::Oft => self.factor(crate::oft::BLOCKS).map(|p| p.dims()[0] / p.dims()[1].max(1)),
            Algo::DiagOft | Algo::Boft => self.factor(crate::oft::BLOCKS).map(|p| p.dims()[1]),
            Algo::Loha => rows("hada_w1_b"),
            Algo::Glora => rows("a2.weight"),
            Algo::Ia3 | Algo::Full | Algo::Norm => None,
            _ => rows("lokr_w2_b").or_else(|| rows("lokr_w1_b")),
        }
    }

    fn factor(&self, name: &str) -> Option<&Param<Tensor<B, 2>>> {
        self.names.iter().position(|n| *n == name).map(|i| &self.factors[i])
    }

    /// `[rows, cols]` of the update the factors make, or why they do not fit each other.
    fn delta_shape(&self) -> std::result::Result<(usize, usize), String> {
        let [_, _, kh, kw] = self.shape;
        let tucker = self.tucker_dims(kh * kw)?;
        let dims = |name: &str| tucker.iter().find(|(n, _)| *n == name).map(|(_, d)| *d).or_else(|| self.factor(name).map(|p| p.dims()));
        let product = |a: [usize; 2], b: [usize; 2], what: &str| {
            if a[1] == b[0] {
                Ok([a[0], b[1]])
            } else {
                Err(format!("{what}_a is {a:?} but {what}_b is {b:?}"))
            }
        };
        match self.algo {
            Algo::Loha => {
                let [a1, b1, a2, b2] = ["hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"].map(|n| dims(n).expect("LoHa factors"));
                let (p1, p2) = (product(a1, b1, "hada_w1")?, product(a2, b2, "hada_w2")?);
                if p1 != p2 {
                    return Err(format!("hada_w1 makes {p1:?} but hada_w2 makes {p2:?}"));
                }
                Ok((p1[0], p1[1]))
            }
            _ => {
                let half = |h: &str| {
                    let (full, a, b) = names_of(h);
                    match dims(full) {
                        Some(d) => Ok(d),
                        None => product(dims(a).expect("LoKr factors"), dims(b).expect("LoKr factors"), h),
                    }
                };
                let (w1, w2) = (half("lokr_w1")?, half("lokr_w2")?);
                Ok((w1[0] * w2[0], w1[1] * w2[1]))
            }
        }
    }

    /// The shapes of the non-Tucker halves that Tucker-decomposed ones stand for
    /// (`_a` as `aᵀ`, `_b` as the core contracted with `b`), or why a core does not fit its
    /// halves; empty without Tucker halves.
    fn tucker_dims(&self, k: usize) -> std::result::Result<Vec<(&'static str, [usize; 2])>, String> {
        let mut out = Vec::new();
        for (core, a_name, b_name) in TUCKER_HALVES {
            let Some(t) = self.factor(core) else { continue };
            let (Some(a), Some(b)) = (self.factor(a_name), self.factor(b_name)) else {
                return Err(format!("`{core}` needs `{a_name}` and `{b_name}`"));
            };
            let ([r1, cols], [ra, out_dim], [r2, input]) = (t.dims(), a.dims(), b.dims());
            // LyCORIS' cores are square: `[r, r, kh, kw]`.
            if r1 == 0 || ra != r1 || r2 != r1 || cols != r2 * k {
                return Err(format!("`{core}` is [{r1}, {cols}] (flattened), which does not fit `{a_name}` {:?} and `{b_name}` {:?} as a [r, r, kh, kw] core with a {k}-element kernel", a.dims(), b.dims()));
            }
            out.push((a_name, [out_dim, r1]));
            out.push((b_name, [r1, input * k]));
        }
        Ok(out)
    }

    /// `ΔW` times `factor` in f32, `[out, in·kh·kw]` (PyTorch's layout with the kernel
    /// flattened), in the autodiff graph of the factors. Not for an OFT or a GLoRA, whose
    /// update depends on the base weight (see [`update`](Self::update)): a panic.
    pub fn delta(&self, factor: f32) -> Tensor<B, 2> {
        assert!(!self.algo.depends_on_base(), "an OFT's, a GLoRA's or an (IA)³'s update depends on the base weight: use `update`");
        let f32_of = |name: &str| self.factor(name).map(|p| cast_to(p.val(), DType::F32));
        let delta = unscaled_delta(self.algo, |name| plain_factor(name, |n| self.names.contains(&n), f32_of)).expect("the factors fit each other, as checked when the adapter was made");
        let delta = delta.mul_scalar(factor * self.scale);
        match &self.scalar {
            Some(s) => delta * cast_to(s.val(), DType::F32).reshape([1, 1]),
            None => delta,
        }
    }

    /// `ΔW` times `factor` in f32, shaped as the layer's weight in burn's layout: `[in, out]`
    /// for a linear layer (`D = 2`), `[out, in, kh, kw]` for a convolution (`D = 4`).
    pub fn delta_weight<const D: usize>(&self, factor: f32) -> Tensor<B, D> {
        let delta = self.delta(factor);
        let delta = if D == 2 { delta.transpose() } else { delta };
        delta.reshape(self.burn_shape::<D>())
    }

    fn burn_shape<const D: usize>(&self) -> [usize; D] {
        let [out, input, kh, kw] = self.shape;
        let mut shape = [0; D];
        if D == 2 {
            shape[0] = input;
            shape[1] = out;
        } else {
            shape.copy_from_slice(&[out, input, kh, kw][..D]);
        }
        shape
    }

    /// Whether the adapter has DoRA's magnitude.
    pub fn is_dora(&self) -> bool {
        self.magnitude.is_some()
    }

    /// The change of the layer's weight `weight` (burn's layout, see
    /// [`delta_weight`](Self::delta_weight)) at `multiplier` `k`, in f32, in the autodiff
    /// graph of the factors: `k · ΔW`, or with DoRA `k · (g ⊙ (W + ΔW) − W)` with the gain
    /// `g = m / ‖W + ΔW‖` per output. At `k = 1` that is LyCORIS' `weight_decompose`
    /// (the norm in the graph: its gradient reaches the factors, as in LyCORIS); at other
    /// strengths the weight moves from `W` toward it, as ComfyUI and Forge apply one.
    pub fn update<const D: usize>(&self, multiplier: f32, weight: Tensor<B, D>) -> Tensor<B, D> {
        self.update_rows(multiplier, weight, None, None)
    }

    /// [`update`](Self::update) with `ΔW`'s rows (one per output) multiplied by `rows`
    /// `[out]` (rank dropout's mask), before DoRA's norm as in LyCORIS.
    /// A Diag-OFT takes its rank dropout as `entries` (`[k, n, n]`) instead.
    fn update_rows<const D: usize>(&self, multiplier: f32, weight: Tensor<B, D>, rows: Option<Tensor<B, 1>>, entries: Option<Tensor<B, 3>>) -> Tensor<B, D> {
        if self.algo.is_oft() {
            return self.oft_update(multiplier, weight, entries);
        }
        if self.algo == Algo::Glora {
            return self.glora_update(multiplier, weight);
        }
        if self.algo == Algo::Ia3 {
            let [channels, _] = self.factors[0].dims();
            let scale = cast_to(self.factors[0].val(), DType::F32).reshape([channels]);
            return crate::ia3::delta(cast_to(weight, DType::F32).detach(), scale, self.ia3_on_input, multiplier);
        }
        let masked = |delta: Tensor<B, D>| match &rows {
            Some(r) => delta * r.clone().reshape(self.output_shape::<D>()),
            None => delta,
        };
        let Some(m) = &self.magnitude else { return masked(self.delta_weight::<D>(multiplier)) };
        let w = cast_to(weight, DType::F32).detach();
        let merged = w.clone() + masked(self.delta_weight::<D>(1.0));
        let norm = output_sums(merged.clone().powi_scalar(2)).sqrt().add_scalar(f32::EPSILON);
        let gain = cast_to(m.val(), DType::F32).reshape(self.output_shape::<D>()) / norm;
        (merged * gain - w).mul_scalar(multiplier)
    }

    /// An OFT's update `(R_m − I)ᵀ · W` of the layer's weight `weight` (burn's layout) at
    /// strength `multiplier`, in f32 in the blocks' graph ([`crate::oft`]); a Diag-OFT's
    /// with its rank dropout's factors `entries` where given.
    fn oft_update<const D: usize>(&self, multiplier: f32, weight: Tensor<B, D>, entries: Option<Tensor<B, 3>>) -> Tensor<B, D> {
        let [out, input, kh, kw] = self.shape;
        let w = cast_to(weight, DType::F32).detach();
        // PyTorch's `[out, cols]`: burn keeps a linear weight `[in, out]`.
        let w: Tensor<B, 2> = if D == 2 { w.reshape([input, out]).transpose() } else { w.reshape([out, input * kh * kw]) };
        let blocks = self.factors[0].val();
        let [rows, n] = blocks.dims();
        let blocks: Tensor<B, 3> = blocks.reshape([rows / n, n, n]);
        let rescale = self.factor(crate::oft::RESCALE).map(|p| p.val());
        let c = crate::oft::constraint(self.scale, out);
        let delta = match self.algo {
            // `rows / n` blocks in stages of `out / n`.
            Algo::Boft => crate::oft::butterfly_update(blocks, rows / out, c, multiplier, w, rescale),
            _ => match entries {
                Some(drop) => crate::oft::update_dropped(blocks, c, multiplier, w, rescale, drop),
                None => crate::oft::update(blocks, c, multiplier, w, rescale),
            },
        };
        let delta = if D == 2 { delta.transpose() } else { delta };
        delta.reshape(self.burn_shape::<D>())
    }

    /// A GLoRA's update `s · (W ⊗ a1 a2 + b1 b2)` of the layer's weight `weight` (burn's
    /// layout) at strength `multiplier`, in f32 in the factors' graph ([`crate::glora`]).
    fn glora_update<const D: usize>(&self, multiplier: f32, weight: Tensor<B, D>) -> Tensor<B, D> {
        let [out, input, kh, kw] = self.shape;
        let w = cast_to(weight, DType::F32).detach();
        // PyTorch's `[out, cols]`: burn keeps a linear weight `[in, out]`.
        let w: Tensor<B, 2> = if D == 2 { w.reshape([input, out]).transpose() } else { w.reshape([out, input * kh * kw]) };
        let [a1, a2, b1, b2] = [0, 1, 2, 3].map(|i| cast_to(self.factors[i].val(), DType::F32));
        let delta = crate::glora::delta(a1, a2, b1, b2, w).mul_scalar(multiplier * self.scale);
        let delta = match &self.scalar {
            Some(s) => delta * cast_to(s.val(), DType::F32).reshape([1, 1]),
            None => delta,
        };
        let delta = if D == 2 { delta.transpose() } else { delta };
        delta.reshape(self.burn_shape::<D>())
    }

    /// LyCORIS' rank dropout for one pass: `[out]`, 0 for a dropped row of `ΔW` and 1 (or,
    /// with `rank_dropout_scale`, 1 over the share kept) for the others; `None` without rank
    /// dropout or on a backend that does not differentiate (inference). Drawn on the device.
    fn rank_dropout_rows(&self, device: &B::Device) -> Option<Tensor<B, 1>> {
        if self.algo.is_oft() {
            return None;
        }
        crate::rank_dropout::rows::<B>(self.rank_dropout, self.rank_dropout_scale, self.shape[0], device)
    }

    /// A Diag-OFT's rank dropout for one pass: `torch.nn.Dropout`'s factors over its
    /// rotation's `[k, n, n]` entries ([`crate::oft::update_dropped`]); `None` for every
    /// other adapter, without rank dropout, or on a backend that does not differentiate.
    fn rank_dropout_entries(&self, device: &B::Device) -> Option<Tensor<B, 3>> {
        if self.algo != Algo::DiagOft {
            return None;
        }
        let [rows, n] = self.factors[0].dims();
        crate::rank_dropout::entries::<B>(self.rank_dropout, [rows / n, n, n], device)
    }

    /// The shape that puts one value per output on a weight of burn's layout: `[1, out]`
    /// for a linear layer, `[out, 1, 1, 1]` for a convolution.
    fn output_shape<const D: usize>(&self) -> [usize; D] {
        let out = self.shape[0];
        let mut shape = [1; D];
        shape[if D == 2 { 1 } else { 0 }] = out;
        shape
    }

    /// The updates to add to the layer's weight `weight` and bias in a forward pass at
    /// `multiplier`, in `dtype`: [`update`](Self::update) and [`bias_delta`](Self::bias_delta)
    /// (with LyCORIS' rank dropout, the same outputs dropped in both), both times module
    /// dropout's keep mask (0 or 1, drawn on the device: no host read)
    /// on autodiff backends.
    pub(crate) fn forward_delta<const D: usize>(&self, multiplier: f32, dtype: DType, weight: Tensor<B, D>) -> (Tensor<B, D>, Option<Tensor<B, 1>>) {
        let device = weight.device();
        let rows = self.rank_dropout_rows(&device);
        // LyCORIS' full fine-tuning drops the bias's values with their rows.
        let bias = self.bias_delta(multiplier).map(|b| match &rows {
            Some(r) => b * r.clone(),
            None => b,
        });
        let entries = self.rank_dropout_entries(&device);
        let delta = self.update_rows::<D>(multiplier, weight, rows, entries);
        let (delta, bias) = match crate::rank_dropout::mask::<B>(0.0, self.module_dropout, 1, 1, &device) {
            Some(keep) => (delta * keep.clone().reshape([1; D]), bias.map(|b| b * keep.reshape([1]))),
            None => (delta, bias),
        };
        (cast_to(delta, dtype), bias.map(|b| cast_to(b, dtype)))
    }

    /// Each factor's shape in LyCORIS (its files and its `nn.Parameter`s), in the order of
    /// [`factors`](Self::factors): theirs, but a full `lokr_w2` of a convolution is 4-d
    /// `[out_k, in_n, kh, kw]` and a Tucker core `[r, r, kh, kw]` (the same values in the
    /// same order).
    pub fn torch_shapes(&self) -> Vec<Vec<usize>> {
        let [_, _, kh, kw] = self.shape;
        self.names
            .iter()
            .zip(&self.factors)
            .map(|(name, p)| {
                let [rows, cols] = p.dims();
                let is_core = TUCKER_HALVES.iter().any(|(core, _, _)| core == name);
                if *name == crate::oft::BLOCKS && self.algo == Algo::Boft {
                    let k = self.shape[0] / cols.max(1);
                    return vec![rows / self.shape[0].max(1), k, cols, cols];
                }
                if *name == crate::oft::BLOCKS {
                    return vec![rows / cols.max(1), cols, cols];
                }
                if self.algo == Algo::Ia3 {
                    // LyCORIS: `[channels]`, a convolution's `[1, channels, 1, 1]`.
                    return if self.conv { vec![1, rows, 1, 1] } else { vec![rows] };
                }
                if self.algo == Algo::Norm {
                    // LyCORIS: one value per channel.
                    return vec![rows];
                }
                if self.algo == Algo::Full {
                    // LyCORIS: the weight's shape and the bias's `[out]`.
                    return match (*name == crate::full::DIFF_B, self.conv) {
                        (true, _) => vec![rows],
                        (false, true) => vec![rows, cols / (kh * kw), kh, kw],
                        (false, false) => vec![rows, cols],
                    };
                }
                if self.algo == Algo::Glora && self.conv {
                    // LyCORIS: 1x1 kernels but `b2`, which has the layer's.
                    return match *name {
                        "b2.weight" => vec![rows, cols / (kh * kw), kh, kw],
                        _ => vec![rows, cols, 1, 1],
                    };
                }
                if *name == crate::oft::RESCALE {
                    // LyCORIS: one value per output, in the weight's rank.
                    return if self.conv { vec![rows, 1, 1, 1] } else { vec![rows, 1] };
                }
                match (*name == "lokr_w2" && self.conv) || is_core {
                    true => vec![rows, cols / (kh * kw), kh, kw],
                    false => vec![rows, cols],
                }
            })
            .collect()
    }

    /// The adapter's tensors as LyCORIS writes them (`lokr_w2` of a convolution and the
    /// Tucker cores 4-d), with
    /// `alpha = scale · rank` (for a LoKr with two full halves, 1).
    pub fn to_lycoris_weights(&self) -> Result<LycorisWeights> {
        let mut tensors = Vec::with_capacity(self.factors.len());
        // LyCORIS saves its scalar folded into the first factor (`hada_w1_a`, `lokr_w1` or
        // `lokr_w1_a`), GLoRA's into `a2` and `b2` (each of its terms has one of them).
        let scalar = match &self.scalar {
            Some(s) => HostTensor::from_tensor(cast_to(s.val(), DType::F32))?.data[0],
            None => 1.0,
        };
        let first: &[&str] = if self.algo == Algo::Glora { &["a2.weight", "b2.weight"] } else { &["hada_w1_a", "lokr_w1", "lokr_w1_a"] };
        for ((name, p), shape) in self.names.iter().zip(&self.factors).zip(self.torch_shapes()) {
            let mut t = HostTensor::from_tensor(cast_to(p.val(), DType::F32))?;
            t.shape = shape;
            if scalar != 1.0 && first.contains(name) {
                t.data.iter_mut().for_each(|v| *v *= scalar);
            }
            tensors.push((name.to_string(), t));
        }
        if self.algo == Algo::Ia3 {
            // Not trained: whether the scale is per input, as LyCORIS saves it.
            tensors.push((crate::ia3::ON_INPUT.to_string(), HostTensor { shape: vec![], data: vec![f32::from(u8::from(self.ia3_on_input))] }));
        }
        let alpha = match self.algo {
            Algo::Oft | Algo::DiagOft | Algo::Boft | Algo::Ia3 | Algo::Full | Algo::Norm => self.scale,
            _ => self.rank().map_or(1.0, |r| self.scale * r as f32),
        };
        Ok(LycorisWeights { algo: self.algo, tensors, alpha })
    }

    /// The adapter as [`LoraWeights`]: the plain LoRA with its update (in the conv layout
    /// for a convolution) plus its own tensors in [`LoraWeights::lycoris`], and DoRA's
    /// magnitude; `key` names it in errors.
    pub fn to_weights(&self, key: &str) -> Result<LoraWeights> {
        let lycoris = self.to_lycoris_weights()?;
        let [out, input, kh, kw] = self.shape;
        if self.algo == Algo::Ia3 {
            let mut tensors = lycoris.tensors.into_iter().map(|(_, t)| t);
            let (weight, on_input) = (tensors.next().expect("an (IA)³ has its weight"), tensors.next().expect("and its flag"));
            return crate::ia3::weights(weight, on_input, key);
        }
        if self.algo == Algo::Full {
            let mut tensors = lycoris.tensors.into_iter().map(|(_, t)| t);
            let diff = tensors.next().expect("a full adapter has its diff");
            return crate::full::weights(diff, tensors.next(), key);
        }
        if self.algo == Algo::Norm {
            let mut tensors = lycoris.tensors.into_iter().map(|(_, t)| t);
            let w_norm = tensors.next().expect("a norm module has its w_norm");
            return crate::norm::weights(w_norm, tensors.next(), key);
        }
        if self.algo == Algo::Glora {
            // No plain form either: its tensors beside an empty LoRA.
            return crate::glora::weights(lycoris.tensors.into_iter().map(|(_, t)| t).collect(), Some(lycoris.alpha), key);
        }
        if self.algo.is_oft() {
            // No plain form: the OFT's own tensor beside an empty LoRA.
            let in_shape = if self.conv { vec![input, kh, kw] } else { vec![input] };
            let mut tensors = lycoris.tensors.into_iter().map(|(_, t)| t);
            let blocks = tensors.next().expect("an OFT has its blocks");
            return crate::oft::weights(self.algo, blocks, tensors.next(), lycoris.alpha, &in_shape, key);
        }
        let cols = input * kh * kw;
        let weights = if self.plain_rank() >= out.min(cols) {
            // The plain form is `ΔW` itself beside an identity (as the reader makes it):
            // formed here on the device, not by the host's loops (seconds for each large
            // layer of a high-rank LoHa, at every save).
            let delta = HostTensor::from_tensor(self.delta(1.0))?;
            let identity = |n: usize| {
                let mut data = vec![0.0; n * n];
                data.iter_mut().step_by(n + 1).for_each(|v| *v = 1.0);
                HostTensor { shape: vec![n, n], data }
            };
            let (up, down) = if out <= cols { (identity(out), delta) } else { (delta, identity(cols)) };
            let rank = down.shape[0];
            let mut weights = LoraWeights::new(down, up, rank as f32, key)?;
            weights.lycoris = Some(lycoris);
            weights
        } else {
            crate::format::lycoris::lora_of(&lycoris, key)?
        };
        let weights = if self.conv { crate::format::lycoris::unflatten(weights, [kh, kw]) } else { weights };
        match &self.magnitude {
            Some(m) => weights.with_magnitude(HostTensor::from_tensor(cast_to(m.val(), DType::F32))?, key),
            None => Ok(weights),
        }
    }

    /// Sets DoRA's magnitude from a file's (`[out]`, see [`LoraWeights::magnitude`]);
    /// `key` names the adapter in errors.
    pub fn set_magnitude(&mut self, magnitude: Option<&HostTensor>, key: &str, device: &B::Device) -> Result<()> {
        self.magnitude = match magnitude {
            Some(m) if m.shape != [self.shape[0]] => {
                return Err(LoraError::ShapeMismatch { key: key.into(), reason: format!("DoRA's magnitude is {:?}, the layer has {} outputs", m.shape, self.shape[0]) });
            }
            Some(m) => Some(Param::from_tensor(m.to_tensor::<B, 1>(device)?)),
            None => None,
        };
        Ok(())
    }

    /// The rank of the plain LoRA with this update in factored form: LoHa's `r²`, LoKr's
    /// product of its halves' ranks (a full half counting its smaller side).
    fn plain_rank(&self) -> usize {
        let rows = |name: &str| self.factor(name).map_or(0, |p| p.dims()[0]);
        match self.algo {
            Algo::Loha => rows("hada_w1_b") * rows("hada_w2_b"),
            Algo::Oft | Algo::DiagOft | Algo::Boft | Algo::Glora | Algo::Ia3 | Algo::Full | Algo::Norm => 0,
            _ => ["lokr_w1", "lokr_w2"]
                .map(|h| {
                    let (full, _, b) = names_of(h);
                    match self.factor(full) {
                        Some(p) => p.dims()[0].min(p.dims()[1]),
                        None => rows(b),
                    }
                })
                .iter()
                .product(),
        }
    }
}

/// A weight's values summed per output, keeping its rank: over the inputs (dimension 0) of
/// a linear weight `[in, out]`, over all but the outputs (dimension 0) of a convolution's
/// `[out, in, kh, kw]`.
fn output_sums<B: Backend, const D: usize>(t: Tensor<B, D>) -> Tensor<B, D> {
    match D {
        2 => t.sum_dim(0),
        _ => (1..D).fold(t, |t, d| t.sum_dim(d)),
    }
}

/// DoRA's starting magnitude for a layer's weight `weight` (burn's layout): its norm per
/// output, `[out]`, in f32, outside any graph (LyCORIS' initial `dora_scale`).
pub(crate) fn output_norms<B: Backend, const D: usize>(weight: Tensor<B, D>) -> Tensor<B, 1> {
    let norms = output_sums(cast_to(weight, DType::F32).detach().powi_scalar(2)).sqrt();
    let out: usize = norms.dims().iter().product();
    norms.reshape([out])
}

/// The Tucker-decomposed halves: (core, `a`, `b`).
const TUCKER_HALVES: [(&str, &str, &str); 3] = [("hada_t1", "hada_w1_a", "hada_w1_b"), ("hada_t2", "hada_w2_a", "hada_w2_b"), ("lokr_t2", "lokr_w2_a", "lokr_w2_b")];

/// A LoHa / LoKr factor as [`unscaled_delta`] takes it, given which factors the adapter
/// has and their values by name (2-d): the factor itself, or for a Tucker-decomposed half
/// the non-Tucker one of the same update (`aᵀ`, or the core contracted with `b`).
pub(crate) fn plain_factor<B: Backend>(name: &str, has: impl Fn(&str) -> bool, get: impl Fn(&str) -> Option<Tensor<B, 2>>) -> Option<Tensor<B, 2>> {
    match TUCKER_HALVES.iter().find(|(core, a, b)| (*a == name || *b == name) && has(core)) {
        Some((_, a, _)) if *a == name => get(name).map(|a| a.transpose()),
        Some((core, _, _)) => Some(tucker_fold(get(core)?, get(name)?)),
        None => get(name),
    }
}

/// A Tucker core `t [r₁, r₂·k]` (its `[r₁, r₂, kh, kw]` flattened) contracted with
/// `b [r₂, in]`: `m [r₁, in·k]`, `m[i, (c, h, w)] = Σⱼ t[i, j, h, w] · b[j, c]` (the
/// host-side `tucker_core` of the file reader, here differentiable).
pub(crate) fn tucker_fold<B: Backend>(t: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 2> {
    let [r1, cols] = t.dims();
    let [r2, input] = b.dims();
    let k = cols / r2;
    let t: Tensor<B, 3> = t.reshape([r1, r2, k]).swap_dims(1, 2);
    let m = t.reshape([r1 * k, r2]).matmul(b);
    m.reshape([r1, k, input]).swap_dims(1, 2).reshape([r1, input * k])
}

/// The names of LoKr's half `lokr_w1` / `lokr_w2`: (full, `_a`, `_b`).
fn names_of(half: &str) -> (&'static str, &'static str, &'static str) {
    match half {
        "lokr_w1" => ("lokr_w1", "lokr_w1_a", "lokr_w1_b"),
        _ => ("lokr_w2", "lokr_w2_a", "lokr_w2_b"),
    }
}

/// The unscaled update `[out, cols]` of LoHa / LoKr factors given by LyCORIS name
/// (`factor` gives `None` for a name the adapter lacks): LoHa's
/// `(w1_a · w1_b) ⊙ (w2_a · w2_b)`, LoKr's `w1 ⊗ w2` with each half full or `_a · _b`.
/// Missing factors and shapes that do not fit are errors saying which.
pub(crate) fn unscaled_delta<B: Backend>(algo: Algo, factor: impl Fn(&str) -> Option<Tensor<B, 2>>) -> std::result::Result<Tensor<B, 2>, String> {
    let need = |name: &str| factor(name).ok_or_else(|| format!("factor `{name}` is missing"));
    let product = |what: &str| -> std::result::Result<Tensor<B, 2>, String> {
        let (a, b) = (need(&format!("{what}_a"))?, need(&format!("{what}_b"))?);
        match a.dims()[1] == b.dims()[0] {
            true => Ok(a.matmul(b)),
            false => Err(format!("{what}_a is {:?} but {what}_b is {:?}", a.dims(), b.dims())),
        }
    };
    match algo {
        Algo::Loha => {
            let (one, two) = (product("hada_w1")?, product("hada_w2")?);
            if one.dims() != two.dims() {
                return Err(format!("hada_w1 makes {:?} but hada_w2 makes {:?}", one.dims(), two.dims()));
            }
            Ok(one * two)
        }
        Algo::Lokr => {
            let half = |h: &str| factor(h).map_or_else(|| product(h), Ok);
            Ok(kron(half("lokr_w1")?, half("lokr_w2")?))
        }
        Algo::Full => need(crate::full::DIFF),
        Algo::Norm => need(crate::norm::W_NORM),
        Algo::Lora => Err("a LoRA is not a LyCORIS adapter".into()),
        Algo::Oft | Algo::DiagOft | Algo::Boft | Algo::Glora | Algo::Ia3 => Err("an OFT's, a GLoRA's or an (IA)³'s update depends on the base weight".into()),
    }
}

/// `a ⊗ b` (`[p·r, q·s]` for `a [p, q]`, `b [r, s]`), by broadcasting: differentiable.
fn kron<B: Backend>(a: Tensor<B, 2>, b: Tensor<B, 2>) -> Tensor<B, 2> {
    let [p, q] = a.dims();
    let [r, s] = b.dims();
    let a: Tensor<B, 4> = a.reshape([p, 1, q, 1]);
    let b: Tensor<B, 4> = b.reshape([1, r, 1, s]);
    (a * b).reshape([p * r, q * s])
}
