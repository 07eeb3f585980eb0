//! The text format of the IR: deterministic, one instruction per line, shapes on every value.

use crate::types::*;
use curv_grammar::Span;
use std::fmt::Write;

/// Prints a whole program. `locate` turns a span into `line:column` text for the trailing
/// location comments.
pub fn print_program(program: &Program, locate: &dyn Fn(Option<&str>, Span) -> String) -> String {
    let mut out = String::new();
    for rule in &program.rules {
        print_rule(&mut out, rule, locate);
        out.push('\n');
    }
    for train in &program.trains {
        print_train(&mut out, train, &program.rules, &|span| locate(None, span));
        out.push('\n');
    }
    while out.ends_with("\n\n") {
        out.pop();
    }
    out
}

fn print_rule(out: &mut String, rule: &RuleProgram, locate: &dyn Fn(Option<&str>, Span) -> String) {
    let module = rule.module.as_deref();
    let locate = |span: Span| locate(module, span);
    let hyper: Vec<String> =
        rule.hyperparameters.iter().map(|(name, value)| format!("{name} = {}", format_number(*value))).collect();
    let origin = module.map(|module| format!("  // from {module}")).unwrap_or_default();
    let _ = writeln!(out, "rule {}(p: f32[P], g: f32[P]; {}){origin}", rule.name, hyper.join(", "));
    if !rule.state.is_empty() {
        let _ = writeln!(out, "  state {}", rule.state.join(", "));
    }
    if !rule.statistics.is_empty() {
        let _ = writeln!(out, "  statistics {}", rule.statistics.join(", "));
    }
    print_function(out, "  ", "init", &rule.init, &locate);
    for update in &rule.updates {
        let mut label =
            if update.period == 1 { "every step".to_string() } else { format!("every {} steps", update.period) };
        if update.from != update.period {
            label.push_str(&format!(", from {}", update.from));
        }
        print_function(out, "  ", &label, &update.function, &locate);
    }
}

fn print_train(out: &mut String, train: &TrainProgram, rules: &[RuleProgram], locate: &dyn Fn(Span) -> String) {
    let _ = writeln!(out, "train {}  // {}", train.name, locate(train.span));
    let data = &train.data;
    let _ = writeln!(
        out,
        "  data {} = {}({:?})  // {} train + {} test examples",
        data.name,
        data.kind,
        data.path,
        data.examples - data.test_examples,
        data.test_examples
    );
    for (field, ty) in &data.fields {
        let _ = writeln!(out, "    {field}: {ty}");
    }
    let _ = writeln!(out, "  batch {}, steps {}, seed {}", train.batch, train.steps, train.seed);
    for param in &train.params {
        let _ = writeln!(out, "  param {}: {} = {}  // {}", param.name, param.ty, param.init, locate(param.span));
    }
    let loss_kind = match train.loss_kind {
        LossKind::CrossEntropy => "cross_entropy",
        LossKind::MeanSquaredError => "mse",
        LossKind::Custom => "custom",
    };
    print_function(out, "  ", &format!("fn {} [{loss_kind}]", train.loss.name), &train.loss, locate);
    if let Some(test_loss) = &train.test_loss {
        let _ = writeln!(
            out,
            "  fn test_loss: the loss over the {} test examples ({} instructions)",
            train.data.test_examples,
            test_loss.insts.len()
        );
    }
    let optimizer = &train.optimizer;
    let _ = write!(out, "  optimizer {} lr {}", optimizer.name, format_number(optimizer.lr));
    if let Some(schedule) = &optimizer.schedule {
        let _ = write!(out, " schedule {}({})", schedule.kind, print_options(&schedule.options));
    }
    if !optimizer.settings.is_empty() {
        let _ = write!(out, " {}", print_options(&optimizer.settings));
    }
    out.push('\n');
    for plan in &optimizer.plans {
        let param = &train.params[plan.param];
        let _ = write!(out, "    {} <- {:?}: {}", param.name, plan.pattern, plan.rule_name);
        if plan.structure == StructureKind::Rule && plan.rule_name != StructureKind::Rule.name() {
            let _ = write!(out, " [rule]");
        }
        let _ = write!(out, "({})", print_options(&plan.options));
        for modifier in &plan.modifiers {
            let _ = write!(out, " {}({})", modifier.name, print_options(&modifier.options));
        }
        out.push('\n');
        for state in &plan.state {
            let _ = writeln!(out, "      state {}: {}", state.name, state.ty);
        }
    }
    // Kernel grouping of the update: parameters sharing an elementwise rule are updated by one
    // multi-parameter kernel (the runtime also leaves out biases folded into K-FAC factors).
    for group in crate::group::plan_groups(&optimizer.plans, rules, &[]) {
        let names: Vec<&str> =
            group.plans.iter().map(|&plan| train.params[optimizer.plans[plan].param].name.as_str()).collect();
        let _ = writeln!(
            out,
            "    update kernel: {} over {} (one call per step, a loop nest per parameter)",
            group.rule,
            names.join(", ")
        );
    }
    if let Some(log) = &train.log {
        let _ = writeln!(out, "  log {} every {}", log.metrics.join(", "), log.every);
    }
    if let Some(eval) = &train.eval {
        let _ = writeln!(out, "  eval {} every {}", eval.metrics.join(", "), eval.every);
    }
    if let Some(every) = train.checkpoint_every {
        let _ = writeln!(out, "  checkpoint every {every}");
    }
}

