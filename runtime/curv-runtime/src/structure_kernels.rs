//! The per-step work of the built-in matrix and diagonal structures as IR functions, so that a
//! resident step (see `trainer/resident.rs`) runs it where the tensors are: on a GPU, as
//! generated kernels and cuBLAS products, with the parameters, the gradients and the structures'
//! states in device memory from one step to the next.
//!
//! Five structures have such functions, each for the variants listed in [`DeviceStructure`]:
//!
//! - `diagonal` with `stats = gradient_square` (Adam's moments, as [`crate::optimizer`]'s host
//!   update): one elementwise function.
//! - `orthogonalize` (Muon): the momentum, the Newton-Schulz iterations (products of the
//!   iterate) and the step, in one function.
//! - `kronecker` with `function = inverse_root` or `newton` (Shampoo, one tile): the statistics
//!   (the filtered gradient, the grafting moment, the factors `L <- decay L + weight G G^T` and
//!   `R <- decay R + weight G^T G`: two products and their epilogue) in one function, and the
//!   step (`L^(-1/p) G R^(-1/p)`, the grafting norm and the parameter's update) in another. The
//!   inverse roots are the one part computed on the host, at their refresh steps only: the
//!   factors are read back, decomposed by [`crate::kronecker::inverse_root_in`] (or
//!   [`crate::kronecker::inverse_root_newton`]) as the host step does, and the roots written
//!   back.
//! - `kronecker` with `function = eigenbasis` (SOAP, one tile) after its first step: the first
//!   moment, the rotations into the factors' eigenbases and back (four products), the second
//!   moment there, the step and the factors' statistics, in one function. The bases' refreshes
//!   (a power iteration and QR) are the host's part, at their refresh steps, as Shampoo's roots.
//! - `kronecker(stats = kfac)` (K-FAC with the empirical Fisher, a weight used once as `x @ W`,
//!   its bias folded in or not, or one convolution's kernel): its statistics, at the steps that
//!   take them, from the gradient program's layer captures kept where they are (`[x 1]^T [x 1]
//!   / N` and `N d^T d`, or a convolution's input patches and per-position cotangents: two
//!   products and their averaging epilogues), and its step (`A^-1 [G; g] G^-1` and the update
//!   of the weight and its bias). The damped inverses are the host's part, after the
//!   statistics.
//!
//! The functions follow the host updates' equations (`crate::optimizer`, `crate::kronecker`)
//! operation for operation, in the run's element type; the host computes some scalars in double
//! precision where these compute them in `f32`, so the two agree to rounding, not bit for bit
//! (the tests compare them with a tolerance). Scalars that change with the step (the learning
//! rate, bias corrections, weight decay's factor) are hyperparameters (`Op::Hyper`), so one
//! compiled function serves every step; everything else (shapes, coefficients, which variant) is
//! part of the function and of its key ([`DeviceStructure::key`]).
//!
//! The scalar counters of these states (`refreshes`, `failures`) are the host's: they are kept
//! as host tensors among the resident states, and never read where the kernels are.

use crate::backend::{Backend, Output};
use crate::kronecker::{flag, matrix_shape, number};
use crate::optimizer::ResidentUpdate;
use curv_interp::{Inputs, Real, Resident, Slot};
use curv_ir::{
    option_name, option_number, BinaryOp, DType, Function, Op, ParamPlan, ReduceOp, StructureKind, TensorType, UnaryOp,
    ValueId,
};
use std::collections::HashMap;

/// Grafting of a Shampoo step (the `graft` modifier).
#[derive(Debug, Clone, PartialEq)]
pub enum Graft {
    Sgd,
    AdaGrad { eps: f64 },
    Adam { b2: f64, eps: f64 },
}

/// A parameter's structure, in a variant whose per-step work has IR functions here.
#[derive(Debug, Clone, PartialEq)]
pub enum DeviceStructure {
    /// `diagonal(stats = gradient_square)`, without the `momentum` modifier.
    Diagonal { b1: f64, ema: f64, eps: f64, power: f64, every: u64, bias_correction: bool },
    /// `orthogonalize`, without `rms_clip`.
    Orthogonalize { steps: usize, coefficients: (f64, f64, f64), beta: f64, nesterov: bool, scale: f64 },
    /// `kronecker(function = inverse_root | newton)`, unquantised, in one tile, without the
    /// `momentum`, `rms_clip` or `kl_clip` modifiers.
    Shampoo { ema: f64, eps: f64, root: f64, newton: bool, every: u64, start: u64, b1: f64, graft: Option<Graft> },
    /// `kronecker(function = eigenbasis)` (SOAP), unquantised, in one tile, with no modifier but
    /// `weight_decay`.
    Soap { ema: f64, b1: f64, b2: f64, eps: f64, every: u64 },
    /// `kronecker(stats = kfac, fisher = empirical, function = damped_inverse)` (K-FAC) of a
    /// weight used in one product `x @ W`, its bias folded in (`[W; b]`, the plan's `rows`
    /// counting the bias' row) or not, with no modifier but `weight_decay`. `examples` is the
    /// number of rows of the captured layer input the statistics' function is made for.
    Kfac {
        ema: f64,
        damping: f64,
        pi: bool,
        every: u64,
        folded: bool,
        examples: usize,
        convolution: Option<Convolution>,
    },
}

/// The geometry of a convolution `conv2d(x, K)` whose kernel K-FAC updates: the input's
/// channels and size, the kernel's size, the stride and padding, and the output's size. The
/// kernel's matrix view is `[O, C kH kW]`: its left factor is the outputs', its right factor the
/// input patches'.
#[derive(Debug, Clone, PartialEq)]
pub struct Convolution {
    pub channels: usize,
    pub input: (usize, usize),
    pub kernel: (usize, usize),
    pub stride: usize,
    pub padding: usize,
    pub output: (usize, usize),
}

/// A parameter's device structure with what every variant shares: the matrix view of the
/// parameter (`[rows, columns]`; a vector is one row) and the weight decay's `lambda`.
#[derive(Debug, Clone, PartialEq)]
pub struct DevicePlan {
    pub structure: DeviceStructure,
    pub rows: usize,
    pub columns: usize,
    pub weight_decay: Option<f64>,
}

/// The functions of one step of a [`DevicePlan`], in the order they run.
pub enum StepPart {
    /// Diagonal: whether the second moment takes this step's gradient.
    Diagonal {
        refresh: bool,
    },
    Orthogonalize,
    ShampooStatistics,
    /// Shampoo's step: preconditioned (from `start` on) or the grafting direction alone.
    ShampooStep {
        preconditioned: bool,
    },
    /// SOAP's step after its first: Adam's moments in the factors' eigenbases, the direction
    /// rotated back, the factors' statistics.
    Soap,
    /// K-FAC's statistics from a capture of `examples` rows: the factors' averages of
    /// `[x 1]^T [x 1] / N` and `N d^T d` (the cotangents carry the loss' `1/N`).
    KfacStatistics {
        examples: usize,
    },
    /// K-FAC's step: `A^-1 [G; g] G^-1` and the update of the weight (and its bias).
    KfacStep,
}

impl StepPart {
    fn name(&self) -> String {
        match self {
            StepPart::Diagonal { refresh } => format!("diagonal{}", if *refresh { " refresh" } else { "" }),
            StepPart::Orthogonalize => "orthogonalize".to_string(),
            StepPart::ShampooStatistics => "shampoo statistics".to_string(),
            StepPart::ShampooStep { preconditioned } => {
                format!("shampoo step{}", if *preconditioned { " preconditioned" } else { "" })
            }
            StepPart::Soap => "soap".to_string(),
            StepPart::KfacStatistics { examples } => format!("kfac statistics {examples}"),
            StepPart::KfacStep => "kfac step".to_string(),
        }
    }
}

