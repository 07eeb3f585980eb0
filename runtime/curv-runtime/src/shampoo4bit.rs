//! 4-bit Shampoo (Wang, Zhou, Li and Huang, "4-bit Shampoo for Memory-Efficient Network Training",
//! NeurIPS 2024, arXiv 2405.18144): the `kronecker` structure with `function = inverse_root`,
//! `stats = gradient_outer` and `quantize = 4` (or 8). This module owns that update and its state.
//!
//! It follows the authors' code, Sike-Wang/low-bit-Shampoo (read through the stored fork
//! codebat/low-bit-Shampoo at the authors' last commit, fc46867): `optimizers/shampoo2.py`
//! ("our 4-bit Shampoo", with the eigendecomposition), class `ShampooAdamW`, the variant the
//! repository's `main_demo.py` runs; `qtensor/utils.py` (`QTensorSVDFast` for the factors,
//! `QTensorDiagReal` for the inverse roots), `qtensor/functional.py` (`create_linear_map`,
//! `compute_power`) and the CUDA kernels of `cudaC_python/csrc/kernels.cu` (`dQuantize`,
//! `kQuantizeBlockwise4bit`, `kQuantizeBlockwise4bitDiagReal` and their inverses). The update
//! equations are those of docs/language.md section 12.7 (`quantize = 4`).
//!
//! What is quantised: each factor `A` is kept as its (approximate) eigendecomposition
//! `A = V diag(s) V^T`; the eigenvector matrix `V^T` (one eigenvector per row) is stored as 4-bit
//! codes with one absolute maximum per block of 64 entries of a row, and the eigenvalues `s` in
//! full precision. The inverse fourth roots are stored as 4-bit codes too, except their diagonal,
//! which is kept in full precision. Factors with fewer than `quantize_min_size` (4096) entries are
//! kept in full precision, as in the reference. After dequantisation the eigenvectors are
//! rectified by Björck orthonormalisation, `V <- 1.5 V - 0.5 V V^T V`.
//!
//! Storage: curv's state tensors have the run's element type, so the codes are stored one per
//! element as small integer values (0 to 15). The numerics are exactly those of 4-bit storage,
//! but the memory saving is not realised in the runtime's state (or in checkpoints) yet.
//!
//! All matrix work is in double precision. The reference works on PyTorch's layout, where a
//! linear layer's weight is curv's `[in, out]` parameter transposed; because the quantised roots
//! are not symmetric (their rows are quantised), a matrix parameter's direction is computed in
//! that layout, which in curv's layout reads `Lroot^T G Rroot^T`. A parameter of rank 3 or more
//! (a conv kernel `[O, C, kH, kW]`) has PyTorch's layout already, and curv's matrix view
//! `[O, C kH kW]` is the reference's: its direction is `Lroot G Rroot`.

use crate::kronecker::{frobenius, matrix_shape, number, product, tiles, transpose, KroneckerInputs, States, Tile};
use crate::linalg::Matrix;
use curv_ir::ParamPlan;

/// The reference's `create_linear_map(signed=True, total_bits=bits, power=2)`: `2^bits` points
/// evenly spaced on `[-1, 1]`, the one just below zero replaced by zero, then squared with their
/// sign kept. Sorted ascending; for 4 bits, 7 negative values, zero and 8 positive values.
pub fn linear_square_map(bits: u32) -> Vec<f64> {
    let length = 1usize << bits;
    (0..length)
        .map(|index| {
            let value = if index == length / 2 - 1 { 0.0 } else { -1.0 + 2.0 * index as f64 / (length - 1) as f64 };
            value * value.abs()
        })
        .collect()
}

/// The code of `x` (a value already divided by its block's absolute maximum): the nearest entry of
/// the sorted `code`, found by the reference's binary search (bitsandbytes' `dQuantize`), which
/// also decides ties between two entries.
pub fn code_index(code: &[f64], x: f64) -> usize {
    let length = code.len();
    let mut pivot = length / 2 - 1;
    let (mut lower_pivot, mut upper_pivot) = (0, length - 1);
    let (mut lower, mut upper) = (-1.0, 1.0);
    let mut value = code[pivot];
    let mut step = length / 4;
    while step > 0 {
        if x > value {
            lower_pivot = pivot;
            lower = value;
            pivot += step;
        } else {
            upper_pivot = pivot;
            upper = value;
            pivot -= step;
        }
        value = code[pivot];
        step /= 2;
    }
    if upper_pivot == length - 1 {
        upper = code[upper_pivot];
    }
    if lower_pivot == 0 {
        lower = code[lower_pivot];
    }
    if x > value {
        if x > (upper + value) * 0.5 {
            upper_pivot
        } else {
            pivot
        }
    } else if x < (lower + value) * 0.5 {
        lower_pivot
    } else {
        pivot
    }
}

