//! The hook for checks of a pipeline against the world — a model's weight files, a dataset's
//! folder — that need code above `config` (models, data, adapters): `preflight` supplies them,
//! `validate` runs them after its own checks and reports what they find at the keys' `FILE:LINE:COL`
//! like any other diagnostic. Config itself stays a leaf that knows nothing of models.

use std::path::Path;

use super::types::Pipeline;

/// What a check found: the keys it is about (the first that the file writes gets the span), the
/// message and help, and whether it is only a warning.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Finding {
    pub keys: Vec<String>,
    pub message: String,
    pub help: Option<String>,
    pub warning: bool,
}

impl Finding {
    pub fn error(keys: &[&str], message: String, help: Option<String>) -> Self {
        Self { keys: keys.iter().map(|k| k.to_string()).collect(), message, help, warning: false }
    }

    pub fn warning(keys: &[&str], message: String, help: Option<String>) -> Self {
        Self { warning: true, ..Self::error(keys, message, help) }
    }
}

/// What a check may ask of the file as written.
pub(crate) trait Written {
    /// A path key as the user wrote it (relative to the current folder), else `fallback`.
    fn shown(&self, key: &str, fallback: &Path) -> String;
}

/// A check against the world, run on a pipeline that passed the file's own checks.
pub(crate) type WorldCheck = fn(&Pipeline, &dyn Written, &mut Vec<Finding>);
