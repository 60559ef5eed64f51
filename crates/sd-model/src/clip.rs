//! The CLIP text encoder, as transformers' `CLIPTextModel` and (with the pooled-output
//! projection SDXL's second encoder has) `CLIPTextModelWithProjection`.
//!
//! Module paths match transformers (`text_model.encoder.layers.0.self_attn.q_proj`) so
//! checkpoints load without renaming and LoRA keys resolve to the right layers. Every
//! linear layer is a [`LoraLinear`], so adapters attach by path without rebuilding.

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, LayerNorm, LayerNormConfig, LinearConfig};
use burn::tensor::activation::{gelu, sigmoid};
use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor};
use lora_core::LoraLinear;

use crate::attention::multi_head_attention;
use crate::config::{ClipTextConfig, HiddenAct};
use crate::{Result, SdModelError};

fn lora_linear<B: Backend>(d_in: usize, d_out: usize, device: &B::Device) -> LoraLinear<B> {
    LoraLinear::new(LinearConfig::new(d_in, d_out).init(device))
}

/// Token and position embeddings.
#[derive(Module, Debug)]
pub struct ClipEmbeddings<B: Backend> {
    /// `[vocab, hidden]`.
    pub token_embedding: Embedding<B>,
    /// `[max_positions, hidden]`.
    pub position_embedding: Embedding<B>,
}

/// Causal self-attention with separate q/k/v projections.
#[derive(Module, Debug)]
pub struct ClipAttention<B: Backend> {
    /// Query projection.
    pub q_proj: LoraLinear<B>,
    /// Key projection.
    pub k_proj: LoraLinear<B>,
    /// Value projection.
    pub v_proj: LoraLinear<B>,
    /// Output projection.
    pub out_proj: LoraLinear<B>,
    /// Number of heads.
    pub num_heads: usize,
}

impl<B: Backend> ClipAttention<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let q = self.q_proj.forward(x.clone());
        let k = self.k_proj.forward(x.clone());
        let v = self.v_proj.forward(x);
        self.out_proj.forward(multi_head_attention(q, k, v, self.num_heads, true))
    }
}

/// The feed-forward block.
#[derive(Module, Debug)]
pub struct ClipMlp<B: Backend> {
    /// `hidden → intermediate`.
    pub fc1: LoraLinear<B>,
    /// `intermediate → hidden`.
    pub fc2: LoraLinear<B>,
    /// Activation between the two.
    #[module(skip)]
    pub act: HiddenAct,
}

impl<B: Backend> ClipMlp<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let h = self.fc1.forward(x);
        let h = match self.act {
            HiddenAct::QuickGelu => h.clone() * sigmoid(h * 1.702),
            HiddenAct::Gelu => gelu(h),
        };
        self.fc2.forward(h)
    }
}

/// One pre-LayerNorm transformer layer.
#[derive(Module, Debug)]
pub struct ClipEncoderLayer<B: Backend> {
    /// Self-attention.
    pub self_attn: ClipAttention<B>,
    /// Norm before attention.
    pub layer_norm1: LayerNorm<B>,
    /// Feed-forward.
    pub mlp: ClipMlp<B>,
    /// Norm before the feed-forward.
    pub layer_norm2: LayerNorm<B>,
}

impl<B: Backend> ClipEncoderLayer<B> {
    fn forward(&self, x: Tensor<B, 3>) -> Tensor<B, 3> {
        let x = x.clone() + self.self_attn.forward(self.layer_norm1.forward(x));
        x.clone() + self.mlp.forward(self.layer_norm2.forward(x))
    }
}

/// The stack of encoder layers.
#[derive(Module, Debug)]
pub struct ClipEncoder<B: Backend> {
    /// Layers in order.
    pub layers: Vec<ClipEncoderLayer<B>>,
}

/// Embeddings, encoder and final norm (`text_model` in transformers).
#[derive(Module, Debug)]
pub struct ClipTextTransformer<B: Backend> {
    /// Embeddings.
    pub embeddings: ClipEmbeddings<B>,
    /// Encoder layers.
    pub encoder: ClipEncoder<B>,
    /// Norm applied to the selected hidden state.
    pub final_layer_norm: LayerNorm<B>,
}

