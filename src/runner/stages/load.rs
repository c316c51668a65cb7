//! The loading stages: model (the diffusion stack on the chosen device and dtype, kept in the
//! session between runs), dataset (read and screened) and preprocess (the seeded loader).

use std::sync::Arc;

use anyhow::{Context, Result};

use crate::runner::lock::Fingerprint;
use crate::runner::plan::StageId;
use crate::runner::resolve::{load_dataset, load_model, loader_options, model_loader_options, resolution_text, select_device, weight_dtype};
use super::{LoadedModel, Run, no_outputs, not_off, nothing, Ran, Stage, StageCtx};
use crate::config::choice_name;
use crate::config::types as cfg;
use crate::data::{self, DataLoader};
use crate::util::path::tidy_path;

pub(super) const MODEL: Stage = Stage {
    id: StageId::Model,
    depends_on: &[],
    tracked: false,
    off: not_off,
    fingerprint: |p| {
        let mut f = Fingerprint::new("model");
        f.add_toml("model", p.table("model"));
        let m = &p.pipeline().model;
        for path in [&m.path, &m.file, &m.vae, &m.config].into_iter().flatten() {
            f.add_files("files", path);
        }
        f.finish()
    },
    reads: |p| {
        let m = &p.pipeline().model;
        vec![match (&m.id, &m.path) {
            (Some(id), _) => format!("hub model {id}{}", m.revision.as_ref().map(|r| format!(" @ {r}")).unwrap_or_default()),
            (None, Some(path)) => format!("{} (diffusers folder)", tidy_path(path).display()),
            _ => String::new(),
        }]
    },
    outputs: no_outputs,
    describe: |p| {
        let variant = p.pipeline().model.variant.as_ref().map(|v| format!(", variant {v}")).unwrap_or_default();
        format!("load tokenizer, text encoder, UNet, VAE and noise scheduler{variant}")
    },
    run: Run::Plain(run_model),
};

fn run_model(ctx: &mut StageCtx<'_>) -> Result<Ran> {
    let p = ctx.plan.pipeline();
    let device = select_device(p.train.device)?;
    crate::device::allow_tf32(&device, p.train.allow_tf32);
    let dtype = weight_dtype(p.train.precision, &device)?;
    let fp = ctx.plan.fingerprint(StageId::Model);
    let kept = ctx.session.model.take().filter(|m| !ctx.opts.force && m.fingerprint == fp);
    let mut model = match kept {
        Some(m) => {
            tracing::info!("model: kept in memory");
            m
        }
        // (An earlier model of the session is dropped before this one loads.)
        None => LoadedModel { fingerprint: fp.to_string(), sd: load_model(p, &device, dtype)?, device: device.clone() },
    };
    // Remove adapters a previous run of this session attached.
    model.sd.unet.clear_loras();
    model.sd.text.all_linears_mut().into_iter().for_each(|l| l.loras.clear());
    model.device = device;
    ctx.session.model = Some(model);
    Ok(Ran::done())
}

// ---------------------------------------------------------------------------------------------
// dataset

pub(super) const DATASET: Stage = Stage {
    id: StageId::Dataset,
    depends_on: &[],
    tracked: false,
    off: not_off,
    fingerprint: |p| {
        let mut f = Fingerprint::new("dataset");
        f.add_toml("dataset", p.table("dataset"));
        for (_, source) in p.pipeline().dataset.all_sources() {
            if let Some(path) = &source.path {
                f.add_files("files", path);
            }
        }
        // The subset drawn with max_samples depends on the seed.
        if p.pipeline().dataset.max_samples.is_some() {
            f.add("seed", &format!("{:?}", p.pipeline().train.seed));
        }
        f.finish()
    },
    reads: |p| {
        let d = &p.pipeline().dataset;
        vec![match (&d.name, &d.path) {
            (Some(name), _) => format!("hub dataset {name}"),
            (None, Some(path)) => tidy_path(path).display().to_string(),
            _ => String::new(),
        }]
    },
    outputs: no_outputs,
    describe: |p| {
        let d = &p.pipeline().dataset;
        format!("read images ({}) and captions ({}), screen out bad images ({})", d.image_column, d.caption_column, choice_name(&d.on_bad_image))
    },
    run: Run::Plain(run_dataset),
};

fn run_dataset(ctx: &mut StageCtx<'_>) -> Result<Ran> {
    let p = ctx.plan.pipeline();
    let fp = ctx.plan.fingerprint(StageId::Dataset);
    if !ctx.opts.force && ctx.session.dataset.as_ref().is_some_and(|(f, _, _)| f == fp) {
        tracing::info!("dataset: kept in memory");
    } else {
        let dataset = load_dataset(p)?;
        let policy = match p.dataset.on_bad_image {
            cfg::OnBadImage::Error => data::OnBadImage::Error,
            cfg::OnBadImage::Skip => data::OnBadImage::Skip,
        };
        let (dataset, skipped) = data::decode::screen_dataset(dataset, &loader_options(p, None, 0).decode, policy)?;
        tracing::info!("dataset: {} examples ({} skipped)", dataset.len(), skipped.len());
        ctx.session.dataset = Some((fp.to_string(), Arc::new(dataset), skipped.len()));
    }
    let (_, dataset, skipped) = ctx.session.dataset.as_ref().expect("just loaded");
    ctx.report.examples = dataset.len();
    ctx.report.skipped_images = *skipped;
    Ok(Ran::done())
}

