//! Frozen layers as custom ops whose backward returns only the input gradient, on every device
//! and dtype.
//!
//! candle's conv2d and matmul backward always compute the weight gradient too, even for weights
//! that are not trained. For LoRA training every conv and every base linear is frozen, so:
//! - linear: one custom op that runs the backend's own GEMM (candle's CPU gemm, cuBLAS on CUDA)
//!   on the held weight; backward `grad @ W` with ordinary tensor ops (any device).
//! - conv on the CPU (any float dtype): im2col + one GEMM forward, one GEMM + col2im backward, in
//!   f32 (half-precision inputs are widened and the result rounded back, as candle has no
//!   half-precision CPU conv worth using).
//! - conv elsewhere (CUDA): candle's conv2d on the detached input computes the output, which a
//!   custom op attaches to the graph; its backward is the input gradient as a transposed
//!   convolution of the gradient with the same kernel (ordinary tensor ops).
//! The weight never gets a gradient, and no weight-gradient buffer is ever allocated.

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CudaStorage, CustomOp1, CustomOp2, DType, Device, Layout, Module, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

/// Geometry of a 2-D convolution (square kernel stride/padding as diffusers uses them).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ConvGeometry {
    pub c_in: usize,
    pub c_out: usize,
    pub(crate) kh: usize,
    pub(crate) kw: usize,
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

/// The CPU conv as a custom op: im2col + GEMM in f32 whatever the input dtype.
struct FrozenConv2dOp {
    geometry: ConvGeometry,
    /// The weight as `[C_out, K]` (its own dtype); f32 copies are made per call for half weights.
    w_mat: Tensor,
    /// Whether `w_mat` is f32 already (no per-call conversion). Its transpose for the backward
    /// is a strided view, not a copy: a second copy of every conv weight was 2.5 GB at SD 1.5.
    is_f32: bool,
}

impl FrozenConv2dOp {
    fn mats_f32(&self) -> Result<(Tensor, Tensor)> {
        let w = if self.is_f32 { self.w_mat.clone() } else { self.w_mat.to_dtype(DType::F32)? };
        let wt = w.t()?;
        Ok((w, wt))
    }
}

