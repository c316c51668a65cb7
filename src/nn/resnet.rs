//! diffusers' `ResnetBlock2D`: GroupNorm → act → conv → (+ time embedding) → GroupNorm → act →
//! conv, plus a (1x1 conv) shortcut; shared by the UNet (with time embedding) and the VAE
//! (without).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use crate::nn::frozen::FrozenConv2d;

use super::{Activation, AdaptedConv2d, AdaptedLinear, GroupNorm};

/// How a `ResnetBlock2D` is built.
#[derive(Clone, Debug)]
pub struct ResnetConfig {
    pub in_channels: usize,
    pub(crate) out_channels: usize,
    /// Width of the time embedding; `None` for the VAE (no `time_emb_proj`).
    pub(crate) temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub act: Activation,
    /// The output is divided by this (`output_scale_factor`).
    pub(crate) output_scale_factor: f64,
    /// `skip_time_act`: project the time embedding without applying the activation first.
    pub(crate) skip_time_act: bool,
}

#[derive(Clone, Debug)]
pub struct ResnetBlock2D {
    pub(crate) norm1: GroupNorm,
    pub conv1: AdaptedConv2d,
    pub time_emb_proj: Option<AdaptedLinear>,
    pub norm2: GroupNorm,
    pub(crate) conv2: AdaptedConv2d,
    pub conv_shortcut: Option<AdaptedConv2d>,
    act: Activation,
    output_scale_factor: f64,
    skip_time_act: bool,
}

/// A `k`x`k` conv with bias, stride 1 and "same" padding, loaded from `vb`.
pub(crate) fn conv2d_same(vb: VarBuilder, in_c: usize, out_c: usize, k: usize) -> Result<FrozenConv2d> {
    let cfg = Conv2dConfig { padding: (k - 1) / 2, ..Default::default() };
    crate::nn::frozen::conv2d(in_c, out_c, k, cfg, vb)
}

impl ResnetBlock2D {
    /// Load from `vb`; `name` is the block's module name in its model (e.g.
    /// `down_blocks.0.resnets.0`), used to name `time_emb_proj` for LoRA matching.
    pub fn load(vb: VarBuilder, name: &str, cfg: &ResnetConfig) -> Result<Self> {
        let (i, o) = (cfg.in_channels, cfg.out_channels);
        let time_emb_proj = match cfg.temb_channels {
            Some(t) => {
                let name = format!("{name}.time_emb_proj");
                Some(AdaptedLinear::load(vb.pp("time_emb_proj"), name, t, o, true)?)
            }
            None => None,
        };
        let conv_shortcut = if i != o {
            Some(AdaptedConv2d::new(format!("{name}.conv_shortcut"), crate::nn::frozen::conv2d(i, o, 1, Default::default(), vb.pp("conv_shortcut"))?))
        } else {
            None
        };
        Ok(Self {
            norm1: GroupNorm::load(vb.pp("norm1"), cfg.groups, i, cfg.eps)?,
            conv1: AdaptedConv2d::new(format!("{name}.conv1"), conv2d_same(vb.pp("conv1"), i, o, 3)?),
            time_emb_proj,
            norm2: GroupNorm::load(vb.pp("norm2"), cfg.groups, o, cfg.eps)?,
            conv2: AdaptedConv2d::new(format!("{name}.conv2"), conv2d_same(vb.pp("conv2"), o, o, 3)?),
            conv_shortcut,
            act: cfg.act,
            output_scale_factor: cfg.output_scale_factor,
            skip_time_act: cfg.skip_time_act,
        })
    }

    /// The layers LoRA can adapt: the time-embedding projection (the only linear layer of a
    /// resnet), and the convolutions `conv1`, `conv2` and `conv_shortcut` (when the widths differ).
    pub fn layers_mut<'a>(&'a mut self, lin: &mut Vec<&'a mut AdaptedLinear>, conv: &mut Vec<&'a mut AdaptedConv2d>) {
        if let Some(proj) = &mut self.time_emb_proj {
            lin.push(proj);
        }
        conv.push(&mut self.conv1);
        conv.push(&mut self.conv2);
        if let Some(c) = &mut self.conv_shortcut {
            conv.push(c);
        }
    }

    /// `x` `[B, C_in, H, W]`, `temb` `[B, T]` (required when built with a time embedding).
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward(&self.norm1.forward_act(x, self.act)?)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = if self.skip_time_act { temb.clone() } else { self.act.forward(temb)? };
            let t = proj.forward(&t)?.unsqueeze(2)?.unsqueeze(3)?;
            h = h.broadcast_add(&t)?;
        }
        let h = self.conv2.forward(&self.norm2.forward_act(&h, self.act)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(x)?,
            None => x.clone(),
        };
        let out = (shortcut + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}
