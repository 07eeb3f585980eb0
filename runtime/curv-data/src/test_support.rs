//! Helpers shared by this crate's unit tests.

use std::path::{Path, PathBuf};

/// A scratch directory for one test, removed with its contents when the test finishes.
pub(crate) struct ScratchDirectory {
    path: PathBuf,
}

impl std::ops::Deref for ScratchDirectory {
    type Target = Path;

    fn deref(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDirectory {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Returns a fresh, empty scratch directory that is unique to this test process and test name.
pub(crate) fn scratch_directory(test_name: &str) -> ScratchDirectory {
    let path = std::env::temp_dir().join(format!("curv-data-tests-{}-{test_name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&path);
    std::fs::create_dir_all(&path).expect("the scratch directory can be created");
    ScratchDirectory { path }
}

/// Writes `contents` to `file_name` inside `directory` and returns the file's path.
pub(crate) fn write_file(directory: &Path, file_name: &str, contents: &[u8]) -> PathBuf {
    let path = directory.join(file_name);
    std::fs::write(&path, contents).expect("the test file can be written");
    path
}
