//! The error type shared by every reader in this crate, plus the small file-access helpers that turn
//! operating-system failures into those errors.

use std::borrow::Cow;
use std::fmt;
use std::fs::File;
use std::io::{self, Cursor, Read, Seek};
use std::path::{Path, PathBuf};

/// The broad category of a data-reading failure, so that callers can react without parsing messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataErrorKind {
    /// The file does not exist.
    NotFound,
    /// The file exists but could not be read: it is a directory, permissions forbid it, or I/O failed.
    Unreadable,
    /// An output file could not be written: its directory is missing, permissions forbid it, or I/O failed.
    Unwritable,
    /// The file's contents are malformed, truncated or internally inconsistent.
    Corrupt,
    /// The file may be fine, but the caller's options (such as a label column name) do not fit it, or it
    /// uses a feature of its format that this crate deliberately does not support.
    BadOption,
}

/// A failure to read or interpret a data file; it always names the file it is about.
#[derive(Debug, Clone, PartialEq)]
pub struct DataError {
    /// The file that could not be read or interpreted.
    pub path: PathBuf,
    /// A human-readable explanation, without the path, written as a sentence fragment.
    pub message: String,
    /// The category of the failure.
    pub kind: DataErrorKind,
}

impl DataError {
    /// Builds an error of any kind for the given file.
    pub(crate) fn new(path: &Path, kind: DataErrorKind, message: impl Into<String>) -> Self {
        DataError { path: path.to_path_buf(), message: message.into(), kind }
    }

    /// Builds an error saying that the file's contents are malformed.
    pub(crate) fn corrupt(path: &Path, message: impl Into<String>) -> Self {
        DataError::new(path, DataErrorKind::Corrupt, message)
    }

    /// Builds an error saying that the caller's options or the file's chosen format features are unsupported.
    pub(crate) fn bad_option(path: &Path, message: impl Into<String>) -> Self {
        DataError::new(path, DataErrorKind::BadOption, message)
    }

    /// Converts an I/O failure into an error: a missing file becomes `NotFound`, an unexpected end of file
    /// becomes `Corrupt` (the file is shorter than its own contents promise), and anything else becomes
    /// `Unreadable`.
    pub(crate) fn from_io(path: &Path, error: &io::Error) -> Self {
        match error.kind() {
            io::ErrorKind::NotFound => DataError::new(path, DataErrorKind::NotFound, "file not found"),
            io::ErrorKind::UnexpectedEof => {
                DataError::corrupt(path, "the file is truncated: it ends before its contents are complete")
            }
            _ => DataError::new(path, DataErrorKind::Unreadable, format!("cannot read the file: {error}")),
        }
    }
}

impl DataError {
    /// Converts an I/O failure while writing an output file into an `Unwritable` error.
    pub(crate) fn from_write_io(path: &Path, error: &io::Error) -> Self {
        DataError::new(path, DataErrorKind::Unwritable, format!("cannot write the file: {error}"))
    }
}

impl fmt::Display for DataError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}: {}", self.path.display(), self.message)
    }
}

impl std::error::Error for DataError {}

/// Opens a regular file for reading and returns it with its length in bytes; directories and other
/// non-files are reported as `Unreadable` rather than failing later with a confusing I/O error.
pub(crate) fn open_regular_file(path: &Path) -> Result<(File, u64), DataError> {
    let metadata = std::fs::metadata(path).map_err(|error| DataError::from_io(path, &error))?;
    if metadata.is_dir() {
        return Err(DataError::new(path, DataErrorKind::Unreadable, "is a directory, but a data file was expected"));
    }
    let file = File::open(path).map_err(|error| DataError::from_io(path, &error))?;
    Ok((file, metadata.len()))
}

/// Anything a reader can read and seek in: a file, or bytes in memory.
pub(crate) trait ReadSeek: Read + Seek {}

impl<T: Read + Seek> ReadSeek for T {}

/// Where a reader takes a file's bytes from: the file itself, or bytes already in memory that stand
/// for it (for fuzzing and for callers that have the bytes); either way `path` names the file in
/// every message.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Source<'a> {
    path: &'a Path,
    bytes: Option<&'a [u8]>,
}

