//! Decoding images to RGB8 as PIL's `Image.open(...).convert("RGB")` does: PNG, JPEG, WebP; every
//! mode (L, LA, P, RGBA, CMYK JPEG, 16-bit); a pixel limit and an aspect-ratio limit checked on
//! the header before decoding; and the pass that finds every bad image before training.

use std::io::Cursor;

use image::{DynamicImage, ImageReader, RgbImage};
use rayon::prelude::*;

use super::source::{Dataset, Example, ImageData};

/// PIL's `Image.MAX_IMAGE_PIXELS` (`1024 * 1024 * 1024 // 4 // 3`).
pub(crate) const DEFAULT_MAX_IMAGE_PIXELS: u64 = 89_478_485;

/// Longest side accepted, as a multiple of the shortest. Preprocessing resizes the shorter side
/// to the resolution, so a 1 x 2,000,000 image would become 512 x 1,024,000,000 pixels: such an
/// image is refused from its header, before anything is decoded or allocated.
pub(crate) const MAX_ASPECT_RATIO: u64 = 16;

/// How images are decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Images with more pixels than this are refused before decoding (`None`: no limit).
    pub max_image_pixels: Option<u64>,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        Self { max_image_pixels: Some(DEFAULT_MAX_IMAGE_PIXELS) }
    }
}

/// What to do with an image that cannot be decoded (`on_bad_image`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnBadImage {
    /// Stop before training with an error listing every bad file.
    #[default]
    Error,
    /// Drop the bad examples, log them and report them.
    Skip,
}

/// Why an image could not be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: {reason}")]
pub struct BadImage {
    /// The file (or `file.parquet row N`).
    pub origin: String,
    /// What is wrong: empty, not an image, truncated or corrupt, too large, unreadable.
    pub reason: String,
}

/// Decode encoded image bytes to RGB8. `origin` names the data in errors.
pub fn decode_rgb8(bytes: &[u8], origin: &str, opts: &DecodeOptions) -> Result<RgbImage, BadImage> {
    let bad = |reason: String| BadImage { origin: origin.to_string(), reason };
    if bytes.is_empty() {
        return Err(bad("empty file".into()));
    }
    let reader = || ImageReader::new(Cursor::new(bytes)).with_guessed_format().expect("reading from memory");
    let format = reader().format();
    if format.is_none() {
        return Err(bad("not an image (the content is not PNG, JPEG or WebP)".into()));
    }
    let (width, height) = match png_header_dimensions(bytes) {
        Some(dims) => dims,
        None => reader().into_dimensions().map_err(|e| bad(format!("unreadable image header: {e}")))?,
    };
    let pixels = width as u64 * height as u64;
    if pixels == 0 {
        return Err(bad(format!("no pixels: the header says {width} x {height}")));
    }
    let (short, long) = (width.min(height) as u64, width.max(height) as u64);
    if long > MAX_ASPECT_RATIO * short {
        return Err(bad(format!(
            "too elongated: {width} x {height}; resizing its shorter side to the training resolution would make the longer side \
             {} times the resolution (at most {MAX_ASPECT_RATIO} is accepted)",
            long / short
        )));
    }
    if let Some(limit) = opts.max_image_pixels {
        if pixels > limit {
            return Err(bad(format!(
                "too large: {width} x {height} = {pixels} pixels exceeds the limit of {limit} (max_image_pixels)"
            )));
        }
    }
    let mut r = reader();
    r.no_limits();
    let image = r.decode().map_err(|e| bad(format!("truncated or corrupt image data: {e}")))?;
    Ok(to_rgb8_like_pil(image))
}

/// A PNG's size from its `IHDR` chunk alone (the image crate reads up to the first `IDAT` to
/// report dimensions, so a file that is only a header would look truncated, not too large).
fn png_header_dimensions(bytes: &[u8]) -> Option<(u32, u32)> {
    const SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";
    if bytes.len() < 24 || &bytes[..8] != SIGNATURE || &bytes[12..16] != b"IHDR" {
        return None;
    }
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    Some((be(&bytes[16..20]), be(&bytes[20..24])))
}

/// One example's (width, height) from its header alone (nothing is decoded).
pub fn image_size(example: &Example, _opts: &DecodeOptions) -> Result<(u32, u32), BadImage> {
    let bad = |reason: String| BadImage { origin: example.origin.clone(), reason };
    match &example.image {
        ImageData::Bytes(bytes) => match png_header_dimensions(bytes) {
            Some(dims) => Ok(dims),
            None => ImageReader::new(Cursor::new(&bytes[..])).with_guessed_format().expect("reading from memory").into_dimensions(),
        },
        ImageData::File(path) => ImageReader::open(path)
            .and_then(|r| r.with_guessed_format())
            .map_err(image::ImageError::IoError)
            .and_then(|r| r.into_dimensions()),
    }
    .map_err(|e| bad(format!("unreadable image header: {e}")))
}

