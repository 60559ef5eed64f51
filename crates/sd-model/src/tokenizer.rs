//! The CLIP byte-level BPE tokenizer of Stable Diffusion's text encoders.
//!
//! [`ClipTokenizer`] reproduces, id for id, what diffusers' SD pipelines get from transformers'
//! slow `CLIPTokenizer` when the optional `ftfy` package is **not** installed (the default for a
//! plain `pip install diffusers transformers`):
//!
//! 1. the prompt is split on the tokenizer's special and added tokens (`<|startoftext|>`,
//!    `<|endoftext|>`, the pad token, textual-inversion tokens), matched verbatim;
//! 2. every other piece goes through BERT's basic cleanup: NUL, U+FFFD and control/format/
//!    unassigned characters (Unicode category `C*`) are dropped, whitespace becomes a space,
//!    CJK ideographs are surrounded by spaces, the text is NFC-normalised, split on whitespace and
//!    lower-cased word by word (no accent stripping, no punctuation splitting);
//! 3. CLIP's pre-tokenizer regex cuts words, contractions (`'s`, `'t`, ...), single digits and
//!    punctuation runs; each piece is mapped to GPT-2's printable byte alphabet and run through
//!    the BPE merges, with `</w>` marking the end of a word (the BPE model of the `tokenizers`
//!    crate);
//! 4. [`ClipTokenizer::encode`] keeps the first `max_length - 2` ids, wraps them in the start and
//!    end tokens and pads to `max_length` (77) with the pad token.
//!
//! The 48 894 merges of OpenAI's CLIP are embedded (gzip, 200 KiB) and the 49 408-entry
//! vocabulary is derived from them, so nothing is downloaded; a model folder's own `tokenizer/`
//! takes precedence through [`ClipTokenizer::from_dir`] / [`ClipTokenizer::from_model_dir`].
//! See `docs/tokenizer.md` for the differences from the ftfy code path.

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use serde_json::{Map, Value};
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::utils::SysRegex;
use tokenizers::Model;
use unicode_normalization::UnicodeNormalization;
use unicode_properties::{GeneralCategory, GeneralCategoryGroup, UnicodeGeneralCategory};

/// Number of ids [`ClipTokenizer::encode`] returns unless the tokenizer config says otherwise.
pub const DEFAULT_MAX_LENGTH: usize = 77;
/// The start-of-text token.
pub const BOS_TOKEN: &str = "<|startoftext|>";
/// The end-of-text token (also CLIP's unknown token and SD 1.x's pad token).
pub const EOS_TOKEN: &str = "<|endoftext|>";
/// Id of [`BOS_TOKEN`] in the CLIP vocabulary.
pub const BOS_TOKEN_ID: u32 = 49406;
/// Id of [`EOS_TOKEN`] in the CLIP vocabulary.
pub const EOS_TOKEN_ID: u32 = 49407;

/// Merges CLIP uses: lines `[1, 1 + 48894)` of open_clip's `bpe_simple_vocab_16e6.txt.gz`.
/// transformers' `CLIPTokenizer` applies the same cap to any `merges.txt` it reads.
const CLIP_MERGES: usize = 49152 - 256 - 2;
/// CLIP's merges in transformers' `merges.txt` layout, written by
/// `xtask/fixtures/sd_model_tokenizer.py` from the open-clip-torch wheel.
const BUNDLED_MERGES_GZ: &[u8] = include_bytes!("../assets/clip_merges.txt.gz");
const BUNDLED_NAME: &str = "<bundled assets/clip_merges.txt.gz>";
/// CLIP's pre-tokenizer. transformers compiles it with `re.IGNORECASE`; on lower-cased text
/// that only matters for U+0345, which [`normalize`] handles.
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
const END_OF_WORD: &str = "</w>";
/// Guards against nonsense `model_max_length` values (e.g. transformers' 1e30 "unset" marker).
const MAX_SUPPORTED_LENGTH: u64 = 1 << 16;

/// Errors from loading or using a [`ClipTokenizer`].
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A tokenizer file could not be read or written.
    #[error("cannot access {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A JSON tokenizer file is not valid JSON.
    #[error("{path} is not valid JSON: {source}")]
    Json {
        /// The file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
    /// A tokenizer file is readable but its content is not what a CLIP tokenizer needs.
    #[error("{path}: {message}")]
    Invalid {
        /// The file (or the bundled asset's name).
        path: PathBuf,
        /// What was found and what was expected.
        message: String,
    },
    /// The folder has neither `vocab.json` + `merges.txt` nor `tokenizer.json`.
    #[error("{dir} holds no tokenizer: expected vocab.json and merges.txt, or tokenizer.json")]
    MissingFiles {
        /// The folder that was searched.
        dir: PathBuf,
    },
    /// A special token named by a config file has no id.
    #[error("{path}: {key} {token:?} is neither in the vocabulary nor an added token")]
    UnknownSpecialToken {
        /// The config file that names the token (or the vocabulary, for built-in defaults).
        path: PathBuf,
        /// The config key, e.g. `pad_token`.
        key: String,
        /// The token text.
        token: String,
    },
    /// An id passed to [`ClipTokenizer::with_pad_token_id`] is not a token of this tokenizer.
    #[error("pad token id {id} is not a token of this tokenizer (largest id {max_id})")]
    PadIdOutOfRange {
        /// The requested id.
        id: u32,
        /// The largest id this tokenizer knows.
        max_id: u32,
    },
    /// A prompt's emphasis gives a piece a weight past what the weighted states can be
    /// computed with (brackets nested hundreds deep, `(x:1000…0)` with 40 digits): the
    /// states would be infinite or NaN, and the image black.
    #[error("prompt {prompt:?}: the emphasis of {piece:?} comes to {weight:e}, expected at most 1e30 in size (nest fewer brackets or write a smaller weight)")]
    Emphasis {
        /// The prompt.
        prompt: String,
        /// The piece of text with that weight.
        piece: String,
        /// Its weight.
        weight: f64,
    },
    /// The BPE model rejected the vocabulary or merges, or failed on a prompt.
    #[error("BPE model ({origin}): {message}")]
    Bpe {
        /// Where the vocabulary came from, or `encode` for a failure on a prompt.
        origin: String,
        /// The `tokenizers` error.
        message: String,
    },
}

