//! Parity checks that run on the device `LORA_TEST_DEVICE` names (`cpu` by default, `cuda` or
//! `cuda:N` in `scripts/device-check.sh`): the UNet forward and the golden training step in f32
//! at the CPU tolerances, and the frozen layers' input-gradient-only backward on that device.
//! On the CPU they repeat checks made elsewhere; their point is to run unchanged on a GPU.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Module, Tensor, Var};
use lora::models::config::UNetConfig;
use lora::models::UNet2DConditionModel;
use lora::nn::frozen::{FrozenConv2d, FrozenMatmul};

fn fixture(rel: &str) -> PathBuf {
    crate::support::repo_root().join("tests/fixtures").join(rel)
}

/// The device under test: `LORA_TEST_DEVICE` = `cpu` (default), `cuda`, `cuda:N`.
pub(crate) fn test_device() -> Device {
    let spec = std::env::var("LORA_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    let parsed = lora::config::types::Device::parse(&spec).unwrap_or_else(|| panic!("LORA_TEST_DEVICE={spec}: use cpu, cuda or cuda:N"));
    match parsed {
        lora::config::types::Device::Cuda(n) => Device::new_cuda(n).unwrap_or_else(|e| panic!("LORA_TEST_DEVICE={spec}: {e}")),
        _ => Device::Cpu,
    }
}

fn golden_on(rel: &str, dev: &Device) -> HashMap<String, Tensor> {
    let g = candle_core::safetensors::load(fixture(rel), &Device::Cpu).expect("golden file loads");
    g.into_iter().map(|(k, v)| (k, v.to_device(dev).unwrap())).collect()
}

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
    let d = (&a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    d / b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-6)
}

/// UNet forward on the device against diffusers' output: 1e-4 relative to the largest value,
/// the tolerance of the CPU parity test (f32; cuBLAS may sum in another order than torch's CPU
/// kernels, which stays far inside it). TF32 is off in candle by default.
#[test]
fn device_unet_forward_matches_diffusers() {
    let dev = test_device();
    let cfg = UNetConfig::from_json_str(&std::fs::read_to_string(fixture("tiny-sd/unet/config.json")).unwrap()).unwrap();
    let vb = unsafe { candle_nn::VarBuilder::from_mmaped_safetensors(&[fixture("tiny-sd/unet/diffusion_pytorch_model.safetensors")], DType::F32, &dev) }.unwrap();
    let unet = UNet2DConditionModel::load(vb, &cfg).unwrap();
    let g = golden_on("golden/unet.safetensors", &dev);
    let out = unet.forward(&g["sample"], &g["timesteps"], &lora::models::Conditioning::context((g["encoder_hidden_states"]).clone())).unwrap();
    let rel = max_rel(&out, &g["out"]);
    eprintln!("device {dev:?}: unet forward relative diff {rel:e}");
    assert!(rel <= 1e-4, "UNet forward on {dev:?} differs by {rel:e} relative (tolerance 1e-4)");
}

/// The whole golden training step (loss, min-SNR loss, all 160 LoRA gradients, grad norm,
/// clip + AdamW) on the device, with `train_golden`'s tolerances.
#[test]
fn device_training_step_matches_the_reference() {
    crate::train_golden::check_training_step(&test_device());
}

/// Frozen conv (stride 1 and 2, input sizes the stride divides and does not) and frozen linear
/// on the device: output and input gradient equal candle's autograd (1e-5 relative, f32), and
/// the frozen weight gets no gradient.
#[test]
fn device_frozen_layers_give_only_the_input_gradient() {
    let dev = test_device();
    for &(c_in, c_out, h, stride, pad) in &[(4, 6, 9, 1, 1), (4, 6, 8, 2, 1), (3, 5, 9, 2, 1)] {
        let weight = Tensor::randn(0f32, 1.0, (c_out, c_in, 3, 3), &dev).unwrap();
        let x = Var::randn(0f32, 1.0, (2, c_in, h, h), &dev).unwrap();
        let conv = FrozenConv2d::new(weight.clone(), None, stride, pad).unwrap();
        let y = conv.forward(x.as_tensor()).unwrap();
        let expect = x.as_tensor().conv2d(&weight, pad, stride, 1, 1).unwrap();
        assert!(max_rel(&y, &expect) < 1e-5, "conv forward on {dev:?}");
        let probe = Tensor::randn(0f32, 1.0, y.dims(), &dev).unwrap();
        let ours = (y * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        let reference = (expect * &probe).unwrap().sum_all().unwrap().backward().unwrap();
        assert!(max_rel(ours.get(x.as_tensor()).unwrap(), reference.get(x.as_tensor()).unwrap()) < 1e-5, "conv input gradient on {dev:?}");
        assert!(ours.get(&weight).is_none(), "a frozen conv weight got a gradient on {dev:?}");
    }
    let w = Tensor::randn(0f32, 1.0, (7, 5), &dev).unwrap();
    let x = Var::randn(0f32, 1.0, (2, 3, 5), &dev).unwrap();
    let y = FrozenMatmul::new(&w).unwrap().forward(x.as_tensor(), &w).unwrap();
    let expect = x.as_tensor().broadcast_matmul(&w.t().unwrap()).unwrap();
    assert!(max_rel(&y, &expect) < 1e-5, "linear forward on {dev:?}");
    let ours = y.sum_all().unwrap().backward().unwrap();
    let reference = expect.sum_all().unwrap().backward().unwrap();
    assert!(max_rel(ours.get(x.as_tensor()).unwrap(), reference.get(x.as_tensor()).unwrap()) < 1e-5);
    assert!(ours.get(&w).is_none(), "a frozen linear weight got a gradient on {dev:?}");
}
