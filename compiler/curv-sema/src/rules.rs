//! Checking and lowering of `rule` items: state, cadence blocks and sequential updates, as
//! generic functions of a parameter `p` of symbolic shape `P`.

use crate::check::Checker;
use crate::diagnostic::Diagnostic;
use crate::lower::{Lookup, Scope, Val};
use curv_grammar::ast::{self, Expr, RuleStmt};
use curv_ir::{DType, Dim, Function, Op, RuleProgram, TensorType, ValueId};
use std::collections::{BTreeSet, HashMap};

/// Names inside a rule: `p`, `g`, hyperparameters, `lr`, `step`, state and lets.
struct RuleScope {
    /// Current value of each name (rebinding on assignment gives sequential semantics).
    values: HashMap<String, ValueId>,
    hyperparameters: Vec<String>,
    statistics: BTreeSet<String>,
}

impl Scope for RuleScope {
    fn name(&mut self, checker: &mut Checker, ident: &ast::Ident, function: &mut Function) -> Option<Lookup> {
        if let Some(value) = self.values.get(&ident.name) {
            return Some(Lookup::Found(Val::Value(*value)));
        }
        if ident.name == "lr" || ident.name == "batch" || self.hyperparameters.contains(&ident.name) {
            let value = function.push(
                Op::Hyper { name: ident.name.clone() },
                vec![],
                TensorType::scalar(DType::F32),
                ident.span,
            );
            self.values.insert(ident.name.clone(), value);
            return Some(Lookup::Found(Val::Value(value)));
        }
        if ident.name == "step" {
            let value = function.push(Op::Step, vec![], TensorType::scalar(DType::F32), ident.span);
            self.values.insert(ident.name.clone(), value);
            return Some(Lookup::Found(Val::Value(value)));
        }
        let _ = checker;
        None
    }

    fn field(
        &mut self,
        _checker: &mut Checker,
        _base: &ast::Ident,
        _field: &ast::Ident,
        _function: &mut Function,
    ) -> Option<Lookup> {
        None
    }

    fn call(&mut self, _checker: &mut Checker, _call: &ast::Call, _function: &mut Function) -> Option<Lookup> {
        None
    }

    fn visible_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.values.keys().cloned().collect();
        names.extend(self.hyperparameters.iter().cloned());
        names.push("lr".to_string());
        names.push("batch".to_string());
        names.push("step".to_string());
        names.sort();
        names
    }

    fn allows_statistics(&self) -> bool {
        true
    }
}

fn parameter_type() -> TensorType {
    TensorType { dtype: DType::F32, shape: vec![Dim::Symbol("P".to_string())] }
}

impl<'a> Checker<'a> {
    pub(crate) fn check_rules(&mut self, _modules: &[(usize, ast::File)]) {
        let mut names: Vec<String> = self.rules.keys().cloned().collect();
        names.sort();
        for name in names {
            let rule = self.rules[&name];
            self.source = rule.source;
            if let Some(program) = self.lower_rule(rule.item) {
                self.rule_programs.insert(name, program);
            }
            self.source = crate::diagnostic::SourceId::User;
        }
    }

