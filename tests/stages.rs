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
