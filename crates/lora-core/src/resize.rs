//! Changing the rank of trained adapters (kohya's `networks/resize_lora.py`).
//!
//! An adapter's update `ΔW = scale · up · down` has rank at most `r`; the best update of a
//! lower rank `k` (in the Frobenius and spectral norms) keeps its `k` largest singular
//! values. People train at a generous rank and resize afterwards: to a fixed rank, or per
//! adapter to the smallest rank that keeps a share of the update ([`RankRule`]).
//!
//! The singular values come from the factors, never from `ΔW` itself: with thin QR
//! factorisations `up = Q₁R₁` and `downᵀ = Q₂R₂`, `up · down = Q₁ (R₁R₂ᵀ) Q₂ᵀ`, so the SVD
//! of the (at most `r × r`) core `R₁R₂ᵀ = U S Vᵀ` gives `up · down = (Q₁U) S (Q₂V)ᵀ`
//! exactly. That is
//! `O((out + in·kh·kw) · r²)` work per adapter instead of an SVD of the full
//! `out × in·kh·kw` matrix, in f64 on the host.
//!
//! A DoRA adapter keeps its magnitude: its weight `m · (W + ΔW') / ‖W + ΔW'‖` then uses the
//! low-rank `ΔW'` in the direction, which the norm renormalises.
//!
//! LyCORIS' full fine-tuning differences ([`crate::full`]) become LoRAs: their `diff` has
//! no factors, so its leading singular values come from the randomized SVD of
//! [`crate::extract`] (all of them in `up`, `alpha = k`, no clamping), and the share of the
//! sum of all singular values is not known (`sum_retained` is NaN; `sv_cumulative` is
//! refused for them). The bias's difference `diff_b` has no LoRA form: it is left out, and
//! [`Resized::dropped_biases`] names every adapter whose `diff_b` was not zero.
//!
//! ```
//! use lora_core::resize::{resize_adapter, RankRule};
//! use lora_core::{HostTensor, LoraWeights};
//!
//! // A rank-2 adapter whose update is really rank 1 (both `down` rows are equal).
//! let down = HostTensor::new(vec![2, 3], vec![1.0, 2.0, 3.0, 1.0, 2.0, 3.0]).unwrap();
//! let up = HostTensor::new(vec![2, 2], vec![1.0, 0.5, 2.0, -1.0]).unwrap();
//! let w = LoraWeights::new(down, up, 1.0, "example").unwrap();
//! let (small, kept) = resize_adapter(&w, 2, RankRule::SvFro(0.999), "example").unwrap();
//! assert_eq!(small.rank(), 1);
//! assert!(kept.fro_retained > 0.999);
//! // The same update, at the same scale (alpha / rank is kept).
//! for (a, b) in small.delta().data.iter().zip(&w.delta().data) {
//!     assert!((a - b).abs() < 1e-5);
//! }
//! assert_eq!(small.scale(), w.scale());
//! ```

use std::collections::BTreeMap;

use nalgebra::DMatrix;

use crate::{AdapterKey, AdapterSet, HostTensor, LoraError, LoraWeights, Result};

/// How the new rank of each adapter is chosen; the result never exceeds the maximum rank
/// given with it nor the adapter's own rank, and is at least 1.
///
/// The dynamic rules are kohya's `--dynamic_method` values, with one difference: kohya's
/// script keeps one singular value more than its criterion asks (its index is increased
/// twice); these keep the smallest rank that meets it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RankRule {
    /// The maximum rank (kohya without `--dynamic_method`).
    Fixed,
    /// The singular values at least `1 / ratio` of the largest one (`sv_ratio`; the ratio
    /// is at least 1).
    SvRatio(f64),
    /// The smallest rank whose singular values sum to at least this fraction of their
    /// total (`sv_cumulative`; in (0, 1]).
    SvCumulative(f64),
    /// The smallest rank that keeps at least this fraction of the update's Frobenius norm
    /// (`sv_fro`; in (0, 1]).
    SvFro(f64),
}

impl RankRule {
    /// kohya's name of the rule (`fixed` for [`RankRule::Fixed`]) and its parameter.
    pub fn describe(self) -> String {
        match self {
            Self::Fixed => "fixed".into(),
            Self::SvRatio(t) => format!("sv_ratio: {t}"),
            Self::SvCumulative(t) => format!("sv_cumulative: {t}"),
            Self::SvFro(t) => format!("sv_fro: {t}"),
        }
    }

