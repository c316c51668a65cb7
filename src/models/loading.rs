//! Model sources: a local diffusers folder or a hub id resolved through the HF cache
//! (`HF_HOME` / `HF_HUB_CACHE`), weight variants, sharded weights, and the refusal of pickles.
//!
//! - [`resolve_model_dir`] turns a source into a local folder (downloading with `hf-hub` when
//!   needed, see [`hub`]).
//! - [`locate_model_files`] finds every file the pipeline reads in that folder
//!   ([`ModelFiles`]): configs, tokenizer files, and the chosen weight files per component.
//! - [`super::weights::ComponentWeights`] is the checking `VarBuilder` backend the networks load from.
//! - [`StableDiffusion::load`] does all of it and builds the networks.

pub mod hub;

use crate::hub_id::{is_hub_file, is_hub_id};
use crate::models::offload;
use super::single_file::bundled::tokenizer_and_scheduler;
use super::single_file::header::Header;
use super::single_file::recognition::{recognise, Recognition, SingleFileOptions};
use super::single_file::weights::{open_vae_file, open_weights, SingleFileWeights};

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Device};

use super::config::{ClipTextConfig, UNetConfig, VaeConfig};
use super::text::{ContextRule, TextPair, TextSide};
use super::{AutoencoderKL, ClipTextModel, ClipTokenizer, Conditioning, UNet2DConditionModel};
use crate::vocab::Family;
use crate::schedulers::SchedulerConfig;
use crate::util::fs::read_text;
use crate::vocab;
pub use hub::HubSettings;
pub use super::weights::{ComponentWeights, VariantPolicy, WeightChoice, WeightOptions};

#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// Hub revision (branch, tag or commit); `None` is `main`.
    pub revision: Option<String>,
    /// Weight variant, e.g. `fp16` → `diffusion_pytorch_model.fp16.safetensors`.
    pub variant: Option<String>,
    /// A separate VAE `.safetensors` file (diffusers or LDM layout) used instead of the model's.
    pub vae: Option<PathBuf>,
    /// Single files: a diffusers folder whose configs, tokenizer and scheduler are used instead
    /// of the recognised and bundled ones.
    pub config: Option<PathBuf>,
    /// Single files: overrides what the file says or implies.
    pub prediction_type: Option<crate::vocab::PredictionType>,
    /// Single files: read the UNet's EMA copy (`model_ema.*`).
    pub ema: bool,
    /// Keep a record of the text encoder's and the VAE's tensors so that they can be parked in
    /// host memory (`StableDiffusion::park_encoders`). Off by default: on the CPU the record
    /// would keep each linear weight alive beside the transposed copy the CPU GEMM reads.
    pub movable_encoders: bool,
}

impl LoadOptions {
    /// The options a pipeline's `[model]` table gives.
    pub fn from_config(m: &crate::config::ModelConfig) -> Self {
        Self {
            revision: m.revision.clone(),
            variant: m.variant.clone(),
            vae: m.vae.clone(),
            config: m.config.clone(),
            prediction_type: m.prediction_type,
            ema: m.ema,
            movable_encoders: false,
        }
    }
}

/// A loaded pipeline: every component a trainer or sampler needs.
pub struct StableDiffusion {
    /// The local folder the weights were read from.
    pub root: PathBuf,
    /// SD 1.x, 2.x or XL, decided once here (see [`super::family::family_of`]).
    pub family: Family,
    /// The (tokenizer, text encoder) pairs and the rule that makes the conditioning.
    pub text: TextSide,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub scheduler: SchedulerConfig,
    /// What a single-file checkpoint was recognised as; `None` for a diffusers folder.
    pub single_file: Option<Recognition>,
    /// `model_index.json`'s `force_zeros_for_empty_prompt` (SDXL pipelines: an absent negative
    /// prompt is all zeros, context and pooled, not the encoding of "").
    pub force_zeros_for_empty_prompt: bool,
    /// The frozen encoders' tensors by name, to move them off the training device and back.
    parking: Parking,
}

/// The tensors the text encoder and the VAE were built from (on the device each is on now), and
/// which of them are parked in host memory.
#[derive(Default)]
struct Parking {
    /// One record per text encoder.
    text_encoders: Vec<offload::Tensors>,
    vae: offload::Tensors,
    /// The text encoder, the VAE encoder: on the CPU while the encode cache serves them.
    text_parked: bool,
    vae_encoder_parked: bool,
}

/// The VAE's tensors that only encoding uses (its encoder half and `quant_conv`).
fn is_vae_encoder_tensor(name: &str) -> bool {
    name.starts_with("encoder.") || name.starts_with("quant_conv.")
}

