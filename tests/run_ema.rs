//! `train.ema_decay` in a run: the moving average is exported beside the trained weights in
//! every form (`*_ema.safetensors`), the final validation images use it, and unsetting the key
//! removes the EMA files this tool wrote (the trained ones stay).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use lora::layout::{DIFFUSERS_FILE, KOHYA_FILE, TRAINED_EMA_FILE};

fn run(out: &std::path::Path, extra: &[&str]) -> lora::runner::stages::RunReport {
    let root = crate::support::repo_root();
    let mut overrides: Vec<String> = vec!["train.max_steps=6".into(), format!("output.dir={:?}", out.display().to_string())];
    overrides.extend(extra.iter().map(|s| s.to_string()));
    let loaded = lora::config::load_pipeline(&root.join("pipelines/tiny.toml"), &overrides).unwrap_or_else(|d| panic!("{}", d.render()));
    lora::runner::run::run_pipeline(&loaded, &mut lora::runner::stages::Session::default(), &Default::default(), Arc::new(AtomicBool::new(false))).unwrap()
}

#[test]
fn the_moving_average_is_exported_and_validated_and_removed_when_unset() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let ema = ["train.ema_decay=0.9", "validation.prompts=[\"a red circle\"]", "validation.steps=2", "validation.num_images=1"];
    let report = run(&out, &ema);
    let ema_diffusers = lora::layout::ema_name(DIFFUSERS_FILE);
    let ema_kohya = lora::layout::ema_name(KOHYA_FILE);
    for f in [TRAINED_EMA_FILE, ema_diffusers.as_str(), ema_kohya.as_str(), DIFFUSERS_FILE, KOHYA_FILE] {
        assert!(out.join(f).is_file(), "{f} written");
    }
    let raw = lora::adapters::read_lora_file(&out.join(DIFFUSERS_FILE)).unwrap();
    let avg = lora::adapters::read_lora_file(&out.join(&ema_diffusers)).unwrap();
    assert_eq!(raw.unet.len(), avg.unet.len());
    let (name, m) = raw.unet.iter().next().unwrap();
    let a: Vec<f32> = m.up.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = avg.unet[name].up.flatten_all().unwrap().to_vec1().unwrap();
    assert_ne!(a, b, "the average lags the trained weights");
    let kohya_avg = lora::adapters::read_lora_file(&out.join(&ema_kohya)).unwrap();
    assert_eq!(kohya_avg.unet[name].up.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b, "both forms hold the same average");
    assert!(report.stages.iter().any(|(s, _)| *s == "validate") && out.join("validation/prompt0-0.png").is_file());

    // Unset: train reruns (another fingerprint) after setting the earlier run aside (its EMA
    // files included), and the EMA files this tool wrote are removed from the folder.
    run(&out, &["validation.prompts=[\"a red circle\"]", "validation.steps=2", "validation.num_images=1"]);
    for f in [TRAINED_EMA_FILE, ema_diffusers.as_str(), ema_kohya.as_str()] {
        assert!(!out.join(f).exists(), "{f} removed once ema_decay is unset");
    }
    assert!(out.join(DIFFUSERS_FILE).is_file());
    let earlier = std::fs::read_dir(out.join("earlier")).unwrap().next().unwrap().unwrap().path();
    for f in [TRAINED_EMA_FILE, ema_diffusers.as_str(), ema_kohya.as_str()] {
        assert!(earlier.join(f).is_file(), "{f} kept in {}", earlier.display());
    }
}