    /// Parses kohya's `--dynamic_method` name with its `--dynamic_param`.
    ///
    /// ```
    /// use lora_core::resize::RankRule;
    /// assert_eq!(RankRule::parse("sv_fro", 0.9).unwrap(), RankRule::SvFro(0.9));
    /// assert!(RankRule::parse("sv_fro", 1.5).is_err());
    /// assert!(RankRule::parse("svd", 0.9).is_err());
    /// ```
    pub fn parse(method: &str, param: f64) -> Result<Self> {
        let rule = match method {
            "sv_ratio" => Self::SvRatio(param),
            "sv_cumulative" => Self::SvCumulative(param),
            "sv_fro" => Self::SvFro(param),
            other => {
                return Err(LoraError::InvalidConfig(format!(
                    "unknown rank rule `{other}`; expected sv_ratio, sv_cumulative or sv_fro"
                )))
            }
        };
        rule.validate()?;
        Ok(rule)
    }

    /// Checks the parameter's range.
    pub fn validate(self) -> Result<()> {
        let ok = match self {
            Self::Fixed => true,
            Self::SvRatio(t) => t.is_finite() && t >= 1.0,
            Self::SvCumulative(t) | Self::SvFro(t) => t > 0.0 && t <= 1.0,
        };
        if ok {
            Ok(())
        } else {
            Err(LoraError::InvalidConfig(format!(
                "{}: sv_ratio takes a ratio of at least 1, sv_cumulative and sv_fro a fraction in (0, 1]",
                self.describe()
            )))
        }
    }
}

/// What kohya's script writes as `ss_network_dim` / `ss_network_alpha` after a dynamic
/// resize (the ranks differ per adapter).
pub const DYNAMIC: &str = "Dynamic";

/// kohya's threshold below which an update counts as zero: a largest singular value of
/// `up · down` (without the scale) at most this gives rank 1.
pub const MIN_SINGULAR_VALUE: f64 = 1e-6;

/// The target ranks of [`resize_set`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResizeSettings {
    /// The (maximum) rank of linear adapters and 1x1 convolutions (kohya's `--new_rank`).
    pub rank: usize,
    /// The (maximum) rank of adapters on larger kernels (kohya's `--new_conv_rank`; kohya's
    /// script also gives it to 1x1 convolutions, which here count as linear layers, as
    /// kohya's training counts them).
    pub conv_rank: usize,
    /// How each adapter's rank is chosen below those.
    pub rule: RankRule,
}

/// What resizing kept of one adapter's update, as kohya's `--verbose` reports it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Retained {
    /// The adapter's rank before.
    pub old_rank: usize,
    /// Its rank after.
    pub new_rank: usize,
    /// `‖kept singular values‖₂ / ‖all‖₂`: the share of the update's Frobenius norm kept
    /// (1 for a zero update).
    pub fro_retained: f64,
    /// The kept singular values' sum over the sum of all (1 for a zero update; NaN for a
    /// full fine-tuning difference, whose other singular values are not computed).
    pub sum_retained: f64,
    /// The largest kept singular value over the smallest kept one (1 for a zero update).
    pub max_ratio: f64,
}

/// The result of [`resize_set`]: the resized adapters and what each kept.
#[derive(Debug, Clone)]
pub struct Resized {
    /// The adapters at their new ranks, with the input's metadata and kohya's note in
    /// `ss_training_comment`.
    pub set: AdapterSet,
    /// Per adapter, in key order.
    pub modules: BTreeMap<AdapterKey, Retained>,
    /// The full fine-tuning differences that became LoRAs without their bias's difference
    /// (`diff_b`, which no LoRA holds), each with its largest `|value|`; those whose `diff_b`
    /// is zero or absent are not listed.
    pub dropped_biases: BTreeMap<AdapterKey, f32>,
}

impl Resized {
    /// The mean of [`Retained::fro_retained`] over all adapters (kohya's "average Frobenius
    /// norm retention"); 1 for an empty set.
    pub fn mean_fro_retained(&self) -> f64 {
        if self.modules.is_empty() {
            return 1.0;
        }
        self.modules.values().map(|r| r.fro_retained).sum::<f64>() / self.modules.len() as f64
    }
}

/// Whether `w` is LyCORIS' full fine-tuning difference ([`crate::full`]), which resizing
/// turns into a LoRA.
fn is_full(w: &LoraWeights) -> bool {
    w.lycoris.as_ref().is_some_and(|l| l.algo == crate::Algo::Full)
}

