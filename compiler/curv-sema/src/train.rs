//! Lowering of `train` blocks: the loss expression with model calls instantiated on concrete
//! data shapes, the settings, and the optimizer plan.

use crate::builtins;
use crate::check::{label_in, loss_kind, new_train_program, Body, Checker};
use crate::diagnostic::{Diagnostic, SourceId};
use crate::lower::{Lookup, Scope, Val};
use crate::suggest::closest;
use curv_grammar::ast::{self, Expr};
use curv_grammar::Span;
use curv_ir::{Dim, Function, Logging, LossKind, Op, ParamInfo, TensorType, TrainProgram, ValueId};
use std::collections::HashMap;

/// Names inside a train block's loss expression: data sets, models, losses and dims.
struct TrainScope {
    batch: i64,
    /// The data set the loss reads (one per train block).
    data_used: Option<(String, Span)>,
    params: Vec<ParamInfo>,
    /// Symbol bindings per model name, to keep repeated calls consistent.
    model_bindings: HashMap<String, HashMap<String, Dim>>,
    /// The model's first argument and output, for metrics (`logits`/`prediction`).
    failed: bool,
}

impl Scope for TrainScope {
    fn name(&mut self, checker: &mut Checker, ident: &ast::Ident, _function: &mut Function) -> Option<Lookup> {
        if let Some(size) = checker.dims.get(&ident.name) {
            return Some(Lookup::Found(Val::Literal(*size as f64)));
        }
        if checker.data.contains_key(&ident.name) {
            checker.emit(
                Diagnostic::error(
                    "E0105",
                    ident.span,
                    format!("`{}` is a data set, not a tensor", ident.name),
                    "use one of its fields",
                )
                .with_help(format!("write `{}.x` or the field you need", ident.name)),
            );
            return Some(Lookup::Failed);
        }
        if checker.models.contains_key(&ident.name) || checker.losses.contains_key(&ident.name) {
            checker.emit(Diagnostic::error(
                "E0104",
                ident.span,
                format!("`{}` must be called with its inputs", ident.name),
                "not called",
            ));
            return Some(Lookup::Failed);
        }
        None
    }

    fn field(
        &mut self,
        checker: &mut Checker,
        base: &ast::Ident,
        field: &ast::Ident,
        function: &mut Function,
    ) -> Option<Lookup> {
        if !checker.data.contains_key(&base.name) {
            return None;
        }
        match &self.data_used {
            Some((name, first_span)) if *name != base.name => {
                let first_span = *first_span;
                checker.emit(
                    Diagnostic::error(
                        "E0402",
                        base.span,
                        "a train block reads one data set",
                        format!("`{}` is a second data set", base.name),
                    )
                    .with_label(first_span, format!("`{name}` is read here")),
                );
                return Some(Lookup::Failed);
            }
            Some(_) => {}
            None => self.data_used = Some((base.name.clone(), base.span)),
        }
        let Some(info) = checker.data_info(&base.name) else {
            // The data could not be read; that was reported where it is declared.
            self.failed = true;
            return Some(Lookup::Failed);
        };
        let Some((_, ty)) = info.fields.iter().find(|(name, _)| *name == field.name) else {
            let names: Vec<&str> = info.fields.iter().map(|(name, _)| name.as_str()).collect();
            let mut diagnostic = Diagnostic::error(
                "E0105",
                field.span,
                format!("`{}` has no field `{}`", base.name, field.name),
                "unknown field",
            );
            diagnostic = match closest(&field.name, names.iter().copied()) {
                Some(suggestion) => diagnostic.with_help(format!("did you mean `{suggestion}`?")),
                None => diagnostic.with_help(format!("the fields of `{}` are: {}", base.name, names.join(", "))),
            };
            checker.emit(diagnostic);
            return Some(Lookup::Failed);
        };
        let batch = if self.batch > 0 { self.batch } else { info.examples - info.test_examples };
        let mut shape = ty.shape.clone();
        shape[0] = Dim::Known(batch);
        let batch_ty = TensorType { dtype: ty.dtype, shape };
        let span = base.span.to(field.span);
        Some(Lookup::Found(Val::Value(function.push(
            Op::Data { source: base.name.clone(), field: field.name.clone() },
            vec![],
            batch_ty,
            span,
        ))))
    }

