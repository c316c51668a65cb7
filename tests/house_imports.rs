//! The shape of the house (issue 15), read from the source: the `crate::`, `super::` and `self::`
//! paths of every file of `src/` (outside its `#[cfg(test)]` module) name the files it imports.
//! There is no cycle between files, and `config/` imports nothing but leaves (files that import
//! nothing of the crate), so a pipeline file is checked without anything that loads models.
//!
//! One kind of edge is not counted: a folder's front file (`x/mod.rs`, or `x.rs` beside a
//! folder `x/`) naming files inside its own folder. The front declares those modules and
//! dispatches to them or re-exports from them (`cli/mod.rs` runs each command's file); what
//! counts is that nothing below it, and nothing beside it, imports back in a circle.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    crate::support::repo_root().join("src")
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// The module path of a file: `src/runner/stages/mod.rs` -> `["runner", "stages"]`.
fn module_of(file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src()).unwrap();
    let mut parts: Vec<String> = rel.iter().map(|s| s.to_string_lossy().into_owned()).collect();
    let last = parts.pop().unwrap();
    let stem = last.trim_end_matches(".rs");
    if !matches!(stem, "mod" | "lib" | "main") {
        parts.push(stem.to_string());
    }
    parts
}

/// The file that holds module `path`, or its longest prefix that is a file.
fn file_of(path: &[String], files: &BTreeMap<Vec<String>, PathBuf>) -> Option<PathBuf> {
    (1..=path.len()).rev().find_map(|n| files.get(&path[..n]).cloned())
}

/// The code of `text` without comments, string literals and the `#[cfg(test)]` module.
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(i) => &text[..i],
        None => text,
    };
    let mut out = String::new();
    for line in text.lines() {
        let line = line.split("//").next().unwrap_or("");
        // Drop string literals (paths in messages are not imports).
        let mut in_str = false;
        let mut prev = ' ';
        for c in line.chars() {
            if c == '"' && prev != '\\' {
                in_str = !in_str;
            } else if !in_str {
                out.push(c);
            }
            prev = c;
        }
        out.push('\n');
    }
    out
}

/// Whether `rest` starts with a path into a child module of `me` (`loading::x` in `models/mod.rs`)
/// right after `use ` (the only place a relative path names a module file).
fn is_use_of_child(rest: &str, me: &[String], children: &BTreeSet<Vec<String>>) -> bool {
    let first: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
    if first.is_empty() || !rest[first.len()..].starts_with("::") {
        return false;
    }
    let mut p = me.to_vec();
    p.push(first);
    children.contains(&p)
}

/// Every module path `file` names through `crate::` or `super::` (a `use` list `{a, b::c}`
/// expanded one level).
fn imports(file: &Path, code: &str, children: &BTreeSet<Vec<String>>) -> Vec<Vec<String>> {
    let me = module_of(file);
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    let ident = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    let mut i = 0;
    while i < code.len() {
        let rest = &code[i..];
        let (base, skip): (Vec<String>, usize) = if rest.starts_with("crate::") && (i == 0 || !ident(bytes[i - 1])) {
            (Vec::new(), 7)
        } else if rest.starts_with("super::") && (i == 0 || !ident(bytes[i - 1])) {
            // `super` of `a/b.rs` (module a::b) and of `a/b/mod.rs` (also a::b) is `a`.
            let mut b = me.clone();
            let mut s = 0;
            while rest[s..].starts_with("super::") {
                b.pop();
                s += 7;
            }
            (b, s)
        } else if (rest.starts_with("self::") || is_use_of_child(rest, &me, children)) && (i == 0 || !ident(bytes[i - 1])) {
            // `self::x` and a `use x::...` of a child module `x` (2018 relative paths).
            (me.clone(), if rest.starts_with("self::") { 6 } else { 0 })
        } else {
            i += 1;
            continue;
        };
        let mut j = i + skip;
        let mut path = base.clone();
        loop {
            let start = j;
            while j < code.len() && ident(bytes[j]) {
                j += 1;
            }
            if j == start {
                break;
            }
            path.push(code[start..j].to_string());
            if code[j..].starts_with("::") {
                j += 2;
                if code[j..].starts_with('{') {
                    // One level of a use list: each item's first segment.
                    let end = code[j..].find('}').map_or(code.len(), |e| j + e);
                    for item in code[j + 1..end].split(',') {
                        let first: String = item.trim().chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                        if !first.is_empty() && first != "self" {
                            let mut p = path.clone();
                            p.push(first);
                            out.push(p);
                        }
                    }
                    path.clear();
                    j = end;
                    break;
                }
            } else {
                break;
            }
        }
        if !path.is_empty() {
            out.push(path);
        }
        i = j.max(i + 1);
    }
    out
}

