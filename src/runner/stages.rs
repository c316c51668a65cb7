//! The stage table: every stage of a pipeline — model, dataset, preprocess, train, export,
//! validate — with its dependencies, fingerprint, outputs, description and run function, and
//! the one walk over it that `plan`, `run --dry-run`, `run`, `watch` and `bench` share.
//!
//! Stages with results on disk (train, export, validate) have a lock entry each, checked on its
//! own: a new output format reruns only export, a new validation prompt only validate. The
//! loading stages (model, dataset, preprocess) keep their results in memory (a [`Session`]) and
//! run only when a stage that needs them runs.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device};

use super::lock::{Fingerprint, Lock};
use super::plan::{Plan, StageId};
use super::resolve::{
    diffusers_file, kohya_file, load_model, loader_options, lora_spec, model_source, named_params, resolved_toml, select_device, source_options,
    source_spec, train_settings, weight_dtype, LoaderSource,
};
use crate::inference::validation::{validation_file_name, validation_images};
pub use crate::layout::{CACHE_DIR, IN_PROGRESS, METRICS_FILE, TRAINED_FILE};
use crate::train::trainer::TrainOutcome;
use std::path::PathBuf;
use super::run_dir::RunDir;
use crate::adapters::weights::LoraFormat;
use crate::adapters::kohya_meta::TrainingInfo;
use crate::adapters::write::write_lora_file;
use crate::adapters::lora::{inject, trained_weights, InitRng, TrainableLora};
use crate::config::types as cfg;
use crate::config::choice_name;
use crate::util::path::tidy_path;
use crate::data::cache::EncodeCache;
use crate::data::{self, DataLoader, Dataset};
use crate::models::StableDiffusion;
use crate::train::trainer::Trainer;

pub use crate::report::plot::LOSS_PLOT;

/// A file or folder a stage writes, relative to the output folder; `<step>` and `<...>` stand
/// for parts known only while running.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Output {
    pub path: String,
    pub what: String,
    /// Whether the stage's result is stale without it (recorded in the lock).
    pub required: bool,
}

fn out(path: impl Into<String>, what: impl Into<String>, required: bool) -> Output {
    Output { path: path.into(), what: what.into(), required }
}

/// What a stage's run function reports back to the walk.
#[derive(Default)]
pub struct Ran {
    /// False when the stage stopped early (Ctrl-C): nothing is recorded and the walk ends.
    pub complete: bool,
    pub details: BTreeMap<String, serde_json::Value>,
}

impl Ran {
    fn done() -> Self {
        Self { complete: true, details: BTreeMap::new() }
    }
}

pub struct Stage {
    pub id: StageId,
    /// Upstream stages whose fingerprints this one folds in; when one of them runs, so does this.
    pub depends_on: &'static [StageId],
    /// Loading stages whose in-memory result this one needs to run.
    pub needs: &'static [StageId],
    /// Whether the result is on disk with a lock entry (false: loaded into memory when needed).
    pub tracked: bool,
    /// `Some(reason)` when the pipeline turns the stage off.
    pub off: fn(&Plan) -> Option<&'static str>,
    pub fingerprint: fn(&Plan) -> String,
    pub reads: fn(&Plan) -> Vec<String>,
    pub outputs: fn(&Plan) -> Vec<Output>,
    pub describe: fn(&Plan) -> String,
    pub run: fn(&mut StageCtx<'_>) -> Result<Ran>,
}

pub const STAGES: &[Stage] = &[MODEL, DATASET, PREPROCESS, ENCODE, TRAIN, EXPORT, VALIDATE];

impl Plan {
    /// Resolve `loaded` once: fingerprints in table order, each seeing the upstream ones.
    pub fn resolve(loaded: &crate::config::LoadedPipeline) -> Self {
        let mut plan = Self { loaded: loaded.clone(), out_dir: loaded.pipeline.output.dir.clone(), fingerprints: BTreeMap::new(), no_cache: false };
        for stage in STAGES {
            let fp = (stage.fingerprint)(&plan);
            plan.fingerprints.insert(stage.id, fp);
        }
        plan
    }
}

/// A refusal the user can resolve (exit code 2): e.g. resuming with changed settings.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// What stays loaded between runs of watch mode, and the output folder held exclusively.
#[derive(Default)]
pub struct Session {
    model: Option<(String, StableDiffusion)>,
    dataset: Option<(String, Arc<Dataset>, usize)>,
    run_dir: Option<RunDir>,
}

impl Session {
    /// The model the model stage loaded, if any.
    pub fn model_mut(&mut self) -> Option<&mut StableDiffusion> {
        self.model.as_mut().map(|(_, sd)| sd)
    }

    /// Hold `dir` for this session (released when the session ends or moves to another folder).
    pub fn hold(&mut self, dir: &Path) -> Result<()> {
        if self.run_dir.as_ref().is_some_and(|r| r.path() == dir) {
            return Ok(());
        }
        self.run_dir = None;
        self.run_dir = Some(RunDir::acquire(dir)?);
        Ok(())
    }
}

/// Watches the train stage from outside (`lora bench`): called once the set-up is done (model,
/// data, encode cache, encoders parked), after every update, and when training ends.
pub trait TrainObserver {
    fn starting(&mut self, device: &Device);
    fn update(&mut self, step: usize, total: usize, loss: f64, lr: f64);
    fn finished(&mut self, device: &Device);
}

#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Rerun every stage even when its fingerprint is unchanged; start training over.
    pub force: bool,
    /// Encode every step, as the reference does: no encode stage, no encode cache.
    pub no_cache: bool,
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
    /// Every stage of the table in order, with what this run did with it.
    pub stages: Vec<(&'static str, Status)>,
    /// Updates per second of this run's training (validation and plotting left out).
    pub train_rate: Option<f64>,
    /// Mean loss of the first and last tenth of the steps in `metrics.jsonl` (resumes included).
    pub loss_trend: Option<crate::report::metrics::LossTrend>,
    /// A stop signal ended the run between stages or during training.
    pub stopped: bool,
    /// The earlier run's results set aside before training started over (`earlier/...`).
    pub set_aside: Option<PathBuf>,
    /// The fixed-noise evaluation loss before and after all the training (resumes included),
    /// from `metrics.jsonl`.
    pub eval_loss: (Option<f64>, Option<f64>),
    /// Seconds of the train stage spent on validation and plots between steps.
    pub side_seconds: f64,
}

/// The state a walk hands from stage to stage.
pub struct StageCtx<'a> {
    pub plan: &'a Plan,
    pub session: &'a mut Session,
    pub lock: &'a mut Lock,
    pub opts: &'a RunOptions,
    pub stop: Arc<AtomicBool>,
    pub report: &'a mut RunReport,
    /// How the train stage starts, as `plan` printed it (set when train runs).
    pub start: Option<super::resume::Start>,
    /// `lora bench`'s timing hook on the train stage.
    pub observer: Option<&'a mut (dyn TrainObserver + 'a)>,
    device: Option<Device>,
    loader: Option<DataLoader>,
}

