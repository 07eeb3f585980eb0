//! The `kronecker` structure (Shampoo, SOAP, K-FAC) and the `orthogonalize` structure (Muon):
//! their matrix functions and their per-parameter updates. The update equations are those of
//! `docs/language.md` §12.7 and §12.8, which name the reference each one follows.
//!
//! Shampoo, SOAP, K-FAC and Muon keep their state in the run's element type and do their per-step
//! products there ([`gemm`]: SGEMM for `f32` runs, DGEMM for `f64`). Shampoo's inverse roots are
//! computed in the run's element type too, as Distributed Shampoo computes them in its factor
//! dtype (an `f32` run decomposes in single precision and retries in double precision when that
//! fails), and so are SOAP's basis refreshes. The other matrix functions (SOAP's first bases,
//! K-FAC's inverses, Newton iterations) are computed in double precision through
//! [`crate::linalg`]. A parameter's state lives in named
//! tensors of the run's element type (checkpointed like every other state); factors of several
//! tiles are stored one after the other, row-major tile order.

use crate::linalg::{
    cholesky_inverse, symmetric_eigen, symmetric_eigen_single, thin_q_single, thin_qr, LinalgError, Matrix,
};
use crate::optimizer::{state_get, ParamState, PreviousState};
use curv_interp::{Real, Tensor};
use curv_ir::{option_name, option_number, OptionValue, Options, ParamPlan};

/// How many consecutive failed inverse roots are tolerated (the last good root is kept) before
/// the run stops, as Distributed Shampoo's `tolerated_failures`.
pub const TOLERATED_ROOT_FAILURES: f64 = 3.0;

/// The size from which a tile's two matrix functions (Shampoo's inverse roots, SOAP's basis
/// refreshes, K-FAC's inverses) are computed on two threads.
const PARALLEL_MATRIX_SIZE: usize = 64;

/// `(left(), right())`: the two matrix functions of a tile, which are independent, side by side
/// on two threads when both matrices have at least [`PARALLEL_MATRIX_SIZE`] rows (each
/// decomposition runs on one core), one after the other otherwise. The results do not depend on
/// which.
fn side_by_side<A: Send, B>(
    sizes: (usize, usize),
    left: impl FnOnce() -> A + Send,
    right: impl FnOnce() -> B,
) -> (A, B) {
    if sizes.0.min(sizes.1) < PARALLEL_MATRIX_SIZE {
        return (left(), right());
    }
    std::thread::scope(|scope| {
        let left = scope.spawn(left);
        let right = right();
        (left.join().unwrap_or_else(|payload| std::panic::resume_unwind(payload)), right)
    })
}

pub(crate) fn number(options: &Options, key: &str, default: f64) -> f64 {
    option_number(options, key).unwrap_or(default)
}

pub(crate) fn flag(options: &Options, key: &str, default: bool) -> bool {
    options.iter().find(|(name, _)| name == key).map_or(default, |(_, value)| *value == OptionValue::Bool(true))
}

thread_local! {
    /// Whether [`product`] rounds to single precision (see [`ProductPrecision`]).
    static SINGLE_PRECISION_PRODUCTS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The precision of the per-step matrix products while it lives: the run's precision, as the
/// references compute them (an `f32` run multiplies in single precision, with `matrixmultiply`'s
/// SGEMM; an `f64` run, as the oracle tests use, in double precision), for the functions that
/// hold their state as double-precision [`States`] (Shampoo, SOAP, K-FAC and Muon compute in the
/// run's element type directly, through [`gemm`]). The matrix functions (roots, inverses, bases)
/// always compute in double precision whatever this says.
pub struct ProductPrecision {
    previous: bool,
}

impl ProductPrecision {
    pub fn single(single: bool) -> ProductPrecision {
        ProductPrecision { previous: SINGLE_PRECISION_PRODUCTS.with(|flag| flag.replace(single)) }
    }
}

impl Drop for ProductPrecision {
    fn drop(&mut self) {
        SINGLE_PRECISION_PRODUCTS.with(|flag| flag.set(self.previous));
    }
}

/// `C = op(A) op(B)`, where `op` transposes when asked; `C` is `m x n`. In double precision, or
/// rounded to single precision inside a [`ProductPrecision::single`] scope.
pub(crate) fn product(a: &Matrix, transpose_a: bool, b: &Matrix, transpose_b: bool) -> Matrix {
    let (m, k) = if transpose_a { (a.columns, a.rows) } else { (a.rows, a.columns) };
    let n = if transpose_b { b.rows } else { b.columns };
    let (row_stride_a, column_stride_a) = if transpose_a { (1, a.columns as isize) } else { (a.columns as isize, 1) };
    let (row_stride_b, column_stride_b) = if transpose_b { (1, b.columns as isize) } else { (b.columns as isize, 1) };
    if SINGLE_PRECISION_PRODUCTS.with(|flag| flag.get()) && m > 0 && n > 0 && k > 0 {
        let a_single: Vec<f32> = a.data.iter().map(|value| *value as f32).collect();
        let b_single: Vec<f32> = b.data.iter().map(|value| *value as f32).collect();
        let mut c_single = vec![0.0f32; m * n];
        // SAFETY: as below, for the single-precision copies.
        unsafe {
            matrixmultiply::sgemm(
                m,
                k,
                n,
                1.0,
                a_single.as_ptr(),
                row_stride_a,
                column_stride_a,
                b_single.as_ptr(),
                row_stride_b,
                column_stride_b,
                0.0,
                c_single.as_mut_ptr(),
                n as isize,
                1,
            );
        }
        return Matrix { rows: m, columns: n, data: c_single.into_iter().map(f64::from).collect() };
    }
    let mut data = vec![0.0; m * n];
    if m > 0 && n > 0 && k > 0 {
        // SAFETY: the strides describe the row-major buffers of `a`, `b` and `data` (sizes checked
        // by construction of `Matrix`), and `data` does not alias the inputs.
        unsafe {
            matrixmultiply::dgemm(
                m,
                k,
                n,
                1.0,
                a.data.as_ptr(),
                row_stride_a,
                column_stride_a,
                b.data.as_ptr(),
                row_stride_b,
                column_stride_b,
                0.0,
                data.as_mut_ptr(),
                n as isize,
                1,
            );
        }
    }
    Matrix { rows: m, columns: n, data }
}

pub(crate) fn identity(size: usize) -> Matrix {
    let mut data = vec![0.0; size * size];
    for index in 0..size {
        data[index * size + index] = 1.0;
    }
    Matrix { rows: size, columns: size, data }
}

pub(crate) fn add_to_diagonal(matrix: &Matrix, value: f64) -> Matrix {
    let mut result = matrix.clone();
    for index in 0..matrix.rows.min(matrix.columns) {
        result.data[index * matrix.columns + index] += value;
    }
    result
}

pub(crate) fn frobenius(values: &[f64]) -> f64 {
    values.iter().map(|value| value * value).sum::<f64>().sqrt()
}

pub(crate) fn trace(matrix: &Matrix) -> f64 {
    (0..matrix.rows.min(matrix.columns)).map(|index| matrix.at(index, index)).sum()
}

/// `Q diag(f(lambda)) Q^T` from an eigendecomposition.
pub(crate) fn from_eigen(values: &[f64], vectors: &Matrix, function: impl Fn(f64) -> f64) -> Matrix {
    let n = vectors.rows;
    let mut scaled = vectors.clone();
    let factors: Vec<f64> = values.iter().map(|value| function(*value)).collect();
    for row in scaled.data.chunks_mut(n.max(1)) {
        row.iter_mut().zip(&factors).for_each(|(value, factor)| *value *= factor);
    }
    product(&scaled, false, vectors, true)
}

/// Distributed Shampoo's inverse root: `eigh(A + eps I) = Q diag(lambda) Q^T`, eigenvalues below
/// `eps` shifted up by `eps - min lambda`, and `Q diag(lambda^(-1/root)) Q^T`.
pub fn inverse_root(matrix: &Matrix, root: f64, eps: f64) -> Result<Matrix, LinalgError> {
    let _double = ProductPrecision::single(false);
    let (mut values, vectors) = symmetric_eigen(&add_to_diagonal(matrix, eps))?;
    let smallest = values.iter().copied().fold(f64::INFINITY, f64::min);
    if smallest < eps {
        values.iter_mut().for_each(|value| *value += eps - smallest);
    }
    let result = from_eigen(&values, &vectors, |value| value.powf(-1.0 / root));
    if result.data.iter().all(|value| value.is_finite()) {
        Ok(result)
    } else {
        Err(LinalgError::NonFinite)
    }
}

/// The slice as `f32` values when `T` is `f32`.
fn as_single<T: Real>(values: &[T]) -> Option<&[f32]> {
    // SAFETY: `T` is `f32` when the branch is taken, so the cast is the identity.
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>())
        .then(|| unsafe { std::slice::from_raw_parts(values.as_ptr() as *const f32, values.len()) })
}

/// [`inverse_root`] of `scale * F`, `F` being the `size x size` factor at the start of `factor`,
/// in the run's element type `T`, as Distributed Shampoo computes roots in its factor dtype with
/// `retry_double_precision`: in an `f32` run the eigendecomposition, the eigenvalue shift, the
/// powers and `Q diag(lambda^(-1/root)) Q^T` are single precision, and a decomposition that
/// fails or a root that is not finite is computed again in double precision; an `f64` run
/// computes in double precision.
pub fn inverse_root_in<T: Real>(
    factor: &[T],
    size: usize,
    scale: f64,
    root: f64,
    eps: f64,
) -> Result<Vec<T>, LinalgError> {
    if let Some(single) = as_single(factor) {
        if let Some(result) = inverse_root_single(&single[..size * size], size, scale as f32, root, eps as f32) {
            return Ok(result.into_iter().map(|value| T::from_f64(f64::from(value))).collect());
        }
    }
    let result = inverse_root(&square(factor, size, scale), root, eps)?;
    Ok(result.data.iter().map(|value| T::from_f64(*value)).collect())
}

