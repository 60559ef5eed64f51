//! Helpers shared by the lora-core integration tests.
#![allow(dead_code)]

use std::collections::HashMap;

use burn::backend::Flex;
use burn::tensor::{Tensor, TensorData};
use lora_core::{HostTensor, LoraWeights};

pub type B = Flex;

/// A small deterministic generator (SplitMix64) so test data depends only on the seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.uniform()).collect()
    }

    pub fn host(&mut self, shape: &[usize]) -> HostTensor {
        let n = shape.iter().product();
        HostTensor::new(shape.to_vec(), self.vec(n)).unwrap()
    }

    pub fn tensor<const D: usize>(&mut self, shape: [usize; D]) -> Tensor<B, D> {
        let n = shape.iter().product();
        Tensor::from_data(TensorData::new(self.vec(n), shape), &Default::default())
    }
}

/// Random adapter weights: linear (`kernel = None`) or conv with the given kernel.
pub fn random_weights(rng: &mut Rng, d_in: usize, d_out: usize, rank: usize, kernel: Option<[usize; 2]>, alpha: f32) -> LoraWeights {
    let (down, up) = match kernel {
        None => (rng.host(&[rank, d_in]), rng.host(&[d_out, rank])),
        Some([kh, kw]) => (rng.host(&[rank, d_in, kh, kw]), rng.host(&[d_out, rank, 1, 1])),
    };
    LoraWeights::new(down, up, alpha, "test").unwrap()
}

/// `||a - b|| / max(||b||, tiny)`.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let diff: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
    let norm: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (diff / norm.max(1e-30)).sqrt()
}

pub fn values<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().convert::<f32>().to_vec::<f32>().unwrap()
}

/// Numerical rank of a row-major `rows x cols` matrix by Gaussian elimination with full
/// pivoting, counting pivots above `tol` relative to the largest entry.
pub fn numerical_rank(data: &[f32], rows: usize, cols: usize, tol: f64) -> usize {
    let mut m: Vec<f64> = data.iter().map(|v| *v as f64).collect();
    let max = m.iter().fold(0f64, |a, v| a.max(v.abs()));
    if max == 0.0 {
        return 0;
    }
    let mut rank = 0;
    let mut row_used = vec![false; rows];
    let mut col_used = vec![false; cols];
    loop {
        let mut best = (0.0, 0, 0);
        for r in (0..rows).filter(|r| !row_used[*r]) {
            for c in (0..cols).filter(|c| !col_used[*c]) {
                let v = m[r * cols + c].abs();
                if v > best.0 {
                    best = (v, r, c);
                }
            }
        }
        if best.0 <= tol * max {
            return rank;
        }
        let (_, pr, pc) = best;
        row_used[pr] = true;
        col_used[pc] = true;
        rank += 1;
        let pivot = m[pr * cols + pc];
        for r in (0..rows).filter(|r| !row_used[*r]) {
            let f = m[r * cols + pc] / pivot;
            for c in 0..cols {
                m[r * cols + c] -= f * m[pr * cols + c];
            }
        }
    }
}

/// The f32 tensors of `tests/fixtures/<name>` by key: (shape, values).
pub fn f32_fixture(name: &str) -> HashMap<String, (Vec<usize>, Vec<f32>)> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    let bytes = std::fs::read(&path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.tensors()
        .into_iter()
        .map(|(name, view)| {
            let values = view.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
            (name, (view.shape().to_vec(), values))
        })
        .collect()
}
