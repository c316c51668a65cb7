//! Learning-rate schedules as diffusers' `optimization.py` (`LambdaLR` multipliers with linear
//! warmup), the `scale_lr` rule and the reference script's epoch / update bookkeeping.

use std::f64::consts::PI;

/// diffusers' schedule names (`--lr_scheduler`), with their extra parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum LrSchedule {
    /// `constant`: the base lr throughout (no warmup, whatever `warmup_steps` says).
    Constant,
    /// `constant_with_warmup`: linear warmup from 0, then constant.
    ConstantWithWarmup,
    /// `linear`: warmup, then linear decay to 0 at `total_steps`.
    Linear,
    /// `cosine`: warmup, then half a cosine wave down to 0 (diffusers' `num_cycles = 0.5`).
    Cosine,
    /// `cosine_with_restarts`: warmup, then `num_cycles` cosine decays with hard restarts.
    CosineWithRestarts { num_cycles: usize },
    /// `polynomial`: warmup, then `(lr0 − lr_end)·(1 − p)^power + lr_end`; `lr_end` after the end.
    Polynomial { power: f64, lr_end: f64 },
    /// transformers' `cosine_with_min_lr` (kohya's `--lr_scheduler cosine_with_min_lr` with
    /// `--lr_scheduler_min_lr_ratio`): warmup, then half a cosine from 1 down to `min_lr_ratio`.
    CosineWithMinLr { min_lr_ratio: f64 },
    /// REX (Chen et al. 2021, arXiv 2107.04197) as OneTrainer's `lr_lambda_rex` (d = 0.9): warmup,
    /// then `(1 − p) / ((1 − d) + d·(1 − p))` down to 0 at the end.
    Rex,
}

impl LrSchedule {
    #[cfg(test)]
    /// The schedule for a diffusers name, with the script's defaults (`num_cycles` 1, `power`
    /// 1.0, `lr_end` 1e-7). `None` for unknown names.
    pub(crate) fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "constant" => Self::Constant,
            "constant_with_warmup" => Self::ConstantWithWarmup,
            "linear" => Self::Linear,
            "cosine" => Self::Cosine,
            "cosine_with_restarts" => Self::CosineWithRestarts { num_cycles: 1 },
            "polynomial" => Self::Polynomial { power: 1.0, lr_end: 1e-7 },
            _ => return None,
        })
    }

    /// The diffusers name of this schedule.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Constant => "constant",
            Self::ConstantWithWarmup => "constant_with_warmup",
            Self::Linear => "linear",
            Self::Cosine => "cosine",
            Self::CosineWithRestarts { .. } => "cosine_with_restarts",
            Self::Polynomial { .. } => "polynomial",
            Self::CosineWithMinLr { .. } => "cosine_with_min_lr",
            Self::Rex => "rex",
        }
    }
}

/// The learning rate for update number `step` (0-based: the first update uses step 0).
///
/// `base_lr · f(step)` with diffusers' multiplier `f` (spec §2): warmup `step / warmup_steps`
/// for `step < warmup_steps` (so warmup schedules start at lr 0), then the decay over
/// `p = (step − W) / max(1, N − W)`.
pub fn lr_at(schedule: &LrSchedule, base_lr: f64, step: usize, warmup_steps: usize, total_steps: usize) -> f64 {
    base_lr * lr_multiplier(schedule, base_lr, step, warmup_steps, total_steps)
}

/// diffusers' `lr_lambda(step)`: the factor applied to `base_lr` (polynomial needs `base_lr`).
pub(crate) fn lr_multiplier(schedule: &LrSchedule, base_lr: f64, step: usize, warmup_steps: usize, total_steps: usize) -> f64 {
    let s = step as f64;
    let w = warmup_steps as f64;
    let n = total_steps as f64;
    if matches!(schedule, LrSchedule::Constant) {
        return 1.0;
    }
    if step < warmup_steps {
        return s / w.max(1.0);
    }
    let progress = (s - w) / (n - w).max(1.0);
    match schedule {
        LrSchedule::Constant => 1.0,
        LrSchedule::ConstantWithWarmup => 1.0,
        LrSchedule::Linear => ((n - s) / (n - w).max(1.0)).max(0.0),
        LrSchedule::Cosine => {
            let num_cycles = 0.5;
            (0.5 * (1.0 + (PI * num_cycles * 2.0 * progress).cos())).max(0.0)
        }
        LrSchedule::Rex => {
            let d = 0.9;
            if progress < 1.0 {
                (1.0 - progress) / ((1.0 - d) + d * (1.0 - progress))
            } else {
                0.0
            }
        }
        LrSchedule::CosineWithMinLr { min_lr_ratio } => {
            let factor = 0.5 * (1.0 + (PI * 0.5 * 2.0 * progress).cos());
            (factor * (1.0 - min_lr_ratio) + min_lr_ratio).max(0.0)
        }
        LrSchedule::CosineWithRestarts { num_cycles } => {
            if progress >= 1.0 {
                0.0
            } else {
                (0.5 * (1.0 + (PI * ((*num_cycles as f64 * progress) % 1.0)).cos())).max(0.0)
            }
        }
        LrSchedule::Polynomial { power, lr_end } => {
            if step > total_steps {
                lr_end / base_lr
            } else {
                let decay_steps = (n - w).max(1.0);
                let pct_remaining = 1.0 - (s - w) / decay_steps;
                ((base_lr - lr_end) * pct_remaining.powf(*power) + lr_end) / base_lr
            }
        }
    }
}

