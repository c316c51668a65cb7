//! A full disk during a run (a real one: a 4 MiB tmpfs, which only root may mount, so the test
//! is ignored by a plain `cargo test` and `.ci/run`, which runs as root, runs it with
//! `--ignored`): the error names the path, the previous checkpoint stays intact, nothing is
//! exported, no temporary file or folder is left, and once there is room the same pipeline
//! resumes to the uninterrupted run's weights.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use lora::config::load_pipeline;
use lora::runner::run::run_pipeline;
use lora::runner::stages::{RunOptions, RunReport, Session};
use lora::layout::DIFFUSERS_FILE;

struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

fn run(out: &Path, stop_at_once: bool) -> anyhow::Result<RunReport> {
    let pipeline = crate::support::repo_root().join("pipelines/tiny.toml");
    let overrides: Vec<String> = vec![
        "train.max_steps=3".into(),
        "train.batch_size=2".into(),
        "checkpoints.every_steps=1".into(),
        "checkpoints.total_limit=2".into(),
        format!("output.dir={:?}", out.display().to_string()),
    ];
    let loaded = load_pipeline(&pipeline, &overrides).unwrap_or_else(|d| panic!("{}", d.render()));
    run_pipeline(&loaded, &mut Session::default(), &RunOptions::default(), Arc::new(AtomicBool::new(stop_at_once)))
}

fn free_bytes(dir: &Path) -> u64 {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: statvfs writes into the zeroed struct we pass; the path is a valid C string.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut s) }, 0);
    s.f_bavail as u64 * s.f_frsize as u64
}

fn tree(dir: &Path, out: &mut Vec<(String, Vec<u8>)>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            tree(&p, out);
        } else {
            out.push((p.display().to_string(), std::fs::read(&p).unwrap()));
        }
    }
}

#[test]
#[ignore = "mounts a tmpfs, which needs root: `cargo test --test tests runner_full_disk -- --ignored` as root (.ci/run does)"]
fn a_full_disk_leaves_the_previous_checkpoint_intact_and_exports_nothing() {
    let mnt = tempfile::tempdir().unwrap();
    let ok = Command::new("mount").args(["-t", "tmpfs", "-o", "size=4m", "tmpfs"]).arg(mnt.path()).status().is_ok_and(|s| s.success());
    assert!(ok, "cannot mount a tmpfs at {} (this test needs root)", mnt.path().display());
    let _mounted = Mounted(mnt.path().to_path_buf());
    let out = mnt.path().join("out");
    let first = run(&out, true).unwrap();
    assert!(first.train.unwrap().interrupted);
    let ckpt1 = out.join("checkpoint-1");
    let mut before = Vec::new();
    tree(&ckpt1, &mut before);
    assert!(!out.join(DIFFUSERS_FILE).exists(), "a stopped run exports nothing");

    // Leave 64 KiB: the next checkpoint (about 460 KiB) cannot be written.
    let filler = mnt.path().join("filler");
    let room = free_bytes(mnt.path()).saturating_sub(64 * 1024);
    std::fs::write(&filler, vec![0u8; room as usize]).unwrap();
    let err = run(&out, false).unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains(&out.join("checkpoint-2").display().to_string()), "the error names the path: {msg}");
    assert!(msg.to_lowercase().contains("no space"), "and the cause: {msg}");

    let mut after = Vec::new();
    tree(&ckpt1, &mut after);
    assert!(before == after, "the previous checkpoint is intact");
    assert!(!out.join(DIFFUSERS_FILE).exists(), "a failed run exports nothing");
    let mut all = Vec::new();
    tree(&out, &mut all);
    let prefix = out.display().to_string();
    let names: Vec<&str> = all.iter().map(|(n, _)| n.strip_prefix(&prefix).unwrap()).collect();
    assert!(!names.iter().any(|n| n.contains(".tmp")), "no temporaries left: {names:?}");
    assert!(std::fs::read_dir(&out).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().ends_with(".tmp")), "no temporary folder left");

    // Room again: the same pipeline resumes and ends where an uninterrupted run does.
    std::fs::remove_file(&filler).unwrap();
    let resumed = run(&out, false).unwrap();
    assert!(resumed.train.as_ref().unwrap().resumed_from.is_some());
    let straight = tempfile::tempdir().unwrap();
    run(straight.path(), false).unwrap();
    assert!(std::fs::read(out.join(DIFFUSERS_FILE)).unwrap() == std::fs::read(straight.path().join(DIFFUSERS_FILE)).unwrap());
}