/// Why a stage runs or not, for `plan` and the run log alike.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "status", content = "reason", rename_all = "snake_case")]
pub enum Status {
    /// A tracked stage runs, with why.
    Run(String),
    UpToDate,
    /// A loading stage runs because a later stage needs it.
    Load,
    /// A loading stage that nothing needs this time.
    NotNeeded,
    Off(String),
    /// The stage would have to discard or contradict work in the folder: `run` exits 2 with this
    /// message before loading anything.
    Refused(String),
}

impl Status {
    pub fn label(&self) -> String {
        match self {
            Status::Run(why) => format!("will run: {why}"),
            Status::UpToDate => "up to date".into(),
            Status::Load => "loads (needed below)".into(),
            Status::NotNeeded => "not needed".into(),
            Status::Off(why) => format!("off: {why}"),
            Status::Refused(why) => format!("refused: {why}"),
        }
    }

    /// The label after a run: what was done.
    pub fn done_label(&self) -> String {
        match self {
            Status::Run(why) => format!("ran: {why}"),
            Status::Load => "loaded".into(),
            other => other.label(),
        }
    }
}

/// What each stage of `plan` would do given `lock`: the one decision `plan` prints and `run`
/// follows.
pub fn decide(plan: &Plan, lock: &Lock, force: bool) -> Vec<Status> {
    decide_all(plan, lock, force).0
}

/// [`decide`], with how the train stage starts when it runs (resume, start over, refuse).
pub fn decide_all(plan: &Plan, lock: &Lock, force: bool) -> (Vec<Status>, Option<super::resume::Start>) {
    use super::resume::Start;
    let dir = &plan.out_dir;
    let mut start = None;
    let mut status: Vec<Status> = Vec::with_capacity(STAGES.len());
    for stage in STAGES {
        if let Some(why) = (stage.off)(plan) {
            status.push(Status::Off(why.into()));
            continue;
        }
        if !stage.tracked {
            status.push(Status::NotNeeded); // decided below, once the tracked stages are known
            continue;
        }
        let fp = plan.fingerprint(stage.id);
        let upstream_runs = stage.depends_on.iter().find(|d| {
            STAGES.iter().position(|s| s.id == **d).is_some_and(|i| matches!(status.get(i), Some(Status::Run(_))))
        });
        let why = if force {
            Some("--force".to_string())
        } else if let Some(d) = upstream_runs {
            Some(format!("{} runs", d.name()))
        } else {
            match lock.stages.get(stage.id.name()) {
                None => Some("no result yet".into()),
                Some(r) if r.fingerprint != fp => Some("its settings or inputs changed".into()),
                Some(r) => r.outputs.iter().find(|o| !dir.join(o).exists()).map(|o| format!("{o} is missing")),
            }
        };
        let st = match why {
            None => Status::UpToDate,
            Some(why) if stage.id == StageId::Train => {
                let s = super::resume::decide_start(plan, lock, force, &why);
                let st = match &s {
                    Start::Refused(m) => Status::Refused(m.clone()),
                    Start::Resume { newest, warnings, .. } => {
                        let name = newest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                        let changed = if warnings.is_empty() { String::new() } else { format!(", with {}", warnings.join(", ")) };
                        Status::Run(format!("resumes the interrupted run from {name}{changed}"))
                    }
                    Start::Fresh { aside: Some(a), why } => {
                        let changed = if a.changed.is_empty() { String::new() } else { format!(" ({})", a.changed.join(", ")) };
                        Status::Run(format!("{why}{changed}; {}", a.summary()))
                    }
                    Start::Fresh { aside: None, why } => Status::Run(why.clone()),
                    Start::Explicit(r) => Status::Run(format!("{why}; resumes checkpoints.resume = {r:?}")),
                };
                start = Some(s);
                st
            }
            Some(why) => Status::Run(why),
        };
        status.push(st);
    }
    // A loading stage loads when a running stage (or a loading stage that loads) needs it.
    let mut needed: Vec<StageId> = Vec::new();
    for (stage, st) in STAGES.iter().zip(&status).rev() {
        let loads = matches!(st, Status::Run(_)) || (!stage.tracked && needed.contains(&stage.id) && !matches!(st, Status::Off(_)));
        if loads {
            needed.extend(stage.needs.iter().copied());
        }
    }
    for (stage, st) in STAGES.iter().zip(status.iter_mut()) {
        if !stage.tracked && matches!(st, Status::NotNeeded) && needed.contains(&stage.id) {
            *st = Status::Load;
        }
    }
    (status, start)
}

/// One stage as `plan` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StageView {
    pub name: &'static str,
    /// The pipeline tables the stage owns.
    pub tables: &'static [&'static str],
    #[serde(flatten)]
    pub status: Status,
    pub description: String,
    pub reads: Vec<String>,
    pub writes: Vec<Output>,
}

