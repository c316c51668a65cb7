//! Pipeline files: the typed TOML tables (`types`), loading with `extends` and `--set`
//! (`load`), checks against the generated JSON Schema and across fields (`validate`), and
//! `FILE:LINE:COL` diagnostics (`diagnostic`); `schema` generates the schema and the docs tables;
//! `world` is the hook through which `preflight` adds checks against model files and dataset
//! folders. Config imports only leaves (`util`, `layout`, `hub_id`, `adapters::pattern`).

pub(crate) mod diagnostic;
pub mod load;
pub mod schema;
pub mod types;
pub mod validate;
pub mod world;

pub use diagnostic::{Diagnostic, Diagnostics, Severity, Source};
pub use load::{LoadedPipeline, Origin, Provenance};
pub use schema::{choice_name, editor_schema, pipeline_schema, pipeline_schema_text};
pub use types::*;

use std::path::Path;

/// Load, layer, override and validate the pipeline at `path`; `overrides` are `KEY=VALUE`
/// strings as given to `--set`. Any error returns every diagnostic found.
pub fn load_pipeline(path: &Path, overrides: &[String]) -> Result<LoadedPipeline, Diagnostics> {
    load_pipeline_with(path, overrides, &[])
}

/// [`load_pipeline`], then the checks against the world `world` (`preflight::CHECKS`: the model's
/// weight files, the dataset's folder), reported like the file's own.
pub(crate) fn load_pipeline_with(path: &Path, overrides: &[String], world: &[world::WorldCheck]) -> Result<LoadedPipeline, Diagnostics> {
    let (resolved, provenance, diags) = load::load_document(path, overrides);
    // A file that cannot be read or parsed stops here; a broken `--set` is skipped, and the
    // rest is still checked.
    if diags.iter().any(|d| d.is_error() && d.file != "--set") {
        return Err(diags);
    }
    validate::validate_document(path, resolved, provenance, diags, world)
}
