//! Tables of everything built in: expression functions, initialisers, data sources, curvature
//! structures with their options, first-order modifiers, and metrics.

/// How an option's value is validated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OptionKind {
    /// A finite number greater than zero.
    Positive,
    /// An integer of at least one.
    PositiveInt,
    /// A number of at least zero.
    NonNegative,
    /// A number in `[0, 1)`.
    Fraction,
    /// A number in `[0, 1]`.
    UnitInterval,
    /// Any finite number.
    Number,
    /// One of the listed names.
    Choice(&'static [&'static str]),
    Bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum OptionDefault {
    Number(f64),
    Name(&'static str),
    Bool(bool),
    /// No default; the option may be left out.
    Absent,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OptionSpec<'a> {
    pub name: &'a str,
    pub kind: OptionKind,
    pub default: OptionDefault,
}

const fn option(name: &'static str, kind: OptionKind, default: OptionDefault) -> OptionSpec<'static> {
    OptionSpec { name, kind, default }
}

use OptionDefault as D;
use OptionKind as K;

pub const STATISTICS_DIAGONAL: &[&str] = &["gradient_square", "hutchinson", "gnb", "sampled_fisher"];
pub const STATISTICS_KRONECKER: &[&str] = &["gradient_outer", "kfac", "psgd"];
pub const STATISTICS_LOWRANK: &[&str] = &["gradient_window", "fisher", "psgd", "lanczos"];
pub const FOSI_BASES: &[&str] = &["adam", "momentum", "sgd"];
pub const NEWTON_REGULARIZATIONS: &[&str] = &["cubic", "quadratic"];

/// A curvature structure and its options.
pub struct StructureSpec {
    pub name: &'static str,
    /// Whether the structure needs a parameter of rank two or more.
    pub needs_matrix: bool,
    pub options: &'static [OptionSpec<'static>],
}

pub const STRUCTURES: &[StructureSpec] = &[
    StructureSpec {
        name: "diagonal",
        needs_matrix: false,
        options: &[
            option("stats", K::Choice(STATISTICS_DIAGONAL), D::Name("gradient_square")),
            option("b1", K::Fraction, D::Number(0.9)),
            option("ema", K::UnitInterval, D::Number(0.999)),
            option("eps", K::Positive, D::Number(1e-8)),
            option("every", K::PositiveInt, D::Number(1.0)),
            option("power", K::UnitInterval, D::Number(1.0)),
            option("probe", K::Choice(&["rademacher", "gaussian"]), D::Name("rademacher")),
            option("spatial", K::Bool, D::Bool(false)),
            option("bias_correction", K::Bool, D::Bool(true)),
        ],
    },
    StructureSpec {
        name: "kronecker",
        needs_matrix: true,
        options: &[
            option("stats", K::Choice(STATISTICS_KRONECKER), D::Name("gradient_outer")),
            option("fisher", K::Choice(&["empirical", "sampled", "exact"]), D::Name("empirical")),
            option(
                "function",
                K::Choice(&[
                    "inverse_root",
                    "newton",
                    "damped_inverse",
                    "damped_eigen",
                    "eigenbasis",
                    "lie_group",
                    "sherman_morrison",
                    "adafisher",
                    "singd",
                ]),
                D::Name("inverse_root"),
            ),
            option("ema", K::UnitInterval, D::Number(0.95)),
            option("eps", K::Positive, D::Number(1e-12)),
            option("root", K::PositiveInt, D::Number(4.0)),
            option("damping", K::Positive, D::Number(1e-3)),
            option("every", K::PositiveInt, D::Number(1.0)),
            option("block", K::PositiveInt, D::Number(1024.0)),
            option("start", K::PositiveInt, D::Absent),
            option("pi", K::Bool, D::Bool(true)),
            option("bias", K::Bool, D::Bool(true)),
            option("quantize", K::PositiveInt, D::Number(32.0)),
            option("statistics_every", K::PositiveInt, D::Absent),
            option("quantize_block", K::PositiveInt, D::Absent),
            option("quantize_min_size", K::PositiveInt, D::Absent),
            option("rectify_steps", K::NonNegative, D::Absent),
            option("rectify_root_steps", K::NonNegative, D::Absent),
            option("adam_eps", K::Positive, D::Absent),
            option("b1", K::Fraction, D::Number(0.9)),
            option("b2", K::Fraction, D::Number(0.999)),
            option("lr_precond", K::Positive, D::Absent),
            option("update_probability", K::UnitInterval, D::Absent),
            option("max_size", K::PositiveInt, D::Absent),
            option("max_skew", K::NonNegative, D::Absent),
            option("init_scale", K::Positive, D::Absent),
            option("lipschitz_ema", K::UnitInterval, D::Absent),
            option("noise_damping", K::NonNegative, D::Absent),
            option("momentum", K::Fraction, D::Absent),
            option("max_rms", K::Positive, D::Absent),
            option("max_abs", K::Positive, D::Absent),
            option("capture_clip", K::Positive, D::Absent),
            option("reset_threshold", K::Positive, D::Absent),
            option("factor_decay", K::UnitInterval, D::Absent),
            option("factor_weight", K::UnitInterval, D::Absent),
            option("riemannian_momentum", K::Fraction, D::Absent),
            option("factor_structure", K::Choice(&["dense", "block_diagonal"]), D::Absent),
            option("factor_block", K::PositiveInt, D::Absent),
        ],
    },
    StructureSpec {
        name: "lowrank",
        needs_matrix: false,
        options: &[
            option("stats", K::Choice(STATISTICS_LOWRANK), D::Name("gradient_window")),
            option("rank", K::PositiveInt, D::Absent),
            option("window", K::PositiveInt, D::Absent),
            option("damping", K::Positive, D::Number(1e-5)),
            option("every", K::PositiveInt, D::Number(1.0)),
            option("momentum", K::Fraction, D::Absent),
            option("b1", K::Fraction, D::Number(0.9)),
            option("b2", K::Fraction, D::Number(0.999)),
            option("eps", K::Positive, D::Number(1e-8)),
            option("scale", K::Positive, D::Number(1.0)),
            option("lr_precond", K::Positive, D::Number(0.1)),
            option("init_scale", K::Positive, D::Absent),
            option("lipschitz_ema", K::UnitInterval, D::Number(0.9)),
            option("noise_damping", K::NonNegative, D::Number(1e-9)),
            option("update_probability", K::UnitInterval, D::Number(1.0)),
            option("max_rms", K::Positive, D::Absent),
            option("max_abs", K::Positive, D::Absent),
            option("warmup", K::PositiveInt, D::Absent),
            option("base", K::Choice(FOSI_BASES), D::Name("adam")),
            option("decay", K::Fraction, D::Number(0.9)),
            option("alpha", K::Positive, D::Number(0.1)),
            option("lr_clip", K::Positive, D::Absent),
        ],
    },
    StructureSpec {
        name: "orthogonalize",
        needs_matrix: true,
        options: &[
            option("steps", K::PositiveInt, D::Number(5.0)),
            option("a", K::Number, D::Number(3.4445)),
            option("b", K::Number, D::Number(-4.7750)),
            option("c", K::Number, D::Number(2.0315)),
            option("momentum", K::Fraction, D::Number(0.95)),
            option("nesterov", K::Bool, D::Bool(true)),
        ],
    },
    StructureSpec {
        name: "factored",
        needs_matrix: false,
        options: &[
            option("decay_rate", K::Number, D::Number(-0.8)),
            option("eps1", K::Positive, D::Number(1e-30)),
            option("eps2", K::Positive, D::Number(1e-3)),
            option("clip_threshold", K::Positive, D::Number(1.0)),
            option("relative_step", K::Bool, D::Bool(true)),
        ],
    },
    StructureSpec {
        name: "dense",
        needs_matrix: false,
        options: &[
            option("stats", K::Choice(&["gradient_outer", "hessian", "ggn"]), D::Name("gradient_outer")),
            option("ema", K::UnitInterval, D::Number(0.95)),
            option("damping", K::NonNegative, D::Number(1e-3)),
            option("every", K::PositiveInt, D::Number(1.0)),
            option("regularization", K::Choice(NEWTON_REGULARIZATIONS), D::Name("cubic")),
            option("hessian_lipschitz", K::Positive, D::Number(1.0)),
            option("step_size", K::Positive, D::Number(1.0)),
            option("momentum", K::Fraction, D::Absent),
            option("line_search", K::Bool, D::Absent),
            option("adaptive_damping", K::Bool, D::Absent),
            option("max_size", K::PositiveInt, D::Absent),
        ],
    },
];

pub fn structure(name: &str) -> Option<&'static StructureSpec> {
    STRUCTURES.iter().find(|spec| spec.name == name)
}

