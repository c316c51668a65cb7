//! The JSON Schema of pipeline files, generated from `types` with schemars, and the key tables of
//! `docs/pipeline.md`, generated from that schema.

use serde_json::{Map, Value};

use super::types::Pipeline;

/// The pipeline JSON Schema (draft 07, which every TOML editor's validator understands).
/// `Option` fields are plain optional keys: TOML has no null, so the schema does not offer one.
pub fn pipeline_schema() -> Value {
    let generator = schemars::generate::SchemaSettings::draft07().into_generator();
    let schema = generator.into_root_schema_for::<Pipeline>();
    let mut value = schema.to_value();
    strip_null(&mut value);
    value
}

/// The schema as `lora schema` prints it and `schemas/pipeline.schema.json` holds it: the
/// [`editor_schema`], for editors that check one file at a time.
pub fn pipeline_schema_text() -> String {
    serde_json::to_string_pretty(&editor_schema()).unwrap_or_default() + "\n"
}

/// The schema for editors (Taplo / Even Better TOML, which check one file without its base):
/// every `required` of [`pipeline_schema`] moves into one top-level
/// `"if": {"required": ["extends"]}, "else": {...}`, so a file with `extends` may leave its
/// required tables and keys to its base, and a file without one is checked as strictly as
/// before. `lora validate` still checks the merged pipeline against [`pipeline_schema`].
pub fn editor_schema() -> Value {
    let mut root = pipeline_schema();
    let strict = root.clone();
    let mut required = Map::new();
    collect_required(&strict, &strict, &mut required, 0);
    strip_required(&mut root);
    if let Value::Object(map) = &mut root {
        map.insert("if".into(), serde_json::json!({ "required": ["extends"] }));
        map.insert("else".into(), Value::Object(required));
    }
    root
}

/// The `required` lists reachable from `schema` through `properties` (following `$ref`), as a
/// schema of nested `properties` holding only those lists.
fn collect_required(root: &Value, schema: &Value, out: &mut Map<String, Value>, depth: usize) {
    if depth > 16 {
        return;
    }
    let table = deref(root, schema);
    if let Some(req) = table.get("required").filter(|r| r.as_array().is_some_and(|a| !a.is_empty())) {
        out.insert("required".into(), req.clone());
    }
    let mut nested = Map::new();
    for (key, prop) in properties(root, schema) {
        let mut inner = Map::new();
        collect_required(root, prop, &mut inner, depth + 1);
        if !inner.is_empty() {
            nested.insert(key.clone(), Value::Object(inner));
        }
    }
    if !nested.is_empty() {
        out.insert("properties".into(), Value::Object(nested));
    }
}