/// The `diagonal`, `orthogonalize` or `kronecker` plan of a parameter of `shape` as a
/// [`DevicePlan`]; None when its variant has no functions here (it then takes host steps).
pub fn device_plan(plan: &ParamPlan, shape: &[usize]) -> Option<DevicePlan> {
    let options = &plan.options;
    let mut weight_decay = None;
    let mut graft = None;
    for modifier in &plan.modifiers {
        match modifier.name.as_str() {
            "weight_decay" => weight_decay = Some(option_number(&modifier.options, "lambda").unwrap_or(0.0)),
            "graft" => {
                let eps = number(&modifier.options, "eps", 1e-8);
                graft = Some(match option_name(&modifier.options, "kind").unwrap_or("adam") {
                    "sgd" => Graft::Sgd,
                    "adagrad" => Graft::AdaGrad { eps },
                    _ => Graft::Adam { b2: number(&modifier.options, "b2", 0.999), eps },
                });
            }
            _ => return None,
        }
    }
    let (rows, columns) = match shape {
        [] => (1, 1),
        [size] => (1, *size),
        _ => matrix_shape(shape),
    };
    let structure = match plan.structure {
        StructureKind::Diagonal if graft.is_none() => {
            if option_name(options, "stats").unwrap_or("gradient_square") != "gradient_square" {
                return None;
            }
            DeviceStructure::Diagonal {
                b1: number(options, "b1", 0.9),
                ema: number(options, "ema", 0.999),
                eps: number(options, "eps", 1e-8),
                power: number(options, "power", 1.0),
                every: number(options, "every", 1.0).max(1.0) as u64,
                bias_correction: flag(options, "bias_correction", true),
            }
        }
        StructureKind::Orthogonalize if graft.is_none() && shape.len() >= 2 => DeviceStructure::Orthogonalize {
            steps: number(options, "steps", 5.0) as usize,
            coefficients: (number(options, "a", 3.4445), number(options, "b", -4.7750), number(options, "c", 2.0315)),
            beta: number(options, "momentum", 0.95),
            nesterov: flag(options, "nesterov", true),
            // As `crate::kronecker::orthogonalize_direction`.
            scale: match shape {
                [rows, columns] => (*columns as f64 / *rows as f64).max(1.0).sqrt(),
                [.., second_last, last] => (*second_last as f64 / *last as f64).max(1.0).sqrt(),
                _ => 1.0,
            },
        },
        StructureKind::Kronecker
            if shape.len() >= 2
                && graft.is_none()
                && option_name(options, "function") == Some("eigenbasis")
                && option_name(options, "stats").unwrap_or("gradient_outer") == "gradient_outer"
                && number(options, "quantize", 32.0) >= 32.0
                && rows.max(columns) <= (number(options, "block", 1024.0) as usize).max(1) =>
        {
            DeviceStructure::Soap {
                ema: number(options, "ema", 0.95),
                b1: number(options, "b1", 0.9),
                b2: number(options, "b2", 0.999),
                eps: number(options, "eps", 1e-8),
                every: number(options, "every", 1.0).max(1.0) as u64,
            }
        }
        StructureKind::Kronecker if shape.len() >= 2 => {
            let function = option_name(options, "function").unwrap_or("inverse_root");
            let stats = option_name(options, "stats").unwrap_or("gradient_outer");
            let block = number(options, "block", 1024.0) as usize;
            if !matches!(function, "inverse_root" | "newton")
                || stats != "gradient_outer"
                || number(options, "quantize", 32.0) < 32.0
                || rows > block.max(1)
                || columns > block.max(1)
            {
                return None;
            }
            let every = number(options, "every", 1.0).max(1.0) as u64;
            DeviceStructure::Shampoo {
                ema: number(options, "ema", 0.95),
                eps: number(options, "eps", 1e-12),
                root: number(options, "root", 4.0),
                newton: function == "newton",
                every,
                start: number(options, "start", every as f64) as u64,
                b1: number(options, "b1", 0.9),
                graft,
            }
        }
        _ => return None,
    };
    Some(DevicePlan { structure, rows, columns, weight_decay })
}

/// The states a device plan's functions read, by name, in the host update's names.
fn tensor_states(structure: &DeviceStructure) -> Vec<&'static str> {
    match structure {
        DeviceStructure::Diagonal { .. } => vec!["m", "v"],
        DeviceStructure::Orthogonalize { .. } => vec!["momentum"],
        DeviceStructure::Shampoo { b1, graft, .. } => {
            let mut names = Vec::new();
            if *b1 > 0.0 {
                names.push("m");
            }
            if matches!(graft, Some(Graft::AdaGrad { .. } | Graft::Adam { .. })) {
                names.push("graft_v");
            }
            names.extend(["left_factor", "right_factor", "left_inverse", "right_inverse"]);
            names
        }
        DeviceStructure::Soap { .. } => vec!["m", "v", "left_factor", "right_factor", "left_basis", "right_basis"],
        DeviceStructure::Kfac { .. } => vec!["left_factor", "right_factor", "left_inverse", "right_inverse"],
    }
}

/// The states a resident step of `plan` needs before it can run (made by the first host step),
/// the diagonal's counter of refreshes included.
pub fn required_states(plan: &DevicePlan) -> Vec<&'static str> {
    let mut names = tensor_states(&plan.structure);
    match plan.structure {
        DeviceStructure::Diagonal { .. } => names.push("refreshes"),
        // SOAP's count of its steps, made at its first (host) step; K-FAC's count of its
        // statistics.
        DeviceStructure::Soap { .. } => names.push("soap_step"),
        DeviceStructure::Kfac { .. } => names.push("factor_updates"),
        // Shampoo's count of failed roots is made at the first refresh.
        DeviceStructure::Shampoo { .. } | DeviceStructure::Orthogonalize { .. } => {}
    }
    names
}

impl DevicePlan {
    /// The functions of step `step`, in order.
    pub fn parts(&self, step: u64) -> Vec<StepPart> {
        match &self.structure {
            DeviceStructure::Diagonal { every, .. } => {
                vec![StepPart::Diagonal { refresh: (step - 1).is_multiple_of(*every) }]
            }
            DeviceStructure::Orthogonalize { .. } => vec![StepPart::Orthogonalize],
            DeviceStructure::Shampoo { start, .. } => {
                vec![StepPart::ShampooStatistics, StepPart::ShampooStep { preconditioned: step >= *start }]
            }
            DeviceStructure::Soap { .. } => vec![StepPart::Soap],
            DeviceStructure::Kfac { every, examples, .. } => {
                if (step - 1).is_multiple_of(*every) {
                    vec![StepPart::KfacStatistics { examples: *examples }, StepPart::KfacStep]
                } else {
                    vec![StepPart::KfacStep]
                }
            }
        }
    }

    /// Whether step `step` takes K-FAC statistics (from the gradient program's captures).
    pub fn takes_captures(&self, step: u64) -> bool {
        matches!(self.structure, DeviceStructure::Kfac { every, .. } if (step - 1).is_multiple_of(every))
    }

    /// Every function a run of this plan may call, for `curv build`'s kernels.
    pub fn all_parts(&self) -> Vec<StepPart> {
        match &self.structure {
            DeviceStructure::Diagonal { every, .. } => {
                let mut parts = vec![StepPart::Diagonal { refresh: true }];
                if *every > 1 {
                    parts.push(StepPart::Diagonal { refresh: false });
                }
                parts
            }
            DeviceStructure::Orthogonalize { .. } => vec![StepPart::Orthogonalize],
            DeviceStructure::Shampoo { .. } => vec![
                StepPart::ShampooStatistics,
                StepPart::ShampooStep { preconditioned: false },
                StepPart::ShampooStep { preconditioned: true },
            ],
            DeviceStructure::Soap { .. } => vec![StepPart::Soap],
            DeviceStructure::Kfac { examples, .. } => {
                vec![StepPart::KfacStatistics { examples: *examples }, StepPart::KfacStep]
            }
        }
    }

