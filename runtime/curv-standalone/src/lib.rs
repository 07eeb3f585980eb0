//! `curv-standalone` is the runtime linked into the trainers `curv build` writes. A trainer is
//! this static library, the object files of its kernels (compiled ahead of time through MLIR) and
//! a small generated C file that holds the `.curv` source and a registry of the kernels. At start
//! the trainer checks its source again (the front end is plain Rust), then trains with the same
//! flags as `curv run`, calling the registered kernels and the interpreter for anything not
//! compiled. It needs neither LLVM nor MLIR. A trainer built with `--device cuda` has kernels
//! whose host side launches PTX (embedded in their objects, loaded by static initialisers through
//! `curv-cuda`) and calls them with buffers staged in managed memory.

pub mod abi;
pub mod xla;

use clap::Parser;
use curv_interp::{Inputs, Resident, Tensor, Value};
use curv_ir::Function;
use curv_runtime::backend::{host_outputs, keep_outputs, Output};
use curv_runtime::compiled::{bindings_from_inputs, call_compiled_keeping};
use curv_runtime::Backend;
use std::ffi::{c_char, c_int, CStr};
use std::path::PathBuf;

/// One compiled kernel: its key (`curv_ir::abi::kernel_key`) and its packed entry point.
#[repr(C)]
pub struct KernelEntry {
    pub key: *const c_char,
    pub function: unsafe extern "C" fn(*mut *mut ()),
}

extern "C" {
    static curv_kernels: [KernelEntry; 0];
    static curv_kernel_count: usize;
    static curv_program_source: [c_char; 0];
    static curv_program_file: [c_char; 0];
    static curv_program_directory: [c_char; 0];
    /// 1 for a trainer built with `--device cuda`.
    static curv_device_cuda: c_int;
}

fn built_for_cuda() -> bool {
    unsafe { curv_device_cuda == 1 }
}

/// The C-interface name generated code calls for matrix products.
///
/// # Safety
///
/// Called by generated code with valid descriptors only.
#[no_mangle]
pub unsafe extern "C" fn _mlir_ciface_curv_sgemm(
    a: *const curv_runtime::gemm::StridedMemRef2,
    b: *const curv_runtime::gemm::StridedMemRef2,
    c: *mut curv_runtime::gemm::StridedMemRef2,
) {
    unsafe { curv_runtime::gemm::curv_sgemm(a, b, c) }
}

/// The C-interface name generated code calls for symmetric eigendecompositions.
///
/// # Safety
///
/// Called by generated code with valid descriptors only.
#[no_mangle]
pub unsafe extern "C" fn _mlir_ciface_curv_seigh(
    matrix: *const curv_runtime::gemm::StridedMemRef2,
    values: *mut curv_runtime::linalg::StridedMemRef1,
    vectors: *mut curv_runtime::gemm::StridedMemRef2,
) {
    unsafe { curv_runtime::linalg::curv_seigh(matrix, values, vectors) }
}

/// The C-interface name generated code calls for Cholesky factors.
///
/// # Safety
///
/// Called by generated code with valid descriptors only.
#[no_mangle]
pub unsafe extern "C" fn _mlir_ciface_curv_scholesky(
    matrix: *const curv_runtime::gemm::StridedMemRef2,
    lower: *mut curv_runtime::gemm::StridedMemRef2,
) {
    unsafe { curv_runtime::linalg::curv_scholesky(matrix, lower) }
}

/// The C-interface name generated code calls for thin QR factorisations.
///
/// # Safety
///
/// Called by generated code with valid descriptors only.
#[no_mangle]
pub unsafe extern "C" fn _mlir_ciface_curv_sqr(
    matrix: *const curv_runtime::gemm::StridedMemRef2,
    q: *mut curv_runtime::gemm::StridedMemRef2,
    r: *mut curv_runtime::gemm::StridedMemRef2,
) {
    unsafe { curv_runtime::linalg::curv_sqr(matrix, q, r) }
}

