//! The UNet's down, mid and up blocks (diffusers' `CrossAttnDownBlock2D`/`DownBlock2D`,
//! `UNetMidBlock2DCrossAttn`, `CrossAttnUpBlock2D`/`UpBlock2D`). A block without cross
//! attention is the same struct with no attentions.
//!
//! With gradient checkpointing (a [`CheckpointGrads`] handle passed to `forward`) each resnet and
//! each transformer is one checkpointed piece, as diffusers' `gradient_checkpointing` does;
//! down/up samplers (one conv each) and the up blocks' skip concatenation stay in the graph.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use super::transformer::{Transformer2DModel, TransformerConfig};
use crate::nn::{AdaptedConv2d, AdaptedLinear, CheckpointGrads};

/// `resnet(x, temb)`, checkpointed through `ckpt` when given.
fn run_resnet(resnet: &ResnetBlock2D, x: &Tensor, temb: &Tensor, ckpt: Option<&CheckpointGrads>) -> Result<Tensor> {
    match ckpt {
        None => resnet.forward(x, Some(temb)),
        Some(c) => {
            let resnet = resnet.clone();
            c.checkpoint(x, temb, move |x, temb| resnet.forward(x, Some(temb)))
        }
    }
}

/// `attention(x, context)`, checkpointed through `ckpt` when given.
fn run_attention(attention: &Transformer2DModel, x: &Tensor, context: &Tensor, ckpt: Option<&CheckpointGrads>) -> Result<Tensor> {
    match ckpt {
        None => attention.forward(x, context),
        Some(c) => {
            let attention = attention.clone();
            c.checkpoint(x, context, move |x, context| attention.forward(x, context))
        }
    }
}

/// Load `attentions.{i}` for `i < count` with `cfg` (none when `cfg` is `None`).
fn load_attentions(vb: &VarBuilder, name: &str, count: usize, cfg: Option<&TransformerConfig>) -> Result<Vec<Transformer2DModel>> {
    let Some(cfg) = cfg else { return Ok(Vec::new()) };
    (0..count)
        .map(|i| Transformer2DModel::load(vb.pp(format!("attentions.{i}")), &format!("{name}.attentions.{i}"), cfg))
        .collect()
}

/// A down block: resnets (each followed by an attention in the cross-attention kind), then an
/// optional downsampler. Every intermediate output is kept as a skip connection.
#[derive(Clone, Debug)]
pub struct DownBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub(crate) downsampler: Option<Downsample2D>,
}

impl DownBlock {
    /// `resnet` describes the first resnet (later ones take `out_channels` in);
    /// `attention` is `None` for a `DownBlock2D`.
    pub fn load(
        vb: VarBuilder,
        name: &str,
        num_layers: usize,
        resnet: &ResnetConfig,
        attention: Option<&TransformerConfig>,
        downsample_padding: Option<usize>,
    ) -> Result<Self> {
        let resnets = (0..num_layers)
            .map(|i| {
                let cfg = ResnetConfig { in_channels: if i == 0 { resnet.in_channels } else { resnet.out_channels }, ..resnet.clone() };
                ResnetBlock2D::load(vb.pp(format!("resnets.{i}")), &format!("{name}.resnets.{i}"), &cfg)
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = load_attentions(&vb, name, num_layers, attention)?;
        let downsampler = match downsample_padding {
            Some(padding) => Some(Downsample2D::load(vb.pp("downsamplers.0"), &format!("{name}.downsamplers.0"), resnet.out_channels, padding)?),
            None => None,
        };
        Ok(Self { resnets, attentions, downsampler })
    }

    /// Returns the block output and the skip connections it produced, in order.
    pub fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor, ckpt: Option<&CheckpointGrads>) -> Result<(Tensor, Vec<Tensor>)> {
        let mut h = x.clone();
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        for (i, resnet) in self.resnets.iter().enumerate() {
            h = run_resnet(resnet, &h, temb, ckpt)?;
            if let Some(attention) = self.attentions.get(i) {
                h = run_attention(attention, &h, context, ckpt)?;
            }
            skips.push(h.clone());
        }
        if let Some(down) = &self.downsampler {
            h = down.forward(&h)?;
            skips.push(h.clone());
        }
        Ok((h, skips))
    }

    /// The linear layers (resnets', then attentions') and the convolutions (resnets', then the
    /// downsampler's) LoRA can adapt.
    pub fn layers_mut<'a>(&'a mut self, lin: &mut Vec<&'a mut AdaptedLinear>, conv: &mut Vec<&'a mut AdaptedConv2d>) {
        collect_layers(&mut self.resnets, &mut self.attentions, lin, conv);
        if let Some(d) = &mut self.downsampler {
            conv.push(&mut d.conv);
        }
    }
}

