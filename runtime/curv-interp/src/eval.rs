//! Evaluation of one IR function, instruction by instruction, written for clarity.

use crate::real::Real;
use crate::resident::{Resident, Slot};
use crate::tensor::{for_each_index, strides, Tensor};
use curv_ir::{BinaryOp, Dim, Function, Op, ReduceOp, TensorType, UnaryOp};
use std::collections::HashMap;

/// A runtime value: a float tensor, or an integer tensor (labels, indices, argmax).
#[derive(Debug, Clone, PartialEq)]
pub enum Value<T> {
    Real(Tensor<T>),
    Int(Tensor<i32>),
}

impl<T: Real> Value<T> {
    pub fn shape(&self) -> &[usize] {
        match self {
            Value::Real(tensor) => &tensor.shape,
            Value::Int(tensor) => &tensor.shape,
        }
    }

    pub fn as_real(&self) -> Option<&Tensor<T>> {
        match self {
            Value::Real(tensor) => Some(tensor),
            Value::Int(_) => None,
        }
    }

    pub fn as_int(&self) -> Option<&Tensor<i32>> {
        match self {
            Value::Int(tensor) => Some(tensor),
            Value::Real(_) => None,
        }
    }
}

/// A float tensor an evaluation reads where its owner keeps it (an optimizer's gradient, or a
/// library caller's parameter), in place of the `Op::Input` at `position`: compiled code reads it
/// without a copy (the interpreter copies it, as it copies every input).
#[derive(Debug, Clone)]
pub struct Lent<'a, T> {
    pub position: usize,
    pub shape: Vec<usize>,
    pub data: &'a [T],
}

/// An `Op::Input` as an evaluation sees it: owned by the inputs, or lent.
pub enum InputRef<'i, T> {
    Value(&'i Value<T>),
    Lent(&'i Lent<'i, T>),
}

/// What a function reads besides its own instructions.
#[derive(Debug, Clone)]
pub struct Inputs<'a, T> {
    /// `Op::Input` values by position (a placeholder, such as an empty tensor, where `lent` has
    /// the position).
    pub inputs: Vec<Value<T>>,
    /// `Op::Input` tensors lent for the evaluation; each takes the place of `inputs[position]`.
    pub lent: Vec<Lent<'a, T>>,
    /// `Op::Param` values by parameter index.
    pub params: Vec<Tensor<T>>,
    /// `Op::Data` values by `(source, field)`.
    pub data: HashMap<(String, String), Value<T>>,
    /// `Op::Hyper` values by name.
    pub hyperparameters: HashMap<String, f64>,
    /// `Op::Step`.
    pub step: f64,
    /// `Op::Statistic` values by kind, for the parameter being updated.
    pub statistics: HashMap<String, Tensor<T>>,
    /// Resident tensors ([`Resident`]), each in place of the parameter, input or data field its
    /// slot names (which then need no value above).
    pub resident: Vec<ResidentInput<'a, T>>,
}

/// A resident tensor in place of a slot, seen with `shape` (its own, or a flat view of it: a
/// rule's functions take their tensors flat).
#[derive(Debug, Clone)]
pub struct ResidentInput<'a, T> {
    pub slot: Slot,
    pub tensor: &'a Resident<T>,
    pub shape: Vec<usize>,
}

impl<T> Default for Inputs<'_, T> {
    fn default() -> Self {
        Inputs {
            inputs: Vec::new(),
            lent: Vec::new(),
            params: Vec::new(),
            data: HashMap::new(),
            hyperparameters: HashMap::new(),
            step: 0.0,
            statistics: HashMap::new(),
            resident: Vec::new(),
        }
    }
}

