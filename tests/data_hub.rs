//! A hub dataset id downloaded through `hf-hub` from a local HTTP server playing the hub, then
//! read from the cache offline; only the train split's parquet files are fetched.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};

use lora::data::source::hub::HubOptions;
use lora::data::source::{load_source, SourceOptions, SourceSpec};

const COMMIT: &str = "89abcdef0123456789abcdef0123456789abcdef";

/// Serve the hub's dataset info and `resolve` endpoints for `someone/shapes`; returns the base URL
/// and the list of requested paths.
fn serve_fake_hub(parquet: Vec<u8>) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            let path = request_line.split_whitespace().nth(1).unwrap_or("").to_string();
            let mut range_start = 0usize;
            let mut range_end: Option<usize> = None;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                    let (a, b) = v.trim().split_once('-').unwrap();
                    range_start = a.parse().unwrap();
                    range_end = b.parse().ok();
                }
            }
            log.lock().unwrap().push(path.clone());
            let (status, headers, body): (&str, String, Vec<u8>) = if path.starts_with("/api/datasets/someone/shapes/revision/main") {
                let json = format!(
                    r#"{{"sha":"{COMMIT}","siblings":[{{"rfilename":"README.md"}},{{"rfilename":"data/train-00000-of-00001.parquet"}},{{"rfilename":"data/test-00000-of-00001.parquet"}}]}}"#
                );
                ("200 OK", "Content-Type: application/json\r\n".into(), json.into_bytes())
            } else if path == "/datasets/someone/shapes/resolve/main/data/train-00000-of-00001.parquet" {
                let end = range_end.unwrap_or(parquet.len() - 1).min(parquet.len() - 1);
                let body = parquet[range_start..=end].to_vec();
                let headers = format!(
                    "Content-Range: bytes {range_start}-{end}/{}\r\nx-repo-commit: {COMMIT}\r\netag: \"abc123\"\r\n",
                    parquet.len()
                );
                ("206 Partial Content", headers, body)
            } else {
                ("404 Not Found", String::new(), b"not found".to_vec())
            };
            let head = format!(
                "HTTP/1.1 {status}\r\n{headers}Content-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        }
    });
    (url, seen)
}

#[test]
fn hub_dataset_downloads_train_parquet_then_works_offline() {
    let fixture = crate::support::repo_root()
        .join("tests/fixtures/datasets/shapes-parquet/data/train-00000-of-00001.parquet");
    let (url, seen) = serve_fake_hub(std::fs::read(&fixture).unwrap());
    let cache = tempfile::tempdir().unwrap();
    let hub = HubOptions { cache_dir: Some(cache.path().to_path_buf()), endpoint: Some(url), ..Default::default() };
    let spec = SourceSpec::Hub { repo_id: "someone/shapes".into(), hub: hub.clone() };
    let ds = load_source(&spec, &SourceOptions::default()).unwrap();
    assert_eq!(ds.len(), 24);
    let requested = seen.lock().unwrap().clone();
    assert!(requested.iter().all(|p| !p.contains("test-0000")), "the test split was fetched: {requested:?}");
    assert!(cache.path().join("datasets--someone--shapes/snapshots").join(COMMIT).join("data/train-00000-of-00001.parquet").exists());
    // Offline, from the cache, with no server calls.
    let before = seen.lock().unwrap().len();
    let offline = SourceSpec::Hub { repo_id: "someone/shapes".into(), hub: HubOptions { offline: true, endpoint: None, ..hub } };
    assert_eq!(load_source(&offline, &SourceOptions::default()).unwrap().len(), 24);
    assert_eq!(seen.lock().unwrap().len(), before, "offline load must not call the hub");
}
