//! LyCORIS' LoHa and LoKr adapters (kohya layout), read with their own tensors
//! ([`crate::LoraWeights::lycoris`]) and the plain LoRA with the same update.
//!
//! Both updates factor exactly into a LoRA of a larger rank:
//!
//! - LoHa: `ΔW = s · (A₁B₁) ⊙ (A₂B₂)` with `Aₖ` `[out, rₖ]`, `Bₖ` `[rₖ, in]`. Entry-wise,
//!   `ΔW[o, c] = s · Σᵢⱼ A₁[o,i]·A₂[o,j] · B₁[i,c]·B₂[j,c]`: a rank-`r₁r₂` LoRA with
//!   `up[o, (i,j)] = A₁[o,i]·A₂[o,j]` and `down[(i,j), c] = B₁[i,c]·B₂[j,c]`.
//! - LoKr: `ΔW = s · W₁ ⊗ W₂` (Kronecker). With `Wₖ = UₖVₖ` (the file's low-rank halves, or
//!   the identity on the smaller side of a full `Wₖ`), `W₁ ⊗ W₂ = (U₁ ⊗ U₂)(V₁ ⊗ V₂)`: a
//!   LoRA of rank `rank(U₁)·rank(U₂)`.
//!
//! When that rank is not below `min(out, in·kh·kw)`, the LoRA is `ΔW` itself beside an
//! identity instead (no more than the layer's own weight). The scale is `alpha / rank` as
//! ComfyUI and A1111 apply it, with the rank of the LoHa halves or of LoKr's low-rank half
//! (`lokr_w2_b` first), and 1 for a LoKr whose halves are both full or a file without an
//! alpha; it is folded into `up`. A convolution's kernel is flattened into the columns
//! (`[rank, in·kh·kw]`, LyCORIS' non-Tucker layout); the reader puts it back in the conv
//! layout where the [`crate::ModuleIndex`] knows the kernel ([`crate::ModuleIndex::set_kernel`]),
//! and the conv layer unflattens it when attached otherwise. Tucker-decomposed
//! convolutions (LyCORIS' `use_tucker`: `hada_t1` / `hada_t2`, `lokr_t2`) keep their own
//! tensors, and their plain LoRA is that of the non-Tucker halves with the same product:
//! LyCORIS rebuilds a half as
//! `W[p, c, h, w] = Σᵢⱼ t[i, j, h, w] · a[i, p] · b[j, c]`, which is `A · B` with
//! `A = aᵀ` `[out, r]` and `B[i, (c, h, w)] = Σⱼ t[i, j, h, w] · b[j, c]` `[r, in·kh·kw]`
//! ([`tucker_core`]; LoCon's `lora_mid` folds into its `lora_down` the same way).

use std::path::Path;

use crate::{Algo, HostTensor, LoraError, LoraWeights, LycorisWeights, Result};

/// Which LyCORIS tensor a key holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Part {
    HadaW1A,
    HadaW1B,
    HadaW2A,
    HadaW2B,
    HadaT1,
    HadaT2,
    LokrW1,
    LokrW1A,
    LokrW1B,
    LokrW2,
    LokrW2A,
    LokrW2B,
    LokrT2,
    /// An OFT's blocks (kohya's `networks.oft`, LyCORIS' Diag-OFT and BOFT).
    OftBlocks,
    /// Diag-OFT's and BOFT's scale per output (LyCORIS' `rescaled`).
    OftRescale,
    /// GLoRA's tensors ([`crate::glora::NAMES`]).
    GloraA1,
    GloraA2,
    GloraB1,
    GloraB2,
    /// (IA)³'s scale and its flag ([`crate::ia3`]).
    Ia3Weight,
    Ia3OnInput,
    /// Full fine-tuning's differences of the weight and the bias ([`crate::full`]).
    FullDiff,
    FullDiffB,
    /// A norm module's differences of the scale and the shift ([`crate::norm`]).
    NormW,
    NormB,
}

