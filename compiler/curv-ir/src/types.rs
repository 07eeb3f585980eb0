//! The IR data types.

use curv_grammar::Span;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F64,
    I32,
}

impl DType {
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F64 => "f64",
            DType::I32 => "i32",
        }
    }

    pub fn from_name(name: &str) -> Option<DType> {
        match name {
            "f32" => Some(DType::F32),
            "f64" => Some(DType::F64),
            "i32" => Some(DType::I32),
            _ => None,
        }
    }

    pub fn size_in_bytes(self) -> u64 {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::F64 => 8,
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::F64)
    }
}

/// One dimension of a shape: a known size or a named symbolic size.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Dim {
    Known(i64),
    Symbol(String),
}

impl std::fmt::Display for Dim {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Dim::Known(size) => write!(formatter, "{size}"),
            Dim::Symbol(name) => formatter.write_str(name),
        }
    }
}

/// A tensor type: element type and shape (empty shape = scalar).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TensorType {
    pub dtype: DType,
    pub shape: Vec<Dim>,
}

impl TensorType {
    pub fn scalar(dtype: DType) -> TensorType {
        TensorType { dtype, shape: Vec::new() }
    }

    pub fn known(dtype: DType, shape: &[i64]) -> TensorType {
        TensorType { dtype, shape: shape.iter().map(|&size| Dim::Known(size)).collect() }
    }

    pub fn rank(&self) -> usize {
        self.shape.len()
    }

    /// The sizes when every dimension is known.
    pub fn known_shape(&self) -> Option<Vec<i64>> {
        self.shape
            .iter()
            .map(|dim| match dim {
                Dim::Known(size) => Some(*size),
                Dim::Symbol(_) => None,
            })
            .collect()
    }

    /// The number of elements when every dimension is known.
    pub fn element_count(&self) -> Option<i64> {
        self.known_shape().map(|shape| shape.iter().product())
    }
}

impl std::fmt::Display for TensorType {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.write_str(self.dtype.name())?;
        if !self.shape.is_empty() {
            let dims: Vec<String> = self.shape.iter().map(|dim| dim.to_string()).collect();
            write!(formatter, "[{}]", dims.join(", "))?;
        }
        Ok(())
    }
}

/// An SSA value: the index of the instruction that defines it in its function.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ValueId(pub u32);

impl std::fmt::Display for ValueId {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "%{}", self.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UnaryOp {
    Neg,
    Sin,
    Cos,
    Tanh,
    Exp,
    Log,
    Sqrt,
    Abs,
    Sign,
    Relu,
    Sigmoid,
    Softplus,
}

impl UnaryOp {
    pub fn name(self) -> &'static str {
        match self {
            UnaryOp::Neg => "neg",
            UnaryOp::Sin => "sin",
            UnaryOp::Cos => "cos",
            UnaryOp::Tanh => "tanh",
            UnaryOp::Exp => "exp",
            UnaryOp::Log => "log",
            UnaryOp::Sqrt => "sqrt",
            UnaryOp::Abs => "abs",
            UnaryOp::Sign => "sign",
            UnaryOp::Relu => "relu",
            UnaryOp::Sigmoid => "sigmoid",
            UnaryOp::Softplus => "softplus",
        }
    }

