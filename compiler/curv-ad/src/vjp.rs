//! Reverse mode: the vector-Jacobian product of one output with respect to chosen values,
//! emitted as new instructions appended after the forward ones.

use crate::builder::Builder;
use curv_ir::{BinaryOp, DType, Dim, Function, Op, ReduceOp, UnaryOp, ValueId};
use std::collections::HashMap;

/// The seed of the backward pass.
#[derive(Debug, Clone, PartialEq)]
pub enum Seed {
    /// The output is a scalar and its cotangent is one.
    One,
    /// The cotangent is an existing value of the function (for example a new input).
    Value(ValueId),
}

/// The kind of layer a K-FAC capture comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerKind {
    /// `x @ W`.
    Dense,
    /// `conv2d(x, K)` (the statistics use the input's patches and the output's cotangents).
    Conv2d { stride: i64, padding: i64 },
}

/// What the backward pass saw for a parameter used as `x @ W` or `conv2d(x, K)`: the K-FAC
/// statistics are built from the layer input `x` and the cotangent of the layer's output.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerCapture {
    /// The `Op::Param` index of `W` or `K`.
    pub param: usize,
    pub kind: LayerKind,
    /// The product or convolution instruction.
    pub layer: ValueId,
    pub input: ValueId,
    pub output_cotangent: ValueId,
}

/// The differentiated function: the forward instructions (same ids) followed by the backward ones.
#[derive(Debug, Clone, PartialEq)]
pub struct Vjp {
    pub function: Function,
    /// The cotangent of each requested value, in request order (`None`: the output does not
    /// depend on it, so its gradient is zero).
    pub cotangents: Vec<Option<ValueId>>,
    pub layer_captures: Vec<LayerCapture>,
}

/// Which values depend on any of `sources` through differentiable float operations.
pub fn depends_on(function: &Function, sources: &[ValueId]) -> Vec<bool> {
    let mut active = vec![false; function.insts.len()];
    // Marked first: a search of `sources` per instruction was quadratic in the parameters.
    let mut source = vec![false; function.insts.len()];
    for id in sources {
        if let Some(mark) = source.get_mut(id.0 as usize) {
            *mark = true;
        }
    }
    for (index, inst) in function.insts.iter().enumerate() {
        if source[index] {
            active[index] = true;
            continue;
        }
        if !inst.ty.dtype.is_float() || !differentiable(&inst.op) {
            continue;
        }
        active[index] = inst.args.iter().any(|arg| active[arg.0 as usize]);
    }
    active
}

/// Ops whose result carries derivatives of their operands.
fn differentiable(op: &Op) -> bool {
    !matches!(
        op,
        Op::Binary(BinaryOp::Equal | BinaryOp::Greater)
            | Op::Unary(UnaryOp::Sign)
            | Op::ArgMax { .. }
            | Op::Count { .. }
            | Op::OneHot { .. }
            | Op::Constant { .. }
            | Op::CausalMask
            | Op::Statistic { .. }
    )
}

/// Appends the backward pass of `output` with respect to `wrt`.
pub fn vjp(function: &Function, output: ValueId, wrt: &[ValueId], seed: Seed) -> Vjp {
    let mut result = function.clone();
    let active = depends_on(function, wrt);
    let mut adjoints: HashMap<ValueId, ValueId> = HashMap::new();
    let mut captures = Vec::new();
    {
        let span = function.inst(output).span;
        let mut builder = Builder { function: &mut result, span };
        let seed_value = match seed {
            Seed::One => builder.constant_like(1.0, output),
            Seed::Value(value) => value,
        };
        if active[output.0 as usize] {
            adjoints.insert(output, seed_value);
        }
        for index in (0..function.insts.len()).rev() {
            let id = ValueId(index as u32);
            let Some(&cotangent) = adjoints.get(&id) else { continue };
            let inst = function.inst(id).clone();
            builder.span = inst.span;
            let contributions = backward(&mut builder, &inst.op, &inst.args, id, cotangent, &active);
            let kind = match inst.op {
                Op::MatMul => Some(LayerKind::Dense),
                Op::Conv2d { stride, padding } => Some(LayerKind::Conv2d { stride, padding }),
                _ => None,
            };
            if let Some(kind) = kind {
                if let Op::Param { index: param } = function.inst(inst.args[1]).op {
                    captures.push(LayerCapture {
                        param,
                        kind,
                        layer: id,
                        input: inst.args[0],
                        output_cotangent: cotangent,
                    });
                }
            }
            for (operand, contribution) in contributions {
                if !active[operand.0 as usize] {
                    continue;
                }
                let total = match adjoints.get(&operand) {
                    Some(&existing) => builder.add(existing, contribution),
                    None => contribution,
                };
                adjoints.insert(operand, total);
            }
        }
    }
    captures.reverse();
    let cotangents = wrt.iter().map(|value| adjoints.get(value).copied()).collect();
    Vjp { function: result, cotangents, layer_captures: captures }
}

