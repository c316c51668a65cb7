//! `lora watch`: run a pipeline, then rerun it on every edit of the file (or a base it
//! extends), from the first stage whose inputs changed; the model and dataset stay loaded.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::runner::run::{run_pipeline, RunOptions, Session};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub pipeline: super::PipelineArgs,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    let stop = crate::util::interrupt::flag();
    let mut session = Session::default();
    // Hold the output folder for the whole watch, so a second `lora run` or `lora watch` on it
    // is refused at once (exit 2) rather than between runs.
    if let Ok(loaded) = args.pipeline.load(&[]) {
        session.hold(&loaded.pipeline.output.dir)?;
    }
    let watched_cell = std::cell::RefCell::new(vec![args.pipeline.file.clone()]);
    let mut run_once = || -> anyhow::Result<()> {
        match args.pipeline.load(&[]) {
            Err(_) => eprintln!("fix the file and save: watching for changes"),
            Ok(loaded) => {
                // Watch every file the pipeline was built from (the file and its bases).
                let files: Vec<PathBuf> =
                    loaded.sources.sources.iter().filter_map(|s| { let p = PathBuf::from(&s.name); p.exists().then_some(p) }).collect();
                if !files.is_empty() {
                    *watched_cell.borrow_mut() = files;
                }
                let report = run_pipeline(&loaded, &mut session, &RunOptions::default(), stop.clone())?;
                super::run::print_summary(&report);
            }
        }
        Ok(())
    };
    crate::runner::watch::watch_loop(
        &mut || watched_cell.borrow().clone(),
        crate::util::interrupt::flag(),
        &crate::util::interrupt::requested,
        &mut run_once,
    )?;
    Ok(ExitCode::SUCCESS)
}