    /// Rough floating-point operations per element, for the cost report.
    pub fn flops_per_element(self) -> u64 {
        match self {
            UnaryOp::Neg | UnaryOp::Abs | UnaryOp::Sign | UnaryOp::Relu => 1,
            UnaryOp::Sqrt => 2,
            UnaryOp::Sin | UnaryOp::Cos | UnaryOp::Exp | UnaryOp::Log | UnaryOp::Tanh => 8,
            UnaryOp::Sigmoid | UnaryOp::Softplus => 10,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    Pow,
    Max,
    Min,
    /// 1 where equal, else 0, in the result's float type.
    Equal,
    /// 1 where the left operand is greater, else 0.
    Greater,
}

impl BinaryOp {
    pub fn name(self) -> &'static str {
        match self {
            BinaryOp::Add => "add",
            BinaryOp::Sub => "sub",
            BinaryOp::Mul => "mul",
            BinaryOp::Div => "div",
            BinaryOp::Pow => "pow",
            BinaryOp::Max => "max",
            BinaryOp::Min => "min",
            BinaryOp::Equal => "equal",
            BinaryOp::Greater => "greater",
        }
    }

    pub fn flops_per_element(self) -> u64 {
        match self {
            BinaryOp::Pow => 10,
            BinaryOp::Div => 2,
            _ => 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    Sum,
    Max,
}

/// A primitive operation. Operands are listed in [`Inst::args`].
#[derive(Debug, Clone, PartialEq)]
pub enum Op {
    /// A function input, by position.
    Input {
        index: usize,
        name: String,
    },
    /// A trainable parameter of the program, by index into [`TrainProgram::params`].
    Param {
        index: usize,
    },
    /// A field of a data set: `digits.x`.
    Data {
        source: String,
        field: String,
    },
    /// A rule's hyperparameter or a hyperparameter-dependent scalar, by name.
    Hyper {
        name: String,
    },
    /// The optimizer's step counter (1 on the first update), as a float scalar.
    Step,
    /// A constant filling the result type.
    Constant {
        value: f64,
    },
    Unary(UnaryOp),
    Binary(BinaryOp),
    /// `select(c, a, b)`: `a` where `c` is non-zero, else `b`.
    Select,
    /// 2-D matrix product `[m, k] @ [k, n]`, or batched over leading dimensions.
    MatMul,
    Transpose {
        permutation: Vec<usize>,
    },
    Reshape,
    /// Numpy-style broadcast of the operand to the result shape; `dims[i]` says which result
    /// dimension operand dimension `i` maps to.
    Broadcast {
        dims: Vec<usize>,
    },
    /// Reduces over `axes`; the result keeps no reduced dimension.
    Reduce {
        op: ReduceOp,
        axes: Vec<usize>,
    },
    /// The number of elements of the operand along `axes`, as a float scalar (for means over
    /// dimensions that are symbolic where the function is written).
    Count {
        axes: Vec<usize>,
    },
    /// Index of the maximum along `axis` (an `i32` result without that axis).
    ArgMax {
        axis: usize,
    },
    /// `one_hot(labels, classes)` as floats of the result type.
    OneHot {
        classes: i64,
    },
    /// Rows of a table picked by integer indices (`embedding`).
    Gather,
    /// A contiguous slice: `starts[i]..starts[i] + result.shape[i]` along every axis.
    Slice {
        starts: Vec<i64>,
    },
    /// The transpose of `Slice`: the operand placed at `starts` in zeros of the result shape.
    Pad {
        starts: Vec<i64>,
    },
    /// The transpose of `Gather` for the table: `scatter_add(indices, rows)` adds each row of
    /// `rows [..., E]` into row `indices[...]` of a zero table of the result shape `[V, E]`.
    ScatterAdd,
    /// 2-D convolution over NCHW input with OIHW kernel.
    Conv2d {
        stride: i64,
        padding: i64,
    },
    /// Gradient of `Conv2d` for its input: `(output_gradient, kernel) -> input-shaped`.
    Conv2dInputGradient {
        stride: i64,
        padding: i64,
    },
    /// Gradient of `Conv2d` for its kernel: `(input, output_gradient) -> kernel-shaped`.
    Conv2dKernelGradient {
        stride: i64,
        padding: i64,
    },
    /// Lower-triangular causal mask with `-inf` above the diagonal, of the result shape.
    CausalMask,
    Cast,
    /// A curvature statistic of the operand parameter the runtime computes from the model:
    /// `hutchinson` (probe times Hessian-vector product) or `sampled_grad` (gradient with labels
    /// sampled from the model's predictive distribution).
    Statistic {
        kind: String,
    },
}

impl Op {
    pub fn name(&self) -> String {
        match self {
            Op::Input { .. } => "input".to_string(),
            Op::Param { .. } => "param".to_string(),
            Op::Data { .. } => "data".to_string(),
            Op::Hyper { .. } => "hyper".to_string(),
            Op::Step => "step".to_string(),
            Op::Constant { .. } => "constant".to_string(),
            Op::Unary(op) => op.name().to_string(),
            Op::Binary(op) => op.name().to_string(),
            Op::Select => "select".to_string(),
            Op::MatMul => "matmul".to_string(),
            Op::Transpose { .. } => "transpose".to_string(),
            Op::Reshape => "reshape".to_string(),
            Op::Broadcast { .. } => "broadcast".to_string(),
            Op::Reduce { op: ReduceOp::Sum, .. } => "reduce_sum".to_string(),
            Op::Reduce { op: ReduceOp::Max, .. } => "reduce_max".to_string(),
            Op::Count { .. } => "count".to_string(),
            Op::ArgMax { .. } => "argmax".to_string(),
            Op::OneHot { .. } => "one_hot".to_string(),
            Op::Gather => "gather".to_string(),
            Op::Slice { .. } => "slice".to_string(),
            Op::Pad { .. } => "pad".to_string(),
            Op::ScatterAdd => "scatter_add".to_string(),
            Op::Conv2dInputGradient { .. } => "conv2d_input_gradient".to_string(),
            Op::Conv2dKernelGradient { .. } => "conv2d_kernel_gradient".to_string(),
            Op::Conv2d { .. } => "conv2d".to_string(),
            Op::CausalMask => "causal_mask".to_string(),
            Op::Cast => "cast".to_string(),
            Op::Statistic { .. } => "statistic".to_string(),
        }
    }
}

/// One SSA instruction. Its result is the value with the instruction's index.
#[derive(Debug, Clone, PartialEq)]
pub struct Inst {
    pub op: Op,
    pub args: Vec<ValueId>,
    pub ty: TensorType,
    /// The source span this instruction was lowered from.
    pub span: Span,
}

/// A flat SSA function. Instructions are in dependency order.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Function {
    pub name: String,
    pub insts: Vec<Inst>,
    /// Named results (`loss`, `logits`, `m`, `p`, ...).
    pub outputs: Vec<(String, ValueId)>,
}

impl Function {
    pub fn new(name: impl Into<String>) -> Function {
        Function { name: name.into(), insts: Vec::new(), outputs: Vec::new() }
    }

    pub fn push(&mut self, op: Op, args: Vec<ValueId>, ty: TensorType, span: Span) -> ValueId {
        let id = ValueId(self.insts.len() as u32);
        self.insts.push(Inst { op, args, ty, span });
        id
    }

    pub fn ty(&self, value: ValueId) -> &TensorType {
        &self.insts[value.0 as usize].ty
    }

    pub fn inst(&self, value: ValueId) -> &Inst {
        &self.insts[value.0 as usize]
    }

    pub fn output(&self, name: &str) -> Option<ValueId> {
        self.outputs.iter().find(|(output_name, _)| output_name == name).map(|(_, value)| *value)
    }

    /// The function without the instructions its outputs do not depend on (the values renumbered,
    /// in the same order).
    pub fn pruned(&self) -> Function {
        let mut live = vec![false; self.insts.len()];
        for (_, value) in &self.outputs {
            live[value.0 as usize] = true;
        }
        for index in (0..self.insts.len()).rev() {
            if live[index] {
                for arg in &self.insts[index].args {
                    live[arg.0 as usize] = true;
                }
            }
        }
        let mut renumbered = vec![ValueId(0); self.insts.len()];
        let mut function = Function::new(self.name.clone());
        for (index, inst) in self.insts.iter().enumerate() {
            if live[index] {
                let args = inst.args.iter().map(|arg| renumbered[arg.0 as usize]).collect();
                renumbered[index] = function.push(inst.op.clone(), args, inst.ty.clone(), inst.span);
            }
        }
        function.outputs =
            self.outputs.iter().map(|(name, value)| (name.clone(), renumbered[value.0 as usize])).collect();
        function
    }
}

/// How a parameter is initialised.
#[derive(Debug, Clone, PartialEq)]
pub enum Init {
    Zeros,
    Ones,
    Constant(f64),
    Uniform {
        low: f64,
        high: f64,
    },
    Normal {
        mean: f64,
        std: f64,
    },
    GlorotUniform,
    GlorotNormal,
    HeNormal,
    HeUniform,
    /// SIREN's scheme: uniform in +-sqrt(6 / fan_in) / omega (or 1 / fan_in for the first layer).
    SirenUniform {
        omega: f64,
        first: bool,
    },
}

impl std::fmt::Display for Init {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Init::Zeros => formatter.write_str("zeros"),
            Init::Ones => formatter.write_str("ones"),
            Init::Constant(value) => write!(formatter, "constant({})", format_number(*value)),
            Init::Uniform { low, high } => {
                write!(formatter, "uniform({}, {})", format_number(*low), format_number(*high))
            }
            Init::Normal { mean, std } => {
                write!(formatter, "normal({}, {})", format_number(*mean), format_number(*std))
            }
            Init::GlorotUniform => formatter.write_str("glorot_uniform"),
            Init::GlorotNormal => formatter.write_str("glorot_normal"),
            Init::HeNormal => formatter.write_str("he_normal"),
            Init::HeUniform => formatter.write_str("he_uniform"),
            Init::SirenUniform { omega, first } => {
                write!(formatter, "siren_uniform(omega = {}, first = {first})", format_number(*omega))
            }
        }
    }
}

