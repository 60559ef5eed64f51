//! Hyper-parameters of an adapter.

use serde::{Deserialize, Serialize};

use crate::{LoraError, Result};

/// How the `down` projection is initialised. The `up` projection always starts at zero,
/// so a fresh adapter leaves the model's output unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LoraInit {
    /// Kaiming-uniform with `a = sqrt(5)` (bound `1/sqrt(fan_in)`), as kohya sd-scripts
    /// and PEFT do.
    #[default]
    KaimingUniform,
    /// Normal distribution with standard deviation `1/rank` (PEFT's `init_lora_weights="gaussian"`).
    Gaussian,
}

/// The form of the weight update an adapter learns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Algo {
    /// LoRA: `ΔW = scale · up · down` (kohya's `networks.lora`, LyCORIS' `lora` / LoCon).
    #[default]
    Lora,
    /// LyCORIS' LoHa: `ΔW = scale · (w1_a · w1_b) ⊙ (w2_a · w2_b)`, two rank-`r` products
    /// multiplied entry-wise (an update of rank up to `r²` from `4r` vectors).
    Loha,
    /// LyCORIS' LoKr: `ΔW = scale · w1 ⊗ w2`, a Kronecker product of a small matrix `w1` and
    /// a larger `w2` that is low-rank (`w2_a · w2_b`) unless the rank is large for its size.
    Lokr,
    /// kohya's OFT (`networks.oft`, constrained orthogonal fine-tuning): the layer's weight
    /// becomes `Rᵀ · W` with `R` block-diagonal and orthogonal, each block the Cayley
    /// transform `(I + Q)(I − Q)⁻¹` of a skew-symmetric `Q` whose norm is held to a
    /// constraint ([`crate::lycoris`]'s OFT). `rank` is the number of blocks (kohya's
    /// `network_dim`) and `alpha` the constraint per output (kohya's `network_alpha`, e.g.
    /// 1e-3). Its update depends on the base weight, so it has no plain-LoRA form: it is
    /// saved in kohya's layout only and cannot be combined with other adapters.
    Oft,
    /// LyCORIS' Diag-OFT (`algo=diag-oft`): the same rotation as [`Algo::Oft`], but `rank`
    /// sets the block size (LyCORIS' `factorization(out, dim)`: `dim` when it divides the
    /// outputs), `alpha` is LyCORIS' `constraint` per output with 0 for none, and
    /// [`LoraConfig::oft_rescaled`] adds a trained scale per output. Saved as LyCORIS
    /// writes it (`lora_unet_….oft_blocks`, `.rescale`, `.alpha`).
    #[serde(rename = "diag-oft")]
    DiagOft,
    /// LyCORIS' BOFT (`algo=boft`, butterfly orthogonal fine-tuning, Liu et al. 2024): the
    /// rotation is a product of `log2(k) + 1` butterfly stages of `k` Diag-OFT blocks of
    /// `rank` outputs each (LyCORIS' `power2factorization`: an even block size of at most
    /// `rank` and a power-of-two number of blocks), each stage mixing outputs further
    /// apart, so that the product mixes them all. `alpha` and
    /// [`LoraConfig::oft_rescaled`] as for [`Algo::DiagOft`].
    Boft,
    /// LyCORIS' GLoRA (`algo=glora`, generalized LoRA, Chavan et al. 2023): the layer's
    /// weight becomes `W + scale · (W · a1 · a2 + b1 · b2)`, a low-rank map of its inputs
    /// (`a1 [in, r] · a2 [r, in]`, applied to `W` along its input channels) plus a LoRA
    /// (`b1 [out, r] · b2 [r, in·kh·kw]`); `scale = alpha / rank` as for a LoRA. Its update
    /// depends on the base weight, so it has no plain-LoRA form. Saved as LyCORIS writes it
    /// (`lora_unet_….a1.weight`, …, `.alpha`), which ComfyUI and A1111 load.
    Glora,
    /// LyCORIS' (IA)³ (`algo=ia3`, Liu et al. 2022): a trained scale per output channel
    /// (or, with [`LoraConfig::ia3_on_input`], per input channel) of the layer's weight,
    /// `W ⊙ (1 + w)`, `w` starting at zero ([`crate::ia3`]); `rank` and `alpha` are not used.
    /// Its update depends on the base weight, so it has no plain-LoRA form. Saved as LyCORIS
    /// writes it (`lora_unet_….weight`, `.on_input`), which A1111 loads.
    #[serde(rename = "ia3")]
    Ia3,
    /// LyCORIS' full fine-tuning (`algo=full`, the kohya_ss GUI's "LyCORIS/Native Fine-Tuning"):
    /// each layer's whole weight and bias are trained, `W + ΔW`, `b + Δb`, with `ΔW`
    /// (`diff`) and `Δb` (`diff_b`) starting at zero ([`crate::full`]); `rank` and
    /// `alpha` are not used. An update of the layer's full size with its bias's has no
    /// plain-LoRA form ([`Algo::stands_alone`]). Saved as LyCORIS writes it
    /// (`lora_unet_….diff`, `.diff_b`), which ComfyUI and A1111 load.
    Full,
    /// LyCORIS' normalization-layer module (its `NormModule`, trained beside another
    /// algorithm with `train_norm`): a GroupNorm's or LayerNorm's scale and shift trained
    /// as differences, `γ + w_norm`, `β + b_norm`, starting at zero ([`crate::norm`]).
    /// Never a layer's algorithm of its own: norm layers get it when
    /// [`LoraSiteMut::attach_new`](crate::LoraSiteMut::attach_new) attaches an adapter to
    /// them, whatever the configured algorithm. Saved as LyCORIS writes it
    /// (`lora_unet_….w_norm`, `.b_norm`), which ComfyUI loads.
    #[serde(skip)]
    Norm,
}

