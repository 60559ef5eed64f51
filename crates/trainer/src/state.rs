//! Training state on disk, for `--resume`: the exact adapter weights, AdamW moments, step,
//! data position and random-stream positions of a run.
//!
//! A state folder holds `state.json` (counters, stream positions and the settings a resumed
//! run must share), `adapters.safetensors` (the trainable tensors in f32, burn layout,
//! keyed `unet.<module path>.down|up` and `text_encoder.<module path>.down|up`) and
//! `optimizer.safetensors` (AdamW's first and second moments under the same keys with
//! `.m1` / `.m2`). It is written to a temporary folder that replaces the previous state
//! only once complete and flushed to the disk, so an interrupted save (or a power loss)
//! never destroys the last good state.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use burn::module::{Param, ParamId};
use lora_core::optim::FlatAdamW;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::Tensor;
use lora_core::tensor_io;
use lora_core::{HostTensor, LoraSiteMut, LoraSites, SaveDtype};
use serde::{Deserialize, Serialize};

use crate::train::io_err;
use crate::TrainError;

/// Version of the state layout; a state from another version is refused.
pub const STATE_VERSION: u32 = 1;

/// A trainable adapter tensor of a model: its key, parameter id and current value.
pub enum AdapterParam<B: Backend> {
    /// A linear adapter matrix (burn layout).
    Matrix(ParamId, Tensor<B, 2>),
    /// A conv adapter kernel.
    Kernel(ParamId, Tensor<B, 4>),
    /// A DoRA magnitude.
    Vector(ParamId, Tensor<B, 1>),
}

impl<B: Backend> AdapterParam<B> {
    /// The parameter id (what optimizers and gradients are keyed by).
    pub fn id(&self) -> ParamId {
        match self {
            Self::Matrix(id, _) | Self::Kernel(id, _) | Self::Vector(id, _) => *id,
        }
    }
}

/// The adapters' trainable tensors of `model`, keyed `<prefix>.<module path>.down|up`
/// (and `.magnitude` for DoRA, `.mid` for a LoCon's Tucker core; a LyCORIS adapter's by
/// factor, `.hada_w1_a` etc.).
pub fn adapter_params<B: Backend>(model: &mut impl LoraSites<B>, prefix: &str) -> Vec<(String, AdapterParam<B>)> {
    let mut out = Vec::new();
    model.visit_lora_sites(&mut |path, site| {
        if let Some(a) = site.lycoris_adapter() {
            for (name, p) in a.names().iter().zip(&a.factors) {
                out.push((format!("{prefix}.{path}.{name}"), AdapterParam::Matrix(p.id, p.val())));
            }
            if let Some(m) = &a.magnitude {
                out.push((format!("{prefix}.{path}.magnitude"), AdapterParam::Vector(m.id, m.val())));
            }
            if let Some(s) = &a.scalar {
                out.push((format!("{prefix}.{path}.scalar"), AdapterParam::Vector(s.id, s.val())));
            }
        }
        lora_params(site, &format!("{prefix}.{path}"), &mut out);
    });
    out
}

/// A LoRA adapter's trainable tensors, keyed `<key>.down|up|magnitude|mid`.
fn lora_params<B: Backend>(site: LoraSiteMut<'_, B>, key: &str, out: &mut Vec<(String, AdapterParam<B>)>) {
    let dot = |name: &str| format!("{key}.{name}");
    match site {
        LoraSiteMut::Linear(l) => {
            if let Some(a) = &l.adapter {
                out.push((dot("down"), AdapterParam::Matrix(a.down.weight.id, a.down.weight.val())));
                out.push((dot("up"), AdapterParam::Matrix(a.up.weight.id, a.up.weight.val())));
                if let Some(m) = &a.magnitude {
                    out.push((dot("magnitude"), AdapterParam::Vector(m.id, m.val())));
                }
            }
        }
        LoraSiteMut::Conv(c) => {
            if let Some(a) = &c.adapter {
                out.push((dot("down"), AdapterParam::Kernel(a.down.weight.id, a.down.weight.val())));
                out.push((dot("up"), AdapterParam::Kernel(a.up.weight.id, a.up.weight.val())));
                if let Some(m) = &a.magnitude {
                    out.push((dot("magnitude"), AdapterParam::Vector(m.id, m.val())));
                }
                if let Some(mid) = &a.mid {
                    out.push((dot("mid"), AdapterParam::Kernel(mid.weight.id, mid.weight.val())));
                }
            }
        }
        // A norm layer holds LyCORIS' norm module only (listed with the LyCORIS adapters).
        LoraSiteMut::Norm(_) => {}
    }
}

