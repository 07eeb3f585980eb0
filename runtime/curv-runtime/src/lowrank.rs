//! The `lowrank` structure (docs/language.md section 12.9): curvature kept as a few vectors per
//! parameter instead of a matrix, applied without ever forming one.
//!
//! - `stats = gradient_window, window = m` is M-FAC (Frantar, Kurtic and Alistarh, 2021), dense
//!   variant, following IST-DASLab/M-FAC `optim.py`: the last `m` gradients `G` (a ring buffer, the
//!   oldest replaced first, zeros until filled) define the damped empirical Fisher
//!   `F = damping I + G^T G / m`, and the direction is `F^-1 g` for the gradient `g` just added.
//! - `stats = fisher, rank = r, window = m` is Natural GaLore (Das, 2024): the gradient of a
//!   matrix is projected on its top `r` left singular vectors `P` (recomputed every `every` steps,
//!   as GaLore's projection), the window keeps the last `m` projected gradients `R = P^T G`, the
//!   natural gradient `(damping I + sum R R^T)^-1 R` feeds Adam's moments in the `r x cols`
//!   subspace, and the direction is `scale * P * adam`.
//! - `stats = psgd, rank = r` is PSGD's low-rank-approximation preconditioner (Li, 2018), following
//!   lixilinx/psgd_torch `psgd.py` (`LRAWhiten`): `Q = (I + U V^T) diag(d)`, fitted on the Lie
//!   group to whiten the gradient, and the direction is `Q^T Q g`.
//! - `stats = lanczos, rank = k` is FOSI (Sivan, Gabel and Schuster, 2024), following hsivan/fosi
//!   `torch_optim/fosi_optimizer.py`: every `every` steps (from `warmup`) the trainer runs Lanczos
//!   with Hessian-vector products of the parameter's block ([`lanczos`]); the gradient's part in
//!   the top `k` eigenvectors takes a Newton step (scaled by `alpha`), the rest a base optimizer.
//!
//! Every inverse is a Woodbury product: an `m x m` Cholesky solve and two products with the
//! window, `O(n m + m^3)` per step for `n` elements, never an `n x n` matrix. The window, its Gram
//! matrix and the ring position are states, so a checkpoint holds them and `--resume` continues
//! bit for bit. Everything is computed in double precision, as the other matrix structures.

use crate::kronecker::{
    descending_eigenvectors, frobenius, matrix_shape, number, product, KroneckerInputs, ProductPrecision, States,
};
use crate::linalg::{cholesky, Matrix};
use crate::optimizer::ParamState;
use crate::random::{Random, Stream};
use curv_interp::{Real, Tensor};
use curv_ir::{option_name, ParamPlan};

/// The key of the coin PSGD draws once per step for all parameters (as the `kronecker` PSGD).
const SHARED_COIN_KEY: u64 = 65_535;

/// One step of the `lowrank` structure: returns the direction (the step is `-lr * direction`).
pub(crate) fn direction(
    plan: &ParamPlan,
    shape: &[usize],
    states: &mut States,
    inputs: &KroneckerInputs,
    eigenpairs: Option<&[f64]>,
) -> Result<Vec<f64>, String> {
    // Double-precision products throughout, whatever the run's precision.
    let _double = ProductPrecision::single(false);
    match option_name(&plan.options, "stats").unwrap_or("gradient_window") {
        "fisher" => natural_galore(plan, shape, states, inputs),
        "psgd" => psgd_lra(plan, shape, states, inputs),
        "lanczos" => fosi(plan, shape, states, inputs, eigenpairs),
        // M-FAC runs on the state where it is (`mfac_on_state`), not on a double-precision copy.
        other => Err(format!("lowrank: `stats = {other}` has no double-precision path")),
    }
}

/// A sliding window of `m` vectors of length `n` (rows of `vectors`), with its Gram matrix and
/// the slot the next vector replaces.
struct Window {
    vectors: Matrix,
    gram: Matrix,
    position: usize,
}

impl Window {
    fn load(states: &mut States, window: usize, length: usize) -> Result<Window, String> {
        let vectors = std::mem::take(states.get("gradient_window", &[window, length]));
        let gram = std::mem::take(states.get("gram", &[window, window]));
        if vectors.len() != window * length || gram.len() != window * window {
            return Err(format!(
                "lowrank: the window state has {} values where {} were expected (was `window` or `rank` changed \
                 since the checkpoint?)",
                vectors.len(),
                window * length
            ));
        }
        let position = states.get("position", &[1])[0];
        if !(position >= 0.0 && (position as usize) < window) {
            return Err(format!("lowrank: the window position {position} is outside the window of {window}"));
        }
        Ok(Window {
            vectors: Matrix { rows: window, columns: length, data: vectors },
            gram: Matrix { rows: window, columns: window, data: gram },
            position: position as usize,
        })
    }

    fn store(self, states: &mut States) {
        let (window, length) = (self.vectors.rows, self.vectors.columns);
        *states.get("gradient_window", &[window, length]) = self.vectors.data;
        *states.get("gram", &[window, window]) = self.gram.data;
        states.get("position", &[1])[0] = self.position as f64;
    }

    /// `G x`: the dot products of `x` with every vector of the window.
    fn dots(&self, x: &[f64]) -> Vec<f64> {
        let length = self.vectors.columns;
        (0..self.vectors.rows)
            .map(|row| self.vectors.data[row * length..(row + 1) * length].iter().zip(x).map(|(a, b)| a * b).sum())
            .collect()
    }

    /// Replaces the oldest vector with `x` and updates the Gram matrix's row and column.
    fn insert(&mut self, x: &[f64]) {
        let (window, length) = (self.vectors.rows, self.vectors.columns);
        let slot = self.position;
        self.vectors.data[slot * length..(slot + 1) * length].copy_from_slice(x);
        let dots = self.dots(x);
        for (other, dot) in dots.into_iter().enumerate() {
            self.gram.data[slot * window + other] = dot;
            self.gram.data[other * window + slot] = dot;
        }
        self.position = (slot + 1) % window;
    }

    /// `(damping I + weight G^T G)^-1 x` by Woodbury:
    /// `(x - G^T (damping / weight I + G G^T)^-1 G x) / damping`.
    fn inverse_product(&self, damping: f64, weight: f64, x: &[f64]) -> Result<Vec<f64>, String> {
        woodbury(&self.vectors, &self.gram, damping, weight, x)
    }
}

