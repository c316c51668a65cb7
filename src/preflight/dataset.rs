//! A local folder dataset (`imagefolder`, `sidecar`) listed as the dataset stage will list it
//! (metadata lines, caption files; no image decoded): an empty folder, a missing image or
//! caption file, or a `file_name` outside the folder is reported at `dataset.path`.

use std::path::Path;

use crate::config::world::{Finding, Written};
use crate::config::{DatasetKind, Pipeline};

/// The [`crate::config::world::WorldCheck`]: list a local folder dataset.
pub(crate) fn listing(p: &Pipeline, written: &dyn Written, found: &mut Vec<Finding>) {
    let d = &p.dataset;
    let (Some(path), DatasetKind::Imagefolder | DatasetKind::Sidecar) = (&d.path, d.kind) else { return };
    if !path.is_dir() {
        return;
    }
    let shown = written.shown("dataset.path", path);
    dataset_listing(d.kind, path, &shown, &d.caption_column, found);
}

/// List a local folder dataset as the dataset stage will (metadata lines, caption files; no
/// image is decoded), so that an empty folder, a missing image or caption file, or a
/// `file_name` outside the folder is reported now rather than after the model loaded.
pub(crate) fn dataset_listing(kind: DatasetKind, path: &Path, shown: &str, caption_column: &str, found: &mut Vec<Finding>) {
    use crate::data::source::{image_folder, sidecar, SourceOptions};
    let listed = match kind {
        DatasetKind::Imagefolder => {
            let opts = SourceOptions { caption_column: caption_column.to_string(), ..SourceOptions::default() };
            image_folder::load(path, &opts)
        }
        DatasetKind::Sidecar => sidecar::load(path, &[]),
        _ => return,
    };
    match listed {
        Err(e) => found.push(Finding::error(&["dataset.path"], format!("bad dataset `{shown}`: {e:#}"), None)),
        Ok(d) if d.is_empty() => {
            let (what, help) = match kind {
                DatasetKind::Sidecar => (
                    format!("no images ({}) in `{shown}`", crate::layout::IMAGE_EXTENSIONS.iter().map(|e| format!(".{e}")).collect::<Vec<_>>().join(", ")),
                    "kind \"sidecar\" reads each image with the .txt or .caption file of the same name beside it",
                ),
                _ => (format!("the metadata in `{shown}` lists no images"), "each line of metadata.jsonl (each row of metadata.csv) names one image in `file_name`"),
            };
            found.push(Finding::error(&["dataset.path"], format!("dataset has no examples: {what}"), Some(help.into())));
        }
        Ok(_) => {}
    }
}

