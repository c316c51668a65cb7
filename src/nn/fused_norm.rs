//! GroupNorm (optionally followed by SiLU, as in every resnet) as one CPU f32 kernel with its own
//! backward: one pass for the statistics, one for the output, two for the input gradient, where
//! the composed version makes about ten full passes and keeps five tensors for the backward.
//!
//! Statistics are accumulated in f64 (the composed f32 version loses digits to cancellation in
//! the 1×1 deep blocks; torch's CPU kernel accumulates in a wider type too). The affine weight and
//! bias are frozen (they are never LoRA targets), so the backward returns the input gradient only.

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

/// What one call normalises: `[B, C, S]` with `groups` groups of channels, `S` positions.
#[derive(Clone, Copy, Debug)]
struct Geometry {
    batch: usize,
    channels: usize,
    spatial: usize,
    groups: usize,
}

impl Geometry {
    fn per_group(&self) -> usize {
        self.channels / self.groups * self.spatial
    }
}

fn sigmoid(z: f32) -> f32 {
    1.0 / (1.0 + (-z).exp())
}

/// GroupNorm (+ SiLU) forward on the CPU in f32; the per-group mean and 1/σ are kept for the
/// backward.
struct GroupNormOp {
    geometry: Geometry,
    weight: Vec<f32>,
    bias: Vec<f32>,
    eps: f64,
    silu: bool,
    /// `(mean, rstd)` per `(batch, group)`, set by the forward.
    stats: OnceLock<Vec<(f64, f64)>>,
}

fn slice<'a>(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else { candle_core::bail!("{what}: only f32") };
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{what}: input must be contiguous"),
    }
}

impl CustomOp1 for GroupNormOp {
    fn name(&self) -> &'static str {
        "lora-group-norm"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let _p = crate::util::profile::scope("group-norm.fwd");
        let x = slice(storage, layout, self.name())?;
        let g = self.geometry;
        let n = g.per_group();
        let cpg = g.channels / g.groups;
        let mut y = vec![0f32; x.len()];
        let stats: Vec<(f64, f64)> = x
            .par_chunks(n)
            .zip(y.par_chunks_mut(n))
            .enumerate()
            .map(|(i, (xs, ys))| {
                let group = i % g.groups;
                let (mut sum, mut sq) = (0f64, 0f64);
                for &v in xs {
                    sum += v as f64;
                }
                let mean = sum / n as f64;
                for &v in xs {
                    let d = v as f64 - mean;
                    sq += d * d;
                }
                let rstd = 1.0 / (sq / n as f64 + self.eps).sqrt();
                for c in 0..cpg {
                    let ch = group * cpg + c;
                    // y = (x − μ)·(r·w) + b per element in f64: folding μ into the bias
                    // (x·(r·w) + (b − μ·r·w)) cancels catastrophically when 1/σ is large.
                    let scale = rstd * self.weight[ch] as f64;
                    let b = self.bias[ch] as f64;
                    let (xc, yc) = (&xs[c * g.spatial..(c + 1) * g.spatial], &mut ys[c * g.spatial..(c + 1) * g.spatial]);
                    if self.silu {
                        for (o, &v) in yc.iter_mut().zip(xc) {
                            let z = ((v as f64 - mean) * scale + b) as f32;
                            *o = z * sigmoid(z);
                        }
                    } else {
                        for (o, &v) in yc.iter_mut().zip(xc) {
                            *o = ((v as f64 - mean) * scale + b) as f32;
                        }
                    }
                }
                (mean, rstd)
            })
            .collect();
        let _ = self.stats.set(stats);
        Ok((CpuStorage::F32(y), layout.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let _p = crate::util::profile::scope("group-norm.bwd");
        let Some(stats) = self.stats.get() else { candle_core::bail!("group norm backward before its forward") };
        let bwd = GroupNormBwd { fwd: self, stats };
        let grad = grad_res.to_dtype(DType::F32)?.contiguous()?;
        Ok(Some(arg.contiguous()?.apply_op2_no_bwd(&grad, &bwd)?))
    }
}

/// The input gradient: with `x̂ = (x − μ)·r`, `z = x̂·w + b`, `dz = dy·silu′(z)` (or `dy`) and
/// `g = dz·w`, `dx = r·(g − mean(g) − x̂·mean(g·x̂))` per group.
struct GroupNormBwd<'a> {
    fwd: &'a GroupNormOp,
    stats: &'a [(f64, f64)],
}

impl CustomOp2 for GroupNormBwd<'_> {
    fn name(&self) -> &'static str {
        "lora-group-norm-bwd"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, xl: &Layout, gs: &CpuStorage, gl: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(xs, xl, self.name())?;
        let dy = slice(gs, gl, self.name())?;
        let op = self.fwd;
        let g = op.geometry;
        let n = g.per_group();
        let cpg = g.channels / g.groups;
        let mut dx = vec![0f32; x.len()];
        dx.par_chunks_mut(n).zip(x.par_chunks(n)).zip(dy.par_chunks(n)).enumerate().for_each(|(i, ((dxs, xs), dys))| {
            let group = i % g.groups;
            let (mean, rstd) = self.stats[i];
            // First pass: g = dz·w into dx, and the two group sums (x̂ and the sums in f64: in
            // groups with a tiny variance, r is large and f32 would cancel away the digits).
            let (mut sum_g, mut sum_gx) = (0f64, 0f64);
            for c in 0..cpg {
                let ch = group * cpg + c;
                let (w, b) = (op.weight[ch], op.bias[ch]);
                let r = c * g.spatial..(c + 1) * g.spatial;
                for ((o, &v), &d) in dxs[r.clone()].iter_mut().zip(&xs[r.clone()]).zip(&dys[r]) {
                    let xhat = (v as f64 - mean) * rstd;
                    let dz = if op.silu {
                        let z = (xhat * w as f64 + b as f64) as f32;
                        let s = sigmoid(z);
                        d * s * (1.0 + z * (1.0 - s))
                    } else {
                        d
                    };
                    let gv = dz * w;
                    *o = gv;
                    sum_g += gv as f64;
                    sum_gx += gv as f64 * xhat;
                }
            }
            let (mg, mgx) = (sum_g / n as f64, sum_gx / n as f64);
            for (o, &v) in dxs.iter_mut().zip(xs) {
                let xhat = (v as f64 - mean) * rstd;
                *o = (rstd * (*o as f64 - mg - xhat * mgx)) as f32;
            }
        });
        Ok((CpuStorage::F32(dx), xl.shape().clone()))
    }
}