/// Shorthand for results of this module.
pub type Result<T, E = TokenizerError> = std::result::Result<T, E>;

/// The CLIP tokenizer of Stable Diffusion (SD 1.x, SD 2.x and SDXL's two text encoders).
///
/// Cheap to share across threads (`Send + Sync`); encoding is deterministic.
///
/// ```
/// use sd_model::tokenizer::ClipTokenizer;
///
/// let tokenizer = ClipTokenizer::bundled()?;
/// let ids = tokenizer.encode("a photo of an astronaut riding a horse")?;
/// assert_eq!(ids.len(), 77);
/// assert_eq!(&ids[..3], &[49406, 320, 1125]); // <|startoftext|> "a</w>" "photo</w>"
/// assert_eq!(ids[76], tokenizer.pad_token_id());
///
/// // SD 2.x pads with "!" (id 0) instead of <|endoftext|>.
/// let sd2 = tokenizer.clone().with_pad_token_id(0)?;
/// assert_eq!(sd2.encode("a photo")?[76], 0);
/// # Ok::<(), sd_model::tokenizer::TokenizerError>(())
/// ```
#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    /// Shared so clones are cheap; the model's word cache is thread-safe and does not change
    /// results.
    bpe: Arc<BPE>,
    pattern: Arc<SysRegex>,
    byte_chars: [char; 256],
    /// Added tokens declared by the config files (textual-inversion tokens and the like).
    added: Vec<(String, u32)>,
    /// Tokens the raw prompt is split on before normalisation: `added` plus the specials.
    split_tokens: Vec<(String, u32)>,
    /// Ids of the regex's literal `<|startoftext|>` / `<|endoftext|>` alternatives, which can
    /// only arise from case variants such as `<|ENDOFTEXT|>` that lower-casing turns into them.
    literal_bos_id: u32,
    literal_eos_id: u32,
    specials: SpecialTokens,
    bos_id: u32,
    eos_id: u32,
    unk_id: u32,
    pad_id: u32,
    max_length: usize,
    max_id: u32,
}

/// The special tokens' text, as transformers resolves it from the config files.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SpecialTokens {
    bos: String,
    eos: String,
    unk: String,
    pad: String,
}

impl Default for SpecialTokens {
    /// `CLIPTokenizer.__init__`'s defaults.
    fn default() -> Self {
        Self {
            bos: BOS_TOKEN.to_owned(),
            eos: EOS_TOKEN.to_owned(),
            unk: EOS_TOKEN.to_owned(),
            pad: EOS_TOKEN.to_owned(),
        }
    }
}

/// Vocabulary and merges in the form the BPE model is built from.
struct BpeFiles {
    vocab: Vec<(String, u32)>,
    merges: Vec<(String, String)>,
    /// Added tokens declared next to the vocabulary (tokenizer.json's `added_tokens`).
    added: Vec<(String, u32)>,
    /// Where the data came from, for error messages.
    origin: PathBuf,
}

impl ClipTokenizer {
    /// The tokenizer of OpenAI's CLIP (SD 1.x and 2.x, SDXL), built from the embedded merges.
    ///
    /// Pads with `<|endoftext|>` like SD 1.x; use [`with_pad_token_id`](Self::with_pad_token_id)
    /// with `0` for SD 2.x. The vocabulary is built once per process (about 0.15 s); later calls
    /// return a cheap clone.
    pub fn bundled() -> Result<Self> {
        static BUNDLED: OnceLock<std::result::Result<ClipTokenizer, String>> = OnceLock::new();
        let cached = BUNDLED.get_or_init(|| build_bundled().map_err(|e| e.to_string()));
        cached.clone().map_err(|message| TokenizerError::Invalid {
            path: PathBuf::from(BUNDLED_NAME),
            message,
        })
    }