fn embedded_text(pointer: *const c_char) -> String {
    unsafe { CStr::from_ptr(pointer) }.to_string_lossy().into_owned()
}

/// Looks a kernel up in the registry the generated C file defines.
fn registered(key: &str) -> Option<unsafe extern "C" fn(*mut *mut ())> {
    let (entries, count) = unsafe { (curv_kernels.as_ptr(), curv_kernel_count) };
    (0..count)
        .map(|index| unsafe { &*entries.add(index) })
        .find(|entry| embedded_text(entry.key) == key)
        .map(|entry| entry.function)
}

/// Calls the kernels compiled ahead of time; functions without one run on the interpreter.
struct Precompiled;

impl Backend<f32> for Precompiled {
    fn name(&self) -> &'static str {
        "compiled"
    }

    fn outputs(
        &self,
        key: &str,
        function: &Function,
        inputs: &Inputs<f32>,
    ) -> Result<Vec<(String, Value<f32>)>, String> {
        host_outputs(self.outputs_keeping(key, function, inputs, &|_| false)?)
    }

    fn keeps_resident(&self) -> bool {
        built_for_cuda()
    }

    fn evaluates_natively(&self, key: &str, function: &Function, inputs: &Inputs<f32>) -> bool {
        registered(&curv_ir::abi::kernel_key(key, &bindings_from_inputs(function, inputs))).is_some()
    }

    fn outputs_keeping(
        &self,
        key: &str,
        function: &Function,
        inputs: &Inputs<f32>,
        keep: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<(String, Output<f32>)>, String> {
        let bindings = bindings_from_inputs(function, inputs);
        let Some(kernel) = registered(&curv_ir::abi::kernel_key(key, &bindings)) else {
            // The interpreter reads resident tensors through host copies; the kept outputs are
            // uploaded back.
            return keep_outputs(self, curv_runtime::Interpreter.outputs(key, function, inputs)?, keep);
        };
        let signature = curv_ir::abi::kernel_signature(function, &bindings)?;
        if built_for_cuda() {
            let size = |dtype: curv_ir::DType| if dtype == curv_ir::DType::F64 { 8 } else { 4 };
            let layouts: Vec<(Vec<i64>, usize)> = signature
                .arguments
                .iter()
                .map(|argument| (argument.shape.clone(), size(argument.dtype)))
                .chain(signature.outputs.iter().map(|(_, shape, dtype)| (shape.clone(), size(*dtype))))
                .collect();
            let first_output = signature.arguments.len();
            return call_compiled_keeping(
                &signature,
                inputs,
                keep,
                Some(&curv_cuda::allocate_resident),
                &mut |slots, on_device| {
                    // SAFETY: `call_compiled_keeping` packs descriptors of the signature's shapes,
                    // and marks those in device memory.
                    unsafe {
                        curv_cuda::call_staged(&layouts, first_output, on_device, slots, &mut |slots| {
                            kernel(slots.as_mut_ptr());
                            Ok(())
                        })
                    }
                    .map_err(|message| format!("`{key}` on the GPU: {message}"))
                },
            );
        }
        call_compiled_keeping(&signature, inputs, keep, None, &mut |slots, on_device| {
            if on_device.iter().any(|&resident| resident) {
                return Err("a CPU kernel cannot read device memory".to_string());
            }
            unsafe { kernel(slots.as_mut_ptr()) };
            Ok(())
        })
    }

    fn upload(&self, tensor: Tensor<f32>) -> Result<Resident<f32>, String> {
        match built_for_cuda() {
            true => curv_cuda::upload(tensor),
            false => Ok(Resident::host(tensor.shape, tensor.data)),
        }
    }
}

fn make_backend() -> Box<dyn Backend<f32>> {
    Box::new(Precompiled)
}

