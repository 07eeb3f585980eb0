//! The cost report behind `curv check`: optimizer-state bytes and estimated FLOPs per step.
//!
//! The estimates follow the usual conventions and are documented in `docs/language.md`: a matrix
//! product `[m, k] @ [k, n]` costs `2mkn`; the backward pass costs twice the forward pass; a
//! Hessian-vector product costs two forward and backward passes; a symmetric eigendecomposition
//! of an `n x n` matrix costs about `10 n^3` (tridiagonalisation plus QR iterations), amortised over
//! the inverse's period.

use crate::types::*;

/// FLOPs of one parameter's optimizer work per step.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ParamCost {
    pub state_bytes: u64,
    /// Statistics (gradient squares, factors, probes), amortised over their period.
    pub statistics_flops: f64,
    /// Inverses, roots and decompositions, amortised over their period.
    pub inverse_flops: f64,
    /// The update itself (preconditioning and the elementwise step).
    pub update_flops: f64,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct StepCost {
    pub forward_flops: f64,
    pub backward_flops: f64,
    /// Extra forward/backward work the statistics need (HVPs, sampled-label gradients).
    pub extra_pass_flops: f64,
    pub params: Vec<ParamCost>,
}

impl StepCost {
    pub fn total_state_bytes(&self) -> u64 {
        self.params.iter().map(|cost| cost.state_bytes).sum()
    }

    pub fn statistics_flops(&self) -> f64 {
        self.params.iter().map(|cost| cost.statistics_flops).sum::<f64>() + self.extra_pass_flops
    }

    pub fn inverse_flops(&self) -> f64 {
        self.params.iter().map(|cost| cost.inverse_flops).sum()
    }

    pub fn update_flops(&self) -> f64 {
        self.params.iter().map(|cost| cost.update_flops).sum()
    }

    pub fn total_flops(&self) -> f64 {
        self.forward_flops + self.backward_flops + self.statistics_flops() + self.inverse_flops() + self.update_flops()
    }
}

/// Computes the cost report of a train program. `rules` supplies the per-element cost of `rule`s.
pub struct CostModel<'a> {
    pub rules: &'a [RuleProgram],
}

impl CostModel<'_> {
    pub fn step_cost(&self, train: &TrainProgram) -> StepCost {
        let forward_flops = function_flops(&train.loss);
        let backward_flops = 2.0 * forward_flops;
        let mut extra_pass_flops: f64 = 0.0;
        let mut params = Vec::new();
        for plan in &train.optimizer.plans {
            let param = &train.params[plan.param];
            let (cost, extra) = self.param_cost(plan, param, forward_flops, train.batch);
            extra_pass_flops = extra_pass_flops.max(extra);
            params.push(cost);
        }
        StepCost { forward_flops, backward_flops, extra_pass_flops, params }
    }

    /// Returns the parameter's cost and the extra model passes its statistics need (shared by all
    /// parameters: one HVP serves every parameter, so the caller takes the maximum).
    fn param_cost(&self, plan: &ParamPlan, param: &ParamInfo, forward: f64, batch: i64) -> (ParamCost, f64) {
        let shape = param.ty.known_shape().unwrap_or_default();
        let numel = shape.iter().product::<i64>() as f64;
        let state_bytes = plan
            .state
            .iter()
            .map(|state| state.ty.element_count().unwrap_or(0) as u64 * state.ty.dtype.size_in_bytes())
            .sum();
        let every = option_number(&plan.options, "every").unwrap_or(1.0).max(1.0);
        let stats = option_name(&plan.options, "stats").unwrap_or("");
        let mut cost = ParamCost { state_bytes, ..ParamCost::default() };
        let mut extra = extra_pass_for_statistic(stats, forward) / every;
        if stats == "kfac" {
            extra =
                extra_pass_for_statistic(option_name(&plan.options, "fisher").unwrap_or("empirical"), forward) / every;
        }
        let (rows, cols) = matrix_view(&shape);
        match plan.structure {
            StructureKind::Diagonal => {
                cost.statistics_flops = 3.0 * numel / every;
                cost.update_flops = 6.0 * numel;
            }
            StructureKind::Kronecker => {
                let stats_flops = if stats.starts_with("kfac") {
                    2.0 * batch as f64 * ((rows + 1.0) * (rows + 1.0) + cols * cols)
                } else {
                    2.0 * rows * rows * cols + 2.0 * cols * cols * rows
                };
                cost.statistics_flops = stats_flops;
                cost.inverse_flops = 12.0 * (rows.powi(3) + cols.powi(3)) / every;
                cost.update_flops = 2.0 * rows * rows * cols + 2.0 * rows * cols * cols + 6.0 * numel;
            }
            StructureKind::LowRank => {
                let rank = option_number(&plan.options, "rank").unwrap_or(1.0);
                let window = option_number(&plan.options, "window").unwrap_or(1.0);
                let hessian_vector = 2.0 * 3.0 * forward;
                match stats {
                    // Natural GaLore: the projection's eigendecomposition every `every` steps,
                    // the projected gradient, the window's Gram row and Woodbury solve, Adam.
                    "fisher" => {
                        let (small, large) = (rows.min(cols), rows.max(cols));
                        cost.statistics_flops = 2.0 * small * large * rank + 2.0 * rank * large * window;
                        cost.inverse_flops =
                            (2.0 * small * small * large + 9.0 * small.powi(3)) / every + window.powi(3) / 3.0;
                        cost.update_flops =
                            4.0 * rank * large * window + 2.0 * small * rank * large + 10.0 * rank * large;
                    }
                    // PSGD LRA: balancing (r x r products over n) and the fit, O(n r^2 + n r).
                    "psgd" => {
                        cost.statistics_flops = 4.0 * numel * rank * rank + 24.0 * numel * rank;
                        cost.update_flops = 8.0 * numel * rank + 4.0 * numel;
                    }
                    // FOSI: Lanczos of order 4k (that many Hessian-vector products of the model,
                    // and full reorthogonalisation) every `every` steps.
                    "lanczos" => {
                        let order = 4.0 * rank;
                        cost.statistics_flops = (order * hessian_vector + 4.0 * order * order * numel) / every;
                        cost.inverse_flops = 9.0 * order.powi(3) / every;
                        cost.update_flops = 8.0 * numel * rank + 12.0 * numel;
                    }
                    // M-FAC: the Gram row, the Cholesky solve and two products with the window.
                    _ => {
                        cost.statistics_flops = 2.0 * numel * window / every;
                        cost.inverse_flops = window.powi(3) / 3.0;
                        cost.update_flops = 4.0 * numel * window + 2.0 * window * window;
                    }
                }
            }
            StructureKind::Orthogonalize => {
                let small = rows.min(cols);
                let large = rows.max(cols);
                let iterations = option_number(&plan.options, "steps").unwrap_or(5.0);
                cost.update_flops = iterations * (4.0 * small * small * large + 2.0 * small.powi(3)) + 6.0 * numel;
            }
            StructureKind::Factored => {
                cost.statistics_flops = 3.0 * numel;
                cost.update_flops = 10.0 * numel;
            }
            StructureKind::Dense if stats == "hessian" => {
                // Lazy Newton: n Hessian-vector products of the model and an eigendecomposition
                // every `every` steps, then two products with the eigenvectors per step.
                extra = 0.0;
                cost.statistics_flops = numel * 2.0 * 3.0 * forward / every;
                cost.inverse_flops = 9.0 * numel.powi(3) / every;
                cost.update_flops = 4.0 * numel * numel;
            }
            StructureKind::Dense => {
                cost.statistics_flops = 2.0 * numel * numel;
                cost.inverse_flops = 12.0 * numel.powi(3) / every;
                cost.update_flops = 2.0 * numel * numel;
            }
            StructureKind::Rule => {
                if let Some(rule) = self.rules.iter().find(|rule| rule.name == plan.rule_name) {
                    for update in &rule.updates {
                        cost.update_flops += numel * per_element_flops(&update.function) / update.period as f64;
                    }
                    for statistic in &rule.statistics {
                        extra = extra.max(extra_pass_for_statistic(statistic, forward));
                    }
                } else {
                    cost.update_flops = 4.0 * numel;
                }
            }
        }
        for modifier in &plan.modifiers {
            cost.update_flops += match modifier.name.as_str() {
                "graft" => 12.0 * numel,
                _ => 3.0 * numel,
            };
        }
        (cost, extra)
    }
}