/// The stages of `plan` in order, with what `lora run` would do with each now.
pub fn describe(plan: &Plan, lock: &Lock, force: bool) -> Vec<StageView> {
    let (statuses, start) = decide_all(plan, lock, force);
    STAGES
        .iter()
        .zip(statuses)
        .map(|(s, status)| {
            // A stage that is off writes nothing.
            let mut writes = if matches!(status, Status::Off(_)) { Vec::new() } else { (s.outputs)(plan) };
            if let (true, Some(super::resume::Start::Fresh { aside: Some(a), .. })) = (s.id == StageId::Train, &start) {
                writes.push(out(format!("{}/", a.dir), "the earlier run's results, set aside before training starts over (set-aside.json says why)", false));
            }
            StageView { name: s.id.name(), tables: s.id.tables(), status, description: (s.describe)(plan), reads: (s.reads)(plan), writes }
        })
        .collect()
}

/// Run the stages of `plan` that are not up to date, holding its output folder for `session`;
/// `observer` watches the train stage (`lora bench`).
pub fn run_plan(plan: &Plan, session: &mut Session, opts: &RunOptions, stop: Arc<AtomicBool>, observer: Option<&mut dyn TrainObserver>) -> Result<RunReport> {
    let started = Instant::now();
    let mut plan = plan.clone();
    plan.pick_seed();
    plan.no_cache = opts.no_cache;
    let dir = plan.out_dir.clone();
    session.hold(&dir)?;
    let mut lock = Lock::read(&dir)?;
    lock.pipeline = plan.loaded.path.display().to_string();
    let (statuses, start) = decide_all(&plan, &lock, opts.force);
    // Refused before anything loads or changes (what `plan` says as "refused").
    if let Some(why) = statuses.iter().find_map(|s| if let Status::Refused(w) = s { Some(w.clone()) } else { None }) {
        return Err(Refused(why).into());
    }
    let mut report = RunReport::default();
    // (A reborrow for the walk's own lifetime.)
    let observer = observer.map(|o| o as &mut dyn TrainObserver);
    let mut ctx = StageCtx { plan: &plan, session, lock: &mut lock, opts, stop, report: &mut report, start, observer, device: None, loader: None };
    for (stage, status) in STAGES.iter().zip(statuses) {
        if crate::util::interrupt::requested() {
            // A stop signal between stages: what ran is recorded, the rest waits for the next run.
            tracing::info!("stopped before the {} stage", stage.id.name());
            ctx.report.stopped = true;
            break;
        }
        ctx.report.stages.push((stage.id.name(), status.clone()));
        match &status {
            Status::Run(why) => tracing::info!("{}: running ({why})", stage.id.name()),
            Status::Load => {}
            Status::UpToDate => {
                tracing::info!("{}: up to date", stage.id.name());
                continue;
            }
            Status::NotNeeded | Status::Off(_) | Status::Refused(_) => continue,
        }
        let ran = (stage.run)(&mut ctx).with_context(|| format!("stage {}", stage.id.name()))?;
        if !ran.complete {
            break;
        }
        if stage.tracked {
            let outputs = (stage.outputs)(&plan).into_iter().filter(|o| o.required).map(|o| o.path).collect();
            ctx.lock.record_with(stage.id.name(), plan.fingerprint(stage.id), outputs, ran.details);
            ctx.lock.write(&dir)?;
        }
    }
    // Examples of the training these results come from, when the dataset was not loaded now.
    if report.examples == 0 && !report.stages.iter().any(|(n, s)| *n == "dataset" && matches!(s, Status::Load)) {
        report.examples = lock.stages.get(StageId::Train.name()).and_then(|r| r.details.get("examples")).and_then(serde_json::Value::as_u64).unwrap_or(0) as usize;
    }
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

fn tidy(p: &Plan, rel: &str) -> String {
    tidy_path(&p.out_dir.join(rel)).display().to_string()
}

fn not_off(_: &Plan) -> Option<&'static str> {
    None
}

fn nothing(_: &Plan) -> Vec<String> {
    Vec::new()
}

fn no_outputs(_: &Plan) -> Vec<Output> {
    Vec::new()
}

// ---------------------------------------------------------------------------------------------
// model

const MODEL: Stage = Stage {
    id: StageId::Model,
    depends_on: &[],
    needs: &[],
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
    run: run_model,
};

fn run_model(ctx: &mut StageCtx<'_>) -> Result<Ran> {
    let p = ctx.plan.pipeline();
    let device = select_device(p.train.device)?;
    crate::device::allow_tf32(&device, p.train.allow_tf32);
    let dtype = weight_dtype(p.train.precision, &device)?;
    let fp = ctx.plan.fingerprint(StageId::Model);
    if !ctx.opts.force && ctx.session.model.as_ref().is_some_and(|(f, _)| f == fp) {
        tracing::info!("model: kept in memory");
    } else {
        ctx.session.model = Some((fp.to_string(), load_model(p, &device, dtype)?));
    }
    // Remove adapters a previous run of this session attached.
    let (_, sd) = ctx.session.model.as_mut().expect("just loaded");
    sd.unet.linears_mut().into_iter().for_each(|l| l.loras.clear());
    sd.text_encoder.linears_mut().into_iter().for_each(|l| l.loras.clear());
    ctx.device = Some(device);
    Ok(Ran::done())
}

// ---------------------------------------------------------------------------------------------
// dataset

