//! Hugging Face datasets parquet: one file, a folder of shards, or a dataset folder with `data/`.
//! The image column is a struct {bytes, path} (the `Image` feature), raw binary, or a path string;
//! the caption column is a string or a list of strings.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use arrow_array::cast::AsArray;
use arrow_array::{Array, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;

use super::{Caption, Dataset, Example, ImageData, SourceOptions};

/// The parquet files a path stands for: the file itself, or the `.parquet` files of the folder
/// (of its `data/` subfolder when there is one), recursively and sorted; when some file names
/// start with `train`, only those (the `train` split).
pub(crate) fn shard_files(path: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    if !path.is_dir() {
        bail!("parquet dataset {} does not exist", path.display());
    }
    let root = if path.join("data").is_dir() { path.join("data") } else { path.to_path_buf() };
    let files: Vec<PathBuf> = super::walk_files(&root)?
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e.eq_ignore_ascii_case("parquet")))
        .collect();
    let is_train = |p: &PathBuf| {
        p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("train"))
            || p.parent().and_then(|d| d.file_name()).and_then(|n| n.to_str()) == Some("train")
    };
    let train: Vec<PathBuf> = files.iter().filter(|p| is_train(p)).cloned().collect();
    let files = if train.is_empty() { files } else { train };
    if files.is_empty() {
        bail!("no .parquet files under {}", root.display());
    }
    Ok(files)
}

/// Read every shard's image and caption columns.
pub fn load(path: &Path, opts: &SourceOptions) -> anyhow::Result<Dataset> {
    let mut examples = Vec::new();
    for file in shard_files(path)? {
        read_file(&file, opts, &mut examples)?;
    }
    Ok(Dataset { examples, description: path.display().to_string(), groups: Vec::new() })
}

fn read_file(file: &Path, opts: &SourceOptions, out: &mut Vec<Example>) -> anyhow::Result<()> {
    let handle = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(handle)
        .with_context(|| format!("{}: not a readable parquet file", file.display()))?;
    let schema = builder.schema().clone();
    let column_index = |name: &str| {
        schema.index_of(name).map_err(|_| {
            let names: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            anyhow::anyhow!("{}: no column `{name}`; the columns are: {}", file.display(), names.join(", "))
        })
    };
    let image_index = column_index(&opts.image_column)?;
    let caption_index = column_index(&opts.caption_column)?;
    let mask = ProjectionMask::roots(builder.parquet_schema(), [image_index, caption_index]);
    let reader = builder.with_projection(mask).build().with_context(|| format!("reading {}", file.display()))?;
    let base_dir = file.parent().unwrap_or(Path::new("."));
    let mut row = 0usize;
    for batch in reader {
        let batch: RecordBatch = batch.with_context(|| format!("{}: reading rows after row {row}", file.display()))?;
        let images = batch.column_by_name(&opts.image_column).expect("projected column");
        let captions = batch.column_by_name(&opts.caption_column).expect("projected column");
        for i in 0..batch.num_rows() {
            let origin = format!("{} row {}", file.display(), row);
            let image = image_at(images.as_ref(), i, base_dir)
                .with_context(|| format!("{origin}: column `{}`", opts.image_column))?;
            let caption = caption_at(captions.as_ref(), i)
                .with_context(|| format!("{origin}: column `{}`", opts.caption_column))?;
            out.push(Example { image, caption, origin, group: 0 });
            row += 1;
        }
    }
    Ok(())
}

/// Bytes of a binary-like cell; `Ok(None)` when null.
fn binary_at(array: &dyn Array, i: usize) -> anyhow::Result<Option<Vec<u8>>> {
    if array.is_null(i) {
        return Ok(None);
    }
    Ok(Some(match array.data_type() {
        DataType::Binary => array.as_binary::<i32>().value(i).to_vec(),
        DataType::LargeBinary => array.as_binary::<i64>().value(i).to_vec(),
        DataType::BinaryView => array.as_binary_view().value(i).to_vec(),
        DataType::FixedSizeBinary(_) => array.as_fixed_size_binary().value(i).to_vec(),
        other => bail!("expected binary image bytes, found {other}"),
    }))
}

/// A string cell; `Ok(None)` when null.
fn string_at(array: &dyn Array, i: usize) -> anyhow::Result<Option<String>> {
    if array.is_null(i) {
        return Ok(None);
    }
    Ok(Some(match array.data_type() {
        DataType::Utf8 => array.as_string::<i32>().value(i).to_string(),
        DataType::LargeUtf8 => array.as_string::<i64>().value(i).to_string(),
        DataType::Utf8View => array.as_string_view().value(i).to_string(),
        other => bail!("expected a string, found {other}"),
    }))
}

fn image_at(array: &dyn Array, i: usize, base_dir: &Path) -> anyhow::Result<ImageData> {
    if array.is_null(i) {
        bail!("the image is null");
    }
    let from_path = |p: String| {
        let p = PathBuf::from(p);
        ImageData::File(if p.is_absolute() { p } else { base_dir.join(p) })
    };
    match array.data_type() {
        DataType::Struct(_) => {
            let s = array.as_struct();
            if let Some(bytes_col) = s.column_by_name("bytes") {
                if let Some(bytes) = binary_at(bytes_col.as_ref(), i)? {
                    return Ok(ImageData::Bytes(Arc::from(bytes)));
                }
            }
            if let Some(path_col) = s.column_by_name("path") {
                if let Some(p) = string_at(path_col.as_ref(), i)? {
                    return Ok(from_path(p));
                }
            }
            bail!("the image struct has neither `bytes` nor `path`")
        }
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => Ok(from_path(string_at(array, i)?.expect("not null"))),
        _ => Ok(ImageData::Bytes(Arc::from(binary_at(array, i)?.expect("not null")))),
    }
}

fn caption_at(array: &dyn Array, i: usize) -> anyhow::Result<Caption> {
    if array.is_null(i) {
        bail!("the caption is missing (null)");
    }
    let list_values = |values: Arc<dyn Array>| -> anyhow::Result<Caption> {
        let mut choices = Vec::with_capacity(values.len());
        for j in 0..values.len() {
            if let Some(s) = string_at(values.as_ref(), j)? {
                choices.push(s);
            }
        }
        if choices.is_empty() {
            bail!("the caption list is empty");
        }
        Ok(Caption::Choices(choices))
    };
    match array.data_type() {
        DataType::List(_) => list_values(array.as_list::<i32>().value(i)),
        DataType::LargeList(_) => list_values(array.as_list::<i64>().value(i)),
        _ => Ok(Caption::One(string_at(array, i)?.expect("not null"))),
    }
}
