//! `curv bench-kernels` (hidden): generated GEMMs at three sizes and a fused Adam update of 4M
//! parameters, and a 64 MiB memory copy as the bandwidth reference, printed as JSON.

use super::*;

/// Median seconds of `repeats` calls of `run`.
pub(super) fn median_seconds(repeats: usize, mut run: impl FnMut()) -> f64 {
    let mut times: Vec<f64> = (0..repeats)
        .map(|_| {
            let started = std::time::Instant::now();
            run();
            started.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(|a, b| a.total_cmp(b));
    times[times.len() / 2]
}

pub(super) fn best_seconds(repeats: usize, mut run: impl FnMut()) -> f64 {
    (0..repeats)
        .map(|_| {
            let started = std::time::Instant::now();
            run();
            started.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// Times a generated matrix product at 256, 512 and 1024 and the fused Adam update of 4M
/// parameters, as JSON for the peer benchmark.
pub(super) fn bench_kernels() -> ExitCode {
    use curv_ir::{DType, Function, Op, TensorType};
    use curv_mlir::jit::{compile, Buffer};
    // As during training with the MLIR backend (see `curv_runtime::compiled`).
    curv_runtime::compiled::keep_large_allocations_in_the_heap();
    let mut report = Vec::new();
    for size in [256i64, 512, 1024] {
        let mut function = Function::new("gemm");
        let ty = TensorType::known(DType::F32, &[size, size]);
        let a = function.push(Op::Input { index: 0, name: "a".into() }, vec![], ty.clone(), Default::default());
        let b = function.push(Op::Input { index: 1, name: "b".into() }, vec![], ty.clone(), Default::default());
        let c = function.push(Op::MatMul, vec![a, b], ty, Default::default());
        function.outputs.push(("c".into(), c));
        let Ok((text, signature)) =
            curv_mlir::lower::lower_function(&function, "gemm", &std::collections::HashMap::new())
        else {
            return ExitCode::from(2);
        };
        let compiled = match compile(&text, "gemm", signature, 2) {
            Ok(compiled) => compiled,
            Err(error) => {
                eprintln!("error: {error}");
                return ExitCode::from(2);
            }
        };
        let count = (size * size) as usize;
        let mut left: Vec<f32> = (0..count).map(|index| (index % 7) as f32 * 0.1).collect();
        let mut right: Vec<f32> = (0..count).map(|index| (index % 5) as f32 * 0.1).collect();
        let mut out = vec![0.0f32; count];
        // The best of 20 calls, the statistic `benches/peers.py` takes for numpy's GEMM, after
        // three untimed calls (the first calls of a process were sometimes twice as slow).
        for _ in 0..3 {
            let _ = compiled.call(&mut [Buffer::F32(&mut left), Buffer::F32(&mut right), Buffer::F32(&mut out)]);
        }
        let seconds = best_seconds(20, || {
            let _ = compiled.call(&mut [Buffer::F32(&mut left), Buffer::F32(&mut right), Buffer::F32(&mut out)]);
        });
        report.push(format!("\"gemm_{size}_gflops\": {:.3}", 2.0 * (size as f64).powi(3) / seconds / 1e9));
    }
    // The fused Adam update: reads p, g, m, v and writes p, m, v.
    let source = curv_driver::SourceFile::in_memory(
        "bench.curv",
        "use std.optimizers.adam\ndata d = csv(\"d.csv\", label = \"label\")\nmodel m(x: f32[B, 64]) -> f32[B, 10] {\n    param w: f32[64, 10] = zeros\n    return x @ w\n}\ntrain t {\n    loss cross_entropy(m(d.x), d.y)\n    optimizer adam\n    steps 1\n}\n",
        std::path::Path::new("/nonexistent"),
    );
    let compilation = curv_driver::compile_with_probe(source, &mut curv_driver::fuzzing::MemoryProbe);
    let Some(analysis) = &compilation.analysis else { return ExitCode::from(2) };
    let Some(adam) = analysis.program.rules.iter().find(|rule| rule.name == "adam") else { return ExitCode::from(2) };
    let size: i64 = 1 << 22;
    let bindings = std::collections::HashMap::from([("P".to_string(), size)]);
    let Ok((text, signature)) = curv_mlir::lower::lower_function(&adam.updates[0].function, "adam", &bindings) else {
        return ExitCode::from(2);
    };
    let compiled = match compile(&text, "adam", signature.clone(), 2) {
        Ok(compiled) => compiled,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::from(2);
        }
    };
    let mut buffers: Vec<Vec<f32>> = signature
        .arguments
        .iter()
        .map(|argument| vec![0.5f32; argument.shape.iter().product::<i64>() as usize])
        .chain(signature.outputs.iter().map(|(_, shape, _)| vec![0.0f32; shape.iter().product::<i64>() as usize]))
        .collect();
    let seconds = median_seconds(9, || {
        let mut slices: Vec<Buffer> = buffers.iter_mut().map(|buffer| Buffer::F32(buffer.as_mut_slice())).collect();
        let _ = compiled.call(&mut slices);
    });
    // Bytes moved: every tensor argument read once, every output written once.
    let tensors =
        signature.arguments.iter().filter(|argument| !argument.shape.is_empty()).count() + signature.outputs.len();
    let bytes = tensors as f64 * size as f64 * 4.0;
    report.push(format!("\"adam_update_gbytes_per_second\": {:.3}", bytes / seconds / 1e9));
    let mut source = vec![1.0f32; 1 << 24];
    let mut destination = vec![0.0f32; 1 << 24];
    let copy_seconds = median_seconds(9, || destination.copy_from_slice(&source));
    source[0] = destination[1];
    report.push(format!("\"copy_gbytes_per_second\": {:.3}", 2.0 * 4.0 * (1u64 << 24) as f64 / copy_seconds / 1e9));
    println!("{{{}}}", report.join(", "));
    ExitCode::SUCCESS
}
