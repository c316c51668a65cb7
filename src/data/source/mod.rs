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
    /// Its source among [`Dataset::groups`] (0 for a one-source dataset).
    pub group: usize,
}

/// The examples of one dataset, in source order (after the `max_samples` subset).
#[derive(Debug, Clone, Default)]
pub struct Dataset {
    pub examples: Vec<Example>,
    /// What was read, for messages (a path).
    pub description: String,
    /// The sources the examples come from (empty: one source, seen once an epoch).
    pub groups: Vec<SourceGroup>,
}

/// One source of a dataset of several: its name (kohya's folder name in `ss_tag_frequency`) and
/// how often each of its images is seen per epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceGroup {
    pub name: String,
    pub repeats: u32,
}

impl Dataset {
    /// Several sources as one dataset, in order: each example tagged with its source and its
    /// caption (every choice of a list) behind the source's prefix and a space, as kohya's
    /// `caption_prefix`.
    pub fn combine(parts: Vec<(Dataset, SourceGroup, Option<String>)>) -> Dataset {
        let mut out = Dataset::default();
        let mut descriptions = Vec::new();
        for (group, (dataset, info, prefix)) in parts.into_iter().enumerate() {
            descriptions.push(dataset.description.clone());
            let with_prefix = |c: String| match &prefix {
                Some(p) if !p.is_empty() => format!("{p} {c}"),
                _ => c,
            };
            out.examples.extend(dataset.examples.into_iter().map(|mut e| {
                e.group = group;
                e.caption = match e.caption {
                    Caption::One(c) => Caption::One(with_prefix(c)),
                    Caption::Choices(list) => Caption::Choices(list.into_iter().map(with_prefix).collect()),
                };
                e
            }));
            out.groups.push(info);
        }
        out.description = descriptions.join(" + ");
        out
    }

    /// Each example as many times as its source's `repeats` (copies side by side), as kohya's
    /// `num_repeats`: what one epoch of training goes through.
    pub fn repeated(&self) -> Dataset {
        let times = |e: &Example| self.groups.get(e.group).map_or(1, |g| g.repeats.max(1)) as usize;
        if self.examples.iter().all(|e| times(e) == 1) {
            return self.clone();
        }
        let examples = self.examples.iter().flat_map(|e| std::iter::repeat_n(e.clone(), times(e))).collect();
        Dataset { examples, description: self.description.clone(), groups: self.groups.clone() }
    }

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
