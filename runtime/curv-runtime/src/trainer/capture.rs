//! K-FAC's layer captures: the program that records, for each captured parameter, the input of its
//! layer and the cotangent of its output (`x @ W` with any leading axes, or a convolution's patches),
//! and the matrices the factors are built from.

use super::*;

/// The gradient program with one `kfac.input.PARAM.K` and one `kfac.cotangent.PARAM.K` output
/// per product `x @ W` of a parameter whose plan uses K-FAC statistics.
#[derive(Debug, Clone)]
pub struct CaptureProgram {
    pub function: Function,
    /// One entry per captured product or convolution.
    pub layers: Vec<CapturedLayer>,
    /// `(bias, weight)`: a bias updated together with its weight's K-FAC factors.
    pub folded_biases: Vec<(usize, usize)>,
}

/// The bias `b` of a product `x @ W` when the product's only use is `x @ W + b` with a vector
/// parameter `b` broadcast along the last dimension, and `b` is used nowhere else: K-FAC then
/// treats `[W; b]` as one matrix whose input has a ones column (kfac-pytorch's bias handling).
pub(super) fn layer_bias(function: &Function, layer: curv_ir::ValueId) -> Option<usize> {
    let uses = |value: curv_ir::ValueId| -> Vec<usize> {
        let mut users: Vec<usize> = function
            .insts
            .iter()
            .enumerate()
            .filter(|(_, inst)| inst.args.contains(&value))
            .map(|(index, _)| index)
            .collect();
        if function.outputs.iter().any(|(_, output)| *output == value) {
            users.push(usize::MAX);
        }
        users
    };
    let users = uses(layer);
    let [add] = users.as_slice() else { return None };
    let add_inst = function.insts.get(*add)?;
    if add_inst.op != Op::Binary(curv_ir::BinaryOp::Add) {
        return None;
    }
    let other = *add_inst.args.iter().find(|arg| **arg != layer)?;
    let broadcast = function.inst(other);
    let rank = function.inst(layer).ty.shape.len();
    let Op::Broadcast { dims } = &broadcast.op else { return None };
    if dims.as_slice() != [rank - 1] || uses(other).len() != 1 {
        return None;
    }
    let bias = broadcast.args[0];
    let Op::Param { index } = function.inst(bias).op else { return None };
    (uses(bias).len() == 1).then_some(index)
}

/// One captured layer of a K-FAC parameter: the names of the outputs that hold its input and its
/// output cotangent, and for a convolution its stride and padding.
#[derive(Debug, Clone)]
pub struct CapturedLayer {
    pub param: usize,
    pub input: String,
    pub cotangent: String,
    pub convolution: Option<(usize, usize)>,
}

/// The capture program of `program`, when any of its plans uses K-FAC statistics; an error names
/// a K-FAC parameter that is not used as `x @ W`.
///
/// The errors are E0500 with the parameter; `curv check` reports the same programs as E0313.
pub fn capture_program(program: &TrainProgram) -> Result<Option<CaptureProgram>, Error> {
    let kfac_params: Vec<usize> = program
        .optimizer
        .plans
        .iter()
        .filter(|plan| crate::optimizer::kfac_statistic(plan).is_some())
        .map(|plan| plan.param)
        .collect();
    if kfac_params.is_empty() {
        return Ok(None);
    }
    let gradients = gradient_program(&program.loss, &program.params);
    let mut function = gradients.function;
    function.name = keys::GRADIENTS_AND_CAPTURES.to_string();
    let mut layers = Vec::new();
    let mut folded_biases = Vec::new();
    for &param in &kfac_params {
        let name = &program.params[param].name;
        let captures: Vec<_> = gradients.layer_captures.iter().filter(|capture| capture.param == param).collect();
        let refused = |message: String| {
            Error::new(ErrorCode::PlanNotExecutable, message).parameter(name.as_str()).structure("kronecker")
        };
        if captures.is_empty() {
            return Err(refused(format!(
                "K-FAC statistics need `{name}` to be used as `x @ {name}` or `conv2d(x, {name})` in the loss (E0313)"
            )));
        }
        let convolutions = captures.iter().filter(|capture| capture.kind != curv_ad::LayerKind::Dense).count();
        if convolutions != 0 && convolutions != captures.len() {
            return Err(refused(format!(
                "K-FAC statistics need every use of `{name}` to be of one kind (products or convolutions) (E0313)"
            )));
        }
        let Some(plan) = program.optimizer.plans.iter().find(|plan| plan.param == param) else {
            return Err(refused(format!("`{name}` has no optimizer plan")));
        };
        let fold = plan.options.iter().all(|(key, value)| key != "bias" || *value == curv_ir::OptionValue::Bool(true));
        let biases: Vec<Option<usize>> =
            captures.iter().map(|capture| layer_bias(&program.loss, capture.layer)).collect();
        // Convolutions keep their bias on its own rule line (the bias would be a column there).
        if let (true, 2, [Some(bias)], 0) =
            (fold, program.params[param].ty.shape.len(), biases.as_slice(), convolutions)
        {
            folded_biases.push((*bias, param));
        }
        for (number, capture) in captures.into_iter().enumerate() {
            let (input, cotangent) = (format!("kfac.input.{name}.{number}"), format!("kfac.cotangent.{name}.{number}"));
            function.outputs.push((input.clone(), capture.input));
            function.outputs.push((cotangent.clone(), capture.output_cotangent));
            let convolution = match capture.kind {
                curv_ad::LayerKind::Conv2d { stride, padding } => {
                    Some((stride.max(1) as usize, padding.max(0) as usize))
                }
                curv_ad::LayerKind::Dense => None,
            };
            layers.push(CapturedLayer { param, input, cotangent, convolution });
        }
    }
    Ok(Some(CaptureProgram { function, layers, folded_biases }))
}