fn mismatch(key: &str, reason: String) -> TrainError {
    TrainError::Config {
        origin: format!("resume: adapter `{key}`"),
        reason,
    }
}

fn upload<B: Backend, const D: usize>(key: &str, host: &HostTensor, expected: [usize; D], device: &B::Device) -> Result<Tensor<B, D>, TrainError> {
    if host.shape != expected {
        return Err(mismatch(key, format!("saved shape {:?}, the model's adapter is {expected:?} (were lora.rank or the targets changed?)", host.shape)));
    }
    Ok(host.to_tensor::<B, D>(device)?)
}

/// Replaces the adapters' trainable tensors of `model` with `saved` (keys as
/// [`adapter_params`] makes them). Every adapter of the model must be in `saved`.
pub fn restore_adapter_params<B: Backend>(
    model: &mut impl LoraSites<B>,
    prefix: &str,
    saved: &HashMap<String, HostTensor>,
    device: &B::Device,
) -> Result<usize, TrainError> {
    let (mut restored, mut error) = (0, None);
    model.visit_lora_sites(&mut |path, site| {
        if error.is_none() {
            match restore_site(site, &format!("{prefix}.{path}"), saved, device) {
                Ok(n) => restored += n,
                Err(e) => error = Some(e),
            }
        }
    });
    error.map_or(Ok(restored), Err)
}

fn saved_tensor<'a>(saved: &'a HashMap<String, HostTensor>, key: &str) -> Result<&'a HostTensor, TrainError> {
    saved.get(key).ok_or_else(|| mismatch(key, "missing from the saved state (were the targets changed?)".into()))
}

fn restore_site<B: Backend>(mut site: LoraSiteMut<'_, B>, key: &str, saved: &HashMap<String, HostTensor>, device: &B::Device) -> Result<usize, TrainError> {
    if let Some(a) = site.lycoris_adapter_mut() {
        let names = a.names().to_vec();
        for (name, p) in names.iter().zip(a.factors.iter_mut()) {
            let key = format!("{key}.{name}");
            *p = Param::from_tensor(upload::<B, 2>(&key, saved_tensor(saved, &key)?, p.dims(), device)?);
        }
        if let Some(m) = a.magnitude.as_mut() {
            let key = format!("{key}.magnitude");
            *m = Param::from_tensor(upload::<B, 1>(&key, saved_tensor(saved, &key)?, m.dims(), device)?);
        }
        if let Some(s) = a.scalar.as_mut() {
            let key = format!("{key}.scalar");
            *s = Param::from_tensor(upload::<B, 1>(&key, saved_tensor(saved, &key)?, s.dims(), device)?);
        }
        return Ok(1);
    }
    let (down, up) = (format!("{key}.down"), format!("{key}.up"));
    let magnitude = match site {
        LoraSiteMut::Linear(l) => {
            let Some(a) = l.adapter.as_mut() else { return Ok(0) };
            a.down.weight = Param::from_tensor(upload::<B, 2>(&down, saved_tensor(saved, &down)?, a.down.weight.dims(), device)?);
            a.up.weight = Param::from_tensor(upload::<B, 2>(&up, saved_tensor(saved, &up)?, a.up.weight.dims(), device)?);
            a.magnitude.as_mut()
        }
        LoraSiteMut::Conv(c) => {
            let Some(a) = c.adapter.as_mut() else { return Ok(0) };
            a.down.weight = Param::from_tensor(upload::<B, 4>(&down, saved_tensor(saved, &down)?, a.down.weight.dims(), device)?);
            a.up.weight = Param::from_tensor(upload::<B, 4>(&up, saved_tensor(saved, &up)?, a.up.weight.dims(), device)?);
            if let Some(mid) = a.mid.as_mut() {
                let key = format!("{key}.mid");
                mid.weight = Param::from_tensor(upload::<B, 4>(&key, saved_tensor(saved, &key)?, mid.weight.dims(), device)?);
            }
            a.magnitude.as_mut()
        }
        LoraSiteMut::Norm(_) => return Ok(0),
    };
    if let Some(m) = magnitude {
        let key = format!("{key}.magnitude");
        *m = Param::from_tensor(upload::<B, 1>(&key, saved_tensor(saved, &key)?, m.dims(), device)?);
    }
    Ok(1)
}

