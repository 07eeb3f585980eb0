//! MKOR (Mozaffari, Li, Zhang and Dehnavi, "MKOR: Momentum-Enabled Kronecker-Factor-Based Optimizer
//! Using Rank-1 Updates", NeurIPS 2023): `kronecker(stats = kfac, function = sherman_morrison)`.
//!
//! This module owns the MKOR direction of one parameter. It follows the `mkor` package of
//! Mohammad-Mozaffari/mkor (`mkor/mkor.py`, identical to `build/lib/mkor/mkor.py`, and
//! `mkor/utils/factors.py`), the variant its README installs (`pip install mkor`): the inverses of the
//! K-FAC factors are kept directly and updated, every `every` steps, by one Sherman-Morrison rank-1
//! update each from the batch means of the layer inputs and of the per-example output cotangents;
//! an inverse whose largest entry exceeds `reset_threshold` makes both inverses of the layer restart
//! from the identity at their next update. The preconditioned gradient is rescaled to the norm of
//! the gradient and handed to the `momentum` modifier and the step, as the reference hands it to
//! its inner SGD. The equations, defaults and deviations are in docs/language.md §12.7
//! (`function = sherman_morrison`).

use crate::kronecker::{frobenius, matrix_shape, number, product, KroneckerInputs, States};
use crate::linalg::Matrix;
use curv_ir::ParamPlan;

/// The weight of the old inverse when it is blended with the identity before each rank-1 update
/// (`0.95 * inverse + 0.05 * I`, a constant in the reference's `_invert_factor`).
pub const DEFAULT_INVERSE_DECAY: f64 = 0.95;
/// The reference's `clipping_value`: each captured input and cotangent entry is clamped to
/// `[-100, 100]` before the batch mean.
pub const DEFAULT_CAPTURE_CLIP: f64 = 100.0;
/// The reference's reset test (`_set_reset_factor_flags`): an inverse with an entry larger than 2
/// in magnitude makes both inverses of the layer restart from the identity.
pub const DEFAULT_RESET_THRESHOLD: f64 = 2.0;

/// One step: returns the direction (the step is `-lr * direction`).
pub(crate) fn direction(
    plan: &ParamPlan,
    shape: &[usize],
    states: &mut States,
    inputs: &KroneckerInputs,
) -> Result<Option<Vec<f64>>, String> {
    let options = &plan.options;
    let settings = Settings {
        inverse_decay: number(options, "ema", DEFAULT_INVERSE_DECAY),
        capture_clip: number(options, "capture_clip", DEFAULT_CAPTURE_CLIP),
        reset_threshold: number(options, "reset_threshold", DEFAULT_RESET_THRESHOLD),
    };
    let (rows, columns) = matrix_shape(shape);
    if inputs.gradient.len() != rows * columns {
        return Err(format!(
            "MKOR: the gradient has {} entries, the parameter {}",
            inputs.gradient.len(),
            rows * columns
        ));
    }
    if let Some(captures) = inputs.captures {
        refresh_inverses(states, captures, rows, columns, &settings)?;
    }
    let (Some(left), Some(right)) = (existing(states, "left_inverse"), existing(states, "right_inverse")) else {
        return Err("MKOR has no factor statistics yet (the K-FAC captures arrive at steps 1, 1 + every, ...)".into());
    };
    let left_inverse = Matrix { rows, columns: rows, data: left.clone() };
    let right_inverse = Matrix { rows: columns, columns, data: right.clone() };
    let bias_row = existing(states, "bias_row").is_some_and(|flag| flag[0] == 1.0);
    let gradient = Matrix { rows, columns, data: inputs.gradient.to_vec() };
    // PyTorch's `GG_inv @ grad @ AA_inv` on the `[out, in]` gradient is, transposed into curv's
    // `[in, out]` layout, `AA_inv^T grad GG_inv^T`.
    let preconditioned = product(&product(&left_inverse, true, &gradient, false), false, &right_inverse, true);
    let scale = norm_with_bias_row(&gradient.data, columns, bias_row)
        / norm_with_bias_row(&preconditioned.data, columns, bias_row);
    if !scale.is_finite() {
        // The reference skips the layer (its gradient stays as it is) when the ratio is NaN, which
        // happens when the gradient is zero.
        return Ok(Some(gradient.data));
    }
    Ok(Some(preconditioned.data.into_iter().map(|value| value * scale).collect()))
}

