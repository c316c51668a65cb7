//! Validation sampling: `validation.scheduler = "model"` samples with the model's own scheduler
//! config (its `_class_name` picks the sampler, its fields configure it; a field lora cannot
//! honour is refused by name), and the final validation applies the exported adapter file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use lora::config::{load_pipeline, LoadedPipeline};
use lora::inference::validation::validation_images;
use lora::inference::{generate_image, latent_shape, random_latents, to_rgb8, vae_scale_factor, GenerateOptions};
use lora::models::{LoadOptions, StableDiffusion};
use lora::runner::run::run_pipeline;
use lora::runner::stages::{RunOptions, Session};
use lora::layout::{DIFFUSERS_FILE, KOHYA_FILE};
use lora::runner::stages::{Status, TRAINED_FILE};
use lora::schedulers::{Ddim, EulerDiscrete, Sampler, SamplerKind, SchedulerConfig};
use rand::SeedableRng;

fn root() -> PathBuf {
    crate::support::repo_root()
}

/// A copy of `tests/fixtures/tiny-sd` (weights linked, not copied) whose
/// `scheduler/scheduler_config.json` is `scheduler`.
fn tiny_with_scheduler(dir: &Path, scheduler: &serde_json::Value) -> PathBuf {
    let src = root().join("tests/fixtures/tiny-sd");
    let model = dir.join("tiny-sd");
    std::fs::create_dir_all(model.join("scheduler")).unwrap();
    for part in ["unet", "vae", "text_encoder", "tokenizer", "model_index.json"] {
        std::os::unix::fs::symlink(src.join(part), model.join(part)).unwrap();
    }
    std::fs::write(model.join("scheduler/scheduler_config.json"), serde_json::to_string_pretty(scheduler).unwrap()).unwrap();
    model
}

/// The tiny pipeline on `model`: one prompt, one image, 3 steps, with `scheduler`.
fn pipeline(model: &Path, out: &Path, scheduler: &str) -> LoadedPipeline {
    let overrides = vec![
        format!("model.path={:?}", model.display().to_string()),
        format!("output.dir={:?}", out.display().to_string()),
        "validation.prompts=[\"a red circle\"]".into(),
        "validation.num_images=1".into(),
        "validation.steps=3".into(),
        format!("validation.scheduler={scheduler:?}"),
    ];
    load_pipeline(&root().join("pipelines/tiny.toml"), &overrides).unwrap_or_else(|d| panic!("{}", d.render()))
}

fn load(model: &Path) -> StableDiffusion {
    StableDiffusion::load(model.to_str().unwrap(), &LoadOptions::default(), &Device::Cpu, DType::F32).unwrap()
}

/// The RGB bytes of the validation image `validation_images` writes for `loaded` with `sd`.
fn validation_rgb(sd: &StableDiffusion, loaded: &LoadedPipeline, dir: &Path) -> Vec<u8> {
    let files = validation_images(sd, &loaded.pipeline, dir, &Device::Cpu).unwrap();
    assert_eq!(files.len(), 1);
    image::open(&files[0]).unwrap().to_rgb8().into_raw()
}

/// The same image computed without the validation code: the sampler built straight from the
/// scheduler config file, the first N(0, 1) draw of the seed, the pipeline's settings.
fn direct_rgb(sd: &StableDiffusion, loaded: &LoadedPipeline, sampler: &mut dyn Sampler) -> Vec<u8> {
    let p = &loaded.pipeline;
    let res = p.preprocess.resolution.unwrap() as usize;
    let opts = GenerateOptions {
        prompt: p.validation.prompts[0].clone(),
        negative_prompt: String::new(),
        sampler: SamplerKind::Pndm, // not read by generate_image: `sampler` is used
        steps: p.validation.steps as usize,
        guidance_scale: p.validation.guidance_scale,
        height: res,
        width: res,
        seed: p.train.seed.unwrap_or(0),
        progress: false,
    };
    let shape = latent_shape(res, res, vae_scale_factor(sd)).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let latents = random_latents(&shape, &mut rng, &Device::Cpu).unwrap();
    to_rgb8(&generate_image(sd, &opts, sampler, &latents).unwrap()).unwrap().into_raw()
}

