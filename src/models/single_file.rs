//! Single-file checkpoints (the A1111 / ComfyUI / civitai `.safetensors` in the original LDM
//! layout) and separate VAE files: recognising SD 1.x / 2.x and the network configs from the
//! tensors' names and shapes, the LDM → diffusers name map (OpenCLIP's fused `in_proj` split into
//! q/k/v row slices), and the bundled tokenizer and scheduler configs.
//!
//! Nothing is converted in memory up front: each component gets a renaming
//! [`ComponentWeights`] over the memory-mapped file, so a tensor is read, sliced and converted to
//! the compute dtype only when the network asks for it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use super::config::{ClipTextConfig, UNetConfig, VaeConfig};
use super::loading::weights::{ComponentWeights, MappedTensor, MissingHint, WeightOptions};
use super::tokenizer::{ClipTokenizer, ClipTokenizerSettings};
use crate::schedulers::SchedulerConfig;
use crate::util::fs::read_text;
use crate::vocab::{self, PredictionType};

const UNET_PREFIX: &str = "model.diffusion_model.";
const VAE_PREFIX: &str = "first_stage_model.";
const CLIP_PREFIX: &str = "cond_stage_model.transformer.";
const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";
const EMA_PREFIX: &str = "model_ema.";

/// The CLIP BPE files (the same for SD 1.x and 2.x; 49408 tokens), bundled so that a single
/// file needs nothing else. They are byte-identical to the SD 1.5 repository's `tokenizer/`.
const CLIP_VOCAB: &str = include_str!("../../assets/sd/clip-vocab.json");
const CLIP_MERGES: &str = include_str!("../../assets/sd/clip-merges.txt");
/// The published `scheduler/scheduler_config.json` of SD 1.5 (PNDM) and SD 2.1 (DDIM).
const SD1_SCHEDULER: &str = include_str!("../../assets/sd/sd1-scheduler_config.json");
const SD2_SCHEDULER: &str = include_str!("../../assets/sd/sd2-scheduler_config.json");

/// Top-level names of an LDM checkpoint that are not network weights: the DDPM schedule
/// buffers `LatentDiffusion` registers, and scalars some trainers add.
const LDM_BUFFERS: [&str; 15] = [
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "logvar",
    "v_pred",
    "global_step",
];

/// The model families a single file is recognised as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// SD 1.x: CLIP ViT-L text encoder under `cond_stage_model.transformer.`.
    Sd1,
    /// SD 2.x: OpenCLIP ViT-H text encoder under `cond_stage_model.model.`.
    Sd2,
}

impl Family {
    pub fn name(self) -> &'static str {
        match self {
            Family::Sd1 => "SD 1.x",
            Family::Sd2 => "SD 2.x",
        }
    }

    /// kohya's `ss_base_model_version`.
    pub fn base_model_version(self) -> &'static str {
        match self {
            Family::Sd1 => "sd_v1",
            Family::Sd2 => "sd_v2",
        }
    }
}

/// The header of a safetensors file: every tensor's shape and dtype, and `__metadata__`.
#[derive(Clone, Debug, Default)]
pub struct Header {
    pub tensors: BTreeMap<String, (Vec<usize>, String)>,
    pub metadata: BTreeMap<String, String>,
}

impl Header {
    /// Read only the header (the first `8 + n` bytes), not the tensor data.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let mut file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let total = file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut len = [0u8; 8];
        file.read_exact(&mut len).with_context(|| format!("{} is not a safetensors file (shorter than 8 bytes)", path.display()))?;
        let n = u64::from_le_bytes(len);
        if n == 0 || n > 100_000_000 || n + 8 > total {
            bail!("{} is not a safetensors file (header length {n} for a file of {total} bytes)", path.display());
        }
        let mut text = vec![0u8; n as usize];
        file.read_exact(&mut text).with_context(|| format!("reading the header of {}", path.display()))?;
        let json: Value = serde_json::from_slice(&text)
            .with_context(|| format!("{} is not a safetensors file (its header is not JSON)", path.display()))?;
        let Value::Object(entries) = json else { bail!("{}: the safetensors header is not a JSON object", path.display()) };
        let mut header = Header::default();
        for (name, entry) in entries {
            if name == "__metadata__" {
                if let Value::Object(m) = entry {
                    for (k, v) in m {
                        header.metadata.insert(k, v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()));
                    }
                }
                continue;
            }
            let shape: Vec<usize> = entry
                .get("shape")
                .and_then(Value::as_array)
                .map(|s| s.iter().filter_map(Value::as_u64).map(|d| d as usize).collect())
                .with_context(|| format!("{}: tensor `{name}` has no shape in the header", path.display()))?;
            let dtype = entry.get("dtype").and_then(Value::as_str).unwrap_or("?").to_string();
            header.tensors.insert(name, (shape, dtype));
        }
        Ok(header)
    }

    fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|(s, _)| s.as_slice())
    }

    fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The names under `prefix`, with the prefix removed.
    fn under<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.tensors.keys().filter_map(move |k| k.strip_prefix(prefix))
    }

    /// The distinct integers `N` of names `prefix N . …` under `prefix`.
    fn indices(&self, prefix: &str) -> BTreeSet<usize> {
        self.under(prefix).filter_map(|rest| rest.split('.').next()?.parse().ok()).collect()
    }
}

/// True when a `.safetensors` file holds an LDM single-file checkpoint (a UNet under
/// `model.diffusion_model.`).
pub fn is_single_file_checkpoint(header: &Header) -> bool {
    header.tensors.keys().any(|k| k.starts_with(UNET_PREFIX))
}

/// How one name prefix of the LDM layout maps to the diffusers layout; `inner` renames the part
/// after the prefix (resnet and attention sub-modules).
#[derive(Clone, Debug)]
struct PrefixRule {
    ldm: String,
    diffusers: String,
    inner: &'static [(&'static str, &'static str)],
}

const UNET_RESNET: &[(&str, &str)] = &[
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("emb_layers.1.", "time_emb_proj."),
    ("skip_connection.", "conv_shortcut."),
];
const VAE_RESNET: &[(&str, &str)] = &[("nin_shortcut.", "conv_shortcut.")];
const VAE_ATTENTION: &[(&str, &str)] =
    &[("norm.", "group_norm."), ("q.", "to_q."), ("k.", "to_k."), ("v.", "to_v."), ("proj_out.", "to_out.0.")];
const NONE: &[(&str, &str)] = &[];

/// A bidirectional prefix map between the two layouts.
#[derive(Clone, Debug, Default)]
struct PrefixMap {
    rules: Vec<PrefixRule>,
}

impl PrefixMap {
    fn add(&mut self, ldm: impl Into<String>, diffusers: impl Into<String>, inner: &'static [(&'static str, &'static str)]) {
        self.rules.push(PrefixRule { ldm: ldm.into(), diffusers: diffusers.into(), inner });
    }

    /// The diffusers name of an LDM name (without the component prefix), if a rule covers it.
    fn to_diffusers(&self, ldm: &str) -> Option<String> {
        let rule = self.rules.iter().filter(|r| ldm.starts_with(&r.ldm)).max_by_key(|r| r.ldm.len())?;
        let rest = &ldm[rule.ldm.len()..];
        let rest = rename_inner(rest, rule.inner.iter().map(|(a, b)| (*a, *b)));
        Some(format!("{}{rest}", rule.diffusers))
    }

