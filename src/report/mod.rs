//! Reporting what a run does beyond the progress bar: `metrics.jsonl` (`metrics`), TensorBoard
//! event files (`tensorboard`), validation grids (`grid`) and `loss.png` (`plot`).

pub mod grid;
pub mod metrics;
pub mod plot;
pub mod tensorboard;
