//! Preprocessing as the reference's torchvision transforms on PIL images: resize the shorter
//! side (PIL's resampling filters, re-implemented to the bit), center or random crop, horizontal
//! flip, `ToTensor` + `Normalize(0.5, 0.5)` to CHW f32 in [-1, 1].

use image::RgbImage;
use rand::RngExt;

/// PIL / torchvision interpolation modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Interpolation {
    Nearest,
    Box,
    Bilinear,
    Hamming,
    Bicubic,
    /// The reference script's default (`--image_interpolation_mode lanczos`).
    #[default]
    Lanczos,
}

impl Interpolation {
    /// torchvision's lowercase name (`nearest`, `bilinear`, ...). `nearest_exact` maps to
    /// `Nearest`, as torchvision does for PIL images.
    pub(crate) fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "nearest" | "nearest_exact" => Self::Nearest,
            "box" => Self::Box,
            "bilinear" => Self::Bilinear,
            "hamming" => Self::Hamming,
            "bicubic" => Self::Bicubic,
            "lanczos" => Self::Lanczos,
            _ => return None,
        })
    }

    /// PIL's filter and its support (in source pixels at scale 1); `None` for nearest.
    fn filter(self) -> Option<(fn(f64) -> f64, f64)> {
        match self {
            Self::Nearest => None,
            Self::Box => Some((box_filter, 0.5)),
            Self::Bilinear => Some((bilinear_filter, 1.0)),
            Self::Hamming => Some((hamming_filter, 1.0)),
            Self::Bicubic => Some((bicubic_filter, 2.0)),
            Self::Lanczos => Some((lanczos_filter, 3.0)),
        }
    }
}

/// `CenterCrop(res)` or `RandomCrop(res)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CropMode {
    Center,
    /// The reference's default (`--center_crop` off).
    #[default]
    Random,
}

/// The preprocessing of one image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PreprocessOptions {
    /// Side of the square output.
    pub resolution: u32,
    pub crop: CropMode,
    /// Probability of a horizontal flip (`--random_flip` gives 0.5, off is 0).
    pub flip_p: f64,
    pub interpolation: Interpolation,
    /// Flip the resized image before cropping it, as diffusers' SDXL script does (the SD 1.x
    /// script crops, then flips); the recorded crop offset is then in the flipped image.
    pub flip_before_crop: bool,
}

impl Default for PreprocessOptions {
    fn default() -> Self {
        Self { resolution: 512, crop: CropMode::Random, flip_p: 0.0, interpolation: Interpolation::Lanczos, flip_before_crop: false }
    }
}

/// Where an example's pixels came from, for SDXL's time ids: the original image size and the
/// crop's top-left corner in the resized (and, with `flip_before_crop`, flipped) image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Geometry {
    /// (height, width) of the decoded image.
    pub original: (u32, u32),
    /// (top, left) of the crop.
    pub crop_top_left: (u32, u32),
}

/// The random part of one image's preprocessing, drawn before it is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Augmentation {
    /// Crop offset in the resized image.
    pub top: u32,
    pub left: u32,
    pub flip: bool,
}

/// torchvision's `Resize(int)` output size: the shorter side becomes `resolution`, the longer
/// `int(resolution * long / short)`. Returns (width, height).
pub fn resized_size(width: u32, height: u32, resolution: u32) -> (u32, u32) {
    let (short, long) = if width <= height { (width, height) } else { (height, width) };
    let new_long = (resolution as f64 * long as f64 / short as f64) as u32;
    if width <= height { (resolution, new_long) } else { (new_long, resolution) }
}

/// torchvision's `CenterCrop` offset: `int(round((size - crop) / 2))` with Python's
/// round-half-to-even.
pub fn center_crop_offset(size: u32, crop: u32) -> u32 {
    ((size as f64 - crop as f64) / 2.0).round_ties_even().max(0.0) as u32
}