    fn call(&mut self, checker: &mut Checker, call: &ast::Call, function: &mut Function) -> Option<Lookup> {
        let body = if let Some(model) = checker.models.get(&call.name.name) {
            Body::Model(model.item)
        } else if let Some(loss) = checker.losses.get(&call.name.name) {
            Body::Loss(loss.item)
        } else {
            return None;
        };
        Some(match self.instantiate(checker, body, call, function) {
            Some(value) => Lookup::Found(Val::Value(value)),
            None => Lookup::Failed,
        })
    }

    fn visible_names(&self) -> Vec<String> {
        Vec::new()
    }
}

impl TrainScope {
    /// Binds a model's symbolic dimensions to the call's argument shapes and inlines its body.
    fn instantiate<'a>(
        &mut self,
        checker: &mut Checker<'a>,
        body: Body<'a>,
        call: &ast::Call,
        function: &mut Function,
    ) -> Option<ValueId> {
        let (name, inputs, source) = match body {
            Body::Model(model) => (&model.name, &model.inputs, checker.models[&model.name.name].source),
            Body::Loss(loss) => (&loss.name, &loss.inputs, checker.losses[&loss.name.name].source),
        };
        let mut args = Vec::new();
        let mut failed = false;
        for arg in &call.args {
            match arg {
                ast::Arg::Positional(expr) => match checker.lower_expr(self, expr, function) {
                    Some(value) => args.push((checker.materialize(function, value, expr.span()), expr.span())),
                    None => failed = true,
                },
                ast::Arg::Named(key, _) => {
                    checker.emit(Diagnostic::error(
                        "E0103",
                        key.span,
                        format!("`{}` takes positional inputs only", name.name),
                        "named argument",
                    ));
                    failed = true;
                }
            }
        }
        if failed {
            return None;
        }
        if args.len() != inputs.len() {
            checker.emit(Diagnostic::error(
                "E0104",
                call.span,
                format!(
                    "`{}` takes {} input{}, but {} were given",
                    name.name,
                    inputs.len(),
                    if inputs.len() == 1 { "" } else { "s" },
                    args.len()
                ),
                "wrong number of inputs",
            ));
            return None;
        }
        // Unify declared input types with the argument types.
        let mut bindings: HashMap<String, Dim> = HashMap::new();
        for ((value, arg_span), input) in args.iter().zip(inputs.iter()) {
            let actual = function.ty(*value).clone();
            let declared_dtype = curv_ir::DType::from_name(&input.ty.dtype.name);
            if declared_dtype.is_some_and(|dtype| dtype != actual.dtype) {
                let mut diagnostic = Diagnostic::error(
                    "E0203",
                    *arg_span,
                    format!(
                        "`{}` expects {} for `{}`, found {actual}",
                        name.name, input.ty.dtype.name, input.name.name
                    ),
                    format!("this is {actual}"),
                );
                diagnostic.labels.push(label_in(
                    source,
                    input.ty.dtype.span,
                    &format!("`{}` is declared here", input.name.name),
                ));
                checker.emit(diagnostic);
                return None;
            }
            if input.ty.dims.len() != actual.rank() {
                let mut diagnostic = Diagnostic::error(
                    "E0204",
                    *arg_span,
                    format!(
                        "`{}` expects `{}` of rank {}, found {actual}",
                        name.name,
                        input.name.name,
                        input.ty.dims.len()
                    ),
                    format!("this is {actual}"),
                );
                diagnostic.labels.push(label_in(
                    source,
                    input.ty.span,
                    &format!("`{}` is declared here", input.name.name),
                ));
                checker.emit(diagnostic);
                return None;
            }
            for (dim, actual_dim) in input.ty.dims.iter().zip(actual.shape.iter()) {
                let expected = match dim {
                    ast::DimExpr::Int(size, _) => Some(Dim::Known(*size)),
                    ast::DimExpr::Name(ident) => match checker.dims.get(&ident.name) {
                        Some(size) => Some(Dim::Known(*size)),
                        None => match bindings.get(&ident.name) {
                            Some(bound) => Some(bound.clone()),
                            None => {
                                bindings.insert(ident.name.clone(), actual_dim.clone());
                                None
                            }
                        },
                    },
                    _ => None,
                };
                if let Some(expected) = expected {
                    if expected != *actual_dim {
                        let dim_text = match dim {
                            ast::DimExpr::Name(ident) => format!("`{}` = {expected}", ident.name),
                            _ => expected.to_string(),
                        };
                        let mut diagnostic = Diagnostic::error(
                            "E0205",
                            *arg_span,
                            format!(
                                "`{}` expects `{}` with dimension {dim_text}, but the argument has {actual_dim} there",
                                name.name, input.name.name
                            ),
                            format!("this is {actual}"),
                        );
                        diagnostic.labels.push(label_in(source, dim.span(), &format!("{dim_text} is expected here")));
                        if let ast::DimExpr::Name(ident) = dim {
                            if checker.dims.contains_key(&ident.name) {
                                diagnostic = diagnostic.with_note(format!(
                                    "`{}` is fixed by `dim {} = {expected}`",
                                    ident.name, ident.name
                                ));
                            }
                        }
                        checker.emit(diagnostic);
                        return None;
                    }
                }
            }
        }
        if !checker.model_ok.get(&name.name).copied().unwrap_or(false) {
            return None;
        }
        if let Some(previous) = self.model_bindings.get(&name.name) {
            if previous != &bindings {
                checker.emit(Diagnostic::error(
                    "E0205",
                    call.span,
                    format!("`{}` is called with other dimensions than before", name.name),
                    "a model's parameters have one shape per train block",
                ));
                return None;
            }
        }
        self.model_bindings.insert(name.name.clone(), bindings.clone());
        let input_values: Vec<ValueId> = args.iter().map(|(value, _)| *value).collect();
        let saved_symbols = std::mem::replace(&mut checker.symbols, bindings);
        let saved_source = checker.source;
        checker.source = source;
        let result = checker.lower_body(&body, Some(input_values), function, &mut self.params, false);
        checker.source = saved_source;
        checker.symbols = saved_symbols;
        result
    }
}

