//! Nesting limits. The parser is an LR automaton with an explicit stack, so it accepts programs of
//! any depth; every later stage (the checker, the printers, lowering) walks the tree recursively.
//! [`limit_nesting`] therefore bounds the depth of the tree right after parsing: an expression,
//! type dimension or `every` block nested more than [`NESTING_LIMIT`] levels deep is replaced by
//! an `Error` node and reported once per statement (E0006), as rustc's recursion limit is. The
//! walk here and the tree's `Drop` are iterative, so a tree of any depth is measured and freed
//! without recursion.

use crate::ast::*;
use crate::span::Span;
use crate::syntax_error::SyntaxError;

/// The deepest nesting of expressions (each operator, call, index, field, list or negation is one
/// level), type dimensions and `every` blocks that a program may have.
pub const NESTING_LIMIT: usize = 256;

/// Replaces every part of `file` nested deeper than [`NESTING_LIMIT`] by an `Error` node and
/// returns one E0006 per statement that had such a part.
pub fn limit_nesting(file: &mut File) -> Vec<SyntaxError> {
    let mut limiter = Limiter::default();
    for item in &mut file.items {
        limiter.item(item);
    }
    limiter.errors
}

/// Limits the nesting of one expression (as [`limit_nesting`] does for a file's statements).
pub fn limit_expression_nesting(expr: &mut Expr) -> Vec<SyntaxError> {
    let mut limiter = Limiter::default();
    limiter.statement(|visit| visit.expr(expr, 0));
    limiter.errors
}

#[derive(Default)]
struct Limiter {
    errors: Vec<SyntaxError>,
}

