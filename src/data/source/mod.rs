//! Dataset sources: what a dataset is (examples = image + caption) and how each layout on disk is
//! listed: Hugging Face parquet, an image folder with `metadata.jsonl` or `metadata.csv`, or sidecar caption files.

pub mod hub;
pub(crate) mod image_folder;
pub mod parquet;
pub mod sidecar;

use std::path::PathBuf;
use std::sync::Arc;

use rand::seq::SliceRandom;

use crate::data::rng::{rng_for, Stream};

/// Where an example's encoded image is.
#[derive(Debug, Clone)]
pub enum ImageData {
    /// A file on disk, read when decoded.
    File(PathBuf),
    /// Encoded bytes held in memory (a parquet cell).
    Bytes(Arc<[u8]>),
}

/// An example's caption: one string, or a list from which each draw picks one at random.
#[derive(Debug, Clone, PartialEq)]
pub enum Caption {
    One(String),
    Choices(Vec<String>),
}

impl Caption {
    /// The caption used outside training (the reference takes the first of a list).
    pub fn first(&self) -> &str {
        match self {
            Caption::One(s) => s,
            Caption::Choices(list) => list.first().map(String::as_str).unwrap_or(""),
        }
    }
}

/// One training example.
#[derive(Debug, Clone)]
pub struct Example {
    pub image: ImageData,
    pub caption: Caption,
    /// Where it comes from, for messages: a file path, or `file.parquet row 12`.
    pub origin: String,
}

/// The examples of one dataset, in source order (after the `max_samples` subset).
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    pub examples: Vec<Example>,
    /// What was read, for messages (a path).
    pub description: String,
}

impl Dataset {
    pub fn len(&self) -> usize {
        self.examples.len()
    }
    pub fn is_empty(&self) -> bool {
        self.examples.is_empty()
    }
}

/// Which layout to read.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceSpec {
    /// Hugging Face datasets parquet: one `.parquet` file, a folder of shards, or a dataset folder
    /// with the shards under `data/` (only the `train` split's files when splits are named).
    Parquet { path: PathBuf },
    /// An image folder with `metadata.jsonl` (or `metadata.csv`) lines `{"file_name": ..., "<caption column>": ...}`
    /// (diffusers' `--train_data_dir`); the folder itself or its `train/` subfolder.
    ImageFolder { dir: PathBuf },
    /// Images with a caption file of the same stem beside each (kohya): the first of
    /// `caption_extensions` that exists (default `.txt`, then `.caption`). Subfolders included.
    Sidecar { dir: PathBuf, caption_extensions: Vec<String> },
    /// A hub dataset id (`owner/name`): its parquet files in the HF cache, downloaded through
    /// `hf-hub` when missing (unless offline), then read as [`SourceSpec::Parquet`].
    Hub { repo_id: String, hub: hub::HubOptions },
}

/// Options common to every source.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceOptions {
    /// Image column (parquet) — default `image`.
    pub image_column: String,
    /// Caption column (parquet, metadata.jsonl / .csv) — default `text`.
    pub caption_column: String,
    /// Keep a seeded random subset of this many examples (in the shuffled order, as the
    /// reference's `shuffle(seed).select(range(n))`).
    pub max_samples: Option<usize>,
    /// Seed of the subset.
    pub seed: u64,
}

impl Default for SourceOptions {
    fn default() -> Self {
        Self { image_column: "image".into(), caption_column: "text".into(), max_samples: None, seed: 0 }
    }
}

/// List the examples of a dataset. Errors name the file, the column or the line at fault; an
/// empty dataset is an error.
pub fn load_source(spec: &SourceSpec, opts: &SourceOptions) -> anyhow::Result<Dataset> {
    let mut dataset = match spec {
        SourceSpec::Parquet { path } => parquet::load(path, opts)?,
        SourceSpec::ImageFolder { dir } => image_folder::load(dir, opts)?,
        SourceSpec::Sidecar { dir, caption_extensions } => sidecar::load(dir, caption_extensions)?,
        SourceSpec::Hub { repo_id, hub } => {
            let snapshot = hub::resolve(repo_id, hub)?;
            let mut dataset = parquet::load(&snapshot, opts)?;
            dataset.description = format!("{repo_id} ({})", snapshot.display());
            dataset
        }
    };
    if dataset.is_empty() {
        anyhow::bail!("dataset {} has no examples", dataset.description);
    }
    if let Some(n) = opts.max_samples {
        take_subset(&mut dataset, n, opts.seed);
    }
    Ok(dataset)
}

/// Keep `n` examples chosen by a seeded shuffle (all of them, shuffled, if `n >= len`).
pub(crate) fn take_subset(dataset: &mut Dataset, n: usize, seed: u64) {
    let mut order: Vec<usize> = (0..dataset.len()).collect();
    order.shuffle(&mut rng_for(seed, Stream::Subset, 0, 0));
    order.truncate(n);
    let mut slots: Vec<Option<Example>> = std::mem::take(&mut dataset.examples).into_iter().map(Some).collect();
    dataset.examples = order.into_iter().map(|i| slots[i].take().expect("indices are distinct")).collect();
}

/// File extensions (lowercase, no dot) read as images by the folder sources.
use crate::layout::IMAGE_EXTENSIONS;

/// Whether `path` has one of [`IMAGE_EXTENSIONS`].
pub(crate) fn is_image_path(path: &std::path::Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        .unwrap_or(false)
}

/// Every file under `dir` (recursively, sorted), for the folder sources.
pub(crate) fn walk_files(dir: &std::path::Path) -> anyhow::Result<Vec<PathBuf>> {
    use anyhow::Context;
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("reading folder {}", d.display()))? {
            let path = entry.with_context(|| format!("reading folder {}", d.display()))?.path();
            if path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.')) {
                continue;
            }
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}
