//! The Stable Diffusion stack on candle, loading diffusers-layout weights by name:
//! CLIP tokenizers and text encoders (one pair for SD 1.x/2.x, two for SDXL), the `Conditioning`
//! they produce, UNet2DConditionModel, AutoencoderKL.
//!
//! Layout: `loading` (model sources, variants, shards, HF cache/hub), `config` (the
//! `config.json` structs), `tokenizer`, `clip`, `unet/`, `vae`, `single_file` (LDM-layout checkpoints),
//! `weights` (the checking `VarBuilder` backend both loaders build networks from: missing, extra
//! and misshaped tensors by name; variants and shards).

pub mod clip;
pub mod conditioning;
pub mod config;
pub mod family;
pub mod loading;
pub(crate) mod offload;
pub mod single_file;
pub mod text;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weights;

pub use clip::ClipTextModel;
pub use conditioning::Conditioning;
pub use loading::{LoadOptions, StableDiffusion};
pub use text::{TextPair, TextSide};
pub use tokenizer::ClipTokenizer;
pub use unet::UNet2DConditionModel;
pub use vae::{AutoencoderKL, DiagonalGaussian};
