//! Checkpoints in safetensors: every parameter (`param.NAME`) and every optimizer state tensor
//! (`state.NAME.STATE`), with the step and seed in the metadata. Files are written to a temporary
//! name in the same directory, synced, renamed into place and the directory synced, so a
//! checkpoint is never half written, even when the process is killed.
//!
//! Every file curv writes carries checksums (CRC-32) in its metadata: one per tensor, over its
//! name, dtype, shape and bytes (`tensor_crc32=NAME:HEX,...`), and one over the metadata itself
//! (`metadata_crc32=HEX`, the last field). Reading verifies them, so a damaged or truncated file is
//! an error with a stable code ([`CODES`]) that names the file and, for damaged data, the tensor.

use curv_interp::Real;
pub use curv_interp::Tensor;
use safetensors::tensor::{Dtype, TensorView};
use std::collections::HashMap;
use std::path::Path;

/// The format of checkpoints curv writes (`format=` in the metadata). Version 2 carries checksums;
/// version 1 (before checksums) is refused with [`NO_CHECKSUMS`].
pub const FORMAT: &str = "curv-checkpoint-2";
const FORMAT_WITHOUT_CHECKSUMS: &str = "curv-checkpoint-1";

/// E0600: the file cannot be read: missing, truncated, or not a safetensors file (a damaged header).
pub const UNREADABLE: &str = "E0600";
/// E0601: a tensor's bytes, dtype or shape do not match its checksum.
pub const TENSOR_DAMAGED: &str = "E0601";
/// E0602: the metadata is damaged: its checksum does not match, or the checksum list is malformed
/// or does not list exactly the file's tensors.
pub const METADATA_DAMAGED: &str = "E0602";
/// E0603: the file carries no checksums (a checkpoint written before curv stored them).
pub const NO_CHECKSUMS: &str = "E0603";
/// E0604: a sound checkpoint that does not fit this run (format, precision, train, seed, a
/// parameter missing or of another shape).
pub const DOES_NOT_FIT: &str = "E0604";
/// E0605: the file cannot be written.
pub const UNWRITABLE: &str = "E0605";

/// The checkpoint error codes and what each means (docs/errors.md, section "Checkpoints").
pub const CODES: &[(&str, &str)] = &[
    (UNREADABLE, "checkpoint cannot be read"),
    (TENSOR_DAMAGED, "tensor does not match its checksum"),
    (METADATA_DAMAGED, "checkpoint metadata is damaged"),
    (NO_CHECKSUMS, "checkpoint has no checksums"),
    (DOES_NOT_FIT, "checkpoint does not fit this run"),
    (UNWRITABLE, "checkpoint cannot be written"),
];

/// A checkpoint or safetensors file that cannot be read, verified, used or written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointError {
    /// One of [`CODES`].
    pub code: &'static str,
    /// What went wrong; it starts with the file's path.
    pub message: String,
}

impl CheckpointError {
    pub fn new(code: &'static str, path: &Path, what: impl std::fmt::Display) -> CheckpointError {
        CheckpointError { code, message: format!("{}: {what}", path.display()) }
    }
}

impl std::fmt::Display for CheckpointError {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(formatter, "[{}] {}", self.code, self.message)
    }
}

impl std::error::Error for CheckpointError {}

impl From<CheckpointError> for String {
    fn from(error: CheckpointError) -> String {
        error.to_string()
    }
}

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
/// The field listing every tensor's checksum, `NAME:HEX,...` in the order written.
pub const TENSOR_CHECKSUMS: &str = "tensor_crc32";
/// The last field: the checksum of the metadata text before it (`...;metadata_crc32=HEX`).
pub const METADATA_CHECKSUM: &str = "metadata_crc32";

