//! Hub model ids: the Hugging Face cache layout (`models--org--name/refs/<rev>`,
//! `snapshots/<sha>/`), offline resolution, and downloads with `hf-hub`.

use std::collections::BTreeSet;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use hf_hub::api::sync::ApiBuilder;
use hf_hub::{Cache, Repo, RepoType};

use super::{plan_model_files, ModelFiles};

/// Where and how hub models are fetched; [`HubSettings::from_env`] reads the usual variables.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubSettings {
    /// The hub cache folder (the one holding `models--org--name/`).
    pub cache_dir: PathBuf,
    /// Base URL of the hub (`HF_ENDPOINT`), without a trailing slash.
    pub endpoint: String,
    /// Never touch the network (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// Access token (`HF_TOKEN`, else the `token` file next to the cache as `hf-hub` reads it).
    pub token: Option<String>,
    /// Show download progress bars.
    pub progress: bool,
}

impl HubSettings {
    /// The hub client for these settings (cache, endpoint, token, progress bars).
    fn api(&self) -> anyhow::Result<hf_hub::api::sync::Api> {
        let mut builder = ApiBuilder::from_cache(Cache::new(self.cache_dir.clone())).with_endpoint(self.endpoint.clone()).with_progress(self.progress);
        if self.token.is_some() {
            builder = builder.with_token(self.token.clone());
        }
        builder.build().context("setting up the hub client")
    }

    /// `HF_HUB_CACHE`, else `HF_HOME/hub`, else `~/.cache/huggingface/hub`; `HF_ENDPOINT`;
    /// `HF_HUB_OFFLINE`; `HF_TOKEN`. Progress bars when stderr is a terminal.
    pub(crate) fn from_env() -> Self {
        let mut settings = Self::from_vars(|name| std::env::var(name).ok());
        settings.progress = std::io::stderr().is_terminal();
        settings
    }

