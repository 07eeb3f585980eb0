//! The resident training step: parameters, rule states and gradients stay where the backend
//! computes (device memory on a GPU) from one step to the next.
//!
//! A step takes this path when every parameter is updated by a rule (a multi-parameter rule
//! kernel, or its own rule's kernels) with no modifier, or by a structure whose step has IR
//! functions ([`crate::structure_kernels`]: Adam's diagonal, Muon, one-tile Shampoo and SOAP,
//! K-FAC), with no curvature statistic at that step but K-FAC's (whose captures the gradient
//! program then keeps resident) and no gradient clipping: then nothing of the step needs the
//! host but the loss and the metrics' outputs (and the roots, bases and inverses at their
//! refresh steps). The
//! gradient program keeps its gradients resident, the rule kernels and structure functions read
//! the parameters, gradients and states resident and keep their outputs resident, and one
//! non-finite check of the gradients and new parameters runs where they are
//! ([`crate::backend::first_non_finite_resident`]); only when it fails are the tensors read on
//! the host, to name the first bad element, as a host step names it. The numbers are those of
//! the host step, bit for bit, for rules (the same kernels run on the same values), and to
//! rounding for the structures (their host updates compute some scalars in double precision).
//!
//! **Invariant:** while `Trainer::resident` holds values, they are the parameters and states;
//! `Trainer::params` and `Trainer::states` hold them too only after [`Trainer::sync_to_host`]
//! (until the next resident step that updates them). Every reader of the host values calls it
//! first: the host step (which then drops the resident values), checkpoints and final outputs.
//! Evaluations read the resident parameters where they are.

use super::{keys, learning_rate, StepReport, TrainError, Trainer};
use crate::backend::Output;
use crate::error::{Error, ErrorCode};
use curv_interp::{Inputs, Real, Resident, Slot, Tensor, Value};
use std::collections::HashMap;

/// A data field (by source and field name) of a batch, resident.
type DataField<T> = ((String, String), Resident<T>);

/// The parameters and rule states of a trainer, kept resident between steps.
pub(crate) struct ResidentValues<T> {
    params: Vec<Resident<T>>,
    /// Per parameter, its rule's states by name.
    states: Vec<Vec<(String, Resident<T>)>>,
    /// The floating-point data fields of the last batch, with the example indices they hold: a
    /// full-batch run uploads its data once.
    batch: Option<(Vec<usize>, Vec<DataField<T>>)>,
    /// Whether `Trainer::params` and `Trainer::states` hold these values too.
    host_current: bool,
    /// The floating-point data fields uploaded whole, to gather batches from where they are;
    /// None until the first resident step decides (empty when they do not fit or cannot be
    /// gathered there).
    tables: Option<Vec<DataTable<T>>>,
}

/// A floating-point data field uploaded whole (`[examples, width]`), with the function that
/// gathers a batch of it.
struct DataTable<T> {
    key: (String, String),
    /// The examples of a batch the gather takes.
    batch: usize,
    table: Resident<T>,
    gather: curv_ir::Function,
    gather_key: String,
}

/// The parameters in the order a step updates them: each rule group's members, then the
/// parameters with a rule of their own (`lone`), in plan order.
fn update_order<'a>(
    plans: &'a [curv_ir::ParamPlan],
    groups: &[crate::optimizer::RuleGroup],
) -> (Vec<usize>, Vec<&'a curv_ir::ParamPlan>) {
    let mut order: Vec<usize> =
        groups.iter().flat_map(|group| group.plans.iter().map(|&plan| plans[plan].param)).collect();
    let lone: Vec<&curv_ir::ParamPlan> = plans.iter().filter(|plan| !order.contains(&plan.param)).collect();
    order.extend(lone.iter().map(|plan| plan.param));
    (order, lone)
}

