//! The command-line contract: exit codes (0 ok, 1 user error, 2 internal failure, never 101),
//! where output goes, and `emit -o` writing whole files.

use std::process::{Command, Output};

mod common;

use common::{curv, repository_root, text, Scratch};

fn scratch_directory(name: &str) -> Scratch {
    common::scratch("cli", name)
}

#[test]
fn check_of_a_valid_file_prints_the_summary_and_exits_zero() {
    let output = curv(&["check", "examples/digits_mlp.curv"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let stdout = text(&output.stdout);
    assert!(stdout.contains("ok (1 train block"), "{stdout}");
    assert!(stdout.contains("w1         [64, 256]"), "{stdout}");
    assert!(stdout.contains("estimated FLOPs per step"), "{stdout}");
    assert!(output.stderr.is_empty(), "{}", text(&output.stderr));
}

#[test]
fn check_of_an_invalid_file_prints_diagnostics_to_stderr_and_exits_one() {
    let output = curv(&["check", "tests/ui/several_syntax_errors.curv"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = text(&output.stderr);
    assert_eq!(stderr.matches("[E0001]").count(), 3, "{stderr}");
    assert!(output.stdout.is_empty());
}

#[test]
fn a_missing_input_file_is_a_user_error_naming_the_path() {
    let output = curv(&["check", "no/such/file.curv"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stderr).contains("cannot read no/such/file.curv: no such file"), "{}", text(&output.stderr));
}

#[test]
fn a_binary_input_file_is_a_user_error() {
    let directory = scratch_directory("binary");
    let path = directory.join("garbage.curv");
    std::fs::write(&path, [0xff, 0xfe, 0x00, 0x80]).unwrap();
    let output = curv(&["check", path.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stderr).contains("is not UTF-8 text"), "{}", text(&output.stderr));
}

#[test]
fn usage_errors_exit_one_and_help_exits_zero() {
    assert_eq!(curv(&["frobnicate"]).status.code(), Some(1));
    assert_eq!(curv(&["check"]).status.code(), Some(1));
    assert_eq!(curv(&["--help"]).status.code(), Some(0));
    let unknown_stage = curv(&["emit", "examples/siren.curv", "--stage", "bytecode"]);
    assert_eq!(unknown_stage.status.code(), Some(1));
    assert!(text(&unknown_stage.stderr).contains("unknown stage `bytecode`"));
}

#[test]
fn emit_writes_each_stage_to_stdout_or_a_file() {
    for stage in ["tokens", "ast", "ir"] {
        let output = curv(&["emit", "examples/siren.curv", "--stage", stage]);
        assert_eq!(output.status.code(), Some(0), "{stage}: {}", text(&output.stderr));
        assert!(!output.stdout.is_empty(), "{stage}");
    }
    let directory = scratch_directory("emit");
    let path = directory.join("siren.ir");
    let output = curv(&["emit", "examples/siren.curv", "--stage", "ir", "-o", path.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(0));
    let written = std::fs::read_to_string(&path).unwrap();
    let printed = text(&curv(&["emit", "examples/siren.curv", "--stage", "ir"]).stdout);
    assert_eq!(written, printed);
    // No temporary file is left behind.
    let leftovers: Vec<_> = std::fs::read_dir(&directory)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|entry| entry.file_name() != "siren.ir")
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn emit_ir_of_an_invalid_file_prints_diagnostics_and_exits_one() {
    let output = curv(&["emit", "tests/ui/matmul_inner_mismatch.curv", "--stage", "ir"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(output.stdout.is_empty());
    assert!(text(&output.stderr).contains("[E0200]"));
}

#[test]
fn emit_to_an_unwritable_path_is_a_user_error() {
    let output = curv(&["emit", "examples/siren.curv", "--stage", "ast", "-o", "/nonexistent-directory/out.ast"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stderr).contains("cannot write /nonexistent-directory/out.ast"));
}

#[test]
fn version_checks_the_mlir_toolchain() {
    let output = curv(&["version"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    assert!(text(&output.stdout).contains("MLIR toolchain: ok"));
}

#[test]
fn timings_are_reported_per_stage_on_standard_error() {
    let output = curv(&["check", "examples/siren.curv", "--timings"]);
    assert_eq!(output.status.code(), Some(0));
    let stderr = text(&output.stderr);
    assert!(stderr.starts_with("timings: parse ") && stderr.contains(" ms, check "), "{stderr}");
    let output = curv(&["run", "examples/optimizers/adam.curv", "--steps", "3", "--quiet", "--timings"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let stderr = text(&output.stderr);
    for stage in ["parse", "check", "autodiff", "compile", "train"] {
        assert!(stderr.contains(&format!("{stage} ")), "{stderr}");
    }
}

#[test]
fn emit_mlir_carries_source_locations_and_lowers_to_llvm() {
    let output = curv(&["emit", "examples/siren.curv", "--stage", "mlir"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let mlir = text(&output.stdout);
    assert!(mlir.contains("func.func @loss_and_gradients"));
    // Operations point at the .curv code they come from.
    assert!(mlir.contains("loc(\"examples/siren.curv\":"), "{mlir}");
    assert!(mlir.contains("loc(\"std.optimizers.adam\":"), "rule updates point into the standard library");
    let output = curv(&["emit", "examples/siren.curv", "--stage", "llvm"]);
    assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
    let llvm = text(&output.stdout);
    assert!(llvm.contains("llvm.func @loss_and_gradients") && !llvm.contains("linalg.generic"));
}

#[test]
fn emit_ptx_prints_a_kernel_per_gpu_module_for_the_chosen_target_only() {
    // The grouped Adam update of the digits MLP is one kernel per parameter in the PTX as in the
    // LLVM code (no GPU is needed to generate PTX).
    for (gpu, target) in [(None, ".target sm_90"), (Some("sm_80"), ".target sm_80")] {
        let mut args = vec!["emit", "examples/digits_mlp.curv", "--stage", "ptx"];
        if let Some(gpu) = gpu {
            args.extend(["--gpu", gpu]);
        }
        let output = curv(&args);
        assert_eq!(output.status.code(), Some(0), "{}", text(&output.stderr));
        let ptx = text(&output.stdout);
        assert!(ptx.contains(target), "{gpu:?}");
        let group = ptx.split("// rule adam").nth(1).expect("the grouped update's section");
        assert_eq!(group.matches(".entry ").count(), 6, "{group}");
        assert!(ptx.contains("// gpu module loss_and_gradients_kernel"));
        // Every module of the step says how its launches run: back to back, none waiting.
        let launches = ptx.matches("// launches back to back (the host side touches no memory)").count();
        assert_eq!(launches, 2, "the gradients and the grouped update launch back to back");
        assert!(!ptx.contains("// every launch waits"), "{ptx}");
    }
    // Targets come from a table, never from the user's text.
    let output = curv(&["emit", "examples/digits_mlp.curv", "--stage", "ptx", "--gpu", "sm_90 +ptx70"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(text(&output.stderr).contains("unknown GPU"), "{}", text(&output.stderr));
}

#[test]
fn a_second_run_of_an_unchanged_file_loads_its_kernels_from_the_cache() {
    let cache = scratch_directory("cache");
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_curv"))
            .args(["run", "examples/optimizers/adam.curv", "--steps", "3", "--quiet", "--timings"])
            .current_dir(repository_root())
            .env("CURV_CACHE_DIR", &cache)
            .output()
            .unwrap()
    };
    let compile_ms = |output: &Output| -> f64 {
        let stderr = text(&output.stderr);
        let after = stderr.split("compile ").nth(1).unwrap_or_else(|| panic!("{stderr}"));
        after.split(" ms").next().unwrap().parse().unwrap()
    };
    let first = run();
    assert_eq!(first.status.code(), Some(0), "{}", text(&first.stderr));
    let entries = std::fs::read_dir(&cache)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|entry| entry.path().extension().is_some_and(|extension| extension == "so"))
        .count();
    assert!(entries >= 3, "{entries} cached kernels");
    let second = run();
    assert_eq!(second.status.code(), Some(0));
    // Loading shared objects takes milliseconds; compiling them took far longer.
    assert!(
        compile_ms(&second) * 5.0 < compile_ms(&first),
        "first {} ms, second {} ms",
        compile_ms(&first),
        compile_ms(&second)
    );
    // Disabling the cache compiles in memory again.
    let cache_off = scratch_directory("cache-off");
    let output = Command::new(env!("CARGO_BIN_EXE_curv"))
        .args(["run", "examples/optimizers/adam.curv", "--steps", "3", "--quiet"])
        .current_dir(repository_root())
        .env("CURV_CACHE", "off")
        .env("CURV_CACHE_DIR", &cache_off)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(0));
    assert_eq!(std::fs::read_dir(&cache_off).unwrap().count(), 0);
}
