//! Textual-inversion embeddings in prompts (A1111's `embeddings/`, kohya's
//! `--textual_inversion_embeddings`, diffusers' `load_textual_inversion`): vectors that
//! stand for a word, such as a negative embedding in the negative prompt.
//!
//! A file holds `emb_params` `[n, width]` (A1111 and kohya, SD1.x / SD2.x), `clip_l`
//! `[n, 768]` and `clip_g` `[n, 1280]` (SDXL: one set per text encoder), or one tensor named
//! by its token (diffusers' `learned_embeds.safetensors`, `[width]` or `[n, width]`). Its
//! word is the file's name without the extension, as A1111 names embeddings, or for a
//! diffusers file that one tensor's name (its token, e.g. `<cat-toy>`; A1111's `*`
//! placeholder leaves the file's name). Each of its
//! `n` vectors becomes an added token ([`token_names`]) of the tokenizer and a row of the
//! text encoder's token embedding, and [`expand_prompt`] writes those tokens where the word
//! stands in a prompt. LoRA files may bundle embeddings (`bundle_emb.NAME.…`, A1111's
//! format): [`read_bundled_embeddings`] reads them.
//!
//! ```
//! use sd_model::textual_inversion::{expand_prompt, token_names};
//! let names = vec![("easynegative".to_string(), token_names("easynegative", 2))];
//! assert_eq!(
//!     expand_prompt("(EasyNegative:1.2), lowres", &names),
//!     "(<emb:easynegative:0> <emb:easynegative:1>:1.2), lowres"
//! );
//! ```

use std::path::Path;

use lora_core::{tensor_io, HostTensor, BUNDLED_EMBEDDING_PREFIX as BUNDLE_PREFIX};

use crate::{Result, SdModelError};

/// The vectors of one embedding file.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedding {
    /// The word that calls it in prompts (the file's stem).
    pub name: String,
    /// `[n, width]` per text encoder, in order (SD1.x / SD2.x: one; SDXL: `clip_l`, then
    /// `clip_g`).
    pub vectors: Vec<HostTensor>,
}

impl Embedding {
    /// Vectors per encoder.
    pub fn len(&self) -> usize {
        self.vectors.first().map_or(0, |v| v.shape[0])
    }

    /// Whether it has no vectors (never, for one read by [`read_embedding`]).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Its vector sets under the names A1111 and kohya write: `emb_params` for one text
    /// encoder, `clip_l` and `clip_g` for SDXL's two (what [`read_embedding`] reads, and
    /// under `bundle_emb.NAME.` what [`read_bundled_embeddings`] reads).
    pub fn named_vectors(&self) -> Vec<(String, &HostTensor)> {
        let names: &[&str] = match self.vectors.len() {
            1 => &["emb_params"],
            _ => &["clip_l", "clip_g"],
        };
        names.iter().map(|n| n.to_string()).zip(&self.vectors).collect()
    }

    /// Writes it as an embedding file (see [`named_vectors`](Self::named_vectors)) at
    /// `path`, atomically, in `dtype`, with `metadata`; A1111 calls it by the file's name.
    ///
    /// ```
    /// use lora_core::{HostTensor, SaveDtype};
    /// use sd_model::textual_inversion::{read_embedding, Embedding};
    /// let dir = tempfile::tempdir().unwrap();
    /// let path = dir.path().join("mystyle.safetensors");
    /// let vectors = vec![HostTensor::new(vec![2, 4], vec![0.5; 8]).unwrap()];
    /// Embedding { name: "mystyle".into(), vectors }.write(&path, SaveDtype::F16, Default::default()).unwrap();
    /// let back = read_embedding(&path).unwrap();
    /// assert_eq!((back.name.as_str(), back.len()), ("mystyle", 2));
    /// ```
    pub fn write(&self, path: &Path, dtype: lora_core::SaveDtype, metadata: std::collections::HashMap<String, String>) -> Result<()> {
        if self.vectors.is_empty() || self.vectors.len() > 2 {
            return Err(bad(path, format!("{} vector sets; an embedding has one per text encoder (1 or 2)", self.vectors.len())));
        }
        let bytes = tensor_io::serialize(&self.named_vectors(), dtype, metadata)?;
        Ok(tensor_io::write_atomic(path, &bytes)?)
    }
}

