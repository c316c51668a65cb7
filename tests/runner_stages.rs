//! The stage table end to end (library level, tiny pipelines): `plan` and `run` agree on stage
//! order and on the files written and their names, for every pipeline in `pipelines/` that runs
//! here; each stage's lock entry is checked on its own (a format change reruns only export, a
//! prompt change only validate); resume after a stop, refusal of a changed rank, fallback from a
//! damaged checkpoint; one run per output folder.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use lora::config::{load_pipeline, LoadedPipeline};
use lora::runner::lock::Lock;
use lora::runner::plan::Plan;
use lora::runner::run::run_pipeline;
use lora::runner::stages::{RunOptions, RunReport, Session};
use lora::layout::{DIFFUSERS_FILE, KOHYA_FILE};
use lora::runner::stages::{describe, Status, BOOKKEEPING};
use crate::support::matches_output;

pub(crate) fn root() -> PathBuf {
    crate::support::repo_root()
}

pub(crate) fn load(file: &Path, out: &Path, extra: &[&str]) -> LoadedPipeline {
    let mut overrides: Vec<String> = vec![
        "train.max_steps=3".into(),
        "train.batch_size=2".into(),
        "checkpoints.every_steps=1".into(),
        "checkpoints.total_limit=10".into(),
        format!("output.dir={:?}", out.display().to_string()),
    ];
    overrides.extend(extra.iter().map(|s| s.to_string()));
    load_pipeline(file, &overrides).unwrap_or_else(|d| panic!("{}", d.render()))
}

pub(crate) fn run_with(loaded: &LoadedPipeline, opts: &RunOptions, stop_at_once: bool) -> anyhow::Result<RunReport> {
    run_pipeline(loaded, &mut Session::default(), opts, Arc::new(AtomicBool::new(stop_at_once)))
}

/// Every file under `dir`, relative, `/`-separated (also used by other modules).
pub(crate) fn files_under(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().to_string_lossy().replace('\\', "/"));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

pub(crate) fn bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

pub(crate) fn statuses(report: &RunReport) -> Vec<(&'static str, Status)> {
    report.stages.clone()
}

pub(crate) fn planned(loaded: &LoadedPipeline) -> Vec<(&'static str, Status)> {
    let plan = Plan::resolve(loaded);
    let lock = Lock::read(&plan.out_dir).unwrap();
    describe(&plan, &lock, false).into_iter().map(|s| (s.name, s.status)).collect()
}

/// The pipelines of `pipelines/` that run on this machine: local model and data, no GPU.
fn runnable_pipelines() -> Vec<PathBuf> {
    let mut found = Vec::new();
    for e in std::fs::read_dir(root().join("pipelines")).unwrap() {
        let path = e.unwrap().path();
        if path.extension().is_none_or(|x| x != "toml") {
            continue;
        }
        let loaded = load_pipeline(&path, &[]).unwrap_or_else(|d| panic!("{}: {}", path.display(), d.render()));
        let p = &loaded.pipeline;
        if p.model.path.is_some() && p.dataset.path.is_some() && !matches!(p.train.device, lora::config::types::Device::Cuda(_)) {
            found.push(path);
        }
    }
    found.sort();
    found
}

