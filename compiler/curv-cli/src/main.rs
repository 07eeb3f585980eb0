//! `curv`: the command-line tool. `check` and `emit` run the front end; see `curv --help`.
//!
//! Exit codes: 0 success, 1 user error (a diagnostic was printed), 2 internal or runtime failure.
//! The process never ends in a panic: a bug is caught and reported as an internal error.

use clap::{Parser, Subcommand};
use curv_driver::{Compilation, SourceFile, Stage};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

mod bench;
mod build;
mod emit;

use bench::bench_kernels;
use build::build_command;
use emit::{emit, source_locator};

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
    /// Print the time each stage took (to standard error).
    #[arg(long, global = true)]
    timings: bool,
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
        /// The stage to print: tokens, ast, ir, grad, mlir, tiled (the modules after tiling and
        /// vectorisation), llvm or ptx.
        #[arg(long)]
        stage: String,
        /// Write to this path instead of standard output.
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// The GPU of `--stage ptx`: sm_80 (A100) or sm_90 (H100, H200).
        #[arg(long, default_value = "sm_90")]
        gpu: String,
    },
    /// Train: run a file's `train` block and report its metrics.
    Run {
        /// The .curv file.
        file: PathBuf,
        #[command(flatten)]
        run: RunArguments,
        /// Train with this optimizer instead of the block's (a standard preset is imported if needed).
        #[arg(long)]
        optimizer: Option<String>,
        /// Write one JSON object per logged step to this file.
        #[arg(long)]
        metrics: Option<PathBuf>,
    },
    /// Train the same block with several optimizers and compare them (table and overlaid plot).
    Compare {
        /// The .curv file.
        file: PathBuf,
        /// Comma-separated optimizer names, such as `adam,sophia,adahessian`.
        #[arg(long, value_delimiter = ',', required = true)]
        optimizers: Vec<String>,
        #[command(flatten)]
        run: RunArguments,
    },
    /// Build a standalone trainer: the train block's kernels compiled ahead of time, linked with
    /// curv's runtime into an executable that takes the flags of `curv run` and needs no LLVM.
    Build {
        /// The .curv file.
        file: PathBuf,
        /// Where to write the executable.
        #[arg(short, long)]
        output: PathBuf,
        /// The train block to build (default: the first).
        #[arg(long)]
        train: Option<String>,
        /// Device: `cpu`, or `cuda` (kernels as PTX embedded in the trainer, launched through the
        /// CUDA driver, which the trainer loads at run time; matrix products on cuBLAS).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// The GPU a `--device cuda` trainer generates PTX for: sm_90 (H100, H200) or sm_80
        /// (A100; also runs on later GPUs through the driver's JIT).
        #[arg(long, default_value = "sm_90")]
        gpu: String,
        /// Build a shared library with a C ABI instead (not available yet).
        #[arg(long)]
        lib: bool,
    },
    /// Print the version and check the MLIR toolchain curv is linked against.
    Version,
    /// Time generated kernels (GEMM at several sizes, a fused Adam update) for benches/peers.py;
    /// prints JSON.
    #[command(hide = true)]
    BenchKernels,
    /// Apply one of the optimizers' matrix functions to the float64 tensor `a` of a safetensors
    /// file and write `result` (for the oracle tests against numpy.linalg).
    #[command(hide = true)]
    MatrixFunction {
        /// inverse_root, inverse_root_newton, damped_inverse or newton_schulz.
        name: String,
        input: PathBuf,
        output: PathBuf,
        #[arg(long, default_value_t = 4.0)]
        root: f64,
        #[arg(long, default_value_t = 0.0)]
        eps: f64,
        #[arg(long, default_value_t = 0.0)]
        damping: f64,
        #[arg(long, default_value_t = 5)]
        steps: usize,
    },
}