impl Algo {
    /// The name kohya's `network_args` and LyCORIS use (`algo=loha`).
    pub fn name(self) -> &'static str {
        match self {
            Algo::Lora => "lora",
            Algo::Loha => "loha",
            Algo::Lokr => "lokr",
            Algo::Oft => "oft",
            Algo::DiagOft => "diag-oft",
            Algo::Boft => "boft",
            Algo::Glora => "glora",
            Algo::Ia3 => "ia3",
            Algo::Full => "full",
            Algo::Norm => "norm",
        }
    }

    /// Whether the adapter is not a LoRA: LyCORIS' LoHa, LoKr, Diag-OFT, BOFT, GLoRA, (IA)³ or full, or
    /// kohya's OFT, each held as a [`crate::LycorisAdapter`] with its own tensors.
    pub fn is_lycoris(self) -> bool {
        self != Algo::Lora
    }

    /// Whether this is an orthogonal fine-tuning (kohya's OFT, LyCORIS' Diag-OFT or BOFT),
    /// whose update depends on the base weight.
    pub fn is_oft(self) -> bool {
        matches!(self, Algo::Oft | Algo::DiagOft | Algo::Boft)
    }

    /// Whether this is one of LyCORIS' orthogonal fine-tunings (Diag-OFT, BOFT): a
    /// constraint that may be 0 (none), an optional scale per output, `lora_…` names.
    pub fn is_lycoris_oft(self) -> bool {
        matches!(self, Algo::DiagOft | Algo::Boft)
    }

    /// Whether the update is a function of the layer's base weight (an OFT, a GLoRA, an
    /// (IA)³), so
    /// that it has no plain-LoRA form: such an adapter is merged into its own layer, never
    /// combined with others, resized or written in the diffusers / PEFT layout.
    ///
    /// ```
    /// use lora_core::Algo;
    /// assert!(Algo::Glora.depends_on_base() && Algo::Oft.depends_on_base());
    /// assert!(!Algo::Loha.depends_on_base());
    /// ```
    pub fn depends_on_base(self) -> bool {
        self.is_oft() || matches!(self, Algo::Glora | Algo::Ia3)
    }

    /// Whether the adapter has no plain-LoRA form: its update depends on the base weight
    /// ([`depends_on_base`](Self::depends_on_base)), or it is a full-size difference with
    /// the bias's ([`Algo::Full`], which a LoRA cannot hold), or a norm layer's
    /// ([`Algo::Norm`]). Such an adapter is merged into
    /// its own layer, never combined with other files' adapters on that layer, resized or
    /// written in the diffusers / PEFT layout (a full difference resizes into a LoRA without
    /// its bias's, [`crate::resize`]).
    ///
    /// ```
    /// use lora_core::Algo;
    /// assert!(Algo::Full.stands_alone() && !Algo::Full.depends_on_base());
    /// assert!(Algo::Ia3.stands_alone() && !Algo::Lokr.stands_alone());
    /// ```
    pub fn stands_alone(self) -> bool {
        self.depends_on_base() || matches!(self, Algo::Full | Algo::Norm)
    }
}

impl std::str::FromStr for Algo {
    type Err = String;

