//! Caption transforms as in kohya sd-scripts `process_caption`: trigger word, caption dropout,
//! tag shuffle with `keep_tokens`, tag dropout.

use rand::seq::SliceRandom;
use rand::Rng;

use crate::config::SubsetConfig;

/// The caption options of a subset, borrowed.
#[derive(Clone, Copy, Debug)]
pub struct CaptionTransform<'a> {
    /// Tag separator used for splitting; tags are joined with its trimmed form plus a space.
    pub separator: &'a str,
    /// Leading tags that are never shuffled or dropped.
    pub keep_tokens: usize,
    /// Shuffle the remaining tags.
    pub shuffle: bool,
    /// Per-tag dropout probability for the remaining tags.
    pub tag_dropout_rate: f32,
    /// Probability of an empty caption.
    pub caption_dropout_rate: f32,
    /// Tag inserted first unless the caption already starts with it.
    pub trigger_word: Option<&'a str>,
}

impl<'a> CaptionTransform<'a> {
    /// The transform described by a subset's config.
    pub fn from_subset(s: &'a SubsetConfig) -> Self {
        Self {
            separator: &s.caption_separator,
            keep_tokens: s.keep_tokens,
            shuffle: s.shuffle_caption,
            tag_dropout_rate: s.caption_tag_dropout_rate,
            caption_dropout_rate: s.caption_dropout_rate,
            trigger_word: s
                .trigger_word
                .as_deref()
                .map(str::trim)
                .filter(|t| !t.is_empty()),
        }
    }

    /// Whether [`apply`](Self::apply) is deterministic (no shuffling or dropout).
    pub fn is_fixed(&self) -> bool {
        !self.shuffle && self.tag_dropout_rate <= 0.0 && self.caption_dropout_rate <= 0.0
    }

    /// Splits a caption into trimmed, non-empty tags.
    pub fn tags<'c>(&self, caption: &'c str) -> Vec<&'c str> {
        caption
            .split(self.separator)
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .collect()
    }

    /// The string tags are joined with: `", "` for the separator `","`.
    pub fn joiner(&self) -> String {
        let t = self.separator.trim();
        if t.is_empty() {
            self.separator.to_string()
        } else {
            format!("{t} ")
        }
    }

    /// The caption with the deterministic part of the transform only (trigger word).
    pub fn fixed(&self, caption: &str) -> String {
        match self.trigger_word {
            None => caption.trim().to_string(),
            Some(_) => self.with_trigger(self.tags(caption)).join(&self.joiner()),
        }
    }

    /// Applies the transform, drawing randomness from `rng` in a fixed order: caption dropout,
    /// then the shuffle, then one draw per non-kept tag for tag dropout.
    ///
    /// ```
    /// use rand::SeedableRng;
    /// let subset = sd_data::SubsetConfig { shuffle_caption: true, keep_tokens: 1, ..Default::default() };
    /// let t = sd_data::CaptionTransform::from_subset(&subset);
    /// let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    /// let out = t.apply("sks, red, round, shiny", &mut rng);
    /// assert!(out.starts_with("sks, "));
    /// let mut tags: Vec<_> = out.split(", ").collect();
    /// tags.sort();
    /// assert_eq!(tags, ["red", "round", "shiny", "sks"]);
    /// ```
    pub fn apply<R: Rng + ?Sized>(&self, caption: &str, rng: &mut R) -> String {
        if self.caption_dropout_rate > 0.0 && rng.random::<f32>() < self.caption_dropout_rate {
            return String::new();
        }
        if self.shuffle || self.tag_dropout_rate > 0.0 {
            let tags = self.with_trigger(self.tags(caption));
            let keep = self.keep_tokens.min(tags.len());
            let (fixed, flex) = tags.split_at(keep);
            let mut flex = flex.to_vec();
            if self.shuffle {
                flex.shuffle(rng);
            }
            if self.tag_dropout_rate > 0.0 {
                flex.retain(|_| rng.random::<f32>() >= self.tag_dropout_rate);
            }
            let mut out = fixed.to_vec();
            out.extend(flex);
            out.join(&self.joiner())
        } else {
            self.fixed(caption)
        }
    }

    fn with_trigger<'c>(&self, mut tags: Vec<&'c str>) -> Vec<&'c str>
    where
        'a: 'c,
    {
        if let Some(t) = self.trigger_word {
            if tags.first() != Some(&t) {
                tags.insert(0, t);
            }
        }
        tags
    }
}