/// `(damping I + weight G^T G)^-1 x` for the `m x n` matrix `G` whose Gram matrix `G G^T` is
/// `gram`, in `O(n m + m^3)`: `(x - G^T (damping / weight I + G G^T)^-1 G x) / damping`.
pub fn woodbury(vectors: &Matrix, gram: &Matrix, damping: f64, weight: f64, x: &[f64]) -> Result<Vec<f64>, String> {
    let (window, length) = (vectors.rows, vectors.columns);
    let mut system = gram.clone();
    for index in 0..window {
        system.data[index * window + index] += damping / weight;
    }
    let lower =
        cholesky(&system).map_err(|error| format!("lowrank: the window's {window}x{window} system: {error}"))?;
    let dots: Vec<f64> = (0..window)
        .map(|row| vectors.data[row * length..(row + 1) * length].iter().zip(x).map(|(a, b)| a * b).sum())
        .collect();
    let coefficients = cholesky_solve(&lower, &dots);
    let mut result: Vec<f64> = x.to_vec();
    for (row, coefficient) in coefficients.iter().enumerate() {
        for (value, g) in result.iter_mut().zip(&vectors.data[row * length..(row + 1) * length]) {
            *value -= coefficient * g;
        }
    }
    result.iter_mut().for_each(|value| *value /= damping);
    Ok(result)
}

/// Solves `L L^T x = b` for a lower-triangular `L`.
fn cholesky_solve(lower: &Matrix, b: &[f64]) -> Vec<f64> {
    let n = lower.rows;
    let mut y = b.to_vec();
    for row in 0..n {
        let sum: f64 = y[row] - (0..row).map(|column| lower.at(row, column) * y[column]).sum::<f64>();
        y[row] = sum / lower.at(row, row);
    }
    for row in (0..n).rev() {
        let sum: f64 = y[row] - (row + 1..n).map(|column| lower.at(column, row) * y[column]).sum::<f64>();
        y[row] = sum / lower.at(row, row);
    }
    y
}

/// Whether this step refreshes a statistic kept every `every` steps (steps 1, 1 + every, ...).
fn refreshes(step: u64, every: f64) -> bool {
    (step.max(1) - 1).is_multiple_of((every as u64).max(1))
}

/// M-FAC, dense variant (IST-DASLab/M-FAC `MFAC.step` with `HInvFastUpMulti.update_mul`): the
/// gradient replaces the oldest row of the window (every `every` steps), then
/// `d = (damping I + G^T G / m)^-1 g`; with `momentum = mu > 0`, `v <- mu v + (1 - mu) d` and the
/// direction is `v`.
///
/// It works on the parameter's state tensors themselves, in the run's precision, without a
/// double-precision copy of the window (the products accumulate in double): copying a window of
/// `m` gradients each step would cost more than the Woodbury product. The caller keeps what it
/// needs to undo the step.
pub(crate) fn mfac_on_state<T: Real>(
    plan: &ParamPlan,
    shape: &[usize],
    state: &mut ParamState<T>,
    inputs: &KroneckerInputs,
) -> Result<Vec<f64>, String> {
    let size = inputs.gradient.len();
    let window_size = number(&plan.options, "window", 1.0) as usize;
    let damping = number(&plan.options, "damping", 1e-5);
    let momentum = number(&plan.options, "momentum", 0.0);
    let mut ensure = |name: &str, dims: Vec<usize>| {
        let count: usize = dims.iter().product();
        match state.iter().position(|(key, _)| key == name) {
            Some(index) if state[index].1.len() == count => Ok(index),
            Some(index) => Err(format!(
                "lowrank: the state `{name}` has {} values where {count} were expected (was `window` changed since \
                 the checkpoint?)",
                state[index].1.len()
            )),
            None => {
                state.push((name.to_string(), Tensor::new(dims, vec![T::from_f64(0.0); count])));
                Ok(state.len() - 1)
            }
        }
    };
    let window_index = ensure("gradient_window", vec![window_size, size])?;
    let gram_index = ensure("gram", vec![window_size, window_size])?;
    let position_index = ensure("position", vec![1])?;
    let momentum_index = if momentum > 0.0 { Some(ensure("momentum", shape.to_vec())?) } else { None };
    let position = state[position_index].1.data[0].to_f64();
    if !(position >= 0.0 && (position as usize) < window_size) {
        return Err(format!("lowrank: the window position {position} is outside the window of {window_size}"));
    }
    let mut position = position as usize;
    let gradient = inputs.gradient;
    let dot = |row: &[T], x: &[f64]| -> f64 { row.iter().zip(x).map(|(a, b)| a.to_f64() * b).sum() };
    let mut gram: Vec<f64> = state[gram_index].1.data.iter().map(|value| value.to_f64()).collect();
    if refreshes(inputs.step, number(&plan.options, "every", 1.0)) {
        let window = &mut state[window_index].1.data;
        window[position * size..(position + 1) * size]
            .iter_mut()
            .zip(gradient)
            .for_each(|(slot, value)| *slot = T::from_f64(*value));
        // The stored row (rounded to the run's precision) against every row.
        let stored: Vec<f64> =
            window[position * size..(position + 1) * size].iter().map(|value| value.to_f64()).collect();
        for other in 0..window_size {
            let value = dot(&window[other * size..(other + 1) * size], &stored);
            gram[position * window_size + other] = value;
            gram[other * window_size + position] = value;
        }
        position = (position + 1) % window_size;
    }
    let window = &state[window_index].1.data;
    let mut system = Matrix { rows: window_size, columns: window_size, data: gram.clone() };
    for index in 0..window_size {
        system.data[index * window_size + index] += damping * window_size as f64;
    }
    let lower = cholesky(&system)
        .map_err(|error| format!("lowrank: the window's {window_size}x{window_size} system: {error}"))?;
    let dots: Vec<f64> = (0..window_size).map(|row| dot(&window[row * size..(row + 1) * size], gradient)).collect();
    let coefficients = cholesky_solve(&lower, &dots);
    let mut direction: Vec<f64> = gradient.to_vec();
    for (row, coefficient) in coefficients.iter().enumerate() {
        for (value, g) in direction.iter_mut().zip(&window[row * size..(row + 1) * size]) {
            *value -= coefficient * g.to_f64();
        }
    }
    direction.iter_mut().for_each(|value| *value /= damping);
    state[gram_index].1.data = gram.into_iter().map(T::from_f64).collect();
    state[position_index].1.data[0] = T::from_f64(position as f64);
    if let Some(index) = momentum_index {
        for (value, d) in state[index].1.data.iter_mut().zip(direction.iter_mut()) {
            let next = momentum * value.to_f64() + (1.0 - momentum) * *d;
            *value = T::from_f64(next);
            *d = next;
        }
    }
    Ok(direction)
}

