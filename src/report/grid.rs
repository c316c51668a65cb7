//! Validation grids: the images of one validation point tiled into one PNG (rows = prompts,
//! columns = images per prompt), written atomically, and the per-prompt rows that go into the
//! TensorBoard event file.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use image::RgbImage;

/// The file name of a validation point's grid, beside its images.
pub const GRID_FILE: &str = "grid.png";

/// Gap between tiles, in pixels (white, so dark images stay apart).
const GAP: u32 = 2;

/// Tile `images` row-major into `columns` columns (the last row may be short; its empty tiles
/// stay white). Every image must have the size of the first.
pub(crate) fn grid(images: &[RgbImage], columns: usize) -> Result<RgbImage> {
    let Some(first) = images.first() else { bail!("a grid needs at least one image") };
    if columns == 0 {
        bail!("a grid needs at least one column");
    }
    let (w, h) = first.dimensions();
    if let Some((i, img)) = images.iter().enumerate().find(|(_, img)| img.dimensions() != (w, h)) {
        bail!("grid: image {i} is {}x{}, the first is {w}x{h}", img.width(), img.height());
    }
    let cols = columns.min(images.len()) as u32;
    let rows = images.len().div_ceil(columns) as u32;
    let mut out = RgbImage::from_pixel(cols * w + (cols - 1) * GAP, rows * h + (rows - 1) * GAP, image::Rgb([255, 255, 255]));
    for (i, img) in images.iter().enumerate() {
        let (r, c) = ((i / columns) as u32, (i % columns) as u32);
        image::imageops::replace(&mut out, img, (c * (w + GAP)) as i64, (r * (h + GAP)) as i64);
    }
    Ok(out)
}

/// PNG bytes of `img`.
pub(crate) fn encode_png(img: &RgbImage) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png).context("encoding PNG")?;
    Ok(bytes)
}

/// Write the grid of `images` (`columns` per row) to `path` atomically.
pub(crate) fn write_grid(images: &[RgbImage], columns: usize, path: &Path) -> Result<()> {
    let bytes = encode_png(&grid(images, columns)?)?;
    crate::util::fs::write_atomic(path, &bytes).with_context(|| format!("writing {}", path.display()))
}

/// Read back the validation images `files` (prompt-major: `per_prompt` images of each prompt in
/// turn, as `validation_images` writes them).
fn read_images(files: &[PathBuf]) -> Result<Vec<RgbImage>> {
    files
        .iter()
        .map(|f| Ok(image::open(f).with_context(|| format!("reading validation image {}", f.display()))?.to_rgb8()))
        .collect()
}

/// After a validation point wrote `files` (prompt-major, `per_prompt` images each): write their
/// grid as `dir/grid.png` and, when `events` is given, each prompt's row of images as an image
/// summary `validation/prompt<i>` at `step`. Returns the grid's path.
pub(crate) fn publish_validation(
    files: &[PathBuf],
    per_prompt: usize,
    dir: &Path,
    events: Option<(&Path, u64)>,
) -> Result<PathBuf> {
    let images = read_images(files)?;
    if per_prompt == 0 || images.len() % per_prompt != 0 {
        bail!("{} validation image(s) do not split into rows of {per_prompt}", images.len());
    }
    let path = dir.join(GRID_FILE);
    write_grid(&images, per_prompt, &path)?;
    if let Some((log_dir, step)) = events {
        let mut rows = Vec::new();
        for (i, row) in images.chunks(per_prompt).enumerate() {
            let img = grid(row, per_prompt)?;
            rows.push((format!("validation/prompt{i}"), img.height(), img.width(), encode_png(&img)?));
        }
        let values: Vec<super::tensorboard::ImageValue<'_>> = rows
            .iter()
            .map(|(tag, h, w, png)| super::tensorboard::ImageValue { tag, height: *h, width: *w, png })
            .collect();
        super::tensorboard::EventWriter::for_dir(log_dir)?.images(step, &values)?;
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn solid(w: u32, h: u32, v: u8) -> RgbImage {
        RgbImage::from_pixel(w, h, image::Rgb([v, v / 2, 255 - v]))
    }

    /// Each tile lands at its row and column, the gaps are white, a short last row leaves
    /// white tiles; sizes are (cols * w + gaps) x (rows * h + gaps).
    #[test]
    fn tiles_row_major_with_gaps() {
        let imgs: Vec<RgbImage> = (0..5).map(|i| solid(4, 3, 40 * (i + 1))).collect();
        let g = grid(&imgs, 2).unwrap();
        assert_eq!(g.dimensions(), (2 * 4 + GAP, 3 * 3 + 2 * GAP));
        for (i, img) in imgs.iter().enumerate() {
            let (r, c) = ((i / 2) as u32, (i % 2) as u32);
            for (x, y) in [(0, 0), (3, 2), (1, 1)] {
                assert_eq!(g.get_pixel(c * (4 + GAP) + x, r * (3 + GAP) + y), img.get_pixel(x, y), "image {i} at ({x}, {y})");
            }
        }
        assert_eq!(g.get_pixel(4, 0), &image::Rgb([255, 255, 255]), "gap between columns");
        assert_eq!(g.get_pixel(0, 3), &image::Rgb([255, 255, 255]), "gap between rows");
        assert_eq!(g.get_pixel(4 + GAP + 1, 2 * (3 + GAP) + 1), &image::Rgb([255, 255, 255]), "the short last row's empty tile");
        // Fewer images than columns: one row as wide as the images.
        assert_eq!(grid(&imgs[..1], 4).unwrap().dimensions(), (4, 3));
    }

    #[test]
    fn refuses_mixed_sizes_and_empty_input() {
        let err = grid(&[solid(4, 3, 1), solid(4, 4, 1)], 2).unwrap_err().to_string();
        assert!(err.contains("image 1 is 4x4"), "{err}");
        assert!(grid(&[], 2).is_err());
        assert!(grid(&[solid(1, 1, 1)], 0).is_err());
    }

    #[test]
    fn written_grid_decodes_to_the_same_pixels() {
        let dir = tempfile::tempdir().unwrap();
        let imgs: Vec<RgbImage> = (0..4).map(|i| solid(5, 5, 50 * i)).collect();
        let path = dir.path().join("v/grid.png");
        write_grid(&imgs, 2, &path).unwrap();
        let back = image::open(&path).unwrap().to_rgb8();
        assert_eq!(back, grid(&imgs, 2).unwrap());
        assert_eq!(std::fs::read_dir(path.parent().unwrap()).unwrap().count(), 1, "no temporary file left");
    }
}
