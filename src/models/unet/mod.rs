//! UNet2DConditionModel (diffusers), SD 1.x, 2.x and XL shapes, built from its `config.json`;
//! SDXL's `text_time` additional embedding (pooled text + size/crop time ids) included.
//!
//! - `embeddings`: sinusoidal timestep projection and the time-embedding MLP.
//! - `resnet`: down/up samplers (the resnet block is `crate::nn::resnet`).
//! - `transformer`: `Transformer2DModel`, `BasicTransformerBlock`, `Attention`, GEGLU feed-forward.
//! - `blocks`: down, mid and up blocks.

pub mod blocks;
pub mod embeddings;
pub mod resnet;
pub mod transformer;

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use crate::nn::frozen::FrozenConv2d;

use self::blocks::{DownBlock, MidBlock, UpBlock, UpBlockChannels};
use self::embeddings::{timestep_embedding, TimestepEmbedding};
use self::resnet::{conv2d_same, ResnetConfig};
use self::transformer::TransformerConfig;
use crate::models::config::{DownBlockType, UNetConfig, UpBlockType};
use crate::models::Conditioning;
use crate::nn::Activation;
use crate::nn::{AdaptedConv2d, AdaptedLinear, CheckpointGrads, GroupNorm};

pub struct UNet2DConditionModel {
    pub conv_in: FrozenConv2d,
    pub time_embedding: TimestepEmbedding,
    /// SDXL's `add_embedding` (`addition_embed_type = "text_time"`).
    pub add_embedding: Option<TimestepEmbedding>,
    pub down_blocks: Vec<DownBlock>,
    pub mid_block: Option<MidBlock>,
    pub up_blocks: Vec<UpBlock>,
    pub(crate) conv_norm_out: GroupNorm,
    pub(crate) conv_out: FrozenConv2d,
    config: UNetConfig,
}

impl UNet2DConditionModel {
    /// Build the network described by `cfg` from weights under `vb` (diffusers names:
    /// `conv_in`, `time_embedding.linear_1`, `down_blocks.0.resnets.0.conv1`, ...).
    pub fn load(vb: VarBuilder, cfg: &UNetConfig) -> Result<Self> {
        let channels = &cfg.block_out_channels;
        let blocks = channels.len();
        let resnet_cfg = |in_channels: usize, out_channels: usize, output_scale_factor: f64| ResnetConfig {
            in_channels,
            out_channels,
            temb_channels: Some(cfg.time_embed_dim),
            groups: cfg.norm_num_groups,
            eps: cfg.norm_eps,
            act: cfg.act_fn,
            output_scale_factor,
            skip_time_act: cfg.resnet_skip_time_act,
        };
        let transformer_cfg = |i: usize, only_cross: bool| TransformerConfig {
            channels: channels[i],
            heads: cfg.num_attention_heads[i],
            num_layers: cfg.transformer_layers_per_block[i],
            cross_attention_dim: cfg.cross_attention_dim[i],
            norm_num_groups: cfg.norm_num_groups,
            use_linear_projection: cfg.use_linear_projection,
            only_cross_attention: only_cross,
            upcast_attention: cfg.upcast_attention,
        };

        let time_embedding = TimestepEmbedding::load(vb.pp("time_embedding"), "time_embedding", channels[0], cfg.time_embed_dim, cfg.act_fn)?;

        // diffusers builds `add_embedding` with TimestepEmbedding's default activation (silu),
        // whatever `act_fn` says.
        let add_embedding = match &cfg.addition {
            Some(a) => Some(TimestepEmbedding::load(vb.pp("add_embedding"), "add_embedding", a.input_dim, cfg.time_embed_dim, Activation::Silu)?),
            None => None,
        };

        let mut down_blocks = Vec::with_capacity(blocks);
        for (i, kind) in cfg.down_block_types.iter().enumerate() {
            let in_channels = if i == 0 { channels[0] } else { channels[i - 1] };
            let is_final = i == blocks - 1;
            let attention = (*kind == DownBlockType::CrossAttnDownBlock2D).then(|| transformer_cfg(i, cfg.only_cross_attention[i]));
            let name = format!("down_blocks.{i}");
            down_blocks.push(DownBlock::load(
                vb.pp(&name),
                &name,
                cfg.layers_per_block[i],
                &resnet_cfg(in_channels, channels[i], cfg.resnet_out_scale_factor),
                attention.as_ref(),
                (!is_final).then_some(cfg.downsample_padding),
            )?);
        }

        let mid_block = match cfg.mid_block_type {
            Some(_) => {
                let last = blocks - 1;
                let c = channels[last];
                Some(MidBlock::load(vb.pp("mid_block"), "mid_block", &resnet_cfg(c, c, cfg.mid_block_scale_factor), &transformer_cfg(last, false))?)
            }
            None => None,
        };

        let mut up_blocks = Vec::with_capacity(blocks);
        for (i, kind) in cfg.up_block_types.iter().enumerate() {
            // Up block i mirrors down block `blocks - 1 - i`.
            let mirror = blocks - 1 - i;
            let up_channels = UpBlockChannels {
                in_channels: channels[mirror.saturating_sub(1)],
                prev_output_channels: channels[(mirror + 1).min(blocks - 1)],
                out_channels: channels[mirror],
            };
            let attention = (*kind == UpBlockType::CrossAttnUpBlock2D).then(|| transformer_cfg(mirror, cfg.only_cross_attention[mirror]));
            let name = format!("up_blocks.{i}");
            up_blocks.push(UpBlock::load(
                vb.pp(&name),
                &name,
                cfg.layers_per_block[mirror] + 1,
                up_channels,
                &resnet_cfg(0, 0, cfg.resnet_out_scale_factor),
                attention.as_ref(),
                i != blocks - 1,
            )?);
        }

        Ok(Self {
            conv_in: conv2d_same(vb.pp("conv_in"), cfg.in_channels, channels[0], cfg.conv_in_kernel)?,
            time_embedding,
            add_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::load(vb.pp("conv_norm_out"), cfg.norm_num_groups, channels[0], cfg.norm_eps)?,
            conv_out: conv2d_same(vb.pp("conv_out"), channels[0], cfg.out_channels, cfg.conv_out_kernel)?,
            config: cfg.clone(),
        })
    }

