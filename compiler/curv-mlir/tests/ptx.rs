//! PTX from the kernel modules (text only, no GPU needed): every kernel the fusion plan of a
//! function promises exists as a `.entry` in the PTX, for `sm_80` and `sm_90`.

use curv_mlir::gpu::{lower_to_ptx, GpuTarget};
use std::collections::HashMap;
use std::path::Path;

mod common;
use common::program;

/// The size of each member of a rule group (`P.0`, `P.1`, ...), as the trainer binds them.
fn group_bindings(train: &curv_ir::TrainProgram, plans: &[usize]) -> HashMap<String, i64> {
    plans
        .iter()
        .enumerate()
        .map(|(member, &plan)| {
            let size = train.params[train.optimizer.plans[plan].param].ty.element_count().unwrap();
            (curv_ir::group::member_symbol(member, "P"), size)
        })
        .collect()
}

#[test]
fn the_grouped_adam_update_is_one_kernel_per_parameter_in_ptx_for_both_targets() {
    let program = program("digits_mlp.curv");
    let train = &program.trains[0];
    let group = &curv_ir::group::plan_groups(&train.optimizer.plans, &program.rules, &[])[0];
    let rule = program.rules.iter().find(|rule| rule.name == group.rule).unwrap();
    let replicated = curv_ir::group::replicate(&rule.updates[0].function, group.plans.len());
    let bindings = group_bindings(train, &group.plans);
    let (text, _) = curv_mlir::lower::lower_function_for_gpu(&replicated, "adam_group", &bindings, None).unwrap();
    for target in [GpuTarget::Sm80, GpuTarget::Sm90] {
        let modules = lower_to_ptx(&text, target).unwrap_or_else(|error| panic!("{target:?}: {error}"));
        let ptx: String = modules.iter().map(|module| module.ptx.as_str()).collect();
        assert!(ptx.contains(&format!(".target {}", target.chip())), "{ptx}");
        let entries = ptx.matches(".entry ").count();
        // One loop nest per member, each one kernel.
        assert_eq!(entries, group.plans.len(), "{ptx}");
        // The square root is the PTX instruction (the powers of the bias corrections run once
        // on the host side), and nothing is left for the driver to link.
        assert!(ptx.contains("sqrt.rn.f32"), "{ptx}");
        assert!(!ptx.contains(".extern"), "{ptx}");
        insta::assert_snapshot!(format!("adam_group_{}", target.chip()), entry_names(&modules));
    }
}

#[test]
fn the_digits_gradient_program_has_an_entry_for_every_launched_kernel() {
    let (gradients, text) = common::gradients("digits_mlp.curv");
    let modules = lower_to_ptx(&text, GpuTarget::Sm90).unwrap();
    let ptx: String = modules.iter().map(|module| module.ptx.as_str()).collect();
    let entries = ptx.matches(".entry ").count();
    let expected = common::launched_kernels(&gradients);
    assert!(entries >= expected, "{entries} entries for {expected} planned kernels");
    insta::assert_snapshot!("digits_gradient_entries", entry_names(&modules));
}

/// `MODULE: .entry NAME(` for every kernel.
fn entry_names(modules: &[curv_mlir::gpu::PtxModule]) -> String {
    let mut lines = Vec::new();
    for module in modules {
        for line in module.ptx.lines().filter(|line| line.contains(".entry ")) {
            lines.push(format!("{}: {}", module.name, line.trim()));
        }
    }
    lines.join("\n")
}

/// The PTX of every example's loss-and-gradient program is complete: the math MLIR would leave to
/// libdevice is defined in the module (`gpu::DEVICE_MATH`), so no `.extern` function remains for
/// the CUDA driver to resolve.
#[test]
fn the_ptx_of_every_example_needs_no_libdevice() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut examples: Vec<String> = ["digits_mlp.curv", "digits_cnn.curv", "siren.curv"].map(String::from).to_vec();
    examples.push("optimizers/sophia.curv".to_string());
    for example in examples {
        assert!(root.join(&example).is_file(), "{example}");
        let program = program(&example);
        let train = &program.trains[0];
        let gradients = curv_ad::products::gradient_program(&train.loss, &train.params).function;
        let (text, _) =
            curv_mlir::lower::lower_function_for_gpu(&gradients, "loss_and_gradients", &HashMap::new(), None).unwrap();
        let modules = lower_to_ptx(&text, GpuTarget::Sm90).unwrap_or_else(|error| panic!("{example}: {error}"));
        let ptx: String = modules.iter().map(|module| module.ptx.as_str()).collect();
        assert!(
            !ptx.contains(".extern"),
            "{example}: {}",
            ptx.lines().filter(|line| line.contains(".extern")).collect::<Vec<_>>().join("\n")
        );
    }
}

