//! `lora bench` from the command line: its JSON line, `--profile`, and no warnings about the
//! checkpoint settings it switches off itself.

use assert_cmd::Command;

#[test]
fn bench_prints_json_and_a_profile_without_checkpoint_warnings() {
    let root = env!("CARGO_MANIFEST_DIR");
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
