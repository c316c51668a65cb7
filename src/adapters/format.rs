//! LoRA files: read diffusers / PEFT / attention-processor / kohya safetensors into one
//! in-memory form ([`LoraWeights`]), write diffusers (as the reference saves it), kohya and PEFT.
//!
//! Key forms read (text-encoder forms in brackets):
//! - diffusers: `unet.<module>.lora.down.weight` / `.lora.up.weight`
//!   (`text_encoder.<module>.lora_linear_layer.down.weight`, or `.lora.down.weight`);
//! - PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight`, with or without `.default`, also
//!   `base_model.model.<module>...` as PEFT's own `save_pretrained` writes;
//! - old attention processors: `unet.<attn>.processor.to_q_lora.down.weight`, `to_out_lora` →
//!   `to_out.0` (`text_encoder.<attn>.to_q_lora.down.weight` → `q_proj`, `to_out_lora` → `out_proj`);
//! - kohya: `lora_unet_<module with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`
//!   (`lora_te_`, `lora_te1_`; `lora_te2_` for SDXL's second encoder).
//!
//! Alpha: a module without alpha has scale 1 (alpha = r), as diffusers applies it; with an alpha
//! the scale is alpha / r. Our diffusers and PEFT writers store alphas that differ from the rank
//! in the header key `lora_adapter_metadata` (diffusers' own convention), and read it back.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use safetensors::{Dtype, SafeTensors};

/// The header key under which diffusers stores the LoraConfig of each component.
pub const ADAPTER_METADATA_KEY: &str = "lora_adapter_metadata";
/// Our header key holding the resolved pipeline TOML a LoRA was trained with.
pub const PIPELINE_TOML_KEY: &str = "lora_pipeline_toml";
/// Our header key holding the sha256 (hex) of [`PIPELINE_TOML_KEY`]'s value.
pub const PIPELINE_SHA256_KEY: &str = "lora_pipeline_sha256";

/// A LoRA file's key layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum LoraFormat {
    /// `unet.<module>.lora.down.weight`: what the reference training script saves.
    Diffusers,
    /// `unet.<module>.lora_A.weight`: PEFT parameter names (training checkpoints).
    Peft,
    /// `unet.<attn>.processor.to_q_lora.down.weight`: diffusers' old attention processors (read only).
    AttnProcessor,
    /// `lora_unet_<module with _>.lora_down.weight` + `.alpha`: kohya / A1111.
    Kohya,
}

impl fmt::Display for LoraFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Diffusers => "diffusers",
            Self::Peft => "peft",
            Self::AttnProcessor => "diffusers attention-processor (old)",
            Self::Kohya => "kohya",
        })
    }
}

impl std::str::FromStr for LoraFormat {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "diffusers" => Ok(Self::Diffusers),
            "peft" => Ok(Self::Peft),
            "kohya" => Ok(Self::Kohya),
            _ => bail!("unknown LoRA format `{s}`; expected diffusers, kohya or peft"),
        }
    }
}

/// Which model a LoRA module belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Component {
    Unet,
    TextEncoder,
    /// SDXL's second text encoder (`lora_te2_`, `text_encoder_2.`): read and written, never applied.
    TextEncoder2,
}

impl Component {
    fn diffusers_prefix(self) -> &'static str {
        match self {
            Self::Unet => "unet",
            Self::TextEncoder => "text_encoder",
            Self::TextEncoder2 => "text_encoder_2",
        }
    }
    fn kohya_prefix(self) -> &'static str {
        match self {
            Self::Unet => "lora_unet_",
            Self::TextEncoder => "lora_te_",
            Self::TextEncoder2 => "lora_te2_",
        }
    }
}

/// One module's LoRA: `down` A `[r, in]`, `up` B `[out, r]` (f32 on CPU when read), and the
/// alpha if the file gave one.
#[derive(Clone, Debug)]
pub struct LoraModule {
    pub down: Tensor,
    pub up: Tensor,
    pub alpha: Option<f64>,
}

impl LoraModule {
    pub fn rank(&self) -> usize {
        self.down.dims()[0]
    }
    /// The branch scale: alpha / r, or 1 without alpha (diffusers' rule).
    pub fn scale(&self) -> f64 {
        self.alpha.map_or(1.0, |a| a / self.rank() as f64)
    }
    /// The alpha that gives [`Self::scale`]: the stored one, or r.
    pub fn effective_alpha(&self) -> f64 {
        self.alpha.unwrap_or(self.rank() as f64)
    }
    pub fn param_count(&self) -> usize {
        self.down.elem_count() + self.up.elem_count()
    }
}

