//! Validating a merged pipeline document: the generated JSON Schema first (every violation, each
//! mapped back to the TOML span it came from), then serde into the types, then the checks a
//! schema cannot express (across fields, and against the file system).

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::diagnostic::{Diagnostic, Diagnostics};
use super::load::{quote_key, LoadedPipeline, Provenance};
use crate::util::path::tidy_path;
use super::schema::{choices, deref, keyword, pipeline_schema, properties, toml_literal};
use super::types::*;

/// One step of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Seg {
    Key(String),
    Index(usize),
}

fn path_string(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out += &quote_key(k);
            }
            Seg::Index(i) => out += &format!("[{i}]"),
        }
    }
    out
}

/// `[train]` for a table path, `train.learning_rate` for a key path.
fn table_name(path: &[Seg]) -> String {
    if path.is_empty() {
        "the top level".into()
    } else {
        format!("[{}]", path_string(path))
    }
}

/// A schema violation, before it is located in a source.
#[derive(Debug)]
struct Issue {
    path: Vec<Seg>,
    /// Point at the key rather than the value (unknown keys).
    at_key: bool,
    message: String,
    help: Option<String>,
    /// A required key is missing: the typed pipeline cannot be built.
    missing: bool,
}

/// Check `doc` against the schema, then the types, then across fields and on disk.
pub(crate) fn validate_document(
    path: &Path,
    doc: toml::Table,
    prov: Provenance,
    mut diags: Diagnostics,
    world: &[super::world::WorldCheck],
) -> Result<LoadedPipeline, Diagnostics> {
    let root = pipeline_schema();
    let mut issues = Vec::new();
    walk(&root, &root, &toml::Value::Table(doc.clone()), &mut Vec::new(), &mut issues);

    // Report in the order a reader meets them: source by source, top to bottom.
    issues.sort_by_key(|issue| issue_position(&prov, issue));
    let mut pruned = doc.clone();
    let mut can_build = true;
    for issue in &issues {
        diags.push(locate_issue(&prov, issue));
        if issue.missing {
            can_build = false;
        } else {
            remove_at(&mut pruned, &issue.path);
        }
    }
    if !can_build {
        return Err(diags);
    }
    let mut pipeline: Pipeline = match toml::Value::Table(pruned).try_into() {
        Ok(p) => p,
        // The schema issues already explain why the types cannot be built.
        Err(_) if !issues.is_empty() => return Err(diags),
        Err(e) => {
            let (source, span) = prov.locate(&[]);
            diags.push(Diagnostic::error(source, span, format!("invalid pipeline: {}", e.message())));
            return Err(diags);
        }
    };
    resolve_paths(&mut pipeline, &prov);
    // Keys the schema rejected now hold their defaults: checks about them would mislead.
    let rejected: Vec<String> = issues.iter().map(|i| path_string(&i.path)).collect();
    let mut checks = Checks { prov: &prov, doc: &doc, diags: &mut diags, rejected };
    checks.run(&pipeline);
    // Checks against the model files and dataset folders, supplied from above (`preflight`),
    // on a file without errors of its own (a wrong path is reported once, by the file's check).
    let clean = !checks.diags.has_errors();
    for check in world.iter().filter(|_| clean) {
        let mut found = Vec::new();
        check(&pipeline, &checks, &mut found);
        for f in found {
            let keys: Vec<&str> = f.keys.iter().map(String::as_str).collect();
            checks.push(&keys, f.message, f.help, f.warning);
        }
    }

    if diags.has_errors() {
        return Err(diags);
    }
    Ok(LoadedPipeline { pipeline, resolved: doc, sources: prov, path: path.to_path_buf(), warnings: diags })
}

/// The messages of every violation of `schema` in the (unmerged) table `doc`: what an editor
/// checking one file with that schema reports.
pub fn schema_messages(schema: &Value, doc: &toml::Table) -> Vec<String> {
    let mut issues = Vec::new();
    walk(schema, schema, &toml::Value::Table(doc.clone()), &mut Vec::new(), &mut issues);
    issues.into_iter().map(|i| i.message).collect()
}

/// Make every relative path in `p` relative to the current directory, by joining it to the folder
/// of the file that wrote it.
fn resolve_paths(p: &mut Pipeline, prov: &Provenance) {
    let fix = |key: &str, v: &mut PathBuf| *v = prov.resolve_path(key, v);
    if let Some(v) = p.model.path.as_mut() {
        fix("model.path", v);
    }
    if let Some(v) = p.model.cache_dir.as_mut() {
        fix("model.cache_dir", v);
    }
    if let Some(v) = p.model.file.as_mut() {
        // A hub file `org/repo/file.safetensors` stays as written unless such a local file exists.
        let local = prov.resolve_path("model.file", v);
        if local.exists() || !crate::hub_id::is_hub_file(&v.to_string_lossy()) {
            *v = local;
        }
    }
    if let Some(v) = p.model.vae.as_mut() {
        // A hub VAE `org/name` stays as written unless such a local file or folder exists.
        let local = prov.resolve_path("model.vae", v);
        if local.exists() || !crate::hub_id::is_hub_id(&v.to_string_lossy()) {
            *v = local;
        }
    }
    if let Some(v) = p.model.config.as_mut() {
        fix("model.config", v);
    }
    if let Some(v) = p.dataset.path.as_mut() {
        fix("dataset.path", v);
    }
    for (i, src) in p.dataset.sources.iter_mut().enumerate() {
        if let Some(v) = src.path.as_mut() {
            fix(&format!("dataset.sources[{i}].path"), v);
        }
    }
    fix("output.dir", &mut p.output.dir);
}

/// Where an issue will be shown: (source, offset).
fn issue_position(prov: &Provenance, issue: &Issue) -> (usize, usize) {
    let mut p = issue.path.clone();
    loop {
        if let Some(o) = prov.origin(&path_string(&p)) {
            return (o.source, if issue.at_key || issue.missing { o.key.start } else { o.value.start });
        }
        if p.pop().is_none() {
            return (0, 0);
        }
    }
}

/// Turn an issue into a diagnostic at the span its key or value came from.
fn locate_issue(prov: &Provenance, issue: &Issue) -> Diagnostic {
    let key = path_string(&issue.path);
    // The nearest ancestor that was written somewhere.
    let mut p = issue.path.clone();
    let mut origin = None;
    while origin.is_none() {
        origin = prov.origin(&path_string(&p));
        if p.pop().is_none() {
            break;
        }
    }
    let d = match origin {
        Some(o) => {
            let span = if issue.at_key || issue.missing { o.key.clone() } else { o.value.clone() };
            Diagnostic::error(&prov.sources[o.source], span, issue.message.clone())
        }
        None => Diagnostic::error(&prov.sources[0], 0..0, issue.message.clone()),
    };
    let d = if key.is_empty() { d } else { d.with_key(key) };
    match &issue.help {
        Some(h) => d.with_help(h.clone()),
        None => d,
    }
}

fn remove_at(doc: &mut toml::Table, path: &[Seg]) {
    let Some((last, parents)) = path.split_last() else { return };
    let mut t: &mut toml::Value = match parents.first() {
        Some(Seg::Key(k)) => match doc.get_mut(k) {
            Some(v) => v,
            None => return,
        },
        Some(Seg::Index(_)) => return,
        None => {
            if let Seg::Key(k) = last {
                doc.remove(k);
            }
            return;
        }
    };
    for seg in &parents[1..] {
        let next = match (seg, t) {
            (Seg::Key(k), toml::Value::Table(tab)) => tab.get_mut(k),
            (Seg::Index(i), toml::Value::Array(a)) => a.get_mut(*i),
            _ => None,
        };
        match next {
            Some(n) => t = n,
            None => return,
        }
    }
    match (last, t) {
        (Seg::Key(k), toml::Value::Table(tab)) => {
            tab.remove(k);
        }
        (Seg::Index(_), toml::Value::Array(_)) => {
            // Remove the whole list: a list with a hole would shift later items.
            let parent_path = &path[..path.len() - 1];
            remove_at(doc, parent_path);
        }
        _ => {}
    }
}

