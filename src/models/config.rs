//! `config.json` structs for each model (UNet, VAE, CLIP text encoder). Every field that changes
//! the network is honoured; a field we do not support is an error naming it.

/// diffusers `UNet2DConditionModel` config.
#[derive(Clone, Debug)]
pub struct UNetConfig {}

/// diffusers `AutoencoderKL` config.
#[derive(Clone, Debug)]
pub struct VaeConfig {}

/// transformers `CLIPTextConfig`.
#[derive(Clone, Debug)]
pub struct ClipTextConfig {}

impl UNetConfig {
    /// Parse a `unet/config.json`; unsupported settings are errors naming the field.
    pub fn from_json_str(_json: &str) -> anyhow::Result<Self> {
        todo!("models::config")
    }
}

impl VaeConfig {
    pub fn from_json_str(_json: &str) -> anyhow::Result<Self> {
        todo!("models::config")
    }
}

impl ClipTextConfig {
    pub fn from_json_str(_json: &str) -> anyhow::Result<Self> {
        todo!("models::config")
    }
}
