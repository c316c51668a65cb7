//! Which family a model is, decided by one rule from its configs (the loaded model carries the
//! answer; a probe that must not load weights, such as the export stage's kohya header or the
//! default resolution, runs the same rule on the config files alone).

use std::path::Path;

use anyhow::{bail, Context};

use super::config::{ClipTextConfig, UNetConfig};
use crate::vocab::{self, Family};

/// The family of a model from its UNet and first text-encoder configs and whether it has a
/// second text encoder. SDXL: a second encoder and a `text_time` UNet (one without the other is
/// refused). SD 2.x: an OpenCLIP text encoder (`gelu`, where SD 1.x's CLIP ViT-L has
/// `quick_gelu`), or 1024 wide (the encoder's `hidden_size` or the UNet's cross-attention).
pub fn family_of(unet: &UNetConfig, text: &ClipTextConfig, has_second_encoder: bool) -> anyhow::Result<Family> {
    match (unet.addition.is_some(), has_second_encoder) {
        (true, true) => return Ok(Family::Sdxl),
        (true, false) => bail!("the UNet takes SDXL's pooled text embedding and time ids (`addition_embed_type` \"text_time\") but the model has no `text_encoder_2`"),
        (false, true) => bail!("the model has a `text_encoder_2` but its UNet has no `addition_embed_type` \"text_time\"; only SDXL-shaped two-encoder models are supported"),
        (false, false) => {}
    }
    let v2 = text.hidden_act == crate::nn::Activation::Gelu || text.hidden_size == 1024 || unet.cross_attention_dim.first() == Some(&1024);
    Ok(if v2 { Family::Sd2 } else { Family::Sd1 })
}

/// [`family_of`] for a diffusers folder, reading only its configs.
pub fn family_of_folder(dir: &Path) -> anyhow::Result<Family> {
    let unet = UNetConfig::from_json_file(dir.join(vocab::UNET_CONFIG))?;
    let text = ClipTextConfig::from_json_file(dir.join(vocab::TEXT_ENCODER_CONFIG))?;
    let second = dir.join(vocab::TEXT_ENCODER_2_CONFIG).is_file();
    family_of(&unet, &text, second).with_context(|| format!("model folder {}", dir.display()))
}
