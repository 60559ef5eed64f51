//! Correctness of one backend against another: the check behind `trainer device-check`.
//!
//! [`run`] builds a random-weight UNet with rank-4 LoRA adapters on the attention projections
//! once, on the reference backend (the CPU), gives every adapter a non-zero `up` weight (so the
//! `down` weights get gradients too), and copies all parameters bit for bit into the same
//! model on the backend under test (CUDA, or the CPU again on a CPU-only build). Both run one
//! forward pass on identical inputs and one backward pass of a mean-squared-error loss; the
//! report compares the UNet output and the gradients of one adapter's `up` and `down`
//! weights by relative error ([`ErrorStats`]) and passes when every error is under the
//! tolerance of the precision ([`Precision::tolerance`]).
//!
//! ```
//! use burn::backend::{Autodiff, Flex};
//! use sd_model::UnetConfig;
//! use trainer::device_check::{run, DeviceCheckOptions};
//!
//! let mut opts = DeviceCheckOptions::new(UnetConfig::tiny(), 1, 32);
//! opts.grad_checkpointing = true;
//! let report = run::<Autodiff<Flex>, Autodiff<Flex>>(&opts, &Default::default(), &Default::default())?;
//! assert!(report.pass, "{report:?}");
//! # Ok::<(), trainer::TrainError>(())
//! ```

use std::fmt;
use std::str::FromStr;
use std::time::Instant;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{Distribution, FloatDType, Tensor, TensorData};
use lora_core::sites::LoraSites;
use lora_core::{LoraConfig, LoraSiteMut};
use sd_model::checkpoint::CheckpointOptions;
use sd_model::targets::{attach_new_adapters, Selection, UnetTargets};
use sd_model::{UNet2DConditionModel, UnetConfig};
use serde::Serialize;

use crate::TrainError;

/// Parameter precision of the model under test (the reference always runs f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// 32-bit floats (CUDA matmuls may run as TF32).
    #[default]
    F32,
    /// bfloat16 frozen weights.
    Bf16,
    /// IEEE half frozen weights.
    F16,
}

impl Precision {
    /// The name used on the command line and in JSON (`f32`, `bf16`, `f16`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        }
    }

    /// burn's float dtype of this precision.
    pub fn dtype(self) -> FloatDType {
        match self {
            Self::F32 => FloatDType::F32,
            Self::Bf16 => FloatDType::BF16,
            Self::F16 => FloatDType::F16,
        }
    }

    /// The default pass threshold on both relative errors of [`ErrorStats`] (the reference
    /// is always f32).
    ///
    /// f32: `2e-3` — plain f32 lands near 1e-6, but CUDA may run f32 matmuls as TF32 (10-bit
    /// mantissa, about 3e-4 per product), and the error grows through the UNet's depth and
    /// the backward pass. f16: `3e-2` and bf16: `1e-1`, about twice what the CPU backend's
    /// own half-precision path gives against f32 on the tiny UNet (up to 1e-2 for f16 and
    /// 6e-2 for bf16, worst on the adapter gradients), since another backend rounds at other
    /// places.
    pub fn tolerance(self) -> f64 {
        match self {
            Self::F32 => 2e-3,
            Self::Bf16 => 1e-1,
            Self::F16 => 3e-2,
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            "f16" => Ok(Self::F16),
            other => Err(format!("unknown precision `{other}`; expected f32, bf16 or f16")),
        }
    }
}

/// The UNet config behind a `--unet-config` value: `sd15`, `sd21`, `sdxl`, `tiny`,
/// `tiny-sdxl` or the path of a diffusers `unet/config.json`.
pub fn unet_config_by_name(name: &str) -> Result<UnetConfig, TrainError> {
    Ok(match name {
        "sd15" => UnetConfig::sd15(),
        "sd21" => UnetConfig::sd21(),
        "sdxl" => UnetConfig::sdxl(),
        "tiny" => UnetConfig::tiny(),
        "tiny-sdxl" => UnetConfig::tiny_sdxl(),
        path => sd_model::config::read_unet_config(std::path::Path::new(path))?,
    })
}

/// The pooled text embedding's width of an SDXL-style UNet (six time ids, as SDXL base
/// takes), `None` for a UNet without added conditioning.
pub fn pooled_width(unet: &UnetConfig) -> Result<Option<usize>, TrainError> {
    match (unet.has_text_time(), unet.addition_time_embed_dim, unet.projection_class_embeddings_input_dim) {
        (true, Some(dim), Some(input)) => input.checked_sub(6 * dim).filter(|w| *w > 0).map(Some).ok_or_else(|| TrainError::Config {
            origin: "unet config".into(),
            reason: format!("projection_class_embeddings_input_dim {input} leaves no room for a pooled embedding beside 6 time ids of {dim}"),
        }),
        _ => Ok(None),
    }
}