/// The CLIP text encoder (`CLIPTextModel`, or `CLIPTextModelWithProjection` when its config
/// says so: see [`ClipTextConfig::text_projection_dim`]).
///
/// ```
/// use burn::backend::Flex;
/// use burn::tensor::{Int, Tensor};
/// use sd_model::{ClipTextConfig, ClipTextModel};
///
/// let device = Default::default();
/// let model = ClipTextModel::<Flex>::new(&ClipTextConfig::tiny(), &device).unwrap();
/// let ids = Tensor::<Flex, 2, Int>::zeros([2, 77], &device);
/// let hidden = model.forward(ids, 1).unwrap();
/// assert_eq!(hidden.dims(), [2, 77, 32]);
/// ```
#[derive(Module, Debug)]
pub struct ClipTextModel<B: Backend> {
    /// The transformer.
    pub text_model: ClipTextTransformer<B>,
    /// The bias-free projection of the pooled output (`CLIPTextModelWithProjection`).
    pub text_projection: Option<LoraLinear<B>>,
    /// Which of the pipeline's encoders this is, for adapter files (`lora_te_` /
    /// `text_encoder.` or, for SDXL's second, `lora_te2_` / `text_encoder_2.`): the second
    /// when the model has the projection, else the first ([`with_component`](Self::with_component)
    /// says otherwise).
    #[module(skip)]
    pub component: lora_core::Component,
    /// Rows appended by [`extend_vocabulary`](Self::extend_vocabulary) (textual-inversion
    /// tokens), whose ids the pooled row never points at.
    #[module(skip)]
    added_rows: usize,
    /// Trainable token rows `[n, hidden]` after the token embedding's (textual inversion,
    /// pivotal tuning): ids `table rows..table rows + n`
    /// ([`add_trained_tokens`](Self::add_trained_tokens)); `None` for an encoder without.
    pub trained_tokens: Option<burn::module::Param<Tensor<B, 2>>>,
}

/// What [`ClipTextModel::forward_pooled`] returns.
#[derive(Debug, Clone)]
pub struct ClipOutput<B: Backend> {
    /// The hidden states `[batch, seq, hidden]` that `clip_skip` selects.
    pub hidden: Tensor<B, 3>,
    /// The final-normed last-layer state at each row's end token `[batch, hidden]`,
    /// projected by `text_projection` when the model has one (`[batch, projection]`):
    /// transformers' `pooler_output`, or `text_embeds` with the projection.
    pub pooled: Tensor<B, 2>,
}

impl<B: Backend> ClipTextModel<B> {
    /// A randomly initialised encoder (load weights with [`crate::load`]).
    pub fn new(config: &ClipTextConfig, device: &B::Device) -> Result<Self> {
        config.validate("text encoder config")?;
        let d = config.hidden_size;
        let ln = || LayerNormConfig::new(d).with_epsilon(config.layer_norm_eps).init(device);
        let layers = (0..config.num_hidden_layers)
            .map(|_| ClipEncoderLayer {
                self_attn: ClipAttention {
                    q_proj: lora_linear(d, d, device),
                    k_proj: lora_linear(d, d, device),
                    v_proj: lora_linear(d, d, device),
                    out_proj: lora_linear(d, d, device),
                    num_heads: config.num_attention_heads,
                },
                layer_norm1: ln(),
                mlp: ClipMlp {
                    fc1: lora_linear(d, config.intermediate_size, device),
                    fc2: lora_linear(config.intermediate_size, d, device),
                    act: config.hidden_act,
                },
                layer_norm2: ln(),
            })
            .collect();
        Ok(Self {
            text_model: ClipTextTransformer {
                embeddings: ClipEmbeddings {
                    token_embedding: EmbeddingConfig::new(config.vocab_size, d).init(device),
                    position_embedding: EmbeddingConfig::new(config.max_position_embeddings, d).init(device),
                },
                encoder: ClipEncoder { layers },
                final_layer_norm: ln(),
            },
            text_projection: config
                .text_projection_dim()
                .map(|p| LoraLinear::new(LinearConfig::new(d, p).with_bias(false).init(device))),
            // SDXL's second encoder is the one with the projection.
            component: match config.text_projection_dim() {
                Some(_) => lora_core::Component::TextEncoder2,
                None => lora_core::Component::TextEncoder,
            },
            added_rows: 0,
            trained_tokens: None,
        })
    }

