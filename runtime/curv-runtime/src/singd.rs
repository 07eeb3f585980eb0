//! SINGD, structured inverse-free natural gradient descent (Lin, Dangel, Eschenhagen, Neklyudov,
//! Kristiadi, Turner and Makhzani, ICML 2024), following f-dangel/singd `singd/optim/optimizer.py`:
//! the `kronecker` structure with `stats = kfac` and `function = singd`.
//!
//! Instead of inverting the K-FAC factors, SINGD keeps factors `K` (inputs' side, `[in (+1)]`)
//! and `C` (outputs' side) of the inverses, `A^-1 ~ K K^T` and `G^-1 ~ C C^T`, and updates them by
//! Riemannian gradient steps at the steps that refresh the K-FAC statistics (`every`):
//!
//! ```text
//! H_K = S(K^T A K)       H_C = S(C^T G C)       (A, G: this batch's K-FAC covariances)
//! m_K <- alpha1 m_K + (H_K tr(H_C)/d_C + damping tr(C^T C)/d_C K^T K - I) / 2
//! m_C <- alpha1 m_C + (H_C tr(H_K)/d_K + damping tr(K^T K)/d_K C^T C - I) / 2
//! K <- K - lr_precond K m_K        C <- C - lr_precond C m_C
//! ```
//!
//! where `S` keeps the structure: everything (`factor_structure = dense`) or the diagonal blocks of
//! `factor_block` rows (`block_diagonal`, blocks from the top and a smaller last block, as the
//! reference's `Block30DiagonalMatrix`; that class multiplies by a block as if it were symmetric,
//! `K^T X` computed as `K X`, and curv does the same so that the numbers agree). Every step the
//! natural gradient is `K K^T G_W C C^T` (in curv's `[in, out]` layout), the step
//! `buffer <- momentum buffer + natural` and `p <- p - lr buffer` (the reference's momentum on the
//! updates). The factors start as identities and their momenta as zeros. The factors are stored
//! densely (a block-diagonal one keeps zeros outside its blocks).

use crate::kronecker::{identity, number, product, trace, KroneckerInputs, States};
use crate::linalg::Matrix;
use curv_ir::{option_name, ParamPlan};

/// The structure projection `S`: a dense matrix as it is, a block-diagonal one with everything
/// outside its diagonal blocks set to zero.
fn project(matrix: &mut Matrix, block: Option<usize>) {
    let Some(block) = block else { return };
    let n = matrix.rows;
    for row in 0..n {
        for column in 0..n {
            if row / block != column / block {
                matrix.data[row * n + column] = 0.0;
            }
        }
    }
}

fn average_trace(matrix: &Matrix) -> f64 {
    trace(matrix) / matrix.rows.max(1) as f64
}

/// `X^T` as the structure computes it: the transpose for a dense factor, the factor itself for a
/// block-diagonal one (see the module documentation).
fn structured_transpose(matrix: &Matrix, block: Option<usize>) -> Matrix {
    match block {
        Some(_) => matrix.clone(),
        None => crate::kronecker::transpose(matrix),
    }
}

/// One factor's Riemannian step: returns the new momentum `m` (the step's direction for the
/// factor). `inner` is `S(T(X) M T(X)^T)` for the factor `X`, `own` is `S(T(X) T(X)^T)`.
fn factor_momentum(inner: &Matrix, other_inner: &Matrix, own: &Matrix, other_own: &Matrix, damping: f64) -> Matrix {
    let n = inner.rows;
    let (other_trace, other_own_trace) = (average_trace(other_inner), average_trace(other_own));
    let mut momentum = Matrix { rows: n, columns: n, data: vec![0.0; n * n] };
    for index in 0..n * n {
        momentum.data[index] = inner.data[index] * other_trace + damping * other_own_trace * own.data[index];
    }
    for index in 0..n {
        momentum.data[index * n + index] -= 1.0;
    }
    momentum.data.iter_mut().for_each(|value| *value *= 0.5);
    momentum
}

