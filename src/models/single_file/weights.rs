//! A single file's weights under diffusers names: each component gets a renaming
//! [`ComponentWeights`] over the memory-mapped file (a tensor is read, sliced and converted only
//! when the network asks for it), every tensor of the file used or knowingly left out; and a
//! separate VAE file in either layout.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};

use super::header::Header;
use super::names::{
    ema_name, open_clip_ldm_name, open_clip_name, unet_layout, unet_map, vae_map, OpenClip, CLIP_PREFIX, EMA_PREFIX, LDM_BUFFERS, OPEN_CLIP_PREFIX,
    SDXL_CLIP_PREFIX, SDXL_OPEN_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX,
};
use super::recognition::{recognise_diffusers_vae, recognise_ldm_vae, Family, Recognition};
use crate::models::config::VaeConfig;
use crate::models::weights::{modern_attention_name, ComponentWeights, MappedTensor, MissingHint, WeightOptions};

/// The three components' weights of a single file, renamed to diffusers names.
pub struct SingleFileWeights {
    pub unet: ComponentWeights,
    pub vae: Option<ComponentWeights>,
    pub text_encoder: ComponentWeights,
    /// SDXL's OpenCLIP bigG (with its projection).
    pub text_encoder_2: Option<ComponentWeights>,
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
                unet.push(MappedTensor { name: diffusers, stored_name: stored, rows: None, transpose: false });
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
            Some(diffusers) => vae.push(MappedTensor { name: diffusers, stored_name: name.clone(), rows: None, transpose: false }),
            None => unknown.push(name.clone()),
        }
    }
    let vae = if with_vae {
        let rules = vae_rules.clone();
        let hint: MissingHint = Arc::new(move |n: &str| rules.to_ldm(&modern_attention_name(n)).map(|l| format!("{VAE_PREFIX}{l}")));
        Some(ComponentWeights::open_mapped("vae", &path, &vae, &WeightOptions { legacy_attention_names: true, ..Default::default() }, Some(hint))?)
    } else {
        None
    };

    // Text encoders: SD 1.x's CLIP, SD 2.x's OpenCLIP (its last block unused), SDXL's CLIP-L and
    // OpenCLIP bigG with its projection.
    let mut texts = Vec::new();
    let sources: Vec<(TextSource, &crate::models::config::ClipTextConfig)> = match rec.family {
        Family::Sd1 => vec![(TextSource::HfClip(CLIP_PREFIX), &rec.text_encoder)],
        Family::Sd2 => vec![(TextSource::OpenClip { prefix: OPEN_CLIP_PREFIX, projection: false }, &rec.text_encoder)],
        Family::Sdxl => {
            let second = rec.text_encoder_2.as_ref().context("an SDXL recognition has a second text encoder")?;
            vec![(TextSource::HfClip(SDXL_CLIP_PREFIX), &rec.text_encoder), (TextSource::OpenClip { prefix: SDXL_OPEN_CLIP_PREFIX, projection: true }, second)]
        }
    };
    for (i, (source, config)) in sources.into_iter().enumerate() {
        let (text, hint) = map_text(header, &path, source, config, &mut claimed, &mut ignored, &mut unknown)?;
        texts.push(ComponentWeights::open_mapped(
            if i == 0 { "text_encoder" } else { "text_encoder_2" },
            &path,
            &text,
            &WeightOptions { optional_prefix: Some("text_model.".into()), ..Default::default() },
            Some(hint),
        )?);
    }
    let text_encoder_2 = if texts.len() > 1 { texts.pop() } else { None };
    let text_encoder = texts.pop().expect("one text encoder");

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
    Ok(SingleFileWeights { unet, vae, text_encoder, text_encoder_2 })
}

