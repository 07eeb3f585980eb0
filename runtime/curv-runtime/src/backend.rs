//! Where IR functions are evaluated: the reference interpreter, or code compiled by a backend
//! (the MLIR CPU backend lives in `curv-mlir`, which implements [`Backend`] for `f32`).

use curv_interp::{evaluate_outputs, Inputs, Real, Resident, Tensor, Value};
use curv_ir::Function;

/// Evaluates IR functions for the training loop.
pub trait Backend<T: Real> {
    /// A short name for messages (`interp`, `mlir`).
    fn name(&self) -> &'static str;

    /// The named outputs of `function` on `inputs`. `key` identifies the function (and, for
    /// rules, the parameter size) so compiled code can be cached between calls.
    fn outputs(&self, key: &str, function: &Function, inputs: &Inputs<T>) -> Result<Vec<(String, Value<T>)>, String>;

    /// Seconds spent compiling so far (zero for the interpreter).
    fn compile_seconds(&self) -> f64 {
        0.0
    }

    /// Gives the backend the source location of a function's code (for a function's key and a
    /// byte offset of one of its spans: `"file.curv":12:5`), for errors that name where a
    /// failing kernel comes from. A backend without such errors ignores it.
    fn locate_sources(&mut self, _locate: SourceLocator) {}

    /// Whether a trainer gains by keeping its parameters, states and gradients resident: the
    /// backend computes away from the host (a GPU) and reads resident tensors where it keeps
    /// them. The methods below work on any backend (the defaults through host copies).
    fn keeps_resident(&self) -> bool {
        false
    }

    /// The named outputs of `function` on `inputs`, which may hold resident tensors
    /// (`Inputs::resident`), with the outputs `keep` names kept resident.
    fn outputs_keeping(
        &self,
        key: &str,
        function: &Function,
        inputs: &Inputs<T>,
        keep: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<(String, Output<T>)>, String> {
        keep_outputs(self, self.outputs(key, function, inputs)?, keep)
    }

    /// Whether the backend evaluates `function` (under `key`, on `inputs`) itself, where its
    /// resident tensors are, rather than through host copies: false for a backend of kernels
    /// compiled ahead of time that has none for it (it would use the interpreter).
    fn evaluates_natively(&self, _key: &str, _function: &Function, _inputs: &Inputs<T>) -> bool {
        true
    }

    /// A resident copy of `tensor`, where the backend computes.
    fn upload(&self, tensor: Tensor<T>) -> Result<Resident<T>, String> {
        Ok(Resident::host(tensor.shape, tensor.data))
    }
}

/// An output of an evaluation: a value on the host, or a tensor kept resident.
#[derive(Debug)]
pub enum Output<T> {
    Value(Value<T>),
    Resident(Resident<T>),
}

/// Host outputs with those `keep` names uploaded (`Backend::upload`): what a backend that
/// evaluates on the host (the interpreter) returns from `Backend::outputs_keeping`.
pub fn keep_outputs<T: Real, B: Backend<T> + ?Sized>(
    backend: &B,
    outputs: Vec<(String, Value<T>)>,
    keep: &dyn Fn(&str) -> bool,
) -> Result<Vec<(String, Output<T>)>, String> {
    outputs
        .into_iter()
        .map(|(name, value)| match value {
            Value::Real(tensor) if keep(&name) => Ok((name, Output::Resident(backend.upload(tensor)?))),
            value => Ok((name, Output::Value(value))),
        })
        .collect()
}

/// The outputs of an evaluation that kept none resident, as values.
pub fn host_outputs<T>(outputs: Vec<(String, Output<T>)>) -> Result<Vec<(String, Value<T>)>, String> {
    outputs
        .into_iter()
        .map(|(name, output)| match output {
            Output::Value(value) => Ok((name, value)),
            Output::Resident(_) => Err(format!("the output `{name}` was kept resident unasked")),
        })
        .collect()
}

/// A function's key and a byte offset of one of its spans, to an MLIR location
/// (`"file.curv":line:column`).
pub type SourceLocator = Box<dyn Fn(&str, usize) -> String>;

/// The reference interpreter.
pub struct Interpreter;

impl<T: Real> Backend<T> for Interpreter {
    fn name(&self) -> &'static str {
        "interp"
    }