/// [`inverse_root`] in single precision; `None` when the decomposition fails or the root is not
/// finite.
fn inverse_root_single(factor: &[f32], size: usize, scale: f32, root: f64, eps: f32) -> Option<Vec<f32>> {
    let mut matrix: Vec<f32> = factor.iter().map(|value| value * scale).collect();
    for index in 0..size {
        matrix[index * size + index] += eps;
    }
    let (mut values, vectors) = symmetric_eigen_single(&matrix, size).ok()?;
    let smallest = values.iter().copied().fold(f32::INFINITY, f32::min);
    if smallest < eps {
        values.iter_mut().for_each(|value| *value += eps - smallest);
    }
    let exponent = (-1.0 / root) as f32;
    let powers: Vec<f32> = values.iter().map(|value| value.powf(exponent)).collect();
    let mut scaled = vectors.clone();
    for row in scaled.chunks_mut(size.max(1)) {
        row.iter_mut().zip(&powers).for_each(|(value, power)| *value *= power);
    }
    let mut result = vec![0.0f32; size * size];
    gemm((size, size, size), 1.0, (&scaled, (size, 1)), (&vectors, (1, size)), 0.0, &mut result, size);
    result.iter().all(|value| value.is_finite()).then_some(result)
}

/// The iteration limit and the tolerance on `max |M - I|` of the coupled Newton iteration
/// (Distributed Shampoo's `CoupledNewtonConfig` defaults).
pub const NEWTON_MAX_ITERATIONS: usize = 100;
pub const NEWTON_TOLERANCE: f64 = 1e-6;

/// `(A + eps I)^(-1/root)` by the coupled Newton iteration (Distributed Shampoo's
/// `_matrix_inverse_root_newton`, after Guo and Higham): with `p = root`,
/// `z = (1 + p) / (2 |A + eps I|_F)`, `X = z^(1/p) I`, `M = z (A + eps I)`, and while
/// `max |M - I| > 1e-6` (at most 100 times) `T = ((p + 1) I - M) / p`, `X <- X T`, `M <- T^p M`.
/// Needs no eigendecomposition, only products. After 100 iterations the last iterate is used,
/// as Distributed Shampoo does; non-finite values are an error.
pub fn inverse_root_newton(matrix: &Matrix, root: f64, eps: f64) -> Result<Matrix, LinalgError> {
    let _double = ProductPrecision::single(false);
    if matrix.rows != matrix.columns {
        return Err(LinalgError::BadShape(format!("a {}x{} matrix has no inverse root", matrix.rows, matrix.columns)));
    }
    if matrix.data.iter().any(|value| !value.is_finite()) {
        return Err(LinalgError::NonFinite);
    }
    let power = root.round().max(1.0) as u32;
    let p = power as f64;
    let n = matrix.rows;
    let ridged = add_to_diagonal(matrix, eps);
    let norm = frobenius(&ridged.data);
    if norm == 0.0 {
        return Err(LinalgError::NotPositiveDefinite);
    }
    let z = (1.0 + p) / (2.0 * norm);
    let mut x = identity(n);
    x.data.iter_mut().for_each(|value| *value *= z.powf(1.0 / p));
    let mut m = ridged.clone();
    m.data.iter_mut().for_each(|value| *value *= z);
    let distance = |m: &Matrix| {
        (0..n * n).map(|index| (m.data[index] - if index % (n + 1) == 0 { 1.0 } else { 0.0 }).abs()).fold(0.0, f64::max)
    };
    let mut iterations = 0;
    while distance(&m) > NEWTON_TOLERANCE {
        if !m.data.iter().all(|value| value.is_finite()) {
            return Err(LinalgError::NoConvergence);
        }
        if iterations == NEWTON_MAX_ITERATIONS {
            // As Distributed Shampoo: the last iterate is used (it only warns).
            break;
        }
        let mut t = m.clone();
        for (index, value) in t.data.iter_mut().enumerate() {
            let diagonal = if index % (n + 1) == 0 { p + 1.0 } else { 0.0 };
            *value = (diagonal - *value) / p;
        }
        x = product(&x, false, &t, false);
        let mut t_power = t.clone();
        for _ in 1..power {
            t_power = product(&t_power, false, &t, false);
        }
        m = product(&t_power, false, &m, false);
        iterations += 1;
    }
    Ok(x)
}

/// `(A + damping I)^-1` for a symmetric positive semi-definite `A`, by Cholesky (faer's inverse
/// from the factor), or by the symmetric eigendecomposition (eigenvalues clamped at zero) when
/// the Cholesky factorisation fails.
pub fn damped_inverse(matrix: &Matrix, damping: f64) -> Result<Matrix, LinalgError> {
    let _double = ProductPrecision::single(false);
    let damped = add_to_diagonal(matrix, damping);
    let result = match cholesky_inverse(&damped) {
        Ok(inverse) => inverse,
        Err(LinalgError::NotPositiveDefinite) => {
            let (values, vectors) = symmetric_eigen(matrix)?;
            from_eigen(&values, &vectors, |value| 1.0 / (value.max(0.0) + damping))
        }
        Err(error) => return Err(error),
    };
    if result.data.iter().all(|value| value.is_finite()) {
        Ok(result)
    } else {
        Err(LinalgError::NonFinite)
    }
}

/// Muon's orthogonalisation: `X = U / (|U|_F + 1e-7)` (transposed when it has more rows than
/// columns) iterated `steps` times through `A = X X^T`, `X <- a X + (b A + c A A) X`.
pub fn newton_schulz(matrix: &Matrix, steps: usize, coefficients: (f64, f64, f64)) -> Matrix {
    let data = newton_schulz_in(&matrix.data, (matrix.rows, matrix.columns), steps, coefficients);
    Matrix { rows: matrix.rows, columns: matrix.columns, data }
}

/// [`newton_schulz`] on a row-major `rows x columns` matrix in the element type `T` (the products
/// as SGEMM or DGEMM): per iteration `G = X X^T`, `P = b G + c G G` (a GEMM accumulating into a
/// copy of `G`) and `X <- a X + P X` (a GEMM accumulating into a copy of `X`).
pub fn newton_schulz_in<T: Real>(
    matrix: &[T],
    (rows, columns): (usize, usize),
    steps: usize,
    (a, b, c): (f64, f64, f64),
) -> Vec<T> {
    // Work on the wide orientation (`X` with no more rows than columns).
    let transposed = rows > columns;
    let (rows, columns) = if transposed { (columns, rows) } else { (rows, columns) };
    let mut x: Vec<T> = if transposed {
        (0..rows).flat_map(|row| (0..columns).map(move |column| matrix[column * rows + row])).collect()
    } else {
        matrix.to_vec()
    };
    let norm = x.iter().map(|value| value.to_f64() * value.to_f64()).sum::<f64>().sqrt() + 1e-7;
    let scale = T::from_f64(1.0 / norm);
    x.iter_mut().for_each(|value| *value = value.mul(scale));
    let mut gram = vec![T::zero(); rows * rows];
    let mut polynomial = vec![T::zero(); rows * rows];
    let mut next = vec![T::zero(); rows * columns];
    for _ in 0..steps {
        gemm((rows, columns, rows), 1.0, (&x, (columns, 1)), (&x, (1, columns)), 0.0, &mut gram, rows);
        polynomial.copy_from_slice(&gram);
        gemm((rows, rows, rows), c, (&gram, (rows, 1)), (&gram, (rows, 1)), b, &mut polynomial, rows);
        next.copy_from_slice(&x);
        gemm((rows, rows, columns), 1.0, (&polynomial, (rows, 1)), (&x, (columns, 1)), a, &mut next, columns);
        std::mem::swap(&mut x, &mut next);
    }
    if transposed {
        (0..columns).flat_map(|row| (0..rows).map(|column| x[column * columns + row]).collect::<Vec<T>>()).collect()
    } else {
        x
    }
}

pub(crate) fn transpose(matrix: &Matrix) -> Matrix {
    let mut data = Vec::with_capacity(matrix.data.len());
    for column in 0..matrix.columns {
        for row in 0..matrix.rows {
            data.push(matrix.at(row, column));
        }
    }
    Matrix { rows: matrix.columns, columns: matrix.rows, data }
}

/// The matrix view of a parameter: a matrix as it is, a higher-rank tensor as
/// `[first dim, product of the others]` (a conv kernel `[O, C, kH, kW]` is `[O, C kH kW]`, the view
/// of kfac-pytorch, Distributed Shampoo's reshaped blocks and Muon), a vector as one row.
pub fn matrix_shape(shape: &[usize]) -> (usize, usize) {
    match shape {
        [] => (1, 1),
        [length] => (1, *length),
        [rows, columns] => (*rows, *columns),
        [first, rest @ ..] => (*first, rest.iter().product()),
    }
}

/// One tile of a blocked matrix: its first row and column and its size.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Tile {
    pub(crate) row: usize,
    pub(crate) rows: usize,
    pub(crate) column: usize,
    pub(crate) columns: usize,
    /// Offsets of the tile's left and right factors in the concatenated factor states.
    pub(crate) left_offset: usize,
    pub(crate) right_offset: usize,
}