fn graph() -> BTreeMap<PathBuf, BTreeSet<PathBuf>> {
    let mut all = Vec::new();
    rust_files(&src(), &mut all);
    let files: BTreeMap<Vec<String>, PathBuf> = all.iter().filter(|f| !f.ends_with("main.rs")).map(|f| (module_of(f), f.clone())).collect();
    let modules: BTreeSet<Vec<String>> = files.keys().cloned().collect();
    let mut g: BTreeMap<PathBuf, BTreeSet<PathBuf>> = BTreeMap::new();
    for f in all.iter().filter(|f| !f.ends_with("main.rs") && !f.ends_with("lib.rs")) {
        let code = code_of(&std::fs::read_to_string(f).unwrap());
        let mut to = BTreeSet::new();
        for path in imports(f, &code, &modules) {
            if let Some(target) = file_of(&path, &files) {
                // A parent module file (a folder's mod.rs) named only on the way to a child is
                // not an import of it; one named for an item it holds is.
                if target != *f && !target.ends_with("lib.rs") {
                    to.insert(target);
                }
            }
        }
        // A folder's front file naming a file inside its folder is not an import (module doc).
        let folder = if f.ends_with("mod.rs") { f.parent().map(Path::to_path_buf) } else { Some(f.with_extension("")) };
        to.retain(|t| !folder.as_ref().is_some_and(|d| d.is_dir() && t.starts_with(d)));
        g.insert(f.clone(), to);
    }
    g
}

fn rel(p: &Path) -> String {
    p.strip_prefix(src()).unwrap().display().to_string()
}

/// Every cycle's files, by Tarjan's strongly connected components.
fn cycles(g: &BTreeMap<PathBuf, BTreeSet<PathBuf>>) -> Vec<Vec<String>> {
    struct T<'a> {
        g: &'a BTreeMap<PathBuf, BTreeSet<PathBuf>>,
        index: BTreeMap<&'a PathBuf, usize>,
        low: BTreeMap<&'a PathBuf, usize>,
        stack: Vec<&'a PathBuf>,
        on: BTreeSet<&'a PathBuf>,
        n: usize,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(t: &mut T<'a>, v: &'a PathBuf) {
        t.index.insert(v, t.n);
        t.low.insert(v, t.n);
        t.n += 1;
        t.stack.push(v);
        t.on.insert(v);
        for w in t.g.get(v).into_iter().flatten() {
            let Some((w, _)) = t.g.get_key_value(w) else { continue };
            if !t.index.contains_key(w) {
                visit(t, w);
                let lw = t.low[w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if t.on.contains(w) {
                let iw = t.index[w];
                let lv = t.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if t.low[v] == t.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = t.stack.pop() {
                t.on.remove(w);
                comp.push(rel(w));
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                t.out.push(comp);
            }
        }
    }
    let mut t = T { g, index: BTreeMap::new(), low: BTreeMap::new(), stack: Vec::new(), on: BTreeSet::new(), n: 0, out: Vec::new() };
    for v in g.keys() {
        if !t.index.contains_key(v) {
            visit(&mut t, v);
        }
    }
    t.out
}

#[test]
fn no_import_cycles_between_files() {
    let g = graph();
    let found = cycles(&g);
    let shown: Vec<String> = found
        .iter()
        .map(|c| {
            let edges: Vec<String> = c
                .iter()
                .flat_map(|a| g[&src().join(a)].iter().filter(|b| c.contains(&rel(b))).map(move |b| format!("{a} -> {}", rel(b))))
                .collect();
            format!("{{{}}}: {}", c.join(", "), edges.join("; "))
        })
        .collect();
    assert!(found.is_empty(), "{} import cycle(s) between files of src/:\n{}", found.len(), shown.join("\n"));
}

#[test]
fn config_imports_only_leaves() {
    let g = graph();
    let mut bad = Vec::new();
    for (f, to) in &g {
        if !rel(f).starts_with("config") {
            continue;
        }
        for t in to {
            let leaf = g.get(t).is_some_and(BTreeSet::is_empty);
            if !leaf && !rel(t).starts_with("config") {
                bad.push(format!("{} -> {}", rel(f), rel(t)));
            }
        }
    }
    assert!(bad.is_empty(), "config/ imports from above it:\n{}", bad.join("\n"));
}

#[test]
fn the_reader_sees_imports() {
    // The checker itself: the paths of a known file are found.
    let f = src().join("runner/watch.rs");
    let code = code_of("use crate::a::{b, c::d};\nfn x() { super::lock::Lock::read(); let s = \"crate::not::this\"; }\n");
    let found = imports(&f, &code, &BTreeSet::new());
    assert!(found.contains(&vec!["a".into(), "b".into()]) && found.contains(&vec!["a".into(), "c".into()]), "{found:?}");
    assert!(found.contains(&vec!["runner".into(), "lock".into(), "Lock".into(), "read".into()]), "{found:?}");
    assert!(!found.iter().any(|p| p.contains(&"not".to_string())), "{found:?}");
}
