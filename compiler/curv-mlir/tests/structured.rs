//! The structured ops (`slice`, `pad`, `argmax`, `gather`, `scatter_add`, the 2-D convolution and
//! its two gradients) lowered through MLIR and JIT-compiled agree with the reference interpreter,
//! over strides, paddings and non-square kernels that leave rows of the input unvisited.

use curv_interp::{evaluate, Inputs, Tensor, Value};
use curv_ir::{DType, Function, Op, TensorType, ValueId};
use curv_mlir::jit::{compile, Buffer};
use std::collections::HashMap;

mod common;
use common::values;

fn input(function: &mut Function, index: usize, dtype: DType, shape: &[i64]) -> ValueId {
    function.push(
        Op::Input { index, name: format!("x{index}") },
        vec![],
        TensorType::known(dtype, shape),
        Default::default(),
    )
}

/// Runs `function` through MLIR and the interpreter on `inputs` and compares every output
/// (floats to a relative 1e-5 of the output's largest magnitude, since summation orders differ;
/// integers exactly).
fn check_agree(what: &str, function: &Function, inputs: Vec<Value<f32>>) {
    let (text, signature) = curv_mlir::lower::lower_function(function, "f", &HashMap::new())
        .unwrap_or_else(|error| panic!("{what}: {error:?}"));
    let compiled = compile(&text, "f", signature.clone(), 2).unwrap_or_else(|error| panic!("{what}: {error}\n{text}"));
    // The arguments then the outputs (poisoned, so an unwritten element shows), in signature order.
    let mut buffers: Vec<Value<f32>> = signature
        .arguments
        .iter()
        .map(|argument| match argument.op {
            Op::Input { index, .. } => inputs[index].clone(),
            ref other => panic!("unexpected argument {other:?}"),
        })
        .collect();
    for (_, shape, dtype) in &signature.outputs {
        let shape: Vec<usize> = shape.iter().map(|&size| size as usize).collect();
        let count = shape.iter().product();
        buffers.push(if *dtype == DType::I32 {
            Value::Int(Tensor::new(shape, vec![7; count]))
        } else {
            Value::Real(Tensor::new(shape, vec![f32::NAN; count]))
        });
    }
    compiled.call(&mut buffers.iter_mut().map(Buffer::of).collect::<Vec<_>>()).unwrap();
    let reference = evaluate(function, &Inputs { inputs, ..Inputs::default() }).unwrap();
    let first_output = signature.arguments.len();
    for (position, (name, value)) in function.outputs.iter().enumerate() {
        match (&reference[value.0 as usize], &buffers[first_output + position]) {
            (Value::Real(tensor), Value::Real(actual)) => {
                assert_eq!(actual.data.len(), tensor.data.len());
                let scale = tensor.data.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
                for (flat, (a, b)) in actual.data.iter().zip(&tensor.data).enumerate() {
                    assert!((a - b).abs() <= 1e-5 * scale, "{what} `{name}`[{flat}]: mlir {a}, interpreter {b}");
                }
            }
            (Value::Int(tensor), Value::Int(actual)) => assert_eq!(actual.data, tensor.data, "{what} `{name}`"),
            _ => panic!("{what} `{name}`: the output's type differs"),
        }
    }
}

fn real(shape: &[i64], seed: u64) -> Value<f32> {
    let shape: Vec<usize> = shape.iter().map(|&size| size as usize).collect();
    Value::Real(Tensor::new(shape.clone(), values(shape.iter().product(), seed, 1.0)))
}

#[test]
fn slices_and_pads_agree() {
    let mut function = Function::new("f");
    let x = input(&mut function, 0, DType::F32, &[5, 7]);
    let sliced = function.push(
        Op::Slice { starts: vec![1, 2] },
        vec![x],
        TensorType::known(DType::F32, &[3, 4]),
        Default::default(),
    );
    let padded = function.push(
        Op::Pad { starts: vec![2, 1] },
        vec![sliced],
        TensorType::known(DType::F32, &[6, 9]),
        Default::default(),
    );
    // Slices from the start of an axis that stop before its end (K-FAC's `[W; b]` split back
    // into its weight and bias rows), and from the start of both axes.
    let top = function.push(
        Op::Slice { starts: vec![0, 2] },
        vec![x],
        TensorType::known(DType::F32, &[4, 5]),
        Default::default(),
    );
    let corner = function.push(
        Op::Slice { starts: vec![0, 0] },
        vec![x],
        TensorType::known(DType::F32, &[2, 3]),
        Default::default(),
    );
    let last_row = function.push(
        Op::Slice { starts: vec![4, 0] },
        vec![x],
        TensorType::known(DType::F32, &[1, 7]),
        Default::default(),
    );
    function.outputs.push(("sliced".into(), sliced));
    function.outputs.push(("padded".into(), padded));
    function.outputs.push(("top".into(), top));
    function.outputs.push(("corner".into(), corner));
    function.outputs.push(("last row".into(), last_row));
    check_agree("slice and pad", &function, vec![real(&[5, 7], 1)]);
}