    fn lower_rule(&mut self, rule: &ast::RuleDecl) -> Option<RuleProgram> {
        let errors_before = self.error_count();
        if rule.tensors.len() != 2 {
            self.emit(
                Diagnostic::error(
                    "E0104",
                    rule.name.span,
                    format!("rule `{}` must name the parameter and its gradient", rule.name.name),
                    "expected `(p, g; ...)`",
                )
                .with_help(format!("write `rule {}(p, g; hyperparameters...)`", rule.name.name)),
            );
            return None;
        }
        let parameter = rule.tensors[0].name.clone();
        let gradient = rule.tensors[1].name.clone();
        let mut hyperparameters = Vec::new();
        for hyperparameter in &rule.hyperparameters {
            let default = match &hyperparameter.default {
                Some(expr) => match constant(expr) {
                    Some(value) => value,
                    None => {
                        self.emit(Diagnostic::error(
                            "E0112",
                            expr.span(),
                            "a hyperparameter default must be a number",
                            "not a constant number",
                        ));
                        return None;
                    }
                },
                None => f64::NAN,
            };
            if ["lr", "step", "batch", parameter.as_str(), gradient.as_str()]
                .contains(&hyperparameter.name.name.as_str())
            {
                self.emit(Diagnostic::error(
                    "E0101",
                    hyperparameter.name.span,
                    format!("`{}` is built in or already named in this rule", hyperparameter.name.name),
                    "reserved name",
                ));
                return None;
            }
            hyperparameters.push((hyperparameter.name.name.clone(), default));
        }
        let hyperparameter_names: Vec<String> = hyperparameters.iter().map(|(name, _)| name.clone()).collect();
        // State declarations (top level) form the init function.
        let mut init = Function::new("init");
        let p_init =
            init.push(Op::Input { index: 0, name: parameter.clone() }, vec![], parameter_type(), rule.tensors[0].span);
        let g_init =
            init.push(Op::Input { index: 1, name: gradient.clone() }, vec![], parameter_type(), rule.tensors[1].span);
        let mut scope = RuleScope {
            values: HashMap::from([(parameter.clone(), p_init), (gradient.clone(), g_init)]),
            hyperparameters: hyperparameter_names.clone(),
            statistics: BTreeSet::new(),
        };
        let mut state_names: Vec<String> = Vec::new();
        let mut blocks = Vec::new();
        for statement in &rule.body {
            match statement {
                RuleStmt::State(decl) => {
                    if state_names.contains(&decl.name.name)
                        || decl.name.name == parameter
                        || decl.name.name == gradient
                    {
                        self.emit(Diagnostic::error(
                            "E0101",
                            decl.name.span,
                            format!("`{}` is already defined in this rule", decl.name.name),
                            "defined again",
                        ));
                        continue;
                    }
                    if let Some(value) = self.lower_expr(&mut scope, &decl.value, &mut init) {
                        let value = self.materialize(&mut init, value, decl.value.span());
                        let ty = init.ty(value).clone();
                        let value = if ty.shape.is_empty() {
                            self.broadcast_to(&mut init, value, &parameter_type().shape, decl.span)
                        } else {
                            value
                        };
                        if init.ty(value).shape != parameter_type().shape {
                            self.emit(Diagnostic::error(
                                "E0202",
                                decl.value.span(),
                                format!(
                                    "state `{}` must have the parameter's shape, found {}",
                                    decl.name.name,
                                    init.ty(value)
                                ),
                                "wrong shape",
                            ));
                            continue;
                        }
                        init.outputs.push((decl.name.name.clone(), value));
                    }
                    state_names.push(decl.name.name.clone());
                }
                RuleStmt::Every(block) => blocks.push(block),
                RuleStmt::Let(decl) | RuleStmt::Assign(decl) => {
                    self.emit(
                        Diagnostic::error(
                            "E0111",
                            decl.span,
                            "updates belong inside an `every` block",
                            "outside `every`",
                        )
                        .with_help("wrap the update in `every step { ... }`"),
                    );
                }
                RuleStmt::Error(_) => {}
            }
        }
        let mut updates = Vec::new();
        let mut statistics = BTreeSet::new();
        for block in blocks {
            let period = match (&block.period, block.unit.name.as_str()) {
                (None, "step") => Some(1),
                (Some(Expr::Int(value, span)), "steps") => {
                    if *value <= 0 {
                        self.emit(
                            Diagnostic::error(
                                "E0304",
                                *span,
                                format!("a period must be positive, found {value}"),
                                "not positive",
                            )
                            .with_help("write `every N steps` with N at least 1, or `every step`"),
                        );
                        None
                    } else {
                        Some(*value)
                    }
                }
                (Some(other), "steps") => {
                    self.emit(Diagnostic::error(
                        "E0112",
                        other.span(),
                        "a period must be an integer",
                        "not an integer",
                    ));
                    None
                }
                _ => {
                    self.emit(Diagnostic::error(
                        "E0112",
                        block.unit.span,
                        format!("expected `every step` or `every N steps`, found `{}`", block.unit.name),
                        "unknown cadence",
                    ));
                    None
                }
            };
            let Some(period) = period else { continue };
            let after = match &block.after {
                None => period,
                Some((word, Expr::Int(value, _))) if word.name == "from" && *value >= 1 => *value,
                Some((word, value)) => {
                    let (span, message) = if word.name == "from" {
                        (value.span(), "the first step must be an integer of at least 1".to_string())
                    } else {
                        (word.span, format!("expected `from`, found `{}`", word.name))
                    };
                    self.emit(
                        Diagnostic::error("E0112", span, message, "invalid start")
                            .with_help("write `every step, from 2 { ... }` to skip the first step"),
                    );
                    continue;
                }
            };
            if updates.iter().any(|(existing, existing_after, _)| *existing == period && *existing_after == after) {
                self.emit(Diagnostic::error(
                    "E0101",
                    block.span,
                    "two `every` blocks with the same period",
                    "merge them into one block",
                ));
                continue;
            }
            let mut update = Function::new("update");
            let mut values = HashMap::new();
            values.insert(
                parameter.clone(),
                update.push(
                    Op::Input { index: 0, name: parameter.clone() },
                    vec![],
                    parameter_type(),
                    rule.tensors[0].span,
                ),
            );
            values.insert(
                gradient.clone(),
                update.push(
                    Op::Input { index: 1, name: gradient.clone() },
                    vec![],
                    parameter_type(),
                    rule.tensors[1].span,
                ),
            );
            for (index, name) in state_names.iter().enumerate() {
                values.insert(
                    name.clone(),
                    update.push(
                        Op::Input { index: index + 2, name: name.clone() },
                        vec![],
                        parameter_type(),
                        block.span,
                    ),
                );
            }
            let mut block_scope =
                RuleScope { values, hyperparameters: hyperparameter_names.clone(), statistics: BTreeSet::new() };
            let mut assigned: Vec<String> = Vec::new();
            self.lower_rule_statements(
                &block.body,
                &mut block_scope,
                &mut update,
                &parameter,
                &gradient,
                &state_names,
                &mut assigned,
            );
            for name in std::iter::once(&parameter).chain(state_names.iter()) {
                if assigned.contains(name) {
                    update.outputs.push((name.clone(), block_scope.values[name]));
                }
            }
            for inst in &update.insts {
                if let Op::Statistic { kind } = &inst.op {
                    block_scope.statistics.insert(kind.clone());
                }
            }
            statistics.extend(block_scope.statistics);
            updates.push((period, after, update));
        }
        if updates.is_empty() && self.error_count() == errors_before {
            self.emit(
                Diagnostic::error(
                    "E0306",
                    rule.name.span,
                    format!("rule `{}` never updates anything", rule.name.name),
                    "no `every` block",
                )
                .with_help("add `every step { p = p - lr * g }` or similar"),
            );
        }
        if !updates.iter().any(|(_, _, update)| update.output(&parameter).is_some())
            && !updates.is_empty()
            && self.error_count() == errors_before
        {
            self.emit(
                Diagnostic::warning(
                    "W0003",
                    rule.name.span,
                    format!("rule `{}` never assigns `{parameter}`", rule.name.name),
                    "the parameter is never updated",
                )
                .with_help(format!(
                    "assign `{parameter}` in an `every` block, such as `{parameter} = {parameter} - lr * {}`",
                    rule.tensors[1].name
                )),
            );
        }
        if self.error_count() != errors_before {
            return None;
        }
        // Blocks due at the same step run in declaration order.
        let updates = updates
            .into_iter()
            .map(|(period, from, function)| curv_ir::RuleUpdate { period, from, function })
            .collect();
        let module = match self.source {
            crate::diagnostic::SourceId::User => None,
            crate::diagnostic::SourceId::Std(index) => Some(crate::std_lib::MODULES[index].0.to_string()),
        };
        Some(RuleProgram {
            name: rule.name.name.clone(),
            module,
            hyperparameters,
            state: state_names,
            init,
            updates,
            statistics: statistics.into_iter().collect(),
        })
    }

