//! Model bodies: a body's parameters, lets and return lowered to IR, with the scope that resolves
//! names in it (lets that use lets are lowered recursively up to a depth, then iteratively), and
//! parameter initialisers.

use super::*;

/// A model or loss body.
#[derive(Clone, Copy)]
pub(crate) enum Body<'a> {
    Model(&'a ast::ModelDecl),
    Loss(&'a ast::LossDecl),
}

impl<'a> Body<'a> {
    fn inputs(&self) -> &'a [ast::TypedName] {
        match self {
            Body::Model(model) => &model.inputs,
            Body::Loss(loss) => &loss.inputs,
        }
    }
    fn statements(&self) -> &'a [ast::BodyStmt] {
        match self {
            Body::Model(model) => &model.body,
            Body::Loss(loss) => &loss.body,
        }
    }
    fn output(&self) -> Option<&'a ast::TypeExpr> {
        match self {
            Body::Model(model) => model.output.as_ref(),
            Body::Loss(loss) => loss.output.as_ref(),
        }
    }
    fn name(&self) -> &'a ast::Ident {
        match self {
            Body::Model(model) => &model.name,
            Body::Loss(loss) => &loss.name,
        }
    }
}

/// Names inside a model or loss body: inputs, params and (order-independent) lets.
pub(super) struct BodyScope<'a> {
    inputs: Vec<(String, Option<ValueId>)>,
    params: HashMap<String, &'a ast::Ident>,
    param_decls: Vec<&'a ast::ParamDecl>,
    param_values: HashMap<String, ValueId>,
    lets: HashMap<String, &'a ast::LetDecl>,
    let_values: HashMap<String, Option<Val>>,
    in_progress: Vec<String>,
    in_progress_names: HashSet<String>,
    used: HashSet<String>,
}

