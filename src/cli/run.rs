//! `lora run`: validate a pipeline, then walk the stage table (model, dataset, preprocess, train,
//! export, validate), skipping the stages whose inputs did not change since the last run.

use std::process::ExitCode;

use crate::runner::run::{run_pipeline, RunOptions, RunReport, Session};

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
    pub dry_run: bool,
    /// Run the VAE and text encoder every step, as the reference does (no encode stage, no
    /// encode cache).
    #[arg(long)]
    pub no_cache: bool,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if args.dry_run {
        return super::plan::run(super::plan::Args { pipeline: args.pipeline, force: args.force, no_cache: args.no_cache, json: false });
    }
    let loaded = match args.pipeline.load(&[]) {
        Ok(l) => l,
        Err(code) => return Ok(code),
    };
    let stop = crate::util::interrupt::flag();
    let mut session = Session::default();
    let report = run_pipeline(&loaded, &mut session, &RunOptions { force: args.force, no_cache: args.no_cache }, stop)?;
    print_summary(&report);
    if report.train.as_ref().is_some_and(|t| t.interrupted) {
        return Ok(ExitCode::from(130));
    }
    Ok(ExitCode::SUCCESS)
}

/// The end-of-run summary on stdout.
pub fn print_summary(report: &RunReport) {
    println!("summary");
    let stages: Vec<String> = report.stages.iter().map(|(name, st)| format!("{name} ({})", st.done_label())).collect();
    println!("  stages     {}", stages.join(", "));
    println!("  examples   {} ({} bad image(s) skipped)", report.examples, report.skipped_images);
    match &report.train {
        Some(t) => {
            let state = if t.interrupted { " (interrupted: run again to resume)" } else { "" };
            println!("  steps      {}/{}{state}", t.global_step, t.max_train_steps);
            if let Some(dir) = &t.resumed_from {
                println!("  resumed    {}", dir.display());
            }
            if let (Some(first), Some(last)) = (t.first_loss, t.final_loss) {
                println!("  loss       {first:.4} (first step) -> {last:.4} (last step)");
            }
            if let (Some(before), Some(after)) = (t.eval_loss_before, t.eval_loss_after) {
                println!("  eval loss  {before:.4} -> {after:.4} (fixed noise, {:+.2}%)", (after / before - 1.0) * 100.0);
            }
            if let Some(scale) = t.loss_scale {
                println!("  fp16       {} skipped step(s) (inf/NaN gradients), loss scale {scale}", t.skipped_steps);
            }
            println!("  train time {:.1} s", t.seconds);
        }
        None if report.skipped_train => println!("  train      up to date (nothing to do)"),
        None => {}
    }
    println!("  total time {:.1} s", report.seconds);
    for f in &report.files {
        println!("  wrote      {}", f.display());
    }
}
