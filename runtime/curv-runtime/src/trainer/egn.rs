//! EGN's step (exact Gauss-Newton): the regularised Gauss-Newton directions of the parameters it
//! governs, their damping and its adaptation, and the line search along them.

use super::*;

impl<T: Real> Trainer<T> {
    /// EGN's Gauss-Newton directions (Korbit, Adeoye, Bemporad and Zanon, 2024, following
    /// cor3bit/somax `EGN.calculate_direction_ce`) for the parameters of `plans`, together: with
    /// the logits of the step's batch (`b x c`), `p = softmax`, the residuals `r = onehot - p`, the
    /// block-diagonal `Q = diag(p_i) - p_i p_i^T` and `J` the Jacobian of the logits with respect
    /// to those parameters, the direction is `J^T (b damping I + Q J J^T)^-1 r` (the
    /// Duncan-Guttman form of `(J^T Q J + b damping I)^-1 J^T r`, a `bc x bc` system). `J J^T` is
    /// built column by column: row `l` of `J` is a vector-Jacobian product with the unit
    /// cotangent `e_l`, and `J` times it a Jacobian-vector product; `J^T t` is one more
    /// vector-Jacobian product. That is `2 b c + 1` model passes per step.
    pub(super) fn egn_directions(
        &self,
        step: u64,
        inputs: &mut Inputs<T>,
        values: &[(String, Value<T>)],
        plans: &[&curv_ir::ParamPlan],
    ) -> Result<Vec<Tensor<T>>, TrainError> {
        let failure = |message: String| TrainError::statistics(format!("EGN: {message}")).at_step(step);
        if self.program.loss_kind != curv_ir::LossKind::CrossEntropy {
            return Err(failure("only a `cross_entropy(...)` loss is supported yet".to_string()));
        }
        let (backward, forward) = self.egn.as_ref().ok_or_else(|| {
            failure("the model's Jacobian programs could not be built (no logits output)".to_string())
        })?;
        let (Some(Value::Real(logits)), Some(Value::Int(labels))) =
            (find_output(values, "logits"), find_output(values, "labels"))
        else {
            return Err(failure("the step's logits and labels are missing".to_string()));
        };
        let classes = logits.shape.last().copied().unwrap_or(1);
        let batch = logits.len() / classes.max(1);
        let size = batch * classes;
        let probabilities = softmax_rows(logits, classes);
        let residuals: Vec<f64> = (0..size)
            .map(|index| {
                let (row, class) = (index / classes, index % classes);
                (if labels.data[row] as usize == class { 1.0 } else { 0.0 }) - probabilities[index]
            })
            .collect();
        let damping = self.egn_damping(plans);
        let members: Vec<usize> = plans.iter().map(|plan| plan.param).collect();
        let saved = std::mem::take(&mut inputs.inputs);
        let shape = logits.shape.clone();
        let zeros_like =
            |param: &Tensor<T>| Value::Real(Tensor::new(param.shape.clone(), vec![T::from_f64(0.0); param.len()]));
        let run_vjp = |inputs: &mut Inputs<T>, cotangent: Vec<f64>| -> Result<Vec<Value<T>>, String> {
            inputs.inputs =
                vec![Value::Real(Tensor::new(shape.clone(), cotangent.into_iter().map(T::from_f64).collect()))];
            let outputs = self.backend.outputs("egn_model_vjp", backward, inputs).map_err(|error| error.to_string())?;
            let mut tangents: Vec<Value<T>> = inputs.params.iter().map(zeros_like).collect();
            for &index in &members {
                let name = format!("grad.{}", self.param_name(index));
                let value = find_output(&outputs, &name).ok_or_else(|| format!("the output `{name}` is missing"))?;
                tangents[index] = value.clone();
            }
            Ok(tangents)
        };
        let mut gram = vec![0.0; size * size];
        let mut outcome: Result<(), String> = Ok(());
        for column in 0..size {
            let mut unit = vec![0.0; size];
            unit[column] = 1.0;
            let tangents = match run_vjp(inputs, unit) {
                Ok(tangents) => tangents,
                Err(error) => {
                    outcome = Err(error);
                    break;
                }
            };
            inputs.inputs = tangents;
            match self.backend.outputs("egn_model_jvp", forward, inputs) {
                Ok(outputs) => match find_output(&outputs, "tangent").and_then(Value::as_real) {
                    Some(tangent) => {
                        for (row, value) in tangent.data.iter().enumerate() {
                            gram[row * size + column] = value.to_f64();
                        }
                    }
                    None => {
                        outcome = Err("the output `tangent` is missing".to_string());
                        break;
                    }
                },
                Err(error) => {
                    outcome = Err(error.to_string());
                    break;
                }
            }
        }
        let result = outcome.and_then(|()| {
            // A = b damping I + Q (J J^T), Q block-diagonal with blocks diag(p) - p p^T.
            let mut system = vec![0.0; size * size];
            for row in 0..size {
                let (example, class) = (row / classes, row % classes);
                for column in 0..size {
                    let mut value = 0.0;
                    for other in 0..classes {
                        let q = if other == class { probabilities[row] } else { 0.0 }
                            - probabilities[row] * probabilities[example * classes + other];
                        value += q * gram[(example * classes + other) * size + column];
                    }
                    system[row * size + column] = value;
                }
                system[row * size + row] += batch as f64 * damping;
            }
            let matrix = crate::linalg::Matrix::new(size, size, system).map_err(|error| error.to_string())?;
            let coefficients = crate::linalg::solve(&matrix, &residuals)
                .map_err(|error| format!("the {size}x{size} system: {error}"))?;
            run_vjp(inputs, coefficients)
        });
        inputs.inputs = saved;
        let directions = result.map_err(failure)?;
        Ok(members
            .iter()
            .map(|&index| match &directions[index] {
                Value::Real(tensor) => tensor.clone(),
                Value::Int(_) => Tensor::new(vec![0], Vec::new()),
            })
            .collect())
    }

