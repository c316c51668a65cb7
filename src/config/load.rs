//! Loading a pipeline: read the file (size and UTF-8 checks), parse TOML keeping spans, layer it
//! on its `extends` bases, apply `--set` overrides, and remember for every key which source and
//! span it came from, so that diagnostics name the right file.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::diagnostic::{Diagnostic, Diagnostics, Source};
use super::types::Pipeline;

/// Pipeline files larger than this are refused (they are a few KiB in practice).
pub(crate) const MAX_FILE_BYTES: u64 = 1 << 20;
/// Deepest `extends` chain accepted.
pub(crate) const MAX_EXTENDS_DEPTH: usize = 16;

/// Where one key of the resolved document was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// Index into [`Provenance::sources`].
    pub source: usize,
    /// Span of the key (for a table: its header key).
    pub key: Range<usize>,
    /// Span of the value.
    pub value: Range<usize>,
}

/// The sources a pipeline was built from and where each key came from.
#[derive(Debug, Clone, Default)]
pub struct Provenance {
    /// The top file first, then its `extends` bases, then the `--set` overrides.
    pub sources: Vec<Source>,
    /// Folder that relative paths in each source are resolved against (`None`: the current
    /// directory, for `--set`).
    pub(crate) base_dirs: Vec<Option<PathBuf>>,
    /// Key path (`train.learning_rate`, `validation.prompts[0]`) to where it was set last.
    pub(crate) origins: BTreeMap<String, Origin>,
}

impl Provenance {
    /// Where `key_path` was set, if it was set in some source.
    pub fn origin(&self, key_path: &str) -> Option<&Origin> {
        self.origins.get(key_path)
    }

    /// The source and value span of the first of `key_paths` that was set; else the start of the
    /// top file.
    pub(crate) fn locate(&self, key_paths: &[&str]) -> (&Source, Range<usize>) {
        for path in key_paths {
            if let Some(o) = self.origins.get(*path) {
                return (&self.sources[o.source], o.value.clone());
            }
        }
        (&self.sources[0], 0..0)
    }

    /// Like [`Provenance::locate`], pointing at the key rather than its value.
    pub(crate) fn locate_key(&self, key_paths: &[&str]) -> (&Source, Range<usize>) {
        for path in key_paths {
            if let Some(o) = self.origins.get(*path) {
                return (&self.sources[o.source], o.key.clone());
            }
        }
        (&self.sources[0], 0..0)
    }

    /// A path value written at `key_path`, resolved against the folder of the file that wrote it.
    pub(crate) fn resolve_path(&self, key_path: &str, value: &Path) -> PathBuf {
        match self.origins.get(key_path).and_then(|o| self.base_dirs[o.source].as_ref()) {
            Some(dir) if value.is_relative() => dir.join(value),
            _ => value.to_path_buf(),
        }
    }
}

/// A pipeline that loaded and validated, with everything needed to explain it.
#[derive(Debug, Clone)]
pub struct LoadedPipeline {
    /// The typed pipeline; relative paths are already resolved against the file that wrote them
    /// (so they work from the current directory).
    pub pipeline: Pipeline,
    /// The merged document after `extends` and `--set`, values as written.
    pub resolved: toml::Table,
    /// Sources and the origin of every key.
    pub sources: Provenance,
    /// The top pipeline file.
    pub path: PathBuf,
    /// Warnings found while validating (errors make `load_pipeline` fail instead).
    pub warnings: Diagnostics,
}

/// Read, parse and merge the file, its bases and the overrides, without schema checks.
/// Returns the merged table, where its keys came from, and the diagnostics so far.
pub(crate) fn load_document(path: &Path, overrides: &[String]) -> (toml::Table, Provenance, Diagnostics) {
    let mut loader = Loader::default();
    let display = path.display().to_string();
    let mut chain = Vec::new();
    loader.load_file(path, display, &mut chain, None);
    if !loader.diags.has_errors() {
        for (i, arg) in overrides.iter().enumerate() {
            loader.apply_override(i, arg);
        }
    }
    (loader.doc, loader.prov, loader.diags)
}

#[derive(Default)]
struct Loader {
    doc: toml::Table,
    prov: Provenance,
    diags: Diagnostics,
}

/// The source and span of the `extends` that named a base file.
type Via = (usize, Range<usize>);

