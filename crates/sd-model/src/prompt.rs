//! Prompt emphasis in AUTOMATIC1111's syntax: `(word)` multiplies the attention to `word`
//! by 1.1, `[word]` divides it by 1.1, `(word:1.5)` sets a factor, brackets nest,
//! `\(` `\)` `\[` `\]` are literal brackets, and `BREAK` starts a new row of 75 tokens.
//!
//! [`parse_prompt_attention`] splits a prompt into text pieces with weights exactly as
//! A1111's `parse_prompt_attention` does; [`ClipTokenizer::weighted_words`] tokenizes the
//! pieces (each on its own, as A1111 does) and [`ClipTokenizer::encode_weighted`] lays them
//! out in the rows of [`ClipTokenizer::encode_chunked`] with one weight per joined hidden
//! state; [`apply_weights`] scales the text encoder's states by them and restores each
//! prompt's mean, as kohya's SD1.x / SD2.x sample pipeline does. Training captions with
//! kohya's `weighted_captions` are read as sd-scripts reads them
//! ([`parse_caption_attention`], [`ClipTokenizer::encode_weighted_caption`]) and only
//! scaled ([`scale_states`]).
//!
//! Where this differs from the UIs: A1111 keeps all 77 states of each row and breaks rows
//! at a comma near their end; kohya's sample pipeline (`lpw_stable_diffusion`) keeps 77
//! states per row too, has no `BREAK` and reads a weight only right after the colon
//! (`(x:1.2)`, not `(x: 1.2)`). Here rows are joined as kohya's training joins them
//! ([`crate::ClipTextModel::forward_chunked`]), so sampling sees contexts laid out as in
//! training.

use burn::tensor::backend::Backend;
use burn::tensor::{FloatDType, Tensor, TensorData};

use crate::tokenizer::{ClipTokenizer, Result};

/// One piece of a parsed prompt: text and its attention weight. `BREAK` is the piece
/// `("BREAK", -1.0)`, as in A1111: brackets around it multiply its weight like any other's,
/// which turns it into the word "BREAK" ([`PromptPiece::is_break`]).
#[derive(Debug, Clone, PartialEq)]
pub struct PromptPiece {
    /// The text.
    pub text: String,
    /// Its weight.
    pub weight: f64,
}

impl PromptPiece {
    fn new(text: impl Into<String>, weight: f64) -> Self {
        Self { text: text.into(), weight }
    }

    /// Whether the piece starts a new row (A1111's test: the text `BREAK` at weight −1).
    pub fn is_break(&self) -> bool {
        self.text == "BREAK" && self.weight == -1.0
    }
}

const ROUND: f64 = 1.1;
const SQUARE: f64 = 1.0 / 1.1;

/// Splits a prompt into weighted text pieces, as A1111's `parse_prompt_attention` does:
/// unbalanced brackets still apply to the rest of the prompt, an unknown `:` is text, and
/// neighbouring pieces of the same weight are merged. An empty prompt is one empty piece.
///
/// ```
/// use sd_model::prompt::parse_prompt_attention;
/// let pieces: Vec<(String, f64)> = parse_prompt_attention("an (important) word").into_iter().map(|p| (p.text, p.weight)).collect();
/// assert_eq!(pieces, [("an ".into(), 1.0), ("important".into(), 1.1), (" word".into(), 1.0)]);
/// assert_eq!(parse_prompt_attention(r"\(literal\]")[0].text, "(literal]");
/// ```
pub fn parse_prompt_attention(prompt: &str) -> Vec<PromptPiece> {
    parse_attention(prompt, Syntax::A1111)
}

/// Splits a training caption into weighted text pieces as kohya's `weighted_captions`
/// reads it (sd-scripts' `parse_prompt_attention`, the regex of an older A1111): as
/// [`parse_prompt_attention`], but a weight is `:1.2)` with no spaces around the number
/// (`(red: 1.5)` is the text `red: 1.5` at 1.1), and `BREAK` is a plain word.
///
/// ```
/// use sd_model::prompt::{parse_caption_attention, parse_prompt_attention};
/// let pieces = |p: Vec<sd_model::prompt::PromptPiece>| p.into_iter().map(|p| (p.text, p.weight)).collect::<Vec<_>>();
/// assert_eq!(pieces(parse_caption_attention("a (red:1.5) car")), pieces(parse_prompt_attention("a (red:1.5) car")));
/// assert_eq!(pieces(parse_caption_attention("a (red: 1.5) car")), [("a ".into(), 1.0), ("red: 1.5".into(), 1.1), (" car".into(), 1.0)]);
/// assert_eq!(pieces(parse_prompt_attention("a (red: 1.5) car"))[1], ("red".into(), 1.5));
/// ```
pub fn parse_caption_attention(caption: &str) -> Vec<PromptPiece> {
    parse_attention(caption, Syntax::Kohya)
}

