//! `lora inspect` and `lora convert` run as the binary on the golden LoRA files.

use std::path::PathBuf;

use assert_cmd::Command;
use lora::adapters::format::{read_lora_file, LoraFormat};
use predicates::prelude::*;

fn golden(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/golden").join(name)
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