/// The contributions of one instruction's cotangent `g` to its operands.
fn backward(
    builder: &mut Builder,
    op: &Op,
    args: &[ValueId],
    result: ValueId,
    g: ValueId,
    active: &[bool],
) -> Vec<(ValueId, ValueId)> {
    let is_active = |value: ValueId| active[value.0 as usize];
    match op {
        Op::Input { .. }
        | Op::Param { .. }
        | Op::Data { .. }
        | Op::Hyper { .. }
        | Op::Step
        | Op::Constant { .. }
        | Op::CausalMask
        | Op::Statistic { .. }
        | Op::ArgMax { .. }
        | Op::Count { .. }
        | Op::OneHot { .. } => Vec::new(),
        Op::Unary(unary) => {
            let x = args[0];
            let derivative = unary_derivative(builder, *unary, x, result);
            match derivative {
                Some(derivative) => vec![(x, builder.mul(g, derivative))],
                None => Vec::new(),
            }
        }
        Op::Binary(binary) => {
            let (a, b) = (args[0], args[1]);
            let mut out = Vec::new();
            match binary {
                BinaryOp::Add => {
                    out.push((a, g));
                    out.push((b, g));
                }
                BinaryOp::Sub => {
                    out.push((a, g));
                    if is_active(b) {
                        out.push((b, builder.neg(g)));
                    }
                }
                BinaryOp::Mul => {
                    if is_active(a) {
                        out.push((a, builder.mul(g, b)));
                    }
                    if is_active(b) {
                        out.push((b, builder.mul(g, a)));
                    }
                }
                BinaryOp::Div => {
                    if is_active(a) {
                        out.push((a, builder.div(g, b)));
                    }
                    if is_active(b) {
                        let quotient = builder.div(result, b);
                        let product = builder.mul(g, quotient);
                        out.push((b, builder.neg(product)));
                    }
                }
                BinaryOp::Pow => {
                    if is_active(a) {
                        let one = builder.constant_like(1.0, b);
                        let exponent = builder.sub(b, one);
                        let power = builder.binary(BinaryOp::Pow, a, exponent);
                        let scaled = builder.mul(b, power);
                        out.push((a, builder.mul(g, scaled)));
                    }
                    if is_active(b) {
                        let log = builder.unary(UnaryOp::Log, a);
                        let scaled = builder.mul(result, log);
                        out.push((b, builder.mul(g, scaled)));
                    }
                }
                BinaryOp::Max | BinaryOp::Min => {
                    // Ties go to the left operand, as in the interpreter.
                    let takes_right = if *binary == BinaryOp::Max {
                        builder.binary(BinaryOp::Greater, b, a)
                    } else {
                        builder.binary(BinaryOp::Greater, a, b)
                    };
                    let zero = builder.constant_like(0.0, g);
                    if is_active(a) {
                        out.push((a, builder.select(takes_right, zero, g)));
                    }
                    if is_active(b) {
                        out.push((b, builder.select(takes_right, g, zero)));
                    }
                }
                BinaryOp::Equal | BinaryOp::Greater => {}
            }
            out
        }
        Op::Select => {
            let zero = builder.constant_like(0.0, g);
            let mut out = Vec::new();
            if is_active(args[1]) {
                out.push((args[1], builder.select(args[0], g, zero)));
            }
            if is_active(args[2]) {
                out.push((args[2], builder.select(args[0], zero, g)));
            }
            out
        }
        Op::MatMul => {
            let (left, right) = (args[0], args[1]);
            let mut out = Vec::new();
            if is_active(left) {
                let right_transposed = builder.transpose_last_two(right);
                out.push((left, builder.matmul(g, right_transposed)));
            }
            if is_active(right) {
                let left_ty = builder.ty(left);
                let right_ty = builder.ty(right);
                if right_ty.rank() == 2 {
                    // The right operand is shared by every leading index: fold them into rows.
                    let rows = fold_leading(&left_ty.shape);
                    let inner = left_ty.shape[left_ty.rank() - 1].clone();
                    let columns = builder.ty(g).shape.last().cloned().unwrap_or(Dim::Known(1));
                    let left_rows = builder.reshape(left, vec![rows.clone(), inner]);
                    let g_rows = builder.reshape(g, vec![rows, columns]);
                    let left_transposed = builder.transpose(left_rows, vec![1, 0]);
                    out.push((right, builder.matmul(left_transposed, g_rows)));
                } else {
                    let left_transposed = builder.transpose_last_two(left);
                    out.push((right, builder.matmul(left_transposed, g)));
                }
            }
            out
        }
        Op::Transpose { permutation } => {
            let mut inverse = vec![0; permutation.len()];
            for (position, &axis) in permutation.iter().enumerate() {
                inverse[axis] = position;
            }
            vec![(args[0], builder.transpose(g, inverse))]
        }
        Op::Reshape => {
            let shape = builder.ty(args[0]).shape;
            vec![(args[0], builder.reshape(g, shape))]
        }
        Op::Broadcast { dims } => vec![(args[0], unbroadcast(builder, g, args[0], dims))],
        Op::Reduce { op: ReduceOp::Sum, axes } => vec![(args[0], rebroadcast(builder, g, args[0], axes))],
        Op::Reduce { op: ReduceOp::Max, axes } => {
            let maximum = rebroadcast(builder, result, args[0], axes);
            let mask = builder.binary(BinaryOp::Equal, args[0], maximum);
            let spread = rebroadcast(builder, g, args[0], axes);
            vec![(args[0], builder.mul(mask, spread))]
        }
        Op::Gather => {
            let table_ty = builder.ty(args[0]);
            vec![(args[0], builder.push(Op::ScatterAdd, vec![args[1], g], table_ty))]
        }
        Op::ScatterAdd => {
            let rows_ty = builder.ty(args[1]);
            vec![(args[1], builder.push(Op::Gather, vec![g, args[0]], rows_ty))]
        }
        Op::Slice { starts } => {
            let operand_ty = builder.ty(args[0]);
            vec![(args[0], builder.push(Op::Pad { starts: starts.clone() }, vec![g], operand_ty))]
        }
        Op::Pad { starts } => {
            let operand_ty = builder.ty(args[0]);
            vec![(args[0], builder.push(Op::Slice { starts: starts.clone() }, vec![g], operand_ty))]
        }
        Op::Conv2d { stride, padding } => {
            let (input, kernel) = (args[0], args[1]);
            let (stride, padding) = (*stride, *padding);
            let mut out = Vec::new();
            if is_active(input) {
                let ty = builder.ty(input);
                out.push((input, builder.push(Op::Conv2dInputGradient { stride, padding }, vec![g, kernel], ty)));
            }
            if is_active(kernel) {
                let ty = builder.ty(kernel);
                out.push((kernel, builder.push(Op::Conv2dKernelGradient { stride, padding }, vec![input, g], ty)));
            }
            out
        }
        Op::Conv2dInputGradient { stride, padding } => {
            let (output_gradient, kernel) = (args[0], args[1]);
            let (stride, padding) = (*stride, *padding);
            let mut out = Vec::new();
            if is_active(output_gradient) {
                let ty = builder.ty(output_gradient);
                out.push((output_gradient, builder.push(Op::Conv2d { stride, padding }, vec![g, kernel], ty)));
            }
            if is_active(kernel) {
                let ty = builder.ty(kernel);
                out.push((
                    kernel,
                    builder.push(Op::Conv2dKernelGradient { stride, padding }, vec![g, output_gradient], ty),
                ));
            }
            out
        }
        Op::Conv2dKernelGradient { stride, padding } => {
            let (input, output_gradient) = (args[0], args[1]);
            let (stride, padding) = (*stride, *padding);
            let mut out = Vec::new();
            if is_active(input) {
                let ty = builder.ty(input);
                out.push((
                    input,
                    builder.push(Op::Conv2dInputGradient { stride, padding }, vec![output_gradient, g], ty),
                ));
            }
            if is_active(output_gradient) {
                let ty = builder.ty(output_gradient);
                out.push((output_gradient, builder.push(Op::Conv2d { stride, padding }, vec![input, g], ty)));
            }
            out
        }
        Op::Cast => {
            let operand_dtype = builder.ty(args[0]).dtype;
            if operand_dtype == DType::I32 {
                Vec::new()
            } else {
                vec![(args[0], builder.cast_to(g, operand_dtype))]
            }
        }
    }
}

