//! `preprocess.buckets`: kohya's bucket sizes and bucket choice against kohya's own functions
//! (`tests/fixtures/golden/buckets.json`, `tools/reference/make_bucket_golden.py`); batches that
//! each take one bucket, seeded and covering every example once; and a bucketed run on a folder of
//! mixed aspect ratios that lowers the held-out loss, records `ss_bucket_info` and is shown by
//! `lora plan`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use assert_cmd::Command;
use lora::data::bucket::{bucket_resolutions, select_bucket, BucketOptions, Buckets};
use lora::data::source::{load_source, SourceOptions, SourceSpec};
use lora::data::{DataLoader, LoaderOptions};

fn root() -> PathBuf {
    crate::support::repo_root()
}

#[test]
fn bucket_sizes_and_choices_are_kohyas() {
    let golden: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(root().join("tests/fixtures/golden/buckets.json")).unwrap()).unwrap();
    let pair = |v: &serde_json::Value| (v[0].as_u64().unwrap() as u32, v[1].as_u64().unwrap() as u32);
    let mut checked = 0;
    for case in golden["cases"].as_array().unwrap() {
        let res = case["resolution"].as_u64().unwrap() as u32;
        let o = BucketOptions {
            min_reso: case["min_bucket_reso"].as_u64().unwrap() as u32,
            max_reso: case["max_bucket_reso"].as_u64().unwrap() as u32,
            step: case["bucket_reso_steps"].as_u64().unwrap() as u32,
            no_upscale: case["no_upscale"].as_bool().unwrap(),
        };
        let resos = if o.no_upscale { Vec::new() } else { bucket_resolutions(res, &o) };
        let expected: Vec<(u32, u32)> = case["resolutions"].as_array().unwrap().iter().map(pair).collect();
        assert_eq!(resos, expected, "bucket sizes for {o:?} at {res}");
        for pick in case["picks"].as_array().unwrap() {
            let (w, h) = pair(&pick["image"]);
            let a = select_bucket(w, h, &resos, res, &o);
            assert_eq!((a.bucket, a.resized), (pair(&pick["bucket"]), pair(&pick["resized"])), "{w}x{h} with {o:?} at {res}");
            // The same f64 operations as numpy; the room is serde_json's decimal parsing, which is
            // not correctly rounded (a few ulps).
            assert!((a.ar_error - pick["ar_error"].as_f64().unwrap()).abs() < 1e-14, "{w}x{h}");
            checked += 1;
        }
    }
    assert!(checked > 300, "{checked} choices checked");
}

/// The shapes images stretched to four aspect ratios (3:1, 1:3, 1:1, 4:1), with their captions,
/// as an image folder with `metadata.jsonl`.
pub(crate) fn mixed_aspect_folder(dir: &Path) -> PathBuf {
    let src = root().join("tests/fixtures/datasets/shapes-folder/train");
    let out = dir.join("mixed");
    std::fs::create_dir_all(&out).unwrap();
    let mut lines = String::new();
    let sizes = [(150, 50), (50, 150), (100, 100), (200, 50)];
    for (i, line) in std::fs::read_to_string(src.join("metadata.jsonl")).unwrap().lines().enumerate() {
        let row: serde_json::Value = serde_json::from_str(line).unwrap();
        let image = image::open(src.join(row["file_name"].as_str().unwrap())).unwrap().to_rgb8();
        let (w, h) = sizes[i % sizes.len()];
        let name = format!("{i:04}.png");
        image::imageops::resize(&image, w, h, image::imageops::FilterType::Triangle).save(out.join(&name)).unwrap();
        lines.push_str(&serde_json::json!({"file_name": name, "text": row["text"]}).to_string());
        lines.push('\n');
    }
    std::fs::write(out.join("metadata.jsonl"), lines).unwrap();
    out
}

fn bucket_opts() -> BucketOptions {
    BucketOptions { min_reso: 64, max_reso: 256, step: 64, no_upscale: false }
}

