//! Dataset sources: the HF parquet fixture (file, shard folder, dataset folder), the
//! `metadata.jsonl` image folder, sidecar captions, configurable columns with errors that list
//! what is there, list captions and the seeded `max_samples` subset.

use std::path::{Path, PathBuf};

use lora::data::decode::{decode_example, DecodeOptions};
use lora::data::source::{load_source, Caption, Dataset, ImageData, SourceOptions, SourceSpec};

fn fixture(rel: &str) -> PathBuf {
    crate::support::repo_root().join("tests/fixtures/datasets").join(rel)
}

fn parquet(path: PathBuf) -> SourceSpec {
    SourceSpec::Parquet { path }
}

fn captions(ds: &Dataset) -> Vec<String> {
    ds.examples.iter().map(|e| e.caption.first().to_string()).collect()
}

#[test]
fn parquet_file_folder_and_dataset_dir_agree() {
    let opts = SourceOptions::default();
    let by_dir = load_source(&parquet(fixture("shapes-parquet")), &opts).unwrap();
    let by_data = load_source(&parquet(fixture("shapes-parquet/data")), &opts).unwrap();
    let by_file = load_source(&parquet(fixture("shapes-parquet/data/train-00000-of-00001.parquet")), &opts).unwrap();
    assert_eq!(by_dir.len(), 24);
    assert_eq!(captions(&by_dir), captions(&by_data));
    assert_eq!(captions(&by_dir), captions(&by_file));
    assert!(matches!(by_dir.examples[0].image, ImageData::Bytes(_)), "image struct bytes are read");
    assert!(by_dir.examples[3].origin.ends_with("row 3"), "{}", by_dir.examples[3].origin);
}

#[test]
fn parquet_and_image_folder_hold_the_same_examples() {
    let opts = SourceOptions::default();
    let pq = load_source(&parquet(fixture("shapes-parquet")), &opts).unwrap();
    let folder = load_source(&SourceSpec::ImageFolder { dir: fixture("shapes-folder") }, &opts).unwrap();
    let folder_train = load_source(&SourceSpec::ImageFolder { dir: fixture("shapes-folder/train") }, &opts).unwrap();
    assert_eq!(folder.len(), 24);
    assert_eq!(captions(&folder), captions(&folder_train));
    assert_eq!(captions(&pq), captions(&folder), "same captions in the same order");
    let first_line = std::fs::read_to_string(fixture("shapes-folder/train/metadata.jsonl")).unwrap();
    let first: serde_json::Value = serde_json::from_str(first_line.lines().next().unwrap()).unwrap();
    assert_eq!(folder.examples[0].caption, Caption::One(first["text"].as_str().unwrap().to_string()));
    // The same image sizes from both layouts (pixels differ where the folder holds a JPEG).
    for (a, b) in pq.examples.iter().zip(&folder.examples) {
        let da = decode_example(a, &DecodeOptions::default()).unwrap();
        let db = decode_example(b, &DecodeOptions::default()).unwrap();
        assert_eq!(da.dimensions(), db.dimensions(), "{} vs {}", a.origin, b.origin);
        if b.origin.ends_with(".png") {
            assert_eq!(da.as_raw(), db.as_raw(), "{}: PNG pixels differ", b.origin);
        }
    }
}

#[test]
fn missing_columns_are_errors_listing_what_exists() {
    let opts = SourceOptions { caption_column: "caption".into(), ..Default::default() };
    let err = format!("{:#}", load_source(&parquet(fixture("shapes-parquet")), &opts).unwrap_err());
    assert!(err.contains("`caption`") && err.contains("image") && err.contains("text"), "{err}");
    assert!(err.contains("train-00000-of-00001.parquet"), "names the file: {err}");
    let opts = SourceOptions { image_column: "img".into(), ..Default::default() };
    let err = format!("{:#}", load_source(&parquet(fixture("shapes-parquet")), &opts).unwrap_err());
    assert!(err.contains("`img`") && err.contains("text"), "{err}");
    let opts = SourceOptions { caption_column: "caption".into(), ..Default::default() };
    let err = format!("{:#}", load_source(&SourceSpec::ImageFolder { dir: fixture("shapes-folder") }, &opts).unwrap_err());
    assert!(err.contains("`caption`") && err.contains("file_name, text") && err.contains("line 1"), "{err}");
    let err = format!("{:#}", load_source(&parquet(fixture("nope")), &SourceOptions::default()).unwrap_err());
    assert!(err.contains("nope") && err.contains("does not exist"), "{err}");
    let err = format!("{:#}", load_source(&parquet(fixture("bad/empty.png")), &SourceOptions::default()).unwrap_err());
    assert!(err.contains("empty.png") && err.contains("parquet"), "{err}");
}

