//! Multi-head scaled dot-product attention: the choice of implementation (`AttentionBackend`:
//! the flash kernels of `nn::flash_attention`, or the composed reference from batched 3-D matmuls
//! and a softmax with a backward, since candle's fused `softmax_last_dim` has none).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

use crate::nn::flash_attention::{chunked_attention, fused_attention};

/// Which implementation `scaled_dot_product_attention` uses, for the whole process.
///
/// Set with `set_backend`, else from the environment variable `LORA_ATTENTION`
/// (`auto`, `fused`, `chunked` or `composed`; read once), else `Auto`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttentionBackend {
    /// `Fused` on the CPU (f32, bf16, f16), `Chunked` elsewhere.
    #[default]
    Auto,
    /// The fused CPU flash-attention kernel (on other devices or dtypes: `Chunked`).
    Fused,
    /// Flash attention from tensor ops, a chunk of query rows at a time (any device).
    Chunked,
    /// The reference: full `[B·H, Lq, Lk]` scores, softmax, matmul, candle's autograd.
    Composed,
}

impl AttentionBackend {
    const ALL: [AttentionBackend; 4] = [Self::Auto, Self::Fused, Self::Chunked, Self::Composed];

    pub fn name(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Fused => "fused",
            Self::Chunked => "chunked",
            Self::Composed => "composed",
        }
    }
}

impl std::fmt::Display for AttentionBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for AttentionBackend {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|b| b.name() == s.trim().to_ascii_lowercase())
            .ok_or_else(|| format!("unknown attention backend {s:?}: expected auto, fused, chunked or composed"))
    }
}

/// 0: not set (use the environment); otherwise 1 + index in `AttentionBackend::ALL`.
static BACKEND: AtomicU8 = AtomicU8::new(0);

/// Selects the attention implementation for the whole process (overrides `LORA_ATTENTION`).
pub(crate) fn set_backend(backend: AttentionBackend) {
    let index = AttentionBackend::ALL.iter().position(|b| *b == backend).expect("every backend is in ALL");
    BACKEND.store(index as u8 + 1, Ordering::Relaxed);
}

/// The selected backend: `set_backend`'s, else `LORA_ATTENTION`'s, else `Auto`.
pub fn backend() -> Result<AttentionBackend> {
    match BACKEND.load(Ordering::Relaxed) {
        0 => {
            static FROM_ENV: OnceLock<std::result::Result<AttentionBackend, String>> = OnceLock::new();
            FROM_ENV
                .get_or_init(|| match std::env::var("LORA_ATTENTION") {
                    Ok(value) => value.parse().map_err(|e| format!("LORA_ATTENTION: {e}")),
                    Err(_) => Ok(AttentionBackend::Auto),
                })
                .clone()
                .map_err(candle_core::Error::Msg)
        }
        i => Ok(AttentionBackend::ALL[i as usize - 1]),
    }
}

/// The implementation one call runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kernel {
    Fused,
    Chunked,
    Composed,
}

/// `backend` resolved for one call: a mask always takes the composed path (the flash kernels
/// take none); the fused kernel needs the CPU and a float dtype it upcasts.
fn kernel_for(backend: AttentionBackend, on_cpu: bool, dtype: DType, masked: bool) -> Kernel {
    if masked {
        return Kernel::Composed;
    }
    match backend {
        AttentionBackend::Composed => Kernel::Composed,
        AttentionBackend::Chunked => Kernel::Chunked,
        AttentionBackend::Auto | AttentionBackend::Fused => {
            if on_cpu && matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
                Kernel::Fused
            } else {
                Kernel::Chunked
            }
        }
    }
}

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
pub(crate) fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, l, inner) = x.dims3()?;
    let d = inner / heads;
    x.reshape((b, l, heads, d))?.transpose(1, 2)?.contiguous()?.reshape((b * heads, l, d))
}

/// `[B·H, L, d]` → `[B, L, H·d]`.
pub(crate) fn merge_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (bh, l, d) = x.dims3()?;
    let b = bh / heads;
    x.reshape((b, heads, l, d))?.transpose(1, 2)?.contiguous()?.reshape((b, l, heads * d))
}

/// `softmax(q kᵀ / √d + mask) v` with heads split out of the last dimension.
///
/// `q` is `[B, Lq, H·d]`, `k` and `v` are `[B, Lk, H·d]`; `mask`, if any, is added to the
/// scores and broadcasts to `[B·H, Lq, Lk]`. With `upcast` (diffusers' `upcast_attention`/
/// `upcast_softmax`), and always for f16/bf16 inputs, scores and softmax run in f32 (the fused
/// CPU kernel always computes in f32); the result has `q`'s dtype. The implementation is the
/// process-wide `backend()`.
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
    let kernel = kernel_for(backend()?, q.device().is_cpu(), q.dtype(), mask.is_some());
    attention_with(kernel, q, k, v, heads, mask, upcast)
}

