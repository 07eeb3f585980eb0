//! How a compiled IR function is called: every external value (input, parameter, data,
//! hyperparameter, step, statistic) is an argument in instruction order, then every output is a
//! destination buffer, all as strided memref descriptors. The MLIR backend, the JIT and the
//! standalone trainers of `curv build` share this convention.

use crate::types::{DType, Dim, Function, Op, ValueId};
use std::collections::HashMap;

/// How a compiled function is called: its arguments in order, then its outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct Signature {
    pub arguments: Vec<Argument>,
    pub outputs: Vec<(String, Vec<i64>, DType)>,
}

/// One argument of a compiled function.
#[derive(Debug, Clone, PartialEq)]
pub struct Argument {
    /// The instruction that reads it (`Op::Input`, `Op::Param`, `Op::Data`, ...).
    pub value: ValueId,
    pub op: Op,
    pub shape: Vec<i64>,
    pub dtype: DType,
}

/// Whether an instruction reads a value from outside the function.
pub fn is_external(op: &Op) -> bool {
    matches!(
        op,
        Op::Input { .. } | Op::Param { .. } | Op::Data { .. } | Op::Hyper { .. } | Op::Step | Op::Statistic { .. }
    )
}

/// The concrete shape of every instruction under `bindings`.
pub fn concrete_shapes(function: &Function, bindings: &HashMap<String, i64>) -> Result<Vec<Vec<i64>>, String> {
    function
        .insts
        .iter()
        .map(|inst| {
            inst.ty
                .shape
                .iter()
                .map(|dim| match dim {
                    Dim::Known(size) => Ok(*size),
                    Dim::Symbol(symbol) => {
                        bindings.get(symbol).copied().ok_or_else(|| format!("dimension `{symbol}` is not bound"))
                    }
                })
                .collect()
        })
        .collect()
}

/// The calling convention of `function` with its symbolic dimensions bound.
pub fn kernel_signature(function: &Function, bindings: &HashMap<String, i64>) -> Result<Signature, String> {
    let shapes = concrete_shapes(function, bindings)?;
    let arguments = function
        .insts
        .iter()
        .enumerate()
        .filter(|(_, inst)| is_external(&inst.op))
        .map(|(index, inst)| Argument {
            value: ValueId(index as u32),
            op: inst.op.clone(),
            shape: shapes[index].clone(),
            dtype: inst.ty.dtype,
        })
        .collect();
    let outputs = function
        .outputs
        .iter()
        .map(|(name, value)| (name.clone(), shapes[value.0 as usize].clone(), function.ty(*value).dtype))
        .collect();
    Ok(Signature { arguments, outputs })
}

/// The name of a compiled function in a cache or a registry: the caller's key for the function
/// and the sizes of its symbolic dimensions (`rule adam block 0 640 [P=640]`).
pub fn kernel_key(key: &str, bindings: &HashMap<String, i64>) -> String {
    let mut sizes: Vec<String> = bindings.iter().map(|(name, size)| format!("{name}={size}")).collect();
    sizes.sort();
    format!("{key} [{}]", sizes.join(","))
}