/// Prints a float the shortest way that reads back to the same value.
pub fn format_number(value: f64) -> String {
    if value.fract() == 0.0 && value.abs() < 1e15 {
        format!("{value:.1}")
    } else {
        format!("{value:?}")
    }
}

/// A trainable parameter: `mlp.w1` is named `w1` (parameter names are unique per program).
#[derive(Debug, Clone, PartialEq)]
pub struct ParamInfo {
    pub name: String,
    pub ty: TensorType,
    pub init: Init,
    pub span: Span,
}

/// A data set as the program sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct DataInfo {
    pub name: String,
    pub kind: String,
    pub path: String,
    /// Every path option (`path`, `x`, `images`, ...) as written, relative to the `.curv` file.
    pub paths: Vec<(String, String)>,
    /// The label column of a CSV source.
    pub label: Option<String>,
    /// Numeric options after defaults (`scale`, `test_fraction`, `seed`).
    pub options: Vec<(String, f64)>,
    /// Every field with its full (all examples) type.
    pub fields: Vec<(String, TensorType)>,
    pub examples: i64,
    pub test_examples: i64,
}

/// A value of a resolved option.
#[derive(Debug, Clone, PartialEq)]
pub enum OptionValue {
    Number(f64),
    Name(String),
    Text(String),
    Bool(bool),
}

