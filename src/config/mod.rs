//! Pipeline files: the typed TOML tables (`types`), loading with `extends` and `--set`
//! (`load`), checks against the generated JSON Schema and across fields (`validate`), and
//! `FILE:LINE:COL` diagnostics (`diagnostic`); `schema` generates the schema and the docs tables;
//! `targets` checks LoRA targets against a local model's weight headers.

pub mod diagnostic;
pub mod load;
pub mod schema;
pub mod targets;
pub mod types;
pub mod validate;

pub use diagnostic::{Diagnostic, Diagnostics, Severity, Source};
pub use load::{load_pipeline, tidy_path, LoadedPipeline, Origin, Provenance};
pub use schema::{choice_name, editor_schema, pipeline_schema, pipeline_schema_text};
pub use types::*;