/// What to compare.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceCheckOptions {
    /// The UNet config.
    pub unet: UnetConfig,
    /// Images in the batch.
    pub batch: usize,
    /// Image side in pixels (latents are 1/8 of it).
    pub resolution: usize,
    /// Parameter precision of the model under test.
    pub precision: Precision,
    /// Pass threshold; `None` uses [`Precision::tolerance`].
    pub tolerance: Option<f64>,
    /// Module path of the adapter whose gradients are compared; `None` takes the first
    /// adapter of the UNet (the one furthest from the loss, so the backward pass through the
    /// whole network is in its gradient).
    pub adapter: Option<String>,
    /// Seed of the weights and inputs.
    pub seed: u64,
    /// Run the model under test with block-wise gradient checkpointing
    /// ([`UNet2DConditionModel::forward_backward_checkpointed`]); the reference never does.
    pub grad_checkpointing: bool,
}

impl DeviceCheckOptions {
    /// f32, default tolerance, first adapter, seed 0, no checkpointing.
    pub fn new(unet: UnetConfig, batch: usize, resolution: usize) -> Self {
        Self {
            unet,
            batch,
            resolution,
            precision: Precision::F32,
            tolerance: None,
            adapter: None,
            seed: 0,
            grad_checkpointing: false,
        }
    }

    /// The pass threshold in use.
    pub fn tolerance(&self) -> f64 {
        self.tolerance.unwrap_or_else(|| self.precision.tolerance())
    }
}

/// How far a tensor is from its reference.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ErrorStats {
    /// Number of elements compared.
    pub len: usize,
    /// `max |test - ref|`.
    pub max_abs_diff: f64,
    /// `max |ref|`.
    pub max_abs_ref: f64,
    /// `max |test - ref| / max |ref|`.
    pub max_rel: f64,
    /// `‖test - ref‖₂ / ‖ref‖₂`.
    pub rel_l2: f64,
    /// Whether every element of both tensors is finite.
    pub finite: bool,
}

impl ErrorStats {
    /// Whether both relative errors are at most `tolerance` and everything is finite.
    pub fn within(&self, tolerance: f64) -> bool {
        self.finite && self.max_rel <= tolerance && self.rel_l2 <= tolerance
    }
}

/// Compares `test` with `reference` element by element (sums in f64).
///
/// Tensors of different lengths, or an all-zero reference with a non-zero test, compare as
/// infinitely far apart; two all-zero tensors as equal.
pub fn compare(reference: &[f32], test: &[f32]) -> ErrorStats {
    let finite = reference.iter().chain(test).all(|v| v.is_finite());
    if reference.len() != test.len() {
        return ErrorStats {
            len: reference.len().min(test.len()),
            max_abs_diff: f64::INFINITY,
            max_abs_ref: f64::NAN,
            max_rel: f64::INFINITY,
            rel_l2: f64::INFINITY,
            finite,
        };
    }
    let (mut max_diff, mut max_ref, mut diff2, mut ref2) = (0f64, 0f64, 0f64, 0f64);
    for (&r, &t) in reference.iter().zip(test) {
        let (r, t) = (f64::from(r), f64::from(t));
        let d = (t - r).abs();
        // NaN-propagating maxima: a NaN anywhere must not be hidden by `f64::max`.
        max_diff = if d.is_nan() || d > max_diff { d } else { max_diff };
        max_ref = if r.is_nan() || r.abs() > max_ref { r.abs() } else { max_ref };
        diff2 += d * d;
        ref2 += r * r;
    }
    let ratio = |num: f64, den: f64| {
        if num == 0.0 {
            0.0
        } else if den == 0.0 {
            f64::INFINITY
        } else {
            num / den
        }
    };
    ErrorStats {
        len: reference.len(),
        max_abs_diff: max_diff,
        max_abs_ref: max_ref,
        max_rel: ratio(max_diff, max_ref),
        rel_l2: ratio(diff2.sqrt(), ref2.sqrt()),
        finite,
    }
}

