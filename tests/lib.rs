//! Helpers for curv's data-driven tests: every test reads `.curv` files from disk and compares
//! what the compiler prints against an insta snapshot stored next to the tests.
//!
//! - `ui/*.curv`: invalid programs; the snapshot pairs the source with the rendered diagnostics.
//! - `stages.rs`: the `ast` and `ir` stages of every example, and a check that each passes.

use std::path::{Path, PathBuf};

/// The repository root (the parent of this crate).
pub fn repository_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the tests crate lives in the repository").to_path_buf()
}

/// Compiles a file and renders its diagnostics without colour, naming the file by `display`.
pub fn render_file(path: &Path, display: &str) -> (curv_driver::Compilation, String) {
    let mut source = curv_driver::SourceFile::read(path).expect("test inputs are readable");
    source.display_name = display.to_string();
    // A fixed 16 GiB machine, so that snapshots do not depend on the one running them.
    let options = curv_sema::AnalysisOptions { memory_limit: Some(16 << 30), ..Default::default() };
    let compilation = curv_driver::compile_file_with_options(source, &options);
    let rendered = curv_driver::render_diagnostics(&compilation, false);
    (compilation, rendered)
}

/// A Gleam-style snapshot: the source, then what curv printed.
pub fn pair(source: &str, output: &str) -> String {
    format!("----- SOURCE\n{}\n----- OUTPUT\n{}", source.trim_end(), output.trim_end())
}

/// Every `.curv` file under `directory`, sorted.
pub fn curv_files(directory: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(directory)
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|entry| entry.path())
                .filter(|path| path.extension().is_some_and(|extension| extension == "curv"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}
