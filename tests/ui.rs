//! UI tests: each `ui/*.curv` is an invalid program; its snapshot pairs the source with the
//! rendered diagnostics. Files under `ui/warnings/` must produce warnings and no errors.

use curv_tests::{pair, render_file};

#[test]
fn invalid_programs_render_their_diagnostics() {
    insta::glob!("ui/*.curv", |path| {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let (compilation, rendered) = render_file(path, &name);
        assert!(compilation.has_errors(), "{name} is in tests/ui but has no errors:\n{rendered}");
        let source = std::fs::read_to_string(path).unwrap();
        insta::assert_snapshot!(pair(&source, &rendered));
    });
}

#[test]
fn warnings_render_without_errors() {
    insta::glob!("ui/warnings/*.curv", |path| {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let (compilation, rendered) = render_file(path, &name);
        assert!(!compilation.has_errors(), "{name} should only warn:\n{rendered}");
        assert!(!compilation.diagnostics().is_empty(), "{name} should warn");
        let source = std::fs::read_to_string(path).unwrap();
        insta::assert_snapshot!(pair(&source, &rendered));
    });
}

#[test]
fn there_are_at_least_forty_ui_cases() {
    let directory = curv_tests::repository_root().join("tests/ui");
    let count = curv_tests::curv_files(&directory).len();
    assert!(count >= 40, "only {count} UI cases");
}
