//! Decoding: PIL's `convert("RGB")` for every mode (alpha dropped, not composited; palettes;
//! 16-bit), PNG / JPEG / WebP, the header pixel limit, the bad files of `datasets/bad/`, and the
//! check-all / skip pass.

use std::io::Cursor;
use std::path::PathBuf;
use std::time::Instant;

use image::{DynamicImage, ImageBuffer, ImageFormat, Luma, LumaA, Rgb, Rgba};
use lora::data::decode::{check_all, decode_example, decode_rgb8, screen_dataset, DecodeOptions, OnBadImage};
use lora::data::source::{Caption, Dataset, Example, ImageData};

fn fixture(rel: &str) -> PathBuf {
    crate::support::repo_root().join("tests/fixtures/datasets").join(rel)
}

fn encode(img: DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, format).unwrap();
    out.into_inner()
}

fn decode(bytes: &[u8]) -> image::RgbImage {
    decode_rgb8(bytes, "test image", &DecodeOptions::default()).unwrap()
}

#[test]
fn modes_convert_to_rgb_like_pil() {
    // L: grey replicated.
    let l = ImageBuffer::from_fn(3, 2, |x, y| Luma([(x * 50 + y * 7) as u8]));
    let rgb = decode(&encode(DynamicImage::ImageLuma8(l), ImageFormat::Png));
    assert_eq!(rgb.get_pixel(2, 1), &Rgb([107, 107, 107]));
    // LA and RGBA: alpha is dropped, the colour under a transparent pixel is kept (no white).
    let la = ImageBuffer::from_fn(2, 2, |_, _| LumaA([90u8, 0]));
    assert_eq!(decode(&encode(DynamicImage::ImageLumaA8(la), ImageFormat::Png)).get_pixel(0, 0), &Rgb([90, 90, 90]));
    let rgba = ImageBuffer::from_fn(2, 2, |x, _| Rgba([10u8, 20, 30, if x == 0 { 0 } else { 128 }]));
    let rgb = decode(&encode(DynamicImage::ImageRgba8(rgba), ImageFormat::Png));
    assert_eq!(rgb.get_pixel(0, 0), &Rgb([10, 20, 30]));
    assert_eq!(rgb.get_pixel(1, 1), &Rgb([10, 20, 30]));
    // 16-bit RGB: PIL keeps the high byte.
    let rgb16 = ImageBuffer::from_fn(2, 1, |x, _| Rgb([0x12ffu16, 0xab01, if x == 0 { 0x00ff } else { 0xffff }]));
    let rgb = decode(&encode(DynamicImage::ImageRgb16(rgb16), ImageFormat::Png));
    assert_eq!(rgb.get_pixel(0, 0), &Rgb([0x12, 0xab, 0x00]));
    assert_eq!(rgb.get_pixel(1, 0), &Rgb([0x12, 0xab, 0xff]));
    // 16-bit grey (PIL mode I;16): values are clipped to 255, not scaled (PIL's I16_RGB).
    let l16 = ImageBuffer::from_fn(3, 1, |x, _| Luma([[7u16, 255, 4000][x as usize]]));
    let rgb = decode(&encode(DynamicImage::ImageLuma16(l16), ImageFormat::Png));
    assert_eq!((rgb.get_pixel(0, 0)[0], rgb.get_pixel(1, 0)[0], rgb.get_pixel(2, 0)[0]), (7, 255, 255));
}

#[test]
fn palette_png_expands_and_drops_transparency() {
    let mut bytes = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut bytes, 2, 1);
        enc.set_color(png::ColorType::Indexed);
        enc.set_depth(png::BitDepth::Eight);
        enc.set_palette(vec![255u8, 0, 0, 0, 0, 255]);
        enc.set_trns(vec![0u8, 255]);
        let mut w = enc.write_header().unwrap();
        w.write_image_data(&[0, 1]).unwrap();
    }
    let rgb = decode(&bytes);
    assert_eq!(rgb.get_pixel(0, 0), &Rgb([255, 0, 0]), "transparent palette entry keeps its colour");
    assert_eq!(rgb.get_pixel(1, 0), &Rgb([0, 0, 255]));
}

