//! E0309 to E0313: what `curv run` would refuse, reported by `curv check`. The constraints are
//! declared once in [`curv_ir::executable`], which the runtime reads too; this module only gives
//! each refusal the span of the option, modifier, loss or parameter at fault.

use crate::check::{label_in, Checker};
use crate::diagnostic::{Diagnostic, SourceId};
use curv_grammar::{ast, Span};
use curv_ir::executable::{line_refusals, program_refusals, Refusal, Site};
use curv_ir::{ModifierPlan, Options, RuleProgram, StructureKind, TrainProgram};
use std::collections::{HashMap, HashSet};

impl<'a> Checker<'a> {
    /// Reports every refusal of a rule line's structure, options and modifiers (E0309, E0310,
    /// E0311) at the option or modifier at fault; false when there was one.
    pub(crate) fn check_line_executes(
        &mut self,
        line: &ast::RuleLine,
        structure: StructureKind,
        options: &Options,
        option_spans: &HashMap<String, Span>,
        modifiers: &[ModifierPlan],
    ) -> bool {
        let refusals = line_refusals(structure, options, modifiers);
        for refusal in &refusals {
            let Refusal { code, site, message, help, .. } = refusal;
            let diagnostic = match site {
                Site::Option(name) => match option_spans.get(*name) {
                    Some(span) => Diagnostic::error(code, *span, message, "`curv run` does not execute this"),
                    None => {
                        let value = options.iter().find(|(key, _)| key == name).map(|(_, value)| value.to_string());
                        let value = value.unwrap_or_else(|| "unset".to_string());
                        Diagnostic::error(
                            code,
                            line.structure.span,
                            message,
                            format!("`{name}` is `{value}` here by default"),
                        )
                    }
                },
                Site::Modifier(index) => {
                    let span = line.modifiers.get(*index).map_or(line.span, |modifier| modifier.span);
                    Diagnostic::error(code, span, message, "`curv run` does not execute this")
                }
                Site::Loss | Site::Uses => {
                    Diagnostic::error(code, line.span, message, "`curv run` does not execute this")
                }
            };
            // The other option of a pair that does not go together.
            let diagnostic = match refusal.with.and_then(|other| option_spans.get(other).map(|span| (other, span))) {
                Some((other, span)) => diagnostic.with_label(*span, format!("`{other}` is set here")),
                None => diagnostic,
            };
            self.emit(diagnostic.with_help(help.clone()));
        }
        refusals.is_empty()
    }

    /// Reports the refusals of a train block's plan that depend on its loss (E0312, at the loss)
    /// and on how a K-FAC parameter is used in it (E0313, at the parameter), each with a label at
    /// the rule line (in `optimizer_source`).
    pub(crate) fn check_program_executes(&mut self, program: &TrainProgram, optimizer_source: SourceId, loss: Span) {
        // Each rule once, however many parameters it governs.
        let names: HashSet<&str> = program
            .optimizer
            .plans
            .iter()
            .filter(|plan| plan.structure == StructureKind::Rule)
            .map(|plan| plan.rule_name.as_str())
            .collect();
        let rules: Vec<&RuleProgram> = names.into_iter().filter_map(|name| self.rule_programs.get(name)).collect();
        let mut reported = HashSet::new();
        for (index, refusal) in program_refusals(program, &rules) {
            let plan = &program.optimizer.plans[index];
            let diagnostic = match refusal.site {
                // The line's own refusals were reported where the line was resolved.
                Site::Option(_) | Site::Modifier(_) => continue,
                Site::Loss => {
                    if !reported.insert((plan.span, refusal.message.clone())) {
                        continue;
                    }
                    Diagnostic::error(refusal.code, loss, &refusal.message, "the train block's loss")
                }
                Site::Uses => {
                    let Some(param) = program.params.get(plan.param) else { continue };
                    Diagnostic::error(
                        refusal.code,
                        param.span,
                        &refusal.message,
                        format!("`{}` is declared here", param.name),
                    )
                }
            };
            let mut diagnostic = diagnostic.with_help(refusal.help);
            diagnostic.labels.push(label_in(optimizer_source, plan.span, "the rule line that asks for it"));
            self.diagnostics.push(diagnostic);
        }
    }
}

#[cfg(test)]
mod tests {
    use curv_ir::executable::{
        CODE_LAYER_UNSUPPORTED, CODE_LOSS_UNSUPPORTED, CODE_MODIFIER_UNSUPPORTED, CODE_OPTIONS_CONFLICT,
        CODE_QUANTIZE_UNSUPPORTED,
    };

    #[test]
    fn every_refusal_code_is_a_listed_and_documented_diagnostic_code() {
        for code in [
            CODE_OPTIONS_CONFLICT,
            CODE_MODIFIER_UNSUPPORTED,
            CODE_QUANTIZE_UNSUPPORTED,
            CODE_LOSS_UNSUPPORTED,
            CODE_LAYER_UNSUPPORTED,
        ] {
            let summary = crate::CODES.iter().find(|(listed, _)| *listed == code).map(|(_, summary)| *summary);
            let summary = summary.unwrap_or_else(|| panic!("{code} is not in CODES"));
            let heading = format!("## {code}: {summary}\n");
            assert!(include_str!("../../../docs/errors.md").contains(&heading), "docs/errors.md has no `{heading}`");
        }
    }
}
