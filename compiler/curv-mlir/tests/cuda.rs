//! The CUDA path on this machine: kernel modules lowered for the GPU with their host side (launches,
//! managed allocations, cuBLAS products) compile to an execution engine without a GPU, and a call
//! either runs on the GPU and agrees with the CPU, or, with no GPU, returns the "no CUDA device"
//! error instead of crashing.

use curv_mlir::gpu::GpuTarget;
use curv_mlir::jit::{compile, compile_for_cuda, Buffer};
use std::collections::HashMap;

mod common;
use common::program;

#[test]
fn the_host_side_lowers_with_launches_managed_allocations_and_no_other_dialect() {
    let (_, text) = common::gradients("digits_mlp.curv");
    let lowered = curv_mlir::gpu::lower_for_cuda(&text, GpuTarget::Sm90).unwrap();
    assert!(lowered.contains("gpu.launch_func"), "no launches");
    assert!(lowered.contains("gpu.binary"), "no embedded PTX");
    assert!(lowered.contains("llvm.call @mgpuMemAlloc"), "intermediate buffers are not GPU allocations");
    assert_eq!(
        lowered.matches("llvm.call @mgpuMemAlloc").count(),
        lowered.matches("llvm.call @curv_cuda_free").count(),
        "every intermediate buffer is freed"
    );
    assert!(lowered.contains("@_mlir_ciface_curv_cuda_sgemm"), "the matrix products are not cuBLAS calls");
    assert!(!lowered.contains("@malloc("), "a host allocation the kernels cannot reach");
    // Every function the module declares without defining it is one the engine is given (an
    // unresolved symbol would abort the process when the engine initialises).
    let registered: Vec<&str> = curv_cuda::runtime_symbols().iter().map(|(name, _)| *name).collect();
    for line in lowered.lines() {
        let trimmed = line.trim_start();
        if let Some(rest) = trimmed.strip_prefix("llvm.func @") {
            if trimmed.ends_with('{') {
                continue;
            }
            let name = rest.split('(').next().unwrap();
            let known = registered.contains(&name)
                || curv_runtime::linalg::runtime_functions()
                    .iter()
                    .any(|function| format!("_mlir_ciface_{}", function.name) == name);
            assert!(known, "`{name}` is declared but the engine is not given it");
        }
    }
}

