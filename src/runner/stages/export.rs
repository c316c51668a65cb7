//! The export stage: the trained weights in every form `output.formats` asks for (diffusers,
//! kohya with its metadata), named by `output.name`, in `output.save_precision`.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use candle_core::DType;

use crate::runner::lock::Fingerprint;
use crate::runner::plan::StageId;
use crate::runner::resolve::{diffusers_file, kohya_file, model_source, resolved_toml,};
use super::{Run, not_off, out, tidy, Ran, Stage, StageCtx};
use crate::adapters::kohya_meta::TrainingInfo;
use crate::adapters::weights::LoraFormat;
use crate::config::choice_name;
use crate::config::types as cfg;
use crate::layout::{TRAINED_EMA_FILE, TRAINED_FILE};
use crate::util::path::tidy_path;

/// Version of what export writes into the kohya header (model facts, ModelSpec, tag counts).
pub(super) const KOHYA_HEADER_VERSION: &str = "2";

pub(super) const EXPORT: Stage = Stage {
    id: StageId::Export,
    depends_on: &[StageId::Train],
    tracked: true,
    off: not_off,
    fingerprint: |p| {
        // The resolved formats (a changed default reruns export) and the kohya header's version
        // (bumped when what the header says changes; export is cheap to rerun).
        let formats: Vec<String> = p.pipeline().output.formats.iter().map(choice_name).collect();
        let mut f = Fingerprint::new("export");
        f.add("train", p.fingerprint(StageId::Train)).add("formats", &formats.join(",")).add("kohya_header", KOHYA_HEADER_VERSION);
        // The files' names and dtype (added only when set, so earlier locks stay valid).
        let out = &p.pipeline().output;
        if let Some(name) = &out.name {
            f.add("name", name);
        }
        if out.save_precision != cfg::SavePrecision::F32 {
            f.add("save_precision", &choice_name(&out.save_precision));
        }
        f.finish()
    },
    reads: |p| {
        let mut r = vec![tidy(p, TRAINED_FILE)];
        if p.pipeline().train.ema_decay.is_some() {
            r.push(tidy(p, TRAINED_EMA_FILE));
        }
        r
    },
    outputs: |p| {
        let ema = p.pipeline().train.ema_decay.is_some();
        let mut o = Vec::new();
        for f in &p.pipeline().output.formats {
            let (file, what) = match f {
                cfg::OutputFormat::Diffusers => (diffusers_file(p.pipeline()), "diffusers form, as the reference script writes it"),
                cfg::OutputFormat::Kohya => (kohya_file(p.pipeline()), "kohya form with training metadata (A1111, ComfyUI)"),
            };
            if ema {
                o.push(out(crate::layout::ema_name(&file), "the moving average of the weights (train.ema_decay), same form", true));
            }
            o.push(out(file, what, true));
        }
        o
    },
    describe: |p| {
        let names: Vec<String> = p.pipeline().output.formats.iter().map(choice_name).collect();
        format!("write the adapter ({})", names.join(", "))
    },
    run: Run::Plain(|ctx| {
        let details = ctx.lock.stages.get(StageId::Train.name()).map(|r| r.details.clone()).unwrap_or_default();
        export_files(ctx, &details)?;
        // Files an earlier export wrote that are no longer asked for.
        let wanted: Vec<String> = (EXPORT.outputs)(ctx.plan).into_iter().map(|o| o.path).collect();
        if let Some(old) = ctx.lock.stages.get(StageId::Export.name()) {
            for f in old.outputs.iter().filter(|f| !wanted.contains(f)) {
                let path = ctx.plan.out_dir.join(f);
                if path.is_file() {
                    tracing::info!("export: removing {} (output.formats or train.ema_decay no longer ask for it)", path.display());
                    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
                }
            }
        }
        Ok(Ran::done())
    }),
};

