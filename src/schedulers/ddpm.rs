//! DDPM for training (diffusers' `DDPMScheduler` as the training script uses it): the cumulative
//! alphas, `add_noise` with a timestep per sample, the v-prediction target (`get_velocity`) and
//! the signal-to-noise ratio of min-SNR weighting (`compute_snr`). Everything in f32 like torch.

use candle_core::{DType, Device, Tensor};

use super::SchedulerConfig;
use crate::vocab::PredictionType;

/// The DDPM noise schedule used to noise latents in training.
#[derive(Clone, Debug)]
pub struct Ddpm {
    /// ᾱ_t for t = 0..num_train_timesteps, f32 exactly as torch computes it.
    pub alphas_cumprod: Vec<f32>,
    pub num_train_timesteps: usize,
    pub prediction_type: PredictionType,
}

impl Ddpm {
    /// Build from a scheduler config (any class, as `DDPMScheduler.from_pretrained` does: keys DDPM
    /// does not use are ignored).
    pub fn from_config(cfg: &SchedulerConfig) -> anyhow::Result<Self> {
        Ok(Ddpm {
            alphas_cumprod: super::betas::alphas_cumprod(cfg)?,
            num_train_timesteps: cfg.num_train_timesteps,
            prediction_type: PredictionType::parse(&cfg.prediction_type)?,
        })
    }

    /// x_t = sqrt(ab_t) x0 + sqrt(1-ab_t) noise, per-sample t (len = batch).
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, timesteps: &[u32]) -> candle_core::Result<Tensor> {
        let (signal, noise_level) = self.coefficients(x0, noise, timesteps, "add_noise")?;
        x0.broadcast_mul(&signal)?.add(&noise.broadcast_mul(&noise_level)?)
    }

    /// The v-prediction target `sqrt(ab_t) noise - sqrt(1-ab_t) x0` (diffusers' `get_velocity`).
    pub fn get_velocity(&self, x0: &Tensor, noise: &Tensor, timesteps: &[u32]) -> candle_core::Result<Tensor> {
        let (signal, noise_level) = self.coefficients(x0, noise, timesteps, "get_velocity")?;
        noise.broadcast_mul(&signal)?.sub(&x0.broadcast_mul(&noise_level)?)
    }

    /// diffusers' compute_snr, f32: `(sqrt(ab_t) / sqrt(1 - ab_t))^2` per timestep.
    /// Timesteps past the schedule are clamped to the last one (training draws t in 0..T).
    pub fn snr(&self, timesteps: &[u32]) -> Vec<f32> {
        timesteps
            .iter()
            .map(|&t| {
                let ab = self.alphas_cumprod[(t as usize).min(self.num_train_timesteps - 1)];
                let ratio = ab.sqrt() / (1.0 - ab).sqrt();
                ratio * ratio
            })
            .collect()
    }

    /// `[B, 1, …, 1]` tensors of sqrt(ᾱ_t) and sqrt(1−ᾱ_t) in the dtype of `x0` (diffusers casts
    /// ᾱ to the sample dtype, then takes the square roots), after checking shapes and timesteps.
    fn coefficients(&self, x0: &Tensor, noise: &Tensor, timesteps: &[u32], op: &str) -> candle_core::Result<(Tensor, Tensor)> {
        if x0.dims() != noise.dims() {
            candle_core::bail!("Ddpm::{op}: sample shape {:?} and noise shape {:?} differ", x0.dims(), noise.dims());
        }
        let batch = x0.dims().first().copied().unwrap_or(0);
        if timesteps.len() != batch {
            candle_core::bail!("Ddpm::{op}: {} timesteps for a batch of {batch} (shape {:?})", timesteps.len(), x0.dims());
        }
        if let Some(&t) = timesteps.iter().find(|&&t| t as usize >= self.num_train_timesteps) {
            candle_core::bail!("Ddpm::{op}: timestep {t} is outside 0..{}", self.num_train_timesteps);
        }
        let dtype = x0.dtype();
        let round = |v: f32| -> f32 {
            // ᾱ is cast to the sample dtype before the square root, as in diffusers.
            match dtype {
                DType::BF16 => half::bf16::from_f32(v).to_f32(),
                DType::F16 => half::f16::from_f32(v).to_f32(),
                _ => v,
            }
        };
        let mut signal = Vec::with_capacity(batch);
        let mut noise_level = Vec::with_capacity(batch);
        for &t in timesteps {
            let ab = round(self.alphas_cumprod[t as usize]);
            signal.push(round(ab.sqrt()));
            noise_level.push(round(round(1.0 - ab).sqrt()));
        }
        let mut shape = vec![1usize; x0.rank()];
        shape[0] = batch;
        let to_tensor = |v: Vec<f32>, device: &Device| Tensor::from_vec(v, shape.as_slice(), device)?.to_dtype(dtype);
        Ok((to_tensor(signal, x0.device())?, to_tensor(noise_level, x0.device())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_noise_checks_batch_and_range() {
        let ddpm = Ddpm::from_config(&SchedulerConfig::sd15()).unwrap();
        let x = Tensor::zeros((2, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(ddpm.add_noise(&x, &x, &[1]).is_err(), "one timestep for a batch of two");
        assert!(ddpm.add_noise(&x, &x, &[1, 1000]).is_err(), "t = 1000 is out of range");
        let other = Tensor::zeros((2, 4, 2, 3), DType::F32, &Device::Cpu).unwrap();
        let err = ddpm.add_noise(&x, &other, &[1, 2]).unwrap_err().to_string();
        assert!(err.contains("[2, 4, 2, 2]") && err.contains("[2, 4, 2, 3]"), "{err}");
    }

    #[test]
    fn add_noise_matches_the_closed_form_per_sample() {
        // Independent scalar computation; exact equality is expected in f32 (same two products and a sum).
        let ddpm = Ddpm::from_config(&SchedulerConfig::sd15()).unwrap();
        let x0 = Tensor::new(&[[1.5f32, -2.0], [0.25, 3.0]], &Device::Cpu).unwrap();
        let noise = Tensor::new(&[[0.5f32, 1.0], [-1.0, 2.0]], &Device::Cpu).unwrap();
        let ts = [0u32, 999];
        let got: Vec<Vec<f32>> = ddpm.add_noise(&x0, &noise, &ts).unwrap().to_vec2().unwrap();
        let x0v: Vec<Vec<f32>> = x0.to_vec2().unwrap();
        let nv: Vec<Vec<f32>> = noise.to_vec2().unwrap();
        for b in 0..2 {
            let ab = ddpm.alphas_cumprod[ts[b] as usize];
            for j in 0..2 {
                let want = ab.sqrt() * x0v[b][j] + (1.0 - ab).sqrt() * nv[b][j];
                assert!((got[b][j] - want).abs() <= 1e-6 * want.abs().max(1.0), "b{b} j{j}: {} vs {want}", got[b][j]);
            }
        }
    }
}
