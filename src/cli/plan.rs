//! `lora plan` (and `lora run --dry-run`): the stage table walked over a pipeline, with what
//! each stage reads and writes and whether `lora run` would run it now (from `lora.lock`).

use std::process::ExitCode;

use crate::util::path::tidy_path;
use crate::runner::lock::Lock;
use crate::runner::plan::Plan;
use crate::runner::stages::{describe, BOOKKEEPING};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub pipeline: super::PipelineArgs,
    /// As `lora run --force` would: every stage runs.
    #[arg(long)]
    pub force: bool,
    /// As `lora run --no-cache` would: no encode stage.
    #[arg(long)]
    pub no_cache: bool,
    /// Print the plan as one JSON object (stages, status, reads, writes).
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let loaded = match args.pipeline.load(&[]) {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    let mut plan = Plan::resolve(&loaded);
    plan.no_cache = args.no_cache;
    // As `lora run` reads it: a damaged lock is an error there, and here.
    let lock = Lock::read(&plan.out_dir)?;
    let stages = describe(&plan, &lock, args.force);
    let out = tidy_path(&plan.out_dir);
    let busy = crate::runner::run_dir::RunDir::holder(&plan.out_dir);
    if args.json {
        let json = serde_json::json!({
            "pipeline": args.pipeline.file.display().to_string(),
            "output_dir": out.display().to_string(),
            "busy_pid": busy,
            "bookkeeping": BOOKKEEPING,
            "stages": stages,
        });
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(ExitCode::SUCCESS);
    }
    println!("plan for {} (output folder {})", args.pipeline.file.display(), out.display());
    if let Some(pid) = &busy {
        println!("busy: another lora process (PID {pid}) holds {}: `lora run` would exit 2 until it ends", out.display());
    }
    for (i, s) in stages.iter().enumerate() {
        println!("{}. {:<10} {} [{}]", i + 1, s.name, s.description, s.status.label());
        for r in &s.reads {
            println!("   reads    {r}");
        }
        for w in &s.writes {
            println!("   writes   {}  ({})", out.join(&w.path).display(), w.what);
        }
    }
    Ok(ExitCode::SUCCESS)
}