/// Key suffixes of the LyCORIS tensors.
pub(super) const SUFFIXES: &[(&str, Part)] = &[
    (".hada_w1_a", Part::HadaW1A),
    (".hada_w1_b", Part::HadaW1B),
    (".hada_w2_a", Part::HadaW2A),
    (".hada_w2_b", Part::HadaW2B),
    (".hada_t1", Part::HadaT1),
    (".hada_t2", Part::HadaT2),
    (".lokr_w1", Part::LokrW1),
    (".lokr_w1_a", Part::LokrW1A),
    (".lokr_w1_b", Part::LokrW1B),
    (".lokr_w2", Part::LokrW2),
    (".lokr_w2_a", Part::LokrW2A),
    (".lokr_w2_b", Part::LokrW2B),
    (".lokr_t2", Part::LokrT2),
    (".oft_blocks", Part::OftBlocks),
    (".rescale", Part::OftRescale),
    (".a1.weight", Part::GloraA1),
    (".a2.weight", Part::GloraA2),
    (".b1.weight", Part::GloraB1),
    (".b2.weight", Part::GloraB2),
    (".on_input", Part::Ia3OnInput),
    (".diff", Part::FullDiff),
    (".diff_b", Part::FullDiffB),
    (".w_norm", Part::NormW),
    (".b_norm", Part::NormB),
    // Last: every more specific `….weight` suffix above comes first.
    (".weight", Part::Ia3Weight),
];

/// The LyCORIS name of a part (`hada_w1_a`, …).
fn part_name(part: Part) -> &'static str {
    let (suffix, _) = SUFFIXES.iter().find(|(_, p)| *p == part).expect("every part has a suffix");
    &suffix[1..]
}

/// The plain LoRA with the update of `lycoris` (its `lycoris` field set to it); `key`
/// names the adapter in errors. For a trained LyCORIS adapter, which must be saved or
/// combined like any other.
pub(crate) fn lora_of(lycoris: &LycorisWeights, key: &str) -> Result<LoraWeights> {
    let mut tensors = Tensors::default();
    for (name, t) in &lycoris.tensors {
        let Some((_, part)) = SUFFIXES.iter().find(|(suffix, _)| suffix[1..] == **name) else {
            return Err(LoraError::ShapeMismatch { key: key.into(), reason: format!("`{name}` is not a LyCORIS tensor") });
        };
        tensors.insert(*part, t.clone());
    }
    let mut weights = tensors.to_lora(Some(lycoris.alpha), key, Path::new("<adapter>"))?;
    // Kept as given (names, order and alpha).
    weights.lycoris = Some(lycoris.clone());
    Ok(weights)
}

/// A matrix `[rows, cols]` on the host (a file tensor with its trailing dimensions
/// flattened into the columns).
struct Mat {
    rows: usize,
    cols: usize,
    data: Vec<f32>,
}

impl Mat {
    fn of(t: &HostTensor) -> Option<Self> {
        let rows = *t.shape.first()?;
        let cols = t.shape[1..].iter().product();
        (t.shape.len() >= 2).then(|| Self { rows, cols, data: t.data.clone() })
    }

    fn identity(n: usize) -> Self {
        let mut data = vec![0.0; n * n];
        for i in 0..n {
            data[i * n + i] = 1.0;
        }
        Self { rows: n, cols: n, data }
    }

    fn at(&self, r: usize, c: usize) -> f32 {
        self.data[r * self.cols + c]
    }

    /// `self · other` (accumulated in f64), row by row along `other`'s rows (contiguous
    /// reads: a trained LoHa's update of a large convolution is a billion products).
    fn matmul(&self, other: &Mat) -> Mat {
        let mut data = vec![0.0; self.rows * other.cols];
        let mut acc = vec![0f64; other.cols];
        for r in 0..self.rows {
            acc.fill(0.0);
            for k in 0..self.cols {
                let a = f64::from(self.at(r, k));
                for (s, b) in acc.iter_mut().zip(&other.data[k * other.cols..][..other.cols]) {
                    *s += a * f64::from(*b);
                }
            }
            for (d, s) in data[r * other.cols..][..other.cols].iter_mut().zip(&acc) {
                *d = *s as f32;
            }
        }
        Mat { rows: self.rows, cols: other.cols, data }
    }

