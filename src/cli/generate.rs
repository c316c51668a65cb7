//! `lora generate`: text-to-image with a model, optional LoRA adapters and a chosen sampler;
//! writes 8-bit RGB PNGs atomically.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use candle_core::DType;

use crate::adapters::{read_lora_file_for_use, LoraWeights};
use crate::models::{LoadOptions, StableDiffusion};
use crate::inference::{self as pipeline, GenerateOptions, SamplerChoice};
use crate::schedulers::SamplerKind;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Model: a local diffusers folder, a Hugging Face hub id, or a single-file checkpoint
    /// (`FILE.safetensors` in the LDM layout, or a hub file `org/repo/FILE.safetensors`).
    #[arg(long)]
    pub model: String,
    /// A VAE used instead of the model's: a `.safetensors` file, a diffusers VAE folder or a hub id
    /// (e.g. `madebyollin/sdxl-vae-fp16-fix`).
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// Single files: a diffusers folder whose configs, tokenizer and scheduler replace the
    /// recognised and bundled ones.
    #[arg(long)]
    pub(crate) model_config: Option<PathBuf>,
    /// Single files: the prediction type (`epsilon` or `v_prediction`), overriding what the file
    /// says or implies.
    #[arg(long)]
    pub prediction_type: Option<String>,
    /// Hub revision (branch, tag or commit) of a hub model.
    #[arg(long)]
    pub revision: Option<String>,
    /// Weight variant, e.g. `fp16` for `diffusion_pytorch_model.fp16.safetensors`.
    #[arg(long)]
    pub variant: Option<String>,
    /// The text prompt.
    #[arg(long)]
    pub prompt: String,
    /// The negative prompt (the unconditional side of guidance; empty by default).
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    /// A LoRA file to apply, with an optional scale (`FILE` or `FILE:SCALE`, scale 1 by default);
    /// repeat to apply several.
    #[arg(long = "lora", value_name = "FILE[:SCALE]", value_parser = parse_lora)]
    pub loras: Vec<LoraSpec>,
    /// The sampler (model, pndm, ddim, euler, euler-ancestral, dpmpp-2m), configured from the
    /// model's scheduler config; `model` is the one that config's `_class_name` names.
    #[arg(long, default_value = "pndm", value_parser = parse_scheduler)]
    pub scheduler: SamplerChoice,
    /// Number of denoising steps.
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    /// Classifier-free guidance scale (guidance is off at 1 or below).
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
    /// Seed of the initial noise (and of the ancestral sampler's noise).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Image height in pixels, a multiple of 8 up to 8192, at most 4096 x 4096 pixels in all
    /// (default: the UNet's sample size times the VAE factor, or the size the `--latents` tensor
    /// implies).
    #[arg(long)]
    pub height: Option<usize>,
    /// Image width in pixels (default as for `--height`).
    #[arg(long)]
    pub width: Option<usize>,
    /// Number of images; with more than one, `OUT.png` becomes `OUT-0.png`, `OUT-1.png`, …
    #[arg(long, default_value_t = 1)]
    pub num_images: usize,
    /// Initial noise: a safetensors file holding one tensor `[1, 4, H/8, W/8]` (e.g. saved from
    /// diffusers) instead of seeded noise.
    #[arg(long)]
    pub latents: Option<PathBuf>,
    /// Output PNG path.
    #[arg(long)]
    pub out: PathBuf,
    /// Hide the progress bar.
    #[arg(long)]
    pub(crate) no_progress: bool,
    /// Where to run: `auto` (a CUDA GPU when this build has CUDA and one answers, else the CPU),
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    pub device: crate::config::types::Device,
}

/// `--scheduler`: `model`, or a sampler name as `SamplerKind` spells it (`pndm`, `ddim`, ...).
fn parse_scheduler(s: &str) -> Result<SamplerChoice, String> {
    use clap::ValueEnum;
    if s.eq_ignore_ascii_case("model") {
        return Ok(SamplerChoice::Model);
    }
    SamplerKind::from_str(s, true).map(SamplerChoice::Named).map_err(|_| {
        let names: Vec<String> =
            SamplerKind::value_variants().iter().filter_map(|v| v.to_possible_value()).map(|p| p.get_name().to_string()).collect();
        format!("`{s}` is not a scheduler: use model, {}", names.join(", "))
    })
}

fn parse_device(s: &str) -> Result<crate::config::types::Device, String> {
    crate::config::types::Device::parse(s).ok_or_else(|| format!("`{s}` is not a device: use auto, cpu, cuda or cuda:N"))
}

/// One `--lora FILE[:SCALE]`.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    pub path: PathBuf,
    pub scale: f64,
}

