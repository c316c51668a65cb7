//! The schema and the docs stay in step with the types; the shipped pipelines validate and say
//! what the reference command says; `extends` and `--set` layer as documented.
//!
//! Set `LORA_BLESS=1` to regenerate `schemas/pipeline.schema.json` and the key tables of
//! `docs/pipeline.md` after changing the types.

use std::path::{Path, PathBuf};
use std::process::Command;

use assert_cmd::cargo::CommandCargoExt;
use lora::config::*;
use lora::util::path::tidy_path;

fn root() -> PathBuf {
    crate::support::repo_root()
}

fn bless() -> bool {
    std::env::var_os("LORA_BLESS").is_some()
}

#[test]
fn checked_in_schema_is_current() {
    let path = root().join("schemas/pipeline.schema.json");
    let generated = pipeline_schema_text();
    if bless() {
        std::fs::write(&path, &generated).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(checked_in == generated, "schemas/pipeline.schema.json is stale: run `LORA_BLESS=1 cargo test --test tests config_schema`");
}

#[test]
fn lora_schema_prints_the_checked_in_schema() {
    let out = Command::cargo_bin("lora").unwrap().arg("schema").output().unwrap();
    assert!(out.status.success());
    let checked_in = std::fs::read_to_string(root().join("schemas/pipeline.schema.json")).unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), checked_in);
}

const BEGIN: &str = "<!-- BEGIN GENERATED KEY TABLES: `LORA_BLESS=1 cargo test --test tests config_schema` -->\n";
const END: &str = "<!-- END GENERATED KEY TABLES -->";

#[test]
fn docs_key_tables_match_the_types() {
    let path = root().join("docs/pipeline.md");
    let doc = std::fs::read_to_string(&path).unwrap();
    let (start, end) = (doc.find(BEGIN).expect("docs/pipeline.md has the BEGIN marker"), doc.find(END).expect("END marker"));
    let tables = key_tables_markdown(&pipeline_schema());
    let current = &doc[start + BEGIN.len()..end];
    if bless() && current != tables {
        let new = format!("{}{BEGIN}{tables}{}", &doc[..start], &doc[end..]);
        std::fs::write(&path, new).unwrap();
        return;
    }
    assert!(current == tables, "docs/pipeline.md key tables are stale: run `LORA_BLESS=1 cargo test --test tests config_schema`");
}

use lora::config::schema::key_tables_markdown;

#[test]
fn every_key_has_a_description() {
    let schema = pipeline_schema();
    let mut missing = Vec::new();
    for (stage, stage_schema) in lora::config::schema::properties(&schema, &schema) {
        if lora::config::schema::keyword(&schema, stage_schema, "description").is_none() {
            missing.push(stage.clone());
        }
        for (key, prop) in lora::config::schema::properties(&schema, stage_schema) {
            if lora::config::schema::keyword(&schema, prop, "description").is_none() {
                missing.push(format!("{stage}.{key}"));
            }
        }
    }
    assert!(missing.is_empty(), "keys without a description: {missing:?}");
}

#[test]
fn shipped_pipelines_validate() {
    let out = Command::cargo_bin("lora")
        .unwrap()
        .current_dir(root())
        .args(["validate", "pipelines/tiny.toml", "pipelines/naruto.toml"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("error"), "{stderr}");
    for entry in std::fs::read_dir(root().join("pipelines")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.starts_with("#:schema ../schemas/pipeline.schema.json\n"), "{} lacks the #:schema line", path.display());
    }
}

#[test]
fn tiny_pipeline_reads_the_fixtures() {
    let loaded = load_pipeline(&root().join("pipelines/tiny.toml"), &[]).expect("tiny.toml is valid");
    let p = &loaded.pipeline;
    assert!(p.model.path.as_ref().unwrap().join("model_index.json").is_file());
    assert_eq!(p.dataset.kind, DatasetKind::Parquet);
    assert!(p.dataset.path.as_ref().unwrap().is_dir());
    assert_eq!(p.preprocess.resolution, Some(64));
    assert_eq!(p.train.batch_size, 4);
    assert_eq!(p.train.max_steps, Some(30));
    assert_eq!(p.train.seed, Some(0));
    assert_eq!(p.train.precision, Precision::No);
    assert_eq!(tidy_path(&p.output.dir), tidy_path(&root().join("runs/tiny")));
}

