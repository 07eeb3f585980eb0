//! The C ABI of a library `curv build --lib` writes, in the style of Futhark's generated C API:
//! a configuration, a context made from it, entry points that return an integer error code
//! ([`CURV_OK`], ...) with the context's error string for the details, tensors passed as DLPack
//! `DLManagedTensor`s. The context holds the program (the `.curv` source embedded in the library,
//! checked again, with the data schemas recorded at build time) and each parameter's optimizer
//! state; `curv_optimizer_step` applies one step of the file's optimizer to the caller's
//! parameters, in place, given their gradients. `f32` tensors run the kernels compiled into the
//! library, `f64` tensors the interpreter. Every argument is validated (null pointers, count,
//! device, dtype, shape, strides, alignment) before anything is read or written, and no Rust
//! panic crosses the boundary.

use crate::{embedded_text, make_backend};
use curv_interp::{LentStorage, Resident, Storage, Tensor, TensorRef};
use curv_ir::{DType, Program, StructureKind};
use curv_runtime::optimizer::{update_param, ParamState, UpdateInputs};
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr, CString};

mod dlpack;
mod model;
mod step;
mod train;

pub use dlpack::*;
pub use model::*;
use step::*;
pub use train::curv_train_step;
use train::*;

/// Success.
pub const CURV_OK: c_int = 0;
/// An argument was refused (null, count, device, dtype, shape, strides, alignment, name).
pub const CURV_INVALID_ARGUMENT: c_int = 1;
/// The step itself failed (a non-finite value, a failed decomposition, ...).
pub const CURV_RUNTIME_ERROR: c_int = 2;
/// The context could not be made (the embedded program does not check, or its optimizer needs
/// the model, which the optimizer step does not have).
pub const CURV_CONTEXT_ERROR: c_int = 3;

extern "C" {
    /// The data schemas recorded when the library was built (`name\texamples\tfield:dtype:d0,d1;...`).
    static curv_probed_data: [c_char; 0];
}

/// Options a context is made with.
#[derive(Default)]
pub struct Config {
    learning_rate: Option<f64>,
}

enum States {
    Empty,
    F32(Vec<ParamState<f32>>),
    F64(Vec<ParamState<f64>>),
    /// Read by `curv_state_load` into a context that has not stepped: it takes the element type
    /// of the first step's tensors.
    Loaded(Vec<ParamState<f64>>),
    /// `f32` states kept where the kernels run (device memory for a CUDA library) by resident
    /// steps ([`step_resident`]).
    Resident(Vec<Vec<(String, Resident<f32>)>>),
}

impl States {
    /// The states with resident ones brought to the host (`F32`); nothing changes on an error.
    fn on_host(&mut self) -> Result<(), String> {
        if let States::Resident(resident) = self {
            *self = States::F32(curv_runtime::optimizer::map_states(resident, Resident::to_tensor)?);
        }
        Ok(())
    }
}

fn convert<A: curv_interp::Real, B: curv_interp::Real>(states: &[ParamState<A>]) -> Vec<ParamState<B>> {
    states
        .iter()
        .map(|state| {
            state
                .iter()
                .map(|(name, tensor)| {
                    let data = tensor.data.iter().map(|value| B::from_f64(value.to_f64())).collect();
                    (name.clone(), Tensor::new(tensor.shape.clone(), data))
                })
                .collect()
        })
        .collect()
}

/// The trainer of a context's train steps, in the element type of its first step.
enum TrainerSlot {
    None,
    F32(Box<curv_runtime::trainer::Trainer<f32>>),
    F64(Box<curv_runtime::trainer::Trainer<f64>>),
}

/// One data field the loss reads: `(source, field)`, its dtype and its batch shape.
struct InputField {
    source: String,
    field: String,
    dtype: DType,
    shape: Vec<usize>,
    name: CString,
}

pub struct Context {
    program: Option<Program>,
    train: usize,
    learning_rate: Option<f64>,
    step: u64,
    states: States,
    error: Option<CString>,
    names: Vec<CString>,
    inputs: Vec<InputField>,
    trainer: TrainerSlot,
    /// Why the optimizer step cannot run this program (it needs the model), if so.
    needs_model: Option<String>,
    /// The model on its own, when the loss has a prediction output.
    model: Option<ModelPrograms>,
}

