//! `lora inspect` and `lora convert` run as the binary on the golden LoRA files.

use std::path::PathBuf;

use assert_cmd::Command;
use lora::adapters::weights::LoraFormat;
use lora::adapters::read::read_lora_file;
use predicates::prelude::*;

fn golden(name: &str) -> PathBuf {
    crate::support::repo_root().join("tests/fixtures/golden").join(name)
}

fn lora_cmd() -> Command {
    Command::cargo_bin("lora").unwrap()
}

#[test]
fn inspect_describes_the_diffusers_golden() {
    lora_cmd()
        .arg("inspect")
        .arg(golden("lora-diffusers/pytorch_lora_weights.safetensors"))
        .assert()
        .success()
        .stdout(predicate::str::contains("format:      diffusers"))
        .stdout(predicate::str::contains("80 UNet, 0 text encoder"))
        .stdout(predicate::str::contains("attn1.to_out.0"))
        .stdout(predicate::str::contains("rank 4"))
        .stdout(predicate::str::contains("format = pt"))
        .stdout(predicate::str::contains("cross-attention width 32"));
}

#[test]
fn inspect_reports_parameter_count_and_kohya_alpha() {
    let w = read_lora_file(&golden("lora-kohya.safetensors")).unwrap();
    let expected: usize = w.unet.values().map(|m| m.down.elem_count() + m.up.elem_count()).sum();
    lora_cmd()
        .arg("inspect")
        .arg(golden("lora-kohya.safetensors"))
        .assert()
        .success()
        .stdout(predicate::str::contains("format:      kohya"))
        .stdout(predicate::str::contains(format!("parameters:  {expected}")))
        .stdout(predicate::str::contains("alpha 4 (scale 1.0000)"));
}

#[test]
fn inspect_of_a_damaged_file_exits_2_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("broken.safetensors");
    let bytes = std::fs::read(golden("lora-kohya.safetensors")).unwrap();
    std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    lora_cmd()
        .arg("inspect")
        .arg(&p)
        .assert()
        .code(2)
        .stderr(predicate::str::contains("broken.safetensors"))
        .stderr(predicate::str::contains("safetensors"));
}

#[test]
fn convert_round_trips_through_every_form() {
    let dir = tempfile::tempdir().unwrap();
    let src = golden("lora-diffusers/pytorch_lora_weights.safetensors");
    let kohya = dir.path().join("k.safetensors");
    let peft = dir.path().join("p.safetensors");
    let back = dir.path().join("d.safetensors");
    lora_cmd().args(["convert"]).arg(&src).arg(&kohya).args(["--to", "kohya"]).assert().success();
    lora_cmd().args(["convert"]).arg(&kohya).arg(&peft).args(["--to", "peft"]).assert().success();
    lora_cmd().args(["convert"]).arg(&peft).arg(&back).args(["--to", "diffusers"]).assert().success();
    let k = read_lora_file(&kohya).unwrap();
    assert_eq!(k.source_format, Some(LoraFormat::Kohya));
    assert_eq!(k.metadata.get("ss_network_dim").map(String::as_str), Some("4"));
    assert_eq!(read_lora_file(&peft).unwrap().source_format, Some(LoraFormat::Peft));
    // Lossless: after kohya and PEFT, the diffusers file is byte-identical to the reference's.
    assert_eq!(std::fs::read(&back).unwrap(), std::fs::read(&src).unwrap());
}

#[test]
fn convert_rejects_an_unknown_target_format() {
    let dir = tempfile::tempdir().unwrap();
    lora_cmd()
        .arg("convert")
        .arg(golden("lora-kohya.safetensors"))
        .arg(dir.path().join("x.safetensors"))
        .args(["--to", "ckpt"])
        .assert()
        .failure()
        .stderr(predicate::str::contains("ckpt"));
}

/// The diffusers golden with two NaN and one infinite value in its first UNet module's up
/// weight, written to `dir/name`; returns the path, that tensor's key and its value count.
fn poisoned_golden(dir: &std::path::Path, name: &str) -> (PathBuf, String, usize) {
    use lora::adapters::write::serialize_lora;
    let mut w = read_lora_file(&golden("lora-diffusers/pytorch_lora_weights.safetensors")).unwrap();
    let (module, m) = w.unet.iter_mut().next().unwrap();
    let mut values: Vec<f32> = m.up.flatten_all().unwrap().to_vec1().unwrap();
    values[0] = f32::NAN;
    values[3] = f32::NAN;
    values[5] = f32::NEG_INFINITY;
    let n = values.len();
    m.up = candle_core::Tensor::from_vec(values, m.up.dims(), &candle_core::Device::Cpu).unwrap();
    let key = format!("unet.{module}.lora.up.weight");
    let path = dir.join(name);
    std::fs::write(&path, serialize_lora(&w, LoraFormat::Diffusers).unwrap()).unwrap();
    (path, key, n)
}

