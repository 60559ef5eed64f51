//! Adapter weights on the host, independent of any backend or file format.

use burn::tensor::{backend::Backend, Tensor, TensorData};

use crate::{LoraError, Result};

/// A dense f32 tensor in host memory, row-major, in PyTorch layout.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// `shape.iter().product()` values, row-major.
    pub data: Vec<f32>,
}

impl HostTensor {
    /// Builds a tensor, checking that `data` has as many values as `shape` says.
    pub fn new(shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        // A file can hold an empty tensor whose other dimensions are absurd (`[0, 2^32,
        // 2^32]` is 0 bytes): products of a few of them, as readers take, would overflow.
        if shape.iter().filter(|&&d| d != 0).try_fold(1usize, |n, &d| n.checked_mul(d)).is_none() {
            return Err(LoraError::Data(format!("shape {shape:?} is too large: its dimensions multiply past the address space")));
        }
        let n: usize = shape.iter().product();
        if n != data.len() {
            return Err(LoraError::Data(format!(
                "shape {shape:?} needs {n} values, got {}",
                data.len()
            )));
        }
        Ok(Self { shape, data })
    }

    /// Reads a backend tensor back to the host (converting its element type to f32).
    pub fn from_tensor<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> Result<Self> {
        let shape = tensor.dims().to_vec();
        let data = tensor
            .into_data()
            .convert::<f32>()
            .to_vec::<f32>()
            .map_err(|e| LoraError::Data(format!("{e:?}")))?;
        Self::new(shape, data)
    }

    /// Uploads to a backend tensor of rank `D`; the shape must have exactly `D` dimensions.
    pub fn to_tensor<B: Backend, const D: usize>(&self, device: &B::Device) -> Result<Tensor<B, D>> {
        if self.shape.len() != D {
            return Err(LoraError::Data(format!(
                "expected a {D}-d tensor, got shape {:?}",
                self.shape
            )));
        }
        let data = TensorData::new(self.data.clone(), self.shape.clone());
        Ok(Tensor::from_data(data.convert::<B::FloatElem>(), device))
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.data.len()
    }
}

/// One adapter as stored in files: `down` (A) and `up` (B) in PyTorch layout plus `alpha`.
///
/// - linear layers: `down` is `[rank, in]`, `up` is `[out, rank]`;
/// - conv layers: `down` is `[rank, in, kh, kw]`, `up` is `[out, rank, 1, 1]`.
///
/// The update is `ΔW = (alpha / rank) · up · down` (contracting over the rank), the
/// convention of every reader of these files. A DoRA adapter also has a `magnitude`
/// (see [`crate::LoraConfig::dora`]).
#[derive(Debug, Clone, PartialEq)]
pub struct LoraWeights {
    /// Down projection (`lora_down` / `lora_A`).
    pub down: HostTensor,
    /// Up projection (`lora_up` / `lora_B`).
    pub up: HostTensor,
    /// Scale numerator; the scale is `alpha / rank`.
    pub alpha: f32,
    /// DoRA's magnitude `m`, one value per output feature or channel, shape `[out]`
    /// (PEFT's `lora_magnitude_vector`; kohya-layout files store it as `dora_scale` of
    /// shape `[out, 1]` or `[out, 1, 1, 1]`, as LyCORIS writes it with `wd_on_output`, its
    /// default; its other layout, one value per input feature, is not supported). `None`
    /// for plain LoRA.
    pub magnitude: Option<HostTensor>,
    /// A LyCORIS LoHa, LoKr or Tucker LoCon adapter's own tensors, when the adapter is
    /// one: `down`,
    /// `up` and `alpha` then hold the plain LoRA with the same update (for merging,
    /// combining and every reader of this type), and the kohya-layout writer writes these
    /// tensors and their alpha instead. Anything that changes `down`, `up` or `alpha` must
    /// drop it (as this crate's operations do). `None` for a LoRA.
    pub lycoris: Option<LycorisWeights>,
}

