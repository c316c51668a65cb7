//! The grammar of LoRA target, `rank_pattern` and `alpha_pattern` keys (PEFT's): a module name
//! matching the full name or any `.`-suffix, or `re:REGEX` matched against the whole name; and
//! the near names an error offers. A leaf: it imports nothing of the crate, so `config` checks
//! patterns with the rule injection applies.

use std::collections::BTreeSet;

use anyhow::{bail, Context, Result};

/// A parsed target / rank / alpha pattern.
#[derive(Clone, Debug)]
pub enum ModulePattern {
    /// Matches the full name or any `.`-suffix of it.
    Suffix(String),
    /// `re:REGEX`, matched against the whole name.
    Regex { source: String, regex: regex::Regex },
}

impl ModulePattern {
    pub fn parse(text: &str) -> Result<Self> {
        if let Some(re) = text.strip_prefix("re:") {
            let regex = regex::Regex::new(&format!("^(?:{re})$"))
                .with_context(|| format!("LoRA target pattern `{text}` is not a valid regular expression"))?;
            Ok(Self::Regex { source: text.to_string(), regex })
        } else {
            if text.is_empty() || text.starts_with('.') || text.ends_with('.') {
                bail!("LoRA target pattern `{text}` is not a module name (empty or starts/ends with `.`)");
            }
            Ok(Self::Suffix(text.to_string()))
        }
    }

    pub fn matches(&self, name: &str) -> bool {
        match self {
            Self::Suffix(p) => {
                name == p || (name.len() > p.len() && name.ends_with(p.as_str()) && name.as_bytes()[name.len() - p.len() - 1] == b'.')
            }
            Self::Regex { regex, .. } => regex.is_match(name),
        }
    }

    pub fn text(&self) -> &str {
        match self {
            Self::Suffix(p) => p,
            Self::Regex { source, .. } => source,
        }
    }
}

/// Up to five module names (or dotted suffixes of them) closest to `pattern`, for error messages.
pub fn near_names<'a>(pattern: &str, names: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let pattern = pattern.strip_prefix("re:").unwrap_or(pattern);
    let mut candidates = BTreeSet::new();
    for name in names {
        let parts: Vec<&str> = name.split('.').collect();
        for k in 1..=parts.len().min(3) {
            candidates.insert(parts[parts.len() - k..].join("."));
        }
    }
    let mut scored: Vec<(f64, String)> = candidates
        .into_iter()
        .map(|c| (strsim::normalized_damerau_levenshtein(pattern, &c), c))
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.len().cmp(&b.1.len())));
    scored.into_iter().take(5).map(|(_, c)| c).collect()
}
