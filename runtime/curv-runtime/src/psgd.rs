//! PSGD-Kron: the Kronecker-factored preconditioner fitted on the Lie group (whitening form).
//!
//! (Being written: see docs/language.md §12.7 once it lands.)

use crate::kronecker::{KroneckerInputs, States};
use curv_ir::ParamPlan;

/// One step: returns the direction (the step is `-lr * direction`), or `None` when this step only
/// initialises the state and leaves the parameter unchanged.
pub(crate) fn direction(
    _plan: &ParamPlan,
    _shape: &[usize],
    _states: &mut States,
    _inputs: &KroneckerInputs,
) -> Result<Option<Vec<f64>>, String> {
    Err("`function = lie_group` (PSGD-Kron) is not executable yet".to_string())
}
