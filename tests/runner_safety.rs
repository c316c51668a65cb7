//! Nothing finished is lost, and `plan` says what `run` does (issue 14), at library level on the
//! tiny pipeline: a stopped run leaves the earlier finished adapter byte for byte and only a
//! checkpoint; a changed key sets the earlier run's results aside (naming the keys) instead of
//! deleting them; a table of folder situations where `plan`'s words and `run`'s actions are
//! asserted together.

use std::path::{Path, PathBuf};

use lora::runner::lock::Lock;
use lora::runner::plan::Plan;
use lora::runner::stages::{Refused, RunOptions};
use lora::layout::{DIFFUSERS_FILE, KOHYA_FILE};
use lora::runner::stages::{describe, Status, TRAINED_FILE};

use super::runner_stages::{bytes, files_under, load, planned, root, run_with, statuses};

fn tiny() -> PathBuf {
    root().join("pipelines/tiny.toml")
}

fn finished_files(out: &Path) -> Vec<(String, Vec<u8>)> {
    [TRAINED_FILE, DIFFUSERS_FILE, KOHYA_FILE].iter().map(|f| (f.to_string(), bytes(&out.join(f)))).collect()
}

fn train_status(stages: &[(&'static str, Status)]) -> Status {
    stages.iter().find(|(n, _)| *n == "train").map(|(_, s)| s.clone()).expect("a train stage")
}

fn earlier_dirs(out: &Path) -> Vec<PathBuf> {
    let mut d: Vec<PathBuf> = std::fs::read_dir(out.join("earlier")).map(|e| e.map(|e| e.unwrap().path()).collect()).unwrap_or_default();
    d.sort();
    d
}

/// Path 1: a stopped run writes a checkpoint and nothing else; the finished adapter of the run
/// before stays byte for byte (and the lock still records it), and the rerun resumes exactly.
#[test]
fn a_stopped_run_keeps_the_finished_adapter_and_resumes_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    run_with(&load(&tiny(), &out, &[]), &RunOptions::default(), false).unwrap();
    let before = finished_files(&out);
    let lock_before = Lock::read(&out).unwrap();

    // Another learning rate, stopped after its first step.
    let lr = load(&tiny(), &out, &["train.learning_rate=2e-3"]);
    let r = run_with(&lr, &RunOptions::default(), true).unwrap();
    let t = r.train.as_ref().unwrap();
    assert!(t.interrupted && r.stopped);
    assert_eq!(t.global_step, 1);
    assert!(r.files.is_empty(), "a stopped run exports nothing: {:?}", r.files);
    for (f, b) in &before {
        assert!(bytes(&out.join(f)) == *b, "{f} is the finished run's, byte for byte");
    }
    assert!(out.join("checkpoint-1").is_dir(), "the stopped run's checkpoint");
    let lock = Lock::read(&out).unwrap();
    assert_eq!(lock.stages.get("export"), lock_before.stages.get("export"), "the lock's export record still describes the files");
    assert!(lock.stages.contains_key("train.in_progress"));

    // The rerun resumes and ends where a straight run with that learning rate ends.
    let r = run_with(&lr, &RunOptions::default(), false).unwrap();
    assert_eq!(r.train.as_ref().unwrap().resumed_from.as_deref(), Some(out.join("checkpoint-1").as_path()));
    let straight = dir.path().join("straight");
    run_with(&load(&tiny(), &straight, &["train.learning_rate=2e-3"]), &RunOptions::default(), false).unwrap();
    assert!(bytes(&out.join(DIFFUSERS_FILE)) == bytes(&straight.join(DIFFUSERS_FILE)), "stop + resume = straight run, bit for bit");
    // The earlier finished run was set aside when the new one started, not deleted.
    let earlier = earlier_dirs(&out);
    assert_eq!(earlier.len(), 1, "{earlier:?}");
    for (f, b) in &before {
        assert!(bytes(&earlier[0].join(f)) == *b, "earlier/{f} is the first run's adapter");
    }
}

/// Path 4: a changed key sets the earlier run's adapter, metrics and checkpoints aside under
/// `earlier/`, and plan names the changed keys before run does it.
#[test]
fn a_changed_key_sets_the_earlier_run_aside_and_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    run_with(&load(&tiny(), &out, &[]), &RunOptions::default(), false).unwrap();
    let before = finished_files(&out);
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let checkpoints: Vec<String> = ["checkpoint-1", "checkpoint-2", "checkpoint-3"].iter().map(|s| s.to_string()).collect();

    let lr = load(&tiny(), &out, &["train.learning_rate=2e-3"]);
    let plan = planned(&lr);
    let Status::Run(why) = train_status(&plan) else { panic!("train runs: {plan:?}") };
    assert!(why.contains("train.learning_rate 0.001 -> 0.002"), "{why}");
    assert!(why.contains("set aside in earlier/"), "{why}");
    let r = run_with(&lr, &RunOptions::default(), false).unwrap();
    assert_eq!(statuses(&r), plan, "run does what plan said");
    let aside = r.set_aside.clone().expect("set aside");
    assert!(why.contains(&aside.strip_prefix(&out).unwrap().display().to_string()), "plan named the folder run used: {why} / {}", aside.display());
    for (f, b) in &before {
        assert!(bytes(&aside.join(f)) == *b, "{f} kept");
    }
    assert_eq!(std::fs::read_to_string(aside.join("metrics.jsonl")).unwrap(), metrics);
    for c in &checkpoints {
        assert!(aside.join(c).join("trainer_state.json").is_file(), "{c} moved aside");
        assert!(!out.join(c).exists() || r.train.as_ref().unwrap().checkpoints.iter().any(|d| d.ends_with(c)), "{c} now is the new run's");
    }
    let note: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(aside.join("set-aside.json")).unwrap()).unwrap();
    assert!(note["changed"].to_string().contains("train.learning_rate"), "{note}");
    // The new run's adapter replaced the old one whole.
    assert!(bytes(&out.join(DIFFUSERS_FILE)) != before[1].1);
    // --force also sets aside (never deletes).
    let r = run_with(&lr, &RunOptions { force: true, ..Default::default() }, false).unwrap();
    assert!(r.set_aside.is_some());
    assert_eq!(earlier_dirs(&out).len(), 2);
}

