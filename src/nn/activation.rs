//! Activation functions named as in the model configs (`silu`, `gelu`, `quick_gelu`, ...),
//! each composed of ops that have a backward.

use candle_core::{Result, Tensor};

/// An activation function chosen by a config string.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `x · sigmoid(x)` (`silu`, `swish`).
    Silu,
    /// Exact GELU with erf (torch `F.gelu`, transformers `gelu`).
    Gelu,
    /// GELU with the tanh approximation (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    /// `x · sigmoid(1.702 x)` (CLIP's `quick_gelu`).
    QuickGelu,
}

impl Activation {
    /// Parse a config value; `None` for names we do not implement.
    pub(crate) fn from_name(name: &str) -> Option<Self> {
        match name {
            "silu" | "swish" => Some(Self::Silu),
            "gelu" => Some(Self::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Self::GeluTanh),
            "quick_gelu" => Some(Self::QuickGelu),
            _ => None,
        }
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Silu => x.silu(),
            Self::Gelu => x.gelu_erf(),
            Self::GeluTanh => x.gelu(),
            Self::QuickGelu => x.mul(&sigmoid(&(x * 1.702)?)?),
        }
    }
}

/// `1 / (1 + exp(-x))`, composed so it has a backward.
pub(crate) fn sigmoid(x: &Tensor) -> Result<Tensor> {
    (x.neg()?.exp()? + 1.0)?.recip()
}