/// The top `rank` left singular vectors of the `rows x columns` matrix `gradient`, as the columns
/// of a `rows x rank` matrix: eigenvectors of `G G^T` by descending eigenvalue, each signed so that
/// its largest entry in absolute value is positive (a deterministic choice).
fn left_singular_vectors(gradient: &Matrix, rank: usize) -> Result<Matrix, String> {
    let outer = product(gradient, false, gradient, true);
    let vectors =
        descending_eigenvectors(&outer).map_err(|error| format!("Natural GaLore: the projection: {error}"))?;
    let rows = gradient.rows;
    let mut projection = Matrix { rows, columns: rank, data: vec![0.0; rows * rank] };
    for column in 0..rank {
        let mut largest = 0.0f64;
        for row in 0..rows {
            let value = vectors.at(row, column);
            if value.abs() > largest.abs() {
                largest = value;
            }
        }
        let sign = if largest < 0.0 { -1.0 } else { 1.0 };
        for row in 0..rows {
            projection.data[row * rank + column] = sign * vectors.at(row, column);
        }
    }
    Ok(projection)
}

/// Natural GaLore: the projection `P` (refreshed every `every` steps, the window's vectors rotated
/// into the new subspace by `P_new^T P_old`), `R = P^T G`, the natural gradient
/// `N = (damping I + sum_i R_i R_i^T)^-1 R` over the window (which holds `R`), Adam's bias-corrected
/// moments of `N`, and the direction `scale * P (m_hat / (sqrt(v_hat) + eps))`.
fn natural_galore(
    plan: &ParamPlan,
    shape: &[usize],
    states: &mut States,
    inputs: &KroneckerInputs,
) -> Result<Vec<f64>, String> {
    // The projection acts on the smaller side (GaLore's choice): a matrix with more rows than
    // columns is handled as its transpose, and the direction transposed back.
    let (matrix_rows, matrix_columns) = matrix_shape(shape);
    let transposed = matrix_rows > matrix_columns;
    let (rows, columns) = if transposed { (matrix_columns, matrix_rows) } else { (matrix_rows, matrix_columns) };
    let gradient_values = if transposed {
        crate::kronecker::transpose(&Matrix {
            rows: matrix_rows,
            columns: matrix_columns,
            data: inputs.gradient.to_vec(),
        })
        .data
    } else {
        inputs.gradient.to_vec()
    };
    let rank = number(&plan.options, "rank", 1.0) as usize;
    let window_size = number(&plan.options, "window", 1.0) as usize;
    let damping = number(&plan.options, "damping", 1e-5);
    let (b1, b2) = (number(&plan.options, "b1", 0.9), number(&plan.options, "b2", 0.999));
    let eps = number(&plan.options, "eps", 1e-8);
    let scale = number(&plan.options, "scale", 1.0);
    let gradient = Matrix { rows, columns, data: gradient_values };
    let length = rank * columns;
    let mut window = Window::load(states, window_size, length)?;
    let stored = std::mem::take(states.get("projection", &[rows, rank]));
    let mut projection = Matrix { rows, columns: rank, data: stored };
    let first = projection.data.iter().all(|value| *value == 0.0);
    if first || refreshes(inputs.step, number(&plan.options, "every", 1.0)) {
        let fresh = left_singular_vectors(&gradient, rank)?;
        if !first {
            // The window's projected gradients, expressed in the new subspace.
            let rotation = product(&fresh, true, &projection, false);
            for slot in 0..window_size {
                let old = Matrix {
                    rows: rank,
                    columns,
                    data: window.vectors.data[slot * length..(slot + 1) * length].to_vec(),
                };
                let rotated = product(&rotation, false, &old, false);
                window.vectors.data[slot * length..(slot + 1) * length].copy_from_slice(&rotated.data);
            }
            window.gram = product(&window.vectors, false, &window.vectors, true);
        }
        projection = fresh;
    }
    let projected = product(&projection, true, &gradient, false);
    window.insert(&projected.data);
    let natural = window.inverse_product(damping, 1.0, &projected.data)?;
    window.store(states);
    let t = inputs.step as i32;
    let mut adam = vec![0.0; length];
    {
        let m = states.get("m", &[rank, columns]);
        for (value, n) in m.iter_mut().zip(&natural) {
            *value = b1 * *value + (1.0 - b1) * n;
        }
        adam.copy_from_slice(m);
    }
    let v = states.get("v", &[rank, columns]);
    for ((a, value), n) in adam.iter_mut().zip(v.iter_mut()).zip(&natural) {
        *value = b2 * *value + (1.0 - b2) * n * n;
        let m_hat = *a / (1.0 - b1.powi(t));
        let v_hat = *value / (1.0 - b2.powi(t));
        *a = m_hat / (v_hat.sqrt() + eps);
    }
    let update = product(&projection, false, &Matrix { rows: rank, columns, data: adam }, false);
    *states.get("projection", &[rows, rank]) = projection.data;
    let update = if transposed { crate::kronecker::transpose(&update) } else { update };
    Ok(update.data.into_iter().map(|value| scale * value).collect())
}

/// `A^T x` for a tall `n x r` matrix `A` (PSGD's factors are tall and thin: these loops beat a
/// general matrix product, which would pack and thread a product of one column).
fn tall_transpose_times(a: &Matrix, x: &[f64]) -> Vec<f64> {
    let r = a.columns;
    let mut result = vec![0.0; r];
    for (row, value) in a.data.chunks_exact(r.max(1)).zip(x) {
        for (out, entry) in result.iter_mut().zip(row) {
            *out += entry * value;
        }
    }
    result
}

/// `A y` for a tall `n x r` matrix `A` and an `r`-vector `y`.
fn tall_times(a: &Matrix, y: &[f64]) -> Vec<f64> {
    if a.columns == 0 {
        return vec![0.0; a.rows];
    }
    a.data.chunks_exact(a.columns).map(|row| row.iter().zip(y).map(|(entry, value)| entry * value).sum()).collect()
}

/// `A^T B` for tall `n x r` matrices: an `r x r` matrix.
fn tall_inner(a: &Matrix, b: &Matrix) -> Matrix {
    product(a, true, b, false)
}

/// `A S` for a tall `n x r` matrix `A` and an `r x r` matrix `S`.
fn tall_times_small(a: &Matrix, small: &Matrix) -> Matrix {
    product(a, false, small, false)
}

