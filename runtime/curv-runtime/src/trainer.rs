//! The training loop of one train program on the reference interpreter.

use crate::backend::{keys, output as find_output, Backend, Interpreter};
use crate::dataset::Dataset;
use crate::error::{Error, ErrorCode};
use crate::kronecker::Captures;
use crate::optimizer::{statistics_needed, update_param, ParamState, UpdateInputs};
use crate::random::{Random, Stream};
use crate::schedule::learning_rate;
use curv_ad::products::{gradient_program, hvp_program};
use curv_interp::{Inputs, Real, Tensor, TensorRef, Value};
use curv_ir::{Function, LossKind, Op, RuleProgram, TrainProgram};
use std::collections::{BTreeSet, HashMap};

mod capture;
mod egn;
mod fisher;
mod resident;

use capture::*;
pub use capture::{capture_program, CaptureProgram, CapturedLayer};
pub use resident::{device_plan_of, resident_check_shapes};

/// What to do when a loss, gradient, statistic or updated parameter is not finite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonFinitePolicy {
    /// Leave parameters and state as they were and go on with the next step.
    Skip,
    /// Stop training with an error that names the step and the tensor.
    Stop,
}

/// A failure during training.
#[derive(Debug, Clone, PartialEq)]
pub enum TrainError {
    /// A non-finite loss, gradient or update (E0501).
    NonFinite { step: u64, what: String },
    /// Any other failure, with its code and, when known, the parameter, step and structure.
    Runtime(Error),
}

impl TrainError {
    /// The failure's stable code.
    pub fn code(&self) -> ErrorCode {
        match self {
            TrainError::NonFinite { .. } => ErrorCode::NonFinite,
            TrainError::Runtime(error) => error.code,
        }
    }

    /// A failure of a step's curvature statistics (E0503).
    pub fn statistics(message: impl Into<String>) -> TrainError {
        TrainError::Runtime(Error::new(ErrorCode::StatisticsFailed, message))
    }

    /// A failure of the backend (E0504).
    pub fn backend(message: impl Into<String>) -> TrainError {
        TrainError::Runtime(Error::new(ErrorCode::BackendFailed, message))
    }

    /// The same failure, at `step`.
    pub fn at_step(self, step: u64) -> TrainError {
        match self {
            TrainError::Runtime(error) => TrainError::Runtime(error.step(step)),
            other => other,
        }
    }
}

impl std::fmt::Display for TrainError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TrainError::NonFinite { step, what } => {
                write!(formatter, "[{}] non-finite value at step {step}: {what}", ErrorCode::NonFinite)
            }
            TrainError::Runtime(error) => error.fmt(formatter),
        }
    }
}

impl std::error::Error for TrainError {}

/// Metrics of one evaluation (a training step's batch or the test split).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    pub loss: f64,
    pub accuracy: Option<f64>,
    pub psnr: Option<f64>,
}

/// The result of one step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    pub step: u64,
    pub metrics: Metrics,
    /// Whether the update was skipped because of non-finite values.
    pub skipped: Option<String>,
}

pub struct Trainer<T> {
    pub program: TrainProgram,
    pub rules: Vec<RuleProgram>,
    pub dataset: Dataset,
    /// The parameters and their optimizer states. After a resident step (see
    /// [`Trainer::set_resident`]) they are stale until [`Trainer::sync_to_host`].
    pub params: Vec<Tensor<T>>,
    pub states: Vec<ParamState<T>>,
    /// The number of completed steps.
    pub step: u64,
    pub seed: u64,
    pub total_steps: u64,
    pub policy: NonFinitePolicy,
    gradients: Function,
    hessian_vector: Option<Function>,
    /// EGN's model Jacobian products (`model_vjp_program`, `model_jvp_program`), when a plan
    /// uses `dense(stats = ggn)`.
    egn: Option<(Function, Function)>,
    /// The gradient program with K-FAC's captures as extra outputs, when a plan needs them.
    captures: Option<CaptureProgram>,
    /// Where functions are evaluated (the interpreter unless a backend is installed).
    pub backend: Box<dyn Backend<T>>,
    /// Seconds spent building the derivative programs.
    pub autodiff_seconds: f64,
    /// Parameters whose rule updates run as one multi-parameter kernel per block.
    groups: Vec<crate::optimizer::RuleGroup>,
    /// Whether steps keep their tensors resident where they can ([`Trainer::set_resident`]).
    resident_enabled: bool,
    /// The structures' step functions of resident steps, by key, made once
    /// ([`crate::structure_kernels::update_resident`]).
    structure_functions: HashMap<String, Function>,
    /// The resident parameters and states, when the last step was resident.
    resident: Option<resident::ResidentValues<T>>,
}