#[derive(clap::Args, Clone)]
struct RunArguments {
    /// The train block to run (default: the first).
    #[arg(long)]
    train: Option<String>,
    /// Number of steps (default: the block's `steps`).
    #[arg(long)]
    steps: Option<u64>,
    /// Random seed for initialisation, shuffling and probes (default: the block's `seed`).
    #[arg(long)]
    seed: Option<u64>,
    /// Execution backend: `mlir` (compiled through MLIR for the CPU; functions with ops it does
    /// not lower yet run on the interpreter) or `interp` (the reference interpreter). With
    /// `--precision f64` the interpreter runs.
    #[arg(long, default_value = "mlir")]
    backend: String,
    /// Device to train on: `cpu`, or `cuda` (the first NVIDIA GPU; kernels compiled to PTX and
    /// launched through the CUDA driver, matrix products on cuBLAS).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Element type the interpreter computes in: f32 or f64.
    #[arg(long, default_value = "f32")]
    precision: String,
    /// Initial parameters by their .curv names (a safetensors file).
    #[arg(long)]
    init: Option<PathBuf>,
    /// Continue from a checkpoint written by an earlier run.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Directory for final.safetensors, checkpoints, plots and reconstructions.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print nothing but errors.
    #[arg(long)]
    quiet: bool,
    /// Report the first step (and training seconds) at which a training metric reaches a value:
    /// `psnr=30`, `accuracy=0.95`, `loss=0.1` (loss at or below, the others at or above).
    #[arg(long)]
    target: Option<String>,
    /// Stop training once `--target` is reached.
    #[arg(long)]
    stop_at_target: bool,
    /// Update the parameters that share an elementwise rule with one kernel per block (`on`), or
    /// each with its own kernel (`off`: the same numbers, for comparisons).
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = ["on", "off"])]
    grouped_updates: String,
}

/// The stack of the thread that runs every command. curv's own stages need little (expressions
/// nest at most 256 levels; longer chains are walked iteratively), but LLVM's optimisation passes
/// recurse along chains of dependent instructions: a chain of 100,000 scalar lets overflowed the
/// 8 MiB main thread in `ReassociatePass::getRank`. The address space is only reserved: a
/// compilation uses the pages it touches.
const STACK_SIZE: usize = 1 << 30;

