//! Helpers shared by the CLI test files that run the built `curv`: the repository, the binary,
//! and scratch directories. Each test file uses part of them.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn repository_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

/// Runs `curv` in the repository root with a kernel cache of the tests' own.
pub fn curv(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_curv"))
        .args(args)
        .current_dir(repository_root())
        .env("CURV_CACHE_DIR", std::env::temp_dir().join("curv-test-kernel-cache"))
        .output()
        .unwrap()
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A scratch directory for one test, removed when the test passes (kept after a failure, to look at).
pub struct Scratch(PathBuf);

impl std::ops::Deref for Scratch {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A fresh scratch directory named after the test file (`group`) and the test.
pub fn scratch(group: &str, name: &str) -> Scratch {
    let directory = std::env::temp_dir().join(format!("curv-{group}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&directory);
    std::fs::create_dir_all(&directory).unwrap();
    Scratch(directory)
}