impl<'a> Checker<'a> {
    pub(crate) fn lower_train(&mut self, train: &'a ast::TrainDecl) -> Option<TrainProgram> {
        let mut loss_expr: Option<(&Expr, Span)> = None;
        let mut optimizer_name: Option<&ast::Ident> = None;
        let mut settings: HashMap<String, &ast::Setting> = HashMap::new();
        for item in &train.items {
            match item {
                ast::TrainItem::Loss(expr, span) => {
                    if let Some((_, first)) = loss_expr {
                        self.emit(
                            Diagnostic::error("E0101", *span, "a train block has one `loss`", "second `loss`")
                                .with_label(first, "first `loss` here"),
                        );
                    } else {
                        loss_expr = Some((expr, *span));
                    }
                }
                ast::TrainItem::Optimizer(name, span) => {
                    if optimizer_name.is_some() {
                        self.emit(Diagnostic::error(
                            "E0101",
                            *span,
                            "a train block has one `optimizer`",
                            "second `optimizer`",
                        ));
                    } else {
                        optimizer_name = Some(name);
                    }
                }
                ast::TrainItem::Setting(setting) => {
                    let key = setting.key.name.as_str();
                    if !builtins::TRAIN_SETTINGS.contains(&key) {
                        let mut diagnostic = Diagnostic::error(
                            "E0103",
                            setting.key.span,
                            format!("unknown train setting `{key}`"),
                            "not a train setting",
                        );
                        // Names other frameworks use for the training length and the batch size.
                        let renamed = match key {
                            "epochs" | "iterations" | "num_steps" | "max_steps" => Some("steps"),
                            "batch_size" => Some("batch"),
                            _ => None,
                        };
                        diagnostic = match renamed {
                            Some("steps") => {
                                diagnostic.with_help("curv counts training in optimizer steps: write `steps N` instead")
                            }
                            Some(setting_name) => diagnostic.with_help(format!("did you mean `{setting_name}`?")),
                            None => match closest(
                                key,
                                builtins::TRAIN_SETTINGS.iter().copied().chain(["loss", "optimizer"]),
                            ) {
                                Some(suggestion) => diagnostic.with_help(format!("did you mean `{suggestion}`?")),
                                None => diagnostic.with_help(format!(
                                    "the train settings are: loss, optimizer, {}",
                                    builtins::TRAIN_SETTINGS.join(", ")
                                )),
                            },
                        };
                        self.emit(diagnostic);
                    } else if let (Some(every), false) = (&setting.every, matches!(key, "log" | "eval" | "checkpoint"))
                    {
                        self.emit(
                            Diagnostic::error(
                                "E0111",
                                every.span(),
                                format!("`{key}` takes no period"),
                                "`every` is not meaningful here",
                            )
                            .with_help("only `log`, `eval` and `checkpoint` run every N steps"),
                        );
                        // Keep the setting so that its absence is not reported as well.
                        settings.entry(key.to_string()).or_insert(setting);
                    } else if let Some(first) = settings.insert(key.to_string(), setting) {
                        self.emit(
                            Diagnostic::error("E0101", setting.key.span, format!("`{key}` is set twice"), "set again")
                                .with_label(first.key.span, "first set here"),
                        );
                    }
                }
                ast::TrainItem::Error(_) => {}
            }
        }
        let steps = match settings.get("steps") {
            Some(setting) => self.setting_positive_int(setting),
            None => {
                self.emit(
                    Diagnostic::error(
                        "E0306",
                        train.name.span,
                        format!("train `{}` has no `steps`", train.name.name),
                        "missing `steps`",
                    )
                    .with_help("add a line such as `steps 1000`"),
                );
                None
            }
        };
        let seed = match settings.get("seed") {
            Some(setting) => self.setting_int(setting, 0),
            None => Some(0),
        };
        let batch = match settings.get("batch") {
            Some(setting) => match setting.values.as_slice() {
                [Expr::Name(ident)] if ident.name == "all" => Some(0),
                _ => self.setting_positive_int(setting),
            },
            None => Some(0),
        };
        let Some((loss_expr, loss_span)) = loss_expr else {
            self.emit(
                Diagnostic::error(
                    "E0306",
                    train.name.span,
                    format!("train `{}` has no `loss`", train.name.name),
                    "missing `loss`",
                )
                .with_help("add a line such as `loss cross_entropy(model(data.x), data.y)`"),
            );
            return None;
        };
        let optimizer_ident = match optimizer_name {
            Some(name) => Some(name),
            None => {
                self.emit(
                    Diagnostic::error(
                        "E0306",
                        train.name.span,
                        format!("train `{}` has no `optimizer`", train.name.name),
                        "missing `optimizer`",
                    )
                    .with_help("add a line such as `optimizer adam` (with `use std.optimizers.adam`)"),
                );
                None
            }
        };
        let batch = batch?;
        let mut scope =
            TrainScope { batch, data_used: None, params: Vec::new(), model_bindings: HashMap::new(), failed: false };
        let mut function = Function::new("loss");
        self.expression_values.clear();
        let errors_before = self.error_count();
        let loss_value = self.lower_expr(&mut scope, loss_expr, &mut function);
        let Some((data_name, _)) = scope.data_used.clone() else {
            if !scope.failed && self.error_count() == errors_before {
                self.emit(Diagnostic::error(
                    "E0402",
                    loss_span,
                    "the loss reads no data set",
                    "no `data.field` in this expression",
                ));
            }
            return None;
        };
        let data = self.data_info(&data_name)?;
        if batch > data.examples - data.test_examples {
            let setting = settings["batch"];
            self.emit(Diagnostic::error(
                "E0305",
                setting.values.first().map_or(setting.span, Expr::span),
                format!(
                    "batch {batch} is larger than the {} training examples of `{data_name}`",
                    data.examples - data.test_examples
                ),
                "batch too large",
            ));
            return None;
        }
        let loss_value = loss_value?;
        let loss_value = self.materialize(&mut function, loss_value, loss_span);
        let loss_ty = function.ty(loss_value).clone();
        if loss_ty.rank() != 0 || !loss_ty.dtype.is_float() {
            self.emit(
                Diagnostic::error(
                    "E0204",
                    loss_expr.span(),
                    format!("the loss must be a float scalar, found {loss_ty}"),
                    "not a scalar",
                )
                .with_help("reduce it with `mean(...)` or `sum(...)`"),
            );
            return None;
        }
        function.outputs.push(("loss".to_string(), loss_value));
        let kind = loss_kind(loss_expr);
        self.add_metric_outputs(&mut function, loss_expr, kind);
        let mut program = new_train_program(&train.name.name, data, train.span);
        program.batch = if batch == 0 { program.data.examples - program.data.test_examples } else { batch };
        program.steps = steps?;
        program.seed = seed?;
        program.loss_kind = kind;
        program.loss = function;
        program.params = scope.params;
        if program.data.test_examples > 0 {
            // The same loss on the whole test split, for `test_*` metrics.
            let mut test_scope = TrainScope {
                batch: program.data.test_examples,
                data_used: None,
                params: Vec::new(),
                model_bindings: HashMap::new(),
                failed: false,
            };
            let mut test_function = Function::new("test_loss");
            self.expression_values.clear();
            if let Some(value) = self.lower_expr(&mut test_scope, loss_expr, &mut test_function) {
                let value = self.materialize(&mut test_function, value, loss_span);
                test_function.outputs.push(("loss".to_string(), value));
                self.add_metric_outputs(&mut test_function, loss_expr, kind);
                if test_scope.params == program.params {
                    program.test_loss = Some(test_function);
                }
            }
        }
        program.log = match settings.get("log") {
            Some(setting) => Some(self.logging(setting, kind, &program)?),
            None => None,
        };
        program.eval = match settings.get("eval") {
            Some(setting) => Some(self.logging(setting, kind, &program)?),
            None => None,
        };
        if let Some(setting) = settings.get("on_nonfinite") {
            match setting.values.as_slice() {
                [Expr::Name(ident)] if ident.name == "skip" || ident.name == "stop" => {
                    program.skip_nonfinite = ident.name == "skip"
                }
                _ => {
                    self.emit(
                        Diagnostic::error(
                            "E0112",
                            setting.span,
                            "`on_nonfinite` is `skip` or `stop`",
                            "expected `skip` or `stop`",
                        )
                        .with_help("`skip` leaves the parameters unchanged for that step; `stop` ends training"),
                    );
                    return None;
                }
            }
        }
        program.checkpoint_every = match settings.get("checkpoint") {
            Some(setting) => Some(self.every_of(setting)?),
            None => None,
        };
        let optimizer_ident = optimizer_ident?;
        let overridden;
        let optimizer_ident = match &self.optimizer_override {
            Some(name) => {
                overridden = ast::Ident { name: name.clone(), span: optimizer_ident.span };
                &overridden
            }
            None => optimizer_ident,
        };
        let Some(optimizer) = self.optimizers.get(&optimizer_ident.name).copied() else {
            if self.unresolved_uses.contains(&optimizer_ident.name) {
                // The `use` that should have defined it was already reported.
                return None;
            }
            let names: Vec<String> = self.optimizers.keys().cloned().collect();
            let mut diagnostic = Diagnostic::error(
                "E0100",
                optimizer_ident.span,
                format!("cannot find optimizer `{}`", optimizer_ident.name),
                "no such optimizer",
            );
            diagnostic = match closest(&optimizer_ident.name, names.iter().map(String::as_str)) {
                Some(suggestion) => diagnostic.with_help(format!("did you mean `{suggestion}`?")),
                None => match crate::std_lib::module_defining_optimizer(&optimizer_ident.name) {
                    Some(index) => diagnostic.with_help(format!(
                        "the standard library has it: add `use {}`",
                        crate::std_lib::MODULES[index].0
                    )),
                    None => diagnostic.with_help(
                        "define it with `optimizer NAME { ... }` or import a preset with `use std.optimizers.NAME`",
                    ),
                },
            };
            self.emit(diagnostic);
            return None;
        };
        self.used_optimizers.insert(optimizer_ident.name.clone());
        let _ = SourceId::User;
        program.optimizer = self.plan_optimizer(optimizer, &program.params, optimizer_ident.span)?;
        self.check_program_executes(&program, optimizer.source, loss_expr.span());
        if let Some(limit) = self.memory_limit {
            self.check_memory(&program, optimizer_ident.span, limit);
        }
        Some(program)
    }

