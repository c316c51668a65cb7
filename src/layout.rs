//! Names lora reads and writes on disk, shared by the layers that check a pipeline (`config`) and
//! the ones that run it: an output folder's files (lock, adapters, metrics, cache, set-aside
//! folder), a folder dataset's metadata files and image extensions. A leaf: it imports nothing
//! of the crate.

/// Per-stage fingerprints of an output folder (`runner::lock`); a folder holding one is a run's.
pub(crate) const LOCK_FILE: &str = "lora.lock";
/// Where a run sets an earlier run's results aside (`runner::resume`).
pub(crate) const EARLIER_DIR: &str = "earlier";
/// The metadata files of an image-folder dataset, as Hugging Face's imagefolder reads them.
pub(crate) const METADATA_NAMES: &[&str] = &["metadata.jsonl", "metadata.csv"];
/// The image files a folder dataset reads.
pub(crate) const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp"];

/// The diffusers-form adapter file, as the reference names it (`output.name` renames it).
pub const DIFFUSERS_FILE: &str = "pytorch_lora_weights.safetensors";
/// The kohya-form adapter file (A1111, ComfyUI).
pub const KOHYA_FILE: &str = "pytorch_lora_weights_kohya.safetensors";
/// The train stage's result, the trained weights in PEFT names, which export reads.
pub const TRAINED_FILE: &str = "train/adapter.safetensors";
/// The train stage's exponential moving average of the weights (`train.ema_decay`).
pub const TRAINED_EMA_FILE: &str = "train/adapter_ema.safetensors";

/// The EMA copy's name of an adapter file: `x.safetensors` → `x_ema.safetensors`.
pub fn ema_name(file: &str) -> String {
    match file.strip_suffix(".safetensors") {
        Some(stem) => format!("{stem}_ema.safetensors"),
        None => format!("{file}_ema"),
    }
}
/// The lock entry of a training run in progress or interrupted (its checkpoints are resumed).
pub const IN_PROGRESS: &str = "train.in_progress";
/// One metrics line per optimizer update (and per evaluation).
pub const METRICS_FILE: &str = "metrics.jsonl";
/// The encode cache folder, relative to the output folder.
pub const CACHE_DIR: &str = "cache/encode";