/// The device form of `plan` ([`crate::structure_kernels::device_plan`]) for its parameter in
/// `program`, whose K-FAC captures are `captures` ([`super::capture_program`]); None for a rule
/// or a variant without one.
pub fn device_plan_of(
    program: &curv_ir::TrainProgram,
    plan: &curv_ir::ParamPlan,
    captures: Option<&super::CaptureProgram>,
) -> Option<crate::structure_kernels::DevicePlan> {
    let shape: Vec<usize> =
        program.params.get(plan.param)?.ty.known_shape()?.iter().map(|&size| size as usize).collect();
    if crate::optimizer::kfac_statistic(plan).is_none() {
        return crate::structure_kernels::device_plan(plan, &shape);
    }
    // K-FAC of a weight used in one product `x @ W` or one convolution.
    let captures = captures?;
    let mut layers = captures.layers.iter().filter(|layer| layer.param == plan.param);
    let (Some(layer), None) = (layers.next(), layers.next()) else { return None };
    // A capture's dimensions, the batch for a symbolic one.
    let dims = |name: &str| -> Option<Vec<usize>> {
        let value = captures.function.output(name)?;
        Some(
            captures
                .function
                .ty(value)
                .shape
                .iter()
                .map(|dim| match dim {
                    curv_ir::Dim::Known(size) => *size as usize,
                    curv_ir::Dim::Symbol(_) => program.batch.max(1) as usize,
                })
                .collect(),
        )
    };
    let input = dims(&layer.input)?;
    let folded = captures.folded_biases.iter().any(|(_, weight)| *weight == plan.param);
    match layer.convolution {
        None => {
            // The captured input's rows: every dimension but the last.
            let examples = input[..input.len().saturating_sub(1)].iter().product();
            crate::structure_kernels::kfac_device_plan(plan, &shape, folded, examples, None)
        }
        Some((stride, padding)) => {
            let (&[examples, channels, height, width], Some(&[_, _, out_h, out_w])) =
                (&input[..], dims(&layer.cotangent).as_deref())
            else {
                return None;
            };
            let (&[_, _, kernel_h, kernel_w], 0) = (&shape[..], folded as usize) else { return None };
            let geometry = crate::structure_kernels::Convolution {
                channels,
                input: (height, width),
                kernel: (kernel_h, kernel_w),
                stride,
                padding,
                output: (out_h, out_w),
            };
            crate::structure_kernels::kfac_device_plan(plan, &shape, folded, examples, Some(geometry))
        }
    }
}

/// The parameter whose K-FAC update also updates the bias `param` (folded in as `[W; b]`).
fn folded_into(captures: Option<&super::CaptureProgram>, param: usize) -> Option<usize> {
    captures?.folded_biases.iter().find(|(bias, _)| *bias == param).map(|(_, weight)| *weight)
}

/// Whether every parameter of `program` is updated by a rule (in a group, or of its own) or by a
/// structure with functions of its step ([`crate::structure_kernels`]), or is a bias folded into
/// a K-FAC weight that is: the first condition of a resident step.
fn every_parameter_updates_resident(program: &curv_ir::TrainProgram, captures: Option<&super::CaptureProgram>) -> bool {
    let plans = &program.optimizer.plans;
    let updates = |param: usize| {
        let mut own = plans.iter().filter(|plan| plan.param == param).peekable();
        own.peek().is_some()
            && own.all(|plan| {
                plan.structure == curv_ir::StructureKind::Rule || device_plan_of(program, plan, captures).is_some()
            })
    };
    (0..program.params.len()).all(|param| match folded_into(captures, param) {
        Some(weight) => updates(weight),
        None => updates(param),
    })
}

/// The shapes of the tensors a resident step of `program` checks for non-finite values in one
/// call ([`crate::backend::first_non_finite_resident`]): every gradient, then every new parameter
/// in update order; None when its steps cannot be resident. `curv build` compiles that check
/// ahead of time.
pub fn resident_check_shapes(
    program: &curv_ir::TrainProgram,
    groups: &[crate::optimizer::RuleGroup],
) -> Option<Vec<Vec<usize>>> {
    let captures = super::capture_program(program).ok().flatten();
    if !every_parameter_updates_resident(program, captures.as_ref()) {
        return None;
    }
    let shape = |param: usize| -> Vec<usize> {
        program.params[param].ty.known_shape().unwrap_or_default().iter().map(|&size| size as usize).collect()
    };
    let (order, _) = update_order(&program.optimizer.plans, groups);
    Some((0..program.params.len()).chain(order).map(shape).collect())
}