fn json_type_name(ty: &str) -> &'static str {
    match ty {
        "string" => "a string",
        "integer" => "an integer",
        "number" => "a number",
        "boolean" => "true or false",
        "object" => "a table",
        "array" => "a list",
        _ => "a value",
    }
}

fn found(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => format!("the string {}", toml::Value::String(s.clone())),
        toml::Value::Integer(i) => format!("the integer {i}"),
        toml::Value::Float(f) => format!("the float {}", toml::Value::Float(*f)),
        toml::Value::Boolean(b) => format!("the boolean {b}"),
        toml::Value::Datetime(d) => format!("the date-time {d}"),
        toml::Value::Array(_) => "a list".into(),
        toml::Value::Table(_) => "a table".into(),
    }
}

fn type_matches(ty: &str, v: &toml::Value) -> bool {
    matches!(
        (ty, v),
        ("string", toml::Value::String(_))
            | ("integer", toml::Value::Integer(_))
            | ("number", toml::Value::Integer(_) | toml::Value::Float(_))
            | ("boolean", toml::Value::Boolean(_))
            | ("object", toml::Value::Table(_))
            | ("array", toml::Value::Array(_))
    )
}

fn as_json(v: &toml::Value) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn as_f64(v: &toml::Value) -> Option<f64> {
    match v {
        toml::Value::Integer(i) => Some(*i as f64),
        toml::Value::Float(f) => Some(*f),
        _ => None,
    }
}

fn fmt_num(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x}")
    }
}

/// The closest candidate to `word`, if it is close enough to be a likely typo.
pub(crate) fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let word_l = word.to_lowercase();
    let mut best: Option<(f64, &str)> = None;
    for c in candidates {
        let score = strsim::normalized_damerau_levenshtein(&word_l, &c.to_lowercase());
        let close = score >= 0.6 || strsim::damerau_levenshtein(&word_l, &c.to_lowercase()) <= 2;
        if close && best.is_none_or(|(s, _)| score > s) {
            best = Some((score, c));
        }
    }
    best.map(|(_, c)| c)
}

