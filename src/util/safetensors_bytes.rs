//! Safetensors files whose bytes depend only on their contents: `safetensors::serialize` writes
//! the header's `__metadata__` map in a `HashMap`'s order, which changes from process to process,
//! so the same adapter gave other bytes on another run. [`serialize`] writes that map with its
//! keys sorted (same tensors, same offsets, same data).

use anyhow::{Context, Result};

/// `safetensors::serialize`, with the header's `__metadata__` keys in sorted order.
pub(crate) fn serialize<S, V, I>(data: I, metadata: Option<std::collections::HashMap<String, String>>) -> Result<Vec<u8>>
where
    S: AsRef<str> + Ord + std::fmt::Display,
    V: safetensors::View,
    I: IntoIterator<Item = (S, V)>,
{
    canonical(safetensors::serialize(data, metadata)?)
}

/// `bytes` (a safetensors file) with the header's `__metadata__` map written in sorted key
/// order, padded with spaces to a multiple of 8 bytes as safetensors pads it. The rest of the
/// header (the tensors' entries, in safetensors' own order) is kept byte for byte, so a file
/// without metadata, or with one key, is unchanged.
pub(crate) fn canonical(bytes: Vec<u8>) -> Result<Vec<u8>> {
    const PREFIX: &[u8] = b"{\"__metadata__\":";
    let n = u64::from_le_bytes(bytes.get(..8).context("a safetensors file starts with 8 bytes")?.try_into()?) as usize;
    let header = bytes.get(8..8 + n).context("the safetensors header is cut short")?;
    let Some(rest) = header.strip_prefix(PREFIX) else { return Ok(bytes) };
    let mut values = serde_json::Deserializer::from_slice(rest).into_iter::<std::collections::BTreeMap<String, String>>();
    let metadata = values.next().context("the safetensors header's __metadata__ is not a map of strings")??;
    let end = values.byte_offset();
    let mut json = PREFIX.to_vec();
    json.extend(serde_json::to_vec(&metadata)?);
    json.extend(rest[end..].iter().rev().skip_while(|&&c| c == b' ').collect::<Vec<_>>().into_iter().rev());
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + json.len() + bytes.len() - 8 - n);
    out.extend((json.len() as u64).to_le_bytes());
    out.extend(json);
    out.extend(&bytes[8 + n..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same tensors and metadata give the same bytes whatever order the map was filled in,
    /// and safetensors reads them back unchanged.
    #[test]
    fn same_contents_same_bytes() {
        let data: Vec<u8> = (0..16u8).collect();
        let view = || safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![2, 2], &data).unwrap();
        let keys: Vec<(String, String)> = (0..20).map(|i| (format!("k{i}"), format!("v{i}"))).collect();
        let a: std::collections::HashMap<_, _> = keys.iter().cloned().collect();
        let b: std::collections::HashMap<_, _> = keys.iter().rev().cloned().collect();
        let (x, y) = (serialize([("t", view())], Some(a)).unwrap(), serialize([("t", view())], Some(b)).unwrap());
        assert_eq!(x, y);
        let (_, meta) = safetensors::SafeTensors::read_metadata(&x).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap().len(), 20);
        assert_eq!(safetensors::SafeTensors::deserialize(&x).unwrap().tensor("t").unwrap().data(), &data[..]);
    }
}