/// `plan` and `run` are one decision: for each situation of the output folder, the statuses
/// `plan` prints are the ones `run` reports, and what `run` does matches the words.
#[test]
fn plan_and_run_agree_on_every_situation_of_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let case = |name: &str| dir.path().join(name);

    // Fresh: everything runs, nothing is set aside.
    let out = case("fresh");
    let p = load(&tiny(), &out, &[]);
    let plan = planned(&p);
    assert_eq!(train_status(&plan), Status::Run("no result yet".into()));
    let r = run_with(&p, &RunOptions::default(), false).unwrap();
    assert_eq!(statuses(&r), plan);
    assert!(r.set_aside.is_none() && !out.join("earlier").exists());

    // Finished: nothing to do, and an up-to-date rerun still knows its examples.
    let plan = planned(&p);
    assert_eq!(train_status(&plan), Status::UpToDate);
    let r = run_with(&p, &RunOptions::default(), false).unwrap();
    assert_eq!(statuses(&r), plan);
    assert_eq!(r.examples, 24, "examples of the up-to-date result");

    // Validation off: plan announces no validation output.
    let views = describe(&Plan::resolve(&p), &Lock::read(&out).unwrap(), false);
    let validate = views.iter().find(|v| v.name == "validate").unwrap();
    assert!(matches!(validate.status, Status::Off(_)) && validate.writes.is_empty(), "{:?}", validate.writes);

    // Interrupted with a checkpoint: resumes from it.
    let out = case("interrupted");
    let p = load(&tiny(), &out, &[]);
    run_with(&p, &RunOptions::default(), true).unwrap();
    let plan = planned(&p);
    assert_eq!(train_status(&plan), Status::Run("resumes the interrupted run from checkpoint-1".into()));
    let r = run_with(&p, &RunOptions::default(), false).unwrap();
    assert_eq!(statuses(&r), plan);
    assert_eq!(r.train.as_ref().unwrap().resumed_from.as_deref(), Some(out.join("checkpoint-1").as_path()));

    // Interrupted with a changed rank: refused by plan and run alike, nothing touched.
    let out = case("rank");
    let p = load(&tiny(), &out, &[]);
    run_with(&p, &RunOptions::default(), true).unwrap();
    let rank8 = load(&tiny(), &out, &["adapter.rank=8"]);
    let plan = planned(&rank8);
    let Status::Refused(why) = train_status(&plan) else { panic!("{plan:?}") };
    assert!(why.contains("adapter.rank 4 -> 8"), "{why}");
    let files = files_under(&out);
    let err = run_with(&rank8, &RunOptions::default(), false).unwrap_err();
    assert!(err.chain().any(|e| e.is::<Refused>()) && format!("{err:#}").contains("adapter.rank 4 -> 8"), "{err:#}");
    assert_eq!(files_under(&out), files, "a refused run changes nothing");

    // Interrupted with a changed learning rate: resumes, naming the change.
    let lr = load(&tiny(), &out, &["train.learning_rate=2e-3"]);
    let plan = planned(&lr);
    let Status::Run(why) = train_status(&plan) else { panic!("{plan:?}") };
    assert!(why.starts_with("resumes the interrupted run from checkpoint-1, with train.learning_rate 0.001 -> 0.002"), "{why}");

    // A run that ended before its first checkpoint (killed, or failed at its set-up) has
    // nothing to protect: a changed rank does not block the next run. (The in-progress mark of
    // a stopped run, with its checkpoint taken away.)
    let out = case("no-checkpoint");
    let p = load(&tiny(), &out, &[]);
    run_with(&p, &RunOptions::default(), true).unwrap();
    std::fs::remove_dir_all(out.join("checkpoint-1")).unwrap();
    assert!(Lock::read(&out).unwrap().stages.contains_key("train.in_progress"));
    let fixed = load(&tiny(), &out, &["adapter.rank=8"]);
    let plan = planned(&fixed);
    assert!(matches!(train_status(&plan), Status::Run(w) if w.starts_with("the interrupted run left no checkpoint that loads")), "{plan:?}");
    let r = run_with(&fixed, &RunOptions::default(), false).unwrap();
    assert_eq!(statuses(&r), plan);
    assert_eq!(r.train.as_ref().unwrap().global_step, 3);

    // A damaged newest checkpoint: plan and run both go to the one before it.
    let out = case("damaged");
    let p = load(&tiny(), &out, &[]);
    run_with(&p, &RunOptions::default(), true).unwrap();
    run_with(&p, &RunOptions::default(), true).unwrap();
    let weights = out.join("checkpoint-2/pytorch_lora_weights.safetensors");
    let b = bytes(&weights);
    std::fs::write(&weights, &b[..b.len() / 2]).unwrap();
    let plan = planned(&p);
    assert_eq!(train_status(&plan), Status::Run("resumes the interrupted run from checkpoint-1".into()));
    let r = run_with(&p, &RunOptions::default(), false).unwrap();
    assert_eq!(statuses(&r), plan);
    assert_eq!(r.train.as_ref().unwrap().resumed_from.as_deref(), Some(out.join("checkpoint-1").as_path()));

    // A forged step count is not resumed (and is set aside, not deleted).
    let out = case("forged");
    let p = load(&tiny(), &out, &[]);
    run_with(&p, &RunOptions::default(), true).unwrap();
    let state = out.join("checkpoint-1/trainer_state.json");
    let forged = std::fs::read_to_string(&state).unwrap().replace("\"global_step\": 1", "\"global_step\": 1000000000000");
    std::fs::write(&state, forged).unwrap();
    let plan = planned(&p);
    assert!(matches!(train_status(&plan), Status::Run(w) if w.starts_with("the interrupted run left no checkpoint that loads")), "{plan:?}");
    let r = run_with(&p, &RunOptions::default(), false).unwrap();
    assert_eq!(statuses(&r), plan);
    assert_eq!(r.train.as_ref().unwrap().global_step, 3);
    assert!(r.set_aside.as_ref().unwrap().join("checkpoint-1/trainer_state.json").is_file());

    // Resuming past a lowered step count is refused (not exported as "steps 2/1").
    let out = case("past-end");
    let p = load(&tiny(), &out, &[]);
    run_with(&p, &RunOptions::default(), true).unwrap();
    run_with(&p, &RunOptions::default(), true).unwrap();
    let one = load(&tiny(), &out, &["train.max_steps=1"]);
    let plan = planned(&one);
    let Status::Refused(why) = train_status(&plan) else { panic!("{plan:?}") };
    assert!(why.contains("past the 1 steps"), "{why}");
    assert!(run_with(&one, &RunOptions::default(), false).unwrap_err().chain().any(|e| e.is::<Refused>()));

    // A deleted lock: the checkpoints that fit are resumed, not removed.
    let out = case("no-lock");
    let p = load(&tiny(), &out, &[]);
    run_with(&p, &RunOptions::default(), true).unwrap();
    std::fs::remove_file(out.join("lora.lock")).unwrap();
    let plan = planned(&p);
    assert_eq!(train_status(&plan), Status::Run("resumes the interrupted run from checkpoint-1".into()));
    let r = run_with(&p, &RunOptions::default(), false).unwrap();
    assert_eq!(statuses(&r), plan);
    assert!(r.train.as_ref().unwrap().resumed_from.is_some());
    assert!(!out.join("earlier").exists(), "nothing set aside");

    // A damaged lock: plan and run give the same error, and its advice loses nothing (above).
    std::fs::write(out.join("lora.lock"), b"{ not json").unwrap();
    let plan_err = lora::runner::lock::Lock::read(&out).unwrap_err();
    let run_err = run_with(&p, &RunOptions::default(), false).unwrap_err();
    assert_eq!(format!("{plan_err:#}"), format!("{run_err:#}"));
    assert!(format!("{run_err:#}").contains("resumed without it"), "{run_err:#}");

    // A busy folder: plan names the holder, run is refused.
    let out = case("busy");
    let held = lora::runner::run_dir::RunDir::acquire(&out).unwrap();
    assert_eq!(lora::runner::run_dir::RunDir::holder(&out), Some(std::process::id().to_string()));
    let p = load(&tiny(), &out, &[]);
    assert!(run_with(&p, &RunOptions::default(), false).unwrap_err().chain().any(|e| e.is::<lora::runner::run_dir::FolderBusy>()));
    drop(held);
}

