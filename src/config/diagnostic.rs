//! Diagnostics about pipeline files: where (file, line, column, key path), what, and how to fix
//! it; rendered like rustc (`FILE:LINE:COL: error: message`, the line, a caret) or as JSON.

use std::fmt::Write as _;
use std::ops::Range;

use serde::Serialize;

/// How bad a diagnostic is: errors make the pipeline invalid (exit 2), warnings do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Error,
    Warning,
}

impl Severity {
    fn label(self) -> &'static str {
        match self {
            Severity::Error => "error",
            Severity::Warning => "warning",
        }
    }
}

/// The source line a diagnostic points into, with the columns to underline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Snippet {
    /// The whole line, without its newline.
    pub text: String,
    /// First underlined column, 1-based, in characters.
    pub col: usize,
    /// Number of characters to underline (at least 1).
    pub width: usize,
}

/// One problem in a pipeline file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Diagnostic {
    /// The file (as the user named it) or `--set` for a command-line override.
    pub file: String,
    /// 1-based line.
    pub line: usize,
    /// 1-based column, in characters.
    #[serde(rename = "column")]
    pub col: usize,
    /// Dotted key path the problem is about (`train.learning_rate`), if any.
    pub key_path: Option<String>,
    pub severity: Severity,
    pub message: String,
    /// A hint on how to fix it.
    pub help: Option<String>,
    #[serde(skip)]
    pub(crate) snippet: Option<Snippet>,
}

impl Diagnostic {
    /// A diagnostic at `span` (byte offsets) of `source`.
    pub fn at(source: &Source, span: Range<usize>, severity: Severity, message: impl Into<String>) -> Self {
        let (line, col, snippet) = source.locate(span);
        Diagnostic {
            file: source.name.clone(),
            line,
            col,
            key_path: None,
            severity,
            message: message.into(),
            help: None,
            snippet,
        }
    }

    /// An error at `span` of `source`.
    pub fn error(source: &Source, span: Range<usize>, message: impl Into<String>) -> Self {
        Self::at(source, span, Severity::Error, message)
    }

    /// A warning at `span` of `source`.
    pub fn warning(source: &Source, span: Range<usize>, message: impl Into<String>) -> Self {
        Self::at(source, span, Severity::Warning, message)
    }

    /// An error about a whole file, shown at its first line with no snippet.
    pub(crate) fn file_error(file: &str, message: impl Into<String>) -> Self {
        Diagnostic {
            file: file.to_string(),
            line: 1,
            col: 1,
            key_path: None,
            severity: Severity::Error,
            message: message.into(),
            help: None,
            snippet: None,
        }
    }

    pub(crate) fn with_help(mut self, help: impl Into<String>) -> Self {
        self.help = Some(help.into());
        self
    }

    pub(crate) fn with_key(mut self, key_path: impl Into<String>) -> Self {
        self.key_path = Some(key_path.into());
        self
    }

    pub(crate) fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }

    /// The human form: `FILE:LINE:COL: error: message`, the line with a caret, then the help.
    pub fn render(&self) -> String {
        self.render_styled(false)
    }

    /// [`Diagnostic::render`], with the severity and caret in colour when `colour` is true (for
    /// a terminal).
    pub(crate) fn render_styled(&self, colour: bool) -> String {
        let (on, off) = match (colour, self.severity) {
            (false, _) => ("", ""),
            (true, Severity::Error) => ("\x1b[1;31m", "\x1b[0m"),
            (true, Severity::Warning) => ("\x1b[1;33m", "\x1b[0m"),
        };
        let mut out = String::new();
        let _ = writeln!(out, "{}:{}:{}: {on}{}{off}: {}", self.file, self.line, self.col, self.severity.label(), self.message);
        let gutter = self.line.to_string().len();
        if let Some(snippet) = &self.snippet {
            let pad = " ".repeat(gutter);
            let _ = writeln!(out, "{pad} |");
            let _ = writeln!(out, "{} | {}", self.line, snippet.text);
            let lead: String = snippet
                .text
                .chars()
                .take(snippet.col - 1)
                .map(|c| if c == '\t' { '\t' } else { ' ' })
                .collect();
            let _ = writeln!(out, "{pad} | {lead}{on}{}{off}", "^".repeat(snippet.width.max(1)));
        }
        if let Some(help) = &self.help {
            let _ = writeln!(out, "{} = help: {help}", " ".repeat(gutter));
        }
        out
    }
}