    /// [`Self::from_env`] with the variables read through `var` (progress bars off).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let var = |name: &str| var(name).filter(|v| !v.trim().is_empty());
        let home = || {
            var("HOME").or_else(|| var("USERPROFILE")).map(PathBuf::from).unwrap_or_default()
        };
        let cache_dir = var("HF_HUB_CACHE")
            .or_else(|| var("HUGGINGFACE_HUB_CACHE"))
            .map(PathBuf::from)
            .or_else(|| var("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
            .unwrap_or_else(|| home().join(".cache").join("huggingface").join("hub"));
        let endpoint = var("HF_ENDPOINT").unwrap_or_else(|| "https://huggingface.co".into());
        Self {
            cache_dir,
            endpoint: endpoint.trim_end_matches('/').to_string(),
            offline: var("HF_HUB_OFFLINE").is_some_and(|v| is_truthy(&v)),
            token: var("HF_TOKEN"),
            progress: false,
        }
    }
}

fn is_truthy(value: &str) -> bool {
    matches!(value.trim().to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on")
}

/// True for a full 40-hex-digit commit hash.
fn is_commit_hash(revision: &str) -> bool {
    revision.len() == 40 && revision.bytes().all(|b| b.is_ascii_hexdigit())
}

/// `cache_dir/models--org--name`.
pub(crate) fn repo_cache_dir(cache_dir: &Path, repo_id: &str) -> PathBuf {
    cache_dir.join(Repo::new(repo_id.to_string(), RepoType::Model).folder_name())
}

/// The cached snapshot folder of `repo_id` at `revision`, if the cache knows that revision
/// (a commit hash directly, else through `refs/<revision>`). Its files may still be incomplete.
pub fn cached_snapshot(cache_dir: &Path, repo_id: &str, revision: &str) -> Option<PathBuf> {
    let repo_dir = repo_cache_dir(cache_dir, repo_id);
    let commit = if is_commit_hash(revision) {
        revision.to_string()
    } else {
        std::fs::read_to_string(repo_dir.join("refs").join(revision)).ok()?.trim().to_string()
    };
    if commit.is_empty() || commit.contains(['/', '\\']) || commit.contains("..") {
        return None;
    }
    let snapshot = repo_dir.join("snapshots").join(commit);
    snapshot.is_dir().then_some(snapshot)
}

/// Resolve a hub id to a complete local snapshot: from the cache when offline (or when the hub
/// cannot be reached and the cache is complete), else downloading what is missing.
pub(crate) fn resolve_hub_model(
    repo_id: &str,
    revision: &str,
    variant: Option<&str>,
    settings: &HubSettings,
) -> anyhow::Result<(PathBuf, ModelFiles)> {
    if settings.offline {
        return resolve_from_cache(repo_id, revision, variant, settings).with_context(|| {
            format!("HF_HUB_OFFLINE is set, so model `{repo_id}` (revision {revision}) must come from the cache")
        });
    }
    match download_model(repo_id, revision, variant, settings) {
        Ok(found) => Ok(found),
        Err(download_error) => match resolve_from_cache(repo_id, revision, variant, settings) {
            Ok(found) => {
                tracing::warn!("could not reach the hub for `{repo_id}` ({download_error:#}); using the cached snapshot {}", found.0.display());
                Ok(found)
            }
            Err(_) => Err(download_error),
        },
    }
}

/// A complete cached snapshot, or an error listing what is missing.
pub(crate) fn resolve_from_cache(
    repo_id: &str,
    revision: &str,
    variant: Option<&str>,
    settings: &HubSettings,
) -> anyhow::Result<(PathBuf, ModelFiles)> {
    let repo_dir = repo_cache_dir(&settings.cache_dir, repo_id);
    let Some(snapshot) = cached_snapshot(&settings.cache_dir, repo_id, revision) else {
        if !repo_dir.is_dir() {
            bail!(
                "model `{repo_id}` is not in the hub cache {} (no {} folder); download it once \
                 online (unset HF_HUB_OFFLINE) or point HF_HUB_CACHE / HF_HOME at the cache that has it",
                settings.cache_dir.display(),
                repo_dir.file_name().unwrap_or_default().to_string_lossy()
            );
        }
        bail!(
            "model `{repo_id}` is in the hub cache {} but revision `{revision}` is not (no \
             refs/{revision} or snapshots/<commit> folder)",
            settings.cache_dir.display()
        );
    };
    let listing = super::list_folder(&snapshot)?;
    let files = plan_model_files(&listing, variant, &mut |rel| {
        crate::util::fs::read_text(&snapshot.join(rel))
    })
    .with_context(|| format!("the cached snapshot {} of `{repo_id}` is incomplete", snapshot.display()))?;
    Ok((snapshot.clone(), files.rebased(&snapshot)))
}

/// Ask the hub for the revision's file list, choose the files the pipeline needs and download
/// those not yet in `snapshots/<commit>/`; `refs/<revision>` then points at the commit.
pub(crate) fn download_model(
    repo_id: &str,
    revision: &str,
    variant: Option<&str>,
    settings: &HubSettings,
) -> anyhow::Result<(PathBuf, ModelFiles)> {
    let api = settings.api()?;
    let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string());
    let api_repo = api.repo(repo.clone());
    let info = api_repo.info().map_err(|e| {
        anyhow::anyhow!(
            "could not list model `{repo_id}` (revision {revision}) on {}: {e} (check the id and \
             revision; set HF_TOKEN for private or gated models; HF_HUB_OFFLINE=1 uses the cache only)",
            settings.endpoint
        )
    })?;
    if !is_commit_hash(&info.sha) {
        bail!("the hub answered with {:?} as the commit of `{repo_id}` at {revision}, which is not a commit hash", info.sha);
    }
    let snapshot = repo_cache_dir(&settings.cache_dir, repo_id).join("snapshots").join(&info.sha);
    let listing: BTreeSet<String> = info.siblings.iter().map(|s| s.rfilename.clone()).collect();

    let fetch = |rel: &str| -> anyhow::Result<PathBuf> {
        let local = snapshot.join(rel);
        if local.is_file() {
            return Ok(local);
        }
        let path = api_repo
            .download(rel)
            .map_err(|e| anyhow::anyhow!("downloading {rel} of `{repo_id}` from {}: {e}", settings.endpoint))?;
        if path != local {
            bail!(
                "downloading {rel} of `{repo_id}`: the hub served commit {} instead of {} (the \
                 revision `{revision}` moved during the download); run again",
                path.parent().and_then(|p| p.file_name()).unwrap_or_default().to_string_lossy(),
                info.sha
            );
        }
        Ok(path)
    };
    let files = plan_model_files(&listing, variant, &mut |rel| {
        crate::util::fs::read_text(&fetch(rel)?)
    })
    .with_context(|| format!("model `{repo_id}` (revision {revision}) on {}", settings.endpoint))?;
    for rel in files.relative_paths() {
        fetch(&rel.to_string_lossy())?;
    }
    if !is_commit_hash(revision) {
        Cache::new(settings.cache_dir.clone())
            .repo(repo)
            .create_ref(&info.sha)
            .with_context(|| format!("writing refs/{revision} in {}", settings.cache_dir.display()))?;
    }
    Ok((snapshot.clone(), files.rebased(&snapshot)))
}

/// One file of a hub repository (a single-file checkpoint `org/repo/file.safetensors`): from
/// the cache when offline or already there, else downloaded into the HF cache.
pub(crate) fn fetch_file(repo_id: &str, revision: &str, file: &str, settings: &HubSettings) -> anyhow::Result<PathBuf> {
    if let Some(snapshot) = cached_snapshot(&settings.cache_dir, repo_id, revision) {
        let local = snapshot.join(file);
        if local.is_file() {
            return Ok(local);
        }
    }
    if settings.offline {
        bail!(
            "HF_HUB_OFFLINE is set and `{file}` of `{repo_id}` (revision {revision}) is not in the hub cache {}",
            settings.cache_dir.display()
        );
    }
    let api = settings.api()?;
    let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string());
    api.repo(repo).get(file).map_err(|e| {
        anyhow::anyhow!(
            "downloading `{file}` of `{repo_id}` (revision {revision}) from {}: {e} (set HF_TOKEN for gated models)",
            settings.endpoint
        )
    })
}
