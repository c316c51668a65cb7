//! Helpers shared by the test modules: the training settings of a small run that the
//! trainer-level tests start from (each changes what it tests), the pattern rule by which a
//! file on disk is one that `lora plan` announced (`checkpoint-<step>`, `logs/<...>`), and the
//! tensor comparisons the parity tests measure their tolerances with.

use std::path::{Path, PathBuf};

/// The repository the tests read their fixtures and pipelines from: `LORA_REPO_ROOT` when set
/// (a test binary copied to another machine, where the checkout lies elsewhere: the device check
/// sets it), else the folder this test binary was built from.
pub fn repo_root() -> PathBuf {
    match std::env::var_os("LORA_REPO_ROOT") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")),
    }
}

use lora::train::lr::LrSchedule;
use lora::train::optim::AdamWConfig;
use lora::train::precision::MixedPrecision;
use lora::train::step::LossOptions;
use lora::train::trainer::TrainSettings;

/// One epoch of batch 1, lr 1e-3 constant, the reference's AdamW, f32, no clipping, no
/// checkpoints, no evaluation, no TensorBoard, encodings cached, writing into `dir`.
pub fn small_run(dir: &Path, max_steps: usize, seed: u64) -> TrainSettings {
    TrainSettings {
        batch_size: 1,
        gradient_accumulation_steps: 1,
        num_epochs: 1,
        max_train_steps: Some(max_steps),
        learning_rate: 1e-3,
        scale_lr: false,
        lr_schedule: LrSchedule::Constant,
        lr_warmup_steps: 0,
        adamw: AdamWConfig::default(),
        max_grad_norm: None,
        loss: LossOptions::default(),
        seed,
        checkpointing_steps: None,
        checkpoints_total_limit: None,
        output_dir: dir.to_path_buf(),
        resume_from_checkpoint: None,
        cache_encodings: true,
        pipeline_sha256: None,
        train_fingerprint: None,
        eval_batches: 0,
        heldout_every_steps: None,
        tensorboard_dir: None,
        precision: MixedPrecision::No,
        grad_scaler: Default::default(),
        gradient_checkpointing: false,
    }
}

/// `true` when `path` (relative, `/`-separated) is what `pattern` announces (`<...>` matches any
/// run of characters within one path segment).
pub fn matches_output(pattern: &str, path: &str) -> bool {
    let p_segs: Vec<&str> = pattern.trim_end_matches('/').split('/').collect();
    let segs: Vec<&str> = path.split('/').collect();
    if p_segs.len() > segs.len() {
        return false;
    }
    // A pattern naming a folder covers everything under it.
    p_segs.iter().zip(&segs).all(|(p, s)| segment_matches(p, s))
}

fn segment_matches(pattern: &str, seg: &str) -> bool {
    let mut parts: Vec<&str> = Vec::new();
    let mut rest = pattern;
    while let Some(start) = rest.find('<') {
        let Some(end) = rest[start..].find('>') else { break };
        parts.push(&rest[..start]);
        rest = &rest[start + end + 1..];
    }
    parts.push(rest);
    if parts.len() == 1 {
        return pattern == seg;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !seg.starts_with(first) || !seg[first.len()..].ends_with(last) || seg.len() < first.len() + last.len() {
        return false;
    }
    let mut pos = first.len();
    let end = seg.len() - last.len();
    for mid in &parts[1..parts.len() - 1] {
        match seg[pos..end].find(mid) {
            Some(i) => pos += i + mid.len(),
            None => return false,
        }
    }
    true
}

#[test]
fn output_patterns() {
    assert!(matches_output("checkpoint-<step>", "checkpoint-10/optimizer.safetensors"));
    assert!(matches_output("logs/events.out.tfevents.<...>", "logs/events.out.tfevents.17.lora.3"));
    assert!(matches_output("validation/step-<step>/<...>.png", "validation/step-3/prompt0-1.png"));
    assert!(!matches_output("validation/step-<step>/<...>.png", "validation/prompt0-1.png"));
    assert!(matches_output("metrics.jsonl", "metrics.jsonl"));
    assert!(matches_output("cache/encode/", "cache/encode/ab/abc.enc"));
    assert!(!matches_output("metrics.jsonl", "metrics.json"));
}

/// The largest |x| of a tensor (f32).
pub fn max_abs(t: &candle_core::Tensor) -> f32 {
    t.to_dtype(candle_core::DType::F32).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
}

/// max |ours − reference| / max |reference| (shapes must agree).
pub fn rel_diff(ours: &candle_core::Tensor, reference: &candle_core::Tensor) -> f32 {
    assert_eq!(ours.dims(), reference.dims(), "shape");
    let ours = ours.to_dtype(candle_core::DType::F32).unwrap();
    let reference = reference.to_dtype(candle_core::DType::F32).unwrap();
    max_abs(&(ours - &reference).unwrap()) / max_abs(&reference).max(1e-12)
}

/// Every element as f32, flattened.
pub fn to_vec_f32(t: &candle_core::Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_dtype(candle_core::DType::F32).unwrap().to_vec1().unwrap()
}

/// The first element as f32.
pub fn scalar(t: &candle_core::Tensor) -> f32 {
    to_vec_f32(t)[0]
}

/// Timesteps stored as integers (or floats) as u32.
pub fn timesteps_u32(t: &candle_core::Tensor) -> Vec<u32> {
    t.to_dtype(candle_core::DType::F64).unwrap().to_vec1::<f64>().unwrap().iter().map(|&t| t as u32).collect()
}
