//! Memory-efficient attention with its own backward: `softmax(scale · q kᵀ) v` on `[B·H, L, d]`
//! tensors without ever materialising the `[B·H, Lq, Lk]` scores, in two implementations that
//! follow one algorithm (described here).
//!
//! # The algorithm (flash-attention, forward and backward)
//! Queries are cut into tiles of `Tiling::q_tile` rows and keys/values into tiles of
//! `Tiling::k_tile` rows. For a query tile the forward walks the key tiles keeping, per query
//! row, the running maximum `m` and the running sum `l` of `exp(s − m)` (the online softmax):
//! every new tile of scores `S = scale · Q Kⱼᵀ` raises `m` to `m'`, rescales the accumulated
//! output and `l` by `exp(m − m')` and adds `exp(S − m') Vⱼ`. At the end `O = acc / l`, and the
//! only statistic kept for the backward is the per-row logsumexp `lse = m + ln l` (`[B·H, Lq]`,
//! f32).
//!
//! The backward recomputes the probabilities tile by tile, `P = exp(scale · Q Kⱼᵀ − lse)`, from
//! q, k, v and the saved `lse`; with `D = rowsum(dO ∘ O)` (one value per query row):
//! `dV += Pᵀ dO`, `dP = dO Vᵀ`, `dS = P ∘ (dP − D)`, `dQ += scale · dS K`, `dK += scale · dSᵀ Q`.
//! No `[Lq, Lk]` buffer exists anywhere: the largest temporaries are one tile of scores per thread
//! (CPU kernel) or one chunk of query rows (chunked version).
//!
//! # The implementations
//! - `cpu` + `kernel`: the fused CPU kernel, a `CustomOp3` in f32 (bf16/f16 upcast inside),
//!   parallel over B·H × query tiles, tile products with the `gemm` crate. The default on CPU.
//! - `chunked`: the device-agnostic version: the same forward and backward written with ordinary
//!   candle tensor ops, a chunk of query rows at a time. Its "tile" is a whole chunk of rows
//!   against all keys, so neither the online rescaling nor the saved logsumexp is needed (the
//!   backward recomputes a chunk's probabilities with candle's fused softmax); the backward is
//!   attached through a `CustomOp3` that hands back the precomputed output. The default on
//!   non-CPU devices; a CUDA kernel should follow the fused kernel's tiles and statistics.

pub(crate) mod chunked;
pub(crate) mod cpu;
mod kernel;

use candle_core::Result;

/// Tile sizes of the blocked algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Tiling {
    /// Query rows per tile (the unit of parallel work in the forward).
    pub(crate) q_tile: usize,
    /// Key/value rows per tile (the width of one tile of scores).
    pub(crate) k_tile: usize,
}

/// The CPU kernel's tiles: a tile of scores is `64 × 256` f32 (64 KiB), which with one tile of
/// keys and values (`256 × d` each) stays in a core's L2 cache for the head dims of SD (40..160).
pub(crate) const CPU_TILING: Tiling = Tiling { q_tile: 64, k_tile: 256 };

/// The chunked version computes at most this many score elements at once (`B·H × rows × Lk`;
/// 64 MiB in f32). The backward keeps about four such tensors alive per chunk.
pub(crate) const CHUNK_SCORE_ELEMENTS: usize = 1 << 24;

/// Sizes of one attention call, shared by both implementations.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Geometry {
    pub(crate) bh: usize,
    pub(crate) lq: usize,
    pub(crate) lk: usize,
    pub d: usize,
    pub(crate) dv: usize,
}

impl Geometry {
    /// Checks `q` `[B·H, Lq, d]`, `k` `[B·H, Lk, d]`, `v` `[B·H, Lk, dv]`.
    pub fn of(q: &[usize], k: &[usize], v: &[usize]) -> Result<Self> {
        let (&[bh, lq, d], &[bhk, lk, dk], &[bhv, lv, dv]) = (q, k, v) else {
            candle_core::bail!("flash attention: q, k, v must be [B·H, L, d], got {q:?}, {k:?}, {v:?}")
        };
        if bhk != bh || bhv != bh {
            candle_core::bail!("flash attention: batch × heads differ: q {bh}, k {bhk}, v {bhv}")
        }
        if dk != d {
            candle_core::bail!("flash attention: q and k head dims differ: {d} vs {dk}")
        }
        if lv != lk {
            candle_core::bail!("flash attention: k has {lk} rows but v has {lv}")
        }
        if d == 0 || dv == 0 {
            candle_core::bail!("flash attention: empty head dim (q {q:?}, v {v:?})")
        }
        if lk == 0 && lq > 0 {
            candle_core::bail!("flash attention: no keys to attend to (k is {k:?})")
        }
        Ok(Self { bh, lq, lk, d, dv })
    }
}

