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
//! stay calls on the host side of the module (on a GPU they will be cuBLAS calls). The math
//! functions MLIR's NVVM lowering leaves to libdevice (`__nv_*`) are defined in every GPU module
//! with PTX instructions ([`DEVICE_MATH`]), so the PTX needs nothing at load time.

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

/// The first part of the GPU pipeline: a kernel module bufferised (with the deallocations of its
/// intermediate buffers), its `linalg` ops turned into
/// parallel loops, tiled, mapped to blocks and threads and outlined into `gpu.func` kernels, each
/// in its own `gpu.module`.
pub const GPU_OUTLINING_PIPELINE: &str = "builtin.module(\
canonicalize,\
func.func(linalg-fuse-elementwise-ops),\
canonicalize,\
eliminate-empty-tensors,\
one-shot-bufferize{bufferize-function-boundaries=false},\
buffer-deallocation-pipeline,\
func.func(convert-linalg-to-parallel-loops,scf-parallel-loop-tiling{parallel-loop-tile-sizes=32,8 no-min-max-bounds=true},gpu-map-parallel-loops,convert-parallel-loops-to-gpu),\
gpu-kernel-outlining,\
canonicalize)";

/// The second part: the kernels (with [`DEVICE_MATH`] in every GPU module) through NVVM to PTX
/// in `gpu.binary` ops, for `target`.
pub fn gpu_codegen_pipeline(target: GpuTarget) -> String {
    format!(
        "builtin.module(gpu-lower-to-nvvm-pipeline{{cubin-format=isa cubin-chip={} cubin-features={}}})",
        target.chip(),
        target.features()
    )
}

/// Definitions of the libdevice functions (`__nv_*`) that MLIR's NVVM lowering calls for math
/// without a PTX instruction of its own, written with PTX instructions, so the PTX is complete
/// and the CUDA driver can load it without libdevice (which only a CUDA toolkit has). The lowering
/// finds these definitions instead of declaring the functions external. `sqrt`, `fabs`, `fma`,
/// `copysign` and `rint` are exact PTX instructions; `log`, `exp` and `pow` go through the
/// hardware's base-2 approximations (`lg2.approx`, `ex2.approx`, relative error about 2^-22),
/// with `pow` following C's rules for a negative base (an odd integer exponent keeps the sign,
/// a fractional one gives NaN) and `pow(x, 0) = pow(1, y) = 1`. They are internal, so the ones
/// a kernel does not call are dropped.
pub const DEVICE_MATH: &str = r#"
    llvm.func internal @__nv_sqrtf(%x: f32) -> f32 {
      %r = llvm.inline_asm "sqrt.rn.f32 $0, $1;", "=f,f" %x : (f32) -> f32
      llvm.return %r : f32
    }
    llvm.func internal @__nv_fabsf(%x: f32) -> f32 {
      %r = llvm.inline_asm "abs.f32 $0, $1;", "=f,f" %x : (f32) -> f32
      llvm.return %r : f32
    }
    llvm.func internal @__nv_fmaf(%a: f32, %b: f32, %c: f32) -> f32 {
      %r = llvm.inline_asm "fma.rn.f32 $0, $1, $2, $3;", "=f,f,f,f" %a, %b, %c : (f32, f32, f32) -> f32
      llvm.return %r : f32
    }
    llvm.func internal @__nv_copysignf(%magnitude: f32, %sign: f32) -> f32 {
      %r = llvm.inline_asm "copysign.f32 $0, $2, $1;", "=f,f,f" %magnitude, %sign : (f32, f32) -> f32
      llvm.return %r : f32
    }
    llvm.func internal @__nv_rintf(%x: f32) -> f32 {
      %r = llvm.inline_asm "cvt.rni.f32.f32 $0, $1;", "=f,f" %x : (f32) -> f32
      llvm.return %r : f32
    }
    llvm.func internal @__nv_logf(%x: f32) -> f32 {
      %l = llvm.inline_asm "lg2.approx.f32 $0, $1;", "=f,f" %x : (f32) -> f32
      %ln2 = llvm.mlir.constant(0.693147182 : f32) : f32
      %r = llvm.fmul %l, %ln2 : f32
      llvm.return %r : f32
    }
    llvm.func internal @__nv_expf(%x: f32) -> f32 {
      %log2e = llvm.mlir.constant(1.44269502 : f32) : f32
      %s = llvm.fmul %x, %log2e : f32
      %r = llvm.inline_asm "ex2.approx.f32 $0, $1;", "=f,f" %s : (f32) -> f32
      llvm.return %r : f32
    }
    llvm.func internal @__nv_powf(%a: f32, %b: f32) -> f32 {
      %magnitude = llvm.inline_asm "abs.f32 $0, $1;", "=f,f" %a : (f32) -> f32
      %l = llvm.inline_asm "lg2.approx.f32 $0, $1;", "=f,f" %magnitude : (f32) -> f32
      %bl = llvm.fmul %b, %l : f32
      %p = llvm.inline_asm "ex2.approx.f32 $0, $1;", "=f,f" %bl : (f32) -> f32
      %rounded = llvm.inline_asm "cvt.rni.f32.f32 $0, $1;", "=f,f" %b : (f32) -> f32
      %integer = llvm.fcmp "oeq" %rounded, %b : f32
      %half_constant = llvm.mlir.constant(5.000000e-01 : f32) : f32
      %half = llvm.fmul %b, %half_constant : f32
      %half_rounded = llvm.inline_asm "cvt.rni.f32.f32 $0, $1;", "=f,f" %half : (f32) -> f32
      %even = llvm.fcmp "oeq" %half_rounded, %half : f32
      %zero = llvm.mlir.constant(0.000000e+00 : f32) : f32
      %negative = llvm.fcmp "olt" %a, %zero : f32
      %true = llvm.mlir.constant(true) : i1
      %not_even = llvm.xor %even, %true : i1
      %odd = llvm.and %integer, %not_even : i1
      %flip = llvm.and %negative, %odd : i1
      %minus = llvm.fneg %p : f32
      %signed = llvm.select %flip, %minus, %p : i1, f32
      %fractional = llvm.xor %integer, %true : i1
      %undefined = llvm.and %negative, %fractional : i1
      %nan = llvm.mlir.constant(0x7FC00000 : f32) : f32
      %defined = llvm.select %undefined, %nan, %signed : i1, f32
      %one = llvm.mlir.constant(1.000000e+00 : f32) : f32
      %zero_exponent = llvm.fcmp "oeq" %b, %zero : f32
      %unit_base = llvm.fcmp "oeq" %a, %one : f32
      %unit = llvm.or %zero_exponent, %unit_base : i1
      %r = llvm.select %unit, %one, %defined : i1, f32
      llvm.return %r : f32
    }
