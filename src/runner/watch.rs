//! Watch mode: rerun the pipeline whenever its file (or an `extends` base) changes.
//!
//! Editors save by writing or by renaming a temporary file over the original, so the watcher
//! watches the parent directories and filters events by file name. A change during a run sets
//! the run's stop flag: the trainer saves a checkpoint and returns, and the next run resumes
//! from it when the training inputs did not change (the runner's fingerprints decide).

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

/// Run `run_once` now and after every change to any file `watched_files()` returns (asked again
/// after each run, since `extends` may change). `stop` is set while a run is in progress and a
/// change arrives; `quit` ends the loop (Ctrl-C).
pub fn watch_loop(
    watched_files: &mut dyn FnMut() -> Vec<PathBuf>,
    stop: Arc<AtomicBool>,
    quit: &dyn Fn() -> bool,
    run_once: &mut dyn FnMut() -> Result<()>,
) -> Result<()> {
    let files: Arc<Mutex<BTreeSet<PathBuf>>> = Arc::new(Mutex::new(BTreeSet::new()));
    let (tx, rx) = mpsc::channel::<PathBuf>();
    let files_cb = files.clone();
    let stop_cb = stop.clone();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            if matches!(event.kind, notify::EventKind::Access(_)) {
                return;
            }
            let set = files_cb.lock().expect("watch list lock");
            for p in &event.paths {
                let p = canonical(p);
                if set.contains(&p) {
                    stop_cb.store(true, Ordering::SeqCst);
                    let _ = tx.send(p);
                }
            }
        }
    })
    .context("starting the file watcher")?;
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
        while rx.try_recv().is_ok() {}
        stop.store(false, Ordering::SeqCst);

        if let Err(err) = run_once() {
            eprintln!("error: {err:#}");
        }
        if quit() {
            return Ok(());
        }
        let names: Vec<String> = list.iter().map(|p| p.display().to_string()).collect();
        tracing::info!("watching {} for changes (Ctrl-C to stop)", names.join(", "));
        // Wait for a change, then let a burst of editor writes settle.
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok(path) => {
                    tracing::info!("{} changed", path.display());
                    while rx.recv_timeout(Duration::from_millis(300)).is_ok() {}
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
        watch_loop(&mut || vec![f.clone()], stop, &quit, &mut || {
            runs2.fetch_add(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
        editor.join().unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 2);
    }
}