/// Whose emphasis syntax a text is read with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Syntax {
    /// A1111's current one: spaces may surround a weight's number, `BREAK` starts a row.
    A1111,
    /// kohya's `weighted_captions`: `:N)` exactly, no `BREAK`.
    Kohya,
}

fn parse_attention(prompt: &str, syntax: Syntax) -> Vec<PromptPiece> {
    let mut pieces: Vec<PromptPiece> = Vec::new();
    let mut round: Vec<usize> = Vec::new();
    let mut square: Vec<usize> = Vec::new();
    let multiply = |pieces: &mut Vec<PromptPiece>, from: usize, factor: f64| {
        for piece in &mut pieces[from..] {
            piece.weight *= factor;
        }
    };
    for token in lex(prompt, syntax) {
        match token {
            Lexeme::Escaped(text) => pieces.push(PromptPiece::new(text, 1.0)),
            Lexeme::Open('(') => round.push(pieces.len()),
            Lexeme::Open(_) => square.push(pieces.len()),
            Lexeme::Weight(w, _) if !round.is_empty() => {
                let from = round.pop().unwrap_or_default();
                multiply(&mut pieces, from, w);
            }
            Lexeme::Close(')') if !round.is_empty() => {
                let from = round.pop().unwrap_or_default();
                multiply(&mut pieces, from, ROUND);
            }
            Lexeme::Close(']') if !square.is_empty() => {
                let from = square.pop().unwrap_or_default();
                multiply(&mut pieces, from, SQUARE);
            }
            other if syntax == Syntax::Kohya => pieces.push(PromptPiece::new(other.text(), 1.0)),
            other => {
                for (i, part) in split_breaks(other.text()).into_iter().enumerate() {
                    if i > 0 {
                        pieces.push(PromptPiece::new("BREAK", -1.0));
                    }
                    pieces.push(PromptPiece::new(part, 1.0));
                }
            }
        }
    }
    for from in round {
        multiply(&mut pieces, from, ROUND);
    }
    for from in square {
        multiply(&mut pieces, from, SQUARE);
    }
    if pieces.is_empty() {
        pieces.push(PromptPiece::new("", 1.0));
    }
    // Neighbours of the same weight become one piece (A1111 merges by weight alone).
    let mut merged: Vec<PromptPiece> = Vec::with_capacity(pieces.len());
    for piece in pieces {
        match merged.last_mut() {
            Some(last) if last.weight == piece.weight => last.text.push_str(&piece.text),
            _ => merged.push(piece),
        }
    }
    merged
}

/// The pieces of A1111's prompt regex, in its order of alternatives.
#[derive(Debug, Clone, PartialEq)]
enum Lexeme<'a> {
    /// `\(`, `\)`, `\[`, `\]` or `\\`: the character itself; a lone `\`: nothing (as in
    /// A1111, which drops it).
    Escaped(&'a str),
    /// `(` or `[`.
    Open(char),
    /// `:1.5)` (a weight closing a round bracket; text where no round bracket is open).
    Weight(f64, &'a str),
    /// `)` or `]`.
    Close(char),
    /// Any other run of text, or a `:` that is not a weight.
    Text(&'a str),
}

impl<'a> Lexeme<'a> {
    /// The text a lexeme stands for when it acts as plain text.
    fn text(&self) -> String {
        match self {
            Self::Open(c) | Self::Close(c) => c.to_string(),
            Self::Escaped(t) | Self::Weight(_, t) | Self::Text(t) => (*t).to_owned(),
        }
    }
}

/// A1111's tokenization of a prompt. A weight whose number does not parse (`:1.2.3)`) is
/// text, as Python's `float` would raise there and A1111 never produces such a prompt.
fn lex(s: &str, syntax: Syntax) -> Vec<Lexeme<'_>> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(c) = rest.chars().next() {
        let (lexeme, len) = match c {
            '\\' => match rest[1..].chars().next() {
                Some('(' | ')' | '[' | ']' | '\\') => (Lexeme::Escaped(&rest[1..2]), 2),
                _ => (Lexeme::Escaped(""), 1),
            },
            '(' | '[' => (Lexeme::Open(c), 1),
            ')' | ']' => (Lexeme::Close(c), 1),
            ':' => match weight(rest, syntax) {
                Some((w, len)) => (Lexeme::Weight(w, &rest[..len]), len),
                None => (Lexeme::Text(":"), 1),
            },
            _ => {
                let len = rest.find(['\\', '(', ')', '[', ']', ':']).unwrap_or(rest.len());
                (Lexeme::Text(&rest[..len]), len)
            }
        };
        out.push(lexeme);
        rest = &rest[len..];
    }
    out
}

