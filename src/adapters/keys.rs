//! The key grammar of LoRA files: the forms ([`LoraFormat`]), what each calls a component,
//! and a tensor name ↔ (component, module, down/up/alpha), kohya's underscore names included.
//!
//! Key forms read (text-encoder forms in brackets):
//! - diffusers: `unet.<module>.lora.down.weight` / `.lora.up.weight`
//!   (`text_encoder.<module>.lora_linear_layer.down.weight`, or `.lora.down.weight`);
//! - PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight`, with or without `.default`, also
//!   `base_model.model.<module>...` as PEFT's own `save_pretrained` writes;
//! - old attention processors: `unet.<attn>.processor.to_q_lora.down.weight`, `to_out_lora` →
//!   `to_out.0` (`text_encoder.<attn>.to_q_lora.down.weight` → `q_proj`, `to_out_lora` → `out_proj`);
//! - kohya: `lora_unet_<module with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`
//!   (`lora_te_`, `lora_te1_`; `lora_te2_` for SDXL's second encoder);
//! - DoRA's magnitude: `<module>.lora_magnitude_vector` (diffusers; `.weight` / `.default.weight`
//!   in PEFT's names), kohya / LyCORIS `<stem>.dora_scale`.


use anyhow::{anyhow, bail, Result};

use super::weights::{Component, LoraFormat};

/// The header key under which diffusers stores the LoraConfig of each component.
pub(crate) const ADAPTER_METADATA_KEY: &str = "lora_adapter_metadata";

impl Component {
    pub(crate) fn diffusers_prefix(self) -> &'static str {
        match self {
            Self::Unet => "unet",
            Self::TextEncoder => "text_encoder",
            Self::TextEncoder2 => "text_encoder_2",
        }
    }
    pub(crate) fn kohya_prefix(self) -> &'static str {
        match self {
            Self::Unet => "lora_unet_",
            Self::TextEncoder => "lora_te_",
            Self::TextEncoder2 => "lora_te2_",
        }
    }
}

/// Which half of a module a key holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Part {
    Down,
    Up,
    Alpha,
    /// DoRA's magnitude (`lora_magnitude_vector`, kohya / LyCORIS `dora_scale`).
    Magnitude,
}

/// A key understood: component, module name, part, and the format it is written in.
#[derive(Clone, Debug)]
pub(crate) struct ParsedKey {
    pub(crate) component: Component,
    pub(crate) module: String,
    pub(crate) part: Part,
    /// `None` for alpha keys outside kohya files (they do not say which form the file is).
    pub(crate) format: Option<LoraFormat>,
}

/// Understand one tensor name of a LoRA file.
pub(crate) fn parse_key(key: &str) -> Result<ParsedKey> {
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
            "dora_scale" => Part::Magnitude,
            _ => bail!("kohya key `{key}`: unknown suffix `.{suffix}` (expected lora_down.weight, lora_up.weight, alpha or dora_scale)"),
        };
        if stem.is_empty() {
            bail!("kohya key `{key}` names no module");
        }
        return Ok(ParsedKey { component, module: kohya_to_module(stem), part, format: Some(LoraFormat::Kohya) });
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
    for suffix in [".lora_magnitude_vector", ".lora_magnitude_vector.weight", ".lora_magnitude_vector.default.weight"] {
        if let Some(m) = rest.strip_suffix(suffix) {
            return parsed(m, Part::Magnitude, None);
        }
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
    bail!("key `{key}` is not a LoRA key we understand (expected `.lora.down.weight`, `.lora_A.weight`, `.to_q_lora.down.weight`, `.alpha`, ...)")
}

/// Module-name parts that contain underscores, longest first, used to turn kohya's
/// underscore-joined names back into dotted module names (diffusers' fixed rules, our table).
const COMPOUND_PARTS: &[&str] = &[
    "transformer_blocks",
    "input_blocks",
    "output_blocks",
    "middle_block",
    "label_emb",
    "time_embed",
    "in_layers",
    "out_layers",
    "emb_layers",
    "skip_connection",
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
pub fn kohya_to_module(stem: &str) -> String {
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
pub(crate) fn canonical_module_name(component: Component, module: &str) -> String {
    let flattened = ["encoder.", "embeddings.", "final_layer_norm"].iter().any(|p| module.starts_with(p));
    if component != Component::Unet && flattened {
        format!("text_model.{module}")
    } else {
        module.to_string()
    }
}

/// The key a module's down weight has in `format` (for messages and tools).
pub(crate) fn down_key(format: LoraFormat, component: Component, module: &str) -> String {
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
