//! `curv-interp` owns the reference interpreter of curv's typed IR. It evaluates a
//! [`curv_ir::Function`] instruction by instruction, in `f32` or `f64`, with no fusion and no
//! cleverness: it is the oracle that autodiff, the MLIR backend and the GPU backend are tested
//! against. Shapes are checked against the IR's types at every input, and failures are errors,
//! never panics.

mod eval;
mod real;
mod resident;
mod tensor;

pub use eval::{
    argmax, binary, broadcast, conv2d, conv2d_kernel_gradient, evaluate, evaluate_outputs, matmul, reduce, transpose,
    unary, EvalError, InputRef, Inputs, Lent, ResidentInput, Value,
};
pub use real::Real;
pub use resident::{DeviceStorage, LentStorage, ReadLent, Resident, Slot, Storage};
pub use tensor::{for_each_index, strides, Tensor, TensorRef};