#[derive(Parser)]
#[command(about = "A trainer built by `curv build`: runs its train block as `curv run` would")]
struct Arguments {
    /// The train block to run (default: the one it was built for).
    #[arg(long)]
    train: Option<String>,
    #[arg(long)]
    steps: Option<u64>,
    #[arg(long)]
    seed: Option<u64>,
    /// Directory the data paths are relative to (default: the .curv file's directory at build time).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long)]
    init: Option<PathBuf>,
    #[arg(long)]
    resume: Option<PathBuf>,
    #[arg(long)]
    metrics: Option<PathBuf>,
    #[arg(long)]
    out: Option<PathBuf>,
    /// Run on the interpreter instead of the compiled kernels.
    #[arg(long)]
    interpret: bool,
    /// Update the parameters that share an elementwise rule with one kernel per block (`on`), or
    /// each with its own kernel (`off`), as `curv run --grouped-updates`.
    #[arg(long, value_name = "on|off", default_value = "on", value_parser = ["on", "off"])]
    grouped_updates: String,
    /// Time the compiled update of the largest rule-governed parameter (this many calls, on
    /// buffers allocated once: on the GPU for a `--device cuda` trainer) against a memory copy
    /// moving as many bytes, print both rates as JSON and exit (scripts/gpu-check.sh).
    #[arg(long, hide = true)]
    bench_update: Option<usize>,
    #[arg(long)]
    quiet: bool,
}

struct Printer {
    quiet: bool,
}

impl curv_driver::run::RunObserver for Printer {
    fn logged(&mut self, record: &curv_driver::run::LogRecord) {
        if !self.quiet {
            let values: Vec<String> = record.values.iter().map(|(name, value)| format!("{name} {value:.4}")).collect();
            println!("step {:>6}  {}", record.step, values.join("  "));
        }
    }

    fn warning(&mut self, message: &str) {
        eprintln!("warning: {message}");
    }
}

fn run(arguments: Vec<String>) -> c_int {
    let arguments = match Arguments::try_parse_from(arguments) {
        Ok(arguments) => arguments,
        Err(error) => {
            let _ = error.print();
            return if matches!(
                error.kind(),
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion
            ) {
                0
            } else {
                1
            };
        }
    };
    let text = embedded_text(unsafe { curv_program_source.as_ptr() });
    let file = embedded_text(unsafe { curv_program_file.as_ptr() });
    let directory = arguments
        .data_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(embedded_text(unsafe { curv_program_directory.as_ptr() })));
    let source = curv_driver::SourceFile::in_memory(&file, &text, &directory);
    let compilation = curv_driver::compile(source);
    if compilation.has_errors() {
        eprint!("{}", curv_driver::render_diagnostics(&compilation, false));
        return 1;
    }
    let Some(analysis) = &compilation.analysis else { return 1 };
    if built_for_cuda() && !arguments.interpret {
        match curv_cuda::probe() {
            Ok(device) => {
                if !arguments.quiet {
                    eprintln!("device: {} ({}, {} MiB)", device.name, device.chip(), device.memory_bytes >> 20);
                }
            }
            Err(error) => {
                eprintln!(
                    "error: {error} (this trainer was built with `--device cuda`; `--interpret` runs it on the CPU)"
                );
                return 1;
            }
        }
        // The kernels' PTX was loaded before `main`; a module the driver refused is reported now.
        if let Some(message) = curv_cuda::take_error() {
            eprintln!("error: {message}");
            return 2;
        }
    }
    curv_runtime::compiled::keep_large_allocations_in_the_heap();
    if let Some(calls) = arguments.bench_update {
        return match bench_update(&analysis.program, calls.max(1)) {
            Ok(report) => {
                println!("{report}");
                0
            }
            Err(message) => {
                eprintln!("error: {message}");
                2
            }
        };
    }
    let options = curv_driver::run::RunOptions {
        train: arguments.train.clone(),
        steps: arguments.steps,
        seed: arguments.seed,
        precision: curv_driver::run::Precision::F32,
        init: arguments.init.clone(),
        resume: arguments.resume.clone(),
        metrics: arguments.metrics.clone(),
        out: arguments.out.clone(),
        backend: if arguments.interpret { None } else { Some(make_backend) },
        target: None,
        stop_at_target: false,
        // The kernels were compiled with their locations (a GPU kernel's PTX names its source).
        source: None,
        grouped_updates: arguments.grouped_updates == "on",
    };
    let mut printer = Printer { quiet: arguments.quiet };
    match curv_driver::run::run_program(&analysis.program, &directory, &options, &mut printer) {
        Ok(summary) => {
            if !arguments.quiet {
                let values: Vec<String> =
                    summary.final_values.iter().map(|(name, value)| format!("{name} {value:.4}")).collect();
                println!(
                    "done: {} steps, {}, median step {:.2} ms",
                    summary.steps,
                    values.join(", "),
                    summary.step_ms_median
                );
            }
            0
        }
        Err(error) => {
            eprintln!("error: {}", error.message);
            if error.user {
                1
            } else {
                2
            }
        }
    }
}