/// Write every format of `output.formats` from the train stage's file.
fn export_files(ctx: &mut StageCtx<'_>, train_details: &BTreeMap<String, serde_json::Value>) -> Result<()> {
    let p = ctx.plan.pipeline();
    let dir = &ctx.plan.out_dir;
    let save_dtype = match p.output.save_precision {
        cfg::SavePrecision::F32 => DType::F32,
        cfg::SavePrecision::Fp16 => DType::F16,
        cfg::SavePrecision::Bf16 => DType::BF16,
    };
    let kohya = if p.output.formats.contains(&cfg::OutputFormat::Kohya) { Some(kohya_header(ctx, train_details)?) } else { None };
    // The trained weights, and with `train.ema_decay` their moving average as `*_ema` files.
    let mut copies = vec![(TRAINED_FILE, false)];
    if p.train.ema_decay.is_some() {
        copies.push((TRAINED_EMA_FILE, true));
    }
    for (source, is_ema) in copies {
        // Never export weights that went NaN/inf (a diverged run): refused with the tensors named.
        let weights = crate::adapters::read::read_lora_file_for_use(&dir.join(source)).context("the train stage's result")?;
        let named = |file: String| if is_ema { crate::layout::ema_name(&file) } else { file };
        for f in &p.output.formats {
            match f {
                cfg::OutputFormat::Diffusers => {
                    let path = dir.join(named(diffusers_file(p)));
                    let bytes = crate::adapters::write::serialize_lora_as(&weights, LoraFormat::Diffusers, save_dtype)?;
                    crate::util::fs::write_atomic(&path, &bytes).with_context(|| format!("cannot write LoRA file {}", path.display()))?;
                    ctx.report.files.push(path);
                }
                cfg::OutputFormat::Kohya => {
                    let (metadata, ldm_names) = kohya.as_ref().expect("made when kohya is among the formats");
                    let mut w = match ldm_names {
                        Some(unet) => crate::adapters::ldm_names::to_ldm_unet_names(&weights, unet)?,
                        None => weights.clone(),
                    };
                    w.metadata = metadata.clone();
                    let bytes = crate::adapters::kohya_hash::with_sshs_hashes(&crate::adapters::write::serialize_lora_as(&w, LoraFormat::Kohya, save_dtype)?)?;
                    let path = dir.join(named(kohya_file(p)));
                    crate::util::fs::write_atomic(&path, &bytes).with_context(|| format!("cannot write LoRA file {}", path.display()))?;
                    ctx.report.files.push(path);
                }
            }
        }
    }
    Ok(())
}

