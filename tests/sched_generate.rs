//! `lora generate` parity with diffusers' StableDiffusionPipeline on the tiny model:
//! `golden/sampling.safetensors`' `init_latents`, 4 steps, guidance 7.5, the golden prompt and an
//! empty negative prompt; every 8-bit pixel within 2/255 of the golden image, for PNDM, DDIM and
//! Euler. Needs the networks and the loader (`models::*`).

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use lora::models::{LoadOptions, StableDiffusion};
use lora::inference::{self as pipeline, GenerateOptions};
use lora::schedulers::SamplerKind;

const PROMPT: &str = "a red circle on a white background";

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn sampling_golden() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("golden/sampling.safetensors"), &Device::Cpu).unwrap()
}

/// The golden HWC float image as 8-bit, rounded like diffusers' `numpy_to_pil`.
fn golden_rgb8(t: &Tensor) -> Vec<u8> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| (v * 255.0).round() as u8).collect()
}

/// Largest per-channel difference between two 8-bit RGB buffers, and where.
fn max_pixel_diff(got: &[u8], want: &[u8]) -> (u8, usize) {
    assert_eq!(got.len(), want.len(), "image sizes differ");
    got.iter().zip(want).enumerate().map(|(i, (a, b))| (a.abs_diff(*b), i)).max().unwrap()
}

#[test]
fn generate_matches_diffusers_for_each_scheduler() {
    // Tolerance: 2/255 per channel per pixel (the bar).
    let golden = sampling_golden();
    let sd = StableDiffusion::load(fixtures().join("tiny-sd").to_str().unwrap(), &LoadOptions::default(), &Device::Cpu, DType::F32).unwrap();
    for (kind, name) in [(SamplerKind::Pndm, "pndm"), (SamplerKind::Ddim, "ddim"), (SamplerKind::Euler, "euler")] {
        let opts = GenerateOptions {
            prompt: PROMPT.into(),
            negative_prompt: String::new(),
            sampler: kind,
            steps: 4,
            guidance_scale: 7.5,
            height: 64,
            width: 64,
            seed: 0,
            progress: false,
        };
        let images = pipeline::generate(&sd, &opts, 1, Some(&golden["init_latents"]), &Device::Cpu).unwrap();
        let got = pipeline::to_rgb8(&images[0]).unwrap().into_raw();
        let want = golden_rgb8(&golden[&format!("image_{name}")]);
        let (diff, at) = max_pixel_diff(&got, &want);
        eprintln!("{name}: max difference {diff}/255");
        assert!(diff <= 2, "{name}: pixel channel {at} differs by {diff}/255 > 2/255");
    }
}

#[test]
fn cli_generate_writes_the_golden_png() {
    // Same bar through the command line, PNDM, with --latents read from a file.
    let golden = sampling_golden();
    let dir = tempfile::tempdir().unwrap();
    let latents = dir.path().join("latents.safetensors");
    candle_core::safetensors::save(&HashMap::from([("latents".to_string(), golden["init_latents"].clone())]), &latents).unwrap();
    let out = dir.path().join("img.png");
    assert_cmd::Command::cargo_bin("lora")
        .unwrap()
        .args(["generate", "--model"])
        .arg(fixtures().join("tiny-sd"))
        .args(["--prompt", PROMPT, "--scheduler", "pndm", "--steps", "4", "--guidance", "7.5", "--latents"])
        .arg(&latents)
        .arg("--out")
        .arg(&out)
        .assert()
        .success();
    let img = image::open(&out).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (64, 64));
    let (diff, at) = max_pixel_diff(img.as_raw(), &golden_rgb8(&golden["image_pndm"]));
    assert!(diff <= 2, "CLI pndm: pixel channel {at} differs by {diff}/255 > 2/255");
}

#[test]
fn cli_generate_refuses_bad_arguments_before_loading() {
    // Exit code 2 (invalid input) and a message naming the flag; no model is loaded.
    let dir = tempfile::tempdir().unwrap();
    let run = |extra: &[&str]| {
        let mut cmd = assert_cmd::Command::cargo_bin("lora").unwrap();
        cmd.args(["generate", "--model", "nowhere", "--prompt", "x", "--out"]).arg(dir.path().join("o.png"));
        cmd.args(extra).assert()
    };
    run(&["--steps", "0"]).code(2).stderr(predicates::str::contains("--steps"));
    run(&["--latents", "/nonexistent/l.safetensors"]).code(2).stderr(predicates::str::contains("--latents"));
    run(&["--lora", "/nonexistent/a.safetensors:0.5"]).code(2).stderr(predicates::str::contains("--lora"));
    run(&["--scheduler", "heun"]).code(2).stderr(predicates::str::contains("heun"));
}
