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
//! stands in a prompt.
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

use lora_core::{tensor_io, HostTensor};

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
}

fn bad(path: &Path, reason: impl Into<String>) -> SdModelError {
    SdModelError::BadInput { what: path.display().to_string(), reason: reason.into() }
}

/// Reads an embedding file (`.safetensors`; see the [module docs](self)).
pub fn read_embedding(path: &Path) -> Result<Embedding> {
    let mut name = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .filter(|s| !s.is_empty())
        .ok_or_else(|| bad(path, "no file name to call the embedding by"))?;
    let bytes = tensor_io::read_file(path)?;
    let (st, _) = tensor_io::parse(&bytes, path)?;
    let tensor = |key: &str| -> Result<HostTensor> {
        let view = st.tensor(key).map_err(|e| bad(path, format!("`{key}`: {e}")))?;
        let mut t = tensor_io::decode(&view, key, path)?;
        if t.shape.len() == 1 {
            t.shape.insert(0, 1);
        }
        if t.shape.len() != 2 || t.shape[0] == 0 {
            return Err(bad(path, format!("`{key}` has shape {:?}; expected [vectors, width]", t.shape)));
        }
        Ok(t)
    };
    let names: Vec<&str> = st.names();
    let vectors = if names.contains(&"emb_params") {
        vec![tensor("emb_params")?]
    } else if names.contains(&"clip_l") && names.contains(&"clip_g") {
        let (l, g) = (tensor("clip_l")?, tensor("clip_g")?);
        if l.shape[0] != g.shape[0] {
            return Err(bad(path, format!("clip_l has {} vectors and clip_g {}", l.shape[0], g.shape[0])));
        }
        vec![l, g]
    } else if let [only] = names.as_slice() {
        // diffusers names the tensor by its token, which is the word then.
        if *only != "*" {
            name = only.to_string();
        }
        vec![tensor(only)?]
    } else {
        return Err(bad(path, format!("expected `emb_params`, `clip_l` and `clip_g`, or one tensor; found {names:?}")));
    };
    if vectors.iter().any(|v| v.data.iter().any(|x| !x.is_finite())) {
        return Err(bad(path, "the vectors hold NaN or infinite values"));
    }
    Ok(Embedding { name, vectors })
}

/// The added tokens of embedding `name`'s `n` vectors: `<emb:NAME:0>` ... (no word of a
/// prompt is spelt so by accident).
pub fn token_names(name: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("<emb:{name}:{i}>")).collect()
}

/// `prompt` with every whole-word occurrence of an embedding's name (case-insensitive, as
/// CLIP lower-cases prompts; bounded by anything but letters, digits, `_` and `-`) replaced by
/// its tokens, space-separated. `embeddings` pairs each name with its [`token_names`].
pub fn expand_prompt(prompt: &str, embeddings: &[(String, Vec<String>)]) -> String {
    let mut text = prompt.to_string();
    for (name, tokens) in embeddings {
        let (lower, needle) = (text.to_lowercase(), name.to_lowercase());
        // Lower-casing can change byte lengths outside ASCII: match on the original then.
        if lower.len() != text.len() || needle.is_empty() {
            continue;
        }
        let word = |c: char| c.is_alphanumeric() || c == '_' || c == '-';
        let mut out = String::with_capacity(text.len());
        let mut at = 0;
        while let Some(found) = lower[at..].find(&needle) {
            let (start, end) = (at + found, at + found + needle.len());
            let before = text[..start].chars().next_back().is_none_or(|c| !word(c));
            let after = text[end..].chars().next().is_none_or(|c| !word(c));
            out.push_str(&text[at..start]);
            if before && after {
                out.push_str(&tokens.join(" "));
            } else {
                out.push_str(&text[start..end]);
            }
            at = end;
        }
        out.push_str(&text[at..]);
        text = out;
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn only_whole_words_expand() {
        let e = vec![("neg".to_string(), token_names("neg", 1))];
        assert_eq!(expand_prompt("neg, negative, a_neg, NEG", &e), "<emb:neg:0>, negative, a_neg, <emb:neg:0>");
        assert_eq!(expand_prompt("nothing here", &e), "nothing here");
    }
}