/// The Lanczos algorithm with full reorthogonalisation (twice per iteration), as hsivan/fosi
/// `lanczos_algorithm.py`: `order` iterations of the symmetric operator `hvp` on vectors of length
/// `n` from the unit vector along `start`, the tridiagonal matrix's eigendecomposition, and its top
/// `k` eigenpairs as Ritz pairs. Returns `k` eigenvalues in ascending order followed by the `k`
/// eigenvectors (rows of length `n`), in one vector. The iteration stops early when the Krylov
/// space is exhausted (a zero residual, which the reference would divide by, as when the Hessian
/// vanishes late in training); the pairs it could not find come first, as zero eigenvalues with
/// zero vectors, which FOSI leaves out of its Newton part.
pub fn lanczos(
    n: usize,
    order: usize,
    k: usize,
    start: &[f64],
    mut hvp: impl FnMut(&[f64]) -> Result<Vec<f64>, String>,
) -> Result<Vec<f64>, String> {
    let _double = ProductPrecision::single(false);
    let order = order.min(n).max(k);
    let mut vectors: Vec<Vec<f64>> = Vec::with_capacity(order);
    let start_norm = frobenius(start);
    if start_norm == 0.0 || !start_norm.is_finite() {
        return Err("Lanczos: the start vector is zero or not finite".to_string());
    }
    vectors.push(start.iter().map(|value| value / start_norm).collect());
    let mut alphas: Vec<f64> = Vec::with_capacity(order);
    let mut betas: Vec<f64> = Vec::with_capacity(order);
    for i in 0..order {
        let mut w = hvp(&vectors[i])?;
        if w.len() != n {
            return Err(format!("Lanczos: a Hessian-vector product has {} values where {n} were expected", w.len()));
        }
        alphas.push(w.iter().zip(&vectors[i]).map(|(a, b)| a * b).sum());
        if i + 1 == order {
            break;
        }
        for _ in 0..2 {
            let coefficients: Vec<f64> =
                vectors.iter().map(|vector| vector.iter().zip(&w).map(|(a, b)| a * b).sum()).collect();
            for (vector, coefficient) in vectors.iter().zip(&coefficients) {
                w.iter_mut().zip(vector).for_each(|(value, entry)| *value -= coefficient * entry);
            }
        }
        let beta = frobenius(&w);
        if !beta.is_finite() {
            return Err("Lanczos: a Hessian-vector product is not finite".to_string());
        }
        if beta <= 1e-300 {
            break;
        }
        betas.push(beta);
        vectors.push(w.into_iter().map(|value| value / beta).collect());
    }
    let size = alphas.len();
    let mut tridiagonal = Matrix { rows: size, columns: size, data: vec![0.0; size * size] };
    for (index, alpha) in alphas.iter().enumerate() {
        tridiagonal.data[index * size + index] = *alpha;
    }
    for (index, beta) in betas.iter().take(size - 1).enumerate() {
        tridiagonal.data[index * size + index + 1] = *beta;
        tridiagonal.data[(index + 1) * size + index] = *beta;
    }
    let (values, ritz) = crate::linalg::symmetric_eigen(&tridiagonal).map_err(|error| format!("Lanczos: {error}"))?;
    let found = k.min(size);
    let missing = k - found;
    let mut result: Vec<f64> = vec![0.0; missing];
    result.extend_from_slice(&values[size - found..]);
    result.extend(std::iter::repeat_n(0.0, missing * n));
    for column in size - found..size {
        let mut vector = vec![0.0; n];
        for (row, basis) in vectors.iter().take(size).enumerate() {
            let weight = ritz.at(row, column);
            vector.iter_mut().zip(basis).for_each(|(value, entry)| *value += weight * entry);
        }
        result.extend(vector);
    }
    Ok(result)
}

