//! The training loop: micro-steps with gradient accumulation, clipping, AdamW, the lr schedule,
//! checkpoints, resume, Ctrl-C, progress and `metrics.jsonl`.
//!
//! Determinism: every random draw of micro-step `k` (VAE posterior sample, noise, offset noise,
//! timesteps) comes from a ChaCha8 stream seeded by `(seed, k)`, and the data order of epoch `e`
//! from `(seed, e)` in the data source, so the same pipeline and seed give the same weights bit
//! for bit, and a resumed run continues exactly where the stopped one was (the reference
//! restarts the interrupted epoch from its first batch; we skip the batches already consumed).

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};

use super::checkpoint::{self, NamedVar, TrainerState};
use super::lr::{lr_at, scale_lr, LrSchedule, StepPlan};
use super::optim::{clip_grad_norm, global_grad_norm, AdamW, AdamWConfig};
use super::precision::{round_through, GradScaler, GradScalerConfig, MixedPrecision};
use super::step::{denoising_loss_checkpointed, DrawStream, LossOptions, NoiseDraw};
use crate::models::conditioning::time_ids;
use crate::models::{Conditioning, StableDiffusion};
use crate::nn::CheckpointGrads;
use crate::schedulers::ddpm::Ddpm;

/// Everything of `[train]`, `[optimizer]` and `[checkpoints]` the loop needs, already resolved.
#[derive(Clone, Debug)]
pub struct TrainSettings {
    pub batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub num_epochs: usize,
    pub max_train_steps: Option<usize>,
    pub learning_rate: f64,
    pub scale_lr: bool,
    pub lr_schedule: LrSchedule,
    pub lr_warmup_steps: usize,
    pub adamw: AdamWConfig,
    /// `None` disables clipping (the reference script never clips, see docs/pipeline.md).
    pub max_grad_norm: Option<f64>,
    pub loss: LossOptions,
    pub seed: u64,
    pub checkpointing_steps: Option<usize>,
    pub checkpoints_total_limit: Option<usize>,
    pub output_dir: PathBuf,
    /// `"latest"` or a checkpoint path.
    pub resume_from_checkpoint: Option<String>,
    /// Keep VAE latent distributions and text embeddings of seen inputs in memory (exact: the
    /// encoders are frozen and the posterior is still sampled every step).
    pub cache_encodings: bool,
    /// SHA-256 of the resolved pipeline, recorded in checkpoints.
    pub pipeline_sha256: Option<String>,
    /// The train stage's fingerprint, recorded in checkpoints (which resume without a lock when
    /// it is the pipeline's).
    pub train_fingerprint: Option<String>,
    /// Batches of the fixed-noise evaluation loss measured before and after training (0: off).
    pub eval_batches: usize,
    /// With a held-out source ([`Trainer::heldout`]): measure its loss every N updates too (else
    /// before the first and after the last only).
    pub heldout_every_steps: Option<usize>,
    /// Write TensorBoard scalars (train_loss, lr, grad_norm) to an event file in this folder.
    pub tensorboard_dir: Option<PathBuf>,
    /// `train.precision`. The models come in already cast to its weight dtype; this decides the
    /// rounding of latents and noise and, for fp16, dynamic loss scaling.
    pub precision: MixedPrecision,
    /// The fp16 loss scaler's settings (unused for other precisions).
    pub grad_scaler: GradScalerConfig,
    /// Recompute the UNet's resnets and transformers in the backward pass (`nn::checkpoint`).
    pub gradient_checkpointing: bool,
}

/// One micro-batch from the data stage.
pub struct TrainBatch {
    /// `[B, 3, R, R]` f32 in [-1, 1].
    pub pixel_values: Tensor,
    pub captions: Vec<String>,
    /// Each image's original size and crop offset (SDXL's time ids; may be empty for models
    /// without them).
    pub geometry: Vec<crate::data::Geometry>,
}

/// The data stage as the loop sees it: a seeded order per epoch, and the ability to start an
/// epoch at a given batch (for exact resume without decoding skipped images).
pub trait BatchSource {
    fn num_examples(&self) -> usize;
    /// Batches in one epoch (`ceil(examples / batch_size)`, or per aspect-ratio bucket).
    fn batches_per_epoch(&self, batch_size: usize) -> usize {
        self.num_examples().div_ceil(batch_size.max(1))
    }
    fn batches<'a>(&'a self, epoch: usize, start_batch: usize) -> Box<dyn Iterator<Item = Result<TrainBatch>> + 'a>;
}