    #[allow(clippy::too_many_arguments)]
    fn lower_rule_statements(
        &mut self,
        statements: &[RuleStmt],
        scope: &mut RuleScope,
        function: &mut Function,
        parameter: &str,
        gradient: &str,
        state_names: &[String],
        assigned: &mut Vec<String>,
    ) {
        // States wrongly declared inside this block (reported once, where they are declared).
        let mut misplaced_states: Vec<String> = Vec::new();
        for statement in statements {
            match statement {
                RuleStmt::Let(decl) => {
                    if let Some(value) = self.lower_expr(scope, &decl.value, function) {
                        let value = self.materialize(function, value, decl.value.span());
                        scope.values.insert(decl.name.name.clone(), value);
                    }
                }
                RuleStmt::Assign(decl) => {
                    let name = decl.name.name.as_str();
                    if name == gradient {
                        self.emit(
                            Diagnostic::error("E0111", decl.name.span, "the gradient cannot be assigned", "read-only")
                                .with_help("use a `let` for a modified gradient"),
                        );
                        continue;
                    }
                    if name != parameter && !state_names.iter().any(|state| state == name) {
                        // A state declared inside this block was already reported where it is declared.
                        if !misplaced_states.iter().any(|state| state == name) {
                            self.emit(
                                Diagnostic::error(
                                    "E0100",
                                    decl.name.span,
                                    format!("`{name}` is not a state of this rule"),
                                    "cannot assign here",
                                )
                                .with_help(format!(
                                    "declare it with `state {name} = zeros_like({parameter})`, or use `let`"
                                )),
                            );
                        }
                        // It is still bound, as a `let` would be, so that its later uses are not
                        // reported as undefined.
                        if let Some(value) = self.lower_expr(scope, &decl.value, function) {
                            let value = self.materialize(function, value, decl.value.span());
                            scope.values.insert(name.to_string(), value);
                        }
                        continue;
                    }
                    if let Some(value) = self.lower_expr(scope, &decl.value, function) {
                        let value = self.materialize(function, value, decl.value.span());
                        let value = if function.ty(value).shape.is_empty() {
                            self.broadcast_to(function, value, &parameter_type().shape, decl.span)
                        } else {
                            value
                        };
                        if *function.ty(value) != parameter_type() {
                            self.emit(Diagnostic::error(
                                "E0202",
                                decl.value.span(),
                                format!("`{name}` must keep the parameter's shape, found {}", function.ty(value)),
                                "wrong shape",
                            ));
                            continue;
                        }
                        scope.values.insert(name.to_string(), value);
                        if !assigned.iter().any(|existing| existing == name) {
                            assigned.push(name.to_string());
                        }
                    }
                }
                RuleStmt::State(decl) => {
                    self.emit(
                        Diagnostic::error(
                            "E0111",
                            decl.span,
                            "`state` is declared at the top of a rule",
                            "inside an `every` block",
                        )
                        .with_help("move the declaration above the `every` block"),
                    );
                    // It is still bound, so that its uses in this block are not reported again.
                    if let Some(value) = self.lower_expr(scope, &decl.value, function) {
                        let value = self.materialize(function, value, decl.value.span());
                        scope.values.insert(decl.name.name.clone(), value);
                    }
                    misplaced_states.push(decl.name.name.clone());
                }
                RuleStmt::Every(block) => {
                    self.emit(Diagnostic::error(
                        "E0111",
                        block.span,
                        "`every` blocks cannot be nested",
                        "nested `every`",
                    ));
                }
                RuleStmt::Error(_) => {}
            }
        }
    }
}

fn constant(expr: &Expr) -> Option<f64> {
    match expr {
        Expr::Int(value, _) => Some(*value as f64),
        Expr::Float(value, _) => Some(*value),
        Expr::Neg(inner, _) => constant(inner).map(|value| -value),
        _ => None,
    }
}