/// Block-wise quantisation of square matrices, as the reference's CUDA kernels do it: each row is
/// cut into blocks of `block` entries, each block divided by its largest magnitude (`absmax`) and
/// every entry replaced by the index of its nearest code value.
#[derive(Debug, Clone)]
pub struct Quantizer {
    pub code: Vec<f64>,
    pub block: usize,
    /// Matrices with fewer entries are kept in full precision (`min_lowbit_size`).
    pub min_size: usize,
}

impl Quantizer {
    /// Whether an `n x n` matrix is quantised.
    pub fn applies(&self, n: usize) -> bool {
        n * n >= self.min_size
    }

    /// How many blocks (and absolute maxima) an `n x n` matrix has.
    pub fn blocks(&self, n: usize) -> usize {
        n * n.div_ceil(self.block)
    }

    /// Quantises `matrix` into `codes` (`n * n`) and `absmax` (`blocks(n)`). With
    /// `keep_diagonal` (the reference's `DiagReal` variant, used for the inverse roots) the
    /// diagonal is written to `diagonal` (`n`) and quantised as zero, so that it neither enters
    /// its block's absolute maximum nor loses precision.
    pub fn quantize(&self, matrix: &Matrix, codes: &mut [f64], absmax: &mut [f64], diagonal: Option<&mut [f64]>) {
        let n = matrix.rows;
        let mut values = matrix.data.clone();
        if let Some(diagonal) = diagonal {
            for index in 0..n {
                diagonal[index] = values[index * n + index];
                values[index * n + index] = 0.0;
            }
        }
        let blocks_per_row = n.div_ceil(self.block);
        for row in 0..n {
            for block in 0..blocks_per_row {
                let start = row * n + block * self.block;
                let end = row * n + ((block + 1) * self.block).min(n);
                let largest = values[start..end].iter().fold(0.0f64, |largest, value| largest.max(value.abs()));
                absmax[row * blocks_per_row + block] = largest;
                let scale = if largest > 0.0 { 1.0 / largest } else { largest };
                for index in start..end {
                    codes[index] = code_index(&self.code, values[index] * scale) as f64;
                }
            }
        }
    }

    /// The matrix that `codes` and `absmax` (and `diagonal`, when the diagonal was kept) stand for.
    /// Codes outside the map (from a damaged checkpoint) are an error.
    pub fn dequantize(
        &self,
        n: usize,
        codes: &[f64],
        absmax: &[f64],
        diagonal: Option<&[f64]>,
    ) -> Result<Matrix, String> {
        let blocks_per_row = n.div_ceil(self.block);
        let mut data = Vec::with_capacity(n * n);
        for (index, &code) in codes[..n * n].iter().enumerate() {
            let (row, column) = (index / n, index % n);
            let position = code as usize;
            if code.fract() != 0.0 || code < 0.0 || position >= self.code.len() {
                return Err(format!("a 4-bit Shampoo state holds {code}, which is not a code of the quantisation map"));
            }
            data.push(self.code[position] * absmax[row * blocks_per_row + column / self.block]);
        }
        if let Some(diagonal) = diagonal {
            for index in 0..n {
                data[index * n + index] = diagonal[index];
            }
        }
        Ok(Matrix { rows: n, columns: n, data })
    }
}

/// `steps` Björck orthonormalisation steps, `V <- 1.5 V - 0.5 V V^T V` (the reference's
/// rectification of dequantised eigenvectors).
pub fn bjorck(matrix: &Matrix, steps: usize) -> Matrix {
    let mut current = matrix.clone();
    for _ in 0..steps {
        let cubic = product(&product(&current, false, &current, true), false, &current, false);
        for (value, cube) in current.data.iter_mut().zip(&cubic.data) {
            *value = 1.5 * *value - 0.5 * cube;
        }
    }
    current
}

