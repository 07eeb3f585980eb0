//! Object files straight from LLVM's code generator: a module in the LLVM dialect translated to
//! LLVM IR, optimised (`default<O2>`) and emitted for this machine, with static initialisers as
//! `.init_array` entries (which an execution engine's object dump does not have). `curv build
//! --device cuda` needs this: the initialiser of a GPU module loads its PTX.

use crate::MlirError;
use melior::ir::Module;
use std::ffi::{c_char, c_int, c_void, CStr, CString};

type LlvmContext = *mut c_void;
type LlvmModule = *mut c_void;
type LlvmTarget = *mut c_void;
type LlvmTargetMachine = *mut c_void;
type LlvmTargetData = *mut c_void;
type LlvmPassOptions = *mut c_void;
type LlvmError = *mut c_void;

unsafe extern "C" {
    fn mlirTranslateModuleToLLVMIR(module: mlir_sys::MlirOperation, context: LlvmContext) -> LlvmModule;
    fn LLVMContextCreate() -> LlvmContext;
    fn LLVMContextDispose(context: LlvmContext);
    fn LLVMDisposeModule(module: LlvmModule);
    fn LLVMGetDefaultTargetTriple() -> *mut c_char;
    fn LLVMDisposeMessage(message: *mut c_char);
    fn LLVMGetTargetFromTriple(triple: *const c_char, target: *mut LlvmTarget, error: *mut *mut c_char) -> c_int;
    fn LLVMCreateTargetMachine(
        target: LlvmTarget,
        triple: *const c_char,
        cpu: *const c_char,
        features: *const c_char,
        level: c_int,
        relocation: c_int,
        code_model: c_int,
    ) -> LlvmTargetMachine;
    fn LLVMDisposeTargetMachine(machine: LlvmTargetMachine);
    fn LLVMCreateTargetDataLayout(machine: LlvmTargetMachine) -> LlvmTargetData;
    fn LLVMDisposeTargetData(data: LlvmTargetData);
    fn LLVMSetModuleDataLayout(module: LlvmModule, data: LlvmTargetData);
    fn LLVMSetTarget(module: LlvmModule, triple: *const c_char);
    fn LLVMCreatePassBuilderOptions() -> LlvmPassOptions;
    fn LLVMDisposePassBuilderOptions(options: LlvmPassOptions);
    fn LLVMRunPasses(
        module: LlvmModule,
        passes: *const c_char,
        machine: LlvmTargetMachine,
        options: LlvmPassOptions,
    ) -> LlvmError;
    fn LLVMGetErrorMessage(error: LlvmError) -> *mut c_char;
    fn LLVMDisposeErrorMessage(message: *mut c_char);
    fn LLVMTargetMachineEmitToFile(
        machine: LlvmTargetMachine,
        module: LlvmModule,
        file: *const c_char,
        kind: c_int,
        error: *mut *mut c_char,
    ) -> c_int;
}

#[cfg(target_arch = "x86_64")]
unsafe extern "C" {
    fn LLVMInitializeX86TargetInfo();
    fn LLVMInitializeX86Target();
    fn LLVMInitializeX86TargetMC();
    fn LLVMInitializeX86AsmPrinter();
}

#[cfg(target_arch = "aarch64")]
unsafe extern "C" {
    fn LLVMInitializeAArch64TargetInfo();
    fn LLVMInitializeAArch64Target();
    fn LLVMInitializeAArch64TargetMC();
    fn LLVMInitializeAArch64AsmPrinter();
}

fn initialise_native_target() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| unsafe {
        #[cfg(target_arch = "x86_64")]
        {
            LLVMInitializeX86TargetInfo();
            LLVMInitializeX86Target();
            LLVMInitializeX86TargetMC();
            LLVMInitializeX86AsmPrinter();
        }
        #[cfg(target_arch = "aarch64")]
        {
            LLVMInitializeAArch64TargetInfo();
            LLVMInitializeAArch64Target();
            LLVMInitializeAArch64TargetMC();
            LLVMInitializeAArch64AsmPrinter();
        }
    });
}

