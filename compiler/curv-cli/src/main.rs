//! `curv`: the command-line tool. `check` and `emit` run the front end; see `curv --help`.
//!
//! Exit codes: 0 success, 1 user error (a diagnostic was printed), 2 internal or runtime failure.
//! The process never ends in a panic: a bug is caught and reported as an internal error.

use clap::{Parser, Subcommand};
use curv_driver::{Compilation, SourceFile, Stage};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "curv",
    version,
    about = "The curv compiler for curvature-aware training programs",
    propagate_version = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check a file: print its diagnostics, or a summary of parameters, optimizer state and FLOPs.
    Check {
        /// The .curv file.
        file: PathBuf,
    },
    /// Print one stage of the compiler for a file.
    Emit {
        /// The .curv file.
        file: PathBuf,
        /// The stage to print: tokens, ast, ir or grad.
        #[arg(long)]
        stage: String,
        /// Write to this path instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Print the version and check the MLIR toolchain curv is linked against.
    Version,
}

fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        eprintln!("error: internal compiler error: {info}");
        eprintln!("note: this is a bug in curv; please report it with the input that caused it");
    }));
    match std::panic::catch_unwind(run) {
        Ok(code) => code,
        Err(_) => ExitCode::from(2),
    }
}

fn run() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return match error.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => ExitCode::SUCCESS,
                _ => ExitCode::from(1),
            };
        }
    };
    match cli.command {
        Command::Check { file } => check(&file),
        Command::Emit { file, stage, output } => emit(&file, &stage, output.as_deref()),
        Command::Version => version(),
    }
}

fn load(file: &Path) -> Result<Compilation, ExitCode> {
    match SourceFile::read(file) {
        Ok(source) => Ok(curv_driver::compile(source)),
        Err(message) => {
            eprintln!("error: {message}");
            Err(ExitCode::from(1))
        }
    }
}

fn print_diagnostics(compilation: &Compilation) {
    let color = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    eprint!("{}", curv_driver::render_diagnostics(compilation, color));
}

fn check(file: &Path) -> ExitCode {
    let compilation = match load(file) {
        Ok(compilation) => compilation,
        Err(code) => return code,
    };
    print_diagnostics(&compilation);
    if compilation.has_errors() {
        return ExitCode::from(1);
    }
    print!("{}", curv_driver::check_summary(&compilation));
    ExitCode::SUCCESS
}

fn emit(file: &Path, stage_name: &str, output: Option<&Path>) -> ExitCode {
    let Some(stage) = Stage::from_name(stage_name) else {
        eprintln!("error: unknown stage `{stage_name}`; the stages are tokens, ast, ir and grad");
        return ExitCode::from(1);
    };
    let compilation = match load(file) {
        Ok(compilation) => compilation,
        Err(code) => return code,
    };
    print_diagnostics(&compilation);
    let Some(text) = curv_driver::emit(&compilation, stage) else {
        return ExitCode::from(1);
    };
    match output {
        Some(path) => {
            if let Err(error) = write_atomically(path, &text) {
                eprintln!("error: cannot write {}: {error}", path.display());
                return ExitCode::from(1);
            }
        }
        None => print!("{text}"),
    }
    if compilation.has_errors() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// Writes through a temporary file in the same directory and renames it into place, so a reader
/// never sees half a file.
fn write_atomically(path: &Path, text: &str) -> std::io::Result<()> {
    let directory = path.parent().filter(|parent| !parent.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let file_name =
        path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_else(|| "output".to_string());
    let temporary = directory.join(format!(".{file_name}.{}.tmp", std::process::id()));
    std::fs::write(&temporary, text)?;
    std::fs::rename(&temporary, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&temporary);
    })
}

fn version() -> ExitCode {
    println!("curv {}", env!("CARGO_PKG_VERSION"));
    match curv_mlir::toolchain_self_check() {
        Ok(_) => {
            println!(
                "MLIR toolchain: ok (LLVM/MLIR 22 through melior 0.27; a linalg kernel lowered to the LLVM dialect)"
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: the MLIR toolchain self-check failed: {error}");
            ExitCode::from(2)
        }
    }
}