impl std::fmt::Display for OptionValue {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OptionValue::Number(value) => formatter.write_str(&format_number(*value)),
            OptionValue::Name(name) => formatter.write_str(name),
            OptionValue::Text(text) => write!(formatter, "{text:?}"),
            OptionValue::Bool(value) => write!(formatter, "{value}"),
        }
    }
}

/// Options after defaults were applied, in a fixed order.
pub type Options = Vec<(String, OptionValue)>;

pub fn option_number(options: &Options, key: &str) -> Option<f64> {
    options.iter().find(|(name, _)| name == key).and_then(|(_, value)| match value {
        OptionValue::Number(number) => Some(*number),
        _ => None,
    })
}

pub fn option_name<'a>(options: &'a Options, key: &str) -> Option<&'a str> {
    options.iter().find(|(name, _)| name == key).and_then(|(_, value)| match value {
        OptionValue::Name(name) | OptionValue::Text(name) => Some(name.as_str()),
        _ => None,
    })
}

/// The curvature structure of a rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StructureKind {
    Diagonal,
    Kronecker,
    LowRank,
    Orthogonalize,
    Dense,
    /// A factored second moment (row and column averages of g^2, as Adafactor and AdaLomo).
    Factored,
    /// A `rule` written in `.curv` (first-order or with explicit statistics).
    Rule,
}

impl StructureKind {
    pub fn name(self) -> &'static str {
        match self {
            StructureKind::Diagonal => "diagonal",
            StructureKind::Kronecker => "kronecker",
            StructureKind::LowRank => "lowrank",
            StructureKind::Orthogonalize => "orthogonalize",
            StructureKind::Dense => "dense",
            StructureKind::Factored => "factored",
            StructureKind::Rule => "rule",
        }
    }
}

/// A first-order part attached to a rule line (`graft adam`, `momentum 0.9`, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct ModifierPlan {
    pub name: String,
    pub options: Options,
}

/// A state tensor an update keeps between steps.
#[derive(Debug, Clone, PartialEq)]
pub struct StateInfo {
    pub name: String,
    pub ty: TensorType,
}

/// The optimizer plan of one parameter: which rule line applies and everything resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamPlan {
    pub param: usize,
    /// The rule line's pattern, as written.
    pub pattern: String,
    pub structure: StructureKind,
    /// For `StructureKind::Rule`, the rule's name; else the structure's name.
    pub rule_name: String,
    pub options: Options,
    pub modifiers: Vec<ModifierPlan>,
    /// Optimizer state kept for this parameter, concrete shapes.
    pub state: Vec<StateInfo>,
    pub span: Span,
}

