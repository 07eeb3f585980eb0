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

/// `curv build --device cuda` objects: machine code for the host side with the PTX embedded and
/// a static initialiser that loads it when the trainer starts.
#[test]
fn a_gpu_object_file_has_the_entry_point_the_embedded_ptx_and_an_initialiser() {
    let program = program("digits_mlp.curv");
    let train = &program.trains[0];
    let gradients = curv_ad::products::gradient_program(&train.loss, &train.params).function;
    let (text, _) = curv_mlir::lower::lower_function(&gradients, "kernel_7", &HashMap::new()).unwrap();
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
