//! Execution of an optimizer plan: `rule`s are interpreted from their IR update functions; the
//! `diagonal` structure runs natively. Each parameter's state lives in named tensors.

use crate::backend::Backend;
use curv_interp::{Inputs, Real, Resident, Slot, Tensor, TensorRef, Value};
use curv_ir::{option_name, option_number, Function, OptimizerPlan, ParamPlan, RuleProgram, StructureKind};
use std::collections::{BTreeSet, HashMap};

mod grouped;
mod matrix;

pub use grouped::{rule_groups, update_rule_group, update_rule_resident, ResidentUpdate, RuleGroup};
use matrix::*;
pub use matrix::{finish_matrix_update, matrix_direction};

/// The state an optimizer keeps for one parameter, by name (checkpointed as `state.PARAM.NAME`).
pub type ParamState<T> = Vec<(String, Tensor<T>)>;

/// Every parameter's states mapped by `map` (an upload or a download of each tensor), or the
/// first error.
pub fn map_states<A, B, E>(
    states: &[Vec<(String, A)>],
    mut map: impl FnMut(&A) -> Result<B, E>,
) -> Result<Vec<Vec<(String, B)>>, E> {
    states.iter().map(|state| state.iter().map(|(name, tensor)| Ok((name.clone(), map(tensor)?))).collect()).collect()
}

pub fn state_get<'a, T>(state: &'a ParamState<T>, name: &str) -> Option<&'a Tensor<T>> {
    state.iter().find(|(key, _)| key == name).map(|(_, tensor)| tensor)
}

fn state_get_mut<'a, T>(state: &'a mut ParamState<T>, name: &str) -> Option<&'a mut Tensor<T>> {
    state.iter_mut().find(|(key, _)| key == name).map(|(_, tensor)| tensor)
}

fn state_set<T>(state: &mut ParamState<T>, name: &str, tensor: Tensor<T>) {
    match state.iter_mut().find(|(key, _)| key == name) {
        Some((_, existing)) => *existing = tensor,
        None => state.push((name.to_string(), tensor)),
    }
}

/// Why a plan cannot run (yet) on this runtime: the first of its rule line's refusals, declared
/// in [`curv_ir::executable`] (which `curv check` reports as diagnostics), with the check's code.
pub fn unsupported(plan: &ParamPlan) -> Option<String> {
    let refusal =
        curv_ir::executable::line_refusals(plan.structure, &plan.options, &plan.modifiers).into_iter().next()?;
    Some(format!("{} ({})", refusal.message, refusal.code))
}

/// The statistics (by `Op::Statistic` kind) a parameter's update needs at `step`.
pub fn statistics_needed(plan: &ParamPlan, rules: &[RuleProgram], step: u64) -> BTreeSet<String> {
    let mut needed = BTreeSet::new();
    match plan.structure {
        StructureKind::Rule => {
            if let Some(rule) = rules.iter().find(|rule| rule.name == plan.rule_name) {
                for update in &rule.updates {
                    if update.runs_at(step) {
                        for inst in &update.function.insts {
                            if let curv_ir::Op::Statistic { kind } = &inst.op {
                                needed.insert(kind.clone());
                            }
                        }
                    }
                }
            }
        }
        StructureKind::Diagonal => {
            let every = option_number(&plan.options, "every").unwrap_or(1.0) as u64;
            if (step - 1).is_multiple_of(every.max(1)) {
                match option_name(&plan.options, "stats").unwrap_or("gradient_square") {
                    "hutchinson" => {
                        needed.insert(format!(
                            "hutchinson({})",
                            option_name(&plan.options, "probe").unwrap_or("rademacher")
                        ));
                    }
                    "gnb" | "sampled_fisher" => {
                        needed.insert("sampled_grad".to_string());
                    }
                    _ => {}
                }
            }
        }
        StructureKind::LowRank | StructureKind::Dense => {
            if let Some(kind) = block_hessian_statistic(plan, step) {
                needed.insert(kind.to_string());
            }
        }
        StructureKind::Kronecker => {
            if let Some(kind) = kfac_statistic(plan) {
                let every = option_number(&plan.options, "every").unwrap_or(1.0) as u64;
                if (step - 1).is_multiple_of(every.max(1)) {
                    needed.insert(kind);
                }
            }
        }
        _ => {}
    }
    needed
}

/// The statistic a plan computes from Hessian-vector products of its own parameter's block at
/// `step`, if any: `lanczos` (FOSI's top eigenpairs, at steps `warmup`, `warmup + every`, ...)
/// or `hessian` (lazy Newton's whole block, at steps 1, 1 + `every`, ...).
pub fn block_hessian_statistic(plan: &ParamPlan, step: u64) -> Option<&'static str> {
    let every = (option_number(&plan.options, "every").unwrap_or(1.0) as u64).max(1);
    match (plan.structure, option_name(&plan.options, "stats")) {
        (StructureKind::LowRank, Some("lanczos")) => {
            let warmup = option_number(&plan.options, "warmup").map_or(every, |value| value as u64).max(1);
            (step >= warmup && (step - warmup).is_multiple_of(every)).then_some("lanczos")
        }
        (StructureKind::Dense, Some("hessian")) => (step.max(1) - 1).is_multiple_of(every).then_some("hessian"),
        _ => None,
    }
}