    /// `self ⊗ other`.
    fn kron(&self, other: &Mat) -> Mat {
        let (rows, cols) = (self.rows * other.rows, self.cols * other.cols);
        let mut data = vec![0.0; rows * cols];
        for i in 0..self.rows {
            for p in 0..other.rows {
                let row = &mut data[(i * other.rows + p) * cols..][..cols];
                for j in 0..self.cols {
                    let a = self.at(i, j);
                    for (q, b) in other.data[p * other.cols..][..other.cols].iter().enumerate() {
                        row[j * other.cols + q] = a * b;
                    }
                }
            }
        }
        Mat { rows, cols, data }
    }
}

/// Which OFT a module's `oft_blocks` with `dims` dimensions are: kohya's under its `oft_…`
/// names, and 3-d blocks under any name when `kohya_file` (a file that says it is kohya's
/// OFT, `ss_network_module = "networks.oft"`, which names a text encoder's modules
/// `lora_te_…`); otherwise LyCORIS' BOFT for 4-d blocks and Diag-OFT for the rest.
pub(crate) fn oft_algo(name: &str, dims: usize, kohya_file: bool) -> Algo {
    match dims {
        _ if name.starts_with("oft_") => Algo::Oft,
        3 if kohya_file => Algo::Oft,
        4 => Algo::Boft,
        _ => Algo::DiagOft,
    }
}

/// One module's LyCORIS tensors, as found in a file.
#[derive(Default)]
pub(super) struct Tensors {
    found: Vec<(Part, HostTensor)>,
    /// The file says it is kohya's OFT ([`oft_algo`]).
    kohya_oft_file: bool,
}

impl Tensors {
    /// Marks the module as one of a kohya OFT file's ([`oft_algo`]).
    pub(super) fn set_kohya_oft_file(&mut self, kohya: bool) {
        self.kohya_oft_file = kohya;
    }

    pub(super) fn insert(&mut self, part: Part, t: HostTensor) {
        self.found.push((part, t));
    }

    pub(super) fn is_empty(&self) -> bool {
        self.found.is_empty()
    }

    fn get(&self, part: Part) -> Option<&HostTensor> {
        self.found.iter().find(|(p, _)| *p == part).map(|(_, t)| t)
    }

