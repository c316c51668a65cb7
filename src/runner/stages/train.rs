//! The train stage: resume, start over (setting earlier results aside) or refuse, as `resume`
//! decided; inject LoRA, train with checkpoints, validation and plots while it goes, and write the
//! trained weights only when training finished.

use std::collections::BTreeMap;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device};

use crate::runner::lock::Fingerprint;
use crate::runner::plan::{Plan, StageId};
use crate::runner::resolve::{lora_spec, named_params, train_settings, LoaderSource,};
use super::encode::{caches_latents, caches_text, encode_cache};
use super::validate::publish_validation;
use super::{LoadedModel, Run, not_off, out, progress_bar, tidy, Output, Ran, Refused, Stage, StageCtx};
use crate::adapters::lora::{inject, inject_layers, trained_weights, InitRng, TrainableLora};
use crate::adapters::weights::LoraFormat;
use crate::adapters::write::write_lora_file;
use crate::config::choice_name;
use crate::config::types as cfg;
use crate::data::DataLoader;
use crate::data;
use crate::inference::validation::validation_images;
use crate::layout::{IN_PROGRESS, METRICS_FILE, TRAINED_EMA_FILE, TRAINED_FILE};
use crate::models::StableDiffusion;
use crate::report::plot::LOSS_PLOT;
use crate::train::trainer::Trainer;
use crate::util::path::tidy_path;

pub(super) const TRAIN: Stage = Stage {
    id: StageId::Train,
    depends_on: &[StageId::Model, StageId::Preprocess],
    tracked: true,
    off: not_off,
    fingerprint: |p| {
        let mut f = Fingerprint::new("train");
        f.add("model", p.fingerprint(StageId::Model))
            .add("preprocess", p.fingerprint(StageId::Preprocess))
            .add_toml("adapter", p.table("adapter"))
            .add_toml("optimizer", p.table("optimizer"))
            .add_toml("train", p.table("train"));
        // The held-out split decides which examples train (only when set, so that pipelines
        // without one keep their fingerprints).
        let split = p.pipeline().validation.loss_split;
        if split > 0.0 {
            f.add("validation.loss_split", &split.to_string());
        }
        // Several ranks train another global batch (only then, so one process keeps its
        // fingerprint).
        if p.world > 1 {
            f.add("world size", &p.world.to_string());
        }
        f.finish()
    },
    reads: |p| {
        let mut r = vec![format!("{} (resumes an interrupted run from its newest checkpoint that loads)", tidy(p, "checkpoint-<step>"))];
        if let Some(resume) = &p.pipeline().checkpoints.resume {
            r.push(format!("{} (checkpoints.resume = {resume:?})", tidy_path(&p.out_dir).display()));
        }
        r
    },
    outputs: train_outputs,
    describe: |p| {
        let pl = p.pipeline();
        let steps = match pl.train.max_steps {
            Some(n) => format!("{n} steps"),
            None => format!("{} epochs", pl.train.epochs),
        };
        let ranks = if p.world > 1 {
            format!(
                "; {} ranks: batch {} per rank, {} in all, rank 0 writes every file (the others only read its checkpoints and cache)",
                p.world,
                pl.train.batch_size,
                pl.train.batch_size as usize * p.world
            )
        } else {
            String::new()
        };
        format!(
            "LoRA rank {} on {}{}; {steps}, batch {} x {}, lr {} ({}){ranks}",
            pl.adapter.rank,
            pl.adapter.target_modules.join(", "),
            if pl.adapter.text_encoder { " and the text encoder" } else { "" },
            pl.train.batch_size,
            pl.train.gradient_accumulation_steps,
            pl.train.learning_rate,
            choice_name(&pl.train.lr_scheduler)
        )
    },
    run: Run::ModelAndData(run_train),
};

/// The steps at which checkpoints remain after pruning, when the step count is known.
fn kept_checkpoints(p: &Plan) -> Option<Vec<usize>> {
    let every = p.pipeline().checkpoints.every_steps as usize;
    let max = p.known_max_steps()?;
    if every == 0 {
        return Some(Vec::new());
    }
    let all: Vec<usize> = (1..=max / every).map(|k| k * every).collect();
    let keep = p.pipeline().checkpoints.total_limit.map_or(all.len(), |n| n as usize);
    Some(all[all.len().saturating_sub(keep)..].to_vec())
}

