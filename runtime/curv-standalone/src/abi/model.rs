//! The model's entry points: its inputs and output shape, `curv_model_forward` and
//! `curv_model_backward` on DLPack tensors (the interpreter runs the model and its vector-Jacobian
//! product), and the layout the XLA handlers read.

use super::*;

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
pub(super) type ModelViews = (Vec<View>, Vec<View>, DType);

/// Validates the parameter and model-input lists of a model call.
pub(super) unsafe fn model_views(
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
pub(super) unsafe fn parameter_and_input_views(
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
pub(super) fn evaluate_model<T: TrainElement>(
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
