//! Preprocessing parity with the reference: `golden/vae.safetensors` `raw_i` (HWC uint8) through
//! Resize(64) + CenterCrop(64) (+ flip of image 1) + ToTensor + Normalize, bilinear and lanczos,
//! and PIL's resampling on a synthetic image checked against an independent f64 convolution.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use image::RgbImage;
use lora::data::transform::{
    center_crop_offset, crop_flip_to_chw, pil_resize, resize_shorter_side, Augmentation, Interpolation,
};

fn golden() -> HashMap<String, Tensor> {
    let path = crate::support::repo_root().join("tests/fixtures/golden/vae.safetensors");
    candle_core::safetensors::load(path, &Device::Cpu).unwrap()
}

fn raw_image(t: &Tensor) -> RgbImage {
    let (h, w, c) = t.dims3().unwrap();
    assert_eq!(c, 3);
    RgbImage::from_raw(w as u32, h as u32, t.flatten_all().unwrap().to_vec1::<u8>().unwrap()).unwrap()
}

/// Returns (max error in [-1,1] units, number of elements off by more than 1e-6).
fn compare_with_golden(interpolation: Interpolation, key: &str) -> (f32, usize) {
    let g = golden();
    let want: Vec<Vec<f32>> = (0..3)
        .map(|i| g[key].get(i).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap())
        .collect();
    let mut worst = 0f32;
    let mut off = 0;
    for i in 0..3 {
        let img = raw_image(&g[&format!("raw_{i}")]);
        let resized = resize_shorter_side(&img, 64, interpolation).unwrap();
        let aug = Augmentation {
            top: center_crop_offset(resized.height(), 64),
            left: center_crop_offset(resized.width(), 64),
            flip: i == 1,
        };
        let ours = crop_flip_to_chw(&resized, 64, aug);
        assert_eq!(ours.len(), want[i].len());
        for (a, b) in ours.iter().zip(&want[i]) {
            let d = (a - b).abs();
            worst = worst.max(d);
            if d > 1e-6 {
                off += 1;
            }
        }
    }
    (worst, off)
}

#[test]
fn bilinear_matches_torchvision_pil() {
    let (worst, off) = compare_with_golden(Interpolation::Bilinear, "pixel_values");
    eprintln!("bilinear: max |diff| {worst} in [-1,1] units, {off} values differ");
    // Tolerance: 1/255 in pixel units = 2/255 after the x*2-1 scaling.
    assert!(worst <= 2.0 / 255.0 + 1e-6, "bilinear max diff {worst} > 2/255 (1/255 in pixel units)");
    // PIL's fixed-point arithmetic is reproduced exactly, so today every value agrees to 1e-6.
    assert_eq!(off, 0, "bilinear: {off} values differ from PIL by more than 1e-6");
}

#[test]
fn lanczos_matches_torchvision_pil() {
    let (worst, off) = compare_with_golden(Interpolation::Lanczos, "pixel_values_lanczos");
    eprintln!("lanczos: max |diff| {worst} in [-1,1] units, {off} values differ");
    // Tolerance: 1/255 in pixel units = 2/255 after the x*2-1 scaling.
    assert!(worst <= 2.0 / 255.0 + 1e-6, "lanczos max diff {worst} > 2/255 (1/255 in pixel units)");
    // PIL's fixed-point arithmetic is reproduced exactly, so today every value agrees to 1e-6.
    assert_eq!(off, 0, "lanczos: {off} values differ from PIL by more than 1e-6");
}