    /// The LDM name a diffusers name is stored as.
    fn to_ldm(&self, diffusers: &str) -> Option<String> {
        let rule = self.rules.iter().filter(|r| diffusers.starts_with(&r.diffusers)).max_by_key(|r| r.diffusers.len())?;
        let rest = &diffusers[rule.diffusers.len()..];
        let rest = rename_inner(rest, rule.inner.iter().map(|(a, b)| (*b, *a)));
        Some(format!("{}{rest}", rule.ldm))
    }
}

fn rename_inner<'a>(rest: &str, mut pairs: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    match pairs.find(|(from, _)| rest.starts_with(from)) {
        Some((from, to)) => format!("{to}{}", &rest[from.len()..]),
        None => rest.to_string(),
    }
}

/// The block structure of an LDM UNet, read from its names.
#[derive(Clone, Debug, PartialEq, Eq)]
struct UNetLayout {
    layers: usize,
    channels: Vec<usize>,
    down_attention: Vec<bool>,
    up_attention: Vec<bool>,
    transformer_layers: Vec<usize>,
}

fn unet_layout(h: &Header) -> anyhow::Result<UNetLayout> {
    let p = UNET_PREFIX;
    let inputs = h.indices(&format!("{p}input_blocks."));
    let outputs = h.indices(&format!("{p}output_blocks."));
    let count = inputs.iter().max().map_or(0, |m| m + 1);
    if count < 2 || inputs.len() != count {
        bail!("the UNet's `{p}input_blocks.*` are not numbered 0..N (found {inputs:?})");
    }
    let first_downsample = inputs.iter().copied().find(|i| h.has(&format!("{p}input_blocks.{i}.0.op.weight")));
    let layers = match first_downsample {
        Some(i) => i - 1,
        None => count - 1,
    };
    if layers == 0 || count % (layers + 1) != 0 {
        bail!("cannot read the UNet's block structure: {count} input blocks with a downsampler at {first_downsample:?}");
    }
    let blocks = count / (layers + 1);
    if outputs.len() != blocks * (layers + 1) {
        bail!(
            "the UNet has {} `output_blocks` but {blocks} blocks of {layers} layers need {}",
            outputs.len(),
            blocks * (layers + 1)
        );
    }
    let mut channels = Vec::new();
    let mut down_attention = Vec::new();
    let mut up_attention = Vec::new();
    let mut transformer_layers = Vec::new();
    for i in 0..blocks {
        let first = 1 + i * (layers + 1);
        let key = format!("{p}input_blocks.{first}.0.out_layers.3.weight");
        channels.push(h.shape(&key).and_then(|s| s.first().copied()).with_context(|| format!("the UNet has no `{key}`"))?);
        let attn = format!("{p}input_blocks.{first}.1.");
        down_attention.push(h.has(&format!("{attn}proj_in.weight")));
        transformer_layers.push(h.indices(&format!("{attn}transformer_blocks.")).len().max(1));
        up_attention.push(h.has(&format!("{p}output_blocks.{}.1.proj_in.weight", i * (layers + 1))));
    }
    Ok(UNetLayout { layers, channels, down_attention, up_attention, transformer_layers })
}

fn unet_map(l: &UNetLayout) -> PrefixMap {
    let mut m = PrefixMap::default();
    m.add("time_embed.0.", "time_embedding.linear_1.", NONE);
    m.add("time_embed.2.", "time_embedding.linear_2.", NONE);
    m.add("input_blocks.0.0.", "conv_in.", NONE);
    m.add("out.0.", "conv_norm_out.", NONE);
    m.add("out.2.", "conv_out.", NONE);
    let n = l.channels.len();
    let per = l.layers + 1;
    for i in 0..n {
        for j in 0..l.layers {
            let idx = 1 + i * per + j;
            m.add(format!("input_blocks.{idx}.0."), format!("down_blocks.{i}.resnets.{j}."), UNET_RESNET);
            if l.down_attention[i] {
                m.add(format!("input_blocks.{idx}.1."), format!("down_blocks.{i}.attentions.{j}."), NONE);
            }
        }
        if i + 1 < n {
            m.add(format!("input_blocks.{}.0.op.", (i + 1) * per), format!("down_blocks.{i}.downsamplers.0.conv."), NONE);
        }
        for j in 0..per {
            let idx = i * per + j;
            m.add(format!("output_blocks.{idx}.0."), format!("up_blocks.{i}.resnets.{j}."), UNET_RESNET);
            if l.up_attention[i] {
                m.add(format!("output_blocks.{idx}.1."), format!("up_blocks.{i}.attentions.{j}."), NONE);
            }
            if i + 1 < n && j == l.layers {
                let sub = if l.up_attention[i] { 2 } else { 1 };
                m.add(format!("output_blocks.{idx}.{sub}."), format!("up_blocks.{i}.upsamplers.0."), NONE);
            }
        }
    }
    m.add("middle_block.0.", "mid_block.resnets.0.", UNET_RESNET);
    m.add("middle_block.1.", "mid_block.attentions.0.", NONE);
    m.add("middle_block.2.", "mid_block.resnets.1.", UNET_RESNET);
    m
}

/// The VAE's block count and resnets per block, from LDM (`encoder.down.N.block.M`) names.
fn vae_map(blocks: usize, layers: usize) -> PrefixMap {
    let mut m = PrefixMap::default();
    for x in ["encoder", "decoder"] {
        m.add(format!("{x}.conv_in."), format!("{x}.conv_in."), NONE);
        m.add(format!("{x}.conv_out."), format!("{x}.conv_out."), NONE);
        m.add(format!("{x}.norm_out."), format!("{x}.conv_norm_out."), NONE);
        m.add(format!("{x}.mid.block_1."), format!("{x}.mid_block.resnets.0."), VAE_RESNET);
        m.add(format!("{x}.mid.block_2."), format!("{x}.mid_block.resnets.1."), VAE_RESNET);
        m.add(format!("{x}.mid.attn_1."), format!("{x}.mid_block.attentions.0."), VAE_ATTENTION);
    }
    for i in 0..blocks {
        for j in 0..layers {
            m.add(format!("encoder.down.{i}.block.{j}."), format!("encoder.down_blocks.{i}.resnets.{j}."), VAE_RESNET);
        }
        for j in 0..=layers {
            m.add(format!("decoder.up.{}.block.{j}.", blocks - 1 - i), format!("decoder.up_blocks.{i}.resnets.{j}."), VAE_RESNET);
        }
        if i + 1 < blocks {
            m.add(format!("encoder.down.{i}.downsample."), format!("encoder.down_blocks.{i}.downsamplers.0."), NONE);
            m.add(format!("decoder.up.{}.upsample.", blocks - 1 - i), format!("decoder.up_blocks.{i}.upsamplers.0."), NONE);
        }
    }
    m.add("quant_conv.", "quant_conv.", NONE);
    m.add("post_quant_conv.", "post_quant_conv.", NONE);
    m
}

/// Where the prediction type came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prediction {
    /// `epsilon` or `v_prediction` (a `[model] config` scheduler may say `sample`).
    pub kind: PredictionType,
    /// Why, for the log and `lora inspect`.
    pub reason: String,
}