impl StableDiffusion {
    /// Move the text encoder (`text`) and the VAE's encoder half (`vae_encoder`) to the CPU,
    /// freeing their memory on the training device: for runs whose encode cache serves every
    /// caption and latent, so that training holds only the UNet (and the VAE decoder, for
    /// validation images) on the GPU. The text encoder then encodes validation prompts on the
    /// CPU. Nothing happens for components that are on the CPU already; a text encoder with
    /// LoRA branches must not be parked (it trains). Returns the bytes moved.
    pub(crate) fn park_encoders(&mut self, text: bool, vae_encoder: bool) -> anyhow::Result<usize> {
        let text = text && !self.text_encoder_device().is_cpu();
        let vae_encoder = vae_encoder && !self.vae_encoder_device().is_cpu();
        self.move_encoders(text, vae_encoder, &Device::Cpu, true)
    }

    /// Bring parked encoders back to `device` (before an encode stage, or a run without the
    /// cache). Returns the bytes moved.
    pub(crate) fn unpark_encoders(&mut self, device: &Device) -> anyhow::Result<usize> {
        let (text, vae) = (self.parking.text_parked, self.parking.vae_encoder_parked);
        self.move_encoders(text, vae, device, false)
    }

    /// The conditioning (context `[N, 77, D]`, and for SDXL the pooled embedding) for `texts`,
    /// on `device`, wherever the text encoders are (parked on the CPU or on the training
    /// device). No time ids: those come from the images.
    pub(crate) fn text_embeddings(&self, texts: &[&str], device: &Device) -> anyhow::Result<Conditioning> {
        self.text.encode(texts, device)
    }

    /// The training resolution when a pipeline sets none: the family's, by the prediction type
    /// of the scheduler config (SD 2.x: 768 for v-prediction, 512 for epsilon).
    pub fn default_resolution(&self) -> u32 {
        let prediction = crate::vocab::PredictionType::parse(&self.scheduler.prediction_type).unwrap_or_default();
        self.family.default_resolution(prediction)
    }

    /// What image sides must be a multiple of: the VAE's downsampling times the UNet's.
    pub fn pixel_multiple(&self) -> u32 {
        let vae = 1u32 << self.vae.config().block_out_channels.len().saturating_sub(1);
        let unet = 1u32 << self.unet.config().block_out_channels.len().saturating_sub(1);
        vae * unet
    }

    /// Where the text encoders are (the CPU while parked).
    pub(crate) fn text_encoder_device(&self) -> Device {
        self.text.device()
    }

    /// Where the VAE's encoder half is (the CPU while parked).
    pub(crate) fn vae_encoder_device(&self) -> Device {
        self.vae.encoder.conv_in.weight.device().clone()
    }

    #[cfg(test)]
    /// Whether the text encoder / the VAE encoder are parked on the CPU.
    pub(crate) fn parked(&self) -> (bool, bool) {
        (self.parking.text_parked, self.parking.vae_encoder_parked)
    }

    /// Rebuild the chosen encoders from their recorded tensors on `device` (also when they are
    /// there already: the tests exercise the rebuild on the CPU).
    pub(crate) fn move_encoders(&mut self, text: bool, vae_encoder: bool, device: &Device, parked: bool) -> anyhow::Result<usize> {
        let mut moved = 0;
        if text {
            anyhow::ensure!(
                self.parking.text_encoders.len() == self.text.pairs.len() && self.parking.text_encoders.iter().all(|t| !t.is_empty()),
                "the text encoders were not loaded to move (LoadOptions::movable_encoders)"
            );
            for (pair, record) in self.text.pairs.iter_mut().zip(self.parking.text_encoders.iter_mut()) {
                let dtype = pair.encoder.token_embedding.dtype();
                let config = pair.encoder.config().clone();
                let projection = pair.encoder.text_projection.is_some();
                let (model, tensors) = offload::rebuild(record, dtype, device, |vb| {
                    if projection { ClipTextModel::load_with_projection(vb, &config) } else { ClipTextModel::load(vb, &config) }
                })?;
                moved += offload::bytes(&tensors);
                pair.encoder = model;
                *record = tensors;
            }
            self.parking.text_parked = parked;
        }
        if vae_encoder {
            anyhow::ensure!(!self.parking.vae.is_empty(), "the VAE was not loaded to move (LoadOptions::movable_encoders)");
            let dtype = self.vae.dtype();
            let config = self.vae.config().clone();
            let enc: offload::Tensors = self.parking.vae.iter().filter(|(k, _)| is_vae_encoder_tensor(k)).map(|(k, t)| (k.clone(), t.clone())).collect();
            let ((encoder, quant_conv), enc) = offload::rebuild(&enc, dtype, device, |vb| AutoencoderKL::load_encoder(vb, &config))?;
            moved += offload::bytes(&enc);
            self.vae.encoder = encoder;
            self.vae.quant_conv = quant_conv;
            self.parking.vae.retain(|k, _| !is_vae_encoder_tensor(k));
            self.parking.vae.extend(enc);
            self.parking.vae_encoder_parked = parked;
        }
        Ok(moved)
    }
}