/// The largest `|value|` of a full fine-tuning difference's `diff_b`, where it is not zero.
fn dropped_bias(w: &LoraWeights) -> Option<f32> {
    let diff_b = w.lycoris.as_ref().filter(|l| l.algo == crate::Algo::Full)?.get(crate::full::DIFF_B)?;
    let largest = diff_b.data.iter().fold(0f32, |m, v| m.max(v.abs()));
    (largest != 0.0).then_some(largest)
}

/// Whether `w` is LyCORIS' norm module ([`crate::norm`]), which resizing and cutting keep
/// as it is.
fn is_norm_module(w: &LoraWeights) -> bool {
    w.lycoris.as_ref().is_some_and(|l| l.algo == crate::Algo::Norm)
}

/// Resizes every adapter of `set` (see the [module docs](self)). Adapters on kernels larger
/// than 1x1 take `settings.conv_rank`, the others `settings.rank`; LyCORIS' norm modules
/// (beside a LoRA, [`crate::norm`]) have no rank and are kept as they are. The metadata is kept,
/// with `ss_training_comment` prefixed as kohya's script prefixes it; after a dynamic rule
/// `ss_network_dim` and `ss_network_alpha` say `Dynamic`, as kohya's script writes them
/// (the kohya writer keeps that instead of its most common rank), else the writers
/// recompute them, and always the hashes, from the new adapters.
pub fn resize_set(set: &AdapterSet, settings: &ResizeSettings) -> Result<Resized> {
    settings.rule.validate()?;
    if settings.rank == 0 || settings.conv_rank == 0 {
        return Err(LoraError::InvalidConfig("the new ranks must be at least 1".into()));
    }
    // LyCORIS' norm modules (beside a LoRA, `train_norm`) have no rank: they stay as they are.
    let work: Vec<(&AdapterKey, &LoraWeights)> = set.iter().filter(|(_, w)| !is_norm_module(w)).collect();
    let one = |(key, w): &(&AdapterKey, &LoraWeights)| {
        let spatial = w.is_conv() && w.down.shape[2..] != [1, 1];
        let max_rank = if spatial { settings.conv_rank } else { settings.rank };
        resize_adapter(w, max_rank, settings.rule, &key.to_string())
    };
    // The adapters are independent: one share of them per core (in order, so that the
    // first error is the first adapter's).
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(work.len()).max(1);
    let share = work.len().div_ceil(threads).max(1);
    let results: Vec<Result<(LoraWeights, Retained)>> = std::thread::scope(|scope| {
        let handles: Vec<_> = work.chunks(share).map(|chunk| scope.spawn(move || chunk.iter().map(one).collect::<Vec<_>>())).collect();
        handles.into_iter().flat_map(|h| h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
    });
    let mut out = AdapterSet::new();
    for (key, w) in set.iter().filter(|(_, w)| is_norm_module(w)) {
        out.insert(key.clone(), w.clone())?;
    }
    let mut modules = BTreeMap::new();
    let mut dropped_biases = BTreeMap::new();
    for ((key, w), result) in work.iter().zip(results) {
        let (resized, retained) = result?;
        out.insert((*key).clone(), resized)?;
        modules.insert((*key).clone(), retained);
        if let Some(largest) = dropped_bias(w) {
            dropped_biases.insert((*key).clone(), largest);
        }
    }
    out.metadata = set.metadata.clone();
    out.kohya_names = set.kohya_names.clone();
    out.bundled_embeddings = set.bundled_embeddings.clone();
    // A full difference's rank is its largest possible one (its `min(out, cols)`).
    let old = modules.values().map(|r| r.old_rank).max().unwrap_or(0);
    let comment = set.metadata.get("ss_training_comment").cloned().unwrap_or_default();
    let note = match settings.rule {
        RankRule::Fixed if settings.conv_rank != settings.rank => {
            format!("dimension is resized from {old} to {} (conv: {})", settings.rank, settings.conv_rank)
        }
        RankRule::Fixed => format!("dimension is resized from {old} to {}", settings.rank),
        rule => format!("Dynamic resize with {} from {old}", rule.describe()),
    };
    out.metadata.insert("ss_training_comment".into(), format!("{note}; {comment}"));
    for key in ["ss_network_dim", "ss_network_alpha"] {
        match settings.rule {
            RankRule::Fixed => out.metadata.remove(key),
            _ => out.metadata.insert(key.into(), DYNAMIC.into()),
        };
    }
    Ok(Resized { set: out, modules, dropped_biases })
}

/// Each adapter's first `rank` ranks (`conv_rank` for convolutions larger than 1x1) as a
/// LoRA of its own: a DyLoRA's nested LoRAs ([`crate::dylora`]), as kohya's
/// `extract_lora_from_dylora.py` cuts them out: `down`'s first rows and `up`'s first
/// columns, alpha kept as it is (so a rank-`k` cut adds `alpha / k · up_k · down_k`).
/// Adapters of a lower rank are kept whole. A LyCORIS adapter (LoHa, LoKr, a Tucker LoCon)
/// has no ranks to cut: an error naming it; a DoRA adapter keeps its magnitude. The
/// metadata's `ss_training_comment` says what was cut, as kohya's script writes it, and
/// `ss_network_dim` / `ss_network_alpha` are left to the writers to recompute.
///
/// ```
/// use lora_core::resize::truncate_set;
/// use lora_core::{AdapterKey, AdapterSet, Component, HostTensor, LoraWeights};
///
/// let key = AdapterKey::new(Component::Unet, "mid_block.attentions.0.proj_in");
/// let down = HostTensor::new(vec![3, 2], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
/// let up = HostTensor::new(vec![2, 3], vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
/// let mut set = AdapterSet::new();
/// set.insert(key.clone(), LoraWeights::new(down, up, 3.0, "x").unwrap()).unwrap();
/// let cut = truncate_set(&set, 2, 2).unwrap();
/// let w = cut.get(&key).unwrap();
/// assert_eq!((w.rank(), w.alpha), (2, 3.0));
/// assert_eq!(w.down.data, [1.0, 2.0, 3.0, 4.0]);
/// assert_eq!(w.up.data, [1.0, 2.0, 4.0, 5.0]);
/// assert!(truncate_set(&set, 0, 2).is_err());
/// ```
pub fn truncate_set(set: &AdapterSet, rank: usize, conv_rank: usize) -> Result<AdapterSet> {
    if rank == 0 || conv_rank == 0 {
        return Err(LoraError::InvalidConfig("the new ranks must be at least 1".into()));
    }
    let mut out = AdapterSet::new();
    for (key, w) in set.iter() {
        if is_norm_module(w) {
            out.insert(key.clone(), w.clone())?;
            continue;
        }
        if w.stands_alone() {
            return Err(w.no_plain_form(&key.to_string(), "cut to a rank (it has none)"));
        }
        if let Some(l) = &w.lycoris {
            return Err(LoraError::Unsupported(format!("`{key}` is a LyCORIS {} adapter, whose update has no ranks to cut (resize it by its singular values instead)", l.algo.name())));
        }
        let spatial = w.is_conv() && w.down.shape[2..] != [1, 1];
        let keep = (if spatial { conv_rank } else { rank }).min(w.rank());
        out.insert(key.clone(), truncate_adapter(w, keep, &key.to_string())?)?;
    }
    out.metadata = set.metadata.clone();
    out.kohya_names = set.kohya_names.clone();
    out.bundled_embeddings = set.bundled_embeddings.clone();
    let old = set.iter().map(|(_, w)| w.rank()).max().unwrap_or(0);
    let comment = set.metadata.get("ss_training_comment").cloned().unwrap_or_default();
    let new = if conv_rank == rank { rank.to_string() } else { format!("{rank} (conv: {conv_rank})") };
    out.metadata.insert("ss_training_comment".into(), format!("split from DyLoRA, rank {old} to {new}; {comment}"));
    out.metadata.remove("ss_network_dim");
    out.metadata.remove("ss_network_alpha");
    Ok(out)
}

/// `w`'s first `keep` ranks (at most its rank), alpha kept.
fn truncate_adapter(w: &LoraWeights, keep: usize, key: &str) -> Result<LoraWeights> {
    let rank = w.rank();
    let row = w.down.numel() / rank.max(1);
    let down = HostTensor::new([&[keep][..], &w.down.shape[1..]].concat(), w.down.data[..keep * row].to_vec())?;
    // `up [out, rank, ..]`: the first `keep` of each output's `rank` values.
    let mut up_shape = w.up.shape.clone();
    up_shape[1] = keep;
    let up_data = w.up.data.chunks(rank.max(1)).flat_map(|r| r[..keep].iter().copied()).collect();
    let mut cut = LoraWeights::new(down, HostTensor::new(up_shape, up_data)?, w.alpha, key)?;
    cut.magnitude = w.magnitude.clone();
    Ok(cut)
}

/// Several adapter sets merged into one LoRA, each at its strength (kohya's
/// `svd_merge_lora.py`, and `merge_lora.py`'s merging of LoRAs without a model): on every
/// module any of them adapts, the update is `Σ strengthᵢ · ΔWᵢ` ([`AdapterSet::combine`],
/// ranks concatenated, exact). With `settings` that sum is then brought to the settings'
/// ranks (as [`resize_set`]: the best approximation of that rank, from the singular values
/// of the sum, at scale 1 as kohya's script writes it: alpha = rank). A LyCORIS adapter
/// enters as the plain LoRA with its update; a DoRA adapter is an error (its update
/// rescales the layer, it does not add). The metadata starts empty but for
/// `ss_network_module`: the writers fill in the rank, alpha and hashes; the inputs'
/// training metadata describes none of them alone.
///
/// ```
/// use lora_core::resize::{merge_sets, RankRule, ResizeSettings};
/// use lora_core::{AdapterKey, AdapterSet, Component, HostTensor, LoraWeights};
///
/// let key = AdapterKey::new(Component::Unet, "mid_block.attentions.0.proj_in");
/// let one = |v: f32| {
///     let down = HostTensor::new(vec![1, 2], vec![v, 0.0]).unwrap();
///     let up = HostTensor::new(vec![2, 1], vec![1.0, 1.0]).unwrap();
///     let mut set = AdapterSet::new();
///     set.insert(key.clone(), LoraWeights::new(down, up, 1.0, "x").unwrap()).unwrap();
///     set
/// };
/// let (a, b) = (one(1.0), one(2.0));
/// // Exact: rank 1 + 1, ΔW = 0.5·ΔW_a + 0.25·ΔW_b.
/// let merged = merge_sets(&[(&a, 0.5), (&b, 0.25)], None).unwrap();
/// assert_eq!(merged.set.get(&key).unwrap().rank(), 2);
/// assert!((merged.set.get(&key).unwrap().delta().data[0] - 1.0).abs() < 1e-6);
/// // To rank 1 by its singular values: the same update (it has rank 1), alpha = rank.
/// let settings = ResizeSettings { rank: 1, conv_rank: 1, rule: RankRule::Fixed };
/// let small = merge_sets(&[(&a, 0.5), (&b, 0.25)], Some(&settings)).unwrap();
/// let w = small.set.get(&key).unwrap();
/// assert_eq!((w.rank(), w.alpha), (1, 1.0));
/// assert!((w.delta().data[0] - 1.0).abs() < 1e-6);
/// ```
pub fn merge_sets(sets: &[(&AdapterSet, f32)], settings: Option<&ResizeSettings>) -> Result<Resized> {
    if sets.is_empty() {
        return Err(LoraError::InvalidConfig("no adapter files to merge".into()));
    }
    if let Some((key, w)) = sets.iter().flat_map(|(set, _)| set.iter()).find(|(_, w)| w.stands_alone()) {
        return Err(w.no_plain_form(&key.to_string(), "merged into a LoRA"));
    }
    let mut combined = AdapterSet::combine(sets)?.into_plain_lora();
    combined.metadata = BTreeMap::from([("ss_network_module".to_string(), "networks.lora".to_string())]);
    combined.metadata.extend(shared_base_model(sets));
    match settings {
        Some(settings) => {
            let mut resized = resize_set(&combined, settings)?;
            // resize_set's note on the rank change; the caller says where the merge came from.
            resized.set.metadata.remove("ss_training_comment");
            Ok(resized)
        }
        None => {
            let modules = combined.iter().map(|(key, w)| (key.clone(), Retained { old_rank: w.rank(), new_rank: w.rank(), fro_retained: 1.0, sum_retained: 1.0, max_ratio: 1.0 })).collect();
            Ok(Resized { set: combined, modules, dropped_biases: BTreeMap::new() })
        }
    }
}

/// Metadata keys that say which base model a LoRA is for (the family checks of loaders,
/// and A1111's and ComfyUI's lists, read them).
const BASE_MODEL_KEYS: &[&str] = &[
    "ss_base_model_version",
    "ss_v2",
    "ss_v_parameterization",
    "ss_sd_model_name",
    "modelspec.architecture",
    "modelspec.implementation",
    "modelspec.prediction_type",
];

/// The base-model entries ([`BASE_MODEL_KEYS`]) on which every one of `sets` agrees (each
/// has it, with one value): a merge of LoRAs for one model is for that model too.
fn shared_base_model(sets: &[(&AdapterSet, f32)]) -> Vec<(String, String)> {
    BASE_MODEL_KEYS
        .iter()
        .filter_map(|&key| {
            let first = sets.first()?.0.metadata.get(key)?;
            sets.iter().all(|(set, _)| set.metadata.get(key) == Some(first)).then(|| (key.to_string(), first.clone()))
        })
        .collect()
}

/// One adapter at rank `k ≤ max_rank` chosen by `rule` (see the [module docs](self)), with
/// the same scale (`alpha / rank`): its update is the best rank-`k` approximation of the
/// old one. All singular values go into `up`, as in kohya's script. `key` names the adapter
/// in errors.
pub fn resize_adapter(weights: &LoraWeights, max_rank: usize, rule: RankRule, key: &str) -> Result<(LoraWeights, Retained)> {
    weights.validate(key)?;
    if is_full(weights) {
        return resize_full(weights, max_rank, rule, key);
    }
    if weights.stands_alone() {
        return Err(weights.no_plain_form(key, "resized (it has no ranks)"));
    }
    rule.validate()?;
    if max_rank == 0 {
        return Err(LoraError::InvalidConfig("the new rank must be at least 1".into()));
    }
    let finite = |t: &HostTensor| t.data.iter().all(|v| v.is_finite());
    if !(finite(&weights.down) && finite(&weights.up)) {
        return Err(LoraError::Data(format!("`{key}`: the adapter holds NaN or infinite values; it cannot be resized")));
    }
    let (r, out) = (weights.rank(), weights.out_features());
    let cols = weights.down.numel() / r;
    // `up` is `[out, r]` row-major; `down` is `[r, cols]` row-major, i.e. `downᵀ` column-major.
    let up = DMatrix::from_row_iterator(out, r, weights.up.data.iter().map(|&v| f64::from(v)));
    let down_t = DMatrix::from_iterator(cols, r, weights.down.data.iter().map(|&v| f64::from(v)));
    let (q1, r1) = up.qr().unpack();
    let (q2, r2) = down_t.qr().unpack();
    let core = r1 * r2.transpose();
    // nalgebra's own SVD can be wrong (see `crate::linalg`).
    let crate::linalg::Svd { u, s, vt: v_t } = crate::linalg::svd(core);
    let s = s.as_slice();
    let k = chosen_rank(s, max_rank, rule);
    let mut new_up = q1 * u.columns(0, k);
    for (j, mut column) in new_up.column_iter_mut().enumerate() {
        column *= s[j];
    }
    let new_down_t = q2 * v_t.rows(0, k).transpose();
    let narrow = |m: DMatrix<f64>| m.iter().map(|&v| v as f32).collect::<Vec<f32>>();
    // Column-major `[out, k]` transposed is row-major; `new_down_t` column-major is `down` row-major.
    let up_data = narrow(new_up.transpose());
    let down_data = narrow(new_down_t);
    let mut down_shape = weights.down.shape.clone();
    down_shape[0] = k;
    let mut up_shape = weights.up.shape.clone();
    up_shape[1] = k;
    let resized = LoraWeights::new(
        HostTensor::new(down_shape, down_data)?,
        HostTensor::new(up_shape, up_data)?,
        weights.scale() * k as f32,
        key,
    )?;
    let resized = match &weights.magnitude {
        Some(m) => resized.with_magnitude(m.clone(), key)?,
        None => resized,
    };
    Ok((resized, retained(s, r, k)))
}

/// A full fine-tuning difference as a LoRA of rank `k ≤ max_rank` chosen by `rule`: the
/// randomized SVD of its `diff` ([`crate::extract`], no clamping), all singular values in
/// `up`, `alpha = k`. Its bias's difference is left out (see the [module docs](self)).
fn resize_full(weights: &LoraWeights, max_rank: usize, rule: RankRule, key: &str) -> Result<(LoraWeights, Retained)> {
    // The extraction checks the rule and the rank; this says why sv_cumulative cannot apply.
    if let RankRule::SvCumulative(_) = rule {
        return Err(LoraError::InvalidConfig(format!(
            "`{key}` is a full fine-tuning difference (LyCORIS' algo=full): sv_cumulative needs all of its singular values, which are not computed; use sv_fro or sv_ratio"
        )));
    }
    let l = weights.lycoris.as_ref().ok_or_else(|| LoraError::InvalidConfig(format!("`{key}` is not a full fine-tuning difference")))?;
    let shape = crate::full::check_tensors(l, key)?;
    let diff = &l.tensors[0].1;
    let settings = crate::extract::ExtractSettings { rule, clamp_quantile: None, ..crate::extract::ExtractSettings::new(max_rank) };
    let (lora, extraction, s) = crate::extract::extract_with_values(diff, max_rank, &settings, key)?;
    let cols = diff.data.len() / shape.out.max(1);
    let max_ratio = match (s.first(), s.last()) {
        (Some(&largest), Some(&smallest)) if smallest > 0.0 => largest / smallest,
        _ => 1.0,
    };
    let retained = Retained {
        old_rank: shape.out.min(cols),
        new_rank: extraction.rank,
        fro_retained: extraction.fro_retained,
        sum_retained: f64::NAN,
        max_ratio,
    };
    Ok((lora, retained))
}

/// The rank `rule` picks for the descending singular values `s`, within `[1, max_rank]`
/// and at most `s.len()`; a zero update ([`MIN_SINGULAR_VALUE`]) gets rank 1.
fn chosen_rank(s: &[f64], max_rank: usize, rule: RankRule) -> usize {
    let limit = max_rank.min(s.len()).max(1);
    let Some(&largest) = s.first().filter(|&&v| v > MIN_SINGULAR_VALUE) else {
        return 1;
    };
    let wanted = match rule {
        RankRule::Fixed => limit,
        RankRule::SvRatio(t) => s.iter().filter(|&&v| v * t >= largest).count(),
        RankRule::SvCumulative(t) => first_reaching(s.iter().copied(), t),
        RankRule::SvFro(t) => first_reaching(s.iter().map(|v| v * v), t * t),
    };
    wanted.clamp(1, limit)
}

/// How many leading `values` it takes for their running sum to reach `fraction` of the
/// total (with a relative slack of 1e-12, so that a fraction of 1 is met despite rounding).
fn first_reaching(values: impl Iterator<Item = f64> + Clone, fraction: f64) -> usize {
    let total: f64 = values.clone().sum();
    let target = fraction * total * (1.0 - 1e-12);
    let mut acc = 0.0;
    let mut count = 0;
    for v in values {
        acc += v;
        count += 1;
        if acc >= target {
            break;
        }
    }
    count
}

fn retained(s: &[f64], old_rank: usize, k: usize) -> Retained {
    let share = |f: &dyn Fn(f64) -> f64| {
        let total: f64 = s.iter().map(|&v| f(v)).sum();
        if total > 0.0 {
            s[..k].iter().map(|&v| f(v)).sum::<f64>() / total
        } else {
            1.0
        }
    };
    let fro_retained = share(&|v| v * v).sqrt();
    let sum_retained = share(&|v| v.abs());
    let max_ratio = if s[k - 1] > 0.0 { s[0] / s[k - 1] } else { 1.0 };
    Retained {
        old_rank,
        new_rank: k,
        fro_retained,
        sum_retained,
        max_ratio,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AdapterKey, Component};

    fn random(shape: Vec<usize>, seed: u32) -> HostTensor {
        let n = shape.iter().product();
        // A small LCG: deterministic values in [-1, 1).
        let mut state = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        let data = (0..n).map(|_| {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (state >> 8) as f32 / (1u32 << 23) as f32 - 1.0
        }).collect();
        HostTensor::new(shape, data).unwrap()
    }

    /// Merging two sets: modules of either are in the result; without settings the sum is
    /// exact at the total rank, with a rank at least that total too (at alpha = rank), and
    /// below it the best approximation, which keeps less than all of the norm; DoRA is refused.
    #[test]
    fn merged_sets_sum_the_updates() {
        let (shared, only_b) = (AdapterKey::new(Component::Unet, "down_blocks.0.attentions.0.proj_in"), AdapterKey::new(Component::TextEncoder, "text_model.encoder.layers.0.mlp.fc1"));
        let lora = |rank: usize, (out, cols): (usize, usize), alpha: f32, seed: u32| LoraWeights::new(random(vec![rank, cols], seed), random(vec![out, rank], seed + 1), alpha, "t").unwrap();
        let mut a = AdapterSet::new();
        a.insert(shared.clone(), lora(4, (6, 9), 2.0, 1)).unwrap();
        let mut b = AdapterSet::new();
        b.insert(shared.clone(), lora(3, (6, 9), 3.0, 5)).unwrap();
        b.insert(only_b.clone(), lora(2, (5, 4), 1.0, 9)).unwrap();
        let want = |key: &AdapterKey| {
            let part = |set: &AdapterSet, strength: f32| set.get(key).map_or(vec![0.0; 0], |w| w.delta().data.iter().map(|v| v * strength).collect());
            let (x, y) = (part(&a, 0.7), part(&b, -0.4));
            (0..x.len().max(y.len())).map(|i| x.get(i).unwrap_or(&0.0) + y.get(i).unwrap_or(&0.0)).collect::<Vec<f32>>()
        };
        let close = |got: &[f32], want: &[f32], tol: f32| got.iter().zip(want).all(|(g, w)| (g - w).abs() <= tol);
        let exact = merge_sets(&[(&a, 0.7), (&b, -0.4)], None).unwrap();
        assert_eq!(exact.set.len(), 2);
        assert_eq!(exact.set.get(&shared).unwrap().rank(), 7);
        for key in [&shared, &only_b] {
            assert!(close(&exact.set.get(key).unwrap().delta().data, &want(key), 1e-5), "{key:?}");
        }
        let wide = ResizeSettings { rank: 16, conv_rank: 16, rule: RankRule::Fixed };
        let svd = merge_sets(&[(&a, 0.7), (&b, -0.4)], Some(&wide)).unwrap();
        let w = svd.set.get(&shared).unwrap();
        assert_eq!((w.rank(), w.alpha), (6, 6.0), "rank of the sum: min(6 outputs, 7)");
        assert!(close(&w.delta().data, &want(&shared), 1e-4));
        let narrow = ResizeSettings { rank: 2, ..wide };
        let small = merge_sets(&[(&a, 0.7), (&b, -0.4)], Some(&narrow)).unwrap();
        assert_eq!(small.set.get(&shared).unwrap().rank(), 2);
        assert!(small.modules[&shared].fro_retained < 1.0 && small.modules[&shared].fro_retained > 0.5);
        assert!(!small.set.metadata.contains_key("ss_training_comment"));
        let mut dora = AdapterSet::new();
        dora.insert(shared.clone(), lora(2, (6, 9), 2.0, 11).with_magnitude(random(vec![6], 13), "t").unwrap()).unwrap();
        assert!(merge_sets(&[(&a, 1.0), (&dora, 1.0)], None).is_err());
        assert!(merge_sets(&[], None).is_err());
        // What the inputs agree on about their base model stays; the rest goes.
        for set in [&mut a, &mut b] {
            set.metadata.insert("ss_base_model_version".into(), "sdxl_base_v1-0".into());
            set.metadata.insert("ss_output_name".into(), "x".into());
        }
        a.metadata.insert("ss_v2".into(), "False".into());
        let merged = merge_sets(&[(&a, 0.7), (&b, -0.4)], Some(&narrow)).unwrap().set.metadata;
        assert_eq!(merged.get("ss_base_model_version").map(String::as_str), Some("sdxl_base_v1-0"));
        assert!(!merged.contains_key("ss_v2") && !merged.contains_key("ss_output_name"), "{merged:?}");
    }

    #[test]
    fn rules_pick_the_smallest_rank_meeting_them() {
        let s = [4.0, 2.0, 1.0, 0.5];
        assert_eq!(chosen_rank(&s, 8, RankRule::Fixed), 4);
        assert_eq!(chosen_rank(&s, 3, RankRule::Fixed), 3);
        // 4/2 = 2: values ≥ 2 are kept.
        assert_eq!(chosen_rank(&s, 8, RankRule::SvRatio(2.0)), 2);
        assert_eq!(chosen_rank(&s, 8, RankRule::SvRatio(1.0)), 1);
        // Sums 4, 6, 7, 7.5 of 7.5: 0.8 → 6/7.5 = 0.8 reached at 2.
        assert_eq!(chosen_rank(&s, 8, RankRule::SvCumulative(0.8)), 2);
        assert_eq!(chosen_rank(&s, 8, RankRule::SvCumulative(0.81)), 3);
        assert_eq!(chosen_rank(&s, 8, RankRule::SvCumulative(1.0)), 4);
        // Squares 16, 4, 1, 0.25 of 21.25: 0.9² · 21.25 = 17.2 → 2.
        assert_eq!(chosen_rank(&s, 8, RankRule::SvFro(0.9)), 2);
        assert_eq!(chosen_rank(&s, 1, RankRule::SvFro(0.99)), 1);
        assert_eq!(chosen_rank(&[0.0, 0.0], 8, RankRule::SvFro(0.9)), 1);
        assert_eq!(chosen_rank(&[0.0, 0.0], 8, RankRule::Fixed), 1);
        assert_eq!(chosen_rank(&[1e-7, 1e-8], 8, RankRule::Fixed), 1, "kohya's zero threshold");
        assert_eq!(chosen_rank(&[2e-6, 1e-6], 8, RankRule::Fixed), 2);
    }
}
