//! Long prompts (kohya's `max_token_length`): `ClipTokenizer::encode_chunked` rows encoded by
//! `ClipTextModel::forward_chunked`.

use burn::backend::Flex;
use burn::tensor::{Distribution, Int, Tensor, TensorData};
use sd_model::tokenizer::ClipTokenizer;
use sd_model::{ClipTextConfig, ClipTextModel};

type B = Flex;

fn model() -> ClipTextModel<B> {
    use burn::tensor::backend::Backend;
    let device = Default::default();
    B::seed(&device, 7);
    ClipTextModel::new(&ClipTextConfig::tiny(), &device).unwrap()
}

fn ids(rows: &[Vec<u32>]) -> Tensor<B, 2, Int> {
    let flat: Vec<i32> = rows.iter().flatten().map(|&i| i as i32).collect();
    Tensor::from_data(TensorData::new(flat, [rows.len(), rows[0].len()]), &Default::default())
}

fn max_abs_diff(a: Tensor<B, 3>, b: Tensor<B, 3>) -> f32 {
    assert_eq!(a.dims(), b.dims());
    (a - b).abs().max().into_scalar()
}

/// The result is the first row's start state, each row's inner states and the last row's last
/// state, each row encoded on its own.
#[test]
fn forward_chunked_joins_separately_encoded_rows() {
    let model = model();
    let device = Default::default();
    let random = Tensor::<B, 2>::random([2, 3 * 77], Distribution::Uniform(0.0, 49407.0), &device).int();
    for clip_skip in [1, 2] {
        let joined = model.forward_chunked(random.clone(), 77, clip_skip).unwrap();
        assert_eq!(joined.dims(), [2, 3 * 75 + 2, 32]);
        for b in 0..2 {
            let rows: Vec<Tensor<B, 3>> = (0..3)
                .map(|k| model.forward(random.clone().slice([b..b + 1, k * 77..(k + 1) * 77]), clip_skip).unwrap())
                .collect();
            let mut parts = vec![rows[0].clone().slice([0..1, 0..1])];
            parts.extend(rows.iter().map(|r| r.clone().slice([0..1, 1..76])));
            parts.push(rows[2].clone().slice([0..1, 76..77]));
            let expected = Tensor::cat(parts, 1);
            let got = joined.clone().slice([b..b + 1, 0..227]);
            assert!(max_abs_diff(got, expected) < 1e-5, "batch item {b}, clip_skip {clip_skip}");
        }
    }
}

/// One row is the plain encoder; the causal mask makes a short prompt's states in a long
/// encoding the same as in the plain one, up to its padding.
#[test]
fn short_prompts_keep_their_states() {
    let model = model();
    let tokenizer = ClipTokenizer::bundled().unwrap();
    let prompt = "a watercolor painting of a lighthouse at dusk";
    let short = ids(&[tokenizer.encode(prompt).unwrap()]);
    let plain = model.forward(short.clone(), 1).unwrap();
    assert_eq!(max_abs_diff(model.forward_chunked(short, 77, 1).unwrap(), plain.clone()), 0.0);
    let long = model.forward_chunked(ids(&[tokenizer.encode_chunked(prompt, 2).unwrap()]), 77, 1).unwrap();
    assert_eq!(long.dims(), [1, 152, 32]);
    assert!(max_abs_diff(long.slice([0..1, 0..76]), plain.slice([0..1, 0..76])) < 1e-6);
}

/// Rows of the wrong length are a typed error naming the input.
#[test]
fn ragged_rows_are_rejected() {
    let model = model();
    let device = Default::default();
    for (seq, chunk) in [(150, 77), (77, 2), (0, 77)] {
        let ids = Tensor::<B, 2, Int>::zeros([1, seq], &device);
        let err = model.forward_chunked(ids, chunk, 1).unwrap_err().to_string();
        assert!(err.contains("input_ids"), "{seq}/{chunk}: {err}");
    }
}
