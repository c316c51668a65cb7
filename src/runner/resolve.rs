//! The conversion layer: a typed pipeline turned into what the stages call — the device and
//! dtypes, the model source, the data spec and loader options, the LoRA spec, the trainer's
//! settings, the adapter files' names. Made from the `Pipeline` alone: nothing here runs a stage.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};

use super::lock::Fingerprint;
use crate::adapters::lora::{LoraInit, LoraSpec, TrainableLora};
use crate::vocab::Family;
use crate::config::types::{self as cfg, Pipeline};
use crate::config::LoadedPipeline;
use crate::data::{self, DataLoader, LoaderOptions};
use crate::layout::{DIFFUSERS_FILE, KOHYA_FILE};
use crate::models::{LoadOptions, StableDiffusion};
use crate::train::checkpoint::NamedVar;
use crate::train::lr::LrSchedule;
use crate::train::optim::AdamWConfig;
use crate::train::precision::{GradScalerConfig, MixedPrecision};
use crate::train::step::LossOptions;
use crate::train::trainer::{BatchSource, TrainBatch, TrainSettings};

/// The diffusers-form file of `p`: `<output.name>.safetensors`, else [`DIFFUSERS_FILE`].
pub fn diffusers_file(p: &Pipeline) -> String {
    p.output.name.as_ref().map_or_else(|| DIFFUSERS_FILE.to_string(), |n| format!("{n}.safetensors"))
}

/// The kohya-form file of `p`: `<output.name>_kohya.safetensors`, else [`KOHYA_FILE`].
pub(crate) fn kohya_file(p: &Pipeline) -> String {
    p.output.name.as_ref().map_or_else(|| KOHYA_FILE.to_string(), |n| format!("{n}_kohya.safetensors"))
}

/// The device a pipeline asks for (logged; see `crate::device`).
pub(crate) fn select_device(device: cfg::Device) -> Result<Device> {
    crate::device::select(device)
}

/// The trainer's view of `train.precision`.
pub fn mixed_precision(precision: cfg::Precision) -> MixedPrecision {
    match precision {
        cfg::Precision::No => MixedPrecision::No,
        cfg::Precision::Fp16 => MixedPrecision::Fp16,
        cfg::Precision::Bf16 => MixedPrecision::Bf16,
    }
}

/// The dtype of the frozen weights for `precision` (LoRA parameters stay f32). Half precision
/// runs on the CPU too (slowly: convolutions compute in f32 and round).
pub(crate) fn weight_dtype(precision: cfg::Precision, device: &Device) -> Result<DType> {
    let dtype = mixed_precision(precision).weight_dtype();
    if dtype != DType::F32 && device.is_cpu() {
        tracing::info!("precision {precision:?} on the CPU: half-precision training is much slower there than f32");
    }
    Ok(dtype)
}

pub(crate) fn model_source(p: &Pipeline) -> Result<String> {
    match (&p.model.id, &p.model.path) {
        _ if p.model.file.is_some() => Ok(p.model.file.as_ref().map(|f| f.display().to_string()).unwrap_or_default()),
        (_, Some(path)) => Ok(path.display().to_string()),
        (Some(id), None) => Ok(id.clone()),
        (None, None) => bail!("[model] needs `id` or `path`"),
    }
}

pub(crate) fn source_spec(p: &Pipeline) -> Result<data::SourceSpec> {
    let all = p.dataset.all_sources();
    spec_of(p, &all[0].1)
}

/// The layout to read for one source (`[dataset]`'s own or one of `[[dataset.sources]]`).
fn spec_of(p: &Pipeline, s: &cfg::ExtraSource) -> Result<data::SourceSpec> {
    let path = || s.path.clone().context("a local dataset source needs `path`");
    Ok(match s.kind {
        cfg::DatasetKind::Parquet => data::SourceSpec::Parquet { path: path()? },
        cfg::DatasetKind::Imagefolder => data::SourceSpec::ImageFolder { dir: path()? },
        cfg::DatasetKind::Sidecar => data::SourceSpec::Sidecar { dir: path()?, caption_extensions: vec!["txt".into(), "caption".into()] },
        cfg::DatasetKind::Hub => data::SourceSpec::Hub {
            repo_id: s.name.clone().context("a dataset source of kind \"hub\" needs `name`")?,
            hub: data::source::hub::HubOptions {
                revision: None,
                cache_dir: p.model.cache_dir.clone(),
                offline: std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")),
                endpoint: std::env::var("HF_ENDPOINT").ok(),
            },
        },
    })
}

