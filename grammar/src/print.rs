//! Text formats of the syntax stages: the token stream and the AST as S-expressions, with byte
//! spans. Used by `curv emit --stage tokens|ast` and the snapshot tests.

use crate::ast::*;
use crate::token::SpannedToken;
use std::fmt::Write;

/// One token per line: `start..end kind text`.
pub fn print_tokens(tokens: &[SpannedToken]) -> String {
    let mut out = String::new();
    for spanned in tokens {
        let text = match &spanned.token {
            crate::token::Token::Ident(text) | crate::token::Token::Int(text) | crate::token::Token::Float(text) => {
                text.clone()
            }
            crate::token::Token::Str(text) => format!("{text:?}"),
            other => other.text().to_string(),
        };
        let _ = writeln!(out, "{} {} {}", spanned.span, spanned.token.kind(), text);
    }
    out
}

/// The whole file as indented S-expressions; items and statements carry their spans.
pub fn print_file(file: &File) -> String {
    let mut out = String::from("(file\n");
    for item in &file.items {
        print_item(&mut out, item);
    }
    out.push_str(")\n");
    out
}

fn print_item(out: &mut String, item: &Item) {
    let span = item.span();
    match item {
        Item::Use(decl) => {
            let path: Vec<&str> = decl.path.iter().map(|ident| ident.name.as_str()).collect();
            let _ = writeln!(out, "  (use {}) @{span}", path.join("."));
        }
        Item::Data(decl) => {
            let _ = writeln!(out, "  (data {} {}) @{span}", decl.name.name, expr(&decl.source));
        }
        Item::Dim(decl) => {
            let _ = writeln!(out, "  (dim {} {}) @{span}", decl.name.name, expr(&decl.value));
        }
        Item::Model(decl) => {
            let _ = writeln!(
                out,
                "  (model {} ({}){} @{span}",
                decl.name.name,
                typed_names(&decl.inputs),
                output(&decl.output)
            );
            print_body(out, &decl.body);
            out.push_str("  )\n");
        }
        Item::Loss(decl) => {
            let _ = writeln!(
                out,
                "  (loss {} ({}){} @{span}",
                decl.name.name,
                typed_names(&decl.inputs),
                output(&decl.output)
            );
            print_body(out, &decl.body);
            out.push_str("  )\n");
        }
        Item::Optimizer(decl) => {
            let _ = writeln!(out, "  (optimizer {} @{span}", decl.name.name);
            for item in &decl.items {
                match item {
                    OptimizerItem::Setting(setting) => {
                        let _ = writeln!(out, "    {} @{}", print_setting(setting), setting.span);
                    }
                    OptimizerItem::Rule(line) => {
                        let modifiers: Vec<String> = line
                            .modifiers
                            .iter()
                            .map(|modifier| format!(" ({} {})", modifier.name.name, args(&modifier.args)))
                            .collect();
                        let _ = writeln!(
                            out,
                            "    (rule {:?} {}{}) @{}",
                            line.pattern.text,
                            call(&line.structure),
                            modifiers.concat(),
                            line.span
                        );
                    }
                    OptimizerItem::Error(span) => {
                        let _ = writeln!(out, "    (error) @{span}");
                    }
                }
            }
            out.push_str("  )\n");
        }
        Item::Rule(decl) => {
            let tensors: Vec<&str> = decl.tensors.iter().map(|ident| ident.name.as_str()).collect();
            let hyper: Vec<String> = decl
                .hyperparameters
                .iter()
                .map(|hyper| match &hyper.default {
                    Some(default) => format!("({} {})", hyper.name.name, expr(default)),
                    None => hyper.name.name.clone(),
                })
                .collect();
            let _ = writeln!(out, "  (rule {} ({}) ({}) @{span}", decl.name.name, tensors.join(" "), hyper.join(" "));
            print_rule_body(out, &decl.body, "    ");
            out.push_str("  )\n");
        }
        Item::Train(decl) => {
            let _ = writeln!(out, "  (train {} @{span}", decl.name.name);
            for item in &decl.items {
                match item {
                    TrainItem::Loss(value, span) => {
                        let _ = writeln!(out, "    (loss {}) @{span}", expr(value));
                    }
                    TrainItem::Optimizer(name, span) => {
                        let _ = writeln!(out, "    (optimizer {}) @{span}", name.name);
                    }
                    TrainItem::Setting(setting) => {
                        let _ = writeln!(out, "    {} @{}", print_setting(setting), setting.span);
                    }
                    TrainItem::Error(span) => {
                        let _ = writeln!(out, "    (error) @{span}");
                    }
                }
            }
            out.push_str("  )\n");
        }
        Item::Error(span) => {
            let _ = writeln!(out, "  (error) @{span}");
        }
    }
}

