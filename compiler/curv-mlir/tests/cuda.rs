//! The CUDA path on this machine: kernel modules lowered for the GPU with their host side (launches,
//! managed allocations, cuBLAS products) compile to an execution engine without a GPU, and a call
//! either runs on the GPU and agrees with the CPU, or, with no GPU, returns the "no CUDA device"
//! error instead of crashing.

use curv_mlir::gpu::GpuTarget;
use curv_mlir::jit::{compile, compile_for_cuda, Buffer};
use std::collections::HashMap;
use std::path::Path;

fn program(example: &str) -> curv_ir::Program {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples").join(example);
    let source = curv_driver::SourceFile::read(&path).unwrap();
    let compilation = curv_driver::compile(source);
    assert!(!compilation.has_errors());
    compilation.analysis.unwrap().program
}

#[test]
fn the_host_side_lowers_with_launches_managed_allocations_and_no_other_dialect() {
    let program = program("digits_mlp.curv");
    let train = &program.trains[0];
    let gradients = curv_ad::products::gradient_program(&train.loss, &train.params).function;
    let (text, _) = curv_mlir::lower::lower_function(&gradients, "loss_and_gradients", &HashMap::new()).unwrap();
    let lowered = curv_mlir::gpu::lower_for_cuda(&text, GpuTarget::Sm90).unwrap();
    assert!(lowered.contains("gpu.launch_func"), "no launches");
    assert!(lowered.contains("gpu.binary"), "no embedded PTX");
    assert!(lowered.contains("llvm.call @mgpuMemAlloc"), "intermediate buffers are not GPU allocations");
    assert_eq!(
        lowered.matches("llvm.call @mgpuMemAlloc").count(),
        lowered.matches("llvm.call @curv_cuda_free").count(),
        "every intermediate buffer is freed"
    );
    assert!(lowered.contains("@_mlir_ciface_curv_sgemm"), "the matrix products are not runtime calls");
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
                || name == "_mlir_ciface_curv_sgemm"
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
        curv_mlir::lower::lower_function(&gradients, "loss_and_gradients", &HashMap::new()).unwrap();
    let gpu = compile_for_cuda(&text, "loss_and_gradients", signature.clone(), GpuTarget::Sm90, 2).unwrap();
    let cpu = compile(&text, "loss_and_gradients", signature.clone(), 2).unwrap();
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
