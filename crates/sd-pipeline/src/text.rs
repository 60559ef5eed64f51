//! Prompts and captions to the UNet's conditioning: CLIP tokens in rows of 75, A1111's
//! emphasis syntax, SDXL's two encoders and pooled embedding.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use sd_model::tokenizer::ClipTokenizer;

use crate::{Components, PipelineError};

/// Most rows of 75 tokens a prompt is laid out in (A1111 prompts rarely need more than 8;
/// each row costs the UNet's cross-attention 75 more keys); [`prompt_rows`] cuts longer
/// prompts there.
pub const MAX_TOKEN_ROWS: usize = 8;

/// Whether `n` is a `max_token_length` prompts can be laid out in: a multiple of 75 from
/// 75 up to [`MAX_TOKEN_ROWS`] rows (kohya's 75, 150, 225, and A1111's longer prompts).
///
/// ```
/// assert!(sd_pipeline::text::is_max_token_length(150));
/// assert!(!sd_pipeline::text::is_max_token_length(0) && !sd_pipeline::text::is_max_token_length(100));
/// ```
pub fn is_max_token_length(n: usize) -> bool {
    n > 0 && n.is_multiple_of(75) && n <= 75 * MAX_TOKEN_ROWS
}

/// The text encoders a prompt goes through, with their tokenizers: one for SD1.x / SD2.x,
/// SDXL's two.
pub struct TextEncoders<'a, B: Backend> {
    /// The (first) encoder and its tokenizer.
    pub first: (&'a sd_model::ClipTextModel<B>, &'a ClipTokenizer),
    /// SDXL's second encoder (with the pooled projection) and its tokenizer.
    pub second: Option<(&'a sd_model::ClipTextModel<B>, &'a ClipTokenizer)>,
}

// By hand: derived impls would ask `B: Copy`.
impl<B: Backend> Clone for TextEncoders<'_, B> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<B: Backend> Copy for TextEncoders<'_, B> {}

impl<'a, B: Backend> TextEncoders<'a, B> {
    /// The encoders of a model.
    pub fn of(c: &'a Components<B>) -> Self {
        Self {
            first: (&c.text_encoder, &c.tokenizer),
            second: c.text_encoder_2.as_ref().zip(c.tokenizer_2.as_ref()),
        }
    }
}

/// What the UNet is conditioned on: the text states `[N, tokens, D]` and, for SDXL, the
/// second encoder's pooled embedding `[N, P]`.
#[derive(Debug, Clone)]
pub struct TextConditioning<B: Backend> {
    /// Text states (SDXL: both encoders' penultimate-layer states side by side).
    pub context: Tensor<B, 3>,
    /// SDXL's pooled embedding (`text_embeds`).
    pub pooled: Option<Tensor<B, 2>>,
}

impl<B: Backend> TextConditioning<B> {
    /// Conditionings of several batches stacked along the batch.
    pub fn cat(parts: Vec<Self>) -> Self {
        let pooled = parts.iter().map(|p| p.pooled.clone()).collect::<Option<Vec<_>>>().map(|p| Tensor::cat(p, 0));
        Self { context: Tensor::cat(parts.into_iter().map(|p| p.context).collect(), 0), pooled }
    }

    /// SDXL's added conditioning for images of `(height, width)` pixels (original and
    /// target size, no crop, as diffusers' pipelines sample), when there is a pooled
    /// embedding.
    pub fn added(&self, (height, width): (usize, usize)) -> Option<sd_model::AddedConditions<B>> {
        let pooled = self.pooled.clone()?;
        let n = pooled.dims()[0];
        let size = (height as u32, width as u32);
        let time_ids = sd_model::AddedConditions::sdxl_time_ids(&vec![(size, (0, 0), size); n], &pooled.device());
        Some(sd_model::AddedConditions { text_embeds: pooled, time_ids })
    }
}

