//! Multi-head scaled dot-product attention composed from batched 3-D matmuls and a softmax
//! with a backward (candle's fused `softmax_last_dim` has none).

use candle_core::{DType, Result, Tensor, D};

/// Softmax over the last dimension: `exp(x - max) / sum`. The max is detached: it cancels out
/// mathematically, so it needs no gradient.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let num = x.broadcast_sub(&max)?.exp()?;
    let den = num.sum_keepdim(D::Minus1)?;
    num.broadcast_div(&den)
}

/// `[B, L, H·d]` → `[B·H, L, d]`.
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, l, inner) = x.dims3()?;
    let d = inner / heads;
    x.reshape((b, l, heads, d))?.transpose(1, 2)?.contiguous()?.reshape((b * heads, l, d))
}

/// `[B·H, L, d]` → `[B, L, H·d]`.
pub fn merge_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (bh, l, d) = x.dims3()?;
    let b = bh / heads;
    x.reshape((b, heads, l, d))?.transpose(1, 2)?.contiguous()?.reshape((b, l, heads * d))
}

/// `softmax(q kᵀ / √d + mask) v` with heads split out of the last dimension.
///
/// `q` is `[B, Lq, H·d]`, `k` and `v` are `[B, Lk, H·d]`; `mask`, if any, is added to the
/// scores and broadcasts to `[B·H, Lq, Lk]`. With `upcast`, scores and softmax run in f32
/// (diffusers' `upcast_attention`/`upcast_softmax`); the result has `q`'s dtype.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
    upcast: bool,
) -> Result<Tensor> {
    let (_, _, inner) = q.dims3()?;
    if heads == 0 || inner % heads != 0 {
        candle_core::bail!("attention: width {inner} is not divisible into {heads} heads")
    }
    let scale = 1.0 / ((inner / heads) as f64).sqrt();
    let dtype = q.dtype();
    let (qh, kh, vh) = (split_heads(q, heads)?, split_heads(k, heads)?, split_heads(v, heads)?);
    let (qh, kh) = if upcast && dtype != DType::F32 {
        (qh.to_dtype(DType::F32)?, kh.to_dtype(DType::F32)?)
    } else {
        (qh, kh)
    };
    let mut scores = (qh.matmul(&kh.t()?)? * scale)?;
    if let Some(mask) = mask {
        scores = scores.broadcast_add(&mask.to_dtype(scores.dtype())?)?;
    }
    let probs = softmax_last_dim(&scores)?.to_dtype(vh.dtype())?;
    merge_heads(&probs.matmul(&vh)?, heads)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn softmax_equals_candle_and_has_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 3.0, (4, 7), &dev)?;
        let ours = softmax_last_dim(x.as_tensor())?;
        let reference = candle_nn::ops::softmax_last_dim(x.as_tensor())?;
        let diff = (&ours - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
        // Tolerance 1e-6 absolute on probabilities (f32 rounding only).
        assert!(diff < 1e-6, "softmax diff {diff}");
        let grads = ours.mul(&Tensor::randn(0f32, 1.0, (4, 7), &dev)?)?.sum_all()?.backward()?;
        assert!(grads.get(x.as_tensor()).is_some(), "softmax passes a gradient");
        Ok(())
    }

    /// Multi-head attention against a per-head loop computed with plain 2-D matmuls.
    #[test]
    fn attention_matches_per_head_loop() -> Result<()> {
        let dev = Device::Cpu;
        let (b, lq, lk, heads, d) = (2, 5, 3, 2, 4);
        let q = Tensor::randn(0f32, 1.0, (b, lq, heads * d), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (b, lk, heads * d), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (b, lk, heads * d), &dev)?;
        let ours = scaled_dot_product_attention(&q, &k, &v, heads, None, false)?;
        for n in 0..b {
            for h in 0..heads {
                let qh = q.get(n)?.narrow(1, h * d, d)?;
                let kh = k.get(n)?.narrow(1, h * d, d)?;
                let vh = v.get(n)?.narrow(1, h * d, d)?;
                let scores = (qh.matmul(&kh.t()?)? / (d as f64).sqrt())?;
                let expect = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&vh)?;
                let got = ours.get(n)?.narrow(1, h * d, d)?;
                let diff = (got - expect)?.abs()?.max_all()?.to_scalar::<f32>()?;
                // Tolerance 1e-5 absolute (f32 rounding only).
                assert!(diff < 1e-5, "batch {n} head {h}: diff {diff}");
            }
        }
        Ok(())
    }
}