/// The model's forward and its vector-Jacobian product (`curv_ad::products::model_program`).
struct ModelPrograms {
    forward: curv_ir::Function,
    backward: curv_ir::Function,
    inputs: Vec<InputField>,
    output_shape: Vec<usize>,
}

fn input_fields(function: &curv_ir::Function) -> Vec<InputField> {
    let mut fields: Vec<InputField> = Vec::new();
    for inst in &function.insts {
        if let curv_ir::Op::Data { source, field } = &inst.op {
            if !fields.iter().any(|input| input.source == *source && input.field == *field) {
                fields.push(InputField {
                    source: source.clone(),
                    field: field.clone(),
                    dtype: inst.ty.dtype,
                    shape: inst.ty.shape.iter().map(|dim| known_size(dim) as usize).collect(),
                    name: CString::new(format!("{source}.{field}")).unwrap_or_default(),
                });
            }
        }
    }
    fields
}

/// A schema probe answering from the recording embedded at build time.
struct RecordedProbe(HashMap<String, curv_sema::ProbedData>);

impl curv_sema::DataProbe for RecordedProbe {
    fn probe(&mut self, request: &curv_sema::DataRequest) -> Result<curv_sema::ProbedData, curv_sema::DataProbeError> {
        self.0.get(&request.name).cloned().ok_or_else(|| curv_sema::DataProbeError {
            path_key: request.paths.first().map(|(key, _)| key.clone()).unwrap_or_default(),
            not_found: true,
            message: format!("the data set `{}` was not recorded when the library was built", request.name),
        })
    }
}

/// Parses the recording `curv build --lib` embeds (see [`curv_probed_data`]; the CLI writes it).
pub fn parse_recording(text: &str) -> HashMap<String, curv_sema::ProbedData> {
    let mut out = HashMap::new();
    for line in text.lines().filter(|line| !line.is_empty()) {
        let mut parts = line.split('\t');
        let (Some(name), Some(examples), fields) = (parts.next(), parts.next(), parts.next().unwrap_or("")) else {
            continue;
        };
        let fields = fields
            .split(';')
            .filter(|field| !field.is_empty())
            .filter_map(|field| {
                let mut pieces = field.split(':');
                let (name, dtype, dims) = (pieces.next()?, pieces.next()?, pieces.next().unwrap_or(""));
                let dtype = match dtype {
                    "f32" => DType::F32,
                    "f64" => DType::F64,
                    "i32" => DType::I32,
                    _ => return None,
                };
                let dims = dims.split(',').filter(|dim| !dim.is_empty()).filter_map(|dim| dim.parse().ok()).collect();
                Some((name.to_string(), dtype, dims))
            })
            .collect();
        out.insert(name.to_string(), curv_sema::ProbedData { fields, examples: examples.parse().unwrap_or(0) });
    }
    out
}

impl Context {
    fn new(config: &Config) -> Context {
        let mut context = Context {
            program: None,
            train: 0,
            learning_rate: config.learning_rate,
            step: 0,
            states: States::Empty,
            error: None,
            names: Vec::new(),
            inputs: Vec::new(),
            trainer: TrainerSlot::None,
            needs_model: None,
            model: None,
        };
        if crate::built_for_cuda() {
            if let Err(error) = curv_cuda::probe() {
                context.fail(format!("this library was built for CUDA (`curv build --lib --device cuda`): {error}"));
                return context;
            }
        }
        match load_program() {
            Ok(program) => {
                let train = &program.trains[0];
                context.names =
                    train.params.iter().map(|param| CString::new(param.name.clone()).unwrap_or_default()).collect();
                context.inputs = input_fields(&train.loss);
                context.model = curv_ad::products::model_program(&train.loss).and_then(|forward| {
                    let backward = curv_ad::products::model_vjp_program(&forward, &train.params)?;
                    let output = forward.output("output")?;
                    let output_shape = forward.ty(output).shape.iter().map(|dim| known_size(dim) as usize).collect();
                    Some(ModelPrograms { inputs: input_fields(&forward), forward, backward, output_shape })
                });
                context.needs_model = needs_model(&program);
                context.program = Some(program);
            }
            Err(message) => context.fail(message),
        }
        context
    }

