//! Names lora reads and writes on disk, shared by the layers that check a pipeline (`config`) and
//! the ones that run it: an output folder's lock and set-aside folder, a folder dataset's
//! metadata files and image extensions. A leaf: it imports nothing of the crate.

/// Per-stage fingerprints of an output folder (`runner::lock`); a folder holding one is a run's.
pub const LOCK_FILE: &str = "lora.lock";
/// Where a run sets an earlier run's results aside (`runner::resume`).
pub const EARLIER_DIR: &str = "earlier";
/// The metadata files of an image-folder dataset, as Hugging Face's imagefolder reads them.
pub const METADATA_NAMES: &[&str] = &["metadata.jsonl", "metadata.csv"];
/// The image files a folder dataset reads.
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp"];