pub(crate) fn tiles(rows: usize, columns: usize, block: usize) -> Vec<Tile> {
    let block = block.max(1);
    let (mut left_offset, mut right_offset) = (0, 0);
    let mut result = Vec::new();
    for row in (0..rows).step_by(block) {
        for column in (0..columns).step_by(block) {
            let tile = Tile {
                row,
                rows: (rows - row).min(block),
                column,
                columns: (columns - column).min(block),
                left_offset,
                right_offset,
            };
            left_offset += tile.rows * tile.rows;
            right_offset += tile.columns * tile.columns;
            result.push(tile);
        }
    }
    result
}

impl Tile {
    pub(crate) fn extract(&self, values: &[f64], columns: usize) -> Matrix {
        let mut data = Vec::with_capacity(self.rows * self.columns);
        for row in self.row..self.row + self.rows {
            data.extend_from_slice(&values[row * columns + self.column..row * columns + self.column + self.columns]);
        }
        Matrix { rows: self.rows, columns: self.columns, data }
    }

    pub(crate) fn insert(&self, tile: &Matrix, values: &mut [f64], columns: usize) {
        for row in 0..self.rows {
            let start = (self.row + row) * columns + self.column;
            values[start..start + self.columns]
                .copy_from_slice(&tile.data[row * self.columns..(row + 1) * self.columns]);
        }
    }
}

/// A parameter's states as double-precision vectors while one update runs.
pub(crate) struct States {
    pub(crate) values: Vec<(String, Vec<f64>, Vec<usize>)>,
}

impl States {
    pub(crate) fn load<T: Real>(state: &ParamState<T>) -> States {
        States {
            values: state
                .iter()
                .map(|(name, tensor)| {
                    (name.clone(), tensor.data.iter().map(|value| value.to_f64()).collect(), tensor.shape.clone())
                })
                .collect(),
        }
    }

    /// The state `name`, created with `size` zeros (and `shape`) when missing.
    pub(crate) fn get(&mut self, name: &str, shape: &[usize]) -> &mut Vec<f64> {
        let position = match self.values.iter().position(|(key, _, _)| key == name) {
            Some(position) => position,
            None => {
                let size = shape.iter().product::<usize>();
                self.values.push((name.to_string(), vec![0.0; size], shape.to_vec()));
                self.values.len() - 1
            }
        };
        &mut self.values[position].1
    }

    pub(crate) fn scalar(&mut self, name: &str) -> f64 {
        self.get(name, &[])[0]
    }

    pub(crate) fn set_scalar(&mut self, name: &str, value: f64) {
        self.get(name, &[])[0] = value;
    }

    /// Replaces the parameter's state with these values and returns the state it had (moved out,
    /// not copied: what a caller that may undo the step keeps).
    pub(crate) fn store<T: Real>(self, state: &mut ParamState<T>) -> ParamState<T> {
        let previous = std::mem::take(state);
        for (name, values, shape) in self.values {
            state.push((name, Tensor::new(shape, values.into_iter().map(T::from_f64).collect())));
        }
        previous
    }
}

/// What the backward pass captured for a K-FAC parameter `W` used as `x @ W`, in double
/// precision: the layer inputs `x` as `[N, in]` (with a column of ones appended when the layer's
/// bias is folded into `W`) and the per-example output cotangents `d = N g` as `[N, out]`, where
/// `g` is the cotangent with respect to the mean training loss. Several products of the same
/// parameter are stacked row-wise.
///
/// For a convolution kernel `[O, C, kH, kW]` the inputs are the input's patches (`[N S, C kH kW]`,
/// divided by the number `S` of output positions) and the cotangents one row per example and
/// position (`[N S, O]`, `N g / S`), and `inputs_are_columns` is set: in the kernel's matrix view
/// `[O, C kH kW]` the inputs' factor is the right one.
#[derive(Debug, Clone, PartialEq)]
pub struct Captures {
    pub inputs: Matrix,
    pub cotangents: Matrix,
    pub inputs_are_columns: bool,
}

impl Captures {
    /// `(x^T x / N, d^T d / N)`: K-FAC's fresh factor statistics.
    pub fn covariances(&self) -> (Matrix, Matrix) {
        let scale = 1.0 / self.inputs.rows.max(1) as f64;
        let mut a = product(&self.inputs, true, &self.inputs, false);
        let mut g = product(&self.cotangents, true, &self.cotangents, false);
        a.data.iter_mut().chain(g.data.iter_mut()).for_each(|value| *value *= scale);
        (a, g)
    }
}

/// Everything one `kronecker` or `orthogonalize` update reads besides the parameter and its state.
pub struct KroneckerInputs<'a> {
    pub step: u64,
    pub learning_rate: f64,
    pub gradient: &'a [f64],
    /// K-FAC's captures, at the steps that refresh the factors (`every`).
    pub captures: Option<&'a Captures>,
    /// The run's seed and the parameter's index, for estimators that draw noise
    /// (`Random::new(seed, Stream::Preconditioner, step * 65_536 + param)`).
    pub seed: u64,
    pub param: usize,
}

/// Whether this update only initialises its state and leaves the parameter where it is (SOAP's
/// first step), so that modifiers must not move it either.
pub fn leaves_parameter_unchanged<T>(plan: &ParamPlan, state: &ParamState<T>) -> bool {
    plan.structure == curv_ir::StructureKind::Kronecker
        && option_name(&plan.options, "function") == Some("eigenbasis")
        && state_get(state, "left_basis").is_none()
}

/// One step of the `kronecker` structure: returns the direction (the step is `-lr * direction`).
///
/// The state the parameter had before is left in `previous`.
pub fn kronecker_direction<T: Real>(
    plan: &ParamPlan,
    shape: &[usize],
    state: &mut ParamState<T>,
    inputs: &KroneckerInputs,
    previous: &mut Option<PreviousState<T>>,
) -> Result<Option<Vec<f64>>, String> {
    let function = option_name(&plan.options, "function").unwrap_or("inverse_root");
    let quantized = number(&plan.options, "quantize", 32.0) < 32.0;
    let every = number(&plan.options, "every", 1.0).max(1.0) as u64;
    // Shampoo, SOAP and K-FAC work on their state where it is, in the run's precision. The matrix
    // functions' results change only at their refresh steps, so only then are they copied for
    // undoing.
    let refreshed = |names: &'static [&'static str], refresh: bool| move |name: &str| refresh || !names.contains(&name);
    if matches!(function, "inverse_root" | "newton") && !quantized {
        let changes = refreshed(&["left_inverse", "right_inverse", "failures"], inputs.step.is_multiple_of(every));
        return undoable(state, previous, changes, |state| shampoo(plan, shape, state, inputs));
    }
    if function == "eigenbasis" {
        // SOAP counts its own steps (`soap_step`), and refreshes at its first step.
        let step = state_get(state, "soap_step").and_then(|tensor| tensor.data.first()).map(|value| value.to_f64());
        let refresh = step.is_none_or(|step| (step as u64 + 1).is_multiple_of(every));
        let changes = refreshed(&["left_basis", "right_basis"], refresh);
        return undoable(state, previous, changes, |state| soap(plan, shape, state, inputs));
    }
    if matches!(function, "damped_inverse" | "damped_eigen") {
        // K-FAC's factors and inverses change at the steps that bring captures.
        let names = &["left_factor", "right_factor", "left_inverse", "right_inverse", "left_values", "right_values"];
        let changes = refreshed(names, inputs.captures.is_some());
        return undoable(state, previous, changes, |state| {
            kfac(plan, shape, state, inputs, function == "damped_eigen")
        });
    }
    let mut states = States::load(state);
    let direction = match function {
        "inverse_root" | "newton" if quantized => crate::shampoo4bit::direction(plan, shape, &mut states, inputs)?,
        "lie_group" => crate::psgd::direction(plan, shape, &mut states, inputs)?,
        "sherman_morrison" | "adafisher" if inputs.captures.is_some_and(|captures| captures.inputs_are_columns) => {
            return Err(format!("`function = {function}` does not support conv2d kernels yet (only `x @ W` products)"))
        }
        "sherman_morrison" => crate::mkor::direction(plan, shape, &mut states, inputs)?,
        "adafisher" => crate::adafisher::direction(plan, shape, &mut states, inputs)?,
        "singd" => crate::singd::direction(plan, shape, &mut states, inputs)?,
        other => return Err(format!("the `{other}` matrix function is not executable yet")),
    };
    *previous = Some(PreviousState::whole(states.store(state)));
    Ok(direction)
}

