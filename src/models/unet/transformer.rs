//! The UNet's spatial transformer: diffusers' `Transformer2DModel` (GroupNorm, `proj_in`,
//! `BasicTransformerBlock`s, `proj_out`, residual) with its `Attention` and GEGLU `FeedForward`.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::nn::{scaled_dot_product_attention, AdaptedLinear, GroupNorm, LayerNorm};

/// diffusers' `Attention` as used in the UNet: bias-free `to_q/to_k/to_v`, `to_out.0` with bias.
#[derive(Clone, Debug)]
pub struct Attention {
    pub to_q: AdaptedLinear,
    pub to_k: AdaptedLinear,
    pub to_v: AdaptedLinear,
    pub to_out: AdaptedLinear,
    heads: usize,
    upcast: bool,
}

impl Attention {
    /// `query_dim` → `heads` × `head_dim`; keys and values come from `context_dim` features.
    pub fn load(
        vb: VarBuilder,
        name: &str,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        upcast: bool,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: AdaptedLinear::load(vb.pp("to_q"), format!("{name}.to_q"), query_dim, inner, false)?,
            to_k: AdaptedLinear::load(vb.pp("to_k"), format!("{name}.to_k"), context_dim, inner, false)?,
            to_v: AdaptedLinear::load(vb.pp("to_v"), format!("{name}.to_v"), context_dim, inner, false)?,
            to_out: AdaptedLinear::load(vb.pp("to_out.0"), format!("{name}.to_out.0"), inner, query_dim, true)?,
            heads,
            upcast,
        })
    }

    /// Number of attention heads.
    pub fn heads(&self) -> usize {
        self.heads
    }

    /// Self-attention when `context` is `None`, else cross-attention to `context` `[B, L, ctx]`.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        let context = context.unwrap_or(x);
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        let attended = scaled_dot_product_attention(&q, &k, &v, self.heads, None, self.upcast)?;
        self.to_out.forward(&attended)
    }

    pub fn linears_mut<'a>(&'a mut self, out: &mut Vec<&'a mut AdaptedLinear>) {
        out.extend([&mut self.to_q, &mut self.to_k, &mut self.to_v, &mut self.to_out]);
    }
}

/// `FeedForward` with GEGLU: `net.0.proj` (dim → 2·inner), `h · gelu(gate)`, `net.2` (inner → dim).
#[derive(Clone, Debug)]
pub struct FeedForward {
    pub proj_in: AdaptedLinear,
    pub proj_out: AdaptedLinear,
}

impl FeedForward {
    pub fn load(vb: VarBuilder, name: &str, dim: usize, inner: usize) -> Result<Self> {
        Ok(Self {
            proj_in: AdaptedLinear::load(vb.pp("net.0.proj"), format!("{name}.net.0.proj"), dim, 2 * inner, true)?,
            proj_out: AdaptedLinear::load(vb.pp("net.2"), format!("{name}.net.2"), inner, dim, true)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let projected = self.proj_in.forward(x)?;
        let half = projected.dim(candle_core::D::Minus1)? / 2;
        let hidden = projected.narrow(candle_core::D::Minus1, 0, half)?;
        let gate = projected.narrow(candle_core::D::Minus1, half, half)?;
        self.proj_out.forward(&hidden.mul(&gate.gelu_erf()?)?)
    }

    pub fn linears_mut<'a>(&'a mut self, out: &mut Vec<&'a mut AdaptedLinear>) {
        out.extend([&mut self.proj_in, &mut self.proj_out]);
    }
}

/// `BasicTransformerBlock`: pre-norm self-attention, cross-attention and feed-forward, each
/// added to the residual stream.
#[derive(Clone, Debug)]
pub struct BasicTransformerBlock {
    pub(crate) norm1: LayerNorm,
    pub attn1: Attention,
    pub norm2: LayerNorm,
    pub attn2: Attention,
    pub(crate) norm3: LayerNorm,
    pub ff: FeedForward,
    only_cross_attention: bool,
}

/// What a `Transformer2DModel` is built with.
#[derive(Clone, Debug)]
pub struct TransformerConfig {
    pub channels: usize,
    pub heads: usize,
    pub(crate) num_layers: usize,
    pub cross_attention_dim: usize,
    pub(crate) norm_num_groups: usize,
    pub use_linear_projection: bool,
    pub only_cross_attention: bool,
    pub upcast_attention: bool,
}

impl BasicTransformerBlock {
    pub fn load(vb: VarBuilder, name: &str, dim: usize, cfg: &TransformerConfig) -> Result<Self> {
        let head_dim = dim / cfg.heads;
        let attn1_context = if cfg.only_cross_attention { cfg.cross_attention_dim } else { dim };
        let eps = 1e-5;
        Ok(Self {
            norm1: LayerNorm::load(vb.pp("norm1"), dim, eps)?,
            attn1: Attention::load(vb.pp("attn1"), &format!("{name}.attn1"), dim, attn1_context, cfg.heads, head_dim, cfg.upcast_attention)?,
            norm2: LayerNorm::load(vb.pp("norm2"), dim, eps)?,
            attn2: Attention::load(vb.pp("attn2"), &format!("{name}.attn2"), dim, cfg.cross_attention_dim, cfg.heads, head_dim, cfg.upcast_attention)?,
            norm3: LayerNorm::load(vb.pp("norm3"), dim, eps)?,
            ff: FeedForward::load(vb.pp("ff"), &format!("{name}.ff"), dim, 4 * dim)?,
            only_cross_attention: cfg.only_cross_attention,
        })
    }