    fn fail(&mut self, message: String) {
        self.error = Some(CString::new(message.replace('\0', " ")).unwrap_or_default());
    }
}

/// The embedded program, checked again, whose first train block's optimizer executes.
fn load_program() -> Result<Program, String> {
    let text = embedded_text(unsafe { crate::curv_program_source.as_ptr() });
    let file = embedded_text(unsafe { crate::curv_program_file.as_ptr() });
    let recording = parse_recording(&embedded_text(unsafe { curv_probed_data.as_ptr() }));
    let source = curv_driver::SourceFile::in_memory(&file, &text, std::path::Path::new("."));
    let compilation = curv_driver::compile_with_probe(source, &mut RecordedProbe(recording));
    if compilation.has_errors() {
        return Err(format!(
            "the embedded program does not check:\n{}",
            curv_driver::render_diagnostics(&compilation, false)
        ));
    }
    let program = compilation.analysis.ok_or("the embedded program has no analysis")?.program;
    let train = program.trains.first().ok_or("the embedded program has no train block")?;
    let names: Vec<String> = train.params.iter().map(|param| param.name.clone()).collect();
    curv_runtime::optimizer::check_executable(&train.optimizer, &names)?;
    Ok(program)
}

fn known_size(dim: &curv_ir::Dim) -> i64 {
    match dim {
        curv_ir::Dim::Known(size) => *size,
        curv_ir::Dim::Symbol(_) => 0,
    }
}

/// Why the optimizer step cannot run the program's optimizer (it needs curvature statistics of the
/// model), or None.
fn needs_model(program: &Program) -> Option<String> {
    let train = &program.trains[0];
    train.optimizer.plans.iter().find_map(|plan| {
        let needs = !curv_runtime::optimizer::statistics_needed(plan, &program.rules, 1).is_empty()
            || curv_runtime::optimizer::kfac_statistic(plan).is_some()
            || curv_runtime::optimizer::uses_hutchinson(plan, &program.rules);
        needs.then(|| {
            let message = "its optimizer needs curvature statistics of the model (Hessian-vector products, sampled \
                           labels or layer captures), which the optimizer step does not have: use the train step \
                           (curv_train_step)";
            let error = curv_runtime::Error::new(curv_runtime::ErrorCode::PlanNotExecutable, message);
            error.parameter(train.params[plan.param].name.as_str()).structure(plan.structure.name()).to_string()
        })
    })
}

impl Context {
    /// The train block whose optimizer and train step the library runs, or the context's error.
    fn program(&self) -> Result<&curv_ir::TrainProgram, (c_int, String)> {
        match &self.program {
            Some(program) => Ok(&program.trains[self.train]),
            None => {
                let message = self.error.as_ref().map(|error| error.to_string_lossy().into_owned()).unwrap_or_default();
                Err((CURV_CONTEXT_ERROR, message))
            }
        }
    }

    /// The parameters' names and shapes, and the train step's inputs (name, shape, whether int32),
    /// or the context's error (for the XLA handlers).
    pub fn step_layout(&self) -> Result<StepLayout, String> {
        let train = self.program().map_err(|(_, message)| message)?;
        Ok(StepLayout {
            params: train
                .params
                .iter()
                .map(|param| (param.name.clone(), param.ty.shape.iter().map(|dim| known_size(dim) as usize).collect()))
                .collect(),
            inputs: self
                .inputs
                .iter()
                .map(|input| {
                    (input.name.to_string_lossy().into_owned(), input.shape.clone(), input.dtype == DType::I32)
                })
                .collect(),
        })
    }

