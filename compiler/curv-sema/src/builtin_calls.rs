//! Lowering of builtin function calls to primitive ops.

use crate::check::Checker;
use crate::diagnostic::Diagnostic;
use crate::lower::{shape_text, Scope, Val};
use curv_grammar::ast::{self, Expr};
use curv_grammar::Span;
use curv_ir::{BinaryOp, DType, Dim, Function, Op, ReduceOp, TensorType, UnaryOp, ValueId};

pub fn lower_builtin(
    checker: &mut Checker,
    scope: &mut dyn Scope,
    call: &ast::Call,
    positional: &[&Expr],
    named: &[(&ast::Ident, &Expr)],
    function: &mut Function,
) -> Option<Val> {
    let name = call.name.name.as_str();
    let span = call.span;
    // Arguments that are not tensors (axes, shapes, options) are evaluated by each case.
    let tensor_count = match name {
        "sum" | "mean" | "amax" | "argmax" | "softmax" | "log_softmax" | "layer_norm" | "reshape" | "transpose"
        | "one_hot" => 1,
        "conv2d" => 2,
        _ => positional.len(),
    };
    let mut args: Vec<Val> = Vec::new();
    let mut failed = false;
    for expr in positional.iter().take(tensor_count) {
        match checker.lower_expr(scope, expr, function) {
            Some(value) => args.push(value),
            None => failed = true,
        }
    }
    if failed {
        return None;
    }
    let option = |key: &str, index: usize| -> Option<&Expr> {
        named
            .iter()
            .find(|(ident, _)| ident.name == key)
            .map(|(_, expr)| *expr)
            .or_else(|| positional.get(index).copied())
    };
    let arg_span = |index: usize| positional.get(index).map(|expr| expr.span()).unwrap_or(span);
    match name {
        "sin" => checker.unary(function, UnaryOp::Sin, args[0], span),
        "cos" => checker.unary(function, UnaryOp::Cos, args[0], span),
        "tanh" => checker.unary(function, UnaryOp::Tanh, args[0], span),
        "exp" => checker.unary(function, UnaryOp::Exp, args[0], span),
        "log" => checker.unary(function, UnaryOp::Log, args[0], span),
        "sqrt" => checker.unary(function, UnaryOp::Sqrt, args[0], span),
        "abs" => checker.unary(function, UnaryOp::Abs, args[0], span),
        "sign" => checker.unary(function, UnaryOp::Sign, args[0], span),
        "relu" => checker.unary(function, UnaryOp::Relu, args[0], span),
        "sigmoid" => checker.unary(function, UnaryOp::Sigmoid, args[0], span),
        "softplus" => checker.unary(function, UnaryOp::Softplus, args[0], span),
        "square" => checker.elementwise(function, BinaryOp::Mul, args[0], args[0], span),
        "gelu" => gelu(checker, function, args[0], span),
        "max" => checker.elementwise(function, BinaryOp::Max, args[0], args[1], span),
        "min" => checker.elementwise(function, BinaryOp::Min, args[0], args[1], span),
        "clip" => {
            let (low, high) = if args.len() == 3 {
                (args[1], args[2])
            } else {
                let negated = match args[1] {
                    Val::Literal(value) => Val::Literal(-value),
                    Val::Value(_) => checker.unary(function, UnaryOp::Neg, args[1], span)?,
                };
                (negated, args[1])
            };
            let lower_bounded = checker.elementwise(function, BinaryOp::Max, args[0], low, span)?;
            checker.elementwise(function, BinaryOp::Min, lower_bounded, high, span)
        }
        "sum" | "mean" | "amax" | "argmax" => {
            let value = tensor(checker, function, args[0], arg_span(0), name)?;
            let ty = function.ty(value).clone();
            let axes: Vec<usize> = match option("axis", 1) {
                Some(expr) => vec![axis(checker, scope, function, expr, ty.rank())?],
                None if name == "argmax" => {
                    vec![ty.rank().checked_sub(1).or_else(|| rank_error(checker, arg_span(0), name, &ty))?]
                }
                None => (0..ty.rank()).collect(),
            };
            match name {
                "sum" => Some(Val::Value(reduce(function, value, ReduceOp::Sum, &axes, span))),
                "amax" => Some(Val::Value(reduce(function, value, ReduceOp::Max, &axes, span))),
                "argmax" => {
                    let shape = removed(&ty.shape, &axes);
                    Some(Val::Value(function.push(
                        Op::ArgMax { axis: axes[0] },
                        vec![value],
                        TensorType { dtype: DType::I32, shape },
                        span,
                    )))
                }
                _ => {
                    let summed = reduce(function, value, ReduceOp::Sum, &axes, span);
                    let count = match element_count_of_axes(&ty.shape, &axes) {
                        Some(count) => Val::Literal(count as f64),
                        None => {
                            let ty = TensorType::scalar(ty.dtype);
                            Val::Value(function.push(Op::Count { axes: axes.clone() }, vec![value], ty, span))
                        }
                    };
                    checker.elementwise(function, BinaryOp::Div, Val::Value(summed), count, span)
                }
            }
        }
        "softmax" | "log_softmax" => {
            let value = float_tensor(checker, function, args[0], arg_span(0), name)?;
            let rank = function.ty(value).rank();
            let axis = match option("axis", 1) {
                Some(expr) => axis(checker, scope, function, expr, rank)?,
                None => rank
                    .checked_sub(1)
                    .or_else(|| rank_error(checker, arg_span(0), name, &function.ty(value).clone()))?,
            };
            Some(Val::Value(softmax(function, value, axis, name == "log_softmax", span)))
        }
        "layer_norm" => {
            let value = float_tensor(checker, function, args[0], arg_span(0), name)?;
            let eps = match option("eps", 1) {
                Some(expr) => constant(checker, scope, function, expr)?,
                None => 1e-5,
            };
            let ty = function.ty(value).clone();
            let Some(last) = ty.rank().checked_sub(1) else {
                return rank_error(checker, arg_span(0), name, &ty);
            };
            let Dim::Known(width) = ty.shape[last] else {
                checker.emit(Diagnostic::error(
                    "E0206",
                    arg_span(0),
                    "`layer_norm` over a symbolic last dimension",
                    "its size must be known",
                ));
                return None;
            };
            let mean = reduce(function, value, ReduceOp::Sum, &[last], span);
            let mean = scale(function, mean, 1.0 / width as f64, span);
            let mean = broadcast_along(function, mean, &ty.shape, last, span);
            let centred = binary(function, BinaryOp::Sub, value, mean, span);
            let squared = binary(function, BinaryOp::Mul, centred, centred, span);
            let variance = reduce(function, squared, ReduceOp::Sum, &[last], span);
            let variance = scale(function, variance, 1.0 / width as f64, span);
            let eps_value = function.push(Op::Constant { value: eps }, vec![], function.ty(variance).clone(), span);
            let shifted = binary(function, BinaryOp::Add, variance, eps_value, span);
            let deviation = function.push(Op::Unary(UnaryOp::Sqrt), vec![shifted], function.ty(shifted).clone(), span);
            let deviation = broadcast_along(function, deviation, &ty.shape, last, span);
            Some(Val::Value(binary(function, BinaryOp::Div, centred, deviation, span)))
        }
        "reshape" => {
            let value = tensor(checker, function, args[0], arg_span(0), name)?;
            let ty = function.ty(value).clone();
            let Some(Expr::List(items, list_span)) = positional.get(1).copied() else {
                checker.emit(Diagnostic::error(
                    "E0112",
                    arg_span(1),
                    "`reshape` needs a shape list such as `[B, 64]`",
                    "expected a list",
                ));
                return None;
            };
            let mut shape = Vec::new();
            for item in items {
                shape.push(dimension(checker, scope, function, item)?);
            }
            if !same_element_count(&ty.shape, &shape) {
                checker.emit(Diagnostic::error(
                    "E0201",
                    *list_span,
                    format!("cannot reshape {ty} to {}", shape_text(&shape)),
                    "the number of elements differs",
                ));
                return None;
            }
            Some(Val::Value(function.push(Op::Reshape, vec![value], TensorType { dtype: ty.dtype, shape }, span)))
        }
        "transpose" => {
            let value = tensor(checker, function, args[0], arg_span(0), name)?;
            let ty = function.ty(value).clone();
            let permutation: Vec<usize> = match positional.get(1).copied() {
                Some(Expr::List(items, list_span)) => {
                    let mut permutation = Vec::new();
                    for item in items {
                        permutation.push(axis(checker, scope, function, item, ty.rank())?);
                    }
                    let mut sorted = permutation.clone();
                    sorted.sort_unstable();
                    if sorted != (0..ty.rank()).collect::<Vec<_>>() {
                        checker.emit(Diagnostic::error(
                            "E0206",
                            *list_span,
                            format!("not a permutation of the {} axes of {ty}", ty.rank()),
                            "invalid permutation",
                        ));
                        return None;
                    }
                    permutation
                }
                Some(other) => {
                    checker.emit(Diagnostic::error(
                        "E0112",
                        other.span(),
                        "`transpose` takes a permutation list",
                        "expected a list such as `[1, 0]`",
                    ));
                    return None;
                }
                None => {
                    if ty.rank() < 2 {
                        return rank_error(checker, arg_span(0), name, &ty);
                    }
                    let mut permutation: Vec<usize> = (0..ty.rank()).collect();
                    permutation.swap(ty.rank() - 2, ty.rank() - 1);
                    permutation
                }
            };
            let shape = permutation.iter().map(|&axis| ty.shape[axis].clone()).collect();
            Some(Val::Value(function.push(
                Op::Transpose { permutation },
                vec![value],
                TensorType { dtype: ty.dtype, shape },
                span,
            )))
        }
        "embedding" => {
            let table = float_tensor(checker, function, args[0], arg_span(0), name)?;
            let ids = tensor(checker, function, args[1], arg_span(1), name)?;
            let table_ty = function.ty(table).clone();
            let ids_ty = function.ty(ids).clone();
            if table_ty.rank() != 2 {
                checker.emit(Diagnostic::error(
                    "E0204",
                    arg_span(0),
                    format!("an embedding table must have rank 2, found {table_ty}"),
                    "expected [vocabulary, width]",
                ));
                return None;
            }
            if ids_ty.dtype != DType::I32 {
                checker.emit(Diagnostic::error(
                    "E0203",
                    arg_span(1),
                    format!("embedding indices must be i32, found {ids_ty}"),
                    "expected integer indices",
                ));
                return None;
            }
            let mut shape = ids_ty.shape.clone();
            shape.push(table_ty.shape[1].clone());
            Some(Val::Value(function.push(
                Op::Gather,
                vec![table, ids],
                TensorType { dtype: table_ty.dtype, shape },
                span,
            )))
        }
        "conv2d" => {
            let input = float_tensor(checker, function, args[0], arg_span(0), name)?;
            let kernel = float_tensor(checker, function, args[1], arg_span(1), name)?;
            let stride = match option("stride", 2) {
                Some(expr) => checker.constant_int(scope, expr, function)?,
                None => 1,
            };
            let padding = match option("padding", 3) {
                Some(expr) => checker.constant_int(scope, expr, function)?,
                None => 0,
            };
            conv2d(checker, function, input, kernel, stride, padding, arg_span(0), arg_span(1), span)
        }
        "causal_mask" => {
            let value = tensor(checker, function, args[0], arg_span(0), name)?;
            let ty = function.ty(value).clone();
            if ty.rank() < 2 || ty.shape[ty.rank() - 1] != ty.shape[ty.rank() - 2] {
                checker.emit(Diagnostic::error(
                    "E0204",
                    arg_span(0),
                    format!("`causal_mask` needs square trailing dimensions, found {ty}"),
                    "expected [..., T, T]",
                ));
                return None;
            }
            Some(Val::Value(function.push(Op::CausalMask, vec![], ty, span)))
        }
        "one_hot" => {
            let labels = tensor(checker, function, args[0], arg_span(0), name)?;
            let classes = checker.constant_int(scope, positional[1], function)?;
            if classes <= 0 {
                checker.emit(Diagnostic::error(
                    "E0304",
                    arg_span(1),
                    "the number of classes must be positive",
                    "not positive",
                ));
                return None;
            }
            Some(Val::Value(one_hot(checker, function, labels, classes, arg_span(0), span)?))
        }
        "cross_entropy" => {
            let logits = float_tensor(checker, function, args[0], arg_span(0), name)?;
            let labels = tensor(checker, function, args[1], arg_span(1), name)?;
            cross_entropy(checker, function, logits, labels, arg_span(0), arg_span(1), span)
        }
        "mse" => {
            // Integer class labels as targets are the usual mistake here, so a dtype mismatch gets
            // its own message rather than the one of the internal subtraction.
            if let (Val::Value(prediction), Val::Value(target)) = (args[0], args[1]) {
                let prediction_ty = function.ty(prediction).clone();
                let target_ty = function.ty(target).clone();
                if prediction_ty.dtype != target_ty.dtype {
                    let mut diagnostic = Diagnostic::error(
                        "E0203",
                        arg_span(1),
                        format!(
                            "`mse` of {prediction_ty} predictions and {target_ty} targets: the element types differ"
                        ),
                        format!("this is {target_ty}"),
                    )
                    .with_label(arg_span(0), format!("this is {prediction_ty}"));
                    diagnostic = if target_ty.dtype == DType::I32 {
                        diagnostic.with_help("i32 targets are class labels: use `cross_entropy` to classify them")
                    } else {
                        diagnostic.with_help("curv never converts element types implicitly")
                    };
                    checker.emit(diagnostic);
                    return None;
                }
            }
            let difference = checker.elementwise(function, BinaryOp::Sub, args[0], args[1], span)?;
            let Val::Value(difference) = difference else {
                checker.emit(Diagnostic::error("E0204", span, "`mse` of two numbers", "expected tensors"));
                return None;
            };
            let squared = binary(function, BinaryOp::Mul, difference, difference, span);
            let ty = function.ty(squared).clone();
            let axes: Vec<usize> = (0..ty.rank()).collect();
            let total = reduce(function, squared, ReduceOp::Sum, &axes, span);
            Some(Val::Value(mean_of_total(function, total, squared, &axes, 1.0, span)))
        }
        "zeros_like" | "ones_like" => {
            let value = tensor(checker, function, args[0], arg_span(0), name)?;
            let ty = function.ty(value).clone();
            let fill = if name == "zeros_like" { 0.0 } else { 1.0 };
            Some(Val::Value(function.push(Op::Constant { value: fill }, vec![], ty, span)))
        }
        "hutchinson" | "sampled_grad" => {
            let value = float_tensor(checker, function, args[0], arg_span(0), name)?;
            let probe = match option("probe", 1) {
                Some(Expr::Name(ident)) if ident.name == "rademacher" || ident.name == "gaussian" => ident.name.clone(),
                Some(other) => {
                    checker.emit(Diagnostic::error(
                        "E0112",
                        other.span(),
                        "`probe` must be `rademacher` or `gaussian`",
                        "invalid probe",
                    ));
                    return None;
                }
                None => "rademacher".to_string(),
            };
            let kind = if name == "hutchinson" { format!("hutchinson({probe})") } else { name.to_string() };
            let ty = function.ty(value).clone();
            Some(Val::Value(function.push(Op::Statistic { kind }, vec![value], ty, span)))
        }
        _ => {
            checker.emit(Diagnostic::error(
                "E0102",
                call.name.span,
                format!("unknown function `{name}`"),
                "not a builtin",
            ));
            None
        }
    }
}