/// The result, printed as one JSON line by `trainer device-check`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceCheckReport {
    /// Always `"device-check"` (tells this line apart from bench lines).
    pub check: String,
    /// The reference backend.
    pub reference: String,
    /// The backend under test.
    pub device: String,
    /// Parameter precision of the model under test.
    pub precision: Precision,
    /// Images in the batch.
    pub batch: usize,
    /// Image side in pixels.
    pub resolution: usize,
    /// The pass threshold on both relative errors.
    pub tolerance: f64,
    /// Module path of the adapter whose gradients are compared.
    pub adapter: String,
    /// Whether the backend under test ran with block-wise gradient checkpointing.
    pub grad_checkpointing: bool,
    /// The UNet output.
    pub output: ErrorStats,
    /// The gradient of that adapter's `up` weight.
    pub grad_up: ErrorStats,
    /// The gradient of that adapter's `down` weight.
    pub grad_down: ErrorStats,
    /// Seconds of the reference forward + backward.
    pub reference_s: f64,
    /// Seconds of the tested forward + backward (on CUDA including kernel compilation).
    pub device_s: f64,
    /// Whether all three comparisons are within the tolerance.
    pub pass: bool,
}

/// Output, `up` gradient and `down` gradient of one run, on the host.
struct Outcome {
    output: Vec<f32>,
    grad_up: Vec<f32>,
    grad_down: Vec<f32>,
    seconds: f64,
}

fn bad(reason: impl Into<String>) -> TrainError {
    TrainError::Config {
        origin: "device-check".into(),
        reason: reason.into(),
    }
}

fn host(data: TensorData) -> Result<Vec<f32>, TrainError> {
    data.convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| bad(format!("reading a tensor back failed: {e:?}")))
}

/// Collects every float parameter's value, in visiting order.
struct Collect(Vec<TensorData>);

impl<B: Backend> ModuleVisitor<B> for Collect {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        self.0.push(param.val().into_data());
    }
}

/// Replaces every float parameter's value, in visiting order, keeping its id and
/// `require_grad` flag; remembers the first shape mismatch.
struct Assign<'a, B: Backend> {
    values: std::vec::IntoIter<TensorData>,
    device: &'a B::Device,
    error: Option<String>,
}

impl<B: Backend> ModuleMapper<B> for Assign<'_, B> {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<B, D>>) -> Param<Tensor<B, D>> {
        let Some(data) = self.values.next() else {
            self.error.get_or_insert_with(|| "the copy has more parameters than the reference".into());
            return param;
        };
        let shape = param.lazy_shape();
        if data.shape.as_slice() != shape.as_slice() {
            self.error
                .get_or_insert_with(|| format!("parameter shape {:?} differs from the reference's {:?}", shape.as_slice(), data.shape));
            return param;
        }
        let id = param.id;
        param.transform_for_load(Tensor::from_data(data, self.device), id)
    }
}

/// Copies all float parameters of `from` into `to` (same architecture, any two backends)
/// through host memory, so both hold bit-identical f32 values.
pub fn copy_parameters<A: Backend, B: Backend, MA: Module<A>, MB: Module<B>>(
    from: &MA,
    to: MB,
    device: &B::Device,
) -> Result<MB, TrainError> {
    let mut collect = Collect(Vec::new());
    from.visit(&mut collect);
    let expected = collect.0.len();
    let mut assign = Assign::<B> {
        values: collect.0.into_iter(),
        device,
        error: None,
    };
    let to = to.map(&mut assign);
    if let Some(e) = assign.error {
        return Err(bad(e));
    }
    if assign.values.len() != 0 {
        return Err(bad(format!(
            "the copy has fewer parameters than the reference ({} of {expected} unused)",
            assign.values.len()
        )));
    }
    Ok(to)
}

/// Gives every linear adapter a random `up` weight (normal, std 0.5), keeping the ids.
fn randomize_up<B: Backend>(unet: &mut UNet2DConditionModel<B>, device: &B::Device) {
    unet.visit_lora_sites(&mut |_, site| {
        if let LoraSiteMut::Linear(layer) = site && let Some(adapter) = layer.adapter.as_mut() {
            let dims = adapter.up.weight.dims();
            let value = Tensor::<B, 2>::random(dims, Distribution::Normal(0.0, 0.5), device).require_grad();
            adapter.up.weight = Param::initialized(adapter.up.weight.id, value);
        }
    });
}