    /// `lora`, `loha`, `lokr`, `oft`, `diag-oft`, `boft`, `glora`, `ia3` or `full`
    /// (LyCORIS' `locon` reads as `lora`).
    ///
    /// ```
    /// use lora_core::Algo;
    /// assert_eq!("loha".parse::<Algo>(), Ok(Algo::Loha));
    /// assert_eq!("ia3".parse::<Algo>(), Ok(Algo::Ia3));
    /// assert_eq!("full".parse::<Algo>(), Ok(Algo::Full));
    /// assert!("dylora".parse::<Algo>().is_err());
    /// ```
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "lora" | "locon" => Ok(Algo::Lora),
            "loha" => Ok(Algo::Loha),
            "lokr" => Ok(Algo::Lokr),
            "oft" => Ok(Algo::Oft),
            "diag-oft" => Ok(Algo::DiagOft),
            "boft" => Ok(Algo::Boft),
            "glora" => Ok(Algo::Glora),
            "ia3" => Ok(Algo::Ia3),
            "full" => Ok(Algo::Full),
            "norm" => Err("`norm` (LyCORIS' normalization-layer modules) is not an algorithm of its own: norm layers train beside another algorithm with train_norm".into()),
            other => Err(format!("unknown adapter algorithm `{other}`; expected lora, loha, lokr, oft, diag-oft, boft, glora, ia3 or full")),
        }
    }
}

