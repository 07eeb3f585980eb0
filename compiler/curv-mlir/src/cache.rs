//! The artifact cache: compiled kernels kept on disk as shared objects, keyed by a SHA-256 of the
//! kernel's MLIR, the compiler version, the target and the optimisation level, so a second run of
//! an unchanged program loads machine code instead of compiling again.
//!
//! The cache lives in `$CURV_CACHE_DIR`, else `$XDG_CACHE_HOME/curv`, else `~/.cache/curv`;
//! `CURV_CACHE=off` disables it. Entries are written to a temporary name and renamed, so a
//! reader never sees half a file; a failure to build or load an entry falls back to the JIT.

use crate::jit::compile_to_object;
use crate::MlirError;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// C source that forwards the kernel's calls of runtime functions (the GEMM, the decompositions)
/// to the host's, whose addresses the loader sets: a shared object cannot link against the `curv`
/// executable's symbols. One pointer `NAME_pointer` and one function `_mlir_ciface_NAME` each.
fn trampoline_source() -> String {
    let mut text = String::new();
    for function in curv_runtime::linalg::runtime_functions() {
        let name = function.name;
        let parameters: Vec<String> = (0..function.arity).map(|index| format!("void *a{index}")).collect();
        let arguments: Vec<String> = (0..function.arity).map(|index| format!("a{index}")).collect();
        let types = vec!["void *"; function.arity].join(", ");
        text.push_str(&format!(
            "void (*{name}_pointer)({types});\nvoid _mlir_ciface_{name}({}) {{ {name}_pointer({}); }}\n",
            parameters.join(", "),
            arguments.join(", ")
        ));
    }
    text
}

/// The name every cached kernel's function has (each lives in its own shared object).
pub const KERNEL_NAME: &str = "kernel";

pub struct KernelCache {
    directory: PathBuf,
}

/// A kernel loaded from the cache.
pub struct CachedKernel {
    entry: unsafe extern "C" fn(*mut *mut ()),
    // Kept open for as long as the entry point is used.
    _library: libloading::Library,
}

impl CachedKernel {
    /// Calls the kernel with packed arguments (see `curv_runtime::compiled`): the kernel's C
    /// interface takes their table (`lower::EntryAbi::Table`).
    pub fn call_packed(&self, slots: &mut [*mut ()]) {
        unsafe { (self.entry)(slots.as_mut_ptr()) }
    }
}

impl KernelCache {
    /// The cache the environment asks for, or `None` when it is disabled or has no place.
    pub fn from_environment() -> Option<KernelCache> {
        if std::env::var("CURV_CACHE").is_ok_and(|value| value == "off" || value == "0") {
            return None;
        }
        let directory = std::env::var_os("CURV_CACHE_DIR")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|base| PathBuf::from(base).join("curv")))
            .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache/curv")))?;
        std::fs::create_dir_all(&directory).ok()?;
        Some(KernelCache { directory })
    }

    pub fn in_directory(directory: &Path) -> KernelCache {
        KernelCache { directory: directory.to_path_buf() }
    }

    /// The key of a kernel: what determines its machine code.
    pub fn key(text: &str, optimization_level: usize) -> String {
        let mut hasher = Sha256::new();
        hasher.update(env!("CARGO_PKG_VERSION"));
        hasher.update([0]);
        hasher.update(std::env::consts::ARCH);
        hasher.update(std::env::consts::OS);
        hasher.update(optimization_level.to_le_bytes());
        hasher.update(crate::jit::CPU_SCHEDULE_PIPELINE);
        hasher.update(crate::jit::CPU_LOWERING_PIPELINE);
        hasher.update(trampoline_source());
        hasher.update(text);
        hasher.finalize().iter().map(|byte| format!("{byte:02x}")).collect()
    }

    /// Loads the kernel of MLIR `text` (whose function is [`KERNEL_NAME`]), building and storing
    /// it first if the cache does not have it. Returns the kernel and whether it was a hit.
    pub fn load_or_build(&self, text: &str, optimization_level: usize) -> Result<(CachedKernel, bool), MlirError> {
        let key = Self::key(text, optimization_level);
        let library_path = self.directory.join(format!("{key}.so"));
        let hit = library_path.is_file();
        if !hit {
            self.build(text, &key, &library_path, optimization_level)?;
        }
        Ok((load(&library_path)?, hit))
    }

    fn build(&self, text: &str, key: &str, library_path: &Path, optimization_level: usize) -> Result<(), MlirError> {
        // Unique per build: other processes, and other threads of this one (tests compile the
        // same kernel at the same time), may be building the same key.
        static BUILDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let build = BUILDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let unique = format!("{key}.{}.{build}", std::process::id());
        let object = self.directory.join(format!(".{unique}.o"));
        let trampoline = self.directory.join(format!(".{unique}.c"));
        let temporary = self.directory.join(format!(".{unique}.so"));
        let result = (|| {
            compile_to_object(text, KERNEL_NAME, &object, optimization_level)?;
            std::fs::write(&trampoline, trampoline_source())
                .map_err(|error| MlirError { message: format!("cannot write {}: {error}", trampoline.display()) })?;
            let status = std::process::Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".to_string()))
                .args(["-shared", "-fPIC", "-o"])
                .arg(&temporary)
                .arg(&object)
                .arg(&trampoline)
                .status()
                .map_err(|error| MlirError { message: format!("cannot run the C compiler: {error}") })?;
            if !status.success() {
                return Err(MlirError { message: "linking a cached kernel failed".to_string() });
            }
            std::fs::rename(&temporary, library_path)
                .map_err(|error| MlirError { message: format!("cannot write {}: {error}", library_path.display()) })
        })();
        let _ = std::fs::remove_file(&object);
        let _ = std::fs::remove_file(&trampoline);
        let _ = std::fs::remove_file(&temporary);
        result
    }
}

fn load(path: &Path) -> Result<CachedKernel, MlirError> {
    let failure = |error: libloading::Error| MlirError { message: format!("cannot load {}: {error}", path.display()) };
    unsafe {
        let library = libloading::Library::new(path).map_err(failure)?;
        for function in curv_runtime::linalg::runtime_functions() {
            let pointer: libloading::Symbol<*mut usize> =
                library.get(format!("{}_pointer\0", function.name).as_bytes()).map_err(failure)?;
            **pointer = function.address as usize;
        }
        let entry: libloading::Symbol<unsafe extern "C" fn(*mut *mut ())> =
            library.get(format!("_mlir_ciface_{KERNEL_NAME}\0").as_bytes()).map_err(failure)?;
        let entry = *entry;
        Ok(CachedKernel { entry, _library: library })
    }
}
