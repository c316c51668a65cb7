//! UNet2DConditionModel (diffusers), SD 1.x and 2.x shapes, built from its `config.json`.

use candle_core::{Result, Tensor};

use crate::nn::AdaptedLinear;

pub struct UNet2DConditionModel {}

impl UNet2DConditionModel {
    pub fn load(_vb: candle_nn::VarBuilder, _cfg: &crate::models::config::UNetConfig) -> Result<Self> {
        todo!("models::unet")
    }

    /// `sample` `[B, C, H, W]`, `timesteps` `[B]` (any numeric dtype), `encoder_hidden_states`
    /// `[B, 77, cross_dim]` → predicted noise (or velocity) `[B, C_out, H, W]`.
    pub fn forward(&self, _sample: &Tensor, _timesteps: &Tensor, _encoder_hidden_states: &Tensor) -> Result<Tensor> {
        todo!("models::unet")
    }

    /// Every LoRA-targetable linear (attention `to_q/to_k/to_v/to_out.0`, `ff.net.0.proj`,
    /// `ff.net.2`, and `proj_in/proj_out` when linear), with full diffusers module names like
    /// `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`.
    pub fn linears_mut(&mut self) -> Vec<&mut AdaptedLinear> {
        todo!("models::unet")
    }
}
