//! Recognising a single file: SD 1.x or 2.x, the UNet, VAE and text-encoder configs from the
//! tensors' names and shapes (or a `[model] config` folder), and the prediction type (flag,
//! header, `v_pred` key, config folder, family default), with the reason for each.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde_json::json;

use super::header::Header;
use super::names::{clip_layer_prefix, unet_layout, CLIP_PREFIX, EMA_PREFIX, OPEN_CLIP_PREFIX, SDXL_CLIP_PREFIX, SDXL_OPEN_CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX};
use crate::models::config::{ClipTextConfig, UNetConfig, VaeConfig};
use crate::schedulers::SchedulerConfig;
use crate::util::fs::read_text;
use crate::vocab::{self, PredictionType};

/// The model families a single file is recognised as (SD 1.x and 2.x so far).
pub use crate::vocab::Family;

/// True when a `.safetensors` file holds an LDM single-file checkpoint (a UNet under
/// `model.diffusion_model.`).
pub(crate) fn is_single_file_checkpoint(header: &Header) -> bool {
    header.tensors.keys().any(|k| k.starts_with(UNET_PREFIX))
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
    /// SDXL's second text encoder (OpenCLIP bigG with its projection).
    pub text_encoder_2: Option<ClipTextConfig>,
    pub prediction: Prediction,
    /// The diffusers folder whose configs were used (`[model] config`), if any.
    pub(crate) configs_from: Option<PathBuf>,
    /// Tensors of the file that are knowingly left out (EMA copies, the OpenCLIP layer SD 2.x
    /// does not use, schedule buffers), with why.
    pub ignored: Vec<(String, String)>,
    /// Whether the UNet weights are the EMA copy (`model_ema.*`).
    pub uses_ema: bool,
    pub(super) text_layers_in_file: usize,
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
                Family::Sd2 | Family::Sdxl => "gelu",
            }
        );
        if let Some(t2) = &self.text_encoder_2 {
            out += &format!(
                "text 2:      OpenCLIP {} layers of {}, {} heads, gelu, projection {}\n",
                t2.num_hidden_layers,
                t2.hidden_size,
                t2.num_attention_heads,
                t2.projection_dim.unwrap_or(0)
            );
        }
        if let Some(add) = &u.addition {
            out += &format!("conditioning: pooled {} + 6 time ids of {} (label_emb)\n", add.pooled_dim(), add.time_embed_dim);
        }
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
pub(crate) struct SingleFileOptions {
    /// A diffusers folder whose `unet/`, `vae/`, `text_encoder/` configs, `tokenizer/` and
    /// `scheduler/` are used instead of the recognised/bundled ones (its weights are not read).
    pub(crate) config_dir: Option<PathBuf>,
    /// Overrides the file and the family default.
    pub prediction_type: Option<PredictionType>,
    /// Read the UNet from the EMA copy (`model_ema.*`) when the file has both.
    pub ema: bool,
}