impl StableDiffusion {
    /// Load from a local diffusers folder or a hub id.
    ///
    /// Weights are converted to `dtype` on `device`. A weight that is missing, left over, or of
    /// the wrong shape is an error naming the tensor (and both shapes).
    pub fn load(source: &str, opts: &LoadOptions, device: &Device, dtype: DType) -> anyhow::Result<Self> {
        Self::load_with(source, opts, &HubSettings::from_env(), device, dtype)
    }

    /// [`Self::load`] with explicit hub settings instead of the environment.
    pub fn load_with(
        source: &str,
        opts: &LoadOptions,
        hub: &HubSettings,
        device: &Device,
        dtype: DType,
    ) -> anyhow::Result<Self> {
        if let Some(file) = single_file_source(source, opts, hub)? {
            return Self::load_single_file_with(&file, opts, hub, device, dtype);
        }
        let files = resolve_model_files_with(source, opts, hub)?;
        let mut pairs = Vec::new();
        let mut text_records = Vec::new();
        let mut text_configs = Vec::new();
        let second = files.text_encoder_2.as_ref().zip(files.tokenizer_2_dir.as_ref());
        for (i, (component, tokenizer_dir)) in std::iter::once((&files.text_encoder, &files.tokenizer_dir)).chain(second).enumerate() {
            let name = if i == 0 { "text_encoder" } else { "text_encoder_2" };
            let tokenizer = ClipTokenizer::from_dir(tokenizer_dir)
                .with_context(|| format!("loading the tokenizer of {source} ({})", tokenizer_dir.display()))?;
            let config = ClipTextConfig::from_json_str(&read_text(&component.config)?)
                .with_context(|| format!("in {}", component.config.display()))?;
            // SDXL's second encoder is `CLIPTextModelWithProjection` (the pooled embedding).
            let projection = i == 1;
            let (encoder, record) = component
                .open_weights(name, &WeightOptions { optional_prefix: Some("text_model.".into()), ..Default::default() })?
                .build_recorded(opts.movable_encoders, dtype, device, |vb| {
                    if projection { ClipTextModel::load_with_projection(vb, &config) } else { ClipTextModel::load(vb, &config) }
                })?;
            pairs.push(TextPair { tokenizer, encoder });
            text_records.push(record);
            text_configs.push(config);
        }

        let unet_config = UNetConfig::from_json_str(&read_text(&files.unet.config)?)
            .with_context(|| format!("in {}", files.unet.config.display()))?;
        let unet = files
            .unet
            .open_weights("unet", &WeightOptions::default())?
            .build(dtype, device, |vb| UNet2DConditionModel::load(vb, &unet_config))?;

        let family = super::family::family_of(&unet_config, &text_configs[0], pairs.len() > 1).with_context(|| format!("model {source}"))?;
        let vae_config = VaeConfig::from_json_str(&read_text(&files.vae.config)?)
            .with_context(|| format!("in {}", files.vae.config.display()))?;
        // The SDXL script keeps the model's own VAE in f32 whatever the precision (only a
        // `--pretrained_vae_model_name_or_path` VAE runs in the weight dtype); SD 1.x/2.x casts it.
        let own_vae_dtype = if family == Family::Sdxl { DType::F32 } else { vae_dtype(dtype, &vae_config) };
        let (vae, vae_tensors) = match &opts.vae {
            Some(path) => load_vae_source(path, &vae_config, dtype, device, opts.movable_encoders, hub)?,
            None => files
                .vae
                .open_weights("vae", &WeightOptions { legacy_attention_names: true, ..Default::default() })?
                .build_recorded(opts.movable_encoders, own_vae_dtype, device, |vb| AutoencoderKL::load(vb, &vae_config))?,
        };

        let scheduler: SchedulerConfig = serde_json::from_str(&read_text(&files.scheduler_config)?)
            .with_context(|| format!("{} is not a valid scheduler config", files.scheduler_config.display()))?;

        let force_zeros_for_empty_prompt = match &files.model_index {
            Some(path) => force_zeros(&read_text(path)?, family),
            None => family == Family::Sdxl,
        };
        let parked = Parking { text_encoders: text_records, vae: vae_tensors, ..Default::default() };
        Ok(Self {
            root: files.root,
            family,
            text: TextSide { pairs, rule: ContextRule::of(family) },
            unet,
            vae,
            scheduler,
            single_file: None,
            force_zeros_for_empty_prompt,
            parking: parked,
        })
    }