/// `(path, up, down)` of the chosen linear adapter.
#[allow(clippy::type_complexity)]
fn adapter_weights<B: Backend>(
    unet: &mut UNet2DConditionModel<B>,
    wanted: Option<&str>,
) -> Option<(String, Param<Tensor<B, 2>>, Param<Tensor<B, 2>>)> {
    let mut found = None;
    unet.visit_lora_sites(&mut |path, site| {
        if found.is_some() || wanted.is_some_and(|w| w != path) {
            return;
        }
        if let LoraSiteMut::Linear(layer) = site && let Some(a) = layer.adapter.as_ref() {
            found = Some((path.to_string(), a.up.weight.clone(), a.down.weight.clone()));
        }
    });
    found
}

/// Brings the model under test to `precision`: its frozen base (everything but the
/// adapters) is cast with [`lora_core::precision::cast_frozen`]; f32 is the identity.
fn apply_precision<B: Backend>(unet: UNet2DConditionModel<B>, precision: Precision) -> UNet2DConditionModel<B> {
    match precision {
        Precision::F32 => unet,
        other => lora_core::precision::cast_frozen(unet, other.dtype()),
    }
}

/// One forward (on `latents`, `timesteps`, `context`) and one backward of
/// `mean((unet(...) - target)²)`, with block-wise gradient checkpointing when `checkpointing`;
/// returns the output and the chosen adapter's gradients.
fn forward_backward<B: AutodiffBackend>(
    unet: &mut UNet2DConditionModel<B>,
    inputs: [&TensorData; 4],
    added: Option<&(TensorData, TensorData)>,
    adapter: &str,
    checkpointing: bool,
    device: &B::Device,
) -> Result<Outcome, TrainError> {
    let start = Instant::now();
    let [latents, timesteps, context, target] = inputs;
    // SDXL's added conditioning (pooled embedding, time ids).
    let added = added.map(|(pooled, ids)| sd_model::AddedConditions {
        text_embeds: Tensor::<B, 2>::from_data(pooled.clone(), device),
        time_ids: Tensor::<B, 2>::from_data(ids.clone(), device),
    });
    let latents = Tensor::<B, 4>::from_data(latents.clone(), device);
    let timesteps = Tensor::<B, 1>::from_data(timesteps.clone(), device);
    let context = Tensor::<B, 3>::from_data(context.clone(), device);
    let target = Tensor::<B, 4>::from_data(target.clone(), device);
    let (_, up, down) = adapter_weights(unet, Some(adapter)).ok_or_else(|| bad(format!("no adapter at `{adapter}`")))?;
    let (pred, grad_up, grad_down) = if checkpointing {
        let mut seen = None;
        let options = CheckpointOptions { added, ..Default::default() };
        let step = unet.forward_backward_checkpointed(latents, timesteps, context, options, |pred| {
            seen = Some(pred.clone().inner());
            (pred - target).powf_scalar(2.0).mean()
        })?;
        let pred = seen.ok_or_else(|| bad("the checkpointed pass gave no prediction"))?;
        (pred, step.grads.get::<B::InnerBackend, 2>(up.id), step.grads.get::<B::InnerBackend, 2>(down.id))
    } else {
        let pred = unet.forward_added(latents, timesteps, context, added)?;
        let loss = (pred.clone() - target).powf_scalar(2.0).mean();
        let grads = loss.backward();
        (pred.inner(), up.grad(&grads), down.grad(&grads))
    };
    let missing = |which: &str| bad(format!("the adapter `{adapter}` got no `{which}` gradient"));
    let grad_up = grad_up.ok_or_else(|| missing("up"))?;
    let grad_down = grad_down.ok_or_else(|| missing("down"))?;
    let output = host(pred.into_data())?;
    let grad_up = host(grad_up.into_data())?;
    let grad_down = host(grad_down.into_data())?;
    Ok(Outcome {
        output,
        grad_up,
        grad_down,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// Runs the check: reference backend `R` on `reference_device` (f32) against backend `T` on
/// `device` (at `opts.precision`). The report's `reference` / `device` fields are the
/// backends' names (`Backend::name`).
pub fn run<R: AutodiffBackend, T: AutodiffBackend>(
    opts: &DeviceCheckOptions,
    reference_device: &R::Device,
    device: &T::Device,
) -> Result<DeviceCheckReport, TrainError> {
    // The UNet checks the latent sides against its own downsampling factor.
    if opts.batch == 0 || opts.resolution == 0 || !opts.resolution.is_multiple_of(8) {
        return Err(bad("batch must be at least 1 and resolution a positive multiple of 8"));
    }
    crate::train::check_dtype_support::<T>(device, opts.precision.dtype(), "--precision", "f16 or f32")?;
    R::seed(reference_device, opts.seed);
    let selection = Selection::new(UnetTargets::Attn);
    let lora = LoraConfig::new(4);

    // Frozen base, as in LoRA training: only the adapters require gradients.
    let mut reference = UNet2DConditionModel::<R>::new(&opts.unet, reference_device)?.no_grad();
    attach_new_adapters(&mut reference, &selection, &lora, reference_device)?;
    randomize_up(&mut reference, reference_device);
    let adapter = match adapter_weights(&mut reference, opts.adapter.as_deref()) {
        Some((path, _, _)) => path,
        None => {
            return Err(bad(match &opts.adapter {
                Some(p) => format!("no attention adapter at `{p}`"),
                None => "this UNet has no attention layers to put adapters on".into(),
            }))
        }
    };

    let mut tested = UNet2DConditionModel::<T>::new(&opts.unet, device)?.no_grad();
    attach_new_adapters(&mut tested, &selection, &lora, device)?;
    let tested = copy_parameters(&reference, tested, device)?;
    let mut tested = apply_precision(tested, opts.precision);

    let side = opts.resolution / 8;
    let n = opts.batch;
    let latents = Tensor::<R, 4>::random([n, opts.unet.in_channels, side, side], Distribution::Normal(0.0, 1.0), reference_device);
    let steps: Vec<f32> = (0..n).map(|i| (999 * (i + 1) / (n + 1)) as f32).collect();
    let timesteps = Tensor::<R, 1>::from_floats(steps.as_slice(), reference_device);
    let context = Tensor::<R, 3>::random([n, 77, opts.unet.cross_attention_dim], Distribution::Normal(0.0, 1.0), reference_device);
    let target = Tensor::<R, 4>::random([n, opts.unet.out_channels, side, side], Distribution::Normal(0.0, 1.0), reference_device);
    let data = [latents.into_data(), timesteps.into_data(), context.into_data(), target.into_data()];
    let inputs = [&data[0], &data[1], &data[2], &data[3]];
    let added = match pooled_width(&opts.unet)? {
        Some(pooled) => {
            let pooled = Tensor::<R, 2>::random([n, pooled], Distribution::Normal(0.0, 1.0), reference_device);
            let size = (opts.resolution as u32, opts.resolution as u32);
            let ids = sd_model::AddedConditions::<R>::sdxl_time_ids(&vec![(size, (0, 0), size); n], reference_device);
            Some((pooled.into_data(), ids.into_data()))
        }
        None => None,
    };

    let want = forward_backward(&mut reference, inputs, added.as_ref(), &adapter, false, reference_device)?;
    drop(reference);
    let got = forward_backward(&mut tested, inputs, added.as_ref(), &adapter, opts.grad_checkpointing, device)?;

    let tolerance = opts.tolerance();
    let output = compare(&want.output, &got.output);
    let grad_up = compare(&want.grad_up, &got.grad_up);
    let grad_down = compare(&want.grad_down, &got.grad_down);
    let pass = [output, grad_up, grad_down].iter().all(|e| e.within(tolerance));
    Ok(DeviceCheckReport {
        check: "device-check".into(),
        reference: R::name(reference_device),
        device: T::name(device),
        precision: opts.precision,
        batch: opts.batch,
        resolution: opts.resolution,
        tolerance,
        adapter,
        grad_checkpointing: opts.grad_checkpointing,
        output,
        grad_up,
        grad_down,
        reference_s: want.seconds,
        device_s: got.seconds,
        pass,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare_measures_relative_errors() {
        let e = compare(&[1.0, -2.0, 0.5], &[1.0, -2.0, 0.5]);
        assert_eq!((e.max_rel, e.rel_l2, e.finite), (0.0, 0.0, true));
        let e = compare(&[3.0, 4.0], &[3.0, 4.5]);
        assert!((e.max_abs_diff - 0.5).abs() < 1e-12 && (e.max_rel - 0.125).abs() < 1e-12);
        assert!((e.rel_l2 - 0.1).abs() < 1e-12);
        assert!(!compare(&[1.0], &[f32::NAN]).within(1.0));
        assert!(!compare(&[1.0, 2.0], &[1.0]).within(1.0));
        assert!(compare(&[0.0], &[0.0]).within(0.0));
        assert_eq!(compare(&[0.0], &[1e-3]).rel_l2, f64::INFINITY);
    }

    #[test]
    fn precision_names_round_trip() {
        for p in [Precision::F32, Precision::Bf16, Precision::F16] {
            assert_eq!(p.as_str().parse::<Precision>(), Ok(p));
            assert!(p.tolerance() > 0.0);
        }
        assert!("f64".parse::<Precision>().is_err());
    }
}
