//! PSGD-Kron: the `kronecker` structure with `stats = psgd, function = lie_group`, Xi-Lin Li's
//! preconditioned SGD with a Kronecker-factored gradient-whitening preconditioner `P = Q^T Q`
//! fitted on the Lie group (docs/language.md §12.7).
//!
//! It follows `KronWhiten` of lixilinx/psgd_torch `psgd.py` with its default geometry
//! `dQ = "Q0.5EQ1.5"` (`update_precond_kron_whiten_q0p5eq1p5`): each factor `Q_i` moves as
//! `Q_i <- Q_i - (lr_precond / L_i) (T_i Q_i - c_i Q_i)` and is then rotated towards a symmetric
//! positive definite matrix by one step of the online orthogonal Procrustes solver
//! (`procrustes_step2`); `L_i` is a running estimate of the Lipschitz constant of the fitting loss,
//! from a cheap lower bound of a spectral norm (`norm_lower_bound_spd`). The gradient is
//! preconditioned as `precond_grad_kron` does, its RMS and its elements are clipped as `KronWhiten`
//! clips them (`grad_clip_max_amps`), and the step is `W <- W - lr * direction`.
//!
//! The parameter is its matrix view `[rows, columns]` (`kronecker::matrix_shape`) with dimensions
//! of size one dropped (the reference squeezes its gradients): a dimension keeps a dense factor when
//! `size <= max_size` and `size^2 <= max_skew * numel`, a diagonal one otherwise. All the noise the
//! reference draws with `torch.rand`/`torch.randn` comes from curv's counter-based generator on the
//! `Preconditioner` stream, so that a run is reproducible and resumable and the oracle test
//! (tests/oracle/test_psgd.py) can draw the same numbers.

use crate::kronecker::{matrix_shape, number, product, transpose, KroneckerInputs, States};
use crate::linalg::Matrix;
use crate::random::{Random, Stream};
use curv_ir::{option_number, ParamPlan};

/// The number of probe vectors of the spectral-norm lower bounds (the reference's `k`).
const NORM_BOUND_PROBES: usize = 32;
/// Half the number of subspace iterations of the spectral-norm lower bounds (`half_iters`).
const NORM_BOUND_HALF_ITERATIONS: usize = 2;
/// The largest rotation step of the online Procrustes solver (`procrustes_step2`'s default).
const PROCRUSTES_MAX_STEP: f64 = 1.0 / 8.0;
/// The probability of rebalancing the magnitudes of the factors after an update of `Q`.
const BALANCE_PROBABILITY: f64 = 0.01;
/// The key offset, per step, of the generator shared by all parameters: the coin that decides
/// whether the preconditioners are updated at a step is one draw for all of them, as in the
/// reference (parameter keys are `step * 65_536 + index`, so index 65_535 is reserved for it).
const SHARED_COIN_KEY: u64 = 65_535;
/// `torch.finfo(torch.float64).smallest_normal`, which the reference adds to every denominator.
const SMALLEST_NORMAL: f64 = f64::MIN_POSITIVE;

/// The hyperparameters of one PSGD-Kron update, with `KronWhiten`'s defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Settings {
    /// `lr_preconditioner` (0.1).
    pub(crate) lr_precond: f64,
    /// `preconditioner_update_probability` (1).
    pub(crate) update_probability: f64,
    /// `preconditioner_max_size` (infinite).
    pub(crate) max_size: f64,
    /// `preconditioner_max_skew` (1).
    pub(crate) max_skew: f64,
    /// `preconditioner_init_scale` (`None`: set from the first gradient).
    pub(crate) init_scale: Option<f64>,
    /// `betaL` (0.9).
    pub(crate) lipschitz_ema: f64,
    /// `damping` (1e-9).
    pub(crate) noise_damping: f64,
    /// `momentum` (0).
    pub(crate) momentum: f64,
    /// `grad_clip_max_amps` (2, 10).
    pub(crate) max_rms: f64,
    pub(crate) max_abs: f64,
}