/// Encodes rows of ids (`ids` for the first tokenizer, `ids_2` for SDXL's second) to the
/// UNet's conditioning. SDXL conditions on both encoders' penultimate layers without the
/// final norm (whatever `clip_skip` says, as kohya's sd-scripts do) and on the second
/// encoder's pooled output of each prompt's first row.
fn condition<B: Backend>(
    encoders: TextEncoders<'_, B>,
    ids: Vec<Vec<u32>>,
    ids_2: Option<Vec<Vec<u32>>>,
    clip_skip: usize,
    device: &B::Device,
) -> Result<TextConditioning<B>, PipelineError> {
    let (te, tok) = encoders.first;
    let ids = te.token_ids(&ids, device)?;
    match (encoders.second, ids_2) {
        (Some((te2, tok2)), Some(ids_2)) => {
            let one = te.forward_chunked_pooled(ids, tok.max_length(), 2, false)?;
            let ids_2 = te2.token_ids(&ids_2, device)?;
            let two = te2.forward_chunked_pooled(ids_2, tok2.max_length(), 2, false)?;
            Ok(TextConditioning { context: Tensor::cat(vec![one.hidden, two.hidden], 2), pooled: Some(two.pooled) })
        }
        _ => Ok(TextConditioning { context: te.forward_chunked(ids, tok.max_length(), clip_skip)?, pooled: None }),
    }
}

/// The ids of `prompts` for SDXL's second tokenizer (which pads differently), when there is one.
fn second_ids(encoders: TextEncoders<'_, impl Backend>, encode: impl Fn(&ClipTokenizer) -> Result<Vec<Vec<u32>>, PipelineError>) -> Result<Option<Vec<Vec<u32>>>, PipelineError> {
    encoders.second.map(|(_, tok)| encode(tok)).transpose()
}

/// Rows of `tokenizer.max_length()` ids that hold `max_token_length` prompt tokens (75 per
/// row for CLIP; at least one row).
pub fn token_rows(tokenizer: &ClipTokenizer, max_token_length: usize) -> usize {
    (max_token_length / tokenizer.max_length().saturating_sub(2).max(1)).max(1)
}

/// Token ids `[N, rows × 77]` of `prompts` (rows: [`token_rows`]) for `text_encoder`,
/// read literally (no emphasis syntax) and checked against its vocabulary
/// ([`sd_model::ClipTextModel::token_ids`]).
///
/// ```
/// use burn::backend::Flex;
/// use sd_pipeline::{load_components, prompt_ids};
///
/// let device = Default::default();
/// let c = load_components::<Flex>("tiny", 0, &device)?;
/// let ids = prompt_ids(&c.text_encoder, &c.tokenizer, &["a house".into(), "a tree".into()], 150, &device)?;
/// assert_eq!(ids.dims(), [2, 2 * 77]);
/// # Ok::<(), sd_pipeline::PipelineError>(())
/// ```
pub fn prompt_ids<B: Backend>(
    text_encoder: &sd_model::ClipTextModel<B>,
    tokenizer: &ClipTokenizer,
    prompts: &[String],
    max_token_length: usize,
    device: &B::Device,
) -> Result<Tensor<B, 2, Int>, PipelineError> {
    let rows = token_rows(tokenizer, max_token_length);
    let ids = prompts.iter().map(|p| tokenizer.encode_chunked(p, rows)).collect::<Result<Vec<_>, _>>()?;
    Ok(text_encoder.token_ids(&ids, device)?)
}

/// Rows of 75 tokens to sample `prompts` (with their negative prompt) with: as many as the
/// longest needs after A1111 emphasis and `BREAK`s (as A1111 adds rows), at least the
/// rows of `max_token_length` (the layout a LoRA trained with it saw), at most
/// [`MAX_TOKEN_ROWS`] (the rest is cut). All prompts of a batch must share it.
pub fn prompt_rows<'a>(tokenizer: &ClipTokenizer, prompts: impl IntoIterator<Item = &'a str>, max_token_length: usize) -> Result<usize, PipelineError> {
    let least = token_rows(tokenizer, max_token_length);
    let mut rows = least;
    for p in prompts {
        rows = rows.max(tokenizer.weighted_words(p)?.rows);
    }
    Ok(rows.min(MAX_TOKEN_ROWS.max(least)))
}

/// Encodes prompts for sampling to text embeddings `[N, 75 × rows + 2, D]` (`[N, 77, D]`
/// for one row; rows joined as kohya's sd-scripts join them in training:
/// [`sd_model::ClipTextModel::forward_chunked`]; `rows` from [`prompt_rows`]), reading
/// A1111's emphasis syntax: `(word)`, `[word]`, `(word:1.3)`, `BREAK`
/// ([`sd_model::prompt`]). Captions for training go through [`encode_captions`]. For SDXL this
/// is the states only: [`condition_prompts`] gives the pooled embedding too.
pub fn encode_prompts<B: Backend>(c: &Components<B>, prompts: &[String], clip_skip: usize, rows: usize, device: &B::Device) -> Result<Tensor<B, 3>, PipelineError> {
    Ok(condition_prompts(c, prompts, clip_skip, rows, device)?.context)
}

