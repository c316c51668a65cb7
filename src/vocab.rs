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

/// A diffusers Stable Diffusion folder: each network's config.
pub(crate) const UNET_CONFIG: &str = "unet/config.json";
pub(crate) const VAE_CONFIG: &str = "vae/config.json";
pub(crate) const TEXT_ENCODER_CONFIG: &str = "text_encoder/config.json";
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