/// Prompts for training an embedding of an object or a character without captions
/// (kohya's `use_object_template`, after the textual-inversion paper's): `{}` stands for
/// the word.
pub const OBJECT_TEMPLATES: &[&str] = &[
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
];

/// Prompts for training an embedding of a style without captions (kohya's
/// `use_style_template`): `{}` stands for the word.
pub const STYLE_TEMPLATES: &[&str] = &[
    "a painting in the style of {}",
    "a rendering in the style of {}",
    "a cropped painting in the style of {}",
    "the painting in the style of {}",
    "a clean painting in the style of {}",
    "a dirty painting in the style of {}",
    "a dark painting in the style of {}",
    "a picture in the style of {}",
    "a cool painting in the style of {}",
    "a close-up painting in the style of {}",
    "a bright painting in the style of {}",
    "a good painting in the style of {}",
    "a close-up painting in the style of {}",
    "a rendition in the style of {}",
    "a nice painting in the style of {}",
    "a small painting in the style of {}",
    "a weird painting in the style of {}",
    "a large painting in the style of {}",
];

/// Checks a word to train an embedding for (kohya's `token_string`): one word of a prompt
/// that [`expand_prompt`] finds, so not empty, without spaces, and none of the prompt
/// syntax's `,()[]{}:|\`.
///
/// ```
/// use sd_model::textual_inversion::check_word;
/// assert!(check_word("mystyle").is_ok() && check_word("<cat-toy>").is_ok());
/// assert!(check_word("my style").is_err() && check_word("").is_err() && check_word("a:b").is_err());
/// ```
pub fn check_word(word: &str) -> Result<()> {
    let bad = |reason: &str| SdModelError::BadInput { what: format!("embedding word {word:?}"), reason: reason.into() };
    if word.is_empty() {
        return Err(bad("is empty"));
    }
    if word.chars().any(|c| c.is_whitespace() || ",()[]{}:|\\".contains(c)) {
        return Err(bad("must be one word, without spaces or any of ,()[]{}:|\\"));
    }
    Ok(())
}

/// Starting rows `[n, width]` (f32) for `n` trained tokens of `encoder`, as kohya's
/// textual-inversion training starts them: the token embedding's rows of `init_word`'s
/// tokens, repeated or cut to `n`; without one (`""`), rows drawn from a normal
/// distribution with each dimension's mean and standard deviation over the vocabulary
/// (transformers' `mean_resizing`, per dimension), from a host stream seeded with `seed`
/// ([`lora_core::seeded_normal`]: the same rows on every backend).
pub fn initial_rows<B: burn::tensor::backend::Backend>(
    encoder: &crate::ClipTextModel<B>,
    tokenizer: &crate::tokenizer::ClipTokenizer,
    init_word: &str,
    n: usize,
    seed: u64,
) -> Result<burn::tensor::Tensor<B, 2>> {
    if n == 0 {
        return Err(SdModelError::BadInput { what: "embedding vectors".into(), reason: "at least one is needed".into() });
    }
    if init_word.trim().is_empty() {
        let rows = encoder.text_model.embeddings.token_embedding.weight.val().cast(burn::tensor::FloatDType::F32);
        let [_, d] = rows.dims();
        let (var, mean) = rows.var_mean(0);
        let normal = lora_core::seeded_normal::<B, 2>(seed, [n, d], &mean.device());
        return Ok(mean + normal * var.sqrt());
    }
    let ids = tokenizer.encode_unpadded(init_word)?;
    if ids.is_empty() {
        return Err(SdModelError::BadInput { what: format!("init word {init_word:?}"), reason: "has no tokens".into() });
    }
    let picked: Vec<u32> = (0..n).map(|i| ids[i % ids.len()]).collect();
    encoder.token_rows(&picked)
}

fn bad(path: &Path, reason: impl Into<String>) -> SdModelError {
    SdModelError::BadInput { what: path.display().to_string(), reason: reason.into() }
}