/// `:\s*([+-]?[.\d]+)\s*\)` at the start of `s` (`:([+-]?[.\d]+)\)` in kohya's
/// syntax): the weight and the match length.
fn weight(s: &str, syntax: Syntax) -> Option<(f64, usize)> {
    let after_colon = &s[1..];
    let trim = |t: &'_ str| -> usize { if syntax == Syntax::A1111 { t.len() - t.trim_start().len() } else { 0 } };
    let body = &after_colon[trim(after_colon)..];
    let sign = usize::from(body.starts_with(['+', '-']));
    let digits = body[sign..].find(|c: char| !(c == '.' || c.is_ascii_digit())).unwrap_or(body.len() - sign);
    if digits == 0 {
        return None;
    }
    let number = &body[..sign + digits];
    let tail = &body[sign + digits..];
    let close = tail[trim(tail)..].strip_prefix(')')?;
    Some((number.parse().ok()?, s.len() - close.len()))
}

/// Splits at `\s*\bBREAK\b\s*` (the word BREAK in capitals, with the spaces around it).
fn split_breaks(text: String) -> Vec<String> {
    let word = |c: char| c.is_alphanumeric() || c == '_';
    let mut parts = Vec::new();
    let mut start = 0;
    let mut search = 0;
    while let Some(found) = text[search..].find("BREAK").map(|i| i + search) {
        let end = found + "BREAK".len();
        let before_ok = text[..found].chars().next_back().is_none_or(|c| !word(c));
        let after_ok = text[end..].chars().next().is_none_or(|c| !word(c));
        if before_ok && after_ok {
            parts.push(text[start..found].trim_end().to_owned());
            start = end + (text[end..].len() - text[end..].trim_start().len());
            search = start;
        } else {
            search = end;
        }
    }
    parts.push(text[start..].to_owned());
    parts
}

/// The largest emphasis weight (in size) a piece may have ([`crate::tokenizer::TokenizerError::Emphasis`]).
const MAX_WEIGHT: f64 = 1e30;

/// A prompt's BPE ids and their weights before framing ([`ClipTokenizer::weighted_words`]).
#[derive(Debug, Clone, PartialEq)]
pub struct WeightedWords {
    /// The ids, `BREAK`s expanded to an end token and pad tokens up to the next row.
    pub ids: Vec<u32>,
    /// One weight per id.
    pub weights: Vec<f32>,
    /// Rows of `max_length − 2` ids the prompt needs (at least 1; a `BREAK` at the end
    /// adds none).
    pub rows: usize,
}

impl ClipTokenizer {
    /// Tokenizes a prompt with A1111 emphasis ([`parse_prompt_attention`]): each piece on
    /// its own, as A1111 does, with its weight; a `BREAK` fills the current row with an end
    /// token and pad tokens (a whole row when the current one is empty at the start or
    /// after a `BREAK`, as A1111 starts an empty chunk; nothing right after words filled a
    /// row, which A1111's `BREAK` closes). A weight beyond 1e30 in size (brackets nested
    /// hundreds deep) is [`crate::tokenizer::TokenizerError::Emphasis`].
    pub fn weighted_words(&self, prompt: &str) -> Result<WeightedWords> {
        self.words_of(prompt, parse_prompt_attention(prompt))
    }

    /// [`weighted_words`](Self::weighted_words) of `prompt`'s `pieces`.
    fn words_of(&self, prompt: &str, pieces: Vec<PromptPiece>) -> Result<WeightedWords> {
        let inner = self.max_length().saturating_sub(2).max(1);
        let (mut ids, mut weights) = (Vec::new(), Vec::new());
        let mut content = 0;
        // Whether the current row was opened by a `BREAK` (or is the first): A1111 closes
        // a chunk that words filled when the next word arrives, so a `BREAK` right after a
        // full row only closes that row, while one on an opened, empty row adds an empty row.
        let mut opened = true;
        for piece in pieces {
            if piece.is_break() {
                let used = ids.len() % inner;
                if used == 0 && !opened {
                    opened = true;
                    continue;
                }
                let fill = inner - used;
                ids.push(self.eos_token_id());
                ids.extend(std::iter::repeat_n(self.pad_token_id(), fill - 1));
                weights.extend(std::iter::repeat_n(1.0, fill));
                opened = true;
                continue;
            }
            // The weighted states' mean is restored in f32 (`apply_weights`): sums of
            // 10^5 states stay finite for weights up to 1e30.
            if !(piece.weight.abs() <= MAX_WEIGHT) {
                return Err(crate::tokenizer::TokenizerError::Emphasis { prompt: prompt.to_string(), piece: piece.text, weight: piece.weight });
            }
            let words = self.encode_unpadded(&piece.text)?;
            opened &= words.is_empty();
            weights.extend(std::iter::repeat_n(piece.weight as f32, words.len()));
            ids.extend(words);
            content = ids.len();
        }
        Ok(WeightedWords { ids, weights, rows: content.div_ceil(inner).max(1) })
    }

