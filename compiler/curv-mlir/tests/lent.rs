//! A library's optimizer step lends the caller's parameters and gradients to the updates
//! (`UpdateInputs::param_lent`, `Inputs::lend`): the compiled kernels read them where they are.
//! These tests check that an update over lent tensors computes exactly what the update over owned
//! copies computes, for rules with and without weight decay, over several steps (so that the
//! states' first initialisation and later steps are both covered), and that a rule that leaves the
//! parameter as it is does not write it.

mod common;

use curv_interp::{Tensor, TensorRef};
use curv_ir::Dim;
use curv_mlir::backend::MlirBackend;
use curv_runtime::optimizer::{update_param, ParamState, UpdateInputs};
use curv_runtime::Backend;
use std::collections::HashMap;

/// Runs `steps` updates of every parameter of the example's optimizer twice on the MLIR backend:
/// once over owned copies (as the trainer does) and once with the parameter and gradient lent (as
/// the library's step does), and checks that parameters and states agree bit for bit.
fn lent_updates_agree_with_owned_ones(example: &str, steps: u64) {
    check_lent_updates(example, &common::program(&format!("optimizers/{example}.curv")), steps);
}

fn check_lent_updates(example: &str, program: &curv_ir::Program, steps: u64) {
    let train = &program.trains[0];
    let backend = MlirBackend::new(2);
    let statistics = HashMap::new();
    for plan in &train.optimizer.plans {
        let shape: Vec<usize> = train.params[plan.param]
            .ty
            .shape
            .iter()
            .map(|dim| match dim {
                Dim::Known(size) => *size as usize,
                Dim::Symbol(name) => panic!("symbolic {name}"),
            })
            .collect();
        let count: usize = shape.iter().product();
        let mut owned = Tensor::new(shape.clone(), common::values(count, plan.param as u64 + 1, 0.5));
        let mut caller = owned.data.clone();
        let (mut owned_state, mut lent_state): (ParamState<f32>, ParamState<f32>) = (Vec::new(), Vec::new());
        for step in 1..=steps {
            let gradient = Tensor::new(shape.clone(), common::values(count, 100 * step + plan.param as u64, 0.1));
            let owned_inputs = UpdateInputs {
                backend: &backend as &dyn Backend<f32>,
                step,
                learning_rate: 1e-2,
                batch: train.batch as usize,
                gradient: TensorRef::from(&gradient),
                param_lent: None,
                statistics: &statistics,
                captures: None,
                seed: 0,
                param: plan.param,
            };
            update_param(plan, &program.rules, &mut owned, &mut owned_state, &owned_inputs)
                .unwrap_or_else(|error| panic!("{example}: {error}"));
            let mut lent = Tensor { shape: shape.clone(), data: Vec::new() };
            update_param(
                plan,
                &program.rules,
                &mut lent,
                &mut lent_state,
                &UpdateInputs { param_lent: Some(&caller), ..owned_inputs },
            )
            .unwrap_or_else(|error| panic!("{example}: {error}"));
            let name = &train.params[plan.param].name;
            if lent.data.is_empty() {
                // Not written: then the owned update left the parameter as it was too.
                assert_eq!(owned.data, caller, "{example} `{name}` step {step}: the rule wrote the parameter");
            } else {
                assert_eq!(lent.data, owned.data, "{example} `{name}` step {step}: parameters differ");
                caller = lent.data;
            }
            assert_eq!(lent_state, owned_state, "{example} `{name}` step {step}: states differ");
        }
    }
}

#[test]
fn adam_over_lent_tensors_computes_what_it_computes_over_owned_ones() {
    lent_updates_agree_with_owned_ones("adam", 3);
}

#[test]
fn sgd_over_lent_tensors_computes_what_it_computes_over_owned_ones() {
    lent_updates_agree_with_owned_ones("sgd", 3);
}

#[test]
fn adam_with_the_weight_decay_modifier_over_lent_tensors_computes_what_it_computes_over_owned_ones() {
    // The `weight_decay` modifier changes the parameter where it is before the rule reads it, so
    // the update of a lent parameter starts from a copy of its values.
    let directory = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/optimizers");
    let text = std::fs::read_to_string(directory.join("adam.curv")).unwrap();
    assert!(text.contains("    optimizer adam\n"));
    let text = text.replace("    optimizer adam\n", "    optimizer decayed\n")
        + "\noptimizer decayed {\n    lr 1e-3\n    w* : adam weight_decay 0.1\n    * : adam\n}\n";
    let compilation = curv_driver::compile(curv_driver::SourceFile::in_memory("decayed.curv", &text, &directory));
    assert!(!compilation.has_errors(), "{}", curv_driver::render_diagnostics(&compilation, false));
    let program = compilation.analysis.unwrap().program;
    let decayed = program.trains[0].optimizer.plans.iter().filter(|plan| !plan.modifiers.is_empty()).count();
    assert_eq!(decayed, 2, "w1 and w2 have the modifier");
    check_lent_updates("adam with weight decay", &program, 3);
}

#[test]
fn sophia_whose_blocks_run_at_different_steps_over_lent_tensors_computes_what_it_computes_over_owned_ones() {
    lent_updates_agree_with_owned_ones("sophia", 4);
}
