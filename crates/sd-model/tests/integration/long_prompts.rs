//! Long prompts (kohya's `max_token_length`): `ClipTokenizer::encode_chunked` rows encoded by
//! `ClipTextModel::forward_chunked`; A1111 emphasis (`encode_weighted`, `apply_weights`).

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

/// Emphasis only weights: the ids are those of the prompt without brackets, the weights sit
/// on the emphasised tokens, `BREAK` starts a new row, and plain prompts are unchanged.
#[test]
fn weighted_prompts_keep_the_ids_and_place_the_weights() {
    use sd_model::tokenizer::{BOS_TOKEN_ID, EOS_TOKEN_ID};
    let tokenizer = ClipTokenizer::bundled().unwrap();
    for (prompt, rows) in [("a photo of a cat", 1), ("masterpiece, (best quality), a cat", 2), ("", 3)] {
        let plain = prompt.replace(['(', ')'], "");
        let (ids, weights) = tokenizer.encode_weighted(prompt, rows).unwrap();
        assert_eq!(ids, tokenizer.encode_chunked(&plain, rows).unwrap(), "{prompt}");
        assert_eq!(weights.len(), 75 * rows + 2);
        if prompt == plain {
            assert!(weights.iter().all(|w| *w == 1.0), "{prompt}");
        }
    }
    let (ids, weights) = tokenizer.encode_weighted("a ((red:1.5) car) [on] grass", 1).unwrap();
    assert_eq!(ids, tokenizer.encode("a red car on grass").unwrap());
    let expected = [1.0, 1.0, 1.5 * 1.1, 1.1, 1.0 / 1.1, 1.0, 1.0, 1.0];
    for (w, e) in weights.iter().zip(expected) {
        assert!((w - e).abs() < 1e-6, "{weights:?}");
    }
    // `BREAK` ends the row with an end token; the next words start the next row; on an
    // empty row it makes an empty row (A1111's empty chunk), at the end nothing.
    for (prompt, rows) in [("a BREAK b", 2), ("a BREAK BREAK b", 3), ("BREAK a", 2), ("a BREAK", 1), ("(a BREAK b)", 1)] {
        assert_eq!(tokenizer.weighted_words(prompt).unwrap().rows, rows, "{prompt}");
    }
    // Right after words filled a row, `BREAK` only closes it (A1111 closes a full chunk
    // when the next word comes); a second one then makes an empty row.
    let full = "a ".repeat(75);
    assert_eq!(tokenizer.weighted_words(&full).unwrap().ids.len(), 75);
    let (a, b) = (tokenizer.encode_unpadded("a").unwrap()[0], tokenizer.encode_unpadded("b").unwrap()[0]);
    let eos = tokenizer.eos_token_id();
    for (prompt, rows, second_row_starts) in [("BREAK b", 2, b), ("BREAK BREAK b", 3, eos), ("a BREAK b", 3, a)] {
        let words = tokenizer.weighted_words(&format!("{full}{prompt}")).unwrap();
        assert_eq!((words.rows, words.ids[75]), (rows, second_row_starts), "{prompt}");
    }
    // Weights past 1e30 (hundreds of nested brackets) are an error naming the prompt, not
    // infinite states and a black image.
    let deep = format!("{}x", "(".repeat(800));
    let err = tokenizer.weighted_words(&deep).unwrap_err();
    assert!(matches!(err, sd_model::tokenizer::TokenizerError::Emphasis { .. }) && err.to_string().contains("emphasis of \"x\""), "{err}");
    assert!(tokenizer.weighted_words(&format!("(x:{})", "9".repeat(40))).is_err());
    let (ids, _) = tokenizer.encode_weighted("a BREAK BREAK b", 3).unwrap();
    assert_eq!(&ids[77..80], &[BOS_TOKEN_ID, EOS_TOKEN_ID, EOS_TOKEN_ID]);
    assert_eq!(ids[155], tokenizer.encode_unpadded("b").unwrap()[0]);
    let (ids, weights) = tokenizer.encode_weighted("a cat BREAK (a dog)", 2).unwrap();
    let (cat, dog) = (tokenizer.encode_unpadded("a cat").unwrap(), tokenizer.encode_unpadded("a dog").unwrap());
    assert_eq!((ids[0], &ids[1..3], ids[3]), (BOS_TOKEN_ID, &cat[..], EOS_TOKEN_ID));
    assert_eq!((ids[77], &ids[78..80], ids[80]), (BOS_TOKEN_ID, &dog[..], EOS_TOKEN_ID));
    assert_eq!((weights[76], weights[77]), (1.1, 1.1), "row 2's words are states 76 and 77");
}

/// Weights scale their states and the prompt's mean state is restored; all-one weights
/// change nothing.
#[test]
fn apply_weights_scales_states_and_keeps_the_mean() {
    use sd_model::prompt::apply_weights;
    let device = Default::default();
    let hidden = Tensor::<B, 3>::random([2, 4, 8], Distribution::Uniform(0.5, 1.5), &device);
    let same = apply_weights(hidden.clone(), &[1.0; 8]).unwrap();
    assert!(apply_weights(hidden.clone(), &[1.0; 7]).is_err(), "one weight per state");
    assert_eq!(max_abs_diff(same, hidden.clone()), 0.0);
    let weights = [1.0, 1.5, 1.0, 1.0, 1.0, 1.0, 0.5, 1.0];
    let out = apply_weights(hidden.clone(), &weights).unwrap();
    let mean = |t: Tensor<B, 3>| t.mean_dim(2).mean_dim(1).into_data().to_vec::<f32>().unwrap();
    for (a, b) in mean(out.clone()).iter().zip(mean(hidden.clone())) {
        assert!((a - b).abs() < 1e-5, "{a} vs {b}");
    }
    // State 1 of prompt 0 relative to state 0: 1.5 times what it was.
    let ratio = |t: Tensor<B, 3>| {
        let v = t.slice([0..1, 0..2, 0..1]).into_data().to_vec::<f32>().unwrap();
        v[1] / v[0]
    };
    assert!((ratio(out) / ratio(hidden) - 1.5).abs() < 1e-5);
}

use proptest::prelude::*;

proptest::proptest! {
    #![proptest_config(proptest::test_runner::Config::with_cases(512))]

    /// Any prompt (emphasis brackets and weights, balanced or not, escapes, `BREAK`s,
    /// multi-byte text) encodes for any row count: `rows × 77` ids and
    /// `rows × 75 + 2` finite weights, never a panic.
    #[test]
    fn any_prompt_encodes_with_weights(
        pieces in proptest::collection::vec(proptest::prop_oneof![
            proptest::sample::select(vec!["(", ")", "[", "]", ":", ":1.5", ":-2", ":nan", ":1e40", "\\(", "\\", "BREAK", " BREAK ", "a", "red car", ",", "é", "日本", "🙂", " "]).prop_map(String::from),
            "\\PC{0,6}",
        ], 0..24),
        rows in 0usize..4,
    ) {
        let tokenizer = ClipTokenizer::bundled().unwrap();
        let prompt = pieces.concat();
        let (ids, weights) = tokenizer.encode_weighted(&prompt, rows).unwrap();
        let rows = rows.max(1);
        proptest::prop_assert_eq!(ids.len(), rows * 77);
        proptest::prop_assert_eq!(weights.len(), rows * 75 + 2);
        proptest::prop_assert!(weights.iter().all(|w| w.is_finite()), "{:?}: {:?}", prompt, weights);
    }
}
