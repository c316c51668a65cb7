//! PNDM sampler (diffusers' `PNDMScheduler`): with `skip_prk_steps` (the SD 1.5 default) a
//! linear multistep method over the last four noise predictions (`step_plms`); without it,
//! three Runge-Kutta steps (`step_prk`, four model calls each) warm up the multistep history.

use candle_core::Tensor;

use super::{check_steps, Sampler, SchedulerConfig, TimestepSpacing};
use crate::vocab::PredictionType;

/// PNDM: PLMS, with or without the Runge-Kutta warm-up.
pub struct Pndm {
    skip_prk_steps: bool,
    /// Number of Runge-Kutta model calls at the start (0 with `skip_prk_steps`).
    prk_calls: usize,
    /// The timesteps of the Runge-Kutta part (indexed by `counter`).
    prk_timesteps: Vec<i64>,
    /// Running RK4 combination of the noise predictions.
    cur_model_output: Option<Tensor>,
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
        let alphas_cumprod = super::betas::alphas_cumprod(cfg)?;
        let final_alpha_cumprod = if cfg.set_alpha_to_one.unwrap_or(false) { 1.0 } else { alphas_cumprod[0] };
        Ok(Pndm {
            // PNDM's class default is false (Runge-Kutta warm-up); SD 1.x configs set it true.
            skip_prk_steps: cfg.skip_prk_steps.unwrap_or(false),
            prk_calls: 0,
            prk_timesteps: Vec::new(),
            cur_model_output: None,
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

impl Pndm {
    /// One Runge-Kutta sub-step (diffusers' `step_prk`): four model calls per RK4 step, all
    /// stepping from the sample stored at the first call.
    fn step_prk(&mut self, model_output: &Tensor, t: f64, x: &Tensor) -> candle_core::Result<Tensor> {
        let half = (self.train_steps / self.num_inference_steps / 2) as i64;
        let diff_to_prev = if self.counter % 2 == 1 { 0 } else { half };
        let prev_timestep = t as i64 - diff_to_prev;
        let timestep = self.prk_timesteps[self.counter / 4 * 4];
        let add = |acc: &Option<Tensor>, term: Tensor| -> candle_core::Result<Tensor> {
            match acc {
                Some(a) => a + term,
                None => Ok(term),
            }
        };
        let eps = match self.counter % 4 {
            0 => {
                self.cur_model_output = Some(add(&self.cur_model_output, model_output.affine(1.0 / 6.0, 0.0)?)?);
                self.ets.push(model_output.clone());
                self.cur_sample = Some(x.clone());
                model_output.clone()
            }
            1 | 2 => {
                self.cur_model_output = Some(add(&self.cur_model_output, model_output.affine(1.0 / 3.0, 0.0)?)?);
                model_output.clone()
            }
            _ => {
                let combined = add(&self.cur_model_output, model_output.affine(1.0 / 6.0, 0.0)?)?;
                self.cur_model_output = None;
                combined
            }
        };
        let sample = self.cur_sample.clone().unwrap_or_else(|| x.clone());
        let prev = self.prev_sample(&sample, timestep, prev_timestep, &eps)?;
        self.counter += 1;
        Ok(prev)
    }
}

impl Sampler for Pndm {
    fn set_timesteps(&mut self, n: usize) -> anyhow::Result<()> {
        check_steps(n, self.train_steps)?;
        let ts = self.spacing.ascending(n, self.train_steps, self.steps_offset);
        let all: Vec<i64> = if self.skip_prk_steps {
            // PLMS list: all but the last, the second-to-last again, the last; then reversed.
            self.prk_timesteps.clear();
            let mut plms: Vec<i64> = ts[..n - 1].to_vec();
            if n >= 2 {
                plms.push(ts[n - 2]);
            }
            plms.push(ts[n - 1]);
            plms.reverse();
            plms
        } else {
            // prk = (ts[-4:].repeat(2) + tile([0, T//n//2], 4))[:-1].repeat(2)[1:-1] reversed;
            // plms = ts[:-3] reversed.
            let half = (self.train_steps / n / 2) as i64;
            let tail = &ts[n.saturating_sub(4)..];
            let mut prk: Vec<i64> = tail.iter().flat_map(|&t| [t, t + half]).collect();
            prk.pop();
            let mut prk: Vec<i64> = prk.iter().flat_map(|&t| [t, t]).collect();
            if prk.len() >= 2 {
                prk.remove(0);
                prk.pop();
            } else {
                prk.clear();
            }
            prk.reverse();
            let mut plms: Vec<i64> = ts[..n.saturating_sub(3)].to_vec();
            plms.reverse();
            self.prk_timesteps = prk.clone();
            prk.into_iter().chain(plms).collect()
        };
        self.prk_calls = self.prk_timesteps.len();
        self.cur_model_output = None;
        self.timesteps = all.into_iter().map(|t| t as f64).collect();
        self.num_inference_steps = n;
        self.ets.clear();
        self.counter = 0;
        self.cur_sample = None;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(&mut self, model_output: &Tensor, t: f64, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.num_inference_steps == 0 {
            candle_core::bail!("PNDM: call set_timesteps before step");
        }
        if !self.skip_prk_steps && self.counter < self.prk_calls {
            return self.step_prk(model_output, t, x);
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
    fn prk_timesteps_follow_diffusers() {
        // diffusers, T = 1000, n = 10, steps_offset 1: prk [901, 851, 851, 801, 801, 751, 751,
        // 701, 701, 651, 651, 601] then plms [601, 501, …, 1] (worked by hand from set_timesteps).
        let cfg = SchedulerConfig { skip_prk_steps: None, ..SchedulerConfig::sd15() };
        let mut p = Pndm::from_config(&cfg).unwrap();
        p.set_timesteps(10).unwrap();
        let want: Vec<f64> = [901, 851, 851, 801, 801, 751, 751, 701, 701, 651, 651, 601, 601, 501, 401, 301, 201, 101, 1]
            .iter()
            .map(|&t| t as f64)
            .collect();
        assert_eq!(p.timesteps(), want.as_slice());
    }
}
