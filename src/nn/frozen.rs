//! Frozen layers as custom ops whose backward returns only the input gradient.
//!
//! candle's conv2d and matmul backward always compute the weight gradient too, even for weights
//! that are not trained, and its conv2d backward goes through a slow transposed convolution.
//! For LoRA training every conv and every base linear is frozen, so on CPU (f32) these ops run
//! as im2col + one GEMM forward, and one GEMM + col2im backward — the weight never gets a
//! gradient. Other devices and dtypes fall back to candle's ops (same values, slower backward).

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Module, Result, Shape, Tensor};
use rayon::prelude::*;

/// Geometry of a 2-D convolution (square kernel stride/padding as diffusers uses them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeometry {
    pub c_in: usize,
    pub c_out: usize,
    pub kh: usize,
    pub kw: usize,
    pub stride: usize,
    pub padding: usize,
}

impl ConvGeometry {
    fn out_hw(&self, h: usize, w: usize) -> (usize, usize) {
        ((h + 2 * self.padding - self.kh) / self.stride + 1, (w + 2 * self.padding - self.kw) / self.stride + 1)
    }
    fn k(&self) -> usize {
        self.c_in * self.kh * self.kw
    }
}

/// The output columns `ox` whose input column `ox·stride + j - padding` lies inside `[0, w)`.
fn valid_range(out: usize, w: usize, stride: usize, j: usize, padding: usize) -> std::ops::Range<usize> {
    // ix = ox*stride + j - padding >= 0  <=>  ox >= ceil((padding - j) / stride)
    let lo = if padding > j { (padding - j).div_ceil(stride) } else { 0 };
    // ix < w  <=>  ox*stride < w + padding - j
    let hi = if w + padding > j { (w + padding - j).div_ceil(stride).min(out) } else { 0 };
    lo.min(hi)..hi
}

/// Unfold `x` `[B, C, H, W]` (contiguous) into columns `[C·kh·kw, B·Ho·Wo]`.
fn im2col(x: &[f32], b: usize, h: usize, w: usize, g: &ConvGeometry) -> Vec<f32> {
    let (ho, wo) = g.out_hw(h, w);
    let n = b * ho * wo;
    let mut cols = vec![0f32; g.k() * n];
    let khw = g.kh * g.kw;
    cols.par_chunks_mut(khw * n).enumerate().for_each(|(c, chunk)| {
        for i in 0..g.kh {
            let rows_y = valid_range(ho, h, g.stride, i, g.padding);
            for j in 0..g.kw {
                let cols_x = valid_range(wo, w, g.stride, j, g.padding);
                let row = &mut chunk[(i * g.kw + j) * n..(i * g.kw + j + 1) * n];
                for bi in 0..b {
                    let plane = &x[(bi * g.c_in + c) * h * w..(bi * g.c_in + c + 1) * h * w];
                    let out = &mut row[bi * ho * wo..(bi + 1) * ho * wo];
                    for oy in rows_y.clone() {
                        let iy = oy * g.stride + i - g.padding;
                        let src = &plane[iy * w..(iy + 1) * w];
                        let dst = &mut out[oy * wo..(oy + 1) * wo];
                        if cols_x.is_empty() {
                            continue;
                        }
                        let ix0 = cols_x.start * g.stride + j - g.padding;
                        if g.stride == 1 {
                            dst[cols_x.clone()].copy_from_slice(&src[ix0..ix0 + cols_x.len()]);
                        } else {
                            for (k, d) in dst[cols_x.clone()].iter_mut().enumerate() {
                                *d = src[ix0 + k * g.stride];
                            }
                        }
                    }
                }
            }
        }
    });
    cols
}

