//! The layers of a local model's UNet and text encoder as LoRA sees them, for checking targets
//! before loading: module names and weight shapes come from the safetensors headers alone (no
//! weight is read), and patterns match as injection matches them (`adapters::pattern`).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};

use crate::adapters::pattern::{near_names, ModulePattern};

/// Largest safetensors header read (the UNet of SD 1.5 has a header of about 100 KB).
const MAX_HEADER_BYTES: u64 = 64 << 20;

/// What a UNet module with a `weight` is, as LoRA sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Layer {
    /// A linear layer (LoRA can wrap it): `[out, in]`, or a transformer's 1x1-conv
    /// `proj_in` / `proj_out`, which the model holds as a linear.
    Linear { out_features: usize, in_features: usize },
    /// A convolution other than those: LoRA does not wrap it.
    Conv2d { kernel: (usize, usize) },
    /// A norm or anything else with a weight.
    Other,
}

/// Every module of the UNet of the diffusers folder `model_dir` that has a `weight`, by name
/// (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`), from the headers of its
/// weight files (the files loading would read, shards included).
pub(crate) fn unet_layers(model_dir: &Path, variant: Option<&str>) -> Result<BTreeMap<String, Layer>> {
    let files = crate::models::loading::locate_model_files(model_dir, variant)?;
    weighted_modules(&files.unet.weights, |module, shape| (module.to_string(), classify(module, shape)))
}

/// Every module of the text encoder of `model_dir` that has a `weight`, named as the model
/// names them (`text_model.encoder.layers.0.self_attn.q_proj`, whether or not the file stores
/// the `text_model.` prefix). Only the encoder layers' projections are linear layers LoRA wraps;
/// the token and position embeddings are not.
pub(crate) fn text_encoder_layers(model_dir: &Path, variant: Option<&str>) -> Result<BTreeMap<String, Layer>> {
    let files = crate::models::loading::locate_model_files(model_dir, variant)?;
    weighted_modules(&files.text_encoder.weights, |module, shape| {
        let module = format!("text_model.{}", module.strip_prefix("text_model.").unwrap_or(module));
        let layer = match shape {
            [out, inp] if module.starts_with("text_model.encoder.layers.") => Layer::Linear { out_features: *out, in_features: *inp },
            _ => Layer::Other,
        };
        (module, layer)
    })
}

/// Every module with a `weight` in the headers of `files`, named and classified by `layer`
/// (given the module name without `.weight` and the weight's shape).
fn weighted_modules(files: &[std::path::PathBuf], layer: impl Fn(&str, &[usize]) -> (String, Layer)) -> Result<BTreeMap<String, Layer>> {
    let mut out = BTreeMap::new();
    for path in files {
        for (name, shape) in tensor_shapes(path)? {
            let Some(module) = name.strip_suffix(".weight") else { continue };
            let (module, kind) = layer(module, &shape);
            out.insert(module, kind);
        }
    }
    Ok(out)
}

fn classify(module: &str, shape: &[usize]) -> Layer {
    let last = module.rsplit('.').next().unwrap_or(module);
    match shape {
        [out, inp] => Layer::Linear { out_features: *out, in_features: *inp },
        [out, inp, 1, 1] if last == "proj_in" || last == "proj_out" => Layer::Linear { out_features: *out, in_features: *inp },
        [_, _, kh, kw] => Layer::Conv2d { kernel: (*kh, *kw) },
        _ => Layer::Other,
    }
}

/// The tensor names and shapes of a safetensors file, from its header.
pub(crate) fn tensor_shapes(path: &Path) -> Result<Vec<(String, Vec<usize>)>> {
    let mut file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut len = [0u8; 8];
    file.read_exact(&mut len).with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let len = u64::from_le_bytes(len);
    if len > MAX_HEADER_BYTES {
        bail!("{}: a safetensors header of {len} bytes", path.display());
    }
    let mut header = vec![0u8; len as usize];
    file.read_exact(&mut header).with_context(|| format!("{}: the safetensors header is cut short", path.display()))?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).with_context(|| format!("{}: the safetensors header is not JSON", path.display()))?;
    let mut out = Vec::new();
    for (name, entry) in header {
        if name == "__metadata__" {
            continue;
        }
        let shape: Option<Vec<usize>> = entry.get("shape").and_then(|s| s.as_array()).and_then(|dims| dims.iter().map(|d| d.as_u64().map(|d| d as usize)).collect());
        let shape = shape.with_context(|| format!("{}: tensor `{name}` has no shape", path.display()))?;
        out.push((name, shape));
    }
    Ok(out)
}

/// What is wrong with one target pattern, or `None` when it matches a linear layer of
/// `component` ("the UNet", "the text encoder") or does not parse.
pub(crate) fn target_problem(pattern: &str, layers: &BTreeMap<String, Layer>, component: &str) -> Option<(String, Option<String>)> {
    // A pattern that does not parse is reported by the check of every pattern.
    let parsed = ModulePattern::parse(pattern).ok()?;
    let matched: Vec<(&String, &Layer)> = layers.iter().filter(|(name, _)| parsed.matches(name)).collect();
    if matched.iter().any(|(_, l)| matches!(l, Layer::Linear { .. })) {
        return None;
    }
    let linear_names = linear_names(layers);
    let near = near_names(pattern, linear_names.iter().copied());
    let kinds = short_names(&linear_names).join(", ");
    let near_help = Some(match crate::config::validate::did_you_mean(pattern.strip_prefix("re:").unwrap_or(pattern), near.iter().map(String::as_str)) {
        Some(m) => format!("did you mean `{m}`? the linear layers are: {kinds}"),
        None => format!("the linear layers are: {kinds}"),
    });
    if let Some((name, layer)) = matched.iter().find(|(_, l)| matches!(l, Layer::Conv2d { .. })) {
        let Layer::Conv2d { kernel: (kh, kw) } = layer else { unreachable!() };
        let count = matched.len();
        return Some((
            format!(
                "target `{pattern}` matches {count} module(s) of {component}, but they are convolutions (e.g. `{name}`, a {kh}x{kw} Conv2d): the target list adapts Linear layers; `adapter.conv_rank` adapts the resnets' and samplers' convolutions"
            ),
            near_help,
        ));
    }
    if let Some((name, _)) = matched.first() {
        return Some((format!("target `{pattern}` matches `{name}`, which is not a Linear layer: only Linear layers are adapted"), near_help));
    }
    Some((format!("target `{pattern}` matches no module of {component}"), near_help))
}