/// A LoRA in memory, independent of the file format.
#[derive(Clone, Debug, Default)]
pub struct LoraWeights {
    /// UNet modules by full diffusers name (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`).
    pub unet: BTreeMap<String, LoraModule>,
    /// Text-encoder modules by full transformers name (`text_model.encoder.layers.0.self_attn.q_proj`).
    pub text_encoder: BTreeMap<String, LoraModule>,
    /// SDXL's second text encoder, if the file has one.
    pub text_encoder_2: BTreeMap<String, LoraModule>,
    /// Header metadata (`__metadata__`) as read, or to write with the kohya form.
    pub metadata: BTreeMap<String, String>,
    /// The format the weights were read from (`None` when built in memory).
    pub source_format: Option<LoraFormat>,
    /// The file's weight tensors that hold NaN or infinite values, in key order (filled when
    /// read; empty when built in memory). [`LoraWeights::check_finite`] refuses them.
    pub non_finite: Vec<NonFiniteTensor>,
}

/// A weight tensor of a LoRA file with NaN or infinite values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NonFiniteTensor {
    /// The tensor's key in the file.
    pub key: String,
    /// How many of its values are NaN.
    pub nan: usize,
    /// How many are +inf or -inf.
    pub inf: usize,
    /// How many values it has.
    pub total: usize,
}

