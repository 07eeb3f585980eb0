//! `curv-sema` owns the meaning of a `.curv` file: name resolution, symbolic shape and dtype
//! inference, the optimizer checks, the standard library of presets, and the lowering of the AST
//! to the typed IR of `curv-ir`.
//!
//! It is pure: data files are probed by the caller through [`DataProbe`], so every check is a
//! function of the source text and the probe's answers. Errors never stop the analysis: each
//! problem becomes a [`Diagnostic`] and the checker goes on with the rest of the file.

mod builtin_calls;
mod builtins;
mod check;
mod diagnostic;
mod executable;
mod lower;
mod optimizer;
mod rules;
pub mod std_lib;
mod suggest;
mod train;

pub use check::{analyze, analyze_with, Analysis, AnalysisOptions, DataProbe, DataProbeError, DataRequest, ProbedData};
pub use diagnostic::{Diagnostic, Label, Severity, SourceId, CODES};
