//! Explicit noise sources for the stochastic samplers and the training helpers.

use std::collections::VecDeque;

use burn::tensor::{backend::Backend, Tensor, TensorData};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{Result, SchedError};

/// Where a stochastic sampler (DDPM, DDIM with η > 0, Euler ancestral, DPM++ SDE) or a
/// training helper takes its standard-normal noise from.
///
/// Making the source explicit keeps runs reproducible and lets tests replay the exact
/// noise diffusers drew ([`TensorQueue`]). Any closure
/// `FnMut([usize; 4], &B::Device) -> Tensor<B, 4>` is a noise source too.
pub trait NoiseSource<B: Backend> {
    /// Returns a tensor of i.i.d. N(0, 1) samples of the given shape.
    fn sample(&mut self, shape: [usize; 4], device: &B::Device) -> Result<Tensor<B, 4>>;
}

impl<B: Backend, F> NoiseSource<B> for F
where
    F: FnMut([usize; 4], &B::Device) -> Tensor<B, 4>,
{
    fn sample(&mut self, shape: [usize; 4], device: &B::Device) -> Result<Tensor<B, 4>> {
        Ok(self(shape, device))
    }
}

/// Seeded N(0, 1) noise drawn on the host (ChaCha8 + Box-Muller) and uploaded.
///
/// The stream depends only on the seed, never on the backend or device, so a run on the
/// GPU draws the same noise as on the CPU.
///
/// ```
/// use burn::backend::Flex;
/// use burn::tensor::Tensor;
/// use sd_sched::{NoiseSource, SeededNoise};
///
/// let device = Default::default();
/// let a: Tensor<Flex, 4> = SeededNoise::new(7).sample([1, 4, 8, 8], &device).unwrap();
/// let b: Tensor<Flex, 4> = SeededNoise::new(7).sample([1, 4, 8, 8], &device).unwrap();
/// assert_eq!(a.into_data(), b.into_data());
/// ```
#[derive(Debug, Clone)]
pub struct SeededNoise {
    rng: ChaCha8Rng,
}

impl SeededNoise {
    /// A source seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            rng: ChaCha8Rng::seed_from_u64(seed),
        }
    }

    /// `n` standard-normal values on the host.
    pub fn normal_vec(&mut self, n: usize) -> Vec<f32> {
        let mut out = Vec::with_capacity(n + 1);
        while out.len() < n {
            // u1 in (0, 1] keeps the logarithm finite.
            let u1 = 1.0 - self.rng.random::<f64>();
            let u2 = self.rng.random::<f64>();
            let r = (-2.0 * u1.ln()).sqrt();
            let theta = 2.0 * std::f64::consts::PI * u2;
            out.push((r * theta.cos()) as f32);
            out.push((r * theta.sin()) as f32);
        }
        out.truncate(n);
        out
    }

    /// The underlying generator, for other seeded draws that must share the stream.
    pub fn rng(&mut self) -> &mut ChaCha8Rng {
        &mut self.rng
    }

    /// One draw uniform in `[0, 1)` from the same stream.
    ///
    /// ```
    /// let mut noise = sd_sched::SeededNoise::new(3);
    /// let u = noise.uniform();
    /// assert!((0.0..1.0).contains(&u));
    /// assert_eq!(u, sd_sched::SeededNoise::new(3).uniform());
    /// ```
    pub fn uniform(&mut self) -> f64 {
        use rand::Rng;
        self.rng.random()
    }

    /// Where the stream stands, to save with a training checkpoint.
    pub fn state(&self) -> RngState {
        RngState::of(&self.rng)
    }

    /// A source that continues exactly where `state` was taken.
    pub fn from_state(state: &RngState) -> Self {
        Self { rng: state.restore() }
    }
}

/// The position of a seeded ChaCha8 stream: restoring it continues the stream draw for
/// draw, which is what makes resumed training bit-identical to an uninterrupted run.
///
/// ```
/// use sd_sched::SeededNoise;
///
/// let mut a = SeededNoise::new(3);
/// a.normal_vec(5);
/// let mut b = SeededNoise::from_state(&a.state());
/// assert_eq!(a.normal_vec(7), b.normal_vec(7));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RngState {
    /// The 256-bit key the stream was seeded with.
    pub seed: [u8; 32],
    /// The stream id.
    pub stream: u64,
    /// 32-bit words consumed so far.
    pub word_pos: u128,
}

impl RngState {
    pub(crate) fn of(rng: &ChaCha8Rng) -> Self {
        Self {
            seed: rng.get_seed(),
            stream: rng.get_stream(),
            word_pos: rng.get_word_pos(),
        }
    }

    pub(crate) fn restore(&self) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::from_seed(self.seed);
        rng.set_stream(self.stream);
        rng.set_word_pos(self.word_pos);
        rng
    }
}

impl<B: Backend> NoiseSource<B> for SeededNoise {
    fn sample(&mut self, shape: [usize; 4], device: &B::Device) -> Result<Tensor<B, 4>> {
        let values = self.normal_vec(shape.iter().product());
        Ok(Tensor::from_data(TensorData::new(values, shape), device))
    }
}

/// Replays pre-recorded noise tensors in order; asking for more, or for another shape,
/// is an error. Used to reproduce a reference run draw for draw.
#[derive(Debug, Clone)]
pub struct TensorQueue<B: Backend> {
    queue: VecDeque<Tensor<B, 4>>,
}

impl<B: Backend> TensorQueue<B> {
    /// A queue that hands out `tensors` front to back.
    pub fn new(tensors: impl IntoIterator<Item = Tensor<B, 4>>) -> Self {
        Self {
            queue: tensors.into_iter().collect(),
        }
    }

    /// Tensors not handed out yet.
    pub fn remaining(&self) -> usize {
        self.queue.len()
    }
}

impl<B: Backend> NoiseSource<B> for TensorQueue<B> {
    fn sample(&mut self, shape: [usize; 4], _device: &B::Device) -> Result<Tensor<B, 4>> {
        let next = self
            .queue
            .pop_front()
            .ok_or_else(|| SchedError::NoiseExhausted("the tensor queue is empty".into()))?;
        if next.dims() != shape {
            return Err(SchedError::NoiseExhausted(format!(
                "next queued tensor has shape {:?}, {shape:?} was requested",
                next.dims()
            )));
        }
        Ok(next)
    }
}

/// A source for deterministic samplers: any request is an error, which proves a
/// sampler configured as deterministic never draws noise.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoNoise;

impl<B: Backend> NoiseSource<B> for NoNoise {
    fn sample(&mut self, _shape: [usize; 4], _device: &B::Device) -> Result<Tensor<B, 4>> {
        Err(SchedError::NoiseExhausted(
            "NoNoise was asked for noise".into(),
        ))
    }
}
