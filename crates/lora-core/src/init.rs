//! Where a fresh adapter's initial weights come from.
//!
//! By default from burn's backend RNG (`B::seed`), which is global to the process and
//! draws different numbers on each backend. With [`LoraConfig::init_seed`] they come from
//! a ChaCha8 stream on the host, seeded for that adapter and uploaded: a seed then gives
//! the same initial adapter on the CPU, CUDA and wgpu, as kohya's sd-scripts (which
//! initialises its modules on the CPU) gives on any GPU, and an adapter's weights do not
//! depend on which other adapters were attached before it. [`adapter_seed`] derives one
//! adapter's seed from a run's seed and the adapter's module path.

use burn::module::Param;
use burn::tensor::{backend::Backend, Distribution, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::LoraConfig;

/// The seed of the adapter at `path` in a run seeded with `seed`, for
/// [`LoraConfig::with_init_seed`]: a 64-bit hash of the path (FNV-1a) mixed with the seed
/// (SplitMix64's finaliser), so neighbouring seeds and similar paths give unrelated
/// streams. The same on every platform and Rust version.
///
/// ```
/// use lora_core::adapter_seed;
/// let q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q";
/// assert_eq!(adapter_seed(42, q), adapter_seed(42, q));
/// assert_ne!(adapter_seed(42, q), adapter_seed(43, q));
/// assert_ne!(adapter_seed(42, q), adapter_seed(42, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k"));
/// ```
pub fn adapter_seed(seed: u64, path: &str) -> u64 {
    let mut z = seed ^ fnv1a(path);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a of a name: a stable 64-bit hash (std's hasher may change between releases).
pub(crate) fn fnv1a(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The distribution of one initial weight.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Draw {
    /// Uniform in `[-bound, bound]`.
    Uniform(f64),
    /// Normal with mean 0 and this standard deviation.
    Normal(f64),
}

impl Draw {
    /// PyTorch's default for a weight with `fan_in` inputs per output (Kaiming-uniform with
    /// `a = sqrt(5)`: bound `1 / sqrt(fan_in)`), which kohya, PEFT and LyCORIS use for
    /// `lora_down` / `lora_A` and LoKr's halves.
    pub(crate) fn kaiming(fan_in: usize) -> Self {
        Self::Uniform(1.0 / (fan_in.max(1) as f64).sqrt())
    }
}

/// The random source of one adapter's initial weights (see the module docs).
pub(crate) enum InitRng {
    /// burn's backend RNG.
    Backend,
    /// A host stream, seeded for the adapter.
    Host(Box<ChaCha8Rng>),
}

impl InitRng {
    /// The source `config` asks for.
    pub(crate) fn new(config: &LoraConfig) -> Self {
        match config.init_seed {
            Some(seed) => Self::Host(Box::new(ChaCha8Rng::seed_from_u64(seed))),
            None => Self::Backend,
        }
    }

    /// A parameter of `shape` drawn from `draw`.
    pub(crate) fn param<B: Backend, const D: usize>(&mut self, shape: [usize; D], draw: Draw, device: &B::Device) -> Param<Tensor<B, D>> {
        Param::from_tensor(self.tensor(shape, draw, device))
    }

    /// A tensor of `shape` drawn from `draw` (values in row-major order on the host).
    fn tensor<B: Backend, const D: usize>(&mut self, shape: [usize; D], draw: Draw, device: &B::Device) -> Tensor<B, D> {
        match self {
            Self::Backend => {
                let distribution = match draw {
                    Draw::Uniform(bound) => Distribution::Uniform(-bound, bound),
                    Draw::Normal(std) => Distribution::Normal(0.0, std),
                };
                Tensor::random(shape, distribution, device)
            }
            Self::Host(rng) => {
                let n = shape.iter().product();
                let values = match draw {
                    Draw::Uniform(bound) => (0..n).map(|_| ((2.0 * rng.random::<f64>() - 1.0) * bound) as f32).collect(),
                    Draw::Normal(std) => normals(rng, n).into_iter().map(|v| (v * std) as f32).collect(),
                };
                Tensor::from_data(TensorData::new(values, shape), device)
            }
        }
    }
}

/// A tensor of `shape` holding standard-normal values (f32) drawn on the host from a
/// ChaCha8 stream seeded with `seed` and uploaded: the same values on every backend, and
/// nothing drawn from burn's backend RNG.
///
/// ```
/// use burn::backend::Flex;
/// let device = Default::default();
/// let a = lora_core::seeded_normal::<Flex, 2>(5, [64, 32], &device);
/// assert_eq!(a.clone().into_data(), lora_core::seeded_normal::<Flex, 2>(5, [64, 32], &device).into_data());
/// let std = a.var(1).mean().into_scalar().sqrt();
/// assert!((std - 1.0).abs() < 0.05, "{std}");
/// ```
pub fn seeded_normal<B: Backend, const D: usize>(seed: u64, shape: [usize; D], device: &B::Device) -> Tensor<B, D> {
    InitRng::Host(Box::new(ChaCha8Rng::seed_from_u64(seed))).tensor(shape, Draw::Normal(1.0), device)
}

/// `n` standard-normal values (Box-Muller, two per pair of uniforms).
fn normals(rng: &mut ChaCha8Rng, n: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        // 1 − u lies in (0, 1]: the logarithm stays finite.
        let radius = (-2.0 * (1.0 - rng.random::<f64>()).ln()).sqrt();
        let angle = std::f64::consts::TAU * rng.random::<f64>();
        out.extend([radius * angle.cos(), radius * angle.sin()]);
    }
    out.truncate(n);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::Flex;

    fn values<const D: usize>(p: Param<Tensor<Flex, D>>) -> Vec<f32> {
        p.val().into_data().to_vec().unwrap()
    }

    #[test]
    fn host_draws_follow_their_distribution_and_seed() {
        let device = Default::default();
        let host = |seed| InitRng::new(&LoraConfig::new(4).with_init_seed(Some(seed)));
        let uniform = values(host(1).param::<Flex, 2>([64, 64], Draw::Uniform(0.25), &device));
        assert!(uniform.iter().all(|v| v.abs() <= 0.25));
        // Var of U(-b, b) is b²/3.
        let var = uniform.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>() / uniform.len() as f64;
        assert!((var - 0.0625 / 3.0).abs() < 0.002, "variance {var}");
        let normal = values(host(1).param::<Flex, 2>([64, 64], Draw::Normal(0.5), &device));
        let mean = normal.iter().map(|v| f64::from(*v)).sum::<f64>() / normal.len() as f64;
        let std = (normal.iter().map(|v| (f64::from(*v) - mean).powi(2)).sum::<f64>() / normal.len() as f64).sqrt();
        assert!(mean.abs() < 0.03 && (std - 0.5).abs() < 0.02, "mean {mean}, std {std}");
        assert_eq!(uniform, values(host(1).param::<Flex, 2>([64, 64], Draw::Uniform(0.25), &device)));
        assert_ne!(uniform, values(host(2).param::<Flex, 2>([64, 64], Draw::Uniform(0.25), &device)));
    }
}
