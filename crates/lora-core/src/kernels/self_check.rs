//! A quick check, at start, of the routes whose numbers no device run has compared with a
//! reference yet: cuBLAS's products and the fused softmax. An application that turns them
//! on by default (the `trainer` binary does, on CUDA) runs [`check_routes`] once after
//! applying its [`super::KernelSettings`] and turns off a route that disagrees with the
//! CPU, rather than training on wrong numbers.
//!
//! Each check is a handful of problems of a few thousand elements (milliseconds, plus the
//! kernels' first compilation), computed on the device through the route and on the CPU
//! (burn's Flex backend) from the very same values.

use burn::backend::Flex;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Distribution, Tensor, TensorData};

use super::{cublas_min_flops, matmul, matmul_transposed, scaled_softmax, set_cublas_min_gflop, vendor_stats};
use crate::precision::cast_to;

/// A route [`check_routes`] checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// Matmuls in cuBLAS ([`super::set_cublas`]).
    Cublas,
    /// Attention's softmax in one kernel ([`super::set_fused_softmax`]).
    FusedSoftmax,
}

impl Route {
    /// Turns the route's switch off (its work goes back to burn's ops).
    pub fn turn_off(self) {
        match self {
            Route::Cublas => super::set_cublas(false),
            Route::FusedSoftmax => super::set_fused_softmax(false),
        }
    }
}

impl std::fmt::Display for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Route::Cublas => "cuBLAS matmuls",
            Route::FusedSoftmax => "fused softmax",
        })
    }
}

/// The outcome of one route's check ([`check_routes`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RouteCheck {
    /// The route checked.
    pub route: Route,
    /// The largest error over the route's problems, relative to each reference's largest
    /// magnitude; `Err` says why the route took none of them (a missing library, another
    /// backend): it then falls back to burn's ops anyway.
    pub result: Result<f32, String>,
    /// The largest error accepted.
    pub tolerance: f32,
}

impl RouteCheck {
    /// Whether the route ran and agreed with the CPU within [`RouteCheck::tolerance`].
    pub fn passed(&self) -> bool {
        matches!(self.result, Ok(err) if err < self.tolerance)
    }

    /// Whether the route ran and disagreed with the CPU: the caller should turn it off.
    pub fn failed(&self) -> bool {
        matches!(self.result, Ok(err) if err.is_nan() || err >= self.tolerance)
    }
}

/// Checks each route of cuBLAS ([`super::set_cublas`]) and the fused softmax
/// ([`super::set_fused_softmax`]) that is on, on `device`, against the same math on the CPU:
/// products in f32 and bf16, plain, with transposed and narrowed operands, with the op's own
/// transpositions and batched (cuBLAS takes every size during the check; the threshold of
/// [`set_cublas_min_gflop`] is restored after), and softmaxes from and to f32 and bf16 over
/// 77 and 300 keys. Routes that are off are not checked; nothing is switched. On backends
/// the routes do not act on, the check reports that they took nothing.
///
/// ```
/// use burn::backend::Flex;
/// use lora_core::kernels::{check_routes, set_cublas};
///
/// set_cublas(true);
/// let checks = check_routes::<Flex>(&Default::default());
/// set_cublas(false);
/// // cuBLAS acts on CUDA only: on the CPU it takes none of the products.
/// assert_eq!(checks.len(), 1);
/// assert!(checks[0].result.is_err() && !checks[0].failed());
/// ```
pub fn check_routes<B: Backend>(device: &B::Device) -> Vec<RouteCheck> {
    let mut checks = Vec::new();
    if super::cublas_enabled() {
        checks.push(check_cublas::<B>(device));
    }
    if super::fused_softmax_enabled() {
        checks.push(check_fused_softmax::<B>(device));
    }
    checks
}

/// Largest |a − b| over the largest |b|, both read back to the host as f32.
fn relative_error(ours: TensorData, reference: TensorData) -> Result<f32, String> {
    let ours = ours.convert::<f32>().into_vec::<f32>().map_err(|e| format!("reading a result: {e:?}"))?;
    let reference = reference.convert::<f32>().into_vec::<f32>().map_err(|e| format!("reading a reference: {e:?}"))?;
    if ours.len() != reference.len() {
        return Err(format!("{} values against {} in the reference", ours.len(), reference.len()));
    }
    let scale = reference.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
    let mut diff = 0f32;
    for (a, b) in ours.iter().zip(&reference) {
        let d = (a - b).abs();
        // `max` would skip a NaN.
        if d.is_nan() {
            return Ok(f32::NAN);
        }
        diff = diff.max(d);
    }
    Ok(diff / scale)
}

/// The larger of two errors, NaN if either is (`f32::max` would drop it).
fn worse(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else {
        a.max(b)
    }
}

/// A route's result from its problems' errors: the worst error, or why a problem could not
/// be compared, or `not_taken` when the route ran none of them (`took` false).
fn outcome(errors: Vec<Result<f32, String>>, took: bool, not_taken: &str) -> Result<f32, String> {
    let worst = errors.into_iter().try_fold(0f32, |worst, err| err.map(|err| worse(worst, err)))?;
    if took {
        Ok(worst)
    } else {
        Err(not_taken.to_string())
    }
}

/// `t` on the CPU in f32, from the values `t` holds (half-precision values widen exactly).
fn on_cpu<B: Backend, const D: usize>(t: &Tensor<B, D>) -> Tensor<Flex, D> {
    Tensor::from_data(cast_to(t.clone(), DType::F32).into_data(), &Default::default())
}

/// The half precision the checks use on `device`: bf16, the training default, or f16 where
/// the device has no bf16 arithmetic (wgpu); `None` where it has neither.
fn half_dtype<B: Backend>(device: &B::Device) -> Option<DType> {
    [DType::BF16, DType::F16].into_iter().find(|&dtype| B::supports_dtype(device, dtype))
}