const DATASET: Stage = Stage {
    id: StageId::Dataset,
    depends_on: &[],
    needs: &[],
    tracked: false,
    off: not_off,
    fingerprint: |p| {
        let mut f = Fingerprint::new("dataset");
        f.add_toml("dataset", p.table("dataset"));
        if let Some(path) = &p.pipeline().dataset.path {
            f.add_files("files", path);
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
    run: run_dataset,
};

fn run_dataset(ctx: &mut StageCtx<'_>) -> Result<Ran> {
    let p = ctx.plan.pipeline();
    let fp = ctx.plan.fingerprint(StageId::Dataset);
    if !ctx.opts.force && ctx.session.dataset.as_ref().is_some_and(|(f, _, _)| f == fp) {
        tracing::info!("dataset: kept in memory");
    } else {
        let dataset = data::source::load_source(&source_spec(p)?, &source_options(p))?;
        let policy = match p.dataset.on_bad_image {
            cfg::OnBadImage::Error => data::OnBadImage::Error,
            cfg::OnBadImage::Skip => data::OnBadImage::Skip,
        };
        let (dataset, skipped) = data::decode::screen_dataset(dataset, &loader_options(p).decode, policy)?;
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

const PREPROCESS: Stage = Stage {
    id: StageId::Preprocess,
    depends_on: &[StageId::Dataset],
    needs: &[StageId::Dataset],
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
        format!("resize to {} ({}), {crop}{flip}, normalise to [-1, 1] (per batch, as training reads it)", pre.resolution, choice_name(&pre.interpolation))
    },
    run: |ctx| {
        let (_, dataset, _) = ctx.session.dataset.as_ref().context("the dataset stage runs before preprocess")?;
        ctx.loader = Some(DataLoader::new(dataset.clone(), loader_options(ctx.plan.pipeline()))?);
        Ok(Ran::done())
    },
};

// ---------------------------------------------------------------------------------------------
// encode


/// Whether the VAE latents can be cached: every preprocessing variant of an image is one exact
/// input (center crop; with random flip, both flips). A random crop is encoded every step.
fn caches_latents(p: &Plan) -> bool {
    matches!(p.pipeline().preprocess.crop(), cfg::Crop::Center)
}

/// Whether the text-encoder outputs can be cached: the text encoder is not trained.
pub(crate) fn caches_text(p: &Plan) -> bool {
    !p.pipeline().adapter.text_encoder
}

const ENCODE: Stage = Stage {
    id: StageId::Encode,
    depends_on: &[StageId::Model, StageId::Preprocess],
    needs: &[StageId::Model, StageId::Preprocess],
    tracked: true,
    off: |p| {
        if p.no_cache {
            Some("--no-cache: the encoders run every step")
        } else if !caches_latents(p) && !caches_text(p) {
            Some("random crop and a trained text encoder: the encoders run every step")
        } else {
            None
        }
    },
    fingerprint: |p| {
        Fingerprint::new("encode")
            .add("model", p.fingerprint(StageId::Model))
            .add("preprocess", p.fingerprint(StageId::Preprocess))
            .add("latents", &caches_latents(p).to_string())
            .add("text", &caches_text(p).to_string())
            .finish()
    },
    reads: nothing,
    outputs: |_| vec![out(format!("{CACHE_DIR}/"), "VAE latent distributions and text embeddings, checksummed, keyed by model and input", true)],
    describe: |p| {
        let latents = match (caches_latents(p), p.pipeline().preprocess.random_flip) {
            (true, true) => "VAE latent distribution (mean, std) of every image, flipped and not",
            (true, false) => "VAE latent distribution (mean, std) of every image",
            (false, _) => "no latents (random crop: encoded every step)",
        };
        let text = if caches_text(p) { "text-encoder output of every caption" } else { "no text (the text encoder trains)" };
        format!("cache on disk: {latents}; {text}")
    },
    run: run_encode,
};

fn encode_cache(p: &Plan) -> Arc<EncodeCache> {
    Arc::new(EncodeCache::new(&p.out_dir.join(CACHE_DIR), p.fingerprint(StageId::Model)))
}

fn run_encode(ctx: &mut StageCtx<'_>) -> Result<Ran> {
    let plan = ctx.plan;
    let cache = encode_cache(plan);
    std::fs::create_dir_all(cache.dir()).with_context(|| format!("creating {}", cache.dir().display()))?;
    let device = ctx.device.clone().context("the model stage runs before encode")?;
    let loader = ctx.loader.as_ref().context("the preprocess stage runs before encode")?;
    let (_, sd) = ctx.session.model.as_mut().context("the model stage runs before encode")?;
    // Encoders parked by an earlier run of this session (watch mode) come back to encode.
    sd.unpark_encoders(&device)?;
    let sd: &StableDiffusion = sd;
    let opts = loader_options(plan.pipeline());
    let dataset = loader.dataset();
    let flips: &[bool] = if opts.preprocess.flip_p > 0.0 { &[false, true] } else { &[false] };
    let bar = indicatif::ProgressBar::new(dataset.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} encode [{bar:30}] {pos}/{len} {rate} ETA {eta}").map(with_rate)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    let (mut new_latents, mut new_texts) = (0usize, 0usize);
    // A caption several examples share is looked up once (not "reused" from the cache).
    let mut seen_captions: std::collections::HashSet<&str> = std::collections::HashSet::new();
    for example in &dataset.examples {
        if caches_latents(plan) {
            let image = data::decode::decode_example(example, &opts.decode).map_err(|e| anyhow::anyhow!("{e}"))?;
            for &flip in flips {
                // Exactly the loader's pixels for this variant: a center crop draws nothing,
                // and flip_p 0 / 1 fixes the flip.
                let pre = data::PreprocessOptions { flip_p: if flip { 1.0 } else { 0.0 }, ..opts.preprocess.clone() };
                let mut rng = <InitRng as rand::SeedableRng>::seed_from_u64(0);
                let pixels = data::transform::preprocess(&image, &pre, &mut rng)?;
                let res = pre.resolution as usize;
                let px = candle_core::Tensor::from_vec(pixels, (1, 3, res, res), &Device::Cpu)?;
                let key = cache.latent_key(&px.get(0)?)?;
                if cache.get(&key, &device)?.is_none() {
                    let dist = sd.vae.encode(&px.to_device(&device)?)?;
                    cache.put(&key, &[&dist.mean.get(0)?, &dist.std()?.get(0)?])?;
                    new_latents += 1;
                }
            }
        }
        if caches_text(plan) {
            let captions: Vec<&String> = match &example.caption {
                data::Caption::One(s) => vec![s],
                data::Caption::Choices(list) => list.iter().collect(),
            };
            for c in captions {
                if !seen_captions.insert(c.as_str()) {
                    continue;
                }
                let key = cache.text_key(c);
                if cache.get(&key, &device)?.is_none() {
                    let ids = sd.tokenizer.encode_batch(&[c.as_str()], &device)?;
                    let hidden = sd.text_encoder.forward(&ids)?;
                    cache.put(&key, &[&hidden.get(0)?])?;
                    new_texts += 1;
                }
            }
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let reused = cache.hits.load(std::sync::atomic::Ordering::Relaxed);
    tracing::info!(
        "encode: {new_latents} latent distribution(s) and {new_texts} text embedding(s) encoded, {reused} reused from {}",
        tidy_path(cache.dir()).display()
    );
    Ok(Ran::done())
}

// ---------------------------------------------------------------------------------------------
// train

const TRAIN: Stage = Stage {
    id: StageId::Train,
    depends_on: &[StageId::Model, StageId::Preprocess],
    needs: &[StageId::Model, StageId::Preprocess],
    tracked: true,
    off: not_off,
    fingerprint: |p| {
        Fingerprint::new("train")
            .add("model", p.fingerprint(StageId::Model))
            .add("preprocess", p.fingerprint(StageId::Preprocess))
            .add_toml("adapter", p.table("adapter"))
            .add_toml("optimizer", p.table("optimizer"))
            .add_toml("train", p.table("train"))
            .finish()
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
        format!(
            "LoRA rank {} on {}{}; {steps}, batch {} x {}, lr {} ({})",
            pl.adapter.rank,
            pl.adapter.target_modules.join(", "),
            if pl.adapter.text_encoder { " and the text encoder" } else { "" },
            pl.train.batch_size,
            pl.train.gradient_accumulation_steps,
            pl.train.learning_rate,
            choice_name(&pl.train.lr_scheduler)
        )
    },
    run: run_train,
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

/// The TensorBoard folder, when `logging.report_to = "tensorboard"`.
fn events_dir(p: &Plan) -> Option<std::path::PathBuf> {
    let pl = p.pipeline();
    (pl.logging.report_to == cfg::ReportTo::Tensorboard).then(|| p.out_dir.join(&pl.logging.dir))
}

/// After a validation point wrote `files` into `dir`: their grid and, with TensorBoard, the
/// images in the event file at `step`.
fn publish_validation(p: &Plan, files: &[std::path::PathBuf], dir: &Path, step: u64) -> Result<std::path::PathBuf> {
    let events = events_dir(p);
    let v = &p.pipeline().validation;
    crate::report::grid::publish_validation_with_prompts(files, &v.prompts, v.num_images as usize, dir, events.as_deref().map(|d| (d, step)))
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

fn run_train(ctx: &mut StageCtx<'_>) -> Result<Ran> {
    let plan = ctx.plan;
    let p = plan.pipeline();
    let out_dir = plan.out_dir.clone();
    let snapshot = super::resume::settings_snapshot(plan);
    let mut settings = train_settings(&plan.loaded);
    settings.train_fingerprint = Some(plan.fingerprint(StageId::Train).to_string());
    if plan.no_cache {
        settings.cache_encodings = false;
    }
    // What `plan` said (the one decision): resume, start over with earlier results set aside,
    // or the user's own `checkpoints.resume`.
    match ctx.start.clone() {
        Some(super::resume::Start::Explicit(_)) => {}
        Some(super::resume::Start::Resume { newest, warnings, .. }) => {
            tracing::info!("train: resuming the interrupted run from {} (or the newest checkpoint before it that loads)", tidy_path(&newest).display());
            for w in &warnings {
                tracing::warn!("train: resuming with a changed setting: {w}");
            }
            settings.resume_from_checkpoint = Some("latest".into());
        }
        Some(super::resume::Start::Fresh { why, aside }) => {
            settings.resume_from_checkpoint = None;
            if let Some(a) = aside {
                if !a.changed.is_empty() {
                    tracing::info!("train: starting over ({why}): {}", a.changed.join(", "));
                }
                super::resume::carry_out(&out_dir, &a)?;
                tracing::info!("train: {}", a.summary());
                ctx.report.set_aside = Some(out_dir.join(&a.dir));
            }
        }
        Some(super::resume::Start::Refused(why)) => return Err(Refused(why).into()),
        None => anyhow::bail!("the train stage runs only as decided by the stage table"),
    }
    // Mark the stage in progress before the first step, so any crash resumes.
    ctx.lock.stages.remove(StageId::Train.name());
    ctx.lock.record_with(IN_PROGRESS, plan.fingerprint(StageId::Train), vec![], snapshot.clone());
    ctx.lock.write(&out_dir)?;

    let device = ctx.device.clone().context("the model stage runs before train")?;
    let loader = ctx.loader.take().context("the preprocess stage runs before train")?;
    let n_examples = loader.dataset().len();
    // For the kohya header (`ss_tag_frequency`), kept in the lock so export can rerun alone.
    let tag_frequency = crate::adapters::kohya_meta::tag_frequency(
        &dataset_folder_name(p),
        loader.dataset().examples.iter().flat_map(|e| match &e.caption {
            data::Caption::One(c) => vec![c.as_str()],
            data::Caption::Choices(list) => list.iter().map(String::as_str).collect(),
        }),
    );
    let (_, sd) = ctx.session.model.as_mut().context("the model stage runs before train")?;
    // Encoders parked by an earlier run of this session come back before anything trains.
    sd.unpark_encoders(&device)?;
    let mut rng = <InitRng as rand::SeedableRng>::seed_from_u64(p.train.seed.unwrap_or(0));
    // `rank_pattern` / `alpha_pattern` are one table for both parts (as PEFT's per-model
    // configs would be two): each part gets the keys that match one of its targeted modules, and
    // a key that matches in neither is an error.
    let mut unet_spec = lora_spec(&p.adapter, &p.adapter.target_modules);
    let unet_names: Vec<String> = sd.unet.linears_mut().iter().map(|l| l.name.clone()).collect();
    let mut used = crate::adapters::lora::keep_patterns_for(&mut unet_spec, unet_names.iter().map(String::as_str))?;
    let unet_loras = inject(sd.unet.linears_mut(), &unet_spec, &mut rng).context("[adapter] target_modules")?;
    let te_loras: Vec<TrainableLora> = if p.adapter.text_encoder {
        let mut te_spec = lora_spec(&p.adapter, &p.adapter.text_encoder_target_modules);
        let te_names: Vec<String> = sd.text_encoder.linears_mut().iter().map(|l| l.name.clone()).collect();
        used.extend(crate::adapters::lora::keep_patterns_for(&mut te_spec, te_names.iter().map(String::as_str))?);
        inject(sd.text_encoder.linears_mut(), &te_spec, &mut rng).context("[adapter] text_encoder_target_modules")?
    } else {
        Vec::new()
    };
    if let Some(unused) = p.adapter.rank_pattern.keys().chain(p.adapter.alpha_pattern.keys()).find(|k| !used.contains(*k)) {
        anyhow::bail!("[adapter] pattern key `{unused}` matches no targeted module of the UNet{}", if p.adapter.text_encoder { " or the text encoder" } else { "" });
    }
    let mut params = named_params("unet", &unet_loras);
    params.extend(named_params("text_encoder", &te_loras));
    if p.train.precision == cfg::Precision::Fp16 {
        // The reference creates the LoRA weights in the base layer's dtype and only then upcasts
        // them (`cast_training_params`): the init is rounded to f16.
        for nv in &params {
            nv.var.set(&crate::train::precision::round_through(nv.var.as_tensor(), DType::F16)?)?;
        }
    }
    let n_params: usize = params.iter().map(|p| p.var.elem_count()).sum();
    tracing::info!("adapter: {} modules, {n_params} trainable parameters", unet_loras.len() + te_loras.len());
    // Measure progress on up to 32 examples with fixed noise, before and after training.
    settings.eval_batches = 32usize.div_ceil(settings.batch_size).min(loader.batches_per_epoch());
    if !plan.no_cache {
        park_cached_encoders(sd, caches_text(plan), caches_latents(plan), &device)?;
    }
    let sd_ref: &StableDiffusion = sd;
    let mut trainer = Trainer::new(sd_ref, params, settings)?;
    trainer.stop = ctx.stop.clone();
    let cache = (!plan.no_cache).then(|| encode_cache(plan));
    if let Some(cache) = &cache {
        trainer.latent_cache_disk = caches_latents(plan).then(|| cache.clone());
        trainer.text_cache_disk = caches_text(plan).then(|| cache.clone());
    }
    let mut bar: Option<indicatif::ProgressBar> = None;
    let mut last_log = Instant::now();
    // Validation while training, as the reference: at the end of every `every_epochs`-th epoch
    // (epoch 0 included), and every `every_steps` updates when set.
    let steps = crate::train::lr::StepPlan::new(
        n_examples,
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
        let epoch_end = step % steps.updates_per_epoch == 0;
        let epoch = (step / steps.updates_per_epoch).saturating_sub(1);
        let by_epochs = epoch_end && p.validation.every_epochs > 0 && epoch % p.validation.every_epochs as usize == 0;
        (by_steps || by_epochs) && step < steps.max_train_steps
    };
    let checkpoint_due = |step: usize| p.checkpoints.every_steps > 0 && step % p.checkpoints.every_steps as usize == 0;
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
        if validate_at(step) || checkpoint_due(step) || last_plot.elapsed().as_secs() >= 30 {
            crate::report::plot::refresh(&out_dir.join(METRICS_FILE), &out_dir.join(LOSS_PLOT));
            last_plot = Instant::now();
        }
        rate.pause(paused.elapsed());
        side += paused.elapsed();
        let b = bar.get_or_insert_with(|| progress_bar(total, step.saturating_sub(1)));
        b.set_position(step as u64);
        b.set_message(format!("loss {loss:.4} lr {lr:.2e}"));
        if b.is_hidden() && (last_log.elapsed().as_secs_f64() > 10.0 || step == total || step == 1) {
            tracing::info!("step {step}/{total} loss {loss:.4} lr {lr:.2e}");
            last_log = Instant::now();
        }
    };
    let training = crate::util::interrupt::training();
    let outcome = trainer.train(&LoaderSource(loader, p.train.batch_size as usize), Some(&mut on_update))?;
    drop(training);
    if let Some(o) = observer.as_deref_mut() {
        o.finished(&device);
    }
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    drop(trainer);
    crate::report::plot::refresh(&out_dir.join(METRICS_FILE), &out_dir.join(LOSS_PLOT));
    ctx.report.train_rate = rate.per_second();
    ctx.report.side_seconds = side.as_secs_f64();
    ctx.report.eval_loss = crate::report::metrics::eval_span(&crate::report::metrics::read_evals(&out_dir.join(METRICS_FILE))?);
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
    let weights = trained_weights(&unet_loras, &te_loras)?;
    write_lora_file(&weights, &out_dir.join(TRAINED_FILE), LoraFormat::Peft)?;
    let mut details = BTreeMap::new();
    details.insert("examples".to_string(), serde_json::Value::from(n_examples));
    details.insert("tag_frequency".to_string(), tag_frequency);
    details.insert("max_train_steps".to_string(), serde_json::Value::from(ctx.report.train.as_ref().map_or(0, |t| t.max_train_steps)));
    details.insert("updates_per_epoch".to_string(), serde_json::Value::from(steps.updates_per_epoch));
    // What the next run compares with to say which keys changed.
    details.insert("settings".to_string(), serde_json::to_value(&snapshot)?);
    ctx.lock.stages.remove(IN_PROGRESS);
    Ok(Ran { complete: true, details })
}

/// The `{rate}` key: `13.2 it/s`, or `2.35 s/it` below one a second (indicatif's `{per_sec}`
/// prints four decimals).
fn with_rate(style: indicatif::ProgressStyle) -> indicatif::ProgressStyle {
    style.with_key("rate", |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
        let per_sec = state.per_sec();
        let _ = if per_sec >= 1.0 { write!(w, "{per_sec:.1} it/s") } else if per_sec > 0.0 { write!(w, "{:.2} s/it", 1.0 / per_sec) } else { Ok(()) };
    })
}

fn progress_bar(total: usize, start: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} train [{bar:30}] {pos}/{len} {msg} {rate} ETA {eta}").map(with_rate)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_position(start as u64);
    bar
}

// ---------------------------------------------------------------------------------------------
// export

/// Version of what export writes into the kohya header (model facts, ModelSpec, tag counts).
const KOHYA_HEADER_VERSION: &str = "2";

const EXPORT: Stage = Stage {
    id: StageId::Export,
    depends_on: &[StageId::Train],
    needs: &[],
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
    reads: |p| vec![tidy(p, TRAINED_FILE)],
    outputs: |p| {
        p.pipeline()
            .output
            .formats
            .iter()
            .map(|f| match f {
                cfg::OutputFormat::Diffusers => out(diffusers_file(p.pipeline()), "diffusers form, as the reference script writes it", true),
                cfg::OutputFormat::Kohya => out(kohya_file(p.pipeline()), "kohya form with training metadata (A1111, ComfyUI)", true),
            })
            .collect()
    },
    describe: |p| {
        let names: Vec<String> = p.pipeline().output.formats.iter().map(choice_name).collect();
        format!("write the adapter ({})", names.join(", "))
    },
    run: |ctx| {
        let details = ctx.lock.stages.get(StageId::Train.name()).map(|r| r.details.clone()).unwrap_or_default();
        export_files(ctx, &details)?;
        // Files an earlier export wrote that are no longer asked for.
        let wanted: Vec<String> = (EXPORT.outputs)(ctx.plan).into_iter().map(|o| o.path).collect();
        if let Some(old) = ctx.lock.stages.get(StageId::Export.name()) {
            for f in old.outputs.iter().filter(|f| !wanted.contains(f)) {
                let path = ctx.plan.out_dir.join(f);
                if path.is_file() {
                    tracing::info!("export: removing {} (its format is no longer in output.formats)", path.display());
                    std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
                }
            }
        }
        Ok(Ran::done())
    },
};

/// Write every format of `output.formats` from the train stage's file.
fn export_files(ctx: &mut StageCtx<'_>, train_details: &BTreeMap<String, serde_json::Value>) -> Result<()> {
    let p = ctx.plan.pipeline();
    let dir = &ctx.plan.out_dir;
    // Never export weights that went NaN/inf (a diverged run): refused with the tensors named.
    let weights = crate::adapters::read::read_lora_file_for_use(&dir.join(TRAINED_FILE)).context("the train stage's result")?;
    let save_dtype = match p.output.save_precision {
        cfg::SavePrecision::F32 => DType::F32,
        cfg::SavePrecision::Fp16 => DType::F16,
        cfg::SavePrecision::Bf16 => DType::BF16,
    };
    let count = |k: &str| train_details.get(k).and_then(serde_json::Value::as_u64);
    for f in &p.output.formats {
        match f {
            cfg::OutputFormat::Diffusers => {
                let path = dir.join(diffusers_file(p));
                let bytes = crate::adapters::write::serialize_lora_as(&weights, LoraFormat::Diffusers, save_dtype)?;
                crate::util::fs::write_atomic(&path, &bytes).with_context(|| format!("cannot write LoRA file {}", path.display()))?;
                ctx.report.files.push(path);
            }
            cfg::OutputFormat::Kohya => {
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
                    resolution: p.preprocess.resolution as usize,
                    seed: p.train.seed,
                    num_train_images: count("examples").unwrap_or(0) as usize,
                    prediction: facts.prediction,
                    train_text_encoder: p.adapter.text_encoder,
                    pipeline_toml: resolved_toml(&ctx.plan.loaded),
                };
                let mut w = weights.clone();
                w.metadata = crate::adapters::kohya_meta::training_metadata(&info);
                // A single-file model (and a separate VAE) are named and hashed as kohya does.
                w.metadata.extend(crate::adapters::kohya_hash::source_file_metadata(p.model.file.as_deref(), p.model.vae.as_deref())?);
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
                w.metadata.extend(crate::adapters::kohya_meta::modelspec_metadata(facts, &spec));
                w.metadata.insert("ss_output_name".into(), title);
                if let Some(tags) = train_details.get("tag_frequency") {
                    w.metadata.insert("ss_tag_frequency".into(), tags.to_string());
                }
                let bytes = crate::adapters::kohya_hash::with_sshs_hashes(&crate::adapters::write::serialize_lora_as(&w, LoraFormat::Kohya, save_dtype)?)?;
                let path = dir.join(kohya_file(p));
                crate::util::fs::write_atomic(&path, &bytes).with_context(|| format!("cannot write LoRA file {}", path.display()))?;
                ctx.report.files.push(path);
            }
        }
    }
    Ok(())
}

/// The base model's generation and prediction type for the kohya header, from its configs (a
/// single file's header, or a diffusers folder's config files); `train.prediction_type`, the
/// target actually trained, wins over the model's.
fn model_facts(p: &cfg::Pipeline) -> Result<crate::adapters::kohya_meta::ModelFacts> {
    let mut facts = match crate::models::single_file::recognise_config(&p.model) {
        Some(r) => {
            let r = r?;
            crate::adapters::kohya_meta::ModelFacts {
                v2: r.family == crate::models::single_file::recognition::Family::Sd2,
                prediction: r.prediction.kind,
            }
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

/// The dataset's folder name as kohya keys `ss_tag_frequency` (the hub name for a hub dataset).
fn dataset_folder_name(p: &cfg::Pipeline) -> String {
    match (&p.dataset.name, &p.dataset.path) {
        (Some(name), _) => name.clone(),
        (None, Some(path)) => tidy_path(path).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        (None, None) => String::new(),
    }
}

// ---------------------------------------------------------------------------------------------
// validate

const VALIDATE: Stage = Stage {
    id: StageId::Validate,
    // Validate reads export's file (`validation_adapter`), so it comes after export in the table;
    // its fingerprint names that file, so a format change that leaves it the same (another format
    // added) reruns only export, one that changes it (diffusers dropped) reruns validate too.
    depends_on: &[StageId::Train],
    needs: &[StageId::Model],
    tracked: true,
    off: |p| p.pipeline().validation.prompts.is_empty().then_some("no validation prompts"),
    fingerprint: |p| {
        Fingerprint::new("validate")
            .add("train", p.fingerprint(StageId::Train))
            .add("adapter", &validation_adapter(p.pipeline()))
            .add_toml("validation", p.table("validation"))
            .add("resolution", &p.pipeline().preprocess.resolution.to_string())
            .finish()
    },
    reads: |p| vec![tidy(p, &validation_adapter(p.pipeline()))],
    outputs: |p| {
        let mut o: Vec<Output> = validation_files(p.pipeline()).into_iter().map(|f| out(f, "validation image", true)).collect();
        o.push(out(format!("validation/{}", crate::report::grid::GRID_FILE), "all validation images in one grid (rows = prompts)", true));
        if events_dir(p).is_some() {
            let dir = p.pipeline().logging.dir.display().to_string();
            o.push(out(format!("{dir}/events.out.tfevents.<...>"), "TensorBoard events: the validation images (validation/prompt<i>)", false));
        }
        o
    },
    describe: |p| {
        let v = &p.pipeline().validation;
        format!(
            "{} image(s) per prompt for {} prompt(s), {} steps ({}), guidance {}, with {}",
            v.num_images,
            v.prompts.len(),
            v.steps,
            choice_name(&v.scheduler),
            v.guidance_scale,
            validation_adapter(p.pipeline())
        )
    },
    run: |ctx| {
        let dir = ctx.plan.out_dir.clone();
        let device = ctx.device.clone().context("the model stage runs before validate")?;
        let (_, sd) = ctx.session.model.as_mut().context("the model stage runs before validate")?;
        // As the reference, the final images come from the saved file loaded into a fresh
        // pipeline: the training branches are taken off and the exported file applied.
        sd.unet.linears_mut().into_iter().for_each(|l| l.loras.clear());
        sd.text_encoder.linears_mut().into_iter().for_each(|l| l.loras.clear());
        let adapter = dir.join(validation_adapter(ctx.plan.pipeline()));
        crate::adapters::lora::apply_lora_file(sd, &adapter, 1.0)?;
        tracing::info!("validate: with {}", tidy_path(&adapter).display());
        let files = validation_images(sd, ctx.plan.pipeline(), &dir.join("validation"), &device)?;
        // TensorBoard shows the final images at the last training step.
        let step = ctx.report.train.as_ref().map(|t| t.global_step as u64).or_else(|| {
            ctx.lock.stages.get(StageId::Train.name()).and_then(|r| r.details.get("max_train_steps")).and_then(serde_json::Value::as_u64)
        });
        let grid = publish_validation(ctx.plan, &files, &dir.join("validation"), step.unwrap_or(0))?;
        ctx.report.files.extend(files);
        ctx.report.files.push(grid);
        Ok(Ran::done())
    },
};

/// The file the final validation applies, relative to the output folder: the exported diffusers
/// file when `output.formats` writes one, else the kohya one (the train stage's own file only
/// when no format is asked for).
pub fn validation_adapter(p: &cfg::Pipeline) -> String {
    if p.output.formats.contains(&cfg::OutputFormat::Diffusers) {
        diffusers_file(p)
    } else if p.output.formats.contains(&cfg::OutputFormat::Kohya) {
        kohya_file(p)
    } else {
        TRAINED_FILE.to_string()
    }
}

/// The final validation images, relative to the output folder (what `validation_images` writes).
pub fn validation_files(p: &cfg::Pipeline) -> Vec<String> {
    (0..p.validation.prompts.len())
        .flat_map(|i| (0..p.validation.num_images).map(move |j| format!("validation/{}", validation_file_name(i, j as usize))))
        .collect()
}

/// `true` when `path` (relative, `/`-separated) is what `pattern` announces (`<...>` matches any
/// run of characters within one path segment).
pub fn matches_output(pattern: &str, path: &str) -> bool {
    let p_segs: Vec<&str> = pattern.trim_end_matches('/').split('/').collect();
    let segs: Vec<&str> = path.split('/').collect();
    if p_segs.len() > segs.len() {
        return false;
    }
    // A pattern naming a folder covers everything under it.
    p_segs.iter().zip(&segs).all(|(p, s)| segment_matches(p, s))
}

fn segment_matches(pattern: &str, seg: &str) -> bool {
    let mut parts: Vec<&str> = Vec::new();
    let mut rest = pattern;
    while let Some(start) = rest.find('<') {
        let Some(end) = rest[start..].find('>') else { break };
        parts.push(&rest[..start]);
        rest = &rest[start + end + 1..];
    }
    parts.push(rest);
    if parts.len() == 1 {
        return pattern == seg;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !seg.starts_with(first) || !seg[first.len()..].ends_with(last) || seg.len() < first.len() + last.len() {
        return false;
    }
    let mut pos = first.len();
    let end = seg.len() - last.len();
    for mid in &parts[1..parts.len() - 1] {
        match seg[pos..end].find(mid) {
            Some(i) => pos += i + mid.len(),
            None => return false,
        }
    }
    true
}

/// The output folder's own files, written by the runner rather than a stage.
pub const BOOKKEEPING: &[&str] = &[super::lock::LOCK_FILE, super::run_dir::RUN_LOCK_FILE];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_follows_the_stage_ids_and_every_table_has_one_owner() {
        assert_eq!(STAGES.iter().map(|s| s.id).collect::<Vec<_>>(), StageId::ALL.to_vec());
        for table in ["model", "dataset", "preprocess", "adapter", "optimizer", "train", "checkpoints", "logging", "validation", "output"] {
            assert_eq!(StageId::ALL.iter().filter(|s| s.tables().contains(&table)).count(), 1, "[{table}]");
        }
        assert_eq!(StageId::owner_of("train.learning_rate"), Some(StageId::Train));
        assert_eq!(StageId::owner_of("validation.prompts"), Some(StageId::Validate));
        assert_eq!(StageId::owner_of("model files"), Some(StageId::Model));
        assert_eq!(StageId::owner_of("extends"), None);
    }

    #[test]
    fn output_patterns() {
        assert!(matches_output("checkpoint-<step>", "checkpoint-10/optimizer.safetensors"));
        assert!(matches_output("logs/events.out.tfevents.<...>", "logs/events.out.tfevents.17.lora.3"));
        assert!(matches_output("validation/step-<step>/<...>.png", "validation/step-3/prompt0-1.png"));
        assert!(!matches_output("validation/step-<step>/<...>.png", "validation/prompt0-1.png"));
        assert!(matches_output("metrics.jsonl", "metrics.jsonl"));
        assert!(matches_output("cache/encode/", "cache/encode/ab/abc.enc"));
        assert!(!matches_output("metrics.jsonl", "metrics.json"));
    }
}
