//! Prompt encoding for classifier-free guidance: the loaded text side turns the negative and the
//! positive prompt into one batch of conditioning (on the CPU while the text encoders are
//! parked there, `models::offload`). SDXL also gets its time ids (the image size, no crop),
//! and an empty negative prompt is all zeros when the model says `force_zeros_for_empty_prompt`.

use anyhow::Context;
use candle_core::{Device, Tensor};

use crate::models::conditioning::time_ids;
use crate::models::{Conditioning, StableDiffusion};

/// The conditioning for guidance: rows `[uncond, cond]` when `guidance` is on, else `[cond]`,
/// for an image of `height` x `width` pixels.
pub(crate) fn encode_prompts(
    sd: &StableDiffusion,
    prompt: &str,
    negative_prompt: &str,
    guidance: bool,
    (height, width): (usize, usize),
    device: &Device,
) -> anyhow::Result<Conditioning> {
    let zero_negative = guidance && negative_prompt.is_empty() && sd.force_zeros_for_empty_prompt;
    let texts: Vec<&str> = if guidance && !zero_negative { vec![negative_prompt, prompt] } else { vec![prompt] };
    let mut cond = sd.text_embeddings(&texts, device).context("running the text encoder")?;
    if zero_negative {
        // diffusers' StableDiffusionXLPipeline: `torch.zeros_like` of the prompt's embeddings.
        let zeros = Conditioning { context: cond.context.zeros_like()?, pooled: cond.pooled.as_ref().map(Tensor::zeros_like).transpose()?, time_ids: None };
        cond = Conditioning::cat(&[&zeros, &cond])?;
    }
    if sd.unet.config().addition.is_some() {
        let ids = time_ids((height, width), (0, 0), (height, width));
        let rows = cond.batch()?;
        let ids = Tensor::from_vec(ids.to_vec(), (1, 6), device)?.repeat((rows, 1))?.to_dtype(cond.context.dtype())?;
        cond = cond.with_time_ids(ids);
    }
    Ok(cond)
}
