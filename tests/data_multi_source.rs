//! `[[dataset.sources]]` with `repeats` and `caption_prefix` (kohya's subsets, `num_repeats`,
//! `caption_prefix`): sources read with their own layout, copies per epoch, the prefix on every
//! caption, the kohya header's counts per source, and bad sources refused by key.

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

fn root() -> PathBuf {
    crate::support::repo_root()
}

fn overrides(out: &std::path::Path) -> Vec<String> {
    let folder = root().join("tests/fixtures/datasets/shapes-folder");
    vec![
        format!("dataset.sources=[{{kind = \"imagefolder\", path = {:?}, repeats = 3, caption_prefix = \"sks\"}}]", folder.display().to_string()),
        "train.max_steps=4".into(),
        format!("output.dir={:?}", out.display().to_string()),
    ]
}

#[test]
fn two_sources_train_together_with_repeats_and_a_trigger_word() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let loaded = lora::config::load_pipeline(&root().join("pipelines/tiny.toml"), &overrides(&out)).unwrap_or_else(|d| panic!("{}", d.render()));
    // The dataset as the stages read it: 24 parquet rows, then the folder's 24 images with "sks ".
    let data = lora::runner::resolve::load_dataset(&loaded.pipeline).unwrap();
    assert_eq!(data.len(), 48);
    assert_eq!(data.groups.iter().map(|g| (g.name.as_str(), g.repeats)).collect::<Vec<_>>(), vec![("shapes-parquet", 1), ("shapes-folder", 3)]);
    assert!(data.examples[..24].iter().all(|e| e.group == 0 && !e.caption.first().starts_with("sks ")));
    assert!(data.examples[24..].iter().all(|e| e.group == 1 && e.caption.first().starts_with("sks a ")), "{:?}", data.examples[24].caption);
    // An epoch sees each folder image three times, the parquet rows once.
    let epoch = data.repeated();
    assert_eq!(epoch.len(), 24 + 3 * 24);
    assert_eq!(epoch.examples.iter().filter(|e| e.origin == data.examples[30].origin).count(), 3);

    lora::runner::run::run_pipeline(&loaded, &mut lora::runner::stages::Session::default(), &Default::default(), Arc::new(AtomicBool::new(false))).unwrap();
    let kohya = lora::adapters::read_lora_file(&out.join(lora::layout::KOHYA_FILE)).unwrap();
    // kohya counts images with their repeats, and tags once per image, per source folder.
    assert_eq!(kohya.metadata["ss_num_train_images"], "96");
    let tags: serde_json::Value = serde_json::from_str(&kohya.metadata["ss_tag_frequency"]).unwrap();
    let count = |folder: &str| tags[folder].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum::<u64>();
    assert_eq!((count("shapes-parquet"), count("shapes-folder")), (24, 24), "{tags}");
    assert!(tags["shapes-folder"].as_object().unwrap().keys().all(|k| k.starts_with("sks ")));
}

#[test]
fn a_bad_source_is_refused_by_its_key() {
    let set = |v: &str| vec![v.to_string()];
    let err = lora::config::load_pipeline(&root().join("pipelines/tiny.toml"), &set("dataset.sources=[{kind = \"imagefolder\", path = \"/nonexistent/folder\"}]")).err().unwrap().render();
    assert!(err.contains("dataset.sources[0]") && err.contains("/nonexistent/folder"), "{err}");
    let err = lora::config::load_pipeline(&root().join("pipelines/tiny.toml"), &set("dataset.sources=[{kind = \"hub\"}]")).err().unwrap().render();
    assert!(err.contains("dataset.sources[0]") && err.contains("name"), "{err}");
    let err = lora::config::load_pipeline(&root().join("pipelines/tiny.toml"), &set("dataset.sources=[{kind = \"sidecar\", path = \".\", repeat = 2}]")).err().unwrap().render();
    assert!(err.contains("repeat"), "an unknown key, with did-you-mean: {err}");
}
