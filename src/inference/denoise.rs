//! The denoising loop: the sampler's timesteps, the UNet on the (doubled) latents, classifier-free
//! guidance, one sampler step each, then the VAE decode.

use anyhow::Context;
use candle_core::{DType, Tensor};

use super::{decode_latents, encode_prompts, GenerateOptions};
use crate::models::StableDiffusion;
use crate::schedulers::Sampler;

/// Run the sampler from initial N(0, 1) latents `[1, 4, h, w]` and decode: the image
/// `[3, H, W]` as f32 in [0, 1]. `opts.sampler` is not read: `sampler` is the one to use.
pub fn generate_image(sd: &StableDiffusion, opts: &GenerateOptions, sampler: &mut dyn Sampler, init_latents: &Tensor) -> anyhow::Result<Tensor> {
    let device = init_latents.device().clone();
    let guidance = opts.guidance_scale > 1.0;
    let (_, _, lh, lw) = init_latents.dims4()?;
    let scale = super::vae_scale_factor(sd);
    let text = encode_prompts(sd, &opts.prompt, &opts.negative_prompt, guidance, (lh * scale, lw * scale), &device)?;
    let model_dtype = text.context.dtype();
    sampler.set_timesteps(opts.steps)?;
    let mut latents = init_latents.to_dtype(DType::F32)?.affine(sampler.init_noise_sigma(), 0.0)?;
    let timesteps = sampler.timesteps().to_vec();
    let bar = if opts.progress {
        indicatif::ProgressBar::new(timesteps.len() as u64)
            .with_style(
                indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} steps, {elapsed} (eta {eta})")
                    .expect("valid template")
                    .progress_chars("=> "),
            )
            .with_message("denoising")
    } else {
        indicatif::ProgressBar::hidden()
    };
    let batch = if guidance { 2 } else { 1 };
    for &t in &timesteps {
        let model_in = if guidance { Tensor::cat(&[&latents, &latents], 0)? } else { latents.clone() };
        let model_in = sampler.scale_model_input(&model_in, t)?.to_dtype(model_dtype)?;
        let t_batch = Tensor::full(t as f32, batch, &device)?;
        let pred = sd.unet.forward(&model_in, &t_batch, &text).with_context(|| format!("UNet at timestep {t}"))?;
        let pred = pred.to_dtype(DType::F32)?;
        let eps = if guidance {
            let uncond = pred.narrow(0, 0, 1)?;
            let cond = pred.narrow(0, 1, 1)?;
            (&uncond + (cond - &uncond)?.affine(opts.guidance_scale, 0.0)?)?
        } else {
            pred
        };
        latents = sampler.step(&eps, t, &latents)?;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let bad = non_finite_count(&latents)?;
    if bad > 0 {
        anyhow::bail!(
            "the sampled latents hold {bad} NaN or infinite value(s) of {}: the UNet's output overflowed (a LoRA with huge weights or \
             scale, an extreme guidance scale, or half precision), so no image was written; check the LoRA files with `lora inspect`, \
             and lower the LoRA scale or the guidance scale (now {})",
            latents.elem_count(),
            opts.guidance_scale
        );
    }
    decode_latents(sd, &latents)
}

/// How many values of `t` are NaN or infinite.
pub(crate) fn non_finite_count(t: &Tensor) -> candle_core::Result<usize> {
    let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(values.iter().filter(|v| !v.is_finite()).count())
}
