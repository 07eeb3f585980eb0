//! `curv-ir` owns curv's typed tensor IR and its text format (`curv emit --stage ir`).
//!
//! A [`Program`] is what the checker produces from a `.curv` file: the update rules as generic
//! functions over a parameter of symbolic shape, and one [`TrainProgram`] per `train` block with
//! every shape concrete: parameters, data fields, the loss as a flat SSA [`Function`] of primitive
//! ops, and the optimizer plan resolved per parameter. Composite operations (softmax,
//! cross-entropy, layer norm, broadcasting) are already decomposed into primitives, so that the
//! autodiff, fusion and lowering stages handle a small, closed set of ops. This crate does no I/O.

pub mod abi;
mod cost;
pub mod executable;
pub mod fusion;
pub mod group;
mod print;
mod types;

pub use cost::{CostModel, ParamCost, StepCost};
pub use print::{print_function, print_options, print_program};
pub use types::*;
