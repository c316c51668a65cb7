//! diffusers itself loads the files `lora convert` writes (diffusers, PEFT, kohya forms, with
//! per-module ranks and alphas, UNet and text encoder) and they act as an independent merge
//! `W += alpha / r · up @ down` does, to 1e-4 absolute in f32 (see `adapters_diffusers_check.py`).
//!
//! Needs the reference Python (torch, diffusers, transformers, peft): set
//! `LORA_REFERENCE_PYTHON=/path/to/python` and run `cargo test --test tests adapters_diffusers_loads -- --ignored`.

use std::process::Command;

#[test]
#[ignore = "needs the reference Python environment (LORA_REFERENCE_PYTHON)"]
fn diffusers_loads_our_files_with_the_same_effect() {
    let python = std::env::var("LORA_REFERENCE_PYTHON").expect("set LORA_REFERENCE_PYTHON to a Python with diffusers");
    let script = crate::support::repo_root().join("tests/adapters_diffusers_check.py");
    let work = tempfile::tempdir().unwrap();
    let out = Command::new(python)
        .arg(&script)
        .arg(env!("CARGO_BIN_EXE_lora"))
        .arg(work.path())
        .output()
        .expect("run the reference Python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "diffusers check failed (tolerance 1e-4):\n{stdout}\n{}", &stderr[stderr.len().saturating_sub(3000)..]);
    assert_eq!(stdout.lines().filter(|l| l.contains("max diff")).count(), 3, "{stdout}");
}
