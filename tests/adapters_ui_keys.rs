//! Our kohya file loads fully in ComfyUI and A1111: every key it holds is one those loaders map
//! onto a model weight (`tests/fixtures/ui-lora-keys.json`, computed by running the loaders' own
//! key functions, see `tools/reference/ui_lora_keys.py`), and every module we trained has its
//! three keys (nothing dropped). The same fixture records why the diffusers file is not enough
//! for those UIs: ComfyUI loads none of its tensors.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use lora::adapters::keys::module_to_kohya;
use lora::adapters::read::read_lora_file;
use lora::adapters::write::serialize_lora;
use lora::adapters::{Component, LoraFormat, LoraModule, LoraWeights};
use lora::models::loading::{LoadOptions, StableDiffusion};
use serde_json::Value;

fn fixtures() -> PathBuf {
    crate::support::repo_root().join("tests/fixtures")
}

fn ui_keys() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("ui-lora-keys.json")).unwrap()).unwrap()
}

fn stems(v: &Value) -> BTreeSet<String> {
    v.as_array().expect("a list of stems").iter().map(|s| s.as_str().unwrap().to_string()).collect()
}

fn module(rank: usize, seed: f64) -> LoraModule {
    let t = |n| Tensor::full(seed as f32, n, &Device::Cpu).unwrap();
    LoraModule::new(t((rank, 3)), t((5, rank)), Some(rank as f64 / 2.0))
}

/// A LoRA on every named module (UNet and text encoder).
fn weights_on(unet: &[String], text: &[String]) -> LoraWeights {
    let mut w = LoraWeights::default();
    for (i, n) in unet.iter().enumerate() {
        w.unet.insert(n.clone(), module(2, i as f64));
    }
    for (i, n) in text.iter().enumerate() {
        w.text_encoder.insert(n.clone(), module(2, i as f64));
    }
    w
}

/// The tensor names of our kohya file for `w`.
fn kohya_keys(w: &LoraWeights) -> Vec<String> {
    let bytes = serialize_lora(w, LoraFormat::Kohya).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut keys: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
    keys.sort();
    keys
}

/// Every key of `w`'s kohya file is `<accepted stem>.{lora_down.weight, lora_up.weight, alpha}`
/// (the suffixes both loaders read: ComfyUI's `load_lora` "regular" LoRA and `.alpha`, A1111's
/// `network_lora` `lora_up`/`lora_down` and `network.py`'s `alpha`), and each module of `w` has
/// all three.
fn assert_loads(w: &LoraWeights, accepted: &BTreeSet<String>, what: &str) {
    let keys = kohya_keys(w);
    let mut per_stem: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for k in &keys {
        let (stem, suffix) = k.split_once('.').unwrap_or_else(|| panic!("{what}: key `{k}` has no suffix"));
        assert!(accepted.contains(stem), "{what}: `{k}` would be \"lora key not loaded\": `{stem}` is not a module the loader maps");
        assert!(["lora_down.weight", "lora_up.weight", "alpha"].contains(&suffix), "{what}: `{k}`: the loaders do not read `.{suffix}`");
        per_stem.entry(stem).or_default().insert(suffix);
    }
    let n_modules = w.unet.len() + w.text_encoder.len();
    assert_eq!(per_stem.len(), n_modules, "{what}: one stem per trained module");
    assert!(per_stem.values().all(|s| s.len() == 3), "{what}: every module has down, up and alpha");
    for (c, name, _) in w.modules() {
        assert!(per_stem.contains_key(module_to_kohya(c, name).as_str()), "{what}: module `{name}` was dropped");
    }
}

fn load(model: &str) -> StableDiffusion {
    StableDiffusion::load(fixtures().join(model).to_str().unwrap(), &LoadOptions::default(), &Device::Cpu, DType::F32).unwrap()
}