/// What a single file was recognised as, with the configs built for it.
#[derive(Clone, Debug)]
pub struct Recognition {
    pub path: PathBuf,
    pub family: Family,
    pub unet: UNetConfig,
    pub vae: VaeConfig,
    pub text_encoder: ClipTextConfig,
    pub prediction: Prediction,
    /// The diffusers folder whose configs were used (`[model] config`), if any.
    pub configs_from: Option<PathBuf>,
    /// Tensors of the file that are knowingly left out (EMA copies, the OpenCLIP layer SD 2.x
    /// does not use, schedule buffers), with why.
    pub ignored: Vec<(String, String)>,
    /// Whether the UNet weights are the EMA copy (`model_ema.*`).
    pub uses_ema: bool,
    text_layers_in_file: usize,
}

impl Recognition {
    /// A few lines for `lora inspect` and the log.
    pub fn describe(&self) -> String {
        let u = &self.unet;
        let t = &self.text_encoder;
        let v = &self.vae;
        let heads: Vec<String> = u.block_out_channels.iter().zip(&u.num_attention_heads).map(|(c, h)| format!("{h}x{}", c / h)).collect();
        let mut out = String::new();
        out += &format!("kind:        single-file checkpoint (LDM layout), recognised as {}\n", self.family.name());
        out += &format!("prediction:  {} ({})\n", self.prediction.kind, self.prediction.reason);
        if let Some(dir) = &self.configs_from {
            out += &format!("configs:     from {}\n", dir.display());
        }
        out += &format!(
            "unet:        channels {:?}, {} layers per block, heads x head dim {}, cross-attention {}, {} projection, {} transformer layer(s), in/out channels {}/{}{}\n",
            u.block_out_channels,
            u.layers_per_block[0],
            heads.join(" "),
            u.cross_attention_dim[0],
            if u.use_linear_projection { "linear" } else { "1x1 conv" },
            u.transformer_layers_per_block[0],
            u.in_channels,
            u.out_channels,
            if self.uses_ema { ", EMA weights" } else { "" },
        );
        out += &format!(
            "text:        {} {} layers of {} (of {} in the file), {} heads, {}\n",
            if self.family == Family::Sd1 { "CLIP" } else { "OpenCLIP" },
            t.num_hidden_layers,
            t.hidden_size,
            self.text_layers_in_file,
            t.num_attention_heads,
            match self.family {
                Family::Sd1 => "quick_gelu",
                Family::Sd2 => "gelu",
            }
        );
        out += &format!("vae:         channels {:?}, {} latent channels, scaling {}\n", v.block_out_channels, v.latent_channels, v.scaling_factor);
        if !self.ignored.is_empty() {
            let mut reasons: BTreeMap<&str, usize> = BTreeMap::new();
            for (_, why) in &self.ignored {
                *reasons.entry(why.as_str()).or_default() += 1;
            }
            let list: Vec<String> = reasons.iter().map(|(why, n)| format!("{n} {why}")).collect();
            out += &format!("left out:    {}\n", list.join(", "));
        }
        out
    }

    /// One line for logs and `lora validate`.
    pub fn summary(&self) -> String {
        format!(
            "{} single file, {} (prediction {}: {})",
            self.family.name(),
            if self.unet.use_linear_projection { "linear projections" } else { "conv projections" },
            self.prediction.kind,
            self.prediction.reason
        )
    }
}

/// Options that steer recognition (from `[model]`).
#[derive(Clone, Debug, Default)]
pub struct SingleFileOptions {
    /// A diffusers folder whose `unet/`, `vae/`, `text_encoder/` configs, `tokenizer/` and
    /// `scheduler/` are used instead of the recognised/bundled ones (its weights are not read).
    pub config_dir: Option<PathBuf>,
    /// Overrides the file and the family default.
    pub prediction_type: Option<PredictionType>,
    /// Read the UNet from the EMA copy (`model_ema.*`) when the file has both.
    pub ema: bool,
}

/// Recognise the local single file of a `[model]` table (`None` when there is none, or it is a
/// hub file not yet downloaded); every tensor must be accounted for.
pub fn recognise_config(m: &crate::config::ModelConfig) -> Option<anyhow::Result<Recognition>> {
    let file = m.file.as_ref().filter(|f| f.is_file())?;
    let opts = SingleFileOptions {
        config_dir: m.config.clone(),
        prediction_type: m.prediction_type,
        ema: m.ema,
    };
    Some((|| {
        let header = Header::read(file)?;
        let mut rec = recognise(file, &header, &opts)?;
        open_weights(&mut rec, &header, m.vae.is_none())?;
        Ok(rec)
    })())
}

