//! The pipeline file's tables as Rust types: serde reads them, schemars turns them into the JSON
//! Schema (doc comments become descriptions), so the two can never disagree.
//!
//! Defaults are the reference script's (`train_text_to_image_lora.py`) unless `docs/pipeline.md`
//! says why not. The `x-reference` extension on a key names the reference flag it stands for.

use std::collections::BTreeMap;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::vocab::PredictionType;

/// A whole pipeline file: one table per stage, in the order the stages run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[schemars(title = "lora pipeline")]
pub struct Pipeline {
    /// Another pipeline file this one is layered on, relative to this file. Its keys apply first;
    /// this file's keys override them, table by table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extends: Option<String>,
    /// The base Stable Diffusion model the LoRA is trained on.
    pub model: ModelConfig,
    /// Where the training images and captions come from.
    pub dataset: DatasetConfig,
    /// How images are resized, cropped and flipped before encoding.
    #[serde(default)]
    pub preprocess: PreprocessConfig,
    /// The LoRA adapter: rank, alpha, initialisation and the layers it wraps.
    #[serde(default)]
    pub adapter: AdapterConfig,
    /// AdamW hyperparameters and gradient clipping.
    #[serde(default)]
    pub optimizer: OptimizerConfig,
    /// The training loop: steps, batch, learning-rate schedule, precision, seed and loss options.
    #[serde(default)]
    pub train: TrainConfig,
    /// Periodic saves of the training state, and resuming from them.
    #[serde(default)]
    pub checkpoints: CheckpointsConfig,
    /// Sample images with the adapter in place while training.
    #[serde(default)]
    pub validation: ValidationConfig,
    /// Where the adapter is written and in which formats.
    #[serde(default)]
    pub output: OutputConfig,
    /// Metrics and trackers.
    #[serde(default)]
    pub logging: LoggingConfig,
    /// Several processes training together, as a launcher (torchrun, srun) starts them.
    #[serde(default)]
    pub distributed: DistributedConfig,
}

/// `[distributed]`: how the ranks a launcher started (torchrun's `RANK` / `WORLD_SIZE` /
/// `MASTER_ADDR` / `MASTER_PORT`, SLURM's `SLURM_PROCID` / `SLURM_NTASKS` / `SLURM_NODELIST`)
/// talk. Without a launcher (or with a world of one) nothing here applies. See
/// `docs/distributed.md`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct DistributedConfig {
    /// The port rank 0 listens on for the other ranks. Unset: `LORA_DIST_PORT`, else the
    /// launcher's `MASTER_PORT` + 1 (torchrun's own store holds `MASTER_PORT`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: Option<u16>,
    /// Seconds a collective waits for a rank before the job ends naming it (NCCL's
    /// `NCCL_TIMEOUT`): a rank that died or hangs stops every other rank within this time.
    #[schemars(range(min = 1))]
    pub timeout_s: u64,
    /// Our own launcher: `lora run` starts this many CPU ranks of itself on this machine (as
    /// `--ranks N` does), with torchrun's variables. Ignored under a launcher.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub ranks: Option<u32>,
    /// One rank per GPU of this machine (`--gpus N`). Not available yet: GPU ranks need NCCL,
    /// which this build does not have (validation refuses the key, saying so).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub gpus: Option<u32>,
}

impl Default for DistributedConfig {
    fn default() -> Self {
        Self { port: None, timeout_s: 300, ranks: None, gpus: None }
    }
}

/// `[model]`: the base model, from the Hugging Face hub, a local diffusers folder or a
/// single-file checkpoint.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// Hub id of the model, e.g. "stable-diffusion-v1-5/stable-diffusion-v1-5". Give one of
    /// `id`, `path` and `file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-reference" = "--pretrained_model_name_or_path"))]
    pub id: Option<String>,
    /// Local diffusers model folder (with `model_index.json`), relative to the pipeline file.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-reference" = "--pretrained_model_name_or_path"))]
    pub path: Option<PathBuf>,
    /// Hub revision (branch, tag or commit) of the model.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-reference" = "--revision"))]
    pub revision: Option<String>,
    /// Weight variant, e.g. "fp16" reads `diffusion_pytorch_model.fp16.safetensors`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-reference" = "--variant"))]
    pub variant: Option<String>,
    /// Hugging Face cache folder for downloaded models and datasets (default: the HF cache).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-reference" = "--cache_dir"))]
    pub cache_dir: Option<PathBuf>,
    /// A single-file checkpoint (A1111 / ComfyUI / civitai `.safetensors` in the original LDM
    /// layout), relative to the pipeline file, or a hub file "org/repo/file.safetensors". SD 1.x
    /// or 2.x and the network configs are recognised from the tensors. Give `id`, `path` or
    /// `file`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// A VAE used instead of the model's: a `.safetensors` file (diffusers layout, or an LDM VAE
    /// with or without the `first_stage_model.` prefix; the model's scaling factor), a diffusers
    /// VAE folder, or a hub id such as "madebyollin/sdxl-vae-fp16-fix" (folder and hub VAEs bring
    /// their own config, scaling factor and `force_upcast`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-reference" = "--pretrained_vae_model_name_or_path"))]
    pub vae: Option<PathBuf>,
    /// With `file`: a diffusers folder (or one holding just the `unet/`, `vae/`, `text_encoder/`
    /// configs, `tokenizer/` and `scheduler/`) whose configs replace the recognised ones, as
    /// diffusers' `from_single_file(config=...)`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<PathBuf>,
    /// With `file`: the model's prediction type, overriding the file's `prediction_type`
    /// metadata or `v_pred` key and the SD 1.x (epsilon) / SD 2.x (v_prediction) default.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<ModelPrediction>")]
    pub prediction_type: Option<PredictionType>,
    /// With `file`: train on the UNet's EMA copy (`model_ema.*`) instead of the plain weights.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub ema: bool,
}

