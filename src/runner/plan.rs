//! The resolved plan: a validated pipeline turned once into what every stage reads (the pipeline,
//! its output folder, the fingerprint of every stage), so `plan`, `run --dry-run`, `run`, `watch`
//! and `bench` all see the same values. `Plan::resolve`, which asks the stage table for the
//! fingerprints, is defined beside the table (`stages`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::config::types::Pipeline;
use crate::config::LoadedPipeline;


/// A stage of the table, by name (`lora.lock`'s keys and `lora plan`'s are [`StageId::name`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StageId {
    Model,
    Dataset,
    Preprocess,
    Encode,
    Train,
    Export,
    Validate,
}

impl StageId {
    /// Every stage, in the table's order.
    pub(crate) const ALL: [StageId; 7] = [Self::Model, Self::Dataset, Self::Preprocess, Self::Encode, Self::Train, Self::Export, Self::Validate];

    /// The pipeline tables the stage owns (reads). Their keys are what the stage's fingerprint
    /// is made of, except train's `[checkpoints]`, `[logging]` and `[distributed]`: how it saves,
    /// logs and talks, not what it trains (a changed `every_steps` does not retrain a finished
    /// run). The number of ranks is in train's fingerprint (it sets the global batch).
    pub const fn tables(self) -> &'static [&'static str] {
        match self {
            Self::Model => &["model"],
            Self::Dataset => &["dataset"],
            Self::Preprocess => &["preprocess"],
            Self::Encode => &[],
            Self::Train => &["adapter", "optimizer", "train", "checkpoints", "logging", "distributed"],
            Self::Export => &["output"],
            Self::Validate => &["validation"],
        }
    }

    /// The stage that owns the pipeline table of `key` (`train.learning_rate` -> train; a
    /// settings snapshot's `model files` / `dataset files` -> model / dataset).
    pub(crate) fn owner_of(key: &str) -> Option<StageId> {
        let table = key.split(['.', ' ']).next().unwrap_or(key);
        Self::ALL.into_iter().find(|s| s.tables().contains(&table))
    }

    pub const fn name(self) -> &'static str {
        match self {
            Self::Model => "model",
            Self::Dataset => "dataset",
            Self::Preprocess => "preprocess",
            Self::Encode => "encode",
            Self::Train => "train",
            Self::Export => "export",
            Self::Validate => "validate",
        }
    }
}

#[derive(Clone)]
pub struct Plan {
    pub loaded: LoadedPipeline,
    pub out_dir: PathBuf,
    /// Every stage's fingerprint, by stage name (each folds in its upstream stages' ones).
    pub(crate) fingerprints: BTreeMap<StageId, String>,
    /// `--no-cache`: the encoders run every step, as the reference does (no encode stage).
    pub no_cache: bool,
    /// The processes training together (a launcher's `WORLD_SIZE`; 1 without one).
    pub world: usize,
}

impl Plan {
    pub fn pipeline(&self) -> &Pipeline {
        &self.loaded.pipeline
    }

    /// The fingerprint of `stage` (computed by `Plan::resolve` for every stage of the table).
    pub fn fingerprint(&self, stage: StageId) -> &str {
        self.fingerprints.get(&stage).map_or("", String::as_str)
    }

    /// The resolved pipeline table `name` (as written, after `extends` and `--set`).
    pub fn table(&self, name: &str) -> Option<&toml::Value> {
        self.loaded.resolved.get(name)
    }

    /// As the reference without `--seed`: when `train.seed` is not set, draw one for this run
    /// and log it so the run can be repeated. Fingerprints are unaffected (they read the file).
    pub(crate) fn pick_seed(&mut self) {
        if self.loaded.pipeline.train.seed.is_none() {
            let seed: u64 = rand::random::<u32>() as u64;
            tracing::info!("train.seed is not set: using seed {seed} (add `seed = {seed}` to [train] to repeat this run)");
            self.loaded.pipeline.train.seed = Some(seed);
        }
    }

    /// The number of optimizer updates, when it is known without reading the dataset.
    pub(crate) fn known_max_steps(&self) -> Option<usize> {
        self.pipeline().train.max_steps.map(|n| n as usize)
    }
}
