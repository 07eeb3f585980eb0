//! Where IR functions are evaluated: the reference interpreter, or code compiled by a backend
//! (the MLIR CPU backend lives in `curv-mlir`, which implements [`Backend`] for `f32`).

use curv_interp::{evaluate_outputs, Inputs, Real, Value};
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

    /// The `block`-th `every` block of `rule` for a parameter of `size` elements.
    pub fn rule_block(rule: &str, block: usize, size: usize) -> String {
        format!("rule {rule} block {block} {size}")
    }
}
