//! `lora run`: validate a pipeline, then walk the stage table (model, dataset, preprocess, train,
//! export, validate), skipping the stages whose inputs did not change since the last run.

use std::process::ExitCode;

use crate::runner::run::run_pipeline;
use crate::runner::stages::{RunOptions, RunReport, Session};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub pipeline: super::PipelineArgs,
    /// Run every stage even if `lora.lock` says it is up to date.
    #[arg(long)]
    pub force: bool,
    /// Validate and print the plan (stages, what each reads and writes, what is up to date),
    /// then stop: no model is loaded, nothing is written.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// Run the VAE and text encoder every step, as the reference does (no encode stage, no
    /// encode cache).
    #[arg(long)]
    pub no_cache: bool,
    /// Start N CPU ranks of this run on this machine (our own launcher, as `[distributed]
    /// ranks`); under torchrun or srun the launcher's ranks are used instead.
    #[arg(long, value_name = "N")]
    pub ranks: Option<u32>,
    /// One rank per GPU: not available yet (GPU ranks need NCCL, which this build lacks).
    #[arg(long, value_name = "N")]
    pub gpus: Option<u32>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.dry_run {
        return super::plan::run(super::plan::Args { pipeline: args.pipeline, force: args.force, no_cache: args.no_cache, json: false });
    }
    // The flags are the `[distributed]` keys, so validation judges them as it judges the file.
    let mut extra = Vec::new();
    if let Some(n) = args.ranks {
        extra.push(format!("distributed.ranks={n}"));
    }
    if let Some(n) = args.gpus {
        extra.push(format!("distributed.gpus={n}"));
    }
    let loaded = match args.pipeline.load(&extra) {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    let ranks = loaded.pipeline.distributed.ranks.unwrap_or(1) as usize;
    if ranks > 1 && crate::dist::World::from_env()?.is_none() {
        return crate::dist::launch::launch_local(ranks);
    }
    let stop = crate::util::interrupt::flag();
    let mut session = Session::default();
    let report = run_pipeline(&loaded, &mut session, &RunOptions { force: args.force, no_cache: args.no_cache, dist: None }, stop)?;
    print_summary(&report, Resumes::Rerun);
    if report.stopped {
        return Ok(ExitCode::from(crate::util::interrupt::exit_code()));
    }
    Ok(ExitCode::SUCCESS)
}

/// How a stopped run continues, for the summary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Resumes {
    /// `lora run` again.
    Rerun,
    /// `lora watch` runs the edited pipeline next by itself.
    Watch,
}

/// The end-of-run summary on stdout.
pub(crate) fn print_summary(report: &RunReport, resumes: Resumes) {
    println!("summary");
    let stages: Vec<String> = report.stages.iter().map(|(name, st)| format!("{name} ({})", st.done_label())).collect();
    println!("  stages     {}", stages.join(", "));
    println!("  examples   {} ({} bad image(s) skipped)", report.examples, report.skipped_images);
    if let Some(dir) = &report.set_aside {
        println!("  set aside  {} (the earlier run's results)", shown_path(dir).display());
    }
    match &report.train {
        Some(t) => {
            let state = match (t.interrupted, resumes) {
                (false, _) => "",
                (true, Resumes::Rerun) => " (stopped: `lora run` again resumes from the checkpoint)",
                (true, Resumes::Watch) => " (stopped: the edited pipeline runs next and resumes if it can)",
            };
            println!("  steps      {}/{}{state}", t.global_step, t.max_train_steps);
            if let Some(dir) = &t.resumed_from {
                println!("  resumed    {}", shown_path(dir).display());
            }
            if let (true, Some(dir)) = (t.interrupted, t.checkpoints.last()) {
                println!("  checkpoint {}", shown_path(dir).display());
            }
            match (&report.loss_trend, t.first_loss, t.final_loss) {
                (Some(l), _, _) if l.steps > 1 => println!(
                    "  loss       {:.4} (mean of the first {} of {} steps) -> {:.4} (mean of the last {})",
                    l.first_mean, l.window, l.steps, l.last_mean, l.window
                ),
                (_, Some(first), Some(last)) => println!("  loss       {first:.4} (first step) -> {last:.4} (last step)"),
                _ => {}
            }
            if let (Some(before), Some(after)) = report.eval_loss {
                println!("  eval loss  {before:.4} -> {after:.4} (fixed noise, {:+.2}%)", (after / before - 1.0) * 100.0);
            }
            if let (Some(before), Some(after)) = report.heldout_loss {
                println!("  val loss   {before:.4} -> {after:.4} (held-out examples, fixed noise, {:+.2}%)", (after / before - 1.0) * 100.0);
            }
            if let Some(scale) = t.loss_scale {
                println!("  fp16       {} skipped step(s) (inf/NaN gradients), loss scale {scale}", t.skipped_steps);
            }
            // The rate counts training alone; validation and plotting between steps are shown apart.
            let rate = report.train_rate.map(|r| format!(" ({})", rate_text(r))).unwrap_or_default();
            let side = if report.side_seconds >= 0.05 { format!(", plus {:.1} s of validation and plots", report.side_seconds) } else { String::new() };
            println!("  train time {:.1} s{rate}{side}", (t.seconds - report.side_seconds).max(0.0));
        }
        None if report.skipped_train => println!("  train      up to date (nothing to do)"),
        None => {}
    }
    println!("  total time {:.1} s", report.seconds);
    for f in &report.files {
        println!("  wrote      {}", shown_path(f).display());
    }
}

/// `21.9 it/s`, or `2.35 s/it` below one update a second.
pub(crate) fn rate_text(per_second: f64) -> String {
    if per_second >= 1.0 {
        format!("{per_second:.1} it/s")
    } else {
        format!("{:.2} s/it", 1.0 / per_second)
    }
}

/// `path` as a user reads it: relative to the current folder when under it, with `.` and `..`
/// folded (`runs/tiny/x`, not `pipelines/../runs/tiny/x` or `/home/me/proj/runs/tiny/x`).
pub(crate) fn shown_path(path: &std::path::Path) -> std::path::PathBuf {
    let tidy = crate::util::path::tidy_path(path);
    if tidy.is_absolute() {
        if let Some(rel) = std::env::current_dir().ok().and_then(|cwd| tidy.strip_prefix(crate::util::path::tidy_path(&cwd)).ok().map(|r| r.to_path_buf())) {
            return if rel.as_os_str().is_empty() { ".".into() } else { rel };
        }
    }
    tidy
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_and_paths_read_well() {
        assert_eq!(rate_text(21.94), "21.9 it/s");
        assert_eq!(rate_text(1.0), "1.0 it/s");
        assert_eq!(rate_text(0.4), "2.50 s/it");
        assert_eq!(shown_path(std::path::Path::new("pipelines/../runs/tiny/a.safetensors")), std::path::PathBuf::from("runs/tiny/a.safetensors"));
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(shown_path(&cwd.join("runs/./tiny/x.png")), std::path::PathBuf::from("runs/tiny/x.png"));
        assert_eq!(shown_path(std::path::Path::new("/elsewhere/x")), std::path::PathBuf::from("/elsewhere/x"));
    }
}