pub fn print_options(options: &Options) -> String {
    options.iter().map(|(name, value)| format!("{name} = {value}")).collect::<Vec<_>>().join(", ")
}

/// Prints one function as an indented block. Each instruction ends with the kernel the fusion
/// plan puts it in (`k3`), or `inline` for constants and broadcasts recomputed by their consumers.
pub fn print_function(
    out: &mut String,
    indent: &str,
    label: &str,
    function: &Function,
    locate: &dyn Fn(Span) -> String,
) {
    let plan = crate::fusion::plan_kernels(function);
    let inlined = crate::fusion::inlined(function);
    let _ = writeln!(out, "{indent}{label} {{");
    for (index, inst) in function.insts.iter().enumerate() {
        let _ = write!(out, "{indent}  %{index} = {}", inst.op.name());
        let attributes = op_attributes(&inst.op);
        if !attributes.is_empty() {
            let _ = write!(out, " {attributes}");
        }
        if !inst.args.is_empty() {
            let args: Vec<String> = inst.args.iter().map(|arg| arg.to_string()).collect();
            let _ = write!(out, " {}", args.join(", "));
        }
        let kernel = match (plan.kernel_of[index], inlined[index]) {
            (Some(kernel), _) => format!("  k{kernel}"),
            (None, true) => "  inline".to_string(),
            (None, false) => String::new(),
        };
        let _ = writeln!(out, " : {}  // {}{kernel}", inst.ty, locate(inst.span));
    }
    if !plan.kernels.is_empty() {
        let described: Vec<String> = plan
            .kernels
            .iter()
            .enumerate()
            .map(|(index, kernel)| {
                if kernel.kind == crate::fusion::KernelKind::MatMul && kernel.insts.len() > 1 {
                    format!("k{index} matmul+epilogue ({})", kernel.insts.len())
                } else {
                    format!("k{index} {} ({})", kernel.kind.name(), kernel.insts.len())
                }
            })
            .collect();
        let _ = writeln!(out, "{indent}  kernels: {}", described.join(", "));
    }
    let outputs: Vec<String> = function.outputs.iter().map(|(name, value)| format!("{name} = {value}")).collect();
    let _ = writeln!(out, "{indent}  yield {}", outputs.join(", "));
    let _ = writeln!(out, "{indent}}}");
}

fn op_attributes(op: &Op) -> String {
    match op {
        Op::Input { index, name } => format!("{index} {name:?}"),
        Op::Param { index } => format!("#{index}"),
        Op::Data { source, field } => format!("{source}.{field}"),
        Op::Hyper { name } => name.clone(),
        Op::Constant { value } => format_number(*value),
        Op::Transpose { permutation } => format!("{permutation:?}"),
        Op::Broadcast { dims } => format!("dims {dims:?}"),
        Op::Reduce { axes, .. } | Op::Count { axes } => format!("axes {axes:?}"),
        Op::ArgMax { axis } => format!("axis {axis}"),
        Op::OneHot { classes } => format!("classes {classes}"),
        Op::Slice { starts } | Op::Pad { starts } => format!("starts {starts:?}"),
        Op::Conv2dInputGradient { stride, padding } | Op::Conv2dKernelGradient { stride, padding } => {
            format!("stride {stride} padding {padding}")
        }
        Op::Conv2d { stride, padding } => format!("stride {stride} padding {padding}"),
        Op::Statistic { kind } => kind.clone(),
        _ => String::new(),
    }
}
