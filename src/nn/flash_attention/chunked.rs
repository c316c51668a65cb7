//! The device-agnostic flash attention: forward and backward from ordinary candle tensor ops, a
//! chunk of query rows at a time, so it runs on any device (the GPU path) while the peak score
//! memory is one chunk. The backward is attached through a `CustomOp3(q, k, v)` whose forward
//! hands back the output computed beforehand (on detached inputs, no graph kept).

// `cuda_fwd` is compiled under this crate's `cuda` feature, which the GPU build declares.
#![allow(unexpected_cfgs)]

use std::sync::Mutex;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, D};

use super::{Geometry, CHUNK_SCORE_ELEMENTS};

/// `softmax(scale · q kᵀ) v` on `[B·H, L, d]` tensors of any device, at most
/// `CHUNK_SCORE_ELEMENTS` scores at a time. With `upcast` the score matmuls run in f32 (for
/// bf16/f16 inputs); the softmax is always f32. The result has v's dtype.
pub(crate) fn chunked_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, upcast: bool) -> Result<Tensor> {
    chunked_attention_budget(q, k, v, scale, upcast, CHUNK_SCORE_ELEMENTS)
}

/// `chunked_attention` with an explicit score budget (tests force many chunks with a small one).
pub(crate) fn chunked_attention_budget(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, upcast: bool, budget: usize) -> Result<Tensor> {
    let g = Geometry::of(q.dims(), k.dims(), v.dims())?;
    if g.lq == 0 {
        return Tensor::zeros((g.bh, 0, g.dv), v.dtype(), v.device());
    }
    let plan = Plan { scale, upcast, rows: (budget / (g.bh * g.lk).max(1)).clamp(1, g.lq.max(1)) };
    let (out, lse) = plan.forward(&q.detach(), &k.detach(), &v.detach())?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(out);
    }
    // The op's forward returns this storage as is, so it must start at offset 0, contiguous.
    let out = if out.is_contiguous() && out.layout().start_offset() == 0 { out } else { out.copy()? };
    q.apply_op3(k, v, ChunkedAttention { out: Mutex::new(Some(out)), lse, plan })
}

/// What one call computes: the scale, the dtype handling, the query rows per chunk.
#[derive(Clone, Copy, Debug)]
struct Plan {
    scale: f64,
    upcast: bool,
    rows: usize,
}

impl Plan {
    /// dtype of the q·kᵀ and dS products.
    fn mm_dtype(&self, dtype: DType) -> DType {
        if self.upcast {
            DType::F32
        } else {
            dtype
        }
    }