impl<'a> BodyScope<'a> {
    fn new(_body: &Body<'a>) -> BodyScope<'a> {
        BodyScope {
            inputs: Vec::new(),
            params: HashMap::new(),
            param_decls: Vec::new(),
            param_values: HashMap::new(),
            lets: HashMap::new(),
            let_values: HashMap::new(),
            in_progress: Vec::new(),
            in_progress_names: HashSet::new(),
            used: HashSet::new(),
        }
    }

    /// Lowers a let on first use; a let that (indirectly) uses itself is a cycle.
    ///
    /// Lets that use lets are lowered recursively up to [`RECURSIVE_LETS`] deep; past that, the
    /// lets the next one needs are lowered first, iteratively in dependency order, so that a
    /// chain of any length costs no stack (the order of the IR's ops is the only difference).
    fn resolve_let(&mut self, checker: &mut Checker, ident: &ast::Ident, function: &mut Function) -> Option<Lookup> {
        let decl = *self.lets.get(&ident.name)?;
        if let Some(value) = self.let_values.get(&ident.name) {
            return Some(value.map_or(Lookup::Failed, Lookup::Found));
        }
        if self.in_progress_names.contains(&ident.name) {
            let position = self.in_progress.iter().position(|name| *name == ident.name).unwrap_or(0);
            let mut cycle: Vec<String> = self.in_progress[position..].to_vec();
            cycle.push(ident.name.clone());
            checker.emit(
                Diagnostic::error(
                    "E0110",
                    ident.span,
                    format!("`{}` is defined in terms of itself", ident.name),
                    "this use closes a cycle",
                )
                .with_label(decl.name.span, format!("`{}` is defined here", ident.name))
                .with_note(format!("the cycle is {}", cycle.join(" -> "))),
            );
            return Some(Lookup::Failed);
        }
        self.start_let(decl);
        if self.in_progress.len() > RECURSIVE_LETS {
            self.resolve_dependencies(checker, decl, function);
        }
        let value = checker.lower_expr(self, &decl.value, function);
        self.finish_let(decl, value);
        Some(value.map_or(Lookup::Failed, Lookup::Found))
    }

    fn start_let(&mut self, decl: &ast::LetDecl) {
        self.in_progress.push(decl.name.name.clone());
        self.in_progress_names.insert(decl.name.name.clone());
    }

    fn finish_let(&mut self, decl: &ast::LetDecl, value: Option<Val>) {
        self.in_progress.pop();
        self.in_progress_names.remove(&decl.name.name);
        self.let_values.insert(decl.name.name.clone(), value);
    }

    /// Lowers every let that `decl` (in progress) needs and that is not lowered yet, deepest
    /// first, with an explicit stack: each is lowered when all of its own are, while the lets
    /// that lead to it are in progress, as recursive lowering would (so cycles read the same).
    fn resolve_dependencies(&mut self, checker: &mut Checker, decl: &'a ast::LetDecl, function: &mut Function) {
        let mut stack: Vec<(&'a ast::LetDecl, Vec<&'a str>, usize)> = vec![(decl, self.let_references(decl), 0)];
        while let Some((current, references, next)) = stack.last_mut() {
            if let Some(&name) = references.get(*next) {
                *next += 1;
                if self.let_values.contains_key(name) || self.in_progress_names.contains(name) {
                    continue;
                }
                if let Some(&dependency) = self.lets.get(name) {
                    self.start_let(dependency);
                    stack.push((dependency, self.let_references(dependency), 0));
                }
                continue;
            }
            let current = *current;
            stack.pop();
            if stack.is_empty() {
                // `decl` itself is lowered by the caller.
                break;
            }
            let value = checker.lower_expr(self, &current.value, function);
            self.finish_let(current, value);
        }
    }

    /// The lets a let's expression names (inputs and parameters hide lets of the same name), in
    /// the order they appear.
    fn let_references(&self, decl: &'a ast::LetDecl) -> Vec<&'a str> {
        let mut names = Vec::new();
        let mut work: Vec<&'a Expr> = vec![&decl.value];
        while let Some(expr) = work.pop() {
            match expr {
                Expr::Name(ident) => {
                    let name = ident.name.as_str();
                    let hidden = self.params.contains_key(name) || self.inputs.iter().any(|(input, _)| input == name);
                    if !hidden && self.lets.contains_key(name) {
                        names.push(name);
                    }
                }
                Expr::Int(..) | Expr::Float(..) | Expr::Str(..) | Expr::Error(_) => {}
                Expr::Field(base, _, _) | Expr::Neg(base, _) => work.push(base),
                Expr::Binary(_, left, right, _) => {
                    work.push(right);
                    work.push(left);
                }
                Expr::Index(base, indices, _) => {
                    for index in indices.iter().rev() {
                        match index {
                            ast::Index::At(expr) => work.push(expr),
                            ast::Index::Slice(start, end, _) => work.extend(end.iter().chain(start.iter())),
                        }
                    }
                    work.push(base);
                }
                Expr::List(items, _) => work.extend(items.iter().rev()),
                Expr::Call(call) => work.extend(call.args.iter().rev().map(|arg| match arg {
                    ast::Arg::Positional(expr) | ast::Arg::Named(_, expr) => expr,
                })),
            }
        }
        names
    }
}

/// How many lets may be lowered inside one another before the rest of a chain is lowered
/// iteratively (see `BodyScope::resolve_let`).
pub(super) const RECURSIVE_LETS: usize = 32;

impl Scope for BodyScope<'_> {
    fn name(&mut self, checker: &mut Checker, ident: &ast::Ident, function: &mut Function) -> Option<Lookup> {
        if let Some((_, value)) = self.inputs.iter().find(|(name, _)| *name == ident.name) {
            self.used.insert(ident.name.clone());
            return Some(value.map_or(Lookup::Failed, |id| Lookup::Found(Val::Value(id))));
        }
        if self.params.contains_key(&ident.name) {
            self.used.insert(ident.name.clone());
            return Some(
                self.param_values.get(&ident.name).map_or(Lookup::Failed, |id| Lookup::Found(Val::Value(*id))),
            );
        }
        if self.lets.contains_key(&ident.name) {
            self.used.insert(ident.name.clone());
            return self.resolve_let(checker, ident, function);
        }
        if let Some(Dim::Known(size)) = checker.symbol_dim(&ident.name) {
            return Some(Lookup::Found(Val::Literal(size as f64)));
        }
        None
    }

    fn field(
        &mut self,
        checker: &mut Checker,
        base: &ast::Ident,
        _field: &ast::Ident,
        _function: &mut Function,
    ) -> Option<Lookup> {
        if checker.data.contains_key(&base.name) {
            checker.emit(
                Diagnostic::error(
                    "E0111",
                    base.span,
                    "models cannot read data sets directly",
                    "data is passed in through the inputs",
                )
                .with_help("pass the field as an argument: `model(data.x)` in the train block"),
            );
            return Some(Lookup::Failed);
        }
        None
    }

    fn call(&mut self, checker: &mut Checker, call: &ast::Call, _function: &mut Function) -> Option<Lookup> {
        if checker.models.contains_key(&call.name.name) || checker.losses.contains_key(&call.name.name) {
            checker.emit(
                Diagnostic::error(
                    "E0111",
                    call.span,
                    format!("`{}` cannot be called from inside a model", call.name.name),
                    "models and losses are called from train blocks",
                )
                .with_help("inline the layers, or compose the models in the train block's loss"),
            );
            return Some(Lookup::Failed);
        }
        None
    }

    fn visible_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.inputs.iter().map(|(name, _)| name.clone()).collect();
        names.extend(self.params.keys().cloned());
        names.extend(self.lets.keys().cloned());
        names.sort();
        names
    }
}