#[test]
fn plan_and_run_agree_for_every_pipeline_that_runs_here() {
    let pipelines = runnable_pipelines();
    assert!(pipelines.len() >= 2, "tiny.toml and tiny-sd2.toml run here: {pipelines:?}");
    for file in pipelines {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        // A validation prompt so the validate stage runs too (2 steps: cheap on the tiny models).
        let loaded = load(
            &file,
            &out,
            &["validation.prompts=[\"a red circle\"]", "validation.num_images=2", "validation.steps=2", "output.formats=[\"diffusers\", \"kohya\"]"],
        );
        let plan = Plan::resolve(&loaded);
        let views = describe(&plan, &Lock::default(), false);
        let report = run_with(&loaded, &RunOptions::default(), false).unwrap();
        let ran: Vec<&str> = report.stages.iter().map(|(n, _)| *n).collect();
        let named: Vec<&str> = views.iter().map(|v| v.name).collect();
        assert_eq!(ran, named, "{}: run walks the stages in plan's order", file.display());
        assert_eq!(named, ["model", "dataset", "preprocess", "encode", "train", "export", "validate"]);
        // The final validation reads export's diffusers file (after export), not train's own.
        let validate_reads = &views.iter().find(|v| v.name == "validate").unwrap().reads;
        assert!(validate_reads.len() == 1 && validate_reads[0].ends_with(DIFFUSERS_FILE), "{}: validate reads {validate_reads:?}", file.display());
        for ((name, done), v) in report.stages.iter().zip(&views) {
            assert_eq!(done, &v.status, "{}: stage {name} did what plan said", file.display());
            assert!(matches!(done, Status::Run(_) | Status::Load), "{}: a fresh folder runs {name}", file.display());
        }
        // Every file the run wrote was announced by plan under that name ...
        let on_disk = files_under(&out);
        let writes: Vec<_> = views.iter().flat_map(|v| v.writes.clone()).collect();
        for f in &on_disk {
            assert!(
                BOOKKEEPING.contains(&f.as_str()) || writes.iter().any(|w| matches_output(&w.path, f)),
                "{}: the run wrote {f}, which plan does not announce; plan: {:?}",
                file.display(),
                writes.iter().map(|w| &w.path).collect::<Vec<_>>()
            );
        }
        // ... and every file plan names exactly (no `<...>` part) exists.
        for w in writes.iter().filter(|w| !w.path.contains('<')) {
            assert!(on_disk.iter().any(|f| matches_output(&w.path, f)), "{}: plan announces {} but the run did not write it", file.display(), w.path);
        }
        assert!(out.join(KOHYA_FILE).is_file() && out.join(DIFFUSERS_FILE).is_file());
        // Run again: plan says nothing to do and run agrees.
        let again_plan = planned(&loaded);
        let again = run_with(&loaded, &RunOptions::default(), false).unwrap();
        assert_eq!(statuses(&again), again_plan);
        assert!(again_plan.iter().all(|(_, s)| matches!(s, Status::UpToDate | Status::NotNeeded)), "{again_plan:?}");
    }
}

#[test]
fn a_format_change_reruns_only_export_and_a_prompt_change_only_validate() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let file = root().join("pipelines/tiny.toml");
    let val = ["validation.prompts=[\"a red circle\"]", "validation.num_images=1", "validation.steps=2"];
    // Both formats are the default: start from the diffusers file alone.
    let first = load(&file, &out, &[&val[..], &["output.formats=[\"diffusers\"]"]].concat());
    run_with(&first, &RunOptions::default(), false).unwrap();
    let adapter = bytes(&out.join(DIFFUSERS_FILE));
    let image = bytes(&out.join("validation/prompt0-0.png"));
    let trained_mtime = std::fs::metadata(out.join("train/adapter.safetensors")).unwrap().modified().unwrap();

    // kohya added: only export runs, and the model is not even loaded.
    let with_kohya = load(&file, &out, &[&val[..], &["output.formats=[\"diffusers\", \"kohya\"]"]].concat());
    let plan = planned(&with_kohya);
    let report = run_with(&with_kohya, &RunOptions::default(), false).unwrap();
    assert_eq!(statuses(&report), plan);
    let ran: Vec<&str> = report.stages.iter().filter(|(_, s)| matches!(s, Status::Run(_) | Status::Load)).map(|(n, _)| *n).collect();
    assert_eq!(ran, ["export"], "{:?}", report.stages);
    assert!(out.join(KOHYA_FILE).is_file(), "the new format is written");
    assert!(bytes(&out.join(DIFFUSERS_FILE)) == adapter, "the diffusers file is the same training's");
    assert_eq!(std::fs::metadata(out.join("train/adapter.safetensors")).unwrap().modified().unwrap(), trained_mtime, "no retraining");
    assert!(report.train.is_none());

    // kohya only: export reruns and removes the file of the format no longer asked for; the
    // final validation, which applied the diffusers file, reruns with the kohya one.
    let only_kohya = load(&file, &out, &[&val[..], &["output.formats=[\"kohya\"]"]].concat());
    let plan = planned(&only_kohya);
    let report = run_with(&only_kohya, &RunOptions::default(), false).unwrap();
    assert_eq!(statuses(&report), plan);
    assert_eq!(report.stages.iter().filter(|(_, s)| matches!(s, Status::Run(_))).map(|(n, _)| *n).collect::<Vec<_>>(), ["export", "validate"]);
    assert!(!out.join(DIFFUSERS_FILE).exists(), "a format no longer in output.formats is removed");
    assert!(out.join(KOHYA_FILE).is_file());

    // Another validation prompt: only validate runs (with the model, without the dataset).
    let prompt = load(&file, &out, &["validation.prompts=[\"a blue square\"]", "validation.num_images=1", "validation.steps=2", "output.formats=[\"kohya\"]"]);
    let plan = planned(&prompt);
    let report = run_with(&prompt, &RunOptions::default(), false).unwrap();
    assert_eq!(statuses(&report), plan);
    let active: Vec<&str> = report.stages.iter().filter(|(_, s)| matches!(s, Status::Run(_) | Status::Load)).map(|(n, _)| *n).collect();
    assert_eq!(active, ["model", "validate"], "{:?}", report.stages);
    assert_ne!(bytes(&out.join("validation/prompt0-0.png")), image, "the image of the new prompt");
}

