//! The `[embedding]` of a run: a textual-inversion embedding trained alone (kohya's
//! `train_textual_inversion.py`) or with the adapters (pivotal tuning).
//!
//! Its word becomes `vectors` new tokens of each text encoder's tokenizer, whose rows are
//! trainable ([`sd_model::ClipTextModel::add_trained_tokens`]); captions and sample prompts
//! are expanded to those tokens where the word stands
//! ([`sd_model::textual_inversion::expand_prompt`]), or made from templates. A run with
//! adapters bundles the vectors in its LoRA files (`bundle_emb.WORD.…`, which A1111 and
//! `trainer generate --lora` load); a run without writes embedding files (`emb_params`, or
//! SDXL's `clip_l` and `clip_g`) as kohya's does.

use std::path::Path;

use burn::tensor::backend::AutodiffBackend;
use lora_core::HostTensor;
use sd_model::textual_inversion::{initial_rows, read_bundled_embeddings, read_embedding, token_names, Embedding};
use sd_pipeline::Components;
use lora_core::Component;

use crate::config::EmbeddingSection;
use crate::TrainError;

/// The embedding a run trains: its word, tokens and caption templates.
#[derive(Debug, Clone)]
pub struct TrainedEmbedding {
    /// The word captions and prompts call it by.
    pub word: String,
    /// Its added tokens, one per vector ([`token_names`]).
    pub tokens: Vec<String>,
    /// Captions made from these instead of the dataset's (`{}`: the word).
    templates: Option<&'static [&'static str]>,
}

impl TrainedEmbedding {
    /// Adds the embedding's tokens to `frozen`'s tokenizers and its trainable rows to
    /// `encoders` (the text encoders in training, in order), started from
    /// `embedding.weights`, `embedding.init_word`, the embedding of that word bundled in
    /// `network_weights` (the LoRA a run continues, when neither is set), or the
    /// vocabulary's statistics (rows drawn on the host from the run's `seed` and the
    /// encoder, [`lora_core::adapter_seed`] of `text_encoder.embedding` /
    /// `text_encoder_2.embedding`: the same on every backend).
    pub fn attach<B: AutodiffBackend>(
        cfg: &EmbeddingSection,
        (network_weights, seed): (&str, u64),
        frozen: &mut Components<B::InnerBackend>,
        encoders: &mut [sd_model::ClipTextModel<B>],
        device: &B::Device,
    ) -> Result<Self, TrainError> {
        let tokens = token_names(&cfg.token, cfg.vectors);
        let start = match (cfg.weights.is_empty(), cfg.init_word.is_empty()) {
            (false, _) => Some((starting_file(cfg)?, format!("embedding.weights = {}", cfg.weights))),
            // A pivotal-tuning LoRA continued: its embedding goes on with it.
            (true, true) => bundled(Path::new(network_weights), &cfg.token).map(|e| (e, format!("lora.network_weights = {network_weights}"))),
            (true, false) => None,
        };
        if let Some((e, origin)) = &start {
            check_counts(cfg, e, origin, encoders.len())?;
        }
        let mut tokenizers = vec![&mut frozen.tokenizer];
        tokenizers.extend(frozen.tokenizer_2.as_mut());
        for (i, (tokenizer, encoder)) in tokenizers.into_iter().zip(encoders.iter_mut()).enumerate() {
            let bad = |reason: String| TrainError::Config { origin: "embedding".into(), reason };
            if tokenizer.vocab_size() != encoder.vocab_size() {
                return Err(bad(format!("the tokenizer has {} ids but the text encoder {} rows", tokenizer.vocab_size(), encoder.vocab_size())));
            }
            let rows = match &start {
                Some((e, origin)) => {
                    let width = encoder.hidden_size();
                    if e.vectors[i].shape[1] != width {
                        return Err(TrainError::Config {
                            origin: origin.clone(),
                            reason: format!("vectors of width {}, this model's text encoder takes {width}: an embedding for another model family", e.vectors[i].shape[1]),
                        });
                    }
                    e.vectors[i].to_tensor::<B, 2>(device)?
                }
                None => initial_rows(encoder, tokenizer, &cfg.init_word, cfg.vectors, lora_core::adapter_seed(seed, &format!("{}.embedding", if i == 0 { Component::TextEncoder } else { Component::TextEncoder2 }.peft_prefix()))).map_err(|e| TrainError::Config { origin: "embedding.init_word".into(), reason: e.to_string() })?,
            };
            let (extended, _) = tokenizer.clone().with_added_tokens(&tokens)?;
            encoder.add_trained_tokens(rows)?;
            *tokenizer = extended;
        }
        Ok(Self { word: cfg.token.clone(), tokens, templates: cfg.template.prompts() })
    }