    /// Encodes a prompt with A1111 emphasis ([`weighted_words`](Self::weighted_words)) into
    /// the rows of [`encode_chunked`](Self::encode_chunked) (`rows × max_length` ids; what
    /// does not fit is cut), and the weight of each state
    /// [`crate::ClipTextModel::forward_chunked`] returns for them
    /// (`rows × (max_length − 2) + 2`; 1 at the start, end and pad tokens). A prompt
    /// without brackets, backslashes or `BREAK` gives the ids of `encode_chunked` and
    /// weights of 1.
    ///
    /// ```
    /// use sd_model::tokenizer::ClipTokenizer;
    /// let tokenizer = ClipTokenizer::bundled()?;
    /// let (ids, weights) = tokenizer.encode_weighted("a (red:1.5) car", 1)?;
    /// assert_eq!(ids, tokenizer.encode("a red car")?);
    /// assert_eq!(&weights[..5], &[1.0, 1.0, 1.5, 1.0, 1.0]);
    /// # Ok::<(), sd_model::tokenizer::TokenizerError>(())
    /// ```
    pub fn encode_weighted(&self, prompt: &str, rows: usize) -> Result<(Vec<u32>, Vec<f32>)> {
        self.frame_weighted(self.weighted_words(prompt)?, rows)
    }

    /// [`encode_weighted`](Self::encode_weighted) of a training caption in kohya's
    /// `weighted_captions` syntax ([`parse_caption_attention`]).
    ///
    /// ```
    /// use sd_model::tokenizer::ClipTokenizer;
    /// let tokenizer = ClipTokenizer::bundled()?;
    /// let (ids, weights) = tokenizer.encode_weighted_caption("a (red: 1.5) car", 1)?;
    /// assert_eq!(ids, tokenizer.encode("a red: 1.5 car")?);
    /// assert!((weights[2] - 1.1).abs() < 1e-6);
    /// # Ok::<(), sd_model::tokenizer::TokenizerError>(())
    /// ```
    pub fn encode_weighted_caption(&self, caption: &str, rows: usize) -> Result<(Vec<u32>, Vec<f32>)> {
        self.frame_weighted(self.words_of(caption, parse_caption_attention(caption))?, rows)
    }

    /// Weighted words in `rows` rows ([`encode_weighted`](Self::encode_weighted)).
    fn frame_weighted(&self, words: WeightedWords, rows: usize) -> Result<(Vec<u32>, Vec<f32>)> {
        let rows = rows.max(1);
        let inner = self.max_length().saturating_sub(2).max(1);
        let WeightedWords { ids, mut weights, .. } = words;
        let ids = self.frame_chunked(ids, rows);
        weights.truncate(rows * inner);
        weights.resize(rows * inner, 1.0);
        let mut joined = Vec::with_capacity(rows * inner + 2);
        joined.push(1.0);
        joined.extend(weights);
        joined.push(1.0);
        Ok((ids, joined))
    }
}

/// Scales hidden states `[batch, len, dim]` by per-state `weights` (`batch × len`, from
/// [`ClipTokenizer::encode_weighted`]) and then by one factor per prompt that restores the
/// prompt's mean state value, as kohya's SD1.x / SD2.x sample pipeline does (the means in f32, whatever
/// the states' dtype). All-one weights return the states unchanged; a weight count that
/// is not `batch × len` is an error.
pub fn apply_weights<B: Backend>(hidden: Tensor<B, 3>, weights: &[f32]) -> crate::Result<Tensor<B, 3>> {
    check_weights(&hidden, weights)?;
    if weights.iter().all(|w| *w == 1.0) {
        return Ok(hidden);
    }
    let dtype = hidden.dtype();
    let hidden = hidden.cast(FloatDType::F32);
    let mean = |t: Tensor<B, 3>| t.mean_dim(2).mean_dim(1);
    let before = mean(hidden.clone());
    let weighted = scale_states(hidden, weights)?;
    let after = mean(weighted.clone());
    Ok((weighted * (before / after)).cast(FloatDType::from(dtype)))
}

