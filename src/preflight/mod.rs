//! Checks of a pipeline against the world, before any model loads: the layer between `config`
//! (which knows the file) and `models`, `data` and `adapters` (which know weights and datasets).
//! Each check runs through `config::world`'s hook, so what it finds is reported at the key's
//! `FILE:LINE:COL` like the file's own problems: a single-file checkpoint that is not one
//! (`model`), a folder dataset with no usable example (`dataset`), LoRA targets that match no
//! linear layer of a local model (`targets`, with `targets_layers` reading the weight headers).

mod dataset;
mod model;
mod targets;
pub(crate) mod targets_layers;

use std::path::Path;

use crate::config::world::WorldCheck;
use crate::config::{Diagnostics, LoadedPipeline};

/// Every check against the world, in the order their findings are reported.
pub(crate) const CHECKS: &[WorldCheck] = &[model::single_file, dataset::listing, targets::in_model];

/// Load and validate the pipeline at `path` (with `--set` `overrides`), the file's own checks
/// and [`CHECKS`]: what `lora validate`, `plan`, `run` and `watch` read a pipeline with.
pub fn load_pipeline(path: &Path, overrides: &[String]) -> Result<LoadedPipeline, Diagnostics> {
    crate::config::load_pipeline_with(path, overrides, CHECKS)
}
