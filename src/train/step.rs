//! One training micro-step as the reference computes it: noise (plus offset noise), timesteps,
//! `add_noise`, the UNet prediction, the epsilon or velocity target, and the MSE or min-SNR loss.
//!
//! The VAE latents and text embeddings come in already computed (they are frozen, so the
//! trainer may cache them); the random draws come in as [`NoiseDraw`] so that a step can be
//! replayed exactly from a seed, and compared with the reference's golden step.

use candle_core::{DType, Device, Result, Tensor, D};
use rand::{Rng, RngExt};
use rand_distr::{Distribution, StandardNormal};

use crate::models::{Conditioning, UNet2DConditionModel};
use crate::nn::CheckpointGrads;
use crate::schedulers::ddpm::Ddpm;
use crate::vocab::PredictionType;

/// Loss options of the `[train]` table that change the math.
#[derive(Clone, Debug, Default)]
pub struct LossOptions {
    /// Min-SNR weighting gamma (diffusers' `--snr_gamma`); `None` is plain MSE.
    pub snr_gamma: Option<f64>,
    /// Overrides the scheduler config's prediction type (diffusers' `--prediction_type`).
    pub prediction_type: Option<PredictionType>,
    /// Offset-noise scale (`--noise_offset`); 0 disables it.
    pub noise_offset: f64,
}

/// The random numbers one micro-step uses, drawn up front.
pub(crate) struct NoiseDraw {
    /// N(0,1) for sampling the VAE posterior, shaped like the latents.
    pub posterior: Tensor,
    /// The diffusion noise ε (offset noise already added), shaped like the latents.
    pub noise: Tensor,
    /// One timestep per sample in `[0, num_train_timesteps)`.
    pub timesteps: Vec<u32>,
}

/// A tensor of standard normal samples from `rng`.
pub fn randn(rng: &mut impl Rng, shape: &[usize], device: &Device) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let data: Vec<f32> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
    Tensor::from_vec(data, shape, device)
}

/// Which random stream a draw uses: every example's draws depend only on the run's seed, the
/// (global) micro-step and the example's position in the global batch, so that N ranks with
/// batch b draw what one process with batch N·b draws (see `docs/distributed.md`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum DrawStream {
    /// Training micro-step `micro` (counted over the whole run).
    Train { micro: u64 },
    /// The fixed draws of evaluation batch `batch` (the same every evaluation).
    Eval { batch: u64 },
}

impl DrawStream {
    /// The generator of the example at global batch position `position`: ChaCha8 keyed by
    /// (seed, stream kind, step, position), 32 bytes with no two (step, position) alike.
    pub(crate) fn rng(self, seed: u64, position: u64) -> chacha20::ChaCha8Rng {
        let (kind, index) = match self {
            Self::Train { micro } => (1u64, micro),
            Self::Eval { batch } => (2u64, batch),
        };
        let mut key = [0u8; 32];
        for (i, word) in [seed, kind, index, position].into_iter().enumerate() {
            key[8 * i..8 * i + 8].copy_from_slice(&word.to_le_bytes());
        }
        <chacha20::ChaCha8Rng as rand::SeedableRng>::from_seed(key)
    }
}

impl NoiseDraw {
    /// Draw a micro-step's randomness per example: example `i` of this batch (global position
    /// `first_position + i`) takes its posterior sample, noise, offset noise and timestep, in
    /// that order, from its own stream ([`DrawStream::rng`]).
    pub(crate) fn draw_per_example(
        stream: DrawStream,
        seed: u64,
        first_position: u64,
        latent_shape: &[usize],
        num_train_timesteps: usize,
        noise_offset: f64,
        device: &Device,
    ) -> Result<Self> {
        let one: Vec<usize> = std::iter::once(1).chain(latent_shape[1..].iter().copied()).collect();
        let (mut posterior, mut noise, mut timesteps) = (Vec::new(), Vec::new(), Vec::new());
        for i in 0..latent_shape[0] {
            let mut rng = stream.rng(seed, first_position + i as u64);
            posterior.push(randn(&mut rng, &one, device)?);
            let mut n = randn(&mut rng, &one, device)?;
            if noise_offset != 0.0 {
                let offset = randn(&mut rng, &[1, latent_shape[1], 1, 1], device)?;
                n = n.broadcast_add(&(offset * noise_offset)?)?;
            }
            noise.push(n);
            timesteps.push(rng.random_range(0..num_train_timesteps as u32));
        }
        Ok(Self { posterior: Tensor::cat(&posterior, 0)?, noise: Tensor::cat(&noise, 0)?, timesteps })
    }
}

