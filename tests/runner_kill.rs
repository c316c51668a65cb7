//! Crash-safe resume with the built binary: `lora run` killed with SIGKILL at several moments,
//! then a plain `lora run`, gives the weights of an uninterrupted run bit for bit and a
//! `metrics.jsonl` with every step once; a second run on a busy folder exits 2 naming the PID;
//! a run with a changed rank after a kill is refused (exit 2) naming the change; a second
//! `lora watch` (or `lora run`) on a folder a `lora watch` holds exits 2 at once naming its PID.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const STEPS: u64 = 16;

fn pipeline() -> PathBuf {
    crate::support::repo_root().join("pipelines/tiny.toml")
}

fn lora(out: &Path, extra: &[&str]) -> Command {
    lora_cmd("run", out, extra)
}

/// `lora <sub> pipelines/tiny.toml` with the settings of these tests, writing to `out`.
fn lora_cmd(sub: &str, out: &Path, extra: &[&str]) -> Command {
    let mut c = Command::new(assert_cmd::cargo::cargo_bin("lora"));
    c.arg(sub).arg(pipeline());
    for s in [
        format!("train.max_steps={STEPS}"),
        "train.batch_size=2".into(),
        "checkpoints.every_steps=1".into(),
        "checkpoints.total_limit=3".into(),
        format!("output.dir={:?}", out.display().to_string()),
    ] {
        c.arg("--set").arg(s);
    }
    for s in extra {
        c.arg("--set").arg(s);
    }
    c.env("RAYON_NUM_THREADS", "1");
    c
}

fn spawn(out: &Path) -> Child {
    lora(out, &[]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("lora starts")
}

fn checked(c: &mut Command) -> (i32, String) {
    let o = c.output().expect("lora runs");
    (o.status.code().unwrap_or(-1), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
}

/// The steps in `metrics.jsonl`; `strict`: every line must be whole (not while a run writes).
fn steps_logged(out: &Path, strict: bool) -> Vec<u64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| match serde_json::from_str::<serde_json::Value>(l) {
            // Update lines (evaluation lines carry `eval_loss` instead of `loss`).
            Ok(v) => v.get("loss").and(v["step"].as_u64()),
            Err(e) if strict => panic!("metrics.jsonl has a damaged line {l:?}: {e}"),
            Err(_) => None,
        })
        .collect()
}

fn all_files(dir: &Path, out: &mut Vec<String>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        out.push(p.display().to_string());
        if p.is_dir() {
            all_files(&p, out);
        }
    }
}

/// Wait until `cond` holds (or `limit` passes); whether it held.
pub(crate) fn wait_for(limit: Duration, cond: impl Fn() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    cond()
}

