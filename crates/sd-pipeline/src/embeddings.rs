//! Textual-inversion embeddings for sampling: the files a prompt names, loaded as added
//! tokens of the tokenizers and rows of the text encoders.

use burn::tensor::backend::Backend;
use sd_model::tokenizer::ClipTokenizer;

use crate::{Components, PipelineError};

/// How many of `texts` use `word` as a word of theirs (an embedding's name, a trigger
/// word), as [`sd_model::textual_inversion::expand_prompt`] finds names: whole words,
/// letter case ignored.
///
/// ```
/// let captions = ["a photo of mystyle", "mystyles are many", "MyStyle, a house"];
/// assert_eq!(sd_pipeline::texts_with_word("mystyle", captions.iter().copied()), 2);
/// ```
pub fn texts_with_word<'a>(word: &str, texts: impl Iterator<Item = &'a str>) -> usize {
    let names = vec![(word.to_string(), vec![String::new()])];
    texts.filter(|c| sd_model::textual_inversion::expand_prompt(c, &names) != *c).count()
}

/// The error naming `path` for an I/O failure.
fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> PipelineError + '_ {
    move |source| PipelineError::Io { path: path.to_path_buf(), source }
}

/// The embedding files of folder `dir` (A1111's `embeddings/`, subfolders included:
/// `.safetensors`, `.pt` and `.bin` files) whose names (file stems) `texts` use as a word,
/// by path: only those need loading, as A1111 applies only those a prompt names. An
/// unreadable folder is an error naming it.
///
/// ```
/// let dir = tempfile::tempdir().unwrap();
/// for name in ["EasyNegative.safetensors", "style/mystyle.pt", "unused.safetensors", "notes.txt"] {
///     let path = dir.path().join(name);
///     std::fs::create_dir_all(path.parent().unwrap()).unwrap();
///     std::fs::write(path, b"").unwrap();
/// }
/// let used = sd_pipeline::used_embedding_files(dir.path(), &["a house, mystyle", "(easynegative:1.2)"]).unwrap();
/// let names: Vec<_> = used.iter().map(|p| p.file_name().unwrap().to_str().unwrap()).collect();
/// assert_eq!(names, ["EasyNegative.safetensors", "mystyle.pt"]);
/// ```
pub fn used_embedding_files(dir: &std::path::Path, texts: &[&str]) -> Result<Vec<std::path::PathBuf>, PipelineError> {
    let mut found = Vec::new();
    let mut folders = vec![dir.to_path_buf()];
    while let Some(folder) = folders.pop() {
        let entries = std::fs::read_dir(&folder).map_err(io_err(&folder))?;
        for entry in entries {
            let path = entry.map_err(io_err(&folder))?.path();
            if path.is_dir() {
                folders.push(path);
                continue;
            }
            let known = path.extension().and_then(|e| e.to_str()).is_some_and(|e| ["safetensors", "pt", "bin"].contains(&e.to_ascii_lowercase().as_str()));
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default();
            if known && !stem.is_empty() && texts_with_word(stem, texts.iter().copied()) > 0 {
                found.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

/// Loads textual-inversion embeddings ([`sd_model::textual_inversion`]) into the model:
/// each file's vectors become added tokens of the tokenizer(s) and rows of the text
/// encoder(s) (SDXL files hold a set for each), then the embeddings bundled in `lora_files`
/// (A1111's `bundle_emb.NAME.…`, loaded with the LoRA as A1111 does; one whose name is
/// already taken, by a file or an earlier LoRA, is left out). Returns each embedding's name
/// with its tokens, for [`sd_model::textual_inversion::expand_prompt`]. Vectors that do not
/// fit the model (another family's width, one set for SDXL's two encoders) are an error
/// naming their file; so are two embedding files of one name.
pub fn load_embeddings<B: Backend>(
    c: &mut Components<B>,
    paths: &[std::path::PathBuf],
    lora_files: &[std::path::PathBuf],
    device: &B::Device,
) -> Result<Vec<(String, Vec<String>)>, PipelineError> {
    use sd_model::textual_inversion::{read_bundled_embeddings, read_embedding};
    let taken = |loaded: &[(String, Vec<String>)], name: &str| loaded.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
    let mut loaded: Vec<(String, Vec<String>)> = Vec::with_capacity(paths.len());
    for path in paths {
        let embedding = read_embedding(path)?;
        if taken(&loaded, &embedding.name) {
            return Err(PipelineError::Invalid { origin: path.display().to_string(), reason: format!("a second embedding named `{}`", embedding.name) });
        }
        loaded.push(add_embedding(c, embedding, path, device)?);
    }
    for path in lora_files {
        for embedding in read_bundled_embeddings(path)? {
            if !taken(&loaded, &embedding.name) {
                loaded.push(add_embedding(c, embedding, path, device)?);
            }
        }
    }
    Ok(loaded)
}

/// Adds one embedding's tokens and vectors to the model; `origin` names it in errors.
fn add_embedding<B: Backend>(c: &mut Components<B>, embedding: sd_model::textual_inversion::Embedding, origin: &std::path::Path, device: &B::Device) -> Result<(String, Vec<String>), PipelineError> {
    use sd_model::textual_inversion::token_names;
    let bad = |reason: String| PipelineError::Invalid { origin: format!("{} (embedding `{}`)", origin.display(), embedding.name), reason };
    // A name with brackets or a colon would come apart in the prompt's emphasis parsing.
    sd_model::textual_inversion::check_word(&embedding.name).map_err(|e| bad(format!("{e}: rename the file")))?;
    let encoders = if c.is_sdxl() { 2 } else { 1 };
    if embedding.vectors.len() != encoders {
        return Err(bad(format!("{} set(s) of vectors, this model has {encoders} text encoder(s) (SDXL embeddings hold clip_l and clip_g)", embedding.vectors.len())));
    }
    let tokens = token_names(&embedding.name, embedding.len());
    let mut targets: Vec<(&mut ClipTokenizer, &mut sd_model::ClipTextModel<B>)> = vec![(&mut c.tokenizer, &mut c.text_encoder)];
    if let (Some(t), Some(e)) = (c.tokenizer_2.as_mut(), c.text_encoder_2.as_mut()) {
        targets.push((t, e));
    }
    for ((tokenizer, encoder), vectors) in targets.into_iter().zip(&embedding.vectors) {
        if tokenizer.vocab_size() != encoder.vocab_size() {
            return Err(bad(format!("the tokenizer has {} ids but the text encoder {} rows", tokenizer.vocab_size(), encoder.vocab_size())));
        }
        let width = encoder.hidden_size();
        if vectors.shape[1] != width {
            return Err(bad(format!("vectors of width {}, this model's text encoder takes {width}: an embedding for another model family", vectors.shape[1])));
        }
        let (extended, _) = tokenizer.clone().with_added_tokens(&tokens)?;
        encoder.extend_vocabulary(vectors.to_tensor::<B, 2>(device)?)?;
        *tokenizer = extended;
    }
    Ok((embedding.name, tokens))
}
