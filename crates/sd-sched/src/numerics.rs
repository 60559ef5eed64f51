//! Host-side re-implementations of the few numpy / torch routines diffusers builds its
//! schedules with, down to their dtype and rounding choices: a 1e-5 parity with diffusers
//! depends on getting the same timesteps and sigmas, not merely close ones.

/// `torch.linspace(start, end, n, dtype=torch.float32)` on the CPU: start, end and the
/// step are f32 values, the first half counts up from `start` and the second half down
/// from `end`, each point evaluated in f64 and rounded once (verified bit for bit
/// against torch 2.15).
pub(crate) fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (start, end) = (start as f32, end as f32);
    if n == 1 {
        return vec![start];
    }
    let step = ((end - start) / (n - 1) as f32) as f64;
    let (start, end) = (start as f64, end as f64);
    let half = n / 2;
    (0..n)
        .map(|i| {
            let v = if i < half {
                start + step * i as f64
            } else {
                end - step * (n - i - 1) as f64
            };
            v as f32
        })
        .collect()
}

/// `np.linspace(start, stop, n)` in f64: `i·step + start`, with the endpoint exact.
pub(crate) fn np_linspace(start: f64, stop: f64, n: usize) -> Vec<f64> {
    match n {
        0 => vec![],
        1 => vec![start],
        _ => {
            let step = (stop - start) / (n - 1) as f64;
            let mut v: Vec<f64> = (0..n).map(|i| i as f64 * step + start).collect();
            v[n - 1] = stop;
            v
        }
    }
}

/// `np.arange(start, stop, step)` for floats: the length is `ceil((stop − start) / step)`
/// and elements past the second are `start + i·delta` with `delta` re-derived from the
/// first two, exactly as numpy fills the array.
pub(crate) fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    // Also catches NaN (a zero step).
    if len.is_nan() || len <= 0.0 {
        return vec![];
    }
    let len = len as usize;
    let second = start + step;
    let delta = second - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// numpy's `round` (half to even).
pub(crate) fn round_half_even(x: f64) -> f64 {
    x.round_ties_even()
}

/// `np.interp(x, arange(len(fp)), fp)` for `x` within `[0, len − 1]`.
pub(crate) fn np_interp_index(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x <= 0.0 {
        return fp[0] as f64;
    }
    if x >= last as f64 {
        return fp[last] as f64;
    }
    let j = x.floor() as usize;
    if x == j as f64 {
        return fp[j] as f64;
    }
    // numpy's `slope·(x − xp[j]) + fp[j]`; the xp spacing is 1.
    let slope = fp[j + 1] as f64 - fp[j] as f64;
    slope * (x - j as f64) + fp[j] as f64
}

/// The Karras et al. (2022) sigma ramp with ρ = 7, in f64 like diffusers.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0;
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(rho))
        .collect()
}

/// [`karras_sigmas`] between the config's `sigma_min` / `sigma_max` (`bounds`), each
/// falling back to the sampler's own end (`fallback`, low then high: the schedule's
/// sigmas, or the spaced ones for the Euler family) where the config has none.
///
/// Refuses a ramp that would not fall: with `σ_min > σ_max` the sigmas rise and every
/// step adds noise instead of removing it (silently wrong images), and where neighbours
/// are equal (`σ_min = σ_max`, or bounds so close that f32 rounding merges sigmas)
/// DPM-Solver's log-SNR step h is 0 and its update NaN. diffusers does not check this.
/// A single step has no direction (the ramp is just `σ_max`), so it is not refused.
pub(crate) fn checked_karras_sigmas(
    bounds: (Option<f64>, Option<f64>),
    fallback: (f64, f64),
    n: usize,
) -> crate::error::Result<Vec<f64>> {
    let lo = bounds.0.unwrap_or(fallback.0);
    let hi = bounds.1.unwrap_or(fallback.1);
    let sigmas = karras_sigmas(lo, hi, n);
    // The samplers step in f32, so the fall must survive rounding to f32.
    let falls = sigmas.windows(2).all(|w| (w[0] as f32) > (w[1] as f32));
    if n < 2 || (lo < hi && falls) {
        return Ok(sigmas);
    }
    let why = format!("so that the {n} Karras sigmas fall");
    let (key, expected, found) = match bounds {
        (Some(_), Some(_)) => ("sigma_min", format!("a value far enough below sigma_max ({hi}) {why}"), lo.to_string()),
        (Some(_), None) => (
            "sigma_min",
            format!("a value far enough below {hi}, the largest sigma this schedule gives here (sigma_max is not set), {why}"),
            lo.to_string(),
        ),
        (None, Some(_)) => (
            "sigma_max",
            format!("a value far enough above {lo}, the smallest sigma this schedule gives here (sigma_min is not set), {why}"),
            hi.to_string(),
        ),
        // Both ends come from the schedule, whose sigmas fall unless it is degenerate.
        (None, None) => (
            "use_karras_sigmas",
            format!("a schedule whose sigmas fall from {hi} to {lo} {why}"),
            "true".to_string(),
        ),
    };
    Err(crate::error::SchedError::invalid_value(key, expected, found))
}

