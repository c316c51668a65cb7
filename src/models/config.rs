//! `config.json` structs for each model (UNet, VAE, CLIP text encoder). Every field that changes
//! the network is honoured; a field we do not support is an error naming it and its value.
//! Harmless keys we do not use (`_class_name`, `sample_size`, ...) are accepted.

use std::path::Path;

use anyhow::{bail, Context};
use serde::Deserialize;
use serde_json::Value;

use crate::nn::Activation;

/// One value for every block, or one per block (diffusers accepts both for many fields).
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
enum PerBlock<T> {
    One(T),
    Each(Vec<T>),
}

impl<T: Clone + std::fmt::Debug> PerBlock<T> {
    fn expand(self, field: &str, blocks: usize) -> anyhow::Result<Vec<T>> {
        match self {
            Self::One(v) => Ok(vec![v; blocks]),
            Self::Each(list) if list.len() == blocks => Ok(list),
            Self::Each(list) => bail!(
                "`{field}` has {} entries {:?} but the model has {blocks} down blocks",
                list.len(),
                list
            ),
        }
    }
}

/// Down-block kinds we build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DownBlockType {
    CrossAttnDownBlock2D,
    DownBlock2D,
}

/// Up-block kinds we build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpBlockType {
    CrossAttnUpBlock2D,
    UpBlock2D,
}

/// Mid-block kinds we build.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MidBlockType {
    UNetMidBlock2DCrossAttn,
}

/// diffusers `UNet2DConditionModel` config, resolved to one value per block.
#[derive(Clone, Debug)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub(crate) out_channels: usize,
    pub center_input_sample: bool,
    pub(crate) flip_sin_to_cos: bool,
    pub(crate) freq_shift: f64,
    pub down_block_types: Vec<DownBlockType>,
    /// `None` when the config says `"mid_block_type": null` (no mid block).
    pub mid_block_type: Option<MidBlockType>,
    pub up_block_types: Vec<UpBlockType>,
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block (up blocks have one more).
    pub layers_per_block: Vec<usize>,
    pub(crate) downsample_padding: usize,
    pub(crate) mid_block_scale_factor: f64,
    pub act_fn: Activation,
    pub(crate) norm_num_groups: usize,
    pub(crate) norm_eps: f64,
    /// Cross-attention (text embedding) width per down block.
    pub cross_attention_dim: Vec<usize>,
    /// Transformer layers inside each attention of each down block.
    pub transformer_layers_per_block: Vec<usize>,
    /// Attention heads per down block (diffusers' `attention_head_dim`, which SD uses as the
    /// number of heads, unless `num_attention_heads` is given).
    pub num_attention_heads: Vec<usize>,
    pub only_cross_attention: Vec<bool>,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
    pub resnet_skip_time_act: bool,
    pub(crate) resnet_out_scale_factor: f64,
    pub conv_in_kernel: usize,
    pub(crate) conv_out_kernel: usize,
    /// Width of the time embedding MLP (`time_embedding_dim`, default 4 × first block width).
    pub time_embed_dim: usize,
    /// Activation applied to the time embedding after the MLP (`time_embedding_act_fn`).
    pub time_embedding_act_fn: Option<Activation>,
    pub sample_size: Option<usize>,
    /// SDXL's extra conditioning (`addition_embed_type = "text_time"`); `None` for SD 1.x/2.x.
    pub addition: Option<TextTimeEmbedding>,
}

/// `addition_embed_type = "text_time"`: each of the six time ids (original size, crop
/// top-left, target size) goes through a sinusoidal projection of `time_embed_dim`
/// (`addition_time_embed_dim`); they are concatenated after the pooled text embedding, and
/// `add_embedding` (an MLP from `input_dim` = `projection_class_embeddings_input_dim` to the time
/// embedding's width) adds the result to the time embedding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TextTimeEmbedding {
    pub time_embed_dim: usize,
    pub input_dim: usize,
}

