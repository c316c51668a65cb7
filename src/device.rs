//! Which device a run uses (`train.device`, `lora generate --device`), what it is called in the
//! log, and how much device memory a run has used at most.

use anyhow::{bail, Context, Result};
use candle_core::Device;

use crate::config::types::Device as DeviceSpec;

/// Whether this binary was built with the `cuda` feature.
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// Open the device `spec` (`train.device`) asks for, and log which one was picked and why.
pub(crate) fn select(spec: DeviceSpec) -> Result<Device> {
    select_as(spec, "train.device")
}

/// [`select`] for a setting named `setting`: a pipeline key (`train.device`) or a command's flag
/// (`--device`), which the log and the errors name.
pub(crate) fn select_as(spec: DeviceSpec, setting: &str) -> Result<Device> {
    let said = if setting.starts_with("--") { format!("{setting} {spec}") } else { format!("{setting} = \"{spec}\"") };
    let device = match spec {
        DeviceSpec::Cpu => Device::Cpu,
        DeviceSpec::Cuda(n) => {
            if !CUDA_BUILT {
                let cpu = if setting.starts_with("--") { format!("{setting} cpu") } else { format!("{setting} = \"cpu\"") };
                bail!(
                    "{said} but this `lora` was built without CUDA: rebuild with `cargo build --release --features cuda` \
                     (scripts/cuda-toolkit.sh installs the toolkit), or use {cpu}"
                );
            }
            Device::new_cuda(n).with_context(|| format!("{said}: CUDA GPU {n} did not answer (is the driver loaded, does GPU {n} exist?)"))?
        }
        DeviceSpec::Auto => {
            if CUDA_BUILT {
                match Device::new_cuda(0) {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::info!("{said}: no CUDA GPU answered ({e}); using the CPU");
                        Device::Cpu
                    }
                }
            } else {
                Device::Cpu
            }
        }
    };
    tracing::info!("device: {} ({said})", describe(&device));
    Ok(device)
}

/// `train.allow_tf32`: let cuBLAS use TF32 for f32 matmuls on Ampere or newer (as torch's
/// `allow_tf32`); candle's default is off. No effect on the CPU (validation warns there).
pub fn allow_tf32(device: &Device, allow: bool) {
    if let Device::Cuda(_) = device {
        cuda::set_tf32(allow);
        tracing::info!("TF32 matmuls {}", if allow { "on (train.allow_tf32)" } else { "off" });
    }
}

/// `cpu (2 threads)` or `cuda:0 (NVIDIA H200, 139.8 GiB)`.
pub fn describe(device: &Device) -> String {
    match device {
        Device::Cpu => format!("cpu ({} threads)", rayon::current_num_threads()),
        Device::Cuda(_) => cuda::describe(device),
        other => format!("{other:?}"),
    }
}

/// The most device memory seen in use (bytes: cuMemGetInfo's total − free, so the CUDA context
/// and any other process on the GPU count too), for GPUs; `None` on the CPU (use the process's
/// peak RSS there).
pub(crate) fn peak_memory(device: &Device) -> Option<u64> {
    match device {
        Device::Cuda(_) => cuda::peak_memory(device),
        _ => None,
    }
}

/// Record the current device memory in the high-water mark (call between steps; the
/// sampler thread started by [`start_sampler`] calls it every few milliseconds).
pub(crate) fn sample_memory(device: &Device) {
    if let Device::Cuda(_) = device {
        cuda::sample(device)
    }
}

/// Sample device memory every 2 ms on a background thread until the returned guard drops, so
/// that peaks inside a step are seen (cuMemGetInfo has no high-water mark of its own).
pub(crate) fn start_sampler(device: &Device) -> Option<Sampler> {
    let Device::Cuda(_) = device else { return None };
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (dev, flag) = (device.clone(), stop.clone());
    let handle = std::thread::spawn(move || {
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            sample_memory(&dev);
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    });
    Some(Sampler { stop, handle: Some(handle) })
}

/// Stops the memory sampler thread when dropped.
pub struct Sampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Sampler {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::atomic::{AtomicU64, Ordering};

    use candle_core::Device;

    static PEAK: AtomicU64 = AtomicU64::new(0);

    fn used(device: &Device) -> Option<(u64, u64)> {
        let Device::Cuda(d) = device else { return None };
        d.cuda_stream().context().bind_to_thread().ok()?;
        let (free, total) = cudarc::driver::result::mem_get_info().ok()?;
        Some(((total - free) as u64, total as u64))
    }

    pub fn describe(device: &Device) -> String {
        let Device::Cuda(d) = device else { return String::new() };
        let ctx = d.cuda_stream().context().clone();
        let name = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let total = used(device).map(|(_, t)| format!(", {:.1} GiB", t as f64 / (1u64 << 30) as f64)).unwrap_or_default();
        format!("cuda:{} ({name}{total})", ctx.ordinal())
    }

    pub(crate) fn set_tf32(allow: bool) {
        candle_core::cuda::set_gemm_reduced_precision_f32(allow);
    }

    pub fn sample(device: &Device) {
        if let Some((u, _)) = used(device) {
            PEAK.fetch_max(u, Ordering::Relaxed);
        }
    }

    pub(crate) fn peak_memory(device: &Device) -> Option<u64> {
        sample(device);
        Some(PEAK.load(Ordering::Relaxed))
    }
}

#[cfg(not(feature = "cuda"))]
mod cuda {
    use candle_core::Device;

    pub fn describe(device: &Device) -> String {
        format!("{device:?}")
    }
    pub(crate) fn set_tf32(_: bool) {}
    pub fn sample(_: &Device) {}
    pub(crate) fn peak_memory(_: &Device) -> Option<u64> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_round_trip() {
        for (s, d) in [("auto", DeviceSpec::Auto), ("cpu", DeviceSpec::Cpu), ("cuda", DeviceSpec::Cuda(0)), ("cuda:3", DeviceSpec::Cuda(3))] {
            assert_eq!(DeviceSpec::parse(s), Some(d));
            assert_eq!(DeviceSpec::parse(&d.to_string()), Some(d));
        }
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "CUDA", "cuda0"] {
            assert_eq!(DeviceSpec::parse(bad), None, "{bad}");
        }
        let re = regex::Regex::new(DeviceSpec::PATTERN).unwrap();
        for ok in ["auto", "cpu", "cuda", "cuda:12"] {
            assert!(re.is_match(ok) && DeviceSpec::parse(ok).is_some());
        }
    }

    #[test]
    fn cpu_and_auto_without_cuda() {
        assert!(select(DeviceSpec::Cpu).unwrap().is_cpu());
        if !CUDA_BUILT {
            assert!(select(DeviceSpec::Auto).unwrap().is_cpu());
            let err = select(DeviceSpec::Cuda(1)).unwrap_err().to_string();
            assert!(err.contains("built without CUDA") && err.contains("cuda:1"), "{err}");
        }
    }
}
