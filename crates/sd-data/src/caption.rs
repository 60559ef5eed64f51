//! Caption transforms as in kohya sd-scripts `process_caption`: prefix and suffix, trigger
//! word, caption dropout, wildcards, token warmup, tag shuffle with `keep_tokens` or
//! `keep_tokens_separator`, tag dropout, the secondary separator.

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
    /// Joins tags into one for shuffling and dropout, replaced by `separator` at the end
    /// (kohya's `secondary_separator`, e.g. `;;;`).
    pub secondary_separator: Option<&'a str>,
    /// kohya's `enable_wildcard`: one line of a multi-line caption per sample, and each
    /// `{a|b|c}` replaced by one of its options (`{{` and `}}` are literal braces).
    pub wildcard: bool,
    /// kohya's token warmup (`None` = off).
    pub token_warmup: Option<TokenWarmup>,
}

/// kohya's token warmup: before step `steps` a caption keeps only its first movable tags
/// (those after the kept ones, before shuffling and tag dropout), `min` at step 0 and
/// linearly more up to all of them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TokenWarmup {
    /// Tags kept at step 0 (`token_warmup_min`).
    pub min: usize,
    /// The first step with every tag (`token_warmup_step`, in steps).
    pub steps: f64,
}

impl TokenWarmup {
    /// How many of a caption's `n` movable tags it keeps at optimizer step `step` (from 0):
    /// sd-scripts' `floor(step · (n − min) / steps) + min`, all of them from `steps` on.
    ///
    /// ```
    /// let w = sd_data::TokenWarmup { min: 1, steps: 10.0 };
    /// assert_eq!([0, 1, 5, 9, 10].map(|step| w.tags_at(5, step)), [1, 1, 3, 4, 5]);
    /// ```
    pub fn tags_at(&self, n: usize, step: u64) -> usize {
        if self.steps <= 0.0 || step as f64 >= self.steps {
            return n;
        }
        let grown = (step as f64 * ((n as f64 - self.min as f64) / self.steps)).floor() + self.min as f64;
        grown.clamp(0.0, n as f64) as usize
    }
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
            secondary_separator: s.secondary_separator.as_deref().filter(|t| !t.is_empty()),
            wildcard: s.enable_wildcard,
            token_warmup: (s.token_warmup_step > 0.0).then_some(TokenWarmup { min: s.token_warmup_min, steps: s.token_warmup_step }),
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

    /// Whether [`apply`](Self::apply) is deterministic and the same at every step (no
    /// shuffling, dropout, wildcards or token warmup).
    pub fn is_fixed(&self) -> bool {
        !self.shuffle && self.tag_dropout_rate <= 0.0 && self.caption_dropout_rate <= 0.0 && !self.wildcard && self.token_warmup.is_none()
    }

    /// Splits a caption into trimmed, non-empty tags.
    pub fn tags<'c>(&self, caption: &'c str) -> Vec<&'c str> {
        caption
            .split(self.separator)
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .collect()
    }

    /// The string tags are joined with: `", "`, whatever the separator, as sd-scripts'
    /// `process_caption` joins them (`caption_separator = "|"` splits `a|b|c` into three
    /// tags that train as `a, b, c` once shuffled or dropped).
    pub fn joiner(&self) -> String {
        ", ".to_string()
    }

    /// The caption with the deterministic part of the transform only (prefix and suffix,
    /// trigger word, the keep separator removed, the secondary separator replaced).
    pub fn fixed(&self, caption: &str) -> String {
        self.unjoined(self.fixed_tags(caption))
    }

    /// The secondary separator replaced by the separator, as kohya does last.
    fn unjoined(&self, caption: String) -> String {
        match self.secondary_separator {
            Some(sep) => caption.replace(sep, self.separator),
            None => caption,
        }
    }

    fn fixed_tags(&self, caption: &str) -> String {
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
    /// then (with wildcards) one draw per choice of a line or an option, then the shuffle,
    /// then one draw per non-kept tag for tag dropout.
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
        self.apply_at(caption, u64::MAX, rng)
    }

    /// [`apply`](Self::apply) at optimizer step `step` (from 0), for the token warmup:
    /// before its last step the movable tags are cut to the first
    /// [`TokenWarmup::tags_at`] of them, before the shuffle and the tag dropout.
    /// ([`apply`](Self::apply) is this past any warmup.)
    ///
    /// ```
    /// use rand::SeedableRng;
    /// let subset = sd_data::SubsetConfig { keep_tokens: 1, token_warmup_min: 1, token_warmup_step: 4.0, ..Default::default() };
    /// let t = sd_data::CaptionTransform::from_subset(&subset);
    /// let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    /// assert_eq!(t.apply_at("sks, red, round, shiny", 0, &mut rng), "sks, red");
    /// assert_eq!(t.apply_at("sks, red, round, shiny", 2, &mut rng), "sks, red, round");
    /// assert_eq!(t.apply_at("sks, red, round, shiny", 4, &mut rng), "sks, red, round, shiny");
    /// ```
    pub fn apply_at<R: Rng + ?Sized>(&self, caption: &str, step: u64, rng: &mut R) -> String {
        if self.caption_dropout_rate > 0.0 && rng.random::<f32>() < self.caption_dropout_rate {
            return String::new();
        }
        let chosen;
        let caption = if self.wildcard {
            chosen = wildcards(caption, rng);
            chosen.as_str()
        } else {
            caption
        };
        let out = self.shuffled(caption, step, rng);
        self.unjoined(out)
    }

    /// Token warmup, shuffle and tag dropout, or the deterministic transform without them.
    fn shuffled<R: Rng + ?Sized>(&self, caption: &str, step: u64, rng: &mut R) -> String {
        if self.shuffle || self.tag_dropout_rate > 0.0 || self.token_warmup.is_some() {
            let framed = self.framed(caption);
            let (mut out, mut flex, last) = self.parts(&framed);
            if let Some(warmup) = self.token_warmup {
                flex.truncate(warmup.tags_at(flex.len(), step));
            }
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
            self.fixed_tags(caption)
        }
    }

    fn with_trigger<'c>(&self, mut tags: Vec<&'c str>) -> Vec<&'c str>
    where
        'a: 'c,
    {
        if let Some(t) = self.trigger_word && tags.first() != Some(&t) {
            tags.insert(0, t);
        }
        tags
    }
}

