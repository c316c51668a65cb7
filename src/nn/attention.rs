//! Multi-head scaled dot-product attention from batched 3-D matmuls and a softmax with a
//! backward (candle's fused `softmax_last_dim` has none).

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

/// Softmax over the last dimension, with a backward.
///
/// f32 on CPU runs one fused, parallel pass per row instead of five full passes over the
/// `[B·H, L, L]` attention scores (and the graph keeps two such tensors, not five); other
/// devices and dtypes use composed ops.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return x.contiguous()?.apply_op1(FusedSoftmax);
    }
    softmax_last_dim_composed(x)
}

/// `exp(x - max) / sum` from candle ops, each with a backward; the max is detached since it
/// cancels out.
pub fn softmax_last_dim_composed(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let num = x.broadcast_sub(&max)?.exp()?;
    let den = num.sum_keepdim(D::Minus1)?;
    num.broadcast_div(&den)
}

/// The CPU f32 softmax kernel (per row: max, `exp(x - max)`, sum, divide) with softmax's
/// Jacobian as its backward: `dx = y ⊙ (dy − Σ dy ⊙ y)`.
struct FusedSoftmax;

impl CustomOp1 for FusedSoftmax {
    fn name(&self) -> &'static str {
        "lora-softmax-last-dim"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else { candle_core::bail!("fused softmax: only f32") };
        let Some((start, end)) = layout.contiguous_offsets() else { candle_core::bail!("fused softmax: input must be contiguous") };
        let src = &data[start..end];
        let row = layout.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut dst = vec![0f32; src.len()];
        src.par_chunks(row).zip(dst.par_chunks_mut(row)).for_each(|(src, dst)| {
            let max = src.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (d, s) in dst.iter_mut().zip(src) {
                *d = (s - max).exp();
                sum += *d;
            }
            let inv = 1.0 / sum;
            dst.iter_mut().for_each(|d| *d *= inv);
        });
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let weighted = grad_res.mul(res)?;
        let total = weighted.sum_keepdim(D::Minus1)?;
        Ok(Some(weighted.sub(&res.broadcast_mul(&total)?)?))
    }
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
/// scores and broadcasts to `[B·H, Lq, Lk]`. With `upcast` (diffusers' `upcast_attention`/
/// `upcast_softmax`), and always for f16/bf16 inputs, scores and softmax run in f32; the result
/// has `q`'s dtype.
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
    // Half-precision inputs always get f32 scores and softmax, as torch's SDPA kernels compute
    // them under autocast.
    let upcast = upcast || matches!(dtype, DType::F16 | DType::BF16);
    // Scaling q (L·d values) rather than the scores (L·L values) is cheaper and equal.
    let (qh, kh, vh) = (split_heads(&(q * scale)?, heads)?, split_heads(k, heads)?, split_heads(v, heads)?);
    let (qh, kh) = if upcast && dtype != DType::F32 {
        (qh.to_dtype(DType::F32)?, kh.to_dtype(DType::F32)?)
    } else {
        (qh, kh)
    };
    // Without gradients (inference) the `[B·H, Lq, Lk]` scores are computed a slice of heads
    // at a time once they would pass MAX_SCORES_ELEMENTS; with gradients the graph keeps them
    // all anyway.
    let (bh, lq, _) = qh.dims3()?;
    let lk = kh.dim(1)?;
    let tracked = q.track_op() || k.track_op() || v.track_op();
    let chunk = if tracked { bh } else { (MAX_SCORES_ELEMENTS / (lq * lk).max(1)).clamp(1, bh) };
    merge_heads(&attend_in_chunks(&qh, &kh, &vh, mask, chunk)?, heads)
}

/// Largest attention-score tensor (elements) computed at once without gradients: 256 MiB of f32.
const MAX_SCORES_ELEMENTS: usize = 1 << 26;

/// `softmax(q kᵀ + mask) v` on `[B·H, L, d]` tensors, `chunk` rows of the first dimension at a
/// time (a rank-3 mask with that first dimension is sliced alongside).
pub fn attend_in_chunks(qh: &Tensor, kh: &Tensor, vh: &Tensor, mask: Option<&Tensor>, chunk: usize) -> Result<Tensor> {
    let bh = qh.dim(0)?;
    let attend = |start: usize, len: usize| -> Result<Tensor> {
        let (q, k, v) = if len == bh { (qh.clone(), kh.clone(), vh.clone()) } else { (qh.narrow(0, start, len)?, kh.narrow(0, start, len)?, vh.narrow(0, start, len)?) };
        let mut scores = q.matmul(&k.t()?)?;
        if let Some(mask) = mask {
            let mask = if mask.rank() == 3 && mask.dim(0)? == bh && len != bh { mask.narrow(0, start, len)? } else { mask.clone() };
            scores = scores.broadcast_add(&mask.to_dtype(scores.dtype())?)?;
        }
        softmax_last_dim(&scores)?.to_dtype(v.dtype())?.matmul(&v)
    };
    let chunk = chunk.max(1);
    if chunk >= bh {
        return attend(0, bh);
    }
    let parts = (0..bh).step_by(chunk).map(|start| attend(start, chunk.min(bh - start))).collect::<Result<Vec<_>>>()?;
    Tensor::cat(&parts, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn softmax_equals_candle_and_has_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 3.0, (4, 3, 7), &dev)?;
        let probe = Tensor::randn(0f32, 1.0, (4, 3, 7), &dev)?;
        let reference = candle_nn::ops::softmax_last_dim(x.as_tensor())?;
        let mut grads = Vec::new();
        for softmax in [softmax_last_dim, softmax_last_dim_composed] {
            let ours = softmax(x.as_tensor())?;
            let diff = (&ours - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            // Tolerance 1e-6 absolute on probabilities (f32 rounding only).
            assert!(diff < 1e-6, "softmax diff {diff}");
            let g = ours.mul(&probe)?.sum_all()?.backward()?;
            grads.push(g.get(x.as_tensor()).expect("softmax passes a gradient").clone());
        }
        // The fused backward equals the backward of the composed ops (1e-6 absolute).
        let diff = (&grads[0] - &grads[1])?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6, "fused vs composed softmax gradient diff {diff}");
        let strided = softmax_last_dim(&x.as_tensor().transpose(1, 2)?)?;
        let expect = candle_nn::ops::softmax_last_dim(&x.as_tensor().transpose(1, 2)?.contiguous()?)?;
        assert!((strided - expect)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-6);
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
        // Slicing the heads (as inference does for large scores) changes nothing.
        let (qh, kh, vh) = (split_heads(&q, heads)?, split_heads(&k, heads)?, split_heads(&v, heads)?);
        let mask = Tensor::randn(0f32, 1.0, (b * heads, lq, lk), &dev)?;
        let whole = attend_in_chunks(&qh, &kh, &vh, Some(&mask), b * heads)?;
        let sliced = attend_in_chunks(&qh, &kh, &vh, Some(&mask), 3)?;
        assert_eq!((whole - sliced)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }
}
