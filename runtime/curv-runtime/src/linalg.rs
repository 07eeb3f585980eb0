//! Matrix decompositions for the optimizers, where MLIR has no operation: the symmetric
//! eigendecomposition (Shampoo's and SOAP's eigenbases, inverse roots), the Cholesky factor (damped
//! K-FAC inverses) and the thin QR factorisation (SOAP's and PSGD's re-orthogonalisation). They are
//! computed with `faer` in double precision, whatever the element type of the caller, because
//! preconditioner factors are often badly conditioned; the single-precision eigendecomposition
//! and QR serve the matrix functions that f32 runs compute in single precision as their
//! references do (Shampoo's roots, SOAP's refreshes), which fall back to double precision.
//!
//! Each decomposition has a safe Rust function (for the runtime's own use) and an `extern "C"`
//! function on MLIR strided memref descriptors, which generated code calls through MLIR's C
//! interface (`_mlir_ciface_NAME`). `runtime_functions` lists the latter for whoever makes them
//! known to compiled code: the JIT registers them with its execution engine, the kernel cache
//! forwards them through a trampoline, standalone trainers export them.
//!
//! A decomposition that fails (a non-finite input, a matrix that is not positive definite) fills
//! its outputs with NaN from the C interface, so the trainer's non-finite checks report the step.

use crate::gemm::StridedMemRef2;
use faer::{Mat, MatRef, Side};

/// MLIR's descriptor of a rank-1 strided memref.
#[repr(C)]
pub struct StridedMemRef1 {
    pub allocated: *mut f32,
    pub aligned: *mut f32,
    pub offset: i64,
    pub sizes: [i64; 1],
    pub strides: [i64; 1],
}

/// Why a decomposition failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinalgError {
    /// The input has a NaN or an infinity.
    NonFinite,
    /// The matrix is not square (or the sizes do not match the data).
    BadShape(String),
    /// Cholesky: the matrix is not (numerically) positive definite.
    NotPositiveDefinite,
    /// The eigenvalue iteration did not converge.
    NoConvergence,
}

impl std::fmt::Display for LinalgError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinalgError::NonFinite => write!(formatter, "the matrix has non-finite entries"),
            LinalgError::BadShape(message) => write!(formatter, "{message}"),
            LinalgError::NotPositiveDefinite => write!(formatter, "the matrix is not positive definite"),
            LinalgError::NoConvergence => write!(formatter, "the eigenvalue iteration did not converge"),
        }
    }
}

/// A dense row-major matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    pub rows: usize,
    pub columns: usize,
    pub data: Vec<f64>,
}

impl Matrix {
    pub fn new(rows: usize, columns: usize, data: Vec<f64>) -> Result<Matrix, LinalgError> {
        if data.len() != rows * columns {
            return Err(LinalgError::BadShape(format!(
                "a {rows}x{columns} matrix needs {} values, got {}",
                rows * columns,
                data.len()
            )));
        }
        Ok(Matrix { rows, columns, data })
    }

    pub fn at(&self, row: usize, column: usize) -> f64 {
        self.data[row * self.columns + column]
    }

    fn to_faer(&self) -> Mat<f64> {
        Mat::from_fn(self.rows, self.columns, |row, column| self.at(row, column))
    }

    fn from_faer(matrix: MatRef<'_, f64>) -> Matrix {
        let (rows, columns) = (matrix.nrows(), matrix.ncols());
        let mut data = Vec::with_capacity(rows * columns);
        for row in 0..rows {
            for column in 0..columns {
                data.push(matrix[(row, column)]);
            }
        }
        Matrix { rows, columns, data }
    }

    fn check_square(&self, what: &str) -> Result<(), LinalgError> {
        if self.rows != self.columns {
            return Err(LinalgError::BadShape(format!(
                "{what} needs a square matrix, got {}x{}",
                self.rows, self.columns
            )));
        }
        Ok(())
    }

    fn check_finite(&self) -> Result<(), LinalgError> {
        if self.data.iter().all(|value| value.is_finite()) {
            Ok(())
        } else {
            Err(LinalgError::NonFinite)
        }
    }
}