    /// Load a single-file checkpoint (LDM layout `.safetensors`), recognising the model from
    /// its tensors (see [`crate::models::single_file`]). Each tensor is read from the memory map and converted
    /// to `dtype` when the network asks for it; nothing else is kept.
    fn load_single_file_with(path: &Path, opts: &LoadOptions, hub: &HubSettings, device: &Device, dtype: DType) -> anyhow::Result<Self> {
        let header = Header::read(path)?;
        let sf_opts = SingleFileOptions {
            config_dir: opts.config.clone(),
            prediction_type: opts.prediction_type,
            ema: opts.ema,
        };
        let mut rec = recognise(path, &header, &sf_opts)?;
        let weights = open_weights(&mut rec, &header, opts.vae.is_none())?;
        tracing::info!("model: {} recognised as {}", path.display(), rec.summary());
        let (tokenizers, scheduler) = tokenizer_and_scheduler(&rec)?;
        // Each component's mapping is dropped as soon as its network is built.
        let SingleFileWeights { unet: unet_weights, vae: vae_weights, text_encoder: text_weights, text_encoder_2: text_weights_2 } = weights;
        let (text_encoder, text_tensors) = text_weights.build_recorded(opts.movable_encoders, dtype, device, |vb| ClipTextModel::load(vb, &rec.text_encoder))?;
        drop(text_weights);
        let mut encoders = vec![(text_encoder, text_tensors)];
        if let (Some(w), Some(config)) = (text_weights_2, &rec.text_encoder_2) {
            encoders.push(w.build_recorded(opts.movable_encoders, dtype, device, |vb| ClipTextModel::load_with_projection(vb, config))?);
        }
        anyhow::ensure!(encoders.len() == tokenizers.len(), "{} text encoders but {} tokenizers", encoders.len(), tokenizers.len());
        let (pairs, text_records): (Vec<TextPair>, Vec<offload::Tensors>) =
            tokenizers.into_iter().zip(encoders).map(|(tokenizer, (encoder, record))| (TextPair { tokenizer, encoder }, record)).unzip();
        let unet = unet_weights.build(dtype, device, |vb| UNet2DConditionModel::load(vb, &rec.unet))?;
        drop(unet_weights);
        let family = rec.family;
        // As for folders: SDXL's own VAE in f32.
        let own_vae_dtype = if family == Family::Sdxl { DType::F32 } else { dtype };
        let (vae, vae_tensors) = match (&opts.vae, vae_weights) {
            (Some(file), _) => load_vae_source(file, &rec.vae, dtype, device, opts.movable_encoders, hub)?,
            (None, Some(w)) => w.build_recorded(opts.movable_encoders, own_vae_dtype, device, |vb| AutoencoderKL::load(vb, &rec.vae))?,
            (None, None) => bail!("{}: no VAE weights", path.display()),
        };
        Ok(Self {
            root: path.parent().map(Path::to_path_buf).unwrap_or_default(),
            family,
            text: TextSide { pairs, rule: ContextRule::of(family) },
            unet,
            vae,
            scheduler,
            single_file: Some(rec),
            force_zeros_for_empty_prompt: family == Family::Sdxl,
            parking: Parking { text_encoders: text_records, vae: vae_tensors, ..Default::default() },
        })
    }
}

/// `force_zeros_for_empty_prompt` of a `model_index.json`: the key when present, else the
/// pipeline class's default (true for SDXL's, absent from SD 1.x/2.x pipelines).
fn force_zeros(model_index: &str, family: Family) -> bool {
    serde_json::from_str::<serde_json::Value>(model_index)
        .ok()
        .and_then(|v| v.get("force_zeros_for_empty_prompt").and_then(serde_json::Value::as_bool))
        .unwrap_or(family == Family::Sdxl)
}