impl<'a, T> Inputs<'a, T> {
    /// The `Op::Input` at `position`: the lent tensor that takes its place, or the owned value.
    pub fn input(&self, position: usize) -> Option<InputRef<'_, T>> {
        match self.lent.iter().find(|lent| lent.position == position) {
            Some(lent) => Some(InputRef::Lent(lent)),
            None => self.inputs.get(position).map(InputRef::Value),
        }
    }

    /// The resident tensor in place of `slot`, if there is one.
    pub fn resident(&self, slot: &Slot) -> Option<&ResidentInput<'a, T>> {
        self.resident.iter().find(|input| input.slot == *slot)
    }

    /// Puts the resident `tensor` in place of `slot`, with its own shape.
    pub fn lend_resident(&mut self, slot: Slot, tensor: &'a Resident<T>) {
        let shape = tensor.shape.clone();
        self.lend_resident_as(slot, tensor, shape);
    }

    /// Puts the resident `tensor` in place of `slot`, seen with `shape` (of as many elements).
    pub fn lend_resident_as(&mut self, slot: Slot, tensor: &'a Resident<T>, shape: Vec<usize>) {
        self.resident.retain(|input| input.slot != slot);
        self.resident.push(ResidentInput { slot, tensor, shape });
    }

    /// Lends `data` (of `shape`) as the `Op::Input` at `position`, which must already hold a
    /// placeholder in `inputs`.
    pub fn lend(&mut self, position: usize, shape: Vec<usize>, data: &'a [T]) {
        self.lent.retain(|lent| lent.position != position);
        self.lent.push(Lent { position, shape, data });
    }
}

/// A failure during evaluation: a missing input, a shape that does not match the IR's type, an
/// index out of range. The interpreter never panics on such inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalError {
    pub instruction: usize,
    pub message: String,
}

impl std::fmt::Display for EvalError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "at %{}: {}", self.instruction, self.message)
    }
}

impl std::error::Error for EvalError {}

/// Evaluates `function` and returns the value of every instruction.
pub fn evaluate<T: Real>(function: &Function, inputs: &Inputs<T>) -> Result<Vec<Value<T>>, EvalError> {
    let mut evaluator =
        Evaluator { function, inputs, bindings: HashMap::new(), values: Vec::with_capacity(function.insts.len()) };
    for index in 0..function.insts.len() {
        let value = evaluator.instruction(index).map_err(|message| EvalError { instruction: index, message })?;
        evaluator.values.push(value);
    }
    Ok(evaluator.values)
}

/// Evaluates `function` and returns its named outputs.
pub fn evaluate_outputs<T: Real>(
    function: &Function,
    inputs: &Inputs<T>,
) -> Result<Vec<(String, Value<T>)>, EvalError> {
    let values = evaluate(function, inputs)?;
    Ok(function.outputs.iter().map(|(name, value)| (name.clone(), values[value.0 as usize].clone())).collect())
}

struct Evaluator<'a, T> {
    function: &'a Function,
    inputs: &'a Inputs<'a, T>,
    /// Sizes of symbolic dimensions, bound by the first input, parameter or data value that has them.
    bindings: HashMap<String, usize>,
    values: Vec<Value<T>>,
}

