//! The expression engine shared by model bodies, losses, train blocks and rules: it resolves
//! names through a [`Scope`], checks dtypes and symbolic shapes, and emits primitive IR ops.
//! Composite functions (softmax, cross-entropy, layer norm, ...) are decomposed here.

use crate::builtins;
use crate::check::Checker;
use crate::diagnostic::Diagnostic;
use crate::suggest::closest;
use curv_grammar::ast::{self, Arg, Expr};
use curv_grammar::Span;
use curv_ir::{BinaryOp, DType, Dim, Function, Op, TensorType, UnaryOp, ValueId};

/// A lowered expression: an IR value, or a number literal not yet given a type.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Val {
    Value(ValueId),
    Literal(f64),
}

/// Where names, fields and non-builtin calls are looked up.
pub trait Scope {
    /// Resolves a bare name. `None` means "not found here" (the engine reports it).
    fn name(&mut self, checker: &mut Checker, ident: &ast::Ident, function: &mut Function) -> Option<Lookup>;
    /// Resolves `base.field` where `base` is a bare name. `None` means not handled.
    fn field(
        &mut self,
        checker: &mut Checker,
        base: &ast::Ident,
        field: &ast::Ident,
        function: &mut Function,
    ) -> Option<Lookup>;
    /// Lowers a call to something that is not a builtin (a model or a loss). `None` = not handled.
    fn call(&mut self, checker: &mut Checker, call: &ast::Call, function: &mut Function) -> Option<Lookup>;
    /// Names visible here, for suggestions.
    fn visible_names(&self) -> Vec<String>;
    /// Whether statistic functions (`hutchinson`, `sampled_grad`) are allowed.
    fn allows_statistics(&self) -> bool {
        false
    }
}

/// The answer of a scope: a value, or "an error was already reported".
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Lookup {
    Found(Val),
    Failed,
}

pub fn shape_text(shape: &[Dim]) -> String {
    let dims: Vec<String> = shape.iter().map(|dim| dim.to_string()).collect();
    format!("[{}]", dims.join(", "))
}

/// The stack lowering an expression keeps in reserve, and the size of each segment added when less
/// is left (see `Checker::lower_expr`).
const RED_ZONE: usize = 128 * 1024;
const STACK_SEGMENT: usize = 4 * 1024 * 1024;