    /// The key of `part`'s function: the part, the matrix view and a digest of everything else
    /// the function is made of (two plans with the same key have the same function).
    pub fn key(&self, part: &StepPart) -> String {
        let text = format!("{:?} {:?}", self.structure, self.weight_decay);
        // FNV-1a: stable across runs and builds, unlike the standard library's hasher.
        let digest = text
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3));
        format!("structure {} {}x{} {digest:016x}", part.name(), self.rows, self.columns)
    }

    /// The IR function of `part`. Its inputs are named `param`, `gradient` or as the states they
    /// read (in the order the function asks for them; [`update_resident`] lends each by its
    /// name), every tensor seen as `[rows, columns]` but the factors and roots (square). Its
    /// outputs are named as the states they replace, and `param`. A part of another structure
    /// (not one of [`DevicePlan::parts`]) is an error.
    pub fn function(&self, part: &StepPart) -> Result<Function, String> {
        let mut builder = Builder::new(&part.name(), [self.rows, self.columns]);
        match (&self.structure, part) {
            (DeviceStructure::Diagonal { b1, ema, eps, power, .. }, StepPart::Diagonal { refresh }) => {
                let param = builder.input("param");
                let gradient = builder.input("gradient");
                let m = builder.input("m");
                let mut v = builder.input("v");
                if *refresh {
                    let square = builder.binary(BinaryOp::Mul, gradient, gradient);
                    v = builder.average(v, square, *ema);
                    builder.output("v", v);
                }
                let m = builder.average(m, gradient, *b1);
                builder.output("m", m);
                // `m_hat / (sqrt(v_hat)^power + eps)`.
                let inverse1 = builder.hyper("inverse_correction1");
                let inverse2 = builder.hyper("inverse_correction2");
                let m_hat = builder.binary(BinaryOp::Mul, m, inverse1);
                let v_hat = builder.binary(BinaryOp::Mul, v, inverse2);
                let root = if *power == 1.0 {
                    builder.unary(UnaryOp::Sqrt, v_hat)
                } else {
                    let exponent = builder.constant(0.5 * power);
                    builder.binary(BinaryOp::Pow, v_hat, exponent)
                };
                let eps = builder.constant(*eps);
                let denominator = builder.binary(BinaryOp::Add, root, eps);
                let direction = builder.binary(BinaryOp::Div, m_hat, denominator);
                builder.step(param, direction, self.weight_decay.is_some());
            }
            (DeviceStructure::Orthogonalize { steps, coefficients: (a, b, c), beta, nesterov, scale }, _) => {
                let param = builder.input("param");
                let gradient = builder.input("gradient");
                let momentum = builder.input("momentum");
                let momentum = builder.average(momentum, gradient, *beta);
                builder.output("momentum", momentum);
                let update = if *nesterov {
                    let take = builder.constant(1.0 - beta);
                    let keep = builder.constant(*beta);
                    let fresh = builder.binary(BinaryOp::Mul, take, gradient);
                    let kept = builder.binary(BinaryOp::Mul, keep, momentum);
                    builder.binary(BinaryOp::Add, fresh, kept)
                } else {
                    momentum
                };
                // The wide orientation: no more rows than columns.
                let transposed = self.rows > self.columns;
                let mut x = if transposed { builder.transpose(update) } else { update };
                let squares = builder.binary(BinaryOp::Mul, x, x);
                let sum = builder.sum(squares);
                let norm = builder.unary(UnaryOp::Sqrt, sum);
                let tiny = builder.constant(1e-7);
                let norm = builder.binary(BinaryOp::Add, norm, tiny);
                let one = builder.constant(1.0);
                let inverse = builder.binary(BinaryOp::Div, one, norm);
                x = builder.binary(BinaryOp::Mul, x, inverse);
                let (a, b, c) = (builder.constant(*a), builder.constant(*b), builder.constant(*c));
                for _ in 0..*steps {
                    let x_transposed = builder.transpose(x);
                    let gram = builder.matmul(x, x_transposed);
                    let gram_squared = builder.matmul(gram, gram);
                    let linear = builder.binary(BinaryOp::Mul, b, gram);
                    let quadratic = builder.binary(BinaryOp::Mul, c, gram_squared);
                    let polynomial = builder.binary(BinaryOp::Add, linear, quadratic);
                    let product = builder.matmul(polynomial, x);
                    let scaled = builder.binary(BinaryOp::Mul, a, x);
                    x = builder.binary(BinaryOp::Add, scaled, product);
                }
                let orthogonal = if transposed { builder.transpose(x) } else { x };
                let scale = builder.constant(*scale);
                let direction = builder.binary(BinaryOp::Mul, orthogonal, scale);
                builder.step(param, direction, self.weight_decay.is_some());
            }
            (DeviceStructure::Shampoo { ema, b1, graft, .. }, StepPart::ShampooStatistics) => {
                let gradient = builder.input("gradient");
                if *b1 > 0.0 {
                    let m = builder.input("m");
                    let m = builder.average(m, gradient, *b1);
                    builder.output("m", m);
                }
                if let Some(graft @ (Graft::AdaGrad { .. } | Graft::Adam { .. })) = graft {
                    let v = builder.input("graft_v");
                    let square = builder.binary(BinaryOp::Mul, gradient, gradient);
                    let v = match graft {
                        Graft::Adam { b2, .. } => builder.average(v, square, *b2),
                        _ => builder.binary(BinaryOp::Add, v, square),
                    };
                    builder.output("graft_v", v);
                }
                let left = builder.input_shaped("left_factor", [self.rows, self.rows]);
                let right = builder.input_shaped("right_factor", [self.columns, self.columns]);
                builder.factors(gradient, (left, right), *ema);
            }
            (DeviceStructure::Shampoo { b1, graft, .. }, StepPart::ShampooStep { preconditioned }) => {
                let param = builder.input("param");
                let filtered = if *b1 > 0.0 {
                    let m = builder.input("m");
                    let correction = builder.hyper("inverse_correction1");
                    builder.binary(BinaryOp::Mul, m, correction)
                } else {
                    builder.input("gradient")
                };
                let grafted = match graft {
                    None => None,
                    Some(Graft::Sgd) => Some(filtered),
                    Some(Graft::AdaGrad { eps } | Graft::Adam { eps, .. }) => {
                        let v = builder.input("graft_v");
                        let correction = builder.hyper("graft_correction");
                        let corrected = builder.binary(BinaryOp::Div, v, correction);
                        let root = builder.unary(UnaryOp::Sqrt, corrected);
                        let eps = builder.constant(*eps);
                        let denominator = builder.binary(BinaryOp::Add, root, eps);
                        Some(builder.binary(BinaryOp::Div, filtered, denominator))
                    }
                };
                let direction = if *preconditioned {
                    let left = builder.input_shaped("left_inverse", [self.rows, self.rows]);
                    let right = builder.input_shaped("right_inverse", [self.columns, self.columns]);
                    let half = builder.matmul(left, filtered);
                    let preconditioned = builder.matmul(half, right);
                    match grafted {
                        Some(grafted) => {
                            // Scaled to the grafting direction's norm.
                            let graft_squares = builder.binary(BinaryOp::Mul, grafted, grafted);
                            let graft_sum = builder.sum(graft_squares);
                            let graft_norm = builder.unary(UnaryOp::Sqrt, graft_sum);
                            let own_squares = builder.binary(BinaryOp::Mul, preconditioned, preconditioned);
                            let own_sum = builder.sum(own_squares);
                            let own_norm = builder.unary(UnaryOp::Sqrt, own_sum);
                            let tiny = builder.constant(1e-16);
                            let own_norm = builder.binary(BinaryOp::Add, own_norm, tiny);
                            let scale = builder.binary(BinaryOp::Div, graft_norm, own_norm);
                            builder.binary(BinaryOp::Mul, preconditioned, scale)
                        }
                        None => preconditioned,
                    }
                } else {
                    grafted.unwrap_or(filtered)
                };
                builder.step(param, direction, self.weight_decay.is_some());
            }
            (DeviceStructure::Soap { ema, b1, b2, eps, .. }, StepPart::Soap) => {
                let param = builder.input("param");
                let gradient = builder.input("gradient");
                let m = builder.input("m");
                let v = builder.input("v");
                let left = builder.input_shaped("left_factor", [self.rows, self.rows]);
                let right = builder.input_shaped("right_factor", [self.columns, self.columns]);
                let left_basis = builder.input_shaped("left_basis", [self.rows, self.rows]);
                let right_basis = builder.input_shaped("right_basis", [self.columns, self.columns]);
                let m = builder.average(m, gradient, *b1);
                builder.output("m", m);
                // `Q_L^T X Q_R`.
                let left_transposed = builder.transpose(left_basis);
                let right_transposed = builder.transpose(right_basis);
                let rotate = |builder: &mut Builder, matrix: ValueId| {
                    let half = builder.matmul(left_transposed, matrix);
                    builder.matmul(half, right_basis)
                };
                let rotated_gradient = rotate(&mut builder, gradient);
                let rotated_m = rotate(&mut builder, m);
                let square = builder.binary(BinaryOp::Mul, rotated_gradient, rotated_gradient);
                let v = builder.average(v, square, *b2);
                builder.output("v", v);
                let step_size = builder.hyper("step_size");
                let scaled = builder.binary(BinaryOp::Mul, step_size, rotated_m);
                let root = builder.unary(UnaryOp::Sqrt, v);
                let eps = builder.constant(*eps);
                let denominator = builder.binary(BinaryOp::Add, root, eps);
                let normalised = builder.binary(BinaryOp::Div, scaled, denominator);
                // Back: `Q_L N Q_R^T`.
                let half = builder.matmul(left_basis, normalised);
                let direction = builder.matmul(half, right_transposed);
                builder.step(param, direction, self.weight_decay.is_some());
                builder.factors(gradient, (left, right), *ema);
            }
            (DeviceStructure::Kfac { ema, convolution: Some(geometry), .. }, StepPart::KfacStatistics { examples }) => {
                let (rows, columns, examples) = (self.rows, self.columns, *examples);
                let Convolution { channels, input: (height, width), output, .. } = geometry.clone();
                let positions = output.0 * output.1;
                let x = builder.input_shaped("kfac_input", [examples, channels, height, width]);
                let d = builder.input_shaped("kfac_cotangent", [examples, rows, output.0, output.1]);
                let left = builder.input_shaped("left_factor", [rows, rows]);
                let right = builder.input_shaped("right_factor", [columns, columns]);
                let patches = builder.patches(x, examples, geometry);
                // The cotangents as rows `(n, h', w')` of `O` values.
                let d = builder.push(Op::Reshape, vec![d], &[examples, rows, positions]);
                let d =
                    builder.push(Op::Transpose { permutation: vec![0, 2, 1] }, vec![d], &[examples, positions, rows]);
                let d = builder.push(Op::Reshape, vec![d], &[examples * positions, rows]);
                // As the host: the patches divided by the positions `S`, the cotangents times
                // `N / S`, both covariances divided by the rows `N S`, averaged with `ema` below 1.
                let ema = ema.min(1.0 - f64::EPSILON);
                let (n, s) = (examples.max(1) as f64, positions.max(1) as f64);
                let total = n * s;
                builder.covariances(
                    ("left_factor", left, d, (1.0 - ema) * (n / s) * (n / s) / total),
                    ("right_factor", right, patches, (1.0 - ema) / (s * s) / total),
                    ema,
                );
            }
            (DeviceStructure::Kfac { ema, folded, .. }, StepPart::KfacStatistics { examples }) => {
                let (rows, columns, examples) = (self.rows, self.columns, *examples);
                let inputs = rows - usize::from(*folded);
                let x = builder.input_shaped("kfac_input", [examples, inputs]);
                let d = builder.input_shaped("kfac_cotangent", [examples, columns]);
                let left = builder.input_shaped("left_factor", [rows, rows]);
                let right = builder.input_shaped("right_factor", [columns, columns]);
                // `[x 1]`: the inputs with a column of ones for the folded bias.
                let x = if *folded {
                    let placed = builder.push(Op::Pad { starts: vec![0, 0] }, vec![x], &[examples, rows]);
                    let ones = builder.push(Op::Constant { value: 1.0 }, Vec::new(), &[examples, 1]);
                    let column =
                        builder.push(Op::Pad { starts: vec![0, inputs as i64] }, vec![ones], &[examples, rows]);
                    builder.binary(BinaryOp::Add, placed, column)
                } else {
                    x
                };
                // As the host: the average with `ema` below 1.
                let ema = ema.min(1.0 - f64::EPSILON);
                let n = examples.max(1) as f64;
                builder.covariances(
                    ("left_factor", left, x, (1.0 - ema) / n),
                    ("right_factor", right, d, (1.0 - ema) * n),
                    ema,
                );
            }
            (DeviceStructure::Kfac { folded, .. }, StepPart::KfacStep) => {
                let (rows, columns) = (self.rows, self.columns);
                let inputs = rows - usize::from(*folded);
                let param = builder.input_shaped("param", [inputs, columns]);
                let gradient = builder.input_shaped("gradient", [inputs, columns]);
                let stacked = if *folded {
                    let bias = builder.input_shaped("bias", [1, columns]);
                    let bias_gradient = builder.input_shaped("bias_gradient", [1, columns]);
                    let placed = builder.push(Op::Pad { starts: vec![0, 0] }, vec![gradient], &[rows, columns]);
                    let row =
                        builder.push(Op::Pad { starts: vec![inputs as i64, 0] }, vec![bias_gradient], &[rows, columns]);
                    Some((bias, builder.binary(BinaryOp::Add, placed, row)))
                } else {
                    None
                };
                let left = builder.input_shaped("left_inverse", [rows, rows]);
                let right = builder.input_shaped("right_inverse", [columns, columns]);
                let half = builder.matmul(left, stacked.map_or(gradient, |(_, stacked)| stacked));
                let direction = builder.matmul(half, right);
                match stacked {
                    Some((bias, _)) => {
                        let weight_part =
                            builder.push(Op::Slice { starts: vec![0, 0] }, vec![direction], &[inputs, columns]);
                        let bias_part =
                            builder.push(Op::Slice { starts: vec![inputs as i64, 0] }, vec![direction], &[1, columns]);
                        builder.step_named("param", param, weight_part, self.weight_decay.is_some());
                        builder.step_named("bias", bias, bias_part, self.weight_decay.is_some());
                    }
                    None => builder.step(param, direction, self.weight_decay.is_some()),
                }
            }
            (structure, part) => return Err(format!("{structure:?} has no function `{}`", part.name())),
        }
        Ok(builder.function)
    }
}

