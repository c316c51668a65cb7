//! The output folder of a run: the exclusive advisory lock that makes it one run per folder
//! (`flock` on `<output>/.lora-run.pid`, released by the kernel when the holder dies, so a lock
//! left by a killed process never blocks), and the clean-up of temporaries a killed run left.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// The file that is locked and holds the PID of the process holding it.
pub const RUN_LOCK_FILE: &str = ".lora-run.pid";

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

    /// Remove the temporaries (`.name.PID.tmp` files and `.checkpoint-N.PID.tmp` folders) a
    /// killed run left in the folder and its direct subfolders: while we hold the lock no other run can be writing them.
    fn remove_temporaries(&self) -> Result<()> {
        let mut dirs = vec![self.dir.clone()];
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            dirs.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir() && !p.to_string_lossy().ends_with(".tmp")));
        }
        for dir in dirs {
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !(name.starts_with('.') && name.ends_with(".tmp")) {
                    continue;
                }
                let path = entry.path();
                tracing::info!("removing {} (left by an earlier run that did not finish)", path.display());
                let removed = if path.is_dir() { std::fs::remove_dir_all(&path) } else { std::fs::remove_file(&path) };
                removed.with_context(|| format!("removing {}", path.display()))?;
            }
        }
        Ok(())
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
    fn temporaries_of_a_dead_run_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join(".checkpoint-3.999.tmp")).unwrap();
        std::fs::write(dir.path().join(".lora.lock.999.tmp"), b"x").unwrap();
        std::fs::write(dir.path().join("keep.txt"), b"x").unwrap();
        let _held = RunDir::acquire(dir.path()).unwrap();
        let mut names: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        assert_eq!(names, vec![RUN_LOCK_FILE.to_string(), "keep.txt".to_string()]);
    }
}
