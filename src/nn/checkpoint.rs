//! Gradient checkpointing for candle (which has no checkpoint primitive): run a piece of a
//! network (a closure over a module) forward without keeping its intermediate activations in
//! the autograd graph, recompute it in the backward pass, and hand the gradients of the
//! trainable `Var`s used inside it to an explicit side-channel accumulator ([`CheckpointGrads`])
//! that the trainer merges into the main `GradStore` after `loss.backward()`.
//!
//! How one piece is checkpointed ([`CheckpointGrads::checkpoint`]):
//! 1. The piece runs on *detached* inputs. Its LoRA `Var`s make it build a small graph, which is
//!    dropped as soon as the output storage is copied out.
//! 2. The output is returned as a `CustomOp3` over `(x, aux, anchor)`: the main graph keeps only
//!    those inputs (not the piece's intermediates) and the op, which holds a clone of the module.
//!    `anchor` is a one-element `Var` of this call, so the op is part of the graph even when no
//!    input carries a gradient (the first pieces of the UNet) but the piece holds trainable ones.
//! 3. The op's `bwd` recomputes the piece with its inputs as fresh `Var`s, runs
//!    `(out · grad).sum().backward()` on that sub-graph, returns the input gradients to candle's
//!    backward, and adds the gradients of every other `Var` of the sub-graph (the LoRA
//!    parameters) to the accumulator. The anchor gets no gradient.
//!
//! Counting: candle calls each op's `bwd` once per `backward()`, and the first forward never
//! computes gradients, so every parameter use inside a piece contributes exactly once. A handle
//! belongs to one forward pass (one micro-step): create it, run the forward and one backward,
//! then [`CheckpointGrads::merge_into`] that backward's `GradStore` (which drains it).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, TensorId, Var};

use super::precomputed::Precomputed;

/// A checkpointed piece: `(x, aux) -> out` (e.g. a resnet over hidden states and the time
/// embedding, or a transformer over hidden states and the text embeddings). It must compute the
/// same values every time it is called with the same inputs (no dropout, no random draws).
pub(crate) type Piece = dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync;

#[derive(Default)]
struct Inner {
    /// Gradients of trainable `Var`s used inside checkpointed pieces, by tensor id.
    grads: Mutex<HashMap<TensorId, Tensor>>,
    /// Pieces run as checkpoint ops (in the graph) since the handle was created.
    checkpointed: AtomicUsize,
    /// Pieces recomputed by a backward pass since the handle was created.
    recomputed: AtomicUsize,
}

/// The side channel of one forward pass with gradient checkpointing: where the recomputed
/// pieces put their parameters' gradients until the trainer merges them. Cheap to clone (all
/// clones share one accumulator).
#[derive(Clone, Default)]
pub struct CheckpointGrads {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CheckpointGrads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointGrads")
            .field("pending", &self.pending())
            .field("checkpointed", &self.checkpointed())
            .field("recomputed", &self.recomputed())
            .finish()
    }
}

impl CheckpointGrads {
    pub fn new() -> Self {
        Self::default()
    }

    /// Pieces that ran as checkpoint ops through this handle.
    pub fn checkpointed(&self) -> usize {
        self.inner.checkpointed.load(Ordering::SeqCst)
    }

    /// Pieces that a backward pass recomputed through this handle.
    pub fn recomputed(&self) -> usize {
        self.inner.recomputed.load(Ordering::SeqCst)
    }