impl CustomOp1 for FrozenConv2dOp {
    fn name(&self) -> &'static str {
        "frozen-conv2d"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let _p = crate::util::profile::scope("conv.fwd");
        let dtype = storage.dtype();
        let widened;
        let (storage, layout) = if dtype == DType::F32 {
            (storage, layout)
        } else {
            widened = (storage.to_dtype(layout, DType::F32)?, Layout::contiguous(layout.shape()));
            (&widened.0, &widened.1)
        };
        let x = contiguous_f32(storage, layout, self.name())?;
        let (b, c, h, w) = layout.shape().dims4()?;
        let g = &self.geometry;
        if c != g.c_in {
            candle_core::bail!("frozen-conv2d: input has {c} channels, the kernel expects {}", g.c_in);
        }
        let (ho, wo) = g.out_hw(h, w);
        let cols = im2col(x, b, h, w, g);
        let cols = Tensor::from_vec(cols, (g.k(), b * ho * wo), &Device::Cpu)?;
        let (w_mat, _) = self.mats_f32()?;
        let out = w_mat.matmul(&cols)?; // [C_out, B·Ho·Wo]
        let out = if b == 1 { out } else { out.reshape((g.c_out, b, ho * wo))?.transpose(0, 1)?.contiguous()? };
        let out = out.flatten_all()?.to_dtype(dtype)?;
        let (guard, l) = out.storage_and_layout();
        let Storage::Cpu(cpu) = &*guard else { candle_core::bail!("frozen-conv2d: result left the CPU") };
        Ok((cpu.try_clone(l)?, Shape::from((b, g.c_out, ho, wo))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let _p = crate::util::profile::scope("conv.bwd");
        let (b, _c, h, w) = arg.dims4()?;
        let (_, c_out, ho, wo) = grad_res.dims4()?;
        let g = &self.geometry;
        let grad = grad_res.to_dtype(DType::F32)?;
        let grad = if b == 1 {
            grad.reshape((c_out, ho * wo))?
        } else {
            grad.reshape((b, c_out, ho * wo))?.transpose(0, 1)?.contiguous()?.reshape((c_out, b * ho * wo))?
        };
        let (_, w_mat_t) = self.mats_f32()?;
        let dcols = w_mat_t.matmul(&grad)?.flatten_all()?.to_vec1::<f32>()?;
        let dx = col2im(&dcols, b, h, w, g);
        Tensor::from_vec(dx, (b, g.c_in, h, w), arg.device())?.to_dtype(arg.dtype()).map(Some)
    }
}

/// Attaches an output computed without a graph (`y`, the second argument) to the input `x`,
/// with the frozen conv's input gradient as backward: a transposed convolution of the gradient
/// with the same kernel. Its forward is a copy of `y`, on any device.
struct AttachConvGrad {
    weight: Tensor,
    geometry: ConvGeometry,
}

impl CustomOp2 for AttachConvGrad {
    fn name(&self) -> &'static str {
        "frozen-conv2d-attach"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, y: &CpuStorage, yl: &Layout) -> Result<(CpuStorage, Shape)> {
        super::precomputed::copy_storage(y, yl)
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout, y: &CudaStorage, yl: &Layout) -> Result<(CudaStorage, Shape)> {
        super::precomputed::copy_storage(y, yl)
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = &self.geometry;
        let (_, _, h, w) = x.dims4()?;
        let (_, _, ho, wo) = grad.dims4()?;
        // A transposed conv maps Ho to (Ho−1)·s − 2p + k; output padding makes up the rows a
        // strided forward conv dropped.
        let out_pad = |full: usize, o: usize, k: usize| full + 2 * g.padding - ((o - 1) * g.stride + k);
        let (ph, pw) = (out_pad(h, ho, g.kh), out_pad(w, wo, g.kw));
        if ph != pw {
            candle_core::bail!("frozen conv backward: uneven output padding ({ph} vs {pw}) for input {h}x{w}");
        }
        let dx = grad.to_dtype(self.weight.dtype())?.conv_transpose2d(&self.weight, g.padding, ph, g.stride, 1)?;
        Ok((Some(dx.to_dtype(x.dtype())?), None))
    }
}

/// A frozen `Conv2d` (groups 1, dilation 1), the weights never get a gradient.
#[derive(Clone)]
pub struct FrozenConv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub(crate) geometry: ConvGeometry,
    /// The CPU op (im2col); `None` off the CPU.
    cpu_op: Option<Arc<Box<dyn CustomOp1 + Send + Sync>>>,
    /// Use the device path (candle conv + attached backward) even on the CPU (tests).
    force_attach: bool,
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
        // f32 and half precision go through the f32 im2col kernel; f64 (the parity tests' exact
        // mode) through candle's f64 conv and the attached backward.
        let cpu_op: Option<Arc<Box<dyn CustomOp1 + Send + Sync>>> = if weight.device().is_cpu() && weight.dtype() != DType::F64 {
            let w_mat = weight.reshape((c_out, c_in * kh * kw))?.contiguous()?;
            let is_f32 = weight.dtype() == DType::F32;
            Some(Arc::new(Box::new(FrozenConv2dOp { geometry, w_mat, is_f32 })))
        } else {
            None
        };
        Ok(Self { weight, bias, geometry, cpu_op, force_attach: false })
    }

    #[cfg(test)]
    /// Run the device path (candle's conv2d + attached input-gradient backward) on the CPU too,
    /// so that tests exercise the code the GPU runs.
    pub(crate) fn with_device_path(mut self) -> Self {
        self.force_attach = true;
        self
    }
}

