//! `lora run`: the stages of a pipeline in order — model, dataset, train, export, validation —
//! each with a fingerprint in `<output>/lora.lock`, so a rerun (or watch mode) skips what is up
//! to date and a [`Session`] keeps the loaded model and dataset between runs.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};

use super::lock::{Fingerprint, Lock};
use crate::adapters::format::{write_lora_file, LoraFormat, TrainingInfo};
use crate::adapters::lora::{inject, trained_weights, InitRng, LoraInit, LoraSpec, TrainableLora};
use crate::config::types::{self as cfg, Pipeline};
use crate::config::LoadedPipeline;
use crate::data::{self, DataLoader, Dataset, LoaderOptions};
use crate::models::{LoadOptions, StableDiffusion};
use crate::schedulers::pipeline::{generate, save_png, to_rgb8, GenerateOptions};
use crate::schedulers::SamplerKind;
use crate::train::checkpoint::NamedVar;
use crate::train::lr::LrSchedule;
use crate::train::optim::AdamWConfig;
use crate::train::precision::{GradScalerConfig, MixedPrecision};
use crate::train::step::LossOptions;
use crate::train::trainer::{BatchSource, TrainBatch, TrainOutcome, TrainSettings, Trainer};

/// The diffusers-form adapter file, as the reference names it.
pub const DIFFUSERS_FILE: &str = "pytorch_lora_weights.safetensors";
/// The kohya-form adapter file (A1111, ComfyUI).
pub const KOHYA_FILE: &str = "pytorch_lora_weights.kohya.safetensors";

/// Lock entry of a training run that was interrupted (its checkpoint is resumed next time).
const PARTIAL: &str = "train.partial";

/// What stays loaded between runs of watch mode.
#[derive(Default)]
pub struct Session {
    model: Option<(String, StableDiffusion)>,
    dataset: Option<(String, Arc<Dataset>, usize)>,
}

#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Rerun every stage even when its fingerprint is unchanged.
    pub force: bool,
}

/// What a run did, for the summary.
#[derive(Debug, Default)]
pub struct RunReport {
    pub train: Option<TrainOutcome>,
    pub skipped_train: bool,
    pub files: Vec<PathBuf>,
    pub skipped_images: usize,
    pub examples: usize,
    pub seconds: f64,
}

/// The stage names, in order.
pub const STAGES: &[&str] = &["model", "dataset", "train", "export", "validate"];

/// Fingerprints of every stage of a loaded pipeline (model and dataset include file sizes and
/// modification times of local inputs).
pub fn fingerprints(loaded: &LoadedPipeline) -> Vec<(&'static str, String)> {
    let t = &loaded.resolved;
    let p = &loaded.pipeline;
    let mut model = Fingerprint::new("model");
    model.add_toml("model", t.get("model"));
    for path in [&p.model.path, &p.model.file, &p.model.vae, &p.model.config].into_iter().flatten() {
        model.add_files("files", path);
    }
    let model = model.finish();
    let mut dataset = Fingerprint::new("dataset");
    dataset.add_toml("dataset", t.get("dataset")).add_toml("preprocess", t.get("preprocess"));
    if let Some(path) = &p.dataset.path {
        dataset.add_files("files", path);
    }
    let dataset = dataset.finish();
    let train = Fingerprint::new("train")
        .add("model", &model)
        .add("dataset", &dataset)
        .add_toml("adapter", t.get("adapter"))
        .add_toml("optimizer", t.get("optimizer"))
        .add_toml("train", t.get("train"))
        .finish();
    let export = Fingerprint::new("export").add("train", &train).add_toml("output", t.get("output").and_then(|o| o.get("formats"))).finish();
    let validate = Fingerprint::new("validate").add("train", &train).add_toml("validation", t.get("validation")).finish();
    vec![("model", model), ("dataset", dataset), ("train", train), ("export", export), ("validate", validate)]
}

