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

/// A line longer than this many bytes is shown around its labels only.
const LONG_LINE: usize = 160;
/// The bytes of a long line shown on each side of a label's start and end.
const CONTEXT: usize = 40;
/// What stands for the parts of a long line that are not shown.
const ELISION: &str = " … ";

/// A source as diagnostics show it: every line longer than [`LONG_LINE`] cut down to windows
/// around the labels in it, joined by [`ELISION`]. A line of a megabyte (a generated
/// expression) was printed whole in every diagnostic that pointed into it. Line numbers do not
/// change; offsets are mapped through `segments`.
struct Shown {
    text: String,
    /// The kept byte ranges of the source, in order: `(start, end, start in text)`.
    segments: Vec<(usize, usize, usize)>,
    /// Whether any line was cut.
    cut: bool,
}

impl Shown {
    fn new(text: &str, labels: Vec<(usize, usize)>) -> Shown {
        if text.len() <= LONG_LINE || !text.split('\n').any(|line| line.len() > LONG_LINE) {
            return Shown { text: text.to_string(), segments: vec![(0, text.len(), 0)], cut: false };
        }
        // The labels' starts and ends, each sorted, so a line finds the points in it by binary
        // search (a label that spans many lines is not scanned again by each).
        let mut points: Vec<usize> = labels.iter().flat_map(|&(start, end)| [start, end]).collect();
        points.sort_unstable();
        let mut shown = String::with_capacity(text.len().min(1 << 20));
        let mut segments = Vec::new();
        let mut keep = |start: usize, end: usize, shown: &mut String| {
            segments.push((start, end, shown.len()));
            shown.push_str(&text[start..end]);
        };
        let mut line_start = 0;
        while line_start <= text.len() {
            let line_end = text[line_start..].find('\n').map_or(text.len(), |index| line_start + index);
            let next = line_end + 1;
            let line = line_start..line_end;
            if line.len() <= LONG_LINE {
                keep(line_start, next.min(text.len()), &mut shown);
                line_start = next;
                continue;
            }
            // Windows around each label's start and end that fall in this line, merged.
            let first = points.partition_point(|point| *point < line_start);
            let end = points.partition_point(|point| *point <= line_end);
            let mut windows: Vec<(usize, usize)> = points[first..end]
                .iter()
                .map(|&point| (point.saturating_sub(CONTEXT).max(line_start), (point + CONTEXT).min(line_end)))
                .collect();
            windows.dedup();
            if windows.is_empty() {
                windows.push((line_start, (line_start + CONTEXT).min(line_end)));
            }
            windows.sort_unstable();
            let mut merged: Vec<(usize, usize)> = Vec::new();
            for (start, end) in windows {
                let start = floor_boundary(text, start);
                let end = ceil_boundary(text, end);
                match merged.last_mut() {
                    Some(last) if start <= last.1 + ELISION.len() => last.1 = last.1.max(end),
                    _ => merged.push((start, end)),
                }
            }
            for (index, &(start, end)) in merged.iter().enumerate() {
                if index > 0 || start > line_start {
                    shown.push_str(ELISION);
                }
                keep(start, end, &mut shown);
            }
            if merged.last().is_some_and(|last| last.1 < line_end) {
                shown.push_str(ELISION);
            }
            if line_end < text.len() {
                keep(line_end, line_end + 1, &mut shown);
            }
            line_start = next;
        }
        Shown { text: shown, segments, cut: true }
    }

    /// Where byte `offset` of the source is in the shown text (in an elided stretch: the end
    /// of the kept text before it).
    fn map(&self, offset: usize) -> usize {
        let index = self.segments.partition_point(|(start, _, _)| *start <= offset).saturating_sub(1);
        match self.segments.get(index) {
            Some(&(start, end, shown)) => shown + offset.min(end).saturating_sub(start),
            None => offset.min(self.text.len()),
        }
    }
}

fn floor_boundary(text: &str, mut index: usize) -> usize {
    while !text.is_char_boundary(index) {
        index -= 1;
    }
    index
}

fn ceil_boundary(text: &str, mut index: usize) -> usize {
    while !text.is_char_boundary(index) {
        index += 1;
    }
    index
}

