//! The kohya file's header is true to the model it was trained on: SD 1.x epsilon and SD 2.x
//! v-prediction (both diffusers folders), with kohya's `ss_*` names, the SAI ModelSpec keys,
//! the LoRA hashes and the caption tag counts; `formats = ["kohya"]` writes no diffusers file,
//! and the default writes both.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use lora::adapters::read::read_lora_file;
use lora::config::load_pipeline;
use lora::data::source::{load_source, SourceOptions, SourceSpec};
use lora::runner::run::run_pipeline;
use lora::runner::stages::{RunOptions, Session};
use lora::layout::{DIFFUSERS_FILE, KOHYA_FILE};
use sha2::Digest;

fn root() -> PathBuf {
    crate::support::repo_root()
}

fn run(pipeline: &str, out: &Path, extra: &[&str]) {
    let mut overrides: Vec<String> =
        vec!["train.max_steps=2".into(), "train.batch_size=2".into(), "checkpoints.every_steps=100".into(), format!("output.dir={:?}", out.display().to_string())];
    overrides.extend(extra.iter().map(|s| s.to_string()));
    let loaded = load_pipeline(&root().join(pipeline), &overrides).unwrap_or_else(|d| panic!("{}", d.render()));
    run_pipeline(&loaded, &mut Session::default(), &RunOptions::default(), Arc::new(AtomicBool::new(false))).expect("run succeeds");
}

/// kohya's tag counts, computed here from the captions as `set_tag_frequency` does.
fn expected_tags() -> serde_json::Value {
    let spec = SourceSpec::Parquet { path: root().join("tests/fixtures/datasets/shapes-parquet") };
    let opts = SourceOptions { image_column: "image".into(), caption_column: "text".into(), ..Default::default() };
    let data = load_source(&spec, &opts).unwrap();
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for e in &data.examples {
        for tag in e.caption.first().split(',').map(str::trim).filter(|t| !t.is_empty()) {
            *counts.entry(tag.to_lowercase()).or_default() += 1;
        }
    }
    assert_eq!(counts.values().sum::<u64>(), 24, "24 captions, one tag each (no commas)");
    serde_json::json!({ "shapes-parquet": counts })
}

fn check_common(m: &BTreeMap<String, String>, out_name: &str) {
    assert_eq!(m["modelspec.sai_model_spec"], "1.0.1");
    assert_eq!(m["modelspec.implementation"], "diffusers");
    assert_eq!(m["modelspec.title"], out_name);
    assert_eq!(m["ss_output_name"], out_name);
    assert_eq!(m["modelspec.resolution"], "64x64");
    let date = &m["modelspec.date"];
    assert!(date.len() == 19 && date.as_bytes()[10] == b'T' && date.starts_with("20"), "ISO 8601 date: {date}");
    let tags: serde_json::Value = serde_json::from_str(&m["ss_tag_frequency"]).unwrap();
    assert_eq!(tags, expected_tags());
    assert!(m.contains_key("sshs_model_hash") && m.contains_key("sshs_legacy_hash"));
}

#[test]
fn sd1_kohya_only_run_writes_no_diffusers_file_and_sd1_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sd1");
    run("pipelines/tiny.toml", &out, &["output.formats=[\"kohya\"]"]);
    assert!(!out.join(DIFFUSERS_FILE).exists(), "formats = [\"kohya\"] writes no diffusers file");
    let path = out.join(KOHYA_FILE);
    let w = read_lora_file(&path).unwrap();
    let m = &w.metadata;
    assert_eq!(m["ss_base_model_version"], "sd_v1");
    assert_eq!(m["ss_sd_model_name"], "tiny-sd", "a local model by its base name, as kohya writes it");
    assert_eq!(m["ss_v2"], "false");
    assert_eq!(m["ss_v_parameterization"], "false");
    assert_eq!(m["modelspec.architecture"], "stable-diffusion-v1/lora");
    assert_eq!(m["modelspec.prediction_type"], "epsilon");
    check_common(m, "sd1");
    // sshs_model_hash: sha256 of the data after the header, computed here from the file.
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let hex: String = sha2::Sha256::digest(&bytes[8 + n..]).iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(m["sshs_model_hash"], hex);
}

