//! Parity of `ClipTokenizer` with transformers' slow `CLIPTokenizer` (ftfy absent), using the ids
//! written by `xtask/fixtures/sd_model_tokenizer.py`, plus loading rules, errors and invariants.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use proptest::prelude::*;
use sd_model::tokenizer::{ClipTokenizer, TokenizerError, BOS_TOKEN_ID, EOS_TOKEN_ID};
use serde::Deserialize;
use serde_json::{json, Value};
use tempfile::TempDir;

#[derive(Deserialize)]
struct Fixture {
    max_length: usize,
    prompts: Vec<String>,
    sd1_unpadded: Vec<Vec<u32>>,
    sd1: Vec<Vec<u32>>,
    sd2: Vec<Vec<u32>>,
    added_prompts: Vec<String>,
    added: Vec<Vec<u32>>,
    random_prompts: Vec<String>,
    random_sd1: Vec<Vec<u32>>,
    random_sd2: Vec<Vec<u32>>,
}

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer")
}

fn fixture() -> Fixture {
    let path = fixtures_dir().join("ids.json");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("ids.json")
}

fn bundled() -> ClipTokenizer {
    ClipTokenizer::bundled().expect("bundled tokenizer")
}

fn assert_encodes(tokenizer: &ClipTokenizer, prompts: &[String], expected: &[Vec<u32>]) {
    assert_eq!(prompts.len(), expected.len());
    for (prompt, ids) in prompts.iter().zip(expected) {
        assert_eq!(&tokenizer.encode(prompt).unwrap(), ids, "prompt {prompt:?}");
    }
}

/// A tokenizer folder holding the bundled vocabulary files and one fixture's config files.
fn fixture_folder(configs: &str) -> TempDir {
    let dir = TempDir::new().unwrap();
    bundled().save_to_dir(dir.path()).unwrap();
    for name in ["tokenizer_config.json", "special_tokens_map.json"] {
        fs::remove_file(dir.path().join(name)).unwrap();
    }
    for entry in fs::read_dir(fixtures_dir().join(configs)).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    dir
}

/// Replaces a folder's vocab.json + merges.txt by an equivalent tokenizer.json.
fn convert_to_tokenizer_json(dir: &Path, merges_as_strings: bool) {
    let vocab: Value =
        serde_json::from_str(&fs::read_to_string(dir.join("vocab.json")).unwrap()).unwrap();
    let merges: Vec<Value> = fs::read_to_string(dir.join("merges.txt"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|line| {
            if merges_as_strings {
                json!(line)
            } else {
                let (a, b) = line.split_once(' ').unwrap();
                json!([a, b])
            }
        })
        .collect();
    let tokenizer = json!({
        "version": "1.0",
        "added_tokens": [
            {"id": 49406, "content": "<|startoftext|>", "special": true},
            {"id": 49407, "content": "<|endoftext|>", "special": true},
        ],
        "model": {
            "type": "BPE",
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "</w>",
            "vocab": vocab,
            "merges": merges,
        },
    });
    fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    fs::remove_file(dir.join("vocab.json")).unwrap();
    fs::remove_file(dir.join("merges.txt")).unwrap();
}

#[test]
fn bundled_bpe_matches_transformers() {
    let f = fixture();
    let tokenizer = bundled();
    for (prompt, ids) in f.prompts.iter().zip(&f.sd1_unpadded) {
        assert_eq!(
            &tokenizer.encode_unpadded(prompt).unwrap(),
            ids,
            "prompt {prompt:?}"
        );
    }
}

#[test]
fn bundled_matches_sd1_pipeline_ids() {
    let f = fixture();
    let tokenizer = bundled();
    assert_eq!(tokenizer.max_length(), f.max_length);
    assert_eq!(tokenizer.vocab_size(), 49408);
    assert_eq!(
        (
            tokenizer.bos_token_id(),
            tokenizer.eos_token_id(),
            tokenizer.pad_token_id()
        ),
        (BOS_TOKEN_ID, EOS_TOKEN_ID, EOS_TOKEN_ID)
    );
    assert_encodes(&tokenizer, &f.prompts, &f.sd1);
}

#[test]
fn bundled_with_pad_zero_matches_sd2_pipeline_ids() {
    let f = fixture();
    let tokenizer = bundled().with_pad_token_id(0).unwrap();
    assert_eq!(tokenizer.id_to_token(0).as_deref(), Some("!"));
    assert_encodes(&tokenizer, &f.prompts, &f.sd2);
}

#[test]
fn bundled_matches_transformers_on_random_prompts() {
    let f = fixture();
    let sd1 = bundled();
    assert_encodes(&sd1, &f.random_prompts, &f.random_sd1);
    let sd2 = sd1.with_pad_token_id(0).unwrap();
    assert_encodes(&sd2, &f.random_prompts, &f.random_sd2);
}

#[test]
fn sd1_folder_matches_transformers() {
    let f = fixture();
    let dir = fixture_folder("sd1");
    let tokenizer = ClipTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tokenizer.pad_token_id(), EOS_TOKEN_ID);
    assert_encodes(&tokenizer, &f.prompts, &f.sd1);
}