impl Settings {
    pub(crate) fn from_plan(plan: &ParamPlan) -> Settings {
        let options = &plan.options;
        Settings {
            lr_precond: number(options, "lr_precond", 0.1),
            update_probability: number(options, "update_probability", 1.0),
            max_size: number(options, "max_size", f64::INFINITY),
            max_skew: number(options, "max_skew", 1.0),
            init_scale: option_number(options, "init_scale"),
            lipschitz_ema: number(options, "lipschitz_ema", 0.9),
            noise_damping: number(options, "noise_damping", 1e-9),
            momentum: number(options, "momentum", 0.0),
            max_rms: number(options, "max_rms", 2.0),
            max_abs: number(options, "max_abs", 10.0),
        }
    }
}

/// The form of one factor of `Q`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FactorForm {
    /// The dimension has size one and was squeezed away: no factor.
    Absent,
    /// A dense `size x size` matrix.
    Dense,
    /// A diagonal, stored as a vector of `size` values.
    Diagonal,
}

/// The forms of the row (left) and column (right) factors of a `rows x columns` parameter, as the
/// reference's `init_kron` picks them for the squeezed gradient. A `1 x 1` parameter is a scalar,
/// which the reference preconditions with one diagonal factor of size one.
pub(crate) fn factor_forms(rows: usize, columns: usize, settings: &Settings) -> [FactorForm; 2] {
    let numel = (rows * columns) as f64;
    let form = |size: usize| {
        let size_f = size as f64;
        if size <= 1 || size_f > settings.max_size || size_f * size_f > settings.max_skew * numel {
            FactorForm::Diagonal
        } else {
            FactorForm::Dense
        }
    };
    let left = if rows > 1 { form(rows) } else { FactorForm::Absent };
    let right = if columns > 1 || rows == 1 { form(columns) } else { FactorForm::Absent };
    [left, right]
}

/// One factor of `Q` as the update holds it: a dense matrix or a diagonal (stored as its values in
/// `Matrix::data`, with `columns = 1`).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Factor {
    pub(crate) form: FactorForm,
    pub(crate) values: Matrix,
}

/// `-1`, `0` or `1`, as `torch.sign` (Rust's `signum` gives `1` at zero).
fn sign(value: f64) -> f64 {
    if value > 0.0 {
        1.0
    } else if value < 0.0 {
        -1.0
    } else {
        0.0
    }
}

fn row_norm(matrix: &Matrix, row: usize) -> f64 {
    let start = row * matrix.columns;
    matrix.data[start..start + matrix.columns].iter().map(|value| value * value).sum::<f64>().sqrt()
}

/// The reference's `norm_lower_bound_spd` (`symmetric = true`: the matrix is scaled by its largest
/// diagonal element) and `norm_lower_bound_skh` (`symmetric = false`: by its largest absolute
/// element): a cheap lower bound of the spectral norm of a symmetric or skew-symmetric matrix by
/// `NORM_BOUND_PROBES` probe vectors, each started as the largest row of the matrix plus a normal
/// vector signed to agree with that row, and `2 * NORM_BOUND_HALF_ITERATIONS` subspace iterations.
/// The probes are drawn from `random`, row after row.
pub(crate) fn norm_lower_bound(matrix: &Matrix, symmetric: bool, random: &mut Random) -> f64 {
    let n = matrix.columns;
    let largest = if symmetric {
        (0..n).map(|index| matrix.at(index, index)).fold(f64::NEG_INFINITY, f64::max)
    } else {
        matrix.data.iter().map(|value| value.abs()).fold(f64::NEG_INFINITY, f64::max)
    };
    let normalizing_factor = largest + SMALLEST_NORMAL;
    let scaled =
        Matrix { rows: n, columns: n, data: matrix.data.iter().map(|value| value / normalizing_factor).collect() };
    // The first row of largest norm, as torch.argmax.
    let mut largest_row = 0;
    let mut largest_norm = f64::NEG_INFINITY;
    for row in 0..n {
        let norm = row_norm(&scaled, row);
        if norm > largest_norm {
            largest_row = row;
            largest_norm = norm;
        }
    }
    let anchor = &scaled.data[largest_row * n..(largest_row + 1) * n];
    let mut probes = Matrix { rows: NORM_BOUND_PROBES, columns: n, data: vec![0.0; NORM_BOUND_PROBES * n] };
    for value in probes.data.iter_mut() {
        *value = random.normal();
    }
    for probe in probes.data.chunks_mut(n.max(1)) {
        let agreement = sign(anchor.iter().zip(probe.iter()).map(|(a, v)| a * v).sum::<f64>());
        for (value, a) in probe.iter_mut().zip(anchor) {
            *value = a + agreement * *value;
        }
    }
    for _ in 0..NORM_BOUND_HALF_ITERATIONS {
        probes = product(&probes, false, &scaled, false);
        for row in 0..probes.rows {
            let norm = row_norm(&probes, row) + SMALLEST_NORMAL;
            probes.data[row * n..(row + 1) * n].iter_mut().for_each(|value| *value /= norm);
        }
        probes = product(&probes, false, &scaled, false);
    }
    let largest_probe = (0..probes.rows).map(|row| row_norm(&probes, row)).fold(0.0, f64::max);
    normalizing_factor * largest_probe
}