/// The options of one MKOR update.
struct Settings {
    inverse_decay: f64,
    capture_clip: f64,
    reset_threshold: f64,
}

/// A state that already exists (unlike [`States::get`], which creates it).
fn existing<'a>(states: &'a States, name: &str) -> Option<&'a Vec<f64>> {
    states.values.iter().find(|(key, _, _)| key == name).map(|(_, values, _)| values)
}

/// The norm the reference uses to rescale the preconditioned gradient: the Frobenius norm of the
/// weight part plus that of the bias (the last row), when the layer's bias is folded into the
/// matrix (`|grad_W| + |grad_b|`), or the Frobenius norm of the whole matrix.
fn norm_with_bias_row(values: &[f64], columns: usize, bias_row: bool) -> f64 {
    if bias_row && values.len() > columns {
        let split = values.len() - columns;
        frobenius(&values[..split]) + frobenius(&values[split..])
    } else {
        frobenius(values)
    }
}

/// The mean over the rows of a matrix whose entries are first clamped to `[-clip, clip]`
/// (the reference's `torch.clamp` in its hooks, then `low_rank_approx`).
pub(crate) fn clamped_column_mean(matrix: &Matrix, clip: f64) -> Vec<f64> {
    let mut sums = vec![0.0; matrix.columns];
    for row in matrix.data.chunks(matrix.columns.max(1)) {
        for (sum, value) in sums.iter_mut().zip(row) {
            *sum += value.clamp(-clip, clip);
        }
    }
    let count = matrix.rows as f64;
    sums.into_iter().map(|sum| sum / count).collect()
}

/// The Sherman-Morrison formula: given `P = M^-1`, the inverse of `M + v v^T`, which is
/// `P - (P v)(v^T P) / (1 + v^T P v)` (the reference's `sm_inverse`).
pub(crate) fn sherman_morrison(inverse: &Matrix, vector: &[f64]) -> Matrix {
    let n = inverse.rows;
    let column: Vec<f64> = (0..n).map(|row| (0..n).map(|inner| inverse.at(row, inner) * vector[inner]).sum()).collect();
    let row: Vec<f64> =
        (0..n).map(|column| (0..n).map(|inner| vector[inner] * inverse.at(inner, column)).sum()).collect();
    let denominator = 1.0 + row.iter().zip(vector).map(|(left, right)| left * right).sum::<f64>();
    let mut result = inverse.clone();
    for (result_row, left) in result.data.chunks_mut(n.max(1)).zip(&column) {
        let factor = left / denominator;
        for (value, right) in result_row.iter_mut().zip(&row) {
            *value -= factor * right;
        }
    }
    result
}

fn identity(size: usize) -> Matrix {
    let mut data = vec![0.0; size * size];
    for index in 0..size {
        data[index * size + index] = 1.0;
    }
    Matrix { rows: size, columns: size, data }
}

/// The refresh at a capture step: the left inverse takes the mean input, then the right inverse
/// takes the mean cotangent, in the reference's order (a reset requested by the left update
/// already applies to the right inverse at the same step).
fn refresh_inverses(
    states: &mut States,
    captures: &crate::kronecker::Captures,
    rows: usize,
    columns: usize,
    settings: &Settings,
) -> Result<(), String> {
    let (inputs, cotangents) = (&captures.inputs, &captures.cotangents);
    if inputs.columns != rows || cotangents.columns != columns || inputs.rows != cotangents.rows {
        return Err(format!(
            "the K-FAC captures are {}x{} and {}x{}, the parameter is {rows}x{columns}",
            inputs.rows, inputs.columns, cotangents.rows, cotangents.columns
        ));
    }
    if inputs.rows == 0 {
        return Err("MKOR: the K-FAC captures have no rows".into());
    }
    // A layer whose bias is folded into the matrix has a column of ones appended to its inputs.
    let folded = rows > 1 && inputs.data.chunks(inputs.columns).all(|row| row[rows - 1] == 1.0);
    states.set_scalar("bias_row", if folded { 1.0 } else { 0.0 });
    let input_mean = clamped_column_mean(inputs, settings.capture_clip);
    let cotangent_mean = clamped_column_mean(cotangents, settings.capture_clip);
    update_inverse(states, "left", rows, &input_mean, settings)?;
    update_inverse(states, "right", columns, &cotangent_mean, settings)
}