impl fmt::Display for NonFiniteTensor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` ({} NaN, {} infinite of {} values)", self.key, self.nan, self.inf, self.total)
    }
}

impl LoraWeights {
    pub fn component(&self, c: Component) -> &BTreeMap<String, LoraModule> {
        match c {
            Component::Unet => &self.unet,
            Component::TextEncoder => &self.text_encoder,
            Component::TextEncoder2 => &self.text_encoder_2,
        }
    }
    fn component_mut(&mut self, c: Component) -> &mut BTreeMap<String, LoraModule> {
        match c {
            Component::Unet => &mut self.unet,
            Component::TextEncoder => &mut self.text_encoder,
            Component::TextEncoder2 => &mut self.text_encoder_2,
        }
    }
    /// Every (component, module name, module), UNet first.
    pub fn modules(&self) -> impl Iterator<Item = (Component, &String, &LoraModule)> {
        [Component::Unet, Component::TextEncoder, Component::TextEncoder2]
            .into_iter()
            .flat_map(move |c| self.component(c).iter().map(move |(n, m)| (c, n, m)))
    }
    /// Number of LoRA parameters (A and B of every module).
    pub fn param_count(&self) -> usize {
        self.modules().map(|(_, _, m)| m.param_count()).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.unet.is_empty() && self.text_encoder.is_empty() && self.text_encoder_2.is_empty()
    }
    /// Refuse weights read with NaN or infinite values (see [`Self::non_finite`]), naming each
    /// such tensor: applied, they turn every image black; converted, they spread the damage.
    pub fn check_finite(&self) -> Result<()> {
        if self.non_finite.is_empty() {
            return Ok(());
        }
        let shown: Vec<String> = self.non_finite.iter().take(5).map(|t| t.to_string()).collect();
        let more = if self.non_finite.len() > shown.len() { format!(" and {} more", self.non_finite.len() - shown.len()) } else { String::new() };
        bail!(
            "{} tensor(s) hold NaN or infinite values: {}{more}; the file is damaged or was saved from a diverged training run \
             (use an earlier checkpoint, or train again with a lower learning rate); `lora inspect` lists them all",
            self.non_finite.len(),
            shown.join(", ")
        )
    }
}

/// What a training run knows about itself, for the kohya header (`ss_*` keys A1111 shows) and
/// our own keys.
#[derive(Clone, Debug, Default)]
pub struct TrainingInfo {
    /// e.g. `sd_v1`, `sd_v2`, `sdxl_base_v1-0`.
    pub base_model_version: String,
    /// The model source (`ss_sd_model_name`).
    pub model_name: String,
    pub rank: usize,
    pub alpha: f64,
    pub learning_rate: f64,
    pub max_train_steps: u64,
    pub epochs: u64,
    pub batch_size: usize,
    pub resolution: usize,
    pub seed: Option<u64>,
    pub num_train_images: usize,
    pub v_prediction: bool,
    pub train_text_encoder: bool,
    /// The resolved pipeline as TOML; stored with its sha256.
    pub pipeline_toml: String,
    /// Seconds since the Unix epoch when training started / ended.
    pub training_started_at: Option<u64>,
    pub training_finished_at: Option<u64>,
}

/// Header metadata for a kohya file written after training: the `ss_*` keys A1111 reads, and
/// the resolved pipeline TOML and its sha256 under [`PIPELINE_TOML_KEY`] / [`PIPELINE_SHA256_KEY`].
pub fn training_metadata(info: &TrainingInfo) -> BTreeMap<String, String> {
    use sha2::Digest;
    let mut m = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        m.insert(k.to_string(), v);
    };
    put("ss_network_module", "networks.lora".into());
    put("ss_network_dim", info.rank.to_string());
    put("ss_network_alpha", fmt_number(info.alpha));
    put("ss_base_model_version", info.base_model_version.clone());
    put("ss_sd_model_name", info.model_name.clone());
    put("ss_learning_rate", info.learning_rate.to_string());
    put("ss_unet_lr", info.learning_rate.to_string());
    put("ss_max_train_steps", info.max_train_steps.to_string());
    put("ss_num_epochs", info.epochs.to_string());
    put("ss_batch_size_per_device", info.batch_size.to_string());
    put("ss_resolution", format!("({}, {})", info.resolution, info.resolution));
    put("ss_num_train_images", info.num_train_images.to_string());
    put("ss_v2", (info.base_model_version.starts_with("sd_v2")).to_string());
    put("ss_v_parameterization", info.v_prediction.to_string());
    put("ss_network_train_unet_only", (!info.train_text_encoder).to_string());
    if let Some(seed) = info.seed {
        put("ss_seed", seed.to_string());
    }
    if let Some(t) = info.training_started_at {
        put("ss_training_started_at", t.to_string());
    }
    if let Some(t) = info.training_finished_at {
        put("ss_training_finished_at", t.to_string());
    }
    put("ss_training_comment", format!("trained with lora {}", env!("CARGO_PKG_VERSION")));
    let digest = sha2::Sha256::digest(info.pipeline_toml.as_bytes());
    put(PIPELINE_SHA256_KEY, digest.iter().map(|b| format!("{b:02x}")).collect());
    put(PIPELINE_TOML_KEY, info.pipeline_toml.clone());
    m
}

fn fmt_number(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        x.to_string()
    }
}

// ---------------------------------------------------------------------------------------------
// Reading

/// Which half of a module a key holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Part {
    Down,
    Up,
    Alpha,
}

/// A key understood: component, module name, part, and the format it is written in.
#[derive(Clone, Debug)]
struct ParsedKey {
    component: Component,
    module: String,
    part: Part,
    /// `None` for alpha keys outside kohya files (they do not say which form the file is).
    format: Option<LoraFormat>,
}

/// Understand one tensor name of a LoRA file.
fn parse_key(key: &str) -> Result<ParsedKey> {
    for (prefix, component) in [
        ("lora_unet_", Component::Unet),
        ("lora_te1_", Component::TextEncoder),
        ("lora_te2_", Component::TextEncoder2),
        ("lora_te_", Component::TextEncoder),
    ] {
        let Some(rest) = key.strip_prefix(prefix) else { continue };
        let (stem, suffix) = rest.split_once('.').ok_or_else(|| anyhow!("kohya key `{key}` has no `.lora_down.weight`, `.lora_up.weight` or `.alpha` suffix"))?;
        let part = match suffix {
            "lora_down.weight" => Part::Down,
            "lora_up.weight" => Part::Up,
            "alpha" => Part::Alpha,
            "dora_scale" => bail!("key `{key}`: DoRA LoRAs are not supported"),
            _ => bail!("kohya key `{key}`: unknown suffix `.{suffix}` (expected lora_down.weight, lora_up.weight or alpha)"),
        };
        if stem.is_empty() {
            bail!("kohya key `{key}` names no module");
        }
        return Ok(ParsedKey { component, module: kohya_to_module(component, stem), part, format: Some(LoraFormat::Kohya) });
    }

    let (component, rest) = if let Some(r) = key.strip_prefix("unet.") {
        (Component::Unet, r)
    } else if let Some(r) = key.strip_prefix("text_encoder_2.") {
        (Component::TextEncoder2, r)
    } else if let Some(r) = key.strip_prefix("text_encoder.") {
        (Component::TextEncoder, r)
    } else if let Some(r) = key.strip_prefix("base_model.model.") {
        let c = if r.starts_with("text_model.") { Component::TextEncoder } else { Component::Unet };
        (c, r)
    } else {
        bail!("key `{key}` is not a LoRA key we understand: it starts with none of `unet.`, `text_encoder.`, `text_encoder_2.`, `base_model.model.`, `lora_unet_`, `lora_te_`");
    };

    let parsed = |module: &str, part, format| -> Result<ParsedKey> {
        if module.is_empty() {
            bail!("key `{key}` names no module");
        }
        Ok(ParsedKey { component, module: module.to_string(), part, format })
    };
    if let Some(m) = rest.strip_suffix(".alpha") {
        return parsed(m, Part::Alpha, None);
    }
    for (suffix, part, format) in [
        (".lora_A.weight", Part::Down, LoraFormat::Peft),
        (".lora_B.weight", Part::Up, LoraFormat::Peft),
        (".lora_A.default.weight", Part::Down, LoraFormat::Peft),
        (".lora_B.default.weight", Part::Up, LoraFormat::Peft),
        (".lora.down.weight", Part::Down, LoraFormat::Diffusers),
        (".lora.up.weight", Part::Up, LoraFormat::Diffusers),
        (".lora_linear_layer.down.weight", Part::Down, LoraFormat::Diffusers),
        (".lora_linear_layer.up.weight", Part::Up, LoraFormat::Diffusers),
    ] {
        if let Some(m) = rest.strip_suffix(suffix) {
            return parsed(m, part, Some(format));
        }
    }
    // Old attention processors: `<attn>[.processor].to_q_lora.down.weight`.
    for (proj, unet_name, te_name) in [("to_q", "to_q", "q_proj"), ("to_k", "to_k", "k_proj"), ("to_v", "to_v", "v_proj"), ("to_out", "to_out.0", "out_proj")] {
        for (half, part) in [("down", Part::Down), ("up", Part::Up)] {
            let suffix = format!(".{proj}_lora.{half}.weight");
            if let Some(attn) = rest.strip_suffix(suffix.as_str()) {
                let attn = attn.strip_suffix(".processor").unwrap_or(attn);
                let name = if component == Component::Unet { unet_name } else { te_name };
                return parsed(&format!("{attn}.{name}"), part, Some(LoraFormat::AttnProcessor));
            }
        }
    }
    if rest.contains("dora") || rest.contains("magnitude") {
        bail!("key `{key}`: DoRA LoRAs are not supported");
    }
    bail!("key `{key}` is not a LoRA key we understand (expected `.lora.down.weight`, `.lora_A.weight`, `.to_q_lora.down.weight`, `.alpha`, ...)")
}

/// Module-name parts that contain underscores, longest first, used to turn kohya's
/// underscore-joined names back into dotted module names (diffusers' fixed rules, our table).
const COMPOUND_PARTS: &[&str] = &[
    "transformer_blocks",
    "conv_norm_out",
    "time_emb_proj",
    "conv_shortcut",
    "time_embedding",
    "add_embedding",
    "final_layer_norm",
    "position_embedding",
    "token_embedding",
    "lora_linear_layer",
    "down_blocks",
    "up_blocks",
    "mid_block",
    "downsamplers",
    "upsamplers",
    "text_model",
    "self_attn",
    "layer_norm1",
    "layer_norm2",
    "add_k_proj",
    "add_v_proj",
    "add_q_proj",
    "to_add_out",
    "conv_in",
    "conv_out",
    "proj_in",
    "proj_out",
    "linear_1",
    "linear_2",
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "to_q",
    "to_k",
    "to_v",
    "to_out",
];

/// `down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0` →
/// `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0`: split on `_`, then
/// re-join runs that form a known module-name part. When the model is at hand, matching by
/// the underscore form of its real names is exact (see `lora::apply_lora_weights`).
pub fn kohya_to_module(_component: Component, stem: &str) -> String {
    let words: Vec<&str> = stem.split('_').collect();
    let mut parts: Vec<String> = Vec::new();
    let mut i = 0;
    'outer: while i < words.len() {
        for compound in COMPOUND_PARTS {
            let n = compound.split('_').count();
            if i + n <= words.len() && words[i..i + n].join("_") == *compound {
                parts.push(compound.to_string());
                i += n;
                continue 'outer;
            }
        }
        parts.push(words[i].to_string());
        i += 1;
    }
    parts.join(".")
}

/// Text-encoder module names always start at `text_model.` (transformers 4 layout); files
/// saved from transformers 5's flattened `CLIPTextModel` name them from `encoder.` on.
fn canonical_module_name(component: Component, module: &str) -> String {
    let flattened = ["encoder.", "embeddings.", "final_layer_norm"].iter().any(|p| module.starts_with(p));
    if component != Component::Unet && flattened {
        format!("text_model.{module}")
    } else {
        module.to_string()
    }
}

/// The key a module's down weight has in `format` (for messages and tools).
pub fn down_key(format: LoraFormat, component: Component, module: &str) -> String {
    let p = component.diffusers_prefix();
    match format {
        LoraFormat::Diffusers if component == Component::Unet => format!("{p}.{module}.lora.down.weight"),
        LoraFormat::Diffusers => format!("{p}.{module}.lora_linear_layer.down.weight"),
        LoraFormat::Peft => format!("{p}.{module}.lora_A.weight"),
        LoraFormat::AttnProcessor => format!("{p}.{module} (attention-processor form)"),
        LoraFormat::Kohya => format!("{}.lora_down.weight", module_to_kohya(component, module)),
    }
}

/// The kohya stem of a module: every `.` becomes `_`.
pub fn module_to_kohya(component: Component, module: &str) -> String {
    format!("{}{}", component.kohya_prefix(), module.replace('.', "_"))
}

/// A tensor of any float dtype as f32 on CPU; any numeric scalar as f64 for alphas.
fn view_to_tensor(key: &str, view: &safetensors::tensor::TensorView<'_>) -> Result<Tensor> {
    let dtype = match view.dtype() {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F64 => DType::F64,
        Dtype::I64 => DType::I64,
        Dtype::U8 => DType::U8,
        Dtype::U32 => DType::U32,
        other => bail!("tensor `{key}` has dtype {other:?}, which a LoRA weight cannot have"),
    };
    let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)
        .with_context(|| format!("tensor `{key}`: cannot read {:?} {:?}", view.dtype(), view.shape()))?;
    Ok(t)
}

fn scalar_alpha(key: &str, view: &safetensors::tensor::TensorView<'_>) -> Result<f64> {
    if view.shape().iter().product::<usize>() != 1 {
        bail!("alpha `{key}` must be a single number, has shape {:?}", view.shape());
    }
    let data = view.data();
    let value = match view.dtype() {
        Dtype::I64 => i64::from_le_bytes(data.try_into()?) as f64,
        Dtype::I32 => i32::from_le_bytes(data.try_into()?) as f64,
        Dtype::F32 => f32::from_le_bytes(data.try_into()?) as f64,
        Dtype::F64 => f64::from_le_bytes(data.try_into()?),
        Dtype::F16 => half::f16::from_le_bytes(data.try_into()?).to_f64(),
        Dtype::BF16 => half::bf16::from_le_bytes(data.try_into()?).to_f64(),
        other => bail!("alpha `{key}` has dtype {other:?}; expected a number"),
    };
    if !(value.is_finite() && value > 0.0) {
        bail!("alpha `{key}` is {value}; it must be a positive number");
    }
    Ok(value)
}

/// Read a LoRA file to use it (apply, convert): [`read_lora_file`], refusing NaN or infinite
/// weights with the tensors named ([`LoraWeights::check_finite`]).
pub fn read_lora_file_for_use(path: &Path) -> Result<LoraWeights> {
    let weights = read_lora_file(path)?;
    weights.check_finite().with_context(|| format!("LoRA file {}", path.display()))?;
    Ok(weights)
}

/// Read a LoRA file in any supported format. NaN or infinite weights are read and listed in
/// [`LoraWeights::non_finite`]; [`read_lora_file_for_use`] refuses them.
pub fn read_lora_file(path: &Path) -> Result<LoraWeights> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if matches!(ext, "bin" | "pt" | "pth" | "ckpt") {
        bail!("{}: only safetensors LoRA files are read; `.{ext}` files are Python pickles, which can run code when loaded", path.display());
    }
    let bytes = std::fs::read(path).with_context(|| format!("cannot read LoRA file {}", path.display()))?;
    parse_lora_bytes(&bytes).with_context(|| format!("LoRA file {}", path.display()))
}

/// Explain a safetensors header error: which tensor and which offsets are wrong.
fn header_error(bytes: &[u8], err: safetensors::SafeTensorError) -> anyhow::Error {
    let Some(prefix) = bytes.get(..8) else {
        return anyhow!("not a safetensors file: {} bytes, shorter than the 8-byte header length", bytes.len());
    };
    let n = u64::from_le_bytes(prefix.try_into().expect("8 bytes"));
    if n.saturating_add(8) > bytes.len() as u64 {
        return anyhow!(
            "damaged safetensors header: it claims {n} header bytes at offset 8, but the file has only {} bytes ({err})",
            bytes.len()
        );
    }
    let header_end = 8 + n as usize;
    let data_len = (bytes.len() - header_end) as u64;
    let generic = || anyhow!("damaged safetensors header (JSON at offsets 8..{header_end}; file is {} bytes): {err}", bytes.len());
    let Ok(serde_json::Value::Object(header)) = serde_json::from_slice::<serde_json::Value>(&bytes[8..header_end]) else {
        return generic();
    };
    // Walk the entries in data order and name the first one that does not add up.
    let mut entries: Vec<(u64, u64, &String, &serde_json::Value)> = Vec::new();
    for (name, info) in &header {
        if name == "__metadata__" {
            continue;
        }
        let offsets = info.get("data_offsets").and_then(|o| o.as_array());
        let (Some(start), Some(end)) = (
            offsets.and_then(|o| o.first()).and_then(|v| v.as_u64()),
            offsets.and_then(|o| o.get(1)).and_then(|v| v.as_u64()),
        ) else {
            return anyhow!("damaged safetensors header: tensor `{name}` has no valid `data_offsets` ({err})");
        };
        entries.push((start, end, name, info));
    }
    entries.sort_by_key(|e| (e.0, e.1));
    let mut expected_start = 0u64;
    for (start, end, name, info) in entries {
        let elem_size = match info.get("dtype").and_then(|d| d.as_str()) {
            Some("F64" | "I64" | "U64") => 8,
            Some("F32" | "I32" | "U32") => 4,
            Some("F16" | "BF16" | "I16" | "U16") => 2,
            Some("U8" | "I8" | "BOOL" | "F8_E4M3" | "F8_E5M2") => 1,
            other => return anyhow!("damaged safetensors header: tensor `{name}` has dtype {other:?} ({err})"),
        };
        let shape: Option<Vec<u64>> = info.get("shape").and_then(|s| s.as_array()).map(|s| s.iter().filter_map(|d| d.as_u64()).collect());
        let Some(shape) = shape else {
            return anyhow!("damaged safetensors header: tensor `{name}` has no valid `shape` ({err})");
        };
        let want = shape.iter().try_fold(elem_size, |acc: u64, d| acc.checked_mul(*d));
        if start != expected_start {
            return anyhow!("damaged safetensors header: tensor `{name}` starts at data offset {start}, expected {expected_start} (overlap or gap)");
        }
        if want != Some(end.saturating_sub(start)) || end < start {
            return anyhow!(
                "damaged safetensors header: tensor `{name}` has shape {shape:?} ({} bytes) but data offsets {start}..{end} ({} bytes)",
                want.map_or("too many".to_string(), |w| w.to_string()),
                end.saturating_sub(start)
            );
        }
        expected_start = end;
    }
    if expected_start != data_len {
        return anyhow!(
            "damaged safetensors file: the tensors cover {expected_start} data bytes, the file has {data_len} after the header (truncated or padded at offset {})",
            header_end as u64 + expected_start.min(data_len)
        );
    }
    generic()
}

/// Parse the bytes of a LoRA safetensors file.
pub fn parse_lora_bytes(bytes: &[u8]) -> Result<LoraWeights> {
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| header_error(bytes, e))?;
    let st = SafeTensors::deserialize(bytes).map_err(|e| header_error(bytes, e))?;
    let metadata: BTreeMap<String, String> = header.metadata().clone().unwrap_or_default().into_iter().collect();

    #[derive(Default)]
    struct Pending {
        down: Option<(String, Tensor)>,
        up: Option<(String, Tensor)>,
        alpha: Option<f64>,
        alpha_key: Option<String>,
    }
    let mut pending: BTreeMap<(u8, String), (Component, Pending)> = BTreeMap::new();
    let mut format_counts: BTreeMap<LoraFormat, usize> = BTreeMap::new();
    let mut non_finite = Vec::new();
    let mut names = st.names();
    names.sort_unstable();
    if names.is_empty() {
        bail!("the file holds no tensors");
    }
    for key in names {
        let view = st.tensor(key)?;
        let parsed = parse_key(key)?;
        if let Some(f) = parsed.format {
            *format_counts.entry(f).or_default() += 1;
        }
        let slot = &mut pending
            .entry((parsed.component as u8, parsed.module.clone()))
            .or_insert_with(|| (parsed.component, Pending::default()))
            .1;
        let duplicate = |other: &str| anyhow!("keys `{other}` and `{key}` both give module `{}`", parsed.module);
        match parsed.part {
            Part::Down | Part::Up => {
                if view.shape().len() != 2 {
                    bail!("tensor `{key}` has shape {:?}; a LoRA linear weight must be 2-dimensional", view.shape());
                }
                let t = view_to_tensor(key, &view)?;
                if !t.dtype().is_float() {
                    bail!("tensor `{key}` has dtype {:?}; LoRA weights must be floating point", view.dtype());
                }
                let t = t.to_dtype(DType::F32)?;
                let values = t.flatten_all()?.to_vec1::<f32>()?;
                let (nan, inf) = values.iter().fold((0, 0), |(n, i), v| (n + v.is_nan() as usize, i + v.is_infinite() as usize));
                if nan + inf > 0 {
                    non_finite.push(NonFiniteTensor { key: key.to_string(), nan, inf, total: values.len() });
                }
                let place = if parsed.part == Part::Down { &mut slot.down } else { &mut slot.up };
                if let Some((other, _)) = place {
                    return Err(duplicate(other));
                }
                *place = Some((key.to_string(), t));
            }
            Part::Alpha => {
                if let Some(other) = &slot.alpha_key {
                    return Err(duplicate(other));
                }
                slot.alpha = Some(scalar_alpha(key, &view)?);
                slot.alpha_key = Some(key.to_string());
            }
        }
    }

    let mut weights = LoraWeights { metadata, non_finite, ..Default::default() };
    weights.source_format = format_counts.iter().max_by_key(|(_, n)| **n).map(|(f, _)| *f);
    for ((_, module), (component, p)) in pending {
        let (down_key, down) = p.down.ok_or_else(|| {
            anyhow!("module `{module}` has an up weight ({}) but no down weight", p.up.as_ref().map_or_else(|| p.alpha_key.clone().unwrap_or_default(), |u| u.0.clone()))
        })?;
        let (up_key, up) = p.up.ok_or_else(|| anyhow!("module `{module}` has a down weight (`{down_key}`) but no up weight"))?;
        let (r, r_up) = (down.dims()[0], up.dims()[1]);
        if r != r_up || r == 0 {
            bail!(
                "module `{module}`: down `{down_key}` {:?} and up `{up_key}` {:?} disagree on the rank (down must be [r, in], up [out, r])",
                down.dims(),
                up.dims()
            );
        }
        let module = canonical_module_name(component, &module);
        if weights.component(component).contains_key(&module) {
            bail!("two spellings of module `{module}` in one file (e.g. `{down_key}`)");
        }
        weights.component_mut(component).insert(module, LoraModule { down, up, alpha: p.alpha });
    }
    if let Some(json) = weights.metadata.get(ADAPTER_METADATA_KEY).cloned() {
        apply_adapter_metadata(&mut weights, &json).with_context(|| format!("header key `{ADAPTER_METADATA_KEY}`"))?;
    }
    Ok(weights)
}

/// Take per-module alphas from diffusers' `lora_adapter_metadata` JSON (`unet.lora_alpha`,
/// `unet.alpha_pattern`, ... or unprefixed keys for a single component).
fn apply_adapter_metadata(weights: &mut LoraWeights, json: &str) -> Result<()> {
    let value: serde_json::Value = serde_json::from_str(json).context("not valid JSON")?;
    let obj = value.as_object().ok_or_else(|| anyhow!("not a JSON object"))?;
    let prefixed = obj.keys().any(|k| k.contains('.'));
    for c in [Component::Unet, Component::TextEncoder, Component::TextEncoder2] {
        let get = |k: &str| if prefixed { obj.get(&format!("{}.{k}", c.diffusers_prefix())) } else { obj.get(k) };
        let Some(alpha) = get("lora_alpha").and_then(|v| v.as_f64()) else { continue };
        let patterns: Vec<(String, f64)> = get("alpha_pattern")
            .and_then(|v| v.as_object())
            .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_f64()?))).collect())
            .unwrap_or_default();
        for (name, module) in weights.component_mut(c).iter_mut() {
            let from_pattern = patterns
                .iter()
                .filter(|(p, _)| name == p || name.ends_with(&format!(".{p}")))
                .max_by_key(|(p, _)| p.len())
                .map(|(_, a)| *a);
            module.alpha = Some(from_pattern.unwrap_or(alpha));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Writing

/// One tensor to write: raw little-endian bytes.
struct OwnedView {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &OwnedView {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// `t` as a safetensors view in `dtype` (F32, F16 or BF16; rounded to nearest).
fn tensor_view(t: &Tensor, dtype: DType) -> Result<OwnedView> {
    let flat = t.to_dtype(dtype)?.flatten_all()?;
    let (st, data): (Dtype, Vec<u8>) = match dtype {
        DType::F32 => (Dtype::F32, flat.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
        DType::F16 => (Dtype::F16, flat.to_vec1::<half::f16>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
        DType::BF16 => (Dtype::BF16, flat.to_vec1::<half::bf16>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
        other => bail!("LoRA weights are written as f32, f16 or bf16, not {other:?}"),
    };
    Ok(OwnedView { dtype: st, shape: t.dims().to_vec(), data })
}

fn alpha_view(alpha: f64) -> OwnedView {
    if alpha.fract() == 0.0 && alpha.abs() < 9e15 {
        OwnedView { dtype: Dtype::I64, shape: vec![], data: (alpha as i64).to_le_bytes().to_vec() }
    } else {
        OwnedView { dtype: Dtype::F32, shape: vec![], data: (alpha as f32).to_le_bytes().to_vec() }
    }
}

/// A whole number as a JSON integer, otherwise a float.
fn json_number(x: f64) -> serde_json::Value {
    if x.fract() == 0.0 && x.abs() < 9e15 {
        (x as i64).into()
    } else {
        x.into()
    }
}

/// diffusers' `lora_adapter_metadata` for the components whose alphas are not all equal to
/// their ranks; `None` when every scale is 1 (the reference's case).
fn adapter_metadata(weights: &LoraWeights) -> Option<String> {
    let mut out = serde_json::Map::new();
    for c in [Component::Unet, Component::TextEncoder, Component::TextEncoder2] {
        let modules = weights.component(c);
        if modules.values().all(|m| m.alpha.is_none_or(|a| a == m.rank() as f64)) {
            continue;
        }
        // The most common rank is r; other ranks and every alpha go into the patterns.
        let mut rank_counts: BTreeMap<usize, usize> = BTreeMap::new();
        for m in modules.values() {
            *rank_counts.entry(m.rank()).or_default() += 1;
        }
        let r = rank_counts.iter().max_by_key(|(_, n)| **n).map(|(r, _)| *r).unwrap_or(1);
        let mut alpha_counts: BTreeMap<String, (usize, f64)> = BTreeMap::new();
        for m in modules.values() {
            let a = m.effective_alpha();
            alpha_counts.entry(a.to_string()).or_insert((0, a)).0 += 1;
        }
        let alpha = alpha_counts.values().max_by_key(|(n, _)| *n).map(|(_, a)| *a).unwrap_or(r as f64);
        // transformers 5 flattens CLIPTextModel (no `text_model.` level): name text-encoder
        // modules from `encoder.` on, which PEFT's suffix matching finds in either layout.
        let peft_name = |n: &str| -> String {
            match c {
                Component::Unet => n.to_string(),
                _ => n.strip_prefix("text_model.").unwrap_or(n).to_string(),
            }
        };
        let rank_pattern: serde_json::Map<_, _> =
            modules.iter().filter(|(_, m)| m.rank() != r).map(|(n, m)| (peft_name(n), m.rank().into())).collect();
        let alpha_pattern: serde_json::Map<_, _> = modules
            .iter()
            .filter(|(_, m)| m.effective_alpha() != alpha)
            .map(|(n, m)| (peft_name(n), json_number(m.effective_alpha())))
            .collect();
        let targets: Vec<String> = modules.keys().map(|n| peft_name(n)).collect();
        let p = c.diffusers_prefix();
        out.insert(format!("{p}.r"), r.into());
        out.insert(format!("{p}.lora_alpha"), json_number(alpha));
        out.insert(format!("{p}.rank_pattern"), rank_pattern.into());
        out.insert(format!("{p}.alpha_pattern"), alpha_pattern.into());
        out.insert(format!("{p}.target_modules"), targets.into());
    }
    if out.is_empty() {
        None
    } else {
        Some(serde_json::to_string_pretty(&serde_json::Value::Object(out)).expect("JSON of plain values"))
    }
}

/// Serialise `weights` in `format` (`AttnProcessor` is read-only).
///
/// - diffusers: `unet.<module>.lora.down.weight` / `.lora.up.weight` (text encoder:
///   `text_encoder.<module>.lora_linear_layer.down.weight`), F32, header exactly
///   `{"format": "pt"}` plus `lora_adapter_metadata` only if some alpha differs from its rank;
/// - PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight`, same header rule;
/// - kohya: `lora_unet_<module with _>.lora_down.weight` / `.lora_up.weight` / `.alpha` (I64
///   when whole, else F32; alpha = r when the module has none), header = `weights.metadata`.
pub fn serialize_lora(weights: &LoraWeights, format: LoraFormat) -> Result<Vec<u8>> {
    serialize_lora_as(weights, format, DType::F32)
}

