//! Rendering diagnostics with ariadne (byte indices; colour only for terminals).

use crate::Compilation;
use ariadne::{Config, IndexType, Label, Report, ReportKind};
use curv_sema::{Severity, SourceId};

fn source_name(compilation: &Compilation, source: SourceId) -> String {
    match source {
        SourceId::User => compilation.source.display_name.clone(),
        SourceId::Std(index) => curv_sema::std_lib::display_name(index),
    }
}

fn source_text(compilation: &Compilation, source: SourceId) -> &str {
    match source {
        SourceId::User => &compilation.source.text,
        SourceId::Std(index) => curv_sema::std_lib::MODULES[index].1,
    }
}

/// The byte offset at which each line of a source starts, to find a label's line by binary
/// search (a count of the newlines before it for every label made rendering quadratic).
struct LineStarts(Vec<(SourceId, Vec<usize>)>);

impl LineStarts {
    fn new(compilation: &Compilation, sources: &[SourceId]) -> LineStarts {
        LineStarts(
            sources
                .iter()
                .map(|source| {
                    let text = source_text(compilation, *source);
                    let starts =
                        std::iter::once(0).chain(text.match_indices('\n').map(|(index, _)| index + 1)).collect();
                    (*source, starts)
                })
                .collect(),
        )
    }

    /// The zero-based line of byte `offset`.
    fn line(&self, source: SourceId, offset: usize) -> usize {
        self.0
            .iter()
            .find(|(id, _)| *id == source)
            .map_or(0, |(_, starts)| starts.partition_point(|start| *start <= offset).saturating_sub(1))
    }
}

/// Renders every diagnostic of a compilation, followed by a one-line count.
pub fn render_diagnostics(compilation: &Compilation, color: bool) -> String {
    let diagnostics = compilation.diagnostics();
    let mut out = Vec::new();
    let mut sources_used: Vec<SourceId> = vec![SourceId::User];
    for diagnostic in &diagnostics {
        for label in &diagnostic.labels {
            if !sources_used.contains(&label.source) {
                sources_used.push(label.source);
            }
        }
    }
    let mut cache = ariadne::sources(
        sources_used
            .iter()
            .map(|source| (source_name(compilation, *source), source_text(compilation, *source).to_string())),
    );
    let line_starts = LineStarts::new(compilation, &sources_used);
    for diagnostic in &diagnostics {
        let kind = match diagnostic.severity {
            Severity::Error => ReportKind::Error,
            Severity::Warning => ReportKind::Warning,
        };
        let primary = diagnostic.labels.first();
        let primary_source = primary.map_or(SourceId::User, |label| label.source);
        let primary_span =
            primary.map_or(0..0, |label| clamp(compilation, label.source, label.span.start..label.span.end));
        let mut report = Report::build(kind, (source_name(compilation, primary_source), primary_span))
            .with_config(Config::default().with_index_type(IndexType::Byte).with_color(color))
            .with_code(diagnostic.code)
            .with_message(&diagnostic.message);
        for (index, label) in diagnostic.labels.iter().enumerate() {
            let range = clamp(compilation, label.source, label.span.start..label.span.end);
            // ariadne starts a new snippet whenever a label's line comes before the previous
            // label's, so labels are ordered by source (the primary label's first), then by line,
            // then by their position in the list (primary first) within a line.
            let line = line_starts.line(label.source, range.start);
            let source_rank = usize::from(label.source != primary_source);
            let order =
                source_rank.saturating_mul(1 << 30).saturating_add(line.saturating_mul(64)).saturating_add(index);
            let order = i32::try_from(order).unwrap_or(i32::MAX);
            let mut ariadne_label = Label::new((source_name(compilation, label.source), range))
                .with_message(&label.message)
                .with_order(order);
            if index == 0 && color {
                ariadne_label = ariadne_label.with_color(ariadne::Color::Red);
            }
            report = report.with_label(ariadne_label);
        }
        for note in &diagnostic.notes {
            report = report.with_note(note);
        }
        if let Some(help) = &diagnostic.help {
            report = report.with_help(help);
        }
        let _ = report.finish().write(&mut cache, &mut out);
    }
    let errors = diagnostics.iter().filter(|diagnostic| diagnostic.is_error()).count();
    let warnings = diagnostics.len() - errors;
    let mut text = String::from_utf8_lossy(&out).into_owned();
    if !diagnostics.is_empty() {
        text.push_str(&format!(
            "{}: {} error{}, {} warning{}\n",
            compilation.source.display_name,
            errors,
            plural(errors),
            warnings,
            plural(warnings)
        ));
    }
    text
}

fn plural(count: usize) -> &'static str {
    if count == 1 {
        ""
    } else {
        "s"
    }
}

/// Keeps a span inside its source (a label at the very end of the file stays renderable).
fn clamp(compilation: &Compilation, source: SourceId, range: std::ops::Range<usize>) -> std::ops::Range<usize> {
    let length = source_text(compilation, source).len();
    let start = range.start.min(length);
    let end = range.end.min(length).max(start);
    start..end
}
