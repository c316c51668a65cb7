//! `StableDiffusion::load` end to end: bad sources fail before any network is built; the
//! fixture pipeline (and a copy with the old VAE attention names) loads with every weight read.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use lora::models::loading::{HubSettings, LoadOptions, StableDiffusion};

fn fixtures() -> PathBuf {
    crate::support::repo_root().join("tests/fixtures")
}

fn offline_hub(cache: &Path) -> HubSettings {
    HubSettings { cache_dir: cache.to_path_buf(), endpoint: "http://127.0.0.1:9".into(), offline: true, token: None, progress: false }
}

fn copy_dir(src: &Path, dst: &Path) {
    for rel in lora::models::loading::list_folder(src).unwrap() {
        let to = dst.join(&rel);
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(src.join(&rel), to).unwrap();
    }
}

#[test]
fn bad_sources_fail_before_any_network_is_built() {
    let cache = tempfile::tempdir().unwrap();
    let hub = offline_hub(cache.path());
    let load = |source: &str| {
        StableDiffusion::load_with(source, &LoadOptions::default(), &hub, &Device::Cpu, DType::F32)
            .err()
            .map(|e| format!("{e:#}"))
            .expect("must fail")
    };
    assert!(load("/no/such/model").contains("does not exist"));
    assert!(load("org/uncached").contains("not in the hub cache"));

    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("tiny-sd"), dir.path());
    std::fs::remove_file(dir.path().join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    std::fs::write(dir.path().join("unet/diffusion_pytorch_model.bin"), b"pickle").unwrap();
    let err = load(dir.path().to_str().unwrap());
    assert!(err.contains("arbitrary code"), "{err}");
}

#[test]
fn fixture_pipeline_loads_with_every_weight_read() {
    let cache = tempfile::tempdir().unwrap();
    let root = fixtures().join("tiny-sd");
    let sd = StableDiffusion::load_with(root.to_str().unwrap(), &LoadOptions::default(), &offline_hub(cache.path()), &Device::Cpu, DType::F32)
        .unwrap();
    assert_eq!(sd.root, root);
    assert_eq!(sd.scheduler.class_name.as_deref(), Some("PNDMScheduler"));
    assert_eq!(sd.text.pairs[0].tokenizer.encode("a red circle").unwrap().len(), 77);
}

#[test]
fn old_vae_attention_names_give_the_same_decoder_output() {
    let cache = tempfile::tempdir().unwrap();
    let hub = offline_hub(cache.path());
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("tiny-sd"), dir.path());
    // Rewrite the VAE with the pre-0.14 names and 1x1-conv shaped projection weights, in fp16.
    let vae_path = dir.path().join("vae/diffusion_pytorch_model.safetensors");
    let tensors = candle_core::safetensors::load(&vae_path, &Device::Cpu).unwrap();
    let mut old: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in tensors {
        let renamed = name
            .replace(".to_q.", ".query.")
            .replace(".to_k.", ".key.")
            .replace(".to_v.", ".value.")
            .replace(".to_out.0.", ".proj_attn.");
        let t = if renamed != name && t.rank() == 2 { t.unsqueeze(2).unwrap().unsqueeze(3).unwrap() } else { t };
        old.insert(renamed, t);
    }
    candle_core::safetensors::save(&old, &vae_path).unwrap();

    let new_sd = StableDiffusion::load_with(fixtures().join("tiny-sd").to_str().unwrap(), &LoadOptions::default(), &hub, &Device::Cpu, DType::F32).unwrap();
    let old_sd = StableDiffusion::load_with(dir.path().to_str().unwrap(), &LoadOptions::default(), &hub, &Device::Cpu, DType::F32).unwrap();
    let z = Tensor::arange(0f32, 256f32, &Device::Cpu).unwrap().reshape((1, 4, 8, 8)).unwrap().affine(1.0 / 128.0, -1.0).unwrap();
    let a = new_sd.vae.decode(&z).unwrap();
    let b = old_sd.vae.decode(&z).unwrap();
    // Same weights under other names: identical output (tolerance 0).
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert_eq!(diff, 0.0, "decoder output differs by {diff} (expected exactly 0)");
}

