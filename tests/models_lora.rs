//! LoRA branches on the UNet's `AdaptedLinear`s: the forward with the reference LoRA equals
//! diffusers (`golden/unet_lora`), and gradients reach every branch with torch's values
//! (`golden/train_step`).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use lora::models::config::UNetConfig;
use lora::models::UNet2DConditionModel;
use lora::nn::LoraBranch;

/// Relative tolerance for f32 CPU forward parity (max abs diff ≤ 1e-4 · max |reference|).
const FORWARD_REL_TOL: f32 = 1e-4;
/// Relative tolerance for gradients (per tensor, against its largest reference entry): 1e-3.
/// The 8x8 sample reaches the deepest blocks as 1x1 pixels, where each GroupNorm group holds
/// two values, and backward through such near-degenerate norms amplifies f32 rounding: the
/// measured worst case is ~7e-4 (mid block), ~2e-4 in the outer blocks.
const GRAD_REL_TOL: f32 = 1e-3;

const TARGETS: [&str; 4] = ["to_q", "to_k", "to_v", "to_out.0"];

fn fixture(rel: &str) -> PathBuf {
    crate::support::repo_root().join("tests/fixtures").join(rel)
}

fn golden(rel: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(rel), &Device::Cpu).expect("golden file loads")
}

fn tiny_unet() -> UNet2DConditionModel {
    let cfg = UNetConfig::from_json_str(&std::fs::read_to_string(fixture("tiny-sd/unet/config.json")).unwrap()).unwrap();
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(&[fixture("tiny-sd/unet/diffusion_pytorch_model.safetensors")], DType::F32, &Device::Cpu)
    }
    .unwrap();
    UNet2DConditionModel::load(vb, &cfg).unwrap()
}

fn is_target(name: &str) -> bool {
    TARGETS.iter().any(|t| name.ends_with(&format!(".{t}")))
}

fn rel_diff(ours: &Tensor, reference: &Tensor) -> f32 {
    assert_eq!(ours.dims(), reference.dims());
    let diff = (ours - reference).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = reference.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-12);
    diff / scale
}

#[test]
fn unet_with_reference_lora_matches_diffusers() {
    let mut unet = tiny_unet();
    let file = golden("golden/lora-diffusers/pytorch_lora_weights.safetensors");
    let mut attached = 0;
    for linear in unet.linears_mut().into_iter().filter(|l| is_target(&l.name)) {
        let down = &file[&format!("unet.{}.lora.down.weight", linear.name)];
        let up = &file[&format!("unet.{}.lora.up.weight", linear.name)];
        // alpha = r = 4: scale 1.
        linear.loras.push(LoraBranch::new(down.clone(), up.clone(), 1.0));
        attached += 1;
    }
    assert_eq!(attached * 2, file.len(), "every LoRA pair in the file has a matching UNet linear");
    let g = golden("golden/unet.safetensors");
    let out = unet.forward(&g["sample"], &g["timesteps"], &lora::models::Conditioning::context((g["encoder_hidden_states"]).clone())).unwrap();
    let reference = &golden("golden/unet_lora.safetensors")["out_with_lora"];
    let rel = rel_diff(&out, reference);
    assert!(rel <= FORWARD_REL_TOL, "out_with_lora: relative diff {rel:e} exceeds {FORWARD_REL_TOL:e}");
}