    /// The word with its tokens, for [`expand_prompt`](sd_model::textual_inversion::expand_prompt).
    pub fn names(&self) -> Vec<(String, Vec<String>)> {
        vec![(self.word.clone(), self.tokens.clone())]
    }

    /// The caption to train on: `caption`, or with templates the one `pick` chooses, with
    /// the word expanded to the tokens.
    pub fn caption(&self, caption: &str, pick: u64) -> String {
        let text = match self.templates {
            Some(t) => t[(pick % t.len() as u64) as usize].replace("{}", &self.word),
            None => caption.to_string(),
        };
        self.expand(&text)
    }

    /// `prompt` with the word expanded to the tokens.
    pub fn expand(&self, prompt: &str) -> String {
        sd_model::textual_inversion::expand_prompt(prompt, &self.names())
    }

    /// Whether captions come from templates.
    pub fn uses_templates(&self) -> bool {
        self.templates.is_some()
    }

    /// The trained vectors of `encoders` (f32 master values), as an embedding called by
    /// the word.
    pub fn vectors<B: AutodiffBackend>(&self, encoders: &[sd_model::ClipTextModel<B>]) -> Result<Embedding, TrainError> {
        let vectors = encoders
            .iter()
            .map(|te| match &te.trained_tokens {
                Some(rows) => Ok(HostTensor::from_tensor(rows.val())?),
                None => Err(TrainError::Config { origin: "embedding".into(), reason: "a text encoder lost its trained tokens".into() }),
            })
            .collect::<Result<_, TrainError>>()?;
        Ok(Embedding { name: self.word.clone(), vectors })
    }
}

/// The embedding called `word` that the LoRA file `path` bundles, if it is a file that
/// bundles one.
fn bundled(path: &Path, word: &str) -> Option<Embedding> {
    if !path.is_file() {
        return None;
    }
    read_bundled_embeddings(path).ok()?.into_iter().find(|e| e.name.eq_ignore_ascii_case(word))
}

/// `embedding.weights`: an embedding file, or a LoRA file bundling one called by the word.
fn starting_file(cfg: &EmbeddingSection) -> Result<Embedding, TrainError> {
    let path = Path::new(&cfg.weights);
    let all = read_bundled_embeddings(path).unwrap_or_default();
    if all.is_empty() {
        return Ok(read_embedding(path)?);
    }
    all.into_iter().find(|e| e.name.eq_ignore_ascii_case(&cfg.token)).ok_or_else(|| TrainError::Config {
        origin: format!("embedding.weights = {}", path.display()),
        reason: format!("the file bundles no embedding called `{}`", cfg.token),
    })
}

/// Starting vectors (from `origin`) must hold `embedding.vectors` vectors for each of the
/// model's `encoders` text encoders.
fn check_counts(cfg: &EmbeddingSection, embedding: &Embedding, origin: &str, encoders: usize) -> Result<(), TrainError> {
    let bad = |reason: String| Err(TrainError::Config { origin: origin.to_string(), reason });
    if embedding.vectors.len() != encoders {
        return bad(format!("{} set(s) of vectors, this model has {encoders} text encoder(s) (SDXL embeddings hold clip_l and clip_g)", embedding.vectors.len()));
    }
    if embedding.len() != cfg.vectors {
        return bad(format!("{} vectors; set embedding.vectors = {}", embedding.len(), embedding.len()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_pick_and_expand() {
        let e = TrainedEmbedding { word: "toy".into(), tokens: token_names("toy", 2), templates: Some(&["a photo of a {}", "the {}"]) };
        assert_eq!(e.caption("ignored", 1), "the <emb:toy:0> <emb:toy:1>");
        assert_eq!(e.caption("ignored", 2), "a photo of a <emb:toy:0> <emb:toy:1>");
        let plain = TrainedEmbedding { templates: None, ..e };
        assert_eq!(plain.caption("toy, red", 7), "<emb:toy:0> <emb:toy:1>, red");
    }
}