impl FrozenConv2d {
    /// The convolution without its bias, `[B, C_out, H', W']` in the weight's dtype.
    pub(crate) fn forward_no_bias(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.geometry;
        let x = if x.dtype() == self.weight.dtype() { x.clone() } else { x.to_dtype(self.weight.dtype())? };
        let y = match &self.cpu_op {
            Some(op) if !self.force_attach && x.device().is_cpu() => x.contiguous()?.apply_op1_arc(op.clone())?,
            _ => {
                let y = x.detach().conv2d(&self.weight.detach(), g.padding, g.stride, 1, 1)?.contiguous()?;
                if x.track_op() {
                    x.apply_op2_arc(&y, Arc::new(Box::new(AttachConvGrad { weight: self.weight.clone(), geometry: g })))?
                } else {
                    y
                }
            }
        };
        Ok(y)
    }

    /// `y + bias` over the channel axis of `[B, C_out, H, W]`.
    pub(crate) fn add_bias(&self, y: Tensor) -> Result<Tensor> {
        match &self.bias {
            Some(b) => y.broadcast_add(&b.reshape((1, self.geometry.c_out, 1, 1))?),
            None => Ok(y),
        }
    }
}

impl Module for FrozenConv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.add_bias(self.forward_no_bias(x)?)
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

/// `x @ Wᵀ` for a frozen `W` `[out, in]` with the backend's own GEMM (any device, any float
/// dtype); backward `grad @ W` only.
struct FrozenMatmulOp {
    w: Tensor,
    /// `Wᵀ` `[in, out]` contiguous, kept on the CPU only (candle's CPU gemm is fastest, and
    /// rounds as the parity goldens were measured, with a contiguous right-hand side; on a GPU,
    /// cuBLAS reads the transposed view of `W` at no cost, and a copy would double the memory).
    w_t: Option<Tensor>,
}

impl FrozenMatmulOp {
    /// Run the backend's matmul of `x` `[rows, in]` with `Wᵀ`, a strided view of `W`.
    fn matmul<S: BackendStorage>(&self, x: &S, xl: &Layout, w: &S, wl: &Layout) -> Result<(S, Shape)> {
        let dims = xl.shape().dims();
        let k = *dims.last().unwrap_or(&1);
        let rows = xl.shape().elem_count() / k.max(1);
        let (n, wk) = wl.shape().dims2()?;
        if wk != k {
            candle_core::bail!("frozen-linear: input has {k} features, the weight expects {wk}");
        }
        if !xl.is_contiguous() || !wl.is_contiguous() {
            candle_core::bail!("frozen-linear: input and weight must be contiguous");
        }
        let x_mat = Layout::contiguous_with_offset((rows, k), xl.start_offset());
        let w_t = Layout::new(Shape::from((k, n)), vec![1, k], wl.start_offset());
        let y = x.matmul(w, (1, rows, n, k), &x_mat, &w_t)?;
        let mut out_dims = dims[..dims.len() - 1].to_vec();
        out_dims.push(n);
        Ok((y, Shape::from(out_dims)))
    }
}

impl FrozenMatmulOp {
    /// `x` `[rows, in]` times a contiguous `Wᵀ` `[in, out]`.
    fn matmul_contiguous_rhs(&self, x: &CpuStorage, xl: &Layout, w_t: &CpuStorage, wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = xl.shape().dims();
        let k = *dims.last().unwrap_or(&1);
        let rows = xl.shape().elem_count() / k.max(1);
        let (wk, n) = wl.shape().dims2()?;
        if wk != k {
            candle_core::bail!("frozen-linear: input has {k} features, the weight expects {wk}");
        }
        if !xl.is_contiguous() {
            candle_core::bail!("frozen-linear: input must be contiguous");
        }
        let x_mat = Layout::contiguous_with_offset((rows, k), xl.start_offset());
        let y = x.matmul(w_t, (1, rows, n, k), &x_mat, wl)?;
        let mut out_dims = dims[..dims.len() - 1].to_vec();
        out_dims.push(n);
        Ok((y, Shape::from(out_dims)))
    }
}

