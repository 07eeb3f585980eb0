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

mod resident;
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

/// The gradient program with one `kfac.input.PARAM.K` and one `kfac.cotangent.PARAM.K` output
/// per product `x @ W` of a parameter whose plan uses K-FAC statistics.
#[derive(Debug, Clone)]
pub struct CaptureProgram {
    pub function: Function,
    /// One entry per captured product or convolution.
    pub layers: Vec<CapturedLayer>,
    /// `(bias, weight)`: a bias updated together with its weight's K-FAC factors.
    pub folded_biases: Vec<(usize, usize)>,
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

/// The bias `b` of a product `x @ W` when the product's only use is `x @ W + b` with a vector
/// parameter `b` broadcast along the last dimension, and `b` is used nowhere else: K-FAC then
/// treats `[W; b]` as one matrix whose input has a ones column (kfac-pytorch's bias handling).
fn layer_bias(function: &Function, layer: curv_ir::ValueId) -> Option<usize> {
    let uses = |value: curv_ir::ValueId| -> Vec<usize> {
        let mut users: Vec<usize> = function
            .insts
            .iter()
            .enumerate()
            .filter(|(_, inst)| inst.args.contains(&value))
            .map(|(index, _)| index)
            .collect();
        if function.outputs.iter().any(|(_, output)| *output == value) {
            users.push(usize::MAX);
        }
        users
    };
    let users = uses(layer);
    let [add] = users.as_slice() else { return None };
    let add_inst = function.insts.get(*add)?;
    if add_inst.op != Op::Binary(curv_ir::BinaryOp::Add) {
        return None;
    }
    let other = *add_inst.args.iter().find(|arg| **arg != layer)?;
    let broadcast = function.inst(other);
    let rank = function.inst(layer).ty.shape.len();
    let Op::Broadcast { dims } = &broadcast.op else { return None };
    if dims.as_slice() != [rank - 1] || uses(other).len() != 1 {
        return None;
    }
    let bias = broadcast.args[0];
    let Op::Param { index } = function.inst(bias).op else { return None };
    (uses(bias).len() == 1).then_some(index)
}

/// One captured layer of a K-FAC parameter: the names of the outputs that hold its input and its
/// output cotangent, and for a convolution its stride and padding.
#[derive(Debug, Clone)]
pub struct CapturedLayer {
    pub param: usize,
    pub input: String,
    pub cotangent: String,
    pub convolution: Option<(usize, usize)>,
}

/// The capture program of `program`, when any of its plans uses K-FAC statistics; an error names
/// a K-FAC parameter that is not used as `x @ W`.
///
/// The errors are E0500 with the parameter; `curv check` reports the same programs as E0313.
pub fn capture_program(program: &TrainProgram) -> Result<Option<CaptureProgram>, Error> {
    let kfac_params: Vec<usize> = program
        .optimizer
        .plans
        .iter()
        .filter(|plan| crate::optimizer::kfac_statistic(plan).is_some())
        .map(|plan| plan.param)
        .collect();
    if kfac_params.is_empty() {
        return Ok(None);
    }
    let gradients = gradient_program(&program.loss, &program.params);
    let mut function = gradients.function;
    function.name = keys::GRADIENTS_AND_CAPTURES.to_string();
    let mut layers = Vec::new();
    let mut folded_biases = Vec::new();
    for &param in &kfac_params {
        let name = &program.params[param].name;
        let captures: Vec<_> = gradients.layer_captures.iter().filter(|capture| capture.param == param).collect();
        let refused = |message: String| {
            Error::new(ErrorCode::PlanNotExecutable, message).parameter(name.as_str()).structure("kronecker")
        };
        if captures.is_empty() {
            return Err(refused(format!(
                "K-FAC statistics need `{name}` to be used as `x @ {name}` or `conv2d(x, {name})` in the loss (E0313)"
            )));
        }
        let convolutions = captures.iter().filter(|capture| capture.kind != curv_ad::LayerKind::Dense).count();
        if convolutions != 0 && convolutions != captures.len() {
            return Err(refused(format!(
                "K-FAC statistics need every use of `{name}` to be of one kind (products or convolutions) (E0313)"
            )));
        }
        let Some(plan) = program.optimizer.plans.iter().find(|plan| plan.param == param) else {
            return Err(refused(format!("`{name}` has no optimizer plan")));
        };
        let fold = plan.options.iter().all(|(key, value)| key != "bias" || *value == curv_ir::OptionValue::Bool(true));
        let biases: Vec<Option<usize>> =
            captures.iter().map(|capture| layer_bias(&program.loss, capture.layer)).collect();
        // Convolutions keep their bias on its own rule line (the bias would be a column there).
        if let (true, 2, [Some(bias)], 0) =
            (fold, program.params[param].ty.shape.len(), biases.as_slice(), convolutions)
        {
            folded_biases.push((*bias, param));
        }
        for (number, capture) in captures.into_iter().enumerate() {
            let (input, cotangent) = (format!("kfac.input.{name}.{number}"), format!("kfac.cotangent.{name}.{number}"));
            function.outputs.push((input.clone(), capture.input));
            function.outputs.push((cotangent.clone(), capture.output_cotangent));
            let convolution = match capture.kind {
                curv_ad::LayerKind::Conv2d { stride, padding } => {
                    Some((stride.max(1) as usize, padding.max(0) as usize))
                }
                curv_ad::LayerKind::Dense => None,
            };
            layers.push(CapturedLayer { param, input, cotangent, convolution });
        }
    }
    Ok(Some(CaptureProgram { function, layers, folded_biases }))
}

/// A tensor viewed as `[N, last dim]` in double precision, times `scale`, with a column of ones
/// appended when `ones` is set.
fn rows_matrix<T: Real>(tensor: &Tensor<T>, scale: f64, ones: bool) -> crate::linalg::Matrix {
    let width = (*tensor.shape.last().unwrap_or(&1)).max(1);
    let rows = tensor.len() / width;
    let data: Vec<f64> = tensor
        .data
        .chunks(width)
        .flat_map(|row| row.iter().map(move |value| value.to_f64() * scale).chain(ones.then_some(1.0)))
        .collect();
    crate::linalg::Matrix { rows, columns: width + usize::from(ones), data }
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

/// The patches of a convolution's input `x: [N, C, H, W]` for a kernel `[O, C, kH, kW]`, as
/// kfac-pytorch's `Conv2dModuleHelper` extracts them: one row per example and output position
/// `(n, h', w')`, one column per kernel entry `(c, i, j)` (the kernel's own order), zero where the
/// padding is, all divided by the number of output positions `S = H' W'`.
fn convolution_patches<T: Real>(
    input: &Tensor<T>,
    kernel: &[i64],
    stride: usize,
    padding: usize,
) -> Result<crate::linalg::Matrix, String> {
    let &[examples, channels, height, width] = &input.shape[..] else {
        return Err(format!("K-FAC expects a conv2d input of rank 4, got shape {:?}", input.shape));
    };
    let &[_, kernel_channels, kernel_height, kernel_width] = kernel else {
        return Err(format!("K-FAC expects a conv2d kernel of rank 4, got shape {kernel:?}"));
    };
    let (kernel_height, kernel_width) = (kernel_height.max(1) as usize, kernel_width.max(1) as usize);
    if kernel_channels as usize != channels
        || height + 2 * padding < kernel_height
        || width + 2 * padding < kernel_width
    {
        return Err(format!("a conv2d input of shape {:?} does not fit the kernel {kernel:?}", input.shape));
    }
    let output_height = (height + 2 * padding - kernel_height) / stride + 1;
    let output_width = (width + 2 * padding - kernel_width) / stride + 1;
    let positions = output_height * output_width;
    let columns = channels * kernel_height * kernel_width;
    let scale = 1.0 / positions as f64;
    let mut data = vec![0.0; examples * positions * columns];
    for example in 0..examples {
        for row in 0..output_height {
            for column in 0..output_width {
                let target = ((example * output_height + row) * output_width + column) * columns;
                for channel in 0..channels {
                    for i in 0..kernel_height {
                        let y = (row * stride + i) as isize - padding as isize;
                        if y < 0 || y as usize >= height {
                            continue;
                        }
                        for j in 0..kernel_width {
                            let x = (column * stride + j) as isize - padding as isize;
                            if x < 0 || x as usize >= width {
                                continue;
                            }
                            let source = ((example * channels + channel) * height + y as usize) * width + x as usize;
                            data[target + (channel * kernel_height + i) * kernel_width + j] =
                                input.data[source].to_f64() * scale;
                        }
                    }
                }
            }
        }
    }
    Ok(crate::linalg::Matrix { rows: examples * positions, columns, data })
}

/// A convolution's output cotangent `[N, O, H', W']` as rows `(n, h', w')` of `O` values, times
/// `N / S`: the per-example cotangents (the loss is a mean over the `N` examples) divided by the
/// number of output positions `S = H' W'`, as kfac-pytorch's `Conv2dModuleHelper` divides them.
fn convolution_cotangents<T: Real>(cotangent: &Tensor<T>) -> crate::linalg::Matrix {
    let &[examples, channels, height, width] = &cotangent.shape[..] else {
        return rows_matrix(cotangent, 1.0, false);
    };
    let positions = height * width;
    let scale = examples as f64 / positions.max(1) as f64;
    let mut data = vec![0.0; examples * positions * channels];
    for example in 0..examples {
        for channel in 0..channels {
            for position in 0..positions {
                data[(example * positions + position) * channels + channel] =
                    cotangent.data[(example * channels + channel) * positions + position].to_f64() * scale;
            }
        }
    }
    crate::linalg::Matrix { rows: examples * positions, columns: channels, data }
}

/// `[W; b]`: a matrix with its bias vector appended as one more row.
fn stack_bias<T: Real>(weight: &Tensor<T>, bias: &Tensor<T>) -> Tensor<T> {
    let mut shape = weight.shape.clone();
    shape[0] += 1;
    Tensor::new(shape, weight.data.iter().chain(&bias.data).copied().collect())
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

    /// EGN's Gauss-Newton directions (Korbit, Adeoye, Bemporad and Zanon, 2024, following
    /// cor3bit/somax `EGN.calculate_direction_ce`) for the parameters of `plans`, together: with
    /// the logits of the step's batch (`b x c`), `p = softmax`, the residuals `r = onehot - p`, the
    /// block-diagonal `Q = diag(p_i) - p_i p_i^T` and `J` the Jacobian of the logits with respect
    /// to those parameters, the direction is `J^T (b damping I + Q J J^T)^-1 r` (the
    /// Duncan-Guttman form of `(J^T Q J + b damping I)^-1 J^T r`, a `bc x bc` system). `J J^T` is
    /// built column by column: row `l` of `J` is a vector-Jacobian product with the unit
    /// cotangent `e_l`, and `J` times it a Jacobian-vector product; `J^T t` is one more
    /// vector-Jacobian product. That is `2 b c + 1` model passes per step.
    fn egn_directions(
        &self,
        step: u64,
        inputs: &mut Inputs<T>,
        values: &[(String, Value<T>)],
        plans: &[&curv_ir::ParamPlan],
    ) -> Result<Vec<Tensor<T>>, TrainError> {
        let failure = |message: String| TrainError::statistics(format!("EGN: {message}")).at_step(step);
        if self.program.loss_kind != curv_ir::LossKind::CrossEntropy {
            return Err(failure("only a `cross_entropy(...)` loss is supported yet".to_string()));
        }
        let (backward, forward) = self.egn.as_ref().ok_or_else(|| {
            failure("the model's Jacobian programs could not be built (no logits output)".to_string())
        })?;
        let (Some(Value::Real(logits)), Some(Value::Int(labels))) =
            (find_output(values, "logits"), find_output(values, "labels"))
        else {
            return Err(failure("the step's logits and labels are missing".to_string()));
        };
        let classes = logits.shape.last().copied().unwrap_or(1);
        let batch = logits.len() / classes.max(1);
        let size = batch * classes;
        let probabilities = softmax_rows(logits, classes);
        let residuals: Vec<f64> = (0..size)
            .map(|index| {
                let (row, class) = (index / classes, index % classes);
                (if labels.data[row] as usize == class { 1.0 } else { 0.0 }) - probabilities[index]
            })
            .collect();
        let damping = self.egn_damping(plans);
        let members: Vec<usize> = plans.iter().map(|plan| plan.param).collect();
        let saved = std::mem::take(&mut inputs.inputs);
        let shape = logits.shape.clone();
        let zeros_like =
            |param: &Tensor<T>| Value::Real(Tensor::new(param.shape.clone(), vec![T::from_f64(0.0); param.len()]));
        let run_vjp = |inputs: &mut Inputs<T>, cotangent: Vec<f64>| -> Result<Vec<Value<T>>, String> {
            inputs.inputs =
                vec![Value::Real(Tensor::new(shape.clone(), cotangent.into_iter().map(T::from_f64).collect()))];
            let outputs = self.backend.outputs("egn_model_vjp", backward, inputs).map_err(|error| error.to_string())?;
            let mut tangents: Vec<Value<T>> = inputs.params.iter().map(zeros_like).collect();
            for &index in &members {
                let name = format!("grad.{}", self.param_name(index));
                let value = find_output(&outputs, &name).ok_or_else(|| format!("the output `{name}` is missing"))?;
                tangents[index] = value.clone();
            }
            Ok(tangents)
        };
        let mut gram = vec![0.0; size * size];
        let mut outcome: Result<(), String> = Ok(());
        for column in 0..size {
            let mut unit = vec![0.0; size];
            unit[column] = 1.0;
            let tangents = match run_vjp(inputs, unit) {
                Ok(tangents) => tangents,
                Err(error) => {
                    outcome = Err(error);
                    break;
                }
            };
            inputs.inputs = tangents;
            match self.backend.outputs("egn_model_jvp", forward, inputs) {
                Ok(outputs) => match find_output(&outputs, "tangent").and_then(Value::as_real) {
                    Some(tangent) => {
                        for (row, value) in tangent.data.iter().enumerate() {
                            gram[row * size + column] = value.to_f64();
                        }
                    }
                    None => {
                        outcome = Err("the output `tangent` is missing".to_string());
                        break;
                    }
                },
                Err(error) => {
                    outcome = Err(error.to_string());
                    break;
                }
            }
        }
        let result = outcome.and_then(|()| {
            // A = b damping I + Q (J J^T), Q block-diagonal with blocks diag(p) - p p^T.
            let mut system = vec![0.0; size * size];
            for row in 0..size {
                let (example, class) = (row / classes, row % classes);
                for column in 0..size {
                    let mut value = 0.0;
                    for other in 0..classes {
                        let q = if other == class { probabilities[row] } else { 0.0 }
                            - probabilities[row] * probabilities[example * classes + other];
                        value += q * gram[(example * classes + other) * size + column];
                    }
                    system[row * size + column] = value;
                }
                system[row * size + row] += batch as f64 * damping;
            }
            let matrix = crate::linalg::Matrix::new(size, size, system).map_err(|error| error.to_string())?;
            let coefficients = crate::linalg::solve(&matrix, &residuals)
                .map_err(|error| format!("the {size}x{size} system: {error}"))?;
            run_vjp(inputs, coefficients)
        });
        inputs.inputs = saved;
        let directions = result.map_err(failure)?;
        Ok(members
            .iter()
            .map(|&index| match &directions[index] {
                Value::Real(tensor) => tensor.clone(),
                Value::Int(_) => Tensor::new(vec![0], Vec::new()),
            })
            .collect())
    }

    /// EGN's current regularisation: the state `damping` of the first EGN parameter when the
    /// regularisation adapts (`adaptive_damping`), the option `damping` otherwise.
    fn egn_damping(&self, plans: &[&curv_ir::ParamPlan]) -> f64 {
        let option = curv_ir::option_number(&plans[0].options, "damping").unwrap_or(1.0);
        crate::optimizer::state_get(&self.states[plans[0].param], "damping")
            .map_or(option, |tensor| tensor.data[0].to_f64())
    }

    /// EGN's directions with its bias-corrected momentum, as each parameter's update computes them
    /// (`newton::egn_direction`).
    fn egn_moved_directions(
        &self,
        step: u64,
        plans: &[&curv_ir::ParamPlan],
        directions: &[Tensor<T>],
    ) -> Vec<Vec<f64>> {
        let mut moved: Vec<Vec<f64>> = Vec::with_capacity(plans.len());
        for (plan, direction) in plans.iter().zip(directions) {
            let momentum = curv_ir::option_number(&plan.options, "momentum").unwrap_or(0.0);
            let mut d: Vec<f64> = direction.data.iter().map(|value| value.to_f64()).collect();
            if momentum > 0.0 {
                let velocity = crate::optimizer::state_get(&self.states[plan.param], "velocity");
                let correction = 1.0 - momentum.powi(step as i32);
                for (index, x) in d.iter_mut().enumerate() {
                    let previous = velocity.map_or(0.0, |tensor| tensor.data[index].to_f64());
                    *x = (momentum * previous + (1.0 - momentum) * *x) / correction;
                }
            }
            moved.push(d);
        }
        moved
    }

    /// EGN's adaptive regularisation for the next step (the Levenberg-Marquardt rule of the EGN
    /// paper, as the disabled code of cor3bit/somax `EGN.update` writes it): with the step
    /// `dw = a d`, the ratio `rho = (f(theta + dw) - f(theta)) / (<grad, dw> + (J dw)^T Q (J dw) / (2 b))`
    /// of the actual to the predicted decrease; `lambda <- 1.01 lambda` when `rho < 0.25`,
    /// `0.99 lambda` when `rho > 0.75`. `J dw` is one Jacobian-vector product of the model.
    #[allow(clippy::too_many_arguments)]
    fn egn_next_damping(
        &self,
        step: u64,
        inputs: &mut Inputs<T>,
        values: &[(String, Value<T>)],
        loss: f64,
        gradients: &[Tensor<T>],
        plans: &[&curv_ir::ParamPlan],
        moved: &[Vec<f64>],
        stepsize: f64,
    ) -> Result<f64, TrainError> {
        let failure = |message: String| TrainError::statistics(format!("EGN regularisation: {message}")).at_step(step);
        let damping = self.egn_damping(plans);
        let (_, forward) = self.egn.as_ref().ok_or_else(|| failure("the model programs are missing".to_string()))?;
        let Some(Value::Real(logits)) = find_output(values, "logits") else {
            return Err(failure("the step's logits are missing".to_string()));
        };
        let classes = logits.shape.last().copied().unwrap_or(1).max(1);
        let batch = logits.len() / classes;
        let saved = std::mem::take(&mut inputs.inputs);
        let mut tangents: Vec<Value<T>> = inputs
            .params
            .iter()
            .map(|param| Value::Real(Tensor::new(param.shape.clone(), vec![T::from_f64(0.0); param.len()])))
            .collect();
        for (plan, d) in plans.iter().zip(moved) {
            let shape = inputs.params[plan.param].shape.clone();
            tangents[plan.param] =
                Value::Real(Tensor::new(shape, d.iter().map(|x| T::from_f64(stepsize * x)).collect()));
        }
        inputs.inputs = tangents;
        let product = self.backend.outputs("egn_model_jvp", forward, inputs).map_err(|error| error.to_string());
        inputs.inputs = saved;
        let product = product.map_err(failure)?;
        let mvp: Vec<f64> = find_output(&product, "tangent")
            .and_then(Value::as_real)
            .ok_or_else(|| failure("the output `tangent` is missing".to_string()))?
            .data
            .iter()
            .map(|value| value.to_f64())
            .collect();
        let probabilities = softmax_rows(logits, classes);
        let mut curvature = 0.0;
        for (row, p) in probabilities.chunks(classes).enumerate() {
            let m = &mvp[row * classes..(row + 1) * classes];
            let mean: f64 = p.iter().zip(m).map(|(p, m)| p * m).sum();
            curvature += p.iter().zip(m).map(|(p, m)| p * m * m).sum::<f64>() - mean * mean;
        }
        let slope: f64 = plans
            .iter()
            .zip(moved)
            .map(|(plan, d)| {
                gradients[plan.param].data.iter().zip(d).map(|(g, x)| g.to_f64() * stepsize * x).sum::<f64>()
            })
            .sum();
        let predicted = slope + 0.5 * curvature / batch as f64;
        let originals: Vec<Tensor<T>> = plans.iter().map(|plan| inputs.params[plan.param].clone()).collect();
        for (plan, d) in plans.iter().zip(moved) {
            let param = &mut inputs.params[plan.param];
            for (value, x) in param.data.iter_mut().zip(d) {
                *value = T::from_f64(value.to_f64() + stepsize * x);
            }
        }
        let next = self.backend.outputs("egn_loss", &self.program.loss, inputs).map_err(|error| error.to_string());
        for (plan, original) in plans.iter().zip(originals) {
            inputs.params[plan.param] = original;
        }
        let next = find_output(&next.map_err(failure)?, "loss")
            .and_then(Value::as_real)
            .map(|tensor| tensor.data[0].to_f64())
            .ok_or_else(|| failure("the loss is missing".to_string()))?;
        let rho = (next - loss) / predicted;
        Ok(if rho < 0.25 {
            1.01 * damping
        } else if rho > 0.75 {
            0.99 * damping
        } else {
            damping
        })
    }

    /// EGN's step size by Armijo's backtracking line search, as cor3bit/somax `armijo_line_search`
    /// with `reset_option = "increase"` and its defaults (aggressiveness 0.9, decrease 0.8,
    /// increase 1.5, at most 15 trials): the previous step times 1.5, at most the learning rate;
    /// while `f(theta + a d) > f(theta) + 0.1 a <grad, d> + eps` (the Armijo condition; `d` is the
    /// direction with momentum, `eps` the machine epsilon), `a <- 0.8 a`. The previous step is
    /// the state `stepsize` of the first EGN parameter; the losses are evaluated on the step's
    /// batch.
    #[allow(clippy::too_many_arguments)]
    fn egn_line_search(
        &self,
        step: u64,
        inputs: &mut Inputs<T>,
        loss: f64,
        gradients: &[Tensor<T>],
        plans: &[&curv_ir::ParamPlan],
        moved: &[Vec<f64>],
        rate: f64,
    ) -> Result<f64, TrainError> {
        let failure = |message: String| TrainError::statistics(format!("EGN line search: {message}")).at_step(step);
        let slope: f64 = plans
            .iter()
            .zip(moved)
            .map(|(plan, d)| gradients[plan.param].data.iter().zip(d).map(|(g, x)| g.to_f64() * x).sum::<f64>())
            .sum();
        let previous = crate::optimizer::state_get(&self.states[plans[0].param], "stepsize")
            .map_or(rate, |tensor| tensor.data[0].to_f64());
        let mut stepsize = (previous * 1.5).min(rate);
        let epsilon = if std::mem::size_of::<T>() == 4 { f32::EPSILON as f64 } else { f64::EPSILON };
        let originals: Vec<Tensor<T>> = plans.iter().map(|plan| inputs.params[plan.param].clone()).collect();
        let loss_at = |inputs: &mut Inputs<T>, stepsize: f64| -> Result<f64, String> {
            for ((plan, original), d) in plans.iter().zip(&originals).zip(moved) {
                let param = &mut inputs.params[plan.param];
                for ((value, start), x) in param.data.iter_mut().zip(&original.data).zip(d) {
                    *value = T::from_f64(start.to_f64() + stepsize * x);
                }
            }
            let outputs =
                self.backend.outputs("egn_loss", &self.program.loss, inputs).map_err(|error| error.to_string())?;
            find_output(&outputs, "loss")
                .and_then(Value::as_real)
                .map(|tensor| tensor.data[0].to_f64())
                .ok_or_else(|| "the loss is missing".to_string())
        };
        let mut result = loss_at(inputs, stepsize);
        let mut trials = 0;
        let mut violated = true;
        while violated && trials < 15 {
            let next = match &result {
                Ok(value) => *value,
                Err(_) => break,
            };
            violated = !(next.is_finite() && -stepsize * 0.1 * slope <= loss - next + epsilon);
            if violated {
                stepsize = (stepsize * 0.8).min(rate);
                result = loss_at(inputs, stepsize);
            }
            trials += 1;
        }
        for (plan, original) in plans.iter().zip(originals) {
            inputs.params[plan.param] = original;
        }
        result.map_err(failure)?;
        Ok(stepsize)
    }

    /// Curvature of one parameter's Hessian block from Hessian-vector products at the step's
    /// parameters and batch (the probe is zero on every other parameter, and only the parameter's
    /// own part of each product is kept): `lanczos`, FOSI's top eigenpairs (Lanczos of order
    /// `4 rank` from a normal start vector drawn from the `Preconditioner` stream with the key
    /// `step * 65536 + param`), or `hessian`, the whole `n x n` block from the `n` unit vectors.
    fn block_hessian(
        &self,
        step: u64,
        inputs: &mut Inputs<T>,
        plan: &curv_ir::ParamPlan,
        kind: &str,
    ) -> Result<Tensor<T>, TrainError> {
        let function = self
            .hessian_vector
            .as_ref()
            .ok_or_else(|| TrainError::statistics("the Hessian-vector program is missing".to_string()))?;
        let index = plan.param;
        let name = format!("hvp.{}", self.param_name(index));
        let saved = std::mem::take(&mut inputs.inputs);
        let zeros: Vec<Value<T>> = inputs
            .params
            .iter()
            .map(|param| Value::Real(Tensor::new(param.shape.clone(), vec![T::from_f64(0.0); param.len()])))
            .collect();
        let shape = inputs.params[index].shape.clone();
        let n = inputs.params[index].len();
        let backend = &self.backend;
        let mut hvp = |vector: &[f64]| -> Result<Vec<f64>, String> {
            let mut probes = zeros.clone();
            probes[index] =
                Value::Real(Tensor::new(shape.clone(), vector.iter().map(|value| T::from_f64(*value)).collect()));
            inputs.inputs = probes;
            let values = backend.outputs(keys::HESSIAN_VECTOR, function, inputs).map_err(|error| error.to_string())?;
            let product = find_output(&values, &name)
                .and_then(Value::as_real)
                .ok_or_else(|| format!("the Hessian-vector product `{name}` is missing"))?;
            Ok(product.data.iter().map(|value| value.to_f64()).collect())
        };
        let result = match kind {
            "lanczos" => {
                let k = curv_ir::option_number(&plan.options, "rank").unwrap_or(1.0) as usize;
                let mut random = Random::new(self.seed, Stream::Preconditioner, step * 65_536 + index as u64);
                let start: Vec<f64> = (0..n).map(|_| random.normal()).collect();
                crate::lowrank::lanczos(n, 4 * k, k, &start, &mut hvp)
            }
            _ => {
                let mut hessian = vec![0.0; n * n];
                let mut unit = vec![0.0; n];
                let mut outcome = Ok(());
                for column in 0..n {
                    unit[column] = 1.0;
                    match hvp(&unit) {
                        Ok(product) => {
                            for (row, value) in product.into_iter().enumerate() {
                                hessian[row * n + column] = value;
                            }
                        }
                        Err(error) => {
                            outcome = Err(error);
                            break;
                        }
                    }
                    unit[column] = 0.0;
                }
                outcome.map(|()| hessian)
            }
        };
        inputs.inputs = saved;
        let values = result.map_err(|message| {
            TrainError::Runtime(
                Error::new(ErrorCode::StatisticsFailed, message).parameter(self.param_name(index)).step(step),
            )
        })?;
        let length = values.len();
        Ok(Tensor::new(vec![length], values.into_iter().map(T::from_f64).collect()))
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
        let mut taken_gradients: Vec<Option<Tensor<T>>> = (0..self.program.params.len())
            .map(|index| {
                let name = format!("grad.{}", self.param_name(index));
                values.iter_mut().find(|(key, _)| *key == name).and_then(|(_, value)| match value {
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

    /// The outputs of `function` (a gradient program) with labels drawn from the model's
    /// predictive distribution (categorical over the softmax of the logits for cross-entropy;
    /// Gaussian around the prediction for `mse`). The draw depends only on the seed and the step.
    /// The data field the loss compares the model's output with, and the names of the loss
    /// function's outputs for the prediction and the target.
    fn target_field(&self) -> Result<((String, String), &'static str), TrainError> {
        let loss_function = &self.program.loss;
        let (model_output, target) = match self.program.loss_kind {
            LossKind::CrossEntropy => ("logits", "labels"),
            LossKind::MeanSquaredError => ("prediction", "target"),
            LossKind::Custom => {
                return Err(TrainError::statistics(
                    "sampled-label and exact Fisher statistics need a `cross_entropy` or `mse` loss".to_string(),
                ))
            }
        };
        let target_id = loss_function
            .output(target)
            .ok_or_else(|| TrainError::statistics(format!("the loss has no `{target}`")))?;
        let Op::Data { source, field } = &loss_function.inst(target_id).op else {
            return Err(TrainError::statistics("sampled labels need the target to be a data field".to_string()));
        };
        Ok(((source.clone(), field.clone()), model_output))
    }

    /// The outputs of `function` with the target data field replaced by `target`.
    fn outputs_with_target(
        &self,
        step: u64,
        inputs: &Inputs<T>,
        function: &Function,
        key: &str,
        field: &(String, String),
        target: Value<T>,
    ) -> Result<Vec<(String, Value<T>)>, TrainError> {
        let mut replaced = inputs.clone();
        replaced.inputs.clear();
        replaced.data.insert(field.clone(), target);
        self.backend
            .outputs(key, function, &replaced)
            .map_err(|error| TrainError::backend(error.to_string()).at_step(step))
    }

    /// The outputs of `function` (a gradient program) with labels drawn from the model's
    /// predictive distribution (categorical over the softmax of the logits for cross-entropy;
    /// Gaussian around the prediction for `mse`). The draw depends only on the seed and the step.
    fn sampled_outputs(
        &self,
        step: u64,
        inputs: &Inputs<T>,
        values: &[(String, Value<T>)],
        function: &Function,
        key: &str,
    ) -> Result<Vec<(String, Value<T>)>, TrainError> {
        let (field, model_output) = self.target_field()?;
        let prediction = find_output(values, model_output)
            .and_then(Value::as_real)
            .ok_or_else(|| TrainError::statistics(format!("the loss has no float output `{model_output}`")))?;
        let mut random = Random::new(self.seed, Stream::SampledLabels, step);
        let sampled = match self.program.loss_kind {
            LossKind::CrossEntropy => {
                let classes = *prediction.shape.last().unwrap_or(&1);
                let labels: Vec<i32> = prediction
                    .data
                    .chunks(classes)
                    .map(|row| {
                        let maximum = row.iter().map(|value| value.to_f64()).fold(f64::NEG_INFINITY, f64::max);
                        let weights: Vec<f64> = row.iter().map(|value| (value.to_f64() - maximum).exp()).collect();
                        random.categorical(&weights) as i32
                    })
                    .collect();
                Value::Int(Tensor::new(prediction.shape[..prediction.shape.len() - 1].to_vec(), labels))
            }
            _ => Value::Real(Tensor::new(
                prediction.shape.clone(),
                prediction.data.iter().map(|value| value.add(T::from_f64(random.normal()))).collect(),
            )),
        };
        self.outputs_with_target(step, inputs, function, key, &field, sampled)
    }

    /// The passes whose weighted cotangent outer products sum to the exact Fisher, the
    /// expectation of the sampled-label statistic over the model's predictive distribution: for
    /// cross-entropy one pass per class `c` with every label `c`, its rows weighted by the
    /// softmax probability of `c`; for `mse` (unit-variance Gaussian) one pass per output unit
    /// `o` with the target `prediction + e_o`, weight 1 (the Gaussian noise's covariance is the
    /// identity, the sum of `e_o e_o^T`).
    fn exact_fisher_outputs(
        &self,
        step: u64,
        inputs: &Inputs<T>,
        values: &[(String, Value<T>)],
        function: &Function,
    ) -> Result<Vec<FisherPass<T>>, TrainError> {
        let (field, model_output) = self.target_field()?;
        let prediction = find_output(values, model_output)
            .and_then(Value::as_real)
            .ok_or_else(|| TrainError::statistics(format!("the loss has no float output `{model_output}`")))?;
        let width = (*prediction.shape.last().unwrap_or(&1)).max(1);
        let key = keys::GRADIENTS_AND_CAPTURES;
        let mut passes = Vec::with_capacity(width);
        for unit in 0..width {
            let (target, weights) = match self.program.loss_kind {
                LossKind::CrossEntropy => {
                    let rows = prediction.len() / width;
                    let labels =
                        Tensor::new(prediction.shape[..prediction.shape.len() - 1].to_vec(), vec![unit as i32; rows]);
                    let probabilities: Vec<f64> = prediction
                        .data
                        .chunks(width)
                        .map(|row| {
                            let maximum = row.iter().map(|value| value.to_f64()).fold(f64::NEG_INFINITY, f64::max);
                            let total: f64 = row.iter().map(|value| (value.to_f64() - maximum).exp()).sum();
                            (row[unit].to_f64() - maximum).exp() / total
                        })
                        .collect();
                    (Value::Int(labels), Some(probabilities))
                }
                _ => {
                    let shifted = prediction
                        .data
                        .iter()
                        .enumerate()
                        .map(|(index, value)| if index % width == unit { value.add(T::one()) } else { *value })
                        .collect();
                    (Value::Real(Tensor::new(prediction.shape.clone(), shifted)), None)
                }
            };
            passes.push((self.outputs_with_target(step, inputs, function, key, &field, target)?, weights));
        }
        Ok(passes)
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