/// `--scale_lr`: `lr · gradient_accumulation_steps · batch_size · num_processes`.
pub fn scale_lr(lr: f64, gradient_accumulation_steps: usize, batch_size: usize, num_processes: usize) -> f64 {
    lr * (gradient_accumulation_steps * batch_size * num_processes) as f64
}

/// The reference script's epoch and update counts for one process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepPlan {
    /// `len(dataloader)`: `ceil(examples / batch_size)` (`drop_last=False`).
    pub batches_per_epoch: usize,
    /// `ceil(batches_per_epoch / gradient_accumulation_steps)`.
    pub updates_per_epoch: usize,
    /// Optimizer updates in the whole run (the `N` of the lr schedule).
    pub max_train_steps: usize,
    /// Epochs to run: `ceil(max_train_steps / updates_per_epoch)`.
    pub num_epochs: usize,
}

impl StepPlan {
    /// Bookkeeping as the script: `max_train_steps` defaults to `epochs · updates_per_epoch`, and
    /// the number of epochs is recomputed from it. Errors on an empty dataset or zero sizes.
    pub fn new(
        num_examples: usize,
        batch_size: usize,
        gradient_accumulation_steps: usize,
        num_epochs: usize,
        max_train_steps: Option<usize>,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(num_examples > 0, "the dataset is empty: nothing to train on");
        anyhow::ensure!(batch_size > 0, "batch size must be at least 1");
        Self::from_batches(num_examples.div_ceil(batch_size), gradient_accumulation_steps, num_epochs, max_train_steps)
    }

    /// [`StepPlan::new`] for a loader of `batches_per_epoch` batches (aspect-ratio buckets each
    /// end in a short batch, so the count is theirs, summed).
    pub fn from_batches(
        batches_per_epoch: usize,
        gradient_accumulation_steps: usize,
        num_epochs: usize,
        max_train_steps: Option<usize>,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(batches_per_epoch > 0, "the dataset is empty: nothing to train on");
        anyhow::ensure!(gradient_accumulation_steps > 0, "gradient accumulation steps must be at least 1");
        let updates_per_epoch = batches_per_epoch.div_ceil(gradient_accumulation_steps);
        let max_train_steps = max_train_steps.unwrap_or(num_epochs * updates_per_epoch);
        anyhow::ensure!(max_train_steps > 0, "zero training steps (epochs 0 and no max_train_steps)");
        let num_epochs = max_train_steps.div_ceil(updates_per_epoch);
        Ok(Self { batches_per_epoch, updates_per_epoch, max_train_steps, num_epochs })
    }

    /// Whether micro-batch `batch_in_epoch` (0-based) ends an accumulation window: every
    /// `gradient_accumulation_steps` batches, and at the end of the dataloader (accelerate's
    /// `sync_gradients`).
    pub fn is_update_batch(&self, batch_in_epoch: usize, gradient_accumulation_steps: usize) -> bool {
        (batch_in_epoch + 1) % gradient_accumulation_steps == 0 || batch_in_epoch + 1 == self.batches_per_epoch
    }

    /// The epoch a run resumed at update `global_step` starts in (`global_step // updates_per_epoch`).
    pub fn first_epoch_after_resume(&self, global_step: usize) -> usize {
        global_step / self.updates_per_epoch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for name in ["constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"] {
            assert_eq!(LrSchedule::from_name(name).unwrap().name(), name);
        }
        assert!(LrSchedule::from_name("piecewise_constant").is_none());
    }
}