/// The parts of one statement being walked: expressions and dimensions, each at its depth.
#[derive(Default)]
struct Visit<'a> {
    exprs: Vec<(&'a mut Expr, usize)>,
    dims: Vec<(&'a mut DimExpr, usize)>,
    /// The first place past the limit, and what is there.
    too_deep: Option<(Span, &'static str)>,
}

impl<'a> Visit<'a> {
    fn expr(&mut self, expr: &'a mut Expr, depth: usize) {
        self.exprs.push((expr, depth));
    }

    fn ty(&mut self, ty: &'a mut TypeExpr, depth: usize) {
        for dim in &mut ty.dims {
            self.dims.push((dim, depth));
        }
    }

    fn args(&mut self, args: &'a mut [Arg], depth: usize) {
        for arg in args {
            match arg {
                Arg::Positional(expr) | Arg::Named(_, expr) => self.exprs.push((expr, depth)),
            }
        }
    }

    fn exceeded(&mut self, span: Span, what: &'static str) {
        if self.too_deep.is_none() {
            self.too_deep = Some((span, what));
        }
    }

    /// Walks everything pushed so far, cutting what lies past the limit.
    fn run(&mut self) {
        while let Some((expr, depth)) = self.exprs.pop() {
            if depth >= NESTING_LIMIT {
                let span = expr.span();
                self.exceeded(span, "expression");
                // The cut subtree is freed by `Expr`'s iterative `Drop`.
                drop(std::mem::replace(expr, Expr::Error(span)));
                continue;
            }
            let next = depth + 1;
            match expr {
                Expr::Int(..) | Expr::Float(..) | Expr::Str(..) | Expr::Name(_) | Expr::Error(_) => {}
                Expr::Call(call) => self.args(&mut call.args, next),
                Expr::Field(base, _, _) | Expr::Neg(base, _) => self.exprs.push((base, next)),
                Expr::Index(base, indices, _) => {
                    self.exprs.push((base, next));
                    for index in indices {
                        match index {
                            Index::At(expr) => self.exprs.push((expr, next)),
                            Index::Slice(start, end, _) => {
                                self.exprs.extend(start.iter_mut().chain(end.iter_mut()).map(|expr| (expr, next)))
                            }
                        }
                    }
                }
                Expr::Binary(_, left, right, _) => {
                    self.exprs.push((right, next));
                    self.exprs.push((left, next));
                }
                Expr::List(items, _) => self.exprs.extend(items.iter_mut().map(|expr| (expr, next))),
            }
        }
        while let Some((dim, depth)) = self.dims.pop() {
            if depth >= NESTING_LIMIT {
                let span = dim.span();
                self.exceeded(span, "dimension");
                drop(std::mem::replace(dim, DimExpr::Error(span)));
                continue;
            }
            if let DimExpr::Mul(left, right, _) = dim {
                self.dims.push((right, depth + 1));
                self.dims.push((left, depth + 1));
            }
        }
    }
}

impl Limiter {
    /// Walks one statement's parts (added by `add`) and reports it once if it is too deep.
    fn statement<'a>(&mut self, add: impl FnOnce(&mut Visit<'a>)) {
        let mut visit = Visit::default();
        add(&mut visit);
        visit.run();
        if let Some((span, what)) = visit.too_deep {
            self.errors.push(SyntaxError::too_deep(span, what));
        }
    }

    fn item(&mut self, item: &mut Item) {
        match item {
            Item::Use(_) | Item::Error(_) => {}
            Item::Data(decl) => self.statement(|visit| visit.expr(&mut decl.source, 0)),
            Item::Dim(decl) => self.statement(|visit| visit.expr(&mut decl.value, 0)),
            Item::Model(ModelDecl { inputs, output, body, .. }) | Item::Loss(LossDecl { inputs, output, body, .. }) => {
                self.signature(inputs, output);
                for statement in body {
                    self.body_statement(statement);
                }
            }
            Item::Optimizer(decl) => {
                for item in &mut decl.items {
                    match item {
                        OptimizerItem::Setting(setting) => self.setting(setting),
                        OptimizerItem::Rule(line) => self.statement(|visit| {
                            visit.args(&mut line.structure.args, 0);
                            for modifier in &mut line.modifiers {
                                visit.args(&mut modifier.args, 0);
                            }
                        }),
                        OptimizerItem::Error(_) => {}
                    }
                }
            }
            Item::Rule(decl) => {
                for hyperparameter in &mut decl.hyperparameters {
                    if let Some(default) = &mut hyperparameter.default {
                        self.statement(|visit| visit.expr(default, 0));
                    }
                }
                self.rule_body(&mut decl.body);
            }
            Item::Train(decl) => {
                for item in &mut decl.items {
                    match item {
                        TrainItem::Loss(expr, _) => self.statement(|visit| visit.expr(expr, 0)),
                        TrainItem::Setting(setting) => self.setting(setting),
                        TrainItem::Optimizer(..) | TrainItem::Error(_) => {}
                    }
                }
            }
        }
    }

    fn signature(&mut self, inputs: &mut [TypedName], output: &mut Option<TypeExpr>) {
        self.statement(|visit| {
            for input in inputs {
                visit.ty(&mut input.ty, 0);
            }
            if let Some(output) = output {
                visit.ty(output, 0);
            }
        });
    }

    fn body_statement(&mut self, statement: &mut BodyStmt) {
        match statement {
            BodyStmt::Param(decl) => self.statement(|visit| {
                visit.ty(&mut decl.ty, 0);
                if let Some(init) = &mut decl.init {
                    visit.expr(init, 0);
                }
            }),
            BodyStmt::Let(decl) => self.statement(|visit| visit.expr(&mut decl.value, 0)),
            BodyStmt::Dim(decl) => self.statement(|visit| visit.expr(&mut decl.value, 0)),
            BodyStmt::Return(expr, _) => self.statement(|visit| visit.expr(expr, 0)),
            BodyStmt::Error(_) => {}
        }
    }

    fn setting(&mut self, setting: &mut Setting) {
        self.statement(|visit| {
            for value in &mut setting.values {
                visit.expr(value, 0);
            }
            if let Some(every) = &mut setting.every {
                visit.expr(every, 0);
            }
        });
    }

    /// A rule's statements; an `every` block counts as one level for everything inside it.
    fn rule_body(&mut self, body: &mut [RuleStmt]) {
        let mut blocks: Vec<(&mut [RuleStmt], usize)> = vec![(body, 0)];
        while let Some((statements, depth)) = blocks.pop() {
            for statement in statements {
                match statement {
                    RuleStmt::State(decl) | RuleStmt::Let(decl) | RuleStmt::Assign(decl) => {
                        self.statement(|visit| visit.expr(&mut decl.value, depth))
                    }
                    RuleStmt::Every(block) if depth + 1 >= NESTING_LIMIT => {
                        let span = block.span;
                        self.errors.push(SyntaxError::too_deep(span, "`every` block"));
                        // Freed by `EveryBlock`'s iterative `Drop`.
                        *statement = RuleStmt::Error(span);
                    }
                    RuleStmt::Every(block) => {
                        self.statement(|visit| {
                            if let Some(period) = &mut block.period {
                                visit.expr(period, depth);
                            }
                            if let Some((_, after)) = &mut block.after {
                                visit.expr(after, depth);
                            }
                        });
                        blocks.push((&mut block.body, depth + 1));
                    }
                    RuleStmt::Error(_) => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::NESTING_LIMIT;
    use crate::ast::{BodyStmt, Expr, Item};

    /// The deepest expression in a model's `return`, measured without recursion.
    fn return_depth(source: &str) -> usize {
        let parsed = crate::parse(source);
        let Some(Item::Model(model)) = parsed.file.items.first() else { panic!("no model") };
        let Some(BodyStmt::Return(expr, _)) = model.body.last() else { panic!("no return") };
        let mut deepest = 0;
        let mut work: Vec<(&Expr, usize)> = vec![(expr, 1)];
        while let Some((expr, depth)) = work.pop() {
            deepest = deepest.max(depth);
            match expr {
                Expr::Binary(_, left, right, _) => work.extend([(&**left, depth + 1), (&**right, depth + 1)]),
                Expr::Neg(inner, _) | Expr::Field(inner, _, _) | Expr::Index(inner, _, _) => {
                    work.push((inner, depth + 1))
                }
                Expr::Call(call) => work.extend(call.args.iter().map(|arg| match arg {
                    crate::ast::Arg::Positional(expr) | crate::ast::Arg::Named(_, expr) => (expr, depth + 1),
                })),
                _ => {}
            }
        }
        deepest
    }

    fn model(result: &str) -> String {
        format!("model m(x: f32[2]) -> f32[2] {{\n    return {result}\n}}\n")
    }

    #[test]
    fn an_expression_at_the_limit_is_kept_whole() {
        let sum = vec!["x"; NESTING_LIMIT].join(" + ");
        let parsed = crate::parse(&model(&sum));
        assert!(parsed.errors.is_empty(), "{:?}", parsed.errors);
        assert_eq!(return_depth(&model(&sum)), NESTING_LIMIT);
    }

    #[test]
    fn one_level_past_the_limit_is_one_error_and_the_tree_is_cut_there() {
        let sum = vec!["x"; NESTING_LIMIT + 2].join(" + ");
        let parsed = crate::parse(&model(&sum));
        let codes: Vec<&str> = parsed.errors.iter().map(|error| error.code).collect();
        assert_eq!(codes, ["E0006"]);
        assert_eq!(return_depth(&model(&sum)), NESTING_LIMIT + 1);
    }

    #[test]
    fn trees_of_depth_ten_to_the_five_are_measured_cut_and_freed_on_a_small_stack() {
        // Test threads have 2 MiB stacks by default: recursion 10^5 deep would overflow this one.
        let run = || {
            let n = 100_000;
            let cases = [
                vec!["x"; n].join(" + "),
                vec!["x"; n].join(" ^ "),
                format!("{}x", "-".repeat(n)),
                format!("{}x{}", "f(".repeat(n), ")".repeat(n)),
                format!("x{}", "[0]".repeat(n)),
                format!("{}x{}", "[".repeat(n), "]".repeat(n)),
            ];
            for case in cases {
                let parsed = crate::parse(&model(&case));
                assert_eq!(parsed.errors.iter().filter(|error| error.code == "E0006").count(), 1, "{}", &case[..20]);
                let expr = crate::parse_expression(&case);
                assert!(expr.is_err());
            }
            // A deep tree the parser drops while recovering from an error after it.
            let broken = format!("{} )", vec!["x"; n].join(" + "));
            assert!(!crate::parse(&model(&broken)).errors.is_empty());
        };
        std::thread::Builder::new().stack_size(2 << 20).spawn(run).unwrap().join().unwrap();
    }
}