/// Build the VAE `[model] vae` names instead of the model's (`model_vae` is the model's own VAE
/// config), as `--pretrained_vae_model_name_or_path` does:
/// - a `.safetensors` file (diffusers or LDM layout; the model's scaling factor and upcast rule);
/// - a diffusers VAE folder (`config.json` + `diffusion_pytorch_model.safetensors`), or a hub id
///   such as `madebyollin/sdxl-vae-fp16-fix` fetched into the HF cache: built from its own
///   config, scaling factor and `force_upcast` included, as `AutoencoderKL.from_pretrained`.
fn load_vae_source(vae: &Path, model_vae: &VaeConfig, dtype: DType, device: &Device, record: bool, hub: &HubSettings) -> anyhow::Result<(AutoencoderKL, offload::Tensors)> {
    if vae.is_file() || (!vae.exists() && !is_hub_id(&vae.to_string_lossy())) {
        let (weights, config) = open_vae_file(vae, model_vae.scaling_factor)?;
        tracing::info!("model: VAE from {}", vae.display());
        return weights.build_recorded(record, vae_dtype(dtype, model_vae), device, |vb| AutoencoderKL::load(vb, &config));
    }
    const WEIGHTS: &str = "diffusion_pytorch_model.safetensors";
    let dir = if vae.is_dir() {
        vae.to_path_buf()
    } else {
        let id = vae.to_string_lossy();
        let fetch = |file| hub::fetch_file(&id, "main", file, hub).with_context(|| format!("[model] vae: there is no local `{id}`, so it was looked up as a hub VAE"));
        let config = fetch("config.json")?;
        fetch(WEIGHTS)?;
        config.parent().map(Path::to_path_buf).unwrap_or_default()
    };
    let config = VaeConfig::from_json_file(dir.join("config.json"))?;
    let weights = ComponentWeights::open("vae", &[dir.join(WEIGHTS)], &WeightOptions { legacy_attention_names: true, ..Default::default() })?;
    tracing::info!("model: VAE from {} (scaling factor {}, force_upcast {})", vae.display(), config.scaling_factor, config.force_upcast);
    weights.build_recorded(record, vae_dtype(dtype, &config), device, |vb| AutoencoderKL::load(vb, &config))
}

/// True for a source naming a checkpoint file rather than a folder or a hub repository.
pub(crate) fn is_file_source(source: &str) -> bool {
    let lower = source.trim().to_ascii_lowercase();
    lower.ends_with(".safetensors") || super::weights::PICKLE_EXTENSIONS.iter().any(|e| lower.ends_with(&format!(".{e}")))
}

/// The local single-file checkpoint a source names: a local `.safetensors` file, or a hub file
/// `org/repo/file.safetensors` fetched into the HF cache. `None` for folders and hub ids;
/// pickles are refused.
pub(crate) fn single_file_source(source: &str, opts: &LoadOptions, hub: &HubSettings) -> anyhow::Result<Option<PathBuf>> {
    let trimmed = source.trim();
    if !is_file_source(trimmed) {
        return Ok(None);
    }
    let path = Path::new(trimmed);
    let lower = trimmed.to_ascii_lowercase();
    if !lower.ends_with(".safetensors") {
        bail!(
            "model file {trimmed} is a pickle checkpoint: lora reads safetensors only, because loading a pickle \
             (.bin/.ckpt/.pt) can run arbitrary code. Use the model's .safetensors release, or convert it once in \
             Python (`safetensors.torch.save_file(torch.load(PATH, weights_only=True)[\"state_dict\"], OUT)`)"
        );
    }
    if path.is_file() {
        return Ok(Some(path.to_path_buf()));
    }
    let parts: Vec<&str> = trimmed.split('/').collect();
    if is_hub_file(trimmed) {
        let repo = parts[..2].join("/");
        let file = parts[2..].join("/");
        let revision = opts.revision.as_deref().filter(|r| !r.is_empty()).unwrap_or("main");
        return hub::fetch_file(&repo, revision, &file, hub)
            .map(Some)
            .with_context(|| format!("there is no local file `{trimmed}`, so it was looked up as file `{file}` of hub model `{repo}`"));
    }
    bail!("model file {trimmed} does not exist")
}

/// The VAE's dtype when the model is loaded in `dtype`: f32 instead of f16 where its config says
/// `force_upcast` (diffusers' SDXL pipelines and training scripts upcast such a VAE; bf16 has
/// f32's range and is kept).
pub fn vae_dtype(dtype: DType, config: &VaeConfig) -> DType {
    if dtype == DType::F16 && config.force_upcast {
        DType::F32
    } else {
        dtype
    }
}


/// Where a model comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelSource {
    /// A local diffusers folder.
    Local(PathBuf),
    /// A hub repository id (`org/name` or `name`).
    Hub(String),
}

