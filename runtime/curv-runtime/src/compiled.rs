//! Calling compiled functions from the trainer: symbolic sizes read from the inputs, the kernel
//! key, and the marshalling of inputs into memref descriptors and of outputs back into values,
//! following `curv_ir::abi`. The JIT of `curv-mlir` and the standalone trainers of `curv build`
//! both call through here.

use curv_interp::{Inputs, Tensor, Value};
use curv_ir::abi::Signature;
use curv_ir::{DType, Dim, Function, Op};
use std::collections::HashMap;

/// Sizes of the function's symbolic dimensions, read from the inputs that carry them.
pub fn bindings_from_inputs(function: &Function, inputs: &Inputs<f32>) -> HashMap<String, i64> {
    let mut bindings = HashMap::new();
    for inst in &function.insts {
        let shape: Option<Vec<usize>> = match &inst.op {
            Op::Input { index, .. } => inputs.inputs.get(*index).map(|value| value.shape().to_vec()),
            Op::Param { index } => inputs.params.get(*index).map(|tensor| tensor.shape.clone()),
            _ => None,
        };
        if let Some(shape) = shape {
            for (dim, size) in inst.ty.shape.iter().zip(shape) {
                if let Dim::Symbol(name) = dim {
                    bindings.entry(name.clone()).or_insert(size as i64);
                }
            }
        }
    }
    bindings
}

enum Owned {
    F32(Vec<f32>),
    I32(Vec<i32>),
}

impl Owned {
    fn pointer(&mut self) -> *mut u8 {
        match self {
            Owned::F32(values) => values.as_mut_ptr() as *mut u8,
            Owned::I32(values) => values.as_mut_ptr() as *mut u8,
        }
    }

    fn len(&self) -> usize {
        match self {
            Owned::F32(values) => values.len(),
            Owned::I32(values) => values.len(),
        }
    }
}

fn argument_data(op: &Op, inputs: &Inputs<f32>) -> Result<Owned, String> {
    let value = |value: Option<&Value<f32>>, what: String| -> Result<Owned, String> {
        match value {
            Some(Value::Real(tensor)) => Ok(Owned::F32(tensor.data.clone())),
            Some(Value::Int(tensor)) => Ok(Owned::I32(tensor.data.clone())),
            None => Err(format!("{what} was not provided")),
        }
    };
    match op {
        Op::Input { index, name } => value(inputs.inputs.get(*index), format!("input `{name}`")),
        Op::Param { index } => inputs
            .params
            .get(*index)
            .map(|tensor| Owned::F32(tensor.data.clone()))
            .ok_or_else(|| format!("parameter #{index} was not provided")),
        Op::Data { source, field } => {
            value(inputs.data.get(&(source.clone(), field.clone())), format!("data `{source}.{field}`"))
        }
        Op::Hyper { name } => inputs
            .hyperparameters
            .get(name)
            .map(|value| Owned::F32(vec![*value as f32]))
            .ok_or_else(|| format!("hyperparameter `{name}` was not provided")),
        Op::Step => Ok(Owned::F32(vec![inputs.step as f32])),
        Op::Statistic { kind } => inputs
            .statistics
            .get(kind)
            .map(|tensor| Owned::F32(tensor.data.clone()))
            .ok_or_else(|| format!("statistic `{kind}` was not provided")),
        other => Err(format!("`{}` is not an argument", other.name())),
    }
}

/// A rank-N strided memref descriptor as the C interface lays it out:
/// `{allocated, aligned, offset, sizes[N], strides[N]}` in 64-bit words.
fn descriptor(pointer: *mut u8, shape: &[i64]) -> Vec<i64> {
    let mut words = vec![pointer as i64, pointer as i64, 0];
    words.extend_from_slice(shape);
    let mut stride = 1i64;
    let mut strides = vec![0i64; shape.len()];
    for axis in (0..shape.len()).rev() {
        strides[axis] = stride;
        stride *= shape[axis];
    }
    words.extend(strides);
    words
}

/// Calls a compiled function with `inputs`: copies the arguments into buffers, allocates the
/// outputs, and hands `invoke` the packed arguments (one pointer per argument, each pointing at
/// the pointer to its memref descriptor), then collects the outputs by name.
pub fn call_compiled(
    signature: &Signature,
    inputs: &Inputs<f32>,
    invoke: &mut dyn FnMut(&mut [*mut ()]) -> Result<(), String>,
) -> Result<Vec<(String, Value<f32>)>, String> {
    let mut owned: Vec<Owned> = Vec::with_capacity(signature.arguments.len() + signature.outputs.len());
    let mut shapes: Vec<&[i64]> = Vec::with_capacity(owned.capacity());
    for argument in &signature.arguments {
        let data = argument_data(&argument.op, inputs)?;
        let count: i64 = argument.shape.iter().product();
        if data.len() as i64 != count {
            return Err(format!("an argument of {} elements where {count} are expected", data.len()));
        }
        owned.push(data);
        shapes.push(&argument.shape);
    }
    for (_, shape, dtype) in &signature.outputs {
        let count = shape.iter().product::<i64>() as usize;
        owned.push(if *dtype == DType::I32 { Owned::I32(vec![0; count]) } else { Owned::F32(vec![0.0; count]) });
        shapes.push(shape);
    }
    let mut descriptors: Vec<Vec<i64>> =
        owned.iter_mut().zip(&shapes).map(|(data, shape)| descriptor(data.pointer(), shape)).collect();
    let mut descriptor_pointers: Vec<*mut i64> = descriptors.iter_mut().map(|words| words.as_mut_ptr()).collect();
    let mut slots: Vec<*mut ()> =
        descriptor_pointers.iter_mut().map(|pointer| pointer as *mut *mut i64 as *mut ()).collect();
    invoke(&mut slots)?;
    let first_output = signature.arguments.len();
    let mut results = Vec::with_capacity(signature.outputs.len());
    for ((name, shape, _), data) in signature.outputs.iter().zip(owned.into_iter().skip(first_output)) {
        let shape: Vec<usize> = shape.iter().map(|&size| size as usize).collect();
        results.push((
            name.clone(),
            match data {
                Owned::F32(values) => Value::Real(Tensor::new(shape, values)),
                Owned::I32(values) => Value::Int(Tensor::new(shape, values)),
            },
        ));
    }
    Ok(results)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
extern "C" {
    fn mallopt(parameter: i32, value: i32) -> i32;
}

/// Compiled kernels allocate their temporaries with `malloc` on every call. glibc serves blocks
/// above 128 KiB with fresh `mmap`s, so every step would fault in and zero its temporaries again;
/// raising the thresholds keeps those blocks in the heap for reuse.
pub fn keep_large_allocations_in_the_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_THRESHOLD: i32 = -3;
        mallopt(M_MMAP_THRESHOLD, 1 << 30);
        mallopt(M_TRIM_THRESHOLD, 1 << 30);
    }
}