fn train_outputs(p: &Plan) -> Vec<Output> {
    let pl = p.pipeline();
    let mut o = vec![
        out(TRAINED_FILE, "the trained weights (PEFT names), read by export", true),
        out(METRICS_FILE, "loss, lr and grad norm per step", true),
    ];
    match kept_checkpoints(p) {
        Some(steps) => o.extend(steps.into_iter().map(|s| out(format!("checkpoint-{s}"), "checkpoint (weights, optimizer, state)", false))),
        None if pl.checkpoints.every_steps > 0 => o.push(out(
            "checkpoint-<step>",
            format!(
                "checkpoint every {} steps{}",
                pl.checkpoints.every_steps,
                pl.checkpoints.total_limit.map(|l| format!(", keeping {l}")).unwrap_or_default()
            ),
            false,
        )),
        None => {}
    }
    if pl.logging.report_to == cfg::ReportTo::Tensorboard {
        let dir = pl.logging.dir.display().to_string();
        o.push(out(format!("{dir}/events.out.tfevents.<...>"), "TensorBoard events (train_loss, lr, grad_norm)", false));
    }
    if !pl.validation.prompts.is_empty() {
        o.push(out("validation/step-<step>/<...>.png", "validation images while training, and their grid (grid.png)", false));
    }
    o.push(out(LOSS_PLOT, "loss (raw and smoothed) and learning rate per step, redrawn as training goes", false));
    o
}

/// With the encode cache serving the captions (`text`) and the latents (`vae`), move the text
/// encoder and the VAE's encoder half off a GPU, so that training holds only the UNet and the
/// VAE decoder there (validation prompts are then encoded on the CPU). Nothing moves on the CPU.
pub(crate) fn park_cached_encoders(sd: &mut StableDiffusion, text: bool, vae: bool, device: &Device) -> Result<()> {
    if device.is_cpu() || !(text || vae) {
        return Ok(());
    }
    let bytes = sd.park_encoders(text, vae)?;
    let what = match (text, vae) {
        (true, true) => "the text encoder and the VAE encoder",
        (true, false) => "the text encoder",
        _ => "the VAE encoder",
    };
    tracing::info!("train: {what} moved to host memory ({:.0} MiB; the encode cache serves them)", bytes as f64 / (1 << 20) as f64);
    Ok(())
}

