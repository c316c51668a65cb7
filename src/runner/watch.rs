//! Watch mode: rerun the pipeline whenever its file (or an `extends` base) changes.
//!
//! Editors save by writing or by renaming a temporary file over the original, so the watcher
//! watches the parent directories and filters events by file name. An edit during a run is
//! judged first (`check`): an edit that does not parse or validate is reported and training goes
//! on; one that leaves the train stage's inputs as they are lets training finish (the later
//! stages rerun after it); only one that changes what is being trained stops it, at the next
//! step with a checkpoint, and the next run resumes or starts over as the runner decides.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use notify::{RecursiveMode, Watcher};

fn canonical(p: &Path) -> PathBuf {
    p.canonicalize().unwrap_or_else(|_| p.to_path_buf())
}

/// What an edit made during a run means for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Stop the run at the next step (the train stage's own inputs changed).
    Stop(String),
    /// Let the run go on, saying why; the edited pipeline runs after it.
    KeepGoing(String),
}

/// Run `run_once` now and after every change to any file `watched_files()` returns (asked again
/// after each run, since `extends` may change). An edit during a run is judged by `check`, which
/// may set `stop`; `quit` ends the loop (a stop signal).
pub(crate) fn watch_loop(
    watched_files: &mut dyn FnMut() -> Vec<PathBuf>,
    stop: Arc<AtomicBool>,
    quit: &dyn Fn() -> bool,
    check: Arc<dyn Fn() -> Verdict + Send + Sync>,
    run_once: &mut dyn FnMut() -> Result<()>,
) -> Result<()> {
    let files: Arc<Mutex<BTreeSet<PathBuf>>> = Arc::new(Mutex::new(BTreeSet::new()));
    let (tx, rx) = mpsc::channel::<PathBuf>();
    let files_cb = files.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            if matches!(event.kind, notify::EventKind::Access(_)) {
                return;
            }
            let set = files_cb.lock().expect("watch list lock");
            for p in &event.paths {
                let p = canonical(p);
                if set.contains(&p) {
                    let _ = tx.send(p);
                }
            }
        }
    })
    .context("starting the file watcher")?;
    // The judge: lets a burst of editor writes settle, then, during a run, decides whether the
    // edit stops it; either way the edited pipeline runs next.
    let running = Arc::new(AtomicBool::new(false));
    let (changed_tx, changed_rx) = mpsc::channel::<PathBuf>();
    {
        let (running, stop) = (running.clone(), stop.clone());
        std::thread::spawn(move || {
            while let Ok(path) = rx.recv() {
                while rx.recv_timeout(Duration::from_millis(300)).is_ok() {}
                if running.load(Ordering::SeqCst) && !stop.load(Ordering::SeqCst) {
                    match check() {
                        Verdict::Stop(why) => {
                            tracing::info!("{} changed: {why}; stopping training at the next step (a checkpoint is saved)", path.display());
                            stop.store(true, Ordering::SeqCst);
                        }
                        Verdict::KeepGoing(why) => tracing::info!("{} changed: {why}", path.display()),
                    }
                }
                if changed_tx.send(path).is_err() {
                    return;
                }
            }
        });
    }
    let mut watched_dirs: BTreeSet<PathBuf> = BTreeSet::new();

    loop {
        // Refresh the watch list (extends may have changed) before running.
        let list: BTreeSet<PathBuf> = watched_files().iter().map(|p| canonical(p)).collect();
        for dir in list.iter().filter_map(|p| p.parent().map(Path::to_path_buf)) {
            if watched_dirs.insert(dir.clone()) {
                watcher
                    .watch(&dir, RecursiveMode::NonRecursive)
                    .with_context(|| format!("watching {}", dir.display()))?;
            }
        }
        *files.lock().expect("watch list lock") = list.clone();
        // Edits that arrived before this run started are in the file it reads.
        while changed_rx.try_recv().is_ok() {}
        stop.store(false, Ordering::SeqCst);

        running.store(true, Ordering::SeqCst);
        let result = run_once();
        running.store(false, Ordering::SeqCst);
        if let Err(err) = result {
            eprintln!("error: {err:#}");
        }
        if quit() {
            return Ok(());
        }
        // An edit during the run: run the edited pipeline now.
        if let Ok(path) = changed_rx.try_recv() {
            tracing::info!("{} was edited during the run: running it again", path.display());
            continue;
        }
        let names: Vec<String> = list.iter().map(|p| p.display().to_string()).collect();
        tracing::info!("watching {} for changes (Ctrl-C to stop)", names.join(", "));
        loop {
            match changed_rx.recv_timeout(Duration::from_millis(200)) {
                Ok(path) => {
                    tracing::info!("{} changed", path.display());
                    break;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if quit() {
                        return Ok(());
                    }
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => return Ok(()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn keep_going() -> Arc<dyn Fn() -> Verdict + Send + Sync> {
        Arc::new(|| Verdict::KeepGoing("test".into()))
    }

    /// An edit to the watched file triggers a second run; an edit to another file in the same
    /// directory does not.
    #[test]
    fn reruns_on_edit_of_the_watched_file_only() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.toml");
        let other = dir.path().join("other.toml");
        std::fs::write(&file, "a = 1").unwrap();
        let runs = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let runs2 = runs.clone();
        let (file2, other2) = (file.clone(), other.clone());
        let editor = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(400));
            std::fs::write(&other2, "b = 1").unwrap();
            std::thread::sleep(Duration::from_millis(400));
            std::fs::write(&file2, "a = 2").unwrap();
        });
        let started = std::time::Instant::now();
        let quit = {
            let runs = runs.clone();
            // Give up after 10 s so a missed event fails the test instead of hanging it.
            move || runs.load(Ordering::SeqCst) >= 2 || started.elapsed() > Duration::from_secs(10)
        };
        let f = file.clone();
        watch_loop(&mut || vec![f.clone()], stop, &quit, keep_going(), &mut || {
            runs2.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
        editor.join().unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }

    /// During a run, an edit judged `KeepGoing` leaves the stop flag alone and one judged `Stop`
    /// sets it; both make the edited pipeline run next.
    #[test]
    fn an_edit_during_a_run_stops_it_only_when_judged_so() {
        for (verdict, stops) in [(Verdict::KeepGoing("later stages only".into()), false), (Verdict::Stop("train changed".into()), true)] {
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("p.toml");
            std::fs::write(&file, "a = 1").unwrap();
            let stop = Arc::new(AtomicBool::new(false));
            let runs = Arc::new(AtomicUsize::new(0));
            let saw_stop = Arc::new(AtomicBool::new(false));
            let (runs2, stop2, saw2, file2) = (runs.clone(), stop.clone(), saw_stop.clone(), file.clone());
            let started = std::time::Instant::now();
            let quit = {
                let runs = runs.clone();
                move || runs.load(Ordering::SeqCst) >= 2 || started.elapsed() > Duration::from_secs(10)
            };
            let v = verdict.clone();
            watch_loop(&mut || vec![file.clone()], stop.clone(), &quit, Arc::new(move || v.clone()), &mut || {
                if runs2.fetch_add(1, Ordering::SeqCst) == 0 {
                    // The first run: edit the file and "train" until stopped or 1.5 s passed.
                    std::thread::sleep(Duration::from_millis(200));
                    std::fs::write(&file2, "a = 2").unwrap();
                    let t = std::time::Instant::now();
                    while t.elapsed() < Duration::from_millis(1500) {
                        if stop2.load(Ordering::SeqCst) {
                            saw2.store(true, Ordering::SeqCst);
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                }
                Ok(())
            })
            .unwrap();
            assert_eq!(saw_stop.load(Ordering::SeqCst), stops, "{verdict:?}");
            assert_eq!(runs.load(Ordering::SeqCst), 2, "{verdict:?}: the edited pipeline runs after the run");
        }
    }
}