/// The inputs of a batch gather ([`crate::backend::batch_gather_function`]) but its table: a
/// placeholder where the table goes, and the example indices.
fn gather_inputs<'a, T: Real>(rows: Vec<i32>) -> Inputs<'a, T> {
    let count = rows.len();
    Inputs {
        inputs: vec![Value::Real(Tensor::new(vec![0], Vec::new())), Value::Int(Tensor::new(vec![count], rows))],
        ..Inputs::default()
    }
}

/// The most data set memory a resident run uploads whole; a larger data set is uploaded a
/// batch at a time.
const TABLE_LIMIT_BYTES: usize = 1 << 30;

impl<T> ResidentValues<T> {
    pub(super) fn params(&self) -> &[Resident<T>] {
        &self.params
    }
}

impl<T: Real> Trainer<T> {
    /// Keeps parameters, rule states and gradients resident between steps where the step allows
    /// it (see the module comment); `false` goes back to host steps. It pays on a backend that
    /// computes away from the host (`Backend::keeps_resident`); any other backend gives the same
    /// numbers through host copies. The caller reads `params` and `states` only after
    /// [`Trainer::sync_to_host`].
    pub fn set_resident(&mut self, resident: bool) -> Result<(), TrainError> {
        if !resident {
            self.leave_resident()?;
        }
        self.resident_enabled = resident;
        Ok(())
    }

    /// How many data fields are uploaded whole, their batches gathered where they are.
    pub fn resident_data_fields(&self) -> usize {
        self.resident.as_ref().and_then(|resident| resident.tables.as_ref()).map_or(0, Vec::len)
    }

    /// Whether the parameters and states are resident now (and the host copies stale).
    pub fn is_resident(&self) -> bool {
        self.resident.is_some()
    }

    /// Brings `params` and `states` up to date with the resident values (which stay resident for
    /// the next step). Nothing changes when a copy fails.
    pub fn sync_to_host(&mut self) -> Result<(), TrainError> {
        let Some(resident) = self.resident.as_ref().filter(|resident| !resident.host_current) else {
            return Ok(());
        };
        let download = |resident: &Resident<T>| {
            resident.to_tensor().map_err(|error| TrainError::backend(format!("reading back: {error}")))
        };
        let params = resident.params.iter().map(download).collect::<Result<Vec<_>, _>>()?;
        let states = crate::optimizer::map_states(&resident.states, download)?;
        self.params = params;
        self.states = states;
        if let Some(resident) = &mut self.resident {
            resident.host_current = true;
        }
        Ok(())
    }

    /// Brings `params` and `states` up to date and drops the resident values: the next step
    /// starts from the host values (a host step, or a caller that replaces the parameters).
    pub(super) fn leave_resident(&mut self) -> Result<(), TrainError> {
        self.sync_to_host()?;
        self.resident = None;
        Ok(())
    }