fn main() -> ExitCode {
    std::panic::set_hook(Box::new(|info| {
        eprintln!("error: internal compiler error: {info}");
        eprintln!("note: this is a bug in curv; please report it with the input that caused it");
    }));
    let worker = std::thread::Builder::new().name("curv".to_string()).stack_size(STACK_SIZE).spawn(|| {
        match std::panic::catch_unwind(run) {
            Ok(code) => code,
            Err(_) => ExitCode::from(2),
        }
    });
    match worker.map(std::thread::JoinHandle::join) {
        Ok(Ok(code)) => code,
        Ok(Err(_)) => ExitCode::from(2),
        Err(error) => {
            eprintln!("error: cannot start a thread with a {} MiB stack: {error}", STACK_SIZE >> 20);
            ExitCode::from(2)
        }
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
    let timings = cli.timings;
    match cli.command {
        Command::Check { file } => check(&file, timings),
        Command::Emit { file, stage, output, gpu } => emit(&file, &stage, output.as_deref(), &gpu, timings),
        Command::Run { file, run, optimizer, metrics } => run_command(&file, &run, optimizer, metrics, timings),
        Command::Compare { file, optimizers, run } => compare_command(&file, &optimizers, &run),
        Command::Build { file, output, train, device, gpu, lib } => {
            build_command(&file, &output, train.as_deref(), &device, &gpu, lib)
        }
        Command::Version => version(),
        Command::BenchKernels => bench_kernels(),
        Command::MatrixFunction { name, input, output, root, eps, damping, steps } => {
            match matrix_function(&name, &input, &output, root, eps, damping, steps) {
                Ok(()) => ExitCode::SUCCESS,
                Err(message) => {
                    eprintln!("error: {message}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

fn matrix_function(
    name: &str,
    input: &Path,
    output: &Path,
    root: f64,
    eps: f64,
    damping: f64,
    steps: usize,
) -> Result<(), String> {
    use curv_runtime::kronecker;
    let all = curv_runtime::checkpoint::read_file::<f64>(input)?.tensors;
    let a = all.get("a").ok_or_else(|| format!("{} has no tensor `a`", input.display()))?;
    if a.rank() != 2 {
        return Err(format!("`a` must be a matrix, its shape is {:?}", a.shape));
    }
    let matrix =
        curv_runtime::linalg::Matrix::new(a.shape[0], a.shape[1], a.data.clone()).map_err(|error| error.to_string())?;
    let result = match name {
        "inverse_root" => kronecker::inverse_root(&matrix, root, eps).map_err(|error| error.to_string())?,
        "inverse_root_newton" => {
            kronecker::inverse_root_newton(&matrix, root, eps).map_err(|error| error.to_string())?
        }
        "damped_inverse" => kronecker::damped_inverse(&matrix, damping).map_err(|error| error.to_string())?,
        "newton_schulz" => kronecker::newton_schulz(&matrix, steps, (3.4445, -4.7750, 2.0315)),
        other => {
            return Err(format!(
            "unknown matrix function `{other}`; use inverse_root, inverse_root_newton, damped_inverse or newton_schulz"
        ))
        }
    };
    let tensor = curv_runtime::checkpoint::Tensor::new(vec![result.rows, result.columns], result.data);
    let bytes = curv_runtime::checkpoint::serialize(&[("result".to_string(), &tensor)], &[])?;
    Ok(curv_runtime::checkpoint::write_atomically(output, &bytes)?)
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

/// Prints `timings: stage 1.23 ms, ...` to standard error.
fn print_timings(stages: &[(&str, f64)]) {
    let parts: Vec<String> = stages.iter().map(|(stage, ms)| format!("{stage} {ms:.2} ms")).collect();
    eprintln!("timings: {}", parts.join(", "));
}

fn check(file: &Path, timings: bool) -> ExitCode {
    let compilation = match load(file) {
        Ok(compilation) => compilation,
        Err(code) => return code,
    };
    if timings {
        print_timings(&compilation.timings);
    }
    print_diagnostics(&compilation);
    if compilation.has_errors() {
        return ExitCode::from(1);
    }
    write_stdout(&curv_driver::check_summary(&compilation));
    ExitCode::SUCCESS
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

fn run_options(arguments: &RunArguments, metrics: Option<PathBuf>) -> Result<curv_driver::run::RunOptions, ExitCode> {
    let backend: Option<curv_driver::run::BackendFactory> = match (
        arguments.backend.as_str(),
        arguments.precision.as_str(),
    ) {
        ("interp", _) => None,
        // The reference interpreter is the f64 backend.
        ("mlir", "f64") => None,
        ("mlir", _) => Some(|| Box::new(curv_mlir::backend::MlirBackend::new(2))),
        (other, _) => {
            eprintln!("error: unknown backend `{other}`; the backends are `mlir` and `interp` (`cranelift` is not available yet)");
            return Err(ExitCode::from(1));
        }
    };
    let backend = match arguments.device.as_str() {
        "cpu" => backend,
        "cuda" => {
            if arguments.backend != "mlir" || arguments.precision != "f32" {
                eprintln!(
                    "error: `--device cuda` runs the `mlir` backend in f32; the interpreter runs on the CPU only"
                );
                return Err(ExitCode::from(1));
            }
            match curv_cuda::probe()
                .map_err(|error| error.to_string())
                .and_then(|device| curv_mlir::backend::gpu_target(&device).map(|target| (device, target)))
            {
                Ok((device, target)) => eprintln!(
                    "device: {} ({}, {} MiB), PTX for {}",
                    device.name,
                    device.chip(),
                    device.memory_bytes >> 20,
                    target.chip()
                ),
                Err(message) => {
                    eprintln!("error: {message} (`--device cuda` needs an NVIDIA GPU and its driver)");
                    return Err(ExitCode::from(1));
                }
            }
            let factory: curv_driver::run::BackendFactory = || match curv_mlir::backend::MlirBackend::for_cuda(2) {
                Ok(backend) => Box::new(backend),
                // The device was found a moment ago; if it is gone now, the CPU backend runs.
                Err(message) => {
                    eprintln!("warning: {message}; training on the CPU");
                    Box::new(curv_mlir::backend::MlirBackend::new(2))
                }
            };
            Some(factory)
        }
        other => {
            eprintln!("error: unknown device `{other}`; the devices are `cpu` and `cuda`");
            return Err(ExitCode::from(1));
        }
    };
    let precision = match arguments.precision.as_str() {
        "f32" => curv_driver::run::Precision::F32,
        "f64" => curv_driver::run::Precision::F64,
        other => {
            eprintln!("error: unknown precision `{other}`; use f32 or f64");
            return Err(ExitCode::from(1));
        }
    };
    let target = match &arguments.target {
        None => None,
        Some(text) => match curv_driver::run::Target::parse(text) {
            Ok(target) => Some(target),
            Err(message) => {
                eprintln!("error: --target: {message}");
                return Err(ExitCode::from(1));
            }
        },
    };
    if arguments.stop_at_target && target.is_none() {
        eprintln!("error: --stop-at-target needs --target METRIC=VALUE");
        return Err(ExitCode::from(1));
    }
    Ok(curv_driver::run::RunOptions {
        target,
        stop_at_target: arguments.stop_at_target,
        train: arguments.train.clone(),
        steps: arguments.steps,
        seed: arguments.seed,
        precision,
        init: arguments.init.clone(),
        resume: arguments.resume.clone(),
        metrics,
        out: arguments.out.clone(),
        backend,
        source: None,
        grouped_updates: arguments.grouped_updates == "on",
    })
}

/// Shows a progress bar on a terminal and log lines otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    quiet: bool,
    label: String,
}

impl curv_driver::run::RunObserver for Progress {
    fn started(&mut self, train: &curv_ir::TrainProgram, first_step: u64, total_steps: u64) {
        if self.quiet {
            return;
        }
        println!(
            "{}train {}: {} parameters, optimizer `{}`, steps {first_step}..={total_steps}",
            self.label,
            train.name,
            train.params.len(),
            train.optimizer.name
        );
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(total_steps);
            bar.set_position(first_step.saturating_sub(1));
            if let Ok(style) =
                indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} steps, {per_sec}, eta {eta} {msg}")
            {
                bar.set_style(style);
            }
            self.bar = Some(bar);
        }
    }

    fn stepped(&mut self, _step: u64, loss: f64) {
        if let Some(bar) = &self.bar {
            bar.inc(1);
            bar.set_message(format!("loss {loss:.4}"));
        }
    }

    fn logged(&mut self, record: &curv_driver::run::LogRecord) {
        if self.quiet {
            return;
        }
        let values: Vec<String> = record.values.iter().map(|(name, value)| format!("{name} {value:.4}")).collect();
        let line = format!("{}step {:>6}  {}", self.label, record.step, values.join("  "));
        match &self.bar {
            Some(bar) => bar.println(line),
            None => println!("{line}"),
        }
    }

    fn warning(&mut self, message: &str) {
        match &self.bar {
            Some(bar) => bar.println(format!("warning: {message}")),
            None => eprintln!("warning: {message}"),
        }
    }
}

impl Progress {
    fn new(quiet: bool, label: String) -> Progress {
        Progress { bar: None, quiet, label }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

fn run_command(
    file: &Path,
    arguments: &RunArguments,
    optimizer: Option<String>,
    metrics: Option<PathBuf>,
    timings: bool,
) -> ExitCode {
    let mut options = match run_options(arguments, metrics) {
        Ok(options) => options,
        Err(code) => return code,
    };
    let source = match SourceFile::read(file) {
        Ok(source) => source,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(1);
        }
    };
    let directory = source.directory();
    let analysis_options = curv_sema::AnalysisOptions { optimizer_override: optimizer, ..Default::default() };
    let compilation = curv_driver::compile_file_with_options(source, &analysis_options);
    print_diagnostics(&compilation);
    if compilation.has_errors() {
        return ExitCode::from(1);
    }
    let Some(analysis) = &compilation.analysis else { return ExitCode::from(1) };
    options.source = Some(compilation.source.clone());
    let mut progress = Progress::new(arguments.quiet, String::new());
    let result = curv_driver::run::run_program(&analysis.program, &directory, &options, &mut progress);
    progress.finish();
    match result {
        Ok(summary) => {
            if timings {
                let mut stages = compilation.timings.clone();
                stages.extend(summary.timings.iter().copied());
                print_timings(&stages);
            }
            if !arguments.quiet {
                let values: Vec<String> =
                    summary.final_values.iter().map(|(name, value)| format!("{name} {value:.4}")).collect();
                println!(
                    "done: {} steps, {}, median step {:.2} ms",
                    summary.steps,
                    values.join(", "),
                    summary.step_ms_median
                );
                if let Some(target) = &arguments.target {
                    match summary.target_reached {
                        Some(reached) => println!(
                            "target {target} reached at step {} after {:.2} s of training",
                            reached.step, reached.seconds
                        ),
                        None => println!("target {target} not reached"),
                    }
                }
                for path in &summary.files {
                    println!("wrote {}", path.display());
                }
            }
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {}", error.message);
            ExitCode::from(if error.user { 1 } else { 2 })
        }
    }
}

fn compare_command(file: &Path, optimizers: &[String], arguments: &RunArguments) -> ExitCode {
    let options = match run_options(arguments, None) {
        Ok(options) => options,
        Err(code) => return code,
    };
    let source = match SourceFile::read(file) {
        Ok(source) => source,
        Err(message) => {
            eprintln!("error: {message}");
            return ExitCode::from(1);
        }
    };
    let mut progress = Progress::new(arguments.quiet, String::new());
    let results = match curv_driver::run::compare(&source, optimizers, &options, &mut progress) {
        Ok(results) => results,
        Err(_) => {
            // Show the diagnostics of the failing variant.
            for optimizer in optimizers {
                let analysis_options =
                    curv_sema::AnalysisOptions { optimizer_override: Some(optimizer.clone()), ..Default::default() };
                let compilation = curv_driver::compile_file_with_options(source.clone(), &analysis_options);
                if compilation.has_errors() {
                    eprintln!("with --optimizer {optimizer}:");
                    print_diagnostics(&compilation);
                }
            }
            return ExitCode::from(1);
        }
    };
    progress.finish();
    let mut failed = false;
    let mut user_error = false;
    let metric_names: Vec<String> = results
        .iter()
        .filter_map(|result| result.as_ref().ok())
        .flat_map(|summary| summary.final_values.iter().map(|(name, _)| name.clone()))
        .fold(Vec::new(), |mut names, name| {
            if !names.contains(&name) {
                names.push(name);
            }
            names
        });
    let mut header = format!("{:<14}{:>8}", "optimizer", "steps");
    for name in &metric_names {
        header.push_str(&format!("{name:>16}"));
    }
    header.push_str(&format!("{:>14}{:>12}", "ms/step", "seconds"));
    if let Some(target) = &options.target {
        let label = format!("{}={}", target.metric, target.value);
        let width = (label.len() + 14).max(22);
        header.push_str(&format!("{:>width$}{:>width$}", format!("steps to {label}"), format!("seconds to {label}")));
    }
    println!("{header}");
    for (optimizer, result) in optimizers.iter().zip(&results) {
        match result {
            Ok(summary) => {
                let mut line = format!("{optimizer:<14}{:>8}", summary.steps);
                for name in &metric_names {
                    let value = summary
                        .final_values
                        .iter()
                        .find(|(key, _)| key == name)
                        .map(|(_, value)| format!("{value:.4}"));
                    line.push_str(&format!("{:>16}", value.unwrap_or_else(|| "-".to_string())));
                }
                let seconds = summary.records.last().map_or(0.0, |record| record.elapsed_ms / 1000.0);
                line.push_str(&format!("{:>14.2}{:>12.2}", summary.step_ms_median, seconds));
                if let Some(target) = &options.target {
                    let width = (format!("{}={}", target.metric, target.value).len() + 14).max(22);
                    match summary.target_reached {
                        Some(reached) => {
                            line.push_str(&format!("{:>width$}{:>width$.2}", reached.step, reached.seconds))
                        }
                        None => line.push_str(&format!("{:>width$}{:>width$}", "not reached", "-")),
                    }
                }
                println!("{line}");
            }
            Err(error) => {
                failed = true;
                user_error |= error.user;
                println!("{optimizer:<14} failed: {}", error.message);
            }
        }
    }
    if let Some(out) = &options.out {
        let path = out.join("compare_loss.svg");
        match curv_driver::run::plot_comparison(&path, optimizers, &results, "loss") {
            Ok(()) => println!("wrote {}", path.display()),
            Err(message) => eprintln!("warning: no comparison plot: {message}"),
        }
    }
    match (failed, user_error) {
        (false, _) => ExitCode::SUCCESS,
        (true, true) => ExitCode::from(1),
        (true, false) => ExitCode::from(2),
    }
}

/// Writes to standard output; a closed pipe (`curv emit ... | head`) is not an error.
fn write_stdout(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(error) = stdout.write_all(text.as_bytes()).and_then(|()| stdout.flush()) {
        if error.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("error: cannot write to standard output: {error}");
        }
    }
}
