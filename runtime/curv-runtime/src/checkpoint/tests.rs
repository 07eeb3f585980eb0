//! Damaged checkpoints: every flipped byte, every truncation, older files and concurrent writers.

use super::*;
use std::path::PathBuf;

fn sample<T: Real>() -> Checkpoint<T> {
    let tensor = |shape: Vec<usize>, offset: f64| {
        let count = shape.iter().product::<usize>();
        Tensor::new(shape, (0..count).map(|index| T::from_f64(offset + 0.25 * index as f64 - 1.0)).collect())
    };
    Checkpoint {
        step: 7,
        seed: 3,
        train: "fit".to_string(),
        params: vec![("w".to_string(), tensor(vec![2, 3], 0.5)), ("b".to_string(), tensor(vec![3], -2.0))],
        states: vec![vec![("m".to_string(), tensor(vec![2, 3], 1.5))], vec![]],
    }
}

fn expected() -> Vec<(String, Vec<usize>)> {
    vec![("w".to_string(), vec![2, 3]), ("b".to_string(), vec![3])]
}

/// The bytes `Checkpoint::save` writes for `checkpoint`.
fn checkpoint_bytes<T: Real>(checkpoint: &Checkpoint<T>) -> Vec<u8> {
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let directory = std::env::temp_dir().join(format!("curv-checkpoint-unit-{}-{call}", std::process::id()));
    std::fs::create_dir_all(&directory).unwrap();
    let path = directory.join("checkpoint.safetensors");
    checkpoint.save(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::remove_dir_all(&directory).unwrap();
    bytes
}

fn path() -> PathBuf {
    PathBuf::from("/some/run/checkpoint.safetensors")
}

/// The tensor whose data holds byte `position` of the file, if any.
fn tensor_at(bytes: &[u8], position: usize) -> Option<String> {
    let (header, metadata) = SafeTensors::read_metadata(bytes).unwrap();
    let offset = position.checked_sub(8 + header)?;
    metadata
        .tensors()
        .into_iter()
        .find(|(_, info)| info.data_offsets.0 <= offset && offset < info.data_offsets.1)
        .map(|(name, _)| name)
}

#[test]
fn a_checkpoint_round_trips_and_identical_contents_give_identical_bytes() {
    let checkpoint = sample::<f64>();
    let bytes = checkpoint_bytes(&checkpoint);
    assert_eq!(bytes, checkpoint_bytes(&checkpoint));
    assert_eq!(Checkpoint::<f64>::from_bytes(&bytes, &path(), &expected()).unwrap(), checkpoint);
    let contents = read_bytes::<f64>(&bytes, &path()).unwrap();
    assert!(contents.verified);
    assert!(contents.metadata[TENSOR_CHECKSUMS].contains("param.w:"), "{:?}", contents.metadata);
    let single = Checkpoint::<f32>::from_bytes(&checkpoint_bytes(&sample::<f32>()), &path(), &expected()).unwrap();
    assert_eq!(single, sample::<f32>());
}

/// Flips every byte of a checkpoint in several ways: a flip inside a tensor's data is an error
/// that names that tensor; anywhere else the result is an error or the identical checkpoint
/// (a flipped JSON space can become another blank), never different values.
fn every_flip_is_an_error_or_harmless<T: Real>() {
    let original = sample::<T>();
    let bytes = checkpoint_bytes(&original);
    let (mut errors, mut harmless) = (0, 0);
    for position in 0..bytes.len() {
        for mask in [0x01u8, 0x02, 0x10, 0x20, 0x80, 0xff] {
            let mut damaged = bytes.clone();
            damaged[position] ^= mask;
            match Checkpoint::<T>::from_bytes(&damaged, &path(), &expected()) {
                Err(error) => {
                    errors += 1;
                    let text = error.to_string();
                    assert!(text.contains("/some/run/checkpoint.safetensors"), "{text}");
                    assert!(CODES.iter().any(|(code, _)| *code == error.code), "{text}");
                    if let Some(name) = tensor_at(&bytes, position) {
                        assert_eq!(error.code, TENSOR_DAMAGED, "{text}");
                        assert!(text.contains(&format!("tensor `{name}` is damaged")), "{text}");
                    }
                }
                Ok(loaded) => {
                    harmless += 1;
                    assert!(tensor_at(&bytes, position).is_none(), "a flip at {position} in the data loaded");
                    assert_eq!(loaded, original, "a flip at {position} (mask {mask:#x}) loaded different values");
                }
            }
        }
    }
    assert!(errors > 5 * bytes.len(), "{errors} errors, {harmless} harmless flips of {} bytes", bytes.len());
}

#[test]
fn every_flipped_byte_of_an_f64_checkpoint_is_an_error_or_harmless() {
    every_flip_is_an_error_or_harmless::<f64>();
}

#[test]
fn every_flipped_byte_of_an_f32_checkpoint_is_an_error_or_harmless() {
    every_flip_is_an_error_or_harmless::<f32>();
}

#[test]
fn every_truncation_and_any_appended_byte_is_an_error() {
    let bytes = checkpoint_bytes(&sample::<f64>());
    for length in 0..bytes.len() {
        let error = Checkpoint::<f64>::from_bytes(&bytes[..length], &path(), &expected()).unwrap_err();
        assert_eq!(error.code, UNREADABLE, "truncated to {length}: {error}");
        assert!(error.to_string().contains("/some/run/checkpoint.safetensors"), "{error}");
        let error = read_bytes::<f64>(&bytes[..length], &path()).unwrap_err();
        assert_eq!(error.code, UNREADABLE, "truncated to {length}: {error}");
    }
    let mut longer = bytes.clone();
    longer.push(0);
    assert_eq!(Checkpoint::<f64>::from_bytes(&longer, &path(), &expected()).unwrap_err().code, UNREADABLE);
}

/// Other files curv writes (`final.safetensors`, the C ABI's state files) carry the checksums
/// too: flipping any byte of one is an error or reads the identical tensors.
#[test]
fn every_flipped_byte_of_a_final_parameters_file_is_an_error_or_harmless() {
    let checkpoint = sample::<f64>();
    let named: Vec<(String, &Tensor<f64>)> =
        checkpoint.params.iter().map(|(name, tensor)| (name.clone(), tensor)).collect();
    let bytes = serialize(&named, &[("train", "fit".to_string()), ("step", "7".to_string())]).unwrap();
    let original = read_bytes::<f64>(&bytes, &path()).unwrap();
    assert!(original.verified);
    for position in 0..bytes.len() {
        for mask in [0x01u8, 0x40, 0xff] {
            let mut damaged = bytes.clone();
            damaged[position] ^= mask;
            match read_bytes::<f64>(&damaged, &path()) {
                Err(error) => {
                    if let Some(name) = tensor_at(&bytes, position) {
                        assert!(error.to_string().contains(&format!("tensor `{name}`")), "{error}");
                    }
                }
                Ok(contents) => {
                    assert!(tensor_at(&bytes, position).is_none(), "a flip at {position} in the data was read");
                    assert_eq!(contents.tensors, original.tensors, "a flip at {position} read different values");
                    // A flip in the key `curv` hides curv's metadata: the file reads as one of
                    // another program, unverified (the run warns, the C ABI refuses it).
                    if contents.verified {
                        assert_eq!(contents.metadata, original.metadata, "a flip at {position} read other metadata");
                    } else {
                        assert!(contents.metadata.is_empty(), "a flip at {position}: {:?}", contents.metadata);
                    }
                }
            }
        }
    }
}

/// A metadata value changed into another valid value (the step) is caught by the metadata's
/// checksum, and a renamed tensor by the tensor checksums.
#[test]
fn edited_metadata_and_renamed_tensors_are_errors() {
    let bytes = checkpoint_bytes(&sample::<f64>());
    let replace = |from: &str, to: &str| {
        let text = ascii_text(&bytes);
        assert!(text.contains(from), "{from} not in {text}");
        let mut out = bytes.clone();
        let at = text.find(from).unwrap();
        out[at..at + from.len()].copy_from_slice(to.as_bytes());
        out
    };
    let error = Checkpoint::<f64>::from_bytes(&replace("step=7", "step=8"), &path(), &expected()).unwrap_err();
    assert_eq!(error.code, METADATA_DAMAGED, "{error}");
    let error =
        Checkpoint::<f64>::from_bytes(&replace("\"param.b\"", "\"param.c\""), &path(), &expected()).unwrap_err();
    assert_eq!(error.code, TENSOR_DAMAGED, "{error}");
    assert!(error.to_string().contains("tensor `param.c` has no checksum"), "{error}");
}

/// The file as text, one character per byte (`?` for bytes that are not ASCII).
fn ascii_text(bytes: &[u8]) -> String {
    bytes.iter().map(|&byte| if byte.is_ascii() { byte as char } else { '?' }).collect()
}

#[test]
fn a_checkpoint_without_checksums_is_refused_and_other_files_are_read_unverified() {
    let bytes = |fields: &str| {
        let views: Vec<(String, TensorView)> = Vec::new();
        let header = HashMap::from([(METADATA_KEY.to_string(), fields.to_string())]);
        safetensors::serialize(views, Some(header)).unwrap()
    };
    let old = bytes("format=curv-checkpoint-1;step=7;seed=3;train=fit;precision=f64");
    let error = Checkpoint::<f64>::from_bytes(&old, &path(), &expected()).unwrap_err();
    assert_eq!(error.code, NO_CHECKSUMS, "{error}");
    assert!(error.to_string().contains("older curv without checksums"), "{error}");
    let contents = read_bytes::<f64>(&old, &path()).unwrap();
    assert!(!contents.verified);
    let foreign = safetensors::serialize(Vec::<(String, TensorView)>::new(), None).unwrap();
    assert!(!read_bytes::<f64>(&foreign, &path()).unwrap().verified);
    assert_eq!(Checkpoint::<f64>::from_bytes(&foreign, &path(), &expected()).unwrap_err().code, DOES_NOT_FIT);
    let half = bytes("format=curv-checkpoint-2;tensor_crc32=");
    assert_eq!(read_bytes::<f64>(&half, &path()).unwrap_err().code, METADATA_DAMAGED);
}

#[test]
fn a_checkpoint_of_another_precision_or_shape_does_not_fit() {
    let bytes = checkpoint_bytes(&sample::<f64>());
    let error = Checkpoint::<f32>::from_bytes(&bytes, &path(), &expected()).unwrap_err();
    assert_eq!(error.code, DOES_NOT_FIT, "{error}");
    let other = vec![("w".to_string(), vec![3, 2])];
    let error = Checkpoint::<f64>::from_bytes(&bytes, &path(), &other).unwrap_err();
    assert_eq!(error.code, DOES_NOT_FIT, "{error}");
    assert!(error.to_string().starts_with("[E0604] /some/run/checkpoint.safetensors: parameter `w`"), "{error}");
}

#[test]
fn names_that_would_break_the_metadata_cannot_be_written() {
    let tensor = Tensor::new(vec![1], vec![1.0f64]);
    let error = serialize(&[("a:b".to_string(), &tensor)], &[]).unwrap_err();
    assert_eq!(error.code, UNWRITABLE);
    let error = serialize(&[("a".to_string(), &tensor)], &[("step", "1;2".to_string())]).unwrap_err();
    assert_eq!(error.code, UNWRITABLE);
    let error = serialize(&[("a".to_string(), &tensor)], &[(METADATA_CHECKSUM, "0".to_string())]).unwrap_err();
    assert_eq!(error.code, UNWRITABLE);
}

/// Writers in several threads replace the same file: every write lands whole (the file always
/// holds one writer's bytes) and no temporary file is left behind.
#[test]
fn concurrent_writers_never_share_a_temporary_file() {
    let directory = std::env::temp_dir().join(format!("curv-checkpoint-writers-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&directory);
    std::fs::create_dir_all(&directory).unwrap();
    let path = directory.join("state.safetensors");
    let contents: Vec<Vec<u8>> = (0..4u8).map(|writer| vec![writer; 4096 * (writer as usize + 1)]).collect();
    let contents = &contents;
    std::thread::scope(|scope| {
        for bytes in contents {
            let path = path.clone();
            scope.spawn(move || {
                for _ in 0..25 {
                    write_atomically(&path, bytes).unwrap();
                    let read = std::fs::read(&path).unwrap();
                    assert!(contents.contains(&read), "a torn file of {} bytes", read.len());
                }
            });
        }
    });
    let names: Vec<String> = std::fs::read_dir(&directory)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["state.safetensors".to_string()]);
    std::fs::remove_dir_all(&directory).unwrap();
}

#[test]
fn a_file_that_cannot_be_written_or_read_is_an_error_with_its_code() {
    let missing = Path::new("/nonexistent-curv-directory/checkpoint.safetensors");
    let error = write_atomically(missing, b"x").unwrap_err();
    assert_eq!(error.code, UNWRITABLE);
    assert!(error.to_string().contains("/nonexistent-curv-directory/checkpoint.safetensors"), "{error}");
    assert_eq!(Checkpoint::<f64>::load(missing, &expected()).unwrap_err().code, UNREADABLE);
    assert_eq!(read_file::<f64>(missing).unwrap_err().code, UNREADABLE);
}

/// A write removes the temporary files killed writers of the same file left behind (named after
/// a process that no longer runs), and keeps those of running processes and other files.
#[cfg(target_os = "linux")]
#[test]
fn a_write_removes_the_temporary_files_of_killed_writers() {
    let directory = std::env::temp_dir().join(format!("curv-checkpoint-stale-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&directory);
    std::fs::create_dir_all(&directory).unwrap();
    // Linux process ids are below 4194304 (2^22), so no process has 4194305.
    let stale = directory.join(".checkpoint.safetensors.4194305.3.tmp");
    let running = directory.join(format!(".checkpoint.safetensors.{}.999999.tmp", std::process::id()));
    let other = directory.join(".final.safetensors.4194305.0.tmp");
    for file in [&stale, &running, &other] {
        std::fs::write(file, b"partial").unwrap();
    }
    write_atomically(&directory.join("checkpoint.safetensors"), b"whole").unwrap();
    assert!(!stale.exists());
    assert!(running.exists() && other.exists());
    assert_eq!(std::fs::read(directory.join("checkpoint.safetensors")).unwrap(), b"whole");
    std::fs::remove_dir_all(&directory).unwrap();
}

/// Every checkpoint code has its row in docs/errors.md (section "Checkpoints").
#[test]
fn every_checkpoint_code_is_documented() {
    let errors = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/errors.md")).unwrap();
    let section = &errors[errors.find("## Checkpoints").expect("no Checkpoints section")..];
    for (code, summary) in CODES {
        assert!(section.contains(&format!("| {code} | **{summary}**")), "{code} ({summary}) is not documented");
    }
}
