//! `curv_train_step`: one step of the file's own training on the caller's batch (forward,
//! backward, the statistics the optimizer asks for and the update), run by the trainer of the
//! parameters' precision.

use super::*;

pub(super) trait TrainElement: Element {
    fn trainer<'a>(
        slot: &'a mut TrainerSlot,
        program: &Program,
    ) -> Result<&'a mut curv_runtime::trainer::Trainer<Self>, String>;
    fn value(view: &View, shape: &[usize]) -> curv_interp::Value<Self>;
}

pub(super) fn new_trainer<T: Element>(program: &Program) -> Box<curv_runtime::trainer::Trainer<T>> {
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
pub(super) fn values_of<T: curv_interp::Real>(view: &View, shape: &[usize]) -> curv_interp::Value<T> {
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
pub(super) fn train_with<T: TrainElement>(
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