/// FOSI (hsivan/fosi `scale_by_fosi` with `approx_l = 0`) for one parameter. At a refresh the
/// eigenpairs `(lambda_i, v_i)` become `V` and the learning rates `1 / (|lambda_i| + damping)`
/// (`damping` is curv's addition, 0 by default as the reference), and the
/// scaling of the base optimizer `clip(lr_1 / lr_k, 1, lr_clip)` (the ratio of the largest to
/// the smallest of the k eigenvalues). Each step: `g1 = V^T V g`, `g2 = g - g1`; the velocity
/// in the subspace is `(1 - decay) g1 + decay velocity` (base `adam`), `g1 + decay velocity`
/// (`momentum`) or `g1` (`sgd`); the Newton part `V^T (lr_i (V velocity))`; the base optimizer
/// (Adam with `b1`, `b2`, `eps`; heavy ball `b <- momentum b + g2`; or SGD) on `g2`, its direction
/// orthogonalised against `V`. The reference's step `scaling * base_deltas - alpha * newton`, with
/// `base_deltas` already scaled by `-lr`, is the direction `scaling * base + (alpha / lr) newton`.
/// Before the first refresh `V` is empty and FOSI is its base optimizer.
fn fosi(
    plan: &ParamPlan,
    shape: &[usize],
    states: &mut States,
    inputs: &KroneckerInputs,
    eigenpairs: Option<&[f64]>,
) -> Result<Vec<f64>, String> {
    let g = inputs.gradient;
    let n = g.len();
    let k = (number(&plan.options, "rank", 1.0) as usize).max(1);
    let base = option_name(&plan.options, "base").unwrap_or("adam");
    let decay = number(&plan.options, "decay", 0.9);
    let alpha = number(&plan.options, "alpha", 0.1);
    let lr_clip = number(&plan.options, "lr_clip", if base == "adam" { 1.0 } else { 3.0 });
    let damping = number(&plan.options, "damping", 0.0);
    if let Some(pairs) = eigenpairs {
        if pairs.len() != k * (n + 1) {
            return Err(format!("FOSI: {} eigenpair values where {} were expected", pairs.len(), k * (n + 1)));
        }
        // A pair Lanczos could not find (a zero vector) or a zero eigenvalue gets no Newton step.
        let rates: Vec<f64> = (0..k)
            .map(|index| {
                let vector = &pairs[k + index * n..k + (index + 1) * n];
                let rate = 1.0 / (pairs[index].abs() + damping);
                if rate.is_finite() && vector.iter().any(|value| *value != 0.0) {
                    rate
                } else {
                    0.0
                }
            })
            .collect();
        let valid: Vec<f64> = rates.iter().copied().filter(|rate| *rate > 0.0).collect();
        let scaling = match (valid.first(), valid.last()) {
            (Some(first), Some(last)) => (first / last).clamp(1.0, lr_clip.max(1.0)),
            _ => 1.0,
        };
        *states.get("eigenvectors", &[k, n]) = pairs[k..].to_vec();
        *states.get("learning_rates", &[k]) = rates;
        states.get("scaling", &[1])[0] = scaling;
    }
    let vectors = Matrix { rows: k, columns: n, data: std::mem::take(states.get("eigenvectors", &[k, n])) };
    if vectors.data.len() != k * n {
        return Err(
            "FOSI: the state `eigenvectors` does not match `rank` (was it changed since the checkpoint?)".to_string()
        );
    }
    let rates = states.get("learning_rates", &[k]).clone();
    let scaling = {
        let stored = states.get("scaling", &[1])[0];
        if stored == 0.0 {
            1.0
        } else {
            stored
        }
    };
    let coordinates_of = |x: &[f64]| -> Vec<f64> {
        vectors.data.chunks_exact(n.max(1)).map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum()).collect()
    };
    let combine = |coefficients: &[f64]| -> Vec<f64> {
        let mut result = vec![0.0; n];
        for (row, coefficient) in vectors.data.chunks_exact(n.max(1)).zip(coefficients) {
            result.iter_mut().zip(row).for_each(|(value, entry)| *value += coefficient * entry);
        }
        result
    };
    let project = |x: &[f64]| -> Vec<f64> { combine(&coordinates_of(x)) };
    let g1 = project(g);
    let g2: Vec<f64> = g.iter().zip(&g1).map(|(a, b)| a - b).collect();
    let velocity = states.get("velocity", shape);
    for (value, part) in velocity.iter_mut().zip(&g1) {
        *value = match base {
            "adam" => (1.0 - decay) * part + decay * *value,
            "momentum" => part + decay * *value,
            _ => *part,
        };
    }
    let velocity = velocity.clone();
    let scaled: Vec<f64> = coordinates_of(&velocity).iter().zip(&rates).map(|(c, rate)| c * rate).collect();
    let newton = combine(&scaled);
    let mut base_direction = match base {
        "adam" => {
            let (b1, b2) = (number(&plan.options, "b1", 0.9), number(&plan.options, "b2", 0.999));
            let eps = number(&plan.options, "eps", 1e-8);
            let t = inputs.step as i32;
            let m = states.get("m", shape);
            m.iter_mut().zip(&g2).for_each(|(value, x)| *value = b1 * *value + (1.0 - b1) * x);
            let m = m.clone();
            let v = states.get("v", shape);
            v.iter_mut().zip(&g2).for_each(|(value, x)| *value = b2 * *value + (1.0 - b2) * x * x);
            m.iter()
                .zip(v.iter())
                .map(|(m, v)| (m / (1.0 - b1.powi(t))) / ((v / (1.0 - b2.powi(t))).sqrt() + eps))
                .collect::<Vec<f64>>()
        }
        "momentum" => {
            let beta = number(&plan.options, "momentum", 0.9);
            let buffer = states.get("momentum", shape);
            buffer.iter_mut().zip(&g2).for_each(|(value, x)| *value = beta * *value + x);
            buffer.clone()
        }
        _ => g2.clone(),
    };
    let along = project(&base_direction);
    base_direction.iter_mut().zip(&along).for_each(|(value, part)| *value -= part);
    let rate = inputs.learning_rate;
    if rate == 0.0 {
        return Err(
            "FOSI: the learning rate is zero, so the Newton part cannot be expressed as a direction".to_string()
        );
    }
    *states.get("eigenvectors", &[k, n]) = vectors.data;
    Ok(base_direction.iter().zip(&newton).map(|(b, d)| scaling * b + alpha / rate * d).collect())
}

/// `(I + U V^T) x` for `n x r` matrices `U`, `V`.
fn identity_plus_low_rank(u: &Matrix, v: &Matrix, x: &[f64]) -> Vec<f64> {
    let low = tall_times(u, &tall_transpose_times(v, x));
    x.iter().zip(&low).map(|(a, b)| a + b).collect()
}

/// Solves `A x = b` (or `A^T x = b`) for a small square `A` by Gaussian elimination with partial
/// pivoting.
fn solve_small(a: &Matrix, b: &[f64], transpose: bool) -> Result<Vec<f64>, String> {
    let n = a.rows;
    let mut m: Vec<f64> = (0..n * n)
        .map(|index| {
            let (row, column) = (index / n, index % n);
            if transpose {
                a.at(column, row)
            } else {
                a.at(row, column)
            }
        })
        .collect();
    let mut x = b.to_vec();
    for pivot in 0..n {
        let best = (pivot..n)
            .max_by(|&first, &second| m[first * n + pivot].abs().total_cmp(&m[second * n + pivot].abs()))
            .unwrap_or(pivot);
        if m[best * n + pivot] == 0.0 || !m[best * n + pivot].is_finite() {
            return Err("PSGD LRA: I + V^T U is singular".to_string());
        }
        if best != pivot {
            for column in 0..n {
                m.swap(pivot * n + column, best * n + column);
            }
            x.swap(pivot, best);
        }
        for row in pivot + 1..n {
            let factor = m[row * n + pivot] / m[pivot * n + pivot];
            if factor != 0.0 {
                for column in pivot..n {
                    m[row * n + column] -= factor * m[pivot * n + column];
                }
                x[row] -= factor * x[pivot];
            }
        }
    }
    for row in (0..n).rev() {
        let mut sum = x[row];
        for column in row + 1..n {
            sum -= m[row * n + column] * x[column];
        }
        x[row] = sum / m[row * n + row];
    }
    Ok(x)
}

/// PSGD LRA's preconditioner `Q = (I + U V^T) diag(d)` for one parameter.
struct LowRankPreconditioner {
    u: Matrix,
    v: Matrix,
    d: Vec<f64>,
}

impl LowRankPreconditioner {
    /// `P g = Q^T Q g = d (I + V U^T) (I + U V^T) (d g)` (psgd.py `precond_grad_lra`).
    fn precondition(&self, g: &[f64]) -> Vec<f64> {
        let scaled: Vec<f64> = self.d.iter().zip(g).map(|(d, g)| d * g).collect();
        let first = identity_plus_low_rank(&self.u, &self.v, &scaled);
        let second = identity_plus_low_rank(&self.v, &self.u, &first);
        self.d.iter().zip(&second).map(|(d, value)| d * value).collect()
    }

