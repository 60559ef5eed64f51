//! Multi-head scaled dot-product attention shared by the text encoder, the VAE and the UNet.

use burn::tensor::backend::Backend;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::Tensor;

/// `softmax(q kᵀ / sqrt(d)) v` over `heads` heads, for `[batch, seq, heads·d]` inputs.
///
/// Goes through burn's `attention` op so that backends with a fused kernel use it; the
/// others fall back to the plain formulation. `causal` masks keys after each query.
pub fn multi_head_attention<B: Backend>(
    q: Tensor<B, 3>,
    k: Tensor<B, 3>,
    v: Tensor<B, 3>,
    heads: usize,
    causal: bool,
) -> Tensor<B, 3> {
    let [batch, seq_q, width] = q.dims();
    let seq_k = k.dims()[1];
    let head_dim = width / heads;
    let split = |t: Tensor<B, 3>, seq: usize| t.reshape([batch, seq, heads, head_dim]).swap_dims(1, 2);
    let options = AttentionModuleOptions {
        scale: None,
        softcap: None,
        is_causal: causal,
    };
    let out = attention(split(q, seq_q), split(k, seq_k), split(v, seq_k), None, None, options);
    out.swap_dims(1, 2).reshape([batch, seq_q, width])
}