/// Hyper-parameters of a LoRA adapter.
///
/// ```
/// use lora_core::LoraConfig;
/// let cfg = LoraConfig::new(8).with_alpha(4.0);
/// assert_eq!(cfg.scale(), 0.5);
/// let rs = cfg.clone().with_rslora(true);
/// assert!((rs.scale() - 4.0 / 8f32.sqrt()).abs() < 1e-6);
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    /// Rank `r` of the update (`network_dim` in kohya).
    pub rank: usize,
    /// Scaling numerator (`network_alpha` in kohya, `lora_alpha` in PEFT).
    pub alpha: f32,
    /// Dropout probability applied to the adapter's input while training.
    #[serde(default)]
    pub dropout: f64,
    /// kohya's `network_dropout` while training: dropout on `down(x)`, each of its elements
    /// dropped with this probability and the rest scaled by `1 / (1 − p)` (kohya's "neuron
    /// dropout"; `dropout` acts on the input instead).
    #[serde(default)]
    pub network_dropout: f64,
    /// kohya's rank dropout while training: each sample drops each of the `rank` components
    /// of `down(x)` with this probability, the rest scaled by `1 / (1 − p)`. With LoHa and
    /// LoKr (and a LoRA with [`lycoris_rank_dropout`](Self::lycoris_rank_dropout)) it is
    /// LyCORIS' rank dropout: each step drops each output's row of `ΔW` with
    /// this probability (scaled by [`rank_dropout_scale`](Self::rank_dropout_scale)); full
    /// fine-tuning's drops the bias's values with their rows. With Diag-OFT it drops entries
    /// of the scaled rotation, kept ones times `1 / (1 − p)`, as LyCORIS' `nn.Dropout`
    /// ([`crate::oft::update_dropped`]); kohya's OFT, BOFT, GLoRA and (IA)³ take none.
    #[serde(default)]
    pub rank_dropout: f64,
    /// LyCORIS' `rank_dropout_scale` (LoHa and LoKr, and a LoRA with
    /// [`lycoris_rank_dropout`](Self::lycoris_rank_dropout)): the rows of `ΔW` that rank
    /// dropout keeps are divided by the share kept, so the update keeps its size on average.
    #[serde(default)]
    pub rank_dropout_scale: bool,
    /// A LoRA's (LoCon's) rank dropout as LyCORIS' LoCon applies it: each pass drops each
    /// output's row of `ΔW` with [`rank_dropout`](Self::rank_dropout) (the same rows for
    /// every sample; scaled by [`rank_dropout_scale`](Self::rank_dropout_scale)), instead of
    /// kohya's per-sample rank components rescaled by `1 / (1 − p)`. LoHa and LoKr always
    /// drop rows. Not with DoRA.
    #[serde(default)]
    pub lycoris_rank_dropout: bool,
    /// LyCORIS' `use_scalar` (LoHa, LoKr and GLoRA): the update is multiplied by a trained
    /// scalar that starts at 0, and the half that otherwise starts at zero starts random
    /// instead (LoHa's `hada_w2_a` from N(0, 0.1²), LoKr's `lokr_w2` / `lokr_w2_b` and
    /// GLoRA's `a2` and `b2` Kaiming-uniform). Files hold the scalar folded into the first
    /// factor (GLoRA's: into `a2` and `b2`).
    #[serde(default)]
    pub use_scalar: bool,
    /// kohya's module dropout while training: each pass skips the whole adapter with this
    /// probability.
    #[serde(default)]
    pub module_dropout: f64,
    /// rsLoRA: scale by `alpha / sqrt(rank)` instead of `alpha / rank`.
    #[serde(default)]
    pub rslora: bool,
    /// Initialisation of the down projection.
    #[serde(default)]
    pub init: LoraInit,
    /// Seed of this adapter's initial weights, drawn on the host and uploaded, so that they
    /// are the same on every backend and whatever other adapters exist (see
    /// [`adapter_seed`](crate::adapter_seed), which derives one per module path); `None`:
    /// burn's backend RNG (`B::seed`), whose draws differ between backends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_seed: Option<u64>,
    /// DoRA (weight-decomposed LoRA, Liu et al. 2024; PEFT's `use_dora`, LyCORIS'
    /// `dora_wd`): the adapter also learns a magnitude per output feature, `m`, and the
    /// layer's weight becomes `m · (W + ΔW) / ‖W + ΔW‖` (the norm of each output's row).
    /// `m` starts at `‖W‖`, so a fresh adapter still leaves the output unchanged. It needs
    /// the base weight: it takes effect through [`crate::LoraLinear::attach_new`] and
    /// [`crate::LoraConv2d::attach_new`]. With LoHa and LoKr it is LyCORIS'
    /// `weight_decompose` (see [`crate::LycorisAdapter::update`]).
    #[serde(default)]
    pub dora: bool,
    /// The form of the update: LoRA (the default), or LyCORIS' LoHa or LoKr, trained as
    /// LyCORIS trains them (see [`crate::lycoris`]). LoHa and LoKr take `rank`, `alpha`,
    /// `rslora` and `module_dropout`; the other dropouts, `init` and `dora` are LoRA's.
    #[serde(default)]
    pub algo: Algo,
    /// LoKr's factor (LyCORIS' `factor`): each side of the weight is split as `m · n` with
    /// `m` the divisor closest to this (−1: closest to the square root), `w1` taking the `m`s.
    #[serde(default = "default_lokr_factor")]
    pub lokr_factor: i64,
    /// LoKr: make `w1` low-rank too when the rank is small for it (LyCORIS'
    /// `decompose_both`).
    #[serde(default)]
    pub lokr_decompose_both: bool,
    /// LoKr: both halves full matrices whatever the rank (LyCORIS' `full_matrix`); the
    /// scale is then 1, as with any LoKr whose halves are both full.
    #[serde(default)]
    pub lokr_full_matrix: bool,
    /// LoKr: `w1` takes the output side's larger factor and `w2` its smaller one
    /// (LyCORIS' `unbalanced_factorization`).
    #[serde(default)]
    pub lokr_unbalanced_factorization: bool,
    /// Tucker-decompose the adapters of convolutions with a kernel larger than 1x1
    /// (LyCORIS' `use_tucker`). LoHa and LoKr: a half is `t [r, r, kh, kw]` with
    /// `a [r, out]` and `b [r, in]` instead of `[out, r]` and `[r, in·kh·kw]` (LoKr: its
    /// low-rank `w2`). LoRA (LyCORIS' LoCon): `down` becomes a 1x1 convolution
    /// `[r, in, 1, 1]` followed by a core `mid [r, r, kh, kw]` with the layer's stride,
    /// padding and dilation (`lora_mid` in files). Linear layers and 1x1 convolutions are
    /// not changed.
    #[serde(default)]
    pub use_tucker: bool,
    /// LoRA-FA (Zhang et al. 2023; kohya's `networks.lora_fa`): `down` starts from
    /// N(0, 2 / (in + rank)) (`in` a convolution's input channels, as kohya counts them,
    /// whatever `init` says) and stays frozen: it gets no gradient and no optimizer update,
    /// only `up` trains. Autodiff then keeps no copy of a linear adapter's input for
    /// `down`'s gradient, the method's activation-memory saving (burn's convolutions keep
    /// theirs). For LoRA (and LoCon) only: not with
    /// LoHa / LoKr, DoRA or a Tucker LoCon. Adapters read from files are frozen with
    /// [`crate::LoraSiteMut::freeze_down`].
    #[serde(default)]
    pub lora_fa: bool,
    /// DyLoRA (Valipour et al. 2023, as kohya's `networks.dylora` trains it) with chunks of
    /// this many ranks (kohya's `unit`): each training pass trains one chunk of `down` and
    /// `up`, drawn at random, and leaves the others as they are (see [`crate::dylora`]), so
    /// that the first `k·unit` ranks of the saved LoRA make a usable LoRA of their own for
    /// every `k`. `None`: plain LoRA. LoRA (and LoCon) only, with a `rank` that is a
    /// multiple of the unit; not with LoHa / LoKr, DoRA, LoRA-FA, a Tucker LoCon or
    /// dropouts (kohya's DyLoRA has none of these).
    #[serde(default)]
    pub dylora_unit: Option<usize>,
    /// LyCORIS' `rescaled` (Diag-OFT and BOFT): a trained scale per output, starting at 1,
    /// multiplies the rotated weight (`rescale` in files).
    #[serde(default)]
    pub oft_rescaled: bool,
    /// LyCORIS' `train_on_input` for (IA)³ ([`Algo::Ia3`]): the trained scale is per input
    /// channel (LyCORIS' `ia3` preset sets it on the feed-forward outputs, `ff.net.2` and
    /// `mlp.fc2`, scaling the activations they take) instead of per output.
    #[serde(default)]
    pub ia3_on_input: bool,
}

