//! Caption transforms as in kohya sd-scripts `process_caption`: prefix and suffix, trigger
//! word, caption dropout, tag shuffle with `keep_tokens` or `keep_tokens_separator`, tag
//! dropout.

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
    /// Text put in front of the caption, followed by a space.
    pub prefix: Option<&'a str>,
    /// Text put after the caption, after a space.
    pub suffix: Option<&'a str>,
    /// Marker of the kept tags inside the caption (`keep_tokens_separator`).
    pub keep_separator: Option<&'a str>,
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
            prefix: s.caption_prefix.as_deref().filter(|t| !t.is_empty()),
            suffix: s.caption_suffix.as_deref().filter(|t| !t.is_empty()),
            keep_separator: s.keep_tokens_separator.as_deref().filter(|t| !t.is_empty()),
        }
    }

    /// The caption with the prefix and suffix (kohya: joined with a space).
    fn framed(&self, caption: &str) -> String {
        let mut out = String::new();
        if let Some(p) = self.prefix {
            out.push_str(p);
            out.push(' ');
        }
        out.push_str(caption);
        if let Some(s) = self.suffix {
            out.push(' ');
            out.push_str(s);
        }
        out
    }

    /// The tags of a framed caption as (kept first, movable, kept last): split at the
    /// keep separator when the caption has one, else the first `keep_tokens` are kept
    /// (after the trigger word is inserted).
    fn parts<'c>(&self, caption: &'c str) -> (Vec<&'c str>, Vec<&'c str>, Vec<&'c str>)
    where
        'a: 'c,
    {
        if let Some(sep) = self.keep_separator.filter(|sep| caption.contains(*sep)) {
            let mut pieces = caption.splitn(3, sep);
            let fixed = self.with_trigger(self.tags(pieces.next().unwrap_or_default()));
            let flex = self.tags(pieces.next().unwrap_or_default());
            // Separators past the second are dropped too: none reaches the text encoder.
            let last = pieces.next().unwrap_or_default().split(sep).flat_map(|part| self.tags(part)).collect();
            return (fixed, flex, last);
        }
        let tags = self.with_trigger(self.tags(caption));
        let keep = self.keep_tokens.min(tags.len());
        let (fixed, flex) = tags.split_at(keep);
        (fixed.to_vec(), flex.to_vec(), Vec::new())
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

    /// The caption with the deterministic part of the transform only (prefix and suffix,
    /// trigger word, the keep separator removed).
    pub fn fixed(&self, caption: &str) -> String {
        let framed = self.framed(caption);
        if self.keep_separator.is_some_and(|sep| framed.contains(sep)) {
            let (mut tags, flex, last) = self.parts(&framed);
            tags.extend(flex);
            tags.extend(last);
            return tags.join(&self.joiner());
        }
        match self.trigger_word {
            None => framed.trim().to_string(),
            Some(_) => self.with_trigger(self.tags(&framed)).join(&self.joiner()),
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
            let framed = self.framed(caption);
            let (mut out, mut flex, last) = self.parts(&framed);
            if self.shuffle {
                flex.shuffle(rng);
            }
            if self.tag_dropout_rate > 0.0 {
                flex.retain(|_| rng.random::<f32>() >= self.tag_dropout_rate);
            }
            out.extend(flex);
            out.extend(last);
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
