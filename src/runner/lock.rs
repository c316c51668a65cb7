//! `lora.lock`: per-stage fingerprints of what each stage read, as DVC's `dvc.lock`. A stage
//! whose fingerprint equals the recorded one, and whose outputs still exist, is up to date and
//! is not run again.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::layout::LOCK_FILE;

/// Bumped whenever a change to `lora` alters what a stage produces (numerics, file layout), so a
/// fixed binary never calls a result of an older one up to date. Part of every fingerprint.
pub(crate) const RESULT_VERSION: u32 = 2;

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct StageRecord {
    pub fingerprint: String,
    /// Files the stage wrote (relative to the output directory).
    #[serde(default)]
    pub outputs: Vec<String>,
    /// What a later run needs to know about this result: for the in-progress train mark, the
    /// settings it runs with (dotted keys), to say what changed before resuming; for a finished
    /// train stage, the example count and step count the export metadata states.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) details: BTreeMap<String, serde_json::Value>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct Lock {
    /// Which pipeline file produced this lock.
    #[serde(default)]
    pub pipeline: String,
    #[serde(default)]
    pub stages: BTreeMap<String, StageRecord>,
}

impl Lock {
    /// Read `<dir>/lora.lock`; a missing file is an empty lock, a damaged one is an error
    /// that says how to recover.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(LOCK_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => serde_json::from_str(&text).with_context(|| {
                format!(
                    "{} is damaged; delete it (or move it aside) to rerun every stage: checkpoints made with this pipeline are resumed without it, and earlier results are set aside, not deleted",
                    crate::util::path::tidy_path(&path).display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(LOCK_FILE);
        crate::util::fs::write_atomic(&path, serde_json::to_string_pretty(self)?.as_bytes())
            .with_context(|| format!("writing {}", path.display()))
    }

    /// Whether `stage` ran with `fingerprint` and all its outputs are still in `dir` (what
    /// `stages::decide` asks, stage by stage; kept for the lock's own test).
    #[cfg(test)]
    pub(crate) fn is_fresh(&self, dir: &Path, stage: &str, fingerprint: &str) -> bool {
        self.stages.get(stage).is_some_and(|r| {
            r.fingerprint == fingerprint && r.outputs.iter().all(|o| dir.join(o).exists())
        })
    }

    pub fn record(&mut self, stage: &str, fingerprint: &str, outputs: Vec<String>) {
        self.record_with(stage, fingerprint, outputs, BTreeMap::new());
    }

    pub(crate) fn record_with(&mut self, stage: &str, fingerprint: &str, outputs: Vec<String>, details: BTreeMap<String, serde_json::Value>) {
        self.stages.insert(stage.to_string(), StageRecord { fingerprint: fingerprint.to_string(), outputs, details });
    }
}

/// Builds a stage fingerprint from labelled parts.
#[derive(Default)]
pub(crate) struct Fingerprint(Sha256);

impl Fingerprint {
    pub fn new(stage: &str) -> Self {
        let mut f = Self(Sha256::new());
        f.add("stage", stage).add("result_version", &RESULT_VERSION.to_string());
        f
    }

    pub fn add(&mut self, label: &str, value: &str) -> &mut Self {
        self.0.update((label.len() as u64).to_le_bytes());
        self.0.update(label.as_bytes());
        self.0.update((value.len() as u64).to_le_bytes());
        self.0.update(value.as_bytes());
        self
    }

    /// A TOML value in canonical form (tables are sorted maps, so key order does not matter).
    pub(crate) fn add_toml(&mut self, label: &str, value: Option<&toml::Value>) -> &mut Self {
        let json = value.map(|v| serde_json::to_string(v).unwrap_or_default()).unwrap_or_default();
        self.add(label, &json)
    }

    /// Size and modification time of every file under `path` (a file or a directory), so an
    /// edited dataset or weight file makes the stage stale without hashing gigabytes.
    pub(crate) fn add_files(&mut self, label: &str, path: &Path) -> &mut Self {
        let mut entries = Vec::new();
        collect_files(path, &mut entries);
        entries.sort();
        for (p, len, mtime) in entries {
            // Relative to `path`, so the fingerprint does not depend on the working directory.
            let rel = p.strip_prefix(path).unwrap_or(&p);
            self.add(label, &format!("{}|{len}|{mtime}", rel.display()));
        }
        self
    }

    pub fn finish(&self) -> String {
        let digest = self.0.clone().finalize();
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

fn collect_files(path: &Path, out: &mut Vec<(PathBuf, u64, u128)>) {
    let Ok(meta) = std::fs::metadata(path) else { return };
    if meta.is_file() {
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        out.push((path.to_path_buf(), meta.len(), mtime));
    } else if meta.is_dir() {
        if let Ok(rd) = std::fs::read_dir(path) {
            for e in rd.flatten() {
                collect_files(&e.path(), out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_depends_on_values_not_table_order() {
        let a: toml::Value = toml::from_str("x = 1\ny = 2").unwrap();
        let b: toml::Value = toml::from_str("y = 2\nx = 1").unwrap();
        let c: toml::Value = toml::from_str("x = 1\ny = 3").unwrap();
        let fp = |v: &toml::Value| Fingerprint::new("train").add_toml("t", Some(v)).finish();
        assert_eq!(fp(&a), fp(&b));
        assert_ne!(fp(&a), fp(&c));
        assert_ne!(Fingerprint::new("a").finish(), Fingerprint::new("b").finish());
    }

    #[test]
    fn lock_round_trip_and_freshness() {
        let dir = tempfile::tempdir().unwrap();
        let mut lock = Lock::read(dir.path()).unwrap();
        assert!(lock.stages.is_empty());
        std::fs::write(dir.path().join("out.safetensors"), b"x").unwrap();
        lock.record("train", "abc", vec!["out.safetensors".into()]);
        lock.write(dir.path()).unwrap();
        let back = Lock::read(dir.path()).unwrap();
        assert_eq!(back, lock);
        assert!(back.is_fresh(dir.path(), "train", "abc"));
        assert!(!back.is_fresh(dir.path(), "train", "abd"));
        std::fs::remove_file(dir.path().join("out.safetensors")).unwrap();
        assert!(!back.is_fresh(dir.path(), "train", "abc"), "a missing output makes the stage stale");
        std::fs::write(dir.path().join(LOCK_FILE), b"{not json").unwrap();
        let err = Lock::read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("damaged"), "{err}");
    }

    #[test]
    fn file_changes_change_the_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("data.txt");
        std::fs::write(&f, b"one").unwrap();
        let a = Fingerprint::new("d").add_files("data", dir.path()).finish();
        std::fs::write(&f, b"three").unwrap();
        let b = Fingerprint::new("d").add_files("data", dir.path()).finish();
        assert_ne!(a, b);
    }
}