    /// The model as the pipeline's `component` encoder (SDXL's second encoder is
    /// [`Component::TextEncoder2`](lora_core::Component::TextEncoder2)).
    pub fn with_component(mut self, component: lora_core::Component) -> Self {
        self.component = component;
        self
    }

    /// Size of the token vocabulary (rows of the token embedding).
    pub fn vocab_size(&self) -> usize {
        self.table_rows() + self.trained_tokens.as_ref().map_or(0, |t| t.dims()[0])
    }

    /// Rows of the token embedding's table (the vocabulary without trained tokens).
    fn table_rows(&self) -> usize {
        self.text_model.embeddings.token_embedding.weight.dims()[0]
    }

    /// Appends `rows` (`[n, hidden]`, their starting values) as trainable tokens, ids
    /// `vocab_size()..vocab_size() + n`, as textual inversion and pivotal tuning train
    /// them (kohya's `train_textual_inversion.py`): their gradients flow and the rest of the
    /// model stays as it is. The rows are kept in f32 (an optimizer's master values) and
    /// looked up apart from the frozen table, so a step's gradient is `[n, hidden]`, not
    /// the whole vocabulary's. The pooled row passes over them, as over
    /// [`extend_vocabulary`](Self::extend_vocabulary)'s. One set per model; add frozen rows
    /// first.
    ///
    /// ```
    /// use burn::backend::{Autodiff, Flex};
    /// use burn::tensor::{Int, Tensor};
    /// use sd_model::{ClipTextConfig, ClipTextModel};
    ///
    /// type B = Autodiff<Flex>;
    /// let device = Default::default();
    /// let mut model = ClipTextModel::<B>::new(&ClipTextConfig::tiny(), &device).unwrap();
    /// let first = model.vocab_size() as i64;
    /// model.add_trained_tokens(Tensor::zeros([2, model.hidden_size()], &device)).unwrap();
    /// let ids = Tensor::<B, 2, Int>::from_ints([[0, first, first + 1, 1]], &device);
    /// let grads = model.forward(ids, 1).unwrap().sum().backward();
    /// let rows = model.trained_tokens.as_ref().unwrap();
    /// assert_eq!(rows.grad(&grads).unwrap().dims(), [2, model.hidden_size()]);
    /// ```
    pub fn add_trained_tokens(&mut self, rows: Tensor<B, 2>) -> Result<()> {
        let d = self.hidden_size();
        let bad = |reason: String| SdModelError::BadInput { what: "trained token rows".into(), reason };
        if self.trained_tokens.is_some() {
            return Err(bad("this text encoder already has trained tokens".into()));
        }
        let [n, width] = rows.dims();
        if width != d || n == 0 {
            return Err(bad(format!("shape [{n}, {width}], expected [n >= 1, {d}] (this text encoder's width)")));
        }
        self.added_rows += n;
        let rows = rows.cast(burn::tensor::FloatDType::F32).detach();
        self.trained_tokens = Some(burn::module::Param::from_tensor(rows).set_require_grad(true));
        Ok(())
    }