impl Loader {
    fn add_source(&mut self, source: Source, base_dir: Option<PathBuf>) -> usize {
        self.prov.sources.push(source);
        self.prov.base_dirs.push(base_dir);
        self.prov.sources.len() - 1
    }

    fn error_via(&mut self, via: &Option<Via>, file: &str, message: String) {
        let d = match via {
            Some((src, span)) => Diagnostic::error(&self.prov.sources[*src], span.clone(), message).with_key("extends"),
            None => Diagnostic::file_error(file, message),
        };
        self.diags.push(d);
    }

    fn load_file(&mut self, path: &Path, display: String, chain: &mut Vec<PathBuf>, via: Option<Via>) {
        let text = match read_pipeline_text(path, &display) {
            Ok(text) => text,
            Err(ReadError::Io(msg)) => {
                let msg = match &via {
                    Some(_) => format!("cannot read the base pipeline `{display}`: {msg}"),
                    None => format!("cannot read `{display}`: {msg}"),
                };
                return self.error_via(&via, &display, msg);
            }
            Err(ReadError::Diagnostic(d)) => return self.diags.push(*d),
        };
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let src = self.add_source(Source::new(display.clone(), text.clone()), Some(dir.clone()));
        let (table, errors) = DeTable::parse_recoverable(&text);
        if !errors.is_empty() {
            let json = looks_like_json(&display, &text);
            for e in errors {
                let span = e.span().unwrap_or(0..0);
                let d = match several_values(&text, &span) {
                    Some((values, at, count)) => {
                        Diagnostic::error(&self.prov.sources[src], at, format!("one value per key: `{values}` is {count} values"))
                            .with_help("keep one of them (a key that takes several values takes a list: [a, b])")
                    }
                    None => Diagnostic::error(&self.prov.sources[src], span, format!("invalid TOML: {}", one_line(e.message()))),
                };
                if json {
                    // The rest would be the same mistake again.
                    let help = "this looks like JSON; pipeline files are TOML: `[model]` table headers and `key = value` lines (see pipelines/tiny.toml)";
                    self.diags.push(d.with_help(help));
                    break;
                }
                self.diags.push(d);
            }
            return;
        }
        let table = table.into_inner();
        if text.trim().is_empty() || only_comments(&text) && table.is_empty() {
            let d = Diagnostic::error(&self.prov.sources[src], 0..0, "the pipeline file has no keys")
                .with_help("a pipeline needs at least [model] and [dataset]; see pipelines/tiny.toml");
            return self.diags.push(d);
        }

        if let Some((_, value)) = table.iter().find(|(k, _)| k.get_ref() == "extends") {
            match value.get_ref() {
                DeValue::String(base) => {
                    let base_path = dir.join(base.as_ref());
                    let base_display = Path::new(&display)
                        .parent()
                        .map(|p| p.join(base.as_ref()))
                        .unwrap_or_else(|| PathBuf::from(base.as_ref()))
                        .display()
                        .to_string();
                    let me = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
                    chain.push(me);
                    let via_here = Some((src, value.span()));
                    let canonical = std::fs::canonicalize(&base_path).ok();
                    if let Some(c) = canonical.as_ref().filter(|c| chain.contains(c)) {
                        let names: Vec<String> = chain
                            .iter()
                            .skip_while(|p| *p != c)
                            .map(|p| p.file_name().unwrap_or_default().to_string_lossy().into_owned())
                            .chain(std::iter::once(c.file_name().unwrap_or_default().to_string_lossy().into_owned()))
                            .collect();
                        let msg = format!("`extends` forms a cycle: {}", names.join(" -> "));
                        self.error_via(&via_here, &display, msg);
                    } else if chain.len() > MAX_EXTENDS_DEPTH {
                        let msg = format!("`extends` chain is deeper than {MAX_EXTENDS_DEPTH} files");
                        self.error_via(&via_here, &display, msg);
                    } else {
                        self.load_file(&base_path, base_display, chain, via_here);
                    }
                    chain.pop();
                }
                other => {
                    let msg = format!("`extends` must be a string (a file name), found {}", de_type_name(other));
                    let d = Diagnostic::error(&self.prov.sources[src], value.span(), msg).with_key("extends");
                    self.diags.push(d);
                }
            }
        }
        let mut entries: Vec<_> = table.iter().filter(|(k, _)| k.get_ref() != "extends").collect();
        entries.sort_by_key(|(k, _)| k.span().start);
        for (k, v) in entries {
            self.merge_entry(&mut Vec::new(), k, v, src);
        }
    }

