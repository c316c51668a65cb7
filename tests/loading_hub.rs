//! Hub model ids: a cache folder resolves offline, an incomplete or absent cache is a clear
//! error, and `hf-hub` downloads the fixture model from a local HTTP server that answers the way
//! the hub does (`/api/models/{id}/revision/{rev}`, `/{id}/resolve/{rev}/{file}` with `etag`,
//! `x-repo-commit` and `Content-Range`). Never the real hub.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use lora::models::loading::{hub, resolve_model_files_with, HubSettings, LoadOptions, StableDiffusion};

const SHA: &str = "0123456789abcdef0123456789abcdef01234567";

fn fixtures() -> PathBuf {
    crate::support::repo_root().join("tests/fixtures")
}

/// Every file of the fixture model, by repository path.
fn fixture_repo_files() -> BTreeMap<String, PathBuf> {
    let root = fixtures().join("tiny-sd");
    lora::models::loading::list_folder(&root).unwrap().into_iter().map(|rel| (rel.clone(), root.join(rel))).collect()
}

fn settings(cache: &Path, endpoint: &str, offline: bool) -> HubSettings {
    HubSettings { cache_dir: cache.to_path_buf(), endpoint: endpoint.into(), offline, token: None, progress: false }
}

/// Lay out a cache the way `huggingface_hub` does: blobs, snapshot symlinks into them, refs/main.
fn build_cache(cache: &Path, repo_folder: &str, files: &BTreeMap<String, PathBuf>) -> PathBuf {
    let repo = cache.join(repo_folder);
    let snapshot = repo.join("snapshots").join(SHA);
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    for (i, (rel, src)) in files.iter().enumerate() {
        let blob = repo.join("blobs").join(format!("blob{i:04}"));
        std::fs::copy(src, &blob).unwrap();
        let link = snapshot.join(rel);
        std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        #[cfg(unix)]
        std::os::unix::fs::symlink(&blob, &link).unwrap();
        #[cfg(not(unix))]
        std::fs::copy(&blob, &link).unwrap();
    }
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), SHA).unwrap();
    snapshot
}

#[test]
fn cached_model_resolves_offline_by_branch_and_by_commit() {
    let cache = tempfile::tempdir().unwrap();
    let snapshot = build_cache(cache.path(), "models--org--tiny-sd", &fixture_repo_files());
    let s = settings(cache.path(), "http://127.0.0.1:9", true);

    let files = resolve_model_files_with("org/tiny-sd", &LoadOptions::default(), &s).unwrap();
    assert_eq!(files.root, snapshot);
    assert_eq!(files.unet.weights, vec![snapshot.join("unet/diffusion_pytorch_model.safetensors")]);
    for path in files.all_paths() {
        assert!(path.is_file(), "{} should resolve through its symlink", path.display());
    }
    let by_commit = LoadOptions { revision: Some(SHA.into()), variant: None, ..Default::default() };
    assert_eq!(resolve_model_files_with("org/tiny-sd", &by_commit, &s).unwrap().root, snapshot);
    assert_eq!(hub::cached_snapshot(cache.path(), "org/tiny-sd", "main"), Some(snapshot.clone()));
}

#[test]
fn unreachable_hub_falls_back_to_a_complete_cache() {
    let cache = tempfile::tempdir().unwrap();
    let snapshot = build_cache(cache.path(), "models--org--tiny-sd", &fixture_repo_files());
    // Nothing listens on port 9 of 127.0.0.1: the listing fails and the cache is used.
    let s = settings(cache.path(), "http://127.0.0.1:9", false);
    assert_eq!(resolve_model_files_with("org/tiny-sd", &LoadOptions::default(), &s).unwrap().root, snapshot);
    let err = format!("{:#}", resolve_model_files_with("org/not-cached", &LoadOptions::default(), &s).unwrap_err());
    assert!(err.contains("could not list model `org/not-cached`"), "{err}");
}