/// The output of one image's preprocessing: the size it is resized to and the size it is then
/// cropped to, both (width, height). Without buckets, the shorter side resized to the resolution
/// and a square crop; with buckets, the image's bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    pub resized: (u32, u32),
    pub crop: (u32, u32),
    /// Center crops at `floor((size - crop) / 2)` as kohya's bucketed crop, instead of
    /// torchvision's round-half-to-even.
    pub floor_center: bool,
}

impl Target {
    /// torchvision's `Resize(res)` + a `res`² crop of a `width` x `height` image.
    pub fn square(width: u32, height: u32, resolution: u32) -> Self {
        Self { resized: resized_size(width, height, resolution), crop: (resolution, resolution), floor_center: false }
    }
}

/// Draw the crop offset and flip for a resized image of `width` x `height`.
pub fn draw_augmentation(width: u32, height: u32, opts: &PreprocessOptions, rng: &mut impl rand::Rng) -> Augmentation {
    let res = opts.resolution;
    let target = Target { resized: (width, height), crop: (res, res), floor_center: false };
    draw_augmentation_for(&target, opts, rng)
}

/// Draw the crop offset (top first, then left) and the flip for `target`.
pub fn draw_augmentation_for(target: &Target, opts: &PreprocessOptions, rng: &mut impl rand::Rng) -> Augmentation {
    let ((width, height), (cw, ch)) = (target.resized, target.crop);
    let (top, left) = match opts.crop {
        CropMode::Center if target.floor_center => (height.saturating_sub(ch) / 2, width.saturating_sub(cw) / 2),
        CropMode::Center => (center_crop_offset(height, ch), center_crop_offset(width, cw)),
        CropMode::Random => {
            let top = rng.random_range(0..=height.saturating_sub(ch));
            let left = rng.random_range(0..=width.saturating_sub(cw));
            (top, left)
        }
    };
    let flip = opts.flip_p > 0.0 && rng.random::<f64>() < opts.flip_p;
    Augmentation { top, left, flip }
}

/// Resize, crop and flip one image with randomness from `rng`; CHW f32 in [-1, 1], length
/// `3 * resolution²`.
pub fn preprocess(image: &RgbImage, opts: &PreprocessOptions, rng: &mut impl rand::Rng) -> anyhow::Result<Vec<f32>> {
    Ok(preprocess_with_geometry(image, opts, rng)?.0)
}

/// [`preprocess`], also returning the original size and crop offset of the example.
pub fn preprocess_with_geometry(image: &RgbImage, opts: &PreprocessOptions, rng: &mut impl rand::Rng) -> anyhow::Result<(Vec<f32>, Geometry)> {
    let (w, h) = image.dimensions();
    anyhow::ensure!(w > 0 && h > 0, "cannot resize an empty {w}x{h} image");
    anyhow::ensure!(opts.resolution > 0, "resolution must be positive");
    preprocess_to(image, &Target::square(w, h, opts.resolution), opts, rng)
}

/// Resize `image` to `target.resized`, crop `target.crop` and flip, drawing from `rng`; CHW f32
/// in [-1, 1] of the crop's size, and the example's original size and crop offset.
pub fn preprocess_to(image: &RgbImage, target: &Target, opts: &PreprocessOptions, rng: &mut impl rand::Rng) -> anyhow::Result<(Vec<f32>, Geometry)> {
    let (w, h) = image.dimensions();
    anyhow::ensure!(w > 0 && h > 0, "cannot resize an empty {w}x{h} image");
    let ((rw, rh), (cw, ch)) = (target.resized, target.crop);
    anyhow::ensure!(cw > 0 && ch > 0 && rw >= cw && rh >= ch, "cannot crop {cw}x{ch} out of {rw}x{rh}");
    let aug = draw_augmentation_for(target, opts, rng);
    // Resize only the crop: the same pixels as resizing everything, then cropping.
    let width = cw.min(rw - aug.left);
    // Cropping the flipped image at `left` takes the mirrored window of the unflipped one.
    let left = if opts.flip_before_crop && aug.flip { rw - width - aug.left } else { aug.left };
    let window = Window { left, top: aug.top, width, height: ch.min(rh - aug.top) };
    let cropped = if (w, h) == (rw, rh) {
        image::imageops::crop_imm(image, window.left, window.top, window.width, window.height).to_image()
    } else {
        pil_resize_window(image, rw, rh, opts.interpolation, window)
    };
    let geometry = Geometry { original: (h, w), crop_top_left: (aug.top, aug.left) };
    Ok((crop_flip_to_chw_sized(&cropped, (cw, ch), Augmentation { top: 0, left: 0, flip: aug.flip }), geometry))
}

