//! Updates of the `kronecker` and `orthogonalize` structures: the structure's direction for a
//! parameter, then its modifiers (decoupled weight decay, RMS clipping, momentum) and the step.

use super::*;

/// The `kronecker` and `orthogonalize` structures ([`crate::kronecker`]): the direction, then
/// [`finish_matrix_update`].
pub(super) fn update_matrix<T: Real>(
    plan: &ParamPlan,
    param: &mut Tensor<T>,
    state: &mut ParamState<T>,
    inputs: &UpdateInputs<T>,
) -> Result<Displaced<T>, String> {
    let state_was_empty = state.is_empty();
    let mut previous = None;
    let direction = matrix_direction_or_message(plan, &param.shape, state, inputs, &mut previous)?;
    let original = direction.as_ref().map(|_| param.clone());
    if let Some(direction) = direction {
        finish_matrix_update(plan, param, state, direction, inputs.learning_rate);
    }
    Ok(Displaced { param: original, states: Vec::new(), state_was_empty, whole_state: previous })
}

/// The direction of a `kronecker` or `orthogonalize` update (the step is `-lr * direction`),
/// updating the structure's state; `None` when this step leaves the parameter unchanged.
///
/// An error is E0502 with the plan's structure.
pub fn matrix_direction<T: Real>(
    plan: &ParamPlan,
    shape: &[usize],
    state: &mut ParamState<T>,
    inputs: &UpdateInputs<T>,
    previous: &mut Option<PreviousState<T>>,
) -> Result<Option<Vec<f64>>, crate::Error> {
    matrix_direction_or_message(plan, shape, state, inputs, previous).map_err(|message| update_failed(plan, message))
}

/// [`matrix_direction`], its error a message.
pub(super) fn matrix_direction_or_message<T: Real>(
    plan: &ParamPlan,
    shape: &[usize],
    state: &mut ParamState<T>,
    inputs: &UpdateInputs<T>,
    previous: &mut Option<PreviousState<T>>,
) -> Result<Option<Vec<f64>>, String> {
    let gradient: Vec<f64> = inputs.gradient.data.iter().map(|value| value.to_f64()).collect();
    let kronecker_inputs = crate::kronecker::KroneckerInputs {
        step: inputs.step,
        learning_rate: inputs.learning_rate,
        gradient: &gradient,
        captures: inputs.captures,
        seed: inputs.seed,
        param: inputs.param,
    };
    // The per-step products in the run's precision; the matrix functions stay in double.
    let _precision = crate::kronecker::ProductPrecision::single(std::mem::size_of::<T>() == 4);
    if is_egn(plan) {
        // EGN's direction comes from the trainer's Gauss-Newton system over all its parameters.
        let direction = inputs
            .statistics
            .get("egn")
            .ok_or_else(|| "EGN: the step's Gauss-Newton direction is missing".to_string())?;
        let mut states = crate::kronecker::States::load(state);
        let stepsize =
            inputs.statistics.get("egn_step").and_then(|tensor| tensor.data.first()).map(|value| value.to_f64());
        if let Some(damping) = inputs.statistics.get("egn_damping").and_then(|tensor| tensor.data.first()) {
            states.get("damping", &[1])[0] = damping.to_f64();
        }
        let direction = crate::newton::egn_direction(plan, &mut states, &kronecker_inputs, direction, stepsize)?;
        *previous = Some(PreviousState::whole(states.store(state)));
        return Ok(Some(direction));
    }
    if plan.structure == StructureKind::LowRank
        && option_name(&plan.options, "stats").unwrap_or("gradient_window") == "gradient_window"
    {
        // M-FAC works on its window where it is (a copy of the state is kept for undoing).
        return crate::kronecker::undoable(
            state,
            previous,
            |_| true,
            |state| crate::lowrank::mfac_on_state(plan, shape, state, &kronecker_inputs),
        )
        .map(Some);
    }
    if matches!(plan.structure, StructureKind::LowRank | StructureKind::Dense) {
        // FOSI's eigenpairs and lazy Newton's Hessian, at the steps that refresh them.
        let statistic = block_hessian_statistic(plan, inputs.step)
            .and_then(|kind| inputs.statistics.get(kind))
            .map(|tensor| tensor.data.iter().map(|value| value.to_f64()).collect::<Vec<f64>>());
        let mut states = crate::kronecker::States::load(state);
        let direction = if plan.structure == StructureKind::Dense {
            crate::newton::direction(plan, &mut states, &kronecker_inputs, statistic.as_deref())?
        } else {
            crate::lowrank::direction(plan, shape, &mut states, &kronecker_inputs, statistic.as_deref())?
        };
        *previous = Some(PreviousState::whole(states.store(state)));
        return Ok(Some(direction));
    }
    if plan.structure == StructureKind::Orthogonalize {
        crate::kronecker::orthogonalize_direction(plan, shape, state, &kronecker_inputs, previous).map(Some)
    } else {
        crate::kronecker::kronecker_direction(plan, shape, state, &kronecker_inputs, previous)
    }
}

/// The modifiers and the step of a `kronecker` or `orthogonalize` update: decoupled weight decay
/// `p <- (1 - lr lambda) p`; `rms_clip max`: the direction is scaled down to an RMS of at most
/// `max`; `momentum`: `buffer <- beta buffer + direction`, the direction becomes `buffer` (or
/// `direction + beta buffer` with `nesterov`); then `p <- p - lr * direction`.
pub fn finish_matrix_update<T: Real>(
    plan: &ParamPlan,
    param: &mut Tensor<T>,
    state: &mut ParamState<T>,
    mut direction: Vec<f64>,
    learning_rate: f64,
) {
    for modifier in &plan.modifiers {
        match modifier.name.as_str() {
            "weight_decay" => {
                let factor = 1.0 - learning_rate * option_number(&modifier.options, "lambda").unwrap_or(0.0);
                param.data.iter_mut().for_each(|value| *value = T::from_f64(value.to_f64() * factor));
            }
            "rms_clip" => {
                let limit = option_number(&modifier.options, "max").unwrap_or(1.0);
                let rms =
                    (direction.iter().map(|value| value * value).sum::<f64>() / direction.len().max(1) as f64).sqrt();
                if rms > limit {
                    direction.iter_mut().for_each(|value| *value *= limit / rms);
                }
            }
            _ => {}
        }
    }
    if let Some(momentum) = plan.modifiers.iter().find(|modifier| modifier.name == "momentum") {
        let beta = option_number(&momentum.options, "beta").unwrap_or(0.9);
        let nesterov =
            momentum.options.iter().any(|(key, value)| key == "nesterov" && *value == curv_ir::OptionValue::Bool(true));
        let mut buffer = state_get(state, "momentum_buffer").map_or_else(
            || vec![0.0; direction.len()],
            |tensor| tensor.data.iter().map(|value| value.to_f64()).collect(),
        );
        for (slot, d) in buffer.iter_mut().zip(direction.iter_mut()) {
            *slot = beta * *slot + *d;
            *d = if nesterov { *d + beta * *slot } else { *slot };
        }
        state_set(
            state,
            "momentum_buffer",
            Tensor::new(param.shape.clone(), buffer.into_iter().map(T::from_f64).collect()),
        );
    }
    for (value, d) in param.data.iter_mut().zip(&direction) {
        *value = T::from_f64(value.to_f64() - learning_rate * d);
    }
}