/// A source's name as kohya keys `ss_tag_frequency`: its folder's name (the hub id for a hub
/// dataset).
pub(crate) fn source_name(s: &cfg::ExtraSource) -> String {
    match (&s.name, &s.path) {
        (Some(name), _) => name.clone(),
        (None, Some(path)) => crate::util::path::tidy_path(path).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        (None, None) => String::new(),
    }
}

/// Read every source of the pipeline's dataset as one (`max_samples` draws from the first
/// source's examples, as before there were several); a single source without repeats or prefix
/// is read exactly as it always was.
pub fn load_dataset(p: &Pipeline) -> Result<data::Dataset> {
    let all = p.dataset.all_sources();
    if all.len() == 1 && all[0].1.repeats == 1 && all[0].1.caption_prefix.is_none() {
        return data::source::load_source(&source_spec(p)?, &source_options(p));
    }
    let mut parts = Vec::with_capacity(all.len());
    for (i, (key, s)) in all.iter().enumerate() {
        let mut opts = source_options(p);
        opts.image_column = s.image_column.clone();
        opts.caption_column = s.caption_column.clone();
        if i > 0 {
            opts.max_samples = None;
        }
        let dataset = data::source::load_source(&spec_of(p, s)?, &opts).with_context(|| format!("reading `{key}`"))?;
        parts.push((dataset, data::source::SourceGroup { name: source_name(s), repeats: s.repeats }, s.caption_prefix.clone()));
    }
    Ok(data::Dataset::combine(parts))
}

fn interpolation(i: cfg::Interpolation) -> data::Interpolation {
    data::Interpolation::from_name(&crate::config::choice_name(&i)).unwrap_or(data::Interpolation::Lanczos)
}

/// The training resolution: `preprocess.resolution`, else the loaded model's family default.
pub(crate) fn resolution(p: &Pipeline, sd: &StableDiffusion) -> u32 {
    p.preprocess.resolution.unwrap_or_else(|| sd.default_resolution())
}

/// `preprocess.resolution` for messages: the number, or the family default it stands for.
pub(crate) fn resolution_text(p: &Pipeline) -> String {
    match p.preprocess.resolution {
        Some(r) => r.to_string(),
        None => "the model family's default".to_string(),
    }
}

/// The data loader's options for a loaded model: its family decides the preprocessing order
/// (SDXL flips before it crops, as its script does) and, unless the pipeline says, the
/// resolution.
pub(crate) fn model_loader_options(p: &Pipeline, sd: &StableDiffusion) -> LoaderOptions {
    loader_options(p, Some(sd.family), resolution(p, sd))
}

/// The data loader's options with the family and resolution given.
pub(crate) fn loader_options(p: &Pipeline, family: Option<Family>, resolution: u32) -> LoaderOptions {
    let pre = &p.preprocess;
    LoaderOptions {
        batch_size: p.train.batch_size as usize,
        seed: p.train.seed.unwrap_or(0),
        shuffle: true,
        prefetch_batches: 2,
        preprocess: data::PreprocessOptions {
            resolution,
            crop: match pre.crop() {
                cfg::Crop::Center => data::CropMode::Center,
                cfg::Crop::Random => data::CropMode::Random,
            },
            flip_p: if pre.random_flip { 0.5 } else { 0.0 },
            interpolation: interpolation(pre.interpolation),
            flip_before_crop: family == Some(Family::Sdxl),
        },
        decode: data::DecodeOptions { max_image_pixels: Some(p.dataset.max_image_pixels) },
        buckets: pre.buckets.then(|| {
            let (min_reso, max_reso, step) = pre.bucket_bounds();
            data::bucket::BucketOptions { min_reso, max_reso, step, no_upscale: pre.bucket_no_upscale }
        }),
        captions: data::CaptionOptions {
            dropout: p.dataset.caption_dropout,
            shuffle_tags: p.dataset.shuffle_tags,
            keep_tokens: p.dataset.keep_tokens as usize,
        },
    }
}