fn default_lokr_factor() -> i64 {
    -1
}

impl LoraConfig {
    /// A config with the given rank, `alpha = rank` (scale 1), no dropout, classic scaling.
    pub fn new(rank: usize) -> Self {
        Self {
            rank,
            alpha: rank as f32,
            dropout: 0.0,
            network_dropout: 0.0,
            rank_dropout: 0.0,
            module_dropout: 0.0,
            rslora: false,
            init: LoraInit::default(),
            init_seed: None,
            dora: false,
            algo: Algo::Lora,
            lokr_factor: -1,
            lokr_decompose_both: false,
            lokr_full_matrix: false,
            lokr_unbalanced_factorization: false,
            use_tucker: false,
            rank_dropout_scale: false,
            use_scalar: false,
            lora_fa: false,
            lycoris_rank_dropout: false,
            dylora_unit: None,
            oft_rescaled: false,
            ia3_on_input: false,
        }
    }

    /// Sets [`ia3_on_input`](Self::ia3_on_input) ((IA)³ per input channel).
    ///
    /// ```
    /// use lora_core::{Algo, LoraConfig};
    /// assert!(LoraConfig::new(1).with_algo(Algo::Ia3).with_ia3_on_input(true).validate().is_ok());
    /// assert!(LoraConfig::new(4).with_ia3_on_input(true).validate().is_err());
    /// ```
    pub fn with_ia3_on_input(mut self, on_input: bool) -> Self {
        self.ia3_on_input = on_input;
        self
    }

    /// Sets [`oft_rescaled`](Self::oft_rescaled) (LyCORIS' Diag-OFT and BOFT `rescaled`).
    ///
    /// ```
    /// use lora_core::{Algo, LoraConfig};
    /// assert!(LoraConfig::new(4).with_algo(Algo::DiagOft).with_oft_rescaled(true).validate().is_ok());
    /// assert!(LoraConfig::new(4).with_oft_rescaled(true).validate().is_err());
    /// ```
    pub fn with_oft_rescaled(mut self, rescaled: bool) -> Self {
        self.oft_rescaled = rescaled;
        self
    }

    /// Sets DyLoRA's unit (see [`LoraConfig::dylora_unit`]).
    ///
    /// ```
    /// use lora_core::LoraConfig;
    /// assert!(LoraConfig::new(8).with_dylora_unit(Some(2)).validate().is_ok());
    /// assert!(LoraConfig::new(8).with_dylora_unit(Some(3)).validate().is_err()); // 8 % 3 != 0
    /// assert!(LoraConfig::new(8).with_dylora_unit(Some(2)).with_dora(true).validate().is_err());
    /// ```
    pub fn with_dylora_unit(mut self, unit: Option<usize>) -> Self {
        self.dylora_unit = unit;
        self
    }

    /// Sets LyCORIS' rank dropout for a LoRA (see [`LoraConfig::lycoris_rank_dropout`]).
    pub fn with_lycoris_rank_dropout(mut self, lycoris: bool) -> Self {
        self.lycoris_rank_dropout = lycoris;
        self
    }

    /// Sets LoRA-FA (see [`LoraConfig::lora_fa`]).
    ///
    /// ```
    /// use lora_core::{Algo, LoraConfig};
    /// assert!(LoraConfig::new(4).with_lora_fa(true).validate().is_ok());
    /// assert!(LoraConfig::new(4).with_lora_fa(true).with_dora(true).validate().is_err());
    /// assert!(LoraConfig::new(4).with_lora_fa(true).with_algo(Algo::Loha).validate().is_err());
    /// ```
    pub fn with_lora_fa(mut self, fa: bool) -> Self {
        self.lora_fa = fa;
        self
    }