/// The `Q` of a Householder QR factorisation of an `m x k` matrix (`m >= k`) with LAPACK's sign
/// convention (`dgeqr2` and `dorg2r`, as `torch.linalg.qr` and `numpy.linalg.qr` give it): each
/// reflector maps its column to `beta e_1` with `beta = -sign(alpha) |x|`, where `alpha` is the
/// column's leading entry, and is skipped when the rest of the column is already zero. The sign of
/// each column of `Q` matters here because the quantisation map is not symmetric.
pub fn householder_q(matrix: &Matrix) -> Matrix {
    let (m, k) = (matrix.rows, matrix.columns.min(matrix.rows));
    let columns = matrix.columns;
    // Column-major working copy: `work[column * m + row]`.
    let mut work = vec![0.0; m * columns];
    for row in 0..m {
        for column in 0..columns {
            work[column * m + row] = matrix.at(row, column);
        }
    }
    let mut taus = vec![0.0; k];
    for j in 0..k {
        let alpha = work[j * m + j];
        let rest_norm = frobenius(&work[j * m + j + 1..(j + 1) * m]);
        if rest_norm == 0.0 {
            continue;
        }
        let norm = alpha.hypot(rest_norm);
        let beta = if alpha >= 0.0 { -norm } else { norm };
        taus[j] = (beta - alpha) / beta;
        let scale = 1.0 / (alpha - beta);
        work[j * m + j + 1..(j + 1) * m].iter_mut().for_each(|value| *value *= scale);
        work[j * m + j] = beta;
        for column in j + 1..columns {
            let mut dot = work[column * m + j];
            for row in j + 1..m {
                dot += work[j * m + row] * work[column * m + row];
            }
            let factor = taus[j] * dot;
            work[column * m + j] -= factor;
            for row in j + 1..m {
                work[column * m + row] -= factor * work[j * m + row];
            }
        }
    }
    // Q = H_0 H_1 ... H_{k-1} applied to the first k columns of the identity, last reflector first.
    let mut q = vec![0.0; m * k];
    for index in 0..k {
        q[index * m + index] = 1.0;
    }
    for j in (0..k).rev() {
        if taus[j] == 0.0 {
            continue;
        }
        for column in j..k {
            let mut dot = q[column * m + j];
            for row in j + 1..m {
                dot += work[j * m + row] * q[column * m + row];
            }
            let factor = taus[j] * dot;
            q[column * m + j] -= factor;
            for row in j + 1..m {
                q[column * m + row] -= factor * work[j * m + row];
            }
        }
    }
    let mut data = vec![0.0; m * k];
    for row in 0..m {
        for column in 0..k {
            data[row * k + column] = q[column * m + row];
        }
    }
    Matrix { rows: m, columns: k, data }
}

/// `V^T diag(f(s)) V` for eigenvectors stored as the rows of `vectors_transposed`.
fn from_rows(values: &[f64], vectors_transposed: &Matrix, function: impl Fn(f64) -> f64) -> Matrix {
    let n = vectors_transposed.rows;
    let mut scaled = vectors_transposed.clone();
    for (row, value) in values.iter().enumerate() {
        let factor = function(*value);
        scaled.data[row * n..(row + 1) * n].iter_mut().for_each(|entry| *entry *= factor);
    }
    product(vectors_transposed, true, &scaled, false)
}

/// The hyperparameters of one 4-bit Shampoo parameter (the reference's names in brackets).
struct Settings {
    /// Statistics are accumulated at steps `t % statistics_every == 0` (`stat_compute_steps`, T1).
    statistics_every: u64,
    /// Inverse roots are recomputed at steps `t % root_every == 0` (`prec_compute_steps`, T2).
    root_every: u64,
    /// The first step that preconditions (`start_prec_step`).
    start: u64,
    /// The factors' decay (`stat_decay`); 1 gives a running sum.
    decay: f64,
    /// `matrix_eps`: the factors start at `eps I`, and the root adds `eps * max(s)`.
    matrix_eps: f64,
    root: f64,
    /// Tiles of at most `block x block` (`prec_maxorder`).
    block: usize,
    /// Björck steps after dequantising the eigenvectors for a statistics update (`rect_t1`) and for
    /// a root (`rect_t2`).
    rectify_steps: usize,
    rectify_root_steps: usize,
    b1: f64,
    b2: f64,
    adam_eps: f64,
    quantizer: Quantizer,
}

impl Settings {
    /// The defaults written here are the reference's; the structure's table supplies its own
    /// defaults for `ema`, `eps`, `root`, `every`, `block`, `b1` and `b2` (so the preset writes the
    /// reference's values), and the options this module added have none.
    fn read(plan: &ParamPlan) -> Result<Settings, String> {
        let options = &plan.options;
        let bits = number(options, "quantize", 4.0);
        // The widths, the function and the grafting quantised Shampoo takes are declared with the
        // other refusals, which `curv check` reports before a run starts.
        let refusals = curv_ir::executable::line_refusals(plan.structure, options, &plan.modifiers);
        if let Some(refusal) = refusals.into_iter().next() {
            return Err(format!("{} ({})", refusal.message, refusal.code));
        }
        let every = number(options, "every", 500.0).max(1.0) as u64;
        Ok(Settings {
            statistics_every: number(options, "statistics_every", 100.0).max(1.0) as u64,
            root_every: every,
            start: number(options, "start", 1.0).max(1.0) as u64,
            decay: number(options, "ema", 0.95),
            matrix_eps: number(options, "eps", 1e-6),
            root: number(options, "root", 4.0),
            block: number(options, "block", 1200.0).max(1.0) as usize,
            rectify_steps: number(options, "rectify_steps", 1.0).max(0.0) as usize,
            rectify_root_steps: number(options, "rectify_root_steps", 4.0).max(0.0) as usize,
            b1: number(options, "b1", 0.9),
            b2: number(options, "b2", 0.999),
            adam_eps: number(options, "adam_eps", 1e-8),
            quantizer: Quantizer {
                code: linear_square_map(bits as u32),
                block: number(options, "quantize_block", 64.0).max(1.0) as usize,
                min_size: number(options, "quantize_min_size", 4096.0).max(1.0) as usize,
            },
        })
    }
}

