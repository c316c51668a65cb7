//! How the train stage starts when it runs: resume the checkpoints that fit this pipeline, start
//! over, or refuse. One decision ([`decide_start`]) that `lora plan` prints and `lora run`
//! carries out.
//!
//! Nothing finished is deleted. Starting over in a folder that holds an earlier run's results
//! first sets them aside under `earlier/<when>-step<N>/` (checkpoints, metrics and plots moved;
//! the adapter files hard-linked, so the exported adapter keeps its name until a new finished
//! one replaces it), with `set-aside.json` saying why and which keys changed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use super::lock::Lock;
use super::plan::{Plan, StageId};
use super::resolve::{diffusers_file, kohya_file};
use crate::layout::{IN_PROGRESS, METRICS_FILE, TRAINED_EMA_FILE, TRAINED_FILE};
use crate::train::checkpoint::{self, TrainerState};

/// Where earlier runs' results are set aside, relative to the output folder.
use crate::layout::EARLIER_DIR;
/// The note in each set-aside folder.
pub(crate) const SET_ASIDE_NOTE: &str = "set-aside.json";

/// What the train stage does with what it finds in the output folder.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Start {
    /// Continue from the newest checkpoint that loads (`newest` is the one tried first).
    Resume { newest: PathBuf, step: usize, warnings: Vec<String> },
    /// From step 0 (`why`); `aside` is what of earlier runs is moved out of the way first.
    Fresh { why: String, aside: Option<SetAside> },
    /// `checkpoints.resume` names the checkpoint (the reference's `--resume_from_checkpoint`).
    Explicit(String),
    /// The folder holds work this pipeline cannot continue and must not discard (exit 2).
    Refused(String),
}

/// Earlier results to set aside before training starts over.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct SetAside {
    /// `earlier/<when>-step<N>`, relative to the output folder.
    pub dir: String,
    /// Moved there (checkpoints, metrics, plots, event files, validation while training).
    pub moved: Vec<String>,
    /// Hard-linked there (the adapter files, final validation images, the lock): they keep their
    /// place until the new run's finished results replace them.
    pub linked: Vec<String>,
    /// The keys whose change makes this a new run, as `key old -> new`.
    pub changed: Vec<String>,
    pub why: String,
}

impl SetAside {
    /// `the earlier run's adapter, metrics and 2 checkpoint(s) are set aside in earlier/...`.
    pub fn summary(&self) -> String {
        let mut what: Vec<String> = Vec::new();
        if self.linked.iter().any(|f| !f.starts_with("validation/") && f.ends_with(".safetensors")) {
            what.push("adapter".into());
        }
        if self.moved.iter().any(|f| f == METRICS_FILE) {
            what.push("metrics".into());
        }
        let n = self.moved.iter().filter(|f| f.starts_with("checkpoint-")).count();
        if n > 0 {
            what.push(format!("{n} checkpoint(s)"));
        }
        if what.is_empty() {
            what.push("files".into());
        }
        format!("the earlier run's {} are set aside in {}/", what.join(", "), self.dir)
    }
}

/// A complete checkpoint folder of the output folder and what its state says.
struct Found {
    step: usize,
    dir: PathBuf,
    state: Option<TrainerState>,
}

/// Whether the safetensors file `path` is whole, from its header alone (`plan` asks this of every
/// checkpoint, so the tensors are not read): the header parses and the file is exactly as long
/// as the header says (a truncated or padded file is not).
fn safetensors_is_whole(path: &Path) -> bool {
    use std::io::Read;
    let Ok(mut f) = std::fs::File::open(path) else { return false };
    let Ok(len) = f.metadata().map(|m| m.len()) else { return false };
    let mut n = [0u8; 8];
    if f.read_exact(&mut n).is_err() {
        return false;
    }
    let n = u64::from_le_bytes(n);
    if n > 100 << 20 || 8 + n > len {
        return false;
    }
    let mut header = vec![0u8; n as usize];
    if f.read_exact(&mut header).is_err() {
        return false;
    }
    let Ok(serde_json::Value::Object(entries)) = serde_json::from_slice::<serde_json::Value>(&header) else { return false };
    let mut end = 0u64;
    for (name, v) in &entries {
        if name == "__metadata__" {
            continue;
        }
        match v.get("data_offsets").and_then(|o| o.as_array()).map(|o| o.iter().filter_map(serde_json::Value::as_u64).collect::<Vec<_>>()) {
            Some(o) if o.len() == 2 && o[0] <= o[1] => end = end.max(o[1]),
            _ => return false,
        }
    }
    len == 8 + n + end
}