    /// Appends `rows` (`[n, hidden]`, e.g. textual-inversion vectors) to the token
    /// embedding, frozen like the rest: they become ids `vocab_size()..vocab_size() + n`.
    pub fn extend_vocabulary(&mut self, rows: Tensor<B, 2>) -> Result<()> {
        let weight = self.text_model.embeddings.token_embedding.weight.val();
        let [_, d] = weight.dims();
        if rows.dims()[1] != d {
            return Err(SdModelError::BadInput {
                what: "token embedding rows".into(),
                reason: format!("{} values per vector, this text encoder's width is {d}", rows.dims()[1]),
            });
        }
        if self.trained_tokens.is_some() {
            // Their ids follow the table's: rows appended to it would take them.
            return Err(SdModelError::BadInput {
                what: "token embedding rows".into(),
                reason: "add frozen rows before trained tokens".into(),
            });
        }
        let rows = rows.cast(weight.dtype());
        self.added_rows += rows.dims()[0];
        self.text_model.embeddings.token_embedding.weight = burn::module::Param::from_tensor(Tensor::cat(vec![weight, rows], 0)).set_require_grad(false);
        Ok(())
    }

    /// Width of the hidden states (and of the token embedding's rows).
    pub fn hidden_size(&self) -> usize {
        self.text_model.embeddings.token_embedding.weight.dims()[1]
    }

    /// Number of encoder layers.
    pub fn num_layers(&self) -> usize {
        self.text_model.encoder.layers.len()
    }

    /// Token ids from the host as the `[batch, seq]` tensor [`forward`](Self::forward)
    /// takes, checked against this model: every row as long as the first and every id below
    /// [`vocab_size`](Self::vocab_size). `forward` does not read the ids back to check them
    /// (that would wait for the device in every step): an id past the vocabulary panics in
    /// the embedding lookup on the CPU and is undefined on a GPU, so build the ids here (a
    /// tokenizer with added tokens, [`ClipTokenizer::with_added_tokens`](crate::tokenizer::ClipTokenizer::with_added_tokens),
    /// needs the model's rows for them, [`extend_vocabulary`](Self::extend_vocabulary)).
    ///
    /// ```
    /// use burn::backend::Flex;
    /// use sd_model::{ClipTextConfig, ClipTextModel};
    ///
    /// let device = Default::default();
    /// let model = ClipTextModel::<Flex>::new(&ClipTextConfig::tiny(), &device).unwrap();
    /// let ids = model.token_ids(&[vec![49406, 320, 49407]], &device).unwrap();
    /// assert_eq!(model.forward(ids, 1).unwrap().dims(), [1, 3, model.hidden_size()]);
    /// assert!(model.token_ids(&[vec![49406, model.vocab_size() as u32]], &device).is_err());
    /// ```
    pub fn token_ids(&self, rows: &[Vec<u32>], device: &B::Device) -> Result<Tensor<B, 2, Int>> {
        let bad = |reason: String| SdModelError::BadInput { what: "token ids".into(), reason };
        let len = rows.first().map_or(0, Vec::len);
        if len == 0 {
            return Err(bad("no ids: at least one row of at least one id is needed".into()));
        }
        if let Some((i, row)) = rows.iter().enumerate().find(|(_, r)| r.len() != len) {
            return Err(bad(format!("row {i} has {} ids, row 0 {len}: every row needs the same length", row.len())));
        }
        let vocab = self.vocab_size();
        if let Some(id) = rows.iter().flatten().find(|id| **id as usize >= vocab) {
            return Err(bad(format!("id {id} is outside the text encoder's vocabulary of {vocab} (a tokenizer with added tokens needs the encoder's rows for them)")));
        }
        let flat: Vec<i64> = rows.iter().flatten().map(|&id| i64::from(id)).collect();
        Ok(Tensor::<B, 1, Int>::from_ints(flat.as_slice(), device).reshape([rows.len(), len]))
    }

    /// Encodes token ids `[batch, seq]` to hidden states `[batch, seq, hidden]`.
    ///
    /// `clip_skip` follows A1111 / kohya: 1 uses the last layer, 2 the penultimate one, ...;
    /// the final LayerNorm is applied to the selected layer's output either way. The ids
    /// must be below [`vocab_size`](Self::vocab_size), which is not checked here (see
    /// [`token_ids`](Self::token_ids), which builds checked ids).
    pub fn forward(&self, input_ids: Tensor<B, 2, Int>, clip_skip: usize) -> Result<Tensor<B, 3>> {
        let (x, used) = self.embed(input_ids, clip_skip)?;
        Ok(self.text_model.final_layer_norm.forward(self.run_layers(x, 0..used)))
    }

