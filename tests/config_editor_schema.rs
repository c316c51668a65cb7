//! The published schema (`schemas/pipeline.schema.json`, what Taplo / Even Better TOML check one
//! file at a time with) accepts every shipped pipeline, also those whose required tables come
//! from an `extends` base, and stays as strict as the validator's schema for files without one.

use std::path::{Path, PathBuf};

use lora::config::validate::schema_messages;
use lora::config::{editor_schema, pipeline_schema};

fn root() -> PathBuf {
    crate::support::repo_root()
}

fn parse(path: &Path) -> Option<toml::Table> {
    let text = std::fs::read_to_string(path).ok()?;
    text.parse::<toml::Table>().ok()
}

fn toml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn the_published_schema_is_the_editor_schema() {
    let checked_in: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("schemas/pipeline.schema.json")).unwrap()).unwrap();
    assert_eq!(checked_in, editor_schema());
    assert!(checked_in.get("required").is_none(), "no top-level `required`: a file with `extends` may leave tables to its base");
    assert_eq!(checked_in["if"], serde_json::json!({"required": ["extends"]}));
}

#[test]
fn every_shipped_pipeline_passes_the_published_schema_one_file_at_a_time() {
    let schema = editor_schema();
    let mut files = toml_files(&root().join("pipelines"));
    // Files under tests/ that are valid on their own (their error is in the merge).
    files.extend(["tests/broken/error-in-base.toml", "tests/broken/extends-base-lacks-dataset.toml"].map(|f| root().join(f)));
    assert!(files.iter().any(|f| f.ends_with("tiny-sd2.toml")), "the corpus has a file with `extends`");
    for file in &files {
        let doc = parse(file).unwrap_or_else(|| panic!("{} parses", file.display()));
        let messages = schema_messages(&schema, &doc);
        assert!(messages.is_empty(), "{}: {messages:?}", file.display());
    }
    // The strict schema (what `lora validate` checks the merged pipeline with) rejects the
    // extending file alone: the editor schema is what lets it through.
    let sd2 = parse(&root().join("pipelines/tiny-sd2.toml")).unwrap();
    assert_eq!(schema_messages(&pipeline_schema(), &sd2), ["missing table [dataset]"]);
}

#[test]
fn without_extends_the_published_schema_is_as_strict_as_the_validators() {
    let (editor, strict) = (editor_schema(), pipeline_schema());
    let mut compared = 0;
    let mut required_seen = 0;
    for file in toml_files(&root().join("tests/broken")) {
        let Some(doc) = parse(&file) else { continue };
        if doc.contains_key("extends") {
            continue;
        }
        let (mut a, mut b) = (schema_messages(&editor, &doc), schema_messages(&strict, &doc));
        a.sort();
        b.sort();
        assert_eq!(a, b, "{}", file.display());
        compared += 1;
        required_seen += b.iter().filter(|m| m.starts_with("missing")).count();
    }
    assert!(compared >= 25, "only {compared} broken files compared");
    assert!(required_seen >= 2, "the corpus exercises missing tables and keys ({required_seen})");
    // A nested required key (`dataset.kind`) is kept too.
    let doc: toml::Table = "[model]\npath = \"m\"\n[dataset]\npath = \"d\"\n".parse().unwrap();
    assert_eq!(schema_messages(&editor, &doc), ["missing key `kind` in [dataset]"]);
    let with_base: toml::Table = "extends = \"base.toml\"\n[dataset]\npath = \"d\"\n".parse().unwrap();
    assert!(schema_messages(&editor, &with_base).is_empty());
}
