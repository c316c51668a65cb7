//! `metrics.jsonl`: one JSON object per optimizer update; trimming it to the steps a resumed
//! run keeps, so the file holds every step once whatever number of times the run was resumed;
//! reading it back (for `loss.png` and the summary's smoothed losses).

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

/// One update as `metrics.jsonl` records it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepRecord {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
}

/// The updates of `path` in step order, each step once (the last line of a step wins); lines
/// that do not parse or lack `step`/`loss`/`lr` (a line a killed run half wrote) are skipped. A
/// missing file has no steps.
pub fn read_steps(path: &Path) -> Result<Vec<StepRecord>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let mut by_step = std::collections::BTreeMap::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let num = |k: &str| v.get(k).and_then(serde_json::Value::as_f64);
        let (Some(step), Some(loss), Some(lr)) = (v.get("step").and_then(serde_json::Value::as_u64), num("loss"), num("lr")) else { continue };
        by_step.insert(step, StepRecord { step, loss, lr });
    }
    Ok(by_step.into_values().collect())
}

/// The loss at the start and the end of a run, each the mean over a tenth of its steps (single
/// steps vary too much with the drawn timesteps and noise to compare).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossTrend {
    pub first_mean: f64,
    pub last_mean: f64,
    /// Steps in each mean: a tenth of the steps, rounded up.
    pub window: usize,
    pub steps: usize,
}

/// The [`LossTrend`] of `records` (non-finite losses, fp16 overflow steps, left out); `None`
/// without a finite loss.
pub fn loss_trend(records: &[StepRecord]) -> Option<LossTrend> {
    let losses: Vec<f64> = records.iter().map(|r| r.loss).filter(|l| l.is_finite()).collect();
    if losses.is_empty() {
        return None;
    }
    let window = losses.len().div_ceil(10);
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    Some(LossTrend { first_mean: mean(&losses[..window]), last_mean: mean(&losses[losses.len() - window..]), window, steps: losses.len() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_each_step_once_in_order_and_skips_broken_lines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("metrics.jsonl");
        std::fs::write(
            &p,
            "{\"step\":2,\"loss\":0.5,\"lr\":1e-3}\n{\"step\":1,\"loss\":0.7,\"lr\":1e-3}\n{\"step\":2,\"loss\":0.4,\"lr\":2e-3}\n{\"step\":3}\n{\"step\":3,\"lo",
        )
        .unwrap();
        let r = read_steps(&p).unwrap();
        assert_eq!(r, vec![StepRecord { step: 1, loss: 0.7, lr: 1e-3 }, StepRecord { step: 2, loss: 0.4, lr: 2e-3 }]);
        assert!(read_steps(&dir.path().join("none.jsonl")).unwrap().is_empty());
    }

    /// 25 steps: windows of 3 (a tenth, rounded up); the means computed by hand.
    #[test]
    fn loss_trend_means_the_first_and_last_tenth() {
        let records: Vec<StepRecord> = (1..=25).map(|s| StepRecord { step: s, loss: s as f64, lr: 0.0 }).collect();
        let t = loss_trend(&records).unwrap();
        assert_eq!((t.window, t.steps), (3, 25));
        assert_eq!(t.first_mean, (1.0 + 2.0 + 3.0) / 3.0);
        assert_eq!(t.last_mean, (23.0 + 24.0 + 25.0) / 3.0);
        let one = loss_trend(&records[..1]).unwrap();
        assert_eq!((one.first_mean, one.last_mean, one.window), (1.0, 1.0, 1));
        let nan = [StepRecord { step: 1, loss: f64::NAN, lr: 0.0 }];
        assert!(loss_trend(&nan).is_none());
    }

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
