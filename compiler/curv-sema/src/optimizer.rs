//! Optimizer checks: settings, rule lines (structure, options, modifiers), and the matching of
//! rule lines to parameters that produces one [`ParamPlan`] per parameter.

use crate::builtins::{self, OptionDefault, OptionKind, OptionSpec};
use crate::check::{label_in, Checker, Sourced};
use crate::diagnostic::{Diagnostic, SourceId};
use crate::suggest::closest;
use curv_grammar::ast::{self, Arg, Expr};
use curv_grammar::Span;
use curv_ir::{
    option_name, option_number, ModifierPlan, OptimizerPlan, OptionValue, Options, ParamInfo, ParamPlan, Schedule,
    StateInfo, StructureKind, TensorType,
};
use std::collections::HashMap;

/// A rule line after its structure, options and modifiers were resolved.
struct ResolvedLine<'a> {
    line: &'a ast::RuleLine,
    structure: StructureKind,
    rule_name: String,
    needs_matrix: bool,
    options: Options,
    option_spans: HashMap<String, Span>,
    modifiers: Vec<ModifierPlan>,
}

/// Evaluates a constant number expression (`1e-3`, `-0.5`, `1 / 16`).
fn constant_number(expr: &Expr) -> Option<f64> {
    match expr {
        Expr::Int(value, _) => Some(*value as f64),
        Expr::Float(value, _) => Some(*value),
        Expr::Neg(inner, _) => constant_number(inner).map(|value| -value),
        Expr::Binary(op, left, right, _) => {
            let (left, right) = (constant_number(left)?, constant_number(right)?);
            let value = match op {
                ast::BinaryOp::Add => left + right,
                ast::BinaryOp::Sub => left - right,
                ast::BinaryOp::Mul => left * right,
                ast::BinaryOp::Div => left / right,
                ast::BinaryOp::Pow => left.powf(right),
                ast::BinaryOp::MatMul => return None,
            };
            value.is_finite().then_some(value)
        }
        _ => None,
    }
}

/// Validates a numeric option value against its kind.
pub(crate) fn option_number_value(checker: &mut Checker, spec: &OptionSpec, expr: &Expr) -> Option<f64> {
    let Some(value) = constant_number(expr) else {
        if !matches!(expr, Expr::Error(_)) {
            checker.emit(Diagnostic::error(
                "E0112",
                expr.span(),
                format!("`{}` takes a number", spec.name),
                "not a constant number",
            ));
        }
        return None;
    };
    let problem = match spec.kind {
        OptionKind::Positive if value <= 0.0 => Some(("E0304", "must be positive")),
        OptionKind::PositiveInt if value < 1.0 || value.fract() != 0.0 => Some(("E0304", "must be a positive integer")),
        OptionKind::NonNegative if value < 0.0 => Some(("E0304", "must not be negative")),
        OptionKind::Fraction if !(0.0..1.0).contains(&value) => Some(("E0305", "must be in [0, 1)")),
        OptionKind::UnitInterval if !(0.0..=1.0).contains(&value) => Some(("E0305", "must be in [0, 1]")),
        _ => None,
    };
    if let Some((code, message)) = problem {
        // Whole numbers are shown as written (`0`, not `0.0`).
        let shown = if value.fract() == 0.0 && value.abs() < 1e15 {
            format!("{}", value as i64)
        } else {
            curv_ir::format_number(value)
        };
        checker.emit(Diagnostic::error(
            code,
            expr.span(),
            format!("`{}` {message}, found {shown}", spec.name),
            message.to_string(),
        ));
        return None;
    }
    Some(value)
}

fn option_value(checker: &mut Checker, spec: &OptionSpec, expr: &Expr) -> Option<OptionValue> {
    match spec.kind {
        OptionKind::Choice(choices) => {
            let Expr::Name(ident) = expr else {
                checker.emit(
                    Diagnostic::error("E0112", expr.span(), format!("`{}` takes a name", spec.name), "expected a name")
                        .with_help(format!("the choices are: {}", choices.join(", "))),
                );
                return None;
            };
            if !choices.contains(&ident.name.as_str()) {
                let mut diagnostic = Diagnostic::error(
                    "E0108",
                    ident.span,
                    format!("`{}` is not a valid `{}`", ident.name, spec.name),
                    "unknown choice",
                );
                diagnostic = match closest(&ident.name, choices.iter().copied()) {
                    Some(suggestion) => diagnostic.with_help(format!("did you mean `{suggestion}`?")),
                    None => diagnostic.with_help(format!("the choices are: {}", choices.join(", "))),
                };
                checker.emit(diagnostic);
                return None;
            }
            Some(OptionValue::Name(ident.name.clone()))
        }
        OptionKind::Bool => match expr {
            Expr::Name(ident) if ident.name == "true" || ident.name == "false" => {
                Some(OptionValue::Bool(ident.name == "true"))
            }
            Expr::Int(value, _) if *value == 0 || *value == 1 => Some(OptionValue::Bool(*value == 1)),
            _ => {
                checker.emit(Diagnostic::error(
                    "E0112",
                    expr.span(),
                    format!("`{}` takes `true` or `false`", spec.name),
                    "not a boolean",
                ));
                None
            }
        },
        _ => option_number_value(checker, spec, expr).map(OptionValue::Number),
    }
}