#[test]
fn a_gpu_call_agrees_with_the_cpu_or_reports_that_there_is_no_gpu() {
    let program = program("digits_mlp.curv");
    let train = &program.trains[0];
    let gradients = curv_ad::products::gradient_program(&train.loss, &train.params).function;
    let (text, signature) =
        curv_mlir::lower::lower_function_for_gpu(&gradients, "loss_and_gradients", &HashMap::new(), None).unwrap();
    let gpu = compile_for_cuda(&text, "loss_and_gradients", signature.clone(), GpuTarget::Sm90, 2).unwrap();
    // The CPU's function takes its buffers through a table, the GPU's host side as descriptors.
    let (cpu_text, _) = curv_mlir::lower::lower_function(&gradients, "loss_and_gradients", &HashMap::new()).unwrap();
    let cpu = compile(&cpu_text, "loss_and_gradients", signature.clone(), 2).unwrap();
    // Deterministic inputs of the right shapes: features, parameters, integer labels.
    let mut arguments: Vec<curv_interp::Value<f32>> = signature
        .arguments
        .iter()
        .enumerate()
        .map(|(index, argument)| {
            let shape: Vec<usize> = argument.shape.iter().map(|&size| size as usize).collect();
            let count: usize = shape.iter().product();
            match argument.dtype {
                curv_ir::DType::I32 => curv_interp::Value::Int(curv_interp::Tensor::new(
                    shape,
                    (0..count).map(|element| (element % 10) as i32).collect(),
                )),
                _ => curv_interp::Value::Real(curv_interp::Tensor::new(
                    shape,
                    (0..count).map(|element| (((element * 7 + index * 13) % 17) as f32 - 8.0) / 40.0).collect(),
                )),
            }
        })
        .collect();
    let outputs = |dtype: curv_ir::DType, shape: &[i64]| {
        let shape: Vec<usize> = shape.iter().map(|&size| size as usize).collect();
        let count: usize = shape.iter().product();
        match dtype {
            curv_ir::DType::I32 => curv_interp::Value::Int(curv_interp::Tensor::new(shape, vec![0; count])),
            _ => curv_interp::Value::Real(curv_interp::Tensor::new(shape, vec![0.0; count])),
        }
    };
    let mut on_cpu: Vec<curv_interp::Value<f32>> =
        signature.outputs.iter().map(|(_, shape, dtype)| outputs(*dtype, shape)).collect();
    let mut on_gpu = on_cpu.clone();
    {
        let mut buffers: Vec<Buffer> = arguments.iter_mut().chain(on_cpu.iter_mut()).map(Buffer::of).collect();
        cpu.call(&mut buffers).unwrap();
    }
    let mut arguments_again = arguments.clone();
    let mut buffers: Vec<Buffer> = arguments_again.iter_mut().chain(on_gpu.iter_mut()).map(Buffer::of).collect();
    match curv_cuda::probe() {
        Err(reason) => {
            println!("skipped: no CUDA device ({reason})");
            let error = gpu.call(&mut buffers).unwrap_err();
            assert!(error.message.contains("no CUDA device"), "{}", error.message);
        }
        Ok(device) => {
            println!("running on {} ({})", device.name, device.chip());
            gpu.call(&mut buffers).unwrap();
            drop(buffers);
            for ((name, _, _), (expected, actual)) in signature.outputs.iter().zip(on_cpu.iter().zip(&on_gpu)) {
                match (expected, actual) {
                    (curv_interp::Value::Real(expected), curv_interp::Value::Real(actual)) => {
                        let scale = expected.data.iter().fold(1e-6f32, |maximum, value| maximum.max(value.abs()));
                        for (a, b) in actual.data.iter().zip(&expected.data) {
                            assert!((a - b).abs() <= 1e-4 * scale, "`{name}`: gpu {a} vs cpu {b}");
                        }
                    }
                    (curv_interp::Value::Int(expected), curv_interp::Value::Int(actual)) => {
                        assert_eq!(expected.data, actual.data, "`{name}`")
                    }
                    _ => panic!("`{name}`: types differ"),
                }
            }
        }
    }
}

/// `curv build --device cuda` objects: machine code for the host side with the PTX embedded and
/// a static initialiser that loads it when the trainer starts.
#[test]
fn a_gpu_object_file_has_the_entry_point_the_embedded_ptx_and_an_initialiser() {
    let program = program("digits_mlp.curv");
    let train = &program.trains[0];
    let gradients = curv_ad::products::gradient_program(&train.loss, &train.params).function;
    let (text, _) = curv_mlir::lower::lower_function_for_gpu(&gradients, "kernel_7", &HashMap::new(), None).unwrap();
    let directory = std::env::temp_dir().join(format!("curv-gpu-object-{}", std::process::id()));
    std::fs::create_dir_all(&directory).unwrap();
    let path = directory.join("kernel_7.o");
    curv_mlir::jit::compile_to_object_for_cuda(&text, &path, GpuTarget::Sm90).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(&bytes[..4], b"\x7fELF", "not an ELF object");
    let contains = |needle: &[u8]| bytes.windows(needle.len()).any(|window| window == needle);
    assert!(contains(b"_mlir_ciface_kernel_7"), "no entry point");
    assert!(contains(b"mgpuModuleLoadJIT"), "nothing loads the PTX");
    assert!(contains(b".target sm_90"), "no embedded PTX");
    // Linked into a program whose GPU runtime only counts, the initialisers run before `main`
    // and hand the driver the PTX, once per kernel module.
    let stub = directory.join("stub.c");
    std::fs::write(
        &stub,
        r#"#include <stdio.h>
#include <string.h>
static int loads = 0, ptx = 0;
void *mgpuModuleLoadJIT(void *data, int level) { loads++; if (strstr((const char *)data, ".entry")) ptx++; return (void *)1; }
void mgpuModuleUnload(void *module) {}
void *mgpuModuleGetFunction(void *module, const char *name) { return 0; }
void mgpuLaunchKernel(void *f, long gx, long gy, long gz, long bx, long by, long bz, int smem, void *s, void **p, void **e, long n) {}
void *mgpuStreamCreate(void) { return 0; }
void mgpuStreamSynchronize(void *s) {}
void curv_cuda_ordered_launches(void) {}
void mgpuStreamDestroy(void *s) {}
void *mgpuMemAlloc(unsigned long bytes, void *s, _Bool shared) { return 0; }
void curv_cuda_free(unsigned long address) {}
void _mlir_ciface_curv_cuda_sgemm(void *a, void *b, void *c) {}
int main(void) { printf("%d %d\n", loads, ptx); return 0; }
"#,
    )
    .unwrap();
    let program = directory.join("program");
    let status = std::process::Command::new("cc").arg("-o").arg(&program).arg(&stub).arg(&path).status().unwrap();
    assert!(status.success(), "linking the object failed");
    let output = std::process::Command::new(&program).output().unwrap();
    let counts = String::from_utf8_lossy(&output.stdout).into_owned();
    let (loads, with_ptx) = counts.trim().split_once(' ').unwrap();
    let (loads, with_ptx): (usize, usize) = (loads.parse().unwrap(), with_ptx.parse().unwrap());
    let modules = curv_mlir::gpu::lower_for_cuda(&text, GpuTarget::Sm90).unwrap().matches("gpu.binary @").count();
    assert!(loads >= 1 && loads == with_ptx, "{loads} modules loaded, {with_ptx} with PTX entries");
    assert_eq!(loads, modules, "every GPU module is loaded once");
    std::fs::remove_dir_all(&directory).unwrap();
}

