//! `AdaptedConv2d`: a frozen `Conv2d` that can carry LoRA branches (kohya's LoCon, PEFT's
//! `lora.Conv2d`): `y = conv(x, W) + b + s · up(down(x))`, where `down` is a conv with the
//! layer's kernel, stride and padding (`[r, in, kh, kw]`) and `up` a 1x1 conv (`[out, r]`), and
//! DoRA branches (`y = g ⊙ (conv(x, W) + s · up(down(x))) + b`, `g = m / ‖W + ΔW‖` per output
//! channel, the norm over in × kh × kw and detached, as PEFT computes it).
//!
//! The resnets' `conv1`, `conv2` and `conv_shortcut` and the samplers' `conv` of the UNet are
//! `AdaptedConv2d`s named as in diffusers (`down_blocks.0.resnets.0.conv1`), so LoRA targets
//! them by name as it does the linear layers.

use candle_core::{Module, Result, Tensor};

use super::frozen::FrozenConv2d;
use super::linear::{add_branch, LoraBranch};

#[derive(Clone, Debug)]
pub struct AdaptedConv2d {
    /// Full module name inside its model, e.g. `down_blocks.0.resnets.0.conv1`.
    pub name: String,
    pub conv: FrozenConv2d,
    pub loras: Vec<LoraBranch>,
}

impl AdaptedConv2d {
    pub fn new(name: impl Into<String>, conv: FrozenConv2d) -> Self {
        Self { name: name.into(), conv, loras: Vec::new() }
    }

    pub fn in_channels(&self) -> usize {
        self.conv.geometry.c_in
    }

    pub fn out_channels(&self) -> usize {
        self.conv.geometry.c_out
    }

    /// `(kh, kw)`.
    pub fn kernel(&self) -> (usize, usize) {
        (self.conv.geometry.kh, self.conv.geometry.kw)
    }

    /// `(stride, padding)` of the layer, which its LoRA `down` conv shares.
    pub fn stride_padding(&self) -> (usize, usize) {
        (self.conv.geometry.stride, self.conv.geometry.padding)
    }

    /// The shape LoRA's `down` of rank `r` has here: `[r, in, kh, kw]`.
    pub fn down_shape(&self, r: usize) -> (usize, usize, usize, usize) {
        let (kh, kw) = self.kernel();
        (r, self.in_channels(), kh, kw)
    }

    /// Fold every branch into the weight and drop the branches.
    pub fn merge(&mut self) -> Result<()> {
        if self.loras.is_empty() {
            return Ok(());
        }
        let mut weight = self.conv.weight.clone();
        for lora in self.loras.drain(..) {
            weight = lora.merged_weight(&weight)?.to_dtype(weight.dtype())?;
        }
        let g = self.conv.geometry;
        self.conv = FrozenConv2d::new(weight, self.conv.bias.clone(), g.stride, g.padding)?;
        Ok(())
    }
}

impl Module for AdaptedConv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.loras.is_empty() {
            return self.conv.forward(x);
        }
        let base = self.conv.forward_no_bias(x)?;
        let dora = self.loras.iter().any(|l| l.magnitude.is_some());
        let mut y = if dora { base.clone() } else { self.conv.add_bias(base.clone())? };
        let (stride, padding) = self.stride_padding();
        for lora in &self.loras {
            // As in `AdaptedLinear`: the branch runs in the base dtype, its f32 parameters cast.
            let dtype = y.dtype();
            let r = lora.rank();
            let down = lora.down.to_dtype(dtype)?.reshape(self.down_shape(r))?;
            let up = lora.up.to_dtype(dtype)?.reshape((self.out_channels(), r, 1, 1))?;
            let h = x.to_dtype(dtype)?.conv2d(&down, padding, stride, 1, 1)?;
            let h = h.conv2d(&up, 0, 1, 1, 1)?;
            y = add_branch(y, &base, h, lora.scale, lora.dora_factor(&self.conv.weight)?, 1)?;
        }
        if dora {
            self.conv.add_bias(y)
        } else {
            Ok(y)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// A LoCon branch equals the conv with the merged weight `W + s · up @ down` (an independent
    /// computation through candle's own conv), and gradients reach both factors.
    #[test]
    fn conv_lora_equals_merged_weight() -> Result<()> {
        let dev = Device::Cpu;
        for (stride, padding) in [(1, 1), (2, 1)] {
            let w = Tensor::randn(0f32, 0.3, (5, 4, 3, 3), &dev)?;
            let b = Tensor::randn(0f32, 0.3, 5, &dev)?;
            let a = Var::randn(0f32, 0.3, (2, 4, 3, 3), &dev)?;
            let up = Var::randn(0f32, 0.3, (5, 2), &dev)?;
            let conv = FrozenConv2d::new(w.clone(), Some(b.clone()), stride, padding)?;
            let mut layer = AdaptedConv2d::new("c", conv);
            layer.loras.push(LoraBranch::new(a.as_tensor().clone(), up.as_tensor().clone(), 0.5));
            let x = Tensor::randn(0f32, 1.0, (2, 4, 7, 7), &dev)?;
            let y = layer.forward(&x)?;
            let merged = (&w + (up.as_tensor().matmul(&a.as_tensor().reshape((2, 36))?)? * 0.5)?.reshape((5, 4, 3, 3))?)?;
            let expect = x.conv2d(&merged, padding, stride, 1, 1)?.broadcast_add(&b.reshape((1, 5, 1, 1))?)?;
            let diff = (&y - expect)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "stride {stride}: diff {diff}");
            let grads = y.sqr()?.sum_all()?.backward()?;
            assert!(grads.get(a.as_tensor()).is_some() && grads.get(up.as_tensor()).is_some());
        }
        Ok(())
    }
}