    /// E0308: the parameters, their gradients and the optimizer state of a train block must fit in
    /// `limit` bytes. The error names the parameters with the largest states and, for the
    /// structures whose state grows with an option (a `lowrank` window or rank, a `dense`
    /// matrix), which option to lower.
    fn check_memory(&mut self, program: &TrainProgram, span: Span, limit: u64) {
        let bytes_of = |ty: &curv_ir::TensorType| ty.element_count().unwrap_or(0) as u64 * ty.dtype.size_in_bytes();
        let weights: u64 = program.params.iter().map(|param| 2 * bytes_of(&param.ty)).sum();
        let mut states: Vec<(u64, &curv_ir::ParamPlan)> = program
            .optimizer
            .plans
            .iter()
            .map(|plan| (plan.state.iter().map(|state| bytes_of(&state.ty)).sum(), plan))
            .collect();
        let state: u64 = states.iter().map(|(bytes, _)| bytes).sum();
        if weights.saturating_add(state) <= limit {
            return;
        }
        states.sort_by_key(|entry| std::cmp::Reverse(entry.0));
        let (largest_bytes, largest) = states[0];
        let name = &program.params[largest.param].name;
        let detail =
            largest.state.iter().map(|state| format!("{} {}", state.name, state.ty)).collect::<Vec<_>>().join(", ");
        let mut diagnostic = Diagnostic::error(
            "E0308",
            span,
            format!(
                "the optimizer state of train `{}` does not fit in memory: {} of state and {} of parameters and \
                 gradients, {} available",
                program.name,
                format_bytes(state),
                format_bytes(weights),
                format_bytes(limit)
            ),
            format!("`{name}` alone keeps {} under `{}`", format_bytes(largest_bytes), largest.rule_name),
        )
        .with_note(format!("the state of `{name}`: {detail}"));
        for (bytes, plan) in states.iter().skip(1).take(2) {
            if *bytes > 0 {
                diagnostic = diagnostic.with_note(format!(
                    "`{}` keeps {}",
                    program.params[plan.param].name,
                    format_bytes(*bytes)
                ));
            }
        }
        let help = match largest.structure {
            curv_ir::StructureKind::LowRank if curv_ir::option_number(&largest.options, "window").is_some() => {
                "a smaller `window` (the state grows with window x elements)"
            }
            curv_ir::StructureKind::LowRank => "a smaller `rank` (the state grows with rank x elements)",
            curv_ir::StructureKind::Dense => "a structure that does not keep an n x n matrix, such as `kronecker`",
            _ => "a structure with less state, or a smaller model",
        };
        self.emit(diagnostic.with_help(format!("use {help}")));
    }

