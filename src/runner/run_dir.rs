//! The output folder of a run: the exclusive advisory lock that makes it one run per folder
//! (`flock` on `<output>/.lora-run.pid`, released by the kernel when the holder dies, so a lock
//! left by a killed process never blocks), and the clean-up of temporaries a killed run left.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The file that is locked and holds the PID of the process holding it.
pub(crate) const RUN_LOCK_FILE: &str = ".lora-run.pid";

/// Another process holds the output folder: the CLI exits 2 on this.
#[derive(Debug, thiserror::Error)]
#[error("output folder {dir} is in use by another lora process (PID {pid}); wait for it to finish or stop it, or use another output.dir")]
pub struct FolderBusy {
    pub dir: PathBuf,
    /// The PID written by the holder (`unknown` if it had not written it yet).
    pub pid: String,
}

/// An output folder held exclusively for as long as this value lives.
#[derive(Debug)]
pub struct RunDir {
    dir: PathBuf,
    // The open, locked file; closing it (on drop, or when the process dies) releases the lock.
    _file: std::fs::File,
}

impl RunDir {
    /// Create `dir` if needed and lock it, or fail at once with [`FolderBusy`] naming the holder.
    pub fn acquire(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating output directory {}", dir.display()))?;
        let path = dir.join(RUN_LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        if !try_lock_exclusive(&file).with_context(|| format!("locking {}", path.display()))? {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            return Err(FolderBusy { dir: dir.to_path_buf(), pid: if pid.is_empty() { "unknown".into() } else { pid.into() } }.into());
        }
        file.set_len(0).and_then(|_| file.rewind()).and_then(|_| writeln!(file, "{}", std::process::id())).and_then(|_| file.flush())
            .with_context(|| format!("writing {}", path.display()))?;
        let run_dir = Self { dir: dir.to_path_buf(), _file: file };
        run_dir.remove_temporaries()?;
        Ok(run_dir)
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Remove the temporaries a killed run of this tool left: `.NAME.PID.tmp` files and
    /// `.checkpoint-N.PID.tmp` folders (the only names it writes temporaries under), in the
    /// folder and the subfolders it writes into, whose PID is no longer running. Anything else
    /// (another program's `.x.tmp`, a live process's) is never touched.
    fn remove_temporaries(&self) -> Result<()> {
        let mut dirs = vec![self.dir.clone()];
        dirs.extend(["train", "validation", "logs"].iter().map(|d| self.dir.join(d)));
        for dir in dirs {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !crate::util::fs::is_stale_temporary(&name) {
                    continue;
                }
                let path = entry.path();
                let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
                // Only checkpoints are built as folders.
                if is_dir && !name.starts_with(".checkpoint-") {
                    continue;
                }
                tracing::info!("removing {} (left by an earlier run that did not finish)", crate::util::path::tidy_path(&path).display());
                let removed = if is_dir { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
                removed.with_context(|| format!("removing {}", path.display()))?;
            }
        }
        Ok(())
    }

    /// The PID holding `dir`, when another process holds it (`None`: free, or no folder yet).
    /// Takes nothing: `lora plan` asks this to say that `lora run` would be refused.
    pub fn holder(dir: &Path) -> Option<String> {
        let path = dir.join(RUN_LOCK_FILE);
        let mut file = std::fs::File::open(&path).ok()?;
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a file descriptor we own; a shared lock conflicts only with a holder's
        // exclusive one, and is released at once.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
        if rc == 0 {
            // SAFETY: as above.
            unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
            return None;
        }
        let mut pid = String::new();
        let _ = file.read_to_string(&mut pid);
        Some(if pid.trim().is_empty() { "unknown".into() } else { pid.trim().to_string() })
    }
}

/// `flock(LOCK_EX | LOCK_NB)`: `Ok(false)` when another open file description holds it.
fn try_lock_exclusive(file: &std::fs::File) -> std::io::Result<bool> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a file descriptor we own for the duration of the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_holder_is_refused_with_the_pid_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let first = RunDir::acquire(dir.path()).unwrap();
        // flock locks belong to the open file description: a second open in the same process
        // conflicts exactly as another process would.
        let err = RunDir::acquire(dir.path()).unwrap_err();
        let busy = err.downcast_ref::<FolderBusy>().expect("a FolderBusy error");
        assert_eq!(busy.pid, std::process::id().to_string());
        drop(first);
        RunDir::acquire(dir.path()).expect("free again once the holder is gone");
    }

    #[test]
    fn only_this_tools_temporaries_of_dead_runs_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        // A PID that is not running (above the kernel's pid_max default range is not enough on
        // every system: find one that kill(pid, 0) says does not exist).
        let dead = (4_000_000..4_100_000).find(|p| crate::util::fs::pid_is_dead(*p)).unwrap();
        let live = std::process::id();
        std::fs::create_dir_all(dir.path().join(format!(".checkpoint-3.{dead}.tmp"))).unwrap();
        std::fs::write(dir.path().join(format!(".lora.lock.{dead}.tmp")), b"x").unwrap();
        std::fs::create_dir_all(dir.path().join("train")).unwrap();
        std::fs::write(dir.path().join(format!("train/.adapter.safetensors.{dead}.tmp")), b"x").unwrap();
        // Not ours, or not dead: kept.
        let kept = [
            format!(".checkpoint-4.{live}.tmp"),
            ".swap.tmp".to_string(),
            ".conf.tmp".to_string(),
            format!(".notes.{dead}.tmp.bak"),
            "keep.txt".to_string(),
        ];
        for k in &kept {
            std::fs::write(dir.path().join(k), b"x").unwrap();
        }
        std::fs::create_dir_all(dir.path().join("other")).unwrap();
        std::fs::write(dir.path().join(format!("other/.x.{dead}.tmp")), b"x").unwrap();
        let _held = RunDir::acquire(dir.path()).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        let mut expected: Vec<String> = kept.to_vec();
        expected.extend([RUN_LOCK_FILE.to_string(), "other".to_string(), "train".to_string()]);
        expected.sort();
        assert_eq!(names, expected);
        assert_eq!(std::fs::read_dir(dir.path().join("train")).unwrap().count(), 0);
        assert!(dir.path().join(format!("other/.x.{dead}.tmp")).exists(), "a folder this tool does not write into is not cleaned");
    }

    #[test]
    fn holder_names_the_pid_without_taking_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(RunDir::holder(dir.path()), None);
        let held = RunDir::acquire(dir.path()).unwrap();
        assert_eq!(RunDir::holder(dir.path()), Some(std::process::id().to_string()));
        drop(held);
        assert_eq!(RunDir::holder(dir.path()), None);
        RunDir::acquire(dir.path()).expect("asking did not take it");
    }
}