    /// Loads a transformers/diffusers tokenizer folder (a model's `tokenizer/` or
    /// `tokenizer_2/`).
    ///
    /// Reads `vocab.json` + `merges.txt` (preferred, as the slow `CLIPTokenizer` does) or
    /// `tokenizer.json`, then the special tokens, `model_max_length` and added tokens from
    /// `tokenizer_config.json`, `special_tokens_map.json` and `added_tokens.json` with
    /// transformers' precedence rules. Missing config files mean CLIP's defaults (pad with
    /// `<|endoftext|>`, 77 ids).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let vocab_path = dir.join("vocab.json");
        let merges_path = dir.join("merges.txt");
        let json_path = dir.join("tokenizer.json");
        let files = if vocab_path.is_file() && merges_path.is_file() {
            BpeFiles {
                vocab: read_vocab_json(&vocab_path)?,
                merges: parse_merges(&read_text(&merges_path)?, &merges_path)?,
                added: Vec::new(),
                origin: vocab_path,
            }
        } else if json_path.is_file() {
            read_tokenizer_json(&json_path)?
        } else {
            return Err(TokenizerError::MissingFiles {
                dir: dir.to_path_buf(),
            });
        };
        let config = TokenizerConfig::read(dir, files.added.clone())?;
        Self::build(files, config)
    }

    /// The tokenizer for a diffusers model folder: its `tokenizer/` sub-folder when present,
    /// the bundled CLIP tokenizer otherwise.
    pub fn from_model_dir(model_dir: impl AsRef<Path>) -> Result<Self> {
        let dir = model_dir.as_ref().join("tokenizer");
        if dir.is_dir() {
            Self::from_dir(dir)
        } else {
            Self::bundled()
        }
    }

    /// Replaces the pad token (SD 2.x checkpoints without a `tokenizer/` folder need `0`, "!").
    pub fn with_pad_token_id(mut self, id: u32) -> Result<Self> {
        let token = self
            .id_to_token(id)
            .ok_or(TokenizerError::PadIdOutOfRange {
                id,
                max_id: self.max_id,
            })?;
        self.specials.pad = token;
        self.pad_id = id;
        self.split_tokens = self.split_table();
        Ok(self)
    }

    /// Encodes a prompt to exactly [`max_length`](Self::max_length) ids: start token, the first
    /// `max_length - 2` BPE ids, end token, then pad tokens.
    pub fn encode(&self, prompt: &str) -> Result<Vec<u32>> {
        Ok(self.frame_chunked(self.encode_unpadded(prompt)?, 1))
    }

    /// Encodes a prompt of up to `chunks × (max_length − 2)` tokens (150 or 225 with kohya's
    /// `max_token_length`) as `chunks` rows of [`max_length`](Self::max_length) ids, laid out
    /// as kohya's sd-scripts lay out long captions, concatenated.
    ///
    /// The prompt is framed as one long sequence (start token, the first
    /// `chunks × (max_length − 2)` BPE ids, end token, pad tokens), and row `k` takes that
    /// sequence's ids `1 + k(max_length − 2) ..` plus its start token and its very last id.
    /// When the pad token is not the end token (SD 2.x) a row whose second-to-last id is a
    /// word gets the end token last, and a row with no words starts `<start> <end>`. Encode
    /// each row with the text encoder and join the results with
    /// [`ClipTextModel::forward_chunked`](crate::ClipTextModel::forward_chunked).
    /// `chunks = 1` (or 0), or a `max_length` of 2 (no room for words), is
    /// [`encode`](Self::encode).
    ///
    /// ```
    /// use sd_model::tokenizer::{ClipTokenizer, BOS_TOKEN_ID, EOS_TOKEN_ID};
    ///
    /// let tokenizer = ClipTokenizer::bundled()?;
    /// let prompt = "masterpiece, ".repeat(40); // 80 tokens: more than one row holds
    /// let ids = tokenizer.encode_chunked(&prompt, 2)?;
    /// assert_eq!(ids.len(), 2 * 77);
    /// let words = tokenizer.encode_unpadded(&prompt)?;
    /// assert_eq!(&ids[1..76], &words[..75]);
    /// assert_eq!((ids[77], &ids[78..83]), (BOS_TOKEN_ID, &words[75..]));
    /// assert_eq!(ids[83], EOS_TOKEN_ID);
    /// # Ok::<(), sd_model::tokenizer::TokenizerError>(())
    /// ```
    pub fn encode_chunked(&self, prompt: &str, chunks: usize) -> Result<Vec<u32>> {
        Ok(self.frame_chunked(self.encode_unpadded(prompt)?, chunks))
    }

    /// Frames BPE ids as [`encode_chunked`](Self::encode_chunked) frames a prompt's.
    pub(crate) fn frame_chunked(&self, mut words: Vec<u32>, chunks: usize) -> Vec<u32> {
        if chunks <= 1 || self.max_length < 3 {
            words.truncate(self.max_length - 2);
            let mut ids = Vec::with_capacity(self.max_length);
            ids.push(self.bos_id);
            ids.extend_from_slice(&words);
            ids.push(self.eos_id);
            ids.resize(self.max_length, self.pad_id);
            return ids;
        }
        let inner = self.max_length - 2;
        let mut long = words;
        long.truncate(chunks * inner);
        long.insert(0, self.bos_id);
        long.push(self.eos_id);
        long.resize(chunks * inner + 2, self.pad_id);
        let last = long[long.len() - 1];
        let mut ids = Vec::with_capacity(chunks * self.max_length);
        for words in long[1..long.len() - 1].chunks(inner) {
            let start = ids.len();
            ids.push(self.bos_id);
            ids.extend_from_slice(words);
            ids.push(last);
            // No-ops when the pad token is the end token (SD 1.x).
            let row = &mut ids[start..];
            let before_last = row[row.len() - 2];
            if before_last != self.eos_id && before_last != self.pad_id {
                row[self.max_length - 1] = self.eos_id;
            }
            if row[1] == self.pad_id {
                row[1] = self.eos_id;
            }
        }
        ids
    }

    /// [`encode`](Self::encode) for each prompt, in order.
    pub fn encode_batch<S: AsRef<str>>(&self, prompts: &[S]) -> Result<Vec<Vec<u32>>> {
        prompts.iter().map(|p| self.encode(p.as_ref())).collect()
    }

    /// The prompt's ids without start/end tokens, truncation or padding. More than
    /// `max_length - 2` of them means [`encode`](Self::encode) drops the tail of the prompt.
    pub fn encode_unpadded(&self, prompt: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        for piece in split_on_added(prompt, &self.split_tokens) {
            match piece {
                Piece::Added(id) => ids.push(id),
                Piece::Text(text) => self.encode_text(&normalize(text), &mut ids)?,
            }
        }
        Ok(ids)
    }

    /// Id of the start-of-text token.
    pub fn bos_token_id(&self) -> u32 {
        self.bos_id
    }

    /// Id of the end-of-text token.
    pub fn eos_token_id(&self) -> u32 {
        self.eos_id
    }

    /// Id that fills [`encode`](Self::encode)'s output after the end token.
    pub fn pad_token_id(&self) -> u32 {
        self.pad_id
    }

    /// Number of ids [`encode`](Self::encode) returns (the text encoder's context length).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// One more than the largest id the tokenizer can produce: the number of rows the text
    /// encoder's token embedding needs (49 408 for CLIP, more with added tokens).
    pub fn vocab_size(&self) -> usize {
        self.max_id as usize + 1
    }

    /// Adds `tokens` after the largest id (textual-inversion vectors): like the config
    /// files' added tokens, each one splits prompts and stands for its own id. Returns the
    /// tokenizer and the new ids. A token the tokenizer already knows is an error.
    ///
    /// ```
    /// use sd_model::tokenizer::ClipTokenizer;
    /// let base = ClipTokenizer::bundled()?;
    /// let (t, ids) = base.clone().with_added_tokens(&["<emb:0>".to_string()])?;
    /// assert_eq!(ids, [base.vocab_size() as u32]);
    /// assert_eq!(t.encode_unpadded("a <emb:0> cat")?[1], ids[0]);
    /// # Ok::<(), sd_model::tokenizer::TokenizerError>(())
    /// ```
    pub fn with_added_tokens(mut self, tokens: &[String]) -> Result<(Self, Vec<u32>)> {
        let mut ids = Vec::with_capacity(tokens.len());
        for token in tokens {
            if token.is_empty() || self.bpe.token_to_id(token).is_some() || self.added.iter().any(|(t, _)| t == token) {
                return Err(TokenizerError::Invalid {
                    path: PathBuf::from("added tokens"),
                    message: format!("token {token:?} is empty or already known"),
                });
            }
            self.max_id += 1;
            self.added.push((token.clone(), self.max_id));
            ids.push(self.max_id);
        }
        self.split_tokens = self.split_table();
        Ok((self, ids))
    }

    /// The text of a token id, as it appears in `vocab.json` (`</w>` marks a word end), or
    /// `None` for an unknown id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.added
            .iter()
            .find(|(_, i)| *i == id)
            .map(|(t, _)| t.clone())
            .or_else(|| self.bpe.id_to_token(id))
    }

    /// Writes this tokenizer as a transformers/diffusers `tokenizer/` folder (`vocab.json`,
    /// `merges.txt`, `tokenizer_config.json`, `special_tokens_map.json` and, with added tokens,
    /// `added_tokens.json`) that [`from_dir`](Self::from_dir) and transformers' `CLIPTokenizer`
    /// load back unchanged. Useful when turning a single-file checkpoint into a model folder.
    pub fn save_to_dir(&self, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        fs::create_dir_all(dir).map_err(|source| io_error(dir, source))?;
        self.bpe.save(dir, None).map_err(|e| TokenizerError::Bpe {
            origin: dir.display().to_string(),
            message: e.to_string(),
        })?;
        let specials = Map::from_iter([
            (
                "bos_token".to_owned(),
                Value::from(self.specials.bos.clone()),
            ),
            (
                "eos_token".to_owned(),
                Value::from(self.specials.eos.clone()),
            ),
            (
                "pad_token".to_owned(),
                Value::from(self.specials.pad.clone()),
            ),
            (
                "unk_token".to_owned(),
                Value::from(self.specials.unk.clone()),
            ),
        ]);
        let mut config = specials.clone();
        config.insert("model_max_length".to_owned(), Value::from(self.max_length));
        config.insert("tokenizer_class".to_owned(), Value::from("CLIPTokenizer"));
        write_json(
            &dir.join("special_tokens_map.json"),
            &Value::Object(specials),
        )?;
        write_json(&dir.join("tokenizer_config.json"), &Value::Object(config))?;
        let extra: Map<String, Value> = self
            .added
            .iter()
            .filter(|(token, _)| self.bpe.token_to_id(token).is_none())
            .map(|(token, id)| (token.clone(), Value::from(*id)))
            .collect();
        if !extra.is_empty() {
            write_json(&dir.join("added_tokens.json"), &Value::Object(extra))?;
        }
        Ok(())
    }

    fn build(files: BpeFiles, config: TokenizerConfig) -> Result<Self> {
        let origin = files.origin.clone();
        let vocab: Vocab = files.vocab.iter().cloned().collect();
        let max_vocab_id = files.vocab.iter().map(|(_, id)| *id).max().unwrap_or(0);
        let lookup = |token: &str| {
            config
                .added
                .iter()
                .find(|(t, _)| t == token)
                .map(|(_, id)| *id)
                .or_else(|| vocab.get(token).copied())
        };
        let id_of = |key: &str, token: &str| {
            lookup(token).ok_or_else(|| TokenizerError::UnknownSpecialToken {
                path: config.source_of(key).unwrap_or(&origin).to_path_buf(),
                key: key.to_owned(),
                token: token.to_owned(),
            })
        };
        let specials = config.specials.clone();
        let bos_id = id_of("bos_token", &specials.bos)?;
        let eos_id = id_of("eos_token", &specials.eos)?;
        let pad_id = id_of("pad_token", &specials.pad)?;
        let unk_id = id_of("unk_token", &specials.unk)?;
        // Python looks these up in the base vocabulary only, falling back to the unknown token.
        let literal_bos_id = vocab.get(BOS_TOKEN).copied().unwrap_or(unk_id);
        let literal_eos_id = vocab.get(EOS_TOKEN).copied().unwrap_or(unk_id);

        let max_id = config
            .added
            .iter()
            .map(|(_, id)| *id)
            .fold(max_vocab_id, u32::max);

        let bpe = BPE::builder()
            .vocab_and_merges(vocab, files.merges)
            .unk_token(specials.unk.clone())
            .end_of_word_suffix(END_OF_WORD.to_owned())
            .build()
            .map_err(|e| TokenizerError::Bpe {
                origin: origin.display().to_string(),
                message: e.to_string(),
            })?;
        // The unknown token must be a BPE vocabulary entry or every unknown symbol fails.
        if bpe.token_to_id(&specials.unk).is_none() {
            return Err(TokenizerError::UnknownSpecialToken {
                path: config
                    .source_of("unk_token")
                    .unwrap_or(&origin)
                    .to_path_buf(),
                key: "unk_token".to_owned(),
                token: specials.unk,
            });
        }
        let pattern = SysRegex::new(CLIP_PATTERN).map_err(|e| TokenizerError::Bpe {
            origin: "pre-tokenizer regex".to_owned(),
            message: e.to_string(),
        })?;
        let mut tokenizer = Self {
            bpe: Arc::new(bpe),
            pattern: Arc::new(pattern),
            byte_chars: bytes_to_unicode(),
            added: config.added,
            split_tokens: Vec::new(),
            literal_bos_id,
            literal_eos_id,
            specials,
            bos_id,
            eos_id,
            unk_id,
            pad_id,
            max_length: config.max_length,
            max_id,
        };
        tokenizer.split_tokens = tokenizer.split_table();
        Ok(tokenizer)
    }

    /// transformers registers the special tokens as added tokens, so they split prompts too
    /// (for SD 2.x every "!" in a prompt becomes the pad token, id 0, as in diffusers).
    fn split_table(&self) -> Vec<(String, u32)> {
        let mut table = self.added.clone();
        for (token, id) in [
            (&self.specials.bos, self.bos_id),
            (&self.specials.eos, self.eos_id),
            (&self.specials.unk, self.unk_id),
            (&self.specials.pad, self.pad_id),
        ] {
            if !table.iter().any(|(t, _)| t == token) {
                table.push((token.clone(), id));
            }
        }
        table.retain(|(token, _)| !token.is_empty());
        table
    }

    /// Pre-tokenizes normalised text and appends the BPE ids of each piece.
    fn encode_text(&self, text: &str, ids: &mut Vec<u32>) -> Result<()> {
        let mut mapped = String::new();
        for (start, end) in self.pattern.find_iter(text) {
            let piece = &text[start..end];
            if piece == BOS_TOKEN {
                ids.push(self.literal_bos_id);
                continue;
            }
            if piece == EOS_TOKEN {
                ids.push(self.literal_eos_id);
                continue;
            }
            mapped.clear();
            mapped.extend(piece.bytes().map(|b| self.byte_chars[b as usize]));
            let tokens = self
                .bpe
                .tokenize(&mapped)
                .map_err(|e| TokenizerError::Bpe {
                    origin: "encode".to_owned(),
                    message: e.to_string(),
                })?;
            ids.extend(tokens.iter().map(|t| t.id));
        }
        Ok(())
    }
}

