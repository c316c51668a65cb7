//! The ordinary ways people stop training, with the built binary (issue 14): SIGTERM (docker,
//! SLURM, systemd, `timeout`) and Ctrl-C mid-train save a checkpoint, export nothing, leave the
//! earlier finished adapter byte for byte and exit 143 / 130, and the rerun resumes exactly;
//! `lora watch` keeps training through an invalid edit (shown as FILE:LINE:COL) and through an
//! edit of a later stage, and Ctrl-C ends it with 130.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::runner_kill::wait_for;

fn root() -> PathBuf {
    crate::support::repo_root()
}

/// A copy of the tiny pipeline in `dir` (absolute model and dataset paths), training `steps`
/// steps of batch 2 into `dir/out`, with no routine checkpoint.
fn write_pipeline(dir: &Path, steps: u64, extra: &str) -> PathBuf {
    let text = format!(
        "[model]\npath = {:?}\n\n[dataset]\nkind = \"parquet\"\npath = {:?}\n\n[preprocess]\nresolution = 64\ncenter_crop = true\n\n\
         [train]\nmax_steps = {steps}\nbatch_size = 2\nlearning_rate = 1e-3\nseed = 0\ndevice = \"cpu\"\n{extra}\n\n\
         [checkpoints]\nevery_steps = 100000\n\n[output]\ndir = {:?}\n",
        root().join("tests/fixtures/tiny-sd").display().to_string(),
        root().join("tests/fixtures/datasets/shapes-parquet").display().to_string(),
        dir.join("out").display().to_string(),
    );
    let file = dir.join("p.toml");
    std::fs::write(&file, text).unwrap();
    file
}

fn lora(args: &[&str]) -> Command {
    let mut c = Command::new(assert_cmd::cargo::cargo_bin("lora"));
    c.args(args).env("RAYON_NUM_THREADS", "1");
    c
}

fn updates_logged(out: &Path) -> usize {
    std::fs::read_to_string(out.join("metrics.jsonl")).unwrap_or_default().lines().filter(|l| l.contains("\"loss\"")).count()
}


fn signal(child: &Child, sig: i32) {
    // SAFETY: sending a signal to our own child process.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

/// Exit code and output of a finished child (killed after `limit`).
fn finish(mut child: Child, limit: Duration) -> (i32, String) {
    let t = Instant::now();
    while t.elapsed() < limit {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let o = child.wait_with_output().unwrap();
    (o.status.code().unwrap_or(-1), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr)))
}

const FINISHED: [&str; 3] = ["train/adapter.safetensors", "pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors"];