/// The matrix a parameter is preconditioned as: rank-1 as a row, higher ranks with all leading
/// dimensions folded into rows.
fn matrix_view(shape: &[i64]) -> (f64, f64) {
    match shape {
        [] => (1.0, 1.0),
        [n] => (1.0, *n as f64),
        [.., last] => (shape[..shape.len() - 1].iter().product::<i64>() as f64, *last as f64),
    }
}

fn extra_pass_for_statistic(statistic: &str, forward: f64) -> f64 {
    // One Hessian-vector product is a forward-over-reverse pass, about twice a gradient; a
    // sampled-label statistic is one more gradient with labels drawn from the model.
    if statistic.starts_with("hutchinson") || statistic == "hessian" {
        2.0 * 3.0 * forward
    } else if matches!(statistic, "gnb" | "sampled_fisher" | "sampled_grad" | "sampled") {
        3.0 * forward
    } else {
        0.0
    }
}

/// FLOPs of one evaluation of a function.
pub fn function_flops(function: &Function) -> f64 {
    let mut total = 0.0;
    for inst in &function.insts {
        let elements = inst.ty.element_count().unwrap_or(0) as f64;
        total += match &inst.op {
            Op::Unary(op) => elements * op.flops_per_element() as f64,
            Op::Binary(op) => elements * op.flops_per_element() as f64,
            Op::Select => elements,
            Op::MatMul => {
                let left = function.ty(inst.args[0]);
                let inner = left.known_shape().and_then(|shape| shape.last().copied()).unwrap_or(0) as f64;
                2.0 * elements * inner
            }
            Op::Reduce { .. } => function.ty(inst.args[0]).element_count().unwrap_or(0) as f64,
            Op::Conv2dInputGradient { .. } | Op::Conv2dKernelGradient { .. } => {
                let left = function.ty(inst.args[0]).element_count().unwrap_or(0) as f64;
                let right = function.ty(inst.args[1]).element_count().unwrap_or(0) as f64;
                2.0 * left.max(right) * (right.min(left)).sqrt()
            }
            Op::Conv2d { .. } => {
                let kernel = function.ty(inst.args[1]).known_shape().unwrap_or_default();
                let per_output: i64 = kernel.iter().skip(1).product();
                2.0 * elements * per_output as f64
            }
            _ => 0.0,
        };
    }
    total
}

/// FLOPs per element of an elementwise update function over symbolic shapes.
fn per_element_flops(function: &Function) -> f64 {
    function
        .insts
        .iter()
        .map(|inst| match &inst.op {
            Op::Unary(op) => op.flops_per_element() as f64,
            Op::Binary(op) => op.flops_per_element() as f64,
            Op::Select => 1.0,
            _ => 0.0,
        })
        .sum()
}
