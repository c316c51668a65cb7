//! Reading LoRA files: a safetensors file in any form [`super::keys`] understands into one
//! [`LoraWeights`] (alphas from `.alpha` keys or diffusers' `lora_adapter_metadata`; a module
//! without alpha has scale 1, as diffusers applies it), pickles refused, a damaged header
//! explained by tensor and offset.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use safetensors::{Dtype, SafeTensors};

use super::keys::{canonical_module_name, parse_key, Part, ADAPTER_METADATA_KEY};
use super::weights::LoraFormat;
use super::weights::{Component, LoraModule, LoraWeights, NonFiniteTensor};
use crate::models::weights::PICKLE_EXTENSIONS;

/// A tensor of any float dtype as f32 on CPU; any numeric scalar as f64 for alphas.
fn view_to_tensor(key: &str, view: &safetensors::tensor::TensorView<'_>) -> Result<Tensor> {
    let dtype = match view.dtype() {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F64 => DType::F64,
        Dtype::I64 => DType::I64,
        Dtype::U8 => DType::U8,
        Dtype::U32 => DType::U32,
        other => bail!("tensor `{key}` has dtype {other:?}, which a LoRA weight cannot have"),
    };
    let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)
        .with_context(|| format!("tensor `{key}`: cannot read {:?} {:?}", view.dtype(), view.shape()))?;
    Ok(t)
}

fn scalar_alpha(key: &str, view: &safetensors::tensor::TensorView<'_>) -> Result<f64> {
    if view.shape().iter().product::<usize>() != 1 {
        bail!("alpha `{key}` must be a single number, has shape {:?}", view.shape());
    }
    let data = view.data();
    let value = match view.dtype() {
        Dtype::I64 => i64::from_le_bytes(data.try_into()?) as f64,
        Dtype::I32 => i32::from_le_bytes(data.try_into()?) as f64,
        Dtype::F32 => f32::from_le_bytes(data.try_into()?) as f64,
        Dtype::F64 => f64::from_le_bytes(data.try_into()?),
        Dtype::F16 => half::f16::from_le_bytes(data.try_into()?).to_f64(),
        Dtype::BF16 => half::bf16::from_le_bytes(data.try_into()?).to_f64(),
        other => bail!("alpha `{key}` has dtype {other:?}; expected a number"),
    };
    if !(value.is_finite() && value > 0.0) {
        bail!("alpha `{key}` is {value}; it must be a positive number");
    }
    Ok(value)
}

/// Read a LoRA file to use it (apply, convert): [`read_lora_file`], refusing NaN or infinite
/// weights with the tensors named ([`LoraWeights::check_finite`]).
pub fn read_lora_file_for_use(path: &Path) -> Result<LoraWeights> {
    let weights = read_lora_file(path)?;
    weights.check_finite().with_context(|| format!("LoRA file {}", path.display()))?;
    Ok(weights)
}

/// Read a LoRA file in any supported format. NaN or infinite weights are read and listed in
/// [`LoraWeights::non_finite`]; [`read_lora_file_for_use`] refuses them.
pub fn read_lora_file(path: &Path) -> Result<LoraWeights> {
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    if PICKLE_EXTENSIONS.contains(&ext) {
        bail!("{}: only safetensors LoRA files are read; `.{ext}` files are Python pickles, which can run code when loaded", path.display());
    }
    let bytes = std::fs::read(path).with_context(|| format!("cannot read LoRA file {}", path.display()))?;
    parse_lora_bytes(&bytes).with_context(|| format!("LoRA file {}", path.display()))
}

