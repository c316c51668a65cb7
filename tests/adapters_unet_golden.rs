//! Applying the golden LoRA files to the tiny UNet reproduces diffusers' `out_with_lora`.
//! Needs the UNet (another module): ignored until `models::unet` lands.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use lora::adapters::format::read_lora_file;
use lora::adapters::lora::apply_lora_weights;
use lora::models::config::UNetConfig;
use lora::models::UNet2DConditionModel;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn unet_output_with(lora_file: &str) -> (Tensor, Tensor) {
    let dev = Device::Cpu;
    let dir = fixtures().join("tiny-sd/unet");
    let cfg = UNetConfig::from_json_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(&[dir.join("diffusion_pytorch_model.safetensors")], DType::F32, &dev).unwrap()
    };
    let mut unet = UNet2DConditionModel::load(vb, &cfg).unwrap();
    let weights = read_lora_file(&fixtures().join("golden").join(lora_file)).unwrap();
    apply_lora_weights(&weights, unet.linears_mut(), vec![], 1.0).unwrap();
    let inputs = candle_core::safetensors::load(fixtures().join("golden/unet.safetensors"), &dev).unwrap();
    let out = unet.forward(&inputs["sample"], &inputs["timesteps"], &inputs["encoder_hidden_states"]).unwrap();
    let golden = candle_core::safetensors::load(fixtures().join("golden/unet_lora.safetensors"), &dev).unwrap();
    (out, golden["out_with_lora"].clone())
}

/// Max |a - b| / max |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let diff = (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    diff / scale
}

#[test]
#[ignore = "needs models"]
fn diffusers_lora_on_tiny_unet_equals_golden() {
    let (out, want) = unet_output_with("lora-diffusers/pytorch_lora_weights.safetensors");
    let e = rel_err(&out, &want);
    // f32 CPU parity: 1e-4 relative to the output's max magnitude.
    assert!(e < 1e-4, "diffusers LoRA: relative error {e} > 1e-4");
}

#[test]
#[ignore = "needs models"]
fn kohya_lora_on_tiny_unet_equals_golden() {
    let (out, want) = unet_output_with("lora-kohya.safetensors");
    let e = rel_err(&out, &want);
    // f32 CPU parity: 1e-4 relative to the output's max magnitude.
    assert!(e < 1e-4, "kohya LoRA: relative error {e} > 1e-4");
}
