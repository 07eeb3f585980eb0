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

// DLPack (v0.8 layout), the part the ABI reads.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct DLDevice {
    pub device_type: i32,
    pub device_id: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct DLDataType {
    pub code: u8,
    pub bits: u8,
    pub lanes: u16,
}

#[repr(C)]
pub struct DLTensor {
    pub data: *mut c_void,
    pub device: DLDevice,
    pub ndim: i32,
    pub dtype: DLDataType,
    pub shape: *mut i64,
    pub strides: *mut i64,
    pub byte_offset: u64,
}

#[repr(C)]
pub struct DLManagedTensor {
    pub dl_tensor: DLTensor,
    pub manager_ctx: *mut c_void,
    pub deleter: Option<unsafe extern "C" fn(*mut DLManagedTensor)>,
}

const DL_CPU: i32 = 1;
const DL_CUDA: i32 = 2;
const DL_INT: u8 = 0;
const DL_FLOAT: u8 = 2;

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

/// A validated view of one tensor (from DLPack, or from an XLA buffer).
pub struct View {
    data: *mut u8,
    count: usize,
    pub dtype: DType,
    /// The data is CUDA device memory (a library built with `--device cuda`), which the host
    /// never reads or writes itself: the optimizer step copies it ([`stage_to_host`]).
    cuda: bool,
}

impl View {
    pub fn new(data: *mut u8, count: usize, dtype: DType) -> View {
        View { data, count, dtype, cuda: false }
    }

    fn bytes(&self) -> usize {
        self.count * if self.dtype == DType::F64 { 8 } else { 4 }
    }

    /// Writes a scalar view's one element.
    ///
    /// # Safety
    ///
    /// The view describes valid, writable memory of at least one element.
    pub unsafe fn write_scalar(&self, value: f64) {
        if self.count == 0 {
            return;
        }
        match self.dtype {
            DType::F64 => *(self.data as *mut f64) = value,
            DType::F32 => *(self.data as *mut f32) = value as f32,
            _ => {}
        }
    }

    /// Whether the two views share memory.
    pub fn overlaps(&self, other: &View) -> bool {
        (self.data as usize) < (other.data as usize) + other.bytes()
            && (other.data as usize) < (self.data as usize) + self.bytes()
    }

    /// Copies `source`'s elements here (same dtype and count; nothing when they are the same
    /// memory).
    ///
    /// # Safety
    ///
    /// Both views describe valid memory of their counts, and this one is writable.
    pub unsafe fn copy_from(&self, source: &View) {
        if self.data != source.data && self.dtype == source.dtype && self.count == source.count {
            std::ptr::copy(source.data as *const u8, self.data, self.bytes());
        }
    }
}

/// The shapes of the model's arguments and output (for the XLA handlers).
pub struct ModelLayout {
    pub params: Vec<(String, Vec<usize>)>,
    /// Name, shape, and whether the input is int32.
    pub inputs: Vec<(String, Vec<usize>, bool)>,
    pub output: Vec<usize>,
}

impl Context {
    /// The model's layout, or why the library has no model on its own.
    pub fn model_layout(&self) -> Result<ModelLayout, String> {
        let program = self
            .program
            .as_ref()
            .ok_or_else(|| self.error.as_ref().map(|error| error.to_string_lossy().into_owned()).unwrap_or_default())?;
        let model = self
            .model
            .as_ref()
            .ok_or("the loss has no `logits` or `prediction` output: there is no model on its own")?;
        Ok(ModelLayout {
            params: program.trains[0]
                .params
                .iter()
                .map(|param| (param.name.clone(), param.ty.shape.iter().map(|dim| known_size(dim) as usize).collect()))
                .collect(),
            inputs: model
                .inputs
                .iter()
                .map(|input| {
                    (input.name.to_string_lossy().into_owned(), input.shape.clone(), input.dtype == DType::I32)
                })
                .collect(),
            output: model.output_shape.clone(),
        })
    }

