//! Compiling lowered modules for the CPU and calling them: the pass pipeline down to the LLVM
//! dialect, a check that nothing else is left (an execution engine on a module that is not fully
//! lowered crashes the process), and calls through the C interface with memref descriptors.

use crate::lower::Signature;
use crate::{new_context, MlirError};
use melior::{
    ir::{operation::OperationLike, Module},
    pass::PassManager,
    utility::parse_pass_pipeline,
    ExecutionEngine,
};

/// The first part of the CPU pipeline, on tensors: MLIR's elementwise fusion (a rule's whole
/// update becomes one op), then the module's schedule (see `lower::schedule`): the marked
/// generics are tiled and their tiles become vector code.
pub const CPU_SCHEDULE_PIPELINE: &str = "builtin.module(\
canonicalize,\
func.func(linalg-fuse-elementwise-ops),\
canonicalize,\
transform-interpreter,\
canonicalize)";

/// The rest of the CPU pipeline, after the schedule is erased: masked vector ops made explicit,
/// bufferisation (writing results straight into the destination buffers), the remaining linalg
/// ops to loops, and everything to the LLVM dialect.
pub const CPU_LOWERING_PIPELINE: &str = "builtin.module(\
func.func(lower-vector-mask),\
canonicalize,\
eliminate-empty-tensors,\
one-shot-bufferize{bufferize-function-boundaries=false},\
buffer-deallocation-pipeline,\
func.func(convert-linalg-to-loops),\
convert-vector-to-scf,\
convert-scf-to-cf,\
expand-strided-metadata,\
lower-affine,\
finalize-memref-to-llvm,\
convert-math-to-llvm,\
convert-math-to-libm,\
convert-vector-to-llvm,\
convert-to-llvm,\
reconcile-unrealized-casts)";

/// Runs `pipeline` on `module`.
fn run_passes(context: &melior::Context, module: &mut Module, pipeline: &str, stage: &str) -> Result<(), MlirError> {
    let pass_manager = PassManager::new(context);
    parse_pass_pipeline(pass_manager.as_operation_pass_manager(), pipeline)
        .map_err(|error| MlirError { message: format!("bad pass pipeline: {error}") })?;
    pass_manager.run(module).map_err(|error| MlirError { message: format!("the {stage} failed: {error}") })?;
    if !module.as_operation().verify() {
        return Err(MlirError { message: format!("the module does not verify after the {stage}") });
    }
    Ok(())
}

/// The CPU pipeline on a parsed module: the schedule stage (its interpreter only when the module
/// has a schedule), the schedule erased, then the lowering stage.
pub fn run_cpu_pipeline(context: &melior::Context, module: &mut Module) -> Result<(), MlirError> {
    run_schedule_stage(context, module)?;
    run_passes(context, module, CPU_LOWERING_PIPELINE, "CPU pipeline")
}

/// The schedule stage of the CPU pipeline, then the schedule erased.
fn run_schedule_stage(context: &melior::Context, module: &mut Module) -> Result<(), MlirError> {
    let has_schedule = crate::has_schedule(module);
    let schedule_pipeline = if has_schedule {
        CPU_SCHEDULE_PIPELINE.to_string()
    } else {
        CPU_SCHEDULE_PIPELINE.replace("transform-interpreter,", "")
    };
    run_passes(context, module, &schedule_pipeline, "tiling and vectorisation schedule")?;
    crate::erase_schedule(module);
    Ok(())
}

/// Runs the schedule stage of the CPU pipeline on MLIR text and returns the module with its
/// marked generics tiled into `scf.for` loops over vector code (`curv emit --stage tiled`).
pub fn schedule_text(source: &str) -> Result<String, MlirError> {
    let context = new_context();
    let mut module = crate::parse_verified(&context, source)?;
    run_schedule_stage(&context, &mut module)?;
    Ok(module.as_operation().to_string())
}

/// Lowers MLIR text (a module `lower` wrote, schedule included) through the CPU pipeline to the
/// LLVM dialect and returns the result's text (`curv emit --stage llvm`, snapshot tests).
pub fn lower_text_for_cpu(source: &str) -> Result<String, MlirError> {
    let context = new_context();
    let mut module = crate::parse_verified(&context, source)?;
    run_cpu_pipeline(&context, &mut module)?;
    Ok(module.as_operation().to_string())
}

/// Dialect prefixes that must not survive lowering.
const UNLOWERED: &[&str] = &[
    "func.func",
    "arith.",
    "linalg.",
    "memref.",
    "scf.",
    "cf.",
    "math.",
    "tensor.",
    "bufferization.",
    "vector.",
    "affine.",
];