/// Where one factor (of one side of one tile) lives in the concatenated state vectors: its size
/// `n`, and its offsets among the `n x n` matrices, the absolute maxima and the `n`-vectors.
#[derive(Debug, Clone, Copy)]
struct Slot {
    n: usize,
    matrix: usize,
    blocks: usize,
    vector: usize,
}

/// The state of the left (or right) factors of all tiles of a parameter.
struct Side {
    /// The prefix of its state names, `left` or `right`.
    name: &'static str,
    slots: Vec<Slot>,
    /// `V^T` of each factor: codes when the factor is quantised, values otherwise.
    eigenvectors: Vec<f64>,
    eigenvector_absmax: Vec<f64>,
    eigenvalues: Vec<f64>,
    /// The inverse root of each factor: codes when quantised (diagonal kept apart), values otherwise.
    inverse: Vec<f64>,
    inverse_absmax: Vec<f64>,
    inverse_diagonal: Vec<f64>,
}

impl Side {
    fn new(name: &'static str, sizes: impl Iterator<Item = usize>, quantizer: &Quantizer) -> Side {
        let mut slots = Vec::new();
        let (mut matrix, mut blocks, mut vector) = (0, 0, 0);
        for n in sizes {
            slots.push(Slot { n, matrix, blocks, vector });
            matrix += n * n;
            blocks += quantizer.blocks(n);
            vector += n;
        }
        Side {
            name,
            slots,
            eigenvectors: vec![0.0; matrix],
            eigenvector_absmax: vec![0.0; blocks],
            eigenvalues: vec![0.0; vector],
            inverse: vec![0.0; matrix],
            inverse_absmax: vec![0.0; blocks],
            inverse_diagonal: vec![0.0; vector],
        }
    }

    fn sizes(&self) -> (usize, usize, usize) {
        let matrix = self.slots.iter().map(|slot| slot.n * slot.n).sum();
        let vector = self.slots.iter().map(|slot| slot.n).sum();
        (matrix, self.eigenvector_absmax.len(), vector)
    }

    fn state_names(&self) -> [(String, usize); 6] {
        let (matrix, blocks, vector) = self.sizes();
        let name = self.name;
        [
            (format!("{name}_eigenvectors"), matrix),
            (format!("{name}_eigenvector_absmax"), blocks),
            (format!("{name}_eigenvalues"), vector),
            (format!("{name}_inverse"), matrix),
            (format!("{name}_inverse_absmax"), blocks),
            (format!("{name}_inverse_diagonal"), vector),
        ]
    }

    fn buffers(&mut self) -> [&mut Vec<f64>; 6] {
        [
            &mut self.eigenvectors,
            &mut self.eigenvector_absmax,
            &mut self.eigenvalues,
            &mut self.inverse,
            &mut self.inverse_absmax,
            &mut self.inverse_diagonal,
        ]
    }

    fn load(&mut self, states: &mut States) -> Result<(), String> {
        let names = self.state_names();
        for ((name, size), buffer) in names.into_iter().zip(self.buffers()) {
            let values = std::mem::take(states.get(&name, &[size]));
            if values.len() != size {
                return Err(format!(
                    "the 4-bit Shampoo state `{name}` has {} values where {size} are expected \
                     (was it written with other `block` or `quantize_block` options?)",
                    values.len()
                ));
            }
            *buffer = values;
        }
        Ok(())
    }

    fn store(mut self, states: &mut States) {
        let names = self.state_names();
        for ((name, size), buffer) in names.into_iter().zip(self.buffers()) {
            *states.get(&name, &[size]) = std::mem::take(buffer);
        }
    }

    /// The reference's initial state: `V^T = I`, eigenvalues `eps`, inverse root `I`.
    fn initialise(&mut self, settings: &Settings) {
        for index in 0..self.slots.len() {
            let n = self.slots[index].n;
            let mut identity = Matrix { rows: n, columns: n, data: vec![0.0; n * n] };
            (0..n).for_each(|diagonal| identity.data[diagonal * n + diagonal] = 1.0);
            self.store_eigenvectors(index, &identity, settings);
            self.store_inverse(index, &identity, settings);
            let slot = self.slots[index];
            self.eigenvalues[slot.vector..slot.vector + n].fill(settings.matrix_eps);
        }
    }