// ---------------------------------------------------------------------------------------------
// preprocess

pub(super) const PREPROCESS: Stage = Stage {
    id: StageId::Preprocess,
    depends_on: &[StageId::Dataset],
    tracked: false,
    off: not_off,
    fingerprint: |p| Fingerprint::new("preprocess").add("dataset", p.fingerprint(StageId::Dataset)).add_toml("preprocess", p.table("preprocess")).finish(),
    reads: nothing,
    outputs: no_outputs,
    describe: |p| {
        let pre = &p.pipeline().preprocess;
        let crop = match pre.crop() {
            cfg::Crop::Center => "center crop",
            cfg::Crop::Random => "random crop",
        };
        let flip = if pre.random_flip { ", random flip" } else { "" };
        if pre.buckets {
            let (min, max, step) = pre.bucket_bounds();
            let upscale = if pre.bucket_no_upscale { ", never enlarging" } else { "" };
            return format!(
                "aspect-ratio buckets of about {}² pixels ({min} to {max} px in steps of {step}{upscale}), resize to cover, {crop}{flip}, normalise to [-1, 1]; {}",
                resolution_text(p.pipeline()),
                bucket_layout(p.pipeline())
            );
        }
        format!("resize to {} ({}), {crop}{flip}, normalise to [-1, 1] (per batch, as training reads it)", resolution_text(p.pipeline()), choice_name(&pre.interpolation))
    },
    run: Run::Plain(|ctx| {
        let (_, dataset, _) = ctx.session.dataset.as_ref().context("the dataset stage runs before preprocess")?;
        // The model stage has loaded the model (preprocess runs for stages that need both).
        let model = ctx.session.model.as_ref().context("the model stage runs before preprocess")?;
        let opts = model_loader_options(ctx.plan.pipeline(), &model.sd);
        let p = ctx.plan.pipeline();
        if p.preprocess.buckets {
            check_buckets(&p.preprocess, opts.preprocess.resolution, model.sd.pixel_multiple())?;
        }
        if p.validation.loss_split > 0.0 {
            let (train, held) = data::holdout::split(dataset, p.validation.loss_split, p.train.seed.unwrap_or(0))?;
            tracing::info!("dataset: {} examples held out for the validation loss, {} to train on", held.len(), train.len());
            // The held-out loss is measured as the training loss is, with fixed draws. Repeats
            // apply after the split: no copy of a held-out image is trained on.
            ctx.heldout = Some(DataLoader::new(Arc::new(held), opts.clone())?);
            ctx.loader = Some(DataLoader::new(Arc::new(train.repeated()), opts)?);
        } else {
            ctx.heldout = None;
            let dataset = if dataset.groups.iter().any(|g| g.repeats > 1) { Arc::new(dataset.repeated()) } else { dataset.clone() };
            ctx.loader = Some(DataLoader::new(dataset, opts)?);
        }
        if let Some(b) = ctx.loader.as_ref().and_then(DataLoader::buckets) {
            tracing::info!("buckets (kohya's, mean aspect-ratio error {:.4}):\n  {}", b.mean_ar_error, b.layout_lines().join("\n  "));
        }
        Ok(Ran::done())
    }),
};

/// The bucket layout `plan` shows: a local dataset's image headers read and bucketed as the
/// preprocess stage will (after `max_samples` and the held-out split; before bad images are
/// screened out).
fn bucket_layout(p: &cfg::Pipeline) -> String {
    let Some(resolution) = p.preprocess.resolution else {
        return "the layout is known once the model's resolution is (set preprocess.resolution to see it here)".into();
    };
    if p.dataset.kind == cfg::DatasetKind::Hub {
        return "the layout is known once the hub dataset is read".into();
    }
    let layout = || -> Result<String> {
        let dataset = load_dataset(p)?;
        let dataset = if p.validation.loss_split > 0.0 { data::holdout::split(&dataset, p.validation.loss_split, p.train.seed.unwrap_or(0))?.0 } else { dataset };
        let dataset = dataset.repeated();
        let loader = DataLoader::new(Arc::new(dataset), loader_options(p, None, resolution))?;
        let b = loader.buckets().context("buckets are on")?;
        Ok(format!("{} batches an epoch: {}", loader.batches_per_epoch(), b.layout_lines().join(", ")))
    };
    layout().unwrap_or_else(|e| format!("the layout could not be read yet ({e:#})"))
}

/// The bucket bounds against the resolved resolution (validation checks them when the pipeline
/// sets it) and the model's size multiple (a bucket side the UNet cannot halve enough times would
/// fail in its first step).
fn check_buckets(pre: &cfg::PreprocessConfig, resolution: u32, multiple: u32) -> Result<()> {
    if let Some((key, msg)) = pre.bucket_bounds_error(resolution) {
        anyhow::bail!("{msg} (the resolution is the model's default; set `{key}` or `preprocess.resolution`)");
    }
    let (min, max, step) = pre.bucket_bounds();
    for (key, v) in [("preprocess.bucket_reso_steps", step), ("preprocess.min_bucket_reso", min), ("preprocess.max_bucket_reso", max)] {
        anyhow::ensure!(
            v % multiple == 0,
            "`{key}` = {v} is not a multiple of {multiple}: this model's VAE and UNet halve an image's sides that many times (e.g. {})",
            v.div_ceil(multiple) * multiple
        );
    }
    Ok(())
}
