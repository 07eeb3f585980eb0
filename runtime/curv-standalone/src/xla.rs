//! XLA FFI handlers of a library (`curv build --lib`), for JAX: the model's forward pass and its
//! vector-Jacobian product as `jax.ffi` targets (`curv_xla_model_forward`,
//! `curv_xla_model_backward`), which the generated Python module registers and wraps in a
//! `jax.custom_vjp`, and the optimizer step and the train step (`curv_xla_optimizer_step`,
//! `curv_xla_train_step`), which return the new parameters and keep the optimizer's state in a
//! context of the library named by the call's `context` attribute. They follow XLA's FFI C API
//! (`xla/ffi/api/c_api.h`, API version 0.3): answer the metadata query, do nothing before the
//! execute stage, read the argument buffers and write the result buffers, reporting problems as
//! XLA FFI errors. The model handlers use one context of the library, made on first use.

use crate::abi::{self, Context, View};
use curv_ir::DType;
use std::ffi::{c_char, c_void, CString};
use std::sync::{Mutex, OnceLock};

#[repr(C)]
struct ExtensionBase {
    struct_size: usize,
    kind: i32,
    next: *mut ExtensionBase,
}

#[repr(C)]
struct ApiVersion {
    struct_size: usize,
    extension_start: *mut ExtensionBase,
    major_version: i32,
    minor_version: i32,
}

#[repr(C)]
struct Metadata {
    struct_size: usize,
    api_version: ApiVersion,
    traits: u32,
    state_type_id: i64,
}

#[repr(C)]
struct MetadataExtension {
    extension_base: ExtensionBase,
    metadata: *mut Metadata,
}

#[repr(C)]
struct ErrorCreateArgs {
    struct_size: usize,
    extension_start: *mut ExtensionBase,
    message: *const c_char,
    errc: i32,
}

/// The start of `XLA_FFI_Api`: the fields before and including `XLA_FFI_Error_Create`.
#[repr(C)]
struct Api {
    struct_size: usize,
    extension_start: *mut ExtensionBase,
    api_version: ApiVersion,
    internal_api: *const c_void,
    error_create: unsafe extern "C" fn(*mut ErrorCreateArgs) -> *mut c_void,
}

#[repr(C)]
struct Args {
    struct_size: usize,
    extension_start: *mut ExtensionBase,
    size: i64,
    types: *mut i32,
    args: *mut *mut c_void,
}

#[repr(C)]
struct Attrs {
    struct_size: usize,
    extension_start: *mut ExtensionBase,
    size: i64,
    types: *mut i32,
    names: *mut *mut c_void,
    attrs: *mut *mut c_void,
}

#[repr(C)]
struct ByteSpan {
    pointer: *const c_char,
    length: usize,
}

#[repr(C)]
struct Scalar {
    dtype: i32,
    value: *mut c_void,
}

#[repr(C)]
pub struct CallFrame {
    struct_size: usize,
    extension_start: *mut ExtensionBase,
    api: *const Api,
    context: *mut c_void,
    stage: i32,
    args: Args,
    rets: Args,
    attrs: Attrs,
    future: *mut c_void,
}

#[repr(C)]
struct Buffer {
    struct_size: usize,
    extension_start: *mut ExtensionBase,
    dtype: i32,
    data: *mut c_void,
    rank: i64,
    dims: *mut i64,
}

const EXTENSION_METADATA: i32 = 1;
const STAGE_EXECUTE: i32 = 3;
const ARG_BUFFER: i32 = 1;
const ATTR_SCALAR: i32 = 3;
const DTYPE_S32: i32 = 4;
const DTYPE_S64: i32 = 5;
const DTYPE_U64: i32 = 9;
const DTYPE_F32: i32 = 11;
const DTYPE_F64: i32 = 12;
const ERROR_INVALID_ARGUMENT: i32 = 3;
const ERROR_FAILED_PRECONDITION: i32 = 9;
const ERROR_INTERNAL: i32 = 13;

static CONTEXT: OnceLock<Mutex<usize>> = OnceLock::new();

/// The library's context for JAX calls (made once, never freed: it lives as long as the process
/// may call the handlers).
fn context() -> &'static Mutex<usize> {
    CONTEXT.get_or_init(|| Mutex::new(unsafe { abi::curv_context_new(std::ptr::null()) } as usize))
}