/// Check `value` against `schema`, pushing one issue per violation.
fn walk(root: &Value, schema: &Value, value: &toml::Value, path: &mut Vec<Seg>, issues: &mut Vec<Issue>) {
    let here = path_string(path);
    let issue = |message: String, help: Option<String>| Issue { path: path.clone(), at_key: false, message, help, missing: false };

    if let Some(allowed) = choices(root, schema) {
        let v = as_json(value);
        if !allowed.contains(&v) {
            let list: Vec<String> = allowed.iter().map(toml_literal).collect();
            let help = value.as_str().and_then(|s| {
                let names: Vec<&str> = allowed.iter().filter_map(Value::as_str).collect();
                did_you_mean(s, names).map(|m| format!("did you mean \"{m}\"?"))
            });
            issues.push(issue(format!("`{here}` must be one of {}; found {}", list.join(", "), found(value)), help));
        }
        return;
    }

    let s = deref(root, schema);
    if let Some(ty) = keyword(root, schema, "type") {
        let types: Vec<&str> = match ty {
            Value::String(t) => vec![t.as_str()],
            Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        if !types.is_empty() && !types.iter().any(|t| type_matches(t, value)) {
            let expected = types.iter().map(|t| json_type_name(t)).collect::<Vec<_>>().join(" or ");
            let help = match (types[0], value) {
                ("number" | "integer", toml::Value::String(s)) if s.trim().parse::<f64>().is_ok() => {
                    Some(format!("remove the quotes: {}", s.trim()))
                }
                ("number" | "integer", toml::Value::String(s))
                    if s.split_whitespace().count() > 1 && s.split_whitespace().all(|t| t.parse::<f64>().is_ok()) =>
                {
                    Some(format!("one value per key: `{}` is {} values", s.trim(), s.split_whitespace().count()))
                }
                ("boolean", toml::Value::String(s)) if matches!(s.as_str(), "true" | "false") => {
                    Some(format!("remove the quotes: {s}"))
                }
                ("integer", toml::Value::Float(f)) if f.fract() == 0.0 => Some(format!("write it without a decimal point: {}", *f as i64)),
                ("array", toml::Value::String(s)) => Some(format!("write a list: [{}]", toml::Value::String(s.clone()))),
                _ => None,
            };
            let what = if path.len() == 1 { table_name(path) } else { format!("`{here}`") };
            issues.push(issue(format!("{what} must be {expected}; found {}", found(value)), help));
            return;
        }
    }

    match value {
        toml::Value::Integer(_) | toml::Value::Float(_) => {
            let x = as_f64(value).unwrap_or(f64::NAN);
            // Every number of a pipeline is a finite quantity: `inf` and `nan` pass a bound such
            // as "> 0" (or fail it with a message about the bound) and end in NaN losses later.
            if !x.is_finite() {
                issues.push(issue(format!("`{here}` must be a finite number; found {}", fmt_value(value)), None));
                return;
            }
            let num = |k: &str| keyword(root, schema, k).and_then(Value::as_f64);
            let mut bound = |ok: bool, what: String| {
                if !ok {
                    issues.push(issue(format!("`{here}` must be {what}; found {}", fmt_value(value)), None));
                    true
                } else {
                    false
                }
            };
            if let Some(m) = num("minimum") {
                if bound(x >= m, format!("at least {}", fmt_num(m))) {
                    return;
                }
            }
            if let Some(m) = num("exclusiveMinimum") {
                if bound(x > m, format!("greater than {}", fmt_num(m))) {
                    return;
                }
            }
            if let Some(m) = num("maximum") {
                if bound(x <= m, format!("at most {}", fmt_num(m))) {
                    return;
                }
            }
            if let Some(m) = num("exclusiveMaximum") {
                if bound(x < m, format!("less than {}", fmt_num(m))) {
                    return;
                }
            }
            let max_for_format = match keyword(root, schema, "format").and_then(Value::as_str) {
                Some("uint8") => Some(u8::MAX as f64),
                Some("uint16") => Some(u16::MAX as f64),
                Some("uint32") => Some(u32::MAX as f64),
                _ => None,
            };
            if let Some(m) = max_for_format {
                if bound(x <= m, format!("at most {}", fmt_num(m))) {
                    return;
                }
            }
            if let Some(m) = num("multipleOf") {
                if (x / m).fract() != 0.0 {
                    let below = (x / m).floor() * m;
                    let help = format!("the nearest multiples are {} and {}", fmt_num(below), fmt_num(below + m));
                    let help = if below > 0.0 { Some(help) } else { Some(format!("try {}", fmt_num(below + m))) };
                    issues.push(issue(format!("`{here}` must be a multiple of {}; found {}", fmt_num(m), fmt_value(value)), help));
                }
            }
        }
        toml::Value::Array(items) => {
            let n = |k: &str| keyword(root, schema, k).and_then(Value::as_u64);
            if let Some(min) = n("minItems") {
                if (items.len() as u64) < min {
                    let what = if min == 1 { "must not be empty".to_string() } else { format!("needs at least {min} items") };
                    issues.push(issue(format!("`{here}` {what}"), None));
                }
            }
            if keyword(root, schema, "uniqueItems").and_then(Value::as_bool) == Some(true) {
                for (i, item) in items.iter().enumerate() {
                    if items[..i].contains(item) {
                        path.push(Seg::Index(i));
                        issues.push(Issue {
                            path: path.clone(),
                            at_key: false,
                            message: format!("`{here}` lists {} twice", fmt_value(item)),
                            help: None,
                            missing: false,
                        });
                        path.pop();
                    }
                }
            }
            if let Some(item_schema) = s.get("items") {
                for (i, item) in items.iter().enumerate() {
                    path.push(Seg::Index(i));
                    walk(root, item_schema, item, path, issues);
                    path.pop();
                }
            }
        }
        toml::Value::Table(table) => walk_table(root, schema, table, path, issues),
        toml::Value::String(text) => {
            if let Some(pattern) = keyword(root, schema, "pattern").and_then(Value::as_str) {
                let matches = regex::Regex::new(pattern).map(|re| re.is_match(text)).unwrap_or(true);
                if !matches {
                    let expected = keyword(root, schema, "x-expected")
                        .and_then(Value::as_str)
                        .map(str::to_string)
                        .unwrap_or_else(|| format!("a string matching `{pattern}`"));
                    issues.push(issue(format!("`{here}` must be {expected}; found {}", found(value)), None));
                }
            }
        }
        _ => {}
    }
}

fn fmt_value(v: &toml::Value) -> String {
    v.to_string()
}

fn walk_table(root: &Value, schema: &Value, table: &toml::Table, path: &mut Vec<Seg>, issues: &mut Vec<Issue>) {
    let s = deref(root, schema);
    let props = properties(root, schema);
    let known: Vec<&str> = props.iter().map(|(k, _)| k.as_str()).collect();
    let closed = s.get("additionalProperties") == Some(&Value::Bool(false));
    let extra_schema = s.get("additionalProperties").filter(|v| v.is_object());

    for (key, value) in table {
        path.push(Seg::Key(key.clone()));
        if let Some((_, prop)) = props.iter().find(|(k, _)| *k == key) {
            walk(root, prop, value, path, issues);
        } else if let Some(extra) = extra_schema {
            walk(root, extra, value, path, issues);
        } else if closed {
            let parent = &path[..path.len() - 1];
            let (message, help) = unknown_key(root, parent, key, &known, value.is_table());
            issues.push(Issue { path: path.clone(), at_key: true, message, help, missing: false });
        }
        path.pop();
    }

    // `if` / `then` / `else` (the editor schema's "required unless `extends`"): only conditions
    // made of `required`, and branches made of `required` and nested `properties`, are
    // understood, which is all the generated schemas use.
    if let Some(Value::Array(cond)) = s.get("if").and_then(|c| c.get("required")) {
        let holds = cond.iter().filter_map(Value::as_str).all(|k| table.contains_key(k));
        if let Some(branch) = s.get(if holds { "then" } else { "else" }) {
            apply_branch(root, branch, schema, table, path, issues);
        }
    }
    if let Some(Value::Array(required)) = s.get("required") {
        check_required(root, required, schema, table, path, issues);
    }
}

/// The `required` lists of an `if` branch, checked as if they stood in `schema` itself.
fn apply_branch(root: &Value, branch: &Value, schema: &Value, table: &toml::Table, path: &mut Vec<Seg>, issues: &mut Vec<Issue>) {
    if let Some(Value::Array(required)) = branch.get("required") {
        check_required(root, required, schema, table, path, issues);
    }
    if let Some(Value::Object(nested)) = branch.get("properties") {
        let props = properties(root, schema);
        for (key, sub) in nested {
            let prop = props.iter().find(|(k, _)| *k == key).map(|(_, p)| *p);
            if let (Some(toml::Value::Table(t)), Some(prop)) = (table.get(key), prop) {
                path.push(Seg::Key(key.clone()));
                apply_branch(root, sub, prop, t, path, issues);
                path.pop();
            }
        }
    }
}

/// An issue per key of `required` that `table` lacks (`schema` gives the keys' descriptions).
fn check_required(root: &Value, required: &[Value], schema: &Value, table: &toml::Table, path: &[Seg], issues: &mut Vec<Issue>) {
    let props = properties(root, schema);
    for r in required.iter().filter_map(Value::as_str) {
        if table.contains_key(r) {
            continue;
        }
        let prop = props.iter().find(|(k, _)| *k == r).map(|(_, p)| *p);
        let is_table = prop.is_some_and(|p| keyword(root, p, "type").and_then(Value::as_str) == Some("object"));
        let mut full = path.to_vec();
        full.push(Seg::Key(r.to_string()));
        let message = if is_table {
            format!("missing table [{}]", path_string(&full))
        } else if path.is_empty() {
            format!("missing key `{r}`")
        } else {
            format!("missing key `{r}` in {}", table_name(path))
        };
        let help = prop.and_then(|p| keyword(root, p, "description")).and_then(Value::as_str).map(|d| {
            let d = d.replace('\n', " ");
            format!("`{}`: {d}", path_string(&full))
        });
        issues.push(Issue { path: path.to_vec(), at_key: true, message, help, missing: true });
    }
}

/// The message and help for an unknown key: a reference flag's new name, a key that belongs in
/// another table, a likely typo, or the list of keys.
fn unknown_key(root: &Value, parent: &[Seg], key: &str, known: &[&str], is_table: bool) -> (String, Option<String>) {
    let message = if parent.is_empty() {
        if is_table {
            format!("unknown table [{key}]")
        } else {
            format!("unknown key `{key}` at the top level")
        }
    } else {
        format!("unknown key `{key}` in {}", table_name(parent))
    };
    let flag = format!("--{}", key.trim_start_matches('-'));
    let mut by_flag = Vec::new();
    let mut elsewhere = Vec::new();
    for (stage, stage_schema) in properties(root, root) {
        for (k, prop) in properties(root, stage_schema) {
            if prop.get("x-reference").and_then(Value::as_str) == Some(flag.as_str()) {
                by_flag.push(format!("`{stage}.{k}`"));
            }
            if k == key && parent.len() <= 1 && parent.first() != Some(&Seg::Key(stage.clone())) {
                elsewhere.push(format!("[{stage}]"));
            }
        }
    }
    let help = if !by_flag.is_empty() {
        Some(format!("the reference's `{flag}` is {} here", by_flag.join(" or ")))
    } else if !elsewhere.is_empty() {
        Some(format!("`{key}` belongs in {}", elsewhere.join(" or ")))
    } else if let Some(m) = did_you_mean(key, known.iter().copied()) {
        Some(if parent.is_empty() && is_table { format!("did you mean [{m}]?") } else { format!("did you mean `{m}`?") })
    } else if parent.is_empty() {
        Some(format!("the tables are: {}", known.iter().filter(|k| **k != "extends").map(|k| format!("[{k}]")).collect::<Vec<_>>().join(", ")))
    } else {
        Some(format!("the keys of {} are: {}", table_name(parent), known.join(", ")))
    };
    (message, help)
}

/// Smallest LoRA scale (alpha / rank) accepted: a smaller one leaves the adapter's update far
/// below the f32 rounding of the layer it is added to.
pub(crate) const MIN_LORA_SCALE: f64 = 1e-6;

/// Checks that need more than one key, or the file system.
struct Checks<'a> {
    prov: &'a Provenance,
    doc: &'a toml::Table,
    diags: &'a mut Diagnostics,
    /// Key paths the schema rejected (and so replaced by defaults).
    rejected: Vec<String>,
}

impl super::world::Written for Checks<'_> {
    fn shown(&self, key: &str, fallback: &Path) -> String {
        Checks::shown(self, key, fallback)
    }
}