/// Remove every `required` keyword (of the root and of every definition).
fn strip_required(v: &mut Value) {
    match v {
        Value::Object(map) => {
            if map.get("required").is_some_and(Value::is_array) {
                map.remove("required");
            }
            for (key, child) in map.iter_mut() {
                // `properties` may hold a key named `required`: only its value is a schema.
                if key == "properties" {
                    if let Value::Object(props) = child {
                        props.values_mut().for_each(strip_required);
                    }
                } else {
                    strip_required(child);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(strip_required),
        _ => {}
    }
}

/// Remove `null` from `type` lists and `anyOf` alternatives, collapsing what is left.
fn strip_null(v: &mut Value) {
    match v {
        Value::Object(map) => {
            if let Some(Value::Array(types)) = map.get_mut("type") {
                types.retain(|t| t != "null");
                if types.len() == 1 {
                    let only = types.remove(0);
                    map.insert("type".into(), only);
                }
            }
            if let Some(Value::Array(alts)) = map.get_mut("anyOf") {
                alts.retain(|a| a.get("type").and_then(Value::as_str) != Some("null"));
                if alts.len() == 1 {
                    let only = alts.remove(0);
                    map.remove("anyOf");
                    if let Value::Object(inner) = only {
                        for (k, val) in inner {
                            map.entry(k).or_insert(val);
                        }
                    }
                }
            }
            if map.get("default") == Some(&Value::Null) {
                map.remove("default");
            }
            for child in map.values_mut() {
                strip_null(child);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(strip_null),
        _ => {}
    }
}

/// Follow a `$ref` to `#/definitions/...` (or `#/$defs/...`) in `root`, or the single schema
/// of an `allOf` wrapper; other schemas are returned as they are.
pub(crate) fn deref<'a>(root: &'a Value, schema: &'a Value) -> &'a Value {
    let mut s = schema;
    for _ in 0..16 {
        if let Some(r) = s.get("$ref").and_then(Value::as_str) {
            let target = ["#/definitions/", "#/$defs/"].iter().find_map(|prefix| {
                let name = r.strip_prefix(prefix)?;
                root.get(&prefix[2..prefix.len() - 1])?.get(name)
            });
            match target {
                Some(t) => s = t,
                None => break,
            }
        } else if let Some(Value::Array(all)) = s.get("allOf").filter(|_| s.get("type").is_none()) {
            match all.as_slice() {
                [only] => s = only,
                _ => break,
            }
        } else {
            break;
        }
    }
    s
}

/// A keyword of `schema`, looking through `$ref` when the schema itself does not have it.
pub fn keyword<'a>(root: &'a Value, schema: &'a Value, key: &str) -> Option<&'a Value> {
    schema.get(key).or_else(|| deref(root, schema).get(key))
}

/// The allowed values of an enum-like schema (`enum`, or `oneOf`/`anyOf` of `const`s).
pub(crate) fn choices(root: &Value, schema: &Value) -> Option<Vec<Value>> {
    let s = deref(root, schema);
    if let Some(Value::Array(values)) = s.get("enum") {
        return Some(values.clone());
    }
    for k in ["oneOf", "anyOf"] {
        if let Some(Value::Array(alts)) = s.get(k) {
            let mut out = Vec::new();
            for a in alts {
                let a = deref(root, a);
                if let Some(c) = a.get("const") {
                    out.push(c.clone());
                } else if let Some(Value::Array(values)) = a.get("enum") {
                    out.extend(values.iter().cloned());
                } else {
                    return None;
                }
            }
            return Some(out);
        }
    }
    None
}

/// A short type for the docs: `integer >= 1`, `"a" | "b"`, `list of string`, `table`.
pub(crate) fn type_summary(root: &Value, schema: &Value) -> String {
    if let Some(values) = choices(root, schema) {
        return values.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(" \\| ");
    }
    let s = deref(root, schema);
    let ty = keyword(root, schema, "type").and_then(Value::as_str).unwrap_or("any");
    let mut out = match ty {
        "array" => {
            let item = s.get("items").map(|i| type_summary(root, i)).unwrap_or_else(|| "any".into());
            format!("list of {item}")
        }
        "object" if s.get("properties").is_none() => {
            let item = s
                .get("additionalProperties")
                .filter(|v| v.is_object())
                .map(|i| type_summary(root, i))
                .unwrap_or_else(|| "any".into());
            format!("table of {item}")
        }
        "object" => "table".into(),
        other => other.to_string(),
    };
    let num = |k: &str| keyword(root, schema, k).and_then(Value::as_f64);
    let fmt = |x: f64| if x.fract() == 0.0 && x.abs() < 1e15 { format!("{}", x as i64) } else { format!("{x}") };
    let is_unsigned = keyword(root, schema, "format").and_then(Value::as_str).is_some_and(|f| f.starts_with("uint"));
    if let Some(m) = num("minimum").filter(|m| !(is_unsigned && *m == 0.0)) {
        out += &format!(" ≥ {}", fmt(m));
    }
    if let Some(m) = num("exclusiveMinimum") {
        out += &format!(" > {}", fmt(m));
    }
    if let Some(m) = num("maximum") {
        out += &format!(" ≤ {}", fmt(m));
    }
    if let Some(m) = num("exclusiveMaximum") {
        out += &format!(" < {}", fmt(m));
    }
    if let Some(m) = num("multipleOf") {
        out += &format!(", multiple of {}", fmt(m));
    }
    if let Some(m) = num("minItems").filter(|m| *m > 0.0) {
        out += &format!(", at least {}", fmt(m));
    }
    out
}

/// The properties of a table schema, in the schema's (alphabetical) order.
pub fn properties<'a>(root: &'a Value, schema: &'a Value) -> Vec<(&'a String, &'a Value)> {
    match deref(root, schema).get("properties") {
        Some(Value::Object(props)) => props.iter().collect(),
        _ => Vec::new(),
    }
}

/// The key tables of `docs/pipeline.md`: one per stage, each key with its type, default,
/// meaning and the reference flag it stands for.
pub fn key_tables_markdown(root: &Value) -> String {
    let mut out = String::new();
    let stages = [
        "model", "dataset", "preprocess", "adapter", "optimizer", "train", "checkpoints", "validation", "output",
        "logging", "distributed",
    ];
    let top: Map<String, Value> = root.get("properties").and_then(Value::as_object).cloned().unwrap_or_default();
    let required_top: Vec<&str> = root
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    out += "### Top level\n\n| key | type | default | meaning | reference flag |\n|---|---|---|---|---|\n";
    if let Some(ext) = top.get("extends") {
        out += &row(root, "extends", ext, false);
    }
    for stage in stages {
        let Some(schema) = top.get(stage) else { continue };
        let desc = description(root, schema);
        let req = if required_top.contains(&stage) { " (required)" } else { "" };
        out += &format!("\n### [{stage}]{req}\n\n{desc}\n\n| key | type | default | meaning | reference flag |\n|---|---|---|---|---|\n");
        let table = deref(root, schema);
        let required: Vec<&str> = table
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        for (key, prop) in properties(root, schema) {
            out += &row(root, key, prop, required.contains(&key.as_str()));
        }
    }
    out
}

fn description(root: &Value, schema: &Value) -> String {
    keyword(root, schema, "description")
        .and_then(Value::as_str)
        .unwrap_or("")
        .replace('\n', " ")
}

fn row(root: &Value, key: &str, prop: &Value, required: bool) -> String {
    let ty = type_summary(root, prop);
    let default = match prop.get("default") {
        Some(v) => format!("`{}`", toml_literal(v)),
        None if required => "required".into(),
        None => "unset".into(),
    };
    let meaning = description(root, prop).replace('|', "\\|");
    let flag = prop.get("x-reference").and_then(Value::as_str).map(|f| format!("`{f}`")).unwrap_or_else(|| "—".into());
    format!("| `{key}` | {ty} | {default} | {meaning} | {flag} |\n")
}

/// A JSON value written as TOML would write it (for defaults in the docs).
pub(crate) fn toml_literal(v: &Value) -> String {
    match v {
        Value::String(s) => toml::Value::String(s.clone()).to_string(),
        Value::Array(items) => format!("[{}]", items.iter().map(toml_literal).collect::<Vec<_>>().join(", ")),
        Value::Object(m) if m.is_empty() => "{}".into(),
        other => other.to_string(),
    }
}

/// The name a choice has in pipeline files (`"cosine"` for `LrScheduler::Cosine`).
pub fn choice_name<T: serde::Serialize>(choice: &T) -> String {
    match serde_json::to_value(choice) {
        Ok(Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => String::new(),
    }
}