    /// The plain LoRA with this module's update; `alpha` is the file's (or `None`).
    /// Errors name the file and the module.
    pub(super) fn to_lora(&self, alpha: Option<f32>, name: &str, path: &Path) -> Result<LoraWeights> {
        let bad = |reason: String| LoraError::BadTensor {
            path: path.to_path_buf(),
            key: name.to_string(),
            reason,
        };
        let rescale = self.get(Part::OftRescale);
        if let Some(blocks) = self.get(Part::OftBlocks) {
            if self.found.len() > 1 + usize::from(rescale.is_some()) {
                return Err(bad("the module mixes OFT (`oft_blocks`) and LyCORIS tensors".into()));
            }
            // In a kohya OFT file, a module with LyCORIS' `rescale` or no positive constraint
            // stays LyCORIS'.
            let kohya_file = self.kohya_oft_file && rescale.is_none() && alpha.is_some_and(|a| a > 0.0);
            let algo = oft_algo(name, blocks.shape.len(), kohya_file);
            if algo == Algo::Oft && rescale.is_some() {
                return Err(bad("kohya's OFT (`oft_unet_…`) has no `rescale` (LyCORIS' Diag-OFT names its modules `lora_…`)".into()));
            }
            // LyCORIS always writes the constraint; without it, none (as ComfyUI reads it).
            let alpha = match (alpha, algo) {
                (Some(a), _) => a,
                (None, Algo::DiagOft | Algo::Boft) => 0.0,
                (None, _) => return Err(bad("kohya's OFT needs its `alpha` (the constraint)".into())),
            };
            // `weights` checks the tensors' shapes.
            return crate::oft::weights(algo, blocks.clone(), rescale.cloned(), alpha, &[], name).map_err(|e| bad(e.to_string()));
        }
        if rescale.is_some() {
            return Err(bad("`rescale` (LyCORIS' Diag-OFT / BOFT) without its `oft_blocks`".into()));
        }
        let (diff, diff_b) = (self.get(Part::FullDiff), self.get(Part::FullDiffB));
        if diff.is_some() || diff_b.is_some() {
            return match (diff, self.found.len() - usize::from(diff_b.is_some())) {
                (Some(d), 1) => crate::full::weights(d.clone(), diff_b.cloned(), name).map_err(|e| bad(e.to_string())),
                (None, 0) => Err(bad("a full fine-tuning's `diff_b` without its `diff` (LyCORIS writes both)".into())),
                _ => Err(bad(format!("the module mixes full fine-tuning (`diff`, `diff_b`) and other LyCORIS tensors: {:?}", self.found.iter().map(|(p, _)| part_name(*p)).collect::<Vec<_>>()))),
            };
        }
        let (w_norm, b_norm) = (self.get(Part::NormW), self.get(Part::NormB));
        if w_norm.is_some() || b_norm.is_some() {
            return match (w_norm, self.found.len() - usize::from(b_norm.is_some())) {
                (Some(w), 1) => crate::norm::weights(w.clone(), b_norm.cloned(), name).map_err(|e| bad(e.to_string())),
                (None, 0) => Err(bad("a norm module's `b_norm` without its `w_norm` (LyCORIS writes both)".into())),
                _ => Err(bad(format!("the module mixes a norm module (`w_norm`, `b_norm`) and other LyCORIS tensors: {:?}", self.found.iter().map(|(p, _)| part_name(*p)).collect::<Vec<_>>()))),
            };
        }
        let (weight, on_input) = (self.get(Part::Ia3Weight), self.get(Part::Ia3OnInput));
        if weight.is_some() || on_input.is_some() {
            return match (weight, on_input, self.found.len()) {
                (Some(w), Some(flag), 2) => crate::ia3::weights(w.clone(), flag.clone(), name).map_err(|e| bad(e.to_string())),
                (Some(_), None, 1) => Err(bad("an (IA)³'s `weight` without its `on_input` (LyCORIS writes both)".into())),
                (None, Some(_), 1) => Err(bad("an (IA)³'s `on_input` without its `weight`".into())),
                _ => Err(bad(format!("the module mixes (IA)³ (`weight`, `on_input`) and other LyCORIS tensors: {:?}", self.found.iter().map(|(p, _)| part_name(*p)).collect::<Vec<_>>()))),
            };
        }
        let glora = [Part::GloraA1, Part::GloraA2, Part::GloraB1, Part::GloraB2];
        if self.found.iter().any(|(p, _)| glora.contains(p)) {
            if self.found.len() != glora.len() {
                let names: Vec<&str> = self.found.iter().map(|(p, _)| part_name(*p)).collect();
                return Err(bad(format!("a GLoRA has exactly `a1.weight`, `a2.weight`, `b1.weight` and `b2.weight`, the module has {names:?}")));
            }
            let tensors = glora.iter().map(|p| self.get(*p).cloned()).collect::<Option<Vec<_>>>().ok_or_else(|| bad("a GLoRA tensor is given twice".into()))?;
            return crate::glora::weights(tensors, alpha, name).map_err(|e| bad(e.to_string()));
        }
        if self.get(Part::HadaT1).is_some() || self.get(Part::HadaT2).is_some() || self.get(Part::LokrT2).is_some() {
            let mut weights = self.untuckered().map_err(bad)?.to_lora(alpha, name, path)?;
            // LyCORIS' own tensors stay as the file has them (to train on in their form).
            if let Some(lycoris) = weights.lycoris.as_mut() {
                lycoris.tensors = self.found.iter().map(|(part, t)| (part_name(*part).to_string(), t.clone())).collect();
            }
            return Ok(weights);
        }
        let is_loha = |p: &Part| matches!(p, Part::HadaW1A | Part::HadaW1B | Part::HadaW2A | Part::HadaW2B);
        let (loha_parts, lokr_parts) = (self.found.iter().filter(|(p, _)| is_loha(p)).count(), self.found.iter().filter(|(p, _)| !is_loha(p)).count());
        if loha_parts > 0 && lokr_parts > 0 {
            return Err(bad("the module mixes LoHa (`hada_*`) and LoKr (`lokr_*`) tensors".into()));
        }
        let (factors, rank_for_scale) = if loha_parts > 0 { self.loha_factors().map_err(bad)? } else { self.lokr_factors().map_err(bad)? };
        // ComfyUI's and A1111's scale: alpha / rank of the low-rank part (alpha 0 gives 0, as
        // for a plain LoRA); 1 without a low-rank part or without alpha.
        let scale = match (alpha, rank_for_scale) {
            (Some(alpha), Some(r)) => alpha / r as f32,
            _ => 1.0,
        };
        let algo = if loha_parts > 0 { Algo::Loha } else { Algo::Lokr };
        let (up, down) = factors.into_lora(scale).map_err(bad)?;
        let rank = down.rows;
        let up = HostTensor::new(vec![up.rows, up.cols], up.data)?;
        let down = HostTensor::new(vec![down.rows, down.cols], down.data)?;
        // The scale is in `up`: alpha = rank.
        let mut weights = LoraWeights::new(down, up, rank as f32, name).map_err(|e| bad(e.to_string()))?;
        // The file's own tensors, kept to train on or to write again as they were; without
        // an alpha, the one that gives the scale of 1 the readers use.
        let tensors = self.found.iter().map(|(part, t)| (part_name(*part).to_string(), t.clone())).collect();
        let alpha = alpha.unwrap_or(rank_for_scale.unwrap_or(1) as f32);
        weights.lycoris = Some(LycorisWeights { algo, tensors, alpha });
        Ok(weights)
    }

