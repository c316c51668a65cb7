//! Writes that never leave a half-written file: write to a temporary sibling, fsync, rename;
//! the removal of the temporaries a killed writer left beside a target; and reading a text file
//! (a config) with its path in the error.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The text of the file at `path`; the error names it (`reading PATH`).
pub(crate) fn read_text(path: &Path) -> anyhow::Result<String> {
    use anyhow::Context;
    std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Write `bytes` to `path` atomically: the file either keeps its old content or has the new one.
/// Parent directories are created.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    write_atomic_with(path, |f| f.write_all(bytes))
}

/// Like [`write_atomic`], with a closure that writes the content to the temporary file.
pub(crate) fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut std::fs::File) -> std::io::Result<()>,
) -> std::io::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)?;
    }
    let tmp = temp_sibling(path);
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        write(&mut file)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// `dir/.name.<pid>.tmp` next to `path`.
pub(crate) fn temp_sibling(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp_name = format!(".{name}.{}.tmp", std::process::id());
    match path.parent() {
        Some(p) => p.join(tmp_name),
        None => PathBuf::from(tmp_name),
    }
}

/// Whether `name` is a temporary this tool writes (`.NAME.PID.tmp`, [`temp_sibling`]'s names and
/// the checkpoint folders' `.checkpoint-N.PID.tmp`) whose process is no longer running.
pub(crate) fn is_stale_temporary(name: &str) -> bool {
    let Some(inner) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".tmp")) else { return false };
    let Some((stem, pid)) = inner.rsplit_once('.') else { return false };
    if stem.is_empty() || pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    pid.parse::<i32>().is_ok_and(pid_is_dead)
}

/// Whether no process with this PID exists (`kill(pid, 0)` fails with ESRCH). Any other answer
/// (alive, not ours to signal) counts as alive.
pub(crate) fn pid_is_dead(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    // SAFETY: signal 0 only checks for the process's existence.
    let rc = unsafe { libc::kill(pid, 0) };
    rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH)
}

/// Remove the temporaries that killed writers of `path` left beside it: plain files named
/// `.NAME.PID.tmp` (the [`temp_sibling`] pattern for this exact `NAME`) whose process is gone
/// ([`is_stale_temporary`]). Nothing else is touched: other names, other targets, live writers,
/// links and folders stay. Returns what was removed.
pub(crate) fn remove_dead_temporaries(path: &Path) -> Vec<PathBuf> {
    let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned()) else { return Vec::new() };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let Ok(entries) = std::fs::read_dir(&dir) else { return Vec::new() };
    let prefix = format!(".{name}.");
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(file_name) = file_name.to_str() else { continue };
        // Exactly `.NAME.<digits>.tmp` for this NAME, and its writer dead.
        let Some(pid) = file_name.strip_prefix(&prefix).and_then(|rest| rest.strip_suffix(".tmp")) else { continue };
        if pid.contains('.') || !is_stale_temporary(file_name) {
            continue;
        }
        let candidate = dir.join(file_name);
        if !std::fs::symlink_metadata(&candidate).is_ok_and(|m| m.file_type().is_file()) {
            continue;
        }
        if std::fs::remove_file(&candidate).is_ok() {
            removed.push(candidate);
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PID no process has: a child that has exited and been reaped.
    fn dead_pid() -> u32 {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    }

    #[test]
    fn only_dead_writers_temporaries_of_the_same_target_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.safetensors");
        let dead = dead_pid();
        let live = std::process::id();
        let touch = |name: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, b"x").unwrap();
            p
        };
        let stale = touch(&format!(".out.safetensors.{dead}.tmp"));
        let kept = [
            touch(&format!(".out.safetensors.{live}.tmp")),      // a live writer
            touch(&format!(".other.safetensors.{dead}.tmp")),    // another target
            touch(&format!(".out.safetensors.{dead}.tmp.keep")), // not the pattern
            touch(&format!("out.safetensors.{dead}.tmp")),       // no leading dot
            touch(".out.safetensors.12ab.tmp"),                  // not a PID
            touch(".out.safetensors..tmp"),                      // no PID
            touch(".swap.tmp"),                                  // someone else's
            touch("out.safetensors"),                            // the target itself
        ];
        let folder = dir.path().join(format!(".out.safetensors.{}.tmp", dead_pid()));
        std::fs::create_dir(&folder).unwrap();
        assert_eq!(remove_dead_temporaries(&target), vec![stale.clone()]);
        assert!(!stale.exists());
        for p in kept.iter().chain([&folder]) {
            assert!(p.exists(), "{} was removed", p.display());
        }
        assert!(remove_dead_temporaries(&target).is_empty(), "nothing left to remove");
    }

    #[test]
    fn atomic_write_replaces_content_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a/b/out.bin");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(p.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names.len(), 1, "temp file left behind: {names:?}");
    }

    #[test]
    fn stale_temporaries_are_recognised_by_name_and_dead_pid() {
        let dead = (4_000_000..4_100_000).find(|p| pid_is_dead(*p)).unwrap();
        let me = std::process::id();
        assert!(is_stale_temporary(&format!(".pytorch_lora_weights.safetensors.{dead}.tmp")));
        assert!(is_stale_temporary(&format!(".checkpoint-16.{dead}.tmp")));
        assert!(!is_stale_temporary(&format!(".checkpoint-16.{me}.tmp")), "a live process's");
        assert!(!is_stale_temporary(".swap.tmp"));
        assert!(!is_stale_temporary(".conf.tmp"));
        assert!(!is_stale_temporary(&format!("x.{dead}.tmp")), "no leading dot");
        assert!(!is_stale_temporary(&format!(".{dead}.tmp")), "no name");
        assert!(!is_stale_temporary(".a.12x.tmp"));
    }

    #[test]
    fn failed_write_keeps_old_content() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.bin");
        write_atomic(&p, b"old").unwrap();
        let err = write_atomic_with(&p, |_| Err(std::io::Error::other("boom")));
        assert!(err.is_err());
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