// The two prediction-type keys take one type, `vocab::PredictionType`; these enums only write
// the values each key accepts (not `sample`) and what they mean there into the schema, which
// rejects any other value before the types are built.

/// What a model's UNet predicts.
#[derive(JsonSchema)]
#[schemars(rename_all = "snake_case")]
#[allow(dead_code)]
enum ModelPrediction {
    /// The added noise (SD 1.x, SD 2.x base).
    Epsilon,
    /// The velocity (SD 2.x 768-v).
    VPrediction,
}

/// The layout a dataset is read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DatasetKind {
    /// A Hugging Face hub dataset id (`name`), read through the HF cache.
    Hub,
    /// A parquet file or a folder of parquet shards in the Hugging Face datasets layout (`path`).
    Parquet,
    /// An image folder with `metadata.jsonl` or `metadata.csv` (`file_name` + caption column), as
    /// `--train_data_dir`.
    Imagefolder,
    /// An image folder with a `.txt` or `.caption` file next to each image (kohya's layout).
    Sidecar,
}

/// What to do with an image that cannot be decoded or is too large.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnBadImage {
    /// Stop before training starts, naming the file and the reason.
    #[default]
    Error,
    /// Log the file, leave it out and count it in the summary.
    Skip,
}

/// `[dataset]`: the training images and captions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DatasetConfig {
    /// The dataset layout: "hub" needs `name`; "parquet", "imagefolder" and "sidecar" need `path`.
    pub kind: DatasetKind,
    /// Hub dataset id, e.g. "lambdalabs/naruto-blip-captions" (kind = "hub").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-reference" = "--dataset_name"))]
    pub name: Option<String>,
    /// Hub dataset configuration name. Not supported yet (validation refuses it): the hub source reads the default configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-reference" = "--dataset_config_name"))]
    pub(crate) config_name: Option<String>,
    /// Local dataset file or folder, relative to the pipeline file (kind = "parquet",
    /// "imagefolder" or "sidecar").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-reference" = "--train_data_dir"))]
    pub path: Option<PathBuf>,
    /// Column that holds the images.
    #[serde(default = "default_image_column")]
    #[schemars(extend("x-reference" = "--image_column"))]
    pub image_column: String,
    /// Column that holds the captions (a string, or a list: one is drawn per step).
    #[serde(default = "default_caption_column")]
    #[schemars(extend("x-reference" = "--caption_column"))]
    pub caption_column: String,
    /// Train on a seeded random subset of this many samples.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1), extend("x-reference" = "--max_train_samples"))]
    pub max_samples: Option<u64>,
    /// What to do with an image that cannot be decoded or is larger than `max_image_pixels`.
    #[serde(default)]
    pub(crate) on_bad_image: OnBadImage,
    /// Largest image accepted, in pixels (width x height); PIL's decompression-bomb limit.
    #[serde(default = "default_max_image_pixels")]
    #[schemars(range(min = 1))]
    pub max_image_pixels: u64,
    /// Probability of training a step's example on an empty caption instead of its own, as
    /// kohya's `--caption_dropout_rate` (0: never, the reference's behaviour).
    #[serde(default)]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub caption_dropout: f64,
    /// Shuffle a caption's comma-separated tags every time it is drawn and join them with ", ",
    /// as kohya's `--shuffle_caption`.
    #[serde(default)]
    pub shuffle_tags: bool,
    /// With `shuffle_tags`: the number of tags at the front kept in place (a trigger word), as
    /// kohya's `--keep_tokens`.
    #[serde(default)]
    pub keep_tokens: u32,
    /// How many times each image of this source is seen per epoch (kohya's `num_repeats`, the
    /// `10_name` folder prefix).
    #[serde(default = "default_repeats")]
    #[schemars(range(min = 1))]
    pub repeats: u32,
    /// Put before every caption of this source with a space (kohya's `caption_prefix`): a
    /// trigger word, e.g. "sks".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption_prefix: Option<String>,
    /// More sources trained together with this table's own, each with its own layout, columns,
    /// repeats and caption prefix (kohya's `[[datasets.subsets]]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<ExtraSource>,
}

fn default_repeats() -> u32 {
    1
}