#[test]
fn sd2_folder_pads_with_its_pad_token() {
    let f = fixture();
    let dir = fixture_folder("sd2");
    let tokenizer = ClipTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tokenizer.pad_token_id(), 0);
    assert_encodes(&tokenizer, &f.prompts, &f.sd2);
}

#[test]
fn added_tokens_folder_matches_transformers() {
    let f = fixture();
    let dir = fixture_folder("added");
    let tokenizer = ClipTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(tokenizer.vocab_size(), 49409);
    assert_encodes(&tokenizer, &f.added_prompts, &f.added);
    assert_encodes(&tokenizer, &f.prompts, &f.sd1);
}

#[test]
fn tokenizer_json_folder_matches_vocab_merges_folder() {
    let f = fixture();
    for merges_as_strings in [false, true] {
        let dir = fixture_folder("sd2");
        convert_to_tokenizer_json(dir.path(), merges_as_strings);
        let tokenizer = ClipTokenizer::from_dir(dir.path()).unwrap();
        assert_encodes(&tokenizer, &f.prompts, &f.sd2);
    }
}

#[test]
fn save_to_dir_round_trips() {
    let f = fixture();
    let saved = TempDir::new().unwrap();
    bundled()
        .with_pad_token_id(0)
        .unwrap()
        .save_to_dir(saved.path())
        .unwrap();
    let reloaded = ClipTokenizer::from_dir(saved.path()).unwrap();
    assert_eq!(reloaded.pad_token_id(), 0);
    assert_encodes(&reloaded, &f.prompts, &f.sd2);

    let added = ClipTokenizer::from_dir(fixture_folder("added").path()).unwrap();
    let saved = TempDir::new().unwrap();
    added.save_to_dir(saved.path()).unwrap();
    assert!(saved.path().join("added_tokens.json").is_file());
    let reloaded = ClipTokenizer::from_dir(saved.path()).unwrap();
    assert_encodes(&reloaded, &f.added_prompts, &f.added);
}

#[test]
fn model_dir_tokenizer_overrides_bundled() {
    let model = TempDir::new().unwrap();
    let bare = ClipTokenizer::from_model_dir(model.path()).unwrap();
    assert_eq!(bare.pad_token_id(), EOS_TOKEN_ID);

    let sd2 = fixture_folder("sd2");
    let target = model.path().join("tokenizer");
    fs::create_dir(&target).unwrap();
    for entry in fs::read_dir(sd2.path()).unwrap() {
        let entry = entry.unwrap();
        fs::copy(entry.path(), target.join(entry.file_name())).unwrap();
    }
    let own = ClipTokenizer::from_model_dir(model.path()).unwrap();
    assert_eq!(own.pad_token_id(), 0);
}

#[test]
fn model_max_length_comes_from_the_config() {
    let dir = fixture_folder("sd1");
    let path = dir.path().join("tokenizer_config.json");
    let mut config: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    config["model_max_length"] = json!(8);
    fs::write(&path, config.to_string()).unwrap();
    let tokenizer = ClipTokenizer::from_dir(dir.path()).unwrap();
    let ids = tokenizer
        .encode("a photo of an astronaut riding a horse")
        .unwrap();
    // <|startoftext|> a photo of an astronaut riding <|endoftext|>
    assert_eq!(ids, [49406, 320, 1125, 539, 550, 18376, 6765, 49407]);
}