/// The complete checkpoints of `out`; `state` is `None` for one that would not load (its state
/// inconsistent, or a weights or optimizer file that does not parse whole).
fn survey(out: &Path) -> Vec<Found> {
    let Ok(list) = checkpoint::list_checkpoints(out) else { return Vec::new() };
    let parses = |f: &Path| safetensors_is_whole(f);
    list.into_iter()
        .filter(|(_, d)| checkpoint::is_complete(d))
        .map(|(step, dir)| {
            let whole = parses(&dir.join(checkpoint::LORA_FILE)) && parses(&dir.join(checkpoint::OPTIMIZER_FILE));
            let state = checkpoint::read_state(&dir).ok().filter(|_| whole);
            Found { step, dir, state }
        })
        .collect()
}

/// The train stage's start, given the lock and the folder's contents. Called only when the
/// stage runs, for the reason `why`; `--force` starts over (setting earlier results aside,
/// never deleting them).
pub(crate) fn decide_start(plan: &Plan, lock: &Lock, force: bool, why: &str) -> Start {
    let p = plan.pipeline();
    let out = &plan.out_dir;
    if let Some(r) = &p.checkpoints.resume {
        if !force {
            return Start::Explicit(r.clone());
        }
    }
    let fp = plan.fingerprint(StageId::Train);
    let found = survey(out);
    let settings = settings_snapshot(plan);
    let in_progress = lock.stages.get(IN_PROGRESS);
    let fresh = |why: String, changed: Vec<String>| Start::Fresh { aside: set_aside(plan, lock, why.clone(), changed), why };
    if force {
        return fresh("--force".into(), Vec::new());
    }
    if let Some(rec) = in_progress {
        // The interrupted run's checkpoints: every one that loads (a start from step 0 sets the
        // folder's earlier checkpoints aside, so those left are this run's, resumes included).
        let usable: Vec<&Found> = found.iter().filter(|f| f.state.is_some()).collect();
        let Some(newest) = usable.last() else {
            // Nothing to protect: a run that failed or was stopped before its first checkpoint.
            return fresh("the interrupted run left no checkpoint that loads".into(), changed_keys(&rec.details, &settings).into_iter().map(|(_, t)| t).collect());
        };
        if rec.fingerprint == fp {
            return resume_from(plan, newest, Vec::new());
        }
        let changes = changed_keys(&rec.details, &settings);
        let (breaking, other): (Vec<_>, Vec<_>) = changes.into_iter().partition(|(k, _)| breaks_resume(k));
        if !breaking.is_empty() || rec.details.is_empty() {
            let list = if rec.details.is_empty() {
                "\n  (the interrupted run recorded no settings)".to_string()
            } else {
                breaking.iter().map(|(_, t)| format!("\n  {t}")).collect::<String>()
            };
            return Start::Refused(format!(
                "{} holds an interrupted training run (up to step {}) whose checkpoints do not fit this pipeline; changed:{list}\nrevert the change to resume it, or run with --force to start over (its checkpoints are set aside in {EARLIER_DIR}/, not deleted)",
                crate::util::path::tidy_path(out).display(),
                newest.step
            ));
        }
        let warnings = other.into_iter().map(|(_, t)| t).collect();
        return resume_from(plan, newest, warnings);
    }
    // No run in progress: checkpoints made with exactly this training (the lock was deleted or
    // damaged, or they were copied here) are resumed.
    if let Some(newest) = found.iter().rfind(|f| f.state.as_ref().is_some_and(|s| s.train_fingerprint.as_deref() == Some(fp))) {
        return resume_from(plan, newest, Vec::new());
    }
    let changed: Vec<String> = lock
        .stages
        .get(StageId::Train.name())
        .and_then(|r| r.details.get("settings"))
        .and_then(|v| serde_json::from_value::<BTreeMap<String, serde_json::Value>>(v.clone()).ok())
        .map(|old| changed_keys(&old, &settings).into_iter().map(|(_, t)| t).collect())
        .unwrap_or_default();
    fresh(why.into(), changed)
}