/// A learning-rate schedule.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    pub kind: String,
    pub options: Options,
}

/// The optimizer as a train block uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerPlan {
    pub name: String,
    pub lr: f64,
    pub schedule: Option<Schedule>,
    pub settings: Options,
    pub plans: Vec<ParamPlan>,
}

/// What a train block logs or evaluates, with its period in steps.
#[derive(Debug, Clone, PartialEq)]
pub struct Logging {
    pub metrics: Vec<String>,
    pub every: i64,
}

/// The loss function's kind, which decides the available metrics and samplers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossKind {
    /// `cross_entropy(logits, labels)`: accuracy, sampled labels from softmax.
    CrossEntropy,
    /// `mse(prediction, target)`: psnr, Gaussian sampled targets.
    MeanSquaredError,
    /// A user expression.
    Custom,
}

/// One `train` block, with every shape concrete.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainProgram {
    pub name: String,
    pub params: Vec<ParamInfo>,
    pub data: DataInfo,
    /// Examples per step.
    pub batch: i64,
    pub steps: i64,
    pub seed: i64,
    pub loss_kind: LossKind,
    /// Inputs: the data fields as batches; outputs: `loss` and the model outputs metrics need.
    pub loss: Function,
    /// The same loss over the whole test split (when the data set has one).
    pub test_loss: Option<Function>,
    pub optimizer: OptimizerPlan,
    pub log: Option<Logging>,
    pub eval: Option<Logging>,
    pub checkpoint_every: Option<i64>,
    /// `on_nonfinite skip`: skip a step whose loss, gradients or update are not finite (the
    /// default, `stop`, ends training and keeps the last good checkpoint).
    pub skip_nonfinite: bool,
    pub span: Span,
}

/// One `every` block of a rule: it runs at steps `from, from + period, from + 2 period, ...`
/// (by default `from = period`). Blocks due at the same step run in declaration order.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleUpdate {
    pub period: i64,
    pub from: i64,
    pub function: Function,
}

impl RuleUpdate {
    pub fn runs_at(&self, step: u64) -> bool {
        let (period, from) = (self.period.max(1) as u64, self.from.max(1) as u64);
        step >= from && (step - from).is_multiple_of(period)
    }
}

/// A `rule` as a generic function of a parameter of symbolic shape `P`.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleProgram {
    pub name: String,
    /// The standard-library module the rule comes from (`None`: the user's file).
    pub module: Option<String>,
    pub hyperparameters: Vec<(String, f64)>,
    /// State tensors and the function that initialises them from `p` (and `g`).
    pub state: Vec<String>,
    pub init: Function,
    /// One update function per cadence: `(period, function)`; period 1 = every step.
    pub updates: Vec<RuleUpdate>,
    /// Statistics the rule asks for (`hutchinson`, `gnb`, ...).
    pub statistics: Vec<String>,
}

/// Everything the checker produced for one file.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Program {
    pub rules: Vec<RuleProgram>,
    pub trains: Vec<TrainProgram>,
}

#[cfg(test)]
mod pruning_tests {
    use super::*;

    #[test]
    fn pruning_keeps_what_the_outputs_depend_on_in_order() {
        let ty = TensorType::known(DType::F32, &[2]);
        let mut function = Function::new("f");
        let x = function.push(Op::Input { index: 0, name: "x".into() }, vec![], ty.clone(), Span::default());
        let unused = function.push(Op::Unary(UnaryOp::Exp), vec![x], ty.clone(), Span::default());
        let y = function.push(Op::Unary(UnaryOp::Neg), vec![x], ty.clone(), Span::default());
        function.push(Op::Unary(UnaryOp::Tanh), vec![unused], ty, Span::default());
        function.outputs.push(("y".into(), y));
        let pruned = function.pruned();
        assert_eq!(pruned.insts.len(), 2);
        assert_eq!(pruned.insts[1].op, Op::Unary(UnaryOp::Neg));
        assert_eq!(pruned.insts[1].args, vec![ValueId(0)]);
        assert_eq!(pruned.outputs, vec![("y".to_string(), ValueId(1))]);
    }
}