/// `C = alpha op(A) op(B) + beta C` in the element type `T` (SGEMM for `f32`, DGEMM for `f64`),
/// on row-major slices: `op(A)` is `m x k` with strides `a_strides` (row, column) into `a`,
/// `op(B)` is `k x n` with `b_strides`, and `C` is `m x n` with row stride `c_row_stride`. A
/// transposed operand is the same slice with its strides swapped.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm<T: Real>(
    (m, k, n): (usize, usize, usize),
    alpha: f64,
    (a, a_strides): (&[T], (usize, usize)),
    (b, b_strides): (&[T], (usize, usize)),
    beta: f64,
    c: &mut [T],
    c_row_stride: usize,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rows: usize, columns: usize, (row_stride, column_stride): (usize, usize)| {
        (rows.max(1) - 1) * row_stride + (columns.max(1) - 1) * column_stride
    };
    assert!(
        k == 0
            || (last(m, k, a_strides) < a.len()
                && last(k, n, b_strides) < b.len()
                && last(m, n, (c_row_stride, 1)) < c.len()),
        "gemm: an operand is smaller than its shape and strides"
    );
    if k == 0 {
        for row in 0..m {
            c[row * c_row_stride..row * c_row_stride + n].iter_mut().for_each(|value| {
                *value = T::from_f64(beta * value.to_f64());
            });
        }
        return;
    }
    let stride = |value: usize| value as isize;
    let any = std::any::TypeId::of::<T>();
    // SAFETY: `T` is the type the branch names (so the casts are the identity), and the bounds
    // were checked above against the slices, which do not alias (`c` is borrowed mutably).
    unsafe {
        if any == std::any::TypeId::of::<f32>() {
            matrixmultiply::sgemm(
                m,
                k,
                n,
                alpha as f32,
                a.as_ptr() as *const f32,
                stride(a_strides.0),
                stride(a_strides.1),
                b.as_ptr() as *const f32,
                stride(b_strides.0),
                stride(b_strides.1),
                beta as f32,
                c.as_mut_ptr() as *mut f32,
                stride(c_row_stride),
                1,
            );
            return;
        }
        if any == std::any::TypeId::of::<f64>() {
            matrixmultiply::dgemm(
                m,
                k,
                n,
                alpha,
                a.as_ptr() as *const f64,
                stride(a_strides.0),
                stride(a_strides.1),
                b.as_ptr() as *const f64,
                stride(b_strides.0),
                stride(b_strides.1),
                beta,
                c.as_mut_ptr() as *mut f64,
                stride(c_row_stride),
                1,
            );
            return;
        }
    }
    for row in 0..m {
        for column in 0..n {
            let sum: f64 = (0..k)
                .map(|inner| {
                    a[row * a_strides.0 + inner * a_strides.1].to_f64()
                        * b[inner * b_strides.0 + column * b_strides.1].to_f64()
                })
                .sum();
            let slot = &mut c[row * c_row_stride + column];
            *slot = T::from_f64(alpha * sum + if beta == 0.0 { 0.0 } else { beta * slot.to_f64() });
        }
    }
}

/// The factors of each tile take the gradient (in `T`): `L <- decay L + weight G G^T` and
/// `R <- decay R + weight G^T G`, by GEMMs that accumulate into the states (the running sum with
/// `ema >= 1`, else the exponential average).
fn accumulate_factors<T: Real>(
    tiles: &[Tile],
    gradient: &[T],
    columns: usize,
    (left, right): (&mut [T], &mut [T]),
    ema: f64,
) {
    let (decay, weight) = if ema >= 1.0 { (1.0, 1.0) } else { (ema, 1.0 - ema) };
    for tile in tiles {
        let g = &gradient[tile.row * columns + tile.column..];
        gemm(
            (tile.rows, tile.columns, tile.rows),
            weight,
            (g, (columns, 1)),
            (g, (1, columns)),
            decay,
            &mut left[tile.left_offset..tile.left_offset + tile.rows * tile.rows],
            tile.rows,
        );
        gemm(
            (tile.columns, tile.rows, tile.columns),
            weight,
            (g, (1, columns)),
            (g, (columns, 1)),
            decay,
            &mut right[tile.right_offset..tile.right_offset + tile.columns * tile.columns],
            tile.columns,
        );
    }
}

/// `op(L) X op(R)` for a `rows x columns` matrix `X` (row stride `x_row_stride`), `L` being
/// `rows x rows` and `R` `columns x columns` at the starts of their slices (transposed when
/// their flags say so), into `out` (`rows x columns`, contiguous); `half` is scratch.
fn two_sided<T: Real>(
    (rows, columns): (usize, usize),
    (left, transpose_left): (&[T], bool),
    (x, x_row_stride): (&[T], usize),
    (right, transpose_right): (&[T], bool),
    half: &mut Vec<T>,
    out: &mut Vec<T>,
) {
    half.clear();
    half.resize(rows * columns, T::zero());
    out.clear();
    out.resize(rows * columns, T::zero());
    let left_strides = if transpose_left { (1, rows) } else { (rows, 1) };
    let right_strides = if transpose_right { (1, columns) } else { (columns, 1) };
    gemm((rows, rows, columns), 1.0, (left, left_strides), (x, (x_row_stride, 1)), 0.0, half, columns);
    gemm((rows, columns, columns), 1.0, (half, (columns, 1)), (right, right_strides), 0.0, out, columns);
}

/// The `size x size` matrix at the start of `values`, times `scale`, in double precision.
pub(crate) fn square<T: Real>(values: &[T], size: usize, scale: f64) -> Matrix {
    Matrix {
        rows: size,
        columns: size,
        data: values[..size * size].iter().map(|value| value.to_f64() * scale).collect(),
    }
}

/// Writes a double-precision matrix at the start of `values`, rounded to `T`.
fn store<T: Real>(matrix: &Matrix, values: &mut [T]) {
    for (slot, value) in values.iter_mut().zip(&matrix.data) {
        *slot = T::from_f64(*value);
    }
}

/// Runs `update` on the parameter's state where it is, leaving the state as it was in
/// `previous` (for undoing the step) and putting it back if the update fails. Only the entries
/// for which `changes` holds are copied: `update` must leave the others as they are.
pub(crate) fn undoable<T: Real, R>(
    state: &mut ParamState<T>,
    previous: &mut Option<PreviousState<T>>,
    changes: impl Fn(&str) -> bool,
    update: impl FnOnce(&mut ParamState<T>) -> Result<R, String>,
) -> Result<R, String> {
    *previous = Some(PreviousState(
        state.iter().map(|(name, tensor)| (name.clone(), changes(name).then(|| tensor.clone()))).collect(),
    ));
    update(state).inspect_err(|_| {
        if let Some(old) = previous.take() {
            old.restore(state);
        }
    })
}

/// The state `name` of a parameter as a vector, taken out of the state (zeros of `shape` when it
/// does not exist yet; put it back with [`put_state`]).
fn take_state<T: Real>(state: &mut ParamState<T>, name: &str, shape: &[usize]) -> Vec<T> {
    match state.iter_mut().find(|(key, _)| key == name) {
        Some((_, tensor)) => std::mem::take(&mut tensor.data),
        None => {
            // A placeholder whose data is the returned vector, put back by `put_state`.
            state.push((name.to_string(), Tensor { shape: shape.to_vec(), data: Vec::new() }));
            vec![T::zero(); shape.iter().product()]
        }
    }
}

fn put_state<T: Real>(state: &mut ParamState<T>, name: &str, data: Vec<T>) {
    if let Some((_, tensor)) = state.iter_mut().find(|(key, _)| key == name) {
        tensor.data = data;
    }
}

/// The inverse `root`-th root of the `size x size` factor at the start of `values` times `scale`,
/// with `eps` added before the root: by [`inverse_root_in`] in the run's element type, or by
/// [`inverse_root_newton`] in double precision with `newton`.
pub(crate) fn shampoo_root<T: Real>(
    values: &[T],
    size: usize,
    scale: f64,
    (root, eps): (f64, f64),
    newton: bool,
) -> Result<Vec<T>, LinalgError> {
    if newton {
        let inverse = inverse_root_newton(&square(values, size, scale), root, eps)?;
        Ok(inverse.data.iter().map(|value| T::from_f64(*value)).collect())
    } else {
        inverse_root_in(values, size, scale, root, eps)
    }
}

/// The count of Shampoo's failed roots in a row after a refresh at `step` (`previous` before it;
/// `failed`, this refresh's error): zero after a success. `Err` holds the count too, and the
/// message that stops the run, once more than [`TOLERATED_ROOT_FAILURES`] failed in a row.
pub(crate) fn root_failures(previous: f64, failed: Option<LinalgError>, step: u64) -> Result<f64, (f64, String)> {
    let Some(error) = failed else { return Ok(0.0) };
    let count = previous + 1.0;
    if count > TOLERATED_ROOT_FAILURES {
        return Err((
            count,
            format!(
                "the inverse root of a Shampoo factor failed {count} times in a row (step {step}: {error}); a \
                 larger `eps` may help"
            ),
        ));
    }
    Ok(count)
}