fn fp<'a>(fps: &'a [(&'static str, String)], stage: &str) -> &'a str {
    &fps.iter().find(|(s, _)| *s == stage).expect("every stage has a fingerprint").1
}

/// The device a pipeline asks for (logged; see `crate::device`).
pub fn select_device(device: cfg::Device) -> Result<Device> {
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
pub fn weight_dtype(precision: cfg::Precision, device: &Device) -> Result<DType> {
    let dtype = mixed_precision(precision).weight_dtype();
    if dtype != DType::F32 && device.is_cpu() {
        tracing::info!("precision {precision:?} on the CPU: half-precision training is much slower there than f32");
    }
    Ok(dtype)
}

fn model_source(p: &Pipeline) -> Result<String> {
    match (&p.model.id, &p.model.path) {
        _ if p.model.file.is_some() => Ok(p.model.file.as_ref().map(|f| f.display().to_string()).unwrap_or_default()),
        (_, Some(path)) => Ok(path.display().to_string()),
        (Some(id), None) => Ok(id.clone()),
        (None, None) => bail!("[model] needs `id` or `path`"),
    }
}

fn source_spec(p: &Pipeline) -> Result<data::SourceSpec> {
    let path = || p.dataset.path.clone().context("[dataset] needs `path` for this kind");
    Ok(match p.dataset.kind {
        cfg::DatasetKind::Parquet => data::SourceSpec::Parquet { path: path()? },
        cfg::DatasetKind::Imagefolder => data::SourceSpec::ImageFolder { dir: path()? },
        cfg::DatasetKind::Sidecar => data::SourceSpec::Sidecar { dir: path()?, caption_extensions: vec!["txt".into(), "caption".into()] },
        cfg::DatasetKind::Hub => data::SourceSpec::Hub {
            repo_id: p.dataset.name.clone().context("[dataset] kind = \"hub\" needs `name`")?,
            hub: data::source::hub::HubOptions {
                revision: None,
                cache_dir: p.model.cache_dir.clone(),
                offline: std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true")),
                endpoint: std::env::var("HF_ENDPOINT").ok(),
            },
        },
    })
}

fn interpolation(i: cfg::Interpolation) -> data::Interpolation {
    let name = serde_json::to_value(i).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
    data::Interpolation::from_name(&name).unwrap_or(data::Interpolation::Lanczos)
}

fn loader_options(p: &Pipeline) -> LoaderOptions {
    let pre = &p.preprocess;
    LoaderOptions {
        batch_size: p.train.batch_size as usize,
        seed: p.train.seed.unwrap_or(0),
        shuffle: true,
        prefetch_batches: 2,
        preprocess: data::PreprocessOptions {
            resolution: pre.resolution,
            crop: match pre.crop() {
                cfg::Crop::Center => data::CropMode::Center,
                cfg::Crop::Random => data::CropMode::Random,
            },
            flip_p: if pre.random_flip { 0.5 } else { 0.0 },
            interpolation: interpolation(pre.interpolation),
        },
        decode: data::DecodeOptions { max_image_pixels: Some(p.dataset.max_image_pixels) },
    }
}

fn lora_spec(a: &cfg::AdapterConfig, targets: &[String]) -> LoraSpec {
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
    }
}

fn lr_schedule(s: cfg::LrScheduler) -> LrSchedule {
    match s {
        cfg::LrScheduler::Constant => LrSchedule::Constant,
        cfg::LrScheduler::ConstantWithWarmup => LrSchedule::ConstantWithWarmup,
        cfg::LrScheduler::Linear => LrSchedule::Linear,
        cfg::LrScheduler::Cosine => LrSchedule::Cosine,
        cfg::LrScheduler::CosineWithRestarts => LrSchedule::CosineWithRestarts { num_cycles: 1 },
        cfg::LrScheduler::Polynomial => LrSchedule::Polynomial { power: 1.0, lr_end: 1e-7 },
    }
}

/// The trainer's settings from a pipeline.
pub fn train_settings(loaded: &LoadedPipeline) -> TrainSettings {
    let p = &loaded.pipeline;
    let t = &p.train;
    TrainSettings {
        batch_size: t.batch_size as usize,
        gradient_accumulation_steps: t.gradient_accumulation_steps as usize,
        num_epochs: t.epochs as usize,
        max_train_steps: t.max_steps.map(|n| n as usize),
        learning_rate: t.learning_rate,
        scale_lr: t.scale_lr,
        lr_schedule: lr_schedule(t.lr_scheduler),
        lr_warmup_steps: t.lr_warmup_steps as usize,
        adamw: AdamWConfig {
            beta1: p.optimizer.beta1,
            beta2: p.optimizer.beta2,
            eps: p.optimizer.epsilon,
            weight_decay: p.optimizer.weight_decay,
        },
        max_grad_norm: (p.optimizer.max_grad_norm > 0.0).then_some(p.optimizer.max_grad_norm),
        loss: LossOptions {
            snr_gamma: t.snr_gamma,
            prediction_type: t.prediction_type.map(|pt| match pt {
                cfg::PredictionType::Epsilon => crate::schedulers::ddpm::PredictionType::Epsilon,
                cfg::PredictionType::VPrediction => crate::schedulers::ddpm::PredictionType::VPrediction,
            }),
            noise_offset: t.noise_offset,
        },
        seed: t.seed.unwrap_or(0),
        checkpointing_steps: (p.checkpoints.every_steps > 0).then_some(p.checkpoints.every_steps as usize),
        checkpoints_total_limit: p.checkpoints.total_limit.map(|n| n as usize),
        output_dir: p.output.dir.clone(),
        resume_from_checkpoint: p.checkpoints.resume.clone(),
        cache_encodings: !p.adapter.text_encoder,
        pipeline_sha256: Some(pipeline_sha256(loaded)),
        eval_batches: 0,
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

fn resolved_toml(loaded: &LoadedPipeline) -> String {
    toml::to_string(&loaded.resolved).unwrap_or_default()
}

/// Load the pipeline's model on `device` in `dtype`.
fn load_model(p: &Pipeline, device: &Device, dtype: DType) -> Result<StableDiffusion> {
    let source = model_source(p)?;
    tracing::info!("model: loading {source}");
    let load_opts = LoadOptions::from_config(&p.model);
    StableDiffusion::load(&source, &load_opts, device, dtype).with_context(|| format!("loading model {source}"))
}

/// Column names, subset size and seed of the dataset stage.
fn source_options(p: &Pipeline) -> data::SourceOptions {
    data::SourceOptions {
        image_column: p.dataset.image_column.clone(),
        caption_column: p.dataset.caption_column.clone(),
        max_samples: p.dataset.max_samples.map(|n| n as usize),
        seed: p.train.seed.unwrap_or(0),
    }
}

/// The trainable tensors of injected branches under their checkpoint names
/// (`<prefix>.<module>.lora_A.weight` / `lora_B`, PEFT's names as the reference saves them).
fn named_params(prefix: &str, loras: &[TrainableLora]) -> Vec<NamedVar> {
    loras
        .iter()
        .flat_map(|l| {
            [
                NamedVar { name: format!("{prefix}.{}.lora_A.weight", l.module), var: l.down.clone() },
                NamedVar { name: format!("{prefix}.{}.lora_B.weight", l.module), var: l.up.clone() },
            ]
        })
        .collect()
}

/// Adapts the data loader to the trainer's [`BatchSource`] (with its batch size).
struct LoaderSource(DataLoader, usize);

impl BatchSource for LoaderSource {
    fn num_examples(&self) -> usize {
        self.0.dataset().len()
    }

    fn batches<'a>(&'a self, epoch: usize, start_batch: usize) -> Box<dyn Iterator<Item = Result<TrainBatch>> + 'a> {
        let to_train = |b: data::Batch| TrainBatch { pixel_values: b.pixel_values, captions: b.captions };
        if start_batch == 0 {
            return Box::new(self.0.epoch(epoch).map(move |b| b.map(to_train)));
        }
        // Resuming mid-epoch: the same seeded order, from the first batch not yet consumed.
        let order = self.0.epoch_order(epoch);
        let chunks: Vec<Vec<usize>> = order.chunks(self.1.max(1)).skip(start_batch).map(<[usize]>::to_vec).collect();
        Box::new(chunks.into_iter().map(move |c| self.0.load_batch(epoch, &c).map(to_train)))
    }
}

fn progress_bar(total: usize, start: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} train [{bar:30}] {pos}/{len} {msg} {per_sec} ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_position(start as u64);
    bar
}

/// Run every stage of `loaded`. `stop` ends training cleanly (Ctrl-C, or an edit in watch mode).
pub fn run_pipeline(loaded: &LoadedPipeline, session: &mut Session, opts: &RunOptions, stop: Arc<AtomicBool>) -> Result<RunReport> {
    let started = Instant::now();
    let with_seed;
    let loaded = if loaded.pipeline.train.seed.is_none() {
        // As the reference without --seed: a fresh seed, logged so the run can be repeated.
        let mut l = loaded.clone();
        let seed: u64 = rand::random::<u32>() as u64;
        tracing::info!("train.seed is not set: using seed {seed} (add `seed = {seed}` to [train] to repeat this run)");
        l.pipeline.train.seed = Some(seed);
        with_seed = l;
        &with_seed
    } else {
        loaded
    };
    let p = &loaded.pipeline;
    let out_dir = p.output.dir.clone();
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating output directory {}", out_dir.display()))?;
    let fps = fingerprints(loaded);
    let mut lock = Lock::read(&out_dir)?;
    lock.pipeline = loaded.path.display().to_string();
    let mut report = RunReport::default();

    // model
    let device = select_device(p.train.device)?;
    let dtype = weight_dtype(p.train.precision, &device)?;
    let model_fp = fp(&fps, "model").to_string();
    if session.model.as_ref().map(|(f, _)| f != &model_fp).unwrap_or(true) || opts.force {
        session.model = Some((model_fp.clone(), load_model(p, &device, dtype)?));
    } else {
        tracing::info!("model: up to date (kept in memory)");
    }

    // dataset
    let data_fp = fp(&fps, "dataset").to_string();
    if session.dataset.as_ref().map(|(f, _, _)| f != &data_fp).unwrap_or(true) || opts.force {
        let spec = source_spec(p)?;
        let dataset = data::source::load_source(&spec, &source_options(p))?;
        let policy = match p.dataset.on_bad_image {
            cfg::OnBadImage::Error => data::OnBadImage::Error,
            cfg::OnBadImage::Skip => data::OnBadImage::Skip,
        };
        let (dataset, skipped) = data::decode::screen_dataset(dataset, &loader_options(p).decode, policy)?;
        tracing::info!("dataset: {} examples ({} skipped)", dataset.len(), skipped.len());
        session.dataset = Some((data_fp.clone(), Arc::new(dataset), skipped.len()));
    } else {
        tracing::info!("dataset: up to date (kept in memory)");
    }
    let (_, dataset, skipped) = session.dataset.as_ref().expect("dataset stage ran");
    report.examples = dataset.len();
    report.skipped_images = *skipped;

    let (_, sd) = session.model.as_mut().expect("model stage ran");
    // Remove adapters a previous run of this session attached.
    for l in sd.unet.linears_mut() {
        l.loras.clear();
    }
    for l in sd.text_encoder.linears_mut() {
        l.loras.clear();
    }

    let train_fp = fp(&fps, "train").to_string();
    let diffusers_path = out_dir.join(DIFFUSERS_FILE);
    if !opts.force && lock.is_fresh(&out_dir, "train", &train_fp) && diffusers_path.exists() {
        tracing::info!("train: up to date ({} unchanged); use --force to train again", diffusers_path.display());
        report.skipped_train = true;
    } else {
        let mut rng = <InitRng as rand::SeedableRng>::seed_from_u64(p.train.seed.unwrap_or(0));
        let unet_loras = inject(sd.unet.linears_mut(), &lora_spec(&p.adapter, &p.adapter.target_modules), &mut rng)
            .context("[adapter] target_modules")?;
        let te_loras: Vec<TrainableLora> = if p.adapter.text_encoder {
            inject(sd.text_encoder.linears_mut(), &lora_spec(&p.adapter, &p.adapter.text_encoder_target_modules), &mut rng)
                .context("[adapter] text_encoder_target_modules")?
        } else {
            Vec::new()
        };
        let mut params = named_params("unet", &unet_loras);
        params.extend(named_params("text_encoder", &te_loras));
        if p.train.precision == cfg::Precision::Fp16 {
            // The reference creates the LoRA weights in the base layer's dtype and only then
            // upcasts them (`cast_training_params`): the init is rounded to f16.
            for nv in &params {
                nv.var.set(&crate::train::precision::round_through(nv.var.as_tensor(), DType::F16)?)?;
            }
        }
        let n_params: usize = params.iter().map(|p| p.var.elem_count()).sum();
        tracing::info!("adapter: {} modules, {n_params} trainable parameters", unet_loras.len() + te_loras.len());
        let loader = DataLoader::new(dataset.clone(), loader_options(p))?;
        let mut settings = train_settings(loaded);
        // Measure progress on up to 32 examples with fixed noise, before and after training.
        settings.eval_batches = 32usize.div_ceil(settings.batch_size).min(loader.batches_per_epoch());
        if settings.resume_from_checkpoint.is_none() && lock.stages.get(PARTIAL).is_some_and(|r| r.fingerprint == train_fp) {
            tracing::info!("train: the last run with these settings was interrupted; resuming from its latest checkpoint");
            settings.resume_from_checkpoint = Some("latest".into());
        }
        let sd_ref: &StableDiffusion = sd;
        let mut trainer = Trainer::new(sd_ref, params, settings)?;
        trainer.stop = stop.clone();
        let bar: Option<indicatif::ProgressBar> = None;
        let mut bar = bar;
        let mut last_log = Instant::now();
        // Validation while training, as the reference: at the end of every `every_epochs`-th
        // epoch (epoch 0 included), and every `every_steps` updates when set.
        let plan = crate::train::lr::StepPlan::new(
            dataset.len(),
            p.train.batch_size as usize,
            p.train.gradient_accumulation_steps as usize,
            p.train.epochs as usize,
            p.train.max_steps.map(|n| n as usize),
        )?;
        let validate_at = |step: usize| -> bool {
            if p.validation.prompts.is_empty() {
                return false;
            }
            let by_steps = p.validation.every_steps.is_some_and(|n| n > 0 && step % n as usize == 0);
            let epoch_end = step % plan.updates_per_epoch == 0;
            let epoch = (step / plan.updates_per_epoch).saturating_sub(1);
            let by_epochs = epoch_end && p.validation.every_epochs > 0 && epoch % p.validation.every_epochs as usize == 0;
            (by_steps || by_epochs) && step < plan.max_train_steps
        };
        let mut on_update = |step: usize, total: usize, loss: f64, lr: f64| {
            if validate_at(step) {
                let dir = out_dir.join("validation").join(format!("step-{step}"));
                match validation_images(sd_ref, p, &dir, &device) {
                    Ok(files) => tracing::info!("validation: {} image(s) in {}", files.len(), dir.display()),
                    Err(e) => tracing::warn!("validation at step {step} failed: {e:#}"),
                }
            }
            let b = bar.get_or_insert_with(|| progress_bar(total, step.saturating_sub(1)));
            b.set_position(step as u64);
            b.set_message(format!("loss {loss:.4} lr {lr:.2e}"));
            if b.is_hidden() && (last_log.elapsed().as_secs_f64() > 10.0 || step == total || step == 1) {
                tracing::info!("step {step}/{total} loss {loss:.4} lr {lr:.2e}");
                last_log = Instant::now();
            }
        };
        let outcome = trainer.train(&LoaderSource(loader, p.train.batch_size as usize), Some(&mut on_update))?;
        if let Some(b) = &bar {
            b.finish_and_clear();
        }
        let weights = trained_weights(&unet_loras, &te_loras)?;
        let info = TrainingInfo {
            base_model_version: sd.single_file.as_ref().map_or("sd_v1", |r| r.family.base_model_version()).into(),
            model_name: model_source(p)?,
            rank: p.adapter.rank as usize,
            alpha: p.adapter.default_alpha(),
            learning_rate: p.train.learning_rate,
            max_train_steps: outcome.max_train_steps as u64,
            epochs: p.train.epochs,
            batch_size: p.train.batch_size as usize,
            resolution: p.preprocess.resolution as usize,
            seed: p.train.seed,
            num_train_images: dataset.len(),
            v_prediction: sd.single_file.as_ref().is_some_and(|r| r.prediction.kind == "v_prediction"),
            train_text_encoder: p.adapter.text_encoder,
            pipeline_toml: resolved_toml(loaded),
            training_started_at: None,
            training_finished_at: None,
        };
        write_lora_file(&weights, &diffusers_path, LoraFormat::Diffusers)?;
        report.files.push(diffusers_path.clone());
        if p.output.formats.contains(&cfg::OutputFormat::Kohya) {
            let kohya = out_dir.join(KOHYA_FILE);
            let mut w = weights.clone();
            w.metadata.extend(crate::adapters::format::training_metadata(&info));
            // A single-file model (and a separate VAE) are named and hashed as kohya does.
            w.metadata.extend(crate::adapters::kohya_hash::source_file_metadata(p.model.file.as_deref(), p.model.vae.as_deref())?);
            let bytes = crate::adapters::kohya_hash::with_sshs_hashes(&crate::adapters::format::serialize_lora(&w, LoraFormat::Kohya)?)?;
            crate::util::fs::write_atomic(&kohya, &bytes).with_context(|| format!("cannot write LoRA file {}", kohya.display()))?;
            report.files.push(kohya);
        }
        let interrupted = outcome.interrupted;
        report.train = Some(outcome);
        if interrupted {
            // Not complete: remember the fingerprint so the next run with the same settings resumes.
            lock.record(PARTIAL, &train_fp, vec![]);
            lock.write(&out_dir)?;
            report.seconds = started.elapsed().as_secs_f64();
            return Ok(report);
        }
        lock.stages.remove(PARTIAL);
        lock.record("train", &train_fp, vec![DIFFUSERS_FILE.into()]);
        let mut outputs = vec![DIFFUSERS_FILE.to_string()];
        if p.output.formats.contains(&cfg::OutputFormat::Kohya) {
            outputs.push(KOHYA_FILE.into());
        }
        lock.record("export", fp(&fps, "export"), outputs);
        lock.write(&out_dir)?;
    }

    // validation
    if !p.validation.prompts.is_empty() {
        let val_fp = fp(&fps, "validate");
        let dir_name = "validation";
        if !opts.force && report.skipped_train && lock.is_fresh(&out_dir, "validate", val_fp) {
            tracing::info!("validate: up to date");
        } else {
            if report.skipped_train {
                crate::adapters::lora::apply_lora_file(sd, &diffusers_path, 1.0)?;
            }
            let files = validation_images(sd, p, &out_dir.join(dir_name), &device)?;
            report.files.extend(files);
            lock.record("validate", val_fp, vec![dir_name.into()]);
            lock.write(&out_dir)?;
        }
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

fn validation_images(sd: &StableDiffusion, p: &Pipeline, dir: &Path, device: &Device) -> Result<Vec<PathBuf>> {
    let sampler = match p.validation.scheduler {
        cfg::ValidationScheduler::Model | cfg::ValidationScheduler::Pndm => SamplerKind::Pndm,
        cfg::ValidationScheduler::Ddim => SamplerKind::Ddim,
        cfg::ValidationScheduler::Euler => SamplerKind::Euler,
    };
    let res = p.preprocess.resolution as usize;
    let mut files = Vec::new();
    for (i, prompt) in p.validation.prompts.iter().enumerate() {
        let opts = GenerateOptions {
            prompt: prompt.clone(),
            negative_prompt: String::new(),
            sampler,
            steps: p.validation.steps as usize,
            guidance_scale: p.validation.guidance_scale,
            height: res,
            width: res,
            seed: p.train.seed.unwrap_or(0),
            progress: false,
        };
        tracing::info!("validate: {} image(s) for {prompt:?}", p.validation.num_images);
        let images = generate(sd, &opts, p.validation.num_images as usize, None, device)?;
        for (j, img) in images.iter().enumerate() {
            let path = dir.join(format!("prompt{i}-{j}.png"));
            save_png(&to_rgb8(img)?, &path)?;
            files.push(path);
        }
    }
    Ok(files)
}

/// What `lora bench` needs back.
pub struct BenchReport {
    /// When the first training step started (after model and data loading).
    pub train_started: Instant,
    pub device_is_cpu: bool,
    /// `cpu (2 threads)`, `cuda:0 (NVIDIA H200, 139.8 GiB)`.
    pub device: String,
    /// Peak device memory in use during training (GPU only), bytes above what was in use when
    /// training started (model weights already loaded are counted in `model_bytes`).
    pub peak_device_bytes: Option<u64>,
    /// Device memory in use after loading the model, before training (GPU only).
    pub model_bytes: Option<u64>,
}

/// Load the model and data of `loaded`, inject the adapter and train for `train.max_steps`
/// steps, calling `on_update` after each; nothing is exported. With `no_cache` the VAE and
/// text encoder run every step, as the reference does.
pub fn bench_pipeline(loaded: &LoadedPipeline, no_cache: bool, on_update: &mut dyn FnMut(usize, usize, f64, f64)) -> Result<BenchReport> {
    let p = &loaded.pipeline;
    let device = select_device(p.train.device)?;
    // The high-water mark starts before the model loads: peak_memory counts from zero use.
    crate::device::reset_peak(&device);
    let dtype = weight_dtype(p.train.precision, &device)?;
    let mut sd = load_model(p, &device, dtype)?;
    let dataset = data::source::load_source(&source_spec(p)?, &source_options(p))?;
    let mut rng = <InitRng as rand::SeedableRng>::seed_from_u64(p.train.seed.unwrap_or(0));
    let loras = inject(sd.unet.linears_mut(), &lora_spec(&p.adapter, &p.adapter.target_modules), &mut rng)?;
    let params = named_params("unet", &loras);
    let loader = DataLoader::new(Arc::new(dataset), loader_options(p))?;
    let mut settings = train_settings(loaded);
    settings.cache_encodings = !no_cache;
    settings.resume_from_checkpoint = None;
    settings.checkpointing_steps = None;
    settings.tensorboard_dir = None;
    let mut trainer = Trainer::new(&sd, params, settings)?;
    // Device memory: the peak during training includes the model (loaded before this point).
    let model_bytes = crate::device::peak_memory(&device);
    let sampler = crate::device::start_sampler(&device);
    let train_started = Instant::now();
    trainer.train(&LoaderSource(loader, p.train.batch_size as usize), Some(on_update))?;
    drop(sampler);
    let peak_device_bytes = crate::device::peak_memory(&device);
    Ok(BenchReport { train_started, device_is_cpu: device.is_cpu(), device: crate::device::describe(&device), peak_device_bytes, model_bytes })
}
