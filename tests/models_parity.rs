//! Parity of the candle networks (UNet, CLIP text encoder, VAE) with diffusers/transformers on
//! the tiny-sd fixture: f32 on CPU, compared with `tests/fixtures/golden/*`.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use lora::models::config::{ClipTextConfig, UNetConfig, VaeConfig};
use lora::models::{AutoencoderKL, ClipTextModel, UNet2DConditionModel};

/// Relative tolerance for f32 CPU parity: max |ours − reference| ≤ 1e-4 · max |reference|.
const REL_TOL: f32 = 1e-4;

fn fixture(rel: &str) -> PathBuf {
    crate::support::repo_root().join("tests/fixtures").join(rel)
}

fn weights(rel: &str) -> VarBuilder<'static> {
    unsafe { VarBuilder::from_mmaped_safetensors(&[fixture(rel)], DType::F32, &Device::Cpu) }.expect("fixture weights load")
}

fn golden(rel: &str) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(rel), &Device::Cpu).expect("golden file loads")
}

fn config(rel: &str) -> String {
    std::fs::read_to_string(fixture(rel)).expect("config.json readable")
}

/// Asserts `ours ≈ reference` within `REL_TOL` of the reference's largest magnitude.
fn assert_close(what: &str, ours: &Tensor, reference: &Tensor) {
    assert_eq!(ours.dims(), reference.dims(), "{what}: shape");
    let ours = ours.to_dtype(DType::F32).unwrap();
    let diff = (&ours - reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = reference.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-6);
    assert!(
        diff <= REL_TOL * scale,
        "{what}: max abs diff {diff:e} exceeds {REL_TOL:e} relative tolerance (reference max {scale:e})"
    );
    eprintln!("{what}: max abs diff {diff:e}, relative {:e} (tolerance {REL_TOL:e})", diff / scale);
}

#[test]
fn unet_matches_diffusers() {
    let cfg = UNetConfig::from_json_str(&config("tiny-sd/unet/config.json")).unwrap();
    let unet = UNet2DConditionModel::load(weights("tiny-sd/unet/diffusion_pytorch_model.safetensors"), &cfg).unwrap();
    let g = golden("golden/unet.safetensors");
    let out = unet.forward(&g["sample"], &g["timesteps"], &lora::models::Conditioning::context((g["encoder_hidden_states"]).clone())).unwrap();
    assert_close("unet out", &out, &g["out"]);
}

#[test]
fn text_encoder_matches_transformers() {
    let cfg = ClipTextConfig::from_json_str(&config("tiny-sd/text_encoder/config.json")).unwrap();
    let clip = ClipTextModel::load(weights("tiny-sd/text_encoder/model.safetensors"), &cfg).unwrap();
    let g = golden("golden/text_encoder.safetensors");
    let out = clip.forward(&g["input_ids"]).unwrap();
    assert_close("text encoder last_hidden_state", &out, &g["last_hidden_state"]);
}

#[test]
fn vae_encode_and_decode_match_diffusers() {
    let cfg = VaeConfig::from_json_str(&config("tiny-sd/vae/config.json")).unwrap();
    let vae = AutoencoderKL::load(weights("tiny-sd/vae/diffusion_pytorch_model.safetensors"), &cfg).unwrap();
    assert_eq!(vae.scaling_factor(), 0.18215);
    let g = golden("golden/vae.safetensors");
    let dist = vae.encode(&g["pixel_values"]).unwrap();
    assert_close("vae latent_mean", &dist.mean, &g["latent_mean"]);
    assert_close("vae latent_std", &dist.std().unwrap(), &g["latent_std"]);
    let decoded = vae.decode(&g["latent_mean"]).unwrap();
    assert_close("vae decoded_from_mean", &decoded, &g["decoded_from_mean"]);
}
