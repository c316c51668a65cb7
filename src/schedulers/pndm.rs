//! PNDM sampler in its PLMS form (`skip_prk_steps`, the SD 1.5 default): a linear multistep
//! method over the last four noise predictions (diffusers' `PNDMScheduler.step_plms`).

use candle_core::Tensor;

use super::{check_steps, PredictionType, Sampler, SchedulerConfig};

/// Which rule spaces the inference timesteps over the training range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimestepSpacing {
    /// `round(linspace(0, T-1, n))` (no offset).
    Linspace,
    /// `arange(n) * (T // n) + steps_offset` (the SD 1.5 default).
    Leading,
    /// `round(arange(T, 0, -T/n)) - 1`.
    Trailing,
}

impl TimestepSpacing {
    /// Parse the config's `timestep_spacing`, with the class default when it is absent.
    pub fn parse(value: Option<&str>, class_default: TimestepSpacing) -> anyhow::Result<Self> {
        match value {
            None => Ok(class_default),
            Some("linspace") => Ok(TimestepSpacing::Linspace),
            Some("leading") => Ok(TimestepSpacing::Leading),
            Some("trailing") => Ok(TimestepSpacing::Trailing),
            Some(other) => anyhow::bail!(
                "scheduler config: `timestep_spacing` \"{other}\" is not one of linspace, leading, trailing"
            ),
        }
    }

    /// The `n` integer inference timesteps in ascending order (numpy's arithmetic, f64 rounding
    /// half to even like `np.round`).
    pub fn ascending(self, n: usize, train_steps: usize, steps_offset: usize) -> Vec<i64> {
        match self {
            TimestepSpacing::Linspace => {
                let last = (train_steps - 1) as f64;
                (0..n)
                    .map(|i| if n == 1 { 0.0 } else if i == n - 1 { last } else { i as f64 * (last / (n - 1) as f64) })
                    .map(|v| v.round_ties_even() as i64)
                    .collect()
            }
            TimestepSpacing::Leading => {
                let ratio = (train_steps / n) as i64;
                (0..n as i64).map(|i| i * ratio + steps_offset as i64).collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = train_steps as f64 / n as f64;
                let mut ts: Vec<i64> = (0..n).map(|i| (train_steps as f64 - i as f64 * ratio).round_ties_even() as i64 - 1).collect();
                ts.reverse();
                ts
            }
        }
    }
}

/// PNDM (PLMS) with `skip_prk_steps`.
pub struct Pndm {
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    train_steps: usize,
    steps_offset: usize,
    spacing: TimestepSpacing,
    prediction_type: PredictionType,
    num_inference_steps: usize,
    timesteps: Vec<f64>,
    /// The most recent noise predictions (at most four).
    ets: Vec<Tensor>,
    counter: usize,
    /// The sample stored at the first step, re-used by the second (same-timestep) step.
    cur_sample: Option<Tensor>,
}

impl Pndm {
    pub fn from_config(cfg: &SchedulerConfig) -> anyhow::Result<Self> {
        cfg.refuse_unsupported("PNDMScheduler")?;
        if cfg.skip_prk_steps != Some(true) {
            anyhow::bail!(
                "scheduler config: PNDM with `skip_prk_steps` false or absent (Runge-Kutta warm-up steps) is not supported; set `skip_prk_steps: true` (the SD 1.5 setting)"
            );
        }
        let alphas_cumprod = super::betas::alphas_cumprod(cfg)?;
        let final_alpha_cumprod = if cfg.set_alpha_to_one.unwrap_or(false) { 1.0 } else { alphas_cumprod[0] };
        Ok(Pndm {
            alphas_cumprod,
            final_alpha_cumprod,
            train_steps: cfg.num_train_timesteps,
            steps_offset: cfg.steps_offset,
            spacing: TimestepSpacing::parse(cfg.timestep_spacing.as_deref(), TimestepSpacing::Leading)?,
            prediction_type: PredictionType::parse(&cfg.prediction_type)?,
            num_inference_steps: 0,
            timesteps: Vec::new(),
            ets: Vec::new(),
            counter: 0,
            cur_sample: None,
        })
    }

    fn alpha_bar(&self, t: i64) -> f32 {
        if t >= 0 {
            self.alphas_cumprod[(t as usize).min(self.train_steps - 1)]
        } else {
            self.final_alpha_cumprod
        }
    }