pub(crate) use chunked::chunked_attention;
pub(crate) use cpu::fused_attention;

#[cfg(test)]
mod tests {
    //! Both implementations against the composed attention (`attend_in_chunks`: matmul, fused
    //! softmax, matmul; candle's autograd for the backward) on random inputs: outputs and the
    //! gradients of q, k and v through the loss `sum(out ∘ probe)` with a random probe.
    use super::*;
    use crate::nn::attention::attend_in_chunks;
    use candle_core::{DType, Device, Result, Tensor, Var};

    struct Case {
        bh: usize,
        lq: usize,
        lk: usize,
        d: usize,
    }

    /// `max |a − b| / max(max |b|, 1)`: error relative to the reference's scale, absolute below
    /// 1 (the inputs are of unit scale; where a gradient vanishes, e.g. dq with a single key,
    /// both sides are rounding noise around 0).
    fn rel_err(a: &Tensor, b: &Tensor) -> Result<f32> {
        let a = a.to_dtype(DType::F32)?;
        let b = b.to_dtype(DType::F32)?;
        let diff = (&a - &b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let scale = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
        Ok(diff / scale)
    }

    /// Output and (dq, dk, dv) of `attend` on one random case, with a fixed probe.
    fn run(
        attend: &dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>,
        q: &Var,
        k: &Var,
        v: &Var,
        probe: &Tensor,
    ) -> Result<[Tensor; 4]> {
        let out = attend(q.as_tensor(), k.as_tensor(), v.as_tensor())?;
        let loss = out.to_dtype(DType::F32)?.mul(probe)?.sum_all()?;
        let grads = loss.backward()?;
        let g = |x: &Var| grads.get(x.as_tensor()).cloned().expect("attention passes a gradient to every input");
        Ok([out, g(q), g(k), g(v)])
    }

    /// The composed reference in f32 on `[B·H, L, d]` (scale applied to q as the model does).
    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
        let (q, k, v) = (q.to_dtype(DType::F32)?, k.to_dtype(DType::F32)?, v.to_dtype(DType::F32)?);
        let bh = q.dim(0)?;
        attend_in_chunks(&(q * scale)?, &k, &v, None, bh)
    }

    fn inputs(c: &Case, dtype: DType, seed_shift: f64) -> Result<(Var, Var, Var, Tensor)> {
        let dev = Device::Cpu;
        // Scores of a few units (std ≈ 1.5 after scaling) so the softmax is neither flat nor
        // one-hot; a shifted mean in q exercises the running-maximum rescaling.
        let q = (Tensor::randn(0f32, 1.5, (c.bh, c.lq, c.d), &dev)? + seed_shift)?.to_dtype(dtype)?;
        let k = Tensor::randn(0f32, 1.0, (c.bh, c.lk, c.d), &dev)?.to_dtype(dtype)?;
        let v = Tensor::randn(0f32, 1.0, (c.bh, c.lk, c.d), &dev)?.to_dtype(dtype)?;
        let probe = Tensor::randn(0f32, 1.0, (c.bh, c.lq, c.d), &dev)?;
        Ok((Var::from_tensor(&q)?, Var::from_tensor(&k)?, Var::from_tensor(&v)?, probe))
    }

    /// Compares `attend` with the composed f32 reference on `c`; returns the four relative errors.
    fn compare(c: &Case, dtype: DType, attend: &dyn Fn(&Tensor, &Tensor, &Tensor, f64) -> Result<Tensor>) -> Result<[f32; 4]> {
        let scale = 1.0 / (c.d as f64).sqrt();
        let (q, k, v, probe) = inputs(c, dtype, 0.3)?;
        let ours = run(&|q, k, v| attend(q, k, v, scale), &q, &k, &v, &probe)?;
        // The reference sees the same (possibly bf16-rounded) values, upcast to f32.
        let (qr, kr, vr) = (
            Var::from_tensor(&q.to_dtype(DType::F32)?)?,
            Var::from_tensor(&k.to_dtype(DType::F32)?)?,
            Var::from_tensor(&v.to_dtype(DType::F32)?)?,
        );
        let reference = run(&|q, k, v| composed(q, k, v, scale), &qr, &kr, &vr, &probe)?;
        for (i, (o, r)) in ours.iter().zip(&reference).enumerate() {
            assert_eq!(o.dims(), r.dims(), "tensor {i} shape");
            assert_eq!(o.dtype(), dtype, "tensor {i} dtype");
        }
        let mut errs = [0f32; 4];
        for i in 0..4 {
            errs[i] = rel_err(&ours[i], &reference[i])?;
        }
        Ok(errs)
    }