/// One piece of a caption for [`wildcards`]: kohya first turns `{{` and `}}` into
/// placeholders (left to right), then replaces each `{options}` (at least one character, no
/// `}`) by one of its `|`-separated options.
#[derive(Clone, Copy, PartialEq)]
enum Piece {
    Open,
    Close,
    Char(char),
}

/// kohya's `enable_wildcard` on `caption`: a random line of a multi-line caption, then each
/// `{a|b|c}` replaced by a random option; `{{` and `}}` stand for literal braces. One draw
/// per choice, in order.
pub(crate) fn wildcards<R: Rng + ?Sized>(caption: &str, rng: &mut R) -> String {
    let lines: Vec<&str> = caption.split('\n').collect();
    let line = if lines.len() > 1 { lines[rng.random_range(0..lines.len())] } else { caption };
    let chars: Vec<char> = line.chars().collect();
    let mut pieces = Vec::with_capacity(chars.len());
    let mut i = 0;
    while i < chars.len() {
        match (chars[i], chars.get(i + 1)) {
            ('{', Some('{')) | ('}', Some('}')) => {
                pieces.push(Piece::Char(chars[i]));
                i += 2;
            }
            ('{', _) => {
                pieces.push(Piece::Open);
                i += 1;
            }
            ('}', _) => {
                pieces.push(Piece::Close);
                i += 1;
            }
            (c, _) => {
                pieces.push(Piece::Char(c));
                i += 1;
            }
        }
    }
    let text = |p: &[Piece]| -> String {
        p.iter()
            .map(|p| match p {
                Piece::Open => '{',
                Piece::Close => '}',
                Piece::Char(c) => *c,
            })
            .collect()
    };
    let mut out = String::with_capacity(line.len());
    let mut i = 0;
    while i < pieces.len() {
        let close = (pieces[i] == Piece::Open).then(|| pieces[i + 1..].iter().position(|p| *p == Piece::Close)).flatten();
        match close {
            Some(len) if len > 0 => {
                let group = text(&pieces[i + 1..i + 1 + len]);
                let options: Vec<&str> = group.split('|').collect();
                out.push_str(options[rng.random_range(0..options.len())]);
                i += len + 2;
            }
            _ => {
                out.push_str(&text(&pieces[i..i + 1]));
                i += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn all_outputs(caption: &str) -> std::collections::BTreeSet<String> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        (0..200).map(|_| wildcards(caption, &mut rng)).collect()
    }

    #[test]
    fn wildcards_pick_lines_and_options_as_kohya() {
        let got = all_outputs("a {red|blue} {cat|dog}");
        assert_eq!(got.into_iter().collect::<Vec<_>>(), ["a blue cat", "a blue dog", "a red cat", "a red dog"]);
        let got = all_outputs("first line\nsecond {x|y}");
        assert_eq!(got.into_iter().collect::<Vec<_>>(), ["first line", "second x", "second y"]);
        // Escaped braces are literal; an empty group and an unclosed brace stay as they are.
        assert_eq!(all_outputs("{{a|b}} {} {c").into_iter().collect::<Vec<_>>(), ["{a|b} {} {c"]);
        // An escaped brace inside a group is part of the option; empty options count.
        let got = all_outputs("{x{{y|}");
        assert_eq!(got.into_iter().collect::<Vec<_>>(), ["", "x{y"]);
        // No choice, no draw.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let before = rng.clone();
        assert_eq!(wildcards("plain, tags", &mut rng), "plain, tags");
        assert_eq!(rng, before);
    }

    #[test]
    fn the_secondary_separator_keeps_tags_together_and_becomes_the_separator() {
        let subset = SubsetConfig { shuffle_caption: true, secondary_separator: Some(";;;".into()), ..Default::default() };
        let t = CaptionTransform::from_subset(&subset);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        for _ in 0..20 {
            let out = t.apply("red;;;shiny, circle, flat", &mut rng);
            assert!(out.contains("red,shiny") && !out.contains(";;;"), "{out}");
        }
        assert_eq!(t.fixed("red;;;shiny, circle"), "red,shiny, circle");
        let wild = SubsetConfig { enable_wildcard: true, ..Default::default() };
        assert!(!CaptionTransform::from_subset(&wild).is_fixed() && !wild.captions_are_fixed());
    }
}