#[test]
fn resume_after_a_stop_refuses_a_changed_rank_and_survives_a_damaged_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let file = root().join("pipelines/tiny.toml");
    let straight = dir.path().join("straight");
    run_with(&load(&file, &straight, &[]), &RunOptions::default(), false).unwrap();

    let out = dir.path().join("stopped");
    let base = load(&file, &out, &[]);
    // Two stopped runs: steps 1 and 2, checkpoints 1 and 2.
    for step in 1..=2 {
        let r = run_with(&base, &RunOptions::default(), true).unwrap();
        let t = r.train.as_ref().unwrap();
        assert!(t.interrupted);
        assert_eq!(t.global_step, step);
    }
    // A changed rank is refused, naming the change; nothing is touched.
    let rank8 = load(&file, &out, &["adapter.rank=8"]);
    let err = run_with(&rank8, &RunOptions::default(), false).unwrap_err();
    assert!(err.chain().any(|e| e.is::<lora::runner::stages::Refused>()), "{err:#}");
    assert!(format!("{err:#}").contains("adapter.rank 4 -> 8"), "{err:#}");
    assert!(out.join("checkpoint-2").is_dir());

    // The newest checkpoint is damaged (truncated): it is reported and checkpoint-1 used.
    let lora_file = out.join("checkpoint-2/pytorch_lora_weights.safetensors");
    let b = bytes(&lora_file);
    std::fs::write(&lora_file, &b[..b.len() / 2]).unwrap();
    let resumed = run_with(&base, &RunOptions::default(), false).unwrap();
    let t = resumed.train.as_ref().unwrap();
    assert_eq!(t.resumed_from.as_deref(), Some(out.join("checkpoint-1").as_path()), "the previous checkpoint is used");
    assert_eq!(t.global_step, 3);
    assert!(bytes(&out.join(DIFFUSERS_FILE)) == bytes(&straight.join(DIFFUSERS_FILE)), "stop, stop, damaged checkpoint, resume = straight run, bit for bit");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let steps: Vec<u64> = lines.iter().filter(|v| v.get("loss").is_some()).map(|v| v["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, [1, 2, 3], "every step once after two resumes");
    // The fixed-noise evaluation before the first step (logged by the first, stopped, run) and
    // after the last (by the run that finished).
    let evals: Vec<u64> = lines.iter().filter(|v| v.get("eval_loss").is_some()).map(|v| v["step"].as_u64().unwrap()).collect();
    assert_eq!(evals, [0, 3], "evaluation points in metrics.jsonl");
    assert!(resumed.eval_loss.0.is_some() && resumed.eval_loss.1.is_some(), "the resumed run's summary has both eval losses");
    assert_eq!(metrics, std::fs::read_to_string(straight.join("metrics.jsonl")).unwrap(), "the same metrics as the straight run");
}

#[test]
fn a_changed_learning_rate_resumes_and_force_starts_over() {
    let dir = tempfile::tempdir().unwrap();
    let file = root().join("pipelines/tiny.toml");
    let out = dir.path().join("out");
    run_with(&load(&file, &out, &[]), &RunOptions::default(), true).unwrap();
    let lr = load(&file, &out, &["train.learning_rate=2e-3"]);
    let r = run_with(&lr, &RunOptions::default(), true).unwrap();
    assert!(r.train.as_ref().unwrap().resumed_from.is_some(), "a changed learning rate resumes (with a warning)");
    assert_eq!(r.train.as_ref().unwrap().global_step, 2);
    let rank8 = load(&file, &out, &["adapter.rank=8"]);
    let r = run_with(&rank8, &RunOptions { force: true, ..Default::default() }, false).unwrap();
    let t = r.train.as_ref().unwrap();
    assert!(t.resumed_from.is_none(), "--force starts over");
    assert_eq!(t.global_step, 3);
}

#[test]
fn one_run_per_output_folder() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let held = lora::runner::run_dir::RunDir::acquire(&out).unwrap();
    let loaded = load(&root().join("pipelines/tiny.toml"), &out, &[]);
    let err = run_with(&loaded, &RunOptions::default(), false).unwrap_err();
    let busy = err.chain().find_map(|e| e.downcast_ref::<lora::runner::run_dir::FolderBusy>()).expect("FolderBusy");
    assert_eq!(busy.pid, std::process::id().to_string());
    assert!(!out.join("lora.lock").exists(), "the refused run wrote nothing");
    drop(held);
    run_with(&loaded, &RunOptions::default(), false).unwrap();
}

