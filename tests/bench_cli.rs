//! `lora bench` from the command line: its JSON line, `--profile`, and no warnings about the
//! checkpoint settings it switches off itself; and bench measures what `lora run` does: it walks
//! the same stage table, so its steps' losses and trained weights are `lora run`'s bit for bit
//! (text-encoder LoRA and the encode cache included).

use assert_cmd::Command;

#[test]
fn bench_prints_json_and_a_profile_without_checkpoint_warnings() {
    let root = crate::support::repo_root();
    // tiny.toml saves every 10 steps; 2 bench steps would warn "no checkpoint will be saved".
    let out = Command::cargo_bin("lora")
        .unwrap()
        .current_dir(root)
        .env("RAYON_NUM_THREADS", "1")
        .args(["-q", "bench", "pipelines/tiny.toml", "--cache", "--steps", "2", "--warmup", "1", "--json", "--profile"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("checkpoint"), "bench warned about checkpoints it does not save:\n{stderr}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON line on stdout");
    let ms = json["ms_per_step"].as_f64().expect("ms_per_step");
    assert!(ms > 0.0);
    assert_eq!(json["steps"], 2);
    // The profile goes to stderr: forward and backward each once per step, and they fit in
    // the measured step time (the rest is data loading, the loss and the optimizer).
    let row = |name: &str| -> (f64, f64) {
        let line = stderr.lines().find(|l| l.trim_start().starts_with(name)).unwrap_or_else(|| panic!("no {name} row in\n{stderr}"));
        let cols: Vec<&str> = line.split_whitespace().collect();
        (cols[1].parse().unwrap(), cols[cols.len() - 2].parse().unwrap())
    };
    let (fwd_ms, fwd_calls) = row("step.forward");
    let (bwd_ms, bwd_calls) = row("step.backward");
    assert_eq!((fwd_calls, bwd_calls), (1.0, 1.0));
    assert!(fwd_ms + bwd_ms <= ms * 1.05, "forward {fwd_ms} + backward {bwd_ms} ms > step {ms} ms");
    let (_, conv_calls) = row("conv.fwd");
    assert!(conv_calls >= 1.0, "the UNet's convolutions are timed");
}

#[test]
fn bench_trains_exactly_what_run_trains() {
    use lora::runner::run::{bench_pipeline, run_pipeline};
use lora::runner::stages::{RunOptions, Session};
    use std::sync::{atomic::AtomicBool, Arc};
    let tiny = crate::runner_stages::root().join("pipelines/tiny.toml");
    for (extra, no_cache) in [(&["adapter.text_encoder=true"][..], false), (&[][..], false), (&[][..], true)] {
        let dir = tempfile::tempdir().unwrap();
        let bench = crate::runner_stages::load(&tiny, &dir.path().join("bench"), extra);
        let mut losses = Vec::new();
        let report = bench_pipeline(&bench, no_cache, &mut |_, _, loss, _| losses.push(loss)).unwrap();
        assert_eq!(losses.len(), 3);
        let run = crate::runner_stages::load(&tiny, &dir.path().join("run"), extra);
        run_pipeline(&run, &mut Session::default(), &RunOptions { no_cache, ..Default::default() }, Arc::new(AtomicBool::new(false))).unwrap();
        let metrics = std::fs::read_to_string(dir.path().join("run/metrics.jsonl")).unwrap();
        let run_losses: Vec<f64> = metrics.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64()).collect();
        assert_eq!(losses, run_losses, "{extra:?} no_cache={no_cache}: bench's step losses are run's, bit for bit");
        let trained = |d: &str| std::fs::read(dir.path().join(d).join("train/adapter.safetensors")).unwrap();
        assert!(trained("bench") == trained("run"), "{extra:?}: the same weights");
        if !extra.is_empty() {
            assert!(String::from_utf8_lossy(&trained("bench")).contains("text_encoder."), "the text encoder's LoRA is trained in bench too");
        }
        let ran: Vec<&str> = report.run.stages.iter().filter(|(_, s)| matches!(s, lora::runner::stages::Status::Run(_))).map(|(n, _)| *n).collect();
        assert_eq!(ran.contains(&"encode"), !no_cache, "{ran:?}");
    }
}
