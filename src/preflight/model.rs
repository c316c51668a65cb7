//! A single-file checkpoint (`model.file`) is recognised as lora will load it (SD 1.x or 2.x from
//! its tensors' names and shapes): one that is not is reported at `model.file`.

use crate::config::world::{Finding, Written};
use crate::config::Pipeline;

/// The [`crate::config::world::WorldCheck`]: recognise a local single-file checkpoint.
pub(crate) fn single_file(p: &Pipeline, written: &dyn Written, found: &mut Vec<Finding>) {
    let Some(file) = &p.model.file else { return };
    if !file.is_file() || !file.to_string_lossy().to_ascii_lowercase().ends_with(".safetensors") {
        return;
    }
    if let Some(Err(e)) = crate::models::single_file::recognise_config(&p.model) {
        let shown = written.shown("model.file", file);
        found.push(Finding::error(&["model.file"], format!("model file `{shown}` is not a usable single-file checkpoint: {e:#}"), None));
    }
}