/// The checksum of one tensor: its name, dtype, shape and bytes, so that damage to its header
/// entry is caught as well as damage to its data.
fn tensor_checksum(name: &str, dtype: Dtype, shape: &[usize], data: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(name.as_bytes());
    hasher.update(&[0]);
    // The dtype as safetensors spells it in the header (written out for the two curv writes, so
    // that checksums do not depend on the crate's `Debug` output).
    let dtype = match dtype {
        Dtype::F32 => "F32".to_string(),
        Dtype::F64 => "F64".to_string(),
        other => format!("{other:?}"),
    };
    hasher.update(dtype.as_bytes());
    hasher.update(&[0]);
    hasher.update(&(shape.len() as u64).to_le_bytes());
    for size in shape {
        hasher.update(&(*size as u64).to_le_bytes());
    }
    hasher.update(data);
    hasher.finalize()
}

/// Characters a tensor name, metadata key or value cannot hold (they separate the fields).
fn has_separator(text: &str) -> bool {
    text.contains([';', '=', ',', ':'])
}

/// Serialises tensors to safetensors bytes with metadata (in the given order), followed by the
/// tensors' checksums and the metadata's checksum.
pub fn serialize<T: Real>(
    tensors: &[(String, &Tensor<T>)],
    metadata: &[(&str, String)],
) -> Result<Vec<u8>, CheckpointError> {
    let unwritable = |what: String| CheckpointError { code: UNWRITABLE, message: what };
    let buffers: Vec<(String, Vec<usize>, Vec<u8>)> =
        tensors.iter().map(|(name, tensor)| (name.clone(), tensor.shape.clone(), to_bytes(tensor))).collect();
    let mut views = Vec::with_capacity(buffers.len());
    let mut checksums = Vec::with_capacity(buffers.len());
    for (name, shape, bytes) in &buffers {
        if has_separator(name) || name.is_empty() {
            return Err(unwritable(format!("tensor name `{name}` is empty or holds one of `;=,:`")));
        }
        let view = TensorView::new(dtype::<T>(), shape.clone(), bytes)
            .map_err(|error| unwritable(format!("tensor `{name}`: {error}")))?;
        checksums.push(format!("{name}:{:08x}", tensor_checksum(name, dtype::<T>(), shape, bytes)));
        views.push((name.clone(), view));
    }
    let mut fields = Vec::with_capacity(metadata.len() + 1);
    for (key, value) in metadata {
        if has_separator(key) || value.contains([';', '=']) || [TENSOR_CHECKSUMS, METADATA_CHECKSUM].contains(key) {
            return Err(unwritable(format!("metadata `{key}={value}` cannot be stored")));
        }
        fields.push(format!("{key}={value}"));
    }
    fields.push(format!("{TENSOR_CHECKSUMS}={}", checksums.join(",")));
    let mut joined = fields.join(";");
    let checksum = crc32fast::hash(joined.as_bytes());
    joined.push_str(&format!(";{METADATA_CHECKSUM}={checksum:08x}"));
    let header = HashMap::from([(METADATA_KEY.to_string(), joined)]);
    safetensors::serialize(views, Some(header)).map_err(|error| unwritable(error.to_string()))
}

/// A name for a temporary file next to `path` that no other writer uses: the process id and a
/// counter of this process's writes (the file is also created with `create_new`).
fn temporary_name(directory: &Path, file_name: &str) -> std::path::PathBuf {
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let count = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    directory.join(format!(".{file_name}.{}.{count}.tmp", std::process::id()))
}

/// Writes `bytes` to `path` atomically and durably: into a new temporary file in the same
/// directory, synced to disk, renamed over `path`, and the directory synced so the rename itself
/// survives a crash. A reader sees the old file or the new one, never a part.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), CheckpointError> {
    let directory = path.parent().filter(|parent| !parent.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let file_name =
        path.file_name().map(|name| name.to_string_lossy().into_owned()).unwrap_or_else(|| "checkpoint".to_string());
    let mut attempts = 0;
    let (temporary, mut file) = loop {
        let temporary = temporary_name(directory, &file_name);
        match std::fs::OpenOptions::new().write(true).create_new(true).open(&temporary) {
            Ok(file) => break (temporary, file),
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists && attempts < 100 => attempts += 1,
            Err(error) => return Err(CheckpointError::new(UNWRITABLE, path, format!("cannot write: {error}"))),
        }
    };
    let result = (|| -> std::io::Result<()> {
        use std::io::Write;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        std::fs::rename(&temporary, path)?;
        sync_directory(directory)
    })();
    result.map_err(|error| {
        let _ = std::fs::remove_file(&temporary);
        CheckpointError::new(UNWRITABLE, path, format!("cannot write: {error}"))
    })?;
    remove_stale_temporaries(directory, &file_name);
    Ok(())
}

