//! `curv-grammar` owns the syntax of the curv language: byte spans, the logos lexer, the lalrpop
//! grammar (`src/curv.lalrpop`), the AST and syntax errors.
//!
//! Architecture invariant: parsing never fails. `parse` returns the tree, with `Error` nodes where
//! the parser recovered, together with every syntax error, so one run reports all of them. This
//! crate does no I/O and depends on nothing else in curv.

pub mod ast;
pub mod nesting;
pub mod parser;
pub mod print;
pub mod span;
pub mod syntax_error;
pub mod token;

#[allow(clippy::all, unused_parens, dead_code)]
mod curv {
    include!(concat!(env!("OUT_DIR"), "/curv.rs"));
}

pub use parser::{parse, parse_expression, Parsed};
pub use span::Span;
pub use syntax_error::SyntaxError;