    /// Sets the form of the update (see [`LoraConfig::algo`]).
    pub fn with_algo(mut self, algo: Algo) -> Self {
        self.algo = algo;
        self
    }

    /// Sets LoKr's factor (see [`LoraConfig::lokr_factor`]).
    pub fn with_lokr_factor(mut self, factor: i64) -> Self {
        self.lokr_factor = factor;
        self
    }

    /// Sets LoKr's `decompose_both` (see [`LoraConfig::lokr_decompose_both`]).
    pub fn with_lokr_decompose_both(mut self, both: bool) -> Self {
        self.lokr_decompose_both = both;
        self
    }

    /// Sets LoKr's `full_matrix` (see [`LoraConfig::lokr_full_matrix`]).
    pub fn with_lokr_full_matrix(mut self, full: bool) -> Self {
        self.lokr_full_matrix = full;
        self
    }

    /// Sets LoKr's `unbalanced_factorization` (see
    /// [`LoraConfig::lokr_unbalanced_factorization`]).
    pub fn with_lokr_unbalanced_factorization(mut self, unbalanced: bool) -> Self {
        self.lokr_unbalanced_factorization = unbalanced;
        self
    }

    /// Sets LyCORIS' `use_tucker` (see [`LoraConfig::use_tucker`]).
    pub fn with_use_tucker(mut self, tucker: bool) -> Self {
        self.use_tucker = tucker;
        self
    }

    /// Sets the rank (alpha is unchanged).
    pub fn with_rank(mut self, rank: usize) -> Self {
        self.rank = rank;
        self
    }

    /// Sets alpha.
    pub fn with_alpha(mut self, alpha: f32) -> Self {
        self.alpha = alpha;
        self
    }

    /// Sets the dropout probability.
    pub fn with_dropout(mut self, dropout: f64) -> Self {
        self.dropout = dropout;
        self
    }

    /// Sets kohya's network dropout probability (see [`LoraConfig::network_dropout`]).
    pub fn with_network_dropout(mut self, p: f64) -> Self {
        self.network_dropout = p;
        self
    }

    /// Sets kohya's rank dropout probability (see [`LoraConfig::rank_dropout`]).
    pub fn with_rank_dropout(mut self, p: f64) -> Self {
        self.rank_dropout = p;
        self
    }

    /// Sets LyCORIS' `use_scalar` (see [`LoraConfig::use_scalar`]).
    pub fn with_use_scalar(mut self, scalar: bool) -> Self {
        self.use_scalar = scalar;
        self
    }

    /// Sets LyCORIS' `rank_dropout_scale` (see [`LoraConfig::rank_dropout_scale`]).
    pub fn with_rank_dropout_scale(mut self, scale: bool) -> Self {
        self.rank_dropout_scale = scale;
        self
    }

    /// Sets kohya's module dropout probability (see [`LoraConfig::module_dropout`]).
    pub fn with_module_dropout(mut self, p: f64) -> Self {
        self.module_dropout = p;
        self
    }

    /// Turns rsLoRA scaling on or off.
    pub fn with_rslora(mut self, rslora: bool) -> Self {
        self.rslora = rslora;
        self
    }

    /// Turns DoRA on or off (see [`LoraConfig::dora`]).
    pub fn with_dora(mut self, dora: bool) -> Self {
        self.dora = dora;
        self
    }

    /// Sets the down-projection initialisation.
    pub fn with_init(mut self, init: LoraInit) -> Self {
        self.init = init;
        self
    }

    /// Sets [`init_seed`](Self::init_seed): the initial weights from a host stream with
    /// this seed (the same on every backend), or burn's backend RNG with `None`.
    ///
    /// ```
    /// use burn::backend::Flex;
    /// use burn::nn::LinearConfig;
    /// use lora_core::{adapter_seed, LoraConfig, LoraLinear};
    /// let device = Default::default();
    /// let config = LoraConfig::new(4).with_init_seed(Some(adapter_seed(42, "mid_block.attn1.to_q")));
    /// let down = || {
    ///     let mut layer = LoraLinear::new(LinearConfig::new(16, 8).init::<Flex>(&device));
    ///     layer.attach_new(&config, &device).unwrap();
    ///     layer.adapter.unwrap().down.weight.val().into_data()
    /// };
    /// assert_eq!(down(), down());
    /// ```
    pub fn with_init_seed(mut self, seed: Option<u64>) -> Self {
        self.init_seed = seed;
        self
    }

