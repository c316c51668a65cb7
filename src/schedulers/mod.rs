//! Noise schedules: `ddpm` adds noise for training; `pndm`, `ddim`, `euler`, `euler_ancestral`,
//! `dpm_solver` (DPM-Solver++ 2M) sample at inference through the [`Sampler`] trait
//! (text-to-image sampling with them is `crate::inference`).
//! All are built from a diffusers `scheduler_config.json` (`SchedulerConfig`); `betas` computes
//! the shared noise schedule bit for bit as torch does; [`TimestepSpacing`] is the samplers'
//! shared rule for spacing the inference timesteps.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use candle_core::Tensor;
use serde::Deserialize;

pub(crate) mod betas;
pub mod ddim;
pub mod ddpm;
pub(crate) mod dpm_solver;
pub mod euler;
pub(crate) mod euler_ancestral;
pub mod pndm;

pub use ddim::Ddim;
pub use ddpm::Ddpm;
pub(crate) use dpm_solver::DpmSolverPP2M;
pub use euler::EulerDiscrete;
pub(crate) use euler_ancestral::EulerAncestral;
pub use pndm::Pndm;

/// A diffusers `scheduler_config.json` (any scheduler class; keys a class does not use are kept
/// and ignored as diffusers does). `None` means "the key is absent": each scheduler class then
/// applies its own diffusers default (they differ, e.g. `set_alpha_to_one` is true for DDIM and
/// false for PNDM, `timestep_spacing` is "leading" for DDIM/PNDM and "linspace" for Euler).
#[derive(Clone, Debug, Deserialize)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    #[serde(default = "default_train_timesteps")]
    pub num_train_timesteps: usize,
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    #[serde(default = "default_beta_schedule")]
    pub beta_schedule: String,
    #[serde(default = "default_prediction_type")]
    pub prediction_type: String,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default)]
    pub timestep_spacing: Option<String>,
    #[serde(default)]
    pub set_alpha_to_one: Option<bool>,
    #[serde(default)]
    pub skip_prk_steps: Option<bool>,
    #[serde(default)]
    pub clip_sample: Option<bool>,
    /// Explicit betas (length `num_train_timesteps`); overrides `beta_schedule` when present.
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    /// DDIM/DDPM clip range for the predicted x0 when `clip_sample` is on (default 1.0).
    #[serde(default)]
    pub clip_sample_range: Option<f64>,
    /// Rescale betas to zero terminal SNR (Lin et al. 2023).
    #[serde(default)]
    pub rescale_betas_zero_snr: Option<bool>,
    /// Dynamic thresholding (Imagen); not supported, refused when true.
    #[serde(default)]
    pub thresholding: Option<bool>,
    /// Euler: how sigmas are interpolated between training timesteps ("linear" only).
    #[serde(default)]
    pub interpolation_type: Option<String>,
    /// Euler: Karras / exponential / beta sigma spacing; not supported, refused when true.
    #[serde(default)]
    pub use_karras_sigmas: Option<bool>,
    #[serde(default)]
    pub use_exponential_sigmas: Option<bool>,
    #[serde(default)]
    pub use_beta_sigmas: Option<bool>,
    /// Euler: the sigma after the last step, "zero" (default) or "sigma_min".
    #[serde(default)]
    pub final_sigmas_type: Option<String>,
    /// Euler: "discrete" (default) or "continuous" (refused).
    #[serde(default)]
    pub timestep_type: Option<String>,
    /// Every other key of the file (`_diffusers_version`, other classes' keys, ...), kept so that
    /// a key the target class takes but lora does not implement is refused, not dropped.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// Keys a diffusers scheduler class takes that lora's sampler of that class does not implement,
/// with the class default (the value that changes nothing). A config that sets one of them to
/// anything else is refused, naming it. Keys that only matter together with a refused one (e.g.
/// `sample_max_value` without `thresholding`, `sigma_min` without Karras sigmas) are not listed.
fn unimplemented_keys(class: &str) -> &'static [(&'static str, &'static str)] {
    match class {
        "DPMSolverMultistepScheduler" => &[
            ("solver_order", "2"),
            ("algorithm_type", "\"dpmsolver++\""),
            ("solver_type", "\"midpoint\""),
            ("use_lu_lambdas", "false"),
            ("use_flow_sigmas", "false"),
            ("lambda_min_clipped", "null"),
            ("variance_type", "null"),
            ("use_dynamic_shifting", "false"),
        ],
        _ => &[],
    }
}

fn default_train_timesteps() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.0001
}
fn default_beta_end() -> f64 {
    0.02
}
fn default_beta_schedule() -> String {
    "linear".into()
}
fn default_prediction_type() -> String {
    "epsilon".into()
}

impl Default for SchedulerConfig {
    /// The diffusers class defaults (as if `scheduler_config.json` were `{}`).
    fn default() -> Self {
        serde_json::from_str("{}").expect("every SchedulerConfig field has a default")
    }
}

impl SchedulerConfig {
    /// Read a diffusers `scheduler_config.json`.
    pub fn from_file(path: &Path) -> anyhow::Result<Self> {
        let text = crate::util::fs::read_text(path)?;
        serde_json::from_str(&text).with_context(|| format!("parsing scheduler config {}", path.display()))
    }

