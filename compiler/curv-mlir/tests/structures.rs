//! The per-step functions of the diagonal, Muon and Shampoo structures
//! (`curv_runtime::structure_kernels`), which a resident step runs where its tensors are: compiled
//! for the CPU by MLIR they agree with the interpreter; lowered for CUDA, their matrix products
//! are cuBLAS calls, everything else is kernels, and their host side only launches (so their
//! launches run back to back).

mod common;

use curv_interp::{Inputs, Tensor, Value};
use curv_ir::{Op, OptionValue, StructureKind};
use curv_mlir::backend::MlirBackend;
use curv_mlir::gpu::{lower_to_ptx, GpuTarget};
use curv_runtime::structure_kernels::{device_plan, hyperparameters, kfac_device_plan, DevicePlan};
use curv_runtime::Backend;
use std::collections::HashMap;

/// The device plans of the Muon, Shampoo, SOAP and K-FAC examples' parameters, and of variants with weight
/// decay, a running average and no grafting, with a name for messages.
fn device_plans() -> Vec<(String, DevicePlan)> {
    let mut plans = Vec::new();
    for example in ["optimizers/muon.curv", "optimizers/shampoo.curv", "optimizers/soap.curv"] {
        let program = common::program(example);
        let train = &program.trains[0];
        for plan in &train.optimizer.plans {
            let shape: Vec<usize> =
                train.params[plan.param].ty.known_shape().unwrap().iter().map(|&size| size as usize).collect();
            let device = device_plan(plan, &shape).unwrap_or_else(|| panic!("{example}: {plan:?} has no device plan"));
            plans.push((format!("{example} {} {shape:?}", plan.rule_name), device));
            if plan.structure != StructureKind::Rule {
                let mut variant = plan.clone();
                variant.options.retain(|(key, _)| !matches!(key.as_str(), "ema" | "nesterov"));
                variant.options.push(("ema".to_string(), OptionValue::Number(0.9)));
                variant.options.push(("nesterov".to_string(), OptionValue::Bool(false)));
                variant.modifiers.retain(|modifier| modifier.name != "graft");
                variant.modifiers.push(curv_ir::ModifierPlan {
                    name: "weight_decay".to_string(),
                    options: vec![("lambda".to_string(), OptionValue::Number(0.1))],
                });
                let device = device_plan(&variant, &shape).unwrap();
                plans.push((format!("{example} {} {shape:?} variant", plan.rule_name), device));
            }
        }
    }
    // K-FAC's functions for the digits weights, with the bias folded in and not, for a capture
    // of 128 rows.
    let program = common::program("optimizers/kfac.curv");
    let train = &program.trains[0];
    for plan in train.optimizer.plans.iter().filter(|plan| plan.structure == StructureKind::Kronecker) {
        let shape: Vec<usize> =
            train.params[plan.param].ty.known_shape().unwrap().iter().map(|&size| size as usize).collect();
        for folded in [true, false] {
            let device = kfac_device_plan(plan, &shape, folded, 128, None).unwrap();
            plans.push((format!("kfac {shape:?} folded {folded}"), device));
        }
    }
    // K-FAC on the CNN's two convolutions (their patches: pads, slices and transposes) and its
    // dense layer, as the trainer plans them from the capture program.
    let program = common::program("digits_cnn.curv");
    let train = &program.trains[0];
    let captures = curv_runtime::trainer::capture_program(train).unwrap();
    for plan in train.optimizer.plans.iter().filter(|plan| plan.structure == StructureKind::Kronecker) {
        let device = curv_runtime::trainer::device_plan_of(train, plan, captures.as_ref()).unwrap();
        plans.push((format!("cnn kfac {}", train.params[plan.param].name), device));
    }
    plans
}

/// Inputs for `function`: values in [-1, 1] for each input (made positive for second moments,
/// which a square root reads), and the hyperparameters of step 3.
fn inputs_for(plan: &DevicePlan, function: &curv_ir::Function, seed: u64) -> Inputs<'static, f32> {
    let mut inputs: Inputs<f32> = hyperparameters(plan, 3, 0.01);
    let mut named: Vec<(usize, String, Vec<usize>)> = function
        .insts
        .iter()
        .filter_map(|inst| match &inst.op {
            Op::Input { index, name } => {
                Some((*index, name.clone(), inst.ty.known_shape().unwrap().iter().map(|&size| size as usize).collect()))
            }
            _ => None,
        })
        .collect();
    named.sort();
    for (index, name, shape) in named {
        let count = shape.iter().product();
        let mut data = common::values(count, seed + index as u64, 1.0);
        if matches!(name.as_str(), "v" | "graft_v") {
            data.iter_mut().for_each(|value| *value = value.abs());
        }
        inputs.inputs.push(Value::Real(Tensor::new(shape, data)));
    }
    inputs
}

