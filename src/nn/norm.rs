//! Layer norm and group norm composed from differentiable candle ops (candle's fused
//! `layer_norm`/`rms_norm` kernels have no backward, so gradients would silently stop there).

use candle_core::{DType, Result, Tensor, D};
use candle_nn::VarBuilder;

/// `LayerNorm` over the last dimension with an affine weight and bias (torch `nn.LayerNorm`).
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    /// Load `weight` and `bias` of shape `[dim]` from `vb`.
    pub fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: vb.get(dim, "weight")?, bias: vb.get(dim, "bias")?, eps })
    }

    /// `(x - mean) / sqrt(var + eps) * weight + bias` over the last dimension, computed in f32
    /// for half-precision inputs as torch does.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = upcast(x)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?.to_dtype(dtype)?;
        normed.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
}

/// `GroupNorm` over `[B, C, ...]` with per-channel affine weight and bias (torch `nn.GroupNorm`).
#[derive(Clone, Debug)]
pub struct GroupNorm {
    pub num_groups: usize,
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl GroupNorm {
    /// Load `weight` and `bias` of shape `[channels]`; `channels` must divide into `num_groups`.
    pub fn load(vb: VarBuilder, num_groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if num_groups == 0 || channels % num_groups != 0 {
            candle_core::bail!(
                "group norm `{}`: {channels} channels cannot be split into {num_groups} groups",
                vb.prefix()
            )
        }
        Ok(Self { num_groups, weight: vb.get(channels, "weight")?, bias: vb.get(channels, "bias")?, eps })
    }

    pub fn channels(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Normalise each group of channels over its channels and spatial positions.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        if dims.len() < 3 || dims[1] != self.channels() {
            candle_core::bail!(
                "group norm expects [B, {}, ...], got input of shape {:?}",
                self.channels(),
                dims
            )
        }
        let dtype = x.dtype();
        let grouped = upcast(&x.reshape((dims[0], self.num_groups, ()))?)?;
        let mean = grouped.mean_keepdim(D::Minus1)?;
        let centered = grouped.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?.to_dtype(dtype)?.reshape(dims.as_slice())?;
        let mut affine_shape = vec![1usize; dims.len()];
        affine_shape[1] = dims[1];
        normed
            .broadcast_mul(&self.weight.reshape(affine_shape.as_slice())?)?
            .broadcast_add(&self.bias.reshape(affine_shape.as_slice())?)
    }
}

fn upcast(x: &Tensor) -> Result<Tensor> {
    match x.dtype() {
        DType::F16 | DType::BF16 => x.to_dtype(DType::F32),
        _ => Ok(x.clone()),
    }
}
