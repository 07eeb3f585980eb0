//! Checkpoints in safetensors: every parameter (`param.NAME`) and every optimizer state tensor
//! (`state.NAME.STATE`), with the step and seed in the metadata. Files are written to a temporary
//! name in the same directory and renamed into place, so a checkpoint is never half written.

use curv_interp::Real;
pub use curv_interp::Tensor;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::Path;

pub const FORMAT: &str = "curv-checkpoint-1";

/// A checkpoint in memory.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint<T> {
    pub step: u64,
    pub seed: u64,
    pub train: String,
    pub params: Vec<(String, Tensor<T>)>,
    /// Per parameter (same order), its named state tensors.
    pub states: Vec<Vec<(String, Tensor<T>)>>,
}

fn dtype<T: Real>() -> Dtype {
    if T::NAME == "f64" {
        Dtype::F64
    } else {
        Dtype::F32
    }
}

fn to_bytes<T: Real>(tensor: &Tensor<T>) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(tensor.len() * 8);
    for value in &tensor.data {
        if T::NAME == "f64" {
            bytes.extend_from_slice(&value.to_f64().to_le_bytes());
        } else {
            bytes.extend_from_slice(&(value.to_f64() as f32).to_le_bytes());
        }
    }
    bytes
}

/// The metadata key under which curv stores its fields. The safetensors header is written from a
/// hash map, whose order varies between processes; one key holding `key=value;...` in a fixed
/// order keeps files byte-identical for identical contents.
pub const METADATA_KEY: &str = "curv";

/// Serialises tensors to safetensors bytes with metadata (in the given order).
pub fn serialize<T: Real>(tensors: &[(String, &Tensor<T>)], metadata: &[(&str, String)]) -> Result<Vec<u8>, String> {
    let buffers: Vec<(String, Vec<usize>, Vec<u8>)> =
        tensors.iter().map(|(name, tensor)| (name.clone(), tensor.shape.clone(), to_bytes(tensor))).collect();
    let mut views = Vec::with_capacity(buffers.len());
    for (name, shape, bytes) in &buffers {
        let view =
            TensorView::new(dtype::<T>(), shape.clone(), bytes).map_err(|error| format!("tensor `{name}`: {error}"))?;
        views.push((name.clone(), view));
    }
    let joined: Vec<String> = metadata.iter().map(|(key, value)| format!("{key}={value}")).collect();
    let header = HashMap::from([(METADATA_KEY.to_string(), joined.join(";"))]);
    safetensors::serialize(views, Some(header)).map_err(|error| error.to_string())
}

/// Writes `bytes` to `path` atomically.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), String> {
    let directory = path.parent().filter(|parent| !parent.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let file_name =
        path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_else(|| "checkpoint".to_string());
    let temporary = directory.join(format!(".{file_name}.{}.tmp", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        use std::io::Write;
        let mut file = std::fs::File::create(&temporary)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&temporary, path)
    })();
    result.map_err(|error| {
        let _ = std::fs::remove_file(&temporary);
        format!("cannot write {}: {error}", path.display())
    })
}

impl<T: Real> Checkpoint<T> {
    pub fn save(&self, path: &Path) -> Result<(), String> {
        let mut tensors: Vec<(String, &Tensor<T>)> = Vec::new();
        for (name, tensor) in &self.params {
            tensors.push((format!("param.{name}"), tensor));
        }
        for ((name, _), state) in self.params.iter().zip(&self.states) {
            for (state_name, tensor) in state {
                tensors.push((format!("state.{name}.{state_name}"), tensor));
            }
        }
        let metadata = [
            ("format", FORMAT.to_string()),
            ("step", self.step.to_string()),
            ("seed", self.seed.to_string()),
            ("train", self.train.clone()),
            ("precision", T::NAME.to_string()),
        ];
        let bytes = serialize(&tensors, &metadata)?;
        write_atomically(path, &bytes)
    }

