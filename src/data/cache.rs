//! The encode cache on disk: what the frozen encoders compute — the VAE latent distribution
//! (mean and std; each step still draws its own sample) of each preprocessed image variant, and
//! the text encoder's hidden states of each caption — one checksummed file per entry, keyed by
//! the model's fingerprint and the exact input (the preprocessed pixels, or the caption), so an
//! entry can only ever serve the input it was computed from. Each file also records the key and
//! the model fingerprint it was written for, checked on read, so a file moved or copied to
//! another entry's name is not served. Files are written atomically; a damaged, truncated,
//! misplaced or older-format one is detected, reported and rebuilt, never trusted.
//!
//! File format 2 (`LORAENC2`): magic, then the key and the model fingerprint (each a u32 length
//! and UTF-8 bytes), the tensor count (u32), each tensor's rank (u32), dims (u64 each) and f32
//! values, all little-endian, then the sha256 of everything before it. Format 1 (`LORAENC1`, no
//! key or fingerprint) is rebuilt, never read.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};

const MAGIC: &[u8; 8] = b"LORAENC2";
/// The magic of files written before entries recorded their key (rebuilt when met).
const MAGIC_V1: &[u8; 8] = b"LORAENC1";

/// An encode cache in `dir` for the model with fingerprint `model`.
pub struct EncodeCache {
    dir: PathBuf,
    model: String,
    pub hits: AtomicUsize,
    pub misses: AtomicUsize,
    pub rebuilt: AtomicUsize,
}

/// Entries and bytes of a cache folder.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    pub entries: usize,
    pub bytes: u64,
}

