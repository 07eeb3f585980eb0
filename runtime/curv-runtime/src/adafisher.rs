//! AdaFisher (Gomes, Zhang, Hosseini et al., "AdaFisher: Adaptive Second Order Optimization via
//! Fisher Information", ICLR 2025): `kronecker(stats = kfac, function = adafisher)`.
//!
//! This module owns the AdaFisher direction of one Linear-layer parameter (`x @ W`, with the bias
//! folded in as the last row when the layer has one). It follows AtlasAnalyticsLab/AdaFisher's
//! released `optimizers/AdaFisher.py` (class `AdaFisher`; the same update as
//! `Image Classification/src/optimizers/AdaFisher.py` with its `AdaFisher_utils.py`): the diagonals
//! of the two K-FAC factors are min-max normalised and accumulated as `decay * D + weight * new`
//! from a start at ones, at the capture steps; the Fisher `diag(A) (x) diag(G) + damping` divides
//! a bias-corrected first moment of the gradient. The equations, defaults and deviations are in
//! docs/language.md §12.7 (`function = adafisher`).

use crate::kronecker::{matrix_shape, number, Captures, KroneckerInputs, States};
use curv_ir::ParamPlan;

/// The reference's `beta`: the decay of the gradient's moving average.
pub const DEFAULT_B1: f64 = 0.9;
/// The reference's `Lambda`: the Tikhonov damping added to the Fisher's diagonal.
pub const DEFAULT_DAMPING: f64 = 1e-3;
/// The reference's `update_running_avg` with its default `gamma = 0.8`: `D <- gamma / 10 * D +
/// gamma / 100 * new` (the older `gammas = [0.92, 0.008]` form writes the same `(1 - 0.92) D + 0.008 new`).
pub const DEFAULT_FACTOR_DECAY: f64 = 0.08;
pub const DEFAULT_FACTOR_WEIGHT: f64 = 0.008;
/// The epsilon of the reference's `MinMaxNormalization`.
pub const MIN_MAX_EPSILON: f64 = 1e-6;

/// One step: returns the direction (the step is `-lr * direction`).
pub(crate) fn direction(
    plan: &ParamPlan,
    shape: &[usize],
    states: &mut States,
    inputs: &KroneckerInputs,
) -> Result<Option<Vec<f64>>, String> {
    let options = &plan.options;
    let b1 = number(options, "b1", DEFAULT_B1);
    let damping = number(options, "damping", DEFAULT_DAMPING);
    let factor_decay = number(options, "factor_decay", DEFAULT_FACTOR_DECAY);
    let factor_weight = number(options, "factor_weight", DEFAULT_FACTOR_WEIGHT);
    let (rows, columns) = matrix_shape(shape);
    let gradient = inputs.gradient;
    if gradient.len() != rows * columns {
        return Err(format!(
            "AdaFisher: the gradient has {} entries, the parameter {}",
            gradient.len(),
            rows * columns
        ));
    }
    if let Some(captures) = inputs.captures {
        let (input_diagonal, cotangent_diagonal) = diagonals(captures, rows, columns)?;
        for (name, fresh) in [("left_diagonal", input_diagonal), ("right_diagonal", cotangent_diagonal)] {
            let first = !states.values.iter().any(|(key, _, _)| key == name);
            let diagonal = states.get(name, &[fresh.len()]);
            if first {
                // The reference starts both diagonals at ones before their first update.
                diagonal.iter_mut().for_each(|value| *value = 1.0);
            }
            for (value, new) in diagonal.iter_mut().zip(min_max_normalised(&fresh)) {
                *value = factor_decay * *value + factor_weight * new;
            }
        }
    }
    let has = |name: &str| states.values.iter().any(|(key, values, _)| key == name && !values.is_empty());
    if !has("left_diagonal") || !has("right_diagonal") {
        return Err(
            "AdaFisher has no factor statistics yet (the K-FAC captures arrive at steps 1, 1 + every, ...)".into()
        );
    }
    let left = states.get("left_diagonal", &[rows]).clone();
    let right = states.get("right_diagonal", &[columns]).clone();
    if left.len() != rows || right.len() != columns {
        return Err(format!(
            "AdaFisher: the factor diagonals have {} and {} entries, the parameter is {rows}x{columns}",
            left.len(),
            right.len()
        ));
    }
    let moment = states.get("m", shape);
    for (value, g) in moment.iter_mut().zip(gradient) {
        *value = b1 * *value + (1.0 - b1) * g;
    }
    let correction = 1.0 - b1.powf(inputs.step.max(1) as f64);
    let mut direction = Vec::with_capacity(rows * columns);
    for row in 0..rows {
        for column in 0..columns {
            let fisher = left[row] * right[column] + damping;
            direction.push(moment[row * columns + column] / correction / fisher);
        }
    }
    if direction.iter().any(|value| !value.is_finite()) {
        return Err("AdaFisher: the direction is not finite (is `damping` zero with a zero Fisher entry?)".into());
    }
    Ok(Some(direction))
}

