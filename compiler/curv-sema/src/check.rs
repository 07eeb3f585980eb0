//! The checker: registers items, probes data, checks every model generically, then lowers each
//! `train` block to a concrete [`TrainProgram`].

use crate::builtins;
use crate::diagnostic::{Diagnostic, Label, SourceId};
use crate::lower::{Lookup, Scope, Val};
use crate::std_lib;
use crate::suggest::closest;
use curv_grammar::ast::{self, Expr, Item};
use curv_grammar::Span;
use curv_ir::{
    DType, DataInfo, Dim, Function, Init, LossKind, Op, ParamInfo, Program, TensorType, TrainProgram, ValueId,
};
use std::collections::{BTreeMap, HashMap, HashSet};

mod body;
mod data;

pub(crate) use body::Body;
pub use data::{DataProbe, DataProbeError, DataRequest, ProbedData};

/// The result of analysing one file.
#[derive(Debug, Clone)]
pub struct Analysis {
    pub program: Program,
    pub diagnostics: Vec<Diagnostic>,
}

impl Analysis {
    pub fn has_errors(&self) -> bool {
        self.diagnostics.iter().any(Diagnostic::is_error)
    }
}

/// A named item and the source it comes from.
pub(crate) struct Sourced<'a, T> {
    pub item: &'a T,
    pub source: SourceId,
}

impl<T> Clone for Sourced<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Sourced<'_, T> {}

pub(crate) struct DataEntry<'a> {
    pub decl: &'a ast::DataDecl,
    pub request: Option<DataRequest>,
    pub schema: Option<ProbedData>,
    pub test_fraction: f64,
}

pub struct Checker<'a> {
    pub(crate) diagnostics: Vec<Diagnostic>,
    pub(crate) source: SourceId,
    pub(crate) dims: HashMap<String, i64>,
    pub(crate) data: BTreeMap<String, DataEntry<'a>>,
    pub(crate) models: HashMap<String, Sourced<'a, ast::ModelDecl>>,
    pub(crate) losses: HashMap<String, Sourced<'a, ast::LossDecl>>,
    pub(crate) optimizers: HashMap<String, Sourced<'a, ast::OptimizerDecl>>,
    pub(crate) rules: HashMap<String, Sourced<'a, ast::RuleDecl>>,
    pub(crate) rule_programs: HashMap<String, curv_ir::RuleProgram>,
    /// Whether each model passed its generic check.
    pub(crate) model_ok: HashMap<String, bool>,
    /// Symbolic dimensions in scope while lowering a body (name -> dimension).
    pub(crate) symbols: HashMap<String, Dim>,
    pub(crate) used_optimizers: HashSet<String>,
    /// The optimizer every train block uses instead of its own, when given.
    pub(crate) optimizer_override: Option<String>,
    pub(crate) memory_limit: Option<u64>,
    /// The value each expression lowered to, by span (the latest function only).
    pub(crate) expression_values: HashMap<Span, ValueId>,
    /// The last segments of `use` paths that name no module (`adam` for `use std.optimisers.adam`):
    /// a missing optimizer of that name is a consequence of the bad `use` and is not reported.
    pub(crate) unresolved_uses: HashSet<String>,
    /// Top-level `dim`s whose value was reported as invalid: their uses are not reported again.
    pub(crate) invalid_dims: HashSet<String>,
}

/// Choices made on the command line that change what is checked.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AnalysisOptions {
    /// Train every block with this optimizer instead of its own (`curv run --optimizer NAME`).
    /// A standard-library preset of that name is imported when the file does not define one.
    pub optimizer_override: Option<String>,
    /// The memory a run may use, in bytes (the driver reads what the machine has available): a
    /// train block whose parameters, gradients and optimizer state exceed it is an error (E0308).
    /// `None` skips the check.
    pub memory_limit: Option<u64>,
}

/// Analyses a parsed file. Never fails: problems are diagnostics.
pub fn analyze(file: &ast::File, probe: &mut dyn DataProbe) -> Analysis {
    analyze_with(file, probe, &AnalysisOptions::default())
}

