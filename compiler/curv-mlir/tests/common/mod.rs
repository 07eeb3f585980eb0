//! Helpers shared by the integration tests of curv-mlir.

use std::path::Path;

/// The checked program of an example (a path below `examples/`).
pub fn program(example: &str) -> curv_ir::Program {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples").join(example);
    let source = curv_driver::SourceFile::read(&path).unwrap();
    let compilation = curv_driver::compile(source);
    assert!(!compilation.has_errors());
    compilation.analysis.unwrap().program
}