    /// Encodes token ids to the hidden states that `clip_skip` selects, with the final
    /// LayerNorm only when `final_norm` (SDXL conditions on the penultimate layer's raw
    /// states), and the pooled output (see [`ClipOutput::pooled`]), as SDXL pipelines use
    /// both encoders.
    ///
    /// The pooled row is the first position holding the row's largest id, CLIP's end token
    /// (transformers' rule for configs with the legacy `eos_token_id = 2`, SD's and SDXL's,
    /// and OpenCLIP's; the same position as the first end token for rows that hold one),
    /// whichever token pads the row. Ids of rows added by
    /// [`extend_vocabulary`](Self::extend_vocabulary) are passed over (transformers' rule
    /// would pool a textual-inversion token; A1111 and ComfyUI pool the end token).
    ///
    /// ```
    /// use burn::backend::Flex;
    /// use burn::tensor::{Int, Tensor};
    /// use sd_model::{ClipTextConfig, ClipTextModel};
    ///
    /// let device = Default::default();
    /// let model = ClipTextModel::<Flex>::new(&ClipTextConfig::tiny_sdxl_text_encoder_2(), &device).unwrap();
    /// let ids = Tensor::<Flex, 2, Int>::from_ints([[49406, 320, 49407, 0, 0]], &device);
    /// let out = model.forward_pooled(ids, 2, false).unwrap();
    /// assert_eq!(out.hidden.dims(), [1, 5, 32]);
    /// assert_eq!(out.pooled.dims(), [1, 32]);
    /// ```
    pub fn forward_pooled(&self, input_ids: Tensor<B, 2, Int>, clip_skip: usize, final_norm: bool) -> Result<ClipOutput<B>> {
        let ids = input_ids.clone();
        // The ids are checked (length, clip_skip) before they are read.
        let (x, used) = self.embed(input_ids, clip_skip)?;
        // Added (textual-inversion) ids are above the end token's: they are not the end.
        let base_vocab = (self.vocab_size() - self.added_rows) as i64;
        let end = end_token_index(ids.clone().mask_fill(ids.greater_equal_elem(base_vocab), -1));
        let selected = self.run_layers(x, 0..used);
        let norm = &self.text_model.final_layer_norm;
        let last = norm.forward(self.run_layers(selected.clone(), used..self.num_layers()));
        let hidden = if final_norm { norm.forward(selected) } else { selected };
        let [batch, _, d] = last.dims();
        let pooled = last.gather(1, end.reshape([batch, 1, 1]).expand([batch, 1, d])).reshape([batch, d]);
        let pooled = match &self.text_projection {
            Some(p) => p.forward(pooled),
            None => pooled,
        };
        Ok(ClipOutput { hidden, pooled })
    }

    /// The token and position embeddings of checked ids, and how many layers `clip_skip`
    /// runs.
    fn embed(&self, input_ids: Tensor<B, 2, Int>, clip_skip: usize) -> Result<(Tensor<B, 3>, usize)> {
        let tm = &self.text_model;
        let [batch, seq] = input_ids.dims();
        let max_pos = tm.embeddings.position_embedding.weight.dims()[0];
        if seq == 0 || seq > max_pos {
            return Err(SdModelError::BadInput {
                what: "input_ids".into(),
                reason: format!("sequence length {seq} must be in 1..={max_pos}"),
            });
        }
        let n = self.num_layers();
        if clip_skip == 0 || clip_skip > n {
            return Err(SdModelError::BadInput {
                what: "clip_skip".into(),
                reason: format!("{clip_skip} must be in 1..={n}"),
            });
        }
        let device = input_ids.device();
        let positions = Tensor::<B, 1, Int>::arange(0..seq as i64, &device)
            .reshape([1, seq])
            .expand([batch, seq]);
        let x = self.token_states(input_ids) + tm.embeddings.position_embedding.forward(positions);
        Ok((x, n + 1 - clip_skip))
    }