fn expect_error(dir: &Path) -> TokenizerError {
    match ClipTokenizer::from_dir(dir) {
        Ok(_) => panic!("{} should not load", dir.display()),
        Err(e) => e,
    }
}

#[test]
fn folder_without_tokenizer_files_is_rejected() {
    let dir = TempDir::new().unwrap();
    let err = expect_error(dir.path());
    assert!(
        matches!(&err, TokenizerError::MissingFiles { dir: d } if d == dir.path()),
        "{err}"
    );
}

#[test]
fn malformed_merges_line_names_file_and_line() {
    let dir = fixture_folder("sd1");
    let path = dir.path().join("merges.txt");
    let text = fs::read_to_string(&path)
        .unwrap()
        .replacen("i n\n", "i n x\n", 1);
    fs::write(&path, text).unwrap();
    let err = expect_error(dir.path());
    let message = err.to_string();
    assert!(
        matches!(&err, TokenizerError::Invalid { path: p, .. } if *p == path),
        "{message}"
    );
    assert!(message.contains("line 2"), "{message}");
}

#[test]
fn broken_vocab_json_names_the_file() {
    let dir = fixture_folder("sd1");
    let path = dir.path().join("vocab.json");
    fs::write(&path, "{\"a\": ").unwrap();
    let err = expect_error(dir.path());
    assert!(
        matches!(&err, TokenizerError::Json { path: p, .. } if *p == path),
        "{err}"
    );
}

#[test]
fn unknown_pad_token_names_file_and_key() {
    let dir = fixture_folder("sd2");
    let path = dir.path().join("special_tokens_map.json");
    let mut map: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    map["pad_token"] = json!("<|pad|>");
    fs::write(&path, map.to_string()).unwrap();
    let err = expect_error(dir.path());
    assert!(
        matches!(&err, TokenizerError::UnknownSpecialToken { path: p, key, token }
            if *p == path && key == "pad_token" && token == "<|pad|>"),
        "{err}"
    );
}

#[test]
fn unset_model_max_length_marker_is_rejected() {
    let dir = fixture_folder("sd1");
    let path = dir.path().join("tokenizer_config.json");
    let mut config: Value = serde_json::from_str(&fs::read_to_string(&path).unwrap()).unwrap();
    config["model_max_length"] = json!(1e30);
    fs::write(&path, config.to_string()).unwrap();
    let err = expect_error(dir.path());
    assert!(
        matches!(&err, TokenizerError::Invalid { path: p, .. } if *p == path),
        "{err}"
    );
    assert!(err.to_string().contains("model_max_length"), "{err}");
}

#[test]
fn non_bpe_tokenizer_json_is_rejected() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("tokenizer.json");
    fs::write(&path, r#"{"model": {"type": "WordPiece", "vocab": {}}}"#).unwrap();
    let err = expect_error(dir.path());
    assert!(
        matches!(&err, TokenizerError::Invalid { path: p, .. } if *p == path),
        "{err}"
    );
}

#[test]
fn pad_id_outside_vocabulary_is_rejected() {
    let err = bundled().with_pad_token_id(49408).unwrap_err();
    assert!(
        matches!(
            err,
            TokenizerError::PadIdOutOfRange {
                id: 49408,
                max_id: 49407
            }
        ),
        "{err}"
    );
}

/// A tokenizer with its own BPE model (and word cache), loaded once for the property tests.
fn second_tokenizer() -> &'static ClipTokenizer {
    static SECOND: OnceLock<(TempDir, ClipTokenizer)> = OnceLock::new();
    &SECOND
        .get_or_init(|| {
            let dir = fixture_folder("sd1");
            let tokenizer = ClipTokenizer::from_dir(dir.path()).unwrap();
            (dir, tokenizer)
        })
        .1
}

