//! Grouped rule updates: the parameters that share an elementwise rule updated by one call of the
//! replicated kernel (`curv_ir::group`), on host tensors or resident ones, with every member's
//! previous state restored when the update fails.

use super::*;

/// Parameters whose rule updates run together as one multi-parameter kernel per block
/// ([`curv_ir::group::plan_groups`]), with each block replicated over the members.
#[derive(Debug, Clone)]
pub struct RuleGroup {
    pub plans: Vec<usize>,
    pub rule: String,
    /// The rule's update blocks, each replicated over the group's members.
    pub blocks: Vec<Function>,
}

/// The rule groups of an optimizer (groups of two or more parameters), leaving out `excluded`
/// parameters (biases updated with their weight's K-FAC factors).
pub fn rule_groups(plans: &[ParamPlan], rules: &[RuleProgram], excluded: &[usize]) -> Vec<RuleGroup> {
    curv_ir::group::plan_groups(plans, rules, excluded)
        .into_iter()
        .filter_map(|group| {
            let rule = rules.iter().find(|rule| rule.name == group.rule)?;
            let blocks = rule
                .updates
                .iter()
                .map(|update| curv_ir::group::replicate(&update.function, group.plans.len()))
                .collect();
            Some(RuleGroup { plans: group.plans, rule: group.rule, blocks })
        })
        .collect()
}

/// One step of a [`RuleGroup`]: each block that runs at this step is one call of the replicated
/// function on every member's parameter, gradient and states. Returns what each member's update
/// replaced (as [`update_param`] does for one parameter), in the group's order.
///
/// An error is E0502 of the `rule` structure.
pub fn update_rule_group<T: Real>(
    group: &RuleGroup,
    plans: &[ParamPlan],
    rules: &[RuleProgram],
    params: &mut [Tensor<T>],
    states: &mut [ParamState<T>],
    inputs: &[UpdateInputs<T>],
) -> Result<Vec<Displaced<T>>, crate::Error> {
    update_rule_group_or_message(group, plans, rules, params, states, inputs).map_err(|message| {
        crate::Error::new(crate::ErrorCode::UpdateFailed, message).structure(StructureKind::Rule.name())
    })
}