    /// The factor applied to `up(down(x))`: `alpha / rank`, or `alpha / sqrt(rank)` with rsLoRA.
    pub fn scale(&self) -> f32 {
        let r = self.rank.max(1) as f32;
        if self.rslora {
            self.alpha / r.sqrt()
        } else {
            self.alpha / r
        }
    }

    /// Checks the rank against one layer's update `[out, in]` (`in` counting a kernel's
    /// taps), for the algorithms whose factors are `rank` wide (LoRA, LoCon, LoHa, GLoRA):
    /// past both sides every factor is already of full rank, so the extra width only costs
    /// memory, and a rank like 80000 (8 mistyped) is refused before it is allocated.
    pub(crate) fn check_rank_for(&self, out: usize, input: usize) -> Result<()> {
        if self.rank > out.max(input) {
            return Err(LoraError::InvalidConfig(format!(
                "rank {} is larger than both sides of the layer's update ({out} x {input}), where {} already gives factors of full rank",
                self.rank,
                out.max(input)
            )));
        }
        Ok(())
    }

    /// Checks that the values are usable. A rank above the layer's `min(in, out)` is
    /// allowed, as kohya, PEFT and LyCORIS allow it (a LoRA's update then has the rank
    /// `min(in, out)` at most; LoHa's and LoKr's are not bounded by theirs); attaching
    /// refuses one above `max(in, out)`, where the factors are already of full rank
    /// (LoKr and the OFTs read the rank otherwise).
    pub fn validate(&self) -> Result<()> {
        if self.rank == 0 {
            return Err(LoraError::InvalidConfig("rank must be at least 1".into()));
        }
        if !self.alpha.is_finite() {
            return Err(LoraError::InvalidConfig(format!(
                "alpha must be finite, got {}",
                self.alpha
            )));
        }
        for (name, p) in [("dropout", self.dropout), ("network_dropout", self.network_dropout), ("rank_dropout", self.rank_dropout), ("module_dropout", self.module_dropout)] {
            if !(0.0..1.0).contains(&p) {
                return Err(LoraError::InvalidConfig(format!("{name} must be in [0, 1), got {p}")));
            }
        }
        if self.algo.is_lycoris() {
            let algo = self.algo.name();
            for (name, p) in [("dropout", self.dropout), ("network_dropout", self.network_dropout)] {
                if p > 0.0 {
                    return Err(LoraError::InvalidConfig(format!("{name} is not supported with {algo} (module_dropout and LyCORIS' rank_dropout are)")));
                }
            }
            if self.algo.is_oft() {
                self.validate_oft()?;
            }
            if self.algo == Algo::Glora {
                self.validate_glora()?;
            }
            if self.algo == Algo::Ia3 {
                self.validate_ia3()?;
            }
            if self.algo == Algo::Full {
                self.validate_full()?;
            }
            if self.lokr_factor == 0 || self.lokr_factor < -1 {
                return Err(LoraError::InvalidConfig(format!("lokr_factor must be -1 or at least 1, got {}", self.lokr_factor)));
            }
        }
        if self.ia3_on_input && self.algo != Algo::Ia3 {
            return Err(LoraError::InvalidConfig(format!("ia3_on_input (LyCORIS' train_on_input) is (IA)³'s, not {}'s", self.algo.name())));
        }
        if self.oft_rescaled && !self.algo.is_lycoris_oft() {
            return Err(LoraError::InvalidConfig(format!("oft_rescaled (LyCORIS' rescaled) is Diag-OFT's and BOFT's, not {}'s", self.algo.name())));
        }
        if self.lycoris_rank_dropout && self.dora && !self.algo.is_lycoris() {
            return Err(LoraError::InvalidConfig("lycoris_rank_dropout (rows of a LoCon's update) does not combine with dora".into()));
        }
        if self.lora_fa {
            // kohya's networks.lora_fa has none of these; each trains a down of its own.
            for (on, what) in [(self.algo.is_lycoris(), format!("algo {}", self.algo.name())), (self.dora, "dora".into()), (self.use_tucker, "use_tucker".into())] {
                if on {
                    return Err(LoraError::InvalidConfig(format!("lora_fa (a frozen down) does not combine with {what}")));
                }
            }
        }
        if let Some(unit) = self.dylora_unit {
            if unit == 0 || !self.rank.is_multiple_of(unit) {
                return Err(LoraError::InvalidConfig(format!(
                    "dylora_unit must divide the rank (rank {}, unit {unit})",
                    self.rank
                )));
            }
            let dropped = [
                ("dropout", self.dropout),
                ("network_dropout", self.network_dropout),
                ("rank_dropout", self.rank_dropout),
                ("module_dropout", self.module_dropout),
            ];
            let others = [
                (self.algo.is_lycoris(), format!("algo {}", self.algo.name())),
                (self.dora, "dora".into()),
                (self.lora_fa, "lora_fa".into()),
                (self.use_tucker, "use_tucker".into()),
            ];
            let clash = others
                .into_iter()
                .chain(dropped.iter().map(|(n, p)| (*p > 0.0, n.to_string())))
                .find(|(on, _)| *on);
            if let Some((_, what)) = clash {
                return Err(LoraError::InvalidConfig(format!(
                    "DyLoRA (dylora_unit) does not combine with {what}"
                )));
            }
        }
        Ok(())
    }

