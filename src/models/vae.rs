//! AutoencoderKL (diffusers): encoder to a diagonal Gaussian over latents, decoder back to pixels.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;
use crate::nn::frozen::FrozenConv2d;

use super::config::VaeConfig;
use super::unet::resnet::{conv2d_same, Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use crate::nn::{scaled_dot_product_attention, Activation, AdaptedLinear, GroupNorm};

/// The VAE resnets' and norms' epsilon (fixed in diffusers' `Encoder`/`Decoder`).
const VAE_EPS: f64 = 1e-6;

/// The encoder's latent distribution (diffusers' `DiagonalGaussianDistribution`).
pub struct DiagonalGaussian {
    pub mean: Tensor,
    /// Clamped to [-30, 20] as diffusers does.
    pub(crate) logvar: Tensor,
}

impl DiagonalGaussian {
    /// Split `moments` `[B, 2C, h, w]` into mean and log-variance along the channels.
    pub(crate) fn from_moments(moments: &Tensor) -> Result<Self> {
        let channels = moments.dim(1)? / 2;
        let mean = moments.narrow(1, 0, channels)?;
        let logvar = moments.narrow(1, channels, channels)?.clamp(-30f32, 20f32)?;
        Ok(Self { mean, logvar })
    }

    pub fn std(&self) -> Result<Tensor> {
        (&self.logvar * 0.5)?.exp()
    }
}

/// The VAE mid block's single-head spatial self-attention (GroupNorm, biased `to_q/to_k/to_v`,
/// `to_out.0`, residual), softmax in f32.
#[derive(Clone, Debug)]
pub struct VaeAttention {
    pub group_norm: GroupNorm,
    pub to_q: AdaptedLinear,
    pub to_k: AdaptedLinear,
    pub to_v: AdaptedLinear,
    pub to_out: AdaptedLinear,
}

impl VaeAttention {
    fn load(vb: VarBuilder, name: &str, channels: usize, groups: usize) -> Result<Self> {
        let linear = |sub: &str| AdaptedLinear::load(vb.pp(sub), format!("{name}.{sub}"), channels, channels, true);
        Ok(Self {
            group_norm: GroupNorm::load(vb.pp("group_norm"), groups, channels, VAE_EPS)?,
            to_q: linear("to_q")?,
            to_k: linear("to_k")?,
            to_v: linear("to_v")?,
            to_out: linear("to_out.0")?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self.group_norm.forward(x)?.reshape((b, c, h * w))?.transpose(1, 2)?;
        let q = self.to_q.forward(&tokens)?;
        let k = self.to_k.forward(&tokens)?;
        let v = self.to_v.forward(&tokens)?;
        let attended = self.to_out.forward(&scaled_dot_product_attention(&q, &k, &v, 1, None, true)?)?;
        attended.transpose(1, 2)?.reshape((b, c, h, w))? + x
    }
}

/// `UNetMidBlock2D` without time embedding: resnet, (attention), resnet.
#[derive(Clone, Debug)]
pub struct VaeMidBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attention: Option<VaeAttention>,
}

impl VaeMidBlock {
    fn load(vb: VarBuilder, name: &str, resnet: &ResnetConfig, add_attention: bool) -> Result<Self> {
        let resnets = (0..2)
            .map(|i| ResnetBlock2D::load(vb.pp(format!("resnets.{i}")), &format!("{name}.resnets.{i}"), resnet))
            .collect::<Result<Vec<_>>>()?;
        let attention = if add_attention {
            Some(VaeAttention::load(vb.pp("attentions.0"), &format!("{name}.attentions.0"), resnet.out_channels, resnet.groups)?)
        } else {
            None
        };
        Ok(Self { resnets, attention })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnets[0].forward(x, None)?;
        if let Some(attention) = &self.attention {
            h = attention.forward(&h)?;
        }
        self.resnets[1].forward(&h, None)
    }
}

/// Resnets followed by an optional down- or upsampler (`DownEncoderBlock2D`/`UpDecoderBlock2D`).
#[derive(Clone, Debug)]
pub struct VaeBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub(crate) downsampler: Option<Downsample2D>,
    pub(crate) upsampler: Option<Upsample2D>,
}

impl VaeBlock {
    fn load_resnets(vb: &VarBuilder, name: &str, layers: usize, resnet: &ResnetConfig) -> Result<Vec<ResnetBlock2D>> {
        (0..layers)
            .map(|i| {
                let cfg = ResnetConfig { in_channels: if i == 0 { resnet.in_channels } else { resnet.out_channels }, ..resnet.clone() };
                ResnetBlock2D::load(vb.pp(format!("resnets.{i}")), &format!("{name}.resnets.{i}"), &cfg)
            })
            .collect()
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for resnet in &self.resnets {
            h = resnet.forward(&h, None)?;
        }
        if let Some(down) = &self.downsampler {
            h = down.forward(&h)?;
        }
        if let Some(up) = &self.upsampler {
            h = up.forward(&h, None)?;
        }
        Ok(h)
    }
}

/// Encoder or decoder: `conv_in`, blocks (and a mid block before or after them), GroupNorm,
/// activation, `conv_out`.
#[derive(Clone, Debug)]
pub struct VaeCoder {
    pub conv_in: FrozenConv2d,
    pub blocks: Vec<VaeBlock>,
    pub mid_block: VaeMidBlock,
    pub(crate) conv_norm_out: GroupNorm,
    pub(crate) conv_out: FrozenConv2d,
    act: Activation,
    mid_first: bool,
}

impl VaeCoder {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        if self.mid_first {
            h = self.mid_block.forward(&h)?;
        }
        for block in &self.blocks {
            h = block.forward(&h)?;
        }
        if !self.mid_first {
            h = self.mid_block.forward(&h)?;
        }
        self.conv_out.forward(&self.act.forward(&self.conv_norm_out.forward(&h)?)?)
    }
}

