//! An image folder with `metadata.jsonl` or `metadata.csv` (diffusers' `--train_data_dir`, the
//! datasets `imagefolder` builder): each line `{"file_name": "0001.png", "<caption column>": ...}`
//! or each CSV row under a header naming `file_name` and the caption column; file names are
//! relative to the metadata file's folder and may not leave it.

use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context};

use super::{Caption, Dataset, Example, ImageData, SourceOptions};

/// The metadata file names read, as the datasets `imagefolder` builder reads them.
use crate::layout::METADATA_NAMES;

/// The metadata file of `dir` itself, if any; both kinds in one folder is an error (as in the
/// datasets library: which one holds the captions would be a guess).
fn metadata_in(dir: &Path) -> anyhow::Result<Option<PathBuf>> {
    let found: Vec<PathBuf> = METADATA_NAMES.iter().map(|n| dir.join(n)).filter(|p| p.is_file()).collect();
    match found.len() {
        0 => Ok(None),
        1 => Ok(found.into_iter().next()),
        _ => bail!("{}: both metadata.jsonl and metadata.csv; keep one", dir.display()),
    }
}

/// The metadata files of `dir`: its own, else those in `train/`, else those in any subfolder,
/// sorted.
fn metadata_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        bail!("image folder {} does not exist", dir.display());
    }
    if let Some(own) = metadata_in(dir)? {
        return Ok(vec![own]);
    }
    if let Some(train) = metadata_in(&dir.join("train"))? {
        return Ok(vec![train]);
    }
    let mut found = Vec::new();
    for path in super::walk_files(dir)? {
        let is_metadata = path.file_name().and_then(|n| n.to_str()).is_some_and(|n| METADATA_NAMES.contains(&n));
        if is_metadata {
            // Refuses a folder holding both kinds.
            metadata_in(path.parent().unwrap_or(dir))?;
            found.push(path);
        }
    }
    if found.is_empty() {
        bail!(
            "{}: no metadata.jsonl or metadata.csv (expected lines {{\"file_name\": ..., \"text\": ...}}, or a CSV with a header row naming file_name and the caption column)",
            dir.display()
        );
    }
    Ok(found)
}

/// One metadata record: its line (for messages) and its fields.
struct Record {
    line: usize,
    fields: serde_json::Map<String, serde_json::Value>,
}

/// Read every metadata record; the image files must exist inside the dataset folder.
pub fn load(dir: &Path, opts: &SourceOptions) -> anyhow::Result<Dataset> {
    let mut examples = Vec::new();
    for meta in metadata_files(dir)? {
        let base = meta.parent().unwrap_or(Path::new("."));
        let text = std::fs::read_to_string(&meta).with_context(|| format!("reading {}", meta.display()))?;
        let records = if meta.extension().is_some_and(|e| e == "csv") { csv_records(&text, &meta)? } else { jsonl_records(&text, &meta)? };
        for Record { line, fields } in records {
            let at = || format!("{} line {line}", meta.display());
            let keys = || fields.keys().map(String::as_str).collect::<Vec<_>>().join(", ");
            let file_name = fields
                .get("file_name")
                .with_context(|| format!("{}: no `file_name`; the keys are: {}", at(), keys()))?
                .as_str()
                .with_context(|| format!("{}: `file_name` is not a string", at()))?;
            let caption_value = fields.get(&opts.caption_column).with_context(|| {
                format!("{}: no caption column `{}`; the keys are: {}", at(), opts.caption_column, keys())
            })?;
            let caption = match caption_value {
                serde_json::Value::String(s) => Caption::One(s.clone()),
                serde_json::Value::Array(items) => {
                    let choices: Option<Vec<String>> = items.iter().map(|v| v.as_str().map(str::to_string)).collect();
                    match choices {
                        Some(c) if !c.is_empty() => Caption::Choices(c),
                        _ => bail!("{}: `{}` must be a string or a non-empty list of strings", at(), opts.caption_column),
                    }
                }
                _ => bail!("{}: `{}` must be a string or a list of strings", at(), opts.caption_column),
            };
            if !stays_inside(file_name) {
                bail!(
                    "{}: `file_name` \"{file_name}\" points outside the dataset folder; file names are relative to the folder of {} \
                     and may not start with `/` or use `..`",
                    at(),
                    meta.file_name().unwrap_or_default().to_string_lossy()
                );
            }
            let path = base.join(file_name);
            if !path.is_file() {
                bail!("{}: image file {} does not exist", at(), path.display());
            }
            examples.push(Example { image: ImageData::File(path.clone()), caption, origin: path.display().to_string(), group: 0 });
        }
    }
    Ok(Dataset { examples, description: dir.display().to_string(), groups: Vec::new() })
}

/// Whether a `file_name` names a file below the metadata file's folder: relative, no `..`, no
/// root or drive (the datasets library only finds files inside the folder).
pub(crate) fn stays_inside(file_name: &str) -> bool {
    // Windows separators and drives too: a metadata file written there means the same.
    let name = file_name.replace('\\', "/");
    let bytes = name.as_bytes();
    let drive = bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':';
    !name.is_empty()
        && !drive
        && Path::new(&name).components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir))
}

