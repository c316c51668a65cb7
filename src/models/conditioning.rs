//! What the UNet is conditioned on besides the noisy latents and the timestep: one value that
//! the text side produces, the encode cache stores, the trainer and the samplers pass, and the
//! UNet consumes. SD 1.x/2.x use only the context; SDXL adds the pooled text embedding and the
//! size-and-crop time ids.

use candle_core::{DType, Device, Result, Tensor};

/// The UNet's conditioning for a batch of `B` images.
#[derive(Clone, Debug)]
pub struct Conditioning {
    /// Token embeddings `[B, L, cross_attention_dim]` the cross-attention reads
    /// (`encoder_hidden_states`).
    pub context: Tensor,
    /// SDXL: the pooled text embedding `[B, P]` (`added_cond_kwargs["text_embeds"]`).
    pub pooled: Option<Tensor>,
    /// SDXL: `[B, 6]` = original height, width, crop top, left, target height, width
    /// (`added_cond_kwargs["time_ids"]`).
    pub time_ids: Option<Tensor>,
}

impl Conditioning {
    /// A context alone (SD 1.x/2.x).
    pub fn context(context: Tensor) -> Self {
        Self { context, pooled: None, time_ids: None }
    }

    /// The batch size.
    pub fn batch(&self) -> Result<usize> {
        self.context.dim(0)
    }

    /// The same with `time_ids` `[B, 6]` attached.
    pub fn with_time_ids(mut self, time_ids: Tensor) -> Self {
        self.time_ids = Some(time_ids);
        self
    }

    fn map(&self, f: impl Fn(&Tensor) -> Result<Tensor>) -> Result<Self> {
        Ok(Self {
            context: f(&self.context)?,
            pooled: self.pooled.as_ref().map(&f).transpose()?,
            time_ids: self.time_ids.as_ref().map(&f).transpose()?,
        })
    }

    /// Every part in `dtype`.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        self.map(|t| t.to_dtype(dtype))
    }

    /// Every part on `device`.
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        self.map(|t| t.to_device(device))
    }

    /// Every part detached from the graph (frozen encoders, cached values).
    pub fn detach(&self) -> Self {
        self.map(|t| Ok(t.detach())).expect("detach cannot fail")
    }

    /// Row `i` of every part, keeping the batch axis (`[1, …]`).
    pub fn row(&self, i: usize) -> Result<Self> {
        self.map(|t| t.narrow(0, i, 1))
    }

    /// Rows concatenated along the batch axis (all rows must have the same parts).
    pub fn cat(rows: &[&Conditioning]) -> Result<Self> {
        let first = rows.first().ok_or_else(|| candle_core::Error::Msg("no conditioning rows to concatenate".into()))?;
        let part = |get: &dyn Fn(&Conditioning) -> Option<&Tensor>| -> Result<Option<Tensor>> {
            match get(first) {
                None => {
                    if rows.iter().any(|r| get(r).is_some()) {
                        candle_core::bail!("conditioning rows differ in their parts")
                    }
                    Ok(None)
                }
                Some(_) => {
                    let parts = rows
                        .iter()
                        .map(|r| get(r).ok_or_else(|| candle_core::Error::Msg("conditioning rows differ in their parts".into())))
                        .collect::<Result<Vec<_>>>()?;
                    Ok(Some(Tensor::cat(&parts, 0)?))
                }
            }
        };
        Ok(Self {
            context: Tensor::cat(&rows.iter().map(|r| &r.context).collect::<Vec<_>>(), 0)?,
            pooled: part(&|c| c.pooled.as_ref())?,
            time_ids: part(&|c| c.time_ids.as_ref())?,
        })
    }

    /// The cached form of the text part: the context row, then the pooled row when there is one.
    pub fn text_parts(&self) -> Vec<&Tensor> {
        std::iter::once(&self.context).chain(self.pooled.as_ref()).collect()
    }

    /// The inverse of [`Self::text_parts`] for one row (`[L, D]` and `[P]`, no batch axis).
    pub fn from_text_parts(mut parts: Vec<Tensor>) -> Option<Self> {
        match parts.len() {
            1 => Some(Self::context(parts.remove(0))),
            2 => {
                let pooled = parts.pop();
                Some(Self { context: parts.remove(0), pooled, time_ids: None })
            }
            _ => None,
        }
    }

    /// Rows without a batch axis stacked into a batch.
    pub fn stack(rows: &[Conditioning]) -> Result<Self> {
        let with_batch = rows.iter().map(|r| r.map(|t| t.unsqueeze(0))).collect::<Result<Vec<_>>>()?;
        Self::cat(&with_batch.iter().collect::<Vec<_>>())
    }

    /// Row `i` without the batch axis.
    pub fn get(&self, i: usize) -> Result<Self> {
        self.map(|t| t.get(i))
    }
}

/// SDXL's `time_ids` for one image: `[orig_h, orig_w, crop_top, crop_left, target_h, target_w]`.
pub fn time_ids(original: (usize, usize), crop_top_left: (usize, usize), target: (usize, usize)) -> [f32; 6] {
    [original.0 as f32, original.1 as f32, crop_top_left.0 as f32, crop_top_left.1 as f32, target.0 as f32, target.1 as f32]
}