/// What happened, for the summary.
#[derive(Clone, Debug)]
pub struct TrainOutcome {
    pub global_step: usize,
    pub max_train_steps: usize,
    pub(crate) final_loss: Option<f64>,
    pub(crate) first_loss: Option<f64>,
    /// Mean loss over the evaluation batches with fixed noise, before and after training
    /// (a noise-free measure of progress; single-step losses vary with the drawn timesteps).
    pub eval_loss_before: Option<f64>,
    pub eval_loss_after: Option<f64>,
    /// The held-out loss before and after training (`validation.loss_split`).
    pub heldout_loss: (Option<f64>, Option<f64>),
    pub seconds: f64,
    pub interrupted: bool,
    pub resumed_from: Option<PathBuf>,
    pub checkpoints: Vec<PathBuf>,
    /// Updates whose optimizer step was skipped because fp16 gradients overflowed.
    pub skipped_steps: usize,
    /// The fp16 loss scale at the end (`None` without loss scaling).
    pub loss_scale: Option<f64>,
}

/// Callback per update: `(global_step, max_steps, loss, lr)`.
pub(crate) type ProgressFn<'a> = dyn FnMut(usize, usize, f64, f64) + 'a;

pub struct Trainer<'a> {
    pub sd: &'a StableDiffusion,
    pub ddpm: Ddpm,
    pub params: Vec<NamedVar>,
    pub optimizer: AdamW,
    pub settings: TrainSettings,
    pub stop: Arc<AtomicBool>,
    /// The on-disk encode cache serving VAE latent distributions (only when every variant of an
    /// image is one exact input: no random crop) and, separately, text-encoder outputs (only when
    /// the text encoder is frozen). When every row is served, the VAE / text encoder are not
    /// called at all: the hook for keeping them off the device during training.
    pub(crate) latent_cache_disk: Option<Arc<crate::data::cache::EncodeCache>>,
    pub(crate) text_cache_disk: Option<Arc<crate::data::cache::EncodeCache>>,
    device: Device,
    text_cache: HashMap<String, Conditioning>,
    /// The held-out examples (`validation.loss_split`), never trained on: their loss with fixed
    /// draws is measured before, every `heldout_every_steps` and after training.
    pub heldout: Option<Box<dyn BatchSource + 'a>>,
    /// Parameters that are off the path to the loss by construction (SDXL: the first text
    /// encoder's last layer, whose output the model never reads): they get no gradient and
    /// AdamW leaves them as they are, as torch does for a `.grad` of None.
    pub unused_params: std::collections::HashSet<String>,
    latent_cache: HashMap<u64, (Tensor, Tensor)>,
    /// With gradient checkpointing: the accumulator of the last micro-step's forward, merged
    /// into its backward's gradients (a fresh one per micro-step).
    checkpoint: Option<CheckpointGrads>,
    /// The job's collectives when several processes train together (`crate::dist`): each takes
    /// its share of the batches, gradients are averaged before every update, and only rank 0
    /// writes (metrics, TensorBoard, checkpoints) and evaluates.
    pub comm: Option<Arc<crate::dist::Comm>>,
}

/// One held-out point: a `metrics.jsonl` line `{"step": N, "val_loss": x}` and the `val_loss` scalar.
fn record_heldout(metrics: &mut std::fs::File, tensorboard: Option<&mut crate::report::tensorboard::EventWriter>, step: u64, loss: f64) -> Result<()> {
    writeln!(metrics, "{}", serde_json::json!({"step": step, "val_loss": loss}))?;
    if let Some(tb) = tensorboard {
        tb.scalars(step, &[("val_loss", loss)])?;
    }
    Ok(())
}

/// One evaluation point: a `metrics.jsonl` line and the `eval_loss` scalar.
fn record_eval(metrics: &mut std::fs::File, tensorboard: Option<&mut crate::report::tensorboard::EventWriter>, step: u64, eval_loss: f64) -> Result<()> {
    writeln!(metrics, "{}", serde_json::json!({"step": step, "eval_loss": eval_loss}))?;
    if let Some(tb) = tensorboard {
        tb.scalars(step, &[("eval_loss", eval_loss)])?;
    }
    Ok(())
}

/// sha256 (hex, first 16 digits) of every parameter's f32 bytes, in order.
fn weights_digest(params: &[NamedVar]) -> Result<String> {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    for p in params {
        for v in p.var.as_tensor().flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()? {
            h.update(v.to_le_bytes());
        }
    }
    Ok(h.finalize().iter().take(8).map(|b| format!("{b:02x}")).collect())
}

/// The batches of one rank out of `size`: batch `j` of its epoch is the inner source's batch
/// `j·size + rank`, the tail padded from the epoch's start, so that every rank runs
/// `ceil(batches / size)` batches (as accelerate's `even_batches`).
struct Sharded<'a> {
    inner: &'a dyn BatchSource,
    rank: usize,
    size: usize,
    batch_size: usize,
}