/// [`analyze`] with command-line choices.
pub fn analyze_with(file: &ast::File, probe: &mut dyn DataProbe, options: &AnalysisOptions) -> Analysis {
    // Standard-library modules named by `use` are parsed first so the checker can borrow them.
    let mut modules: Vec<(usize, ast::File)> = Vec::new();
    let mut use_diagnostics = Vec::new();
    if let Some(name) = &options.optimizer_override {
        let defined_here =
            file.items.iter().any(|item| matches!(item, Item::Optimizer(decl) if decl.name.name == *name));
        if let (false, Some(index)) = (defined_here, std_lib::module_defining_optimizer(name)) {
            modules.push((index, curv_grammar::parse(std_lib::MODULES[index].1).file));
        }
    }
    let mut unresolved_uses = HashSet::new();
    for item in &file.items {
        if let Item::Use(use_decl) = item {
            let path: Vec<&str> = use_decl.path.iter().map(|ident| ident.name.as_str()).collect();
            let path = path.join(".");
            match std_lib::find(&path) {
                Some(index) if modules.iter().any(|(existing, _)| *existing == index) => {}
                Some(index) => {
                    let parsed = curv_grammar::parse(std_lib::MODULES[index].1);
                    // A syntax error in the standard library is a bug in curv, but it is still
                    // reported like any other rather than silently dropping the module's items.
                    use_diagnostics.extend(
                        parsed.errors.into_iter().map(|error| Diagnostic::from(error).in_source(SourceId::Std(index))),
                    );
                    modules.push((index, parsed.file));
                }
                None => {
                    let names: Vec<&str> = std_lib::MODULES.iter().map(|(name, _)| *name).collect();
                    // The label goes on the first segment that no module's path continues with.
                    let segments: Vec<&str> = use_decl.path.iter().map(|ident| ident.name.as_str()).collect();
                    let failing = (1..=segments.len())
                        .find(|&count| {
                            let prefix = segments[..count].join(".");
                            !names.iter().any(|name| *name == prefix || name.starts_with(&format!("{prefix}.")))
                        })
                        .unwrap_or(segments.len());
                    let (span, label) = match use_decl.path.get(failing.saturating_sub(1)) {
                        Some(segment) if failing > 1 => {
                            (segment.span, format!("not in `{}`", segments[..failing - 1].join(".")))
                        }
                        Some(segment) => (segment.span, "no such module".to_string()),
                        None => (use_decl.span, "no such module".to_string()),
                    };
                    let mut diagnostic = Diagnostic::error("E0109", span, format!("unknown module `{path}`"), label);
                    if let Some(last) = use_decl.path.last() {
                        unresolved_uses.insert(last.name.clone());
                    }
                    diagnostic = match closest(&path, names.iter().copied()) {
                        Some(suggestion) => diagnostic.with_help(format!("did you mean `{suggestion}`?")),
                        None => diagnostic.with_note(format!("the standard library has: {}", names.join(", "))),
                    };
                    use_diagnostics.push(diagnostic);
                }
            }
        }
    }
    let mut checker = Checker {
        diagnostics: use_diagnostics,
        source: SourceId::User,
        dims: HashMap::new(),
        data: BTreeMap::new(),
        models: HashMap::new(),
        losses: HashMap::new(),
        optimizers: HashMap::new(),
        rules: HashMap::new(),
        rule_programs: HashMap::new(),
        model_ok: HashMap::new(),
        symbols: HashMap::new(),
        used_optimizers: HashSet::new(),
        expression_values: HashMap::new(),
        optimizer_override: options.optimizer_override.clone(),
        memory_limit: options.memory_limit,
        unresolved_uses,
        invalid_dims: HashSet::new(),
    };
    for (index, module) in &modules {
        checker.register(module, SourceId::Std(*index));
    }
    checker.register(file, SourceId::User);
    checker.check_data(probe);
    checker.check_rules(&modules);
    checker.check_models();
    let mut program = Program::default();
    for item in &file.items {
        if let Item::Train(train) = item {
            if let Some(train_program) = checker.lower_train(train) {
                program.trains.push(train_program);
            }
        }
    }
    // Optimizers of the user's file are checked even when no train block uses them.
    for item in &file.items {
        if let Item::Optimizer(optimizer) = item {
            if !checker.used_optimizers.contains(&optimizer.name.name) {
                checker.check_optimizer_alone(optimizer);
            }
        }
    }
    let mut rule_names: Vec<&String> = checker.rule_programs.keys().collect();
    rule_names.sort();
    program.rules = rule_names.into_iter().map(|name| checker.rule_programs[name].clone()).collect();
    let mut diagnostics = checker.diagnostics;
    diagnostics.sort_by_key(|diagnostic| {
        let label = diagnostic.labels.first();
        (label.map(|label| label.source), label.map(|label| label.span.start), diagnostic.severity)
    });
    diagnostics.dedup();
    Analysis { program, diagnostics }
}