fn build_bundled() -> Result<ClipTokenizer> {
    let origin = PathBuf::from(BUNDLED_NAME);
    let mut text = String::new();
    flate2::read::GzDecoder::new(BUNDLED_MERGES_GZ)
        .read_to_string(&mut text)
        .map_err(|source| io_error(&origin, source))?;
    let merges = parse_merges(&text, &origin)?;
    let vocab = clip_vocab(&merges);
    let files = BpeFiles {
        vocab,
        merges,
        added: Vec::new(),
        origin,
    };
    ClipTokenizer::build(files, TokenizerConfig::default())
}

/// open_clip's vocabulary: the 256 byte symbols, the same with `</w>`, one entry per merge,
/// then `<|startoftext|>` and `<|endoftext|>`.
fn clip_vocab(merges: &[(String, String)]) -> Vec<(String, u32)> {
    let bytes = bytes_to_unicode_order();
    let base = bytes.iter().map(|c| c.to_string());
    let words = bytes.iter().map(|c| format!("{c}{END_OF_WORD}"));
    let merged = merges.iter().map(|(a, b)| format!("{a}{b}"));
    let specials = [BOS_TOKEN.to_owned(), EOS_TOKEN.to_owned()];
    base.chain(words)
        .chain(merged)
        .chain(specials)
        .zip(0u32..)
        .collect()
}

