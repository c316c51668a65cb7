//! CLIP text encoder (transformers' `CLIPTextModel`): causal self-attention, last hidden state
//! after the final layer norm.

use candle_core::{Result, Tensor};

use crate::nn::AdaptedLinear;

pub struct ClipTextModel {}

impl ClipTextModel {
    pub fn load(_vb: candle_nn::VarBuilder, _cfg: &super::config::ClipTextConfig) -> Result<Self> {
        todo!("models::clip")
    }

    /// `input_ids` `[B, 77]` (u32) → last hidden state `[B, 77, hidden]`.
    pub fn forward(&self, _input_ids: &Tensor) -> Result<Tensor> {
        todo!("models::clip")
    }

    /// Every LoRA-targetable linear (`…self_attn.{q,k,v,out}_proj`, `…mlp.fc1/fc2`), with full names
    /// like `text_model.encoder.layers.0.self_attn.q_proj`.
    pub fn linears_mut(&mut self) -> Vec<&mut AdaptedLinear> {
        todo!("models::clip")
    }
}