impl<T: Real> Evaluator<'_, T> {
    fn real(&self, index: usize, operand: usize) -> Result<&Tensor<T>, String> {
        let id = self.function.insts[index].args[operand].0 as usize;
        self.values[id].as_real().ok_or_else(|| format!("operand {operand} is an integer tensor"))
    }

    fn int(&self, index: usize, operand: usize) -> Result<&Tensor<i32>, String> {
        let id = self.function.insts[index].args[operand].0 as usize;
        self.values[id].as_int().ok_or_else(|| format!("operand {operand} is a float tensor"))
    }

    /// The concrete shape of a type under the current bindings.
    fn shape_of(&self, ty: &TensorType) -> Result<Vec<usize>, String> {
        ty.shape
            .iter()
            .map(|dim| match dim {
                Dim::Known(size) => Ok(*size as usize),
                Dim::Symbol(name) => {
                    self.bindings.get(name).copied().ok_or_else(|| format!("dimension `{name}` is not bound"))
                }
            })
            .collect()
    }

    /// Checks an external value against the declared type, binding its symbols.
    fn bind(&mut self, ty: &TensorType, shape: &[usize]) -> Result<(), String> {
        if ty.shape.len() != shape.len() {
            return Err(format!("expected {ty}, got a tensor of shape {shape:?}"));
        }
        for (dim, &size) in ty.shape.iter().zip(shape) {
            match dim {
                Dim::Known(expected) if *expected as usize != size => {
                    return Err(format!("expected {ty}, got a tensor of shape {shape:?}"));
                }
                Dim::Symbol(name) => match self.bindings.get(name) {
                    Some(&bound) if bound != size => {
                        return Err(format!("dimension `{name}` is {bound} elsewhere but {size} here"));
                    }
                    _ => {
                        self.bindings.insert(name.clone(), size);
                    }
                },
                _ => {}
            }
        }
        Ok(())
    }

    /// A copy of the resident tensor in place of `slot`, on the host.
    fn resident_value(&self, slot: &Slot) -> Result<Value<T>, String> {
        let input = self.inputs.resident(slot).ok_or_else(|| format!("{slot:?} is not resident"))?;
        let data = input.tensor.host_data()?.into_owned();
        if input.shape.iter().product::<usize>() != data.len() {
            return Err(format!("{slot:?}: a view of shape {:?} of {} elements", input.shape, data.len()));
        }
        Ok(Value::Real(Tensor::new(input.shape.clone(), data)))
    }

    fn external(&mut self, ty: &TensorType, value: Option<Value<T>>, what: String) -> Result<Value<T>, String> {
        let value = value.ok_or_else(|| format!("{what} was not provided"))?;
        self.bind(ty, value.shape())?;
        Ok(value)
    }

    fn instruction(&mut self, index: usize) -> Result<Value<T>, String> {
        let inst = &self.function.insts[index];
        let ty = &inst.ty;
        match &inst.op {
            Op::Input { index: position, name } if self.inputs.resident(&Slot::Input(*position)).is_some() => {
                let value = self.resident_value(&Slot::Input(*position))?;
                self.external(ty, Some(value), format!("input {position} `{name}`"))
            }
            Op::Param { index: param } if self.inputs.resident(&Slot::Param(*param)).is_some() => {
                let value = self.resident_value(&Slot::Param(*param))?;
                self.external(ty, Some(value), format!("parameter #{param}"))
            }
            Op::Data { source, field }
                if self.inputs.resident(&Slot::Data(source.clone(), field.clone())).is_some() =>
            {
                let value = self.resident_value(&Slot::Data(source.clone(), field.clone()))?;
                self.external(ty, Some(value), format!("data `{source}.{field}`"))
            }
            Op::Input { index: position, name } => {
                let value = match self.inputs.input(*position) {
                    Some(InputRef::Value(value)) => Some(value.clone()),
                    Some(InputRef::Lent(lent)) => {
                        Some(Value::Real(Tensor::new(lent.shape.clone(), lent.data.to_vec())))
                    }
                    None => None,
                };
                self.external(ty, value, format!("input {position} `{name}`"))
            }
            Op::Param { index: param } => {
                let value = self.inputs.params.get(*param).cloned().map(Value::Real);
                self.external(ty, value, format!("parameter #{param}"))
            }
            Op::Data { source, field } => {
                let value = self.inputs.data.get(&(source.clone(), field.clone())).cloned();
                self.external(ty, value, format!("data `{source}.{field}`"))
            }
            Op::Hyper { name } => {
                let value = self
                    .inputs
                    .hyperparameters
                    .get(name)
                    .ok_or_else(|| format!("hyperparameter `{name}` was not provided"))?;
                Ok(Value::Real(Tensor::scalar(T::from_f64(*value))))
            }
            Op::Step => Ok(Value::Real(Tensor::scalar(T::from_f64(self.inputs.step)))),
            Op::Statistic { kind } => {
                let value = self.inputs.statistics.get(kind).cloned().map(Value::Real);
                self.external(ty, value, format!("statistic `{kind}`"))
            }
            Op::Constant { value } => Ok(Value::Real(Tensor::filled(self.shape_of(ty)?, T::from_f64(*value)))),
            Op::CausalMask => {
                let shape = self.shape_of(ty)?;
                let rank = shape.len();
                let mut tensor = Tensor::filled(shape.clone(), T::zero());
                for_each_index(&shape, |flat, coordinates| {
                    if coordinates[rank - 1] > coordinates[rank - 2] {
                        tensor.data[flat] = T::from_f64(f64::NEG_INFINITY);
                    }
                });
                Ok(Value::Real(tensor))
            }
            Op::Unary(op) => {
                let operand = self.real(index, 0)?;
                let data = operand.data.iter().map(|&x| unary(*op, x)).collect();
                Ok(Value::Real(Tensor::new(operand.shape.clone(), data)))
            }
            Op::Binary(op) => {
                let left = self.real(index, 0)?;
                let right = self.real(index, 1)?;
                if left.shape != right.shape {
                    return Err(format!("operand shapes {:?} and {:?} differ", left.shape, right.shape));
                }
                let data = left.data.iter().zip(&right.data).map(|(&a, &b)| binary(*op, a, b)).collect();
                Ok(Value::Real(Tensor::new(left.shape.clone(), data)))
            }
            Op::Select => {
                let condition = self.real(index, 0)?;
                let when_true = self.real(index, 1)?;
                let when_false = self.real(index, 2)?;
                let data = condition
                    .data
                    .iter()
                    .zip(when_true.data.iter().zip(&when_false.data))
                    .map(|(&c, (&a, &b))| if c != T::zero() { a } else { b })
                    .collect();
                Ok(Value::Real(Tensor::new(condition.shape.clone(), data)))
            }
            Op::MatMul => Ok(Value::Real(matmul(self.real(index, 0)?, self.real(index, 1)?)?)),
            Op::Transpose { permutation } => Ok(Value::Real(transpose(self.real(index, 0)?, permutation))),
            Op::Reshape => {
                let shape = self.shape_of(ty)?;
                let id = inst.args[0].0 as usize;
                match &self.values[id] {
                    Value::Real(tensor) => Ok(Value::Real(Tensor::new(shape, tensor.data.clone()))),
                    Value::Int(tensor) => Ok(Value::Int(Tensor::new(shape, tensor.data.clone()))),
                }
            }
            Op::Broadcast { dims } => {
                let shape = self.shape_of(ty)?;
                Ok(Value::Real(broadcast(self.real(index, 0)?, &shape, dims)))
            }
            Op::Reduce { op, axes } => Ok(Value::Real(reduce(self.real(index, 0)?, *op, axes))),
            Op::Count { axes } => {
                let id = inst.args[0].0 as usize;
                let shape = self.values[id].shape();
                let count: usize = axes.iter().map(|&axis| shape[axis]).product();
                Ok(Value::Real(Tensor::scalar(T::from_f64(count as f64))))
            }
            Op::ArgMax { axis } => Ok(Value::Int(argmax(self.real(index, 0)?, *axis))),
            Op::OneHot { classes } => {
                let labels = self.int(index, 0)?;
                let classes = *classes as usize;
                let mut shape = labels.shape.clone();
                shape.push(classes);
                let mut data = vec![T::zero(); labels.len() * classes];
                for (row, &label) in labels.data.iter().enumerate() {
                    if label < 0 || label as usize >= classes {
                        return Err(format!("label {label} is outside 0..{classes}"));
                    }
                    data[row * classes + label as usize] = T::one();
                }
                Ok(Value::Real(Tensor::new(shape, data)))
            }
            Op::Gather => {
                let table = self.real(index, 0)?;
                let ids = self.int(index, 1)?;
                let (rows, width) = (table.shape[0], table.shape[1]);
                let mut shape = ids.shape.clone();
                shape.push(width);
                let mut data = Vec::with_capacity(ids.len() * width);
                for &id in &ids.data {
                    if id < 0 || id as usize >= rows {
                        return Err(format!("index {id} is outside the table's {rows} rows"));
                    }
                    data.extend_from_slice(&table.data[id as usize * width..(id as usize + 1) * width]);
                }
                Ok(Value::Real(Tensor::new(shape, data)))
            }
            Op::ScatterAdd => {
                let ids = self.int(index, 0)?;
                let updates = self.real(index, 1)?;
                let shape = self.shape_of(ty)?;
                let (rows, width) = (shape[0], shape[1]);
                let mut table = Tensor::filled(shape, T::zero());
                for (position, &id) in ids.data.iter().enumerate() {
                    if id < 0 || id as usize >= rows {
                        return Err(format!("index {id} is outside the table's {rows} rows"));
                    }
                    for column in 0..width {
                        let target = id as usize * width + column;
                        table.data[target] = table.data[target].add(updates.data[position * width + column]);
                    }
                }
                Ok(Value::Real(table))
            }
            Op::Slice { starts } => {
                let shape = self.shape_of(ty)?;
                let id = inst.args[0].0 as usize;
                match &self.values[id] {
                    Value::Real(tensor) => Ok(Value::Real(slice(tensor, starts, &shape))),
                    Value::Int(tensor) => Ok(Value::Int(slice(tensor, starts, &shape))),
                }
            }
            Op::Pad { starts } => {
                let shape = self.shape_of(ty)?;
                Ok(Value::Real(pad(self.real(index, 0)?, starts, &shape)))
            }
            Op::Conv2d { stride, padding } => {
                Ok(Value::Real(conv2d(self.real(index, 0)?, self.real(index, 1)?, *stride as usize, *padding as usize)))
            }
            Op::Conv2dInputGradient { stride, padding } => {
                let shape = self.shape_of(ty)?;
                Ok(Value::Real(conv2d_input_gradient(
                    self.real(index, 0)?,
                    self.real(index, 1)?,
                    &shape,
                    *stride as usize,
                    *padding as usize,
                )))
            }
            Op::Conv2dKernelGradient { stride, padding } => {
                let shape = self.shape_of(ty)?;
                Ok(Value::Real(conv2d_kernel_gradient(
                    self.real(index, 0)?,
                    self.real(index, 1)?,
                    &shape,
                    *stride as usize,
                    *padding as usize,
                )))
            }
            Op::Cast => {
                let id = inst.args[0].0 as usize;
                match &self.values[id] {
                    Value::Real(tensor) => Ok(Value::Real(tensor.clone())),
                    Value::Int(tensor) => Ok(Value::Real(Tensor::new(
                        tensor.shape.clone(),
                        tensor.data.iter().map(|&x| T::from_f64(x as f64)).collect(),
                    ))),
                }
            }
        }
    }
}

