//! Reporting what a run does beyond the progress bar: `metrics.jsonl` (`metrics`), TensorBoard
//! event files (`tensorboard`), validation grids (`grid`) and `loss.png` (`plot`), which share
//! their font and PNG encoding (`pixels`).

pub mod grid;
pub mod metrics;
pub mod pixels;
pub mod plot;
pub mod tensorboard;