    /// EGN's current regularisation: the state `damping` of the first EGN parameter when the
    /// regularisation adapts (`adaptive_damping`), the option `damping` otherwise.
    pub(super) fn egn_damping(&self, plans: &[&curv_ir::ParamPlan]) -> f64 {
        let option = curv_ir::option_number(&plans[0].options, "damping").unwrap_or(1.0);
        crate::optimizer::state_get(&self.states[plans[0].param], "damping")
            .map_or(option, |tensor| tensor.data[0].to_f64())
    }

    /// EGN's directions with its bias-corrected momentum, as each parameter's update computes them
    /// (`newton::egn_direction`).
    pub(super) fn egn_moved_directions(
        &self,
        step: u64,
        plans: &[&curv_ir::ParamPlan],
        directions: &[Tensor<T>],
    ) -> Vec<Vec<f64>> {
        let mut moved: Vec<Vec<f64>> = Vec::with_capacity(plans.len());
        for (plan, direction) in plans.iter().zip(directions) {
            let momentum = curv_ir::option_number(&plan.options, "momentum").unwrap_or(0.0);
            let mut d: Vec<f64> = direction.data.iter().map(|value| value.to_f64()).collect();
            if momentum > 0.0 {
                let velocity = crate::optimizer::state_get(&self.states[plan.param], "velocity");
                let correction = 1.0 - momentum.powi(step as i32);
                for (index, x) in d.iter_mut().enumerate() {
                    let previous = velocity.map_or(0.0, |tensor| tensor.data[index].to_f64());
                    *x = (momentum * previous + (1.0 - momentum) * *x) / correction;
                }
            }
            moved.push(d);
        }
        moved
    }