    /// Runs the model's forward pass or its vector-Jacobian product on checked views, writing the
    /// named outputs into `destinations`; errors as `(XLA error code, message)`.
    pub fn run_model(
        &self,
        backward: bool,
        params: &[View],
        inputs: &[View],
        cotangent: Option<&View>,
        destinations: &[(String, View)],
    ) -> Result<(), (i32, String)> {
        let destinations: Vec<(&str, &View)> = destinations.iter().map(|(name, view)| (name.as_str(), view)).collect();
        let float = params.first().map_or(DType::F32, |view| view.dtype);
        let result = match float {
            DType::F64 => evaluate_model::<f64>(self, backward, params, inputs, cotangent, &destinations),
            _ => evaluate_model::<f32>(self, backward, params, inputs, cotangent, &destinations),
        };
        // XLA's codes: 3 invalid argument, 13 internal.
        result.map_err(|(code, message)| (if code == CURV_INVALID_ARGUMENT { 3 } else { 13 }, message))
    }
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

/// The parameters and train-step inputs of a library (for the XLA handlers).
pub struct StepLayout {
    pub params: Vec<(String, Vec<usize>)>,
    /// Name, shape, and whether the input is int32.
    pub inputs: Vec<(String, Vec<usize>, bool)>,
}

/// Checks one tensor against the parameter's shape and the call's dtype; `what` names it.
/// Checks one tensor against the parameter's shape and the call's dtype; `what` names it. A CUDA
/// tensor is accepted only where `cuda` allows it (the optimizer step of a library built with
/// `--device cuda`), on the first GPU.
unsafe fn validate_on(
    tensor: *const DLManagedTensor,
    shape: &[usize],
    what: &str,
    integers: bool,
    cuda: bool,
) -> Result<View, String> {
    if tensor.is_null() {
        return Err(format!("{what} is a null pointer"));
    }
    let tensor = &(*tensor).dl_tensor;
    let on_cuda = match (tensor.device.device_type, tensor.device.device_id) {
        (DL_CPU, _) => false,
        (DL_CUDA, 0) if cuda => true,
        (DL_CUDA, id) if cuda => {
            return Err(format!("{what} is on CUDA device {id}; curv runs on the first GPU (device 0)"));
        }
        (DL_CUDA, _) if crate::built_for_cuda() => {
            return Err(format!("{what} is a CUDA tensor; only the optimizer step takes CUDA tensors so far"));
        }
        (other, _) => {
            let runs_on = if crate::built_for_cuda() { "CPU or CUDA" } else { "the CPU" };
            return Err(format!("{what} is on device type {other} (this library runs on {runs_on})"));
        }
    };
    let dtype = match (tensor.dtype.code, tensor.dtype.bits, tensor.dtype.lanes) {
        (DL_FLOAT, 32, 1) => DType::F32,
        (DL_FLOAT, 64, 1) => DType::F64,
        (DL_INT, 32, 1) if integers => DType::I32,
        (code, bits, lanes) => {
            let needed = if integers { "int32" } else { "float32 or float64" };
            return Err(format!("{what} has dtype code {code}, {bits} bits, {lanes} lanes; {needed} is needed"));
        }
    };
    if tensor.ndim < 0 || tensor.ndim as usize != shape.len() || (tensor.ndim > 0 && tensor.shape.is_null()) {
        return Err(format!("{what} has {} dimensions where {} are needed", tensor.ndim, shape.len()));
    }
    let dims: Vec<i64> = if tensor.ndim == 0 {
        Vec::new()
    } else {
        std::slice::from_raw_parts(tensor.shape, tensor.ndim as usize).to_vec()
    };
    if dims.iter().map(|&dim| dim as usize).ne(shape.iter().copied()) || dims.iter().any(|&dim| dim < 0) {
        return Err(format!("{what} has shape {dims:?} where {shape:?} is needed"));
    }
    if !tensor.strides.is_null() && tensor.ndim > 0 {
        let strides = std::slice::from_raw_parts(tensor.strides, tensor.ndim as usize);
        let mut expected = 1i64;
        for (axis, &dim) in dims.iter().enumerate().rev() {
            if dim > 1 && strides[axis] != expected {
                return Err(format!("{what} is not contiguous (strides {strides:?} for shape {dims:?})"));
            }
            expected *= dim;
        }
    }
    let count: usize = shape.iter().product();
    let element = if dtype == DType::F64 { 8 } else { 4 };
    if count > 0 && tensor.data.is_null() {
        return Err(format!("{what} has no data (a null data pointer)"));
    }
    let data = (tensor.data as *mut u8).wrapping_add(tensor.byte_offset as usize);
    if count > 0 && !(data as usize).is_multiple_of(element) {
        return Err(format!("{what}'s data is not aligned to its {element}-byte elements"));
    }
    Ok(View { data, count, dtype, cuda: on_cuda })
}

/// [`validate_on`] for the CPU.
unsafe fn validate(
    tensor: *const DLManagedTensor,
    shape: &[usize],
    what: &str,
    integers: bool,
) -> Result<View, String> {
    validate_on(tensor, shape, what, integers, false)
}

/// Host copies of the CUDA tensors among `views` (the others as they are): the buffers that hold
/// the copies and the views to step on.
fn stage_to_host(views: &[View]) -> Result<(Vec<Vec<u64>>, Vec<View>), String> {
    let mut buffers = Vec::new();
    let mut staged = Vec::with_capacity(views.len());
    for view in views {
        if !view.cuda || view.count == 0 {
            staged.push(View { cuda: false, ..*view });
            continue;
        }
        // u64 words: aligned for float64 elements.
        let mut buffer = vec![0u64; view.bytes().div_ceil(8)];
        // SAFETY: the view was validated (device memory of `bytes` bytes); the buffer has room.
        unsafe { curv_cuda::copy_to_host(buffer.as_mut_ptr() as *mut u8, view.data, view.bytes()) }
            .map_err(|error| format!("copying a CUDA tensor to the host: {error}"))?;
        staged.push(View { data: buffer.as_mut_ptr() as *mut u8, count: view.count, dtype: view.dtype, cuda: false });
        buffers.push(buffer);
    }
    Ok((buffers, staged))
}

trait Element: curv_interp::Real {
    fn states(states: &mut States, count: usize) -> Result<&mut Vec<ParamState<Self>>, String>;
    /// `f32`: the kernels compiled into the library; `f64`: the interpreter.
    fn backend() -> Box<dyn curv_runtime::Backend<Self>>;
    /// Hands a buffer the step is done with back to the compiled calls' outputs (`f32`).
    fn recycle(_buffer: Vec<Self>) {}
}

impl Element for f32 {
    fn backend() -> Box<dyn curv_runtime::Backend<f32>> {
        make_backend()
    }

    fn recycle(buffer: Vec<f32>) {
        curv_runtime::compiled::recycle(buffer);
    }