    fn check(name: &str, c: &Case, errs: [f32; 4], tol: f32) {
        let names = ["out", "dq", "dk", "dv"];
        if std::env::var_os("FLASH_PRINT").is_some() {
            eprintln!("{name} bh={} lq={} lk={} d={}: {errs:?}", c.bh, c.lq, c.lk, c.d);
        }
        for (e, n) in errs.iter().zip(names) {
            assert!(e.is_finite() && *e <= tol, "{name} bh={} lq={} lk={} d={}: {n} relative error {e} > {tol}", c.bh, c.lq, c.lk, c.d);
        }
    }

    fn shapes() -> Vec<Case> {
        let mut cases = Vec::new();
        for d in [4, 8, 40, 64, 80, 160] {
            for l in [1, 7, 63, 64, 65, 200] {
                // Big heads only at a few lengths, to keep the debug-build test fast.
                if d >= 80 && !matches!(l, 1 | 65 | 200) {
                    continue;
                }
                cases.push(Case { bh: 2, lq: l, lk: l, d });
            }
        }
        // Cross-attention to 77 text tokens, and a longer key set than queries.
        cases.push(Case { bh: 3, lq: 130, lk: 77, d: 40 });
        cases.push(Case { bh: 1, lq: 5, lk: 300, d: 8 });
        cases
    }

    // f32 tolerance: 2e-5 relative to the largest value of the reference (`rel_err`). Both sides
    // round in f32 but sum in different orders (tiles vs whole rows) and the fused kernel's exp
    // is a polynomial accurate to ~2 ulp; the observed errors are ≤ 2.2e-6 for L ≤ 300.
    const F32_TOL: f32 = 2e-5;

    #[test]
    fn fused_matches_composed_f32() -> Result<()> {
        for tiling in [CPU_TILING, Tiling { q_tile: 16, k_tile: 24 }] {
            for c in shapes() {
                let errs = compare(&c, DType::F32, &|q, k, v, s| cpu::fused_attention_tiled(q, k, v, s, tiling))?;
                check(&format!("fused {tiling:?}"), &c, errs, F32_TOL);
            }
        }
        Ok(())
    }

    #[test]
    fn chunked_matches_composed_f32() -> Result<()> {
        // A budget of 1000 score elements forces several chunks of query rows at these sizes.
        for budget in [CHUNK_SCORE_ELEMENTS, 1000] {
            for c in shapes() {
                let errs = compare(&c, DType::F32, &|q, k, v, s| chunked::chunked_attention_budget(q, k, v, s, false, budget))?;
                check(&format!("chunked budget {budget}"), &c, errs, F32_TOL);
            }
        }
        Ok(())
    }

    /// bf16 inputs: both implementations compute in f32 inside (the fused one) or at least
    /// softmax in f32 (the chunked one, with `upcast` for the scores), so the only error is the
    /// final rounding to bf16 (8 significant bits: 2⁻⁸ ≈ 0.004 relative) plus bf16 `O` in
    /// `D = rowsum(dO ∘ O)`: tolerance 1e-2 relative.
    #[test]
    fn bf16_inputs_upcast() -> Result<()> {
        for c in [Case { bh: 2, lq: 65, lk: 65, d: 40 }, Case { bh: 2, lq: 100, lk: 77, d: 64 }] {
            let errs = compare(&c, DType::BF16, &|q, k, v, s| fused_attention(q, k, v, s))?;
            check("fused bf16", &c, errs, 1e-2);
            let errs = compare(&c, DType::BF16, &|q, k, v, s| chunked::chunked_attention_budget(q, k, v, s, true, 2000))?;
            check("chunked bf16", &c, errs, 1e-2);
        }
        Ok(())
    }

