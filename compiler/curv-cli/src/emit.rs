//! `curv emit`: one stage of the compiler printed, from the tokens to the MLIR of every train block,
//! its tiled and LLVM forms and its PTX.

use super::*;

pub(super) fn emit(file: &Path, stage_name: &str, output: Option<&Path>, gpu: &str, timings: bool) -> ExitCode {
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

/// The MLIR of every train block, or its lowering to the LLVM dialect.
/// What `emit` prints of the compiled modules.
#[derive(Clone, Copy)]
pub(super) enum CompiledStage {
    Mlir,
    /// The modules after the CPU pipeline's tiling and vectorisation schedule.
    Tiled,
    Llvm,
    Ptx(curv_mlir::gpu::GpuTarget),
}

/// An MLIR location (`"file":line:column`) for a span of the user's file or, given its name, of a
/// standard library module.
pub(super) fn source_locator(compilation: &Compilation) -> impl Fn(Option<&str>, curv_grammar::Span) -> String + '_ {
    let locations = curv_driver::SourceLocations::new(&compilation.source);
    move |module: Option<&str>, span: curv_grammar::Span| locations.location(&compilation.source, module, span.start)
}

pub(super) fn emit_compiled(compilation: &Compilation, mode: CompiledStage) -> Result<String, String> {
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