/// The multi-parameter rule groups of a train program ([`crate::optimizer::rule_groups`]): the
/// trainer runs them, and `curv build` compiles their kernels. Parameters updated through K-FAC's
/// folded `[W; b]` are left out.
pub fn update_groups(
    program: &TrainProgram,
    rules: &[RuleProgram],
    captures: Option<&CaptureProgram>,
) -> Vec<crate::optimizer::RuleGroup> {
    let excluded: Vec<usize> = captures
        .map(|captures| captures.folded_biases.iter().flat_map(|(bias, weight)| [*bias, *weight]).collect())
        .unwrap_or_default();
    crate::optimizer::rule_groups(&program.optimizer.plans, rules, &excluded)
}

/// One backward pass for K-FAC's statistics: its outputs, and a weight per row for its cotangents
/// (`None`: 1). An empty output list stands for the step's main pass.
type FisherPass<T> = (Vec<(String, Value<T>)>, Option<Vec<f64>>);

/// How to put back one parameter and its state after a step that is not kept.
enum Undo<T> {
    /// Copies made before an in-place update.
    Copy(Tensor<T>, ParamState<T>),
    /// What an out-of-place update replaced.
    Displaced(crate::optimizer::Displaced<T>),
    /// A copy of a parameter alone (a weight and its folded bias, updated as one matrix whose
    /// update reports the state it replaced).
    Param(Tensor<T>),
}

/// Undoes a step's updates, the latest first.
fn roll_back<T: Real>(params: &mut [Tensor<T>], states: &mut [ParamState<T>], undo: Vec<(usize, Undo<T>)>) {
    for (index, entry) in undo.into_iter().rev() {
        match entry {
            Undo::Copy(param, state) => {
                params[index] = param;
                states[index] = state;
            }
            Undo::Displaced(displaced) => displaced.undo(&mut params[index], &mut states[index]),
            Undo::Param(param) => params[index] = param,
        }
    }
}

fn shape_of(ty: &curv_ir::TensorType) -> Vec<usize> {
    ty.known_shape().unwrap_or_default().into_iter().map(|size| size as usize).collect()
}

/// The position of the first element of `data` that is not finite, if any: a pass without
/// branches first (which the compiler vectorises; every step checks gradients and parameters),
/// the search only when it found one.
pub fn first_non_finite<T: Real>(data: &[T]) -> Option<usize> {
    if data.iter().fold(false, |any, value| any | !value.is_finite()) {
        data.iter().position(|value| !value.is_finite())
    } else {
        None
    }
}

impl<T: Real> Trainer<T> {
    /// A trainer with freshly initialised parameters.
    pub fn new(
        program: TrainProgram,
        rules: Vec<RuleProgram>,
        dataset: Dataset,
        seed: u64,
        total_steps: u64,
    ) -> Trainer<T> {
        let params: Vec<Tensor<T>> = program
            .params
            .iter()
            .enumerate()
            .map(|(index, param)| crate::init::initialise(param, &shape_of(&param.ty), seed, index))
            .collect();
        let states = vec![Vec::new(); program.params.len()];
        let autodiff_started = std::time::Instant::now();
        let gradients = gradient_program(&program.loss, &program.params).function;
        let needs_hessian =
            program.optimizer.plans.iter().any(|plan| {
                crate::optimizer::uses_hutchinson(plan, &rules) || crate::optimizer::uses_block_hessian(plan)
            });
        let hessian_vector = needs_hessian.then(|| hvp_program(&program.loss, &program.params));
        let egn = program.optimizer.plans.iter().any(crate::optimizer::is_egn).then(|| {
            curv_ad::products::model_program(&program.loss).and_then(|model| {
                let backward = curv_ad::products::model_vjp_program(&model, &program.params)?;
                let forward = curv_ad::products::model_jvp_program(&model, &program.params)?;
                Some((backward, forward))
            })
        });
        let egn = egn.flatten();
        // A K-FAC parameter that is not captured reports at its first step.
        let captures = capture_program(&program).ok().flatten();
        let groups = update_groups(&program, &rules, captures.as_ref());
        Trainer {
            program,
            rules,
            dataset,
            params,
            states,
            step: 0,
            seed,
            total_steps,
            policy: NonFinitePolicy::Stop,
            gradients,
            hessian_vector,
            egn,
            captures,
            backend: Box::new(Interpreter),
            autodiff_seconds: autodiff_started.elapsed().as_secs_f64(),
            groups,
            resident_enabled: false,
            structure_functions: HashMap::new(),
            resident: None,
        }
    }

    /// Whether parameters sharing an elementwise rule are updated by one multi-parameter kernel
    /// per block (the default) or one kernel per parameter. Both give the same numbers.
    pub fn set_grouped_updates(&mut self, grouped: bool) {
        self.groups =
            if grouped { update_groups(&self.program, &self.rules, self.captures.as_ref()) } else { Vec::new() };
    }