/// `UNetMidBlock2DCrossAttn` with one layer: resnet, attention, resnet.
#[derive(Clone, Debug)]
pub struct MidBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    pub fn load(vb: VarBuilder, name: &str, resnet: &ResnetConfig, attention: &TransformerConfig) -> Result<Self> {
        let resnets = (0..2)
            .map(|i| ResnetBlock2D::load(vb.pp(format!("resnets.{i}")), &format!("{name}.resnets.{i}"), resnet))
            .collect::<Result<Vec<_>>>()?;
        let attentions = load_attentions(&vb, name, 1, Some(attention))?;
        Ok(Self { resnets, attentions })
    }

    pub fn forward(&self, x: &Tensor, temb: &Tensor, context: &Tensor, ckpt: Option<&CheckpointGrads>) -> Result<Tensor> {
        let mut h = run_resnet(&self.resnets[0], x, temb, ckpt)?;
        for (attention, resnet) in self.attentions.iter().zip(&self.resnets[1..]) {
            h = run_attention(attention, &h, context, ckpt)?;
            h = run_resnet(resnet, &h, temb, ckpt)?;
        }
        Ok(h)
    }

    /// The linear layers and convolutions LoRA can adapt.
    pub fn layers_mut<'a>(&'a mut self, lin: &mut Vec<&'a mut AdaptedLinear>, conv: &mut Vec<&'a mut AdaptedConv2d>) {
        collect_layers(&mut self.resnets, &mut self.attentions, lin, conv);
    }
}

/// An up block: each resnet takes the running features concatenated with one skip connection
/// (the most recent first), then an attention in the cross-attention kind; an optional
/// upsampler ends the block.
#[derive(Clone, Debug)]
pub struct UpBlock {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<Transformer2DModel>,
    pub(crate) upsampler: Option<Upsample2D>,
}

/// Channel widths around an up block (diffusers' `in_channels`, `prev_output_channel`,
/// `out_channels`).
#[derive(Clone, Copy, Debug)]
pub struct UpBlockChannels {
    /// Width of the skip that feeds the last resnet (the previous down block's output width).
    pub in_channels: usize,
    /// Width of the features entering the block.
    pub(crate) prev_output_channels: usize,
    pub(crate) out_channels: usize,
}

impl UpBlock {
    pub fn load(
        vb: VarBuilder,
        name: &str,
        num_layers: usize,
        channels: UpBlockChannels,
        resnet: &ResnetConfig,
        attention: Option<&TransformerConfig>,
        add_upsample: bool,
    ) -> Result<Self> {
        let resnets = (0..num_layers)
            .map(|i| {
                let skip = if i == num_layers - 1 { channels.in_channels } else { channels.out_channels };
                let running = if i == 0 { channels.prev_output_channels } else { channels.out_channels };
                let cfg = ResnetConfig { in_channels: running + skip, out_channels: channels.out_channels, ..resnet.clone() };
                ResnetBlock2D::load(vb.pp(format!("resnets.{i}")), &format!("{name}.resnets.{i}"), &cfg)
            })
            .collect::<Result<Vec<_>>>()?;
        let attentions = load_attentions(&vb, name, num_layers, attention)?;
        let upsampler = if add_upsample { Some(Upsample2D::load(vb.pp("upsamplers.0"), &format!("{name}.upsamplers.0"), channels.out_channels)?) } else { None };
        Ok(Self { resnets, attentions, upsampler })
    }

    /// Consumes `resnets.len()` skips from the end of `skips`; upsamples to `upsample_size`
    /// (the next skip's spatial size) when given, else by two.
    pub fn forward(
        &self,
        x: &Tensor,
        skips: &mut Vec<Tensor>,
        temb: &Tensor,
        context: &Tensor,
        upsample_size: Option<(usize, usize)>,
        ckpt: Option<&CheckpointGrads>,
    ) -> Result<Tensor> {
        let mut h = x.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().ok_or_else(|| candle_core::Error::Msg("UNet up block ran out of skip connections".into()))?;
            h = run_resnet(resnet, &Tensor::cat(&[&h, &skip], 1)?, temb, ckpt)?;
            if let Some(attention) = self.attentions.get(i) {
                h = run_attention(attention, &h, context, ckpt)?;
            }
        }
        match &self.upsampler {
            Some(up) => up.forward(&h, upsample_size),
            None => Ok(h),
        }
    }

    /// The linear layers and convolutions (resnets', then the upsampler's) LoRA can adapt.
    pub fn layers_mut<'a>(&'a mut self, lin: &mut Vec<&'a mut AdaptedLinear>, conv: &mut Vec<&'a mut AdaptedConv2d>) {
        collect_layers(&mut self.resnets, &mut self.attentions, lin, conv);
        if let Some(u) = &mut self.upsampler {
            conv.push(&mut u.conv);
        }
    }
}

fn collect_layers<'a>(
    resnets: &'a mut [ResnetBlock2D],
    attentions: &'a mut [Transformer2DModel],
    lin: &mut Vec<&'a mut AdaptedLinear>,
    conv: &mut Vec<&'a mut AdaptedConv2d>,
) {
    for resnet in resnets {
        resnet.layers_mut(lin, conv);
    }
    for attention in attentions {
        attention.linears_mut(lin);
    }
}
