//! Timestep embeddings (diffusers' `Timesteps` and `TimestepEmbedding`).

use burn::module::Module;
use burn::nn::LinearConfig;
use burn::tensor::activation::silu;
use burn::tensor::backend::Backend;
use burn::tensor::Tensor;
use lora_core::LoraLinear;

/// Sinusoidal embedding of (possibly fractional) timesteps `[B]` to `[B, dim]`.
///
/// Frequencies are `exp(-ln(10000) · i / (dim/2 - freq_shift))`; the halves are
/// `[sin, cos]`, or `[cos, sin]` with `flip_sin_to_cos`.
pub fn timestep_embedding<B: Backend>(timesteps: Tensor<B, 1>, dim: usize, flip_sin_to_cos: bool, freq_shift: f64) -> Tensor<B, 2> {
    let half = dim / 2;
    let device = timesteps.device();
    let [batch] = timesteps.dims();
    // The frequencies are computed on the host in f32, as diffusers does, so every backend
    // uses bit-identical values.
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((-(10000f64.ln()) as f32 * i as f32) / (half as f32 - freq_shift as f32)).exp())
        .collect();
    let freqs = Tensor::<B, 1>::from_floats(freqs.as_slice(), &device).reshape([1, half]);
    let args = timesteps.reshape([batch, 1]) * freqs;
    let (sin, cos) = (args.clone().sin(), args.cos());
    if flip_sin_to_cos {
        Tensor::cat(vec![cos, sin], 1)
    } else {
        Tensor::cat(vec![sin, cos], 1)
    }
}

/// The time MLP: `linear_2(silu(linear_1(t)))`.
#[derive(Module, Debug)]
pub struct TimestepEmbedding<B: Backend> {
    /// First layer.
    pub linear_1: LoraLinear<B>,
    /// Second layer.
    pub linear_2: LoraLinear<B>,
}

impl<B: Backend> TimestepEmbedding<B> {
    /// `d_in → d_out → d_out`.
    pub fn new(d_in: usize, d_out: usize, device: &B::Device) -> Self {
        Self {
            linear_1: LoraLinear::new(LinearConfig::new(d_in, d_out).init(device)),
            linear_2: LoraLinear::new(LinearConfig::new(d_out, d_out).init(device)),
        }
    }

    /// `[B, d_in] → [B, d_out]`.
    pub fn forward(&self, t: Tensor<B, 2>) -> Tensor<B, 2> {
        self.linear_2.forward(silu(self.linear_1.forward(t)))
    }
}