    fn states(states: &mut States, count: usize) -> Result<&mut Vec<ParamState<f32>>, String> {
        states.on_host()?;
        match states {
            States::Empty => *states = States::F32(vec![Vec::new(); count]),
            States::Loaded(loaded) => *states = States::F32(convert(loaded)),
            _ => {}
        }
        match states {
            States::F32(states) => Ok(states),
            _ => Err("this context's state is float64; its tensors must stay float64".to_string()),
        }
    }
}

impl Element for f64 {
    fn backend() -> Box<dyn curv_runtime::Backend<f64>> {
        Box::new(curv_runtime::Interpreter)
    }

    fn states(states: &mut States, count: usize) -> Result<&mut Vec<ParamState<f64>>, String> {
        states.on_host()?;
        match states {
            States::Empty => *states = States::F64(vec![Vec::new(); count]),
            States::Loaded(loaded) => *states = States::F64(std::mem::take(loaded)),
            _ => {}
        }
        match states {
            States::F64(states) => Ok(states),
            _ => Err("this context's state is float32; its tensors must stay float32".to_string()),
        }
    }
}

/// How to put back one parameter's state after a step that failed.
enum Undo<T> {
    /// A copy made before an in-place update.
    Copy(ParamState<T>),
    /// What an out-of-place update replaced.
    Displaced(curv_runtime::optimizer::Displaced<T>),
}

/// The number of an optimizer step's context's next step, and its learning rate.
fn next_step(context: &Context) -> Result<(u64, f64), (c_int, String)> {
    let program = context.program.as_ref().ok_or((CURV_CONTEXT_ERROR, "no program".to_string()))?;
    let train = &program.trains[context.train];
    let step = context.step + 1;
    let rate = curv_runtime::schedule::learning_rate(
        context.learning_rate.unwrap_or(train.optimizer.lr),
        train.optimizer.schedule.as_ref(),
        step,
        train.steps.max(1) as u64,
    );
    Ok((step, rate))
}

/// Whether the optimizer step can be resident ([`step_resident`]): float32 tensors all on the GPU
/// of a CUDA library (or, with `CURV_RESIDENT=on`, all on the CPU: the same path in host memory,
/// for tests), and a rule for every parameter with no modifier and no statistic due.
fn resident_step_possible(
    train: &curv_ir::TrainProgram,
    rules: &[curv_ir::RuleProgram],
    step: u64,
    params: &[View],
    grads: &[View],
) -> bool {
    let views = || params.iter().chain(grads);
    let placed = if crate::built_for_cuda() && views().all(|view| view.cuda) {
        true
    } else {
        views().all(|view| !view.cuda) && std::env::var("CURV_RESIDENT").is_ok_and(|value| value == "on")
    };
    placed
        && train.optimizer.plans.iter().all(|plan| {
            plan.structure == StructureKind::Rule
                && plan.modifiers.is_empty()
                && curv_runtime::optimizer::statistics_needed(plan, rules, step).is_empty()
        })
}

/// One optimizer step with the states resident where the kernels run and the caller's
/// parameters and gradients read where they are: on a CUDA library, CUDA tensors never pass
/// through the host. Each rule update keeps its outputs resident; each new parameter is checked
/// for non-finite values where it is; only when every update has succeeded are the new parameters
/// copied into the caller's tensors (device to device) and the new states kept. A failed step
/// changes nothing.
fn step_resident(context: &mut Context, params: &[View], grads: &[View]) -> Result<(), (c_int, String)> {
    let (step, rate) = next_step(context)?;
    let program = context.program.as_ref().ok_or((CURV_CONTEXT_ERROR, "no program".to_string()))?;
    let train = &program.trains[context.train];
    let cuda = params.first().is_some_and(|view| view.cuda);
    let failed = |message: String| (CURV_RUNTIME_ERROR, message);
    if cuda {
        // The caller's kernels that write the gradients may still run, on any stream.
        curv_cuda::synchronize().map_err(|error| failed(error.to_string()))?;
    }
    let backend = make_backend();
    let upload = |tensor: &Tensor<f32>| {
        backend.upload(tensor.clone()).map_err(|error| failed(format!("uploading the state: {error}")))
    };
    // The states, resident: as the last resident step left them, or uploaded.
    let states: Vec<Vec<(String, Resident<f32>)>> = match std::mem::replace(&mut context.states, States::Empty) {
        States::Resident(states) => states,
        States::Empty => (0..params.len()).map(|_| Vec::new()).collect(),
        States::F64(host) => {
            context.states = States::F64(host);
            return Err((
                CURV_INVALID_ARGUMENT,
                "this context's state is float64; its tensors must stay float64".to_string(),
            ));
        }
        host @ (States::F32(_) | States::Loaded(_)) => {
            let host = match host {
                States::F32(host) => host,
                States::Loaded(loaded) => convert(&loaded),
                _ => Vec::new(),
            };
            match curv_runtime::optimizer::map_states(&host, upload) {
                Ok(states) => states,
                Err(error) => {
                    context.states = States::F32(host);
                    return Err(error);
                }
            }
        }
    };
    let lend = |view: &View| {
        let read = if view.cuda { curv_cuda::read_device_floats } else { LentStorage::read_host };
        // SAFETY: the views were validated (live, aligned, `count` floats, on the stated device,
        // parameters and gradients apart), and the caller's tensors are written only by the
        // commit below, once nothing reads them any more.
        let storage = unsafe { LentStorage::new(view.data, view.count, view.cuda, read) };
        Resident { shape: vec![view.count], storage: Storage::Device(Box::new(storage)) }
    };
    let mut updates = Vec::with_capacity(params.len());
    let mut outcome = Ok(());
    for (index, (param, grad)) in params.iter().zip(grads).enumerate() {
        let name = &train.params[index].name;
        let Some(plan) = train.optimizer.plans.iter().find(|plan| plan.param == index) else {
            outcome = Err((CURV_CONTEXT_ERROR, format!("`{name}` has no optimizer plan")));
            break;
        };
        let (param, grad) = (lend(param), lend(grad));
        let update = curv_runtime::optimizer::update_rule_resident(
            plan,
            &program.rules,
            backend.as_ref(),
            step,
            rate,
            train.batch.max(1) as usize,
            &param,
            &grad,
            &states[index],
        );
        let update = match update {
            Ok(update) => update,
            Err(error) => {
                outcome = Err(failed(update_failed(error, name, step)));
                break;
            }
        };
        if let Some(new) = &update.param {
            match curv_runtime::backend::first_non_finite_resident(backend.as_ref(), &[new]) {
                Ok(None) => {}
                Ok(Some((_, position))) => {
                    outcome = Err(failed(non_finite_update(position, name, step, plan.structure)));
                    break;
                }
                Err(message) => {
                    let error = curv_runtime::Error::new(curv_runtime::ErrorCode::BackendFailed, message);
                    outcome = Err(failed(error.parameter(name.as_str()).step(step).to_string()));
                    break;
                }
            }
        }
        updates.push(update);
    }
    if let Err(error) = outcome {
        context.states = States::Resident(states);
        return Err(error);
    }
    // The commit: every new parameter into the caller's tensor, then the new states.
    let mut states = states;
    for ((view, update), state) in params.iter().zip(updates).zip(&mut states) {
        if let Some(new) = &update.param {
            let copied = match &new.storage {
                Storage::Device(device) if view.cuda => {
                    // SAFETY: both hold `count` floats of device memory (the validated tensor and
                    // the kernel's output of its size).
                    unsafe { curv_cuda::copy_device_to_device(view.data, device.address(), view.bytes()) }
                        .map_err(|error| error.to_string())
                }
                Storage::Host(data) if !view.cuda && data.len() == view.count => {
                    // SAFETY: the validated tensor holds `count` floats.
                    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), view.data as *mut f32, view.count) };
                    Ok(())
                }
                _ => Err("a new parameter is not where its tensor is".to_string()),
            };
            if let Err(message) = copied {
                context.states = States::Resident(states);
                return Err(failed(format!(
                    "writing the new parameters: {message}; the parameters may be partly updated"
                )));
            }
        }
        for (name, tensor) in update.states {
            match state.iter_mut().find(|(held, _)| *held == name) {
                Some((_, held)) => *held = tensor,
                None => state.push((name, tensor)),
            }
        }
    }
    if cuda {
        curv_cuda::synchronize().map_err(|error| failed(format!("writing the new parameters: {error}")))?;
    }
    context.states = States::Resident(states);
    context.step = step;
    Ok(())
}

