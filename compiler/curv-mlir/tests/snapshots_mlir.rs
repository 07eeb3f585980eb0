//! Snapshots of the MLIR the lowering produces for small programs (`curv emit --stage mlir`),
//! and a check that each lowers through the CPU pipeline to the LLVM dialect.

use std::collections::HashMap;

const PROGRAM: &str = "use std.optimizers.adam\n\
data d = csv(\"digits.csv\", label = \"label\")\n\
model lin(x: f32[B, 64]) -> f32[B, 10] {\n    param w: f32[64, 10] = zeros\n    param b: f32[10] = zeros\n    return x @ w + b\n}\n\
train t {\n    loss cross_entropy(lin(d.x), d.y)\n    optimizer adam\n    batch 4\n    steps 1\n}\n";

fn program() -> (curv_ir::TrainProgram, Vec<curv_ir::RuleProgram>) {
    let source = curv_driver::SourceFile::in_memory("snapshot.curv", PROGRAM, std::path::Path::new("/nonexistent"));
    let compilation = curv_driver::compile_with_probe(source, &mut curv_driver::fuzzing::MemoryProbe);
    assert!(!compilation.has_errors(), "{}", curv_driver::render_diagnostics(&compilation, false));
    let program = compilation.analysis.unwrap().program;
    (program.trains[0].clone(), program.rules)
}

#[test]
fn the_loss_and_gradients_of_a_linear_classifier() {
    let (train, _) = program();
    let gradients = curv_ad::products::gradient_program(&train.loss, &train.params).function;
    let (text, signature) =
        curv_mlir::lower::lower_function(&gradients, "loss_and_gradients", &HashMap::new()).unwrap();
    assert_eq!(signature.outputs.len(), gradients.outputs.len());
    insta::assert_snapshot!("linear_classifier_gradients", text);
    let lowered = curv_mlir::jit::lower_text_for_cpu(&text).unwrap();
    assert!(lowered.contains("llvm.func @loss_and_gradients"));
    assert!(!lowered.contains("linalg."));
}

#[test]
fn the_adam_update_as_one_kernel() {
    let (_, rules) = program();
    let adam = rules.iter().find(|rule| rule.name == "adam").unwrap();
    let bindings = HashMap::from([("P".to_string(), 640)]);
    let (text, signature) =
        curv_mlir::lower::lower_function(&adam.updates[0].function, "adam_update", &bindings).unwrap();
    // p, g, m, v in; hyperparameters and the step as scalars; p, m, v out.
    assert_eq!(signature.outputs.iter().map(|(name, _, _)| name.as_str()).collect::<Vec<_>>(), ["p", "m", "v"]);
    insta::assert_snapshot!("adam_update", text);
    let lowered = curv_mlir::jit::lower_text_for_cpu(&text).unwrap();
    assert!(lowered.contains("llvm.func @adam_update"));
}

/// The tiling and vectorisation decisions are data in the lowered module: each elementwise
/// generic carries its vector tile (`curv.tile`) and the module ends with the schedule that tiles
/// and vectorises the generics of each tile; the schedule stage turns them into loops over
/// vector code, masked where a dimension (the 10 classes) is not a multiple of the vector.
#[test]
fn tiling_and_vectorisation_are_recorded_and_applied() {
    let (train, rules) = program();
    let adam = rules.iter().find(|rule| rule.name == "adam").unwrap();
    let bindings = HashMap::from([("P".to_string(), 640)]);
    let (update, _) = curv_mlir::lower::lower_function(&adam.updates[0].function, "adam_update", &bindings).unwrap();
    assert!(update.contains("curv.tile = array<i64: 8>"), "{update}");
    assert!(update.contains("transform.structured.tile_using_for %generics0 tile_sizes [8]"), "{update}");
    let tiled = curv_mlir::jit::schedule_text(&update).unwrap();
    insta::assert_snapshot!("adam_update_tiled", tiled);
    assert!(tiled.contains("scf.for") && tiled.contains("vector<8xf32>"), "{tiled}");
    assert!(!tiled.contains("linalg.generic") && !tiled.contains("transform."), "{tiled}");
    // The per-element `powf` of the bias corrections was moved in front of the loop.
    let powers: Vec<&str> = tiled.lines().filter(|line| line.contains("math.powf")).collect();
    assert_eq!(powers.len(), 2, "{tiled}");
    assert!(powers.iter().all(|line| line.trim_end().ends_with(": f32")), "{powers:?}");

    let gradients = curv_ad::products::gradient_program(&train.loss, &train.params).function;
    let (text, _) = curv_mlir::lower::lower_function(&gradients, "loss_and_gradients", &HashMap::new()).unwrap();
    assert!(text.contains("curv.tile = array<i64: 1, 8>"), "{text}");
    let tiled = curv_mlir::jit::schedule_text(&text).unwrap();
    assert!(tiled.contains("vector.mask") || tiled.contains("vector.create_mask"), "{tiled}");
}
