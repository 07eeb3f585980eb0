//! Differential tests: functions lowered through MLIR and JIT-compiled agree with the reference
//! interpreter (f32) on the loss-and-gradient programs of the examples.

use curv_interp::{evaluate, Inputs, Tensor, Value};
use curv_ir::{Dim, Op};
use curv_mlir::jit::{compile, Buffer};
use std::collections::HashMap;
use std::path::Path;

mod common;
use common::values;

fn program(example: &str) -> curv_ir::TrainProgram {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples").join(example);
    let source = curv_driver::SourceFile::read(&path).unwrap();
    let compilation = curv_driver::compile(source);
    assert!(!compilation.has_errors(), "{}", curv_driver::render_diagnostics(&compilation, false));
    compilation.analysis.unwrap().program.trains.into_iter().next().unwrap()
}

fn shape(ty: &curv_ir::TensorType) -> Vec<usize> {
    ty.shape
        .iter()
        .map(|dim| match dim {
            Dim::Known(size) => *size as usize,
            Dim::Symbol(name) => panic!("symbolic {name}"),
        })
        .collect()
}

/// `tolerance` is relative to the largest magnitude of each output: both sides compute in f32
/// but sum in different orders (a blocked GEMM against the interpreter's loops); the SIREN
/// multiplies every pre-activation by omega = 30, which amplifies those rounding differences
/// layer by layer, so it gets a wider bound.
fn check_gradients_agree(example: &str, tolerance: f32) {
    check_transformed_gradients_agree(example, tolerance, &|text| text.to_string());
}

/// As [`check_gradients_agree`], with `transform` applied to the lowered module before it is
/// compiled (a rewrite of the GPU path, checked for meaning on the CPU).
fn check_transformed_gradients_agree(example: &str, tolerance: f32, transform: &dyn Fn(&str) -> String) {
    check_lowered_gradients_agree(example, tolerance, curv_mlir::lower::PartLimits::default(), transform);
}

/// As [`check_transformed_gradients_agree`], the function lowered with a long function cut into
/// parts where `limits` say.
fn check_lowered_gradients_agree(
    example: &str,
    tolerance: f32,
    limits: curv_mlir::lower::PartLimits,
    transform: &dyn Fn(&str) -> String,
) {
    let train = program(example);
    let gradients = curv_ad::products::gradient_program(&train.loss, &train.params).function;
    let (text, signature) =
        curv_mlir::lower::lower_function_in_parts(&gradients, "loss_and_gradients", &HashMap::new(), limits).unwrap();
    let text = transform(&text);
    let compiled =
        compile(&text, "loss_and_gradients", signature.clone(), 2).unwrap_or_else(|error| panic!("{error}\n{text}"));
    // Inputs for both sides: `buffers` holds the arguments then the outputs, in signature order.
    let mut inputs = Inputs::<f32>::default();
    let mut buffers: Vec<Value<f32>> = Vec::new();
    for (index, argument) in signature.arguments.iter().enumerate() {
        let count = argument.shape.iter().product::<i64>() as usize;
        let argument_shape: Vec<usize> = argument.shape.iter().map(|&s| s as usize).collect();
        let value = match &argument.op {
            Op::Param { index: param } => {
                let data = values(count, 10 + index as u64, 0.3);
                while inputs.params.len() <= *param {
                    inputs.params.push(Tensor::scalar(0.0));
                }
                inputs.params[*param] = Tensor::new(shape(&train.params[*param].ty), data.clone());
                Value::Real(Tensor::new(argument_shape, data))
            }
            Op::Data { source, field } => {
                let value = if argument.dtype == curv_ir::DType::I32 {
                    let labels = values(count, 99, 1.0).iter().map(|value| ((value + 1.0) * 4.99) as i32).collect();
                    Value::Int(Tensor::new(argument_shape, labels))
                } else {
                    Value::Real(Tensor::new(argument_shape, values(count, 7, 1.0)))
                };
                inputs.data.insert((source.clone(), field.clone()), value.clone());
                value
            }
            other => panic!("unexpected argument {other:?}"),
        };
        buffers.push(value);
    }
    for (_, output_shape, dtype) in &signature.outputs {
        let output_shape: Vec<usize> = output_shape.iter().map(|&s| s as usize).collect();
        let count = output_shape.iter().product();
        buffers.push(if *dtype == curv_ir::DType::I32 {
            Value::Int(Tensor::new(output_shape, vec![0; count]))
        } else {
            Value::Real(Tensor::new(output_shape, vec![0.0; count]))
        });
    }
    compiled.call(&mut buffers.iter_mut().map(Buffer::of).collect::<Vec<_>>()).unwrap();
    // Generated code never writes its arguments: the runtime passes parameters and data in place.
    for (position, argument) in signature.arguments.iter().enumerate() {
        let expected = match &argument.op {
            Op::Param { index: param } => Value::Real(inputs.params[*param].clone()),
            Op::Data { source, field } => inputs.data[&(source.clone(), field.clone())].clone(),
            other => panic!("unexpected argument {other:?}"),
        };
        assert!(buffers[position] == expected, "{example}: argument {position} ({:?}) was written", argument.op);
    }
    let reference = evaluate(&gradients, &inputs).unwrap();
    let first_output = signature.arguments.len();
    for (position, (name, value)) in gradients.outputs.iter().enumerate() {
        match (&reference[value.0 as usize], &buffers[first_output + position]) {
            (Value::Real(tensor), Value::Real(actual)) => {
                let scale = tensor.data.iter().fold(0.0f32, |maximum, value| maximum.max(value.abs())).max(1e-6);
                for (a, b) in actual.data.iter().zip(&tensor.data) {
                    assert!(
                        (a - b).abs() <= tolerance * scale,
                        "{example} `{name}`: mlir {a} vs interpreter {b} (scale {scale})"
                    );
                }
            }
            (Value::Int(tensor), Value::Int(actual)) => assert_eq!(actual.data, tensor.data, "{example} `{name}`"),
            _ => panic!("{example} `{name}`: the output's type differs"),
        }
    }
}

