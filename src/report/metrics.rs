//! `metrics.jsonl`: one JSON object per optimizer update; trimming it to the steps a resumed
//! run keeps, so the file holds every step once whatever number of times the run was resumed;
//! reading it back (for `loss.png` and the summary's smoothed losses).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

/// Keep the lines of `path` whose `step` is at most `step` (and that parse: a line a killed run
/// half wrote is dropped). A missing file stays missing; the file is rewritten atomically.
pub(crate) fn keep_steps_up_to(path: &Path, step: usize) -> Result<()> {
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
        // A step has one update line, at most one evaluation line and one held-out line.
        let kind = if v.get("eval_loss").is_some() {
            1
        } else if v.get("val_loss").is_some() {
            2
        } else {
            0
        };
        if s as usize <= step && seen.insert((s, kind)) {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    if kept != text {
        crate::util::fs::write_atomic(path, kept.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The lines of `path` that parse as JSON (a line a killed run half wrote does not); a missing
/// file has none.
fn json_lines(path: &Path) -> Result<Vec<serde_json::Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    Ok(text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
}

/// The fixed-noise evaluation losses of `path` as `(step, eval_loss)` in step order (lines
/// `{"step": N, "eval_loss": x}`, written before the first and after the last update).
pub fn read_evals(path: &Path) -> Result<Vec<(u64, f64)>> {
    read_scalar(path, "eval_loss")
}

/// The `(step, value)` of every line of `path` that has `key`, in step order (the last line of
/// a step wins).
fn read_scalar(path: &Path, key: &str) -> Result<Vec<(u64, f64)>> {
    let mut by_step = std::collections::BTreeMap::new();
    for v in json_lines(path)? {
        if let (Some(step), Some(x)) = (v.get("step").and_then(serde_json::Value::as_u64), v.get(key).and_then(serde_json::Value::as_f64)) {
            by_step.insert(step, x);
        }
    }
    Ok(by_step.into_iter().collect())
}

/// The held-out losses (`validation.loss_split`) of `path` as `(step, val_loss)` in step order.
pub fn read_heldout(path: &Path) -> Result<Vec<(u64, f64)>> {
    read_scalar(path, "val_loss")
}

/// The evaluation loss before training (step 0) and after it (the last evaluation past step 0).
pub(crate) fn eval_span(evals: &[(u64, f64)]) -> (Option<f64>, Option<f64>) {
    let before = evals.iter().find(|(s, _)| *s == 0).map(|(_, e)| *e);
    let after = evals.iter().rfind(|(s, _)| *s > 0).map(|(_, e)| *e);
    (before, after)
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
pub(crate) fn read_steps(path: &Path) -> Result<Vec<StepRecord>> {
    let mut by_step = std::collections::BTreeMap::new();
    for v in json_lines(path)? {
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

/// Training speed from the times between updates, less the time spent on other work between
/// them (validation, plotting). The first update, which includes the evaluation before training,
/// is left out when there are others.
pub(crate) struct StepRate {
    started: Instant,
    first: Option<(usize, Instant)>,
    last: Option<(usize, Instant)>,
    /// Time spent outside training between the first and the latest update ...
    paused: Duration,
    /// ... and after the latest one (counted once another update follows).
    pending: Duration,
}

impl StepRate {
    pub fn new() -> Self {
        Self::starting_at(Instant::now())
    }

    fn starting_at(started: Instant) -> Self {
        Self { started, first: None, last: None, paused: Duration::ZERO, pending: Duration::ZERO }
    }

    /// Update `step` just finished.
    pub fn update(&mut self, step: usize) {
        self.update_at(step, Instant::now());
    }

    fn update_at(&mut self, step: usize, now: Instant) {
        self.first.get_or_insert((step, now));
        self.last = Some((step, now));
        self.paused += std::mem::take(&mut self.pending);
    }

    /// `d` was spent on other work since the latest update.
    pub(crate) fn pause(&mut self, d: Duration) {
        self.pending += d;
    }

    /// Updates per second.
    pub(crate) fn per_second(&self) -> Option<f64> {
        let ((s0, t0), (s1, t1)) = (self.first?, self.last?);
        if s1 > s0 {
            let secs = (t1 - t0).saturating_sub(self.paused).as_secs_f64();
            return (secs > 0.0).then(|| (s1 - s0) as f64 / secs);
        }
        let secs = (t0 - self.started).as_secs_f64();
        (secs > 0.0).then(|| 1.0 / secs)
    }
}

impl Default for StepRate {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Updates 1..=5 every 100 ms, 150 ms of validation after update 3 and 1 s after the last
    /// (not between updates: not counted): 4 intervals in 0.55 s - 0.15 s = 10 it/s.
    #[test]
    fn step_rate_leaves_out_the_first_update_and_the_pauses() {
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        let mut r = StepRate::starting_at(t0);
        assert_eq!(r.per_second(), None);
        r.update_at(1, ms(500));
        assert_eq!(r.per_second(), Some(2.0), "one update: from the start, 0.5 s");
        for (step, at) in [(2, 600), (3, 700), (4, 950), (5, 1050)] {
            r.update_at(step, ms(at));
            if step == 3 {
                r.pause(Duration::from_millis(150));
            }
        }
        r.pause(Duration::from_secs(1));
        let rate = r.per_second().unwrap();
        assert!((rate - 10.0).abs() < 1e-9, "{rate}");
    }

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