impl<'a> Source<'a> {
    /// The file at `path`, read from disk.
    pub(crate) fn file(path: &'a Path) -> Self {
        Source { path, bytes: None }
    }

    /// `bytes` in memory, named `path` in messages.
    pub(crate) fn bytes(path: &'a Path, bytes: &'a [u8]) -> Self {
        Source { path, bytes: Some(bytes) }
    }

    /// The name of the file, for messages.
    pub(crate) fn path(&self) -> &'a Path {
        self.path
    }

    /// Every byte of the source: the bytes in memory as they are, or the whole file read into memory
    /// (never more than the file's length).
    pub(crate) fn read_all(&self) -> Result<Cow<'a, [u8]>, DataError> {
        if let Some(bytes) = self.bytes {
            return Ok(Cow::Borrowed(bytes));
        }
        let (file, length) = open_regular_file(self.path)?;
        let mut bytes = Vec::with_capacity(usize::try_from(length).unwrap_or(0));
        file.take(length).read_to_end(&mut bytes).map_err(|error| DataError::from_io(self.path, &error))?;
        Ok(Cow::Owned(bytes))
    }

    /// Opens the source for reading from its first byte and returns it with its length in bytes.
    pub(crate) fn open(&self) -> Result<(Box<dyn ReadSeek + 'a>, u64), DataError> {
        match self.bytes {
            Some(bytes) => Ok((Box::new(Cursor::new(bytes)), bytes.len() as u64)),
            None => {
                let (file, length) = open_regular_file(self.path)?;
                Ok((Box::new(file), length))
            }
        }
    }
}

/// Reads up to `buffer.len()` bytes, stopping early only at the end of the file, and returns how many
/// bytes were read; this lets callers tell "too short" apart from real I/O failures.
pub(crate) fn read_up_to(path: &Path, reader: &mut impl Read, buffer: &mut [u8]) -> Result<usize, DataError> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..]) {
            Ok(0) => break,
            Ok(count) => filled += count,
            Err(error) if error.kind() == io::ErrorKind::Interrupted => continue,
            Err(error) => return Err(DataError::from_io(path, &error)),
        }
    }
    Ok(filled)
}

/// Recognises common container and compression formats from a file's first bytes, so that a file of the
/// wrong kind gets a specific hint instead of a generic "bad magic" complaint.
pub(crate) fn describe_foreign_format(leading_bytes: &[u8]) -> Option<&'static str> {
    if leading_bytes.starts_with(&[0x1f, 0x8b]) {
        Some("the file is gzip-compressed; decompress it first (for example with gunzip)")
    } else if leading_bytes.starts_with(b"PK\x03\x04") {
        Some("the file is a zip archive (such as a NumPy .npz); extract the arrays inside it first")
    } else if leading_bytes.starts_with(&[0x89, b'P', b'N', b'G']) {
        Some("the file is a PNG image")
    } else if leading_bytes.starts_with(&[0xff, 0xd8, 0xff]) {
        Some("the file is a JPEG image; only PNG images are supported")
    } else if leading_bytes.starts_with(b"\x93NUMPY") {
        Some("the file is a NumPy .npy array")
    } else {
        None
    }
}

/// Checks that a caller-supplied scale factor is a finite number, so that loading never fills a field
/// with infinities or NaNs that the file itself does not contain.
pub(crate) fn check_scale_is_finite(path: &Path, scale: f32) -> Result<(), DataError> {
    if scale.is_finite() {
        Ok(())
    } else {
        Err(DataError::bad_option(path, format!("the scale factor {scale} is not a finite number")))
    }
}

/// Converts a count into the `i64` used by schemas, reporting an absurdly large count as corruption
/// instead of panicking.
pub(crate) fn count_to_i64(path: &Path, count: u64, what: &str) -> Result<i64, DataError> {
    i64::try_from(count).map_err(|_| DataError::corrupt(path, format!("the {what} ({count}) is too large")))
}
