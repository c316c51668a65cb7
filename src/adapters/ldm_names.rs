//! UNet module names in the original (LDM / SGM) layout, as kohya sd-scripts writes SDXL LoRAs
//! (`input_blocks.4.1.transformer_blocks.0.attn1.to_q`, `middle_block.1.…`, `output_blocks.…`,
//! `label_emb.0.0`), and back to diffusers' names for a loaded UNet, through the prefix map a
//! UNet config gives (`models::single_file::names::unet_map_of_config`).

use std::collections::BTreeMap;

use anyhow::{bail, Result};

use super::weights::{LoraModule, LoraWeights};
use crate::models::config::UNetConfig;
use crate::models::single_file::names::unet_map_of_config;

/// The first part of every LDM UNet module name.
const LDM_ROOTS: [&str; 5] = ["input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "label_emb."];

/// True when a UNet module name is in the LDM layout.
pub fn is_ldm_unet_name(module: &str) -> bool {
    LDM_ROOTS.iter().any(|r| module.starts_with(r))
}

fn rename(unet: &BTreeMap<String, LoraModule>, mut f: impl FnMut(&str) -> Result<String>) -> Result<BTreeMap<String, LoraModule>> {
    let mut out = BTreeMap::new();
    for (name, m) in unet {
        let new = f(name)?;
        if out.insert(new.clone(), m.clone()).is_some() {
            bail!("two UNet LoRA modules map to `{new}`");
        }
    }
    Ok(out)
}

/// `weights` with its UNet modules named in the LDM layout of the UNet `cfg` describes.
pub fn to_ldm_unet_names(weights: &LoraWeights, cfg: &UNetConfig) -> Result<LoraWeights> {
    let Some(map) = unet_map_of_config(cfg) else { bail!("this UNet's blocks differ in layer count; it has no LDM layout to name LoRA modules by") };
    let unet = rename(&weights.unet, |name| {
        if is_ldm_unet_name(name) {
            return Ok(name.to_string());
        }
        match map.to_ldm(&format!("{name}.")) {
            Some(ldm) => Ok(ldm.trim_end_matches('.').to_string()),
            None => bail!("UNet LoRA module `{name}` has no name in the original (LDM) layout"),
        }
    })?;
    Ok(LoraWeights { unet, ..weights.clone() })
}

/// `weights` with LDM-named UNet modules (kohya's SDXL files) renamed to diffusers' names for
/// the UNet `cfg` describes; diffusers names stay as they are.
pub fn to_diffusers_unet_names(weights: &LoraWeights, cfg: &UNetConfig) -> Result<LoraWeights> {
    if !weights.unet.keys().any(|n| is_ldm_unet_name(n)) {
        return Ok(weights.clone());
    }
    let Some(map) = unet_map_of_config(cfg) else { bail!("the LoRA names UNet modules in the original (LDM) layout, but this UNet's blocks differ in layer count") };
    let unet = rename(&weights.unet, |name| {
        if !is_ldm_unet_name(name) {
            return Ok(name.to_string());
        }
        match map.to_diffusers(&format!("{name}.")) {
            Some(d) => Ok(d.trim_end_matches('.').to_string()),
            None => bail!("UNet LoRA module `{name}` (original layout) matches no block of this UNet"),
        }
    })?;
    Ok(LoraWeights { unet, ..weights.clone() })
}