impl CustomOp1 for FrozenMatmulOp {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let _p = crate::util::profile::scope("linear.fwd");
        if let Some(w_t) = &self.w_t {
            let (guard, wl) = w_t.storage_and_layout();
            let Storage::Cpu(w_t) = &*guard else { candle_core::bail!("frozen-linear: input on the CPU, weight elsewhere") };
            return self.matmul_contiguous_rhs(storage, layout, w_t, wl);
        }
        let (guard, wl) = self.w.storage_and_layout();
        let Storage::Cpu(w) = &*guard else { candle_core::bail!("frozen-linear: input on the CPU, weight elsewhere") };
        self.matmul(storage, layout, w, wl)
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let (guard, wl) = self.w.storage_and_layout();
        let Storage::Cuda(w) = &*guard else { candle_core::bail!("frozen-linear: input on a GPU, weight elsewhere") };
        self.matmul(storage, layout, w, wl)
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> Result<Option<Tensor>> {
        let _p = crate::util::profile::scope("linear.bwd");
        let out_dim = self.w.dim(0)?;
        let rows = grad_res.elem_count() / out_dim;
        let g = grad_res.to_dtype(self.w.dtype())?.reshape((rows, out_dim))?;
        Ok(Some(g.matmul(&self.w)?.reshape(arg.shape())?.to_dtype(arg.dtype())?))
    }
}

/// A cached frozen-matmul op for a weight; `None` for weights that are not plain matrices.
#[derive(Clone)]
pub struct FrozenMatmul(Option<Arc<Box<dyn CustomOp1 + Send + Sync>>>);

impl FrozenMatmul {
    pub fn new(weight: &Tensor) -> Result<Self> {
        if weight.rank() == 2 && weight.dtype().is_float() {
            let op = if weight.device().is_cpu() {
                // One buffer: `Wᵀ` contiguous (the forward's right-hand side) and `W` as a strided
                // view of it for the backward. A weight that already is such a view (see
                // `AdaptedLinear::new`) is not copied.
                let t = weight.t()?;
                let w_t = if t.is_contiguous() { t.detach() } else { t.contiguous()?.detach() };
                FrozenMatmulOp { w: w_t.t()?, w_t: Some(w_t) }
            } else {
                FrozenMatmulOp { w: weight.contiguous()?.detach(), w_t: None }
            };
            Ok(Self(Some(Arc::new(Box::new(op)))))
        } else {
            Ok(Self(None))
        }
    }

    /// The plain candle path (used where the custom op does not apply).
    pub fn fallback() -> Self {
        Self(None)
    }