/// Shampoo with Distributed Shampoo's numerics: the gradient filtered by `b1` (bias-corrected),
/// factors `L = sum G G^T` and `R = sum G^T G` (EMA with `ema < 1`, per tile of at most `block`
/// rows and columns), their inverse `root`-th roots recomputed every `every` steps (by
/// [`inverse_root`], or [`inverse_root_newton`] with `function = newton`; up to
/// `TOLERATED_ROOT_FAILURES` failures in a row keep the last good roots), the direction
/// `L^(-1/p) G R^(-1/p)` from step `start` on, scaled per tile to the norm of the grafting
/// direction (Adam, AdaGrad or SGD) when there is one, and the grafting direction before.
///
/// It works on the parameter's state where it is ([`undoable`]), in the run's element type: the
/// filtered gradient, the grafting moments, the factors and their roots stay in `T` (as
/// Distributed Shampoo keeps them in its factor dtype), the factors are updated by GEMMs that
/// accumulate into the state, and the preconditioned gradient is two GEMMs; the roots are
/// computed at their refresh steps by [`inverse_root_in`] (or in double precision by
/// [`inverse_root_newton`]).
fn shampoo<T: Real>(
    plan: &ParamPlan,
    shape: &[usize],
    state: &mut ParamState<T>,
    inputs: &KroneckerInputs,
) -> Result<Option<Vec<f64>>, String> {
    let options = &plan.options;
    let ema = number(options, "ema", 0.95);
    let eps = number(options, "eps", 1e-12);
    let root = number(options, "root", 4.0);
    let newton = option_name(options, "function") == Some("newton");
    let every = number(options, "every", 1.0).max(1.0) as u64;
    let start = number(options, "start", every as f64) as u64;
    let b1 = number(options, "b1", 0.9);
    let block = number(options, "block", 1024.0) as usize;
    let step = inputs.step;
    let (rows, columns) = matrix_shape(shape);
    let tiles = tiles(rows, columns, block);
    let left_size = tiles.iter().map(|tile| tile.rows * tile.rows).sum::<usize>();
    let right_size = tiles.iter().map(|tile| tile.columns * tile.columns).sum::<usize>();
    let gradient: Vec<T> = inputs.gradient.iter().map(|value| T::from_f64(*value)).collect();
    // The filtered gradient.
    let filtered: Vec<T> = if b1 > 0.0 {
        let mut m = take_state(state, "m", shape);
        let (keep, take) = (T::from_f64(b1), T::from_f64(1.0 - b1));
        for (value, g) in m.iter_mut().zip(&gradient) {
            *value = keep.mul(*value).add(take.mul(*g));
        }
        let correction = T::from_f64(1.0 / (1.0 - b1.powf(step as f64)));
        let filtered = m.iter().map(|value| value.mul(correction)).collect();
        put_state(state, "m", m);
        filtered
    } else {
        gradient.clone()
    };
    // The grafting direction, for the whole parameter, in the run's precision (as Distributed
    // Shampoo's grafting in the parameter's dtype).
    let graft = plan.modifiers.iter().find(|modifier| modifier.name == "graft");
    let grafted: Option<Vec<T>> = match graft {
        None => None,
        Some(modifier) => {
            let kind = option_name(&modifier.options, "kind").unwrap_or("adam");
            let b2 = number(&modifier.options, "b2", 0.999);
            let graft_eps = T::from_f64(number(&modifier.options, "eps", 1e-8));
            Some(match kind {
                "sgd" => filtered.clone(),
                _ => {
                    let mut v = take_state(state, "graft_v", shape);
                    let (keep, take) = (T::from_f64(b2), T::from_f64(1.0 - b2));
                    for (value, g) in v.iter_mut().zip(&gradient) {
                        *value = match kind {
                            "adagrad" => value.add(g.mul(*g)),
                            _ => keep.mul(*value).add(take.mul(g.mul(*g))),
                        };
                    }
                    let correction = T::from_f64(if kind == "adam" { 1.0 - b2.powf(step as f64) } else { 1.0 });
                    let grafted =
                        filtered.iter().zip(&v).map(|(g, v)| g.div(v.div(correction).sqrt().add(graft_eps))).collect();
                    put_state(state, "graft_v", v);
                    grafted
                }
            })
        }
    };
    // The factors take the current gradient.
    let mut left = take_state(state, "left_factor", &[left_size]);
    let mut right = take_state(state, "right_factor", &[right_size]);
    accumulate_factors(&tiles, &gradient, columns, (&mut left, &mut right), ema);
    let mut left_inverse = take_state(state, "left_inverse", &[left_size]);
    let mut right_inverse = take_state(state, "right_inverse", &[right_size]);
    if step.is_multiple_of(every) {
        let correction = if ema < 1.0 { 1.0 - ema.powf(step as f64) } else { 1.0 };
        let function = |values: &[T], size: usize| shampoo_root(values, size, 1.0 / correction, (root, eps), newton);
        let mut failed = None;
        for tile in &tiles {
            let (left, right) = (&left[tile.left_offset..], &right[tile.right_offset..]);
            let (l, r) =
                side_by_side((tile.rows, tile.columns), || function(left, tile.rows), || function(right, tile.columns));
            match (l, r) {
                (Ok(l_root), Ok(r_root)) => {
                    left_inverse[tile.left_offset..tile.left_offset + l_root.len()].copy_from_slice(&l_root);
                    right_inverse[tile.right_offset..tile.right_offset + r_root.len()].copy_from_slice(&r_root);
                }
                (Err(error), _) | (_, Err(error)) => failed = Some(error),
            }
        }
        let mut failures = take_state(state, "failures", &[]);
        let count = root_failures(failures[0].to_f64(), failed, step);
        failures[0] = T::from_f64(*count.as_ref().unwrap_or_else(|(count, _)| count));
        put_state(state, "failures", failures);
        count.map_err(|(_, message)| message)?;
    }
    let direction = if step < start {
        grafted.as_ref().unwrap_or(&filtered).iter().map(|value| value.to_f64()).collect()
    } else {
        let mut direction = vec![0.0; gradient.len()];
        let mut half = Vec::new();
        let mut preconditioned = Vec::new();
        for tile in &tiles {
            // L^(-1/p) G R^(-1/p), in T.
            two_sided(
                (tile.rows, tile.columns),
                (&left_inverse[tile.left_offset..], false),
                (&filtered[tile.row * columns + tile.column..], columns),
                (&right_inverse[tile.right_offset..], false),
                &mut half,
                &mut preconditioned,
            );
            let scale = match &grafted {
                Some(grafted) => {
                    let mut norm = 0.0;
                    for row in tile.row..tile.row + tile.rows {
                        let start = row * columns + tile.column;
                        norm += grafted[start..start + tile.columns]
                            .iter()
                            .map(|value| value.to_f64() * value.to_f64())
                            .sum::<f64>();
                    }
                    let own = preconditioned.iter().map(|value| value.to_f64() * value.to_f64()).sum::<f64>();
                    norm.sqrt() / (own.sqrt() + 1e-16)
                }
                None => 1.0,
            };
            for row in 0..tile.rows {
                let start = (tile.row + row) * columns + tile.column;
                for (slot, value) in direction[start..start + tile.columns]
                    .iter_mut()
                    .zip(&preconditioned[row * tile.columns..(row + 1) * tile.columns])
                {
                    *slot = value.to_f64() * scale;
                }
            }
        }
        direction
    };
    put_state(state, "left_factor", left);
    put_state(state, "right_factor", right);
    put_state(state, "left_inverse", left_inverse);
    put_state(state, "right_inverse", right_inverse);
    Ok(Some(direction))
}

/// The eigenvectors of a symmetric matrix, ordered by descending eigenvalue.
pub(crate) fn descending_eigenvectors(matrix: &Matrix) -> Result<Matrix, LinalgError> {
    let _double = ProductPrecision::single(false);
    let (_, vectors) = symmetric_eigen(matrix)?;
    let n = vectors.rows;
    let mut flipped = vectors.clone();
    for row in 0..n {
        for column in 0..n {
            flipped.data[row * n + column] = vectors.at(row, n - 1 - column);
        }
    }
    Ok(flipped)
}

/// One power iteration and QR for a SOAP basis: returns the new basis and the column order the
/// second moment must follow. The reference's estimates `diag(Q^T F Q)` are the column dot
/// products of `Q` and `F Q`, and its `F Q_sorted` is `F Q` with its columns in that order, so
/// one product serves both.
fn refresh_basis(factor: &Matrix, basis: &Matrix) -> Result<(Matrix, Vec<usize>), LinalgError> {
    let _double = ProductPrecision::single(false);
    let n = basis.rows;
    let applied = product(factor, false, basis, false);
    let (order, sorted) = sorted_by_estimates(&applied.data, &basis.data, n);
    let (q, _) = thin_qr(&Matrix { rows: n, columns: n, data: sorted })?;
    Ok((q, order))
}

/// The column order of `F Q` by descending estimate `diag(Q^T F Q)` (the column dot products of
/// `Q` and `F Q`, both `n x n` row-major), and `F Q` with its columns in that order.
fn sorted_by_estimates<T: Real>(applied: &[T], basis: &[T], n: usize) -> (Vec<usize>, Vec<T>) {
    let estimates: Vec<f64> = (0..n)
        .map(|column| (0..n).map(|row| basis[row * n + column].mul(applied[row * n + column]).to_f64()).sum())
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    // A stable sort, so that equal estimates keep their order (as torch.argsort on distinct values).
    order.sort_by(|&first, &second| estimates[second].total_cmp(&estimates[first]));
    let mut sorted = vec![T::zero(); n * n];
    for row in 0..n {
        for (column, &source) in order.iter().enumerate() {
            sorted[row * n + column] = applied[row * n + source];
        }
    }
    (order, sorted)
}

/// [`refresh_basis`] of the `size x size` factor and basis at the starts of `factor` and `basis`,
/// in the run's element type, as the SOAP reference computes its refresh in single precision for
/// single-precision parameters: in an `f32` run the product, the estimates and the QR are single
/// precision (falling back to double precision if that QR fails); an `f64` run computes in double
/// precision. (pytorch_optimizer's `SOAP` casts `F Q` to float32 before its QR whatever the
/// parameter's dtype, which moves float64 runs by about 1e-6: docs/language.md section 12.7 and
/// tests/oracle/test_soap_pytorch_optimizer.py.)
pub(crate) fn refresh_basis_in<T: Real>(
    factor: &[T],
    basis: &[T],
    size: usize,
) -> Result<(Vec<T>, Vec<usize>), LinalgError> {
    let convert = |values: Vec<f32>| values.into_iter().map(|value| T::from_f64(f64::from(value))).collect();
    if let (Some(factor), Some(basis)) = (as_single(factor), as_single(basis)) {
        if let Some((q, order)) = refresh_basis_single(&factor[..size * size], &basis[..size * size], size) {
            return Ok((convert(q), order));
        }
    }
    let (q, order) = refresh_basis(&square(factor, size, 1.0), &square(basis, size, 1.0))?;
    Ok((q.data.iter().map(|value| T::from_f64(*value)).collect(), order))
}

/// [`refresh_basis`] in single precision; `None` when the QR fails.
fn refresh_basis_single(factor: &[f32], basis: &[f32], n: usize) -> Option<(Vec<f32>, Vec<usize>)> {
    let mut applied = vec![0.0f32; n * n];
    gemm((n, n, n), 1.0, (factor, (n, 1)), (basis, (n, 1)), 0.0, &mut applied, n);
    let (order, sorted) = sorted_by_estimates(&applied, basis, n);
    thin_q_single(&sorted, n, n).ok().map(|q| (q, order))
}