    /// Approximate balancing towards `U^T U = V^T V` (exact balancing would need three
    /// eigendecompositions): `U <- U / rho`, `V <- V rho` with `rho = (tr U^T U / tr V^T V)^(1/4)`,
    /// then a rotation by `I - E + E^2/2` and `I + E + E^2/2`.
    fn balance(&mut self) {
        let r = self.u.columns;
        let utu = tall_inner(&self.u, &self.u);
        let vtv = tall_inner(&self.v, &self.v);
        let trace_u: f64 = (0..r).map(|index| utu.at(index, index)).sum();
        let trace_v: f64 = (0..r).map(|index| vtv.at(index, index)).sum();
        let rho = (trace_u / trace_v).powf(0.25);
        let rho2 = rho * rho;
        let denominator = trace_u / rho2 + trace_v * rho2;
        let e: Vec<f64> =
            utu.data.iter().zip(&vtv.data).map(|(a, b)| 0.1 * (a / rho2 - b * rho2) / denominator).collect();
        let e = Matrix { rows: r, columns: r, data: e };
        let mut e2 = product(&e, false, &e, false);
        e2.data.iter_mut().for_each(|value| *value *= 0.5);
        self.u.data.iter_mut().for_each(|value| *value /= rho);
        self.v.data.iter_mut().for_each(|value| *value *= rho);
        let minus = Matrix { rows: r, columns: r, data: e.data.iter().zip(&e2.data).map(|(a, b)| a - b).collect() };
        let plus = Matrix { rows: r, columns: r, data: e.data.iter().zip(&e2.data).map(|(a, b)| a + b).collect() };
        let u_change = tall_times_small(&self.u, &minus);
        let v_change = tall_times_small(&self.v, &plus);
        self.u.data.iter_mut().zip(&u_change.data).for_each(|(value, change)| *value -= change);
        self.v.data.iter_mut().zip(&v_change.data).for_each(|(value, change)| *value += change);
    }

    /// One fit of `Q` to the pair `(v, h)` (psgd.py `update_precond_lra`): balance `U` and `V`,
    /// then a normalised Lie-group step on `d` and on `U` (if `update_u`) or `V`, with the
    /// Lipschitz estimates `lipschitz = [Lu, Lv, Ld]` as step sizes. With a rank of 0 only the
    /// diagonal is fitted.
    fn fit(
        &mut self,
        lipschitz: &mut [f64],
        v: &[f64],
        h: &[f64],
        lr: f64,
        beta: f64,
        update_u: bool,
    ) -> Result<(), String> {
        let r = self.u.columns;
        if r > 0 {
            self.balance();
        }
        let dh: Vec<f64> = self.d.iter().zip(h).map(|(d, h)| d * h).collect();
        let qh = identity_plus_low_rank(&self.u, &self.v, &dh);
        let ph: Vec<f64> =
            identity_plus_low_rank(&self.v, &self.u, &qh).iter().zip(&self.d).map(|(value, d)| value * d).collect();
        let mut ipvtu = tall_inner(&self.v, &self.u);
        (0..r).for_each(|index| ipvtu.data[index * r + index] += 1.0);
        // Q^-T v and P^-1 v through the r x r system I + V^T U.
        let mut inv_qt_v: Vec<f64> = v.iter().zip(&self.d).map(|(v, d)| v / d).collect();
        let solved = solve_small(&ipvtu, &tall_transpose_times(&self.u, &inv_qt_v), true)?;
        let correction = tall_times(&self.v, &solved);
        inv_qt_v.iter_mut().zip(&correction).for_each(|(value, c)| *value -= c);
        let solved = solve_small(&ipvtu, &tall_transpose_times(&self.v, &inv_qt_v), false)?;
        let correction = tall_times(&self.u, &solved);
        let inv_p_v: Vec<f64> =
            inv_qt_v.iter().zip(&correction).zip(&self.d).map(|((value, c), d)| (value - c) / d).collect();

        // The diagonal.
        let phh: Vec<f64> = ph.iter().zip(h).map(|(p, h)| p * h).collect();
        let v_inv_p_v: Vec<f64> = v.iter().zip(&inv_p_v).map(|(v, p)| v * p).collect();
        let max_abs = |values: &[f64]| values.iter().fold(0.0f64, |acc, value| acc.max(value.abs()));
        let ell = max_abs(&phh) + max_abs(&v_inv_p_v);
        lipschitz[2] = (beta * lipschitz[2] + (1.0 - beta) * ell).max(ell);
        for ((d, p), q) in self.d.iter_mut().zip(&phh).zip(&v_inv_p_v) {
            *d -= lr / lipschitz[2] * (p - q) * *d;
        }

        // U or V, by rank-one corrections `x c^T`.
        let (a, b) = (qh, inv_qt_v);
        let rank_one_update = |factor: &mut Matrix, step: f64, terms: [(&[f64], &[f64]); 2]| {
            let r = factor.columns;
            if r == 0 {
                return;
            }
            for (row, out) in factor.data.chunks_exact_mut(r).enumerate() {
                for (j, value) in out.iter_mut().enumerate() {
                    *value -= step * (terms[0].0[row] * terms[0].1[j] - terms[1].0[row] * terms[1].1[j]);
                }
            }
        };
        if update_u {
            let at_v = tall_transpose_times(&self.v, &a);
            let bt_v = tall_transpose_times(&self.v, &b);
            let ell = frobenius(&a) * frobenius(&tall_times(&self.v, &at_v))
                + frobenius(&b) * frobenius(&tall_times(&self.v, &bt_v));
            lipschitz[0] = (beta * lipschitz[0] + (1.0 - beta) * ell).max(ell);
            // (a^T V)(I + V^T U) as a row: (I + V^T U)^T (V^T a).
            let left = (0..r).map(|k| (0..r).map(|j| at_v[j] * ipvtu.at(j, k)).sum()).collect::<Vec<f64>>();
            let right = (0..r).map(|k| (0..r).map(|j| bt_v[j] * ipvtu.at(j, k)).sum()).collect::<Vec<f64>>();
            rank_one_update(&mut self.u, lr / lipschitz[0], [(&a, &left), (&b, &right)]);
        } else {
            let at_u = tall_transpose_times(&self.u, &a);
            let bt_u = tall_transpose_times(&self.u, &b);
            let ell = frobenius(&a) * frobenius(&tall_times(&self.u, &at_u))
                + frobenius(&b) * frobenius(&tall_times(&self.u, &bt_u));
            lipschitz[1] = (beta * lipschitz[1] + (1.0 - beta) * ell).max(ell);
            let a_plus: Vec<f64> = a.iter().zip(tall_times(&self.v, &at_u)).map(|(x, y)| x + y).collect();
            let b_plus: Vec<f64> = b.iter().zip(tall_times(&self.v, &bt_u)).map(|(x, y)| x + y).collect();
            rank_one_update(&mut self.v, lr / lipschitz[1], [(&a_plus, &at_u), (&b_plus, &bt_u)]);
        }
        Ok(())
    }
}