fn rank_error<T>(checker: &mut Checker, span: Span, name: &str, ty: &TensorType) -> Option<T> {
    checker.emit(Diagnostic::error(
        "E0204",
        span,
        format!("`{name}` needs a tensor of higher rank, found {ty}"),
        "rank too low",
    ));
    None
}

fn tensor(checker: &mut Checker, function: &mut Function, value: Val, span: Span, name: &str) -> Option<ValueId> {
    match value {
        Val::Value(id) => Some(id),
        Val::Literal(_) => {
            checker.emit(Diagnostic::error(
                "E0204",
                span,
                format!("`{name}` needs a tensor, found a number"),
                "a number",
            ));
            let _ = function;
            None
        }
    }
}

fn float_tensor(checker: &mut Checker, function: &mut Function, value: Val, span: Span, name: &str) -> Option<ValueId> {
    let id = tensor(checker, function, value, span, name)?;
    let ty = function.ty(id);
    if !ty.dtype.is_float() {
        let message = format!("`{name}` needs a float tensor, found {ty}");
        checker.emit(
            Diagnostic::error("E0203", span, message, "integer tensor")
                .with_help("labels and indices are i32; only losses and `embedding` take them"),
        );
        return None;
    }
    Some(id)
}

fn constant(checker: &mut Checker, scope: &mut dyn Scope, function: &mut Function, expr: &Expr) -> Option<f64> {
    match checker.lower_expr(scope, expr, function)? {
        Val::Literal(value) => Some(value),
        Val::Value(_) => {
            checker.emit(Diagnostic::error("E0112", expr.span(), "expected a number", "not a constant"));
            None
        }
    }
}