    /// The module with its Tucker-decomposed halves as the non-Tucker ones of the same
    /// update (see the [module docs](self)).
    fn untuckered(&self) -> std::result::Result<Tensors, String> {
        let mut out = Tensors::default();
        let tucker = [Part::HadaT1, Part::HadaT2, Part::LokrT2];
        let halves: &[(Part, Part, Part)] = match self.get(Part::LokrT2) {
            Some(_) => &[(Part::LokrT2, Part::LokrW2A, Part::LokrW2B)],
            None => &[(Part::HadaT1, Part::HadaW1A, Part::HadaW1B), (Part::HadaT2, Part::HadaW2A, Part::HadaW2B)],
        };
        for &(t, a, b) in halves {
            let [name_t, name_a, name_b] = [t, a, b].map(part_name);
            let (Some(core), Some(wa), Some(wb)) = (self.get(t), self.get(a), self.get(b)) else {
                return Err(format!("a Tucker-decomposed half needs `{name_t}`, `{name_a}` and `{name_b}`"));
            };
            let (a_t, m) = untucker(core, wa, wb).map_err(|e| format!("the Tucker-decomposed half `{name_t}` / `{name_a}` / `{name_b}`: {e}"))?;
            out.insert(a, a_t);
            out.insert(b, m);
        }
        let converted: Vec<Part> = halves.iter().flat_map(|(t, a, b)| [*t, *a, *b]).collect();
        for (part, t) in &self.found {
            if tucker.contains(part) && !converted.contains(part) {
                return Err(format!("`{}` without the other Tucker-decomposed half's tensors", part_name(*part)));
            }
            if !converted.contains(part) {
                out.insert(*part, t.clone());
            }
        }
        Ok(out)
    }