/// A string LLVM allocated, taken and disposed of.
fn take_message(message: *mut c_char) -> String {
    if message.is_null() {
        return String::new();
    }
    let text = unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned();
    unsafe { LLVMDisposeMessage(message) };
    text
}

/// LLVM's constants: optimisation level 2, position-independent code, the default code model,
/// an object file.
const OPTIMISATION_DEFAULT: c_int = 2;
const RELOCATION_PIC: c_int = 2;
const CODE_MODEL_DEFAULT: c_int = 0;
const OBJECT_FILE: c_int = 1;

/// Translates `module` (fully in the LLVM dialect, plus GPU launches and binaries) to LLVM IR and
/// writes it as an object file for this machine (generic x86-64 or AArch64: a trainer is built to
/// run elsewhere, so no host-specific instructions).
pub fn emit_object(module: &Module, path: &std::path::Path) -> Result<(), MlirError> {
    let error = |message: String| MlirError { message };
    initialise_native_target();
    let path_text =
        CString::new(path.to_string_lossy().as_bytes()).map_err(|_| error("a path with a NUL byte".into()))?;
    unsafe {
        let context = LLVMContextCreate();
        let llvm_module = mlirTranslateModuleToLLVMIR(module.as_operation().to_raw(), context);
        if llvm_module.is_null() {
            LLVMContextDispose(context);
            return Err(error("the module could not be translated to LLVM IR".into()));
        }
        let result = (|| {
            let triple = LLVMGetDefaultTargetTriple();
            let triple_text = take_message(triple);
            let triple = CString::new(triple_text.clone()).map_err(|_| error("a bad target triple".into()))?;
            let mut target: LlvmTarget = std::ptr::null_mut();
            let mut message: *mut c_char = std::ptr::null_mut();
            if LLVMGetTargetFromTriple(triple.as_ptr(), &mut target, &mut message) != 0 {
                return Err(error(format!("no LLVM target for {triple_text}: {}", take_message(message))));
            }
            // The features of a generic CPU of the architecture (the trainer may run elsewhere).
            let (cpu, features) = if cfg!(target_arch = "x86_64") { ("x86-64", "") } else { ("generic", "") };
            let cpu = CString::new(cpu).unwrap_or_default();
            let features = CString::new(features).unwrap_or_default();
            let machine = LLVMCreateTargetMachine(
                target,
                triple.as_ptr(),
                cpu.as_ptr(),
                features.as_ptr(),
                OPTIMISATION_DEFAULT,
                RELOCATION_PIC,
                CODE_MODEL_DEFAULT,
            );
            if machine.is_null() {
                return Err(error(format!("LLVM could not create a target machine for {triple_text}")));
            }
            let data = LLVMCreateTargetDataLayout(machine);
            LLVMSetModuleDataLayout(llvm_module, data);
            LLVMSetTarget(llvm_module, triple.as_ptr());
            let options = LLVMCreatePassBuilderOptions();
            let passes = CString::new("default<O2>").unwrap_or_default();
            let failure = LLVMRunPasses(llvm_module, passes.as_ptr(), machine, options);
            LLVMDisposePassBuilderOptions(options);
            let outcome = if !failure.is_null() {
                let message = LLVMGetErrorMessage(failure);
                let text = CStr::from_ptr(message).to_string_lossy().into_owned();
                LLVMDisposeErrorMessage(message);
                Err(error(format!("LLVM's optimisation passes failed: {text}")))
            } else {
                let mut message: *mut c_char = std::ptr::null_mut();
                if LLVMTargetMachineEmitToFile(machine, llvm_module, path_text.as_ptr(), OBJECT_FILE, &mut message) != 0
                {
                    Err(error(format!("LLVM could not write {}: {}", path.display(), take_message(message))))
                } else {
                    Ok(())
                }
            };
            LLVMDisposeTargetData(data);
            LLVMDisposeTargetMachine(machine);
            outcome
        })();
        LLVMDisposeModule(llvm_module);
        LLVMContextDispose(context);
        result?;
    }
    if !path.is_file() {
        return Err(error(format!("no object file was written to {}", path.display())));
    }
    Ok(())
}