/// Resume from `newest` (with `warnings` about changed settings), unless it is past the steps the
/// pipeline trains now (known without the dataset only when `train.max_steps` is set; the
/// trainer checks again once it knows): then refuse.
fn resume_from(plan: &Plan, newest: &Found, warnings: Vec<String>) -> Start {
    match plan.known_max_steps() {
        Some(max) if newest.step > max => Start::Refused(format!(
            "{} is at step {}, past the {max} steps this pipeline trains: raise train.max_steps to continue it, or run with --force to start over (its checkpoints are set aside in {EARLIER_DIR}/, not deleted)",
            crate::util::path::tidy_path(&newest.dir).display(),
            newest.step
        )),
        _ => Start::Resume { newest: newest.dir.clone(), step: newest.step, warnings },
    }
}

/// What of earlier runs is in the folder, to set aside before starting over; `None` when there
/// is nothing (a fresh folder, or only the encode cache).
fn set_aside(plan: &Plan, lock: &Lock, why: String, changed: Vec<String>) -> Option<SetAside> {
    let out = &plan.out_dir;
    let p = plan.pipeline();
    let exists = |rel: &str| out.join(rel).exists();
    let mut moved: Vec<String> = Vec::new();
    let mut linked: Vec<String> = Vec::new();
    // Every checkpoint folder, complete or not (by name: only this tool makes them).
    if let Ok(entries) = std::fs::read_dir(out) {
        let mut ckpts: Vec<(usize, String)> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_str()?.to_string();
                let n = name.strip_prefix("checkpoint-")?.parse::<usize>().ok()?;
                e.path().is_dir().then_some((n, name))
            })
            .collect();
        ckpts.sort();
        moved.extend(ckpts.into_iter().map(|(_, n)| n));
    }
    for f in [METRICS_FILE, crate::report::plot::LOSS_PLOT] {
        if exists(f) {
            moved.push(f.into());
        }
    }
    // TensorBoard events of the earlier run (the new run's trim would drop them).
    let logs = &p.logging.dir;
    if let Ok(entries) = std::fs::read_dir(out.join(logs)) {
        let mut events: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().filter(|n| n.starts_with("events.out.tfevents.")).map(|n| format!("{}/{n}", logs.display())))
            .collect();
        events.sort();
        moved.extend(events);
    }
    if let Ok(entries) = std::fs::read_dir(out.join("validation")) {
        let mut steps: Vec<String> =
            entries.flatten().filter_map(|e| e.file_name().to_str().filter(|n| n.starts_with("step-")).map(|n| format!("validation/{n}"))).collect();
        steps.sort();
        moved.extend(steps);
    }
    let mut finished: Vec<String> = vec![TRAINED_FILE.into(), TRAINED_EMA_FILE.into(), diffusers_file(p), kohya_file(p)];
    if let Some(export) = lock.stages.get(StageId::Export.name()) {
        finished.extend(export.outputs.iter().cloned());
    }
    if let Some(validate) = lock.stages.get(StageId::Validate.name()) {
        finished.extend(validate.outputs.iter().cloned());
    }
    for f in finished {
        if exists(&f) && out.join(&f).is_file() && !linked.contains(&f) {
            linked.push(f);
        }
    }
    if moved.is_empty() && linked.is_empty() {
        return None;
    }
    if exists(crate::layout::LOCK_FILE) {
        linked.push(crate::layout::LOCK_FILE.into());
    }
    Some(SetAside { dir: aside_name(out, &moved), moved, linked, changed, why })
}