impl<'a> Checker<'a> {
    pub fn emit(&mut self, diagnostic: Diagnostic) {
        let diagnostic = if self.source == SourceId::User { diagnostic } else { diagnostic.in_source(self.source) };
        self.diagnostics.push(diagnostic);
    }

    /// The dimension a name denotes in the current body: a bound symbol or a `dim` constant.
    pub fn symbol_dim(&self, name: &str) -> Option<Dim> {
        self.symbols.get(name).cloned().or_else(|| self.dims.get(name).map(|&size| Dim::Known(size)))
    }

    fn duplicate(&mut self, kind: &str, name: &ast::Ident, first: Option<(SourceId, Span)>, source: SourceId) {
        let mut diagnostic = Diagnostic::error(
            "E0101",
            name.span,
            format!("the {kind} `{}` is defined more than once", name.name),
            format!("`{}` redefined here", name.name),
        );
        match first {
            Some((first_source, first_span)) if first_source == source => {
                diagnostic = diagnostic.with_label(first_span, "first defined here");
            }
            Some((SourceId::Std(index), _)) => {
                diagnostic = diagnostic.with_note(format!(
                    "`{}` is also defined by `use {}`",
                    name.name,
                    std_lib::MODULES[index].0
                ));
            }
            _ => {}
        }
        let previous = self.source;
        self.source = source;
        self.emit(diagnostic);
        self.source = previous;
    }

    fn register(&mut self, file: &'a ast::File, source: SourceId) {
        // One namespace for what expressions can name (dims, data, models, losses); optimizers
        // and rules have their own.
        let mut values: HashMap<String, (SourceId, Span)> = HashMap::new();
        for (name, entry) in &self.data {
            values.insert(name.clone(), (SourceId::User, entry.decl.name.span));
        }
        for (name, model) in &self.models {
            values.insert(name.clone(), (model.source, model.item.name.span));
        }
        for (name, loss) in &self.losses {
            values.insert(name.clone(), (loss.source, loss.item.name.span));
        }
        for item in &file.items {
            let (name, kind) = match item {
                Item::Dim(decl) => (&decl.name, "value"),
                Item::Data(decl) => (&decl.name, "value"),
                Item::Model(decl) => (&decl.name, "value"),
                Item::Loss(decl) => (&decl.name, "value"),
                Item::Optimizer(decl) => (&decl.name, "optimizer"),
                Item::Rule(decl) => (&decl.name, "rule"),
                _ => continue,
            };
            if kind == "value" {
                if let Some(&first) = values.get(&name.name) {
                    self.duplicate("name", name, Some(first), source);
                    continue;
                }
                values.insert(name.name.clone(), (source, name.span));
            }
            match item {
                Item::Dim(decl) => {
                    let previous = self.source;
                    self.source = source;
                    match self.dim_value(&decl.value) {
                        Some(size) => {
                            self.dims.insert(decl.name.name.clone(), size);
                        }
                        None => {
                            self.invalid_dims.insert(decl.name.name.clone());
                        }
                    }
                    self.source = previous;
                }
                Item::Data(decl) => {
                    self.data.insert(
                        decl.name.name.clone(),
                        DataEntry { decl, request: None, schema: None, test_fraction: 0.0 },
                    );
                }
                Item::Model(decl) => {
                    self.models.insert(decl.name.name.clone(), Sourced { item: decl, source });
                }
                Item::Loss(decl) => {
                    self.losses.insert(decl.name.name.clone(), Sourced { item: decl, source });
                }
                Item::Optimizer(decl) => {
                    if let Some(first) = self.optimizers.get(&decl.name.name) {
                        let first = Some((first.source, first.item.name.span));
                        self.duplicate("optimizer", &decl.name, first, source);
                    } else {
                        self.optimizers.insert(decl.name.name.clone(), Sourced { item: decl, source });
                    }
                }
                Item::Rule(decl) => {
                    if let Some(first) = self.rules.get(&decl.name.name) {
                        let first = Some((first.source, first.item.name.span));
                        self.duplicate("rule", &decl.name, first, source);
                    } else {
                        self.rules.insert(decl.name.name.clone(), Sourced { item: decl, source });
                    }
                }
                _ => {}
            }
        }
    }