/// Removes the temporary files of `file_name` that killed writers left behind: those named after a
/// process that no longer runs (Linux, where `/proc` tells). Those of running processes stay.
fn remove_stale_temporaries(directory: &Path, file_name: &str) {
    #[cfg(target_os = "linux")]
    {
        if !Path::new("/proc/self").exists() {
            return;
        }
        let Ok(entries) = std::fs::read_dir(directory) else { return };
        let prefix = format!(".{file_name}.");
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some((pid, count)) = name
                .strip_prefix(&prefix)
                .and_then(|rest| rest.strip_suffix(".tmp"))
                .and_then(|rest| rest.split_once('.'))
            else {
                continue;
            };
            let (Ok(pid), Ok(_)) = (pid.parse::<u32>(), count.parse::<u64>()) else { continue };
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (directory, file_name);
}

/// Syncs a directory, so that a rename in it is on disk. File systems that cannot sync a
/// directory (they answer "invalid argument" or "unsupported") are left as they are.
fn sync_directory(directory: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        match std::fs::File::open(directory).and_then(|handle| handle.sync_all()) {
            Err(error)
                if matches!(error.kind(), std::io::ErrorKind::InvalidInput | std::io::ErrorKind::Unsupported) =>
            {
                Ok(())
            }
            other => other,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = directory;
        Ok(())
    }
}

impl<T: Real> Checkpoint<T> {
    pub fn save(&self, path: &Path) -> Result<(), CheckpointError> {
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
        let bytes = serialize(&tensors, &metadata).map_err(|error| CheckpointError {
            code: error.code,
            message: format!("{}: {}", path.display(), error.message),
        })?;
        write_atomically(path, &bytes)
    }

    /// Loads a checkpoint, verifying its checksums and checking it against the expected
    /// parameters `(name, shape)`.
    pub fn load(path: &Path, expected: &[(String, Vec<usize>)]) -> Result<Checkpoint<T>, CheckpointError> {
        let bytes = std::fs::read(path).map_err(|error| CheckpointError::new(UNREADABLE, path, error))?;
        Checkpoint::from_bytes(&bytes, path, expected)
    }

    /// [`Checkpoint::load`] of a file's bytes (`path` names it in errors).
    pub fn from_bytes(
        bytes: &[u8],
        path: &Path,
        expected: &[(String, Vec<usize>)],
    ) -> Result<Checkpoint<T>, CheckpointError> {
        let contents = read_bytes::<T>(bytes, path)?;
        let metadata = &contents.metadata;
        let format = metadata.get("format").map(String::as_str);
        if !contents.verified {
            return Err(if format == Some(FORMAT_WITHOUT_CHECKSUMS) {
                CheckpointError::new(
                    NO_CHECKSUMS,
                    path,
                    "written by an older curv without checksums, so its values cannot be verified; \
                     start the run again (or resume it with the curv that wrote the checkpoint)",
                )
            } else {
                CheckpointError::new(
                    DOES_NOT_FIT,
                    path,
                    format!("not a curv checkpoint (no `format={FORMAT}` metadata)"),
                )
            });
        }
        if format != Some(FORMAT) {
            return Err(CheckpointError::new(
                DOES_NOT_FIT,
                path,
                format!("not a curv checkpoint (format `{}`, expected `{FORMAT}`)", format.unwrap_or("")),
            ));
        }
        if metadata.get("precision").map(String::as_str) != Some(T::NAME) {
            return Err(CheckpointError::new(
                DOES_NOT_FIT,
                path,
                format!(
                    "written in {} precision, but this run uses {}",
                    metadata.get("precision").map_or("unknown", String::as_str),
                    T::NAME
                ),
            ));
        }
        let number = |key: &str| -> Result<u64, CheckpointError> {
            metadata.get(key).and_then(|value| value.parse().ok()).ok_or_else(|| {
                CheckpointError::new(METADATA_DAMAGED, path, format!("metadata `{key}` is missing or invalid"))
            })
        };
        let (step, seed) = (number("step")?, number("seed")?);
        let all = contents.tensors;
        let mut params = Vec::new();
        let mut states = Vec::new();
        for (name, shape) in expected {
            let key = format!("param.{name}");
            let tensor = all
                .get(&key)
                .ok_or_else(|| CheckpointError::new(DOES_NOT_FIT, path, format!("parameter `{name}` is missing")))?;
            if &tensor.shape != shape {
                return Err(CheckpointError::new(
                    DOES_NOT_FIT,
                    path,
                    format!("parameter `{name}` has shape {:?}, expected {shape:?}", tensor.shape),
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

/// Every tensor of a safetensors file, converted to `T` (f32 and f64 files are accepted). This
/// does not verify checksums; [`read_file`] and [`read_bytes`] do.
pub fn read_all<T: Real>(
    tensors: &safetensors::SafeTensors,
    path: &Path,
) -> Result<HashMap<String, Tensor<T>>, CheckpointError> {
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
            other => {
                return Err(CheckpointError::new(
                    DOES_NOT_FIT,
                    path,
                    format!("tensor `{name}` has unsupported dtype {other:?}"),
                ))
            }
        };
        out.insert(name.clone(), Tensor::new(view.shape().to_vec(), data));
    }
    Ok(out)
}

pub use safetensors::SafeTensors;

/// The contents of a safetensors file: its tensors (converted to `T`), its `key=value` metadata,
/// and whether it carried checksums, all of which matched.
#[derive(Debug, Clone, PartialEq)]
pub struct FileContents<T> {
    pub tensors: HashMap<String, Tensor<T>>,
    pub metadata: HashMap<String, String>,
    /// The file carries curv's checksums and they all match. A file without them (written by
    /// another program, or by curv before checksums) is read but not verified.
    pub verified: bool,
}

/// Reads a safetensors file: its tensors (converted to `T`) and its `key=value` metadata. The
/// checksums curv stores are verified where present; a file without them has `verified: false`.
pub fn read_file<T: Real>(path: &Path) -> Result<FileContents<T>, CheckpointError> {
    let bytes = std::fs::read(path).map_err(|error| CheckpointError::new(UNREADABLE, path, error))?;
    read_bytes(&bytes, path)
}

/// [`read_file`] of a file's bytes (`path` names it in errors).
pub fn read_bytes<T: Real>(bytes: &[u8], path: &Path) -> Result<FileContents<T>, CheckpointError> {
    let tensors = safetensors::SafeTensors::deserialize(bytes).map_err(|error| {
        CheckpointError::new(UNREADABLE, path, format!("not a safetensors file, truncated or damaged ({error})"))
    })?;
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).map_err(|error| {
        CheckpointError::new(UNREADABLE, path, format!("not a safetensors file, truncated or damaged ({error})"))
    })?;
    let joined = header.metadata().as_ref().and_then(|entries| entries.get(METADATA_KEY));
    let metadata = match joined {
        Some(joined) => parse_metadata(joined, path)?,
        None => HashMap::new(),
    };
    let verified = match (joined, metadata.get(TENSOR_CHECKSUMS), metadata.contains_key(METADATA_CHECKSUM)) {
        (Some(joined), Some(list), true) => {
            verify(joined, list, &tensors, path)?;
            true
        }
        (_, None, false) => false,
        _ => {
            return Err(CheckpointError::new(
                METADATA_DAMAGED,
                path,
                format!("the metadata is damaged: it has only one of `{TENSOR_CHECKSUMS}` and `{METADATA_CHECKSUM}`"),
            ))
        }
    };
    Ok(FileContents { tensors: read_all(&tensors, path)?, metadata, verified })
}

/// The `key=value` fields curv stores under [`METADATA_KEY`] in a safetensors header.
fn parse_metadata(joined: &str, path: &Path) -> Result<HashMap<String, String>, CheckpointError> {
    let mut fields = HashMap::new();
    for pair in joined.split(';') {
        let damaged =
            |what: String| CheckpointError::new(METADATA_DAMAGED, path, format!("the metadata is damaged: {what}"));
        let (key, value) = pair.split_once('=').ok_or_else(|| damaged(format!("`{pair}` is not KEY=VALUE")))?;
        if fields.insert(key.to_string(), value.to_string()).is_some() {
            return Err(damaged(format!("`{key}` appears twice")));
        }
    }
    Ok(fields)
}

/// Checks the metadata's checksum, then every tensor's.
fn verify(joined: &str, list: &str, tensors: &SafeTensors, path: &Path) -> Result<(), CheckpointError> {
    let damaged =
        |what: String| CheckpointError::new(METADATA_DAMAGED, path, format!("the metadata is damaged: {what}"));
    let marker = format!(";{METADATA_CHECKSUM}=");
    let (covered, stored) =
        joined.rsplit_once(&marker).ok_or_else(|| damaged(format!("`{METADATA_CHECKSUM}` is not its last field")))?;
    let stored = parse_checksum(stored).ok_or_else(|| damaged(format!("`{METADATA_CHECKSUM}={stored}` is invalid")))?;
    let computed = crc32fast::hash(covered.as_bytes());
    if stored != computed {
        return Err(damaged(format!("its checksum is {computed:08x}, but {stored:08x} is stored")));
    }
    let mut expected: HashMap<&str, u32> = HashMap::new();
    if !list.is_empty() {
        for entry in list.split(',') {
            let checksum = entry
                .rsplit_once(':')
                .and_then(|(name, hex)| Some((name, parse_checksum(hex)?)))
                .ok_or_else(|| damaged(format!("`{entry}` in `{TENSOR_CHECKSUMS}` is not NAME:CRC32")))?;
            if expected.insert(checksum.0, checksum.1).is_some() {
                return Err(damaged(format!("tensor `{}` has two checksums", checksum.0)));
            }
        }
    }
    let mut views = tensors.tensors();
    views.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, view) in &views {
        let stored = expected.remove(name.as_str()).ok_or_else(|| {
            CheckpointError::new(
                TENSOR_DAMAGED,
                path,
                format!("tensor `{name}` has no checksum: its name in the header is damaged, or it was added"),
            )
        })?;
        let computed = tensor_checksum(name, view.dtype(), view.shape(), view.data());
        if stored != computed {
            return Err(CheckpointError::new(
                TENSOR_DAMAGED,
                path,
                format!(
                    "tensor `{name}` is damaged: its checksum is {computed:08x}, but {stored:08x} is stored \
                     (its bytes, dtype or shape changed since it was written)"
                ),
            ));
        }
    }
    let mut missing: Vec<&str> = expected.into_keys().collect();
    missing.sort_unstable();
    if let Some(name) = missing.first() {
        return Err(CheckpointError::new(
            TENSOR_DAMAGED,
            path,
            format!("tensor `{name}` is missing: its name in the header is damaged, or it was removed"),
        ));
    }
    Ok(())
}

/// Eight lowercase hexadecimal digits.
fn parse_checksum(hex: &str) -> Option<u32> {
    (hex.len() == 8 && hex.bytes().all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte)))
        .then(|| u32::from_str_radix(hex, 16).ok())
        .flatten()
}

#[cfg(test)]
mod tests;