/// Reads an embedding file (`.safetensors`, or A1111's older PyTorch `.pt` / `.bin`; see
/// the [module docs](self)).
pub fn read_embedding(path: &Path) -> Result<Embedding> {
    let mut name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad(path, "no file name to call the embedding by"))?;
    if crate::torch_file::is_pytorch_file(path) {
        return read_pytorch_embedding(path, name);
    }
    let bytes = tensor_io::read_file(path)?;
    let (st, _) = tensor_io::parse(&bytes, path)?;
    let tensor = |key: &str| read_vectors(&st, key, path);
    let names: Vec<&str> = st.names();
    let vectors = match vector_sets(&names, &tensor, path)? {
        Some(vectors) => vectors,
        None => match names.as_slice() {
            // diffusers names the tensor by its token, which is the word then.
            [only] => {
                if *only != "*" {
                    name = only.to_string();
                }
                vec![tensor(only)?]
            }
            _ => return Err(bad(path, format!("expected `emb_params`, `clip_l` and `clip_g`, or one tensor; found {names:?}"))),
        },
    };
    finite(&vectors, path)?;
    Ok(Embedding { name, vectors })
}

/// A PyTorch embedding (A1111's `.pt`: `string_to_param.*`, or `emb_params`, `clip_l` /
/// `clip_g`), called by the file's name as A1111 calls it.
fn read_pytorch_embedding(path: &Path, name: String) -> Result<Embedding> {
    let tensors = crate::torch_file::read_pytorch(path)?;
    let names: Vec<&str> = tensors.iter().map(|(k, _)| k.as_str()).collect();
    let tensor = |key: &str| -> Result<HostTensor> {
        let (_, snapshot) = tensors.iter().find(|(k, _)| k == key).ok_or_else(|| bad(path, format!("`{key}` is missing")))?;
        as_vectors(crate::torch_file::host_tensor(snapshot, key, path)?, key, path)
    };
    let vectors = vector_sets(&names, &tensor, path)?
        .ok_or_else(|| bad(path, format!("expected `string_to_param.*`, `emb_params`, or `clip_l` and `clip_g`; found {names:?}")))?;
    finite(&vectors, path)?;
    Ok(Embedding { name, vectors })
}

/// Tensor `key` as `[vectors, width]` (a `[width]` vector is one row).
fn read_vectors(st: &safetensors::SafeTensors<'_>, key: &str, path: &Path) -> Result<HostTensor> {
    let view = st.tensor(key).map_err(|e| bad(path, format!("`{key}`: {e}")))?;
    as_vectors(tensor_io::decode_finite(&view, key, path)?, key, path)
}

/// `t` as `[vectors, width]` (a `[width]` vector is one row), or an error naming `key`.
fn as_vectors(mut t: HostTensor, key: &str, path: &Path) -> Result<HostTensor> {
    if t.shape.len() == 1 {
        t.shape.insert(0, 1);
    }
    if t.shape.len() != 2 || t.shape[0] == 0 {
        return Err(bad(path, format!("`{key}` has shape {:?}; expected [vectors, width]", t.shape)));
    }
    Ok(t)
}

/// The vector sets named as A1111 / kohya name them among `names`: `emb_params`, SDXL's
/// `clip_l` + `clip_g`, or a `.pt` embedding's `string_to_param.*`; `None` when none is there.
fn vector_sets(names: &[&str], tensor: &dyn Fn(&str) -> Result<HostTensor>, path: &Path) -> Result<Option<Vec<HostTensor>>> {
    Ok(Some(if names.contains(&"emb_params") {
        vec![tensor("emb_params")?]
    } else if names.contains(&"clip_l") && names.contains(&"clip_g") {
        let (l, g) = (tensor("clip_l")?, tensor("clip_g")?);
        if l.shape[0] != g.shape[0] {
            return Err(bad(path, format!("clip_l has {} vectors and clip_g {}", l.shape[0], g.shape[0])));
        }
        vec![l, g]
    } else if names.contains(&"string_to_param.*") {
        vec![tensor("string_to_param.*")?]
    } else {
        return Ok(None);
    }))
}

fn finite(vectors: &[HostTensor], path: &Path) -> Result<()> {
    if vectors.iter().any(|v| v.data.iter().any(|x| !x.is_finite())) {
        return Err(bad(path, "the vectors hold NaN or infinite values"));
    }
    Ok(())
}


