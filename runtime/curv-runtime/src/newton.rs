//! The `dense` structure with `stats = hessian`: Newton's method with lazy Hessian updates
//! (Doikov, Chayti and Jaggi, ICML 2023, arXiv 2212.00781), for small parameters.
//!
//! Every `every` steps (from step 1) the trainer computes the parameter's whole Hessian block
//! from `n` Hessian-vector products with unit vectors; it is symmetrised and eigendecomposed,
//! `H = Q diag(lambda) Q^T`, and the decomposition is kept (a state, so checkpoints carry it).
//! Every step solves a regularised Newton problem with the stale Hessian and the current gradient
//! `g`, in `O(n^2)` through the decomposition:
//!
//! - `regularization = cubic` (the paper's cubic Newton, Nesterov and Polyak 2006): the step
//!   `h = -(H + tau I)^-1 g` with `tau >= max(0, -lambda_min)` solving `tau = M |h| / 2`, where `M`
//!   is `hessian_lipschitz`, found by bisection (the function is monotone);
//! - `regularization = quadratic` (gradient regularisation, Mishchenko 2023, the paper's second
//!   variant): `tau = sqrt(M |g|) + max(0, -lambda_min)`.
//!
//! `damping` is added to `tau` in the quadratic variant and is the least `tau` above the shift in
//! the cubic one. The step is `p <- p + step_size h`, whatever the optimizer's learning rate (which
//! the other lines of a preset use): the direction is `-step_size h / lr`.

use crate::kronecker::{number, KroneckerInputs, States};
use crate::linalg::{symmetric_eigen, Matrix};
use curv_ir::{option_name, ParamPlan};

pub(crate) fn direction(
    plan: &ParamPlan,
    states: &mut States,
    inputs: &KroneckerInputs,
    hessian: Option<&[f64]>,
) -> Result<Vec<f64>, String> {
    let g = inputs.gradient;
    let n = g.len();
    if let Some(hessian) = hessian {
        if hessian.len() != n * n {
            return Err(format!("lazy Newton: a Hessian of {} values where {} were expected", hessian.len(), n * n));
        }
        let mut symmetric = Matrix { rows: n, columns: n, data: hessian.to_vec() };
        for row in 0..n {
            for column in row + 1..n {
                let mean = 0.5 * (hessian[row * n + column] + hessian[column * n + row]);
                symmetric.data[row * n + column] = mean;
                symmetric.data[column * n + row] = mean;
            }
        }
        let (values, vectors) = symmetric_eigen(&symmetric)
            .map_err(|error| format!("lazy Newton: the Hessian's eigendecomposition: {error}"))?;
        *states.get("eigenvalues", &[n]) = values;
        *states.get("eigenvectors", &[n, n]) = vectors.data;
    }
    let values = states.get("eigenvalues", &[n]).clone();
    let vectors = std::mem::take(states.get("eigenvectors", &[n, n]));
    if values.len() != n || vectors.len() != n * n || vectors.iter().all(|value| *value == 0.0) {
        return Err("lazy Newton: no Hessian yet (its first step must compute one)".to_string());
    }
    let vectors = Matrix { rows: n, columns: n, data: vectors };
    // Coordinates of g in the eigenbasis: Q^T g.
    let mut coordinates = vec![0.0; n];
    for (row, value) in g.iter().enumerate() {
        for (column, coordinate) in coordinates.iter_mut().enumerate() {
            *coordinate += vectors.data[row * n + column] * value;
        }
    }
    let smallest = values.iter().copied().fold(f64::INFINITY, f64::min);
    let shift = (-smallest).max(0.0);
    let damping = number(&plan.options, "damping", 1e-3);
    let lipschitz = number(&plan.options, "hessian_lipschitz", 1.0);
    let step_norm = |tau: f64| -> f64 {
        coordinates.iter().zip(&values).map(|(c, lambda)| (c / (lambda + tau)).powi(2)).sum::<f64>().sqrt()
    };
    let tau = match option_name(&plan.options, "regularization").unwrap_or("cubic") {
        "quadratic" => {
            let gradient_norm = g.iter().map(|value| value * value).sum::<f64>().sqrt();
            (lipschitz * gradient_norm).sqrt() + shift + damping
        }
        _ => {
            // tau - M |h(tau)| / 2 increases from negative (near the shift) to positive.
            let low_start = shift + damping.max(1e-300);
            let residual = |tau: f64| tau - 0.5 * lipschitz * step_norm(tau);
            let (mut low, mut high) = (low_start, low_start.max(1e-12));
            while residual(high) < 0.0 {
                high *= 2.0;
                if !high.is_finite() {
                    return Err("lazy Newton: the cubic step has no finite regularisation".to_string());
                }
            }
            if residual(low) >= 0.0 {
                low
            } else {
                for _ in 0..200 {
                    let middle = 0.5 * (low + high);
                    if residual(middle) < 0.0 {
                        low = middle;
                    } else {
                        high = middle;
                    }
                    if high - low <= 1e-15 * high {
                        break;
                    }
                }
                high
            }
        }
    };
    // h = -Q (c / (lambda + tau)); the direction is -h.
    let scaled: Vec<f64> = coordinates.iter().zip(&values).map(|(c, lambda)| c / (lambda + tau)).collect();
    let mut direction = vec![0.0; n];
    for (row, value) in direction.iter_mut().enumerate() {
        *value = vectors.data[row * n..(row + 1) * n].iter().zip(&scaled).map(|(q, s)| q * s).sum();
    }
    *states.get("eigenvectors", &[n, n]) = vectors.data;
    let rate = inputs.learning_rate;
    if rate == 0.0 {
        return Err(
            "lazy Newton: the learning rate is zero, so the step cannot be expressed as a direction".to_string()
        );
    }
    let factor = number(&plan.options, "step_size", 1.0) / rate;
    direction.iter_mut().for_each(|value| *value *= factor);
    if direction.iter().any(|value| !value.is_finite()) {
        return Err(format!("lazy Newton: the step at step {} is not finite", inputs.step));
    }
    Ok(direction)
}

