//! Text-to-image inference (diffusers' `StableDiffusionPipeline.__call__`): encode the prompt and
//! the negative prompt, run the sampler loop with classifier-free guidance, decode the latents
//! with the VAE and write 8-bit RGB PNGs atomically.

use std::path::Path;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use rand::SeedableRng;

use super::{build_sampler, Sampler, SamplerKind};
use crate::models::StableDiffusion;

/// What to generate and how.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub prompt: String,
    /// The unconditional prompt of classifier-free guidance (diffusers uses "" when none is given).
    pub negative_prompt: String,
    pub sampler: SamplerKind,
    pub steps: usize,
    /// Guidance scale g: `eps = u + g (c - u)`; guidance is off when g <= 1.
    pub guidance_scale: f64,
    pub height: usize,
    pub width: usize,
    /// Seeds the initial noise (when no latents are given) and the ancestral samplers.
    pub seed: u64,
    /// Show a progress bar over the denoising steps on stderr.
    pub progress: bool,
}

impl Default for GenerateOptions {
    fn default() -> Self {
        GenerateOptions {
            prompt: String::new(),
            negative_prompt: String::new(),
            sampler: SamplerKind::Pndm,
            steps: 30,
            guidance_scale: 7.5,
            height: 512,
            width: 512,
            seed: 0,
            progress: false,
        }
    }
}

/// The VAE's spatial down-sampling factor, `2^(len(block_out_channels) - 1)`.
pub fn vae_scale_factor(sd: &StableDiffusion) -> usize {
    let n = sd.vae.config().block_out_channels.len().max(1);
    1usize << (n - 1)
}

/// The default image side: the UNet's `sample_size` (64 if absent) times the VAE factor, as
/// diffusers' pipeline does.
pub fn default_image_side(sd: &StableDiffusion, factor: usize) -> usize {
    sd.unet.config().sample_size.unwrap_or(64) * factor
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

/// Text embeddings for guidance: `[uncond, cond]` (`[2, 77, D]`) when `guidance` is on, else
/// `[cond]`.
pub fn encode_prompts(sd: &StableDiffusion, prompt: &str, negative_prompt: &str, guidance: bool, device: &Device) -> anyhow::Result<Tensor> {
    let texts: Vec<&str> = if guidance { vec![negative_prompt, prompt] } else { vec![prompt] };
    sd.text_embeddings(&texts, device).context("running the text encoder")
}

/// Run the sampler from initial N(0, 1) latents `[1, 4, h, w]` and decode: the image
/// `[3, H, W]` as f32 in [0, 1].
pub fn generate_image(
    sd: &StableDiffusion,
    opts: &GenerateOptions,
    sampler: &mut dyn Sampler,
    init_latents: &Tensor,
) -> anyhow::Result<Tensor> {
    let device = init_latents.device().clone();
    let guidance = opts.guidance_scale > 1.0;
    let text = encode_prompts(sd, &opts.prompt, &opts.negative_prompt, guidance, &device)?;
    let model_dtype = text.dtype();
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
    decode_latents(sd, &latents, model_dtype)
}

/// `vae.decode(latents / scaling_factor)`, then `(x / 2 + 0.5).clamp(0, 1)`: `[3, H, W]` f32.
/// The latents are cast to the VAE's own dtype (f32 for an upcast VAE under fp16), not
/// `_model_dtype`.
pub fn decode_latents(sd: &StableDiffusion, latents: &Tensor, _model_dtype: DType) -> anyhow::Result<Tensor> {
    let z = latents.affine(1.0 / sd.vae.scaling_factor(), 0.0)?.to_dtype(sd.vae.dtype())?;
    let image = sd.vae.decode(&z).context("decoding latents with the VAE")?.to_dtype(DType::F32)?;
    Ok(image.affine(0.5, 0.5)?.clamp(0.0, 1.0)?.squeeze(0)?)
}

/// `[3, H, W]` in [0, 1] → 8-bit RGB as diffusers' `numpy_to_pil` (`round(x * 255)`).
pub fn to_rgb8(image: &Tensor) -> anyhow::Result<image::RgbImage> {
    let (c, h, w) = image.dims3().context("image tensor must be [3, H, W]")?;
    if c != 3 {
        anyhow::bail!("image tensor has {c} channels, expected 3 (shape {:?})", image.dims());
    }
    let hwc: Vec<f32> = image.permute((1, 2, 0))?.flatten_all()?.to_vec1()?;
    let bytes = hwc.iter().map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8).collect();
    image::RgbImage::from_raw(w as u32, h as u32, bytes).context("building the RGB image")
}

/// Encode as PNG and write atomically (temporary file, then rename).
pub fn save_png(img: &image::RgbImage, path: &Path) -> anyhow::Result<()> {
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png).context("encoding PNG")?;
    crate::util::fs::write_atomic(path, &bytes).with_context(|| format!("writing {}", path.display()))
}

/// Generate `count` images: from `init_latents` when given (every image starts from them), else
/// from seeded noise drawn in sequence from one RNG (like one shared torch generator). Returns
/// the `[3, H, W]` images in [0, 1].
pub fn generate(sd: &StableDiffusion, opts: &GenerateOptions, count: usize, init_latents: Option<&Tensor>, device: &Device) -> anyhow::Result<Vec<Tensor>> {
    let shape = latent_shape(opts.height, opts.width, vae_scale_factor(sd))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let mut images = Vec::with_capacity(count);
    for i in 0..count {
        let latents = match init_latents {
            Some(l) => l.clone(),
            None => random_latents(&shape, &mut rng, device)?,
        };
        let mut sampler = build_sampler(opts.sampler, &sd.scheduler, opts.seed.wrapping_add(i as u64))?;
        images.push(generate_image(sd, opts, sampler.as_mut(), &latents)?);
    }
    Ok(images)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rgb8_rounds_like_numpy_to_pil() {
        let img = Tensor::new(&[[[0.0f32, 1.0]], [[0.5, 0.2]], [[1.2, -0.1]]], &Device::Cpu).unwrap(); // [3, 1, 2]
        let rgb = to_rgb8(&img).unwrap();
        assert_eq!(rgb.dimensions(), (2, 1));
        assert_eq!(rgb.get_pixel(0, 0).0, [0, 128, 255]); // 0.5*255 = 127.5 rounds away from zero
        assert_eq!(rgb.get_pixel(1, 0).0, [255, 51, 0]);
    }

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
