//! What the runtime executes, declared once: the matrix functions each Kronecker statistic goes
//! with, the `dense` statistics that run, the quantisation widths, the structures each modifier
//! runs on, and what some statistics ask of the loss and of the way a parameter is used.
//!
//! The checker reports a plan outside these tables as a diagnostic (the codes below, with the span
//! of the option, modifier or parameter at fault), and the runtime refuses the same plan with the
//! same words before its first step: a program `curv check` accepts is not refused when `curv run`
//! starts.

use crate::{option_name, option_number, Function, LossKind, ModifierPlan, Op, Options, ParamPlan, RuleProgram};
use crate::{StructureKind, TrainProgram, ValueId};
use std::collections::HashSet;

/// Options of a structure that do not go together.
pub const CODE_OPTIONS_CONFLICT: &str = "E0309";
/// A modifier on a structure it does not run on.
pub const CODE_MODIFIER_UNSUPPORTED: &str = "E0310";
/// A `quantize` width that has no quantisation map.
pub const CODE_QUANTIZE_UNSUPPORTED: &str = "E0311";
/// A statistic that needs another kind of loss.
pub const CODE_LOSS_UNSUPPORTED: &str = "E0312";
/// A K-FAC parameter that is not used as a layer the statistics can capture.
pub const CODE_LAYER_UNSUPPORTED: &str = "E0313";

/// The Kronecker statistics (`stats`) and the matrix functions (`function`) that go with each.
pub const KRONECKER_FUNCTIONS: &[(&str, &[&str])] = &[
    ("gradient_outer", &["inverse_root", "newton", "eigenbasis"]),
    ("kfac", &["damped_inverse", "damped_eigen", "sherman_morrison", "adafisher", "singd"]),
    ("psgd", &["lie_group"]),
];

/// The `dense` statistics that execute: lazy Newton's `hessian` and EGN's `ggn`.
pub const DENSE_STATISTICS: &[&str] = &["hessian", "ggn"];

/// The widths of quantised Shampoo (`quantize` below 32; 32 and above do not quantise).
pub const QUANTIZE_BITS: &[u32] = &[4, 8];

/// The matrix functions of K-FAC statistics that also precondition `conv2d` kernels.
pub const CONVOLUTION_FUNCTIONS: &[&str] = &["damped_inverse", "damped_eigen"];

/// The structures each modifier runs on (`weight_decay` runs on every one and on rules; `graft`
/// also needs a root function, see [`modifier_runs_on`]).
pub const MODIFIER_STRUCTURES: &[(&str, &[StructureKind])] = &[
    (
        "weight_decay",
        &[
            StructureKind::Rule,
            StructureKind::Diagonal,
            StructureKind::Factored,
            StructureKind::Kronecker,
            StructureKind::Orthogonalize,
            StructureKind::LowRank,
            StructureKind::Dense,
        ],
    ),
    ("momentum", &[StructureKind::Diagonal, StructureKind::Kronecker, StructureKind::LowRank, StructureKind::Dense]),
    ("graft", &[StructureKind::Kronecker]),
    (
        "rms_clip",
        &[StructureKind::Kronecker, StructureKind::Orthogonalize, StructureKind::LowRank, StructureKind::Dense],
    ),
    ("kl_clip", &[StructureKind::Kronecker]),
    ("clip", &[]),
];

/// The Kronecker functions `graft` runs with (Shampoo's roots).
pub const GRAFT_FUNCTIONS: &[&str] = &["inverse_root", "newton"];

/// What a refusal points at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Site {
    /// An option of the structure, by name (it may have been left at its default).
    Option(&'static str),
    /// The modifier at this index of the plan's modifiers.
    Modifier(usize),
    /// The train block's loss.
    Loss,
    /// The parameter's uses in the loss.
    Uses,
}

/// Why the runtime refuses a plan: the check's code, where the problem is, and what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub code: &'static str,
    pub site: Site,
    pub message: String,
    pub help: String,
    /// The option the one at fault does not go with (`stats` for a `function`, `quantize`).
    pub with: Option<&'static str>,
}

impl Refusal {
    fn new(code: &'static str, site: Site, message: String, help: impl Into<String>) -> Refusal {
        Refusal { code, site, message, help: help.into(), with: None }
    }