/// Resolves the arguments of `owner(...)` against `specs`: positional arguments in order, named
/// ones by name, defaults for the rest. Returns the options and each given option's span.
pub(crate) fn resolve_options_with_spans(
    checker: &mut Checker,
    owner: &str,
    specs: &[OptionSpec],
    args: &[Arg],
    span: Span,
) -> Option<(Options, HashMap<String, Span>)> {
    let mut given: HashMap<String, (Span, OptionValue)> = HashMap::new();
    let mut ok = true;
    for (index, arg) in args.iter().enumerate() {
        let (spec, key_span, value) = match arg {
            Arg::Positional(value) => match specs.get(index) {
                Some(spec) => (spec, value.span(), value),
                None => {
                    checker.emit(Diagnostic::error(
                        "E0104",
                        value.span(),
                        format!("`{owner}` takes at most {} positional argument(s)", specs.len()),
                        "unexpected argument",
                    ));
                    ok = false;
                    continue;
                }
            },
            Arg::Named(key, value) => match specs.iter().find(|spec| spec.name == key.name) {
                Some(spec) => (spec, key.span, value),
                None => {
                    let names: Vec<&str> = specs.iter().map(|spec| spec.name).collect();
                    let mut diagnostic = Diagnostic::error(
                        "E0103",
                        key.span,
                        format!("`{owner}` has no option `{}`", key.name),
                        "unknown option",
                    );
                    diagnostic = match closest(&key.name, names.iter().copied()) {
                        Some(suggestion) => diagnostic.with_help(format!("did you mean `{suggestion}`?")),
                        None if names.is_empty() => diagnostic.with_help(format!("`{owner}` takes no options")),
                        None => diagnostic.with_help(format!("the options of `{owner}` are: {}", names.join(", "))),
                    };
                    checker.emit(diagnostic);
                    ok = false;
                    continue;
                }
            },
        };
        if let Some((first_span, _)) = given.get(spec.name) {
            let first_span = *first_span;
            checker.emit(
                Diagnostic::error("E0101", key_span, format!("`{}` is given twice", spec.name), "given again")
                    .with_label(first_span, "first given here"),
            );
            ok = false;
            continue;
        }
        match option_value(checker, spec, value) {
            Some(resolved) => {
                given.insert(spec.name.to_string(), (arg.span(), resolved));
            }
            None => ok = false,
        }
    }
    if !ok {
        return None;
    }
    let mut options = Vec::new();
    let mut spans = HashMap::new();
    for spec in specs {
        if let Some((arg_span, value)) = given.remove(spec.name) {
            spans.insert(spec.name.to_string(), arg_span);
            options.push((spec.name.to_string(), value));
            continue;
        }
        match spec.default {
            OptionDefault::Number(value) => options.push((spec.name.to_string(), OptionValue::Number(value))),
            OptionDefault::Name(name) => options.push((spec.name.to_string(), OptionValue::Name(name.to_string()))),
            OptionDefault::Bool(value) => options.push((spec.name.to_string(), OptionValue::Bool(value))),
            OptionDefault::Absent => {}
        }
    }
    let _ = span;
    Some((options, spans))
}

pub(crate) fn resolve_options(
    checker: &mut Checker,
    owner: &str,
    specs: &[OptionSpec],
    args: &[Arg],
    span: Span,
) -> Option<Options> {
    resolve_options_with_spans(checker, owner, specs, args, span).map(|(options, _)| options)
}

/// Shell-style matching of parameter names: `*` any run of characters, `?` one character.
pub fn pattern_matches(pattern: &str, name: &str) -> bool {
    fn matches(pattern: &[char], name: &[char]) -> bool {
        match pattern.split_first() {
            None => name.is_empty(),
            Some(('*', rest)) => (0..=name.len()).any(|skip| matches(rest, &name[skip..])),
            Some(('?', rest)) => !name.is_empty() && matches(rest, &name[1..]),
            Some((expected, rest)) => name.first() == Some(expected) && matches(rest, &name[1..]),
        }
    }
    let pattern: Vec<char> = pattern.chars().collect();
    let name: Vec<char> = name.chars().collect();
    matches(&pattern, &name)
}