    /// LoHa's four halves, and their rank (for the scale).
    fn loha_factors(&self) -> std::result::Result<(Factors, Option<usize>), String> {
        let [w1a, w1b, w2a, w2b] = [Part::HadaW1A, Part::HadaW1B, Part::HadaW2A, Part::HadaW2B].map(|p| self.get(p).and_then(Mat::of));
        let (Some(w1a), Some(w1b), Some(w2a), Some(w2b)) = (w1a, w1b, w2a, w2b) else {
            return Err("a LoHa needs `hada_w1_a`, `hada_w1_b`, `hada_w2_a` and `hada_w2_b`, each at least 2-d".into());
        };
        let out = w1a.rows;
        if w1a.cols != w1b.rows || w2a.cols != w2b.rows || w2a.rows != out || w2b.cols != w1b.cols {
            return Err(format!(
                "LoHa halves do not fit: hada_w1_a [{}, {}], hada_w1_b [{}, {}], hada_w2_a [{}, {}], hada_w2_b [{}, {}]",
                w1a.rows, w1a.cols, w1b.rows, w1b.cols, w2a.rows, w2a.cols, w2b.rows, w2b.cols
            ));
        }
        let rank = w1b.rows;
        Ok((Factors::Loha([w1a, w1b, w2a, w2b]), Some(rank)))
    }

    /// LoKr's two halves as `U·V` each, and the rank of the low-rank half (for the scale;
    /// `lokr_w2_b`'s first, as ComfyUI and A1111 read it).
    fn lokr_factors(&self) -> std::result::Result<(Factors, Option<usize>), String> {
        let half = |full: Part, a: Part, b: Part, what: &str| -> std::result::Result<(Mat, Mat, Option<usize>), String> {
            match (self.get(full), self.get(a), self.get(b)) {
                (Some(w), None, None) => {
                    let w = Mat::of(w).ok_or(format!("`{what}` must be at least 2-d"))?;
                    // The identity on the smaller side keeps the rank low.
                    Ok(if w.rows <= w.cols {
                        (Mat::identity(w.rows), w, None)
                    } else {
                        let cols = w.cols;
                        (w, Mat::identity(cols), None)
                    })
                }
                (None, Some(a), Some(b)) => {
                    let (Some(a), Some(b)) = (Mat::of(a), Mat::of(b)) else { return Err(format!("`{what}_a` and `{what}_b` must be at least 2-d")) };
                    if a.cols != b.rows {
                        return Err(format!("`{what}_a` is [{}, {}] but `{what}_b` has {} rows", a.rows, a.cols, b.rows));
                    }
                    let rank = b.rows;
                    Ok((a, b, Some(rank)))
                }
                _ => Err(format!("a LoKr needs either `{what}` or both `{what}_a` and `{what}_b`")),
            }
        };
        let (u1, v1, r1) = half(Part::LokrW1, Part::LokrW1A, Part::LokrW1B, "lokr_w1")?;
        let (u2, v2, r2) = half(Part::LokrW2, Part::LokrW2A, Part::LokrW2B, "lokr_w2")?;
        Ok((Factors::Lokr([u1, v1, u2, v2]), r2.or(r1)))
    }
}

/// Largest update (values of `ΔW`) a LyCORIS module may have: far above any Stable
/// Diffusion layer's (SD1.5's largest, a 1280-channel 3x3 convolution, has 14.7 M), so a
/// broken or hostile file fails before it allocates.
const MAX_UPDATE: usize = 1 << 28;

/// A module's update in factored form.
enum Factors {
    /// `(A₁B₁) ⊙ (A₂B₂)`: `[A₁, B₁, A₂, B₂]`.
    Loha([Mat; 4]),
    /// `(U₁V₁) ⊗ (U₂V₂)`: `[U₁, V₁, U₂, V₂]`.
    Lokr([Mat; 4]),
}