    /// Evaluates a `dim` value: a positive integer expression over integers and other dims.
    fn dim_value(&mut self, expr: &Expr) -> Option<i64> {
        let value = self.const_int_expr(expr)?;
        if value <= 0 {
            self.emit(Diagnostic::error(
                "E0304",
                expr.span(),
                format!("a dimension must be positive, found {value}"),
                "not positive",
            ));
            return None;
        }
        Some(value)
    }

    fn const_int_expr(&mut self, expr: &Expr) -> Option<i64> {
        match expr {
            Expr::Int(value, _) => Some(*value),
            Expr::Name(ident) => match self.dims.get(&ident.name) {
                Some(value) => Some(*value),
                None if self.invalid_dims.contains(&ident.name) => None,
                None => {
                    let names: Vec<String> = self.dims.keys().cloned().collect();
                    self.report_undefined(ident, &names);
                    None
                }
            },
            Expr::Binary(op, left, right, span) => {
                let left = self.const_int_expr(left)?;
                let right = self.const_int_expr(right)?;
                let result = match op {
                    ast::BinaryOp::Add => left.checked_add(right),
                    ast::BinaryOp::Sub => left.checked_sub(right),
                    ast::BinaryOp::Mul => left.checked_mul(right),
                    ast::BinaryOp::Div if right != 0 && left % right == 0 => Some(left / right),
                    _ => None,
                };
                if result.is_none() {
                    self.emit(Diagnostic::error(
                        "E0112",
                        *span,
                        "not an integer dimension",
                        "this does not evaluate to an integer",
                    ));
                }
                result
            }
            Expr::Error(_) => None,
            other => {
                self.emit(Diagnostic::error(
                    "E0112",
                    other.span(),
                    "a dimension must be an integer expression",
                    "not an integer expression",
                ));
                None
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Data.

    fn check_models(&mut self) {
        let mut names: Vec<String> = self.models.keys().cloned().collect();
        names.sort();
        for name in names {
            let model = self.models[&name];
            self.source = model.source;
            let errors_before = self.error_count();
            let mut scratch = Function::new(name.clone());
            let mut params = Vec::new();
            let body = Body::Model(model.item);
            let _ = self.lower_body(&body, None, &mut scratch, &mut params, true);
            let ok = self.error_count() == errors_before;
            self.model_ok.insert(name.clone(), ok);
            self.source = SourceId::User;
        }
        let mut loss_names: Vec<String> = self.losses.keys().cloned().collect();
        loss_names.sort();
        for name in loss_names {
            let loss = self.losses[&name];
            self.source = loss.source;
            let errors_before = self.error_count();
            let mut scratch = Function::new(name.clone());
            let mut params = Vec::new();
            let _ = self.lower_body(&Body::Loss(loss.item), None, &mut scratch, &mut params, true);
            let ok = self.error_count() == errors_before;
            self.model_ok.insert(name.clone(), ok);
            self.source = SourceId::User;
        }
    }

    pub(crate) fn error_count(&self) -> usize {
        self.diagnostics.iter().filter(|diagnostic| diagnostic.is_error()).count()
    }

    /// Converts a written type to a tensor type under the current symbols. In a signature
    /// (`introduce = true`) unknown names become symbols; elsewhere they must be bound.
    pub(crate) fn resolve_type(&mut self, ty: &ast::TypeExpr, introduce: bool) -> Option<TensorType> {
        let Some(dtype) = DType::from_name(&ty.dtype.name) else {
            let mut diagnostic = Diagnostic::error(
                "E0207",
                ty.dtype.span,
                format!("unknown element type `{}`", ty.dtype.name),
                "not a type",
            );
            diagnostic = match closest(&ty.dtype.name, ["f32", "f64", "i32"]) {
                Some(suggestion) => diagnostic.with_help(format!("did you mean `{suggestion}`?")),
                None => diagnostic.with_help("the element types are f32, f64 and i32"),
            };
            self.emit(diagnostic);
            return None;
        };
        let mut shape = Vec::new();
        for dim in &ty.dims {
            shape.push(self.resolve_dim(dim, introduce)?);
        }
        Some(TensorType { dtype, shape })
    }

    fn resolve_dim(&mut self, dim: &ast::DimExpr, introduce: bool) -> Option<Dim> {
        match dim {
            ast::DimExpr::Int(size, span) => {
                if *size <= 0 {
                    self.emit(Diagnostic::error(
                        "E0304",
                        *span,
                        format!("a dimension must be positive, found {size}"),
                        "not positive",
                    ));
                    return None;
                }
                Some(Dim::Known(*size))
            }
            ast::DimExpr::Name(ident) => {
                if let Some(dim) = self.symbol_dim(&ident.name) {
                    return Some(dim);
                }
                if self.invalid_dims.contains(&ident.name) {
                    return None;
                }
                if introduce {
                    let dim = Dim::Symbol(ident.name.clone());
                    self.symbols.insert(ident.name.clone(), dim.clone());
                    return Some(dim);
                }
                self.emit(
                    Diagnostic::error(
                        "E0205",
                        ident.span,
                        format!("the dimension `{}` is not bound", ident.name),
                        "unbound dimension",
                    )
                    .with_help(format!("declare it with `dim {} = ...` or use it in an input's type", ident.name)),
                );
                // The name is bound from here on so that its other uses in this body are not
                // reported again.
                self.symbols.insert(ident.name.clone(), Dim::Symbol(ident.name.clone()));
                None
            }
            ast::DimExpr::Mul(left, right, span) => {
                let left = self.resolve_dim(left, introduce)?;
                let right = self.resolve_dim(right, introduce)?;
                match (left, right) {
                    (Dim::Known(a), Dim::Known(b)) => Some(Dim::Known(a * b)),
                    _ => {
                        self.emit(Diagnostic::error(
                            "E0205",
                            *span,
                            "products of symbolic dimensions are not supported",
                            "declare a `dim` for the product",
                        ));
                        None
                    }
                }
            }
            ast::DimExpr::Error(_) => None,
        }
    }
}

pub(crate) fn label_in(source: SourceId, span: Span, message: &str) -> Label {
    Label { source, span, message: message.to_string() }
}

/// The kind of a train's loss expression.
pub(crate) fn loss_kind(expr: &Expr) -> LossKind {
    match expr {
        Expr::Call(call) if call.name.name == "cross_entropy" => LossKind::CrossEntropy,
        Expr::Call(call) if call.name.name == "mse" => LossKind::MeanSquaredError,
        _ => LossKind::Custom,
    }
}

pub(crate) fn new_train_program(name: &str, data: DataInfo, span: Span) -> TrainProgram {
    TrainProgram {
        name: name.to_string(),
        params: Vec::new(),
        data,
        batch: 0,
        steps: 0,
        seed: 0,
        loss_kind: LossKind::Custom,
        loss: Function::new("loss"),
        test_loss: None,
        optimizer: curv_ir::OptimizerPlan {
            name: String::new(),
            lr: 0.0,
            schedule: None,
            settings: Vec::new(),
            plans: Vec::new(),
        },
        log: None,
        eval: None,
        checkpoint_every: None,
        skip_nonfinite: false,
        span,
    }
}