/// Builds the functions above: tensors `[rows, columns]` unless said, scalars broadcast where
/// they meet tensors, inputs numbered in the order they are asked for.
struct Builder {
    function: Function,
    shape: [usize; 2],
    inputs: usize,
}

impl Builder {
    fn new(name: &str, shape: [usize; 2]) -> Builder {
        Builder { function: Function::new(name), shape, inputs: 0 }
    }

    fn push(&mut self, op: Op, args: Vec<ValueId>, shape: &[usize]) -> ValueId {
        let dims: Vec<i64> = shape.iter().map(|&size| size as i64).collect();
        // No source span: these functions are the runtime's own.
        self.function.push(op, args, TensorType::known(DType::F32, &dims), Default::default())
    }

    fn shape_of(&self, value: ValueId) -> Vec<usize> {
        self.function.ty(value).known_shape().unwrap_or_default().iter().map(|&size| size as usize).collect()
    }

    fn input(&mut self, name: &str) -> ValueId {
        let shape = self.shape;
        self.input_shaped(name, shape)
    }

    fn input_shaped(&mut self, name: &str, shape: impl AsRef<[usize]>) -> ValueId {
        let index = self.inputs;
        self.inputs += 1;
        self.push(Op::Input { index, name: name.to_string() }, Vec::new(), shape.as_ref())
    }