fn run_train(ctx: &mut StageCtx<'_>, model: &mut LoadedModel, loader: &DataLoader) -> Result<Ran> {
    let plan = ctx.plan;
    let p = plan.pipeline();
    let out_dir = plan.out_dir.clone();
    let snapshot = crate::runner::resume::settings_snapshot(plan);
    let mut settings = train_settings(&plan.loaded);
    settings.train_fingerprint = Some(plan.fingerprint(StageId::Train).to_string());
    if plan.no_cache {
        settings.cache_encodings = false;
    }
    // A rank other than 0 writes nothing: it trains its share, loading what rank 0 resumes from.
    let follower = ctx.opts.dist.as_ref().is_some_and(|c| !c.is_main());
    // What `plan` said (the one decision): resume, start over with earlier results set aside,
    // or the user's own `checkpoints.resume`.
    match ctx.start.clone() {
        _ if follower => {}
        Some(crate::runner::resume::Start::Explicit(_)) => {}
        Some(crate::runner::resume::Start::Resume { newest, warnings, .. }) => {
            tracing::info!("train: resuming the interrupted run from {} (or the newest checkpoint before it that loads)", tidy_path(&newest).display());
            for w in &warnings {
                tracing::warn!("train: resuming with a changed setting: {w}");
            }
            settings.resume_from_checkpoint = Some("latest".into());
        }
        Some(crate::runner::resume::Start::Fresh { why, aside }) => {
            settings.resume_from_checkpoint = None;
            if let Some(a) = aside {
                if !a.changed.is_empty() {
                    tracing::info!("train: starting over ({why}): {}", a.changed.join(", "));
                }
                crate::runner::resume::carry_out(&out_dir, &a)?;
                tracing::info!("train: {}", a.summary());
                ctx.report.set_aside = Some(out_dir.join(&a.dir));
            }
        }
        Some(crate::runner::resume::Start::Refused(why)) => return Err(Refused(why).into()),
        None => anyhow::bail!("the train stage runs only as decided by the stage table"),
    }
    // Mark the stage in progress before the first step, so any crash resumes.
    if !follower {
        ctx.lock.stages.remove(StageId::Train.name());
        ctx.lock.record_with(IN_PROGRESS, plan.fingerprint(StageId::Train), vec![], snapshot.clone());
        ctx.lock.write(&out_dir)?;
    }

    let device = model.device.clone();
    let loader = loader.clone();
    let n_examples = loader.dataset().len();
    let bucket_info = loader.buckets().map(|b| b.kohya_info());
    ctx.report.resolution = Some(crate::runner::resolve::resolution(p, &model.sd));
    // For the kohya header (`ss_tag_frequency`), kept in the lock so export can rerun alone.
    let tag_frequency = {
        // Per source (its folder name), each image once whatever its repeats.
        let examples = &loader.dataset().examples;
        let groups = &loader.dataset().groups;
        let mut seen = std::collections::HashSet::new();
        let mut by_group: Vec<Vec<&str>> = vec![Vec::new(); groups.len().max(1)];
        for e in examples.iter().filter(|e| seen.insert(e.origin.as_str())) {
            let captions = match &e.caption {
                data::Caption::One(c) => vec![c.as_str()],
                data::Caption::Choices(list) => list.iter().map(String::as_str).collect(),
            };
            let last = by_group.len() - 1;
            by_group[e.group.min(last)].extend(captions);
        }
        let mut all = serde_json::Map::new();
        for (i, captions) in by_group.into_iter().enumerate() {
            let name = groups.get(i).map_or_else(|| crate::runner::resolve::source_name(&p.dataset.all_sources()[0].1), |g| g.name.clone());
            if let serde_json::Value::Object(m) = crate::adapters::kohya_meta::tag_frequency(&name, captions) {
                all.extend(m);
            }
        }
        serde_json::Value::Object(all)
    };
    let sd = &mut model.sd;
    // Encoders parked by an earlier run of this session come back before anything trains.
    sd.unpark_encoders(&device)?;
    let mut rng = <InitRng as rand::SeedableRng>::seed_from_u64(p.train.seed.unwrap_or(0));
    // `rank_pattern` / `alpha_pattern` are one table for both parts (as PEFT's per-model
    // configs would be two): each part gets the keys that match one of its targeted modules, and
    // a key that matches in neither is an error.
    let mut unet_spec = lora_spec(&p.adapter, &p.adapter.target_modules);
    let (unet_names, conv_names): (Vec<String>, Vec<String>) = {
        let (lin, conv) = sd.unet.layers_mut();
        (lin.iter().map(|l| l.name.clone()).collect(), conv.iter().map(|c| c.name.clone()).collect())
    };
    let offered = if unet_spec.conv.is_some() { conv_names.as_slice() } else { &[] };
    let mut used = crate::adapters::lora::keep_patterns_for(&mut unet_spec, unet_names.iter().map(String::as_str), offered.iter().map(String::as_str))?;
    let unet_loras = {
        let (lin, conv) = sd.unet.layers_mut();
        inject_layers(lin, conv, &unet_spec, &mut rng).context("[adapter] target_modules / conv_rank")?
    };
    // Every text encoder of the model gets the same targets (SDXL: both, as the reference).
    let mut te_loras: Vec<Vec<TrainableLora>> = Vec::new();
    if p.adapter.text_encoder {
        for linears in sd.text.linears_mut() {
            let mut te_spec = lora_spec(&p.adapter, &p.adapter.text_encoder_target_modules);
            te_spec.conv = None;
            let te_names: Vec<String> = linears.iter().map(|l| l.name.clone()).collect();
            used.extend(crate::adapters::lora::keep_patterns_for(&mut te_spec, te_names.iter().map(String::as_str), std::iter::empty())?);
            te_loras.push(inject(linears, &te_spec, &mut rng).context("[adapter] text_encoder_target_modules")?);
        }
    }
    if let Some(unused) = p.adapter.rank_pattern.keys().chain(p.adapter.alpha_pattern.keys()).find(|k| !used.contains(*k)) {
        anyhow::bail!("[adapter] pattern key `{unused}` matches no targeted module of the UNet{}", if p.adapter.text_encoder { " or the text encoder" } else { "" });
    }
    let mut params = named_params("unet", &unet_loras);
    for (i, loras) in te_loras.iter().enumerate() {
        params.extend(named_params(if i == 0 { "text_encoder" } else { "text_encoder_2" }, loras));
    }
    if p.train.precision == cfg::Precision::Fp16 {
        // The reference creates the LoRA weights in the base layer's dtype and only then upcasts
        // them (`cast_training_params`): the init is rounded to f16.
        for nv in &params {
            nv.var.set(&crate::train::precision::round_through(nv.var.as_tensor(), DType::F16)?)?;
        }
    }
    let n_params: usize = params.iter().map(|p| p.var.elem_count()).sum();
    tracing::info!("adapter: {} modules, {n_params} trainable parameters", unet_loras.len() + te_loras.iter().map(Vec::len).sum::<usize>());
    // Measure progress on up to 32 examples with fixed noise, before and after training.
    settings.eval_batches = 32usize.div_ceil(settings.batch_size).min(loader.batches_per_epoch());
    if !plan.no_cache {
        park_cached_encoders(sd, caches_text(plan), caches_latents(plan), &device)?;
    }
    let sd_ref: &StableDiffusion = sd;
    if let Some(c) = &ctx.opts.dist {
        tracing::info!(
            "train: rank {} of {}: batch {} per rank, {} in all (x {} accumulation)",
            c.rank(),
            c.size(),
            settings.batch_size,
            settings.batch_size * c.size(),
            settings.gradient_accumulation_steps
        );
    }
    let mut trainer = Trainer::new(sd_ref, params, settings)?;
    trainer.comm = ctx.opts.dist.clone();
    trainer.stop = ctx.stop.clone();
    trainer.unused_params = unused_text_params(&sd_ref.text, &te_loras);
    if let Some(held) = ctx.heldout.clone() {
        trainer.heldout = Some(Box::new(LoaderSource(held)));
    }
    let cache = (!plan.no_cache).then(|| encode_cache(plan));
    if let Some(cache) = &cache {
        trainer.latent_cache_disk = caches_latents(plan).then(|| cache.clone());
        trainer.text_cache_disk = caches_text(plan).then(|| cache.clone());
    }
    let mut bar: Option<indicatif::ProgressBar> = None;
    let mut last_log = Instant::now();
    // Validation while training, as the reference: at the end of every `every_epochs`-th epoch
    // (epoch 0 included), and every `every_steps` updates when set.
    let steps = crate::train::lr::StepPlan::from_batches(
        loader.batches_per_epoch(),
        p.train.gradient_accumulation_steps as usize,
        p.train.epochs as usize,
        p.train.max_steps.map(|n| n as usize),
    )?;
    let validate_at = |step: usize| -> bool {
        if p.validation.prompts.is_empty() || follower {
            return false;
        }
        let by_steps = p.validation.every_steps.is_some_and(|n| n > 0 && step % n as usize == 0);
        let epoch_end = step % steps.updates_per_epoch == 0;
        let epoch = (step / steps.updates_per_epoch).saturating_sub(1);
        let by_epochs = epoch_end && p.validation.every_epochs > 0 && epoch % p.validation.every_epochs as usize == 0;
        (by_steps || by_epochs) && step < steps.max_train_steps
    };
    let checkpoint_due = |step: usize| !follower && p.checkpoints.every_steps > 0 && step % p.checkpoints.every_steps as usize == 0;
    let mut last_plot = Instant::now();
    let mut rate = crate::report::metrics::StepRate::new();
    let mut side = std::time::Duration::ZERO;
    let mut observer = ctx.observer.take();
    if let Some(o) = observer.as_deref_mut() {
        o.starting(&device);
    }
    let mut on_update = |step: usize, total: usize, loss: f64, lr: f64| {
        if let Some(o) = observer.as_deref_mut() {
            o.update(step, total, loss, lr);
        }
        rate.update(step);
        let paused = Instant::now();
        if validate_at(step) {
            let dir = out_dir.join("validation").join(format!("step-{step}"));
            match validation_images(sd_ref, p, &dir, &device).and_then(|files| publish_validation(plan, &files, &dir, step as u64).map(|_| files)) {
                Ok(files) => tracing::info!("validation: {} image(s) and their grid in {}", files.len(), dir.display()),
                Err(e) => tracing::warn!("validation at step {step} failed: {e:#}"),
            }
        }
        if !follower && (validate_at(step) || checkpoint_due(step) || last_plot.elapsed().as_secs() >= 30) {
            crate::report::plot::refresh(&out_dir.join(METRICS_FILE), &out_dir.join(LOSS_PLOT));
            last_plot = Instant::now();
        }
        let spent = paused.elapsed();
        rate.pause(spent);
        side += spent;
        if follower {
            // Rank 0 shows the progress; the others log now and then.
            if last_log.elapsed().as_secs_f64() > 30.0 || step == total {
                tracing::info!("step {step}/{total} loss {loss:.4} (mean over the ranks)");
                last_log = Instant::now();
            }
            return;
        }
        let b = bar.get_or_insert_with(|| progress_bar(total, step.saturating_sub(1)));
        b.set_position(step as u64);
        b.set_message(format!("loss {loss:.4} lr {lr:.2e}"));
        if b.is_hidden() && (last_log.elapsed().as_secs_f64() > 10.0 || step == total || step == 1) {
            tracing::info!("step {step}/{total} loss {loss:.4} lr {lr:.2e}");
            last_log = Instant::now();
        }
    };
    let training = crate::util::interrupt::training();
    let outcome = trainer.train(&LoaderSource(loader), Some(&mut on_update))?;
    drop(training);
    if let Some(o) = observer.as_deref_mut() {
        o.finished(&device);
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let ema = trainer.optimizer.ema_weights();
    ctx.report.optimizer_state_bytes = Some(trainer.optimizer.state_bytes());
    drop(trainer);
    if follower {
        let interrupted = outcome.interrupted;
        ctx.report.stopped |= interrupted;
        ctx.report.train = Some(outcome);
        return Ok(Ran { complete: !interrupted, details: BTreeMap::new() });
    }
    crate::report::plot::refresh(&out_dir.join(METRICS_FILE), &out_dir.join(LOSS_PLOT));
    ctx.report.train_rate = rate.per_second();
    ctx.report.side_seconds = side.as_secs_f64();
    ctx.report.eval_loss = crate::report::metrics::eval_span(&crate::report::metrics::read_evals(&out_dir.join(METRICS_FILE))?);
    ctx.report.heldout_loss = crate::report::metrics::eval_span(&crate::report::metrics::read_heldout(&out_dir.join(METRICS_FILE))?);
    ctx.report.loss_trend = crate::report::metrics::loss_trend(&crate::report::metrics::read_steps(&out_dir.join(METRICS_FILE))?);
    if let Some(cache) = &cache {
        let load = |a: &std::sync::atomic::AtomicUsize| a.load(std::sync::atomic::Ordering::Relaxed);
        tracing::info!(
            "train: encode cache {}: {} served, {} encoded and stored, {} damaged entries rebuilt",
            tidy_path(cache.dir()).display(),
            load(&cache.hits),
            load(&cache.misses),
            load(&cache.rebuilt)
        );
    }
    let interrupted = outcome.interrupted;
    ctx.report.stopped |= interrupted;
    ctx.report.train = Some(outcome);
    if interrupted {
        // Not complete: the checkpoint just saved is all this run leaves; the in-progress mark
        // stays so the next run resumes. The train stage's file and the exported adapters of an
        // earlier finished run stay as they were.
        return Ok(Ran { complete: false, details: BTreeMap::new() });
    }
    let te_refs: Vec<&[TrainableLora]> = te_loras.iter().map(Vec::as_slice).collect();
    let weights = trained_weights(&unet_loras, &te_refs)?;
    // The moving average first: a run that writes TRAINED_FILE has written its EMA copy too.
    match &ema {
        Some(ema) => write_lora_file(&ema_lora_weights(&weights, ema)?, &out_dir.join(TRAINED_EMA_FILE), LoraFormat::Peft)?,
        None => {
            let stale = out_dir.join(TRAINED_EMA_FILE);
            if stale.is_file() {
                std::fs::remove_file(&stale).with_context(|| format!("removing {} (train.ema_decay is unset now)", stale.display()))?;
            }
        }
    }
    write_lora_file(&weights, &out_dir.join(TRAINED_FILE), LoraFormat::Peft)?;
    let mut details = BTreeMap::new();
    details.insert("examples".to_string(), serde_json::Value::from(n_examples));
    details.insert("resolution".to_string(), serde_json::Value::from(ctx.report.resolution.unwrap_or(0)));
    details.insert("tag_frequency".to_string(), tag_frequency);
    if let Some(info) = bucket_info {
        details.insert("bucket_info".to_string(), info);
    }
    details.insert("max_train_steps".to_string(), serde_json::Value::from(ctx.report.train.as_ref().map_or(0, |t| t.max_train_steps)));
    details.insert("updates_per_epoch".to_string(), serde_json::Value::from(steps.updates_per_epoch));
    // What the next run compares with to say which keys changed.
    details.insert("settings".to_string(), serde_json::to_value(&snapshot)?);
    ctx.lock.stages.remove(IN_PROGRESS);
    Ok(Ran { complete: true, details })
}


/// `raw` with every branch's weights replaced by their moving average (`ema`, by the trainer's
/// parameter names `<component>.<module>.lora_A.weight` / `lora_B.weight`).
fn ema_lora_weights(raw: &crate::adapters::LoraWeights, ema: &std::collections::HashMap<String, candle_core::Tensor>) -> Result<crate::adapters::LoraWeights> {
    use crate::adapters::Component;
    let mut w = raw.clone();
    for (c, prefix) in [(Component::Unet, "unet"), (Component::TextEncoder, "text_encoder"), (Component::TextEncoder2, "text_encoder_2")] {
        for (module, m) in w.component_mut(c).iter_mut() {
            let get = |half: &str| {
                let name = format!("{prefix}.{module}.{half}.weight");
                ema.get(&name).cloned().with_context(|| format!("no moving average for `{name}`"))
            };
            m.down = get("lora_A")?;
            m.up = get("lora_B")?;
            if m.magnitude.is_some() {
                m.magnitude = Some(get("lora_magnitude_vector")?);
            }
        }
    }
    Ok(w)
}

/// The text-encoder LoRA parameters the loss cannot reach: with SDXL's rule (penultimate hidden
/// states, pooled from the last encoder) every encoder but the last stops one layer short, so
/// the branches of its last layer get no gradient.
pub(crate) fn unused_text_params(text: &crate::models::TextSide, te_loras: &[Vec<TrainableLora>]) -> std::collections::HashSet<String> {
    let mut unused = std::collections::HashSet::new();
    if text.rule != crate::models::text::ContextRule::PenultimateConcat {
        return unused;
    }
    for (i, loras) in te_loras.iter().enumerate().take(text.pairs.len().saturating_sub(1)) {
        let last = format!("text_model.encoder.layers.{}.", text.pairs[i].encoder.layers.len().saturating_sub(1));
        let prefix = if i == 0 { "text_encoder" } else { "text_encoder_2" };
        for nv in named_params(prefix, loras) {
            if nv.name.starts_with(&format!("{prefix}.{last}")) {
                unused.insert(nv.name);
            }
        }
    }
    unused
}