    fn with(self, option: &'static str) -> Refusal {
        Refusal { with: Some(option), ..self }
    }
}

/// The Kronecker function of `options` (its default is `inverse_root`).
fn kronecker_function(options: &Options) -> &str {
    option_name(options, "function").unwrap_or("inverse_root")
}

/// Whether `modifier` runs on `structure` with the Kronecker function `function`.
pub fn modifier_runs_on(modifier: &str, structure: StructureKind, function: &str) -> bool {
    let on_structure = MODIFIER_STRUCTURES
        .iter()
        .find(|(name, _)| *name == modifier)
        .is_some_and(|(_, structures)| structures.contains(&structure));
    on_structure && (modifier != "graft" || GRAFT_FUNCTIONS.contains(&function))
}

/// The functions that go with the Kronecker statistic `stats`, as a sentence.
fn functions_of(stats: &str) -> String {
    let functions = KRONECKER_FUNCTIONS.iter().find(|(name, _)| *name == stats).map_or(&[][..], |(_, list)| *list);
    functions.iter().map(|function| format!("`{function}`")).collect::<Vec<_>>().join(", ")
}

/// Every reason the runtime refuses a rule line's structure, options and modifiers, whatever the
/// parameter and the loss: options that do not go together, an unsupported `quantize` width, a
/// modifier on a structure it does not run on.
pub fn line_refusals(structure: StructureKind, options: &Options, modifiers: &[ModifierPlan]) -> Vec<Refusal> {
    let mut refusals = Vec::new();
    let function = kronecker_function(options);
    match structure {
        StructureKind::Kronecker => {
            let stats = option_name(options, "stats").unwrap_or("gradient_outer");
            let fits =
                KRONECKER_FUNCTIONS.iter().any(|(name, functions)| *name == stats && functions.contains(&function));
            if !fits {
                let choices = KRONECKER_FUNCTIONS
                    .iter()
                    .map(|(name, _)| format!("with `stats = {name}`: {}", functions_of(name)))
                    .collect::<Vec<_>>()
                    .join("; ");
                refusals.push(
                    Refusal::new(
                        CODE_OPTIONS_CONFLICT,
                        Site::Option("function"),
                        format!("`function = {function}` does not go with `stats = {stats}`"),
                        format!("use {choices}"),
                    )
                    .with("stats"),
                );
            }
            let bits = option_number(options, "quantize").unwrap_or(32.0);
            if bits < 32.0 && fits && GRAFT_FUNCTIONS.contains(&function) {
                if !QUANTIZE_BITS.iter().any(|width| f64::from(*width) == bits) {
                    refusals.push(Refusal::new(
                        CODE_QUANTIZE_UNSUPPORTED,
                        Site::Option("quantize"),
                        format!("quantised Shampoo quantises to 4 or 8 bits, not {bits}"),
                        "write `quantize = 4` or `quantize = 8` (32 or more does not quantise)",
                    ));
                }
                if function != "inverse_root" {
                    refusals.push(
                        Refusal::new(
                            CODE_OPTIONS_CONFLICT,
                            Site::Option("function"),
                            format!("`function = {function}` does not go with `quantize`"),
                            "4-bit Shampoo computes its roots from the quantised eigenvectors: write \
                         `function = inverse_root`, or leave out `quantize`",
                        )
                        .with("quantize"),
                    );
                }
                for (index, modifier) in modifiers.iter().enumerate() {
                    let kind = option_name(&modifier.options, "kind").unwrap_or("adam");
                    if modifier.name == "graft" && kind != "sgd" {
                        refusals.push(
                            Refusal::new(
                                CODE_OPTIONS_CONFLICT,
                                Site::Modifier(index),
                                format!("`graft {kind}` does not go with `quantize`"),
                                "4-bit Shampoo always rescales its direction to the gradient's norm (SGD grafting): \
                             write `graft sgd` or no `graft`",
                            )
                            .with("quantize"),
                        );
                    }
                }
            }
        }
        StructureKind::Dense => {
            let stats = option_name(options, "stats").unwrap_or("gradient_outer");
            if !DENSE_STATISTICS.contains(&stats) {
                refusals.push(Refusal::new(
                    CODE_OPTIONS_CONFLICT,
                    Site::Option("stats"),
                    format!("`dense` does not execute with `stats = {stats}`"),
                    "use `stats = hessian` (lazy Newton) or `stats = ggn` (EGN), or another structure",
                ));
            }
        }
        _ => {}
    }
    for (index, modifier) in modifiers.iter().enumerate() {
        if !modifier_runs_on(&modifier.name, structure, function) {
            let runs_on: Vec<&str> = MODIFIER_STRUCTURES
                .iter()
                .find(|(name, _)| *name == modifier.name)
                .map(|(_, structures)| structures.iter().map(|structure| structure.name()).collect())
                .unwrap_or_default();
            let help = match (modifier.name.as_str(), runs_on.as_slice()) {
                (_, []) => format!("`{}` does not execute yet on any structure: remove it", modifier.name),
                ("graft", _) => "`graft` runs on `kronecker` with `function = inverse_root` or `newton` only: \
                                 remove it, or use one of those functions"
                    .to_string(),
                (name, structures) => format!("`{name}` runs on {}; remove it here", structures.join(", ")),
            };
            let on = if structure == StructureKind::Kronecker && modifier.name == "graft" {
                format!("`kronecker(function = {function})`")
            } else {
                format!("`{}`", structure.name())
            };
            refusals.push(Refusal::new(
                CODE_MODIFIER_UNSUPPORTED,
                Site::Modifier(index),
                format!("the `{}` modifier does not execute on {on}", modifier.name),
                help,
            ));
        }
    }
    refusals
}

