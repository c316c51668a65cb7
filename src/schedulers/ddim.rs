//! DDIM sampler with eta 0 (deterministic; diffusers' `DDIMScheduler.step`): predict x0, clip it
//! when `clip_sample` is on, then move to the previous timestep along the predicted noise.

use candle_core::Tensor;

use super::{check_steps, Sampler, SchedulerConfig, TimestepSpacing};
use crate::vocab::PredictionType;

/// DDIM (eta 0).
pub struct Ddim {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    train_steps: usize,
    steps_offset: usize,
    spacing: TimestepSpacing,
    prediction_type: PredictionType,
    /// Clamp the predicted x0 to `[-r, r]` (DDIM's class default is on, r = 1).
    clip_sample: Option<f64>,
    num_inference_steps: usize,
    timesteps: Vec<f64>,
}

impl Ddim {
    pub fn from_config(cfg: &SchedulerConfig) -> anyhow::Result<Self> {
        cfg.refuse_unsupported("DDIMScheduler")?;
        let alphas_cumprod = super::betas::alphas_cumprod(cfg)?;
        // DDIM's class defaults: set_alpha_to_one true, clip_sample true (range 1.0).
        let final_alpha_cumprod = if cfg.set_alpha_to_one.unwrap_or(true) { 1.0 } else { alphas_cumprod[0] };
        let clip_sample = cfg.clip_sample.unwrap_or(true).then(|| cfg.clip_sample_range.unwrap_or(1.0));
        Ok(Ddim {
            alphas_cumprod,
            final_alpha_cumprod,
            train_steps: cfg.num_train_timesteps,
            steps_offset: cfg.steps_offset,
            spacing: TimestepSpacing::parse(cfg.timestep_spacing.as_deref(), TimestepSpacing::Leading)?,
            prediction_type: PredictionType::parse(&cfg.prediction_type)?,
            clip_sample,
            num_inference_steps: 0,
            timesteps: Vec::new(),
        })
    }

    fn alpha_bar(&self, t: i64) -> f32 {
        if t >= 0 {
            self.alphas_cumprod[(t as usize).min(self.train_steps - 1)]
        } else {
            self.final_alpha_cumprod
        }
    }
}

impl Sampler for Ddim {
    fn set_timesteps(&mut self, n: usize) -> anyhow::Result<()> {
        check_steps(n, self.train_steps)?;
        let mut ts = self.spacing.ascending(n, self.train_steps, self.steps_offset);
        ts.reverse();
        self.timesteps = ts.into_iter().map(|t| t as f64).collect();
        self.num_inference_steps = n;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(&mut self, model_output: &Tensor, t: f64, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.num_inference_steps == 0 {
            candle_core::bail!("DDIM: call set_timesteps before step");
        }
        let t = t as i64;
        let prev_t = t - (self.train_steps / self.num_inference_steps) as i64;
        let at = self.alpha_bar(t);
        let ap = self.alpha_bar(prev_t);
        let bt = 1.0 - at;
        let (pred_x0, pred_eps) = match self.prediction_type {
            PredictionType::Epsilon => {
                let x0 = (x - model_output.affine(bt.sqrt() as f64, 0.0)?)?.affine(1.0 / at.sqrt() as f64, 0.0)?;
                (x0, model_output.clone())
            }
            PredictionType::Sample => {
                let eps = (x - model_output.affine(at.sqrt() as f64, 0.0)?)?.affine(1.0 / bt.sqrt() as f64, 0.0)?;
                (model_output.clone(), eps)
            }
            PredictionType::VPrediction => {
                let x0 = (x.affine(at.sqrt() as f64, 0.0)? - model_output.affine(bt.sqrt() as f64, 0.0)?)?;
                let eps = (model_output.affine(at.sqrt() as f64, 0.0)? + x.affine(bt.sqrt() as f64, 0.0)?)?;
                (x0, eps)
            }
        };
        let pred_x0 = match self.clip_sample {
            Some(r) => pred_x0.clamp(-r, r)?,
            None => pred_x0,
        };
        // eta = 0: no added noise, the direction term is sqrt(1 - ab_prev) * eps.
        pred_x0.affine(ap.sqrt() as f64, 0.0)? + pred_eps.affine((1.0 - ap).sqrt() as f64, 0.0)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timesteps(spacing: &str, n: usize) -> Vec<f64> {
        let cfg = SchedulerConfig { timestep_spacing: Some(spacing.into()), ..SchedulerConfig::sd15() };
        let mut d = Ddim::from_config(&cfg).unwrap();
        d.set_timesteps(n).unwrap();
        d.timesteps().to_vec()
    }

    #[test]
    fn spacings_follow_diffusers() {
        // Values from diffusers' formulas worked by hand for T = 1000.
        assert_eq!(timesteps("leading", 4), vec![751.0, 501.0, 251.0, 1.0]);
        assert_eq!(timesteps("trailing", 4), vec![999.0, 749.0, 499.0, 249.0]);
        assert_eq!(timesteps("linspace", 4), vec![999.0, 666.0, 333.0, 0.0]);
        assert_eq!(timesteps("trailing", 3), vec![999.0, 666.0, 332.0]);
    }

    #[test]
    fn bad_spacing_and_zero_steps_are_errors() {
        let cfg = SchedulerConfig { timestep_spacing: Some("karras".into()), ..SchedulerConfig::sd15() };
        let err = Ddim::from_config(&cfg).err().expect("must refuse").to_string();
        assert!(err.contains("timestep_spacing") && err.contains("karras"), "{err}");
        let mut d = Ddim::from_config(&SchedulerConfig::sd15()).unwrap();
        assert!(d.set_timesteps(0).is_err());
        assert!(d.set_timesteps(1001).is_err());
    }
}
