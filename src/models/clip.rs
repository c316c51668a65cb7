//! CLIP text encoder (transformers' `CLIPTextModel`, and `CLIPTextModelWithProjection` for
//! SDXL's second encoder): token + position embeddings, pre-norm causal self-attention layers,
//! the last hidden state after the final layer norm, the penultimate hidden state, and the
//! projected pooled output.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::config::ClipTextConfig;
use crate::nn::{scaled_dot_product_attention, Activation, AdaptedLinear, LayerNorm};

/// Multi-head self-attention with biased `q_proj/k_proj/v_proj/out_proj`.
#[derive(Clone, Debug)]
pub struct ClipAttention {
    pub q_proj: AdaptedLinear,
    pub(crate) k_proj: AdaptedLinear,
    pub(crate) v_proj: AdaptedLinear,
    pub out_proj: AdaptedLinear,
    heads: usize,
}

impl ClipAttention {
    fn load(vb: VarBuilder, name: &str, hidden: usize, heads: usize) -> Result<Self> {
        let linear = |sub: &str| AdaptedLinear::load(vb.pp(sub), format!("{name}.{sub}"), hidden, hidden, true);
        Ok(Self { q_proj: linear("q_proj")?, k_proj: linear("k_proj")?, v_proj: linear("v_proj")?, out_proj: linear("out_proj")?, heads })
    }

    fn forward(&self, x: &Tensor, causal_mask: &Tensor) -> Result<Tensor> {
        let q = self.q_proj.forward(x)?;
        let k = self.k_proj.forward(x)?;
        let v = self.v_proj.forward(x)?;
        let attended = scaled_dot_product_attention(&q, &k, &v, self.heads, Some(causal_mask), false)?;
        self.out_proj.forward(&attended)
    }
}

/// `fc1` → activation → `fc2`.
#[derive(Clone, Debug)]
pub struct ClipMlp {
    pub fc1: AdaptedLinear,
    pub fc2: AdaptedLinear,
    act: Activation,
}

/// One encoder layer: `x + attn(ln1 x)`, then `x + mlp(ln2 x)`.
#[derive(Clone, Debug)]
pub struct ClipEncoderLayer {
    pub(crate) layer_norm1: LayerNorm,
    pub self_attn: ClipAttention,
    pub(crate) layer_norm2: LayerNorm,
    pub mlp: ClipMlp,
}

impl ClipEncoderLayer {
    fn load(vb: VarBuilder, name: &str, cfg: &ClipTextConfig) -> Result<Self> {
        let (hidden, inter) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Self {
            layer_norm1: LayerNorm::load(vb.pp("layer_norm1"), hidden, cfg.layer_norm_eps)?,
            self_attn: ClipAttention::load(vb.pp("self_attn"), &format!("{name}.self_attn"), hidden, cfg.num_attention_heads)?,
            layer_norm2: LayerNorm::load(vb.pp("layer_norm2"), hidden, cfg.layer_norm_eps)?,
            mlp: ClipMlp {
                fc1: AdaptedLinear::load(vb.pp("mlp.fc1"), format!("{name}.mlp.fc1"), hidden, inter, true)?,
                fc2: AdaptedLinear::load(vb.pp("mlp.fc2"), format!("{name}.mlp.fc2"), inter, hidden, true)?,
                act: cfg.hidden_act,
            },
        })
    }

    fn forward(&self, x: &Tensor, causal_mask: &Tensor) -> Result<Tensor> {
        let x = (self.self_attn.forward(&self.layer_norm1.forward(x)?, causal_mask)? + x)?;
        let h = self.layer_norm2.forward(&x)?;
        let h = self.mlp.fc2.forward(&self.mlp.act.forward(&self.mlp.fc1.forward(&h)?)?)?;
        h + x
    }
}

pub struct ClipTextModel {
    pub(crate) token_embedding: Tensor,
    pub(crate) position_embedding: Tensor,
    pub layers: Vec<ClipEncoderLayer>,
    pub final_layer_norm: LayerNorm,
    /// `text_projection` `[projection_dim, hidden]` (no bias), `CLIPTextModelWithProjection` only.
    pub(crate) text_projection: Option<Tensor>,
    config: ClipTextConfig,
}

/// What [`ClipTextModel::forward_all`] returns.
pub struct ClipTextOutput {
    /// After the final layer norm `[B, L, hidden]`.
    pub last_hidden_state: Tensor,
    /// `hidden_states[-2]`: the output of the next-to-last layer, no final norm `[B, L, hidden]`.
    pub penultimate: Tensor,
    /// The final-normed state at the end-of-text token through `text_projection` `[B, proj]`
    /// (`text_embeds`); `None` without a projection.
    pub text_embeds: Option<Tensor>,
}

impl ClipTextModel {
    /// Load from a `text_encoder` weight file. Weights may be named `text_model.embeddings...`
    /// (as SD ships them) or `embeddings...` (transformers 5 without the prefix); either way the
    /// LoRA names start with `text_model.`.
    pub fn load(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        Self::load_inner(vb, cfg, false)
    }

    /// [`Self::load`] for `CLIPTextModelWithProjection` (SDXL's `text_encoder_2`): also reads
    /// `text_projection.weight` (`[projection_dim, hidden]`, `projection_dim` 512 when the config
    /// leaves it out, as transformers' default).
    pub fn load_with_projection(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        Self::load_inner(vb, cfg, true)
    }

