//! AutoencoderKL (diffusers): encoder to a diagonal Gaussian over latents, decoder back to pixels.

use candle_core::{Result, Tensor};

/// The encoder's latent distribution (diffusers' `DiagonalGaussianDistribution`).
pub struct DiagonalGaussian {
    pub mean: Tensor,
    /// Clamped to [-30, 20] as diffusers does.
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    pub fn std(&self) -> Result<Tensor> {
        (&self.logvar * 0.5)?.exp()
    }

    /// `mean + std * noise` (noise ~ N(0, 1), same shape as the mean).
    pub fn sample_with(&self, noise: &Tensor) -> Result<Tensor> {
        self.mean.add(&self.std()?.mul(noise)?)
    }
}

pub struct AutoencoderKL {}

impl AutoencoderKL {
    pub fn load(_vb: candle_nn::VarBuilder, _cfg: &super::config::VaeConfig) -> Result<Self> {
        todo!("models::vae")
    }

    /// Pixels `[B, 3, H, W]` in [-1, 1] → latent distribution `[B, 4, H/8, W/8]` (unscaled).
    pub fn encode(&self, _x: &Tensor) -> Result<DiagonalGaussian> {
        todo!("models::vae")
    }

    /// Latents `[B, 4, h, w]` (already divided by the scaling factor) → pixels in about [-1, 1].
    pub fn decode(&self, _z: &Tensor) -> Result<Tensor> {
        todo!("models::vae")
    }

    pub fn scaling_factor(&self) -> f64 {
        todo!("models::vae")
    }
}