#[test]
fn inspect_lists_non_finite_tensors_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let (bad, key, n) = poisoned_golden(dir.path(), "nan.safetensors");
    lora_cmd()
        .arg("inspect")
        .arg(&bad)
        .assert()
        .code(2)
        .stdout(predicate::str::contains("format:      diffusers"))
        .stdout(predicate::str::contains("non-finite:  1 tensor(s) hold 3 NaN or infinite value(s)"))
        .stdout(predicate::str::contains(format!("`{key}` (2 NaN, 1 infinite of {n} values)")))
        .stderr(predicate::str::contains(key.as_str()));
    lora_cmd()
        .arg("inspect")
        .arg(golden("lora-kohya.safetensors"))
        .assert()
        .success()
        .stdout(predicate::str::contains("non-finite:  none"));
}

#[test]
fn inspect_json_is_one_object_with_the_files_facts() {
    let src = golden("lora-diffusers/pytorch_lora_weights.safetensors");
    let out = lora_cmd().arg("inspect").arg("--json").arg(&src).assert().success().get_output().stdout.clone();
    let v: serde_json::Value = serde_json::from_slice(&out).expect("stdout is one JSON value");
    let w = read_lora_file(&src).unwrap();
    assert_eq!(v["kind"], "lora");
    assert_eq!(v["format"], "diffusers");
    assert_eq!(v["file"], src.display().to_string());
    assert!(v["base_model"].as_str().unwrap().contains("cross-attention width 32"), "{}", v["base_model"]);
    assert_eq!(v["parameters"], w.unet.values().map(|m| m.down.elem_count() + m.up.elem_count()).sum::<usize>());
    assert_eq!(v["module_counts"], serde_json::json!({"unet": 80, "text_encoder": 0, "text_encoder_2": 0}));
    let modules = v["modules"].as_array().unwrap();
    assert_eq!(modules.len(), w.unet.len());
    for (m, (name, want)) in modules.iter().zip(&w.unet) {
        assert_eq!(m["component"], "unet");
        assert_eq!(m["name"], name.as_str());
        assert_eq!(m["rank"], want.down.dims()[0]);
        assert_eq!(m["scale"], 1.0);
    }
    // Grouped targets: every count adds up to the modules, one group per layer kind here.
    let targets = v["targets"].as_array().unwrap();
    assert_eq!(targets.iter().map(|t| t["count"].as_u64().unwrap()).sum::<u64>(), 80);
    assert!(targets.iter().any(|t| t["layer"] == "attn1.to_out.0" && t["rank"] == 4));
    assert_eq!(v["metadata"]["format"], "pt");
    assert_eq!(v["non_finite"], serde_json::json!([]));
    assert_eq!(v["usable"], true);

    let dir = tempfile::tempdir().unwrap();
    let (bad, key, n) = poisoned_golden(dir.path(), "nan.safetensors");
    let out = lora_cmd().args(["inspect", "--json"]).arg(&bad).assert().code(2).get_output().stdout.clone();
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["non_finite"], serde_json::json!([{"key": key, "nan": 2, "inf": 1, "total": n}]));
    assert_eq!(v["usable"], false);
}

#[test]
fn convert_refuses_non_finite_weights_naming_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let (bad, key, _) = poisoned_golden(dir.path(), "nan.safetensors");
    let out = dir.path().join("k.safetensors");
    lora_cmd()
        .arg("convert")
        .arg(&bad)
        .arg(&out)
        .args(["--to", "kohya"])
        .assert()
        .code(2)
        .stderr(predicate::str::contains(key.as_str()))
        .stderr(predicate::str::contains("NaN"));
    assert!(!out.exists(), "nothing written");
}

#[test]
fn convert_writes_only_safetensors_names() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["out.ckpt", "out.pt", "out", "out.safetensors.bin"] {
        let out = dir.path().join(name);
        lora_cmd()
            .arg("convert")
            .arg(golden("lora-kohya.safetensors"))
            .arg(&out)
            .args(["--to", "diffusers"])
            .assert()
            .code(2)
            .stderr(predicate::str::contains(".safetensors"));
        assert!(!out.exists(), "{name} written");
    }
    // Any case of the extension is a safetensors name.
    lora_cmd().arg("convert").arg(golden("lora-kohya.safetensors")).arg(dir.path().join("ok.SafeTensors")).args(["--to", "peft"]).assert().success();
}

