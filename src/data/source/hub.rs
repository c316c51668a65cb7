//! A Hugging Face hub dataset id (`owner/name`), resolved to its parquet files in the HF cache
//! (`<cache>/datasets--owner--name/snapshots/<commit>/`), downloading the `train` split's parquet
//! files through `hf-hub` when they are not there and downloads are allowed.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

/// Where and how to look for a hub dataset.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HubOptions {
    /// Branch, tag or commit (default `main`).
    pub revision: Option<String>,
    /// The hub cache folder (default: `$HF_HOME/hub` or `~/.cache/huggingface/hub`).
    pub cache_dir: Option<PathBuf>,
    /// Never download; the dataset must be in the cache (also when `HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// Another hub endpoint (default: `$HF_ENDPOINT` or the public hub).
    pub endpoint: Option<String>,
}

/// Whether `name` of a repository file is a parquet shard of the `train` split (or of an
/// unnamed split).
fn is_train_parquet(name: &str) -> bool {
    if !name.ends_with(".parquet") {
        return false;
    }
    let file = name.rsplit('/').next().unwrap_or(name);
    let in_split_dir = |split: &str| name.split('/').any(|part| part == split);
    let named_split = ["test", "validation", "valid", "eval"].iter().any(|s| file.starts_with(s) || in_split_dir(s));
    !named_split
}

/// The snapshot folder holding the dataset's parquet files, from the cache or downloaded.
pub fn resolve(repo_id: &str, opts: &HubOptions) -> anyhow::Result<PathBuf> {
    let revision = opts.revision.clone().unwrap_or_else(|| "main".to_string());
    let cache = match &opts.cache_dir {
        Some(dir) => Cache::new(dir.clone()),
        None => Cache::from_env(),
    };
    let repo = Repo::with_revision(repo_id.to_string(), RepoType::Dataset, revision.clone());
    if let Some(snapshot) = cached_snapshot(cache.path(), &repo, &revision) {
        return Ok(snapshot);
    }
    let env_offline = std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if opts.offline || env_offline {
        bail!(
            "hub dataset {repo_id}@{revision} is not in the cache {} and downloads are off (offline)",
            cache.path().display()
        );
    }
    let mut builder = ApiBuilder::from_cache(cache.clone()).with_progress(false);
    if let Some(endpoint) = opts.endpoint.clone().or_else(|| std::env::var("HF_ENDPOINT").ok()) {
        builder = builder.with_endpoint(endpoint);
    }
    let api = builder.build().context("starting the hub client")?;
    let api_repo = api.repo(repo.clone());
    let info = api_repo.info().with_context(|| format!("listing hub dataset {repo_id}@{revision}"))?;
    let files: Vec<String> =
        info.siblings.into_iter().map(|s| s.rfilename).filter(|n| is_train_parquet(n)).collect();
    if files.is_empty() {
        bail!("hub dataset {repo_id}@{revision} has no parquet files for the train split");
    }
    let mut snapshot = None;
    for name in &files {
        let local = api_repo.get(name).with_context(|| format!("downloading {name} of hub dataset {repo_id}"))?;
        // `local` is `<snapshot>/<name>`: strip the name's components.
        let mut root = local.clone();
        for _ in name.split('/') {
            root.pop();
        }
        snapshot = Some(root);
    }
    Ok(snapshot.expect("at least one file"))
}

/// `<cache>/datasets--owner--name/snapshots/<commit>` when `refs/<revision>` names a commit whose
/// snapshot holds parquet files (a revision that is itself a commit hash is looked up directly).
fn cached_snapshot(cache: &Path, repo: &Repo, revision: &str) -> Option<PathBuf> {
    let repo_dir = cache.join(repo.folder_name());
    let commit = std::fs::read_to_string(repo_dir.join("refs").join(revision))
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| revision.to_string());
    let snapshot = repo_dir.join("snapshots").join(commit);
    let has_parquet = super::walk_files(&snapshot)
        .ok()?
        .iter()
        .any(|p| p.extension().is_some_and(|e| e == "parquet"));
    has_parquet.then_some(snapshot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn train_split_files_are_chosen() {
        assert!(is_train_parquet("data/train-00000-of-00001.parquet"));
        assert!(is_train_parquet("default/train/0000.parquet"));
        assert!(is_train_parquet("data.parquet"));
        assert!(!is_train_parquet("data/test-00000-of-00001.parquet"));
        assert!(!is_train_parquet("default/validation/0000.parquet"));
        assert!(!is_train_parquet("README.md"));
    }
}