    /// What an OFT takes: a constraint (`alpha`) that is positive (kohya's) or not negative
    /// (LyCORIS' Diag-OFT, 0 for none), and none of the other adapters' options (no DoRA or
    /// scalar; rank dropout for Diag-OFT alone, which LyCORIS' BOFT takes and ignores, and
    /// never `rank_dropout_scale`: Diag-OFT's `nn.Dropout` always rescales).
    fn validate_oft(&self) -> Result<()> {
        if self.algo == Algo::Oft && self.alpha <= 0.0 {
            return Err(LoraError::InvalidConfig(format!("OFT's alpha (its constraint, e.g. 1e-3) must be positive, got {}", self.alpha)));
        }
        if self.alpha < 0.0 {
            return Err(LoraError::InvalidConfig(format!("{}'s alpha (its constraint per output, 0 for none) must not be negative, got {}", self.algo.name(), self.alpha)));
        }
        let others = [
            (self.rank_dropout > 0.0 && self.algo != Algo::DiagOft, "rank_dropout"),
            (self.rank_dropout_scale, "rank_dropout_scale"),
            // LyCORIS' Diag-OFT and BOFT skip a module in a pass as its other modules do.
            (self.module_dropout > 0.0 && self.algo == Algo::Oft, "module_dropout"),
            (self.dora, "dora"),
            (self.use_scalar, "use_scalar"),
            (self.rslora, "rslora"),
            (self.use_tucker, "use_tucker"),
        ];
        match others.iter().find(|(on, _)| *on) {
            Some((_, what)) => Err(LoraError::InvalidConfig(format!("{what} is not supported with algo {}", self.algo.name()))),
            None => Ok(()),
        }
    }

    /// What LyCORIS' GLoRA takes beyond a LoRA's rank, alpha, rsLoRA, module dropout and
    /// scalar: its default (non-bypass) pass applies no rank dropout, it has no DoRA, and
    /// LyCORIS never Tucker-decomposes it.
    fn validate_glora(&self) -> Result<()> {
        let others = [(self.rank_dropout > 0.0, "rank_dropout"), (self.dora, "dora"), (self.use_tucker, "use_tucker")];
        match others.iter().find(|(on, _)| *on) {
            Some((_, what)) => Err(LoraError::InvalidConfig(format!("{what} is not supported with algo glora (LyCORIS' GLoRA applies none)"))),
            None => Ok(()),
        }
    }

    /// What LyCORIS' (IA)³ takes: module dropout alone (its module applies no rank
    /// dropout, DoRA, Tucker form, scalar or rsLoRA scale; it has no rank or alpha).
    fn validate_ia3(&self) -> Result<()> {
        let others = [(self.rank_dropout > 0.0, "rank_dropout"), (self.dora, "dora"), (self.use_tucker, "use_tucker"), (self.use_scalar, "use_scalar"), (self.rslora, "rslora")];
        match others.iter().find(|(on, _)| *on) {
            Some((_, what)) => Err(LoraError::InvalidConfig(format!("{what} is not supported with algo ia3 (LyCORIS' (IA)³ applies none)"))),
            None => Ok(()),
        }
    }

    /// What LyCORIS' full fine-tuning takes: module and rank dropout (whole outputs).
    fn validate_full(&self) -> Result<()> {
        let others = [(self.dora, "dora"), (self.use_tucker, "use_tucker"), (self.use_scalar, "use_scalar"), (self.rslora, "rslora")];
        match others.iter().find(|(on, _)| *on) {
            Some((_, what)) => Err(LoraError::InvalidConfig(format!("{what} is not supported with algo full (LyCORIS' full fine-tuning applies none)"))),
            None => Ok(()),
        }
    }

    /// The alpha that gives the same scale under classic (kohya) scaling, `scale * rank`.
    /// Used when writing files, whose readers all assume `alpha / rank`.
    pub fn kohya_alpha(&self) -> f32 {
        self.scale() * self.rank as f32
    }
}