#[test]
fn argmax_agrees_including_ties() {
    for axis in [0, 1] {
        let mut function = Function::new("f");
        let x = input(&mut function, 0, DType::F32, &[4, 6]);
        let result_shape: &[i64] = if axis == 0 { &[6] } else { &[4] };
        let position = function.push(
            Op::ArgMax { axis },
            vec![x],
            TensorType::known(DType::I32, result_shape),
            Default::default(),
        );
        function.outputs.push(("argmax".into(), position));
        // Rounded values, so that rows and columns have ties; the first maximum wins.
        let data: Vec<f32> = values(24, 5, 1.0).iter().map(|v| (v * 2.0).round()).collect();
        check_agree(&format!("argmax over axis {axis}"), &function, vec![Value::Real(Tensor::new(vec![4, 6], data))]);
    }
}

#[test]
fn gather_and_scatter_add_agree_with_repeated_ids() {
    let mut function = Function::new("f");
    let table = input(&mut function, 0, DType::F32, &[7, 3]);
    let ids = input(&mut function, 1, DType::I32, &[2, 5]);
    let rows = input(&mut function, 2, DType::F32, &[2, 5, 3]);
    let gathered =
        function.push(Op::Gather, vec![table, ids], TensorType::known(DType::F32, &[2, 5, 3]), Default::default());
    let scattered =
        function.push(Op::ScatterAdd, vec![ids, rows], TensorType::known(DType::F32, &[7, 3]), Default::default());
    function.outputs.push(("gathered".into(), gathered));
    function.outputs.push(("scattered".into(), scattered));
    let id_values = vec![0, 6, 3, 3, 1, 6, 6, 2, 0, 3];
    check_agree(
        "gather and scatter_add",
        &function,
        vec![real(&[7, 3], 2), Value::Int(Tensor::new(vec![2, 5], id_values)), real(&[2, 5, 3], 3)],
    );
}

#[test]
fn convolutions_and_their_gradients_agree_over_strides_and_paddings() {
    let (batch, channels, height, width) = (2i64, 3i64, 7i64, 6i64);
    let (outputs, kernel_height, kernel_width) = (4i64, 3i64, 2i64);
    for (stride, padding) in [(1, 0), (1, 1), (2, 0), (2, 1), (3, 2)] {
        let output_height = (height + 2 * padding - kernel_height) / stride + 1;
        let output_width = (width + 2 * padding - kernel_width) / stride + 1;
        let input_shape = [batch, channels, height, width];
        let kernel_shape = [outputs, channels, kernel_height, kernel_width];
        let output_shape = [batch, outputs, output_height, output_width];
        let mut function = Function::new("f");
        let x = input(&mut function, 0, DType::F32, &input_shape);
        let k = input(&mut function, 1, DType::F32, &kernel_shape);
        let dy = input(&mut function, 2, DType::F32, &output_shape);
        let y = function.push(
            Op::Conv2d { stride, padding },
            vec![x, k],
            TensorType::known(DType::F32, &output_shape),
            Default::default(),
        );
        let dx = function.push(
            Op::Conv2dInputGradient { stride, padding },
            vec![dy, k],
            TensorType::known(DType::F32, &input_shape),
            Default::default(),
        );
        let dk = function.push(
            Op::Conv2dKernelGradient { stride, padding },
            vec![x, dy],
            TensorType::known(DType::F32, &kernel_shape),
            Default::default(),
        );
        function.outputs.push(("y".into(), y));
        function.outputs.push(("dx".into(), dx));
        function.outputs.push(("dk".into(), dk));
        check_agree(
            &format!("conv2d stride {stride} padding {padding}"),
            &function,
            vec![real(&input_shape, 11), real(&kernel_shape, 12), real(&output_shape, 13)],
        );
    }
}