impl Factors {
    /// `(up, down)` with `scale · up · down = ΔW`: the low-rank form when its rank is below
    /// `min(out, cols)`, else `ΔW` itself beside an identity (a higher rank would cost more
    /// than the layer's own weight).
    fn into_lora(self, scale: f32) -> std::result::Result<(Mat, Mat), String> {
        let (out, cols, rank) = match &self {
            Factors::Loha([a1, b1, a2, _]) => (Some(a1.rows), Some(b1.cols), a1.cols.checked_mul(a2.cols)),
            Factors::Lokr([u1, v1, u2, v2]) => (u1.rows.checked_mul(u2.rows), v1.cols.checked_mul(v2.cols), u1.cols.checked_mul(u2.cols)),
        };
        let (Some(out), Some(cols), Some(rank)) = (out, cols, rank) else {
            return Err("the update's size overflows".into());
        };
        if out.checked_mul(cols).is_none_or(|n| n > MAX_UPDATE) {
            return Err(format!("the update would be [{out}, {cols}], larger than any layer this reads ({MAX_UPDATE} values)"));
        }
        let (mut up, down) = if rank < out.min(cols) {
            match self {
                Factors::Loha([a1, b1, a2, b2]) => loha(&a1, &b1, &a2, &b2),
                Factors::Lokr([u1, v1, u2, v2]) => (u1.kron(&u2), v1.kron(&v2)),
            }
        } else {
            let delta = match self {
                Factors::Loha([a1, b1, a2, b2]) => {
                    let (x, y) = (a1.matmul(&b1), a2.matmul(&b2));
                    Mat { rows: out, cols, data: x.data.iter().zip(&y.data).map(|(p, q)| p * q).collect() }
                }
                Factors::Lokr([u1, v1, u2, v2]) => u1.matmul(&v1).kron(&u2.matmul(&v2)),
            };
            if out <= cols { (Mat::identity(out), delta) } else { (delta, Mat::identity(cols)) }
        };
        for v in &mut up.data {
            *v *= scale;
        }
        Ok((up, down))
    }
}

/// The Tucker core `t [r₁, r₂, kh, kw]` contracted with `b [r₂, in]` (trailing 1s
/// allowed): `m [r₁, in·kh·kw]` with `m[i, (c, h, w)] = Σⱼ t[i, j, h, w] · b[j, c]`,
/// accumulated in f64. LoCon's `lora_mid` with its `lora_down` is the same product.
pub(super) fn tucker_core(t: &HostTensor, b: &HostTensor) -> std::result::Result<HostTensor, String> {
    let &[r1, r2, kh, kw] = t.shape.as_slice() else {
        return Err(format!("the core must be 4-d [r, r, kh, kw], got {:?}", t.shape));
    };
    if t.shape.contains(&0) {
        return Err(format!("the core {:?} is empty", t.shape));
    }
    if r1 != r2 {
        return Err(format!("the core {:?} is not square ([r, r, kh, kw] expected)", t.shape));
    }
    let (Some(&rows), Some(&input)) = (b.shape.first(), b.shape.get(1)) else {
        return Err(format!("the half must be [{r2}, in], got {:?}", b.shape));
    };
    if rows != r2 || input == 0 || b.shape[2..].iter().any(|d| *d != 1) {
        return Err(format!("the core {:?} does not fit the half {:?} ([{r2}, in] expected)", t.shape, b.shape));
    }
    let k = kh * kw;
    if r1.checked_mul(input).and_then(|n| n.checked_mul(k)).is_none_or(|n| n > MAX_UPDATE) {
        return Err(format!("the half would be [{r1}, {input}·{kh}·{kw}], larger than any layer this reads"));
    }
    let mut m = vec![0f32; r1 * input * k];
    let mut acc = vec![0f64; input * k];
    for i in 0..r1 {
        acc.fill(0.0);
        for j in 0..r2 {
            let core = &t.data[(i * r2 + j) * k..][..k];
            for (c, bv) in b.data[j * input..][..input].iter().enumerate() {
                for (s, tv) in acc[c * k..][..k].iter_mut().zip(core) {
                    *s += f64::from(*tv) * f64::from(*bv);
                }
            }
        }
        for (d, s) in m[i * input * k..][..input * k].iter_mut().zip(&acc) {
            *d = *s as f32;
        }
    }
    HostTensor::new(vec![r1, input * k], m).map_err(|e| e.to_string())
}