/// Runs `pipeline` on MLIR text and returns the lowered module's text.
pub fn lower_text(source: &str, pipeline: &str) -> Result<String, MlirError> {
    crate::run_pipeline_on_text(source, pipeline)
}

/// Where a compiled function runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    /// A CUDA GPU: kernels launched through `curv-cuda`, buffers staged in managed memory.
    Cuda,
}

/// A function compiled by the execution engine.
pub struct CompiledFunction {
    // The engine is declared first so it is dropped before the context it was built in.
    engine: ExecutionEngine,
    _context: melior::Context,
    name: String,
    pub signature: Signature,
    pub device: Device,
}

impl std::fmt::Debug for CompiledFunction {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("CompiledFunction").field("name", &self.name).finish()
    }
}

/// Parses and verifies `source`, runs the CPU pipeline, verifies the result and checks that only
/// the LLVM dialect is left: the one way to a module an execution engine may be built on (an
/// engine on a module that is not fully lowered crashes the process).
fn lower_to_llvm<'c>(context: &'c melior::Context, source: &str) -> Result<Module<'c>, MlirError> {
    let mut module = Module::parse(context, source)
        .ok_or_else(|| MlirError { message: "MLIR could not parse the lowered module".to_string() })?;
    if !module.as_operation().verify() {
        return Err(MlirError { message: "the lowered module does not verify".to_string() });
    }
    run_cpu_pipeline(context, &mut module)?;
    let text = module.as_operation().to_string();
    if let Some(prefix) = UNLOWERED.iter().find(|prefix| text.contains(&format!(" {prefix}"))) {
        return Err(MlirError {
            message: format!("the module is not fully lowered to the LLVM dialect (`{prefix}` remains)"),
        });
    }
    Ok(module)
}

/// Lowers `source` and writes the machine code of function `name` as a relocatable object file,
/// for `curv build`. The object defines the C interface `_mlir_ciface_NAME(void **table)` (the
/// packed buffers of `lower::EntryAbi::Table`) and `NAME`; it calls `_mlir_ciface_curv_sgemm` when the
/// function has matrix products, which the program it is linked into must define.
pub fn compile_to_object(
    source: &str,
    name: &str,
    path: &std::path::Path,
    optimization_level: usize,
) -> Result<(), MlirError> {
    check_table_entry(source, name)?;
    let context = new_context();
    let module = lower_to_llvm(&context, source)?;
    let engine = ExecutionEngine::new(&module, optimization_level, &[], true, true);
    register_runtime_functions(&engine);
    // Looking the function up makes the engine compile it; only then is there an object to dump.
    if engine.lookup(&format!("_mlir_ciface_{name}")).is_null() {
        return Err(MlirError { message: format!("the compiled module has no function `{name}`") });
    }
    let path_text =
        path.to_str().ok_or_else(|| MlirError { message: format!("{} is not a UTF-8 path", path.display()) })?;
    engine.dump_to_object_file(path_text);
    if !path.is_file() {
        return Err(MlirError { message: format!("no object file was written to {}", path.display()) });
    }
    Ok(())
}

/// [`compile_to_object`] for a CUDA GPU of `target`: the host side of the module as machine code
/// for this machine, with its kernels' PTX embedded and a static initialiser (`.init_array`) that
/// loads it through `mgpuModuleLoadJIT` when the program starts. An execution engine would turn
/// the initialiser into a function of its own, so this object comes from translating the module
/// to LLVM IR and running LLVM's code generator directly. The object defines the C interface
/// `_mlir_ciface_NAME` (a pointer to each memref descriptor).
pub fn compile_to_object_for_cuda(
    source: &str,
    path: &std::path::Path,
    target: crate::gpu::GpuTarget,
) -> Result<(), MlirError> {
    let context = new_context();
    let lowered = crate::gpu::lower_for_cuda(source, target)?;
    let module = crate::parse_verified(&context, &lowered)?;
    check_fully_lowered(&module.as_operation().to_string(), &["gpu.launch_func", "gpu.binary"])?;
    crate::object::emit_object(&module, path)
}

/// Lowers `source` (a module with function `name`) for the CPU and creates an execution engine.
pub fn compile(
    source: &str,
    name: &str,
    signature: Signature,
    optimization_level: usize,
) -> Result<CompiledFunction, MlirError> {
    check_table_entry(source, name)?;
    let context = new_context();
    let engine = {
        let module = lower_to_llvm(&context, source)?;
        let engine = ExecutionEngine::new(&module, optimization_level, &[], false, false);
        // The runtime functions generated code calls; they must be known before the first call.
        register_runtime_functions(&engine);
        engine
    };
    Ok(CompiledFunction { engine, _context: context, name: name.to_string(), signature, device: Device::Cpu })
}

