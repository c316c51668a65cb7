//! The encode cache on disk, end to end (tiny pipeline): an entry is tied to what it encodes, so
//! entries swapped on disk are rebuilt, never served, and training equals a run without the cache.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use lora::config::{load_pipeline, LoadedPipeline};
use lora::runner::run::run_pipeline;
use lora::runner::stages::{RunOptions, RunReport, Session};
use lora::layout::DIFFUSERS_FILE;

fn root() -> PathBuf {
    crate::support::repo_root()
}

/// The tiny pipeline for one epoch (24 images, batch 2: every image's entry is read once).
fn load(out: &Path, extra: &[&str]) -> LoadedPipeline {
    let mut overrides: Vec<String> =
        vec!["train.max_steps=12".into(), "train.batch_size=2".into(), format!("output.dir={:?}", out.display().to_string())];
    overrides.extend(extra.iter().map(|s| s.to_string()));
    load_pipeline(&root().join("pipelines/tiny.toml"), &overrides).unwrap_or_else(|d| panic!("{}", d.render()))
}

fn run(loaded: &LoadedPipeline, opts: &RunOptions) -> RunReport {
    run_pipeline(loaded, &mut Session::default(), opts, Arc::new(AtomicBool::new(false))).unwrap()
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for shard in std::fs::read_dir(dir).unwrap() {
        for e in std::fs::read_dir(shard.unwrap().path()).unwrap() {
            out.push(e.unwrap().path());
        }
    }
    out.sort();
    out
}

/// Two entries of the same size swapped between runs: the next run (encode up to date, train
/// reruns with another learning rate) gives the weights of a run that encodes every step, and the
/// two files hold their own encodings again afterwards.
#[test]
fn swapped_cache_entries_are_rebuilt_and_training_equals_a_clean_run() {
    let dir = tempfile::tempdir().unwrap();
    let cached = dir.path().join("cached");
    run(&load(&cached, &[]), &RunOptions::default());
    let cache = cached.join("cache/encode");
    let mut by_size: BTreeMap<u64, Vec<PathBuf>> = BTreeMap::new();
    for e in entries(&cache) {
        by_size.entry(std::fs::metadata(&e).unwrap().len()).or_default().push(e);
    }
    // The latent entries: the most numerous size (24 images, 1 caption size).
    let same = by_size.values().max_by_key(|v| v.len()).unwrap();
    assert!(same.len() >= 24, "{} entries of one size", same.len());
    let (a, b) = (&same[0], &same[1]);
    let (bytes_a, bytes_b) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert_ne!(bytes_a, bytes_b);
    std::fs::write(a, &bytes_b).unwrap();
    std::fs::write(b, &bytes_a).unwrap();

    let lr = ["train.learning_rate=3e-3"];
    run(&load(&cached, &lr), &RunOptions::default());
    let clean = dir.path().join("clean");
    run(&load(&clean, &lr), &RunOptions { no_cache: true, ..Default::default() });
    assert!(
        std::fs::read(cached.join(DIFFUSERS_FILE)).unwrap() == std::fs::read(clean.join(DIFFUSERS_FILE)).unwrap(),
        "training with swapped entries equals a clean run, bit for bit"
    );
    assert_eq!(std::fs::read(a).unwrap(), bytes_a, "{} rebuilt with its own encoding", a.display());
    assert_eq!(std::fs::read(b).unwrap(), bytes_b, "{} rebuilt with its own encoding", b.display());
}

/// SDXL: the cache holds both encoders' context and the pooled embedding (and the latents); a run
/// served by it (the encode stage fills it, train reads it) trains the same weights, bit for bit,
/// as one that encodes every step, also when train reruns alone from a cache filled earlier.
#[test]
fn sdxl_cache_holds_context_and_pooled_and_training_equals_an_uncached_run() {
    let dir = tempfile::tempdir().unwrap();
    let sdxl = |out: &Path, extra: &[&str]| {
        let mut overrides: Vec<String> = vec![
            "train.max_steps=6".into(),
            "train.batch_size=2".into(),
            "adapter.text_encoder=false".into(),
            format!("output.dir={:?}", out.display().to_string()),
        ];
        overrides.extend(extra.iter().map(|s| s.to_string()));
        load_pipeline(&root().join("pipelines/tiny-sdxl.toml"), &overrides).unwrap_or_else(|d| panic!("{}", d.render()))
    };
    let cached = dir.path().join("cached");
    run(&sdxl(&cached, &[]), &RunOptions::default());
    let clean = dir.path().join("clean");
    run(&sdxl(&clean, &[]), &RunOptions { no_cache: true, ..Default::default() });
    assert!(
        std::fs::read(cached.join(DIFFUSERS_FILE)).unwrap() == std::fs::read(clean.join(DIFFUSERS_FILE)).unwrap(),
        "SDXL training from the encode cache equals encoding every step, bit for bit"
    );
    // Another learning rate: train reruns from the cache alone and still equals the uncached run.
    let lr = ["train.learning_rate=3e-3"];
    run(&sdxl(&cached, &lr), &RunOptions::default());
    run(&sdxl(&clean, &lr), &RunOptions { no_cache: true, ..Default::default() });
    assert!(std::fs::read(cached.join(DIFFUSERS_FILE)).unwrap() == std::fs::read(clean.join(DIFFUSERS_FILE)).unwrap());
}