    fn apply_override(&mut self, index: usize, arg: &str) {
        let mut source = Source::new("--set", arg.to_string());
        source.line_offset = index;
        let src = self.add_source(source, None);
        let Some(eq) = arg.find('=') else {
            let d = Diagnostic::error(&self.prov.sources[src], 0..arg.len(), format!("`--set {arg}` is not KEY=VALUE"))
                .with_help("write e.g. `--set train.learning_rate=2e-4`");
            return self.diags.push(d);
        };
        // A string may be given unquoted: when the text is not TOML, retry with the value quoted.
        let (text, quoted) = match DeTable::parse(arg) {
            Ok(_) => (arg.to_string(), false),
            Err(first) => {
                let value = arg[eq + 1..].trim();
                let retry = format!("{} = {}", &arg[..eq], toml::Value::String(value.to_string()));
                if DeTable::parse(&retry).is_ok() {
                    (retry, true)
                } else {
                    let msg = format!("invalid `--set`: {}", one_line(first.message()));
                    let d = Diagnostic::error(&self.prov.sources[src], first.span().unwrap_or(0..0), msg);
                    return self.diags.push(d);
                }
            }
        };
        let Ok(table) = DeTable::parse(&text) else { return };
        let table = table.into_inner();
        for (k, v) in table.iter() {
            if k.get_ref() == "extends" {
                let d = Diagnostic::error(&self.prov.sources[src], k.span(), "`extends` cannot be set with --set")
                    .with_key("extends");
                self.diags.push(d);
                continue;
            }
            self.merge_entry(&mut Vec::new(), k, v, src);
        }
        if quoted {
            // The quoted value's spans point past the original text: put them on its value.
            for o in self.prov.origins.values_mut().filter(|o| o.source == src && o.value.start > eq) {
                o.value = eq + 1..arg.len();
            }
        }
    }

    /// Merge `key = value` into the document at `prefix`: tables merge key by key, anything else
    /// replaces what was there (and forgets where the old value came from).
    fn merge_entry(&mut self, prefix: &mut Vec<String>, key: &Spanned<std::borrow::Cow<'_, str>>, value: &Spanned<DeValue<'_>>, src: usize) {
        prefix.push(key.get_ref().to_string());
        let path = key_path(prefix);
        let origin = Origin { source: src, key: key.span(), value: value.span() };
        let existing_is_table = matches!(table_at(&mut self.doc, &prefix[..prefix.len() - 1]).and_then(|t| t.get(key.get_ref().as_ref())), Some(toml::Value::Table(_)));
        match value.get_ref() {
            DeValue::Table(sub) if existing_is_table => {
                self.prov.origins.insert(path, origin);
                let mut entries: Vec<_> = sub.iter().collect();
                entries.sort_by_key(|(k, _)| k.span().start);
                for (k, v) in entries {
                    self.merge_entry(prefix, k, v, src);
                }
            }
            _ => {
                forget(&mut self.prov.origins, &path);
                if let Some(converted) = self.convert(value, &path, key.span(), src) {
                    if let Some(parent) = table_at(&mut self.doc, &prefix[..prefix.len() - 1]) {
                        parent.insert(key.get_ref().to_string(), converted);
                    }
                }
            }
        }
        prefix.pop();
    }