/// The UNet output for the golden `unet.safetensors` inputs.
fn unet_out(sd: &StableDiffusion) -> Tensor {
    let g = candle_core::safetensors::load(fixtures().join("golden/unet.safetensors"), &Device::Cpu).unwrap();
    let timesteps = g["timesteps"].to_dtype(DType::F32).unwrap();
    sd.unet.forward(&g["sample"], &timesteps, &lora::models::Conditioning::context((g["encoder_hidden_states"]).clone())).unwrap()
}

fn max_rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let diff = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    let scale = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    diff / scale
}

#[test]
fn sharded_and_fp16_variant_unets_match_the_single_f32_file() {
    let cache = tempfile::tempdir().unwrap();
    let hub = offline_hub(cache.path());
    let reference = StableDiffusion::load_with(fixtures().join("tiny-sd").to_str().unwrap(), &LoadOptions::default(), &hub, &Device::Cpu, DType::F32).unwrap();
    let want = unet_out(&reference);

    let dir = tempfile::tempdir().unwrap();
    copy_dir(&fixtures().join("tiny-sd"), dir.path());
    let unet_dir = dir.path().join("unet");
    let single = unet_dir.join("diffusion_pytorch_model.safetensors");
    let tensors = candle_core::safetensors::load(&single, &Device::Cpu).unwrap();

    // fp16 variant next to the f32 file.
    let half: HashMap<String, Tensor> = tensors.iter().map(|(k, t)| (k.clone(), t.to_dtype(DType::F16).unwrap())).collect();
    candle_core::safetensors::save(&half, unet_dir.join("diffusion_pytorch_model.fp16.safetensors")).unwrap();
    let vae_dir = dir.path().join("vae");
    std::fs::copy(vae_dir.join("diffusion_pytorch_model.safetensors"), vae_dir.join("diffusion_pytorch_model.fp16.safetensors")).unwrap();
    let fp16 = LoadOptions { revision: None, variant: Some("fp16".into()), ..Default::default() };
    let sd = StableDiffusion::load_with(dir.path().to_str().unwrap(), &fp16, &hub, &Device::Cpu, DType::F32).unwrap();
    // fp16 weights carry ~5e-4 relative rounding; the output must stay within 1e-2 relative.
    let rel = max_rel_diff(&unet_out(&sd), &want);
    assert!(rel < 1e-2 && rel > 0.0, "fp16 variant: max relative difference {rel} (tolerance 1e-2, and not 0: the fp16 file was used)");

    // Two shards + index instead of the single file.
    std::fs::remove_file(&single).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let (first, second) = names.split_at(names.len() / 2);
    let mut weight_map = serde_json::Map::new();
    for (i, part) in [first, second].iter().enumerate() {
        let file = format!("diffusion_pytorch_model-0000{}-of-00002.safetensors", i + 1);
        let shard: HashMap<String, Tensor> = part.iter().map(|k| ((*k).clone(), tensors[*k].clone())).collect();
        candle_core::safetensors::save(&shard, unet_dir.join(&file)).unwrap();
        for k in part.iter() {
            weight_map.insert((*k).clone(), serde_json::Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(unet_dir.join("diffusion_pytorch_model.safetensors.index.json"), index.to_string()).unwrap();
    let sd = StableDiffusion::load_with(dir.path().to_str().unwrap(), &LoadOptions::default(), &hub, &Device::Cpu, DType::F32).unwrap();
    // Same f32 weights from two files: identical output (tolerance 0).
    assert_eq!(max_rel_diff(&unet_out(&sd), &want), 0.0, "sharded UNet output differs (expected exactly equal)");
}
