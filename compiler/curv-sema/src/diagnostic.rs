//! Diagnostics: a stable code, a message, labelled spans, notes and an optional help line.

use curv_grammar::{Span, SyntaxError};

/// Which source a span points into: the user's file or a standard-library module.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SourceId {
    User,
    Std(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Severity {
    Error,
    Warning,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    pub source: SourceId,
    pub span: Span,
    pub message: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    pub code: &'static str,
    pub severity: Severity,
    pub message: String,
    /// The first label is the primary one: the exact span of the problem.
    pub labels: Vec<Label>,
    pub notes: Vec<String>,
    pub help: Option<String>,
}

impl Diagnostic {
    pub fn error(code: &'static str, span: Span, message: impl Into<String>, label: impl Into<String>) -> Diagnostic {
        Diagnostic {
            code,
            severity: Severity::Error,
            message: message.into(),
            labels: vec![Label { source: SourceId::User, span, message: label.into() }],
            notes: Vec::new(),
            help: None,
        }
    }

    pub fn warning(code: &'static str, span: Span, message: impl Into<String>, label: impl Into<String>) -> Diagnostic {
        Diagnostic { severity: Severity::Warning, ..Diagnostic::error(code, span, message, label) }
    }

    pub fn with_help(mut self, help: impl Into<String>) -> Diagnostic {
        self.help = Some(help.into());
        self
    }

    pub fn with_note(mut self, note: impl Into<String>) -> Diagnostic {
        self.notes.push(note.into());
        self
    }

    pub fn with_label(mut self, span: Span, message: impl Into<String>) -> Diagnostic {
        self.labels.push(Label { source: SourceId::User, span, message: message.into() });
        self
    }

    /// Moves every label into `source` (used for diagnostics inside standard-library modules).
    pub fn in_source(mut self, source: SourceId) -> Diagnostic {
        for label in &mut self.labels {
            label.source = source;
        }
        self
    }

    pub fn primary_span(&self) -> Span {
        self.labels.first().map(|label| label.span).unwrap_or_default()
    }

    pub fn is_error(&self) -> bool {
        self.severity == Severity::Error
    }
}

impl From<SyntaxError> for Diagnostic {
    fn from(error: SyntaxError) -> Diagnostic {
        let mut diagnostic = Diagnostic::error(error.code, error.span, error.message, error.label);
        if let Some((span, label)) = error.secondary {
            diagnostic = diagnostic.with_label(span, label);
        }
        match error.help {
            Some(help) => diagnostic.with_help(help),
            None => diagnostic,
        }
    }
}

/// Every diagnostic code with a one-line summary; `docs/errors.md` documents each in full.
pub const CODES: &[(&str, &str)] = &[
    ("E0001", "unexpected token"),
    ("E0002", "unexpected end of file"),
    ("E0003", "invalid character"),
    ("E0004", "unterminated string"),
    ("E0005", "number out of range"),
    ("E0006", "nested too deeply"),
    ("E0100", "undefined name"),
    ("E0101", "duplicate definition"),
    ("E0102", "unknown function"),
    ("E0103", "unknown option"),
    ("E0104", "wrong number of arguments"),
    ("E0105", "unknown field"),
    ("E0106", "unknown data source"),
    ("E0107", "unknown initialiser"),
    ("E0108", "unknown structure or statistic"),
    ("E0109", "unknown module"),
    ("E0110", "cyclic definition"),
    ("E0111", "misplaced item"),
    ("E0112", "invalid value"),
    ("E0200", "matrix product shape mismatch"),
    ("E0201", "shapes do not broadcast"),
    ("E0202", "return shape mismatch"),
    ("E0203", "dtype mismatch"),
    ("E0204", "wrong rank"),
    ("E0205", "inconsistent dimension binding"),
    ("E0206", "invalid index or axis"),
    ("E0207", "unknown type"),
    ("E0300", "rule matches no parameter"),
    ("E0301", "parameter matched by no rule"),
    ("E0302", "structure needs a matrix parameter"),
    ("E0303", "rank larger than the smallest dimension"),
    ("E0304", "value must be positive"),
    ("E0305", "value out of range"),
    ("E0306", "missing required item or option"),
    ("E0307", "unknown metric"),
    ("E0308", "optimizer state does not fit in memory"),
    ("E0309", "structure options that do not go together"),
    ("E0310", "modifier not executable on its structure"),
    ("E0311", "unsupported quantisation width"),
    ("E0312", "statistic needs another loss"),
    ("E0313", "parameter not usable by K-FAC statistics"),
    ("E0400", "data file not found"),
    ("E0401", "data file unreadable or corrupt"),
    ("E0402", "invalid data declaration"),
    ("E0403", "label or embedding id out of range"),
    ("W0001", "unused parameter"),
    ("W0002", "unused let"),
    ("W0003", "unused definition"),
];