/// The bytes' printable stand-ins in GPT-2's order: the printable Latin-1 bytes first (they
/// stand for themselves), then the others mapped to U+0100.. in byte order.
fn bytes_to_unicode_order() -> Vec<char> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let table = bytes_to_unicode();
    let (mut first, rest): (Vec<u8>, Vec<u8>) = (0..=255u8).partition(|b| printable(*b));
    first.extend(rest);
    first.into_iter().map(|b| table[b as usize]).collect()
}

/// GPT-2's byte -> character table, indexed by byte.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        table[b as usize] = if matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF) {
            char::from(b)
        } else {
            next += 1;
            // 256..=323 are all valid scalar values.
            char::from_u32(next - 1).unwrap_or('\u{FFFD}')
        };
    }
    table
}

/// A run of prompt text, or an added/special token found verbatim in it.
#[derive(Debug, PartialEq)]
enum Piece<'a> {
    Text(&'a str),
    Added(u32),
}

/// Splits `text` on added tokens, leftmost match first and the longest token at that position,
/// like transformers' `Trie.split`.
fn split_on_added<'a>(text: &'a str, added: &[(String, u32)]) -> Vec<Piece<'a>> {
    let mut pieces = Vec::new();
    let mut start = 0;
    let mut pos = 0;
    while pos < text.len() {
        let rest = &text[pos..];
        let found = added
            .iter()
            .filter(|(token, _)| rest.starts_with(token.as_str()))
            .max_by_key(|(token, _)| token.len());
        match found {
            Some((token, id)) => {
                if start < pos {
                    pieces.push(Piece::Text(&text[start..pos]));
                }
                pieces.push(Piece::Added(*id));
                pos += token.len();
                start = pos;
            }
            None => pos += rest.chars().next().map_or(1, char::len_utf8),
        }
    }
    if start < text.len() {
        pieces.push(Piece::Text(&text[start..]));
    }
    pieces
}

