//! The loader: batch shapes and `drop_last = false`, every example once per epoch, the seeded
//! order, per-epoch augmentation and caption draws, and determinism regardless of threads.

use std::sync::Arc;

use lora::data::loader::{Batch, DataLoader, LoaderOptions};
use lora::data::source::{load_source, Caption, SourceOptions, SourceSpec};
use lora::data::transform::{CropMode, Interpolation, PreprocessOptions};

fn dataset() -> Arc<lora::data::Dataset> {
    let path = crate::support::repo_root().join("tests/fixtures/datasets/shapes-parquet");
    Arc::new(load_source(&SourceSpec::Parquet { path }, &SourceOptions::default()).unwrap())
}

fn options(seed: u64, batch_size: usize) -> LoaderOptions {
    LoaderOptions {
        batch_size,
        seed,
        shuffle: true,
        prefetch_batches: 2,
        preprocess: PreprocessOptions { resolution: 32, crop: CropMode::Random, flip_p: 0.5, interpolation: Interpolation::Lanczos, flip_before_crop: false },
        ..Default::default()
    }
}

fn collect(loader: &DataLoader, epoch: usize) -> Vec<Batch> {
    loader.epoch(epoch).collect::<anyhow::Result<Vec<_>>>().unwrap()
}

fn flat(b: &Batch) -> Vec<f32> {
    b.pixel_values.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn batches_cover_the_epoch_without_dropping_the_last() {
    let loader = DataLoader::new(dataset(), options(3, 5)).unwrap();
    assert_eq!(loader.batches_per_epoch(), 5);
    let batches = collect(&loader, 0);
    let sizes: Vec<usize> = batches.iter().map(|b| b.pixel_values.dims()[0]).collect();
    assert_eq!(sizes, vec![5, 5, 5, 5, 4]);
    assert_eq!(batches[0].pixel_values.dims(), &[5, 3, 32, 32]);
    let mut seen: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
    assert_ne!(seen, (0..24).collect::<Vec<_>>(), "shuffled");
    seen.sort();
    assert_eq!(seen, (0..24).collect::<Vec<_>>(), "each example once");
    for b in &batches {
        assert_eq!(b.captions.len(), b.indices.len());
        let v = flat(b);
        assert!(v.iter().all(|x| (-1.0..=1.0).contains(x)), "pixels in [-1, 1]");
        for (caption, &i) in b.captions.iter().zip(&b.indices) {
            assert_eq!(caption, loader.dataset().examples[i].caption.first());
        }
    }
}

#[test]
fn deterministic_for_a_seed_whatever_the_threads() {
    let a = DataLoader::new(dataset(), options(11, 4)).unwrap();
    let mut slow_opts = options(11, 4);
    slow_opts.prefetch_batches = 1;
    let b = DataLoader::new(dataset(), slow_opts).unwrap();
    let one_thread = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let from_a = collect(&a, 2);
    let from_b = one_thread.install(|| {
        // Consume slowly so the producer runs ahead and blocks.
        let mut out = Vec::new();
        for batch in b.epoch(2) {
            std::thread::sleep(std::time::Duration::from_millis(5));
            out.push(batch.unwrap());
        }
        out
    });
    for (x, y) in from_a.iter().zip(&from_b) {
        assert_eq!(x.indices, y.indices);
        assert_eq!(flat(x), flat(y), "same pixels bit for bit");
    }
    // Synchronous loading of the same example gives the same pixels.
    let (pixels, _) = a.load_example(2, from_a[1].indices[2]).unwrap();
    assert_eq!(pixels, flat(&from_a[1])[2 * 3 * 32 * 32..3 * 3 * 32 * 32].to_vec());
}

#[test]
fn epochs_and_seeds_change_order_and_augmentation() {
    let loader = DataLoader::new(dataset(), options(5, 24)).unwrap();
    let e0 = collect(&loader, 0).remove(0);
    let e1 = collect(&loader, 1).remove(0);
    assert_ne!(e0.indices, e1.indices, "each epoch reshuffles");
    let other = DataLoader::new(dataset(), options(6, 24)).unwrap();
    assert_ne!(collect(&other, 0)[0].indices, e0.indices, "another seed, another order");
    // The same example differs between epochs in some crops/flips (random crop + flip p=0.5).
    let differing = (0..24)
        .filter(|&i| loader.load_example(0, i).unwrap().0 != loader.load_example(1, i).unwrap().0)
        .count();
    assert!(differing > 0, "augmentation never changed across epochs");
}

#[test]
fn list_captions_are_drawn_per_epoch_and_errors_surface() {
    let mut ds = (*dataset()).clone();
    ds.examples.truncate(2);
    ds.examples[0].caption = Caption::Choices(vec!["a".into(), "b".into(), "c".into()]);
    let loader = DataLoader::new(Arc::new(ds.clone()), options(1, 2)).unwrap();
    let drawn: std::collections::HashSet<String> = (0..20).map(|e| loader.load_example(e, 0).unwrap().1).collect();
    assert!(drawn.len() > 1 && drawn.iter().all(|c| ["a", "b", "c"].contains(&c.as_str())), "{drawn:?}");
    assert_eq!(loader.load_example(3, 0).unwrap().1, loader.load_example(3, 0).unwrap().1, "seeded");

    // A bad image in the loader (not screened first) is an error naming it.
    ds.examples[1].image = lora::data::ImageData::Bytes(Arc::from(b"not an image".to_vec()));
    ds.examples[1].origin = "broken row".into();
    let loader = DataLoader::new(Arc::new(ds), options(1, 1)).unwrap();
    let results: Vec<_> = loader.epoch(0).collect();
    let err = results.iter().find_map(|r| r.as_ref().err()).expect("an error").to_string();
    assert!(err.contains("broken row") && err.contains("not an image"), "{err}");
    let empty = lora::data::Dataset::default();
    assert!(DataLoader::new(Arc::new(empty), options(1, 1)).is_err());
}