#[test]
fn convert_replaces_an_existing_file_only_with_force() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("mine.safetensors");
    std::fs::write(&out, b"someone's file").unwrap();
    let convert = || {
        let mut c = lora_cmd();
        c.arg("convert").arg(golden("lora-kohya.safetensors")).arg(&out).args(["--to", "peft"]);
        c
    };
    convert().assert().code(2).stderr(predicate::str::contains("exists")).stderr(predicate::str::contains("--force"));
    assert_eq!(std::fs::read(&out).unwrap(), b"someone's file");
    convert().arg("--force").assert().success();
    let back = read_lora_file(&out).unwrap();
    assert_eq!(back.source_format, Some(LoraFormat::Peft));
    assert_eq!(back.unet.len(), read_lora_file(&golden("lora-kohya.safetensors")).unwrap().unet.len());
    // A folder is never an output.
    let folder = dir.path().join("d.safetensors");
    std::fs::create_dir(&folder).unwrap();
    lora_cmd().arg("convert").arg(golden("lora-kohya.safetensors")).arg(&folder).args(["--to", "peft", "--force"]).assert().code(2);
}

#[test]
fn convert_removes_only_temporaries_of_dead_converts_of_the_same_file() {
    let dir = tempfile::tempdir().unwrap();
    let dead = {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        pid
    };
    let touch = |name: String| {
        let p = dir.path().join(name);
        std::fs::write(&p, b"partial").unwrap();
        p
    };
    let stale = touch(format!(".k.safetensors.{dead}.tmp"));
    let live = touch(format!(".k.safetensors.{}.tmp", std::process::id()));
    let other_target = touch(format!(".other.safetensors.{dead}.tmp"));
    let not_ours = touch(".notes.tmp".to_string());
    lora_cmd()
        .arg("convert")
        .arg(golden("lora-kohya.safetensors"))
        .arg(dir.path().join("k.safetensors"))
        .args(["--to", "diffusers"])
        .assert()
        .success();
    assert!(!stale.exists(), "the dead convert's temporary is removed");
    for p in [&live, &other_target, &not_ours] {
        assert!(p.exists(), "{} was removed", p.display());
    }
    assert!(read_lora_file(&dir.path().join("k.safetensors")).is_ok());
}

/// kohya's SDXL form names the UNet in the original layout: `lora convert --to kohya --model
/// <SDXL folder>` writes it so, reading it back needs the model (exit 2 without, naming
/// `--model`), and the round trip gives the diffusers file's tensors exactly.
#[test]
fn convert_sdxl_through_kohyas_original_layout_names() {
    let fixtures = crate::support::repo_root().join("tests/fixtures");
    let model = fixtures.join("sdxl-tiny");
    let src = fixtures.join("golden-sdxl/lora-diffusers/pytorch_lora_weights.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let (kohya, back) = (dir.path().join("k.safetensors"), dir.path().join("b.safetensors"));
    lora_cmd().args(["convert"]).arg(&src).arg(&kohya).args(["--to", "kohya", "--model"]).arg(&model).assert().success();
    let k = lora::adapters::read_lora_file(&kohya).unwrap();
    assert!(k.unet.keys().all(|n| n.starts_with("input_blocks.") || n.starts_with("middle_block.") || n.starts_with("output_blocks.")), "{:?}", k.unet.keys().next());
    assert_eq!((k.text_encoder.len(), k.text_encoder_2.len()), (12, 12));
    let out = lora_cmd().args(["convert"]).arg(&kohya).arg(&back).args(["--to", "diffusers"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--model"), "{}", String::from_utf8_lossy(&out.stderr));
    lora_cmd().args(["convert"]).arg(&kohya).arg(&back).args(["--to", "diffusers", "--model"]).arg(&model).assert().success();
    let (a, b) = (lora::adapters::read_lora_file(&src).unwrap(), lora::adapters::read_lora_file(&back).unwrap());
    for (c, name, m) in a.modules() {
        let other = b.component(c).get(name).unwrap_or_else(|| panic!("{name} lost in the round trip"));
        assert_eq!(m.up.flatten_all().unwrap().to_vec1::<f32>().unwrap(), other.up.flatten_all().unwrap().to_vec1::<f32>().unwrap(), "{name}");
    }
}