impl Checker<'_> {
    pub fn lower_expr(&mut self, scope: &mut dyn Scope, expr: &Expr, function: &mut Function) -> Option<Val> {
        // Expressions nest up to `curv_grammar::nesting::NESTING_LIMIT` levels, and a level of
        // a call costs several frames: with less than this left, the rest runs on a new stack
        // segment, so checking never overflows whatever thread it runs on.
        let result = stacker::maybe_grow(RED_ZONE, STACK_SEGMENT, || self.lower_expr_inner(scope, expr, function));
        if let Some(Val::Value(id)) = result {
            self.expression_values.insert(expr.span(), id);
        }
        result
    }

    fn lower_expr_inner(&mut self, scope: &mut dyn Scope, expr: &Expr, function: &mut Function) -> Option<Val> {
        match expr {
            Expr::Int(value, _) => Some(Val::Literal(*value as f64)),
            Expr::Float(value, _) => Some(Val::Literal(*value)),
            Expr::Error(_) => None,
            Expr::Str(_, span) => {
                self.emit(Diagnostic::error(
                    "E0112",
                    *span,
                    "a string is not a tensor",
                    "strings are only allowed as paths and option values",
                ));
                None
            }
            Expr::List(_, span) => {
                self.emit(Diagnostic::error(
                    "E0112",
                    *span,
                    "a list is not a tensor",
                    "lists are only allowed as shapes and permutations",
                ));
                None
            }
            Expr::Name(ident) => match scope.name(self, ident, function) {
                Some(Lookup::Found(value)) => Some(value),
                Some(Lookup::Failed) => None,
                None => {
                    self.report_undefined(ident, &scope.visible_names());
                    None
                }
            },
            Expr::Field(base, field, span) => {
                let Expr::Name(base_ident) = base.as_ref() else {
                    self.emit(Diagnostic::error("E0105", *span, "fields exist only on data sets", "not a data set"));
                    return None;
                };
                match scope.field(self, base_ident, field, function) {
                    Some(Lookup::Found(value)) => Some(value),
                    Some(Lookup::Failed) => None,
                    None => {
                        let visible = scope.visible_names();
                        let known = visible.contains(&base_ident.name)
                            || self.dims.contains_key(&base_ident.name)
                            || self.models.contains_key(&base_ident.name)
                            || self.losses.contains_key(&base_ident.name);
                        if !known {
                            // Most likely a misspelt data set: say so, rather than that it has no fields.
                            let mut candidates: Vec<String> = self.data.keys().cloned().collect();
                            candidates.extend(visible);
                            self.report_undefined(base_ident, &candidates);
                            return None;
                        }
                        self.emit(Diagnostic::error(
                            "E0105",
                            *span,
                            format!("`{}` has no fields", base_ident.name),
                            "fields exist only on data sets",
                        ));
                        None
                    }
                }
            }
            Expr::Neg(inner, span) => match self.lower_expr(scope, inner, function)? {
                Val::Literal(value) => Some(Val::Literal(-value)),
                Val::Value(id) => {
                    let ty = function.ty(id).clone();
                    self.require_float(function, id, *span, "negation")?;
                    Some(Val::Value(function.push(Op::Unary(UnaryOp::Neg), vec![id], ty, *span)))
                }
            },
            Expr::Binary(op, left, right, span) => {
                let left_value = self.lower_expr(scope, left, function);
                let right_value = self.lower_expr(scope, right, function);
                let (left_value, right_value) = (left_value?, right_value?);
                match op {
                    ast::BinaryOp::MatMul => {
                        self.matmul(function, left_value, right_value, left.span(), right.span(), *span)
                    }
                    ast::BinaryOp::Add => self.elementwise(function, BinaryOp::Add, left_value, right_value, *span),
                    ast::BinaryOp::Sub => self.elementwise(function, BinaryOp::Sub, left_value, right_value, *span),
                    ast::BinaryOp::Mul => self.elementwise(function, BinaryOp::Mul, left_value, right_value, *span),
                    ast::BinaryOp::Div => self.elementwise(function, BinaryOp::Div, left_value, right_value, *span),
                    ast::BinaryOp::Pow => self.elementwise(function, BinaryOp::Pow, left_value, right_value, *span),
                }
            }
            Expr::Index(base, indices, span) => {
                let value = self.lower_expr(scope, base, function)?;
                self.index(scope, function, value, indices, *span)
            }
            Expr::Call(call) => self.lower_call(scope, call, function),
        }
    }

    pub fn report_undefined(&mut self, ident: &ast::Ident, visible: &[String]) {
        let mut diagnostic = Diagnostic::error(
            "E0100",
            ident.span,
            format!("cannot find `{}` in this scope", ident.name),
            "not defined",
        );
        if let Some(suggestion) = closest(&ident.name, visible.iter().map(String::as_str)) {
            diagnostic = diagnostic.with_help(format!("a name with a similar spelling exists: `{suggestion}`"));
        }
        self.emit(diagnostic);
    }

    fn require_float(&mut self, function: &Function, value: ValueId, span: Span, what: &str) -> Option<()> {
        let ty = function.ty(value);
        if ty.dtype.is_float() {
            Some(())
        } else {
            self.emit(Diagnostic::error(
                "E0203",
                span,
                format!("{what} needs a float tensor"),
                format!("this is {ty}"),
            ));
            None
        }
    }

    /// Materialises a literal as a constant of `ty`.
    pub fn constant(&mut self, function: &mut Function, value: f64, ty: TensorType, span: Span) -> ValueId {
        function.push(Op::Constant { value }, Vec::new(), ty, span)
    }

    /// Turns a value into an IR value of at least scalar type (literals become f32 scalars).
    pub fn materialize(&mut self, function: &mut Function, value: Val, span: Span) -> ValueId {
        match value {
            Val::Value(id) => id,
            Val::Literal(literal) => self.constant(function, literal, TensorType::scalar(DType::F32), span),
        }
    }

    /// Broadcasts `value` to `shape` (no-op when it already has it).
    pub fn broadcast_to(&mut self, function: &mut Function, value: ValueId, shape: &[Dim], span: Span) -> ValueId {
        let ty = function.ty(value).clone();
        if ty.shape == shape {
            return value;
        }
        let offset = shape.len() - ty.shape.len();
        let dims = (0..ty.shape.len()).map(|axis| axis + offset).collect();
        function.push(Op::Broadcast { dims }, vec![value], TensorType { dtype: ty.dtype, shape: shape.to_vec() }, span)
    }

    /// Elementwise binary op with numpy broadcasting and literal folding.
    pub fn elementwise(
        &mut self,
        function: &mut Function,
        op: BinaryOp,
        left: Val,
        right: Val,
        span: Span,
    ) -> Option<Val> {
        let (left_id, right_id) = match (left, right) {
            (Val::Literal(a), Val::Literal(b)) => return Some(Val::Literal(fold(op, a, b))),
            (Val::Value(id), Val::Literal(literal)) => {
                let ty = function.ty(id).clone();
                (id, self.constant(function, literal, ty, span))
            }
            (Val::Literal(literal), Val::Value(id)) => {
                let ty = function.ty(id).clone();
                (self.constant(function, literal, ty, span), id)
            }
            (Val::Value(a), Val::Value(b)) => (a, b),
        };
        let left_ty = function.ty(left_id).clone();
        let right_ty = function.ty(right_id).clone();
        if left_ty.dtype != right_ty.dtype {
            // The operator as the user writes it (`*`, not the IR's `mul`).
            let operator = match op {
                BinaryOp::Add => "+".to_string(),
                BinaryOp::Sub => "-".to_string(),
                BinaryOp::Mul => "*".to_string(),
                BinaryOp::Div => "/".to_string(),
                BinaryOp::Pow => "^".to_string(),
                other => other.name().to_string(),
            };
            let mut diagnostic = Diagnostic::error(
                "E0203",
                span,
                format!(
                    "mismatched element types in `{operator}`: {} and {}",
                    left_ty.dtype.name(),
                    right_ty.dtype.name()
                ),
                format!("left is {left_ty}, right is {right_ty}"),
            )
            .with_help("curv never converts element types implicitly");
            if left_ty.dtype == DType::I32 || right_ty.dtype == DType::I32 {
                diagnostic = diagnostic.with_note(
                    "i32 tensors hold class labels or indices; `one_hot(labels, classes)` turns labels into floats",
                );
            }
            self.emit(diagnostic);
            return None;
        }
        let shape = match broadcast_shapes(&left_ty.shape, &right_ty.shape) {
            Ok(shape) => shape,
            Err(()) => {
                self.emit(
                    Diagnostic::error(
                        "E0201",
                        span,
                        format!(
                            "shapes {} and {} do not broadcast",
                            shape_text(&left_ty.shape),
                            shape_text(&right_ty.shape)
                        ),
                        format!("left is {left_ty}, right is {right_ty}"),
                    )
                    .with_note("dimensions are compared from the right; each pair must be equal or one of them 1"),
                );
                return None;
            }
        };
        let left_id = self.broadcast_to(function, left_id, &shape, span);
        let right_id = self.broadcast_to(function, right_id, &shape, span);
        let dtype = left_ty.dtype;
        Some(Val::Value(function.push(Op::Binary(op), vec![left_id, right_id], TensorType { dtype, shape }, span)))
    }

    pub fn unary(&mut self, function: &mut Function, op: UnaryOp, value: Val, span: Span) -> Option<Val> {
        match value {
            Val::Literal(literal) => Some(Val::Literal(fold_unary(op, literal))),
            Val::Value(id) => {
                self.require_float(function, id, span, op.name())?;
                let ty = function.ty(id).clone();
                Some(Val::Value(function.push(Op::Unary(op), vec![id], ty, span)))
            }
        }
    }

    fn matmul(
        &mut self,
        function: &mut Function,
        left: Val,
        right: Val,
        left_span: Span,
        right_span: Span,
        span: Span,
    ) -> Option<Val> {
        let (Val::Value(left_id), Val::Value(right_id)) = (left, right) else {
            self.emit(
                Diagnostic::error("E0204", span, "`@` needs two tensors of rank 2 or more", "a number is not a matrix")
                    .with_help("use `*` to scale by a number"),
            );
            return None;
        };
        let left_ty = function.ty(left_id).clone();
        let right_ty = function.ty(right_id).clone();
        for (ty, operand_span) in [(&left_ty, left_span), (&right_ty, right_span)] {
            if ty.rank() < 2 {
                self.emit(
                    Diagnostic::error(
                        "E0204",
                        operand_span,
                        format!("`@` needs operands of rank 2 or more, found {ty}"),
                        format!("this has rank {}", ty.rank()),
                    )
                    .with_help("use `*` with broadcasting for a vector, or reshape it to a matrix"),
                );
                return None;
            }
        }
        if left_ty.dtype != right_ty.dtype || !left_ty.dtype.is_float() {
            self.emit(Diagnostic::error(
                "E0203",
                span,
                format!("`@` of {left_ty} and {right_ty}"),
                "both operands must have the same float type",
            ));
            return None;
        }
        let inner_left = &left_ty.shape[left_ty.rank() - 1];
        let inner_right = &right_ty.shape[right_ty.rank() - 2];
        if inner_left != inner_right {
            self.emit(
                Diagnostic::error(
                    "E0200",
                    span,
                    format!("matrix product of {left_ty} and {right_ty}: inner dimensions {inner_left} and {inner_right} differ"),
                    "the inner dimensions must be equal",
                )
                .with_label(left_span, format!("this is {left_ty}"))
                .with_label(right_span, format!("this is {right_ty}")),
            );
            return None;
        }
        // Batch dimensions: a 2-D right operand applies to every leading index of the left one;
        // otherwise the leading dimensions must be equal.
        let mut shape: Vec<Dim> = left_ty.shape[..left_ty.rank() - 1].to_vec();
        if right_ty.rank() > 2 {
            let left_batch = &left_ty.shape[..left_ty.rank() - 2];
            let right_batch = &right_ty.shape[..right_ty.rank() - 2];
            if left_batch != right_batch {
                self.emit(Diagnostic::error(
                    "E0200",
                    span,
                    format!("batched matrix product of {left_ty} and {right_ty}: batch dimensions differ"),
                    "the leading dimensions must be equal",
                ));
                return None;
            }
        }
        shape.push(right_ty.shape[right_ty.rank() - 1].clone());
        Some(Val::Value(function.push(
            Op::MatMul,
            vec![left_id, right_id],
            TensorType { dtype: left_ty.dtype, shape },
            span,
        )))
    }

    fn index(
        &mut self,
        scope: &mut dyn Scope,
        function: &mut Function,
        value: Val,
        indices: &[ast::Index],
        span: Span,
    ) -> Option<Val> {
        let Val::Value(id) = value else {
            self.emit(Diagnostic::error("E0206", span, "a number cannot be indexed", "not a tensor"));
            return None;
        };
        let ty = function.ty(id).clone();
        if indices.len() > ty.rank() {
            self.emit(Diagnostic::error(
                "E0206",
                span,
                format!("{} indices into a tensor of rank {}", indices.len(), ty.rank()),
                format!("this is {ty}"),
            ));
            return None;
        }
        let mut starts = Vec::new();
        let mut sliced_shape = Vec::new();
        let mut kept_shape = Vec::new();
        for (axis, dim) in ty.shape.iter().enumerate() {
            let Some(index) = indices.get(axis) else {
                starts.push(0);
                sliced_shape.push(dim.clone());
                kept_shape.push(dim.clone());
                continue;
            };
            let (start, end, keep, index_span) = match index {
                ast::Index::At(expr) => {
                    let position = self.constant_int(scope, expr, function)?;
                    (position, position + 1, false, expr.span())
                }
                ast::Index::Slice(start, end, slice_span) => {
                    let start = match start {
                        Some(expr) => self.constant_int(scope, expr, function)?,
                        None => 0,
                    };
                    let end = match (end, dim) {
                        (Some(expr), _) => self.constant_int(scope, expr, function)?,
                        (None, Dim::Known(size)) => *size,
                        (None, Dim::Symbol(_)) if start == 0 => {
                            starts.push(0);
                            sliced_shape.push(dim.clone());
                            kept_shape.push(dim.clone());
                            continue;
                        }
                        (None, Dim::Symbol(_)) => -1,
                    };
                    (start, end, true, *slice_span)
                }
            };
            let valid = match dim {
                Dim::Known(size) => 0 <= start && start < end && end <= *size,
                Dim::Symbol(_) => false,
            };
            if !valid {
                self.emit(Diagnostic::error(
                    "E0206",
                    index_span,
                    format!("index {start}..{end} is out of range for dimension {dim} of {ty}"),
                    "out of range",
                ));
                return None;
            }
            starts.push(start);
            sliced_shape.push(Dim::Known(end - start));
            if keep {
                kept_shape.push(Dim::Known(end - start));
            }
        }
        let sliced = function.push(
            Op::Slice { starts },
            vec![id],
            TensorType { dtype: ty.dtype, shape: sliced_shape.clone() },
            span,
        );
        if kept_shape == sliced_shape {
            Some(Val::Value(sliced))
        } else {
            Some(Val::Value(function.push(
                Op::Reshape,
                vec![sliced],
                TensorType { dtype: ty.dtype, shape: kept_shape },
                span,
            )))
        }
    }

    /// Evaluates an expression that must be an integer constant (indices, axes).
    pub fn constant_int(&mut self, scope: &mut dyn Scope, expr: &Expr, function: &mut Function) -> Option<i64> {
        match self.lower_expr(scope, expr, function)? {
            Val::Literal(value) if value.fract() == 0.0 && value.abs() < 9.0e15 => Some(value as i64),
            _ => {
                self.emit(Diagnostic::error(
                    "E0112",
                    expr.span(),
                    "expected an integer constant",
                    "not an integer constant",
                ));
                None
            }
        }
    }

    /// Lowers a call: builtins first, then whatever the scope knows (models, losses).
    fn lower_call(&mut self, scope: &mut dyn Scope, call: &ast::Call, function: &mut Function) -> Option<Val> {
        let name = call.name.name.as_str();
        let Some((min_args, max_args)) = builtins::function_arity(name) else {
            return match scope.call(self, call, function) {
                Some(Lookup::Found(value)) => Some(value),
                Some(Lookup::Failed) => None,
                None => {
                    let mut candidates: Vec<String> =
                        builtins::FUNCTIONS.iter().map(|(name, _, _)| name.to_string()).collect();
                    candidates.extend(scope.visible_names());
                    candidates.extend(self.models.keys().cloned());
                    candidates.extend(self.losses.keys().cloned());
                    let mut diagnostic = Diagnostic::error(
                        "E0102",
                        call.name.span,
                        format!("unknown function `{name}`"),
                        "no builtin, model or loss has this name",
                    );
                    if let Some(suggestion) = closest(name, candidates.iter().map(String::as_str)) {
                        diagnostic = diagnostic.with_help(format!("did you mean `{suggestion}`?"));
                    }
                    self.emit(diagnostic);
                    None
                }
            };
        };
        if (name == "hutchinson" || name == "sampled_grad") && !scope.allows_statistics() {
            self.emit(Diagnostic::error(
                "E0111",
                call.span,
                format!("`{name}` is a curvature statistic and is only available inside a `rule`"),
                "not allowed here",
            ));
            return None;
        }
        let named_allowed = builtins::function_named_args(name);
        let mut positional: Vec<&Expr> = Vec::new();
        let mut named: Vec<(&ast::Ident, &Expr)> = Vec::new();
        for arg in &call.args {
            match arg {
                Arg::Positional(expr) => positional.push(expr),
                Arg::Named(key, expr) => {
                    if !named_allowed.contains(&key.name.as_str()) {
                        let mut diagnostic = Diagnostic::error(
                            "E0103",
                            key.span,
                            format!("`{name}` has no option `{}`", key.name),
                            "unknown option",
                        );
                        diagnostic = if named_allowed.is_empty() {
                            diagnostic.with_help(format!("`{name}` takes no named options"))
                        } else {
                            diagnostic.with_help(format!("the options of `{name}` are: {}", named_allowed.join(", ")))
                        };
                        self.emit(diagnostic);
                        return None;
                    }
                    named.push((key, expr));
                }
            }
        }
        // A named `axis`/`eps`/... may also be given positionally as the last argument.
        // Named options (`axis = 1`, `probe = gaussian`) are checked above; the count concerns the
        // positional arguments, some of which may be those options written positionally.
        let total = positional.len();
        if total < min_args || total > max_args {
            let expected =
                if min_args == max_args { format!("{min_args}") } else { format!("{min_args} to {max_args}") };
            let mut diagnostic = Diagnostic::error(
                "E0104",
                call.span,
                format!(
                    "`{name}` takes {expected} argument{}, but {total} {} given",
                    if max_args == 1 { "" } else { "s" },
                    if total == 1 { "was" } else { "were" }
                ),
                "wrong number of arguments",
            );
            // `max` and `min` are elementwise; one argument suggests a reduction was meant.
            if (name == "max" || name == "min") && total == 1 {
                diagnostic = diagnostic.with_help(if name == "max" {
                    "`max(a, b)` is the elementwise maximum; for the largest element use `amax(x)` or `amax(x, axis)`"
                } else {
                    "`min(a, b)` is the elementwise minimum; for the smallest element use `-amax(-x)`"
                });
            }
            self.emit(diagnostic);
            return None;
        }
        crate::builtin_calls::lower_builtin(self, scope, call, &positional, &named, function)
    }
}

