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

fn emit(file: &Path, stage_name: &str, output: Option<&Path>, gpu: &str, timings: bool) -> ExitCode {
    let compiled_stage = matches!(stage_name, "mlir" | "tiled" | "llvm" | "ptx");
    let Some(stage) = Stage::from_name(if compiled_stage { "ir" } else { stage_name }) else {
        eprintln!(
            "error: unknown stage `{stage_name}`; the stages are tokens, ast, ir, grad, mlir, tiled, llvm and ptx"
        );
        return ExitCode::from(1);
    };
    let Some(target) = curv_mlir::gpu::GpuTarget::parse(gpu) else {
        eprintln!("error: unknown GPU `{gpu}`; curv generates PTX for sm_80 and sm_90");
        return ExitCode::from(1);
    };
    let mode = match stage_name {
        "tiled" => CompiledStage::Tiled,
        "llvm" => CompiledStage::Llvm,
        "ptx" => CompiledStage::Ptx(target),
        _ => CompiledStage::Mlir,
    };
    let compilation = match load(file) {
        Ok(compilation) => compilation,
        Err(code) => return code,
    };
    print_diagnostics(&compilation);
    let started = std::time::Instant::now();
    let Some(text) = curv_driver::emit(&compilation, stage) else {
        return ExitCode::from(1);
    };
    let text = if compiled_stage {
        match emit_compiled(&compilation, mode) {
            Ok(text) => text,
            Err(message) => {
                eprintln!("error: {message}");
                return ExitCode::from(2);
            }
        }
    } else {
        text
    };
    if timings {
        let mut stages = compilation.timings.clone();
        stages.push(("emit", started.elapsed().as_secs_f64() * 1000.0));
        print_timings(&stages);
    }
    match output {
        Some(path) => {
            if let Err(error) = write_atomically(path, &text) {
                eprintln!("error: cannot write {}: {error}", path.display());
                return ExitCode::from(1);
            }
        }
        None => write_stdout(&text),
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

/// The MLIR of every train block, or its lowering to the LLVM dialect.
/// What `emit` prints of the compiled modules.
#[derive(Clone, Copy)]
enum CompiledStage {
    Mlir,
    /// The modules after the CPU pipeline's tiling and vectorisation schedule.
    Tiled,
    Llvm,
    Ptx(curv_mlir::gpu::GpuTarget),
}

/// An MLIR location (`"file":line:column`) for a span of the user's file or, given its name, of a
/// standard library module.
fn source_locator(compilation: &Compilation) -> impl Fn(Option<&str>, curv_grammar::Span) -> String + '_ {
    let locations = curv_driver::SourceLocations::new(&compilation.source);
    move |module: Option<&str>, span: curv_grammar::Span| locations.location(&compilation.source, module, span.start)
}

fn emit_compiled(compilation: &Compilation, mode: CompiledStage) -> Result<String, String> {
    let Some(analysis) = &compilation.analysis else { return Err("the file did not check".to_string()) };
    let mut out = String::new();
    for train in &analysis.program.trains {
        let gradients = curv_ad::products::gradient_program(&train.loss, &train.params).function;
        let locate = source_locator(compilation);
        // The GPU's functions take memref descriptors, the CPU's a table of them.
        let abi = match mode {
            CompiledStage::Ptx(_) => curv_mlir::lower::EntryAbi::Descriptors,
            _ => curv_mlir::lower::EntryAbi::Table,
        };
        let text =
            curv_mlir::lower::lower_train_program(train, &analysis.program.rules, &gradients, Some(&locate), abi)
                .map_err(|error| error.message)?;
        match mode {
            CompiledStage::Mlir => out.push_str(&text),
            CompiledStage::Tiled | CompiledStage::Llvm | CompiledStage::Ptx(_) => {
                // Each module is lowered on its own; the comment lines name them.
                for module in text.split("// ").filter(|chunk| !chunk.trim().is_empty()) {
                    let (title, body) = module.split_once('\n').unwrap_or((module, ""));
                    out.push_str(&format!("// {title}\n"));
                    if let CompiledStage::Ptx(target) = mode {
                        let (kernels, launches) =
                            curv_mlir::gpu::lower_to_ptx_with_launches(body, target).map_err(|error| error.message)?;
                        out.push_str(&format!("// {launches}\n"));
                        for kernel in kernels {
                            out.push_str(&format!("// gpu module {}\n{}\n", kernel.name, kernel.ptx));
                        }
                    } else if let CompiledStage::Tiled = mode {
                        let tiled = curv_mlir::jit::schedule_text(body).map_err(|error| error.message)?;
                        out.push_str(&format!("{tiled}\n"));
                    } else {
                        let lowered = curv_mlir::jit::lower_text_for_cpu(body).map_err(|error| error.message)?;
                        out.push_str(&format!("{lowered}\n"));
                    }
                }
            }
        }
    }
    Ok(out)
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

/// Median seconds of `repeats` calls of `run`.
fn median_seconds(repeats: usize, mut run: impl FnMut()) -> f64 {
    let mut times: Vec<f64> = (0..repeats)
        .map(|_| {
            let started = std::time::Instant::now();
            run();
            started.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(|a, b| a.total_cmp(b));
    times[times.len() / 2]
}

fn best_seconds(repeats: usize, mut run: impl FnMut()) -> f64 {
    (0..repeats)
        .map(|_| {
            let started = std::time::Instant::now();
            run();
            started.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// Times a generated matrix product at 256, 512 and 1024 and the fused Adam update of 4M
/// parameters, as JSON for the peer benchmark.
fn bench_kernels() -> ExitCode {
    use curv_ir::{DType, Function, Op, TensorType};
    use curv_mlir::jit::{compile, Buffer};
    // As during training with the MLIR backend (see `curv_runtime::compiled`).
    curv_runtime::compiled::keep_large_allocations_in_the_heap();
    let mut report = Vec::new();
    for size in [256i64, 512, 1024] {
        let mut function = Function::new("gemm");
        let ty = TensorType::known(DType::F32, &[size, size]);
        let a = function.push(Op::Input { index: 0, name: "a".into() }, vec![], ty.clone(), Default::default());
        let b = function.push(Op::Input { index: 1, name: "b".into() }, vec![], ty.clone(), Default::default());
        let c = function.push(Op::MatMul, vec![a, b], ty, Default::default());
        function.outputs.push(("c".into(), c));
        let Ok((text, signature)) =
            curv_mlir::lower::lower_function(&function, "gemm", &std::collections::HashMap::new())
        else {
            return ExitCode::from(2);
        };
        let compiled = match compile(&text, "gemm", signature, 2) {
            Ok(compiled) => compiled,
            Err(error) => {
                eprintln!("error: {error}");
                return ExitCode::from(2);
            }
        };
        let count = (size * size) as usize;
        let mut left: Vec<f32> = (0..count).map(|index| (index % 7) as f32 * 0.1).collect();
        let mut right: Vec<f32> = (0..count).map(|index| (index % 5) as f32 * 0.1).collect();
        let mut out = vec![0.0f32; count];
        // The best of 20 calls, the statistic `benches/peers.py` takes for numpy's GEMM, after
        // three untimed calls (the first calls of a process were sometimes twice as slow).
        for _ in 0..3 {
            let _ = compiled.call(&mut [Buffer::F32(&mut left), Buffer::F32(&mut right), Buffer::F32(&mut out)]);
        }
        let seconds = best_seconds(20, || {
            let _ = compiled.call(&mut [Buffer::F32(&mut left), Buffer::F32(&mut right), Buffer::F32(&mut out)]);
        });
        report.push(format!("\"gemm_{size}_gflops\": {:.3}", 2.0 * (size as f64).powi(3) / seconds / 1e9));
    }
    // The fused Adam update: reads p, g, m, v and writes p, m, v.
    let source = curv_driver::SourceFile::in_memory(
        "bench.curv",
        "use std.optimizers.adam\ndata d = csv(\"d.csv\", label = \"label\")\nmodel m(x: f32[B, 64]) -> f32[B, 10] {\n    param w: f32[64, 10] = zeros\n    return x @ w\n}\ntrain t {\n    loss cross_entropy(m(d.x), d.y)\n    optimizer adam\n    steps 1\n}\n",
        std::path::Path::new("/nonexistent"),
    );
    let compilation = curv_driver::compile_with_probe(source, &mut curv_driver::fuzzing::MemoryProbe);
    let Some(analysis) = &compilation.analysis else { return ExitCode::from(2) };
    let Some(adam) = analysis.program.rules.iter().find(|rule| rule.name == "adam") else { return ExitCode::from(2) };
    let size: i64 = 1 << 22;
    let bindings = std::collections::HashMap::from([("P".to_string(), size)]);
    let Ok((text, signature)) = curv_mlir::lower::lower_function(&adam.updates[0].function, "adam", &bindings) else {
        return ExitCode::from(2);
    };
    let compiled = match compile(&text, "adam", signature.clone(), 2) {
        Ok(compiled) => compiled,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    let mut buffers: Vec<Vec<f32>> = signature
        .arguments
        .iter()
        .map(|argument| vec![0.5f32; argument.shape.iter().product::<i64>() as usize])
        .chain(signature.outputs.iter().map(|(_, shape, _)| vec![0.0f32; shape.iter().product::<i64>() as usize]))
        .collect();
    let seconds = median_seconds(9, || {
        let mut slices: Vec<Buffer> = buffers.iter_mut().map(|buffer| Buffer::F32(buffer.as_mut_slice())).collect();
        let _ = compiled.call(&mut slices);
    });
    // Bytes moved: every tensor argument read once, every output written once.
    let tensors =
        signature.arguments.iter().filter(|argument| !argument.shape.is_empty()).count() + signature.outputs.len();
    let bytes = tensors as f64 * size as f64 * 4.0;
    report.push(format!("\"adam_update_gbytes_per_second\": {:.3}", bytes / seconds / 1e9));
    let mut source = vec![1.0f32; 1 << 24];
    let mut destination = vec![0.0f32; 1 << 24];
    let copy_seconds = median_seconds(9, || destination.copy_from_slice(&source));
    source[0] = destination[1];
    report.push(format!("\"copy_gbytes_per_second\": {:.3}", 2.0 * 4.0 * (1u64 << 24) as f64 / copy_seconds / 1e9));
    println!("{{{}}}", report.join(", "));
    ExitCode::SUCCESS
}

/// `curv build`: compiles every kernel the train block's trainer evaluates to an object file,
/// writes the registry that names them and embeds the source, and links both with the standalone
/// runtime library (`libcurv_standalone.a`, found next to the `curv` executable).
fn build_command(file: &Path, output: &Path, train_name: Option<&str>, device: &str, gpu: &str, lib: bool) -> ExitCode {
    let gpu = match device {
        "cpu" => None,
        "cuda" => match curv_mlir::gpu::GpuTarget::parse(gpu) {
            Some(target) => Some(target),
            None => {
                eprintln!("error: unknown GPU `{gpu}`; curv generates PTX for sm_80 and sm_90");
                return ExitCode::from(1);
            }
        },
        other => {
            eprintln!("error: unknown device `{other}`; the devices are `cpu` and `cuda`");
            return ExitCode::from(1);
        }
    };
    if lib {
        return match build_library(file, output, gpu) {
            Ok(message) => {
                println!("{message}");
                ExitCode::SUCCESS
            }
            Err((message, code)) => {
                eprintln!("error: {message}");
                ExitCode::from(code)
            }
        };
    }
    let compilation = match load(file) {
        Ok(compilation) => compilation,
        Err(code) => return code,
    };
    print_diagnostics(&compilation);
    if compilation.has_errors() {
        return ExitCode::from(1);
    }
    let Some(analysis) = &compilation.analysis else { return ExitCode::from(1) };
    match build(&compilation, &analysis.program, train_name, output, gpu) {
        Ok(kernels) => {
            println!("wrote {} ({kernels} compiled kernels)", output.display());
            ExitCode::SUCCESS
        }
        Err((message, code)) => {
            eprintln!("error: {message}");
            ExitCode::from(code)
        }
    }
}

/// A data probe that reads the files as `curv check` does and records what it answered, for a
/// library to answer the same without the files.
struct RecordingProbe {
    inner: curv_driver::FileProbe,
    records: Vec<(String, curv_sema::ProbedData)>,
}

impl curv_sema::DataProbe for RecordingProbe {
    fn probe(&mut self, request: &curv_sema::DataRequest) -> Result<curv_sema::ProbedData, curv_sema::DataProbeError> {
        let answer = self.inner.probe(request)?;
        self.records.push((request.name.clone(), answer.clone()));
        Ok(answer)
    }
}

/// The C header of a library: the C ABI of `curv_standalone::abi`.
const LIBRARY_HEADER: &str = r#"/* The C ABI of a curv library (`curv build --lib`), in the style of Futhark's generated API:
 * configuration -> context -> entry points; every entry point returns an error code (CURV_OK, ...)
 * and curv_context_error() gives the message. Tensors are DLPack DLManagedTensors (float32 or
 * float64, contiguous, on the CPU, with the shapes of the .curv file's parameters); they are
 * updated in place and never freed by the library. */
#ifndef CURV_@NAME@_H
#define CURV_@NAME@_H
#include <stdint.h>
#ifdef __cplusplus
extern "C" {
#endif

#define CURV_OK 0
#define CURV_INVALID_ARGUMENT 1
#define CURV_RUNTIME_ERROR 2
#define CURV_CONTEXT_ERROR 3

#ifndef DLPACK_VERSION
/* DLPack 0.8, as in dlpack/dlpack.h. */
typedef struct { int32_t device_type; int32_t device_id; } DLDevice;
typedef struct { uint8_t code; uint8_t bits; uint16_t lanes; } DLDataType;
typedef struct {
  void *data; DLDevice device; int32_t ndim; DLDataType dtype;
  int64_t *shape; int64_t *strides; uint64_t byte_offset;
} DLTensor;
typedef struct DLManagedTensor {
  DLTensor dl_tensor; void *manager_ctx; void (*deleter)(struct DLManagedTensor *self);
} DLManagedTensor;
#endif

struct curv_config;
struct curv_context;

struct curv_config *curv_config_new(void);
void curv_config_free(struct curv_config *config);
/* Options: "lr", the base learning rate (finite, positive). */
int curv_config_set(struct curv_config *config, const char *name, double value);

/* Never NULL; when the program cannot be used, entry points return CURV_CONTEXT_ERROR. */
struct curv_context *curv_context_new(const struct curv_config *config);
void curv_context_free(struct curv_context *context);
/* The last error's message, or NULL; valid until the next call on the context. */
const char *curv_context_error(const struct curv_context *context);
/* The stable code of the last error as a number (502 for E0502; docs/errors.md lists them), or 0
 * when the last call succeeded or its error has no code. The message starts with it, as [E0502]. */
int curv_context_error_code(const struct curv_context *context);

int64_t curv_param_count(const struct curv_context *context);
const char *curv_param_name(const struct curv_context *context, int64_t index);
/* Writes up to `capacity` dimensions of parameter `index`; returns its rank (-1: bad argument). */
int64_t curv_param_shape(const struct curv_context *context, int64_t index, int64_t *dims, int64_t capacity);

/* One optimizer step: params[i] updated in place from grads[i], for every parameter in order.
 * On an error nothing is written. */
int curv_optimizer_step(struct curv_context *context, int64_t count,
                        DLManagedTensor *const *params, DLManagedTensor *const *grads);
int64_t curv_optimizer_steps(const struct curv_context *context);
/* Starts afresh: no state, step 0 (the state is initialised at the next step). */
int curv_optimizer_reset(struct curv_context *context);
/* The optimizer state (safetensors, written atomically) and the step count. */
int curv_state_save(struct curv_context *context, const char *path);
int curv_state_load(struct curv_context *context, const char *path);
/* 1 when the optimizer state is kept where the kernels run between steps (device memory for a
 * CUDA library, whose steps on CUDA tensors then never pass through the host), 0 when it is on
 * the host or not made yet, -1 for a null context. */
int curv_state_resident(const struct curv_context *context);

/* The train step: the data fields the loss reads (SOURCE.FIELD), their batch shapes, and whether
 * each is int32 (labels) rather than float. */
int64_t curv_input_count(const struct curv_context *context);
const char *curv_input_name(const struct curv_context *context, int64_t index);
int64_t curv_input_shape(const struct curv_context *context, int64_t index, int64_t *dims, int64_t capacity,
                         int *is_integer);
/* One train step of the file's train block on the caller's batch: forward, backward, the
 * curvature statistics the optimizer needs, and the update of params (in place). `loss` (may be
 * NULL) receives the batch's loss. A context runs optimizer steps or train steps, not both. */
int curv_train_step(struct curv_context *context, int64_t param_count, DLManagedTensor *const *params,
                    int64_t input_count, DLManagedTensor *const *inputs, double *loss);

/* The model on its own (the loss's `logits` or `prediction`), for frameworks that differentiate
 * it: its data inputs (a subset of the train step's, same shapes), its output shape (-1: the loss
 * has no prediction), the forward pass into `output`, and the vector-Jacobian product of a
 * cotangent into the parameters' and float inputs' gradients (NULL entries skipped). */
int64_t curv_model_input_count(const struct curv_context *context);
const char *curv_model_input_name(const struct curv_context *context, int64_t index);
int64_t curv_model_output_shape(const struct curv_context *context, int64_t *dims, int64_t capacity);
int curv_model_forward(struct curv_context *context, int64_t param_count, DLManagedTensor *const *params,
                       int64_t input_count, DLManagedTensor *const *inputs, DLManagedTensor *output);
int curv_model_backward(struct curv_context *context, int64_t param_count, DLManagedTensor *const *params,
                        int64_t input_count, DLManagedTensor *const *inputs, DLManagedTensor *cotangent,
                        DLManagedTensor *const *param_grads, DLManagedTensor *const *input_grads);

/* The same as XLA FFI handlers (xla/ffi/api/c_api.h, API 0.3), for jax.ffi: arguments the
 * parameters, the model's inputs (and, backward, the cotangent); results the output (backward:
 * the parameters' then the float inputs' gradients). */
struct XLA_FFI_CallFrame;
void *curv_xla_model_forward(struct XLA_FFI_CallFrame *frame);
void *curv_xla_model_backward(struct XLA_FFI_CallFrame *frame);
/* The optimizer step and the train step as XLA FFI handlers, on the context named by the call's
 * 64-bit integer attribute `context` (checked to be a live context): arguments the parameters
 * then the gradients (train step: then the step's inputs); results the new parameters (train
 * step: then the loss, a scalar of the parameters' type). */
void *curv_xla_optimizer_step(struct XLA_FFI_CallFrame *frame);
void *curv_xla_train_step(struct XLA_FFI_CallFrame *frame);

#ifdef __cplusplus
}
#endif
#endif
"#;

/// The symbols a library exports (everything else is local).
const LIBRARY_EXPORTS: &[&str] = &[
    "curv_config_new",
    "curv_config_free",
    "curv_config_set",
    "curv_context_new",
    "curv_context_free",
    "curv_context_error",
    "curv_context_error_code",
    "curv_param_count",
    "curv_param_name",
    "curv_param_shape",
    "curv_optimizer_step",
    "curv_optimizer_steps",
    "curv_optimizer_reset",
    "curv_state_save",
    "curv_state_load",
    "curv_state_resident",
    "curv_input_count",
    "curv_input_name",
    "curv_input_shape",
    "curv_train_step",
    "curv_model_input_count",
    "curv_model_input_name",
    "curv_model_output_shape",
    "curv_model_forward",
    "curv_model_backward",
    "curv_xla_model_forward",
    "curv_xla_model_backward",
    "curv_xla_optimizer_step",
    "curv_xla_train_step",
];

/// `curv build --lib FILE -o DIR`: `DIR/libNAME.so` (the optimizer step and the train step of the
/// file's first train block, its kernels compiled for the block's shapes, behind the C ABI of
/// `curv_standalone::abi`), `DIR/NAME.h` and `DIR/NAME.py`, NAME being the file's stem.
fn build_library(
    file: &Path,
    directory: &Path,
    gpu: Option<curv_mlir::gpu::GpuTarget>,
) -> Result<String, (String, u8)> {
    let source = SourceFile::read(file).map_err(|message| (message, 1))?;
    let mut probe =
        RecordingProbe { inner: curv_driver::FileProbe { directory: source.directory() }, records: Vec::new() };
    let compilation = curv_driver::compile_with_probe(source, &mut probe);
    print_diagnostics(&compilation);
    if compilation.has_errors() {
        return Err(("the file has errors".to_string(), 1));
    }
    let analysis = compilation.analysis.as_ref().ok_or(("the file did not check".to_string(), 1))?;
    let program = &analysis.program;
    let train = program.trains.first().ok_or(("the file has no train block".to_string(), 1))?;
    let names: Vec<String> = train.params.iter().map(|param| param.name.clone()).collect();
    curv_runtime::optimizer::check_executable(&train.optimizer, &names).map_err(|message| (message, 1))?;
    let stem = file.file_stem().map(|stem| stem.to_string_lossy().into_owned()).unwrap_or_default();
    let name: String = stem.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
    if name.is_empty() || name.starts_with(|c: char| c.is_ascii_digit()) {
        return Err((format!("`{stem}` cannot name a library (a letter or `_` must come first)"), 1));
    }
    let library = runtime_library()?;
    let kernels = build_kernels(program, train, KernelSet::Library, None);
    std::fs::create_dir_all(directory)
        .map_err(|error| (format!("cannot create {}: {error}", directory.display()), 1))?;
    let work = std::env::temp_dir().join(format!("curv-build-lib-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|error| (format!("cannot create {}: {error}", work.display()), 2))?;
    let mut registry =
        String::from("#include <stddef.h>\n\nstruct curv_kernel { const char *key; void (*function)(void **); };\n\n");
    let locate = source_locator(&compilation);
    let CompiledKernels { declarations, entries, objects } = compile_kernels(&kernels, &work, gpu, &locate)?;
    registry.push_str(&declarations);
    let file_name = file.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
    if entries.is_empty() {
        registry
            .push_str("const struct curv_kernel curv_kernels[1] = {{0, 0}};\nconst size_t curv_kernel_count = 0;\n");
    } else {
        registry.push_str(&format!("\nconst struct curv_kernel curv_kernels[] = {{\n{}\n}};\n", entries.join(",\n")));
        registry.push_str(&format!("const size_t curv_kernel_count = {};\n", entries.len()));
    }
    registry.push_str(&format!("const char curv_program_source[] = {};\n", c_string(&compilation.source.text)));
    registry.push_str(&format!("const char curv_program_file[] = {};\n", c_string(&file_name)));
    registry.push_str(&format!(
        "const char curv_program_directory[] = \".\";\nconst int curv_device_cuda = {};\n",
        i32::from(gpu.is_some())
    ));
    let recording = curv_standalone_recording(&probe.records);
    registry.push_str(&format!("const char curv_probed_data[] = {};\n", c_string(&recording)));
    let registry_path = work.join("registry.c");
    let exports_path = work.join("exports.map");
    let exports: Vec<String> = LIBRARY_EXPORTS.iter().map(|symbol| format!("{symbol};")).collect();
    let write = |path: &Path, text: &str| {
        std::fs::write(path, text).map_err(|error| (format!("cannot write {}: {error}", path.display()), 2))
    };
    write(&registry_path, &registry)?;
    write(&exports_path, &format!("{{ global: {} local: *; }};\n", exports.join(" ")))?;
    let library_path = directory.join(format!("lib{name}.so"));
    let temporary = directory.join(format!(".lib{name}.so.{}.tmp", std::process::id()));
    let mut command = std::process::Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".to_string()));
    command.args(["-shared", "-fPIC", "-o"]).arg(&temporary).arg(&registry_path).args(&objects);
    for symbol in LIBRARY_EXPORTS {
        command.arg(format!("-Wl,-u,{symbol}"));
    }
    command.arg(&library).arg(format!("-Wl,--version-script={}", exports_path.display())).args([
        "-lm",
        "-lpthread",
        "-ldl",
        "-lgcc_s",
        "-lutil",
        "-lrt",
        "-lc",
    ]);
    let status = command.status().map_err(|error| (format!("cannot run the C compiler to link: {error}"), 2))?;
    let _ = std::fs::remove_dir_all(&work);
    if !status.success() {
        let _ = std::fs::remove_file(&temporary);
        return Err(("linking the library failed".to_string(), 2));
    }
    std::fs::rename(&temporary, &library_path)
        .map_err(|error| (format!("cannot write {}: {error}", library_path.display()), 1))?;
    let header = LIBRARY_HEADER.replace("@NAME@", &name.to_uppercase());
    write(&directory.join(format!("{name}.h")), &header).map_err(|(message, _)| (message, 1))?;
    let python = include_str!("../../../python/curv_library.py").replace("@NAME@", &name);
    write(&directory.join(format!("{name}.py")), &python).map_err(|(message, _)| (message, 1))?;
    Ok(format!("wrote {} ({} compiled kernels), {name}.h and {name}.py", library_path.display(), entries.len()))
}

/// The data-schema recording a library embeds (the format `curv_standalone::abi` reads).
fn curv_standalone_recording(records: &[(String, curv_sema::ProbedData)]) -> String {
    let mut out = String::new();
    for (name, data) in records {
        let fields: Vec<String> = data
            .fields
            .iter()
            .map(|(field, dtype, dims)| {
                let dims: Vec<String> = dims.iter().map(i64::to_string).collect();
                format!("{field}:{}:{}", dtype_name(*dtype), dims.join(","))
            })
            .collect();
        out.push_str(&format!("{name}\t{}\t{}\n", data.examples, fields.join(";")));
    }
    out
}

fn dtype_name(dtype: curv_ir::DType) -> &'static str {
    match dtype {
        curv_ir::DType::F32 => "f32",
        curv_ir::DType::F64 => "f64",
        curv_ir::DType::I32 => "i32",
    }
}

/// The runtime library trainers and libraries link (`libcurv_standalone.a`, next to `curv`).
fn runtime_library() -> Result<PathBuf, (String, u8)> {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|directory| directory.join("libcurv_standalone.a")))
        .filter(|path| path.is_file())
        .ok_or_else(|| ("the runtime library libcurv_standalone.a is not next to the curv executable; build it with `cargo build -p curv-standalone`".to_string(), 2))
}

/// Which functions `curv build` compiles ahead of time.
#[derive(Clone, Copy, PartialEq)]
enum KernelSet {
    /// A trainer's: the training step's functions, the losses it logs, the grouped rule updates.
    Trainer,
    /// A library's: the training step's functions, the model's forward and backward passes, the
    /// per-parameter rule updates of the optimizer step.
    Library,
}

/// The functions of `train` to compile, under the keys the runtime looks them up by, with the
/// bindings of their symbolic sizes.
/// A kernel of a build: its registry key, its function, its size bindings, and the standard
/// library module its source is in (a rule's functions), or `None` for the user's file.
type BuildKernel = (String, curv_ir::Function, std::collections::HashMap<String, i64>, Option<String>);

fn build_kernels(
    program: &curv_ir::Program,
    train: &curv_ir::TrainProgram,
    set: KernelSet,
    dataset: Option<&curv_runtime::Dataset>,
) -> Vec<BuildKernel> {
    use curv_runtime::backend::keys;
    let no_bindings = std::collections::HashMap::new();
    let mut kernels: Vec<BuildKernel> = Vec::new();
    let gradients = curv_ad::products::gradient_program(&train.loss, &train.params).function;
    kernels.push((keys::GRADIENTS.to_string(), gradients, no_bindings.clone(), None));
    if train.optimizer.plans.iter().any(|plan| curv_runtime::optimizer::uses_hutchinson(plan, &program.rules)) {
        kernels.push((
            keys::HESSIAN_VECTOR.to_string(),
            curv_ad::products::hvp_program(&train.loss, &train.params),
            no_bindings.clone(),
            None,
        ));
    }
    if let Ok(Some(captures)) = curv_runtime::trainer::capture_program(train) {
        kernels.push((keys::GRADIENTS_AND_CAPTURES.to_string(), captures.function, no_bindings.clone(), None));
    }
    match set {
        KernelSet::Trainer => {
            if let Some(test_loss) = &train.test_loss {
                kernels.push((keys::TEST_LOSS.to_string(), test_loss.clone(), no_bindings.clone(), None));
            }
            kernels.push((keys::LOSS.to_string(), train.loss.clone(), no_bindings.clone(), None));
        }
        KernelSet::Library => {
            if let Some(model) = curv_ad::products::model_program(&train.loss) {
                if let Some(backward) = curv_ad::products::model_vjp_program(&model, &train.params) {
                    kernels.push(("model.backward".to_string(), backward, no_bindings.clone(), None));
                }
                kernels.push(("model.forward".to_string(), model, no_bindings.clone(), None));
            }
        }
    }
    for plan in &train.optimizer.plans {
        if plan.structure != curv_ir::StructureKind::Rule {
            continue;
        }
        let Some(rule) = program.rules.iter().find(|rule| rule.name == plan.rule_name) else { continue };
        let size = train.params[plan.param].ty.element_count().unwrap_or(0) as usize;
        let bindings = std::collections::HashMap::from([("P".to_string(), size as i64)]);
        let init_key = keys::rule_init(&rule.name, size);
        if !kernels.iter().any(|(key, ..)| *key == init_key) {
            kernels.push((init_key, rule.init.clone(), bindings.clone(), rule.module.clone()));
            for (block, update) in rule.updates.iter().enumerate() {
                let key = keys::rule_block(&rule.name, block, size);
                kernels.push((key, update.function.clone(), bindings.clone(), rule.module.clone()));
            }
        }
    }
    if set == KernelSet::Library {
        // A resident optimizer step checks each new parameter, flat, where it is.
        for plan in train.optimizer.plans.iter().filter(|plan| plan.structure == curv_ir::StructureKind::Rule) {
            let size = train.params[plan.param].ty.element_count().unwrap_or(0) as usize;
            push_finiteness_kernel_of(&mut kernels, &[vec![size]]);
        }
    }
    if set == KernelSet::Trainer {
        // Parameters sharing an elementwise rule are updated by one multi-parameter kernel per block.
        let captures = curv_runtime::trainer::capture_program(train).ok().flatten();
        let groups = curv_runtime::trainer::update_groups(train, &program.rules, captures.as_ref());
        for group in &groups {
            let sizes: Vec<usize> = group
                .plans
                .iter()
                .map(|&plan| train.params[train.optimizer.plans[plan].param].ty.element_count().unwrap_or(0) as usize)
                .collect();
            let bindings: std::collections::HashMap<String, i64> = sizes
                .iter()
                .enumerate()
                .map(|(member, &size)| (curv_ir::group::member_symbol(member, "P"), size as i64))
                .collect();
            let module = program.rules.iter().find(|rule| rule.name == group.rule).and_then(|rule| rule.module.clone());
            for (block, function) in group.blocks.iter().enumerate() {
                let key = keys::rule_group_block(&group.rule, block, &sizes);
                if !kernels.iter().any(|(existing, ..)| *existing == key) {
                    kernels.push((key, function.clone(), bindings.clone(), module.clone()));
                }
            }
        }
        // Where every parameter has a rule (in a group or its own) or a structure with step
        // functions, steps can be resident (on a GPU by default): the structures' functions,
        // then the check of all the gradients and new parameters where they are, in one call
        // (with the groups, and without them for `CURV_GROUPED_UPDATES=off`).
        if let Some(shapes) = curv_runtime::trainer::resident_check_shapes(train, &groups) {
            let folded = |param: usize| {
                captures.as_ref().is_some_and(|captures| captures.folded_biases.iter().any(|(bias, _)| *bias == param))
            };
            // A bias folded into its K-FAC weight is updated by the weight's functions.
            for plan in train.optimizer.plans.iter().filter(|plan| !folded(plan.param)) {
                let Some(device) = curv_runtime::trainer::device_plan_of(train, plan, captures.as_ref()) else {
                    continue;
                };
                for part in device.all_parts() {
                    let key = device.key(&part);
                    if !kernels.iter().any(|(existing, ..)| *existing == key) {
                        // The plan's own parts always have a function.
                        if let Ok(function) = device.function(&part) {
                            kernels.push((key, function, std::collections::HashMap::new(), None));
                        }
                    }
                }
            }
            push_finiteness_kernel_of(&mut kernels, &shapes);
            push_finiteness_kernel_of(
                &mut kernels,
                &curv_runtime::trainer::resident_check_shapes(train, &[]).unwrap_or_default(),
            );
            // ... and gather their batches where the data set is.
            let fields = dataset.map(|dataset| dataset.fields.iter().map(move |field| (dataset, field)));
            for (dataset, field) in fields.into_iter().flatten().filter(|(_, field)| field.f32_values().is_some()) {
                let (examples, batch) = (dataset.examples, train.batch.max(0) as usize);
                let width: usize = field.example_shape.iter().product();
                let key = keys::batch_gather(&dataset.name, &field.name, examples, width, batch);
                let function = curv_runtime::backend::batch_gather_function(examples, &field.example_shape, batch);
                kernels.push((key, function, std::collections::HashMap::new(), None));
            }
        }
    }
    kernels
}

/// The non-finite check of tensors of `shapes`, unless the kernels have it already.
fn push_finiteness_kernel_of(kernels: &mut Vec<BuildKernel>, shapes: &[Vec<usize>]) {
    let key = curv_runtime::backend::keys::finiteness(shapes);
    if !kernels.iter().any(|(existing, ..)| *existing == key) {
        let function = curv_runtime::backend::finiteness_function(shapes);
        kernels.push((key, function, std::collections::HashMap::new(), None));
    }
}

/// Escapes bytes as a C string literal.
fn c_string(text: &str) -> String {
    let mut out = String::from("\"");
    for byte in text.bytes() {
        match byte {
            b'"' => out.push_str("\\\""),
            b'\\' => out.push_str("\\\\"),
            b' '..=b'~' => out.push(byte as char),
            other => out.push_str(&format!("\\{other:03o}")),
        }
    }
    out.push('"');
    out
}

/// The compiled kernels of a build: the registry's declarations, its entries (`curv_kernels`,
/// packed entry points under their keys) and the object files to link.
struct CompiledKernels {
    declarations: String,
    entries: Vec<String>,
    objects: Vec<PathBuf>,
}

/// The kernels of a build compiled to object files in `work`. A GPU
/// build's kernels carry their source locations (`locate`), which their PTX keeps for errors.
/// Functions with ops the lowering does not handle are left out (they run on the interpreter).
fn compile_kernels(
    kernels: &[BuildKernel],
    work: &Path,
    gpu: Option<curv_mlir::gpu::GpuTarget>,
    locate: &dyn Fn(Option<&str>, curv_grammar::Span) -> String,
) -> Result<CompiledKernels, (String, u8)> {
    let mut declarations = String::new();
    let mut entries = Vec::new();
    let mut objects = Vec::new();
    for (index, (key, function, bindings, module)) in kernels.iter().enumerate() {
        let name = format!("curv_kernel_{index}");
        let kernel_locate = |span: curv_grammar::Span| locate(module.as_deref(), span);
        let located = gpu.map(|_| &kernel_locate as &dyn Fn(curv_grammar::Span) -> String);
        let lowered = match gpu {
            None => curv_mlir::lower::lower_function_with_locations(function, &name, bindings, located),
            Some(_) => curv_mlir::lower::lower_function_for_gpu(function, &name, bindings, located),
        };
        let Ok((text, signature)) = lowered else {
            continue;
        };
        let object = work.join(format!("{name}.o"));
        let key_text = c_string(&curv_ir::abi::kernel_key(key, bindings));
        match gpu {
            None => {
                curv_mlir::jit::compile_to_object(&text, &name, &object, 2)
                    .map_err(|error| (format!("compiling `{key}`: {error}"), 2))?;
                // The C interface of a CPU kernel takes the table of its packed buffers.
                declarations.push_str(&format!("extern void _mlir_ciface_{name}(void **);\n"));
                entries.push(format!("  {{{key_text}, _mlir_ciface_{name}}}"));
            }
            Some(target) => {
                curv_mlir::jit::compile_to_object_for_cuda(&text, &object, target)
                    .map_err(|error| (format!("compiling `{key}` for {}: {error}", target.chip()), 2))?;
                // The object has the C interface (a pointer to each descriptor); the registry
                // holds packed entry points, as the CPU objects have them.
                let count = signature.arguments.len() + signature.outputs.len();
                let parameters = vec!["void *"; count].join(", ");
                let unpacked: Vec<String> = (0..count).map(|index| format!("*(void **)args[{index}]")).collect();
                declarations.push_str(&format!(
                    "extern void _mlir_ciface_{name}({parameters});\nstatic void packed_{name}(void **args) {{ _mlir_ciface_{name}({}); }}\n",
                    unpacked.join(", ")
                ));
                entries.push(format!("  {{{key_text}, packed_{name}}}"));
            }
        }
        objects.push(object);
    }
    Ok(CompiledKernels { declarations, entries, objects })
}

fn build(
    compilation: &Compilation,
    program: &curv_ir::Program,
    train_name: Option<&str>,
    output: &Path,
    gpu: Option<curv_mlir::gpu::GpuTarget>,
) -> Result<usize, (String, u8)> {
    let train = curv_driver::run::select_train(program, train_name).map_err(|error| (error.message, 1))?;
    let names: Vec<String> = train.params.iter().map(|param| param.name.clone()).collect();
    curv_runtime::optimizer::check_executable(&train.optimizer, &names).map_err(|message| (message, 1))?;
    let library = runtime_library()?;
    // The data set as it is now, for the kernels that gather a resident run's batches from it
    // (a trainer whose data set has changed size uploads its batches instead).
    let dataset = curv_runtime::Dataset::load(&train.data, &compilation.source.directory()).ok();
    let kernels = build_kernels(program, train, KernelSet::Trainer, dataset.as_ref());
    let work = std::env::temp_dir().join(format!("curv-build-{}", std::process::id()));
    std::fs::create_dir_all(&work).map_err(|error| (format!("cannot create {}: {error}", work.display()), 2))?;
    let mut registry =
        String::from("#include <stddef.h>\n\nstruct curv_kernel { const char *key; void (*function)(void **); };\n\n");
    let locate = source_locator(compilation);
    let CompiledKernels { declarations, entries, objects } = compile_kernels(&kernels, &work, gpu, &locate)?;
    registry.push_str(&declarations);
    registry.push_str(&format!("const int curv_device_cuda = {};\n", i32::from(gpu.is_some())));
    // Read by the library ABI only (a trainer checks its source against the data files).
    registry.push_str("const char curv_probed_data[] = \"\";\n");
    let directory = compilation.source.directory().canonicalize().unwrap_or_else(|_| compilation.source.directory());
    let file_name =
        compilation.source.path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_default();
    registry.push_str(&format!("\nconst struct curv_kernel curv_kernels[] = {{\n{}\n}};\n", entries.join(",\n")));
    registry.push_str(&format!("const size_t curv_kernel_count = {};\n", entries.len()));
    registry.push_str(&format!("const char curv_program_source[] = {};\n", c_string(&compilation.source.text)));
    registry.push_str(&format!("const char curv_program_file[] = {};\n", c_string(&file_name)));
    registry.push_str(&format!("const char curv_program_directory[] = {};\n", c_string(&directory.to_string_lossy())));
    registry.push_str("\nint curv_standalone_main(int argc, char **argv);\nint main(int argc, char **argv) { return curv_standalone_main(argc, argv); }\n");
    let registry_path = work.join("registry.c");
    std::fs::write(&registry_path, registry)
        .map_err(|error| (format!("cannot write {}: {error}", registry_path.display()), 2))?;
    let file_name =
        output.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_else(|| "trainer".to_string());
    let temporary = output.with_file_name(format!(".{file_name}.{}.tmp", std::process::id()));
    let status = std::process::Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".to_string()))
        .arg("-o")
        .arg(&temporary)
        .arg(&registry_path)
        .args(&objects)
        .arg(&library)
        .args(["-lm", "-lpthread", "-ldl", "-lgcc_s", "-lutil", "-lrt", "-lc"])
        .status()
        .map_err(|error| (format!("cannot run the C compiler to link: {error}"), 2))?;
    let _ = std::fs::remove_dir_all(&work);
    if !status.success() {
        let _ = std::fs::remove_file(&temporary);
        return Err(("linking the trainer failed".to_string(), 2));
    }
    std::fs::rename(&temporary, output).map_err(|error| (format!("cannot write {}: {error}", output.display()), 1))?;
    Ok(entries.len())
}