pub struct AutoencoderKL {
    pub encoder: VaeCoder,
    pub decoder: VaeCoder,
    pub(crate) quant_conv: Option<FrozenConv2d>,
    pub(crate) post_quant_conv: Option<FrozenConv2d>,
    config: VaeConfig,
}

/// The resnet of every VAE block: no time embedding.
fn vae_resnet(cfg: &VaeConfig, in_channels: usize, out_channels: usize) -> ResnetConfig {
    ResnetConfig {
        in_channels,
        out_channels,
        temb_channels: None,
        groups: cfg.norm_num_groups,
        eps: VAE_EPS,
        act: cfg.act_fn,
        output_scale_factor: 1.0,
        skip_time_act: false,
    }
}

impl AutoencoderKL {
    pub fn load(vb: VarBuilder, cfg: &VaeConfig) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let (first, last) = (ch[0], ch[n - 1]);
        let resnet = |i: usize, o: usize| vae_resnet(cfg, i, o);
        let latent = cfg.latent_channels;
        let (encoder, quant_conv) = Self::load_encoder(vb.clone(), cfg)?;

        let dec = vb.pp("decoder");
        let mut dec_blocks = Vec::with_capacity(n);
        for i in 0..n {
            let name = format!("decoder.up_blocks.{i}");
            let bvb = dec.pp(format!("up_blocks.{i}"));
            let input = if i == 0 { last } else { ch[n - i] };
            let output = ch[n - 1 - i];
            let resnets = VaeBlock::load_resnets(&bvb, &name, cfg.layers_per_block + 1, &resnet(input, output))?;
            let upsampler = if i + 1 < n { Some(Upsample2D::load(bvb.pp("upsamplers.0"), &format!("{name}.upsamplers.0"), output)?) } else { None };
            dec_blocks.push(VaeBlock { resnets, downsampler: None, upsampler });
        }
        let decoder = VaeCoder {
            conv_in: conv2d_same(dec.pp("conv_in"), latent, last, 3)?,
            blocks: dec_blocks,
            mid_block: VaeMidBlock::load(dec.pp("mid_block"), "decoder.mid_block", &resnet(last, last), cfg.mid_block_add_attention)?,
            conv_norm_out: GroupNorm::load(dec.pp("conv_norm_out"), cfg.norm_num_groups, first, VAE_EPS)?,
            conv_out: conv2d_same(dec.pp("conv_out"), first, cfg.out_channels, 3)?,
            act: cfg.act_fn,
            mid_first: true,
        };

