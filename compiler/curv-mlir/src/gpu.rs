//! The first stage of the GPU path: the same kernel modules the CPU backend compiles, lowered
//! through MLIR's `gpu` and `nvvm` dialects to PTX (`curv emit --stage ptx`).
//!
//! The pipeline bufferises the module as the CPU pipeline does, turns each `linalg` op into
//! parallel loops (reductions stay sequential inside a thread), tiles the two outer parallel
//! dimensions by 32 and 8 with constant inner bounds (a guard inside instead of `min` bounds, so
//! that every loop nest becomes a launch) and maps the tiles to blocks and their iterations to
//! threads, outlines every launch into a `gpu.func` kernel, and runs `gpu-lower-to-nvvm-pipeline` with `cubin-format=isa`,
//! which gives PTX text without a CUDA toolkit. The chip and PTX version come from [`GpuTarget`],
//! never from a user's string (an `sm_90` target without `+ptx80` aborts LLVM). Matrix products
//! stay calls on the host side of the module (on a GPU they will be cuBLAS calls). `powf`,
//! `sqrtf` and the other math functions that have no PTX instruction are calls of libdevice
//! (`__nv_*`), declared `.extern` in the PTX: the runtime that loads and launches this PTX (not
//! written yet) must link libdevice, or the lowering must write them out as it does `exp` and
//! `tanh`.

use crate::MlirError;

/// The NVIDIA targets curv generates PTX for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GpuTarget {
    /// Ampere (A100): `sm_80`, PTX ISA 7.0.
    Sm80,
    /// Hopper (H100, H200): `sm_90`, PTX ISA 8.0.
    Sm90,
}

impl GpuTarget {
    /// The target named `sm_80` or `sm_90`.
    pub fn parse(name: &str) -> Option<GpuTarget> {
        match name {
            "sm_80" => Some(GpuTarget::Sm80),
            "sm_90" => Some(GpuTarget::Sm90),
            _ => None,
        }
    }

    pub fn chip(self) -> &'static str {
        match self {
            GpuTarget::Sm80 => "sm_80",
            GpuTarget::Sm90 => "sm_90",
        }
    }

    /// The PTX feature the chip needs (checked against the table, never user text).
    pub fn features(self) -> &'static str {
        match self {
            GpuTarget::Sm80 => "+ptx70",
            GpuTarget::Sm90 => "+ptx80",
        }
    }
}

/// The pass pipeline from a kernel module to one with PTX in `gpu.binary` ops.
pub fn gpu_pipeline(target: GpuTarget) -> String {
    format!(
        "builtin.module(\
canonicalize,\
func.func(linalg-fuse-elementwise-ops),\
canonicalize,\
eliminate-empty-tensors,\
one-shot-bufferize{{bufferize-function-boundaries=false}},\
func.func(convert-linalg-to-parallel-loops,scf-parallel-loop-tiling{{parallel-loop-tile-sizes=32,8 no-min-max-bounds=true}},gpu-map-parallel-loops,convert-parallel-loops-to-gpu),\
gpu-kernel-outlining,\
canonicalize,\
gpu-lower-to-nvvm-pipeline{{cubin-format=isa cubin-chip={} cubin-features={}}})",
        target.chip(),
        target.features()
    )
}

unsafe extern "C" {
    fn LLVMInitializeNVPTXTargetInfo();
    fn LLVMInitializeNVPTXTarget();
    fn LLVMInitializeNVPTXTargetMC();
    fn LLVMInitializeNVPTXAsmPrinter();
}

/// Registers LLVM's NVPTX back end (once per process), which `gpu-module-to-binary` needs.
fn initialise_nvptx() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| unsafe {
        LLVMInitializeNVPTXTargetInfo();
        LLVMInitializeNVPTXTarget();
        LLVMInitializeNVPTXTargetMC();
        LLVMInitializeNVPTXAsmPrinter();
    });
}

/// One generated GPU kernel module: its name and its PTX.
#[derive(Debug, Clone, PartialEq)]
pub struct PtxModule {
    pub name: String,
    pub ptx: String,
}

/// Lowers a kernel module (the text `crate::lower` produces) to PTX for `target`: one entry
/// per outlined kernel module, in the order of the module.
pub fn lower_to_ptx(text: &str, target: GpuTarget) -> Result<Vec<PtxModule>, MlirError> {
    initialise_nvptx();
    let lowered = crate::run_pipeline_on_text(text, &gpu_pipeline(target))?;
    let modules = extract_ptx(&lowered);
    if modules.is_empty() && lowered.contains("gpu.launch_func") {
        return Err(MlirError { message: "the GPU pipeline produced launches but no PTX".to_string() });
    }
    Ok(modules)
}

/// The `assembly` strings of the `gpu.binary` ops of a printed module, unescaped.
pub fn extract_ptx(module: &str) -> Vec<PtxModule> {
    let mut out = Vec::new();
    let mut rest = module;
    while let Some(start) = rest.find("gpu.binary @") {
        let after = &rest[start + "gpu.binary @".len()..];
        let name: String = after.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
        let Some(assembly) = after.find("assembly = \"") else { break };
        let body = &after[assembly + "assembly = \"".len()..];
        let (ptx, consumed) = unescape_mlir_string(body);
        out.push(PtxModule { name, ptx });
        rest = &body[consumed..];
    }
    out
}

/// Reads an MLIR string literal's body up to its closing quote: `\XX` hex escapes, `\"`, `\\`.
/// Returns the text and the number of bytes consumed (including the quote).
fn unescape_mlir_string(body: &str) -> (String, usize) {
    let bytes = body.as_bytes();
    let mut out = Vec::new();
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'"' => return (String::from_utf8_lossy(&out).into_owned(), index + 1),
            b'\\' if index + 1 < bytes.len() => {
                let next = bytes[index + 1];
                if (next == b'"' || next == b'\\') || index + 2 >= bytes.len() {
                    out.push(next);
                    index += 2;
                } else {
                    let hex = std::str::from_utf8(&bytes[index + 1..index + 3]).unwrap_or("");
                    match u8::from_str_radix(hex, 16) {
                        Ok(byte) => {
                            out.push(byte);
                            index += 3;
                        }
                        Err(_) => {
                            out.push(next);
                            index += 2;
                        }
                    }
                }
            }
            byte => {
                out.push(byte);
                index += 1;
            }
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), bytes.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mlir_string_escapes_are_undone() {
        let (text, consumed) = unescape_mlir_string(r#"a\0Ab\09\22c\\d" tail"#);
        assert_eq!(text, "a\nb\t\"c\\d");
        assert_eq!(&r#"a\0Ab\09\22c\\d" tail"#[consumed..], " tail");
    }

    #[test]
    fn targets_come_from_the_table() {
        assert_eq!(GpuTarget::parse("sm_90").map(GpuTarget::features), Some("+ptx80"));
        assert_eq!(GpuTarget::parse("sm_80").map(GpuTarget::features), Some("+ptx70"));
        assert_eq!(GpuTarget::parse("sm_90 +ptx70"), None);
    }
}
