//! Writing LoRA files: diffusers (as the reference saves it), PEFT and kohya keys, weights in
//! f32/f16/bf16, and diffusers' `lora_adapter_metadata` header when some alpha differs from its
//! rank; written atomically.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use safetensors::Dtype;

use super::keys::{module_to_kohya, ADAPTER_METADATA_KEY};
use super::weights::LoraFormat;
use super::weights::{Component, LoraWeights};

/// One tensor to write: raw little-endian bytes.
struct OwnedView {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &OwnedView {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// `t` as a safetensors view in `dtype` (F32, F16 or BF16; rounded to nearest).
fn tensor_view(t: &Tensor, dtype: DType) -> Result<OwnedView> {
    let flat = t.to_dtype(dtype)?.flatten_all()?;
    let (st, data): (Dtype, Vec<u8>) = match dtype {
        DType::F32 => (Dtype::F32, flat.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
        DType::F16 => (Dtype::F16, flat.to_vec1::<half::f16>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
        DType::BF16 => (Dtype::BF16, flat.to_vec1::<half::bf16>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
        other => bail!("LoRA weights are written as f32, f16 or bf16, not {other:?}"),
    };
    Ok(OwnedView { dtype: st, shape: t.dims().to_vec(), data })
}

fn alpha_view(alpha: f64) -> OwnedView {
    if alpha.fract() == 0.0 && alpha.abs() < 9e15 {
        OwnedView { dtype: Dtype::I64, shape: vec![], data: (alpha as i64).to_le_bytes().to_vec() }
    } else {
        OwnedView { dtype: Dtype::F32, shape: vec![], data: (alpha as f32).to_le_bytes().to_vec() }
    }
}

/// A whole number as a JSON integer, otherwise a float.
fn json_number(x: f64) -> serde_json::Value {
    if x.fract() == 0.0 && x.abs() < 9e15 {
        (x as i64).into()
    } else {
        x.into()
    }
}

/// diffusers' `lora_adapter_metadata` for the components whose alphas are not all equal to
/// their ranks; `None` when every scale is 1 (the reference's case).
fn adapter_metadata(weights: &LoraWeights) -> Option<String> {
    let mut out = serde_json::Map::new();
    for c in [Component::Unet, Component::TextEncoder, Component::TextEncoder2] {
        let modules = weights.component(c);
        if modules.values().all(|m| m.alpha.is_none_or(|a| a == m.rank() as f64)) {
            continue;
        }
        // The most common rank is r; other ranks and every alpha go into the patterns.
        let mut rank_counts: BTreeMap<usize, usize> = BTreeMap::new();
        for m in modules.values() {
            *rank_counts.entry(m.rank()).or_default() += 1;
        }
        let r = rank_counts.iter().max_by_key(|(_, n)| **n).map(|(r, _)| *r).unwrap_or(1);
        let mut alpha_counts: BTreeMap<String, (usize, f64)> = BTreeMap::new();
        for m in modules.values() {
            let a = m.effective_alpha();
            alpha_counts.entry(a.to_string()).or_insert((0, a)).0 += 1;
        }
        let alpha = alpha_counts.values().max_by_key(|(n, _)| *n).map(|(_, a)| *a).unwrap_or(r as f64);
        // transformers 5 flattens CLIPTextModel (no `text_model.` level): name text-encoder
        // modules from `encoder.` on, which PEFT's suffix matching finds in either layout.
        let peft_name = |n: &str| -> String {
            match c {
                Component::Unet => n.to_string(),
                _ => n.strip_prefix("text_model.").unwrap_or(n).to_string(),
            }
        };
        let rank_pattern: serde_json::Map<_, _> =
            modules.iter().filter(|(_, m)| m.rank() != r).map(|(n, m)| (peft_name(n), m.rank().into())).collect();
        let alpha_pattern: serde_json::Map<_, _> = modules
            .iter()
            .filter(|(_, m)| m.effective_alpha() != alpha)
            .map(|(n, m)| (peft_name(n), json_number(m.effective_alpha())))
            .collect();
        let targets: Vec<String> = modules.keys().map(|n| peft_name(n)).collect();
        let p = c.diffusers_prefix();
        out.insert(format!("{p}.r"), r.into());
        out.insert(format!("{p}.lora_alpha"), json_number(alpha));
        out.insert(format!("{p}.rank_pattern"), rank_pattern.into());
        out.insert(format!("{p}.alpha_pattern"), alpha_pattern.into());
        out.insert(format!("{p}.target_modules"), targets.into());
        if modules.values().any(|m| m.magnitude.is_some()) {
            // diffusers builds the LoraConfig from this header alone when it is present.
            out.insert(format!("{p}.use_dora"), true.into());
        }
    }
    if out.is_empty() {
        None
    } else {
        Some(serde_json::to_string_pretty(&serde_json::Value::Object(out)).expect("JSON of plain values"))
    }
}

/// Serialise `weights` in `format` (`AttnProcessor` is read-only).
///
/// - diffusers: `unet.<module>.lora.down.weight` / `.lora.up.weight` (text encoder:
///   `text_encoder.<module>.lora_linear_layer.down.weight`), F32, header exactly
///   `{"format": "pt"}` plus `lora_adapter_metadata` only if some alpha differs from its rank;
/// - PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight`, same header rule;
/// - kohya: `lora_unet_<module with _>.lora_down.weight` / `.lora_up.weight` / `.alpha` (I64
///   when whole, else F32; alpha = r when the module has none), header = `weights.metadata`.
pub fn serialize_lora(weights: &LoraWeights, format: LoraFormat) -> Result<Vec<u8>> {
    serialize_lora_as(weights, format, DType::F32)
}

/// [`serialize_lora`] with the up/down weights in `dtype` (`output.save_precision`).
pub(crate) fn serialize_lora_as(weights: &LoraWeights, format: LoraFormat, dtype: DType) -> Result<Vec<u8>> {
    if weights.is_empty() {
        bail!("refusing to write a LoRA file with no modules");
    }
    let mut tensors: BTreeMap<String, OwnedView> = BTreeMap::new();
    for (c, name, m) in weights.modules() {
        // DoRA's magnitude goes under the last key: `lora_magnitude_vector` as diffusers saves it
        // (no `.weight`; PEFT's names have it), kohya / LyCORIS `dora_scale`.
        let (down_key, up_key, magnitude_key) = match format {
            LoraFormat::Diffusers => {
                let p = c.diffusers_prefix();
                let mid = if c == Component::Unet { "lora" } else { "lora_linear_layer" };
                (format!("{p}.{name}.{mid}.down.weight"), format!("{p}.{name}.{mid}.up.weight"), format!("{p}.{name}.lora_magnitude_vector"))
            }
            LoraFormat::Peft => {
                let p = c.diffusers_prefix();
                (format!("{p}.{name}.lora_A.weight"), format!("{p}.{name}.lora_B.weight"), format!("{p}.{name}.lora_magnitude_vector.weight"))
            }
            LoraFormat::Kohya => {
                // kohya names SDXL's encoders `lora_te1_` / `lora_te2_` (SD 1.x/2.x: `lora_te_`).
                let stem = match c {
                    Component::TextEncoder if !weights.text_encoder_2.is_empty() => format!("lora_te1_{}", name.replace('.', "_")),
                    _ => module_to_kohya(c, name),
                };
                tensors.insert(format!("{stem}.alpha"), alpha_view(m.effective_alpha()));
                (format!("{stem}.lora_down.weight"), format!("{stem}.lora_up.weight"), format!("{stem}.dora_scale"))
            }
            LoraFormat::AttnProcessor => bail!("the old attention-processor form is read only; write diffusers, peft or kohya"),
        };
        // A conv's B is a 1x1 conv `[out, r, 1, 1]` in every form.
        let conv = m.down.rank() == 4;
        let up = if conv { m.up.reshape((m.up.dims()[0], m.rank(), 1, 1))? } else { m.up.clone() };
        let mut views = vec![(down_key, tensor_view(&m.down, dtype)?), (up_key, tensor_view(&up, dtype)?)];
        if let Some(mag) = &m.magnitude {
            // Shapes: diffusers / PEFT `[out]` for a linear, PEFT's `[1, out, 1, 1]` for a conv;
            // kohya LyCORIS's output-axis form (`wd_on_out`), `[out, 1]` / `[out, 1, 1, 1]`. Always
            // f32: it scales the whole weight, and bf16's 2⁻⁹ would move every weight by up to 0.4%.
            let out = mag.elem_count();
            let shape = match (format, conv) {
                (LoraFormat::Kohya, false) => vec![out, 1],
                (LoraFormat::Kohya, true) => vec![out, 1, 1, 1],
                (_, false) => vec![out],
                (_, true) => vec![1, out, 1, 1],
            };
            views.push((magnitude_key, tensor_view(&mag.reshape(shape)?, DType::F32)?));
        }
        for (key, view) in views {
            if tensors.insert(key.clone(), view).is_some() {
                bail!("two modules map to the same key `{key}`");
            }
        }
    }
    let header: HashMap<String, String> = match format {
        LoraFormat::Kohya => weights.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        _ => {
            let mut h = HashMap::from([("format".to_string(), "pt".to_string())]);
            if let Some(json) = adapter_metadata(weights) {
                h.insert(ADAPTER_METADATA_KEY.to_string(), json);
            }
            h
        }
    };
    let header = if header.is_empty() { None } else { Some(header) };
    crate::util::safetensors_bytes::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), header)
}

/// Write `weights` to `path` in `format`, atomically (temporary file, then rename).
pub fn write_lora_file(weights: &LoraWeights, path: &Path, format: LoraFormat) -> Result<()> {
    let bytes = serialize_lora(weights, format)?;
    crate::util::fs::write_atomic(path, &bytes).with_context(|| format!("cannot write LoRA file {}", path.display()))
}