    /// The patches of a convolution's input `x` (`[N, C, H, W]`) as rows `(n, h', w')` of
    /// `C kH kW` values (column `(c kH + i) kW + j`), zeros where a patch reaches into the
    /// padding: as `crate::trainer`'s `convolution_patches`, without its `1 / S`. The input is
    /// placed in zeros whose height and width are multiples of the stride `s` and seen as
    /// `[N, C, H/s, s, W/s, s]`, so that the rows `h' s + i` of every output row `h'` are one
    /// contiguous slice (`h' + i / s` on the third axis, `i mod s` on the fourth); each kernel
    /// position's slice becomes one column of every channel's `kH kW`.
    fn patches(&mut self, x: ValueId, examples: usize, geometry: &Convolution) -> ValueId {
        let Convolution { channels, input: (height, width), kernel: (kernel_h, kernel_w), stride, padding, output } =
            geometry.clone();
        let s = stride.max(1);
        let rows_needed = |size: usize, out: usize, k: usize| (size + 2 * padding).div_ceil(s).max(out + (k - 1) / s);
        let (hq, wq) = (rows_needed(height, output.0, kernel_h), rows_needed(width, output.1, kernel_w));
        let padded = self.push(
            Op::Pad { starts: vec![0, 0, padding as i64, padding as i64] },
            vec![x],
            &[examples, channels, hq * s, wq * s],
        );
        let split = self.push(Op::Reshape, vec![padded], &[examples, channels, hq, s, wq, s]);
        let positions = output.0 * output.1;
        let window = kernel_h * kernel_w;
        let mut columns: Option<ValueId> = None;
        for i in 0..kernel_h {
            for j in 0..kernel_w {
                let starts = vec![0, 0, (i / s) as i64, (i % s) as i64, (j / s) as i64, (j % s) as i64];
                let slice =
                    self.push(Op::Slice { starts }, vec![split], &[examples, channels, output.0, 1, output.1, 1]);
                let slice = self.push(Op::Reshape, vec![slice], &[examples, channels, positions]);
                let slice = self.push(
                    Op::Transpose { permutation: vec![0, 2, 1] },
                    vec![slice],
                    &[examples, positions, channels],
                );
                let slice = self.push(Op::Reshape, vec![slice], &[examples * positions, channels, 1]);
                let placed = self.push(
                    Op::Pad { starts: vec![0, 0, (i * kernel_w + j) as i64] },
                    vec![slice],
                    &[examples * positions, channels, window],
                );
                columns = Some(match columns {
                    None => placed,
                    Some(sum) => self.binary(BinaryOp::Add, sum, placed),
                });
            }
        }
        let columns = columns.expect("a kernel of at least one position");
        self.push(Op::Reshape, vec![columns], &[examples * positions, channels * window])
    }

    fn hyper(&mut self, name: &str) -> ValueId {
        self.push(Op::Hyper { name: name.to_string() }, Vec::new(), &[])
    }

    fn constant(&mut self, value: f64) -> ValueId {
        self.push(Op::Constant { value }, Vec::new(), &[])
    }

    fn unary(&mut self, op: UnaryOp, operand: ValueId) -> ValueId {
        let shape = self.shape_of(operand);
        self.push(Op::Unary(op), vec![operand], &shape)
    }

    /// `left op right`, the operand with fewer elements (a constant or hyperparameter of rank 0,
    /// or a computed scalar `[1]`) broadcast to the other's shape.
    fn binary(&mut self, op: BinaryOp, left: ValueId, right: ValueId) -> ValueId {
        let (left_shape, right_shape) = (self.shape_of(left), self.shape_of(right));
        let count = |shape: &[usize]| shape.iter().product::<usize>();
        let (left, right, shape) = if left_shape == right_shape {
            (left, right, left_shape)
        } else if (count(&left_shape), left_shape.len()) < (count(&right_shape), right_shape.len()) {
            (self.broadcast(left, &right_shape), right, right_shape)
        } else {
            (left, self.broadcast(right, &left_shape), left_shape)
        };
        self.push(Op::Binary(op), vec![left, right], &shape)
    }

    /// A scalar (rank 0, or `[1]`) broadcast to `shape`.
    fn broadcast(&mut self, scalar: ValueId, shape: &[usize]) -> ValueId {
        let dims = if self.shape_of(scalar).is_empty() { Vec::new() } else { vec![0] };
        self.push(Op::Broadcast { dims }, vec![scalar], shape)
    }

    fn transpose(&mut self, matrix: ValueId) -> ValueId {
        let shape = self.shape_of(matrix);
        self.push(Op::Transpose { permutation: vec![1, 0] }, vec![matrix], &[shape[1], shape[0]])
    }

    fn matmul(&mut self, left: ValueId, right: ValueId) -> ValueId {
        let (left_shape, right_shape) = (self.shape_of(left), self.shape_of(right));
        self.push(Op::MatMul, vec![left, right], &[left_shape[0], right_shape[1]])
    }

    /// The sum of every element, as a tensor `[1]`: the matrix seen as one row and summed along
    /// it. A sum to rank 0 would make the scalar arithmetic after it (a norm's square root) host
    /// code on the GPU, reading the sum back; a `[1]` tensor keeps it in kernels.
    fn sum(&mut self, tensor: ValueId) -> ValueId {
        let count: usize = self.shape_of(tensor).iter().product();
        let row = self.push(Op::Reshape, vec![tensor], &[1, count]);
        self.push(Op::Reduce { op: ReduceOp::Sum, axes: vec![1] }, vec![row], &[1])
    }

    /// `keep average + (1 - keep) fresh`, the host updates' exponential average.
    fn average(&mut self, average: ValueId, fresh: ValueId, keep: f64) -> ValueId {
        let (keep, take) = (self.constant(keep), self.constant(1.0 - keep));
        let kept = self.binary(BinaryOp::Mul, keep, average);
        let taken = self.binary(BinaryOp::Mul, take, fresh);
        self.binary(BinaryOp::Add, kept, taken)
    }

    /// `param <- decay param - lr direction` (`decay`, `1 - lr lambda`, only with weight decay),
    /// as the output `param`.
    fn step(&mut self, param: ValueId, direction: ValueId, weight_decay: bool) {
        self.step_named("param", param, direction, weight_decay);
    }

    /// [`Builder::step`] as the output `name`.
    fn step_named(&mut self, name: &str, param: ValueId, direction: ValueId, weight_decay: bool) {
        let rate = self.hyper("lr");
        let param = if weight_decay {
            let decay = self.hyper("decay");
            self.binary(BinaryOp::Mul, param, decay)
        } else {
            param
        };
        let moved = self.binary(BinaryOp::Mul, rate, direction);
        let updated = self.binary(BinaryOp::Sub, param, moved);
        self.output(name, updated);
    }

    /// The factors' statistics `L <- decay L + weight G G^T` and `R <- decay R + weight G^T G`
    /// (the running sum with `ema >= 1`, else the exponential average), as the outputs
    /// `left_factor` and `right_factor`.
    fn factors(&mut self, gradient: ValueId, (left, right): (ValueId, ValueId), ema: f64) {
        let (decay, weight) = if ema >= 1.0 { (1.0, 1.0) } else { (ema, 1.0 - ema) };
        let transposed = self.transpose(gradient);
        let left_outer = self.matmul(gradient, transposed);
        let right_outer = self.matmul(transposed, gradient);
        for (name, factor, outer) in [("left_factor", left, left_outer), ("right_factor", right, right_outer)] {
            let weight = self.constant(weight);
            let fresh = self.binary(BinaryOp::Mul, weight, outer);
            let updated = if decay == 1.0 {
                self.binary(BinaryOp::Add, factor, fresh)
            } else {
                let decay = self.constant(decay);
                let kept = self.binary(BinaryOp::Mul, decay, factor);
                self.binary(BinaryOp::Add, kept, fresh)
            };
            self.output(name, updated);
        }
    }