/// `[[dataset.sources]]`: another dataset source, read as `[dataset]`'s own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExtraSource {
    /// The layout: "hub" needs `name`; "parquet", "imagefolder" and "sidecar" need `path`.
    pub kind: DatasetKind,
    /// Hub dataset id (kind = "hub").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Local dataset file or folder, relative to the pipeline file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Column that holds the images.
    #[serde(default = "default_image_column")]
    pub image_column: String,
    /// Column that holds the captions.
    #[serde(default = "default_caption_column")]
    pub caption_column: String,
    /// Times each image is seen per epoch (kohya's `num_repeats`).
    #[serde(default = "default_repeats")]
    #[schemars(range(min = 1))]
    pub repeats: u32,
    /// Put before every caption of this source with a space (kohya's `caption_prefix`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caption_prefix: Option<String>,
}

impl DatasetConfig {
    /// Every source: `[dataset]`'s own first, then `[[dataset.sources]]`, as (key prefix, source).
    pub fn all_sources(&self) -> Vec<(String, ExtraSource)> {
        let own = ExtraSource {
            kind: self.kind,
            name: self.name.clone(),
            path: self.path.clone(),
            image_column: self.image_column.clone(),
            caption_column: self.caption_column.clone(),
            repeats: self.repeats,
            caption_prefix: self.caption_prefix.clone(),
        };
        std::iter::once(("dataset".to_string(), own)).chain(self.sources.iter().enumerate().map(|(i, s)| (format!("dataset.sources[{i}]"), s.clone()))).collect()
    }
}

fn default_image_column() -> String {
    "image".into()
}
fn default_caption_column() -> String {
    "text".into()
}
fn default_max_image_pixels() -> u64 {
    // PIL raises DecompressionBombError above twice MAX_IMAGE_PIXELS (89_478_485).
    2 * 89_478_485
}

/// Resampling filter for the resize, as torchvision's `InterpolationMode` (PIL filters).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Interpolation {
    Nearest,
    NearestExact,
    Bilinear,
    Bicubic,
    Box,
    Hamming,
    #[default]
    Lanczos,
}

/// How the resized image is cut to a square.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Crop {
    /// The middle square.
    Center,
    /// A uniformly random square, drawn anew every epoch.
    Random,
}

/// `[preprocess]`: resize, crop, flip, normalise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct PreprocessConfig {
    /// Size the shorter side is resized to and the square crop size, in pixels (at most 8192:
    /// SD is trained at 512 to 1024, and larger sizes would not fit in memory). Unset: the model
    /// family's own, 512 for SD 1.x and SD 2.x base (epsilon), 768 for SD 2.x v-prediction
    /// models (2.1), 1024 for SDXL, as the reference scripts default.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 8, max = 8192), extend("multipleOf" = 8, "x-reference" = "--resolution"))]
    pub resolution: Option<u32>,
    /// Crop the middle square.
    #[schemars(extend("x-reference" = "--center_crop"))]
    pub center_crop: bool,
    /// Crop a random square (the reference's behaviour when `center_crop` is false). Defaults to
    /// the opposite of `center_crop`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) random_crop: Option<bool>,
    /// Flip images horizontally with probability 0.5.
    #[schemars(extend("x-reference" = "--random_flip"))]
    pub random_flip: bool,
    /// Resampling filter used by the resize.
    #[schemars(extend("x-reference" = "--image_interpolation_mode"))]
    pub interpolation: Interpolation,
    /// Aspect-ratio buckets, as kohya's `--enable_bucket`: images keep their aspect ratio; each
    /// goes to the bucket (a size of at most `resolution`² pixels, sides in steps of
    /// `bucket_reso_steps` between `min_bucket_reso` and `max_bucket_reso`) nearest its aspect
    /// ratio, is resized to cover it and cropped to it (center or random, as set above), and every
    /// batch is from one bucket. Off (the reference): every image is cropped square.
    pub buckets: bool,
    /// Smallest bucket side in pixels (kohya's `--min_bucket_reso`, default 256); with `buckets`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 8))]
    pub min_bucket_reso: Option<u32>,
    /// Largest bucket side in pixels (kohya's `--max_bucket_reso`, default 1024); with `buckets`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 8))]
    pub max_bucket_reso: Option<u32>,
    /// Step of bucket sides in pixels, a multiple of 8 (kohya's `--bucket_reso_steps`, default
    /// 64); with `buckets`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 8), extend("multipleOf" = 8))]
    pub bucket_reso_steps: Option<u32>,
    /// Never enlarge an image: its bucket is its own size (shrunk to `resolution`² pixels when
    /// larger) rounded down to `bucket_reso_steps` (kohya's `--bucket_no_upscale`); with `buckets`.
    pub bucket_no_upscale: bool,
}

/// kohya's `--min_bucket_reso` default.
pub const DEFAULT_MIN_BUCKET_RESO: u32 = 256;
/// kohya's `--max_bucket_reso` default.
pub const DEFAULT_MAX_BUCKET_RESO: u32 = 1024;
/// kohya's `--bucket_reso_steps` default.
pub const DEFAULT_BUCKET_RESO_STEPS: u32 = 64;