/// Whether a plan is EGN's (`dense(stats = ggn)`): its parameters share one Gauss-Newton system
/// per step, solved by the trainer.
pub fn is_egn(plan: &ParamPlan) -> bool {
    plan.structure == StructureKind::Dense && option_name(&plan.options, "stats") == Some("ggn")
}

/// Whether a plan ever needs Hessian-vector products of its parameter's block.
pub fn uses_block_hessian(plan: &ParamPlan) -> bool {
    matches!(
        (plan.structure, option_name(&plan.options, "stats")),
        (StructureKind::LowRank, Some("lanczos")) | (StructureKind::Dense, Some("hessian"))
    )
}

/// The statistic (`kfac(empirical)` or `kfac(sampled)`) a K-FAC plan refreshes its factors from.
pub fn kfac_statistic(plan: &ParamPlan) -> Option<String> {
    (plan.structure == StructureKind::Kronecker && option_name(&plan.options, "stats") == Some("kfac"))
        .then(|| format!("kfac({})", option_name(&plan.options, "fisher").unwrap_or("empirical")))
}

/// Whether a plan ever asks for Hutchinson estimates (which need the Hessian-vector program).
pub fn uses_hutchinson(plan: &ParamPlan, rules: &[RuleProgram]) -> bool {
    match plan.structure {
        StructureKind::Rule => {
            rules.iter().filter(|rule| rule.name == plan.rule_name).any(|rule| {
                rule.updates.iter().any(|update| {
                    update.function.insts.iter().any(
                        |inst| matches!(&inst.op, curv_ir::Op::Statistic { kind } if kind.starts_with("hutchinson")),
                    )
                })
            })
        }
        StructureKind::Diagonal => option_name(&plan.options, "stats") == Some("hutchinson"),
        _ => false,
    }
}

/// Everything one parameter's update reads besides its state.
#[derive(Clone, Copy)]
pub struct UpdateInputs<'a, T> {
    pub backend: &'a dyn Backend<T>,
    pub step: u64,
    pub learning_rate: f64,
    pub batch: usize,
    /// Read where its owner keeps it: a rule's compiled update reads it without a copy.
    pub gradient: TensorRef<'a, T>,
    /// The parameter's values, lent by a caller that keeps them (a library's optimizer step), or
    /// None. The parameter [`update_param`] is given then has its shape and no data: a rule reads
    /// the lent values where they are, and the parameter holds the new values afterwards only if
    /// the rule wrote them (otherwise it stays without data: the lent values are still current).
    /// Updates that change the parameter where it is (weight decay, the structures) start from a
    /// copy of the lent values.
    pub param_lent: Option<&'a [T]>,
    pub statistics: &'a HashMap<String, Tensor<T>>,
    /// K-FAC's captures, at the steps that refresh the factors.
    pub captures: Option<&'a crate::kronecker::Captures>,
    /// The run's seed and the parameter's index (for estimators that draw noise).
    pub seed: u64,
    pub param: usize,
}

/// The values a rule reads for `param` where the caller keeps them: the lent parameter's, while
/// no block of this step has written the parameter (it has no data of its own until then).
fn lent_parameter<'a, T: Real>(param: &Tensor<T>, inputs: &UpdateInputs<'a, T>) -> Option<&'a [T]> {
    inputs.param_lent.filter(|_| param.data.is_empty())
}

/// An empty tensor in the place of an input that is lent ([`Inputs::lend`]).
fn placeholder<T: Real>() -> Value<T> {
    Value::Real(Tensor::new(vec![0], Vec::new()))
}

/// Applies one step of `plan` to `param`, updating `state`.
///
/// A `rule` computes the new parameter and states out of place: what it replaced is returned
/// (so the caller can undo the step without having copied anything). The structures update in
/// place and return `None`: a caller that may undo the step copies the parameter and state first.
///
/// An error is E0502 with the plan's structure; the caller adds the parameter and the step.
pub fn update_param<T: Real>(
    plan: &ParamPlan,
    rules: &[RuleProgram],
    param: &mut Tensor<T>,
    state: &mut ParamState<T>,
    inputs: &UpdateInputs<T>,
) -> Result<Option<Displaced<T>>, crate::Error> {
    update_param_or_message(plan, rules, param, state, inputs).map_err(|message| update_failed(plan, message))
}

/// A failed update of `plan`'s parameter (E0502), with its structure.
fn update_failed(plan: &ParamPlan, message: String) -> crate::Error {
    crate::Error::new(crate::ErrorCode::UpdateFailed, message).structure(plan.structure.name())
}

