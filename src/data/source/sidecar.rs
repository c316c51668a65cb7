//! An image folder with a caption file beside each image (kohya's layout): `a.png` + `a.txt` or
//! `a.caption`, subfolders included.

use std::path::Path;

use anyhow::{bail, Context};

use super::{Caption, Dataset, Example, ImageData};

/// The default caption extensions, in order of preference.
pub(crate) const DEFAULT_CAPTION_EXTENSIONS: &[&str] = &["txt", "caption"];

/// Every image under `dir` with its caption (trimmed). An image without a caption file is an error
/// naming it and the files looked for.
pub fn load(dir: &Path, caption_extensions: &[String]) -> anyhow::Result<Dataset> {
    if !dir.is_dir() {
        bail!("image folder {} does not exist", dir.display());
    }
    let extensions: Vec<String> = if caption_extensions.is_empty() {
        DEFAULT_CAPTION_EXTENSIONS.iter().map(|s| s.to_string()).collect()
    } else {
        caption_extensions.iter().map(|e| e.trim_start_matches('.').to_string()).collect()
    };
    let mut examples = Vec::new();
    for path in super::walk_files(dir)?.into_iter().filter(|p| super::is_image_path(p)) {
        let candidates: Vec<_> = extensions.iter().map(|e| path.with_extension(e)).collect();
        let Some(caption_file) = candidates.iter().find(|c| c.is_file()) else {
            let looked: Vec<String> = candidates.iter().map(|c| c.display().to_string()).collect();
            bail!("{}: no caption file (looked for {})", path.display(), looked.join(", "));
        };
        let text = std::fs::read_to_string(caption_file).with_context(|| format!("reading {}", caption_file.display()))?;
        examples.push(Example {
            image: ImageData::File(path.clone()),
            caption: Caption::One(text.trim().to_string()),
            origin: path.display().to_string(),
            group: 0,
        });
    }
    Ok(Dataset { examples, description: dir.display().to_string(), groups: Vec::new() })
}