/// [`encode_prompts`] with SDXL's pooled embedding: the whole conditioning of `prompts`.
///
/// SDXL: each encoder's states are weighted and get their own mean back, as AUTOMATIC1111
/// weighs them; the pooled embedding is not weighted. An empty negative prompt is encoded
/// as the text `""` (as kohya's sd-scripts and ComfyUI sample), not as zeros (diffusers'
/// `force_zeros_for_empty_prompt`).
pub fn condition_prompts<B: Backend>(c: &Components<B>, prompts: &[String], clip_skip: usize, rows: usize, device: &B::Device) -> Result<TextConditioning<B>, PipelineError> {
    let (cond, weights) = weighted_condition(TextEncoders::of(c), prompts, Emphasis::Prompt, clip_skip, rows, device)?;
    let context = weights.apply(cond.context, sd_model::prompt::apply_weights)?;
    Ok(TextConditioning { context, pooled: cond.pooled })
}

/// The emphasis weights of each encoder's states: each tokenizer's own, as the two can
/// split a prompt differently (SDXL's second tokenizer keeps its pad token `!` apart, so
/// `wow!!` is two tokens there and one, `!!`, in the first).
struct StateWeights {
    first: Vec<f32>,
    /// The second encoder's, and the width of the first encoder's states (where the
    /// second's begin in the joined context).
    second: Option<(Vec<f32>, usize)>,
}

impl StateWeights {
    /// `context` with `weigh` applied to each encoder's states with its weights.
    fn apply<B: Backend>(&self, context: Tensor<B, 3>, weigh: fn(Tensor<B, 3>, &[f32]) -> sd_model::Result<Tensor<B, 3>>) -> Result<Tensor<B, 3>, PipelineError> {
        let Some((second, width)) = &self.second else {
            return Ok(weigh(context, &self.first)?);
        };
        let [n, tokens, d] = context.dims();
        let one = context.clone().slice([0..n, 0..tokens, 0..*width]);
        let two = context.slice([0..n, 0..tokens, *width..d]);
        Ok(Tensor::cat(vec![weigh(one, &self.first)?, weigh(two, second)?], 2))
    }
}

/// Whose emphasis syntax [`weighted_condition`] reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Emphasis {
    /// A1111's, for prompts ([`sd_model::prompt::parse_prompt_attention`]).
    Prompt,
    /// kohya's `weighted_captions`, for training captions
    /// ([`sd_model::prompt::parse_caption_attention`]).
    Caption,
}

/// The conditioning of prompts read with emphasis, in `rows` rows, and the weights of its
/// states.
fn weighted_condition<B: Backend>(
    encoders: TextEncoders<'_, B>,
    prompts: &[String],
    emphasis: Emphasis,
    clip_skip: usize,
    rows: usize,
    device: &B::Device,
) -> Result<(TextConditioning<B>, StateWeights), PipelineError> {
    let weighted = |tok: &ClipTokenizer| -> Result<(Vec<Vec<u32>>, Vec<f32>), PipelineError> {
        let (mut ids, mut weights) = (Vec::with_capacity(prompts.len()), Vec::new());
        for p in prompts {
            let (i, w) = match emphasis {
                Emphasis::Prompt => tok.encode_weighted(p, rows)?,
                Emphasis::Caption => tok.encode_weighted_caption(p, rows)?,
            };
            ids.push(i);
            weights.extend(w);
        }
        Ok((ids, weights))
    };
    let (ids, first) = weighted(encoders.first.1)?;
    let (ids_2, second) = match encoders.second {
        Some((_, tok)) => {
            let (ids, weights) = weighted(tok)?;
            let width = encoders.first.0.text_model.final_layer_norm.gamma.dims()[0];
            (Some(ids), Some((weights, width)))
        }
        None => (None, None),
    };
    Ok((condition(encoders, ids, ids_2, clip_skip, device)?, StateWeights { first, second }))
}