impl Checks<'_> {
    fn error(&mut self, keys: &[&str], message: String, help: Option<String>) {
        self.push(keys, message, help, false);
    }

    fn warning(&mut self, keys: &[&str], message: String, help: Option<String>) {
        self.push(keys, message, help, true);
    }

    fn push(&mut self, keys: &[&str], message: String, help: Option<String>, warning: bool) {
        if keys.iter().any(|k| self.rejected.iter().any(|r| r == k || k.starts_with(&format!("{r}.")))) {
            return;
        }
        let (source, span) = self.prov.locate(keys);
        let mut d = if warning { Diagnostic::warning(source, span, message) } else { Diagnostic::error(source, span, message) };
        if let Some(k) = keys.iter().find(|k| self.prov.origin(k).is_some()).or(keys.first()) {
            d = d.with_key(*k);
        }
        if let Some(h) = help {
            d = d.with_help(h);
        }
        self.diags.push(d);
    }

    /// The error location for a table that is missing something: its header, else the file.
    fn table_error(&mut self, table: &str, message: String, help: Option<String>) {
        let (source, span) = self.prov.locate_key(&[table]);
        let mut d = Diagnostic::error(source, span, message).with_key(table);
        if let Some(h) = help {
            d = d.with_help(h);
        }
        self.diags.push(d);
    }

    fn is_set(&self, key: &str) -> bool {
        self.prov.origin(key).is_some()
    }

    /// `value` as the user wrote it, for messages.
    fn written(&self, key: &str) -> String {
        let mut v: Option<&toml::Value> = None;
        for (i, part) in key.split('.').enumerate() {
            v = if i == 0 { self.doc.get(part) } else { v.and_then(|t| t.get(part)) };
        }
        v.map(|v| match v {
            toml::Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .unwrap_or_default()
    }

    fn run(&mut self, p: &Pipeline) {
        self.utf8_paths(p);
        self.model(p);
        self.dataset(p);
        self.preprocess(p);
        self.adapter(p);
        self.distributed(p);
        self.optimizer(p);
        self.train(p);
        self.validation(p);
        self.output(p);
    }

    /// Every path key must resolve to UTF-8 text: the run records paths as text (the lock, the
    /// kohya metadata, the model source), so a non-UTF-8 folder name would validate and then not
    /// be found.
    fn utf8_paths(&mut self, p: &Pipeline) {
        let m = &p.model;
        let keys: [(&str, Option<&PathBuf>); 7] = [
            ("model.path", m.path.as_ref()),
            ("model.file", m.file.as_ref()),
            ("model.vae", m.vae.as_ref()),
            ("model.config", m.config.as_ref()),
            ("model.cache_dir", m.cache_dir.as_ref()),
            ("dataset.path", p.dataset.path.as_ref()),
            ("output.dir", Some(&p.output.dir)),
        ];
        for (key, path) in keys {
            if let Some(path) = path.filter(|p| p.to_str().is_none()) {
                self.error(
                    &[key],
                    format!("`{key}` resolves to `{}`, whose name is not UTF-8 text", path.display()),
                    Some("lora records paths as UTF-8 text (lora.lock, the adapter's metadata); rename the folder (the pipeline file's folder, for a relative path)".into()),
                );
            }
        }
    }

    fn model(&mut self, p: &Pipeline) {
        let m = &p.model;
        let sources = [m.id.is_some(), m.path.is_some(), m.file.is_some()].iter().filter(|s| **s).count();
        if let Some(file) = &m.file {
            if sources > 1 {
                self.error(&["model.file"], "[model] has `file` and `id` or `path`; give one".into(), Some("`file` is a single-file checkpoint, `path` a diffusers folder, `id` a hub model".into()));
            }
            let shown = self.shown("model.file", file);
            let text = file.to_string_lossy().to_ascii_lowercase();
            if !text.ends_with(".safetensors") {
                self.error(
                    &["model.file"],
                    format!("model file `{shown}` is not a .safetensors file"),
                    Some("lora reads safetensors only, because loading a pickle (.ckpt/.pt/.bin) can run arbitrary code; use the model's .safetensors release".into()),
                );
            } else if file.is_dir() {
                self.error(&["model.file"], format!("`{shown}` is a folder; a diffusers folder goes in `path`"), None);
            } else if !file.is_file() && !crate::hub_id::is_hub_file(&file.to_string_lossy()) {
                let help = matches!(what_is(file), Found::Missing).then(|| "a hub file is written org/repo/file.safetensors".to_string());
                self.error(&["model.file"], format!("model file `{shown}` {}", what_is(file).not_a("file")), help);
            }
        } else {
            for (key, set) in [("model.config", m.config.is_some()), ("model.prediction_type", m.prediction_type.is_some()), ("model.ema", m.ema)] {
                if set {
                    self.error(
                        &[key],
                        format!("`{key}` applies to single-file checkpoints (`model.file`) only"),
                        Some("a diffusers folder or hub model has its own configs; `train.prediction_type` overrides the training target".into()),
                    );
                }
            }
        }
        if let Some(dir) = &m.config {
            let shown = self.shown("model.config", dir);
            let missing: Vec<&str> = crate::vocab::DIFFUSERS_CONFIGS
                .into_iter()
                .filter(|f| !dir.join(f).exists())
                .collect();
            if !dir.is_dir() {
                self.error(&["model.config"], format!("config folder `{shown}` {}", what_is(dir).not_a("folder")), None);
            } else if !missing.is_empty() {
                self.error(&["model.config"], format!("config folder `{shown}` lacks {}", missing.join(", ")), Some("it should be laid out as a diffusers model folder (weights are not needed)".into()));
            }
        }
        if let Some(vae) = &m.vae {
            let shown = self.shown("model.vae", vae);
            if vae.is_dir() {
                for need in ["config.json", "diffusion_pytorch_model.safetensors"] {
                    if !vae.join(need).is_file() {
                        self.error(&["model.vae"], format!("VAE folder `{shown}` has no {need}"), Some("a diffusers VAE folder holds config.json and diffusion_pytorch_model.safetensors".into()));
                    }
                }
            } else if !vae.exists() && crate::hub_id::is_hub_id(&vae.to_string_lossy()) {
                // A hub VAE, fetched when the model loads.
            } else if !vae.to_string_lossy().to_ascii_lowercase().ends_with(".safetensors") {
                self.error(&["model.vae"], format!("VAE file `{shown}` is not a .safetensors file"), Some("lora reads safetensors only, because loading a pickle can run arbitrary code".into()));
            } else if !vae.is_file() {
                self.error(&["model.vae"], format!("VAE file `{shown}` {}", what_is(vae).not_a("file")), None);
            }
        }
        if m.file.is_some() {
            return;
        }
        match (&m.id, &m.path) {
            (None, None) => self.table_error(
                "model",
                "[model] needs `id` (a hub model), `path` (a local diffusers folder) or `file` (a single-file checkpoint)".into(),
                Some("e.g. path = \"../tests/fixtures/tiny-sd\" or id = \"stable-diffusion-v1-5/stable-diffusion-v1-5\"".into()),
            ),
            (Some(_), Some(_)) => self.error(
                &["model.path"],
                "[model] has both `id` and `path`; give one".into(),
                Some("`id` is a hub model, `path` a local folder".into()),
            ),
            (Some(id), None) => {
                let looks_local = id.starts_with('.') || id.starts_with('/') || id.starts_with('~') || id.contains('\\') || id.matches('/').count() > 1;
                if looks_local {
                    self.error(&["model.id"], format!("`model.id` \"{id}\" looks like a local path, not a hub id"), Some(format!("for a local folder write path = \"{id}\"")));
                } else if !valid_hub_id(id) {
                    self.error(&["model.id"], format!("`model.id` \"{id}\" is not a hub id"), Some(HUB_ID_RULE.into()));
                }
            }
            (None, Some(path)) => {
                let shown = self.shown("model.path", path);
                let found = what_is(path);
                if !matches!(found, Found::Dir | Found::File) {
                    self.error(&["model.path"], format!("model folder `{shown}` {}", found.not_a("folder")), None);
                } else if !path.is_dir() {
                    self.error(&["model.path"], format!("model path `{shown}` is a file; expected a diffusers model folder"), None);
                } else if !path.join("model_index.json").is_file() && !path.join("unet").is_dir() {
                    self.error(
                        &["model.path"],
                        format!("`{shown}` is not a diffusers model folder (no model_index.json)"),
                        Some("it should hold model_index.json, unet/, vae/, text_encoder/, tokenizer/ and scheduler/".into()),
                    );
                }
            }
        }
        if m.revision.is_some() && m.path.is_some() {
            self.warning(&["model.revision"], "`model.revision` is ignored for a local model folder".into(), None);
        }
        if let Some(dir) = &m.cache_dir {
            let found = what_is(dir);
            if !matches!(found, Found::Missing | Found::Dir) {
                let shown = self.shown("model.cache_dir", dir);
                let what = if matches!(found, Found::File) { "is a file".to_string() } else { found.not_a("folder") };
                self.error(&["model.cache_dir"], format!("cache folder `{shown}` {what}"), None);
            }
        }
    }

    /// A path key as the user sees it: the folder of the file that wrote it joined with the value
    /// (`fallback`, the typed value, when no source set it).
    fn shown(&self, key: &str, fallback: &Path) -> String {
        let written = self.written(key);
        // `written` walks tables only: a key inside an array (`dataset.sources[0].path`) shows
        // the resolved path.
        if written.is_empty() {
            return tidy_path(fallback).display().to_string();
        }
        match self.prov.origin(key) {
            Some(o) if self.prov.base_dirs[o.source].is_some() && Path::new(&written).is_relative() => {
                let file = Path::new(&self.prov.sources[o.source].name);
                tidy_path(&file.parent().unwrap_or(Path::new("")).join(&written)).display().to_string()
            }
            Some(_) => written,
            None => fallback.display().to_string(),
        }
    }

    fn dataset(&mut self, p: &Pipeline) {
        let d = &p.dataset;
        for (i, src) in d.sources.iter().enumerate() {
            let key = format!("dataset.sources[{i}]");
            match (src.kind, &src.name, &src.path) {
                (DatasetKind::Hub, None, _) => self.error(&[&format!("{key}.kind"), &key], format!("`{key}` is kind \"hub\" and needs `name` (a hub dataset id)"), None),
                (DatasetKind::Hub, Some(_), Some(_)) => self.error(&[&format!("{key}.path"), &key], format!("`{key}.path` is for local datasets; kind \"hub\" reads `name`"), None),
                (DatasetKind::Hub, Some(name), None) if !valid_hub_id(name) => {
                    self.error(&[&format!("{key}.name"), &key], format!("`{key}.name` = \"{name}\" is not a hub dataset id (owner/name)"), None)
                }
                (DatasetKind::Hub, Some(_), None) => {}
                (kind, _, Some(path)) => self.dataset_path(&format!("{key}.path"), kind, path),
                (_, _, None) => self.error(&[&format!("{key}.kind"), &key], format!("`{key}` is a local dataset and needs `path`"), None),
            }
        }
        if d.keep_tokens > 0 && !d.shuffle_tags {
            self.error(
                &["dataset.keep_tokens"],
                format!("`dataset.keep_tokens` = {} keeps tags in place while shuffling, but `dataset.shuffle_tags` is false, so it would do nothing", d.keep_tokens),
                Some("set shuffle_tags = true, or remove keep_tokens".into()),
            );
        }
        match d.kind {
            DatasetKind::Hub => {
                if d.name.is_none() {
                    self.error(&["dataset.kind"], "dataset kind \"hub\" needs `dataset.name` (a hub dataset id)".into(), Some("e.g. name = \"lambdalabs/naruto-blip-captions\"".into()));
                }
                if d.path.is_some() {
                    self.error(&["dataset.path"], "`dataset.path` is for local datasets; kind \"hub\" reads `dataset.name`".into(), Some("use kind = \"parquet\", \"imagefolder\" or \"sidecar\" for a local dataset".into()));
                }
                if let Some(name) = &d.name {
                    if !valid_hub_id(name) {
                        self.error(&["dataset.name"], format!("`dataset.name` \"{name}\" is not a hub dataset id ({HUB_ID_RULE})"), Some("for a local dataset set kind and `path`".into()));
                    }
                }
            }
            kind => {
                if d.name.is_some() {
                    self.error(&["dataset.name"], format!("`dataset.name` is for hub datasets; kind \"{}\" reads `dataset.path`", kind_name(kind)), None);
                }
                match &d.path {
                    None => self.error(&["dataset.kind"], format!("dataset kind \"{}\" needs `dataset.path`", kind_name(kind)), None),
                    Some(path) => self.dataset_path("dataset.path", kind, path),
                }
            }
        }
        if d.config_name.is_some() {
            // Accepted keys must work: the hub source reads the dataset's default parquet files and
            // has no notion of a named configuration yet.
            self.error(
                &["dataset.config_name"],
                "`dataset.config_name` is not supported yet: the hub source reads the dataset's default configuration".into(),
                Some("remove the key, or download the configuration's parquet files and use kind = \"parquet\"".into()),
            );
        }
    }

    fn dataset_path(&mut self, key: &str, kind: DatasetKind, path: &Path) {
        let shown = self.shown(key, path);
        let found = what_is(path);
        if !matches!(found, Found::Dir | Found::File) {
            let what = if key == "dataset.path" { "dataset path".to_string() } else { format!("`{key}`") };
            return self.error(&[key], format!("{what} `{shown}` {}", found.not_a("file or folder")), None);
        }
        match kind {
            DatasetKind::Parquet => {
                let ok = if path.is_file() { true } else { find_file(path, 3, &|n| n.ends_with(".parquet")) };
                if !ok {
                    self.error(&[key], format!("no .parquet file in `{shown}`"), None);
                }
            }
            DatasetKind::Imagefolder => {
                if !path.is_dir() {
                    self.error(&[key], format!("`{shown}` is a file; kind \"imagefolder\" needs a folder"), None);
                } else if !find_file(path, 3, &|n| crate::layout::METADATA_NAMES.contains(&n)) {
                    self.error(
                        &[key],
                        format!("no metadata.jsonl or metadata.csv in `{shown}`"),
                        Some("an image folder needs metadata.jsonl lines {\"file_name\": ..., \"text\": ...} (or a metadata.csv with those columns); for .txt captions next to the images use kind = \"sidecar\"".into()),
                    );
                }
            }
            DatasetKind::Sidecar => {
                if !path.is_dir() {
                    self.error(&[key], format!("`{shown}` is a file; kind \"sidecar\" needs a folder"), None);
                }
            }
            DatasetKind::Hub => {}
        }
    }

    fn preprocess(&mut self, p: &Pipeline) {
        let pp = &p.preprocess;
        match (pp.center_crop, pp.random_crop) {
            (true, Some(true)) => self.error(
                &["preprocess.random_crop", "preprocess.center_crop"],
                "`preprocess.random_crop` and `preprocess.center_crop` are both true; pick one".into(),
                None,
            ),
            (false, Some(false)) => self.error(
                &["preprocess.random_crop"],
                "`preprocess.random_crop` is false and `center_crop` is false: images must be cropped to a square".into(),
                Some("set center_crop = true for the middle square".into()),
            ),
            _ => {}
        }
        if pp.buckets {
            if let Some(res) = pp.resolution {
                if let Some((key, msg)) = pp.bucket_bounds_error(res) {
                    self.error(&[key], msg, Some("kohya's defaults are min 256, max 1024, step 64".into()));
                }
            }
        } else {
            for key in ["preprocess.min_bucket_reso", "preprocess.max_bucket_reso", "preprocess.bucket_reso_steps", "preprocess.bucket_no_upscale"] {
                if self.is_set(key) {
                    self.error(&[key], format!("`{key}` only shapes aspect-ratio buckets, and `preprocess.buckets` is false"), Some("set buckets = true, or remove it".into()));
                }
            }
        }
    }

    /// `[distributed]` settings this binary cannot honour.
    fn distributed(&mut self, p: &Pipeline) {
        let d = &p.distributed;
        if let Some(n) = d.gpus {
            let why = if cfg!(feature = "cuda") {
                "GPU ranks need NCCL, which this build does not have (its collectives are TCP, for CPU ranks)"
            } else {
                "this `lora` was built without CUDA"
            };
            self.error(
                &["distributed.gpus"],
                format!("`distributed.gpus` = {n}: {why}"),
                Some("train on one GPU, or on CPU ranks with `distributed.ranks` (docs/distributed.md)".into()),
            );
        }
        if d.ranks.is_some_and(|n| n > 1) && matches!(p.train.device, crate::config::types::Device::Cuda(_)) {
            self.error(
                &["distributed.ranks", "train.device"],
                "`distributed.ranks` starts CPU ranks, but `train.device` asks for a GPU: several GPU ranks need NCCL, which this build does not have".into(),
                Some("set train.device = \"cpu\", or run one process on the GPU".into()),
            );
        }
    }

    fn adapter(&mut self, p: &Pipeline) {
        let a = &p.adapter;
        for (i, t) in a.target_modules.iter().enumerate() {
            if t.trim().is_empty() {
                self.error(&[&format!("adapter.target_modules[{i}]"), "adapter.target_modules"], "empty module pattern in `adapter.target_modules`".into(), None);
            }
        }
        // Every pattern must be one injection can parse (a name, or `re:` and a valid regex).
        let lists = [("adapter.target_modules", &a.target_modules), ("adapter.text_encoder_target_modules", &a.text_encoder_target_modules)];
        let mut patterns: Vec<(String, &str)> = Vec::new();
        for (key, list) in lists {
            patterns.extend(list.iter().enumerate().filter(|(_, t)| !t.trim().is_empty()).map(|(i, t)| (format!("{key}[{i}]"), t.as_str())));
        }
        patterns.extend(a.rank_pattern.keys().map(|k| (format!("adapter.rank_pattern.{}", quote_key(k)), k.as_str())));
        patterns.extend(a.alpha_pattern.keys().map(|k| (format!("adapter.alpha_pattern.{}", quote_key(k)), k.as_str())));
        for (key, pattern) in patterns {
            if let Err(e) = crate::adapters::pattern::ModulePattern::parse(pattern) {
                let parent = key.split('[').next().unwrap_or(&key).to_string();
                // The regex crate's explanation ends with a line `error: ...`.
                let why = e.chain().nth(1).and_then(|c| c.to_string().lines().last().map(|l| l.trim().trim_start_matches("error: ").to_string()));
                self.error(&[key.as_str(), parent.as_str()], format!("{e}"), why);
            }
        }
        // The update is scaled by alpha / rank: below MIN_LORA_SCALE the adapter's output is
        // lost under f32 rounding of the layer it is added to, so training would change nothing.
        let max_rank = a.rank_pattern.values().map(|r| r.0).chain([a.rank]).max().unwrap_or(a.rank) as f64;
        let mut alphas: Vec<(String, f64)> = Vec::new();
        if let Some(alpha) = a.alpha {
            alphas.push(("adapter.alpha".into(), alpha));
        }
        for (pattern, alpha) in &a.alpha_pattern {
            alphas.push((format!("adapter.alpha_pattern.{}", quote_key(pattern)), alpha.0));
        }
        for (key, alpha) in alphas {
            let scale = alpha / max_rank;
            if alpha.is_finite() && scale < MIN_LORA_SCALE {
                self.error(
                    &[key.as_str()],
                    format!(
                        "`{key}` = {alpha:e} with rank {} scales the update by {scale:e}: the adapter would do nothing (alpha / rank must be at least {MIN_LORA_SCALE:e})",
                        fmt_num(max_rank)
                    ),
                    Some("alpha is usually the rank (scale 1, the default when alpha is unset) or half of it".into()),
                );
            }
        }
        if a.conv_rank.is_none() && self.is_set("adapter.conv_alpha") {
            self.error(
                &["adapter.conv_alpha"],
                "`adapter.conv_alpha` is set but `adapter.conv_rank` is not: no convolution gets a branch to scale".into(),
                Some("set conv_rank to adapt the resnets' convolutions (LoCon), or remove conv_alpha".into()),
            );
        }
        if let (Some(r), Some(alpha)) = (a.conv_rank, a.conv_alpha) {
            let scale = alpha / r as f64;
            if alpha.is_finite() && scale < MIN_LORA_SCALE {
                self.error(
                    &["adapter.conv_alpha"],
                    format!("`adapter.conv_alpha` = {alpha:e} with conv_rank {r} scales the update by {scale:e}: the adapter would do nothing (alpha / rank must be at least {MIN_LORA_SCALE:e})"),
                    Some("kohya's usual conv_alpha is 1 or half the conv_rank".into()),
                );
            }
        }
        if !a.text_encoder && self.is_set("adapter.text_encoder_target_modules") {
            self.warning(
                &["adapter.text_encoder_target_modules"],
                "`adapter.text_encoder_target_modules` is set but `adapter.text_encoder` is false".into(),
                Some("set text_encoder = true to train text-encoder LoRA layers".into()),
            );
        }
    }

    fn optimizer(&mut self, p: &Pipeline) {
        use crate::config::types::OptimizerKind as K;
        let kind = p.optimizer.kind;
        let name = crate::config::choice_name(&kind);
        // Keys the kind has no use for.
        let foreign: &[(&str, &str)] = match kind {
            K::Lion => &[("optimizer.epsilon", "Lion takes the sign of its momentum and has no epsilon")],
            K::Adafactor => &[
                ("optimizer.epsilon", "Adafactor's epsilons are fixed (1e-30, 1e-3)"),
                ("optimizer.beta1", "Adafactor keeps no first moment here"),
                ("optimizer.beta2", "Adafactor's decay follows 1 - step^-0.8"),
            ],
            _ => &[],
        };
        if p.optimizer.fused && kind != K::Adamw {
            self.error(&["optimizer.fused"], format!("`optimizer.fused` is AdamW's one-pass update; kind = \"{name}\" has none"), Some("remove it, or use kind = \"adamw\"".into()));
        }
        if p.optimizer.fused && matches!(p.train.device, crate::config::types::Device::Cuda(_)) {
            self.error(
                &["optimizer.fused", "train.device"],
                "`optimizer.fused` runs on the host: there is no fused GPU kernel yet, so on a GPU it would change nothing".into(),
                Some("remove it for GPU training".into()),
            );
        }
        for (key, why) in foreign {
            if self.is_set(key) {
                self.error(&[key], format!("`{key}` does nothing for kind = \"{name}\": {why}"), Some("remove it, or pick another kind".into()));
            }
        }
        let only: [(&str, K); 4] = [
            ("optimizer.d_coef", K::Prodigy),
            ("optimizer.use_bias_correction", K::Prodigy),
            ("optimizer.safeguard_warmup", K::Prodigy),
            ("optimizer.scale_parameter", K::Adafactor),
        ];
        for (key, owner) in only {
            if kind != owner && self.is_set(key) {
                let owner_name = crate::config::choice_name(&owner);
                self.error(&[key], format!("`{key}` is {owner_name}'s, and `optimizer.kind` is \"{name}\""), Some(format!("set kind = \"{owner_name}\", or remove it")));
            }
        }
        if kind == K::Prodigy && !self.is_set("train.learning_rate") {
            self.error(
                &["optimizer.kind"],
                "Prodigy estimates its own step size and `train.learning_rate` multiplies it: the default 1e-4 would make it 10,000 times too small".into(),
                Some("set train.learning_rate = 1.0, as people run Prodigy".into()),
            );
        }
    }

    fn train(&mut self, p: &Pipeline) {
        let t = &p.train;
        let min_lr = t.lr_scheduler == crate::config::types::LrScheduler::CosineWithMinLr;
        match (min_lr, t.min_lr_ratio) {
            (true, None) => self.error(
                &["train.lr_scheduler"],
                "`lr_scheduler = \"cosine_with_min_lr\"` needs `train.min_lr_ratio` (the floor as a fraction of the learning rate)".into(),
                Some("e.g. min_lr_ratio = 0.1, as kohya's --lr_scheduler_min_lr_ratio".into()),
            ),
            (false, Some(_)) => self.error(
                &["train.min_lr_ratio"],
                "`train.min_lr_ratio` is set but `lr_scheduler` is not \"cosine_with_min_lr\", so it would do nothing".into(),
                Some("set lr_scheduler = \"cosine_with_min_lr\", or remove min_lr_ratio".into()),
            ),
            _ => {}
        }
        if let Some(steps) = t.max_steps {
            if t.lr_scheduler != LrScheduler::Constant && t.lr_warmup_steps > steps {
                let default = if self.is_set("train.lr_warmup_steps") { "" } else { ", the default" };
                self.error(
                    &["train.lr_warmup_steps", "train.lr_scheduler", "train.max_steps"],
                    format!("warmup ({} steps{default}) is longer than training ({steps} steps)", t.lr_warmup_steps),
                    Some(format!("set train.lr_warmup_steps below {steps}")),
                );
            }
            if p.checkpoints.every_steps > steps && self.is_set("checkpoints.every_steps") {
                self.warning(
                    &["checkpoints.every_steps"],
                    format!("no checkpoint will be saved: `checkpoints.every_steps` ({}) is more than train.max_steps ({steps})", p.checkpoints.every_steps),
                    None,
                );
            }
        }
        if t.precision != Precision::No && t.device == Device::Cpu {
            let name = if t.precision == Precision::Fp16 { "fp16" } else { "bf16" };
            self.warning(
                &["train.precision"],
                format!("precision \"{name}\" on the CPU is slower than \"no\": the CPU has no half-precision kernels, so convolutions compute in f32 and round"),
                Some("use precision = \"no\" on the CPU unless you are testing mixed precision".into()),
            );
        }
        if let Device::Cuda(_) = t.device {
            if !cfg!(feature = "cuda") {
                self.error(
                    &["train.device"],
                    format!("train.device = \"{}\" but this `lora` was built without CUDA", t.device),
                    Some("build with `cargo build --release --features cuda` (README: On an NVIDIA GPU), or use device = \"auto\" (the GPU when there is one, else the CPU) or \"cpu\"".into()),
                );
            }
        }
        if self.is_set("train.dataloader_workers") {
            // Accepted keys must work: images are decoded and preprocessed on the process-wide
            // thread pool (RAYON_NUM_THREADS), not on a worker pool of its own.
            self.error(
                &["train.dataloader_workers"],
                "`train.dataloader_workers` is not supported yet: images are decoded on the shared thread pool (set RAYON_NUM_THREADS to change its size)".into(),
                Some("remove the key".into()),
            );
        }
        if t.allow_tf32 && t.device == Device::Cpu {
            self.warning(&["train.allow_tf32"], "`train.allow_tf32` has no effect on the CPU".into(), None);
        }
    }

    fn validation(&mut self, p: &Pipeline) {
        let v = &p.validation;
        if v.loss_split == 0.0 && v.loss_every_steps.is_some() {
            self.error(
                &["validation.loss_every_steps"],
                "`validation.loss_every_steps` is set but `validation.loss_split` is 0, so there is no held-out loss to measure".into(),
                Some("set loss_split (e.g. 0.1) to hold part of the dataset out".into()),
            );
        }
        if v.prompts.is_empty() {
            let set: Vec<String> = ["num_images", "every_epochs", "every_steps", "scheduler", "steps", "guidance_scale", "negative_prompt"]
                .iter()
                .map(|k| format!("validation.{k}"))
                .filter(|k| self.is_set(k))
                .collect();
            if let Some(first) = set.first() {
                self.error(
                    &[first.as_str()],
                    format!("`{first}` is set but `validation.prompts` is empty, so no validation images would be made"),
                    Some("add prompts = [\"...\"] to [validation], or remove the [validation] keys".into()),
                );
            }
        }
        for (i, prompt) in v.prompts.iter().enumerate() {
            if prompt.trim().is_empty() {
                self.error(&[&format!("validation.prompts[{i}]"), "validation.prompts"], format!("validation prompt {} is empty", i + 1), None);
            }
        }
        if let (Some(every), Some(max)) = (v.every_steps, p.train.max_steps) {
            if every > max && !v.prompts.is_empty() {
                self.warning(&["validation.every_steps"], format!("`validation.every_steps` ({every}) is more than train.max_steps ({max})"), None);
            }
        }
    }

    fn output(&mut self, p: &Pipeline) {
        let dir = &p.output.dir;
        let shown = self.shown("output.dir", dir);
        if dir.as_os_str().is_empty() {
            return self.error(&["output.dir"], "`output.dir` is empty".into(), None);
        }
        if self.output_place(p, dir, &shown) {
            return;
        }
        let found = what_is(dir);
        if !matches!(found, Found::Missing | Found::Dir) {
            let what = if matches!(found, Found::File) { "is a file".to_string() } else { found.not_a("folder") };
            return self.error(&["output.dir"], format!("output folder `{shown}` {what}"), None);
        }
        if dir.exists() {
            if let Err(e) = tempfile::Builder::new().prefix(".lora-write-test").tempfile_in(dir) {
                return self.error(&["output.dir"], format!("output folder `{shown}` is not writable: {}", reason(&e)), None);
            }
            return;
        }
        // Not there yet: the nearest existing ancestor must be a folder we can write in.
        let mut ancestor = dir.as_path();
        loop {
            match ancestor.parent() {
                Some(p) if p.as_os_str().is_empty() => {
                    ancestor = Path::new(".");
                    break;
                }
                Some(p) => {
                    ancestor = p;
                    if ancestor.exists() {
                        break;
                    }
                }
                None => break,
            }
        }
        if !ancestor.is_dir() {
            let a = ancestor.display().to_string();
            return self.error(&["output.dir"], format!("output folder `{shown}` cannot be created: `{a}` is a file"), None);
        }
        if let Err(e) = tempfile::Builder::new().prefix(".lora-write-test").tempfile_in(ancestor) {
            let a = ancestor.display().to_string();
            self.error(&["output.dir"], format!("output folder `{shown}` cannot be created in `{a}`: {}", reason(&e)), None);
        }
    }
}

impl Checks<'_> {
    /// Where an output folder may not be: a run writes its files there and removes its
    /// temporaries, and the next run reads its dataset folder. Pushes the error and returns true
    /// when `dir` is `/`, the home folder, the dataset's or the model's folder (or inside them),
    /// or a folder holding another run's folder.
    fn output_place(&mut self, p: &Pipeline, dir: &Path, shown: &str) -> bool {
        let Some(out) = canonical_or_absolute(dir) else { return false };
        let refuse = |me: &mut Self, message: String, help: &str| {
            me.error(&["output.dir"], message, Some(help.to_string()));
            true
        };
        let own_folder = "give the run a folder of its own, e.g. output.dir = \"runs/<name>\"";
        if out.parent().is_none() {
            return refuse(self, format!("output folder `{shown}` is the root folder"), own_folder);
        }
        let home = std::env::var_os("HOME").filter(|h| !h.is_empty()).and_then(|h| canonical_or_absolute(Path::new(&h)));
        if home.as_deref() == Some(out.as_path()) {
            return refuse(self, format!("output folder `{shown}` is your home folder"), own_folder);
        }
        let local_dataset = p.dataset.path.as_ref().filter(|_| p.dataset.kind != DatasetKind::Hub);
        for (key, folder, what) in [("dataset.path", local_dataset, "the dataset"), ("model.path", p.model.path.as_ref(), "the model")] {
            let Some(folder) = folder.and_then(|f| canonical_or_absolute(f)) else { continue };
            if out.starts_with(&folder) {
                let written = self.shown(key, &folder);
                let place = if out == folder { format!("is {what} folder ({key})") } else { format!("is inside {what} folder `{written}` ({key})") };
                let why = if key == "dataset.path" {
                    "the next run would read the outputs (loss.png, validation images) as training images"
                } else {
                    "the outputs would mix with the model's files"
                };
                return refuse(self, format!("output folder `{shown}` {place}: {why}"), own_folder);
            }
        }
        if let Some(other) = run_folder_below(&out, 3, true) {
            let rel = other.strip_prefix(&out).unwrap_or(&other).display().to_string();
            return refuse(
                self,
                format!("output folder `{shown}` holds another run's folder `{rel}` (it has {}): a run cleans up inside its own folder", crate::layout::LOCK_FILE),
                own_folder,
            );
        }
        false
    }
}

