//! Text-to-image sampling (diffusers' `StableDiffusionPipeline.__call__`) on a loaded
//! [`StableDiffusion`]: used by `lora generate` and by validation while and after training.
//!
//! It sits above `models` and `schedulers` and reads every setting from what the model loaded
//! (the UNet's and VAE's configs, the scheduler config): nothing is read again from disk.
//! One concept per file: `sampler` (which sampler, from the model's scheduler config or a
//! name), `latents` (image size ↔ latent shape, initial noise), `prompt` (text embeddings for
//! guidance), `denoise` (the sampler loop with classifier-free guidance), `decode` (VAE decode
//! to an image tensor), `image` (8-bit RGB and PNG files), `validation` (a pipeline's
//! validation images).

use candle_core::{Device, Tensor};
use rand::SeedableRng;

use crate::models::StableDiffusion;
use crate::schedulers::{build_sampler, SamplerKind};

pub mod decode;
pub(crate) mod denoise;
pub mod image;
pub mod latents;
pub mod prompt;
pub mod sampler;
pub mod validation;

pub(crate) use decode::decode_latents;
pub use denoise::generate_image;
pub use image::{save_png, to_rgb8};
pub use latents::{default_image_side, latent_shape, load_latents, random_latents, vae_scale_factor};
pub(crate) use prompt::encode_prompts;
pub(crate) use sampler::SamplerChoice;

/// What to generate and how.
#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub prompt: String,
    /// The unconditional prompt of classifier-free guidance (diffusers uses "" when none is given).
    pub negative_prompt: String,
    /// The sampler, configured from the model's scheduler config (as diffusers'
    /// `Scheduler.from_config(pipe.scheduler.config)`); [`SamplerChoice::resolve`] turns "the
    /// model's own" into the kind its config names.
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
