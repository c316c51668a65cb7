//! The entry points that walk the stage table: `run_pipeline` (`lora run`, `lora watch`) and
//! `bench_pipeline` (`lora bench`: the same walk with a timing hook on the train stage).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::Device;

use super::plan::Plan;
use super::stages::{RunOptions, RunReport, Session};
use crate::config::LoadedPipeline;

/// Run every stage of `loaded` that is not up to date (the stage table in `runner::stages`).
/// `stop` ends training cleanly (a stop signal, or an edit in watch mode).
/// Under a launcher (torchrun, srun) this process is one rank of several: it connects to the
/// others first (`crate::dist`), and only rank 0 walks the whole table (see `docs/distributed.md`).
pub fn run_pipeline(loaded: &LoadedPipeline, session: &mut Session, opts: &RunOptions, stop: Arc<AtomicBool>) -> Result<RunReport> {
    let plan = Plan::resolve(loaded);
    let mut opts = opts.clone();
    if opts.dist.is_none() {
        if let Some(world) = crate::dist::World::from_env()? {
            opts.dist = Some(Arc::new(connect_job(&plan, &world)?));
        }
    }
    let opts = &opts;
    let mut report = super::stages::run_plan(&plan, session, opts, stop, None)?;
    report.skipped_train = report.train.is_none() && report.stages.iter().any(|(n, s)| *n == "train" && *s == super::stages::Status::UpToDate);
    Ok(report)
}

/// Connect this rank to the job `world` describes, on `[distributed] port`, `LORA_DIST_PORT` or
/// the launcher's port + 1. Refused: several ranks on GPUs (they need NCCL, which this build
/// does not have).
fn connect_job(plan: &Plan, world: &crate::dist::World) -> Result<crate::dist::Comm> {
    let p = plan.pipeline();
    let gpu = match p.train.device {
        crate::config::types::Device::Cpu => false,
        crate::config::types::Device::Cuda(_) => true,
        crate::config::types::Device::Auto => crate::device::CUDA_BUILT,
    };
    if gpu {
        bail!(
            "this is rank {} of {} on a GPU: several GPU ranks need NCCL, which this build does not have (its TCP collectives are for CPU ranks); \
             run one process, or set train.device = \"cpu\" to train on CPU ranks",
            world.rank,
            world.size
        );
    }
    let port = match (p.distributed.port, std::env::var("LORA_DIST_PORT").ok()) {
        (Some(port), _) => port,
        (None, Some(v)) => v.trim().parse::<u16>().map_err(|_| anyhow::anyhow!("LORA_DIST_PORT={v:?} is not a port number"))?,
        (None, None) => world.master_port.checked_add(crate::dist::PORT_OFFSET).ok_or_else(|| anyhow::anyhow!("MASTER_PORT {} has no port after it", world.master_port))?,
    };
    let job = plan.fingerprint(super::plan::StageId::Train).to_string();
    tracing::info!(
        "rank {} of {} ({:?}, local rank {}): {} on port {port}",
        world.rank,
        world.size,
        world.launcher,
        world.local_rank,
        if world.is_main() { "waiting for the other ranks".to_string() } else { format!("joining rank 0 at {}", world.master_addr) }
    );
    let comm = crate::dist::Comm::connect(world, port, std::time::Duration::from_secs(p.distributed.timeout_s), &job)?;
    tracing::info!("rank {} of {}: every rank joined", world.rank, world.size);
    Ok(comm)
}

/// What `lora bench` needs back.
#[derive(Debug)]
pub struct BenchReport {
    /// When the first training step started (after model and data loading and encoding).
    pub(crate) train_started: Instant,
    pub(crate) device_is_cpu: bool,
    /// `cpu (2 threads)`, `cuda:0 (NVIDIA H200, 139.8 GiB)`.
    pub device: String,
    /// Peak device memory in use up to the end of training (GPU only; `device::peak_memory`:
    /// the CUDA context and the model included).
    pub(crate) peak_device_bytes: Option<u64>,
    /// Device memory in use after the set-up, before training (GPU only; context included).
    pub(crate) model_bytes: Option<u64>,
    /// Peak host memory of the set-up (model load, encoding), before the peak was reset for the
    /// training steps (`None` where it cannot be reset).
    pub(crate) setup_peak_rss_bytes: Option<u64>,
    /// What the walk did (the train outcome, the files written into the bench's folder).
    pub run: RunReport,
}

/// Times the train stage for [`bench_pipeline`].
struct BenchObserver<'a> {
    on_update: &'a mut dyn FnMut(usize, usize, f64, f64),
    train_started: Option<Instant>,
    device: Option<(bool, String)>,
    model_bytes: Option<u64>,
    setup_peak_rss_bytes: Option<u64>,
    peak_device_bytes: Option<u64>,
    sampler: Option<crate::device::Sampler>,
}

impl super::stages::TrainObserver for BenchObserver<'_> {
    fn starting(&mut self, device: &Device) {
        // Device memory: the peak during training includes the model (loaded before this point).
        self.model_bytes = crate::device::peak_memory(device);
        // Host memory: the peak of the training steps alone (the model stays resident, so it is
        // included), not of loading and encoding.
        self.setup_peak_rss_bytes = crate::util::memory::reset_peak_rss();
        self.sampler = crate::device::start_sampler(device);
        self.device = Some((device.is_cpu(), crate::device::describe(device)));
        self.train_started = Some(Instant::now());
    }

    fn update(&mut self, step: usize, total: usize, loss: f64, lr: f64) {
        (self.on_update)(step, total, loss, lr);
    }

    fn finished(&mut self, device: &Device) {
        self.sampler = None;
        self.peak_device_bytes = crate::device::peak_memory(device);
    }
}

/// `lora bench`: walk the stage table over `loaded` exactly as `lora run` does (into its
/// `output.dir`, which the caller makes a fresh folder), timing the train stage: `on_update`
/// is called after each update. With `no_cache` the VAE and text encoder run every step (no
/// encode stage), as the reference does; without, the encode stage fills the cache first, as in
/// `lora run`, and the timed steps read it.
pub fn bench_pipeline(loaded: &LoadedPipeline, no_cache: bool, on_update: &mut dyn FnMut(usize, usize, f64, f64)) -> Result<BenchReport> {
    let mut observer =
        BenchObserver { on_update, train_started: None, device: None, model_bytes: None, setup_peak_rss_bytes: None, peak_device_bytes: None, sampler: None };
    if let Some(w) = crate::dist::World::from_env()? {
        bail!("lora bench runs one process; it was started as rank {} of {} (run it without the launcher)", w.rank, w.size);
    }
    let opts = RunOptions { force: false, no_cache, dist: None };
    let run = super::stages::run_plan(&Plan::resolve(loaded), &mut Session::default(), &opts, Arc::new(AtomicBool::new(false)), Some(&mut observer))?;
    let (Some(train_started), Some((device_is_cpu, device))) = (observer.train_started, observer.device.take()) else {
        bail!("the train stage did not run (is {} a fresh folder?)", loaded.pipeline.output.dir.display());
    };
    Ok(BenchReport {
        train_started,
        device_is_cpu,
        device,
        peak_device_bytes: observer.peak_device_bytes,
        model_bytes: observer.model_bytes,
        setup_peak_rss_bytes: observer.setup_peak_rss_bytes,
        run,
    })
}