/// A LyCORIS LoHa, LoKr or Tucker LoCon adapter's tensors as its files hold them (kohya
/// layout).
///
/// LoHa: `hada_w1_a [out, r]`, `hada_w1_b [r, cols]`, `hada_w2_a [out, r]`,
/// `hada_w2_b [r, cols]`. LoKr: `lokr_w1 [a, c]` or `lokr_w1_a [a, r]` + `lokr_w1_b [r, c]`,
/// and `lokr_w2 [b, d]` (`[b, d, kh, kw]` for a convolution) or `lokr_w2_a [b, r]` +
/// `lokr_w2_b [r, d·kh·kw]`, with `out = a·b` and `in = c·d`. `cols` is `in·kh·kw`: a
/// convolution's kernel is flattened into the columns. Tucker-decomposed convolutions
/// (`use_tucker`) have cores `hada_t1` / `hada_t2` / `lokr_t2` `[r, r, kh, kw]` beside
/// their halves' `_a [r, out]` and `_b [r, in]` (LoKr: `b`, `d`). A LoCon with
/// `use_tucker` (algo [`crate::Algo::Lora`]) has `lora_down.weight [r, in, 1, 1]`,
/// `lora_mid.weight [r, r, kh, kw]` and `lora_up.weight [out, r, 1, 1]`.
#[derive(Debug, Clone, PartialEq)]
pub struct LycorisWeights {
    /// LoHa, LoKr, or LoRA for a Tucker LoCon.
    pub algo: crate::Algo,
    /// The tensors by LyCORIS name (`hada_w1_a`, …, `lokr_w2_b`; a Tucker LoCon's
    /// `lora_down.weight`, `lora_mid.weight`, `lora_up.weight`), in the order written.
    pub tensors: Vec<(String, HostTensor)>,
    /// The file's alpha: the scale is `alpha / rank` with the rank of the low-rank part
    /// (1 for a LoKr whose halves are both full).
    pub alpha: f32,
}

impl LycorisWeights {
    /// The tensor named `name` (`hada_w1_a`, `lokr_w2`, …), if present.
    pub fn get(&self, name: &str) -> Option<&HostTensor> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }

    /// The rank of the low-rank part as LyCORIS' readers take it for the scale (LoHa:
    /// `hada_w1_b`'s rows; LoKr: `lokr_w2_b`'s, else `lokr_w1_b`'s; a Tucker LoCon:
    /// `lora_down.weight`'s); `None` for a LoKr whose halves are both full.
    pub fn rank(&self) -> Option<usize> {
        let rows = |name: &str| self.get(name).and_then(|t| t.shape.first().copied());
        match self.algo {
            crate::Algo::Loha => rows("hada_w1_b"),
            crate::Algo::Lora => rows("lora_down.weight"),
            crate::Algo::Lokr => rows("lokr_w2_b").or_else(|| rows("lokr_w1_b")),
            crate::Algo::Oft => rows(crate::oft::BLOCKS),
            // LyCORIS' `dim`: the block size.
            crate::Algo::DiagOft => self.get(crate::oft::BLOCKS).and_then(|t| t.shape.get(1).copied()),
            crate::Algo::Boft => self.get(crate::oft::BLOCKS).and_then(|t| t.shape.get(2).copied()),
            // `a2 [r, in]`, as ComfyUI takes GLoRA's rank.
            crate::Algo::Glora => rows("a2.weight"),
            // One value per channel, or the whole weight: no rank.
            crate::Algo::Ia3 | crate::Algo::Full | crate::Algo::Norm => None,
        }
    }

    /// Whether these are a LoCon's tensors in LyCORIS' Tucker form (`lora_mid`).
    pub fn is_tucker_locon(&self) -> bool {
        self.algo == crate::Algo::Lora
    }

    /// The scale of the update: `alpha / rank`, or 1 without a low-rank part (an OFT has
    /// none: its alpha is a constraint).
    pub fn scale(&self) -> f32 {
        if self.algo.is_oft() {
            return 1.0;
        }
        self.rank().map_or(1.0, |r| self.alpha / r as f32)
    }
}

impl LoraWeights {
    /// Builds and validates a plain LoRA adapter (see [`LoraWeights::validate`]).
    pub fn new(down: HostTensor, up: HostTensor, alpha: f32, key: &str) -> Result<Self> {
        let w = Self { down, up, alpha, magnitude: None, lycoris: None };
        w.validate(key)?;
        Ok(w)
    }

