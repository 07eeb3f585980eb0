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

/// What the checker asks the data prober for one `data` declaration.
#[derive(Debug, Clone, PartialEq)]
pub struct DataRequest {
    pub name: String,
    /// `csv`, `image`, `npy` or `idx`.
    pub source: String,
    /// Path options (`path`, `x`, `y`, `images`, `labels`) as written, relative to the file.
    pub paths: Vec<(String, String)>,
    pub label: Option<String>,
    /// Every numeric option after defaults (`scale`, `test_fraction`, `seed`, ...).
    pub options: Vec<(String, f64)>,
}

/// The probe's answer: fields with their full shapes (leading dimension = examples).
#[derive(Debug, Clone, PartialEq)]
pub struct ProbedData {
    pub fields: Vec<(String, DType, Vec<i64>)>,
    pub examples: i64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DataProbeError {
    /// Which path option the error is about (its span gets the label).
    pub path_key: String,
    pub not_found: bool,
    pub message: String,
}

/// Reads data schemas for the checker; the driver implements it with real file access.
pub trait DataProbe {
    fn probe(&mut self, request: &DataRequest) -> Result<ProbedData, DataProbeError>;
}

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

    fn check_data(&mut self, probe: &mut dyn DataProbe) {
        let names: Vec<String> = self.data.keys().cloned().collect();
        for name in names {
            let decl = self.data[&name].decl;
            let Some((request, test_fraction, path_spans)) = self.data_request(decl) else {
                continue;
            };
            match probe.probe(&request) {
                Ok(schema) => {
                    let entry = self.data.get_mut(&name).expect("registered above");
                    entry.schema = Some(schema);
                    entry.test_fraction = test_fraction;
                    entry.request = Some(request);
                }
                Err(error) => {
                    let span = path_spans.get(&error.path_key).copied().unwrap_or(decl.source.span());
                    // The path as written, which is what the user can find in the source.
                    let written = request
                        .paths
                        .iter()
                        .find(|(key, _)| *key == error.path_key)
                        .map_or(String::new(), |(_, path)| path.clone());
                    let diagnostic = if error.not_found {
                        Diagnostic::error(
                            "E0400",
                            span,
                            format!("data file `{written}` not found"),
                            "this path does not exist",
                        )
                        .with_help("relative paths are resolved against the directory of the .curv file")
                    } else {
                        Diagnostic::error(
                            "E0401",
                            span,
                            format!("cannot read data file `{written}`: {}", error.message),
                            "this file is unreadable or corrupt",
                        )
                    };
                    self.emit(diagnostic);
                    self.data.get_mut(&name).expect("registered above").request = Some(request);
                }
            }
        }
    }