/// `Resize(resolution)` of torchvision on a PIL image.
pub fn resize_shorter_side(image: &RgbImage, resolution: u32, interpolation: Interpolation) -> anyhow::Result<RgbImage> {
    let (w, h) = image.dimensions();
    anyhow::ensure!(w > 0 && h > 0, "cannot resize an empty {w}x{h} image");
    anyhow::ensure!(resolution > 0, "resolution must be positive");
    let (nw, nh) = resized_size(w, h, resolution);
    Ok(pil_resize(image, nw, nh, interpolation))
}

/// Crop `resolution²` at the augmentation's offset, flip if asked, and apply `ToTensor` +
/// `Normalize(0.5, 0.5)`: `(v / 255 - 0.5) / 0.5` in f32, CHW.
pub fn crop_flip_to_chw(image: &RgbImage, resolution: u32, aug: Augmentation) -> Vec<f32> {
    crop_flip_to_chw_sized(image, (resolution, resolution), aug)
}

/// [`crop_flip_to_chw`] for a `width` x `height` crop.
pub fn crop_flip_to_chw_sized(image: &RgbImage, (width, height): (u32, u32), aug: Augmentation) -> Vec<f32> {
    let (cw, ch) = (width as usize, height as usize);
    let (w, h) = (image.width() as usize, image.height() as usize);
    let plane = cw * ch;
    let mut out = vec![0f32; 3 * plane];
    let raw = image.as_raw();
    for y in 0..ch {
        let sy = y + aug.top as usize;
        for x in 0..cw {
            let cx = if aug.flip { cw - 1 - x } else { x };
            let sx = cx + aug.left as usize;
            // torchvision pads a crop larger than the image with zeros (black); never happens after
            // the shorter-side resize, kept for completeness.
            let pixel = if sy < h && sx < w { &raw[(sy * w + sx) * 3..(sy * w + sx) * 3 + 3] } else { &[0, 0, 0][..] };
            for c in 0..3 {
                out[c * plane + y * cw + x] = (pixel[c] as f32 / 255.0 - 0.5) / 0.5;
            }
        }
    }
    out
}

// ---- PIL's resampling (Pillow `libImaging/Resample.c`, `Geometry.c`), 8 bits per channel ----

/// Fixed-point precision of PIL's 8-bit convolution coefficients.
const PRECISION_BITS: u32 = 32 - 8 - 2;

fn box_filter(x: f64) -> f64 {
    if x > -0.5 && x <= 0.5 { 1.0 } else { 0.0 }
}

fn bilinear_filter(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 { 1.0 - x } else { 0.0 }
}

fn hamming_filter(x: f64) -> f64 {
    let x = x.abs();
    if x == 0.0 {
        1.0
    } else if x >= 1.0 {
        0.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x * (0.54 + 0.46 * x.cos())
    }
}