pub(crate) fn lora_spec(a: &cfg::AdapterConfig, targets: &[String]) -> LoraSpec {
    LoraSpec {
        targets: targets.to_vec(),
        rank: a.rank as usize,
        alpha: a.default_alpha(),
        rank_pattern: a.rank_pattern.iter().map(|(k, v)| (k.clone(), v.0 as usize)).collect(),
        alpha_pattern: a.alpha_pattern.iter().map(|(k, v)| (k.clone(), v.0)).collect(),
        init: match a.init {
            cfg::LoraInit::Gaussian => LoraInit::Gaussian,
            cfg::LoraInit::Kaiming => LoraInit::Kaiming,
        },
        conv: a.conv_rank.map(|r| (r as usize, a.conv_alpha.unwrap_or(r as f64))),
        use_dora: a.use_dora,
    }
}

fn lr_schedule(s: cfg::LrScheduler, min_lr_ratio: Option<f64>) -> LrSchedule {
    match s {
        cfg::LrScheduler::Rex => LrSchedule::Rex,
        cfg::LrScheduler::CosineWithMinLr => LrSchedule::CosineWithMinLr { min_lr_ratio: min_lr_ratio.unwrap_or(0.0) },
        cfg::LrScheduler::Constant => LrSchedule::Constant,
        cfg::LrScheduler::ConstantWithWarmup => LrSchedule::ConstantWithWarmup,
        cfg::LrScheduler::Linear => LrSchedule::Linear,
        cfg::LrScheduler::Cosine => LrSchedule::Cosine,
        cfg::LrScheduler::CosineWithRestarts => LrSchedule::CosineWithRestarts { num_cycles: 1 },
        cfg::LrScheduler::Polynomial => LrSchedule::Polynomial { power: 1.0, lr_end: 1e-7 },
    }
}

/// The trainer's settings from a pipeline.
pub(crate) fn train_settings(loaded: &LoadedPipeline) -> TrainSettings {
    let p = &loaded.pipeline;
    let t = &p.train;
    TrainSettings {
        batch_size: t.batch_size as usize,
        gradient_accumulation_steps: t.gradient_accumulation_steps as usize,
        num_epochs: t.epochs as usize,
        max_train_steps: t.max_steps.map(|n| n as usize),
        learning_rate: t.learning_rate,
        scale_lr: t.scale_lr,
        lr_schedule: lr_schedule(t.lr_scheduler, t.min_lr_ratio),
        lr_warmup_steps: t.lr_warmup_steps as usize,
        adamw: AdamWConfig {
            beta1: p.optimizer.beta1,
            beta2: p.optimizer.beta2(),
            eps: p.optimizer.epsilon,
            weight_decay: p.optimizer.weight_decay(),
            ema_decay: t.ema_decay,
            fused: p.optimizer.fused,
            rule: {
                use crate::train::optim::UpdateRule;
                let o = &p.optimizer;
                match o.kind {
                    cfg::OptimizerKind::Adamw => UpdateRule::AdamW,
                    cfg::OptimizerKind::Lion => UpdateRule::Lion,
                    cfg::OptimizerKind::Adamw8bit => UpdateRule::AdamW8bit,
                    cfg::OptimizerKind::Prodigy => UpdateRule::Prodigy {
                        d_coef: o.d_coef.unwrap_or(1.0),
                        bias_correction: o.use_bias_correction.unwrap_or(false),
                        safeguard_warmup: o.safeguard_warmup.unwrap_or(false),
                    },
                    cfg::OptimizerKind::Adafactor => UpdateRule::Adafactor { scale_parameter: o.scale_parameter.unwrap_or(false) },
                }
            },
        },
        max_grad_norm: (p.optimizer.max_grad_norm > 0.0).then_some(p.optimizer.max_grad_norm),
        loss: LossOptions {
            snr_gamma: t.snr_gamma,
            prediction_type: t.prediction_type,
            noise_offset: t.noise_offset,
        },
        seed: t.seed.unwrap_or(0),
        checkpointing_steps: (p.checkpoints.every_steps > 0).then_some(p.checkpoints.every_steps as usize),
        checkpoints_total_limit: p.checkpoints.total_limit.map(|n| n as usize),
        output_dir: p.output.dir.clone(),
        resume_from_checkpoint: p.checkpoints.resume.clone(),
        // As `stages::encode::caches_text`: no text cache for a trained encoder or shuffled tags.
        cache_encodings: !p.adapter.text_encoder && !p.dataset.shuffle_tags,
        pipeline_sha256: Some(pipeline_sha256(loaded)),
        train_fingerprint: None,
        eval_batches: 0,
        heldout_every_steps: p.validation.loss_every_steps.map(|n| n as usize),
        tensorboard_dir: (p.logging.report_to == cfg::ReportTo::Tensorboard).then(|| p.output.dir.join(&p.logging.dir)),
        precision: mixed_precision(t.precision),
        grad_scaler: GradScalerConfig::default(),
        gradient_checkpointing: t.gradient_checkpointing,
    }
}

