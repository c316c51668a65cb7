//! The device-agnostic flash attention: forward and backward from ordinary candle tensor ops, a
//! chunk of query rows at a time, so it runs on any device (the GPU path) while the peak score
//! memory is one chunk. The backward is attached through a `CustomOp3(q, k, v)` whose forward
//! hands back the output computed beforehand (on detached inputs, no graph kept).

// `cuda_fwd` is compiled under this crate's `cuda` feature, which the GPU build declares.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

use crate::nn::precomputed::Precomputed;

use super::{Geometry, CHUNK_SCORE_ELEMENTS};

/// `softmax(scale · q kᵀ) v` on `[B·H, L, d]` tensors of any device, at most
/// `CHUNK_SCORE_ELEMENTS` scores at a time. With `upcast` the score matmuls run in f32 (for
/// bf16/f16 inputs); the softmax is always f32 (f64 for f64 inputs). The result has v's dtype. Unlike the fused
/// kernel it saves no statistic: a chunk is all keys of its rows, so the backward recomputes its
/// probabilities with one fused softmax.
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
    let out = plan.forward(&q.detach(), &k.detach(), &v.detach())?;
    if !(q.track_op() || k.track_op() || v.track_op()) {
        return Ok(out);
    }
    // The op's forward returns this storage as is, so it must start at offset 0, contiguous.
    let out = if out.is_contiguous() && out.layout().start_offset() == 0 { out } else { out.copy()? };
    q.apply_op3(k, v, ChunkedAttention { out: Precomputed::new(out, "chunked attention"), plan })
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

    /// dtype of the softmax and the gradient accumulators: f32, or f64 for f64 inputs.
    fn acc_dtype(dtype: DType) -> DType {
        if dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        }
    }

    /// Query-row ranges `(start, len)` of the chunks.
    fn chunks(&self, lq: usize) -> impl Iterator<Item = (usize, usize)> + '_ {
        (0..lq).step_by(self.rows).map(move |start| (start, self.rows.min(lq - start)))
    }

    /// Probabilities `softmax(scale · q_c kᵀ)` of one chunk (`acc` dtype). A chunk spans all
    /// keys, so candle's fused softmax (one kernel on every device) gives them exactly; no
    /// running statistics are needed, and the backward recomputes the same values. The scale is
    /// applied to the scores, as in the fused kernel: pre-scaling q rounds it once more, and
    /// the tiny UNet's 1×1 mid block amplifies such rounding past the training golden's
    /// tolerance.
    fn probs(&self, q_c: &Tensor, kt: &Tensor, acc: DType) -> Result<Tensor> {
        candle_nn::ops::softmax_last_dim(&(q_c.matmul(kt)?.to_dtype(acc)? * self.scale)?)
    }

    /// Output `[B·H, Lq, dv]` (v's dtype).
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let mm = self.mm_dtype(q.dtype());
        let qm = q.to_dtype(mm)?;
        let kt = k.to_dtype(mm)?.t()?;
        let mut outs = Vec::new();
        for (start, len) in self.chunks(q.dim(1)?) {
            let p = self.probs(&qm.narrow(1, start, len)?.contiguous()?, &kt, Self::acc_dtype(q.dtype()))?;
            outs.push(p.to_dtype(v.dtype())?.matmul(v)?);
        }
        cat_rows(outs)
    }

    /// `(dq, dk, dv)` from the inputs, the output and its gradient, recomputing the
    /// probabilities chunk by chunk: `dV += Pᵀ dO`, `dS = P ∘ (dO Vᵀ − D)` with
    /// `D = rowsum(dO ∘ O)`, `dQ = scale · dS K`, `dK += scale · dSᵀ Q`.
    fn backward(&self, q: &Tensor, k: &Tensor, v: &Tensor, o: &Tensor, d_o: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        if k.dim(1)? == 1 {
            // One key: the softmax is identically 1 and O = v, so dq = dk = 0 exactly (the
            // general path would leave rounding noise from dP − D) and dv = Σ_rows dO.
            let dv = d_o.to_dtype(Self::acc_dtype(v.dtype()))?.sum_keepdim(1)?.to_dtype(v.dtype())?;
            return Ok((q.zeros_like()?, k.zeros_like()?, dv));
        }
        let mm = self.mm_dtype(q.dtype());
        let qm = q.to_dtype(mm)?;
        let km = k.to_dtype(mm)?;
        let kt = km.t()?;
        let vt = v.t()?;
        let d_o = d_o.to_dtype(v.dtype())?;
        let acc = Self::acc_dtype(q.dtype());
        // D = rowsum(dO ∘ O) = rowsum(P ∘ dP) (O = P V), taken per chunk from the recomputed
        // probabilities in the accumulation dtype: a half-precision O would bring its rounding in.
        let _ = o;
        let mut dk = Tensor::zeros(k.shape(), acc, k.device())?;
        let mut dv = Tensor::zeros(v.shape(), acc, v.device())?;
        let mut dqs = Vec::new();
        for (start, len) in self.chunks(q.dim(1)?) {
            let q_c = qm.narrow(1, start, len)?.contiguous()?;
            let do_c = d_o.narrow(1, start, len)?.contiguous()?;
            let p = self.probs(&q_c, &kt, acc)?;
            dv = (dv + p.to_dtype(v.dtype())?.t()?.matmul(&do_c)?.to_dtype(acc)?)?;
            let dp = do_c.matmul(&vt)?.to_dtype(acc)?;
            let dsum = (&p * &dp)?.sum_keepdim(D::Minus1)?;
            let ds = (p * dp.broadcast_sub(&dsum)?)?.to_dtype(mm)?;
            dqs.push((ds.matmul(&km)?.to_dtype(acc)? * self.scale)?);
            dk = (dk + (ds.t()?.matmul(&q_c)?.to_dtype(acc)? * self.scale)?)?;
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
    out: Precomputed,
    plan: Plan,
}

impl CustomOp3 for ChunkedAttention {
    fn name(&self) -> &'static str {
        "lora-flash-attention-chunked"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.out.take_cpu()
    }

    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.out.take_cuda()
    }

    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, out: &Tensor, grad_out: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) = self.plan.backward(&q.detach(), &k.detach(), &v.detach(), &out.detach(), &grad_out.detach())?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}
