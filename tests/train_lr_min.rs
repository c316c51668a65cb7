//! `lr_scheduler = "cosine_with_min_lr"` with `train.min_lr_ratio`: transformers' schedule (what
//! kohya's `--lr_scheduler cosine_with_min_lr --lr_scheduler_min_lr_ratio` builds), checked
//! against the rates transformers 5.24 gives (`tools/reference/make_lr_golden.py`), and its keys'
//! refusals.

use lora::train::lr::{lr_at, LrSchedule};

#[test]
fn cosine_with_min_lr_matches_transformers() {
    let path = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden/lr_cosine_with_min_lr.json");
    let g: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let want: Vec<f64> = serde_json::from_value(g["lr"].clone()).unwrap();
    let schedule = LrSchedule::CosineWithMinLr { min_lr_ratio: 0.1 };
    for (step, w) in want.iter().enumerate() {
        let ours = lr_at(&schedule, 1e-3, step, 5, 30);
        // f64 on both sides; the same formula: 1e-15 absolute.
        assert!((ours - w).abs() <= 1e-15, "step {step}: ours {ours}, transformers {w}");
    }
    // The floor at the end is min_lr_ratio of the base rate (past the end transformers' cosine
    // rises again, unclamped, and so does ours).
    assert!((want[30] - 1e-4).abs() < 1e-15);
}

#[test]
fn min_lr_ratio_goes_with_its_scheduler() {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let load = |set: &[&str]| lora::config::load_pipeline(&root.join("pipelines/tiny.toml"), &set.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    assert!(load(&["train.lr_scheduler=\"cosine_with_min_lr\"", "train.min_lr_ratio=0.1", "train.lr_warmup_steps=5"]).is_ok());
    let err = load(&["train.lr_scheduler=\"cosine_with_min_lr\""]).err().unwrap().render();
    assert!(err.contains("min_lr_ratio"), "{err}");
    let err = load(&["train.min_lr_ratio=0.1"]).err().unwrap().render();
    assert!(err.contains("train.min_lr_ratio") && err.contains("cosine_with_min_lr"), "{err}");
}