/// SHA-256 of the resolved pipeline TOML.
pub fn pipeline_sha256(loaded: &LoadedPipeline) -> String {
    Fingerprint::new("pipeline").add("toml", &resolved_toml(loaded)).finish()
}

pub(crate) fn resolved_toml(loaded: &LoadedPipeline) -> String {
    toml::to_string(&loaded.resolved).unwrap_or_default()
}

/// Load the pipeline's model on `device` in `dtype`.
pub(crate) fn load_model(p: &Pipeline, device: &Device, dtype: DType) -> Result<StableDiffusion> {
    let source = model_source(p)?;
    // A hub id is shown as written; a local path with `..` folded.
    let shown = if std::path::Path::new(&source).exists() { crate::util::path::tidy_path(std::path::Path::new(&source)).display().to_string() } else { source.clone() };
    tracing::info!("model: loading {shown}");
    // On a GPU the frozen encoders may be parked in host memory once the encode cache serves.
    let load_opts = LoadOptions { movable_encoders: !device.is_cpu(), ..LoadOptions::from_config(&p.model) };
    StableDiffusion::load(&source, &load_opts, device, dtype).with_context(|| format!("loading model {source}"))
}

/// Column names, subset size and seed of the dataset stage.
pub(crate) fn source_options(p: &Pipeline) -> data::SourceOptions {
    data::SourceOptions {
        image_column: p.dataset.image_column.clone(),
        caption_column: p.dataset.caption_column.clone(),
        max_samples: p.dataset.max_samples.map(|n| n as usize),
        seed: p.train.seed.unwrap_or(0),
    }
}

/// The trainable tensors of injected branches under their checkpoint names
/// (`<prefix>.<module>.lora_A.weight` / `lora_B`, PEFT's names as the reference saves them;
/// DoRA's `lora_magnitude_vector.weight`).
pub(crate) fn named_params(prefix: &str, loras: &[TrainableLora]) -> Vec<NamedVar> {
    loras
        .iter()
        .flat_map(|l| {
            let magnitude = l.magnitude.as_ref().map(|m| NamedVar { name: format!("{prefix}.{}.lora_magnitude_vector.weight", l.module), var: m.clone() });
            [
                Some(NamedVar { name: format!("{prefix}.{}.lora_A.weight", l.module), var: l.down.clone() }),
                Some(NamedVar { name: format!("{prefix}.{}.lora_B.weight", l.module), var: l.up.clone() }),
                magnitude,
            ]
            .into_iter()
            .flatten()
        })
        .collect()
}

/// Adapts the data loader to the trainer's [`BatchSource`].
pub(crate) struct LoaderSource(pub(crate) DataLoader);

impl BatchSource for LoaderSource {
    fn num_examples(&self) -> usize {
        self.0.dataset().len()
    }

    fn batches_per_epoch(&self, _batch_size: usize) -> usize {
        self.0.batches_per_epoch()
    }

    fn batches<'a>(&'a self, epoch: usize, start_batch: usize) -> Box<dyn Iterator<Item = Result<TrainBatch>> + 'a> {
        let to_train = |b: data::Batch| TrainBatch { pixel_values: b.pixel_values, captions: b.captions, geometry: b.geometry };
        if start_batch == 0 {
            return Box::new(self.0.epoch(epoch).map(move |b| b.map(to_train)));
        }
        // Resuming mid-epoch: the same seeded order, from the first batch not yet consumed.
        let chunks: Vec<Vec<usize>> = self.0.epoch_batches(epoch).into_iter().skip(start_batch).collect();
        Box::new(chunks.into_iter().map(move |c| self.0.load_batch(epoch, &c).map(to_train)))
    }
}