unsafe fn error(frame: &CallFrame, code: i32, message: &str) -> *mut c_void {
    let text = CString::new(message.replace('\0', " ")).unwrap_or_default();
    let mut args = ErrorCreateArgs {
        struct_size: std::mem::size_of::<ErrorCreateArgs>(),
        extension_start: std::ptr::null_mut(),
        message: text.as_ptr(),
        errc: code,
    };
    ((*frame.api).error_create)(&mut args)
}

/// Answers XLA's metadata query (the FFI version this handler was built against), if this call is
/// one.
unsafe fn answered_metadata(frame: &CallFrame) -> bool {
    let extension = frame.extension_start;
    if extension.is_null() || (*extension).kind != EXTENSION_METADATA {
        return false;
    }
    let metadata = (*(extension as *mut MetadataExtension)).metadata;
    if !metadata.is_null() {
        (*metadata).api_version.major_version = 0;
        (*metadata).api_version.minor_version = 3;
        (*metadata).traits = 0;
    }
    true
}

/// The buffers of an argument or result list, checked to be buffers.
unsafe fn buffers(list: &Args, what: &str) -> Result<Vec<*mut Buffer>, String> {
    (0..list.size.max(0) as usize)
        .map(|index| {
            if *list.types.add(index) != ARG_BUFFER {
                return Err(format!("{what} {index} is not a buffer"));
            }
            Ok(*list.args.add(index) as *mut Buffer)
        })
        .collect()
}

/// A view of a buffer with the expected shape (and element type, when `dtype` is given).
unsafe fn view(buffer: *mut Buffer, shape: &[usize], dtype: Option<DType>, what: &str) -> Result<View, String> {
    let buffer = &*buffer;
    let element = match buffer.dtype {
        DTYPE_F32 => DType::F32,
        DTYPE_F64 => DType::F64,
        DTYPE_S32 => DType::I32,
        other => return Err(format!("{what} has XLA element type {other}; float32, float64 or int32 is needed")),
    };
    if dtype.is_some_and(|expected| expected != element) {
        return Err(format!("{what} is {element:?} where {:?} is needed", dtype.unwrap_or(element)));
    }
    let dims: Vec<i64> = if buffer.rank <= 0 {
        Vec::new()
    } else {
        std::slice::from_raw_parts(buffer.dims, buffer.rank as usize).to_vec()
    };
    if dims.iter().map(|&dim| dim as usize).ne(shape.iter().copied()) {
        return Err(format!("{what} has shape {dims:?} where {shape:?} is needed"));
    }
    Ok(View::new(buffer.data as *mut u8, shape.iter().product(), element))
}

/// One handler call: nothing for a null frame, the metadata query or a stage before execution;
/// else `body`, with its error (or a panic, caught) returned as an XLA FFI error.
unsafe fn handle(frame: *mut CallFrame, body: impl FnOnce(&CallFrame) -> Result<(), (i32, String)>) -> *mut c_void {
    if frame.is_null() {
        return std::ptr::null_mut();
    }
    let frame = &*frame;
    if answered_metadata(frame) || frame.stage != STAGE_EXECUTE {
        return std::ptr::null_mut();
    }
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(frame))) {
        Ok(Ok(())) => std::ptr::null_mut(),
        Ok(Err((code, message))) => error(frame, code, &message),
        Err(_) => error(frame, ERROR_INTERNAL, "internal error in curv (a bug): the call was abandoned"),
    }
}

/// The model's forward pass or its vector-Jacobian product, on the handlers' own context.
unsafe fn run(frame: *mut CallFrame, backward: bool) -> *mut c_void {
    handle(frame, |frame| {
        let guard = context().lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let context = &mut *(*guard as *mut Context);
        call(context, frame, backward)
    })
}