impl<'a> Checker<'a> {
    fn resolve_settings(&mut self, optimizer: &ast::OptimizerDecl) -> Option<(f64, Option<Schedule>, Options)> {
        let mut lr = None;
        let mut schedule = None;
        let mut settings: Options = Vec::new();
        let mut ok = true;
        let mut seen: HashMap<String, Span> = HashMap::new();
        for item in &optimizer.items {
            let ast::OptimizerItem::Setting(setting) = item else {
                continue;
            };
            let key = setting.key.name.as_str();
            if let Some(first) = seen.insert(key.to_string(), setting.key.span) {
                self.emit(
                    Diagnostic::error("E0101", setting.key.span, format!("`{key}` is set twice"), "set again")
                        .with_label(first, "first set here"),
                );
                ok = false;
                continue;
            }
            if !builtins::OPTIMIZER_SETTINGS.contains(&key) {
                let mut diagnostic = Diagnostic::error(
                    "E0103",
                    setting.key.span,
                    format!("unknown optimizer setting `{key}`"),
                    "not a setting",
                );
                // The spelled-out name of `lr` is too far from it for the spelling suggestion.
                let suggestion = if key == "learning_rate" {
                    Some("lr")
                } else {
                    closest(key, builtins::OPTIMIZER_SETTINGS.iter().copied())
                };
                diagnostic = match suggestion {
                    Some(suggestion) => diagnostic.with_help(format!("did you mean `{suggestion}`?")),
                    None => diagnostic.with_help(format!(
                        "the settings are: {}; a per-parameter rule is written `pattern : structure(...)`",
                        builtins::OPTIMIZER_SETTINGS.join(", ")
                    )),
                };
                self.emit(diagnostic);
                ok = false;
                continue;
            }
            if let Some(every) = &setting.every {
                self.emit(
                    Diagnostic::error(
                        "E0111",
                        every.span(),
                        format!("`{key}` takes no period"),
                        "`every` is not meaningful here",
                    )
                    .with_help("a cadence belongs to a rule's structure, as in `diagonal(every = 10)`"),
                );
                ok = false;
                continue;
            }
            let [value] = setting.values.as_slice() else {
                self.emit(Diagnostic::error(
                    "E0104",
                    setting.span,
                    format!("`{key}` takes one value"),
                    "expected one value",
                ));
                ok = false;
                continue;
            };
            match key {
                "lr" | "grad_clip" => {
                    let spec = OptionSpec {
                        name: if key == "lr" { "lr" } else { "grad_clip" },
                        kind: OptionKind::Positive,
                        default: OptionDefault::Absent,
                    };
                    match option_number_value(self, &spec, value) {
                        Some(number) if key == "lr" => lr = Some(number),
                        Some(number) => settings.push((key.to_string(), OptionValue::Number(number))),
                        None => ok = false,
                    }
                }
                _ => {
                    let (name, args, span) = match value {
                        Expr::Name(ident) => (ident, Vec::new(), ident.span),
                        Expr::Call(call) => (&call.name, call.args.clone(), call.span),
                        other => {
                            self.emit(Diagnostic::error(
                                "E0112",
                                other.span(),
                                "a schedule is a name such as `cosine(warmup = 100)`",
                                "not a schedule",
                            ));
                            ok = false;
                            continue;
                        }
                    };
                    let Some((_, specs)) =
                        builtins::SCHEDULES.iter().find(|(schedule_name, _)| *schedule_name == name.name)
                    else {
                        let names: Vec<&str> = builtins::SCHEDULES.iter().map(|(name, _)| *name).collect();
                        self.emit(
                            Diagnostic::error(
                                "E0108",
                                name.span,
                                format!("unknown schedule `{}`", name.name),
                                "not a schedule",
                            )
                            .with_help(format!("the schedules are: {}", names.join(", "))),
                        );
                        ok = false;
                        continue;
                    };
                    match resolve_options(self, &name.name, specs, &args, span) {
                        Some(options) => schedule = Some(Schedule { kind: name.name.clone(), options }),
                        None => ok = false,
                    }
                }
            }
        }
        let Some(lr) = lr else {
            if ok {
                self.emit(
                    Diagnostic::error(
                        "E0306",
                        optimizer.name.span,
                        format!("optimizer `{}` has no learning rate", optimizer.name.name),
                        "missing `lr`",
                    )
                    .with_help("add a line such as `lr 1e-3`"),
                );
            }
            return None;
        };
        ok.then_some((lr, schedule, settings))
    }