    fn param_name(&self, index: usize) -> &str {
        &self.program.params[index].name
    }

    /// Runs one training step.
    pub fn train_step(&mut self) -> Result<StepReport, TrainError> {
        let step = self.step + 1;
        let indices = self.dataset.batch_indices(step, self.program.batch as usize, self.seed);
        if self.resident_step_possible(step) {
            return self.resident_step(step, indices);
        }
        self.leave_resident()?;
        // The parameters are moved into the inputs of the evaluations, not copied; the step puts
        // them back (an error before that point leaves them in `inputs`).
        let mut inputs = Inputs {
            params: std::mem::take(&mut self.params),
            data: self.dataset.gather(&indices),
            ..Inputs::default()
        };
        let result = self.train_step_with(step, &mut inputs);
        if !inputs.params.is_empty() {
            self.params = std::mem::take(&mut inputs.params);
        }
        result
    }

    /// Runs one training step on a batch the caller gives (`Op::Data` values by source and field,
    /// with the shapes of the loss function) instead of one drawn from the data set: the train
    /// step of a library (`curv build --lib`).
    pub fn train_step_on(&mut self, data: HashMap<(String, String), Value<T>>) -> Result<StepReport, TrainError> {
        let step = self.step + 1;
        self.leave_resident()?;
        let mut inputs = Inputs { params: std::mem::take(&mut self.params), data, ..Inputs::default() };
        let result = self.train_step_with(step, &mut inputs);
        if !inputs.params.is_empty() {
            self.params = std::mem::take(&mut inputs.params);
        }
        result
    }