impl TextTimeEmbedding {
    /// The width of the pooled text embedding the UNet expects.
    pub fn pooled_dim(&self) -> usize {
        self.input_dim.saturating_sub(6 * self.time_embed_dim)
    }
}

#[derive(Deserialize)]
#[serde(default)]
struct RawUNetConfig {
    in_channels: usize,
    out_channels: usize,
    center_input_sample: bool,
    flip_sin_to_cos: bool,
    freq_shift: f64,
    down_block_types: Vec<String>,
    mid_block_type: Value,
    up_block_types: Vec<String>,
    only_cross_attention: PerBlock<bool>,
    block_out_channels: Vec<usize>,
    layers_per_block: PerBlock<usize>,
    downsample_padding: usize,
    mid_block_scale_factor: f64,
    dropout: f64,
    act_fn: String,
    norm_num_groups: Option<usize>,
    norm_eps: f64,
    cross_attention_dim: PerBlock<usize>,
    transformer_layers_per_block: Value,
    reverse_transformer_layers_per_block: Value,
    encoder_hid_dim: Value,
    encoder_hid_dim_type: Value,
    attention_head_dim: PerBlock<usize>,
    num_attention_heads: Option<PerBlock<usize>>,
    dual_cross_attention: bool,
    use_linear_projection: bool,
    class_embed_type: Value,
    addition_embed_type: Value,
    num_class_embeds: Value,
    upcast_attention: bool,
    resnet_time_scale_shift: String,
    resnet_skip_time_act: bool,
    resnet_out_scale_factor: f64,
    time_embedding_type: String,
    time_embedding_dim: Option<usize>,
    time_embedding_act_fn: Option<String>,
    timestep_post_act: Value,
    time_cond_proj_dim: Value,
    conv_in_kernel: usize,
    conv_out_kernel: usize,
    attention_type: String,
    cross_attention_norm: Value,
    addition_time_embed_dim: Option<usize>,
    projection_class_embeddings_input_dim: Option<usize>,
    sample_size: Option<usize>,
}