/// SOAP's second moment (row-major, `left_order.len() x right_order.len()`) after a basis
/// refresh: its rows follow the left basis' new column order, its columns the right one's.
pub(crate) fn permuted<T: Copy>(old: &[T], left_order: &[usize], right_order: &[usize]) -> Vec<T> {
    let columns = right_order.len();
    left_order
        .iter()
        .flat_map(|&source_row| right_order.iter().map(move |&source_column| old[source_row * columns + source_column]))
        .collect()
}

/// SOAP (nikhilvyas/SOAP): Adam in the eigenbasis of Shampoo's factors. At the first step the
/// factors take the gradient and the bases are their eigenvectors (descending), and the parameter
/// does not move; then `m` (in the parameter's basis) and `v` (in the rotated basis) are Adam's
/// moments, the direction is `Q_L (rotate(m) / (sqrt(v) + eps)) Q_R^T` with Adam's bias
/// correction as one step size, the factors take the gradient (EMA), and every `every` steps
/// each basis is refreshed by one power iteration and QR ([`refresh_basis`]), `v` permuted to
/// follow. The state is worked on where it is, in the run's element type (factors, bases and
/// moments in `T`, the rotations as GEMMs); the first eigenvectors are computed in double
/// precision, the refreshes by [`refresh_basis_in`].
fn soap<T: Real>(
    plan: &ParamPlan,
    shape: &[usize],
    state: &mut ParamState<T>,
    inputs: &KroneckerInputs,
) -> Result<Option<Vec<f64>>, String> {
    let options = &plan.options;
    let ema = number(options, "ema", 0.95);
    let b1 = number(options, "b1", 0.9);
    let b2 = number(options, "b2", 0.999);
    let eps = number(options, "eps", 1e-8);
    let every = number(options, "every", 1.0).max(1.0) as u64;
    let block = number(options, "block", 1024.0) as usize;
    let (rows, columns) = matrix_shape(shape);
    let tiles = tiles(rows, columns, block);
    let left_size = tiles.iter().map(|tile| tile.rows * tile.rows).sum::<usize>();
    let right_size = tiles.iter().map(|tile| tile.columns * tile.columns).sum::<usize>();
    let gradient: Vec<T> = inputs.gradient.iter().map(|value| T::from_f64(*value)).collect();
    let failure = |error: LinalgError| format!("SOAP's eigenbasis: {error}");
    let first = state_get(state, "left_basis").is_none();
    let mut left = take_state(state, "left_factor", &[left_size]);
    let mut right = take_state(state, "right_factor", &[right_size]);
    if first {
        accumulate_factors(&tiles, &gradient, columns, (&mut left, &mut right), ema);
        let mut left_basis = take_state(state, "left_basis", &[left_size]);
        let mut right_basis = take_state(state, "right_basis", &[right_size]);
        for tile in &tiles {
            let l = add_to_diagonal(&square(&left[tile.left_offset..], tile.rows, 1.0), 1e-30);
            let r = add_to_diagonal(&square(&right[tile.right_offset..], tile.columns, 1.0), 1e-30);
            store(&descending_eigenvectors(&l).map_err(failure)?, &mut left_basis[tile.left_offset..]);
            store(&descending_eigenvectors(&r).map_err(failure)?, &mut right_basis[tile.right_offset..]);
        }
        put_state(state, "left_factor", left);
        put_state(state, "right_factor", right);
        put_state(state, "left_basis", left_basis);
        put_state(state, "right_basis", right_basis);
        let m = take_state(state, "m", shape);
        put_state(state, "m", m);
        let v = take_state(state, "v", shape);
        put_state(state, "v", v);
        let step = take_state(state, "soap_step", &[]);
        put_state(state, "soap_step", step);
        return Ok(None);
    }
    let mut soap_step = take_state(state, "soap_step", &[]);
    let s = soap_step[0].to_f64() + 1.0;
    soap_step[0] = T::from_f64(s);
    put_state(state, "soap_step", soap_step);
    let mut left_basis = take_state(state, "left_basis", &[left_size]);
    let mut right_basis = take_state(state, "right_basis", &[right_size]);
    let mut m = take_state(state, "m", shape);
    let mut v = take_state(state, "v", shape);
    let (keep, take) = (T::from_f64(b1), T::from_f64(1.0 - b1));
    for (value, g) in m.iter_mut().zip(&gradient) {
        *value = keep.mul(*value).add(take.mul(*g));
    }
    let step_size = (1.0 - b2.powf(s)).sqrt() / (1.0 - b1.powf(s));
    let mut direction = vec![0.0; gradient.len()];
    let (mut half, mut rotated_gradient, mut normalised) = (Vec::new(), Vec::new(), Vec::new());
    for tile in &tiles {
        let (q_left, q_right) = (&left_basis[tile.left_offset..], &right_basis[tile.right_offset..]);
        // Q_L^T X Q_R for the tile of X.
        let mut rotate = |matrix: &[T], result: &mut Vec<T>| {
            two_sided(
                (tile.rows, tile.columns),
                (q_left, true),
                (&matrix[tile.row * columns + tile.column..], columns),
                (q_right, false),
                &mut half,
                result,
            );
        };
        rotate(&gradient, &mut rotated_gradient);
        rotate(&m, &mut normalised);
        let (keep, take) = (T::from_f64(b2), T::from_f64(1.0 - b2));
        for row in 0..tile.rows {
            let start = (tile.row + row) * columns + tile.column;
            for column in 0..tile.columns {
                let g = rotated_gradient[row * tile.columns + column];
                let second = &mut v[start + column];
                *second = keep.mul(*second).add(take.mul(g.mul(g)));
                let slot = &mut normalised[row * tile.columns + column];
                *slot = T::from_f64(step_size * slot.to_f64() / (second.to_f64().sqrt() + eps));
            }
        }
        // Back: Q_L N Q_R^T.
        two_sided(
            (tile.rows, tile.columns),
            (q_left, false),
            (&normalised, tile.columns),
            (q_right, true),
            &mut half,
            &mut rotated_gradient,
        );
        for row in 0..tile.rows {
            let start = (tile.row + row) * columns + tile.column;
            for (slot, value) in direction[start..start + tile.columns]
                .iter_mut()
                .zip(&rotated_gradient[row * tile.columns..(row + 1) * tile.columns])
            {
                *slot = value.to_f64();
            }
        }
    }
    accumulate_factors(&tiles, &gradient, columns, (&mut left, &mut right), ema);
    if (s as u64).is_multiple_of(every) {
        for tile in &tiles {
            let refresh = refresh_basis_in::<T>;
            let (left_factor, left_old) = (&left[tile.left_offset..], &left_basis[tile.left_offset..]);
            let (right_factor, right_old) = (&right[tile.right_offset..], &right_basis[tile.right_offset..]);
            let (l, r) = side_by_side(
                (tile.rows, tile.columns),
                || refresh(left_factor, left_old, tile.rows),
                || refresh(right_factor, right_old, tile.columns),
            );
            let ((new_left, left_order), (new_right, right_order)) = (l.map_err(failure)?, r.map_err(failure)?);
            left_basis[tile.left_offset..tile.left_offset + new_left.len()].copy_from_slice(&new_left);
            right_basis[tile.right_offset..tile.right_offset + new_right.len()].copy_from_slice(&new_right);
            // The second moment lives in the rotated basis: its rows follow the left basis'
            // columns, its columns the right basis' columns.
            let old: Vec<T> = (0..tile.rows)
                .flat_map(|row| {
                    let start = (tile.row + row) * columns + tile.column;
                    v[start..start + tile.columns].to_vec()
                })
                .collect();
            let new = permuted(&old, &left_order, &right_order);
            for (row, values) in new.chunks(tile.columns.max(1)).enumerate() {
                let start = (tile.row + row) * columns + tile.column;
                v[start..start + values.len()].copy_from_slice(values);
            }
        }
    }
    put_state(state, "left_factor", left);
    put_state(state, "right_factor", right);
    put_state(state, "left_basis", left_basis);
    put_state(state, "right_basis", right_basis);
    put_state(state, "m", m);
    put_state(state, "v", v);
    Ok(Some(direction))
}

/// K-FAC's damped inverses of its bias-corrected factors `left` and `right` (the inputs' factor
/// on the left for `x @ W`, on the right for a convolution kernel): `(F + d I)^-1` with the
/// pi-adjusted factored damping, `pi = sqrt((tr A / dim A) / (tr G / dim G))` multiplying the
/// inputs' factor's `sqrt(damping)` and dividing the outputs'.
pub(crate) fn kfac_inverses(
    left: &Matrix,
    right: &Matrix,
    damping: f64,
    pi_adjusted: bool,
    inputs_on_the_left: bool,
) -> (Result<Matrix, LinalgError>, Result<Matrix, LinalgError>) {
    let (norm_left, norm_right) = (trace(left) / left.rows as f64, trace(right) / right.rows as f64);
    let (norm_inputs, norm_outputs) =
        if inputs_on_the_left { (norm_left, norm_right) } else { (norm_right, norm_left) };
    let pi_inputs = if pi_adjusted && norm_inputs > 0.0 && norm_outputs > 0.0 {
        Some((norm_inputs / norm_outputs).sqrt()).filter(|pi| pi.is_finite()).unwrap_or(1.0)
    } else {
        1.0
    };
    let pi = if inputs_on_the_left { pi_inputs } else { 1.0 / pi_inputs };
    let root = damping.sqrt();
    side_by_side((left.rows, right.rows), || damped_inverse(left, pi * root), || damped_inverse(right, root / pi))
}