/// Recognise the model in a single-file checkpoint from its header.
pub fn recognise(path: &Path, header: &Header, opts: &SingleFileOptions) -> anyhow::Result<Recognition> {
    if !is_single_file_checkpoint(header) {
        bail!(
            "{} is not a single-file Stable Diffusion checkpoint: it has no `{UNET_PREFIX}*` tensors{}",
            path.display(),
            if header.tensors.keys().any(|k| k.starts_with("lora_") || k.contains(".lora")) { " (it looks like a LoRA file)" } else { "" }
        );
    }
    if header.tensors.keys().any(|k| k.starts_with("conditioner.embedders.")) {
        bail!("{} is an SDXL checkpoint (`conditioner.embedders.*`); only SD 1.x and 2.x single files are supported", path.display());
    }
    let family = if header.tensors.keys().any(|k| k.starts_with(OPEN_CLIP_PREFIX)) {
        Family::Sd2
    } else if header.tensors.keys().any(|k| k.starts_with(CLIP_PREFIX)) {
        Family::Sd1
    } else {
        bail!(
            "{} has a UNet but no text encoder (`{CLIP_PREFIX}*` for SD 1.x or `{OPEN_CLIP_PREFIX}*` for SD 2.x)",
            path.display()
        );
    };
    if !header.tensors.keys().any(|k| k.starts_with(VAE_PREFIX)) {
        bail!("{} has no VAE (`{VAE_PREFIX}*` tensors); give one with `[model] vae`", path.display());
    }
    let layout = unet_layout(header).with_context(|| format!("in {}", path.display()))?;
    let p = UNET_PREFIX;
    let find_shape = |suffix: &str| -> Option<Vec<usize>> {
        header.tensors.iter().find(|(k, _)| k.starts_with(p) && k.ends_with(suffix)).map(|(_, (s, _))| s.clone())
    };
    let conv_in = header.shape(&format!("{p}input_blocks.0.0.weight")).context("the UNet has no `input_blocks.0.0.weight` (conv_in)")?.to_vec();
    let conv_out = header.shape(&format!("{p}out.2.weight")).context("the UNet has no `out.2.weight` (conv_out)")?.to_vec();
    let time_embed = header.shape(&format!("{p}time_embed.0.weight")).context("the UNet has no `time_embed.0.weight`")?.to_vec();
    let cross = find_shape("attn2.to_k.weight").context("the UNet has no cross-attention (`attn2.to_k.weight`)")?;
    let proj_in = find_shape("proj_in.weight").context("the UNet has no `proj_in.weight`")?;
    if !header.has(&format!("{p}middle_block.1.proj_in.weight")) {
        bail!("{}: the UNet has no cross-attention mid block (`middle_block.1.*`), which SD 1.x/2.x have", path.display());
    }

    let prediction = prediction_type(header, family, opts)?;
    let (unet, vae, text_encoder, configs_from) = match &opts.config_dir {
        Some(dir) => {
            let unet = UNetConfig::from_json_file(dir.join(vocab::UNET_CONFIG))?;
            let vae = VaeConfig::from_json_file(dir.join(vocab::VAE_CONFIG))?;
            let text = ClipTextConfig::from_json_file(dir.join(vocab::TEXT_ENCODER_CONFIG))?;
            (unet, vae, text, Some(dir.clone()))
        }
        None => {
            let heads: Vec<usize> = match family {
                // SD 1.x: `num_heads: 8` in v1-inference.yaml, for every block.
                Family::Sd1 => vec![8; layout.channels.len()],
                // SD 2.x: `num_head_channels: 64`.
                Family::Sd2 => layout
                    .channels
                    .iter()
                    .map(|&c| {
                        if c % 64 == 0 {
                            Ok(c / 64)
                        } else {
                            bail!("{}: {c} UNet channels are not a multiple of SD 2.x's head size 64, so the heads cannot be recognised; give `[model] config` (a diffusers folder with unet/config.json)", path.display())
                        }
                    })
                    .collect::<anyhow::Result<_>>()?,
            };
            let down: Vec<&str> = layout.down_attention.iter().map(|&a| if a { "CrossAttnDownBlock2D" } else { "DownBlock2D" }).collect();
            let up: Vec<&str> = layout.up_attention.iter().map(|&a| if a { "CrossAttnUpBlock2D" } else { "UpBlock2D" }).collect();
            let v = prediction.kind == PredictionType::VPrediction;
            let unet_json = json!({
                "in_channels": conv_in[1],
                "out_channels": conv_out[0],
                "block_out_channels": layout.channels,
                "layers_per_block": layout.layers,
                "down_block_types": down,
                "up_block_types": up,
                "attention_head_dim": heads,
                "cross_attention_dim": cross[1],
                "transformer_layers_per_block": layout.transformer_layers,
                "use_linear_projection": proj_in.len() == 2,
                // SD 2.1's config upcasts attention to f32 (a no-op in an f32 run).
                "upcast_attention": family == Family::Sd2,
                "time_embedding_dim": time_embed[0],
                "sample_size": if family == Family::Sd2 && v { 96 } else { 64 },
            });
            let unet = UNetConfig::from_json_str(&unet_json.to_string())?;
            let vae = recognise_ldm_vae(header, VAE_PREFIX)?;
            let text = recognise_text(header, family, None)?;
            (unet, vae, text, None)
        }
    };
    let text_layers_in_file = match family {
        Family::Sd1 => header.indices(&clip_layer_prefix(header)).len(),
        Family::Sd2 => header.indices(&format!("{OPEN_CLIP_PREFIX}transformer.resblocks.")).len(),
    };
    let has_ema = header.tensors.keys().any(|k| k.starts_with(EMA_PREFIX) && k != "model_ema.decay" && k != "model_ema.num_updates");
    if opts.ema && !has_ema {
        bail!("`ema = true` but {} has no EMA weights (`model_ema.*`)", path.display());
    }
    Ok(Recognition {
        path: path.to_path_buf(),
        family,
        unet,
        vae,
        text_encoder,
        prediction,
        configs_from,
        ignored: Vec::new(),
        uses_ema: opts.ema,
        text_layers_in_file,
    })
}

/// A prediction type as people write it (`epsilon`, `eps`, `v`, `v_prediction`, `v-prediction`,
/// `vpred`, `v_pred`; any case): a single file's metadata, `--prediction-type`.
pub fn prediction_word(word: &str) -> Option<PredictionType> {
    match word.trim().to_ascii_lowercase().as_str() {
        "epsilon" | "eps" => Some(PredictionType::Epsilon),
        "v" | "v_prediction" | "v-prediction" | "vpred" | "v_pred" => Some(PredictionType::VPrediction),
        _ => None,
    }
}

/// [`prediction_word`] for a command-line flag, refusing anything else.
pub fn prediction_flag(word: &str) -> anyhow::Result<PredictionType> {
    prediction_word(word).with_context(|| format!("`prediction_type` = \"{word}\" must be \"epsilon\" or \"v_prediction\""))
}

fn prediction_type(header: &Header, family: Family, opts: &SingleFileOptions) -> anyhow::Result<Prediction> {
    if let Some(kind) = opts.prediction_type {
        return Ok(Prediction { kind, reason: "set by [model] prediction_type".into() });
    }
    for key in ["modelspec.prediction_type", "prediction_type"] {
        if let Some(v) = header.metadata.get(key) {
            let k = prediction_word(v).with_context(|| format!("the file's metadata `{key}` = \"{v}\" is neither epsilon nor v"))?;
            return Ok(Prediction { kind: k, reason: format!("the file's metadata `{key}`") });
        }
    }
    if header.has("v_pred") {
        return Ok(Prediction { kind: PredictionType::VPrediction, reason: "the file's `v_pred` key".into() });
    }
    if let Some(dir) = &opts.config_dir {
        let path = dir.join(vocab::SCHEDULER_CONFIG);
        if path.is_file() {
            let s: SchedulerConfig = serde_json::from_str(&read_text(&path)?).with_context(|| format!("{} is not a scheduler config", path.display()))?;
            let kind = PredictionType::parse(&s.prediction_type)?;
            return Ok(Prediction { kind, reason: format!("the scheduler config of [model] config, {}", path.display()) });
        }
    }
    Ok(match family {
        Family::Sd1 => Prediction { kind: PredictionType::Epsilon, reason: "SD 1.x models predict noise".into() },
        Family::Sd2 => Prediction {
            kind: PredictionType::VPrediction,
            reason: "the SD 2.x 768 default, as diffusers guesses; SD 2.x base (512) models are epsilon: set [model] prediction_type".into(),
        },
    })
}

fn clip_layer_prefix(header: &Header) -> String {
    if header.tensors.keys().any(|k| k.starts_with(&format!("{CLIP_PREFIX}text_model."))) {
        format!("{CLIP_PREFIX}text_model.encoder.layers.")
    } else {
        format!("{CLIP_PREFIX}encoder.layers.")
    }
}