#[test]
fn sigkill_at_random_moments_then_a_plain_run_resumes_to_the_same_weights() {
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    let started = Instant::now();
    let (code, log) = checked(&mut lora(&straight, &[]));
    assert_eq!(code, 0, "{log}");
    let duration = started.elapsed();

    let out = dir.path().join("killed");
    let step_time = duration / STEPS as u32;
    // 8 kills, as the issue asks, at moments from a fixed LCG so a failure repeats: each waits
    // for 0-2 more logged steps (0: the kill lands in start-up, model loading or the resume),
    // then a random fraction of a step (mid-step, mid-checkpoint, mid-log write). Progress is
    // capped so the run never finishes before the final plain run, which must resume.
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    let mut rand = || {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (x >> 33) as f64 / (1u64 << 31) as f64
    };
    let mut kills_in_training = 0;
    for k in 0..8 {
        let before = steps_logged(&out, false).len() as u64;
        let more = (rand() * 3.0) as u64;
        let target = (before + more).min(STEPS / 2 - 2) as usize;
        // The last kill lands after a checkpoint exists, so the final run has one to resume.
        let target = if k == 7 { target.max(2) } else { target };
        let mut child = spawn(&out);
        if k == 3 {
            // A second run tried meanwhile must exit 2 at once, naming the holder.
            let pid_file = out.join(".lora-run.pid");
            let pid = child.id().to_string();
            assert!(wait_for(Duration::from_secs(30), || std::fs::read_to_string(&pid_file).is_ok_and(|s| s.trim() == pid)), "the run holds the folder");
            let t = Instant::now();
            let (code, log) = checked(&mut lora(&out, &[]));
            assert_eq!(code, 2, "a second run on a busy folder is refused: {log}");
            assert!(log.contains(&pid), "names the PID {pid}: {log}");
            assert!(t.elapsed() < Duration::from_secs(10), "refused at once");
        }
        wait_for(Duration::from_secs(30), || steps_logged(&out, false).len() >= target);
        std::thread::sleep(step_time.mul_f64(rand()));
        if std::fs::read_to_string(out.join("lora.lock")).is_ok_and(|l| l.contains("train.in_progress")) {
            kills_in_training += 1;
        }
        child.kill().expect("SIGKILL"); // std's kill() is SIGKILL on Unix
        child.wait().unwrap();
    }
    assert!(kills_in_training > 0, "at least one kill happened during training");

    let lock = std::fs::read_to_string(out.join("lora.lock")).unwrap_or_default();
    assert!(lock.contains("train.in_progress"), "the last kill left training in progress: {lock}");
    // A changed rank is refused, naming what changed.
    let (code, log) = checked(&mut lora(&out, &["adapter.rank=8"]));
    assert_eq!(code, 2, "{log}");
    assert!(log.contains("adapter.rank 4 -> 8"), "{log}");
    let (code, log) = checked(&mut lora(&out, &[]));
    assert_eq!(code, 0, "{log}");
    eprintln!("{kills_in_training} of 8 kills with training marked in progress; the final run: {}", log.lines().filter(|l| l.contains("resum")).collect::<Vec<_>>().join(" | "));
    assert!(log.contains("resuming the interrupted run"), "the log says it resumes: {log}");
    assert!(log.contains("resumed from"), "from a checkpoint: {log}");
    let a = std::fs::read(straight.join("pytorch_lora_weights.safetensors")).unwrap();
    let b = std::fs::read(out.join("pytorch_lora_weights.safetensors")).unwrap();
    assert!(a == b, "8 x SIGKILL + resume gives the uninterrupted run's weights bit for bit");
    assert_eq!(steps_logged(&out, true), (1..=STEPS).collect::<Vec<_>>(), "every step once in metrics.jsonl");
    let mut leftovers = Vec::new();
    all_files(&out, &mut leftovers);
    leftovers.retain(|n| n.ends_with(".tmp"));
    assert!(leftovers.is_empty(), "no temporaries left: {leftovers:?}");
}

#[test]
fn a_second_watch_on_a_busy_folder_exits_2_at_once_naming_the_holder() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("watched");
    // The first watch holds the folder from its start for its whole life (and trains meanwhile).
    let mut first = lora_cmd("watch", &out, &[]).stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("lora watch starts");
    let pid = first.id().to_string();
    let pid_file = out.join(".lora-run.pid");
    let held = wait_for(Duration::from_secs(60), || std::fs::read_to_string(&pid_file).is_ok_and(|s| s.trim() == pid));
    let mut results = Vec::new();
    if held {
        for sub in ["watch", "run"] {
            let t = Instant::now();
            let (code, log) = checked(&mut lora_cmd(sub, &out, &[]));
            results.push((sub, code, log, t.elapsed()));
        }
    }
    first.kill().expect("SIGKILL"); // std's kill() is SIGKILL on Unix
    first.wait().unwrap();
    assert!(held, "the first lora watch (PID {pid}) holds {}", out.display());
    for (sub, code, log, took) in results {
        assert_eq!(code, 2, "a second lora {sub} on a folder a watch holds is refused: {log}");
        assert!(log.contains(&pid) && log.contains("in use"), "lora {sub} names the holder PID {pid}: {log}");
        assert!(took < Duration::from_secs(10), "lora {sub} is refused at once, not after {took:?}");
    }
}
