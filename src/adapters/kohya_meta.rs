//! What a kohya file's header says about its training, its base model and its data, as kohya's
//! sd-scripts writes it: the training settings (`ss_*`, [`TrainingInfo`]) with our resolved
//! pipeline TOML, the model generation and prediction type read from the model's own configs
//! (`ss_v2`, `ss_v_parameterization`, `ss_base_model_version`), the SAI ModelSpec keys
//! (`modelspec.*`) and the tag counts per dataset folder (`ss_tag_frequency`).
//!
//! Names follow sd-scripts: `library/model_util.py` `get_model_version_str_for_sd1_sd2`
//! (`sd_v1`, `sd_v1_v`, `sd_v2`, `sd_v2_v`), `library/sai_model_spec.py` (architecture
//! `stable-diffusion-v1`, `stable-diffusion-v2-512`, `stable-diffusion-v2-768-v`, then `/lora`;
//! implementation `diffusers` for an SD 1.x/2.x LoRA; resolution `WxH`; prediction type
//! `epsilon` or `v`; spec version 1.0.1) and `library/train_util.py` `set_tag_frequency`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use serde_json::Value;

use crate::vocab::{Family, PredictionType};

/// Our header key holding the resolved pipeline TOML a LoRA was trained with.
pub const PIPELINE_TOML_KEY: &str = "lora_pipeline_toml";
/// Our header key holding the sha256 (hex) of [`PIPELINE_TOML_KEY`]'s value.
pub const PIPELINE_SHA256_KEY: &str = "lora_pipeline_sha256";

/// What a training run knows about itself, for the kohya header (`ss_*` keys A1111 shows) and
/// our own keys.
#[derive(Clone, Debug, Default)]
pub struct TrainingInfo {
    /// e.g. `sd_v1`, `sd_v2`, `sdxl_base_v1-0`.
    pub base_model_version: String,
    /// The model source (`ss_sd_model_name`).
    pub model_name: String,
    pub rank: usize,
    pub alpha: f64,
    pub learning_rate: f64,
    pub max_train_steps: u64,
    pub epochs: u64,
    pub batch_size: usize,
    pub resolution: usize,
    pub seed: Option<u64>,
    pub num_train_images: usize,
    /// What the trained UNet predicts (`ss_v_parameterization`).
    pub prediction: PredictionType,
    pub train_text_encoder: bool,
    /// `dataset.caption_dropout`, `shuffle_tags`, `keep_tokens` (kohya's `ss_caption_dropout_rate`,
    /// `ss_shuffle_caption`, `ss_keep_tokens`).
    pub caption_dropout: f64,
    pub shuffle_tags: bool,
    pub keep_tokens: usize,
    /// kohya's `ss_optimizer`: the optimizer class and its arguments, e.g.
    /// `torch.optim.adamw.AdamW(weight_decay=0.01,betas=(0.9, 0.999),eps=1e-08)`.
    pub optimizer: String,
    /// Aspect-ratio buckets, when on: kohya's `ss_enable_bucket`, `ss_min_bucket_reso`,
    /// `ss_max_bucket_reso`, `ss_bucket_no_upscale` and `ss_bucket_info` (the layout as JSON).
    pub buckets: Option<BucketMeta>,
    /// LoCon's conv rank and alpha (kohya's `conv_dim` / `conv_alpha` in `ss_network_args`).
    pub conv: Option<(usize, f64)>,
    /// DoRA (`"dora_wd": "True"` in `ss_network_args`, LyCORIS's name for it).
    pub dora: bool,
    /// The resolved pipeline as TOML; stored with its sha256.
    pub pipeline_toml: String,
}

/// The bucket keys of a kohya header.
#[derive(Clone, Debug, Default)]
pub struct BucketMeta {
    pub min_reso: u32,
    pub max_reso: u32,
    pub no_upscale: bool,
    /// `{"buckets": {"0": {"resolution": [w, h], "count": n}}, "mean_img_ar_error": e}`.
    pub info: serde_json::Value,
}

