//! Reporting what a run does beyond the progress bar: TensorBoard event files (`tensorboard`).

pub mod tensorboard;