/// A first-order part that follows a rule's structure.
pub struct ModifierSpec {
    pub name: &'static str,
    /// The option a bare value (`momentum 0.9`) sets.
    pub positional: &'static str,
    pub options: &'static [OptionSpec<'static>],
}

pub const MODIFIERS: &[ModifierSpec] = &[
    ModifierSpec {
        name: "graft",
        positional: "kind",
        options: &[
            option("kind", K::Choice(&["adam", "sgd", "adagrad", "rmsprop"]), D::Name("adam")),
            option("b2", K::Fraction, D::Number(0.999)),
            option("eps", K::Positive, D::Number(1e-8)),
        ],
    },
    ModifierSpec {
        name: "momentum",
        positional: "beta",
        options: &[option("beta", K::Fraction, D::Number(0.9)), option("nesterov", K::Bool, D::Bool(false))],
    },
    ModifierSpec {
        name: "weight_decay",
        positional: "lambda",
        options: &[option("lambda", K::NonNegative, D::Number(0.0))],
    },
    ModifierSpec {
        name: "clip",
        positional: "rho",
        options: &[option("rho", K::Positive, D::Number(0.04)), option("max", K::Positive, D::Number(1.0))],
    },
    ModifierSpec { name: "kl_clip", positional: "kappa", options: &[option("kappa", K::Positive, D::Number(1e-3))] },
    ModifierSpec { name: "rms_clip", positional: "max", options: &[option("max", K::Positive, D::Number(1.0))] },
];