/// How caption text is read when it is encoded for training ([`condition_captions`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CaptionSyntax {
    /// Literally, as kohya's training reads captions by default: parentheses and brackets
    /// are text.
    #[default]
    Literal,
    /// With kohya's `weighted_captions` syntax ([`sd_model::prompt::parse_caption_attention`]:
    /// A1111's brackets, a weight written `(word:1.2)` with no spaces around the number):
    /// it scales the word's hidden states and nothing else, as kohya's training does
    /// ([`sd_model::prompt::scale_states`]; sample prompts also keep the mean). `BREAK` is a
    /// plain word here, as in kohya's training (it would start a new row). The pooled
    /// embedding is not weighted (kohya's SDXL training leaves it as it is).
    Weighted,
}

/// Encodes captions for training with one given text encoder (one being trained, say) in
/// the rows of `max_token_length` (longer captions are cut): the text states
/// `[N, 75 × rows + 2, D]`. Prompts for sampling go through [`encode_prompts`] instead,
/// which always reads emphasis and adds rows for long prompts. SDXL's two encoders:
/// [`condition_captions`].
///
/// ```
/// use burn::backend::Flex;
/// use sd_pipeline::{encode_captions, load_components, CaptionSyntax};
///
/// let device = Default::default();
/// let c = load_components::<Flex>("tiny", 0, &device)?;
/// let captions = ["a (red:1.5) house".to_string()];
/// let encode = |syntax| encode_captions(&c.text_encoder, &c.tokenizer, &captions, syntax, 1, 75, &device);
/// let (literal, weighted) = (encode(CaptionSyntax::Literal)?, encode(CaptionSyntax::Weighted)?);
/// assert_eq!(literal.dims(), weighted.dims());
/// assert!(!literal.equal(weighted).all().into_scalar());
/// # Ok::<(), sd_pipeline::PipelineError>(())
/// ```
pub fn encode_captions<B: Backend>(
    text_encoder: &sd_model::ClipTextModel<B>,
    tokenizer: &ClipTokenizer,
    captions: &[String],
    syntax: CaptionSyntax,
    clip_skip: usize,
    max_token_length: usize,
    device: &B::Device,
) -> Result<Tensor<B, 3>, PipelineError> {
    let encoders = TextEncoders { first: (text_encoder, tokenizer), second: None };
    Ok(condition_captions(encoders, captions, syntax, clip_skip, max_token_length, device)?.context)
}

/// [`encode_captions`] through one or two encoders ([`TextEncoders`]): the whole
/// conditioning of training captions, SDXL's pooled embedding included.
pub fn condition_captions<B: Backend>(
    encoders: TextEncoders<'_, B>,
    captions: &[String],
    syntax: CaptionSyntax,
    clip_skip: usize,
    max_token_length: usize,
    device: &B::Device,
) -> Result<TextConditioning<B>, PipelineError> {
    let rows = token_rows(encoders.first.1, max_token_length);
    match syntax {
        CaptionSyntax::Literal => {
            let chunked = |tok: &ClipTokenizer| -> Result<Vec<Vec<u32>>, PipelineError> { Ok(captions.iter().map(|p| tok.encode_chunked(p, rows)).collect::<Result<_, _>>()?) };
            let ids = chunked(encoders.first.1)?;
            let ids_2 = second_ids(encoders, chunked)?;
            condition(encoders, ids, ids_2, clip_skip, device)
        }
        CaptionSyntax::Weighted => {
            let (cond, weights) = weighted_condition(encoders, captions, Emphasis::Caption, clip_skip, rows, device)?;
            Ok(TextConditioning { context: weights.apply(cond.context, sd_model::prompt::scale_states)?, pooled: cond.pooled })
        }
    }
}

/// How many of `prompts` have more tokens than `max_token_length` (their tail is not seen
/// by the text encoder), and the largest token count.
pub fn overlong_prompts<'a>(tokenizer: &ClipTokenizer, prompts: impl IntoIterator<Item = &'a str>, max_token_length: usize) -> Result<(usize, usize), PipelineError> {
    let limit = token_rows(tokenizer, max_token_length) * tokenizer.max_length().saturating_sub(2);
    let (mut over, mut longest) = (0, 0);
    for p in prompts {
        let n = tokenizer.encode_unpadded(p)?.len();
        over += usize::from(n > limit);
        longest = longest.max(n);
    }
    Ok((over, longest))
}