    /// Validates a data declaration's source call and turns it into a probe request.
    fn data_request(&mut self, decl: &ast::DataDecl) -> Option<(DataRequest, f64, HashMap<String, Span>)> {
        let Expr::Call(call) = &decl.source else {
            self.emit(
                Diagnostic::error(
                    "E0402",
                    decl.source.span(),
                    "a data set must come from a data source",
                    "expected a call such as `csv(\"file.csv\")`",
                )
                .with_help("the data sources are: csv, image, npy, idx"),
            );
            return None;
        };
        let Some(spec) = builtins::data_source(&call.name.name) else {
            let names: Vec<&str> = builtins::DATA_SOURCES.iter().map(|spec| spec.name).collect();
            let mut diagnostic = Diagnostic::error(
                "E0106",
                call.name.span,
                format!("unknown data source `{}`", call.name.name),
                "not a data source",
            );
            diagnostic = match closest(&call.name.name, names.iter().copied()) {
                Some(suggestion) => diagnostic.with_help(format!("did you mean `{suggestion}`?")),
                None => diagnostic.with_help(format!("the data sources are: {}", names.join(", "))),
            };
            self.emit(diagnostic);
            return None;
        };
        let mut paths = Vec::new();
        let mut path_spans = HashMap::new();
        let mut label = None;
        let mut test_fraction = 0.0;
        let mut given_options: Vec<(String, f64)> = Vec::new();
        let mut positional_index = 0;
        for arg in &call.args {
            let (key, value) = match arg {
                ast::Arg::Positional(value) => {
                    let Some(key) = spec.paths.get(positional_index) else {
                        self.emit(Diagnostic::error(
                            "E0104",
                            value.span(),
                            format!("`{}` takes {} positional path argument(s)", spec.name, spec.paths.len()),
                            "unexpected argument",
                        ));
                        return None;
                    };
                    positional_index += 1;
                    (key.to_string(), value)
                }
                ast::Arg::Named(key, value) => (key.name.clone(), value),
            };
            if spec.paths.contains(&key.as_str()) || key == "label" {
                let Expr::Str(text, span) = value else {
                    self.emit(Diagnostic::error(
                        "E0112",
                        value.span(),
                        format!("`{key}` must be a string"),
                        "expected a string",
                    ));
                    return None;
                };
                if key == "label" {
                    label = Some(text.clone());
                } else {
                    paths.push((key.clone(), text.clone()));
                    path_spans.insert(key.clone(), *span);
                }
                continue;
            }
            let Some(option) = spec.options.iter().find(|option| option.name == key) else {
                let known: Vec<&str> =
                    spec.paths.iter().copied().chain(spec.options.iter().map(|option| option.name)).collect();
                let span = match arg {
                    ast::Arg::Named(ident, _) => ident.span,
                    ast::Arg::Positional(expr) => expr.span(),
                };
                self.emit(
                    Diagnostic::error(
                        "E0103",
                        span,
                        format!("`{}` has no option `{key}`", spec.name),
                        "unknown option",
                    )
                    .with_help(format!("the options of `{}` are: {}", spec.name, known.join(", "))),
                );
                return None;
            };
            let number = crate::optimizer::option_number_value(self, option, value)?;
            if key == "test_fraction" {
                test_fraction = number;
            }
            given_options.push((key.clone(), number));
        }
        let mut options = Vec::new();
        for option in spec.options {
            if let Some((_, value)) = given_options.iter().find(|(key, _)| key == option.name) {
                options.push((option.name.to_string(), *value));
            } else if let crate::builtins::OptionDefault::Number(value) = option.default {
                options.push((option.name.to_string(), value));
            }
        }
        for required in spec.paths {
            if !paths.iter().any(|(key, _)| key == required) {
                self.emit(Diagnostic::error(
                    "E0306",
                    call.span,
                    format!("`{}` needs the path `{required}`", spec.name),
                    format!("`{required}` is missing"),
                ));
                return None;
            }
        }
        if spec.name == "csv" && label.is_none() {
            self.emit(
                Diagnostic::error("E0306", call.span, "`csv` needs the name of its label column", "`label` is missing")
                    .with_help("add `label = \"name\"` with the column that holds the class or target"),
            );
            return None;
        }
        let request =
            DataRequest { name: decl.name.name.clone(), source: spec.name.to_string(), paths, label, options };
        Some((request, test_fraction, path_spans))
    }

    /// The data set's fields as the IR sees them, or `None` when the data could not be read.
    pub(crate) fn data_info(&self, name: &str) -> Option<DataInfo> {
        let entry = self.data.get(name)?;
        let schema = entry.schema.as_ref()?;
        let request = entry.request.as_ref()?;
        let test_examples = ((schema.examples as f64) * entry.test_fraction).round() as i64;
        Some(DataInfo {
            name: name.to_string(),
            kind: request.source.clone(),
            path: request.paths.first().map(|(_, path)| path.clone()).unwrap_or_default(),
            paths: request.paths.clone(),
            label: request.label.clone(),
            options: request.options.clone(),
            fields: schema
                .fields
                .iter()
                .map(|(field, dtype, shape)| (field.clone(), TensorType::known(*dtype, shape)))
                .collect(),
            examples: schema.examples,
            test_examples,
        })
    }

    // -----------------------------------------------------------------------------------------
    // Models.

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

    fn lower_body_inner(
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

    fn resolve_init(&mut self, decl: &ast::ParamDecl, ty: &TensorType) -> Option<Init> {
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
struct BodyScope<'a> {
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
const RECURSIVE_LETS: usize = 32;

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
