//! LoRA targets checked against a local diffusers model's layers (from the weight files'
//! headers only, `targets_layers`): each pattern must match a linear layer, pattern keys a
//! targeted module, and a rank wider than a targeted layer is a warning.

use crate::config::load::quote_key;
use crate::config::world::{Finding, Written};
use crate::config::Pipeline;

/// The [`crate::config::world::WorldCheck`].
pub(crate) fn in_model(p: &Pipeline, _written: &dyn Written, found: &mut Vec<Finding>) {
    targets_in_model(p, found);
}

/// With a local diffusers model, each UNet (and, when trained, text-encoder) target pattern
/// must match a linear layer (read from the weight files' headers only), and a rank wider
/// than a targeted layer is a warning. A model that cannot be read is left to the model stage
/// to report.
pub(crate) fn targets_in_model(p: &Pipeline, found: &mut Vec<Finding>) {
    let (Some(dir), None) = (&p.model.path, &p.model.file) else { return };
    if !dir.is_dir() {
        return;
    }
    let a = &p.adapter;
    let variant = p.model.variant.as_deref();
    let rank_pattern: Vec<(String, u32)> = a.rank_pattern.iter().map(|(k, r)| (k.clone(), r.0)).collect();
    let mut narrow = Vec::new();
    let mut targeted: Vec<String> = Vec::new();
    let mut linear: Vec<String> = Vec::new();
    let mut read = 0;
    let components = [
        ("adapter.target_modules", &a.target_modules, "the UNet", super::targets_layers::unet_layers(dir, variant).ok()),
        (
            "adapter.text_encoder_target_modules",
            &a.text_encoder_target_modules,
            "the text encoder",
            if a.text_encoder { super::targets_layers::text_encoder_layers(dir, variant).ok() } else { None },
        ),
    ];
    for (key, patterns, component, layers) in components {
        let Some(layers) = layers else { continue };
        for (i, pattern) in patterns.iter().enumerate() {
            if pattern.trim().is_empty() {
                continue;
            }
            if let Some((message, help)) = super::targets_layers::target_problem(pattern, &layers, component) {
                found.push(Finding::error(&[&format!("{key}[{i}]"), key], message, help));
            }
        }
        narrow.extend(super::targets_layers::narrow_layers(patterns, a.rank, &rank_pattern, &layers));
        targeted.extend(super::targets_layers::targeted(patterns, &layers).into_iter().map(str::to_string));
        if key == "adapter.target_modules" && a.conv_rank.is_some() {
            targeted.extend(super::targets_layers::locon_convs(&layers).into_iter().map(str::to_string));
        }
        linear.extend(super::targets_layers::linear_names(&layers).into_iter().map(str::to_string));
        read += 1;
    }
    // Pattern keys need a targeted module to apply to (checked once both components are read).
    if read == 1 + usize::from(a.text_encoder) {
        let targeted: Vec<&str> = targeted.iter().map(String::as_str).collect();
        let linear: Vec<&str> = linear.iter().map(String::as_str).collect();
        let keys = a.rank_pattern.keys().map(|k| ("rank_pattern", k)).chain(a.alpha_pattern.keys().map(|k| ("alpha_pattern", k)));
        for (kind, key) in keys {
            if let Some((message, help)) = super::targets_layers::pattern_key_problem(kind, key, &targeted, &linear) {
                found.push(Finding::error(&[&format!("adapter.{kind}.{}", quote_key(key))], message, help));
            }
        }
    }
    if let Some((module, rank, out, inp)) = narrow.first() {
        let key = if a.rank_pattern.is_empty() || *rank == a.rank { "adapter.rank" } else { "adapter.rank_pattern" };
        found.push(Finding::warning(
            &[key],
            format!(
                "rank {rank} is above the width of {} targeted layer(s) (e.g. `{module}`, {out} x {inp}): a rank above min(in, out) adds parameters, not capacity",
                narrow.len()
            ),
            Some(format!("a rank of at most {} fits every targeted layer", narrow.iter().map(|(_, _, o, i)| *o.min(i)).min().unwrap_or(1))),
        ));
    }
}