    /// One optimizer step on views already checked against the parameters' shapes (updated in
    /// place; on any error nothing is written): checks that the context runs optimizer steps, that
    /// every tensor has one float dtype and that no parameter overlaps its gradient.
    pub fn optimizer_step_on_views(&mut self, params: &[View], grads: &[View]) -> Result<(), (c_int, String)> {
        let train = self.program()?;
        if let Some(message) = &self.needs_model {
            return Err((CURV_CONTEXT_ERROR, message.clone()));
        }
        if !matches!(self.trainer, TrainerSlot::None) {
            return Err((
                CURV_CONTEXT_ERROR,
                "this context runs train steps; an optimizer step needs a context of its own".to_string(),
            ));
        }
        if params.len() != train.params.len() || grads.len() != train.params.len() {
            return Err((
                CURV_INVALID_ARGUMENT,
                format!(
                    "{} parameters and {} gradients given where the optimizer has {} parameters",
                    params.len(),
                    grads.len(),
                    train.params.len()
                ),
            ));
        }
        let float = params.first().map_or(DType::F32, |view| view.dtype);
        for ((param, grad), declared) in params.iter().zip(grads).zip(&train.params) {
            if param.dtype == DType::I32 || param.dtype != float || grad.dtype != float {
                return Err((
                    CURV_INVALID_ARGUMENT,
                    format!("`{}`: every tensor of a step must have one dtype, float32 or float64", declared.name),
                ));
            }
            if param.count > 0 && param.overlaps(grad) {
                return Err((
                    CURV_INVALID_ARGUMENT,
                    format!("`{}`: the parameter and its gradient overlap", declared.name),
                ));
            }
        }
        let rules = self.program.as_ref().map_or(&[][..], |program| &program.rules[..]);
        if float == DType::F32 && resident_step_possible(train, rules, self.step + 1, params, grads) {
            return step_resident(self, params, grads);
        }
        if params.iter().chain(grads).any(|view| view.cuda) {
            // CUDA tensors: the step runs on host copies (read after the caller's queued work),
            // and the new parameters are copied back once it has succeeded.
            let failed = |message: String| (CURV_RUNTIME_ERROR, message);
            let (_param_buffers, host_params) = stage_to_host(params).map_err(failed)?;
            let (_grad_buffers, host_grads) = stage_to_host(grads).map_err(failed)?;
            self.step_on_host(float, &host_params, &host_grads)?;
            for (param, host) in params.iter().zip(&host_params) {
                if param.cuda && param.count > 0 {
                    // SAFETY: both views describe `bytes` bytes (the same validated tensor).
                    unsafe { curv_cuda::copy_to_device(param.data, host.data, param.bytes()) }.map_err(|error| {
                        failed(format!(
                            "copying the new parameters to the GPU: {error}; the parameters may be partly updated"
                        ))
                    })?;
                }
            }
            return Ok(());
        }
        self.step_on_host(float, params, grads)
    }

    fn step_on_host(&mut self, float: DType, params: &[View], grads: &[View]) -> Result<(), (c_int, String)> {
        match float {
            DType::F64 => step_with::<f64>(self, params, grads),
            _ => step_with::<f32>(self, params, grads),
        }
    }

    /// One train step on views already checked against the parameters' and inputs' shapes and
    /// dtypes (parameters updated in place, the batch's loss in `loss`; on any error nothing is
    /// written): checks that the context runs train steps.
    pub fn train_step_on_views(
        &mut self,
        params: &[View],
        inputs: &[View],
        loss: &mut f64,
    ) -> Result<(), (c_int, String)> {
        self.program()?;
        if !matches!(self.states, States::Empty) {
            return Err((
                CURV_CONTEXT_ERROR,
                "this context runs optimizer steps; a train step needs a context of its own".to_string(),
            ));
        }
        match params.first().map_or(DType::F32, |view| view.dtype) {
            DType::F64 => train_with::<f64>(self, params, inputs, loss),
            _ => train_with::<f32>(self, params, inputs, loss),
        }
    }
}

/// The number of the stable code a message starts with (`[E0502] ...` gives 502), or 0.
fn error_code_number(message: &str) -> c_int {
    curv_runtime::error::code_of_message(message).and_then(|code| code[1..].parse().ok()).unwrap_or(0)
}

fn guarded(context: *mut Context, body: impl FnOnce(&mut Context) -> Result<(), (c_int, String)>) -> c_int {
    if context.is_null() {
        return CURV_INVALID_ARGUMENT;
    }
    let context = unsafe { &mut *context };
    context.error = None;
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(context)));
    match outcome {
        Ok(Ok(())) => CURV_OK,
        Ok(Err((code, message))) => {
            context.fail(message);
            code
        }
        Err(_) => {
            context.fail("internal error in curv (a bug): the call was abandoned".to_string());
            CURV_RUNTIME_ERROR
        }
    }
}