#[test]
fn the_digits_gradient_program_agrees_with_the_interpreter() {
    check_gradients_agree("digits_mlp.curv", 2e-4);
}

#[test]
fn the_siren_gradient_program_agrees_with_the_interpreter() {
    check_gradients_agree("siren.curv", 5e-3);
}

#[test]
fn the_siren_gradient_program_with_its_long_reductions_split_agrees_with_the_interpreter() {
    // The GPU path splits the bias gradients' sums over the 4096 points in two stages; the split
    // module, compiled for the CPU, must compute the same gradients (the sums' terms are added in
    // another order, within the SIREN's tolerance).
    let split = |text: &str| {
        let split = curv_mlir::gpu::split_long_reductions(&curv_mlir::gpu::parallel_loops_first(text));
        assert_eq!(split.matches("_partial = linalg.generic").count(), 4, "the four bias gradients are split");
        split
    };
    check_transformed_gradients_agree("siren.curv", 5e-3, &split);
}

#[test]
fn the_gradient_programs_cut_into_parts_agree_with_the_interpreter() {
    // A function longer than `SPLIT_LINES` is cut, between kernels, into functions that pass
    // values through a workspace, repeat buffer reads and constants, and write each output where
    // its value is computed. Cut into parts of at most 40 lines, the examples' gradient programs
    // must compute what they compute whole.
    let limits = curv_mlir::lower::PartLimits { split_above: 0, part_lines: 40 };
    for (example, tolerance, least) in
        [("digits_mlp.curv", 2e-4, 5), ("siren.curv", 5e-3, 8), ("digits_cnn.curv", 2e-4, 8)]
    {
        let parts = |text: &str| {
            let count = text.matches("func.func private @loss_and_gradients__part").count();
            assert!(count >= least, "{example}: {count} parts\n{text}");
            assert!(text.contains("memref.view %workspace"), "{example}: no value crosses parts\n{text}");
            text.to_string()
        };
        check_lowered_gradients_agree(example, tolerance, limits, &parts);
    }
}

#[test]
fn the_gradient_programs_with_their_losses_summed_in_parallel_agree_with_the_interpreter() {
    // The GPU path splits every reduction to a scalar (the loss) into parallel partial sums
    // combined in stages, so that it runs as kernels; compiled for the CPU, the split modules
    // must compute the same losses and gradients.
    for (example, tolerance, staged) in
        [("digits_mlp.curv", 2e-4, 1), ("siren.curv", 5e-3, 1), ("digits_cnn.curv", 2e-4, 1)]
    {
        let split = |text: &str| {
            let split = curv_mlir::gpu::split_full_reductions(text);
            assert_eq!(split.matches("_rows = linalg.generic").count(), 1, "{example}: the loss is split");
            assert_eq!(split.matches("_parts = linalg.generic").count(), staged, "{example}: in two stages");
            split
        };
        check_transformed_gradients_agree(example, tolerance, &split);
    }
}

