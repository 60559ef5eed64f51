//! kohya's rank and module dropout (sd-scripts' `network_args` `rank_dropout` and
//! `module_dropout`), shared by the linear and conv adapters.

use burn::tensor::backend::Backend;
use burn::tensor::{Distribution, Tensor};

/// The factor of each sample's `rank` components of `down(x)` while training, `[groups,
/// rank]`: with `rank_p`, each component is 0 with that probability and `1 / (1 − rank_p)`
/// otherwise (kohya rescales the update as if the rank were smaller); with `module_p`, the
/// whole pass is 0 with that probability (one draw per call). `None` when neither applies:
/// both probabilities are 0, or the backend does not differentiate (inference, as burn's
/// own `Dropout`). The draws come from the backend's seeded RNG, on the device.
pub(crate) fn mask<B: Backend>(rank_p: f64, module_p: f64, groups: usize, rank: usize, device: &B::Device) -> Option<Tensor<B, 2>> {
    if !B::ad_enabled(device) || (rank_p <= 0.0 && module_p <= 0.0) {
        return None;
    }
    let mut mask = if rank_p > 0.0 {
        Tensor::<B, 2>::random([groups, rank], Distribution::Bernoulli(1.0 - rank_p), device).mul_scalar(1.0 / (1.0 - rank_p))
    } else {
        Tensor::<B, 2>::ones([groups, rank], device)
    };
    if module_p > 0.0 {
        mask = mask * Tensor::<B, 2>::random([1, 1], Distribution::Bernoulli(1.0 - module_p), device);
    }
    Some(mask)
}

/// A LoRA adapter's rank dropout probability `p` as `(kohya's, LyCORIS')`: all of it one
/// or the other, by `lycoris` ([`crate::LoraConfig::lycoris_rank_dropout`]).
pub(crate) fn split(p: f64, lycoris: bool) -> (f64, f64) {
    if lycoris {
        (0.0, p)
    } else {
        (p, 0.0)
    }
}

/// LyCORIS' rank dropout for one pass, `[out]`: each output's row of `ΔW` is 0 with
/// probability `p` and 1 otherwise (with `scale`, 1 over the share kept: LyCORIS'
/// `rank_dropout_scale`); `None` without rank dropout or on a backend that does not
/// differentiate (inference). Drawn on the device from the backend's seeded RNG.
pub(crate) fn rows<B: Backend>(p: f64, scale: bool, out: usize, device: &B::Device) -> Option<Tensor<B, 1>> {
    if p <= 0.0 || !B::ad_enabled(device) {
        return None;
    }
    let keep = Tensor::<B, 1>::random([out], Distribution::Bernoulli(1.0 - p), device);
    if !scale {
        return Some(keep);
    }
    // All dropped: zero (LyCORIS divides by a zero mean there).
    let kept = keep.clone().mean().clamp_min(1.0 / out as f64);
    Some(keep / kept)
}

/// LyCORIS' Diag-OFT rank dropout for one pass, `[k, n, n]` over the rotation's blocks:
/// `torch.nn.Dropout(p)`'s factors, each entry 0 with probability `p` and `1 / (1 − p)`
/// otherwise ([`crate::oft::update_dropped`]); `None` without rank dropout or on a backend
/// that does not differentiate (inference). Drawn on the device from the backend's seeded
/// RNG.
pub(crate) fn entries<B: Backend>(p: f64, shape: [usize; 3], device: &B::Device) -> Option<Tensor<B, 3>> {
    if p <= 0.0 || !B::ad_enabled(device) {
        return None;
    }
    Some(Tensor::<B, 3>::random(shape, Distribution::Bernoulli(1.0 - p), device).mul_scalar(1.0 / (1.0 - p)))
}

/// How many samples `rows` rows of a linear layer's input hold: `leading` (the first
/// dimension of an input with three or more), else the `samples` hint, else one per row.
/// A count that does not divide the rows falls back to one per row.
pub(crate) fn groups(rows: usize, leading: Option<usize>, samples: usize) -> usize {
    let groups = leading.unwrap_or(samples);
    if groups > 0 && rows.is_multiple_of(groups) {
        groups
    } else {
        rows
    }
}