fn bicubic_filter(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

fn sinc_filter(x: f64) -> f64 {
    if x == 0.0 {
        1.0
    } else {
        let x = x * std::f64::consts::PI;
        x.sin() / x
    }
}

fn lanczos_filter(x: f64) -> f64 {
    if (-3.0..3.0).contains(&x) { sinc_filter(x) * sinc_filter(x / 3.0) } else { 0.0 }
}

/// The taps of one output pixel: first source index and fixed-point weights.
struct Taps {
    start: usize,
    weights: Vec<i32>,
}

/// PIL's `precompute_coeffs` + `normalize_coeffs_8bpc` for resizing `in_size` to `out_size`:
/// the filter support grows with the downscale factor (antialiasing), weights are normalised
/// to sum 1 and rounded to 22-bit fixed point.
fn precompute_taps(in_size: usize, out_size: usize, filter: fn(f64) -> f64, support: f64) -> Vec<Taps> {
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = support * filterscale;
    let ss = 1.0 / filterscale;
    (0..out_size)
        .map(|xx| {
            let center = (xx as f64 + 0.5) * scale;
            // C's (int) cast truncates toward zero.
            let xmin = ((center - support + 0.5).trunc() as i64).max(0) as usize;
            let xmax = ((center + support + 0.5).trunc() as i64).min(in_size as i64) as usize;
            let count = xmax.saturating_sub(xmin);
            let raw: Vec<f64> = (0..count).map(|x| filter(((x + xmin) as f64 - center + 0.5) * ss)).collect();
            let total: f64 = raw.iter().sum();
            let one = (1u32 << PRECISION_BITS) as f64;
            let weights = raw
                .iter()
                .map(|&w| {
                    let w = if total != 0.0 { w / total } else { w };
                    if w < 0.0 { (-0.5 + w * one).trunc() as i32 } else { (0.5 + w * one).trunc() as i32 }
                })
                .collect();
            Taps { start: xmin, weights }
        })
        .collect()
}

/// PIL's `clip8`: drop the fixed-point fraction (floor) and clamp to 0..=255.
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// PIL's `Image.resize((width, height), filter)` for an RGB image (no `box`, no
/// `reducing_gap`): a horizontal pass, then a vertical pass, each skipped when that side keeps
/// its size; 8-bit rounding between the passes.
pub fn pil_resize(image: &RgbImage, width: u32, height: u32, interpolation: Interpolation) -> RgbImage {
    pil_resize_window(image, width, height, interpolation, Window { left: 0, top: 0, width, height })
}

/// A rectangle of a resized image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Window {
    pub left: u32,
    pub top: u32,
    pub width: u32,
    pub height: u32,
}

/// The `window` of `pil_resize(image, width, height, interpolation)`, computing only the output
/// pixels inside it (each output pixel depends only on its own taps, so the values are the
/// same as resizing everything and cropping).
pub(crate) fn pil_resize_window(image: &RgbImage, width: u32, height: u32, interpolation: Interpolation, window: Window) -> RgbImage {
    let (in_w, in_h) = (image.width() as usize, image.height() as usize);
    let (out_w, out_h) = (width as usize, height as usize);
    let (x0, y0, win_w, win_h) = (window.left as usize, window.top as usize, window.width as usize, window.height as usize);
    assert!(x0 + win_w <= out_w && y0 + win_h <= out_h, "window {window:?} outside {width}x{height}");
    let Some((filter, support)) = interpolation.filter() else {
        return pil_nearest(image, width, height, window);
    };
    let half = 1i32 << (PRECISION_BITS - 1);

    // Vertical taps first: they say which source rows the horizontal pass must produce.
    let vertical: Vec<Taps> = if out_h != in_h {
        precompute_taps(in_h, out_h, filter, support).into_iter().skip(y0).take(win_h).collect()
    } else {
        (y0..y0 + win_h).map(|y| Taps { start: y, weights: Vec::new() }).collect()
    };
    let row_first = vertical.iter().map(|t| t.start).min().unwrap_or(0);
    let row_end = vertical.iter().map(|t| t.start + t.weights.len().max(1)).max().unwrap_or(0);

    // Horizontal pass over source rows row_first..row_end, output columns x0..x0+win_w.
    let src = image.as_raw();
    let rows = row_end - row_first;
    let mut horiz = vec![0u8; rows * win_w * 3];
    if out_w != in_w {
        let taps: Vec<Taps> = precompute_taps(in_w, out_w, filter, support).into_iter().skip(x0).take(win_w).collect();
        for r in 0..rows {
            let row = &src[(row_first + r) * in_w * 3..(row_first + r + 1) * in_w * 3];
            let out_row = &mut horiz[r * win_w * 3..(r + 1) * win_w * 3];
            for (t, out) in taps.iter().zip(out_row.chunks_exact_mut(3)) {
                let mut acc = [half; 3];
                let pixels = &row[t.start * 3..(t.start + t.weights.len()) * 3];
                for (p, &w) in pixels.chunks_exact(3).zip(&t.weights) {
                    acc[0] += p[0] as i32 * w;
                    acc[1] += p[1] as i32 * w;
                    acc[2] += p[2] as i32 * w;
                }
                out[0] = clip8(acc[0]);
                out[1] = clip8(acc[1]);
                out[2] = clip8(acc[2]);
            }
        }
    } else {
        for r in 0..rows {
            let row = &src[(row_first + r) * in_w * 3..(row_first + r + 1) * in_w * 3];
            horiz[r * win_w * 3..(r + 1) * win_w * 3].copy_from_slice(&row[x0 * 3..(x0 + win_w) * 3]);
        }
    }

    // Vertical pass: each output row is a weighted sum of whole rows.
    let line = win_w * 3;
    let mut out = vec![0u8; win_h * line];
    if out_h != in_h {
        let mut acc = vec![0i32; line];
        for (t, out_row) in vertical.iter().zip(out.chunks_exact_mut(line)) {
            acc.fill(half);
            for (k, &w) in t.weights.iter().enumerate() {
                let r = t.start + k - row_first;
                for (a, &v) in acc.iter_mut().zip(&horiz[r * line..(r + 1) * line]) {
                    *a += v as i32 * w;
                }
            }
            for (o, &a) in out_row.iter_mut().zip(&acc) {
                *o = clip8(a);
            }
        }
    } else {
        out.copy_from_slice(&horiz[(y0 - row_first) * line..(y0 - row_first + win_h) * line]);
    }
    RgbImage::from_raw(window.width, window.height, out).expect("buffer sized for the window")
}