#[test]
fn offline_errors_say_what_is_missing() {
    let cache = tempfile::tempdir().unwrap();
    let mut files = fixture_repo_files();
    files.remove("unet/diffusion_pytorch_model.safetensors");
    files.remove("tokenizer/merges.txt");
    build_cache(cache.path(), "models--org--tiny-sd", &files);
    let s = settings(cache.path(), "http://127.0.0.1:9", true);

    let err = format!("{:#}", resolve_model_files_with("org/tiny-sd", &LoadOptions::default(), &s).unwrap_err());
    assert!(err.contains("HF_HUB_OFFLINE"), "{err}");
    assert!(err.contains("unet/diffusion_pytorch_model.safetensors") && err.contains("tokenizer/merges.txt"), "{err}");

    let err = format!("{:#}", resolve_model_files_with("org/absent", &LoadOptions::default(), &s).unwrap_err());
    assert!(err.contains("not in the hub cache") && err.contains("models--org--absent"), "{err}");

    let dev = LoadOptions { revision: Some("dev".into()), variant: None, ..Default::default() };
    let err = format!("{:#}", resolve_model_files_with("org/tiny-sd", &dev, &s).unwrap_err());
    assert!(err.contains("revision `dev`"), "{err}");
}

/// A minimal hub: answers the repository info and file requests for one repository.
struct FakeHub {
    endpoint: String,
    requests: Arc<Mutex<Vec<String>>>,
}

impl FakeHub {
    fn start(repo_id: &'static str, files: BTreeMap<String, Vec<u8>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let files = Arc::new(files);
        let log = requests.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(stream) = stream else { continue };
                let (files, log) = (files.clone(), log.clone());
                std::thread::spawn(move || serve(stream, repo_id, &files, &log));
            }
        });
        Self { endpoint, requests }
    }

    fn requests(&self) -> Vec<String> {
        self.requests.lock().unwrap().clone()
    }
}

fn etag(content: &[u8]) -> String {
    // FNV-1a: a stable per-content name (the hub uses a sha256; any unique string works).
    let mut h: u64 = 0xcbf29ce484222325;
    for b in content {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("{h:016x}{:08x}", content.len())
}

fn serve(mut stream: TcpStream, repo_id: &str, files: &BTreeMap<String, Vec<u8>>, log: &Mutex<Vec<String>>) {
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).is_err() {
        return;
    }
    let mut range: Option<String> = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("range") {
                range = Some(value.trim().to_string());
            }
        }
    }
    let path = request_line.split_whitespace().nth(1).unwrap_or("").to_string();
    log.lock().unwrap().push(format!("{path} {}", range.clone().unwrap_or_default()));

    let info_path = format!("/api/models/{repo_id}/revision/");
    let resolve_prefix = format!("/{repo_id}/resolve/");
    let (status, headers, body): (&str, Vec<String>, Vec<u8>) = if let Some(_rev) = path.strip_prefix(&info_path) {
        let siblings: Vec<serde_json::Value> = files.keys().map(|f| serde_json::json!({ "rfilename": f })).collect();
        let body = serde_json::json!({ "id": repo_id, "sha": SHA, "siblings": siblings }).to_string().into_bytes();
        ("200 OK", vec!["Content-Type: application/json".into()], body)
    } else if let Some(file) = path.strip_prefix(&resolve_prefix).and_then(|rest| rest.split_once('/')).map(|(_rev, f)| f) {
        match files.get(file) {
            Some(content) => {
                let total = content.len();
                let (start, end) = match range.as_deref().and_then(|r| r.strip_prefix("bytes=")) {
                    Some(r) => {
                        let (s, e) = r.split_once('-').unwrap();
                        let s: usize = s.parse().unwrap();
                        let e: usize = if e.is_empty() { total - 1 } else { e.parse::<usize>().unwrap().min(total - 1) };
                        (s, e)
                    }
                    None => (0, total - 1),
                };
                let headers = vec![
                    format!("ETag: \"{}\"", etag(content)),
                    format!("X-Repo-Commit: {SHA}"),
                    format!("Content-Range: bytes {start}-{end}/{total}"),
                    "Content-Type: application/octet-stream".into(),
                ];
                ("206 Partial Content", headers, content[start..=end].to_vec())
            }
            None => ("404 Not Found", vec!["X-Error-Code: EntryNotFound".into()], b"Entry not found".to_vec()),
        }
    } else {
        ("404 Not Found", vec![], b"Repository not found".to_vec())
    };
    let mut response = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
    for h in headers {
        response.push_str(&h);
        response.push_str("\r\n");
    }
    response.push_str("\r\n");
    let _ = stream.write_all(response.as_bytes());
    let _ = stream.write_all(&body);
    let _ = stream.flush();
}

