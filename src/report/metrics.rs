//! `metrics.jsonl`: one JSON object per optimizer update; trimming it to the steps a resumed
//! run keeps, so the file holds every step once whatever number of times the run was resumed.

use std::path::Path;

use anyhow::{Context, Result};

/// Keep the lines of `path` whose `step` is at most `step` (and that parse: a line a killed run
/// half wrote is dropped). A missing file stays missing; the file is rewritten atomically.
pub fn keep_steps_up_to(path: &Path, step: usize) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut kept = String::new();
    let mut seen = std::collections::BTreeSet::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let Some(s) = v.get("step").and_then(serde_json::Value::as_u64) else { continue };
        if s as usize <= step && seen.insert(s) {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    if kept != text {
        crate::util::fs::write_atomic(path, kept.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_each_step_once_up_to_the_resume_step() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        std::fs::write(&p, "{\"step\":1}\n{\"step\":2}\n{\"step\":3}\n{\"step\":2}\n{\"step\":4,\"lo").unwrap();
        keep_steps_up_to(&p, 2).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "{\"step\":1}\n{\"step\":2}\n");
        keep_steps_up_to(&p, 0).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "");
        keep_steps_up_to(&dir.path().join("none.jsonl"), 3).unwrap();
        assert!(!dir.path().join("none.jsonl").exists());
    }
}
