//! A pipeline's validation images: every `[validation]` prompt, `num_images` each, at the
//! training resolution with the training seed and `validation.negative_prompt` as the
//! unconditional side of guidance, written as `prompt<i>-<j>.png`.

use std::path::{Path, PathBuf};

use anyhow::Result;
use candle_core::Device;

use super::{generate, save_png, to_rgb8, GenerateOptions, SamplerChoice};
use crate::config::types::{Pipeline, ValidationScheduler};
use crate::models::StableDiffusion;
use crate::schedulers::SamplerKind;

/// `prompt<i>-<j>.png`: image `j` of validation prompt `i`.
pub(crate) fn validation_file_name(prompt: usize, image: usize) -> String {
    format!("prompt{prompt}-{image}.png")
}

/// `validation.scheduler` as a sampler choice.
pub(crate) fn validation_sampler(s: ValidationScheduler) -> SamplerChoice {
    match s {
        ValidationScheduler::Model => SamplerChoice::Model,
        ValidationScheduler::Pndm => SamplerChoice::Named(SamplerKind::Pndm),
        ValidationScheduler::Ddim => SamplerChoice::Named(SamplerKind::Ddim),
        ValidationScheduler::Euler => SamplerChoice::Named(SamplerKind::Euler),
    }
}

/// Sample the validation images of `p` with `sd` as it is (adapters attached) into `dir`.
pub fn validation_images(sd: &StableDiffusion, p: &Pipeline, dir: &Path, device: &Device) -> Result<Vec<PathBuf>> {
    let sampler = validation_sampler(p.validation.scheduler).resolve(sd)?;
    let res = p.preprocess.resolution.unwrap_or_else(|| sd.default_resolution()) as usize;
    let mut files = Vec::new();
    for (i, prompt) in p.validation.prompts.iter().enumerate() {
        let opts = GenerateOptions {
            prompt: prompt.clone(),
            negative_prompt: p.validation.negative_prompt.clone(),
            sampler,
            steps: p.validation.steps as usize,
            guidance_scale: p.validation.guidance_scale,
            height: res,
            width: res,
            seed: p.train.seed.unwrap_or(0),
            progress: false,
        };
        tracing::info!("validate: {} image(s) for {prompt:?}", p.validation.num_images);
        let images = generate(sd, &opts, p.validation.num_images as usize, None, device)?;
        for (j, img) in images.iter().enumerate() {
            let path = dir.join(validation_file_name(i, j));
            save_png(&to_rgb8(img)?, &path)?;
            files.push(path);
        }
    }
    Ok(files)
}