    /// Whether step `step` can be a resident step.
    pub(super) fn resident_step_possible(&self, step: u64) -> bool {
        if !self.resident_enabled {
            return false;
        }
        if curv_ir::option_number(&self.program.optimizer.settings, "grad_clip").is_some() {
            return false;
        }
        let plans = &self.program.optimizer.plans;
        let captures = self.captures.as_ref();
        if !every_parameter_updates_resident(&self.program, captures) {
            return false;
        }
        for plan in plans {
            let rule = plan.structure == curv_ir::StructureKind::Rule;
            // The only statistics a resident step takes are K-FAC's, from the gradient
            // program's captures, for the plans whose device form reads them.
            let device_statistics = device_plan_of(&self.program, plan, captures).is_some_and(|device| {
                matches!(device.structure, crate::structure_kernels::DeviceStructure::Kfac { .. })
            });
            let statistics = crate::optimizer::statistics_needed(plan, &self.rules, step);
            if (rule && !plan.modifiers.is_empty()) || (!statistics.is_empty() && !device_statistics) {
                return false;
            }
        }
        if self.resident.is_none() {
            // The states are made by the first host step (the rules' `init`, the structures'
            // first update).
            for plan in plans.iter().filter(|plan| folded_into(captures, plan.param).is_none()) {
                if let Some(device) = device_plan_of(&self.program, plan, captures) {
                    let state = &self.states[plan.param];
                    let required = crate::structure_kernels::required_states(&device);
                    if required.iter().any(|name| crate::optimizer::state_get(state, name).is_none()) {
                        return false;
                    }
                }
            }
            for group in &self.groups {
                let Some(rule) = self.rules.iter().find(|rule| rule.name == group.rule) else { return false };
                for &plan in &group.plans {
                    let state = &self.states[plans[plan].param];
                    if rule.state.iter().any(|name| crate::optimizer::state_get(state, name).is_none()) {
                        return false;
                    }
                }
            }
        }
        true
    }

    /// Uploads the parameters and states, unless they are resident already.
    fn make_resident(&mut self) -> Result<(), TrainError> {
        if self.resident.is_some() {
            return Ok(());
        }
        let upload = |tensor: &Tensor<T>| {
            self.backend.upload(tensor.clone()).map_err(|error| TrainError::backend(format!("uploading: {error}")))
        };
        let params = self.params.iter().map(upload).collect::<Result<Vec<_>, _>>()?;
        let states = crate::optimizer::map_states(&self.states, upload)?;
        self.resident = Some(ResidentValues { params, states, batch: None, host_current: true, tables: None });
        Ok(())
    }

    /// One resident step on the examples `indices` (see the module comment).
    pub(super) fn resident_step(&mut self, step: u64, indices: Vec<usize>) -> Result<StepReport, TrainError> {
        self.make_resident()?;
        let Some(mut resident) = self.resident.take() else {
            return Err(TrainError::backend("the resident values are missing"));
        };
        let result = self.resident_step_with(step, indices, &mut resident);
        self.resident = Some(resident);
        result
    }

