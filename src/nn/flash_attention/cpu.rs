//! The fused CPU flash attention as a candle op: a `CustomOp3(q, k, v)` on `[B·H, L, d]` tensors,
//! f32 inside (bf16/f16 upcast, results cast back), the saved logsumexp in the op; the loops are
//! in `kernel.rs`.

use std::borrow::Cow;
use std::sync::OnceLock;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Tensor};

use super::kernel::{backward, forward};
use super::{Geometry, Tiling, CPU_TILING};

/// `softmax(scale · q kᵀ) v` for `q` `[B·H, Lq, d]`, `k` `[B·H, Lk, d]`, `v` `[B·H, Lk, dv]` on
/// the CPU, with a backward that recomputes the scores tile by tile. The result has q's dtype.
pub(crate) fn fused_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    fused_attention_tiled(q, k, v, scale, CPU_TILING)
}

/// `fused_attention` with explicit tile sizes (tests use small tiles to cross many tile edges).
pub(crate) fn fused_attention_tiled(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, tiling: Tiling) -> Result<Tensor> {
    if !q.device().is_cpu() {
        candle_core::bail!("flash attention: the fused kernel runs on the CPU only (q is on {:?})", q.device().location())
    }
    Geometry::of(q.dims(), k.dims(), v.dims())?;
    let op = FlashAttentionCpu { scale: scale as f32, tiling, lse: OnceLock::new(), out_f32: OnceLock::new() };
    q.contiguous()?.apply_op3(&k.contiguous()?, &v.contiguous()?, op)
}

/// One call's op: the scale, the tiles, and the per-row logsumexp the forward saves for the
/// backward (`[B·H · Lq]`). Make a fresh op per call.
struct FlashAttentionCpu {
    scale: f32,
    tiling: Tiling,
    lse: OnceLock<Vec<f32>>,
    /// The output before rounding, kept for half-precision inputs: the backward's
    /// `D = rowsum(dO ∘ O)` from a bf16-rounded O is off by O's rounding, which `dP − D` then
    /// turns into gradient noise where the softmax is nearly one-hot (the 1×1 and 2×2 blocks).
    out_f32: OnceLock<Vec<f32>>,
}

impl CustomOp3 for FlashAttentionCpu {
    fn name(&self) -> &'static str {
        "lora-flash-attention-cpu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout, s3: &CpuStorage, l3: &Layout) -> Result<(CpuStorage, Shape)> {
        let _p = crate::util::profile::scope("attention.fwd");
        let g = Geometry::of(l1.dims(), l2.dims(), l3.dims())?;
        let q = as_f32(s1, l1, "q")?;
        let k = as_f32(s2, l2, "k")?;
        let v = as_f32(s3, l3, "v")?;
        let (out, lse) = forward(&q, &k, &v, g, self.scale, self.tiling);
        if self.lse.set(lse).is_err() {
            candle_core::bail!("flash attention: an op instance was run twice (make a fresh one per call)")
        }
        if s1.dtype() != DType::F32 {
            let _ = self.out_f32.set(out.clone());
        }
        Ok((from_f32(out, s1.dtype())?, Shape::from((g.bh, g.lq, g.dv))))
    }

    fn bwd(&self, q: &Tensor, k: &Tensor, v: &Tensor, out: &Tensor, grad_out: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let _p = crate::util::profile::scope("attention.bwd");
        let Some(lse) = self.lse.get() else {
            candle_core::bail!("flash attention: backward before forward (no saved logsumexp)")
        };
        let g = Geometry::of(q.dims(), k.dims(), v.dims())?;
        let [qd, kd, vd, dod] = [q, k, v, grad_out].map(f32_vec);
        let od = match self.out_f32.get() {
            Some(o) => o.clone(),
            None => f32_vec(out)?,
        };
        let (dq, dk, dv) = backward(&qd?, &kd?, &vd?, &od, &dod?, lse, g, self.scale, self.tiling);
        let cpu = Device::Cpu;
        let dq = Tensor::from_vec(dq, (g.bh, g.lq, g.d), &cpu)?.to_dtype(q.dtype())?;
        let dk = Tensor::from_vec(dk, (g.bh, g.lk, g.d), &cpu)?.to_dtype(k.dtype())?;
        let dv = Tensor::from_vec(dv, (g.bh, g.lk, g.dv), &cpu)?.to_dtype(v.dtype())?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// A contiguous storage as f32 values (borrowed when already f32).
fn as_f32<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<Cow<'a, [f32]>> {
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("flash attention: {what} must be contiguous")
    };
    Ok(match s {
        CpuStorage::F32(x) => Cow::Borrowed(&x[start..end]),
        CpuStorage::BF16(x) => Cow::Owned(x[start..end].iter().map(|x| x.to_f32()).collect()),
        CpuStorage::F16(x) => Cow::Owned(x[start..end].iter().map(|x| x.to_f32()).collect()),
        other => candle_core::bail!("flash attention: {what} is {:?}; the CPU kernel takes f32, bf16 or f16", other.dtype()),
    })
}

fn from_f32(x: Vec<f32>, dtype: DType) -> Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(x),
        DType::BF16 => CpuStorage::BF16(x.into_iter().map(half::bf16::from_f32).collect()),
        DType::F16 => CpuStorage::F16(x.into_iter().map(half::f16::from_f32).collect()),
        other => candle_core::bail!("flash attention: cannot return {other:?}"),
    })
}

/// A tensor's values as a row-major f32 vector (a copy of `L·d` values, cheap next to the
/// `L²·d` work that uses them).
fn f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    t.detach().to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
}