    fn outputs(&self, _key: &str, function: &Function, inputs: &Inputs<T>) -> Result<Vec<(String, Value<T>)>, String> {
        evaluate_outputs(function, inputs).map_err(|error| error.to_string())
    }
}

/// The output `name` of an evaluation.
pub fn output<'a, T>(outputs: &'a [(String, Value<T>)], name: &str) -> Option<&'a Value<T>> {
    outputs.iter().find(|(key, _)| key == name).map(|(_, value)| value)
}

/// The keys under which the trainer evaluates its functions; `curv build` compiles a kernel for
/// each of them ahead of time.
pub mod keys {
    pub const GRADIENTS: &str = "loss_and_gradients";
    /// The gradients with K-FAC's layer inputs and output cotangents as extra outputs.
    pub const GRADIENTS_AND_CAPTURES: &str = "loss_gradients_and_captures";
    pub const HESSIAN_VECTOR: &str = "hessian_vector_product";
    pub const TEST_LOSS: &str = "test_loss";
    pub const LOSS: &str = "loss";

    /// The state initialisation of `rule` for a parameter of `size` elements.
    pub fn rule_init(rule: &str, size: usize) -> String {
        format!("rule {rule} init {size}")
    }

    /// The `block`-th `every` block of `rule` for a group of parameters of `sizes` elements,
    /// updated by one multi-parameter kernel.
    pub fn rule_group_block(rule: &str, block: usize, sizes: &[usize]) -> String {
        let sizes: Vec<String> = sizes.iter().map(usize::to_string).collect();
        format!("rule {rule} block {block} group {}", sizes.join(","))
    }

    /// The gather of a batch of `batch` examples of the data field `source.field` from its whole
    /// table of `examples` rows of `width` elements ([`super::batch_gather_function`]).
    pub fn batch_gather(source: &str, field: &str, examples: usize, width: usize, batch: usize) -> String {
        format!("batch {source}.{field} {examples}x{width} {batch}")
    }

    /// The check that tensors of `shapes` are finite ([`super::finiteness_function`]).
    pub fn finiteness(shapes: &[Vec<usize>]) -> String {
        let shapes: Vec<String> =
            shapes.iter().map(|shape| shape.iter().map(usize::to_string).collect::<Vec<_>>().join("x")).collect();
        format!("finite {}", shapes.join(","))
    }

    /// The `block`-th `every` block of `rule` for a parameter of `size` elements.
    pub fn rule_block(rule: &str, block: usize, size: usize) -> String {
        format!("rule {rule} block {block} {size}")
    }
}

/// The check that a resident training step makes of its gradients and of its updated parameters
/// where they are: one `f32` input per tensor of `shapes`, and one output `finite` of shape `[1]`,
/// the sum of `x - x` over every element of every input, which is 0 when they are all finite and
/// NaN as soon as one is infinite or NaN (the lowering uses no fast-math flags, so `x - x` is not
/// folded). Each input is seen as one row `[1, n]` and summed along it: on the GPU every sum is
/// then a kernel (with a parallel dimension, split into parallel parts when long), where a sum to
/// a scalar would run on the host side and read the tensor there.
pub fn finiteness_function(shapes: &[Vec<usize>]) -> Function {
    use curv_ir::{BinaryOp, DType, Op, ReduceOp, TensorType};
    // No source: the check is the runtime's own.
    let span = Default::default();
    let mut function = Function::new("finite");
    let one = TensorType::known(DType::F32, &[1]);
    let counts: Vec<i64> = shapes.iter().map(|shape| shape.iter().product::<usize>() as i64).collect();
    let total: i64 = counts.iter().sum();
    let all = TensorType::known(DType::F32, &[1, total]);
    let mut row = None;
    let mut start = 0;
    for (index, (shape, &count)) in shapes.iter().zip(&counts).enumerate() {
        let dims: Vec<i64> = shape.iter().map(|&size| size as i64).collect();
        let input = function.push(
            Op::Input { index, name: format!("x{index}") },
            Vec::new(),
            TensorType::known(DType::F32, &dims),
            span,
        );
        let own_row = TensorType::known(DType::F32, &[1, count]);
        let input_row = function.push(Op::Reshape, vec![input], own_row.clone(), span);
        let difference = function.push(Op::Binary(BinaryOp::Sub), vec![input_row, input_row], own_row, span);
        // Placed at its columns of one row of every input's elements.
        let placed = function.push(Op::Pad { starts: vec![0, start] }, vec![difference], all.clone(), span);
        start += count;
        row = Some(match row {
            None => placed,
            Some(previous) => function.push(Op::Binary(BinaryOp::Add), vec![previous, placed], all.clone(), span),
        });
    }
    let finite = match row {
        Some(row) => function.push(Op::Reduce { op: ReduceOp::Sum, axes: vec![1] }, vec![row], one, span),
        None => function.push(Op::Constant { value: 0.0 }, Vec::new(), one, span),
    };
    function.outputs.push(("finite".to_string(), finite));
    function
}