    fn resolve_line(&mut self, line: &'a ast::RuleLine) -> Option<ResolvedLine<'a>> {
        let structure_name = line.structure.name.name.as_str();
        let (structure, needs_matrix, options, option_spans, rule_name) = if let Some(spec) =
            builtins::structure(structure_name)
        {
            let (mut options, spans) = resolve_options_with_spans(
                self,
                structure_name,
                spec.options,
                &line.structure.args,
                line.structure.span,
            )?;
            let kind = match structure_name {
                "diagonal" => StructureKind::Diagonal,
                "kronecker" => StructureKind::Kronecker,
                "lowrank" => StructureKind::LowRank,
                "orthogonalize" => StructureKind::Orthogonalize,
                "factored" => StructureKind::Factored,
                _ => StructureKind::Dense,
            };
            let mut needs_matrix = spec.needs_matrix;
            if kind == StructureKind::LowRank {
                let has_rank = spans.contains_key("rank");
                let has_window = spans.contains_key("window");
                let stats = options
                    .iter()
                    .find_map(|(key, value)| match value {
                        OptionValue::Name(name) if key == "stats" => Some(name.clone()),
                        _ => None,
                    })
                    .unwrap_or_else(|| "gradient_window".to_string());
                let stats = stats.as_str();
                // What each estimator keeps: M-FAC a window of gradients, Natural GaLore a
                // projection and a window of projected gradients, PSGD low-rank factors.
                let (wants_rank, wants_window, label, help) = match stats {
                    "fisher" => (true, true, "Natural GaLore needs `rank` and `window`", "give `rank = r, window = m`"),
                    "psgd" => {
                        (true, false, "PSGD's low-rank preconditioner needs `rank` and no `window`", "give `rank = r`")
                    }
                    "lanczos" => {
                        (true, false, "FOSI needs `rank` (the number of eigenpairs) and no `window`", "give `rank = k`")
                    }
                    _ => (false, true, "M-FAC's gradient window needs `window` and no `rank`", "give `window = m`"),
                };
                if has_rank != wants_rank || has_window != wants_window {
                    self.emit(
                        Diagnostic::error(
                            "E0306",
                            line.structure.span,
                            format!("`lowrank(stats = {stats})`: {label}"),
                            help,
                        )
                        .with_note(
                            "`stats = gradient_window` keeps the last m gradients (M-FAC); `stats = fisher` projects a matrix's gradient on its top r singular vectors and keeps the last m projections (Natural GaLore); `stats = psgd` fits (I + U V^T) diag(d) of rank r (PSGD LRA); `stats = lanczos` keeps the top k Hessian eigenpairs (FOSI)",
                        ),
                    );
                    return None;
                }
                needs_matrix = stats == "fisher";
                // Each estimator reads its own options: a default that does not apply is dropped
                // from the plan, and one given explicitly is an error.
                let applies: &[&str] = match stats {
                    "fisher" => &["stats", "rank", "window", "damping", "every", "b1", "b2", "eps", "scale"],
                    "psgd" => &[
                        "stats",
                        "rank",
                        "lr_precond",
                        "init_scale",
                        "lipschitz_ema",
                        "noise_damping",
                        "update_probability",
                        "max_rms",
                        "max_abs",
                        "momentum",
                    ],
                    "lanczos" => &[
                        "stats", "rank", "every", "warmup", "base", "decay", "alpha", "lr_clip", "b1", "b2", "eps",
                        "momentum", "damping",
                    ],
                    _ => &["stats", "window", "damping", "every", "momentum"],
                };
                for (name, span) in &spans {
                    if !applies.contains(&name.as_str()) {
                        self.emit(
                            Diagnostic::error(
                                "E0103",
                                *span,
                                format!("`lowrank(stats = {stats})` has no option `{name}`"),
                                "not an option of this estimator",
                            )
                            .with_help(format!(
                                "the options of `lowrank(stats = {stats})` are: {}",
                                applies.join(", ")
                            )),
                        );
                        return None;
                    }
                }
                options.retain(|(key, _)| applies.contains(&key.as_str()));
                // FOSI's damping is an addition to the reference (0 unless given), not M-FAC's 1e-5.
                if stats == "lanczos" && !spans.contains_key("damping") {
                    options.retain(|(key, _)| key != "damping");
                }
            }
            (kind, needs_matrix, options, spans, structure_name.to_string())
        } else if let Some(rule) = self.rules.get(structure_name).copied() {
            let Some(program) = self.rule_programs.get(structure_name).cloned() else {
                // The rule itself has errors, reported where it is defined.
                return None;
            };
            let specs: Vec<OptionSpec> = program
                .hyperparameters
                .iter()
                .map(|(name, _)| OptionSpec {
                    name: name.as_str(),
                    kind: OptionKind::Number,
                    default: OptionDefault::Absent,
                })
                .collect();
            let (mut options, spans) =
                resolve_options_with_spans(self, structure_name, &specs, &line.structure.args, line.structure.span)?;
            // Defaults come from the rule's declaration (NaN marks a hyperparameter without one).
            let mut complete = Vec::new();
            for (name, default) in &program.hyperparameters {
                if let Some(position) = options.iter().position(|(key, _)| key == name) {
                    complete.push(options.remove(position));
                } else if default.is_nan() {
                    self.emit(
                        Diagnostic::error(
                            "E0306",
                            line.structure.span,
                            format!("rule `{structure_name}` needs a value for `{name}`"),
                            format!("`{name}` has no default"),
                        )
                        .with_help(format!("write `{structure_name}({name} = ...)`")),
                    );
                    let _ = rule;
                    return None;
                } else {
                    complete.push((name.clone(), OptionValue::Number(*default)));
                }
            }
            (StructureKind::Rule, false, complete, spans, structure_name.to_string())
        } else {
            let mut candidates: Vec<String> = builtins::STRUCTURES.iter().map(|spec| spec.name.to_string()).collect();
            candidates.extend(self.rules.keys().cloned());
            let mut diagnostic = Diagnostic::error(
                "E0108",
                line.structure.name.span,
                format!("unknown structure or rule `{structure_name}`"),
                "not a structure or rule",
            );
            diagnostic = match closest(structure_name, candidates.iter().map(String::as_str)) {
                Some(suggestion) => diagnostic.with_help(format!("did you mean `{suggestion}`?")),
                None => diagnostic.with_help("the structures are diagonal, kronecker, lowrank, orthogonalize and dense; rules come from `rule` items or `use std.optimizers.NAME`"),
            };
            self.emit(diagnostic);
            return None;
        };
        let mut modifiers = Vec::new();
        for modifier in &line.modifiers {
            let Some(spec) = builtins::modifier(&modifier.name.name) else {
                let names: Vec<&str> = builtins::MODIFIERS.iter().map(|spec| spec.name).collect();
                let mut diagnostic = Diagnostic::error(
                    "E0103",
                    modifier.name.span,
                    format!("unknown modifier `{}`", modifier.name.name),
                    "not a modifier",
                );
                diagnostic = match closest(&modifier.name.name, names.iter().copied()) {
                    Some(suggestion) => diagnostic.with_help(format!("did you mean `{suggestion}`?")),
                    None => diagnostic.with_help(format!("the modifiers are: {}", names.join(", "))),
                };
                self.emit(diagnostic);
                return None;
            };
            let mut specs: Vec<OptionSpec> = spec.options.to_vec();
            // The bare value (`momentum 0.9`) sets the modifier's main option, listed first.
            if let Some(position) = specs.iter().position(|option| option.name == spec.positional) {
                let main = specs.remove(position);
                specs.insert(0, main);
            }
            if modifiers.iter().any(|existing: &ModifierPlan| existing.name == spec.name) {
                self.emit(Diagnostic::error(
                    "E0101",
                    modifier.span,
                    format!("`{}` appears twice on this rule", spec.name),
                    "repeated modifier",
                ));
                return None;
            }
            let options = resolve_options(self, spec.name, &specs, &modifier.args, modifier.span)?;
            modifiers.push(ModifierPlan { name: spec.name.to_string(), options });
        }
        if !self.check_line_executes(line, structure, &options, &option_spans, &modifiers) {
            return None;
        }
        Some(ResolvedLine { line, structure, rule_name, needs_matrix, options, option_spans, modifiers })
    }

    /// Checks an optimizer that no train block uses (settings and rule lines only).
    pub(crate) fn check_optimizer_alone(&mut self, optimizer: &'a ast::OptimizerDecl) {
        let _ = self.resolve_settings(optimizer);
        for item in &optimizer.items {
            if let ast::OptimizerItem::Rule(line) = item {
                let _ = self.resolve_line(line);
            }
        }
    }

    /// Resolves an optimizer for a train block's parameters.
    pub(crate) fn plan_optimizer(
        &mut self,
        optimizer: Sourced<'a, ast::OptimizerDecl>,
        params: &[ParamInfo],
        use_span: Span,
    ) -> Option<OptimizerPlan> {
        let saved_source = self.source;
        self.source = optimizer.source;
        let settings = self.resolve_settings(optimizer.item);
        let mut lines = Vec::new();
        let mut lines_ok = true;
        for item in &optimizer.item.items {
            if let ast::OptimizerItem::Rule(line) = item {
                match self.resolve_line(line) {
                    Some(resolved) => lines.push(resolved),
                    None => lines_ok = false,
                }
            }
        }
        self.source = saved_source;
        let (lr, schedule, settings) = settings?;
        if !lines_ok {
            return None;
        }
        if lines.is_empty() {
            self.emit(
                Diagnostic::error(
                    "E0306",
                    use_span,
                    format!("optimizer `{}` has no rules", optimizer.item.name.name),
                    "no `pattern : structure` lines",
                )
                .with_help("add a rule such as `* : adam` (with `use std.optimizers.adam`)"),
            );
            return None;
        }
        let mut plans = Vec::new();
        let mut used = vec![false; lines.len()];
        let mut ok = true;
        for (param_index, param) in params.iter().enumerate() {
            let rank = param.ty.rank();
            let by_name: Vec<usize> = (0..lines.len())
                .filter(|&index| pattern_matches(&lines[index].line.pattern.text, &param.name))
                .collect();
            let numel: i64 = param.ty.known_shape().unwrap_or_default().iter().product();
            // A line with `max_size` governs only parameters of at most that many elements; larger
            // ones fall through to a later line (as vectors fall through matrix-only lines).
            let fits = |index: usize| {
                lines[index].structure != StructureKind::Dense
                    || option_number(&lines[index].options, "max_size").is_none_or(|limit| numel as f64 <= limit)
            };
            let chosen =
                by_name.iter().copied().find(|&index| (!lines[index].needs_matrix || rank >= 2) && fits(index));
            match chosen {
                Some(index) => {
                    used[index] = true;
                    match self.param_plan(&lines[index], param_index, param, optimizer.source) {
                        Some(plan) => plans.push(plan),
                        None => ok = false,
                    }
                }
                None if !by_name.is_empty() && !fits(by_name[0]) => {
                    let line = &lines[by_name[0]];
                    let limit = option_number(&line.options, "max_size").unwrap_or(0.0);
                    let mut diagnostic = Diagnostic::error(
                        "E0302",
                        param.span,
                        format!(
                            "`{}` governs parameters of at most {limit} elements, but `{}` ({}) has {numel}",
                            line.rule_name, param.name, param.ty
                        ),
                        format!("`{}` has {numel} elements", param.name),
                    )
                    .with_help(
                        "add a later rule for larger parameters, such as `* : diagonal(stats = gradient_square)`",
                    );
                    diagnostic.labels.push(label_in(optimizer.source, line.line.span, "`max_size` set in this rule"));
                    self.emit(diagnostic);
                    ok = false;
                }
                None if !by_name.is_empty() => {
                    let line = &lines[by_name[0]];
                    let mut diagnostic = Diagnostic::error(
                        "E0302",
                        param.span,
                        format!("`{}` needs a matrix parameter, but `{}` is {}", line.rule_name, param.name, param.ty),
                        format!("`{}` has rank {rank}", param.name),
                    )
                    .with_help("add a later rule for vectors, such as `* : diagonal(stats = gradient_square)`");
                    diagnostic.labels.push(label_in(
                        optimizer.source,
                        line.line.span,
                        &format!("`{}` matches this rule", param.name),
                    ));
                    self.emit(diagnostic);
                    ok = false;
                }
                None => {
                    let mut diagnostic = Diagnostic::error(
                        "E0301",
                        param.span,
                        format!(
                            "the parameter `{}` is matched by no rule of optimizer `{}`",
                            param.name, optimizer.item.name.name
                        ),
                        "no rule matches this parameter",
                    )
                    .with_help("add a rule whose pattern matches it, or a default rule `* : ...`");
                    diagnostic.labels.push(label_in(
                        optimizer.source,
                        optimizer.item.name.span,
                        "the optimizer is defined here",
                    ));
                    self.emit(diagnostic);
                    ok = false;
                }
            }
        }
        // A preset's fallback lines (the vector rule of `muon`, say) legitimately match nothing for
        // a model without vectors, so only the user's own optimizers are held to every line.
        if ok && optimizer.source == SourceId::User {
            for (index, line) in lines.iter().enumerate() {
                if !used[index] {
                    let mut diagnostic = Diagnostic::error(
                        "E0300",
                        line.line.pattern.span,
                        format!("the rule `{}` matches no parameter", line.line.pattern.text),
                        "no parameter is governed by this rule",
                    );
                    let shadowed = params.iter().any(|param| pattern_matches(&line.line.pattern.text, &param.name));
                    diagnostic = if shadowed {
                        diagnostic.with_note("every parameter it matches is taken by an earlier rule")
                    } else {
                        let names: Vec<&str> = params.iter().map(|param| param.name.as_str()).collect();
                        diagnostic.with_note(format!("the parameters are: {}", names.join(", ")))
                    };
                    let previous = self.source;
                    self.source = optimizer.source;
                    self.emit(diagnostic);
                    self.source = previous;
                    ok = false;
                }
            }
        }
        ok.then(|| OptimizerPlan { name: optimizer.item.name.name.clone(), lr, schedule, settings, plans })
    }

    fn param_plan(
        &mut self,
        line: &ResolvedLine,
        param_index: usize,
        param: &ParamInfo,
        source: SourceId,
    ) -> Option<ParamPlan> {
        let shape = param.ty.known_shape().unwrap_or_default();
        let numel: i64 = shape.iter().product();
        let rows: i64 = shape.iter().take(shape.len().saturating_sub(1)).product();
        let cols: i64 = *shape.last().unwrap_or(&1);
        let state_of = |name: &str, dims: &[i64]| StateInfo {
            name: name.to_string(),
            ty: TensorType::known(param.ty.dtype, dims),
        };
        let mut state = Vec::new();
        let mut effective_rank = None;
        match line.structure {
            StructureKind::Diagonal => {
                state.push(state_of("m", &shape));
                state.push(state_of("v", &shape));
            }
            StructureKind::Kronecker => {
                // The runtime's matrix view: higher ranks are `[first dim, product of the others]`.
                let (rows, cols) = if shape.len() >= 3 { (shape[0], numel / shape[0].max(1)) } else { (rows, cols) };
                let block = option_number(&line.options, "block").unwrap_or(1024.0) as i64;
                let blocks = |size: i64| -> Vec<i64> {
                    (0..size).step_by(block as usize).map(|start| (size - start).min(block)).collect()
                };
                let (row_blocks, col_blocks) = (blocks(rows), blocks(cols));
                let left: i64 = row_blocks.iter().map(|size| size * size).sum::<i64>() * col_blocks.len() as i64;
                let right: i64 = col_blocks.iter().map(|size| size * size).sum::<i64>() * row_blocks.len() as i64;
                let function = option_name(&line.options, "function").unwrap_or("inverse_root");
                let quantized = option_number(&line.options, "quantize").unwrap_or(32.0) < 32.0;
                let b1 = option_number(&line.options, "b1").unwrap_or(0.9);
                match function {
                    // PSGD-Kron: one preconditioner factor per side (dense up to `max_size`).
                    "lie_group" => {
                        let max_size = option_number(&line.options, "max_size").unwrap_or(f64::INFINITY);
                        let side = |size: i64| if (size as f64) <= max_size { size * size } else { size };
                        state.push(state_of("left_preconditioner", &[side(rows)]));
                        state.push(state_of("right_preconditioner", &[side(cols)]));
                        state.push(state_of("lipschitz", &[2]));
                        if option_number(&line.options, "momentum").unwrap_or(0.0) > 0.0 {
                            state.push(state_of("momentum", &shape));
                        }
                    }
                    // MKOR keeps the factor inverses only.
                    "sherman_morrison" => {
                        state.push(state_of("left_inverse", &[rows * rows]));
                        state.push(state_of("right_inverse", &[cols * cols]));
                    }
                    // SINGD keeps the factors K and C of the inverses, their Riemannian momenta
                    // and the momentum of the updates.
                    "singd" => {
                        state.push(state_of("left_preconditioner", &[rows * rows]));
                        state.push(state_of("right_preconditioner", &[cols * cols]));
                        if option_number(&line.options, "riemannian_momentum").unwrap_or(0.5) != 0.0 {
                            state.push(state_of("left_momentum", &[rows * rows]));
                            state.push(state_of("right_momentum", &[cols * cols]));
                        }
                        state.push(state_of("update_momentum", &shape));
                    }
                    // AdaFisher keeps the factors' diagonals and a first moment.
                    "adafisher" => {
                        state.push(state_of("left_diagonal", &[rows]));
                        state.push(state_of("right_diagonal", &[cols]));
                        state.push(state_of("m", &shape));
                    }
                    // 4-bit Shampoo: per side and tile, eigenvector and inverse-root codes (one
                    // element each in the runtime's state, not packed), their block maxima,
                    // eigenvalues and the inverse root's diagonal; AdamW's moments.
                    _ if quantized => {
                        let quantize_block = option_number(&line.options, "quantize_block").unwrap_or(64.0) as i64;
                        let per_side = |sizes: &[i64], tiles: usize| -> i64 {
                            let one: i64 = sizes
                                .iter()
                                .map(|n| 2 * n * n + 2 * n * ((n + quantize_block - 1) / quantize_block.max(1)) + 2 * n)
                                .sum();
                            one * tiles as i64
                        };
                        state.push(state_of("left_quantized", &[per_side(&row_blocks, col_blocks.len())]));
                        state.push(state_of("right_quantized", &[per_side(&col_blocks, row_blocks.len())]));
                        state.push(state_of("m", &shape));
                        state.push(state_of("v", &shape));
                    }
                    _ => {
                        state.push(state_of("left_factor", &[left]));
                        state.push(state_of("right_factor", &[right]));
                        let (left_name, right_name) = if function == "eigenbasis" {
                            ("left_basis", "right_basis")
                        } else {
                            ("left_inverse", "right_inverse")
                        };
                        state.push(state_of(left_name, &[left]));
                        state.push(state_of(right_name, &[right]));
                        if function == "eigenbasis" {
                            state.push(state_of("m", &shape));
                            state.push(state_of("v", &shape));
                        } else if matches!(function, "inverse_root" | "newton") && b1 > 0.0 {
                            // Distributed Shampoo's filtered gradient.
                            state.push(state_of("m", &shape));
                        }
                    }
                }
            }
            StructureKind::LowRank => {
                let stats = option_name(&line.options, "stats").unwrap_or("gradient_window");
                let window = option_number(&line.options, "window").unwrap_or(1.0) as i64;
                let mut rank = option_number(&line.options, "rank").unwrap_or(1.0) as i64;
                let momentum = option_number(&line.options, "momentum").unwrap_or(0.0) > 0.0;
                // A preset's rank is an upper bound: a smaller parameter gets the largest rank it
                // admits (a user's own rank is checked below).
                let limit = match stats {
                    "fisher" => rows.min(cols),
                    "lanczos" => numel,
                    _ => numel - 1,
                };
                if source != SourceId::User && rank > limit {
                    rank = limit.max(0);
                    effective_rank = Some(rank);
                }
                match stats {
                    "fisher" => {
                        let smallest = rows.min(cols);
                        let largest = rows.max(cols);
                        if rank > smallest {
                            let span = line.option_spans.get("rank").copied().unwrap_or(line.line.structure.span);
                            let mut diagnostic = Diagnostic::error(
                                "E0303",
                                param.span,
                                format!(
                                    "rank {rank} is larger than the smallest dimension of `{}` ({})",
                                    param.name, param.ty
                                ),
                                format!("the smallest dimension is {smallest}"),
                            )
                            .with_help(format!("use a rank of at most {smallest}"));
                            diagnostic.labels.push(label_in(source, span, "rank set here"));
                            self.emit(diagnostic);
                            return None;
                        }
                        // The projection acts on the smaller side (GaLore's choice).
                        state.push(state_of("projection", &[smallest, rank]));
                        state.push(state_of("gradient_window", &[window, rank * largest]));
                        state.push(state_of("gram", &[window, window]));
                        state.push(state_of("position", &[1]));
                        state.push(state_of("m", &[rank, largest]));
                        state.push(state_of("v", &[rank, largest]));
                    }
                    "lanczos" => {
                        if rank > numel {
                            let span = line.option_spans.get("rank").copied().unwrap_or(line.line.structure.span);
                            let mut diagnostic = Diagnostic::error(
                                "E0303",
                                param.span,
                                format!(
                                    "rank {rank} is larger than the size of `{}` ({}, {numel} elements)",
                                    param.name, param.ty
                                ),
                                format!("FOSI keeps at most {numel} eigenpairs of this parameter"),
                            )
                            .with_help(format!("use a rank of at most {numel}"));
                            diagnostic.labels.push(label_in(source, span, "rank set here"));
                            self.emit(diagnostic);
                            return None;
                        }
                        state.push(state_of("eigenvectors", &[rank, numel]));
                        state.push(state_of("learning_rates", &[rank]));
                        state.push(state_of("scaling", &[1]));
                        state.push(state_of("velocity", &shape));
                        match option_name(&line.options, "base").unwrap_or("adam") {
                            "adam" => {
                                state.push(state_of("m", &shape));
                                state.push(state_of("v", &shape));
                            }
                            "momentum" => state.push(state_of("momentum", &shape)),
                            _ => {}
                        }
                    }
                    "psgd" => {
                        if rank >= numel {
                            let span = line.option_spans.get("rank").copied().unwrap_or(line.line.structure.span);
                            let mut diagnostic = Diagnostic::error(
                                "E0303",
                                param.span,
                                format!(
                                    "rank {rank} is not smaller than the size of `{}` ({}, {numel} elements)",
                                    param.name, param.ty
                                ),
                                format!("PSGD's low-rank factors need a rank below {numel}"),
                            )
                            .with_help(format!("use a rank of at most {}", numel - 1));
                            diagnostic.labels.push(label_in(source, span, "rank set here"));
                            self.emit(diagnostic);
                            return None;
                        }
                        state.push(state_of("u", &[numel, rank]));
                        state.push(state_of("v", &[numel, rank]));
                        state.push(state_of("d", &[numel]));
                        state.push(state_of("lipschitz", &[3]));
                        if momentum {
                            state.push(state_of("momentum", &shape));
                            state.push(state_of("momentum_count", &[1]));
                        }
                    }
                    _ => {
                        state.push(state_of("gradient_window", &[window, numel]));
                        state.push(state_of("gram", &[window, window]));
                        state.push(state_of("position", &[1]));
                        if momentum {
                            state.push(state_of("momentum", &shape));
                        }
                    }
                }
            }
            StructureKind::Orthogonalize => state.push(state_of("momentum", &shape)),
            StructureKind::Factored => {
                if shape.len() >= 2 {
                    state.push(state_of("row", &[rows]));
                    state.push(state_of("column", &[cols]));
                } else {
                    state.push(state_of("v", &shape));
                }
            }
            StructureKind::Dense => {
                if option_name(&line.options, "stats") == Some("hessian") {
                    // Lazy Newton keeps the Hessian's eigendecomposition.
                    state.push(state_of("eigenvalues", &[numel]));
                    state.push(state_of("eigenvectors", &[numel, numel]));
                } else if option_name(&line.options, "stats") == Some("ggn") {
                    // EGN solves its batch-sized system afresh each step; it keeps only momentum
                    // and the line search's last step.
                    if option_number(&line.options, "momentum").unwrap_or(0.0) > 0.0 {
                        state.push(state_of("velocity", &[numel]));
                    }
                    if line.options.iter().any(|(key, value)| key == "line_search" && *value == OptionValue::Bool(true))
                    {
                        state.push(state_of("stepsize", &[1]));
                    }
                    if line
                        .options
                        .iter()
                        .any(|(key, value)| key == "adaptive_damping" && *value == OptionValue::Bool(true))
                    {
                        state.push(state_of("damping", &[1]));
                    }
                } else {
                    state.push(state_of("curvature", &[numel, numel]));
                    state.push(state_of("inverse", &[numel, numel]));
                }
            }
            StructureKind::Rule => {
                if let Some(program) = self.rule_programs.get(&line.rule_name) {
                    for name in &program.state {
                        state.push(state_of(name, &shape));
                    }
                }
            }
        }
        for modifier in &line.modifiers {
            match (modifier.name.as_str(), option_name(&modifier.options, "kind")) {
                // Grafting reads the structure's filtered gradient, so it keeps only a second moment.
                ("graft", Some("adam" | "adagrad" | "rmsprop")) => state.push(state_of("graft_v", &shape)),
                ("momentum", _) => state.push(state_of("momentum_buffer", &shape)),
                _ => {}
            }
        }
        let mut options = line.options.clone();
        if let Some(rank) = effective_rank {
            for (key, value) in options.iter_mut() {
                if key == "rank" {
                    *value = OptionValue::Number(rank as f64);
                }
            }
        }
        Some(ParamPlan {
            param: param_index,
            pattern: line.line.pattern.text.clone(),
            structure: line.structure,
            rule_name: line.rule_name.clone(),
            options,
            modifiers: line.modifiers.clone(),
            state,
            span: line.line.span,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::pattern_matches;

    #[test]
    fn patterns_match_like_shell_globs() {
        assert!(pattern_matches("*", "w1"));
        assert!(pattern_matches("w*", "w1"));
        assert!(!pattern_matches("w*", "b1"));
        assert!(pattern_matches("b?", "b1"));
        assert!(!pattern_matches("b?", "b12"));
        assert!(pattern_matches("layer1.*", "layer1.w"));
        assert!(!pattern_matches("layer1.*", "layer2.w"));
    }
}
