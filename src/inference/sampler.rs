//! Which sampler to sample with: one by name, or the model's own (`"model"`), whose scheduler
//! config's `_class_name` picks it. Either way the sampler is configured from the scheduler
//! config the model loaded (`StableDiffusion::scheduler`), as diffusers'
//! `Scheduler.from_config(pipe.scheduler.config)` does.

use anyhow::{bail, Result};

use crate::models::StableDiffusion;
use crate::schedulers::{SamplerKind, SchedulerConfig};

/// A sampler by name, or the one the model's scheduler config names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SamplerChoice {
    Model,
    Named(SamplerKind),
}

impl SamplerChoice {
    /// The sampler kind to build for `sd`.
    pub fn resolve(self, sd: &StableDiffusion) -> Result<SamplerKind> {
        match self {
            SamplerChoice::Named(kind) => Ok(kind),
            SamplerChoice::Model => model_sampler_kind(&sd.scheduler),
        }
    }
}

/// The sampler of a scheduler config's `_class_name` (`validation.scheduler = "model"`,
/// `lora generate --scheduler model`).
pub(crate) fn model_sampler_kind(cfg: &SchedulerConfig) -> Result<SamplerKind> {
    Ok(match cfg.class_name.as_deref() {
        Some("PNDMScheduler") => SamplerKind::Pndm,
        Some("DDIMScheduler") => SamplerKind::Ddim,
        Some("EulerDiscreteScheduler") => SamplerKind::Euler,
        Some("EulerAncestralDiscreteScheduler") => SamplerKind::EulerAncestral,
        Some("DPMSolverMultistepScheduler") => SamplerKind::DpmPP2M,
        Some(other) => bail!(
            "scheduler \"model\": the model's scheduler config names {other}, which lora does not sample with; name a sampler instead (validation.scheduler \"pndm\", \"ddim\" or \"euler\"; lora generate --scheduler)"
        ),
        None => bail!(
            "scheduler \"model\": the model's scheduler config has no `_class_name`; name a sampler instead (validation.scheduler \"pndm\", \"ddim\" or \"euler\"; lora generate --scheduler)"
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(name: Option<&str>) -> SchedulerConfig {
        SchedulerConfig { class_name: name.map(String::from), ..Default::default() }
    }

    #[test]
    fn model_scheduler_class_picks_the_sampler() {
        assert_eq!(model_sampler_kind(&class(Some("PNDMScheduler"))).unwrap(), SamplerKind::Pndm);
        assert_eq!(model_sampler_kind(&class(Some("DDIMScheduler"))).unwrap(), SamplerKind::Ddim);
        assert_eq!(model_sampler_kind(&class(Some("EulerDiscreteScheduler"))).unwrap(), SamplerKind::Euler);
        assert_eq!(model_sampler_kind(&class(Some("EulerAncestralDiscreteScheduler"))).unwrap(), SamplerKind::EulerAncestral);
        assert_eq!(model_sampler_kind(&class(Some("DPMSolverMultistepScheduler"))).unwrap(), SamplerKind::DpmPP2M);
        let err = model_sampler_kind(&class(Some("DDPMScheduler"))).unwrap_err().to_string();
        assert!(err.contains("DDPMScheduler") && err.contains("validation.scheduler"), "{err}");
        assert!(model_sampler_kind(&class(None)).is_err());
    }
}