    /// `V^T` as stored (dequantised, not yet rectified) and whether it was quantised.
    fn eigenvectors(&self, index: usize, settings: &Settings) -> Result<(Matrix, bool), String> {
        let Slot { n, matrix, blocks, .. } = self.slots[index];
        let quantizer = &settings.quantizer;
        if quantizer.applies(n) {
            let codes = &self.eigenvectors[matrix..matrix + n * n];
            let absmax = &self.eigenvector_absmax[blocks..blocks + quantizer.blocks(n)];
            Ok((quantizer.dequantize(n, codes, absmax, None)?, true))
        } else {
            Ok((Matrix { rows: n, columns: n, data: self.eigenvectors[matrix..matrix + n * n].to_vec() }, false))
        }
    }

    fn store_eigenvectors(&mut self, index: usize, vectors_transposed: &Matrix, settings: &Settings) {
        let Slot { n, matrix, blocks, .. } = self.slots[index];
        let quantizer = &settings.quantizer;
        let destination = &mut self.eigenvectors[matrix..matrix + n * n];
        if quantizer.applies(n) {
            let absmax = &mut self.eigenvector_absmax[blocks..blocks + quantizer.blocks(n)];
            quantizer.quantize(vectors_transposed, destination, absmax, None);
        } else {
            destination.copy_from_slice(&vectors_transposed.data);
        }
    }

    fn inverse(&self, index: usize, settings: &Settings) -> Result<Matrix, String> {
        let Slot { n, matrix, blocks, vector } = self.slots[index];
        let quantizer = &settings.quantizer;
        let values = &self.inverse[matrix..matrix + n * n];
        if quantizer.applies(n) {
            let absmax = &self.inverse_absmax[blocks..blocks + quantizer.blocks(n)];
            quantizer.dequantize(n, values, absmax, Some(&self.inverse_diagonal[vector..vector + n]))
        } else {
            Ok(Matrix { rows: n, columns: n, data: values.to_vec() })
        }
    }

    fn store_inverse(&mut self, index: usize, root: &Matrix, settings: &Settings) {
        let Slot { n, matrix, blocks, vector } = self.slots[index];
        let quantizer = &settings.quantizer;
        let destination = &mut self.inverse[matrix..matrix + n * n];
        if quantizer.applies(n) {
            let absmax = &mut self.inverse_absmax[blocks..blocks + quantizer.blocks(n)];
            let diagonal = &mut self.inverse_diagonal[vector..vector + n];
            quantizer.quantize(root, destination, absmax, Some(diagonal));
        } else {
            destination.copy_from_slice(&root.data);
        }
    }

    /// The reference's `add_statistics` for one factor (`QTensorSVDFast.dequantize` and
    /// `quantize`): `A = V diag(s) V^T` from the dequantised, rectified eigenvectors,
    /// `A <- decay A + weight X`, one step of subspace iteration `V <- qr(A V).Q`,
    /// `s <- diag(V^T A V)`, and `V^T` stored again.
    fn accumulate(&mut self, index: usize, fresh: &Matrix, settings: &Settings) -> Result<(), String> {
        let slot = self.slots[index];
        let (stored, quantized) = self.eigenvectors(index, settings)?;
        let vectors_transposed = if quantized { bjorck(&stored, settings.rectify_steps) } else { stored };
        let values = &self.eigenvalues[slot.vector..slot.vector + slot.n];
        let mut factor = from_rows(values, &vectors_transposed, |value| value);
        let weight = if settings.decay == 1.0 { 1.0 } else { 1.0 - settings.decay };
        for (value, new) in factor.data.iter_mut().zip(&fresh.data) {
            *value = settings.decay * *value + weight * new;
        }
        if !factor.data.iter().all(|value| value.is_finite()) {
            return Err(format!("a 4-bit Shampoo {} factor has non-finite entries", self.name));
        }
        let vectors = householder_q(&product(&factor, false, &vectors_transposed, true));
        let projected = product(&factor, false, &vectors, false);
        let n = slot.n;
        for column in 0..n {
            self.eigenvalues[slot.vector + column] =
                (0..n).map(|row| vectors.at(row, column) * projected.at(row, column)).sum();
        }
        self.store_eigenvectors(index, &transpose(&vectors), settings);
        Ok(())
    }

    /// The reference's `compute_preconditioners` for one factor (`QTensorSVDFast.computepower` and
    /// `compute_power`): `V` dequantised and rectified by `rectify_root_steps` Björck steps,
    /// `rho = eps max(s)`, `root = V diag((s + rho)^(-1/root)) V^T`, stored quantised with its
    /// diagonal kept.
    fn refresh_root(&mut self, index: usize, settings: &Settings) -> Result<(), String> {
        let slot = self.slots[index];
        let (stored, quantized) = self.eigenvectors(index, settings)?;
        let vectors_transposed = if quantized { bjorck(&stored, settings.rectify_root_steps) } else { stored };
        let values = &self.eigenvalues[slot.vector..slot.vector + slot.n];
        let ridge = settings.matrix_eps * values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let root = from_rows(values, &vectors_transposed, |value| 1.0 / (value + ridge).powf(1.0 / settings.root));
        if !root.data.iter().all(|value| value.is_finite()) {
            return Err(format!(
                "the inverse root of a 4-bit Shampoo {} factor is not finite (eigenvalues {:?} ...)",
                self.name,
                &values[..values.len().min(4)]
            ));
        }
        self.store_inverse(index, &root, settings);
        Ok(())
    }
}