/// The trainable tensors' values on the host, by key.
pub fn host_params<B: Backend>(params: Vec<(String, AdapterParam<B>)>, out: &mut HashMap<String, HostTensor>) -> Result<(), TrainError> {
    for (key, p) in params {
        let host = match p {
            AdapterParam::Matrix(_, t) => HostTensor::from_tensor(t)?,
            AdapterParam::Kernel(_, t) => HostTensor::from_tensor(t)?,
            AdapterParam::Vector(_, t) => HostTensor::from_tensor(t)?,
        };
        out.insert(key, host);
    }
    Ok(())
}

/// Copies AdamW's moments and step counts for `params` out of `optim` (tensors it has
/// updated at least once, or whose second moments ADOPT's first step filled).
pub fn export_moments<B: AutodiffBackend>(
    optim: &FlatAdamW<B>,
    params: &[(String, AdapterParam<B>)],
    moments: &mut HashMap<String, HostTensor>,
    times: &mut BTreeMap<String, usize>,
) -> Result<(), TrainError> {
    for (key, p) in params {
        let id = p.id();
        let (mut time, m1, m2) = match p {
            AdapterParam::Matrix(id, _) => match optim.moments::<2>(*id) {
                Some((t, m1, m2)) => (t, HostTensor::from_tensor(m1)?, HostTensor::from_tensor(m2)?),
                None => continue,
            },
            AdapterParam::Kernel(id, _) => match optim.moments::<4>(*id) {
                Some((t, m1, m2)) => (t, HostTensor::from_tensor(m1)?, HostTensor::from_tensor(m2)?),
                None => continue,
            },
            AdapterParam::Vector(id, _) => match optim.moments::<1>(*id) {
                Some((t, m1, m2)) => (t, HostTensor::from_tensor(m1)?, HostTensor::from_tensor(m2)?),
                None => continue,
            },
        };
        // A tensor trained a rank chunk at a time (DyLoRA) has a step count per value,
        // saved as `<key>.t` (exact in f32 below 2^24 steps).
        let counts = optim.has_rank_chunks(id).then(|| optim.step_counts(id)).flatten();
        if let Some(counts) = &counts {
            time = counts.iter().copied().max().unwrap_or(0);
        }
        // Untouched moments need no saving; ADOPT's first step fills the second moments
        // without counting a step.
        if time == 0 && m2.data.iter().all(|v| *v == 0.0) {
            continue;
        }
        if let Some(counts) = counts {
            let values = counts.iter().map(|c| *c as f32).collect();
            moments.insert(format!("{key}.t"), HostTensor::new(m1.shape.clone(), values)?);
        }
        times.insert(key.clone(), time);
        moments.insert(format!("{key}.m1"), m1);
        moments.insert(format!("{key}.m2"), m2);
    }
    Ok(())
}

/// Gives `optim` the saved moments of `params` (the model's current parameters); tensors
/// without a saved step count start fresh.
pub fn import_moments<B: AutodiffBackend>(
    optim: &mut FlatAdamW<B>,
    params: &[(String, AdapterParam<B>)],
    moments: &HashMap<String, HostTensor>,
    times: &BTreeMap<String, usize>,
    device: &B::Device,
) -> Result<(), TrainError> {
    for (key, p) in params {
        let Some(&time) = times.get(key) else { continue };
        let (k1, k2) = (format!("{key}.m1"), format!("{key}.m2"));
        let set = match p {
            AdapterParam::Matrix(id, t) => {
                let m1 = upload::<B::InnerBackend, 2>(&k1, saved_tensor(moments, &k1)?, t.dims(), device)?;
                let m2 = upload::<B::InnerBackend, 2>(&k2, saved_tensor(moments, &k2)?, t.dims(), device)?;
                optim.set_moments(*id, time, m1, m2)
            }
            AdapterParam::Kernel(id, t) => {
                let m1 = upload::<B::InnerBackend, 4>(&k1, saved_tensor(moments, &k1)?, t.dims(), device)?;
                let m2 = upload::<B::InnerBackend, 4>(&k2, saved_tensor(moments, &k2)?, t.dims(), device)?;
                optim.set_moments(*id, time, m1, m2)
            }
            AdapterParam::Vector(id, t) => {
                let m1 = upload::<B::InnerBackend, 1>(&k1, saved_tensor(moments, &k1)?, t.dims(), device)?;
                let m2 = upload::<B::InnerBackend, 1>(&k2, saved_tensor(moments, &k2)?, t.dims(), device)?;
                optim.set_moments(*id, time, m1, m2)
            }
        };
        set.map_err(|e| mismatch(key, e.to_string()))?;
        let kt = format!("{key}.t");
        if let Some(counts) = moments.get(&kt) {
            let id = p.id();
            if counts.data.iter().any(|c| !(c.is_finite() && *c >= 0.0 && c.fract() == 0.0)) {
                return Err(mismatch(&kt, "step counts must be whole numbers of at least 0".into()));
            }
            let counts: Vec<usize> = counts.data.iter().map(|c| *c as usize).collect();
            optim.set_step_counts(id, &counts).map_err(|e| mismatch(&kt, e.to_string()))?;
        }
    }
    Ok(())
}

