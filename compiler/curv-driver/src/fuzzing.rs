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

/// The parameters of the small digits MLP (64 -> 16 -> 10) whose checkpoints seed the fuzzer
/// (`tests/fuzz/seeds/safetensors`).
fn seed_model_parameters() -> Vec<(String, Vec<usize>)> {
    [("w1", vec![64, 16]), ("b1", vec![16]), ("w2", vec![16, 10]), ("b2", vec![10])]
        .into_iter()
        .map(|(name, shape)| (name.to_string(), shape))
        .collect()
}

/// Reads `bytes` as a safetensors file the way `--init` (every tensor, checksums verified where
/// present) and `--resume` (a whole checkpoint of the small digits MLP of the seeds) read one, in both precisions,
/// through the runtime's own file readers (the bytes are written to a scratch file first). Returns
/// how many of the four reads succeeded; every failure must be an error, never a panic.
pub fn exercise_checkpoint(bytes: &[u8]) -> usize {
    let directory = std::env::temp_dir();
    let path = directory.join(format!("curv-fuzz-checkpoint-{}.safetensors", std::process::id()));
    if std::fs::write(&path, bytes).is_err() {
        return 0;
    }
    let expected = seed_model_parameters();
    let read = [
        curv_runtime::checkpoint::read_file::<f32>(&path).is_ok(),
        curv_runtime::checkpoint::read_file::<f64>(&path).is_ok(),
        curv_runtime::checkpoint::Checkpoint::<f32>::load(&path, &expected).is_ok(),
        curv_runtime::checkpoint::Checkpoint::<f64>::load(&path, &expected).is_ok(),
    ];
    let _ = std::fs::remove_file(&path);
    read.into_iter().filter(|&ok| ok).count()
}

/// The fields' shapes of loaded data, to compare with what probing reported.
fn loaded_shapes(loaded: &curv_data::LoadedData) -> Vec<(String, Vec<i64>)> {
    loaded
        .fields
        .iter()
        .map(|field| (field.name.clone(), field.shape.iter().map(|&size| size as i64).collect()))
        .collect()
}

/// Checks the readers' promise: data that probes cleanly loads, into the shapes the probe reported,
/// with as many elements as the shapes hold. `header_only`: the probe reads only the header, so
/// loading may still find the rest damaged.
fn agree(
    probed: Result<curv_data::DataSchema, curv_data::DataError>,
    loaded: Result<curv_data::LoadedData, curv_data::DataError>,
    header_only: bool,
) -> Result<bool, String> {
    match (probed, loaded) {
        (Ok(schema), Ok(loaded)) => {
            let probed: Vec<(String, Vec<i64>)> =
                schema.fields.iter().map(|field| (field.name.clone(), field.shape.clone())).collect();
            if probed != loaded_shapes(&loaded) || schema.examples != loaded.examples as i64 {
                return Err(format!("probed {probed:?} but loaded {:?}", loaded_shapes(&loaded)));
            }
            for field in &loaded.fields {
                if field.data.len() != field.shape.iter().product::<usize>() {
                    return Err(format!(
                        "field {} has {} elements for shape {:?}",
                        field.name,
                        field.data.len(),
                        field.shape
                    ));
                }
            }
            Ok(true)
        }
        (Ok(_), Err(error)) if !header_only => Err(format!("probing succeeded but loading failed: {error}")),
        (Err(_), Ok(_)) => Err("loading succeeded where probing failed".to_string()),
        _ => Ok(false),
    }
}

/// Reads `bytes` as a CSV file with the CSV reader, as probing for the checker and loading for a
/// run do. The first byte picks the label option (none, `label` or `y`); the rest is the file.
/// `Ok(true)`: the file was valid; `Err`: probing and loading disagree, which is a bug.
pub fn exercise_csv(bytes: &[u8]) -> Result<bool, String> {
    let Some((&selector, file)) = bytes.split_first() else { return Ok(false) };
    let label = [None, Some("label"), Some("y")][usize::from(selector % 3)];
    let path = std::path::Path::new("fuzz.csv");
    agree(
        curv_data::probe_csv_bytes(path, file, label),
        curv_data::load_csv_data_bytes(path, file, label, 0.0625),
        false,
    )
}

/// Reads `bytes` as a `.npy` file, probing and loading it. See [`exercise_csv`].
pub fn exercise_npy(bytes: &[u8]) -> Result<bool, String> {
    let path = std::path::Path::new("fuzz.npy");
    match (curv_data::probe_npy_bytes(path, bytes), curv_data::load_npy_bytes(path, bytes)) {
        (Ok((element_type, probed)), Ok((shape, data))) => {
            let loaded: Vec<i64> = shape.iter().map(|&size| size as i64).collect();
            // 64-bit floats load as 32-bit ones; the other types load as they probe.
            let types_agree = element_type == data.element_type() || element_type == curv_data::ElementType::F64;
            if probed != loaded || !types_agree || data.len() != shape.iter().product::<usize>() {
                return Err(format!(
                    "probed {element_type:?} {probed:?} but loaded {:?} {shape:?}",
                    data.element_type()
                ));
            }
            Ok(true)
        }
        (Err(_), Ok(_)) => Err("loading succeeded where probing failed".to_string()),
        // Loading may refuse values probing does not read (a 64-bit integer outside 32 bits).
        _ => Ok(false),
    }
}

/// Reads `bytes` as an MNIST pair of IDX files: the first two bytes (little-endian) say how many of
/// the remaining bytes are the image file; the rest is the label file. See [`exercise_csv`].
pub fn exercise_idx(bytes: &[u8]) -> Result<bool, String> {
    if bytes.len() < 2 {
        return Ok(false);
    }
    let (length, files) = bytes.split_at(2);
    let split = usize::from(u16::from_le_bytes([length[0], length[1]])).min(files.len());
    let (images, labels) = files.split_at(split);
    let (image_path, label_path) = (std::path::Path::new("images.idx"), std::path::Path::new("labels.idx"));
    agree(
        curv_data::probe_idx_bytes(image_path, images, label_path, labels),
        curv_data::load_idx_bytes(image_path, images, label_path, labels, 1.0 / 255.0),
        false,
    )
}

/// Reads `bytes` as a PNG image, probing and loading it. See [`exercise_csv`].
pub fn exercise_png(bytes: &[u8]) -> Result<bool, String> {
    let path = std::path::Path::new("fuzz.png");
    agree(curv_data::probe_image_bytes(path, bytes), curv_data::load_image_bytes(path, bytes), true)
}
