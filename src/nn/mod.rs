//! Layers of our own where candle's are not enough: every op here has a backward.
//!
//! - `frozen`: frozen conv and linear as custom ops whose backward returns only the input gradient.
//! - `linear`: the frozen linear layer that can carry LoRA branches (`AdaptedLinear`).

pub mod frozen;
pub mod linear;

pub use linear::{AdaptedLinear, LoraBranch};