    /// K-FAC's two factors' statistics: each `(name, factor, data, scale)` becomes the output
    /// `name`, `keep factor + scale data^T data`.
    fn covariances(&mut self, left: (&str, ValueId, ValueId, f64), right: (&str, ValueId, ValueId, f64), keep: f64) {
        for (name, factor, data, scale) in [left, right] {
            let transposed = self.transpose(data);
            let covariance = self.matmul(transposed, data);
            let scale = self.constant(scale);
            let fresh = self.binary(BinaryOp::Mul, scale, covariance);
            let keep = self.constant(keep);
            let kept = self.binary(BinaryOp::Mul, keep, factor);
            let updated = self.binary(BinaryOp::Add, kept, fresh);
            self.output(name, updated);
        }
    }

    fn output(&mut self, name: &str, value: ValueId) {
        self.function.outputs.push((name.to_string(), value));
    }
}

/// The hyperparameters of `plan`'s functions at `step`: the learning rate, weight decay's factor
/// and the bias corrections, each computed as the host update computes it.
pub fn hyperparameters<'a, T: Real>(plan: &DevicePlan, step: u64, learning_rate: f64) -> Inputs<'a, T> {
    let mut inputs = Inputs::<T>::default();
    let mut set = |name: &str, value: f64| {
        inputs.hyperparameters.insert(name.to_string(), value);
    };
    set("lr", learning_rate);
    set("decay", 1.0 - learning_rate * plan.weight_decay.unwrap_or(0.0));
    match &plan.structure {
        DeviceStructure::Diagonal { b1, ema, every, bias_correction, .. } => {
            let refreshes = ((step - 1) / every + 1) as f64;
            let (correction1, correction2) =
                if *bias_correction { (1.0 - b1.powf(step as f64), 1.0 - ema.powf(refreshes)) } else { (1.0, 1.0) };
            set("inverse_correction1", 1.0 / correction1);
            set("inverse_correction2", 1.0 / correction2);
        }
        DeviceStructure::Shampoo { b1, graft, .. } => {
            set("inverse_correction1", 1.0 / (1.0 - b1.powf(step as f64)));
            set(
                "graft_correction",
                if let Some(Graft::Adam { b2, .. }) = graft { 1.0 - b2.powf(step as f64) } else { 1.0 },
            );
        }
        DeviceStructure::Soap { b1, b2, .. } => {
            // SOAP counts its steps after its first (`soap_step`), which made its state.
            let s = step.saturating_sub(1) as f64;
            set("step_size", (1.0 - b2.powf(s)).sqrt() / (1.0 - b1.powf(s)));
        }
        DeviceStructure::Orthogonalize { .. } | DeviceStructure::Kfac { .. } => {}
    }
    inputs.step = step as f64;
    inputs
}

/// The names and shapes of `function`'s inputs, in order.
fn input_names(function: &Function) -> Vec<(usize, String, Vec<usize>)> {
    let mut names: Vec<(usize, String, Vec<usize>)> = function
        .insts
        .iter()
        .filter_map(|inst| match &inst.op {
            Op::Input { index, name } => {
                let shape = inst.ty.known_shape()?.iter().map(|&size| size as usize).collect();
                Some((*index, name.clone(), shape))
            }
            _ => None,
        })
        .collect();
    names.sort();
    names
}

/// One step of `plan` for a parameter with every tensor resident where `backend` computes:
/// its functions in order (made once, kept in `functions` by key), each reading the states the previous one wrote, and the host's part
/// between them (Shampoo's inverse roots at their refresh steps, the counters). Returns the new
/// parameter and the states it replaced; nothing resident changes until the caller commits them.
#[allow(clippy::too_many_arguments)]
pub fn update_resident<T: Real>(
    plan: &DevicePlan,
    backend: &dyn Backend<T>,
    step: u64,
    learning_rate: f64,
    param: &Resident<T>,
    gradient: &Resident<T>,
    state: &[(String, Resident<T>)],
    extras: &StructureExtras<T>,
    functions: &mut HashMap<String, Function>,
) -> Result<StructureUpdate<T>, String> {
    let mut update = ResidentUpdate { param: None, states: Vec::new() };
    let mut bias = None;
    let base: Inputs<T> = hyperparameters(plan, step, learning_rate);
    for mut part in plan.parts(step) {
        if let (StepPart::KfacStatistics { examples }, Some((input, _))) = (&mut part, extras.captures) {
            // The rows of this step's capture (the plan's guess, for `curv build`, may differ).
            let width = match &plan.structure {
                DeviceStructure::Kfac { convolution: Some(geometry), .. } => {
                    geometry.channels * geometry.input.0 * geometry.input.1
                }
                DeviceStructure::Kfac { folded, .. } => plan.rows - usize::from(*folded),
                _ => plan.rows,
            };
            *examples = input.len() / width.max(1);
        }
        if matches!(part, StepPart::ShampooStep { .. }) {
            refresh_roots(plan, backend, step, &mut update, state)?;
        }
        if let (StepPart::KfacStep, DeviceStructure::Kfac { every, .. }) = (&part, &plan.structure) {
            // The inverses of the factors this step's statistics made, if it took any.
            if plan.takes_captures(step) {
                refresh_kfac_inverses(plan, backend, (step - 1) / every + 1, &mut update, state)?;
            }
        }
        let key = plan.key(&part);
        let function = match functions.entry(key.clone()) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(entry) => entry.insert(plan.function(&part)?),
        };
        let mut inputs = base.clone();
        for (index, name, shape) in input_names(function) {
            let missing = |what: &str| format!("K-FAC's {what} is missing");
            let tensor = match name.as_str() {
                "param" => param,
                "gradient" => gradient,
                "kfac_input" => extras.captures.ok_or_else(|| missing("captured layer input"))?.0,
                "kfac_cotangent" => extras.captures.ok_or_else(|| missing("captured cotangent"))?.1,
                "bias" => extras.bias.ok_or_else(|| missing("folded bias"))?.0,
                "bias_gradient" => extras.bias.ok_or_else(|| missing("folded bias' gradient"))?.1,
                state_name => current_state(&update, state, state_name)?,
            };
            if tensor.len() != shape.iter().product::<usize>() {
                return Err(format!("`{name}` has {} elements, its function reads {shape:?}", tensor.len()));
            }
            inputs.lend_resident_as(Slot::Input(index), tensor, shape);
        }
        let outputs = backend.outputs_keeping(&key, function, &inputs, &|_| true)?;
        drop(inputs);
        for (name, output) in outputs {
            let Output::Resident(tensor) = output else { return Err(format!("`{name}` was not kept resident")) };
            if name == "param" {
                update.param = Some(Resident { shape: param.shape.clone(), storage: tensor.storage });
            } else if let ("bias", Some((old, _))) = (name.as_str(), extras.bias) {
                bias = Some(Resident { shape: old.shape.clone(), storage: tensor.storage });
            } else {
                let shape = current_state(&update, state, &name)?.shape.clone();
                replace(&mut update, &name, Resident { shape, storage: tensor.storage });
            }
        }
    }
    if let DeviceStructure::Kfac { every, .. } = plan.structure {
        // The host's count of statistics taken, as the host update keeps it.
        let count = (step - 1) / every + 1;
        replace(&mut update, "factor_updates", Resident::host(Vec::new(), vec![T::from_f64(count as f64)]));
    }
    if let DeviceStructure::Soap { every, .. } = plan.structure {
        let s = step.saturating_sub(1);
        replace(&mut update, "soap_step", Resident::host(Vec::new(), vec![T::from_f64(s as f64)]));
        if s.is_multiple_of(every) {
            refresh_bases(plan, backend, &mut update, state)?;
        }
    }
    if let DeviceStructure::Diagonal { every, .. } = plan.structure {
        // The host's counter of second-moment refreshes, as the host update keeps it.
        let refreshes = ((step - 1) / every + 1) as f64;
        replace(&mut update, "refreshes", Resident::host(Vec::new(), vec![T::from_f64(refreshes)]));
    }
    Ok(StructureUpdate { update, bias })
}