#[test]
fn sd2_v_prediction_folder_gets_sd2_v_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sd2");
    run("pipelines/tiny-sd2.toml", &out, &[]);
    // Both formats by default.
    assert!(out.join(DIFFUSERS_FILE).is_file() && out.join(KOHYA_FILE).is_file());
    let m = read_lora_file(&out.join(KOHYA_FILE)).unwrap().metadata;
    // tests/fixtures/sd2-tiny: OpenCLIP-style text encoder (gelu), scheduler v_prediction.
    assert_eq!(m["ss_base_model_version"], "sd_v2_v");
    assert_eq!(m["ss_v2"], "true");
    assert_eq!(m["ss_v_parameterization"], "true");
    assert_eq!(m["modelspec.architecture"], "stable-diffusion-v2-768-v/lora");
    assert_eq!(m["modelspec.prediction_type"], "v");
    check_common(&m, "sd2");
    // The file the default run wrote loads fully in ComfyUI (see adapters_ui_keys).
    let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(root().join("tests/fixtures/ui-lora-keys.json")).unwrap()).unwrap();
    let accepted: Vec<&str> = fixture["layouts"]["sd2-tiny"]["comfyui"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    let bytes = std::fs::read(out.join(KOHYA_FILE)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let names = st.names();
    assert_eq!(names.len(), 3 * 80, "80 modules (the default targets), 3 keys each");
    for k in names {
        let stem = k.split_once('.').unwrap().0;
        assert!(accepted.contains(&stem), "{k} would not load in ComfyUI");
    }
    // Training with an epsilon target on the same model says so.
    let eps = dir.path().join("sd2-eps");
    run("pipelines/tiny-sd2.toml", &eps, &["output.formats=[\"kohya\"]", "train.prediction_type=\"epsilon\""]);
    let m = read_lora_file(&eps.join(KOHYA_FILE)).unwrap().metadata;
    assert_eq!((m["ss_base_model_version"].as_str(), m["modelspec.architecture"].as_str()), ("sd_v2", "stable-diffusion-v2-512/lora"));
}

/// Export's fingerprint follows the resolved formats, so the new default (both files) reruns
/// export in a folder whose run relied on the old default, and an explicit list equal to the
/// default changes nothing.
#[test]
fn export_fingerprint_follows_the_resolved_formats() {
    let fp = |extra: &[&str]| {
        let overrides: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let loaded = load_pipeline(&root().join("pipelines/tiny.toml"), &overrides).unwrap_or_else(|d| panic!("{}", d.render()));
        lora::runner::plan::Plan::resolve(&loaded).fingerprint(lora::runner::plan::StageId::Export).to_string()
    };
    let default = fp(&[]);
    assert_eq!(default, fp(&["output.formats=[\"diffusers\", \"kohya\"]"]));
    assert_ne!(default, fp(&["output.formats=[\"diffusers\"]"]));
    assert_ne!(fp(&["output.formats=[\"diffusers\"]"]), fp(&["output.formats=[\"kohya\"]"]));
}

/// `pipelines/tiny-sdxl.toml` as shipped (30 steps, UNet + both text encoders): the fixed-noise
/// eval loss goes down; the diffusers file has `unet.`, `text_encoder.` and `text_encoder_2.`
/// modules; the kohya file names the encoders `lora_te1_` / `lora_te2_` and says SDXL; both read
/// back into the same weights.
#[test]
fn tiny_sdxl_pipeline_trains_both_encoders_and_writes_sdxl_files() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("sdxl");
    let overrides = vec![format!("output.dir={:?}", out.display().to_string())];
    let loaded = load_pipeline(&root().join("pipelines/tiny-sdxl.toml"), &overrides).unwrap_or_else(|d| panic!("{}", d.render()));
    let report = run_pipeline(&loaded, &mut Session::default(), &RunOptions::default(), Arc::new(AtomicBool::new(false))).expect("run succeeds");
    let (before, after) = report.eval_loss;
    let (before, after) = (before.expect("eval loss before"), after.expect("eval loss after"));
    eprintln!("tiny-sdxl eval loss {before} -> {after}");
    assert!(after < before, "the fixed-noise eval loss must go down: {before} -> {after}");

    let diffusers = read_lora_file(&out.join(DIFFUSERS_FILE)).unwrap();
    assert_eq!((diffusers.unet.len(), diffusers.text_encoder.len(), diffusers.text_encoder_2.len()), (136, 12, 12));
    let bytes = std::fs::read(out.join(KOHYA_FILE)).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let names = st.names();
    assert_eq!(names.iter().filter(|k| k.starts_with("lora_te1_")).count(), 3 * 12);
    assert_eq!(names.iter().filter(|k| k.starts_with("lora_te2_")).count(), 3 * 12);
    assert!(!names.iter().any(|k| k.starts_with("lora_te_")), "SDXL files name the encoders te1/te2");
    // Every stem loads in ComfyUI and A1111 on SDXL (tools/reference/ui_lora_keys.py --sdxl runs
    // their own key functions; the second encoder's q/k/v/out come as A1111's complete sets).
    let ui: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(root().join("tests/fixtures/ui-lora-keys-sdxl.json")).unwrap()).unwrap();
    for loader in ["comfyui", "a1111"] {
        let accepted: Vec<&str> = ui["layouts"]["sdxl-tiny"][loader].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
        for k in &names {
            let stem = k.split_once('.').unwrap().0;
            assert!(accepted.contains(&stem), "{k} would not load in {loader}");
        }
    }
    let kohya = read_lora_file(&out.join(KOHYA_FILE)).unwrap();
    let m = &kohya.metadata;
    assert_eq!((m["ss_base_model_version"].as_str(), m["modelspec.architecture"].as_str(), m["ss_v2"].as_str()), ("sdxl_base_v1-0", "stable-diffusion-xl-v1-base/lora", "false"));
    // kohya's SDXL UNet names are the original layout's (`input_blocks.4.1.…`), as sd-scripts
    // writes them; renamed back for this UNet they are the diffusers file's modules.
    assert!(kohya.unet.keys().all(|n| lora::adapters::ldm_names::is_ldm_unet_name(n)), "SDXL kohya UNet names are the original layout's");
    let unet_cfg = lora::models::config::UNetConfig::from_json_file(root().join("tests/fixtures/sdxl-tiny/unet/config.json")).unwrap();
    let kohya = lora::adapters::ldm_names::to_diffusers_unet_names(&kohya, &unet_cfg).unwrap();
    for (c, name, module) in diffusers.modules() {
        let other = kohya.component(c).get(name).unwrap_or_else(|| panic!("{name} missing from the kohya file"));
        assert_eq!(module.down.flatten_all().unwrap().to_vec1::<f32>().unwrap(), other.down.flatten_all().unwrap().to_vec1::<f32>().unwrap(), "{name}");
    }
}
