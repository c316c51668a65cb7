//! Image size ↔ latent shape (from the loaded VAE's and UNet's configs) and the initial
//! latents: seeded N(0, 1) noise or a tensor read from a safetensors file.

use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};

use crate::models::StableDiffusion;

/// The VAE's spatial down-sampling factor, `2^(len(block_out_channels) - 1)`.
pub fn vae_scale_factor(sd: &StableDiffusion) -> usize {
    let n = sd.vae.config().block_out_channels.len().max(1);
    1usize << (n - 1)
}

/// The default image side: the UNet's `sample_size` times the VAE factor, as diffusers'
/// pipeline does; an error when the UNet config has no `sample_size` (diffusers fails there too).
pub fn default_image_side(sd: &StableDiffusion, factor: usize) -> anyhow::Result<usize> {
    match sd.unet.config().sample_size {
        Some(side) => Ok(side * factor),
        None => anyhow::bail!("the UNet config has no `sample_size`, so there is no default image size; give --height and --width"),
    }
}

/// The latent shape `[1, 4, H/f, W/f]` for an image size, refusing sizes the VAE cannot produce.
pub fn latent_shape(height: usize, width: usize, factor: usize) -> anyhow::Result<[usize; 4]> {
    if height == 0 || width == 0 || height % factor != 0 || width % factor != 0 {
        anyhow::bail!("image size {height}x{width} must be positive multiples of the VAE factor {factor}");
    }
    Ok([1, 4, height / factor, width / factor])
}

/// N(0, 1) latents of the given shape from a seeded RNG (f32).
pub fn random_latents(shape: &[usize], rng: &mut rand::rngs::StdRng, device: &Device) -> candle_core::Result<Tensor> {
    use rand::RngExt;
    let count: usize = shape.iter().product();
    let values: Vec<f32> = (0..count).map(|_| rng.sample(rand_distr::StandardNormal)).collect();
    Tensor::from_vec(values, shape, device)
}

/// Read initial latents from a safetensors file holding exactly one tensor `[1, 4, h, w]`
/// (returned as f32). `expected` (if given) is the shape the image size asks for.
pub fn load_latents(path: &Path, expected: Option<[usize; 4]>, device: &Device) -> anyhow::Result<Tensor> {
    let tensors = candle_core::safetensors::load(path, device)
        .with_context(|| format!("reading latents from {}", path.display()))?;
    if tensors.len() != 1 {
        let mut names: Vec<_> = tensors.keys().cloned().collect();
        names.sort();
        anyhow::bail!("{}: expected exactly one tensor [1, 4, H/8, W/8], found {}: {names:?}", path.display(), tensors.len());
    }
    let (name, latents) = tensors.into_iter().next().expect("one tensor");
    let dims = latents.dims().to_vec();
    if dims.len() != 4 || dims[0] != 1 || dims[1] != 4 {
        anyhow::bail!("{}: tensor `{name}` has shape {dims:?}, expected [1, 4, H/8, W/8]", path.display());
    }
    if let Some(want) = expected {
        if dims != want {
            anyhow::bail!("{}: tensor `{name}` has shape {dims:?} but the image size needs {want:?}", path.display());
        }
    }
    Ok(latents.to_dtype(DType::F32)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latent_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("l.safetensors");
        let t = Tensor::zeros((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
        candle_core::safetensors::save(&std::collections::HashMap::from([("latents".to_string(), t.clone())]), &good).unwrap();
        assert_eq!(load_latents(&good, Some([1, 4, 8, 8]), &Device::Cpu).unwrap().dims(), &[1, 4, 8, 8]);
        let err = load_latents(&good, Some([1, 4, 16, 16]), &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("[1, 4, 8, 8]") && err.contains("[1, 4, 16, 16]"), "{err}");
        let two = dir.path().join("two.safetensors");
        candle_core::safetensors::save(&std::collections::HashMap::from([("a".to_string(), t.clone()), ("b".to_string(), t)]), &two).unwrap();
        assert!(load_latents(&two, None, &Device::Cpu).unwrap_err().to_string().contains("exactly one"));
        assert!(latent_shape(60, 64, 8).is_err());
    }
}