    /// A parsed value as a `toml::Value`, recording the origin of it and everything inside it.
    fn convert(&mut self, value: &Spanned<DeValue<'_>>, path: &str, key_span: Range<usize>, src: usize) -> Option<toml::Value> {
        self.prov.origins.insert(path.to_string(), Origin { source: src, key: key_span, value: value.span() });
        let out = match value.get_ref() {
            DeValue::String(s) => toml::Value::String(s.to_string()),
            DeValue::Integer(i) => match i64::from_str_radix(&i.as_str().replace('_', ""), i.radix()) {
                Ok(n) => toml::Value::Integer(n),
                Err(_) => {
                    let d = Diagnostic::error(&self.prov.sources[src], value.span(), format!("`{path}` is too large for an integer (at most {})", i64::MAX))
                        .with_key(path);
                    self.diags.push(d);
                    return None;
                }
            },
            DeValue::Float(f) => match f.as_str().replace('_', "").parse::<f64>() {
                Ok(x) => toml::Value::Float(x),
                Err(_) => {
                    let d = Diagnostic::error(&self.prov.sources[src], value.span(), format!("`{path}`: invalid float"))
                        .with_key(path);
                    self.diags.push(d);
                    return None;
                }
            },
            DeValue::Boolean(b) => toml::Value::Boolean(*b),
            DeValue::Datetime(d) => toml::Value::Datetime(*d),
            DeValue::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.iter().enumerate() {
                    let item_path = format!("{path}[{i}]");
                    out.push(self.convert(item, &item_path, item.span(), src)?);
                }
                toml::Value::Array(out)
            }
            DeValue::Table(t) => {
                let mut out = toml::Table::new();
                let mut entries: Vec<_> = t.iter().collect();
                entries.sort_by_key(|(k, _)| k.span().start);
                for (k, v) in entries {
                    let sub = format!("{path}.{}", quote_key(k.get_ref()));
                    out.insert(k.get_ref().to_string(), self.convert(v, &sub, k.span(), src)?);
                }
                toml::Value::Table(out)
            }
        };
        Some(out)
    }
}

/// Why a pipeline file could not be read.
enum ReadError {
    /// An I/O error, as text.
    Io(String),
    /// A content problem, located in the file.
    Diagnostic(Box<Diagnostic>),
}

/// Read a pipeline file, refusing a folder, an absurdly large file, or one that is not UTF-8.
fn read_pipeline_text(path: &Path, display: &str) -> Result<String, ReadError> {
    let meta = std::fs::metadata(path).map_err(|e| {
        let dangling = e.kind() == std::io::ErrorKind::NotFound && std::fs::symlink_metadata(path).is_ok();
        ReadError::Io(if dangling { "it is a symbolic link to something that does not exist".into() } else { io_reason(&e) })
    })?;
    if meta.is_dir() {
        return Err(ReadError::Io("it is a folder, not a pipeline file".into()));
    }
    if !meta.is_file() {
        // A FIFO or a device has no size to check and may never end (`/dev/zero`).
        let what = crate::util::file_kind::special_file_kind(&meta.file_type());
        return Err(ReadError::Io(format!("it is {what}, not a pipeline file (lora reads pipelines from regular files only)")));
    }
    if meta.len() > MAX_FILE_BYTES {
        let d = Diagnostic::file_error(
            display,
            format!("the file is {} bytes; a pipeline file is at most {} bytes", meta.len(), MAX_FILE_BYTES),
        )
        .with_help("pipeline files are small TOML files: is this the right file?");
        return Err(ReadError::Diagnostic(Box::new(d)));
    }
    // Read at most one byte past the limit, in case the file grew since it was measured.
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| std::io::Read::read_to_end(&mut std::io::Read::take(f, MAX_FILE_BYTES + 1), &mut bytes))
        .map_err(|e| ReadError::Io(io_reason(&e)))?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        let d = Diagnostic::file_error(display, format!("the file is over {MAX_FILE_BYTES} bytes, the most a pipeline file may be"));
        return Err(ReadError::Diagnostic(Box::new(d)));
    }
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        let d = Diagnostic::file_error(display, "the file is empty")
            .with_help("a pipeline needs at least [model] and [dataset]; see pipelines/tiny.toml");
        return Err(ReadError::Diagnostic(Box::new(d)));
    }
    match String::from_utf8(bytes) {
        Ok(text) => Ok(text),
        Err(e) => {
            let bad = e.utf8_error().valid_up_to();
            let bytes = e.into_bytes();
            let lossy = String::from_utf8_lossy(&bytes[..bad]).into_owned()
                + &String::from_utf8_lossy(&bytes[bad..]);
            let source = Source::new(display, lossy);
            let d = Diagnostic::error(&source, bad..bad + 1, format!("the file is not UTF-8 text (byte 0x{:02X})", bytes[bad]))
                .with_help("pipeline files are TOML, which must be UTF-8");
            Err(ReadError::Diagnostic(Box::new(d)))
        }
    }
}

fn io_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "no such file".into(),
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ if e.raw_os_error() == Some(libc::ELOOP) => "it is a symbolic link loop (too many levels of symbolic links)".into(),
        _ => e.to_string(),
    }
}