/// One step: returns the direction (the step is `-lr * direction`).
pub(crate) fn direction(
    plan: &ParamPlan,
    shape: &[usize],
    states: &mut States,
    inputs: &KroneckerInputs,
) -> Result<Option<Vec<f64>>, String> {
    let settings = Settings::read(plan)?;
    let step = inputs.step.max(1);
    let gradient = inputs.gradient;
    let (rows, columns) = matrix_shape(shape);
    if gradient.len() != rows * columns {
        return Err(format!("the gradient has {} values, the parameter {}", gradient.len(), rows * columns));
    }
    let gradient_norm = frobenius(gradient);
    // The reference drops dimensions of size one; what is left of a matrix with one is a vector,
    // which has no preconditioner.
    let preconditioned = if rows > 1 && columns > 1 {
        let pytorch_transposed = shape.len() == 2;
        shampoo_direction(&settings, rows, columns, pytorch_transposed, states, step, gradient)?
    } else {
        gradient.to_vec()
    };
    // The direction rescaled to the gradient's norm, over the whole parameter ("SGD grafting").
    let grafted: Vec<f64> = if step >= settings.start {
        let scale = gradient_norm / (frobenius(&preconditioned) + 1e-12);
        preconditioned.iter().map(|value| value * scale).collect()
    } else {
        gradient.to_vec()
    };
    // Adam on the grafted direction (`ShampooAdamW`).
    let (b1, b2) = (settings.b1, settings.b2);
    let mut m = std::mem::take(states.get("m", shape));
    let mut v = std::mem::take(states.get("v", shape));
    if m.len() != gradient.len() || v.len() != gradient.len() {
        return Err("the 4-bit Shampoo moments `m` and `v` do not have the parameter's size".to_string());
    }
    let correction1 = 1.0 - b1.powf(step as f64);
    let root_correction2 = (1.0 - b2.powf(step as f64)).sqrt();
    let mut direction = Vec::with_capacity(gradient.len());
    for ((first, second), value) in m.iter_mut().zip(v.iter_mut()).zip(&grafted) {
        *first = b1 * *first + (1.0 - b1) * value;
        *second = b2 * *second + (1.0 - b2) * value * value;
        let denominator = second.sqrt() / root_correction2 + settings.adam_eps;
        direction.push(*first / denominator / correction1);
    }
    *states.get("m", shape) = m;
    *states.get("v", shape) = v;
    Ok(Some(direction))
}

