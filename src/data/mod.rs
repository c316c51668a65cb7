//! Datasets: sources (parquet, image folder + metadata.jsonl, sidecar captions), decoding,
//! preprocessing (resize, crop, flip, normalise) and batching.
//!
//! # The data API
//! 1. [`source::load_source`]`(&SourceSpec, &SourceOptions) -> Dataset`: lists the examples
//!    (image bytes or file + caption) of a Hugging Face parquet dataset, an image folder with
//!    `metadata.jsonl`, or an image folder with `.txt` / `.caption` sidecars; column names are
//!    configurable and `max_samples` takes a seeded subset.
//! 2. [`decode::check_all`]`(&Dataset, &DecodeOptions) -> Vec<BadImage>` decodes every image once,
//!    in parallel, and reports each bad one with its reason; [`decode::screen_dataset`] turns that
//!    into the `on_bad_image` policy (error naming every bad file, or skip and return the list).
//! 3. [`transform::preprocess`]`(&RgbImage, &PreprocessOptions, &mut rng) -> Vec<f32>` is
//!    torchvision's `Resize(res) + Center/RandomCrop(res) + RandomHorizontalFlip(p) + ToTensor +
//!    Normalize(0.5, 0.5)` on PIL, with PIL's resampling filters re-implemented bit for bit.
//! 4. [`loader::DataLoader`]`::new(Arc<Dataset>, LoaderOptions)` and `.epoch(e)` yield
//!    [`loader::Batch`] `{ pixel_values [B,3,R,R] f32 in [-1,1], captions, indices }` in a seeded
//!    shuffled order (`drop_last = false`), decoded and preprocessed with rayon in a background
//!    thread a few batches ahead. Everything random (order, crop, flip, caption choice) derives
//!    from `(seed, epoch, example)` through [`rng`], so results never depend on thread timing.

pub mod bucket;
pub mod cache;
pub mod caption;
pub mod decode;
pub mod holdout;
pub mod loader;
pub mod rng;
pub mod source;
pub mod transform;

pub use caption::CaptionOptions;
pub use decode::{BadImage, DecodeOptions, OnBadImage};
pub use loader::{Batch, DataLoader, LoaderOptions};
pub use source::{Caption, Dataset, Example, ImageData, SourceOptions, SourceSpec};
pub use transform::{CropMode, Geometry, Interpolation, PreprocessOptions};