    /// The token embedding of `ids` `[batch, seq]`: the table's rows, and the trained
    /// tokens' for their ids.
    fn token_states(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let table = &self.text_model.embeddings.token_embedding;
        let Some(trained) = &self.trained_tokens else { return table.forward(ids) };
        let rows = self.table_rows() as i64;
        let [batch, seq] = ids.dims();
        let is_trained = ids.clone().greater_equal_elem(rows);
        let from_table = table.forward(ids.clone().clamp_max(rows - 1));
        let n = trained.dims()[0] as i64;
        let own = burn::tensor::module::embedding(trained.val(), (ids - rows).clamp(0, n - 1));
        let [_, _, d] = from_table.dims();
        let own = own.cast(from_table.dtype());
        from_table.mask_where(is_trained.reshape([batch, seq, 1]).expand([batch, seq, d]), own)
    }

    /// The token embedding's rows of `ids` `[n, hidden]` (e.g. an init word's, to start
    /// trained tokens from), in f32; an id past the table is an error.
    pub fn token_rows(&self, ids: &[u32]) -> Result<Tensor<B, 2>> {
        let rows = self.table_rows();
        if let Some(id) = ids.iter().find(|id| **id as usize >= rows) {
            return Err(SdModelError::BadInput { what: "token ids".into(), reason: format!("id {id} is past the token embedding's {rows} rows") });
        }
        let weight = self.text_model.embeddings.token_embedding.weight.val();
        let device = weight.device();
        let ids = Tensor::<B, 1, Int>::from_ints(ids.iter().map(|&i| i as i64).collect::<Vec<_>>().as_slice(), &device);
        Ok(weight.select(0, ids).cast(burn::tensor::FloatDType::F32))
    }

    /// `x` through the encoder layers `layers`.
    fn run_layers(&self, x: Tensor<B, 3>, layers: std::ops::Range<usize>) -> Tensor<B, 3> {
        self.text_model.encoder.layers[layers].iter().fold(x, |x, layer| layer.forward(x))
    }

    /// Encodes long prompts given as rows of `chunk_len` ids, `[batch, chunks × chunk_len]`
    /// from [`ClipTokenizer::encode_chunked`](crate::tokenizer::ClipTokenizer::encode_chunked),
    /// to hidden states `[batch, chunks × (chunk_len − 2) + 2, hidden]`, as kohya's sd-scripts
    /// do for `max_token_length` 150 and 225.
    ///
    /// Each row goes through the encoder on its own (its positions start at 0); the result
    /// keeps the first row's start-token state, every row's states between its first and
    /// last position, and the last row's last state. One row is [`forward`](Self::forward).
    ///
    /// ```
    /// use burn::backend::Flex;
    /// use burn::tensor::{Int, Tensor};
    /// use sd_model::{ClipTextConfig, ClipTextModel};
    ///
    /// let device = Default::default();
    /// let model = ClipTextModel::<Flex>::new(&ClipTextConfig::tiny(), &device).unwrap();
    /// let ids = Tensor::<Flex, 2, Int>::zeros([2, 3 * 77], &device);
    /// let hidden = model.forward_chunked(ids, 77, 1).unwrap();
    /// assert_eq!(hidden.dims(), [2, 227, 32]);
    /// ```
    pub fn forward_chunked(&self, input_ids: Tensor<B, 2, Int>, chunk_len: usize, clip_skip: usize) -> Result<Tensor<B, 3>> {
        let [batch, seq] = input_ids.dims();
        let chunks = row_count(seq, chunk_len)?;
        if chunks <= 1 {
            return self.forward(input_ids, clip_skip);
        }
        let hidden = self.forward(input_ids.reshape([batch * chunks, chunk_len]), clip_skip)?;
        Ok(join_rows(hidden, batch, chunks))
    }

