//! LyCORIS' LoHa and LoKr adapters (kohya layout), read as the plain LoRA with the same
//! update.
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
//! The scale is LyCORIS': `alpha / rank` with the rank of the LoHa halves or of LoKr's
//! low-rank half (`lokr_w2_b` first, as ComfyUI), 1 for a LoKr whose halves are both full
//! or a file without an alpha. A convolution's kernel is flattened into the columns
//! (`[rank, in·kh·kw]`, LyCORIS' non-Tucker layout), which the conv layer unflattens when
//! the adapter is attached. Tucker-decomposed convolutions (`hada_t1`, `lokr_t2`) are not
//! supported.

use std::path::Path;

use crate::{HostTensor, LoraError, LoraWeights, Result};

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
];

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

/// One module's LyCORIS tensors, as found in a file.
#[derive(Default)]
pub(super) struct Tensors {
    found: Vec<(Part, HostTensor)>,
}

impl Tensors {
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
        if self.get(Part::HadaT1).is_some() || self.get(Part::HadaT2).is_some() || self.get(Part::LokrT2).is_some() {
            return Err(bad("Tucker-decomposed LyCORIS convolutions (`hada_t1` / `lokr_t2`) are not supported".into()));
        }
        let loha_parts = [Part::HadaW1A, Part::HadaW1B, Part::HadaW2A, Part::HadaW2B];
        let (up, down, rank_for_scale) = if loha_parts.iter().any(|p| self.get(*p).is_some()) {
            let [w1a, w1b, w2a, w2b] = loha_parts.map(|p| self.get(p).and_then(Mat::of));
            let (Some(w1a), Some(w1b), Some(w2a), Some(w2b)) = (w1a, w1b, w2a, w2b) else {
                return Err(bad("a LoHa needs `hada_w1_a`, `hada_w1_b`, `hada_w2_a` and `hada_w2_b`, each at least 2-d".into()));
            };
            let rank = w1b.rows;
            let (up, down) = loha(&w1a, &w1b, &w2a, &w2b).map_err(bad)?;
            (up, down, Some(rank))
        } else {
            let half = |full: Part, a: Part, b: Part, what: &str| -> std::result::Result<(Mat, Mat, Option<usize>), String> {
                match (self.get(full), self.get(a), self.get(b)) {
                    (Some(w), None, None) => {
                        let w = Mat::of(w).ok_or(format!("`{what}` must be at least 2-d"))?;
                        // The identity on the smaller side keeps the rank low.
                        Ok(if w.rows <= w.cols { (Mat::identity(w.rows), w, None) } else { let cols = w.cols; (w, Mat::identity(cols), None) })
                    }
                    (None, Some(a), Some(b)) => {
                        let (a, b) = (Mat::of(a), Mat::of(b));
                        let (Some(a), Some(b)) = (a, b) else { return Err(format!("`{what}_a` and `{what}_b` must be at least 2-d")) };
                        if a.cols != b.rows {
                            return Err(format!("`{what}_a` is [{}, {}] but `{what}_b` has {} rows", a.rows, a.cols, b.rows));
                        }
                        let rank = b.rows;
                        Ok((a, b, Some(rank)))
                    }
                    _ => Err(format!("a LoKr needs either `{what}` or both `{what}_a` and `{what}_b`")),
                }
            };
            let (u1, v1, r1) = half(Part::LokrW1, Part::LokrW1A, Part::LokrW1B, "lokr_w1").map_err(bad)?;
            let (u2, v2, r2) = half(Part::LokrW2, Part::LokrW2A, Part::LokrW2B, "lokr_w2").map_err(bad)?;
            (u1.kron(&u2), v1.kron(&v2), r2.or(r1))
        };
        let rank = down.rows;
        // LyCORIS' scale: alpha / rank of the low-rank part; 1 without one or without alpha.
        let scale = match (alpha, rank_for_scale) {
            (Some(alpha), Some(r)) if alpha != 0.0 => alpha / r as f32,
            _ => 1.0,
        };
        let up = HostTensor::new(vec![up.rows, up.cols], up.data)?;
        let down = HostTensor::new(vec![down.rows, down.cols], down.data)?;
        LoraWeights::new(down, up, scale * rank as f32, name).map_err(|e| bad(e.to_string()))
    }
}

/// LoHa's halves as one LoRA: `(up [out, r₁r₂], down [r₁r₂, cols])`.
fn loha(w1a: &Mat, w1b: &Mat, w2a: &Mat, w2b: &Mat) -> std::result::Result<(Mat, Mat), String> {
    let (out, cols) = (w1a.rows, w1b.cols);
    if w1a.cols != w1b.rows || w2a.cols != w2b.rows || w2a.rows != out || w2b.cols != cols {
        return Err(format!(
            "LoHa halves do not fit: hada_w1_a [{}, {}], hada_w1_b [{}, {}], hada_w2_a [{}, {}], hada_w2_b [{}, {}]",
            w1a.rows, w1a.cols, w1b.rows, w1b.cols, w2a.rows, w2a.cols, w2b.rows, w2b.cols
        ));
    }
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
    Ok((Mat { rows: out, cols: rank, data: up }, Mat { rows: rank, cols, data: down }))
}