fn axis(
    checker: &mut Checker,
    scope: &mut dyn Scope,
    function: &mut Function,
    expr: &Expr,
    rank: usize,
) -> Option<usize> {
    let value = checker.constant_int(scope, expr, function)?;
    let resolved = if value < 0 { value + rank as i64 } else { value };
    if resolved < 0 || resolved >= rank as i64 {
        checker.emit(Diagnostic::error(
            "E0206",
            expr.span(),
            format!("axis {value} is out of range for rank {rank}"),
            "invalid axis",
        ));
        return None;
    }
    Some(resolved as usize)
}

fn dimension(checker: &mut Checker, scope: &mut dyn Scope, function: &mut Function, expr: &Expr) -> Option<Dim> {
    if let Expr::Name(ident) = expr {
        if let Some(dim) = checker.symbol_dim(&ident.name) {
            return Some(dim);
        }
    }
    let value = checker.constant_int(scope, expr, function)?;
    if value <= 0 {
        checker.emit(Diagnostic::error("E0304", expr.span(), "dimensions must be positive", "not positive"));
        return None;
    }
    Some(Dim::Known(value))
}

fn same_element_count(left: &[Dim], right: &[Dim]) -> bool {
    let split = |shape: &[Dim]| {
        let mut known = 1i64;
        let mut symbols: Vec<String> = Vec::new();
        for dim in shape {
            match dim {
                Dim::Known(size) => known = known.saturating_mul(*size),
                Dim::Symbol(name) => symbols.push(name.clone()),
            }
        }
        symbols.sort();
        (known, symbols)
    };
    split(left) == split(right)
}