    /// The adapter with DoRA's `magnitude` (`[out]`), validated.
    ///
    /// ```
    /// use lora_core::{HostTensor, LoraWeights};
    /// let down = HostTensor::new(vec![1, 3], vec![0.1, 0.2, 0.3])?;
    /// let up = HostTensor::new(vec![2, 1], vec![0.5, -0.5])?;
    /// let plain = LoraWeights::new(down, up, 1.0, "k")?;
    /// let dora = plain.clone().with_magnitude(HostTensor::new(vec![2], vec![1.0, 2.0])?, "k")?;
    /// assert!(dora.is_dora() && !plain.is_dora());
    /// assert!(plain.with_magnitude(HostTensor::new(vec![3], vec![1.0; 3])?, "k").is_err(), "one value per output");
    /// # Ok::<(), lora_core::LoraError>(())
    /// ```
    pub fn with_magnitude(mut self, magnitude: HostTensor, key: &str) -> Result<Self> {
        self.magnitude = Some(magnitude);
        self.validate(key)?;
        Ok(self)
    }

    /// Whether this is a DoRA adapter (it has a magnitude).
    pub fn is_dora(&self) -> bool {
        self.magnitude.is_some()
    }

    /// Whether this is an OFT (kohya's, LyCORIS' Diag-OFT or BOFT, [`crate::oft`]): its tensors are in
    /// [`lycoris`](Self::lycoris) and `down` / `up` are empty (rank 0), as its update depends
    /// on the base weight. Merging it into a layer works; combining, converting to PEFT,
    /// resizing and [`delta`](Self::delta) do not.
    pub fn is_oft(&self) -> bool {
        self.lycoris.as_ref().is_some_and(|l| l.algo.is_oft())
    }

    /// Whether the update depends on the base weight (an OFT or a GLoRA,
    /// [`crate::Algo::depends_on_base`]): its tensors are in [`lycoris`](Self::lycoris),
    /// `down` / `up` are empty (rank 0), and it can be merged into its layer but not
    /// combined, converted to PEFT, resized or taken as a [`delta`](Self::delta).
    pub fn depends_on_base(&self) -> bool {
        self.lycoris.as_ref().is_some_and(|l| l.algo.depends_on_base())
    }

    /// Whether the adapter has no plain-LoRA form ([`crate::Algo::stands_alone`]): one
    /// whose update depends on the base weight, or LyCORIS' full fine-tuning (a bias's
    /// update beside the weight's). Its tensors are in [`lycoris`](Self::lycoris),
    /// `down` / `up` are empty (rank 0), and it can be merged into its layer but not
    /// combined, converted to PEFT, resized (a full one resizes into a LoRA without its
    /// bias's update, [`crate::resize`]) or taken as a [`delta`](Self::delta).
    pub fn stands_alone(&self) -> bool {
        self.lycoris.as_ref().is_some_and(|l| l.algo.stands_alone())
    }

    /// An adapter with no plain-LoRA form ([`depends_on_base`](Self::depends_on_base)):
    /// `lycoris`'s tensors beside empty `down` / `up` of these shapes (rank 0), checked;
    /// `key` names it in errors.
    pub(crate) fn base_relative(down: Vec<usize>, up: Vec<usize>, lycoris: LycorisWeights, key: &str) -> Result<Self> {
        let weights = Self {
            down: HostTensor { shape: down, data: Vec::new() },
            up: HostTensor { shape: up, data: Vec::new() },
            alpha: lycoris.alpha,
            magnitude: None,
            lycoris: Some(lycoris),
        };
        weights.validate(key)?;
        Ok(weights)
    }

    /// The error for an operation on such an adapter ([`depends_on_base`](Self::depends_on_base))
    /// that needs a plain LoRA (`what`: "combined", "resized", ...); `key` names it.
    pub(crate) fn no_plain_form(&self, key: &str, what: &str) -> LoraError {
        match self.lycoris.as_ref().map(|l| l.algo) {
            Some(crate::Algo::Glora) => LoraError::Unsupported(format!("`{key}` is a GLoRA (LyCORIS' algo=glora), whose update depends on the base weight: it cannot be {what}")),
            Some(crate::Algo::Ia3) => LoraError::Unsupported(format!("`{key}` is an (IA)³ (LyCORIS' algo=ia3), whose update depends on the base weight: it cannot be {what}")),
            Some(crate::Algo::Full) => LoraError::Unsupported(format!("`{key}` is a full fine-tuning difference (LyCORIS' algo=full, with the bias's), which no LoRA holds: it cannot be {what}")),
            Some(crate::Algo::Norm) => LoraError::Unsupported(format!("`{key}` is a norm layer's module (LyCORIS' train_norm: its scale and shift), which no LoRA holds: it cannot be {what}")),
            _ => crate::oft::no_plain_form(key, what),
        }
    }