/// EGN's step for one parameter (cor3bit/somax `EGN.update` without line search): `d` is this
/// parameter's part of the Gauss-Newton direction of the trainer's system; with `momentum = mu > 0`,
/// `v <- mu v + (1 - mu) d` and `d = v / (1 - mu^t)`; then `p <- p + lr d` (or `p <- p + a d` with
/// the step `a` of the trainer's line search), so the direction is `-d` (or `-(a / lr) d`).
pub(crate) fn egn_direction<T: curv_interp::Real>(
    plan: &ParamPlan,
    states: &mut States,
    inputs: &KroneckerInputs,
    direction: &curv_interp::Tensor<T>,
    stepsize: Option<f64>,
) -> Result<Vec<f64>, String> {
    let mut d: Vec<f64> = direction.data.iter().map(|value| value.to_f64()).collect();
    if d.len() != inputs.gradient.len() {
        return Err(format!("EGN: a direction of {} values for a parameter of {}", d.len(), inputs.gradient.len()));
    }
    let momentum = number(&plan.options, "momentum", 0.0);
    if momentum > 0.0 {
        let velocity = states.get("velocity", &[d.len()]);
        let correction = 1.0 - momentum.powi(inputs.step as i32);
        for (value, x) in velocity.iter_mut().zip(d.iter_mut()) {
            *value = momentum * *value + (1.0 - momentum) * *x;
            *x = *value / correction;
        }
    }
    // With a line search, the step it chose replaces the learning rate (and is kept for the next
    // step's search).
    let scale = match stepsize {
        Some(stepsize) => {
            states.get("stepsize", &[1])[0] = stepsize;
            if inputs.learning_rate == 0.0 {
                return Err("EGN: the learning rate is zero".to_string());
            }
            stepsize / inputs.learning_rate
        }
        None => 1.0,
    };
    d.iter_mut().for_each(|value| *value *= -scale);
    Ok(d)
}
