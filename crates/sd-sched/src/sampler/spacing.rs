//! Inference timestep spacings, as each diffusers scheduler computes them.

use crate::config::TimestepSpacing;
use crate::numerics::{np_arange, np_linspace, round_half_even};

/// `np.round(np.arange(T, 0, -T / n)) - 1`: the trailing spacing, descending, cut to `n`
/// values.
///
/// For some `n` (61, 103, 121, ... with T = 1000) numpy's float `arange` yields an extra
/// element just below 0, and diffusers then runs an extra step at timestep −1 (which
/// indexes ᾱ from the end). We stop at `n` steps instead; the first `n` are identical.
pub(crate) fn trailing(t: usize, n: usize) -> Vec<f64> {
    trailing_from(t, t, n)
}

/// [`trailing`] counting down from `start` (DPM-Solver's clipped last timestep) in
/// steps of `T / n`.
pub(crate) fn trailing_from(start: usize, t: usize, n: usize) -> Vec<f64> {
    np_arange(start as f64, 0.0, -(t as f64 / n as f64))
        .into_iter()
        .take(n)
        .map(|v| round_half_even(v) - 1.0)
        .collect()
}

/// `(arange(n) * (T // n)) + offset`, descending.
pub(crate) fn leading(t: usize, n: usize, offset: usize) -> Vec<f64> {
    let ratio = t / n;
    (0..n).rev().map(|i| (i * ratio + offset) as f64).collect()
}

/// The timesteps of DDPM, DDIM and the Euler samplers (descending). `round_linspace`
/// rounds the `linspace` points to integers (DDPM, DDIM) instead of keeping them
/// fractional (Euler).
pub(crate) fn standard(
    spacing: TimestepSpacing,
    t: usize,
    n: usize,
    offset: usize,
    round_linspace: bool,
) -> Vec<f64> {
    match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (t - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|v| {
                if round_linspace {
                    round_half_even(v)
                } else {
                    v as f32 as f64
                }
            })
            .collect(),
        TimestepSpacing::Leading => leading(t, n, offset),
        TimestepSpacing::Trailing => trailing(t, n),
    }
}
