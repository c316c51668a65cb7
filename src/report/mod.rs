//! Reporting what a run does beyond the progress bar: `metrics.jsonl` (`metrics`) and
//! TensorBoard event files (`tensorboard`).

pub mod metrics;
pub mod tensorboard;