/// Copies the optimizer's own state beyond the moments (Prodigy's, Adafactor's, CAME's,
/// AdEMAMix's, DAdaptAdam's or schedule-free's; nothing for AdamW, Lion and SGD) out of `optim` into `moments`, keyed
/// `<optimizer>.<name>.<part>` (flat, in the optimizer's order, which the fingerprinted
/// `[lora]` section fixes).
pub fn export_optimizer_state<B: AutodiffBackend>(optim: &FlatAdamW<B>, name: &str, moments: &mut HashMap<String, HostTensor>) -> Result<(), TrainError> {
    let mut put = |part: String, t: Tensor<B::InnerBackend, 1>| -> Result<(), TrainError> {
        moments.insert(part, HostTensor::from_tensor(t)?);
        Ok(())
    };
    if let Some(state) = optim.prodigy_state() {
        put(format!("prodigy.{name}.p0"), state.p0)?;
        put(format!("prodigy.{name}.s"), state.s)?;
        put(format!("prodigy.{name}.scalars"), state.scalars)?;
    }
    if let Some(max_v) = optim.amsgrad_state() {
        put(format!("amsgrad.{name}.max_v"), max_v)?;
    }
    if let Some(state) = optim.adafactor_state() {
        put(format!("adafactor.{name}.rows"), state.rows)?;
        put(format!("adafactor.{name}.cols"), state.cols)?;
    }
    if let Some(state) = optim.came_state() {
        for (part, t) in [("rows", state.rows), ("cols", state.cols), ("res_rows", state.res_rows), ("res_cols", state.res_cols)] {
            put(format!("came.{name}.{part}"), t)?;
        }
    }
    if let Some(state) = optim.ademamix_state() {
        put(format!("ademamix.{name}.slow"), state.slow)?;
    }
    if let Some(state) = optim.dadapt_state() {
        put(format!("dadapt.{name}.s"), state.s)?;
        put(format!("dadapt.{name}.scalars"), state.scalars)?;
        for (part, t) in [("x0", state.x0), ("diff", state.diff), ("pre_grad", state.pre_grad)] {
            if let Some(t) = t {
                put(format!("dadapt.{name}.{part}"), t)?;
            }
        }
    }
    if let Some(state) = optim.schedule_free_state() {
        put(format!("schedule_free.{name}.z"), state.z)?;
        put(format!("schedule_free.{name}.scalars"), state.scalars)?;
    }
    if let Some(state) = optim.prodigy_plus_state() {
        for (part, t) in [("z", state.z), ("rows", state.rows), ("cols", state.cols), ("p0", state.p0), ("s", state.s), ("scalars", state.scalars)] {
            put(format!("prodigy_plus.{name}.{part}"), t)?;
        }
    }
    Ok(())
}