/// The names of the linear layers of `layers`.
pub(crate) fn linear_names(layers: &BTreeMap<String, Layer>) -> Vec<&str> {
    layers.iter().filter(|(_, l)| matches!(l, Layer::Linear { .. })).map(|(n, _)| n.as_str()).collect()
}

/// The convolutions `adapter.conv_rank` adapts (LoCon): those of the resnets and samplers.
pub(crate) fn locon_convs(layers: &BTreeMap<String, Layer>) -> Vec<&str> {
    layers
        .iter()
        .filter(|(name, l)| matches!(l, Layer::Conv2d { .. }) && [".resnets.", ".downsamplers.", ".upsamplers."].iter().any(|p| name.contains(p)))
        .map(|(n, _)| n.as_str())
        .collect()
}

/// The linear layers of `layers` that one of `targets` matches.
pub fn targeted<'a>(targets: &[String], layers: &'a BTreeMap<String, Layer>) -> Vec<&'a str> {
    let targets: Vec<ModulePattern> = targets.iter().filter_map(|t| ModulePattern::parse(t).ok()).collect();
    layers
        .iter()
        .filter(|(name, layer)| matches!(layer, Layer::Linear { .. }) && targets.iter().any(|t| t.matches(name)))
        .map(|(name, _)| name.as_str())
        .collect()
}

/// What is wrong with a `rank_pattern` / `alpha_pattern` key that matches none of the targeted
/// modules (`None` when it matches one, or does not parse); `linear` are all linear layers.
pub(crate) fn pattern_key_problem(kind: &str, key: &str, targeted: &[&str], linear: &[&str]) -> Option<(String, Option<String>)> {
    let parsed = ModulePattern::parse(key).ok()?;
    if targeted.iter().any(|n| parsed.matches(n)) {
        return None;
    }
    let untargeted = linear.iter().filter(|n| parsed.matches(n)).count();
    if untargeted > 0 {
        return Some((
            format!("{kind} key `{key}` matches {untargeted} linear layer(s), none of them targeted"),
            Some(format!("add \"{key}\" to the target modules, or remove the key")),
        ));
    }
    let near = near_names(key, targeted.iter().copied());
    let help = crate::config::validate::did_you_mean(key, near.iter().map(String::as_str)).map(|m| format!("did you mean `{m}`?"));
    Some((format!("{kind} key `{key}` matches none of the targeted modules"), help.or_else(|| (!near.is_empty()).then(|| format!("targeted modules end with: {}", near.join(", "))))))
}

/// The distinct short names of `modules` (`to_q`, `to_out.0`, `proj`, `net.2`): the last part
/// of each name, with the part before it when the last is a number. Each is a valid pattern.
fn short_names(modules: &[&str]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for name in modules {
        let parts: Vec<&str> = name.split('.').collect();
        let k = if parts.len() > 1 && parts[parts.len() - 1].chars().all(|c| c.is_ascii_digit()) { 2 } else { 1 };
        let short = parts[parts.len() - k..].join(".");
        if !out.contains(&short) {
            out.push(short);
        }
    }
    out.sort();
    out
}

/// The targeted linear layers narrower than their rank: (module, rank, out, in).
pub(crate) fn narrow_layers(
    targets: &[String],
    rank: u32,
    rank_pattern: &[(String, u32)],
    layers: &BTreeMap<String, Layer>,
) -> Vec<(String, u32, usize, usize)> {
    let targets: Vec<ModulePattern> = targets.iter().filter_map(|t| ModulePattern::parse(t).ok()).collect();
    let ranks: Vec<(ModulePattern, u32)> = rank_pattern.iter().filter_map(|(k, r)| ModulePattern::parse(k).ok().map(|p| (p, *r))).collect();
    let mut out = Vec::new();
    for (name, layer) in layers {
        let Layer::Linear { out_features, in_features } = layer else { continue };
        if !targets.iter().any(|t| t.matches(name)) {
            continue;
        }
        // The longest matching rank_pattern key wins, as in injection.
        let r = ranks.iter().filter(|(p, _)| p.matches(name)).max_by_key(|(p, _)| p.text().len()).map_or(rank, |(_, r)| *r);
        if r as usize > (*out_features).min(*in_features) {
            out.push((name.clone(), r, *out_features, *in_features));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_classify_as_the_model_builds_them() {
        assert_eq!(classify("a.attn1.to_q", &[320, 320]), Layer::Linear { out_features: 320, in_features: 320 });
        assert_eq!(classify("a.attentions.0.proj_in", &[320, 320, 1, 1]), Layer::Linear { out_features: 320, in_features: 320 });
        assert_eq!(classify("a.resnets.0.conv1", &[320, 320, 3, 3]), Layer::Conv2d { kernel: (3, 3) });
        assert_eq!(classify("a.resnets.0.conv_shortcut", &[640, 320, 1, 1]), Layer::Conv2d { kernel: (1, 1) });
        assert_eq!(classify("a.norm1", &[320]), Layer::Other);
    }
}