    /// [`forward_chunked`](Self::forward_chunked) as [`forward_pooled`](Self::forward_pooled)
    /// encodes (the final norm only when `final_norm`): the rows' states joined, and the
    /// pooled output of each prompt's first row, as kohya's sd-scripts pool SDXL's long
    /// prompts.
    ///
    /// ```
    /// use burn::backend::Flex;
    /// use burn::tensor::{Int, Tensor};
    /// use sd_model::{ClipTextConfig, ClipTextModel};
    ///
    /// let device = Default::default();
    /// let model = ClipTextModel::<Flex>::new(&ClipTextConfig::tiny_sdxl_text_encoder_2(), &device).unwrap();
    /// let ids = Tensor::<Flex, 2, Int>::zeros([2, 2 * 77], &device);
    /// let out = model.forward_chunked_pooled(ids, 77, 2, false).unwrap();
    /// assert_eq!((out.hidden.dims(), out.pooled.dims()), ([2, 152, 32], [2, 32]));
    /// ```
    pub fn forward_chunked_pooled(&self, input_ids: Tensor<B, 2, Int>, chunk_len: usize, clip_skip: usize, final_norm: bool) -> Result<ClipOutput<B>> {
        let [batch, seq] = input_ids.dims();
        let chunks = row_count(seq, chunk_len)?;
        if chunks <= 1 {
            return self.forward_pooled(input_ids, clip_skip, final_norm);
        }
        let out = self.forward_pooled(input_ids.reshape([batch * chunks, chunk_len]), clip_skip, final_norm)?;
        let p = out.pooled.dims()[1];
        let pooled = out.pooled.reshape([batch, chunks, p]).slice([0..batch, 0..1, 0..p]).reshape([batch, p]);
        Ok(ClipOutput { hidden: join_rows(out.hidden, batch, chunks), pooled })
    }
}

/// How many rows of `chunk_len` ids a sequence of `seq` ids holds (a whole number of rows
/// of at least 3 ids).
fn row_count(seq: usize, chunk_len: usize) -> Result<usize> {
    if chunk_len < 3 || !seq.is_multiple_of(chunk_len) {
        return Err(SdModelError::BadInput {
            what: "input_ids".into(),
            reason: format!("sequence length {seq} is not a whole number of rows of {chunk_len} ids (at least 3)"),
        });
    }
    Ok(seq / chunk_len)
}

/// The states of `batch × chunks` rows `[batch · chunks, len, d]` joined per prompt: the first
/// row's start state, every row's inner states, the last row's end state.
fn join_rows<B: Backend>(hidden: Tensor<B, 3>, batch: usize, chunks: usize) -> Tensor<B, 3> {
    let [_, chunk_len, d] = hidden.dims();
    let rows = hidden.reshape([batch, chunks, chunk_len, d]);
    let first = rows.clone().slice([0..batch, 0..1, 0..1]).reshape([batch, 1, d]);
    let inner = rows.clone().slice([0..batch, 0..chunks, 1..chunk_len - 1]).reshape([batch, chunks * (chunk_len - 2), d]);
    let last = rows.slice([0..batch, chunks - 1..chunks, chunk_len - 1..chunk_len]).reshape([batch, 1, d]);
    Tensor::cat(vec![first, inner, last], 1)
}

/// Per row, the first position of the row's largest id `[batch]`: scoring the matches by
/// `seq - position` makes the first one the unique maximum.
fn end_token_index<B: Backend>(input_ids: Tensor<B, 2, Int>) -> Tensor<B, 1, Int> {
    let [batch, seq] = input_ids.dims();
    let device = input_ids.device();
    let max = input_ids.clone().max_dim(1);
    let is_max = input_ids.equal(max.expand([batch, seq])).int();
    let score = Tensor::<B, 1, Int>::arange(0..seq as i64, &device).neg().add_scalar(seq as i64).reshape([1, seq]);
    (is_max * score).argmax(1).reshape([batch])
}

impl<B: Backend> lora_core::LoraSites<B> for ClipTextModel<B> {
    fn component(&self) -> lora_core::Component {
        self.component
    }

