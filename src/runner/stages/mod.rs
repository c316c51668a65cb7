//! The stage table: every stage of a pipeline — model, dataset, preprocess, train, export,
//! validate — with its dependencies, fingerprint, outputs, description and run function, and
//! the one walk over it that `plan`, `run --dry-run`, `run`, `watch` and `bench` share.
//!
//! One file per stage (or pair of small ones) beside this table: `load` (model, dataset,
//! preprocess), `encode`, `train`, `export`, `validate`.
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
use candle_core::Device;

use super::lock::Lock;
use super::plan::{Plan, StageId};
pub use crate::layout::{CACHE_DIR, IN_PROGRESS, METRICS_FILE, TRAINED_FILE};
use crate::train::trainer::TrainOutcome;
use std::path::PathBuf;
use super::run_dir::RunDir;
use crate::util::path::tidy_path;
use crate::data::{DataLoader, Dataset};
use crate::models::StableDiffusion;



mod encode;
mod export;
mod load;
mod train;
mod validate;


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
pub(crate) struct Ran {
    /// False when the stage stopped early (Ctrl-C): nothing is recorded and the walk ends.
    pub(crate) complete: bool,
    pub(crate) details: BTreeMap<String, serde_json::Value>,
}

impl Ran {
    fn done() -> Self {
        Self { complete: true, details: BTreeMap::new() }
    }
}

pub(crate) struct Stage {
    pub id: StageId,
    /// Upstream stages whose fingerprints this one folds in; when one of them runs, so does this.
    pub(crate) depends_on: &'static [StageId],
    /// Whether the result is on disk with a lock entry (false: loaded into memory when needed).
    pub(crate) tracked: bool,
    /// `Some(reason)` when the pipeline turns the stage off.
    pub off: fn(&Plan) -> Option<&'static str>,
    pub fingerprint: fn(&Plan) -> String,
    pub reads: fn(&Plan) -> Vec<String>,
    pub outputs: fn(&Plan) -> Vec<Output>,
    pub describe: fn(&Plan) -> String,
    /// What it runs, typed by what the loading stages hand it (which also says which loading
    /// stages it needs).
    pub(crate) run: Run,
}

pub(crate) const STAGES: &[Stage] = &[load::MODEL, load::DATASET, load::PREPROCESS, encode::ENCODE, train::TRAIN, export::EXPORT, validate::VALIDATE];

impl Plan {
    /// Resolve `loaded` once: fingerprints in table order, each seeing the upstream ones.
    pub fn resolve(loaded: &crate::config::LoadedPipeline) -> Self {
        // A launcher's world (the variables are read again, and checked, when the ranks connect),
        // else the ranks our own launcher starts (`[distributed] ranks`).
        let world = crate::dist::World::from_env()
            .ok()
            .flatten()
            .map_or_else(|| loaded.pipeline.distributed.ranks.unwrap_or(1).max(1) as usize, |w| w.size);
        let mut plan = Self { loaded: loaded.clone(), out_dir: loaded.pipeline.output.dir.clone(), fingerprints: BTreeMap::new(), no_cache: false, world };
        for stage in STAGES {
            let fp = (stage.fingerprint)(&plan);
            plan.fingerprints.insert(stage.id, fp);
        }
        plan
    }
}