/// The elementwise derivative `f'(x)` of a unary op (`y` is `f(x)`), or `None` where it is zero.
pub fn unary_derivative(builder: &mut Builder, op: UnaryOp, x: ValueId, y: ValueId) -> Option<ValueId> {
    Some(match op {
        UnaryOp::Neg => builder.constant_like(-1.0, x),
        UnaryOp::Sin => builder.unary(UnaryOp::Cos, x),
        UnaryOp::Cos => {
            let sine = builder.unary(UnaryOp::Sin, x);
            builder.neg(sine)
        }
        UnaryOp::Tanh => {
            let one = builder.constant_like(1.0, y);
            let square = builder.mul(y, y);
            builder.sub(one, square)
        }
        UnaryOp::Exp => y,
        UnaryOp::Log => {
            let one = builder.constant_like(1.0, x);
            builder.div(one, x)
        }
        UnaryOp::Sqrt => {
            let half = builder.constant_like(0.5, y);
            builder.div(half, y)
        }
        UnaryOp::Abs => builder.unary(UnaryOp::Sign, x),
        UnaryOp::Sign => return None,
        UnaryOp::Relu => {
            let zero = builder.constant_like(0.0, x);
            builder.binary(BinaryOp::Greater, x, zero)
        }
        UnaryOp::Sigmoid => {
            let one = builder.constant_like(1.0, y);
            let complement = builder.sub(one, y);
            builder.mul(y, complement)
        }
        UnaryOp::Softplus => builder.unary(UnaryOp::Sigmoid, x),
    })
}