/// [`update_param`], its error a message.
fn update_param_or_message<T: Real>(
    plan: &ParamPlan,
    rules: &[RuleProgram],
    param: &mut Tensor<T>,
    state: &mut ParamState<T>,
    inputs: &UpdateInputs<T>,
) -> Result<Option<Displaced<T>>, String> {
    let weight_decay = plan.modifiers.iter().any(|modifier| modifier.name == "weight_decay");
    let owned_inputs;
    let inputs = match inputs.param_lent {
        // Only a rule without weight decay reads a lent parameter where it is; everything else
        // changes the parameter in place, so it gets a copy of the lent values.
        Some(values) if plan.structure != StructureKind::Rule || weight_decay => {
            if param.data.is_empty() {
                param.data = values.to_vec();
            }
            owned_inputs = UpdateInputs { param_lent: None, ..*inputs };
            &owned_inputs
        }
        _ => inputs,
    };
    if plan.structure == StructureKind::Rule {
        // Weight decay changes the parameter in place before the rule reads it.
        let original = weight_decay.then(|| param.clone());
        apply_weight_decay(plan, param, inputs.learning_rate);
        let mut displaced =
            Displaced { param: None, states: Vec::new(), state_was_empty: state.is_empty(), whole_state: None };
        let outcome = update_with_rule(plan, rules, param, state, inputs, &mut displaced);
        if original.is_some() {
            displaced.param = original;
        }
        // A failed rule update puts back what its earlier blocks replaced: the parameter and
        // its state are as they were.
        return match outcome {
            Ok(()) => Ok(Some(displaced)),
            Err(message) => {
                displaced.undo(param, state);
                Err(message)
            }
        };
    }
    update_in_place(plan, param, state, inputs)
}

/// What an out-of-place update replaced: the previous parameter (when it was written), the
/// previous values of the states it wrote, and whether the state was empty before (first step).
#[derive(Debug)]
pub struct Displaced<T> {
    pub param: Option<Tensor<T>>,
    pub states: Vec<(String, Tensor<T>)>,
    pub state_was_empty: bool,
    /// The previous state of the matrix structures, which update their state where it is.
    pub whole_state: Option<PreviousState<T>>,
}

/// A parameter's state as it was before a step, for undoing the step: its entries in their
/// order, each with its previous value, or `None` for an entry the step leaves as it is (which
/// was not copied: Shampoo's roots, SOAP's bases and K-FAC's inverses between their refreshes).
#[derive(Debug, Clone)]
pub struct PreviousState<T>(pub Vec<(String, Option<Tensor<T>>)>);

impl<T> PreviousState<T> {
    /// The whole of a previous state.
    pub fn whole(state: ParamState<T>) -> PreviousState<T> {
        PreviousState(state.into_iter().map(|(name, tensor)| (name, Some(tensor))).collect())
    }

    /// Puts `state` back as it was: entries the step created are removed, entries it changed get
    /// their previous values, entries it left as they were are kept.
    pub fn restore(self, state: &mut ParamState<T>) {
        let mut current = std::mem::take(state);
        for (name, previous) in self.0 {
            let tensor = previous
                .or_else(|| current.iter().position(|(key, _)| *key == name).map(|index| current.swap_remove(index).1));
            if let Some(tensor) = tensor {
                state.push((name, tensor));
            }
        }
    }
}

impl<T: Copy> Displaced<T> {
    /// Puts the replaced values back.
    pub fn undo(self, param: &mut Tensor<T>, state: &mut ParamState<T>) {
        if let Some(previous) = self.param {
            *param = previous;
        }
        if let Some(whole) = self.whole_state {
            whole.restore(state);
        } else if self.state_was_empty {
            state.clear();
        } else {
            for (name, tensor) in self.states {
                state_set(state, &name, tensor);
            }
        }
    }
}

fn apply_weight_decay<T: Real>(plan: &ParamPlan, param: &mut Tensor<T>, learning_rate: f64) {
    for modifier in &plan.modifiers {
        if modifier.name == "weight_decay" {
            let lambda = option_number(&modifier.options, "lambda").unwrap_or(0.0);
            let factor = T::from_f64(1.0 - learning_rate * lambda);
            for value in &mut param.data {
                *value = value.mul(factor);
            }
        }
    }
}