/// [`update_rule_group`], its error a message.
pub(super) fn update_rule_group_or_message<T: Real>(
    group: &RuleGroup,
    plans: &[ParamPlan],
    rules: &[RuleProgram],
    params: &mut [Tensor<T>],
    states: &mut [ParamState<T>],
    inputs: &[UpdateInputs<T>],
) -> Result<Vec<Displaced<T>>, String> {
    let rule =
        rules.iter().find(|rule| rule.name == group.rule).ok_or_else(|| format!("rule `{}` is missing", group.rule))?;
    let first = &plans[group.plans[0]];
    let base = rule_hyperparameters(first, &inputs[0]);
    let mut displaced: Vec<Displaced<T>> = Vec::with_capacity(group.plans.len());
    for (member, &plan_index) in group.plans.iter().enumerate() {
        let plan = &plans[plan_index];
        let (param, state) = (&mut params[plan.param], &mut states[plan.param]);
        if inputs[member].param_lent.is_some() {
            return Err("a grouped rule update reads parameters it owns, not lent ones".to_string());
        }
        let original = plan.modifiers.iter().any(|modifier| modifier.name == "weight_decay").then(|| param.clone());
        apply_weight_decay(plan, param, inputs[member].learning_rate);
        displaced.push(Displaced {
            param: original,
            states: Vec::new(),
            state_was_empty: state.is_empty(),
            whole_state: None,
        });
        initialise_state(rule, &base, param, state, &inputs[member])?;
        if rule.state.iter().any(|name| state_get(state, name).is_none()) {
            return Err(format!("a state of rule `{}` is missing", rule.name));
        }
    }
    let step = inputs[0].step;
    for (block, rule_update) in rule.updates.iter().enumerate() {
        if !rule_update.runs_at(step) {
            continue;
        }
        let function = &group.blocks[block];
        let sizes: Vec<usize> = group.plans.iter().map(|&plan_index| params[plans[plan_index].param].len()).collect();
        let key = crate::backend::keys::rule_group_block(&rule.name, block, &sizes);
        // Every member's parameter and states are moved into the inputs, and moved back below
        // unless the block writes them (as in the one-parameter update).
        let mut update_inputs = base.clone();
        for (member, &plan_index) in group.plans.iter().enumerate() {
            let index = plans[plan_index].param;
            let parameter_data = std::mem::take(&mut params[index].data);
            update_inputs.inputs.push(Value::Real(Tensor::new(vec![parameter_data.len()], parameter_data)));
            let gradient = inputs[member].gradient.data;
            update_inputs.inputs.push(placeholder());
            update_inputs.lend(update_inputs.inputs.len() - 1, vec![gradient.len()], gradient);
            for name in &rule.state {
                let tensor = state_get_mut(&mut states[index], name).expect("checked above");
                update_inputs
                    .inputs
                    .push(Value::Real(Tensor::new(tensor.shape.clone(), std::mem::take(&mut tensor.data))));
            }
        }
        let outputs = inputs[0].backend.outputs(&key, function, &update_inputs);
        let per_member = 2 + rule.state.len();
        let mut moved: Vec<Option<Tensor<T>>> = update_inputs
            .inputs
            .into_iter()
            .map(|value| match value {
                Value::Real(tensor) => Some(tensor),
                Value::Int(_) => None,
            })
            .collect();
        let mut written = vec![false; moved.len()];
        let outputs = match outputs {
            Ok(outputs) => outputs,
            Err(error) => {
                // Put everything back before reporting.
                restore_group(group, plans, rule, params, states, &mut moved, &written);
                return Err(format!("rule `{}`: {error}", rule.name));
            }
        };
        for (name, value) in outputs {
            let Value::Real(tensor) = value else {
                return Err(format!("`{name}` is not a float tensor"));
            };
            let (member, output) = name
                .split_once(':')
                .and_then(|(member, output)| member.parse::<usize>().ok().map(|member| (member, output)))
                .ok_or_else(|| format!("unexpected output `{name}` of a grouped update"))?;
            let index = plans[group.plans[member]].param;
            if let Some(position) = rule.state.iter().position(|state_name| state_name == output) {
                *state_get_mut(&mut states[index], output).expect("checked above") = tensor;
                let slot = member * per_member + 2 + position;
                written[slot] = true;
                if !displaced[member].states.iter().any(|(key, _)| key == output) {
                    if let Some(old) = moved[slot].take() {
                        displaced[member].states.push((output.to_string(), old));
                    }
                }
            } else {
                let shape = params[index].shape.clone();
                params[index] = Tensor::new(shape.clone(), tensor.data);
                let slot = member * per_member;
                written[slot] = true;
                if displaced[member].param.is_none() {
                    if let Some(old) = moved[slot].take() {
                        displaced[member].param = Some(Tensor::new(shape, old.data));
                    }
                }
            }
        }
        restore_group(group, plans, rule, params, states, &mut moved, &written);
    }
    Ok(displaced)
}

/// Moves the inputs a grouped block did not write back into the parameters and states.
pub(super) fn restore_group<T: Real>(
    group: &RuleGroup,
    plans: &[ParamPlan],
    rule: &RuleProgram,
    params: &mut [Tensor<T>],
    states: &mut [ParamState<T>],
    moved: &mut [Option<Tensor<T>>],
    written: &[bool],
) {
    let per_member = 2 + rule.state.len();
    for (member, &plan_index) in group.plans.iter().enumerate() {
        let index = plans[plan_index].param;
        let slot = member * per_member;
        if !written[slot] {
            if let Some(tensor) = moved[slot].take() {
                params[index].data = tensor.data;
            }
        }
        for (position, name) in rule.state.iter().enumerate() {
            let slot = member * per_member + 2 + position;
            if !written[slot] {
                if let Some(tensor) = moved[slot].take() {
                    if let Some(state) = state_get_mut(&mut states[index], name) {
                        state.data = tensor.data;
                    }
                }
            }
        }
    }
}

/// What [`update_rule_resident`] computed: the new parameter (None when no block wrote it) and
/// the states it made or replaced, all resident. The previous ones are untouched, so a caller
/// that finds a problem afterwards drops these and has nothing to undo.
pub struct ResidentUpdate<T> {
    pub param: Option<Resident<T>>,
    pub states: Vec<(String, Resident<T>)>,
}