fn removed(shape: &[Dim], axes: &[usize]) -> Vec<Dim> {
    shape.iter().enumerate().filter(|(axis, _)| !axes.contains(axis)).map(|(_, dim)| dim.clone()).collect()
}

fn element_count_of_axes(shape: &[Dim], axes: &[usize]) -> Option<i64> {
    axes.iter()
        .map(|&axis| match shape[axis] {
            Dim::Known(size) => Some(size),
            Dim::Symbol(_) => None,
        })
        .product()
}

pub fn reduce(function: &mut Function, value: ValueId, op: ReduceOp, axes: &[usize], span: Span) -> ValueId {
    let ty = function.ty(value).clone();
    let shape = removed(&ty.shape, axes);
    function.push(Op::Reduce { op, axes: axes.to_vec() }, vec![value], TensorType { dtype: ty.dtype, shape }, span)
}

fn binary(function: &mut Function, op: BinaryOp, left: ValueId, right: ValueId, span: Span) -> ValueId {
    let ty = function.ty(left).clone();
    function.push(Op::Binary(op), vec![left, right], ty, span)
}

fn scale(function: &mut Function, value: ValueId, factor: f64, span: Span) -> ValueId {
    let ty = function.ty(value).clone();
    let constant = function.push(Op::Constant { value: factor }, vec![], ty, span);
    binary(function, BinaryOp::Mul, value, constant, span)
}