    /// Parameters with a gradient waiting to be merged.
    pub fn pending(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<TensorId, Tensor>> {
        // A panic inside a backward leaves the map usable: the trainer fails the step anyway.
        self.inner.grads.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn accumulate(&self, id: TensorId, grad: Tensor) -> Result<()> {
        let mut map = self.lock();
        let total = match map.remove(&id) {
            Some(prev) => (prev + grad)?.detach(),
            None => grad,
        };
        map.insert(id, total);
        Ok(())
    }

    /// Add every pending parameter gradient to `grads` (summed with what the main graph gave the
    /// same parameter, if anything) and empty the accumulator. Returns how many were merged.
    pub fn merge_into(&self, grads: &mut GradStore) -> Result<usize> {
        let pending = std::mem::take(&mut *self.lock());
        let n = pending.len();
        for (id, g) in pending {
            let total = match grads.get_id(id) {
                Some(prev) => (prev + g)?.detach(),
                None => g,
            };
            grads.insert_id(id, total);
        }
        Ok(n)
    }

    /// `piece(x, aux)`, checkpointed: the result has the same value, but the graph keeps only
    /// `x` and `aux` for it, and the backward recomputes the piece. When neither input carries a
    /// gradient and the piece holds no `Var`, the plain result is returned (there is no graph).
    pub fn checkpoint<F>(&self, x: &Tensor, aux: &Tensor, piece: F) -> Result<Tensor>
    where
        F: Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
    {
        let out = piece(&x.detach(), &aux.detach())?;
        if !out.track_op() && !x.track_op() && !aux.track_op() {
            return Ok(out);
        }
        // Keep the storage, drop the transient graph of the first forward right here.
        let value = out.detach();
        drop(out);
        let anchor = Var::zeros(1, x.dtype(), x.device())?;
        let op = CheckpointOp { piece: Arc::new(piece), pending: Precomputed::new(value, "checkpoint op"), sink: self.clone() };
        let result = x.apply_op3_arc(aux, anchor.as_tensor(), Arc::new(Box::new(op)))?;
        self.inner.checkpointed.fetch_add(1, Ordering::SeqCst);
        Ok(result)
    }
}

#[cfg(test)]
/// `piece(x, aux)`, checkpointed through `ckpt` when given, else run directly.
pub(crate) fn maybe_checkpoint<F>(ckpt: Option<&CheckpointGrads>, x: &Tensor, aux: &Tensor, piece: F) -> Result<Tensor>
where
    F: Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync + 'static,
{
    match ckpt {
        Some(c) => c.checkpoint(x, aux, piece),
        None => piece(x, aux),
    }
}

/// The checkpoint op of one piece. Its forward returns the output computed before the op was
/// applied (taken from `pending`, so the op in the graph holds no tensor); its backward
/// recomputes the piece.
struct CheckpointOp {
    piece: Arc<Piece>,
    pending: Precomputed,
    sink: CheckpointGrads,
}

/// A fresh leaf for an input of the recomputation: a new `Var` (own id, own storage) when the
/// input needs a gradient, the detached value otherwise.
fn fresh_input(t: &Tensor) -> Result<(Tensor, Option<Var>)> {
    if t.track_op() {
        let v = Var::from_tensor(&t.detach())?;
        Ok((v.as_tensor().clone(), Some(v)))
    } else {
        Ok((t.detach(), None))
    }
}

impl CustomOp3 for CheckpointOp {
    fn name(&self) -> &'static str {
        "checkpoint"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        self.pending.take_cpu()
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
        self.pending.take_cuda()
    }

    fn bwd(
        &self,
        x: &Tensor,
        aux: &Tensor,
        _anchor: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (x_in, x_var) = fresh_input(x)?;
        let (aux_in, aux_var) = fresh_input(aux)?;
        let out = (self.piece)(&x_in, &aux_in)?;
        self.sink.inner.recomputed.fetch_add(1, Ordering::SeqCst);
        if !out.track_op() {
            return Ok((None, None, None));
        }
        if out.dims() != grad.dims() {
            candle_core::bail!("checkpoint op: the recomputed piece has shape {:?}, its gradient {:?}", out.dims(), grad.dims())
        }
        let target = out.mul(&grad.detach())?.sum_all()?;
        let input_ids: Vec<TensorId> = x_var.iter().chain(aux_var.iter()).map(|v| v.as_tensor().id()).collect();
        let params: Vec<TensorId> =
            target.sorted_nodes().into_iter().filter(|n| n.is_variable() && !input_ids.contains(&n.id())).map(|n| n.id()).collect();
        let mut grads = target.backward()?;
        drop(target);
        drop(out);
        for id in params {
            if let Some(g) = grads.get_id(id) {
                self.sink.accumulate(id, g.detach())?;
            }
        }
        let take = |v: Option<Var>, grads: &mut GradStore| v.and_then(|v| grads.remove(v.as_tensor())).map(|g| g.detach());
        let gx = take(x_var, &mut grads);
        let gaux = take(aux_var, &mut grads);
        Ok((gx, gaux, None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Module};

    use crate::nn::{AdaptedLinear, GroupNorm, LoraBranch};

    fn max_abs(t: &Tensor) -> f32 {
        t.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    /// A piece with a LoRA linear, a group norm (many intermediates) and a nonlinearity; `aux`
    /// enters through a broadcast add.
    struct Toy {
        lin: AdaptedLinear,
        norm: GroupNorm,
    }

    fn toy(dev: &Device) -> Result<(Toy, Var, Var)> {
        let w = Tensor::randn(0f32, 0.5, (8, 8), dev)?;
        let b = Tensor::randn(0f32, 0.5, 8, dev)?;
        let a = Var::randn(0f32, 0.5, (2, 8), dev)?;
        let up = Var::randn(0f32, 0.5, (8, 2), dev)?;
        let mut lin = AdaptedLinear::new("toy", w, Some(b));
        lin.loras.push(LoraBranch::new(a.as_tensor().clone(), up.as_tensor().clone(), 0.75));
        let norm = GroupNorm { num_groups: 2, weight: Tensor::ones(8, DType::F32, dev)?, bias: Tensor::zeros(8, DType::F32, dev)?, eps: 1e-5 };
        Ok((Toy { lin, norm }, a, up))
    }

    fn toy_forward(t: &Toy, x: &Tensor, aux: &Tensor) -> Result<Tensor> {
        // x [B, 8, 4]: norm over channels, then the linear over the last dim after a transpose.
        let h = t.norm.forward(x)?.transpose(1, 2)?.contiguous()?;
        let h = t.lin.forward(&h)?.silu()?;
        h.broadcast_add(aux)?.transpose(1, 2)
    }

    /// Gradients of x, aux and both LoRA tensors through two chained pieces, with and without
    /// checkpointing. The recomputation runs the same kernels on the same values, so the
    /// results agree to f32 rounding of a different summation order: 1e-6 relative to the
    /// largest gradient.
    #[test]
    fn checkpointed_pieces_give_the_same_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let (t, a, up) = toy(&dev)?;
        let t = Arc::new(t);
        let x = Var::randn(0f32, 1.0, (3, 8, 4), &dev)?;
        let aux = Var::randn(0f32, 1.0, (3, 1, 8), &dev)?;
        let probe = Tensor::randn(0f32, 1.0, (3, 8, 4), &dev)?;
        let run = |ckpt: Option<&CheckpointGrads>| -> Result<(Tensor, GradStore)> {
            let (t1, t2) = (t.clone(), t.clone());
            let h = maybe_checkpoint(ckpt, x.as_tensor(), aux.as_tensor(), move |x, a| toy_forward(&t1, x, a))?;
            let h = maybe_checkpoint(ckpt, &h, aux.as_tensor(), move |x, a| toy_forward(&t2, x, a))?;
            let loss = (&h * &probe)?.sum_all()?;
            let mut grads = loss.backward()?;
            if let Some(c) = ckpt {
                c.merge_into(&mut grads)?;
            }
            Ok((h, grads))
        };
        let (h_plain, g_plain) = run(None)?;
        let ckpt = CheckpointGrads::new();
        let (h_ckpt, g_ckpt) = run(Some(&ckpt))?;
        assert_eq!(ckpt.checkpointed(), 2);
        assert_eq!(ckpt.recomputed(), 2, "each piece is recomputed exactly once by one backward");
        assert_eq!(ckpt.pending(), 0, "merge_into drains the accumulator");
        assert_eq!(max_abs(&(&h_plain - &h_ckpt)?), 0.0, "the forward value is the piece's own output");
        for (name, v) in [("x", &x), ("aux", &aux), ("lora down", &a), ("lora up", &up)] {
            let p = g_plain.get(v.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient without checkpointing"));
            let c = g_ckpt.get(v.as_tensor()).unwrap_or_else(|| panic!("{name}: no gradient with checkpointing"));
            let scale = max_abs(p);
            assert!(scale > 0.0, "{name}: zero gradient");
            let diff = max_abs(&(p - c)?);
            assert!(diff <= 1e-6 * scale, "{name}: max diff {diff} vs max |grad| {scale} (tolerance 1e-6 relative)");
        }
        Ok(())
    }

    /// When no input carries a gradient (the first pieces of the UNet) the LoRA parameters inside
    /// the piece still get theirs, through the anchor; and the main graph keeps no piece
    /// intermediates: its only nodes are the op, its inputs and the anchor.
    #[test]
    fn parameters_get_gradients_when_no_input_needs_one() -> Result<()> {
        let dev = Device::Cpu;
        let (t, a, up) = toy(&dev)?;
        let t = Arc::new(t);
        let x = Tensor::randn(0f32, 1.0, (2, 8, 4), &dev)?;
        let aux = Tensor::randn(0f32, 1.0, (2, 1, 8), &dev)?;
        let ckpt = CheckpointGrads::new();
        let t1 = t.clone();
        let h = ckpt.checkpoint(&x, &aux, move |x, a| toy_forward(&t1, x, a))?;
        let loss = h.sqr()?.sum_all()?;
        // sum_all (a sum and a reshape), sqr, the op and the anchor Var: nothing from inside the
        // piece, whose own graph (LoRA branch, silu, add, transposes) has more than ten.
        let nodes = loss.sorted_nodes();
        assert!(nodes.iter().all(|n| n.id() != a.as_tensor().id() && n.id() != up.as_tensor().id()));
        assert_eq!(nodes.len(), 5, "the graph must not hold the piece's intermediates");
        let plain_nodes = toy_forward(&t, &x, &aux)?.sqr()?.sum_all()?.sorted_nodes().len();
        assert!(plain_nodes > 10, "the plain graph has {plain_nodes} nodes");
        let mut grads = loss.backward()?;
        assert!(grads.get(a.as_tensor()).is_none(), "parameter gradients come only through the side channel");
        assert_eq!(ckpt.merge_into(&mut grads)?, 2);
        let plain = toy_forward(&t, &x, &aux)?.sqr()?.sum_all()?.backward()?;
        for (name, v) in [("lora down", &a), ("lora up", &up)] {
            let p = plain.get(v.as_tensor()).unwrap();
            let c = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{name}: lost with checkpointing"));
            let diff = max_abs(&(p - c)?);
            assert!(max_abs(p) > 0.0 && diff <= 1e-6 * max_abs(p), "{name}: diff {diff} (tolerance 1e-6 relative)");
        }
        Ok(())
    }

    /// A piece without `Var`s whose inputs need no gradient is not put in the graph at all.
    #[test]
    fn frozen_piece_on_constant_inputs_is_not_checkpointed() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 3), &dev)?;
        let ckpt = CheckpointGrads::new();
        let y = ckpt.checkpoint(&x, &x, |x, a| (x * a)?.exp())?;
        assert!(!y.track_op());
        assert_eq!(ckpt.checkpointed(), 0);
        Ok(())
    }

    /// Merging adds to what the main graph already gave a parameter (a parameter used both
    /// inside and outside checkpointed pieces), instead of replacing it.
    #[test]
    fn merge_adds_to_existing_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let w = Var::randn(0f32, 1.0, (4,), &dev)?;
        let x = Tensor::randn(0f32, 1.0, (4,), &dev)?;
        let w2 = w.as_tensor().clone();
        let ckpt = CheckpointGrads::new();
        let inside = ckpt.checkpoint(&x, &x, move |x, _| x.mul(&w2))?;
        let outside = (x.mul(w.as_tensor())? * 3.0)?;
        let mut grads = (inside + outside)?.sum_all()?.backward()?;
        ckpt.merge_into(&mut grads)?;
        // d/dw sum(x*w + 3*x*w) = 4x.
        let expect = (&x * 4.0)?;
        let diff = max_abs(&(grads.get(w.as_tensor()).unwrap() - expect)?);
        assert!(diff <= 1e-6, "diff {diff}");
        Ok(())
    }
}