fn recognise_text(header: &Header, family: Family, layers: Option<usize>) -> anyhow::Result<ClipTextConfig> {
    let need = |k: String| header.shape(&k).map(<[usize]>::to_vec).with_context(|| format!("the text encoder has no `{k}`"));
    let (token, position, layer_count, fc1, act) = match family {
        Family::Sd1 => {
            let tm = if header.tensors.keys().any(|k| k.starts_with(&format!("{CLIP_PREFIX}text_model."))) { "text_model." } else { "" };
            let base = format!("{CLIP_PREFIX}{tm}");
            (
                need(format!("{base}embeddings.token_embedding.weight"))?,
                need(format!("{base}embeddings.position_embedding.weight"))?,
                header.indices(&format!("{base}encoder.layers.")).len(),
                need(format!("{base}encoder.layers.0.mlp.fc1.weight"))?,
                "quick_gelu",
            )
        }
        Family::Sd2 => {
            let base = OPEN_CLIP_PREFIX;
            let blocks = header.indices(&format!("{base}transformer.resblocks.")).len();
            (
                need(format!("{base}token_embedding.weight"))?,
                need(format!("{base}positional_embedding"))?,
                // SD 2.x reads the penultimate layer (`layer: penultimate`), so the last block is unused.
                blocks.saturating_sub(1),
                need(format!("{base}transformer.resblocks.0.mlp.c_fc.weight"))?,
                "gelu",
            )
        }
    };
    let hidden = token[1];
    if hidden % 64 != 0 {
        bail!("the text encoder is {hidden} wide, not a multiple of CLIP's head size 64, so its heads cannot be recognised; give `[model] config` (a diffusers folder with text_encoder/config.json)");
    }
    let text_json = json!({
        "vocab_size": token[0],
        "hidden_size": hidden,
        "intermediate_size": fc1[0],
        "num_hidden_layers": layers.unwrap_or(layer_count),
        "num_attention_heads": hidden / 64,
        "max_position_embeddings": position[0],
        "hidden_act": act,
        "layer_norm_eps": 1e-5,
    });
    ClipTextConfig::from_json_str(&text_json.to_string())
}

/// A VAE config from LDM VAE names under `prefix` (`first_stage_model.` or `` for a bare file).
fn recognise_ldm_vae(header: &Header, prefix: &str) -> anyhow::Result<VaeConfig> {
    let blocks = header.indices(&format!("{prefix}encoder.down.")).len();
    let layers = header.indices(&format!("{prefix}encoder.down.0.block.")).len();
    let channels: Vec<usize> = (0..blocks)
        .map(|i| {
            let k = format!("{prefix}encoder.down.{i}.block.0.conv1.weight");
            header.shape(&k).map(|s| s[0]).with_context(|| format!("the VAE has no `{k}`"))
        })
        .collect::<anyhow::Result<_>>()?;
    vae_config(header, prefix, channels, layers, &format!("{prefix}encoder.mid.attn_1.q.weight"))
}

/// A VAE config from diffusers VAE names (a separate diffusers-layout VAE file).
fn recognise_diffusers_vae(header: &Header) -> anyhow::Result<VaeConfig> {
    let blocks = header.indices("encoder.down_blocks.").len();
    let layers = header.indices("encoder.down_blocks.0.resnets.").len();
    let channels: Vec<usize> = (0..blocks)
        .map(|i| {
            let k = format!("encoder.down_blocks.{i}.resnets.0.conv1.weight");
            header.shape(&k).map(|s| s[0]).with_context(|| format!("the VAE has no `{k}`"))
        })
        .collect::<anyhow::Result<_>>()?;
    let attn = if header.has("encoder.mid_block.attentions.0.to_q.weight") {
        "encoder.mid_block.attentions.0.to_q.weight"
    } else {
        "encoder.mid_block.attentions.0.query.weight"
    };
    vae_config(header, "", channels, layers, attn)
}

fn vae_config(header: &Header, prefix: &str, channels: Vec<usize>, layers: usize, attention_key: &str) -> anyhow::Result<VaeConfig> {
    if channels.is_empty() || layers == 0 {
        bail!("cannot read the VAE's blocks (no `encoder.down.N.block.M` / `encoder.down_blocks.N.resnets.M` tensors)");
    }
    let need = |k: &str| header.shape(&format!("{prefix}{k}")).map(<[usize]>::to_vec).with_context(|| format!("the VAE has no `{prefix}{k}`"));
    let conv_in = need("encoder.conv_in.weight")?;
    let conv_out = need("decoder.conv_out.weight")?;
    let post_quant = header.shape(&format!("{prefix}post_quant_conv.weight")).map(<[usize]>::to_vec);
    let latent = match &post_quant {
        Some(s) => s[0],
        None => need("decoder.conv_in.weight")?[1],
    };
    let n = channels.len();
    let vae_json = json!({
        "in_channels": conv_in[1],
        "out_channels": conv_out[0],
        "block_out_channels": channels,
        "down_block_types": vec!["DownEncoderBlock2D"; n],
        "up_block_types": vec!["UpDecoderBlock2D"; n],
        "layers_per_block": layers,
        "latent_channels": latent,
        "use_quant_conv": header.has(&format!("{prefix}quant_conv.weight")),
        "use_post_quant_conv": post_quant.is_some(),
        "mid_block_add_attention": header.has(attention_key),
        "scaling_factor": 0.18215,
    });
    VaeConfig::from_json_str(&vae_json.to_string())
}

/// The tokenizer for a family: the bundled CLIP BPE files with SD 1.x's or SD 2.x's special
/// tokens (SD 2.x pads with `!`, as its published tokenizer config says).
pub fn bundled_tokenizer(family: Family) -> anyhow::Result<ClipTokenizer> {
    let mut settings = ClipTokenizerSettings::default();
    if family == Family::Sd2 {
        settings.pad_token = "!".into();
    }
    ClipTokenizer::from_vocab_merges_text(
        CLIP_VOCAB,
        CLIP_MERGES,
        settings,
        Path::new("<bundled clip-vocab.json>"),
        Path::new("<bundled clip-merges.txt>"),
    )
}

/// The bundled scheduler config of a family, with the recognised prediction type.
pub fn bundled_scheduler(family: Family, prediction: PredictionType) -> anyhow::Result<SchedulerConfig> {
    let text = match family {
        Family::Sd1 => SD1_SCHEDULER,
        Family::Sd2 => SD2_SCHEDULER,
    };
    let mut s: SchedulerConfig = serde_json::from_str(text).context("the bundled scheduler config")?;
    s.prediction_type = prediction.as_str().to_string();
    Ok(s)
}

/// The three components' weights of a single file, renamed to diffusers names.
pub struct SingleFileWeights {
    pub unet: ComponentWeights,
    pub vae: Option<ComponentWeights>,
    pub text_encoder: ComponentWeights,
}