/// BERT's `BasicTokenizer(strip_accents=False, do_split_on_punc=False)`, which transformers'
/// `CLIPTokenizer` runs when ftfy is absent; words are re-joined with single spaces.
fn normalize(text: &str) -> String {
    let mut cleaned = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c == '\0' || c == '\u{FFFD}' || is_control(c) {
            continue;
        }
        if is_whitespace(c) {
            cleaned.push(' ');
        } else if is_cjk_ideograph(c) {
            cleaned.extend([' ', c, ' ']);
        } else {
            cleaned.push(c);
        }
    }
    let composed: String = cleaned.nfc().collect();
    let words: Vec<String> = composed.split_whitespace().map(str::to_lowercase).collect();
    // Under Python's case-insensitive regex, COMBINING GREEK YPOGEGRAMMENI (a mark that
    // case-folds to the letter iota) matches neither `[\p{L}]` nor its negation, so CLIP's
    // pattern skips it like a space. It is the only character where IGNORECASE changes the
    // matches (checked over all code points with the `regex` module).
    words.join(" ").replace('\u{345}', " ")
}

/// Python's `_is_control`: Unicode category `C*` except tab, newline and carriage return.
fn is_control(c: char) -> bool {
    !matches!(c, '\t' | '\n' | '\r') && c.general_category_group() == GeneralCategoryGroup::Other
}

/// Python's `_is_whitespace`: space, tab, newline, carriage return and category `Zs`.
fn is_whitespace(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\r') || c.general_category() == GeneralCategory::SpaceSeparator
}

/// BERT's "Chinese character" ranges (CJK Unified Ideographs and their extensions).
fn is_cjk_ideograph(c: char) -> bool {
    matches!(
        u32::from(c),
        0x4E00..=0x9FFF
            | 0x3400..=0x4DBF
            | 0x20000..=0x2A6DF
            | 0x2A700..=0x2B73F
            | 0x2B740..=0x2B81F
            | 0x2B820..=0x2CEAF
            | 0xF900..=0xFAFF
            | 0x2F800..=0x2FA1F
    )
}

/// Parses transformers' `merges.txt`: the text is trimmed, the first line (the `#version`
/// header) skipped and at most CLIP's 48 894 merges are read, exactly like `CLIPTokenizer`.
fn parse_merges(text: &str, path: &Path) -> Result<Vec<(String, String)>> {
    text.trim()
        .split('\n')
        .enumerate()
        .skip(1)
        .take(CLIP_MERGES)
        .map(|(index, line)| {
            let mut parts = line.split_whitespace();
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) => Ok((a.to_owned(), b.to_owned())),
                _ => Err(TokenizerError::Invalid {
                    path: path.to_path_buf(),
                    message: format!(
                        "line {}: expected two space-separated symbols, found {line:?}",
                        index + 1
                    ),
                }),
            }
        })
        .collect()
}

fn read_vocab_json(path: &Path) -> Result<Vec<(String, u32)>> {
    let vocab: HashMap<String, u32> =
        serde_json::from_str(&read_text(path)?).map_err(|source| json_error(path, source))?;
    Ok(vocab.into_iter().collect())
}