/// The batch of a resident step, gathered where the data set's table is: one `f32` input, the
/// whole field as `[examples, width]`, one `i32` input, the batch's example indices `[batch]`,
/// and one output `batch`, the rows in the field's batch shape `[batch, example_shape...]`.
pub fn batch_gather_function(examples: usize, example_shape: &[usize], batch: usize) -> Function {
    use curv_ir::{DType, Op, TensorType};
    let span = Default::default();
    let width: usize = example_shape.iter().product();
    let mut function = Function::new("batch");
    let table = function.push(
        Op::Input { index: 0, name: "table".to_string() },
        Vec::new(),
        TensorType::known(DType::F32, &[examples as i64, width as i64]),
        span,
    );
    let indices = function.push(
        Op::Input { index: 1, name: "indices".to_string() },
        Vec::new(),
        TensorType::known(DType::I32, &[batch as i64]),
        span,
    );
    let rows = function.push(
        Op::Gather,
        vec![table, indices],
        TensorType::known(DType::F32, &[batch as i64, width as i64]),
        span,
    );
    let mut shape = vec![batch as i64];
    shape.extend(example_shape.iter().map(|&size| size as i64));
    let result = if shape.len() == 2 && shape[1] == width as i64 {
        rows
    } else {
        function.push(Op::Reshape, vec![rows], TensorType::known(DType::F32, &shape), span)
    };
    function.outputs.push(("batch".to_string(), result));
    function
}

/// The first of `tensors` with an element that is not finite, and that element's flat index:
/// one call of [`finiteness_function`] where the tensors are, and host copies only when it
/// finds one (the trainer's resident steps and a library's resident optimizer step).
pub fn first_non_finite_resident<T: Real>(
    backend: &dyn Backend<T>,
    tensors: &[&Resident<T>],
) -> Result<Option<(usize, usize)>, String> {
    let shapes: Vec<Vec<usize>> = tensors.iter().map(|tensor| tensor.shape.clone()).collect();
    let function = finiteness_function(&shapes);
    let mut inputs = Inputs::default();
    for (index, tensor) in tensors.iter().enumerate() {
        inputs.lend_resident(curv_interp::Slot::Input(index), tensor);
    }
    let outputs = backend.outputs(&keys::finiteness(&shapes), &function, &inputs)?;
    let finite = output(&outputs, "finite")
        .and_then(Value::as_real)
        .and_then(|tensor| tensor.data.first())
        .ok_or_else(|| "the finiteness check returned nothing".to_string())?;
    if finite.is_finite() {
        return Ok(None);
    }
    for (index, tensor) in tensors.iter().enumerate() {
        if let Some(position) = crate::first_non_finite(&tensor.host_data()?) {
            return Ok(Some((index, position)));
        }
    }
    Err("the finiteness check failed, but every element read back is finite".to_string())
}