impl ModelSource {
    /// An existing folder is local; otherwise a well-formed hub id is a hub model; anything else
    /// (a path that does not exist) is an error.
    pub fn parse(source: &str) -> anyhow::Result<Self> {
        let trimmed = source.trim();
        if trimmed.is_empty() {
            bail!("the model source is empty: give a diffusers folder or a hub id such as `org/name`");
        }
        let path = Path::new(trimmed);
        if path.is_dir() {
            return Ok(Self::Local(path.to_path_buf()));
        }
        if path.exists() {
            bail!("model source {trimmed} is a file, not a diffusers folder (with model_index.json, unet/, vae/, …) or a hub id");
        }
        if is_hub_id(trimmed) {
            return Ok(Self::Hub(trimmed.to_string()));
        }
        bail!("model folder {trimmed} does not exist (and it is not a hub id like `org/name`)")
    }
}


/// Resolve a model source (local folder or hub id) to a local diffusers folder.
pub fn resolve_model_dir(source: &str, opts: &LoadOptions) -> anyhow::Result<PathBuf> {
    Ok(resolve_model_files_with(source, opts, &HubSettings::from_env())?.root)
}

/// Resolve a source and find every file the pipeline needs, with explicit hub settings.
pub fn resolve_model_files_with(source: &str, opts: &LoadOptions, hub: &HubSettings) -> anyhow::Result<ModelFiles> {
    let variant = opts.variant.as_deref().filter(|v| !v.is_empty());
    match ModelSource::parse(source)? {
        ModelSource::Local(dir) => {
            if opts.revision.is_some() {
                tracing::warn!("revision is ignored for the local folder {}", dir.display());
            }
            locate_model_files(&dir, variant)
        }
        ModelSource::Hub(id) => {
            let revision = opts.revision.as_deref().filter(|r| !r.is_empty()).unwrap_or("main");
            let found = hub::resolve_hub_model(&id, revision, variant, hub).with_context(|| {
                format!("there is no local folder `{id}`, so it was looked up as a hub model id")
            })?;
            Ok(found.1)
        }
    }
}

/// The files of one network component (`unet/`, `vae/`, `text_encoder/`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ComponentFiles {
    /// `config.json`.
    pub config: PathBuf,
    /// The `.safetensors` file, or every shard in index order.
    pub weights: Vec<PathBuf>,
    /// The `*.safetensors.index.json` when sharded.
    pub weight_index: Option<PathBuf>,
}

impl ComponentFiles {
    /// Open the weights behind a checking `VarBuilder`.
    pub fn open_weights(&self, component: &str, options: &WeightOptions) -> anyhow::Result<ComponentWeights> {
        ComponentWeights::open(component, &self.weights, options)
    }

    fn paths(&self) -> impl Iterator<Item = &PathBuf> {
        std::iter::once(&self.config).chain(self.weight_index.iter()).chain(self.weights.iter())
    }
}

/// Every file of a diffusers folder that loading reads (absolute paths, or relative to the
/// repository root while planning a download).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelFiles {
    pub root: PathBuf,
    pub model_index: Option<PathBuf>,
    pub scheduler_config: PathBuf,
    pub tokenizer_dir: PathBuf,
    /// The tokenizer files present: `tokenizer.json` or `vocab.json` + `merges.txt`, plus the
    /// JSON configs.
    pub tokenizer_files: Vec<PathBuf>,
    pub text_encoder: ComponentFiles,
    pub unet: ComponentFiles,
    pub vae: ComponentFiles,
    /// SDXL: `text_encoder_2/` and `tokenizer_2/` (its files are in `tokenizer_files`).
    pub text_encoder_2: Option<ComponentFiles>,
    pub tokenizer_2_dir: Option<PathBuf>,
}

impl ModelFiles {
    /// Every file, relative to the root.
    pub fn relative_paths(&self) -> Vec<PathBuf> {
        self.all_paths()
            .map(|p| p.strip_prefix(&self.root).map(Path::to_path_buf).unwrap_or_else(|_| p.clone()))
            .collect()
    }

    /// Every file, as stored (absolute once rebased).
    pub fn all_paths(&self) -> impl Iterator<Item = &PathBuf> {
        self.model_index
            .iter()
            .chain(std::iter::once(&self.scheduler_config))
            .chain(self.tokenizer_files.iter())
            .chain(self.text_encoder.paths())
            .chain(self.unet.paths())
            .chain(self.vae.paths())
            .chain(self.text_encoder_2.iter().flat_map(ComponentFiles::paths))
    }

