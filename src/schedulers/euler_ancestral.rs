//! Euler ancestral sampler (diffusers' `EulerAncestralDiscreteScheduler`): an Euler step down to
//! σ_down, then fresh Gaussian noise of size σ_up, from a seeded RNG so runs are reproducible.

use candle_core::Tensor;
use rand::{RngExt, SeedableRng};

use super::euler::{predict_x0, scale_by_sigma, SigmaSchedule};
use super::{Sampler, SchedulerConfig};
use crate::vocab::PredictionType;

/// Euler ancestral (stochastic; the noise comes from `seed`).
pub(crate) struct EulerAncestral {
    schedule: SigmaSchedule,
    prediction_type: PredictionType,
    step_index: usize,
    rng: rand::rngs::StdRng,
}

impl EulerAncestral {
    pub fn from_config(cfg: &SchedulerConfig, seed: u64) -> anyhow::Result<Self> {
        Ok(EulerAncestral {
            schedule: SigmaSchedule::from_config(cfg, "EulerAncestralDiscreteScheduler")?,
            prediction_type: PredictionType::parse(&cfg.prediction_type)?,
            step_index: 0,
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        })
    }
}

impl Sampler for EulerAncestral {
    fn set_timesteps(&mut self, n: usize) -> anyhow::Result<()> {
        self.schedule.set_timesteps(n)?;
        self.step_index = 0;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.schedule.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        self.schedule.init_noise_sigma()
    }

    fn scale_model_input(&self, x: &Tensor, t: f64) -> candle_core::Result<Tensor> {
        let i = self.schedule.index_of(t, self.step_index);
        scale_by_sigma(x, self.schedule.sigmas[i])
    }

    fn step(&mut self, model_output: &Tensor, t: f64, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.schedule.sigmas.is_empty() {
            candle_core::bail!("Euler ancestral: call set_timesteps before step");
        }
        let i = self.schedule.index_of(t, self.step_index);
        let sigma_from = self.schedule.sigmas[i];
        let sigma_to = self.schedule.sigmas[i + 1];
        let sigma_up = (sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to) / (sigma_from * sigma_from)).sqrt();
        let sigma_down = (sigma_to * sigma_to - sigma_up * sigma_up).max(0.0).sqrt();
        let x0 = predict_x0(self.prediction_type, model_output, x, sigma_from)?;
        let derivative = (x - x0)?.affine(1.0 / sigma_from as f64, 0.0)?;
        let stepped = (x + derivative.affine((sigma_down - sigma_from) as f64, 0.0)?)?;
        self.step_index = i + 1;
        let count = x.elem_count();
        let noise: Vec<f32> = (0..count).map(|_| self.rng.sample(rand_distr::StandardNormal)).collect();
        let noise = Tensor::from_vec(noise, x.dims(), x.device())?.to_dtype(x.dtype())?;
        stepped + noise.affine(sigma_up as f64, 0.0)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn last_step_adds_no_noise_and_same_seed_repeats() {
        let run = |seed| {
            let mut s = EulerAncestral::from_config(&SchedulerConfig::sd15(), seed).unwrap();
            s.set_timesteps(3).unwrap();
            let mut x = Tensor::ones((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
            let eps = Tensor::full(0.1f32, (1, 4, 2, 2), &Device::Cpu).unwrap();
            for t in s.timesteps().to_vec() {
                x = s.step(&eps, t, &x).unwrap();
            }
            x.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        assert_eq!(run(7), run(7), "same seed, same result");
        assert_ne!(run(7), run(8), "different seeds differ");
        // The final step goes to sigma 0: x0 = x - sigma*eps exactly, no noise (sigma_up = 0).
        let mut s = EulerAncestral::from_config(&SchedulerConfig::sd15(), 1).unwrap();
        s.set_timesteps(1).unwrap();
        let t = s.timesteps()[0];
        let sigma = s.schedule.sigmas[0];
        let x = Tensor::full(2.0f32, (1, 1, 1, 1), &Device::Cpu).unwrap();
        let eps = Tensor::full(0.5f32, (1, 1, 1, 1), &Device::Cpu).unwrap();
        let out = s.step(&eps, t, &x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()[0];
        // Tolerance 1e-5 relative: two f32 roundings.
        assert!((out - (2.0 - sigma * 0.5)).abs() < 1e-5 * (2.0 + sigma), "{out}");
    }
}