/// A configuration with the defaults of the embedded `.curv` file.
#[no_mangle]
pub extern "C" fn curv_config_new() -> *mut Config {
    Box::into_raw(Box::default())
}

/// # Safety
///
/// `config` is null or came from [`curv_config_new`] and is not used again.
#[no_mangle]
pub unsafe extern "C" fn curv_config_free(config: *mut Config) {
    if !config.is_null() {
        drop(Box::from_raw(config));
    }
}

/// Sets an option: `lr` (the base learning rate, in place of the file's). Returns
/// [`CURV_INVALID_ARGUMENT`] for a null pointer, an unknown name or a value that is not finite and
/// positive.
///
/// # Safety
///
/// `config` is null or a live configuration; `name` is null or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn curv_config_set(config: *mut Config, name: *const c_char, value: f64) -> c_int {
    if config.is_null() || name.is_null() {
        return CURV_INVALID_ARGUMENT;
    }
    match CStr::from_ptr(name).to_str() {
        Ok("lr") if value.is_finite() && value > 0.0 => {
            (*config).learning_rate = Some(value);
            CURV_OK
        }
        _ => CURV_INVALID_ARGUMENT,
    }
}

/// A context for the embedded program. Never null: when the program cannot be used, every entry
/// point returns [`CURV_CONTEXT_ERROR`] and [`curv_context_error`] says why.
///
/// # Safety
///
/// `config` is null (the defaults) or a live configuration.
#[no_mangle]
pub unsafe extern "C" fn curv_context_new(config: *const Config) -> *mut Context {
    let default = Config::default();
    let config = if config.is_null() { &default } else { &*config };
    let context = std::panic::catch_unwind(|| Context::new(config)).unwrap_or_else(|_| {
        let mut context = Context::new(&Config::default());
        context.fail("internal error in curv (a bug) while making the context".to_string());
        context
    });
    let context = Box::into_raw(Box::new(context));
    live_contexts().push(context as usize);
    context
}

/// The addresses of the contexts made and not yet freed, so that a context named by a number
/// (the XLA handlers' `context` attribute) is checked before use.
static LIVE_CONTEXTS: std::sync::Mutex<Vec<usize>> = std::sync::Mutex::new(Vec::new());