pub fn unary<T: Real>(op: UnaryOp, x: T) -> T {
    match op {
        UnaryOp::Neg => x.neg(),
        UnaryOp::Sin => x.sin(),
        UnaryOp::Cos => x.cos(),
        UnaryOp::Tanh => x.tanh(),
        UnaryOp::Exp => x.exp(),
        UnaryOp::Log => x.ln(),
        UnaryOp::Sqrt => x.sqrt(),
        UnaryOp::Abs => x.abs(),
        UnaryOp::Sign => {
            if x > T::zero() {
                T::one()
            } else if x < T::zero() {
                T::one().neg()
            } else {
                T::zero()
            }
        }
        UnaryOp::Relu => {
            if x > T::zero() {
                x
            } else {
                T::zero()
            }
        }
        UnaryOp::Sigmoid => T::one().div(T::one().add(x.neg().exp())),
        UnaryOp::Softplus => {
            // log(1 + exp(x)) computed without overflow: max(x, 0) + log(1 + exp(-|x|)).
            let positive = if x > T::zero() { x } else { T::zero() };
            positive.add(T::one().add(x.abs().neg().exp()).ln())
        }
    }
}

pub fn binary<T: Real>(op: BinaryOp, a: T, b: T) -> T {
    match op {
        BinaryOp::Add => a.add(b),
        BinaryOp::Sub => a.sub(b),
        BinaryOp::Mul => a.mul(b),
        BinaryOp::Div => a.div(b),
        BinaryOp::Pow => a.powf(b),
        BinaryOp::Max => {
            if b > a {
                b
            } else {
                a
            }
        }
        BinaryOp::Min => {
            if b < a {
                b
            } else {
                a
            }
        }
        BinaryOp::Equal => {
            if a == b {
                T::one()
            } else {
                T::zero()
            }
        }
        BinaryOp::Greater => {
            if a > b {
                T::one()
            } else {
                T::zero()
            }
        }
    }
}