/// One optimizer step over validated views, in element type `T`.
fn step_with<T: Element>(context: &mut Context, params: &[View], grads: &[View]) -> Result<(), (c_int, String)> {
    let (step, rate) = next_step(context)?;
    let program = context.program.as_ref().ok_or((CURV_CONTEXT_ERROR, "no program".to_string()))?;
    let train = &program.trains[context.train];
    let backend = T::backend();
    let states =
        T::states(&mut context.states, train.params.len()).map_err(|message| (CURV_INVALID_ARGUMENT, message))?;
    // The caller's parameters and gradients are lent to the updates, not copied: a rule's
    // compiled update reads them where they are and writes the new parameter into a buffer of its
    // own (the structures, which change a parameter where it is, start from a copy). The
    // caller's parameters are written only when every update succeeded, each with one copy of
    // its new values, and a failed step puts back the states it changed (from what the updates
    // replaced, or from copies for the structures that update their state in place), so it
    // leaves parameters and state as they were.
    let mut new_params = Vec::with_capacity(params.len());
    let mut undo: Vec<(usize, Undo<T>)> = Vec::new();
    let roll_back = |states: &mut Vec<ParamState<T>>, undo: Vec<(usize, Undo<T>)>| {
        for (index, entry) in undo.into_iter().rev() {
            match entry {
                Undo::Copy(state) => states[index] = state,
                Undo::Displaced(displaced) => {
                    // The parameter is a copy that is dropped; only the state matters.
                    let mut scratch = Tensor::new(vec![0], Vec::new());
                    displaced.undo(&mut scratch, &mut states[index]);
                }
            }
        }
    };
    let statistics = HashMap::new();
    for (index, (param, grad)) in params.iter().zip(grads).enumerate() {
        let shape: Vec<usize> = train.params[index].ty.shape.iter().map(|dim| known_size(dim) as usize).collect();
        // SAFETY: the views were validated (live, aligned, of `count` elements of `T`, the
        // gradients not overlapping the parameters) and the caller's tensors are not written
        // before the commit below, after the last read.
        let lend = |view: &View| unsafe { std::slice::from_raw_parts(view.data as *const T, view.count) };
        // The parameter has its shape and no data: its values are lent ([`UpdateInputs::param_lent`]).
        let mut tensor = Tensor { shape: shape.clone(), data: Vec::new() };
        let plan = train
            .optimizer
            .plans
            .iter()
            .find(|plan| plan.param == index)
            .ok_or((CURV_CONTEXT_ERROR, format!("`{}` has no optimizer plan", train.params[index].name)))?;
        let inputs = UpdateInputs {
            backend: backend.as_ref(),
            step,
            learning_rate: rate,
            batch: train.batch.max(1) as usize,
            gradient: TensorRef { shape: &shape, data: lend(grad) },
            param_lent: Some(lend(param)),
            statistics: &statistics,
            captures: None,
            seed: train.seed as u64,
            param: index,
        };
        let updates_in_place = matches!(plan.structure, StructureKind::Diagonal | StructureKind::Factored);
        if updates_in_place {
            undo.push((index, Undo::Copy(states[index].clone())));
        }
        match update_param(plan, &program.rules, &mut tensor, &mut states[index], &inputs) {
            Ok(Some(displaced)) => undo.push((index, Undo::Displaced(displaced))),
            Ok(None) => {}
            Err(error) => {
                roll_back(states, undo);
                let name = &train.params[index].name;
                return Err((CURV_RUNTIME_ERROR, update_failed(error, name, step)));
            }
        }
        if let Some(position) = curv_runtime::first_non_finite(&tensor.data) {
            roll_back(states, undo);
            let name = &train.params[index].name;
            return Err((CURV_RUNTIME_ERROR, non_finite_update(position, name, step, plan.structure)));
        }
        new_params.push(tensor);
    }
    for (param, tensor) in params.iter().zip(new_params) {
        // A parameter without data was not written: the caller's values are still current.
        if tensor.data.len() == param.count && param.count > 0 {
            unsafe { std::ptr::copy_nonoverlapping(tensor.data.as_ptr(), param.data as *mut T, param.count) };
        }
        T::recycle(tensor.data);
    }
    // What the updates replaced (the states' previous values) is not needed any more.
    for (_, entry) in undo {
        if let Undo::Displaced(displaced) = entry {
            displaced.param.into_iter().for_each(|tensor| T::recycle(tensor.data));
            displaced.states.into_iter().for_each(|(_, tensor)| T::recycle(tensor.data));
        }
    }
    context.step = step;
    Ok(())
}