#[test]
fn every_batch_is_one_bucket_and_every_example_comes_once() {
    let dir = tempfile::tempdir().unwrap();
    let folder = mixed_aspect_folder(dir.path());
    let dataset = Arc::new(load_source(&SourceSpec::ImageFolder { dir: folder }, &SourceOptions::default()).unwrap());
    let mut opts = LoaderOptions { batch_size: 4, seed: 5, buckets: Some(bucket_opts()), ..Default::default() };
    opts.preprocess.resolution = 128;
    opts.preprocess.crop = lora::data::CropMode::Random;
    let loader = DataLoader::new(dataset.clone(), opts.clone()).unwrap();
    let b = loader.buckets().unwrap();
    // 24 images: 6 each of 3:1 -> 192x64, 1:3 -> 64x192, square -> 128x128, 4:1 -> 256x64.
    assert_eq!(b.sizes, vec![(64, 192), (128, 128), (192, 64), (256, 64)]);
    assert_eq!(b.counts(), vec![6, 6, 6, 6]);
    // ceil(6/4) for each bucket: every bucket ends in a short batch (not 24 / 4 = 6).
    assert_eq!(loader.batches_per_epoch(), 8);
    let mut orders = Vec::new();
    for epoch in 0..2 {
        let mut seen = BTreeSet::new();
        let mut order = Vec::new();
        for batch in loader.epoch(epoch) {
            let batch = batch.unwrap();
            let (n, c, h, w) = batch.pixel_values.dims4().unwrap();
            assert_eq!(c, 3);
            let bucket = b.sizes[b.of_example[batch.indices[0]]];
            assert_eq!((w as u32, h as u32), bucket, "the batch has its bucket's size");
            assert!(batch.indices.iter().all(|&i| b.sizes[b.of_example[i]] == bucket), "one bucket per batch");
            assert_eq!(n, batch.indices.len());
            for (g, &i) in batch.geometry.iter().zip(&batch.indices) {
                // The crop lies inside the image resized to cover the bucket.
                let (rw, rh) = b.resized[i];
                assert!(g.crop_top_left.0 + bucket.1 <= rh && g.crop_top_left.1 + bucket.0 <= rw, "{g:?} in {rw}x{rh}");
                assert!(rw == bucket.0 || rh == bucket.1, "resized to cover: one side fits exactly");
            }
            order.extend(batch.indices.iter().copied());
            seen.extend(batch.indices);
        }
        assert_eq!((seen.len(), order.len()), (24, 24), "every example once an epoch");
        orders.push(order);
    }
    assert_ne!(orders[0], orders[1], "each epoch shuffles anew");
    let again: Vec<usize> = DataLoader::new(dataset, opts).unwrap().epoch(0).flat_map(|b| b.unwrap().indices).collect();
    assert_eq!(again, orders[0], "seeded");
}

#[test]
fn kohya_info_counts_each_bucket() {
    let b = Buckets::assign(&[(150, 50), (150, 50), (100, 100)], 128, &bucket_opts());
    let info = b.kohya_info();
    assert_eq!(info["buckets"]["0"]["resolution"], serde_json::json!([128, 128]));
    assert_eq!(info["buckets"]["0"]["count"], 1);
    assert_eq!(info["buckets"]["1"]["resolution"], serde_json::json!([192, 64]));
    assert_eq!(info["buckets"]["1"]["count"], 2);
    assert_eq!(info["mean_img_ar_error"], 0.0);
}

fn bucketed_overrides(folder: &Path, out: &Path) -> Vec<String> {
    vec![
        "dataset.kind=\"imagefolder\"".into(),
        format!("dataset.path={:?}", folder.display().to_string()),
        "preprocess.resolution=128".into(),
        "preprocess.buckets=true".into(),
        "preprocess.min_bucket_reso=64".into(),
        "preprocess.max_bucket_reso=256".into(),
        "train.max_steps=24".into(),
        "train.batch_size=2".into(),
        "validation.loss_split=0.25".into(),
        "validation.loss_every_steps=12".into(),
        format!("output.dir={:?}", out.display().to_string()),
    ]
}