pub fn modifier(name: &str) -> Option<&'static ModifierSpec> {
    MODIFIERS.iter().find(|spec| spec.name == name)
}

/// Optimizer-level settings.
pub const OPTIMIZER_SETTINGS: &[&str] = &["lr", "schedule", "grad_clip"];

pub const SCHEDULES: &[(&str, &[OptionSpec<'static>])] = &[
    ("constant", &[]),
    ("cosine", &[option("warmup", K::NonNegative, D::Number(0.0)), option("min", K::NonNegative, D::Number(0.0))]),
    ("linear", &[option("warmup", K::NonNegative, D::Number(0.0)), option("min", K::NonNegative, D::Number(0.0))]),
    ("step", &[option("every", K::PositiveInt, D::Number(1000.0)), option("gamma", K::Positive, D::Number(0.1))]),
];

/// Train-block settings besides `loss` and `optimizer`.
pub const TRAIN_SETTINGS: &[&str] = &["batch", "steps", "seed", "log", "eval", "checkpoint", "on_nonfinite"];

/// Metrics by loss kind; `test_` variants are evaluated on the test split.
pub const METRICS_ALWAYS: &[&str] = &["loss", "test_loss"];
pub const METRICS_CLASSIFICATION: &[&str] = &["accuracy", "test_accuracy"];
pub const METRICS_REGRESSION: &[&str] = &["psnr", "test_psnr"];

/// Initialisers with their positional/named options.
pub const INITIALISERS: &[(&str, &[OptionSpec<'static>])] = &[
    ("zeros", &[]),
    ("ones", &[]),
    ("constant", &[option("value", K::Number, D::Number(0.0))]),
    ("uniform", &[option("low", K::Number, D::Number(-1.0)), option("high", K::Number, D::Number(1.0))]),
    ("normal", &[option("mean", K::Number, D::Number(0.0)), option("std", K::Positive, D::Number(1.0))]),
    ("glorot_uniform", &[]),
    ("glorot_normal", &[]),
    ("he_normal", &[]),
    ("he_uniform", &[]),
    ("siren_uniform", &[option("omega", K::Positive, D::Number(30.0)), option("first", K::Bool, D::Bool(false))]),
];

/// Data sources: name, path options (keys whose values are file paths), other options.
pub struct DataSourceSpec {
    pub name: &'static str,
    pub paths: &'static [&'static str],
    pub options: &'static [OptionSpec<'static>],
}

pub const DATA_SOURCES: &[DataSourceSpec] = &[
    DataSourceSpec {
        name: "csv",
        paths: &["path"],
        options: &[
            option("label", K::Choice(&[]), D::Absent),
            option("scale", K::Positive, D::Number(1.0)),
            option("test_fraction", K::Fraction, D::Number(0.0)),
            option("seed", K::NonNegative, D::Number(0.0)),
        ],
    },
    DataSourceSpec { name: "image", paths: &["path"], options: &[] },
    DataSourceSpec {
        name: "npy",
        paths: &["x", "y"],
        options: &[
            option("test_fraction", K::Fraction, D::Number(0.0)),
            option("seed", K::NonNegative, D::Number(0.0)),
        ],
    },
    DataSourceSpec {
        name: "idx",
        paths: &["images", "labels"],
        options: &[
            option("scale", K::Positive, D::Number(1.0 / 255.0)),
            option("test_fraction", K::Fraction, D::Number(0.0)),
            option("seed", K::NonNegative, D::Number(0.0)),
        ],
    },
];

pub fn data_source(name: &str) -> Option<&'static DataSourceSpec> {
    DATA_SOURCES.iter().find(|spec| spec.name == name)
}

/// Expression functions usable in models, losses and rules, with their arity range.
pub const FUNCTIONS: &[(&str, usize, usize)] = &[
    ("sin", 1, 1),
    ("cos", 1, 1),
    ("tanh", 1, 1),
    ("exp", 1, 1),
    ("log", 1, 1),
    ("sqrt", 1, 1),
    ("abs", 1, 1),
    ("sign", 1, 1),
    ("relu", 1, 1),
    ("gelu", 1, 1),
    ("sigmoid", 1, 1),
    ("softplus", 1, 1),
    ("square", 1, 1),
    ("max", 2, 2),
    ("min", 2, 2),
    ("clip", 2, 3),
    ("sum", 1, 2),
    ("mean", 1, 2),
    ("amax", 1, 2),
    ("argmax", 1, 2),
    ("softmax", 1, 2),
    ("log_softmax", 1, 2),
    ("layer_norm", 1, 2),
    ("reshape", 2, 2),
    ("transpose", 1, 2),
    ("embedding", 2, 2),
    ("conv2d", 2, 4),
    ("causal_mask", 1, 1),
    ("one_hot", 2, 2),
    ("cross_entropy", 2, 2),
    ("mse", 2, 2),
    ("zeros_like", 1, 1),
    ("ones_like", 1, 1),
    ("hutchinson", 1, 1),
    ("sampled_grad", 1, 1),
];

pub fn function_arity(name: &str) -> Option<(usize, usize)> {
    FUNCTIONS.iter().find(|(function, _, _)| *function == name).map(|(_, low, high)| (*low, *high))
}

/// Named arguments each function accepts.
pub fn function_named_args(name: &str) -> &'static [&'static str] {
    match name {
        "sum" | "mean" | "amax" | "argmax" | "softmax" | "log_softmax" => &["axis"],
        "layer_norm" => &["eps"],
        "conv2d" => &["stride", "padding"],
        "hutchinson" => &["probe"],
        _ => &[],
    }
}
