//! The runtime's errors: a stable code (E0500 upward, documented in `docs/errors.md`), and where
//! the problem is: the parameter, the step and the structure, when they are known. The CLI prints
//! them as `[E0502] parameter `w1` (kronecker, step 18): ...`; the C ABI returns the same message
//! and `curv_context_error_code` reads the code from it.

use std::fmt;

/// A stable runtime error code: once published, a code keeps its meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// E0500: an optimizer plan the runtime does not execute (what `curv check` reports as E0309 to
    /// E0313; the message names the check's code).
    PlanNotExecutable,
    /// E0501: a non-finite loss, gradient or update, with the step.
    NonFinite,
    /// E0502: a parameter's optimizer update failed: a matrix function that does not converge or is
    /// not finite, or a state of another layout (written with other options).
    UpdateFailed,
    /// E0503: a training step's statistics could not be computed (Hessian-vector products, K-FAC
    /// captures, sampled labels, EGN's Gauss-Newton system).
    StatisticsFailed,
    /// E0504: the backend failed to evaluate a program or to keep or read back its values.
    BackendFailed,
}

/// Every runtime code with a one-line summary; `docs/errors.md` documents each.
pub const CODES: &[(ErrorCode, &str, &str)] = &[
    (ErrorCode::PlanNotExecutable, "E0500", "optimizer plan not executable"),
    (ErrorCode::NonFinite, "E0501", "non-finite value"),
    (ErrorCode::UpdateFailed, "E0502", "optimizer update failed"),
    (ErrorCode::StatisticsFailed, "E0503", "curvature statistics failed"),
    (ErrorCode::BackendFailed, "E0504", "backend failed"),
];

impl ErrorCode {
    /// The code as printed, `E0500` ...
    pub fn as_str(self) -> &'static str {
        CODES.iter().find(|(code, _, _)| *code == self).map_or("E0500", |(_, text, _)| text)
    }

    /// The one-line summary of the code.
    pub fn summary(self) -> &'static str {
        CODES.iter().find(|(code, _, _)| *code == self).map_or("", |(_, _, summary)| summary)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(self.as_str())
    }
}

/// A runtime error: its code, where it happened (each part when known), and what went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub code: ErrorCode,
    /// The parameter whose update or statistics failed.
    pub parameter: Option<String>,
    /// The training step (counted from 1).
    pub step: Option<u64>,
    /// The parameter's structure (`kronecker`, `diagonal`, ..., or `rule`).
    pub structure: Option<&'static str>,
    pub message: String,
}

impl Error {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Error {
        Error { code, parameter: None, step: None, structure: None, message: message.into() }
    }

    pub fn parameter(self, name: impl Into<String>) -> Error {
        Error { parameter: Some(name.into()), ..self }
    }

    pub fn step(self, step: u64) -> Error {
        Error { step: Some(step), ..self }
    }

    pub fn structure(self, structure: &'static str) -> Error {
        Error { structure: Some(structure), ..self }
    }
}

/// `[E0502] parameter `w1` (kronecker, step 18): message`; the parts not known are left out.
impl fmt::Display for Error {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "[{}] ", self.code)?;
        let context: Vec<String> = self
            .structure
            .map(str::to_string)
            .into_iter()
            .chain(self.step.map(|step| format!("step {step}")))
            .collect();
        match (&self.parameter, context.is_empty()) {
            (Some(name), true) => write!(formatter, "parameter `{name}`: ")?,
            (Some(name), false) => write!(formatter, "parameter `{name}` ({}): ", context.join(", "))?,
            (None, false) => write!(formatter, "{}: ", context.join(", "))?,
            (None, true) => {}
        }
        formatter.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// The stable code at the start of a rendered error (`[E0502] ...`), if any: how a caller that
/// keeps only the message (the C ABI's context) recovers the code.
pub fn code_of_message(message: &str) -> Option<&str> {
    let rest = message.strip_prefix('[')?;
    let end = rest.find(']')?;
    let code = &rest[..end];
    let well_formed = code.len() == 5 && code.starts_with('E') && code[1..].bytes().all(|byte| byte.is_ascii_digit());
    well_formed.then_some(code)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_distinct_and_in_order() {
        let texts: Vec<&str> = CODES.iter().map(|(_, text, _)| *text).collect();
        let mut sorted = texts.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(texts, sorted);
        for (code, text, _) in CODES {
            assert_eq!(code.as_str(), *text);
        }
    }

    #[test]
    fn every_code_has_its_row_in_the_documentation() {
        let documentation = include_str!("../../../docs/errors.md");
        for (_, text, summary) in CODES {
            let row = format!("| {text} | **{summary}**");
            assert!(documentation.contains(&row), "docs/errors.md has no row `{row}`");
        }
    }

    #[test]
    fn an_error_renders_its_code_parameter_structure_and_step() {
        let error = Error::new(ErrorCode::UpdateFailed, "the inverse root is not finite")
            .parameter("w1")
            .structure("kronecker")
            .step(18);
        let text = error.to_string();
        assert_eq!(text, "[E0502] parameter `w1` (kronecker, step 18): the inverse root is not finite");
        assert_eq!(code_of_message(&text), Some("E0502"));
        assert_eq!(Error::new(ErrorCode::BackendFailed, "lost").to_string(), "[E0504] lost");
        assert_eq!(Error::new(ErrorCode::StatisticsFailed, "no rows").step(3).to_string(), "[E0503] step 3: no rows");
        assert_eq!(code_of_message("[E0604] a.safetensors: not found"), Some("E0604"));
        assert_eq!(code_of_message("step 3: lost"), None);
        assert_eq!(code_of_message("[note] lost"), None);
    }
}