/// Numpy broadcasting of two shapes; symbolic dimensions broadcast only with themselves or 1.
pub fn broadcast_shapes(left: &[Dim], right: &[Dim]) -> Result<Vec<Dim>, ()> {
    let rank = left.len().max(right.len());
    let mut shape = Vec::with_capacity(rank);
    for axis in 0..rank {
        let left_dim = if axis + left.len() >= rank { Some(&left[axis + left.len() - rank]) } else { None };
        let right_dim = if axis + right.len() >= rank { Some(&right[axis + right.len() - rank]) } else { None };
        let dim = match (left_dim, right_dim) {
            (Some(a), None) => a.clone(),
            (None, Some(b)) => b.clone(),
            (Some(a), Some(b)) if a == b => a.clone(),
            (Some(Dim::Known(1)), Some(b)) => b.clone(),
            (Some(a), Some(Dim::Known(1))) => a.clone(),
            _ => return Err(()),
        };
        shape.push(dim);
    }
    Ok(shape)
}

fn fold(op: BinaryOp, a: f64, b: f64) -> f64 {
    match op {
        BinaryOp::Add => a + b,
        BinaryOp::Sub => a - b,
        BinaryOp::Mul => a * b,
        BinaryOp::Div => a / b,
        BinaryOp::Pow => a.powf(b),
        BinaryOp::Max => a.max(b),
        BinaryOp::Min => a.min(b),
        BinaryOp::Equal => f64::from(u8::from(a == b)),
        BinaryOp::Greater => f64::from(u8::from(a > b)),
    }
}

fn fold_unary(op: UnaryOp, value: f64) -> f64 {
    match op {
        UnaryOp::Neg => -value,
        UnaryOp::Sin => value.sin(),
        UnaryOp::Cos => value.cos(),
        UnaryOp::Tanh => value.tanh(),
        UnaryOp::Exp => value.exp(),
        UnaryOp::Log => value.ln(),
        UnaryOp::Sqrt => value.sqrt(),
        UnaryOp::Abs => value.abs(),
        UnaryOp::Sign => value.signum(),
        UnaryOp::Relu => value.max(0.0),
        UnaryOp::Sigmoid => 1.0 / (1.0 + (-value).exp()),
        UnaryOp::Softplus => value.exp().ln_1p(),
    }
}