/// Gives `optim` the saved state of [`export_optimizer_state`]; an error when the state and
/// the configured optimizer disagree (`origin`: the state's folder).
pub fn import_optimizer_state<B: AutodiffBackend>(
    optim: &mut FlatAdamW<B>,
    name: &str,
    moments: &HashMap<String, HostTensor>,
    origin: &Path,
    device: &B::Device,
) -> Result<(), TrainError> {
    let len = optim.len();
    let vector = |key: &str, len: usize| upload::<B::InnerBackend, 1>(key, saved_tensor(moments, key)?, [len], device);
    let key = |kind: &str, part: &str| format!("{kind}.{name}.{part}");
    if same_optimizer(optim, moments, &key("prodigy", "scalars"), optim.prodigy_d().is_some(), "prodigy", origin)? {
        let (p0, s, scalars) = (vector(&key("prodigy", "p0"), len)?, vector(&key("prodigy", "s"), len)?, vector(&key("prodigy", "scalars"), 4)?);
        optim.set_prodigy_state(lora_core::optim::ProdigyState { p0, s, scalars }).map_err(|e| mismatch(&key("prodigy", "p0"), e.to_string()))?;
    }
    // The fingerprint has AMSGrad's line: a state that has its vector resumes with it.
    if optim.amsgrad_state().is_some() && !optim.is_empty() {
        let k = key("amsgrad", "max_v");
        let max_v = vector(&k, len)?;
        optim.set_amsgrad_state(max_v).map_err(|e| mismatch(&k, e.to_string()))?;
    }
    let adafactor = optim.adafactor_state();
    let restore = same_optimizer(optim, moments, &key("adafactor", "rows"), adafactor.is_some(), "adafactor", origin)?;
    if let Some(current) = adafactor.filter(|_| restore) {
        let (rows, cols) = (vector(&key("adafactor", "rows"), current.rows.dims()[0])?, vector(&key("adafactor", "cols"), current.cols.dims()[0])?);
        optim.set_adafactor_state(lora_core::optim::AdafactorState { rows, cols }).map_err(|e| mismatch(&key("adafactor", "rows"), e.to_string()))?;
    }
    let came = optim.came_state();
    let restore = same_optimizer(optim, moments, &key("came", "rows"), came.is_some(), "came", origin)?;
    if let Some(current) = came.filter(|_| restore) {
        let part = |name: &str, like: &Tensor<B::InnerBackend, 1>| vector(&key("came", name), like.dims()[0]);
        let state = lora_core::optim::CameState {
            rows: part("rows", &current.rows)?,
            cols: part("cols", &current.cols)?,
            res_rows: part("res_rows", &current.res_rows)?,
            res_cols: part("res_cols", &current.res_cols)?,
        };
        optim.set_came_state(state).map_err(|e| mismatch(&key("came", "rows"), e.to_string()))?;
    }
    if same_optimizer(optim, moments, &key("ademamix", "slow"), optim.ademamix_state().is_some(), "ademamix", origin)? {
        let slow = vector(&key("ademamix", "slow"), len)?;
        optim.set_ademamix_state(lora_core::optim::AdEMAMixState { slow }).map_err(|e| mismatch(&key("ademamix", "slow"), e.to_string()))?;
    }
    let dadapt = optim.dadapt_state();
    let kind = match optim.dadapt_settings().map(|d| d.kind) {
        Some(lora_core::optim::DAdaptKind::AdamPreprint) => "dadapt_adam_preprint",
        Some(lora_core::optim::DAdaptKind::Lion) => "dadapt_lion",
        Some(lora_core::optim::DAdaptKind::Sgd) => "dadapt_sgd",
        Some(lora_core::optim::DAdaptKind::AdaGrad) => "dadapt_adagrad",
        Some(lora_core::optim::DAdaptKind::Adan) => "dadapt_adan",
        _ => "dadapt_adam",
    };
    let restore = same_optimizer(optim, moments, &key("dadapt", "scalars"), dadapt.is_some(), kind, origin)?;
    if let Some(current) = dadapt.filter(|_| restore) {
        let s = vector(&key("dadapt", "s"), len)?;
        let scalars = vector(&key("dadapt", "scalars"), current.scalars.dims()[0])?;
        let part = |like: &Option<Tensor<B::InnerBackend, 1>>, name: &str| like.as_ref().map(|_| vector(&key("dadapt", name), len)).transpose();
        let (x0, diff, pre_grad) = (part(&current.x0, "x0")?, part(&current.diff, "diff")?, part(&current.pre_grad, "pre_grad")?);
        optim.set_dadapt_state(lora_core::optim::DAdaptState { s, scalars, x0, diff, pre_grad }).map_err(|e| mismatch(&key("dadapt", "s"), e.to_string()))?;
    }
    let kind = match optim.schedule_free_settings() {
        Some(s) if s.radam => "radam_schedule_free",
        Some(s) if s.sgd => "sgd_schedule_free",
        _ => "adamw_schedule_free",
    };
    let current = optim.prodigy_plus_state();
    let restore = same_optimizer(optim, moments, &key("prodigy_plus", "scalars"), current.is_some(), "prodigy_plus_schedule_free", origin)?;
    if let Some(current) = current.filter(|_| restore) {
        let part = |name: &str, like: &Tensor<B::InnerBackend, 1>| vector(&key("prodigy_plus", name), like.dims()[0]);
        let state = lora_core::optim::ProdigyPlusState {
            z: part("z", &current.z)?,
            rows: part("rows", &current.rows)?,
            cols: part("cols", &current.cols)?,
            p0: part("p0", &current.p0)?,
            s: part("s", &current.s)?,
            scalars: part("scalars", &current.scalars)?,
        };
        optim.set_prodigy_plus_state(state).map_err(|e| mismatch(&key("prodigy_plus", "z"), e.to_string()))?;
    }
    let schedule_free = optim.schedule_free_state().is_some();
    if same_optimizer(optim, moments, &key("schedule_free", "scalars"), schedule_free, kind, origin)? {
        let (z, scalars) = (vector(&key("schedule_free", "z"), len)?, vector(&key("schedule_free", "scalars"), 3)?);
        optim.set_schedule_free_state(lora_core::optim::ScheduleFreeState { z, scalars }).map_err(|e| mismatch(&key("schedule_free", "z"), e.to_string()))?;
    }
    Ok(())
}

