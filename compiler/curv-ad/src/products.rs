//! The derivative programs the runtime needs, built from a train block's loss function:
//! gradients (with K-FAC captures), Hessian-vector products and Gauss-Newton-vector products.

use crate::{jvp, vjp, LayerCapture, Seed};
use curv_ir::{Function, Op, ParamInfo, TensorType, ValueId};

/// The `Op::Param` instruction of every parameter (`None` when the loss does not read it).
pub fn param_values(function: &Function, param_count: usize) -> Vec<Option<ValueId>> {
    let mut values = vec![None; param_count];
    for (index, inst) in function.insts.iter().enumerate() {
        if let Op::Param { index: param } = inst.op {
            if param < param_count && values[param].is_none() {
                values[param] = Some(ValueId(index as u32));
            }
        }
    }
    values
}

/// A zero of the parameter's type, for parameters the loss does not depend on.
fn zeros(function: &mut Function, ty: &TensorType) -> ValueId {
    function.push(Op::Constant { value: 0.0 }, Vec::new(), ty.clone(), Default::default())
}

/// The loss function extended with the gradient of `loss` for every parameter.
#[derive(Debug, Clone, PartialEq)]
pub struct GradientProgram {
    /// Outputs: the loss function's outputs, then `grad.NAME` for every parameter in order.
    pub function: Function,
    pub layer_captures: Vec<LayerCapture>,
}

pub fn gradient_program(loss_function: &Function, params: &[ParamInfo]) -> GradientProgram {
    let loss = loss_function.output("loss").expect("a train program's loss function has a `loss` output");
    let param_ids = param_values(loss_function, params.len());
    let wrt: Vec<ValueId> = param_ids.iter().flatten().copied().collect();
    let result = vjp(loss_function, loss, &wrt, Seed::One);
    let mut function = result.function;
    function.name = "loss_and_gradients".to_string();
    let mut position = 0;
    for (param, id) in params.iter().zip(&param_ids) {
        let gradient = match id {
            Some(_) => {
                let cotangent = result.cotangents[position];
                position += 1;
                cotangent
            }
            None => None,
        };
        let gradient = gradient.unwrap_or_else(|| zeros(&mut function, &param.ty));
        function.outputs.push((format!("grad.{}", param.name), gradient));
    }
    GradientProgram { function, layer_captures: result.layer_captures }
}

/// Adds one `tangent.NAME` input per parameter, after the function's existing inputs.
fn add_tangent_inputs(function: &mut Function, params: &[ParamInfo]) -> Vec<ValueId> {
    let first_index = function.insts.iter().filter(|inst| matches!(inst.op, Op::Input { .. })).count();
    params
        .iter()
        .enumerate()
        .map(|(offset, param)| {
            let op = Op::Input { index: first_index + offset, name: format!("tangent.{}", param.name) };
            function.push(op, Vec::new(), param.ty.clone(), param.span)
        })
        .collect()
}

/// Hessian-vector products by forward-over-reverse differentiation: the JVP of the gradient
/// along one tangent per parameter (inputs `tangent.NAME`). Outputs: those of
/// [`gradient_program`], then `hvp.NAME` for every parameter.
pub fn hvp_program(loss_function: &Function, params: &[ParamInfo]) -> Function {
    let gradients = gradient_program(loss_function, params).function;
    let mut function = gradients.clone();
    let tangent_inputs = add_tangent_inputs(&mut function, params);
    let param_ids = param_values(loss_function, params.len());
    let seeds: Vec<(ValueId, ValueId)> =
        param_ids.iter().zip(&tangent_inputs).filter_map(|(id, tangent)| id.map(|id| (id, *tangent))).collect();
    let result = jvp(&function, &seeds);
    let mut function = result.function;
    function.name = "hessian_vector_product".to_string();
    function.outputs = gradients.outputs.clone();
    for param in params {
        let gradient =
            gradients.output(&format!("grad.{}", param.name)).expect("every parameter has a gradient output");
        let product = result.tangents.get(&gradient).copied().unwrap_or_else(|| zeros(&mut function, &param.ty));
        function.outputs.push((format!("hvp.{}", param.name), product));
    }
    function
}