/// The reference's `procrustes_step2`: rotates `Q` towards a symmetric positive definite matrix by
/// `exp(a R) Q ~ (I + a R + (a R)^2 / 2) Q`, where `R = Q^T - Q` is normalised by the lower bound of
/// its spectral norm, and `a = min(-tr(RQ) / tr(RRQ), 1/8)` when `tr(RRQ) < 0`, `a = 1/8` otherwise.
pub(crate) fn procrustes_step(q: &mut Matrix, random: &mut Random) {
    let q_transposed = transpose(q);
    let mut generator = Matrix {
        rows: q.rows,
        columns: q.columns,
        data: q_transposed.data.iter().zip(&q.data).map(|(transposed, value)| transposed - value).collect(),
    };
    let norm = norm_lower_bound(&generator, false, random) + SMALLEST_NORMAL;
    generator.data.iter_mut().for_each(|value| *value /= norm);
    let rq = product(&generator, false, q, false);
    let rrq = product(&generator, false, &rq, false);
    let trace_rq: f64 = (0..q.rows).map(|index| rq.at(index, index)).sum();
    let trace_rrq: f64 = (0..q.rows).map(|index| rrq.at(index, index)).sum();
    let step = if trace_rrq < 0.0 { (-trace_rq / trace_rrq).min(PROCRUSTES_MAX_STEP) } else { PROCRUSTES_MAX_STEP };
    for ((value, first), second) in q.data.iter_mut().zip(&rq.data).zip(&rrq.data) {
        *value += step * (first + 0.5 * step * second);
    }
}

/// `P G` with `P = Q^T Q` applied along both dimensions of `G` (`precond_grad_kron`):
/// `Q_L^T Q_L G Q_R^T Q_R`, a diagonal factor scaling rows or columns by `q^2`.
pub(crate) fn precondition(factors: &[Option<Factor>; 2], gradient: &Matrix) -> Matrix {
    let mut result = gradient.clone();
    let columns = gradient.columns;
    if let Some(left) = &factors[0] {
        match left.form {
            FactorForm::Dense => {
                result = product(&left.values, true, &product(&left.values, false, &result, false), false);
            }
            _ => {
                for (row, chunk) in result.data.chunks_mut(columns.max(1)).enumerate() {
                    let scale = left.values.data[row] * left.values.data[row];
                    chunk.iter_mut().for_each(|value| *value *= scale);
                }
            }
        }
    }
    if let Some(right) = &factors[1] {
        match right.form {
            FactorForm::Dense => {
                result = product(&product(&result, false, &right.values, true), false, &right.values, false);
            }
            _ => {
                for chunk in result.data.chunks_mut(columns.max(1)) {
                    for (value, q) in chunk.iter_mut().zip(&right.values.data) {
                        *value *= q * q;
                    }
                }
            }
        }
    }
    result
}

/// The second-moment statistic of factor `side` (0: rows, 1: columns) of the preconditioned noisy
/// gradient `U`: `U U^T` or `U^T U` for a dense factor, the diagonal of it for a diagonal one.
fn factor_statistic(preconditioned: &Matrix, side: usize, form: FactorForm) -> Matrix {
    match (side, form) {
        (0, FactorForm::Dense) => product(preconditioned, false, preconditioned, true),
        (_, FactorForm::Dense) => product(preconditioned, true, preconditioned, false),
        (0, _) => Matrix {
            rows: preconditioned.rows,
            columns: 1,
            data: (0..preconditioned.rows).map(|row| row_norm(preconditioned, row).powi(2)).collect(),
        },
        _ => {
            let mut sums = vec![0.0; preconditioned.columns];
            for chunk in preconditioned.data.chunks(preconditioned.columns.max(1)) {
                for (sum, value) in sums.iter_mut().zip(chunk) {
                    *sum += value * value;
                }
            }
            Matrix { rows: preconditioned.columns, columns: 1, data: sums }
        }
    }
}