#[test]
fn the_structures_step_functions_compiled_by_mlir_agree_with_the_interpreter() {
    let backend = MlirBackend::new(2);
    let mut checked = 0;
    for (name, plan) in device_plans() {
        for (position, part) in plan.all_parts().iter().enumerate() {
            let function = plan.function(part).unwrap();
            let inputs = inputs_for(&plan, &function, 7 + position as u64);
            let expected = curv_runtime::backend::Interpreter.outputs("reference", &function, &inputs).unwrap();
            let got = backend.outputs(&plan.key(part), &function, &inputs).unwrap_or_else(|error| {
                panic!("{name} {}: {error}", plan.key(part));
            });
            assert_eq!(expected.len(), got.len());
            for ((expected_name, expected), (got_name, got)) in expected.iter().zip(&got) {
                assert_eq!(expected_name, got_name);
                let (expected, got) = (expected.as_real().unwrap(), got.as_real().unwrap());
                assert_eq!(expected.shape, got.shape, "{name} `{expected_name}`");
                let largest = expected.data.iter().fold(0.0f32, |largest, value| largest.max(value.abs()));
                for (index, (a, b)) in expected.data.iter().zip(&got.data).enumerate() {
                    assert!(
                        (a - b).abs() <= 1e-4 * largest.max(1.0),
                        "{name} {}: `{expected_name}`[{index}] is {b}, the interpreter says {a}",
                        plan.key(part)
                    );
                }
            }
            checked += 1;
        }
    }
    // Muon: two matrices and two vectors, each with a variant for the matrices; Shampoo: the
    // same, with three functions per matrix.
    assert!(checked >= 16, "{checked} functions");
}

#[test]
fn the_structures_step_functions_lower_to_cublas_products_and_kernels_that_launch_back_to_back() {
    let mut products_checked = 0;
    for (name, plan) in device_plans() {
        for part in plan.all_parts() {
            let function = plan.function(&part).unwrap();
            let (text, _) = curv_mlir::lower::lower_function_for_gpu(&function, "f", &HashMap::new(), None).unwrap();
            let products = function.insts.iter().filter(|inst| inst.op == Op::MatMul).count();
            // Each matrix product is a call of the GEMM (cuBLAS on the GPU).
            assert_eq!(text.matches("call @curv_sgemm(").count(), products, "{name} {}", plan.key(&part));
            products_checked += products;
            // The host side launches only: it reads no tensor and computes no element itself.
            let cuda_text = text.replace("@curv_sgemm(", "@curv_cuda_sgemm(");
            let outlined = curv_mlir::gpu::outline_kernels(&cuda_text).unwrap();
            let inputs = curv_mlir::gpu::input_arguments(&cuda_text);
            let access =
                curv_mlir::gpu::host_memory_access(&curv_mlir::gpu::device_allocations(&outlined).unwrap(), inputs);
            assert!(
                access.is_none(),
                "{name} {}: the host side runs `{}`",
                plan.key(&part),
                access.unwrap_or_default()
            );
            let modules = lower_to_ptx(&text, GpuTarget::Sm90).unwrap();
            let entries: usize = modules.iter().map(|module| module.ptx.matches(".entry ").count()).sum();
            // At least one kernel; MLIR may fuse more than the plan does (an epilogue of a product
            // with the elementwise kernel that reads it), so there may be fewer than planned.
            let planned = common::launched_kernels(&function);
            assert!(entries >= 1 && planned >= 1, "{name} {}: {entries} entries, {planned} planned", plan.key(&part));
        }
    }
    // Muon's five Newton-Schulz iterations (3 products each) for two matrices and their variants,
    // Shampoo's two statistics and two preconditioning products.
    assert!(products_checked >= 4 * 15 + 2 * 4, "{products_checked} products");
}