    fn train_step_with(&mut self, step: u64, inputs: &mut Inputs<T>) -> Result<StepReport, TrainError> {
        let mut needed: BTreeSet<String> = BTreeSet::new();
        for plan in &self.program.optimizer.plans {
            needed.extend(statistics_needed(plan, &self.rules, step));
        }
        let hutchinson = needed.iter().find(|kind| kind.starts_with("hutchinson")).cloned();
        let (function, key, probes) = match (&hutchinson, &self.hessian_vector) {
            (Some(kind), Some(hessian_vector)) => {
                let gaussian = kind.contains("gaussian");
                let probes: Vec<Tensor<T>> = inputs
                    .params
                    .iter()
                    .enumerate()
                    .map(|(index, param)| {
                        let mut random = Random::new(self.seed, Stream::Probe, step * 65_536 + index as u64);
                        let data = (0..param.len())
                            .map(|_| T::from_f64(if gaussian { random.normal() } else { random.rademacher() }))
                            .collect();
                        Tensor::new(param.shape.clone(), data)
                    })
                    .collect();
                inputs.inputs = probes.iter().cloned().map(Value::Real).collect();
                (hessian_vector, keys::HESSIAN_VECTOR, probes)
            }
            _ if needed.contains("kfac(empirical)") && self.captures.is_some() => {
                (&self.captures.as_ref().expect("checked").function, keys::GRADIENTS_AND_CAPTURES, Vec::new())
            }
            _ => (&self.gradients, keys::GRADIENTS, Vec::new()),
        };
        let main_pass_captures = key == keys::GRADIENTS_AND_CAPTURES;
        let mut values = self
            .backend
            .outputs(key, function, inputs)
            .map_err(|error| TrainError::backend(error.to_string()).at_step(step))?;
        // The gradients are taken out of the outputs, not copied.
        // Found through a map: a search per parameter was quadratic in their number.
        let positions: Vec<Option<usize>> = {
            let by_name: std::collections::HashMap<&str, usize> =
                values.iter().enumerate().map(|(position, (key, _))| (key.as_str(), position)).collect();
            (0..self.program.params.len())
                .map(|index| by_name.get(format!("grad.{}", self.param_name(index)).as_str()).copied())
                .collect()
        };
        let mut taken_gradients: Vec<Option<Tensor<T>>> = positions
            .into_iter()
            .map(|position| {
                position.and_then(|position| match &mut values[position].1 {
                    Value::Real(tensor) => Some(std::mem::replace(tensor, Tensor::new(vec![0], Vec::new()))),
                    _ => None,
                })
            })
            .collect();
        let output = |name: &str| find_output(&values, name);
        let (loss, metrics) = self.loss_and_metrics(&values);
        let mut problem: Option<String> = (!loss.is_finite()).then(|| format!("the loss is {loss}"));
        // Every problem reads "X is not finite" once completed below.
        let mut gradients = Vec::with_capacity(self.program.params.len());
        for (index, taken) in taken_gradients.iter_mut().enumerate() {
            let gradient = taken
                .take()
                .ok_or_else(|| TrainError::statistics(format!("no gradient for `{}`", self.param_name(index))))?;
            if problem.is_none() {
                if let Some(position) = first_non_finite(&gradient.data) {
                    problem = Some(format!(
                        "the gradient of `{}` is not finite at flat index {position}",
                        self.param_name(index)
                    ));
                }
            }
            gradients.push(gradient);
        }
        if let (None, Some(limit)) = (&problem, curv_ir::option_number(&self.program.optimizer.settings, "grad_clip")) {
            // `grad_clip`: scale every gradient so their global Euclidean norm is at most the limit.
            let norm = gradients
                .iter()
                .flat_map(|gradient| gradient.data.iter())
                .map(|value| value.to_f64().powi(2))
                .sum::<f64>()
                .sqrt();
            if norm > limit {
                let factor = T::from_f64(limit / norm);
                for gradient in &mut gradients {
                    gradient.data.iter_mut().for_each(|value| *value = value.mul(factor));
                }
            }
        }
        let mut statistics: Vec<HashMap<String, Tensor<T>>> = vec![HashMap::new(); self.program.params.len()];
        if let Some(kind) = &hutchinson {
            for (index, probe) in probes.iter().enumerate() {
                let Some(product) = output(&format!("hvp.{}", self.param_name(index))).and_then(Value::as_real) else {
                    continue;
                };
                let data = probe.data.iter().zip(&product.data).map(|(v, hv)| v.mul(*hv)).collect();
                statistics[index].insert(kind.clone(), Tensor::new(probe.shape.clone(), data));
            }
        }
        if needed.contains("sampled_grad") {
            let sampled = self.sampled_outputs(step, inputs, &values, &self.gradients, keys::GRADIENTS)?;
            for (index, statistic) in statistics.iter_mut().enumerate() {
                let gradient = find_output(&sampled, &format!("grad.{}", self.param_name(index)))
                    .and_then(Value::as_real)
                    .cloned()
                    .ok_or_else(|| TrainError::statistics("missing sampled gradient".to_string()))?;
                statistic.insert("sampled_grad".to_string(), gradient);
            }
        }
        let mut kfac: Vec<Option<Captures>> = vec![None; self.program.params.len()];
        for fisher in ["empirical", "sampled", "exact"] {
            if !needed.contains(&format!("kfac({fisher})")) {
                continue;
            }
            let captures = match &self.captures {
                Some(captures) => captures,
                None => {
                    let error = capture_program(&self.program).err();
                    return Err(
                        error.map_or_else(|| TrainError::statistics("K-FAC captures are missing"), TrainError::Runtime)
                    );
                }
            };
            // Each pass: its outputs, and a weight per row for its cotangents (`None`: 1).
            let passes: Vec<FisherPass<T>> = match fisher {
                "empirical" if main_pass_captures => Vec::new(),
                "empirical" => vec![(
                    self.backend
                        .outputs(keys::GRADIENTS_AND_CAPTURES, &captures.function, inputs)
                        .map_err(|error| TrainError::backend(error.to_string()).at_step(step))?,
                    None,
                )],
                "sampled" => vec![(
                    self.sampled_outputs(step, inputs, &values, &captures.function, keys::GRADIENTS_AND_CAPTURES)?,
                    None,
                )],
                _ => self.exact_fisher_outputs(step, inputs, &values, &captures.function)?,
            };
            let main_pass = [(Vec::new(), None)];
            let passes: &[FisherPass<T>] = if passes.is_empty() { &main_pass } else { &passes };
            for CapturedLayer { param, input: input_name, cotangent: cotangent_name, convolution } in &captures.layers {
                let plan_fisher = self
                    .program
                    .optimizer
                    .plans
                    .iter()
                    .find(|plan| plan.param == *param)
                    .and_then(crate::optimizer::kfac_statistic);
                if plan_fisher.as_deref() != Some(&format!("kfac({fisher})")) {
                    continue;
                }
                let folded = captures.folded_biases.iter().any(|(_, weight)| weight == param);
                let mut fresh: Option<Captures> = None;
                for (pass_outputs, weights) in passes {
                    let outputs = if pass_outputs.is_empty() { &values[..] } else { &pass_outputs[..] };
                    let tensor = |name: &str| {
                        find_output(outputs, name)
                            .and_then(Value::as_real)
                            .ok_or_else(|| TrainError::statistics(format!("the K-FAC capture `{name}` is missing")))
                    };
                    // The loss is a mean over the rows, so each row's cotangent carries a factor
                    // 1/N; multiplying it back by N gives the per-example cotangents.
                    let cotangent = tensor(cotangent_name)?;
                    let mut cotangents = match convolution {
                        Some(_) => convolution_cotangents(cotangent),
                        None => {
                            let rows = (cotangent.len() / cotangent.shape.last().copied().unwrap_or(1).max(1)) as f64;
                            rows_matrix(cotangent, rows, false)
                        }
                    };
                    if let Some(weights) = weights {
                        // The exact Fisher's passes weigh each row by the probability of its label.
                        let width = cotangents.columns;
                        for (row, weight) in cotangents.data.chunks_mut(width.max(1)).zip(weights) {
                            row.iter_mut().for_each(|value| *value *= weight.sqrt());
                        }
                    }
                    match &mut fresh {
                        // The layer input does not depend on the labels: it is taken once, and the
                        // passes' cotangents are stacked (G divides by the number of inputs).
                        None => {
                            let input = tensor(input_name)?;
                            let inputs = match convolution {
                                Some((stride, padding)) => {
                                    let kernel = &self.program.params[*param].ty.known_shape().unwrap_or_default();
                                    convolution_patches(input, kernel, *stride, *padding)
                                        .map_err(|message| TrainError::statistics(message).at_step(step))?
                                }
                                None => rows_matrix(input, 1.0, folded),
                            };
                            fresh = Some(Captures { inputs, cotangents, inputs_are_columns: convolution.is_some() })
                        }
                        Some(fresh) => {
                            fresh.cotangents.data.extend(cotangents.data);
                            fresh.cotangents.rows += cotangents.rows;
                        }
                    }
                }
                let Some(fresh) = fresh else { continue };
                kfac[*param] = Some(match kfac[*param].take() {
                    None => fresh,
                    Some(mut stacked) => {
                        // Several products of one parameter: their rows are stacked.
                        stacked.inputs.data.extend(fresh.inputs.data);
                        stacked.inputs.rows += fresh.inputs.rows;
                        stacked.cotangents.data.extend(fresh.cotangents.data);
                        stacked.cotangents.rows += fresh.cotangents.rows;
                        stacked
                    }
                });
            }
        }
        if problem.is_none() {
            let egn: Vec<&curv_ir::ParamPlan> =
                self.program.optimizer.plans.iter().filter(|plan| crate::optimizer::is_egn(plan)).collect();
            if !egn.is_empty() {
                let directions = self.egn_directions(step, inputs, &values, &egn)?;
                let line_search = egn.iter().any(|plan| {
                    plan.options
                        .iter()
                        .any(|(key, value)| key == "line_search" && *value == curv_ir::OptionValue::Bool(true))
                });
                let rate = learning_rate(
                    self.program.optimizer.lr,
                    self.program.optimizer.schedule.as_ref(),
                    step,
                    self.total_steps,
                );
                let moved = self.egn_moved_directions(step, &egn, &directions);
                let chosen = if line_search {
                    Some(self.egn_line_search(step, inputs, loss, &gradients, &egn, &moved, rate)?)
                } else {
                    None
                };
                let adaptive = egn.iter().any(|plan| {
                    plan.options
                        .iter()
                        .any(|(key, value)| key == "adaptive_damping" && *value == curv_ir::OptionValue::Bool(true))
                });
                let next_damping = if adaptive {
                    let stepsize = chosen.unwrap_or(rate);
                    Some(self.egn_next_damping(step, inputs, &values, loss, &gradients, &egn, &moved, stepsize)?)
                } else {
                    None
                };
                for (plan, direction) in egn.iter().zip(directions) {
                    statistics[plan.param].insert("egn".to_string(), direction);
                    if let Some(stepsize) = chosen {
                        statistics[plan.param]
                            .insert("egn_step".to_string(), Tensor::new(vec![1], vec![T::from_f64(stepsize)]));
                    }
                    if let Some(damping) = next_damping {
                        statistics[plan.param]
                            .insert("egn_damping".to_string(), Tensor::new(vec![1], vec![T::from_f64(damping)]));
                    }
                }
            }
            for plan in &self.program.optimizer.plans {
                if let Some(kind) = crate::optimizer::block_hessian_statistic(plan, step) {
                    let tensor = self.block_hessian(step, inputs, plan, kind)?;
                    statistics[plan.param].insert(kind.to_string(), tensor);
                }
            }
        }
        for (index, factors) in kfac.iter().enumerate() {
            if let (None, Some(captured)) = (&problem, factors) {
                if captured.inputs.data.iter().chain(&captured.cotangents.data).any(|value| !value.is_finite()) {
                    problem = Some(format!("the K-FAC statistics of `{}` are not finite", self.param_name(index)));
                }
            }
        }
        for (index, stats) in statistics.iter().enumerate() {
            for (kind, tensor) in stats {
                if problem.is_none() && first_non_finite(&tensor.data).is_some() {
                    problem = Some(format!("the `{kind}` statistic of `{}` is not finite", self.param_name(index)));
                }
            }
        }
        let rate =
            learning_rate(self.program.optimizer.lr, self.program.optimizer.schedule.as_ref(), step, self.total_steps);
        // The step updates the parameters and states where they are; `undo` keeps what is needed
        // to put them back when a non-finite value turns up (copies for in-place structures, the
        // replaced tensors of out-of-place rules), so nothing is copied for a rule-only optimizer.
        let mut new_params = std::mem::take(&mut inputs.params);
        let mut new_states = std::mem::take(&mut self.states);
        let mut undo: Vec<(usize, Undo<T>)> = Vec::new();
        let folded_biases = self.captures.as_ref().map_or(&[][..], |captures| &captures.folded_biases[..]);
        let bias_of = |index: usize| folded_biases.iter().find(|(_, weight)| *weight == index).map(|(bias, _)| *bias);
        let program_params = &self.program.params;
        // The updates' errors carry their code and structure; the parameter and step are added here.
        let error = |index: usize| {
            let name = program_params[index].name.clone();
            move |error: Error| TrainError::Runtime(error.parameter(name.clone()).step(step))
        };
        macro_rules! update_inputs {
            ($index:expr, $gradient:expr) => {
                UpdateInputs {
                    backend: self.backend.as_ref(),
                    step,
                    learning_rate: rate,
                    batch: self.program.batch as usize,
                    gradient: TensorRef::from($gradient),
                    param_lent: None,
                    statistics: &statistics[$index],
                    captures: kfac[$index].as_ref(),
                    seed: self.seed,
                    param: $index,
                }
            };
        }
        // K-FAC's KL clipping (kfac-pytorch): the directions of every clipped parameter come first,
        // then all of them are scaled by nu = min(1, sqrt(kappa / |sum lr^2 <direction, gradient>|)).
        let mut clipped: HashMap<usize, Option<Vec<f64>>> = HashMap::new();
        let kl_plans: Vec<&curv_ir::ParamPlan> = self
            .program
            .optimizer
            .plans
            .iter()
            .filter(|plan| plan.modifiers.iter().any(|modifier| modifier.name == "kl_clip"))
            .collect();
        if problem.is_none() && !kl_plans.is_empty() {
            let mut kappa = f64::INFINITY;
            let mut inner_product = 0.0;
            for plan in &kl_plans {
                let index = plan.param;
                for modifier in plan.modifiers.iter().filter(|modifier| modifier.name == "kl_clip") {
                    kappa = kappa.min(curv_ir::option_number(&modifier.options, "kappa").unwrap_or(1e-3));
                }
                let gradient = match bias_of(index) {
                    Some(bias) => stack_bias(&gradients[index], &gradients[bias]),
                    None => gradients[index].clone(),
                };
                undo.push((index, Undo::Copy(new_params[index].clone(), new_states[index].clone())));
                if let Some(bias) = bias_of(index) {
                    undo.push((bias, Undo::Copy(new_params[bias].clone(), new_states[bias].clone())));
                }
                let direction = crate::optimizer::matrix_direction(
                    plan,
                    &gradient.shape,
                    &mut new_states[index],
                    &update_inputs!(index, &gradient),
                    &mut None,
                )
                .map_err(error(index))?;
                if let Some(direction) = &direction {
                    inner_product +=
                        direction.iter().zip(&gradient.data).map(|(d, g)| d * g.to_f64()).sum::<f64>() * rate * rate;
                }
                clipped.insert(index, direction);
            }
            let nu = if inner_product.abs() > 0.0 { (kappa / inner_product.abs()).sqrt().min(1.0) } else { 1.0 };
            for direction in clipped.values_mut().flatten() {
                direction.iter_mut().for_each(|value| *value *= nu);
            }
        }
        // Parameters sharing an elementwise rule: one multi-parameter kernel per block.
        let mut grouped = vec![false; self.program.params.len()];
        if problem.is_none() {
            for group in &self.groups {
                let members: Vec<usize> =
                    group.plans.iter().map(|&plan| self.program.optimizer.plans[plan].param).collect();
                let member_inputs: Vec<UpdateInputs<T>> =
                    members.iter().map(|&index| update_inputs!(index, &gradients[index])).collect();
                let updated = crate::optimizer::update_rule_group(
                    group,
                    &self.program.optimizer.plans,
                    &self.rules,
                    &mut new_params,
                    &mut new_states,
                    &member_inputs,
                );
                match updated {
                    Ok(displaced) => {
                        for (&index, displaced) in members.iter().zip(displaced) {
                            undo.push((index, Undo::Displaced(displaced)));
                            grouped[index] = true;
                        }
                    }
                    Err(message) => {
                        roll_back(&mut new_params, &mut new_states, undo);
                        self.params = new_params;
                        self.states = new_states;
                        return Err(error(members[0])(message));
                    }
                }
                for &index in &members {
                    if problem.is_none() {
                        if let Some(position) = first_non_finite(&new_params[index].data) {
                            problem = Some(format!(
                                "the updated `{}` is not finite at flat index {position}",
                                self.param_name(index)
                            ));
                        }
                    }
                }
                if problem.is_some() {
                    break;
                }
            }
        }
        if problem.is_none() {
            for plan in &self.program.optimizer.plans {
                let index = plan.param;
                if grouped[index] {
                    continue;
                }
                if folded_biases.iter().any(|(bias, _)| *bias == index) {
                    // Updated with its weight, below.
                    continue;
                }
                let bias = bias_of(index);
                let precomputed = clipped.remove(&index);
                // A failed update: the step's changes are put back and the error is returned.
                macro_rules! abandon {
                    ($message:expr) => {{
                        roll_back(&mut new_params, &mut new_states, undo);
                        self.params = new_params;
                        self.states = new_states;
                        return Err(error(index)($message));
                    }};
                }
                // Copies for the structures that update in place; rules and the matrix structures
                // (which replace their state and keep the previous one) report what they replaced.
                let reports_displaced = matches!(
                    plan.structure,
                    curv_ir::StructureKind::Rule
                        | curv_ir::StructureKind::Kronecker
                        | curv_ir::StructureKind::Orthogonalize
                );
                if precomputed.is_none() && !reports_displaced {
                    undo.push((index, Undo::Copy(new_params[index].clone(), new_states[index].clone())));
                }
                if let (true, Some(bias)) = (precomputed.is_none(), bias) {
                    // The weight and its bias are written back from the joint matrix, whose update
                    // reports the state it replaced (below); the parameters are copied.
                    undo.push((index, Undo::Param(new_params[index].clone())));
                    undo.push((bias, Undo::Copy(new_params[bias].clone(), new_states[bias].clone())));
                }
                match (bias, precomputed) {
                    (_, Some(None)) => {}
                    (None, Some(Some(direction))) => crate::optimizer::finish_matrix_update(
                        plan,
                        &mut new_params[index],
                        &mut new_states[index],
                        direction,
                        rate,
                    ),
                    (None, None) => {
                        let updated = update_param(
                            plan,
                            &self.rules,
                            &mut new_params[index],
                            &mut new_states[index],
                            &update_inputs!(index, &gradients[index]),
                        );
                        match updated {
                            Ok(Some(displaced)) => undo.push((index, Undo::Displaced(displaced))),
                            Ok(None) => {}
                            Err(message) => abandon!(message),
                        }
                    }
                    (Some(bias), precomputed) => {
                        // `[W; b]` as one matrix with one more row.
                        let mut joint = stack_bias(&new_params[index], &new_params[bias]);
                        match precomputed {
                            Some(Some(direction)) => crate::optimizer::finish_matrix_update(
                                plan,
                                &mut joint,
                                &mut new_states[index],
                                direction,
                                rate,
                            ),
                            _ => {
                                let joint_gradient = stack_bias(&gradients[index], &gradients[bias]);
                                let updated = update_param(
                                    plan,
                                    &self.rules,
                                    &mut joint,
                                    &mut new_states[index],
                                    &update_inputs!(index, &joint_gradient),
                                );
                                match updated {
                                    Ok(Some(mut displaced)) => {
                                        // The joint matrix is dropped: only the state is put back.
                                        displaced.param = None;
                                        undo.push((index, Undo::Displaced(displaced)));
                                    }
                                    Ok(None) => {}
                                    Err(message) => abandon!(message),
                                }
                            }
                        }
                        let weight_size = new_params[index].len();
                        new_params[index].data.copy_from_slice(&joint.data[..weight_size]);
                        new_params[bias].data.copy_from_slice(&joint.data[weight_size..]);
                    }
                }
                for updated in [Some(index), bias].into_iter().flatten() {
                    if problem.is_none() {
                        if let Some(position) = first_non_finite(&new_params[updated].data) {
                            problem = Some(format!(
                                "the updated `{}` is not finite at flat index {position}",
                                self.param_name(updated)
                            ));
                        }
                    }
                }
                if problem.is_some() {
                    break;
                }
            }
        }
        self.step = step;
        if problem.is_some() {
            roll_back(&mut new_params, &mut new_states, undo);
        }
        self.params = new_params;
        self.states = new_states;
        self.step_outcome(step, metrics, problem)
    }