/// Whether `plan` ever asks for statistics with labels drawn from the model (`sampled_grad`,
/// K-FAC's `fisher = sampled` and `exact`), which need a `cross_entropy` or `mse` loss against a
/// data field.
///
/// `label_rules` names the rules that draw labels ([`rules_drawing_labels`]), found once for all
/// plans: scanning every rule program for every plan made checking quadratic in the parameters.
pub fn draws_labels(plan: &ParamPlan, label_rules: &HashSet<&str>) -> bool {
    match plan.structure {
        StructureKind::Diagonal => matches!(option_name(&plan.options, "stats"), Some("gnb" | "sampled_fisher")),
        StructureKind::Kronecker => {
            option_name(&plan.options, "stats") == Some("kfac")
                && matches!(option_name(&plan.options, "fisher"), Some("sampled" | "exact"))
        }
        StructureKind::Rule => label_rules.contains(plan.rule_name.as_str()),
        _ => false,
    }
}

/// The names of the rules any of whose updates asks for `sampled_grad`.
pub fn rules_drawing_labels<'a>(rules: &[&'a RuleProgram]) -> HashSet<&'a str> {
    rules
        .iter()
        .filter(|rule| {
            rule.updates.iter().any(|update| {
                update
                    .function
                    .insts
                    .iter()
                    .any(|inst| matches!(&inst.op, Op::Statistic { kind } if kind == "sampled_grad"))
            })
        })
        .map(|rule| rule.name.as_str())
        .collect()
}

/// How a parameter is used as a layer's weight in the loss (`x @ W` or `conv2d(x, W)` on the way
/// to the loss), which is where K-FAC's statistics are captured.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerUses {
    pub products: usize,
    pub convolutions: usize,
}

/// The layer uses of every parameter of `function` (by `Op::Param` index) on the way to its
/// output `loss`.
pub fn layer_uses(function: &Function, param_count: usize) -> Vec<LayerUses> {
    let mut uses = vec![LayerUses::default(); param_count];
    let mut live = vec![false; function.insts.len()];
    if let Some(loss) = function.output("loss") {
        live[loss.0 as usize] = true;
    }
    for index in (0..function.insts.len()).rev() {
        if !live[index] {
            continue;
        }
        let inst = &function.insts[index];
        for argument in &inst.args {
            if let Some(slot) = live.get_mut(argument.0 as usize) {
                *slot = true;
            }
        }
        let weight = inst.args.get(1).map(|argument| function.inst(*argument));
        if let Some(Op::Param { index: param }) = weight.map(|weight| &weight.op) {
            if let Some(entry) = uses.get_mut(*param) {
                match inst.op {
                    Op::MatMul => entry.products += 1,
                    Op::Conv2d { .. } => entry.convolutions += 1,
                    _ => {}
                }
            }
        }
    }
    uses
}