impl EncodeCache {
    pub fn new(dir: &Path, model_fingerprint: &str) -> Self {
        Self {
            dir: dir.to_path_buf(),
            model: model_fingerprint.to_string(),
            hits: AtomicUsize::new(0),
            misses: AtomicUsize::new(0),
            rebuilt: AtomicUsize::new(0),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn key(&self, kind: &str, bytes: &[u8]) -> String {
        let mut h = Sha256::new();
        for part in [self.model.as_bytes(), kind.as_bytes(), bytes] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The key of a preprocessed image (CHW f32, exactly what the VAE encodes): its pixels and,
    /// when not square, its size (so an aspect-ratio bucket's crop is its own entry).
    pub(crate) fn latent_key(&self, pixels: &Tensor) -> Result<String> {
        let v = pixels.flatten_all()?.to_vec1::<f32>()?;
        let mut bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        let dims = pixels.dims();
        if dims.len() >= 2 && dims[dims.len() - 2] != dims[dims.len() - 1] {
            bytes.extend(format!("{}x{}", dims[dims.len() - 2], dims[dims.len() - 1]).bytes());
        }
        Ok(self.key("latent", &bytes))
    }

    /// The key of a caption's text-encoder output.
    pub(crate) fn text_key(&self, caption: &str) -> String {
        self.key("text", caption.as_bytes())
    }

    fn path(&self, key: &str) -> PathBuf {
        self.dir.join(&key[..2]).join(format!("{key}.enc"))
    }

    /// The tensors stored under `key`, on `device`; `None` when absent or damaged (a damaged
    /// file is reported and removed, so the caller's `put` rebuilds it).
    pub fn get(&self, key: &str, device: &Device) -> Result<Option<Vec<Tensor>>> {
        let path = self.path(key);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.misses.fetch_add(1, Ordering::Relaxed);
                return Ok(None);
            }
            Err(e) => return Err(e).with_context(|| format!("reading cache entry {}", path.display())),
        };
        match decode(&bytes, key, &self.model, device) {
            Ok(t) => {
                self.hits.fetch_add(1, Ordering::Relaxed);
                Ok(Some(t))
            }
            Err(e) => {
                tracing::warn!("encode cache entry {} is damaged ({e:#}); encoding it again", path.display());
                let _ = std::fs::remove_file(&path);
                self.rebuilt.fetch_add(1, Ordering::Relaxed);
                Ok(None)
            }
        }
    }

    /// Store `tensors` under `key` (atomically).
    pub(crate) fn put(&self, key: &str, tensors: &[&Tensor]) -> Result<()> {
        let path = self.path(key);
        let bytes = encode(key, &self.model, tensors)?;
        crate::util::fs::write_atomic(&path, &bytes).with_context(|| format!("writing cache entry {}", path.display()))
    }

    /// Entries and bytes under `dir`.
    pub fn stats(dir: &Path) -> CacheStats {
        fn walk(p: &Path, s: &mut CacheStats) {
            let Ok(rd) = std::fs::read_dir(p) else { return };
            for e in rd.flatten() {
                let path = e.path();
                if path.is_dir() {
                    walk(&path, s);
                } else if path.extension().is_some_and(|x| x == "enc") {
                    s.entries += 1;
                    s.bytes += e.metadata().map(|m| m.len()).unwrap_or(0);
                }
            }
        }
        let mut s = CacheStats::default();
        walk(dir, &mut s);
        s
    }
}

fn encode(key: &str, model: &str, tensors: &[&Tensor]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    out.extend_from_slice(MAGIC);
    for text in [key, model] {
        out.extend_from_slice(&(text.len() as u32).to_le_bytes());
        out.extend_from_slice(text.as_bytes());
    }
    out.extend_from_slice(&(tensors.len() as u32).to_le_bytes());
    for t in tensors {
        let dims = t.dims();
        out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
        for d in dims {
            out.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        let v = t.to_dtype(candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        out.extend(v.iter().flat_map(|x| x.to_le_bytes()));
    }
    let sum = Sha256::digest(&out);
    out.extend_from_slice(&sum);
    Ok(out)
}

/// The tensors of an entry file, checked: whole (checksum), this format, and written for `key`
/// of the cache of model `model`.
fn decode(bytes: &[u8], key: &str, model: &str, device: &Device) -> Result<Vec<Tensor>> {
    if bytes.get(..8) == Some(MAGIC_V1.as_slice()) {
        bail!("written by an older lora (format 1, which does not record its key)");
    }
    if bytes.len() < MAGIC.len() + 4 + 32 {
        bail!("{} bytes is too short", bytes.len());
    }
    let (body, sum) = bytes.split_at(bytes.len() - 32);
    if Sha256::digest(body).as_slice() != sum {
        bail!("checksum mismatch");
    }
    if &body[..8] != MAGIC {
        bail!("not an encode cache file");
    }
    let mut pos: usize = 8;
    let mut take = |n: usize| -> Result<&[u8]> {
        let s = body.get(pos..pos.checked_add(n).context("truncated")?).context("truncated")?;
        pos += n;
        Ok(s)
    };
    let mut text = || -> Result<String> {
        let n = u32::from_le_bytes(take(4)?.try_into()?) as usize;
        String::from_utf8(take(n)?.to_vec()).context("a recorded key is not UTF-8")
    };
    let (stored_key, stored_model) = (text()?, text()?);
    if stored_model != model {
        bail!("it was written for model fingerprint {stored_model}, this cache is for {model} (a file copied from another cache)");
    }
    if stored_key != key {
        bail!("it holds the entry of key {stored_key}, not {key} (a file moved or copied to another entry's name)");
    }
    let n = u32::from_le_bytes(take(4)?.try_into()?) as usize;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let nd = u32::from_le_bytes(take(4)?.try_into()?) as usize;
        let dims = (0..nd).map(|_| Ok(u64::from_le_bytes(take(8)?.try_into()?) as usize)).collect::<Result<Vec<_>>>()?;
        let bytes = dims.iter().try_fold(4usize, |acc, d| acc.checked_mul(*d)).context("truncated")?;
        let data: Vec<f32> = take(bytes)?.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        out.push(Tensor::from_vec(data, dims, device)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_is_exact_and_damage_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let cache = EncodeCache::new(dir.path(), "model-a");
        let mean = Tensor::new(&[[0.1f32, -2.5e-8], [3.0, f32::MIN_POSITIVE]], &Device::Cpu).unwrap();
        let std = Tensor::new(&[1.0f32, 0.5], &Device::Cpu).unwrap();
        let key = cache.latent_key(&mean).unwrap();
        assert_ne!(key, EncodeCache::new(dir.path(), "model-b").latent_key(&mean).unwrap(), "the model is part of the key");
        assert!(cache.get(&key, &Device::Cpu).unwrap().is_none());
        cache.put(&key, &[&mean, &std]).unwrap();
        let back = cache.get(&key, &Device::Cpu).unwrap().unwrap();
        assert_eq!(back[0].to_vec2::<f32>().unwrap(), mean.to_vec2::<f32>().unwrap());
        assert_eq!(back[1].to_vec1::<f32>().unwrap(), std.to_vec1::<f32>().unwrap());
        // Truncated: detected, removed, reported as a miss to rebuild.
        let path = cache.path(&key);
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
        assert!(cache.get(&key, &Device::Cpu).unwrap().is_none());
        assert!(!path.exists());
        // One flipped bit: detected as well.
        cache.put(&key, &[&mean, &std]).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[20] ^= 1;
        std::fs::write(&path, &bytes).unwrap();
        assert!(cache.get(&key, &Device::Cpu).unwrap().is_none());
        assert_eq!(cache.rebuilt.load(Ordering::Relaxed), 2);
        assert_eq!(EncodeCache::stats(dir.path()), CacheStats::default());
    }

    /// Two entries of the same size swapped on disk (both whole, checksums fine): neither is
    /// served for the other's key; both count as rebuilt, and what the caller stores again is
    /// served afterwards, equal to a fresh encode.
    #[test]
    fn swapped_entries_are_rebuilt_not_served() {
        let dir = tempfile::tempdir().unwrap();
        let cache = EncodeCache::new(dir.path(), "model-a");
        let a = Tensor::new(&[1.0f32, 2.0, 3.0], &Device::Cpu).unwrap();
        let b = Tensor::new(&[-4.0f32, 5.0, -6.0], &Device::Cpu).unwrap();
        let (ka, kb) = (cache.text_key("a cat"), cache.text_key("a dog"));
        cache.put(&ka, &[&a]).unwrap();
        cache.put(&kb, &[&b]).unwrap();
        let (pa, pb) = (cache.path(&ka), cache.path(&kb));
        let (bytes_a, bytes_b) = (std::fs::read(&pa).unwrap(), std::fs::read(&pb).unwrap());
        assert_eq!(bytes_a.len(), bytes_b.len(), "same-size entries");
        std::fs::write(&pa, &bytes_b).unwrap();
        std::fs::write(&pb, &bytes_a).unwrap();
        // What a caller does: serve from the cache, else encode and store.
        let serve = |key: &str, fresh: &Tensor| -> Vec<f32> {
            match cache.get(key, &Device::Cpu).unwrap() {
                Some(t) => t[0].to_vec1().unwrap(),
                None => {
                    cache.put(key, &[fresh]).unwrap();
                    fresh.to_vec1().unwrap()
                }
            }
        };
        assert_eq!(serve(&ka, &a), vec![1.0, 2.0, 3.0]);
        assert_eq!(serve(&kb, &b), vec![-4.0, 5.0, -6.0]);
        assert_eq!(cache.rebuilt.load(Ordering::Relaxed), 2, "both swapped entries rebuilt");
        assert_eq!(cache.hits.load(Ordering::Relaxed), 0, "nothing served from a swapped file");
        // Rebuilt entries are served (hits) with the right values.
        assert_eq!(cache.get(&ka, &Device::Cpu).unwrap().unwrap()[0].to_vec1::<f32>().unwrap(), vec![1.0, 2.0, 3.0]);
        assert_eq!(cache.get(&kb, &Device::Cpu).unwrap().unwrap()[0].to_vec1::<f32>().unwrap(), vec![-4.0, 5.0, -6.0]);
        assert_eq!(cache.hits.load(Ordering::Relaxed), 2);
    }

    /// An entry copied in from another model's cache under the same name, and an entry in the
    /// old format (no key recorded), are rebuilt.
    #[test]
    fn foreign_and_old_format_entries_are_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let cache = EncodeCache::new(dir.path(), "model-a");
        let foreign = EncodeCache::new(other.path(), "model-b");
        let t = Tensor::new(&[0.5f32, 0.25], &Device::Cpu).unwrap();
        let key = cache.text_key("caption");
        foreign.put(&key, &[&t]).unwrap();
        std::fs::create_dir_all(cache.path(&key).parent().unwrap()).unwrap();
        std::fs::copy(foreign.path(&key), cache.path(&key)).unwrap();
        assert!(cache.get(&key, &Device::Cpu).unwrap().is_none());
        assert!(!cache.path(&key).exists(), "removed, to be rebuilt");
        // Format 1: magic, tensors, checksum, no key.
        let mut v1 = MAGIC_V1.to_vec();
        v1.extend_from_slice(&1u32.to_le_bytes());
        v1.extend_from_slice(&1u32.to_le_bytes());
        v1.extend_from_slice(&2u64.to_le_bytes());
        v1.extend(t.to_vec1::<f32>().unwrap().iter().flat_map(|x| x.to_le_bytes()));
        let sum = Sha256::digest(&v1);
        v1.extend_from_slice(&sum);
        std::fs::write(cache.path(&key), &v1).unwrap();
        assert!(cache.get(&key, &Device::Cpu).unwrap().is_none());
        assert_eq!(cache.rebuilt.load(Ordering::Relaxed), 2);
        assert_eq!(cache.hits.load(Ordering::Relaxed), 0);
    }
}