/// [`serialize_lora`] with the up/down weights in `dtype` (`output.save_precision`).
pub fn serialize_lora_as(weights: &LoraWeights, format: LoraFormat, dtype: DType) -> Result<Vec<u8>> {
    if weights.is_empty() {
        bail!("refusing to write a LoRA file with no modules");
    }
    let mut tensors: BTreeMap<String, OwnedView> = BTreeMap::new();
    for (c, name, m) in weights.modules() {
        let (down_key, up_key) = match format {
            LoraFormat::Diffusers => {
                let p = c.diffusers_prefix();
                let mid = if c == Component::Unet { "lora" } else { "lora_linear_layer" };
                (format!("{p}.{name}.{mid}.down.weight"), format!("{p}.{name}.{mid}.up.weight"))
            }
            LoraFormat::Peft => {
                let p = c.diffusers_prefix();
                (format!("{p}.{name}.lora_A.weight"), format!("{p}.{name}.lora_B.weight"))
            }
            LoraFormat::Kohya => {
                let stem = module_to_kohya(c, name);
                tensors.insert(format!("{stem}.alpha"), alpha_view(m.effective_alpha()));
                (format!("{stem}.lora_down.weight"), format!("{stem}.lora_up.weight"))
            }
            LoraFormat::AttnProcessor => bail!("the old attention-processor form is read only; write diffusers, peft or kohya"),
        };
        for (key, t) in [(down_key, &m.down), (up_key, &m.up)] {
            if tensors.insert(key.clone(), tensor_view(t, dtype)?).is_some() {
                bail!("two modules map to the same key `{key}`");
            }
        }
    }
    let header: HashMap<String, String> = match format {
        LoraFormat::Kohya => weights.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        _ => {
            let mut h = HashMap::from([("format".to_string(), "pt".to_string())]);
            if let Some(json) = adapter_metadata(weights) {
                h.insert(ADAPTER_METADATA_KEY.to_string(), json);
            }
            h
        }
    };
    let header = if header.is_empty() { None } else { Some(header) };
    Ok(safetensors::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), header)?)
}

/// Write `weights` to `path` in `format`, atomically (temporary file, then rename).
pub fn write_lora_file(weights: &LoraWeights, path: &Path, format: LoraFormat) -> Result<()> {
    let bytes = serialize_lora(weights, format)?;
    crate::util::fs::write_atomic(path, &bytes).with_context(|| format!("cannot write LoRA file {}", path.display()))
}