/// `output.name` names the adapter files (kohya's `--output_name`), `output.save_precision`
/// writes them in half precision (the train stage's own file stays f32), and the kohya header's
/// `ss_num_epochs` is the epochs the steps take (kohya's rule), not `train.epochs`.
#[test]
fn output_name_and_save_precision_shape_the_exported_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let p = load(&tiny(), &out, &["output.name=\"shapes\"", "output.save_precision=\"fp16\"", "validation.prompts=[\"a red circle\"]", "validation.steps=2"]);
    let views = describe(&Plan::resolve(&p), &Lock::default(), false);
    let writes: Vec<String> = views.iter().flat_map(|v| v.writes.iter().map(|w| w.path.clone())).collect();
    assert!(writes.contains(&"shapes.safetensors".to_string()) && writes.contains(&"shapes_kohya.safetensors".to_string()), "{writes:?}");
    run_with(&p, &RunOptions::default(), false).unwrap();
    assert!(!out.join(DIFFUSERS_FILE).exists() && !out.join(KOHYA_FILE).exists());
    let trained = bytes(&out.join(TRAINED_FILE));
    let trained = safetensors::SafeTensors::deserialize(&trained).unwrap();
    for (file, key_of) in [
        ("shapes.safetensors", Box::new(|k: &str| k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up.")) as Box<dyn Fn(&str) -> String>),
        ("shapes_kohya.safetensors", Box::new(|k: &str| {
            let module = k.trim_start_matches("unet.").replace(".lora_A.weight", "").replace(".lora_B.weight", "");
            let suffix = if k.contains(".lora_A.") { "lora_down.weight" } else { "lora_up.weight" };
            format!("lora_unet_{}.{suffix}", module.replace('.', "_"))
        })),
    ] {
        let b = bytes(&out.join(file));
        let st = safetensors::SafeTensors::deserialize(&b).unwrap();
        for (name, t) in trained.tensors() {
            let got = st.tensor(&key_of(&name)).unwrap_or_else(|e| panic!("{file}: {name}: {e}"));
            assert_eq!(got.dtype(), safetensors::Dtype::F16, "{file}: {name}");
            let want: Vec<u16> = t.data().chunks(4).map(|c| half::f16::from_f32(f32::from_le_bytes(c.try_into().unwrap())).to_bits()).collect();
            let have: Vec<u16> = got.data().chunks(2).map(|c| u16::from_le_bytes(c.try_into().unwrap())).collect();
            assert_eq!(have, want, "{file}: {name} is the f32 weight rounded to nearest f16");
        }
        if file.ends_with("_kohya.safetensors") {
            let (_, meta) = safetensors::SafeTensors::read_metadata(&b).unwrap();
            let meta = meta.metadata().clone().unwrap();
            assert_eq!(meta.get("ss_output_name").map(String::as_str), Some("shapes"));
            // 24 examples, batch 2: 12 updates an epoch, so 3 steps are 1 epoch.
            assert_eq!(meta.get("ss_num_epochs").map(String::as_str), Some("1"));
        }
    }
    assert!(out.join("validation/prompt0-0.png").is_file(), "validation applied the half-precision file");
}

/// `rank_pattern` is one table for the UNet and the text encoder: a key that matches only UNet
/// modules does not fail the text encoder's injection (it did), and each part gets its ranks.
#[test]
fn a_rank_pattern_for_the_unet_leaves_the_text_encoder_alone() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let p = load(&tiny(), &out, &["adapter.text_encoder=true", "adapter.rank_pattern={ to_k = 8 }", "train.max_steps=1"]);
    run_with(&p, &RunOptions::default(), false).unwrap();
    let w = lora::adapters::read_lora_file(&out.join(TRAINED_FILE)).unwrap();
    assert!(!w.text_encoder.is_empty());
    for (name, m) in &w.unet {
        assert_eq!(m.rank(), if name.ends_with("to_k") { 8 } else { 4 }, "{name}");
    }
    assert!(w.text_encoder.values().all(|m| m.rank() == 4));
}