/// Prompts mixing ASCII, accents, CJK, emoji, control characters and special tokens.
fn prompt_strategy() -> impl Strategy<Value = String> {
    let atom = prop_oneof![
        "[a-zA-Z0-9 ,.!'():\\[\\]{}-]{1,12}",
        Just("<|endoftext|>".to_owned()),
        Just("<|startoftext|>".to_owned()),
        Just("\t\u{3000}\u{200B}\u{7}".to_owned()),
        "[éàüßΣ东京한🐱👍🏽]{1,4}",
    ];
    proptest::collection::vec(atom, 0..24).prop_map(|atoms| atoms.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// `encode` is `[bos] + first (max_length - 2) BPE ids + [eos]`, padded, for any prompt.
    #[test]
    fn encode_frames_truncates_and_pads(prompt in prompt_strategy(), pad in prop_oneof![Just(0u32), Just(EOS_TOKEN_ID)]) {
        let tokenizer = bundled().with_pad_token_id(pad).unwrap();
        let ids = tokenizer.encode(&prompt).unwrap();
        let body = tokenizer.encode_unpadded(&prompt).unwrap();
        let kept = body.len().min(tokenizer.max_length() - 2);
        prop_assert_eq!(ids.len(), tokenizer.max_length());
        prop_assert_eq!(ids[0], BOS_TOKEN_ID);
        prop_assert_eq!(&ids[1..=kept], &body[..kept]);
        prop_assert_eq!(ids[kept + 1], EOS_TOKEN_ID);
        prop_assert!(ids[kept + 2..].iter().all(|&id| id == pad));
        prop_assert!(ids.iter().all(|&id| (id as usize) < tokenizer.vocab_size()));
    }

    /// Same prompt, same ids: across calls, across tokenizers with their own word caches and in
    /// batches.
    #[test]
    fn encode_is_deterministic(prompts in proptest::collection::vec(prompt_strategy(), 1..4)) {
        let tokenizer = bundled();
        let fresh = second_tokenizer();
        let batch = tokenizer.encode_batch(&prompts).unwrap();
        for (prompt, ids) in prompts.iter().zip(&batch) {
            prop_assert_eq!(&fresh.encode(prompt).unwrap(), ids);
            prop_assert_eq!(&tokenizer.encode(prompt).unwrap(), ids);
        }
    }

    /// Whitespace runs and ASCII case do not matter (BERT cleanup + lower-casing).
    #[test]
    fn whitespace_and_case_are_normalised(prompt in "[a-z0-9 ,.!'():-]{0,80}") {
        let tokenizer = bundled();
        let ids = tokenizer.encode_unpadded(&prompt).unwrap();
        let spaced = prompt.replace(' ', " \t\u{3000} ");
        prop_assert_eq!(&tokenizer.encode_unpadded(&format!("\n {spaced} ")).unwrap(), &ids);
        prop_assert_eq!(&tokenizer.encode_unpadded(&prompt.to_ascii_uppercase()).unwrap(), &ids);
    }
}

/// A prompt of exactly `n` tokens, most of them distinct (so a shifted row shows).
fn prompt_of(tokenizer: &ClipTokenizer, n: usize) -> (String, Vec<u32>) {
    let words = ["red", "cat", "sitting", "on", "blue", "chair", "in", "garden", "girl", "sky", "tree", "house", "dog"];
    let prompt: Vec<&str> = (0..n).map(|i| words[i % words.len()]).collect();
    let prompt = prompt.join(" ");
    let ids = tokenizer.encode_unpadded(&prompt).unwrap();
    assert_eq!(ids.len(), n, "each word is one token");
    (prompt, ids)
}

fn row(words: &[u32], last: u32, fill: u32) -> Vec<u32> {
    let mut row = vec![BOS_TOKEN_ID];
    row.extend_from_slice(words);
    row.push(last);
    row.resize(77, fill);
    row
}

#[test]
fn encode_chunked_lays_out_long_prompts_as_kohya_does_for_sd1() {
    let tokenizer = bundled();
    let (prompt, w) = prompt_of(&tokenizer, 80);
    let ids = tokenizer.encode_chunked(&prompt, 2).unwrap();
    let mut row0 = row(&w[..75], EOS_TOKEN_ID, EOS_TOKEN_ID);
    assert_eq!(&ids[..77], &row0[..]);
    assert_eq!(&ids[77..], &row(&w[75..], EOS_TOKEN_ID, EOS_TOKEN_ID)[..]);
    // The first row is what `encode` gives; an empty row is start + end tokens.
    assert_eq!(tokenizer.encode(&prompt).unwrap(), row0);
    let ids = tokenizer.encode_chunked(&prompt, 3).unwrap();
    assert_eq!(ids.len(), 3 * 77);
    assert_eq!(&ids[154..], &row(&[], EOS_TOKEN_ID, EOS_TOKEN_ID)[..]);
    // Past chunks × 75 tokens the prompt is cut.
    let (long, w) = prompt_of(&tokenizer, 170);
    let ids = tokenizer.encode_chunked(&long, 2).unwrap();
    row0 = row(&w[..75], EOS_TOKEN_ID, EOS_TOKEN_ID);
    assert_eq!(&ids[..77], &row0[..]);
    assert_eq!(&ids[77..], &row(&w[75..150], EOS_TOKEN_ID, EOS_TOKEN_ID)[..]);
    assert_eq!(tokenizer.encode_chunked(&long, 1).unwrap(), tokenizer.encode(&long).unwrap());
}

#[test]
fn encode_chunked_ends_and_fills_rows_as_kohya_does_for_sd2() {
    let tokenizer = bundled().with_pad_token_id(0).unwrap();
    // A full first row ends with the end token, a partial one with its own end token + pads.
    let (prompt, w) = prompt_of(&tokenizer, 80);
    let ids = tokenizer.encode_chunked(&prompt, 2).unwrap();
    assert_eq!(&ids[..77], &row(&w[..75], EOS_TOKEN_ID, 0)[..]);
    assert_eq!(&ids[77..], &row(&w[75..], EOS_TOKEN_ID, 0)[..]);
    // A row without words is `<start> <end> <pad>...`, like an empty prompt.
    let (short, w) = prompt_of(&tokenizer, 10);
    let ids = tokenizer.encode_chunked(&short, 3).unwrap();
    assert_eq!(&ids[..77], &row(&w, EOS_TOKEN_ID, 0)[..]);
    assert_eq!(&ids[..77], &tokenizer.encode(&short).unwrap()[..]);
    for empty in [&ids[77..154], &ids[154..]] {
        assert_eq!(empty, &tokenizer.encode("").unwrap()[..]);
    }
    // Exactly two rows of words: both end with the end token, as a cut-off prompt does.
    for n in [150, 160] {
        let (long, w) = prompt_of(&tokenizer, n);
        let ids = tokenizer.encode_chunked(&long, 2).unwrap();
        assert_eq!(&ids[77..], &row(&w[75..150], EOS_TOKEN_ID, 0)[..], "{n} tokens");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Every row is framed like `encode`'s output, the rows hold the prompt's first
    /// `chunks × 75` ids in order (a row's first word is the end token where it is the pad
    /// token: kohya's rule for empty rows), and the first row is `encode`'s unless its last
    /// word is a pad or end token (kohya's rule then keeps a pad there).
    #[test]
    fn encode_chunked_rows_hold_the_prompt_in_order(
        prompt in prompt_strategy(),
        repeat in 1usize..12,
        chunks in 1usize..4,
        pad in prop_oneof![Just(0u32), Just(EOS_TOKEN_ID)],
    ) {
        let tokenizer = bundled().with_pad_token_id(pad).unwrap();
        let prompt = vec![prompt; repeat].join(" ");
        let words = tokenizer.encode_unpadded(&prompt).unwrap();
        let ids = tokenizer.encode_chunked(&prompt, chunks).unwrap();
        prop_assert_eq!(ids.len(), chunks * 77);
        let kept = words.len().min(chunks * 75);
        let mut inner = Vec::new();
        for r in ids.chunks(77) {
            prop_assert_eq!(r[0], BOS_TOKEN_ID);
            inner.extend_from_slice(&r[1..76]);
        }
        let mut expected = words[..kept].to_vec();
        // One row is `encode`'s framing, without kohya's row fix-ups.
        for first in expected.iter_mut().step_by(75).filter(|_| chunks > 1) {
            if *first == pad {
                *first = EOS_TOKEN_ID;
            }
        }
        prop_assert_eq!(&inner[..kept], &expected[..]);
        prop_assert!(inner[kept..].iter().all(|&id| id == pad || id == EOS_TOKEN_ID));
        let encoded = tokenizer.encode(&prompt).unwrap();
        let fixed_up_start = chunks > 1 && words.first() == Some(&pad);
        if !fixed_up_start && (words.len() < 75 || ![pad, EOS_TOKEN_ID].contains(&words[74])) {
            prop_assert_eq!(&ids[..77], &encoded[..]);
        }
    }
}
