//! Scheduler parity with diffusers: DDPM (`golden/ddpm.safetensors`) and the sampler timesteps
//! (`golden/sampling.safetensors`), from the tiny-sd scheduler config.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor};
use lora::schedulers::{build_sampler, Ddpm, SamplerKind, SchedulerConfig};

fn fixtures() -> PathBuf {
    crate::support::repo_root().join("tests/fixtures")
}

fn golden(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("golden").join(name), &Device::Cpu).unwrap()
}

fn tiny_config() -> SchedulerConfig {
    SchedulerConfig::from_file(&fixtures().join("tiny-sd/scheduler/scheduler_config.json")).unwrap()
}

fn vec_f32(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_dtype(candle_core::DType::F32).unwrap().to_vec1().unwrap()
}

fn max_rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    got.iter().zip(want).map(|(g, w)| (g - w).abs() / w.abs().max(1e-6)).fold(0.0, f32::max)
}

#[test]
fn ddpm_alphas_cumprod_bit_exact() {
    // Tolerance: none — f32 bit equality with torch (FMA linspace, f64-accumulated cumprod).
    let ddpm = Ddpm::from_config(&tiny_config()).unwrap();
    let want = vec_f32(&golden("ddpm.safetensors")["alphas_cumprod"]);
    let mismatched: Vec<usize> = (0..want.len()).filter(|&i| ddpm.alphas_cumprod[i].to_bits() != want[i].to_bits()).collect();
    assert!(mismatched.is_empty(), "alphas_cumprod differs from torch bit-wise at {} indices, first {:?}", mismatched.len(), &mismatched[..mismatched.len().min(5)]);
}

#[test]
fn ddpm_snr_matches_compute_snr() {
    // Tolerance: bit equality expected (same f32 ops as compute_snr); asserted at 1e-6 relative.
    let ddpm = Ddpm::from_config(&tiny_config()).unwrap();
    let t: Vec<u32> = (0..1000).collect();
    let want = vec_f32(&golden("ddpm.safetensors")["snr"]);
    let err = max_rel_err(&ddpm.snr(&t), &want);
    assert!(err <= 1e-6, "snr max relative error {err} > 1e-6");
}

#[test]
fn ddpm_add_noise_and_velocity_match() {
    // The sample and timesteps are the UNet golden's inputs (`sample`, t = [10, 731]).
    // Tolerance 1e-6 relative (f32 elementwise, same formula).
    let g = golden("ddpm.safetensors");
    let u = golden("unet.safetensors");
    let ts: Vec<u32> = u["timesteps"].to_vec1::<i64>().unwrap().iter().map(|&t| t as u32).collect();
    let ddpm = Ddpm::from_config(&tiny_config()).unwrap();
    let noisy = ddpm.add_noise(&u["sample"], &g["noise"], &ts).unwrap();
    let velocity = ddpm.get_velocity(&u["sample"], &g["noise"], &ts).unwrap();
    let abs_err = |got: &Tensor, want: &Tensor| {
        let (g, w) = (vec_f32(got), vec_f32(want));
        g.iter().zip(&w).map(|(a, b)| (a - b).abs() / b.abs().max(1.0)).fold(0.0f32, f32::max)
    };
    let e1 = abs_err(&noisy, &g["noisy"]);
    let e2 = abs_err(&velocity, &g["velocity"]);
    assert!(e1 <= 1e-6, "add_noise error {e1} > 1e-6");
    assert!(e2 <= 1e-6, "get_velocity error {e2} > 1e-6");
}

fn sampler_timesteps(kind: SamplerKind) -> Vec<f64> {
    let mut s = build_sampler(kind, &tiny_config(), 0).unwrap();
    s.set_timesteps(4).unwrap();
    s.timesteps().to_vec()
}

#[test]
fn sampler_timesteps_match_diffusers() {
    // Exact equality (integers, or f32 values for Euler).
    let g = golden("sampling.safetensors");
    let as_f64 = |t: &Tensor| -> Vec<f64> { t.to_dtype(candle_core::DType::F64).unwrap().to_vec1().unwrap() };
    assert_eq!(sampler_timesteps(SamplerKind::Pndm), as_f64(&g["timesteps_pndm"]), "PNDM");
    assert_eq!(sampler_timesteps(SamplerKind::Ddim), as_f64(&g["timesteps_ddim"]), "DDIM");
    assert_eq!(sampler_timesteps(SamplerKind::Euler), as_f64(&g["timesteps_euler"]), "Euler");
}