/// `A = V diag(values) Vᵀ` for a symmetric `A`, of which only the lower triangle is read. The
/// eigenvalues are in ascending order; column `i` of `V` is the eigenvector of `values[i]`, with
/// its largest-magnitude entry made positive so that the result does not depend on the sign the
/// algorithm happened to choose.
pub fn symmetric_eigen(matrix: &Matrix) -> Result<(Vec<f64>, Matrix), LinalgError> {
    matrix.check_square("the symmetric eigendecomposition")?;
    matrix.check_finite()?;
    let decomposition = matrix.to_faer().self_adjoint_eigen(Side::Lower).map_err(|_| LinalgError::NoConvergence)?;
    let values: Vec<f64> = (0..matrix.rows).map(|index| decomposition.S()[index]).collect();
    let mut vectors = Matrix::from_faer(decomposition.U());
    let n = matrix.rows;
    for column in 0..n {
        let largest =
            (0..n)
                .map(|row| vectors.at(row, column))
                .fold(0.0f64, |best, value| if value.abs() > best.abs() { value } else { best });
        if largest < 0.0 {
            for row in 0..n {
                vectors.data[row * n + column] = -vectors.data[row * n + column];
            }
        }
    }
    Ok((values, vectors))
}

/// A `rows x columns` single-precision matrix from row-major `values`, which must be as many as
/// its shape needs and finite.
fn single_matrix(values: &[f32], rows: usize, columns: usize) -> Result<Mat<f32>, LinalgError> {
    if values.len() != rows * columns {
        return Err(LinalgError::BadShape(format!(
            "a {rows}x{columns} matrix needs {} values, got {}",
            rows * columns,
            values.len()
        )));
    }
    if !values.iter().all(|value| value.is_finite()) {
        return Err(LinalgError::NonFinite);
    }
    Ok(Mat::<f32>::from_fn(rows, columns, |row, column| values[row * columns + column]))
}

/// The eigendecomposition of a symmetric `size x size` matrix in single precision (row-major
/// `values`, only the lower triangle read): the eigenvalues in ascending order and the
/// eigenvectors as the columns of a row-major matrix, signs as the algorithm left them. For the
/// matrix functions of `f32` runs, which compute in single precision as their references do.
pub fn symmetric_eigen_single(values: &[f32], size: usize) -> Result<(Vec<f32>, Vec<f32>), LinalgError> {
    let matrix = single_matrix(values, size, size)?;
    let decomposition = matrix.self_adjoint_eigen(Side::Lower).map_err(|_| LinalgError::NoConvergence)?;
    let eigenvalues: Vec<f32> = (0..size).map(|index| decomposition.S()[index]).collect();
    let u = decomposition.U();
    let mut vectors = Vec::with_capacity(size * size);
    for row in 0..size {
        for column in 0..size {
            vectors.push(u[(row, column)]);
        }
    }
    if !eigenvalues.iter().chain(&vectors).all(|value| value.is_finite()) {
        return Err(LinalgError::NonFinite);
    }
    Ok((eigenvalues, vectors))
}

/// The `Q` of the thin QR factorisation of a `rows x columns` matrix (row-major `values`) in
/// single precision, its columns signed so that `R` has a non-negative diagonal (as
/// [`thin_qr`]). For the matrix functions of `f32` runs.
pub fn thin_q_single(values: &[f32], rows: usize, columns: usize) -> Result<Vec<f32>, LinalgError> {
    let matrix = single_matrix(values, rows, columns)?;
    let factorisation = matrix.qr();
    let q = factorisation.compute_thin_Q();
    let r = factorisation.thin_R();
    let k = rows.min(columns);
    let mut result = Vec::with_capacity(rows * k);
    for row in 0..rows {
        for column in 0..k {
            let sign = if r[(column, column)] < 0.0 { -1.0 } else { 1.0 };
            result.push(sign * q[(row, column)]);
        }
    }
    if !result.iter().all(|value| value.is_finite()) {
        return Err(LinalgError::NonFinite);
    }
    Ok(result)
}

/// The lower-triangular `L` with a positive diagonal and `A = L Lᵀ`, for a symmetric positive
/// definite `A`, of which only the lower triangle is read. The upper triangle of `L` is zero.
pub fn cholesky(matrix: &Matrix) -> Result<Matrix, LinalgError> {
    matrix.check_square("the Cholesky factorisation")?;
    matrix.check_finite()?;
    let factor = matrix.to_faer().llt(Side::Lower).map_err(|_| LinalgError::NotPositiveDefinite)?;
    let mut lower = Matrix::from_faer(factor.L());
    let n = matrix.rows;
    for row in 0..n {
        for column in row + 1..n {
            lower.data[row * n + column] = 0.0;
        }
    }
    Ok(lower)
}

