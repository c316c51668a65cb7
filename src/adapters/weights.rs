//! The in-memory LoRA, whatever file it came from or goes to: [`LoraWeights`] (modules per
//! [`Component`], header metadata, the non-finite tensors a read found) and one module's
//! [`LoraModule`] (down, up, alpha and the scale they give).

use std::collections::BTreeMap;
use std::fmt;

use anyhow::{bail, Result};
use candle_core::Tensor;


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

/// One module's LoRA: `down` A `[r, in]` (a conv's `[r, in, kh, kw]`), `up` B `[out, r]` (f32
/// on CPU when read), the alpha if the file gave one, and DoRA's magnitude `[out]` if any.
#[derive(Clone, Debug)]
pub struct LoraModule {
    pub down: Tensor,
    pub up: Tensor,
    pub alpha: Option<f64>,
    /// DoRA's magnitude m, one value per output channel (`lora_magnitude_vector`, `dora_scale`).
    pub magnitude: Option<Tensor>,
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
    pub(crate) fn effective_alpha(&self) -> f64 {
        self.alpha.unwrap_or(self.rank() as f64)
    }
    pub(crate) fn param_count(&self) -> usize {
        self.down.elem_count() + self.up.elem_count() + self.magnitude.as_ref().map_or(0, Tensor::elem_count)
    }
    /// A plain (not DoRA) module.
    pub fn new(down: Tensor, up: Tensor, alpha: Option<f64>) -> Self {
        Self { down, up, alpha, magnitude: None }
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
    pub(crate) fn component_mut(&mut self, c: Component) -> &mut BTreeMap<String, LoraModule> {
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
    /// Number of LoRA parameters (A, B and DoRA's m of every module).
    pub(crate) fn param_count(&self) -> usize {
        self.modules().map(|(_, _, m)| m.param_count()).sum()
    }
    pub fn is_empty(&self) -> bool {
        self.unet.is_empty() && self.text_encoder.is_empty() && self.text_encoder_2.is_empty()
    }
    /// Refuse weights read with NaN or infinite values (see [`Self::non_finite`]), naming each
    /// such tensor: applied, they turn every image black; converted, they spread the damage.
    pub(crate) fn check_finite(&self) -> Result<()> {
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