/// Build the renaming weights of every component and check that every tensor of the file is
/// used or knowingly left out (`rec.ignored` is filled); an unknown tensor is an error naming it.
pub fn open_weights(rec: &mut Recognition, header: &Header, with_vae: bool) -> anyhow::Result<SingleFileWeights> {
    let path = rec.path.clone();
    let layout = unet_layout(header)?;
    let unet_rules = unet_map(&layout);
    let mut claimed: BTreeSet<&str> = BTreeSet::new();
    let mut ignored: Vec<(String, String)> = Vec::new();
    let mut unknown: Vec<String> = Vec::new();

    // UNet.
    let mut unet = Vec::new();
    for (name, _) in &header.tensors {
        let Some(rest) = name.strip_prefix(UNET_PREFIX) else { continue };
        claimed.insert(name);
        match unet_rules.to_diffusers(rest) {
            Some(diffusers) => {
                let stored = if rec.uses_ema { ema_name(name) } else { name.clone() };
                if rec.uses_ema && !header.has(&stored) {
                    bail!("{}: the EMA copy `{stored}` of `{name}` is missing", path.display());
                }
                unet.push(MappedTensor { name: diffusers, stored_name: stored, rows: None });
            }
            None => unknown.push(name.clone()),
        }
    }
    let rules = unet_rules.clone();
    let unet_hint: MissingHint = Arc::new(move |n: &str| rules.to_ldm(n).map(|l| format!("{UNET_PREFIX}{l}")));
    let unet = ComponentWeights::open_mapped("unet", &path, &unet, &WeightOptions::default(), Some(unet_hint))?;

    // VAE.
    let vae_blocks = header.indices(&format!("{VAE_PREFIX}encoder.down.")).len();
    let vae_layers = header.indices(&format!("{VAE_PREFIX}encoder.down.0.block.")).len();
    let vae_rules = vae_map(vae_blocks, vae_layers);
    let mut vae = Vec::new();
    for (name, _) in &header.tensors {
        let Some(rest) = name.strip_prefix(VAE_PREFIX) else { continue };
        claimed.insert(name);
        if rest.starts_with("loss.") {
            ignored.push((name.clone(), "VAE training-loss tensors".into()));
            continue;
        }
        if !with_vae {
            ignored.push((name.clone(), "VAE tensors replaced by [model] vae".into()));
            continue;
        }
        match vae_rules.to_diffusers(rest) {
            Some(diffusers) => vae.push(MappedTensor { name: diffusers, stored_name: name.clone(), rows: None }),
            None => unknown.push(name.clone()),
        }
    }
    let vae = if with_vae {
        let rules = vae_rules.clone();
        let hint: MissingHint = Arc::new(move |n: &str| rules.to_ldm(&super::loading::weights::modern_attention_name(n)).map(|l| format!("{VAE_PREFIX}{l}")));
        Some(ComponentWeights::open_mapped("vae", &path, &vae, &WeightOptions { legacy_attention_names: true, ..Default::default() }, Some(hint))?)
    } else {
        None
    };

    // Text encoder.
    let mut text = Vec::new();
    let layers = rec.text_encoder.num_hidden_layers;
    let hidden = rec.text_encoder.hidden_size;
    let text_hint: MissingHint;
    match rec.family {
        Family::Sd1 => {
            for (name, _) in &header.tensors {
                let Some(rest) = name.strip_prefix(CLIP_PREFIX) else { continue };
                claimed.insert(name);
                text.push(MappedTensor { name: rest.to_string(), stored_name: name.clone(), rows: None });
            }
            text_hint = Arc::new(|n: &str| Some(format!("{CLIP_PREFIX}{n}")));
        }
        Family::Sd2 => {
            let in_file = rec.text_layers_in_file;
            if in_file != layers && in_file != layers + 1 {
                bail!(
                    "{}: the text encoder config has {layers} layers but the file has {in_file} OpenCLIP blocks (expected {layers}, or {} of which SD 2.x leaves the last unused)",
                    path.display(),
                    layers + 1
                );
            }
            for (name, (shape, _)) in &header.tensors {
                let Some(rest) = name.strip_prefix(OPEN_CLIP_PREFIX) else { continue };
                claimed.insert(name);
                if rest == "text_projection" || rest == "logit_scale" {
                    ignored.push((name.clone(), "OpenCLIP projection tensors SD 2.x does not use".into()));
                    continue;
                }
                match open_clip_name(rest, layers) {
                    OpenClip::Plain(n) => text.push(MappedTensor { name: n, stored_name: name.clone(), rows: None }),
                    OpenClip::Fused(base, kind) => {
                        if shape.first() != Some(&(3 * hidden)) {
                            bail!("{}: `{name}` has shape {shape:?}; a fused q/k/v projection of width {hidden} has {} rows", path.display(), 3 * hidden);
                        }
                        for (i, q) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                            text.push(MappedTensor { name: format!("{base}.{q}.{kind}"), stored_name: name.clone(), rows: Some((i * hidden, hidden)) });
                        }
                    }
                    OpenClip::Unused => ignored.push((name.clone(), "tensors of the last OpenCLIP layer (SD 2.x reads the penultimate)".into())),
                    OpenClip::Unknown => unknown.push(name.clone()),
                }
            }
            text_hint = Arc::new(|n: &str| open_clip_ldm_name(n).map(|l| format!("{OPEN_CLIP_PREFIX}{l}")));
        }
    }
    let text_encoder = ComponentWeights::open_mapped(
        "text_encoder",
        &path,
        &text,
        &WeightOptions { optional_prefix: Some("text_model.".into()), ..Default::default() },
        Some(text_hint),
    )?;

    // Everything else.
    for name in header.tensors.keys() {
        if claimed.contains(name.as_str()) {
            continue;
        }
        if name.starts_with(EMA_PREFIX) {
            let why = if rec.uses_ema { "EMA bookkeeping" } else { "EMA weights (the UNet uses the non-EMA copy; set [model] ema = true for the EMA one)" };
            ignored.push((name.clone(), why.into()));
        } else if LDM_BUFFERS.contains(&name.as_str()) || name.starts_with("cond_stage_model.") && name.ends_with("position_ids") {
            ignored.push((name.clone(), "schedule buffers and flags".into()));
        } else {
            unknown.push(name.clone());
        }
    }
    if !unknown.is_empty() {
        const SHOWN: usize = 10;
        let mut list: Vec<String> = unknown.iter().take(SHOWN).map(|n| format!("`{n}` {:?}", header.tensors[n].0)).collect();
        if unknown.len() > SHOWN {
            list.push(format!("and {} more", unknown.len() - SHOWN));
        }
        bail!(
            "{}: {} tensor(s) are not part of an {} checkpoint as recognised: {}",
            path.display(),
            unknown.len(),
            rec.family.name(),
            list.join(", ")
        );
    }
    rec.ignored = ignored;
    Ok(SingleFileWeights { unet, vae, text_encoder })
}

/// `model.diffusion_model.a.b.c` → `model_ema.diffusion_modelabc`, as LDM's `LitEma` names its
/// copies (dots removed).
fn ema_name(name: &str) -> String {
    let rest = name.strip_prefix("model.").unwrap_or(name);
    format!("{EMA_PREFIX}{}", rest.replace('.', ""))
}