    /// Loads a checkpoint, checking it against the expected parameters `(name, shape)`.
    pub fn load(path: &Path, expected: &[(String, Vec<usize>)]) -> Result<Checkpoint<T>, String> {
        let bytes = std::fs::read(path).map_err(|error| format!("cannot read {}: {error}", path.display()))?;
        let metadata = read_metadata(&bytes, path)?;
        if metadata.get("format").map(String::as_str) != Some(FORMAT) {
            return Err(format!("{}: not a curv checkpoint (no `format: {FORMAT}` metadata)", path.display()));
        }
        if metadata.get("precision").map(String::as_str) != Some(T::NAME) {
            return Err(format!(
                "{}: written in {} precision, but this run uses {}",
                path.display(),
                metadata.get("precision").map_or("unknown", String::as_str),
                T::NAME
            ));
        }
        let number = |key: &str| -> Result<u64, String> {
            metadata
                .get(key)
                .and_then(|value| value.parse().ok())
                .ok_or_else(|| format!("{}: metadata `{key}` is missing or invalid", path.display()))
        };
        let (step, seed) = (number("step")?, number("seed")?);
        let tensors =
            safetensors::SafeTensors::deserialize(&bytes).map_err(|error| format!("{}: {error}", path.display()))?;
        let all = read_all::<T>(&tensors, path)?;
        let mut params = Vec::new();
        let mut states = Vec::new();
        for (name, shape) in expected {
            let key = format!("param.{name}");
            let tensor = all.get(&key).ok_or_else(|| format!("{}: parameter `{name}` is missing", path.display()))?;
            if &tensor.shape != shape {
                return Err(format!(
                    "{}: parameter `{name}` has shape {:?}, expected {shape:?}",
                    path.display(),
                    tensor.shape
                ));
            }
            params.push((name.clone(), tensor.clone()));
            let prefix = format!("state.{name}.");
            let mut state: Vec<(String, Tensor<T>)> = all
                .iter()
                .filter_map(|(key, tensor)| {
                    key.strip_prefix(&prefix).map(|state_name| (state_name.to_string(), tensor.clone()))
                })
                .collect();
            state.sort_by(|a, b| a.0.cmp(&b.0));
            states.push(state);
        }
        Ok(Checkpoint { step, seed, train: metadata.get("train").cloned().unwrap_or_default(), params, states })
    }
}

/// Every tensor of a safetensors file, converted to `T` (f32 and f64 files are accepted).
pub fn read_all<T: Real>(
    tensors: &safetensors::SafeTensors,
    path: &Path,
) -> Result<HashMap<String, Tensor<T>>, String> {
    let mut out = HashMap::new();
    for (name, view) in tensors.tensors() {
        let data: Vec<T> = match view.dtype() {
            Dtype::F32 => view
                .data()
                .chunks_exact(4)
                .map(|chunk| T::from_f64(f32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) as f64))
                .collect(),
            Dtype::F64 => view
                .data()
                .chunks_exact(8)
                .map(|chunk| {
                    T::from_f64(f64::from_le_bytes([
                        chunk[0], chunk[1], chunk[2], chunk[3], chunk[4], chunk[5], chunk[6], chunk[7],
                    ]))
                })
                .collect(),
            other => return Err(format!("{}: tensor `{name}` has unsupported dtype {other:?}", path.display())),
        };
        out.insert(name.clone(), Tensor::new(view.shape().to_vec(), data));
    }
    Ok(out)
}

pub use safetensors::SafeTensors;

/// The tensors of a safetensors file by name, and its `key=value` metadata.
pub type TensorsAndMetadata<T> = (HashMap<String, Tensor<T>>, HashMap<String, String>);

/// Every tensor of a safetensors file curv wrote (converted to `T`) and its `key=value` metadata.
pub fn read_file<T: Real>(path: &Path) -> Result<TensorsAndMetadata<T>, String> {
    let bytes = std::fs::read(path).map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    let metadata = read_metadata(&bytes, path)?;
    let tensors = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|error| format!("{}: not a safetensors file ({error})", path.display()))?;
    Ok((read_all(&tensors, path)?, metadata))
}

/// The `key=value` fields curv stores under [`METADATA_KEY`] in a safetensors header.
fn read_metadata(bytes: &[u8], path: &Path) -> Result<HashMap<String, String>, String> {
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|error| format!("{}: not a safetensors file ({error})", path.display()))?;
    Ok(header
        .metadata()
        .as_ref()
        .and_then(|entries| entries.get(METADATA_KEY))
        .map(|joined| {
            joined
                .split(';')
                .filter_map(|pair| pair.split_once('='))
                .map(|(key, value)| (key.to_string(), value.to_string()))
                .collect()
        })
        .unwrap_or_default())
}