/// Read and decode one example's image.
pub fn decode_example(example: &Example, opts: &DecodeOptions) -> Result<RgbImage, BadImage> {
    match &example.image {
        ImageData::Bytes(bytes) => decode_rgb8(bytes, &example.origin, opts),
        ImageData::File(path) => {
            // A named pipe or a device would block or never end.
            if let Ok(meta) = std::fs::metadata(path) {
                if !meta.is_file() && !meta.is_dir() {
                    let what = crate::util::file_kind::special_file_kind(&meta.file_type());
                    return Err(BadImage { origin: example.origin.clone(), reason: format!("not a regular file: it is {what}") });
                }
            }
            let bytes = std::fs::read(path)
                .map_err(|e| BadImage { origin: example.origin.clone(), reason: format!("cannot read the file: {e}") })?;
            decode_rgb8(&bytes, &example.origin, opts)
        }
    }
}

/// PIL's `convert("RGB")`: alpha is dropped (not composited), palettes expanded, 16-bit colour
/// keeps the high byte (PIL reads 16-bit RGB/RGBA/LA PNGs as 8-bit that way), and 16-bit
/// greyscale (`I;16`) is clipped to 255 as PIL's `I16_RGB` does. CMYK JPEGs arrive as RGB from
/// the decoder.
pub(crate) fn to_rgb8_like_pil(image: DynamicImage) -> RgbImage {
    let high_byte = |v: u16| (v >> 8) as u8;
    match image {
        DynamicImage::ImageRgb8(img) => img,
        DynamicImage::ImageLuma16(img) => {
            let (w, h) = img.dimensions();
            RgbImage::from_fn(w, h, |x, y| {
                let v = img.get_pixel(x, y)[0].min(255) as u8;
                image::Rgb([v, v, v])
            })
        }
        DynamicImage::ImageLumaA16(img) => {
            let (w, h) = img.dimensions();
            RgbImage::from_fn(w, h, |x, y| {
                let v = high_byte(img.get_pixel(x, y)[0]);
                image::Rgb([v, v, v])
            })
        }
        DynamicImage::ImageRgb16(img) => {
            let (w, h) = img.dimensions();
            RgbImage::from_fn(w, h, |x, y| {
                let p = img.get_pixel(x, y);
                image::Rgb([high_byte(p[0]), high_byte(p[1]), high_byte(p[2])])
            })
        }
        DynamicImage::ImageRgba16(img) => {
            let (w, h) = img.dimensions();
            RgbImage::from_fn(w, h, |x, y| {
                let p = img.get_pixel(x, y);
                image::Rgb([high_byte(p[0]), high_byte(p[1]), high_byte(p[2])])
            })
        }
        // L, LA, RGBA (alpha dropped, as PIL), float: the image crate's conversion.
        other => other.to_rgb8(),
    }
}

/// Decode every example once, in parallel, and return the bad ones (in dataset order).
pub fn check_all(dataset: &Dataset, opts: &DecodeOptions) -> Vec<BadImage> {
    let results: Vec<Option<BadImage>> =
        dataset.examples.par_iter().map(|ex| decode_example(ex, opts).err()).collect();
    results.into_iter().flatten().collect()
}

/// Apply the `on_bad_image` policy before training: with `Error`, fail listing every bad image;
/// with `Skip`, return the dataset without them and the list of what was skipped (each logged).
pub fn screen_dataset(
    mut dataset: Dataset,
    opts: &DecodeOptions,
    policy: OnBadImage,
) -> anyhow::Result<(Dataset, Vec<BadImage>)> {
    let bad = check_all(&dataset, opts);
    if bad.is_empty() {
        return Ok((dataset, bad));
    }
    match policy {
        OnBadImage::Error => {
            let list: Vec<String> = bad.iter().map(|b| format!("  {b}")).collect();
            anyhow::bail!(
                "{} bad image(s) in dataset {} (set on_bad_image = \"skip\" to leave them out):\n{}",
                bad.len(),
                dataset.description,
                list.join("\n")
            )
        }
        OnBadImage::Skip => {
            for b in &bad {
                tracing::warn!("skipping {b}");
            }
            let bad_origins: std::collections::HashSet<&str> = bad.iter().map(|b| b.origin.as_str()).collect();
            dataset.examples.retain(|e| !bad_origins.contains(e.origin.as_str()));
            if dataset.is_empty() {
                anyhow::bail!("every image of dataset {} is bad ({} skipped)", dataset.description, bad.len());
            }
            Ok((dataset, bad))
        }
    }
}