/// The fresh diagonals of the two factors at a capture step, at the reference's scale:
/// `diag(A)_i = sum_n x_ni^2 / N` and `diag(G)_j = sum_n g_nj^2 / N`, where `g = d / N` is the
/// cotangent of the mean loss that PyTorch's backward hook sees (the captures hold the per-example
/// cotangents `d = N g`).
pub(crate) fn diagonals(captures: &Captures, rows: usize, columns: usize) -> Result<(Vec<f64>, Vec<f64>), String> {
    let (inputs, cotangents) = (&captures.inputs, &captures.cotangents);
    if inputs.columns != rows || cotangents.columns != columns || inputs.rows != cotangents.rows {
        return Err(format!(
            "the K-FAC captures are {}x{} and {}x{}, the parameter is {rows}x{columns}",
            inputs.rows, inputs.columns, cotangents.rows, cotangents.columns
        ));
    }
    if inputs.rows == 0 {
        return Err("AdaFisher: the K-FAC captures have no rows".into());
    }
    let count = inputs.rows as f64;
    let mut input_diagonal = vec![0.0; rows];
    for row in inputs.data.chunks(rows) {
        for (sum, value) in input_diagonal.iter_mut().zip(row) {
            *sum += value * value;
        }
    }
    let mut cotangent_diagonal = vec![0.0; columns];
    for row in cotangents.data.chunks(columns) {
        for (sum, value) in cotangent_diagonal.iter_mut().zip(row) {
            let mean_loss_cotangent = value / count;
            *sum += mean_loss_cotangent * mean_loss_cotangent;
        }
    }
    input_diagonal.iter_mut().chain(cotangent_diagonal.iter_mut()).for_each(|sum| *sum /= count);
    Ok((input_diagonal, cotangent_diagonal))
}

/// The reference's `MinMaxNormalization`: infinities become 1 (positive) or 0 (negative), then
/// `(v - min v) / (max v - min v + 1e-6)`.
pub(crate) fn min_max_normalised(values: &[f64]) -> Vec<f64> {
    let cleaned: Vec<f64> = values
        .iter()
        .map(|&value| match value {
            f64::INFINITY => 1.0,
            f64::NEG_INFINITY => 0.0,
            other => other,
        })
        .collect();
    let smallest = cleaned.iter().copied().fold(f64::INFINITY, f64::min);
    let largest = cleaned.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let range = largest - smallest + MIN_MAX_EPSILON;
    cleaned.into_iter().map(|value| (value - smallest) / range).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::Matrix;

    #[test]
    fn min_max_normalisation_maps_to_the_unit_interval() {
        let normalised = min_max_normalised(&[2.0, 4.0, 3.0, f64::INFINITY, f64::NEG_INFINITY]);
        // Infinities become 1 and 0 before the normalisation: the range is [0, 4].
        let range = 4.0 + MIN_MAX_EPSILON;
        let expected = [2.0 / range, 4.0 / range, 3.0 / range, 1.0 / range, 0.0];
        for (value, expected) in normalised.iter().zip(expected) {
            assert!((value - expected).abs() < 1e-15);
        }
    }

    #[test]
    fn the_diagonals_use_the_mean_loss_cotangents() {
        let captures = Captures {
            inputs: Matrix { rows: 2, columns: 2, data: vec![1.0, 2.0, 3.0, 1.0] },
            cotangents: Matrix { rows: 2, columns: 1, data: vec![2.0, -4.0] },
            inputs_are_columns: false,
        };
        let (a, g) = diagonals(&captures, 2, 1).unwrap();
        assert_eq!(a, vec![5.0, 2.5]);
        // g = d / 2 = [1, -2]: (1 + 4) / 2.
        assert_eq!(g, vec![2.5]);
        assert!(diagonals(&captures, 3, 1).is_err());
    }
}
