//! The model hashes kohya's sd-scripts writes into a LoRA's header: the base model file's name
//! and hashes (`ss_sd_model_name`, `ss_sd_model_hash`, `ss_new_sd_model_hash`, and the same for
//! a separate VAE), and the LoRA's own `sshs_model_hash` / `sshs_legacy_hash` that
//! sd-webui-additional-networks indexes files by.
//!
//! The definitions follow `library/train_util.py` of kohya-ss/sd-scripts: `model_hash` is the
//! first 8 hex digits of the SHA-256 of the 64 KiB at offset 1 MiB (A1111's old hash; a file
//! shorter than 1 MiB hashes the empty string), `calculate_sha256` the SHA-256 of the whole file;
//! `sshs_model_hash` is the SHA-256 of a safetensors file's data after the header, and
//! `sshs_legacy_hash` the old hash of the file as serialised with only the `ss_*` metadata.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The old A1111 hash of bytes: SHA-256 of `[1 MiB, 1 MiB + 64 KiB)`, first 8 hex digits.
pub(crate) fn legacy_hash_of(bytes: &[u8]) -> String {
    let start = bytes.len().min(0x100000);
    let end = bytes.len().min(0x110000);
    hex(&Sha256::digest(&bytes[start..end]))[..8].to_string()
}

/// kohya's `model_hash(filename)`: the old A1111 hash of a file.
pub fn model_hash(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut chunk = Vec::with_capacity(0x10000);
    if file.seek(SeekFrom::Start(0x100000)).is_ok() {
        file.take(0x10000).read_to_end(&mut chunk).with_context(|| format!("reading {}", path.display()))?;
    }
    Ok(hex(&Sha256::digest(&chunk))[..8].to_string())
}

/// kohya's `calculate_sha256(filename)`: the SHA-256 of the whole file, read in 1 MiB blocks.
pub(crate) fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex(&hasher.finalize()))
}

/// The `ss_*` keys naming the base model file and a separate VAE file, as kohya writes them for
/// a local `--pretrained_model_name_or_path` / `--vae`: the base name and both hashes.
pub(crate) fn source_file_metadata(model_file: Option<&Path>, vae_file: Option<&Path>) -> Result<BTreeMap<String, String>> {
    let mut m = BTreeMap::new();
    for (file, name, old, new) in [
        (model_file, "ss_sd_model_name", "ss_sd_model_hash", "ss_new_sd_model_hash"),
        (vae_file, "ss_vae_name", "ss_vae_hash", "ss_new_vae_hash"),
    ] {
        let Some(file) = file.filter(|f| f.is_file()) else { continue };
        m.insert(name.to_string(), file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
        m.insert(old.to_string(), model_hash(file)?);
        m.insert(new.to_string(), sha256_file(file)?);
    }
    Ok(m)
}

/// Add `sshs_model_hash` and `sshs_legacy_hash` to serialised safetensors bytes (the tensor
/// data does not change, so the data hash stays valid after the keys are added).
pub(crate) fn with_sshs_hashes(bytes: &[u8]) -> Result<Vec<u8>> {
    let (header_len, meta) = safetensors::SafeTensors::read_metadata(bytes).context("reading the LoRA's safetensors header")?;
    let model_hash = hex(&Sha256::digest(&bytes[8 + header_len..]));
    let st = safetensors::SafeTensors::deserialize(bytes).context("reading the LoRA's tensors")?;
    let tensors = st.tensors();
    let all: HashMap<String, String> = meta.metadata().clone().unwrap_or_default();
    let ss_only: HashMap<String, String> = all.iter().filter(|(k, _)| k.starts_with("ss_")).map(|(k, v)| (k.clone(), v.clone())).collect();
    let ss_bytes = crate::util::safetensors_bytes::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), Some(ss_only))?;
    let mut with = all;
    with.insert("sshs_model_hash".into(), model_hash);
    with.insert("sshs_legacy_hash".into(), legacy_hash_of(&ss_bytes));
    crate::util::safetensors_bytes::serialize(tensors.iter().map(|(k, v)| (k.as_str(), v)), Some(with))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_follow_kohyas_definitions() {
        // Independent values: sha256 of the empty string and of 64 KiB of 0x01 bytes (computed
        // with `hashlib` the way kohya's code reads the file).
        let dir = tempfile::tempdir().unwrap();
        let small = dir.path().join("small.safetensors");
        std::fs::write(&small, b"tiny").unwrap();
        assert_eq!(model_hash(&small).unwrap(), "e3b0c442", "shorter than 1 MiB: the hash of nothing");
        assert_eq!(sha256_file(&small).unwrap(), hex(&Sha256::digest(b"tiny")));
        let mut big = vec![0u8; 0x100000];
        big.extend(std::iter::repeat(1u8).take(0x10000));
        big.extend(std::iter::repeat(2u8).take(100));
        let big_path = dir.path().join("big.safetensors");
        std::fs::write(&big_path, &big).unwrap();
        let expected = hex(&Sha256::digest(vec![1u8; 0x10000]))[..8].to_string();
        assert_eq!(model_hash(&big_path).unwrap(), expected);
        assert_eq!(legacy_hash_of(&big), expected);
        let meta = source_file_metadata(Some(&big_path), None).unwrap();
        assert_eq!(meta["ss_sd_model_name"], "big.safetensors");
        assert_eq!(meta["ss_new_sd_model_hash"], hex(&Sha256::digest(&big)));
    }
}