/// One fit of `Q` to the gradient (`update_precond_kron_whiten_q0p5eq1p5`), in place: the noisy
/// gradient `G + (noise_damping + eps |G|) * N` (`N` standard normal, drawn from `random`) is
/// preconditioned into `U`; then each factor, with `T` its statistic of `U` and
/// `c = numel / size`, takes the Lipschitz estimate `ell = |T|_lb + c` (`max T + c` for a diagonal),
/// `L <- max(ema L + (1 - ema) ell, ell)`, and moves as `Q <- Q - (lr / L) (T Q - c Q)` followed by
/// one Procrustes step (`q <- q (1 - (lr / L) (T - c))` for a diagonal); with probability 1/100 the
/// factors' magnitudes are then rebalanced.
pub(crate) fn fit_preconditioner(
    factors: &mut [Option<Factor>; 2],
    lipschitz: &mut [f64],
    gradient: &Matrix,
    settings: &Settings,
    random: &mut Random,
) {
    let numel = gradient.data.len() as f64;
    let mut noisy = gradient.clone();
    for value in noisy.data.iter_mut() {
        let noise = random.normal();
        *value += (settings.noise_damping + f64::EPSILON * value.abs()) * noise;
    }
    let preconditioned = precondition(factors, &noisy);
    let (ema, lr) = (settings.lipschitz_ema, settings.lr_precond);
    for (side, slot) in factors.iter_mut().enumerate() {
        let Some(factor) = slot else { continue };
        let statistic = factor_statistic(&preconditioned, side, factor.form);
        let size = factor.values.rows as f64;
        let identity_weight = numel / size;
        let ell = match factor.form {
            FactorForm::Dense => norm_lower_bound(&statistic, true, random) + identity_weight,
            _ => statistic.data.iter().copied().fold(f64::NEG_INFINITY, f64::max) + identity_weight,
        };
        lipschitz[side] = (ema * lipschitz[side] + (1.0 - ema) * ell).max(ell);
        let rate = lr / lipschitz[side];
        match factor.form {
            FactorForm::Dense => {
                let moved = product(&statistic, false, &factor.values, false);
                for (value, tq) in factor.values.data.iter_mut().zip(&moved.data) {
                    *value -= rate * (tq - identity_weight * *value);
                }
                procrustes_step(&mut factor.values, random);
            }
            _ => {
                for (value, t) in factor.values.data.iter_mut().zip(&statistic.data) {
                    *value *= 1.0 - rate * (t - identity_weight);
                }
            }
        }
    }
    if random.uniform() < BALANCE_PROBABILITY {
        balance(factors);
    }
}

/// The reference's `balance_kron_precond`: with two factors, each is scaled so that its largest
/// absolute element becomes the geometric mean of the two largest absolute elements.
pub(crate) fn balance(factors: &mut [Option<Factor>; 2]) {
    if let [Some(left), Some(right)] = factors {
        let largest = |factor: &Factor| factor.values.data.iter().map(|value| value.abs()).fold(0.0, f64::max);
        let (left_norm, right_norm) = (largest(left), largest(right));
        let geometric_mean = (left_norm * right_norm).sqrt();
        left.values.data.iter_mut().for_each(|value| *value *= geometric_mean / left_norm);
        right.values.data.iter_mut().for_each(|value| *value *= geometric_mean / right_norm);
    }
}

/// `KronWhiten`'s clipping of a preconditioned gradient: scaled down to an RMS of `max_rms` when
/// above it, then clamped elementwise to `[-max_abs, max_abs]`.
pub(crate) fn clip(direction: &mut [f64], max_rms: f64, max_abs: f64) {
    let rms = (direction.iter().map(|value| value * value).sum::<f64>() / direction.len().max(1) as f64).sqrt();
    if rms > max_rms {
        direction.iter_mut().for_each(|value| *value *= max_rms / rms);
    }
    direction.iter_mut().for_each(|value| *value = value.clamp(-max_abs, max_abs));
}