/// PIL's nearest-neighbour resize (`ImagingScaleAffine`): source coordinate
/// `floor(scale * (x + 0.5))`, accumulated by repeated addition as PIL does.
fn pil_nearest(image: &RgbImage, width: u32, height: u32, window: Window) -> RgbImage {
    let coords = |in_size: u32, out_size: u32| -> Vec<u32> {
        let a = in_size as f64 / out_size as f64;
        let mut pos = a * 0.5;
        (0..out_size)
            .map(|_| {
                let v = if pos < 0.0 { 0 } else { (pos as u32).min(in_size - 1) };
                pos += a;
                v
            })
            .collect()
    };
    let xs = coords(image.width(), width);
    let ys = coords(image.height(), height);
    RgbImage::from_fn(window.width, window.height, |x, y| {
        *image.get_pixel(xs[(x + window.left) as usize], ys[(y + window.top) as usize])
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_size_and_center_offsets_follow_torchvision() {
        assert_eq!(resized_size(80, 72, 64), (71, 64)); // int(64 * 80 / 72) = int(71.1)
        assert_eq!(resized_size(64, 96, 64), (64, 96));
        assert_eq!(resized_size(50, 70, 32), (32, 44)); // int(44.8)
        assert_eq!(center_crop_offset(71, 64), 4); // round(3.5) = 4 (ties to even)
        assert_eq!(center_crop_offset(69, 64), 2); // round(2.5) = 2 (ties to even)
        assert_eq!(center_crop_offset(96, 64), 16);
    }

    #[test]
    fn taps_sum_to_one_in_fixed_point() {
        for (filter, support) in [(bilinear_filter as fn(f64) -> f64, 1.0), (lanczos_filter, 3.0), (bicubic_filter, 2.0)] {
            for (i, o) in [(80, 71), (100, 13), (13, 100)] {
                for t in precompute_taps(i, o, filter, support) {
                    let s: i32 = t.weights.iter().sum();
                    assert!((s - (1 << PRECISION_BITS)).abs() <= t.weights.len() as i32, "sum {s}");
                }
            }
        }
    }
}
