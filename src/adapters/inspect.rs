//! Describe a LoRA for `lora inspect`: format, base-architecture guess, targets, rank and alpha
//! per module (grouped), parameter count, header metadata and the tensors holding NaN or infinite
//! values; as text, or as one JSON object (`--json`).

use std::collections::BTreeMap;
use std::fmt::Write;

use super::kohya_meta::PIPELINE_TOML_KEY;
use super::weights::{Component, LoraWeights};

/// The part of a module name that says what kind of layer it is: everything after the last
/// block index, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0` →
/// `attn1.to_out.0`, `text_model.encoder.layers.3.self_attn.q_proj` → `self_attn.q_proj`.
pub(crate) fn layer_kind(module: &str) -> String {
    let parts: Vec<&str> = module.split('.').collect();
    let is_index = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let last_index = (0..parts.len().saturating_sub(1)).rev().find(|&i| is_index(parts[i]) && !is_index(parts[i + 1]));
    match last_index {
        Some(i) => parts[i + 1..].join("."),
        None => module.to_string(),
    }
}

/// Guess the base model a LoRA was trained on from its module names and widths.
pub(crate) fn guess_base(weights: &LoraWeights) -> String {
    // What the file's own kohya / ModelSpec header says wins over guessing from names.
    let said = weights.metadata.get("modelspec.architecture").or_else(|| weights.metadata.get("ss_base_model_version"));
    if let Some(said) = said.filter(|s| s.contains("xl")) {
        let sdxl_names = !weights.text_encoder_2.is_empty() || weights.unet.keys().any(|n| n.starts_with("input_blocks") || n.starts_with("label_emb"));
        return format!("SDXL (the header says `{said}`{})", if sdxl_names { "; its names agree" } else { "" });
    }
    if !weights.text_encoder_2.is_empty() {
        return "SDXL (has a second text encoder)".into();
    }
    if weights.unet.keys().any(|n| n.starts_with("input_blocks") || n.starts_with("output_blocks") || n.starts_with("middle_block")) {
        return "SDXL or an LDM-named SD model (original `input_blocks`/`output_blocks` names)".into();
    }
    let cross_width = weights
        .unet
        .iter()
        .find(|(n, _)| n.ends_with("attn2.to_k") || n.ends_with("attn2.to_v"))
        .map(|(_, m)| m.down.dims()[1]);
    let te_width = weights.text_encoder.iter().find(|(n, _)| n.ends_with("q_proj")).map(|(_, m)| m.down.dims()[1]);
    let many_transformer_layers = weights.unet.keys().any(|n| {
        n.split_once("transformer_blocks.")
            .and_then(|(_, rest)| rest.split('.').next())
            .and_then(|i| i.parse::<usize>().ok())
            .is_some_and(|i| i >= 1)
    });
    if many_transformer_layers {
        return "SDXL (several transformer layers per block)".into();
    }
    match cross_width.or(te_width) {
        Some(768) => "SD 1.x (cross-attention width 768)".into(),
        Some(1024) => "SD 2.x (cross-attention width 1024)".into(),
        Some(2048) => "SDXL (cross-attention width 2048)".into(),
        Some(w) => format!("unknown (cross-attention width {w} is no released Stable Diffusion; SD 1.x/2.x block names)"),
        None => "unknown (no cross-attention or text-encoder module to measure)".into(),
    }
}

