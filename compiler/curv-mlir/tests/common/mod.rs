//! Helpers shared by the integration tests of curv-mlir.

// Each test binary uses some of them.
#![allow(dead_code)]

use std::path::Path;

/// The checked program of an example (a path below `examples/`).
pub fn program(example: &str) -> curv_ir::Program {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples").join(example);
    let source = curv_driver::SourceFile::read(&path).unwrap();
    let compilation = curv_driver::compile(source);
    assert!(!compilation.has_errors());
    compilation.analysis.unwrap().program
}

/// The loss-and-gradient program of an example's first train block, and its kernel module text
/// for a GPU (function `loss_and_gradients`, without locations).
pub fn gradients(example: &str) -> (curv_ir::Function, String) {
    let program = program(example);
    let train = &program.trains[0];
    let gradients = curv_ad::products::gradient_program(&train.loss, &train.params).function;
    let bindings = std::collections::HashMap::new();
    let (text, _) =
        curv_mlir::lower::lower_function_for_gpu(&gradients, "loss_and_gradients", &bindings, None).unwrap();
    (gradients, text)
}

/// The loss-and-gradient program of an example's first train block, and its kernel module text
/// for a GPU, with every operation located in the example (`"examples/NAME.curv":line:column`).
pub fn located_gradients(example: &str) -> (curv_ir::Function, String) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples").join(example);
    let source = std::fs::read_to_string(&path).unwrap();
    let program = program(example);
    let train = &program.trains[0];
    let gradients = curv_ad::products::gradient_program(&train.loss, &train.params).function;
    let locate =
        |span: curv_grammar::Span| format!("\"examples/{example}\":{}", curv_driver::line_column(&source, span.start));
    let bindings = std::collections::HashMap::new();
    let (text, _) =
        curv_mlir::lower::lower_function_for_gpu(&gradients, "loss_and_gradients", &bindings, Some(&locate)).unwrap();
    (gradients, text)
}

/// Deterministic pseudo-random values in [-scale, scale] (xorshift).
pub fn values(count: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..count)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            ((state >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32 * scale
        })
        .collect()
}

/// The kernels of a plan that become GPU launches: fused elementwise kernels, reductions and
/// epilogues (matrix products are library calls on the host side; constants and plain
/// broadcasts that fold away launch nothing, so at least these must exist).
pub fn launched_kernels(function: &curv_ir::Function) -> usize {
    let plan = curv_ir::fusion::plan_kernels(function);
    plan.kernels
        .iter()
        .filter(|kernel| match kernel.kind {
            curv_ir::fusion::KernelKind::Elementwise | curv_ir::fusion::KernelKind::Reduction => true,
            curv_ir::fusion::KernelKind::MatMul => kernel.insts.len() > 1,
            curv_ir::fusion::KernelKind::Other => false,
        })
        .count()
}