    /// Checks ranks and layouts; `key` names the adapter in errors.
    pub fn validate(&self, key: &str) -> Result<()> {
        if self.is_oft() {
            return crate::oft::validate(self, key);
        }
        if self.lycoris.as_ref().is_some_and(|l| l.algo == crate::Algo::Glora) {
            return crate::glora::validate(self, key);
        }
        if self.lycoris.as_ref().is_some_and(|l| l.algo == crate::Algo::Ia3) {
            return crate::ia3::validate(self, key);
        }
        if self.lycoris.as_ref().is_some_and(|l| l.algo == crate::Algo::Full) {
            return crate::full::validate(self, key);
        }
        if self.lycoris.as_ref().is_some_and(|l| l.algo == crate::Algo::Norm) {
            return crate::norm::validate(self, key);
        }
        let (d, u) = (&self.down.shape, &self.up.shape);
        let bad = |reason: String| LoraError::ShapeMismatch {
            key: key.to_string(),
            reason,
        };
        match (d.len(), u.len()) {
            (2, 2) => {}
            (4, 4) => {
                if u[2] != 1 || u[3] != 1 {
                    return Err(bad(format!("conv up must be [out, rank, 1, 1], got {u:?}")));
                }
            }
            (4, 2) | (2, 4) => {
                return Err(bad(format!(
                    "down {d:?} and up {u:?} mix linear and conv layouts"
                )))
            }
            _ => {
                return Err(bad(format!(
                    "down {d:?} and up {u:?} must both be 2-d (linear) or 4-d (conv)"
                )))
            }
        }
        if d[0] != u[1] {
            return Err(LoraError::RankMismatch {
                key: key.to_string(),
                down_rank: d[0],
                up_rank: u[1],
            });
        }
        if d[0] == 0 {
            return Err(bad("rank is 0".into()));
        }
        if d.contains(&0) || u.contains(&0) {
            return Err(bad(format!("down {d:?} and up {u:?} must not have a dimension of size 0")));
        }
        for (name, t) in [("down", &self.down), ("up", &self.up)] {
            if t.data.len() != t.shape.iter().product::<usize>() {
                return Err(bad(format!("{name} has {} values for shape {:?}", t.data.len(), t.shape)));
            }
        }
        if !self.alpha.is_finite() {
            return Err(bad(format!("alpha must be finite, got {}", self.alpha)));
        }
        if let Some(m) = &self.magnitude {
            if m.shape != [u[0]] || m.data.len() != u[0] {
                return Err(bad(format!("DoRA magnitude must be [{}] (one value per output), got {:?}", u[0], m.shape)));
            }
            if let Some(v) = m.data.iter().find(|v| !v.is_finite()) {
                return Err(bad(format!("DoRA magnitude must be finite, got {v}")));
            }
        }
        Ok(())
    }

    /// Rank `r`.
    pub fn rank(&self) -> usize {
        self.down.shape[0]
    }

    /// Whether this is a conv (4-d) adapter.
    pub fn is_conv(&self) -> bool {
        self.down.shape.len() == 4
    }

    /// Output features / channels.
    pub fn out_features(&self) -> usize {
        self.up.shape[0]
    }

    /// Input features / channels.
    pub fn in_features(&self) -> usize {
        self.down.shape[1]
    }

    /// `alpha / rank`.
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank() as f32
    }

    /// The weight update `ΔW = scale · up · down` in PyTorch layout (`[out, in]` or
    /// `[out, in, kh, kw]`), accumulated in f64 on the host. An OFT's, a GLoRA's, an
    /// (IA)³'s or a full adapter's is zero here (its plain form is empty; check
    /// [`stands_alone`](Self::stands_alone) first).
    pub fn delta(&self) -> HostTensor {
        let r = self.rank();
        let out = self.out_features();
        let cols = self.down.shape[1..].iter().product::<usize>(); // in * kh * kw
        let scale = self.scale() as f64;
        let mut data = vec![0f32; out * cols];
        for o in 0..out {
            for c in 0..cols {
                let mut acc = 0f64;
                for k in 0..r {
                    acc += self.up.data[o * r + k] as f64 * self.down.data[k * cols + c] as f64;
                }
                data[o * cols + c] = (acc * scale) as f32;
            }
        }
        let mut shape = vec![out];
        shape.extend_from_slice(&self.down.shape[1..]);
        HostTensor { shape, data }
    }

    /// The same update with `alpha = rank` (scale 1): the scale is folded into `up`.
    /// This is how adapters are written in the diffusers/PEFT layout, which has no alpha.
    pub fn with_scale_folded(&self) -> Self {
        let s = self.scale();
        let up = HostTensor {
            shape: self.up.shape.clone(),
            data: self.up.data.iter().map(|v| v * s).collect(),
        };
        Self {
            down: self.down.clone(),
            up,
            alpha: self.rank() as f32,
            magnitude: self.magnitude.clone(),
            lycoris: None,
        }
    }
}