fn live_contexts() -> std::sync::MutexGuard<'static, Vec<usize>> {
    LIVE_CONTEXTS.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Runs `body` on the live context at `address` (holding the registry's lock, so it cannot be
/// freed meanwhile); `None` when no live context is there.
pub fn with_live_context<R>(address: u64, body: impl FnOnce(&mut Context) -> R) -> Option<R> {
    let live = live_contexts();
    if address == 0 || !live.contains(&(address as usize)) {
        return None;
    }
    // SAFETY: the address came from `curv_context_new` and has not been freed (it is still in the
    // registry, whose lock is held).
    Some(body(unsafe { &mut *(address as usize as *mut Context) }))
}

/// # Safety
///
/// `context` is null or came from [`curv_context_new`] and is not used again.
#[no_mangle]
pub unsafe extern "C" fn curv_context_free(context: *mut Context) {
    if !context.is_null() {
        let mut live = live_contexts();
        live.retain(|&address| address != context as usize);
        drop(Box::from_raw(context));
    }
}

/// The message of the last failed call (or of a context that could not be made), or null. It
/// stays valid until the next call on the context.
///
/// # Safety
///
/// `context` is null or a live context.
#[no_mangle]
pub unsafe extern "C" fn curv_context_error(context: *const Context) -> *const c_char {
    if context.is_null() {
        return c"a null context".as_ptr();
    }
    let context = &*context;
    context.error.as_ref().map_or(std::ptr::null(), |message| message.as_ptr())
}

/// The stable code of the last failed call's error as a number (502 for `E0502`; docs/errors.md
/// lists the codes: E05xx for the runtime, E06xx for checkpoints, E03xx for a program `curv check`
/// refuses), or 0 when the last call succeeded or its error has no code. The message of
/// [`curv_context_error`] starts with the same code, as `[E0502]`.
///
/// # Safety
///
/// `context` is null or a live context.
#[no_mangle]
pub unsafe extern "C" fn curv_context_error_code(context: *const Context) -> c_int {
    if context.is_null() {
        return 0;
    }
    let context = &*context;
    context.error.as_ref().and_then(|message| message.to_str().ok()).map_or(0, error_code_number)
}

/// The number of parameters the optimizer takes (those of the file's first train block).
///
/// # Safety
///
/// `context` is null or a live context.
#[no_mangle]
pub unsafe extern "C" fn curv_param_count(context: *const Context) -> i64 {
    if context.is_null() {
        return -1;
    }
    let context = &*context;
    context.names.len() as i64
}

/// The name of parameter `index` as the `.curv` file writes it, or null.
///
/// # Safety
///
/// `context` is null or a live context.
#[no_mangle]
pub unsafe extern "C" fn curv_param_name(context: *const Context, index: i64) -> *const c_char {
    if context.is_null() || index < 0 {
        return std::ptr::null();
    }
    let context = &*context;
    context.names.get(index as usize).map_or(std::ptr::null(), |name| name.as_ptr())
}

/// Writes the shape of parameter `index` into `dims` (room for `capacity` dimensions) and returns
/// its rank, or -1 for a bad argument.
///
/// # Safety
///
/// `context` is null or a live context; `dims` is null or has room for `capacity` values.
#[no_mangle]
pub unsafe extern "C" fn curv_param_shape(context: *const Context, index: i64, dims: *mut i64, capacity: i64) -> i64 {
    if context.is_null() || index < 0 {
        return -1;
    }
    let context = &*context;
    let Some(program) = &context.program else { return -1 };
    let Some(param) = program.trains[context.train].params.get(index as usize) else { return -1 };
    let shape: Vec<i64> = param.ty.shape.iter().map(known_size).collect();
    if !dims.is_null() {
        for (position, &size) in shape.iter().enumerate().take(capacity.max(0) as usize) {
            *dims.add(position) = size;
        }
    }
    shape.len() as i64
}

/// The number of steps taken.
///
/// # Safety
///
/// `context` is null or a live context.
#[no_mangle]
pub unsafe extern "C" fn curv_optimizer_steps(context: *const Context) -> i64 {
    if context.is_null() {
        return -1;
    }
    let context = &*context;
    context.step as i64
}

/// One optimizer step: `params[i]` is updated in place from `grads[i]`, for the `count`
/// parameters of the file in order (all float32, or all float64, contiguous, on the CPU, with the
/// declared shapes). On any error nothing is written.
///
/// # Safety
///
/// `context` is null or a live context; `params` and `grads` are null or hold `count` pointers,
/// each null or a DLPack tensor whose data is valid for its shape.
#[no_mangle]
pub unsafe extern "C" fn curv_optimizer_step(
    context: *mut Context,
    count: i64,
    params: *const *const DLManagedTensor,
    grads: *const *const DLManagedTensor,
) -> c_int {
    guarded(context, |context| {
        let train = context.program()?;
        if params.is_null() || grads.is_null() {
            return Err((CURV_INVALID_ARGUMENT, "the parameter or gradient list is a null pointer".to_string()));
        }
        if count != train.params.len() as i64 {
            return Err((
                CURV_INVALID_ARGUMENT,
                format!("{count} tensors given where the optimizer has {} parameters", train.params.len()),
            ));
        }
        let mut param_views = Vec::new();
        let mut grad_views = Vec::new();
        let cuda = crate::built_for_cuda();
        for (index, param) in train.params.iter().enumerate() {
            let shape: Vec<usize> = param.ty.shape.iter().map(|dim| known_size(dim) as usize).collect();
            let p =
                validate_on(*params.add(index), &shape, &format!("parameter {index} (`{}`)", param.name), false, cuda)
                    .map_err(|message| (CURV_INVALID_ARGUMENT, message))?;
            let g =
                validate_on(*grads.add(index), &shape, &format!("gradient {index} (`{}`)", param.name), false, cuda)
                    .map_err(|message| (CURV_INVALID_ARGUMENT, message))?;
            param_views.push(p);
            grad_views.push(g);
        }
        context.optimizer_step_on_views(&param_views, &grad_views)
    })
}

/// Starts the optimizer afresh: no state and no step (each rule's state is initialised at the
/// next step from the parameters and gradients, as at the first). The train step's trainer is
/// dropped too.
///
/// # Safety
///
/// `context` is null or a live context.
#[no_mangle]
pub unsafe extern "C" fn curv_optimizer_reset(context: *mut Context) -> c_int {
    guarded(context, |context| {
        context.states = States::Empty;
        context.trainer = TrainerSlot::None;
        context.step = 0;
        Ok(())
    })
}

/// 1 when the optimizer's state is resident where the kernels run (device memory for a CUDA
/// library), 0 when it is on the host or not made yet, -1 for a null context.
///
/// # Safety
///
/// `context` is null or a live context.
#[no_mangle]
pub unsafe extern "C" fn curv_state_resident(context: *const Context) -> c_int {
    match context.as_ref() {
        None => -1,
        Some(context) => c_int::from(matches!(context.states, States::Resident(_))),
    }
}

/// Writes the optimizer's state (every parameter's state tensors and the step) to a safetensors
/// file, atomically.
///
/// # Safety
///
/// `context` is null or a live context; `path` is null or a NUL-terminated path.
#[no_mangle]
pub unsafe extern "C" fn curv_state_save(context: *mut Context, path: *const c_char) -> c_int {
    guarded(context, |context| {
        if path.is_null() {
            return Err((CURV_INVALID_ARGUMENT, "the path is a null pointer".to_string()));
        }
        let path = std::path::PathBuf::from(CStr::from_ptr(path).to_string_lossy().into_owned());
        let names = context.names.iter().map(|name| name.to_string_lossy().into_owned()).collect::<Vec<_>>();
        let metadata = [("step", context.step.to_string())];
        context.states.on_host().map_err(|message| (CURV_RUNTIME_ERROR, message))?;
        let bytes = match &context.states {
            States::F64(states) => serialize_states(&names, states, &metadata),
            States::F32(states) => serialize_states(&names, states, &metadata),
            States::Loaded(states) => serialize_states(&names, states, &metadata),
            States::Empty | States::Resident(_) => {
                serialize_states::<f32>(&names, &vec![Vec::new(); names.len()], &metadata)
            }
        }
        .map_err(|message| (CURV_RUNTIME_ERROR, message))?;
        curv_runtime::checkpoint::write_atomically(&path, &bytes)
            .map_err(|error| (CURV_RUNTIME_ERROR, error.to_string()))
    })
}

fn serialize_states<T: curv_interp::Real>(
    names: &[String],
    states: &[ParamState<T>],
    metadata: &[(&str, String)],
) -> Result<Vec<u8>, String> {
    let mut tensors = Vec::new();
    for (name, state) in names.iter().zip(states) {
        for (state_name, tensor) in state {
            tensors.push((format!("{name}/{state_name}"), tensor));
        }
    }
    curv_runtime::checkpoint::serialize(&tensors, metadata).map_err(String::from)
}

/// Reads a state [`curv_state_save`] wrote; the context continues from its step. The file's
/// tensors must name this program's parameters.
///
/// # Safety
///
/// `context` is null or a live context; `path` is null or a NUL-terminated path.
#[no_mangle]
pub unsafe extern "C" fn curv_state_load(context: *mut Context, path: *const c_char) -> c_int {
    guarded(context, |context| {
        if path.is_null() {
            return Err((CURV_INVALID_ARGUMENT, "the path is a null pointer".to_string()));
        }
        let path = std::path::PathBuf::from(CStr::from_ptr(path).to_string_lossy().into_owned());
        let contents = curv_runtime::checkpoint::read_file::<f64>(&path)
            .map_err(|error| (CURV_INVALID_ARGUMENT, error.to_string()))?;
        // A state file without checksums (written before curv stored them, or by another
        // program) is refused: its values cannot be verified.
        if !contents.verified {
            return Err((
                CURV_INVALID_ARGUMENT,
                format!(
                    "[{}] {}: the file carries no curv checksums, so its values cannot be verified; save the \
                     state again with this version",
                    curv_runtime::checkpoint::NO_CHECKSUMS,
                    path.display()
                ),
            ));
        }
        let (tensors, metadata) = (contents.tensors, contents.metadata);
        let step = metadata.get("step").and_then(|value| value.parse::<u64>().ok()).ok_or((
            CURV_INVALID_ARGUMENT,
            format!("[{}] {}: no step in the metadata", curv_runtime::checkpoint::METADATA_DAMAGED, path.display()),
        ))?;
        let names = context.names.iter().map(|name| name.to_string_lossy().into_owned()).collect::<Vec<_>>();
        let mut states: Vec<ParamState<f64>> = vec![Vec::new(); names.len()];
        let mut tensors: Vec<(String, Tensor<f64>)> = tensors.into_iter().collect();
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        for (key, tensor) in tensors {
            let (param, state) = key
                .split_once('/')
                .ok_or((CURV_INVALID_ARGUMENT, format!("{}: `{key}` is not PARAM/STATE", path.display())))?;
            let index = names.iter().position(|name| name == param).ok_or((
                CURV_INVALID_ARGUMENT,
                format!("{}: no parameter `{param}` in this program", path.display()),
            ))?;
            states[index].push((state.to_string(), tensor));
        }
        context.states = match &context.states {
            States::F64(_) => States::F64(states),
            States::F32(_) | States::Resident(_) => States::F32(convert(&states)),
            States::Empty | States::Loaded(_) => States::Loaded(states),
        };
        context.step = step;
        Ok(())
    })
}

/// The number of data fields a train step takes (those the loss reads).
///
/// # Safety
///
/// `context` is null or a live context.
#[no_mangle]
pub unsafe extern "C" fn curv_input_count(context: *const Context) -> i64 {
    if context.is_null() {
        return -1;
    }
    let context = &*context;
    context.inputs.len() as i64
}

/// The name of input `index` (`SOURCE.FIELD`, as the `.curv` file reads it), or null.
///
/// # Safety
///
/// `context` is null or a live context.
#[no_mangle]
pub unsafe extern "C" fn curv_input_name(context: *const Context, index: i64) -> *const c_char {
    if context.is_null() || index < 0 {
        return std::ptr::null();
    }
    let context = &*context;
    context.inputs.get(index as usize).map_or(std::ptr::null(), |input| input.name.as_ptr())
}

/// Writes up to `capacity` dimensions of input `index` (the batch first) and returns its rank;
/// `is_integer` (when not null) is set to 1 for an int32 field (labels), 0 for a float one.
///
/// # Safety
///
/// `context` is null or a live context; `dims` is null or has room for `capacity` values;
/// `is_integer` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn curv_input_shape(
    context: *const Context,
    index: i64,
    dims: *mut i64,
    capacity: i64,
    is_integer: *mut c_int,
) -> i64 {
    if context.is_null() || index < 0 {
        return -1;
    }
    let context = &*context;
    let Some(input) = context.inputs.get(index as usize) else { return -1 };
    if !dims.is_null() {
        for (position, &size) in input.shape.iter().enumerate().take(capacity.max(0) as usize) {
            *dims.add(position) = size as i64;
        }
    }
    if !is_integer.is_null() {
        *is_integer = c_int::from(input.dtype == DType::I32);
    }
    input.shape.len() as i64
}

#[cfg(test)]
mod error_code_tests {
    use super::*;

    #[test]
    fn the_code_of_a_message_is_its_number() {
        assert_eq!(
            error_code_number(&update_failed(
                curv_runtime::Error::new(curv_runtime::ErrorCode::UpdateFailed, "no root").structure("kronecker"),
                "w1",
                3
            )),
            502
        );
        assert_eq!(error_code_number(&non_finite_update(7, "w1", 3, StructureKind::Diagonal)), 501);
        assert_eq!(error_code_number("[E0604] state.safetensors: written by train `a`, not `b`"), 604);
        assert_eq!(error_code_number("the parameter or gradient list is a null pointer"), 0);
        assert_eq!(unsafe { curv_context_error_code(std::ptr::null()) }, 0);
    }
}
