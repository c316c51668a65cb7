//! Model sources: a local diffusers folder or a hub id resolved through the HF cache
//! (`HF_HOME` / `HF_HUB_CACHE`), weight variants, sharded weights, and the refusal of pickles.

use std::path::PathBuf;

use candle_core::{DType, Device};

use super::{AutoencoderKL, ClipTextModel, ClipTokenizer, UNet2DConditionModel};
use crate::schedulers::SchedulerConfig;

#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Hub revision (branch, tag or commit); `None` is `main`.
    pub revision: Option<String>,
    /// Weight variant, e.g. `fp16` → `diffusion_pytorch_model.fp16.safetensors`.
    pub variant: Option<String>,
}

/// A loaded pipeline: every component a trainer or sampler needs.
pub struct StableDiffusion {
    /// The local folder the weights were read from.
    pub root: PathBuf,
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextModel,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub scheduler: SchedulerConfig,
}

impl StableDiffusion {
    /// Load from a local diffusers folder or a hub id.
    pub fn load(_source: &str, _opts: &LoadOptions, _device: &Device, _dtype: DType) -> anyhow::Result<Self> {
        todo!("models::loading")
    }
}

/// Resolve a model source (local folder or hub id) to a local diffusers folder.
pub fn resolve_model_dir(_source: &str, _opts: &LoadOptions) -> anyhow::Result<PathBuf> {
    todo!("models::loading")
}