enum OpenClip {
    Plain(String),
    /// `text_model.encoder.layers.N.self_attn` and `weight` / `bias`.
    Fused(String, &'static str),
    Unused,
    Unknown,
}

/// The diffusers name of an OpenCLIP tensor (`rest` is after `cond_stage_model.model.`).
fn open_clip_name(rest: &str, layers: usize) -> OpenClip {
    match rest {
        "token_embedding.weight" => return OpenClip::Plain("text_model.embeddings.token_embedding.weight".into()),
        "positional_embedding" => return OpenClip::Plain("text_model.embeddings.position_embedding.weight".into()),
        "ln_final.weight" => return OpenClip::Plain("text_model.final_layer_norm.weight".into()),
        "ln_final.bias" => return OpenClip::Plain("text_model.final_layer_norm.bias".into()),
        _ => {}
    }
    let Some(block) = rest.strip_prefix("transformer.resblocks.") else { return OpenClip::Unknown };
    let Some((index, inner)) = block.split_once('.') else { return OpenClip::Unknown };
    let Ok(index) = index.parse::<usize>() else { return OpenClip::Unknown };
    if index >= layers {
        return if index == layers { OpenClip::Unused } else { OpenClip::Unknown };
    }
    let base = format!("text_model.encoder.layers.{index}");
    match inner {
        "attn.in_proj_weight" => return OpenClip::Fused(format!("{base}.self_attn"), "weight"),
        "attn.in_proj_bias" => return OpenClip::Fused(format!("{base}.self_attn"), "bias"),
        _ => {}
    }
    for (from, to) in [("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("attn.out_proj.", "self_attn.out_proj."), ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2.")] {
        if let Some(param) = inner.strip_prefix(from) {
            if param == "weight" || param == "bias" {
                return OpenClip::Plain(format!("{base}.{to}{param}"));
            }
        }
    }
    OpenClip::Unknown
}

/// The OpenCLIP name a diffusers text-encoder weight is stored as (for error messages).
fn open_clip_ldm_name(name: &str) -> Option<String> {
    let name = name.strip_prefix("text_model.").unwrap_or(name);
    match name {
        "embeddings.token_embedding.weight" => return Some("token_embedding.weight".into()),
        "embeddings.position_embedding.weight" => return Some("positional_embedding".into()),
        "final_layer_norm.weight" => return Some("ln_final.weight".into()),
        "final_layer_norm.bias" => return Some("ln_final.bias".into()),
        _ => {}
    }
    let rest = name.strip_prefix("encoder.layers.")?;
    let (index, inner) = rest.split_once('.')?;
    for (to, from) in [("ln_1.", "layer_norm1."), ("ln_2.", "layer_norm2."), ("attn.out_proj.", "self_attn.out_proj."), ("mlp.c_fc.", "mlp.fc1."), ("mlp.c_proj.", "mlp.fc2.")] {
        if let Some(param) = inner.strip_prefix(from) {
            return Some(format!("transformer.resblocks.{index}.{to}{param}"));
        }
    }
    for q in ["q_proj", "k_proj", "v_proj"] {
        if let Some(param) = inner.strip_prefix(&format!("self_attn.{q}.")) {
            return Some(format!("transformer.resblocks.{index}.attn.in_proj_{param}"));
        }
    }
    None
}

/// A separate VAE file: a diffusers-layout `AutoencoderKL` file, an LDM VAE (`encoder.down.*`),
/// or one with the `first_stage_model.` prefix. Returns its weights and config.
pub fn open_vae_file(path: &Path, scaling_factor: f64) -> anyhow::Result<(ComponentWeights, VaeConfig)> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or_default();
    if ext != "safetensors" {
        bail!(
            "VAE file {} is not a .safetensors file; lora reads safetensors only, because loading a pickle (.ckpt/.pt/.bin) can run arbitrary code",
            path.display()
        );
    }
    let header = Header::read(path)?;
    let (weights, mut config) = if header.tensors.keys().any(|k| k.starts_with("encoder.down_blocks.")) {
        let config = recognise_diffusers_vae(&header).with_context(|| format!("in {}", path.display()))?;
        let w = ComponentWeights::open("vae", &[path.to_path_buf()], &WeightOptions { legacy_attention_names: true, ..Default::default() })?;
        (w, config)
    } else {
        let prefix = if header.tensors.keys().any(|k| k.starts_with(VAE_PREFIX)) { VAE_PREFIX } else { "" };
        if !header.has(&format!("{prefix}encoder.conv_in.weight")) {
            bail!("{} is not a VAE file: it has no `encoder.conv_in.weight` (diffusers or LDM layout)", path.display());
        }
        let config = recognise_ldm_vae(&header, prefix).with_context(|| format!("in {}", path.display()))?;
        let rules = vae_map(config.block_out_channels.len(), config.layers_per_block);
        let mut mapped = Vec::new();
        let mut unknown = Vec::new();
        for name in header.tensors.keys() {
            let rest = name.strip_prefix(prefix).unwrap_or(name);
            if rest.starts_with("loss.") || (prefix.is_empty() && rest.starts_with("model_ema.")) {
                continue;
            }
            match (name.starts_with(prefix), rules.to_diffusers(rest)) {
                (true, Some(d)) => mapped.push(MappedTensor { name: d, stored_name: name.clone(), rows: None }),
                _ => unknown.push(format!("`{name}`")),
            }
        }
        if !unknown.is_empty() {
            bail!("VAE file {}: {} tensor(s) are not VAE weights: {}", path.display(), unknown.len(), unknown.into_iter().take(10).collect::<Vec<_>>().join(", "));
        }
        let hint_prefix = prefix.to_string();
        let hint: MissingHint = Arc::new(move |n: &str| rules.to_ldm(&super::loading::weights::modern_attention_name(n)).map(|l| format!("{hint_prefix}{l}")));
        let w = ComponentWeights::open_mapped("vae", path, &mapped, &WeightOptions { legacy_attention_names: true, ..Default::default() }, Some(hint))?;
        (w, config)
    };
    config.scaling_factor = scaling_factor;
    Ok((weights, config))
}

