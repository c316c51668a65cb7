//! LDM ↔ diffusers names: the prefixes of an LDM checkpoint's components, the UNet's block
//! structure read from its names, the prefix maps both ways (UNet, VAE), OpenCLIP's names
//! (its fused `in_proj` split into q/k/v row slices) and LitEma's EMA names.

use anyhow::{bail, Context};

use super::header::Header;

pub(super) const UNET_PREFIX: &str = "model.diffusion_model.";
pub(super) const VAE_PREFIX: &str = "first_stage_model.";
pub(super) const CLIP_PREFIX: &str = "cond_stage_model.transformer.";
pub(super) const OPEN_CLIP_PREFIX: &str = "cond_stage_model.model.";
pub(super) const EMA_PREFIX: &str = "model_ema.";
/// SDXL's text encoders: CLIP ViT-L (transformers names) and OpenCLIP bigG.
pub(super) const SDXL_CLIP_PREFIX: &str = "conditioner.embedders.0.transformer.";
pub(super) const SDXL_OPEN_CLIP_PREFIX: &str = "conditioner.embedders.1.model.";

/// Top-level names of an LDM checkpoint that are not network weights: the DDPM schedule
/// buffers `LatentDiffusion` registers, and scalars some trainers add.
pub(super) const LDM_BUFFERS: [&str; 15] = [
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
pub(crate) struct PrefixMap {
    rules: Vec<PrefixRule>,
}

impl PrefixMap {
    fn add(&mut self, ldm: impl Into<String>, diffusers: impl Into<String>, inner: &'static [(&'static str, &'static str)]) {
        self.rules.push(PrefixRule { ldm: ldm.into(), diffusers: diffusers.into(), inner });
    }

    /// The diffusers name of an LDM name (without the component prefix), if a rule covers it.
    pub(crate) fn to_diffusers(&self, ldm: &str) -> Option<String> {
        let rule = self.rules.iter().filter(|r| ldm.starts_with(&r.ldm)).max_by_key(|r| r.ldm.len())?;
        let rest = &ldm[rule.ldm.len()..];
        let rest = rename_inner(rest, rule.inner.iter().map(|(a, b)| (*a, *b)));
        Some(format!("{}{rest}", rule.diffusers))
    }

    /// The LDM name a diffusers name is stored as.
    pub(crate) fn to_ldm(&self, diffusers: &str) -> Option<String> {
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
pub(super) struct UNetLayout {
    pub(super) layers: usize,
    pub(super) channels: Vec<usize>,
    pub(super) down_attention: Vec<bool>,
    pub(super) up_attention: Vec<bool>,
    pub(super) transformer_layers: Vec<usize>,
}

pub(super) fn unet_layout(h: &Header) -> anyhow::Result<UNetLayout> {
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

/// The LDM layout of a diffusers UNet config (`None` when its blocks differ in layers).
fn layout_of_config(cfg: &crate::models::config::UNetConfig) -> Option<UNetLayout> {
    use crate::models::config::{DownBlockType, UpBlockType};
    let layers = *cfg.layers_per_block.first()?;
    if cfg.layers_per_block.iter().any(|&l| l != layers) {
        return None;
    }
    let blocks = cfg.block_out_channels.len();
    Some(UNetLayout {
        layers,
        channels: cfg.block_out_channels.clone(),
        down_attention: cfg.down_block_types.iter().map(|t| *t == DownBlockType::CrossAttnDownBlock2D).collect(),
        // `unet_map` indexes up blocks in diffusers order (up block i mirrors down block n-1-i).
        up_attention: (0..blocks).map(|i| cfg.up_block_types[i] == UpBlockType::CrossAttnUpBlock2D).collect(),
        transformer_layers: cfg.transformer_layers_per_block.clone(),
    })
}

/// LDM ↔ diffusers names of the UNet a config describes (the names kohya sd-scripts gives SDXL
/// LoRAs, `input_blocks.4.1.…`); `None` for a UNet whose blocks differ in layers.
pub(crate) fn unet_map_of_config(cfg: &crate::models::config::UNetConfig) -> Option<PrefixMap> {
    layout_of_config(cfg).map(|l| unet_map(&l))
}

pub(super) fn unet_map(l: &UNetLayout) -> PrefixMap {
    let mut m = PrefixMap::default();
    m.add("time_embed.0.", "time_embedding.linear_1.", NONE);
    m.add("time_embed.2.", "time_embedding.linear_2.", NONE);
    // SDXL's `label_emb` (the pooled text + time ids MLP).
    m.add("label_emb.0.0.", "add_embedding.linear_1.", NONE);
    m.add("label_emb.0.2.", "add_embedding.linear_2.", NONE);
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
pub(super) fn vae_map(blocks: usize, layers: usize) -> PrefixMap {
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

pub(super) fn clip_layer_prefix(header: &Header) -> String {
    if header.tensors.keys().any(|k| k.starts_with(&format!("{CLIP_PREFIX}text_model."))) {
        format!("{CLIP_PREFIX}text_model.encoder.layers.")
    } else {
        format!("{CLIP_PREFIX}encoder.layers.")
    }
}

/// `model.diffusion_model.a.b.c` → `model_ema.diffusion_modelabc`, as LDM's `LitEma` names its
/// copies (dots removed).
pub(super) fn ema_name(name: &str) -> String {
    let rest = name.strip_prefix("model.").unwrap_or(name);
    format!("{EMA_PREFIX}{}", rest.replace('.', ""))
}

pub(super) enum OpenClip {
    Plain(String),
    /// `text_model.encoder.layers.N.self_attn` and `weight` / `bias`.
    Fused(String, &'static str),
    Unused,
    Unknown,
}

/// The diffusers name of an OpenCLIP tensor (`rest` is after `cond_stage_model.model.`).
pub(super) fn open_clip_name(rest: &str, layers: usize) -> OpenClip {
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
pub(super) fn open_clip_ldm_name(name: &str) -> Option<String> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::single_file::header::tests::sd15_like_header;

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