/// Explain a safetensors header error: which tensor and which offsets are wrong.
fn header_error(bytes: &[u8], err: safetensors::SafeTensorError) -> anyhow::Error {
    let Some(prefix) = bytes.get(..8) else {
        return anyhow!("not a safetensors file: {} bytes, shorter than the 8-byte header length", bytes.len());
    };
    let n = u64::from_le_bytes(prefix.try_into().expect("8 bytes"));
    if n.saturating_add(8) > bytes.len() as u64 {
        return anyhow!(
            "damaged safetensors header: it claims {n} header bytes at offset 8, but the file has only {} bytes ({err})",
            bytes.len()
        );
    }
    let header_end = 8 + n as usize;
    let data_len = (bytes.len() - header_end) as u64;
    let generic = || anyhow!("damaged safetensors header (JSON at offsets 8..{header_end}; file is {} bytes): {err}", bytes.len());
    let Ok(serde_json::Value::Object(header)) = serde_json::from_slice::<serde_json::Value>(&bytes[8..header_end]) else {
        return generic();
    };
    // Walk the entries in data order and name the first one that does not add up.
    let mut entries: Vec<(u64, u64, &String, &serde_json::Value)> = Vec::new();
    for (name, info) in &header {
        if name == "__metadata__" {
            continue;
        }
        let offsets = info.get("data_offsets").and_then(|o| o.as_array());
        let (Some(start), Some(end)) = (
            offsets.and_then(|o| o.first()).and_then(|v| v.as_u64()),
            offsets.and_then(|o| o.get(1)).and_then(|v| v.as_u64()),
        ) else {
            return anyhow!("damaged safetensors header: tensor `{name}` has no valid `data_offsets` ({err})");
        };
        entries.push((start, end, name, info));
    }
    entries.sort_by_key(|e| (e.0, e.1));
    let mut expected_start = 0u64;
    for (start, end, name, info) in entries {
        let elem_size = match info.get("dtype").and_then(|d| d.as_str()) {
            Some("F64" | "I64" | "U64") => 8,
            Some("F32" | "I32" | "U32") => 4,
            Some("F16" | "BF16" | "I16" | "U16") => 2,
            Some("U8" | "I8" | "BOOL" | "F8_E4M3" | "F8_E5M2") => 1,
            other => return anyhow!("damaged safetensors header: tensor `{name}` has dtype {other:?} ({err})"),
        };
        let shape: Option<Vec<u64>> = info.get("shape").and_then(|s| s.as_array()).map(|s| s.iter().filter_map(|d| d.as_u64()).collect());
        let Some(shape) = shape else {
            return anyhow!("damaged safetensors header: tensor `{name}` has no valid `shape` ({err})");
        };
        let want = shape.iter().try_fold(elem_size, |acc: u64, d| acc.checked_mul(*d));
        if start != expected_start {
            return anyhow!("damaged safetensors header: tensor `{name}` starts at data offset {start}, expected {expected_start} (overlap or gap)");
        }
        if want != Some(end.saturating_sub(start)) || end < start {
            return anyhow!(
                "damaged safetensors header: tensor `{name}` has shape {shape:?} ({} bytes) but data offsets {start}..{end} ({} bytes)",
                want.map_or("too many".to_string(), |w| w.to_string()),
                end.saturating_sub(start)
            );
        }
        expected_start = end;
    }
    if expected_start != data_len {
        return anyhow!(
            "damaged safetensors file: the tensors cover {expected_start} data bytes, the file has {data_len} after the header (truncated or padded at offset {})",
            header_end as u64 + expected_start.min(data_len)
        );
    }
    generic()
}

