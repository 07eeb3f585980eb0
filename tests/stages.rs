//! Stage snapshots of every example (`ast` and `ir`), and the guarantee that every example passes
//! `curv check` with no diagnostics.

use curv_driver::Stage;
use curv_tests::{curv_files, render_file, repository_root};

fn examples() -> Vec<std::path::PathBuf> {
    let root = repository_root();
    let mut files = curv_files(&root.join("examples"));
    files.extend(curv_files(&root.join("examples/optimizers")));
    assert!(files.len() >= 3, "the examples are missing");
    files
}

fn snapshot_name(path: &std::path::Path, stage: &str) -> String {
    let root = repository_root().join("examples");
    let relative = path.strip_prefix(&root).unwrap().to_string_lossy().replace(['/', '.'], "_");
    format!("{stage}__{relative}")
}

#[test]
fn every_example_checks_without_diagnostics() {
    for path in examples() {
        let (compilation, rendered) = render_file(&path, &path.display().to_string());
        assert!(compilation.diagnostics().is_empty(), "{}:\n{rendered}", path.display());
        assert!(
            !compilation.analysis.as_ref().unwrap().program.trains.is_empty(),
            "{} has no train block",
            path.display()
        );
    }
}

#[test]
fn ast_of_every_example() {
    for path in examples() {
        let (compilation, _) = render_file(&path, "example.curv");
        let text = curv_driver::emit(&compilation, Stage::Ast).unwrap();
        insta::assert_snapshot!(snapshot_name(&path, "ast"), text);
    }
}

#[test]
fn ir_of_every_example() {
    for path in examples() {
        let (compilation, _) = render_file(&path, "example.curv");
        let text = curv_driver::emit(&compilation, Stage::Ir).unwrap();
        insta::assert_snapshot!(snapshot_name(&path, "ir"), text);
    }
}

#[test]
fn tokens_of_the_digits_example() {
    let path = repository_root().join("examples/digits_mlp.curv");
    let (compilation, _) = render_file(&path, "example.curv");
    insta::assert_snapshot!("tokens__digits_mlp", curv_driver::emit(&compilation, Stage::Tokens).unwrap());
}

#[test]
fn check_summary_of_every_example() {
    for path in examples() {
        let (compilation, _) = render_file(&path, "example.curv");
        insta::assert_snapshot!(snapshot_name(&path, "check"), curv_driver::check_summary(&compilation));
    }
}

#[test]
fn every_rule_update_of_the_standard_library_is_one_fused_kernel() {
    // The fusion plan turns each `every` block of a preset into a single elementwise kernel: one
    // pass over the parameter, its gradient and its state.
    let mut checked = 0;
    for path in examples() {
        let (compilation, _) = render_file(&path, "example.curv");
        for rule in &compilation.analysis.unwrap().program.rules {
            for update in &rule.updates {
                let plan = curv_ir::fusion::plan_kernels(&update.function);
                assert_eq!(plan.kernels.len(), 1, "{}: {:?}", rule.name, plan.kernels);
                assert_eq!(plan.kernels[0].kind, curv_ir::fusion::KernelKind::Elementwise);
                checked += 1;
            }
        }
    }
    assert!(checked >= 8, "only {checked} rule updates were checked");
}

#[test]
fn the_digits_forward_pass_fuses_each_bias_and_activation_into_its_product_as_an_epilogue() {
    let path = repository_root().join("examples/digits_mlp.curv");
    let (compilation, _) = render_file(&path, "example.curv");
    let train = &compilation.analysis.unwrap().program.trains[0];
    let plan = curv_ir::fusion::plan_kernels(&train.loss);
    let kinds: Vec<&str> = plan.kernels.iter().map(|kernel| kernel.kind.name()).collect();
    // x @ w1 with + b1 and tanh as its epilogue; the same for the second layer, and the logits'
    // product with + b3.
    assert_eq!(&kinds[..3], ["matmul", "matmul", "matmul"], "{kinds:?}");
    let ops = |kernel: usize| -> Vec<String> {
        plan.kernels[kernel].insts.iter().map(|id| train.loss.inst(*id).op.name()).collect()
    };
    assert_eq!(ops(0), ["matmul", "add", "tanh"]);
    assert_eq!(ops(1), ["matmul", "add", "tanh"]);
    assert_eq!(ops(2), ["matmul", "add"]);
    // In the gradient program the backward products keep no epilogue where their result has
    // several users, and every kernel still reads only earlier kernels.
    let gradients = curv_ad::products::gradient_program(&train.loss, &train.params).function;
    let plan = curv_ir::fusion::plan_kernels(&gradients);
    for index in 0..plan.kernels.len() {
        for input in plan.inputs(&gradients, index) {
            if let Some(source) = plan.kernel_of[input.0 as usize] {
                assert!(source < index, "kernel k{index} reads the later kernel k{source}");
            }
        }
    }
}
