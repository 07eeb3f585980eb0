//! The programs behind curvature statistics: the block Hessian of a parameter, and the outputs of the
//! model with targets sampled from its own predictions (the true Fisher) or summed over every class
//! (the exact Fisher).

use super::*;

impl<T: Real> Trainer<T> {
    /// Curvature of one parameter's Hessian block from Hessian-vector products at the step's
    /// parameters and batch (the probe is zero on every other parameter, and only the parameter's
    /// own part of each product is kept): `lanczos`, FOSI's top eigenpairs (Lanczos of order
    /// `4 rank` from a normal start vector drawn from the `Preconditioner` stream with the key
    /// `step * 65536 + param`), or `hessian`, the whole `n x n` block from the `n` unit vectors.
    pub(super) fn block_hessian(
        &self,
        step: u64,
        inputs: &mut Inputs<T>,
        plan: &curv_ir::ParamPlan,
        kind: &str,
    ) -> Result<Tensor<T>, TrainError> {
        let function = self
            .hessian_vector
            .as_ref()
            .ok_or_else(|| TrainError::statistics("the Hessian-vector program is missing".to_string()))?;
        let index = plan.param;
        let name = format!("hvp.{}", self.param_name(index));
        let saved = std::mem::take(&mut inputs.inputs);
        let zeros: Vec<Value<T>> = inputs
            .params
            .iter()
            .map(|param| Value::Real(Tensor::new(param.shape.clone(), vec![T::from_f64(0.0); param.len()])))
            .collect();
        let shape = inputs.params[index].shape.clone();
        let n = inputs.params[index].len();
        let backend = &self.backend;
        let mut hvp = |vector: &[f64]| -> Result<Vec<f64>, String> {
            let mut probes = zeros.clone();
            probes[index] =
                Value::Real(Tensor::new(shape.clone(), vector.iter().map(|value| T::from_f64(*value)).collect()));
            inputs.inputs = probes;
            let values = backend.outputs(keys::HESSIAN_VECTOR, function, inputs).map_err(|error| error.to_string())?;
            let product = find_output(&values, &name)
                .and_then(Value::as_real)
                .ok_or_else(|| format!("the Hessian-vector product `{name}` is missing"))?;
            Ok(product.data.iter().map(|value| value.to_f64()).collect())
        };
        let result = match kind {
            "lanczos" => {
                let k = curv_ir::option_number(&plan.options, "rank").unwrap_or(1.0) as usize;
                let mut random = Random::new(self.seed, Stream::Preconditioner, step * 65_536 + index as u64);
                let start: Vec<f64> = (0..n).map(|_| random.normal()).collect();
                crate::lowrank::lanczos(n, 4 * k, k, &start, &mut hvp)
            }
            _ => {
                let mut hessian = vec![0.0; n * n];
                let mut unit = vec![0.0; n];
                let mut outcome = Ok(());
                for column in 0..n {
                    unit[column] = 1.0;
                    match hvp(&unit) {
                        Ok(product) => {
                            for (row, value) in product.into_iter().enumerate() {
                                hessian[row * n + column] = value;
                            }
                        }
                        Err(error) => {
                            outcome = Err(error);
                            break;
                        }
                    }
                    unit[column] = 0.0;
                }
                outcome.map(|()| hessian)
            }
        };
        inputs.inputs = saved;
        let values = result.map_err(|message| {
            TrainError::Runtime(
                Error::new(ErrorCode::StatisticsFailed, message).parameter(self.param_name(index)).step(step),
            )
        })?;
        let length = values.len();
        Ok(Tensor::new(vec![length], values.into_iter().map(T::from_f64).collect()))
    }

    /// The data field the loss compares the model's output with, and the names of the loss
    /// function's outputs for the prediction and the target.
    pub(super) fn target_field(&self) -> Result<((String, String), &'static str), TrainError> {
        let loss_function = &self.program.loss;
        let (model_output, target) = match self.program.loss_kind {
            LossKind::CrossEntropy => ("logits", "labels"),
            LossKind::MeanSquaredError => ("prediction", "target"),
            LossKind::Custom => {
                return Err(TrainError::statistics(
                    "sampled-label and exact Fisher statistics need a `cross_entropy` or `mse` loss".to_string(),
                ))
            }
        };
        let target_id = loss_function
            .output(target)
            .ok_or_else(|| TrainError::statistics(format!("the loss has no `{target}`")))?;
        let Op::Data { source, field } = &loss_function.inst(target_id).op else {
            return Err(TrainError::statistics("sampled labels need the target to be a data field".to_string()));
        };
        Ok(((source.clone(), field.clone()), model_output))
    }