    /// `x @ weightᵀ` for `x` `[..., in]`; `weight` is the same tensor given to `new`. An input
    /// of another dtype is cast to the weight's (autocast: the frozen weight's dtype computes).
    pub fn forward(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        let x = if x.dtype() == weight.dtype() { x.clone() } else { x.to_dtype(weight.dtype())? };
        match &self.0 {
            Some(op) => x.contiguous()?.apply_op1_arc(op.clone()),
            None => {
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

    /// The device path (candle's conv2d on the detached input + the attached transposed-conv
    /// backward), run on the CPU: the same values and input gradient as candle's autograd, also
    /// for strided convs whose input size the stride does not divide (output padding).
    /// Tolerance 1e-5 relative to the largest value (f32, different summation order).
    #[test]
    fn device_path_conv_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        for &(b, c_in, c_out, h, w, k, stride, pad) in
            &[(2, 3, 5, 9, 9, 3, 1, 1), (1, 4, 6, 8, 8, 3, 2, 1), (1, 4, 6, 9, 9, 3, 2, 1), (2, 2, 3, 10, 10, 3, 2, 0), (3, 4, 2, 5, 6, 1, 1, 0)]
        {
            let weight = Tensor::randn(0f32, 1.0, (c_out, c_in, k, k), &dev)?;
            let x = Var::randn(0f32, 1.0, (b, c_in, h, w), &dev)?;
            let conv = FrozenConv2d::new(weight.clone(), None, stride, pad)?.with_device_path();
            let y = conv.forward(x.as_tensor())?;
            let expect = x.as_tensor().conv2d(&weight, pad, stride, 1, 1)?;
            assert!(max_rel(&y, &expect) < 1e-5, "forward differs beyond 1e-5 relative");
            let probe = Tensor::randn(0f32, 1.0, y.dims(), &dev)?;
            let g_ours = (y * &probe)?.sum_all()?.backward()?;
            let g_ref = (expect * &probe)?.sum_all()?.backward()?;
            let (a, r) = (g_ours.get(x.as_tensor()).expect("input gradient"), g_ref.get(x.as_tensor()).unwrap());
            assert!(max_rel(a, r) < 1e-5, "input gradient differs beyond 1e-5 relative for {h}x{w} stride {stride}");
            assert!(g_ours.get(&weight).is_none(), "frozen weight must get no gradient");
        }
        Ok(())
    }

    /// Half-precision frozen conv and linear on the CPU against the same computation in f32 on
    /// the rounded inputs. Tolerance: bf16 keeps 8 significant bits (relative rounding 2^-9 ≈
    /// 2e-3 per value); the outputs are sums of products of already-rounded values computed in
    /// f32 and rounded once, so they are within one output rounding (4e-3 relative to the largest
    /// value for bf16, 1e-3 for f16, ×2 margin).
    #[test]
    fn half_precision_frozen_ops_on_cpu() -> Result<()> {
        let dev = Device::Cpu;
        for (dtype, tol) in [(DType::BF16, 8e-3f32), (DType::F16, 2e-3)] {
            let weight = Tensor::randn(0f32, 1.0, (6, 4, 3, 3), &dev)?.to_dtype(dtype)?;
            let x = Var::randn(0f32, 1.0, (2, 4, 8, 8), &dev)?;
            let xh = x.as_tensor().to_dtype(dtype)?;
            let conv = FrozenConv2d::new(weight.clone(), None, 2, 1)?;
            let y = conv.forward(&xh)?;
            assert_eq!(y.dtype(), dtype);
            let expect = xh.to_dtype(DType::F32)?.conv2d(&weight.to_dtype(DType::F32)?, 1, 2, 1, 1)?;
            assert!(max_rel(&y.to_dtype(DType::F32)?, &expect) < tol, "{dtype:?} conv forward");
            let g = y.to_dtype(DType::F32)?.sum_all()?.backward()?;
            let gx = g.get(x.as_tensor()).expect("gradient reaches the f32 input through the cast");
            let g_ref = expect.sum_all()?.backward()?;
            // The reference's gradient flows to the same f32 input.
            assert!(max_rel(gx, g_ref.get(x.as_tensor()).unwrap()) < tol, "{dtype:?} conv input gradient");

            let w = Tensor::randn(0f32, 1.0, (7, 5), &dev)?.to_dtype(dtype)?;
            let fm = FrozenMatmul::new(&w)?;
            let xl = Var::randn(0f32, 1.0, (2, 3, 5), &dev)?;
            let y = fm.forward(&xl.as_tensor().to_dtype(dtype)?, &w)?;
            let expect = xl.as_tensor().to_dtype(dtype)?.to_dtype(DType::F32)?.broadcast_matmul(&w.to_dtype(DType::F32)?.t()?)?;
            assert!(max_rel(&y.to_dtype(DType::F32)?, &expect) < tol, "{dtype:?} linear forward");
            let g = y.to_dtype(DType::F32)?.sum_all()?.backward()?;
            assert!(g.get(xl.as_tensor()).is_some());
            assert!(g.get(&w).is_none());
        }
        Ok(())
    }
}
