//! Euler discrete sampler (diffusers' `EulerDiscreteScheduler`, Karras et al. 2022 Algorithm 2
//! without churn): sigmas `√((1−ᾱ)/ᾱ)` interpolated at the inference timesteps, model input
//! scaled by `1/√(σ²+1)`, one Euler step of the probability-flow ODE per timestep.

use candle_core::Tensor;

use super::{check_steps, Sampler, SchedulerConfig, TimestepSpacing};
use crate::vocab::PredictionType;

/// The timesteps and sigmas shared by the Euler samplers.
#[derive(Clone, Debug)]
pub(crate) struct SigmaSchedule {
    /// σ at every training timestep, f32 as torch computes it.
    train_sigmas: Vec<f32>,
    train_steps: usize,
    steps_offset: usize,
    spacing: TimestepSpacing,
    /// Use σ_min instead of 0 after the last step (`final_sigmas_type: sigma_min`).
    final_sigma_min: bool,
    pub timesteps: Vec<f64>,
    /// One more than `timesteps`: the last is the final sigma (0 by default).
    pub sigmas: Vec<f32>,
}

impl SigmaSchedule {
    pub fn from_config(cfg: &SchedulerConfig, class: &str) -> anyhow::Result<Self> {
        cfg.refuse_unsupported(class)?;
        for (key, value) in [
            ("use_karras_sigmas", cfg.use_karras_sigmas),
            ("use_exponential_sigmas", cfg.use_exponential_sigmas),
            ("use_beta_sigmas", cfg.use_beta_sigmas),
        ] {
            if value == Some(true) {
                anyhow::bail!("scheduler config: `{key}: true` is not supported by {class}");
            }
        }
        if let Some(kind) = cfg.interpolation_type.as_deref().filter(|k| *k != "linear") {
            anyhow::bail!("scheduler config: `interpolation_type` \"{kind}\" is not supported by {class} (only linear)");
        }
        if let Some(kind) = cfg.timestep_type.as_deref().filter(|k| *k != "discrete") {
            anyhow::bail!("scheduler config: `timestep_type` \"{kind}\" is not supported by {class} (only discrete)");
        }
        let final_sigma_min = match cfg.final_sigmas_type.as_deref() {
            None | Some("zero") => false,
            Some("sigma_min") => true,
            Some(other) => anyhow::bail!("scheduler config: `final_sigmas_type` \"{other}\" is not one of zero, sigma_min"),
        };
        let mut alphas_cumprod = super::betas::alphas_cumprod(cfg)?;
        if cfg.rescale_betas_zero_snr == Some(true) {
            // As diffusers: avoid an infinite sigma at the zero-SNR end.
            if let Some(last) = alphas_cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        let train_sigmas = alphas_cumprod.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect();
        Ok(SigmaSchedule {
            train_sigmas,
            train_steps: cfg.num_train_timesteps,
            steps_offset: cfg.steps_offset,
            // Euler's class default spacing is linspace; a config that names one wins.
            spacing: TimestepSpacing::parse(cfg.timestep_spacing.as_deref(), TimestepSpacing::Linspace)?,
            final_sigma_min,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
        })
    }

    pub fn set_timesteps(&mut self, n: usize) -> anyhow::Result<()> {
        check_steps(n, self.train_steps)?;
        let t_max = (self.train_steps - 1) as f64;
        let ascending: Vec<f64> = match self.spacing {
            // np.linspace(0, T-1, n, dtype=float32): computed in f64, stored as f32, not rounded.
            TimestepSpacing::Linspace => (0..n)
                .map(|i| if n == 1 { 0.0 } else if i == n - 1 { t_max } else { i as f64 * (t_max / (n - 1) as f64) })
                .map(|v| v as f32 as f64)
                .collect(),
            spacing => spacing.ascending(n, self.train_steps, self.steps_offset).into_iter().map(|t| t as f64).collect(),
        };
        self.timesteps = ascending.into_iter().rev().collect();
        let mut sigmas: Vec<f32> = self.timesteps.iter().map(|&t| self.interpolate(t)).collect();
        let last = if self.final_sigma_min { self.train_sigmas[0] } else { 0.0 };
        sigmas.push(last);
        self.sigmas = sigmas;
        Ok(())
    }

    /// `np.interp(t, arange(T), sigmas)` in f64, stored as f32.
    fn interpolate(&self, t: f64) -> f32 {
        let s = &self.train_sigmas;
        if t <= 0.0 {
            return s[0];
        }
        let last = s.len() - 1;
        if t >= last as f64 {
            return s[last];
        }
        let lo = t.floor() as usize;
        let frac = t - lo as f64;
        if frac == 0.0 {
            return s[lo];
        }
        let slope = (s[lo + 1] as f64 - s[lo] as f64) / 1.0;
        (slope * frac + s[lo] as f64) as f32
    }

    /// `max σ` for linspace/trailing spacing, else `√(max σ² + 1)`, in f32 like diffusers.
    pub fn init_noise_sigma(&self) -> f64 {
        let max = self.sigmas.iter().copied().fold(0.0f32, f32::max);
        match self.spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max as f64,
            TimestepSpacing::Leading => (max * max + 1.0).sqrt() as f64,
        }
    }