        let post_quant_conv = if cfg.use_post_quant_conv { Some(conv2d_same(vb.pp("post_quant_conv"), latent, latent, 1)?) } else { None };
        Ok(Self { encoder, decoder, quant_conv, post_quant_conv, config: cfg.clone() })
    }

    /// The encoding half alone (`encoder.*` and `quant_conv`), e.g. to rebuild it on another
    /// device (`models::offload`).
    pub(crate) fn load_encoder(vb: VarBuilder, cfg: &VaeConfig) -> Result<(VaeCoder, Option<FrozenConv2d>)> {
        let ch = &cfg.block_out_channels;
        let n = ch.len();
        let (first, last) = (ch[0], ch[n - 1]);
        let resnet = |i: usize, o: usize| vae_resnet(cfg, i, o);
        let latent = cfg.latent_channels;
        let enc = vb.pp("encoder");
        let mut enc_blocks = Vec::with_capacity(n);
        for i in 0..n {
            let name = format!("encoder.down_blocks.{i}");
            let bvb = enc.pp(format!("down_blocks.{i}"));
            let input = if i == 0 { first } else { ch[i - 1] };
            let resnets = VaeBlock::load_resnets(&bvb, &name, cfg.layers_per_block, &resnet(input, ch[i]))?;
            let downsampler = if i + 1 < n { Some(Downsample2D::load(bvb.pp("downsamplers.0"), &format!("{name}.downsamplers.0"), ch[i], 0)?) } else { None };
            enc_blocks.push(VaeBlock { resnets, downsampler, upsampler: None });
        }
        let encoder = VaeCoder {
            conv_in: conv2d_same(enc.pp("conv_in"), cfg.in_channels, first, 3)?,
            blocks: enc_blocks,
            mid_block: VaeMidBlock::load(enc.pp("mid_block"), "encoder.mid_block", &resnet(last, last), cfg.mid_block_add_attention)?,
            conv_norm_out: GroupNorm::load(enc.pp("conv_norm_out"), cfg.norm_num_groups, last, VAE_EPS)?,
            conv_out: conv2d_same(enc.pp("conv_out"), last, 2 * latent, 3)?,
            act: cfg.act_fn,
            mid_first: false,
        };
        let quant_conv = if cfg.use_quant_conv { Some(conv2d_same(vb.pp("quant_conv"), 2 * latent, 2 * latent, 1)?) } else { None };
        Ok((encoder, quant_conv))
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// The dtype of the weights (what pixels and latents must be cast to); f32 for a VAE whose
    /// config says `force_upcast` when the model was loaded in f16.
    pub fn dtype(&self) -> candle_core::DType {
        self.encoder.conv_in.weight.dtype()
    }

    /// Pixels `[B, 3, H, W]` in [-1, 1] → latent distribution `[B, 4, H/8, W/8]` (unscaled).
    pub fn encode(&self, x: &Tensor) -> Result<DiagonalGaussian> {
        let mut moments = self.encoder.forward(x)?;
        if let Some(conv) = &self.quant_conv {
            moments = conv.forward(&moments)?;
        }
        DiagonalGaussian::from_moments(&moments)
    }

    /// Latents `[B, 4, h, w]` (already divided by the scaling factor) → pixels in about [-1, 1].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(conv) => conv.forward(z)?,
            None => z.clone(),
        };
        self.decoder.forward(&z)
    }

    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }
}
