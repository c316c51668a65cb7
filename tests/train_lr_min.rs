//! The peers' learning-rate schedules: `cosine_with_min_lr` with `train.min_lr_ratio`
//! (transformers' schedule, what kohya's `--lr_scheduler cosine_with_min_lr
//! --lr_scheduler_min_lr_ratio` builds), checked against the rates transformers 5.24 gives
//! (`tools/reference/make_lr_golden.py`), its keys' refusals; and OneTrainer's `rex`.

use lora::train::lr::{lr_at, LrSchedule};

#[test]
fn cosine_with_min_lr_matches_transformers() {
    let path = crate::support::repo_root().join("tests/fixtures/golden/lr_cosine_with_min_lr.json");
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
    let root = crate::support::repo_root();
    let load = |set: &[&str]| lora::config::load_pipeline(&root.join("pipelines/tiny.toml"), &set.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    assert!(load(&["train.lr_scheduler=\"cosine_with_min_lr\"", "train.min_lr_ratio=0.1", "train.lr_warmup_steps=5"]).is_ok());
    let err = load(&["train.lr_scheduler=\"cosine_with_min_lr\""]).err().unwrap().render();
    assert!(err.contains("min_lr_ratio"), "{err}");
    let err = load(&["train.min_lr_ratio=0.1"]).err().unwrap().render();
    assert!(err.contains("train.min_lr_ratio") && err.contains("cosine_with_min_lr"), "{err}");
}

/// `lr_scheduler = "rex"`: OneTrainer's `lr_lambda_rex` (d = 0.9; `progress = step / steps`,
/// `(1 − progress) / ((1 − d) + d·(1 − progress))`, 0 from the end on), written here from its
/// definition, after our linear warmup.
#[test]
fn rex_follows_onetrainers_definition() {
    let (warmup, total) = (4usize, 24usize);
    let onetrainer = |current_step: usize, scheduler_steps: usize| -> f64 {
        let (max_lr, min_lr, d) = (1.0, 0.0, 0.9);
        if current_step < scheduler_steps {
            let progress = current_step as f64 / scheduler_steps as f64;
            let div = (1.0 - d) + (d * (1.0 - progress));
            min_lr + (max_lr - min_lr) * ((1.0 - progress) / div)
        } else {
            min_lr
        }
    };
    for step in 0..30 {
        let ours = lr_at(&LrSchedule::Rex, 1.0, step, warmup, total);
        let want = if step < warmup { step as f64 / warmup as f64 } else { onetrainer(step - warmup, total - warmup) };
        assert!((ours - want).abs() < 1e-12, "step {step}: ours {ours}, OneTrainer {want}");
    }
    // It stays near the peak longer than linear decay: at the halfway point 0.5 / 0.55.
    assert!((lr_at(&LrSchedule::Rex, 1.0, 14, 4, 24) - 0.5 / 0.55).abs() < 1e-12);
}
