//! The MLIR of a whole train block as `curv emit --stage mlir` prints it: the loss-and-gradient
//! function and the update functions of its rules, grouped or per parameter size.

use super::*;

/// Maps a span in the user's file (`None`) or in a standard-library module to an MLIR location.
pub type ModuleLocator<'a> = dyn Fn(Option<&str>, curv_grammar::Span) -> String + 'a;

/// The MLIR of a train program as `curv emit --stage mlir` prints it: the loss-and-gradient
/// function and, for every parameter governed by a `rule`, the rule's update functions
/// specialised to that parameter's size; each function takes its buffers as `abi` says.
pub fn lower_train_program(
    train: &curv_ir::TrainProgram,
    rules: &[curv_ir::RuleProgram],
    gradients: &Function,
    locate: Option<&ModuleLocator<'_>>,
    abi: EntryAbi,
) -> Result<String, LowerError> {
    let mut out = String::new();
    let user_locate = locate.map(|locate| move |span: curv_grammar::Span| locate(None, span));
    let (text, _) = lower_function_for(
        gradients,
        "loss_and_gradients",
        &HashMap::new(),
        user_locate.as_ref().map(|locate| locate as &dyn Fn(curv_grammar::Span) -> String),
        abi,
        PartLimits::default(),
    )?;
    let _ = writeln!(out, "// train {}: loss and gradients", train.name);
    out.push_str(&text);
    // Parameters sharing an elementwise rule: one module per block for the whole group.
    let groups = curv_ir::group::plan_groups(&train.optimizer.plans, rules, &[]);
    for (group_index, group) in groups.iter().enumerate() {
        let Some(rule) = rules.iter().find(|rule| rule.name == group.rule) else { continue };
        let members: Vec<(String, i64)> = group
            .plans
            .iter()
            .map(|&plan| {
                let param = &train.params[train.optimizer.plans[plan].param];
                (param.name.clone(), param.ty.element_count().unwrap_or(0))
            })
            .collect();
        let bindings: HashMap<String, i64> = members
            .iter()
            .enumerate()
            .map(|(member, (_, size))| (curv_ir::group::member_symbol(member, "P"), *size))
            .collect();
        for (block, update) in rule.updates.iter().enumerate() {
            let name = format!("rule_{}_block{block}_group{group_index}", rule.name);
            let module = rule.module.clone();
            let rule_locate = locate.map(|locate| move |span: curv_grammar::Span| locate(module.as_deref(), span));
            let replicated = curv_ir::group::replicate(&update.function, members.len());
            let (text, _) = lower_function_for(
                &replicated,
                &name,
                &bindings,
                rule_locate.as_ref().map(|locate| locate as &dyn Fn(curv_grammar::Span) -> String),
                abi,
                PartLimits::default(),
            )?;
            let described: Vec<String> = members.iter().map(|(name, size)| format!("{name} ({size})")).collect();
            let _ = writeln!(
                out,
                "// rule {} (every {} steps from {}), one kernel for {}",
                rule.name,
                update.period,
                update.from,
                described.join(", ")
            );
            out.push_str(&text);
        }
    }
    let grouped: std::collections::HashSet<usize> =
        groups.iter().flat_map(|group| group.plans.iter().copied()).collect();
    let mut done: std::collections::HashSet<(String, i64)> = std::collections::HashSet::new();
    for (plan_index, plan) in train.optimizer.plans.iter().enumerate() {
        if plan.structure != curv_ir::StructureKind::Rule || grouped.contains(&plan_index) {
            continue;
        }
        let Some(rule) = rules.iter().find(|rule| rule.name == plan.rule_name) else { continue };
        let size = train.params[plan.param].ty.element_count().unwrap_or(0);
        if !done.insert((rule.name.clone(), size)) {
            continue;
        }
        let bindings = HashMap::from([("P".to_string(), size)]);
        for (block, update) in rule.updates.iter().enumerate() {
            let name = format!("rule_{}_block{block}_p{size}", rule.name);
            let module = rule.module.clone();
            let rule_locate = locate.map(|locate| move |span: curv_grammar::Span| locate(module.as_deref(), span));
            let (text, _) = lower_function_for(
                &update.function,
                &name,
                &bindings,
                rule_locate.as_ref().map(|locate| locate as &dyn Fn(curv_grammar::Span) -> String),
                abi,
                PartLimits::default(),
            )?;
            let _ = writeln!(
                out,
                "// rule {} (every {} steps from {}), parameters of {size} elements",
                rule.name, update.period, update.from
            );
            out.push_str(&text);
        }
    }
    Ok(out)
}
