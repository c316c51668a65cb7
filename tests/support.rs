//! Helpers shared by the test modules: the training settings of a small run that the
//! trainer-level tests start from (each changes what it tests).

use std::path::Path;

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
        tensorboard_dir: None,
        precision: MixedPrecision::No,
        grad_scaler: Default::default(),
        gradient_checkpointing: false,
    }
}
