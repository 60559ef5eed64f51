//! A singular value decomposition that is right on every input.
//!
//! nalgebra's SVD (0.34) can return wrong singular values when the vectors are asked for,
//! with orthonormal vectors that do not recompose the matrix (dimforge/nalgebra#1172,
//! #1072; seen here on a rank-2 16x16 LoRA update, 4.5% off). So the thin SVD is taken
//! here: a Householder QR (nalgebra's, which is sound) reduces the matrix to its square
//! `R`, and a one-sided Jacobi SVD (Hestenes) of `R`, which rotates pairs of columns until
//! all are orthogonal, gives the rest. Jacobi is slower than bidiagonalisation on large
//! matrices but accurate to rounding on any matrix, rank-deficient ones included.

use nalgebra::DMatrix;

/// The thin SVD `a = U diag(s) Vᵀ` of an `m x n` matrix: `U` is `[m, p]`, `s` has `p`
/// values in descending order and `Vᵀ` is `[p, n]`, with `p = min(m, n)`. The singular
/// vectors of zero singular values on the longer side (`U`'s columns for `m ≥ n`, `Vᵀ`'s
/// rows otherwise) are zero: they multiply nothing.
pub(crate) struct Svd {
    pub u: DMatrix<f64>,
    pub s: Vec<f64>,
    pub vt: DMatrix<f64>,
}

/// Sweeps after which [`svd`] stops even if some pair is not yet orthogonal to rounding
/// (Jacobi converges quadratically; 10-15 sweeps are typical).
const MAX_SWEEPS: usize = 60;

/// The thin SVD of `a` (see [`Svd`]).
pub(crate) fn svd(a: DMatrix<f64>) -> Svd {
    let (m, n) = a.shape();
    if m < n {
        // a = (aᵀ)ᵀ = (U S Vᵀ)ᵀ = V S Uᵀ.
        let t = svd(a.transpose());
        return Svd { u: t.vt.transpose(), s: t.s, vt: t.u.transpose() };
    }
    if n == 0 {
        return Svd { u: DMatrix::zeros(m, 0), s: vec![], vt: DMatrix::zeros(0, 0) };
    }
    // a = Q R with Q [m, n]: the rotations then work on n x n instead of m x n.
    let (q, r) = if m > n {
        let qr = a.qr();
        (Some(qr.q()), qr.r())
    } else {
        (None, a)
    };
    let (w, v) = jacobi(r);
    let s: Vec<f64> = w.column_iter().map(|c| c.norm()).collect();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| s[j].total_cmp(&s[i]));
    let u_small = DMatrix::from_fn(n, n, |row, c| {
        let j = order[c];
        if s[j] > 0.0 {
            w[(row, j)] / s[j]
        } else {
            0.0
        }
    });
    let u = match q {
        Some(q) => q * u_small,
        None => u_small,
    };
    let vt = DMatrix::from_fn(n, n, |row, c| v[(c, order[row])]);
    Svd { u, s: order.iter().map(|&j| s[j]).collect(), vt }
}

/// One-sided Jacobi on a square matrix: returns `W = a V` with orthogonal columns and the
/// accumulated rotation `V`.
fn jacobi(mut w: DMatrix<f64>) -> (DMatrix<f64>, DMatrix<f64>) {
    let n = w.ncols();
    let mut v = DMatrix::<f64>::identity(n, n);
    for _ in 0..MAX_SWEEPS {
        let mut rotated = false;
        for i in 0..n {
            for j in i + 1..n {
                let (alpha, beta, gamma) = {
                    let (ci, cj) = (w.column(i), w.column(j));
                    (ci.norm_squared(), cj.norm_squared(), ci.dot(&cj))
                };
                // Orthogonal to rounding (or a zero column): nothing to rotate.
                if gamma == 0.0 || gamma.abs() <= f64::EPSILON * (alpha * beta).sqrt() {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                rotate(&mut w, i, j, c, s);
                rotate(&mut v, i, j, c, s);
            }
        }
        if !rotated {
            break;
        }
    }
    (w, v)
}

/// Columns `i`, `j` ← `(c·x_i − s·x_j, s·x_i + c·x_j)`.
fn rotate(m: &mut DMatrix<f64>, i: usize, j: usize, c: f64, s: f64) {
    for row in 0..m.nrows() {
        let (x, y) = (m[(row, i)], m[(row, j)]);
        m[(row, i)] = c * x - s * y;
        m[(row, j)] = s * x + c * y;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(a: &DMatrix<f64>, expected: Option<&[f64]>) {
        let d = svd(a.clone());
        let p = a.nrows().min(a.ncols());
        assert_eq!((d.u.shape(), d.s.len(), d.vt.shape()), ((a.nrows(), p), p, (p, a.ncols())));
        assert!(d.s.windows(2).all(|w| w[0] >= w[1]), "{:?}", d.s);
        let rebuilt = &d.u * DMatrix::from_diagonal(&nalgebra::DVector::from_column_slice(&d.s)) * &d.vt;
        let err = (rebuilt - a).norm() / a.norm().max(f64::MIN_POSITIVE);
        assert!(err < 1e-13, "recomposed off by {err}");
        if a.nrows() >= a.ncols() {
            let vvt = &d.vt * d.vt.transpose();
            assert!((vvt - DMatrix::<f64>::identity(p, p)).norm() < 1e-12);
        }
        if let Some(expected) = expected {
            for (got, want) in d.s.iter().zip(expected) {
                assert!((got - want).abs() < 1e-12 * expected[0], "{:?} vs {expected:?}", d.s);
            }
        }
    }

    /// The inputs on which nalgebra's SVD goes wrong (dimforge/nalgebra#1172, #1072).
    #[test]
    fn nalgebras_failures_decompose() {
        check(&DMatrix::from_element(3, 5, 1.0), Some(&[15f64.sqrt(), 0.0, 0.0]));
        check(&DMatrix::from_element(6, 21, 1.0), Some(&[126f64.sqrt()]));
        let full = DMatrix::from_row_slice(3, 3, &[1.0, 2.0, 2.0, 2.0, -1.0, -1.0, 2.0, 1.0, -1.0]);
        check(&full, None);
    }

    #[test]
    fn shapes_and_rank_deficiency() {
        let mut state = 12345u64;
        let mut next = || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        };
        for (m, n, r) in [(16, 16, 2), (40, 7, 7), (7, 40, 3), (1, 5, 1), (5, 1, 1), (30, 30, 30)] {
            let x = DMatrix::from_fn(m, r, |_, _| next());
            let y = DMatrix::from_fn(r, n, |_, _| next());
            check(&(x * y), None);
        }
        let zero = DMatrix::<f64>::zeros(4, 3);
        let d = svd(zero);
        assert!(d.s.iter().all(|&v| v == 0.0) && d.u.iter().all(|&v| v == 0.0));
    }
}