/// Parse `FILE` or `FILE:SCALE`. The part after the last `:` is the scale when it is a number;
/// otherwise the whole value is a path when it names an existing file or the part after the `:`
/// holds a path separator (`C:/x/a.safetensors`), and a bad scale (`a.safetensors:abc`) is refused
/// as such.
pub fn parse_lora(s: &str) -> Result<LoraSpec, String> {
    if s.is_empty() {
        return Err("empty --lora value".into());
    }
    if let Some((path, scale)) = s.rsplit_once(':') {
        if let Ok(value) = scale.parse::<f64>() {
            if !value.is_finite() {
                return Err(format!("--lora {s}: scale {value} is not a finite number"));
            }
            if path.is_empty() {
                return Err(format!("--lora {s}: missing file before the scale"));
            }
            return Ok(LoraSpec { path: PathBuf::from(path), scale: value });
        }
        let whole_is_file = Path::new(s).is_file();
        if !whole_is_file && !scale.contains(['/', '\\']) {
            return Err(format!("bad scale `{scale}`: give FILE or FILE:SCALE with a number, e.g. {path}:0.8"));
        }
    }
    Ok(LoraSpec { path: PathBuf::from(s), scale: 1.0 })
}

/// The largest image side `--height` / `--width` take, in pixels.
pub(crate) const MAX_SIDE: usize = 8192;
/// The most pixels an image may have (`--height` x `--width`): 4096 x 4096.
pub(crate) const MAX_PIXELS: usize = 4096 * 4096;
/// The image sides must be multiples of this (the VAE factor of every Stable Diffusion model;
/// the loaded model's own factor is checked again after loading).
const SIDE_MULTIPLE: usize = 8;

/// The path of image `index` of `count`.
pub(crate) fn output_path(out: &Path, index: usize, count: usize) -> PathBuf {
    if count <= 1 {
        return out.to_path_buf();
    }
    let stem = out.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "image".into());
    let ext = out.extension().map(|e| e.to_string_lossy().into_owned()).unwrap_or_else(|| "png".into());
    out.with_file_name(format!("{stem}-{index}.{ext}"))
}

/// Checks on the arguments alone (before loading anything): messages name the flag.
fn check_args(args: &Args) -> Result<(), String> {
    if args.steps == 0 {
        return Err("--steps must be at least 1".into());
    }
    if !args.guidance.is_finite() || args.guidance < 0.0 {
        return Err(format!("--guidance {} must be a finite number >= 0", args.guidance));
    }
    if args.num_images == 0 {
        return Err("--num-images must be at least 1".into());
    }
    match args.out.extension().and_then(|e| e.to_str()) {
        Some(e) if e.eq_ignore_ascii_case("png") => {}
        _ => return Err(format!("--out {}: the output must be a .png file", args.out.display())),
    }
    for (flag, v) in [("--height", args.height), ("--width", args.width)] {
        match v {
            Some(0) => return Err(format!("{flag} must be positive")),
            Some(v) if v > MAX_SIDE => return Err(format!("{flag} {v}: at most {MAX_SIDE} pixels")),
            Some(v) if v % SIDE_MULTIPLE != 0 => {
                let (lo, hi) = (v / SIDE_MULTIPLE * SIDE_MULTIPLE, v.div_ceil(SIDE_MULTIPLE) * SIDE_MULTIPLE);
                let near = if lo == 0 { hi.to_string() } else { format!("{lo} or {hi}") };
                return Err(format!("{flag} {v}: must be a multiple of {SIDE_MULTIPLE} (the VAE's factor), e.g. {near}"));
            }
            _ => {}
        }
    }
    if let (Some(h), Some(w)) = (args.height, args.width) {
        if h * w > MAX_PIXELS {
            return Err(format!("--height {h} --width {w}: {} pixels, at most {MAX_PIXELS} (e.g. 4096 x 4096)", h * w));
        }
    }
    for lora in &args.loras {
        if !lora.path.is_file() {
            return Err(format!("--lora {}: no such file", lora.path.display()));
        }
    }
    if let Some(l) = &args.latents {
        if !l.is_file() {
            return Err(format!("--latents {}: no such file", l.display()));
        }
    }
    Ok(())
}

/// Read every `--lora` file before the model loads, refusing a damaged one or one with NaN or
/// infinite weights (the message names the file and the tensors).
fn read_loras(loras: &[LoraSpec]) -> Result<Vec<LoraWeights>, String> {
    loras
        .iter()
        .map(|l| read_lora_file_for_use(&l.path).map_err(|e| format!("--lora {}: {e:#}", l.path.display())))
        .collect()
}

/// Apply each `--lora` to the loaded model (UNet and text encoder keys alike); a LoRA that does
/// not fit the model is refused naming the modules.
fn apply_loras(sd: &mut StableDiffusion, loras: &[LoraSpec], weights: &[LoraWeights]) -> Result<(), String> {
    for (lora, w) in loras.iter().zip(weights) {
        tracing::info!("applying LoRA {} (scale {})", lora.path.display(), lora.scale);
        crate::adapters::lora::apply_lora_to_model(w, sd, lora.scale)
            .map_err(|e| format!("--lora {}: does not fit the model: {e:#}", lora.path.display()))?;
    }
    Ok(())
}

