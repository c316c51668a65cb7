//! Image tensors as files: `[3, H, W]` in [0, 1] → 8-bit RGB (diffusers' `numpy_to_pil`) → a PNG
//! written atomically.

use std::path::Path;

use anyhow::Context;
use candle_core::Tensor;

/// `[3, H, W]` in [0, 1] → 8-bit RGB as diffusers' `numpy_to_pil` (`round(x * 255)`).
pub fn to_rgb8(image: &Tensor) -> anyhow::Result<image::RgbImage> {
    let (c, h, w) = image.dims3().context("image tensor must be [3, H, W]")?;
    if c != 3 {
        anyhow::bail!("image tensor has {c} channels, expected 3 (shape {:?})", image.dims());
    }
    let hwc: Vec<f32> = image.permute((1, 2, 0))?.flatten_all()?.to_vec1()?;
    let bytes = hwc.iter().map(|v| (v.clamp(0.0, 1.0) * 255.0).round() as u8).collect();
    image::RgbImage::from_raw(w as u32, h as u32, bytes).context("building the RGB image")
}

/// Encode as PNG and write atomically (temporary file, then rename).
pub fn save_png(img: &image::RgbImage, path: &Path) -> anyhow::Result<()> {
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png).context("encoding PNG")?;
    crate::util::fs::write_atomic(path, &bytes).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn rgb8_rounds_like_numpy_to_pil() {
        let img = Tensor::new(&[[[0.0f32, 1.0]], [[0.5, 0.2]], [[1.2, -0.1]]], &Device::Cpu).unwrap(); // [3, 1, 2]
        let rgb = to_rgb8(&img).unwrap();
        assert_eq!(rgb.dimensions(), (2, 1));
        assert_eq!(rgb.get_pixel(0, 0).0, [0, 128, 255]); // 0.5*255 = 127.5 rounds away from zero
        assert_eq!(rgb.get_pixel(1, 0).0, [255, 51, 0]);
    }
}