#[test]
fn the_vectorisable_exponential_and_tanh_are_accurate() {
    use curv_ir::{DType, Function, Op, TensorType, UnaryOp};
    let count = 40_001;
    for (op, reference, low, high) in
        [(UnaryOp::Exp, f64::exp as fn(f64) -> f64, -80.0f32, 80.0f32), (UnaryOp::Tanh, f64::tanh, -20.0, 20.0)]
    {
        let mut function = Function::new("f");
        let ty = TensorType::known(DType::F32, &[count]);
        let x = function.push(Op::Input { index: 0, name: "x".into() }, vec![], ty.clone(), Default::default());
        let y = function.push(Op::Unary(op), vec![x], ty, Default::default());
        function.outputs.push(("y".into(), y));
        let (text, signature) = curv_mlir::lower::lower_function(&function, "f", &HashMap::new()).unwrap();
        let compiled = compile(&text, "f", signature, 2).unwrap();
        let mut xs: Vec<f32> = (0..count).map(|index| low + (high - low) * index as f32 / (count - 1) as f32).collect();
        let mut ys = vec![0.0f32; count as usize];
        compiled.call(&mut [Buffer::F32(&mut xs), Buffer::F32(&mut ys)]).unwrap();
        for (x, y) in xs.iter().zip(&ys) {
            let expected = reference(*x as f64);
            let relative = (expected - *y as f64).abs() / expected.abs().max(1e-30);
            assert!(relative < 2e-6, "{op:?}({x}) = {y}, expected {expected} (relative error {relative:e})");
        }
    }
    // Overflow, underflow and NaN behave as in the library.
    let mut function = Function::new("f");
    let ty = TensorType::known(DType::F32, &[3]);
    let x = function.push(Op::Input { index: 0, name: "x".into() }, vec![], ty.clone(), Default::default());
    let y = function.push(Op::Unary(UnaryOp::Exp), vec![x], ty, Default::default());
    function.outputs.push(("y".into(), y));
    let (text, signature) = curv_mlir::lower::lower_function(&function, "f", &HashMap::new()).unwrap();
    let compiled = compile(&text, "f", signature, 2).unwrap();
    let mut xs = vec![100.0f32, -100.0, f32::NAN];
    let mut ys = vec![0.0f32; 3];
    compiled.call(&mut [Buffer::F32(&mut xs), Buffer::F32(&mut ys)]).unwrap();
    assert!(ys[0].is_infinite() && ys[1] == 0.0 && ys[2].is_nan(), "{ys:?}");
}

#[test]
fn the_vectorisable_sine_and_cosine_are_accurate() {
    // sin and cos over [-100, 100] against the f64 library, through the lowering and the JIT.
    use curv_ir::{DType, Function, Op, TensorType, UnaryOp};
    let count = 20_001;
    for (op, reference) in [(UnaryOp::Sin, f64::sin as fn(f64) -> f64), (UnaryOp::Cos, f64::cos)] {
        let mut function = Function::new("f");
        let ty = TensorType::known(DType::F32, &[count]);
        let x = function.push(Op::Input { index: 0, name: "x".into() }, vec![], ty.clone(), Default::default());
        let y = function.push(Op::Unary(op), vec![x], ty, Default::default());
        function.outputs.push(("y".into(), y));
        let (text, signature) = curv_mlir::lower::lower_function(&function, "f", &HashMap::new()).unwrap();
        let compiled = compile(&text, "f", signature, 2).unwrap();
        let mut xs: Vec<f32> = (0..count).map(|index| (index as f32 - 10_000.0) / 100.0).collect();
        let mut ys = vec![0.0f32; count as usize];
        compiled.call(&mut [Buffer::F32(&mut xs), Buffer::F32(&mut ys)]).unwrap();
        let worst = xs.iter().zip(&ys).map(|(x, y)| (reference(*x as f64) - *y as f64).abs()).fold(0.0, f64::max);
        assert!(worst < 1e-6, "{op:?}: worst absolute error {worst:e}");
    }
}

#[test]
fn runs_of_constant_outputs_are_filled_by_one_loop_over_the_table() {
    use curv_ir::{DType, Function, TensorType};
    // An input, then 3 outputs of 2.5, 12 of 0.5 (a loop), the input doubled, 9 of 2.5 (a loop).
    let mut function = Function::new("f");
    let ty = TensorType::known(DType::F32, &[3]);
    let x = function.push(Op::Input { index: 0, name: "x".into() }, vec![], ty.clone(), Default::default());
    let mut expected: Vec<Vec<f32>> = Vec::new();
    let constant = |function: &mut Function, value: f64, count: usize, expected: &mut Vec<Vec<f32>>| {
        for _ in 0..count {
            let id = function.push(Op::Constant { value }, vec![], ty.clone(), Default::default());
            let name = format!("c{}", function.outputs.len());
            function.outputs.push((name, id));
            expected.push(vec![value as f32; 3]);
        }
    };
    constant(&mut function, 2.5, 3, &mut expected);
    constant(&mut function, 0.5, 12, &mut expected);
    let doubled = function.push(Op::Binary(curv_ir::BinaryOp::Add), vec![x, x], ty.clone(), Default::default());
    function.outputs.push(("doubled".into(), doubled));
    expected.push(vec![2.0, 4.0, 6.0]);
    constant(&mut function, 2.5, 9, &mut expected);
    let (text, signature) = curv_mlir::lower::lower_function(&function, "f", &HashMap::new()).unwrap();
    assert_eq!(text.matches("scf.for %fill").count(), 2, "{text}");
    assert_eq!(text.matches("materialize_in_destination").count(), 4, "{text}");
    let compiled = compile(&text, "f", signature, 2).unwrap();
    let mut input = vec![1.0f32, 2.0, 3.0];
    // Output buffers start as NaN: every element must be written.
    let mut outputs: Vec<Vec<f32>> = vec![vec![f32::NAN; 3]; expected.len()];
    let mut buffers = vec![Buffer::F32(&mut input)];
    buffers.extend(outputs.iter_mut().map(|output| Buffer::F32(output)));
    compiled.call(&mut buffers).unwrap();
    assert_eq!(outputs, expected);
}
