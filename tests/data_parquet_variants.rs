//! Parquet layouts other than the fixture's: the image as raw binary, captions as lists of
//! strings (a seeded choice per draw), a null caption (an error naming the row), and several
//! shards of which only the train split is read.

use std::path::Path;
use std::sync::Arc;

use arrow_array::builder::{ListBuilder, StringBuilder};
use arrow_array::{ArrayRef, BinaryArray, RecordBatch, StringArray};
use lora::data::loader::{DataLoader, LoaderOptions};
use lora::data::source::{load_source, Caption, SourceOptions, SourceSpec};
use lora::data::transform::{CropMode, PreprocessOptions};
use parquet::arrow::ArrowWriter;

fn png_bytes(i: u8) -> Vec<u8> {
    let img = image::RgbImage::from_pixel(8 + i as u32, 8, image::Rgb([i * 10, 100, 200]));
    let mut out = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img).write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn write_parquet(path: &Path, columns: Vec<(&str, ArrayRef)>) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let batch = RecordBatch::try_from_iter(columns).unwrap();
    let mut writer = ArrowWriter::try_new(std::fs::File::create(path).unwrap(), batch.schema(), None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

#[test]
fn raw_binary_images_and_list_captions() {
    let dir = tempfile::tempdir().unwrap();
    let images: Vec<Vec<u8>> = (0..3).map(png_bytes).collect();
    let image_col = Arc::new(BinaryArray::from_iter_values(images.iter())) as ArrayRef;
    let mut lists = ListBuilder::new(StringBuilder::new());
    for row in [vec!["a", "b", "c"], vec!["only"], vec!["x", "y"]] {
        for s in row {
            lists.values().append_value(s);
        }
        lists.append(true);
    }
    let caption_col = Arc::new(lists.finish()) as ArrayRef;
    write_parquet(&dir.path().join("data/train-00000-of-00002.parquet"), vec![("pixels", image_col.clone()), ("tags", caption_col.clone())]);
    write_parquet(&dir.path().join("data/train-00001-of-00002.parquet"), vec![("pixels", image_col.clone()), ("tags", caption_col.clone())]);
    // A test split that must not be read.
    write_parquet(&dir.path().join("data/test-00000-of-00001.parquet"), vec![("pixels", image_col), ("tags", caption_col)]);

    let opts = SourceOptions { image_column: "pixels".into(), caption_column: "tags".into(), ..Default::default() };
    let ds = load_source(&SourceSpec::Parquet { path: dir.path().to_path_buf() }, &opts).unwrap();
    assert_eq!(ds.len(), 6, "two train shards of 3 rows, the test split left out");
    assert_eq!(ds.examples[0].caption, Caption::Choices(vec!["a".into(), "b".into(), "c".into()]));
    assert!(ds.examples[4].origin.contains("train-00001-of-00002.parquet row 1"), "{}", ds.examples[4].origin);

    let loader = DataLoader::new(
        Arc::new(ds),
        LoaderOptions { batch_size: 6, seed: 9, preprocess: PreprocessOptions { resolution: 8, crop: CropMode::Center, ..Default::default() }, ..Default::default() },
    )
    .unwrap();
    let batch = loader.epoch(0).next().unwrap().unwrap();
    assert_eq!(batch.pixel_values.dims(), &[6, 3, 8, 8]);
    for (caption, &i) in batch.captions.iter().zip(&batch.indices) {
        let allowed: &[&str] = match i % 3 { 0 => &["a", "b", "c"], 1 => &["only"], _ => &["x", "y"] };
        assert!(allowed.contains(&caption.as_str()), "row {i}: {caption}");
    }
    // Over many epochs the list caption takes more than one value.
    let drawn: std::collections::HashSet<String> = (0..16).map(|e| loader.load_example(e, 0).unwrap().1).collect();
    assert!(drawn.len() >= 2, "{drawn:?}");
}

#[test]
fn null_caption_is_an_error_naming_the_row() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("one.parquet");
    let images: Vec<Vec<u8>> = (0..2).map(png_bytes).collect();
    write_parquet(
        &path,
        vec![
            ("image", Arc::new(BinaryArray::from_iter_values(images.iter())) as ArrayRef),
            ("text", Arc::new(StringArray::from(vec![Some("fine"), None])) as ArrayRef),
        ],
    );
    let err = format!("{:#}", load_source(&SourceSpec::Parquet { path: path.clone() }, &SourceOptions::default()).unwrap_err());
    assert!(err.contains("one.parquet row 1") && err.contains("`text`") && err.contains("missing"), "{err}");
}