impl Default for RawUNetConfig {
    /// diffusers' class defaults, used for keys a config leaves out.
    fn default() -> Self {
        let s = |v: &str| v.to_string();
        Self {
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: vec![s("CrossAttnDownBlock2D"), s("CrossAttnDownBlock2D"), s("CrossAttnDownBlock2D"), s("DownBlock2D")],
            mid_block_type: Value::String(s("UNetMidBlock2DCrossAttn")),
            up_block_types: vec![s("UpBlock2D"), s("CrossAttnUpBlock2D"), s("CrossAttnUpBlock2D"), s("CrossAttnUpBlock2D")],
            only_cross_attention: PerBlock::One(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerBlock::One(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            dropout: 0.0,
            act_fn: s("silu"),
            norm_num_groups: Some(32),
            norm_eps: 1e-5,
            cross_attention_dim: PerBlock::One(1280),
            transformer_layers_per_block: Value::from(1),
            reverse_transformer_layers_per_block: Value::Null,
            encoder_hid_dim: Value::Null,
            encoder_hid_dim_type: Value::Null,
            attention_head_dim: PerBlock::One(8),
            num_attention_heads: None,
            dual_cross_attention: false,
            use_linear_projection: false,
            class_embed_type: Value::Null,
            addition_embed_type: Value::Null,
            num_class_embeds: Value::Null,
            upcast_attention: false,
            resnet_time_scale_shift: s("default"),
            resnet_skip_time_act: false,
            resnet_out_scale_factor: 1.0,
            time_embedding_type: s("positional"),
            time_embedding_dim: None,
            time_embedding_act_fn: None,
            timestep_post_act: Value::Null,
            time_cond_proj_dim: Value::Null,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            attention_type: s("default"),
            cross_attention_norm: Value::Null,
            addition_time_embed_dim: None,
            projection_class_embeddings_input_dim: None,
            sample_size: None,
        }
    }
}

/// An error if `value` is not null: the field names a feature we do not build.
fn require_null(field: &str, value: &Value) -> anyhow::Result<()> {
    if !value.is_null() {
        bail!("unsupported `{field}` = {value} (only null is supported)")
    }
    Ok(())
}

fn activation(field: &str, name: &str) -> anyhow::Result<Activation> {
    Activation::from_name(name).with_context(|| format!("unsupported `{field}` = \"{name}\" (supported: silu, swish, gelu, gelu_new, quick_gelu)"))
}

fn read_config(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read model config {}", path.display()))
}

impl UNetConfig {
    /// Parse a `unet/config.json`; unsupported settings are errors naming the field.
    pub fn from_json_str(json: &str) -> anyhow::Result<Self> {
        let raw: RawUNetConfig = serde_json::from_str(json).context("invalid UNet config.json")?;
        Self::resolve(raw).context("UNet config.json")
    }

    /// Read and parse a `unet/config.json`; errors name the file.
    pub fn from_json_file(path: impl AsRef<Path>) -> anyhow::Result<Self> {
        let path = path.as_ref();
        Self::from_json_str(&read_config(path)?).with_context(|| format!("in {}", path.display()))
    }

    fn resolve(raw: RawUNetConfig) -> anyhow::Result<Self> {
        for (field, value) in [
            ("class_embed_type", &raw.class_embed_type),
            ("num_class_embeds", &raw.num_class_embeds),
            ("encoder_hid_dim", &raw.encoder_hid_dim),
            ("encoder_hid_dim_type", &raw.encoder_hid_dim_type),
            ("time_cond_proj_dim", &raw.time_cond_proj_dim),
            ("timestep_post_act", &raw.timestep_post_act),
            ("cross_attention_norm", &raw.cross_attention_norm),
            ("reverse_transformer_layers_per_block", &raw.reverse_transformer_layers_per_block),
        ] {
            require_null(field, value)?;
        }
        if raw.resnet_time_scale_shift != "default" {
            bail!("unsupported `resnet_time_scale_shift` = \"{}\" (only \"default\")", raw.resnet_time_scale_shift)
        }
        if raw.time_embedding_type != "positional" {
            bail!("unsupported `time_embedding_type` = \"{}\" (only \"positional\")", raw.time_embedding_type)
        }
        if raw.attention_type != "default" {
            bail!("unsupported `attention_type` = \"{}\" (only \"default\")", raw.attention_type)
        }
        if raw.dual_cross_attention {
            bail!("unsupported `dual_cross_attention` = true")
        }
        if raw.dropout != 0.0 {
            bail!("unsupported `dropout` = {} (only 0.0)", raw.dropout)
        }
        let blocks = raw.block_out_channels.len();
        if blocks == 0 {
            bail!("`block_out_channels` is empty")
        }
        if raw.down_block_types.len() != blocks || raw.up_block_types.len() != blocks {
            bail!(
                "`down_block_types` ({}) and `up_block_types` ({}) must both have one entry per `block_out_channels` entry ({blocks})",
                raw.down_block_types.len(),
                raw.up_block_types.len()
            )
        }
        let down_block_types = raw
            .down_block_types
            .iter()
            .map(|t| match t.as_str() {
                "CrossAttnDownBlock2D" => Ok(DownBlockType::CrossAttnDownBlock2D),
                "DownBlock2D" => Ok(DownBlockType::DownBlock2D),
                other => bail!("unsupported `down_block_types` entry \"{other}\" (supported: CrossAttnDownBlock2D, DownBlock2D)"),
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let up_block_types = raw
            .up_block_types
            .iter()
            .map(|t| match t.as_str() {
                "CrossAttnUpBlock2D" => Ok(UpBlockType::CrossAttnUpBlock2D),
                "UpBlock2D" => Ok(UpBlockType::UpBlock2D),
                other => bail!("unsupported `up_block_types` entry \"{other}\" (supported: CrossAttnUpBlock2D, UpBlock2D)"),
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mid_block_type = match &raw.mid_block_type {
            Value::Null => None,
            Value::String(s) if s == "UNetMidBlock2DCrossAttn" => Some(MidBlockType::UNetMidBlock2DCrossAttn),
            other => bail!("unsupported `mid_block_type` = {other} (supported: \"UNetMidBlock2DCrossAttn\", null)"),
        };
        let norm_num_groups = raw.norm_num_groups.context("unsupported `norm_num_groups` = null")?;
        let heads = match raw.num_attention_heads {
            Some(h) => h.expand("num_attention_heads", blocks)?,
            None => raw.attention_head_dim.expand("attention_head_dim", blocks)?,
        };
        let transformer_layers_per_block = match &raw.transformer_layers_per_block {
            Value::Number(n) if n.as_u64().is_some() => vec![n.as_u64().unwrap_or(1) as usize; blocks],
            Value::Array(items) if items.len() == blocks && items.iter().all(|v| v.as_u64().is_some()) => {
                items.iter().map(|v| v.as_u64().unwrap_or(1) as usize).collect()
            }
            other => bail!(
                "unsupported `transformer_layers_per_block` = {other} (an integer or one integer per down block, {blocks} blocks)"
            ),
        };
        for (i, (&c, &h)) in raw.block_out_channels.iter().zip(&heads).enumerate() {
            if h == 0 || c % h != 0 {
                bail!("block {i}: {c} channels cannot be split into {h} attention heads")
            }
            if c % norm_num_groups != 0 {
                bail!("block {i}: {c} channels cannot be split into `norm_num_groups` = {norm_num_groups}")
            }
        }
        for (field, k) in [("conv_in_kernel", raw.conv_in_kernel), ("conv_out_kernel", raw.conv_out_kernel)] {
            if k % 2 == 0 {
                bail!("unsupported `{field}` = {k} (only odd kernels)")
            }
        }
        let addition = match &raw.addition_embed_type {
            Value::Null => {
                if let Some(d) = raw.addition_time_embed_dim {
                    bail!("`addition_time_embed_dim` = {d} is set but `addition_embed_type` is null")
                }
                None
            }
            Value::String(s) if s == "text_time" => {
                let time_embed_dim = raw
                    .addition_time_embed_dim
                    .context("`addition_embed_type` = \"text_time\" needs `addition_time_embed_dim`")?;
                let input_dim = raw
                    .projection_class_embeddings_input_dim
                    .context("`addition_embed_type` = \"text_time\" needs `projection_class_embeddings_input_dim`")?;
                if input_dim <= 6 * time_embed_dim {
                    bail!("`projection_class_embeddings_input_dim` = {input_dim} leaves no room for a pooled text embedding beside 6 time ids of {time_embed_dim}")
                }
                Some(TextTimeEmbedding { time_embed_dim, input_dim })
            }
            other => bail!("unsupported `addition_embed_type` = {other} (supported: \"text_time\", null)"),
        };
        let time_embedding_act_fn = match &raw.time_embedding_act_fn {
            Some(name) => Some(activation("time_embedding_act_fn", name)?),
            None => None,
        };
        Ok(Self {
            in_channels: raw.in_channels,
            out_channels: raw.out_channels,
            center_input_sample: raw.center_input_sample,
            flip_sin_to_cos: raw.flip_sin_to_cos,
            freq_shift: raw.freq_shift,
            down_block_types,
            mid_block_type,
            up_block_types,
            time_embed_dim: raw.time_embedding_dim.unwrap_or(raw.block_out_channels[0] * 4),
            layers_per_block: raw.layers_per_block.expand("layers_per_block", blocks)?,
            only_cross_attention: raw.only_cross_attention.expand("only_cross_attention", blocks)?,
            cross_attention_dim: raw.cross_attention_dim.expand("cross_attention_dim", blocks)?,
            block_out_channels: raw.block_out_channels,
            downsample_padding: raw.downsample_padding,
            mid_block_scale_factor: raw.mid_block_scale_factor,
            act_fn: activation("act_fn", &raw.act_fn)?,
            norm_num_groups,
            norm_eps: raw.norm_eps,
            transformer_layers_per_block,
            num_attention_heads: heads,
            use_linear_projection: raw.use_linear_projection,
            upcast_attention: raw.upcast_attention,
            resnet_skip_time_act: raw.resnet_skip_time_act,
            resnet_out_scale_factor: raw.resnet_out_scale_factor,
            conv_in_kernel: raw.conv_in_kernel,
            conv_out_kernel: raw.conv_out_kernel,
            time_embedding_act_fn,
            sample_size: raw.sample_size,
            addition,
        })
    }
}

/// diffusers `AutoencoderKL` config.
#[derive(Clone, Debug)]
pub struct VaeConfig {
    pub in_channels: usize,
    pub(crate) out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub act_fn: Activation,
    pub latent_channels: usize,
    pub(crate) norm_num_groups: usize,
    pub scaling_factor: f64,
    /// Used by some pipelines (SD3/Flux) around the VAE, never inside it.
    pub shift_factor: Option<f64>,
    pub(crate) use_quant_conv: bool,
    pub(crate) use_post_quant_conv: bool,
    pub(crate) mid_block_add_attention: bool,
    pub sample_size: Option<usize>,
    /// The VAE overflows in f16 (SDXL's): under fp16 it runs in f32. diffusers' default is
    /// `true` when the key is missing.
    pub force_upcast: bool,
}

#[derive(Deserialize)]
#[serde(default)]
struct RawVaeConfig {
    in_channels: usize,
    out_channels: usize,
    down_block_types: Vec<String>,
    up_block_types: Vec<String>,
    block_out_channels: Vec<usize>,
    layers_per_block: usize,
    act_fn: String,
    latent_channels: usize,
    norm_num_groups: usize,
    sample_size: Option<usize>,
    scaling_factor: f64,
    shift_factor: Option<f64>,
    use_quant_conv: bool,
    use_post_quant_conv: bool,
    mid_block_add_attention: bool,
    force_upcast: bool,
}

impl Default for RawVaeConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec!["DownEncoderBlock2D".into()],
            up_block_types: vec!["UpDecoderBlock2D".into()],
            block_out_channels: vec![64],
            layers_per_block: 1,
            act_fn: "silu".into(),
            latent_channels: 4,
            norm_num_groups: 32,
            sample_size: None,
            scaling_factor: 0.18215,
            shift_factor: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
            force_upcast: true,
        }
    }
}

impl VaeConfig {
    /// Parse a `vae/config.json`; unsupported settings are errors naming the field.
    pub fn from_json_str(json: &str) -> anyhow::Result<Self> {
        let raw: RawVaeConfig = serde_json::from_str(json).context("invalid VAE config.json")?;
        Self::resolve(raw).context("VAE config.json")
    }

    /// Read and parse a `vae/config.json`; errors name the file.
    pub fn from_json_file(path: impl AsRef<Path>) -> anyhow::Result<Self> {
        let path = path.as_ref();
        Self::from_json_str(&read_config(path)?).with_context(|| format!("in {}", path.display()))
    }

    fn resolve(raw: RawVaeConfig) -> anyhow::Result<Self> {
        let blocks = raw.block_out_channels.len();
        if blocks == 0 {
            bail!("`block_out_channels` is empty")
        }
        if raw.down_block_types.len() != blocks || raw.up_block_types.len() != blocks {
            bail!(
                "`down_block_types` ({}) and `up_block_types` ({}) must both have one entry per `block_out_channels` entry ({blocks})",
                raw.down_block_types.len(),
                raw.up_block_types.len()
            )
        }
        if let Some(t) = raw.down_block_types.iter().find(|t| *t != "DownEncoderBlock2D") {
            bail!("unsupported `down_block_types` entry \"{t}\" (only DownEncoderBlock2D)")
        }
        if let Some(t) = raw.up_block_types.iter().find(|t| *t != "UpDecoderBlock2D") {
            bail!("unsupported `up_block_types` entry \"{t}\" (only UpDecoderBlock2D)")
        }
        if let Some(c) = raw.block_out_channels.iter().find(|&&c| raw.norm_num_groups == 0 || c % raw.norm_num_groups != 0) {
            bail!("{c} channels cannot be split into `norm_num_groups` = {}", raw.norm_num_groups)
        }
        Ok(Self {
            in_channels: raw.in_channels,
            out_channels: raw.out_channels,
            block_out_channels: raw.block_out_channels,
            layers_per_block: raw.layers_per_block,
            act_fn: activation("act_fn", &raw.act_fn)?,
            latent_channels: raw.latent_channels,
            norm_num_groups: raw.norm_num_groups,
            scaling_factor: raw.scaling_factor,
            shift_factor: raw.shift_factor,
            use_quant_conv: raw.use_quant_conv,
            use_post_quant_conv: raw.use_post_quant_conv,
            mid_block_add_attention: raw.mid_block_add_attention,
            sample_size: raw.sample_size,
            force_upcast: raw.force_upcast,
        })
    }
}

/// transformers `CLIPTextConfig`.
#[derive(Clone, Debug)]
pub struct ClipTextConfig {
    pub(crate) vocab_size: usize,
    pub hidden_size: usize,
    pub(crate) intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub(crate) max_position_embeddings: usize,
    pub hidden_act: Activation,
    pub(crate) layer_norm_eps: f64,
    pub eos_token_id: Option<u32>,
    pub pad_token_id: Option<u32>,
    /// Width of `text_projection` (`CLIPTextModelWithProjection`, SDXL's second encoder).
    pub projection_dim: Option<usize>,
}

#[derive(Deserialize)]
#[serde(default)]
struct RawClipTextConfig {
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    max_position_embeddings: usize,
    hidden_act: String,
    layer_norm_eps: f64,
    model_type: Option<String>,
    eos_token_id: Option<u32>,
    pad_token_id: Option<u32>,
    projection_dim: Option<usize>,
}

impl Default for RawClipTextConfig {
    /// transformers' `CLIPTextConfig` defaults.
    fn default() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            model_type: None,
            eos_token_id: Some(49407),
            pad_token_id: Some(1),
            projection_dim: None,
        }
    }
}

impl ClipTextConfig {
    /// Parse a `text_encoder/config.json`; unsupported settings are errors naming the field.
    pub fn from_json_str(json: &str) -> anyhow::Result<Self> {
        let raw: RawClipTextConfig = serde_json::from_str(json).context("invalid text encoder config.json")?;
        Self::resolve(raw).context("text encoder config.json")
    }