/// `earlier/<YYYYmmdd-HHMMSS>-step<N>`: when the earlier run last wrote (its metrics or newest
/// checkpoint, UTC) and how far it got; a numbered suffix when that name is taken.
fn aside_name(out: &Path, moved: &[String]) -> String {
    let metrics = crate::report::metrics::read_steps(&out.join(METRICS_FILE)).unwrap_or_default();
    let ckpt_step = moved.iter().filter_map(|m| m.strip_prefix("checkpoint-")?.parse::<u64>().ok()).max();
    let step = metrics.last().map(|r| r.step).into_iter().chain(ckpt_step).max().unwrap_or(0);
    let newest = [out.join(METRICS_FILE), out.join(TRAINED_FILE)]
        .into_iter()
        .chain(moved.iter().map(|m| out.join(m)))
        .filter_map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .max()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs());
    let base = format!("{EARLIER_DIR}/{}-step{step}", utc_stamp(newest));
    let mut name = base.clone();
    let mut k = 2;
    while out.join(&name).exists() {
        name = format!("{base}-{k}");
        k += 1;
    }
    name
}

/// `20261204-193700` for a Unix time (UTC).
fn utc_stamp(secs: u64) -> String {
    let (y, m, d, hh, mm, ss) = crate::util::time::utc_civil(secs);
    format!("{y:04}{m:02}{d:02}-{hh:02}{mm:02}{ss:02}")
}