impl BatchSource for Sharded<'_> {
    fn num_examples(&self) -> usize {
        self.inner.num_examples()
    }
    fn batches_per_epoch(&self, batch_size: usize) -> usize {
        self.inner.batches_per_epoch(batch_size).div_ceil(self.size)
    }
    fn batches<'b>(&'b self, epoch: usize, start_batch: usize) -> Box<dyn Iterator<Item = Result<TrainBatch>> + 'b> {
        let total = self.inner.batches_per_epoch(self.batch_size);
        let per = total.div_ceil(self.size);
        Box::new((start_batch..per).map(move |j| {
            let g = (j * self.size + self.rank) % total;
            self.inner.batches(epoch, g).next().unwrap_or_else(|| Err(anyhow::anyhow!("batch {g} of epoch {epoch} is missing")))
        }))
    }
}

fn pixel_key(t: &Tensor) -> Result<u64> {
    let v = t.flatten_all()?.to_vec1::<f32>()?;
    let mut h = std::collections::hash_map::DefaultHasher::new();
    v.len().hash(&mut h);
    for x in v {
        x.to_bits().hash(&mut h);
    }
    Ok(h.finish())
}

impl<'a> Trainer<'a> {
    pub fn new(sd: &'a StableDiffusion, params: Vec<NamedVar>, settings: TrainSettings) -> Result<Self> {
        let ddpm = Ddpm::from_config(&sd.scheduler)?;
        let vars = params.iter().map(|p| p.var.clone()).collect();
        let names = params.iter().map(|p| p.name.clone()).collect();
        let optimizer = AdamW::new_named(vars, names, settings.adamw.clone())?;
        let device = params.first().map(|p| p.var.device().clone()).unwrap_or(Device::Cpu);
        Ok(Self {
            sd,
            ddpm,
            params,
            optimizer,
            settings,
            stop: Arc::new(AtomicBool::new(false)),
            latent_cache_disk: None,
            text_cache_disk: None,
            device,
            text_cache: HashMap::new(),
            unused_params: Default::default(),
            heldout: None,
            latent_cache: HashMap::new(),
            checkpoint: None,
            comm: None,
        })
    }