/// A parameter's failed update as the runtime reports it (its code and structure), with the
/// parameter and the step.
fn update_failed(error: curv_runtime::Error, name: &str, step: u64) -> String {
    error.parameter(name).step(step).to_string()
}

/// An update that made the parameter non-finite (E0501); the step is not taken.
fn non_finite_update(position: usize, name: &str, step: u64, structure: StructureKind) -> String {
    let message = format!("the update made element {position} non-finite; nothing was changed");
    let error = curv_runtime::Error::new(curv_runtime::ErrorCode::NonFinite, message);
    error.parameter(name).step(step).structure(structure.name()).to_string()
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

trait TrainElement: Element {
    fn trainer<'a>(
        slot: &'a mut TrainerSlot,
        program: &Program,
    ) -> Result<&'a mut curv_runtime::trainer::Trainer<Self>, String>;
    fn value(view: &View, shape: &[usize]) -> curv_interp::Value<Self>;
}

fn new_trainer<T: Element>(program: &Program) -> Box<curv_runtime::trainer::Trainer<T>> {
    let train = program.trains[0].clone();
    let dataset = curv_runtime::dataset::Dataset {
        name: train.data.name.clone(),
        fields: Vec::new(),
        examples: 0,
        train: Vec::new(),
        test: Vec::new(),
    };
    let seed = train.seed as u64;
    let total = train.steps.max(1) as u64;
    let mut trainer = curv_runtime::trainer::Trainer::new(train, program.rules.clone(), dataset, seed, total);
    trainer.backend = T::backend();
    Box::new(trainer)
}

impl TrainElement for f32 {
    fn trainer<'a>(
        slot: &'a mut TrainerSlot,
        program: &Program,
    ) -> Result<&'a mut curv_runtime::trainer::Trainer<f32>, String> {
        if let TrainerSlot::None = slot {
            *slot = TrainerSlot::F32(new_trainer(program));
        }
        match slot {
            TrainerSlot::F32(trainer) => Ok(trainer),
            _ => Err("this context trains in float64; its tensors must stay float64".to_string()),
        }
    }

    fn value(view: &View, shape: &[usize]) -> curv_interp::Value<f32> {
        values_of(view, shape)
    }
}

impl TrainElement for f64 {
    fn trainer<'a>(
        slot: &'a mut TrainerSlot,
        program: &Program,
    ) -> Result<&'a mut curv_runtime::trainer::Trainer<f64>, String> {
        if let TrainerSlot::None = slot {
            *slot = TrainerSlot::F64(new_trainer(program));
        }
        match slot {
            TrainerSlot::F64(trainer) => Ok(trainer),
            _ => Err("this context trains in float32; its tensors must stay float32".to_string()),
        }
    }

    fn value(view: &View, shape: &[usize]) -> curv_interp::Value<f64> {
        values_of(view, shape)
    }
}

/// The value of an input view: int32 labels as integers, floats converted to `T`.
fn values_of<T: curv_interp::Real>(view: &View, shape: &[usize]) -> curv_interp::Value<T> {
    unsafe {
        match view.dtype {
            DType::I32 => curv_interp::Value::Int(Tensor::new(
                shape.to_vec(),
                std::slice::from_raw_parts(view.data as *const i32, view.count).to_vec(),
            )),
            DType::F32 => curv_interp::Value::Real(Tensor::new(
                shape.to_vec(),
                std::slice::from_raw_parts(view.data as *const f32, view.count)
                    .iter()
                    .map(|&x| T::from_f64(x as f64))
                    .collect(),
            )),
            DType::F64 => curv_interp::Value::Real(Tensor::new(
                shape.to_vec(),
                std::slice::from_raw_parts(view.data as *const f64, view.count)
                    .iter()
                    .map(|&x| T::from_f64(x))
                    .collect(),
            )),
        }
    }
}

