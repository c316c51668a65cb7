//! Applying the golden LoRA files to the tiny UNet reproduces diffusers' `out_with_lora`.
//! Needs the UNet (another module): ignored until `models::unet` lands.

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use lora::adapters::read::read_lora_file;
use lora::adapters::lora::apply_lora_weights;
use lora::models::config::UNetConfig;
use lora::models::UNet2DConditionModel;

fn fixtures() -> PathBuf {
    crate::support::repo_root().join("tests/fixtures")
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
    let out = unet.forward(&inputs["sample"], &inputs["timesteps"], &lora::models::Conditioning::context((inputs["encoder_hidden_states"]).clone())).unwrap();
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
fn diffusers_lora_on_tiny_unet_equals_golden() {
    let (out, want) = unet_output_with("lora-diffusers/pytorch_lora_weights.safetensors");
    let e = rel_err(&out, &want);
    // f32 CPU parity: 1e-4 relative to the output's max magnitude.
    assert!(e < 1e-4, "diffusers LoRA: relative error {e} > 1e-4");
}

#[test]
fn kohya_lora_on_tiny_unet_equals_golden() {
    let (out, want) = unet_output_with("lora-kohya.safetensors");
    let e = rel_err(&out, &want);
    // f32 CPU parity: 1e-4 relative to the output's max magnitude.
    assert!(e < 1e-4, "kohya LoRA: relative error {e} > 1e-4");
}

#[test]
fn reference_injection_on_the_tiny_models_targets_what_the_reference_saved() {
    use lora::adapters::lora::{inject, trained_weights, InitRng, LoraSpec};
    use lora::models::config::ClipTextConfig;
    use lora::models::ClipTextModel;
    use rand::SeedableRng;
    let dev = Device::Cpu;
    let dir = fixtures().join("tiny-sd/unet");
    let cfg = UNetConfig::from_json_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let vb = unsafe {
        candle_nn::VarBuilder::from_mmaped_safetensors(&[dir.join("diffusion_pytorch_model.safetensors")], DType::F32, &dev).unwrap()
    };
    let mut unet = UNet2DConditionModel::load(vb, &cfg).unwrap();
    let mut rng = InitRng::seed_from_u64(0);
    let unet_loras = inject(unet.linears_mut(), &LoraSpec::reference_unet(4), &mut rng).unwrap();
    // The same modules, ranks and shapes as the reference's saved file.
    let golden = read_lora_file(&fixtures().join("golden/lora-diffusers/pytorch_lora_weights.safetensors")).unwrap();
    let ours = trained_weights(&unet_loras, &[]).unwrap();
    assert_eq!(ours.unet.keys().collect::<Vec<_>>(), golden.unet.keys().collect::<Vec<_>>());
    for (name, m) in &golden.unet {
        assert_eq!(ours.unet[name].down.dims(), m.down.dims(), "{name}");
        assert_eq!(ours.unet[name].up.dims(), m.up.dims(), "{name}");
    }
    // Text encoder: q/k/v/out of each of the 3 layers.
    let te = fixtures().join("tiny-sd/text_encoder");
    let cfg = ClipTextConfig::from_json_str(&std::fs::read_to_string(te.join("config.json")).unwrap()).unwrap();
    let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&[te.join("model.safetensors")], DType::F32, &dev).unwrap() };
    let mut clip = ClipTextModel::load(vb, &cfg).unwrap();
    let te_loras = inject(clip.linears_mut(), &LoraSpec::reference_text_encoder(4), &mut rng).unwrap();
    assert_eq!(te_loras.len(), 12);
    assert!(te_loras.iter().any(|l| l.module == "text_model.encoder.layers.0.self_attn.q_proj"));
}