    /// The text conditioning (context `[B, 77, D]`, SDXL's pooled embedding) for `captions`.
    fn encode_text(&mut self, captions: &[String]) -> Result<Conditioning> {
        if !self.settings.cache_encodings {
            // The text encoder may carry trained LoRA branches: keep the graph.
            let refs: Vec<&str> = captions.iter().map(String::as_str).collect();
            return self.sd.text_embeddings(&refs, &self.device);
        }
        let missing: Vec<&str> = captions
            .iter()
            .filter(|c| !self.text_cache.contains_key(c.as_str()))
            .map(|c| c.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let missing: Vec<&str> = match self.text_cache_disk.clone() {
            None => missing,
            Some(disk) => {
                let mut still = Vec::new();
                for c in missing {
                    match disk.get(&disk.text_key(c), &self.device)?.and_then(Conditioning::from_text_parts) {
                        Some(row) => {
                            self.text_cache.insert(c.to_string(), row);
                        }
                        None => still.push(c),
                    }
                }
                still
            }
        };
        if !missing.is_empty() {
            let encoded = self.sd.text_embeddings(&missing, &self.device)?.detach();
            for (i, c) in missing.iter().enumerate() {
                let row = encoded.get(i)?;
                // Only rank 0 writes the shared cache (it filled it before training).
                if let Some(disk) = self.text_cache_disk.as_ref().filter(|_| self.comm.as_ref().is_none_or(|c| c.is_main())) {
                    disk.put(&disk.text_key(c), &row.text_parts())?;
                }
                self.text_cache.insert(c.to_string(), row);
            }
        }
        let rows = captions.iter().map(|c| self.text_cache[c.as_str()].clone()).collect::<Vec<_>>();
        Ok(Conditioning::stack(&rows)?)
    }

    /// SDXL's `[B, 6]` time ids of a batch: each image's original size, crop top-left and the
    /// target size (the training resolution), as the SDXL script's `compute_time_ids`.
    fn time_ids(&self, batch: &TrainBatch) -> Result<Tensor> {
        let (b, _, h, w) = batch.pixel_values.dims4()?;
        anyhow::ensure!(batch.geometry.len() == b, "the batch has {} image geometries for {b} images (SDXL needs each image's size and crop)", batch.geometry.len());
        let ids: Vec<f32> = batch
            .geometry
            .iter()
            .flat_map(|g| {
                let (oh, ow) = g.original;
                let (top, left) = g.crop_top_left;
                time_ids((oh as usize, ow as usize), (top as usize, left as usize), (h, w))
            })
            .collect();
        Ok(Tensor::from_vec(ids, (b, 6), &self.device)?)
    }

    /// Mean and std of the VAE posterior for each image of the batch.
    fn encode_pixels(&mut self, pixel_values: &Tensor) -> Result<(Tensor, Tensor)> {
        let b = pixel_values.dim(0)?;
        if let Some(disk) = self.latent_cache_disk.clone() {
            return self.encode_pixels_disk(&disk, pixel_values);
        }
        if !self.settings.cache_encodings {
            return self.vae_encode_rows(&pixel_values.to_device(&self.device)?);
        }
        let keys = (0..b).map(|i| pixel_key(&pixel_values.get(i)?)).collect::<Result<Vec<_>>>()?;
        let missing: Vec<usize> = (0..b).filter(|&i| !self.latent_cache.contains_key(&keys[i])).collect();
        if !missing.is_empty() {
            let idx = Tensor::from_vec(missing.iter().map(|&i| i as u32).collect::<Vec<_>>(), missing.len(), pixel_values.device())?;
            let px = pixel_values.index_select(&idx, 0)?.to_device(&self.device)?;
            let (mean, std) = self.vae_encode_rows(&px)?;
            for (j, &i) in missing.iter().enumerate() {
                self.latent_cache.insert(keys[i], (mean.get(j)?, std.get(j)?));
            }
        }
        let means = keys.iter().map(|k| self.latent_cache[k].0.clone()).collect::<Vec<_>>();
        let stds = keys.iter().map(|k| self.latent_cache[k].1.clone()).collect::<Vec<_>>();
        Ok((Tensor::stack(&means, 0)?, Tensor::stack(&stds, 0)?))
    }

    /// Mean and std of the VAE posterior, one image at a time: the VAE's convolutions are not
    /// batch-invariant (about 1e-6 apart on the CPU), and a latent must not depend on which
    /// images share its batch, so cached (encoded alone) and uncached runs agree bit for bit.
    pub(crate) fn vae_encode_rows(&self, px: &Tensor) -> Result<(Tensor, Tensor)> {
        let mut means = Vec::with_capacity(px.dim(0)?);
        let mut stds = Vec::with_capacity(px.dim(0)?);
        // The VAE encoder may be parked on the CPU (the encode cache serves the run).
        let vae_device = self.sd.vae_encoder_device();
        for i in 0..px.dim(0)? {
            let dist = self.sd.vae.encode(&px.narrow(0, i, 1)?.to_device(&vae_device)?.to_dtype(self.sd.vae.dtype())?)?;
            means.push(dist.mean.detach().to_dtype(DType::F32)?.to_device(&self.device)?);
            stds.push(dist.std()?.detach().to_dtype(DType::F32)?.to_device(&self.device)?);
        }
        Ok((Tensor::cat(&means, 0)?, Tensor::cat(&stds, 0)?))
    }

    /// [`Self::encode_pixels`] through the disk cache: rows it holds are read, the others encoded
    /// together and stored.
    fn encode_pixels_disk(&mut self, disk: &crate::data::cache::EncodeCache, pixel_values: &Tensor) -> Result<(Tensor, Tensor)> {
        let b = pixel_values.dim(0)?;
        let mut rows: Vec<Option<(Tensor, Tensor)>> = Vec::with_capacity(b);
        let mut keys = Vec::with_capacity(b);
        for i in 0..b {
            let key = disk.latent_key(&pixel_values.get(i)?)?;
            rows.push(match disk.get(&key, &self.device)? {
                Some(t) if t.len() == 2 => Some((t[0].clone(), t[1].clone())),
                _ => None,
            });
            keys.push(key);
        }
        let missing: Vec<usize> = (0..b).filter(|&i| rows[i].is_none()).collect();
        if !missing.is_empty() {
            let idx = Tensor::from_vec(missing.iter().map(|&i| i as u32).collect::<Vec<_>>(), missing.len(), pixel_values.device())?;
            let px = pixel_values.index_select(&idx, 0)?.to_device(&self.device)?;
            let (mean, std) = self.vae_encode_rows(&px)?;
            for (j, &i) in missing.iter().enumerate() {
                let (m, s) = (mean.get(j)?, std.get(j)?);
                if self.comm.as_ref().is_none_or(|c| c.is_main()) {
                    disk.put(&keys[i], &[&m, &s])?;
                }
                rows[i] = Some((m, s));
            }
        }
        let (means, stds): (Vec<Tensor>, Vec<Tensor>) = rows.into_iter().map(|r| r.expect("every row filled")).unzip();
        Ok((Tensor::stack(&means, 0)?, Tensor::stack(&stds, 0)?))
    }

    /// Loss of one micro-batch (not yet divided by the accumulation steps).
    /// The draws are per example ([`NoiseDraw::draw_per_example`]): this rank's examples sit at
    /// global batch positions `rank · batch_size + i`.
    pub(crate) fn micro_step_loss(&mut self, batch: &TrainBatch, stream: DrawStream) -> Result<Tensor> {
        let (mean, std) = self.encode_pixels(&batch.pixel_values)?;
        let mut text = self.encode_text(&batch.captions)?;
        if self.sd.unet.config().addition.is_some() {
            text = text.with_time_ids(self.time_ids(batch)?);
        }
        let rank = self.comm.as_ref().map_or(0, |c| c.rank());
        let draw = NoiseDraw::draw_per_example(
            stream,
            self.settings.seed,
            (rank * self.settings.batch_size) as u64,
            mean.dims(),
            self.ddpm.num_train_timesteps,
            self.settings.loss.noise_offset,
            &self.device,
        )?;
        let (mean, std) = (mean.to_dtype(DType::F32)?, std.to_dtype(DType::F32)?);
        let latents = ((mean + std.mul(&draw.posterior)?)? * self.sd.vae.scaling_factor())?;
        // The reference's latents and noise (`randn_like(latents)`) are in the weight dtype.
        let wd = self.sd.unet.dtype();
        let (latents, noise) = (round_through(&latents, wd)?, round_through(&draw.noise, wd)?);
        self.checkpoint = self.settings.gradient_checkpointing.then(CheckpointGrads::new);
        let (unet, loss_opts) = (&self.sd.unet, &self.settings.loss);
        let loss = denoising_loss_checkpointed(unet, &self.ddpm, &latents, &noise, &draw.timesteps, &text, loss_opts, self.checkpoint.as_ref())?;
        Ok(loss)
    }

    /// Mean loss over the first `batches` batches of epoch 0 with fixed random draws (the same
    /// every call), without gradients: comparable before and after training.
    pub fn eval_loss(&mut self, source: &dyn BatchSource, batches: usize) -> Result<Option<f64>> {
        if batches == 0 {
            return Ok(None);
        }
        let mut total = 0.0;
        let mut n = 0usize;
        for (i, batch) in source.batches(0, 0).take(batches).enumerate() {
            let batch = batch?;
            // Streams of their own, the same every evaluation.
            let loss = self.micro_step_loss(&batch, DrawStream::Eval { batch: i as u64 })?.detach();
            total += loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            n += 1;
        }
        Ok((n > 0).then(|| total / n as f64))
    }

    /// The mean loss over every held-out batch with fixed draws (`None` without a held-out source).
    fn heldout_loss(&mut self) -> Result<Option<f64>> {
        let Some(source) = self.heldout.take() else { return Ok(None) };
        let batches = source.num_examples().div_ceil(self.settings.batch_size.max(1));
        let loss = self.eval_loss(source.as_ref(), batches);
        self.heldout = Some(source);
        loss
    }

    /// Run the whole loop over `source`.
    pub fn train(&mut self, source: &dyn BatchSource, mut progress: Option<&mut ProgressFn<'_>>) -> Result<TrainOutcome> {
        let s = self.settings.clone();
        anyhow::ensure!(source.num_examples() > 0, "the dataset is empty: nothing to train on");
        anyhow::ensure!(s.batch_size > 0, "batch size must be at least 1");
        let comm = self.comm.clone();
        let main = comm.as_ref().is_none_or(|c| c.is_main());
        let world = comm.as_ref().map_or(1, |c| c.size());
        let sharded = comm.as_ref().map(|c| Sharded { inner: source, rank: c.rank(), size: c.size(), batch_size: s.batch_size });
        // Evaluations (rank 0 only) read the whole source; training reads this rank's share.
        let eval_source = source;
        let source: &dyn BatchSource = match &sharded {
            Some(sh) => sh,
            None => source,
        };
        let plan = StepPlan::from_batches(source.batches_per_epoch(s.batch_size), s.gradient_accumulation_steps, s.num_epochs, s.max_train_steps)?;
        let base_lr = if s.scale_lr { scale_lr(s.learning_rate, s.gradient_accumulation_steps, s.batch_size, world) } else { s.learning_rate };


        let mut state = TrainerState {
            global_step: 0,
            micro_steps: 0,
            pipeline_sha256: s.pipeline_sha256.clone(),
            train_fingerprint: s.train_fingerprint.clone(),
            last_loss: None,
            skipped_steps: 0,
            grad_scaler: None,
        };
        let mut scaler = s.precision.uses_loss_scaling().then(|| GradScaler::new(s.grad_scaler));
        let mut resumed_from = None;
        let loaded = match s.resume_from_checkpoint.as_deref() {
            // Another rank loads exactly the checkpoint rank 0 loaded (told below).
            _ if !main => None,
            // The newest checkpoint that loads (a damaged one is reported and the previous used).
            Some("latest") => {
                let found = checkpoint::load_newest_loadable(&s.output_dir, &self.params, &mut self.optimizer)?;
                if found.is_none() {
                    tracing::info!("no checkpoint in {} loads: training starts from step 0", crate::util::path::tidy_path(&s.output_dir).display());
                }
                found
            }
            Some(resume) => match checkpoint::resolve_resume(&s.output_dir, resume)? {
                Some(dir) => {
                    let st = checkpoint::load_checkpoint(&dir, &self.params, &mut self.optimizer)?;
                    Some((dir, st))
                }
                None => None,
            },
            None => None,
        };
        // Every rank starts from rank 0's checkpoint (or none).
        let loaded = match &comm {
            None => loaded,
            Some(c) => {
                let path: Option<String> = c.broadcast_json(Some(&loaded.as_ref().map(|(d, _)| d.display().to_string())))?;
                match (loaded, path) {
                    (Some(l), _) => Some(l),
                    (None, Some(p)) => {
                        let dir = PathBuf::from(p);
                        let st = checkpoint::load_checkpoint(&dir, &self.params, &mut self.optimizer)
                            .with_context(|| format!("rank {} loading rank 0's checkpoint {} (the ranks must share the output folder)", c.rank(), dir.display()))?;
                        Some((dir, st))
                    }
                    (None, None) => None,
                }
            }
        };
        if let Some((dir, st)) = loaded {
            tracing::info!("resumed from {} at step {}", crate::util::path::tidy_path(&dir).display(), st.global_step);
            state = st;
            if let (Some(scaler), Some(saved)) = (scaler.as_mut(), state.grad_scaler) {
                scaler.restore(saved);
            }
            resumed_from = Some(dir);
        }
        if state.global_step > plan.max_train_steps {
            let dir = resumed_from.as_deref().map(|d| crate::util::path::tidy_path(d).display().to_string()).unwrap_or_default();
            return Err(checkpoint::PastTheEnd(format!(
                "{dir} is at step {}, past the {} steps this pipeline trains: raise train.max_steps (or train.epochs) to continue it, or run with --force to start over (its checkpoints are set aside, not deleted)",
                state.global_step, plan.max_train_steps
            ))
            .into());
        }

        // Logs hold every step once after any number of resumes: drop what a stopped or killed
        // run logged past the step resumed from (and everything, on a fresh start).
        // Only rank 0 writes (logs, checkpoints).
        if main {
            std::fs::create_dir_all(&s.output_dir).with_context(|| format!("creating output directory {}", s.output_dir.display()))?;
        }
        let metrics_path = s.output_dir.join("metrics.jsonl");
        let mut metrics = if main {
            crate::report::metrics::keep_steps_up_to(&metrics_path, state.global_step)?;
            if let Some(dir) = &s.tensorboard_dir {
                crate::report::tensorboard::keep_steps_up_to(dir, state.global_step as u64)?;
            }
            Some(std::fs::OpenOptions::new().create(true).append(true).open(&metrics_path).with_context(|| format!("opening {}", metrics_path.display()))?)
        } else {
            None
        };
        let mut tensorboard = match &s.tensorboard_dir {
            Some(dir) if main => Some(crate::report::tensorboard::EventWriter::create(dir)?),
            _ => None,
        };
        let started = Instant::now();
        let mut outcome = TrainOutcome {
            global_step: state.global_step,
            max_train_steps: plan.max_train_steps,
            final_loss: state.last_loss,
            first_loss: None,
            eval_loss_before: None,
            eval_loss_after: None,
            heldout_loss: (None, None),
            seconds: 0.0,
            interrupted: false,
            resumed_from,
            checkpoints: Vec::new(),
            skipped_steps: state.skipped_steps,
            loss_scale: scaler.as_ref().map(GradScaler::scale),
        };
        if state.global_step >= plan.max_train_steps {
            tracing::info!("already at step {} of {}: nothing to train", state.global_step, plan.max_train_steps);
            return Ok(outcome);
        }

        if let (Some(m), 0) = (metrics.as_mut(), state.global_step) {
            if let Some(loss) = self.heldout_loss()? {
                outcome.heldout_loss.0 = Some(loss);
                record_heldout(m, tensorboard.as_mut(), 0, loss)?;
            }
            if s.eval_batches > 0 {
                outcome.eval_loss_before = self.eval_loss(eval_source, s.eval_batches)?;
                if let Some(e) = outcome.eval_loss_before {
                    record_eval(m, tensorboard.as_mut(), 0, e)?;
                }
            }
        }
        let digests = std::env::var_os("LORA_DIST_DIGEST").is_some_and(|v| v == "1");
        let mut acc: Option<Vec<Tensor>> = None;
        let mut acc_loss = 0f64;
        // fp16: a micro-step of this accumulation window had a non-finite loss (its gradients
        // would be inf/NaN, so the update is skipped without running that backward).
        let mut window_overflow = false;
        let first_epoch = state.micro_steps / plan.batches_per_epoch;
        'epochs: for epoch in first_epoch..plan.num_epochs {
            let start_batch = if epoch == first_epoch { state.micro_steps % plan.batches_per_epoch } else { 0 };
            for (offset, batch) in source.batches(epoch, start_batch).enumerate() {
                let batch = batch?;
                let batch_in_epoch = start_batch + offset;
                let micro_index = epoch * plan.batches_per_epoch + batch_in_epoch;
                let forward = crate::util::profile::scope("step.forward");
                let loss = self.micro_step_loss(&batch, DrawStream::Train { micro: micro_index as u64 })?;
                drop(forward);
                let loss_value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                if !loss_value.is_finite() && scaler.is_none() {
                    bail!(
                        "the loss became {loss_value} at step {} (micro-batch {micro_index}); lower the learning rate or use precision \"no\"",
                        state.global_step + 1
                    );
                }
                if loss_value.is_finite() {
                    // accelerate's `backward`: loss / GA, times the fp16 loss scale.
                    let mut scaled = (loss / s.gradient_accumulation_steps as f64)?;
                    if let Some(scaler) = &scaler {
                        scaled = (scaled * scaler.scale())?;
                    }
                    let backward = crate::util::profile::scope("step.backward");
                    let mut grads = scaled.backward()?;
                    drop(backward);
                    if let Some(ckpt) = self.checkpoint.take() {
                        ckpt.merge_into(&mut grads)?;
                    }
                    let mut step_grads = Vec::with_capacity(self.params.len());
                    for p in &self.params {
                        match grads.get(p.var.as_tensor()) {
                            Some(g) => step_grads.push(g.to_dtype(DType::F32)?),
                            // Off the path to the loss by construction (SDXL's first encoder's
                            // last layer): a zero that clipping ignores; AdamW skips it below.
                            None if self.unused_params.contains(&p.name) => step_grads.push(p.var.as_tensor().zeros_like()?.to_dtype(DType::F32)?),
                            None => bail!("LoRA parameter `{}` received no gradient: the path from it to the loss is broken", p.name),
                        }
                    }
                    drop(grads);
                    acc = Some(match acc.take() {
                        None => step_grads,
                        Some(prev) => prev.iter().zip(&step_grads).map(|(a, b)| a + b).collect::<candle_core::Result<Vec<_>>>()?,
                    });
                } else {
                    window_overflow = true;
                }
                acc_loss += loss_value / s.gradient_accumulation_steps as f64;
                state.micro_steps = micro_index + 1;

                if !plan.is_update_batch(batch_in_epoch, s.gradient_accumulation_steps) {
                    continue;
                }
                let mut g = acc.take();
                let mut overflow = std::mem::take(&mut window_overflow);
                // Several ranks: average the gradients (DDP's all-reduce, before unscaling and
                // clipping), the logged loss, and agree on an overflow and on a stop.
                let mut stop_now = self.stop.load(Ordering::SeqCst);
                if let Some(c) = &comm {
                    let grads = match g.take() {
                        Some(g) => g,
                        None => self.params.iter().map(|p| p.var.as_tensor().zeros_like()?.to_dtype(DType::F32)).collect::<candle_core::Result<Vec<_>>>()?,
                    };
                    let mut flat: Vec<f32> = Vec::with_capacity(grads.iter().map(Tensor::elem_count).sum::<usize>() + 3);
                    for t in &grads {
                        flat.extend(t.flatten_all()?.to_vec1::<f32>()?);
                    }
                    flat.extend([acc_loss as f32, f32::from(u8::from(overflow)), f32::from(u8::from(stop_now))]);
                    let _p = crate::util::profile::scope("step.all_reduce");
                    c.all_reduce_mean(&mut flat)?;
                    let n = flat.len();
                    acc_loss = flat[n - 3] as f64;
                    overflow = flat[n - 2] > 0.0;
                    stop_now = flat[n - 1] > 0.0;
                    let mut at = 0;
                    let mut averaged = Vec::with_capacity(grads.len());
                    for t in &grads {
                        let k = t.elem_count();
                        averaged.push(Tensor::from_slice(&flat[at..at + k], t.dims(), t.device())?);
                        at += k;
                    }
                    g = Some(averaged);
                }
                // GradScaler: unscale (before clipping, as accelerate's clip_grad_norm_ does), and
                // skip the optimizer step when any gradient is inf/NaN.
                let found_inf = match (&scaler, g.as_mut()) {
                    (Some(scaler), Some(g)) => scaler.unscale(g)? || overflow,
                    _ => overflow,
                };
                let _norm = match (g.as_mut(), s.max_grad_norm) {
                    (Some(g), _) if found_inf => global_grad_norm(g)?,
                    (Some(g), Some(max)) => clip_grad_norm(g, max)?,
                    (Some(g), None) => global_grad_norm(g)?,
                    (None, _) => f64::NAN,
                };
                // The lr schedule advances only on steps the optimizer took (accelerate's
                // `AcceleratedScheduler.step` returns early when `optimizer.step_was_skipped`).
                let lr = lr_at(&s.lr_schedule, base_lr, state.global_step - state.skipped_steps, s.lr_warmup_steps, plan.max_train_steps);
                let loss_scale = scaler.as_ref().map(GradScaler::scale);
                if found_inf {
                    state.skipped_steps += 1;
                    tracing::warn!(
                        "step {}: fp16 gradients overflowed (inf/NaN) at loss scale {}; optimizer step skipped, scale halved",
                        state.global_step + 1,
                        loss_scale.unwrap_or(1.0)
                    );
                } else {
                    let _p = crate::util::profile::scope("step.optimizer");
                    let grads = g.as_deref().expect("a finite window has gradients");
                    // torch's AdamW skips a parameter whose `.grad` is None (no weight decay either).
                    let some: Vec<Option<&Tensor>> =
                        grads.iter().zip(&self.params).map(|(g, p)| (!self.unused_params.contains(&p.name)).then_some(g)).collect();
                    self.optimizer.step_some(&some, lr)?;
                }
                if let Some(scaler) = scaler.as_mut() {
                    scaler.update(found_inf);
                    if scaler.scale() == 0.0 {
                        bail!(
                            "fp16 loss scaling: the scale fell to 0 after {} skipped steps (every step overflowed); use precision \"bf16\" or \"no\"",
                            state.skipped_steps
                        );
                    }
                    state.grad_scaler = Some(scaler.state());
                }
                outcome.skipped_steps = state.skipped_steps;
                outcome.loss_scale = scaler.as_ref().map(GradScaler::scale);
                state.global_step += 1;
                if digests {
                    // `LORA_DIST_DIGEST=1`: every rank logs a digest of its weights after every
                    // update (the multi-process tests compare the ranks').
                    tracing::info!("weights digest: rank {} step {} {}", comm.as_ref().map_or(0, |c| c.rank()), state.global_step, weights_digest(&self.params)?);
                }
                state.last_loss = Some(acc_loss);
                outcome.first_loss.get_or_insert(acc_loss);
                outcome.final_loss = Some(acc_loss);
                let mut line = serde_json::json!({"step": state.global_step, "epoch": epoch, "loss": acc_loss, "lr": lr, "grad_norm": _norm});
                if let Some(scale) = loss_scale {
                    // The scale this step's backward used, whether its update was skipped, and
                    // the skipped updates so far.
                    line["loss_scale"] = scale.into();
                    line["skipped"] = found_inf.into();
                    line["skipped_steps"] = state.skipped_steps.into();
                }
                // Prodigy's step-size estimate: the effective learning rate is d · lr.
                let prodigy_d = self.optimizer.prodigy_d();
                if let Some(d) = prodigy_d {
                    line["prodigy_d"] = d.into();
                }
                if let Some(m) = metrics.as_mut() {
                    writeln!(m, "{line}")?;
                }
                if let Some(tb) = tensorboard.as_mut() {
                    let mut scalars = vec![("train_loss", acc_loss), ("lr", lr), ("grad_norm", _norm)];
                    if let Some(scale) = loss_scale {
                        scalars.push(("loss_scale", scale));
                    }
                    if let Some(d) = prodigy_d {
                        scalars.push(("prodigy_d", d));
                    }
                    tb.scalars(state.global_step as u64, &scalars)?;
                }
                if let Some(cb) = progress.as_deref_mut() {
                    cb(state.global_step, plan.max_train_steps, acc_loss, lr);
                }
                acc_loss = 0.0;
                let last = state.global_step >= plan.max_train_steps;
                if let Some(m) = metrics.as_mut().filter(|_| s.heldout_every_steps.is_some_and(|n| n > 0 && state.global_step % n == 0) || last) {
                    if let Some(loss) = self.heldout_loss()? {
                        outcome.heldout_loss.1 = Some(loss);
                        record_heldout(m, tensorboard.as_mut(), state.global_step as u64, loss)?;
                    }
                }

                let done = state.global_step >= plan.max_train_steps;
                let interrupted = stop_now;
                let due = s.checkpointing_steps.is_some_and(|n| n > 0 && state.global_step % n == 0);
                if main && (due || (interrupted && !done)) {
                    let dir = checkpoint::save_checkpoint(&s.output_dir, &self.params, &self.optimizer, &state, s.checkpoints_total_limit)?;
                    tracing::info!("saved {}", crate::util::path::tidy_path(&dir).display());
                    outcome.checkpoints.push(dir);
                }
                if done {
                    break 'epochs;
                }
                if interrupted {
                    outcome.interrupted = true;
                    break 'epochs;
                }
            }
        }
        outcome.global_step = state.global_step;
        // After the last update (a resumed run too: the run's first evaluation is in the metrics).
        if let Some(m) = metrics.as_mut().filter(|_| s.eval_batches > 0 && !outcome.interrupted && state.global_step > 0) {
            outcome.eval_loss_after = self.eval_loss(eval_source, s.eval_batches)?;
            if let Some(e) = outcome.eval_loss_after {
                record_eval(m, tensorboard.as_mut(), state.global_step as u64, e)?;
            }
        }
        outcome.seconds = started.elapsed().as_secs_f64();
        Ok(outcome)
    }
}
