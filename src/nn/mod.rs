//! Layers of our own where candle's are not enough: every op here has a backward.
//!
//! - `linear`: the frozen linear layer that can carry LoRA branches (`AdaptedLinear`).

pub mod linear;

pub use linear::{AdaptedLinear, LoraBranch};