#[test]
fn png_jpeg_webp_all_decode() {
    let img = DynamicImage::ImageRgb8(ImageBuffer::from_fn(16, 8, |x, y| Rgb([(x * 16) as u8, (y * 30) as u8, 128])));
    for format in [ImageFormat::Png, ImageFormat::WebP] {
        let rgb = decode(&encode(img.clone(), format));
        assert_eq!(rgb.as_raw(), img.to_rgb8().as_raw(), "{format:?} is lossless");
    }
    let jpeg = decode(&encode(img.clone(), ImageFormat::Jpeg));
    assert_eq!(jpeg.dimensions(), (16, 8));
    // Tolerance: JPEG is lossy; mean abs difference under 8 levels.
    let mean: f64 = jpeg.as_raw().iter().zip(img.to_rgb8().as_raw()).map(|(a, b)| (*a as f64 - *b as f64).abs()).sum::<f64>() / (16.0 * 8.0 * 3.0);
    assert!(mean < 8.0, "jpeg mean abs diff {mean} (tolerance 8 levels)");
    // The fixture folder's JPEGs decode too.
    let ex = Example { image: ImageData::File(fixture("shapes-folder/train/0000.jpg")), caption: Caption::One(String::new()), origin: "0000.jpg".into(), group: 0 };
    assert_eq!(decode_example(&ex, &DecodeOptions::default()).unwrap().dimensions(), (96, 64));
}

#[test]
fn pixel_limit_is_checked_before_decoding() {
    let img = DynamicImage::ImageRgb8(ImageBuffer::from_pixel(30, 20, Rgb([1u8, 2, 3])));
    let bytes = encode(img, ImageFormat::Png);
    let err = decode_rgb8(&bytes, "small.png", &DecodeOptions { max_image_pixels: Some(599) }).unwrap_err();
    assert!(err.reason.contains("600 pixels") && err.reason.contains("599"), "{err}");
    assert!(decode_rgb8(&bytes, "small.png", &DecodeOptions { max_image_pixels: Some(600) }).is_ok());
    assert!(decode_rgb8(&bytes, "small.png", &DecodeOptions { max_image_pixels: None }).is_ok());
}

fn bad_dataset() -> Dataset {
    let mut examples = Vec::new();
    for name in ["empty.png", "huge-header.png", "not-an-image.png", "truncated.png"] {
        let path = fixture(&format!("bad/{name}"));
        examples.push(Example { origin: path.display().to_string(), image: ImageData::File(path), caption: Caption::One("x".into()), group: 0 });
    }
    for name in ["0001.png", "0003.jpg"] {
        let path = fixture(&format!("shapes-folder/train/{name}"));
        examples.push(Example { origin: path.display().to_string(), image: ImageData::File(path), caption: Caption::One("ok".into()), group: 0 });
    }
    Dataset { examples, description: "bad + good".into(), groups: Vec::new() }
}

#[test]
fn each_bad_file_fails_fast_with_its_reason() {
    let ds = bad_dataset();
    let start = Instant::now();
    let reasons: Vec<String> = ds.examples[..4]
        .iter()
        .map(|e| decode_example(e, &DecodeOptions::default()).unwrap_err().to_string())
        .collect();
    assert!(start.elapsed().as_secs_f64() < 2.0, "bad files took {:?}; the huge header must not be decoded", start.elapsed());
    let expect = [("empty.png", "empty file"), ("huge-header.png", "too large"), ("not-an-image.png", "not an image"), ("truncated.png", "truncated")];
    for (msg, (file, reason)) in reasons.iter().zip(expect) {
        assert!(msg.contains(file) && msg.contains(reason), "expected {file}: {reason}, got: {msg}");
    }
    assert!(reasons[1].contains("100000 x 100000"), "{}", reasons[1]);
}

#[test]
fn check_all_finds_every_bad_file_and_skip_mode_drops_them() {
    let ds = bad_dataset();
    let bad = check_all(&ds, &DecodeOptions::default());
    assert_eq!(bad.len(), 4, "{bad:?}");
    let err = format!("{:#}", screen_dataset(ds.clone(), &DecodeOptions::default(), OnBadImage::Error).unwrap_err());
    for name in ["empty.png", "huge-header.png", "not-an-image.png", "truncated.png"] {
        assert!(err.contains(name), "error should list {name}: {err}");
    }
    assert!(err.contains("4 bad image"), "{err}");
    let (kept, skipped) = screen_dataset(ds, &DecodeOptions::default(), OnBadImage::Skip).unwrap();
    assert_eq!(kept.len(), 2);
    assert_eq!(skipped.len(), 4);
    assert!(kept.examples.iter().all(|e| e.caption == Caption::One("ok".into())));
    // Only bad images: skipping leaves nothing, which is an error.
    let mut only_bad = bad_dataset();
    only_bad.examples.truncate(4);
    let err = screen_dataset(only_bad, &DecodeOptions::default(), OnBadImage::Skip).unwrap_err().to_string();
    assert!(err.contains("every image"), "{err}");
}

