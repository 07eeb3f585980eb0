//! Multi-parameter updates: the update of a rule for several parameters as one function, so that
//! a step calls one compiled kernel per rule instead of one per parameter (PyTorch's "foreach"
//! and fused optimizers, Apex's multi-tensor apply).
//!
//! A rule's update function reads one parameter of symbolic size `P` (its flat view), its
//! gradient and its states as inputs, plus shared hyperparameters and the step. `replicate`
//! copies the body once per member: member `m` reads inputs `m * k .. (m + 1) * k` (with `k` the
//! rule's input count), its sizes are the symbols `P.m`, and its outputs are named `m:NAME`.
//! Hyperparameters and the step are read once and shared. Only rules whose update is
//! elementwise can be grouped (see [`groupable`]): then every member is an independent loop nest
//! of the same kernel, and the result is bit for bit the per-parameter result.

use crate::types::{Dim, Function, Op, ParamPlan, RuleProgram, StructureKind, ValueId};

/// Parameters whose rule updates run together: plans (indices into the optimizer's plans) of one
/// rule with the same options and modifiers.
#[derive(Debug, Clone, PartialEq)]
pub struct PlanGroup {
    pub rule: String,
    pub plans: Vec<usize>,
}

/// The most parameters one group's kernel updates. LLVM compiles a function in time that grows
/// faster than its length (a grouped update of 4,000 small parameters took 133 s, of 200 took
/// 0.9 s), so a larger set of parameters is split into groups of at most this many.
pub const MAX_GROUP_MEMBERS: usize = 128;

/// The multi-parameter groups of an optimizer: two to [`MAX_GROUP_MEMBERS`] plans of one rule
/// with equal options and modifiers, whose update blocks are all [`groupable`] and read no
/// statistics, leaving out the parameters in `excluded`. Deterministic: groups in the order of
/// their first plan.
pub fn plan_groups(plans: &[ParamPlan], rules: &[RuleProgram], excluded: &[usize]) -> Vec<PlanGroup> {
    let excluded: std::collections::HashSet<usize> = excluded.iter().copied().collect();
    let mut groups = Vec::new();
    let mut taken = vec![false; plans.len()];
    for (first, plan) in plans.iter().enumerate() {
        if taken[first] || plan.structure != StructureKind::Rule || excluded.contains(&plan.param) {
            continue;
        }
        let Some(rule) = rules.iter().find(|rule| rule.name == plan.rule_name) else { continue };
        let reads_statistics = rule
            .updates
            .iter()
            .any(|update| update.function.insts.iter().any(|inst| matches!(inst.op, Op::Statistic { .. })));
        if reads_statistics || !rule.updates.iter().all(|update| groupable(&update.function)) {
            continue;
        }
        // Bounded kernels: the members past the first few start groups of their own.
        let members: Vec<usize> = (first..plans.len())
            .filter(|&other| {
                let candidate = &plans[other];
                !taken[other]
                    && candidate.structure == StructureKind::Rule
                    && candidate.rule_name == plan.rule_name
                    && candidate.options == plan.options
                    && candidate.modifiers == plan.modifiers
                    && !excluded.contains(&candidate.param)
            })
            .take(MAX_GROUP_MEMBERS)
            .collect();
        if members.len() < 2 {
            continue;
        }
        for &member in &members {
            taken[member] = true;
        }
        groups.push(PlanGroup { rule: rule.name.clone(), plans: members });
    }
    groups
}

/// Whether `function` may be replicated over several parameters: every instruction is an input,
/// a hyperparameter, the step or elementwise work (no reductions, products, statistics or
/// data), so members cannot interact and the grouped function computes what the separate ones do.
pub fn groupable(function: &Function) -> bool {
    function.insts.iter().all(|inst| {
        matches!(inst.op, Op::Input { .. } | Op::Hyper { .. } | Op::Step) || crate::fusion::is_elementwise(&inst.op)
    })
}

/// The name of member `member`'s output `name` in a replicated function.
pub fn member_output(member: usize, name: &str) -> String {
    format!("{member}:{name}")
}

/// The name of member `member`'s copy of the symbolic size `symbol`.
pub fn member_symbol(member: usize, symbol: &str) -> String {
    format!("{symbol}.{member}")
}