/// `path` made absolute, with its longest existing ancestor's symbolic links resolved (`None`
/// when the current directory is unknown).
fn canonical_or_absolute(path: &Path) -> Option<PathBuf> {
    let absolute = tidy_path(&std::path::absolute(path).ok()?);
    let mut existing = absolute.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(c) = existing.canonicalize() {
            return Some(rest.iter().rev().fold(c, |acc: PathBuf, part| acc.join(part)));
        }
        rest.push(existing.file_name()?.to_owned());
        existing = existing.parent()?;
    }
}

/// A folder below `dir` (at most `depth` levels, symbolic links not followed) that holds a run's
/// lock file: the folder of another run. `top`: `dir` is the output folder itself, whose
/// set-aside folder is skipped.
fn run_folder_below(dir: &Path, depth: usize, top: bool) -> Option<PathBuf> {
    if depth == 0 {
        return None;
    }
    let entries = std::fs::read_dir(dir).ok()?;
    let mut subdirs = Vec::new();
    for entry in entries.flatten().take(10_000) {
        if entry.file_type().is_ok_and(|t| t.is_dir()) && !(top && entry.file_name() == crate::layout::EARLIER_DIR) {
            subdirs.push(entry.path());
        }
    }
    subdirs.sort();
    if let Some(run) = subdirs.iter().find(|sub| sub.join(crate::layout::LOCK_FILE).is_file()) {
        return Some(run.clone());
    }
    subdirs.iter().find_map(|d| run_folder_below(d, depth - 1, false))
}

