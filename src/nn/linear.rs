//! `AdaptedLinear`: a frozen linear layer (`y = x Wᵀ + b`) that can carry LoRA branches
//! (`y += scale · (x Aᵀ) Bᵀ`), PEFT's `lora.Linear` in candle, and DoRA branches (PEFT's
//! `use_dora`: `y = (m / ‖W + s·B A‖) ⊙ (x Wᵀ + s·x Aᵀ Bᵀ) + b`, the norm per output row and
//! detached, as PEFT computes it).
//!
//! Every model layer that LoRA can target (attention projections, CLIP's q/k/v/out) is an
//! `AdaptedLinear` with its full diffusers/transformers module name, so `adapters::lora`
//! finds targets by name and the trainer owns the LoRA tensors as `Var`s.

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::frozen::FrozenMatmul;

/// One LoRA branch: `down` is A `[r, in]` (a conv's `[r, in, kh, kw]`), `up` is B `[out, r]`,
/// `scale` is alpha / r times the user's strength; `magnitude` (`[out]`) makes it a DoRA
/// branch. Tensors may be `Var`s (training) or plain tensors (inference).
#[derive(Clone, Debug)]
pub struct LoraBranch {
    pub down: Tensor,
    pub up: Tensor,
    pub scale: f64,
    /// DoRA's magnitude m, one value per output channel (PEFT's `lora_magnitude_vector`).
    pub magnitude: Option<Tensor>,
}

impl LoraBranch {
    /// A plain LoRA branch.
    pub fn new(down: Tensor, up: Tensor, scale: f64) -> Self {
        Self { down, up, scale, magnitude: None }
    }

    pub fn rank(&self) -> usize {
        self.down.dims()[0]
    }

    /// `scale · up @ down`, the weight delta this branch adds, in `dtype` and in the shape of
    /// `weight_shape` (`[out, in]`, or a conv's `[out, in, kh, kw]`).
    pub(crate) fn delta_weight_shaped(&self, weight_shape: &[usize], dtype: DType) -> Result<Tensor> {
        let r = self.rank();
        let down = self.down.to_dtype(dtype)?.reshape((r, ()))?;
        let up = self.up.to_dtype(dtype)?.reshape((weight_shape[0], r))?;
        (up.matmul(&down)? * self.scale)?.reshape(weight_shape)
    }

    /// DoRA's per-output-channel factor `m / ‖W + ΔW‖` (`[out]`), the norm over every axis but
    /// the first and detached (PEFT, and the DoRA paper §4.3); `None` for plain LoRA. Computed
    /// in f32, or f64 for an f64 weight.
    pub(crate) fn dora_factor(&self, weight: &Tensor) -> Result<Option<Tensor>> {
        let Some(m) = &self.magnitude else { return Ok(None) };
        let out = weight.dims()[0];
        let dtype = merge_dtype(weight);
        let merged = (weight.detach().to_dtype(dtype)? + self.delta_weight_shaped(weight.dims(), dtype)?.detach())?;
        let norm = merged.reshape((out, ()))?.sqr()?.sum(1)?.sqrt()?;
        Ok(Some(m.to_dtype(dtype)?.reshape(out)?.div(&norm)?))
    }

    /// The weight this branch merges to: `W + ΔW`, times `m / ‖W + ΔW‖` for DoRA (in f32, or
    /// f64 for an f64 weight).
    pub(crate) fn merged_weight(&self, weight: &Tensor) -> Result<Tensor> {
        let dtype = merge_dtype(weight);
        let merged = (weight.to_dtype(dtype)? + self.delta_weight_shaped(weight.dims(), dtype)?)?;
        match self.dora_factor(weight)? {
            None => Ok(merged),
            Some(g) => {
                let mut shape = vec![1usize; weight.rank()];
                shape[0] = weight.dims()[0];
                merged.broadcast_mul(&g.reshape(shape)?)
            }
        }
    }
}