#[test]
fn scheduler_model_samples_with_the_models_own_scheduler_config() {
    // Tolerance: bit-equal. "model", the explicit sampler and the directly built sampler run the
    // same f32 operations on the same inputs; only a different sampler or config may differ.
    let dir = tempfile::tempdir().unwrap();
    let stock = load(&root().join("tests/fixtures/tiny-sd")); // PNDM config of SD 1.5
    let cases = [
        (
            "ddim",
            serde_json::json!({
                "_class_name": "DDIMScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                "num_train_timesteps": 1000, "timestep_spacing": "trailing", "steps_offset": 0, "set_alpha_to_one": true,
                "clip_sample": false, "prediction_type": "epsilon"
            }),
        ),
        (
            "euler",
            serde_json::json!({
                "_class_name": "EulerDiscreteScheduler", "beta_schedule": "linear", "beta_start": 0.0005, "beta_end": 0.015,
                "num_train_timesteps": 1000, "timestep_spacing": "leading", "steps_offset": 1, "prediction_type": "epsilon"
            }),
        ),
    ];
    for (name, config) in cases {
        let case = dir.path().join(name);
        let model = tiny_with_scheduler(&case, &config);
        let sd = load(&model);
        let as_model = validation_rgb(&sd, &pipeline(&model, &case.join("out"), "model"), &case.join("model"));
        let explicit = validation_rgb(&sd, &pipeline(&model, &case.join("out"), name), &case.join("explicit"));
        assert!(as_model == explicit, "{name}: \"model\" equals validation.scheduler = \"{name}\" on the same model");
        let cfg = SchedulerConfig::from_file(&model.join("scheduler/scheduler_config.json")).unwrap();
        let mut sampler: Box<dyn Sampler> =
            if name == "ddim" { Box::new(Ddim::from_config(&cfg).unwrap()) } else { Box::new(EulerDiscrete::from_config(&cfg).unwrap()) };
        let direct = direct_rgb(&sd, &pipeline(&model, &case.join("out"), "model"), sampler.as_mut());
        assert!(as_model == direct, "{name}: \"model\" equals the sampler built directly from the config file");
        // Not PNDM, and the config's fields count: the same class on the stock config differs.
        let pndm = validation_rgb(&sd, &pipeline(&model, &case.join("out"), "pndm"), &case.join("pndm"));
        assert!(as_model != pndm, "{name}: \"model\" does not fall back to PNDM");
        let stock_fields = validation_rgb(&stock, &pipeline(&model, &case.join("out"), name), &case.join("stock"));
        assert!(as_model != stock_fields, "{name}: the model's scheduler fields configure the sampler");
    }
}

#[test]
fn a_scheduler_field_lora_cannot_honour_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    for (config, key) in [
        (serde_json::json!({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3}), "solver_order"),
        (serde_json::json!({"_class_name": "DPMSolverMultistepScheduler", "algorithm_type": "sde-dpmsolver++"}), "algorithm_type"),
        (serde_json::json!({"_class_name": "DPMSolverMultistepScheduler", "rescale_betas_zero_snr": true}), "rescale_betas_zero_snr"),
        (serde_json::json!({"_class_name": "EulerDiscreteScheduler", "use_karras_sigmas": true}), "use_karras_sigmas"),
        (serde_json::json!({"_class_name": "DDIMScheduler", "thresholding": true}), "thresholding"),
    ] {
        let case = dir.path().join(key);
        let model = tiny_with_scheduler(&case, &config);
        let sd = load(&model);
        let err = validation_images(&sd, &pipeline(&model, &case.join("out"), "model").pipeline, &case.join("v"), &Device::Cpu).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains(key), "the error names `{key}`: {msg}");
    }
    // The class defaults are accepted (they change nothing), as are other classes' keys.
    let model = tiny_with_scheduler(
        &dir.path().join("defaults"),
        &serde_json::json!({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 2, "algorithm_type": "dpmsolver++",
                            "lower_order_final": true, "skip_prk_steps": true}),
    );
    let sd = load(&model);
    validation_images(&sd, &pipeline(&model, &dir.path().join("d/out"), "model").pipeline, &dir.path().join("d/v"), &Device::Cpu).unwrap();
}