/// Tokenizer and scheduler for a recognised file: from `[model] config` when given, else bundled.
pub fn tokenizer_and_scheduler(rec: &Recognition) -> anyhow::Result<(ClipTokenizer, SchedulerConfig)> {
    match &rec.configs_from {
        Some(dir) => {
            let tokenizer = ClipTokenizer::from_dir(&dir.join(vocab::TOKENIZER_DIR)).with_context(|| format!("the tokenizer of {}", dir.display()))?;
            let path = dir.join(vocab::SCHEDULER_CONFIG);
            let mut scheduler: SchedulerConfig =
                serde_json::from_str(&read_text(&path)?).with_context(|| format!("{} is not a valid scheduler config", path.display()))?;
            scheduler.prediction_type = rec.prediction.kind.as_str().to_string();
            Ok((tokenizer, scheduler))
        }
        None => Ok((bundled_tokenizer(rec.family)?, bundled_scheduler(rec.family, rec.prediction.kind)?)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header with SD 1.5's real tensor shapes (no data), built from the published layout:
    /// recognition must give SD 1.5's published `unet/config.json` values.
    fn sd15_like_header() -> Header {
        let mut h = Header::default();
        let mut put = |k: &str, s: &[usize]| {
            h.tensors.insert(k.to_string(), (s.to_vec(), "F16".into()));
        };
        let ch = [320, 640, 1280, 1280];
        put("model.diffusion_model.input_blocks.0.0.weight", &[320, 4, 3, 3]);
        put("model.diffusion_model.time_embed.0.weight", &[1280, 320]);
        put("model.diffusion_model.out.2.weight", &[4, 320, 3, 3]);
        for i in 0..4 {
            for j in 0..2 {
                let idx = 1 + i * 3 + j;
                put(&format!("model.diffusion_model.input_blocks.{idx}.0.out_layers.3.weight"), &[ch[i], ch[i], 3, 3]);
                if i < 3 {
                    put(&format!("model.diffusion_model.input_blocks.{idx}.1.proj_in.weight"), &[ch[i], ch[i], 1, 1]);
                    put(&format!("model.diffusion_model.input_blocks.{idx}.1.transformer_blocks.0.attn2.to_k.weight"), &[ch[i], 768]);
                }
            }
            if i < 3 {
                put(&format!("model.diffusion_model.input_blocks.{}.0.op.weight", (i + 1) * 3), &[ch[i], ch[i], 3, 3]);
            }
            for j in 0..3 {
                let idx = i * 3 + j;
                put(&format!("model.diffusion_model.output_blocks.{idx}.0.out_layers.3.weight"), &[1, 1]);
                if i > 0 {
                    put(&format!("model.diffusion_model.output_blocks.{idx}.1.proj_in.weight"), &[1, 1, 1, 1]);
                }
            }
        }
        put("model.diffusion_model.middle_block.1.proj_in.weight", &[1280, 1280, 1, 1]);
        put("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", &[49408, 768]);
        put("cond_stage_model.transformer.text_model.embeddings.position_embedding.weight", &[77, 768]);
        for l in 0..12 {
            put(&format!("cond_stage_model.transformer.text_model.encoder.layers.{l}.mlp.fc1.weight"), &[3072, 768]);
        }
        let vch = [128, 256, 512, 512];
        for i in 0..4 {
            for j in 0..2 {
                put(&format!("first_stage_model.encoder.down.{i}.block.{j}.conv1.weight"), &[vch[i], vch[i], 3, 3]);
            }
        }
        put("first_stage_model.encoder.conv_in.weight", &[128, 3, 3, 3]);
        put("first_stage_model.decoder.conv_out.weight", &[3, 128, 3, 3]);
        put("first_stage_model.quant_conv.weight", &[8, 8, 1, 1]);
        put("first_stage_model.post_quant_conv.weight", &[4, 4, 1, 1]);
        put("first_stage_model.encoder.mid.attn_1.q.weight", &[512, 512, 1, 1]);
        h
    }

    #[test]
    fn sd15_shapes_are_recognised_as_the_published_config() {
        let h = sd15_like_header();
        let rec = recognise(Path::new("sd15.safetensors"), &h, &SingleFileOptions::default()).unwrap();
        assert_eq!(rec.family, Family::Sd1);
        // The values of stable-diffusion-v1-5's unet/config.json, vae/config.json and text_encoder/config.json.
        assert_eq!(rec.unet.block_out_channels, vec![320, 640, 1280, 1280]);
        assert_eq!(rec.unet.layers_per_block, vec![2; 4]);
        assert_eq!(rec.unet.num_attention_heads, vec![8; 4]);
        assert_eq!(rec.unet.cross_attention_dim, vec![768; 4]);
        assert!(!rec.unet.use_linear_projection);
        assert_eq!(rec.unet.time_embed_dim, 1280);
        assert_eq!(rec.unet.sample_size, Some(64));
        assert_eq!(rec.vae.block_out_channels, vec![128, 256, 512, 512]);
        assert_eq!(rec.vae.layers_per_block, 2);
        assert_eq!(rec.vae.latent_channels, 4);
        assert_eq!((rec.text_encoder.hidden_size, rec.text_encoder.num_hidden_layers, rec.text_encoder.num_attention_heads), (768, 12, 12));
        assert_eq!(rec.text_encoder.intermediate_size, 3072);
        assert_eq!(rec.prediction.kind, PredictionType::Epsilon);
    }

    #[test]
    fn prediction_type_comes_from_override_then_file_then_family() {
        let mut h = sd15_like_header();
        let opts = SingleFileOptions { prediction_type: Some(prediction_flag("v").unwrap()), ..Default::default() };
        assert_eq!(prediction_type(&h, Family::Sd1, &opts).unwrap().kind, PredictionType::VPrediction);
        h.tensors.insert("v_pred".into(), (vec![], "F32".into()));
        let p = prediction_type(&h, Family::Sd1, &SingleFileOptions::default()).unwrap();
        assert_eq!((p.kind.as_str(), p.reason.as_str()), ("v_prediction", "the file's `v_pred` key"));
        h.tensors.remove("v_pred");
        h.metadata.insert("modelspec.prediction_type".into(), "epsilon".into());
        assert_eq!(prediction_type(&h, Family::Sd2, &SingleFileOptions::default()).unwrap().kind, PredictionType::Epsilon);
        h.metadata.clear();
        assert_eq!(prediction_type(&h, Family::Sd2, &SingleFileOptions::default()).unwrap().kind, PredictionType::VPrediction);
        assert!(prediction_flag("x0").is_err());
    }

    #[test]
    fn unet_names_map_both_ways() {
        let layout = unet_layout(&sd15_like_header()).unwrap();
        let m = unet_map(&layout);
        for (ldm, diffusers) in [
            ("input_blocks.4.0.in_layers.2.weight", "down_blocks.1.resnets.0.conv1.weight"),
            ("input_blocks.9.0.op.bias", "down_blocks.2.downsamplers.0.conv.bias"),
            ("input_blocks.8.1.transformer_blocks.0.attn1.to_q.weight", "down_blocks.2.attentions.1.transformer_blocks.0.attn1.to_q.weight"),
            ("output_blocks.2.1.conv.weight", "up_blocks.0.upsamplers.0.conv.weight"),
            ("output_blocks.5.2.conv.weight", "up_blocks.1.upsamplers.0.conv.weight"),
            ("output_blocks.3.0.skip_connection.weight", "up_blocks.1.resnets.0.conv_shortcut.weight"),
            ("middle_block.2.emb_layers.1.bias", "mid_block.resnets.1.time_emb_proj.bias"),
            ("time_embed.2.weight", "time_embedding.linear_2.weight"),
            ("out.0.bias", "conv_norm_out.bias"),
        ] {
            assert_eq!(m.to_diffusers(ldm).as_deref(), Some(diffusers), "{ldm}");
            assert_eq!(m.to_ldm(diffusers).as_deref(), Some(ldm), "{diffusers}");
        }
    }

    #[test]
    fn vae_and_open_clip_names_map() {
        let m = vae_map(4, 2);
        assert_eq!(m.to_diffusers("decoder.up.3.block.2.nin_shortcut.weight").as_deref(), Some("decoder.up_blocks.0.resnets.2.conv_shortcut.weight"));
        assert_eq!(m.to_diffusers("encoder.mid.attn_1.proj_out.bias").as_deref(), Some("encoder.mid_block.attentions.0.to_out.0.bias"));
        assert_eq!(m.to_diffusers("decoder.up.0.upsample.conv.weight"), None, "the last up block has no upsampler");
        assert_eq!(m.to_diffusers("decoder.up.1.upsample.conv.weight").as_deref(), Some("decoder.up_blocks.2.upsamplers.0.conv.weight"));
        assert!(matches!(open_clip_name("transformer.resblocks.22.attn.in_proj_weight", 23), OpenClip::Fused(b, "weight") if b == "text_model.encoder.layers.22.self_attn"));
        assert!(matches!(open_clip_name("transformer.resblocks.23.ln_1.weight", 23), OpenClip::Unused));
        assert_eq!(open_clip_ldm_name("text_model.encoder.layers.3.self_attn.k_proj.bias").as_deref(), Some("transformer.resblocks.3.attn.in_proj_bias"));
        assert_eq!(ema_name("model.diffusion_model.input_blocks.0.0.weight"), "model_ema.diffusion_modelinput_blocks00weight");
    }
}