impl Default for PreprocessConfig {
    fn default() -> Self {
        Self {
            resolution: None,
            center_crop: false,
            random_crop: None,
            random_flip: false,
            interpolation: Interpolation::Lanczos,
            buckets: false,
            min_bucket_reso: None,
            max_bucket_reso: None,
            bucket_reso_steps: None,
            bucket_no_upscale: false,
        }
    }
}

impl PreprocessConfig {
    /// (min, max, step) of the buckets, kohya's defaults where unset.
    pub fn bucket_bounds(&self) -> (u32, u32, u32) {
        (
            self.min_bucket_reso.unwrap_or(DEFAULT_MIN_BUCKET_RESO),
            self.max_bucket_reso.unwrap_or(DEFAULT_MAX_BUCKET_RESO),
            self.bucket_reso_steps.unwrap_or(DEFAULT_BUCKET_RESO_STEPS),
        )
    }

    /// Why the buckets' bounds cannot hold `resolution`, naming the key (kohya asserts the same).
    pub fn bucket_bounds_error(&self, resolution: u32) -> Option<(&'static str, String)> {
        let (min, max, step) = self.bucket_bounds();
        if min % step != 0 {
            Some(("preprocess.min_bucket_reso", format!("`preprocess.min_bucket_reso` = {min} is not a multiple of `bucket_reso_steps` = {step} (e.g. {})", min / step * step)))
        } else if max % step != 0 {
            Some(("preprocess.max_bucket_reso", format!("`preprocess.max_bucket_reso` = {max} is not a multiple of `bucket_reso_steps` = {step} (e.g. {})", max.div_ceil(step) * step)))
        } else if min > resolution {
            Some(("preprocess.min_bucket_reso", format!("`preprocess.min_bucket_reso` = {min} is larger than the resolution {resolution}: no bucket would hold a square image")))
        } else if max < resolution {
            Some(("preprocess.max_bucket_reso", format!("`preprocess.max_bucket_reso` = {max} is smaller than the resolution {resolution}")))
        } else {
            None
        }
    }

    /// The crop to apply (validation has already rejected contradictory settings).
    pub fn crop(&self) -> Crop {
        if self.center_crop {
            Crop::Center
        } else {
            Crop::Random
        }
    }
}

/// How `lora_A` is initialised (`lora_B` always starts at zero, so the adapter starts as a no-op).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LoraInit {
    /// A ~ N(0, std = 1/rank): PEFT's `init_lora_weights="gaussian"`, what the reference uses.
    #[default]
    Gaussian,
    /// Kaiming-uniform A: PEFT's default (`init_lora_weights=True`).
    Kaiming,
}

/// `[adapter]`: the LoRA layers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AdapterConfig {
    /// LoRA rank r.
    #[schemars(range(min = 1), extend("x-reference" = "--rank"))]
    pub rank: u32,
    /// LoRA alpha; the update is scaled by alpha / rank. Defaults to `rank` (scale 1), as the
    /// reference.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("exclusiveMinimum" = 0))]
    pub alpha: Option<f64>,
    /// Initialisation of `lora_A`.
    pub init: LoraInit,
    /// UNet modules to wrap, PEFT style: a module matches when its name equals a pattern or ends
    /// with "." + pattern.
    #[schemars(length(min = 1))]
    pub target_modules: Vec<String>,
    /// Rank per pattern, overriding `rank` for the modules it matches (PEFT's `rank_pattern`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub rank_pattern: BTreeMap<String, RankValue>,
    /// Alpha per pattern, overriding `alpha` for the modules it matches (PEFT's `alpha_pattern`).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub alpha_pattern: BTreeMap<String, AlphaValue>,
    /// LoCon (kohya's `conv_dim`): also put a LoRA branch of this rank on every convolution of
    /// the UNet's resnets and samplers (`conv1`, `conv2`, `conv_shortcut`, `downsamplers.0.conv`,
    /// `upsamplers.0.conv`); `rank_pattern` / `alpha_pattern` override it per module. Unset: no
    /// convolution is adapted (the reference).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1), extend("x-reference" = "kohya --network_args conv_dim"))]
    pub conv_rank: Option<u32>,
    /// Alpha of the convolutions' branches (scale conv_alpha / conv_rank). Defaults to
    /// `conv_rank` (scale 1), as `alpha` defaults to `rank`; kohya's default is 1.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("exclusiveMinimum" = 0, "x-reference" = "kohya --network_args conv_alpha"))]
    pub conv_alpha: Option<f64>,
    /// DoRA (PEFT's `use_dora`): every branch also learns a magnitude per output channel, the
    /// weight becoming `m · (W + ΔW) / ‖W + ΔW‖`. Saved as diffusers saves it
    /// (`lora_magnitude_vector`) and, in the kohya file, as LyCORIS's `dora_scale`.
    pub use_dora: bool,
    /// Also train LoRA layers in the text encoder (as the SDXL and DreamBooth scripts offer).
    pub text_encoder: bool,
    /// Text-encoder modules to wrap when `text_encoder` is true.
    #[schemars(length(min = 1))]
    pub(crate) text_encoder_target_modules: Vec<String>,
}

/// A LoRA rank (at least 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct RankValue(#[schemars(range(min = 1))] pub u32);