fn run(loaded: &LoadedPipeline) -> lora::runner::stages::RunReport {
    run_pipeline(loaded, &mut Session::default(), &RunOptions::default(), Arc::new(AtomicBool::new(false))).unwrap()
}

fn tiny_run(out: &Path, extra: &[&str]) -> LoadedPipeline {
    let mut overrides: Vec<String> = vec![
        "train.max_steps=3".into(),
        "train.batch_size=2".into(),
        "checkpoints.every_steps=10".into(),
        format!("output.dir={:?}", out.display().to_string()),
        "validation.prompts=[\"a red circle\"]".into(),
        "validation.num_images=1".into(),
        "validation.steps=2".into(),
    ];
    overrides.extend(extra.iter().map(|s| s.to_string()));
    load_pipeline(&root().join("pipelines/tiny.toml"), &overrides).unwrap_or_else(|d| panic!("{}", d.render()))
}

#[test]
fn the_final_validation_applies_the_exported_file() {
    // Tolerance: bit-equal. The exported files hold the trained f32 tensors unchanged and the
    // same alpha / r, so the branches attached from them are the trained ones exactly.
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let loaded = tiny_run(&out, &[]);
    run(&loaded);
    let image = out.join("validation/prompt0-0.png");
    let with_export = std::fs::read(&image).unwrap();
    // The trained weights (the train stage's own file) on a fresh model give the same image.
    let mut fresh = load(&root().join("tests/fixtures/tiny-sd"));
    lora::adapters::lora::apply_lora_file(&mut fresh, &out.join(TRAINED_FILE), 1.0).unwrap();
    let trained = validation_images(&fresh, &loaded.pipeline, &dir.path().join("trained"), &Device::Cpu).unwrap();
    assert!(std::fs::read(&trained[0]).unwrap() == with_export, "exported file and trained weights give the same image");

    // The exported file is what validate reads: with its LoRA up weights zeroed (export stays up
    // to date: the file exists), a rerun of validate gives the base model's image.
    let path = out.join(DIFFUSERS_FILE);
    let tensors = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    let zeroed: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(k, t)| {
            let t = if k.contains("lora_B") || k.contains("lora.up") || k.contains("lora_up") { t.zeros_like().unwrap() } else { t };
            (k, t)
        })
        .collect();
    candle_core::safetensors::save(&zeroed, &path).unwrap();
    std::fs::remove_file(&image).unwrap();
    let report = run(&loaded);
    let ran: Vec<&str> = report.stages.iter().filter(|(_, s)| matches!(s, Status::Run(_))).map(|(n, _)| *n).collect();
    assert_eq!(ran, ["validate"], "{:?}", report.stages);
    let base = load(&root().join("tests/fixtures/tiny-sd"));
    let base_image = validation_images(&base, &loaded.pipeline, &dir.path().join("base"), &Device::Cpu).unwrap();
    assert!(std::fs::read(&image).unwrap() == std::fs::read(&base_image[0]).unwrap(), "validate applied the (zeroed) exported file");
    assert!(std::fs::read(&image).unwrap() != with_export, "the zeroed file changes the image");

    // kohya only: export rewrites, validate reruns with the kohya file, and the image is the
    // trained one again (the kohya file holds the same tensors and alphas).
    let kohya = tiny_run(&out, &["output.formats=[\"kohya\"]"]);
    let report = run(&kohya);
    let ran: Vec<&str> = report.stages.iter().filter(|(_, s)| matches!(s, Status::Run(_))).map(|(n, _)| *n).collect();
    assert_eq!(ran, ["export", "validate"], "{:?}", report.stages);
    assert!(out.join(KOHYA_FILE).is_file() && !out.join(DIFFUSERS_FILE).exists());
    assert!(std::fs::read(&image).unwrap() == with_export, "the kohya file gives the trained weights' image");
}