/// Whether `optim` takes a saved state of the optimizer `kind` (whose key `probe` the
/// state holds when it was trained with it): `false` when neither the state nor the
/// configuration (`configured`) has it, or nothing is trained; an error naming `kind` when
/// only one of them does.
fn same_optimizer<B: AutodiffBackend>(optim: &FlatAdamW<B>, moments: &HashMap<String, HostTensor>, probe: &str, configured: bool, kind: &str, origin: &Path) -> Result<bool, TrainError> {
    let saved = moments.contains_key(probe);
    if optim.is_empty() || (!saved && !configured) {
        return Ok(false);
    }
    if saved != configured {
        let reason = match saved {
            true => format!("the state was trained with train.optimizer = \"{kind}\"; resume with the same optimizer"),
            false => format!("the state was not trained with train.optimizer = \"{kind}\"; resume with the optimizer it was trained with"),
        };
        return Err(TrainError::Config { origin: origin.display().to_string(), reason });
    }
    Ok(true)
}

/// A ChaCha stream position in JSON-friendly form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngStateJson {
    /// The 256-bit key in hex.
    pub seed: String,
    /// Stream id.
    pub stream: u64,
    /// Words consumed (decimal; it does not fit JSON numbers).
    pub word_pos: String,
}

impl From<&sd_sched::RngState> for RngStateJson {
    fn from(s: &sd_sched::RngState) -> Self {
        Self {
            seed: s.seed.iter().map(|b| format!("{b:02x}")).collect(),
            stream: s.stream,
            word_pos: s.word_pos.to_string(),
        }
    }
}

impl RngStateJson {
    /// Back to a stream position; `origin` names the file in errors.
    pub fn to_state(&self, origin: &Path) -> Result<sd_sched::RngState, TrainError> {
        let bad = || TrainError::Config {
            origin: origin.display().to_string(),
            reason: format!("malformed random-stream state {self:?}"),
        };
        if self.seed.len() != 64 {
            return Err(bad());
        }
        let mut seed = [0u8; 32];
        for (i, b) in seed.iter_mut().enumerate() {
            *b = u8::from_str_radix(self.seed.get(2 * i..2 * i + 2).ok_or_else(bad)?, 16).map_err(|_| bad())?;
        }
        Ok(sd_sched::RngState {
            seed,
            stream: self.stream,
            word_pos: self.word_pos.parse().map_err(|_| bad())?,
        })
    }
}

/// The counters and settings of `state.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StateInfo {
    /// Layout version ([`STATE_VERSION`]).
    pub version: u32,
    /// Optimizer steps done.
    pub step: usize,
    /// The epoch the next batch comes from.
    pub epoch: u64,
    /// Batches of that epoch already used.
    pub batch_in_epoch: usize,
    /// Timestep sampler stream.
    pub timestep_rng: RngStateJson,
    /// Noise stream.
    pub noise_rng: RngStateJson,
    /// f16 loss scale (1 without f16).
    pub loss_scale: f32,
    /// Consecutive finite steps since the loss scale last changed.
    pub good_steps: usize,
    /// AdamW step count per trainable tensor.
    pub optimizer_time: BTreeMap<String, usize>,
    /// The `[lora]` section and other settings a resumed run must keep, as TOML.
    pub fingerprint: String,
    /// What the run trained on ([`crate::train::data_fingerprint`]), which a resumed run
    /// may change (a note says so, [`crate::train::resume_data_changes`]); absent in states
    /// written before it was recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
}

