//! Timestep embeddings: diffusers' sinusoidal `Timesteps` projection and the `TimestepEmbedding`
//! MLP (`time_embedding.linear_1` → act → `linear_2`).

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::nn::{Activation, AdaptedLinear};

/// diffusers' `get_timestep_embedding`: `[B]` timesteps → `[B, dim]` sinusoids (f32).
///
/// Frequencies are `exp(-ln(10000) · i / (dim/2 - freq_shift))`; the halves are `[sin, cos]`,
/// or `[cos, sin]` with `flip_sin_to_cos`; an odd `dim` gets a zero column.
pub(crate) fn timestep_embedding(timesteps: &Tensor, dim: usize, flip_sin_to_cos: bool, freq_shift: f64) -> Result<Tensor> {
    let half = dim / 2;
    let device: &Device = timesteps.device();
    let exponent = (Tensor::arange(0u32, half as u32, device)?.to_dtype(DType::F32)? * (-(10000f64.ln()) / (half as f64 - freq_shift)))?;
    let freqs = exponent.exp()?;
    let t = timesteps.to_dtype(DType::F32)?;
    let args = t.unsqueeze(1)?.broadcast_mul(&freqs.unsqueeze(0)?)?;
    let (sin, cos) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos { Tensor::cat(&[cos, sin], 1)? } else { Tensor::cat(&[sin, cos], 1)? };
    if dim % 2 == 1 {
        emb.pad_with_zeros(1, 0, 1)
    } else {
        Ok(emb)
    }
}

/// `TimestepEmbedding`: `linear_1` → act → `linear_2`.
#[derive(Clone, Debug)]
pub struct TimestepEmbedding {
    pub linear_1: AdaptedLinear,
    pub linear_2: AdaptedLinear,
    act: Activation,
}

impl TimestepEmbedding {
    pub fn load(vb: VarBuilder, name: &str, in_dim: usize, embed_dim: usize, act: Activation) -> Result<Self> {
        Ok(Self {
            linear_1: AdaptedLinear::load(vb.pp("linear_1"), format!("{name}.linear_1"), in_dim, embed_dim, true)?,
            linear_2: AdaptedLinear::load(vb.pp("linear_2"), format!("{name}.linear_2"), embed_dim, embed_dim, true)?,
            act,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.act.forward(&self.linear_1.forward(x)?)?)
    }

    pub fn linears_mut<'a>(&'a mut self, out: &mut Vec<&'a mut AdaptedLinear>) {
        out.push(&mut self.linear_1);
        out.push(&mut self.linear_2);
    }
}