/// `weights` must hold one weight per hidden state.
fn check_weights<B: Backend>(hidden: &Tensor<B, 3>, weights: &[f32]) -> crate::Result<()> {
    let [batch, len, _] = hidden.dims();
    if weights.len() != batch * len {
        return Err(crate::SdModelError::BadInput {
            what: "prompt weights".into(),
            reason: format!("{} weights for {batch} prompts of {len} states", weights.len()),
        });
    }
    Ok(())
}

/// Scales hidden states `[batch, len, dim]` by per-state `weights` (`batch × len`), and
/// nothing else: kohya's training does this with weighted captions (its
/// `encode_tokens_with_weights`), while its sample pipeline and A1111 also restore the
/// mean ([`apply_weights`]). A weight count that is not `batch × len` is an error.
///
/// ```
/// use burn::backend::Flex;
/// use burn::tensor::Tensor;
/// let hidden = Tensor::<Flex, 3>::ones([1, 2, 3], &Default::default());
/// let scaled = sd_model::prompt::scale_states(hidden, &[1.0, 1.5]).unwrap();
/// assert_eq!(scaled.into_data().to_vec::<f32>().unwrap(), [1.0, 1.0, 1.0, 1.5, 1.5, 1.5]);
/// ```
pub fn scale_states<B: Backend>(hidden: Tensor<B, 3>, weights: &[f32]) -> crate::Result<Tensor<B, 3>> {
    check_weights(&hidden, weights)?;
    let [batch, len, _] = hidden.dims();
    if weights.iter().all(|w| *w == 1.0) {
        return Ok(hidden);
    }
    let w = Tensor::<B, 3>::from_data(TensorData::new(weights.to_vec(), [batch, len, 1]), &hidden.device());
    Ok(hidden.clone() * w.cast(FloatDType::from(hidden.dtype())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn approx(got: Vec<PromptPiece>, want: &[(&str, f64)]) {
        assert_eq!(got.len(), want.len(), "{got:?}");
        for (g, (text, w)) in got.iter().zip(want) {
            assert_eq!(g.text, *text);
            assert!((g.weight - w).abs() < 1e-12, "{}: {} vs {w}", g.text, g.weight);
        }
    }

    /// The examples of A1111's `parse_prompt_attention` docstring, and its corner cases.
    #[test]
    fn a1111_docstring_examples() {
        approx(parse_prompt_attention("normal text"), &[("normal text", 1.0)]);
        approx(parse_prompt_attention("an (important) word"), &[("an ", 1.0), ("important", 1.1), (" word", 1.0)]);
        approx(parse_prompt_attention("(unbalanced"), &[("unbalanced", 1.1)]);
        approx(parse_prompt_attention(r"\(literal\]"), &[("(literal]", 1.0)]);
        approx(parse_prompt_attention("(unnecessary)(parens)"), &[("unnecessaryparens", 1.1)]);
        approx(
            parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."),
            &[
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ],
        );
        approx(parse_prompt_attention("[unbalanced"), &[("unbalanced", 1.0 / 1.1)]);
        approx(parse_prompt_attention("BREAKING news"), &[("BREAKING news", 1.0)]);
        approx(parse_prompt_attention("x:y (z: 2 ) w:"), &[("x:y ", 1.0), ("z", 2.0), (" w:", 1.0)]);
        approx(parse_prompt_attention(""), &[("", 1.0)]);
        // A weight with no bracket open is text; a lone backslash is dropped.
        approx(parse_prompt_attention("a:1.5) b"), &[("a:1.5) b", 1.0)]);
        approx(parse_prompt_attention(r"a\b \ c\\"), &[(r"ab  c\", 1.0)]);
        approx(parse_prompt_attention("(a) ) [b"), &[("a", 1.1), (" ) ", 1.0), ("b", 1.0 / 1.1)]);
    }

    /// `BREAK` is `("BREAK", -1)`; inside brackets its weight changes and it is a word.
    #[test]
    fn breaks_as_a1111_parses_them() {
        let a = parse_prompt_attention("a BREAK BREAK b");
        approx(a.clone(), &[("a", 1.0), ("BREAK", -1.0), ("", 1.0), ("BREAK", -1.0), ("b", 1.0)]);
        assert_eq!(a.iter().filter(|p| p.is_break()).count(), 2);
        let bracketed = parse_prompt_attention("(a BREAK b");
        approx(bracketed.clone(), &[("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]);
        assert!(!bracketed.iter().any(PromptPiece::is_break));
    }
}
