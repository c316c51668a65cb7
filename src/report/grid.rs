//! Validation grids: the images of one validation point tiled into one PNG (rows = prompts,
//! columns = images per prompt, each row under a band with its prompt, drawn with the font
//! `report::plot` uses), written atomically, and the per-prompt rows that go into the TensorBoard
//! event file.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use image::RgbImage;

/// The file name of a validation point's grid, beside its images.
pub(crate) const GRID_FILE: &str = "grid.png";

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

/// Height of the band above each row that holds its label, in pixels.
pub const LABEL_HEIGHT: u32 = 18;
/// Font size of the labels, in pixels.
const LABEL_SIZE: f64 = 13.0;

/// [`grid`] with a band of `LABEL_HEIGHT` white pixels above each row holding `labels[row]` (one
/// per row, e.g. the prompt), left-aligned, shortened with `...` to the grid's width; characters
/// the embedded ASCII font lacks are drawn as `?`.
pub(crate) fn labelled_grid(images: &[RgbImage], columns: usize, labels: &[String]) -> Result<RgbImage> {
    let tiles = grid(images, columns)?;
    let rows = images.len().div_ceil(columns);
    if labels.len() != rows {
        bail!("a grid of {rows} row(s) needs {rows} label(s), got {}", labels.len());
    }
    let h = images[0].height();
    let (width, height) = (tiles.width(), tiles.height() + rows as u32 * LABEL_HEIGHT);
    let mut out = RgbImage::from_pixel(width, height, image::Rgb([255, 255, 255]));
    for r in 0..rows as u32 {
        let row = image::imageops::crop_imm(&tiles, 0, r * (h + GAP), width, h).to_image();
        image::imageops::replace(&mut out, &row, 0, (r * (h + GAP + LABEL_HEIGHT) + LABEL_HEIGHT) as i64);
    }
    super::pixels::register_font()?;
    {
        use plotters::prelude::*;
        let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing the grid's labels: {e}");
        let area = BitMapBackend::with_buffer(&mut out, (width, height)).into_drawing_area();
        let style = TextStyle::from((super::pixels::FAMILY, LABEL_SIZE).into_font()).color(&BLACK);
        for (r, label) in labels.iter().enumerate() {
            let text = fit_label(label, |t| area.estimate_text_size(t, &style).map_or(u32::MAX, |(tw, _)| tw) + 4 <= width);
            let y = r as u32 * (h + GAP + LABEL_HEIGHT) + 2;
            area.draw_text(&text, &style, (2, y as i32)).map_err(|e| err(&e))?;
        }
        area.present().map_err(|e| err(&e))?;
    }
    Ok(out)
}

/// `label` in the font's characters (others as `?`, line breaks as spaces), shortened with `...`
/// until `fits` says it does.
fn fit_label(label: &str, fits: impl Fn(&str) -> bool) -> String {
    let clean: String = label.chars().map(|c| if c.is_ascii_graphic() || c == ' ' { c } else if c.is_whitespace() { ' ' } else { '?' }).collect();
    if fits(&clean) {
        return clean;
    }
    let chars: Vec<char> = clean.chars().collect();
    for n in (0..chars.len()).rev() {
        let text: String = chars[..n].iter().collect::<String>().trim_end().to_string() + "...";
        if fits(&text) || n == 0 {
            return text;
        }
    }
    String::new()
}