impl<'a> Checker<'a> {
    /// Lowers a model or loss body into `function`.
    ///
    /// With `inputs = None` (the generic check) the inputs are fresh values of their declared,
    /// symbolic types and every problem is reported. With concrete inputs, `self.symbols` already
    /// holds the bindings and the body is known to check.
    pub(crate) fn lower_body(
        &mut self,
        body: &Body<'a>,
        inputs: Option<Vec<ValueId>>,
        function: &mut Function,
        params: &mut Vec<ParamInfo>,
        report_unused: bool,
    ) -> Option<ValueId> {
        let saved_symbols = std::mem::take(&mut self.symbols);
        if inputs.is_some() {
            self.symbols = saved_symbols.clone();
        }
        let result = self.lower_body_inner(body, inputs, function, params, report_unused);
        self.symbols = saved_symbols;
        result
    }

    pub(super) fn lower_body_inner(
        &mut self,
        body: &Body<'a>,
        inputs: Option<Vec<ValueId>>,
        function: &mut Function,
        params: &mut Vec<ParamInfo>,
        report_unused: bool,
    ) -> Option<ValueId> {
        let generic = inputs.is_none();
        let errors_before = self.error_count();
        let mut scope = BodyScope::new(body);
        // Inputs (and, in the generic check, their symbols).
        let mut input_values = Vec::new();
        for (index, input) in body.inputs().iter().enumerate() {
            let ty = self.resolve_type(&input.ty, generic);
            if let Some(duplicate) = body.inputs()[..index].iter().find(|other| other.name.name == input.name.name) {
                self.emit(
                    Diagnostic::error(
                        "E0101",
                        input.name.span,
                        format!("the input `{}` is declared twice", input.name.name),
                        "declared again",
                    )
                    .with_label(duplicate.name.span, "first declared here"),
                );
            }
            let value = match (&inputs, ty) {
                (Some(values), _) => Some(values[index]),
                (None, Some(ty)) => {
                    Some(function.push(Op::Input { index, name: input.name.name.clone() }, vec![], ty, input.span))
                }
                (None, None) => None,
            };
            input_values.push((input.name.name.clone(), value));
        }
        scope.inputs = input_values;
        // Body-level dims, params and lets.
        let mut returns = Vec::new();
        for statement in body.statements() {
            match statement {
                ast::BodyStmt::Dim(decl) => {
                    if let Some(size) = self.dim_value(&decl.value) {
                        self.symbols.insert(decl.name.name.clone(), Dim::Known(size));
                    }
                }
                ast::BodyStmt::Param(decl) => {
                    if let Body::Loss(_) = body {
                        self.emit(Diagnostic::error(
                            "E0111",
                            decl.span,
                            "a loss cannot declare parameters",
                            "parameters belong in a model",
                        ));
                        continue;
                    }
                    if let Some(first) = scope
                        .params
                        .get(&decl.name.name)
                        .copied()
                        .or_else(|| scope.lets.get(&decl.name.name).map(|decl| &decl.name))
                    {
                        let first_span = first.span;
                        self.emit(
                            Diagnostic::error(
                                "E0101",
                                decl.name.span,
                                format!("`{}` is defined more than once", decl.name.name),
                                "defined again",
                            )
                            .with_label(first_span, "first defined here"),
                        );
                        continue;
                    }
                    scope.params.insert(decl.name.name.clone(), &decl.name);
                    scope.param_decls.push(decl);
                }
                ast::BodyStmt::Let(decl) => {
                    if let Some(first) = scope
                        .params
                        .get(&decl.name.name)
                        .copied()
                        .or_else(|| scope.lets.get(&decl.name.name).map(|decl| &decl.name))
                    {
                        let first_span = first.span;
                        self.emit(
                            Diagnostic::error(
                                "E0101",
                                decl.name.span,
                                format!("`{}` is defined more than once", decl.name.name),
                                "defined again",
                            )
                            .with_label(first_span, "first defined here"),
                        );
                        continue;
                    }
                    scope.lets.insert(decl.name.name.clone(), decl);
                }
                ast::BodyStmt::Return(expr, span) => returns.push((expr, *span)),
                ast::BodyStmt::Error(_) => {}
            }
        }
        // Parameters get their IR values up front, in declaration order.
        let mut param_indices: HashMap<String, usize> =
            params.iter().enumerate().map(|(index, param)| (param.name.clone(), index)).collect();
        for decl in scope.param_decls.clone() {
            let Some(ty) = self.resolve_type(&decl.ty, false) else {
                continue;
            };
            if !ty.dtype.is_float() {
                self.emit(Diagnostic::error(
                    "E0203",
                    decl.ty.span,
                    format!("parameters must be float tensors, found {ty}"),
                    "not trainable",
                ));
                continue;
            }
            let init = self.resolve_init(decl, &ty);
            let index = match param_indices.get(&decl.name.name).copied() {
                Some(index) if params[index].span != decl.span => {
                    // Two models of one train block declare the same name: their parameters would
                    // be silently shared, so this is an error at the second declaration.
                    let first = params[index].span;
                    self.emit(
                        Diagnostic::error(
                            "E0101",
                            decl.name.span,
                            format!("two models of this train block declare a parameter `{}`", decl.name.name),
                            "declared again here",
                        )
                        .with_label(first, "first declared here")
                        .with_help("parameter names must be unique across the models a train block calls; rename one"),
                    );
                    continue;
                }
                Some(index) => index,
                None => {
                    params.push(ParamInfo {
                        name: decl.name.name.clone(),
                        ty: ty.clone(),
                        init: init.unwrap_or(Init::Zeros),
                        span: decl.span,
                    });
                    param_indices.insert(decl.name.name.clone(), params.len() - 1);
                    params.len() - 1
                }
            };
            let value = function.push(Op::Param { index }, vec![], ty, decl.name.span);
            scope.param_values.insert(decl.name.name.clone(), value);
        }
        let name_span = body.name().span;
        let (return_expr, return_span) = match returns.as_slice() {
            [] => {
                // A body that ends with a `let` most likely meant to return that value.
                let help = match body.statements().last() {
                    Some(ast::BodyStmt::Let(decl)) => format!("end the body with `return {}`", decl.name.name),
                    _ => "end the body with `return` and the output's expression".to_string(),
                };
                self.emit(
                    Diagnostic::error(
                        "E0306",
                        name_span,
                        format!("`{}` has no `return`", body.name().name),
                        "missing `return`",
                    )
                    .with_help(help),
                );
                return None;
            }
            [single] => *single,
            [first, second, ..] => {
                self.emit(
                    Diagnostic::error("E0111", second.1, "a body has exactly one `return`", "second `return`")
                        .with_label(first.1, "first `return` here"),
                );
                return None;
            }
        };
        let result = self.lower_expr(&mut scope, return_expr, function);
        // Lets not reached from the return are still checked (and reported as unused).
        let let_names: Vec<String> = body
            .statements()
            .iter()
            .filter_map(|statement| match statement {
                ast::BodyStmt::Let(decl) => Some(decl.name.name.clone()),
                _ => None,
            })
            .collect();
        for name in &let_names {
            if !scope.let_values.contains_key(name) && !scope.in_progress_names.contains(name) {
                let ident = ast::Ident { name: name.clone(), span: Span::default() };
                let _ = scope.resolve_let(self, &ident, function);
            }
        }
        // A body with errors is not fully checked (an unknown call's arguments are never looked
        // at, a misspelt name never marks its target as used), so "unused" warnings and the
        // return type check would only be consequences of those errors.
        let body_has_errors = self.error_count() != errors_before;
        if report_unused && !body_has_errors {
            for decl in &scope.param_decls {
                if !scope.used.contains(&decl.name.name) {
                    self.emit(
                        Diagnostic::warning(
                            "W0001",
                            decl.name.span,
                            format!("the parameter `{}` is never used", decl.name.name),
                            "unused parameter",
                        )
                        .with_help("remove it, or use it in the model's body"),
                    );
                }
            }
            for name in &let_names {
                if !scope.used.contains(name) {
                    if let Some(decl) = scope.lets.get(name) {
                        let span = decl.name.span;
                        self.emit(
                            Diagnostic::warning("W0002", span, format!("the let `{name}` is never used"), "unused let")
                                .with_help("remove it, or use it in the model's body"),
                        );
                    }
                }
            }
        }
        let result = result?;
        let result = self.materialize(function, result, return_span);
        if let Some(output) = body.output() {
            if let Some(expected) = self.resolve_type(output, false) {
                let actual = function.ty(result).clone();
                if body_has_errors {
                    return None;
                }
                if actual != expected {
                    self.emit(
                        Diagnostic::error(
                            "E0202",
                            return_expr.span(),
                            format!("`{}` returns {actual}, but its signature says {expected}", body.name().name),
                            format!("this is {actual}"),
                        )
                        .with_label(output.span, format!("declared as {expected}")),
                    );
                    return None;
                }
            }
        }
        Some(result)
    }