/// A Tucker-decomposed half (`t`, `a [r₁, out]`, `b [r₂, in]`) as the non-Tucker halves
/// `(aᵀ [out, r₁], m [r₁, in·kh·kw])` ([`tucker_core`]).
fn untucker(t: &HostTensor, a: &HostTensor, b: &HostTensor) -> std::result::Result<(HostTensor, HostTensor), String> {
    let m = tucker_core(t, b)?;
    let (&[r1, out], Some(&tr)) = (a.shape.as_slice(), t.shape.first()) else {
        return Err(format!("the outer half must be 2-d [r, out], got {:?}", a.shape));
    };
    if r1 != tr {
        return Err(format!("the outer half {:?} does not fit the core {:?}", a.shape, t.shape));
    }
    let transposed = (0..out).flat_map(|o| (0..r1).map(move |i| a.data[i * out + o])).collect();
    Ok((HostTensor::new(vec![out, r1], transposed).map_err(|e| e.to_string())?, m))
}

/// A 2-d adapter of a convolution with kernel `[kh, kw]` (LyCORIS' flattened `down`
/// `[rank, in·kh·kw]`) in the conv layout: `down [rank, in, kh, kw]`, `up [out, rank, 1, 1]`.
/// Anything else is returned as it is.
pub(crate) fn unflatten(w: LoraWeights, [kh, kw]: [usize; 2]) -> LoraWeights {
    let k = kh * kw;
    // An (IA)³'s empty plain form holds one side's channels, not a kernel's columns, and a
    // full difference keeps the shape its file gives.
    if w.lycoris.as_ref().is_some_and(|l| matches!(l.algo, crate::Algo::Ia3 | crate::Algo::Full | crate::Algo::Norm)) || w.down.shape.len() != 2 || k == 0 || !w.down.shape[1].is_multiple_of(k) {
        return w;
    }
    let (rank, out) = (w.down.shape[0], w.up.shape[0]);
    let down = HostTensor { shape: vec![rank, w.down.shape[1] / k, kh, kw], data: w.down.data };
    let up = HostTensor { shape: vec![out, rank, 1, 1], data: w.up.data };
    LoraWeights { down, up, ..w }
}

/// LoHa's halves as one LoRA: `(up [out, r₁r₂], down [r₁r₂, cols])` (shapes checked by
/// the caller).
fn loha(w1a: &Mat, w1b: &Mat, w2a: &Mat, w2b: &Mat) -> (Mat, Mat) {
    let (out, cols) = (w1a.rows, w1b.cols);
    let (r1, r2) = (w1a.cols, w2a.cols);
    let rank = r1 * r2;
    let mut up = vec![0.0; out * rank];
    for o in 0..out {
        for i in 0..r1 {
            for j in 0..r2 {
                up[o * rank + i * r2 + j] = w1a.at(o, i) * w2a.at(o, j);
            }
        }
    }
    let mut down = vec![0.0; rank * cols];
    for i in 0..r1 {
        for j in 0..r2 {
            let row = &mut down[(i * r2 + j) * cols..][..cols];
            for (c, v) in row.iter_mut().enumerate() {
                *v = w1b.at(i, c) * w2b.at(j, c);
            }
        }
    }
    (Mat { rows: out, cols: rank, data: up }, Mat { rows: rank, cols, data: down })
}