/// A human-readable report of `weights`.
pub fn describe(weights: &LoraWeights) -> String {
    let mut s = String::new();
    let format = weights.source_format.map_or("unknown".to_string(), |f| f.to_string());
    let _ = writeln!(s, "format:      {format}");
    let _ = writeln!(s, "base model:  {}", guess_base(weights));
    let _ = writeln!(s, "modules:     {} UNet, {} text encoder{}", weights.unet.len(), weights.text_encoder.len(),
        if weights.text_encoder_2.is_empty() { String::new() } else { format!(", {} second text encoder", weights.text_encoder_2.len()) });
    let _ = writeln!(s, "parameters:  {}", weights.param_count());
    for c in [Component::Unet, Component::TextEncoder, Component::TextEncoder2] {
        let modules = weights.component(c);
        if modules.is_empty() {
            continue;
        }
        let title = match c {
            Component::Unet => "UNet",
            Component::TextEncoder => "text encoder",
            Component::TextEncoder2 => "second text encoder",
        };
        // (kind, rank, alpha) → count
        let mut groups: BTreeMap<(String, usize, String), usize> = BTreeMap::new();
        for (name, m) in modules {
            let alpha = m.alpha.map_or_else(|| "none (scale 1)".to_string(), |a| format!("{a} (scale {:.4})", m.scale()));
            *groups.entry((layer_kind(name), m.rank(), alpha)).or_default() += 1;
        }
        let _ = writeln!(s, "{title} targets (layer, count, rank, alpha):");
        for ((kind, rank, alpha), n) in groups {
            let _ = writeln!(s, "  {kind:<24} {n:>4} x  rank {rank:<4} alpha {alpha}");
        }
    }
    if weights.non_finite.is_empty() {
        let _ = writeln!(s, "non-finite:  none (every weight is a finite number)");
    } else {
        let values: usize = weights.non_finite.iter().map(|t| t.nan + t.inf).sum();
        let _ = writeln!(
            s,
            "non-finite:  {} tensor(s) hold {values} NaN or infinite value(s); this LoRA cannot be used (lora generate and convert refuse it):",
            weights.non_finite.len()
        );
        for t in &weights.non_finite {
            let _ = writeln!(s, "  {t}");
        }
    }
    if weights.metadata.is_empty() {
        let _ = writeln!(s, "metadata:    (none)");
    } else {
        let _ = writeln!(s, "metadata:");
        for (k, v) in &weights.metadata {
            let shown = if k == PIPELINE_TOML_KEY {
                format!("({} bytes of TOML)", v.len())
            } else if v.chars().count() > 120 || v.contains('\n') {
                let head: String = v.chars().take(100).filter(|c| *c != '\n').collect();
                format!("{head}… ({} chars)", v.chars().count())
            } else {
                v.clone()
            };
            let _ = writeln!(s, "  {k} = {shown}");
        }
    }
    s
}

/// The component's name in JSON and in diffusers' key prefixes.
fn component_name(c: Component) -> &'static str {
    match c {
        Component::Unet => "unet",
        Component::TextEncoder => "text_encoder",
        Component::TextEncoder2 => "text_encoder_2",
    }
}

/// [`describe`] as one JSON object (`lora inspect --json`), with stable keys:
/// `kind` ("lora"), `format` (or null), `base_model`, `parameters`, `module_counts` (per
/// component), `targets` (grouped like the text: component, layer, count, rank, alpha, scale),
/// `modules` (every module: component, name, rank, alpha, scale), `metadata` (the header, whole),
/// `non_finite` (key, nan, inf, total per tensor) and `usable` (false when `non_finite` is not empty).
pub(crate) fn describe_json(weights: &LoraWeights) -> serde_json::Value {
    use serde_json::json;
    let components = [Component::Unet, Component::TextEncoder, Component::TextEncoder2];
    /// (layer kind, rank, alpha as text) → (count, alpha, scale)
    type Groups = BTreeMap<(String, usize, String), (usize, Option<f64>, f64)>;
    let mut targets = Vec::new();
    for c in components {
        let mut groups = Groups::new();
        for (name, m) in weights.component(c) {
            let alpha_key = m.alpha.map_or_else(String::new, |a| a.to_string());
            groups.entry((layer_kind(name), m.rank(), alpha_key)).or_insert((0, m.alpha, m.scale())).0 += 1;
        }
        for ((layer, rank, _), (count, alpha, scale)) in groups {
            targets.push(json!({"component": component_name(c), "layer": layer, "count": count, "rank": rank, "alpha": alpha, "scale": scale}));
        }
    }
    let modules: Vec<serde_json::Value> = weights
        .modules()
        .map(|(c, name, m)| json!({"component": component_name(c), "name": name, "rank": m.rank(), "alpha": m.alpha, "scale": m.scale()}))
        .collect();
    let non_finite: Vec<serde_json::Value> =
        weights.non_finite.iter().map(|t| json!({"key": t.key, "nan": t.nan, "inf": t.inf, "total": t.total})).collect();
    json!({
        "kind": "lora",
        "format": weights.source_format.map(|f| f.to_string()),
        "base_model": guess_base(weights),
        "parameters": weights.param_count(),
        "module_counts": {
            "unet": weights.unet.len(),
            "text_encoder": weights.text_encoder.len(),
            "text_encoder_2": weights.text_encoder_2.len(),
        },
        "targets": targets,
        "modules": modules,
        "metadata": weights.metadata,
        "non_finite": non_finite,
        "usable": weights.non_finite.is_empty(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_kinds() {
        assert_eq!(layer_kind("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"), "attn1.to_out.0");
        assert_eq!(layer_kind("text_model.encoder.layers.3.self_attn.q_proj"), "self_attn.q_proj");
        assert_eq!(layer_kind("mid_block.attentions.0.proj_in"), "proj_in");
        assert_eq!(layer_kind("to_q"), "to_q");
    }
}