    /// f64 inputs (the f64 parity tests run on CPU through the chunked version): softmax and
    /// accumulation stay in f64, so it matches the composed f64 reference to 1e-12 relative.
    #[test]
    fn chunked_keeps_f64() -> Result<()> {
        let c = Case { bh: 2, lq: 45, lk: 33, d: 8 };
        // The loss is taken in f32 (`run`), but its gradient, the f32 probe, is exact in f64.
        let (q, k, v, probe) = inputs(&c, DType::F64, 0.3)?;
        let ours = run(&|q, k, v| chunked::chunked_attention_budget(q, k, v, 0.3, false, 500), &q, &k, &v, &probe)?;
        let reference = run(&|q, k, v| attend_in_chunks(&(q * 0.3)?, k, v, None, 2), &q, &k, &v, &probe)?;
        for (o, r) in ours.iter().zip(&reference) {
            assert_eq!(o.dtype(), DType::F64);
            let diff = (o - r)?.abs()?.max_all()?.to_scalar::<f64>()?;
            let scale = r.abs()?.max_all()?.to_scalar::<f64>()?.max(1.0);
            assert!(diff / scale < 1e-12, "f64 relative error {}", diff / scale);
        }
        Ok(())
    }

    /// 4096 tokens (SD at 512 px, first level) with a small head: 64 × 16 tiles, many rescalings.
    /// The f32 tolerance scaled by 5: rows sum 4096 terms instead of ≤ 300 (observed 2.1e-5 on dq).
    #[test]
    fn fused_at_4096_tokens() -> Result<()> {
        let c = Case { bh: 1, lq: 4096, lk: 4096, d: 4 };
        let errs = compare(&c, DType::F32, &|q, k, v, s| fused_attention(q, k, v, s))?;
        check("fused 4096", &c, errs, 5.0 * F32_TOL);
        Ok(())
    }

    /// Without gradients (inference) both give the same output as with them, and the chunked
    /// version returns a plain tensor.
    #[test]
    fn inference_without_graph() -> Result<()> {
        let c = Case { bh: 2, lq: 33, lk: 20, d: 8 };
        let (q, k, v, _) = inputs(&c, DType::F32, 0.0)?;
        let (q, k, v) = (q.as_tensor().detach(), k.as_tensor().detach(), v.as_tensor().detach());
        let reference = composed(&q, &k, &v, 0.5)?;
        let fused = fused_attention(&q, &k, &v, 0.5)?;
        let chunked = chunked::chunked_attention_budget(&q, &k, &v, 0.5, false, 100)?;
        assert!(!chunked.track_op());
        assert!(rel_err(&fused, &reference)? < F32_TOL);
        assert!(rel_err(&chunked, &reference)? < F32_TOL);
        Ok(())
    }

    /// With a single key the output is v and the gradients of q and k are exactly zero (as in
    /// torch, where the softmax backward of one element cancels exactly); the UNet's mid block
    /// sees one token at 64 px.
    #[test]
    fn single_key_gradients_are_exactly_zero() -> Result<()> {
        let c = Case { bh: 2, lq: 3, lk: 1, d: 8 };
        let scale = 1.0 / 8f64.sqrt();
        let (q, k, v, probe) = inputs(&c, DType::F32, 0.0)?;
        let fused = |q: &Tensor, k: &Tensor, v: &Tensor| fused_attention(q, k, v, scale);
        let chunked = |q: &Tensor, k: &Tensor, v: &Tensor| chunked_attention(q, k, v, scale, false);
        for attend in [&fused as &dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>, &chunked] {
            let [out, dq, dk, dv] = run(attend, &q, &k, &v, &probe)?;
            let expect_out = v.as_tensor().broadcast_as((2, 3, 8))?;
            assert_eq!((out - expect_out)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
            assert_eq!(dq.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
            assert_eq!(dk.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
            let expect_dv = probe.sum_keepdim(1)?;
            assert!((dv - expect_dv)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-6);
        }
        Ok(())
    }

    #[test]
    fn bad_inputs_are_named() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::zeros((2, 3, 4), DType::F32, &dev)?;
        let k = Tensor::zeros((2, 5, 6), DType::F32, &dev)?;
        let err = fused_attention(&q, &k, &k, 1.0).unwrap_err().to_string();
        assert!(err.contains("head dim"), "{err}");
        let err = chunked_attention(&q, &k, &k, 1.0, false).unwrap_err().to_string();
        assert!(err.contains("head dim"), "{err}");
        let empty = Tensor::zeros((2, 0, 4), DType::F32, &dev)?;
        let err = fused_attention(&q, &empty, &empty, 1.0).unwrap_err().to_string();
        assert!(err.contains("no keys"), "{err}");
        Ok(())
    }
}
