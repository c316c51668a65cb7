//! Layer norm and group norm composed from differentiable candle ops (candle's fused
//! `layer_norm`/`rms_norm` kernels have no backward, so gradients would silently stop there).

use candle_core::{DType, Result, Tensor, D};
use candle_nn::VarBuilder;

/// `LayerNorm` over the last dimension with an affine weight and bias (torch `nn.LayerNorm`).
#[derive(Clone, Debug)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    /// Load `weight` and `bias` of shape `[dim]` from `vb`.
    pub fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: vb.get(dim, "weight")?, bias: vb.get(dim, "bias")?, eps })
    }

    /// `(x - mean) / sqrt(var + eps) * weight + bias` over the last dimension, computed in f32
    /// for half-precision inputs as torch does.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = upcast(x)?;
        let mean = x.mean_keepdim(D::Minus1)?;
        let centered = x.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?.to_dtype(dtype)?;
        normed.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
}

/// `GroupNorm` over `[B, C, ...]` with per-channel affine weight and bias (torch `nn.GroupNorm`).
#[derive(Clone, Debug)]
pub struct GroupNorm {
    pub(crate) num_groups: usize,
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl GroupNorm {
    /// Load `weight` and `bias` of shape `[channels]`; `channels` must divide into `num_groups`.
    pub fn load(vb: VarBuilder, num_groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if num_groups == 0 || channels % num_groups != 0 {
            candle_core::bail!(
                "group norm `{}`: {channels} channels cannot be split into {num_groups} groups",
                vb.prefix()
            )
        }
        Ok(Self { num_groups, weight: vb.get(channels, "weight")?, bias: vb.get(channels, "bias")?, eps })
    }

    pub fn channels(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Normalise each group of channels over its channels and spatial positions (the fused CPU
    /// f32 kernel of `nn::fused_norm` where it applies, else composed ops).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match super::fused_norm::group_norm_cpu(x, &self.weight, &self.bias, self.num_groups, self.eps, false) {
            Some(y) => y,
            None => self.forward_composed(x),
        }
    }

    /// `act(self.forward(x))`, one fused kernel for SiLU on the CPU in f32.
    pub(crate) fn forward_act(&self, x: &Tensor, act: super::Activation) -> Result<Tensor> {
        if act == super::Activation::Silu {
            if let Some(y) = super::fused_norm::group_norm_cpu(x, &self.weight, &self.bias, self.num_groups, self.eps, true) {
                return y;
            }
        }
        act.forward(&self.forward(x)?)
    }

    /// The norm from candle ops, each with its own backward (any device and dtype).
    pub(crate) fn forward_composed(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        if dims.len() < 3 || dims[1] != self.channels() {
            candle_core::bail!(
                "group norm expects [B, {}, ...], got input of shape {:?}",
                self.channels(),
                dims
            )
        }
        let dtype = x.dtype();
        let grouped = upcast(&x.reshape((dims[0], self.num_groups, ()))?)?;
        let mean = grouped.mean_keepdim(D::Minus1)?;
        let centered = grouped.broadcast_sub(&mean)?;
        let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centered.broadcast_div(&(var + self.eps)?.sqrt()?)?.to_dtype(dtype)?.reshape(dims.as_slice())?;
        let mut affine_shape = vec![1usize; dims.len()];
        affine_shape[1] = dims[1];
        normed
            .broadcast_mul(&self.weight.reshape(affine_shape.as_slice())?)?
            .broadcast_add(&self.bias.reshape(affine_shape.as_slice())?)
    }
}

fn upcast(x: &Tensor) -> Result<Tensor> {
    match x.dtype() {
        DType::F16 | DType::BF16 => x.to_dtype(DType::F32),
        _ => Ok(x.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Naive per-group statistics, computed element by element on the host.
    fn naive_group_norm(x: &[f32], b: usize, c: usize, hw: usize, groups: usize, w: &[f32], bias: &[f32], eps: f32) -> Vec<f32> {
        let mut out = vec![0f32; x.len()];
        let per = c / groups;
        for n in 0..b {
            for g in 0..groups {
                let idx: Vec<usize> = (g * per..(g + 1) * per).flat_map(|ch| (0..hw).map(move |p| (n * c + ch) * hw + p)).collect();
                let mean = idx.iter().map(|&i| x[i]).sum::<f32>() / idx.len() as f32;
                let var = idx.iter().map(|&i| (x[i] - mean).powi(2)).sum::<f32>() / idx.len() as f32;
                for &i in &idx {
                    let ch = (i / hw) % c;
                    out[i] = (x[i] - mean) / (var + eps).sqrt() * w[ch] + bias[ch];
                }
            }
        }
        out
    }

    #[test]
    fn group_norm_matches_naive_and_has_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let (b, c, h, w) = (2, 6, 3, 4);
        let x = Var::randn(0.5f32, 2.0, (b, c, h, w), &dev)?;
        let weight = Tensor::randn(1f32, 0.3, c, &dev)?;
        let bias = Tensor::randn(0f32, 0.3, c, &dev)?;
        let norm = GroupNorm { num_groups: 3, weight: weight.clone(), bias: bias.clone(), eps: 1e-6 };
        let y = norm.forward(x.as_tensor())?;
        let expect = naive_group_norm(
            &x.flatten_all()?.to_vec1()?,
            b,
            c,
            h * w,
            3,
            &weight.to_vec1()?,
            &bias.to_vec1()?,
            1e-6,
        );
        let got: Vec<f32> = y.flatten_all()?.to_vec1()?;
        let diff = got.iter().zip(&expect).map(|(a, e)| (a - e).abs()).fold(0f32, f32::max);
        // Tolerance 1e-5 absolute on unit-scale outputs (f32 rounding only).
        assert!(diff < 1e-5, "group norm vs naive: max abs diff {diff}");
        // Gradient flows back to the input (the path a LoRA gradient takes).
        let grads = (y * Tensor::randn(0f32, 1.0, (b, c, h, w), &dev)?)?.sum_all()?.backward()?;
        let g = grads.get(x.as_tensor()).expect("gradient reaches the input");
        assert!(g.abs()?.max_all()?.to_scalar::<f32>()? > 0.0);
        Ok(())
    }

    #[test]
    fn layer_norm_gradient_matches_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::randn(0f32, 1.0, (3, 8), &dev)?;
        let norm = LayerNorm { weight: Tensor::randn(1f32, 0.2, 8, &dev)?, bias: Tensor::randn(0f32, 0.2, 8, &dev)?, eps: 1e-5 };
        let probe = Tensor::randn(0f32, 1.0, (3, 8), &dev)?;
        let loss = |x: &Tensor| -> Result<f32> { norm.forward(x)?.mul(&probe)?.sum_all()?.to_scalar::<f32>() };
        let grads = norm.forward(x.as_tensor())?.mul(&probe)?.sum_all()?.backward()?;
        let analytic: Vec<f32> = grads.get(x.as_tensor()).expect("gradient").flatten_all()?.to_vec1()?;
        let base: Vec<f32> = x.flatten_all()?.to_vec1()?;
        let h = 1e-2f32;
        for i in [0usize, 5, 11, 23] {
            let mut plus = base.clone();
            plus[i] += h;
            let mut minus = base.clone();
            minus[i] -= h;
            let numeric = (loss(&Tensor::from_vec(plus, (3, 8), &dev)?)? - loss(&Tensor::from_vec(minus, (3, 8), &dev)?)?) / (2.0 * h);
            // Central differences in f32 with h = 1e-2: agree to 2e-2 absolute.
            assert!((numeric - analytic[i]).abs() < 2e-2, "element {i}: numeric {numeric} vs analytic {}", analytic[i]);
        }
        Ok(())
    }
}