/// The encode cache changes nothing: a run served from it gives the weights of a run that
/// encodes every step (`--no-cache`, the reference's way) bit for bit, with random flip (both
/// variants cached); a second run with another learning rate reuses it; a truncated entry is
/// detected and rebuilt, and the weights are still exact.
#[test]
fn cached_and_uncached_runs_give_identical_weights_and_a_damaged_entry_is_rebuilt() {
    let dir = tempfile::tempdir().unwrap();
    let file = root().join("pipelines/tiny.toml");
    let flip = ["preprocess.random_flip=true"];
    let no_cache = RunOptions { no_cache: true, ..Default::default() };
    let uncached = dir.path().join("uncached");
    let r = run_with(&load(&file, &uncached, &flip), &no_cache, false).unwrap();
    assert!(r.stages.iter().any(|(n, s)| *n == "encode" && matches!(s, Status::Off(_))));
    assert!(!uncached.join("cache").exists(), "--no-cache writes no cache");

    let cached = dir.path().join("cached");
    let r = run_with(&load(&file, &cached, &flip), &RunOptions::default(), false).unwrap();
    assert!(r.stages.iter().any(|(n, s)| *n == "encode" && matches!(s, Status::Run(_))));
    let stats = lora::data::cache::EncodeCache::stats(&cached.join("cache/encode"));
    // 24 images x 2 flips + the distinct captions of the shapes dataset.
    assert!(stats.entries >= 48 + 1, "{stats:?}");
    assert!(bytes(&cached.join(DIFFUSERS_FILE)) == bytes(&uncached.join(DIFFUSERS_FILE)), "cached = uncached, bit for bit");

    // Another learning rate: encode is up to date (reused), train reruns; every entry is
    // truncated first, so whatever the run reads is damaged.
    let entries: Vec<PathBuf> = files_under(&cached.join("cache/encode")).into_iter().map(|f| cached.join("cache/encode").join(f)).collect();
    let originals: Vec<Vec<u8>> = entries.iter().map(|e| bytes(e)).collect();
    for (e, whole) in entries.iter().zip(&originals) {
        std::fs::write(e, &whole[..whole.len() / 3]).unwrap();
    }
    let lr = ["preprocess.random_flip=true", "train.learning_rate=3e-3"];
    let r = run_with(&load(&file, &cached, &lr), &RunOptions::default(), false).unwrap();
    assert!(r.stages.iter().any(|(n, s)| *n == "encode" && *s == Status::UpToDate), "{:?}", r.stages);
    assert!(r.train.is_some());
    let uncached_lr = dir.path().join("uncached-lr");
    run_with(&load(&file, &uncached_lr, &lr), &no_cache, false).unwrap();
    assert!(bytes(&cached.join(DIFFUSERS_FILE)) == bytes(&uncached_lr.join(DIFFUSERS_FILE)), "a damaged entry is never trusted");
    // Each entry is either rebuilt whole (it was read) or still truncated (not read this time).
    let mut rebuilt = 0;
    for (e, whole) in entries.iter().zip(&originals) {
        let now = bytes(e);
        if now == *whole {
            rebuilt += 1;
        } else {
            assert_eq!(now.len(), whole.len() / 3, "{}: neither rebuilt nor untouched", e.display());
        }
    }
    assert!(rebuilt > 0, "the entries the run read were rebuilt");
}