/// One train step over validated views: the caller's parameters go into the trainer, the trainer
/// runs forward, backward, statistics and update on the caller's batch, and the new parameters
/// are written back (only when the step succeeded).
fn train_with<T: TrainElement>(
    context: &mut Context,
    params: &[View],
    inputs: &[View],
    loss: &mut f64,
) -> Result<(), (c_int, String)> {
    let program = context.program.as_ref().ok_or((CURV_CONTEXT_ERROR, "no program".to_string()))?;
    let trainer = T::trainer(&mut context.trainer, program).map_err(|message| (CURV_INVALID_ARGUMENT, message))?;
    let train = &program.trains[0];
    let mut data = HashMap::new();
    // Labels and embedding ids out of range are refused before the step, as a run refuses them
    // before step 1 (E0403).
    let bounds = curv_runtime::data_check::train_index_bounds(train);
    for (view, input) in inputs.iter().zip(&context.inputs) {
        let value = T::value(view, &input.shape);
        if let curv_interp::Value::Int(ids) = &value {
            curv_runtime::data_check::check_batch(&bounds, &input.source, &input.field, &ids.shape, &ids.data)
                .map_err(|message| (CURV_INVALID_ARGUMENT, format!("{message}; nothing was changed")))?;
        }
        data.insert((input.source.clone(), input.field.clone()), value);
    }
    let mut new_params = Vec::with_capacity(params.len());
    for (view, param) in params.iter().zip(&train.params) {
        let shape: Vec<usize> = param.ty.shape.iter().map(|dim| known_size(dim) as usize).collect();
        new_params.push(Tensor::new(
            shape,
            unsafe { std::slice::from_raw_parts(view.data as *const T, view.count) }.to_vec(),
        ));
    }
    let previous = std::mem::replace(&mut trainer.params, new_params);
    if let Some(rate) = context.learning_rate {
        trainer.program.optimizer.lr = rate;
    }
    match trainer.train_step_on(data) {
        Ok(report) => {
            if let Some(reason) = report.skipped {
                trainer.params = previous;
                let error = curv_runtime::TrainError::NonFinite { step: report.step, what: reason };
                return Err((CURV_RUNTIME_ERROR, format!("{error}; nothing was changed")));
            }
            for (view, tensor) in params.iter().zip(&trainer.params) {
                unsafe { std::ptr::copy_nonoverlapping(tensor.data.as_ptr(), view.data as *mut T, view.count) };
            }
            *loss = report.metrics.loss;
            context.step = trainer.step;
            Ok(())
        }
        Err(error) => {
            trainer.params = previous;
            Err((CURV_RUNTIME_ERROR, format!("{error}; nothing was changed")))
        }
    }
}

/// One train step of the file's train block on a batch the caller gives: forward, backward, the
/// curvature statistics the optimizer asks for (Hessian-vector products, sampled labels, K-FAC's
/// layer captures) and the update, with `params[i]` updated in place. `inputs` are the data
/// fields in the order of `curv_input_name` (the batch first in each: float32 or float64 like the
/// parameters, int32 for labels). `loss` (when not null) receives the batch's loss. On any error
/// nothing is written.
///
/// # Safety
///
/// `context` is null or a live context; the lists are null or hold their counts of pointers, each
/// null or a DLPack tensor whose data is valid for its shape; `loss` is null or writable.
#[no_mangle]
pub unsafe extern "C" fn curv_train_step(
    context: *mut Context,
    param_count: i64,
    params: *const *const DLManagedTensor,
    input_count: i64,
    inputs: *const *const DLManagedTensor,
    loss: *mut f64,
) -> c_int {
    guarded(context, |context| {
        let train = context.program()?;
        if params.is_null() || inputs.is_null() {
            return Err((CURV_INVALID_ARGUMENT, "the parameter or input list is a null pointer".to_string()));
        }
        if param_count != train.params.len() as i64 {
            return Err((
                CURV_INVALID_ARGUMENT,
                format!("{param_count} parameters given where the train step has {}", train.params.len()),
            ));
        }
        if input_count != context.inputs.len() as i64 {
            return Err((
                CURV_INVALID_ARGUMENT,
                format!("{input_count} inputs given where the train step reads {}", context.inputs.len()),
            ));
        }
        let (param_views, input_views, _) = parameter_and_input_views(train, params, &context.inputs, inputs)?;
        let mut value = f64::NAN;
        context.train_step_on_views(&param_views, &input_views, &mut value)?;
        if !loss.is_null() {
            *loss = value;
        }
        Ok(())
    })
}

/// The number of data fields the model reads (its inputs), or -1 when the library has no model
/// on its own (the loss has no `logits` or `prediction` output).
///
/// # Safety
///
/// `context` is null or a live context.
#[no_mangle]
pub unsafe extern "C" fn curv_model_input_count(context: *const Context) -> i64 {
    if context.is_null() {
        return -1;
    }
    let context = &*context;
    context.model.as_ref().map_or(-1, |model| model.inputs.len() as i64)
}