/// The solution of `A x = b` for a square, non-singular `A` (LU with partial pivoting).
pub fn solve(matrix: &Matrix, b: &[f64]) -> Result<Vec<f64>, LinalgError> {
    use faer::linalg::solvers::Solve;
    matrix.check_square("the linear solve")?;
    matrix.check_finite()?;
    if b.len() != matrix.rows || b.iter().any(|value| !value.is_finite()) {
        return Err(LinalgError::BadShape(format!(
            "the right-hand side has {} values for a {}x{} matrix (or is not finite)",
            b.len(),
            matrix.rows,
            matrix.columns
        )));
    }
    let lu = matrix.to_faer().partial_piv_lu();
    let rhs = Mat::<f64>::from_fn(b.len(), 1, |row, _| b[row]);
    let x = lu.solve(&rhs);
    let result: Vec<f64> = (0..b.len()).map(|row| x[(row, 0)]).collect();
    if result.iter().any(|value| !value.is_finite()) {
        return Err(LinalgError::BadShape("the matrix is singular".to_string()));
    }
    Ok(result)
}

/// `A^-1` for a symmetric positive definite `A` (of which only the lower triangle is read), from
/// its Cholesky factorisation.
pub fn cholesky_inverse(matrix: &Matrix) -> Result<Matrix, LinalgError> {
    use faer::linalg::solvers::DenseSolveCore;
    matrix.check_square("the Cholesky inverse")?;
    matrix.check_finite()?;
    let factor = matrix.to_faer().llt(Side::Lower).map_err(|_| LinalgError::NotPositiveDefinite)?;
    Ok(Matrix::from_faer(factor.inverse().as_ref()))
}

/// The thin QR factorisation `A = Q R` of an `m x n` matrix: `Q` is `m x k` with orthonormal
/// columns and `R` is `k x n` upper triangular, `k = min(m, n)`, with a non-negative diagonal (which
/// makes the factorisation unique for a full-rank `A`).
pub fn thin_qr(matrix: &Matrix) -> Result<(Matrix, Matrix), LinalgError> {
    matrix.check_finite()?;
    let factorisation = matrix.to_faer().qr();
    let mut q = Matrix::from_faer(factorisation.compute_thin_Q().as_ref());
    let mut r = Matrix::from_faer(factorisation.thin_R());
    let k = matrix.rows.min(matrix.columns);
    for index in 0..k {
        if r.at(index, index) < 0.0 {
            for column in 0..r.columns {
                r.data[index * r.columns + column] = -r.data[index * r.columns + column];
            }
            for row in 0..q.rows {
                q.data[row * q.columns + index] = -q.data[row * q.columns + index];
            }
        }
    }
    Ok((q, r))
}

unsafe fn read_matrix(descriptor: &StridedMemRef2) -> Matrix {
    let (rows, columns) = (descriptor.sizes[0].max(0) as usize, descriptor.sizes[1].max(0) as usize);
    let mut data = Vec::with_capacity(rows * columns);
    for row in 0..rows {
        for column in 0..columns {
            let index = descriptor.offset + row as i64 * descriptor.strides[0] + column as i64 * descriptor.strides[1];
            data.push(unsafe { *descriptor.aligned.offset(index as isize) } as f64);
        }
    }
    Matrix { rows, columns, data }
}

/// Writes `matrix` (or NaN everywhere, for `None`) into the descriptor's buffer; sizes that do not
/// match are filled with NaN too.
unsafe fn write_matrix(descriptor: &mut StridedMemRef2, matrix: Option<&Matrix>) {
    let (rows, columns) = (descriptor.sizes[0].max(0) as usize, descriptor.sizes[1].max(0) as usize);
    let matrix = matrix.filter(|matrix| matrix.rows == rows && matrix.columns == columns);
    for row in 0..rows {
        for column in 0..columns {
            let index = descriptor.offset + row as i64 * descriptor.strides[0] + column as i64 * descriptor.strides[1];
            let value = matrix.map_or(f32::NAN, |matrix| matrix.at(row, column) as f32);
            unsafe { *descriptor.aligned.offset(index as isize) = value };
        }
    }
}

unsafe fn write_vector(descriptor: &mut StridedMemRef1, values: Option<&[f64]>) {
    let length = descriptor.sizes[0].max(0) as usize;
    let values = values.filter(|values| values.len() == length);
    for index in 0..length {
        let value = values.map_or(f32::NAN, |values| values[index] as f32);
        let position = descriptor.offset + index as i64 * descriptor.strides[0];
        unsafe { *descriptor.aligned.offset(position as isize) = value };
    }
}