    /// Read and parse a `text_encoder/config.json`; errors name the file.
    pub fn from_json_file(path: impl AsRef<Path>) -> anyhow::Result<Self> {
        let path = path.as_ref();
        Self::from_json_str(&read_config(path)?).with_context(|| format!("in {}", path.display()))
    }

    fn resolve(raw: RawClipTextConfig) -> anyhow::Result<Self> {
        if let Some(t) = &raw.model_type {
            if t != "clip_text_model" {
                bail!("unsupported `model_type` = \"{t}\" (only \"clip_text_model\")")
            }
        }
        if raw.num_attention_heads == 0 || raw.hidden_size % raw.num_attention_heads != 0 {
            bail!(
                "`hidden_size` = {} cannot be split into `num_attention_heads` = {}",
                raw.hidden_size,
                raw.num_attention_heads
            )
        }
        Ok(Self {
            vocab_size: raw.vocab_size,
            hidden_size: raw.hidden_size,
            intermediate_size: raw.intermediate_size,
            num_hidden_layers: raw.num_hidden_layers,
            num_attention_heads: raw.num_attention_heads,
            max_position_embeddings: raw.max_position_embeddings,
            hidden_act: activation("hidden_act", &raw.hidden_act)?,
            layer_norm_eps: raw.layer_norm_eps,
            eos_token_id: raw.eos_token_id,
            pad_token_id: raw.pad_token_id,
            projection_dim: raw.projection_dim,
        })
    }
}