    pub(super) fn resolve_init(&mut self, decl: &ast::ParamDecl, ty: &TensorType) -> Option<Init> {
        let Some(init) = &decl.init else {
            return Some(if ty.rank() >= 2 { Init::GlorotUniform } else { Init::Zeros });
        };
        let (name, args, span) = match init {
            Expr::Name(ident) => (ident, Vec::new(), ident.span),
            Expr::Call(call) => (&call.name, call.args.clone(), call.span),
            Expr::Int(value, _) => return Some(Init::Constant(*value as f64)),
            Expr::Float(value, _) => return Some(Init::Constant(*value)),
            other => {
                self.emit(Diagnostic::error(
                    "E0107",
                    other.span(),
                    "expected an initialiser such as `zeros` or `uniform(-0.1, 0.1)`",
                    "not an initialiser",
                ));
                return None;
            }
        };
        let Some((_, specs)) = builtins::INITIALISERS.iter().find(|(init_name, _)| *init_name == name.name) else {
            let names: Vec<&str> = builtins::INITIALISERS.iter().map(|(name, _)| *name).collect();
            let mut diagnostic = Diagnostic::error(
                "E0107",
                name.span,
                format!("unknown initialiser `{}`", name.name),
                "not an initialiser",
            );
            // Xavier and Kaiming initialisation go by their other authors' names here.
            let aliases = [("xavier_", "glorot_", "Xavier", "Glorot"), ("kaiming_", "he_", "Kaiming", "He")];
            let alias = aliases.iter().find_map(|(other, ours, other_name, our_name)| {
                let renamed = format!("{ours}{}", name.name.strip_prefix(other)?);
                names.contains(&renamed.as_str()).then_some((renamed, other_name, our_name))
            });
            diagnostic = match (alias, closest(&name.name, names.iter().copied())) {
                (Some((renamed, other_name, our_name)), _) => diagnostic.with_help(format!(
                    "did you mean `{renamed}`? {other_name} initialisation is called {our_name} in curv"
                )),
                (None, Some(suggestion)) => diagnostic.with_help(format!("did you mean `{suggestion}`?")),
                (None, None) => diagnostic.with_help(format!("the initialisers are: {}", names.join(", "))),
            };
            self.emit(diagnostic);
            return None;
        };
        let options = crate::optimizer::resolve_options(self, &name.name, specs, &args, span)?;
        let number = |key: &str| curv_ir::option_number(&options, key).unwrap_or(0.0);
        let init = match name.name.as_str() {
            "zeros" => Init::Zeros,
            "ones" => Init::Ones,
            "constant" => Init::Constant(number("value")),
            "uniform" => Init::Uniform { low: number("low"), high: number("high") },
            "normal" => Init::Normal { mean: number("mean"), std: number("std") },
            "glorot_uniform" => Init::GlorotUniform,
            "glorot_normal" => Init::GlorotNormal,
            "he_normal" => Init::HeNormal,
            "he_uniform" => Init::HeUniform,
            _ => Init::SirenUniform {
                omega: number("omega"),
                first: options.iter().any(|(key, value)| key == "first" && *value == curv_ir::OptionValue::Bool(true)),
            },
        };
        if let Init::Uniform { low, high } = init {
            if low >= high {
                self.emit(Diagnostic::error(
                    "E0305",
                    span,
                    format!("`uniform` needs low < high, found {low} and {high}"),
                    "empty range",
                ));
                return None;
            }
        }
        if matches!(
            init,
            Init::GlorotUniform | Init::GlorotNormal | Init::HeNormal | Init::HeUniform | Init::SirenUniform { .. }
        ) && ty.rank() < 2
        {
            self.emit(
                Diagnostic::error(
                    "E0204",
                    span,
                    format!("`{}` needs a parameter of rank 2 or more, found {ty}", name.name),
                    "fan-in is undefined for this shape",
                )
                .with_help("use `zeros`, `uniform(a, b)` or `normal(mean, std)` for vectors"),
            );
            return None;
        }
        Some(init)
    }
}
