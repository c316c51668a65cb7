//! What the report's pictures share: the embedded font their text is drawn with (registered
//! once with plotters) and PNG encoding.

use anyhow::{anyhow, Context, Result};
use image::RgbImage;
use plotters::style::FontStyle;

/// The font every text of the plot uses (see `assets/fonts/LICENSE`).
static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans-ascii.ttf");
pub(crate) const FAMILY: &str = "sans-serif";

pub(crate) fn register_font() -> Result<()> {
    static DONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *DONE.get_or_init(|| plotters::style::register_font(FAMILY, FontStyle::Normal, FONT).is_ok());
    if ok {
        Ok(())
    } else {
        Err(anyhow!("the embedded plot font (assets/fonts/DejaVuSans-ascii.ttf) does not parse"))
    }
}

/// PNG bytes of `img`.
pub(crate) fn encode_png(img: &RgbImage) -> Result<Vec<u8>> {
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png).context("encoding PNG")?;
    Ok(bytes)
}