/// The textual-inversion embeddings bundled in a LoRA file (`bundle_emb.NAME.…`, as A1111
/// loads them with the LoRA and OneTrainer / pivotal-tuning trainers write them), each
/// called by its NAME; none for a file without them. A bundle without a known vector set is
/// an error naming its keys.
pub fn read_bundled_embeddings(path: &Path) -> Result<Vec<Embedding>> {
    let bytes = tensor_io::read_file(path)?;
    let (st, _) = tensor_io::parse(&bytes, path)?;
    let mut bundles: std::collections::BTreeMap<&str, Vec<&str>> = std::collections::BTreeMap::new();
    for key in st.names() {
        if let Some((name, rest)) = key.strip_prefix(BUNDLE_PREFIX).and_then(|k| k.split_once('.')) {
            bundles.entry(name).or_default().push(rest);
        }
    }
    let mut out = Vec::with_capacity(bundles.len());
    for (name, parts) in bundles {
        let tensor = |part: &str| read_vectors(&st, &format!("{BUNDLE_PREFIX}{name}.{part}"), path);
        let vectors = vector_sets(&parts, &tensor, path)?
            .ok_or_else(|| bad(path, format!("bundled embedding `{name}` has {parts:?}; expected emb_params, clip_l and clip_g, or string_to_param.*")))?;
        finite(&vectors, path)?;
        out.push(Embedding { name: name.to_string(), vectors });
    }
    Ok(out)
}

/// The added tokens of embedding `name`'s `n` vectors: `<emb:NAME:0>` ... (no word of a
/// prompt is spelt so by accident).
pub fn token_names(name: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("<emb:{name}:{i}>")).collect()
}

/// `prompt` with every whole-word occurrence of an embedding's name (case-insensitive, as
/// CLIP lower-cases prompts; bounded by anything but letters, digits, `_` and `-`) replaced by
/// its tokens, space-separated. `embeddings` pairs each name with its [`token_names`]. One
/// pass over the prompt: where several names match, the longest wins (as in A1111: with
/// `style` and `style.v2` loaded, `style.v2` calls the second), and the tokens put in are
/// not read again (an embedding named `emb` leaves `<emb:x:0>` alone).
///
/// ```
/// use sd_model::textual_inversion::{expand_prompt, token_names};
/// let names = [("style".to_string(), token_names("style", 1)), ("style.v2".to_string(), token_names("style.v2", 1)), ("emb".to_string(), token_names("emb", 1))];
/// assert_eq!(expand_prompt("a cat, Style.v2 and style", &names), "a cat, <emb:style.v2:0> and <emb:style:0>");
/// ```
pub fn expand_prompt(prompt: &str, embeddings: &[(String, Vec<String>)]) -> String {
    let word = |c: char| c.is_alphanumeric() || c == '_' || c == '-';
    let mut names: Vec<(String, String)> = embeddings.iter().map(|(name, tokens)| (name.to_lowercase(), tokens.join(" "))).filter(|(n, _)| !n.is_empty()).collect();
    // Longest first, so that the first name that matches is the longest.
    names.sort_by_key(|(n, _)| std::cmp::Reverse(n.chars().count()));
    let mut out = String::with_capacity(prompt.len());
    let (mut rest, mut prev) = (prompt, None::<char>);
    while let Some(c) = rest.chars().next() {
        // A whole word of `rest` that lower-cases to a name (compared char by char on the
        // original: lower-casing can change byte lengths outside ASCII, `İ`, `K`).
        if prev.is_none_or(|p| !word(p)) {
            let whole = |len: &usize| rest[*len..].chars().next().is_none_or(|n| !word(n));
            if let Some((len, tokens)) = names.iter().find_map(|(needle, tokens)| lower_prefix_len(rest, needle).filter(whole).map(|len| (len, tokens))) {
                out.push_str(tokens);
                prev = rest[..len].chars().next_back();
                rest = &rest[len..];
                continue;
            }
        }
        out.push(c);
        prev = Some(c);
        rest = &rest[c.len_utf8()..];
    }
    out
}