    /// The report of step `step`, which has completed, or its error: a `problem` (a non-finite
    /// value, whose update was left out) skips the step or stops training, by the policy.
    fn step_outcome(&mut self, step: u64, metrics: Metrics, problem: Option<String>) -> Result<StepReport, TrainError> {
        match (problem, self.policy) {
            (None, _) => Ok(StepReport { step, metrics, skipped: None }),
            (Some(what), NonFinitePolicy::Skip) => Ok(StepReport { step, metrics, skipped: Some(what) }),
            (Some(what), NonFinitePolicy::Stop) => {
                self.step = step - 1;
                Err(TrainError::NonFinite { step, what })
            }
        }
    }

    /// The batch loss of a gradient program's outputs (NaN when missing) and the step's metrics.
    fn loss_and_metrics(&self, values: &[(String, Value<T>)]) -> (f64, Metrics) {
        let output = |name: &str| find_output(values, name).cloned();
        let loss = output("loss").and_then(|value| value.as_real().map(|tensor| tensor.data[0].to_f64()));
        let loss = loss.unwrap_or(f64::NAN);
        (loss, self.metrics_of(loss, &output("logits"), &output("labels"), &output("prediction"), &output("target")))
    }

    fn metrics_of(
        &self,
        loss: f64,
        logits: &Option<Value<T>>,
        labels: &Option<Value<T>>,
        prediction: &Option<Value<T>>,
        target: &Option<Value<T>>,
    ) -> Metrics {
        let mut metrics = Metrics { loss, ..Metrics::default() };
        if let (Some(Value::Real(logits)), Some(Value::Int(labels))) = (logits, labels) {
            let classes = *logits.shape.last().unwrap_or(&1);
            let predicted = curv_interp::argmax(logits, logits.rank() - 1);
            let _ = classes;
            let correct = predicted.data.iter().zip(&labels.data).filter(|(a, b)| a == b).count();
            metrics.accuracy = Some(correct as f64 / labels.len().max(1) as f64);
        }
        if let (Some(Value::Real(prediction)), Some(Value::Real(target))) = (prediction, target) {
            let mse =
                prediction.data.iter().zip(&target.data).map(|(a, b)| (a.to_f64() - b.to_f64()).powi(2)).sum::<f64>()
                    / prediction.len().max(1) as f64;
            // Values live in [-1, 1], so the peak-to-peak range is 2.
            metrics.psnr = Some(10.0 * (4.0 / mse.max(1e-20)).log10());
        }
        metrics
    }