/// Where a text encoder's tensors are and how they are named.
#[derive(Clone, Copy)]
enum TextSource {
    /// transformers' CLIP names under a prefix (SD 1.x, SDXL's first encoder).
    HfClip(&'static str),
    /// OpenCLIP names under a prefix: fused q/k/v, `text_projection` (`x @ P`) when the model
    /// uses it (SDXL), else left out with the last block SD 2.x does not read.
    OpenClip { prefix: &'static str, projection: bool },
}

/// The renamed tensors of one text encoder and the hint for missing ones; claims its tensors.
fn map_text<'h>(
    header: &'h Header,
    path: &Path,
    source: TextSource,
    config: &crate::models::config::ClipTextConfig,
    claimed: &mut BTreeSet<&'h str>,
    ignored: &mut Vec<(String, String)>,
    unknown: &mut Vec<String>,
) -> anyhow::Result<(Vec<MappedTensor>, MissingHint)> {
    let mut text = Vec::new();
    let (layers, hidden) = (config.num_hidden_layers, config.hidden_size);
    match source {
        TextSource::HfClip(prefix) => {
            for (name, _) in &header.tensors {
                let Some(rest) = name.strip_prefix(prefix) else { continue };
                claimed.insert(name);
                if rest.ends_with("position_ids") {
                    ignored.push((name.clone(), "position-id buffers".into()));
                    continue;
                }
                text.push(MappedTensor { name: rest.to_string(), stored_name: name.clone(), rows: None, transpose: false });
            }
            Ok((text, Arc::new(move |n: &str| Some(format!("{prefix}{n}")))))
        }
        TextSource::OpenClip { prefix, projection } => {
            let in_file = header.indices(&format!("{prefix}transformer.resblocks.")).len();
            let expected = if projection { vec![layers] } else { vec![layers, layers + 1] };
            if !expected.contains(&in_file) {
                bail!(
                    "{}: the text encoder config has {layers} layers but the file has {in_file} OpenCLIP blocks (expected {})",
                    path.display(),
                    if projection { format!("{layers}") } else { format!("{layers}, or {} of which SD 2.x leaves the last unused", layers + 1) }
                );
            }
            for (name, (shape, _)) in &header.tensors {
                let Some(rest) = name.strip_prefix(prefix) else { continue };
                claimed.insert(name);
                match (rest, projection) {
                    ("text_projection", true) => {
                        text.push(MappedTensor { name: "text_projection.weight".into(), stored_name: name.clone(), rows: None, transpose: true });
                        continue;
                    }
                    ("logit_scale", true) => {
                        ignored.push((name.clone(), "OpenCLIP's logit scale (contrastive training only)".into()));
                        continue;
                    }
                    ("text_projection" | "logit_scale", false) => {
                        ignored.push((name.clone(), "OpenCLIP projection tensors SD 2.x does not use".into()));
                        continue;
                    }
                    _ => {}
                }
                match open_clip_name(rest, layers) {
                    OpenClip::Plain(n) => text.push(MappedTensor { name: n, stored_name: name.clone(), rows: None, transpose: false }),
                    OpenClip::Fused(base, kind) => {
                        if shape.first() != Some(&(3 * hidden)) {
                            bail!("{}: `{name}` has shape {shape:?}; a fused q/k/v projection of width {hidden} has {} rows", path.display(), 3 * hidden);
                        }
                        for (i, q) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
                            text.push(MappedTensor { name: format!("{base}.{q}.{kind}"), stored_name: name.clone(), rows: Some((i * hidden, hidden)), transpose: false });
                        }
                    }
                    OpenClip::Unused => ignored.push((name.clone(), "tensors of the last OpenCLIP layer (SD 2.x reads the penultimate)".into())),
                    OpenClip::Unknown => unknown.push(name.clone()),
                }
            }
            Ok((text, Arc::new(move |n: &str| {
                if n == "text_projection.weight" {
                    return Some(format!("{prefix}text_projection"));
                }
                open_clip_ldm_name(n).map(|l| format!("{prefix}{l}"))
            })))
        }
    }
}

/// A separate VAE file: a diffusers-layout `AutoencoderKL` file, an LDM VAE (`encoder.down.*`),
/// or one with the `first_stage_model.` prefix. Returns its weights and config.
pub(crate) fn open_vae_file(path: &Path, scaling_factor: f64) -> anyhow::Result<(ComponentWeights, VaeConfig)> {
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
                (true, Some(d)) => mapped.push(MappedTensor { name: d, stored_name: name.clone(), rows: None, transpose: false }),
                _ => unknown.push(format!("`{name}`")),
            }
        }
        if !unknown.is_empty() {
            bail!("VAE file {}: {} tensor(s) are not VAE weights: {}", path.display(), unknown.len(), unknown.into_iter().take(10).collect::<Vec<_>>().join(", "));
        }
        let hint_prefix = prefix.to_string();
        let hint: MissingHint = Arc::new(move |n: &str| rules.to_ldm(&modern_attention_name(n)).map(|l| format!("{hint_prefix}{l}")));
        let w = ComponentWeights::open_mapped("vae", path, &mapped, &WeightOptions { legacy_attention_names: true, ..Default::default() }, Some(hint))?;
        (w, config)
    };
    config.scaling_factor = scaling_factor;
    Ok((weights, config))
}
