//! `lora run`, `generate`, `inspect` and `validate` on a single-file checkpoint
//! (`tests/fixtures/single-file/tiny-sd.safetensors`, the tiny SD 1.5 folder in the LDM layout).
//!
//! Exact comparisons: the file holds the folder's f32 values, so training and sampling must give
//! the same bytes. The kohya header hashes are checked against the definitions in kohya's
//! `library/train_util.py`, recomputed here on the files.

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use assert_cmd::Command;
use lora::adapters::read::read_lora_file;
use lora::config::load_pipeline;
use lora::runner::run::run_pipeline;
use lora::runner::stages::{RunOptions, Session};
use lora::layout::{DIFFUSERS_FILE, KOHYA_FILE};
use predicates::prelude::*;
use sha2::{Digest, Sha256};

fn root() -> PathBuf {
    crate::support::repo_root()
}

fn single() -> PathBuf {
    root().join("tests/fixtures/single-file/tiny-sd.safetensors")
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// `pipelines/tiny.toml` with absolute paths and `[model]` replaced by `model`, in `dir`.
fn pipeline(dir: &Path, model: &str) -> PathBuf {
    let text = std::fs::read_to_string(root().join("pipelines/tiny.toml")).unwrap();
    let fixtures = root().join("tests/fixtures");
    let text = text
        .replace("path = \"../tests/fixtures/tiny-sd\"", model)
        .replace("\"../tests/fixtures/datasets/shapes-parquet\"", &format!("{:?}", fixtures.join("datasets/shapes-parquet").display().to_string()));
    let path = dir.join("pipeline.toml");
    std::fs::write(&path, text).unwrap();
    path
}

fn single_file_model() -> String {
    format!(
        "file = {:?}\nconfig = {:?}",
        single().display().to_string(),
        root().join("tests/fixtures/tiny-sd").display().to_string()
    )
}

fn run(pipeline: &Path, out: &Path) {
    let overrides = vec![
        "train.max_steps=3".to_string(),
        "train.batch_size=2".into(),
        "output.formats=[\"diffusers\", \"kohya\"]".into(),
        format!("output.dir={:?}", out.display().to_string()),
    ];
    let loaded = load_pipeline(pipeline, &overrides).unwrap_or_else(|d| panic!("{}", d.render()));
    run_pipeline(&loaded, &mut Session::default(), &RunOptions::default(), Arc::new(AtomicBool::new(false))).expect("run succeeds");
}

#[test]
fn run_on_the_single_file_gives_the_folders_adapter_bytes_and_kohya_names_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let folder_dir = dir.path().join("folder");
    let file_dir = dir.path().join("file");
    std::fs::create_dir_all(&folder_dir).unwrap();
    std::fs::create_dir_all(&file_dir).unwrap();
    let folder_model = format!("path = {:?}", root().join("tests/fixtures/tiny-sd").display().to_string());
    run(&pipeline(&folder_dir, &folder_model), &folder_dir.join("out"));
    run(&pipeline(&file_dir, &single_file_model()), &file_dir.join("out"));
    let a = std::fs::read(folder_dir.join("out").join(DIFFUSERS_FILE)).unwrap();
    let b = std::fs::read(file_dir.join("out").join(DIFFUSERS_FILE)).unwrap();
    assert!(a == b, "the adapter trained on the single file differs from the folder's ({} vs {} bytes)", a.len(), b.len());

    let kohya_path = file_dir.join("out").join(KOHYA_FILE);
    let kohya = read_lora_file(&kohya_path).unwrap();
    let m = &kohya.metadata;
    let model = std::fs::read(single()).unwrap();
    assert_eq!(m["ss_sd_model_name"], "tiny-sd.safetensors");
    // model_hash: sha256 of the 64 KiB at offset 1 MiB, first 8 hex digits.
    assert_eq!(m["ss_sd_model_hash"], hex(&Sha256::digest(&model[0x100000..0x110000]))[..8]);
    assert_eq!(m["ss_new_sd_model_hash"], hex(&Sha256::digest(&model)));
    assert_eq!(m["ss_base_model_version"], "sd_v1");
    // sshs_model_hash: sha256 of the LoRA file's bytes after the header.
    let bytes = std::fs::read(&kohya_path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(m["sshs_model_hash"], hex(&Sha256::digest(&bytes[8 + n..])));
    assert_eq!(m["sshs_legacy_hash"].len(), 8);
    // The folder run names the folder and has no file hash.
    let folder_kohya = read_lora_file(&folder_dir.join("out").join(KOHYA_FILE)).unwrap();
    assert!(!folder_kohya.metadata.contains_key("ss_sd_model_hash"));
}

fn lora_cmd() -> Command {
    Command::cargo_bin("lora").unwrap()
}

#[test]
fn inspect_and_validate_say_what_the_file_was_recognised_as() {
    lora_cmd()
        .arg("inspect")
        .arg(root().join("tests/fixtures/single-file/sd2-tiny.safetensors"))
        .args(["--model-config", root().join("tests/fixtures/sd2-tiny").to_str().unwrap()])
        .assert()
        .success()
        .stdout(predicate::str::contains("recognised as SD 2.x"))
        .stdout(predicate::str::contains("prediction:  v_prediction"))
        .stdout(predicate::str::contains("OpenCLIP 3 layers of 32"))
        .stdout(predicate::str::contains("left out:"));
    // Without a config the tiny text encoder cannot be recognised: a clear error, exit 2.
    lora_cmd()
        .arg("inspect")
        .arg(single())
        .assert()
        .code(2)
        .stderr(predicate::str::contains("[model] config"));

    let dir = tempfile::tempdir().unwrap();
    let p = pipeline(dir.path(), &single_file_model());
    lora_cmd()
        .arg("validate")
        .arg(&p)
        .assert()
        .success()
        .stdout(predicate::str::contains("single file"))
        .stdout(predicate::str::contains("SD 1.x single file"))
        .stdout(predicate::str::contains("prediction epsilon"));
    let ckpt = pipeline(dir.path(), "file = \"model.ckpt\"");
    lora_cmd().arg("validate").arg(&ckpt).assert().code(2).stderr(predicate::str::contains("arbitrary code"));
}

#[test]
fn generate_from_the_single_file_matches_the_folder() {
    let dir = tempfile::tempdir().unwrap();
    let gen = |model: &str, extra: &[&str], out: &str| {
        lora_cmd()
            .args(["generate", "--model", model, "--prompt", "a red circle", "--steps", "2", "--seed", "3", "--no-progress"])
            .args(extra)
            .arg("--out")
            .arg(dir.path().join(out))
            .assert()
            .success();
        std::fs::read(dir.path().join(out)).unwrap()
    };
    let folder = gen(root().join("tests/fixtures/tiny-sd").to_str().unwrap(), &[], "folder.png");
    let config = root().join("tests/fixtures/tiny-sd");
    let file = gen(single().to_str().unwrap(), &["--model-config", config.to_str().unwrap()], "file.png");
    assert!(folder == file, "the single file's image differs from the folder's");
}