/// What a structure's step reads besides its parameter, gradient and state: K-FAC's captured
/// layer input and output cotangents (at its statistics steps), and its folded bias with the
/// bias' gradient.
pub struct StructureExtras<'a, T> {
    pub captures: Option<(&'a Resident<T>, &'a Resident<T>)>,
    pub bias: Option<(&'a Resident<T>, &'a Resident<T>)>,
}

impl<T> Default for StructureExtras<'_, T> {
    fn default() -> Self {
        StructureExtras { captures: None, bias: None }
    }
}

/// A structure's resident step: the parameter's new value and the states it replaced, and the
/// folded bias' new value (K-FAC).
pub struct StructureUpdate<T> {
    pub update: ResidentUpdate<T>,
    pub bias: Option<Resident<T>>,
}

fn current_state<'a, T>(
    update: &'a ResidentUpdate<T>,
    state: &'a [(String, Resident<T>)],
    name: &str,
) -> Result<&'a Resident<T>, String> {
    update
        .states
        .iter()
        .chain(state)
        .find(|(state_name, _)| state_name == name)
        .map(|(_, tensor)| tensor)
        .ok_or_else(|| format!("the state `{name}` is missing"))
}

/// The state `name` read back to the host, which must have `count` elements (the host's part
/// reads it as a matrix of that size).
fn read_state<T: Real>(
    update: &ResidentUpdate<T>,
    state: &[(String, Resident<T>)],
    name: &str,
    count: usize,
) -> Result<Vec<T>, String> {
    let values = current_state(update, state, name)?.host_data()?.into_owned();
    if values.len() != count {
        return Err(format!("the state `{name}` has {} elements, not {count}", values.len()));
    }
    Ok(values)
}

fn replace<T>(update: &mut ResidentUpdate<T>, name: &str, tensor: Resident<T>) {
    update.states.retain(|(state_name, _)| state_name != name);
    update.states.push((name.to_string(), tensor));
}

/// Shampoo's inverse roots at their refresh steps, on the host as the host step computes them
/// (from the factors this step's statistics made), with its count of failures in a row: a
/// failed root keeps the last good one, and too many failures in a row stop the run.
fn refresh_roots<T: Real>(
    plan: &DevicePlan,
    backend: &dyn Backend<T>,
    step: u64,
    update: &mut ResidentUpdate<T>,
    state: &[(String, Resident<T>)],
) -> Result<(), String> {
    let DeviceStructure::Shampoo { ema, eps, root, newton, every, .. } = plan.structure else { return Ok(()) };
    if !step.is_multiple_of(every) {
        return Ok(());
    }
    let correction = if ema < 1.0 { 1.0 - ema.powf(step as f64) } else { 1.0 };
    let function =
        |values: &[T], size: usize| crate::kronecker::shampoo_root(values, size, 1.0 / correction, (root, eps), newton);
    let left = read_state(update, state, "left_factor", plan.rows * plan.rows)?;
    let right = read_state(update, state, "right_factor", plan.columns * plan.columns)?;
    let roots = function(&left, plan.rows).and_then(|left| Ok((left, function(&right, plan.columns)?)));
    let previous = match current_state(update, state, "failures") {
        Ok(failures) => failures.host_data()?.first().map_or(0.0, |value| value.to_f64()),
        Err(_) => 0.0,
    };
    let (roots, failed) = match roots {
        Ok(roots) => (Some(roots), None),
        Err(error) => (None, Some(error)),
    };
    let count = crate::kronecker::root_failures(previous, failed, step).map_err(|(_, message)| message)?;
    replace(update, "failures", Resident::host(Vec::new(), vec![T::from_f64(count)]));
    // A failed root keeps the last good one.
    if let Some((left, right)) = roots {
        for (name, values) in [("left_inverse", left), ("right_inverse", right)] {
            let shape = current_state(update, state, name)?.shape.clone();
            let uploaded = backend.upload(curv_interp::Tensor::new(shape, values))?;
            replace(update, name, uploaded);
        }
    }
    Ok(())
}

/// SOAP's bases at their refresh steps, on the host as the host step computes them (one power
/// iteration and QR of each factor this step's statistics made, from the basis before), with the
/// second moment's rows and columns permuted to follow the bases' new column order.
fn refresh_bases<T: Real>(
    plan: &DevicePlan,
    backend: &dyn Backend<T>,
    update: &mut ResidentUpdate<T>,
    state: &[(String, Resident<T>)],
) -> Result<(), String> {
    let (rows, columns) = (plan.rows, plan.columns);
    let read = |update: &ResidentUpdate<T>, name: &str, count: usize| read_state(update, state, name, count);
    let failure = |error: crate::linalg::LinalgError| format!("SOAP's eigenbasis: {error}");
    let (square_rows, square_columns) = (rows * rows, columns * columns);
    let (left, left_old) = (read(update, "left_factor", square_rows)?, read(update, "left_basis", square_rows)?);
    let (right, right_old) =
        (read(update, "right_factor", square_columns)?, read(update, "right_basis", square_columns)?);
    let (new_left, left_order) = crate::kronecker::refresh_basis_in(&left, &left_old, rows).map_err(failure)?;
    let (new_right, right_order) = crate::kronecker::refresh_basis_in(&right, &right_old, columns).map_err(failure)?;
    let v = crate::kronecker::permuted(&read(update, "v", rows * columns)?, &left_order, &right_order);
    for (name, values) in [("left_basis", new_left), ("right_basis", new_right), ("v", v)] {
        let shape = current_state(update, state, name)?.shape.clone();
        let uploaded = backend.upload(curv_interp::Tensor::new(shape, values))?;
        replace(update, name, uploaded);
    }
    Ok(())
}

/// K-FAC's inverses at its statistics steps, on the host as the host step computes them: the
/// factors this step's statistics made, bias-corrected by the number `count` of statistics
/// taken, inverted with the pi-adjusted factored damping.
fn refresh_kfac_inverses<T: Real>(
    plan: &DevicePlan,
    backend: &dyn Backend<T>,
    count: u64,
    update: &mut ResidentUpdate<T>,
    state: &[(String, Resident<T>)],
) -> Result<(), String> {
    let DeviceStructure::Kfac { ema, damping, pi, ref convolution, .. } = plan.structure else { return Ok(()) };
    let ema = ema.min(1.0 - f64::EPSILON);
    let correction = 1.0 - ema.powf(count as f64);
    let read = |update: &ResidentUpdate<T>, name: &str, size: usize| -> Result<crate::linalg::Matrix, String> {
        Ok(crate::kronecker::square(&read_state(update, state, name, size * size)?, size, 1.0 / correction))
    };
    let (left, right) = (read(update, "left_factor", plan.rows)?, read(update, "right_factor", plan.columns)?);
    // The inputs' factor is the left one for `x @ W`, the right one for a convolution kernel.
    let (left, right) = crate::kronecker::kfac_inverses(&left, &right, damping, pi, convolution.is_none());
    let failure = |error: crate::linalg::LinalgError| format!("the K-FAC inverse: {error}");
    let (left, right) = (left.map_err(failure)?, right.map_err(failure)?);
    for (name, inverse) in [("left_inverse", left), ("right_inverse", right)] {
        let shape = current_state(update, state, name)?.shape.clone();
        let values = inverse.data.iter().map(|value| T::from_f64(*value)).collect();
        let uploaded = backend.upload(curv_interp::Tensor::new(shape, values))?;
        replace(update, name, uploaded);
    }
    Ok(())
}