    /// Adds the outputs metrics read: the model's output and the target of a standard loss.
    fn add_metric_outputs(&self, function: &mut Function, loss_expr: &Expr, kind: LossKind) {
        let Expr::Call(call) = loss_expr else { return };
        if kind == LossKind::Custom || call.args.len() != 2 {
            return;
        }
        let first = self.expression_values.get(&call.args[0].span()).copied();
        let second = self.expression_values.get(&call.args[1].span()).copied();
        let names = if kind == LossKind::CrossEntropy { ("logits", "labels") } else { ("prediction", "target") };
        if let (Some(first), Some(second)) = (first, second) {
            function.outputs.push((names.0.to_string(), first));
            function.outputs.push((names.1.to_string(), second));
        }
    }

    fn setting_positive_int(&mut self, setting: &ast::Setting) -> Option<i64> {
        let value = self.setting_int(setting, 1)?;
        Some(value)
    }

    fn setting_int(&mut self, setting: &ast::Setting, minimum: i64) -> Option<i64> {
        match setting.values.as_slice() {
            [Expr::Int(value, span)] => {
                if *value < minimum {
                    let message = if minimum == 1 { "must be positive" } else { "must not be negative" };
                    self.emit(Diagnostic::error(
                        "E0304",
                        *span,
                        format!("`{}` {message}, found {value}", setting.key.name),
                        message.to_string(),
                    ));
                    return None;
                }
                Some(*value)
            }
            [Expr::Neg(inner, span)] if matches!(inner.as_ref(), Expr::Int(..)) => {
                let message = if minimum == 1 { "must be positive" } else { "must not be negative" };
                let value = match inner.as_ref() {
                    Expr::Int(value, _) => *value,
                    _ => 0,
                };
                self.emit(Diagnostic::error(
                    "E0304",
                    *span,
                    format!("`{}` {message}, found -{value}", setting.key.name),
                    "negative",
                ));
                None
            }
            [Expr::Error(_)] => None,
            [other] => {
                let mut diagnostic = Diagnostic::error(
                    "E0112",
                    other.span(),
                    format!("`{}` takes an integer", setting.key.name),
                    "not an integer",
                );
                // `1e4` is a float in curv; a whole number can simply be written out.
                if let Expr::Float(value, _) = other {
                    if value.fract() == 0.0 && value.abs() < 1e15 {
                        diagnostic =
                            diagnostic.with_help(format!("write it as `{} {}`", setting.key.name, *value as i64));
                    }
                }
                self.emit(diagnostic);
                None
            }
            _ => {
                self.emit(Diagnostic::error(
                    "E0104",
                    setting.span,
                    format!("`{}` takes one value", setting.key.name),
                    "expected one value",
                ));
                None
            }
        }
    }