/// Lowers `source` for a CUDA GPU of `target` (kernels as PTX, launched from the host side) and
/// creates an execution engine whose GPU runtime functions are `curv-cuda`'s. No GPU is needed to
/// compile; calling the function without one returns the "no CUDA device" error.
pub fn compile_for_cuda(
    source: &str,
    name: &str,
    signature: Signature,
    target: crate::gpu::GpuTarget,
    optimization_level: usize,
) -> Result<CompiledFunction, MlirError> {
    let context = new_context();
    let engine = {
        let lowered = crate::gpu::lower_for_cuda(source, target)?;
        let module = crate::parse_verified(&context, &lowered)?;
        check_fully_lowered(&module.as_operation().to_string(), &["gpu.launch_func", "gpu.binary"])?;
        let engine = ExecutionEngine::new(&module, optimization_level, &[], false, false);
        // The GPU module's constructor loads its PTX at the first call, through these.
        for function in curv_runtime::linalg::runtime_functions() {
            if function.name != "curv_sgemm" {
                unsafe {
                    engine.register_symbol(&format!("_mlir_ciface_{}", function.name), function.address as *mut ())
                };
            }
        }
        for (symbol, address) in curv_cuda::runtime_symbols() {
            unsafe { engine.register_symbol(symbol, address) };
        }
        engine
    };
    Ok(CompiledFunction { engine, _context: context, name: name.to_string(), signature, device: Device::Cuda })
}

/// Fails unless function `name` of `source` takes the table of its buffers (`EntryAbi::Table`),
/// the one way the CPU calls it: a function taking descriptors would read the table as one.
fn check_table_entry(source: &str, name: &str) -> Result<(), MlirError> {
    if source.contains(&format!("func.func @{name}(%table: !llvm.ptr)")) {
        Ok(())
    } else {
        Err(MlirError {
            message: format!(
                "`{name}` does not take a table of its buffers (lower it with `EntryAbi::Table` for the CPU)"
            ),
        })
    }
}

/// Fails when the printed module still has operations of a dialect other than LLVM, except the
/// `allowed` ones (the GPU launches and binaries the translation to LLVM IR handles).
fn check_fully_lowered(text: &str, allowed: &[&str]) -> Result<(), MlirError> {
    for line in text.lines() {
        let trimmed = line.trim_start();
        let operation = trimmed.split_once(" = ").map(|(_, rest)| rest).unwrap_or(trimmed);
        if allowed.iter().any(|name| operation.starts_with(name)) {
            continue;
        }
        if let Some(prefix) = UNLOWERED.iter().find(|prefix| operation.starts_with(*prefix)) {
            return Err(MlirError {
                message: format!("the module is not fully lowered to the LLVM dialect (`{prefix}` remains)"),
            });
        }
    }
    Ok(())
}

/// Makes the runtime functions generated code may call (the GEMM and the matrix decompositions of
/// `curv_runtime::linalg`) known to the engine under their C-interface names.
fn register_runtime_functions(engine: &ExecutionEngine) {
    for function in curv_runtime::linalg::runtime_functions() {
        // The address is that of an `extern "C"` function of the runtime, which lives as long as
        // the process.
        unsafe { engine.register_symbol(&format!("_mlir_ciface_{}", function.name), function.address as *mut ()) };
    }
}