/// Updates a structure in place. The matrix structures replace their state wholesale, and
/// return the previous state and parameter (so a caller need not copy them first; on an error
/// they leave the state as it was); the others (`diagonal`, `factored`) return `None` and update
/// the state where it is.
fn update_in_place<T: Real>(
    plan: &ParamPlan,
    param: &mut Tensor<T>,
    state: &mut ParamState<T>,
    inputs: &UpdateInputs<T>,
) -> Result<Option<Displaced<T>>, String> {
    let learning_rate = inputs.learning_rate;
    if crate::kronecker::leaves_parameter_unchanged(plan, state) {
        let kronecker_inputs = crate::kronecker::KroneckerInputs {
            step: inputs.step,
            learning_rate,
            gradient: &inputs.gradient.data.iter().map(|value| value.to_f64()).collect::<Vec<_>>(),
            captures: inputs.captures,
            seed: inputs.seed,
            param: inputs.param,
        };
        let mut previous = None;
        crate::kronecker::kronecker_direction(plan, &param.shape, state, &kronecker_inputs, &mut previous)?;
        return Ok(previous.map(|previous| Displaced {
            param: None,
            states: Vec::new(),
            state_was_empty: false,
            whole_state: Some(previous),
        }));
    }
    if !matches!(
        plan.structure,
        StructureKind::Kronecker | StructureKind::Orthogonalize | StructureKind::LowRank | StructureKind::Dense
    ) {
        apply_weight_decay(plan, param, learning_rate);
    }
    match plan.structure {
        StructureKind::Diagonal => update_diagonal(plan, param, state, inputs).map(|()| None),
        StructureKind::Factored => update_factored(plan, param, state, inputs).map(|()| None),
        StructureKind::Kronecker | StructureKind::Orthogonalize | StructureKind::LowRank | StructureKind::Dense => {
            update_matrix(plan, param, state, inputs).map(Some)
        }
        other => Err(format!("the `{}` structure is not executable yet", other.name())),
    }
}

/// The hyperparameters a rule's functions read: the plan's numeric options, `lr` and `batch`,
/// and the step.
fn rule_hyperparameters<T: Real>(plan: &ParamPlan, inputs: &UpdateInputs<T>) -> Inputs<'static, T> {
    rule_hyperparameters_at(plan, inputs.learning_rate, inputs.batch, inputs.step)
}

/// The hyperparameters and step a rule's functions read, for `plan` at `step`.
pub(crate) fn rule_hyperparameters_at<'a, T: Real>(
    plan: &ParamPlan,
    learning_rate: f64,
    batch: usize,
    step: u64,
) -> Inputs<'a, T> {
    let mut base = Inputs::<T>::default();
    for (name, value) in &plan.options {
        if let curv_ir::OptionValue::Number(number) = value {
            base.hyperparameters.insert(name.clone(), *number);
        }
    }
    base.hyperparameters.insert("lr".to_string(), learning_rate);
    base.hyperparameters.insert("batch".to_string(), batch as f64);
    base.step = step as f64;
    base
}

/// Initialises a rule's states at the parameter's first update, from the parameter and its first
/// gradient; nothing when they exist.
fn initialise_state<T: Real>(
    rule: &RuleProgram,
    base: &Inputs<T>,
    param: &Tensor<T>,
    state: &mut ParamState<T>,
    inputs: &UpdateInputs<T>,
) -> Result<(), String> {
    if state.is_empty() && !rule.state.is_empty() {
        let size: usize = param.shape.iter().product();
        let mut init_inputs = base.clone();
        init_inputs.inputs = vec![placeholder(), placeholder()];
        init_inputs.lend(0, vec![size], lent_parameter(param, inputs).unwrap_or(&param.data));
        init_inputs.lend(1, vec![size], inputs.gradient.data);
        let key = crate::backend::keys::rule_init(&rule.name, size);
        for (name, value) in inputs
            .backend
            .outputs(&key, &rule.init, &init_inputs)
            .map_err(|error| format!("initialising `{}`: {error}", rule.name))?
        {
            let tensor = value.as_real().cloned().ok_or_else(|| format!("state `{name}` is not a float tensor"))?;
            state.push((name, tensor));
        }
    }
    Ok(())
}