/// `silu(group_norm(x))` (or the norm alone) with the fused kernel, when it applies: CPU, f32,
/// `[B, C, ...]` with `C` divisible into `groups`. `None` means: use the composed ops.
pub(crate) fn group_norm_cpu(x: &Tensor, weight: &Tensor, bias: &Tensor, groups: usize, eps: f64, silu: bool) -> Option<Result<Tensor>> {
    let dims = x.dims();
    if !x.device().is_cpu() || x.dtype() != DType::F32 || dims.len() < 3 || groups == 0 || dims[1] % groups != 0 {
        return None;
    }
    if weight.dtype() != DType::F32 || bias.dtype() != DType::F32 {
        return None;
    }
    let run = || -> Result<Tensor> {
        let geometry = Geometry { batch: dims[0], channels: dims[1], spatial: dims[2..].iter().product(), groups };
        let _ = geometry.batch;
        let op = GroupNormOp {
            geometry,
            weight: weight.to_vec1::<f32>()?,
            bias: bias.to_vec1::<f32>()?,
            eps,
            silu,
            stats: OnceLock::new(),
        };
        x.contiguous()?.apply_op1(op)
    };
    Some(run())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::GroupNorm;
    use candle_core::{Device, Var};

    fn max_rel(a: &Tensor, b: &Tensor) -> f64 {
        let (a, b) = (a.to_dtype(DType::F64).unwrap(), b.to_dtype(DType::F64).unwrap());
        let d = (&a - &b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
        d / b.abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap().max(1e-12)
    }

    /// Against the composed ops (each with candle's own backward), in f64 so that the reference
    /// has no rounding of its own to speak of: output and input gradient within 2e-6 relative to
    /// the largest value (f32 kernel; its statistics are f64). Shapes include a 1×1 "image"
    /// (the deep blocks) and a group of one channel.
    #[test]
    fn fused_group_norm_matches_composed() -> Result<()> {
        let dev = Device::Cpu;
        // Five draws of each (random inputs: the 1x1 case's two-value groups are sometimes nearly
        // equal, which is where a careless kernel loses digits).
        let shapes = [(2, 8, 5, 3, 4), (1, 64, 1, 1, 32), (3, 6, 4, 4, 2), (1, 64, 16, 16, 32)];
        for &(b, c, h, w, groups) in shapes.iter().flat_map(|s| std::iter::repeat_n(s, 5)) {
            let x = Var::randn(0.3f32, 2.0, (b, c, h, w), &dev)?;
            let weight = Tensor::randn(1f32, 0.3, c, &dev)?;
            let bias = Tensor::randn(0f32, 0.3, c, &dev)?;
            let probe = Tensor::randn(0f32, 1.0, (b, c, h, w), &dev)?;
            for silu in [false, true] {
                let ours = group_norm_cpu(x.as_tensor(), &weight, &bias, groups, 1e-6, silu).expect("applies")?;
                let x64 = Var::from_tensor(&x.as_tensor().to_dtype(DType::F64)?)?;
                let norm = GroupNorm { num_groups: groups, weight: weight.to_dtype(DType::F64)?, bias: bias.to_dtype(DType::F64)?, eps: 1e-6 };
                let mut expect = norm.forward_composed(x64.as_tensor())?;
                if silu {
                    expect = expect.silu()?;
                }
                assert!(max_rel(&ours.to_dtype(DType::F64)?, &expect) < 2e-6, "forward {b}x{c}x{h}x{w} g{groups} silu {silu}");
                let g_ours = (ours * &probe)?.sum_all()?.backward()?;
                let g_ref = (expect * probe.to_dtype(DType::F64)?)?.sum_all()?.backward()?;
                let (a, r) = (g_ours.get(x.as_tensor()).expect("gradient"), g_ref.get(x64.as_tensor()).unwrap());
                let rel = max_rel(&a.to_dtype(DType::F64)?, r);
                // The composed ops in f32, for scale: in the 1x1 case a group holds two values,
                // 1/σ is large and f32 loses digits there; the fused kernel must do no worse.
                let norm32 = GroupNorm { num_groups: groups, weight: weight.clone(), bias: bias.clone(), eps: 1e-6 };
                let mut c32 = norm32.forward_composed(x.as_tensor())?;
                if silu {
                    c32 = c32.silu()?;
                }
                let g32 = (c32 * &probe)?.sum_all()?.backward()?;
                let rel32 = max_rel(&g32.get(x.as_tensor()).unwrap().to_dtype(DType::F64)?, r);
                assert!(rel < 2e-5_f64.max(rel32), "input gradient {b}x{c}x{h}x{w} g{groups} silu {silu}: {rel:e} (composed f32: {rel32:e})");
                eprintln!("{b}x{c}x{h}x{w} g{groups} silu {silu}: fused {rel:e}, composed f32 {rel32:e}");
                assert!(g_ours.get(&weight).is_none());
            }
        }
        Ok(())
    }
}