/// K-FAC's plan for a weight of `shape` used once as `x @ W`, with its bias folded in or not,
/// or as a convolution's kernel (of `convolution`'s geometry), whose captured layer input has
/// `examples` rows (examples for a convolution); None for a variant without functions here.
pub fn kfac_device_plan(
    plan: &ParamPlan,
    shape: &[usize],
    folded: bool,
    examples: usize,
    convolution: Option<Convolution>,
) -> Option<DevicePlan> {
    let options = &plan.options;
    let (inputs, columns) = match (shape, &convolution) {
        ([inputs, columns], None) => (*inputs, *columns),
        ([outputs, channels, kernel_h, kernel_w], Some(geometry))
            if !folded && geometry.channels == *channels && geometry.kernel == (*kernel_h, *kernel_w) =>
        {
            (*outputs, channels * kernel_h * kernel_w)
        }
        _ => return None,
    };
    if plan.structure != StructureKind::Kronecker
        || option_name(options, "stats") != Some("kfac")
        || option_name(options, "fisher").unwrap_or("empirical") != "empirical"
        || option_name(options, "function").unwrap_or("inverse_root") != "damped_inverse"
    {
        return None;
    }
    let mut weight_decay = None;
    for modifier in &plan.modifiers {
        match modifier.name.as_str() {
            "weight_decay" => weight_decay = Some(option_number(&modifier.options, "lambda").unwrap_or(0.0)),
            _ => return None,
        }
    }
    Some(DevicePlan {
        structure: DeviceStructure::Kfac {
            ema: number(options, "ema", 0.95),
            damping: number(options, "damping", 1e-3),
            pi: flag(options, "pi", true),
            every: number(options, "every", 1.0).max(1.0) as u64,
            folded,
            examples,
            convolution,
        },
        rows: inputs + usize::from(folded),
        columns,
        weight_decay,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use curv_ir::OptionValue;

    fn plan(structure: StructureKind, options: &[(&str, OptionValue)], modifiers: &[&str]) -> ParamPlan {
        crate::optimizer::plan_for_tests(structure, options, modifiers)
    }

    fn name(text: &str) -> OptionValue {
        OptionValue::Name(text.to_string())
    }

    #[test]
    fn only_the_variants_with_functions_get_a_device_plan() {
        let kronecker = StructureKind::Kronecker;
        let shampoo = [("function", name("inverse_root"))];
        let matrix = [64, 32];
        // Shampoo, with grafting and weight decay, in one tile; not quantised, not tiled, not with
        // momentum or clipping, not on a vector.
        assert!(device_plan(&plan(kronecker, &shampoo, &["graft", "weight_decay"]), &matrix).is_some());
        let quantised = [("function", name("inverse_root")), ("quantize", OptionValue::Number(4.0))];
        assert!(device_plan(&plan(kronecker, &quantised, &[]), &matrix).is_none());
        let tiled = [("function", name("newton")), ("block", OptionValue::Number(32.0))];
        assert!(device_plan(&plan(kronecker, &tiled, &[]), &matrix).is_none());
        assert!(device_plan(&plan(kronecker, &shampoo, &["momentum"]), &matrix).is_none());
        assert!(device_plan(&plan(kronecker, &shampoo, &["rms_clip"]), &matrix).is_none());
        assert!(device_plan(&plan(kronecker, &shampoo, &[]), &[64]).is_none());
        // SOAP, but not grafted; the other Kronecker functions not at all here.
        let soap = [("function", name("eigenbasis"))];
        assert!(matches!(
            device_plan(&plan(kronecker, &soap, &[]), &matrix).map(|device| device.structure),
            Some(DeviceStructure::Soap { .. })
        ));
        assert!(device_plan(&plan(kronecker, &soap, &["graft"]), &matrix).is_none());
        for function in ["lie_group", "sherman_morrison", "damped_inverse"] {
            assert!(device_plan(&plan(kronecker, &[("function", name(function))], &[]), &matrix).is_none());
        }
        // Muon on matrices only; the diagonal with the gradient's square only, without momentum.
        let orthogonalize = StructureKind::Orthogonalize;
        assert!(device_plan(&plan(orthogonalize, &[], &["weight_decay"]), &matrix).is_some());
        assert!(device_plan(&plan(orthogonalize, &[], &["rms_clip"]), &matrix).is_none());
        assert!(device_plan(&plan(orthogonalize, &[], &[]), &[64]).is_none());
        let diagonal = StructureKind::Diagonal;
        assert!(device_plan(&plan(diagonal, &[], &[]), &[64]).is_some());
        assert!(device_plan(&plan(diagonal, &[("stats", name("hutchinson"))], &[]), &[64]).is_none());
        assert!(device_plan(&plan(diagonal, &[], &["momentum"]), &[64]).is_none());
        // K-FAC: the empirical Fisher with damped inverses, of a matrix or a convolution kernel
        // whose geometry is known (never with a folded bias); not the other Fisher estimates,
        // not `damped_eigen`, not with KL clipping.
        let kfac = |fisher: &str, function: &str| {
            [("stats", name("kfac")), ("fisher", name(fisher)), ("function", name(function))]
        };
        let empirical = kfac("empirical", "damped_inverse");
        assert!(kfac_device_plan(&plan(kronecker, &empirical, &[]), &matrix, true, 128, None).is_some());
        assert!(kfac_device_plan(&plan(kronecker, &kfac("sampled", "damped_inverse"), &[]), &matrix, false, 128, None)
            .is_none());
        assert!(kfac_device_plan(&plan(kronecker, &kfac("empirical", "damped_eigen"), &[]), &matrix, false, 128, None)
            .is_none());
        assert!(kfac_device_plan(&plan(kronecker, &empirical, &["kl_clip"]), &matrix, false, 128, None).is_none());
        let geometry =
            Convolution { channels: 8, input: (8, 8), kernel: (3, 3), stride: 2, padding: 1, output: (4, 4) };
        let kernel = [16, 8, 3, 3];
        let convolution =
            kfac_device_plan(&plan(kronecker, &empirical, &[]), &kernel, false, 64, Some(geometry.clone()));
        assert_eq!(convolution.map(|device| (device.rows, device.columns)), Some((16, 72)));
        assert!(kfac_device_plan(&plan(kronecker, &empirical, &[]), &kernel, true, 64, Some(geometry)).is_none());
        assert!(kfac_device_plan(&plan(kronecker, &empirical, &[]), &kernel, false, 64, None).is_none());
    }

    #[test]
    fn keys_differ_with_every_option_that_changes_a_function() {
        let shampoo = |ema: f64| {
            let options = [("function", name("inverse_root")), ("ema", OptionValue::Number(ema))];
            device_plan(&plan(StructureKind::Kronecker, &options, &[]), &[64, 32]).unwrap()
        };
        let part = StepPart::ShampooStatistics;
        assert_eq!(shampoo(0.9).key(&part), shampoo(0.9).key(&part));
        assert_ne!(shampoo(0.9).key(&part), shampoo(0.95).key(&part));
        assert_ne!(shampoo(0.9).key(&part), shampoo(0.9).key(&StepPart::ShampooStep { preconditioned: true }));
        // And the function does not change with the step: step-dependent scalars are inputs.
        assert_eq!(shampoo(0.9).function(&part), shampoo(0.9).function(&part));
        // A part of another structure is refused.
        assert!(shampoo(0.9).function(&StepPart::Soap).is_err());
        let hyper = hyperparameters::<f32>(&shampoo(0.9), 3, 0.01);
        assert_eq!(hyper.hyperparameters["lr"], 0.01);
        assert!((hyper.hyperparameters["inverse_correction1"] - 1.0 / (1.0 - 0.9f64.powi(3))).abs() < 1e-12);
    }
}