/// K-FAC (kfac-pytorch's INVERSE and EIGEN modes): at the steps that bring captures, the factors
/// `A` (inputs) and `G` (output cotangents) take their fresh covariances (EMA, bias-corrected by
/// the number of updates), and the inverses are recomputed: `(A + pi sqrt(damping) I)^-1` and
/// `(G + sqrt(damping) / pi I)^-1` with the pi-adjusted factored damping, or (`eigen`) the
/// factors' eigendecompositions; every step the direction is `A^-1 grad G^-1`, or in the
/// eigenbases `Q_A ((Q_A^T grad Q_G) / (a g^T + damping)) Q_G^T`. The state is worked on where it
/// is, in the run's element type (the products as GEMMs); the inverses and eigendecompositions
/// are computed in double precision.
fn kfac<T: Real>(
    plan: &ParamPlan,
    shape: &[usize],
    state: &mut ParamState<T>,
    inputs: &KroneckerInputs,
    eigen: bool,
) -> Result<Option<Vec<f64>>, String> {
    let options = &plan.options;
    let ema = number(options, "ema", 0.95);
    let damping = number(options, "damping", 1e-3);
    let pi_adjusted = flag(options, "pi", true);
    let (rows, columns) = matrix_shape(shape);
    let (left_size, right_size) = (rows * rows, columns * columns);
    let mut updates = take_state(state, "factor_updates", &[]);
    let count = updates[0].to_f64() + f64::from(u8::from(inputs.captures.is_some()));
    updates[0] = T::from_f64(count);
    put_state(state, "factor_updates", updates);
    if let Some(captures) = inputs.captures {
        let (a, g) = captures.covariances();
        // The left factor covers the rows of the parameter's matrix view: the inputs' factor `A`
        // for `x @ W` (`[in, out]`), the outputs' factor `G` for a conv kernel (`[O, C kH kW]`).
        let inputs_on_the_left = !captures.inputs_are_columns;
        let (a, g) = if inputs_on_the_left { (a, g) } else { (g, a) };
        if a.rows != rows || g.rows != columns {
            return Err(format!(
                "the K-FAC statistics are {}x{} and {}x{}, the parameter is {rows}x{columns}",
                a.rows, a.columns, g.rows, g.columns
            ));
        }
        let mut left = take_state(state, "left_factor", &[left_size]);
        let mut right = take_state(state, "right_factor", &[right_size]);
        let ema = ema.min(1.0 - f64::EPSILON);
        for (factor, fresh) in [(&mut left, &a), (&mut right, &g)] {
            for (value, new) in factor.iter_mut().zip(&fresh.data) {
                *value = T::from_f64(ema * value.to_f64() + (1.0 - ema) * new);
            }
        }
        let correction = 1.0 - ema.powf(count);
        let (a_hat, g_hat) = (square(&left, rows, 1.0 / correction), square(&right, columns, 1.0 / correction));
        put_state(state, "left_factor", left);
        put_state(state, "right_factor", right);
        let failure = |error: LinalgError| format!("the K-FAC inverse: {error}");
        let (left_inverse, right_inverse, values) = if eigen {
            let (a, g) = side_by_side((rows, columns), || symmetric_eigen(&a_hat), || symmetric_eigen(&g_hat));
            let ((a_values, a_vectors), (g_values, g_vectors)) = (a.map_err(failure)?, g.map_err(failure)?);
            (a_vectors, g_vectors, Some((a_values, g_values)))
        } else {
            let (left, right) = kfac_inverses(&a_hat, &g_hat, damping, pi_adjusted, inputs_on_the_left);
            (left.map_err(failure)?, right.map_err(failure)?, None)
        };
        let mut slot = take_state(state, "left_inverse", &[left_size]);
        store(&left_inverse, &mut slot);
        put_state(state, "left_inverse", slot);
        let mut slot = take_state(state, "right_inverse", &[right_size]);
        store(&right_inverse, &mut slot);
        put_state(state, "right_inverse", slot);
        if let Some((a_values, g_values)) = values {
            for (name, values, size) in [("left_values", a_values, rows), ("right_values", g_values, columns)] {
                let mut slot = take_state(state, name, &[size]);
                for (target, value) in slot.iter_mut().zip(values) {
                    *target = T::from_f64(value.max(0.0));
                }
                put_state(state, name, slot);
            }
        }
    }
    if count == 0.0 {
        return Err("K-FAC has no factor statistics yet".to_string());
    }
    let gradient: Vec<T> = inputs.gradient.iter().map(|value| T::from_f64(*value)).collect();
    let left_inverse = state_get(state, "left_inverse").map(|tensor| tensor.data.as_slice()).unwrap_or_default();
    let right_inverse = state_get(state, "right_inverse").map(|tensor| tensor.data.as_slice()).unwrap_or_default();
    if left_inverse.len() != left_size || right_inverse.len() != right_size {
        return Err("K-FAC's inverses are missing from its state".to_string());
    }
    let (mut half, mut direction) = (Vec::new(), Vec::new());
    if eigen {
        let a_values = state_get(state, "left_values").map(|tensor| tensor.data.as_slice()).unwrap_or_default();
        let g_values = state_get(state, "right_values").map(|tensor| tensor.data.as_slice()).unwrap_or_default();
        if a_values.len() != rows || g_values.len() != columns {
            return Err("K-FAC's eigenvalues are missing from its state".to_string());
        }
        let mut rotated = Vec::new();
        let bases = ((left_inverse, true), (right_inverse, false));
        two_sided((rows, columns), bases.0, (&gradient, columns), bases.1, &mut half, &mut rotated);
        for (row, a_value) in rotated.chunks_mut(columns.max(1)).zip(a_values) {
            for (value, g_value) in row.iter_mut().zip(g_values) {
                *value = T::from_f64(value.to_f64() / (a_value.to_f64() * g_value.to_f64() + damping));
            }
        }
        two_sided(
            (rows, columns),
            (left_inverse, false),
            (&rotated, columns),
            (right_inverse, true),
            &mut half,
            &mut direction,
        );
    } else {
        two_sided(
            (rows, columns),
            (left_inverse, false),
            (&gradient, columns),
            (right_inverse, false),
            &mut half,
            &mut direction,
        );
    }
    Ok(Some(direction.into_iter().map(|value| value.to_f64()).collect()))
}

