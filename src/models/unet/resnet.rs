//! Resolution changes between UNet/VAE blocks: `Downsample2D` (strided conv) and `Upsample2D`
//! (nearest ×2 then conv). The resnet block itself lives in `crate::nn::resnet`.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use crate::nn::AdaptedConv2d;

pub(crate) use crate::nn::resnet::{conv2d_same, ResnetBlock2D, ResnetConfig};

/// diffusers' `Downsample2D` with `use_conv`: a 3x3 stride-2 conv (`downsamplers.0.conv`).
/// With `padding == 0` (the VAE) the input is first padded by one on the right and bottom.
#[derive(Clone, Debug)]
pub(crate) struct Downsample2D {
    pub conv: AdaptedConv2d,
    padding: usize,
}

impl Downsample2D {
    /// `name`: the sampler's module name (`down_blocks.0.downsamplers.0`).
    pub fn load(vb: VarBuilder, name: &str, channels: usize, padding: usize) -> Result<Self> {
        let cfg = Conv2dConfig { padding, stride: 2, ..Default::default() };
        let conv = crate::nn::frozen::conv2d(channels, channels, 3, cfg, vb.pp("conv"))?;
        Ok(Self { conv: AdaptedConv2d::new(format!("{name}.conv"), conv), padding })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.padding == 0 {
            let x = x.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?;
            self.conv.forward(&x)
        } else {
            self.conv.forward(x)
        }
    }
}

/// diffusers' `Upsample2D` with `use_conv`: nearest-neighbour upsampling, then a 3x3 conv
/// (`upsamplers.0.conv`).
#[derive(Clone, Debug)]
pub(crate) struct Upsample2D {
    pub conv: AdaptedConv2d,
}

impl Upsample2D {
    /// `name`: the sampler's module name (`up_blocks.0.upsamplers.0`).
    pub fn load(vb: VarBuilder, name: &str, channels: usize) -> Result<Self> {
        Ok(Self { conv: AdaptedConv2d::new(format!("{name}.conv"), conv2d_same(vb.pp("conv"), channels, channels, 3)?) })
    }

    /// Upsample to `size` (H, W) if given, else by a factor of two.
    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        // candle's backward of a nearest upsample is a conv2d, which its CPU backend lacks for
        // bf16: upsample half-precision CPU tensors in f32 (copying values is exact, and the
        // backward then sums the gradients in f32).
        let up = match x.dtype() {
            DType::BF16 | DType::F16 if x.device().is_cpu() => x.to_dtype(DType::F32)?.upsample_nearest2d(th, tw)?.to_dtype(x.dtype())?,
            _ => x.upsample_nearest2d(th, tw)?,
        };
        self.conv.forward(&up)
    }
}