    /// The config this network was built from.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// The dtype of the weights (what inputs must be cast to).
    pub fn dtype(&self) -> candle_core::DType {
        self.conv_in.weight.dtype()
    }

    /// `sample` `[B, C, H, W]`, `timesteps` `[B]` (any numeric dtype), the conditioning (context
    /// `[B, 77, cross_dim]`; for SDXL also the pooled embedding and time ids) → predicted noise
    /// (or velocity) `[B, C_out, H, W]`.
    pub fn forward(&self, sample: &Tensor, timesteps: &Tensor, cond: &Conditioning) -> Result<Tensor> {
        self.forward_checkpointed(sample, timesteps, cond, None)
    }

    /// [`forward`](Self::forward) with gradient checkpointing when `ckpt` is given: every resnet
    /// and transformer of the down, mid and up blocks is recomputed in the backward pass instead
    /// of keeping its activations, and the gradients of the LoRA parameters inside them land in
    /// `ckpt` (merge them into the `GradStore` of the backward with
    /// [`CheckpointGrads::merge_into`]). Same value and gradients as without.
    pub fn forward_checkpointed(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        cond: &Conditioning,
        ckpt: Option<&CheckpointGrads>,
    ) -> Result<Tensor> {
        let cfg = &self.config;
        let encoder_hidden_states = &cond.context;
        let (batch, channels, height, width) = sample.dims4()?;
        if channels != cfg.in_channels {
            candle_core::bail!("UNet expects {} input channels, got sample of shape {:?}", cfg.in_channels, sample.dims())
        }
        let context_dims = encoder_hidden_states.dims();
        let context_width = cfg.cross_attention_dim.iter().copied().max().unwrap_or(0);
        if context_dims.len() != 3 || context_dims[0] != batch || !cfg.cross_attention_dim.contains(&context_dims[2]) {
            candle_core::bail!(
                "UNet encoder_hidden_states must be [{batch}, tokens, {context_width}], got shape {context_dims:?}"
            )
        }
        let timesteps = match timesteps.dims() {
            [] | [1] => timesteps.reshape(1)?.broadcast_as(batch)?.contiguous()?,
            [n] if *n == batch => timesteps.clone(),
            other => candle_core::bail!("UNet timesteps must be a scalar or [{batch}], got shape {other:?}"),
        };

        let sample = if cfg.center_input_sample { ((sample * 2.0)? - 1.0)? } else { sample.clone() };
        let t_emb = timestep_embedding(&timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)?.to_dtype(sample.dtype())?;
        let mut emb = self.time_embedding.forward(&t_emb)?;
        if let Some(add) = &self.add_embedding {
            emb = (emb + add.forward(&self.text_time_input(cond, batch)?.to_dtype(sample.dtype())?)?)?;
        } else if cond.pooled.is_some() || cond.time_ids.is_some() {
            candle_core::bail!("this UNet has no `addition_embed_type`; a pooled embedding or time ids were given (an SDXL conditioning for an SD 1.x/2.x UNet?)")
        }
        if let Some(act) = cfg.time_embedding_act_fn {
            emb = act.forward(&emb)?;
        }

        let mut h = self.conv_in.forward(&sample)?;
        let mut skips = vec![h.clone()];
        for block in &self.down_blocks {
            let (out, block_skips) = block.forward(&h, &emb, encoder_hidden_states, ckpt)?;
            h = out;
            skips.extend(block_skips);
        }
        if let Some(mid) = &self.mid_block {
            h = mid.forward(&h, &emb, encoder_hidden_states, ckpt)?;
        }
        // diffusers passes the skip's size to the upsampler when the input is not a multiple of
        // the total upsampling factor; upsampling to the next skip's size covers both cases.
        let exact = {
            let factor = 1usize << self.up_blocks.iter().filter(|b| b.upsampler.is_some()).count();
            height % factor == 0 && width % factor == 0
        };
        for block in &self.up_blocks {
            let remaining = skips.len().saturating_sub(block.resnets.len());
            let upsample_size = match (exact, remaining.checked_sub(1).and_then(|i| skips.get(i))) {
                (false, Some(next)) => {
                    let (_, _, sh, sw) = next.dims4()?;
                    Some((sh, sw))
                }
                _ => None,
            };
            h = block.forward(&h, &mut skips, &emb, encoder_hidden_states, upsample_size, ckpt)?;
        }
        let h = self.conv_norm_out.forward_act(&h, cfg.act_fn)?;
        self.conv_out.forward(&h)
    }

