//! A value computed outside candle's graph, handed back by a custom op's forward so that the op's
//! own backward is what the graph records (frozen conv on the GPU, chunked attention, gradient
//! checkpointing): the once-only slot that holds it, and the storage copy the forwards return.

use std::sync::Mutex;

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{CpuStorage, CudaStorage, Layout, Result, Shape, Storage, Tensor};

/// A contiguous copy of the part of `src` that `layout` addresses, with its shape: what a custom
/// op's forward returns for a value it did not compute itself (any backend).
pub(crate) fn copy_storage<S>(src: &S, layout: &Layout) -> Result<(S, Shape)>
where
    S: BackendStorage,
    S::Device: BackendDevice<Storage = S>,
{
    // SAFETY: every element of the new storage is written by `copy_strided_src` just below.
    let mut dst = unsafe { src.device().alloc_uninit(layout.shape(), src.dtype())? };
    src.copy_strided_src(&mut dst, 0, layout)?;
    Ok((dst, layout.shape().clone()))
}

/// The precomputed output of one op application. The forward takes it (so the op in the graph
/// holds no second reference to the values); a second forward of the same op is an error.
pub(crate) struct Precomputed {
    value: Mutex<Option<Tensor>>,
    /// Names the op in errors.
    what: &'static str,
}

impl Precomputed {
    pub(crate) fn new(value: Tensor, what: &'static str) -> Self {
        Self { value: Mutex::new(Some(value)), what }
    }

    fn take(&self) -> Result<Tensor> {
        self.value
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: forward ran twice (its output was already taken; make a fresh op per call)", self.what)))
    }

    /// The value as CPU storage, for `cpu_fwd`.
    pub(crate) fn take_cpu(&self) -> Result<(CpuStorage, Shape)> {
        let out = self.take()?;
        let (storage, layout) = out.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => copy_storage(s, layout),
            _ => candle_core::bail!("{}: the precomputed output is not on the CPU like the op's inputs", self.what),
        }
    }

    /// The value as CUDA storage, for `cuda_fwd` (compiles against candle's dummy CUDA backend
    /// too; a build without the `cuda` feature never reaches it).
    pub(crate) fn take_cuda(&self) -> Result<(CudaStorage, Shape)> {
        let out = self.take()?;
        let (storage, layout) = out.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => copy_storage(s, layout),
            _ => candle_core::bail!("{}: the precomputed output is not on the GPU like the op's inputs", self.what),
        }
    }
}