/// A LoRA alpha (greater than 0).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(transparent)]
pub struct AlphaValue(#[schemars(extend("exclusiveMinimum" = 0))] pub f64);

impl Default for AdapterConfig {
    fn default() -> Self {
        Self {
            rank: 4,
            alpha: None,
            init: LoraInit::Gaussian,
            target_modules: ["to_k", "to_q", "to_v", "to_out.0"].map(String::from).to_vec(),
            rank_pattern: BTreeMap::new(),
            alpha_pattern: BTreeMap::new(),
            conv_rank: None,
            conv_alpha: None,
            use_dora: false,
            text_encoder: false,
            text_encoder_target_modules: ["q_proj", "k_proj", "v_proj", "out_proj"]
                .map(String::from)
                .to_vec(),
        }
    }
}

impl AdapterConfig {
    /// Alpha for layers no `alpha_pattern` matches: `alpha`, or `rank` when unset.
    pub fn default_alpha(&self) -> f64 {
        self.alpha.unwrap_or(self.rank as f64)
    }
}

/// The optimizer's update rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// torch's AdamW, as the reference.
    #[default]
    Adamw,
    /// Lion as `lion-pytorch` (kohya's `--optimizer_type Lion`): sign of an interpolated
    /// momentum, one moment per parameter (half AdamW's state); usually with a learning rate 3-10x
    /// smaller than AdamW's.
    Lion,
    /// AdamW with its two moments in bitsandbytes' blockwise dynamic 8-bit form (kohya's
    /// `--optimizer_type AdamW8bit`): about a quarter of AdamW's state memory.
    Adamw8bit,
    /// Prodigy as `prodigyopt` (kohya's `--optimizer_type Prodigy`): Adam that estimates its own
    /// step size; `train.learning_rate` multiplies the estimate and is left at 1.0.
    Prodigy,
    /// transformers' Adafactor with the learning rate from the schedule (kohya's
    /// `--optimizer_type Adafactor` with `relative_step=False scale_parameter=False
    /// warmup_init=False`): a factored second moment, no first moment.
    Adafactor,
}

/// `[optimizer]`: AdamW (torch's, decoupled weight decay), Lion, 8-bit AdamW, Prodigy or
/// Adafactor, and gradient clipping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerConfig {
    /// The update rule: "adamw" (the reference's), or as kohya's `--optimizer_type`: "lion",
    /// "adamw8bit", "prodigy", "adafactor".
    pub kind: OptimizerKind,
    /// beta1 (AdamW's first moment; Lion's interpolation).
    #[schemars(range(min = 0), extend("exclusiveMaximum" = 1, "x-reference" = "--adam_beta1"))]
    pub beta1: f64,
    /// beta2 (AdamW's second moment; Lion's momentum). Unset: 0.999 for AdamW, 8-bit AdamW and
    /// Prodigy, 0.99 for Lion (lion-pytorch's default). Adafactor has none.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0), extend("exclusiveMaximum" = 1, "x-reference" = "--adam_beta2"))]
    pub beta2: Option<f64>,
    /// Decoupled weight decay. Unset: 1e-2 for AdamW and 8-bit AdamW (the reference's), 0 for
    /// Lion, Prodigy and Adafactor (their packages' defaults).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0), extend("x-reference" = "--adam_weight_decay"))]
    pub weight_decay: Option<f64>,
    /// AdamW epsilon.
    #[schemars(extend("exclusiveMinimum" = 0, "x-reference" = "--adam_epsilon"))]
    pub epsilon: f64,
    /// Prodigy's `d_coef`: the estimated step size is multiplied by it (kind = "prodigy").
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("exclusiveMinimum" = 0))]
    pub d_coef: Option<f64>,
    /// Prodigy's `use_bias_correction` (Adam's bias correction on the estimate; kind = "prodigy").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub use_bias_correction: Option<bool>,
    /// Prodigy's `safeguard_warmup` (leave the lr out of the estimate's denominator, for runs
    /// with a warmup; kind = "prodigy").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub safeguard_warmup: Option<bool>,
    /// Adafactor's `scale_parameter`: scale the lr by each parameter's RMS (at least 1e-3);
    /// kohya's recommended setting is false, the default (kind = "adafactor").
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scale_parameter: Option<bool>,
    /// Clip the global gradient norm to this before each update; 0 turns clipping off. The
    /// reference script never clips (see docs/pipeline.md); we do.
    #[schemars(range(min = 0), extend("x-reference" = "--max_grad_norm"))]
    pub max_grad_norm: f64,
    /// AdamW (kind = "adamw") on the CPU: update every LoRA parameter in one pass over one flat
    /// buffer instead of about ten tensor ops per parameter; the same arithmetic, bit for bit.
    /// Off by default until `lora bench` shows it faster (docs/benchmarks.md); GPUs have no fused
    /// kernel yet, so it is refused with a CUDA `train.device`.
    pub fused: bool,
}