pub(crate) fn direction(
    plan: &ParamPlan,
    shape: &[usize],
    states: &mut States,
    inputs: &KroneckerInputs,
) -> Result<Option<Vec<f64>>, String> {
    let options = &plan.options;
    let (rows, columns) = crate::kronecker::matrix_shape(shape);
    let block = match option_name(options, "factor_structure").unwrap_or("dense") {
        "block_diagonal" => Some((number(options, "factor_block", 30.0) as usize).max(1)),
        _ => None,
    };
    let damping = number(options, "damping", 1e-3);
    let alpha1 = number(options, "riemannian_momentum", 0.5);
    let lr_precond = number(options, "lr_precond", 1e-2);
    let momentum = number(options, "momentum", 0.9);
    let load = |states: &mut States, name: &str, n: usize, start: Matrix| -> Result<Matrix, String> {
        let first = !states.values.iter().any(|(key, _, _)| key == name);
        if first {
            return Ok(start);
        }
        let data = std::mem::take(states.get(name, &[n * n]));
        if data.len() != n * n {
            return Err(format!("SINGD: the state `{name}` has {} values where {} were expected", data.len(), n * n));
        }
        Ok(Matrix { rows: n, columns: n, data })
    };
    let mut k = load(states, "left_preconditioner", rows, identity(rows))?;
    let mut c = load(states, "right_preconditioner", columns, identity(columns))?;
    if let Some(captures) = inputs.captures {
        if captures.inputs_are_columns {
            return Err("`function = singd` does not support conv2d kernels yet (only `x @ W` products)".to_string());
        }
        let (a, g) = captures.covariances();
        if a.rows != rows || g.rows != columns {
            return Err(format!(
                "the K-FAC statistics are {}x{} and {}x{}, the parameter is {rows}x{columns}",
                a.rows, a.columns, g.rows, g.columns
            ));
        }
        let inner = |factor: &Matrix, covariance: &Matrix| {
            let t = structured_transpose(factor, block);
            let mut result = product(&product(&t, false, covariance, false), false, &t, true);
            project(&mut result, block);
            result
        };
        let own = |factor: &Matrix| {
            let t = structured_transpose(factor, block);
            let mut result = product(&t, false, &t, true);
            project(&mut result, block);
            result
        };
        let (h_k, h_c) = (inner(&k, &a), inner(&c, &g));
        let (k_tk, c_tc) = (own(&k), own(&c));
        let mut m_k = factor_momentum(&h_k, &h_c, &k_tk, &c_tc, damping);
        let mut m_c = factor_momentum(&h_c, &h_k, &c_tc, &k_tk, damping);
        if alpha1 != 0.0 {
            let previous_k =
                load(states, "left_momentum", rows, Matrix { rows, columns: rows, data: vec![0.0; rows * rows] })?;
            let previous_c = load(
                states,
                "right_momentum",
                columns,
                Matrix { rows: columns, columns, data: vec![0.0; columns * columns] },
            )?;
            m_k.data.iter_mut().zip(&previous_k.data).for_each(|(value, old)| *value += alpha1 * old);
            m_c.data.iter_mut().zip(&previous_c.data).for_each(|(value, old)| *value += alpha1 * old);
            *states.get("left_momentum", &[rows * rows]) = m_k.data.clone();
            *states.get("right_momentum", &[columns * columns]) = m_c.data.clone();
        }
        let k_step = product(&k, false, &m_k, false);
        let c_step = product(&c, false, &m_c, false);
        k.data.iter_mut().zip(&k_step.data).for_each(|(value, step)| *value -= lr_precond * step);
        c.data.iter_mut().zip(&c_step.data).for_each(|(value, step)| *value -= lr_precond * step);
        if k.data.iter().chain(&c.data).any(|value| !value.is_finite()) {
            return Err(format!(
                "SINGD: the preconditioner factors became non-finite at step {} (a smaller `lr_precond` or a larger \
                 `damping` may help)",
                inputs.step
            ));
        }
    }
    // The natural gradient K T(K) G T(C)^T C^T.
    let gradient = Matrix { rows, columns, data: inputs.gradient.to_vec() };
    let left = product(&k, false, &structured_transpose(&k, block), false);
    let right = product(&structured_transpose(&c, block), true, &c, true);
    let natural = product(&product(&left, false, &gradient, false), false, &right, false);
    let buffer = states.get("update_momentum", shape);
    for (value, n) in buffer.iter_mut().zip(&natural.data) {
        *value = momentum * *value + n;
    }
    let direction = buffer.clone();
    *states.get("left_preconditioner", &[rows * rows]) = k.data;
    *states.get("right_preconditioner", &[columns * columns]) = c.data;
    Ok(Some(direction))
}