/// Lowered with source locations (as `curv build --device cuda` lowers), every planned kernel's
/// module names its kernel and the line of the `.curv` file it comes from in the PTX's first line,
/// which the CUDA runtime puts in the kernel's errors.
#[test]
fn each_kernel_module_names_its_source_line_in_its_ptx() {
    let (gradients, text) = common::located_gradients("digits_mlp.curv");
    let modules = lower_to_ptx(&text, GpuTarget::Sm90).unwrap();
    let mut located = 0;
    for module in &modules {
        let first = module.ptx.lines().next().unwrap_or("");
        let Some(rest) = first.strip_prefix(curv_mlir::gpu::KERNEL_SOURCE_PREFIX) else { continue };
        let (name, location) = rest.split_once(" at ").unwrap();
        assert_eq!(name, module.name);
        let (file, line_column) = location.split_once(':').unwrap();
        assert_eq!(file, "examples/digits_mlp.curv");
        // The model's lines (18 to 20) and the loss's (24).
        let line: usize = line_column.split(':').next().unwrap().parse().unwrap();
        assert!([18, 19, 20, 24].contains(&line), "{first}");
        // The runtime reads the same line back.
        assert_eq!(curv_cuda::kernel_source(&module.ptx), Some(format!("`{name}` ({location})")));
        located += 1;
    }
    let expected = common::launched_kernels(&gradients);
    assert!(located >= expected, "{located} kernels name their source, {expected} planned");
    // Without locations, no module claims one.
    let (plain, _) =
        curv_mlir::lower::lower_function_for_gpu(&gradients, "loss_and_gradients", &HashMap::new(), None).unwrap();
    let modules = lower_to_ptx(&plain, GpuTarget::Sm90).unwrap();
    assert!(modules.iter().all(|module| !module.ptx.starts_with(curv_mlir::gpu::KERNEL_SOURCE_PREFIX)));
}

#[test]
fn the_finiteness_check_of_a_resident_step_runs_on_the_gpu_without_reading_on_the_host() {
    // The digits MLP's resident step checks its 6 gradients and 6 new parameters in one call. On
    // the GPU every part of the check must be a kernel: a sum to a scalar would be a loop on the
    // host side, reading the resident tensors there (moving their pages off the device).
    let program = program("digits_mlp.curv");
    let train = &program.trains[0];
    let groups = curv_runtime::trainer::update_groups(train, &program.rules, None);
    let shapes = curv_runtime::trainer::resident_check_shapes(train, &groups).unwrap();
    assert_eq!(shapes.len(), 12);
    let function = curv_runtime::backend::finiteness_function(&shapes);
    let (text, _) = curv_mlir::lower::lower_function_for_gpu(&function, "finite", &HashMap::new(), None).unwrap();
    let outlined = curv_mlir::gpu::outline_kernels(&text).unwrap();
    let host = &outlined[..outlined.find("gpu.module").unwrap_or(outlined.len())];
    assert!(host.contains("gpu.launch_func"), "{host}");
    assert_eq!(host.matches("scf.for").count(), 0, "{host}");
    let modules = lower_to_ptx(&text, GpuTarget::Sm90).unwrap();
    let entries: usize = modules.iter().map(|module| module.ptx.matches(".entry ").count()).sum();
    // One kernel per input (its row placed into the common row) at most, and the split sum.
    assert!((2..=shapes.len() + 4).contains(&entries), "{entries} kernels");
}

/// The first host-side memory access of `function`'s GPU module, if any (see
/// `curv_mlir::gpu::host_memory_access`).
fn host_access(function: &curv_ir::Function, bindings: &HashMap<String, i64>) -> Option<String> {
    let (text, _) = curv_mlir::lower::lower_function_for_gpu(function, "f", bindings, None).unwrap();
    let text = text.replace("@curv_sgemm(", "@curv_cuda_sgemm(");
    let outlined = curv_mlir::gpu::outline_kernels(&text).unwrap_or_else(|error| panic!("{error}"));
    let inputs = curv_mlir::gpu::input_arguments(&text);
    curv_mlir::gpu::host_memory_access(&curv_mlir::gpu::device_allocations(&outlined).unwrap(), inputs)
}