/// An independent float implementation of the antialiased separable resize (the filter's support
/// scaled by the downscale factor, weights normalised), rounded once per pass.
fn reference_resize(img: &RgbImage, w: u32, h: u32, filter: fn(f64) -> f64, support: f64) -> RgbImage {
    fn pass(src: &[f64], n_in: usize, n_out: usize, lines: usize, stride_in: (usize, usize), filter: fn(f64) -> f64, support: f64) -> Vec<f64> {
        // src indexed by (line, pos) with strides (line stride, pos stride); output laid out [line][pos].
        let scale = n_in as f64 / n_out as f64;
        let fs = scale.max(1.0);
        let mut out = vec![0.0; lines * n_out * 3];
        for l in 0..lines {
            for o in 0..n_out {
                let center = (o as f64 + 0.5) * scale;
                let mut acc = [0.0; 3];
                let mut total = 0.0;
                for i in 0..n_in {
                    let wgt = filter((i as f64 + 0.5 - center) / fs);
                    if (i as f64 + 0.5 - center).abs() > support * fs + 0.5 {
                        continue;
                    }
                    total += wgt;
                    for c in 0..3 {
                        acc[c] += wgt * src[(l * stride_in.0 + i * stride_in.1) * 3 + c];
                    }
                }
                for c in 0..3 {
                    out[(l * n_out + o) * 3 + c] = (acc[c] / total).round().clamp(0.0, 255.0);
                }
            }
        }
        out
    }
    let (iw, ih) = (img.width() as usize, img.height() as usize);
    let src: Vec<f64> = img.as_raw().iter().map(|&v| v as f64).collect();
    // Horizontal: lines are rows.
    let horiz = pass(&src, iw, w as usize, ih, (iw, 1), filter, support);
    // Vertical: lines are columns of the horizontally resized image; output [col][row].
    let vert = pass(&horiz, ih, h as usize, w as usize, (1, w as usize), filter, support);
    RgbImage::from_fn(w, h, |x, y| {
        let i = (x as usize * h as usize + y as usize) * 3;
        image::Rgb([vert[i] as u8, vert[i + 1] as u8, vert[i + 2] as u8])
    })
}

#[test]
fn resize_agrees_with_an_independent_float_convolution() {
    let img = RgbImage::from_fn(97, 61, |x, y| image::Rgb([((x * 7 + y * 3) % 256) as u8, ((x * x + y) % 256) as u8, if (x / 8 + y / 8) % 2 == 0 { 250 } else { 5 }]));
    let tri = |x: f64| (1.0 - x.abs()).max(0.0);
    for (w, h) in [(40, 25), (150, 90), (97, 30)] {
        let ours = pil_resize(&img, w, h, Interpolation::Bilinear);
        let reference = reference_resize(&img, w, h, tri, 1.0);
        let worst = ours.as_raw().iter().zip(reference.as_raw()).map(|(a, b)| (*a as i32 - *b as i32).abs()).max().unwrap();
        // Tolerance: 1 level (fixed-point vs float weights, rounding between passes).
        assert!(worst <= 1, "{w}x{h}: max diff {worst} levels > 1");
    }
    // Nearest picks source pixel floor((x + 0.5) * scale).
    let near = pil_resize(&img, 48, 30, Interpolation::Nearest);
    for (x, y) in [(0u32, 0u32), (47, 29), (13, 7)] {
        let sx = ((x as f64 + 0.5) * 97.0 / 48.0) as u32;
        let sy = ((y as f64 + 0.5) * 61.0 / 30.0) as u32;
        assert_eq!(near.get_pixel(x, y), img.get_pixel(sx, sy), "nearest at ({x},{y})");
    }
}

/// `preprocess` resizes only the crop window; it must equal resizing everything and cropping.
#[test]
fn windowed_resize_equals_full_resize_then_crop() {
    use lora::data::rng::{rng_for, Stream};
    use lora::data::transform::{draw_augmentation, preprocess, resized_size, CropMode, PreprocessOptions};
    let img = RgbImage::from_fn(90, 57, |x, y| image::Rgb([((x * 13 + y * 5) % 256) as u8, ((x * y) % 256) as u8, ((x + 3 * y) % 256) as u8]));
    for interpolation in [Interpolation::Nearest, Interpolation::Bilinear, Interpolation::Bicubic, Interpolation::Lanczos, Interpolation::Box, Interpolation::Hamming] {
        for (resolution, crop, seed) in [(32, CropMode::Random, 1), (32, CropMode::Random, 2), (40, CropMode::Center, 0), (57, CropMode::Random, 3), (64, CropMode::Random, 4)] {
            let opts = PreprocessOptions { resolution, crop, flip_p: 0.5, interpolation, flip_before_crop: false };
            let ours = preprocess(&img, &opts, &mut rng_for(seed, Stream::Augment, 0, 0)).unwrap();
            let (rw, rh) = resized_size(90, 57, resolution);
            let aug = draw_augmentation(rw, rh, &opts, &mut rng_for(seed, Stream::Augment, 0, 0));
            let full = resize_shorter_side(&img, resolution, interpolation).unwrap();
            assert_eq!((full.width(), full.height()), (rw, rh));
            let expected = crop_flip_to_chw(&full, resolution, aug);
            assert_eq!(ours, expected, "{interpolation:?} res {resolution} {crop:?} seed {seed}");
        }
    }
}