    /// Inputs with the current parameters (read where they are when resident) and `data`.
    fn parameter_inputs(&self, data: HashMap<(String, String), Value<T>>) -> Inputs<'_, T> {
        match &self.resident {
            Some(resident) => {
                let mut inputs = Inputs { data, ..Inputs::default() };
                for (index, param) in resident.params().iter().enumerate() {
                    inputs.lend_resident(curv_interp::Slot::Param(index), param);
                }
                inputs
            }
            None => Inputs { params: self.params.clone(), data, ..Inputs::default() },
        }
    }

    /// Loss and metrics over the whole test split, or `None` without one.
    pub fn evaluate_test(&self) -> Result<Option<Metrics>, TrainError> {
        let Some(function) = &self.program.test_loss else { return Ok(None) };
        let inputs = self.parameter_inputs(self.dataset.gather(&self.dataset.test));
        let values = self
            .backend
            .outputs(keys::TEST_LOSS, function, &inputs)
            .map_err(|error| TrainError::backend(format!("evaluation: {error}")))?;
        let output = |name: &str| find_output(&values, name).cloned();
        let loss =
            output("loss").and_then(|value| value.as_real().map(|tensor| tensor.data[0].to_f64())).unwrap_or(f64::NAN);
        Ok(Some(self.metrics_of(loss, &output("logits"), &output("labels"), &output("prediction"), &output("target"))))
    }

    /// The model's prediction over the whole training split in example order (for image
    /// reconstructions), when the loss is `mse` and the split fits one batch.
    pub fn predict_all(&self) -> Result<Option<Tensor<T>>, TrainError> {
        if self.program.loss_kind != LossKind::MeanSquaredError
            || self.program.batch as usize != self.dataset.train.len()
        {
            return Ok(None);
        }
        let inputs = self.parameter_inputs(self.dataset.gather(&self.dataset.train));
        let values = self
            .backend
            .outputs(keys::LOSS, &self.program.loss, &inputs)
            .map_err(|error| TrainError::backend(format!("prediction: {error}")))?;
        Ok(find_output(&values, "prediction").and_then(Value::as_real).cloned())
    }
}

/// The softmax of each row of `logits` (`[rows, classes]`), in double precision, flattened.
fn softmax_rows<T: Real>(logits: &Tensor<T>, classes: usize) -> Vec<f64> {
    let mut probabilities = Vec::with_capacity(logits.len());
    for chunk in logits.data.chunks(classes.max(1)) {
        let largest = chunk.iter().map(|value| value.to_f64()).fold(f64::NEG_INFINITY, f64::max);
        let exps: Vec<f64> = chunk.iter().map(|value| (value.to_f64() - largest).exp()).collect();
        let total: f64 = exps.iter().sum();
        probabilities.extend(exps.into_iter().map(|value| value / total));
    }
    probabilities
}
