//! Shared test helpers: fixture loading, the stand-in model and error metrics.
#![allow(dead_code)]

use std::path::PathBuf;

use burn::backend::Flex;
use burn::tensor::{Int, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

pub type B = Flex;

pub fn fixture_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

pub fn read_json(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture_path(name)).expect("fixture json");
    serde_json::from_str(&text).expect("valid fixture json")
}

/// A safetensors fixture file held in memory.
pub struct Fixture {
    bytes: Vec<u8>,
}

impl Fixture {
    pub fn open(name: &str) -> Self {
        Self {
            bytes: std::fs::read(fixture_path(name)).expect("fixture safetensors"),
        }
    }

    fn view(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("valid safetensors")
    }

    pub fn has(&self, name: &str) -> bool {
        self.view().names().contains(&name)
    }

    /// f32 values and shape of tensor `name`.
    pub fn f32(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        let st = self.view();
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("fixture tensor {name}"));
        assert_eq!(t.dtype(), Dtype::F32, "{name}");
        let v = t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        (v, t.shape().to_vec())
    }

    pub fn i64(&self, name: &str) -> Vec<i64> {
        let st = self.view();
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("fixture tensor {name}"));
        assert_eq!(t.dtype(), Dtype::I64, "{name}");
        t.data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    }

    pub fn tensor<const D: usize>(&self, name: &str) -> Tensor<B, D> {
        let (v, shape) = self.f32(name);
        Tensor::from_data(TensorData::new(v, shape), &Default::default())
    }

    /// Tensor `name` of shape `[k, ...rest]` split into `k` tensors of rank 4.
    pub fn stack4(&self, name: &str) -> Vec<Tensor<B, 4>> {
        let (v, shape) = self.f32(name);
        assert_eq!(shape.len(), 5, "{name} should be a stack of rank-4 tensors");
        let inner: usize = shape[1..].iter().product();
        let dims = [shape[1], shape[2], shape[3], shape[4]];
        v.chunks_exact(inner)
            .map(|c| Tensor::from_data(TensorData::new(c.to_vec(), dims), &Default::default()))
            .collect()
    }

    pub fn int_tensor(&self, name: &str) -> Tensor<B, 1, Int> {
        let v = self.i64(name);
        let n = v.len();
        Tensor::from_data(TensorData::new(v, [n]), &Default::default())
    }
}

/// The deterministic stand-in for a UNet used by `xtask/fixtures/sd_sched.py`:
/// `x·0.1·cos(t/1000) + 0.05·sin(x + t/500)`, with the same f32 roundings.
pub fn stand_in_model(x: Tensor<B, 4>, t: f32) -> Tensor<B, 4> {
    let tf = t as f64;
    let a = 0.1 * (tf / 1000.0).cos();
    x.clone().mul_scalar(a as f32) + x.add_scalar((tf / 500.0) as f32).sin().mul_scalar(0.05f32)
}

pub fn to_vec<const D: usize>(t: Tensor<B, D>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().expect("f32 tensor")
}

/// `max |a − b| / max |b|`: the error relative to the reference's scale.
pub fn rel_err(actual: &[f32], expected: &[f32]) -> f64 {
    assert_eq!(actual.len(), expected.len());
    let scale = expected
        .iter()
        .fold(0f64, |m, v| m.max((*v as f64).abs()))
        .max(1e-30);
    let diff = actual
        .iter()
        .zip(expected)
        .fold(0f64, |m, (a, b)| m.max((*a as f64 - *b as f64).abs()));
    if actual.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    diff / scale
}

/// Elementwise `|a − b| <= tol·|b|` (for 1-D schedule arrays).
pub fn assert_close_each(actual: &[f32], expected: &[f32], tol: f64, what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length");
    for (i, (a, b)) in actual.iter().zip(expected).enumerate() {
        let (a, b) = (*a as f64, *b as f64);
        assert!(
            (a - b).abs() <= tol * b.abs(),
            "{what}[{i}]: got {a:e}, expected {b:e} (rel {:e})",
            (a - b).abs() / b.abs()
        );
    }
}