/// `function` replicated for `members` parameters (see the module's documentation).
pub fn replicate(function: &Function, members: usize) -> Function {
    let inputs_per_member = function
        .insts
        .iter()
        .filter_map(|inst| match inst.op {
            Op::Input { index, .. } => Some(index + 1),
            _ => None,
        })
        .max()
        .unwrap_or(0);
    let mut grouped = Function::new(format!("{}.x{members}", function.name));
    let mut shared: Vec<Option<ValueId>> = vec![None; function.insts.len()];
    for member in 0..members {
        let mut map: Vec<ValueId> = Vec::with_capacity(function.insts.len());
        for (index, inst) in function.insts.iter().enumerate() {
            if matches!(inst.op, Op::Hyper { .. } | Op::Step) {
                if let Some(id) = shared[index] {
                    map.push(id);
                    continue;
                }
            }
            let op = match &inst.op {
                Op::Input { index, name } => {
                    Op::Input { index: member * inputs_per_member + index, name: member_output(member, name) }
                }
                other => other.clone(),
            };
            let mut ty = inst.ty.clone();
            for dim in &mut ty.shape {
                if let Dim::Symbol(symbol) = dim {
                    *dim = Dim::Symbol(member_symbol(member, symbol));
                }
            }
            let args = inst.args.iter().map(|arg| map[arg.0 as usize]).collect();
            let id = grouped.push(op, args, ty, inst.span);
            if matches!(inst.op, Op::Hyper { .. } | Op::Step) {
                shared[index] = Some(id);
            }
            map.push(id);
        }
        for (name, value) in &function.outputs {
            grouped.outputs.push((member_output(member, name), map[value.0 as usize]));
        }
    }
    grouped
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{BinaryOp, DType, TensorType};

    fn axpy() -> Function {
        let mut function = Function::new("axpy");
        let vector = TensorType { dtype: DType::F32, shape: vec![Dim::Symbol("P".into())] };
        let scalar = TensorType { dtype: DType::F32, shape: vec![] };
        let p = function.push(Op::Input { index: 0, name: "p".into() }, vec![], vector.clone(), Default::default());
        let g = function.push(Op::Input { index: 1, name: "g".into() }, vec![], vector.clone(), Default::default());
        let lr = function.push(Op::Hyper { name: "lr".into() }, vec![], scalar.clone(), Default::default());
        let step = function.push(Op::Binary(BinaryOp::Mul), vec![lr, g], vector.clone(), Default::default());
        let new = function.push(Op::Binary(BinaryOp::Sub), vec![p, step], vector, Default::default());
        function.outputs.push(("p".into(), new));
        function
    }

    #[test]
    fn members_get_their_own_inputs_sizes_and_outputs_and_share_hyperparameters() {
        let grouped = replicate(&axpy(), 3);
        let inputs: Vec<(usize, String)> = grouped
            .insts
            .iter()
            .filter_map(|inst| match &inst.op {
                Op::Input { index, name } => Some((*index, name.clone())),
                _ => None,
            })
            .collect();
        assert_eq!(
            inputs,
            vec![
                (0, "0:p".into()),
                (1, "0:g".into()),
                (2, "1:p".into()),
                (3, "1:g".into()),
                (4, "2:p".into()),
                (5, "2:g".into())
            ]
        );
        let hypers = grouped.insts.iter().filter(|inst| matches!(inst.op, Op::Hyper { .. })).count();
        assert_eq!(hypers, 1);
        let names: Vec<&str> = grouped.outputs.iter().map(|(name, _)| name.as_str()).collect();
        assert_eq!(names, ["0:p", "1:p", "2:p"]);
        assert_eq!(grouped.ty(grouped.outputs[2].1).shape, vec![Dim::Symbol("P.2".into())]);
        assert!(groupable(&axpy()));
    }

    #[test]
    fn reductions_are_not_groupable() {
        let mut function = axpy();
        let total = function.push(
            Op::Reduce { op: crate::types::ReduceOp::Sum, axes: vec![0] },
            vec![ValueId(0)],
            TensorType { dtype: DType::F32, shape: vec![] },
            Default::default(),
        );
        function.outputs.push(("norm".into(), total));
        assert!(!groupable(&function));
    }

    #[test]
    fn a_large_set_of_parameters_sharing_a_rule_is_split_into_groups_of_at_most_the_bound() {
        let rule = RuleProgram {
            name: "axpy".into(),
            module: None,
            hyperparameters: vec![("lr".into(), 0.1)],
            state: vec![],
            init: Function::new("init"),
            updates: vec![crate::types::RuleUpdate { period: 1, from: 1, function: axpy() }],
            statistics: vec![],
        };
        let plan = |param: usize| ParamPlan {
            param,
            pattern: "*".into(),
            structure: StructureKind::Rule,
            rule_name: "axpy".into(),
            options: vec![],
            modifiers: vec![],
            state: vec![],
            span: Default::default(),
        };
        let count = 2 * MAX_GROUP_MEMBERS + 3;
        let plans: Vec<ParamPlan> = (0..count).map(plan).collect();
        let groups = plan_groups(&plans, &[rule], &[1]);
        let sizes: Vec<usize> = groups.iter().map(|group| group.plans.len()).collect();
        assert_eq!(sizes, [MAX_GROUP_MEMBERS, MAX_GROUP_MEMBERS, 2]);
        // Every plan but the excluded one is in exactly one group, in order.
        let members: Vec<usize> = groups.iter().flat_map(|group| group.plans.iter().copied()).collect();
        let expected: Vec<usize> = (0..count).filter(|&plan| plan != 1).collect();
        assert_eq!(members, expected);
    }
}