/// Fold columns `[C·kh·kw, B·Ho·Wo]` back into `[B, C, H, W]`, summing overlaps (im2col's adjoint).
fn col2im(cols: &[f32], b: usize, h: usize, w: usize, g: &ConvGeometry) -> Vec<f32> {
    let (ho, wo) = g.out_hw(h, w);
    let n = b * ho * wo;
    let mut x = vec![0f32; b * g.c_in * h * w];
    x.par_chunks_mut(h * w).enumerate().for_each(|(bc, plane)| {
        let (bi, c) = (bc / g.c_in, bc % g.c_in);
        for i in 0..g.kh {
            let rows_y = valid_range(ho, h, g.stride, i, g.padding);
            for j in 0..g.kw {
                let cols_x = valid_range(wo, w, g.stride, j, g.padding);
                if cols_x.is_empty() {
                    continue;
                }
                let ix0 = cols_x.start * g.stride + j - g.padding;
                let row = &cols[(c * g.kh * g.kw + i * g.kw + j) * n..][..n];
                let src = &row[bi * ho * wo..(bi + 1) * ho * wo];
                for oy in rows_y.clone() {
                    let iy = oy * g.stride + i - g.padding;
                    let dst = &mut plane[iy * w..(iy + 1) * w];
                    let s = &src[oy * wo + cols_x.start..oy * wo + cols_x.end];
                    if g.stride == 1 {
                        for (d, v) in dst[ix0..ix0 + s.len()].iter_mut().zip(s) {
                            *d += v;
                        }
                    } else {
                        for (k, v) in s.iter().enumerate() {
                            dst[ix0 + k * g.stride] += v;
                        }
                    }
                }
            }
        }
    });
    x
}

fn contiguous_f32<'a>(storage: &'a CpuStorage, layout: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = match storage {
        CpuStorage::F32(v) => v.as_slice(),
        _ => candle_core::bail!("{op}: only f32 on CPU"),
    };
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// The frozen conv as a custom op; holds the weight as a `[C_out, K]` matrix and its transpose.
struct FrozenConv2dOp {
    geometry: ConvGeometry,
    w_mat: Tensor,
}

impl CustomOp1 for FrozenConv2dOp {
    fn name(&self) -> &'static str {
        "frozen-conv2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, self.name())?;
        let (b, c, h, w) = layout.shape().dims4()?;
        let g = &self.geometry;
        if c != g.c_in {
            candle_core::bail!("frozen-conv2d: input has {c} channels, the kernel expects {}", g.c_in);
        }
        let (ho, wo) = g.out_hw(h, w);
        let cols = im2col(x, b, h, w, g);
        let cols = Tensor::from_vec(cols, (g.k(), b * ho * wo), &Device::Cpu)?;
        let out = self.w_mat.matmul(&cols)?; // [C_out, B·Ho·Wo]
        let out = if b == 1 { out } else { out.reshape((g.c_out, b, ho * wo))?.transpose(0, 1)?.contiguous()? };
        let out = out.flatten_all()?.to_vec1::<f32>()?;
        Ok((CpuStorage::F32(out), Shape::from((b, g.c_out, ho, wo))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let (b, _c, h, w) = arg.dims4()?;
        let (_, c_out, ho, wo) = grad_res.dims4()?;
        let g = &self.geometry;
        let grad = grad_res.to_dtype(DType::F32)?;
        let grad = if b == 1 {
            grad.reshape((c_out, ho * wo))?
        } else {
            grad.reshape((b, c_out, ho * wo))?.transpose(0, 1)?.contiguous()?.reshape((c_out, b * ho * wo))?
        };
        // `w_mat.t()` is a strided view: the GEMM reads it transposed, so no second (transposed)
        // copy of every conv weight stays resident.
        let dcols = self.w_mat.t()?.matmul(&grad)?.flatten_all()?.to_vec1::<f32>()?;
        let dx = col2im(&dcols, b, h, w, g);
        Ok(Some(Tensor::from_vec(dx, (b, g.c_in, h, w), arg.device())?))
    }
}

/// A frozen `Conv2d` (groups 1, dilation 1), the weights never get a gradient.
#[derive(Clone)]
pub struct FrozenConv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub geometry: ConvGeometry,
    op: Option<Arc<Box<dyn CustomOp1 + Send + Sync>>>,
}