    /// `x` `[B, L, dim]`, `context` `[B, 77, cross_dim]`.
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let attn1_context = if self.only_cross_attention { Some(context) } else { None };
        let x = (self.attn1.forward(&self.norm1.forward(x)?, attn1_context)? + x)?;
        let x = (self.attn2.forward(&self.norm2.forward(&x)?, Some(context))? + &x)?;
        self.ff.forward(&self.norm3.forward(&x)?)? + &x
    }

    pub fn linears_mut<'a>(&'a mut self, out: &mut Vec<&'a mut AdaptedLinear>) {
        self.attn1.linears_mut(out);
        self.attn2.linears_mut(out);
        self.ff.linears_mut(out);
    }
}

/// `Transformer2DModel`: `[B, C, H, W]` → tokens `[B, H·W, inner]` → transformer blocks → back,
/// plus the input. `proj_in`/`proj_out` are linear layers, or 1x1 convs in SD 1.x files; a 1x1
/// conv is the same map on each pixel, so both are held as `AdaptedLinear` over the channels.
#[derive(Clone, Debug)]
pub struct Transformer2DModel {
    pub norm: GroupNorm,
    pub proj_in: AdaptedLinear,
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    pub proj_out: AdaptedLinear,
}

/// Load a projection stored as a linear `[out, in]` or a 1x1 conv `[out, in, 1, 1]`.
fn load_projection(vb: VarBuilder, name: String, in_dim: usize, out_dim: usize, linear: bool) -> Result<AdaptedLinear> {
    if linear {
        AdaptedLinear::load(vb, name, in_dim, out_dim, true)
    } else {
        let weight = vb.get((out_dim, in_dim, 1, 1), "weight")?.reshape((out_dim, in_dim))?;
        Ok(AdaptedLinear::new(name, weight, Some(vb.get(out_dim, "bias")?)))
    }
}

impl Transformer2DModel {
    pub fn load(vb: VarBuilder, name: &str, cfg: &TransformerConfig) -> Result<Self> {
        let c = cfg.channels;
        let transformer_blocks = (0..cfg.num_layers)
            .map(|i| {
                let sub = format!("transformer_blocks.{i}");
                BasicTransformerBlock::load(vb.pp(&sub), &format!("{name}.{sub}"), c, cfg)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: GroupNorm::load(vb.pp("norm"), cfg.norm_num_groups, c, 1e-6)?,
            proj_in: load_projection(vb.pp("proj_in"), format!("{name}.proj_in"), c, c, cfg.use_linear_projection)?,
            transformer_blocks,
            proj_out: load_projection(vb.pp("proj_out"), format!("{name}.proj_out"), c, c, cfg.use_linear_projection)?,
        })
    }

    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self.norm.forward(x)?.permute((0, 2, 3, 1))?.reshape((b, h * w, c))?;
        let mut tokens = self.proj_in.forward(&tokens)?;
        for block in &self.transformer_blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let out = self.proj_out.forward(&tokens)?.reshape((b, h, w, c))?.permute((0, 3, 1, 2))?;
        out + x
    }

    pub fn linears_mut<'a>(&'a mut self, out: &mut Vec<&'a mut AdaptedLinear>) {
        out.push(&mut self.proj_in);
        for block in &mut self.transformer_blocks {
            block.linears_mut(out);
        }
        out.push(&mut self.proj_out);
    }
}