/// Print `message` as the error and return the exit code of invalid input.
fn invalid(message: &str) -> anyhow::Result<ExitCode> {
    eprintln!("error: {message}");
    Ok(ExitCode::from(super::EXIT_INVALID))
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if let Err(message) = check_args(&args) {
        return invalid(&message);
    }
    let lora_weights = match read_loras(&args.loras) {
        Ok(w) => w,
        Err(message) => return invalid(&message),
    };
    let device = match crate::device::select_as(args.device, "--device") {
        Ok(d) => d,
        // Only `cuda` on a build without CUDA fails here: the user's to change.
        Err(e) if !crate::device::CUDA_BUILT => return invalid(&format!("{e:#}")),
        Err(e) => return Err(e),
    };
    let opts = LoadOptions {
        revision: args.revision.clone(),
        variant: args.variant.clone(),
        vae: args.vae.clone(),
        config: args.model_config.clone(),
        prediction_type: args.prediction_type.as_deref().map(crate::models::single_file::recognition::prediction_flag).transpose().with_context(|| format!("loading model {}", args.model))?,
        ema: false,
        movable_encoders: false,
    };
    let mut sd = StableDiffusion::load(&args.model, &opts, &device, DType::F32)
        .with_context(|| format!("loading model {}", args.model))?;
    if let Err(message) = apply_loras(&mut sd, &args.loras, &lora_weights) {
        return invalid(&message);
    }

    let factor = pipeline::vae_scale_factor(&sd);
    for (flag, v) in [("--height", args.height), ("--width", args.width)] {
        if let Some(v) = v.filter(|v| v % factor != 0) {
            return invalid(&format!("{flag} {v}: must be a multiple of {factor}, this model's VAE factor"));
        }
    }
    let init_latents = match &args.latents {
        Some(path) => {
            let expected = match (args.height, args.width) {
                (Some(h), Some(w)) => Some(pipeline::latent_shape(h, w, factor)?),
                _ => None,
            };
            match pipeline::load_latents(path, expected, &device) {
                Ok(l) => Some(l),
                Err(e) => return invalid(&format!("--latents {}: {e:#}", path.display())),
            }
        }
        None => None,
    };
    let (default_h, default_w) = match (&init_latents, args.height, args.width) {
        (Some(l), _, _) => (l.dims()[2] * factor, l.dims()[3] * factor),
        (None, Some(h), Some(w)) => (h, w),
        (None, _, _) => {
            let side = pipeline::default_image_side(&sd, factor)?;
            (side, side)
        }
    };
    let (height, width) = (args.height.unwrap_or(default_h), args.width.unwrap_or(default_w));
    if height > MAX_SIDE || width > MAX_SIDE || height.saturating_mul(width) > MAX_PIXELS {
        let from = if init_latents.is_some() { "with the size --latents implies" } else { "with the model's default size" };
        return invalid(&format!(
            "image size {height}x{width} ({from}) is too large: sides up to {MAX_SIDE} pixels and {MAX_PIXELS} pixels in all; give --height and --width"
        ));
    }
    let gen = GenerateOptions {
        prompt: args.prompt.clone(),
        negative_prompt: args.negative_prompt.clone(),
        sampler: args.scheduler.resolve(&sd)?,
        steps: args.steps,
        guidance_scale: args.guidance,
        height,
        width,
        seed: args.seed,
        progress: !args.no_progress && std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let images = pipeline::generate(&sd, &gen, args.num_images, init_latents.as_ref(), &device)?;
    for (i, image) in images.iter().enumerate() {
        let path = output_path(&args.out, i, images.len());
        pipeline::save_png(&pipeline::to_rgb8(image)?, &path)?;
        tracing::info!("wrote {}", path.display());
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_specs_parse_with_and_without_scale() {
        assert_eq!(parse_lora("a.safetensors").unwrap(), LoraSpec { path: "a.safetensors".into(), scale: 1.0 });
        assert_eq!(parse_lora("a.safetensors:0.5").unwrap(), LoraSpec { path: "a.safetensors".into(), scale: 0.5 });
        assert_eq!(parse_lora("C:/x/a.safetensors").unwrap().path, PathBuf::from("C:/x/a.safetensors"));
        assert!(parse_lora(":0.5").is_err());
        assert!(parse_lora("a:inf").is_err());
    }

    #[test]
    fn several_images_get_numbered_names() {
        assert_eq!(output_path(Path::new("o/x.png"), 0, 1), PathBuf::from("o/x.png"));
        assert_eq!(output_path(Path::new("o/x.png"), 2, 3), PathBuf::from("o/x-2.png"));
    }
}