/// Write the grid of `images` (`columns` per row) to `path` atomically, each row under its
/// label when `labels` are given.
pub(crate) fn write_grid(images: &[RgbImage], columns: usize, labels: Option<&[String]>, path: &Path) -> Result<()> {
    let img = match labels {
        Some(labels) => labelled_grid(images, columns, labels)?,
        None => grid(images, columns)?,
    };
    let bytes = super::pixels::encode_png(&img)?;
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
/// grid as `dir/grid.png`, each row labelled with its prompt (`prompts`, one per row, in the order
/// the images were written), and, when `events` is given, each prompt's row of images as an image
/// summary `validation/prompt<i>` at `step`. Returns the grid's path.
pub(crate) fn publish_validation_with_prompts(
    files: &[PathBuf],
    prompts: &[String],
    per_prompt: usize,
    dir: &Path,
    events: Option<(&Path, u64)>,
) -> Result<PathBuf> {
    publish(files, Some(prompts), per_prompt, dir, events)
}

fn publish(files: &[PathBuf], prompts: Option<&[String]>, per_prompt: usize, dir: &Path, events: Option<(&Path, u64)>) -> Result<PathBuf> {
    let images = read_images(files)?;
    if per_prompt == 0 || images.len() % per_prompt != 0 {
        bail!("{} validation image(s) do not split into rows of {per_prompt}", images.len());
    }
    let path = dir.join(GRID_FILE);
    write_grid(&images, per_prompt, prompts, &path)?;
    if let Some((log_dir, step)) = events {
        let mut rows = Vec::new();
        for (i, row) in images.chunks(per_prompt).enumerate() {
            let img = grid(row, per_prompt)?;
            rows.push((format!("validation/prompt{i}"), img.height(), img.width(), super::pixels::encode_png(&img)?));
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

    /// Each row sits under a band of its own: the tiles keep their pixels at the shifted rows,
    /// the band of a labelled row has dark (glyph) pixels at its left, an empty label's band stays
    /// white, and a label too long for the width is cut (no glyph at the far right edge).
    #[test]
    fn labelled_rows_have_their_text_above_them() {
        let imgs: Vec<RgbImage> = (0..4).map(|i| solid(40, 30, 60 * (i + 1) as u8)).collect();
        let long = "a very long prompt that cannot fit into eighty-two pixels at all".to_string();
        let labels = vec![long, String::new()];
        let g = labelled_grid(&imgs, 2, &labels).unwrap();
        let plain = grid(&imgs, 2).unwrap();
        assert_eq!(g.dimensions(), (plain.width(), plain.height() + 2 * LABEL_HEIGHT));
        for (i, img) in imgs.iter().enumerate() {
            let (r, c) = ((i / 2) as u32, (i % 2) as u32);
            let top = r * (30 + GAP + LABEL_HEIGHT) + LABEL_HEIGHT;
            for (x, y) in [(0, 0), (39, 29), (7, 11)] {
                assert_eq!(g.get_pixel(c * (40 + GAP) + x, top + y), img.get_pixel(x, y), "image {i} at ({x}, {y})");
            }
        }
        let dark = |x0: u32, x1: u32, y0: u32, y1: u32| {
            (y0..y1).flat_map(|y| (x0..x1).map(move |x| (x, y))).filter(|&(x, y)| g.get_pixel(x, y).0.iter().all(|&v| v < 128)).count()
        };
        assert!(dark(0, 40, 0, LABEL_HEIGHT) > 20, "the first row's label is drawn");
        assert_eq!(dark(g.width() - 2, g.width(), 0, LABEL_HEIGHT), 0, "the label is cut before the edge");
        let second_band = 30 + GAP + LABEL_HEIGHT;
        assert_eq!(dark(0, g.width(), second_band, second_band + LABEL_HEIGHT), 0, "an empty label leaves its band white");
        assert!(labelled_grid(&imgs, 2, &labels[..1]).is_err(), "one label per row");
    }

    #[test]
    fn labels_are_cut_with_dots_and_kept_to_the_font() {
        assert_eq!(fit_label("a red circle", |t| t.len() <= 20), "a red circle");
        assert_eq!(fit_label("a red circle", |t| t.len() <= 8), "a red...");
        assert_eq!(fit_label("caf\u{e9}\nau lait", |_| true), "caf? au lait");
    }

    #[test]
    fn written_grid_decodes_to_the_same_pixels() {
        let dir = tempfile::tempdir().unwrap();
        let imgs: Vec<RgbImage> = (0..4).map(|i| solid(5, 5, 50 * i)).collect();
        let path = dir.path().join("v/grid.png");
        write_grid(&imgs, 2, None, &path).unwrap();
        let back = image::open(&path).unwrap().to_rgb8();
        assert_eq!(back, grid(&imgs, 2).unwrap());
        assert_eq!(std::fs::read_dir(path.parent().unwrap()).unwrap().count(), 1, "no temporary file left");
    }
}