/// A stage's run function, by what it is handed. The walk hands over what the loading stages
/// made (the table runs them first when a stage needs them), so no stage unwraps an `Option`.
#[derive(Clone, Copy)]
pub(crate) enum Run {
    /// A loading stage, or one that needs nothing loaded (export).
    Plain(fn(&mut StageCtx<'_>) -> Result<Ran>),
    /// Needs the model (validate).
    Model(fn(&mut StageCtx<'_>, &mut LoadedModel) -> Result<Ran>),
    /// Needs the model and the data loader (encode, train).
    ModelAndData(fn(&mut StageCtx<'_>, &mut LoadedModel, &DataLoader) -> Result<Ran>),
}

impl Stage {
    /// The loading stages whose result this stage is handed (from its [`Run`] kind).
    pub(crate) fn needs(&self) -> &'static [StageId] {
        match (self.id, self.run) {
            (StageId::Preprocess, _) => &[StageId::Dataset],
            (_, Run::Plain(_)) => &[],
            (_, Run::Model(_)) => &[StageId::Model],
            (_, Run::ModelAndData(_)) => &[StageId::Model, StageId::Preprocess],
        }
    }
}

/// The model stage's result: the diffusion stack on its device, kept in the [`Session`] between
/// runs of watch mode (by the model stage's fingerprint).
pub(crate) struct LoadedModel {
    pub(crate) fingerprint: String,
    pub device: Device,
    pub sd: StableDiffusion,
}

/// A refusal the user can resolve (exit code 2): e.g. resuming with changed settings.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// What stays loaded between runs of watch mode, and the output folder held exclusively.
#[derive(Default)]
pub struct Session {
    model: Option<LoadedModel>,
    dataset: Option<(String, Arc<Dataset>, usize)>,
    run_dir: Option<RunDir>,
}

impl Session {

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
pub(crate) trait TrainObserver {
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
    /// The job's collectives when a launcher started several ranks (`run_pipeline` connects).
    pub dist: Option<Arc<crate::dist::Comm>>,
}

/// What a run did, for the summary.
#[derive(Debug, Default)]
pub struct RunReport {
    pub train: Option<TrainOutcome>,
    pub skipped_train: bool,
    pub files: Vec<PathBuf>,
    pub(crate) skipped_images: usize,
    pub examples: usize,
    /// The resolution training ran at (`preprocess.resolution` or the model family's).
    pub resolution: Option<u32>,
    pub seconds: f64,
    /// Every stage of the table in order, with what this run did with it.
    pub stages: Vec<(&'static str, Status)>,
    /// Updates per second of this run's training (validation and plotting left out).
    pub train_rate: Option<f64>,
    /// Bytes of optimizer state (moments, moving average) the train stage kept.
    pub optimizer_state_bytes: Option<usize>,
    /// Mean loss of the first and last tenth of the steps in `metrics.jsonl` (resumes included).
    pub loss_trend: Option<crate::report::metrics::LossTrend>,
    /// A stop signal ended the run between stages or during training.
    pub stopped: bool,
    /// The earlier run's results set aside before training started over (`earlier/...`).
    pub set_aside: Option<PathBuf>,
    /// The fixed-noise evaluation loss before and after all the training (resumes included),
    /// from `metrics.jsonl`.
    pub eval_loss: (Option<f64>, Option<f64>),
    /// The held-out loss (`validation.loss_split`) before and after training, from `metrics.jsonl`.
    pub heldout_loss: (Option<f64>, Option<f64>),
    /// Seconds of the train stage spent on validation and plots between steps.
    pub(crate) side_seconds: f64,
}

/// The state a walk hands from stage to stage.
pub(crate) struct StageCtx<'a> {
    pub plan: &'a Plan,
    pub(crate) session: &'a mut Session,
    pub lock: &'a mut Lock,
    pub opts: &'a RunOptions,
    pub stop: Arc<AtomicBool>,
    pub report: &'a mut RunReport,
    /// How the train stage starts, as `plan` printed it (set when train runs).
    pub start: Option<super::resume::Start>,
    /// `lora bench`'s timing hook on the train stage.
    pub(crate) observer: Option<&'a mut (dyn TrainObserver + 'a)>,
    loader: Option<DataLoader>,
    /// The held-out examples' loader (`validation.loss_split`), made with `loader`.
    heldout: Option<DataLoader>,
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
    pub(crate) fn done_label(&self) -> String {
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
pub(crate) fn decide_all(plan: &Plan, lock: &Lock, force: bool) -> (Vec<Status>, Option<super::resume::Start>) {
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
            needed.extend(stage.needs().iter().copied());
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

/// Run `stage`, handing it what its [`Run`] kind takes: the model and the loader the loading
/// stages made (`decide` loads them for every stage that needs them, in table order).
fn run_stage(stage: &Stage, ctx: &mut StageCtx<'_>) -> Result<Ran> {
    let missing = |what: StageId| anyhow::anyhow!("the {} stage needs the {} stage's result, which the stage table runs before it", stage.id.name(), what.name());
    match stage.run {
        Run::Plain(f) => f(ctx),
        Run::Model(f) => {
            let mut model = ctx.session.model.take().ok_or_else(|| missing(StageId::Model))?;
            let ran = f(ctx, &mut model);
            ctx.session.model = Some(model);
            ran
        }
        Run::ModelAndData(f) => {
            let loader = ctx.loader.clone().ok_or_else(|| missing(StageId::Preprocess))?;
            let mut model = ctx.session.model.take().ok_or_else(|| missing(StageId::Model))?;
            let ran = f(ctx, &mut model, &loader);
            ctx.session.model = Some(model);
            ran
        }
    }
}

/// Run the stages of `plan` that are not up to date, holding its output folder for `session`;
/// `observer` watches the train stage (`lora bench`).
pub(crate) fn run_plan(plan: &Plan, session: &mut Session, opts: &RunOptions, stop: Arc<AtomicBool>, observer: Option<&mut dyn TrainObserver>) -> Result<RunReport> {
    let started = Instant::now();
    let mut plan = plan.clone();
    // Every rank trains with the same seed: rank 0's, when the file leaves it to chance.
    plan.pick_seed();
    if let Some(c) = &opts.dist {
        plan.loaded.pipeline.train.seed = Some(c.broadcast_json(plan.loaded.pipeline.train.seed.as_ref())?);
        if !c.is_main() {
            return follow_plan(plan, session, opts, stop, c.clone(), started);
        }
    }
    plan.no_cache = opts.no_cache;
    let dir = plan.out_dir.clone();
    let held = session.hold(&dir);
    let lock = held.and_then(|_| Lock::read(&dir));
    let decided = lock.map(|mut lock| {
        lock.pipeline = plan.loaded.path.display().to_string();
        let (statuses, start) = decide_all(&plan, &lock, opts.force);
        (lock, statuses, start)
    });
    // Rank 0 tells the other ranks what this run does before anything loads: train or not.
    if let Some(c) = &opts.dist {
        let go = match &decided {
            Err(e) => Go::Failed(format!("{e:#}")),
            Ok((_, statuses, _)) => match statuses.iter().find_map(|s| if let Status::Refused(w) = s { Some(w.clone()) } else { None }) {
                Some(why) => Go::Failed(why),
                None => Go::Train(STAGES.iter().zip(statuses).any(|(st, s)| st.id == StageId::Train && matches!(s, Status::Run(_)))),
            },
        };
        c.broadcast_json(Some(&go))?;
    }
    let (mut lock, statuses, start) = decided?;
    // Refused before anything loads or changes (what `plan` says as "refused").
    if let Some(why) = statuses.iter().find_map(|s| if let Status::Refused(w) = s { Some(w.clone()) } else { None }) {
        return Err(Refused(why).into());
    }
    let mut report = RunReport::default();
    // (A reborrow for the walk's own lifetime.)
    let observer = observer.map(|o| o as &mut dyn TrainObserver);
    let mut ctx = StageCtx { plan: &plan, session, lock: &mut lock, opts, stop, report: &mut report, start, observer, loader: None, heldout: None };
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
        let ran = run_stage(stage, &mut ctx).with_context(|| format!("stage {}", stage.id.name()))?;
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

/// What rank 0 tells the other ranks after deciding: whether training runs, or why the job ends.
#[derive(serde::Serialize, serde::Deserialize)]
enum Go {
    Train(bool),
    Failed(String),
}

/// The walk of a rank other than 0: nothing of the output folder is held, read for deciding or
/// written. It loads the model and the data, and trains when rank 0 trains, its share of every
/// batch; rank 0 encodes the cache, saves checkpoints, exports and validates.
fn follow_plan(mut plan: Plan, session: &mut Session, opts: &RunOptions, stop: Arc<AtomicBool>, comm: Arc<crate::dist::Comm>, started: Instant) -> Result<RunReport> {
    plan.no_cache = opts.no_cache;
    let mut report = RunReport::default();
    match comm.broadcast_json::<Go>(None)? {
        Go::Failed(why) => anyhow::bail!("rank 0 ends the job before training: {why}"),
        Go::Train(false) => {
            tracing::info!("rank {}: rank 0 does not train this time (up to date); nothing to do", comm.rank());
            report.seconds = started.elapsed().as_secs_f64();
            return Ok(report);
        }
        Go::Train(true) => {}
    }
    let mut lock = Lock::default();
    let mut ctx = StageCtx { plan: &plan, session, lock: &mut lock, opts, stop, report: &mut report, start: None, observer: None, loader: None, heldout: None };
    for stage in STAGES.iter().filter(|s| matches!(s.id, StageId::Model | StageId::Dataset | StageId::Preprocess | StageId::Train)) {
        ctx.report.stages.push((stage.id.name(), if stage.tracked { Status::Run(format!("rank {} of {}", comm.rank(), comm.size())) } else { Status::Load }));
        let ran = run_stage(stage, &mut ctx).with_context(|| format!("rank {}: stage {}", comm.rank(), stage.id.name()))?;
        if !ran.complete {
            break;
        }
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

/// The `{rate}` key: `13.2 it/s`, or `2.35 s/it` below one a second (indicatif's `{per_sec}`
/// prints four decimals).
pub(super) fn with_rate(style: indicatif::ProgressStyle) -> indicatif::ProgressStyle {
    style.with_key("rate", |state: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
        let per_sec = state.per_sec();
        let _ = if per_sec >= 1.0 { write!(w, "{per_sec:.1} it/s") } else if per_sec > 0.0 { write!(w, "{:.2} s/it", 1.0 / per_sec) } else { Ok(()) };
    })
}

pub(super) fn progress_bar(total: usize, start: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} train [{bar:30}] {pos}/{len} {msg} {rate} ETA {eta}").map(with_rate)
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_position(start as u64);
    bar
}

/// The output folder's own files, written by the runner rather than a stage.
pub const BOOKKEEPING: &[&str] = &[crate::layout::LOCK_FILE, super::run_dir::RUN_LOCK_FILE];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table_follows_the_stage_ids_and_every_table_has_one_owner() {
        assert_eq!(STAGES.iter().map(|s| s.id).collect::<Vec<_>>(), StageId::ALL.to_vec());
        for table in ["model", "dataset", "preprocess", "adapter", "optimizer", "train", "checkpoints", "logging", "validation", "output", "distributed"] {
            assert_eq!(StageId::ALL.iter().filter(|s| s.tables().contains(&table)).count(), 1, "[{table}]");
        }
        assert_eq!(StageId::owner_of("train.learning_rate"), Some(StageId::Train));
        assert_eq!(StageId::owner_of("validation.prompts"), Some(StageId::Validate));
        assert_eq!(StageId::owner_of("model files"), Some(StageId::Model));
        assert_eq!(StageId::owner_of("extends"), None);
        // What each stage is handed, by its run kind.
        let needs: Vec<(StageId, &[StageId])> = STAGES.iter().map(|s| (s.id, s.needs())).collect();
        assert_eq!(
            needs,
            vec![
                (StageId::Model, &[][..]),
                (StageId::Dataset, &[][..]),
                (StageId::Preprocess, &[StageId::Dataset][..]),
                (StageId::Encode, &[StageId::Model, StageId::Preprocess][..]),
                (StageId::Train, &[StageId::Model, StageId::Preprocess][..]),
                (StageId::Export, &[][..]),
                (StageId::Validate, &[StageId::Model][..]),
            ]
        );
    }

}