/// The denoising loss for clean latents `x0` (already scaled by the VAE scaling factor).
/// Returns the scalar loss (f32) before division by the accumulation steps. `x0` and `noise`
/// may be f32 for a half-precision UNet: the noisy latents are cast to the UNet's dtype, the
/// target and the loss are computed in f32.
pub fn denoising_loss(
    unet: &UNet2DConditionModel,
    ddpm: &Ddpm,
    x0: &Tensor,
    noise: &Tensor,
    timesteps: &[u32],
    cond: &Conditioning,
    opts: &LossOptions,
) -> Result<Tensor> {
    denoising_loss_checkpointed(unet, ddpm, x0, noise, timesteps, cond, opts, None)
}

/// The loss target for `prediction_type`: the noise ε or the velocity (`Ddpm::get_velocity`);
/// `sample` is refused, as the reference accepts only epsilon and v_prediction.
pub fn training_target(ddpm: &Ddpm, prediction_type: PredictionType, x0: &Tensor, noise: &Tensor, timesteps: &[u32]) -> Result<Tensor> {
    match prediction_type {
        PredictionType::Epsilon => Ok(noise.clone()),
        PredictionType::VPrediction => ddpm.get_velocity(x0, noise, timesteps),
        PredictionType::Sample => Err(candle_core::Error::Msg(
            "prediction_type \"sample\" is not supported for training (the reference accepts only epsilon and v_prediction)".into(),
        )),
    }
}

/// [`denoising_loss`] with the UNet run under gradient checkpointing when `ckpt` is given (see
/// [`UNet2DConditionModel::forward_checkpointed`]; merge `ckpt` after the backward).
#[allow(clippy::too_many_arguments)]
pub fn denoising_loss_checkpointed(
    unet: &UNet2DConditionModel,
    ddpm: &Ddpm,
    x0: &Tensor,
    noise: &Tensor,
    timesteps: &[u32],
    cond: &Conditioning,
    opts: &LossOptions,
    ckpt: Option<&CheckpointGrads>,
) -> Result<Tensor> {
    let noisy = ddpm.add_noise(x0, noise, timesteps)?;
    let prediction_type = opts.prediction_type.unwrap_or(ddpm.prediction_type);
    let target = training_target(ddpm, prediction_type, x0, noise, timesteps)?;
    let t = Tensor::from_vec(timesteps.to_vec(), timesteps.len(), x0.device())?;
    // The UNet runs in its weight dtype (autocast); its prediction and the loss are f32.
    let wd = unet.dtype();
    let pred = unet.forward_checkpointed(&noisy.to_dtype(wd)?, &t, &cond.to_dtype(wd)?, ckpt)?.to_dtype(DType::F32)?;
    let sq = (pred - target.to_dtype(DType::F32)?)?.sqr()?;
    match opts.snr_gamma {
        None => sq.mean_all(),
        Some(gamma) => {
            let snr = ddpm.snr(timesteps);
            let weights: Vec<f32> = snr
                .iter()
                .map(|&s| {
                    let clipped = s.min(gamma as f32);
                    match prediction_type {
                        PredictionType::VPrediction => clipped / (s + 1.0),
                        _ => clipped / s,
                    }
                })
                .collect();
            let w = Tensor::from_vec(weights, timesteps.len(), x0.device())?;
            let per_sample = sq.flatten_from(1)?.mean(D::Minus1)?;
            (per_sample * w)?.mean_all()
        }
    }
}