/// A file named `.json`, or whose text starts as a JSON object does.
fn looks_like_json(display: &str, text: &str) -> bool {
    display.to_ascii_lowercase().ends_with(".json") || text.trim_start().starts_with('{')
}

/// `key = a b` (two or more values where TOML takes one), when a parse error falls on such a
/// line: the values as written, their span, and how many there are.
fn several_values(text: &str, error: &Range<usize>) -> Option<(String, Range<usize>, usize)> {
    let mut at = error.start.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    let line_start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[line_start..].find('\n').map_or(text.len(), |i| line_start + i);
    let line = &text[line_start..line_end];
    let eq = line.find('=')?;
    let key = line[..eq].trim();
    if key.is_empty() || key.starts_with('[') || key.starts_with('#') {
        return None;
    }
    // The value part, without a trailing comment.
    let value = line[eq + 1..].split(" #").next()?.trim_end();
    let tokens: Vec<&str> = value.split_whitespace().collect();
    let each_is_a_value = tokens.iter().all(|t| DeTable::parse(&format!("x = {t}")).is_ok());
    if tokens.len() < 2 || !each_is_a_value {
        return None;
    }
    let offset = line_start + eq + 1 + (line[eq + 1..].len() - line[eq + 1..].trim_start().len());
    Some((value.trim().to_string(), offset..offset + value.trim().len(), tokens.len()))
}

fn only_comments(text: &str) -> bool {
    text.lines().all(|l| {
        let l = l.trim();
        l.is_empty() || l.starts_with('#')
    })
}

/// A parser message on one line.
fn one_line(msg: &str) -> String {
    msg.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join("; ")
}

fn de_type_name(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a date-time",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

/// `a.b."c.d"`: a key path, quoting keys that are not bare TOML keys.
pub fn key_path(keys: &[String]) -> String {
    keys.iter().map(|k| quote_key(k)).collect::<Vec<_>>().join(".")
}

/// A key as TOML would write it: bare when possible, quoted otherwise.
pub(crate) fn quote_key(k: &str) -> String {
    if !k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
        k.to_string()
    } else {
        toml::Value::String(k.to_string()).to_string()
    }
}

/// The table at `keys` inside `doc`, creating nothing; `None` if a non-table is in the way.
fn table_at<'a>(doc: &'a mut toml::Table, keys: &[String]) -> Option<&'a mut toml::Table> {
    let mut t = doc;
    for k in keys {
        t = t.get_mut(k)?.as_table_mut()?;
    }
    Some(t)
}

/// Forget the origins of `path` and everything below it.
fn forget(origins: &mut BTreeMap<String, Origin>, path: &str) {
    let below: Vec<String> = origins
        .range(path.to_string()..)
        .map(|(k, _)| k)
        .take_while(|k| k.starts_with(path))
        .filter(|k| k.len() == path.len() || matches!(k.as_bytes()[path.len()], b'.' | b'['))
        .cloned()
        .collect();
    for k in below {
        origins.remove(&k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_paths_quote_keys_that_are_not_bare() {
        assert_eq!(key_path(&["adapter".into(), "rank_pattern".into(), "to_out.0".into()]), "adapter.rank_pattern.\"to_out.0\"");
    }

    #[test]
    fn replacing_a_value_forgets_the_origins_below_it_only() {
        let o = Origin { source: 0, key: 0..1, value: 0..1 };
        let mut origins: BTreeMap<String, Origin> =
            ["a", "a.b", "a[0]", "ab", "a.b.c"].iter().map(|k| (k.to_string(), o.clone())).collect();
        forget(&mut origins, "a");
        assert_eq!(origins.keys().collect::<Vec<_>>(), ["ab"]);
    }

    #[test]
    fn unquoted_set_strings_keep_spans_on_the_original_text() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p.toml");
        std::fs::write(&file, "[model]\nid = \"a/b\"\n").unwrap();
        let (doc, prov, diags) = load_document(&file, &["model.variant=fp16".into()]);
        assert!(diags.is_empty(), "{diags}");
        assert_eq!(doc["model"]["variant"].as_str(), Some("fp16"));
        let o = prov.origin("model.variant").unwrap();
        assert_eq!(prov.sources[o.source].name, "--set");
        assert_eq!(o.value, 14..18);
    }
}
