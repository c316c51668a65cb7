//! Checkpoints: `<output>/checkpoint-<step>/` with the LoRA weights in PEFT names
//! (`pytorch_lora_weights.safetensors`, as the reference's save hook writes them), the optimizer
//! state and `trainer_state.json`; pruning to `checkpoints_total_limit`; finding `latest`.
//!
//! Every file is written to a temporary name and renamed, and a checkpoint directory is built
//! under a temporary name and renamed into place last, so a crash never leaves a checkpoint that
//! looks complete but is not.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor, Var};
use serde::{Deserialize, Serialize};

use super::optim::AdamW;

pub(crate) const LORA_FILE: &str = "pytorch_lora_weights.safetensors";
pub(crate) const OPTIMIZER_FILE: &str = "optimizer.safetensors";
pub(crate) const STATE_FILE: &str = "trainer_state.json";

/// A checkpoint to resume is past the end of the training the pipeline now asks for (the CLI
/// exits 2: the user resolves it).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub(crate) struct PastTheEnd(pub String);

/// What a run needs, besides weights and optimizer moments, to continue exactly.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub(crate) struct TrainerState {
    /// Optimizer updates done.
    pub global_step: usize,
    /// Micro-batches consumed in total (the position in the seeded data stream).
    pub(crate) micro_steps: usize,
    /// The pipeline fingerprint the checkpoint was made with (informational).
    #[serde(default)]
    pub pipeline_sha256: Option<String>,
    /// The train stage's fingerprint (`lora.lock`'s) the checkpoint was made with: a checkpoint
    /// whose fingerprint is the pipeline's is resumed even without a lock (deleted, or the
    /// checkpoint copied into a fresh folder).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train_fingerprint: Option<String>,
    /// Loss of the last update.
    #[serde(default)]
    pub(crate) last_loss: Option<f64>,
    /// Updates whose optimizer step was skipped for inf/NaN fp16 gradients (the lr schedule
    /// did not advance on them).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub skipped_steps: usize,
    /// The fp16 loss scaler (torch's `scaler.pt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_scaler: Option<super::precision::GradScalerState>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// A named trainable tensor; names are the file keys (`unet.<module>.lora_A.weight`).
#[derive(Clone)]
pub struct NamedVar {
    pub name: String,
    pub var: Var,
}

/// Write named tensors as safetensors with `metadata`, atomically.
pub(crate) fn save_safetensors_atomic(
    tensors: &[(String, Tensor)],
    metadata: Option<HashMap<String, String>>,
    path: &Path,
) -> Result<()> {
    let views: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<candle_core::Result<_>>()?;
    let data = views
        .iter()
        .map(|(n, t)| {
            let bytes = tensor_bytes(t)?;
            Ok((n.clone(), t.dtype(), t.dims().to_vec(), bytes))
        })
        .collect::<Result<Vec<_>>>()?;
    let owned: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(n, dt, shape, bytes)| {
            Ok((n.clone(), safetensors::tensor::TensorView::new(to_st_dtype(*dt)?, shape.clone(), bytes)?))
        })
        .collect::<Result<_>>()?;
    let bytes = crate::util::safetensors_bytes::serialize(owned, metadata)?;
    crate::util::fs::write_atomic(path, &bytes).with_context(|| format!("writing {}", path.display()))
}

fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    use candle_core::DType;
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => flat.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::F16 => flat.to_vec1::<half::f16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::BF16 => flat.to_vec1::<half::bf16>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        DType::I64 => flat.to_vec1::<i64>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
        other => bail!("cannot save a {other:?} tensor"),
    })
}

fn to_st_dtype(dt: candle_core::DType) -> Result<safetensors::Dtype> {
    use candle_core::DType;
    Ok(match dt {
        DType::F32 => safetensors::Dtype::F32,
        DType::F16 => safetensors::Dtype::F16,
        DType::BF16 => safetensors::Dtype::BF16,
        DType::I64 => safetensors::Dtype::I64,
        other => bail!("cannot save a {other:?} tensor"),
    })
}

/// `<output>/checkpoint-<step>`.
pub(crate) fn checkpoint_dir(output_dir: &Path, step: usize) -> PathBuf {
    output_dir.join(format!("checkpoint-{step}"))
}