#[test]
fn sigterm_and_ctrl_c_mid_train_save_a_checkpoint_and_keep_the_finished_adapter() {
    for (sig, code) in [(libc::SIGTERM, 143), (libc::SIGINT, 130)] {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        // A finished run first.
        let file = write_pipeline(dir.path(), 2, "");
        let o = lora(&["run", file.to_str().unwrap()]).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let before: Vec<Vec<u8>> = FINISHED.iter().map(|f| std::fs::read(out.join(f)).unwrap()).collect();

        // A long run with another learning rate, stopped mid-train.
        let long = write_pipeline(dir.path(), 100_000, "");
        let set = ["--set", "train.learning_rate=2e-3"];
        let child = lora(&[&["run", long.to_str().unwrap()][..], &set[..]].concat()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        let trained = wait_for(Duration::from_secs(120), || updates_logged(&out) >= 3);
        signal(&child, sig);
        let (got, log) = finish(child, Duration::from_secs(60));
        assert!(trained, "the run trained: {log}");
        assert_eq!(got, code, "signal {sig}: exit {code}: {log}");
        let steps = updates_logged(&out);
        let ckpt = out.join(format!("checkpoint-{steps}"));
        assert!(ckpt.join("trainer_state.json").is_file() && ckpt.join("optimizer.safetensors").is_file(), "a checkpoint at step {steps}: {log}");
        assert!(log.contains("stopped") && log.contains(&format!("checkpoint-{steps}")), "the summary says where it stopped: {log}");
        assert!(!log.contains("wrote "), "nothing exported: {log}");
        for (f, b) in FINISHED.iter().zip(&before) {
            assert!(std::fs::read(out.join(f)).unwrap() == *b, "signal {sig}: {f} is the finished run's, byte for byte");
        }

        // plan says it resumes from that checkpoint; the rerun (to steps + 1) does, exactly.
        let to = format!("train.max_steps={}", steps + 1);
        let o = lora(&["plan", long.to_str().unwrap(), "--set", "train.learning_rate=2e-3", "--set", &to]).output().unwrap();
        let plan = String::from_utf8_lossy(&o.stdout).to_string();
        assert!(plan.contains(&format!("resumes the interrupted run from checkpoint-{steps}")), "{plan}");
        let o = lora(&["run", long.to_str().unwrap(), "--set", "train.learning_rate=2e-3", "--set", &to]).output().unwrap();
        let log = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
        assert!(o.status.success(), "{log}");
        assert!(!log.contains("starts from step 0") && log.contains("resumed from"), "no contradictory messages: {log}");
        let straight = tempfile::tempdir().unwrap();
        let s = write_pipeline(straight.path(), steps as u64 + 1, "");
        assert!(lora(&["run", s.to_str().unwrap(), "--set", "train.learning_rate=2e-3"]).output().unwrap().status.success());
        assert!(
            std::fs::read(out.join(FINISHED[1])).unwrap() == std::fs::read(straight.path().join("out").join(FINISHED[1])).unwrap(),
            "signal {sig} + resume = straight run, bit for bit"
        );
    }
}

#[test]
fn watch_keeps_training_through_an_invalid_edit_and_a_later_stage_edit() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let file = write_pipeline(dir.path(), 100_000, "");
    let original = std::fs::read_to_string(&file).unwrap();
    let child = lora(&["watch", file.to_str().unwrap()]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let started = wait_for(Duration::from_secs(120), || updates_logged(&out) >= 2);
    // A typo in [train]: reported, training goes on.
    // (Each edit is given 2 s: the watcher's event, the 300 ms settle and the judgement.)
    std::fs::write(&file, original.replace("seed = 0", "sed = 0")).unwrap();
    let n = updates_logged(&out);
    std::thread::sleep(Duration::from_secs(2));
    let went_on = wait_for(Duration::from_secs(60), || updates_logged(&out) >= n + 3);
    // Fixed, with a validation setting changed: training's inputs are the same, it goes on.
    std::fs::write(&file, original.replace("[checkpoints]", "[validation]\nnum_images = 2\n\n[checkpoints]")).unwrap();
    let n = updates_logged(&out);
    std::thread::sleep(Duration::from_secs(2));
    let went_on_again = wait_for(Duration::from_secs(60), || updates_logged(&out) >= n + 3);
    signal(&child, libc::SIGINT);
    let (code, log) = finish(child, Duration::from_secs(60));
    assert!(started, "watch trained: {log}");
    assert!(went_on, "training went on through the invalid edit: {log}");
    assert!(went_on_again, "training went on through a validation-only edit: {log}");
    let typo_line = original.lines().position(|l| l == "seed = 0").unwrap() + 1;
    assert!(log.contains(&format!("p.toml:{typo_line}:1")) && log.contains("sed"), "the error names FILE:LINE:COL: {log}");
    assert!(log.contains("training goes on"), "{log}");
    // The shapes dataset has 24 captions, 23 distinct: the repeat is encoded once, not "reused".
    assert!(log.contains("23 text embedding(s) encoded, 0 reused"), "{log}");
    assert_eq!(code, 130, "Ctrl-C ends watch with 130: {log}");
    assert!(!out.join(FINISHED[1]).exists(), "nothing exported by the stopped training");
    assert!(std::fs::read_dir(&out).unwrap().any(|e| e.unwrap().file_name().to_string_lossy().starts_with("checkpoint-")), "a checkpoint: {log}");
}

#[test]
fn watch_on_a_missing_file_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let o = lora(&["watch", dir.path().join("nope.toml").to_str().unwrap()]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", String::from_utf8_lossy(&o.stderr));
}