#[test]
fn max_samples_is_a_seeded_subset() {
    let spec = parquet(fixture("shapes-parquet"));
    let take = |n, seed| captions(&load_source(&spec, &SourceOptions { max_samples: Some(n), seed, ..Default::default() }).unwrap());
    let all = take(100, 0);
    assert_eq!(all.len(), 24, "more than the dataset keeps all of it");
    let a = take(5, 7);
    assert_eq!(a.len(), 5);
    assert_eq!(a, take(5, 7), "same seed, same subset");
    assert_ne!(a, take(5, 8), "another seed, another subset");
    let full = captions(&load_source(&spec, &SourceOptions::default()).unwrap());
    let mut sorted_all = all.clone();
    sorted_all.sort();
    let mut sorted_full = full;
    sorted_full.sort();
    assert_eq!(sorted_all, sorted_full, "the subset is drawn without repetition");
}

fn copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to.parent().unwrap()).unwrap();
    std::fs::copy(from, to).unwrap();
}

#[test]
fn sidecar_captions_and_list_captions() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    copy(&fixture("shapes-folder/train/0001.png"), &root.join("a.png"));
    std::fs::write(root.join("a.txt"), "  a blue triangle \n").unwrap();
    copy(&fixture("shapes-folder/train/0003.jpg"), &root.join("10_concept/b.jpg"));
    std::fs::write(root.join("10_concept/b.caption"), "an orange square").unwrap();
    let spec = SourceSpec::Sidecar { dir: root.to_path_buf(), caption_extensions: vec![] };
    let ds = load_source(&spec, &SourceOptions::default()).unwrap();
    assert_eq!(captions(&ds), vec!["an orange square".to_string(), "a blue triangle".to_string()]);
    copy(&fixture("shapes-folder/train/0002.png"), &root.join("c.png"));
    let err = format!("{:#}", load_source(&spec, &SourceOptions::default()).unwrap_err());
    assert!(err.contains("c.png") && err.contains("c.txt") && err.contains("c.caption"), "{err}");

    // metadata.jsonl with a list caption and a custom column name.
    let dir = tempfile::tempdir().unwrap();
    copy(&fixture("shapes-folder/train/0001.png"), &dir.path().join("x.png"));
    std::fs::write(dir.path().join("metadata.jsonl"), "{\"file_name\": \"x.png\", \"prompt\": [\"one\", \"two\"]}\n").unwrap();
    let opts = SourceOptions { caption_column: "prompt".into(), ..Default::default() };
    let ds = load_source(&SourceSpec::ImageFolder { dir: dir.path().to_path_buf() }, &opts).unwrap();
    assert_eq!(ds.examples[0].caption, Caption::Choices(vec!["one".into(), "two".into()]));
    std::fs::write(dir.path().join("metadata.jsonl"), "{\"file_name\": \"missing.png\", \"prompt\": \"p\"}\n").unwrap();
    let err = format!("{:#}", load_source(&SourceSpec::ImageFolder { dir: dir.path().to_path_buf() }, &opts).unwrap_err());
    assert!(err.contains("missing.png") && err.contains("line 1"), "{err}");
    std::fs::write(dir.path().join("metadata.jsonl"), "").unwrap();
    let err = format!("{:#}", load_source(&SourceSpec::ImageFolder { dir: dir.path().to_path_buf() }, &opts).unwrap_err());
    assert!(err.contains("no examples"), "{err}");
}

#[test]
fn hub_dataset_id_resolves_through_the_cache_offline() {
    use lora::data::source::hub::HubOptions;
    let cache = tempfile::tempdir().unwrap();
    let repo_dir = cache.path().join("datasets--someone--shapes");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    copy(
        &fixture("shapes-parquet/data/train-00000-of-00001.parquet"),
        &repo_dir.join("snapshots").join(commit).join("data/train-00000-of-00001.parquet"),
    );
    std::fs::create_dir_all(repo_dir.join("refs")).unwrap();
    std::fs::write(repo_dir.join("refs/main"), commit).unwrap();
    let hub = HubOptions { cache_dir: Some(cache.path().to_path_buf()), offline: true, ..Default::default() };
    let spec = SourceSpec::Hub { repo_id: "someone/shapes".into(), hub: hub.clone() };
    let ds = load_source(&spec, &SourceOptions::default()).unwrap();
    assert_eq!(ds.len(), 24);
    assert!(ds.description.contains("someone/shapes"), "{}", ds.description);
    let spec = SourceSpec::Hub { repo_id: "someone/other".into(), hub };
    let err = format!("{:#}", load_source(&spec, &SourceOptions::default()).unwrap_err());
    assert!(err.contains("someone/other") && err.contains("offline"), "{err}");
}