/// A buffer handed to a compiled function.
pub enum Buffer<'a> {
    F32(&'a mut [f32]),
    I32(&'a mut [i32]),
}

impl<'a> Buffer<'a> {
    /// The data of an interpreter value, float or integer.
    pub fn of(value: &'a mut curv_interp::Value<f32>) -> Buffer<'a> {
        match value {
            curv_interp::Value::Real(tensor) => Buffer::F32(&mut tensor.data),
            curv_interp::Value::Int(tensor) => Buffer::I32(&mut tensor.data),
        }
    }

    fn pointer(&mut self) -> *mut u8 {
        match self {
            Buffer::F32(data) => data.as_mut_ptr() as *mut u8,
            Buffer::I32(data) => data.as_mut_ptr() as *mut u8,
        }
    }

    fn len(&self) -> usize {
        match self {
            Buffer::F32(data) => data.len(),
            Buffer::I32(data) => data.len(),
        }
    }
}

impl CompiledFunction {
    /// Calls the function with packed arguments: one pointer per argument then per output, each
    /// pointing at the pointer to a memref descriptor (see `curv_runtime::compiled`).
    pub fn call_packed(&self, slots: &mut [*mut ()]) -> Result<(), MlirError> {
        self.call_packed_resident(slots, &vec![false; slots.len()])
    }

    /// [`CompiledFunction::call_packed`] where `on_device` marks the buffers already in device
    /// memory (resident tensors), which a GPU call uses where they are. A CPU function takes none.
    pub fn call_packed_resident(&self, slots: &mut [*mut ()], on_device: &[bool]) -> Result<(), MlirError> {
        if self.device != Device::Cuda && on_device.iter().any(|&resident| resident) {
            return Err(MlirError { message: format!("`{}` runs on the CPU, not on device memory", self.name) });
        }
        let expected = self.signature.arguments.len() + self.signature.outputs.len();
        if slots.len() != expected {
            return Err(MlirError {
                message: format!("`{}` takes {expected} arguments, got {}", self.name, slots.len()),
            });
        }
        if self.device == Device::Cuda {
            return self.call_packed_on_gpu(slots, on_device);
        }
        self.call_table(slots)
    }

    /// Calls a CPU function, which takes one argument: the table of its buffers
    /// (`lower::EntryAbi::Table`). `invoke_packed` takes a pointer to each argument.
    fn call_table(&self, slots: &mut [*mut ()]) -> Result<(), MlirError> {
        let mut table = slots.as_mut_ptr() as *mut ();
        let mut arguments = [&mut table as *mut *mut () as *mut ()];
        unsafe { self.engine.invoke_packed(&self.name, &mut arguments) }
            .map_err(|error| MlirError { message: format!("calling `{}`: {error}", self.name) })
    }

    /// The shapes and element sizes of the arguments then the outputs.
    fn buffer_layouts(&self) -> Vec<(Vec<i64>, usize)> {
        let size = |dtype: curv_ir::DType| if dtype == curv_ir::DType::F64 { 8 } else { 4 };
        self.signature
            .arguments
            .iter()
            .map(|argument| (argument.shape.clone(), size(argument.dtype)))
            .chain(self.signature.outputs.iter().map(|(_, shape, dtype)| (shape.clone(), size(*dtype))))
            .collect()
    }

    /// A call on the GPU, through `curv_cuda::call_staged`.
    fn call_packed_on_gpu(&self, slots: &mut [*mut ()], on_device: &[bool]) -> Result<(), MlirError> {
        let layouts = self.buffer_layouts();
        let first_output = self.signature.arguments.len();
        // SAFETY: the slots are packed memref descriptors of the signature's shapes.
        unsafe {
            curv_cuda::call_staged(&layouts, first_output, on_device, slots, &mut |slots| {
                self.engine.invoke_packed(&self.name, slots).map_err(|error| error.to_string())
            })
        }
        .map_err(|message| MlirError { message: format!("calling `{}` on the GPU: {message}", self.name) })
    }

    /// Calls the function with its arguments then its outputs, in signature order. Buffer sizes
    /// are checked against the signature before the call.
    pub fn call(&self, buffers: &mut [Buffer]) -> Result<(), MlirError> {
        let expected: Vec<&[i64]> = self
            .signature
            .arguments
            .iter()
            .map(|argument| argument.shape.as_slice())
            .chain(self.signature.outputs.iter().map(|(_, shape, _)| shape.as_slice()))
            .collect();
        if expected.len() != buffers.len() {
            return Err(MlirError {
                message: format!("`{}` takes {} buffers, got {}", self.name, expected.len(), buffers.len()),
            });
        }
        let mut descriptors = Vec::with_capacity(buffers.len());
        for (buffer, shape) in buffers.iter_mut().zip(&expected) {
            let count: i64 = shape.iter().product();
            if buffer.len() as i64 != count {
                return Err(MlirError {
                    message: format!("`{}`: a buffer of {} elements where {count} are needed", self.name, buffer.len()),
                });
            }
            descriptors.push(curv_runtime::compiled::descriptor(buffer.pointer(), shape));
        }
        let mut descriptor_pointers: Vec<*mut i64> =
            descriptors.iter_mut().map(|descriptor| descriptor.as_mut_ptr()).collect();
        let mut slots: Vec<*mut ()> =
            descriptor_pointers.iter_mut().map(|pointer| pointer as *mut *mut i64 as *mut ()).collect();
        // The C interface takes a pointer to each memref descriptor; `invoke_packed` takes a
        // pointer to each argument, hence a pointer to the descriptor pointer.
        if self.device == Device::Cuda {
            return self.call_packed_on_gpu(&mut slots, &vec![false; buffers.len()]);
        }
        self.call_table(&mut slots)
    }
}