/// A whole training state in host memory.
pub struct TrainingState {
    /// Counters and stream positions.
    pub info: StateInfo,
    /// Trainable tensors by key.
    pub adapters: HashMap<String, HostTensor>,
    /// AdamW moments by key + `.m1` / `.m2`.
    pub moments: HashMap<String, HostTensor>,
    /// The folder it was read from (named in errors), or is to be written to.
    pub dir: PathBuf,
}

fn write_tensors(path: &Path, tensors: &HashMap<String, HostTensor>) -> Result<(), TrainError> {
    let mut sorted: Vec<(String, &HostTensor)> = tensors.iter().map(|(k, v)| (k.clone(), v)).collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let bytes = tensor_io::serialize(&sorted, SaveDtype::F32, Default::default())?;
    write_synced(path, &bytes)
}

/// Writes `bytes` to a new file at `path` and flushes it to the disk before returning: the
/// state folder is renamed into place only once its files would survive a power loss (a
/// plain write may reach the disk after the rename, leaving empty or short files).
fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), TrainError> {
    use std::io::Write;
    let mut file = std::fs::File::create(path).map_err(io_err(path))?;
    file.write_all(bytes).map_err(io_err(path))?;
    file.sync_all().map_err(io_err(path))
}

/// Flushes the entries of the folder `dir` (files created in it, folders renamed into or
/// out of it) to the disk, so that a rename that follows cannot reach the disk before them.
fn sync_dir(dir: &Path) -> Result<(), TrainError> {
    match std::fs::File::open(dir).and_then(|d| d.sync_all()) {
        Ok(()) => Ok(()),
        // Windows cannot open a folder as a file, and some file systems (FUSE, network
        // mounts) refuse to sync one: nothing more durable can be had there.
        Err(e) if cfg!(not(unix)) || matches!(e.kind(), std::io::ErrorKind::InvalidInput | std::io::ErrorKind::Unsupported | std::io::ErrorKind::PermissionDenied) => Ok(()),
        Err(e) => Err(io_err(dir)(e)),
    }
}

/// The folder that holds `dir` (`.` for a bare relative name).
fn parent_of(dir: &Path) -> &Path {
    match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

/// The largest epoch and count (batches into an epoch, good steps, optimizer steps of a
/// tensor) a `state.json` may hold: far beyond any run (2^40 batches at one a millisecond
/// take 35 years), and low enough that the counters' arithmetic (the next epoch,
/// `epoch × batches per epoch` in the data's caption warmup) cannot overflow.
pub const MAX_STATE_COUNT: u64 = 1 << 40;

/// Refuses counters of a (corrupted or hand-edited) `state.json` at `origin` that no run
/// can reach, which would overflow where they are counted on.
fn check_counters(info: &StateInfo, origin: &Path) -> Result<(), TrainError> {
    let bad = |key: &str, value: String, expected: String| TrainError::Config {
        origin: origin.display().to_string(),
        reason: format!("`{key}` = {value}: expected {expected} (the file is damaged or was edited; resume from another state)"),
    };
    let max_steps = crate::config::MAX_TRAIN_STEPS;
    if info.step > max_steps {
        return Err(bad("step", info.step.to_string(), format!("at most {max_steps}, the steps a run may have")));
    }
    let counts = [("epoch", info.epoch), ("batch_in_epoch", info.batch_in_epoch as u64), ("good_steps", info.good_steps as u64)];
    let counts = counts.into_iter().map(|(key, v)| (key.to_string(), v));
    let times = info.optimizer_time.iter().map(|(key, t)| (format!("optimizer_time.{key}"), *t as u64));
    if let Some((key, value)) = counts.chain(times).find(|(_, v)| *v > MAX_STATE_COUNT) {
        return Err(bad(&key, value.to_string(), format!("at most {MAX_STATE_COUNT}")));
    }
    if !(info.loss_scale.is_finite() && info.loss_scale > 0.0) {
        return Err(bad("loss_scale", info.loss_scale.to_string(), "a positive finite number".into()));
    }
    Ok(())
}

fn read_tensors(path: &Path) -> Result<HashMap<String, HostTensor>, TrainError> {
    let bytes = tensor_io::read_file(path)?;
    let (st, _) = tensor_io::parse(&bytes, path)?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        out.insert(name.clone(), tensor_io::decode(&view, &name, path)?);
    }
    Ok(out)
}