/// `curv_seigh(A: [n, n], values: [n], vectors: [n, n])`: `symmetric_eigen` for generated code.
///
/// # Safety
///
/// The descriptors must describe valid, non-overlapping `f32` buffers of the stated sizes.
pub unsafe extern "C" fn curv_seigh(
    matrix: *const StridedMemRef2,
    values: *mut StridedMemRef1,
    vectors: *mut StridedMemRef2,
) {
    unsafe {
        let result = symmetric_eigen(&read_matrix(&*matrix)).ok();
        write_vector(&mut *values, result.as_ref().map(|(values, _)| values.as_slice()));
        write_matrix(&mut *vectors, result.as_ref().map(|(_, vectors)| vectors));
    }
}

/// `curv_scholesky(A: [n, n], L: [n, n])`: `cholesky` for generated code.
///
/// # Safety
///
/// The descriptors must describe valid, non-overlapping `f32` buffers of the stated sizes.
pub unsafe extern "C" fn curv_scholesky(matrix: *const StridedMemRef2, lower: *mut StridedMemRef2) {
    unsafe {
        let result = cholesky(&read_matrix(&*matrix)).ok();
        write_matrix(&mut *lower, result.as_ref());
    }
}

/// `curv_sqr(A: [m, n], Q: [m, k], R: [k, n])`, `k = min(m, n)`: `thin_qr` for generated code.
///
/// # Safety
///
/// The descriptors must describe valid, non-overlapping `f32` buffers of the stated sizes.
pub unsafe extern "C" fn curv_sqr(matrix: *const StridedMemRef2, q: *mut StridedMemRef2, r: *mut StridedMemRef2) {
    unsafe {
        let result = thin_qr(&read_matrix(&*matrix)).ok();
        write_matrix(&mut *q, result.as_ref().map(|(q, _)| q));
        write_matrix(&mut *r, result.as_ref().map(|(_, r)| r));
    }
}

/// A runtime function generated code may call: its name in MLIR (`func.call @NAME`), the number
/// of memref arguments, and its address. Compiled code reaches it as `_mlir_ciface_NAME`.
#[derive(Debug, Clone, Copy)]
pub struct RuntimeFunction {
    pub name: &'static str,
    pub arity: usize,
    pub address: *const (),
}

