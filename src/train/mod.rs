//! Training: the step (noise, loss, backward), AdamW and clipping, lr schedules, the loop and
//! checkpoints.

pub mod checkpoint;
pub mod lr;
pub mod optim;
pub mod precision;
pub mod quant8;
pub mod step;
pub mod trainer;