fn update_with_rule<T: Real>(
    plan: &ParamPlan,
    rules: &[RuleProgram],
    param: &mut Tensor<T>,
    state: &mut ParamState<T>,
    inputs: &UpdateInputs<T>,
    displaced: &mut Displaced<T>,
) -> Result<(), String> {
    let rule = rules
        .iter()
        .find(|rule| rule.name == plan.rule_name)
        .ok_or_else(|| format!("rule `{}` is missing", plan.rule_name))?;
    let base = rule_hyperparameters(plan, inputs);
    let shape = param.shape.clone();
    let size: usize = shape.iter().product();
    initialise_state(rule, &base, param, state, inputs)?;
    // Whether the parameter's values before the step are the caller's (lent, never moved here),
    // so that there is nothing of this step's to put back for the parameter.
    let original_is_lent = lent_parameter(param, inputs).is_some();
    for (block, rule_update) in rule.updates.iter().enumerate() {
        if !rule_update.runs_at(inputs.step) {
            continue;
        }
        let update = &rule_update.function;
        let key = crate::backend::keys::rule_block(&rule.name, block, size);
        // The parameter and the states are moved into the inputs, not copied, and moved back
        // below unless the block writes them. A failed call leaves them empty, but then the step
        // fails and the trainer keeps its own parameters and states (it updates copies).
        if rule.state.iter().any(|name| state_get(state, name).is_none()) {
            return Err(format!("a state of rule `{}` is missing", rule.name));
        }
        let mut update_inputs = base.clone();
        update_inputs.inputs = match lent_parameter(param, inputs) {
            // Lent and not yet written by an earlier block: read where the caller keeps it.
            Some(values) => {
                update_inputs.lend(0, vec![size], values);
                vec![placeholder(), placeholder()]
            }
            _ => {
                let parameter_data = std::mem::take(&mut param.data);
                vec![Value::Real(Tensor::new(vec![parameter_data.len()], parameter_data)), placeholder()]
            }
        };
        update_inputs.lend(1, vec![size], inputs.gradient.data);
        for name in &rule.state {
            let tensor = state_get_mut(state, name).expect("checked above");
            update_inputs.inputs.push(Value::Real(Tensor::new(tensor.shape.clone(), std::mem::take(&mut tensor.data))));
        }
        for (kind, tensor) in inputs.statistics {
            update_inputs.statistics.insert(kind.clone(), Tensor::new(vec![tensor.len()], tensor.data.clone()));
        }
        let outputs = match inputs.backend.outputs(&key, update, &update_inputs) {
            Ok(outputs) => outputs,
            Err(error) => {
                // The parameter and the states go back where they were before the error is
                // reported, so that a failed step can be undone.
                let mut moved = update_inputs.inputs.into_iter();
                if let Some(Value::Real(tensor)) = moved.next() {
                    param.data = tensor.data;
                }
                moved.next(); // the gradient
                for (name, value) in rule.state.iter().zip(moved) {
                    if let (Value::Real(tensor), Some(slot)) = (value, state_get_mut(state, name)) {
                        slot.data = tensor.data;
                    }
                }
                return Err(format!("rule `{}`: {error}", rule.name));
            }
        };
        let mut state_written = vec![false; rule.state.len()];
        let mut parameter_written = false;
        for (name, value) in outputs {
            let Value::Real(tensor) = value else {
                return Err(format!("`{name}` is not a float tensor"));
            };
            if let Some(position) = rule.state.iter().position(|state_name| *state_name == name) {
                state_set(state, &name, tensor);
                state_written[position] = true;
            } else {
                *param = Tensor::new(shape.clone(), tensor.data);
                parameter_written = true;
            }
        }
        // What was not written goes back; what was written is the caller's undo information
        // (only its first replacement, when several blocks run at this step).
        let mut moved = update_inputs.inputs.into_iter();
        if let Some(Value::Real(tensor)) = moved.next() {
            if !parameter_written {
                param.data = tensor.data;
            } else if displaced.param.is_none() && !original_is_lent {
                displaced.param = Some(Tensor::new(shape.clone(), tensor.data));
            }
        }
        moved.next(); // the gradient
        for ((name, written), value) in rule.state.iter().zip(&state_written).zip(moved) {
            if let Value::Real(tensor) = value {
                if !*written {
                    state_get_mut(state, name).expect("checked above").data = tensor.data;
                } else if !displaced.states.iter().any(|(key, _)| key == name) {
                    displaced.states.push((name.clone(), tensor));
                }
            }
        }
    }
    Ok(())
}