/// The product of all but the last dimension (known sizes multiply; otherwise the single symbol).
fn fold_leading(shape: &[Dim]) -> Dim {
    let leading = &shape[..shape.len() - 1];
    if leading.len() == 1 {
        return leading[0].clone();
    }
    let mut product = 1i64;
    for dim in leading {
        match dim {
            Dim::Known(size) => product *= size,
            Dim::Symbol(_) => return dim.clone(),
        }
    }
    Dim::Known(product)
}

/// The transpose of `Broadcast { dims }`: sums the cotangent over every broadcast axis and
/// reshapes it to the operand's shape.
pub fn unbroadcast(builder: &mut Builder, g: ValueId, operand: ValueId, dims: &[usize]) -> ValueId {
    let operand_ty = builder.ty(operand);
    let result_ty = builder.ty(g);
    let mut axes: Vec<usize> = (0..result_ty.rank()).filter(|axis| !dims.contains(axis)).collect();
    for (operand_axis, &result_axis) in dims.iter().enumerate() {
        if operand_ty.shape[operand_axis] == Dim::Known(1) && result_ty.shape[result_axis] != Dim::Known(1) {
            axes.push(result_axis);
        }
    }
    axes.sort_unstable();
    let summed = builder.reduce(g, ReduceOp::Sum, axes);
    builder.reshape(summed, operand_ty.shape)
}

/// Broadcasts a value that lost `axes` by a reduction back to the shape of `like`.
pub fn rebroadcast(builder: &mut Builder, value: ValueId, like: ValueId, axes: &[usize]) -> ValueId {
    let like_ty = builder.ty(like);
    let dims: Vec<usize> = (0..like_ty.rank()).filter(|axis| !axes.contains(axis)).collect();
    builder.broadcast(value, dims, like_ty.shape)
}