/// Every diagnostic found, in the order found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl Diagnostics {
    pub fn new() -> Self {
        Self(Vec::new())
    }
    pub fn push(&mut self, d: Diagnostic) {
        self.0.push(d);
    }
    pub fn extend(&mut self, other: Diagnostics) {
        self.0.extend(other.0);
    }
    pub fn has_errors(&self) -> bool {
        self.0.iter().any(Diagnostic::is_error)
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn iter(&self) -> impl Iterator<Item = &Diagnostic> {
        self.0.iter()
    }
    /// All diagnostics in the human form, each followed by a blank line.
    pub fn render(&self) -> String {
        self.render_styled(false)
    }
    /// [`Diagnostics::render`], in colour when `colour` is true.
    pub(crate) fn render_styled(&self, colour: bool) -> String {
        self.0.iter().map(|d| d.render_styled(colour) + "\n").collect()
    }
    /// A JSON list of `{file, line, column, key_path, severity, message, help}`.
    pub(crate) fn to_json(&self) -> String {
        serde_json::to_string_pretty(&self.0).unwrap_or_else(|_| "[]".into())
    }
}

impl std::fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.render())
    }
}

impl std::error::Error for Diagnostics {}

/// A text diagnostics point into: a pipeline file, or one `--set` override.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// The name shown in diagnostics.
    pub name: String,
    pub text: String,
    /// Added to line numbers: a `--set` override is shown as line N of `--set`.
    pub(crate) line_offset: usize,
}

impl Source {
    pub fn new(name: impl Into<String>, text: impl Into<String>) -> Self {
        Source { name: name.into(), text: text.into(), line_offset: 0 }
    }

    /// 1-based line and column of the span's start, and the snippet underlining it.
    pub(crate) fn locate(&self, span: Range<usize>) -> (usize, usize, Option<Snippet>) {
        let text = &self.text;
        let mut start = span.start.min(text.len());
        while !text.is_char_boundary(start) {
            start -= 1;
        }
        let line_start = text[..start].rfind('\n').map_or(0, |i| i + 1);
        let line_end = text[start..].find('\n').map_or(text.len(), |i| start + i);
        let line_no = text[..line_start].matches('\n').count() + 1 + self.line_offset;
        let line_text = text[line_start..line_end].trim_end_matches('\r');
        let col = text[line_start..start].chars().count() + 1;
        let mut end = span.end.clamp(start, line_end.max(start));
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let width = text[start..end].chars().count().max(1);
        let snippet = Snippet { text: line_text.to_string(), col, width };
        (line_no, col, Some(snippet))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_like_rustc_with_caret_under_the_span() {
        let src = Source::new("p.toml", "[train]\nlearning_rat = 1e-4\n");
        let d = Diagnostic::error(&src, 8..20, "unknown key").with_help("did you mean `learning_rate`?");
        assert_eq!((d.line, d.col), (2, 1));
        assert_eq!(
            d.render(),
            "p.toml:2:1: error: unknown key\n  |\n2 | learning_rat = 1e-4\n  | ^^^^^^^^^^^^\n  = help: did you mean `learning_rate`?\n"
        );
    }

    #[test]
    fn columns_count_characters_and_spans_stop_at_the_line_end() {
        let src = Source::new("p.toml", "a = \"é\" # x\nb = 1\n");
        // The span of `# x` starts after a two-byte character.
        let start = src.text.find('#').unwrap();
        let (line, col, snippet) = src.locate(start..src.text.len());
        assert_eq!((line, col), (1, 9));
        assert_eq!(snippet.unwrap().width, 3, "the caret stops at the end of the first line");
    }

    #[test]
    fn set_sources_number_lines_by_position() {
        let mut src = Source::new("--set", "train.seed=x");
        src.line_offset = 2;
        let d = Diagnostic::error(&src, 11..12, "bad");
        assert!(d.render().starts_with("--set:3:12: error: bad\n"), "{}", d.render());
    }

    #[test]
    fn json_has_the_documented_fields() {
        let src = Source::new("p.toml", "x = 1\n");
        let diags = Diagnostics(vec![Diagnostic::error(&src, 4..5, "m").with_key("x")]);
        let v: serde_json::Value = serde_json::from_str(&diags.to_json()).unwrap();
        assert_eq!(v[0]["file"], "p.toml");
        assert_eq!(v[0]["line"], 1);
        assert_eq!(v[0]["column"], 5);
        assert_eq!(v[0]["key_path"], "x");
        assert_eq!(v[0]["severity"], "error");
        assert_eq!(v[0]["message"], "m");
    }
}