/// The kohya header every kohya copy gets (training settings, model facts, hashes of a single-file
/// model, ModelSpec, tag counts) and, for SDXL, the UNet config its original-layout names come
/// from: worked out once per export, whatever the number of copies (`train.ema_decay`).
fn kohya_header(ctx: &StageCtx<'_>, train_details: &BTreeMap<String, serde_json::Value>) -> Result<(BTreeMap<String, String>, Option<crate::models::config::UNetConfig>)> {
    let p = ctx.plan.pipeline();
    let dir = &ctx.plan.out_dir;
    let count = |k: &str| train_details.get(k).and_then(serde_json::Value::as_u64);
    let facts = model_facts(p)?;
    let info = TrainingInfo {
        base_model_version: facts.base_model_version().into(),
        // kohya: a local model by its base name, a hub model by its id.
        model_name: match p.model.path.as_deref().or(p.model.file.as_deref()) {
            Some(local) => tidy_path(local).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            None => model_source(p)?,
        },
        rank: p.adapter.rank as usize,
        alpha: p.adapter.default_alpha(),
        learning_rate: p.train.learning_rate,
        max_train_steps: count("max_train_steps").or(p.train.max_steps).unwrap_or(0),
        // kohya's: the epochs the steps take, ceil(max_train_steps / updates per epoch).
        epochs: match (count("max_train_steps"), count("updates_per_epoch")) {
            (Some(steps), Some(per)) if per > 0 => steps.div_ceil(per),
            _ => p.train.epochs,
        },
        batch_size: p.train.batch_size as usize,
        resolution: count("resolution").map_or(p.preprocess.resolution.unwrap_or(512) as usize, |r| r as usize),
        seed: p.train.seed,
        num_train_images: count("examples").unwrap_or(0) as usize,
        prediction: facts.prediction,
        train_text_encoder: p.adapter.text_encoder,
        caption_dropout: p.dataset.caption_dropout,
        shuffle_tags: p.dataset.shuffle_tags,
        keep_tokens: p.dataset.keep_tokens as usize,
        optimizer: {
            let o = &p.optimizer;
            match o.kind {
                cfg::OptimizerKind::Adamw => format!(
                    "torch.optim.adamw.AdamW(weight_decay={},betas=({}, {}),eps={})",
                    o.weight_decay(),
                    o.beta1,
                    o.beta2(),
                    o.epsilon
                ),
                cfg::OptimizerKind::Lion => {
                    format!("lion_pytorch.lion_pytorch.Lion(weight_decay={},betas=({}, {}))", o.weight_decay(), o.beta1, o.beta2())
                }
                cfg::OptimizerKind::Adamw8bit => format!(
                    "bitsandbytes.optim.adamw.AdamW8bit(weight_decay={},betas=({}, {}),eps={})",
                    o.weight_decay(),
                    o.beta1,
                    o.beta2(),
                    o.epsilon
                ),
                cfg::OptimizerKind::Prodigy => format!(
                    "prodigyopt.prodigy.Prodigy(weight_decay={},betas=({}, {}),eps={},d_coef={},use_bias_correction={},safeguard_warmup={})",
                    o.weight_decay(),
                    o.beta1,
                    o.beta2(),
                    o.epsilon,
                    o.d_coef.unwrap_or(1.0),
                    py_bool(o.use_bias_correction.unwrap_or(false)),
                    py_bool(o.safeguard_warmup.unwrap_or(false))
                ),
                cfg::OptimizerKind::Adafactor => format!(
                    "transformers.optimization.Adafactor(scale_parameter={},relative_step=False,warmup_init=False,weight_decay={})",
                    py_bool(o.scale_parameter.unwrap_or(false)),
                    o.weight_decay()
                ),
            }
        },
        buckets: match (p.preprocess.buckets, train_details.get("bucket_info")) {
            (true, Some(layout)) => {
                let (min_reso, max_reso, _) = p.preprocess.bucket_bounds();
                Some(crate::adapters::kohya_meta::BucketMeta { min_reso, max_reso, no_upscale: p.preprocess.bucket_no_upscale, info: layout.clone() })
            }
            _ => None,
        },
        conv: p.adapter.conv_rank.map(|r| (r as usize, p.adapter.conv_alpha.unwrap_or(r as f64))),
        dora: p.adapter.use_dora,
        pipeline_toml: resolved_toml(&ctx.plan.loaded),
    };
    // kohya sd-scripts names SDXL UNet modules in the original layout
    // (`input_blocks.4.1.…`); both UIs load those for every module.
    let ldm_names = if facts.family == crate::vocab::Family::Sdxl { Some(model_unet_config(p)?) } else { None };
    let mut metadata = crate::adapters::kohya_meta::training_metadata(&info);
    // A single-file model (and a separate VAE) are named and hashed as kohya does.
    metadata.extend(crate::adapters::kohya_hash::source_file_metadata(p.model.file.as_deref(), p.model.vae.as_deref())?);
    // ModelSpec, dated when training wrote its weights (so a rerun of export alone
    // writes the same bytes).
    // kohya's `--output_name` (the folder's name when unset).
    let title = p.output.name.clone().unwrap_or_else(|| tidy_path(dir).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
    let trained_at = std::fs::metadata(dir.join(TRAINED_FILE))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let spec = crate::adapters::kohya_meta::SpecInfo { title: title.clone(), resolution: info.resolution, timestamp: trained_at };
    metadata.extend(crate::adapters::kohya_meta::modelspec_metadata(facts, &spec));
    metadata.insert("ss_output_name".into(), title);
    if let Some(tags) = train_details.get("tag_frequency") {
        metadata.insert("ss_tag_frequency".into(), tags.to_string());
    }
    Ok((metadata, ldm_names))
}

/// Python's spelling of a bool, as kohya's `ss_optimizer` prints its arguments.
fn py_bool(b: bool) -> &'static str {
    if b { "True" } else { "False" }
}

/// The UNet config of the pipeline's model (a diffusers folder: SDXL single files are not read).
fn model_unet_config(p: &cfg::Pipeline) -> Result<crate::models::config::UNetConfig> {
    let source = model_source(p)?;
    let dir = crate::models::loading::resolve_model_dir(&source, &crate::models::loading::LoadOptions::from_config(&p.model))
        .with_context(|| format!("finding the UNet config of {source} for the kohya names"))?;
    crate::models::config::UNetConfig::from_json_file(dir.join("unet/config.json"))
}

/// The base model's generation and prediction type for the kohya header, from its configs (a
/// single file's header, or a diffusers folder's config files); `train.prediction_type`, the
/// target actually trained, wins over the model's.
fn model_facts(p: &cfg::Pipeline) -> Result<crate::adapters::kohya_meta::ModelFacts> {
    let mut facts = match crate::models::single_file::recognise_config(&p.model) {
        Some(r) => {
            let r = r?;
            crate::adapters::kohya_meta::ModelFacts { family: r.family, prediction: r.prediction.kind }
        }
        None => {
            let source = model_source(p)?;
            let dir = crate::models::loading::resolve_model_dir(&source, &crate::models::loading::LoadOptions::from_config(&p.model))
                .with_context(|| format!("finding the configs of {source} for the kohya header"))?;
            crate::adapters::kohya_meta::facts_from_folder(&dir).with_context(|| format!("the configs of {source}, for the kohya header"))?
        }
    };
    if let Some(t) = p.train.prediction_type {
        facts.prediction = t;
    }
    Ok(facts)
}
