//! One optimizer step on the caller's tensors: the arguments validated against the parameters'
//! layout, the update run in place (on device memory when the state is resident), and the
//! parameters and state restored when an update fails.

use super::*;

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
pub(super) unsafe fn validate_on(
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
pub(super) unsafe fn validate(
    tensor: *const DLManagedTensor,
    shape: &[usize],
    what: &str,
    integers: bool,
) -> Result<View, String> {
    validate_on(tensor, shape, what, integers, false)
}

/// Host copies of the CUDA tensors among `views` (the others as they are): the buffers that hold
/// the copies and the views to step on.
pub(super) fn stage_to_host(views: &[View]) -> Result<(Vec<Vec<u64>>, Vec<View>), String> {
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

pub(super) trait Element: curv_interp::Real {
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
pub(super) enum Undo<T> {
    /// A copy made before an in-place update.
    Copy(ParamState<T>),
    /// What an out-of-place update replaced.
    Displaced(curv_runtime::optimizer::Displaced<T>),
}

/// The number of an optimizer step's context's next step, and its learning rate.
pub(super) fn next_step(context: &Context) -> Result<(u64, f64), (c_int, String)> {
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
pub(super) fn resident_step_possible(
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
pub(super) fn step_resident(context: &mut Context, params: &[View], grads: &[View]) -> Result<(), (c_int, String)> {
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
pub(super) fn step_with<T: Element>(
    context: &mut Context,
    params: &[View],
    grads: &[View],
) -> Result<(), (c_int, String)> {
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
pub(super) fn update_failed(error: curv_runtime::Error, name: &str, step: u64) -> String {
    error.parameter(name).step(step).to_string()
}

/// An update that made the parameter non-finite (E0501); the step is not taken.
pub(super) fn non_finite_update(position: usize, name: &str, step: u64, structure: StructureKind) -> String {
    let message = format!("the update made element {position} non-finite; nothing was changed");
    let error = curv_runtime::Error::new(curv_runtime::ErrorCode::NonFinite, message);
    error.parameter(name).step(step).structure(structure.name()).to_string()
}