/// Whether `dir` holds every file of a checkpoint (what [`save_checkpoint`] renames into place).
pub(crate) fn is_complete(dir: &Path) -> bool {
    [STATE_FILE, LORA_FILE, OPTIMIZER_FILE].iter().all(|f| dir.join(f).is_file())
}

/// Read a checkpoint's `trainer_state.json`, checked against its folder: the step in the folder
/// name, and counts that a run can have reached (a damaged or forged state is refused here, so
/// the checkpoint before it is used).
pub(crate) fn read_state(dir: &Path) -> Result<TrainerState> {
    let state_path = dir.join(STATE_FILE);
    let meta = std::fs::metadata(&state_path).with_context(|| format!("reading {}", state_path.display()))?;
    if meta.len() > 1 << 20 {
        bail!("{} is {} bytes: not a trainer state", state_path.display(), meta.len());
    }
    let state: TrainerState = serde_json::from_str(&crate::util::fs::read_text(&state_path)?)
        .with_context(|| format!("parsing {}", state_path.display()))?;
    let named = dir.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_prefix("checkpoint-")).and_then(|n| n.parse::<usize>().ok());
    if let Some(n) = named {
        if n != state.global_step {
            bail!("{}: global_step is {}, but the folder is checkpoint-{n}", state_path.display(), state.global_step);
        }
    }
    // Every update consumes at least one micro-batch; a skipped update is still an update.
    if state.global_step > state.micro_steps || state.skipped_steps > state.global_step {
        bail!(
            "{}: global_step {}, micro_steps {} and skipped_steps {} cannot come from one run",
            state_path.display(),
            state.global_step,
            state.micro_steps,
            state.skipped_steps
        );
    }
    Ok(state)
}