unsafe fn call(context: &mut Context, frame: &CallFrame, backward: bool) -> Result<(), (i32, String)> {
    let invalid = |message: String| (ERROR_INVALID_ARGUMENT, message);
    let layout = context.model_layout().map_err(|message| (ERROR_INVALID_ARGUMENT, message))?;
    let arguments = buffers(&frame.args, "argument").map_err(invalid)?;
    let results = buffers(&frame.rets, "result").map_err(invalid)?;
    let expected_arguments = layout.params.len() + layout.inputs.len() + usize::from(backward);
    if arguments.len() != expected_arguments {
        return Err(invalid(format!("{} arguments where {expected_arguments} are needed", arguments.len())));
    }
    let mut params = Vec::new();
    for (index, (name, shape)) in layout.params.iter().enumerate() {
        let dtype = params.first().map(|first: &View| first.dtype);
        params.push(view(arguments[index], shape, dtype, &format!("parameter `{name}`")).map_err(invalid)?);
    }
    let float = params.first().map_or(DType::F32, |first| first.dtype);
    if float == DType::I32 {
        return Err(invalid("the parameters must be float32 or float64".to_string()));
    }
    let mut inputs = Vec::new();
    for (offset, (name, shape, integer)) in layout.inputs.iter().enumerate() {
        let dtype = if *integer { DType::I32 } else { float };
        inputs.push(
            view(arguments[params.len() + offset], shape, Some(dtype), &format!("input `{name}`")).map_err(invalid)?,
        );
    }
    if !backward {
        let [output] = results[..] else { return Err(invalid(format!("{} results where 1 is needed", results.len()))) };
        let output = view(output, &layout.output, Some(float), "the output").map_err(invalid)?;
        return context.run_model(false, &params, &inputs, None, &[("output".to_string(), output)]);
    }
    let cotangent =
        view(*arguments.last().unwrap_or(&std::ptr::null_mut()), &layout.output, Some(float), "the cotangent")
            .map_err(invalid)?;
    let float_inputs: Vec<&(String, Vec<usize>, bool)> =
        layout.inputs.iter().filter(|(_, _, integer)| !integer).collect();
    if results.len() != params.len() + float_inputs.len() {
        return Err(invalid(format!(
            "{} results where {} are needed",
            results.len(),
            params.len() + float_inputs.len()
        )));
    }
    let mut destinations = Vec::new();
    for ((name, shape), result) in layout.params.iter().zip(&results) {
        destinations.push((
            format!("grad.{name}"),
            view(*result, shape, Some(float), &format!("the gradient of `{name}`")).map_err(invalid)?,
        ));
    }
    for ((name, shape, _), result) in float_inputs.iter().zip(&results[params.len()..]) {
        destinations.push((
            format!("grad.{name}"),
            view(*result, shape, Some(float), &format!("the gradient of `{name}`")).map_err(invalid)?,
        ));
    }
    context.run_model(true, &params, &inputs, Some(&cotangent), &destinations)
}

/// The model's forward pass as an XLA FFI handler: arguments the parameters then the model's
/// inputs; one result, the output.
///
/// # Safety
///
/// Called by XLA with a valid call frame.
#[no_mangle]
pub unsafe extern "C" fn curv_xla_model_forward(frame: *mut CallFrame) -> *mut c_void {
    run(frame, false)
}

/// The model's vector-Jacobian product as an XLA FFI handler: arguments the parameters, the
/// model's inputs and the cotangent; results the gradients of the parameters then of the float
/// inputs.
///
/// # Safety
///
/// Called by XLA with a valid call frame.
#[no_mangle]
pub unsafe extern "C" fn curv_xla_model_backward(frame: *mut CallFrame) -> *mut c_void {
    run(frame, true)
}

/// The value of the call's `context` attribute (a 64-bit integer scalar: the address of a context
/// of this library).
unsafe fn context_attribute(attrs: &Attrs) -> Result<u64, String> {
    for index in 0..attrs.size.max(0) as usize {
        let name = &*(*attrs.names.add(index) as *const ByteSpan);
        if std::slice::from_raw_parts(name.pointer as *const u8, name.length) != b"context" {
            continue;
        }
        if *attrs.types.add(index) != ATTR_SCALAR {
            return Err("the `context` attribute is not a scalar".to_string());
        }
        let scalar = &*(*attrs.attrs.add(index) as *const Scalar);
        return match scalar.dtype {
            DTYPE_U64 | DTYPE_S64 => Ok(*(scalar.value as *const u64)),
            other => Err(format!("the `context` attribute has XLA element type {other}; a 64-bit integer is needed")),
        };
    }
    Err("the call has no `context` attribute (the library context whose optimizer state it updates)".to_string())
}

/// Runs the optimizer step (`train` false) or the train step of the context the call names.
unsafe fn run_step(frame: *mut CallFrame, train: bool) -> *mut c_void {
    handle(frame, |frame| {
        let address = context_attribute(&frame.attrs).map_err(|message| (ERROR_INVALID_ARGUMENT, message))?;
        abi::with_live_context(address, |context| step(context, frame, train)).unwrap_or_else(|| {
            Err((ERROR_INVALID_ARGUMENT, format!("the `context` attribute ({address:#x}) is not a live curv context")))
        })
    })
}

