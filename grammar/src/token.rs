//! The logos lexer and the token stream the parser reads.
//!
//! The language is line-oriented: a statement ends at a newline. The lexer therefore produces
//! `Newline` tokens, but drops those that cannot end a statement: inside `(...)` and `[...]`, after
//! an opening brace, after a binary operator or a comma, and repeated ones. Characters that form no
//! token are reported as lexical errors and skipped, so the parser still sees the rest of the file.

use crate::span::Span;
use crate::syntax_error::SyntaxError;
use logos::Logos;

#[derive(Logos, Debug, Clone, PartialEq)]
#[logos(skip r"[ \t\r\f]+")]
#[logos(skip(r"//[^\n]*", allow_greedy = true))]
pub enum Token {
    #[token("\n")]
    Newline,

    #[token("use")]
    KwUse,
    #[token("data")]
    KwData,
    #[token("dim")]
    KwDim,
    #[token("model")]
    KwModel,
    #[token("param")]
    KwParam,
    #[token("let")]
    KwLet,
    #[token("return")]
    KwReturn,
    #[token("loss")]
    KwLoss,
    #[token("optimizer")]
    KwOptimizer,
    #[token("rule")]
    KwRule,
    #[token("state")]
    KwState,
    #[token("every")]
    KwEvery,
    #[token("train")]
    KwTrain,

    #[regex(r"[A-Za-z_][A-Za-z0-9_]*", |lexer| lexer.slice().to_string())]
    Ident(String),
    #[regex(r"[0-9]+", |lexer| lexer.slice().to_string())]
    Int(String),
    #[regex(r"[0-9]+\.[0-9]*([eE][+-]?[0-9]+)?|[0-9]+[eE][+-]?[0-9]+|\.[0-9]+([eE][+-]?[0-9]+)?", |lexer| lexer.slice().to_string())]
    Float(String),
    #[regex(r#""[^"\n]*""#, |lexer| { let text = lexer.slice(); text[1..text.len() - 1].to_string() })]
    Str(String),
    #[regex(r#""[^"\n]*"#)]
    UnterminatedStr,

    #[token("(")]
    LParen,
    #[token(")")]
    RParen,
    #[token("[")]
    LBracket,
    #[token("]")]
    RBracket,
    #[token("{")]
    LBrace,
    #[token("}")]
    RBrace,
    #[token(",")]
    Comma,
    #[token(":")]
    Colon,
    #[token(";")]
    Semicolon,
    #[token(".")]
    Dot,
    #[token("=")]
    Eq,
    #[token("->")]
    Arrow,
    #[token("+")]
    Plus,
    #[token("-")]
    Minus,
    #[token("*")]
    Star,
    #[token("/")]
    Slash,
    #[token("@")]
    At,
    #[token("^")]
    Caret,
    #[token("?")]
    Question,
}

impl Token {
    /// How the token is written in diagnostics and in `curv emit --stage tokens`.
    pub fn describe(&self) -> String {
        match self {
            Token::Newline => "newline".to_string(),
            Token::Ident(name) => format!("identifier `{name}`"),
            Token::Int(text) | Token::Float(text) => format!("number `{text}`"),
            Token::Str(text) => format!("string \"{text}\""),
            Token::UnterminatedStr => "unterminated string".to_string(),
            other => format!("`{}`", other.text()),
        }
    }