    /// The index of `t` in the schedule (the first match, as diffusers' `index_for_timestep`
    /// for a fresh run; the Euler samplers visit each timestep once).
    pub(crate) fn index_of(&self, t: f64, fallback: usize) -> usize {
        self.timesteps.iter().position(|&x| x == t).unwrap_or(fallback)
    }
}

/// Euler discrete (no churn).
pub struct EulerDiscrete {
    schedule: SigmaSchedule,
    prediction_type: PredictionType,
    step_index: usize,
}

impl EulerDiscrete {
    pub fn from_config(cfg: &SchedulerConfig) -> anyhow::Result<Self> {
        Ok(EulerDiscrete {
            schedule: SigmaSchedule::from_config(cfg, "EulerDiscreteScheduler")?,
            prediction_type: PredictionType::parse(&cfg.prediction_type)?,
            step_index: 0,
        })
    }

    /// The sigmas of the current schedule (one more than the timesteps; the last is final).
    pub fn sigmas(&self) -> &[f32] {
        &self.schedule.sigmas
    }
}

/// x0 predicted from the model output at noise level σ (diffusers' Euler formulas).
pub(crate) fn predict_x0(kind: PredictionType, model_output: &Tensor, x: &Tensor, sigma: f32) -> candle_core::Result<Tensor> {
    match kind {
        PredictionType::Epsilon => x - model_output.affine(sigma as f64, 0.0)?,
        PredictionType::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            model_output.affine((-sigma / s2.sqrt()) as f64, 0.0)? + x.affine(1.0 / s2 as f64, 0.0)?
        }
        PredictionType::Sample => Ok(model_output.clone()),
    }
}

/// `x / √(σ²+1)` with σ in f32.
pub(crate) fn scale_by_sigma(x: &Tensor, sigma: f32) -> candle_core::Result<Tensor> {
    x.affine(1.0 / (sigma * sigma + 1.0).sqrt() as f64, 0.0)
}

impl Sampler for EulerDiscrete {
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
            candle_core::bail!("Euler: call set_timesteps before step");
        }
        let i = self.schedule.index_of(t, self.step_index);
        let sigma = self.schedule.sigmas[i];
        let sigma_next = self.schedule.sigmas[i + 1];
        let x0 = predict_x0(self.prediction_type, model_output, x, sigma)?;
        // derivative = (x - x0) / σ; x_next = x + derivative · (σ_next − σ).
        let derivative = (x - x0)?.affine(1.0 / sigma as f64, 0.0)?;
        self.step_index = i + 1;
        x + derivative.affine((sigma_next - sigma) as f64, 0.0)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linspace_default_when_the_config_has_no_spacing() {
        let cfg = SchedulerConfig { timestep_spacing: None, ..SchedulerConfig::sd15() };
        let mut e = EulerDiscrete::from_config(&cfg).unwrap();
        e.set_timesteps(4).unwrap();
        assert_eq!(e.timesteps(), &[999.0, 666.0, 333.0, 0.0]);
        // init_noise_sigma = max sigma ≈ 14.61 for SD 1.5 (spec §8); tolerance 1e-3 absolute.
        assert!((e.init_noise_sigma() - 14.6146).abs() < 1e-3, "{}", e.init_noise_sigma());
        assert_eq!(*e.sigmas().last().unwrap(), 0.0);
    }

    #[test]
    fn leading_spacing_scales_init_sigma() {
        let cfg = SchedulerConfig { timestep_spacing: Some("leading".into()), ..SchedulerConfig::sd15() };
        let mut e = EulerDiscrete::from_config(&cfg).unwrap();
        e.set_timesteps(4).unwrap();
        assert_eq!(e.timesteps(), &[751.0, 501.0, 251.0, 1.0]);
        let s = e.sigmas()[0] as f64;
        assert!((e.init_noise_sigma() - (s * s + 1.0).sqrt()).abs() < 1e-5, "leading uses sqrt(max^2+1)");
    }

    #[test]
    fn fractional_linspace_timesteps_interpolate() {
        let cfg = SchedulerConfig { timestep_spacing: Some("linspace".into()), ..SchedulerConfig::sd15() };
        let mut e = EulerDiscrete::from_config(&cfg).unwrap();
        e.set_timesteps(7).unwrap(); // 999/6 = 166.5 → fractional timesteps
        let t = e.timesteps()[5];
        assert_eq!(t, 166.5);
        let (a, b) = (e.schedule.train_sigmas[166] as f64, e.schedule.train_sigmas[167] as f64);
        let s = e.sigmas()[5] as f64;
        assert!((s - (a + b) / 2.0).abs() < 1e-6, "{s} vs {}", (a + b) / 2.0);
    }

    #[test]
    fn unsupported_sigma_options_are_named() {
        let cfg = SchedulerConfig { use_karras_sigmas: Some(true), ..SchedulerConfig::sd15() };
        let err = EulerDiscrete::from_config(&cfg).err().expect("must refuse").to_string();
        assert!(err.contains("use_karras_sigmas"), "{err}");
    }
}