    /// EGN's adaptive regularisation for the next step (the Levenberg-Marquardt rule of the EGN
    /// paper, as the disabled code of cor3bit/somax `EGN.update` writes it): with the step
    /// `dw = a d`, the ratio `rho = (f(theta + dw) - f(theta)) / (<grad, dw> + (J dw)^T Q (J dw) / (2 b))`
    /// of the actual to the predicted decrease; `lambda <- 1.01 lambda` when `rho < 0.25`,
    /// `0.99 lambda` when `rho > 0.75`. `J dw` is one Jacobian-vector product of the model.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn egn_next_damping(
        &self,
        step: u64,
        inputs: &mut Inputs<T>,
        values: &[(String, Value<T>)],
        loss: f64,
        gradients: &[Tensor<T>],
        plans: &[&curv_ir::ParamPlan],
        moved: &[Vec<f64>],
        stepsize: f64,
    ) -> Result<f64, TrainError> {
        let failure = |message: String| TrainError::statistics(format!("EGN regularisation: {message}")).at_step(step);
        let damping = self.egn_damping(plans);
        let (_, forward) = self.egn.as_ref().ok_or_else(|| failure("the model programs are missing".to_string()))?;
        let Some(Value::Real(logits)) = find_output(values, "logits") else {
            return Err(failure("the step's logits are missing".to_string()));
        };
        let classes = logits.shape.last().copied().unwrap_or(1).max(1);
        let batch = logits.len() / classes;
        let saved = std::mem::take(&mut inputs.inputs);
        let mut tangents: Vec<Value<T>> = inputs
            .params
            .iter()
            .map(|param| Value::Real(Tensor::new(param.shape.clone(), vec![T::from_f64(0.0); param.len()])))
            .collect();
        for (plan, d) in plans.iter().zip(moved) {
            let shape = inputs.params[plan.param].shape.clone();
            tangents[plan.param] =
                Value::Real(Tensor::new(shape, d.iter().map(|x| T::from_f64(stepsize * x)).collect()));
        }
        inputs.inputs = tangents;
        let product = self.backend.outputs("egn_model_jvp", forward, inputs).map_err(|error| error.to_string());
        inputs.inputs = saved;
        let product = product.map_err(failure)?;
        let mvp: Vec<f64> = find_output(&product, "tangent")
            .and_then(Value::as_real)
            .ok_or_else(|| failure("the output `tangent` is missing".to_string()))?
            .data
            .iter()
            .map(|value| value.to_f64())
            .collect();
        let probabilities = softmax_rows(logits, classes);
        let mut curvature = 0.0;
        for (row, p) in probabilities.chunks(classes).enumerate() {
            let m = &mvp[row * classes..(row + 1) * classes];
            let mean: f64 = p.iter().zip(m).map(|(p, m)| p * m).sum();
            curvature += p.iter().zip(m).map(|(p, m)| p * m * m).sum::<f64>() - mean * mean;
        }
        let slope: f64 = plans
            .iter()
            .zip(moved)
            .map(|(plan, d)| {
                gradients[plan.param].data.iter().zip(d).map(|(g, x)| g.to_f64() * stepsize * x).sum::<f64>()
            })
            .sum();
        let predicted = slope + 0.5 * curvature / batch as f64;
        let originals: Vec<Tensor<T>> = plans.iter().map(|plan| inputs.params[plan.param].clone()).collect();
        for (plan, d) in plans.iter().zip(moved) {
            let param = &mut inputs.params[plan.param];
            for (value, x) in param.data.iter_mut().zip(d) {
                *value = T::from_f64(value.to_f64() + stepsize * x);
            }
        }
        let next = self.backend.outputs("egn_loss", &self.program.loss, inputs).map_err(|error| error.to_string());
        for (plan, original) in plans.iter().zip(originals) {
            inputs.params[plan.param] = original;
        }
        let next = find_output(&next.map_err(failure)?, "loss")
            .and_then(Value::as_real)
            .map(|tensor| tensor.data[0].to_f64())
            .ok_or_else(|| failure("the loss is missing".to_string()))?;
        let rho = (next - loss) / predicted;
        Ok(if rho < 0.25 {
            1.01 * damping
        } else if rho > 0.75 {
            0.99 * damping
        } else {
            damping
        })
    }

    /// EGN's step size by Armijo's backtracking line search, as cor3bit/somax `armijo_line_search`
    /// with `reset_option = "increase"` and its defaults (aggressiveness 0.9, decrease 0.8,
    /// increase 1.5, at most 15 trials): the previous step times 1.5, at most the learning rate;
    /// while `f(theta + a d) > f(theta) + 0.1 a <grad, d> + eps` (the Armijo condition; `d` is the
    /// direction with momentum, `eps` the machine epsilon), `a <- 0.8 a`. The previous step is
    /// the state `stepsize` of the first EGN parameter; the losses are evaluated on the step's
    /// batch.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn egn_line_search(
        &self,
        step: u64,
        inputs: &mut Inputs<T>,
        loss: f64,
        gradients: &[Tensor<T>],
        plans: &[&curv_ir::ParamPlan],
        moved: &[Vec<f64>],
        rate: f64,
    ) -> Result<f64, TrainError> {
        let failure = |message: String| TrainError::statistics(format!("EGN line search: {message}")).at_step(step);
        let slope: f64 = plans
            .iter()
            .zip(moved)
            .map(|(plan, d)| gradients[plan.param].data.iter().zip(d).map(|(g, x)| g.to_f64() * x).sum::<f64>())
            .sum();
        let previous = crate::optimizer::state_get(&self.states[plans[0].param], "stepsize")
            .map_or(rate, |tensor| tensor.data[0].to_f64());
        let mut stepsize = (previous * 1.5).min(rate);
        let epsilon = if std::mem::size_of::<T>() == 4 { f32::EPSILON as f64 } else { f64::EPSILON };
        let originals: Vec<Tensor<T>> = plans.iter().map(|plan| inputs.params[plan.param].clone()).collect();
        let loss_at = |inputs: &mut Inputs<T>, stepsize: f64| -> Result<f64, String> {
            for ((plan, original), d) in plans.iter().zip(&originals).zip(moved) {
                let param = &mut inputs.params[plan.param];
                for ((value, start), x) in param.data.iter_mut().zip(&original.data).zip(d) {
                    *value = T::from_f64(start.to_f64() + stepsize * x);
                }
            }
            let outputs =
                self.backend.outputs("egn_loss", &self.program.loss, inputs).map_err(|error| error.to_string())?;
            find_output(&outputs, "loss")
                .and_then(Value::as_real)
                .map(|tensor| tensor.data[0].to_f64())
                .ok_or_else(|| "the loss is missing".to_string())
        };
        let mut result = loss_at(inputs, stepsize);
        let mut trials = 0;
        let mut violated = true;
        while violated && trials < 15 {
            let next = match &result {
                Ok(value) => *value,
                Err(_) => break,
            };
            violated = !(next.is_finite() && -stepsize * 0.1 * slope <= loss - next + epsilon);
            if violated {
                stepsize = (stepsize * 0.8).min(rate);
                result = loss_at(inputs, stepsize);
            }
            trials += 1;
        }
        for (plan, original) in plans.iter().zip(originals) {
            inputs.params[plan.param] = original;
        }
        result.map_err(failure)?;
        Ok(stepsize)
    }
}