/// diffusers' `_sigma_to_t`: the fractional training timestep of `sigma`, interpolating
/// in log-sigma between the neighbouring training sigmas (`log_sigmas`, f32 like numpy's
/// `np.log` of an f32 array).
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // argmax of cumsum(dists >= 0): the first index at which the running count peaks.
    let (mut count, mut best, mut argmax) = (0usize, 0usize, 0usize);
    for (i, ls) in log_sigmas.iter().enumerate() {
        if log_sigma - *ls as f64 >= 0.0 {
            count += 1;
        }
        if count > best {
            best = count;
            argmax = i;
        }
    }
    let low_idx = argmax.min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let (low, high) = (log_sigmas[low_idx], log_sigmas[high_idx]);
    // numpy: (f32 − f64) promotes to f64, (f32 − f32) stays f32.
    let w = ((low as f64 - log_sigma) / (low - high) as f64).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// Training sigmas `sqrt((1 − ᾱ) / ᾱ)`, computed in f32 like diffusers' torch expression.
pub(crate) fn sigmas_from_alphas_cumprod(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod
        .iter()
        .map(|&a| ((1.0 - a) / a).sqrt())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arange_matches_numpy_lengths_and_values() {
        // Values printed by numpy 2.4: np.arange(1000, 0, -1000/7). The accumulated
        // rounding of `start + i·delta` is part of the contract.
        let v = np_arange(1000.0, 0.0, -1000.0 / 7.0);
        let numpy = [
            1000.0,
            857.1428571428571,
            714.2857142857142,
            571.4285714285713,
            428.57142857142844,
            285.71428571428555,
            142.85714285714266,
        ];
        assert_eq!(v, numpy);
        // np.round(np.arange(1000, 0, -62.5)) rounds the .5 ties to even.
        let r: Vec<f64> = np_arange(1000.0, 0.0, -62.5)
            .into_iter()
            .map(round_half_even)
            .collect();
        assert_eq!(&r[..4], &[1000.0, 938.0, 875.0, 812.0]);
        assert_eq!(r.len(), 16);
    }

    #[test]
    fn linspace_hits_both_ends() {
        let v = np_linspace(0.0, 999.0, 7);
        assert_eq!((v[0], v[6]), (0.0, 999.0));
        let b = torch_linspace_f32(0.1, 0.2, 5);
        assert_eq!((b[0], b[4]), (0.1f32, 0.2f32));
    }

    #[test]
    fn rounding_is_half_to_even() {
        assert_eq!(round_half_even(62.5), 62.0);
        assert_eq!(round_half_even(937.5), 938.0);
        assert_eq!(round_half_even(-0.5), -0.0);
    }

    #[test]
    fn sigma_to_t_inverts_interpolation() {
        let sig: Vec<f32> = (1..=10).map(|i| i as f32).collect();
        let logs: Vec<f32> = sig.iter().map(|s| s.ln()).collect();
        assert!((sigma_to_t(3.0, &logs) - 2.0).abs() < 1e-6);
        assert_eq!(sigma_to_t(100.0, &logs), 9.0);
        assert_eq!(sigma_to_t(0.01, &logs), 0.0);
    }
}
