//! Single-file checkpoints (the A1111 / ComfyUI / civitai `.safetensors` in the original LDM
//! layout) and separate VAE files: `header` reads a file's tensor list, `names` maps LDM names to
//! diffusers names, `recognition` tells SD 1.x / 2.x, the network configs and the prediction
//! type from them, `bundled` supplies the tokenizer and scheduler configs, `weights` opens the
//! renamed weights. Here: a `[model]` table's single file recognised and checked in one call.

pub(crate) mod bundled;
pub mod header;
pub mod names;
pub mod recognition;
pub mod weights;

use header::Header;
use recognition::{recognise, Recognition, SingleFileOptions};
use weights::open_weights;

/// Recognise the local single file of a `[model]` table (`None` when there is none, or it is a
/// hub file not yet downloaded); every tensor must be accounted for.
pub(crate) fn recognise_config(m: &crate::config::ModelConfig) -> Option<anyhow::Result<Recognition>> {
    let file = m.file.as_ref().filter(|f| f.is_file())?;
    let opts = SingleFileOptions {
        config_dir: m.config.clone(),
        prediction_type: m.prediction_type,
        ema: m.ema,
    };
    Some((|| {
        let header = Header::read(file)?;
        let mut rec = recognise(file, &header, &opts)?;
        open_weights(&mut rec, &header, m.vae.is_none())?;
        Ok(rec)
    })())
}