    /// The q/k/v/out projections and both MLP layers of every encoder layer (kohya's
    /// text-encoder target set: 72 modules for SD1.x).
    fn visit_lora_sites(&mut self, f: &mut dyn FnMut(&str, lora_core::LoraSiteMut<'_, B>)) {
        use lora_core::LoraSiteMut::Linear;
        for (i, layer) in self.text_model.encoder.layers.iter_mut().enumerate() {
            let p = format!("text_model.encoder.layers.{i}");
            let a = &mut layer.self_attn;
            f(&format!("{p}.self_attn.q_proj"), Linear(&mut a.q_proj));
            f(&format!("{p}.self_attn.k_proj"), Linear(&mut a.k_proj));
            f(&format!("{p}.self_attn.v_proj"), Linear(&mut a.v_proj));
            f(&format!("{p}.self_attn.out_proj"), Linear(&mut a.out_proj));
            f(&format!("{p}.mlp.fc1"), Linear(&mut layer.mlp.fc1));
            f(&format!("{p}.mlp.fc2"), Linear(&mut layer.mlp.fc2));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{Distribution, Tolerance};

    type A = Autodiff<Flex>;

    fn ids_again(first: i64, device: &burn::tensor::Device<A>) -> Tensor<A, 2, Int> {
        Tensor::from_ints([[49406, first + 2, 320, first, 49407, 0], [49406, first + 1, first + 1, 49407, 0, 0]], device)
    }

    /// Trained tokens look up the rows that frozen ones would (the same states and pooled
    /// output as the rows appended to the table), and only their rows get gradients: those
    /// the appended rows would get.
    #[test]
    fn trained_tokens_act_as_appended_rows() {
        let device = Default::default();
        let config = ClipTextConfig::tiny_sdxl_text_encoder_2();
        let base = ClipTextModel::<A>::new(&config, &device).unwrap().no_grad();
        let rows = Tensor::<A, 2>::random([3, base.hidden_size()], Distribution::Normal(0.0, 0.1), &device);
        let (mut frozen, mut trained) = (base.clone(), base);
        frozen.extend_vocabulary(rows.clone()).unwrap();
        trained.add_trained_tokens(rows.clone()).unwrap();
        assert_eq!(trained.vocab_size(), frozen.vocab_size());
        let first = (frozen.vocab_size() - 3) as i64;
        let ids = ids_again(first, &device);
        let a = frozen.forward_pooled(ids.clone(), 1, true).unwrap();
        let b = trained.forward_pooled(ids, 1, true).unwrap();
        a.hidden.clone().into_data().assert_approx_eq::<f32>(&b.hidden.clone().into_data(), Tolerance::default());
        a.pooled.into_data().assert_approx_eq::<f32>(&b.pooled.clone().into_data(), Tolerance::default());
        let grads = (b.hidden.sum() + b.pooled.sum()).backward();
        let grad = trained.trained_tokens.as_ref().unwrap().grad(&grads).unwrap();
        assert_eq!(grad.dims(), [3, trained.hidden_size()]);
        // The same gradient as the appended rows of a table that trains whole.
        let table = &mut frozen.text_model.embeddings.token_embedding.weight;
        *table = burn::module::Param::from_tensor(table.val().detach()).set_require_grad(true);
        let a = frozen.forward_pooled(ids_again(first, &device), 1, true).unwrap();
        let whole = (a.hidden.sum() + a.pooled.sum()).backward();
        let table_grad = frozen.text_model.embeddings.token_embedding.weight.grad(&whole).unwrap();
        let appended = table_grad.slice(first as usize..first as usize + 3);
        appended.into_data().assert_approx_eq::<f32>(&grad.into_data(), Tolerance::default());
        assert!(trained.text_model.embeddings.token_embedding.weight.grad(&grads).is_none(), "the table is frozen");
        // Frozen rows after trained ones would take their ids.
        assert!(trained.clone().extend_vocabulary(rows.clone()).is_err());
        assert!(trained.add_trained_tokens(rows).is_err(), "one set per model");
    }
}
