//! The parser entry point: `parse` never fails, it returns the tree and every syntax error.

use crate::ast::File;
use crate::span::Span;
use crate::syntax_error::SyntaxError;
use crate::token::{lex, SpannedToken, Token};
use lalrpop_util::{ErrorRecovery, ParseError};

/// The lexer hands the parser only valid tokens, so this error is never produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LexError;

/// The result of parsing one file: the tree (with `Error` nodes where recovery happened) and
/// all syntax errors, sorted by position.
#[derive(Debug, Clone)]
pub struct Parsed {
    pub file: File,
    pub tokens: Vec<SpannedToken>,
    pub errors: Vec<SyntaxError>,
}

/// Parses a whole `.curv` file.
pub fn parse(source: &str) -> Parsed {
    let (tokens, mut errors) = lex(source);
    let mut recovered: Vec<ErrorRecovery<usize, Token, LexError>> = Vec::new();
    let mut number_errors = Vec::new();
    let stream =
        tokens.iter().map(|spanned| Ok::<_, LexError>((spanned.span.start, spanned.token.clone(), spanned.span.end)));
    let result = crate::curv::FileParser::new().parse(&mut recovered, &mut number_errors, stream);
    let mut parser_errors = Vec::new();
    let mut file = match result {
        Ok(file) => file,
        Err(error) => {
            parser_errors.push(convert_error(error, source.len()));
            File::default()
        }
    };
    parser_errors.extend(recovered.into_iter().map(|recovery| convert_error(recovery.error, source.len())));
    // An unterminated string swallows the rest of its line, often with a closing `)`, so parser
    // errors from there to the end of that line are consequences of it and are not reported.
    let unterminated: Vec<Span> = errors.iter().filter(|error| error.code == "E0004").map(|error| error.span).collect();
    parser_errors.retain(|error| {
        !unterminated.iter().any(|string| string.start <= error.span.start && error.span.start <= string.end)
    });
    for error in &mut parser_errors {
        if error.code == "E0002" {
            if let Some(brace) = innermost_unclosed_brace(&tokens) {
                error.secondary = Some((brace, "this `{` is never closed".to_string()));
                error.help = Some("add the missing `}`".to_string());
            }
        }
    }
    errors.extend(parser_errors);
    errors.extend(number_errors);
    errors.extend(crate::nesting::limit_nesting(&mut file));
    errors.sort_by_key(|error| (error.span.start, error.span.end));
    errors.dedup_by(|a, b| a.span == b.span && a.code == b.code);
    Parsed { file, tokens, errors }
}

/// Parses one expression (used by tests and by the standard library loader).
pub fn parse_expression(source: &str) -> Result<crate::ast::Expr, Vec<SyntaxError>> {
    let (tokens, mut errors) = lex(source);
    let mut recovered = Vec::new();
    let mut number_errors = Vec::new();
    let stream =
        tokens.iter().map(|spanned| Ok::<_, LexError>((spanned.span.start, spanned.token.clone(), spanned.span.end)));
    let result = crate::curv::ExprParser::new().parse(&mut recovered, &mut number_errors, stream);
    errors.extend(number_errors);
    match result {
        Ok(mut expr) => {
            errors.extend(crate::nesting::limit_expression_nesting(&mut expr));
            if errors.is_empty() {
                Ok(expr)
            } else {
                Err(errors)
            }
        }
        Err(error) => {
            errors.push(convert_error(error, source.len()));
            Err(errors)
        }
    }
}

/// The last `{` that no `}` closes, if any.
fn innermost_unclosed_brace(tokens: &[SpannedToken]) -> Option<Span> {
    let mut open: Vec<Span> = Vec::new();
    for spanned in tokens {
        match spanned.token {
            Token::LBrace => open.push(spanned.span),
            Token::RBrace => {
                open.pop();
            }
            _ => {}
        }
    }
    open.pop()
}

fn convert_error(error: ParseError<usize, Token, LexError>, source_len: usize) -> SyntaxError {
    match error {
        ParseError::InvalidToken { location } => {
            SyntaxError::unexpected_token(Span::new(location, location + 1), "character".to_string(), &[])
        }
        ParseError::UnrecognizedEof { location, expected } => {
            let start = location.min(source_len);
            SyntaxError::unexpected_end(Span::new(start, start), &expected)
        }
        ParseError::UnrecognizedToken { token: (start, token, end), expected } => {
            SyntaxError::unexpected_token(Span::new(start, end), token.describe(), &expected)
        }
        ParseError::ExtraToken { token: (start, token, end) } => {
            SyntaxError::unexpected_token(Span::new(start, end), token.describe(), &[])
        }
        ParseError::User { error: LexError } => {
            SyntaxError::unexpected_token(Span::new(source_len, source_len), "input".to_string(), &[])
        }
    }
}