    /// The same files under `root` (the plan is made with an empty root).
    pub(crate) fn rebased(&self, root: &Path) -> Self {
        let re = |p: &PathBuf| root.join(p.strip_prefix(&self.root).unwrap_or(p));
        let component = |c: &ComponentFiles| ComponentFiles {
            config: re(&c.config),
            weights: c.weights.iter().map(re).collect(),
            weight_index: c.weight_index.as_ref().map(re),
        };
        Self {
            root: root.to_path_buf(),
            model_index: self.model_index.as_ref().map(re),
            scheduler_config: re(&self.scheduler_config),
            tokenizer_dir: re(&self.tokenizer_dir),
            tokenizer_files: self.tokenizer_files.iter().map(re).collect(),
            text_encoder: component(&self.text_encoder),
            unet: component(&self.unet),
            vae: component(&self.vae),
            text_encoder_2: self.text_encoder_2.as_ref().map(component),
            tokenizer_2_dir: self.tokenizer_2_dir.as_ref().map(re),
        }
    }
}

/// Find every file the pipeline reads in a local diffusers folder; an error lists everything
/// that is missing, or refuses pickle-only weights.
pub fn locate_model_files(root: &Path, variant: Option<&str>) -> anyhow::Result<ModelFiles> {
    if !root.is_dir() {
        bail!("model folder {} does not exist", root.display());
    }
    let listing = list_folder(root)?;
    let files = plan_model_files(&listing, variant, &mut |rel| read_text(&root.join(rel)))
        .with_context(|| format!("model folder {}", root.display()))?;
    Ok(files.rebased(root))
}

/// Paths (with `/`) of the regular files under `dir`, two folder levels deep, following
/// symlinks (a hub snapshot is made of links into `blobs/`); dangling links are left out.
pub fn list_folder(dir: &Path) -> anyhow::Result<BTreeSet<String>> {
    fn walk(dir: &Path, prefix: &str, depth: usize, out: &mut BTreeSet<String>) -> anyhow::Result<()> {
        let entries = std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))?;
        for entry in entries {
            let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
            let Some(name) = entry.file_name().to_str().map(str::to_string) else { continue };
            let path = entry.path();
            let Ok(meta) = std::fs::metadata(&path) else { continue };
            let rel = if prefix.is_empty() { name } else { format!("{prefix}/{name}") };
            if meta.is_file() {
                out.insert(rel);
            } else if meta.is_dir() && depth > 0 {
                walk(&path, &rel, depth - 1, out)?;
            }
        }
        Ok(())
    }
    let mut out = BTreeSet::new();
    walk(dir, "", 2, &mut out)?;
    Ok(out)
}

/// The network components: folder, config, weight base name and how they treat a variant.
const COMPONENTS: [(&str, &str, &str, VariantPolicy); 3] = [
    ("text_encoder", vocab::TEXT_ENCODER_CONFIG, "model", VariantPolicy::PlainFirst),
    ("unet", vocab::UNET_CONFIG, "diffusion_pytorch_model", VariantPolicy::Required),
    ("vae", vocab::VAE_CONFIG, "diffusion_pytorch_model", VariantPolicy::Required),
];