    /// diffusers' `_get_prev_sample` (formula (9) of the PNDM paper), scalar factors in f32.
    fn prev_sample(&self, sample: &Tensor, t: i64, prev_t: i64, model_output: &Tensor) -> candle_core::Result<Tensor> {
        let at = self.alpha_bar(t);
        let ap = self.alpha_bar(prev_t);
        let bt = 1.0 - at;
        let bp = 1.0 - ap;
        let eps = match self.prediction_type {
            PredictionType::Epsilon => model_output.clone(),
            PredictionType::VPrediction => (model_output.affine(at.sqrt() as f64, 0.0)? + sample.affine(bt.sqrt() as f64, 0.0)?)?,
            PredictionType::Sample => candle_core::bail!("PNDM does not support prediction_type \"sample\""),
        };
        let sample_coeff = (ap / at).sqrt();
        let denom = at * bp.sqrt() + (at * bt * ap).sqrt();
        let correction = (eps.affine((ap - at) as f64, 0.0)? / denom as f64)?;
        sample.affine(sample_coeff as f64, 0.0)? - correction
    }
}

impl Sampler for Pndm {
    fn set_timesteps(&mut self, n: usize) -> anyhow::Result<()> {
        check_steps(n, self.train_steps)?;
        let ts = self.spacing.ascending(n, self.train_steps, self.steps_offset);
        // PLMS list: all but the last, the second-to-last again, the last; then reversed.
        let mut plms: Vec<i64> = ts[..n - 1].to_vec();
        if n >= 2 {
            plms.push(ts[n - 2]);
        }
        plms.push(ts[n - 1]);
        plms.reverse();
        self.timesteps = plms.into_iter().map(|t| t as f64).collect();
        self.num_inference_steps = n;
        self.ets.clear();
        self.counter = 0;
        self.cur_sample = None;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, x: &Tensor, _t: f64) -> candle_core::Result<Tensor> {
        Ok(x.clone())
    }

    fn step(&mut self, model_output: &Tensor, t: f64, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.num_inference_steps == 0 {
            candle_core::bail!("PNDM: call set_timesteps before step");
        }
        let ratio = (self.train_steps / self.num_inference_steps) as i64;
        let mut timestep = t as i64;
        let mut prev_timestep = timestep - ratio;
        if self.counter != 1 {
            if self.ets.len() > 3 {
                self.ets.remove(0);
            }
            self.ets.push(model_output.clone());
        } else {
            prev_timestep = timestep;
            timestep += ratio;
        }
        let mut sample = x.clone();
        let e = &self.ets;
        let k = e.len();
        let eps = if k == 1 && self.counter == 0 {
            self.cur_sample = Some(x.clone());
            model_output.clone()
        } else if k == 1 && self.counter == 1 {
            sample = self.cur_sample.take().unwrap_or_else(|| x.clone());
            ((model_output + &e[0])? / 2.0)?
        } else if k == 2 {
            ((e[1].affine(3.0, 0.0)? - &e[0])? / 2.0)?
        } else if k == 3 {
            ((e[2].affine(23.0, 0.0)? - e[1].affine(16.0, 0.0)?)? + e[0].affine(5.0, 0.0)?)?.affine(1.0 / 12.0, 0.0)?
        } else {
            (((e[3].affine(55.0, 0.0)? - e[2].affine(59.0, 0.0)?)? + e[1].affine(37.0, 0.0)?)? - e[0].affine(9.0, 0.0)?)?
                .affine(1.0 / 24.0, 0.0)?
        };
        let prev = self.prev_sample(&sample, timestep, prev_timestep, &eps)?;
        self.counter += 1;
        Ok(prev)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd15_plms_timesteps_for_30_steps() {
        // The spec's list: 31 entries, 958, 925, 925, 892, …, 34, 1.
        let mut p = Pndm::from_config(&SchedulerConfig::sd15()).unwrap();
        p.set_timesteps(30).unwrap();
        let ts = p.timesteps();
        assert_eq!(ts.len(), 31);
        assert_eq!(&ts[..4], &[958.0, 925.0, 925.0, 892.0]);
        assert_eq!(&ts[29..], &[34.0, 1.0]);
    }

    #[test]
    fn prk_warmup_is_refused_by_name() {
        let cfg = SchedulerConfig { skip_prk_steps: Some(false), ..SchedulerConfig::sd15() };
        let err = Pndm::from_config(&cfg).err().expect("must refuse").to_string();
        assert!(err.contains("skip_prk_steps"), "{err}");
    }
}