/// Gauss-Newton-vector products `J^T H_L J v`, where `J` is the Jacobian of the model output
/// named `prediction_output` (such as `logits`) and `H_L` the Hessian of the loss with respect to
/// it. Inputs `tangent.NAME`; outputs `loss` and `ggn.NAME`. `None` when there is no such output.
pub fn ggn_program(loss_function: &Function, params: &[ParamInfo], prediction_output: &str) -> Option<Function> {
    let loss = loss_function.output("loss")?;
    let prediction = loss_function.output(prediction_output)?;
    // The loss head's gradient with respect to the prediction.
    let head = vjp(loss_function, loss, &[prediction], Seed::One);
    let head_gradient = head.cotangents[0]?;
    let mut function = head.function;
    let tangent_inputs = add_tangent_inputs(&mut function, params);
    let param_ids = param_values(loss_function, params.len());
    let seeds: Vec<(ValueId, ValueId)> =
        param_ids.iter().zip(&tangent_inputs).filter_map(|(id, tangent)| id.map(|id| (id, *tangent))).collect();
    // Forward mode gives J v at the prediction and H_L J v at the head gradient.
    let forward = jvp(&function, &seeds);
    let loss_hessian_times_jv = *forward.tangents.get(&head_gradient)?;
    let wrt: Vec<ValueId> = param_ids.iter().flatten().copied().collect();
    let backward = vjp(&forward.function, prediction, &wrt, Seed::Value(loss_hessian_times_jv));
    let mut function = backward.function;
    function.name = "gauss_newton_vector_product".to_string();
    function.outputs = vec![("loss".to_string(), loss)];
    let mut position = 0;
    for (param, id) in params.iter().zip(&param_ids) {
        let product = match id {
            Some(_) => {
                let cotangent = backward.cotangents[position];
                position += 1;
                cotangent
            }
            None => None,
        };
        let product = product.unwrap_or_else(|| zeros(&mut function, &param.ty));
        function.outputs.push((format!("ggn.{}", param.name), product));
    }
    Some(function)
}

/// The model of a loss function on its own: its prediction output (`logits` for a classification
/// loss, `prediction` for a regression one) as the output `output`, and only what it depends on
/// (the labels drop out). None when the loss has no prediction output.
pub fn model_program(loss_function: &Function) -> Option<Function> {
    let prediction = loss_function.output("logits").or_else(|| loss_function.output("prediction"))?;
    let mut function = loss_function.clone();
    function.name = "model".to_string();
    function.outputs = vec![("output".to_string(), prediction)];
    Some(function.pruned())
}

/// The vector-Jacobian product of a [`model_program`]: one input `cotangent` (the output's shape)
/// and the gradients of `<cotangent, output>` with respect to every parameter (`grad.NAME`) and
/// every float data field the model reads (`grad.SOURCE.FIELD`), zeros where nothing depends.
pub fn model_vjp_program(model: &Function, params: &[ParamInfo]) -> Option<Function> {
    let output = model.output("output")?;
    let mut function = model.clone();
    let cotangent = function.push(
        Op::Input { index: 0, name: "cotangent".to_string() },
        Vec::new(),
        model.ty(output).clone(),
        model.inst(output).span,
    );
    let param_ids = param_values(&function, params.len());
    let data: Vec<(ValueId, String)> = function
        .insts
        .iter()
        .enumerate()
        .filter_map(|(index, inst)| match &inst.op {
            Op::Data { source, field } if inst.ty.dtype != curv_ir::DType::I32 => {
                Some((ValueId(index as u32), format!("{source}.{field}")))
            }
            _ => None,
        })
        .collect();
    let wrt: Vec<ValueId> = param_ids.iter().flatten().copied().chain(data.iter().map(|(id, _)| *id)).collect();
    let backward = vjp(&function, output, &wrt, Seed::Value(cotangent));
    let mut result = backward.function;
    result.name = "model_vjp".to_string();
    result.outputs = Vec::new();
    let mut position = 0;
    for (param, id) in params.iter().zip(&param_ids) {
        let gradient = match id {
            Some(_) => {
                let gradient = backward.cotangents[position];
                position += 1;
                gradient
            }
            None => None,
        };
        let gradient = gradient.unwrap_or_else(|| zeros(&mut result, &param.ty));
        result.outputs.push((format!("grad.{}", param.name), gradient));
    }
    for (id, name) in &data {
        let ty = model.ty(*id).clone();
        let gradient = backward.cotangents[position].unwrap_or_else(|| zeros(&mut result, &ty));
        position += 1;
        result.outputs.push((format!("grad.{name}"), gradient));
    }
    // The forward output itself is not needed (the cotangent stands in for what follows it).
    Some(result.pruned())
}

/// The Jacobian-vector product of a [`model_program`]: one input `tangent.NAME` per parameter (in
/// order, the parameter's shape) and the output `tangent`, the derivative of the model's output
/// along those tangents (zeros when nothing depends on them).
pub fn model_jvp_program(model: &Function, params: &[ParamInfo]) -> Option<Function> {
    let output = model.output("output")?;
    let mut function = model.clone();
    let tangent_inputs = add_tangent_inputs(&mut function, params);
    let param_ids = param_values(model, params.len());
    let seeds: Vec<(ValueId, ValueId)> =
        param_ids.iter().zip(&tangent_inputs).filter_map(|(id, tangent)| id.map(|id| (id, *tangent))).collect();
    let forward = jvp(&function, &seeds);
    let mut result = forward.function;
    result.name = "model_jvp".to_string();
    let ty = model.ty(output).clone();
    let tangent = forward.tangents.get(&output).copied().unwrap_or_else(|| zeros(&mut result, &ty));
    result.outputs = vec![("tangent".to_string(), tangent)];
    Some(result.pruned())
}
