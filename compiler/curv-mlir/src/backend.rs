//! The MLIR CPU backend of the training runtime: each IR function the trainer evaluates is
//! lowered, compiled once per key (and parameter size) and then called on the trainer's buffers.

use crate::jit::{compile, Buffer, CompiledFunction};
use crate::lower::lower_function;
use curv_interp::{Inputs, Tensor, Value};
use curv_ir::{DType, Dim, Function, Op};
use curv_runtime::Backend;
use std::cell::RefCell;
use std::collections::HashMap;

/// A compiled function, or the reason it runs on the interpreter instead.
enum Entry {
    Compiled(CompiledFunction),
    Interpreted,
}

/// Compiles functions on first use and keeps them. A function with an op the lowering does not
/// handle yet runs on the reference interpreter, with a note on standard error the first time.
pub struct MlirBackend {
    optimization_level: usize,
    compiled: RefCell<HashMap<String, Entry>>,
    compile_seconds: std::cell::Cell<f64>,
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
extern "C" {
    fn mallopt(parameter: i32, value: i32) -> i32;
}

/// Compiled kernels allocate their temporaries with `malloc` on every call. glibc serves blocks
/// above 128 KiB with fresh `mmap`s, so every step would fault in and zero its temporaries again;
/// raising the thresholds keeps those blocks in the heap for reuse.
fn keep_large_allocations_in_the_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    unsafe {
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_MMAP_THRESHOLD: i32 = -3;
        mallopt(M_MMAP_THRESHOLD, 1 << 30);
        mallopt(M_TRIM_THRESHOLD, 1 << 30);
    }
}

impl MlirBackend {
    pub fn new(optimization_level: usize) -> MlirBackend {
        keep_large_allocations_in_the_heap();
        MlirBackend {
            optimization_level,
            compiled: RefCell::new(HashMap::new()),
            compile_seconds: std::cell::Cell::new(0.0),
        }
    }
}

/// Sizes of the function's symbolic dimensions, read from the inputs that carry them.
fn bindings(function: &Function, inputs: &Inputs<f32>) -> HashMap<String, i64> {
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

fn argument_data(op: &Op, inputs: &Inputs<f32>) -> Result<Owned, String> {
    let real = |value: Option<&Value<f32>>, what: String| -> Result<Owned, String> {
        match value {
            Some(Value::Real(tensor)) => Ok(Owned::F32(tensor.data.clone())),
            Some(Value::Int(tensor)) => Ok(Owned::I32(tensor.data.clone())),
            None => Err(format!("{what} was not provided")),
        }
    };
    match op {
        Op::Input { index, name } => real(inputs.inputs.get(*index), format!("input `{name}`")),
        Op::Param { index } => inputs
            .params
            .get(*index)
            .map(|tensor| Owned::F32(tensor.data.clone()))
            .ok_or_else(|| format!("parameter #{index} was not provided")),
        Op::Data { source, field } => {
            real(inputs.data.get(&(source.clone(), field.clone())), format!("data `{source}.{field}`"))
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

impl Backend<f32> for MlirBackend {
    fn name(&self) -> &'static str {
        "mlir"
    }

    fn compile_seconds(&self) -> f64 {
        self.compile_seconds.get()
    }

    fn outputs(
        &self,
        key: &str,
        function: &Function,
        inputs: &Inputs<f32>,
    ) -> Result<Vec<(String, Value<f32>)>, String> {
        let bindings = bindings(function, inputs);
        let mut sizes: Vec<String> = bindings.iter().map(|(name, size)| format!("{name}={size}")).collect();
        sizes.sort();
        let cache_key = format!("{key} [{}]", sizes.join(","));
        let mut compiled = self.compiled.borrow_mut();
        if !compiled.contains_key(&cache_key) {
            let started = std::time::Instant::now();
            let name = format!("kernel_{}", compiled.len());
            let entry = match lower_function(function, &name, &bindings) {
                Ok((text, signature)) => Entry::Compiled(
                    compile(&text, &name, signature, self.optimization_level).map_err(|error| error.message)?,
                ),
                Err(error) => {
                    eprintln!("note: {}; `{key}` runs on the reference interpreter", error.message);
                    Entry::Interpreted
                }
            };
            compiled.insert(cache_key.clone(), entry);
            self.compile_seconds.set(self.compile_seconds.get() + started.elapsed().as_secs_f64());
        }
        let function = match &compiled[&cache_key] {
            Entry::Compiled(function) => function,
            Entry::Interpreted => return curv_runtime::Interpreter.outputs(key, function, inputs),
        };
        let mut owned: Vec<Owned> = Vec::new();
        for argument in &function.signature.arguments {
            owned.push(argument_data(&argument.op, inputs)?);
        }
        for (_, shape, dtype) in &function.signature.outputs {
            let count = shape.iter().product::<i64>() as usize;
            owned.push(if *dtype == DType::I32 { Owned::I32(vec![0; count]) } else { Owned::F32(vec![0.0; count]) });
        }
        {
            let mut buffers: Vec<Buffer> = owned
                .iter_mut()
                .map(|data| match data {
                    Owned::F32(values) => Buffer::F32(values.as_mut_slice()),
                    Owned::I32(values) => Buffer::I32(values.as_mut_slice()),
                })
                .collect();
            function.call(&mut buffers).map_err(|error| error.message)?;
        }
        let first_output = function.signature.arguments.len();
        let mut results = Vec::new();
        for ((name, shape, _), data) in function.signature.outputs.iter().zip(owned.into_iter().skip(first_output)) {
            let shape: Vec<usize> = shape.iter().map(|&size| size as usize).collect();
            let value = match data {
                Owned::F32(values) => Value::Real(Tensor::new(shape, values)),
                Owned::I32(values) => Value::Int(Tensor::new(shape, values)),
            };
            results.push((name.clone(), value));
        }
        Ok(results)
    }
}