#[test]
fn downloads_from_a_local_hub_then_works_offline() {
    let mut files: BTreeMap<String, Vec<u8>> =
        fixture_repo_files().into_iter().map(|(rel, path)| (rel, std::fs::read(path).unwrap())).collect();
    // Files the pipeline does not need must not be downloaded.
    files.insert("README.md".into(), b"# tiny".to_vec());
    files.insert("unet/diffusion_pytorch_model.bin".into(), b"pickle".to_vec());
    let hub_server = FakeHub::start("org/tiny-sd", files.clone());
    let cache = tempfile::tempdir().unwrap();

    let online = settings(cache.path(), &hub_server.endpoint, false);
    let resolved = resolve_model_files_with("org/tiny-sd", &LoadOptions::default(), &online).unwrap();
    let snapshot = cache.path().join("models--org--tiny-sd/snapshots").join(SHA);
    assert_eq!(resolved.root, snapshot);
    for rel in resolved.relative_paths() {
        let rel = rel.to_string_lossy().into_owned();
        let local = std::fs::read(snapshot.join(&rel)).unwrap();
        assert!(local == files[&rel], "{rel} differs from what the server holds");
    }
    assert!(!snapshot.join("README.md").exists(), "unneeded files are not downloaded");
    assert!(!snapshot.join("unet/diffusion_pytorch_model.bin").exists(), "pickles are never downloaded");
    assert_eq!(std::fs::read_to_string(cache.path().join("models--org--tiny-sd/refs/main")).unwrap().trim(), SHA);
    let requests = hub_server.requests();
    assert!(requests.iter().any(|r| r.starts_with("/api/models/org/tiny-sd/revision/main")), "{requests:?}");
    assert!(requests.iter().any(|r| r.starts_with("/org/tiny-sd/resolve/main/unet/diffusion_pytorch_model.safetensors")), "{requests:?}");

    // A second online resolution finds everything in the snapshot and downloads nothing.
    let before = hub_server.requests().len();
    resolve_model_files_with("org/tiny-sd", &LoadOptions::default(), &online).unwrap();
    let after = hub_server.requests();
    assert!(after[before..].iter().all(|r| r.starts_with("/api/")), "only the listing is asked again: {:?}", &after[before..]);

    // Offline, the same id resolves from the cache the download filled.
    let offline = settings(cache.path(), "http://127.0.0.1:9", true);
    assert_eq!(resolve_model_files_with("org/tiny-sd", &LoadOptions::default(), &offline).unwrap(), resolved);
}

#[test]
fn hub_repositories_with_only_pickles_are_refused_before_downloading_weights() {
    let mut files: BTreeMap<String, Vec<u8>> =
        fixture_repo_files().into_iter().map(|(rel, path)| (rel, std::fs::read(path).unwrap())).collect();
    files.remove("unet/diffusion_pytorch_model.safetensors");
    files.insert("unet/diffusion_pytorch_model.bin".into(), b"pickle".to_vec());
    let hub_server = FakeHub::start("org/pickled", files);
    let cache = tempfile::tempdir().unwrap();
    let err = format!(
        "{:#}",
        resolve_model_files_with("org/pickled", &LoadOptions::default(), &settings(cache.path(), &hub_server.endpoint, false)).unwrap_err()
    );
    assert!(err.contains("pickle") && err.contains("arbitrary code"), "{err}");
    let requests = hub_server.requests();
    assert!(!requests.iter().any(|r| r.contains(".safetensors") || r.contains(".bin")), "no weights fetched: {requests:?}");
}

#[test]
fn unknown_hub_repository_is_a_clear_error() {
    let hub_server = FakeHub::start("org/other", BTreeMap::new());
    let cache = tempfile::tempdir().unwrap();
    let err = format!(
        "{:#}",
        resolve_model_files_with("org/missing", &LoadOptions::default(), &settings(cache.path(), &hub_server.endpoint, false)).unwrap_err()
    );
    assert!(err.contains("could not list model `org/missing`") && err.contains(&hub_server.endpoint), "{err}");
}

