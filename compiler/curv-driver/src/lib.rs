//! `curv-driver` owns the compiler pipeline as a library: reading a source file, probing the data
//! files it names, running the stages (tokens, AST, IR), rendering diagnostics with ariadne, and the
//! `curv check` summary. The command-line tool and the tests call it; it never exits the process.

pub mod fuzzing;
mod probe;
pub use probe::FileProbe;
mod render;
pub mod run;
mod summary;

use curv_grammar::Parsed;
use curv_sema::{Analysis, Diagnostic};
use std::path::{Path, PathBuf};

pub use render::render_diagnostics;
pub use summary::check_summary;

/// A `.curv` file and its text.
#[derive(Debug, Clone)]
pub struct SourceFile {
    pub path: PathBuf,
    /// The path as shown in diagnostics (as the user wrote it).
    pub display_name: String,
    pub text: String,
}

impl SourceFile {
    /// Reads a source file. The error is a one-line message naming the path.
    pub fn read(path: &Path) -> Result<SourceFile, String> {
        let bytes = std::fs::read(path)
            .map_err(|error| format!("cannot read {}: {}", path.display(), describe_io_error(&error)))?;
        let text = String::from_utf8(bytes).map_err(|error| {
            format!(
                "{} is not UTF-8 text (invalid byte at offset {})",
                path.display(),
                error.utf8_error().valid_up_to()
            )
        })?;
        Ok(SourceFile { path: path.to_path_buf(), display_name: path.display().to_string(), text })
    }

    /// A source that exists only in memory; data paths resolve against `directory`.
    pub fn in_memory(display_name: &str, text: &str, directory: &Path) -> SourceFile {
        SourceFile {
            path: directory.join(display_name),
            display_name: display_name.to_string(),
            text: text.to_string(),
        }
    }

    /// The directory relative data paths resolve against.
    pub fn directory(&self) -> PathBuf {
        self.path.parent().map(Path::to_path_buf).unwrap_or_else(|| PathBuf::from("."))
    }
}

fn describe_io_error(error: &std::io::Error) -> String {
    match error.kind() {
        std::io::ErrorKind::NotFound => "no such file".to_string(),
        std::io::ErrorKind::PermissionDenied => "permission denied".to_string(),
        _ => error.to_string(),
    }
}

/// The front end's result for one file.
pub struct Compilation {
    pub source: SourceFile,
    pub parsed: Parsed,
    /// `None` when the file has syntax errors (semantic checks need a well-formed tree).
    pub analysis: Option<Analysis>,
    /// Wall-clock time of each front-end stage, in milliseconds.
    pub timings: Vec<(&'static str, f64)>,
}

impl Compilation {
    /// Every diagnostic, syntax errors first.
    pub fn diagnostics(&self) -> Vec<Diagnostic> {
        let mut diagnostics: Vec<Diagnostic> = self.parsed.errors.iter().cloned().map(Diagnostic::from).collect();
        if let Some(analysis) = &self.analysis {
            diagnostics.extend(analysis.diagnostics.iter().cloned());
        }
        diagnostics
    }