/// `[..., m, k] @ [k, n]` (shared right operand) or `[..., m, k] @ [..., k, n]` (batched).
pub fn matmul<T: Real>(left: &Tensor<T>, right: &Tensor<T>) -> Result<Tensor<T>, String> {
    let (left_rank, right_rank) = (left.rank(), right.rank());
    if left_rank < 2 || right_rank < 2 {
        return Err("matmul needs operands of rank 2 or more".to_string());
    }
    let (m, k) = (left.shape[left_rank - 2], left.shape[left_rank - 1]);
    let (k_right, n) = (right.shape[right_rank - 2], right.shape[right_rank - 1]);
    if k != k_right {
        return Err(format!("matmul inner dimensions {k} and {k_right} differ"));
    }
    let batch: usize = left.shape[..left_rank - 2].iter().product();
    let shared = right_rank == 2;
    let mut shape = left.shape[..left_rank - 1].to_vec();
    shape.push(n);
    let mut data = vec![T::zero(); batch * m * n];
    for b in 0..batch {
        let left_offset = b * m * k;
        let right_offset = if shared { 0 } else { b * k * n };
        let out_offset = b * m * n;
        for i in 0..m {
            for p in 0..k {
                let a = left.data[left_offset + i * k + p];
                let row = &right.data[right_offset + p * n..right_offset + (p + 1) * n];
                let out = &mut data[out_offset + i * n..out_offset + (i + 1) * n];
                for (target, &value) in out.iter_mut().zip(row) {
                    *target = target.add(a.mul(value));
                }
            }
        }
    }
    Ok(Tensor::new(shape, data))
}