/// One factor's update: the identity when a reset is pending (also the first time), otherwise the
/// Sherman-Morrison update of `decay * inverse + (1 - decay) I` by the mean vector, after which an
/// entry above the threshold requests a reset of both factors.
fn update_inverse(
    states: &mut States,
    side: &str,
    size: usize,
    vector: &[f64],
    settings: &Settings,
) -> Result<(), String> {
    let (inverse_name, ready_name) = (format!("{side}_inverse"), format!("{side}_ready"));
    let ready = existing(states, &ready_name).is_some_and(|flag| flag[0] == 1.0);
    let previous = existing(states, &inverse_name).filter(|values| ready && values.len() == size * size).cloned();
    let inverse = if let Some(previous) = previous {
        let mut blended = Matrix { rows: size, columns: size, data: previous };
        let decay = settings.inverse_decay;
        blended.data.iter_mut().for_each(|value| *value *= decay);
        for index in 0..size {
            blended.data[index * size + index] += 1.0 - decay;
        }
        let updated = sherman_morrison(&blended, vector);
        if updated.data.iter().any(|value| !value.is_finite()) {
            return Err(format!("MKOR: the Sherman-Morrison update of the {side} factor's inverse is not finite"));
        }
        if updated.data.iter().any(|value| value.abs() > settings.reset_threshold) {
            states.set_scalar("left_ready", 0.0);
            states.set_scalar("right_ready", 0.0);
        }
        updated
    } else {
        states.set_scalar(&ready_name, 1.0);
        identity(size)
    };
    *states.get(&inverse_name, &[size * size]) = inverse.data;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kronecker::{add_to_diagonal, damped_inverse};

    fn random_spd(size: usize, seed: u64) -> Matrix {
        let mut random = crate::random::Random::new(seed, crate::random::Stream::Probe, 0);
        let x =
            Matrix { rows: size, columns: size + 2, data: (0..size * (size + 2)).map(|_| random.normal()).collect() };
        add_to_diagonal(&product(&x, false, &x, true), 0.5)
    }

    #[test]
    fn sherman_morrison_inverts_the_rank_one_update() {
        let m = random_spd(6, 5);
        let inverse = damped_inverse(&m, 0.0).unwrap();
        let v = [0.3, -1.2, 0.5, 2.0, -0.7, 0.1];
        let updated = sherman_morrison(&inverse, &v);
        let mut outer = m.clone();
        for i in 0..6 {
            for j in 0..6 {
                outer.data[i * 6 + j] += v[i] * v[j];
            }
        }
        let check = product(&updated, false, &outer, false);
        let error: f64 = check.data.iter().zip(&identity(6).data).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(error < 1e-10, "error {error}");
    }

    #[test]
    fn the_clamped_mean_clamps_before_averaging() {
        let matrix = Matrix { rows: 2, columns: 2, data: vec![300.0, 1.0, -50.0, 3.0] };
        assert_eq!(clamped_column_mean(&matrix, 100.0), vec![25.0, 2.0]);
    }

    #[test]
    fn the_bias_norm_adds_the_two_parts() {
        let values = [3.0, 4.0, 0.0, 5.0];
        assert_eq!(norm_with_bias_row(&values, 2, true), 10.0);
        assert!((norm_with_bias_row(&values, 2, false) - 50.0f64.sqrt()).abs() < 1e-15);
    }
}