/// `plan`'s rule update of one parameter at `step` with every tensor resident where `backend`
/// computes: its states initialised first when `state` is empty (the rule's `init` on the
/// parameter and gradient), then each block due at the step, reading the parameter, gradient and
/// states where they are and keeping its outputs there. The tensors are read flat, as a rule's
/// functions take them. The numbers are those of [`update_param`] for the plan.
///
/// An error is E0502 with the plan's structure and the step.
#[allow(clippy::too_many_arguments)]
pub fn update_rule_resident<T: Real>(
    plan: &ParamPlan,
    rules: &[RuleProgram],
    backend: &dyn Backend<T>,
    step: u64,
    learning_rate: f64,
    batch: usize,
    param: &Resident<T>,
    gradient: &Resident<T>,
    state: &[(String, Resident<T>)],
) -> Result<ResidentUpdate<T>, crate::Error> {
    update_rule_resident_or_message(plan, rules, backend, step, learning_rate, batch, param, gradient, state)
        .map_err(|message| update_failed(plan, message).step(step))
}

/// [`update_rule_resident`], its error a message.
#[allow(clippy::too_many_arguments)]
pub(super) fn update_rule_resident_or_message<T: Real>(
    plan: &ParamPlan,
    rules: &[RuleProgram],
    backend: &dyn Backend<T>,
    step: u64,
    learning_rate: f64,
    batch: usize,
    param: &Resident<T>,
    gradient: &Resident<T>,
    state: &[(String, Resident<T>)],
) -> Result<ResidentUpdate<T>, String> {
    let rule = rules
        .iter()
        .find(|rule| rule.name == plan.rule_name)
        .ok_or_else(|| format!("rule `{}` is missing", plan.rule_name))?;
    let size = param.len();
    if gradient.len() != size {
        return Err(format!("a gradient of {} elements for a parameter of {size}", gradient.len()));
    }
    let base: Inputs<T> = rule_hyperparameters_at(plan, learning_rate, batch, step);
    let mut update = ResidentUpdate { param: None, states: Vec::new() };
    let kept = |outputs: Vec<(String, crate::backend::Output<T>)>| -> Result<Vec<(String, Resident<T>)>, String> {
        outputs
            .into_iter()
            .map(|(name, output)| match output {
                crate::backend::Output::Resident(tensor) => Ok((name, tensor)),
                crate::backend::Output::Value(_) => Err(format!("`{name}` was not kept resident")),
            })
            .collect()
    };
    if state.is_empty() && !rule.state.is_empty() {
        let mut init_inputs = base.clone();
        init_inputs.lend_resident_as(Slot::Input(0), param, vec![size]);
        init_inputs.lend_resident_as(Slot::Input(1), gradient, vec![size]);
        let key = crate::backend::keys::rule_init(&rule.name, size);
        let outputs = backend
            .outputs_keeping(&key, &rule.init, &init_inputs, &|_| true)
            .map_err(|error| format!("initialising `{}`: {error}", rule.name))?;
        update.states = kept(outputs)?;
    }
    for (block, rule_update) in rule.updates.iter().enumerate() {
        if !rule_update.runs_at(step) {
            continue;
        }
        let key = crate::backend::keys::rule_block(&rule.name, block, size);
        let mut update_inputs = base.clone();
        update_inputs.lend_resident_as(Slot::Input(0), update.param.as_ref().unwrap_or(param), vec![size]);
        update_inputs.lend_resident_as(Slot::Input(1), gradient, vec![size]);
        for (position, name) in rule.state.iter().enumerate() {
            let current = update
                .states
                .iter()
                .chain(state)
                .find(|(state_name, _)| state_name == name)
                .map(|(_, tensor)| tensor)
                .ok_or_else(|| format!("a state of rule `{}` is missing", rule.name))?;
            update_inputs.lend_resident(Slot::Input(2 + position), current);
        }
        let outputs = backend
            .outputs_keeping(&key, &rule_update.function, &update_inputs, &|_| true)
            .map_err(|error| format!("rule `{}`: {error}", rule.name))?;
        drop(update_inputs);
        for (name, tensor) in kept(outputs)? {
            if rule.state.contains(&name) {
                update.states.retain(|(state_name, _)| *state_name != name);
                update.states.push((name, tensor));
            } else {
                update.param = Some(Resident { shape: param.shape.clone(), storage: tensor.storage });
            }
        }
    }
    Ok(update)
}
