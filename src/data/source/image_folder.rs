//! An image folder with `metadata.jsonl` (diffusers' `--train_data_dir`, the datasets
//! `imagefolder` builder): each line `{"file_name": "0001.png", "<caption column>": ...}`, file
//! names relative to the metadata file's folder.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

use super::{Caption, Dataset, Example, ImageData, SourceOptions};

/// The `metadata.jsonl` files of `dir`: its own, else those in subfolders (e.g. `train/`), sorted.
fn metadata_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        bail!("image folder {} does not exist", dir.display());
    }
    let own = dir.join("metadata.jsonl");
    if own.is_file() {
        return Ok(vec![own]);
    }
    let train = dir.join("train").join("metadata.jsonl");
    if train.is_file() {
        return Ok(vec![train]);
    }
    let found: Vec<PathBuf> = super::walk_files(dir)?
        .into_iter()
        .filter(|p| p.file_name().and_then(|n| n.to_str()) == Some("metadata.jsonl"))
        .collect();
    if found.is_empty() {
        bail!("{}: no metadata.jsonl (expected lines {{\"file_name\": ..., \"text\": ...}})", dir.display());
    }
    Ok(found)
}

/// Read every metadata line; the image files must exist.
pub fn load(dir: &Path, opts: &SourceOptions) -> anyhow::Result<Dataset> {
    let mut examples = Vec::new();
    for meta in metadata_files(dir)? {
        let base = meta.parent().unwrap_or(Path::new("."));
        let text = std::fs::read_to_string(&meta).with_context(|| format!("reading {}", meta.display()))?;
        for (n, line) in text.lines().enumerate() {
            let line_no = n + 1;
            if line.trim().is_empty() {
                continue;
            }
            let at = || format!("{} line {line_no}", meta.display());
            let value: serde_json::Value = serde_json::from_str(line).with_context(|| format!("{}: not JSON", at()))?;
            let object = value.as_object().with_context(|| format!("{}: not a JSON object", at()))?;
            let keys = || object.keys().map(String::as_str).collect::<Vec<_>>().join(", ");
            let file_name = object
                .get("file_name")
                .with_context(|| format!("{}: no `file_name`; the keys are: {}", at(), keys()))?
                .as_str()
                .with_context(|| format!("{}: `file_name` is not a string", at()))?;
            let caption_value = object.get(&opts.caption_column).with_context(|| {
                format!("{}: no caption column `{}`; the keys are: {}", at(), opts.caption_column, keys())
            })?;
            let caption = match caption_value {
                serde_json::Value::String(s) => Caption::One(s.clone()),
                serde_json::Value::Array(items) => {
                    let choices: Option<Vec<String>> = items.iter().map(|v| v.as_str().map(str::to_string)).collect();
                    match choices {
                        Some(c) if !c.is_empty() => Caption::Choices(c),
                        _ => bail!("{}: `{}` must be a string or a non-empty list of strings", at(), opts.caption_column),
                    }
                }
                _ => bail!("{}: `{}` must be a string or a list of strings", at(), opts.caption_column),
            };
            let path = base.join(file_name);
            if !path.is_file() {
                bail!("{}: image file {} does not exist", at(), path.display());
            }
            examples.push(Example { image: ImageData::File(path.clone()), caption, origin: path.display().to_string() });
        }
    }
    Ok(Dataset { examples, description: dir.display().to_string() })
}