/// The launches of the outlined host side, with their grid and block sizes (the text up to
/// `args(`), and whether each sits inside a host loop (indented deeper than a function's body).
fn launches(outlined: &str) -> Vec<(String, bool)> {
    outlined
        .lines()
        .filter(|line| line.trim_start().starts_with("gpu.launch_func"))
        .map(|line| {
            let indentation = line.len() - line.trim_start().len();
            (line.split(" args(").next().unwrap_or(line).trim().to_string(), indentation > 4)
        })
        .collect()
}

#[test]
fn no_kernel_is_launched_from_a_host_loop_nothing_is_copied_on_the_host_and_blocks_are_rows_of_neighbouring_threads() {
    for file in ["digits_mlp.curv", "siren.curv", "digits_cnn.curv"] {
        let program = program(file);
        let train = &program.trains[0];
        let gradients = curv_ad::products::gradient_program(&train.loss, &train.params).function;
        let (text, _) =
            curv_mlir::lower::lower_function_for_gpu(&gradients, "loss_and_gradients", &HashMap::new(), None).unwrap();
        let outlined = curv_mlir::gpu::outline_kernels(&text).unwrap();
        let launches = launches(&outlined);
        assert!(!launches.is_empty(), "{file}: no launches");
        // A bias gradient sums over the batch: its parallel loop comes first, so the sum runs in
        // each thread instead of one launch per row of the batch.
        for (launch, in_loop) in &launches {
            assert!(!in_loop, "{file}: a kernel launched from a host loop: {launch}");
        }
        // Results reach the output buffers through copy kernels, not the host.
        let host_copies: Vec<&str> =
            outlined.lines().filter(|line| line.contains("memref.copy") && line.contains('x')).collect();
        assert!(host_copies.is_empty(), "{file}: copies on the host: {host_copies:?}");
        // Two-dimensional blocks are 8 threads along a row (x) by 32 rows (y).
        assert!(
            launches.iter().any(|(launch, _)| launch.ends_with("threads in (%c8, %c32, %c1)")),
            "{file}: {launches:?}"
        );
        assert!(
            !launches.iter().any(|(launch, _)| launch.ends_with("threads in (%c32, %c8, %c1)")),
            "{file}: {launches:?}"
        );
    }
    // An optimizer rule's update over a flattened parameter: blocks of 256 threads.
    let program = program("digits_mlp.curv");
    let train = &program.trains[0];
    let plan = &train.optimizer.plans[0];
    let rule = program.rules.iter().find(|rule| rule.name == plan.rule_name).unwrap();
    let size = train.params[plan.param].ty.element_count().unwrap();
    let bindings = HashMap::from([("P".to_string(), size)]);
    let (text, _) =
        curv_mlir::lower::lower_function_for_gpu(&rule.updates[0].function, "update", &bindings, None).unwrap();
    let launches = launches(&curv_mlir::gpu::outline_kernels(&text).unwrap());
    assert!(!launches.is_empty());
    for (launch, _) in &launches {
        assert!(launch.ends_with("threads in (%c256, %c1, %c1)"), "{launch}");
    }
}