"#;

/// Adds [`DEVICE_MATH`] at the start of every `gpu.module` of a printed module.
pub fn add_device_math(module: &str) -> String {
    let mut out = String::with_capacity(module.len());
    for line in module.split_inclusive('\n') {
        out.push_str(line);
        let trimmed = line.trim();
        if trimmed.starts_with("gpu.module @") && trimmed.ends_with('{') {
            out.push_str(DEVICE_MATH.trim_start_matches('\n'));
        }
    }
    out
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
    let outlined = crate::run_pipeline_on_text(text, GPU_OUTLINING_PIPELINE)?;
    let lowered = crate::run_pipeline_on_text(&add_device_math(&outlined), &gpu_codegen_pipeline(target))?;
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

/// The host side's allocations of an outlined module made GPU allocations: `memref.alloc` becomes
/// `gpu.alloc host_shared` (the runtime gives managed memory, which kernels and the host side
/// both reach) and `memref.dealloc` a call of the runtime's `curv_cuda_free` on the buffer's
/// address. A stack allocation (`memref.alloca`),
/// which a kernel could not reach, is an error.
pub fn device_allocations(module: &str) -> Result<String, MlirError> {
    let unexpected =
        |line: &str| MlirError { message: format!("unexpected allocation on the host side: {}", line.trim()) };
    let mut out = String::with_capacity(module.len());
    // Inside a `gpu.module` (printed at an indentation of two, closed by `  }`), nothing changes.
    let mut in_gpu_module = false;
    let mut freed = 0;
    for line in module.split_inclusive('\n') {
        if in_gpu_module {
            in_gpu_module = line.trim_end() != "  }";
            out.push_str(line);
            continue;
        }
        if line.trim_start().starts_with("gpu.module @") {
            in_gpu_module = true;
            out.push_str(line);
        } else if line.contains("memref.alloca") {
            return Err(MlirError {
                message: format!("a stack allocation on the host side, which kernels cannot reach: {}", line.trim()),
            });
        } else if let Some(start) = line.find("memref.alloc(") {
            // `memref.alloc(SIZES) {alignment = 64 : i64} : TYPE`
            let rest = &line[start + "memref.alloc(".len()..];
            let close = rest.find(')').ok_or_else(|| unexpected(line))?;
            let colon = rest.rfind(" : ").ok_or_else(|| unexpected(line))?;
            out.push_str(&line[..start]);
            out.push_str(&format!("gpu.alloc host_shared ({}){}", &rest[..close], &rest[colon..]));
        } else if let Some(start) = line.find("memref.dealloc ") {
            // `memref.dealloc %x : TYPE` (MLIR's lowering drops a synchronous `gpu.dealloc`).
            let operand = &line[start + "memref.dealloc ".len()..];
            let (value, ty) = operand.split_once(" : ").ok_or_else(|| unexpected(line))?;
            let ty = ty.split(" loc(").next().unwrap_or(ty).trim();
            let indentation = &line[..start];
            freed += 1;
            out.push_str(&format!(
                "{indentation}%curv_freed{freed} = memref.extract_aligned_pointer_as_index {value} : {ty} -> index\n"
            ));
            out.push_str(&format!("{indentation}func.call @curv_cuda_free(%curv_freed{freed}) : (index) -> ()\n"));
        } else {
            out.push_str(line);
        }
    }
    if freed > 0 {
        // Declare the runtime's free at the top of the module.
        let start = out.find("{\n").ok_or_else(|| MlirError { message: "a module without a body".to_string() })? + 2;
        out.insert_str(start, "  func.func private @curv_cuda_free(index)\n");
    }
    Ok(out)
}

/// Lowers a kernel module (the text `crate::lower` produces) for the GPU to the LLVM dialect, host
/// side included: kernels as PTX in `gpu.binary` ops, launches, allocations in managed memory and
/// matrix products (cuBLAS through the runtime) as calls into `curv-cuda`.
pub fn lower_for_cuda(text: &str, target: GpuTarget) -> Result<String, MlirError> {
    initialise_nvptx();
    // Matrix products call cuBLAS (`curv_cuda_sgemm`) instead of the CPU GEMM.
    let text = text.replace("@curv_sgemm(", "@curv_cuda_sgemm(");
    let outlined = crate::run_pipeline_on_text(&text, GPU_OUTLINING_PIPELINE)?;
    let allocated = device_allocations(&outlined)?;
    crate::run_pipeline_on_text(&add_device_math(&allocated), &gpu_codegen_pipeline(target))
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
