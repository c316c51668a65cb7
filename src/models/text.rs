//! The text side of a model: a list of (tokenizer, text encoder) pairs (one for SD 1.x/2.x,
//! two for SDXL) with the one encode function that turns prompts into the UNet's
//! [`Conditioning`], by the family's rule.

use candle_core::{Device, Tensor};

use super::{ClipTextModel, ClipTokenizer, Conditioning};
use crate::vocab::Family;

/// One tokenizer and the text encoder that reads its ids.
pub struct TextPair {
    pub tokenizer: ClipTokenizer,
    pub encoder: ClipTextModel,
}

impl TextPair {
    /// Where the encoder's weights are (the CPU while parked).
    pub fn device(&self) -> Device {
        self.encoder.token_embedding.device().clone()
    }
}

/// How a family turns its encoders' outputs into the context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContextRule {
    /// SD 1.x/2.x: the (only) encoder's last hidden state after the final layer norm.
    LastHiddenState,
    /// SDXL: every encoder's penultimate hidden state, concatenated along the features; the
    /// pooled embedding is the last encoder's projected output.
    PenultimateConcat,
}

impl ContextRule {
    pub fn of(family: Family) -> Self {
        match family {
            Family::Sd1 | Family::Sd2 => ContextRule::LastHiddenState,
            Family::Sdxl => ContextRule::PenultimateConcat,
        }
    }
}

/// Every (tokenizer, encoder) pair of a model and its rule.
pub struct TextSide {
    pub pairs: Vec<TextPair>,
    pub rule: ContextRule,
}

impl TextSide {
    /// The conditioning for `texts` (no time ids), computed where the encoders are and moved to
    /// `device`. Keeps the graph (an encoder may carry trained LoRA branches).
    pub fn encode(&self, texts: &[&str], device: &Device) -> anyhow::Result<Conditioning> {
        let ids = self
            .pairs
            .iter()
            .map(|p| p.tokenizer.encode_batch(texts, &p.device()))
            .collect::<anyhow::Result<Vec<_>>>()?;
        self.encode_ids(&ids, device)
    }

    /// [`Self::encode`] from token ids `[B, 77]`, one tensor per pair.
    pub fn encode_ids(&self, ids: &[Tensor], device: &Device) -> anyhow::Result<Conditioning> {
        anyhow::ensure!(ids.len() == self.pairs.len(), "{} token-id tensors for {} text encoders", ids.len(), self.pairs.len());
        match self.rule {
            ContextRule::LastHiddenState => {
                let hidden = self.pairs[0].encoder.forward(&ids[0])?;
                Ok(Conditioning::context(hidden.to_device(device)?))
            }
            ContextRule::PenultimateConcat => {
                // Every encoder's penultimate state; only the last one's final layer and pooled
                // output are read (the others' last layers would be computed for nothing).
                let last = self.pairs.len() - 1;
                let mut contexts = Vec::with_capacity(self.pairs.len());
                for (pair, ids) in self.pairs[..last].iter().zip(ids) {
                    contexts.push(pair.encoder.forward_penultimate(ids)?.to_device(device)?);
                }
                let out = self.pairs[last].encoder.forward_all(&ids[last])?;
                contexts.push(out.penultimate.to_device(device)?);
                let pooled = out.text_embeds.ok_or_else(|| anyhow::anyhow!("the last text encoder has no text_projection for the pooled embedding"))?;
                Ok(Conditioning { context: Tensor::cat(&contexts, candle_core::D::Minus1)?, pooled: Some(pooled.to_device(device)?), time_ids: None })
            }
        }
    }

    /// The encoders' LoRA-targetable linears, one list per encoder.
    pub fn linears_mut(&mut self) -> Vec<Vec<&mut crate::nn::AdaptedLinear>> {
        self.pairs.iter_mut().map(|p| p.encoder.linears_mut()).collect()
    }

    /// Every encoder's linears in one list (to clear LoRA branches and the like).
    pub fn all_linears_mut(&mut self) -> Vec<&mut crate::nn::AdaptedLinear> {
        self.pairs.iter_mut().flat_map(|p| p.encoder.linears_mut()).collect()
    }

    /// Where the first encoder is.
    pub fn device(&self) -> Device {
        self.pairs[0].device()
    }
}