/// The `diagonal` structure: an Adam-style update whose second moment is an exponential average
/// of a squared diagonal curvature estimate `s`: the gradient (`gradient_square`, which is Adam),
/// `|v * Hv|` (`hutchinson`, AdaHessian; averaged over a conv kernel's spatial dimensions with
/// `spatial = true`) or `sqrt(batch) * g_sampled` (`gnb`, so that `s^2 = B g_sampled^2`).
/// The average is refreshed every `every` steps (steps 1, 1 + every, ...) and bias-corrected by
/// its number of refreshes; the step is `m_hat / (sqrt(v_hat)^power + eps)`.
fn update_diagonal<T: Real>(
    plan: &ParamPlan,
    param: &mut Tensor<T>,
    state: &mut ParamState<T>,
    inputs: &UpdateInputs<T>,
) -> Result<(), String> {
    let number = |key: &str, default: f64| option_number(&plan.options, key).unwrap_or(default);
    let b1 = number("b1", 0.9);
    let ema = number("ema", 0.999);
    let eps = number("eps", 1e-8);
    let power = number("power", 1.0);
    let every = number("every", 1.0).max(1.0) as u64;
    let bias_correction = !plan
        .options
        .iter()
        .any(|(key, value)| key == "bias_correction" && *value == curv_ir::OptionValue::Bool(false));
    let stats = option_name(&plan.options, "stats").unwrap_or("gradient_square");
    let count = param.len();
    if state.is_empty() {
        state.push(("m".to_string(), Tensor::filled(param.shape.clone(), T::zero())));
        state.push(("v".to_string(), Tensor::filled(param.shape.clone(), T::zero())));
        state.push(("refreshes".to_string(), Tensor::scalar(T::zero())));
    }
    if (inputs.step - 1).is_multiple_of(every) {
        let estimate: Vec<T> = match stats {
            "gradient_square" => inputs.gradient.data.to_vec(),
            "hutchinson" => {
                let kind = format!("hutchinson({})", option_name(&plan.options, "probe").unwrap_or("rademacher"));
                let product = inputs.statistics.get(&kind).ok_or("the Hutchinson estimate is missing")?;
                let mut absolute: Vec<T> = product.data.iter().map(|value| value.abs()).collect();
                let spatial = plan
                    .options
                    .iter()
                    .any(|(key, value)| key == "spatial" && *value == curv_ir::OptionValue::Bool(true));
                if spatial && param.rank() == 4 {
                    let window = param.shape[2] * param.shape[3];
                    for block in absolute.chunks_mut(window) {
                        let mean = block
                            .iter()
                            .fold(T::zero(), |total, value| total.add(*value))
                            .div(T::from_f64(window as f64));
                        block.iter_mut().for_each(|value| *value = mean);
                    }
                }
                absolute
            }
            "gnb" | "sampled_fisher" => {
                let sampled = inputs.statistics.get("sampled_grad").ok_or("the sampled-label gradient is missing")?;
                let scale = if stats == "gnb" { T::from_f64((inputs.batch as f64).sqrt()) } else { T::one() };
                sampled.data.iter().map(|value| value.mul(scale)).collect()
            }
            other => return Err(format!("unknown diagonal statistic `{other}`")),
        };
        let refreshes = state_get(state, "refreshes").map_or(0.0, |tensor| tensor.data[0].to_f64()) + 1.0;
        let mut v = state_get(state, "v").cloned().ok_or("state `v` is missing")?;
        let (decay, fresh) = (T::from_f64(ema), T::from_f64(1.0 - ema));
        for (value, s) in v.data.iter_mut().zip(&estimate) {
            *value = value.mul(decay).add(fresh.mul(s.mul(*s)));
        }
        state_set(state, "v", v);
        state_set(state, "refreshes", Tensor::scalar(T::from_f64(refreshes)));
    }
    let mut m = state_get(state, "m").cloned().ok_or("state `m` is missing")?;
    let (decay, fresh) = (T::from_f64(b1), T::from_f64(1.0 - b1));
    for (value, g) in m.data.iter_mut().zip(inputs.gradient.data) {
        *value = value.mul(decay).add(fresh.mul(*g));
    }
    let v = state_get(state, "v").ok_or("state `v` is missing")?;
    let refreshes = state_get(state, "refreshes").map_or(1.0, |tensor| tensor.data[0].to_f64());
    let (correction1, correction2) =
        if bias_correction { (1.0 - b1.powf(inputs.step as f64), 1.0 - ema.powf(refreshes)) } else { (1.0, 1.0) };
    let momentum = plan.modifiers.iter().find(|modifier| modifier.name == "momentum");
    // `m_hat / (sqrt(v_hat)^power + eps)`. The usual power 1 gets its own loop, which vectorises;
    // `powf` would dominate the update.
    let (inverse1, inverse2) = (1.0 / correction1, 1.0 / correction2);
    let mut direction: Vec<T> = if power == 1.0 {
        m.data
            .iter()
            .zip(&v.data)
            .map(|(m_value, v_value)| {
                T::from_f64(m_value.to_f64() * inverse1 / ((v_value.to_f64() * inverse2).sqrt() + eps))
            })
            .collect()
    } else {
        m.data
            .iter()
            .zip(&v.data)
            .map(|(m_value, v_value)| {
                T::from_f64(m_value.to_f64() * inverse1 / ((v_value.to_f64() * inverse2).powf(0.5 * power) + eps))
            })
            .collect()
    };
    debug_assert_eq!(direction.len(), count);
    if let Some(momentum) = momentum {
        let beta = option_number(&momentum.options, "beta").unwrap_or(0.9);
        let nesterov =
            momentum.options.iter().any(|(key, value)| key == "nesterov" && *value == curv_ir::OptionValue::Bool(true));
        let mut buffer = state_get(state, "momentum_buffer")
            .cloned()
            .unwrap_or_else(|| Tensor::filled(param.shape.clone(), T::zero()));
        for (slot, d) in buffer.data.iter_mut().zip(direction.iter_mut()) {
            *slot = slot.mul(T::from_f64(beta)).add(*d);
            *d = if nesterov { d.add(slot.mul(T::from_f64(beta))) } else { *slot };
        }
        state_set(state, "momentum_buffer", buffer);
    }
    state_set(state, "m", m);
    let rate = T::from_f64(inputs.learning_rate);
    for (value, d) in param.data.iter_mut().zip(&direction) {
        *value = value.sub(rate.mul(*d));
    }
    Ok(())
}