const FACTOR_NAMES: [&str; 2] = ["left_preconditioner", "right_preconditioner"];

/// One step: returns the direction (the step is `-lr * direction`); PSGD-Kron moves the parameter
/// at every step, so this is never `None`.
pub(crate) fn direction(
    plan: &ParamPlan,
    shape: &[usize],
    states: &mut States,
    inputs: &KroneckerInputs,
) -> Result<Option<Vec<f64>>, String> {
    let settings = Settings::from_plan(plan);
    let (rows, columns) = matrix_shape(shape);
    let gradient = inputs.gradient;
    if gradient.len() != rows * columns {
        return Err(format!("PSGD-Kron: the gradient has {} values, the parameter {}", gradient.len(), rows * columns));
    }
    if !(settings.max_rms > 0.0 && settings.max_abs > 0.0 && settings.lr_precond > 0.0) {
        return Err("PSGD-Kron: `lr_precond`, `max_rms` and `max_abs` must be positive".to_string());
    }
    let forms = factor_forms(rows, columns, &settings);
    let sizes = [rows, columns];
    let first = !states.values.iter().any(|(name, _, _)| name == "lipschitz");
    if first {
        // `init_kron`: Q = scale * I, the scale split evenly between the factors; unset, it is
        // (mean g^4 + damping^4)^(-1/8) of this parameter's first gradient.
        let scale = match settings.init_scale {
            Some(scale) => scale,
            None => {
                let mean_fourth =
                    gradient.iter().map(|value| value.powi(4)).sum::<f64>() / gradient.len().max(1) as f64;
                (mean_fourth + settings.noise_damping.powi(4)).powf(-1.0 / 8.0)
            }
        };
        let order = forms.iter().filter(|form| **form != FactorForm::Absent).count() as f64;
        let factor_scale = scale.powf(1.0 / order);
        for side in 0..2 {
            let size = sizes[side];
            match forms[side] {
                FactorForm::Absent => {}
                FactorForm::Dense => {
                    let values = states.get(FACTOR_NAMES[side], &[size, size]);
                    (0..size).for_each(|index| values[index * size + index] = factor_scale);
                }
                FactorForm::Diagonal => {
                    states.get(FACTOR_NAMES[side], &[size]).iter_mut().for_each(|value| *value = factor_scale);
                }
            }
        }
        states.get("lipschitz", &[2]);
    }
    let mut factors: [Option<Factor>; 2] = [None, None];
    for side in 0..2 {
        let size = sizes[side];
        let (expected, factor_columns) = match forms[side] {
            FactorForm::Absent => continue,
            FactorForm::Dense => (size * size, size),
            FactorForm::Diagonal => (size, 1),
        };
        let values = std::mem::take(states.get(FACTOR_NAMES[side], &[expected]));
        if values.len() != expected {
            return Err(format!(
                "PSGD-Kron: the state `{}` has {} values where {expected} were expected \
                 (were `max_size` or `max_skew` changed since the checkpoint?)",
                FACTOR_NAMES[side],
                values.len()
            ));
        }
        factors[side] =
            Some(Factor { form: forms[side], values: Matrix { rows: size, columns: factor_columns, data: values } });
    }
    let mut lipschitz = std::mem::take(states.get("lipschitz", &[2]));
    if lipschitz.len() != 2 {
        return Err("PSGD-Kron: the state `lipschitz` must hold two values".to_string());
    }
    // The momentum buffer, as KronWhiten's: `beta = min(k / (k + 1), momentum)` at its k-th update.
    let whitened_target: Vec<f64> = if settings.momentum > 0.0 {
        let count = states.scalar("momentum_count");
        let beta = (count / (1.0 + count)).min(settings.momentum);
        states.set_scalar("momentum_count", count + 1.0);
        let buffer = states.get("momentum", shape);
        for (value, g) in buffer.iter_mut().zip(gradient) {
            *value = beta * *value + (1.0 - beta) * g;
        }
        buffer.clone()
    } else {
        gradient.to_vec()
    };
    let gradient_matrix = Matrix { rows, columns, data: gradient.to_vec() };
    // One coin for all parameters at this step, as the reference draws one `torch.rand` per step.
    let coin = Random::new(inputs.seed, Stream::Preconditioner, inputs.step * 65_536 + SHARED_COIN_KEY).uniform();
    if coin < settings.update_probability {
        let mut random = Random::new(inputs.seed, Stream::Preconditioner, inputs.step * 65_536 + inputs.param as u64);
        fit_preconditioner(&mut factors, &mut lipschitz, &gradient_matrix, &settings, &mut random);
        let finite = factors.iter().flatten().all(|factor| factor.values.data.iter().all(|value| value.is_finite()));
        if !finite || !lipschitz.iter().all(|value| value.is_finite()) {
            return Err(format!(
                "PSGD-Kron: the preconditioner became non-finite at step {} (is the gradient finite? \
                 a smaller `lr_precond` or a larger `noise_damping` may help)",
                inputs.step
            ));
        }
    }
    let mut direction = precondition(&factors, &Matrix { rows, columns, data: whitened_target }).data;
    clip(&mut direction, settings.max_rms, settings.max_abs);
    for (side, factor) in factors.into_iter().enumerate() {
        if let Some(factor) = factor {
            let size = factor.values.data.len();
            *states.get(FACTOR_NAMES[side], &[size]) = factor.values.data;
        }
    }
    *states.get("lipschitz", &[2]) = lipschitz;
    Ok(Some(direction))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kronecker::{frobenius, identity};
    use crate::linalg::symmetric_eigen;

    fn random_matrix(rows: usize, columns: usize, seed: u64) -> Matrix {
        let mut random = Random::new(seed, Stream::Probe, 0);
        Matrix { rows, columns, data: (0..rows * columns).map(|_| random.normal()).collect() }
    }

    fn defaults() -> Settings {
        Settings {
            lr_precond: 0.1,
            update_probability: 1.0,
            max_size: f64::INFINITY,
            max_skew: 1.0,
            init_scale: None,
            lipschitz_ema: 0.9,
            noise_damping: 1e-9,
            momentum: 0.0,
            max_rms: 2.0,
            max_abs: 10.0,
        }
    }

    #[test]
    fn the_norm_bound_is_a_tight_lower_bound_of_the_spectral_norm() {
        let x = random_matrix(12, 20, 1);
        let spd = product(&x, false, &x, true);
        let (values, _) = symmetric_eigen(&spd).unwrap();
        let largest = values.iter().copied().fold(0.0, f64::max);
        let bound = norm_lower_bound(&spd, true, &mut Random::new(0, Stream::Preconditioner, 1));
        assert!(bound <= largest * (1.0 + 1e-12) && bound >= 0.9 * largest, "{bound} vs {largest}");
        // A skew-symmetric matrix: its spectral norm is the square root of the largest eigenvalue
        // of R^T R.
        let y = random_matrix(9, 9, 2);
        let skew =
            Matrix { rows: 9, columns: 9, data: transpose(&y).data.iter().zip(&y.data).map(|(a, b)| a - b).collect() };
        let (values, _) = symmetric_eigen(&product(&skew, true, &skew, false)).unwrap();
        let largest = values.iter().copied().fold(0.0, f64::max).sqrt();
        let bound = norm_lower_bound(&skew, false, &mut Random::new(0, Stream::Preconditioner, 2));
        assert!(bound <= largest * (1.0 + 1e-12) && bound >= 0.8 * largest, "{bound} vs {largest}");
        // A zero matrix has bound zero, and nothing is divided by zero.
        let zero = Matrix { rows: 4, columns: 4, data: vec![0.0; 16] };
        assert_eq!(norm_lower_bound(&zero, true, &mut Random::new(0, Stream::Preconditioner, 3)), 0.0);
    }

    #[test]
    fn procrustes_steps_make_a_rotated_matrix_symmetric_and_keep_it_orthogonally_equivalent() {
        // Q = U S with U a small rotation and S symmetric positive definite: the steps rotate it
        // back towards S, so Q^T Q (the preconditioner) is unchanged up to the truncation error.
        let x = random_matrix(6, 9, 3);
        let s = crate::kronecker::add_to_diagonal(&product(&x, false, &x, true), 1.0);
        let angle: f64 = 0.3;
        let mut rotation = identity(6);
        rotation.data[0] = angle.cos();
        rotation.data[1] = -angle.sin();
        rotation.data[6] = angle.sin();
        rotation.data[7] = angle.cos();
        let mut q = product(&rotation, false, &s, false);
        let asymmetry =
            |q: &Matrix| frobenius(&transpose(q).data.iter().zip(&q.data).map(|(a, b)| a - b).collect::<Vec<_>>());
        let before = asymmetry(&q);
        let mut random = Random::new(4, Stream::Preconditioner, 0);
        for _ in 0..40 {
            procrustes_step(&mut q, &mut random);
        }
        assert!(asymmetry(&q) < 1e-3 * before, "{} -> {}", before, asymmetry(&q));
        let p = product(&q, true, &q, false);
        let p_expected = product(&s, false, &s, false);
        let difference: Vec<f64> = p.data.iter().zip(&p_expected.data).map(|(a, b)| a - b).collect();
        assert!(frobenius(&difference) < 1e-2 * frobenius(&p_expected.data));
    }

    #[test]
    fn the_fit_whitens_a_fixed_gradient_distribution() {
        // Gradients G = A Z B with Z standard normal: the fitted P = Q^T Q must make P G white,
        // E[(PG)(PG)^T] = c I, i.e. P_L ~ (A A^T)^(-1/2) and P_R ~ (B^T B)^(-1/2) up to a scale.
        let a = crate::kronecker::add_to_diagonal(&random_matrix(4, 4, 5), 3.0);
        let b = crate::kronecker::add_to_diagonal(&random_matrix(3, 3, 6), 3.0);
        // A small preconditioner step: the fit's steady-state error is proportional to it.
        let settings = Settings { init_scale: Some(1.0), lr_precond: 0.01, ..defaults() };
        let forms = factor_forms(4, 3, &Settings { max_skew: f64::INFINITY, ..settings });
        assert_eq!(forms, [FactorForm::Dense, FactorForm::Dense]);
        let mut factors = [
            Some(Factor { form: FactorForm::Dense, values: identity(4) }),
            Some(Factor { form: FactorForm::Dense, values: identity(3) }),
        ];
        let mut lipschitz = vec![0.0; 2];
        let mut sample = Random::new(7, Stream::Probe, 0);
        for step in 0..20000 {
            let z = Matrix { rows: 4, columns: 3, data: (0..12).map(|_| sample.normal()).collect() };
            let g = product(&product(&a, false, &z, false), false, &b, false);
            let mut random = Random::new(8, Stream::Preconditioner, step);
            fit_preconditioner(&mut factors, &mut lipschitz, &g, &settings, &mut random);
        }
        // The whitened covariance of the row space: E[(PG)(PG)^T] / columns should be near a
        // multiple of the identity.
        let mut covariance = Matrix { rows: 4, columns: 4, data: vec![0.0; 16] };
        for _ in 0..4000 {
            let z = Matrix { rows: 4, columns: 3, data: (0..12).map(|_| sample.normal()).collect() };
            let g = product(&product(&a, false, &z, false), false, &b, false);
            let pg = precondition(&factors, &g);
            let outer = product(&pg, false, &pg, true);
            covariance.data.iter_mut().zip(&outer.data).for_each(|(c, o)| *c += o / 4000.0);
        }
        let (values, _) = symmetric_eigen(&covariance).unwrap();
        let (smallest, largest) = (values[0], values[3]);
        assert!(largest / smallest < 1.25, "whitened eigenvalues {values:?}");
        // And the fixed point's scale: E[U U^T] = (numel / rows) I = 3 I.
        assert!((values.iter().sum::<f64>() / 4.0 - 3.0).abs() < 0.3, "whitened eigenvalues {values:?}");
    }

    #[test]
    fn factor_forms_follow_max_size_and_max_skew() {
        let settings = defaults();
        assert_eq!(factor_forms(64, 16, &settings), [FactorForm::Diagonal, FactorForm::Dense]);
        assert_eq!(factor_forms(16, 16, &settings), [FactorForm::Dense, FactorForm::Dense]);
        assert_eq!(factor_forms(1, 10, &settings), [FactorForm::Absent, FactorForm::Diagonal]);
        assert_eq!(factor_forms(10, 1, &settings), [FactorForm::Diagonal, FactorForm::Absent]);
        assert_eq!(factor_forms(1, 1, &settings), [FactorForm::Absent, FactorForm::Diagonal]);
        let small = Settings { max_size: 8.0, ..settings };
        assert_eq!(factor_forms(16, 8, &small), [FactorForm::Diagonal, FactorForm::Dense]);
    }

    #[test]
    fn the_diagonal_and_dense_forms_precondition_alike_for_diagonal_factors() {
        let g = random_matrix(3, 5, 9);
        let left = [1.5, 0.5, 2.0];
        let right = [0.3, 1.0, 1.2, 0.7, 2.5];
        let diagonal_matrix = |values: &[f64]| {
            let mut matrix = identity(values.len());
            values.iter().enumerate().for_each(|(index, value)| matrix.data[index * values.len() + index] = *value);
            matrix
        };
        let as_diagonal = [
            Some(Factor { form: FactorForm::Diagonal, values: Matrix { rows: 3, columns: 1, data: left.to_vec() } }),
            Some(Factor { form: FactorForm::Diagonal, values: Matrix { rows: 5, columns: 1, data: right.to_vec() } }),
        ];
        let as_dense = [
            Some(Factor { form: FactorForm::Dense, values: diagonal_matrix(&left) }),
            Some(Factor { form: FactorForm::Dense, values: diagonal_matrix(&right) }),
        ];
        let first = precondition(&as_diagonal, &g);
        let second = precondition(&as_dense, &g);
        let difference: Vec<f64> = first.data.iter().zip(&second.data).map(|(a, b)| a - b).collect();
        assert!(frobenius(&difference) < 1e-14);
        assert!((first.at(1, 4) - g.at(1, 4) * 0.25 * 6.25).abs() < 1e-14);
    }

    #[test]
    fn clipping_bounds_the_rms_and_the_elements() {
        let mut direction = vec![30.0, -1.0, 0.0, 1.0];
        clip(&mut direction, 2.0, 10.0);
        let rms = (direction.iter().map(|value| value * value).sum::<f64>() / 4.0).sqrt();
        assert!((rms - 2.0).abs() < 1e-12);
        let mut large = vec![30.0, -30.0];
        clip(&mut large, 100.0, 10.0);
        assert_eq!(large, vec![10.0, -10.0]);
    }

    fn plan(options: &[(&str, f64)]) -> ParamPlan {
        let mut all = vec![
            ("stats".to_string(), curv_ir::OptionValue::Name("psgd".to_string())),
            ("function".to_string(), curv_ir::OptionValue::Name("lie_group".to_string())),
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

    #[test]
    fn every_shape_and_degenerate_gradient_gives_a_finite_clipped_direction() {
        for (shape, options) in [
            (vec![1, 5], vec![]),
            (vec![5, 1], vec![]),
            (vec![1, 1], vec![]),
            (vec![6, 4], vec![("max_skew", 100.0), ("momentum", 0.9)]),
            (vec![2, 3, 4], vec![("max_size", 3.0)]),
        ] {
            let plan = plan(&options);
            let mut states = States { values: Vec::new() };
            let count: usize = shape.iter().product();
            for step in 1..=3u64 {
                for gradient in [vec![0.0; count], random_matrix(1, count, step).data.iter().map(|v| v * 1e3).collect()]
                {
                    let inputs = KroneckerInputs {
                        step,
                        learning_rate: 0.1,
                        gradient: &gradient,
                        captures: None,
                        seed: 1,
                        param: 0,
                    };
                    let direction = direction(&plan, &shape, &mut states, &inputs).unwrap().unwrap();
                    assert_eq!(direction.len(), count);
                    let rms = (direction.iter().map(|value| value * value).sum::<f64>() / count as f64).sqrt();
                    assert!(direction.iter().all(|value| value.is_finite() && value.abs() <= 10.0), "{shape:?}");
                    assert!(rms <= 2.0 + 1e-12, "{shape:?}: rms {rms}");
                }
            }
        }
        // A state of the wrong size (options changed across a checkpoint) is an error, not a panic.
        let mut states = States { values: vec![("lipschitz".to_string(), vec![0.0; 2], vec![2])] };
        states.values.push(("right_preconditioner".to_string(), vec![1.0; 3], vec![3]));
        let gradient = vec![1.0; 8];
        let inputs =
            KroneckerInputs { step: 1, learning_rate: 0.1, gradient: &gradient, captures: None, seed: 1, param: 0 };
        assert!(direction(&plan(&[]), &[2, 4], &mut states, &inputs).is_err());
    }
}
