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
use predicates::prelude::PredicateBooleanExt;

const PROMPT: &str = "a red circle on a white background";

fn fixtures() -> PathBuf {
    crate::support::repo_root().join("tests/fixtures")
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

#[test]
fn cli_generate_refuses_sizes_it_cannot_make_before_loading() {
    // Exit 2 naming the flag, before any model loads or memory is allocated ("nowhere" is no model).
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.png");
    let run = |extra: &[&str]| {
        let mut cmd = assert_cmd::Command::cargo_bin("lora").unwrap();
        cmd.args(["generate", "--model", "nowhere", "--prompt", "x", "--out"]).arg(&out);
        cmd.args(extra).assert()
    };
    run(&["--height", "100000", "--width", "100000"]).code(2).stderr(predicates::str::contains("--height 100000: at most 8192"));
    run(&["--width", "9000"]).code(2).stderr(predicates::str::contains("--width 9000"));
    run(&["--height", "8192", "--width", "8192"]).code(2).stderr(predicates::str::contains("67108864 pixels"));
    run(&["--height", "60", "--width", "64"]).code(2).stderr(predicates::str::contains("--height 60: must be a multiple of 8")).stderr(predicates::str::contains("56 or 64"));
    run(&["--width", "4"]).code(2).stderr(predicates::str::contains("--width 4")).stderr(predicates::str::contains("e.g. 8"));
    assert!(!out.exists());
}

#[test]
fn cli_generate_says_bad_scale_for_a_lora_scale_that_is_no_number() {
    let dir = tempfile::tempdir().unwrap();
    let lora = fixtures().join("golden/lora-kohya.safetensors");
    let mut cmd = assert_cmd::Command::cargo_bin("lora").unwrap();
    cmd.args(["generate", "--model", "nowhere", "--prompt", "x", "--out"]).arg(dir.path().join("o.png"));
    cmd.arg("--lora").arg(format!("{}:abc", lora.display()));
    cmd.assert().code(2).stderr(predicates::str::contains("bad scale `abc`")).stderr(predicates::str::contains("no such file").not());
    // A file whose name holds a colon is still a file.
    let colon = dir.path().join("a:b.safetensors");
    std::fs::copy(&lora, &colon).unwrap();
    assert_eq!(lora::cli::generate::parse_lora(colon.to_str().unwrap()).unwrap().path, colon);
}

/// A LoRA file with a NaN weight is refused before the model loads (exit 2, the tensor named);
/// no image is written.
#[test]
fn cli_generate_refuses_a_lora_with_nan_weights() {
    use lora::adapters::weights::LoraFormat;
    use lora::adapters::read::read_lora_file;
    use lora::adapters::write::serialize_lora;
    let dir = tempfile::tempdir().unwrap();
    let mut w = read_lora_file(&fixtures().join("golden/lora-kohya.safetensors")).unwrap();
    let (module, m) = w.unet.iter_mut().next().unwrap();
    let mut values: Vec<f32> = m.down.flatten_all().unwrap().to_vec1().unwrap();
    values[1] = f32::NAN;
    m.down = Tensor::from_vec(values, m.down.dims(), &Device::Cpu).unwrap();
    let key = format!("lora_unet_{}.lora_down.weight", module.replace('.', "_"));
    let bad = dir.path().join("nan.safetensors");
    std::fs::write(&bad, serialize_lora(&w, LoraFormat::Kohya).unwrap()).unwrap();
    let out = dir.path().join("img.png");
    assert_cmd::Command::cargo_bin("lora")
        .unwrap()
        .args(["generate", "--model"])
        .arg(fixtures().join("tiny-sd"))
        .args(["--prompt", PROMPT, "--steps", "2", "--lora"])
        .arg(&bad)
        .arg("--out")
        .arg(&out)
        .assert()
        .code(2)
        .stderr(predicates::str::contains(key.as_str()))
        .stderr(predicates::str::contains("NaN"));
    assert!(!out.exists(), "no image for a NaN LoRA");
}

/// Sampling that overflows (a LoRA at scale 1e30) fails with exit 1 and a clear message instead of
/// writing a black image; the log names the `--device` flag, not a pipeline key.
#[test]
fn cli_generate_fails_on_non_finite_latents_instead_of_writing_black() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("img.png");
    let lora = fixtures().join("golden/lora-diffusers/pytorch_lora_weights.safetensors");
    assert_cmd::Command::cargo_bin("lora")
        .unwrap()
        .args(["generate", "--model"])
        .arg(fixtures().join("tiny-sd"))
        .args(["--prompt", PROMPT, "--steps", "2", "--device", "cpu", "--lora"])
        .arg(format!("{}:1e30", lora.display()))
        .arg("--out")
        .arg(&out)
        .assert()
        .code(1)
        .stderr(predicates::str::contains("NaN or infinite"))
        .stderr(predicates::str::contains("no image was written"))
        .stderr(predicates::str::contains("(--device cpu)"))
        .stderr(predicates::str::contains("train.device").not());
    assert!(!out.exists(), "no black image");
}

#[test]
fn generate_refuses_nan_latents() {
    let sd = StableDiffusion::load(fixtures().join("tiny-sd").to_str().unwrap(), &LoadOptions::default(), &Device::Cpu, DType::F32).unwrap();
    let latents = Tensor::full(f32::NAN, (1, 4, 8, 8), &Device::Cpu).unwrap();
    let opts = GenerateOptions { prompt: PROMPT.into(), steps: 2, height: 64, width: 64, ..Default::default() };
    let err = format!("{:#}", pipeline::generate(&sd, &opts, 1, Some(&latents), &Device::Cpu).unwrap_err());
    assert!(err.contains("NaN or infinite") && err.contains("no image"), "{err}");
}

/// The adapter apply path refuses a LoRA file with an infinite weight, naming the tensor, and
/// attaches nothing.
#[test]
fn apply_lora_file_refuses_non_finite_weights() {
    use lora::adapters::weights::LoraFormat;
    use lora::adapters::read::read_lora_file;
    use lora::adapters::write::serialize_lora;
    let dir = tempfile::tempdir().unwrap();
    let mut w = read_lora_file(&fixtures().join("golden/lora-diffusers/pytorch_lora_weights.safetensors")).unwrap();
    let (module, m) = w.unet.iter_mut().last().unwrap();
    let mut values: Vec<f32> = m.up.flatten_all().unwrap().to_vec1().unwrap();
    values[2] = f32::INFINITY;
    m.up = Tensor::from_vec(values, m.up.dims(), &Device::Cpu).unwrap();
    let key = format!("unet.{module}.lora.up.weight");
    let bad = dir.path().join("inf.safetensors");
    std::fs::write(&bad, serialize_lora(&w, LoraFormat::Diffusers).unwrap()).unwrap();
    let mut sd = StableDiffusion::load(fixtures().join("tiny-sd").to_str().unwrap(), &LoadOptions::default(), &Device::Cpu, DType::F32).unwrap();
    let err = format!("{:#}", lora::adapters::lora::apply_lora_file(&mut sd, &bad, 1.0).unwrap_err());
    assert!(err.contains(&key) && err.contains("1 infinite"), "{err}");
    assert!(sd.unet.linears_mut().iter().all(|l| l.loras.is_empty()), "nothing attached");
}