pub fn transpose<T: Real>(operand: &Tensor<T>, permutation: &[usize]) -> Tensor<T> {
    let shape: Vec<usize> = permutation.iter().map(|&axis| operand.shape[axis]).collect();
    let operand_strides = strides(&operand.shape);
    let mut data = Vec::with_capacity(operand.len());
    for_each_index(&shape, |_, coordinates| {
        let source: usize =
            coordinates.iter().zip(permutation).map(|(&coordinate, &axis)| coordinate * operand_strides[axis]).sum();
        data.push(operand.data[source]);
    });
    Tensor::new(shape, data)
}

pub fn broadcast<T: Real>(operand: &Tensor<T>, shape: &[usize], dims: &[usize]) -> Tensor<T> {
    let operand_strides = strides(&operand.shape);
    let mut data = Vec::with_capacity(shape.iter().product());
    for_each_index(shape, |_, coordinates| {
        let mut source = 0;
        for (axis, &result_axis) in dims.iter().enumerate() {
            if operand.shape[axis] != 1 {
                source += coordinates[result_axis] * operand_strides[axis];
            }
        }
        data.push(operand.data[source]);
    });
    Tensor::new(shape.to_vec(), data)
}

pub fn reduce<T: Real>(operand: &Tensor<T>, op: ReduceOp, axes: &[usize]) -> Tensor<T> {
    let kept: Vec<usize> = (0..operand.rank()).filter(|axis| !axes.contains(axis)).collect();
    let shape: Vec<usize> = kept.iter().map(|&axis| operand.shape[axis]).collect();
    let result_strides = strides(&shape);
    let initial = match op {
        ReduceOp::Sum => T::zero(),
        ReduceOp::Max => T::from_f64(f64::NEG_INFINITY),
    };
    let mut data = vec![initial; shape.iter().product()];
    for_each_index(&operand.shape, |flat, coordinates| {
        let target: usize =
            kept.iter().enumerate().map(|(position, &axis)| coordinates[axis] * result_strides[position]).sum();
        let value = operand.data[flat];
        data[target] = match op {
            ReduceOp::Sum => data[target].add(value),
            ReduceOp::Max => {
                if value > data[target] || value.to_f64().is_nan() {
                    value
                } else {
                    data[target]
                }
            }
        };
    });
    Tensor::new(shape, data)
}

pub fn argmax<T: Real>(operand: &Tensor<T>, axis: usize) -> Tensor<i32> {
    let shape: Vec<usize> =
        operand.shape.iter().enumerate().filter(|(index, _)| *index != axis).map(|(_, &size)| size).collect();
    let result_strides = strides(&shape);
    let count: usize = shape.iter().product();
    let mut best = vec![(T::from_f64(f64::NEG_INFINITY), -1i32); count];
    for_each_index(&operand.shape, |flat, coordinates| {
        let target: usize = coordinates
            .iter()
            .enumerate()
            .filter(|(index, _)| *index != axis)
            .zip(&result_strides)
            .map(|((_, &coordinate), &stride)| coordinate * stride)
            .sum();
        let value = operand.data[flat];
        if best[target].1 < 0 || value > best[target].0 {
            best[target] = (value, coordinates[axis] as i32);
        }
    });
    Tensor::new(shape, best.into_iter().map(|(_, position)| position).collect())
}

pub fn slice<E: Copy>(operand: &Tensor<E>, starts: &[i64], shape: &[usize]) -> Tensor<E> {
    let operand_strides = strides(&operand.shape);
    let mut data = Vec::with_capacity(shape.iter().product());
    for_each_index(shape, |_, coordinates| {
        let source: usize = coordinates
            .iter()
            .enumerate()
            .map(|(axis, &coordinate)| (coordinate + starts[axis] as usize) * operand_strides[axis])
            .sum();
        data.push(operand.data[source]);
    });
    Tensor::new(shape.to_vec(), data)
}

