//! The command line: one file per command; this file only parses and dispatches.
//!
//! Exit codes: 0 ok, 1 the run failed, 2 the input is invalid or the run was refused (busy output
//! folder, resume with changed settings), 128 + the signal's number when SIGINT / SIGTERM /
//! SIGHUP stopped the run at a checkpoint (130 / 143 / 129).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

pub mod bench;
pub mod cache;
pub mod convert;
pub mod generate;
pub mod inspect;
pub mod plan;
pub mod run;
pub mod schema;
pub mod validate;
pub mod watch;

/// Train LoRA adapters for Stable Diffusion from declarative TOML pipeline files.
#[derive(Parser, Debug)]
#[command(name = "lora", version, about, long_about = None)]
pub(crate) struct Cli {
    /// More log output (-v debug, -vv trace). `RUST_LOG` overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub(crate) verbose: u8,
    /// Only warnings and errors.
    #[arg(short, long, global = true)]
    pub(crate) quiet: bool,
    /// Log line format on stderr: text (coloured on a terminal) or json (one object per line).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    pub(crate) log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Check pipeline files against the schema and cross-field rules; print every problem.
    Validate(validate::Args),
    /// Print the stages of a pipeline in order with what each reads and writes.
    Plan(plan::Args),
    /// Print the JSON Schema of pipeline files.
    Schema(schema::Args),
    /// Run a pipeline: load the model and data, train the LoRA, write the adapter.
    Run(run::Args),
    /// Generate images with a model and optional LoRA adapters.
    Generate(generate::Args),
    /// Describe a LoRA file: format, targets, rank and alpha per module, metadata.
    Inspect(inspect::Args),
    /// Convert a LoRA file between the diffusers, kohya and PEFT forms.
    Convert(convert::Args),
    /// Time the training step of a pipeline: ms per step, images/s, peak memory.
    Bench(bench::Args),
    /// Run a pipeline and rerun it on every edit, from the first stage whose inputs changed.
    Watch(watch::Args),
    /// List or clear the encode cache of a pipeline's output folder.
    Cache(cache::Args),
}

/// How log lines are written.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(crate) enum LogFormat {
    /// Human-readable lines, coloured only when stderr is a terminal.
    #[default]
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// The pipeline file and `--set` overrides, shared by `plan`, `run`, `watch` and `bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct PipelineArgs {
    /// The pipeline file.
    #[arg(value_name = "FILE")]
    pub file: std::path::PathBuf,
    /// Override a key with a TOML value, e.g. `--set train.max_steps=10` (repeatable; a string may
    /// be given unquoted).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

impl PipelineArgs {
    /// Load and validate the pipeline, with `extra` overrides after the user's. Diagnostics are
    /// printed to stderr (warnings too); an invalid pipeline gives the exit code to return.
    pub fn load(&self, extra: &[String]) -> Result<crate::config::LoadedPipeline, ExitCode> {
        self.load_except(extra, &[])
    }

    /// [`Self::load`] without printing the warnings about keys under `quiet` (a command that
    /// overrides those settings itself, as `lora bench` does with checkpoints).
    pub(crate) fn load_except(&self, extra: &[String], quiet: &[&str]) -> Result<crate::config::LoadedPipeline, ExitCode> {
        let mut overrides = self.overrides.clone();
        overrides.extend_from_slice(extra);
        let styled = std::io::IsTerminal::is_terminal(&std::io::stderr());
        match crate::preflight::load_pipeline(&self.file, &overrides) {
            Ok(loaded) => {
                let mut shown = loaded.warnings.clone();
                shown.0.retain(|d| !d.key_path.as_deref().is_some_and(|k| quiet.iter().any(|q| k == *q || k.starts_with(&format!("{q}.")))));
                eprint!("{}", shown.render_styled(styled));
                Ok(loaded)
            }
            Err(diags) => {
                eprint!("{}", diags.render_styled(styled));
                Err(ExitCode::from(EXIT_INVALID))
            }
        }
    }
}

/// Exit code for a run that failed.
pub(crate) const EXIT_FAILED: u8 = 1;
/// Exit code for invalid input.
pub(crate) const EXIT_INVALID: u8 = 2;

pub fn main() -> ExitCode {
    restore_sigpipe();
    pin_thread_count();
    keep_freed_memory();
    let cli = Cli::parse();
    init_logging(cli.verbose, cli.quiet, cli.log_format);
    let result = match cli.command {
        Command::Validate(a) => validate::run(a),
        Command::Plan(a) => plan::run(a),
        Command::Schema(a) => schema::run(a),
        Command::Run(a) => run::run(a),
        Command::Generate(a) => generate::run(a),
        Command::Inspect(a) => inspect::run(a),
        Command::Convert(a) => convert::run(a),
        Command::Watch(a) => watch::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Cache(a) => cache::run(a),
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            // A busy output folder or a refused resume is the user's to resolve, not a failure.
            let refused = err.chain().any(|e| e.is::<crate::runner::run_dir::FolderBusy>() || e.is::<crate::runner::stages::Refused>() || e.is::<crate::train::checkpoint::PastTheEnd>());
            ExitCode::from(if refused { EXIT_INVALID } else { EXIT_FAILED })
        }
    }
}

/// Rust ignores SIGPIPE, so `lora plan x.toml | head` would panic on the closed pipe; restore
/// the default (exit quietly), as command-line tools do.
fn restore_sigpipe() {
    #[cfg(unix)]
    // SAFETY: called first thing in main, before any thread exists; SIG_DFL is always valid.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// candle asks for its thread count on every matmul and, without `RAYON_NUM_THREADS`, answers by
/// parsing `/proc/cpuinfo` each time (10-20% of a small training step). Set the variable once, to
/// the cores this process may use, before any thread starts. Several ranks on one machine
/// (torchrun's `LOCAL_WORLD_SIZE`, SLURM's `SLURM_NTASKS_PER_NODE`) share its cores evenly.
fn pin_thread_count() {
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        let n = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let local = ["LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"]
            .iter()
            .find_map(|k| std::env::var(k).ok()?.trim().parse::<usize>().ok())
            .filter(|&l| l > 1)
            .unwrap_or(1);
        std::env::set_var("RAYON_NUM_THREADS", (n / local).max(1).to_string());
    }
}

/// glibc serves every allocation above 128 KiB-32 MiB (its adaptive threshold) with a fresh
/// `mmap` and unmaps it on free, so each activation and gradient of a training step is zeroed by
/// the kernel page by page on first touch: at 256 px on the tiny model that was ~37 000 page
/// faults and about a fifth of the CPU time per step. Serve blocks up to 32 MiB (glibc's
/// maximum for this setting) from the heap and do not hand freed memory back, so the next
/// step reuses it. The process's peak memory is unchanged; it just stays resident.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before other threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

fn init_logging(verbose: u8, quiet: bool, format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let default = match (quiet, verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false);
    let _ = match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .without_time()
            .try_init(),
        LogFormat::Json => builder.json().with_ansi(false).try_init(),
    };
}