/// Carry out `aside`: move and hard-link (copy where links are not possible) into its folder,
/// then write its note. Each item is moved by one rename, so an interruption leaves every file
/// either in its old place or in the new one.
pub(crate) fn carry_out(out: &Path, aside: &SetAside) -> Result<()> {
    let dest = out.join(&aside.dir);
    std::fs::create_dir_all(&dest).with_context(|| format!("creating {}", dest.display()))?;
    for rel in &aside.linked {
        let (from, to) = (out.join(rel), dest.join(rel));
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        if std::fs::hard_link(&from, &to).is_err() {
            std::fs::copy(&from, &to).with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        }
    }
    for rel in &aside.moved {
        let (from, to) = (out.join(rel), dest.join(rel));
        if let Some(parent) = to.parent() {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::rename(&from, &to).with_context(|| format!("moving {} to {}", from.display(), to.display()))?;
    }
    let note = serde_json::json!({
        "why": aside.why,
        "changed": aside.changed,
        "moved": aside.moved,
        "linked": aside.linked,
    });
    crate::util::fs::write_atomic(&dest.join(SET_ASIDE_NOTE), serde_json::to_string_pretty(&note)?.as_bytes())
        .with_context(|| format!("writing {}", dest.join(SET_ASIDE_NOTE).display()))?;
    Ok(())
}

/// The settings a train run's checkpoints depend on, as dotted keys, to say what changed: the
/// typed values (defaults included), with the keys the file sets as written (paths as written
/// do not change with the working directory).
pub(crate) fn settings_snapshot(p: &Plan) -> BTreeMap<String, serde_json::Value> {
    fn flatten(prefix: &str, v: &serde_json::Value, out: &mut BTreeMap<String, serde_json::Value>) {
        match v {
            serde_json::Value::Object(t) => t.iter().for_each(|(k, v)| flatten(&format!("{prefix}.{k}"), v, out)),
            other => {
                out.insert(prefix.to_string(), other.clone());
            }
        }
    }
    let typed = serde_json::to_value(p.pipeline()).unwrap_or_default();
    let written = serde_json::to_value(&p.loaded.resolved).unwrap_or_default();
    let mut out = BTreeMap::new();
    for table in ["model", "dataset", "preprocess", "adapter", "optimizer", "train"] {
        for source in [&typed, &written] {
            if let Some(v) = source.get(table) {
                flatten(table, v, &mut out);
            }
        }
    }
    // Without a seed in the file every run draws its own: not a change of the run's settings.
    if written.get("train").and_then(|t| t.get("seed")).is_none() {
        out.remove("train.seed");
    }
    // The held-out split decides which examples train.
    if p.pipeline().validation.loss_split > 0.0 {
        out.insert("validation.loss_split".into(), p.pipeline().validation.loss_split.into());
    }
    out.insert("model files".into(), p.fingerprint(StageId::Model).into());
    out.insert("dataset files".into(), p.fingerprint(StageId::Dataset).into());
    out
}

/// Settings whose change makes an interrupted run's checkpoints unusable (shapes, data stream,
/// model); every other change (learning rate, step count, schedule) resumes with a warning.
pub(crate) fn breaks_resume(key: &str) -> bool {
    // The keys of the stages training reads from (the model, the data and its preprocessing),
    // the adapter's shape, and the train keys that shape the data stream.
    let upstream = StageId::owner_of(key).is_some_and(|s| matches!(s, StageId::Model | StageId::Dataset | StageId::Preprocess));
    // `optimizer.kind`: the checkpoint's optimizer state is another rule's.
    upstream
        || key.starts_with("adapter.")
        || matches!(key, "train.batch_size" | "train.gradient_accumulation_steps" | "train.seed" | "optimizer.kind" | "validation.loss_split" | "train.ema_decay")
}

/// The keys that differ, each as `(key, "key old -> new")`.
pub(crate) fn changed_keys(old: &BTreeMap<String, serde_json::Value>, new: &BTreeMap<String, serde_json::Value>) -> Vec<(String, String)> {
    let show = |v: Option<&serde_json::Value>| v.map_or("(unset)".to_string(), |v| v.to_string());
    let keys: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    keys.into_iter()
        .filter(|k| old.get(*k) != new.get(*k))
        .map(|k| {
            let text = if k.ends_with(" files") { format!("{k} changed") } else { format!("{k} {} -> {}", show(old.get(k)), show(new.get(k))) };
            (k.clone(), text)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_breaks_a_resume() {
        assert!(breaks_resume("adapter.rank"));
        assert!(breaks_resume("model files"));
        assert!(breaks_resume("train.batch_size"));
        assert!(!breaks_resume("train.learning_rate"));
        assert!(!breaks_resume("train.max_steps"));
        assert!(breaks_resume("optimizer.kind"), "the saved optimizer state is another rule's");
        assert!(!breaks_resume("optimizer.beta1"));
        assert!(breaks_resume("validation.loss_split"), "another split trains on other examples");
        let old = BTreeMap::from([("adapter.rank".to_string(), serde_json::json!(4)), ("train.max_steps".to_string(), serde_json::json!(8))]);
        let new = BTreeMap::from([("adapter.rank".to_string(), serde_json::json!(8)), ("train.max_steps".to_string(), serde_json::json!(8))]);
        assert_eq!(changed_keys(&old, &new), vec![("adapter.rank".to_string(), "adapter.rank 4 -> 8".to_string())]);
    }

    #[test]
    fn a_safetensors_file_is_whole_by_its_header() {
        let dir = tempfile::tempdir().unwrap();
        let t = candle_core::Tensor::arange(0f32, 6., &candle_core::Device::Cpu).unwrap().reshape((2, 3)).unwrap();
        let path = dir.path().join("a.safetensors");
        candle_core::safetensors::save(&std::collections::HashMap::from([("w".to_string(), t)]), &path).unwrap();
        assert!(safetensors_is_whole(&path));
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 1]).unwrap();
        assert!(!safetensors_is_whole(&path), "truncated");
        std::fs::write(&path, [&bytes[..], &[0u8]].concat()).unwrap();
        assert!(!safetensors_is_whole(&path), "padded");
        std::fs::write(&path, b"not a safetensors file").unwrap();
        assert!(!safetensors_is_whole(&path));
    }

    #[test]
    fn utc_stamps() {
        assert_eq!(utc_stamp(0), "19700101-000000");
        // 2026-12-04 19:37:05 UTC (date -u -d @1796413025).
        assert_eq!(utc_stamp(1_796_413_025), "20261204-193705");
        // 2000-02-29 23:59:59 UTC, a leap day.
        assert_eq!(utc_stamp(951_868_799), "20000229-235959");
    }
}