/// Whether the output `name` of `function` is read straight from a data field.
fn is_data_field(function: &Function, name: &str) -> bool {
    function.output(name).is_some_and(|value: ValueId| matches!(function.inst(value).op, Op::Data { .. }))
}

/// Every reason the runtime refuses `program`'s optimizer plan, by plan index: the rule lines'
/// refusals ([`line_refusals`]), statistics that need another loss, and K-FAC parameters whose
/// uses the statistics cannot capture.
pub fn program_refusals(program: &TrainProgram, rules: &[&RuleProgram]) -> Vec<(usize, Refusal)> {
    let mut refusals = Vec::new();
    let mut layers = None;
    let label_rules = rules_drawing_labels(rules);
    for (index, plan) in program.optimizer.plans.iter().enumerate() {
        for refusal in line_refusals(plan.structure, &plan.options, &plan.modifiers) {
            refusals.push((index, refusal));
        }
        if plan.structure == StructureKind::Dense
            && option_name(&plan.options, "stats") == Some("ggn")
            && program.loss_kind != LossKind::CrossEntropy
        {
            refusals.push((
                index,
                Refusal::new(
                    CODE_LOSS_UNSUPPORTED,
                    Site::Loss,
                    "EGN (`dense(stats = ggn)`) needs a `cross_entropy(...)` loss".to_string(),
                    "make the train block's loss a direct `cross_entropy(logits, labels)` call, or use another \
                     structure",
                ),
            ));
        }
        if draws_labels(plan, &label_rules) {
            let (kind_fits, target) = match program.loss_kind {
                LossKind::CrossEntropy => (true, "labels"),
                LossKind::MeanSquaredError => (true, "target"),
                LossKind::Custom => (false, ""),
            };
            if !kind_fits || !is_data_field(&program.loss, target) {
                refusals.push((
                    index,
                    Refusal::new(
                        CODE_LOSS_UNSUPPORTED,
                        Site::Loss,
                        "statistics with labels drawn from the model (`gnb`, `sampled_fisher`, `sampled_grad`, \
                         `fisher = sampled` or `exact`) need a `cross_entropy(...)` or `mse(...)` loss whose target \
                         is a data field"
                            .to_string(),
                        "make the loss a direct `cross_entropy(logits, data.y)` or `mse(prediction, data.y)` call, or \
                         use statistics of the observed labels (`gradient_square`, `fisher = empirical`)",
                    ),
                ));
            }
        }
        if plan.structure == StructureKind::Kronecker && option_name(&plan.options, "stats") == Some("kfac") {
            let uses = layers.get_or_insert_with(|| layer_uses(&program.loss, program.params.len()));
            let use_of = uses.get(plan.param).copied().unwrap_or_default();
            let name = program.params.get(plan.param).map_or("?", |param| param.name.as_str());
            let function = kronecker_function(&plan.options);
            let refusal = if use_of.products + use_of.convolutions == 0 {
                Some(Refusal::new(
                    CODE_LAYER_UNSUPPORTED,
                    Site::Uses,
                    format!(
                        "K-FAC statistics need `{name}` to be used as `x @ {name}` or `conv2d(x, {name})` in the loss"
                    ),
                    format!("give `{name}` a line of its own above this one, such as `{name} : diagonal`"),
                ))
            } else if use_of.products != 0 && use_of.convolutions != 0 {
                Some(Refusal::new(
                    CODE_LAYER_UNSUPPORTED,
                    Site::Uses,
                    format!("K-FAC statistics need every use of `{name}` to be of one kind (products or convolutions)"),
                    "give the product and the convolution their own parameters",
                ))
            } else if use_of.convolutions != 0 && !CONVOLUTION_FUNCTIONS.contains(&function) {
                Some(Refusal::new(
                    CODE_LAYER_UNSUPPORTED,
                    Site::Uses,
                    format!("`function = {function}` does not precondition `conv2d` kernels such as `{name}` yet"),
                    "use `function = damped_inverse` or `damped_eigen` for convolution kernels",
                ))
            } else {
                None
            };
            refusals.extend(refusal.map(|refusal| (index, refusal)));
        }
    }
    refusals
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::OptionValue;

    fn options(pairs: &[(&str, OptionValue)]) -> Options {
        pairs.iter().map(|(name, value)| (name.to_string(), value.clone())).collect()
    }

    fn name(value: &str) -> OptionValue {
        OptionValue::Name(value.to_string())
    }

    fn modifier(name: &str, kind: Option<&str>) -> ModifierPlan {
        ModifierPlan {
            name: name.to_string(),
            options: kind
                .map(|kind| vec![("kind".to_string(), OptionValue::Name(kind.to_string()))])
                .unwrap_or_default(),
        }
    }

    #[test]
    fn every_pair_of_the_table_goes_together_and_no_other() {
        let all_functions: Vec<&str> = KRONECKER_FUNCTIONS.iter().flat_map(|(_, list)| list.iter().copied()).collect();
        for (stats, functions) in KRONECKER_FUNCTIONS {
            for function in &all_functions {
                let refusals = line_refusals(
                    StructureKind::Kronecker,
                    &options(&[("stats", name(stats)), ("function", name(function))]),
                    &[],
                );
                assert_eq!(refusals.is_empty(), functions.contains(function), "{stats} x {function}: {refusals:?}");
            }
        }
        // The defaults (gradient_outer, inverse_root) go together.
        assert!(line_refusals(StructureKind::Kronecker, &Vec::new(), &[]).is_empty());
    }

    #[test]
    fn quantize_takes_four_or_eight_bits_with_the_inverse_root_and_sgd_grafting() {
        let with = |bits: f64, function: &str, graft: Option<&str>| {
            let modifiers: Vec<ModifierPlan> = graft.map(|kind| modifier("graft", Some(kind))).into_iter().collect();
            line_refusals(
                StructureKind::Kronecker,
                &options(&[("quantize", OptionValue::Number(bits)), ("function", name(function))]),
                &modifiers,
            )
            .into_iter()
            .map(|refusal| (refusal.code, refusal.site))
            .collect::<Vec<_>>()
        };
        assert_eq!(with(4.0, "inverse_root", None), []);
        assert_eq!(with(8.0, "inverse_root", Some("sgd")), []);
        assert_eq!(with(32.0, "newton", Some("adam")), []);
        assert_eq!(with(5.0, "inverse_root", None), [(CODE_QUANTIZE_UNSUPPORTED, Site::Option("quantize"))]);
        assert_eq!(with(4.0, "newton", None), [(CODE_OPTIONS_CONFLICT, Site::Option("function"))]);
        assert_eq!(with(4.0, "inverse_root", Some("adam")), [(CODE_OPTIONS_CONFLICT, Site::Modifier(0))]);
    }

    #[test]
    fn modifiers_run_on_their_structures_only() {
        let refused = |structure: StructureKind, modifier_name: &str, function: &str| {
            let modifiers = [modifier(modifier_name, None)];
            let refusals = line_refusals(structure, &options(&[("function", name(function))]), &modifiers);
            refusals
                .iter()
                .any(|refusal| refusal.code == CODE_MODIFIER_UNSUPPORTED && refusal.site == Site::Modifier(0))
        };
        assert!(!refused(StructureKind::Rule, "weight_decay", "inverse_root"));
        assert!(refused(StructureKind::Rule, "momentum", "inverse_root"));
        assert!(refused(StructureKind::Diagonal, "clip", "inverse_root"));
        assert!(!refused(StructureKind::Kronecker, "graft", "newton"));
        assert!(refused(StructureKind::Kronecker, "graft", "eigenbasis"));
        assert!(refused(StructureKind::Orthogonalize, "kl_clip", "inverse_root"));
        assert!(!refused(StructureKind::Orthogonalize, "rms_clip", "inverse_root"));
    }

    #[test]
    fn dense_executes_with_hessian_and_ggn_only() {
        for (stats, executes) in [("hessian", true), ("ggn", true), ("gradient_outer", false)] {
            let refusals = line_refusals(StructureKind::Dense, &options(&[("stats", name(stats))]), &[]);
            assert_eq!(refusals.is_empty(), executes, "{stats}");
        }
        assert_eq!(line_refusals(StructureKind::Dense, &Vec::new(), &[])[0].site, Site::Option("stats"));
    }
}
