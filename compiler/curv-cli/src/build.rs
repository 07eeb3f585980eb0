//! `curv build`: a standalone trainer or, with `--lib`, a library with a C ABI (and its PyTorch
//! and JAX wrappers). Every kernel the trainer evaluates is compiled to an object file, a C
//! registry names them and embeds the source, and both are linked with the standalone runtime.

use super::*;

/// `curv build`: compiles every kernel the train block's trainer evaluates to an object file,
/// writes the registry that names them and embeds the source, and links both with the standalone
/// runtime library (`libcurv_standalone.a`, found next to the `curv` executable).
pub(super) fn build_command(
    file: &Path,
    output: &Path,
    train_name: Option<&str>,
    device: &str,
    gpu: &str,
    lib: bool,
) -> ExitCode {
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
pub(super) struct RecordingProbe {
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
pub(super) const LIBRARY_HEADER: &str = r#"/* The C ABI of a curv library (`curv build --lib`), in the style of Futhark's generated API:
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
pub(super) const LIBRARY_EXPORTS: &[&str] = &[
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
pub(super) fn build_library(
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
pub(super) fn curv_standalone_recording(records: &[(String, curv_sema::ProbedData)]) -> String {
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

pub(super) fn dtype_name(dtype: curv_ir::DType) -> &'static str {
    match dtype {
        curv_ir::DType::F32 => "f32",
        curv_ir::DType::F64 => "f64",
        curv_ir::DType::I32 => "i32",
    }
}

/// The runtime library trainers and libraries link (`libcurv_standalone.a`, next to `curv`).
pub(super) fn runtime_library() -> Result<PathBuf, (String, u8)> {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|directory| directory.join("libcurv_standalone.a")))
        .filter(|path| path.is_file())
        .ok_or_else(|| ("the runtime library libcurv_standalone.a is not next to the curv executable; build it with `cargo build -p curv-standalone`".to_string(), 2))
}

/// Which functions `curv build` compiles ahead of time.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum KernelSet {
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
pub(super) type BuildKernel = (String, curv_ir::Function, std::collections::HashMap<String, i64>, Option<String>);

pub(super) fn build_kernels(
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
        // (with the groups, and without them for `--grouped-updates off`).
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
pub(super) fn push_finiteness_kernel_of(kernels: &mut Vec<BuildKernel>, shapes: &[Vec<usize>]) {
    let key = curv_runtime::backend::keys::finiteness(shapes);
    if !kernels.iter().any(|(existing, ..)| *existing == key) {
        let function = curv_runtime::backend::finiteness_function(shapes);
        kernels.push((key, function, std::collections::HashMap::new(), None));
    }
}

/// Escapes bytes as a C string literal.
pub(super) fn c_string(text: &str) -> String {
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
pub(super) struct CompiledKernels {
    declarations: String,
    entries: Vec<String>,
    objects: Vec<PathBuf>,
}

/// The kernels of a build compiled to object files in `work`. A GPU
/// build's kernels carry their source locations (`locate`), which their PTX keeps for errors.
/// Functions with ops the lowering does not handle are left out (they run on the interpreter).
pub(super) fn compile_kernels(
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

pub(super) fn build(
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
