//! The header of a safetensors file read alone (every tensor's name, shape and dtype, and
//! `__metadata__`), without the tensor data: what recognition reads.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context};
use serde_json::Value;

/// The header of a safetensors file: every tensor's shape and dtype, and `__metadata__`.
#[derive(Clone, Debug, Default)]
pub struct Header {
    pub tensors: BTreeMap<String, (Vec<usize>, String)>,
    pub metadata: BTreeMap<String, String>,
}

impl Header {
    /// Read only the header (the first `8 + n` bytes), not the tensor data.
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let mut file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let total = file.metadata().map(|m| m.len()).unwrap_or(0);
        let mut len = [0u8; 8];
        file.read_exact(&mut len).with_context(|| format!("{} is not a safetensors file (shorter than 8 bytes)", path.display()))?;
        let n = u64::from_le_bytes(len);
        if n == 0 || n > 100_000_000 || n + 8 > total {
            bail!("{} is not a safetensors file (header length {n} for a file of {total} bytes)", path.display());
        }
        let mut text = vec![0u8; n as usize];
        file.read_exact(&mut text).with_context(|| format!("reading the header of {}", path.display()))?;
        let json: Value = serde_json::from_slice(&text)
            .with_context(|| format!("{} is not a safetensors file (its header is not JSON)", path.display()))?;
        let Value::Object(entries) = json else { bail!("{}: the safetensors header is not a JSON object", path.display()) };
        let mut header = Header::default();
        for (name, entry) in entries {
            if name == "__metadata__" {
                if let Value::Object(m) = entry {
                    for (k, v) in m {
                        header.metadata.insert(k, v.as_str().map(str::to_string).unwrap_or_else(|| v.to_string()));
                    }
                }
                continue;
            }
            let shape: Vec<usize> = entry
                .get("shape")
                .and_then(Value::as_array)
                .map(|s| s.iter().filter_map(Value::as_u64).map(|d| d as usize).collect())
                .with_context(|| format!("{}: tensor `{name}` has no shape in the header", path.display()))?;
            let dtype = entry.get("dtype").and_then(Value::as_str).unwrap_or("?").to_string();
            header.tensors.insert(name, (shape, dtype));
        }
        Ok(header)
    }

    pub(super) fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|(s, _)| s.as_slice())
    }

    pub(super) fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// The names under `prefix`, with the prefix removed.
    pub(super) fn under<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = &'a str> + 'a {
        self.tensors.keys().filter_map(move |k| k.strip_prefix(prefix))
    }

    /// The distinct integers `N` of names `prefix N . …` under `prefix`.
    pub(super) fn indices(&self, prefix: &str) -> BTreeSet<usize> {
        self.under(prefix).filter_map(|rest| rest.split('.').next()?.parse().ok()).collect()
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A header with SD 1.5's real tensor shapes (no data), built from the published layout:
    /// recognition must give SD 1.5's published `unet/config.json` values.
    pub(in crate::models::single_file) fn sd15_like_header() -> Header {
        let mut h = Header::default();
        let mut put = |k: &str, s: &[usize]| {
            h.tensors.insert(k.to_string(), (s.to_vec(), "F16".into()));
        };
        let ch = [320, 640, 1280, 1280];
        put("model.diffusion_model.input_blocks.0.0.weight", &[320, 4, 3, 3]);
        put("model.diffusion_model.time_embed.0.weight", &[1280, 320]);
        put("model.diffusion_model.out.2.weight", &[4, 320, 3, 3]);
        for i in 0..4 {
            for j in 0..2 {
                let idx = 1 + i * 3 + j;
                put(&format!("model.diffusion_model.input_blocks.{idx}.0.out_layers.3.weight"), &[ch[i], ch[i], 3, 3]);
                if i < 3 {
                    put(&format!("model.diffusion_model.input_blocks.{idx}.1.proj_in.weight"), &[ch[i], ch[i], 1, 1]);
                    put(&format!("model.diffusion_model.input_blocks.{idx}.1.transformer_blocks.0.attn2.to_k.weight"), &[ch[i], 768]);
                }
            }
            if i < 3 {
                put(&format!("model.diffusion_model.input_blocks.{}.0.op.weight", (i + 1) * 3), &[ch[i], ch[i], 3, 3]);
            }
            for j in 0..3 {
                let idx = i * 3 + j;
                put(&format!("model.diffusion_model.output_blocks.{idx}.0.out_layers.3.weight"), &[1, 1]);
                if i > 0 {
                    put(&format!("model.diffusion_model.output_blocks.{idx}.1.proj_in.weight"), &[1, 1, 1, 1]);
                }
            }
        }
        put("model.diffusion_model.middle_block.1.proj_in.weight", &[1280, 1280, 1, 1]);
        put("cond_stage_model.transformer.text_model.embeddings.token_embedding.weight", &[49408, 768]);
        put("cond_stage_model.transformer.text_model.embeddings.position_embedding.weight", &[77, 768]);
        for l in 0..12 {
            put(&format!("cond_stage_model.transformer.text_model.encoder.layers.{l}.mlp.fc1.weight"), &[3072, 768]);
        }
        let vch = [128, 256, 512, 512];
        for i in 0..4 {
            for j in 0..2 {
                put(&format!("first_stage_model.encoder.down.{i}.block.{j}.conv1.weight"), &[vch[i], vch[i], 3, 3]);
            }
        }
        put("first_stage_model.encoder.conv_in.weight", &[128, 3, 3, 3]);
        put("first_stage_model.decoder.conv_out.weight", &[3, 128, 3, 3]);
        put("first_stage_model.quant_conv.weight", &[8, 8, 1, 1]);
        put("first_stage_model.post_quant_conv.weight", &[4, 4, 1, 1]);
        put("first_stage_model.encoder.mid.attn_1.q.weight", &[512, 512, 1, 1]);
        h
    }
}