/// `sign * total / count`, where `count` is the number of elements of `of` along `axes`: a
/// constant when those sizes are known, else an `Op::Count` evaluated at run time.
fn mean_of_total(
    function: &mut Function,
    total: ValueId,
    of: ValueId,
    axes: &[usize],
    sign: f64,
    span: Span,
) -> ValueId {
    let ty = function.ty(of).clone();
    match element_count_of_axes(&ty.shape, axes) {
        Some(count) => scale(function, total, sign / count as f64, span),
        None => {
            let count = function.push(Op::Count { axes: axes.to_vec() }, vec![of], TensorType::scalar(ty.dtype), span);
            let signed = scale(function, total, sign, span);
            binary(function, BinaryOp::Div, signed, count, span)
        }
    }
}

/// Broadcasts a value that lost axis `axis` back to `shape`.
fn broadcast_along(function: &mut Function, value: ValueId, shape: &[Dim], axis: usize, span: Span) -> ValueId {
    let dtype = function.ty(value).dtype;
    let dims = (0..shape.len()).filter(|&result_axis| result_axis != axis).collect();
    function.push(Op::Broadcast { dims }, vec![value], TensorType { dtype, shape: shape.to_vec() }, span)
}

/// Numerically stable softmax or log-softmax along `axis`.
fn softmax(function: &mut Function, value: ValueId, axis: usize, log: bool, span: Span) -> ValueId {
    let ty = function.ty(value).clone();
    let maximum = reduce(function, value, ReduceOp::Max, &[axis], span);
    let maximum = broadcast_along(function, maximum, &ty.shape, axis, span);
    let shifted = binary(function, BinaryOp::Sub, value, maximum, span);
    let exponentials = function.push(Op::Unary(UnaryOp::Exp), vec![shifted], ty.clone(), span);
    let total = reduce(function, exponentials, ReduceOp::Sum, &[axis], span);
    if log {
        let log_total = function.push(Op::Unary(UnaryOp::Log), vec![total], function.ty(total).clone(), span);
        let log_total = broadcast_along(function, log_total, &ty.shape, axis, span);
        binary(function, BinaryOp::Sub, shifted, log_total, span)
    } else {
        let total = broadcast_along(function, total, &ty.shape, axis, span);
        binary(function, BinaryOp::Div, exponentials, total, span)
    }
}

