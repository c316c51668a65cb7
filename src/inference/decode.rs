//! Latents → image tensor with the loaded VAE (its own scaling factor and dtype).

use anyhow::Context;
use candle_core::{DType, Tensor};

use crate::models::StableDiffusion;

/// `vae.decode(latents / scaling_factor)`, then `(x / 2 + 0.5).clamp(0, 1)`: `[3, H, W]` f32.
/// The latents are cast to the VAE's own dtype (f32 for an upcast VAE under fp16). A decoded image
/// with NaN or infinite values (which would turn black) is an error.
pub(crate) fn decode_latents(sd: &StableDiffusion, latents: &Tensor) -> anyhow::Result<Tensor> {
    let z = latents.affine(1.0 / sd.vae.scaling_factor(), 0.0)?.to_dtype(sd.vae.dtype())?;
    let image = sd.vae.decode(&z).context("decoding latents with the VAE")?.to_dtype(DType::F32)?;
    let bad = super::denoise::non_finite_count(&image)?;
    if bad > 0 {
        let hint = match sd.vae.dtype() {
            DType::F32 | DType::F64 => String::new(),
            half => format!(" (the VAE runs in {half:?} and overflows there: an f32 VAE avoids it)"),
        };
        anyhow::bail!("the VAE decoded {bad} NaN or infinite value(s) of {} from finite latents{hint}; no image was written", image.elem_count());
    }
    Ok(image.affine(0.5, 0.5)?.clamp(0.0, 1.0)?.squeeze(0)?)
}