#[test]
fn naruto_pipeline_is_the_guide_command() {
    let loaded = load_pipeline(&root().join("pipelines/naruto.toml"), &[]).expect("naruto.toml is valid");
    let p = &loaded.pipeline;
    assert_eq!(p.model.id.as_deref(), Some("stable-diffusion-v1-5/stable-diffusion-v1-5"));
    assert_eq!(p.dataset.kind, DatasetKind::Hub);
    assert_eq!(p.dataset.name.as_deref(), Some("lambdalabs/naruto-blip-captions"));
    assert_eq!(p.preprocess.resolution, Some(512));
    assert_eq!(p.preprocess.crop(), Crop::Center);
    assert!(p.preprocess.random_flip);
    assert_eq!(p.train.batch_size, 1);
    assert_eq!(p.train.gradient_accumulation_steps, 4);
    assert_eq!(p.train.max_steps, Some(15000));
    assert_eq!(p.train.learning_rate, 1e-4);
    assert_eq!(p.optimizer.max_grad_norm, 1.0);
    assert_eq!(p.train.lr_scheduler, LrScheduler::Cosine);
    assert_eq!(p.train.lr_warmup_steps, 0);
    assert_eq!(p.checkpoints.every_steps, 500);
    assert_eq!(p.validation.prompts, vec!["A naruto with blue eyes.".to_string()]);
    assert_eq!(p.train.seed, Some(1337));
    assert_eq!(p.train.precision, Precision::Fp16);
    // --dataloader_num_workers=8 has no key yet (`train.dataloader_workers` is refused: images
    // decode on the shared thread pool), so the guide's value is not in the file.
    assert_eq!(p.train.dataloader_workers, 0);
}

#[test]
fn defaults_are_the_reference_scripts() {
    // Values from the reference's argparse defaults (spec §1).
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::write(model.join("model_index.json"), "{}").unwrap();
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    std::fs::write(dir.path().join("data/x.parquet"), "").unwrap();
    let file = dir.path().join("p.toml");
    std::fs::write(&file, "[model]\npath = \"model\"\n[dataset]\nkind = \"parquet\"\npath = \"data\"\n").unwrap();
    let p = load_pipeline(&file, &[]).expect("minimal pipeline is valid").pipeline;
    assert_eq!((p.dataset.image_column.as_str(), p.dataset.caption_column.as_str()), ("image", "text"));
    assert_eq!(p.preprocess.resolution, None, "unset: the model family decides (see runner_default_resolution)");
    assert_eq!(p.preprocess.crop(), Crop::Random);
    assert!(!p.preprocess.random_flip);
    assert_eq!(p.preprocess.interpolation, Interpolation::Lanczos);
    assert_eq!((p.adapter.rank, p.adapter.default_alpha()), (4, 4.0));
    assert_eq!(p.adapter.init, LoraInit::Gaussian);
    assert_eq!(p.adapter.target_modules, ["to_k", "to_q", "to_v", "to_out.0"]);
    assert_eq!((p.train.batch_size, p.train.epochs, p.train.max_steps), (16, 100, None));
    assert_eq!(p.train.gradient_accumulation_steps, 1);
    assert_eq!(p.train.learning_rate, 1e-4);
    assert_eq!((p.train.lr_scheduler, p.train.lr_warmup_steps), (LrScheduler::Constant, 500));
    assert_eq!((p.optimizer.beta1, p.optimizer.beta2(), p.optimizer.weight_decay(), p.optimizer.epsilon), (0.9, 0.999, 1e-2, 1e-8));
    assert_eq!(p.optimizer.max_grad_norm, 1.0);
    assert_eq!((p.train.snr_gamma, p.train.noise_offset, p.train.prediction_type), (None, 0.0, None));
    assert_eq!((p.checkpoints.every_steps, p.checkpoints.total_limit), (500, None));
    assert_eq!((p.validation.num_images, p.validation.every_epochs), (4, 1));
    assert_eq!(p.output.dir, Path::new("sd-model-finetuned-lora"));
    assert_eq!(p.logging.report_to, ReportTo::Tensorboard);
}