#[test]
fn a_bucketed_run_trains_lowers_the_heldout_loss_and_records_its_buckets() {
    let dir = tempfile::tempdir().unwrap();
    let folder = mixed_aspect_folder(dir.path());
    let out = dir.path().join("out");
    let overrides = bucketed_overrides(&folder, &out);
    let pipeline = root().join("pipelines/tiny.toml");
    // `lora plan` shows the layout of the 18 examples left after the held-out split.
    let mut cmd = Command::cargo_bin("lora").unwrap();
    cmd.arg("plan").arg(&pipeline);
    for o in &overrides {
        cmd.arg("--set").arg(o);
    }
    let plan = cmd.assert().success().get_output().stdout.clone();
    let plan = String::from_utf8(plan).unwrap();
    assert!(plan.contains("aspect-ratio buckets") && plan.contains("192x64") && plan.contains("256x64") && plan.contains("batches an epoch"), "{plan}");

    let loaded = lora::config::load_pipeline(&pipeline, &overrides).unwrap_or_else(|d| panic!("{}", d.render()));
    let report = lora::runner::run::run_pipeline(&loaded, &mut lora::runner::stages::Session::default(), &Default::default(), Arc::new(AtomicBool::new(false))).unwrap();
    let held = lora::report::metrics::read_heldout(&out.join("metrics.jsonl")).unwrap();
    eprintln!("bucketed held-out loss: {held:?}");
    assert_eq!(held.iter().map(|h| h.0).collect::<Vec<_>>(), vec![0, 12, 24]);
    assert!(held[2].1 < held[0].1, "the held-out loss goes down: {held:?}");
    assert_eq!(report.heldout_loss.1, Some(held[2].1));
    // The kohya header records the buckets of the 18 training images.
    let kohya = lora::adapters::read_lora_file(&out.join(lora::layout::KOHYA_FILE)).unwrap();
    assert_eq!(kohya.metadata["ss_enable_bucket"], "true");
    assert_eq!(kohya.metadata["ss_min_bucket_reso"], "64");
    let info: serde_json::Value = serde_json::from_str(&kohya.metadata["ss_bucket_info"]).unwrap();
    let total: u64 = info["buckets"].as_object().unwrap().values().map(|b| b["count"].as_u64().unwrap()).sum();
    assert_eq!(total, 18, "{info}");
    // The center-cropped bucket crops were cached by the encode stage (an entry per image).
    let entries = walk(&out.join(lora::layout::CACHE_DIR)).len();
    assert!(entries >= 18, "{entries} cache entries");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if e.path().is_dir() {
            files.extend(walk(&e.path()));
        } else {
            files.push(e.path());
        }
    }
    files
}

#[test]
fn bucket_keys_without_buckets_and_bad_bounds_are_refused_by_name() {
    let pipeline = root().join("pipelines/tiny.toml");
    let err = lora::config::load_pipeline(&pipeline, &["preprocess.min_bucket_reso=64".to_string()]).err().unwrap().render();
    assert!(err.contains("preprocess.min_bucket_reso") && err.contains("buckets"), "{err}");
    let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let err = lora::config::load_pipeline(&pipeline, &set(&["preprocess.buckets=true"])).err().unwrap().render();
    // tiny.toml's resolution is 64, below kohya's default min_bucket_reso of 256.
    assert!(err.contains("preprocess.min_bucket_reso") && err.contains("256"), "{err}");
    let err = lora::config::load_pipeline(&pipeline, &set(&["preprocess.buckets=true", "preprocess.min_bucket_reso=48", "preprocess.bucket_reso_steps=32"])).err().unwrap().render();
    assert!(err.contains("multiple"), "{err}");
}