fn jsonl_records(text: &str, meta: &Path) -> anyhow::Result<Vec<Record>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line_no = n + 1;
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{} line {line_no}", meta.display());
        let value: serde_json::Value = serde_json::from_str(line).with_context(|| format!("{}: not JSON", at()))?;
        let serde_json::Value::Object(fields) = value else { bail!("{}: not a JSON object", at()) };
        out.push(Record { line: line_no, fields });
    }
    Ok(out)
}

/// The rows of a CSV file with a header row (RFC 4180: fields in double quotes may hold commas,
/// line breaks and doubled quotes; CRLF or LF line ends; a UTF-8 byte-order mark is skipped).
/// Every value is a string, as pandas reads a caption column.
fn csv_records(text: &str, meta: &Path) -> anyhow::Result<Vec<Record>> {
    let rows = parse_csv(text.strip_prefix('\u{feff}').unwrap_or(text)).map_err(|(line, why)| anyhow::anyhow!("{} line {line}: {why}", meta.display()))?;
    let mut rows = rows.into_iter();
    let Some((_, header)) = rows.next() else { return Ok(Vec::new()) };
    for (i, name) in header.iter().enumerate() {
        if header[..i].contains(name) {
            bail!("{} line 1: the header names the column `{name}` twice", meta.display());
        }
    }
    let mut out = Vec::new();
    for (line, row) in rows {
        if row.len() == 1 && row[0].is_empty() {
            continue;
        }
        if row.len() != header.len() {
            bail!("{} line {line}: {} field(s), but the header has {} columns ({})", meta.display(), row.len(), header.len(), header.join(", "));
        }
        let fields = header.iter().cloned().zip(row.into_iter().map(serde_json::Value::String)).collect();
        out.push(Record { line, fields });
    }
    Ok(out)
}

/// Split CSV text into rows of fields, each row with the line it starts on. Errors carry the line.
fn parse_csv(text: &str) -> Result<Vec<(usize, Vec<String>)>, (usize, String)> {
    let mut rows = Vec::new();
    let mut row = Vec::new();
    let mut field = String::new();
    let mut line = 1;
    let mut row_line = 1;
    let mut chars = text.chars().peekable();
    // At the start of a field (a quote opens a quoted field only there).
    let mut field_start = true;
    while let Some(c) = chars.next() {
        match c {
            '"' if field_start => {
                let open_line = line;
                loop {
                    match chars.next() {
                        Some('"') if chars.peek() == Some(&'"') => {
                            chars.next();
                            field.push('"');
                        }
                        Some('"') => break,
                        Some(c) => {
                            if c == '\n' {
                                line += 1;
                            }
                            field.push(c);
                        }
                        None => return Err((open_line, "a quoted field is not closed".into())),
                    }
                }
                match chars.peek() {
                    None | Some(',') | Some('\n') | Some('\r') => {}
                    Some(c) => return Err((line, format!("`{c}` after a closing quote; a quote inside a quoted field is written \"\""))),
                }
                field_start = false;
            }
            ',' => {
                row.push(std::mem::take(&mut field));
                field_start = true;
            }
            '\r' if chars.peek() == Some(&'\n') => {}
            '\n' => {
                row.push(std::mem::take(&mut field));
                rows.push((row_line, std::mem::take(&mut row)));
                line += 1;
                row_line = line;
                field_start = true;
            }
            c => {
                field.push(c);
                field_start = false;
            }
        }
    }
    if !field.is_empty() || !row.is_empty() || !field_start {
        row.push(field);
        rows.push((row_line, row));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(text: &str) -> Vec<(usize, Vec<String>)> {
        parse_csv(text).unwrap()
    }

    #[test]
    fn csv_quotes_commas_newlines_and_crlf() {
        let got = rows("file_name,text\r\na.png,\"red, round\"\r\nb.png,\"two\nlines\"\n\"c \"\"q\"\".png\",\n");
        let want: Vec<(usize, Vec<String>)> = vec![
            (1, vec!["file_name".into(), "text".into()]),
            (2, vec!["a.png".into(), "red, round".into()]),
            (3, vec!["b.png".into(), "two\nlines".into()]),
            (5, vec!["c \"q\".png".into(), String::new()]),
        ];
        assert_eq!(got, want);
        // No final line break.
        assert_eq!(rows("a,b"), vec![(1, vec!["a".to_string(), "b".to_string()])]);
        assert_eq!(parse_csv("a,\"b\n").unwrap_err().0, 1);
        assert!(parse_csv("a,\"b\"c\n").unwrap_err().1.contains("after a closing quote"));
    }

    #[test]
    fn file_names_must_stay_inside_the_folder() {
        for ok in ["a.png", "train/a.png", "./a.png", "a..b.png"] {
            assert!(stays_inside(ok), "{ok}");
        }
        for bad in ["../a.png", "../../outside.png", "/etc/passwd", "train/../../a.png", "", "..\\a.png", "C:/x.png", "train/../a.png"] {
            assert!(!stays_inside(bad), "{bad}");
        }
    }
}