impl TrainingState {
    /// Writes the state to `dir`, replacing a previous state there only once the new one
    /// is complete.
    pub fn save(&self, dir: &Path) -> Result<(), TrainError> {
        let tmp = sibling(dir, "tmp");
        let old = sibling(dir, "old");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
        }
        std::fs::create_dir_all(&tmp).map_err(io_err(&tmp))?;
        write_tensors(&tmp.join("adapters.safetensors"), &self.adapters)?;
        write_tensors(&tmp.join("optimizer.safetensors"), &self.moments)?;
        let json = serde_json::to_string_pretty(&self.info).map_err(|e| TrainError::Config {
            origin: "state.json".into(),
            reason: e.to_string(),
        })?;
        // Written last: a folder with `state.json` has its tensor files complete.
        let info = tmp.join("state.json");
        write_synced(&info, json.as_bytes())?;
        // The new folder's entries, then the folder itself, reach the disk before any
        // rename: after a power loss a renamed folder holds whole files.
        sync_dir(&tmp)?;
        sync_dir(parent_of(dir))?;
        if dir.exists() {
            if old.exists() {
                std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
            }
            // Killed between this rename and the next, only `<dir>.old` (and the complete
            // `<dir>.tmp`) is left: [`TrainingState::load`] names them.
            std::fs::rename(dir, &old).map_err(io_err(dir))?;
        }
        std::fs::rename(&tmp, dir).map_err(io_err(dir))?;
        // The renames reach the disk before the previous state is deleted.
        sync_dir(parent_of(dir))?;
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(io_err(&old))?;
        }
        Ok(())
    }

    /// Reads a state folder written by [`TrainingState::save`].
    pub fn load(dir: &Path) -> Result<Self, TrainError> {
        let info_path = dir.join("state.json");
        if !info_path.is_file() {
            return Err(not_a_state(dir));
        }
        let text = std::fs::read_to_string(&info_path).map_err(io_err(&info_path))?;
        let info: StateInfo = serde_json::from_str(&text).map_err(|e| TrainError::Config {
            origin: info_path.display().to_string(),
            reason: format!("malformed training state: {e}"),
        })?;
        if info.version != STATE_VERSION {
            return Err(TrainError::Config {
                origin: info_path.display().to_string(),
                reason: format!("state version {} is not supported (expected {STATE_VERSION})", info.version),
            });
        }
        check_counters(&info, &info_path)?;
        Ok(Self {
            adapters: read_tensors(&dir.join("adapters.safetensors"))?,
            moments: read_tensors(&dir.join("optimizer.safetensors"))?,
            info,
            dir: dir.to_path_buf(),
        })
    }
}

/// The error for a `--resume` folder `dir` without `state.json`. A save killed between its
/// two renames leaves the previous state in `<dir>.old` (and the new one, complete, in
/// `<dir>.tmp`): the error names them. Neither is loaded on its own: the next save would
/// delete the other one, and which of them to go on from is the user's choice.
fn not_a_state(dir: &Path) -> TrainError {
    let (old, tmp) = (sibling(dir, "old"), sibling(dir, "tmp"));
    let reason = if old.join("state.json").is_file() {
        let aside = if dir.exists() { format!("move {} aside, then ", dir.display()) } else { String::new() };
        let newer = match tmp.join("state.json").is_file() {
            true => format!(" ({} holds the newer state that save had written; rename that one instead to resume from it)", tmp.display()),
            false => String::new(),
        };
        format!(
            "not a training state folder (no state.json), but {} holds the previous training state, left by a save that was interrupted: {aside}rename it to {} and resume again{newer}",
            old.display(),
            dir.display()
        )
    } else {
        "not a training state folder (no state.json); pass the `state` folder inside a previous run's output_dir".into()
    };
    TrainError::Config { origin: dir.display().to_string(), reason }
}

/// `dir` with `.suffix` appended to its last component.
fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".{suffix}"));
    dir.with_file_name(name)
}
