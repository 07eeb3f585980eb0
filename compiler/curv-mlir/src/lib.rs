//! `curv-mlir` owns every use of MLIR in curv, through `melior` 0.27 against LLVM/MLIR 22.
//!
//! No other crate may depend on `melior`: the rest of the compiler describes kernels in curv's own
//! IR and hands them here. Today this crate proves the toolchain: it creates an MLIR context with
//! every dialect registered, parses and verifies a module, and lowers it to the LLVM dialect with a
//! pass pipeline. The kernel lowering of the MLIR backend grows here.

pub mod backend;
pub mod cache;
pub mod gpu;
pub mod jit;
pub mod lower;
pub mod object;

use melior::{
    dialect::DialectRegistry,
    ir::{
        block::BlockLike,
        operation::{OperationLike, OperationMutLike},
        Module,
    },
    pass::PassManager,
    utility::{parse_pass_pipeline, register_all_dialects, register_all_llvm_translations, register_all_passes},
    Context,
};

/// A failure inside MLIR, with the messages MLIR's diagnostic handler collected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MlirError {
    pub message: String,
}

impl std::fmt::Display for MlirError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(&self.message)
    }
}

impl std::error::Error for MlirError {}

/// Creates a context with all upstream dialects loaded, LLVM translations and passes registered.
pub fn new_context() -> Context {
    let registry = DialectRegistry::new();
    register_all_dialects(&registry);
    let context = Context::new();
    context.append_dialect_registry(&registry);
    context.load_all_available_dialects();
    register_all_llvm_translations(&context);
    register_all_passes();
    context
}

/// Parses `source` as an MLIR module, verifies it, runs `pipeline` on it and returns the printed
/// result. A pipeline that does not interpret the module's schedule (the GPU one) runs on the
/// module with its schedule erased. Used by the GPU path, the toolchain self-check
/// (`curv version --mlir`) and tests.
pub fn run_pipeline_on_text(source: &str, pipeline: &str) -> Result<String, MlirError> {
    run_pipeline(source, pipeline, false)
}

/// [`run_pipeline_on_text`], printing every operation's location (`loc(...)`), so that locations
/// survive a round trip through text (the GPU path reads them to name each kernel's source).
pub fn run_pipeline_keeping_locations(source: &str, pipeline: &str) -> Result<String, MlirError> {
    run_pipeline(source, pipeline, true)
}

fn run_pipeline(source: &str, pipeline: &str, locations: bool) -> Result<String, MlirError> {
    let context = new_context();
    let mut module = parse_verified(&context, source)?;
    if !pipeline.contains("transform-interpreter") {
        erase_schedule(&mut module);
    }
    let pass_manager = PassManager::new(&context);
    parse_pass_pipeline(pass_manager.as_operation_pass_manager(), pipeline)
        .map_err(|error| MlirError { message: format!("bad pass pipeline: {error}") })?;
    pass_manager.run(&mut module).map_err(|error| MlirError { message: format!("pass pipeline failed: {error}") })?;
    if !module.as_operation().verify() {
        return Err(MlirError { message: "the lowered module does not verify".to_string() });
    }
    if locations {
        let flags = melior::ir::operation::OperationPrintingFlags::new().enable_debug_info(true, false);
        return module
            .as_operation()
            .to_string_with_flags(flags)
            .map_err(|error| MlirError { message: format!("printing the module: {error}") });
    }
    Ok(module.as_operation().to_string())
}

/// Parses MLIR text into a module and verifies it.
pub fn parse_verified<'c>(context: &'c Context, source: &str) -> Result<Module<'c>, MlirError> {
    let module = Module::parse(context, source)
        .ok_or_else(|| MlirError { message: "MLIR could not parse the module".to_string() })?;
    if !module.as_operation().verify() {
        return Err(MlirError { message: "the parsed module does not verify".to_string() });
    }
    Ok(module)
}

/// Whether the module holds a transform-dialect schedule (`@__transform_main`, which the lowering
/// appends to every module it writes).
pub fn has_schedule(module: &Module) -> bool {
    let mut operation = module.body().first_operation();
    while let Some(current) = operation {
        if current.name().as_string_ref().as_str() == Ok("transform.named_sequence") {
            return true;
        }
        operation = current.next_in_block();
    }
    false
}

/// Removes the module's transform-dialect schedule once it has been interpreted (or when a
/// pipeline does not use it, as the GPU one does not): no later pass lowers transform ops.
pub fn erase_schedule(module: &mut Module) {
    let body = module.body();
    let mut operation = body.first_operation_mut();
    while let Some(mut current) = operation {
        let next = current.next_in_block_mut();
        if current.name().as_string_ref().as_str() == Ok("transform.named_sequence") {
            current.remove_from_parent();
            // Removed from its block, the operation is owned by nothing; destroy it.
            unsafe { melior::ir::Operation::from_raw(current.to_raw()) };
        }
        operation = next;
    }
    // A module without the attribute is fine too; there is nothing to report.
    let _ = module.as_operation_mut().remove_attribute("transform.with_named_sequence");
}

/// A fixed element-wise `linalg.generic` kernel (`y = a * x + y`) lowered all the way to the LLVM
/// dialect: the smallest end-to-end proof that the MLIR toolchain curv links against works.
pub fn toolchain_self_check() -> Result<String, MlirError> {
    const AXPY: &str = r#"
#map = affine_map<(d0) -> (d0)>
module {
  func.func @axpy(%a: f32, %x: memref<?xf32>, %y: memref<?xf32>) attributes { llvm.emit_c_interface } {
    linalg.generic {indexing_maps = [#map, #map], iterator_types = ["parallel"]}
        ins(%x : memref<?xf32>) outs(%y : memref<?xf32>) {
    ^bb0(%xi: f32, %yi: f32):
      %p = arith.mulf %a, %xi : f32
      %s = arith.addf %p, %yi : f32
      linalg.yield %s : f32
    }
    return
  }
}
"#;
    const PIPELINE: &str = "builtin.module(func.func(convert-linalg-to-loops),convert-scf-to-cf,convert-to-llvm,reconcile-unrealized-casts)";
    run_pipeline_on_text(AXPY, PIPELINE)
}

#[cfg(test)]
mod tests {
    #[test]
    fn axpy_lowers_to_the_llvm_dialect() {
        let lowered = super::toolchain_self_check().expect("the self check lowers");
        assert!(lowered.contains("llvm.func @axpy"), "{lowered}");
        assert!(!lowered.contains("linalg.generic"), "{lowered}");
    }

    #[test]
    fn a_malformed_module_is_an_error_not_a_crash() {
        let error = super::run_pipeline_on_text("func.func @f(", "builtin.module()").unwrap_err();
        assert!(error.message.contains("could not parse"));
    }
}