/// The achieved bandwidth of the compiled rule update of the largest rule-governed parameter
/// (bytes of every tensor argument read once and every output written once, per second) and of a
/// plain copy moving as many bytes, as JSON. A `--device cuda` trainer times the kernel on
/// managed buffers moved to the GPU once, against a device-to-device copy; a CPU trainer on host
/// buffers against `memcpy`.
fn bench_update(program: &curv_ir::Program, calls: usize) -> Result<String, String> {
    let train = program.trains.first().ok_or("no train block")?;
    let (plan, size) = train
        .optimizer
        .plans
        .iter()
        .filter(|plan| plan.structure == curv_ir::StructureKind::Rule)
        .map(|plan| (plan, train.params[plan.param].ty.element_count().unwrap_or(0) as usize))
        .max_by_key(|(_, size)| *size)
        .ok_or("the optimizer has no rule-governed parameter")?;
    let rule = program.rules.iter().find(|rule| rule.name == plan.rule_name).ok_or("the rule is missing")?;
    let bindings = std::collections::HashMap::from([("P".to_string(), size as i64)]);
    let key = curv_runtime::backend::keys::rule_block(&rule.name, 0, size);
    let kernel = registered(&curv_ir::abi::kernel_key(&key, &bindings)).ok_or(format!("no compiled kernel `{key}`"))?;
    let signature = curv_ir::abi::kernel_signature(&rule.updates[0].function, &bindings)?;
    let shapes: Vec<Vec<i64>> = signature
        .arguments
        .iter()
        .map(|argument| argument.shape.clone())
        .chain(signature.outputs.iter().map(|(_, shape, _)| shape.clone()))
        .collect();
    let bytes_of = |shape: &[i64]| shape.iter().product::<i64>().max(1) as usize * 4;
    let tensors = shapes.iter().filter(|shape| !shape.is_empty()).count();
    let moved = (tensors * size * 4) as f64;
    let cuda = built_for_cuda();
    // Buffers: managed memory on the GPU, vectors on the CPU; small positive values.
    let mut host: Vec<Vec<f32>> = Vec::new();
    let mut managed: Vec<curv_cuda::ManagedBuffer> = Vec::new();
    let mut pointers = Vec::new();
    for shape in &shapes {
        let count = bytes_of(shape) / 4;
        let values = vec![0.5f32; count];
        if cuda {
            let bytes: Vec<u8> = values.iter().flat_map(|value| value.to_ne_bytes()).collect();
            let buffer = curv_cuda::ManagedBuffer::copy_of(&bytes).map_err(|error| error.to_string())?;
            pointers.push(buffer.as_mut_ptr());
            managed.push(buffer);
        } else {
            host.push(values);
            pointers.push(host.last_mut().map_or(std::ptr::null_mut(), |values| values.as_mut_ptr() as *mut u8));
        }
    }
    if cuda {
        curv_cuda::prefetch_to_device(&managed);
    }
    let mut descriptors: Vec<Vec<i64>> = pointers
        .iter()
        .zip(&shapes)
        .map(|(pointer, shape)| curv_runtime::compiled::descriptor(*pointer, shape))
        .collect();
    let mut descriptor_pointers: Vec<*mut i64> = descriptors.iter_mut().map(|words| words.as_mut_ptr()).collect();
    let mut slots: Vec<*mut ()> =
        descriptor_pointers.iter_mut().map(|pointer| pointer as *mut *mut i64 as *mut ()).collect();
    let time_calls = |slots: &mut [*mut ()]| -> Result<f64, String> {
        let mut call = || -> Result<(), String> {
            unsafe { kernel(slots.as_mut_ptr()) };
            if cuda {
                curv_cuda::synchronize().map_err(|error| error.to_string())?;
                if let Some(message) = curv_cuda::take_error() {
                    return Err(message);
                }
            }
            Ok(())
        };
        // Calls for a fifth of a second first, so that the GPU's clocks have risen from idle.
        let warming = std::time::Instant::now();
        while warming.elapsed().as_secs_f64() < 0.2 {
            call()?;
        }
        let mut times = Vec::with_capacity(calls);
        for _ in 0..calls + 3 {
            let started = std::time::Instant::now();
            call()?;
            times.push(started.elapsed().as_secs_f64());
        }
        times.drain(..3);
        times.sort_by(f64::total_cmp);
        Ok(times[times.len() / 2])
    };
    let update_seconds = time_calls(&mut slots)?;
    // The copy moves as many bytes as the update (reads and writes together), so that both
    // rates pay the same fixed cost of a call.
    let copied = tensors * size / 2;
    let copy_seconds = if cuda {
        curv_cuda::copy_seconds(copied * 4, calls).map_err(|error| error.to_string())?
    } else {
        let source = vec![1.0f32; copied];
        let mut destination = vec![0.0f32; copied];
        let mut times = Vec::with_capacity(calls);
        for _ in 0..calls {
            let started = std::time::Instant::now();
            destination.copy_from_slice(&source);
            times.push(started.elapsed().as_secs_f64());
        }
        std::hint::black_box(&destination);
        times.sort_by(f64::total_cmp);
        times[times.len() / 2]
    };
    Ok(format!(
        "{{\"rule\": \"{}\", \"parameter\": \"{}\", \"elements\": {size}, \"device\": \"{}\", \"update_gbytes_per_second\": {:.3}, \"copy_gbytes_per_second\": {:.3}}}",
        rule.name,
        train.params[plan.param].name,
        if cuda { "cuda" } else { "cpu" },
        moved / update_seconds / 1e9,
        (2 * copied * 4) as f64 / copy_seconds / 1e9
    ))
}

/// The trainer's entry point, called by the generated `main`.
///
/// # Safety
///
/// `argv` must hold `argc` valid C strings, as `main` receives them.
#[no_mangle]
pub unsafe extern "C" fn curv_standalone_main(argc: c_int, argv: *const *const c_char) -> c_int {
    let arguments: Vec<String> =
        (0..argc.max(0) as usize).map(|index| embedded_text(unsafe { *argv.add(index) })).collect();
    std::panic::set_hook(Box::new(|info| eprintln!("error: internal error: {info}")));
    let status = std::panic::catch_unwind(|| run(arguments)).unwrap_or(2);
    // Where the host's time went on the GPU, when asked for (scripts/gpu-check.sh asks).
    if built_for_cuda() && std::env::var_os("CURV_CUDA_PROFILE").is_some() {
        eprint!("{}", curv_cuda::profile_report());
    }
    status
}