/// PSGD LRA (psgd.py `LRAWhiten.step`, whitening the gradient, the preconditioner updated first):
/// on the first step `U` and `V` are drawn normal and scaled to a Frobenius norm of `sqrt(0.1)`,
/// and `d = init_scale` (or `(mean g^4 + noise_damping^4)^(-1/8)`); the momentum
/// `m <- beta m + (1 - beta) g` with `beta = min(k / (k + 1), momentum)`; with probability
/// `update_probability` the preconditioner is fitted to `(v, g + (noise_damping + eps |g|) v)` for
/// a normal `v`; the direction is `P m` (or `P g`), its RMS clipped at `max_rms` and its elements
/// at `max_abs`.
///
/// Random numbers come from the `Preconditioner` stream: `U` then `V` from the key `param` (step
/// 0), the step's coin from `step * 65536 + 65535` (shared by all parameters), then per parameter
/// from `step * 65536 + param` the `n` normals of `v` and the coin that picks `U` (below 0.5) or `V`.
fn psgd_lra(
    plan: &ParamPlan,
    shape: &[usize],
    states: &mut States,
    inputs: &KroneckerInputs,
) -> Result<Vec<f64>, String> {
    let gradient = inputs.gradient;
    let n = gradient.len();
    let rank = number(&plan.options, "rank", 1.0) as usize;
    let noise_damping = number(&plan.options, "noise_damping", 1e-9);
    let momentum = number(&plan.options, "momentum", 0.0);
    let first = !states.values.iter().any(|(name, _, _)| name == "d");
    if first {
        let mut random = Random::new(inputs.seed, Stream::Preconditioner, inputs.param as u64);
        for name in ["u", "v"] {
            let mut values: Vec<f64> = (0..n * rank).map(|_| random.normal()).collect();
            let scale = 0.1f64.sqrt() / frobenius(&values);
            values.iter_mut().for_each(|value| *value *= scale);
            *states.get(name, &[n, rank]) = values;
        }
        let initial = match plan.options.iter().any(|(key, _)| key == "init_scale") {
            true => number(&plan.options, "init_scale", 1.0),
            false => {
                let mean_fourth = gradient.iter().map(|value| value.powi(4)).sum::<f64>() / n.max(1) as f64;
                (mean_fourth + noise_damping.powi(4)).powf(-1.0 / 8.0)
            }
        };
        *states.get("d", &[n]) = vec![initial; n];
        states.get("lipschitz", &[3]);
    }
    let take = |states: &mut States, name: &str, size: usize| -> Result<Vec<f64>, String> {
        let values = std::mem::take(states.get(name, &[size]));
        if values.len() != size {
            return Err(format!(
                "PSGD LRA: the state `{name}` has {} values where {size} were expected (was `rank` changed since \
                 the checkpoint?)",
                values.len()
            ));
        }
        Ok(values)
    };
    let mut preconditioner = LowRankPreconditioner {
        u: Matrix { rows: n, columns: rank, data: take(states, "u", n * rank)? },
        v: Matrix { rows: n, columns: rank, data: take(states, "v", n * rank)? },
        d: take(states, "d", n)?,
    };
    let mut lipschitz = take(states, "lipschitz", 3)?;
    let target: Vec<f64> = if momentum > 0.0 {
        let count = states.get("momentum_count", &[1])[0];
        let beta = (count / (1.0 + count)).min(momentum);
        states.get("momentum_count", &[1])[0] = count + 1.0;
        let buffer = states.get("momentum", shape);
        for (value, g) in buffer.iter_mut().zip(gradient) {
            *value = beta * *value + (1.0 - beta) * g;
        }
        buffer.clone()
    } else {
        gradient.to_vec()
    };
    let coin = Random::new(inputs.seed, Stream::Preconditioner, inputs.step * 65_536 + SHARED_COIN_KEY).uniform();
    if coin < number(&plan.options, "update_probability", 1.0) {
        let mut random = Random::new(inputs.seed, Stream::Preconditioner, inputs.step * 65_536 + inputs.param as u64);
        let probe: Vec<f64> = (0..n).map(|_| random.normal()).collect();
        let update_u = random.uniform() < 0.5;
        // psgd.py's `update_precond_lra_whiten`: the damping grows with the gradient's magnitude.
        let h: Vec<f64> =
            gradient.iter().zip(&probe).map(|(g, v)| g + (noise_damping + f64::EPSILON * g.abs()) * v).collect();
        preconditioner.fit(
            &mut lipschitz,
            &probe,
            &h,
            number(&plan.options, "lr_precond", 0.1),
            number(&plan.options, "lipschitz_ema", 0.9),
            update_u,
        )?;
        let finite = [&preconditioner.u.data, &preconditioner.v.data, &preconditioner.d, &lipschitz]
            .iter()
            .all(|values| values.iter().all(|value| value.is_finite()));
        if !finite {
            return Err(format!(
                "PSGD LRA: the preconditioner became non-finite at step {} (is the gradient finite? a smaller \
                 `lr_precond` or a larger `noise_damping` may help)",
                inputs.step
            ));
        }
    }
    let mut direction = preconditioner.precondition(&target);
    if let Some(limit) =
        plan.options.iter().any(|(key, _)| key == "max_rms").then(|| number(&plan.options, "max_rms", 1.0))
    {
        let rms = (direction.iter().map(|value| value * value).sum::<f64>() / n.max(1) as f64).sqrt();
        if rms > limit {
            direction.iter_mut().for_each(|value| *value *= limit / rms);
        }
    }
    if let Some(limit) =
        plan.options.iter().any(|(key, _)| key == "max_abs").then(|| number(&plan.options, "max_abs", 1.0))
    {
        direction.iter_mut().for_each(|value| *value = value.clamp(-limit, limit));
    }
    *states.get("u", &[n, rank]) = preconditioner.u.data;
    *states.get("v", &[n, rank]) = preconditioner.v.data;
    *states.get("d", &[n]) = preconditioner.d;
    *states.get("lipschitz", &[3]) = lipschitz;
    Ok(direction)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linalg::cholesky_inverse;

    fn random_values(count: usize, seed: u64) -> Vec<f64> {
        let mut random = Random::new(seed, Stream::Preconditioner, 0);
        (0..count).map(|_| random.normal()).collect()
    }

    fn dense_inverse_product(vectors: &Matrix, damping: f64, weight: f64, x: &[f64]) -> Vec<f64> {
        let n = vectors.columns;
        let mut fisher = product(vectors, true, vectors, false);
        fisher.data.iter_mut().for_each(|value| *value *= weight);
        (0..n).for_each(|index| fisher.data[index * n + index] += damping);
        let inverse = cholesky_inverse(&fisher).unwrap();
        product(&inverse, false, &Matrix { rows: n, columns: 1, data: x.to_vec() }, false).data
    }

    fn relative_error(ours: &[f64], theirs: &[f64]) -> f64 {
        let difference: Vec<f64> = ours.iter().zip(theirs).map(|(a, b)| a - b).collect();
        frobenius(&difference) / frobenius(theirs)
    }

    #[test]
    fn woodbury_products_match_dense_inverses_on_random_data() {
        for (window, length, damping, weight, seed) in
            [(4, 30, 1e-2, 0.25, 1), (8, 50, 1e-1, 1.0, 2), (16, 40, 1.0, 1.0 / 16.0, 3), (3, 3, 0.5, 1.0, 4)]
        {
            let vectors = Matrix { rows: window, columns: length, data: random_values(window * length, seed) };
            let gram = product(&vectors, false, &vectors, true);
            let x = random_values(length, seed + 100);
            let ours = woodbury(&vectors, &gram, damping, weight, &x).unwrap();
            let theirs = dense_inverse_product(&vectors, damping, weight, &x);
            let error = relative_error(&ours, &theirs);
            assert!(error < 1e-10, "window {window}, length {length}: relative error {error:e}");
        }
    }

    #[test]
    fn a_ring_buffer_window_keeps_its_gram_matrix_and_replaces_the_oldest_vector() {
        let (window_size, length) = (3, 7);
        let mut window = Window {
            vectors: Matrix { rows: window_size, columns: length, data: vec![0.0; window_size * length] },
            gram: Matrix { rows: window_size, columns: window_size, data: vec![0.0; window_size * window_size] },
            position: 0,
        };
        let inserted: Vec<Vec<f64>> = (0..5).map(|index| random_values(length, 10 + index)).collect();
        for vector in &inserted {
            window.insert(vector);
        }
        // Five insertions into three slots: slots 0 and 1 hold the 4th and 5th, slot 2 the 3rd.
        assert_eq!(&window.vectors.data[0..length], &inserted[3][..]);
        assert_eq!(&window.vectors.data[length..2 * length], &inserted[4][..]);
        assert_eq!(&window.vectors.data[2 * length..], &inserted[2][..]);
        assert_eq!(window.position, 2);
        let gram = product(&window.vectors, false, &window.vectors, true);
        assert!(relative_error(&window.gram.data, &gram.data) < 1e-14);
    }

    #[test]
    fn lanczos_finds_the_top_eigenpairs_and_survives_an_exhausted_krylov_space() {
        let n = 30;
        let a = Matrix { rows: n, columns: n, data: random_values(n * n, 40) };
        let mut spd = product(&a, true, &a, false);
        // A clear gap after the top 3 eigenvalues.
        for index in 0..3 {
            spd.data[index * n + index] += 200.0 * (index + 1) as f64;
        }
        let apply = |matrix: &Matrix, v: &[f64]| {
            product(matrix, false, &Matrix { rows: v.len(), columns: 1, data: v.to_vec() }, false).data
        };
        let start = random_values(n, 41);
        let pairs = lanczos(n, n, 3, &start, |v| Ok(apply(&spd, v))).unwrap();
        let (values, _) = crate::linalg::symmetric_eigen(&spd).unwrap();
        for index in 0..3 {
            let ours = pairs[index];
            let theirs = values[n - 3 + index];
            assert!((ours - theirs).abs() < 1e-8 * theirs.abs(), "eigenvalue {index}: {ours} vs {theirs}");
            let vector = &pairs[3 + index * n..3 + (index + 1) * n];
            let residual: Vec<f64> = apply(&spd, vector).iter().zip(vector).map(|(hv, v)| hv - ours * v).collect();
            assert!(
                frobenius(&residual) < 1e-6 * theirs.abs(),
                "eigenvector {index}: residual {}",
                frobenius(&residual)
            );
        }
        // A vanishing operator: one Krylov vector; the missing pairs come back as zeros.
        let pairs = lanczos(n, 12, 3, &start, |v| Ok(vec![0.0; v.len()])).unwrap();
        assert_eq!(pairs.len(), 3 * (n + 1));
        assert!(pairs.iter().all(|value| value.is_finite()));
        assert_eq!(&pairs[..2], &[0.0, 0.0]);
    }

    #[test]
    fn small_solves_match_their_products() {
        let a = Matrix { rows: 4, columns: 4, data: random_values(16, 7) };
        let b = random_values(4, 8);
        for transpose in [false, true] {
            let x = solve_small(&a, &b, transpose).unwrap();
            let back = product(&a, transpose, &Matrix { rows: 4, columns: 1, data: x }, false);
            assert!(relative_error(&back.data, &b) < 1e-12);
        }
    }

    #[test]
    fn the_low_rank_preconditioner_is_q_transpose_q() {
        let (n, r) = (9, 2);
        let preconditioner = LowRankPreconditioner {
            u: Matrix { rows: n, columns: r, data: random_values(n * r, 20) },
            v: Matrix { rows: n, columns: r, data: random_values(n * r, 21) },
            d: random_values(n, 22).into_iter().map(|value| 1.0 + value.abs()).collect(),
        };
        // Q = (I + U V^T) diag(d), densely.
        let mut q = product(&preconditioner.u, false, &preconditioner.v, true);
        (0..n).for_each(|index| q.data[index * n + index] += 1.0);
        for row in 0..n {
            for column in 0..n {
                q.data[row * n + column] *= preconditioner.d[column];
            }
        }
        let g = random_values(n, 23);
        let dense =
            product(&product(&q, true, &q, false), false, &Matrix { rows: n, columns: 1, data: g.clone() }, false);
        assert!(relative_error(&preconditioner.precondition(&g), &dense.data) < 1e-12);
    }
}