#[test]
fn cli_generate_scheduler_model_is_the_models_own_sampler() {
    // Tolerance: bit-equal PNGs. sd2-tiny's scheduler config is DDIM (v-prediction), so
    // `--scheduler model` must be `--scheduler ddim` exactly, and not PNDM.
    let dir = tempfile::tempdir().unwrap();
    let generate = |scheduler: &str| -> Vec<u8> {
        let out = dir.path().join(format!("{scheduler}.png"));
        assert_cmd::Command::cargo_bin("lora")
            .unwrap()
            .args(["generate", "--model"])
            .arg(root().join("tests/fixtures/sd2-tiny"))
            .args(["--prompt", "a red circle", "--scheduler", scheduler, "--steps", "3", "--height", "64", "--width", "64", "--out"])
            .arg(&out)
            .env("RAYON_NUM_THREADS", "1")
            .assert()
            .success();
        std::fs::read(&out).unwrap()
    };
    let model = generate("model");
    assert!(model == generate("ddim"), "--scheduler model on a DDIM config is DDIM");
    assert!(model != generate("pndm"), "--scheduler model is not PNDM");
}

/// `validation.negative_prompt` is the unconditional side of guidance: the validation image
/// equals one sampled directly with that negative prompt (bit-equal: same operations), and
/// differs from the default (the embedding of "").
#[test]
fn validation_uses_the_negative_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let model = root().join("tests/fixtures/tiny-sd");
    let sd = load(&model);
    let mut overrides = vec![
        format!("model.path={:?}", model.display().to_string()),
        format!("output.dir={:?}", dir.path().join("out").display().to_string()),
        "validation.prompts=[\"a red circle\"]".to_string(),
        "validation.num_images=1".into(),
        "validation.steps=3".into(),
        "validation.scheduler=\"ddim\"".into(),
    ];
    let plain = load_pipeline(&root().join("pipelines/tiny.toml"), &overrides).unwrap_or_else(|d| panic!("{}", d.render()));
    overrides.push("validation.negative_prompt=\"a blue square\"".into());
    let negative = load_pipeline(&root().join("pipelines/tiny.toml"), &overrides).unwrap_or_else(|d| panic!("{}", d.render()));
    assert_eq!(negative.pipeline.validation.negative_prompt, "a blue square");
    let with_negative = validation_rgb(&sd, &negative, &dir.path().join("neg"));
    let without = validation_rgb(&sd, &plain, &dir.path().join("plain"));
    assert!(with_negative != without, "the negative prompt changes the image");

    let p = &negative.pipeline;
    let res = p.preprocess.resolution.unwrap() as usize;
    let opts = GenerateOptions {
        prompt: "a red circle".into(),
        negative_prompt: "a blue square".into(),
        sampler: SamplerKind::Ddim,
        steps: 3,
        guidance_scale: p.validation.guidance_scale,
        height: res,
        width: res,
        seed: p.train.seed.unwrap_or(0),
        progress: false,
    };
    let cfg = SchedulerConfig::from_file(&model.join("scheduler/scheduler_config.json")).unwrap();
    let mut sampler = Ddim::from_config(&cfg).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(opts.seed);
    let latents = random_latents(&latent_shape(res, res, vae_scale_factor(&sd)).unwrap(), &mut rng, &Device::Cpu).unwrap();
    let direct = to_rgb8(&generate_image(&sd, &opts, &mut sampler, &latents).unwrap()).unwrap().into_raw();
    assert!(with_negative == direct, "validation = direct sampling with the negative prompt");
}