    fn resident_step_with(
        &mut self,
        step: u64,
        indices: Vec<usize>,
        resident: &mut ResidentValues<T>,
    ) -> Result<StepReport, TrainError> {
        let runtime = |error: String| TrainError::backend(error).at_step(step);
        // The batch: its floating-point fields resident (made again only for new examples), its
        // integer fields (labels) on the host.
        let data = self.dataset.gather_fields(&indices, |field| field.f32_values().is_none());
        if resident.batch.as_ref().is_none_or(|(held, _)| *held != indices) {
            if resident.tables.is_none() {
                resident.tables = Some(self.data_tables(indices.len()).map_err(runtime)?);
            }
            let mut fields = Vec::new();
            for field in self.dataset.fields.iter().filter(|field| field.f32_values().is_some()) {
                let key = (self.dataset.name.clone(), field.name.clone());
                let table =
                    resident.tables.iter().flatten().find(|table| table.key == key && table.batch == indices.len());
                let batch = match table {
                    // Gathered where the whole data set is.
                    Some(table) => self.gather_batch(table, &indices).map_err(runtime)?,
                    None => {
                        let mut host = self.dataset.gather_fields(&indices, |other| other.name == field.name);
                        match host.remove(&key) {
                            Some(Value::Real(tensor)) => self.backend.upload(tensor).map_err(runtime)?,
                            _ => return Err(runtime(format!("the data field `{}` is missing", field.name))),
                        }
                    }
                };
                fields.push((key, batch));
            }
            resident.batch = Some((indices, fields));
        }
        let batch = resident.batch.as_ref().map_or(&[][..], |(_, fields)| &fields[..]);
        let mut inputs = Inputs { data, ..Inputs::default() };
        for (index, param) in resident.params.iter().enumerate() {
            inputs.lend_resident(Slot::Param(index), param);
        }
        for ((source, field), tensor) in batch {
            inputs.lend_resident(Slot::Data(source.clone(), field.clone()), tensor);
        }
        // At K-FAC's statistics steps, the gradient program with the layers' captures, kept too.
        let device_plans: Vec<Option<crate::structure_kernels::DevicePlan>> = self
            .program
            .optimizer
            .plans
            .iter()
            .map(|plan| device_plan_of(&self.program, plan, self.captures.as_ref()))
            .collect();
        let capture_program =
            self.captures.as_ref().filter(|_| device_plans.iter().flatten().any(|device| device.takes_captures(step)));
        let (key, function) = match capture_program {
            Some(captures) => (keys::GRADIENTS_AND_CAPTURES, &captures.function),
            None => (keys::GRADIENTS, &self.gradients),
        };
        let outputs = self
            .backend
            .outputs_keeping(key, function, &inputs, &|name| name.starts_with("grad.") || name.starts_with("kfac."))
            .map_err(runtime)?;
        let mut values: Vec<(String, Value<T>)> = Vec::new();
        let mut kept: HashMap<String, Resident<T>> = HashMap::new();
        for (name, output) in outputs {
            match output {
                Output::Value(value) => values.push((name, value)),
                Output::Resident(tensor) => {
                    kept.insert(name, tensor);
                }
            }
        }
        let (loss, metrics) = self.loss_and_metrics(&values);
        let mut problem: Option<String> = (!loss.is_finite()).then(|| format!("the loss is {loss}"));
        let mut gradients = Vec::with_capacity(self.program.params.len());
        for index in 0..self.program.params.len() {
            let name = format!("grad.{}", self.param_name(index));
            let gradient = kept.remove(&name).ok_or_else(|| {
                TrainError::backend(format!("no gradient for `{}`", self.param_name(index))).at_step(step)
            })?;
            gradients.push(gradient);
        }
        // The gradients and the new parameters are checked together, once every update has run
        // (an update from a non-finite gradient is dropped with the rest of the step): one call,
        // which names what a host step would have named first.
        let rate =
            learning_rate(self.program.optimizer.lr, self.program.optimizer.schedule.as_ref(), step, self.total_steps);
        // The step's new tensors, committed only once every check has passed.
        let mut new_params: Vec<Option<Resident<T>>> = (0..resident.params.len()).map(|_| None).collect();
        let mut new_states: Vec<Vec<(String, Resident<T>)>> = (0..resident.states.len()).map(|_| Vec::new()).collect();
        let plans = &self.program.optimizer.plans;
        let (order, lone) = update_order(plans, &self.groups);
        if problem.is_none() {
            for group in &self.groups {
                let members: Vec<usize> = group.plans.iter().map(|&plan| plans[plan].param).collect();
                let rule = self
                    .rules
                    .iter()
                    .find(|rule| rule.name == group.rule)
                    .ok_or_else(|| TrainError::backend(format!("rule `{}` is missing", group.rule)))?;
                let failed = |message: String| {
                    let name = &self.program.params[members[0]].name;
                    TrainError::Runtime(
                        Error::new(ErrorCode::UpdateFailed, format!("rule `{}`: {message}", rule.name))
                            .parameter(name.clone())
                            .step(step)
                            .structure("rule"),
                    )
                };
                let base: Inputs<T> = crate::optimizer::rule_hyperparameters_at(
                    &plans[group.plans[0]],
                    rate,
                    self.program.batch as usize,
                    step,
                );
                let per_member = 2 + rule.state.len();
                for (block, rule_update) in rule.updates.iter().enumerate() {
                    if !rule_update.runs_at(step) {
                        continue;
                    }
                    let sizes: Vec<usize> = members.iter().map(|&index| resident.params[index].len()).collect();
                    let key = keys::rule_group_block(&rule.name, block, &sizes);
                    let mut update_inputs = base.clone();
                    for (member, &index) in members.iter().enumerate() {
                        let param = new_params[index].as_ref().unwrap_or(&resident.params[index]);
                        // A rule's functions take their tensors flat.
                        let flat = vec![sizes[member]];
                        update_inputs.lend_resident_as(Slot::Input(member * per_member), param, flat.clone());
                        update_inputs.lend_resident_as(
                            Slot::Input(member * per_member + 1),
                            &gradients[index],
                            flat.clone(),
                        );
                        for (position, name) in rule.state.iter().enumerate() {
                            let current = new_states[index]
                                .iter()
                                .chain(&resident.states[index])
                                .find(|(state_name, _)| state_name == name)
                                .map(|(_, tensor)| tensor)
                                .ok_or_else(|| failed(format!("the state `{name}` is missing")))?;
                            update_inputs.lend_resident_as(
                                Slot::Input(member * per_member + 2 + position),
                                current,
                                current.shape.clone(),
                            );
                        }
                    }
                    let outputs = self
                        .backend
                        .outputs_keeping(&key, &group.blocks[block], &update_inputs, &|_| true)
                        .map_err(failed)?;
                    drop(update_inputs);
                    for (name, output) in outputs {
                        let Output::Resident(tensor) = output else {
                            return Err(failed(format!("`{name}` was not kept resident")));
                        };
                        let (member, output_name) = name
                            .split_once(':')
                            .and_then(|(member, output)| member.parse::<usize>().ok().map(|member| (member, output)))
                            .filter(|(member, _)| *member < members.len())
                            .ok_or_else(|| failed(format!("unexpected output `{name}` of a grouped update")))?;
                        let index = members[member];
                        if rule.state.iter().any(|state_name| state_name == output_name) {
                            new_states[index].retain(|(state_name, _)| state_name != output_name);
                            new_states[index].push((output_name.to_string(), tensor));
                        } else {
                            let shape = resident.params[index].shape.clone();
                            new_params[index] = Some(Resident { shape, storage: tensor.storage });
                        }
                    }
                }
            }
            // The parameters with a rule of their own, or a structure, in plan order (as the host
            // step).
            for plan in &lone {
                let index = plan.param;
                if folded_into(self.captures.as_ref(), index).is_some() {
                    // Updated with its weight.
                    continue;
                }
                // `lone` borrows from the plans, in their order: its plan's device form by position.
                let plan_index = self.program.optimizer.plans.iter().position(|other| std::ptr::eq(other, *plan));
                if let Some(device) = plan_index.and_then(|at| device_plans[at].as_ref()) {
                    let mut extras = crate::structure_kernels::StructureExtras::default();
                    let layer = self
                        .captures
                        .as_ref()
                        .and_then(|captures| captures.layers.iter().find(|layer| layer.param == index));
                    if let (true, Some(layer)) = (device.takes_captures(step), layer) {
                        extras.captures = kept.get(&layer.input).zip(kept.get(&layer.cotangent));
                    }
                    let bias = self.captures.as_ref().and_then(|captures| {
                        captures.folded_biases.iter().find(|(_, weight)| *weight == index).map(|(bias, _)| *bias)
                    });
                    if let Some(bias) = bias {
                        extras.bias = Some((&resident.params[bias], &gradients[bias]));
                    }
                    let update = crate::structure_kernels::update_resident(
                        device,
                        self.backend.as_ref(),
                        step,
                        rate,
                        &resident.params[index],
                        &gradients[index],
                        &resident.states[index],
                        &extras,
                        &mut self.structure_functions,
                    )
                    .map_err(|message| {
                        TrainError::Runtime(
                            Error::new(ErrorCode::UpdateFailed, format!("{}: {message}", plan.rule_name))
                                .parameter(self.param_name(index))
                                .step(step)
                                .structure(plan.structure.name()),
                        )
                    })?;
                    new_states[index] = update.update.states;
                    new_params[index] = update.update.param;
                    if let (Some(bias), Some(tensor)) = (bias, update.bias) {
                        new_params[bias] = Some(tensor);
                    }
                    continue;
                }
                let update = crate::optimizer::update_rule_resident(
                    plan,
                    &self.rules,
                    self.backend.as_ref(),
                    step,
                    rate,
                    self.program.batch as usize,
                    &resident.params[index],
                    &gradients[index],
                    &resident.states[index],
                )
                .map_err(|error| TrainError::Runtime(error.parameter(self.param_name(index))))?;
                new_states[index] = update.states;
                new_params[index] = update.param;
            }
            let checked: Vec<&Resident<T>> = gradients
                .iter()
                .chain(order.iter().map(|&index| new_params[index].as_ref().unwrap_or(&resident.params[index])))
                .collect();
            if let Some((position, element)) =
                crate::backend::first_non_finite_resident(self.backend.as_ref(), &checked).map_err(runtime)?
            {
                problem = Some(match position.checked_sub(gradients.len()) {
                    None => {
                        format!("the gradient of `{}` is not finite at flat index {element}", self.param_name(position))
                    }
                    Some(updated) => {
                        format!(
                            "the updated `{}` is not finite at flat index {element}",
                            self.param_name(order[updated])
                        )
                    }
                });
            }
        }
        self.step = step;
        if problem.is_none() {
            resident.host_current = false;
            for (index, param) in new_params.into_iter().enumerate() {
                if let Some(param) = param {
                    resident.params[index] = param;
                }
            }
            for (index, states) in new_states.into_iter().enumerate() {
                for (name, tensor) in states {
                    match resident.states[index].iter_mut().find(|(state_name, _)| *state_name == name) {
                        Some((_, held)) => *held = tensor,
                        None => resident.states[index].push((name, tensor)),
                    }
                }
            }
        }
        self.step_outcome(step, metrics, problem)
    }