/// Every runtime function generated code may call: the GEMM and the decompositions.
pub fn runtime_functions() -> [RuntimeFunction; 4] {
    [
        RuntimeFunction { name: "curv_sgemm", arity: 3, address: crate::gemm::curv_sgemm as *const () },
        RuntimeFunction { name: "curv_seigh", arity: 3, address: curv_seigh as *const () },
        RuntimeFunction { name: "curv_scholesky", arity: 2, address: curv_scholesky as *const () },
        RuntimeFunction { name: "curv_sqr", arity: 3, address: curv_sqr as *const () },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn product(left: &Matrix, right: &Matrix) -> Matrix {
        let mut data = vec![0.0; left.rows * right.columns];
        for row in 0..left.rows {
            for column in 0..right.columns {
                data[row * right.columns + column] =
                    (0..left.columns).map(|inner| left.at(row, inner) * right.at(inner, column)).sum();
            }
        }
        Matrix { rows: left.rows, columns: right.columns, data }
    }

    fn transpose(matrix: &Matrix) -> Matrix {
        let mut data = Vec::with_capacity(matrix.data.len());
        for column in 0..matrix.columns {
            for row in 0..matrix.rows {
                data.push(matrix.at(row, column));
            }
        }
        Matrix { rows: matrix.columns, columns: matrix.rows, data }
    }

    fn largest_difference(left: &Matrix, right: &Matrix) -> f64 {
        left.data.iter().zip(&right.data).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max)
    }

    /// A deterministic pseudo-random matrix (a fixed linear congruential sequence).
    fn pseudo_random(rows: usize, columns: usize, seed: u64) -> Matrix {
        let mut state = seed;
        let data = (0..rows * columns)
            .map(|_| {
                state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((state >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
            })
            .collect();
        Matrix { rows, columns, data }
    }

    fn identity(n: usize) -> Matrix {
        Matrix {
            rows: n,
            columns: n,
            data: (0..n * n).map(|index| if index % (n + 1) == 0 { 1.0 } else { 0.0 }).collect(),
        }
    }

    #[test]
    fn eigendecomposition_reconstructs_the_matrix_with_orthonormal_vectors() {
        let g = pseudo_random(12, 7, 1);
        let a = product(&transpose(&g), &g); // 7x7, symmetric positive semi-definite
        let (values, vectors) = symmetric_eigen(&a).unwrap();
        assert!(values.windows(2).all(|pair| pair[0] <= pair[1]), "ascending: {values:?}");
        let diagonal = Matrix {
            rows: 7,
            columns: 7,
            data: (0..49).map(|index| if index % 8 == 0 { values[index / 8] } else { 0.0 }).collect(),
        };
        let rebuilt = product(&product(&vectors, &diagonal), &transpose(&vectors));
        assert!(largest_difference(&rebuilt, &a) < 1e-12, "{}", largest_difference(&rebuilt, &a));
        assert!(largest_difference(&product(&transpose(&vectors), &vectors), &identity(7)) < 1e-12);
    }

    #[test]
    fn eigenvalues_of_a_known_matrix() {
        // [[2, 1], [1, 2]] has eigenvalues 1 and 3, with vectors (1, -1)/sqrt 2 and (1, 1)/sqrt 2.
        let (values, vectors) = symmetric_eigen(&Matrix::new(2, 2, vec![2.0, 1.0, 1.0, 2.0]).unwrap()).unwrap();
        assert!((values[0] - 1.0).abs() < 1e-14 && (values[1] - 3.0).abs() < 1e-14, "{values:?}");
        let half = 0.5f64.sqrt();
        // Column 0 is +-(1, -1)/sqrt 2 with its largest-magnitude entry positive: a tie, so check
        // only the magnitudes and the relative sign.
        assert!((vectors.at(0, 0).abs() - half).abs() < 1e-14 && (vectors.at(0, 0) + vectors.at(1, 0)).abs() < 1e-14);
        assert!((vectors.at(0, 1) - half).abs() < 1e-14 && (vectors.at(1, 1) - half).abs() < 1e-14);
    }

    #[test]
    fn cholesky_reconstructs_and_rejects_indefinite_matrices() {
        let g = pseudo_random(9, 5, 2);
        let mut a = product(&transpose(&g), &g);
        for index in 0..5 {
            a.data[index * 6] += 1e-3;
        }
        let lower = cholesky(&a).unwrap();
        assert!((0..5).all(|row| lower.at(row, row) > 0.0));
        assert!((0..5).all(|row| (row + 1..5).all(|column| lower.at(row, column) == 0.0)));
        assert!(largest_difference(&product(&lower, &transpose(&lower)), &a) < 1e-12);
        let indefinite = Matrix::new(2, 2, vec![1.0, 2.0, 2.0, 1.0]).unwrap();
        assert_eq!(cholesky(&indefinite), Err(LinalgError::NotPositiveDefinite));
        assert_eq!(cholesky(&Matrix::new(2, 2, vec![1.0, f64::NAN, 0.0, 1.0]).unwrap()), Err(LinalgError::NonFinite));
    }

    #[test]
    fn thin_qr_of_tall_and_wide_matrices() {
        for (rows, columns) in [(8, 5), (5, 8), (6, 6)] {
            let a = pseudo_random(rows, columns, (rows * 10 + columns) as u64);
            let (q, r) = thin_qr(&a).unwrap();
            let k = rows.min(columns);
            assert_eq!((q.rows, q.columns, r.rows, r.columns), (rows, k, k, columns));
            assert!(largest_difference(&product(&q, &r), &a) < 1e-12);
            assert!(largest_difference(&product(&transpose(&q), &q), &identity(k)) < 1e-12);
            for row in 0..k {
                assert!(r.at(row, row) >= 0.0);
                assert!((0..row).all(|column| r.at(row, column) == 0.0));
            }
        }
    }

    #[test]
    fn failures_fill_the_outputs_with_nan_through_the_c_interface() {
        let mut input = [1.0f32, 2.0, 2.0, 1.0];
        let mut lower = [0.0f32; 4];
        let descriptor = |data: &mut [f32]| StridedMemRef2 {
            allocated: data.as_mut_ptr(),
            aligned: data.as_mut_ptr(),
            offset: 0,
            sizes: [2, 2],
            strides: [2, 1],
        };
        let a = descriptor(&mut input);
        let mut l = descriptor(&mut lower);
        unsafe { curv_scholesky(&a, &mut l) };
        assert!(lower.iter().all(|value| value.is_nan()));
    }
}
