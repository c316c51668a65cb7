//! Caption tricks (`dataset.caption_dropout`, `shuffle_tags`, `keep_tokens`) as kohya sd-scripts
//! defines them (`BaseDataset.process_caption`: drop to "" with the rate, else split on ",",
//! strip, keep the first `keep_tokens`, shuffle the rest, join with ", "), checked against that
//! definition computed here; off by default, where the loader's captions are the dataset's.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use lora::data::caption::CaptionOptions;
use lora::data::loader::{DataLoader, LoaderOptions};
use lora::data::source::{load_source, SourceOptions, SourceSpec};
use lora::data::transform::{CropMode, PreprocessOptions};
use rand::SeedableRng;

fn rng(seed: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed)
}

#[test]
fn shuffle_keeps_the_first_tags_and_permutes_the_rest_uniformly() {
    let opts = CaptionOptions { dropout: 0.0, shuffle_tags: true, keep_tokens: 2 };
    let caption = " sks person ,red shirt, smiling,outdoors ";
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut r = rng(1);
    let draws = 6000;
    for _ in 0..draws {
        let out = opts.apply(caption, &mut r);
        // kohya: tags stripped, the first two in place, joined with ", ".
        let tags: Vec<&str> = out.split(", ").collect();
        assert_eq!(&tags[..2], ["sks person", "red shirt"], "{out}");
        let rest: BTreeSet<&str> = tags[2..].iter().copied().collect();
        assert_eq!(rest, BTreeSet::from(["smiling", "outdoors"]), "{out}");
        *seen.entry(out).or_default() += 1;
    }
    // Two free tags: both orders, each half the time (binomial, 4 standard deviations).
    assert_eq!(seen.len(), 2, "{seen:?}");
    let sd = (draws as f64 * 0.25).sqrt();
    for (out, n) in &seen {
        assert!((*n as f64 - draws as f64 / 2.0).abs() < 4.0 * sd, "{out}: {n} of {draws}");
    }
    // keep_tokens beyond the tag count keeps everything; no shuffle leaves the caption as written.
    let all = CaptionOptions { dropout: 0.0, shuffle_tags: true, keep_tokens: 10 };
    assert_eq!(all.apply(caption, &mut rng(2)), "sks person, red shirt, smiling, outdoors");
    let off = CaptionOptions::default();
    assert!(off.is_off());
    assert_eq!(off.apply(caption, &mut rng(3)), caption, "untouched, not even re-joined");
}

#[test]
fn dropout_empties_the_caption_at_its_rate() {
    let opts = CaptionOptions { dropout: 0.3, shuffle_tags: false, keep_tokens: 0 };
    let mut r = rng(4);
    let draws = 10_000;
    let empty = (0..draws).filter(|_| opts.apply("a red circle", &mut r).is_empty()).count();
    let sd = (draws as f64 * 0.3 * 0.7).sqrt();
    assert!((empty as f64 - 3000.0).abs() < 4.0 * sd, "{empty} of {draws} dropped at rate 0.3");
    let never = CaptionOptions { dropout: 0.0, ..opts.clone() };
    assert!((0..1000).all(|_| never.apply("a red circle", &mut r) == "a red circle"));
}

/// An image folder of 6 small images with tag captions (`metadata.jsonl`).
fn tagged_folder() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut meta = String::new();
    for i in 0..6u8 {
        let name = format!("{i}.png");
        image::RgbImage::from_pixel(16, 16, image::Rgb([40 * i, 255 - 40 * i, 128])).save(dir.path().join(&name)).unwrap();
        let caption = format!("sks, shape {i}, colour {}, small, centred", 5 - i);
        meta += &serde_json::json!({"file_name": name, "text": caption}).to_string();
        meta.push('\n');
    }
    std::fs::write(dir.path().join("metadata.jsonl"), meta).unwrap();
    dir
}

fn loader(dir: &std::path::Path, captions: CaptionOptions) -> DataLoader {
    let data = Arc::new(load_source(&SourceSpec::ImageFolder { dir: dir.to_path_buf() }, &SourceOptions::default()).unwrap());
    let opts = LoaderOptions {
        batch_size: 2,
        seed: 7,
        preprocess: PreprocessOptions { resolution: 8, crop: CropMode::Center, ..Default::default() },
        captions,
        ..Default::default()
    };
    DataLoader::new(data, opts).unwrap()
}

#[test]
fn the_loader_applies_them_seeded_per_epoch_and_example() {
    let dir = tagged_folder();
    let plain = loader(dir.path(), CaptionOptions::default());
    let tricks = loader(dir.path(), CaptionOptions { dropout: 0.25, shuffle_tags: true, keep_tokens: 1 });
    let n = plain.dataset().len();
    let mut dropped = 0;
    let mut reordered = 0;
    for epoch in 0..16 {
        for i in 0..n {
            let (_, original) = plain.load_example(epoch, i).unwrap();
            let (_, got) = tricks.load_example(epoch, i).unwrap();
            assert_eq!(got, tricks.load_example(epoch, i).unwrap().1, "seeded by (epoch, example)");
            if got.is_empty() {
                dropped += 1;
                continue;
            }
            let want: Vec<&str> = original.trim().split(',').map(str::trim).collect();
            let tags: Vec<&str> = got.split(", ").collect();
            assert_eq!(original, plain.load_example(epoch + 1, i).unwrap().1, "off: the dataset's caption every epoch");
            assert_eq!(tags[0], "sks", "keep_tokens 1: the trigger word stays first");
            assert_eq!(tags.iter().collect::<BTreeSet<_>>(), want.iter().collect::<BTreeSet<_>>(), "{got} vs {original}");
            reordered += usize::from(tags != want);
        }
    }
    let total = 16 * n;
    assert!(dropped > total / 8 && dropped < total * 3 / 8, "{dropped} of {total} dropped at 0.25");
    assert!(reordered > (total - dropped) / 2, "{reordered} of {} kept captions reordered (4 free tags: 23 of 24 orders differ)", total - dropped);
}

/// A run with shuffled tags trains without a text cache (a shuffled caption is a new string at
/// nearly every draw): the encode cache holds the latents only.
#[test]
fn shuffled_tags_train_without_a_text_cache() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let root = crate::support::repo_root();
    let overrides: Vec<String> = vec![
        "train.max_steps=2".into(),
        "dataset.shuffle_tags=true".into(),
        "dataset.caption_dropout=0.5".into(),
        format!("output.dir={:?}", out.display().to_string()),
    ];
    let loaded = lora::config::load_pipeline(&root.join("pipelines/tiny.toml"), &overrides).unwrap_or_else(|d| panic!("{}", d.render()));
    lora::runner::run::run_pipeline(&loaded, &mut lora::runner::stages::Session::default(), &Default::default(), Arc::new(std::sync::atomic::AtomicBool::new(false))).unwrap();
    let entries: usize = std::fs::read_dir(out.join("cache/encode")).unwrap().map(|d| std::fs::read_dir(d.unwrap().path()).unwrap().count()).sum();
    assert_eq!(entries, 24, "one latent entry per image, no text entries");
    assert!(out.join(lora::layout::DIFFUSERS_FILE).is_file());
}