    /// The fixed spelling of punctuation and keywords (empty for tokens that carry text).
    pub fn text(&self) -> &'static str {
        match self {
            Token::Newline => "\\n",
            Token::KwUse => "use",
            Token::KwData => "data",
            Token::KwDim => "dim",
            Token::KwModel => "model",
            Token::KwParam => "param",
            Token::KwLet => "let",
            Token::KwReturn => "return",
            Token::KwLoss => "loss",
            Token::KwOptimizer => "optimizer",
            Token::KwRule => "rule",
            Token::KwState => "state",
            Token::KwEvery => "every",
            Token::KwTrain => "train",
            Token::LParen => "(",
            Token::RParen => ")",
            Token::LBracket => "[",
            Token::RBracket => "]",
            Token::LBrace => "{",
            Token::RBrace => "}",
            Token::Comma => ",",
            Token::Colon => ":",
            Token::Semicolon => ";",
            Token::Dot => ".",
            Token::Eq => "=",
            Token::Arrow => "->",
            Token::Plus => "+",
            Token::Minus => "-",
            Token::Star => "*",
            Token::Slash => "/",
            Token::At => "@",
            Token::Caret => "^",
            Token::Question => "?",
            Token::Ident(_) | Token::Int(_) | Token::Float(_) | Token::Str(_) | Token::UnterminatedStr => "",
        }
    }

    /// The kind name used by `curv emit --stage tokens`.
    pub fn kind(&self) -> &'static str {
        match self {
            Token::Newline => "newline",
            Token::Ident(_) => "ident",
            Token::Int(_) => "int",
            Token::Float(_) => "float",
            Token::Str(_) => "string",
            Token::UnterminatedStr => "unterminated-string",
            Token::KwUse
            | Token::KwData
            | Token::KwDim
            | Token::KwModel
            | Token::KwParam
            | Token::KwLet
            | Token::KwReturn
            | Token::KwLoss
            | Token::KwOptimizer
            | Token::KwRule
            | Token::KwState
            | Token::KwEvery
            | Token::KwTrain => "keyword",
            _ => "punct",
        }
    }

    /// Whether a newline directly after this token continues the statement.
    fn continues_line(&self) -> bool {
        matches!(
            self,
            Token::LBrace
                | Token::LParen
                | Token::LBracket
                | Token::Comma
                | Token::Colon
                | Token::Eq
                | Token::Arrow
                | Token::Plus
                | Token::Minus
                | Token::Star
                | Token::Slash
                | Token::At
                | Token::Caret
                | Token::Newline
                | Token::Semicolon
        )
    }
}

/// A token with its byte span.
#[derive(Debug, Clone, PartialEq)]
pub struct SpannedToken {
    pub token: Token,
    pub span: Span,
}

/// Lexes `source` into the token stream the parser reads, together with lexical errors.
///
/// The stream never contains two newlines in a row, nor a newline that cannot end a statement.
pub fn lex(source: &str) -> (Vec<SpannedToken>, Vec<SyntaxError>) {
    let mut tokens: Vec<SpannedToken> = Vec::new();
    let mut errors = Vec::new();
    let mut bracket_depth: usize = 0;
    let mut lexer = Token::lexer(source);
    while let Some(result) = lexer.next() {
        let range = lexer.span();
        let span = Span::new(range.start, range.end);
        let token = match result {
            Ok(token) => token,
            Err(()) => {
                let text = &source[range.clone()];
                errors.push(SyntaxError::invalid_character(span, text));
                if text == "#" {
                    // A `#` comment: its words would only produce more errors, so the rest of the
                    // line is skipped.
                    let rest_of_line = source[range.end..].find('\n').unwrap_or(source.len() - range.end);
                    lexer.bump(rest_of_line);
                }
                continue;
            }
        };
        match token {
            Token::UnterminatedStr => {
                errors.push(SyntaxError::unterminated_string(span));
                // Keep a string token so that the parser does not report a second error. The
                // string runs to the end of the line and has probably swallowed a closing bracket,
                // so the newline after it ends the statement.
                let text = source[range.start + 1..range.end].to_string();
                tokens.push(SpannedToken { token: Token::Str(text), span });
                bracket_depth = 0;
                continue;
            }
            Token::LParen | Token::LBracket => bracket_depth += 1,
            Token::RParen | Token::RBracket => bracket_depth = bracket_depth.saturating_sub(1),
            // Braces never occur inside brackets in a valid file; resetting here keeps one missing
            // `)` from swallowing the newlines of the rest of the file.
            Token::LBrace | Token::RBrace => bracket_depth = 0,
            Token::Newline => {
                let previous_continues = tokens.last().is_none_or(|last| last.token.continues_line());
                if bracket_depth > 0 || previous_continues {
                    continue;
                }
            }
            _ => {}
        }
        tokens.push(SpannedToken { token, span });
    }
    (tokens, errors)
}