impl Default for OptimizerConfig {
    fn default() -> Self {
        Self {
            kind: OptimizerKind::Adamw,
            beta1: 0.9,
            beta2: None,
            weight_decay: None,
            epsilon: 1e-8,
            d_coef: None,
            use_bias_correction: None,
            safeguard_warmup: None,
            scale_parameter: None,
            max_grad_norm: 1.0,
            fused: false,
        }
    }
}

impl OptimizerConfig {
    /// `beta2`, or the kind's default.
    pub fn beta2(&self) -> f64 {
        self.beta2.unwrap_or(match self.kind {
            OptimizerKind::Adamw | OptimizerKind::Adamw8bit | OptimizerKind::Prodigy | OptimizerKind::Adafactor => 0.999,
            OptimizerKind::Lion => 0.99,
        })
    }

    /// `weight_decay`, or the kind's default.
    pub fn weight_decay(&self) -> f64 {
        self.weight_decay.unwrap_or(match self.kind {
            OptimizerKind::Adamw | OptimizerKind::Adamw8bit => 1e-2,
            OptimizerKind::Lion | OptimizerKind::Prodigy | OptimizerKind::Adafactor => 0.0,
        })
    }
}

/// Learning-rate schedule (diffusers' `get_scheduler`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LrScheduler {
    /// The same rate throughout; warmup is ignored.
    #[default]
    Constant,
    /// Linear warmup, then constant.
    ConstantWithWarmup,
    /// Linear warmup, then linear decay to 0.
    Linear,
    /// Linear warmup, then half a cosine down to 0.
    Cosine,
    /// Linear warmup, then cosine with hard restarts (one cycle).
    CosineWithRestarts,
    /// Linear warmup, then polynomial decay (power 1) to 1e-7.
    Polynomial,
    /// Linear warmup, then half a cosine down to `train.min_lr_ratio` of the learning rate
    /// (transformers' schedule, kohya's `cosine_with_min_lr`).
    CosineWithMinLr,
    /// Linear warmup, then REX (arXiv 2107.04197) down to 0, as OneTrainer's `REX` (d = 0.9).
    Rex,
}

/// Floating-point precision of the frozen models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    /// Everything in f32.
    #[default]
    No,
    /// Frozen weights in f16 (a `force_upcast` VAE in f32), LoRA parameters in f32, dynamic
    /// loss scaling.
    Fp16,
    /// Frozen weights in bf16, LoRA parameters in f32.
    Bf16,
}

/// Where training runs: `"auto"`, `"cpu"`, `"cuda"` (the first GPU) or `"cuda:N"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Device {
    /// The first CUDA GPU if this build supports CUDA and one answers, else the CPU.
    #[default]
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA GPU number N (`"cuda"` is `"cuda:0"`); an error if there is none.
    Cuda(usize),
}

impl Device {
    /// The pattern every accepted spelling matches (the schema's `pattern`).
    pub(crate) const PATTERN: &'static str = "^(auto|cpu|cuda(:[0-9]+)?)$";

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "auto" => Some(Self::Auto),
            "cpu" => Some(Self::Cpu),
            "cuda" => Some(Self::Cuda(0)),
            _ => s.strip_prefix("cuda:").filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())).and_then(|n| n.parse().ok()).map(Self::Cuda),
        }
    }
}

impl std::fmt::Display for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(0) => f.write_str("cuda"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl Serialize for Device {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Device {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("device must be \"auto\", \"cpu\", \"cuda\" or \"cuda:N\"; found \"{s}\"")))
    }
}

impl JsonSchema for Device {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Device".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "description": "Where training runs: \"auto\" (a CUDA GPU if this build has CUDA and one answers, else the CPU), \"cpu\", \"cuda\" (the first GPU) or \"cuda:N\".",
            "type": "string",
            "pattern": Device::PATTERN,
            "x-expected": "\"auto\", \"cpu\", \"cuda\" or \"cuda:N\"",
            "examples": ["auto", "cpu", "cuda", "cuda:1"]
        })
    }
}

/// What the UNet predicts, and so the training target.
#[derive(JsonSchema)]
#[schemars(rename = "PredictionType", rename_all = "snake_case")]
#[allow(dead_code)]
enum TrainPrediction {
    /// The added noise.
    Epsilon,
    /// The velocity sqrt(a)·noise − sqrt(1−a)·x0.
    VPrediction,
}