pub fn pad<T: Real>(operand: &Tensor<T>, starts: &[i64], shape: &[usize]) -> Tensor<T> {
    let result_strides = strides(shape);
    let mut result = Tensor::filled(shape.to_vec(), T::zero());
    for_each_index(&operand.shape, |flat, coordinates| {
        let target: usize = coordinates
            .iter()
            .enumerate()
            .map(|(axis, &coordinate)| (coordinate + starts[axis] as usize) * result_strides[axis])
            .sum();
        result.data[target] = operand.data[flat];
    });
    result
}

/// Visits every (output, input, kernel) index triple of a 2-D convolution that touches the input.
#[allow(clippy::too_many_arguments)]
fn conv2d_visit(
    input_shape: &[usize],
    kernel_shape: &[usize],
    output_shape: &[usize],
    stride: usize,
    padding: usize,
    mut visit: impl FnMut(usize, usize, usize),
) {
    let (batch, channels, height, width) = (input_shape[0], input_shape[1], input_shape[2], input_shape[3]);
    let (outputs, kernel_height, kernel_width) = (kernel_shape[0], kernel_shape[2], kernel_shape[3]);
    let (output_height, output_width) = (output_shape[2], output_shape[3]);
    for n in 0..batch {
        for o in 0..outputs {
            for y in 0..output_height {
                for x in 0..output_width {
                    let output_index = ((n * outputs + o) * output_height + y) * output_width + x;
                    for c in 0..channels {
                        for ky in 0..kernel_height {
                            let row = (y * stride + ky) as isize - padding as isize;
                            if row < 0 || row as usize >= height {
                                continue;
                            }
                            for kx in 0..kernel_width {
                                let column = (x * stride + kx) as isize - padding as isize;
                                if column < 0 || column as usize >= width {
                                    continue;
                                }
                                let input_index =
                                    ((n * channels + c) * height + row as usize) * width + column as usize;
                                let kernel_index = ((o * channels + c) * kernel_height + ky) * kernel_width + kx;
                                visit(output_index, input_index, kernel_index);
                            }
                        }
                    }
                }
            }
        }
    }
}

fn conv2d_output_shape(input_shape: &[usize], kernel_shape: &[usize], stride: usize, padding: usize) -> Vec<usize> {
    let height = (input_shape[2] + 2 * padding - kernel_shape[2]) / stride + 1;
    let width = (input_shape[3] + 2 * padding - kernel_shape[3]) / stride + 1;
    vec![input_shape[0], kernel_shape[0], height, width]
}

pub fn conv2d<T: Real>(input: &Tensor<T>, kernel: &Tensor<T>, stride: usize, padding: usize) -> Tensor<T> {
    let shape = conv2d_output_shape(&input.shape, &kernel.shape, stride, padding);
    let mut output = Tensor::filled(shape.clone(), T::zero());
    conv2d_visit(&input.shape, &kernel.shape, &shape, stride, padding, |out, inp, ker| {
        output.data[out] = output.data[out].add(input.data[inp].mul(kernel.data[ker]));
    });
    output
}

pub fn conv2d_input_gradient<T: Real>(
    output_gradient: &Tensor<T>,
    kernel: &Tensor<T>,
    input_shape: &[usize],
    stride: usize,
    padding: usize,
) -> Tensor<T> {
    let mut gradient = Tensor::filled(input_shape.to_vec(), T::zero());
    conv2d_visit(input_shape, &kernel.shape, &output_gradient.shape, stride, padding, |out, inp, ker| {
        gradient.data[inp] = gradient.data[inp].add(output_gradient.data[out].mul(kernel.data[ker]));
    });
    gradient
}

pub fn conv2d_kernel_gradient<T: Real>(
    input: &Tensor<T>,
    output_gradient: &Tensor<T>,
    kernel_shape: &[usize],
    stride: usize,
    padding: usize,
) -> Tensor<T> {
    let mut gradient = Tensor::filled(kernel_shape.to_vec(), T::zero());
    conv2d_visit(&input.shape, kernel_shape, &output_gradient.shape, stride, padding, |out, inp, ker| {
        gradient.data[ker] = gradient.data[ker].add(output_gradient.data[out].mul(input.data[inp]));
    });
    gradient
}
