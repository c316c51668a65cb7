//! The CLIP BPE tokenizer (`vocab.json` + `merges.txt`, or `tokenizer.json`), padded/truncated to 77.

use std::path::Path;

use candle_core::{Device, Tensor};

pub struct ClipTokenizer {}

impl ClipTokenizer {
    /// Load from a diffusers `tokenizer/` folder.
    pub fn from_dir(_dir: &Path) -> anyhow::Result<Self> {
        todo!("models::tokenizer")
    }

    /// Token ids for one text: BOS, tokens, EOS, padded with the pad id to `max_length` (77).
    pub fn encode(&self, _text: &str) -> anyhow::Result<Vec<u32>> {
        todo!("models::tokenizer")
    }

    /// `[B, 77]` u32 ids.
    pub fn encode_batch(&self, _texts: &[&str], _device: &Device) -> anyhow::Result<Tensor> {
        todo!("models::tokenizer")
    }
}