/// `scaled_dot_product_attention` with the implementation chosen (a mask needs `Composed`).
fn attention_with(kernel: Kernel, q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, mask: Option<&Tensor>, upcast: bool) -> Result<Tensor> {
    if kernel == Kernel::Composed {
        return composed_attention(q, k, v, heads, mask, upcast);
    }
    if mask.is_some() {
        candle_core::bail!("attention: the {kernel:?} kernel takes no mask")
    }
    let (_, _, inner) = q.dims3()?;
    let scale = 1.0 / ((inner / heads) as f64).sqrt();
    // Half-precision inputs always get f32 scores and softmax (torch's SDPA under autocast).
    let upcast = upcast || matches!(q.dtype(), DType::F16 | DType::BF16);
    let (qh, kh, vh) = (split_heads(q, heads)?, split_heads(k, heads)?, split_heads(v, heads)?);
    let out = match kernel {
        Kernel::Fused => fused_attention(&qh, &kh, &vh, scale)?,
        _ => chunked_attention(&qh, &kh, &vh, scale, upcast)?,
    };
    merge_heads(&out.to_dtype(q.dtype())?, heads)
}

/// The composed reference: `[B·H, Lq, Lk]` scores from a batched matmul, the softmax above,
/// a matmul with v, all through candle's autograd (the graph keeps the scores).
pub(crate) fn composed_attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, mask: Option<&Tensor>, upcast: bool) -> Result<Tensor> {
    let (_, _, inner) = q.dims3()?;
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
pub(crate) fn attend_in_chunks(qh: &Tensor, kh: &Tensor, vh: &Tensor, mask: Option<&Tensor>, chunk: usize) -> Result<Tensor> {
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

    #[test]
    fn backend_names_and_resolution() {
        for b in AttentionBackend::ALL {
            assert_eq!(b.name().parse::<AttentionBackend>(), Ok(b));
        }
        assert_eq!(" Fused ".parse::<AttentionBackend>(), Ok(AttentionBackend::Fused));
        let err = "flash".parse::<AttentionBackend>().unwrap_err();
        assert!(err.contains("\"flash\"") && err.contains("composed"), "{err}");
        use AttentionBackend as B;
        assert_eq!(kernel_for(B::Auto, true, DType::F32, false), Kernel::Fused);
        assert_eq!(kernel_for(B::Auto, true, DType::BF16, false), Kernel::Fused);
        assert_eq!(kernel_for(B::Auto, true, DType::F64, false), Kernel::Chunked);
        assert_eq!(kernel_for(B::Auto, false, DType::F32, false), Kernel::Chunked);
        assert_eq!(kernel_for(B::Fused, false, DType::F16, false), Kernel::Chunked);
        assert_eq!(kernel_for(B::Chunked, true, DType::F32, false), Kernel::Chunked);
        assert_eq!(kernel_for(B::Composed, true, DType::F32, false), Kernel::Composed);
        for b in AttentionBackend::ALL {
            assert_eq!(kernel_for(b, true, DType::F32, true), Kernel::Composed, "{b} with a mask");
        }
    }

    /// The three implementations through the multi-head entry point (head split, scale, dtype
    /// back, `upcast`): outputs and the gradients of q, k, v agree. f32: 2e-5 relative to the
    /// largest value (summation order and the fused kernel's polynomial exp); bf16: 2e-2 (the
    /// composed path rounds q·scale, the scores and the probabilities to bf16 without
    /// `upcast`, the flash kernels do not).
    #[test]
    fn kernels_agree_through_multi_head_entry() -> Result<()> {
        let dev = Device::Cpu;
        let (b, lq, lk, heads, d) = (2, 37, 29, 3, 8);
        for (dtype, upcast, tol) in [(DType::F32, false, 2e-5f32), (DType::BF16, true, 2e-2), (DType::BF16, false, 2e-2)] {
            let q = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, lq, heads * d), &dev)?.to_dtype(dtype)?)?;
            let k = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, lk, heads * d), &dev)?.to_dtype(dtype)?)?;
            let v = Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, lk, heads * d), &dev)?.to_dtype(dtype)?)?;
            let probe = Tensor::randn(0f32, 1.0, (b, lq, heads * d), &dev)?;
            let mut results = Vec::new();
            for kernel in [Kernel::Composed, Kernel::Fused, Kernel::Chunked] {
                let out = attention_with(kernel, q.as_tensor(), k.as_tensor(), v.as_tensor(), heads, None, upcast)?;
                assert_eq!(out.dtype(), dtype, "{kernel:?} output dtype");
                let grads = out.to_dtype(DType::F32)?.mul(&probe)?.sum_all()?.backward()?;
                let mut all = vec![out.to_dtype(DType::F32)?];
                for x in [&q, &k, &v] {
                    all.push(grads.get(x.as_tensor()).expect("gradient for every input").to_dtype(DType::F32)?);
                }
                results.push((kernel, all));
            }
            let (_, reference) = &results[0];
            for (kernel, ours) in &results[1..] {
                for (i, (o, r)) in ours.iter().zip(reference).enumerate() {
                    let diff = (o - r)?.abs()?.max_all()?.to_scalar::<f32>()?;
                    let scale = r.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
                    assert!(diff / scale <= tol, "{kernel:?} {dtype:?} upcast={upcast}: tensor {i} relative diff {}", diff / scale);
                }
            }
        }
        let mask = Tensor::zeros((2, 3, 3), DType::F32, &dev)?;
        let x = Tensor::zeros((2, 3, 4), DType::F32, &dev)?;
        assert!(attention_with(Kernel::Fused, &x, &x, &x, 1, Some(&mask), false).is_err());
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
        // The default backend (the fused kernel here) and the composed reference.
        let ours = scaled_dot_product_attention(&q, &k, &v, heads, None, false)?;
        let composed = composed_attention(&q, &k, &v, heads, None, false)?;
        for n in 0..b {
            for h in 0..heads {
                let qh = q.get(n)?.narrow(1, h * d, d)?;
                let kh = k.get(n)?.narrow(1, h * d, d)?;
                let vh = v.get(n)?.narrow(1, h * d, d)?;
                let scores = (qh.matmul(&kh.t()?)? / (d as f64).sqrt())?;
                let expect = candle_nn::ops::softmax_last_dim(&scores)?.matmul(&vh)?;
                for got in [&ours, &composed] {
                    let got = got.get(n)?.narrow(1, h * d, d)?;
                    let diff = (got - &expect)?.abs()?.max_all()?.to_scalar::<f32>()?;
                    // Tolerance 1e-5 absolute (f32 rounding only).
                    assert!(diff < 1e-5, "batch {n} head {h}: diff {diff}");
                }
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

    /// Half precision in the shapes of the deep UNet blocks (1×1 and 2×2 latents: one or four
    /// query tokens, self- and cross-attention): every kernel's q, k, v gradients against the
    /// composed ops in f32 on the same rounded inputs, within 2e-2 of the largest value (bf16
    /// keeps 8 bits; the gradients pass through a few bf16 roundings).
    #[test]
    fn half_precision_gradients_in_tiny_blocks() -> Result<()> {
        let dev = Device::Cpu;
        for &(lq, lk) in &[(1usize, 1usize), (1, 77), (4, 4), (4, 77)] {
            let (b, heads, d) = (2, 2, 8);
            let mk = |l: usize| Tensor::randn(0f32, 1.0, (b, l, heads * d), &dev).and_then(|t| t.to_dtype(DType::BF16));
            let (q, k) = (mk(lq)?, mk(if lk == lq { lq } else { lk })?);
            let v = mk(lk)?;
            let k = if lk == lq { k } else { k };
            let probe = Tensor::randn(0f32, 1.0, (b, lq, heads * d), &dev)?;
            let grads = |kernel: Kernel, dtype: DType| -> Result<Vec<Tensor>> {
                let (qv, kv, vv) = (Var::from_tensor(&q.to_dtype(dtype)?)?, Var::from_tensor(&k.to_dtype(dtype)?)?, Var::from_tensor(&v.to_dtype(dtype)?)?);
                let out = attention_with(kernel, qv.as_tensor(), kv.as_tensor(), vv.as_tensor(), heads, None, false)?;
                let g = out.to_dtype(DType::F32)?.mul(&probe)?.sum_all()?.backward()?;
                [qv, kv, vv].iter().map(|x| g.get(x.as_tensor()).expect("gradient").to_dtype(DType::F32)).collect()
            };
            let reference = grads(Kernel::Composed, DType::F32)?;
            for kernel in [Kernel::Fused, Kernel::Chunked, Kernel::Composed] {
                let ours = grads(kernel, DType::BF16)?;
                for (name, (a, r)) in ["q", "k", "v"].iter().zip(ours.iter().zip(&reference)) {
                    let scale = r.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-3);
                    let diff = (a - r)?.abs()?.max_all()?.to_scalar::<f32>()?;
                    assert!(diff <= 2e-2 * scale, "{kernel:?} bf16 d{name} for Lq {lq}, Lk {lk}: {diff} vs max {scale}");
                }
            }
        }
        Ok(())
    }
}