/// The preconditioned gradient per tile (before grafting): `Lroot^T G Rroot^T` when the parameter
/// is PyTorch's layout transposed (a matrix), `Lroot G Rroot` otherwise, after the factors and
/// roots have been refreshed when this step's cadences ask for it.
fn shampoo_direction(
    settings: &Settings,
    rows: usize,
    columns: usize,
    pytorch_transposed: bool,
    states: &mut States,
    step: u64,
    gradient: &[f64],
) -> Result<Vec<f64>, String> {
    let tiles: Vec<Tile> = tiles(rows, columns, settings.block);
    let mut left = Side::new("left", tiles.iter().map(|tile| tile.rows), &settings.quantizer);
    let mut right = Side::new("right", tiles.iter().map(|tile| tile.columns), &settings.quantizer);
    let first = !states.values.iter().any(|(name, _, _)| name == "left_eigenvalues");
    if first {
        left.initialise(settings);
        right.initialise(settings);
    } else {
        left.load(states)?;
        right.load(states)?;
    }
    if step.is_multiple_of(settings.statistics_every) {
        for (index, tile) in tiles.iter().enumerate() {
            let g = tile.extract(gradient, columns);
            left.accumulate(index, &product(&g, false, &g, true), settings)?;
            right.accumulate(index, &product(&g, true, &g, false), settings)?;
        }
    }
    if step.is_multiple_of(settings.root_every) {
        for index in 0..tiles.len() {
            left.refresh_root(index, settings)?;
            right.refresh_root(index, settings)?;
        }
    }
    let mut direction = vec![0.0; gradient.len()];
    if step >= settings.start {
        for (index, tile) in tiles.iter().enumerate() {
            let g = tile.extract(gradient, columns);
            let left_root = left.inverse(index, settings)?;
            let right_root = right.inverse(index, settings)?;
            let preconditioned =
                product(&product(&left_root, pytorch_transposed, &g, false), false, &right_root, pytorch_transposed);
            tile.insert(&preconditioned, &mut direction, columns);
        }
    } else {
        direction.copy_from_slice(gradient);
    }
    left.store(states);
    right.store(states);
    Ok(direction)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kronecker::identity;

    fn random_matrix(rows: usize, columns: usize, seed: u64) -> Matrix {
        let mut random = crate::random::Random::new(seed, crate::random::Stream::Probe, 0);
        Matrix { rows, columns, data: (0..rows * columns).map(|_| random.normal()).collect() }
    }

    fn distance(a: &Matrix, b: &Matrix) -> f64 {
        let difference: Vec<f64> = a.data.iter().zip(&b.data).map(|(x, y)| x - y).collect();
        frobenius(&difference)
    }

    #[test]
    fn the_four_bit_map_is_the_signed_squared_linear_map() {
        let code = linear_square_map(4);
        assert_eq!(code.len(), 16);
        assert_eq!(code[0], -1.0);
        assert_eq!(code[7], 0.0);
        assert_eq!(code[15], 1.0);
        assert!((code[6] + (3.0f64 / 15.0).powi(2)).abs() < 1e-15);
        assert!((code[8] - (1.0f64 / 15.0).powi(2)).abs() < 1e-15);
        assert!(code.windows(2).all(|pair| pair[0] < pair[1]));
        assert_eq!(linear_square_map(8).len(), 256);
    }

    #[test]
    fn the_binary_search_finds_the_nearest_code() {
        for bits in [4, 8] {
            let code = linear_square_map(bits);
            for index in 0..=2000 {
                let x = -1.0 + index as f64 / 1000.0 + 1e-7;
                let found = code_index(&code, x);
                let nearest =
                    (0..code.len()).min_by(|&a, &b| (code[a] - x).abs().total_cmp(&(code[b] - x).abs())).unwrap();
                assert!((code[found] - x).abs() <= (code[nearest] - x).abs() + 1e-15, "{bits} bits, x = {x}");
            }
            assert_eq!(code[code_index(&code, 0.0)], 0.0);
            assert_eq!(code_index(&code, 1.0), code.len() - 1);
            assert_eq!(code_index(&code, -1.0), 0);
        }
    }

    #[test]
    fn quantisation_keeps_the_identity_exact_and_bounds_the_error() {
        let quantizer = Quantizer { code: linear_square_map(4), block: 8, min_size: 1 };
        let n = 13;
        let (mut codes, mut absmax, mut diagonal) = (vec![0.0; n * n], vec![0.0; quantizer.blocks(n)], vec![0.0; n]);
        quantizer.quantize(&identity(n), &mut codes, &mut absmax, None);
        assert_eq!(quantizer.dequantize(n, &codes, &absmax, None).unwrap(), identity(n));
        let matrix = random_matrix(n, n, 5);
        quantizer.quantize(&matrix, &mut codes, &mut absmax, Some(&mut diagonal));
        let restored = quantizer.dequantize(n, &codes, &absmax, Some(&diagonal)).unwrap();
        for row in 0..n {
            assert_eq!(restored.at(row, row), matrix.at(row, row));
            for column in 0..n {
                // The widest gap of the map is between (13/15)^2 and 1: half of it, times absmax.
                let block_max = absmax[row * 2 + column / 8];
                assert!((restored.at(row, column) - matrix.at(row, column)).abs() <= 0.125 * block_max + 1e-12);
            }
        }
        assert!(quantizer.dequantize(n, &vec![16.0; n * n], &absmax, None).is_err());
    }

    #[test]
    fn householder_q_is_orthonormal_with_lapack_signs() {
        let a = random_matrix(9, 9, 7);
        let q = householder_q(&a);
        assert!(distance(&product(&q, true, &q, false), &identity(9)) < 1e-12);
        let r = product(&q, true, &a, false);
        for row in 0..9 {
            for column in 0..row {
                assert!(r.at(row, column).abs() < 1e-12);
            }
        }
        // LAPACK: the first diagonal entry of R has the sign opposite to the first column's leading entry.
        assert!(r.at(0, 0) * a.at(0, 0) < 0.0);
        assert!(distance(&product(&q, false, &r, false), &a) < 1e-12);
        // A column that is already reduced is not reflected.
        assert_eq!(householder_q(&identity(4)), identity(4));
    }

    #[test]
    fn bjorck_steps_restore_orthonormality() {
        let q = householder_q(&random_matrix(12, 12, 9));
        let mut perturbed = q.clone();
        let noise = random_matrix(12, 12, 10);
        perturbed.data.iter_mut().zip(&noise.data).for_each(|(value, e)| *value += 0.01 * e);
        let error = |m: &Matrix| distance(&product(m, false, m, true), &identity(12));
        let before = error(&perturbed);
        let after = error(&bjorck(&perturbed, 4));
        assert!(after < before * 1e-3, "before {before}, after {after}");
    }

    fn plan(options: &[(&str, f64)]) -> ParamPlan {
        let mut all = vec![
            ("stats".to_string(), curv_ir::OptionValue::Name("gradient_outer".to_string())),
            ("function".to_string(), curv_ir::OptionValue::Name("inverse_root".to_string())),
        ];
        all.extend(options.iter().map(|(name, value)| (name.to_string(), curv_ir::OptionValue::Number(*value))));
        ParamPlan {
            param: 0,
            pattern: "*".to_string(),
            structure: curv_ir::StructureKind::Kronecker,
            rule_name: "kronecker".to_string(),
            options: all,
            modifiers: Vec::new(),
            state: Vec::new(),
            span: Default::default(),
        }
    }

    fn run(shape: &[usize], options: &[(&str, f64)], steps: u64) -> (Vec<f64>, States) {
        let plan = plan(options);
        let mut states = States { values: Vec::new() };
        let count: usize = shape.iter().product();
        let mut last = Vec::new();
        for step in 1..=steps {
            let gradient = random_matrix(1, count, step).data;
            let inputs =
                KroneckerInputs { step, learning_rate: 0.1, gradient: &gradient, captures: None, seed: 1, param: 0 };
            last = direction(&plan, shape, &mut states, &inputs).unwrap().unwrap();
            assert_eq!(last.len(), count);
            assert!(last.iter().all(|value| value.is_finite()), "{shape:?}");
        }
        (last, states)
    }

    #[test]
    fn every_shape_gives_a_finite_direction_and_codes_in_the_map() {
        let options = [("quantize", 4.0), ("quantize_min_size", 1.0), ("quantize_block", 4.0), ("every", 2.0)];
        for shape in [vec![1, 5], vec![5, 1], vec![6, 4], vec![2, 3, 4], vec![7, 9]] {
            let (_, states) = run(&shape, &[&options[..], &[("statistics_every", 1.0), ("block", 5.0)]].concat(), 5);
            for (name, values, _) in &states.values {
                if name.ends_with("_eigenvectors") || name.ends_with("_inverse") {
                    assert!(values.iter().all(|code| code.fract() == 0.0 && (0.0..16.0).contains(code)), "{name}");
                }
            }
        }
        // Options that change the state's layout are an error on resumption, not a panic.
        let (_, mut states) = run(&[6, 4], &options, 2);
        let gradient = vec![1.0; 24];
        let inputs =
            KroneckerInputs { step: 3, learning_rate: 0.1, gradient: &gradient, captures: None, seed: 1, param: 0 };
        let other = plan(&[("quantize", 4.0), ("quantize_min_size", 1.0), ("quantize_block", 2.0)]);
        assert!(direction(&other, &[6, 4], &mut states, &inputs).is_err());
        assert!(direction(&plan(&[("quantize", 3.0)]), &[6, 4], &mut states, &inputs).is_err());
    }

    #[test]
    fn a_conv_kernel_is_preconditioned_in_its_own_layout_and_a_matrix_transposed() {
        // The same matrix view [4, 6], once as a matrix and once as a rank-3 tensor: their first
        // preconditioned steps differ only by the transposition of the quantised roots.
        let options = [("quantize", 4.0), ("quantize_min_size", 1.0), ("statistics_every", 1.0), ("every", 1.0)];
        let (matrix, _) = run(&[4, 6], &options, 1);
        let (kernel, _) = run(&[4, 2, 3], &options, 1);
        let difference: f64 = matrix.iter().zip(&kernel).map(|(a, b)| (a - b).abs()).sum();
        assert!(difference > 1e-6, "the layouts should differ through the quantised roots");
        let unquantized = [("quantize", 4.0), ("statistics_every", 1.0), ("every", 1.0)];
        let (matrix, _) = run(&[4, 6], &unquantized, 1);
        let (kernel, _) = run(&[4, 2, 3], &unquantized, 1);
        let difference: f64 = matrix.iter().zip(&kernel).map(|(a, b)| (a - b).abs()).sum();
        assert!(difference < 1e-9, "unquantised roots are symmetric: {difference}");
    }

    #[test]
    fn with_exact_eigenvectors_the_root_is_the_ridged_inverse_fourth_root() {
        let x = random_matrix(6, 9, 11);
        let a = product(&x, false, &x, true);
        let (values, vectors) = crate::linalg::symmetric_eigen(&a).unwrap();
        let ridge = 1e-6 * values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let root = from_rows(&values, &transpose(&vectors), |value| 1.0 / (value + ridge).powf(0.25));
        let expected = crate::kronecker::inverse_root(&crate::kronecker::add_to_diagonal(&a, ridge), 4.0, 0.0).unwrap();
        assert!(distance(&root, &expected) < 1e-10 * frobenius(&expected.data));
    }
}