    /// SDXL: `[pooled text embedding, sinusoids of each of the 6 time ids]` `[B, input_dim]` (f32),
    /// what `add_embedding` reads.
    fn text_time_input(&self, cond: &Conditioning, batch: usize) -> Result<Tensor> {
        let cfg = &self.config;
        let Some(add) = cfg.addition else { candle_core::bail!("this UNet has no text_time embedding") };
        let pooled = cond.pooled.as_ref().ok_or_else(|| candle_core::Error::Msg("this SDXL UNet needs the pooled text embedding (`text_embeds`)".into()))?;
        let time_ids = cond.time_ids.as_ref().ok_or_else(|| candle_core::Error::Msg("this SDXL UNet needs the size and crop time ids (`time_ids`)".into()))?;
        if pooled.dims() != [batch, add.pooled_dim()] {
            candle_core::bail!("UNet pooled text embedding must be [{batch}, {}], got shape {:?}", add.pooled_dim(), pooled.dims())
        }
        if time_ids.dims() != [batch, 6] {
            candle_core::bail!("UNet time ids must be [{batch}, 6], got shape {:?}", time_ids.dims())
        }
        let time = timestep_embedding(&time_ids.flatten_all()?, add.time_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift)?
            .reshape((batch, 6 * add.time_embed_dim))?;
        Tensor::cat(&[&pooled.to_dtype(candle_core::DType::F32)?, &time], 1)
    }

    /// Every linear layer, named as in diffusers: attention `to_q/to_k/to_v/to_out.0`,
    /// `ff.net.0.proj`, `ff.net.2`, `proj_in/proj_out` (also when stored as 1x1 convs: the
    /// weight is held as `[out, in]`), resnets' `time_emb_proj` and `time_embedding.linear_1/2`,
    /// e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`. Pick LoRA targets by
    /// name from this list.
    pub fn linears_mut(&mut self) -> Vec<&mut AdaptedLinear> {
        self.layers_mut().0
    }

    /// Every convolution of the resnets and samplers (kohya's LoCon targets), named as in
    /// diffusers: `down_blocks.0.resnets.0.conv1`, `…conv2`, `…conv_shortcut`,
    /// `down_blocks.0.downsamplers.0.conv`, `up_blocks.0.upsamplers.0.conv`. `conv_in` and
    /// `conv_out` are not among them (kohya leaves them too).
    pub fn convs_mut(&mut self) -> Vec<&mut AdaptedConv2d> {
        self.layers_mut().1
    }

    /// Drop every LoRA branch of the linear layers and convolutions.
    pub fn clear_loras(&mut self) {
        let (lin, conv) = self.layers_mut();
        lin.into_iter().for_each(|l| l.loras.clear());
        conv.into_iter().for_each(|c| c.loras.clear());
    }

    /// [`Self::linears_mut`] and [`Self::convs_mut`] at once.
    pub fn layers_mut(&mut self) -> (Vec<&mut AdaptedLinear>, Vec<&mut AdaptedConv2d>) {
        let (mut lin, mut conv) = (Vec::new(), Vec::new());
        self.time_embedding.linears_mut(&mut lin);
        if let Some(add) = &mut self.add_embedding {
            add.linears_mut(&mut lin);
        }
        for block in &mut self.down_blocks {
            block.layers_mut(&mut lin, &mut conv);
        }
        if let Some(mid) = &mut self.mid_block {
            mid.layers_mut(&mut lin, &mut conv);
        }
        for block in &mut self.up_blocks {
            block.layers_mut(&mut lin, &mut conv);
        }
        (lin, conv)
    }
}