/// One step of the `orthogonalize` structure (Muon): returns the direction.
pub fn orthogonalize_direction<T: Real>(
    plan: &ParamPlan,
    shape: &[usize],
    state: &mut ParamState<T>,
    inputs: &KroneckerInputs,
    previous: &mut Option<PreviousState<T>>,
) -> Result<Vec<f64>, String> {
    let options = &plan.options;
    let steps = number(options, "steps", 5.0) as usize;
    let coefficients = (number(options, "a", 3.4445), number(options, "b", -4.7750), number(options, "c", 2.0315));
    let beta = number(options, "momentum", 0.95);
    let nesterov = flag(options, "nesterov", true);
    // The momentum is updated where it is, in the run's precision, and so is the iteration.
    *previous = Some(PreviousState::whole(state.clone()));
    let gradient: Vec<T> = inputs.gradient.iter().map(|value| T::from_f64(*value)).collect();
    let mut momentum = take_state(state, "momentum", shape);
    let (keep, take) = (T::from_f64(beta), T::from_f64(1.0 - beta));
    for (value, g) in momentum.iter_mut().zip(&gradient) {
        *value = keep.mul(*value).add(take.mul(*g));
    }
    let update: Vec<T> = if nesterov {
        gradient.iter().zip(&momentum).map(|(g, m)| take.mul(*g).add(keep.mul(*m))).collect()
    } else {
        momentum.clone()
    };
    put_state(state, "momentum", momentum);
    let orthogonal = newton_schulz_in(&update, matrix_shape(shape), steps, coefficients);
    // For `x @ W` (`[in, out]`) the scale is PyTorch's `sqrt(max(1, out_features / in_features))`.
    // For higher ranks the reference uses the last two dimensions of the tensor as they are
    // (`kH / kW` for a conv kernel), and so does curv.
    let scale = match shape {
        [rows, columns] => (*columns as f64 / *rows as f64).max(1.0).sqrt(),
        [.., second_last, last] => (*second_last as f64 / *last as f64).max(1.0).sqrt(),
        _ => 1.0,
    };
    Ok(orthogonal.into_iter().map(|value| value.to_f64() * scale).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_matrix(rows: usize, columns: usize, seed: u64) -> Matrix {
        let mut random = crate::random::Random::new(seed, crate::random::Stream::Probe, 0);
        Matrix { rows, columns, data: (0..rows * columns).map(|_| random.normal()).collect() }
    }

    fn spd(size: usize, seed: u64) -> Matrix {
        let x = random_matrix(size, size + 3, seed);
        product(&x, false, &x, true)
    }

    fn close(a: &Matrix, b: &Matrix, tolerance: f64) -> bool {
        let difference: Vec<f64> = a.data.iter().zip(&b.data).map(|(x, y)| x - y).collect();
        frobenius(&difference) <= tolerance * frobenius(&b.data).max(1.0)
    }

    #[test]
    fn the_inverse_fourth_root_to_the_fourth_power_is_the_inverse() {
        let a = spd(7, 1);
        let root = inverse_root(&a, 4.0, 0.0).unwrap();
        let fourth = product(&product(&root, false, &root, false), false, &product(&root, false, &root, false), false);
        assert!(close(&product(&fourth, false, &a, false), &identity(7), 1e-8));
    }

    fn rounded(matrix: &Matrix) -> Vec<f32> {
        matrix.data.iter().map(|value| *value as f32).collect()
    }

    #[test]
    fn single_precision_inverse_roots_agree_with_double_precision() {
        for (size, seed) in [(8, 11), (64, 12), (200, 13)] {
            let a = spd(size, seed);
            let single = rounded(&a);
            // The double-precision root of the same (rounded) matrix, with the same scale.
            let widened =
                Matrix { rows: size, columns: size, data: single.iter().map(|value| f64::from(*value)).collect() };
            let expected = inverse_root(&widened, 4.0, 1e-12).unwrap();
            let by_single = inverse_root_in(&single, size, 1.0, 4.0, 1e-12).unwrap();
            let by_single =
                Matrix { rows: size, columns: size, data: by_single.iter().map(|value| f64::from(*value)).collect() };
            assert!(close(&by_single, &expected, 1e-3), "size {size}");
            assert!(!close(&by_single, &expected, 1e-12), "size {size}: the single-precision path was not taken");
            // A double-precision run computes exactly the double-precision root.
            let by_double = inverse_root_in(&widened.data, size, 1.0, 4.0, 1e-12).unwrap();
            assert_eq!(by_double, expected.data);
        }
        // A scale is applied before the root.
        let a = spd(6, 14);
        let scaled = inverse_root_in(&rounded(&a), 6, 0.25, 2.0, 0.0).unwrap();
        let expected = inverse_root(
            &Matrix { rows: 6, columns: 6, data: a.data.iter().map(|v| f64::from(*v as f32) * 0.25).collect() },
            2.0,
            0.0,
        )
        .unwrap();
        let scaled = Matrix { rows: 6, columns: 6, data: scaled.iter().map(|value| f64::from(*value)).collect() };
        assert!(close(&scaled, &expected, 1e-4));
        // A factor that is not finite fails in both precisions.
        let mut broken = rounded(&a);
        broken[7] = f32::NAN;
        assert!(inverse_root_in(&broken, 6, 1.0, 4.0, 1e-12).is_err());
    }

    #[test]
    fn the_basis_refresh_is_the_references_power_iteration_and_qr() {
        let factor = spd(24, 21);
        let basis = descending_eigenvectors(&add_to_diagonal(&spd(24, 22), 1.0)).unwrap();
        let (q, order) = refresh_basis(&factor, &basis).unwrap();
        // The reference's formulation: estimates diag(Q^T F Q), then QR of F Q_sorted.
        let projected = product(&product(&basis, true, &factor, false), false, &basis, false);
        let mut expected_order: Vec<usize> = (0..24).collect();
        expected_order.sort_by(|&a, &b| projected.at(b, b).total_cmp(&projected.at(a, a)));
        assert_eq!(order, expected_order);
        let mut sorted = basis.clone();
        for row in 0..24 {
            for (column, &source) in expected_order.iter().enumerate() {
                sorted.data[row * 24 + column] = basis.at(row, source);
            }
        }
        let (expected_q, _) = thin_qr(&product(&factor, false, &sorted, false)).unwrap();
        assert!(close(&q, &expected_q, 1e-12));
        // In single precision: the same order and nearly the same basis.
        let (single_q, single_order) = refresh_basis_in(&rounded(&factor), &rounded(&basis), 24).unwrap();
        assert_eq!(single_order, order);
        let single_q = Matrix { rows: 24, columns: 24, data: single_q.iter().map(|value| f64::from(*value)).collect() };
        assert!(close(&single_q, &q, 1e-4));
        assert!(!close(&single_q, &q, 1e-12), "the single-precision path was not taken");
        // A double-precision run computes exactly the double-precision refresh.
        let (double_q, double_order) = refresh_basis_in(&factor.data, &basis.data, 24).unwrap();
        assert_eq!((double_q, double_order), (q.data, order));
    }

    #[test]
    fn an_undone_update_leaves_the_state_as_it_was_without_copying_what_it_does_not_change() {
        let tensor = |values: &[f64]| Tensor { shape: vec![values.len()], data: values.to_vec() };
        let original: ParamState<f64> = vec![
            ("a".to_string(), tensor(&[1.0, 2.0])),
            ("root".to_string(), tensor(&[3.0])),
            ("c".to_string(), tensor(&[4.0])),
        ];
        let update = |state: &mut ParamState<f64>| {
            state[0].1.data[0] = 10.0;
            state[2].1.data[0] = 40.0;
            state.push(("created".to_string(), tensor(&[5.0])));
        };
        // Undone after a success (as a caller that rolls a step back does).
        let mut state = original.clone();
        let mut previous = None;
        undoable(
            &mut state,
            &mut previous,
            |name| name != "root",
            |state| {
                update(state);
                Ok(())
            },
        )
        .unwrap();
        let previous = previous.unwrap();
        assert!(previous.0.iter().any(|(name, value)| name == "root" && value.is_none()), "the root was copied");
        assert_eq!(state.len(), 4);
        previous.restore(&mut state);
        assert_eq!(state, original);
        // Put back by `undoable` itself when the update fails.
        let mut state = original.clone();
        let mut previous = None;
        let outcome: Result<(), String> = undoable(
            &mut state,
            &mut previous,
            |name| name != "root",
            |state| {
                update(state);
                Err("failed".to_string())
            },
        );
        assert!(outcome.is_err());
        assert_eq!(state, original);
    }

    #[test]
    fn coupled_newton_agrees_with_the_eigendecomposition() {
        for (size, seed) in [(5, 4), (12, 5)] {
            let a = spd(size, seed);
            let by_newton = inverse_root_newton(&a, 4.0, 1e-12).unwrap();
            let by_eigen = inverse_root(&a, 4.0, 1e-12).unwrap();
            assert!(close(&by_newton, &by_eigen, 1e-5), "size {size}");
        }
        let zero = Matrix { rows: 2, columns: 2, data: vec![0.0; 4] };
        assert!(inverse_root_newton(&zero, 4.0, 0.0).is_err());
    }

    #[test]
    fn the_damped_inverse_inverts_the_damped_matrix() {
        let a = spd(6, 2);
        let inverse = damped_inverse(&a, 0.5).unwrap();
        assert!(close(&product(&inverse, false, &add_to_diagonal(&a, 0.5), false), &identity(6), 1e-10));
        // A singular matrix takes the eigendecomposition path when the damping is zero-ish.
        let mut singular = Matrix { rows: 3, columns: 3, data: vec![0.0; 9] };
        singular.data[0] = 1.0;
        let inverse = damped_inverse(&singular, 1e-300).unwrap_or_else(|_| identity(3));
        assert!(inverse.data.iter().all(|value| value.is_finite()));
    }

    #[test]
    fn newton_schulz_makes_the_singular_values_near_one() {
        let x = random_matrix(5, 9, 3);
        let orthogonal = newton_schulz(&x, 5, (3.4445, -4.7750, 2.0315));
        let (values, _) = symmetric_eigen(&product(&orthogonal, false, &orthogonal, true)).unwrap();
        // Muon's coefficients trade exactness for speed: singular values land in about [0.7, 1.2].
        for value in values {
            assert!((0.4..1.5).contains(&value), "squared singular value {value}");
        }
        // The transposed input gives the transposed output.
        let transposed = newton_schulz(&transpose(&x), 5, (3.4445, -4.7750, 2.0315));
        assert!(close(&transpose(&transposed), &orthogonal, 1e-12));
    }

    #[test]
    fn tiles_cover_the_matrix_once_and_their_factors_do_not_overlap() {
        let tiles = tiles(5, 7, 3);
        let mut covered = [0; 35];
        for tile in &tiles {
            for row in tile.row..tile.row + tile.rows {
                for column in tile.column..tile.column + tile.columns {
                    covered[row * 7 + column] += 1;
                }
            }
        }
        assert!(covered.iter().all(|&count| count == 1));
        let last = tiles.last().unwrap();
        assert_eq!(
            last.left_offset + last.rows * last.rows,
            tiles.iter().map(|tile| tile.rows * tile.rows).sum::<usize>()
        );
    }

    /// `gemm` in f32 and f64 against the double-precision `product`, on a tile of a wider matrix
    /// (row stride larger than the tile), with transposed operands and accumulation into `C`.
    #[test]
    fn gemm_agrees_with_the_double_precision_product_on_strided_and_transposed_tiles() {
        let wide = random_matrix(7, 9, 11);
        // The tile: rows 2..7, columns 3..9 (5 x 6), row stride 9.
        let tile = Matrix {
            rows: 5,
            columns: 6,
            data: (2..7).flat_map(|row| wide.data[row * 9 + 3..row * 9 + 9].to_vec()).collect(),
        };
        let accumulated = random_matrix(5, 5, 12);
        let expected_left = {
            let fresh = product(&tile, false, &tile, true);
            let mut result = accumulated.clone();
            result.data.iter_mut().zip(&fresh.data).for_each(|(value, new)| *value = 0.5 * *value + 2.0 * new);
            result
        };
        let expected_right = product(&tile, true, &tile, false);
        let offset = 2 * 9 + 3;
        let mut left = accumulated.data.clone();
        gemm((5, 6, 5), 2.0, (&wide.data[offset..], (9, 1)), (&wide.data[offset..], (1, 9)), 0.5, &mut left, 5);
        assert!(close(&Matrix { rows: 5, columns: 5, data: left }, &expected_left, 1e-12));
        let mut right = vec![f64::NAN; 36];
        gemm((6, 5, 6), 1.0, (&wide.data[offset..], (1, 9)), (&wide.data[offset..], (9, 1)), 0.0, &mut right, 6);
        assert!(close(&Matrix { rows: 6, columns: 6, data: right }, &expected_right, 1e-12));
        let single: Vec<f32> = wide.data.iter().map(|value| *value as f32).collect();
        let mut right_single = vec![0.0f32; 36];
        gemm((6, 5, 6), 1.0, (&single[offset..], (1, 9)), (&single[offset..], (9, 1)), 0.0, &mut right_single, 6);
        let right_single =
            Matrix { rows: 6, columns: 6, data: right_single.iter().map(|value| f64::from(*value)).collect() };
        assert!(close(&right_single, &expected_right, 1e-5));
    }
}