/// The name of model input `index` (`SOURCE.FIELD`), or null. Its shape is that of the train
/// step's input of the same name.
///
/// # Safety
///
/// `context` is null or a live context.
#[no_mangle]
pub unsafe extern "C" fn curv_model_input_name(context: *const Context, index: i64) -> *const c_char {
    if context.is_null() || index < 0 {
        return std::ptr::null();
    }
    let context = &*context;
    let Some(model) = &context.model else { return std::ptr::null() };
    model.inputs.get(index as usize).map_or(std::ptr::null(), |input| input.name.as_ptr())
}

/// Writes up to `capacity` dimensions of the model's output and returns its rank (-1: no model).
///
/// # Safety
///
/// `context` is null or a live context; `dims` is null or has room for `capacity` values.
#[no_mangle]
pub unsafe extern "C" fn curv_model_output_shape(context: *const Context, dims: *mut i64, capacity: i64) -> i64 {
    if context.is_null() {
        return -1;
    }
    let context = &*context;
    let Some(model) = &context.model else { return -1 };
    if !dims.is_null() {
        for (position, &size) in model.output_shape.iter().enumerate().take(capacity.max(0) as usize) {
            *dims.add(position) = size as i64;
        }
    }
    model.output_shape.len() as i64
}

/// Validated parameters and inputs of a call, and their float dtype.
type ModelViews = (Vec<View>, Vec<View>, DType);

/// Validates the parameter and model-input lists of a model call.
unsafe fn model_views(
    context: &Context,
    param_count: i64,
    params: *const *const DLManagedTensor,
    input_count: i64,
    inputs: *const *const DLManagedTensor,
) -> Result<ModelViews, (c_int, String)> {
    let program = context.program.as_ref().ok_or((CURV_CONTEXT_ERROR, "no program".to_string()))?;
    let model = context.model.as_ref().ok_or((
        CURV_CONTEXT_ERROR,
        "the loss has no `logits` or `prediction` output: there is no model on its own".to_string(),
    ))?;
    let train = &program.trains[0];
    if params.is_null() || inputs.is_null() {
        return Err((CURV_INVALID_ARGUMENT, "the parameter or input list is a null pointer".to_string()));
    }
    if param_count != train.params.len() as i64 || input_count != model.inputs.len() as i64 {
        return Err((
            CURV_INVALID_ARGUMENT,
            format!(
                "{param_count} parameters and {input_count} inputs given where the model has {} and {}",
                train.params.len(),
                model.inputs.len()
            ),
        ));
    }
    parameter_and_input_views(train, params, &model.inputs, inputs)
}

/// Checks the parameter list (the train block's shapes, one float dtype) and the input list (the
/// fields' shapes; int32 labels, floats in the parameters' dtype); the lists' lengths are checked
/// by the caller.
unsafe fn parameter_and_input_views(
    train: &curv_ir::TrainProgram,
    params: *const *const DLManagedTensor,
    fields: &[InputField],
    inputs: *const *const DLManagedTensor,
) -> Result<ModelViews, (c_int, String)> {
    let mut param_views: Vec<View> = Vec::new();
    for (index, param) in train.params.iter().enumerate() {
        let shape: Vec<usize> = param.ty.shape.iter().map(|dim| known_size(dim) as usize).collect();
        let view = validate(*params.add(index), &shape, &format!("parameter {index} (`{}`)", param.name), false)
            .map_err(|message| (CURV_INVALID_ARGUMENT, message))?;
        if param_views.first().is_some_and(|first| first.dtype != view.dtype) {
            return Err((CURV_INVALID_ARGUMENT, format!("`{}`: every parameter must have one dtype", param.name)));
        }
        param_views.push(view);
    }
    let float = param_views.first().map_or(DType::F32, |view| view.dtype);
    let mut input_views = Vec::new();
    for (index, input) in fields.iter().enumerate() {
        let what = format!("input {index} (`{}`)", input.name.to_string_lossy());
        let view = validate(*inputs.add(index), &input.shape, &what, input.dtype == DType::I32)
            .map_err(|message| (CURV_INVALID_ARGUMENT, message))?;
        let expected = if input.dtype == DType::I32 { DType::I32 } else { float };
        if view.dtype != expected {
            return Err((CURV_INVALID_ARGUMENT, format!("{what} must be {expected:?} like the parameters")));
        }
        input_views.push(view);
    }
    Ok((param_views, input_views, float))
}

/// Evaluates a model function (`forward` or `backward`) on views, in element type `T`, and writes
/// the named outputs into `destinations` (validated views of their shapes).
fn evaluate_model<T: TrainElement>(
    context: &Context,
    backward: bool,
    params: &[View],
    inputs: &[View],
    cotangent: Option<&View>,
    destinations: &[(&str, &View)],
) -> Result<(), (c_int, String)> {
    let program = context.program.as_ref().ok_or((CURV_CONTEXT_ERROR, "no program".to_string()))?;
    let model = context.model.as_ref().ok_or((CURV_CONTEXT_ERROR, "no model".to_string()))?;
    let train = &program.trains[0];
    let mut values = curv_interp::Inputs::<T>::default();
    for (view, param) in params.iter().zip(&train.params) {
        let shape: Vec<usize> = param.ty.shape.iter().map(|dim| known_size(dim) as usize).collect();
        values.params.push(Tensor::new(
            shape,
            unsafe { std::slice::from_raw_parts(view.data as *const T, view.count) }.to_vec(),
        ));
    }
    for (view, input) in inputs.iter().zip(&model.inputs) {
        values.data.insert((input.source.clone(), input.field.clone()), T::value(view, &input.shape));
    }
    if let Some(cotangent) = cotangent {
        values.inputs.push(T::value(cotangent, &model.output_shape));
    }
    let (key, function) =
        if backward { ("model.backward", &model.backward) } else { ("model.forward", &model.forward) };
    let backend = T::backend();
    let outputs = backend.outputs(key, function, &values).map_err(|message| (CURV_RUNTIME_ERROR, message))?;
    for (name, destination) in destinations {
        let value = outputs
            .iter()
            .find(|(output, _)| output == name)
            .and_then(|(_, value)| value.as_real())
            .ok_or((CURV_RUNTIME_ERROR, format!("the model computed no `{name}`")))?;
        if value.data.len() != destination.count {
            return Err((
                CURV_RUNTIME_ERROR,
                format!("`{name}` has {} elements, not {}", value.data.len(), destination.count),
            ));
        }
        unsafe { std::ptr::copy_nonoverlapping(value.data.as_ptr(), destination.data as *mut T, destination.count) };
    }
    Ok(())
}