/// The `factored` structure, as AdaLomo (pytorch_optimizer's `AdaLOMO.fuse_update`): the second
/// moment of `u = g^2 + eps1` is kept as row and column averages for matrices (a full vector for
/// vectors), with the decay `beta_t = 1 - step^decay_rate`; the step
/// `g / sqrt(row / mean(row) (x) column)` is scaled down to an RMS of at most `clip_threshold`,
/// and with `relative_step` the learning rate is multiplied by `max(eps2, rms(p))`. Parameters of
/// rank three or more are viewed as matrices `[product of leading dims, last dim]`.
fn update_factored<T: Real>(
    plan: &ParamPlan,
    param: &mut Tensor<T>,
    state: &mut ParamState<T>,
    inputs: &UpdateInputs<T>,
) -> Result<(), String> {
    let number = |key: &str, default: f64| option_number(&plan.options, key).unwrap_or(default);
    let decay_rate = number("decay_rate", -0.8);
    let eps1 = number("eps1", 1e-30);
    let eps2 = number("eps2", 1e-3);
    let clip_threshold = number("clip_threshold", 1.0);
    let relative_step =
        !plan.options.iter().any(|(key, value)| key == "relative_step" && *value == curv_ir::OptionValue::Bool(false));
    let step = inputs.step as f64;
    let beta = 1.0 - step.powf(decay_rate);
    let gradient: Vec<f64> = inputs.gradient.data.iter().map(|value| value.to_f64()).collect();
    let squared: Vec<f64> = gradient.iter().map(|g| g * g + eps1).collect();
    let count = gradient.len();
    let mut update = vec![0.0; count];
    if param.rank() >= 2 {
        let columns = *param.shape.last().unwrap_or(&1);
        let rows = count / columns.max(1);
        let mut row = state_get(state, "row")
            .map_or_else(|| vec![0.0; rows], |tensor| tensor.data.iter().map(|value| value.to_f64()).collect());
        let mut column = state_get(state, "column")
            .map_or_else(|| vec![0.0; columns], |tensor| tensor.data.iter().map(|value| value.to_f64()).collect());
        for (index, slot) in row.iter_mut().enumerate() {
            let mean = squared[index * columns..(index + 1) * columns].iter().sum::<f64>() / columns as f64;
            *slot = beta * *slot + (1.0 - beta) * mean;
        }
        for (index, slot) in column.iter_mut().enumerate() {
            let mean = (0..rows).map(|r| squared[r * columns + index]).sum::<f64>() / rows as f64;
            *slot = beta * *slot + (1.0 - beta) * mean;
        }
        let row_mean = row.iter().sum::<f64>() / rows as f64;
        for r in 0..rows {
            let row_factor = 1.0 / (row[r] / row_mean).sqrt();
            for c in 0..columns {
                update[r * columns + c] = row_factor / column[c].sqrt() * gradient[r * columns + c];
            }
        }
        state_set(state, "row", Tensor::new(vec![rows], row.into_iter().map(T::from_f64).collect()));
        state_set(state, "column", Tensor::new(vec![columns], column.into_iter().map(T::from_f64).collect()));
    } else {
        let mut v = state_get(state, "v")
            .map_or_else(|| vec![0.0; count], |tensor| tensor.data.iter().map(|value| value.to_f64()).collect());
        for ((slot, u), (target, g)) in v.iter_mut().zip(&squared).zip(update.iter_mut().zip(&gradient)) {
            *slot = beta * *slot + (1.0 - beta) * u;
            *target = g / slot.sqrt();
        }
        state_set(state, "v", Tensor::new(param.shape.clone(), v.into_iter().map(T::from_f64).collect()));
    }
    let rms =
        |values: &[f64]| (values.iter().map(|value| value * value).sum::<f64>() / values.len().max(1) as f64).sqrt();
    let factor = (rms(&update) / clip_threshold).max(1.0);
    let parameter_values: Vec<f64> = param.data.iter().map(|value| value.to_f64()).collect();
    let rate =
        if relative_step { inputs.learning_rate * rms(&parameter_values).max(eps2) } else { inputs.learning_rate };
    for (value, step_value) in param.data.iter_mut().zip(&update) {
        *value = T::from_f64(value.to_f64() - rate * step_value / factor);
    }
    Ok(())
}

/// Every plan's problems that keep the optimizer from running, one line per parameter, as the
/// runtime error E0500 (with the parameter and its structure when there is one such parameter).
pub fn check_plans(plan: &OptimizerPlan, param_names: &[String]) -> Result<(), crate::Error> {
    let problems: Vec<(&ParamPlan, String)> = plan
        .plans
        .iter()
        .filter_map(|param_plan| unsupported(param_plan).map(|problem| (param_plan, problem)))
        .collect();
    let name = |param_plan: &ParamPlan| param_names.get(param_plan.param).map_or("?", String::as_str).to_string();
    match problems.as_slice() {
        [] => Ok(()),
        [(param_plan, problem)] => Err(crate::Error::new(
            crate::ErrorCode::PlanNotExecutable,
            format!("optimizer `{}` cannot run on this backend yet: {problem}", plan.name),
        )
        .parameter(name(param_plan))
        .structure(param_plan.structure.name())),
        _ => {
            let lines: Vec<String> =
                problems.iter().map(|(param_plan, problem)| format!("`{}`: {problem}", name(param_plan))).collect();
            Err(crate::Error::new(
                crate::ErrorCode::PlanNotExecutable,
                format!("optimizer `{}` cannot run on this backend yet:\n  {}", plan.name, lines.join("\n  ")),
            ))
        }
    }
}