    fn load_inner(vb: VarBuilder, cfg: &ClipTextConfig, projection: bool) -> Result<Self> {
        let text_projection = if projection { Some(vb.get((cfg.projection_dim.unwrap_or(512), cfg.hidden_size), "text_projection.weight")?) } else { None };
        let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") { vb.pp("text_model") } else { vb };
        let hidden = cfg.hidden_size;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ClipEncoderLayer::load(vb.pp(format!("encoder.layers.{i}")), &format!("text_model.encoder.layers.{i}"), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            token_embedding: vb.get((cfg.vocab_size, hidden), "embeddings.token_embedding.weight")?,
            position_embedding: vb.get((cfg.max_position_embeddings, hidden), "embeddings.position_embedding.weight")?,
            layers,
            final_layer_norm: LayerNorm::load(vb.pp("final_layer_norm"), hidden, cfg.layer_norm_eps)?,
            text_projection,
            config: cfg.clone(),
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// `input_ids` `[B, L]` (any integer dtype, L ≤ max positions) → last hidden state
    /// `[B, L, hidden]` after the final layer norm. No padding mask, as the SD pipelines do.
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let h = self.embed_and_run(input_ids, self.layers.len())?;
        self.final_layer_norm.forward(&h)
    }

    /// The last hidden state, the penultimate hidden state and the projected pooled output, in
    /// one pass (as transformers' `output_hidden_states=True`).
    pub fn forward_all(&self, input_ids: &Tensor) -> Result<ClipTextOutput> {
        let n = self.layers.len();
        let penultimate = self.forward_penultimate(input_ids)?;
        let mask = causal_mask(input_ids.dim(1)?, penultimate.dtype(), penultimate.device())?;
        let last = self.layers[n - 1].forward(&penultimate, &mask)?;
        let last_hidden_state = self.final_layer_norm.forward(&last)?;
        let text_embeds = match &self.text_projection {
            None => None,
            Some(w) => {
                let pooled = self.pool(&last_hidden_state, input_ids)?;
                Some(pooled.matmul(&w.t()?)?)
            }
        };
        Ok(ClipTextOutput { last_hidden_state, penultimate, text_embeds })
    }

    /// `hidden_states[-2]` alone: every layer but the last, no final norm.
    pub fn forward_penultimate(&self, input_ids: &Tensor) -> Result<Tensor> {
        let n = self.layers.len();
        if n < 2 {
            candle_core::bail!("text encoder: a penultimate hidden state needs at least 2 layers, the config has {n}")
        }
        self.embed_and_run(input_ids, n - 1)
    }

    /// transformers' pooling: the state at the end-of-text token of each row. With the legacy
    /// `eos_token_id` 2 (SD/SDXL configs) that is the first position of the highest id (the EOS
    /// token is the last of CLIP's vocabulary); otherwise the first position of `eos_token_id`.
    fn pool(&self, hidden: &Tensor, input_ids: &Tensor) -> Result<Tensor> {
        let ids = input_ids.to_dtype(DType::U32)?.to_vec2::<u32>()?;
        let eos = self.config.eos_token_id.unwrap_or(2);
        let positions: Vec<u32> = ids
            .iter()
            .map(|row| {
                let pos = if eos == 2 {
                    let max = row.iter().copied().max().unwrap_or(0);
                    row.iter().position(|&x| x == max)
                } else {
                    row.iter().position(|&x| x == eos)
                };
                pos.unwrap_or(0) as u32
            })
            .collect();
        let rows = positions
            .iter()
            .enumerate()
            .map(|(b, &p)| hidden.get(b)?.narrow(0, p as usize, 1))
            .collect::<Result<Vec<_>>>()?;
        Tensor::cat(&rows, 0)
    }

    /// Embeddings, then the first `layers` encoder layers (no final norm).
    fn embed_and_run(&self, input_ids: &Tensor, layers: usize) -> Result<Tensor> {
        let (batch, len) = input_ids.dims2()?;
        let cfg = &self.config;
        if len > cfg.max_position_embeddings {
            candle_core::bail!("text encoder: {len} tokens exceed max_position_embeddings {}", cfg.max_position_embeddings)
        }
        let ids = input_ids.to_dtype(DType::U32)?;
        let max_id = ids.max_all()?.to_scalar::<u32>()?;
        if max_id as usize >= cfg.vocab_size {
            candle_core::bail!("text encoder: token id {max_id} is outside the vocabulary of {}", cfg.vocab_size)
        }
        let tokens = self.token_embedding.index_select(&ids.flatten_all()?, 0)?.reshape((batch, len, cfg.hidden_size))?;
        let positions = self.position_embedding.narrow(0, 0, len)?;
        let mut h = tokens.broadcast_add(&positions)?;
        let mask = causal_mask(len, h.dtype(), h.device())?;
        for layer in &self.layers[..layers] {
            h = layer.forward(&h, &mask)?;
        }
        Ok(h)
    }

    /// Every LoRA-targetable linear (`…self_attn.{q,k,v,out}_proj`, `…mlp.fc1/fc2`), with full names
    /// like `text_model.encoder.layers.0.self_attn.q_proj`.
    pub fn linears_mut(&mut self) -> Vec<&mut AdaptedLinear> {
        let mut out = Vec::with_capacity(self.layers.len() * 6);
        for layer in &mut self.layers {
            let attn = &mut layer.self_attn;
            out.extend([&mut attn.q_proj, &mut attn.k_proj, &mut attn.v_proj, &mut attn.out_proj]);
            out.extend([&mut layer.mlp.fc1, &mut layer.mlp.fc2]);
        }
        out
    }
}

/// `[L, L]` additive mask: 0 on and below the diagonal, -inf above (a token sees only itself
/// and earlier tokens).
fn causal_mask(len: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let values: Vec<f32> = (0..len).flat_map(|i| (0..len).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_vec(values, (len, len), device)?.to_dtype(dtype)
}