/// The dtype weights and their LoRA deltas are combined in: f64 for f64 weights, else f32.
fn merge_dtype(weight: &Tensor) -> DType {
    if weight.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// `y += s·lora` for a plain branch, `y += (g − 1)·base + g·s·lora` for a DoRA branch with
/// factor `g` (PEFT's form: `base` is the bias-free base output, the bias is added after).
/// `channel_dim` is the axis of the output channels in `y` (last for a linear, 1 for a conv).
pub(crate) fn add_branch(y: Tensor, base: &Tensor, lora: Tensor, scale: f64, factor: Option<Tensor>, channel_dim: usize) -> Result<Tensor> {
    let lora = (lora * scale)?;
    match factor {
        None => y + lora,
        Some(g) => {
            let mut shape = vec![1usize; y.rank()];
            shape[channel_dim] = g.dims()[0];
            let g = g.to_dtype(y.dtype())?.reshape(shape)?;
            let g1 = g.affine(1.0, -1.0)?;
            (y + base.broadcast_mul(&g1)?)? + lora.broadcast_mul(&g)?
        }
    }
}

#[derive(Clone, Debug)]
pub struct AdaptedLinear {
    /// Full module name inside its model, e.g.
    /// `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`.
    pub name: String,
    /// `[out, in]`, frozen.
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub loras: Vec<LoraBranch>,
    /// The base matmul as a custom op whose backward skips the frozen weight's gradient.
    base: FrozenMatmul,
}

impl AdaptedLinear {
    pub fn new(name: impl Into<String>, weight: Tensor, bias: Option<Tensor>) -> Self {
        // On the CPU the frozen matmul wants `Wᵀ` contiguous: keep the weight as a view of that one
        // buffer instead of holding both layouts (a full-size UNet's linears are ~1.4 GB in f32).
        let weight = if weight.device().is_cpu() && weight.rank() == 2 && !weight.t().is_ok_and(|t| t.is_contiguous()) {
            weight.t().and_then(|t| t.contiguous()).and_then(|t| t.t()).unwrap_or(weight)
        } else {
            weight
        };
        let base = FrozenMatmul::new(&weight).unwrap_or_else(|_| FrozenMatmul::fallback());
        Self { name: name.into(), weight, bias, loras: Vec::new(), base }
    }

    /// Load `weight` (and `bias` if `with_bias`) from `vb`, whose prefix is the module path.
    /// `name` is the module's full name used for LoRA matching.
    pub fn load(
        vb: VarBuilder,
        name: impl Into<String>,
        in_dim: usize,
        out_dim: usize,
        with_bias: bool,
    ) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if with_bias { Some(vb.get(out_dim, "bias")?) } else { None };
        Ok(Self::new(name, weight, bias))
    }

    pub fn in_features(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_features(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Fold every branch into the weight (`W += scale · B A`; DoRA: `W ← m/‖W + ΔW‖ · (W + ΔW)`)
    /// and drop the branches.
    pub fn merge(&mut self) -> Result<()> {
        for lora in self.loras.drain(..) {
            self.weight = lora.merged_weight(&self.weight)?.to_dtype(self.weight.dtype())?;
        }
        self.base = FrozenMatmul::new(&self.weight)?;
        Ok(())
    }
}

/// `x @ wᵀ` for x of any rank `[..., in]`: leading dimensions are flattened into one matmul.
fn linear_no_bias(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let dims = x.dims();
    let k = *dims.last().expect("linear input has at least one dimension");
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = x.reshape((rows, k))?.matmul(&w.t()?)?;
    let mut out_dims = dims[..dims.len() - 1].to_vec();
    out_dims.push(w.dims()[0]);
    y.reshape(out_dims)
}

impl Module for AdaptedLinear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let base = self.base.forward(x, &self.weight)?;
        // Plain LoRA adds its branches to `x Wᵀ + b` (the order PEFT sums in); DoRA needs the
        // bias-free base, and adds the bias last.
        let dora = self.loras.iter().any(|l| l.magnitude.is_some());
        let mut y = match (&self.bias, dora) {
            (Some(b), false) => base.broadcast_add(b)?,
            _ => base.clone(),
        };
        for lora in &self.loras {
            // PEFT casts the input to the LoRA dtype and the result back to the base dtype. Under
            // autocast (the reference's mixed precision) the branch's two matmuls then run in the
            // autocast dtype, which is the base's: f32 LoRA weights are cast to it, and their
            // gradients come back through the casts as f32. With an f32 base this is PEFT's
            // plain f32 branch.
            let dtype = y.dtype();
            let (down, up) = (lora.down.to_dtype(dtype)?, lora.up.to_dtype(dtype)?);
            let h = linear_no_bias(&x.to_dtype(dtype)?, &down)?;
            let h = linear_no_bias(&h, &up)?;
            let channel = y.rank() - 1;
            y = add_branch(y, &base, h, lora.scale, lora.dora_factor(&self.weight)?, channel)?;
        }
        match (&self.bias, dora) {
            (Some(b), true) => y.broadcast_add(b),
            _ => Ok(y),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn lora_forward_equals_merged_weight_and_grads_flow() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (5, 3), &dev)?;
        let b = Tensor::randn(0f32, 1.0, 5, &dev)?;
        let a = Var::randn(0f32, 1.0, (2, 3), &dev)?;
        let up = Var::randn(0f32, 1.0, (5, 2), &dev)?;
        let mut lin = AdaptedLinear::new("x", w.clone(), Some(b.clone()));
        lin.loras.push(LoraBranch::new(a.as_tensor().clone(), up.as_tensor().clone(), 0.5));
        let x = Tensor::randn(0f32, 1.0, (2, 4, 3), &dev)?;
        let y = lin.forward(&x)?;
        // Independent computation: merged weight.
        let merged = (w + (up.as_tensor().matmul(a.as_tensor())? * 0.5)?)?;
        let expect = x.broadcast_matmul(&merged.t()?)?.broadcast_add(&b)?;
        let diff = (y.clone() - expect)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "diff {diff}");
        let grads = y.sqr()?.sum_all()?.backward()?;
        assert!(grads.get(a.as_tensor()).is_some());
        assert!(grads.get(up.as_tensor()).is_some());
        Ok(())
    }

    /// A bf16 (and f16) base with f32 LoRA `Var`s: the output is in the base dtype and close to
    /// the all-f32 computation, and f32 gradients reach both LoRA parameters, close to the f32
    /// gradients.
    #[test]
    fn half_base_with_f32_lora_vars_gives_f32_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let (i, o, r) = (48, 40, 4);
        let w = Tensor::randn(0f32, 0.2, (o, i), &dev)?;
        let b = Tensor::randn(0f32, 0.2, o, &dev)?;
        let a = Var::randn(0f32, 0.25, (r, i), &dev)?;
        let up = Var::randn(0f32, 0.25, (o, r), &dev)?;
        let x = Tensor::randn(0f32, 1.0, (2, 6, i), &dev)?;
        let probe = Tensor::randn(0f32, 1.0, (2, 6, o), &dev)?;
        let run = |dtype: DType| -> Result<(Tensor, Tensor, Tensor)> {
            let mut lin = AdaptedLinear::new("x", w.to_dtype(dtype)?, Some(b.to_dtype(dtype)?));
            lin.loras.push(LoraBranch::new(a.as_tensor().clone(), up.as_tensor().clone(), 0.5));
            let y = lin.forward(&x.to_dtype(dtype)?)?;
            assert_eq!(y.dtype(), dtype, "the output keeps the base dtype");
            let loss = y.to_dtype(DType::F32)?.mul(&probe)?.sum_all()?;
            let grads = loss.backward()?;
            let ga = grads.get(a.as_tensor()).expect("gradient reaches lora A").clone();
            let gb = grads.get(up.as_tensor()).expect("gradient reaches lora B").clone();
            assert_eq!((ga.dtype(), gb.dtype()), (DType::F32, DType::F32), "LoRA gradients are f32");
            Ok((y.to_dtype(DType::F32)?, ga, gb))
        };
        let rel = |a: &Tensor, b: &Tensor| -> Result<f32> {
            Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()? / b.abs()?.max_all()?.to_scalar::<f32>()?)
        };
        let (y32, ga32, gb32) = run(DType::F32)?;
        // bf16 keeps 8 significant bits (relative rounding 2^-9 ≈ 2e-3 per value). Each output is a
        // 48-term dot product of rounded inputs plus a few rounded intermediates, so the error
        // relative to the largest value stays a small multiple of that (measured: bf16 4.5e-3,
        // f16 5.5e-4 at most); bounds 2e-2 for bf16 and 4e-3 for f16 (11 bits, 2^-12 ≈ 2.4e-4 per
        // rounding). An f32 computation would be ~1e-6, a dropped branch or a lost gradient ~1.
        for (dtype, tol) in [(DType::BF16, 2e-2f32), (DType::F16, 4e-3)] {
            let (y, ga, gb) = run(dtype)?;
            for (what, got, want) in [("output", &y, &y32), ("grad A", &ga, &ga32), ("grad B", &gb, &gb32)] {
                let e = rel(got, want)?;
                eprintln!("{dtype:?} {what}: relative error {e}");
                assert!(e < tol, "{dtype:?} {what}: relative error {e} (tolerance {tol})");
            }
        }
        Ok(())
    }
}