/// The one-based column ariadne shows for byte `offset` of `text` (characters from the line's
/// start).
fn column(text: &str, offset: usize) -> usize {
    let offset = floor_boundary(text, offset.min(text.len()));
    let line_start = text[..offset].rfind('\n').map_or(0, |index| index + 1);
    text[line_start..offset].chars().count() + 1
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
    let shown: Vec<Shown> = sources_used
        .iter()
        .map(|source| {
            let labels = diagnostics
                .iter()
                .flat_map(|diagnostic| &diagnostic.labels)
                .filter(|label| label.source == *source)
                .map(|label| {
                    let range = clamp(compilation, label.source, label.span.start..label.span.end);
                    (range.start, range.end)
                })
                .collect();
            Shown::new(source_text(compilation, *source), labels)
        })
        .collect();
    let shown_of = |source: SourceId| &shown[sources_used.iter().position(|used| *used == source).unwrap_or(0)];
    let mut cache = ariadne::sources(
        sources_used.iter().zip(&shown).map(|(source, shown)| (source_name(compilation, *source), shown.text.clone())),
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
        let primary_shown = shown_of(primary_source);
        // The header's column, as ariadne would give it for the whole line, and as it will.
        let columns = primary_shown.cut.then(|| {
            (
                column(source_text(compilation, primary_source), primary_span.start),
                column(&primary_shown.text, primary_shown.map(primary_span.start)),
                line_starts.line(primary_source, primary_span.start) + 1,
            )
        });
        let primary_span = primary_shown.map(primary_span.start)..primary_shown.map(primary_span.end);
        let mut report = Report::build(kind, (source_name(compilation, primary_source), primary_span))
            .with_config(Config::default().with_index_type(IndexType::Byte).with_color(color))
            .with_code(diagnostic.code)
            .with_message(&diagnostic.message);
        for (index, label) in diagnostic.labels.iter().enumerate() {
            let range = clamp(compilation, label.source, label.span.start..label.span.end);
            let label_shown = shown_of(label.source);
            let shown_range = label_shown.map(range.start)..label_shown.map(range.end);
            // ariadne starts a new snippet whenever a label's line comes before the previous
            // label's, so labels are ordered by source (the primary label's first), then by line,
            // then by their position in the list (primary first) within a line.
            let line = line_starts.line(label.source, range.start);
            let source_rank = usize::from(label.source != primary_source);
            let order =
                source_rank.saturating_mul(1 << 30).saturating_add(line.saturating_mul(64)).saturating_add(index);
            let order = i32::try_from(order).unwrap_or(i32::MAX);
            let mut ariadne_label = Label::new((source_name(compilation, label.source), shown_range))
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
        let mut written = Vec::new();
        let _ = report.finish().write(&mut cache, &mut written);
        let mut written = String::from_utf8_lossy(&written).into_owned();
        if let Some((real, shown, line)) = columns {
            // The header names the column in the whole line, not in the shortened one.
            let name = source_name(compilation, primary_source);
            written = written.replacen(&format!("{name}:{line}:{shown} "), &format!("{name}:{line}:{real} "), 1);
        }
        out.extend_from_slice(written.as_bytes());
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered(text: &str) -> String {
        let source = crate::SourceFile::in_memory("long.curv", text, std::path::Path::new("/nonexistent"));
        render_diagnostics(&crate::compile(source), false)
    }

    #[test]
    fn a_long_line_is_shown_around_its_label_with_the_column_of_the_whole_line() {
        // Two-byte characters after the label: a window's end falls inside one.
        let line = format!("    return x{} + undefined_name // {}", " + x".repeat(60), "é".repeat(200));
        let text = format!("model m(x: f32[B, 2]) -> f32[B, 2] {{\n{line}\n}}\n");
        let out = rendered(&text);
        let column = line.find("undefined_name").unwrap() + 1;
        assert!(out.contains(&format!("long.curv:2:{column} ]")), "{out}");
        assert!(out.contains("x + undefined_name + x") || out.contains("x + undefined_name //"), "{out}");
        assert!(out.contains(ELISION.trim()), "{out}");
        let longest = out.lines().map(|line| line.chars().count()).max().unwrap_or(0);
        assert!(longest < 2 * LONG_LINE, "a shown line of {longest} characters:\n{out}");
    }

    #[test]
    fn a_line_of_a_megabyte_is_not_printed_whole() {
        let line = format!("    return x{} + undefined_name", " + (x)".repeat(200_000));
        let text = format!("model m(x: f32[B, 2]) -> f32[B, 2] {{\n{line}\n}}\n");
        let out = rendered(&text);
        assert!(out.len() < 10_000, "{} bytes of diagnostics", out.len());
        assert!(out.contains("[E0"), "{out}");
    }

    #[test]
    fn offsets_map_into_the_shown_text() {
        let text = format!("short\n{}TARGET{}\nend\n", "a".repeat(300), "b".repeat(300));
        let start = text.find("TARGET").unwrap();
        let shown = Shown::new(&text, vec![(start, start + 6)]);
        assert!(shown.cut);
        let mapped = shown.map(start);
        assert_eq!(&shown.text[mapped..mapped + 6], "TARGET");
        assert_eq!(&shown.text[shown.map(0)..shown.map(5)], "short");
        let end = text.find("end").unwrap();
        assert_eq!(&shown.text[shown.map(end)..shown.map(end) + 3], "end");
        // Line numbers do not change.
        assert_eq!(shown.text.matches('\n').count(), text.matches('\n').count());
    }
}