/// GELU, tanh approximation: 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3))).
fn gelu(checker: &mut Checker, function: &mut Function, value: Val, span: Span) -> Option<Val> {
    let cube = checker.elementwise(function, BinaryOp::Pow, value, Val::Literal(3.0), span)?;
    let scaled_cube = checker.elementwise(function, BinaryOp::Mul, cube, Val::Literal(0.044715), span)?;
    let inner = checker.elementwise(function, BinaryOp::Add, value, scaled_cube, span)?;
    let inner =
        checker.elementwise(function, BinaryOp::Mul, inner, Val::Literal((2.0 / std::f64::consts::PI).sqrt()), span)?;
    let tanh = checker.unary(function, UnaryOp::Tanh, inner, span)?;
    let one_plus = checker.elementwise(function, BinaryOp::Add, tanh, Val::Literal(1.0), span)?;
    let half = checker.elementwise(function, BinaryOp::Mul, value, Val::Literal(0.5), span)?;
    checker.elementwise(function, BinaryOp::Mul, half, one_plus, span)
}

fn one_hot(
    checker: &mut Checker,
    function: &mut Function,
    labels: ValueId,
    classes: i64,
    labels_span: Span,
    span: Span,
) -> Option<ValueId> {
    let ty = function.ty(labels).clone();
    if ty.dtype != DType::I32 {
        checker.emit(Diagnostic::error(
            "E0203",
            labels_span,
            format!("class labels must be i32, found {ty}"),
            "expected integer labels",
        ));
        return None;
    }
    let mut shape = ty.shape.clone();
    shape.push(Dim::Known(classes));
    Some(function.push(Op::OneHot { classes }, vec![labels], TensorType { dtype: DType::F32, shape }, span))
}