/// [`check_plans`] with the error rendered (`[E0500] ...`), for callers that report messages.
pub fn check_executable(plan: &OptimizerPlan, param_names: &[String]) -> Result<(), String> {
    check_plans(plan, param_names).map_err(|error| error.to_string())
}

/// A plan of parameter 0 with `structure`, `options` and modifiers named `modifiers` (without
/// options), for tests.
#[cfg(test)]
pub(crate) fn plan_for_tests(
    structure: StructureKind,
    options: &[(&str, curv_ir::OptionValue)],
    modifiers: &[&str],
) -> ParamPlan {
    ParamPlan {
        param: 0,
        pattern: "*".to_string(),
        structure,
        rule_name: structure.name().to_string(),
        options: options.iter().map(|(name, value)| (name.to_string(), value.clone())).collect(),
        modifiers: modifiers
            .iter()
            .map(|name| curv_ir::ModifierPlan { name: name.to_string(), options: Vec::new() })
            .collect(),
        state: Vec::new(),
        span: Default::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use curv_ir::OptionValue;

    fn matrix_plan(structure: StructureKind, options: &[(&str, OptionValue)]) -> ParamPlan {
        plan_for_tests(structure, options, &[])
    }

    #[test]
    fn a_plan_that_does_not_execute_is_refused_with_its_code_parameter_and_structure() {
        let mut dense =
            plan_for_tests(StructureKind::Dense, &[("stats", OptionValue::Name("gradient_outer".into()))], &[]);
        let diagonal = plan_for_tests(StructureKind::Diagonal, &[], &["clip"]);
        let optimizer = OptimizerPlan {
            name: "full".into(),
            lr: 0.1,
            schedule: None,
            settings: Vec::new(),
            plans: vec![dense.clone()],
        };
        let names = ["w1".to_string(), "w2".to_string()];
        let error = check_plans(&optimizer, &names).unwrap_err();
        assert_eq!(error.code, crate::ErrorCode::PlanNotExecutable);
        assert_eq!((error.parameter.as_deref(), error.structure), (Some("w1"), Some("dense")));
        assert_eq!(
            error.to_string(),
            "[E0500] parameter `w1` (dense): optimizer `full` cannot run on this backend yet: `dense` does not \
             execute with `stats = gradient_outer` (E0309)"
        );
        dense.param = 1;
        let both = OptimizerPlan { plans: vec![diagonal, dense], ..optimizer };
        let message = check_executable(&both, &names).unwrap_err();
        assert!(message
            .starts_with("[E0500] optimizer `full` cannot run on this backend yet:\n  `w1`: the `clip` modifier"));
        assert!(message.ends_with("`w2`: `dense` does not execute with `stats = gradient_outer` (E0309)"), "{message}");
    }

    #[test]
    fn a_matrix_update_undone_leaves_parameter_and_state_bit_for_bit_as_they_were() {
        // The matrix structures replace their state wholesale and hand back the previous one (no
        // copy is made before the step); undoing must restore both exactly, on the first step
        // (empty state) and on later ones.
        let shampoo = matrix_plan(
            StructureKind::Kronecker,
            &[
                ("stats", OptionValue::Name("gradient_outer".into())),
                ("every", OptionValue::Number(2.0)),
                ("b1", OptionValue::Number(0.9)),
            ],
        );
        let muon = matrix_plan(StructureKind::Orthogonalize, &[("momentum", OptionValue::Number(0.95))]);
        let statistics = HashMap::new();
        for plan in [shampoo, muon] {
            let mut param = Tensor::new(vec![4, 3], (0..12).map(|index| index as f32 * 0.1 - 0.5).collect());
            let mut state: ParamState<f32> = Vec::new();
            for step in 1..=4u64 {
                let gradient = Tensor::new(
                    vec![4, 3],
                    (0..12).map(|index| ((index * 7 + step as usize) % 5) as f32 - 2.0).collect(),
                );
                let inputs = UpdateInputs {
                    backend: &crate::backend::Interpreter,
                    step,
                    learning_rate: 0.1,
                    batch: 8,
                    gradient: TensorRef::from(&gradient),
                    param_lent: None,
                    statistics: &statistics,
                    captures: None,
                    seed: 0,
                    param: 0,
                };
                let (param_before, state_before) = (param.clone(), state.clone());
                let displaced = update_param(&plan, &[], &mut param, &mut state, &inputs).unwrap().unwrap();
                assert!(param.data != param_before.data || step == 1, "{:?} step {step} did not move", plan.structure);
                displaced.undo(&mut param, &mut state);
                assert_eq!(param.data, param_before.data);
                assert_eq!(state, state_before, "{:?} step {step}", plan.structure);
                // Take the step for real before the next one.
                update_param(&plan, &[], &mut param, &mut state, &inputs).unwrap();
            }
        }
    }
}
