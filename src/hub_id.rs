//! What a Hugging Face hub id (`org/name`) and a hub file path (`org/repo/file.safetensors`)
//! look like: the one rule that validation and loading both apply. A leaf: it imports nothing of
//! the crate.

/// `org/name` or `name`: letters, digits, `-`, `_`, `.`; no `--` or `..`; at most one `/`.
pub(crate) fn is_hub_id(id: &str) -> bool {
    let parts: Vec<&str> = id.split('/').collect();
    if parts.len() > 2 || id.contains("--") || id.contains("..") || id.len() > 96 {
        return false;
    }
    parts.iter().all(|part| {
        !part.is_empty()
            && part.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !part.starts_with(['-', '.'])
            && !part.ends_with(['-', '.'])
    })
}

/// True for `org/repo/path/file.safetensors`: a file of a hub repository.
pub(crate) fn is_hub_file(source: &str) -> bool {
    let parts: Vec<&str> = source.split('/').collect();
    source.to_ascii_lowercase().ends_with(".safetensors")
        && parts.len() >= 3
        && !source.starts_with(['.', '/', '~'])
        && is_hub_id(&parts[..2].join("/"))
        && parts[2..].iter().all(|p| !p.is_empty() && *p != "..")
}