/// `[train]`: the training loop.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Optimizer updates to run; when set it overrides `epochs`.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1), extend("x-reference" = "--max_train_steps"))]
    pub max_steps: Option<u64>,
    /// Passes over the dataset, used when `max_steps` is not set.
    #[schemars(range(min = 1), extend("x-reference" = "--num_train_epochs"))]
    pub epochs: u64,
    /// Images per micro-batch.
    #[schemars(range(min = 1), extend("x-reference" = "--train_batch_size"))]
    pub batch_size: u32,
    /// Micro-batches per optimizer update.
    #[schemars(range(min = 1), extend("x-reference" = "--gradient_accumulation_steps"))]
    pub gradient_accumulation_steps: u32,
    /// Base learning rate.
    #[schemars(extend("exclusiveMinimum" = 0, "x-reference" = "--learning_rate"))]
    pub learning_rate: f64,
    /// Multiply the learning rate by batch_size x gradient_accumulation_steps.
    #[schemars(extend("x-reference" = "--scale_lr"))]
    pub scale_lr: bool,
    /// Learning-rate schedule.
    #[schemars(extend("x-reference" = "--lr_scheduler"))]
    pub lr_scheduler: LrScheduler,
    /// Linear warmup steps (ignored by "constant").
    #[schemars(extend("x-reference" = "--lr_warmup_steps"))]
    pub lr_warmup_steps: u64,
    /// With `lr_scheduler = "cosine_with_min_lr"`: the floor of the cosine as a fraction of the
    /// learning rate (kohya's `--lr_scheduler_min_lr_ratio`, transformers' `min_lr_rate`).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0), extend("exclusiveMaximum" = 1))]
    pub min_lr_ratio: Option<f64>,
    /// Random seed for noise, timesteps, data order and augmentation; unset draws one.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-reference" = "--seed"))]
    pub seed: Option<u64>,
    /// Keep an exponential moving average of the LoRA weights with this decay, as diffusers'
    /// `EMAModel` (`--use_ema`, OneTrainer's and SimpleTuner's EMA): the decay ramps up as
    /// (1 + k) / (10 + k) to this cap. The average is exported beside the trained weights
    /// (`*_ema.safetensors`) and the final validation images use it; unset keeps none.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0), extend("exclusiveMaximum" = 1, "x-reference" = "--ema_decay"))]
    pub ema_decay: Option<f64>,
    /// Not supported yet (validation refuses it): images decode and preprocess on the shared thread pool (`RAYON_NUM_THREADS`).
    #[schemars(extend("x-reference" = "--dataloader_num_workers"))]
    pub dataloader_workers: u32,
    /// Precision of the frozen models.
    #[schemars(extend("x-reference" = "--mixed_precision"))]
    pub precision: Precision,
    /// Where training runs.
    pub device: Device,
    /// Allow TF32 matmuls on Ampere or newer GPUs.
    #[schemars(extend("x-reference" = "--allow_tf32"))]
    pub allow_tf32: bool,
    /// Recompute each UNet resnet and transformer in the backward pass instead of keeping its activations: same gradients, less memory, more time per step.
    #[schemars(extend("x-reference" = "--gradient_checkpointing"))]
    pub gradient_checkpointing: bool,
    /// Min-SNR loss weighting gamma (5.0 is the recommended value); unset turns it off.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("exclusiveMinimum" = 0, "x-reference" = "--snr_gamma"))]
    pub snr_gamma: Option<f64>,
    /// Offset-noise scale added per image and channel; 0 turns it off.
    #[schemars(range(min = 0), extend("x-reference" = "--noise_offset"))]
    pub noise_offset: f64,
    /// Training target; unset uses the model's scheduler config.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<TrainPrediction>", extend("x-reference" = "--prediction_type"))]
    pub prediction_type: Option<PredictionType>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            max_steps: None,
            epochs: 100,
            batch_size: 16,
            gradient_accumulation_steps: 1,
            learning_rate: 1e-4,
            scale_lr: false,
            lr_scheduler: LrScheduler::Constant,
            lr_warmup_steps: 500,
            min_lr_ratio: None,
            seed: None,
            ema_decay: None,
            dataloader_workers: 0,
            precision: Precision::No,
            device: Device::Auto,
            allow_tf32: false,
            gradient_checkpointing: false,
            snr_gamma: None,
            noise_offset: 0.0,
            prediction_type: None,
        }
    }
}

/// `[checkpoints]`: saves of the training state under the output folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointsConfig {
    /// Save `checkpoint-<step>` every this many optimizer updates.
    #[schemars(range(min = 1), extend("x-reference" = "--checkpointing_steps"))]
    pub every_steps: u64,
    /// Keep at most this many checkpoints, deleting the oldest; unset keeps all.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1), extend("x-reference" = "--checkpoints_total_limit"))]
    pub total_limit: Option<u32>,
    /// Resume from "latest" or a `checkpoint-<step>` folder name in the output folder.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(extend("x-reference" = "--resume_from_checkpoint"))]
    pub resume: Option<String>,
}

impl Default for CheckpointsConfig {
    fn default() -> Self {
        Self { every_steps: 500, total_limit: None, resume: None }
    }
}

/// Sampler used for validation images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ValidationScheduler {
    /// The model's own scheduler (PNDM for SD 1.5), as the reference.
    #[default]
    Model,
    /// PNDM (PLMS).
    Pndm,
    /// DDIM, eta 0.
    Ddim,
    /// Euler discrete.
    Euler,
}