/// A PNG that is only a signature and an `IHDR` chunk declaring `width` x `height` (the CRC is not
/// checked before decoding).
fn png_header_only(width: u32, height: u32) -> Vec<u8> {
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    out.extend_from_slice(&13u32.to_be_bytes());
    out.extend_from_slice(b"IHDR");
    out.extend_from_slice(&width.to_be_bytes());
    out.extend_from_slice(&height.to_be_bytes());
    out.extend_from_slice(&[8, 0, 0, 0, 0, 0, 0, 0, 0]);
    out
}

#[test]
fn elongated_images_are_refused_from_the_header_before_anything_is_allocated() {
    // 1 x 100,000,000 is under the pixel limit (178,956,970) but resizing its shorter side to
    // 512 would ask for 512 x 51,200,000,000 pixels.
    let err = decode_rgb8(&png_header_only(1, 100_000_000), "strip.png", &DecodeOptions::default()).unwrap_err();
    assert!(err.reason.starts_with("too elongated: 1 x 100000000"), "{err}");
    assert!(err.to_string().starts_with("strip.png: "), "{err}");
    let err = decode_rgb8(&png_header_only(0, 10), "empty-dims.png", &DecodeOptions::default()).unwrap_err();
    assert!(err.reason.contains("no pixels"), "{err}");

    // The bound is 16:1 either way round: 16 x 1 decodes, 17 x 1 and 1 x 17 do not.
    let ok = encode(DynamicImage::ImageLuma8(ImageBuffer::from_pixel(16, 1, Luma([9u8]))), ImageFormat::Png);
    assert_eq!(decode(&ok).dimensions(), (16, 1));
    for (w, h) in [(17, 1), (1, 17), (34, 2)] {
        let bytes = encode(DynamicImage::ImageLuma8(ImageBuffer::from_pixel(w, h, Luma([9u8]))), ImageFormat::Png);
        let err = decode_rgb8(&bytes, "x.png", &DecodeOptions::default()).unwrap_err();
        assert!(err.reason.contains("too elongated") && err.reason.contains("at most 16"), "{w}x{h}: {err}");
    }

    // A real 1 x 2,000,000 PNG (a few KB) among good images: `skip` leaves it out at once, and
    // `error` names it.
    let dir = tempfile::tempdir().unwrap();
    let strip = dir.path().join("strip.png");
    ImageBuffer::from_pixel(1, 2_000_000, Luma([128u8])).save(&strip).unwrap();
    let mut ds = bad_dataset();
    ds.examples.drain(..4);
    ds.examples.push(Example { origin: strip.display().to_string(), image: ImageData::File(strip.clone()), caption: Caption::One("x".into()), group: 0 });
    let start = Instant::now();
    let (kept, skipped) = screen_dataset(ds.clone(), &DecodeOptions::default(), OnBadImage::Skip).unwrap();
    assert!(start.elapsed().as_secs_f64() < 2.0, "screening took {:?}", start.elapsed());
    assert_eq!((kept.len(), skipped.len()), (2, 1));
    assert_eq!(skipped[0].origin, strip.display().to_string());
    let err = format!("{:#}", screen_dataset(ds, &DecodeOptions::default(), OnBadImage::Error).unwrap_err());
    assert!(err.contains(&format!("{}: too elongated: 1 x 2000000", strip.display())), "{err}");
}

#[cfg(unix)]
#[test]
fn a_named_pipe_among_the_images_is_a_bad_image_not_a_hang() {
    use std::os::unix::ffi::OsStrExt;
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("pipe.png");
    let c = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0);
    let ex = Example { origin: fifo.display().to_string(), image: ImageData::File(fifo.clone()), caption: Caption::One("x".into()), group: 0 };
    // Nobody writes to the pipe: reading it would block for ever.
    let err = decode_example(&ex, &DecodeOptions::default()).unwrap_err();
    assert_eq!(err.reason, "not a regular file: it is a named pipe (FIFO)");
}