/// Reads the BPE model of a `tokenizers` JSON file (`model.vocab`, `model.merges`) and its
/// `added_tokens`; the file's normaliser and pre-tokenizer are ignored in favour of the slow
/// tokenizer's pipeline, so both file layouts encode identically.
fn read_tokenizer_json(path: &Path) -> Result<BpeFiles> {
    let root: Value =
        serde_json::from_str(&read_text(path)?).map_err(|source| json_error(path, source))?;
    let invalid = |message: String| TokenizerError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    let model = root
        .get("model")
        .ok_or_else(|| invalid("missing key \"model\"".to_owned()))?;
    if let Some(kind) = model.get("type").and_then(Value::as_str) && kind != "BPE" {
        return Err(invalid(format!("model.type is {kind:?}, expected \"BPE\"")));
    }
    match model.get("end_of_word_suffix") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) if s == END_OF_WORD => {}
        Some(other) => {
            return Err(invalid(format!(
                "model.end_of_word_suffix is {other}, expected \"</w>\" (a CLIP tokenizer)"
            )))
        }
    }
    let vocab: HashMap<String, u32> = model
        .get("vocab")
        .cloned()
        .map(serde_json::from_value)
        .transpose()
        .map_err(|e| invalid(format!("model.vocab: {e}")))?
        .ok_or_else(|| invalid("missing key \"model.vocab\"".to_owned()))?;
    let merges = model
        .get("merges")
        .and_then(Value::as_array)
        .ok_or_else(|| invalid("missing array \"model.merges\"".to_owned()))?
        .iter()
        .enumerate()
        .map(|(i, merge)| {
            merge_pair(merge).ok_or_else(|| {
                invalid(format!(
                    "model.merges[{i}] is {merge}, expected \"a b\" or [\"a\", \"b\"]"
                ))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let mut added = Vec::new();
    for (i, entry) in root
        .get("added_tokens")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let content = entry.get("content").and_then(Value::as_str);
        let id = entry
            .get("id")
            .and_then(Value::as_u64)
            .and_then(|id| u32::try_from(id).ok());
        match (content, id) {
            (Some(content), Some(id)) => added.push((content.to_owned(), id)),
            _ => {
                return Err(invalid(format!(
                    "added_tokens[{i}] needs a string \"content\" and an integer \"id\""
                )))
            }
        }
    }
    Ok(BpeFiles {
        vocab: vocab.into_iter().collect(),
        merges,
        added,
        origin: path.to_path_buf(),
    })
}

/// A merge in either `tokenizers` layout: `"a b"` (before 0.20) or `["a", "b"]`.
fn merge_pair(merge: &Value) -> Option<(String, String)> {
    match merge {
        Value::String(s) => {
            let mut parts = s.split(' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some(a), Some(b), None) => Some((a.to_owned(), b.to_owned())),
                _ => None,
            }
        }
        Value::Array(pair) => match pair.as_slice() {
            [Value::String(a), Value::String(b)] => Some((a.clone(), b.clone())),
            _ => None,
        },
        _ => None,
    }
}

/// Special tokens, length and added tokens from a folder's JSON configs.
#[derive(Debug)]
struct TokenizerConfig {
    specials: SpecialTokens,
    max_length: usize,
    added: Vec<(String, u32)>,
    /// Which file set each special-token key, for error messages.
    sources: Vec<(&'static str, PathBuf)>,
}

const SPECIAL_KEYS: [&str; 4] = ["bos_token", "eos_token", "unk_token", "pad_token"];

impl Default for TokenizerConfig {
    /// What a folder without config files means: CLIP's specials, 77 ids, no added tokens.
    fn default() -> Self {
        Self {
            specials: SpecialTokens::default(),
            max_length: DEFAULT_MAX_LENGTH,
            added: Vec::new(),
            sources: Vec::new(),
        }
    }
}

impl TokenizerConfig {
    /// Applies transformers' `from_pretrained` rules: `tokenizer_config.json` first; when it has
    /// no `added_tokens_decoder` (the legacy layout), `special_tokens_map.json` overrides its
    /// special tokens and `added_tokens.json` / tokenizer.json's `added_tokens` declare the
    /// added tokens.
    fn read(dir: &Path, json_added: Vec<(String, u32)>) -> Result<Self> {
        let mut config = Self::default();
        let config_path = dir.join("tokenizer_config.json");
        let tokenizer_config = read_json_object(&config_path)?;
        let mut legacy = true;
        if let Some(obj) = &tokenizer_config {
            config.apply_specials(obj, &config_path)?;
            config.max_length = read_max_length(obj, &config_path)?;
            if let Some(decoder) = obj.get("added_tokens_decoder") {
                config.added = read_added_tokens_decoder(decoder, &config_path)?;
                legacy = false;
            }
        }
        if legacy {
            let map_path = dir.join("special_tokens_map.json");
            if let Some(obj) = read_json_object(&map_path)? {
                config.apply_specials(&obj, &map_path)?;
            }
            let added_path = dir.join("added_tokens.json");
            if let Some(obj) = read_json_object(&added_path)? {
                config.added = read_added_tokens_json(&obj, &added_path)?;
            }
            for token in json_added {
                if !config.added.iter().any(|(t, _)| *t == token.0) {
                    config.added.push(token);
                }
            }
        }
        Ok(config)
    }

    fn apply_specials(&mut self, obj: &Map<String, Value>, path: &Path) -> Result<()> {
        for key in SPECIAL_KEYS {
            let Some(value) = obj.get(key) else { continue };
            let token = match value {
                Value::Null => continue,
                Value::String(s) => s.clone(),
                Value::Object(o) => match o.get("content") {
                    Some(Value::String(s)) => s.clone(),
                    _ => {
                        return Err(TokenizerError::Invalid {
                            path: path.to_path_buf(),
                            message: format!("{key}: expected a string \"content\""),
                        })
                    }
                },
                other => {
                    return Err(TokenizerError::Invalid {
                        path: path.to_path_buf(),
                        message: format!("{key} is {other}, expected a string or an object"),
                    })
                }
            };
            let slot = match key {
                "bos_token" => &mut self.specials.bos,
                "eos_token" => &mut self.specials.eos,
                "unk_token" => &mut self.specials.unk,
                _ => &mut self.specials.pad,
            };
            *slot = token;
            self.sources.retain(|(k, _)| *k != key);
            self.sources.push((key, path.to_path_buf()));
        }
        Ok(())
    }

    fn source_of(&self, key: &str) -> Option<&Path> {
        self.sources
            .iter()
            .find(|(k, _)| *k == key)
            .map(|(_, p)| p.as_path())
    }
}

fn read_max_length(obj: &Map<String, Value>, path: &Path) -> Result<usize> {
    let Some(value) = obj.get("model_max_length") else {
        return Ok(DEFAULT_MAX_LENGTH);
    };
    match value.as_u64() {
        Some(n) if (2..=MAX_SUPPORTED_LENGTH).contains(&n) => Ok(n as usize),
        _ => Err(TokenizerError::Invalid {
            path: path.to_path_buf(),
            message: format!(
                "model_max_length is {value}, expected an integer from 2 to {MAX_SUPPORTED_LENGTH}"
            ),
        }),
    }
}

/// `added_tokens_decoder`: `{"49408": {"content": "<tok>", ...}, ...}`.
fn read_added_tokens_decoder(value: &Value, path: &Path) -> Result<Vec<(String, u32)>> {
    let invalid = |message: String| TokenizerError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    let obj = value
        .as_object()
        .ok_or_else(|| invalid("added_tokens_decoder must be an object".to_owned()))?;
    obj.iter()
        .map(|(id, token)| {
            let id = id.parse::<u32>().map_err(|_| {
                invalid(format!("added_tokens_decoder key {id:?} is not a token id"))
            })?;
            let content = token
                .get("content")
                .and_then(Value::as_str)
                .ok_or_else(|| {
                    invalid(format!(
                        "added_tokens_decoder[{id}] needs a string \"content\""
                    ))
                })?;
            Ok((content.to_owned(), id))
        })
        .collect()
}

/// `added_tokens.json`: `{"<tok>": 49408, ...}`.
fn read_added_tokens_json(obj: &Map<String, Value>, path: &Path) -> Result<Vec<(String, u32)>> {
    obj.iter()
        .map(|(token, id)| {
            id.as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .map(|id| (token.clone(), id))
                .ok_or_else(|| TokenizerError::Invalid {
                    path: path.to_path_buf(),
                    message: format!("{token:?} maps to {id}, expected a token id"),
                })
        })
        .collect()
}

/// `Ok(None)` when the file does not exist.
fn read_json_object(path: &Path) -> Result<Option<Map<String, Value>>> {
    if !path.is_file() {
        return Ok(None);
    }
    match serde_json::from_str(&read_text(path)?).map_err(|source| json_error(path, source))? {
        Value::Object(obj) => Ok(Some(obj)),
        other => Err(TokenizerError::Invalid {
            path: path.to_path_buf(),
            message: format!("expected a JSON object, found {}", json_kind(&other)),
        }),
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn read_text(path: &Path) -> Result<String> {
    fs::read_to_string(path).map_err(|source| io_error(path, source))
}

fn write_json(path: &Path, value: &Value) -> Result<()> {
    let mut text =
        serde_json::to_string_pretty(value).map_err(|source| json_error(path, source))?;
    text.push('\n');
    fs::write(path, text).map_err(|source| io_error(path, source))
}

fn io_error(path: &Path, source: std::io::Error) -> TokenizerError {
    TokenizerError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn json_error(path: &Path, source: serde_json::Error) -> TokenizerError {
    TokenizerError::Json {
        path: path.to_path_buf(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_a_bijection_onto_printable_chars() {
        let table = bytes_to_unicode();
        let mut seen: Vec<char> = table.to_vec();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 256);
        assert!(table.iter().all(|c| !c.is_whitespace() && !c.is_control()));
        assert_eq!(table[b'a' as usize], 'a');
        assert_eq!(table[b' ' as usize], '\u{120}'); // GPT-2's "Ġ"
    }

    #[test]
    fn normalize_matches_bert_basic_tokenizer_rules() {
        assert_eq!(normalize("  A\tB\u{3000}C  "), "a b c");
        assert_eq!(normalize("东京 tower"), "东 京 tower");
        assert_eq!(
            normalize("soft\u{AD}hyphen zero\u{200B}width"),
            "softhyphen zerowidth"
        );
        assert_eq!(normalize("e\u{301}le\u{301}phant"), "\u{e9}l\u{e9}phant");
        assert_eq!(normalize("ΟΔΟΣ"), "\u{3bf}\u{3b4}\u{3bf}\u{3c2}"); // final sigma
    }

    #[test]
    fn split_prefers_leftmost_then_longest() {
        let added = vec![
            ("ab".to_owned(), 1),
            ("abc".to_owned(), 2),
            ("c".to_owned(), 3),
        ];
        assert_eq!(
            split_on_added("xabcab", &added),
            vec![Piece::Text("x"), Piece::Added(2), Piece::Added(1)]
        );
        assert_eq!(split_on_added("é", &added), vec![Piece::Text("é")]);
    }
}