/// Recognise the model in a single-file checkpoint from its header.
pub(crate) fn recognise(path: &Path, header: &Header, opts: &SingleFileOptions) -> anyhow::Result<Recognition> {
    if !is_single_file_checkpoint(header) {
        bail!(
            "{} is not a single-file Stable Diffusion checkpoint: it has no `{UNET_PREFIX}*` tensors{}",
            path.display(),
            if header.tensors.keys().any(|k| k.starts_with("lora_") || k.contains(".lora")) { " (it looks like a LoRA file)" } else { "" }
        );
    }
    let has = |prefix: &str| header.tensors.keys().any(|k| k.starts_with(prefix));
    let family = if has("conditioner.embedders.") {
        if !has(SDXL_CLIP_PREFIX) || !has(SDXL_OPEN_CLIP_PREFIX) {
            bail!(
                "{} is an SDXL-style checkpoint (`conditioner.embedders.*`) without both text encoders (`{SDXL_CLIP_PREFIX}*` and `{SDXL_OPEN_CLIP_PREFIX}*`; a refiner has only the second): only base-style SDXL single files are supported",
                path.display()
            );
        }
        Family::Sdxl
    } else if header.tensors.keys().any(|k| k.starts_with(OPEN_CLIP_PREFIX)) {
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
    let (unet, vae, text_encoder, text_encoder_2, configs_from) = match &opts.config_dir {
        Some(dir) => {
            let unet = UNetConfig::from_json_file(dir.join(vocab::UNET_CONFIG))?;
            let vae = VaeConfig::from_json_file(dir.join(vocab::VAE_CONFIG))?;
            let text = ClipTextConfig::from_json_file(dir.join(vocab::TEXT_ENCODER_CONFIG))?;
            let text_2 = if family == Family::Sdxl { Some(ClipTextConfig::from_json_file(dir.join(vocab::TEXT_ENCODER_2_CONFIG))?) } else { None };
            (unet, vae, text, text_2, Some(dir.clone()))
        }
        None => {
            let heads: Vec<usize> = match family {
                // SD 1.x: `num_heads: 8` in v1-inference.yaml, for every block.
                Family::Sd1 => vec![8; layout.channels.len()],
                // SD 2.x and SDXL: `num_head_channels: 64`.
                Family::Sd2 | Family::Sdxl => layout
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
            let mut unet_json = json!({
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
            let mut text_2 = None;
            if family == Family::Sdxl {
                // `label_emb.0.0` reads [pooled, 6 time-id sinusoids]: the pooled width is the
                // projection's, the rest is six equal parts (SDXL base: 1280 + 6 x 256 = 2816).
                let second = recognise_open_clip(header, SDXL_OPEN_CLIP_PREFIX, true)?;
                let pooled = second.projection_dim.context("SDXL's second text encoder has no text_projection")?;
                let label = header.shape(&format!("{p}label_emb.0.0.weight")).context("the SDXL UNet has no `label_emb.0.0.weight` (the pooled text + time-id embedding)")?;
                let input = label[1];
                if input <= pooled || (input - pooled) % 6 != 0 {
                    bail!("{}: `label_emb.0.0.weight` reads {input} features, which is not the {pooled}-wide pooled embedding plus 6 equal time-id parts", path.display());
                }
                unet_json["addition_embed_type"] = json!("text_time");
                unet_json["addition_time_embed_dim"] = json!((input - pooled) / 6);
                unet_json["projection_class_embeddings_input_dim"] = json!(input);
                unet_json["sample_size"] = json!(128);
                text_2 = Some(second);
            }
            let unet = UNetConfig::from_json_str(&unet_json.to_string())?;
            let vae = recognise_ldm_vae(header, VAE_PREFIX)?;
            let text = recognise_text(header, family, None)?;
            (unet, vae, text, text_2, None)
        }
    };
    let text_layers_in_file = match family {
        Family::Sd1 => header.indices(&clip_layer_prefix(header)).len(),
        Family::Sd2 => header.indices(&format!("{OPEN_CLIP_PREFIX}transformer.resblocks.")).len(),
        Family::Sdxl => header.indices(&format!("{SDXL_CLIP_PREFIX}text_model.encoder.layers.")).len(),
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
        text_encoder_2,
        prediction,
        configs_from,
        ignored: Vec::new(),
        uses_ema: opts.ema,
        text_layers_in_file,
    })
}

/// A prediction type as people write it (`epsilon`, `eps`, `v`, `v_prediction`, `v-prediction`,
/// `vpred`, `v_pred`; any case): a single file's metadata, `--prediction-type`.
pub(crate) fn prediction_word(word: &str) -> Option<PredictionType> {
    match word.trim().to_ascii_lowercase().as_str() {
        "epsilon" | "eps" => Some(PredictionType::Epsilon),
        "v" | "v_prediction" | "v-prediction" | "vpred" | "v_pred" => Some(PredictionType::VPrediction),
        _ => None,
    }
}

/// [`prediction_word`] for a command-line flag, refusing anything else.
pub(crate) fn prediction_flag(word: &str) -> anyhow::Result<PredictionType> {
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
        Family::Sdxl => Prediction { kind: PredictionType::Epsilon, reason: "SDXL base models predict noise".into() },
        Family::Sd2 => Prediction {
            kind: PredictionType::VPrediction,
            reason: "the SD 2.x 768 default, as diffusers guesses; SD 2.x base (512) models are epsilon: set [model] prediction_type".into(),
        },
    })
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
        Family::Sdxl => {
            let base = format!("{SDXL_CLIP_PREFIX}text_model.");
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
pub(super) fn recognise_ldm_vae(header: &Header, prefix: &str) -> anyhow::Result<VaeConfig> {
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
pub(super) fn recognise_diffusers_vae(header: &Header) -> anyhow::Result<VaeConfig> {
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

/// An OpenCLIP text encoder's config from its tensors: every block (SDXL reads them all, its
/// penultimate state and, through `text_projection`, the pooled one), `gelu`, heads of 64.
fn recognise_open_clip(header: &Header, prefix: &str, projection: bool) -> anyhow::Result<ClipTextConfig> {
    let need = |k: String| header.shape(&k).map(<[usize]>::to_vec).with_context(|| format!("the text encoder has no `{k}`"));
    let token = need(format!("{prefix}token_embedding.weight"))?;
    let position = need(format!("{prefix}positional_embedding"))?;
    let fc1 = need(format!("{prefix}transformer.resblocks.0.mlp.c_fc.weight"))?;
    let blocks = header.indices(&format!("{prefix}transformer.resblocks.")).len();
    let hidden = token[1];
    if hidden % 64 != 0 {
        bail!("the second text encoder is {hidden} wide, not a multiple of OpenCLIP's head size 64, so its heads cannot be recognised; give `[model] config` (a diffusers folder with text_encoder_2/config.json)");
    }
    let mut json = json!({
        "vocab_size": token[0],
        "hidden_size": hidden,
        "intermediate_size": fc1[0],
        "num_hidden_layers": blocks,
        "num_attention_heads": hidden / 64,
        "max_position_embeddings": position[0],
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,
    });
    if projection {
        // OpenCLIP stores `x @ P` ([hidden, projection]).
        json["projection_dim"] = json!(need(format!("{prefix}text_projection"))?[1]);
    }
    ClipTextConfig::from_json_str(&json.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::single_file::header::tests::sd15_like_header;

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
}