/// What is at a path, so messages say what it is instead of "does not exist".
enum Found {
    Missing,
    Dir,
    File,
    /// A FIFO, device or socket: "a named pipe (FIFO)".
    Other(&'static str),
    /// It cannot be looked at: a symlink loop, a dangling link, permission denied.
    Unreadable(String),
}

fn what_is(path: &Path) -> Found {
    match std::fs::metadata(path) {
        Ok(m) if m.is_dir() => Found::Dir,
        Ok(m) if m.is_file() => Found::File,
        Ok(m) => Found::Other(crate::util::file_kind::special_file_kind(&m.file_type())),
        // ENOTDIR: a file stands where a folder of the path should be; nothing is there.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR) => {
            if std::fs::symlink_metadata(path).is_ok() {
                Found::Unreadable("is a symbolic link to something that does not exist".into())
            } else {
                Found::Missing
            }
        }
        Err(e) if e.raw_os_error() == Some(libc::ELOOP) => Found::Unreadable("is a symbolic link loop (too many levels of symbolic links)".into()),
        Err(e) => Found::Unreadable(format!("cannot be read: {}", reason(&e))),
    }
}

impl Found {
    /// The end of a sentence "`<path>` ...", for a path that should be `wanted` ("a file").
    fn not_a(&self, wanted: &str) -> String {
        match self {
            Found::Missing => "does not exist".into(),
            Found::Dir => format!("is a folder, not a {wanted}"),
            Found::File => format!("is a file, not a {wanted}"),
            Found::Other(what) => format!("is {what}, not a {wanted}"),
            Found::Unreadable(why) => why.clone(),
        }
    }
}