fn check_cublas<B: Backend>(device: &B::Device) -> RouteCheck {
    // TF32 in f32 (~1e-3), bf16 outputs (~4e-3) with f32 accumulation.
    let tolerance = 2e-2;
    let threshold = cublas_min_flops();
    set_cublas_min_gflop(0.0);
    let before = vendor_stats().cublas_calls;
    let mut errors = Vec::new();
    for dtype in std::iter::once(DType::F32).chain(half_dtype::<B>(device)) {
        let rand = |shape: [usize; 3]| cast_to(Tensor::<B, 3>::random(shape, Distribution::Normal(0.0, 1.0), device), dtype);
        // (a, b, transpose a in the op, transpose b in the op)
        let cases = [
            (rand([3, 64, 40]), rand([3, 40, 96]), false, false),
            (rand([3, 64, 40]), rand([3, 96, 40]).swap_dims(1, 2), false, false),
            (rand([3, 40, 64]).swap_dims(1, 2), rand([3, 40, 96]), false, false),
            (rand([3, 80, 40]).narrow(1, 16, 64), rand([3, 40, 96]), false, false),
            (rand([3, 40, 64]), rand([3, 96, 40]), true, true),
            (rand([1, 77, 48]), rand([1, 48, 320]), false, false),
        ];
        for (a, b, ta, tb) in cases {
            let reference = {
                let (a, b) = (on_cpu(&a), on_cpu(&b));
                let a = if ta { a.swap_dims(1, 2) } else { a };
                let b = if tb { b.swap_dims(1, 2) } else { b };
                a.matmul(b).into_data()
            };
            let ours = if ta || tb { matmul_transposed(a, b, ta, tb) } else { matmul(a, b) };
            errors.push(relative_error(ours.into_data(), reference));
        }
    }
    set_cublas_min_gflop(threshold / 1e9);
    let took = vendor_stats().cublas_calls > before;
    let result = outcome(errors, took, "cuBLAS took none of the products (not on CUDA, or the library is missing)");
    RouteCheck { route: Route::Cublas, result, tolerance }
}

fn check_fused_softmax<B: Backend>(device: &B::Device) -> RouteCheck {
    // bf16 outputs round to ~4e-3 of the largest probability (f16's to ~5e-4).
    let tolerance = 1e-2;
    let before = vendor_stats().fused_softmax_calls;
    let mut errors = Vec::new();
    for shape in [[2, 3, 5, 77], [1, 2, 4, 300]] {
        let x = Tensor::<B, 4>::random(shape, Distribution::Normal(0.0, 4.0), device);
        let mut pairs = vec![(DType::F32, DType::F32)];
        if let Some(half) = half_dtype::<B>(device) {
            pairs.extend([(half, half), (DType::F32, half), (half, DType::F32)]);
        }
        for (input, output) in pairs {
            let x = cast_to(x.clone(), input);
            let reference = burn::tensor::activation::softmax(on_cpu(&x).mul_scalar(0.158), 3).into_data();
            errors.push(relative_error(scaled_softmax(x, 0.158, output).into_data(), reference));
        }
    }
    let took = vendor_stats().fused_softmax_calls > before;
    let result = outcome(errors, took, "the fused softmax took none of the problems (not on CUDA)");
    RouteCheck { route: Route::FusedSoftmax, result, tolerance }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_the_cpu_the_routes_take_nothing_and_the_threshold_is_restored() {
        let _guard = super::super::tests::SWITCH.lock().unwrap_or_else(|e| e.into_inner());
        assert!(check_routes::<Flex>(&Default::default()).is_empty(), "no route on, nothing checked");
        super::super::set_cublas(true);
        super::super::set_fused_softmax(true);
        set_cublas_min_gflop(3.0);
        let checks = check_routes::<Flex>(&Default::default());
        super::super::set_cublas(false);
        super::super::set_fused_softmax(false);
        assert_eq!(cublas_min_flops(), 3e9, "the threshold is restored");
        set_cublas_min_gflop(4.0);
        assert_eq!(checks.iter().map(|c| c.route).collect::<Vec<_>>(), [Route::Cublas, Route::FusedSoftmax]);
        for check in &checks {
            assert!(check.result.is_err() && !check.passed() && !check.failed(), "{check:?}");
        }
    }

    #[test]
    fn errors_are_relative_to_the_reference_and_nan_fails() {
        let _guard = super::super::tests::SWITCH.lock().unwrap_or_else(|e| e.into_inner());
        let data = |v: Vec<f32>| TensorData::new(v, [2]);
        assert_eq!(relative_error(data(vec![1.0, 2.0]), data(vec![1.0, 4.0])).unwrap(), 0.5);
        assert!(relative_error(data(vec![f32::NAN, 2.0]), data(vec![1.0, 2.0])).unwrap().is_nan());
        let nan = RouteCheck { route: Route::Cublas, result: Ok(f32::NAN), tolerance: 0.1 };
        assert!(nan.failed() && !nan.passed());
        let ok = RouteCheck { route: Route::Cublas, result: Ok(0.01), tolerance: 0.1 };
        assert!(ok.passed() && !ok.failed());
        super::super::set_fused_softmax(true);
        Route::FusedSoftmax.turn_off();
        assert!(!super::super::fused_softmax_enabled());
        assert!(relative_error(data(vec![1.0, 2.0]), TensorData::new(vec![1f32], [1])).is_err());
        assert!(worse(worse(0.1, f32::NAN), 0.2).is_nan(), "a NaN error stays NaN");
        assert_eq!(worse(0.1, 0.2), 0.2);
    }
}