/// Header metadata for a kohya file written after training: the `ss_*` keys A1111 reads, and
/// the resolved pipeline TOML and its sha256 under [`PIPELINE_TOML_KEY`] / [`PIPELINE_SHA256_KEY`].
pub fn training_metadata(info: &TrainingInfo) -> BTreeMap<String, String> {
    use sha2::Digest;
    let mut m = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        m.insert(k.to_string(), v);
    };
    put("ss_network_module", "networks.lora".into());
    put("ss_network_dim", info.rank.to_string());
    put("ss_network_alpha", fmt_number(info.alpha));
    let mut args = serde_json::Map::new();
    if let Some((r, a)) = info.conv {
        args.insert("conv_dim".into(), r.to_string().into());
        args.insert("conv_alpha".into(), fmt_number(a).into());
    }
    if info.dora {
        args.insert("dora_wd".into(), "True".into());
    }
    if !args.is_empty() {
        put("ss_network_args", Value::Object(args).to_string());
    }
    put("ss_base_model_version", info.base_model_version.clone());
    put("ss_sd_model_name", info.model_name.clone());
    put("ss_learning_rate", info.learning_rate.to_string());
    put("ss_unet_lr", info.learning_rate.to_string());
    put("ss_max_train_steps", info.max_train_steps.to_string());
    put("ss_num_epochs", info.epochs.to_string());
    put("ss_batch_size_per_device", info.batch_size.to_string());
    put("ss_resolution", format!("({}, {})", info.resolution, info.resolution));
    put("ss_num_train_images", info.num_train_images.to_string());
    put("ss_v2", (info.base_model_version.starts_with("sd_v2")).to_string());
    put("ss_v_parameterization", (info.prediction == PredictionType::VPrediction).to_string());
    put("ss_network_train_unet_only", (!info.train_text_encoder).to_string());
    if let Some(seed) = info.seed {
        put("ss_seed", seed.to_string());
    }
    put("ss_caption_dropout_rate", info.caption_dropout.to_string());
    put("ss_shuffle_caption", info.shuffle_tags.to_string());
    put("ss_keep_tokens", info.keep_tokens.to_string());
    if !info.optimizer.is_empty() {
        put("ss_optimizer", info.optimizer.clone());
    }
    if let Some(b) = &info.buckets {
        put("ss_enable_bucket", "true".into());
        put("ss_min_bucket_reso", b.min_reso.to_string());
        put("ss_max_bucket_reso", b.max_reso.to_string());
        put("ss_bucket_no_upscale", b.no_upscale.to_string());
        put("ss_bucket_info", b.info.to_string());
    }
    put("ss_training_comment", format!("trained with lora {}", env!("CARGO_PKG_VERSION")));
    let digest = sha2::Sha256::digest(info.pipeline_toml.as_bytes());
    put(PIPELINE_SHA256_KEY, digest.iter().map(|b| format!("{b:02x}")).collect());
    put(PIPELINE_TOML_KEY, info.pipeline_toml.clone());
    m
}

fn fmt_number(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        x.to_string()
    }
}

/// The base model as the kohya header describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ModelFacts {
    /// SD 1.x, 2.x or XL.
    pub family: Family,
    /// What the UNet predicts (kohya knows the noise and the velocity).
    pub prediction: PredictionType,
}

impl ModelFacts {
    /// Trained to predict the velocity rather than the noise.
    pub fn v_prediction(self) -> bool {
        self.prediction == PredictionType::VPrediction
    }

    /// kohya's `ss_base_model_version`.
    pub fn base_model_version(self) -> &'static str {
        match (self.family, self.v_prediction()) {
            (Family::Sd1, false) => "sd_v1",
            (Family::Sd1, true) => "sd_v1_v",
            (Family::Sd2, false) => "sd_v2",
            (Family::Sd2, true) => "sd_v2_v",
            (Family::Sdxl, _) => "sdxl_base_v1-0",
        }
    }


    /// `modelspec.architecture` of a LoRA for this model.
    pub fn architecture(self) -> &'static str {
        match (self.family, self.v_prediction()) {
            (Family::Sd1, _) => "stable-diffusion-v1/lora",
            (Family::Sd2, false) => "stable-diffusion-v2-512/lora",
            (Family::Sd2, true) => "stable-diffusion-v2-768-v/lora",
            (Family::Sdxl, _) => "stable-diffusion-xl-v1-base/lora",
        }
    }
}

fn read_json(path: &Path) -> Result<Value> {
    serde_json::from_str(&crate::util::fs::read_text(path)?).with_context(|| format!("{} is not valid JSON", path.display()))
}