    fn every_of(&mut self, setting: &ast::Setting) -> Option<i64> {
        match &setting.every {
            Some(Expr::Int(value, span)) => {
                if *value <= 0 {
                    self.emit(Diagnostic::error(
                        "E0304",
                        *span,
                        format!("`every` must be positive, found {value}"),
                        "not positive",
                    ));
                    return None;
                }
                Some(*value)
            }
            Some(other) => {
                self.emit(Diagnostic::error(
                    "E0304",
                    other.span(),
                    "`every` takes a positive integer",
                    "not a positive integer",
                ));
                None
            }
            None => {
                self.emit(
                    Diagnostic::error(
                        "E0306",
                        setting.span,
                        format!("`{}` needs a period", setting.key.name),
                        "missing `every N`",
                    )
                    .with_help(format!("write `{} ... every 100`", setting.key.name)),
                );
                None
            }
        }
    }

    fn logging(&mut self, setting: &ast::Setting, kind: LossKind, program: &TrainProgram) -> Option<Logging> {
        let mut available: Vec<&str> = builtins::METRICS_ALWAYS.to_vec();
        match kind {
            LossKind::CrossEntropy => available.extend(builtins::METRICS_CLASSIFICATION),
            LossKind::MeanSquaredError => available.extend(builtins::METRICS_REGRESSION),
            LossKind::Custom => {}
        }
        let mut metrics = Vec::new();
        for value in &setting.values {
            let Expr::Name(ident) = value else {
                self.emit(Diagnostic::error(
                    "E0307",
                    value.span(),
                    "metrics are named, such as `loss` or `accuracy`",
                    "not a metric name",
                ));
                return None;
            };
            if !available.contains(&ident.name.as_str()) {
                let mut diagnostic = Diagnostic::error(
                    "E0307",
                    ident.span,
                    format!("unknown metric `{}` for this loss", ident.name),
                    "not available",
                );
                diagnostic = match closest(&ident.name, available.iter().copied()) {
                    Some(suggestion) => diagnostic.with_help(format!("did you mean `{suggestion}`?")),
                    None => {
                        diagnostic.with_help(format!("the metrics of this train block are: {}", available.join(", ")))
                    }
                };
                if builtins::METRICS_CLASSIFICATION.contains(&ident.name.as_str()) {
                    diagnostic = diagnostic.with_note("accuracy needs a `cross_entropy` loss");
                } else if builtins::METRICS_REGRESSION.contains(&ident.name.as_str()) {
                    diagnostic = diagnostic.with_note("psnr needs an `mse` loss");
                }
                self.emit(diagnostic);
                return None;
            }
            if ident.name.starts_with("test_") && program.data.test_examples == 0 {
                self.emit(
                    Diagnostic::error(
                        "E0307",
                        ident.span,
                        format!("`{}` needs a test split, but `{}` has none", ident.name, program.data.name),
                        "no test examples",
                    )
                    .with_help("add `test_fraction = 0.2` to the data declaration"),
                );
                return None;
            }
            metrics.push(ident.name.clone());
        }
        if metrics.is_empty() {
            metrics.push("loss".to_string());
        }
        let every = self.every_of(setting)?;
        Some(Logging { metrics, every })
    }
}

/// A byte count in binary units (`24.4 GiB`).
pub(crate) fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}
