//! `lora run` end to end on the tiny pipeline (library level): the files it writes, determinism,
//! the lock that skips up-to-date stages, checkpoint pruning, and exact resume after a stop.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use lora::adapters::read::read_lora_file;
use lora::config::load_pipeline;
use lora::runner::run::run_pipeline;
use lora::runner::stages::{RunOptions, RunReport, Session};
use lora::layout::{DIFFUSERS_FILE, KOHYA_FILE};

fn pipeline() -> PathBuf {
    crate::support::repo_root().join("pipelines/tiny.toml")
}

fn run(out: &Path, extra: &[&str], stop_at_once: bool) -> RunReport {
    let mut overrides: Vec<String> = vec![
        "train.max_steps=4".into(),
        "train.batch_size=2".into(),
        "checkpoints.every_steps=2".into(),
        "checkpoints.total_limit=1".into(),
        format!("output.dir={:?}", out.display().to_string()),
    ];
    overrides.extend(extra.iter().map(|s| s.to_string()));
    let loaded = load_pipeline(&pipeline(), &overrides).unwrap_or_else(|d| panic!("{}", d.render()));
    let stop = Arc::new(AtomicBool::new(stop_at_once));
    run_pipeline(&loaded, &mut Session::default(), &RunOptions::default(), stop).expect("run succeeds")
}

fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn tiny_run_writes_a_diffusers_lora_and_is_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let report = run(&a, &["output.formats=[\"diffusers\", \"kohya\"]"], false);
    let t = report.train.as_ref().expect("trained");
    assert_eq!(t.global_step, 4);
    assert!(!t.interrupted);
    let weights = read_lora_file(&a.join(DIFFUSERS_FILE)).unwrap();
    assert_eq!(weights.unet.len(), 80, "every to_q/to_k/to_v/to_out.0 of the tiny UNet");
    assert!(weights.text_encoder.is_empty());
    assert_eq!(weights.metadata.get("format").map(String::as_str), Some("pt"));
    let kohya = read_lora_file(&a.join(KOHYA_FILE)).unwrap();
    assert_eq!(kohya.unet.len(), 80);
    // B starts at zero; after training it must not be.
    assert!(weights.unet.values().any(|m| m.up.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() > 0.0));
    let metrics = std::fs::read_to_string(a.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().filter(|l| l.contains("\"loss\"")).count(), 4, "one metrics line per update");
    assert_eq!(metrics.lines().filter(|l| l.contains("\"eval_loss\"")).count(), 2, "and the evaluations before and after");
    let ckpts: Vec<String> = std::fs::read_dir(&a)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint"))
        .collect();
    assert_eq!(ckpts, vec!["checkpoint-4".to_string()], "total_limit = 1 keeps the newest only");

    // Same pipeline and seed, another directory: the same bytes.
    let b = dir.path().join("b");
    run(&b, &["output.formats=[\"diffusers\", \"kohya\"]"], false);
    assert_eq!(bytes(&a.join(DIFFUSERS_FILE)), bytes(&b.join(DIFFUSERS_FILE)), "training is deterministic");

    // Nothing changed: the train stage is up to date and the adapter is untouched.
    let before = bytes(&a.join(DIFFUSERS_FILE));
    let again = run(&a, &["output.formats=[\"diffusers\", \"kohya\"]"], false);
    assert!(again.skipped_train && again.train.is_none());
    assert_eq!(bytes(&a.join(DIFFUSERS_FILE)), before);

    // A changed training setting makes the stage stale again.
    let changed = run(&a, &["output.formats=[\"diffusers\", \"kohya\"]", "train.learning_rate=2e-3"], false);
    assert!(changed.train.is_some());
    assert_ne!(bytes(&a.join(DIFFUSERS_FILE)), before);
}

#[test]
fn a_stopped_run_resumes_to_the_same_weights() {
    // Batch 7 over 24 examples (7, 7, 7, 3) with accumulation 2: two updates per epoch, the
    // second closing on the short batch, so the 4 updates span two epochs and the resume starts
    // mid-epoch.
    let extra = ["train.batch_size=7", "train.gradient_accumulation_steps=2"];
    let dir = tempfile::tempdir().unwrap();
    let straight = dir.path().join("straight");
    run(&straight, &extra, false);

    let stopped = dir.path().join("stopped");
    let first = run(&stopped, &extra, true);
    let t = first.train.as_ref().unwrap();
    assert!(t.interrupted, "the stop flag ends training after the first update");
    assert_eq!(t.global_step, 1);
    assert!(stopped.join("checkpoint-1").join("trainer_state.json").is_file(), "a checkpoint is saved on stop");
    assert!(!stopped.join(DIFFUSERS_FILE).exists(), "a stopped run exports nothing: the checkpoint is its result");

    let second = run(&stopped, &extra, false);
    let t = second.train.as_ref().unwrap();
    assert!(t.resumed_from.is_some(), "the next run resumes the interrupted one");
    assert_eq!(t.global_step, 4);
    assert_eq!(
        bytes(&straight.join(DIFFUSERS_FILE)),
        bytes(&stopped.join(DIFFUSERS_FILE)),
        "stop + resume gives the same weights as an uninterrupted run"
    );
}

#[test]
fn text_encoder_lora_trains_and_is_exported() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("te");
    let report = run(&out, &["adapter.text_encoder=true", "train.max_steps=2"], false);
    assert_eq!(report.train.as_ref().unwrap().global_step, 2);
    let weights = read_lora_file(&out.join(DIFFUSERS_FILE)).unwrap();
    assert_eq!(weights.unet.len(), 80);
    assert_eq!(weights.text_encoder.len(), 12, "q/k/v/out of the 3 CLIP layers");
    // The text-encoder branches received gradients: B moved away from zero.
    assert!(weights.text_encoder.values().all(|m| m.up.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() > 0.0));
}

/// `lora run pipelines/tiny.toml --set 'train.precision="bf16"'` (and fp16) on the CPU, as the
/// README's pipeline: all 30 steps, and the loss on the fixed evaluation batches (same noise and
/// timesteps before and after) goes down, as it does in f32 (-1.03%; measured bf16 -1.23%, fp16
/// -0.97% with 3 overflow-skipped steps). "Goes down" is the claim, so the bound is 0: a sign
/// error or a broken half-precision backward leaves the eval loss where it was or raises it.
#[test]
fn half_precision_runs_on_the_cpu_and_the_loss_goes_down() {
    let dir = tempfile::tempdir().unwrap();
    for precision in ["bf16", "fp16"] {
        let out = dir.path().join(precision);
        let loaded = load_pipeline(&pipeline(), &[format!("train.precision={precision:?}"), format!("output.dir={:?}", out.display().to_string())])
            .unwrap_or_else(|d| panic!("{}", d.render()));
        let report = run_pipeline(&loaded, &mut Session::default(), &RunOptions::default(), Arc::new(AtomicBool::new(false))).expect("run succeeds");
        let t = report.train.as_ref().expect("trained");
        assert_eq!(t.global_step, 30, "{precision}");
        let (before, after) = (t.eval_loss_before.expect("eval before"), t.eval_loss_after.expect("eval after"));
        assert!(after < before, "{precision}: eval loss {before} -> {after} did not go down");
        if precision == "fp16" {
            assert!(t.loss_scale.is_some(), "fp16 reports its loss scale");
        }
        assert!(out.join(DIFFUSERS_FILE).is_file());
    }
}