/// The values of the `memref.get_global` ops of an outlined module, and whether a launch takes
/// one as an argument.
fn constants_and_launches_of_them(outlined: &str) -> (Vec<String>, bool) {
    let constants: Vec<String> = outlined
        .lines()
        .filter(|line| line.contains("= memref.get_global"))
        .map(|line| format!("{} :", line.trim().split(" = ").next().unwrap()))
        .collect();
    let launched = outlined.lines().filter(|line| line.contains("gpu.launch_func")).any(|line| {
        constants
            .iter()
            .any(|constant| line.contains(&format!("args({constant}")) || line.contains(&format!(", {constant}")))
    });
    (constants, launched)
}

#[test]
fn a_copy_of_a_constant_stays_on_the_host_where_the_constant_is() {
    // A constant of the module lives in the host program: a kernel reading it would fault
    // (CUDA_ERROR_ILLEGAL_ADDRESS on an H200), so a copy of it stays a host copy.
    let text = "module {\n  func.func @f(%out0: memref<4xf32>) attributes { llvm.emit_c_interface } {\n    %c = arith.constant dense<[1.0, 2.0, 3.0, 4.0]> : tensor<4xf32>\n    bufferization.materialize_in_destination %c in restrict writable %out0 : (tensor<4xf32>, memref<4xf32>) -> ()\n    return\n  }\n}\n";
    let outlined = curv_mlir::gpu::outline_kernels(text).unwrap();
    let (constants, launched) = constants_and_launches_of_them(&outlined);
    assert!(!constants.is_empty() && !launched, "{outlined}");
    assert!(outlined.contains("memref.copy"), "{outlined}");
    // A rule's state starts as zeros: a splat constant, which becomes a fill kernel (the
    // zero passed by value), with no constant left in host memory.
    let program = program("digits_mlp.curv");
    let train = &program.trains[0];
    let plan = &train.optimizer.plans[0];
    let rule = program.rules.iter().find(|rule| rule.name == plan.rule_name).unwrap();
    let bindings = HashMap::from([("P".to_string(), 4096)]);
    let (text, _) = curv_mlir::lower::lower_function_for_gpu(&rule.init, "init", &bindings, None).unwrap();
    let outlined = curv_mlir::gpu::outline_kernels(&text).unwrap();
    let (constants, launched) = constants_and_launches_of_them(&outlined);
    assert!(constants.is_empty() && !launched, "{outlined}");
    let launches: Vec<&str> = outlined.lines().filter(|line| line.contains("gpu.launch_func")).collect();
    assert!(!launches.is_empty() && launches.iter().all(|line| line.contains(": f32")), "{outlined}");
    assert!(!outlined.contains("memref.copy"), "{outlined}");
}

#[test]
fn with_source_locations_the_host_side_is_unchanged_and_each_ptx_names_its_source() {
    let (_, text) = common::located_gradients("siren.curv");
    let lowered = curv_mlir::gpu::lower_for_cuda(&text, GpuTarget::Sm90).unwrap();
    // Printed locations leave the host side's rewriting intact: every allocation is managed and
    // freed, and nothing is left to the C library.
    assert_eq!(
        lowered.matches("llvm.call @mgpuMemAlloc").count(),
        lowered.matches("llvm.call @curv_cuda_free").count()
    );
    assert!(!lowered.contains("@malloc("));
    let annotated = lowered.matches(&format!("assembly = \"{}", curv_mlir::gpu::KERNEL_SOURCE_PREFIX)).count();
    let binaries = lowered.matches("gpu.binary @").count();
    assert!(annotated > 0 && annotated <= binaries, "{annotated} of {binaries} modules name their source");
    assert!(lowered.contains(" at examples/siren.curv:"));
}
