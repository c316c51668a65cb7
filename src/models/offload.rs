//! Moving the frozen encoders off the training device: a `VarBuilder` backend that records the
//! tensors a component was built from (by the names the network asked for), and the rebuild of
//! a component from those tensors on another device. With the encode cache serving every
//! latent and caption, training needs only the UNet on the GPU; the VAE encoder and the text
//! encoder move to host memory (and back when an encode stage needs them again).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

/// The tensors of one built component, by the names the network requested.
pub(crate) type Tensors = HashMap<String, Tensor>;

/// Wraps a backend and keeps every tensor it hands out (the same storage: no copy).
struct Recorder {
    inner: Box<dyn SimpleBackend>,
    seen: Arc<Mutex<Tensors>>,
}

impl Recorder {
    fn keep(&self, name: &str, t: Result<Tensor>) -> Result<Tensor> {
        let t = t?;
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), t.clone());
        Ok(t)
    }
}

impl SimpleBackend for Recorder {
    fn get(&self, s: Shape, name: &str, h: candle_nn::Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.keep(name, self.inner.get(s, name, h, dtype, dev))
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.keep(name, self.inner.get_unchecked(name, dtype, dev))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// A `VarBuilder` over `inner` that records what it hands out, and the record to read after
/// the build.
pub(crate) fn recording(inner: Box<dyn SimpleBackend>, dtype: DType, device: &Device) -> (VarBuilder<'static>, Arc<Mutex<Tensors>>) {
    let seen = Arc::new(Mutex::new(Tensors::new()));
    let vb = VarBuilder::from_backend(Box::new(Recorder { inner, seen: seen.clone() }), dtype, device.clone());
    (vb, seen)
}

/// Take the record out (after the build; the recorder is gone with its `VarBuilder`).
pub(crate) fn take(seen: Arc<Mutex<Tensors>>) -> Tensors {
    std::mem::take(&mut *seen.lock().unwrap_or_else(|e| e.into_inner()))
}

/// `tensors` copied to `device` (the same tensors when they are there already).
pub(crate) fn to_device(tensors: &Tensors, device: &Device) -> Result<Tensors> {
    tensors.iter().map(|(k, t)| Ok((k.clone(), t.to_device(device)?))).collect()
}

/// Bytes held by `tensors`.
pub(crate) fn bytes(tensors: &Tensors) -> usize {
    tensors.values().map(|t| t.elem_count() * t.dtype().size_in_bytes()).sum()
}

/// Rebuild a component from recorded tensors on `device` (in `dtype`, as first built): the
/// network asks for the same names and gets these tensors, moved.
pub(crate) fn rebuild<M>(tensors: &Tensors, dtype: DType, device: &Device, build: impl FnOnce(VarBuilder<'static>) -> Result<M>) -> Result<(M, Tensors)> {
    let moved = to_device(tensors, device)?;
    let model = build(VarBuilder::from_tensors(moved.clone(), dtype, device))?;
    Ok((model, moved))
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device, Tensor};

    use crate::models::loading::{LoadOptions, StableDiffusion};

    fn tiny() -> StableDiffusion {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-sd");
        let opts = LoadOptions { movable_encoders: true, ..Default::default() };
        StableDiffusion::load(dir, &opts, &Device::Cpu, DType::F32).expect("the tiny fixture loads")
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    /// Parking rebuilds the text encoder and the VAE encoder from the tensors recorded at load
    /// (here CPU to CPU, the path a GPU run takes to the host): every tensor the networks ask
    /// for must be in the record, and the rebuilt networks compute exactly what the originals
    /// did (the same weights and kernels: bit-equal). Unparking rebuilds them again.
    #[test]
    fn parked_encoders_compute_what_they_did() -> anyhow::Result<()> {
        let mut sd = tiny();
        let dev = Device::Cpu;
        let text = sd.text_embeddings(&["a red square", ""], &dev)?.context;
        let px = Tensor::randn(0f32, 0.5, (1, 3, 32, 32), &dev)?;
        let dist = sd.vae.encode(&px)?;
        let decoded = sd.vae.decode(&dist.mean)?;
        let moved = sd.move_encoders(true, true, &dev, true)?;
        assert!(moved > 0);
        assert_eq!(sd.parked(), (true, true));
        assert_eq!(max_diff(&sd.text_embeddings(&["a red square", ""], &dev)?.context, &text), 0.0);
        let again = sd.vae.encode(&px)?;
        assert_eq!(max_diff(&again.mean, &dist.mean), 0.0);
        assert_eq!(max_diff(&again.std()?, &dist.std()?), 0.0);
        // The decoder half was not rebuilt and still works.
        assert_eq!(max_diff(&sd.vae.decode(&dist.mean)?, &decoded), 0.0);
        sd.unpark_encoders(&dev)?;
        assert_eq!(sd.parked(), (false, false));
        assert_eq!(max_diff(&sd.vae.encode(&px)?.mean, &dist.mean), 0.0);
        // On the CPU already: parking is a no-op.
        assert_eq!(sd.park_encoders(true, true)?, 0);
        assert_eq!(sd.parked(), (false, false));
        // Loaded without the record (the default), nothing is kept and moving is refused.
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-sd");
        let mut plain = StableDiffusion::load(dir, &LoadOptions::default(), &dev, DType::F32)?;
        assert!(plain.move_encoders(true, false, &dev, true).is_err());
        Ok(())
    }
}