    pub fn has_errors(&self) -> bool {
        self.diagnostics().iter().any(Diagnostic::is_error)
    }
}

/// Parses and checks a source file, probing its data files on disk and checking that its
/// optimizer state fits in the machine's memory ([`memory_limit`]).
pub fn compile(source: SourceFile) -> Compilation {
    compile_file_with_options(source, &curv_sema::AnalysisOptions::default())
}

/// The memory a run may use, in bytes: `CURV_MEMORY_LIMIT` (bytes, or with a binary `K`, `M`, `G`
/// or `T` suffix) when set and valid, otherwise `MemAvailable` of `/proc/meminfo`; `None` where
/// neither is known (the check is then skipped).
pub fn memory_limit() -> Option<u64> {
    if let Some(limit) = std::env::var("CURV_MEMORY_LIMIT").ok().and_then(|text| parse_bytes(&text)) {
        return Some(limit);
    }
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|line| line.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// `"16G"` -> 16 GiB; a plain number is bytes.
pub fn parse_bytes(text: &str) -> Option<u64> {
    let text = text.trim();
    let (digits, shift) = match text.char_indices().last()? {
        (index, 'K' | 'k') => (&text[..index], 10),
        (index, 'M' | 'm') => (&text[..index], 20),
        (index, 'G' | 'g') => (&text[..index], 30),
        (index, 'T' | 't') => (&text[..index], 40),
        _ => (text, 0),
    };
    digits.trim().parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

/// Parses and checks with a caller-supplied data probe (tests and the fuzzer use an in-memory one).
pub fn compile_with_probe(source: SourceFile, probe: &mut dyn curv_sema::DataProbe) -> Compilation {
    compile_with_options(source, probe, &curv_sema::AnalysisOptions::default())
}

/// Parses and checks with command-line choices (such as an optimizer override).
pub fn compile_with_options(
    source: SourceFile,
    probe: &mut dyn curv_sema::DataProbe,
    options: &curv_sema::AnalysisOptions,
) -> Compilation {
    let started = std::time::Instant::now();
    let parsed = curv_grammar::parse(&source.text);
    let parse_ms = started.elapsed().as_secs_f64() * 1000.0;
    let started = std::time::Instant::now();
    let analysis =
        if parsed.errors.is_empty() { Some(curv_sema::analyze_with(&parsed.file, probe, options)) } else { None };
    let check_ms = started.elapsed().as_secs_f64() * 1000.0;
    Compilation { source, parsed, analysis, timings: vec![("parse", parse_ms), ("check", check_ms)] }
}

/// Parses and checks a file on disk with command-line choices; without a memory limit in
/// `options`, the machine's ([`memory_limit`]).
pub fn compile_file_with_options(source: SourceFile, options: &curv_sema::AnalysisOptions) -> Compilation {
    let mut probe = probe::FileProbe { directory: source.directory() };
    let mut options = options.clone();
    if options.memory_limit.is_none() {
        options.memory_limit = memory_limit();
    }
    compile_with_options(source, &mut probe, &options)
}

/// A stage `curv emit` can print.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Tokens,
    Ast,
    Ir,
    Grad,
}

impl Stage {
    pub fn from_name(name: &str) -> Option<Stage> {
        match name {
            "tokens" => Some(Stage::Tokens),
            "ast" => Some(Stage::Ast),
            "ir" => Some(Stage::Ir),
            "grad" => Some(Stage::Grad),
            _ => None,
        }
    }
}

/// The text of a stage, or `None` when errors prevent it (the caller prints the diagnostics).
/// Tokens and the AST are printed even for files with errors: they show what the parser saw.
pub fn emit(compilation: &Compilation, stage: Stage) -> Option<String> {
    match stage {
        Stage::Tokens => Some(curv_grammar::print::print_tokens(&compilation.parsed.tokens)),
        Stage::Ast => Some(curv_grammar::print::print_file(&compilation.parsed.file)),
        Stage::Ir => {
            if compilation.has_errors() {
                return None;
            }
            let analysis = compilation.analysis.as_ref()?;
            let locations = SourceLocations::new(&compilation.source);
            let locate = |module: Option<&str>, span: curv_grammar::Span| {
                locations.line_column(&compilation.source, module, span.start)
            };
            Some(curv_ir::print_program(&analysis.program, &locate))
        }
        Stage::Grad => {
            if compilation.has_errors() {
                return None;
            }
            let analysis = compilation.analysis.as_ref()?;
            let text = &compilation.source.text;
            let lines = LineStarts::new(text);
            let locate = |span: curv_grammar::Span| lines.line_column(text, span.start);
            let mut out = String::new();
            for train in &analysis.program.trains {
                let gradients = curv_ad::products::gradient_program(&train.loss, &train.params);
                out.push_str(&format!(
                    "train {}
",
                    train.name
                ));
                curv_ir::print_function(
                    &mut out,
                    "  ",
                    &format!("fn {}", gradients.function.name),
                    &gradients.function,
                    &locate,
                );
                for capture in &gradients.layer_captures {
                    out.push_str(&format!(
                        "  kfac {}: input {}, output cotangent {}  // layer {}\n",
                        train.params[capture.param].name, capture.input, capture.output_cotangent, capture.layer
                    ));
                }
                out.push('\n');
            }
            Some(out.trim_end().to_string() + "\n")
        }
    }
}

/// The MLIR location (`"file":line:column`) of a byte offset in the user's file or, given its
/// name, in a standard library module (`"std.optimizers.adam":12:13`).
pub fn source_location(source: &SourceFile, module: Option<&str>, offset: usize) -> String {
    match module.and_then(curv_sema::std_lib::find) {
        Some(index) => {
            let (name, text) = curv_sema::std_lib::MODULES[index];
            format!("{name:?}:{}", line_column(text, offset))
        }
        None => format!("{:?}:{}", source.display_name, line_column(&source.text, offset)),
    }
}

/// `line:column` (both from 1, column in characters) of a byte offset. For many offsets into one
/// text, build a [`LineStarts`] once.
pub fn line_column(text: &str, offset: usize) -> String {
    LineStarts::new(text).line_column(text, offset)
}

/// Where each line of a text starts: turns byte offsets into `line:column` by binary search, so
/// that locating every op of a long program costs linear time, not quadratic.
pub struct LineStarts(Vec<usize>);

impl LineStarts {
    pub fn new(text: &str) -> LineStarts {
        LineStarts(std::iter::once(0).chain(text.match_indices('\n').map(|(index, _)| index + 1)).collect())
    }

    /// `line:column` of `offset` in `text`, the text these starts were made from.
    pub fn line_column(&self, text: &str, offset: usize) -> String {
        let offset = text.floor_char_boundary(offset.min(text.len()));
        let line = self.0.partition_point(|start| *start <= offset).max(1);
        let start = self.0.get(line - 1).copied().unwrap_or(0).min(offset);
        let column = text.get(start..offset).map_or(0, |tail| tail.chars().count()) + 1;
        format!("{line}:{column}")
    }
}

/// The line starts of the user's file and of every standard library module, for
/// [`SourceLocations::location`].
pub struct SourceLocations {
    user: LineStarts,
    modules: Vec<LineStarts>,
}

impl SourceLocations {
    pub fn new(source: &SourceFile) -> SourceLocations {
        SourceLocations {
            user: LineStarts::new(&source.text),
            modules: curv_sema::std_lib::MODULES.iter().map(|(_, text)| LineStarts::new(text)).collect(),
        }
    }

    /// `line:column` of a byte offset in the user's file or, given its name, in a standard
    /// library module.
    pub fn line_column(&self, source: &SourceFile, module: Option<&str>, offset: usize) -> String {
        match module.and_then(curv_sema::std_lib::find) {
            Some(index) => match self.modules.get(index) {
                Some(starts) => starts.line_column(curv_sema::std_lib::MODULES[index].1, offset),
                None => line_column(curv_sema::std_lib::MODULES[index].1, offset),
            },
            None => self.user.line_column(&source.text, offset),
        }
    }

    /// The MLIR location, as [`source_location`] gives it.
    pub fn location(&self, source: &SourceFile, module: Option<&str>, offset: usize) -> String {
        match module.and_then(curv_sema::std_lib::find) {
            Some(index) => {
                format!("{:?}:{}", curv_sema::std_lib::MODULES[index].0, self.line_column(source, module, offset))
            }
            None => format!("{:?}:{}", source.display_name, self.line_column(source, None, offset)),
        }
    }
}

/// The stable list of diagnostic codes.
pub fn diagnostic_codes() -> &'static [(&'static str, &'static str)] {
    curv_sema::CODES
}

#[cfg(test)]
mod tests {
    #[test]
    fn byte_counts_parse_with_binary_suffixes() {
        assert_eq!(super::parse_bytes("123"), Some(123));
        assert_eq!(super::parse_bytes("16G"), Some(16 << 30));
        assert_eq!(super::parse_bytes("2k"), Some(2048));
        assert_eq!(super::parse_bytes(" 1 T "), Some(1 << 40));
        assert_eq!(super::parse_bytes("lots"), None);
        assert_eq!(super::parse_bytes(""), None);
    }
}