/// Mean cross-entropy of `logits [..., K]` against integer `labels [...]`.
fn cross_entropy(
    checker: &mut Checker,
    function: &mut Function,
    logits: ValueId,
    labels: ValueId,
    logits_span: Span,
    labels_span: Span,
    span: Span,
) -> Option<Val> {
    let logits_ty = function.ty(logits).clone();
    let labels_ty = function.ty(labels).clone();
    if labels_ty.dtype != DType::I32 {
        checker.emit(
            Diagnostic::error(
                "E0203",
                labels_span,
                format!("`cross_entropy` takes i32 class labels, found {labels_ty}"),
                "expected i32 labels",
            )
            .with_help("use `mse` for real-valued targets"),
        );
        return None;
    }
    let Some(class_axis) = logits_ty.rank().checked_sub(1) else {
        return rank_error(checker, logits_span, "cross_entropy", &logits_ty);
    };
    if logits_ty.shape[..class_axis] != labels_ty.shape[..] {
        checker.emit(
            Diagnostic::error(
                "E0201",
                span,
                format!("`cross_entropy` of logits {logits_ty} and labels {labels_ty}"),
                "labels must have the logits' shape without the class dimension",
            )
            .with_label(logits_span, format!("this is {logits_ty}"))
            .with_label(labels_span, format!("this is {labels_ty}")),
        );
        return None;
    }
    let Dim::Known(classes) = logits_ty.shape[class_axis] else {
        checker.emit(Diagnostic::error(
            "E0206",
            logits_span,
            "the number of classes must be known",
            "symbolic class dimension",
        ));
        return None;
    };
    let log_probabilities = softmax(function, logits, class_axis, true, span);
    let mut one_hot_labels = one_hot(checker, function, labels, classes, labels_span, span)?;
    if logits_ty.dtype != DType::F32 {
        let ty = TensorType { dtype: logits_ty.dtype, shape: logits_ty.shape.clone() };
        one_hot_labels = function.push(Op::Cast, vec![one_hot_labels], ty, span);
    }
    let picked = binary(function, BinaryOp::Mul, log_probabilities, one_hot_labels, span);
    let axes: Vec<usize> = (0..logits_ty.rank()).collect();
    let total = reduce(function, picked, ReduceOp::Sum, &axes, span);
    let batch_axes: Vec<usize> = (0..class_axis).collect();
    Some(Val::Value(mean_of_total(function, total, logits, &batch_axes, -1.0, span)))
}

#[allow(clippy::too_many_arguments)]
fn conv2d(
    checker: &mut Checker,
    function: &mut Function,
    input: ValueId,
    kernel: ValueId,
    stride: i64,
    padding: i64,
    input_span: Span,
    kernel_span: Span,
    span: Span,
) -> Option<Val> {
    let input_ty = function.ty(input).clone();
    let kernel_ty = function.ty(kernel).clone();
    if input_ty.rank() != 4 || kernel_ty.rank() != 4 {
        checker.emit(
            Diagnostic::error(
                "E0204",
                span,
                format!("`conv2d` takes an NCHW input and an OIHW kernel, found {input_ty} and {kernel_ty}"),
                "both must have rank 4",
            )
            .with_label(input_span, format!("this is {input_ty}"))
            .with_label(kernel_span, format!("this is {kernel_ty}")),
        );
        return None;
    }
    if stride <= 0 || padding < 0 {
        checker.emit(Diagnostic::error(
            "E0304",
            span,
            "`conv2d` needs stride >= 1 and padding >= 0",
            "invalid stride or padding",
        ));
        return None;
    }
    if input_ty.shape[1] != kernel_ty.shape[1] {
        checker.emit(Diagnostic::error(
            "E0200",
            span,
            format!(
                "`conv2d` input channels {} differ from kernel input channels {}",
                input_ty.shape[1], kernel_ty.shape[1]
            ),
            "channel mismatch",
        ));
        return None;
    }
    let output_size = |size: &Dim, kernel_size: &Dim| -> Option<Dim> {
        match (size, kernel_size) {
            (Dim::Known(size), Dim::Known(kernel_size)) => {
                let out = (size + 2 * padding - kernel_size) / stride + 1;
                (out > 0).then_some(Dim::Known(out))
            }
            _ => None,
        }
    };
    let (Some(height), Some(width)) =
        (output_size(&input_ty.shape[2], &kernel_ty.shape[2]), output_size(&input_ty.shape[3], &kernel_ty.shape[3]))
    else {
        checker.emit(Diagnostic::error(
            "E0206",
            span,
            "`conv2d` spatial sizes must be known and at least the kernel size",
            "invalid spatial size",
        ));
        return None;
    };
    let shape = vec![input_ty.shape[0].clone(), kernel_ty.shape[0].clone(), height, width];
    Some(Val::Value(function.push(
        Op::Conv2d { stride, padding },
        vec![input, kernel],
        TensorType { dtype: input_ty.dtype, shape },
        span,
    )))
}