/// Parse the bytes of a LoRA safetensors file.
pub fn parse_lora_bytes(bytes: &[u8]) -> Result<LoraWeights> {
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(|e| header_error(bytes, e))?;
    let st = SafeTensors::deserialize(bytes).map_err(|e| header_error(bytes, e))?;
    let metadata: BTreeMap<String, String> = header.metadata().clone().unwrap_or_default().into_iter().collect();

    #[derive(Default)]
    struct Pending {
        down: Option<(String, Tensor)>,
        up: Option<(String, Tensor)>,
        alpha: Option<f64>,
        alpha_key: Option<String>,
        magnitude: Option<(String, Tensor)>,
    }
    let mut pending: BTreeMap<(u8, String), (Component, Pending)> = BTreeMap::new();
    let mut format_counts: BTreeMap<LoraFormat, usize> = BTreeMap::new();
    let mut non_finite = Vec::new();
    let mut names = st.names();
    names.sort_unstable();
    if names.is_empty() {
        bail!("the file holds no tensors");
    }
    for key in names {
        let view = st.tensor(key)?;
        let parsed = parse_key(key)?;
        if let Some(f) = parsed.format {
            *format_counts.entry(f).or_default() += 1;
        }
        let slot = &mut pending
            .entry((parsed.component as u8, parsed.module.clone()))
            .or_insert_with(|| (parsed.component, Pending::default()))
            .1;
        let duplicate = |other: &str| anyhow!("keys `{other}` and `{key}` both give module `{}`", parsed.module);
        match parsed.part {
            Part::Down | Part::Up | Part::Magnitude => {
                let shape = view.shape();
                match (parsed.part, shape.len()) {
                    (Part::Down | Part::Up, 2 | 4) | (Part::Magnitude, 1 | 2 | 4) => {}
                    _ => bail!("tensor `{key}` has shape {shape:?}; a LoRA weight is [r, in] / [out, r] (a conv's [r, in, kh, kw] / [out, r, 1, 1]), a DoRA magnitude [out]"),
                }
                if parsed.part == Part::Up && shape.len() == 4 && (shape[2], shape[3]) != (1, 1) {
                    bail!("tensor `{key}` has shape {shape:?}; a conv LoRA's up weight is a 1x1 conv [out, r, 1, 1]");
                }
                let t = view_to_tensor(key, &view)?;
                if !t.dtype().is_float() {
                    bail!("tensor `{key}` has dtype {:?}; LoRA weights must be floating point", view.dtype());
                }
                let t = t.to_dtype(DType::F32)?;
                let values = t.flatten_all()?.to_vec1::<f32>()?;
                let (nan, inf) = values.iter().fold((0, 0), |(n, i), v| (n + v.is_nan() as usize, i + v.is_infinite() as usize));
                if nan + inf > 0 {
                    non_finite.push(NonFiniteTensor { key: key.to_string(), nan, inf, total: values.len() });
                }
                let place = match parsed.part {
                    Part::Down => &mut slot.down,
                    Part::Up => &mut slot.up,
                    _ => &mut slot.magnitude,
                };
                if let Some((other, _)) = place {
                    return Err(duplicate(other));
                }
                *place = Some((key.to_string(), t));
            }
            Part::Alpha => {
                if let Some(other) = &slot.alpha_key {
                    return Err(duplicate(other));
                }
                slot.alpha = Some(scalar_alpha(key, &view)?);
                slot.alpha_key = Some(key.to_string());
            }
        }
    }

    let mut weights = LoraWeights { metadata, non_finite, ..Default::default() };
    weights.source_format = format_counts.iter().max_by_key(|(_, n)| **n).map(|(f, _)| *f);
    for ((_, module), (component, p)) in pending {
        let (down_key, down) = p.down.ok_or_else(|| {
            anyhow!("module `{module}` has an up weight ({}) but no down weight", p.up.as_ref().map_or_else(|| p.alpha_key.clone().unwrap_or_default(), |u| u.0.clone()))
        })?;
        let (up_key, up) = p.up.ok_or_else(|| anyhow!("module `{module}` has a down weight (`{down_key}`) but no up weight"))?;
        // Keep B as `[out, r]` (a conv's 1x1 B flattened); A keeps its kernel.
        let up = if up.rank() == 4 { up.reshape((up.dims()[0], up.dims()[1]))? } else { up };
        let (r, r_up) = (down.dims()[0], up.dims()[1]);
        if r != r_up || r == 0 {
            bail!(
                "module `{module}`: down `{down_key}` {:?} and up `{up_key}` {:?} disagree on the rank (down must be [r, in], up [out, r])",
                down.dims(),
                up.dims()
            );
        }
        let module = canonical_module_name(component, &module);
        if weights.component(component).contains_key(&module) {
            bail!("two spellings of module `{module}` in one file (e.g. `{down_key}`)");
        }
        let magnitude = match p.magnitude {
            None => None,
            Some((key, m)) => {
                let out = up.dims()[0];
                let dims = m.dims().to_vec();
                // `lora_magnitude_vector`: `[out]` (linear) or `[1, out, 1, 1]` (conv), PEFT's
                // shapes; `dora_scale`: `[out, 1]` / `[out, 1, 1, 1]`, LyCORIS's output axis. Its
                // input-axis form (`[1, in]`, LyCORIS before 3.1.1) is another decomposition.
                let on_output = if key.ends_with(".dora_scale") {
                    dims == [out, 1] || dims == [out, 1, 1, 1]
                } else {
                    dims == [out] || dims == [1, out, 1, 1]
                };
                if !on_output {
                    bail!(
                        "DoRA magnitude `{key}` has shape {dims:?}; module `{module}` has {out} output channels, so it must hold {out} values, one per output channel, \
                         shaped [{out}] or [1, {out}, 1, 1] (lora_magnitude_vector) or [{out}, 1] / [{out}, 1, 1, 1] (dora_scale); \
                         a `[1, in]` dora_scale is LyCORIS's input-axis decomposition, which is not read"
                    );
                }
                Some(m.reshape(out)?)
            }
        };
        weights.component_mut(component).insert(module, LoraModule { down, up, alpha: p.alpha, magnitude });
    }
    if let Some(json) = weights.metadata.get(ADAPTER_METADATA_KEY).cloned() {
        apply_adapter_metadata(&mut weights, &json).with_context(|| format!("header key `{ADAPTER_METADATA_KEY}`"))?;
    }
    Ok(weights)
}

/// Take per-module alphas from diffusers' `lora_adapter_metadata` JSON (`unet.lora_alpha`,
/// `unet.alpha_pattern`, ... or unprefixed keys for a single component).
fn apply_adapter_metadata(weights: &mut LoraWeights, json: &str) -> Result<()> {
    let value: serde_json::Value = serde_json::from_str(json).context("not valid JSON")?;
    let obj = value.as_object().ok_or_else(|| anyhow!("not a JSON object"))?;
    let prefixed = obj.keys().any(|k| k.contains('.'));
    for c in [Component::Unet, Component::TextEncoder, Component::TextEncoder2] {
        let get = |k: &str| if prefixed { obj.get(&format!("{}.{k}", c.diffusers_prefix())) } else { obj.get(k) };
        let Some(alpha) = get("lora_alpha").and_then(|v| v.as_f64()) else { continue };
        let patterns: Vec<(String, f64)> = get("alpha_pattern")
            .and_then(|v| v.as_object())
            .map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_f64()?))).collect())
            .unwrap_or_default();
        for (name, module) in weights.component_mut(c).iter_mut() {
            let from_pattern = patterns
                .iter()
                .filter(|(p, _)| name == p || name.ends_with(&format!(".{p}")))
                .max_by_key(|(p, _)| p.len())
                .map(|(_, a)| *a);
            module.alpha = Some(from_pattern.unwrap_or(alpha));
        }
    }
    Ok(())
}