/// Choose the files of a diffusers repository from its file list (`listing`, relative paths
/// with `/`). `read` returns the text of a listed file (shard indexes and `model_index.json`
/// are read to plan). The result has an empty root; see [`ModelFiles::rebased`].
pub fn plan_model_files(
    listing: &BTreeSet<String>,
    variant: Option<&str>,
    read: &mut dyn FnMut(&str) -> anyhow::Result<String>,
) -> anyhow::Result<ModelFiles> {
    let mut missing: Vec<String> = Vec::new();
    let require = |rel: &str, missing: &mut Vec<String>| -> PathBuf {
        if !listing.contains(rel) {
            missing.push(rel.to_string());
        }
        PathBuf::from(rel)
    };

    let (model_index, two_encoders) = if listing.contains("model_index.json") {
        (Some(PathBuf::from("model_index.json")), check_model_index(&read("model_index.json")?)?)
    } else {
        (None, listing.contains(vocab::TEXT_ENCODER_2_CONFIG))
    };
    let scheduler_config = require(vocab::SCHEDULER_CONFIG, &mut missing);

    let mut tokenizer_files = Vec::new();
    let tokenizer_dirs: &[&str] = if two_encoders { &[vocab::TOKENIZER_DIR, vocab::TOKENIZER_2_DIR] } else { &[vocab::TOKENIZER_DIR] };
    for dir in tokenizer_dirs {
        if listing.contains(&format!("{dir}/tokenizer.json")) {
            tokenizer_files.push(PathBuf::from(format!("{dir}/tokenizer.json")));
        } else {
            for name in ["vocab.json", "merges.txt"] {
                tokenizer_files.push(require(&format!("{dir}/{name}"), &mut missing));
            }
        }
        for optional in ["tokenizer_config.json", "special_tokens_map.json"] {
            if listing.contains(&format!("{dir}/{optional}")) {
                tokenizer_files.push(PathBuf::from(format!("{dir}/{optional}")));
            }
        }
    }

    let second = [("text_encoder_2", vocab::TEXT_ENCODER_2_CONFIG, "model", VariantPolicy::PlainFirst)];
    let mut components = Vec::new();
    for (dir, config, base, policy) in COMPONENTS.into_iter().chain(second.into_iter().filter(|_| two_encoders)) {
        let config = require(config, &mut missing);
        let prefix = format!("{dir}/");
        let in_dir: BTreeSet<String> =
            listing.iter().filter_map(|p| p.strip_prefix(&prefix)).filter(|p| !p.contains('/')).map(str::to_string).collect();
        if in_dir.is_empty() && !listing.iter().any(|p| p.starts_with(&prefix)) {
            missing.push(format!("{dir}/ (the whole folder)"));
            components.push(ComponentFiles { config, weights: vec![], weight_index: None });
            continue;
        }
        if !super::weights::has_weight_files(&in_dir) {
            let wanted = match (variant, policy) {
                (Some(v), VariantPolicy::Required) => format!("{prefix}{base}.{v}.safetensors"),
                _ => format!("{prefix}{base}.safetensors"),
            };
            missing.push(wanted);
            components.push(ComponentFiles { config, weights: vec![], weight_index: None });
            continue;
        }
        let (weights, weight_index) = match super::weights::choose_weights(dir, &in_dir, base, variant, policy)? {
            WeightChoice::Single(name) => (vec![PathBuf::from(format!("{prefix}{name}"))], None),
            WeightChoice::Sharded { index } => {
                let index_rel = format!("{prefix}{index}");
                let shards = super::weights::shards_from_index(&read(&index_rel)?, &index_rel)?;
                let shards: Vec<PathBuf> = shards.iter().map(|s| require(&format!("{prefix}{s}"), &mut missing)).collect();
                (shards, Some(PathBuf::from(index_rel)))
            }
        };
        components.push(ComponentFiles { config, weights, weight_index });
    }

    if !missing.is_empty() {
        bail!("not a complete Stable Diffusion folder: missing {}", missing.join(", "));
    }
    let text_encoder_2 = if two_encoders { components.pop() } else { None };
    let vae = components.pop().expect("three components");
    let unet = components.pop().expect("three components");
    let text_encoder = components.pop().expect("three components");
    Ok(ModelFiles {
        text_encoder_2,
        tokenizer_2_dir: two_encoders.then(|| PathBuf::from(vocab::TOKENIZER_2_DIR)),
        root: PathBuf::new(),
        model_index,
        scheduler_config,
        tokenizer_dir: PathBuf::from(vocab::TOKENIZER_DIR),
        tokenizer_files,
        text_encoder,
        unet,
        vae,
    })
}

/// Refuse pipelines whose layout is not SD 1.x/2.x/XL (a transformer instead of a UNet);
/// returns whether it names a second text encoder and tokenizer (SDXL).
fn check_model_index(json: &str) -> anyhow::Result<bool> {
    let index: serde_json::Value = serde_json::from_str(json).context("model_index.json is not valid JSON")?;
    let class = index.get("_class_name").and_then(|c| c.as_str()).unwrap_or("an unnamed pipeline");
    if index.get("unet").is_none() && index.get("transformer").is_some() {
        bail!("model_index.json describes {class}, which uses a transformer instead of a UNet; only SD 1.x/2.x/XL pipelines are supported");
    }
    let named = |key: &str| index.get(key).is_some_and(|v| !v.is_null() && v.get(0).is_some_and(|x| !x.is_null()));
    let (encoder, tokenizer) = (named("text_encoder_2"), named("tokenizer_2"));
    if encoder != tokenizer {
        bail!("model_index.json of {class} names {} but not {}", if encoder { "text_encoder_2" } else { "tokenizer_2" }, if encoder { "tokenizer_2" } else { "text_encoder_2" });
    }
    if encoder && index.get("text_encoder").is_some_and(serde_json::Value::is_null) {
        bail!("model_index.json of {class} has a second text encoder but no first (SDXL refiner-style); only pipelines with both text encoders are supported");
    }
    Ok(encoder)
}
