//! Syntax errors, produced by the lexer and by the parser's error recovery.

use crate::span::Span;

/// A syntax error with a stable code (see `docs/errors.md`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyntaxError {
    pub code: &'static str,
    pub span: Span,
    pub message: String,
    pub label: String,
    pub help: Option<String>,
    /// A second place worth pointing at, such as the `{` that a missing `}` leaves open.
    pub secondary: Option<(Span, String)>,
}

impl SyntaxError {
    pub fn invalid_character(span: Span, text: &str) -> SyntaxError {
        SyntaxError {
            code: "E0003",
            span,
            message: format!("invalid character {text:?}"),
            label: "this character does not start any token".to_string(),
            // A `#` almost always starts a comment written in another language's style.
            help: (text == "#").then(|| "comments start with `//`".to_string()),
            secondary: None,
        }
    }

    pub fn unterminated_string(span: Span) -> SyntaxError {
        SyntaxError {
            code: "E0004",
            span,
            message: "unterminated string".to_string(),
            label: "this string has no closing `\"` on its line".to_string(),
            help: Some("add a `\"` at the end of the string".to_string()),
            secondary: None,
        }
    }

    pub fn unexpected_token(span: Span, found: String, expected: &[String]) -> SyntaxError {
        SyntaxError {
            code: "E0001",
            span,
            message: format!("unexpected {found}"),
            label: expected_label(expected),
            help: None,
            secondary: None,
        }
    }

    pub fn unexpected_end(span: Span, expected: &[String]) -> SyntaxError {
        SyntaxError {
            code: "E0002",
            span,
            message: "unexpected end of file".to_string(),
            label: expected_label(expected),
            help: Some("a block may be missing its closing `}`".to_string()),
            secondary: None,
        }
    }

    /// A part nested past [`crate::nesting::NESTING_LIMIT`]: `what` is "expression",
    /// "dimension" or "`every` block".
    pub fn too_deep(span: Span, what: &str) -> SyntaxError {
        let help = if what == "`every` block" {
            "merge the inner blocks: a block inside `every step` runs at every step already"
        } else {
            "give parts of it names with `let` (a long sum, for example, as partial sums)"
        };
        SyntaxError {
            code: "E0006",
            span: Span::new(span.start, span.start),
            message: format!("nested more than {} levels deep", crate::nesting::NESTING_LIMIT),
            label: format!("this {what} is nested {} levels deep", crate::nesting::NESTING_LIMIT + 1),
            help: Some(help.to_string()),
            secondary: None,
        }
    }

    pub fn invalid_number(span: Span, text: &str) -> SyntaxError {
        SyntaxError {
            code: "E0005",
            span,
            message: format!("number `{text}` is out of range"),
            label: "integers must fit in 63 bits and floats must be finite".to_string(),
            help: None,
            secondary: None,
        }
    }
}

/// Turns the parser's expected-token list into a short, readable label. Tokens that can start an
/// expression are summarised as "an expression", and a newline as "the end of the line".
fn expected_label(expected: &[String]) -> String {
    let names: Vec<&str> = expected.iter().map(|name| name.trim_matches('"')).collect();
    let expression_starts = ["ident", "int", "float", "string", "(", "[", "-", "loss"];
    let mut parts: Vec<String> = Vec::new();
    let takes_expression = names.contains(&"ident") && names.contains(&"int");
    if takes_expression {
        parts.push("an expression".to_string());
    } else if names.contains(&"ident") {
        parts.push("a name".to_string());
    }
    let mut punctuation: Vec<String> = names
        .iter()
        .filter(|name| {
            !(takes_expression && expression_starts.contains(name)) && **name != "ident" && **name != "newline"
        })
        .map(|name| readable_terminal(name))
        .collect();
    punctuation.sort();
    punctuation.dedup();
    if punctuation.len() <= 4 {
        parts.extend(punctuation);
    } else {
        // Many operators could continue the expression: they are named as one group, but the
        // closing brackets are kept, since they tell the reader which construct is still open.
        parts.push("an operator".to_string());
        parts.extend(
            ["`)`", "`]`", "`}`"]
                .into_iter()
                .filter(|closer| names.contains(&closer.trim_matches('`')))
                .map(String::from),
        );
    }
    if names.contains(&"newline") {
        parts.push("the end of the line".to_string());
    }
    match parts.len() {
        0 => "not expected here".to_string(),
        1 => format!("expected {}", parts[0]),
        _ => {
            let last = parts.pop().unwrap_or_default();
            format!("expected {} or {}", parts.join(", "), last)
        }
    }
}

fn readable_terminal(name: &str) -> String {
    let trimmed = name.trim_matches('"');
    match trimmed {
        "ident" => "a name".to_string(),
        "int" | "float" => "a number".to_string(),
        "string" => "a string".to_string(),
        "newline" => "a new line".to_string(),
        other => format!("`{other}`"),
    }
}