/// The shapes image folder copied to `to`, with its metadata rewritten as `metadata.csv` (quoted
/// where a caption needs it) instead of `metadata.jsonl`.
fn shapes_folder_as_csv(to: &Path) {
    let from = fixture("shapes-folder/train");
    std::fs::create_dir_all(to).unwrap();
    let mut csv = String::from("file_name,text\r\n");
    for line in std::fs::read_to_string(from.join("metadata.jsonl")).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let name = v["file_name"].as_str().unwrap();
        copy(&from.join(name), &to.join(name));
        csv += &format!("{name},\"{}\"\r\n", v["text"].as_str().unwrap().replace('"', "\"\""));
    }
    std::fs::write(to.join("metadata.csv"), csv).unwrap();
}

#[test]
fn image_folder_reads_metadata_csv_as_the_datasets_imagefolder_does() {
    let dir = tempfile::tempdir().unwrap();
    shapes_folder_as_csv(dir.path());
    let opts = SourceOptions::default();
    let jsonl = load_source(&SourceSpec::ImageFolder { dir: fixture("shapes-folder") }, &opts).unwrap();
    let csv = load_source(&SourceSpec::ImageFolder { dir: dir.path().to_path_buf() }, &opts).unwrap();
    assert_eq!(csv.len(), 24);
    assert_eq!(captions(&csv), captions(&jsonl));
    let names = |ds: &Dataset| ds.examples.iter().map(|e| Path::new(&e.origin).file_name().unwrap().to_owned()).collect::<Vec<_>>();
    assert_eq!(names(&csv), names(&jsonl));

    // Commas and quotes inside a quoted caption, another column, a missing caption column.
    std::fs::write(dir.path().join("metadata.csv"), "id,file_name,text\n7,0001.png,\"a \"\"blue\"\", pointy triangle\"\n").unwrap();
    let one = load_source(&SourceSpec::ImageFolder { dir: dir.path().to_path_buf() }, &opts).unwrap();
    assert_eq!(captions(&one), ["a \"blue\", pointy triangle"]);
    let other = SourceOptions { caption_column: "caption".into(), ..Default::default() };
    let err = format!("{:#}", load_source(&SourceSpec::ImageFolder { dir: dir.path().to_path_buf() }, &other).unwrap_err());
    assert!(err.ends_with("metadata.csv line 2: no caption column `caption`; the keys are: file_name, id, text"), "{err}");
    std::fs::write(dir.path().join("metadata.csv"), "file_name,text\n0001.png,a,b\n").unwrap();
    let err = format!("{:#}", load_source(&SourceSpec::ImageFolder { dir: dir.path().to_path_buf() }, &opts).unwrap_err());
    assert!(err.ends_with("metadata.csv line 2: 3 field(s), but the header has 2 columns (file_name, text)"), "{err}");

    // Both kinds in one folder: which holds the captions would be a guess.
    std::fs::write(dir.path().join("metadata.jsonl"), "{\"file_name\": \"0001.png\", \"text\": \"x\"}\n").unwrap();
    let err = format!("{:#}", load_source(&SourceSpec::ImageFolder { dir: dir.path().to_path_buf() }, &opts).unwrap_err());
    assert!(err.contains("both metadata.jsonl and metadata.csv"), "{err}");
}

#[test]
fn metadata_file_names_may_not_leave_the_dataset_folder() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    copy(&fixture("shapes-folder/train/0001.png"), &data.join("0001.png"));
    // A real image outside the folder, so the only reason to refuse is where it is.
    copy(&fixture("shapes-folder/train/0001.png"), &root.path().join("outside.png"));
    let outside_abs = root.path().join("outside.png").display().to_string();
    // The line of the outside name: the second object, or the second row below the header.
    for (name, line, meta) in [
        ("jsonl", 2, "{\"file_name\": \"0001.png\", \"text\": \"in\"}\n{\"file_name\": \"../outside.png\", \"text\": \"out\"}\n".to_string()),
        ("jsonl", 2, format!("{{\"file_name\": \"0001.png\", \"text\": \"in\"}}\n{{\"file_name\": {:?}, \"text\": \"out\"}}\n", outside_abs)),
        ("csv", 3, "file_name,text\n0001.png,in\n../outside.png,out\n".to_string()),
    ] {
        for f in ["metadata.jsonl", "metadata.csv"] {
            let _ = std::fs::remove_file(data.join(f));
        }
        std::fs::write(data.join(format!("metadata.{name}")), &meta).unwrap();
        let err = format!("{:#}", load_source(&SourceSpec::ImageFolder { dir: data.clone() }, &SourceOptions::default()).unwrap_err());
        let file = data.join(format!("metadata.{name}")).display().to_string();
        assert!(err.starts_with(&format!("{file} line {line}: `file_name` \"")), "{err}");
        assert!(err.contains("points outside the dataset folder"), "{err}");
    }
}
