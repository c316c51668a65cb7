//! Layers of our own where candle's are not enough: every op here has a backward.
//!
//! - `frozen`: frozen conv and linear as custom ops whose backward returns only the input gradient.
//! - `linear`: the frozen linear layer that can carry LoRA branches (`AdaptedLinear`).
//! - `conv`: the frozen conv that can carry LoRA (LoCon) branches (`AdaptedConv2d`).
//! - `norm`: layer norm and group norm composed from differentiable ops.
//! - `fused_norm`: GroupNorm (+ SiLU) as one CPU f32 kernel with its own backward.
//! - `attention`: multi-head scaled dot-product attention and the choice of its implementation.
//! - `flash_attention`: blocked attention that never materialises the scores (fused CPU kernel,
//!   chunked tensor-op version for other devices), each with its own backward.
//! - `activation`: activations by config name (`silu`, `gelu`, `quick_gelu`, ...).
//! - `resnet`: diffusers' `ResnetBlock2D`, with or without a time embedding.
//! - `checkpoint`: gradient checkpointing (recompute a piece in the backward pass).

pub mod activation;
pub mod attention;
pub mod checkpoint;
pub mod conv;
pub(crate) mod flash_attention;
pub mod frozen;
pub(crate) mod fused_norm;
pub mod linear;
pub mod norm;
pub(crate) mod precomputed;
pub mod resnet;

pub(crate) use activation::Activation;
pub use attention::scaled_dot_product_attention;
pub use checkpoint::CheckpointGrads;
pub use conv::AdaptedConv2d;
pub use linear::{AdaptedLinear, LoraBranch};
pub use norm::{GroupNorm, LayerNorm};