impl std::fmt::Debug for FrozenConv2d {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrozenConv2d").field("geometry", &self.geometry).finish()
    }
}

impl FrozenConv2d {
    /// `weight` `[C_out, C_in, kh, kw]`.
    pub fn new(weight: Tensor, bias: Option<Tensor>, stride: usize, padding: usize) -> Result<Self> {
        let (c_out, c_in, kh, kw) = weight.dims4()?;
        let geometry = ConvGeometry { c_in, c_out, kh, kw, stride, padding };
        let op: Option<Arc<Box<dyn CustomOp1 + Send + Sync>>> =
            if weight.device().is_cpu() && weight.dtype() == DType::F32 {
                let w_mat = weight.reshape((c_out, c_in * kh * kw))?.contiguous()?;
                Some(Arc::new(Box::new(FrozenConv2dOp { geometry, w_mat })))
            } else {
                None
            };
        Ok(Self { weight, bias, geometry, op })
    }
}

impl Module for FrozenConv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.op {
            Some(op) if x.dtype() == DType::F32 && x.device().is_cpu() => x.contiguous()?.apply_op1_arc(op.clone())?,
            _ => x.conv2d(&self.weight, self.geometry.padding, self.geometry.stride, 1, 1)?,
        };
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, self.geometry.c_out, 1, 1))?),
            None => Ok(y),
        }
    }
}

/// Load a frozen conv from `vb` (`weight` `[out, in, k, k]`, `bias` `[out]`), the drop-in for
/// `candle_nn::conv2d` (groups and dilation must be 1).
pub fn conv2d(in_channels: usize, out_channels: usize, kernel: usize, cfg: candle_nn::Conv2dConfig, vb: candle_nn::VarBuilder) -> Result<FrozenConv2d> {
    if cfg.groups != 1 || cfg.dilation != 1 {
        candle_core::bail!("frozen conv2d supports groups = 1 and dilation = 1 only (got groups {}, dilation {})", cfg.groups, cfg.dilation);
    }
    let weight = vb.get((out_channels, in_channels, kernel, kernel), "weight")?;
    let bias = vb.get(out_channels, "bias")?;
    FrozenConv2d::new(weight, Some(bias), cfg.stride, cfg.padding)
}

/// `x @ Wᵀ` for a frozen `W` `[out, in]`, as a custom op whose backward is `grad @ W` only.
struct FrozenMatmulOp {
    w_t: Tensor,
    w: Tensor,
}

impl CustomOp1 for FrozenMatmulOp {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(storage, layout, self.name())?;
        let dims = layout.shape().dims();
        let k = *dims.last().unwrap_or(&1);
        let rows = x.len() / k.max(1);
        let x = Tensor::from_slice(x, (rows, k), &Device::Cpu)?;
        let y = x.matmul(&self.w_t)?;
        let out_dim = self.w_t.dim(1)?;
        let mut out_dims = dims[..dims.len() - 1].to_vec();
        out_dims.push(out_dim);
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?), Shape::from(out_dims)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let out_dim = self.w.dim(0)?;
        let rows = grad_res.elem_count() / out_dim;
        let g = grad_res.to_dtype(DType::F32)?.reshape((rows, out_dim))?;
        Ok(Some(g.matmul(&self.w)?.reshape(arg.shape())?))
    }
}

/// A cached frozen-matmul op for a weight; `None` where the fast path does not apply.
#[derive(Clone)]
pub struct FrozenMatmul(Option<Arc<Box<dyn CustomOp1 + Send + Sync>>>);

impl FrozenMatmul {
    pub fn new(weight: &Tensor) -> Result<Self> {
        if weight.device().is_cpu() && weight.dtype() == DType::F32 && weight.rank() == 2 {
            let w = weight.contiguous()?;
            let w_t = w.t()?.contiguous()?;
            Ok(Self(Some(Arc::new(Box::new(FrozenMatmulOp { w_t, w })))))
        } else {
            Ok(Self(None))
        }
    }

    /// The plain candle path (used where the custom op does not apply).
    pub fn fallback() -> Self {
        Self(None)
    }