/// Every linear layer of our UNet and text encoder for the tiny models: any target list a
/// pipeline can give trains a subset of these.
#[test]
fn kohya_files_of_the_tiny_models_load_in_comfyui_for_any_target() {
    let fixture = ui_keys();
    for model in ["tiny-sd", "sd2-tiny"] {
        let mut sd = load(model);
        let unet: Vec<String> = sd.unet.linears_mut().into_iter().map(|l| l.name.clone()).collect();
        let text: Vec<String> = sd.text.all_linears_mut().into_iter().map(|l| l.name.clone()).collect();
        assert!(unet.len() > 50 && text.len() >= 6, "{model}: {} UNet and {} text-encoder linears", unet.len(), text.len());
        let accepted = stems(&fixture["layouts"][model]["comfyui"]);
        assert_loads(&weights_on(&unet, &[]), &accepted, &format!("{model} UNet only, ComfyUI"));
        assert_loads(&weights_on(&unet, &text), &accepted, &format!("{model} with text encoder, ComfyUI"));
    }
}

/// The reference's own output (the golden diffusers file, default targets) converted to kohya.
#[test]
fn the_reference_adapter_as_kohya_loads_in_comfyui() {
    let w = read_lora_file(&fixtures().join("golden/lora-diffusers/pytorch_lora_weights.safetensors")).unwrap();
    assert_eq!(w.unet.len(), 80);
    assert_loads(&w, &stems(&ui_keys()["layouts"]["tiny-sd"]["comfyui"]), "reference LoRA, ComfyUI");
}

/// The real SD 1.5 and SD 2.1 module trees (diffusers' and transformers' own names): every
/// Linear/Conv2d module, UNet-only and with the text encoder, in both loaders.
#[test]
fn kohya_files_of_real_sd_layouts_load_in_comfyui_and_a1111() {
    let fixture = ui_keys();
    for layout in ["sd15", "sd21"] {
        let entry = &fixture["layouts"][layout];
        let names = |k: &str| -> Vec<String> { entry["modules"][k].as_array().unwrap().iter().map(|s| s.as_str().unwrap().to_string()).collect() };
        let (unet, text) = (names("unet"), names("text_encoder"));
        // SD 1.5: 16 transformer blocks x 10 linears + resnets, convs, projections; CLIP ViT-L 12 x 6.
        assert!(unet.len() > 250 && text.len() >= 72, "{layout}: {} / {}", unet.len(), text.len());
        for loader in ["comfyui", "a1111"] {
            let accepted = stems(&entry[loader]);
            assert_loads(&weights_on(&unet, &[]), &accepted, &format!("{layout} UNet only, {loader}"));
            assert_loads(&weights_on(&unet, &text), &accepted, &format!("{layout} with text encoder, {loader}"));
        }
        assert_eq!(entry["comfyui_a1111_disagree"], serde_json::json!([]), "{layout}: both loaders patch the same weights");
    }
}

/// Why both files are written: the UIs load nothing of the reference's diffusers file.
#[test]
fn the_uis_load_none_of_the_diffusers_file() {
    let fixture = ui_keys();
    for layout in ["tiny-sd", "sd2-tiny", "sd15", "sd21"] {
        let d = &fixture["layouts"][layout]["diffusers_file"];
        let n = d["tensors"].as_u64().unwrap();
        assert!(n >= 160, "{layout}: {d}");
        assert_eq!(d["comfyui_modules_patched"], 0, "{layout}: {d}");
        assert_eq!(d["comfyui_keys_not_loaded"].as_u64(), Some(n), "{layout}: {d}");
        if layout.starts_with("sd") && !layout.contains("tiny") {
            assert_eq!(d["a1111_keys_not_matched"].as_u64(), Some(n), "{layout}: {d}");
        }
    }
    // And our kohya names are what ComfyUI maps for the same modules (one check by hand).
    assert_eq!(module_to_kohya(Component::Unet, "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0"), "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0");
}