fn print_body(out: &mut String, body: &[BodyStmt]) {
    for statement in body {
        match statement {
            BodyStmt::Param(decl) => {
                let init = decl.init.as_ref().map(|init| format!(" {}", expr(init))).unwrap_or_default();
                let _ = writeln!(out, "    (param {} {}{init}) @{}", decl.name.name, type_expr(&decl.ty), decl.span);
            }
            BodyStmt::Let(decl) => {
                let _ = writeln!(out, "    (let {} {}) @{}", decl.name.name, expr(&decl.value), decl.span);
            }
            BodyStmt::Dim(decl) => {
                let _ = writeln!(out, "    (dim {} {}) @{}", decl.name.name, expr(&decl.value), decl.span);
            }
            BodyStmt::Return(value, span) => {
                let _ = writeln!(out, "    (return {}) @{span}", expr(value));
            }
            BodyStmt::Error(span) => {
                let _ = writeln!(out, "    (error) @{span}");
            }
        }
    }
}

fn print_rule_body(out: &mut String, body: &[RuleStmt], indent: &str) {
    for statement in body {
        match statement {
            RuleStmt::State(decl) => {
                let _ = writeln!(out, "{indent}(state {} {}) @{}", decl.name.name, expr(&decl.value), decl.span);
            }
            RuleStmt::Let(decl) => {
                let _ = writeln!(out, "{indent}(let {} {}) @{}", decl.name.name, expr(&decl.value), decl.span);
            }
            RuleStmt::Assign(decl) => {
                let _ = writeln!(out, "{indent}(set {} {}) @{}", decl.name.name, expr(&decl.value), decl.span);
            }
            RuleStmt::Every(block) => {
                let period = block.period.as_ref().map(|period| format!("{} ", expr(period))).unwrap_or_default();
                let after = block
                    .after
                    .as_ref()
                    .map(|(word, value)| format!(" ({} {})", word.name, expr(value)))
                    .unwrap_or_default();
                let _ = writeln!(out, "{indent}(every {period}{}{after} @{}", block.unit.name, block.span);
                print_rule_body(out, &block.body, &format!("{indent}  "));
                let _ = writeln!(out, "{indent})");
            }
            RuleStmt::Error(span) => {
                let _ = writeln!(out, "{indent}(error) @{span}");
            }
        }
    }
}

fn print_setting(setting: &Setting) -> String {
    let values: Vec<String> = setting.values.iter().map(expr).collect();
    let every = setting.every.as_ref().map(|every| format!(" (every {})", expr(every))).unwrap_or_default();
    let values = if values.is_empty() { String::new() } else { format!(" {}", values.join(" ")) };
    format!("({}{values}{every})", setting.key.name)
}

fn typed_names(names: &[TypedName]) -> String {
    names.iter().map(|name| format!("({} {})", name.name.name, type_expr(&name.ty))).collect::<Vec<_>>().join(" ")
}

fn output(output: &Option<TypeExpr>) -> String {
    output.as_ref().map(|ty| format!(" -> {}", type_expr(ty))).unwrap_or_default()
}

fn type_expr(ty: &TypeExpr) -> String {
    if ty.dims.is_empty() {
        return ty.dtype.name.clone();
    }
    let dims: Vec<String> = ty.dims.iter().map(dim).collect();
    format!("{}[{}]", ty.dtype.name, dims.join(", "))
}

fn dim(dim: &DimExpr) -> String {
    match dim {
        DimExpr::Int(value, _) => value.to_string(),
        DimExpr::Name(ident) => ident.name.clone(),
        DimExpr::Mul(left, right, _) => format!("{}*{}", self::dim(left), self::dim(right)),
        DimExpr::Error(_) => "<error>".to_string(),
    }
}

fn call(call: &Call) -> String {
    if call.parenthesized {
        format!(
            "(call {}{})",
            call.name.name,
            if call.args.is_empty() { String::new() } else { format!(" {}", args(&call.args)) }
        )
    } else {
        call.name.name.clone()
    }
}

fn args(args: &[Arg]) -> String {
    args.iter()
        .map(|arg| match arg {
            Arg::Positional(value) => expr(value),
            Arg::Named(name, value) => format!("({} = {})", name.name, expr(value)),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// An expression as an S-expression.
pub fn expr(expr: &Expr) -> String {
    match expr {
        Expr::Int(value, _) => value.to_string(),
        Expr::Float(value, _) => format!("{value:?}"),
        Expr::Str(text, _) => format!("{text:?}"),
        Expr::Name(ident) => ident.name.clone(),
        Expr::Call(value) => call(value),
        Expr::Field(base, field, _) => format!("(. {} {})", self::expr(base), field.name),
        Expr::Index(base, indices, _) => {
            let indices: Vec<String> = indices
                .iter()
                .map(|index| match index {
                    Index::At(value) => self::expr(value),
                    Index::Slice(start, end, _) => format!(
                        "(: {} {})",
                        start.as_ref().map(self::expr).unwrap_or_else(|| "_".to_string()),
                        end.as_ref().map(self::expr).unwrap_or_else(|| "_".to_string())
                    ),
                })
                .collect();
            format!("(index {} {})", self::expr(base), indices.join(" "))
        }
        Expr::Neg(inner, _) => format!("(neg {})", self::expr(inner)),
        Expr::Binary(op, left, right, _) => format!("({} {} {})", op.symbol(), self::expr(left), self::expr(right)),
        Expr::List(items, _) => format!("[{}]", items.iter().map(self::expr).collect::<Vec<_>>().join(" ")),
        Expr::Error(_) => "<error>".to_string(),
    }
}