    /// The data set's floating-point fields uploaded whole, for batches of `batch` examples
    /// gathered where they are, when they fit ([`TABLE_LIMIT_BYTES`]) and the backend gathers
    /// there itself; otherwise none (batches are then uploaded one at a time).
    fn data_tables(&self, batch: usize) -> Result<Vec<DataTable<T>>, String> {
        let examples = self.dataset.examples;
        let mut tables = Vec::new();
        let mut bytes = 0usize;
        for field in &self.dataset.fields {
            let Some(values) = field.f32_values() else { continue };
            bytes += values.len() * std::mem::size_of::<T>();
            if bytes > TABLE_LIMIT_BYTES {
                return Ok(Vec::new());
            }
            let width: usize = field.example_shape.iter().product();
            let gather = crate::backend::batch_gather_function(examples, &field.example_shape, batch);
            let gather_key = keys::batch_gather(&self.dataset.name, &field.name, examples, width, batch);
            let data: Vec<T> = values.iter().map(|&value| T::from_f64(value as f64)).collect();
            let table = Tensor::new(vec![examples, width], data);
            // Only where the backend runs the gather itself (a backend without its kernel would
            // read the whole table back to the host for every batch).
            let probe = Resident::host(table.shape.clone(), Vec::new());
            let mut inputs = gather_inputs(vec![0; batch]);
            inputs.lend_resident_as(Slot::Input(0), &probe, vec![examples, width]);
            if !self.backend.evaluates_natively(&gather_key, &gather, &inputs) {
                return Ok(Vec::new());
            }
            let key = (self.dataset.name.clone(), field.name.clone());
            tables.push(DataTable { key, batch, table: self.backend.upload(table)?, gather, gather_key });
        }
        Ok(tables)
    }

    /// A batch of `table`'s field: the rows `indices`, gathered where the table is.
    fn gather_batch(&self, table: &DataTable<T>, indices: &[usize]) -> Result<Resident<T>, String> {
        let rows: Vec<i32> = indices.iter().map(|&index| index as i32).collect();
        let mut inputs = gather_inputs(rows);
        inputs.lend_resident(Slot::Input(0), &table.table);
        let outputs = self.backend.outputs_keeping(&table.gather_key, &table.gather, &inputs, &|_| true)?;
        match outputs.into_iter().next() {
            Some((_, Output::Resident(batch))) => Ok(batch),
            _ => Err("the batch gather returned no resident batch".to_string()),
        }
    }
}
