//! The abstract syntax tree. A value type: every node owns its children and carries its span.
//!
//! Nodes that could not be parsed are kept as `Error` variants so that later stages can skip them
//! without reporting follow-on errors.

use crate::span::Span;

#[derive(Debug, Clone, PartialEq, Default)]
pub struct File {
    pub items: Vec<Item>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Ident {
    pub name: String,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Item {
    Use(UseDecl),
    Data(DataDecl),
    Dim(DimDecl),
    Model(ModelDecl),
    Loss(LossDecl),
    Optimizer(OptimizerDecl),
    Rule(RuleDecl),
    Train(TrainDecl),
    Error(Span),
}

impl Item {
    pub fn span(&self) -> Span {
        match self {
            Item::Use(item) => item.span,
            Item::Data(item) => item.span,
            Item::Dim(item) => item.span,
            Item::Model(item) => item.span,
            Item::Loss(item) => item.span,
            Item::Optimizer(item) => item.span,
            Item::Rule(item) => item.span,
            Item::Train(item) => item.span,
            Item::Error(span) => *span,
        }
    }
}

/// `use std.optimizers.adam`
#[derive(Debug, Clone, PartialEq)]
pub struct UseDecl {
    pub path: Vec<Ident>,
    pub span: Span,
}

/// `data digits = csv("data/digits.csv", label = "label")`
#[derive(Debug, Clone, PartialEq)]
pub struct DataDecl {
    pub name: Ident,
    pub source: Expr,
    pub span: Span,
}

/// `dim H = 256`
#[derive(Debug, Clone, PartialEq)]
pub struct DimDecl {
    pub name: Ident,
    pub value: Expr,
    pub span: Span,
}

/// `f32[B, 64]` or `f32`.
#[derive(Debug, Clone, PartialEq)]
pub struct TypeExpr {
    pub dtype: Ident,
    pub dims: Vec<DimExpr>,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum DimExpr {
    Int(i64, Span),
    Name(Ident),
    Mul(Box<DimExpr>, Box<DimExpr>, Span),
    Error(Span),
}

impl DimExpr {
    pub fn span(&self) -> Span {
        match self {
            DimExpr::Int(_, span) | DimExpr::Mul(_, _, span) | DimExpr::Error(span) => *span,
            DimExpr::Name(ident) => ident.span,
        }
    }
}

/// `x: f32[B, 64]`
#[derive(Debug, Clone, PartialEq)]
pub struct TypedName {
    pub name: Ident,
    pub ty: TypeExpr,
    pub span: Span,
}

/// `model mlp(x: f32[B, 64]) -> f32[B, 10] { ... }`
#[derive(Debug, Clone, PartialEq)]
pub struct ModelDecl {
    pub name: Ident,
    pub inputs: Vec<TypedName>,
    pub output: Option<TypeExpr>,
    pub body: Vec<BodyStmt>,
    pub span: Span,
}

/// `loss xent(logits: f32[B, K], y: i32[B]) { return ... }`: a user-defined loss function.
#[derive(Debug, Clone, PartialEq)]
pub struct LossDecl {
    pub name: Ident,
    pub inputs: Vec<TypedName>,
    pub output: Option<TypeExpr>,
    pub body: Vec<BodyStmt>,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum BodyStmt {
    Param(ParamDecl),
    Let(LetDecl),
    Dim(DimDecl),
    Return(Expr, Span),
    Error(Span),
}

/// `param w1: f32[64, 256] = glorot_uniform`
#[derive(Debug, Clone, PartialEq)]
pub struct ParamDecl {
    pub name: Ident,
    pub ty: TypeExpr,
    pub init: Option<Expr>,
    pub span: Span,
}

/// `let h = tanh(x @ w1 + b1)`
#[derive(Debug, Clone, PartialEq)]
pub struct LetDecl {
    pub name: Ident,
    pub value: Expr,
    pub span: Span,
}

/// `optimizer name { settings and per-parameter rules }`
#[derive(Debug, Clone, PartialEq)]
pub struct OptimizerDecl {
    pub name: Ident,
    pub items: Vec<OptimizerItem>,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum OptimizerItem {
    /// `lr 1e-3 cosine(warmup = 50)`
    Setting(Setting),
    /// `w* : kronecker(stats = gradient_outer) graft adam`
    Rule(RuleLine),
    Error(Span),
}

/// A line `key value value ...`, optionally ending in `every N`.
#[derive(Debug, Clone, PartialEq)]
pub struct Setting {
    pub key: Ident,
    pub values: Vec<Expr>,
    pub every: Option<Expr>,
    pub span: Span,
}

/// A parameter name pattern such as `w*`, `layer1.*` or `b?`.
#[derive(Debug, Clone, PartialEq)]
pub struct Pattern {
    pub text: String,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RuleLine {
    pub pattern: Pattern,
    /// `kronecker(...)`, `diagonal(...)`, or the name of a `rule`, with or without arguments.
    pub structure: Call,
    pub modifiers: Vec<Modifier>,
    pub span: Span,
}

/// A first-order part after a rule's structure: `graft adam`, `momentum 0.9`, `clip(rho = 0.04)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Modifier {
    pub name: Ident,
    pub args: Vec<Arg>,
    pub span: Span,
}

/// `rule adopt(p, g; lr = 1e-3, b1 = 0.9) { state ...  every step { ... } }`
#[derive(Debug, Clone, PartialEq)]
pub struct RuleDecl {
    pub name: Ident,
    pub tensors: Vec<Ident>,
    pub hyperparameters: Vec<HyperParameter>,
    pub body: Vec<RuleStmt>,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub struct HyperParameter {
    pub name: Ident,
    pub default: Option<Expr>,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum RuleStmt {
    State(LetDecl),
    Let(LetDecl),
    Assign(LetDecl),
    Every(EveryBlock),
    Error(Span),
}

/// `every step { ... }` or `every 10 steps { ... }`.
#[derive(Debug, Clone, PartialEq)]
pub struct EveryBlock {
    /// `None` for `every step`.
    pub period: Option<Expr>,
    pub unit: Ident,
    /// `, from S`: the first step the block runs at (the word is checked by the checker).
    pub after: Option<(Ident, Expr)>,
    pub body: Vec<RuleStmt>,
    pub span: Span,
}

/// `train fit { loss ...  optimizer ...  steps 500 ... }`
#[derive(Debug, Clone, PartialEq)]
pub struct TrainDecl {
    pub name: Ident,
    pub items: Vec<TrainItem>,
    pub span: Span,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TrainItem {
    Loss(Expr, Span),
    Optimizer(Ident, Span),
    Setting(Setting),
    Error(Span),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Arg {
    Positional(Expr),
    Named(Ident, Expr),
}

impl Arg {
    pub fn span(&self) -> Span {
        match self {
            Arg::Positional(expr) => expr.span(),
            Arg::Named(name, expr) => name.span.to(expr.span()),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub name: Ident,
    pub args: Vec<Arg>,
    /// Whether the call was written with parentheses (`zeros()` rather than `zeros`).
    pub parenthesized: bool,
    pub span: Span,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BinaryOp {
    Add,
    Sub,
    Mul,
    Div,
    MatMul,
    Pow,
}

impl BinaryOp {
    pub fn symbol(self) -> &'static str {
        match self {
            BinaryOp::Add => "+",
            BinaryOp::Sub => "-",
            BinaryOp::Mul => "*",
            BinaryOp::Div => "/",
            BinaryOp::MatMul => "@",
            BinaryOp::Pow => "^",
        }
    }
}

/// One index of `x[...]`: a single position or a slice `start:end`.
#[derive(Debug, Clone, PartialEq)]
pub enum Index {
    At(Expr),
    Slice(Option<Expr>, Option<Expr>, Span),
}

#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    Int(i64, Span),
    Float(f64, Span),
    Str(String, Span),
    Name(Ident),
    Call(Call),
    Field(Box<Expr>, Ident, Span),
    Index(Box<Expr>, Vec<Index>, Span),
    Neg(Box<Expr>, Span),
    Binary(BinaryOp, Box<Expr>, Box<Expr>, Span),
    List(Vec<Expr>, Span),
    Error(Span),
}

impl Expr {
    pub fn span(&self) -> Span {
        match self {
            Expr::Int(_, span)
            | Expr::Float(_, span)
            | Expr::Str(_, span)
            | Expr::Field(_, _, span)
            | Expr::Index(_, _, span)
            | Expr::Neg(_, span)
            | Expr::Binary(_, _, _, span)
            | Expr::List(_, span)
            | Expr::Error(span) => *span,
            Expr::Name(ident) => ident.span,
            Expr::Call(call) => call.span,
        }
    }
}

// Trees of any depth are freed without recursion: a node hands its children to a work list
// before it is dropped, so the compiler-generated drop of each node sees no children. The parser
// builds trees as deep as the program nests (a long sum is a left-leaning chain), and may drop
// them while recovering from an error, before `limit_nesting` has cut them.

impl Drop for Expr {
    fn drop(&mut self) {
        let mut work = Vec::new();
        self.take_children(&mut work);
        while let Some(mut node) = work.pop() {
            node.take_children(&mut work);
        }
    }
}

impl Expr {
    fn is_leaf(&self) -> bool {
        matches!(self, Expr::Int(..) | Expr::Float(..) | Expr::Str(..) | Expr::Name(_) | Expr::Error(_))
    }

    /// Moves the children that have children of their own onto `work`, leaving leaves behind.
    fn take_children(&mut self, work: &mut Vec<Expr>) {
        let mut take = |child: &mut Expr| {
            if !child.is_leaf() {
                work.push(std::mem::replace(child, Expr::Error(Span::default())));
            }
        };
        match self {
            Expr::Int(..) | Expr::Float(..) | Expr::Str(..) | Expr::Name(_) | Expr::Error(_) => {}
            Expr::Field(base, _, _) | Expr::Neg(base, _) => take(base),
            Expr::Binary(_, left, right, _) => {
                take(left);
                take(right);
            }
            Expr::Index(base, indices, _) => {
                take(base);
                for index in indices {
                    match index {
                        Index::At(expr) => take(expr),
                        Index::Slice(start, end, _) => start.iter_mut().chain(end.iter_mut()).for_each(&mut take),
                    }
                }
            }
            Expr::List(items, _) => items.iter_mut().for_each(take),
            Expr::Call(call) => {
                for arg in &mut call.args {
                    match arg {
                        Arg::Positional(expr) | Arg::Named(_, expr) => take(expr),
                    }
                }
            }
        }
    }
}

impl Drop for DimExpr {
    fn drop(&mut self) {
        fn take_children(dim: &mut DimExpr, work: &mut Vec<DimExpr>) {
            if let DimExpr::Mul(left, right, _) = dim {
                for child in [left, right] {
                    if matches!(**child, DimExpr::Mul(..)) {
                        work.push(std::mem::replace(&mut **child, DimExpr::Error(Span::default())));
                    }
                }
            }
        }
        let mut work = Vec::new();
        take_children(self, &mut work);
        while let Some(mut node) = work.pop() {
            take_children(&mut node, &mut work);
        }
    }
}

impl Drop for EveryBlock {
    fn drop(&mut self) {
        let mut work = std::mem::take(&mut self.body);
        while let Some(mut statement) = work.pop() {
            if let RuleStmt::Every(block) = &mut statement {
                work.append(&mut block.body);
            }
        }
    }
}