/// One step: the arguments are the parameters then the gradients (optimizer step) or the train
/// step's inputs; the results are the new parameters (then, for the train step, the batch's loss
/// as a scalar of the parameters' type). The parameters are copied into the results (nothing is
/// copied where XLA aliased them) and updated there in place.
unsafe fn step(context: &mut Context, frame: &CallFrame, train: bool) -> Result<(), (i32, String)> {
    let invalid = |message: String| (ERROR_INVALID_ARGUMENT, message);
    let layout = context.step_layout().map_err(|message| (ERROR_FAILED_PRECONDITION, message))?;
    let arguments = buffers(&frame.args, "argument").map_err(invalid)?;
    let results = buffers(&frame.rets, "result").map_err(invalid)?;
    let count = layout.params.len();
    let expected_arguments = count + if train { layout.inputs.len() } else { count };
    if arguments.len() != expected_arguments {
        return Err(invalid(format!("{} arguments where {expected_arguments} are needed", arguments.len())));
    }
    let expected_results = count + usize::from(train);
    if results.len() != expected_results {
        return Err(invalid(format!("{} results where {expected_results} are needed", results.len())));
    }
    let mut params = Vec::new();
    let mut float = None;
    for (index, (name, shape)) in layout.params.iter().enumerate() {
        let source = view(arguments[index], shape, float, &format!("parameter `{name}`")).map_err(invalid)?;
        if source.dtype == DType::I32 {
            return Err(invalid("the parameters must be float32 or float64".to_string()));
        }
        float = Some(source.dtype);
        let destination = view(results[index], shape, float, &format!("the new value of `{name}`")).map_err(invalid)?;
        params.push((source, destination));
    }
    let float = float.unwrap_or(DType::F32);
    let code = |(code, message): (std::ffi::c_int, String)| {
        let code = match code {
            abi::CURV_INVALID_ARGUMENT => ERROR_INVALID_ARGUMENT,
            abi::CURV_CONTEXT_ERROR => ERROR_FAILED_PRECONDITION,
            _ => ERROR_INTERNAL,
        };
        (code, message)
    };
    if !train {
        let mut grads = Vec::new();
        for (index, (name, shape)) in layout.params.iter().enumerate() {
            grads.push(
                view(arguments[count + index], shape, Some(float), &format!("the gradient of `{name}`"))
                    .map_err(invalid)?,
            );
        }
        for (source, destination) in &params {
            destination.copy_from(source);
        }
        let destinations: Vec<View> = params.into_iter().map(|(_, destination)| destination).collect();
        return context.optimizer_step_on_views(&destinations, &grads).map_err(code);
    }
    let mut inputs = Vec::new();
    for (offset, (name, shape, integer)) in layout.inputs.iter().enumerate() {
        let dtype = if *integer { DType::I32 } else { float };
        inputs.push(view(arguments[count + offset], shape, Some(dtype), &format!("input `{name}`")).map_err(invalid)?);
    }
    let loss_view = view(results[count], &[], Some(float), "the loss").map_err(invalid)?;
    for (source, destination) in &params {
        destination.copy_from(source);
    }
    let destinations: Vec<View> = params.into_iter().map(|(_, destination)| destination).collect();
    let mut loss = f64::NAN;
    context.train_step_on_views(&destinations, &inputs, &mut loss).map_err(code)?;
    loss_view.write_scalar(loss);
    Ok(())
}

/// One optimizer step as an XLA FFI handler: arguments the parameters then their gradients, the
/// attribute `context` the library context that keeps the optimizer's state; results the new
/// parameters.
///
/// # Safety
///
/// Called by XLA with a valid call frame.
#[no_mangle]
pub unsafe extern "C" fn curv_xla_optimizer_step(frame: *mut CallFrame) -> *mut c_void {
    run_step(frame, false)
}

/// One train step as an XLA FFI handler: arguments the parameters then the train step's inputs,
/// the attribute `context` the library context that keeps the optimizer's state; results the new
/// parameters then the batch's loss.
///
/// # Safety
///
/// Called by XLA with a valid call frame.
#[no_mangle]
pub unsafe extern "C" fn curv_xla_train_step(frame: *mut CallFrame) -> *mut c_void {
    run_step(frame, true)
}