#[test]
fn the_host_side_of_every_step_function_only_launches_so_launches_need_not_wait() {
    // On the GPU, a module whose host side reads or writes no memory lets its launches run back
    // to back without waiting (`curv_cuda_ordered_launches`). Every function of a resident step
    // must be such a module: losses (reductions to a scalar), scalar arithmetic, rule updates
    // alone and grouped, their initial states (zeros: fills, not copies of a constant on the
    // host side), the non-finite check and the batch gathers.
    let mut checked = 0;
    for example in
        ["digits_mlp.curv", "siren.curv", "digits_cnn.curv", "optimizers/adan.curv", "optimizers/sophia.curv"]
    {
        let program = program(example);
        let train = &program.trains[0];
        let none = HashMap::new();
        let mut functions: Vec<(String, curv_ir::Function, HashMap<String, i64>)> = vec![
            (
                "gradients".into(),
                curv_ad::products::gradient_program(&train.loss, &train.params).function,
                none.clone(),
            ),
            ("loss".into(), train.loss.clone(), none.clone()),
            ("hessian-vector".into(), curv_ad::products::hvp_program(&train.loss, &train.params), none.clone()),
        ];
        if let Some(test_loss) = &train.test_loss {
            functions.push(("test loss".into(), test_loss.clone(), none.clone()));
        }
        for plan in train.optimizer.plans.iter().filter(|plan| plan.structure == curv_ir::StructureKind::Rule) {
            let rule = program.rules.iter().find(|rule| rule.name == plan.rule_name).unwrap();
            let size = train.params[plan.param].ty.element_count().unwrap();
            let bindings = HashMap::from([("P".to_string(), size)]);
            functions.push((format!("{} init", rule.name), rule.init.clone(), bindings.clone()));
            for update in &rule.updates {
                functions.push((format!("{} update", rule.name), update.function.clone(), bindings.clone()));
            }
        }
        let groups = curv_runtime::trainer::update_groups(train, &program.rules, None);
        for group in &groups {
            let bindings = group_bindings(train, &group.plans);
            for block in &group.blocks {
                functions.push((format!("{} group", group.rule), block.clone(), bindings.clone()));
            }
        }
        if let Some(shapes) = curv_runtime::trainer::resident_check_shapes(train, &groups) {
            functions.push(("finiteness".into(), curv_runtime::backend::finiteness_function(&shapes), none.clone()));
        }
        functions.push(("gather".into(), curv_runtime::backend::batch_gather_function(1797, &[64], 128), none.clone()));
        for (name, function, bindings) in &functions {
            let access = host_access(function, bindings);
            assert!(access.is_none(), "{example} {name}: the host side runs `{}`", access.unwrap_or_default());
            checked += 1;
        }
    }
    assert!(checked >= 30, "{checked} functions");
}

#[test]
fn a_module_whose_host_side_only_launches_says_so_to_the_runtime_and_one_that_reads_memory_does_not() {
    let (_, text) = common::gradients("digits_mlp.curv");
    let lowered = curv_mlir::gpu::lower_for_cuda(&text, GpuTarget::Sm90).unwrap();
    assert_eq!(lowered.matches("llvm.call @curv_cuda_ordered_launches()").count(), 1);
    // A host side that reads a kernel's result itself must wait for it.
    let reading = "module {\n  func.func @f(%arg0: memref<4xf32>) -> f32 {\n    %c0 = arith.constant 0 : index\n    %0 = memref.load %arg0[%c0] : memref<4xf32>\n    return %0 : f32\n  }\n}\n";
    let loaded = Some("%0 = memref.load %arg0[%c0] : memref<4xf32>");
    assert_eq!(curv_mlir::gpu::host_memory_access(reading, 0).as_deref(), loaded);
    // Unless it reads an input, which no kernel writes and which is in place before the call.
    assert_eq!(curv_mlir::gpu::host_memory_access(reading, 1), None);
}