#[test]
fn settings_follow_the_hf_environment_variables() {
    let from = |pairs: &[(&str, &str)]| {
        let map: BTreeMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        HubSettings::from_vars(move |name| map.get(name).cloned())
    };
    let s = from(&[("HOME", "/home/u")]);
    assert_eq!(s.cache_dir, PathBuf::from("/home/u/.cache/huggingface/hub"));
    assert_eq!(s.endpoint, "https://huggingface.co");
    assert!(!s.offline);
    assert_eq!(s.token, None);

    let s = from(&[("HOME", "/home/u"), ("HF_HOME", "/data/hf"), ("HF_ENDPOINT", "http://mirror:8080/"), ("HF_HUB_OFFLINE", "1")]);
    assert_eq!(s.cache_dir, PathBuf::from("/data/hf/hub"));
    assert_eq!(s.endpoint, "http://mirror:8080");
    assert!(s.offline);

    let s = from(&[("HF_HOME", "/data/hf"), ("HF_HUB_CACHE", "/fast/cache"), ("HF_HUB_OFFLINE", "0"), ("HF_TOKEN", "hf_x")]);
    assert_eq!(s.cache_dir, PathBuf::from("/fast/cache"));
    assert!(!s.offline);
    assert_eq!(s.token.as_deref(), Some("hf_x"));
    assert!(from(&[("HF_HUB_OFFLINE", "TRUE")]).offline);
}

/// `[model] vae = "org/vae"` (as `--pretrained_vae_model_name_or_path`): a diffusers VAE repo is
/// fetched into the HF cache (its config and safetensors weights only) and built from its own
/// config, scaling factor included; the same folder given locally gives the same VAE.
#[test]
fn a_hub_vae_replaces_the_models_vae_with_its_own_config() {
    let vae_dir = fixtures().join("tiny-sd/vae");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(vae_dir.join("config.json")).unwrap()).unwrap();
    config["scaling_factor"] = serde_json::json!(0.5);
    let config = serde_json::to_vec(&config).unwrap();
    let weights = std::fs::read(vae_dir.join("diffusion_pytorch_model.safetensors")).unwrap();
    let files: BTreeMap<String, Vec<u8>> =
        [("config.json".to_string(), config.clone()), ("diffusion_pytorch_model.safetensors".to_string(), weights.clone()), ("diffusion_pytorch_model.bin".to_string(), b"pickle".to_vec())].into();
    let hub_server = FakeHub::start("org/vae", files);
    let cache = tempfile::tempdir().unwrap();
    let online = settings(cache.path(), &hub_server.endpoint, false);
    let model = fixtures().join("tiny-sd");
    let opts = LoadOptions { vae: Some("org/vae".into()), ..Default::default() };
    let sd = StableDiffusion::load_with(model.to_str().unwrap(), &opts, &online, &candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
    assert_eq!(sd.vae.scaling_factor(), 0.5, "the hub VAE's own config");
    let requests = hub_server.requests();
    assert!(requests.iter().any(|r| r.contains("/org/vae/resolve/main/diffusion_pytorch_model.safetensors")), "{requests:?}");
    assert!(!requests.iter().any(|r| r.contains(".bin")), "pickles are never fetched: {requests:?}");
    // The same files as a local folder.
    let local = tempfile::tempdir().unwrap();
    std::fs::write(local.path().join("config.json"), &config).unwrap();
    std::fs::write(local.path().join("diffusion_pytorch_model.safetensors"), &weights).unwrap();
    let opts = LoadOptions { vae: Some(local.path().to_path_buf()), ..Default::default() };
    let from_folder = StableDiffusion::load_with(model.to_str().unwrap(), &opts, &online, &candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
    let px = candle_core::Tensor::randn(0f32, 0.5, (1, 3, 32, 32), &candle_core::Device::Cpu).unwrap();
    let (a, b) = (sd.vae.encode(&px).unwrap().mean, from_folder.vae.encode(&px).unwrap().mean);
    assert_eq!(a.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    assert_eq!(from_folder.vae.scaling_factor(), 0.5);
}
