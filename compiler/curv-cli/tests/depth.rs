//! Programs of any depth and length: every recursive construct of the grammar, generated at
//! depth or length 10^5 (and just inside the nesting limit), goes through `check`, `emit --stage
//! ir|grad|mlir` and, where it is valid, `run`. Each exits 0 or 1 with a diagnostic, never by a
//! stack overflow or a panic, and never hangs (a run longer than the guard below is a failure).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The depth or length each construct is tried at.
const LONG: usize = 100_000;
/// Just inside the nesting limit: such programs are valid and must go through every stage.
const NEAR_LIMIT: usize = curv_grammar::nesting::NESTING_LIMIT - 8;
/// Not a timing: a process still running after this long is treated as hung.
const HANG_GUARD: Duration = Duration::from_secs(600);

struct Outcome {
    code: Option<i32>,
    stderr: String,
}

fn curv(args: &[&str], directory: &Path) -> Outcome {
    let mut child = Command::new(env!("CARGO_BIN_EXE_curv"))
        .args(args)
        .current_dir(directory)
        .env("CURV_CACHE", "off")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr_pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = stderr_pipe.read_to_end(&mut bytes);
        bytes
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > HANG_GUARD {
            let _ = child.kill();
            panic!("curv {args:?} in {} was still running after {HANG_GUARD:?}", directory.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stderr = String::from_utf8_lossy(&reader.join().unwrap()).into_owned();
    Outcome { code: status.code(), stderr }
}

struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

fn scratch(name: &str) -> Scratch {
    let directory = std::env::temp_dir().join(format!("curv-depth-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&directory);
    std::fs::create_dir_all(&directory).unwrap();
    // Eight examples of two features and a label of two classes.
    let mut csv = String::from("a,b,label\n");
    for row in 0..8 {
        csv.push_str(&format!("{},{},{}\n", row as f32 * 0.1, 1.0 - row as f32 * 0.1, row % 2));
    }
    std::fs::write(directory.join("tiny.csv"), csv).unwrap();
    Scratch(directory)
}

/// A whole program whose model returns `body` (the last line of `lets`, if any, may be used).
fn program(lets: &str, result: &str, extra_items: &str) -> String {
    format!(
        "use std.optimizers.sgd\n\
         data tiny = csv(\"tiny.csv\", label = \"label\")\n\
         {extra_items}\n\
         model m(x: f32[B, 2]) -> f32[B, 2] {{\n\
         param w: f32[2, 2] = glorot_uniform\n\
         {lets}\n\
         return {result}\n\
         }}\n\
         train fit {{\n\
         loss cross_entropy(m(tiny.x), tiny.y)\n\
         optimizer sgd\n\
         batch 4\n\
         steps 2\n\
         }}\n"
    )
}

fn repeat(text: &str, count: usize) -> String {
    text.repeat(count)
}

/// `first op x op x ...` with `count` operators, a line break after every tenth operator.
fn chain(first: &str, op: &str, operand: &str, count: usize) -> String {
    let mut text = String::from(first);
    for index in 0..count {
        // A line break may follow an operator (not an operand, where it would end the statement).
        let gap = if index % 10 == 9 { "\n" } else { " " };
        text.push_str(&format!(" {op}{gap}{operand}"));
    }
    text
}

/// The constructs, each as (name, program) at the given depth or length.
fn constructs(depth: usize) -> Vec<(String, String)> {
    let mut cases = Vec::new();
    let mut case = |name: &str, text: String| cases.push((format!("{name}_{depth}"), text));
    // Binary operators of each precedence (`+ -`, `* / @`, `^`), left- or right-leaning.
    case("sum", program("", &chain("x", "+", "x", depth), ""));
    case("difference", program("", &chain("x", "-", "x", depth), ""));
    case("product", program("", &chain("x", "*", "x", depth), ""));
    case("quotient", program("", &chain("x", "/", "(x + 2.0)", depth), ""));
    case("matmul", program("", &chain("x", "@", "(w * 0.1)", depth), ""));
    case("power", program("", &chain("x", "^", "1.0", depth), ""));
    // Unary minus, calls, indexing, fields, lists and parentheses.
    case("negation", program("", &format!("{}x", repeat("- ", depth)), ""));
    case("calls", program("", &format!("{}x{}", repeat("tanh(", depth), repeat(")", depth)), ""));
    case("indexing", program("", &format!("x{}", repeat("[0]", depth)), ""));
    case("fields", program("", &format!("x{}", repeat(".f", depth)), ""));
    case("lists", program(&format!("let l = {}1{}", repeat("[", depth), repeat("]", depth)), "x", ""));
    case("parentheses", program("", &format!("{}x @ w{}", repeat("(", depth), repeat(")", depth)), ""));
    // Type dimensions: `f32[2 * 1 * 1 ...]`.
    case("dimensions", program(&format!("param v: f32[{}, 2] = zeros", chain("2", "*", "1", depth)), "x @ v", ""));
    // A chain of lets, each using the one before (declared last to first: order does not matter).
    let mut lets = String::new();
    for index in (1..depth).rev() {
        lets.push_str(&format!("let a{index} = a{} * 0.5 + x\n", index - 1));
    }
    lets.push_str("let a0 = x @ w\n");
    case("lets", program(&lets, &format!("a{}", depth - 1), ""));
    // A chain of scalar lets: scalar instructions are inlined into the kernels that read them.
    let mut scalars = String::from("param c: f32 = zeros\n");
    for index in (1..depth).rev() {
        scalars.push_str(&format!("let s{index} = s{} * 0.5 + 1.0\n", index - 1));
    }
    scalars.push_str("let s0 = c + 1.0\n");
    case("scalar_lets", program(&scalars, &format!("(x @ w) * s{}", depth - 1), ""));
    // Nested blocks: `every` blocks inside a rule.
    let mut rule = String::from("rule deep(p, g; rate = 0.1) {\n");
    rule.push_str(&repeat("every step {\n", depth));
    rule.push_str("p = p - rate * g\n");
    rule.push_str(&repeat("}\n", depth));
    rule.push_str("}\n");
    case("blocks", program("", "x @ w", &rule));
    // Many statements: unused parameters.
    let mut params = String::new();
    for index in 0..depth {
        params.push_str(&format!("param u{index}: f32[2] = zeros\n"));
    }
    case("parameters", program(&params, "x @ w", ""));
    cases
}

/// Runs one program through every stage; returns whether `check` accepted it.
fn exercise(name: &str, text: &str) -> (bool, String) {
    let started = Instant::now();
    let directory = scratch(name);
    std::fs::write(directory.0.join("deep.curv"), text).unwrap();
    let check = curv(&["check", "deep.curv"], &directory.0);
    assert!(matches!(check.code, Some(0 | 1)), "{name}: check exited with {:?}\n{}", check.code, tail(&check.stderr));
    let valid = check.code == Some(0);
    for stage in ["ir", "grad", "mlir"] {
        let emit = curv(&["emit", "deep.curv", "--stage", stage], &directory.0);
        assert_eq!(emit.code, check.code, "{name}: emit --stage {stage}\n{}", tail(&emit.stderr));
    }
    if valid {
        let run = curv(&["run", "deep.curv", "--quiet"], &directory.0);
        assert_eq!(run.code, Some(0), "{name}: run\n{}", tail(&run.stderr));
    }
    assert!(!check.stderr.contains("panicked"), "{name}: {}", tail(&check.stderr));
    // For the record (`--nocapture`), not a timing assertion.
    let verdict = if valid { "valid, trained" } else { "refused" };
    eprintln!("{name}: {} bytes, {verdict}, every stage in {:.1} s", text.len(), started.elapsed().as_secs_f64());
    (valid, check.stderr)
}

fn tail(text: &str) -> &str {
    let start = text.len().saturating_sub(4000);
    let start = (start..=text.len()).find(|index| text.is_char_boundary(*index)).unwrap_or(text.len());
    &text[start..]
}

#[test]
fn every_construct_at_depth_ten_to_the_five_exits_zero_or_one_with_a_diagnostic() {
    for (name, text) in constructs(LONG) {
        let (valid, stderr) = exercise(&name, &text);
        let expected_valid =
            matches!(name.as_str(), "parentheses_100000" | "lets_100000" | "scalar_lets_100000" | "parameters_100000");
        assert_eq!(valid, expected_valid, "{name}:\n{}", tail(&stderr));
        if !valid {
            // One diagnostic for the statement, pointing at where the limit is passed.
            assert!(stderr.contains("[E0006]"), "{name}:\n{}", tail(&stderr));
            assert_eq!(stderr.matches("[E0006]").count(), 1, "{name}:\n{}", tail(&stderr));
        }
    }
}

#[test]
fn every_construct_just_inside_the_nesting_limit_goes_through_every_stage() {
    for (name, text) in constructs(NEAR_LIMIT) {
        let (valid, stderr) = exercise(&name, &text);
        // Indexing a matrix 248 times, fields of a tensor, a nested list and nested `every` blocks
        // are errors of the checker, which gets to see them whole.
        let type_error = ["indexing", "fields", "lists", "blocks"].iter().any(|prefix| name.starts_with(prefix));
        assert_eq!(valid, !type_error, "{name}:\n{}", tail(&stderr));
        assert!(!stderr.contains("[E0006]"), "{name}:\n{}", tail(&stderr));
    }
}

/// The losses `curv run` prints, one per step.
fn losses(stdout: &str) -> Vec<f64> {
    stdout
        .lines()
        .filter_map(|line| line.strip_prefix("step").and_then(|rest| rest.split("loss").nth(1)))
        .filter_map(|value| value.split_whitespace().next()?.parse().ok())
        .collect()
}

#[test]
fn a_function_cut_into_parts_trains_alike_on_every_backend_and_from_the_kernel_cache() {
    // 2,000 links of `tanh`: the gradient function is long enough to be cut into parts
    // (`curv_mlir::lower::SPLIT_LINES`), and its backward parts read forward values through the
    // workspace.
    let mut lets = String::new();
    for index in (1..2_000).rev() {
        lets.push_str(&format!("let a{index} = tanh(a{}) * 0.5 + x\n", index - 1));
    }
    lets.push_str("let a0 = x @ w\n");
    let text = program(&lets, "a1999", "").replace("steps 2", "steps 3");
    let directory = scratch("parts");
    std::fs::write(directory.0.join("parts.curv"), &text).unwrap();
    let run = |backend: &str, cache: Option<&Path>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_curv"));
        command.args(["run", "parts.curv", "--backend", backend]).current_dir(&directory.0);
        match cache {
            Some(cache) => command.env("CURV_CACHE_DIR", cache).env_remove("CURV_CACHE"),
            None => command.env("CURV_CACHE", "off"),
        };
        let output = command.output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(output.status.success(), "{backend}: {}", String::from_utf8_lossy(&output.stderr));
        let losses = losses(&stdout);
        assert_eq!(losses.len(), 3, "{backend}: {stdout}");
        losses
    };
    let mlir = Command::new(env!("CARGO_BIN_EXE_curv"))
        .args(["emit", "parts.curv", "--stage", "mlir"])
        .current_dir(&directory.0)
        .output()
        .unwrap();
    let mlir = String::from_utf8_lossy(&mlir.stdout);
    assert!(mlir.matches("func.func private @loss_and_gradients__part").count() >= 4, "the function is not cut");
    let jit = run("mlir", None);
    let cache = directory.0.join("cache");
    let built = run("mlir", Some(&cache));
    let loaded = run("mlir", Some(&cache));
    let interpreted = run("interp", None);
    assert_eq!(jit, built, "the JIT and the kernel cache's build");
    assert_eq!(built, loaded, "the kernel cache's build and its load");
    for (mlir, interp) in jit.iter().zip(&interpreted) {
        assert!((mlir - interp).abs() <= 1e-3 * interp.abs().max(1.0), "mlir {jit:?} vs interpreter {interpreted:?}");
    }
    assert!(jit[2] < jit[0], "the loss goes down: {jit:?}");
}
