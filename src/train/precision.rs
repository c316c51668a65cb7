//! Mixed precision for training: the dtype the frozen models compute in (`train.precision`), and
//! fp16 dynamic loss scaling as torch's `GradScaler` (what accelerate uses for fp16).
//!
//! The meaning follows the reference (accelerate autocast + `train_text_to_image_lora.py`):
//! frozen UNet / VAE / text-encoder weights and their matmuls and convolutions are in the weight
//! dtype; the LoRA parameters, their gradients, the AdamW state, the norms' statistics, the
//! softmax and the loss are f32. bf16 has f32's exponent range and needs no loss scaling; fp16
//! gradients would underflow, so the loss is multiplied by a scale before the backward, the
//! gradients are divided by it before the update, and a step whose gradients overflowed is
//! skipped (the scale is halved).

use candle_core::{DType, Result, Tensor};
use serde::{Deserialize, Serialize};

/// `train.precision` as the trainer sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MixedPrecision {
    /// Everything in f32.
    #[default]
    No,
    /// Frozen models in f16, dynamic loss scaling.
    Fp16,
    /// Frozen models in bf16, no loss scaling.
    Bf16,
}

impl MixedPrecision {
    /// The dtype of the frozen weights (the reference's `weight_dtype`).
    pub(crate) fn weight_dtype(self) -> DType {
        match self {
            Self::No => DType::F32,
            Self::Fp16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }

    /// Whether this precision trains with a [`GradScaler`].
    pub(crate) fn uses_loss_scaling(self) -> bool {
        self == Self::Fp16
    }
}

/// `torch.amp.GradScaler`'s constructor arguments (accelerate passes the defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GradScalerConfig {
    pub init_scale: f64,
    pub growth_factor: f64,
    pub backoff_factor: f64,
    /// Consecutive steps without inf/NaN gradients after which the scale grows.
    pub growth_interval: usize,
}

impl Default for GradScalerConfig {
    /// torch's defaults: 2^16, ×2 after 2000 good steps, ×0.5 on an overflow.
    fn default() -> Self {
        Self { init_scale: 65536.0, growth_factor: 2.0, backoff_factor: 0.5, growth_interval: 2000 }
    }
}

/// The scaler's state, saved in checkpoints (torch's `scaler.pt`: `scale` and `_growth_tracker`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GradScalerState {
    /// The current loss scale (an f32 value, as torch keeps it in an f32 tensor).
    pub scale: f64,
    /// Consecutive steps without an overflow since the scale last changed.
    pub growth_tracker: usize,
}

/// torch's `GradScaler` for one optimizer: `scale` the loss, `unscale` the gradients (finding
/// inf/NaN), then `update` the scale.
#[derive(Debug, Clone)]
pub struct GradScaler {
    cfg: GradScalerConfig,
    state: GradScalerState,
}

impl GradScaler {
    pub fn new(cfg: GradScalerConfig) -> Self {
        Self { cfg, state: GradScalerState { scale: cfg.init_scale as f32 as f64, growth_tracker: 0 } }
    }

    /// The factor the loss is multiplied by before the backward.
    pub fn scale(&self) -> f64 {
        self.state.scale
    }

    pub fn state(&self) -> GradScalerState {
        self.state
    }

    /// Continue from a checkpointed state.
    pub(crate) fn restore(&mut self, state: GradScalerState) {
        self.state = state;
    }

    /// Divide every gradient by the scale, in f32 (torch multiplies by the f32 reciprocal of
    /// the scale); returns whether any gradient held an inf or NaN before unscaling (torch's
    /// `found_inf`), in which case the optimizer step must be skipped.
    pub fn unscale(&self, grads: &mut [Tensor]) -> Result<bool> {
        let found_inf = any_non_finite(grads)?;
        let inv_scale = (1.0 / self.state.scale) as f32 as f64;
        for g in grads.iter_mut() {
            *g = g.to_dtype(DType::F32)?.affine(inv_scale, 0.0)?;
        }
        Ok(found_inf)
    }

    /// torch's `_amp_update_scale_`: after an overflow the scale is multiplied by the backoff
    /// factor and the tracker reset; otherwise the tracker counts up, and at `growth_interval`
    /// the scale grows (only if the grown scale is finite in f32) and the tracker resets.
    pub fn update(&mut self, found_inf: bool) {
        let s = &mut self.state;
        if found_inf {
            s.scale = (s.scale * self.cfg.backoff_factor) as f32 as f64;
            s.growth_tracker = 0;
            return;
        }
        let successful = s.growth_tracker + 1;
        if successful == self.cfg.growth_interval {
            let grown = (s.scale * self.cfg.growth_factor) as f32;
            if grown.is_finite() {
                s.scale = grown as f64;
            }
            s.growth_tracker = 0;
        } else {
            s.growth_tracker = successful;
        }
    }
}

/// Whether any element of any tensor is inf or NaN (summed in f64, where a sum of finite f32
/// values cannot overflow, so the sum is finite exactly when every element is).
pub(crate) fn any_non_finite(tensors: &[Tensor]) -> Result<bool> {
    for t in tensors {
        let s = t.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        if !s.is_finite() {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Round `t` to `dtype` and back to its own dtype: the values a tensor has after the reference
/// computes it in `dtype` (e.g. noise drawn as `randn_like` of bf16 latents).
pub fn round_through(t: &Tensor, dtype: DType) -> Result<Tensor> {
    if dtype == t.dtype() {
        return Ok(t.clone());
    }
    t.to_dtype(dtype)?.to_dtype(t.dtype())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn update_follows_torch_rules() {
        let mut s = GradScaler::new(GradScalerConfig { growth_interval: 3, ..Default::default() });
        assert_eq!(s.scale(), 65536.0);
        s.update(false);
        s.update(false);
        assert_eq!((s.scale(), s.state().growth_tracker), (65536.0, 2));
        s.update(false);
        assert_eq!((s.scale(), s.state().growth_tracker), (131072.0, 0));
        s.update(false);
        s.update(true);
        assert_eq!((s.scale(), s.state().growth_tracker), (65536.0, 0));
        // Growth is refused where the scale would overflow f32 (torch keeps the old scale).
        let mut big = GradScaler::new(GradScalerConfig { init_scale: 2f64.powi(127), growth_interval: 1, ..Default::default() });
        big.update(false);
        assert_eq!(big.scale(), 2f64.powi(127));
    }

    #[test]
    fn unscale_divides_and_finds_non_finite() -> Result<()> {
        let dev = Device::Cpu;
        let s = GradScaler::new(GradScalerConfig::default());
        let mut g = vec![Tensor::new(&[65536f32, -131072.0], &dev)?, Tensor::new(&[32768f32], &dev)?];
        assert!(!s.unscale(&mut g)?);
        assert_eq!(g[0].to_vec1::<f32>()?, vec![1.0, -2.0]);
        assert_eq!(g[1].to_vec1::<f32>()?, vec![0.5]);
        for bad in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
            let mut g = vec![Tensor::new(&[1f32], &dev)?, Tensor::new(&[2f32, bad], &dev)?];
            assert!(s.unscale(&mut g)?, "{bad} must be found");
        }
        // Large finite values whose f32 sum would overflow are not mistaken for inf.
        let mut g = vec![Tensor::new(&[3e38f32, 3e38], &dev)?];
        assert!(!s.unscale(&mut g)?);
        Ok(())
    }
}
