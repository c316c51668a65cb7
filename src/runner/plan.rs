//! The resolved plan: a validated pipeline turned once into what every stage reads (the pipeline,
//! its output folder, the fingerprint of every stage), so `plan`, `run --dry-run`, `run`, `watch`
//! and `bench` all see the same values. `Plan::resolve`, which asks the stage table for the
//! fingerprints, is defined beside the table (`stages`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::config::types::Pipeline;
use crate::config::LoadedPipeline;


#[derive(Clone)]
pub struct Plan {
    pub loaded: LoadedPipeline,
    pub out_dir: PathBuf,
    /// Every stage's fingerprint, by stage name (each folds in its upstream stages' ones).
    pub fingerprints: BTreeMap<&'static str, String>,
    /// `--no-cache`: the encoders run every step, as the reference does (no encode stage).
    pub no_cache: bool,
}

impl Plan {
    pub fn pipeline(&self) -> &Pipeline {
        &self.loaded.pipeline
    }

    /// The fingerprint of `stage` (computed by [`Plan::resolve`] for every stage of the table).
    pub fn fingerprint(&self, stage: &str) -> &str {
        self.fingerprints.get(stage).map(String::as_str).unwrap_or_else(|| panic!("stage `{stage}` is not in the stage table"))
    }

    /// The resolved pipeline table `name` (as written, after `extends` and `--set`).
    pub fn table(&self, name: &str) -> Option<&toml::Value> {
        self.loaded.resolved.get(name)
    }

    /// As the reference without `--seed`: when `train.seed` is not set, draw one for this run
    /// and log it so the run can be repeated. Fingerprints are unaffected (they read the file).
    pub fn pick_seed(&mut self) {
        if self.loaded.pipeline.train.seed.is_none() {
            let seed: u64 = rand::random::<u32>() as u64;
            tracing::info!("train.seed is not set: using seed {seed} (add `seed = {seed}` to [train] to repeat this run)");
            self.loaded.pipeline.train.seed = Some(seed);
        }
    }

    /// The number of optimizer updates, when it is known without reading the dataset.
    pub fn known_max_steps(&self) -> Option<usize> {
        self.pipeline().train.max_steps.map(|n| n as usize)
    }
}