#[test]
fn extends_layers_and_set_overrides_remember_their_sources() {
    let dir = tempfile::tempdir().unwrap();
    let base_dir = dir.path().join("bases");
    std::fs::create_dir_all(base_dir.join("model")).unwrap();
    std::fs::write(base_dir.join("model/model_index.json"), "{}").unwrap();
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    std::fs::write(dir.path().join("data/x.parquet"), "").unwrap();
    // The base's model path is relative to the base file.
    std::fs::write(
        base_dir.join("base.toml"),
        "[model]\npath = \"model\"\n[train]\nbatch_size = 2\nlearning_rate = 1e-3\nmax_steps = 10\n",
    )
    .unwrap();
    let file = dir.path().join("child.toml");
    std::fs::write(&file, "extends = \"bases/base.toml\"\n[dataset]\nkind = \"parquet\"\npath = \"data\"\n[train]\nbatch_size = 3\n").unwrap();
    let overrides = ["train.learning_rate=2e-4".to_string(), "model.variant=fp16".to_string(), "validation.prompts=[\"a\", \"b\"]".to_string()];
    let loaded = load_pipeline(&file, &overrides).expect("layered pipeline is valid");
    let p = &loaded.pipeline;
    assert_eq!(p.train.batch_size, 3, "the child overrides the base");
    assert_eq!(p.train.max_steps, Some(10), "the base's keys stay when the child does not set them");
    assert_eq!(p.train.learning_rate, 2e-4, "--set wins, typed as a float");
    assert_eq!(p.model.variant.as_deref(), Some("fp16"), "an unquoted --set string");
    assert_eq!(p.validation.prompts, ["a", "b"]);
    assert_eq!(p.model.path.as_deref(), Some(base_dir.join("model").as_path()));
    let name_of = |key: &str| loaded.sources.sources[loaded.sources.origin(key).unwrap().source].name.clone();
    assert!(name_of("model.path").ends_with("bases/base.toml"));
    assert!(name_of("train.batch_size").ends_with("child.toml"));
    assert_eq!(name_of("train.learning_rate"), "--set");
    assert_eq!(loaded.resolved["train"]["learning_rate"].as_float(), Some(2e-4));
}

#[test]
fn every_reference_flag_has_a_key_or_a_documented_reason() {
    // The arguments of train_text_to_image_lora.py (spec §1).
    let flags = [
        "--pretrained_model_name_or_path", "--revision", "--variant", "--dataset_name", "--dataset_config_name",
        "--train_data_dir", "--image_column", "--caption_column", "--validation_prompt", "--num_validation_images",
        "--validation_epochs", "--max_train_samples", "--output_dir", "--cache_dir", "--seed", "--resolution",
        "--center_crop", "--random_flip", "--train_batch_size", "--num_train_epochs", "--max_train_steps",
        "--gradient_accumulation_steps", "--gradient_checkpointing", "--learning_rate", "--scale_lr", "--lr_scheduler",
        "--lr_warmup_steps", "--snr_gamma", "--use_8bit_adam", "--allow_tf32", "--dataloader_num_workers",
        "--adam_beta1", "--adam_beta2", "--adam_weight_decay", "--adam_epsilon", "--max_grad_norm", "--push_to_hub",
        "--hub_token", "--prediction_type", "--hub_model_id", "--logging_dir", "--mixed_precision", "--report_to",
        "--local_rank", "--checkpointing_steps", "--checkpoints_total_limit", "--resume_from_checkpoint",
        "--enable_xformers_memory_efficient_attention", "--noise_offset", "--rank", "--image_interpolation_mode",
    ];
    let schema = pipeline_schema();
    let text = serde_json::to_string(&schema).unwrap();
    let docs = std::fs::read_to_string(root().join("docs/pipeline.md")).unwrap();
    let unsupported: String = UNSUPPORTED_REFERENCE_FLAGS.iter().map(|(f, _)| *f).collect::<Vec<_>>().join(" ");
    for flag in flags {
        let mapped = text.contains(&format!("\"x-reference\":\"{flag}\""));
        let explained = unsupported.contains(flag) && docs.contains(flag);
        assert!(mapped || explained, "reference flag {flag} has no key and no documented reason");
    }
}

#[test]
fn plan_lists_the_stages_in_order_with_their_inputs_and_outputs() {
    let out = Command::cargo_bin("lora").unwrap().current_dir(root()).args(["plan", "pipelines/tiny.toml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let order: Vec<usize> = ["1. model", "2. dataset", "3. preprocess", "4. encode", "5. train", "6. export", "7. validate"]
        .iter()
        .map(|s| text.find(s).unwrap_or_else(|| panic!("`{s}` missing from the plan:\n{text}")))
        .collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "stages out of order:\n{text}");
    for expected in ["reads    tests/fixtures/tiny-sd", "reads    tests/fixtures/datasets/shapes-parquet", "writes   runs/tiny/pytorch_lora_weights.safetensors", "writes   runs/tiny/checkpoint-30", "writes   runs/tiny/cache/encode/"] {
        assert!(text.contains(expected), "`{expected}` missing from the plan:\n{text}");
    }
    let bad = Command::cargo_bin("lora").unwrap().current_dir(root().join("tests/broken")).args(["plan", "rank-zero.toml"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).starts_with("rank-zero.toml:9:8: error:"));
}
