//! The front end as the fuzzer and the seed-corpus test drive it, with an in-memory data probe.

use curv_ir::DType;
use curv_sema::{DataProbe, DataProbeError, DataRequest, ProbedData};

/// Answers every data request without touching the disk: a data set whose name has an odd length
/// of more than three characters is missing; the others have the fields of their source kind.
pub struct MemoryProbe;

impl DataProbe for MemoryProbe {
    fn probe(&mut self, request: &DataRequest) -> Result<ProbedData, DataProbeError> {
        if !request.name.len().is_multiple_of(2) && request.name.len() > 3 {
            return Err(DataProbeError {
                path_key: "path".to_string(),
                not_found: true,
                message: "missing".to_string(),
            });
        }
        if request.source == "image" {
            let fields =
                vec![("coords".to_string(), DType::F32, vec![64, 2]), ("values".to_string(), DType::F32, vec![64, 1])];
            return Ok(ProbedData { fields, examples: 64 });
        }
        let fields = vec![("x".to_string(), DType::F32, vec![100, 64]), ("y".to_string(), DType::I32, vec![100])];
        Ok(ProbedData { fields, examples: 100 })
    }
}

/// Runs every front-end stage on `text`: parse, check, render diagnostics, emit every stage and,
/// for a valid file, the check summary. Returns whether the file had errors.
pub fn exercise_front_end(text: &str) -> bool {
    let source = crate::SourceFile::in_memory("fuzz.curv", text, std::path::Path::new("/nonexistent"));
    let compilation = crate::compile_with_probe(source, &mut MemoryProbe);
    let _ = crate::render_diagnostics(&compilation, false);
    for stage in [crate::Stage::Tokens, crate::Stage::Ast, crate::Stage::Ir] {
        let _ = crate::emit(&compilation, stage);
    }
    let has_errors = compilation.has_errors();
    if !has_errors {
        let _ = crate::check_summary(&compilation);
    }
    has_errors
}