/// The byte length of the start of `text` that lower-cases to `needle` (lower case), if
/// one does.
fn lower_prefix_len(text: &str, needle: &str) -> Option<usize> {
    let mut rest = needle;
    for (i, c) in text.char_indices() {
        if rest.is_empty() {
            return Some(i);
        }
        for l in c.to_lowercase() {
            rest = rest.strip_prefix(l)?;
        }
    }
    rest.is_empty().then_some(text.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_found_beside_text_that_lower_cases_to_other_lengths() {
        let names = vec![("Good".to_string(), vec!["<emb:good:0>".to_string()])];
        // `İ` lower-cases to two chars, the Kelvin sign to a shorter `k`.
        assert_eq!(expand_prompt("İstanbul, good", &names), "İstanbul, <emb:good:0>");
        assert_eq!(expand_prompt("\u{212A}elvin GOOD, goods, notgood", &names), "\u{212A}elvin <emb:good:0>, goods, notgood");
        let turkish = vec![("İz".to_string(), vec!["<t>".to_string()])];
        assert_eq!(expand_prompt("an İz and an i\u{307}z", &turkish), "an <t> and an <t>");
    }

    #[test]
    fn files_name_their_word() {
        let dir = tempfile::tempdir().unwrap();
        let write = |file: &str, key: &str| {
            let path = dir.path().join(file);
            let t = HostTensor::new(vec![4], vec![0.1, 0.2, 0.3, 0.4]).unwrap();
            std::fs::write(&path, tensor_io::serialize(&[(key.to_string(), &t)], lora_core::SaveDtype::F32, Default::default()).unwrap()).unwrap();
            read_embedding(&path).unwrap()
        };
        let diffusers = write("learned_embeds.safetensors", "<cat-toy>");
        assert_eq!((diffusers.name.as_str(), diffusers.len(), diffusers.vectors[0].shape.as_slice()), ("<cat-toy>", 1, [1usize, 4].as_slice()));
        assert_eq!(write("BadHands.safetensors", "emb_params").name, "BadHands");
        assert_eq!(write("Old.safetensors", "*").name, "Old");
        let e = vec![("<cat-toy>".to_string(), token_names("<cat-toy>", 1))];
        assert_eq!(expand_prompt("a <cat-toy> on a mat", &e), "a <emb:<cat-toy>:0> on a mat");
    }

    /// kohya's start: the init word's rows, repeated to the vectors; without one, rows of
    /// the vocabulary's scale.
    #[test]
    fn initial_rows_repeat_the_init_word() {
        use burn::backend::Flex;
        let device = Default::default();
        let te = crate::ClipTextModel::<Flex>::new(&crate::ClipTextConfig::tiny(), &device).unwrap();
        let tokenizer = crate::tokenizer::ClipTokenizer::bundled().unwrap();
        let ids = tokenizer.encode_unpadded("red circle").unwrap();
        assert_eq!(ids.len(), 2);
        let rows = HostTensor::from_tensor(initial_rows(&te, &tokenizer, "red circle", 3, 0).unwrap()).unwrap();
        let want = HostTensor::from_tensor(te.token_rows(&[ids[0], ids[1], ids[0]]).unwrap()).unwrap();
        assert_eq!(rows, want);
        let random = HostTensor::from_tensor(initial_rows(&te, &tokenizer, "", 4, 1).unwrap()).unwrap();
        assert_eq!(random.shape, [4, 32]);
        <Flex as burn::tensor::backend::Backend>::seed(&device, 9);
        assert_eq!(random, HostTensor::from_tensor(initial_rows(&te, &tokenizer, "", 4, 1).unwrap()).unwrap(), "the seed alone decides");
        assert_ne!(random, HostTensor::from_tensor(initial_rows(&te, &tokenizer, "", 4, 2).unwrap()).unwrap());
        let table = HostTensor::from_tensor(te.text_model.embeddings.token_embedding.weight.val()).unwrap();
        let rms = |t: &HostTensor| (t.data.iter().map(|x| x * x).sum::<f32>() / t.data.len() as f32).sqrt();
        assert!((rms(&random) / rms(&table) - 1.0).abs() < 0.3, "{} vs {}", rms(&random), rms(&table));
        assert!(initial_rows(&te, &tokenizer, "x", 0, 0).is_err());
    }

    #[test]
    fn only_whole_words_expand() {
        let e = vec![("neg".to_string(), token_names("neg", 1))];
        assert_eq!(expand_prompt("neg, negative, a_neg, NEG", &e), "<emb:neg:0>, negative, a_neg, <emb:neg:0>");
        assert_eq!(expand_prompt("nothing here", &e), "nothing here");
    }
}