#[test]
fn lora_gradients_reach_every_branch_and_equal_torch() {
    let mut unet = tiny_unet();
    let step = golden("golden/train_step.safetensors");
    let mut vars: Vec<(String, Var, Var)> = Vec::new();
    for linear in unet.linears_mut().into_iter().filter(|l| is_target(&l.name)) {
        let down = Var::from_tensor(&step[&format!("before.{}.lora_A.default.weight", linear.name)]).unwrap();
        let up = Var::from_tensor(&step[&format!("before.{}.lora_B.default.weight", linear.name)]).unwrap();
        linear.loras.push(LoraBranch::new(down.as_tensor().clone(), up.as_tensor().clone(), 1.0));
        vars.push((linear.name.clone(), down, up));
    }
    // 10 transformers (3 down blocks × 1 layer, 1 mid, 3 up blocks × 2 layers) × 2 attentions
    // × 4 projections.
    assert_eq!(vars.len(), 80, "number of LoRA-targeted linears");

    let g = golden("golden/unet.safetensors");
    let ddpm = golden("golden/ddpm.safetensors");
    let pred = unet.forward(&ddpm["noisy"], &g["timesteps"], &lora::models::Conditioning::context((g["encoder_hidden_states"]).clone())).unwrap();
    let loss = (pred - &ddpm["noise"]).unwrap().sqr().unwrap().mean_all().unwrap();
    let loss_ref = step["loss"].flatten_all().unwrap().get(0).unwrap();
    let loss_rel = rel_diff(&loss, &loss_ref);
    assert!(loss_rel <= FORWARD_REL_TOL, "loss: relative diff {loss_rel:e} exceeds {FORWARD_REL_TOL:e}");

    let grads = loss.backward().unwrap();
    let mut worst = 0f32;
    for (name, down, up) in &vars {
        for (part, var) in [("lora_A", down), ("lora_B", up)] {
            let grad = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name}.{part}: no gradient"));
            let reference = &step[&format!("grad.{name}.{part}.default.weight")];
            let max = grad.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            let reference_max = reference.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            if reference_max == 0.0 {
                // The 8x8 sample reaches the mid block as a single pixel: self-attention over
                // one token ignores q and k, so torch's gradient there is exactly zero.
                assert!(max <= 1e-12, "{name}.{part}: gradient max |g| = {max}, torch's is 0");
                continue;
            }
            assert!(max.is_finite() && max > 0.0, "{name}.{part}: gradient max |g| = {max}, want finite and non-zero");
            let rel = rel_diff(grad, reference);
            assert!(rel <= GRAD_REL_TOL, "{name}.{part}: gradient relative diff {rel:e} exceeds {GRAD_REL_TOL:e}");
            worst = worst.max(rel);
        }
    }
    eprintln!("loss relative diff {loss_rel:e}; worst gradient relative diff {worst:e} (tolerance {GRAD_REL_TOL:e})");
}

#[test]
fn random_lora_branches_all_get_finite_nonzero_gradients() {
    let mut unet = tiny_unet();
    let dev = Device::Cpu;
    let mut vars: Vec<(String, Var, Var)> = Vec::new();
    for linear in unet.linears_mut().into_iter().filter(|l| is_target(&l.name)) {
        let down = Var::randn(0f32, 0.25, (4, linear.in_features()), &dev).unwrap();
        let up = Var::randn(0f32, 0.25, (linear.out_features(), 4), &dev).unwrap();
        linear.loras.push(LoraBranch::new(down.as_tensor().clone(), up.as_tensor().clone(), 1.0));
        vars.push((linear.name.clone(), down, up));
    }
    assert_eq!(vars.len(), 80, "number of LoRA-targeted linears");
    // 16x16 so that the mid block sees 2x2 pixels and every attention has several tokens.
    let sample = Tensor::randn(0f32, 1.0, (2, 4, 16, 16), &dev).unwrap();
    let timesteps = Tensor::new(&[3u32, 500], &dev).unwrap();
    let context = Tensor::randn(0f32, 1.0, (2, 77, 32), &dev).unwrap();
    let target = Tensor::randn(0f32, 1.0, (2, 4, 16, 16), &dev).unwrap();
    let pred = unet.forward(&sample, &timesteps, &lora::models::Conditioning::context((context).clone())).unwrap();
    let loss = (pred - target).unwrap().sqr().unwrap().mean_all().unwrap();
    let grads = loss.backward().unwrap();
    for (name, down, up) in &vars {
        for (part, var) in [("down", down), ("up", up)] {
            let grad = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name} {part}: no gradient"));
            let max = grad.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(max.is_finite() && max > 0.0, "{name} {part}: gradient max |g| = {max}, want finite and non-zero");
        }
    }
}