    /// Query-row ranges `(start, len)` of the chunks.
    fn chunks(&self, lq: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..lq).step_by(self.rows).map(move |start| (start, self.rows.min(lq - start)))
    }

    /// f32 scores `scale · q_c kᵀ` of one chunk.
    fn scores(&self, q_c: &Tensor, kt: &Tensor) -> Result<Tensor> {
        q_c.matmul(kt)?.to_dtype(DType::F32)? * self.scale
    }

    /// Output `[B·H, Lq, dv]` (v's dtype) and logsumexp `[B·H, Lq, 1]` (f32).
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let mm = self.mm_dtype(q.dtype());
        let q = q.to_dtype(mm)?;
        let kt = k.to_dtype(mm)?.t()?;
        let (mut outs, mut lses) = (Vec::new(), Vec::new());
        for (start, len) in self.chunks(q.dim(1)?) {
            let s = self.scores(&q.narrow(1, start, len)?.contiguous()?, &kt)?;
            let max = s.max_keepdim(D::Minus1)?;
            let e = s.broadcast_sub(&max)?.exp()?;
            let sum = e.sum_keepdim(D::Minus1)?;
            outs.push(e.broadcast_div(&sum)?.to_dtype(v.dtype())?.matmul(v)?);
            lses.push((max + sum.log()?)?);
        }
        Ok((cat_rows(outs)?, cat_rows(lses)?))
    }

    /// `(dq, dk, dv)` from the inputs, the output, its gradient and the saved logsumexp,
    /// recomputing the probabilities chunk by chunk.
    fn backward(&self, q: &Tensor, k: &Tensor, v: &Tensor, o: &Tensor, d_o: &Tensor, lse: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        if k.dim(1)? == 1 {
            // One key: the softmax is identically 1 and O = v, so dq = dk = 0 exactly (the
            // general path would leave rounding noise from dP − D) and dv = Σ_rows dO.
            let dv = d_o.to_dtype(DType::F32)?.sum_keepdim(1)?.to_dtype(v.dtype())?;
            return Ok((q.zeros_like()?, k.zeros_like()?, dv));
        }
        let mm = self.mm_dtype(q.dtype());
        let (qm, km) = (q.to_dtype(mm)?, k.to_dtype(mm)?);
        let kt = km.t()?;
        let vt = v.t()?;
        let d_o = d_o.to_dtype(v.dtype())?;
        // D = rowsum(dO ∘ O), f32 [B·H, Lq, 1].
        let dsum = (d_o.to_dtype(DType::F32)? * o.to_dtype(DType::F32)?)?.sum_keepdim(D::Minus1)?;
        let mut dk = Tensor::zeros(k.shape(), DType::F32, k.device())?;
        let mut dv = Tensor::zeros(v.shape(), DType::F32, v.device())?;
        let mut dqs = Vec::new();
        for (start, len) in self.chunks(q.dim(1)?) {
            let q_c = qm.narrow(1, start, len)?.contiguous()?;
            let do_c = d_o.narrow(1, start, len)?.contiguous()?;
            let p = self.scores(&q_c, &kt)?.broadcast_sub(&lse.narrow(1, start, len)?)?.exp()?;
            dv = (dv + p.to_dtype(v.dtype())?.t()?.matmul(&do_c)?.to_dtype(DType::F32)?)?;
            let dp = do_c.matmul(&vt)?.to_dtype(DType::F32)?;
            let ds = (p * dp.broadcast_sub(&dsum.narrow(1, start, len)?)?)?.to_dtype(mm)?;
            dqs.push((ds.matmul(&km)?.to_dtype(DType::F32)? * self.scale)?);
            dk = (dk + (ds.t()?.matmul(&q_c)?.to_dtype(DType::F32)? * self.scale)?)?;
        }
        Ok((cat_rows(dqs)?.to_dtype(q.dtype())?, dk.to_dtype(k.dtype())?, dv.to_dtype(v.dtype())?))
    }
}

fn cat_rows(mut parts: Vec<Tensor>) -> Result<Tensor> {
    if parts.len() == 1 {
        return Ok(parts.remove(0));
    }
    Tensor::cat(&parts, 1)
}

/// Attaches the backward: the forward returns the output computed beforehand, the backward
/// recomputes chunk by chunk with tensor ops.
struct ChunkedAttention {
    /// Taken by the forward (the op's result then owns the values; no second copy is kept).
    out: Mutex<Option<Tensor>>,
    lse: Tensor,
    plan: Plan,
}

impl ChunkedAttention {
    fn take_out(&self) -> Result<Tensor> {
        let taken = self.out.lock().map_err(|_| candle_core::Error::Msg("flash attention: output lock poisoned".into()))?.take();
        taken.ok_or_else(|| candle_core::Error::Msg("flash attention: an op instance was run twice (make a fresh one per call)".into()))
    }
}

impl CustomOp3 for ChunkedAttention {
    fn name(&self) -> &'static str {
        "lora-flash-attention-chunked"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        let out = self.take_out()?;
        let (storage, layout) = out.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => Ok((s.clone(), layout.shape().clone())),
            _ => candle_core::bail!("flash attention: precomputed output is not on the CPU"),
        }
    }

    // Compiles only with candle's CUDA backend (`candle-core/cuda`, enabled by this crate's
    // `cuda` feature).
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let out = self.take_out()?;
        let (storage, layout) = out.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => Ok((s.try_clone(layout)?, layout.shape().clone())),
            _ => candle_core::bail!("flash attention: precomputed output is not on the GPU"),
        }
    }

    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, out: &Tensor, grad_out: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = self.plan.backward(&q.detach(), &k.detach(), &v.detach(), &out.detach(), &grad_out.detach(), &self.lse)?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}