/// A tensor viewed as `[N, last dim]` in double precision, times `scale`, with a column of ones
/// appended when `ones` is set.
pub(super) fn rows_matrix<T: Real>(tensor: &Tensor<T>, scale: f64, ones: bool) -> crate::linalg::Matrix {
    let width = (*tensor.shape.last().unwrap_or(&1)).max(1);
    let rows = tensor.len() / width;
    let data: Vec<f64> = tensor
        .data
        .chunks(width)
        .flat_map(|row| row.iter().map(move |value| value.to_f64() * scale).chain(ones.then_some(1.0)))
        .collect();
    crate::linalg::Matrix { rows, columns: width + usize::from(ones), data }
}

/// The patches of a convolution's input `x: [N, C, H, W]` for a kernel `[O, C, kH, kW]`, as
/// kfac-pytorch's `Conv2dModuleHelper` extracts them: one row per example and output position
/// `(n, h', w')`, one column per kernel entry `(c, i, j)` (the kernel's own order), zero where the
/// padding is, all divided by the number of output positions `S = H' W'`.
pub(super) fn convolution_patches<T: Real>(
    input: &Tensor<T>,
    kernel: &[i64],
    stride: usize,
    padding: usize,
) -> Result<crate::linalg::Matrix, String> {
    let &[examples, channels, height, width] = &input.shape[..] else {
        return Err(format!("K-FAC expects a conv2d input of rank 4, got shape {:?}", input.shape));
    };
    let &[_, kernel_channels, kernel_height, kernel_width] = kernel else {
        return Err(format!("K-FAC expects a conv2d kernel of rank 4, got shape {kernel:?}"));
    };
    let (kernel_height, kernel_width) = (kernel_height.max(1) as usize, kernel_width.max(1) as usize);
    if kernel_channels as usize != channels
        || height + 2 * padding < kernel_height
        || width + 2 * padding < kernel_width
    {
        return Err(format!("a conv2d input of shape {:?} does not fit the kernel {kernel:?}", input.shape));
    }
    let output_height = (height + 2 * padding - kernel_height) / stride + 1;
    let output_width = (width + 2 * padding - kernel_width) / stride + 1;
    let positions = output_height * output_width;
    let columns = channels * kernel_height * kernel_width;
    let scale = 1.0 / positions as f64;
    let mut data = vec![0.0; examples * positions * columns];
    for example in 0..examples {
        for row in 0..output_height {
            for column in 0..output_width {
                let target = ((example * output_height + row) * output_width + column) * columns;
                for channel in 0..channels {
                    for i in 0..kernel_height {
                        let y = (row * stride + i) as isize - padding as isize;
                        if y < 0 || y as usize >= height {
                            continue;
                        }
                        for j in 0..kernel_width {
                            let x = (column * stride + j) as isize - padding as isize;
                            if x < 0 || x as usize >= width {
                                continue;
                            }
                            let source = ((example * channels + channel) * height + y as usize) * width + x as usize;
                            data[target + (channel * kernel_height + i) * kernel_width + j] =
                                input.data[source].to_f64() * scale;
                        }
                    }
                }
            }
        }
    }
    Ok(crate::linalg::Matrix { rows: examples * positions, columns, data })
}

/// A convolution's output cotangent `[N, O, H', W']` as rows `(n, h', w')` of `O` values, times
/// `N / S`: the per-example cotangents (the loss is a mean over the `N` examples) divided by the
/// number of output positions `S = H' W'`, as kfac-pytorch's `Conv2dModuleHelper` divides them.
pub(super) fn convolution_cotangents<T: Real>(cotangent: &Tensor<T>) -> crate::linalg::Matrix {
    let &[examples, channels, height, width] = &cotangent.shape[..] else {
        return rows_matrix(cotangent, 1.0, false);
    };
    let positions = height * width;
    let scale = examples as f64 / positions.max(1) as f64;
    let mut data = vec![0.0; examples * positions * channels];
    for example in 0..examples {
        for channel in 0..channels {
            for position in 0..positions {
                data[(example * positions + position) * channels + channel] =
                    cotangent.data[(example * channels + channel) * positions + position].to_f64() * scale;
            }
        }
    }
    crate::linalg::Matrix { rows: examples * positions, columns: channels, data }
}

/// `[W; b]`: a matrix with its bias vector appended as one more row.
pub(super) fn stack_bias<T: Real>(weight: &Tensor<T>, bias: &Tensor<T>) -> Tensor<T> {
    let mut shape = weight.shape.clone();
    shape[0] += 1;
    Tensor::new(shape, weight.data.iter().chain(&bias.data).copied().collect())
}
