//! DPM-Solver++(2M) sampler (diffusers' `DPMSolverMultistepScheduler` with its defaults:
//! `algorithm_type` dpmsolver++, `solver_order` 2, midpoint solver, `lower_order_final`):
//! a second-order multistep solver in log-SNR time on data (x0) predictions.

use candle_core::Tensor;

use super::{check_steps, Sampler, SchedulerConfig, TimestepSpacing};
use crate::vocab::PredictionType;

/// DPM-Solver++ 2M (deterministic).
pub(crate) struct DpmSolverPP2M {
    train_sigmas: Vec<f32>,
    train_steps: usize,
    steps_offset: usize,
    spacing: TimestepSpacing,
    prediction_type: PredictionType,
    timesteps: Vec<f64>,
    /// One more than `timesteps`; the last is 0.
    sigmas: Vec<f32>,
    /// The x0 predictions of the last two steps (oldest first).
    model_outputs: Vec<Tensor>,
    lower_order_nums: usize,
    step_index: usize,
}

/// `(α, σ)` of the DDPM-space sample at Karras sigma `s`: α = 1/√(s²+1), σ = s·α.
fn alpha_sigma(s: f32) -> (f32, f32) {
    let alpha = 1.0 / (s * s + 1.0).sqrt();
    (alpha, s * alpha)
}

/// The half log-SNR λ = log α − log σ.
fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

impl DpmSolverPP2M {
    pub fn from_config(cfg: &SchedulerConfig) -> anyhow::Result<Self> {
        cfg.refuse_unsupported("DPMSolverMultistepScheduler")?;
        for (key, value) in [
            ("use_karras_sigmas", cfg.use_karras_sigmas),
            ("use_exponential_sigmas", cfg.use_exponential_sigmas),
            ("use_beta_sigmas", cfg.use_beta_sigmas),
            ("rescale_betas_zero_snr", cfg.rescale_betas_zero_snr),
        ] {
            if value == Some(true) {
                anyhow::bail!("scheduler config: `{key}: true` is not supported by DPMSolverMultistepScheduler");
            }
        }
        if let Some(kind) = cfg.final_sigmas_type.as_deref().filter(|k| *k != "zero") {
            anyhow::bail!("scheduler config: `final_sigmas_type` \"{kind}\" is not supported by DPMSolverMultistepScheduler (only zero)");
        }
        let alphas_cumprod = super::betas::alphas_cumprod(cfg)?;
        Ok(DpmSolverPP2M {
            train_sigmas: alphas_cumprod.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect(),
            train_steps: cfg.num_train_timesteps,
            steps_offset: cfg.steps_offset,
            spacing: TimestepSpacing::parse(cfg.timestep_spacing.as_deref(), TimestepSpacing::Linspace)?,
            prediction_type: PredictionType::parse(&cfg.prediction_type)?,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            model_outputs: Vec::new(),
            lower_order_nums: 0,
            step_index: 0,
        })
    }

    /// The data prediction x0 from the model output (dpmsolver++ works on x0).
    fn to_x0(&self, model_output: &Tensor, x: &Tensor, sigma: f32) -> candle_core::Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(sigma);
        match self.prediction_type {
            PredictionType::Epsilon => (x - model_output.affine(sigma_t as f64, 0.0)?)?.affine(1.0 / alpha_t as f64, 0.0),
            PredictionType::Sample => Ok(model_output.clone()),
            PredictionType::VPrediction => x.affine(alpha_t as f64, 0.0)? - model_output.affine(sigma_t as f64, 0.0)?,
        }
    }
}

impl Sampler for DpmSolverPP2M {
    fn set_timesteps(&mut self, n: usize) -> anyhow::Result<()> {
        check_steps(n, self.train_steps)?;
        let t = self.train_steps;
        let ts: Vec<i64> = match self.spacing {
            // np.linspace(0, T-1, n+1).round()[::-1][:-1]
            TimestepSpacing::Linspace => {
                let last = (t - 1) as f64;
                let mut v: Vec<i64> = (0..=n)
                    .map(|i| if i == n { last } else { i as f64 * (last / n as f64) })
                    .map(|x| x.round_ties_even() as i64)
                    .collect();
                v.reverse();
                v.truncate(n);
                v
            }
            // (arange(n+1) * (T // (n+1)))[::-1][:-1] + steps_offset
            TimestepSpacing::Leading => {
                let ratio = (t / (n + 1)) as i64;
                (1..=n as i64).rev().map(|i| i * ratio + self.steps_offset as i64).collect()
            }
            TimestepSpacing::Trailing => {
                let mut v = TimestepSpacing::Trailing.ascending(n, t, 0);
                v.reverse();
                v
            }
        };
        self.sigmas = ts.iter().map(|&x| self.train_sigmas[x.clamp(0, t as i64 - 1) as usize]).collect();
        self.sigmas.push(0.0);
        self.timesteps = ts.into_iter().map(|x| x as f64).collect();
        self.model_outputs.clear();
        self.lower_order_nums = 0;
        self.step_index = 0;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(&mut self, model_output: &Tensor, t: f64, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.sigmas.is_empty() {
            candle_core::bail!("DPM-Solver++: call set_timesteps before step");
        }
        let i = self.timesteps.iter().position(|&v| v == t).unwrap_or(self.step_index);
        let n = self.timesteps.len();
        // The final sigma is zero, so the last step is first order (diffusers' lower_order_final).
        let last_step = i == n - 1;
        let x0 = self.to_x0(model_output, x, self.sigmas[i])?;
        if self.model_outputs.len() == 2 {
            self.model_outputs.remove(0);
        }
        self.model_outputs.push(x0.clone());

        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s0, sigma_s0);
        let decay = alpha_t * ((-h).exp() - 1.0);
        let first_order = self.lower_order_nums < 1 || last_step;
        let prev = if first_order {
            // x_t = (σ_t/σ_s) x − α_t (e^{−h} − 1) D0
            (x.affine((sigma_t / sigma_s0) as f64, 0.0)? - x0.affine(decay as f64, 0.0)?)?
        } else {
            let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
            let h0 = lambda(alpha_s0, sigma_s0) - lambda(alpha_s1, sigma_s1);
            let r0 = h0 / h;
            let m0 = &self.model_outputs[1];
            let m1 = &self.model_outputs[0];
            let d1 = (m0 - m1)?.affine(1.0 / r0 as f64, 0.0)?;
            ((x.affine((sigma_t / sigma_s0) as f64, 0.0)? - m0.affine(decay as f64, 0.0)?)? - d1.affine(0.5 * decay as f64, 0.0)?)?
        };
        if self.lower_order_nums < 2 {
            self.lower_order_nums += 1;
        }
        self.step_index = i + 1;
        Ok(prev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timesteps_follow_diffusers_spacings() {
        // Worked by hand from diffusers' formulas (T = 1000, n = 4).
        let mut s = DpmSolverPP2M::from_config(&SchedulerConfig::sd15()).unwrap();
        s.set_timesteps(4).unwrap();
        assert_eq!(s.timesteps(), &[999.0, 749.0, 500.0, 250.0]); // linspace(0, 999, 5).round() = 0, 250, 500, 749, 999 (249.75→250, 749.25→749)
        let cfg = SchedulerConfig { timestep_spacing: Some("leading".into()), ..SchedulerConfig::sd15() };
        let mut s = DpmSolverPP2M::from_config(&cfg).unwrap();
        s.set_timesteps(4).unwrap();
        assert_eq!(s.timesteps(), &[801.0, 601.0, 401.0, 201.0]);
    }
}