    /// `x @ weightᵀ` for `x` `[..., in]`; `weight` is the same tensor given to `new`.
    pub fn forward(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        match &self.0 {
            Some(op) if x.dtype() == DType::F32 && x.device().is_cpu() => x.contiguous()?.apply_op1_arc(op.clone()),
            _ => {
                let dims = x.dims();
                let k = *dims.last().unwrap_or(&1);
                let rows = x.elem_count() / k.max(1);
                let y = x.reshape((rows, k))?.matmul(&weight.t()?)?;
                let mut out_dims = dims[..dims.len() - 1].to_vec();
                out_dims.push(weight.dim(0)?);
                y.reshape(out_dims)
            }
        }
    }
}

impl std::fmt::Debug for FrozenMatmul {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "FrozenMatmul({})", if self.0.is_some() { "custom op" } else { "fallback" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        let s = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-6);
        d / s
    }

    /// Independent computation: candle's own conv2d and its autograd input gradient.
    /// Tolerance 1e-5 relative to the largest value (f32, different summation order).
    #[test]
    fn frozen_conv_matches_candle_forward_and_input_grad() -> Result<()> {
        let dev = Device::Cpu;
        for &(b, c_in, c_out, h, w, k, stride, pad) in
            &[(2, 3, 5, 9, 7, 3, 1, 1), (1, 4, 6, 8, 8, 3, 2, 1), (3, 4, 2, 5, 6, 1, 1, 0), (2, 2, 3, 9, 9, 3, 2, 0)]
        {
            let weight = Tensor::randn(0f32, 1.0, (c_out, c_in, k, k), &dev)?;
            let bias = Tensor::randn(0f32, 1.0, c_out, &dev)?;
            let x = Var::randn(0f32, 1.0, (b, c_in, h, w), &dev)?;
            let conv = FrozenConv2d::new(weight.clone(), Some(bias.clone()), stride, pad)?;
            let y = conv.forward(x.as_tensor())?;
            let expect = x.as_tensor().conv2d(&weight, pad, stride, 1, 1)?.broadcast_add(&bias.reshape((1, c_out, 1, 1))?)?;
            assert_eq!(y.dims(), expect.dims());
            assert!(max_rel(&y, &expect) < 1e-5, "forward differs beyond 1e-5 relative");
            let probe = Tensor::randn(0f32, 1.0, y.dims(), &dev)?;
            let g_ours = (y * &probe)?.sum_all()?.backward()?;
            let g_ref = (expect * &probe)?.sum_all()?.backward()?;
            let (a, r) = (g_ours.get(x.as_tensor()).unwrap(), g_ref.get(x.as_tensor()).unwrap());
            assert!(max_rel(a, r) < 1e-5, "input gradient differs beyond 1e-5 relative");
            assert!(g_ours.get(&weight).is_none(), "frozen weight must get no gradient");
        }
        Ok(())
    }

    #[test]
    fn frozen_matmul_matches_candle_forward_and_input_grad() -> Result<()> {
        let dev = Device::Cpu;
        let weight = Tensor::randn(0f32, 1.0, (7, 5), &dev)?;
        let x = Var::randn(0f32, 1.0, (2, 3, 5), &dev)?;
        let fm = FrozenMatmul::new(&weight)?;
        let y = fm.forward(x.as_tensor(), &weight)?;
        let expect = x.as_tensor().broadcast_matmul(&weight.t()?)?;
        assert!(max_rel(&y, &expect) < 1e-5, "forward differs beyond 1e-5 relative");
        let probe = Tensor::randn(0f32, 1.0, y.dims(), &dev)?;
        let g_ours = (y * &probe)?.sum_all()?.backward()?;
        let g_ref = (expect * &probe)?.sum_all()?.backward()?;
        assert!(max_rel(g_ours.get(x.as_tensor()).unwrap(), g_ref.get(x.as_tensor()).unwrap()) < 1e-5);
        assert!(g_ours.get(&weight).is_none());
        Ok(())
    }
}