/// `[validation]`: sample images while training (no prompt, no images), and the held-out loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ValidationConfig {
    /// Prompts to sample; empty turns validation off.
    #[schemars(extend("x-reference" = "--validation_prompt"))]
    pub prompts: Vec<String>,
    /// Images per prompt and validation run.
    #[schemars(range(min = 1), extend("x-reference" = "--num_validation_images"))]
    pub num_images: u32,
    /// Validate at the end of every N-th epoch.
    #[schemars(range(min = 1), extend("x-reference" = "--validation_epochs"))]
    pub every_epochs: u64,
    /// Also validate every N optimizer updates.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub every_steps: Option<u64>,
    /// Sampler.
    pub scheduler: ValidationScheduler,
    /// Denoising steps per image.
    #[schemars(range(min = 1))]
    pub steps: u32,
    /// Classifier-free guidance scale; 1 or less turns guidance off.
    #[schemars(range(min = 0))]
    pub guidance_scale: f64,
    /// Negative prompt: the unconditional side of guidance for every validation image (diffusers'
    /// `negative_prompt`); empty is the embedding of "", as the reference.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub negative_prompt: String,
    /// Hold this fraction of the dataset out of training (a seeded choice, at least one example,
    /// at least one left to train on) and measure the denoising loss on it with fixed noise
    /// before, during and after training, as kohya's / OneTrainer's validation loss: the number to
    /// watch for over-fitting. 0 (the default) holds nothing out.
    #[schemars(range(min = 0.0), extend("exclusiveMaximum" = 1))]
    pub loss_split: f64,
    /// With `loss_split`: also measure the held-out loss every N optimizer updates (else before
    /// and after training only).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub loss_every_steps: Option<u64>,
}

impl Default for ValidationConfig {
    fn default() -> Self {
        Self {
            prompts: Vec::new(),
            num_images: 4,
            every_epochs: 1,
            every_steps: None,
            scheduler: ValidationScheduler::Model,
            steps: 30,
            guidance_scale: 7.5,
            negative_prompt: String::new(),
            loss_split: 0.0,
            loss_every_steps: None,
        }
    }
}

/// File format of the exported adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OutputFormat {
    /// `pytorch_lora_weights.safetensors`, as `save_lora_weights` writes it.
    Diffusers,
    /// `pytorch_lora_weights_kohya.safetensors` with `lora_unet_*` names and alphas.
    Kohya,
}

/// `[output]`: the exported adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct OutputConfig {
    /// Folder for the adapter, checkpoints and logs, relative to the pipeline file.
    #[schemars(extend("x-reference" = "--output_dir"))]
    pub dir: PathBuf,
    /// Formats to write: by default both the reference's diffusers file (what diffusers loads)
    /// and the kohya file (what ComfyUI and A1111 load; neither loads the diffusers file's UNet).
    #[schemars(length(min = 1), extend("uniqueItems" = true))]
    pub formats: Vec<OutputFormat>,
    /// The adapter files' name stem (kohya's `--output_name`): `<name>.safetensors` (diffusers
    /// form) and `<name>_kohya.safetensors`; unset, the reference's `pytorch_lora_weights`.
    /// Letters, digits, `.`, `_` and `-`, starting with a letter or digit.
    #[schemars(regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"), extend("x-reference" = "kohya --output_name"))]
    pub name: Option<String>,
    /// The dtype of the exported adapter files (the train stage's own file and checkpoints stay
    /// f32): `f32` (the reference's), `fp16` or `bf16` (half the size; kohya's `--save_precision`).
    #[schemars(extend("x-reference" = "kohya --save_precision"))]
    pub save_precision: SavePrecision,
}

impl Default for OutputConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("sd-model-finetuned-lora"),
            formats: vec![OutputFormat::Diffusers, OutputFormat::Kohya],
            name: None,
            save_precision: SavePrecision::F32,
        }
    }
}

/// The dtype the exported adapter is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub enum SavePrecision {
    /// 32-bit floats, as the reference saves.
    #[default]
    #[serde(rename = "f32")]
    F32,
    /// 16-bit floats (rounded to nearest).
    #[serde(rename = "fp16")]
    Fp16,
    /// bfloat16 (rounded to nearest).
    #[serde(rename = "bf16")]
    Bf16,
}

/// Where training metrics go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReportTo {
    /// TensorBoard event files under `logging.dir`.
    #[default]
    Tensorboard,
    /// No tracker (the progress bar and the summary only).
    #[serde(rename = "none")]
    Disabled,
}

/// `[logging]`: metrics and trackers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LoggingConfig {
    /// Tracker for metrics.
    #[schemars(extend("x-reference" = "--report_to"))]
    pub report_to: ReportTo,
    /// Log folder, relative to `output.dir`.
    #[schemars(extend("x-reference" = "--logging_dir"))]
    pub dir: PathBuf,
}

impl Default for LoggingConfig {
    fn default() -> Self {
        Self { report_to: ReportTo::Tensorboard, dir: PathBuf::from("logs") }
    }
}

/// Reference flags that have no key, and why. Listed in `docs/pipeline.md`.
pub const UNSUPPORTED_REFERENCE_FLAGS: &[(&str, &str)] = &[
    ("--use_8bit_adam", "bitsandbytes is CUDA/Python only; AdamW runs in f32"),
    ("--enable_xformers_memory_efficient_attention", "xformers is PyTorch only"),
    ("--push_to_hub, --hub_token, --hub_model_id", "uploading is left to `huggingface-cli upload`"),
    ("--local_rank", "one process; no distributed training"),
];