/// The `checkpoint-N` directories in `output_dir`, sorted by N (ascending).
pub(crate) fn list_checkpoints(output_dir: &Path) -> Result<Vec<(usize, PathBuf)>> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(output_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("listing {}", output_dir.display())),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(n) = name.strip_prefix("checkpoint-").and_then(|s| s.parse::<usize>().ok()) {
            if entry.path().join(STATE_FILE).is_file() {
                out.push((n, entry.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// Save a complete checkpoint, then prune the oldest so at most `total_limit` remain
/// (the reference prunes *before* saving to keep `limit` including the new one; the outcome is
/// the same set of folders, and pruning after means a crash never leaves fewer checkpoints).
pub(crate) fn save_checkpoint(
    output_dir: &Path,
    params: &[NamedVar],
    optimizer: &AdamW,
    state: &TrainerState,
    total_limit: Option<usize>,
) -> Result<PathBuf> {
    let final_dir = checkpoint_dir(output_dir, state.global_step);
    let tmp_dir = output_dir.join(format!(".checkpoint-{}.{}.tmp", state.global_step, std::process::id()));
    if tmp_dir.exists() {
        std::fs::remove_dir_all(&tmp_dir)?;
    }
    // Build the folder under its temporary name; on any error (a full disk) remove it again, so
    // nothing temporary survives and the previous checkpoints stay as they were.
    let built = (|| -> Result<()> {
        std::fs::create_dir_all(&tmp_dir).with_context(|| format!("creating {}", tmp_dir.display()))?;
        let tensors: Vec<(String, Tensor)> = params.iter().map(|p| (p.name.clone(), p.var.as_tensor().clone())).collect();
        save_safetensors_atomic(&tensors, Some(HashMap::from([("format".to_string(), "pt".to_string())])), &tmp_dir.join(LORA_FILE))?;
        optimizer.save(&tmp_dir.join(OPTIMIZER_FILE))?;
        let state_path = tmp_dir.join(STATE_FILE);
        crate::util::fs::write_atomic(&state_path, serde_json::to_string_pretty(state)?.as_bytes())
            .with_context(|| format!("writing {}", state_path.display()))?;
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir).with_context(|| format!("replacing {}", final_dir.display()))?;
        }
        std::fs::rename(&tmp_dir, &final_dir).with_context(|| format!("renaming {} to {}", tmp_dir.display(), final_dir.display()))?;
        // Something outside this run may have removed files under us (another tool cleaning the
        // folder): only a checkpoint whose every file is in place counts as saved.
        if !is_complete(&final_dir) {
            bail!("{} is incomplete after saving (was the folder changed by another process?)", final_dir.display());
        }
        Ok(())
    })();
    if let Err(e) = built {
        let _ = std::fs::remove_dir_all(&tmp_dir);
        if final_dir.exists() && !is_complete(&final_dir) {
            let _ = std::fs::remove_dir_all(&final_dir);
        }
        return Err(e.context(format!("saving checkpoint {} (the earlier checkpoints are unchanged)", final_dir.display())));
    }
    if let Some(limit) = total_limit {
        let all = list_checkpoints(output_dir)?;
        if all.len() > limit {
            for (_, dir) in &all[..all.len() - limit] {
                tracing::info!("removing old checkpoint {}", crate::util::path::tidy_path(&dir).display());
                std::fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
            }
        }
    }
    Ok(final_dir)
}

/// Load a checkpoint into `params` (by name, shapes checked) and `optimizer`; returns its state.
pub(crate) fn load_checkpoint(dir: &Path, params: &[NamedVar], optimizer: &mut AdamW) -> Result<TrainerState> {
    let state = read_state(dir)?;
    let lora_path = dir.join(LORA_FILE);
    let tensors = candle_core::safetensors::load(&lora_path, &Device::Cpu)
        .with_context(|| format!("reading {}", lora_path.display()))?;
    // Check every tensor and load the optimizer before changing any parameter, so a checkpoint
    // that fails to load leaves the parameters as they were (and the previous one can be tried).
    let mut values = Vec::with_capacity(params.len());
    for p in params {
        let t = tensors
            .get(&p.name)
            .with_context(|| format!("{}: tensor `{}` is missing (was the adapter configuration changed?)", lora_path.display(), p.name))?;
        if t.dims() != p.var.dims() {
            bail!(
                "{}: tensor `{}` has shape {:?}, the adapter expects {:?} (was the rank changed?)",
                lora_path.display(),
                p.name,
                t.dims(),
                p.var.dims()
            );
        }
        values.push(t.to_dtype(p.var.dtype())?.to_device(p.var.device())?);
    }
    if tensors.len() != params.len() {
        let known: std::collections::HashSet<&str> = params.iter().map(|p| p.name.as_str()).collect();
        let extra: Vec<&String> = tensors.keys().filter(|k| !known.contains(k.as_str())).take(5).collect();
        bail!("{}: holds tensors the adapter does not have, e.g. {extra:?}", lora_path.display());
    }
    optimizer.load(&dir.join(OPTIMIZER_FILE))?;
    for (p, v) in params.iter().zip(values) {
        p.var.set(&v)?;
    }
    Ok(state)
}

/// Load the newest checkpoint in `output_dir` that loads; one that fails (damaged, truncated,
/// from other settings) is reported and the previous one tried. `None` when none loads.
pub(crate) fn load_newest_loadable(output_dir: &Path, params: &[NamedVar], optimizer: &mut AdamW) -> Result<Option<(PathBuf, TrainerState)>> {
    for (_, dir) in list_checkpoints(output_dir)?.into_iter().rev() {
        match load_checkpoint(&dir, params, optimizer) {
            Ok(state) => return Ok(Some((dir, state))),
            Err(e) => tracing::warn!("checkpoint {} does not load ({e:#}); trying the one before it", dir.display()),
        }
    }
    Ok(None)
}

/// Resolve `resume` (`"latest"` or a path) as the reference: `latest` is the highest-numbered
/// checkpoint in `output_dir` (none → a fresh start); a path's base name is joined with
/// `output_dir` unless the path itself is an existing checkpoint directory.
pub(crate) fn resolve_resume(output_dir: &Path, resume: &str) -> Result<Option<PathBuf>> {
    if resume == "latest" {
        return Ok(list_checkpoints(output_dir)?.pop().map(|(_, p)| p));
    }
    let given = PathBuf::from(resume);
    if given.join(STATE_FILE).is_file() {
        return Ok(Some(given));
    }
    let joined = output_dir.join(given.file_name().unwrap_or(given.as_os_str()));
    if joined.join(STATE_FILE).is_file() {
        Ok(Some(joined))
    } else {
        bail!(
            "resume_from_checkpoint = {resume:?}: no checkpoint there (looked for {} and {}); available: {:?}",
            given.join(STATE_FILE).display(),
            joined.join(STATE_FILE).display(),
            list_checkpoints(output_dir)?.iter().map(|(n, _)| format!("checkpoint-{n}")).collect::<Vec<_>>()
        )
    }
}