fn reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::PermissionDenied => "permission denied".into(),
        _ => e.to_string(),
    }
}

fn kind_name(kind: DatasetKind) -> &'static str {
    match kind {
        DatasetKind::Hub => "hub",
        DatasetKind::Parquet => "parquet",
        DatasetKind::Imagefolder => "imagefolder",
        DatasetKind::Sidecar => "sidecar",
    }
}

/// The hub's id rule, for messages.
const HUB_ID_RULE: &str = "`name` or `owner/name`, at most 96 characters of letters, digits, `-`, `_` and `.`, no `--` or `..`, parts not starting or ending with `-` or `.`";

/// `name` or `owner/name` as the hub allows them: the same rule model loading applies
/// (`hub_id::is_hub_id`), so that what validates also loads.
fn valid_hub_id(id: &str) -> bool {
    crate::hub_id::is_hub_id(id)
}

/// Whether a file whose name passes `want` is in `dir`, at most `depth` folders down.
fn find_file(dir: &Path, depth: usize, want: &dyn Fn(&str) -> bool) -> bool {
    let Ok(entries) = std::fs::read_dir(dir) else { return false };
    let mut subdirs = Vec::new();
    for entry in entries.flatten().take(10_000) {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Ok(ft) = entry.file_type() else { continue };
        if ft.is_dir() {
            subdirs.push(entry.path());
        } else if want(&name) {
            return true;
        }
    }
    depth > 0 && subdirs.iter().any(|d| find_file(d, depth - 1, want))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn did_you_mean_finds_near_misses_only() {
        let keys = ["learning_rate", "lr_scheduler", "max_steps", "seed"];
        assert_eq!(did_you_mean("learning_rat", keys), Some("learning_rate"));
        assert_eq!(did_you_mean("Learning_Rate", keys), Some("learning_rate"));
        assert_eq!(did_you_mean("max_step", keys), Some("max_steps"));
        assert_eq!(did_you_mean("gradient_checkpointing", keys), None);
    }

    #[test]
    fn hub_ids_are_owner_slash_name() {
        assert!(valid_hub_id("stable-diffusion-v1-5/stable-diffusion-v1-5"));
        assert!(valid_hub_id("gpt2"));
        assert!(!valid_hub_id("a/b/c"));
        assert!(!valid_hub_id("../x"));
        assert!(!valid_hub_id("a b/c"));
        // What loading refuses, validation refuses.
        assert!(!valid_hub_id("org/na--me"));
        assert!(!valid_hub_id(&format!("org/{}", "a".repeat(120))));
        assert!(!valid_hub_id("org/-name"));
    }
}
