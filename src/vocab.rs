//! Words every layer shares (what a UNet predicts, where a diffusers folder keeps its configs):
//! a leaf that imports nothing of the crate, so `config` (the lowest floor) can name them
//! without reaching up into `models` or `schedulers`, and those name the same ones.

use serde::{Deserialize, Serialize};

/// What the UNet predicts, and so the training target: `prediction_type` in a scheduler config,
/// in `[model]` and `[train]`, in a single file's header, and in kohya's metadata. The default
/// is diffusers' (a scheduler config without the key).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The added noise ε (`"epsilon"`).
    #[default]
    Epsilon,
    /// The velocity `√ᾱ·ε − √(1−ᾱ)·x0` (`"v_prediction"`).
    VPrediction,
    /// The clean sample x0 (`"sample"`; samplers only, never a training target).
    Sample,
}

impl PredictionType {
    /// Parse the config string (`epsilon`, `v_prediction`, `sample`).
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        match s {
            "epsilon" => Ok(PredictionType::Epsilon),
            "v_prediction" => Ok(PredictionType::VPrediction),
            "sample" => Ok(PredictionType::Sample),
            other => anyhow::bail!(
                "scheduler config: `prediction_type` \"{other}\" is not one of epsilon, v_prediction, sample"
            ),
        }
    }

    /// The config string.
    pub fn as_str(self) -> &'static str {
        match self {
            PredictionType::Epsilon => "epsilon",
            PredictionType::VPrediction => "v_prediction",
            PredictionType::Sample => "sample",
        }
    }
}

impl std::str::FromStr for PredictionType {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        Self::parse(s)
    }
}

impl std::fmt::Display for PredictionType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The model family, decided once when a model is loaded (from `model_index.json` and the
/// configs, or from a single file's tensors) and carried by the loaded model: every place that
/// asks "which model is this" (kohya metadata, ModelSpec, `inspect`, the default resolution,
/// the text side's encode rule) reads it from there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// Stable Diffusion 1.x: CLIP ViT-L, context = its last hidden state (after the final layer norm).
    Sd1,
    /// Stable Diffusion 2.x: OpenCLIP ViT-H, the same rule as 1.x.
    Sd2,
    /// Stable Diffusion XL: CLIP ViT-L and OpenCLIP bigG with a projection; context = both
    /// penultimate hidden states side by side, plus the pooled embedding and size/crop time ids.
    Sdxl,
}

impl Family {
    /// For messages: `SD 1.x`, `SD 2.x`, `SDXL`.
    pub fn name(self) -> &'static str {
        match self {
            Family::Sd1 => "SD 1.x",
            Family::Sd2 => "SD 2.x",
            Family::Sdxl => "SDXL",
        }
    }

    /// The training resolution when a pipeline sets none: what the family was trained at
    /// (SD 2.x: 768 for v-prediction models such as 2.1, 512 for the epsilon base model).
    pub fn default_resolution(self, prediction: PredictionType) -> u32 {
        match (self, prediction) {
            (Family::Sd1, _) => 512,
            (Family::Sd2, PredictionType::VPrediction) => 768,
            (Family::Sd2, _) => 512,
            (Family::Sdxl, _) => 1024,
        }
    }

    /// How many (tokenizer, text encoder) pairs the family has.
    pub fn text_encoders(self) -> usize {
        match self {
            Family::Sdxl => 2,
            _ => 1,
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A diffusers Stable Diffusion folder: each network's config.
pub(crate) const UNET_CONFIG: &str = "unet/config.json";
pub(crate) const VAE_CONFIG: &str = "vae/config.json";
pub(crate) const TEXT_ENCODER_CONFIG: &str = "text_encoder/config.json";
/// SDXL's second text encoder and tokenizer.
pub(crate) const TEXT_ENCODER_2_CONFIG: &str = "text_encoder_2/config.json";
pub(crate) const TOKENIZER_2_DIR: &str = "tokenizer_2";
/// The scheduler's config.
pub(crate) const SCHEDULER_CONFIG: &str = "scheduler/scheduler_config.json";
/// The tokenizer's folder (`tokenizer.json`, or `vocab.json` + `merges.txt`).
pub(crate) const TOKENIZER_DIR: &str = "tokenizer";

/// Everything of a diffusers folder but the weights, in the order messages list it: what a
/// model folder must hold besides its weight files, and all that `[model] config` needs.
pub(crate) const DIFFUSERS_CONFIGS: [&str; 5] = [UNET_CONFIG, VAE_CONFIG, TEXT_ENCODER_CONFIG, SCHEDULER_CONFIG, TOKENIZER_DIR];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prediction_type_parses_and_names_bad_values() {
        assert_eq!(PredictionType::parse("v_prediction").unwrap(), PredictionType::VPrediction);
        let err = PredictionType::parse("flow").unwrap_err().to_string();
        assert!(err.contains("prediction_type") && err.contains("flow"), "{err}");
        for p in [PredictionType::Epsilon, PredictionType::VPrediction, PredictionType::Sample] {
            assert_eq!(serde_json::to_value(p).unwrap(), serde_json::json!(p.as_str()), "serde and as_str agree");
        }
    }
}
