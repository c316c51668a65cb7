//! `lora watch`: run a pipeline, then rerun it on every edit of the file (or a base it
//! extends), from the first stage whose inputs changed; the model and dataset stay loaded. An
//! edit during training is validated first: an invalid one is shown (`FILE:LINE:COL`) and
//! training goes on; one that leaves training's inputs as they are lets it finish.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use crate::runner::plan::{Plan, StageId};
use crate::runner::run::run_pipeline;
use crate::runner::stages::{RunOptions, Session};
use crate::runner::watch::Verdict;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub pipeline: super::PipelineArgs,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if let Some(w) = crate::dist::World::from_env()? {
        anyhow::bail!("lora watch runs one process; it was started as rank {} of {} by a launcher (use `lora run` under torchrun or srun)", w.rank, w.size);
    }
    if !args.pipeline.file.is_file() {
        eprintln!("error: {} is not a file: give the pipeline file to watch", args.pipeline.file.display());
        return Ok(ExitCode::from(super::EXIT_INVALID));
    }
    let stop = crate::util::interrupt::flag();
    let mut session = Session::default();
    // Hold the output folder for the whole watch, so a second `lora run` or `lora watch` on it
    // is refused at once (exit 2) rather than between runs. (Quietly: the first run below
    // prints whatever is wrong with the file.)
    if let Ok(loaded) = crate::preflight::load_pipeline(&args.pipeline.file, &args.pipeline.overrides) {
        session.hold(&loaded.pipeline.output.dir)?;
    }
    // The output folder and train fingerprint of the run in progress, for judging edits.
    let running: Arc<Mutex<Option<Running>>> = Arc::new(Mutex::new(None));
    let check = {
        let (running, pipeline) = (running.clone(), args.pipeline.clone());
        Arc::new(move || judge_edit(&pipeline, running.lock().expect("watch state").clone()))
    };
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
                let plan = Plan::resolve(&loaded);
                *running.lock().expect("watch state") = Some(Running {
                    out: plan.out_dir.clone(),
                    train: plan.fingerprint(StageId::Train).to_string(),
                    tables: loaded.resolved.clone(),
                });
                let report = run_pipeline(&loaded, &mut session, &RunOptions::default(), stop.clone());
                *running.lock().expect("watch state") = None;
                super::run::print_summary(&report?, super::run::Resumes::Watch);
            }
        }
        Ok(())
    };
    crate::runner::watch::watch_loop(
        &mut || watched_cell.borrow().clone(),
        crate::util::interrupt::flag(),
        &crate::util::interrupt::requested,
        check,
        &mut run_once,
    )?;
    if crate::util::interrupt::requested() {
        return Ok(ExitCode::from(crate::util::interrupt::exit_code()));
    }
    Ok(ExitCode::SUCCESS)
}

/// What an edit during a run is judged against: the run's output folder, train fingerprint and
/// pipeline tables as resolved.
#[derive(Clone)]
struct Running {
    out: PathBuf,
    train: String,
    tables: toml::Table,
}

/// Whether an edit made while `running` should stop it.
fn judge_edit(pipeline: &super::PipelineArgs, running: Option<Running>) -> Verdict {
    let Some(running) = running else { return Verdict::KeepGoing("no training is running".into()) };
    match crate::preflight::load_pipeline(&pipeline.file, &pipeline.overrides) {
        Err(diags) => {
            eprint!("{}", diags.render_styled(std::io::IsTerminal::is_terminal(&std::io::stderr())));
            Verdict::KeepGoing("the edited file is not valid (above): training goes on; fix it and save".into())
        }
        Ok(loaded) => {
            let plan = Plan::resolve(&loaded);
            // Which tables changed, and which stage owns each (the stage table's declarations).
            let names: std::collections::BTreeSet<&String> = running.tables.keys().chain(loaded.resolved.keys()).collect();
            let changed: Vec<String> = names
                .into_iter()
                .filter(|k| running.tables.get(*k) != loaded.resolved.get(*k))
                .map(|k| match StageId::owner_of(k) {
                    Some(stage) => format!("[{k}] ({} stage)", stage.name()),
                    None => format!("[{k}]"),
                })
                .collect();
            let what = if changed.is_empty() { "the edit".to_string() } else { format!("the edit changes {}", changed.join(", ")) };
            if plan.out_dir != running.out {
                Verdict::KeepGoing(format!("{what}: this run finishes in the old folder, then the edited pipeline runs in the new one"))
            } else if plan.fingerprint(StageId::Train) != running.train {
                Verdict::Stop(format!("{what}, which changes what is being trained"))
            } else {
                Verdict::KeepGoing(format!("{what}; training's inputs are unchanged: it goes on, and the stages after it rerun when it is done"))
            }
        }
    }
}
