//! Prompt encoding for classifier-free guidance: the loaded tokenizer and text encoder turn the
//! negative and the positive prompt into one batch of embeddings (on the CPU while the text
//! encoder is parked there, `models::offload`).

use anyhow::Context;
use candle_core::{Device, Tensor};

use crate::models::StableDiffusion;

/// Text embeddings for guidance: `[uncond, cond]` (`[2, 77, D]`) when `guidance` is on, else
/// `[cond]`.
pub(crate) fn encode_prompts(sd: &StableDiffusion, prompt: &str, negative_prompt: &str, guidance: bool, device: &Device) -> anyhow::Result<Tensor> {
    let texts: Vec<&str> = if guidance { vec![negative_prompt, prompt] } else { vec![prompt] };
    sd.text_embeddings(&texts, device).context("running the text encoder")
}
