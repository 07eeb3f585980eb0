//! The data probe that reads real files through `curv-data`.

use curv_data::{DataErrorKind, ElementType};
use curv_ir::DType;
use curv_sema::{DataProbe, DataProbeError, DataRequest, ProbedData};
use std::path::PathBuf;

pub struct FileProbe {
    pub directory: PathBuf,
}

fn dtype(element_type: ElementType) -> DType {
    match element_type {
        ElementType::F32 => DType::F32,
        ElementType::F64 => DType::F64,
        ElementType::I32 => DType::I32,
    }
}

impl DataProbe for FileProbe {
    fn probe(&mut self, request: &DataRequest) -> Result<ProbedData, DataProbeError> {
        let path_of = |key: &str| -> Option<PathBuf> {
            request.paths.iter().find(|(name, _)| name == key).map(|(_, path)| self.directory.join(path))
        };
        let first_key = request.paths.first().map(|(key, _)| key.clone()).unwrap_or_default();
        // The message leaves out the path: the diagnostic points at the path as the user wrote
        // it, which is shorter than the resolved one and the same on every machine.
        let convert = |key: &str, error: curv_data::DataError| DataProbeError {
            path_key: key.to_string(),
            not_found: error.kind == DataErrorKind::NotFound,
            message: error.message,
        };
        let schema = match request.source.as_str() {
            "csv" => {
                let path = path_of("path").unwrap_or_default();
                curv_data::probe_csv(&path, request.label.as_deref()).map_err(|error| convert("path", error))?
            }
            "image" => {
                let path = path_of("path").unwrap_or_default();
                curv_data::probe_image(&path).map_err(|error| convert("path", error))?
            }
            "idx" => {
                let images = path_of("images").unwrap_or_default();
                let labels = path_of("labels").unwrap_or_default();
                curv_data::probe_idx(&images, &labels).map_err(|error| {
                    let key = if error.path == labels { "labels" } else { "images" };
                    convert(key, error)
                })?
            }
            "npy" => {
                let mut fields = Vec::new();
                let mut examples = None;
                for (key, field) in [("x", "x"), ("y", "y")] {
                    let Some(path) = path_of(key) else { continue };
                    let (element_type, shape) = curv_data::probe_npy(&path).map_err(|error| convert(key, error))?;
                    let Some(&count) = shape.first() else {
                        return Err(DataProbeError {
                            path_key: key.to_string(),
                            not_found: false,
                            message: "a 0-d array has no examples".to_string(),
                        });
                    };
                    if let Some(previous) = examples {
                        if previous != count {
                            return Err(DataProbeError {
                                path_key: key.to_string(),
                                not_found: false,
                                message: format!("{count} examples, but `x` has {previous}"),
                            });
                        }
                    }
                    examples = Some(count);
                    let dtype = if key == "x" { DType::F32 } else { dtype(element_type) };
                    fields.push((field.to_string(), dtype, shape));
                }
                return Ok(ProbedData { fields, examples: examples.unwrap_or(0) });
            }
            other => {
                return Err(DataProbeError {
                    path_key: first_key,
                    not_found: false,
                    message: format!("unsupported data source {other}"),
                });
            }
        };
        Ok(ProbedData {
            fields: schema
                .fields
                .into_iter()
                .map(|field| (field.name, dtype(field.element_type), field.shape))
                .collect(),
            examples: schema.examples,
        })
    }
}