/// The facts of a diffusers folder: the family by the one rule (`models::family`), and
/// `v_prediction` from the scheduler's `prediction_type`.
pub(crate) fn facts_from_folder(dir: &Path) -> Result<ModelFacts> {
    let family = crate::models::family::family_of_folder(dir)?;
    let scheduler_path = dir.join(crate::vocab::SCHEDULER_CONFIG);
    let scheduler = if scheduler_path.is_file() { read_json(&scheduler_path)? } else { Value::Null };
    // Anything but `v_prediction` (absent, `sample`, unknown) counts as noise, as kohya reads it.
    let v_prediction = scheduler.get("prediction_type").and_then(Value::as_str).and_then(|s| s.parse().ok()) == Some(PredictionType::VPrediction);
    let prediction = if v_prediction { PredictionType::VPrediction } else { PredictionType::Epsilon };
    Ok(ModelFacts { family, prediction })
}

/// What the ModelSpec keys say beyond the model facts.
#[derive(Clone, Debug, Default)]
pub(crate) struct SpecInfo {
    /// `modelspec.title` (kohya: the output name).
    pub title: String,
    /// Training resolution (square).
    pub resolution: usize,
    /// Seconds since the Unix epoch the adapter was made (`modelspec.date`).
    pub(crate) timestamp: u64,
}

/// The `modelspec.*` keys kohya's `sai_model_spec.build_metadata` writes for an SD 1.x/2.x LoRA.
pub(crate) fn modelspec_metadata(facts: ModelFacts, info: &SpecInfo) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        m.insert(format!("modelspec.{k}"), v);
    };
    put("sai_model_spec", "1.0.1".into());
    put("architecture", facts.architecture().into());
    put("implementation", "diffusers".into());
    put("implementation_version", format!("lora/{}", env!("CARGO_PKG_VERSION")));
    put("title", info.title.clone());
    put("resolution", format!("{0}x{0}", info.resolution));
    put("prediction_type", if facts.v_prediction() { "v" } else { "epsilon" }.into());
    put("date", iso8601_utc(info.timestamp));
    m
}

/// `YYYY-MM-DDTHH:MM:SS` (UTC) of a Unix time, as Python's `datetime.isoformat()` writes a
/// naive time (kohya writes local time; a run's output should not depend on the time zone).
pub(crate) fn iso8601_utc(secs: u64) -> String {
    let (y, m, d, hh, mm, ss) = crate::util::time::utc_civil(secs);
    format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}")
}

/// kohya's `ss_tag_frequency`: `{folder: {tag: count}}`, where the tags of a caption are its
/// comma-separated parts, trimmed and lower-cased, empty parts skipped.
pub(crate) fn tag_frequency<'a>(folder: &str, captions: impl IntoIterator<Item = &'a str>) -> Value {
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for caption in captions {
        for tag in caption.split(',') {
            let tag = tag.trim();
            if !tag.is_empty() {
                *counts.entry(tag.to_lowercase()).or_default() += 1;
            }
        }
    }
    serde_json::json!({ folder: counts })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kohya_names() {
        // The four strings of sd-scripts' get_model_version_str_for_sd1_sd2 and
        // sai_model_spec.determine_architecture.
        let f = |v2, v: bool| ModelFacts { family: if v2 { Family::Sd2 } else { Family::Sd1 }, prediction: if v { PredictionType::VPrediction } else { PredictionType::Epsilon } };
        assert_eq!([f(false, false), f(false, true), f(true, false), f(true, true)].map(ModelFacts::base_model_version), ["sd_v1", "sd_v1_v", "sd_v2", "sd_v2_v"]);
        assert_eq!(f(true, true).architecture(), "stable-diffusion-v2-768-v/lora");
        assert_eq!(f(true, false).architecture(), "stable-diffusion-v2-512/lora");
        assert_eq!(f(false, true).architecture(), "stable-diffusion-v1/lora");
        let xl = ModelFacts { family: Family::Sdxl, prediction: PredictionType::Epsilon };
        assert_eq!((xl.base_model_version(), xl.architecture()), ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora"));
    }

    #[test]
    fn dates_are_iso8601() {
        // Values from Python: datetime.datetime.utcfromtimestamp(t).isoformat().
        assert_eq!(iso8601_utc(0), "1970-01-01T00:00:00");
        assert_eq!(iso8601_utc(951_782_400), "2000-02-29T00:00:00");
        assert_eq!(iso8601_utc(1_796_132_865), "2026-12-01T13:47:45");
    }

    #[test]
    fn tags_are_counted_as_kohya_counts_them() {
        let v = tag_frequency("imgs", ["A cat, red ,, Blue", "a cat", " "]);
        assert_eq!(v, serde_json::json!({"imgs": {"a cat": 2, "red": 1, "blue": 1}}));
    }
}