/// The model's forward pass: `output` (the shape of `curv_model_output_shape`, the parameters'
/// dtype) receives the prediction of the `.curv` model for `inputs` (the model's data fields).
///
/// # Safety
///
/// As for [`curv_train_step`]; `output` is null or a DLPack tensor of the output's shape.
#[no_mangle]
pub unsafe extern "C" fn curv_model_forward(
    context: *mut Context,
    param_count: i64,
    params: *const *const DLManagedTensor,
    input_count: i64,
    inputs: *const *const DLManagedTensor,
    output: *const DLManagedTensor,
) -> c_int {
    guarded(context, |context| {
        let (param_views, input_views, float) = model_views(context, param_count, params, input_count, inputs)?;
        let shape = context.model.as_ref().map(|model| model.output_shape.clone()).unwrap_or_default();
        let output =
            validate(output, &shape, "the output", false).map_err(|message| (CURV_INVALID_ARGUMENT, message))?;
        if output.dtype != float {
            return Err((CURV_INVALID_ARGUMENT, "the output must have the parameters' dtype".to_string()));
        }
        let destinations = [("output", &output)];
        match float {
            DType::F64 => evaluate_model::<f64>(context, false, &param_views, &input_views, None, &destinations),
            _ => evaluate_model::<f32>(context, false, &param_views, &input_views, None, &destinations),
        }
    })
}

/// The model's vector-Jacobian product: given `cotangent` (the output's shape), `param_grads[i]`
/// receives the gradient of `<cotangent, output>` with respect to parameter `i`, and
/// `input_grads[j]` with respect to model input `j` (null entries are skipped; int32 inputs have
/// none).
///
/// # Safety
///
/// As for [`curv_model_forward`]; `param_grads` and `input_grads` hold their counts of pointers.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn curv_model_backward(
    context: *mut Context,
    param_count: i64,
    params: *const *const DLManagedTensor,
    input_count: i64,
    inputs: *const *const DLManagedTensor,
    cotangent: *const DLManagedTensor,
    param_grads: *const *const DLManagedTensor,
    input_grads: *const *const DLManagedTensor,
) -> c_int {
    guarded(context, |context| {
        let (param_views, input_views, float) = model_views(context, param_count, params, input_count, inputs)?;
        let program = context.program.as_ref().ok_or((CURV_CONTEXT_ERROR, "no program".to_string()))?;
        let model = context.model.as_ref().ok_or((CURV_CONTEXT_ERROR, "no model".to_string()))?;
        let cotangent = validate(cotangent, &model.output_shape, "the cotangent", false)
            .map_err(|message| (CURV_INVALID_ARGUMENT, message))?;
        if cotangent.dtype != float {
            return Err((CURV_INVALID_ARGUMENT, "the cotangent must have the parameters' dtype".to_string()));
        }
        if param_grads.is_null() || input_grads.is_null() {
            return Err((CURV_INVALID_ARGUMENT, "a gradient list is a null pointer".to_string()));
        }
        let mut names = Vec::new();
        let mut views = Vec::new();
        for (index, param) in program.trains[0].params.iter().enumerate() {
            let pointer = *param_grads.add(index);
            if pointer.is_null() {
                continue;
            }
            let shape: Vec<usize> = param.ty.shape.iter().map(|dim| known_size(dim) as usize).collect();
            let view = validate(pointer, &shape, &format!("the gradient of `{}`", param.name), false)
                .map_err(|message| (CURV_INVALID_ARGUMENT, message))?;
            names.push(format!("grad.{}", param.name));
            views.push(view);
        }
        for (index, input) in model.inputs.iter().enumerate() {
            let pointer = *input_grads.add(index);
            if pointer.is_null() || input.dtype == DType::I32 {
                continue;
            }
            let name = input.name.to_string_lossy().into_owned();
            let view = validate(pointer, &input.shape, &format!("the gradient of `{name}`"), false)
                .map_err(|message| (CURV_INVALID_ARGUMENT, message))?;
            names.push(format!("grad.{name}"));
            views.push(view);
        }
        if views.iter().any(|view| view.dtype != float) {
            return Err((CURV_INVALID_ARGUMENT, "the gradients must have the parameters' dtype".to_string()));
        }
        let destinations: Vec<(&str, &View)> = names.iter().map(String::as_str).zip(&views).collect();
        match float {
            DType::F64 => {
                evaluate_model::<f64>(context, true, &param_views, &input_views, Some(&cotangent), &destinations)
            }
            _ => evaluate_model::<f32>(context, true, &param_views, &input_views, Some(&cotangent), &destinations),
        }
    })
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