/// An adapter's tensor shapes for messages: `down [r, in], up [out, r]`.
fn halves(w: &LoraWeights) -> String {
    format!("down {:?}, up {:?}", w.down.shape, w.up.shape)
}

impl LoraWeights {
    /// One adapter equal to the sum of `parts`, each at its strength: the ranks are
    /// concatenated (`down = [D₁; D₂; …]`, `up = [c₁U₁, c₂U₂, …]` with `cᵢ = strengthᵢ ·
    /// scaleᵢ`) and alpha is the total rank, so `ΔW = Σ strengthᵢ · ΔWᵢ` exactly. This is how
    /// several LoRA files apply to one layer at once.
    ///
    /// A DoRA adapter's update is not linear in its weights (it rescales the whole layer), so
    /// it combines only with itself at strength 1 (returned as it is); otherwise this is an
    /// [`LoraError::Unsupported`] naming `key`. Attach it alone, at its strength as the
    /// layer's multiplier, or bake it into the base weights first.
    pub fn combine(parts: &[(&LoraWeights, f32)], key: &str) -> Result<LoraWeights> {
        let Some((first, _)) = parts.first() else {
            return Err(LoraError::Data(format!("`{key}`: nothing to combine")));
        };
        if let Some((w, _)) = parts.iter().find(|(w, _)| w.stands_alone()) {
            return match parts {
                [(w, s)] if *s == 1.0 => Ok((*w).clone()),
                _ => Err(w.no_plain_form(key, "combined with other adapters or folded in at another strength; apply its file alone")),
            };
        }
        if parts.iter().any(|(w, _)| w.is_dora()) {
            return match parts {
                [(w, s)] if *s == 1.0 => Ok((*w).clone()),
                [(_, s)] => Err(LoraError::Unsupported(format!(
                    "`{key}`: a DoRA adapter cannot be folded into a combination at strength {s} (it rescales the whole layer); apply its file alone, at that strength"
                ))),
                _ => Err(LoraError::Unsupported(format!(
                    "`{key}`: a DoRA adapter cannot be combined with other adapters on the same layer (it rescales the whole layer); merge one of the files into the checkpoint first"
                ))),
            };
        }
        let conv = parts.iter().any(|(w, _)| w.is_conv());
        // Bring 2-d (linear) adapters to 4-d 1x1 form when mixed with conv ones.
        let as4 = |t: &HostTensor| -> HostTensor {
            let mut shape = t.shape.clone();
            if conv && shape.len() == 2 {
                shape.extend([1, 1]);
            }
            HostTensor { shape, data: t.data.clone() }
        };
        let tail: Vec<usize> = as4(&first.down).shape[1..].to_vec();
        let out = first.out_features();
        let total: usize = parts.iter().map(|(w, _)| w.rank()).sum();
        let mut down = Vec::with_capacity(total * tail.iter().product::<usize>());
        let mut up_cols: Vec<Vec<f32>> = vec![Vec::with_capacity(total); out];
        for (w, strength) in parts {
            w.validate(key)?;
            let d = as4(&w.down);
            if d.shape[1..] != tail[..] || w.out_features() != out {
                return Err(LoraError::ShapeMismatch {
                    key: key.into(),
                    // Both halves: adapters with the same `down` can still differ in outputs.
                    reason: format!("cannot combine adapters with {} and {} (made for different models?)", halves(first), halves(w)),
                });
            }
            down.extend_from_slice(&d.data);
            let c = strength * w.scale();
            let r = w.rank();
            for (o, col) in up_cols.iter_mut().enumerate() {
                col.extend(w.up.data[o * r..(o + 1) * r].iter().map(|v| v * c));
            }
        }
        let mut down_shape = vec![total];
        down_shape.extend(&tail);
        let mut up_shape = vec![out, total];
        if down_shape.len() == 4 {
            up_shape.extend([1, 1]);
        }
        LoraWeights::new(
            HostTensor::new(down_shape, down)?,
            HostTensor::new(up_shape, up_cols.concat())?,
            total as f32,
            key,
        )
    }
}
