//! Failures while training reach the command line with their stable runtime code and where they
//! happened: the parameter, its structure and the step.

mod common;
use common::{curv, repository_root};

/// M-FAC on the digits MLP with a gradient window of `window`, checkpointing every 2 steps.
fn mfac_program(window: usize) -> String {
    let data = repository_root().join("examples/data/digits.csv");
    format!(
        "data digits = csv(\"{}\", label = \"label\", scale = 0.0625)

model mlp(x: f32[B, 64]) -> f32[B, 10] {{
    param w1: f32[64, 16] = glorot_uniform
    param w2: f32[16, 10] = glorot_uniform
    return tanh(x @ w1) @ w2
}}

optimizer m {{
    lr 1e-3
    * : lowrank(stats = gradient_window, window = {window}, damping = 1e-5)
}}

train fit {{
    loss cross_entropy(mlp(digits.x), digits.y)
    optimizer m
    batch 32
    steps 100
    checkpoint every 2
}}
",
        data.display()
    )
}

#[test]
fn a_failed_update_names_its_code_parameter_structure_and_step() {
    let directory = std::env::temp_dir().join(format!("curv-runtime-errors-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&directory);
    std::fs::create_dir_all(&directory).unwrap();
    let (eight, four) = (directory.join("eight.curv"), directory.join("four.curv"));
    std::fs::write(&eight, mfac_program(8)).unwrap();
    std::fs::write(&four, mfac_program(4)).unwrap();
    let first = directory.join("first");
    let output = curv(&["run", eight.to_str().unwrap(), "--steps", "3", "--quiet", "--out", first.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    // Resumed with a smaller window, M-FAC finds a window state of another size at its next step.
    let checkpoint = first.join("checkpoint.safetensors");
    let second = directory.join("second");
    let output = curv(&[
        "run",
        four.to_str().unwrap(),
        "--steps",
        "6",
        "--quiet",
        "--resume",
        checkpoint.to_str().unwrap(),
        "--out",
        second.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.starts_with("error: [E0502] parameter `w1` (lowrank, step 3): "), "{stderr}");
    assert!(stderr.contains("was `window` changed since the checkpoint?"), "{stderr}");
    let _ = std::fs::remove_dir_all(&directory);
}

#[test]
fn a_non_finite_step_has_its_code() {
    let directory = std::env::temp_dir().join(format!("curv-runtime-errors-nonfinite-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&directory);
    std::fs::create_dir_all(&directory).unwrap();
    let program = directory.join("huge.curv");
    std::fs::write(
        &program,
        mfac_program(4)
            .replace("lr 1e-3", "lr 1e30")
            .replace("lowrank(stats = gradient_window, window = 4, damping = 1e-5)", "diagonal")
            .replace("return tanh(x @ w1) @ w2", "return exp(tanh(x @ w1) @ w2)"),
    )
    .unwrap();
    let output = curv(&["run", program.to_str().unwrap(), "--steps", "20", "--quiet"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.starts_with("error: [E0501] non-finite value at step "), "{stderr}");
    let _ = std::fs::remove_dir_all(&directory);
}