    /// The SD 1.5 scheduler config (PNDM, scaled_linear 0.00085..0.012, `steps_offset` 1,
    /// `skip_prk_steps`, "leading", epsilon).
    pub fn sd15() -> Self {
        SchedulerConfig {
            class_name: Some("PNDMScheduler".into()),
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: "scaled_linear".into(),
            steps_offset: 1,
            set_alpha_to_one: Some(false),
            skip_prk_steps: Some(true),
            clip_sample: Some(false),
            ..Default::default()
        }
    }

    /// Refuse the keys that change the math and that we do not implement (naming the key).
    pub(crate) fn refuse_unsupported(&self, class: &str) -> anyhow::Result<()> {
        if self.thresholding == Some(true) {
            anyhow::bail!("scheduler config: `thresholding: true` (dynamic thresholding) is not supported by {class}");
        }
        for (key, default) in unimplemented_keys(class) {
            let Some(value) = self.extra.get(*key) else { continue };
            let default: serde_json::Value = serde_json::from_str(default).expect("valid JSON default");
            // `lambda_min_clipped` defaults to -inf, which JSON writes as null or -Infinity.
            let is_default = *value == default
                || (*key == "lambda_min_clipped" && value.as_f64().is_some_and(|v| v == f64::NEG_INFINITY))
                || (value.is_number() && default.is_number() && value.as_f64() == default.as_f64());
            if !is_default {
                anyhow::bail!("scheduler config: `{key}: {value}` is not supported by lora's {class} (only {default})");
            }
        }
        Ok(())
    }
}

/// Which sampler `lora generate` (and validation) uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SamplerKind {
    /// PNDM / PLMS with `skip_prk_steps` (the SD 1.5 default).
    Pndm,
    /// DDIM with eta 0 (deterministic).
    Ddim,
    /// Euler discrete.
    Euler,
    /// Euler ancestral (adds fresh noise each step; seeded).
    EulerAncestral,
    /// DPM-Solver++ 2M (diffusers' DPMSolverMultistepScheduler defaults).
    #[value(name = "dpmpp-2m")]
    DpmPP2M,
}

impl std::str::FromStr for SamplerKind {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Self> {
        match s.to_ascii_lowercase().replace('_', "-").as_str() {
            "pndm" | "plms" => Ok(SamplerKind::Pndm),
            "ddim" => Ok(SamplerKind::Ddim),
            "euler" | "euler-discrete" => Ok(SamplerKind::Euler),
            "euler-a" | "euler-ancestral" => Ok(SamplerKind::EulerAncestral),
            "dpmpp-2m" | "dpm++-2m" | "dpm-solver++" => Ok(SamplerKind::DpmPP2M),
            other => anyhow::bail!("unknown scheduler `{other}` (expected pndm, ddim, euler, euler-ancestral or dpmpp-2m)"),
        }
    }
}

/// An inference sampler, used as diffusers' pipelines use a scheduler:
/// `set_timesteps(n)`, then `x *= init_noise_sigma()`, then for each `t` in `timesteps()`:
/// `eps = unet(scale_model_input(x, t), t)`, `x = step(eps, t, x)`.
pub trait Sampler {
    /// Choose the `n` inference timesteps (resets any multistep state).
    fn set_timesteps(&mut self, n: usize) -> anyhow::Result<()>;
    /// The timesteps to visit, in order (PNDM repeats one; Euler's may be fractional).
    fn timesteps(&self) -> &[f64];
    /// The factor the initial N(0, 1) latents are multiplied by (1 unless sigma-based).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// The UNet input for latents `x` at timestep `t` (identity unless sigma-based).
    fn scale_model_input(&self, x: &Tensor, _t: f64) -> candle_core::Result<Tensor> {
        Ok(x.clone())
    }
    /// One denoising step: model output at `t` and the current latents → the previous latents.
    fn step(&mut self, model_output: &Tensor, t: f64, x: &Tensor) -> candle_core::Result<Tensor>;
}

/// Build a sampler of the given kind from a scheduler config (as diffusers' `from_config`).
/// `seed` feeds the ancestral samplers' per-step noise.
pub fn build_sampler(kind: SamplerKind, cfg: &SchedulerConfig, seed: u64) -> anyhow::Result<Box<dyn Sampler>> {
    Ok(match kind {
        SamplerKind::Pndm => Box::new(Pndm::from_config(cfg)?),
        SamplerKind::Ddim => Box::new(Ddim::from_config(cfg)?),
        SamplerKind::Euler => Box::new(EulerDiscrete::from_config(cfg)?),
        SamplerKind::EulerAncestral => Box::new(EulerAncestral::from_config(cfg, seed)?),
        SamplerKind::DpmPP2M => Box::new(DpmSolverPP2M::from_config(cfg)?),
    })
}

/// Which rule spaces the inference timesteps over the training range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TimestepSpacing {
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
    pub(crate) fn ascending(self, n: usize, train_steps: usize, steps_offset: usize) -> Vec<i64> {
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

/// Number of inference steps check shared by all samplers.
pub(crate) fn check_steps(n: usize, train_steps: usize) -> anyhow::Result<()> {
    if n == 0 {
        anyhow::bail!("the number of inference steps must be at least 1");
    }
    if n > train_steps {
        anyhow::bail!("{n} inference steps exceed the scheduler's num_train_timesteps ({train_steps})");
    }
    Ok(())
}