    /// The outputs of `function` with the target data field replaced by `target`.
    pub(super) fn outputs_with_target(
        &self,
        step: u64,
        inputs: &Inputs<T>,
        function: &Function,
        key: &str,
        field: &(String, String),
        target: Value<T>,
    ) -> Result<Vec<(String, Value<T>)>, TrainError> {
        let mut replaced = inputs.clone();
        replaced.inputs.clear();
        replaced.data.insert(field.clone(), target);
        self.backend
            .outputs(key, function, &replaced)
            .map_err(|error| TrainError::backend(error.to_string()).at_step(step))
    }

    /// The outputs of `function` (a gradient program) with labels drawn from the model's
    /// predictive distribution (categorical over the softmax of the logits for cross-entropy;
    /// Gaussian around the prediction for `mse`). The draw depends only on the seed and the step.
    pub(super) fn sampled_outputs(
        &self,
        step: u64,
        inputs: &Inputs<T>,
        values: &[(String, Value<T>)],
        function: &Function,
        key: &str,
    ) -> Result<Vec<(String, Value<T>)>, TrainError> {
        let (field, model_output) = self.target_field()?;
        let prediction = find_output(values, model_output)
            .and_then(Value::as_real)
            .ok_or_else(|| TrainError::statistics(format!("the loss has no float output `{model_output}`")))?;
        let mut random = Random::new(self.seed, Stream::SampledLabels, step);
        let sampled = match self.program.loss_kind {
            LossKind::CrossEntropy => {
                let classes = *prediction.shape.last().unwrap_or(&1);
                let labels: Vec<i32> = prediction
                    .data
                    .chunks(classes)
                    .map(|row| {
                        let maximum = row.iter().map(|value| value.to_f64()).fold(f64::NEG_INFINITY, f64::max);
                        let weights: Vec<f64> = row.iter().map(|value| (value.to_f64() - maximum).exp()).collect();
                        random.categorical(&weights) as i32
                    })
                    .collect();
                Value::Int(Tensor::new(prediction.shape[..prediction.shape.len() - 1].to_vec(), labels))
            }
            _ => Value::Real(Tensor::new(
                prediction.shape.clone(),
                prediction.data.iter().map(|value| value.add(T::from_f64(random.normal()))).collect(),
            )),
        };
        self.outputs_with_target(step, inputs, function, key, &field, sampled)
    }

    /// The passes whose weighted cotangent outer products sum to the exact Fisher, the
    /// expectation of the sampled-label statistic over the model's predictive distribution: for
    /// cross-entropy one pass per class `c` with every label `c`, its rows weighted by the
    /// softmax probability of `c`; for `mse` (unit-variance Gaussian) one pass per output unit
    /// `o` with the target `prediction + e_o`, weight 1 (the Gaussian noise's covariance is the
    /// identity, the sum of `e_o e_o^T`).
    pub(super) fn exact_fisher_outputs(
        &self,
        step: u64,
        inputs: &Inputs<T>,
        values: &[(String, Value<T>)],
        function: &Function,
    ) -> Result<Vec<FisherPass<T>>, TrainError> {
        let (field, model_output) = self.target_field()?;
        let prediction = find_output(values, model_output)
            .and_then(Value::as_real)
            .ok_or_else(|| TrainError::statistics(format!("the loss has no float output `{model_output}`")))?;
        let width = (*prediction.shape.last().unwrap_or(&1)).max(1);
        let key = keys::GRADIENTS_AND_CAPTURES;
        let mut passes = Vec::with_capacity(width);
        for unit in 0..width {
            let (target, weights) = match self.program.loss_kind {
                LossKind::CrossEntropy => {
                    let rows = prediction.len() / width;
                    let labels =
                        Tensor::new(prediction.shape[..prediction.shape.len() - 1].to_vec(), vec![unit as i32; rows]);
                    let probabilities: Vec<f64> = prediction
                        .data
                        .chunks(width)
                        .map(|row| {
                            let maximum = row.iter().map(|value| value.to_f64()).fold(f64::NEG_INFINITY, f64::max);
                            let total: f64 = row.iter().map(|value| (value.to_f64() - maximum).exp()).sum();
                            (row[unit].to_f64() - maximum).exp() / total
                        })
                        .collect();
                    (Value::Int(labels), Some(probabilities))
                }
                _ => {
                    let shifted = prediction
                        .data
                        .iter()
                        .enumerate()
                        .map(|(index, value)| if index % width == unit { value.add(T::one()) } else { *value })
                        .collect();
                    (Value::Real(Tensor::new(prediction.shape.clone(), shifted)), None)
                }
            };
            passes.push((self.outputs_with_target(step, inputs, function, key, &field, target)?, weights));
        }
        Ok(passes)
    }
}
